/* Sequences: checks before admission, their KV bound, creation (the prompt embedded into its
 * prefill buffer), forks and removal. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "internal.h"
#include "compress/lorc.h"
#include "compress/think.h"

/* ---- sequences -------------------------------------------------------------------------- */

struct seq *eng_find_seq(const struct uc_engine *e, int64_t id)
{
    return eng_seq_map_get(&e->seq_map, id);
}

uc_status eng_pf_alloc(struct uc_engine *e, struct seq *s, void **p, int64_t bytes)
{
    if (!eng_grow((void **)&s->pf_bufs, &s->pf_bufs_cap, s->n_pf_bufs + 1, sizeof *s->pf_bufs)) {
        return UC_ERRF(UC_ERR_NOMEM, "seq=%lld: prefill buffer list", (long long)s->id);
    }
    uc_status rc = e->be->ops->alloc(e->be, p, (size_t)bytes);
    if (rc == UC_OK) {
        s->pf_bufs[s->n_pf_bufs++] = (struct eng_pf_buf){.p = *p, .bytes = bytes};
        s->pf_held += bytes;
        s->pf_peak = s->pf_held > s->pf_peak ? s->pf_held : s->pf_peak;
    }
    return rc;
}

void eng_pf_free(struct uc_engine *e, struct seq *s, void **p)
{
    if (!*p) {
        return;
    }
    for (int64_t i = 0; i < s->n_pf_bufs; i++) {
        if (s->pf_bufs[i].p == *p) {
            s->pf_held -= s->pf_bufs[i].bytes;
            s->pf_bufs[i] = s->pf_bufs[--s->n_pf_bufs];
            break;
        }
    }
    e->be->ops->free(e->be, *p);
    *p = NULL;
}

uc_status eng_prefill_buffers(struct uc_engine *e, struct seq *s)
{
    int64_t a = (int64_t)act_size(e), np = s->n_prompt;
    uc_status rc;
    UC_CHECK(eng_pf_alloc(e, s, &s->x, np * e->cfg->hidden * a), rc, out);
    UC_CHECK(eng_pf_alloc(e, s, &s->qkv, np * e->sh->qkv_dim * a), rc, out);
    UC_CHECK(uc_model_embed(e->m, s->x, s->prompt, np), rc, out);
    uc_free(s->prompt);
    s->prompt = NULL;
out:
    if (rc != UC_OK) {
        eng_free_prefill_buffers(e, s);
    }
    return rc;
}

void eng_free_prefill_buffers(struct uc_engine *e, struct seq *s)
{
    eng_pf_free(e, s, &s->x);
    eng_pf_free(e, s, &s->qkv);
    eng_pf_free(e, s, &s->end_kv);
    UC_FREE(s->hid_rows);
    s->hid_cap = 0;
    uc_entropy_acc_fini(&s->hacc);
    UC_FREE(s->qspec_local);
    eng_mc_free_prefill(e, s);
    for (int64_t l = 0; s->src_kv && l < e->cfg->n_layers; l++) {
        eng_pf_free(e, s, &s->src_kv[l]);
    }
}

void eng_seq_destroy(struct uc_engine *e, struct seq *s)
{
    if (!s) {
        return;
    }
    eng_free_prefill_buffers(e, s);
    uc_free(s->pf_bufs);
    eng_mc_seq_fini(e, s);
    uc_kv_seq_fini(&e->kv, &s->kv);
    uc_kv_table_region_fini(&s->bt);
    uc_plan_fini(&s->plan);
    int64_t nh = e->cfg->n_layers * e->sh->n_heads_kv;
    if (s->kept) {
        for (int64_t i = 0; i < nh; i++) {
            uc_free(s->kept[i]);
        }
    }
    if (s->rows_at) {
        for (int64_t l = 0; l < e->cfg->n_layers; l++) {
            uc_free(s->rows_at[l]);
        }
    }
    if (s->kept_all) {
        for (int64_t i = 0; i < e->cfg->n_layers * e->cfg->n_heads_kv; i++) {
            uc_free(s->kept_all[i]);
        }
    }
    if (s->rings) {
        for (int64_t i = 0; i < nh; i++) {
            uc_free(s->rings[i].rows);
        }
    }
    void *p[] = {s->prompt, s->row_acc, s->pos, s->logits, s->layer_rows, s->ent_min, s->ent_mean, s->ent_max, s->kept,
                 s->n_kept, s->rows_at, s->qspec, s->hspec, s->rings, s->kept_all,
                 s->n_kept_all, s->src_kv, s->hidden, s->lorc_rank};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) {
        uc_free(p[i]);
    }
    uc_free(s);
}

void eng_seq_remove(struct uc_engine *e, int64_t id)
{
    struct seq *s = eng_seq_map_del(&e->seq_map, id);
    if (!s) {
        return;
    }
    int64_t i = s->at;
    eng_seq_destroy(e, s);
    if (i != --e->n_seqs) { /* the last one fills the hole */
        e->seqs[i] = e->seqs[e->n_seqs];
        e->seqs[i]->at = i;
    }
}

/* Stage boundaries of a new sequence: its own, else the profile's. */
static int32_t eng_stage_starts_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                                const int32_t **starts)
{
    if (cp->n_stage_starts > 0) {
        *starts = cp->stage_starts;
        return cp->n_stage_starts;
    }
    if (e->have_prof) {
        *starts = e->prof.stage_starts;
        return e->prof.n_stage_starts;
    }
    *starts = NULL;
    return 0;
}

int32_t eng_max_group_budget(const struct uc_compress_params *cp)
{
    int32_t mx = 0;
    for (int32_t g = 0; g < cp->head_groups; g++) {
        int32_t b = uc_group_budget(cp->kv_budget, g, cp->head_groups, cp->spread);
        mx = b > mx ? b : mx;
    }
    return mx;
}

uc_status uc_engine_check_new(const struct uc_engine *e, const struct uc_step_new *n, char *msg,
                              size_t msg_size)
{
    if (n->flags & UC_SEQ_FORK) {
        const struct seq *src = eng_find_seq(e, n->fork_of);
        if (!src || src->phase != UC_SEQ_DECODING) {
            snprintf(msg, msg_size, "fork: sequence %lld is not decoding", (long long)n->fork_of);
            return UC_ERR_INVALID_ARG;
        }
        if (src->n_ctx + (int64_t)n->max_new_tokens > e->max_ctx) {
            snprintf(msg, msg_size, "fork: %lld tokens + max_tokens %d exceed the context",
                     (long long)src->n_ctx, n->max_new_tokens);
            return UC_ERR_INVALID_ARG;
        }
        return UC_OK;
    }
    if (n->n_prompt < 1) {
        snprintf(msg, msg_size, "prompt: empty (at least one token is needed)");
        return UC_ERR_INVALID_ARG;
    }
    if (n->max_new_tokens < 0) {
        snprintf(msg, msg_size, "sampling.max_tokens=%d must not be negative", n->max_new_tokens);
        return UC_ERR_INVALID_ARG;
    }
    if (n->n_prompt + (int64_t)n->max_new_tokens > e->max_ctx) {
        snprintf(msg, msg_size,
                 "prompt of %lld tokens + max_tokens %d exceeds the context length %lld",
                 (long long)n->n_prompt, n->max_new_tokens, (long long)e->max_ctx);
        return UC_ERR_INVALID_ARG;
    }
    for (int64_t i = 0; i < n->n_prompt; i++) {
        if (n->prompt[i] < 0 || n->prompt[i] >= e->cfg->vocab) {
            snprintf(msg, msg_size, "prompt token %lld: id %d outside the vocabulary (%lld)",
                     (long long)i, n->prompt[i], (long long)e->cfg->vocab);
            return UC_ERR_INVALID_ARG;
        }
    }
    uc_status rc = uc_compress_params_validate(&n->cp, e->cfg->n_layers, msg, msg_size);
    if (rc != UC_OK) {
        return rc;
    }
    if (uc_policy_uses_entropy(n->cp.policy) && n->cp.grouping == UC_GROUPING_PROFILE &&
        !e->have_prof) {
        snprintf(msg, msg_size, "compression.grouping=profile: no calibration profile is loaded "
                 "(run Calibrate, or use grouping=prompt)");
        return UC_ERR_UNAVAILABLE;
    }
    if (!eng_lorc_check(e, &n->cp, msg, msg_size)) {
        return UC_ERR_UNSUPPORTED;
    }
    if (uc_policy_kvsharer(&n->cp) && n->cp.n_share == 0 && !(e->have_prof && e->prof.has_share)) {
        snprintf(msg, msg_size, "compression.policy=kvsharer needs the layer pairs of a KVSharer "
                 "calibration in the profile (run Calibrate)");
        return UC_ERR_UNAVAILABLE;
    }
    if ((n->flags & UC_SEQ_KVSHARE_STATS) && n->n_prompt != e->ks_tokens) {
        snprintf(msg, msg_size, "kvsharer calibration: window of %lld tokens, the sums are for "
                 "%lld", (long long)n->n_prompt, (long long)e->ks_tokens);
        return UC_ERR_INVALID_ARG;
    }
    if ((n->flags & UC_SEQ_MC_STATS) &&
        (!e->mc_sum || n->cp.policy != UC_POLICY_FULL || n->cp.stages != 0)) {
        snprintf(msg, msg_size, "minicache calibration: a window needs an MC_RESET and policy "
                 "full without stages");
        return UC_ERR_INVALID_ARG;
    }
    const int32_t *starts;
    if (uc_policy_cuts_rows(n->cp.policy) && eng_stage_starts_for(e, &n->cp, &starts) == 0 &&
        !e->have_prof) {
        snprintf(msg, msg_size, "compression.policy=uncomp-stage needs stage boundaries: a "
                 "calibration profile or explicit stage_starts");
        return UC_ERR_UNAVAILABLE;
    }
    return UC_OK;
}

int64_t uc_engine_prefill_bytes(const struct uc_engine *e, const struct uc_compress_params *cp,
                                int64_t n_prompt)
{
    int64_t kvw = 2 * e->sh->n_heads_kv * e->cfg->head_dim;
    int64_t per_row = e->cfg->hidden + e->sh->qkv_dim; /* the residual stream and Q/K/V */
    if (uc_policy_cuts_rows(cp->policy)) {
        per_row += e->cfg->hidden; /* a stage cut's new residual stream beside the old one */
    }
    if (e->pipe_ends && uc_policy_uses_window(cp->policy)) {
        per_row += kvw; /* a pipelined layer end's K|V rows (pipeline.c) */
    }
    if (uc_policy_kvsharer(cp)) {
        /* KVSharer: each source layer's K|V rows, kept until the prefill ends */
        per_row += kvw * eng_kvshare_sources(e, cp);
    }
    return n_prompt * per_row * (int64_t)act_size(e);
}

/* Tokens per block of the heads of a sequence with these parameters (ThinK's packed heads
 * hold more). */
static int64_t seq_block_tokens(const struct uc_engine *e, const struct uc_compress_params *cp)
{
    int64_t d = e->cfg->head_dim;
    float ratio = uc_policy_think_ratio(cp);
    int64_t kdim = ratio > 0.0f ? uc_think_kdim(ratio, d) : d;
    return uc_kv_packed_tokens(e->kv.block_tokens, d, kdim < d ? kdim : 0);
}

/* Blocks a fork of a head of at most n tokens holds beside the ones it shares (appending): its
 * copy of the partly filled last block plus gen decoded tokens, at the worst fill of that block
 * (n mod tpb is not known before the prefill). */
static int64_t fork_private_blocks(int64_t tpb, int64_t n, int64_t gen)
{
    int64_t r = tpb - 1;
    r = n < r ? n : r;
    return (r + gen + tpb - 1) / tpb;
}

/* A KV head's budget under the plan (not capped by the prompt): known from the profile for
 * grouping=profile; with prompt grouping the entropies decide which head gets which of the
 * layer's group budgets, so the rank's r-th head (r = kv_head - kv0) is counted at the r-th
 * largest of them: the worst a rank can get, and at tp 1 the layer's exact total. */
static int64_t head_budget_bound(const struct uc_engine *e, const struct uc_step_new *n,
                                 int64_t layer, int64_t kv_head, int64_t kv0)
{
    const struct uc_compress_params *cp = &n->cp;
    int64_t b;
    switch (cp->policy) {
    case UC_POLICY_FULL: b = n->n_prompt; break;
    case UC_POLICY_PYRAMIDKV: b = uc_pyramid_budget(cp->kv_budget, layer, e->cfg->n_layers); break;
    case UC_POLICY_UNCOMP:
    case UC_POLICY_UNCOMP_STAGE:
        if (cp->grouping == UC_GROUPING_PROFILE && e->have_prof &&
            e->prof.head_groups == cp->head_groups) {
            b = uc_group_budget(cp->kv_budget,
                                e->prof.kv_group[layer * e->cfg->n_heads_kv + kv_head],
                                cp->head_groups, cp->spread);
        } else {
            b = uc_group_budget_nth(cp->kv_budget, e->cfg->n_heads_kv, cp->head_groups,
                                    cp->spread, kv_head - kv0);
        }
        break;
    default: b = cp->kv_budget; break;
    }
    return b;
}

/* The blocks a new sequence n holds at most, over every rank; with `fork`, the blocks a fork of
 * it holds beside the ones it shares with n. */
static int64_t blocks_needed(const struct uc_engine *e, const struct uc_step_new *n, bool fork)
{
    /* the most any rank needs: ranks hold different heads, and with them different budgets */
    int64_t worst = 0, gen = n->max_new_tokens;
    int64_t hkv = e->cfg->n_heads_kv, hkv_l = e->sh->n_heads_kv;
    bool evict = n->cp.decode_mode == UC_DECODE_EVICT && n->cp.policy != UC_POLICY_FULL;
    int16_t src_of[1024];
    const struct uc_share_pair *pairs = NULL;
    int32_t n_pairs = 0;
    if (uc_policy_kvsharer(&n->cp)) {
        eng_share_pairs_for(e, &n->cp, &pairs, &n_pairs);
    }
    uc_share_map(src_of, e->cfg->n_layers < 1024 ? e->cfg->n_layers : 1024, pairs, n_pairs);
    int16_t mc_partner[1024];
    int32_t mc_pairs = e->cfg->n_layers <= 1024 ? eng_mc_pairs_for(e, &n->cp, mc_partner, NULL) : 0;
    int64_t mc_tpb = uc_kv_merged_tokens(e->kv.block_tokens, e->cfg->head_dim);
    int64_t tpb0 = seq_block_tokens(e, &n->cp);
    int32_t lrank[UC_LORC_MAX_LAYERS];
    bool lorc = (n->cp.stages & UC_STAGE_LORC) && e->cfg->n_layers <= UC_LORC_MAX_LAYERS;
    if (lorc) {
        eng_lorc_ranks_for(e, &n->cp, lrank);
    }
    for (int64_t kv0 = 0; kv0 < hkv; kv0 += hkv_l) {
        int64_t total = 0;
        /* MiniCache: each pair's merged head holds at most the tokens both layers keep, while
         * the layers' own heads are counted whole below (a bound: merging moves tokens out of
         * them, and layer a is full until layer b merges) */
        for (int64_t l = 0; mc_pairs > 0 && l < e->cfg->n_layers; l++) {
            if (mc_partner[l] <= l) {
                continue;
            }
            for (int64_t j = kv0; j < kv0 + hkv_l; j++) {
                int64_t ba = head_budget_bound(e, n, l, j, kv0);
                int64_t bb = head_budget_bound(e, n, l + 1, j, kv0);
                int64_t m = ba < bb ? ba : bb;
                m = m < n->n_prompt ? m : n->n_prompt;
                total += fork ? (m > 0) : (m + mc_tpb - 1) / mc_tpb;
            }
        }
        for (int64_t l = 0; l < e->cfg->n_layers; l++) {
            if (l < 1024 && src_of[l] != l) {
                continue; /* a shared layer holds no blocks */
            }
            /* LoRC: the layer's latent rows hold more tokens per block */
            int64_t tpb = lorc && lrank[l] > 0
                              ? uc_kv_latent_tokens(e->kv.block_tokens, e->cfg->head_dim,
                                                    uc_kv_latent_width(lrank[l], act_size(e)))
                              : tpb0;
            for (int64_t j = kv0; j < kv0 + hkv_l; j++) {
                int64_t b = head_budget_bound(e, n, l, j, kv0);
                int64_t np = n->n_prompt;
                /* append: the prefill's share plus every decoded token; evict: the head grows
                 * to its budget (plus the token being placed) and stays there */
                int64_t tokens = evict ? (b + 1 < np + gen ? b + 1 : np + gen)
                                       : (b < np ? b : np) + gen;
                /* a fork copies the whole head at worst with eviction (uc_kv_head_remove
                 * unshares what it rewrites); appending, it copies the last block only */
                total += fork && !evict ? fork_private_blocks(tpb, tokens - gen, gen)
                                        : (tokens + tpb - 1) / tpb;
            }
        }
        worst = total > worst ? total : worst;
    }
    return worst;
}

int64_t uc_engine_kv_blocks_needed(const struct uc_engine *e, const struct uc_step_new *n)
{
    if (n->flags & UC_SEQ_FORK) {
        /* what the fork holds beside the blocks it shares with its source */
        const struct seq *src = eng_find_seq(e, n->fork_of);
        bool evict = src && src->rings;
        int64_t total = 0;
        for (int64_t i = 0; src && i < e->cfg->n_layers * e->sh->n_heads_kv; i++) {
            if (eng_layer_shared(src, i / e->sh->n_heads_kv)) {
                continue; /* a shared layer appends nothing */
            }
            const struct uc_kv_head *h = &src->kv.heads[i];
            int64_t nt = h->n_tokens, tpb = uc_kv_head_block_tokens(&e->kv, h);
            total += uc_kv_head_blocks_for(&e->kv, h, (evict ? nt : nt % tpb) +
                                                          n->max_new_tokens);
        }
        /* MiniCache's merged heads take no decoded tokens: a copy of a partly filled last
         * block each */
        for (int64_t i = e->cfg->n_layers * e->sh->n_heads_kv;
             src && i < src->kv.n_layers * e->sh->n_heads_kv; i++) {
            const struct uc_kv_head *h = &src->kv.heads[i];
            total += h->n_tokens % uc_kv_head_block_tokens(&e->kv, h) != 0;
        }
        return total;
    }
    return blocks_needed(e, n, false);
}

int64_t uc_engine_kv_fork_blocks_needed(const struct uc_engine *e, const struct uc_step_new *n)
{
    return blocks_needed(e, n, true);
}

/* Adds s to the engine's sequence table (which then owns it). */
static uc_status eng_seq_register(struct uc_engine *e, struct seq *s)
{
    if (!eng_grow((void **)&e->seqs, &e->cap_seqs, e->n_seqs + 1, sizeof *e->seqs)) {
        return UC_ERRF(UC_ERR_NOMEM, "sequence table");
    }
    uc_status rc = eng_seq_map_put(&e->seq_map, s);
    if (rc == UC_OK) {
        s->at = e->n_seqs;
        e->seqs[e->n_seqs++] = s;
    }
    return rc;
}

uc_status eng_seq_create(struct uc_engine *e, const struct uc_step_new *n)
{
    struct seq *s = uc_calloc(1, sizeof *s);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "sequence %lld", (long long)n->seq_id);
    }
    uc_status rc;
    int64_t L = e->cfg->n_layers, hkv_l = e->sh->n_heads_kv, np = n->n_prompt;
    s->id = n->seq_id;
    s->flags = n->flags;
    s->max_new = n->max_new_tokens;
    s->cp = n->cp;
    s->phase = UC_SEQ_PREFILLING;
    s->greedy = -1;
    s->n_prompt = np;
    s->n_rows = np;
    UC_CHECK(uc_plan_init(&s->plan, L, e->cfg->n_heads_kv), rc, out);
    UC_CHECK(eng_mc_seq_init(e, s, NULL), rc, out);
    /* MiniCache: a layer of merged heads per pair after the model's layers */
    UC_CHECK(uc_kv_seq_init(&s->kv, L + s->mc_n_pairs, hkv_l), rc, out);
    s->prompt = uc_malloc((size_t)np * sizeof(int32_t));
    s->pos = uc_malloc((size_t)np * sizeof(int32_t));
    s->layer_rows = uc_calloc((size_t)L, sizeof(int64_t));
    s->ent_min = uc_malloc((size_t)L * sizeof(double));
    s->ent_mean = uc_malloc((size_t)L * sizeof(double));
    s->ent_max = uc_malloc((size_t)L * sizeof(double));
    int64_t lrows = n->flags & UC_SEQ_ALL_LOGITS ? np : 1;
    s->logits = uc_malloc((size_t)(lrows * e->cfg->vocab) * sizeof(float));
    if (!s->prompt || !s->pos || !s->layer_rows || !s->ent_min || !s->ent_mean || !s->ent_max || !s->logits) {
        rc = UC_ERRF(UC_ERR_NOMEM, "sequence %lld tokens=%lld", (long long)n->seq_id,
                     (long long)np);
        goto out;
    }
    for (int64_t l = 0; l < L; l++) {
        s->ent_min[l] = s->ent_mean[l] = s->ent_max[l] = NAN;
    }
    if (n->flags & UC_SEQ_RECORD_KEPT) {
        s->kept = uc_calloc((size_t)(L * hkv_l), sizeof *s->kept);
        s->n_kept = uc_calloc((size_t)(L * hkv_l), sizeof *s->n_kept);
        s->rows_at = uc_calloc((size_t)L, sizeof *s->rows_at);
        if (!s->kept || !s->n_kept || !s->rows_at) {
            rc = UC_ERRF(UC_ERR_NOMEM, "sequence records");
            goto out;
        }
    }
    if (n->flags & UC_SEQ_SPECTRA) {
        s->qspec = uc_calloc((size_t)(L * e->cfg->n_heads * e->cfg->head_dim), sizeof(double));
        s->hspec = uc_calloc((size_t)(L * e->cfg->hidden), sizeof(double));
        if (!s->qspec || !s->hspec) {
            rc = UC_ERRF(UC_ERR_NOMEM, "sequence spectra");
            goto out;
        }
    }
    if (n->cp.decode_mode == UC_DECODE_EVICT && n->cp.policy != UC_POLICY_FULL) {
        s->rings = uc_calloc((size_t)(L * hkv_l), sizeof *s->rings);
        if (!s->rings) {
            rc = UC_ERRF(UC_ERR_NOMEM, "sequence rings");
            goto out;
        }
    }
    for (int64_t i = 0; i < np; i++) {
        s->pos[i] = (int32_t)i;
    }
    if (uc_policy_kvsharer(&s->cp)) {
        const struct uc_share_pair *pairs;
        int32_t n_pairs;
        eng_share_pairs_for(e, &s->cp, &pairs, &n_pairs);
        uc_share_map(s->plan.share_src, L, pairs, n_pairs);
        s->src_kv = uc_calloc((size_t)L, sizeof *s->src_kv);
        if (!s->src_kv) {
            rc = UC_ERRF(UC_ERR_NOMEM, "sequence kvsharer buffers");
            goto out;
        }
    }
    /* plan: stages now (they depend only on n0), budgets per layer as layers finish */
    if (uc_policy_cuts_rows(s->cp.policy)) {
        const int32_t *starts;
        int32_t ns = eng_stage_starts_for(e, &s->cp, &starts);
        s->plan.n_stage_starts = ns;
        int64_t min_rows = eng_max_group_budget(&s->cp) + s->cp.window;
        for (int32_t c = 0; c < ns; c++) {
            s->plan.stage_starts[c] = starts[c];
        }
        for (int32_t c = 0; c <= ns; c++) {
            s->plan.stage_rows[c] = uc_stage_rows(np, c, ns + 1, s->cp.r_min, min_rows);
        }
    } else {
        s->plan.stage_rows[0] = np;
    }
    UC_CHECK(eng_lorc_seq_init(e, s), rc, out);
    memcpy(s->prompt, n->prompt, (size_t)np * sizeof(int32_t));
    s->t_prefill_start = uc_time_s();
    UC_CHECK(eng_seq_register(e, s), rc, out);
    s = NULL;
out:
    eng_seq_destroy(e, s);
    return rc;
}

/* A copy of a decoding sequence: same plan, logits and cache contents. The cache shares the
 * source's full blocks (copy-on-write, kv_cache.h); each head's partly filled last block is
 * copied on the backend, so both go on appending into blocks of their own. */
uc_status eng_seq_fork(struct uc_engine *e, const struct uc_step_new *n)
{
    const struct seq *src = eng_find_seq(e, n->fork_of);
    int64_t L = e->cfg->n_layers, hkv = e->cfg->n_heads_kv, hkv_l = e->sh->n_heads_kv;
    uc_status rc;
    int32_t *dst_b = NULL, *src_b = NULL;
    struct seq *s = uc_calloc(1, sizeof *s);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "fork");
    }
    s->id = n->seq_id;
    s->flags = src->flags & ~(UC_SEQ_RECORD_KEPT | UC_SEQ_SPECTRA | UC_SEQ_CALIBRATE);
    s->max_new = n->max_new_tokens;
    s->cp = src->cp;
    s->phase = UC_SEQ_DECODING;
    s->n_prompt = src->n_prompt;
    s->n_ctx = src->n_ctx;
    s->n_rows = src->n_rows;
    s->layer = src->layer;
    s->prefill_ms = src->prefill_ms;
    s->compress_ms = src->compress_ms;
    s->mc_merged = src->mc_merged;
    s->mc_retained = src->mc_retained;
    s->mc_merged_all = src->mc_merged_all;
    s->mc_retained_all = src->mc_retained_all;
    UC_CHECK(uc_plan_init(&s->plan, L, hkv), rc, out);
    memcpy(s->plan.budget, src->plan.budget, (size_t)(L * hkv) * sizeof(int32_t));
    memcpy(s->plan.group, src->plan.group, (size_t)(L * hkv) * sizeof(int32_t));
    memcpy(s->plan.entropy, src->plan.entropy, (size_t)(L * hkv) * sizeof(double));
    s->plan.n_stage_starts = src->plan.n_stage_starts;
    memcpy(s->plan.stage_starts, src->plan.stage_starts, sizeof s->plan.stage_starts);
    memcpy(s->plan.stage_rows, src->plan.stage_rows, sizeof s->plan.stage_rows);
    memcpy(s->plan.share_src, src->plan.share_src, (size_t)L * sizeof *s->plan.share_src);
    UC_CHECK(eng_mc_seq_init(e, s, src), rc, out);
    UC_CHECK(uc_kv_seq_init(&s->kv, src->kv.n_layers, hkv_l), rc, out);
    s->layer_rows = uc_malloc((size_t)L * sizeof(int64_t));
    s->ent_min = uc_malloc((size_t)L * sizeof(double));
    s->ent_mean = uc_malloc((size_t)L * sizeof(double));
    s->ent_max = uc_malloc((size_t)L * sizeof(double));
    s->logits = uc_malloc((size_t)e->cfg->vocab * sizeof(float));
    if (!s->layer_rows || !s->ent_min || !s->ent_mean || !s->ent_max || !s->logits) {
        rc = UC_ERRF(UC_ERR_NOMEM, "fork");
        goto out;
    }
    memcpy(s->layer_rows, src->layer_rows, (size_t)L * sizeof(int64_t));
    memcpy(s->ent_min, src->ent_min, (size_t)L * sizeof(double));
    memcpy(s->ent_mean, src->ent_mean, (size_t)L * sizeof(double));
    memcpy(s->ent_max, src->ent_max, (size_t)L * sizeof(double));
    s->greedy = src->greedy;
    s->logits_rows = src->logits_rows > 0 ? 1 : 0;
    if (src->logits_rows > 0) {
        const float *sl = src->logits_ext ? src->logits_ext
                                          : src->logits + (src->logits_rows - 1) * e->cfg->vocab;
        memcpy(s->logits, sl, (size_t)e->cfg->vocab * sizeof(float));
    }
    /* full blocks are shared; each head's partly filled last block is copied */
    int64_t k = 0;
    int64_t n_heads_all = src->kv.n_layers * hkv_l; /* with MiniCache's merged heads */
    dst_b = uc_malloc((size_t)(n_heads_all + 1) * sizeof(int32_t));
    src_b = uc_malloc((size_t)(n_heads_all + 1) * sizeof(int32_t));
    if (!dst_b || !src_b) {
        rc = UC_ERRF(UC_ERR_NOMEM, "fork block lists");
        goto out;
    }
    for (int64_t i = 0; i < n_heads_all; i++) {
        rc = uc_kv_head_fork(&e->kv, &s->kv.heads[i], &src->kv.heads[i], dst_b, src_b, &k);
        if (rc == UC_ERR_KV_FULL) {
            UC_FATAL("kv pool exhausted forking seq=%lld (admission must reserve blocks)",
                     (long long)n->fork_of);
        }
        if (rc != UC_OK) {
            goto out;
        }
    }
    UC_CHECK(e->be->ops->kv_copy_blocks(e->be, &e->kv.pool, dst_b, src_b, k), rc, out);
    if (src->rings) {
        s->rings = uc_calloc((size_t)(L * hkv_l), sizeof *s->rings);
        if (!s->rings) {
            rc = UC_ERRF(UC_ERR_NOMEM, "fork rings");
            goto out;
        }
        for (int64_t i = 0; i < L * hkv_l; i++) {
            s->rings[i] = src->rings[i];
            size_t bytes = (size_t)(s->cp.window * src->rings[i].cap) * sizeof(float);
            s->rings[i].rows = uc_malloc(bytes ? bytes : 1);
            if (!s->rings[i].rows) {
                rc = UC_ERRF(UC_ERR_NOMEM, "fork rings");
                goto out;
            }
            memcpy(s->rings[i].rows, src->rings[i].rows, bytes);
        }
    }
    UC_CHECK(eng_seq_register(e, s), rc, out);
    s = NULL;
out:
    uc_free(dst_b);
    uc_free(src_b);
    eng_seq_destroy(e, s);
    return rc;
}
