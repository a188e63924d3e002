/* Calibration as a background job: the text's windows are prefilled one after another as
 * ordinary prefill work of the steps (they share the step's budget with the requests, so no
 * stream stalls), the engine sums their entropies, and a last step builds, installs and saves
 * the profile on every rank. One job at a time: an Admin.Calibrate call queues its text, and a
 * request that needs a profile when none exists starts one on the default text and waits in the
 * queue for it. */
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "sched_internal.h"

#define CALIB_MAX_WINDOWS 1024

char *sched_profile_json_of(struct uc_engine *e)
{
    const struct uc_profile *p = uc_engine_profile(e);
    return p ? uc_profile_to_json(p) : NULL;
}

/* Ends the job: answers its caller, remembers how it ended. */
static void job_end(struct uc_sched *s, uc_status rc, const char *msg)
{
    struct calib_job *j = &s->calib;
    if (rc == UC_OK) {
        char *js = sched_profile_json_of(s->e);
        pthread_mutex_lock(&s->mu);
        uc_free(s->profile_json);
        s->profile_json = js;
        pthread_mutex_unlock(&s->mu);
    } else {
        UC_LOG_WARN("sched: calibration failed: %s", msg);
    }
    j->last_rc = rc;
    snprintf(j->last_msg, sizeof j->last_msg, "%s", msg ? msg : "");
    uc_free(j->ids);
    j->ids = NULL;
    j->active = false;
    if (j->ctl) {
        pthread_mutex_lock(&s->mu);
        j->ctl->rc = rc;
        snprintf(j->ctl->msg, sizeof j->ctl->msg, "%s", msg ? msg : "");
        j->ctl->done = true;
        pthread_cond_broadcast(&s->done_cv);
        pthread_mutex_unlock(&s->mu);
        j->ctl = NULL;
    }
}

/* Reads and tokenizes the job's text (the call's, or the default file), and zeroes the
 * engine's sums. */
static uc_status job_start(struct uc_sched *s, struct ctl *c, char *msg, size_t msg_size)
{
    struct calib_job *j = &s->calib;
    char *owned = NULL;
    const char *text = c ? c->text : NULL;
    char path[4096];
    snprintf(j->source, sizeof j->source, "request text");
    if (!text) {
        if (s->p.calib_text_path && s->p.calib_text_path[0]) {
            snprintf(path, sizeof path, "%s", s->p.calib_text_path);
        } else {
            snprintf(path, sizeof path, "%s/calibration.txt", uc_engine_model_dir(s->e));
            if (!uc_file_exists(path) && s->p.calib_fallback_path) {
                snprintf(path, sizeof path, "%s", s->p.calib_fallback_path);
            }
        }
        if (uc_file_read_all(&owned, NULL, path) != UC_OK) {
            snprintf(msg, msg_size, "calibration text %.200s cannot be read", path);
            return UC_ERR_INVALID_ARG;
        }
        text = owned;
        /* the model's own calibration text is named as such, so the profile does not carry a
         * machine-specific path */
        size_t dl = strlen(uc_engine_model_dir(s->e));
        snprintf(j->source, sizeof j->source, "%.255s",
                 strncmp(path, uc_engine_model_dir(s->e), dl) == 0 && path[dl] == '/'
                     ? path + dl + 1
                     : path);
    }
    /* the call may ask less than the server's limits, never more (uc_sched_calibrate refuses
     * more; the default job uses the limits themselves) */
    int64_t w = c && c->window > 0 ? c->window : s->p.calib_window_tokens;
    int64_t max_w = c && c->max_windows > 0 ? c->max_windows : s->p.calib_max_windows;
    w = w < s->p.calib_window_tokens ? w : s->p.calib_window_tokens;
    max_w = max_w < s->p.calib_max_windows ? max_w : s->p.calib_max_windows;
    max_w = max_w < CALIB_MAX_WINDOWS ? max_w : CALIB_MAX_WINDOWS;
    int64_t ctx = uc_engine_max_ctx(s->e);
    w = w < ctx ? w : ctx;
    int32_t bos = uc_tokenizer_bos(s->tok);
    j->body = w - (bos >= 0 ? 1 : 0);
    /* only the text the windows can use is tokenized (a token is rarely over 32 bytes) */
    size_t len = strlen(text), use = (size_t)(j->body > 0 ? j->body : 0) * (size_t)max_w * 32;
    len = len < use ? len : use;
    while (len > 0 && len < strlen(text) && ((unsigned char)text[len] & 0xC0) == 0x80) {
        len--; /* not in the middle of a character */
    }
    uc_status rc = uc_tokenizer_encode(s->tok, text, len, false, &j->ids, &j->n_ids);
    uc_free(owned);
    if (rc != UC_OK) {
        snprintf(msg, msg_size, "calibration text cannot be tokenized: %s", uc_status_str(rc));
        return UC_ERR_INVALID_ARG;
    }
    if (j->n_ids < 16 || j->body < 16) {
        snprintf(msg, msg_size, "calibration text too short (%lld tokens)", (long long)j->n_ids);
        return UC_ERR_INVALID_ARG;
    }
    j->off = 0;
    j->windows = 0;
    j->max_windows = max_w;
    struct uc_step reset = {.op = UC_STEP_PROFILE_RESET};
    rc = uc_engine_step(s->e, &reset);
    if (rc != UC_OK) {
        snprintf(msg, msg_size, "calibration failed: %s", uc_status_str(rc));
    }
    return rc;
}

/* The job's next window as a prefill-only sequence (j->win), if the KV pool can hold it now
 * (else j->win stays NULL and the job tries again next round). */
static uc_status window_start(struct uc_sched *s, struct uc_step_new *nw, char *msg,
                              size_t msg_size)
{
    struct calib_job *j = &s->calib;
    int32_t bos = uc_tokenizer_bos(s->tok);
    int64_t take = j->n_ids - j->off < j->body ? j->n_ids - j->off : j->body;
    struct req *q = uc_calloc(1, sizeof *q);
    if (!q || !(q->prompt = uc_malloc((size_t)(take + 1) * sizeof(int32_t)))) {
        uc_free(q);
        snprintf(msg, msg_size, "calibration: out of memory");
        return UC_ERR_NOMEM;
    }
    uc_buf_init(&q->bytes);
    if (bos >= 0) {
        q->prompt[q->n_prompt++] = bos;
    }
    memcpy(q->prompt + q->n_prompt, j->ids + j->off, (size_t)take * sizeof(int32_t));
    q->n_prompt += take;
    q->calib = true;
    q->pending = -1;
    q->cp = uc_compress_default_params();
    q->cp.policy = UC_POLICY_FULL;
    snprintf(q->id, sizeof q->id, "calibration-%lld", (long long)j->windows);
    *nw = (struct uc_step_new){.seq_id = s->next_seq + 1, .flags = UC_SEQ_CALIBRATE,
                               .max_new_tokens = 0, .cp = q->cp, .n_prompt = q->n_prompt,
                               .prompt = q->prompt};
    int64_t need = uc_engine_kv_blocks_needed(s->e, nw), total = uc_engine_kv_blocks_total(s->e);
    if (need > total) {
        sched_req_free(q);
        snprintf(msg, msg_size, "calibration: a window of %lld tokens needs %lld KV blocks, the "
                 "pool has %lld", (long long)q->n_prompt, (long long)need, (long long)total);
        return UC_ERR_KV_FULL;
    }
    if (s->reserved_blocks + need > total ||
        !sched_push_ptr(&s->active, &s->n_active, &s->cap_active, q)) {
        sched_req_free(q); /* the pool is busy: try again next round */
        return UC_OK;
    }
    q->seq_id = ++s->next_seq;
    q->kv_blocks = need;
    s->reserved_blocks += need;
    q->st = REQ_PREFILL;
    j->off += take;
    j->win = q;
    return UC_OK;
}

/* The first (at most 4) windows of w tokens (at most the context) of the job's text for the searches after the
 * entropy profile: each starts with BOS (when the model has one) and holds the text's next
 * tokens. Returns them (uc_malloc'd, *nw windows) or NULL, with a WARN naming `what`. */
static int32_t *search_windows(struct uc_sched *s, int64_t w, int64_t *nw, const char *what)
{
    struct calib_job *j = &s->calib;
    int32_t bos = uc_tokenizer_bos(s->tok);
    int64_t body = w - (bos >= 0 ? 1 : 0), n = body > 0 ? j->n_ids / body : 0;
    n = n < 4 ? n : 4;
    *nw = n;
    if (n < 1) {
        UC_LOG_WARN("sched: %s: the calibration text has %lld tokens, a window needs %lld", what,
                    (long long)j->n_ids, (long long)body);
        return NULL;
    }
    int32_t *ids = uc_malloc((size_t)(n * w) * sizeof(int32_t));
    if (!ids) {
        UC_LOG_WARN("sched: %s: out of memory", what);
        return NULL;
    }
    for (int64_t i = 0; i < n; i++) {
        int32_t *win = ids + i * w;
        if (bos >= 0) {
            *win++ = bos;
        }
        memcpy(win, j->ids + i * body, (size_t)body * sizeof(int32_t));
    }
    return ids;
}

/* KVSharer's layer pairs, searched on the calibration text once the entropy profile is in (its
 * windows run as steps of their own: the requests wait the few seconds it takes). Without room
 * in the KV pool, or on failure, the profile keeps no pairs and kvsharer requests are refused
 * until the next calibration; the entropy profile stands either way. */
static void kvsharer_search(struct uc_sched *s)
{
    if (uc_kvsharer_target(&s->p.kvsharer, uc_engine_config(s->e)->n_layers) == 0) {
        return;
    }
    int64_t w = s->p.kvsharer_window, ctx = uc_engine_max_ctx(s->e), nw = 0;
    w = w < ctx ? w : ctx;
    int32_t *ids = search_windows(s, w, &nw, "kvsharer");
    if (!ids) {
        return;
    }
    struct uc_kvsharer_result res;
    uc_status rc = uc_engine_kvsharer_calibrate(s->e, ids, nw * w, w, &s->p.kvsharer, &res);
    uc_free(ids);
    if (rc != UC_OK) {
        UC_LOG_WARN("sched: kvsharer search failed (%s); the profile has no layer pairs",
                    rc == UC_ERR_KV_FULL ? "the KV pool is busy" : uc_status_str(rc));
    }
}

/* MiniCache's merge set, measured on the calibration text once the entropy profile is in (as
 * KVSharer's search: windows as steps of their own). Without room in the KV pool, or on
 * failure, the profile keeps no pairs and minicache requests merge the paper's pairs from
 * L / 2 until the next calibration. */
static void minicache_search(struct uc_sched *s)
{
    if (s->p.minicache_pairs < 0) {
        return;
    }
    int64_t w = s->p.minicache_window, ctx = uc_engine_max_ctx(s->e), nw = 0;
    w = w < ctx ? w : ctx;
    int32_t *ids = search_windows(s, w, &nw, "minicache");
    if (!ids) {
        return;
    }
    uc_status rc = uc_engine_minicache_calibrate(s->e, ids, nw * w, w, s->p.minicache_pairs);
    uc_free(ids);
    if (rc != UC_OK) {
        UC_LOG_WARN("sched: minicache calibration failed (%s); minicache requests merge the "
                    "paper's pairs from L / 2",
                    rc == UC_ERR_KV_FULL ? "the KV pool is busy" : uc_status_str(rc));
    }
}

static void job_cancel(struct uc_sched *s, uc_status rc, const char *msg);
static void fail_queued(struct uc_sched *s, uc_status rc, const char *msg);

void sched_calib_tick(struct uc_sched *s, struct uc_step_new *news, int32_t *n_new,
                      int32_t max_new)
{
    struct calib_job *j = &s->calib;
    char msg[256] = "";
    pthread_mutex_lock(&s->mu);
    bool draining = s->draining, queued = s->ctl != NULL;
    pthread_mutex_unlock(&s->mu);
    if (draining && ((j->active && j->ctl) || queued)) {
        /* a drain does not wait for an Admin.Calibrate: it ends (the old profile stays). The
         * default job, which queued requests wait for, goes on until the drain timeout. */
        if (j->active && j->ctl) {
            job_cancel(s, UC_ERR_UNAVAILABLE, "the server is draining");
        }
        fail_queued(s, UC_ERR_UNAVAILABLE, "the server is draining");
        return;
    }
    if (j->active && j->ctl && j->ctl->cancel && atomic_load(j->ctl->cancel)) {
        job_cancel(s, UC_ERR_CANCELLED, "the client went away");
        return;
    }
    if (!j->active) {
        pthread_mutex_lock(&s->mu);
        struct ctl *c = s->ctl;
        s->ctl = NULL;
        pthread_mutex_unlock(&s->mu);
        if (!c && !j->want_default) {
            return;
        }
        if (c && c->cancel && atomic_load(c->cancel)) {
            pthread_mutex_lock(&s->mu);
            c->rc = UC_ERR_CANCELLED;
            snprintf(c->msg, sizeof c->msg, "the client went away");
            c->done = true;
            pthread_cond_broadcast(&s->done_cv);
            pthread_mutex_unlock(&s->mu);
            return;
        }
        j->want_default = false;
        j->ctl = c;
        j->active = true;
        UC_LOG_NOTICE("sched: calibrating (%s)", c ? "Admin.Calibrate" : "no profile yet");
        uc_status rc = job_start(s, c, msg, sizeof msg);
        if (rc != UC_OK) {
            job_end(s, rc, msg);
            return;
        }
    }
    if (j->win || *n_new >= max_new) {
        return;
    }
    bool more = j->windows < j->max_windows && j->off < j->n_ids &&
                (j->windows == 0 || j->n_ids - j->off >= 16);
    if (!more) {
        struct uc_step fin = {.op = UC_STEP_PROFILE_FINISH, .profile_groups = s->dflt.head_groups,
                              .profile_eps = 1.0};
        snprintf(fin.profile_source, sizeof fin.profile_source, "%.255s", j->source);
        uc_status rc = uc_engine_step(s->e, &fin);
        snprintf(msg, sizeof msg, "%s", rc == UC_OK ? "" : uc_status_str(rc));
        if (rc == UC_OK) {
            kvsharer_search(s);
            minicache_search(s);
        }
        job_end(s, rc, msg);
        return;
    }
    uc_status rc = window_start(s, &news[*n_new], msg, sizeof msg);
    if (rc != UC_OK) {
        job_end(s, rc, msg);
    } else if (j->win) {
        j->win->in_engine = true;
        (*n_new)++;
    }
}

void sched_calib_window_done(struct uc_sched *s, struct req *q)
{
    struct calib_job *j = &s->calib;
    if (!sched_queue_free(s, q->seq_id)) {
        UC_FATAL("scheduler: cannot queue the free of sequence %lld", (long long)q->seq_id);
    }
    sched_drop_ptr(s->active, &s->n_active, q);
    s->reserved_blocks -= q->kv_blocks;
    sched_req_free(q);
    j->win = NULL;
    j->windows++;
}

/* Ends the running job early (its window's sequence freed next step). */
static void job_cancel(struct uc_sched *s, uc_status rc, const char *msg)
{
    struct calib_job *j = &s->calib;
    if (j->win) {
        struct req *q = j->win;
        sched_prefill_release(s, q);
        if (q->in_engine && !sched_queue_free(s, q->seq_id)) {
            UC_FATAL("scheduler: cannot queue the free of sequence %lld", (long long)q->seq_id);
        }
        sched_drop_ptr(s->active, &s->n_active, q);
        s->reserved_blocks -= q->kv_blocks;
        sched_req_free(q);
        j->win = NULL;
    }
    if (j->active) {
        UC_LOG_NOTICE("sched: calibration stopped after %lld windows: %s", (long long)j->windows,
                      msg);
        job_end(s, rc, msg);
    }
}

/* Answers the Calibrate call waiting for the engine thread, if any, with rc. */
static void fail_queued(struct uc_sched *s, uc_status rc, const char *msg)
{
    pthread_mutex_lock(&s->mu);
    struct ctl *c = s->ctl;
    s->ctl = NULL;
    if (c) {
        c->rc = rc;
        snprintf(c->msg, sizeof c->msg, "%s", msg);
        c->done = true;
        pthread_cond_broadcast(&s->done_cv);
    }
    pthread_mutex_unlock(&s->mu);
}

void sched_calib_abort(struct uc_sched *s, uc_status rc, const char *msg)
{
    job_cancel(s, rc, msg);
    fail_queued(s, rc, msg);
}

static bool ctl_cancelled(const struct ctl *c)
{
    return c->cancel && atomic_load(c->cancel);
}

uc_status uc_sched_calibrate(struct uc_sched *s, const char *text, int32_t window_tokens,
                             int32_t max_windows, const atomic_bool *cancel, char *msg,
                             size_t msg_size)
{
    /* the server's limits: a call may ask less, not more */
    if (window_tokens < 0 || window_tokens > s->p.calib_window_tokens) {
        snprintf(msg, msg_size, "window_tokens=%d exceeds the server's limit %d (calib-window)",
                 window_tokens, s->p.calib_window_tokens);
        return UC_ERR_INVALID_ARG;
    }
    if (max_windows < 0 || max_windows > s->p.calib_max_windows) {
        snprintf(msg, msg_size, "max_windows=%d exceeds the server's limit %d (calib-windows)",
                 max_windows, s->p.calib_max_windows);
        return UC_ERR_INVALID_ARG;
    }
    size_t text_bytes = text ? strlen(text) : 0;
    if (text_bytes > s->p.calib_max_text_bytes) {
        snprintf(msg, msg_size, "text of %zu bytes exceeds the server's limit %zu "
                 "(calib-max-text-bytes)", text_bytes, s->p.calib_max_text_bytes);
        return UC_ERR_INVALID_ARG;
    }
    struct ctl c = {.text = text, .window = window_tokens, .max_windows = max_windows,
                    .cancel = cancel};
    pthread_mutex_lock(&s->mu);
    while (s->ctl && !s->stop && !s->draining && !ctl_cancelled(&c)) { /* one at a time */
        pthread_cond_wait(&s->done_cv, &s->mu);
    }
    if (s->stop || s->draining) {
        bool stopping = s->stop;
        pthread_mutex_unlock(&s->mu);
        snprintf(msg, msg_size, "the server is %s", stopping ? "shutting down" : "draining");
        return UC_ERR_UNAVAILABLE;
    }
    if (ctl_cancelled(&c)) {
        pthread_mutex_unlock(&s->mu);
        snprintf(msg, msg_size, "the client went away");
        return UC_ERR_CANCELLED;
    }
    s->ctl = &c;
    pthread_cond_signal(&s->cv);
    while (!c.done) {
        pthread_cond_wait(&s->done_cv, &s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    snprintf(msg, msg_size, "%s", c.msg);
    return c.rc;
}

void uc_sched_calibrate_wake(struct uc_sched *s)
{
    pthread_mutex_lock(&s->mu);
    pthread_cond_broadcast(&s->cv);
    pthread_cond_broadcast(&s->done_cv);
    pthread_mutex_unlock(&s->mu);
}
