/* MiniCache in the engine (compress/minicache.h): a merged sequence's layer pairs, the merge at
 * the end of a pair's second layer in prefill, and the merged heads the decode step reads.
 *
 * Layout: a sequence with P pairs has L + P layers of heads in its uc_kv_seq; layer L + p holds
 * pair p's merged rows (one merged head per local KV head, backend.h), layers a and b of the
 * pair hold only the tokens they keep unmerged (the retained ones, the ones the other layer of
 * the pair does not keep, and every decoded token). So the pool holds the merged rows once,
 * freed, forked and counted with the rest of the sequence.
 *
 * Composition with token eviction: layers a and b select their tokens independently (the token
 * policy's budgets); only tokens that both keep are candidates for merging, and the rest stay
 * each layer's own. Keys are merged as the cache holds them, rotated (RoPE at the token's
 * position, the same in both layers), so a restored key needs no rotation. Each rank merges its
 * own KV heads; the pairs come from the request's minicache_start (the paper's contiguous
 * pairs), else from the profile's calibrated set, else from L / 2, the same on every rank (the
 * profile's set is agreed when it is calibrated), and are part of the plan checksum the ranks
 * compare (prefill.c).
 *
 * Calibration: windows of the calibration text are prefilled as ordinary steps (policy full);
 * at each layer end from layer 1 on, each rank adds every token's angular distance between the
 * previous layer's cached K/V and this layer's (kv_merge_dist, as the merge measures it) over
 * its own KV heads; an MC_SET step all-reduces the sums into each adjacent pair's mean
 * distance, rank 0's values are broadcast, and every rank records them and the pairs they give
 * (uc_minicache_select) in its profile. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "compress/minicache.h"
#include "internal.h"

int32_t eng_mc_pairs_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                         int16_t *partner, int16_t *pair_of)
{
    int64_t L = e->cfg->n_layers;
    if (!uc_policy_minicache(cp)) {
        return uc_minicache_pairs_of(partner, pair_of, L, NULL, 0);
    }
    if (cp->minicache_start <= 0 && e->have_prof && e->prof.has_minicache) {
        return uc_minicache_pairs_of(partner, pair_of, L, e->prof.mc_first, e->prof.mc_n_pairs);
    }
    return uc_minicache_pairs(partner, pair_of, L, uc_minicache_start(cp->minicache_start, L));
}

uc_status eng_mc_seq_init(struct uc_engine *e, struct seq *s, const struct seq *src)
{
    int64_t L = e->cfg->n_layers, hkv_l = e->sh->n_heads_kv;
    s->mc_pair = uc_malloc((size_t)L * sizeof *s->mc_pair);
    s->mc_partner = uc_malloc((size_t)L * sizeof *s->mc_partner);
    if (!s->mc_pair || !s->mc_partner) {
        return UC_ERRF(UC_ERR_NOMEM, "minicache pairs");
    }
    if (src) {
        memcpy(s->mc_pair, src->mc_pair, (size_t)L * sizeof *s->mc_pair);
        memcpy(s->mc_partner, src->mc_partner, (size_t)L * sizeof *s->mc_partner);
        s->mc_n_pairs = src->mc_n_pairs;
    } else {
        s->mc_n_pairs = eng_mc_pairs_for(e, &s->cp, s->mc_partner, s->mc_pair);
    }
    if (s->mc_n_pairs > 0 && s->phase == UC_SEQ_PREFILLING) {
        s->mc_keep_a = uc_calloc((size_t)(s->mc_n_pairs * hkv_l), sizeof *s->mc_keep_a);
        s->mc_n_keep_a = uc_calloc((size_t)(s->mc_n_pairs * hkv_l), sizeof *s->mc_n_keep_a);
        if (!s->mc_keep_a || !s->mc_n_keep_a) {
            return UC_ERRF(UC_ERR_NOMEM, "minicache kept rows");
        }
        if (s->flags & UC_SEQ_RECORD_KEPT) {
            s->mc_rec = uc_calloc((size_t)(s->mc_n_pairs * hkv_l), sizeof *s->mc_rec);
            s->mc_n_rec = uc_calloc((size_t)(s->mc_n_pairs * hkv_l), sizeof *s->mc_n_rec);
            if (!s->mc_rec || !s->mc_n_rec) {
                return UC_ERRF(UC_ERR_NOMEM, "minicache records");
            }
        }
    }
    return UC_OK;
}

void eng_mc_free_prefill(struct uc_engine *e, struct seq *s)
{
    for (int64_t i = 0; s->mc_keep_a && i < s->mc_n_pairs * e->sh->n_heads_kv; i++) {
        UC_FREE(s->mc_keep_a[i]);
    }
    UC_FREE(s->mc_keep_a);
    UC_FREE(s->mc_n_keep_a);
}

void eng_mc_seq_fini(struct uc_engine *e, struct seq *s)
{
    eng_mc_free_prefill(e, s);
    for (int64_t i = 0; s->mc_rec && i < s->mc_n_pairs * e->sh->n_heads_kv; i++) {
        UC_FREE(s->mc_rec[i]);
    }
    UC_FREE(s->mc_rec);
    UC_FREE(s->mc_n_rec);
    UC_FREE(s->mc_pair);
    UC_FREE(s->mc_partner);
}

const int32_t *eng_mc_merged_positions(const struct seq *s, int64_t l, int64_t j, int64_t *n)
{
    *n = 0;
    if (!s->mc_rec || s->mc_pair[l] < 0) {
        return NULL;
    }
    int64_t i = s->mc_pair[l] * s->kv.n_heads_kv + j;
    *n = s->mc_n_rec[i];
    return s->mc_rec[i];
}

struct uc_kv_head *eng_mc_head(struct seq *s, int64_t l, int64_t j, int32_t *side)
{
    if (s->mc_n_pairs == 0 || !s->mc_pair || s->mc_pair[l] < 0) {
        return NULL;
    }
    *side = s->mc_partner[l] > l ? 0 : 1;
    return uc_kv_seq_head(&s->kv, s->kv.n_layers - s->mc_n_pairs + s->mc_pair[l], j);
}

/* Layer a of a pair: its kept rows of head j (ascending, logical order of its head), for b. */
static uc_status record_a(struct seq *s, int64_t slot, const int32_t *keep, int64_t nk)
{
    int32_t *k = uc_malloc((size_t)(nk > 0 ? nk : 1) * sizeof(int32_t));
    if (!k) {
        return UC_ERRF(UC_ERR_NOMEM, "minicache kept rows");
    }
    memcpy(k, keep, (size_t)nk * sizeof(int32_t));
    uc_free(s->mc_keep_a[slot]);
    s->mc_keep_a[slot] = k;
    s->mc_n_keep_a[slot] = nk;
    return UC_OK;
}

/* Layer b of a pair, head j: merges the tokens both layers keep (all but the retained share)
 * into the pair's merged head, compacts layer a's head to its unmerged tokens, and removes the
 * merged rows from b's kept list (keep, *nk), which the caller then scatters. */
static uc_status merge_head(struct uc_engine *e, struct seq *s, int64_t l, int64_t j,
                            int32_t *keep, int64_t *nk, const void *kbase, const void *vbase)
{
    int64_t p = s->mc_pair[l], a = s->mc_partner[l], hkv_l = e->sh->n_heads_kv;
    const int32_t *ka = s->mc_keep_a[p * hkv_l + j];
    int64_t na = s->mc_n_keep_a[p * hkv_l + j], nb = *nk;
    struct uc_kv_head *ha = uc_kv_seq_head(&s->kv, a, j);
    int32_t side;
    struct uc_kv_head *hm = eng_mc_head(s, l, j, &side);
    uc_status rc = UC_OK;
    int64_t cap = na < nb ? na : nb;
    size_t c1 = (size_t)(cap > 0 ? cap : 1);
    int32_t *ia = uc_malloc(c1 * sizeof(int32_t)), *rb = uc_malloc(c1 * sizeof(int32_t));
    int32_t *as = uc_malloc(c1 * sizeof(int32_t)), *ms = uc_malloc(c1 * sizeof(int32_t));
    double *dist = uc_malloc(2 * c1 * sizeof(double)), *dmax = uc_malloc(c1 * sizeof(double));
    bool *ret = uc_malloc(c1 * sizeof(bool));
    bool *gone_a = uc_calloc((size_t)(na > 0 ? na : 1), sizeof(bool));
    struct uc_minicache_rank *rank = uc_malloc(c1 * sizeof *rank);
    if (!ia || !rb || !as || !ms || !dist || !dmax || !ret || !gone_a || !rank) {
        rc = UC_ERRF(UC_ERR_NOMEM, "minicache merge tokens=%lld", (long long)cap);
        goto out;
    }
    if (!ka || ha->n_tokens != na || ha->kdim != 0) {
        rc = UC_ERRF(UC_ERR_INVALID_ARG, "minicache: layer %lld head %lld holds %d tokens, its "
                     "kept list %lld", (long long)a, (long long)j, ha->n_tokens, (long long)na);
        goto out;
    }
    /* the tokens both layers keep (both lists ascending) */
    int64_t m = 0;
    for (int64_t x = 0, y = 0; x < na && y < nb;) {
        if (ka[x] < keep[y]) {
            x++;
        } else if (ka[x] > keep[y]) {
            y++;
        } else {
            ia[m] = (int32_t)x;
            rb[m] = (int32_t)y;
            as[m] = uc_kv_head_slot(&e->kv, ha, x);
            m++;
            x++;
            y++;
        }
    }
    int64_t ld = e->sh->qkv_dim;
    for (int64_t c = 0; c < m; c++) {
        ms[c] = keep[rb[c]]; /* b's source rows for the ops */
    }
    if (m > 0) {
        UC_CHECK(e->be->ops->kv_merge_dist(e->be, dist, &e->kv.pool, as, kbase, vbase, ld, ms, j,
                                           m),
                 rc, out);
    }
    for (int64_t c = 0; c < m; c++) {
        dmax[c] = dist[2 * c] > dist[2 * c + 1] ? dist[2 * c] : dist[2 * c + 1];
    }
    int64_t kept_out = uc_minicache_retain(ret, dmax, m, uc_policy_minicache_gamma(&s->cp), rank);
    /* the merged tokens, in position order: a's slots and b's rows */
    int64_t nm = 0;
    for (int64_t c = 0; c < m; c++) {
        if (!ret[c]) {
            as[nm] = as[c];
            ms[nm] = ms[c];
            gone_a[ia[c]] = true;
            rb[nm] = rb[c];
            nm++;
        }
    }
    UC_ASSERT(nm == m - kept_out);
    if (s->mc_rec) {
        int64_t i = p * hkv_l + j;
        UC_FREE(s->mc_rec[i]);
        s->mc_rec[i] = uc_malloc((size_t)(nm > 0 ? nm : 1) * sizeof(int32_t));
        if (!s->mc_rec[i]) {
            rc = UC_ERRF(UC_ERR_NOMEM, "minicache records");
            goto out;
        }
        for (int64_t c = 0; c < nm; c++) {
            s->mc_rec[i][c] = s->pos[keep[rb[c]]];
        }
        s->mc_n_rec[i] = nm;
    }
    UC_CHECK(uc_kv_head_set_merged(&e->kv, hm), rc, out);
    rc = uc_kv_head_reserve(&e->kv, hm, nm);
    if (rc == UC_ERR_KV_FULL) {
        UC_FATAL("kv pool exhausted merging seq=%lld layer=%lld (admission must reserve blocks)",
                 (long long)s->id, (long long)l);
    }
    if (rc != UC_OK) {
        goto out;
    }
    int32_t *mslot = (int32_t *)rank; /* free again after the retention: reused */
    for (int64_t c = 0; c < nm; c++) {
        mslot[c] = uc_kv_head_slot(&e->kv, hm, c);
    }
    if (nm > 0) {
        UC_CHECK(e->be->ops->kv_merge_write(e->be, &e->kv.pool, as, kbase, vbase, ld, ms, j,
                                            mslot, nm, uc_policy_minicache_t(&s->cp)),
                 rc, out);
    }
    hm->n_tokens = (int32_t)nm;
    /* layer a keeps its unmerged tokens, moved down in order (each moves to a lower slot) */
    int64_t w = 0;
    for (int64_t x = 0; x < na; x++) {
        if (gone_a[x]) {
            continue;
        }
        if (w != x) {
            UC_CHECK(e->be->ops->kv_move(e->be, &e->kv.pool, uc_kv_head_slot(&e->kv, ha, w),
                                         uc_kv_head_slot(&e->kv, ha, x)),
                     rc, out);
        }
        w++;
    }
    ha->n_tokens = (int32_t)w;
    uc_kv_head_trim(&e->kv, ha);
    /* layer b scatters its unmerged rows only */
    int64_t wb = 0, c = 0;
    for (int64_t y = 0; y < nb; y++) {
        if (c < nm && rb[c] == y) {
            c++;
            continue;
        }
        keep[wb++] = keep[y];
    }
    *nk = wb;
    s->mc_merged += nm;
    s->mc_retained += kept_out;
out:
    uc_free(ia);
    uc_free(rb);
    uc_free(as);
    uc_free(ms);
    uc_free(dist);
    uc_free(dmax);
    uc_free(ret);
    uc_free(gone_a);
    uc_free(rank);
    return rc;
}

uc_status eng_mc_layer_end(struct uc_engine *e, struct seq *s, int32_t *keep, int64_t keep_ld,
                           int64_t *nks, const void *kbase, const void *vbase)
{
    int64_t l = s->layer, hkv_l = e->sh->n_heads_kv;
    if (s->mc_n_pairs == 0 || s->mc_pair[l] < 0) {
        return UC_OK;
    }
    if (!s->mc_keep_a) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "minicache: seq=%lld layer %lld ends outside its "
                       "prefill", (long long)s->id, (long long)l);
    }
    int64_t p = s->mc_pair[l];
    int64_t m0 = s->mc_merged, r0 = s->mc_retained;
    uc_status rc = UC_OK;
    for (int64_t j = 0; j < hkv_l && rc == UC_OK; j++) {
        int32_t *kj = keep + j * keep_ld;
        if (s->mc_partner[l] > l) {
            rc = record_a(s, p * hkv_l + j, kj, nks[j]);
        } else {
            rc = merge_head(e, s, l, j, kj, &nks[j], kbase, vbase);
        }
    }
    if (rc != UC_OK || s->mc_partner[l] > l) {
        return rc;
    }
    /* the whole model's counts for the report (every rank ends this layer in the same step);
     * ranks holding the same replicated KV head count it once */
    double c[2] = {(double)(s->mc_merged - m0), (double)(s->mc_retained - r0)};
    rc = uc_comm_allreduce_sum(e->comm, c, 2, UC_COMM_F64);
    if (rc == UC_OK) {
        double rep = (double)(uc_comm_size(e->comm) * hkv_l) / (double)e->cfg->n_heads_kv;
        rep = rep > 1.0 ? rep : 1.0;
        s->mc_merged_all += (int64_t)llround(c[0] / rep);
        s->mc_retained_all += (int64_t)llround(c[1] / rep);
    }
    return rc;
}

/* ---- calibration ------------------------------------------------------------------------- */

uc_status eng_mc_stats_layer_end(struct uc_engine *e, struct seq *s, const void *kbase,
                                 const void *vbase)
{
    int64_t l = s->layer, n = s->n_rows, hkv_l = e->sh->n_heads_kv;
    if (!(s->flags & UC_SEQ_MC_STATS) || l == 0) {
        return UC_OK;
    }
    if (!e->mc_sum) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "minicache calibration: seq=%lld without an MC_RESET",
                       (long long)s->id);
    }
    /* a replicated KV head counts on the first rank that holds it (as LoRC's sums) */
    const struct uc_model_shard *sh = e->sh;
    if (sh->kv_replicated && sh->h0 != sh->kv0 * sh->group) {
        return UC_OK;
    }
    size_t c1 = (size_t)(n > 0 ? n : 1);
    int32_t *slot = uc_malloc(c1 * sizeof(int32_t)), *row = uc_malloc(c1 * sizeof(int32_t));
    double *dist = uc_malloc(2 * c1 * sizeof(double));
    uc_status rc = UC_OK;
    if (!slot || !row || !dist) {
        rc = UC_ERRF(UC_ERR_NOMEM, "minicache calibration tokens=%lld", (long long)n);
        goto out;
    }
    double sum = 0.0;
    for (int64_t j = 0; j < hkv_l; j++) {
        const struct uc_kv_head *ha = uc_kv_seq_head(&s->kv, l - 1, j);
        if (ha->n_tokens != n || ha->kdim != 0) {
            rc = UC_ERRF(UC_ERR_INVALID_ARG, "minicache calibration: layer %lld head %lld holds "
                         "%d of %lld tokens (the windows run with policy full)",
                         (long long)(l - 1), (long long)j, ha->n_tokens, (long long)n);
            goto out;
        }
        for (int64_t x = 0; x < n; x++) {
            slot[x] = uc_kv_head_slot(&e->kv, ha, x);
            row[x] = (int32_t)x;
        }
        UC_CHECK(e->be->ops->kv_merge_dist(e->be, dist, &e->kv.pool, slot, kbase, vbase,
                                           sh->qkv_dim, row, j, n),
                 rc, out);
        for (int64_t x = 0; x < n; x++) {
            sum += dist[2 * x] > dist[2 * x + 1] ? dist[2 * x] : dist[2 * x + 1];
        }
    }
    e->mc_sum[l - 1] += sum;
    e->mc_cnt[l - 1] += (double)(n * hkv_l);
out:
    uc_free(slot);
    uc_free(row);
    uc_free(dist);
    return rc;
}

/* The mean distances over every rank's heads (rank 0's broadcast, so every rank holds the same
 * doubles), recorded with the pairs they give in the profile, saved by rank 0. */
static uc_status mc_set(struct uc_engine *e, int32_t n_pairs)
{
    int64_t L = e->cfg->n_layers;
    if (!e->have_prof) {
        return UC_ERRF(UC_ERR_UNAVAILABLE, "minicache calibration: no profile to record the "
                       "pairs in (calibrate the entropy profile first)");
    }
    double *buf = uc_malloc((size_t)(2 * (L - 1)) * sizeof(double));
    if (!buf) {
        return UC_ERRF(UC_ERR_NOMEM, "minicache distances L=%lld", (long long)L);
    }
    memcpy(buf, e->mc_sum, (size_t)(L - 1) * sizeof(double));
    memcpy(buf + L - 1, e->mc_cnt, (size_t)(L - 1) * sizeof(double));
    uc_status rc;
    UC_CHECK(uc_comm_allreduce_sum(e->comm, buf, 2 * (L - 1), UC_COMM_F64), rc, out);
    for (int64_t l = 0; l + 1 < L; l++) {
        if (!(buf[L - 1 + l] > 0.0)) {
            rc = UC_ERRF(UC_ERR_INVALID_ARG, "minicache calibration: no token measured between "
                         "layers %lld and %lld", (long long)l, (long long)(l + 1));
            goto out;
        }
        buf[l] /= buf[L - 1 + l];
    }
    if (uc_comm_size(e->comm) > 1) {
        UC_CHECK(uc_comm_bcast(e->comm, buf, (size_t)(L - 1) * sizeof(double), 0), rc, out);
    }
    int64_t tokens = llround(buf[L - 1] / (double)e->cfg->n_heads_kv);
    UC_CHECK(uc_profile_set_minicache(&e->prof, buf, n_pairs, tokens), rc, out);
    if (uc_comm_rank(e->comm) == 0) {
        rc = uc_profile_save(&e->prof, e->profile_path);
        if (rc == UC_OK) {
            UC_LOG_NOTICE("engine: minicache pairs=%d first=%d saved to %s", e->prof.mc_n_pairs,
                          e->prof.mc_first[0], e->profile_path);
        }
    }
out:
    uc_free(buf);
    return rc;
}

uc_status eng_mc_step(struct uc_engine *e, const struct uc_step *st)
{
    int64_t L = e->cfg->n_layers;
    switch (st->op) {
    case UC_STEP_MC_RESET:
        UC_FREE(e->mc_sum);
        UC_FREE(e->mc_cnt);
        if (L < 2) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "minicache calibration: %lld layer(s)",
                           (long long)L);
        }
        e->mc_sum = uc_calloc((size_t)(L - 1), sizeof(double));
        e->mc_cnt = uc_calloc((size_t)(L - 1), sizeof(double));
        if (!e->mc_sum || !e->mc_cnt) {
            UC_FREE(e->mc_sum);
            UC_FREE(e->mc_cnt);
            return UC_ERRF(UC_ERR_NOMEM, "minicache sums L=%lld", (long long)L);
        }
        return UC_OK;
    case UC_STEP_MC_SET: {
        /* 0 pairs: the calibration failed on the way, the sums are dropped */
        uc_status rc = UC_OK;
        if (st->mc_n_pairs != 0) {
            rc = e->mc_sum ? mc_set(e, st->mc_n_pairs)
                           : UC_ERRF(UC_ERR_INVALID_ARG, "minicache calibration: MC_SET without "
                                     "an MC_RESET");
        }
        UC_FREE(e->mc_sum); /* the sums are done with */
        UC_FREE(e->mc_cnt);
        return rc;
    }
    default: return UC_ERRF(UC_ERR_FORMAT, "step: op %d is not a minicache step", (int)st->op);
    }
}

#define MC_SEQ0 (-2000)
#define MC_MAX_WINDOWS 16

uc_status uc_engine_minicache_calibrate(struct uc_engine *e, const int32_t *tokens,
                                        int64_t n_tokens, int64_t window, int32_t n_pairs)
{
    int64_t L = e->cfg->n_layers;
    if (!e->have_prof) {
        return UC_ERRF(UC_ERR_UNAVAILABLE, "minicache calibration: no profile to record the "
                       "pairs in (calibrate the entropy profile first)");
    }
    if (window < 2 || n_tokens < window || window > e->max_ctx) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "minicache calibration: %lld tokens for windows of "
                       "%lld", (long long)n_tokens, (long long)window);
    }
    int32_t np = n_pairs > 0 ? n_pairs : uc_minicache_default_pairs(L);
    if (np < 1 || 2 * (int64_t)np > L || np > UC_MINICACHE_MAX_PAIRS ||
        L > UC_MINICACHE_MAX_LAYERS) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "minicache calibration: %d pairs of %lld layers (1 "
                       "to %lld)", np, (long long)L, (long long)(L / 2));
    }
    int64_t nw = n_tokens / window < MC_MAX_WINDOWS ? n_tokens / window : MC_MAX_WINDOWS;
    struct uc_compress_params full = uc_compress_default_params();
    struct uc_step_new probe = {.n_prompt = window, .cp = full};
    if (uc_engine_kv_blocks_needed(e, &probe) * nw >
        uc_engine_kv_blocks_total(e) - uc_engine_kv_blocks_used(e)) {
        return UC_ERR_KV_FULL;
    }
    double t0 = uc_time_s();
    struct uc_step_new news[MC_MAX_WINDOWS];
    struct uc_step_prefill pf[MC_MAX_WINDOWS];
    int64_t ids[MC_MAX_WINDOWS];
    for (int64_t i = 0; i < nw; i++) {
        ids[i] = MC_SEQ0 - i;
        news[i] = (struct uc_step_new){.seq_id = ids[i], .flags = UC_SEQ_MC_STATS,
                                       .max_new_tokens = 0, .cp = full, .n_prompt = window,
                                       .prompt = tokens + i * window};
        pf[i] = (struct uc_step_prefill){.seq_id = ids[i], .budget_rows = 0};
    }
    uc_status rc;
    struct uc_step reset = {.op = UC_STEP_MC_RESET};
    UC_CHECK(uc_engine_step(e, &reset), rc, out);
    struct uc_step run = {.op = UC_STEP_RUN, .n_new = (int32_t)nw, .n_prefill = (int32_t)nw,
                          .news = news, .prefills = pf};
    rc = uc_engine_step(e, &run);
    struct uc_step fr = {.op = UC_STEP_RUN, .n_free = (int32_t)nw, .frees = ids};
    uc_status frc = uc_engine_step(e, &fr);
    rc = rc != UC_OK ? rc : frc;
    /* MC_SET frees the sums on every rank, also after a failed window */
    struct uc_step set = {.op = UC_STEP_MC_SET, .mc_n_pairs = rc == UC_OK ? np : 0};
    uc_status src = uc_engine_step(e, &set);
    rc = rc != UC_OK ? rc : src;
    if (rc == UC_OK) {
        const struct uc_profile *p = &e->prof;
        char pairs[256] = "";
        for (int32_t i = 0; i < p->mc_n_pairs && strlen(pairs) + 16 < sizeof pairs; i++) {
            snprintf(pairs + strlen(pairs), sizeof pairs - strlen(pairs), " %d-%d",
                     p->mc_first[i], p->mc_first[i] + 1);
        }
        UC_LOG_NOTICE("engine: minicache calibration pairs:%s windows=%lld x %lld tokens in "
                      "%.1f s", pairs, (long long)nw, (long long)window, uc_time_s() - t0);
    }
out:
    return rc;
}
