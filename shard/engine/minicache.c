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
 * own KV heads; the pairs come from the parameters and the layer count alone, the same on every
 * rank, and are part of the plan checksum the ranks compare (prefill.c). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "comm.h"
#include "compress/minicache.h"
#include "internal.h"

int32_t eng_mc_pairs_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                         int16_t *partner, int16_t *pair_of)
{
    int64_t L = e->cfg->n_layers;
    if (!uc_policy_minicache(cp)) {
        for (int64_t l = 0; l < L; l++) {
            partner[l] = -1;
            if (pair_of) {
                pair_of[l] = -1;
            }
        }
        return 0;
    }
    return uc_minicache_pairs(partner, pair_of, L, uc_minicache_start(cp->minicache_start, L));
}

uc_status eng_mc_seq_init(struct uc_engine *e, struct seq *s)
{
    int64_t L = e->cfg->n_layers, hkv_l = e->sh->n_heads_kv;
    s->mc_pair = uc_malloc((size_t)L * sizeof *s->mc_pair);
    s->mc_partner = uc_malloc((size_t)L * sizeof *s->mc_partner);
    if (!s->mc_pair || !s->mc_partner) {
        return UC_ERRF(UC_ERR_NOMEM, "minicache pairs");
    }
    s->mc_n_pairs = eng_mc_pairs_for(e, &s->cp, s->mc_partner, s->mc_pair);
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
