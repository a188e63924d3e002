/* Engine benchmark (CPU or CUDA backend): prefill and decode tokens/s of a model at several
 * prompt lengths, as medians over repeated runs, with the fraction of this machine's measured
 * dense GEMM rate that the prefill reaches (FLOPs counted: 2 x parameters per token plus
 * attention's QK^T and PV over the causal triangle).
 * Usage: bench_engine [--model DIR] [--lengths 512,2048,4000] [--reps N] [--decode N]
 *                     [--backend cpu|cuda] [--policy NAME --kv-budget B] [--stage-starts 6,7]
 *                     [--r-min X] [--row-score sum|max|accum|accum-max] [--kv-mem-mib N]
 *                     [--peak-gflops G] [--lorc-ratio X]
 * --policy takes a spec with stages ("snapkv+lorc"). */
#include <cblas.h>
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

/* Measured sgemm rate of this machine (n x n x n, best of 5), GFLOP/s. */
static double sgemm_peak(void)
{
    int n = 2048;
    float *a = uc_malloc((size_t)n * n * sizeof(float));
    float *b = uc_malloc((size_t)n * n * sizeof(float));
    float *c = uc_malloc((size_t)n * n * sizeof(float));
    uc_test_fill(a, (int64_t)n * n, 1, 0, 0);
    uc_test_fill(b, (int64_t)n * n, 2, 0, 0);
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = uc_time_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c,
                    n);
        double t = uc_time_s() - t0;
        double g = 2.0 * n * n * (double)n / t / 1e9;
        best = g > best ? g : best;
    }
    uc_free(a);
    uc_free(b);
    uc_free(c);
    return best;
}

/* Resident anonymous memory of this process (the converted weights and buffers), bytes. */
static int64_t rss_anon_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int64_t kb = -1;
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "RssAnon: %ld kB", &kb) == 1) {
            break;
        }
    }
    if (f) {
        fclose(f);
    }
    return kb * 1024;
}

int main(int argc, char **argv)
{
    const char *model = "models/uncomp-tiny";
    const char *lengths = "512,2048,4000";
    const char *policy = "full";
    float lorc_ratio = 0.0f;
    int reps = 5, n_decode = 64, budget = 128;
    int64_t kv_mem = 0;
    const char *stage_arg = NULL, *row_score = NULL;
    float r_min = 0;
    double peak_arg = 0;
    enum uc_backend_kind bk = UC_BACKEND_CPU;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) {
            model = argv[i + 1];
        } else if (!strcmp(argv[i], "--lengths")) {
            lengths = argv[i + 1];
        } else if (!strcmp(argv[i], "--reps")) {
            reps = atoi(argv[i + 1]);
        } else if (!strcmp(argv[i], "--decode")) {
            n_decode = atoi(argv[i + 1]);
        } else if (!strcmp(argv[i], "--backend")) {
            uc_backend_parse(argv[i + 1], &bk);
        } else if (!strcmp(argv[i], "--policy")) {
            policy = argv[i + 1];
        } else if (!strcmp(argv[i], "--lorc-ratio")) {
            lorc_ratio = (float)atof(argv[i + 1]);
        } else if (!strcmp(argv[i], "--kv-budget")) {
            budget = atoi(argv[i + 1]);
        } else if (!strcmp(argv[i], "--stage-starts")) {
            stage_arg = argv[i + 1];
        } else if (!strcmp(argv[i], "--r-min")) {
            r_min = (float)atof(argv[i + 1]);
        } else if (!strcmp(argv[i], "--row-score")) {
            row_score = argv[i + 1];
        } else if (!strcmp(argv[i], "--kv-mem-mib")) {
            kv_mem = atoll(argv[i + 1]) << 20;
        } else if (!strcmp(argv[i], "--peak-gflops")) {
            peak_arg = atof(argv[i + 1]);
        }
    }
    struct uc_compress_params spec = uc_compress_default_params();
    char msg[512];
    if (uc_policy_spec_parse(policy, &spec, msg, sizeof msg) != UC_OK) {
        fprintf(stderr, "bench_engine: %s\n", msg);
        return 2;
    }
    struct uc_comm *comm;
    if (uc_comm_create(&comm, &argc, &argv, 600000) != UC_OK) {
        return 1;
    }
    uc_log_set_level(UC_LOG_LEVEL_WARN);
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = model;
    ep.backend.kind = bk;
    ep.kv_memory_bytes = kv_mem > 0 ? kv_mem : (bk == UC_BACKEND_CUDA ? 8LL << 30 : 512LL << 20);
    struct uc_engine *e;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        return 1;
    }
    /* every rank reports what it holds: its weight slices, and its resident memory */
    int64_t mine[2] = {(int64_t)uc_engine_weight_bytes(e), rss_anon_bytes()};
    int64_t *all = uc_malloc((size_t)(2 * uc_comm_size(comm)) * sizeof(int64_t));
    uc_comm_allgather(comm, mine, all, sizeof mine);
    if (uc_comm_rank(comm) != 0) {
        uc_free(all);
        uc_engine_serve(e);
        uc_engine_destroy(e);
        uc_comm_destroy(comm);
        return 0;
    }
    const struct uc_model_config *cfg = uc_engine_config(e);
    double peak = peak_arg > 0 ? peak_arg : (bk == UC_BACKEND_CPU ? sgemm_peak() : 0);
    struct uc_compress_params cp = uc_compress_default_params();
    cp.policy = spec.policy;
    cp.stages = spec.stages;
    cp.lorc_ratio = lorc_ratio;
    cp.kv_budget = budget;
    cp.grouping = UC_GROUPING_PROMPT;
    for (const char *s = stage_arg; s && *s && cp.n_stage_starts < UC_MAX_STAGES - 1;) {
        char *end;
        cp.stage_starts[cp.n_stage_starts++] = (int32_t)strtol(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') {
            break;
        }
    }
    if (r_min > 0) {
        cp.r_min = r_min;
    }
    enum uc_row_score rs;
    if (row_score && uc_row_score_parse(row_score, &rs)) {
        cp.row_score = (int32_t)rs;
    }
    if (cp.policy == UC_POLICY_UNCOMP_STAGE && cp.n_stage_starts == 0 && !uc_engine_profile(e)) {
        cp.n_stage_starts = 1;
        cp.stage_starts[0] = (int32_t)(cfg->n_layers * 3 / 4);
    }
    printf("# bench_engine model=%s backend=%s tp=%d policy=%s reps=%d\n", model,
           uc_backend_kind_name(bk), uc_comm_size(comm), policy, reps);
    if (peak > 0) {
        printf("# measured sgemm peak (2048^3, best of 5): %.1f GFLOP/s\n", peak);
    }
    for (int r = 0; r < uc_comm_size(comm); r++) {
        printf("# rank %d: weights %.2f MiB, resident anonymous memory %.1f MiB\n", r,
               (double)all[2 * r] / 1048576.0, (double)all[2 * r + 1] / 1048576.0);
    }
    uc_free(all);
    printf("%8s %14s %12s %10s %14s %12s\n", "prompt", "prefill_tok/s", "prefill_ms", "GFLOP/s",
           "frac_of_sgemm", "decode_tok/s");
    char *save = NULL;
    char *lens = uc_strdup(lengths);
    struct uc_rng rng;
    uc_rng_seed(&rng, 42);
    for (char *tokstr = strtok_r(lens, ",", &save); tokstr; tokstr = strtok_r(NULL, ",", &save)) {
        int64_t n = atoll(tokstr);
        if (n + n_decode > uc_engine_max_ctx(e)) {
            n = uc_engine_max_ctx(e) - n_decode;
        }
        int32_t *ids = uc_malloc((size_t)n * sizeof(int32_t));
        for (int64_t i = 0; i < n; i++) {
            ids[i] = (int32_t)(2 + uc_rng_next(&rng) % (uint64_t)(cfg->vocab - 2));
        }
        double *pt = uc_malloc((size_t)reps * sizeof(double));
        double *dt = uc_malloc((size_t)reps * sizeof(double));
        for (int r = 0; r < reps + 1; r++) { /* first run warms up */
            double t0 = uc_time_s();
            if (tu_prefill(e, 1, ids, n, 0, &cp, n_decode) != UC_OK) {
                return 1;
            }
            double t1 = uc_time_s();
            for (int k = 0; k < n_decode; k++) {
                tu_decode(e, 1, ids[k % n]);
            }
            double t2 = uc_time_s();
            tu_free(e, 1);
            if (r > 0) {
                pt[r - 1] = t1 - t0;
                dt[r - 1] = t2 - t1;
            }
        }
        double p = tu_median(pt, reps), d = tu_median(dt, reps);
        double gf = tu_prefill_flops(cfg, n) / p / 1e9;
        printf("%8lld %14.1f %12.1f %10.1f %14.3f %12.1f\n", (long long)n, (double)n / p, p * 1e3,
               gf, peak > 0 ? gf / peak : 0.0, n_decode / d);
        fflush(stdout);
        uc_free(ids);
        uc_free(pt);
        uc_free(dt);
    }
    uc_free(lens);
    uc_engine_shutdown(e);
    uc_engine_destroy(e);
    uc_comm_destroy(comm);
    return 0;
}
