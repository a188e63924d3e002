/* After the fact: where non-finite activations of a sequence came from. When a sequence's logits
 * are NaN or Inf, rank 0 runs one UC_STEP_DIAGNOSE step: every rank scans its own heads' cached
 * K/V of the sequence layer by layer, and the ranks agree on the first layer holding a NaN or
 * Inf (an all-reduce). Layer l's K/V are computed from layer l's input, so when layer l is the
 * first with non-finite K/V, the activations went non-finite inside layer l - 1 (its attention
 * or MLP), or at the embedding for l = 0; with every K/V finite, in the last layer or the LM
 * head. Normal steps pay nothing for this. */
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "internal.h"

/* The first layer of s whose cached K/V on this rank hold a NaN or Inf (L if none). */
static uc_status first_bad_layer(struct uc_engine *e, struct seq *s, int64_t *out)
{
    int64_t L = e->cfg->n_layers, hkv_l = e->sh->n_heads_kv;
    int64_t cap = 0;
    *out = L;
    for (int64_t i = 0; i < s->kv.n_layers * hkv_l; i++) { /* MiniCache's merged heads too */
        cap = s->kv.heads[i].n_blocks > cap ? s->kv.heads[i].n_blocks : cap;
    }
    cap *= 2 * hkv_l;
    int32_t *blocks = uc_malloc((size_t)(cap + 1) * sizeof(int32_t));
    int32_t *valid = uc_malloc((size_t)(cap + 1) * sizeof(int32_t));
    int32_t *bad = uc_malloc((size_t)(cap + 1) * sizeof(int32_t));
    int32_t *kdim = uc_malloc((size_t)(cap + 1) * sizeof(int32_t));
    uc_status rc = UC_OK;
    if (!blocks || !valid || !bad || !kdim) {
        rc = UC_ERRF(UC_ERR_NOMEM, "non-finite diagnosis blocks=%lld", (long long)cap);
        goto out;
    }
    for (int64_t l = 0; l < L && *out == L; l++) {
        int64_t n = 0;
        for (int64_t j = 0; j < hkv_l; j++) {
            const struct uc_kv_head *h = uc_kv_seq_head(&s->kv, l, j);
            int64_t bt = uc_kv_head_block_tokens(&e->kv, h);
            if (h->lrank > 0) {
                continue; /* LoRC's latent rows (their positions are integers) are not checked */
            }
            for (int64_t b = 0; b < h->n_blocks && b * bt < h->n_tokens; b++) {
                blocks[n] = h->blocks[b];
                kdim[n] = h->kdim;
                valid[n++] = (int32_t)(h->n_tokens - b * bt < bt ? h->n_tokens - b * bt : bt);
            }
            /* MiniCache: a pair's merged rows are written at the end of its second layer, from
             * both layers' K/V, so they count there; a merged row (2 D + 4 values) is checked
             * as a packed row of D + 4 "key channels" and D values, the same stream */
            int32_t side;
            const struct uc_kv_head *m = eng_mc_head(s, l, j, &side);
            int64_t mt = m && side == 1 ? uc_kv_head_block_tokens(&e->kv, m) : 0;
            for (int64_t b = 0; mt > 0 && b < m->n_blocks && b * mt < m->n_tokens; b++) {
                blocks[n] = m->blocks[b];
                kdim[n] = (int32_t)(e->cfg->head_dim + UC_KV_MERGED_EXTRA);
                valid[n++] = (int32_t)(m->n_tokens - b * mt < mt ? m->n_tokens - b * mt : mt);
            }
        }
        UC_CHECK(e->be->ops->kv_nonfinite(e->be, &e->kv.pool, blocks, valid, kdim, n, bad), rc,
                 out);
        for (int64_t i = 0; i < n; i++) {
            if (bad[i]) {
                *out = l;
                break;
            }
        }
    }
out:
    uc_free(blocks);
    uc_free(valid);
    uc_free(bad);
    uc_free(kdim);
    return rc;
}

uc_status eng_diagnose(struct uc_engine *e, const struct uc_step *st)
{
    struct seq *s = eng_find_seq(e, st->diag_seq);
    int64_t first = e->cfg->n_layers;
    uc_status rc = s ? first_bad_layer(e, s, &first) : UC_OK;
    if (rc != UC_OK) {
        first = e->cfg->n_layers; /* this rank found nothing; the others still agree */
    }
    if (uc_comm_size(e->comm) > 1) {
        int64_t neg = -first; /* the smallest layer over the ranks */
        uc_status crc = uc_comm_allreduce_max(e->comm, &neg, 1, UC_COMM_I64);
        if (crc != UC_OK) {
            return crc;
        }
        first = -neg;
    }
    e->diag_layer = first;
    return rc;
}

uc_status uc_engine_diagnose_nonfinite(struct uc_engine *e, int64_t seq_id, int64_t *layer)
{
    *layer = -1;
    if (!eng_find_seq(e, seq_id)) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "diagnose: no sequence %lld", (long long)seq_id);
    }
    struct uc_step st = {.op = UC_STEP_DIAGNOSE, .diag_seq = seq_id};
    uc_status rc = uc_engine_step(e, &st);
    if (rc == UC_OK) {
        *layer = e->diag_layer;
    }
    return rc;
}

int uc_engine_nonfinite_origin(const struct uc_engine *e, int64_t first_bad_kv_layer, char *buf,
                               size_t buf_size)
{
    int64_t L = e->cfg->n_layers;
    if (first_bad_kv_layer <= 0) {
        return snprintf(buf, buf_size, "the embedding: layer 0's K/V cache is not finite (the "
                        "embedding, or layer 0's K/V projection)");
    }
    if (first_bad_kv_layer >= L) {
        return snprintf(buf, buf_size, "layer %lld or the LM head: every cached K/V is finite",
                        (long long)(L - 1));
    }
    return snprintf(buf, buf_size, "layer %lld: its K/V cache is finite, layer %lld's is not (so "
                    "layer %lld's attention or MLP, or layer %lld's K/V projection)",
                    (long long)(first_bad_kv_layer - 1), (long long)first_bad_kv_layer,
                    (long long)(first_bad_kv_layer - 1), (long long)first_bad_kv_layer);
}
