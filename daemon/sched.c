/* The scheduler: a FIFO of waiting requests, admission by KV reservation, and a loop that
 * builds one engine step at a time (decode every running sequence, plus a slice of the oldest
 * prefill), samples, applies stop rules and streams UTF-8-safe text.
 *
 * Threads: submit/abort/drain/calibrate/counts come from any thread and touch only the fields
 * under `mu`; everything else belongs to the engine thread in uc_sched_run. */
#include "sched.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "metrics.h"
#include "sched_internal.h"

const char *uc_finish_reason_name(enum uc_finish_reason r)
{
    switch (r) {
    case UC_FINISH_STOP: return "STOP";
    case UC_FINISH_LENGTH: return "LENGTH";
    case UC_FINISH_ABORTED: return "ABORTED";
    case UC_FINISH_ERROR: return "ERROR";
    case UC_FINISH_NONE: break;
    }
    return "NONE";
}

static const char *const schedule_names[] = {
    [UC_SCHEDULE_MIXED] = "mixed",
    [UC_SCHEDULE_PREFILL_FIRST] = "prefill-first",
};

bool uc_schedule_parse(const char *name, enum uc_schedule *out)
{
    for (size_t i = 0; i < sizeof schedule_names / sizeof schedule_names[0]; i++) {
        if (name && strcmp(name, schedule_names[i]) == 0) {
            *out = (enum uc_schedule)i;
            return true;
        }
    }
    return false;
}

void uc_request_init(struct uc_request *r)
{
    memset(r, 0, sizeof *r);
    r->sampling = uc_sampling_default_params();
    r->compress = uc_compress_default_params();
}

struct uc_sched_params uc_sched_default_params(void)
{
    struct uc_sched_params p = {
        .max_queued_requests = 256,
        .max_queued_tokens = 1 << 22,
        .max_running = 64,
        .prefill_step_tokens = 16384,
        .prefill_memory = 0,
        .schedule = UC_SCHEDULE_MIXED,
        .max_decode_wait_ms = 0,
        .default_max_tokens = 256,
        .max_tokens_limit = 1 << 20,
        .max_stop_strings = 64,
        .max_stop_len = 256,
        .heartbeat_ms = 1000,
        .default_compress = uc_compress_default_params(),
        .calib_text_path = NULL,
        .calib_window_tokens = 1024,
        .kvsharer = {.threshold = 0.5, .ratio = 0.3, .target = 0},
        .kvsharer_window = 256,
        .minicache_pairs = 0,
        .minicache_window = 256,
        .calib_max_windows = 4,
        .calib_max_text_bytes = 1 << 20,
    };
    return p;
}

/* ---- requests --------------------------------------------------------------------------- */

void sched_req_free(struct req *r)
{
    if (!r) {
        return;
    }
    for (int32_t i = 0; i < r->n_stop; i++) {
        uc_free(r->stop[i]);
    }
    uc_free(r->stop);
    uc_free(r->stop_len);
    uc_free(r->stop_ids);
    uc_free(r->prompt);
    uc_free(r->kids);
    if (r->share && --r->share->refs == 0) {
        uc_free(r->share);
    }
    uc_sampler_destroy(r->sampler);
    uc_buf_fini(&r->bytes);
    uc_free(r);
}

bool sched_push_ptr(struct req ***v, int64_t *n, int64_t *cap, struct req *r)
{
    if (*n == *cap) {
        int64_t c = *cap ? *cap * 2 : 16;
        struct req **nv = uc_realloc(*v, (size_t)c * sizeof *nv);
        if (!nv) {
            return false;
        }
        *v = nv;
        *cap = c;
    }
    (*v)[(*n)++] = r;
    return true;
}

void sched_drop_ptr(struct req **v, int64_t *n, const struct req *r)
{
    for (int64_t i = 0; i < *n; i++) {
        if (v[i] == r) {
            memmove(v + i, v + i + 1, (size_t)(*n - i - 1) * sizeof *v);
            (*n)--;
            return;
        }
    }
}

static struct req *find_live(struct uc_sched *s, const char *id)
{
    for (int64_t i = 0; i < s->n_live; i++) {
        if (strcmp(s->live[i]->id, id) == 0) {
            return s->live[i];
        }
    }
    return NULL;
}

/* Compression parameters after defaults: a field left at zero takes the server's value. */
static struct uc_compress_params merge_compress(const struct uc_compress_params *d,
                                                const struct uc_request *r)
{
    if (!r->has_compress) {
        return *d;
    }
    return r->compress;
}

uc_status uc_sched_submit(struct uc_sched *s, const struct uc_request *r, uc_event_sink sink,
                          void *user, char *id_out, char *msg, size_t msg_size)
{
    msg[0] = '\0';
    if (r->n_prompt < 1) {
        snprintf(msg, msg_size, "prompt: empty (at least one token is needed)");
        return UC_ERR_INVALID_ARG;
    }
    for (int64_t i = 0; i < r->n_prompt; i++) {
        if (r->prompt[i] < 0 || r->prompt[i] >= s->cfg->vocab) {
            snprintf(msg, msg_size, "prompt: token id %d at %lld outside the vocabulary (%lld)",
                     r->prompt[i], (long long)i, (long long)s->cfg->vocab);
            return UC_ERR_INVALID_ARG;
        }
    }
    uc_status rc = uc_sampling_params_validate(&r->sampling, msg, msg_size);
    if (rc != UC_OK) {
        return rc;
    }
    int32_t max_tokens = r->max_tokens > 0 ? r->max_tokens : s->p.default_max_tokens;
    if (r->max_tokens < 0 || max_tokens > s->p.max_tokens_limit) {
        snprintf(msg, msg_size, "sampling.max_tokens=%d must be in [0, %d]", r->max_tokens,
                 s->p.max_tokens_limit);
        return UC_ERR_INVALID_ARG;
    }
    int64_t ctx = uc_engine_max_ctx(s->e);
    if (r->max_tokens == 0 && r->n_prompt + max_tokens > ctx) {
        max_tokens = (int32_t)(ctx - r->n_prompt); /* a default never makes a request invalid */
    }
    if (r->n_prompt + (int64_t)max_tokens > ctx || max_tokens < 1) {
        snprintf(msg, msg_size,
                 "prompt of %lld tokens + sampling.max_tokens %d exceeds the context length %lld",
                 (long long)r->n_prompt, max_tokens, (long long)ctx);
        return UC_ERR_INVALID_ARG;
    }
    if (r->min_tokens < 0 || r->min_tokens > max_tokens) {
        snprintf(msg, msg_size, "sampling.min_tokens=%d must be in [0, max_tokens=%d]",
                 r->min_tokens, max_tokens);
        return UC_ERR_INVALID_ARG;
    }
    if (r->logprobs < 0 || r->logprobs > 20) {
        snprintf(msg, msg_size, "sampling.logprobs=%d must be in [0, 20]", r->logprobs);
        return UC_ERR_INVALID_ARG;
    }
    if (r->n_stop < 0 || r->n_stop > s->p.max_stop_strings) {
        snprintf(msg, msg_size, "sampling.stop: %d strings, at most %d are allowed", r->n_stop,
                 s->p.max_stop_strings);
        return UC_ERR_INVALID_ARG;
    }
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t n = r->stop_len ? r->stop_len[i] : strlen(r->stop[i]);
        if (n == 0 || n > (size_t)s->p.max_stop_len) {
            snprintf(msg, msg_size, "sampling.stop[%d]: length %zu must be in [1, %d]", i, n,
                     s->p.max_stop_len);
            return UC_ERR_INVALID_ARG;
        }
    }
    if (r->n_stop_ids < 0 || r->n_stop_ids > 1024) {
        snprintf(msg, msg_size, "sampling.stop_token_ids: at most 1024");
        return UC_ERR_INVALID_ARG;
    }
    for (int32_t i = 0; i < r->n_stop_ids; i++) {
        if (r->stop_ids[i] < 0 || r->stop_ids[i] >= s->cfg->vocab) {
            snprintf(msg, msg_size, "sampling.stop_token_ids[%d]=%d outside the vocabulary", i,
                     r->stop_ids[i]);
            return UC_ERR_INVALID_ARG;
        }
    }
    int32_t n_choices = r->n > 1 ? r->n : 1;
    if (r->n < 0 || n_choices > UC_SCHED_MAX_N || n_choices > s->p.max_running) {
        snprintf(msg, msg_size, "n=%d must be in [1, %d]", r->n,
                 UC_SCHED_MAX_N < s->p.max_running ? UC_SCHED_MAX_N : s->p.max_running);
        return UC_ERR_INVALID_ARG;
    }
    if (strlen(r->request_id) >= UC_REQUEST_ID_MAX) {
        snprintf(msg, msg_size, "request_id: longer than %d bytes", UC_REQUEST_ID_MAX - 1);
        return UC_ERR_INVALID_ARG;
    }
    struct req *q = uc_calloc(1, sizeof *q);
    if (!q) {
        return UC_ERRF(UC_ERR_NOMEM, "request");
    }
    uc_buf_init(&q->bytes);
    q->prompt = uc_malloc((size_t)r->n_prompt * sizeof(int32_t));
    q->stop = uc_calloc((size_t)r->n_stop + 1, sizeof(char *));
    q->stop_len = uc_calloc((size_t)r->n_stop + 1, sizeof(size_t));
    q->stop_ids = uc_malloc((size_t)r->n_stop_ids * sizeof(int32_t) + 4);
    if (!q->prompt || !q->stop || !q->stop_len || !q->stop_ids) {
        sched_req_free(q);
        return UC_ERRF(UC_ERR_NOMEM, "request");
    }
    memcpy(q->prompt, r->prompt, (size_t)r->n_prompt * sizeof(int32_t));
    q->n_prompt = r->n_prompt;
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t n = r->stop_len ? r->stop_len[i] : strlen(r->stop[i]);
        q->stop[i] = uc_malloc(n + 1);
        if (!q->stop[i]) {
            sched_req_free(q);
            return UC_ERRF(UC_ERR_NOMEM, "request");
        }
        memcpy(q->stop[i], r->stop[i], n);
        q->stop[i][n] = '\0';
        q->stop_len[i] = n;
        q->n_stop++;
        q->max_stop_len = n > q->max_stop_len ? n : q->max_stop_len;
    }
    if (r->n_stop_ids > 0) {
        memcpy(q->stop_ids, r->stop_ids, (size_t)r->n_stop_ids * sizeof(int32_t));
    }
    q->n_stop_ids = r->n_stop_ids;
    q->sp = r->sampling;
    q->max_tokens = max_tokens;
    q->min_tokens = r->min_tokens;
    q->logprobs = r->logprobs;
    q->ignore_eos = r->ignore_eos;
    q->deadline_ms = r->deadline_ms;
    q->sink = sink;
    q->user = user;
    q->pending = -1;
    q->prompt_logprobs = r->prompt_logprobs;
    q->t_submit = uc_time_s();
    if (n_choices > 1 && sched_fork_make_kids(s, q, n_choices) != UC_OK) {
        sched_req_free(q);
        return UC_ERRF(UC_ERR_NOMEM, "request");
    }
    pthread_mutex_lock(&s->mu);
    q->cp = merge_compress(&s->dflt, r);
    rc = uc_compress_params_validate(&q->cp, s->cfg->n_layers, msg, msg_size);
    if (rc == UC_OK && (s->draining || s->stop)) {
        snprintf(msg, msg_size, "the server is draining and admits no new requests");
        rc = UC_ERR_UNAVAILABLE;
    }
    if (rc == UC_OK && (s->n_waiting >= s->p.max_queued_requests ||
                        s->waiting_tokens + r->n_prompt > s->p.max_queued_tokens)) {
        snprintf(msg, msg_size, "the request queue is full (%d requests, %lld prompt tokens "
                 "waiting)", s->n_waiting, (long long)s->waiting_tokens);
        rc = UC_ERR_KV_FULL;
    }
    if (rc == UC_OK) {
        if (r->request_id[0]) {
            if (find_live(s, r->request_id)) {
                snprintf(msg, msg_size, "request_id=%s is already in use", r->request_id);
                rc = UC_ERR_INVALID_ARG;
            }
            snprintf(q->id, sizeof q->id, "%s", r->request_id);
        } else {
            snprintf(q->id, sizeof q->id, "req-%lld", (long long)++s->next_id);
        }
    }
    if (rc == UC_OK && !sched_push_ptr(&s->live, &s->n_live, &s->cap_live, q)) {
        rc = UC_ERRF(UC_ERR_NOMEM, "request table");
    }
    for (int32_t i = 0; rc == UC_OK && i < q->n_kids; i++) { /* the other choices share the id */
        q->kids[i]->cp = q->cp;
        snprintf(q->kids[i]->id, sizeof q->kids[i]->id, "%s", q->id);
        if (!sched_push_ptr(&s->live, &s->n_live, &s->cap_live, q->kids[i])) {
            for (int32_t k = 0; k <= i; k++) {
                sched_drop_ptr(s->live, &s->n_live, k < i ? q->kids[k] : q);
            }
            rc = UC_ERRF(UC_ERR_NOMEM, "request table");
        }
    }
    if (rc != UC_OK) {
        pthread_mutex_unlock(&s->mu);
        if (s->metrics) {
            metrics_request_rejected(s->metrics);
        }
        for (int32_t i = 0; i < q->n_kids; i++) {
            sched_req_free(q->kids[i]);
        }
        sched_req_free(q);
        return rc;
    }
    if (s->wait_tail) {
        s->wait_tail->next = q;
    } else {
        s->wait_head = q;
    }
    s->wait_tail = q;
    s->n_waiting++;
    s->waiting_tokens += q->n_prompt;
    if (id_out) {
        snprintf(id_out, UC_REQUEST_ID_MAX, "%s", q->id);
    }
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    for (int32_t i = 0; s->metrics && i < n_choices; i++) {
        metrics_request_submitted(s->metrics); /* each choice counts as a request (and DONE) */
    }
    return UC_OK;
}

bool uc_sched_abort(struct uc_sched *s, const char *request_id, uc_status why)
{
    pthread_mutex_lock(&s->mu);
    bool found = false;
    for (int64_t i = 0; i < s->n_live; i++) { /* every choice of the request */
        struct req *q = s->live[i];
        if (strcmp(q->id, request_id) == 0) {
            found = true;
            if (!q->abort_req) {
                q->abort_req = true;
                q->abort_status = why;
                pthread_cond_signal(&s->cv);
            }
        }
    }
    pthread_mutex_unlock(&s->mu);
    return found;
}

/* ---- events ----------------------------------------------------------------------------- */

/* Length of the longest prefix of b[0..n) that ends on a UTF-8 character boundary (an
 * incomplete trailing sequence is held back unless `final`). */
static size_t utf8_boundary(const unsigned char *b, size_t n, bool final)
{
    if (final || n == 0) {
        return n;
    }
    size_t i = n, back = 0;
    while (i > 0 && back < 4) {
        unsigned char c = b[i - 1];
        back++;
        i--;
        if ((c & 0xC0) != 0x80) { /* a lead byte or ASCII */
            size_t need = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
            return back >= need ? n : i;
        }
    }
    return n;
}

/* Appends b[0..n) as valid UTF-8 (invalid sequences become U+FFFD). */
static void utf8_sanitize(struct uc_buf *out, const unsigned char *b, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = b[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        bool ok = len > 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++) {
            ok = (b[i + k] & 0xC0) == 0x80;
        }
        if (ok && len == 2) {
            ok = c >= 0xC2;
        } else if (ok && len == 3) {
            unsigned cp = ((c & 0x0Fu) << 12) | ((b[i + 1] & 0x3Fu) << 6) | (b[i + 2] & 0x3Fu);
            ok = cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF);
        } else if (ok && len == 4) {
            unsigned cp = ((c & 0x07u) << 18) | ((b[i + 1] & 0x3Fu) << 12) |
                          ((b[i + 2] & 0x3Fu) << 6) | (b[i + 3] & 0x3Fu);
            ok = cp >= 0x10000 && cp <= 0x10FFFF;
        }
        if (ok) {
            uc_buf_append(out, b + i, len);
            i += len;
        } else {
            uc_buf_append(out, "\xEF\xBF\xBD", 3);
            i++;
        }
    }
}

static double ms_between(double a, double b) { return a > 0 && b > 0 ? (b - a) * 1e3 : 0.0; }

/* The length of `matched`, one of q's stop strings (they may hold NUL bytes). */
static size_t stop_len_of(const struct req *q, const char *matched)
{
    for (int32_t i = 0; i < q->n_stop; i++) {
        if (q->stop[i] == matched) {
            return q->stop_len[i];
        }
    }
    return strlen(matched);
}

static void emit_done(struct uc_sched *s, struct req *q, uc_status status, const char *message,
                      enum uc_finish_reason finish, const char *matched)
{
    double now = uc_time_s();
    struct uc_compress_report rep;
    bool have_rep = q->in_engine && uc_engine_seq_report(s->e, q->seq_id, &rep) == UC_OK;
    struct uc_gen_event ev = {
        .kind = UC_EVENT_DONE,
        .request_id = q->id,
        .index = q->choice,
        .status = status,
        .message = message ? message : "",
        .finish = finish,
        .matched_stop = matched ? matched : "",
        .matched_stop_len = matched ? stop_len_of(q, matched) : 0,
        .prompt_tokens = q->n_prompt,
        .completion_tokens = q->n_gen,
        .report = have_rep ? &rep : NULL,
        .compress = q->cp,
    };
    ev.timing.queue_ms = ms_between(q->t_submit, q->t_admit > 0 ? q->t_admit : now);
    ev.timing.ttft_ms = ms_between(q->t_submit, q->t_first);
    ev.timing.prefill_ms = ms_between(q->t_admit, q->t_prefill_done);
    ev.timing.decode_ms = ms_between(q->t_prefill_done, q->t_last);
    ev.timing.total_ms = ms_between(q->t_submit, now);
    q->sink(q->user, &ev);
    if (s->metrics) {
        bool aborted = finish == UC_FINISH_ABORTED;
        metrics_request_finished(s->metrics, uc_policy_name(q->cp.policy), status == UC_OK,
                                 aborted, q->n_prompt, q->n_gen,
                                 have_rep ? rep.kv_tokens_full : 0,
                                 have_rep ? rep.kv_tokens_kept : 0,
                                 have_rep && rep.n_stages > 1
                                     ? q->n_prompt - rep.stage_rows[rep.n_stages - 1]
                                     : 0,
                                 have_rep ? rep.compress_ms / 1e3 : 0.0);
        metrics_observe(s->metrics, METRIC_E2E, now - q->t_submit);
        if (q->t_admit > 0) {
            metrics_observe(s->metrics, METRIC_QUEUE, q->t_admit - q->t_submit);
        }
    }
}

/* Sends the text that is safe to send: complete UTF-8, and (unless final) not the tail that
 * could still grow into a stop string. */
static void emit_tokens(struct uc_sched *s, struct req *q, const int32_t *ids, int32_t n_ids,
                        const struct uc_token_logprob *lp, bool final)
{
    size_t end = q->bytes.len;
    if (!final && q->max_stop_len > 1) {
        size_t hold = q->max_stop_len - 1;
        end = end > hold ? end - hold : 0;
    }
    if (end < q->emitted) {
        end = q->emitted;
    }
    /* no text yet (a first token without bytes): no pointer arithmetic on NULL */
    const unsigned char *from = (const unsigned char *)"";
    if (q->bytes.data) {
        from = (const unsigned char *)q->bytes.data + q->emitted;
    }
    size_t n = utf8_boundary(from, end - q->emitted, final);
    struct uc_buf text;
    uc_buf_init(&text);
    utf8_sanitize(&text, from, n);
    q->emitted += n;
    if (n_ids == 0 && text.len == 0) {
        uc_buf_fini(&text);
        return;
    }
    struct uc_gen_event ev = {
        .kind = UC_EVENT_TOKENS,
        .request_id = q->id,
        .index = q->choice,
        .ids = ids,
        .n_ids = n_ids,
        .text = text.data ? text.data : "",
        .text_len = text.len,
        .logprobs = lp,
    };
    q->sink(q->user, &ev);
    uc_buf_fini(&text);
}

/* ---- the engine thread ------------------------------------------------------------------ */

void sched_publish(struct uc_sched *s)
{
    int64_t used_blocks = uc_engine_kv_blocks_used(s->e);
    int64_t shared_blocks = uc_engine_kv_blocks_shared(s->e);
    pthread_mutex_lock(&s->mu);
    s->n_active_pub = (int32_t)s->n_active;
    s->reserved_pub = s->reserved_blocks;
    s->kv_used_pub = used_blocks;
    s->kv_shared_pub = shared_blocks;
    pthread_mutex_unlock(&s->mu);
    if (s->metrics) {
        double used = (double)uc_engine_kv_blocks_used(s->e);
        double total = (double)uc_engine_kv_blocks_total(s->e);
        metrics_set_gauges(s->metrics, (int32_t)s->n_active, s->n_waiting,
                           total > 0 ? used / total : 0.0);
    }
}

bool sched_queue_free(struct uc_sched *s, int64_t seq_id)
{
    if (s->n_frees == s->cap_frees) {
        int64_t c = s->cap_frees ? s->cap_frees * 2 : 16;
        int64_t *f = uc_realloc(s->frees, (size_t)c * sizeof *f);
        if (!f) {
            return false;
        }
        s->frees = f;
        s->cap_frees = c;
    }
    s->frees[s->n_frees++] = seq_id;
    return true;
}

void sched_wait_unlink_locked(struct uc_sched *s, struct req *q)
{
    struct req **pp = &s->wait_head, *prev = NULL;
    while (*pp && *pp != q) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp) {
        *pp = q->next;
        if (s->wait_tail == q) {
            s->wait_tail = prev;
        }
        s->n_waiting--;
        s->waiting_tokens -= q->n_prompt;
        q->next = NULL;
    }
}

void sched_prefill_release(struct uc_sched *s, struct req *q)
{
    s->pf_bytes_used -= q->pf_bytes;
    q->pf_bytes = 0;
}

void sched_finish(struct uc_sched *s, struct req *q, uc_status status, const char *message,
                   enum uc_finish_reason fr, const char *matched)
{
    if (q->st == REQ_DONE) {
        return;
    }
    sched_fork_on_finish(s, q, status, message, fr);
    if (status == UC_OK && fr != UC_FINISH_ABORTED) {
        emit_tokens(s, q, NULL, 0, NULL, true);
    }
    /* not live any more before the client can see DONE: its id may be reused at once */
    pthread_mutex_lock(&s->mu);
    sched_drop_ptr(s->live, &s->n_live, q);
    if (s->draining && status == UC_OK && fr != UC_FINISH_ABORTED) {
        s->drain_finished++;
    }
    pthread_mutex_unlock(&s->mu);
    emit_done(s, q, status, message, fr, matched);
    if (q->st == REQ_PREFILL || q->st == REQ_DECODE) {
        sched_drop_ptr(s->active, &s->n_active, q);
        s->reserved_blocks -= q->kv_blocks;
        sched_prefill_release(s, q);
    }
    sched_fork_release_share(s, q);
    if (q->in_engine && !sched_queue_free(s, q->seq_id)) {
        UC_FATAL("scheduler: cannot queue the free of sequence %lld", (long long)q->seq_id);
    }
    q->st = REQ_DONE;
    pthread_mutex_lock(&s->mu);
    pthread_cond_broadcast(&s->done_cv);
    pthread_mutex_unlock(&s->mu);
    sched_req_free(q);
}

static bool is_stop_id(const struct req *q, int32_t t)
{
    for (int32_t i = 0; i < q->n_stop_ids; i++) {
        if (q->stop_ids[i] == t) {
            return true;
        }
    }
    return false;
}

/* Finds the earliest stop string in the newly added bytes; returns its index or -1. */
static int32_t find_stop(struct req *q, size_t *at)
{
    if (q->n_stop == 0) {
        return -1;
    }
    size_t from = q->checked > q->max_stop_len ? q->checked - q->max_stop_len : 0;
    int32_t best = -1;
    size_t best_at = SIZE_MAX;
    for (int32_t i = 0; i < q->n_stop; i++) {
        const char *hit = memmem(q->bytes.data + from, q->bytes.len - from, q->stop[i],
                                 q->stop_len[i]);
        if (hit && (size_t)(hit - q->bytes.data) < best_at) {
            best_at = (size_t)(hit - q->bytes.data);
            best = i;
        }
    }
    q->checked = q->bytes.len;
    *at = best_at;
    return best;
}

/* Whether the next token is simply the argmax (no penalties, bans or logprobs): the engine can
 * then pick it on the device and skip bringing the logits over. */
bool sched_plain_greedy(const struct req *q)
{
    return q->sp.temperature == 0.0f && q->sp.repetition_penalty == 1.0f &&
           q->sp.frequency_penalty == 0.0f && q->sp.presence_penalty == 0.0f &&
           q->logprobs == 0 && q->n_gen >= q->min_tokens;
}

/* Whether a row of logits is all finite (one pass over V floats, cheap next to the step). */
static bool logits_finite(const float *lg, int64_t n)
{
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        acc += lg[i] * 0.0f; /* NaN if any value is NaN or Inf */
    }
    return acc == 0.0f;
}

/* Samples the next token from the sequence's logits and applies every stop rule. */
void sched_advance(struct uc_sched *s, struct req *q)
{
    int64_t rows;
    const float *lg = uc_engine_seq_logits(s->e, q->seq_id, &rows);
    double now = uc_time_s();
    int32_t greedy_tok = -1;
    if (!lg && !uc_engine_seq_greedy(s->e, q->seq_id, &greedy_tok)) {
        sched_finish(s, q, UC_ERR_INTERNAL, "no logits after the step", UC_FINISH_ERROR, NULL);
        return;
    }
    if (lg) {
        lg += (rows - 1) * s->cfg->vocab;
    }
    if (lg ? !logits_finite(lg, s->cfg->vocab) : greedy_tok < 0 || greedy_tok >= s->cfg->vocab) {
        /* where: the first layer with non-finite cached K/V (a step of its own, every rank) */
        int64_t layer = -1;
        char where[160] = "an unknown layer (the diagnosis failed)", msg[256];
        if (uc_engine_diagnose_nonfinite(s->e, q->seq_id, &layer) == UC_OK) {
            uc_engine_nonfinite_origin(s->e, layer, where, sizeof where);
        }
        const char *w = uc_engine_nonfinite_weights(s->e);
        UC_LOG_ERROR("sched: request %s: non-finite logits; non-finite activations arose in %s; "
                     "%s%s", q->id, where, w ? "the first non-finite weight is in " : "",
                     w ? w : "every weight of this rank is finite (an activation overflowed)");
        snprintf(msg, sizeof msg, "the model produced non-finite logits (NaN or Inf): "
                 "non-finite activations arose in %s", where);
        sched_finish(s, q, UC_ERR_INTERNAL, msg, UC_FINISH_ERROR, NULL);
        return;
    }
    if (q->n_gen < q->min_tokens) {
        for (int i = 0; i < s->cfg->n_eos && !q->ignore_eos; i++) {
            uc_sampler_ban_once(q->sampler, s->cfg->eos_ids[i]);
        }
        for (int32_t i = 0; i < q->n_stop_ids && i < 4; i++) {
            uc_sampler_ban_once(q->sampler, q->stop_ids[i]);
        }
    }
    float lp = 0;
    int32_t tok = lg ? uc_sampler_sample(q->sampler, lg, &lp) : greedy_tok;
    int32_t top_ids[20];
    float top_lp[20];
    struct uc_token_logprob tl = {.token_id = tok, .logprob = lp};
    if (q->logprobs > 0 && lg) {
        uc_sampler_top_logprobs(q->sampler, lg, q->logprobs, top_ids, top_lp);
        tl.n_top = q->logprobs;
        tl.top_ids = top_ids;
        tl.top_logprobs = top_lp;
    }
    q->n_gen++;
    if (q->t_first == 0) {
        q->t_first = now;
        if (s->metrics) {
            metrics_observe(s->metrics, METRIC_TTFT, now - q->t_submit);
        }
    } else if (s->metrics) {
        metrics_observe(s->metrics, METRIC_ITL, now - q->t_last);
    }
    q->t_last = now;
    bool eos = !q->ignore_eos && uc_model_config_is_eos(s->cfg, tok);
    bool special = uc_tokenizer_is_special(s->tok, tok);
    if (!special && !eos) {
        char tb[256];
        size_t need = uc_tokenizer_token_bytes(s->tok, tok, false, tb, sizeof tb);
        if (need <= sizeof tb) {
            uc_buf_append(&q->bytes, tb, need);
        } else {
            char *big = uc_malloc(need);
            if (big) {
                uc_tokenizer_token_bytes(s->tok, tok, false, big, need);
                uc_buf_append(&q->bytes, big, need);
                uc_free(big);
            }
        }
    }
    size_t at = 0;
    int32_t si = find_stop(q, &at);
    if (si >= 0) {
        q->bytes.len = at;
        q->bytes.data[at] = '\0';
        if (q->emitted > at) {
            q->emitted = at;
        }
    }
    emit_tokens(s, q, &tok, 1, q->logprobs > 0 ? &tl : NULL, false);
    if (si >= 0) {
        sched_finish(s, q, UC_OK, NULL, UC_FINISH_STOP, q->stop[si]);
    } else if (eos || is_stop_id(q, tok)) {
        sched_finish(s, q, UC_OK, NULL, UC_FINISH_STOP, NULL);
    } else if (q->n_gen >= q->max_tokens ||
               uc_engine_seq_len(s->e, q->seq_id) + 1 > uc_engine_max_ctx(s->e)) {
        sched_finish(s, q, UC_OK, NULL, UC_FINISH_LENGTH, NULL);
    } else {
        q->pending = tok;
    }
}

/* Handles aborts and deadlines of live requests. */
void sched_reap(struct uc_sched *s)
{
    int64_t now_ms = uc_time_ms();
    for (;;) {
        struct req *victim = NULL;
        uc_status why = UC_OK;
        pthread_mutex_lock(&s->mu);
        for (int64_t i = 0; i < s->n_live && !victim; i++) {
            struct req *q = s->live[i];
            if (q->abort_req) {
                victim = q;
                why = q->abort_status;
            } else if (q->deadline_ms > 0 && now_ms >= q->deadline_ms) {
                victim = q;
                why = UC_ERR_TIMEOUT;
            }
        }
        if (victim && victim->st == REQ_WAITING) {
            sched_wait_unlink_locked(s, victim);
        }
        pthread_mutex_unlock(&s->mu);
        if (!victim) {
            return;
        }
        const char *msg = why == UC_ERR_TIMEOUT     ? "the request's deadline passed"
                          : why == UC_ERR_CANCELLED ? "the client cancelled the request"
                          : why == UC_ERR_UNAVAILABLE ? "the server is shutting down"
                                                      : "aborted";
        sched_finish(s, victim, why, msg, UC_FINISH_ABORTED, NULL);
    }
}

/* Whether this thread is the engine thread handing out a step's results (uc_sched_batching). */
static _Thread_local bool in_results;

bool uc_sched_batching(void) { return in_results; }

void sched_set_batching(bool on) { in_results = on; }

void uc_sched_set_round_hook(struct uc_sched *s, void (*fn)(void *user), void *user)
{
    pthread_mutex_lock(&s->hook_mu);
    s->round_hook = fn;
    s->round_hook_user = fn ? user : NULL;
    pthread_mutex_unlock(&s->hook_mu);
}

uc_status uc_sched_run(struct uc_sched *s)
{
    int64_t last_beat = uc_time_ms();
    bool multi = uc_comm_size(uc_engine_comm(s->e)) > 1;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        bool stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop) {
            break;
        }
        bool work = sched_round(s);
        pthread_mutex_lock(&s->hook_mu);
        if (s->round_hook) {
            s->round_hook(s->round_hook_user);
        }
        pthread_mutex_unlock(&s->hook_mu);
        if (work) {
            last_beat = uc_time_ms();
            continue;
        }
        /* idle: sleep until woken or the next heartbeat (or a deadline check) */
        pthread_mutex_lock(&s->mu);
        if (!s->stop && !s->ctl && s->n_waiting == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            int64_t wait_ms = s->p.heartbeat_ms < 100 ? s->p.heartbeat_ms : 100;
            ts.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
            ts.tv_sec += wait_ms / 1000 + ts.tv_nsec / 1000000000L;
            ts.tv_nsec %= 1000000000L;
            pthread_cond_timedwait(&s->cv, &s->mu, &ts);
        }
        pthread_mutex_unlock(&s->mu);
        if (multi && uc_time_ms() - last_beat >= s->p.heartbeat_ms) {
            if (uc_engine_heartbeat(s->e) != UC_OK) {
                return UC_ERRF(UC_ERR_MPI, "heartbeat failed");
            }
            last_beat = uc_time_ms();
        }
    }
    /* stopping: a calibration and everything still live end with UNAVAILABLE */
    sched_calib_abort(s, UC_ERR_UNAVAILABLE, "the server is shutting down");
    for (;;) {
        pthread_mutex_lock(&s->mu);
        struct req *q = s->n_live > 0 ? s->live[0] : NULL;
        if (q && q->st == REQ_WAITING) {
            sched_wait_unlink_locked(s, q);
        }
        pthread_mutex_unlock(&s->mu);
        if (!q) {
            break;
        }
        sched_finish(s, q, UC_ERR_UNAVAILABLE, "the server is shutting down", UC_FINISH_ABORTED, NULL);
    }
    sched_publish(s);
    return uc_engine_shutdown(s->e);
}

void uc_sched_stop(struct uc_sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    s->draining = true;
    pthread_cond_broadcast(&s->cv);
    pthread_cond_broadcast(&s->done_cv);
    pthread_mutex_unlock(&s->mu);
}

bool uc_sched_draining(struct uc_sched *s)
{
    pthread_mutex_lock(&s->mu);
    bool d = s->draining;
    pthread_mutex_unlock(&s->mu);
    return d;
}

void uc_sched_drain(struct uc_sched *s, int64_t timeout_ms, int32_t *finished, int32_t *aborted)
{
    pthread_mutex_lock(&s->mu);
    if (!s->draining) {
        s->drain_finished = 0; /* a second, concurrent drain reports the same count */
    }
    s->draining = true;
    int64_t deadline = uc_time_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    while (s->n_live > 0 && !s->stop && uc_time_ms() < deadline) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 20L * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&s->done_cv, &s->mu, &ts);
    }
    int32_t cut = 0;
    for (int64_t i = 0; i < s->n_live; i++) {
        if (!s->live[i]->abort_req) {
            s->live[i]->abort_req = true;
            s->live[i]->abort_status = UC_ERR_UNAVAILABLE;
            cut++;
        }
    }
    pthread_cond_signal(&s->cv);
    while (s->n_live > 0 && !s->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 20L * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&s->done_cv, &s->mu, &ts);
    }
    if (finished) {
        *finished = (int32_t)s->drain_finished;
    }
    if (aborted) {
        *aborted = cut;
    }
    pthread_mutex_unlock(&s->mu);
}

/* ---- configuration and snapshots -------------------------------------------------------- */

void uc_sched_get_default_compress(struct uc_sched *s, struct uc_compress_params *out)
{
    pthread_mutex_lock(&s->mu);
    *out = s->dflt;
    pthread_mutex_unlock(&s->mu);
}

uc_status uc_sched_set_default_compress(struct uc_sched *s, const struct uc_compress_params *p,
                                        char *msg, size_t msg_size)
{
    uc_status rc = uc_compress_params_validate(p, s->cfg->n_layers, msg, msg_size);
    if (rc != UC_OK) {
        return rc;
    }
    pthread_mutex_lock(&s->mu);
    s->dflt = *p;
    pthread_mutex_unlock(&s->mu);
    UC_LOG_NOTICE("sched: default compression policy=%s kv_budget=%d decode_mode=%s grouping=%s",
                  uc_policy_name(p->policy), p->kv_budget, uc_decode_mode_name(p->decode_mode),
                  uc_grouping_name(p->grouping));
    return UC_OK;
}

void uc_sched_counts(struct uc_sched *s, struct uc_sched_counts *out)
{
    pthread_mutex_lock(&s->mu);
    out->running = s->n_active_pub;
    out->queued = s->n_waiting;
    out->queued_tokens = s->waiting_tokens;
    out->kv_blocks_reserved = s->reserved_pub;
    out->kv_blocks_used = s->kv_used_pub;
    out->kv_blocks_shared = s->kv_shared_pub;
    pthread_mutex_unlock(&s->mu);
    out->kv_blocks_total = uc_engine_kv_blocks_total(s->e); /* fixed after start-up */
}

struct uc_engine *uc_sched_engine(struct uc_sched *s) { return s->e; }
int32_t uc_sched_max_n(const struct uc_sched *s)
{
    return UC_SCHED_MAX_N < s->p.max_running ? UC_SCHED_MAX_N : s->p.max_running;
}
const struct uc_tokenizer *uc_sched_tokenizer(struct uc_sched *s) { return s->tok; }

char *uc_sched_profile_json(struct uc_sched *s)
{
    pthread_mutex_lock(&s->mu);
    char *j = s->profile_json ? uc_strdup(s->profile_json) : NULL;
    pthread_mutex_unlock(&s->mu);
    return j;
}

uc_status uc_sched_create(struct uc_sched **out, const struct uc_sched_params *p,
                          struct uc_engine *engine, const struct uc_tokenizer *tok,
                          struct metrics *metrics)
{
    *out = NULL;
    struct uc_sched *s = uc_calloc(1, sizeof *s);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "scheduler");
    }
    s->p = *p;
    s->e = engine;
    s->tok = tok;
    s->metrics = metrics;
    s->cfg = uc_engine_config(engine);
    s->dflt = p->default_compress;
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->hook_mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->done_cv, NULL);
    s->profile_json = sched_profile_json_of(engine);
    if (p->step_trace_path) {
        s->trace = fopen(p->step_trace_path, "w");
        if (!s->trace) {
            uc_status rc = UC_ERRF(UC_ERR_IO, "--step-trace %s: %s", p->step_trace_path,
                                   strerror(errno));
            uc_sched_destroy(s);
            return rc;
        }
        s->trace_t0 = uc_time_s();
    }
    /* the default policy needs a profile and none exists: build it now, in the background */
    s->calib.want_default = !uc_engine_profile(engine) &&
                            uc_policy_uses_entropy(s->dflt.policy) &&
                            s->dflt.grouping == UC_GROUPING_PROFILE;
    *out = s;
    return UC_OK;
}

void uc_sched_destroy(struct uc_sched *s)
{
    if (!s) {
        return;
    }
    for (int64_t i = 0; i < s->n_live; i++) {
        sched_req_free(s->live[i]);
    }
    uc_free(s->live);
    uc_free(s->active);
    uc_free(s->frees);
    uc_free(s->step_dec);
    uc_free(s->step_req);
    uc_free(s->step_pf);
    uc_free(s->step_pf_req);
    uc_free(s->calib.ids);
    uc_free(s->profile_json);
    if (s->trace) {
        fclose(s->trace);
    }
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->hook_mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->done_cv);
    uc_free(s);
}
