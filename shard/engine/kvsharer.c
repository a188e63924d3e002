/* KVSharer in the engine (compress/kvsharer.h): a shared layer holds no KV blocks; its prompt
 * attention reads its source layer's K|V rows (kept from the source's layer end to the end of
 * the prefill), and its decode attention reads the source's block tables (decode.c). Here: those
 * rows, the calibration sums and distances, the search driven from rank 0 through ordinary
 * steps, and the pairs installed in the profile on every rank. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "internal.h"

void eng_share_pairs_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                         const struct uc_share_pair **pairs, int32_t *n)
{
    if (cp->n_share > 0 || !e->have_prof || !e->prof.has_share) {
        *pairs = cp->share;
        *n = cp->n_share;
    } else {
        *pairs = e->prof.share;
        *n = e->prof.n_share;
    }
}

int64_t eng_kvshare_sources(const struct uc_engine *e, const struct uc_compress_params *cp)
{
    const struct uc_share_pair *pairs;
    int32_t n, sources = 0;
    eng_share_pairs_for(e, cp, &pairs, &n);
    for (int32_t i = 0; i < n; i++) {
        bool seen = false;
        for (int32_t j = 0; j < i; j++) {
            seen = seen || pairs[j].src == pairs[i].src;
        }
        sources += !seen;
    }
    return sources;
}

bool eng_layer_is_source(const struct seq *s, int64_t l, int64_t n_layers)
{
    for (int64_t t = l + 1; t < n_layers; t++) {
        if (s->plan.share_src[t] == l) {
            return true;
        }
    }
    return false;
}

uc_status eng_kvshare_layer_end(struct uc_engine *e, struct seq *s)
{
    int64_t l = s->layer, n = s->n_rows, hl = e->sh->n_heads, d = e->cfg->head_dim;
    int64_t w = 2 * e->sh->n_heads_kv * d, ld = e->sh->qkv_dim;
    bool stats = (s->flags & UC_SEQ_KVSHARE_STATS) && !eng_layer_shared(s, l);
    bool source = s->src_kv && eng_layer_is_source(s, l, e->cfg->n_layers);
    if (!stats && !source) {
        return UC_OK;
    }
    void *kv = NULL;
    float *host = NULL;
    const void *k = (const char *)s->qkv + (size_t)(hl * d) * act_size(e);
    uc_status rc;
    UC_CHECK(eng_pf_alloc(e, s, &kv, n * w * (int64_t)act_size(e)), rc, out);
    UC_CHECK(e->be->ops->copy_rows(e->be, kv, w, k, ld, w, n), rc, out);
    if (stats) {
        host = uc_malloc((size_t)(n * w) * sizeof(float));
        if (!host) {
            rc = UC_ERRF(UC_ERR_NOMEM, "kvsharer sums");
            goto out;
        }
        UC_CHECK(e->be->ops->download_f32(e->be, host, kv, n * w), rc, out);
        double *sum = e->ks_sum + l * e->ks_tokens * w;
        for (int64_t i = 0; i < n * w; i++) {
            sum[i] += host[i];
        }
    }
    if (source) {
        s->src_kv[l] = kv; /* eng_free_prefill_buffers frees it */
        kv = NULL;
    }
out:
    eng_pf_free(e, s, &kv);
    uc_free(host);
    return rc;
}

/* Every rank's squared distances between the layers' mean caches over its own KV heads, summed
 * over the ranks (ranks that replicate a KV head count it once each: the same factor for every
 * pair, so the order is the same). */
static uc_status kvshare_dist(struct uc_engine *e)
{
    int64_t L = e->cfg->n_layers, m = e->ks_tokens * 2 * e->sh->n_heads_kv * e->cfg->head_dim;
    if (e->ks_windows == 0 || !e->ks_sum) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kvsharer calibration: no window was run");
    }
    for (int64_t a = 0; a < L; a++) {
        e->ks_dist[a * L + a] = 0.0;
        for (int64_t b = a + 1; b < L; b++) {
            const double *x = e->ks_sum + a * m, *y = e->ks_sum + b * m;
            double s = 0.0;
            for (int64_t i = 0; i < m; i++) {
                double t = (x[i] - y[i]) / (double)e->ks_windows;
                s += t * t;
            }
            e->ks_dist[a * L + b] = e->ks_dist[b * L + a] = s;
        }
    }
    return uc_comm_allreduce_sum(e->comm, e->ks_dist, L * L, UC_COMM_F64);
}

static uc_status kvshare_set(struct uc_engine *e, const struct uc_step *st)
{
    char msg[256];
    if (!e->have_prof) {
        return UC_ERRF(UC_ERR_UNAVAILABLE, "kvsharer calibration: no profile to record the pairs "
                       "in (calibrate the entropy profile first)");
    }
    if (uc_share_pairs_validate(st->ks_pairs, st->ks_n_pairs, e->cfg->n_layers, msg,
                                sizeof msg) != UC_OK) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "%s", msg);
    }
    struct uc_profile *p = &e->prof;
    p->has_share = true;
    p->n_share = st->ks_n_pairs;
    memcpy(p->share, st->ks_pairs, sizeof p->share);
    p->share_threshold = st->ks_threshold;
    p->share_cosine = st->ks_cosine;
    p->share_target = st->ks_target;
    p->share_tokens = e->ks_tokens * e->ks_windows;
    uc_status rc = UC_OK;
    if (uc_comm_rank(e->comm) == 0) {
        rc = uc_profile_save(p, e->profile_path);
        if (rc == UC_OK) {
            UC_LOG_NOTICE("engine: kvsharer pairs=%d cosine=%.4f saved to %s", p->n_share,
                          p->share_cosine, e->profile_path);
        }
    }
    return rc;
}

uc_status eng_kvshare_step(struct uc_engine *e, const struct uc_step *st)
{
    int64_t L = e->cfg->n_layers, w = 2 * e->sh->n_heads_kv * e->cfg->head_dim;
    switch (st->op) {
    case UC_STEP_KVSHARE_RESET:
        if (st->ks_tokens < 1 || st->ks_tokens > e->max_ctx) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "kvsharer calibration: window of %lld tokens",
                           (long long)st->ks_tokens);
        }
        UC_FREE(e->ks_sum);
        UC_FREE(e->ks_dist);
        e->ks_sum = uc_calloc((size_t)(L * st->ks_tokens * w), sizeof(double));
        e->ks_dist = uc_calloc((size_t)(L * L), sizeof(double));
        if (!e->ks_sum || !e->ks_dist) {
            UC_FREE(e->ks_sum);
            UC_FREE(e->ks_dist);
            return UC_ERRF(UC_ERR_NOMEM, "kvsharer sums tokens=%lld", (long long)st->ks_tokens);
        }
        e->ks_tokens = st->ks_tokens;
        e->ks_windows = 0;
        return UC_OK;
    case UC_STEP_KVSHARE_DIST: return kvshare_dist(e);
    case UC_STEP_KVSHARE_SET: {
        uc_status rc = kvshare_set(e, st);
        UC_FREE(e->ks_sum); /* the sums are done with */
        e->ks_tokens = 0;
        return rc;
    }
    default: return UC_ERRF(UC_ERR_FORMAT, "step: op %d is not a kvsharer step", (int)st->op);
    }
}

const double *uc_engine_kvsharer_distances(const struct uc_engine *e) { return e->ks_dist; }

const float *uc_engine_seq_hidden(const struct uc_engine *e, int64_t seq_id, int64_t *n_rows)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    *n_rows = s && s->hidden ? s->hidden_rows : 0;
    return s ? s->hidden : NULL;
}

/* ---- the search, from rank 0 ------------------------------------------------------------- */

#define KS_SEQ0 (-1000)
#define KS_MAX_WINDOWS 16

struct ks_run {
    struct uc_engine *e;
    const int32_t *tokens;
    int64_t window, windows;
    float *base; /* (windows, window, C) the unshared model's last hidden states */
};

/* Prefills every window (one sequence each, in one step), with the given compression params and
 * flags, and hands each window's last hidden states to `base` (copy) or compares them with it. */
static uc_status ks_run_windows(struct ks_run *r, const struct uc_compress_params *cp, int32_t flags,
                            double *cosine)
{
    struct uc_engine *e = r->e;
    int64_t c = e->cfg->hidden, nw = r->windows;
    struct uc_step_new news[KS_MAX_WINDOWS];
    struct uc_step_prefill pf[KS_MAX_WINDOWS];
    int64_t ids[KS_MAX_WINDOWS];
    for (int64_t i = 0; i < nw; i++) {
        ids[i] = KS_SEQ0 - i;
        news[i] = (struct uc_step_new){.seq_id = ids[i], .flags = flags | UC_SEQ_HIDDEN,
                                       .max_new_tokens = 0, .cp = *cp, .n_prompt = r->window,
                                       .prompt = r->tokens + i * r->window};
        pf[i] = (struct uc_step_prefill){.seq_id = ids[i], .budget_rows = 0};
    }
    struct uc_step st = {.op = UC_STEP_RUN, .n_new = (int32_t)nw, .n_prefill = (int32_t)nw,
                         .news = news, .prefills = pf};
    uc_status rc = uc_engine_step(e, &st);
    double sum = 0.0;
    for (int64_t i = 0; rc == UC_OK && i < nw; i++) {
        int64_t rows = 0;
        const float *h = uc_engine_seq_hidden(e, ids[i], &rows);
        if (!h || rows != r->window) {
            rc = UC_ERRF(UC_ERR_INVALID_ARG, "kvsharer calibration: window %lld has no hidden "
                         "states", (long long)i);
        } else if (cosine) {
            sum += uc_cosine_rows_mean(h, r->base + i * r->window * c, rows, c);
        } else {
            memcpy(r->base + i * r->window * c, h, (size_t)(rows * c) * sizeof(float));
        }
    }
    struct uc_step fr = {.op = UC_STEP_RUN, .n_free = (int32_t)nw, .frees = ids};
    uc_status frc = uc_engine_step(e, &fr);
    if (cosine) {
        *cosine = sum / (double)nw;
    }
    return rc != UC_OK ? rc : frc;
}

static uc_status ks_eval(void *user, const struct uc_share_pair *pairs, int32_t n_pairs,
                         double *cosine)
{
    struct ks_run *r = user;
    struct uc_compress_params cp = uc_compress_default_params();
    cp.stages = UC_STAGE_KVSHARER;
    cp.n_share = n_pairs;
    memcpy(cp.share, pairs, (size_t)n_pairs * sizeof *pairs);
    uc_status rc = ks_run_windows(r, &cp, 0, cosine);
    if (rc == UC_OK) {
        UC_LOG_INFO("engine: kvsharer try pairs=%d last=%d->%d cosine=%.5f", n_pairs,
                    pairs[n_pairs - 1].src, pairs[n_pairs - 1].dst, *cosine);
    }
    return rc;
}

uc_status uc_engine_kvsharer_calibrate(struct uc_engine *e, const int32_t *tokens,
                                       int64_t n_tokens, int64_t window,
                                       const struct uc_kvsharer_params *kp,
                                       struct uc_kvsharer_result *out)
{
    memset(out, 0, sizeof *out);
    if (!e->have_prof) {
        return UC_ERRF(UC_ERR_UNAVAILABLE, "kvsharer calibration: no profile to record the pairs "
                       "in (calibrate the entropy profile first)");
    }
    if (window < 2 || n_tokens < window) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kvsharer calibration: %lld tokens for windows of "
                       "%lld", (long long)n_tokens, (long long)window);
    }
    int64_t L = e->cfg->n_layers, c = e->cfg->hidden;
    struct ks_run r = {.e = e, .tokens = tokens, .window = window};
    r.windows = n_tokens / window < KS_MAX_WINDOWS ? n_tokens / window : KS_MAX_WINDOWS;
    struct uc_compress_params full = uc_compress_default_params();
    struct uc_step_new probe = {.n_prompt = window, .cp = full};
    if (uc_engine_kv_blocks_needed(e, &probe) * r.windows >
        uc_engine_kv_blocks_total(e) - uc_engine_kv_blocks_used(e)) {
        return UC_ERR_KV_FULL;
    }
    r.base = uc_malloc((size_t)(r.windows * window * c) * sizeof(float));
    double *dist = uc_malloc((size_t)(L * L) * sizeof(double));
    uc_status rc = UC_OK;
    if (!r.base || !dist) {
        rc = UC_ERRF(UC_ERR_NOMEM, "kvsharer calibration");
        goto out;
    }
    double t0 = uc_time_s();
    struct uc_step reset = {.op = UC_STEP_KVSHARE_RESET, .ks_tokens = window};
    UC_CHECK(uc_engine_step(e, &reset), rc, out);
    UC_CHECK(ks_run_windows(&r, &full, UC_SEQ_KVSHARE_STATS, NULL), rc, out);
    struct uc_step dstep = {.op = UC_STEP_KVSHARE_DIST};
    UC_CHECK(uc_engine_step(e, &dstep), rc, out);
    memcpy(dist, e->ks_dist, (size_t)(L * L) * sizeof(double));
    UC_CHECK(uc_kvsharer_search(out, dist, L, kp, ks_eval, &r), rc, out);
    struct uc_step set = {.op = UC_STEP_KVSHARE_SET, .ks_n_pairs = out->n_pairs,
                          .ks_target = uc_kvsharer_target(kp, L), .ks_threshold = kp->threshold,
                          .ks_cosine = out->cosine};
    memcpy(set.ks_pairs, out->pairs, sizeof set.ks_pairs);
    UC_CHECK(uc_engine_step(e, &set), rc, out);
    UC_LOG_NOTICE("engine: kvsharer calibration pairs=%d of target %d tried=%d cosine=%.4f "
                  "windows=%lld x %lld tokens in %.1f s",
                  out->n_pairs, set.ks_target, out->n_tried, out->cosine, (long long)r.windows,
                  (long long)window, uc_time_s() - t0);
out:
    uc_free(r.base);
    uc_free(dist);
    return rc;
}
