/* Decode: the step's index arrays for every layer in one upload, paged attention, eviction, and
 * decode-only steps recorded as backend graphs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "internal.h"
#include "compress/select.h"

void eng_graph_drop(struct uc_engine *e, struct decode_graph *g)
{
    for (int p = 0; p < DECODE_GRAPH_MAX_PARTS; p++) {
        if (g->exec[p]) {
            e->be->ops->graph_destroy(e->be, g->exec[p]);
        }
    }
    memset(g, 0, sizeof *g);
}

/* ---- decode ----------------------------------------------------------------------------- */

/* Evict mode, after the new token's attention: update the ring and drop the lowest slot. */
static uc_status evict_head(struct uc_engine *e, struct seq *s, int64_t l, int64_t j,
                            const float *prow)
{
    struct uc_kv_head *h = uc_kv_seq_head(&s->kv, l, j);
    struct ring *rg = &s->rings[l * e->sh->n_heads_kv + j];
    int64_t n = h->n_tokens, w = s->cp.window;
    int64_t budget = s->plan.budget[l * e->cfg->n_heads_kv + e->sh->kv0 + j];
    if (n > rg->cap) {
        int64_t cap = n + 8;
        float *r = uc_calloc((size_t)(w * cap), sizeof(float));
        if (!r) {
            return UC_ERRF(UC_ERR_NOMEM, "evict ring");
        }
        for (int64_t i = 0; i < w; i++) {
            memcpy(r + i * cap, rg->rows + i * rg->cap, (size_t)rg->cap * sizeof(float));
        }
        uc_free(rg->rows);
        rg->rows = r;
        rg->cap = (int32_t)cap;
    }
    /* the new query's row replaces the oldest */
    float *row = rg->rows + (int64_t)rg->next * rg->cap;
    memcpy(row, prow, (size_t)n * sizeof(float));
    for (int64_t i = n; i < rg->cap; i++) {
        row[i] = 0.0f;
    }
    rg->next = (int32_t)((rg->next + 1) % w);
    if (rg->n_rows < w) {
        rg->n_rows++;
    }
    if (n <= budget) {
        return UC_OK;
    }
    int64_t victim;
    if (s->cp.policy == UC_POLICY_STREAMINGLLM) {
        victim = s->cp.sink_tokens < n ? s->cp.sink_tokens : n - 1;
    } else {
        int64_t m = n - (w < n ? w : n);
        if (m <= 0) {
            return UC_OK;
        }
        double *sc = e->rowscore, *pooled = e->colscore;
        for (int64_t i = 0; i < m; i++) {
            double v = 0;
            for (int64_t r = 0; r < rg->n_rows; r++) {
                v += rg->rows[r * rg->cap + i];
            }
            sc[i] = v;
        }
        uc_maxpool1d(pooled, sc, m, s->cp.pool_kernel, NULL);
        victim = 0;
        for (int64_t i = 1; i < m; i++) {
            if (pooled[i] < pooled[victim]) {
                victim = i;
            }
        }
    }
    for (int64_t r = 0; r < w; r++) {
        float *rr = rg->rows + r * rg->cap;
        memmove(rr + victim, rr + victim + 1, (size_t)(rg->cap - victim - 1) * sizeof(float));
        rr[rg->cap - 1] = 0.0f;
    }
    return uc_kv_head_remove(&e->kv, h, victim);
}

/* Blocks the heads of s take for their next token (at most steps none), and whether s has
 * packed or latent heads. Every decode step looks at every head of the batch (65,536 at batch
 * 256), so the common case costs a multiply, not a division. */
static int64_t seq_blocks_needed(const struct uc_engine *e, const struct seq *s, bool *packed,
                                 bool *latent)
{
    int64_t L = e->cfg->n_layers, hkv = e->sh->n_heads_kv, need = 0;
    for (int64_t l = 0; l < L; l++) {
        if (eng_layer_shared(s, l)) {
            continue; /* reads its source's blocks (listed there) */
        }
        for (int64_t j = 0; j < hkv; j++) {
            const struct uc_kv_head *h = &s->kv.heads[l * hkv + j];
            int64_t room = (int64_t)h->n_blocks * uc_kv_head_block_tokens(&e->kv, h);
            if (h->n_tokens + 1 > room) {
                need += uc_kv_head_blocks_for(&e->kv, h, h->n_tokens + 1) - h->n_blocks;
            }
            *packed = *packed || h->kdim > 0;
            *latent = *latent || h->lrank > 0;
        }
    }
    return need;
}

/* Every head of the batch whose next token starts a block takes one (e->dm_need: how many each
 * sequence's heads take), with the ids uc_kv_head_reserve one head after another would give:
 * the tables get room on this thread (the only step that can fail; a table rarely grows, but
 * when a batch's heads fill theirs at the same step, 65,536 reallocs from 16 threads contended
 * for the allocator's lock: a 123 ms step on the H200 host, call C3, against 24 ms on one
 * thread), the blocks leave the pool in one piece, and each sequence hands out its share. When
 * the whole batch crosses a block boundary at once (256 sequences of an 8B model: 65,536 heads)
 * that is a cache miss or two per head, so with `big` the sequences hand out in parallel. With
 * `soft` (the lookahead) a pool too short is UC_ERR_KV_FULL with nothing taken, not fatal. */
static uc_status decode_reserve(struct uc_engine *e, struct seq **batch, int64_t nb, bool big,
                                bool soft)
{
    int64_t L = e->cfg->n_layers, hkv = e->sh->n_heads_kv, total = 0;
    for (int64_t b = 0; b < nb; b++) {
        e->dm_first[b] = total;
        total += e->dm_need[b];
    }
    if (total == 0) {
        return UC_OK;
    }
    if (!eng_grow((void **)&e->dm_ids, &e->dm_ids_cap, total, sizeof *e->dm_ids)) {
        return UC_ERRF(UC_ERR_NOMEM, "decode block reservation of %lld blocks", (long long)total);
    }
    int64_t left = e->kv.n_free;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t l = 0; e->dm_need[b] > 0 && l < L; l++) {
            for (int64_t j = 0; j < hkv && !eng_layer_shared(batch[b], l); j++) {
                struct uc_kv_head *h = uc_kv_seq_head(&batch[b]->kv, l, j);
                int64_t blocks = uc_kv_head_blocks_for(&e->kv, h, h->n_tokens + 1);
                left -= blocks > h->n_blocks ? blocks - h->n_blocks : 0;
                if (left < 0 && soft) {
                    return UC_ERR_KV_FULL; /* nothing taken */
                }
                if (left < 0) {
                    UC_FATAL("kv pool exhausted in decode seq=%lld layer=%lld",
                             (long long)batch[b]->id, (long long)l);
                }
                uc_status rc = uc_kv_head_make_room(h, blocks);
                if (rc != UC_OK) {
                    return rc; /* nothing taken */
                }
            }
        }
    }
    bool ok = uc_kv_take_blocks(&e->kv, total, e->dm_ids);
    UC_ASSERT(ok); /* total <= n_free above */
#pragma omp parallel for schedule(static) if (big)
    for (int64_t b = 0; b < nb; b++) {
        const int32_t *ids = e->dm_ids + e->dm_first[b];
        for (int64_t l = 0; e->dm_need[b] > 0 && l < L; l++) {
            for (int64_t j = 0; j < hkv && !eng_layer_shared(batch[b], l); j++) {
                struct uc_kv_head *h = uc_kv_seq_head(&batch[b]->kv, l, j);
                ids += uc_kv_head_add_taken(&e->kv, h, h->n_tokens + 1, ids);
            }
        }
    }
    return UC_OK;
}

/* Layer l's entries of the index arrays for the heads that own their cache: each head's next
 * slot taken. Returns the longest head (with its pair's merged rows). */
static int64_t meta_layer(struct uc_engine *e, struct seq **batch, int64_t nb, int64_t l,
                          int32_t *m, struct eng_meta_layout y)
{
    int64_t hkv = e->sh->n_heads_kv, ent = nb * hkv, maxn = 0;
    int32_t *slot = m + nb + y.per * l * ent, *ntok = slot + ent, *off = ntok + ent;
    /* each head's block list is an allocation of its own, so reading the id of the block the
     * next token goes to misses the cache once per head: ask for all of them first, so the
     * misses overlap instead of following one another (at batch 256, 2,048 heads a layer) */
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t j = 0; j < hkv && !eng_layer_shared(batch[b], l); j++) {
            const struct uc_kv_head *h = uc_kv_seq_head(&batch[b]->kv, l, j);
            __builtin_prefetch(h->blocks + h->n_tokens / uc_kv_head_block_tokens(&e->kv, h));
        }
    }
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t j = 0; j < hkv && !eng_layer_shared(batch[b], l); j++) {
            struct uc_kv_head *h = uc_kv_seq_head(&batch[b]->kv, l, j);
            const struct uc_kv_table_head *a = &batch[b]->bt.heads[l * hkv + j];
            int64_t x = b * hkv + j;
            /* appends go to a block of the head's own (a fork copies the last one) */
            UC_ASSERT(!uc_kv_block_shared(
                &e->kv, h->blocks[h->n_tokens / uc_kv_head_block_tokens(&e->kv, h)]));
            int32_t sl = uc_kv_head_slot(&e->kv, h, h->n_tokens);
            slot[x] = h->kdim > 0 || h->lrank > 0 ? -sl - 1 : sl;
            h->n_tokens++;
            ntok[x] = h->n_tokens;
            off[x] = a->off;
            if (y.kdim >= 0) {
                slot[y.kdim * ent + x] = h->kdim;
                slot[(y.kdim + 1) * ent + x] = a->off + a->cap; /* the kept channels */
            }
            if (y.lat >= 0) {
                slot[y.lat * ent + x] = h->lrank;
            }
            int64_t nall = h->n_tokens;
            if (y.mc >= 0) {
                /* MiniCache: the pair's merged rows too (their head's ids in the arena), with
                 * this layer's magnitudes */
                int32_t side = 0;
                const struct uc_kv_head *hm = eng_mc_head(batch[b], l, j, &side);
                int32_t *mc = slot + y.mc * ent;
                mc[x] = hm ? hm->n_tokens : 0;
                mc[ent + x] = hm ? batch[b]->bt.heads[hm - batch[b]->kv.heads].off : 0;
                mc[2 * ent + x] = side;
                nall += mc[x];
            }
            maxn = nall > maxn ? nall : maxn;
        }
    }
    return maxn;
}

/* Layer l's entries for the sequences whose layer l reads an earlier layer's cache (KVSharer):
 * no append (slot -1); attention over the source layer's head, whose new token was appended at
 * that layer of this step (kvsharer combines with neither think, lorc nor minicache: their
 * parts are 0 here). */
static void meta_layer_shared(struct uc_engine *e, struct seq **batch, int64_t nb, int64_t l,
                              int32_t *m, struct eng_meta_layout y)
{
    int64_t hkv = e->sh->n_heads_kv, ent = nb * hkv;
    int32_t *slot = m + nb + y.per * l * ent, *ntok = slot + ent, *off = ntok + ent;
    for (int64_t b = 0; b < nb; b++) {
        int64_t src = batch[b]->plan.share_src[l];
        const int32_t *sslot = m + nb + y.per * src * ent;
        for (int64_t j = 0; j < hkv && src != l; j++) {
            int64_t x = b * hkv + j;
            slot[x] = -1;
            ntok[x] = sslot[ent + x];
            off[x] = sslot[2 * ent + x];
            for (int64_t p = 3; p < y.per; p++) {
                slot[p * ent + x] = 0;
            }
            e->dm_maxn[l] = ntok[x] > e->dm_maxn[l] ? ntok[x] : e->dm_maxn[l];
        }
    }
}

/* Every head of the batch ready for its next token: the blocks it takes (decode_reserve) and
 * the block tables in backend memory brought up to date (e->bt, shard/kv_table.h: only what
 * changed since the last sync is written); *packed, *latent: whether the batch has such heads.
 * `soft` as in decode_reserve. */
static uc_status decode_blocks(struct uc_engine *e, struct seq **batch, int64_t nb, bool soft,
                               bool *packed, bool *latent)
{
    int64_t L = e->cfg->n_layers, ent = nb * e->sh->n_heads_kv;
    bool pk = false, lt = false;
    if (!eng_grow((void **)&e->bt_seqs, &e->bt_seqs_cap, nb, sizeof *e->bt_seqs) ||
        !eng_grow((void **)&e->dm_need, &e->dm_need_cap, nb, sizeof *e->dm_need) ||
        !eng_grow((void **)&e->dm_first, &e->dm_first_cap, nb, sizeof *e->dm_first)) {
        return UC_ERRF(UC_ERR_NOMEM, "decode block table list");
    }
    /* at batch 256 the batch has 65K heads: they are looked at in parallel, and only the few
     * that need a block take one (from the pool, in order). Small batches stay on this thread:
     * the daemon's OpenMP threads sleep between steps (OMP_WAIT_POLICY=PASSIVE), and waking
     * them twice cost more than the loops (e->par_min_heads). */
    bool big = ent * L >= e->par_min_heads;
#pragma omp parallel for schedule(static) reduction(|| : pk, lt) if (big)
    for (int64_t b = 0; b < nb; b++) {
        e->dm_need[b] = seq_blocks_needed(e, batch[b], &pk, &lt);
    }
    uc_status rc = decode_reserve(e, batch, nb, big, soft);
    if (rc != UC_OK) {
        return rc;
    }
    for (int64_t b = 0; b < nb; b++) {
        e->bt_seqs[b] = (struct uc_kv_table_seq){&batch[b]->kv, batch[b]->plan.share_src, L,
                                                 &batch[b]->bt};
    }
    *packed = pk;
    *latent = lt;
    return uc_kv_table_sync(&e->bt, e->bt_seqs, nb);
}

/* Whether decode_blocks was done for this batch by the lookahead of the step just before step
 * `step` (no step ran between, so no head changed since): the same number of sequences, each
 * one readied by it (the batch's order may differ). */
bool eng_decode_ahead_done(const struct uc_engine *e, struct seq *const *batch, int64_t nb,
                           int64_t step)
{
    if (e->ah_nb != nb || e->ah_step + 1 != step) {
        return false;
    }
    for (int64_t b = 0; b < nb; b++) {
        if (batch[b]->ah_step != e->ah_step) {
            return false;
        }
    }
    return true;
}

/* The lookahead: decode_blocks for the next step's batch while the device runs step `step` (the
 * table uploads queue behind this step's work, which reads no id they write). If the next step
 * has other sequences, its own decode_blocks finds these heads' blocks taken and their tables
 * current; a sequence that ends instead returns the block with the rest. A head reserves at
 * most its next token's block, which admission counted (a sequence decodes at most max_new - 1
 * tokens after its first). */
uc_status eng_decode_ahead(struct uc_engine *e, struct seq **batch, int64_t nb, int64_t step)
{
    e->ah_nb = 0;
    if (e->p.no_lookahead || nb == 0) {
        return UC_OK; /* the next step does it */
    }
    int64_t free0 = e->kv.n_free, ints0 = e->bt.ints_uploaded;
    uc_status rc = decode_blocks(e, batch, nb, true, &e->ah_packed, &e->ah_latent);
    if (rc == UC_ERR_KV_FULL) {
        return UC_OK; /* the next step tries again, as without the lookahead */
    }
    for (int64_t b = 0; rc == UC_OK && b < nb; b++) {
        batch[b]->ah_step = step;
    }
    e->ah_nb = rc == UC_OK ? nb : 0;
    e->ah_step = step;
    e->ah_blocks = free0 - e->kv.n_free;
    e->ah_table_ints = e->bt.ints_uploaded - ints0;
    return rc;
}

/* After a prefill-only step the scheduler's next step decodes every running sequence (under
 * prefill-first, once no prompt is left to prefill): a wave of 32 prompts of 8K on an 8B model
 * then had 5.3M table ints to write and 8,192 blocks to take before its first decode step's
 * layers (6-9 ms on the H200 host). Done here, each prompt's share goes while the device runs
 * the step that finishes it. Sequences that will not decode (max_new 1) are left out. */
uc_status eng_decode_ahead_of_prefill(struct uc_engine *e, struct seq **end, int64_t n_end)
{
    int64_t nb = 0;
    if (!eng_grow((void **)&e->ah_batch, &e->ah_batch_cap, e->n_seqs, sizeof *e->ah_batch)) {
        e->ah_nb = 0;
        return UC_OK; /* the next step does it */
    }
    for (int64_t i = 0; i < e->n_seqs; i++) {
        struct seq *s = e->seqs[i];
        bool ends = false;
        for (int64_t k = 0; k < n_end; k++) {
            ends = ends || end[k] == s;
        }
        if ((s->phase == UC_SEQ_DECODING || ends) && s->max_new > 1) {
            e->ah_batch[nb++] = s;
        }
    }
    return nb <= e->p.max_batch ? eng_decode_ahead(e, e->ah_batch, nb, e->step_no) : UC_OK;
}

/* The index arrays of a decode step (step `step`), before any layer's part: every head ready
 * for its next token (decode_blocks, unless the lookahead did it), and the layout fixed:
 * in int32s, pos (B) | for each layer, the parts of eng_meta_layout (decode_meta_layers fills
 * them). Offsets are into the arena of block tables (a head's block ids; a packed head's kept
 * channels at coff; a merged head's ids at mc_off). A packed or latent entry's slot is -(its
 * slot) - 1. The layout depends only on B and which kinds of heads the batch has, so a
 * recorded step stays valid while this buffer and the arena do. */
uc_status eng_decode_meta_prep(struct uc_engine *e, struct seq **batch, int64_t nb,
                               int64_t step)
{
    int64_t L = e->cfg->n_layers, hkv = e->sh->n_heads_kv, ent = nb * hkv;
    bool packed = false, latent = false, any_shared = false, merged = false;
    uc_status rc = UC_OK;
    e->dm_next = 0;
    if (eng_decode_ahead_done(e, batch, nb, step)) {
        packed = e->ah_packed;
        latent = e->ah_latent;
        e->info.lookahead = true;
        e->info.blocks_taken = e->ah_blocks;
        e->info.table_ints = e->ah_table_ints;
    } else {
        int64_t free0 = e->kv.n_free, ints0 = e->bt.ints_uploaded;
        UC_CHECK(decode_blocks(e, batch, nb, false, &packed, &latent), rc, out);
        e->info.blocks_taken = free0 - e->kv.n_free;
        e->info.table_ints = e->bt.ints_uploaded - ints0;
    }
    e->ah_nb = 0;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t l = 0; l < L; l++) {
            any_shared = any_shared || eng_layer_shared(batch[b], l);
        }
        merged = merged || batch[b]->mc_n_pairs > 0;
    }
    struct eng_meta_layout y = eng_meta_layout(packed, latent, merged);
    int64_t fixed = nb + y.per * L * ent;
    if (!eng_grow((void **)&e->dm_host, &e->dm_cap, fixed, sizeof(int32_t))) {
        return UC_ERRF(UC_ERR_NOMEM, "decode index arrays");
    }
    if (fixed > e->dm_dev_cap) {
        int64_t cap = fixed + fixed / 2;
        if (e->dm_dev) {
            e->be->ops->free(e->be, e->dm_dev);
            e->dm_dev = NULL;
            e->dm_dev_cap = 0;
        }
        UC_CHECK(e->be->ops->alloc(e->be, &e->dm_dev, (size_t)cap * sizeof(int32_t)), rc, out);
        e->dm_dev_cap = cap;
    }
    e->dm_packed = packed;
    e->dm_latent = latent;
    e->dm_merged = merged;
    e->dm_shared = any_shared;
    for (int64_t b = 0; b < nb; b++) {
        e->dm_host[b] = (int32_t)batch[b]->n_ctx; /* RoPE position of the new token */
    }
out:
    return rc;
}

/* Layers [l0, l1) of the index arrays (each head's next slot taken), then uploaded (with the
 * positions when l0 is 0), so a step can start its first layers while the host lays out the
 * later ones. Layers read only their own entries and, for KVSharer, an earlier layer's. */
static uc_status decode_meta_layers(struct uc_engine *e, int64_t nb, int64_t l0, int64_t l1)
{
    struct seq **batch = e->batch;
    int64_t hkv = e->sh->n_heads_kv, ent = nb * hkv;
    struct eng_meta_layout y = eng_meta_layout(e->dm_packed, e->dm_latent, e->dm_merged);
    int32_t *m = e->dm_host;
    bool big = ent * (l1 - l0) >= e->par_min_heads;
#pragma omp parallel for schedule(static) if (big)
    for (int64_t l = l0; l < l1; l++) {
        e->dm_maxn[l] = meta_layer(e, batch, nb, l, m, y);
    }
    for (int64_t l = l0; e->dm_shared && l < l1; l++) {
        meta_layer_shared(e, batch, nb, l, m, y);
    }
    int64_t i0 = l0 == 0 ? 0 : nb + y.per * l0 * ent, i1 = nb + y.per * l1 * ent;
    return e->be->ops->upload(e->be, (int32_t *)e->dm_dev + i0, m + i0,
                              (size_t)(i1 - i0) * sizeof(int32_t));
}

/* The index arrays of every layer below l1 built and uploaded (e->dm_next: the first layer
 * not yet built this step). The host time of the step's start ends when the first layers'
 * arrays are on their way. */
static uc_status decode_meta_upto(struct uc_engine *e, int64_t nb, int64_t l1)
{
    if (e->dm_next >= l1) {
        return UC_OK;
    }
    uc_status rc = decode_meta_layers(e, nb, e->dm_next, l1);
    if (e->dm_next == 0) {
        e->info.decode_prep_ms = (uc_time_s() - e->dm_t0) * 1e3;
    }
    e->dm_next = l1;
    return rc;
}

/* The decode rows' attention at layer l, from their Q/K/V in e->dqkv (rows [0, nb)) to
 * ws.att: RoPE, the new token's K/V appended to every head, paged attention over the whole
 * cache, and with eviction each head's lowest slot dropped. Reads the uploaded index arrays. */
uc_status eng_decode_attend(struct uc_engine *e, int64_t nb, int64_t l, bool any_evict)
{
    int64_t hl = e->sh->n_heads, hkv = e->sh->n_heads_kv;
    struct eng_meta_layout y = eng_meta_layout(e->dm_packed, e->dm_latent, e->dm_merged);
    int64_t ld = e->sh->qkv_dim, ent = nb * hkv;
    const int32_t *dm = e->dm_dev;
    const int32_t *slot = dm + nb + y.per * l * ent, *ntok = slot + ent, *off = ntok + ent;
    const int32_t *tables = e->bt.dev;
    struct seq **batch = e->batch;
    uc_status rc;
    if (y.lat >= 0) {
        /* LoRC: the latents of the new token's key before RoPE, so before rope_append */
        UC_CHECK(e->be->ops->kv_append_latent(e->be, &e->kv.pool, e->dqkv, ld, hl, hkv, dm, slot,
                                              slot + y.lat * ent, eng_lorc_basis(e, l), nb),
                 rc, out);
    }
    UC_CHECK(e->be->ops->rope_append(e->be, &e->kv.pool, e->dqkv, ld, hl, hkv, e->cfg->head_dim,
                                     dm, slot, nb),
             rc, out);
    struct uc_kv_batch_view view = {.n_tokens = ntok,
                                    .offset = off,
                                    .blocks = tables,
                                    .max_tokens = any_evict ? e->dm_maxn[l] : 0,
                                    .on_device = true};
    if (y.mc >= 0) {
        view.mc_n = slot + y.mc * ent;
        view.mc_off = view.mc_n + ent;
        view.mc_side = view.mc_off + ent;
    }
    if (y.kdim >= 0) {
        view.kdim = slot + y.kdim * ent;
        view.coff = view.kdim + ent;
        view.chan = tables;
        UC_CHECK(e->be->ops->kv_append_packed(e->be, &e->kv.pool, e->dqkv, ld, hl, hkv, slot,
                                              view.kdim, view.coff, view.chan, nb),
                 rc, out);
    }
    if (y.lat >= 0) {
        view.lat_rank = slot + y.lat * ent;
        view.lat_basis = eng_lorc_basis(e, l);
    }
    float *psum = NULL;
    if (any_evict) {
        int64_t maxn = e->dm_maxn[l];
        if (!eng_grow((void **)&e->psum, &e->psum_cap, ent * maxn, sizeof(float))) {
            rc = UC_ERRF(UC_ERR_NOMEM, "evict probabilities");
            goto out;
        }
        psum = e->psum;
        UC_CHECK(eng_layer_scratch(e, maxn, 8), rc, out);
    }
    UC_CHECK(e->be->ops->attn_decode(e->be, e->ws.att, e->dqkv, ld, &e->kv.pool, &view, nb, hl,
                                     hkv, psum),
             rc, out);
    for (int64_t b = 0; any_evict && b < nb; b++) {
        if (!batch[b]->rings) {
            continue;
        }
        for (int64_t j = 0; j < hkv; j++) {
            UC_CHECK(evict_head(e, batch[b], l, j, psum + (b * hkv + j) * e->dm_maxn[l]), rc,
                     out);
        }
    }
out:
    return rc;
}

/* Layers [l0, l1) of a decode-only step of nb rows, from the embedded rows in dx to the last
 * residual add. Without eviction nothing crosses to the host (the attention sizes its work by
 * the batch alone), so the ops can be recorded into a graph and replayed at any context length;
 * eviction brings each layer's probabilities back. */
static uc_status decode_layers(struct uc_engine *e, int64_t nb, int64_t l0, int64_t l1,
                               bool any_evict)
{
    uc_status rc;
    if (l0 == 0) {
        UC_CHECK(uc_model_attn_norm(e->m, &e->ws, 0, e->dx, nb), rc, out);
    }
    for (int64_t l = l0; l < l1; l++) {
        UC_CHECK(uc_model_qkv_proj(e->m, &e->ws, l, e->dqkv, nb), rc, out);
        UC_CHECK(eng_decode_attend(e, nb, l, any_evict), rc, out);
        UC_CHECK(uc_model_finish_layer_norm_next(e->m, &e->ws, l, e->dx, nb), rc, out);
    }
out:
    return rc;
}

/* Layers [l0, L) run directly, `per` at a time, each part's index arrays built just before
 * it (the device runs a part while the host lays out the next). The step's first layer goes
 * alone, so the device starts after one layer's arrays instead of a part's. */
static uc_status decode_direct(struct uc_engine *e, int64_t nb, int64_t l0, int64_t per)
{
    int64_t L = e->cfg->n_layers;
    uc_status rc = UC_OK;
    for (int64_t l = l0, l1; rc == UC_OK && l < L; l = l1) {
        l1 = l == 0 ? 1 : l + per < L ? l + per : L;
        rc = decode_meta_upto(e, nb, l1);
        if (rc == UC_OK) {
            rc = decode_layers(e, nb, l, l1, false);
        }
    }
    return rc;
}

/* Whether a decode step of nb rows runs from recorded graphs (one rank, a backend with graphs,
 * rows within the graphs' bound). */
static bool graphs_used(const struct uc_engine *e, int64_t nb)
{
    return e->be->ops->graph_begin && uc_comm_size(e->comm) == 1 && nb <= DECODE_GRAPH_MAX_ROWS;
}

/* The recorded graphs of a step of nb rows laid out as the index arrays are now, or NULL. */
static struct decode_graph *graph_find(struct uc_engine *e, int64_t nb)
{
    struct uc_backend *be = e->be;
    uint64_t epoch = be->ops->graph_epoch ? be->ops->graph_epoch(be) : 0;
    for (int i = 0; i < DECODE_GRAPH_SLOTS; i++) {
        struct decode_graph *c = &e->graphs[i];
        if (c->exec[0] && c->nb == nb && c->meta == e->dm_dev && c->tables == e->bt.dev &&
            c->epoch == epoch && c->packed == e->dm_packed && c->merged == e->dm_merged &&
            c->latent == e->dm_latent) {
            return c;
        }
    }
    return NULL;
}

bool eng_decode_records(struct uc_engine *e, int64_t nb)
{
    return graphs_used(e, nb) && e->last_nb == nb && !graph_find(e, nb);
}

/* Runs decode_layers through recorded graphs where the backend has them: the first step of a
 * batch size runs the ops directly; a second one in a row records them, a part (a few layers)
 * at a time, launching each part once it is recorded, so the device runs part p while the host
 * records part p + 1 (recording and instantiating every part first, behind a direct run, made
 * that step the slowest inter-token gap of a wave); later ones replay. Each part's index arrays
 * are built and uploaded just before the part is launched (or recorded: an upload must not be
 * recorded), so the host's layout of later layers overlaps the device's earlier ones. */
uc_status eng_decode_graphed(struct uc_engine *e, int64_t nb)
{
    struct uc_backend *be = e->be;
    int64_t L = e->cfg->n_layers;
    bool same_nb = e->last_nb == nb;
    e->last_nb = nb;
    e->info.graph = UC_STEP_GRAPH_DIRECT;
    int64_t per = DECODE_GRAPH_LAYERS;
    if ((L + per - 1) / per > DECODE_GRAPH_MAX_PARTS) {
        per = (L + DECODE_GRAPH_MAX_PARTS - 1) / DECODE_GRAPH_MAX_PARTS;
    }
    if (!graphs_used(e, nb)) {
        return decode_direct(e, nb, 0, per);
    }
    struct decode_graph *g = graph_find(e, nb);
    uc_status rc = UC_OK;
    if (g) {
        e->info.graph = UC_STEP_GRAPH_REPLAYED;
        for (int64_t p = 0; rc == UC_OK && p * per < L; p++) {
            int64_t l1 = (p + 1) * per < L ? (p + 1) * per : L;
            rc = decode_meta_upto(e, nb, l1);
            if (rc == UC_OK) {
                rc = be->ops->graph_launch(be, g->exec[p]);
            }
        }
        return rc;
    }
    if (!same_nb) {
        return decode_direct(e, nb, 0, per);
    }
    /* record for this step and the next ones (recording runs nothing); the oldest slot makes
     * room */
    eng_graph_drop(e, &e->graphs[DECODE_GRAPH_SLOTS - 1]);
    memmove(e->graphs + 1, e->graphs, (DECODE_GRAPH_SLOTS - 1) * sizeof e->graphs[0]);
    g = &e->graphs[0];
    memset(g, 0, sizeof *g);
    for (int64_t p = 0; p * per < L; p++) {
        int64_t l1 = (p + 1) * per < L ? (p + 1) * per : L;
        UC_CHECK(decode_meta_upto(e, nb, l1), rc, out);
        rc = be->ops->graph_begin(be);
        uc_status rr = rc == UC_OK ? decode_layers(e, nb, p * per, l1, false) : rc;
        if (rc == UC_OK) {
            rc = be->ops->graph_end(be, &g->exec[p]);
        }
        if (rr != UC_OK || rc != UC_OK) {
            /* this step cannot be recorded (a workspace must grow first: the backend allocates
             * nothing while recording): parts before p ran from their graphs, the rest runs
             * directly, which grows what it needs, and a later step records */
            eng_graph_drop(e, g);
            return decode_direct(e, nb, p * per, per);
        }
        UC_CHECK(be->ops->graph_launch(be, g->exec[p]), rc, out);
    }
    g->nb = nb;
    g->meta = e->dm_dev;
    g->tables = e->bt.dev;
    g->packed = e->dm_packed;
    g->merged = e->dm_merged;
    g->latent = e->dm_latent;
    g->epoch = be->ops->graph_epoch ? be->ops->graph_epoch(be) : 0;
    e->info.graph = UC_STEP_GRAPH_RECORDED;
out:
    if (rc != UC_OK) {
        eng_graph_drop(e, g);
    }
    return rc;
}

/* The start of a step with decode rows: the batch's sequences, their tokens embedded into
 * e->dx rows [0, nb), the block tables brought up to date and the index arrays laid out; with
 * all_layers every layer's arrays are built and uploaded too, else decode_meta_upto builds
 * them a part at a time as the layers are launched. */
static uc_status decode_begin(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb,
                              bool *any_evict, bool all_layers)
{
    struct seq **batch = e->batch;
    uc_status rc;
    e->dm_t0 = uc_time_s();
    *any_evict = false;
    for (int64_t b = 0; b < nb; b++) {
        batch[b] = eng_find_seq(e, dec[b].seq_id);
        e->d_tok[b] = dec[b].token;
        *any_evict = *any_evict || batch[b]->rings != NULL;
    }
    UC_CHECK(uc_model_embed(e->m, e->dx, e->d_tok, nb), rc, out);
    UC_CHECK(eng_decode_meta_prep(e, batch, nb, e->step_no), rc, out);
    if (all_layers) {
        rc = decode_meta_upto(e, nb, e->cfg->n_layers);
    }
out:
    return rc;
}

/* The start of a step that mixes decode rows with prefill rows (sweep.c): everything at once. */
uc_status eng_decode_begin(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb,
                           bool *any_evict)
{
    return decode_begin(e, dec, nb, any_evict, true);
}

void uc_engine_last_step_info(const struct uc_engine *e, struct uc_engine_step_info *out)
{
    *out = e->info;
}

/* Each row's result of a decode step: its argmax token (greedy) or its logits row. */
void eng_decode_results(struct uc_engine *e, int64_t nb, bool greedy)
{
    for (int64_t b = 0; b < nb; b++) {
        struct seq *s = e->batch[b];
        s->logits_ext = greedy ? NULL : e->dec_logits + b * e->cfg->vocab;
        s->logits_rows = greedy ? 0 : 1;
        s->greedy = greedy ? e->dec_argmax[b] : -1;
    }
}

/* The end of any step with decode rows: the next token's logits of rows [0, nb) of e->dx (or
 * only their argmax, on the device, when every row is plain greedy on one rank). */
uc_status eng_decode_end(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb)
{
    bool greedy = uc_comm_size(e->comm) == 1 && e->be->ops->argmax;
    for (int64_t b = 0; b < nb; b++) {
        greedy = greedy && (dec[b].flags & UC_DECODE_GREEDY);
    }
    uc_status rc = greedy ? uc_model_argmax(e->m, &e->ws, e->dec_argmax, e->dx, nb)
                          : uc_model_logits(e->m, &e->ws, e->dec_logits, e->dx, nb);
    if (rc == UC_OK) {
        eng_decode_results(e, nb, greedy);
        for (int64_t b = 0; b < nb; b++) {
            e->batch[b]->n_ctx++;
        }
    }
    return rc;
}

/* A step of decode rows only: the layers through recorded graphs where they can be; taken from
 * the step in flight when that one covers it, and with the next one launched behind it when
 * the scheduler expects it (next.c). */
uc_status eng_decode_run(struct uc_engine *e, const struct uc_step *st)
{
    const struct uc_step_decode *dec = st->decodes;
    int64_t nb = st->n_decode;
    if (nb == 0) {
        return UC_OK;
    }
    if (e->nx.live) {
        if (eng_next_covers(e, dec, nb)) {
            return eng_next_take(e, st);
        }
        uc_status rs = eng_next_settle(e);
        if (rs != UC_OK) {
            return rs;
        }
    }
    bool any_evict;
    uc_status rc;
    UC_CHECK(decode_begin(e, dec, nb, &any_evict, false), rc, out);
    if (any_evict) {
        e->last_nb = 0;
        UC_CHECK(decode_meta_upto(e, nb, e->cfg->n_layers), rc, out);
        rc = decode_layers(e, nb, 0, e->cfg->n_layers, true);
    } else {
        rc = eng_decode_graphed(e, nb);
        if (rc == UC_OK) {
            rc = eng_decode_ahead(e, e->batch, nb, e->step_no);
        }
    }
    if (rc == UC_OK) {
        rc = !any_evict && eng_next_wanted(e, st) ? eng_next_end(e, nb)
                                                  : eng_decode_end(e, dec, nb);
    }
out:
    return rc;
}
