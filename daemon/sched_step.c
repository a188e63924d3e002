/* One scheduling round: admission, the prefill budget of the step, one engine step carrying every
 * decode row and every prompt slice that got budget (the engine runs it as one sweep over the
 * layers), then sampling for the sequences the step advanced.
 *
 * The rules (README, "Scheduling"):
 * - Admission is first come, first served. The head of the queue enters when fewer than
 *   max_running sequences are active and the KV pool can reserve its worst case (its
 *   post-compression footprint plus max_tokens of decode); otherwise it and everything behind it
 *   wait. A running sequence therefore never runs out of KV memory and nothing is preempted; a
 *   request that could not fit even in an empty pool fails at once with RESOURCE_EXHAUSTED.
 * - A step gives prefill_step_tokens row-layers of prefill (4x when nothing decodes): first to
 *   the prompts whose whole remaining prefill fits in a quarter of it, shortest first, so a short
 *   prompt never waits for a long one; then to the rest, oldest first.
 * - A prompt starts its prefill (its buffers are allocated) only while the prefill buffers of the
 *   prompts already started fit prefill_memory; one prompt may always start.
 * - A calibration window gets a thin slice of a step, and none in a step where a request's prompt
 *   gets budget; a prompt whose buffers do not fit beside a window already started waits for
 *   that window to end.
 * - What a step carries (schedule): `mixed` puts the decode rows of every running sequence in
 *   every step, beside whatever prefill got budget. `prefill-first` (vLLM V0's and SGLang's
 *   default) gives a step no decode rows while a request's prompt (not a calibration window)
 *   gets prefill budget in it: such a step has the no-decode budget and may carry several
 *   prompts; when no request's prompt can prefill, the step decodes every running sequence. So
 *   decodes stall while prompts prefill (under a closed-loop load: waves, one long inter-token
 *   gap per stream per wave) and prompts prefill at the engine's full rate (one after another,
 *   so a wave's TTFT grows: 3.7 s against 0.35 s at 64 x 8K on an H200).
 *   Calibration windows never stop the decodes (background work, as under mixed). With
 *   max_decode_wait_ms, a step is mixed once a decoding sequence has waited longer than that
 *   since its last token. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "metrics.h"
#include "sched_internal.h"

static int64_t prefill_memory(const struct uc_sched *s)
{
    if (s->p.prefill_memory > 0) {
        return s->p.prefill_memory;
    }
    /* a quarter of the KV pool */
    return uc_engine_kv_blocks_total(s->e) * uc_engine_kv_block_tokens(s->e) *
           (int64_t)uc_engine_kv_bytes_per_token(s->e) / 4;
}

/* The step that would start q's sequence, and the KV blocks admission reserves for it (0 when
 * the engine refuses it: *rc says why, in msg). */
static int64_t admit_need(struct uc_sched *s, struct req *q, struct uc_step_new *n,
                          uc_status *rc, char *msg, size_t msg_size)
{
    *n = (struct uc_step_new){.seq_id = s->next_seq + 1, .flags = 0,
                              .max_new_tokens = q->max_tokens, .cp = q->cp,
                              .n_prompt = q->n_prompt, .prompt = q->prompt};
    if (q->prompt_logprobs) {
        n->flags |= UC_SEQ_ALL_LOGITS;
    }
    *rc = uc_engine_check_new(s->e, n, msg, msg_size);
    if (*rc != UC_OK) {
        return 0;
    }
    int64_t fork_need = q->n_kids > 0 ? uc_engine_kv_fork_blocks_needed(s->e, n) : 0;
    return sched_fork_reserve(q, uc_engine_kv_blocks_needed(s->e, n), fork_need);
}

/* Whether the queue's head (if any) waits for room that only a running request's end frees:
 * sequences (--max-running) or KV blocks. */
static bool queue_blocked(struct uc_sched *s)
{
    pthread_mutex_lock(&s->mu);
    struct req *q = s->wait_head;
    pthread_mutex_unlock(&s->mu);
    if (!q) {
        return true;
    }
    if (s->n_active >= s->p.max_running ||
        sched_fork_slots(s) + 1 + q->n_kids > s->p.max_running) {
        return true;
    }
    struct uc_step_new n;
    uc_status rc;
    char msg[256];
    int64_t need = admit_need(s, q, &n, &rc, msg, sizeof msg);
    int64_t total = uc_engine_kv_blocks_total(s->e);
    return rc == UC_OK && need <= total && s->reserved_blocks + need > total;
}

/* Moves waiting requests into the engine while max_running and the KV pool allow. Returns
 * whether what is left waits for room only a running request's end frees (queue_blocked). */
static bool admit(struct uc_sched *s, struct uc_step_new *news, int32_t *n_new, int32_t max_new)
{
    int64_t total = uc_engine_kv_blocks_total(s->e);
    while (*n_new < max_new && s->n_active < s->p.max_running) {
        pthread_mutex_lock(&s->mu);
        struct req *q = s->wait_head;
        pthread_mutex_unlock(&s->mu);
        if (!q) {
            return true;
        }
        if (sched_fork_slots(s) + 1 + q->n_kids > s->p.max_running) {
            return true; /* room for every choice (n > 1), and for the forks already promised */
        }
        struct uc_step_new n;
        char msg[256];
        uc_status rc;
        int64_t need = admit_need(s, q, &n, &rc, msg, sizeof msg);
        if (rc == UC_ERR_UNAVAILABLE && !uc_engine_profile(s->e)) {
            /* it needs a calibration profile: wait for one (built in the background), unless
             * the last calibration failed */
            if (s->calib.active || s->calib.want_default || s->calib.last_rc == UC_OK) {
                if (!s->calib.active) {
                    s->calib.want_default = true;
                }
                return false;
            }
            snprintf(msg, sizeof msg, "no calibration profile: %.200s", s->calib.last_msg);
        }
        if (rc == UC_OK && need > total) {
            snprintf(msg, sizeof msg, "KV memory cannot admit the request: it needs %lld blocks, "
                     "the pool has %lld", (long long)need, (long long)total);
            rc = UC_ERR_KV_FULL;
        }
        if (rc == UC_OK && s->reserved_blocks + need > total) {
            return true; /* wait for running requests to free memory */
        }
        pthread_mutex_lock(&s->mu);
        sched_wait_unlink_locked(s, q); /* the head: only this thread takes from the queue */
        pthread_mutex_unlock(&s->mu);
        if (rc != UC_OK) {
            sched_finish(s, q, rc, msg, UC_FINISH_ERROR, NULL);
            continue;
        }
        rc = uc_sampler_create(&q->sampler, &q->sp, s->cfg->vocab, q->prompt, q->n_prompt,
                               0x5eed0000ULL + s->seed_counter++);
        if (rc != UC_OK || !sched_push_ptr(&s->active, &s->n_active, &s->cap_active, q)) {
            sched_finish(s, q, UC_ERR_NOMEM, "out of memory", UC_FINISH_ERROR, NULL);
            continue;
        }
        q->seq_id = ++s->next_seq;
        q->kv_blocks = need;
        s->reserved_blocks += need;
        q->st = REQ_PREFILL;
        q->t_admit = uc_time_s();
        news[(*n_new)++] = n;
    }
    return s->n_active >= s->p.max_running; /* else the step took max_new of them */
}

/* Whether q's prefill may go on in this step: it has started, or its buffers fit beside those of
 * the prompts already started (or none has started). Its buffer bytes go to *bytes when it has
 * not started. */
static bool prefill_fits(const struct uc_sched *s, const struct req *q, int64_t *bytes)
{
    *bytes = 0;
    if (q->pf_given > 0) {
        return true;
    }
    *bytes = uc_engine_prefill_bytes(s->e, &q->cp, q->n_prompt);
    return s->pf_bytes_used == 0 || s->pf_bytes_used + *bytes <= prefill_memory(s);
}

/* Whether a request's prompt (not a calibration window) gets prefill budget in this step.
 * plan_prefills gives budget to the first such prompt that fits (the budget is whole until a
 * prompt gets some, and calibration windows sort last), so this is exactly its rule. */
static bool request_prefill_due(const struct uc_sched *s)
{
    for (int64_t i = 0; i < s->n_active; i++) {
        const struct req *q = s->active[i];
        int64_t bytes;
        if (q->st == REQ_PREFILL && !q->calib && prefill_fits(s, q, &bytes)) {
            return true;
        }
    }
    return false;
}

/* Whether a decoding sequence has waited more than max_decode_wait_ms since its last token. */
static bool decode_overdue(const struct uc_sched *s)
{
    if (s->p.max_decode_wait_ms <= 0) {
        return false;
    }
    double now = uc_time_s();
    for (int64_t i = 0; i < s->n_active; i++) {
        const struct req *q = s->active[i];
        if (q->st == REQ_DECODE && q->pending >= 0 && q->t_last > 0 &&
            (now - q->t_last) * 1e3 > (double)s->p.max_decode_wait_ms) {
            return true;
        }
    }
    return false;
}

/* Prefill work a prompt still needs, in row-layers (an upper bound: stages cut rows). */
static int64_t prefill_left(const struct uc_sched *s, const struct req *q)
{
    int64_t left = q->n_prompt * s->cfg->n_layers - q->pf_given;
    return left > 0 ? left : q->n_prompt; /* stages made it shorter than counted: a layer more */
}

struct pf_candidate {
    struct req *q;
    int64_t left;
    int64_t order; /* admission order */
    bool small;
};

static int cmp_candidate(const void *a, const void *b)
{
    const struct pf_candidate *x = a, *y = b;
    if (x->small != y->small) {
        return x->small ? -1 : 1;
    }
    if (x->small && x->left != y->left) {
        return x->left < y->left ? -1 : 1;
    }
    return x->order < y->order ? -1 : x->order > y->order;
}

static bool ensure_step_lists(struct uc_sched *s, int64_t n)
{
    if (n <= s->cap_step && n <= s->cap_pf) {
        return true;
    }
    int64_t cap = n * 2;
    struct uc_step_decode *d = uc_realloc(s->step_dec, (size_t)cap * sizeof *d);
    if (d) {
        s->step_dec = d;
    }
    struct req **r = uc_realloc(s->step_req, (size_t)cap * sizeof *r);
    if (r) {
        s->step_req = r;
    }
    struct uc_step_prefill *p = uc_realloc(s->step_pf, (size_t)cap * sizeof *p);
    if (p) {
        s->step_pf = p;
    }
    struct req **pr = uc_realloc(s->step_pf_req, (size_t)cap * sizeof *pr);
    if (pr) {
        s->step_pf_req = pr;
    }
    if (!d || !r || !p || !pr) {
        return false;
    }
    s->cap_step = s->cap_pf = cap;
    return true;
}

/* Row-layers of calibration prefill per step: a thirty-second of the step budget, fewer deep
 * into a long window's layer (uc_engine_background_rows: a 4096-token window's steps cost what
 * a 1024-token window's do; the engine also ends its layers in parts, one per step). */
static int64_t calib_slice(const struct uc_sched *s, const struct req *q)
{
    int64_t v = s->p.prefill_step_tokens / 32;
    return uc_engine_background_rows(s->e, q->seq_id, v > 1 ? v : 1);
}

/* The step's prefills: the budget shared by the rules above; req_prefill: whether a request's
 * prompt gets budget in it (request_prefill_due). Returns how many. */
static int32_t plan_prefills(struct uc_sched *s, int32_t n_dec, bool req_prefill)
{
    int64_t budget = n_dec > 0 ? s->p.prefill_step_tokens : 4 * s->p.prefill_step_tokens;
    struct pf_candidate *c = uc_malloc((size_t)(s->n_active + 1) * sizeof *c);
    if (!c) {
        UC_FATAL("scheduler: out of memory building a step");
    }
    int64_t n = 0;
    for (int64_t i = 0; i < s->n_active; i++) {
        struct req *q = s->active[i];
        if (q->st == REQ_PREFILL) {
            int64_t left = prefill_left(s, q);
            /* calibration windows come after every request */
            c[n++] = (struct pf_candidate){q, left, q->calib ? INT64_MAX : i,
                                           !q->calib && left <= budget / 4};
        }
    }
    qsort(c, (size_t)n, sizeof *c, cmp_candidate);
    int32_t n_pf = 0;
    for (int64_t i = 0; i < n && budget > 0; i++) {
        struct req *q = c[i].q;
        if (q->calib && req_prefill) {
            continue; /* no calibration beside a request's prefill (below) */
        }
        int64_t bytes;
        if (!prefill_fits(s, q, &bytes)) {
            continue; /* its buffers would not fit beside the prompts already started */
        }
        if (q->pf_given == 0) {
            q->pf_bytes = bytes;
            s->pf_bytes_used += bytes;
        }
        int64_t give = c[i].left < budget ? c[i].left : budget;
        if (q->calib) {
            /* a calibration window takes a thin slice of a step, and none beside a request's
             * prefill: a step (which a new request must wait for) stays short, and the
             * request's own prefill step carries no calibration */
            int64_t slice = calib_slice(s, q);
            give = give < slice ? give : slice;
        }
        s->step_pf[n_pf] = (struct uc_step_prefill){.seq_id = q->seq_id, .budget_rows = give};
        s->step_pf_req[n_pf++] = q;
        q->pf_given += give;
        budget -= give;
    }
    uc_free(c);
    return n_pf;
}

/* A prompt's prefill ended in this step: it decodes from now on (or was a calibration window). */
static void prefill_done(struct uc_sched *s, struct req *q)
{
    sched_prefill_release(s, q);
    if (q->calib) {
        sched_calib_window_done(s, q);
        return;
    }
    q->st = REQ_DECODE;
    q->t_prefill_done = uc_time_s();
    if (s->metrics) {
        metrics_observe(s->metrics, METRIC_PREFILL, q->t_prefill_done - q->t_admit);
    }
    if (!sched_fork_prefill_done(s, q)) {
        sched_advance(s, q);
    }
}

static enum metric_step step_kind(int32_t n_dec, int32_t n_pf)
{
    return n_pf == 0 ? METRIC_STEP_DECODE : n_dec == 0 ? METRIC_STEP_PREFILL : METRIC_STEP_MIXED;
}

/* --step-trace: one JSON line for a step that ran (times in ms; t from the trace's start; mono
 * the step's start on the monotonic clock, in seconds, as --send-trace and the client's
 * --token-times). */
static void trace_step(struct uc_sched *s, const double t[4], const char *kind, int32_t n_dec,
                       int32_t n_pf, int32_t n_new, int64_t n_free, uc_status rc)
{
    int64_t rows = 0;
    for (int32_t i = 0; i < n_pf; i++) {
        rows += s->step_pf[i].budget_rows;
    }
    double last = s->trace_last_end > 0 ? s->trace_last_end : t[0];
    struct uc_engine_step_info in;
    uc_engine_last_step_info(s->e, &in);
    static const char *const graph[UC_STEP_GRAPH_MODES] = {
        [UC_STEP_GRAPH_NONE] = "none", [UC_STEP_GRAPH_REPLAYED] = "replayed",
        [UC_STEP_GRAPH_RECORDED] = "recorded", [UC_STEP_GRAPH_DIRECT] = "direct"};
    fprintf(s->trace,
            "{\"t\":%.3f,\"kind\":\"%s\",\"decode\":%d,\"prefill\":%d,\"prefill_row_layers\":%lld,"
            "\"new\":%d,\"free\":%lld,\"idle_ms\":%.3f,\"plan_ms\":%.3f,\"engine_ms\":%.3f,"
            "\"after_ms\":%.3f,\"decode_prep_ms\":%.3f,\"blocks_taken\":%lld,\"table_ints\":%lld,"
            "\"graph\":\"%s\",\"lookahead\":%s,\"overlap\":%s,\"free_ms\":%.3f,\"new_ms\":%.3f,"
            "\"ok\":%s,\"mono\":%.6f}\n",
            (t[0] - s->trace_t0) * 1e3, kind, n_dec, n_pf, (long long)rows, n_new,
            (long long)n_free, (t[0] - last) * 1e3, (t[1] - t[0]) * 1e3, (t[2] - t[1]) * 1e3,
            (t[3] - t[2]) * 1e3, in.decode_prep_ms, (long long)in.blocks_taken,
            (long long)in.table_ints, graph[(unsigned)in.graph < UC_STEP_GRAPH_MODES ? in.graph : 0],
            in.lookahead ? "true" : "false", in.overlapped ? "true" : "false", in.free_ms,
            in.new_ms, rc == UC_OK ? "true" : "false",
            t[0]);
    fflush(s->trace);
    s->trace_last_end = t[3];
}

/* Whether the next round will decode the running sequences again and nothing else (unless some
 * end): no request could be admitted (`blocked`: none waits, or the first waits for room a
 * running one frees), none prefills, no choice waits to fork, no calibration runs or waits, and
 * no drain has begun. */
static bool rounds_quiet(struct uc_sched *s, bool blocked)
{
    pthread_mutex_lock(&s->mu);
    bool quiet = blocked && !s->ctl && !s->draining;
    pthread_mutex_unlock(&s->mu);
    for (int64_t i = 0; quiet && i < s->n_active; i++) {
        quiet = s->active[i]->st == REQ_DECODE && s->active[i]->fork_state != 1;
    }
    return quiet && !s->calib.active && !s->calib.want_default;
}

/* Whether the engine has a decode step in flight for the running sequences (the last step
 * expected this round to decode them again): this round then decodes them alone. What came
 * meanwhile (a request that can be admitted, a calibration) waits that one round: rounds_quiet
 * then says no, so this round launches nothing ahead and the next one takes it in. */
static bool decode_held(struct uc_sched *s)
{
    if (!uc_engine_decode_in_flight(s->e)) {
        return false;
    }
    for (int64_t i = 0; i < s->n_active; i++) {
        if (s->active[i]->st == REQ_DECODE && s->active[i]->pending >= 0) {
            return true;
        }
    }
    return false; /* none of them goes on: the step ends it */
}

bool sched_round(struct uc_sched *s)
{
    double tt[4] = {s->trace ? uc_time_s() : 0.0, 0, 0, 0};
    sched_reap(s);
    enum { MAX_NEW = 64 };
    struct uc_step_new news[MAX_NEW];
    int32_t n_new = 0;
    bool held = decode_held(s), blocked;
    if (!held) {
        sched_calib_tick(s, news, &n_new, MAX_NEW);
        sched_fork_tick(s, news, &n_new, MAX_NEW);
        blocked = admit(s, news, &n_new, MAX_NEW);
    } else {
        blocked = queue_blocked(s); /* admission waits this round: only ask */
    }
    for (int32_t i = 0; i < n_new; i++) { /* the engine holds them once the step ran */
        for (int64_t k = 0; k < s->n_active; k++) {
            if (s->active[k]->seq_id == news[i].seq_id) {
                s->active[k]->in_engine = true;
            }
        }
    }
    if (!ensure_step_lists(s, s->n_active + 1)) {
        UC_FATAL("scheduler: out of memory building a step");
    }
    /* whether a request's prompt gets budget in this step: not merely whether one is
     * prefilling, since a prompt whose buffers do not fit beside a started calibration window
     * waits for that window to end (skipping the window too stopped both for good);
     * prefill-first then carries no decode rows (unless one waited too long) */
    bool req_prefill = !held && request_prefill_due(s);
    bool prefill_only = s->p.schedule == UC_SCHEDULE_PREFILL_FIRST && req_prefill &&
                        !decode_overdue(s);
    struct uc_step_decode *dec = s->step_dec;
    struct req **decoded = s->step_req;
    int32_t n_dec = 0;
    for (int64_t i = 0; i < s->n_active && !prefill_only; i++) {
        struct req *q = s->active[i];
        if (q->st == REQ_DECODE && q->pending >= 0) {
            dec[n_dec] = (struct uc_step_decode){.seq_id = q->seq_id, .token = q->pending,
                                                 .flags = sched_plain_greedy(q) ? UC_DECODE_GREEDY
                                                                                 : 0};
            decoded[n_dec++] = q;
        }
    }
    int32_t n_pf = held ? 0 : plan_prefills(s, n_dec, req_prefill);
    bool work = n_new > 0 || n_dec > 0 || n_pf > 0 || s->n_frees > 0;
    bool again = n_dec > 0 && n_new == 0 && n_pf == 0 && rounds_quiet(s, blocked);
    for (int32_t i = 0; i < n_dec && again; i++) {
        again = (dec[i].flags & UC_DECODE_GREEDY) != 0;
    }
    uc_status rc = UC_OK;
    int64_t n_free = s->n_frees;
    if (work) {
        struct uc_step st = {.op = UC_STEP_RUN, .n_new = n_new, .news = news,
                             .n_free = (int32_t)s->n_frees, .frees = s->frees,
                             .n_prefill = n_pf, .prefills = s->step_pf, .n_decode = n_dec,
                             .decodes = dec, .decode_again = again};
        tt[1] = s->trace ? uc_time_s() : 0.0;
        rc = uc_engine_step(s->e, &st);
        tt[2] = s->trace ? uc_time_s() : 0.0;
        sched_set_batching(true); /* until the round ends: one wake-up per front (round hook) */
        s->n_frees = 0;
        if (rc != UC_OK) {
            /* a refused step ran nothing: fail what it carried */
            for (int32_t i = 0; i < n_new; i++) {
                for (int64_t k = 0; k < s->n_active; k++) {
                    struct req *q = s->active[k];
                    if (q->seq_id == news[i].seq_id) {
                        q->in_engine = false;
                        if (q->calib) {
                            sched_calib_abort(s, rc, "the engine refused a calibration window");
                        } else {
                            sched_finish(s, q, rc, "the engine refused the request",
                                         UC_FINISH_ERROR, NULL);
                        }
                        break;
                    }
                }
            }
        } else {
            if (s->metrics && (n_dec > 0 || n_pf > 0)) {
                metrics_step(s->metrics, step_kind(n_dec, n_pf));
            }
            for (int32_t i = 0; i < n_dec; i++) {
                decoded[i]->pending = -1;
                sched_advance(s, decoded[i]);
            }
            for (int32_t i = 0; i < n_pf; i++) {
                struct req *q = s->step_pf_req[i];
                if (uc_engine_seq_phase(s->e, q->seq_id) == UC_SEQ_DECODING) {
                    prefill_done(s, q);
                }
            }
        }
        sched_fork_after_step(s);
    }
    sched_publish(s);
    if (s->trace && work) {
        tt[3] = uc_time_s();
        trace_step(s, tt, n_dec + n_pf > 0 ? metrics_step_name(step_kind(n_dec, n_pf)) : "other",
                   n_dec, n_pf, n_new, n_free, rc);
    }
    sched_set_batching(false);
    return work;
}
