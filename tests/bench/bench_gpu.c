/* GPU benchmark (issue: CUDA backend): a synthetic Llama-3-8B-shaped model with seeded random BF16
 * weights, measured against this GPU's own ceilings.
 *   1. Ceilings: device copy bandwidth and the BF16 GEMM rate (both measured here).
 *   2. Decode at batch 1: median step time vs the bandwidth floor (weight bytes / copy bandwidth).
 *   3. Prefill at each length: tokens/s and the fraction of the GEMM rate over the model's FLOPs.
 *   4. Long prompts, `full` vs `uncomp` at a mean budget of `--budget-frac` of the prompt: KV
 *      bytes per sequence, the largest batch the KV pool holds, and aggregate decode tokens/s at
 *      that batch (sequences are forks of one prefilled prompt: same cache size, no re-prefill);
 *      and the prefill time of `uncomp-stage` vs `full`.
 *   5. --decode-at B:CTX,...: decode step time at batch B with every sequence at context CTX
 *      (forks of one prefilled prompt, full cache): the decode floor of a serving workload
 *      (tests/bench/serve_gpu.py reads these lines). With --decode-distinct each sequence is a
 *      prompt of its own (B prefills): the K/V reads of served sequences, which forks' shared
 *      blocks turn into L2 hits.
 *   6. --methods SPEC,...: like 4 for each policy spec ("think", "snapkv+lorc", ...; token
 *      policies at --budget-frac): KV bytes per sequence, the batch the pool holds, aggregate
 *      decode tokens/s there (the KV methods' decode kernels at the batch their savings buy).
 * Every number is a median over --reps runs. Runs on the CPU backend too (small shapes).
 * Usage: bench_gpu [--model synthetic:llama3-8b] [--backend cuda] [--kv-mem-gib 48]
 *                  [--prefill 8192,32768] [--ctx 32768] [--budget-frac 0.1] [--reps 3]
 *                  [--decode-steps 32] [--max-batch 128] [--stage-starts 16,24] [--r-min 0.375]
 *                  [--decode-at 1:640,32:8256] [--skip-compress] [--prefill-policy full]
 *                  [--prefill-chunk 8192] [--decode-distinct] [--no-lookahead]
 *                  [--methods full,think,minicache,lorc,snapkv,snapkv+lorc]
 * (--prefill-policy: the prefill table's policy, at --budget-frac, prompt grouping) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"

struct opts {
    const char *model;
    enum uc_backend_kind backend;
    double kv_gib;
    int64_t prefill[8];
    int n_prefill;
    int64_t ctx;
    double budget_frac;
    enum uc_policy prefill_policy; /* the prefill table's policy (full) */
    int reps, decode_steps;
    int64_t max_batch;
    struct uc_compress_params stage;
    int64_t decode_at[16][2]; /* (batch, context) */
    int64_t prefill_chunk;    /* rows per sweep pass; 0: the daemon's default */
    int n_decode_at;
    bool decode_distinct; /* --decode-at batches of distinct prompts instead of forks */
    bool no_lookahead;    /* --no-lookahead: decode steps take their blocks in the step */
    const char *methods; /* policy specs, comma-separated (section 6) */
};

/* ---- ceilings --------------------------------------------------------------------------- */

/* Device-to-device copy bandwidth (bytes read + written per second), median of 10. */
static double copy_bandwidth(struct uc_backend *be)
{
    size_t bytes = be->kind == UC_BACKEND_CUDA ? (size_t)2 << 30 : (size_t)256 << 20;
    void *a = NULL, *b = NULL;
    if (be->ops->alloc(be, &a, bytes) != UC_OK || be->ops->alloc(be, &b, bytes) != UC_OK) {
        return 0;
    }
    double t[10];
    be->ops->copy(be, b, a, bytes);
    be->ops->sync(be);
    for (int i = 0; i < 10; i++) {
        double t0 = uc_time_s();
        be->ops->copy(be, b, a, bytes);
        be->ops->sync(be);
        t[i] = uc_time_s() - t0;
    }
    be->ops->free(be, a);
    be->ops->free(be, b);
    return 2.0 * (double)bytes / tu_median(t, 10);
}

/* Matrix-product rate on the shape of the 8B model's MLP at 8K tokens, median of 10. */
static double gemm_rate(struct uc_backend *be, int64_t m, int64_t n, int64_t k)
{
    void *x = NULL, *w = NULL, *y = NULL;
    size_t a = be->ops->act_size(be);
    if (be->ops->weight_random(be, &x, m, k, 1, 0.0f, 0.02f) != UC_OK ||
        be->ops->weight_random(be, &w, n, k, 2, 0.0f, 0.02f) != UC_OK ||
        be->ops->alloc(be, &y, (size_t)(m * n) * a) != UC_OK) {
        return 0;
    }
    double t[10];
    be->ops->matmul(be, y, x, w, m, n, k);
    be->ops->sync(be);
    for (int i = 0; i < 10; i++) {
        double t0 = uc_time_s();
        be->ops->matmul(be, y, x, w, m, n, k);
        be->ops->sync(be);
        t[i] = uc_time_s() - t0;
    }
    be->ops->weight_free(be, x);
    be->ops->weight_free(be, w);
    be->ops->free(be, y);
    return 2.0 * (double)m * (double)n * (double)k / tu_median(t, 10);
}

/* Bytes a decode step must read at batch 1: every layer's weights, the final norm, the LM head,
 * one embedding row. */
static double decode_weight_bytes(const struct uc_model_config *c, size_t act)
{
    double per_layer = (double)c->hidden * (double)(c->n_heads + 2 * c->n_heads_kv) * c->head_dim +
                       (double)c->n_heads * c->head_dim * c->hidden + 3.0 * c->hidden * c->ffn +
                       2.0 * c->hidden;
    return (per_layer * (double)c->n_layers + (double)c->vocab * c->hidden + 2.0 * c->hidden) *
           (double)act;
}

/* ---- runs ------------------------------------------------------------------------------- */

static int32_t *random_ids(int64_t n, int64_t vocab, uint64_t seed)
{
    struct uc_rng r;
    uc_rng_seed(&r, seed);
    int32_t *ids = uc_malloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) {
        ids[i] = (int32_t)(2 + uc_rng_next(&r) % (uint64_t)(vocab - 2));
    }
    return ids;
}

/* One decode step of `nb` sequences (ids base..base+nb-1), greedy on the device. */
static double decode_step(struct uc_engine *e, int64_t base, int64_t nb, int32_t token)
{
    struct uc_step_decode *d = uc_malloc((size_t)nb * sizeof *d);
    for (int64_t b = 0; b < nb; b++) {
        d[b] = (struct uc_step_decode){.seq_id = base + b, .token = token,
                                       .flags = UC_DECODE_GREEDY};
    }
    struct uc_step s = {.op = UC_STEP_RUN, .n_decode = (int32_t)nb, .decodes = d};
    double t0 = uc_time_s();
    uc_status rc = uc_engine_step(e, &s);
    double t = uc_time_s() - t0;
    uc_free(d);
    return rc == UC_OK ? t : -1;
}

static void free_range(struct uc_engine *e, int64_t base, int64_t n)
{
    int64_t *ids = uc_malloc((size_t)n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) {
        ids[i] = base + i;
    }
    struct uc_step s = {.op = UC_STEP_RUN, .n_free = (int32_t)n, .frees = ids};
    uc_engine_step(e, &s);
    uc_free(ids);
}

static void bench_decode(struct uc_engine *e, const struct opts *o, double bw)
{
    const struct uc_model_config *c = uc_engine_config(e);
    int32_t *ids = random_ids(512, c->vocab, 7);
    struct uc_compress_params full = uc_compress_default_params();
    tu_prefill(e, 1, ids, 512, 0, &full, o->decode_steps * 2 + 8);
    int n = o->decode_steps * 2;
    double *t = uc_malloc((size_t)n * sizeof(double));
    for (int i = 0; i < n; i++) {
        t[i] = decode_step(e, 1, 1, ids[i]);
    }
    free_range(e, 1, 1);
    double step = tu_median(t, n);
    double bytes = decode_weight_bytes(c, uc_engine_backend(e)->ops->act_size(uc_engine_backend(e)));
    double floor_s = bw > 0 ? bytes / bw : 0; /* reading the weights once at the copy's traffic rate */
    printf("decode batch=1 (context 512): step %.3f ms (%.1f tok/s); weights read %.2f GB, "
           "bandwidth floor %.3f ms -> %.2fx the floor\n",
           step * 1e3, 1.0 / step, bytes / 1e9, floor_s * 1e3, floor_s > 0 ? step / floor_s : 0);
    uc_free(t);
    uc_free(ids);
}

static void bench_prefill(struct uc_engine *e, const struct opts *o, double gemm)
{
    const struct uc_model_config *c = uc_engine_config(e);
    /* uncomp-stage takes its boundaries and r_min from --stage-starts / --r-min */
    struct uc_compress_params full = o->prefill_policy == UC_POLICY_UNCOMP_STAGE
                                         ? o->stage
                                         : uc_compress_default_params();
    full.policy = o->prefill_policy;
    full.grouping = UC_GROUPING_PROMPT;
    printf("%8s %14s %12s %10s %12s%s%s\n", "prompt", "prefill_tok/s", "prefill_ms", "TFLOP/s",
           "frac_gemm", o->prefill_policy == UC_POLICY_FULL ? "" : "  policy ",
           o->prefill_policy == UC_POLICY_FULL ? "" : uc_policy_name(o->prefill_policy));
    for (int i = 0; i < o->n_prefill; i++) {
        int64_t n = o->prefill[i] < uc_engine_max_ctx(e) ? o->prefill[i] : uc_engine_max_ctx(e);
        int32_t *ids = random_ids(n, c->vocab, 11 + (uint64_t)i);
        full.kv_budget = (int32_t)((double)n * o->budget_frac + 0.5);
        double *t = uc_malloc((size_t)(o->reps + 1) * sizeof(double));
        for (int r = 0; r <= o->reps; r++) {
            double t0 = uc_time_s();
            uc_status rc = tu_prefill(e, 1, ids, n, 0, &full, 1);
            double dt = uc_time_s() - t0;
            if (rc != UC_OK) { /* a refused request would time as a prefill of nothing */
                fprintf(stderr, "bench_gpu: prefill of %lld tokens failed: %s\n", (long long)n,
                        uc_status_str(rc));
                exit(1);
            }
            free_range(e, 1, 1);
            if (r > 0) {
                t[r - 1] = dt;
            }
        }
        /* a long run (8 reps or more): its first 3 prefills (the burst bench_gpu's short runs
         * see) against its second half (the clocks a sustained load gets under the power cap) */
        double burst = 0.0, late = 0.0;
        int n_late = o->reps - o->reps / 2;
        if (o->reps >= 8) {
            double *c2 = uc_malloc((size_t)o->reps * sizeof(double));
            memcpy(c2, t, (size_t)o->reps * sizeof(double));
            burst = tu_median(c2, 3);
            late = tu_median(c2 + o->reps / 2, n_late);
            uc_free(c2);
        }
        double p = tu_median(t, o->reps);
        double tf = tu_prefill_flops(c, n) / p / 1e12;
        printf("%8lld %14.0f %12.1f %10.1f %12.3f\n", (long long)n, (double)n / p, p * 1e3, tf,
               gemm > 0 ? tf * 1e12 / gemm : 0.0);
        if (burst > 0.0) {
            printf("%8s first 3: %.0f tok/s (%.1f ms); last %d: %.0f tok/s (%.1f ms), %.3f of "
                   "the first\n",
                   "", (double)n / burst, burst * 1e3, n_late, (double)n / late, late * 1e3,
                   burst / late);
        }
        fflush(stdout);
        uc_free(t);
        uc_free(ids);
    }
}

/* Forks sequence `base` (prefilled, decoding) into base+1 .. base+want-1, as many as the pool
 * holds; returns the batch (base included). */
static int64_t fork_batch(struct uc_engine *e, int64_t base, int64_t want, int gen,
                          const struct uc_compress_params *cp)
{
    struct uc_step_new f = {.flags = UC_SEQ_FORK, .fork_of = base, .max_new_tokens = gen,
                            .cp = *cp};
    int64_t per_seq = uc_engine_kv_blocks_needed(e, &f);
    for (int64_t i = 1; i < want; i++) {
        f.seq_id = base + i;
        struct uc_step s = {.op = UC_STEP_RUN, .n_new = 1, .news = &f};
        if (uc_engine_kv_blocks_used(e) + per_seq > uc_engine_kv_blocks_total(e) ||
            uc_engine_step(e, &s) != UC_OK) {
            return i;
        }
    }
    return want;
}

/* Sequences base + 1 .. base + want - 1 as prompts of their own (ctx random ids each), as long
 * as the pool holds them; returns the batch (with base). */
static int64_t distinct_batch(struct uc_engine *e, int64_t base, int64_t want, int64_t ctx,
                              int gen, const struct uc_compress_params *cp)
{
    const struct uc_model_config *c = uc_engine_config(e);
    struct uc_step_new nw = {.max_new_tokens = gen, .cp = *cp, .n_prompt = ctx};
    int64_t per_seq = uc_engine_kv_blocks_needed(e, &nw);
    for (int64_t i = 1; i < want; i++) {
        if (uc_engine_kv_blocks_used(e) + per_seq > uc_engine_kv_blocks_total(e)) {
            return i;
        }
        int32_t *ids = random_ids(ctx, c->vocab, 1000 + (uint64_t)i);
        uc_status rc = tu_prefill(e, base + i, ids, ctx, 0, cp, gen);
        uc_free(ids);
        if (rc != UC_OK) {
            return i;
        }
    }
    return want;
}

/* The median decode step (seconds) of the batch base .. base+nb-1 over o->decode_steps steps;
 * *host_ms (when not NULL): the median and the largest of the engine's host time before the
 * layers (uc_engine_step_info.decode_prep_ms; the largest is a block-boundary step). */
static double median_step(struct uc_engine *e, const struct opts *o, int64_t base, int64_t nb,
                          const int32_t *tokens, double host_ms[2])
{
    double *t = uc_malloc((size_t)o->decode_steps * sizeof(double));
    double *h = uc_malloc((size_t)o->decode_steps * sizeof(double));
    double hmax = 0;
    for (int k = 0; k < o->decode_steps; k++) {
        t[k] = decode_step(e, base, nb, tokens[k]);
        struct uc_engine_step_info info;
        uc_engine_last_step_info(e, &info);
        h[k] = info.decode_prep_ms;
        hmax = h[k] > hmax ? h[k] : hmax;
    }
    double step = tu_median(t, o->decode_steps);
    if (host_ms) {
        host_ms[0] = tu_median(h, o->decode_steps);
        host_ms[1] = hmax;
    }
    uc_free(t);
    uc_free(h);
    return step;
}

/* Prefill one long prompt with cp, fork it to the largest batch the pool holds, decode. */
static void bench_batch(struct uc_engine *e, const struct opts *o, const char *label,
                        const struct uc_compress_params *cp, const int32_t *ids, double *prefill_ms)
{
    int64_t n = o->ctx;
    int gen = o->decode_steps + 2;
    double t0 = uc_time_s();
    if (tu_prefill(e, 1000, ids, n, 0, cp, gen) != UC_OK) {
        printf("%s: prefill failed\n", label);
        return;
    }
    *prefill_ms = (uc_time_s() - t0) * 1e3;
    struct uc_compress_report r;
    uc_engine_seq_report(e, 1000, &r);
    struct uc_step_new f = {.flags = UC_SEQ_FORK, .fork_of = 1000, .max_new_tokens = gen,
                            .cp = *cp};
    /* what one such sequence holds on its own (its prompt's blocks, the only ones in use now,
     * and its decode growth): the forks share the prompt's, which a served batch would not */
    int64_t per_seq = uc_engine_kv_blocks_used(e) + uc_engine_kv_blocks_needed(e, &f);
    int64_t fit = uc_engine_kv_blocks_total(e) / (per_seq > 0 ? per_seq : 1);
    /* the prefilled sequence holds its blocks already: fork batch - 1 copies */
    int64_t batch = fork_batch(e, 1000, fit < o->max_batch ? fit : o->max_batch, gen, cp);
    double step = median_step(e, o, 1000, batch, ids, NULL);
    printf("%-16s kv_bytes/seq %8.1f MiB (%.4f of full) | pool fits %4lld seqs (limit %lld) | "
           "batch %4lld: step %7.2f ms, %8.0f tok/s aggregate | prefill %.0f ms\n",
           label, (double)r.kv_bytes_kept / 1048576.0,
           r.kv_bytes_full > 0 ? (double)r.kv_bytes_kept / (double)r.kv_bytes_full : 0.0,
           (long long)fit,
           (long long)o->max_batch, (long long)batch, step * 1e3, (double)batch / step,
           *prefill_ms);
    fflush(stdout);
    free_range(e, 1000, batch);
}

/* Decode steps at batch `want` with every sequence at context `ctx`: one prompt prefilled, forked
 * to the batch (fewer when the pool or --max-batch holds fewer; the line says so). */
static void bench_decode_at(struct uc_engine *e, const struct opts *o, int64_t want, int64_t ctx)
{
    const struct uc_model_config *c = uc_engine_config(e);
    int gen = o->decode_steps + 2;
    if (ctx > uc_engine_max_ctx(e) - gen) {
        ctx = uc_engine_max_ctx(e) - gen;
    }
    int32_t *ids = random_ids(ctx, c->vocab, 123);
    struct uc_compress_params full = uc_compress_default_params();
    if (tu_prefill(e, 3000, ids, ctx, 0, &full, gen) != UC_OK) {
        printf("decode batch=%lld context=%lld: prefill failed\n", (long long)want,
               (long long)ctx);
        uc_free(ids);
        return;
    }
    int64_t cap = want < o->max_batch ? want : o->max_batch;
    int64_t batch = o->decode_distinct ? distinct_batch(e, 3000, cap, ctx, gen, &full)
                                       : fork_batch(e, 3000, cap, gen, &full);
    double host[2];
    double step = median_step(e, o, 3000, batch, ids, host);
    printf("decode batch=%lld context=%lld%s: step %.3f ms (%.0f tok/s aggregate; host before the "
           "layers median %.3f ms, most %.3f)", (long long)batch, (long long)ctx,
           o->decode_distinct ? " distinct" : "", step * 1e3, (double)batch / step, host[0],
           host[1]);
    if (batch < want) {
        printf("; asked for batch %lld, the pool / --max-batch holds %lld", (long long)want,
               (long long)batch);
    }
    printf("\n");
    fflush(stdout);
    free_range(e, 3000, batch);
    uc_free(ids);
}

/* The long prompts' length of sections 4 and 6: --ctx, within the model's context. */
static int64_t long_ctx(const struct uc_engine *e, const struct opts *o)
{
    int64_t most = uc_engine_max_ctx(e) - o->decode_steps - 4;
    return o->ctx < most ? o->ctx : most;
}

/* Section 6: each policy spec of o->methods in turn, as bench_batch measures it. */
static void bench_methods(struct uc_engine *e, const struct opts *o)
{
    const struct uc_model_config *c = uc_engine_config(e);
    struct opts o2 = *o;
    o2.ctx = long_ctx(e, o);
    int32_t *ids = random_ids(o2.ctx, c->vocab, 77);
    int32_t budget = (int32_t)((double)o2.ctx * o->budget_frac + 0.5);
    printf("\n# methods: %lld-token prompts, KV pool %.1f GiB per rank, token policies at %d "
           "(%.0f%%), batch limit %lld\n",
           (long long)o2.ctx, o->kv_gib, budget, o->budget_frac * 100, (long long)o->max_batch);
    char spec[64];
    for (const char *s = o->methods; *s;) {
        size_t n = strcspn(s, ",");
        snprintf(spec, sizeof spec, "%.*s", (int)n, s);
        struct uc_compress_params cp = tu_spec(spec, budget);
        double pf = 0;
        bench_batch(e, &o2, spec, &cp, ids, &pf);
        s += n + (s[n] == ',');
    }
    uc_free(ids);
}

static void bench_compress(struct uc_engine *e, const struct opts *o)
{
    const struct uc_model_config *c = uc_engine_config(e);
    int64_t n = long_ctx(e, o);
    struct opts o2 = *o;
    o2.ctx = n;
    int32_t *ids = random_ids(n, c->vocab, 99);
    struct uc_compress_params full = uc_compress_default_params();
    struct uc_compress_params unc = uc_compress_default_params();
    unc.policy = UC_POLICY_UNCOMP;
    unc.grouping = UC_GROUPING_PROMPT;
    unc.kv_budget = (int32_t)((double)n * o->budget_frac + 0.5);
    struct uc_compress_params stg = o->stage;
    stg.policy = UC_POLICY_UNCOMP_STAGE;
    stg.grouping = UC_GROUPING_PROMPT;
    stg.kv_budget = unc.kv_budget;
    printf("\n# %lld-token prompts, KV pool %.1f GiB per rank; uncomp mean budget %d (%.0f%%)\n",
           (long long)n, o->kv_gib, unc.kv_budget, o->budget_frac * 100);
    double pf_full = 0, pf_unc = 0, pf_stage = 0;
    bench_batch(e, &o2, "full", &full, ids, &pf_full);
    bench_batch(e, &o2, "uncomp", &unc, ids, &pf_unc);
    /* prefill times alone, the three policies in turn in each repetition (uncomp-stage's cache
     * is uncomp's, so only its prefill is timed) */
    double t[3][8];
    const struct uc_compress_params *pol[3] = {&stg, &full, &unc};
    int reps = o->reps < 8 ? o->reps : 8;
    for (int r = 0; r < reps; r++) {
        for (int i = 0; i < 3; i++) {
            double t0 = uc_time_s();
            tu_prefill(e, 1, ids, n, 0, pol[i], 1);
            t[i][r] = uc_time_s() - t0;
            free_range(e, 1, 1);
        }
    }
    pf_stage = tu_median(t[0], reps) * 1e3;
    pf_full = tu_median(t[1], reps) * 1e3;
    pf_unc = tu_median(t[2], reps) * 1e3;
    /* the arithmetic the stages remove: rows per stage as the engine computes them */
    int64_t rows[UC_MAX_STAGES + 1];
    int32_t n_stages = stg.n_stage_starts + 1;
    int64_t min_rows = uc_group_budget(stg.kv_budget, stg.head_groups - 1, stg.head_groups,
                                       stg.spread) + stg.window;
    for (int32_t i = 0; i < n_stages; i++) {
        rows[i] = uc_stage_rows(n, i, n_stages, stg.r_min, min_rows);
    }
    double theory = tu_prefill_flops(c, n) /
                    tu_prefill_flops_staged(c, n, stg.stage_starts, stg.n_stage_starts, rows);
    printf("uncomp-stage prefill (stages at");
    for (int32_t i = 0; i < stg.n_stage_starts; i++) {
        printf(" %d", stg.stage_starts[i]);
    }
    printf(", r_min %.3f): %.0f ms vs full %.0f ms -> %.2fx; its FLOPs allow %.2fx (%.0f%% of "
           "it realised)\n",
           (double)stg.r_min, pf_stage, pf_full, pf_full / pf_stage, theory,
           100.0 * (pf_full / pf_stage - 1.0) / (theory - 1.0));
    printf("uncomp prefill at %.0f%%: %.0f ms vs full %.0f ms -> %.3fx full's time\n",
           o->budget_frac * 100, pf_unc, pf_full, pf_unc / pf_full);
    uc_free(ids);
}

int main(int argc, char **argv)
{
    struct opts o = {.model = "synthetic:llama3-8b", .backend = UC_BACKEND_CUDA, .kv_gib = 48,
                     .ctx = 32768, .budget_frac = 0.10, .reps = 3, .decode_steps = 32,
                     .max_batch = 128};
    o.n_prefill = 2;
    o.prefill[0] = 8192;
    o.prefill[1] = 32768;
    o.stage = uc_compress_default_params();
    bool skip_compress = false;
    const char *stage_starts = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--skip-compress")) {
            skip_compress = true;
            continue;
        }
        if (!strcmp(a, "--decode-distinct")) {
            o.decode_distinct = true;
            continue;
        }
        if (!strcmp(a, "--no-lookahead")) {
            o.no_lookahead = true;
            continue;
        }
        i++;
        if (!strcmp(a, "--model")) {
            o.model = v;
        } else if (!strcmp(a, "--backend")) {
            uc_backend_parse(v, &o.backend);
        } else if (!strcmp(a, "--kv-mem-gib")) {
            o.kv_gib = atof(v);
        } else if (!strcmp(a, "--prefill")) {
            o.n_prefill = 0;
            for (const char *s = v; *s && o.n_prefill < 8;) {
                char *end;
                o.prefill[o.n_prefill++] = strtoll(s, &end, 10);
                s = *end == ',' ? end + 1 : end;
                if (*end && *end != ',') {
                    break;
                }
            }
        } else if (!strcmp(a, "--ctx")) {
            o.ctx = atoll(v);
        } else if (!strcmp(a, "--budget-frac")) {
            o.budget_frac = atof(v);
        } else if (!strcmp(a, "--prefill-policy")) {
            if (!uc_policy_parse(v, &o.prefill_policy)) {
                fprintf(stderr, "bench_gpu: unknown policy %s\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--reps")) {
            o.reps = atoi(v);
        } else if (!strcmp(a, "--decode-steps")) {
            o.decode_steps = atoi(v);
        } else if (!strcmp(a, "--max-batch")) {
            o.max_batch = atoll(v);
        } else if (!strcmp(a, "--prefill-chunk")) {
            o.prefill_chunk = atoll(v);
        } else if (!strcmp(a, "--stage-starts")) {
            stage_starts = v;
        } else if (!strcmp(a, "--methods")) {
            o.methods = v;
        } else if (!strcmp(a, "--r-min")) {
            o.stage.r_min = (float)atof(v);
        } else if (!strcmp(a, "--decode-at")) {
            o.n_decode_at = 0;
            for (const char *s = v; *s && o.n_decode_at < 16;) {
                char *end;
                int64_t b = strtoll(s, &end, 10);
                if (*end != ':' || b < 1) {
                    fprintf(stderr, "bench_gpu: --decode-at expects B:CTX[,B:CTX...]\n");
                    return 2;
                }
                int64_t n = strtoll(end + 1, &end, 10);
                if (n < 1 || (*end && *end != ',')) {
                    fprintf(stderr, "bench_gpu: --decode-at expects B:CTX[,B:CTX...]\n");
                    return 2;
                }
                o.decode_at[o.n_decode_at][0] = b;
                o.decode_at[o.n_decode_at][1] = n;
                o.n_decode_at++;
                s = *end == ',' ? end + 1 : end;
            }
        } else {
            fprintf(stderr, "bench_gpu: unknown option %s\n", a);
            return 2;
        }
    }
    struct uc_comm *comm;
    if (uc_comm_create(&comm, &argc, &argv, 600000) != UC_OK) {
        return 1;
    }
    uc_log_set_level(UC_LOG_LEVEL_WARN);
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = o.model;
    ep.backend.kind = o.backend;
    ep.kv_memory_bytes = (int64_t)(o.kv_gib * 1073741824.0);
    ep.prefill_chunk = o.prefill_chunk > 0                ? o.prefill_chunk
                       : o.backend == UC_BACKEND_CUDA ? 8192
                                                      : 512;
    ep.max_batch = o.max_batch;
    ep.no_lookahead = o.no_lookahead;
    ep.profile_path = "/nonexistent/uncomp_profile.json";
    struct uc_engine *e;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        fprintf(stderr, "bench_gpu: cannot create the engine\n");
        return 1;
    }
    if (uc_comm_rank(comm) != 0) {
        uc_engine_serve(e);
        uc_engine_destroy(e);
        uc_comm_destroy(comm);
        return 0;
    }
    const struct uc_model_config *c = uc_engine_config(e);
    if (stage_starts) {
        for (const char *s = stage_starts; *s && o.stage.n_stage_starts < UC_MAX_STAGES - 1;) {
            char *end;
            o.stage.stage_starts[o.stage.n_stage_starts++] = (int32_t)strtol(s, &end, 10);
            s = *end == ',' ? end + 1 : end;
            if (*end && *end != ',') {
                break;
            }
        }
    } else {
        o.stage.n_stage_starts = 2;
        o.stage.stage_starts[0] = (int32_t)(c->n_layers / 2);
        o.stage.stage_starts[1] = (int32_t)(c->n_layers * 3 / 4);
    }
    struct uc_backend *be = uc_engine_backend(e);
    double bw = copy_bandwidth(be);
    int64_t gm = be->kind == UC_BACKEND_CUDA ? 8192 : 512;
    double gemm = gemm_rate(be, gm, c->ffn, c->hidden);
    printf("# bench_gpu model=%s backend=%s device=%s tp=%d reps=%d\n", o.model,
           uc_backend_kind_name(o.backend), be->device_name, uc_comm_size(comm), o.reps);
    printf("# weights per rank %.2f GiB; measured copy bandwidth %.0f GB/s (read+write); "
           "measured GEMM %lldx%lldx%lld %.1f TFLOP/s\n",
           (double)uc_engine_weight_bytes(e) / 1073741824.0, bw / 1e9, (long long)gm,
           (long long)c->ffn, (long long)c->hidden, gemm / 1e12);
    bench_decode(e, &o, bw);
    bench_prefill(e, &o, gemm);
    for (int i = 0; i < o.n_decode_at; i++) {
        bench_decode_at(e, &o, o.decode_at[i][0], o.decode_at[i][1]);
    }
    if (!skip_compress) {
        bench_compress(e, &o);
    }
    if (o.methods) {
        bench_methods(e, &o);
    }
    uc_engine_shutdown(e);
    uc_engine_destroy(e);
    uc_comm_destroy(comm);
    return 0;
}
