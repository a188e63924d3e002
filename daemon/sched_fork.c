/* n > 1 and prompt logprobs: the parts of the scheduler that a request's choices and echo need,
 * kept apart from the step building of sched_step.c (which calls the hooks below).
 *
 * n > 1: uc_sched_submit makes choice 0 (the request that is queued, admitted and prefilled like
 * any other) and n-1 choices waiting beside it (REQ_FORKWAIT, in q->kids, live for abort by
 * the shared id). When choice 0's prefill ends it does not sample yet: the next step carries
 * n-1 UC_SEQ_FORK sequences (the engine gives each choice 0's plan and last logits, and a cache
 * that shares choice 0's full KV blocks, copy-on-write, with a copy of each head's partly
 * filled last block), and after that step choice 0 and its forks sample their first tokens,
 * each with its own sampler (seed + i with a seed) and stop state. From then on each choice is
 * an ordinary decoding request. The prompt is prefilled and compressed once, and the pool holds
 * one copy of it.
 *
 * KV reservation: admission reserves choice 0's worst case plus, for each other choice, what a
 * fork holds beside the shared blocks (uc_engine_kv_fork_blocks_needed: a block per head and
 * its decode; all of a choice's worst case with decode_mode=evict, which may copy the shared
 * blocks). At the fork each fork takes its part, and choice 0's part moves to a share
 * (struct kv_share) that the last of the choices to end releases: the shared blocks stay in
 * the pool while any fork holds them, even after choice 0 ended.
 *
 * Prompt logprobs: the request's sequence keeps every prompt row's logits (UC_SEQ_ALL_LOGITS);
 * at the end of its prefill one UC_EVENT_PROMPT event carries each prompt token's logprob under
 * the previous position's distribution (NaN for the first token) and `logprobs` alternatives. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "sched_internal.h"

/* A copy of q's request for choice i (stops, limits, sampling with seed + i). */
static struct req *kid_of(const struct req *q, int32_t i)
{
    struct req *k = uc_calloc(1, sizeof *k);
    if (!k) {
        return NULL;
    }
    uc_buf_init(&k->bytes);
    k->stop = uc_calloc((size_t)q->n_stop + 1, sizeof(char *));
    k->stop_len = uc_calloc((size_t)q->n_stop + 1, sizeof(size_t));
    k->stop_ids = uc_malloc((size_t)q->n_stop_ids * sizeof(int32_t) + 4);
    if (!k->stop || !k->stop_len || !k->stop_ids) {
        sched_req_free(k);
        return NULL;
    }
    for (int32_t j = 0; j < q->n_stop; j++) {
        k->stop[j] = uc_malloc(q->stop_len[j] + 1);
        if (!k->stop[j]) {
            sched_req_free(k);
            return NULL;
        }
        memcpy(k->stop[j], q->stop[j], q->stop_len[j] + 1);
        k->stop_len[j] = q->stop_len[j];
        k->n_stop++;
    }
    k->max_stop_len = q->max_stop_len;
    memcpy(k->stop_ids, q->stop_ids, (size_t)q->n_stop_ids * sizeof(int32_t));
    k->n_stop_ids = q->n_stop_ids;
    k->n_prompt = q->n_prompt; /* the prompt itself stays with choice 0 */
    k->sp = q->sp;
    if (k->sp.has_seed) {
        k->sp.seed += (uint64_t)i;
    }
    k->max_tokens = q->max_tokens;
    k->min_tokens = q->min_tokens;
    k->logprobs = q->logprobs;
    k->ignore_eos = q->ignore_eos;
    k->deadline_ms = q->deadline_ms;
    k->sink = q->sink;
    k->user = q->user;
    k->pending = -1;
    k->t_submit = q->t_submit;
    k->choice = i;
    k->st = REQ_FORKWAIT;
    return k;
}

uc_status sched_fork_make_kids(struct uc_sched *s, struct req *q, int32_t n)
{
    (void)s;
    q->kids = uc_calloc((size_t)n, sizeof *q->kids);
    q->share = uc_calloc(1, sizeof *q->share);
    if (!q->kids || !q->share) {
        return UC_ERR_NOMEM; /* sched_req_free(q) frees both */
    }
    q->share->refs = 1;
    for (int32_t i = 1; i < n; i++) {
        struct req *k = kid_of(q, i);
        if (!k) {
            for (int32_t j = 0; j < q->n_kids; j++) {
                sched_req_free(q->kids[j]);
            }
            q->n_kids = 0;
            return UC_ERR_NOMEM;
        }
        k->parent = q;
        q->kids[q->n_kids++] = k;
    }
    return UC_OK;
}

int64_t sched_fork_reserve(struct req *q, int64_t need, int64_t fork_need)
{
    q->kv_one = fork_need;
    return need + fork_need * q->n_kids;
}

void sched_fork_release_share(struct uc_sched *s, struct req *q)
{
    /* sched_req_free drops the pointer right after: refs == 1 is the last holder */
    if (q->share && q->share->active && q->share->refs == 1) {
        s->reserved_blocks -= q->share->blocks;
        q->share->blocks = 0;
        q->share->active = false;
    }
}

int64_t sched_fork_slots(const struct uc_sched *s)
{
    int64_t n = s->n_active;
    for (int64_t i = 0; i < s->n_active; i++) {
        n += s->active[i]->n_kids;
    }
    return n;
}

/* The log-softmax of row `lg` at token t. */
static float logprob_of(const float *lg, int64_t vocab, int32_t t)
{
    float mx = lg[0];
    for (int64_t v = 1; v < vocab; v++) {
        mx = lg[v] > mx ? lg[v] : mx;
    }
    double sum = 0;
    for (int64_t v = 0; v < vocab; v++) {
        sum += exp((double)(lg[v] - mx));
    }
    return (float)((double)(lg[t] - mx) - log(sum));
}

/* UC_EVENT_PROMPT for q; false when it failed (q is then finished). */
static bool prompt_logprobs(struct uc_sched *s, struct req *q)
{
    int64_t rows = 0, vocab = s->cfg->vocab;
    const float *lg = uc_engine_seq_logits(s->e, q->seq_id, &rows);
    if (!lg || rows != q->n_prompt) {
        sched_finish(s, q, UC_ERR_INVALID_ARG,
                     "prompt logprobs need the logits of every prompt position, and this "
                     "request's compression dropped prompt rows during prefill (use a policy "
                     "without prefill stages)", UC_FINISH_ERROR, NULL);
        return false;
    }
    int32_t top = q->logprobs;
    struct uc_token_logprob *lp = uc_calloc((size_t)q->n_prompt, sizeof *lp);
    int32_t *ids = uc_malloc((size_t)(q->n_prompt * top + 1) * sizeof *ids);
    float *lps = uc_malloc((size_t)(q->n_prompt * top + 1) * sizeof *lps);
    if (!lp || !ids || !lps) {
        uc_free(lp);
        uc_free(ids);
        uc_free(lps);
        sched_finish(s, q, UC_ERR_NOMEM, "out of memory (prompt logprobs)", UC_FINISH_ERROR,
                     NULL);
        return false;
    }
    for (int64_t i = 0; i < q->n_prompt; i++) {
        lp[i].token_id = q->prompt[i];
        if (i == 0) {
            lp[i].logprob = NAN; /* nothing predicts the first token */
            continue;
        }
        const float *row = lg + (i - 1) * vocab;
        lp[i].logprob = logprob_of(row, vocab, q->prompt[i]);
        if (top > 0) {
            lp[i].n_top = top;
            lp[i].top_ids = ids + i * top;
            lp[i].top_logprobs = lps + i * top;
            uc_sampler_top_logprobs(q->sampler, row, top, ids + i * top, lps + i * top);
        }
    }
    struct uc_gen_event ev = {
        .kind = UC_EVENT_PROMPT,
        .request_id = q->id,
        .index = 0,
        .ids = q->prompt,
        .n_ids = (int32_t)q->n_prompt,
        .text = "",
        .logprobs = lp,
    };
    q->sink(q->user, &ev);
    uc_free(lp);
    uc_free(ids);
    uc_free(lps);
    return true;
}

bool sched_fork_prefill_done(struct uc_sched *s, struct req *q)
{
    if (q->prompt_logprobs && !prompt_logprobs(s, q)) {
        return true;
    }
    if (q->n_kids > 0) {
        q->fork_state = 1; /* its forks go into the next step; it samples after it */
        return true;
    }
    return false;
}

void sched_fork_tick(struct uc_sched *s, struct uc_step_new *news, int32_t *n_new,
                     int32_t max_new)
{
    for (int64_t i = 0; i < s->n_active; i++) {
        struct req *q = s->active[i];
        if (q->fork_state != 1 || *n_new + q->n_kids > max_new) {
            continue;
        }
        q->fork_state = 2;
        struct req **kids = q->kids;
        int32_t n = q->n_kids;
        q->kids = NULL;
        q->n_kids = 0;
        for (int32_t j = 0; j < n; j++) {
            struct req *k = kids[j];
            k->parent = NULL;
            /* its part of the reservation moves from choice 0 to the fork */
            q->kv_blocks -= q->kv_one;
            k->kv_blocks = q->kv_one;
            k->t_admit = q->t_admit;
            k->t_prefill_done = q->t_prefill_done;
            if (uc_sampler_create(&k->sampler, &k->sp, s->cfg->vocab, q->prompt, q->n_prompt,
                                  0x5eed0000ULL + s->seed_counter++) != UC_OK ||
                !sched_push_ptr(&s->active, &s->n_active, &s->cap_active, k)) {
                s->reserved_blocks -= k->kv_blocks;
                k->kv_blocks = 0;
                sched_finish(s, k, UC_ERR_NOMEM, "out of memory", UC_FINISH_ERROR, NULL);
                continue;
            }
            k->seq_id = ++s->next_seq;
            k->st = REQ_DECODE;
            k->forked_now = true;
            if (q->share) { /* it holds choice 0's blocks from now on */
                if (!q->share->active) {
                    q->share->active = true;
                    q->share->blocks = q->kv_blocks;
                    q->kv_blocks = 0;
                }
                k->share = q->share;
                k->share->refs++;
            }
            news[(*n_new)++] = (struct uc_step_new){.seq_id = k->seq_id, .flags = UC_SEQ_FORK,
                                                    .max_new_tokens = k->max_tokens,
                                                    .cp = q->cp, .fork_of = q->seq_id};
        }
        uc_free(kids);
    }
}

void sched_fork_after_step(struct uc_sched *s)
{
    /* sampling may end requests (and drop them from active): pick first, then advance */
    int64_t n = 0;
    for (int64_t i = 0; i < s->n_active; i++) {
        n += s->active[i]->fork_state == 2 || s->active[i]->forked_now;
    }
    if (n == 0) {
        return;
    }
    struct req **v = uc_malloc((size_t)n * sizeof *v);
    if (!v) {
        UC_FATAL("scheduler: out of memory after a fork step");
    }
    int64_t k = 0;
    for (int64_t i = 0; i < s->n_active; i++) {
        struct req *q = s->active[i];
        if (q->fork_state == 2 || q->forked_now) {
            q->fork_state = 0;
            q->forked_now = false;
            v[k++] = q;
        }
    }
    for (int64_t i = 0; i < k; i++) {
        sched_advance(s, v[i]);
    }
    uc_free(v);
}

void sched_fork_on_finish(struct uc_sched *s, struct req *q, uc_status status,
                          const char *message, enum uc_finish_reason fr)
{
    if (q->parent) { /* a choice that was never forked */
        struct req *p = q->parent;
        for (int32_t i = 0; i < p->n_kids; i++) {
            if (p->kids[i] == q) {
                memmove(p->kids + i, p->kids + i + 1, (size_t)(p->n_kids - i - 1) * sizeof *p->kids);
                break;
            }
        }
        p->n_kids--;
        if (p->kv_one > 0 && (p->st == REQ_PREFILL || p->st == REQ_DECODE)) {
            p->kv_blocks -= p->kv_one; /* its share of choice 0's reservation */
            s->reserved_blocks -= p->kv_one;
        }
        q->parent = NULL;
        return;
    }
    if (q->n_kids == 0) {
        return;
    }
    /* choice 0 ends before its forks exist: so do they, the same way */
    struct req **kids = q->kids;
    int32_t n = q->n_kids;
    q->kids = NULL;
    q->n_kids = 0;
    for (int32_t i = 0; i < n; i++) {
        kids[i]->parent = NULL;
    }
    if (status == UC_OK && fr != UC_FINISH_ABORTED) {
        status = UC_ERR_INTERNAL;
        message = "choice 0 ended before the other choices were forked";
        fr = UC_FINISH_ERROR;
    }
    for (int32_t i = 0; i < n; i++) {
        sched_finish(s, kids[i], status, message, fr, NULL);
    }
    uc_free(kids);
}
