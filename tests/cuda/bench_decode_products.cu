/* bench_decode_products: two questions about the products of a decode step at batch 32 (workload
 * b of issue 11, Llama-3-8B: qkv 6144x4096, o 4096x4096, gate|up 28672x4096, down 4096x14336),
 * which run on cuBLAS at 2.5-3.9 TB/s where the device reads 4.5 and lose ~6 us each whatever
 * their size (tests/cuda/NOTES.md, calls K1 and O1):
 *
 * 1. search: is there a cuBLASLt configuration faster than cublasGemmEx's pick? Every algorithm
 *    the library lists for bf16 x bf16 -> bf16 with float32 sums, with every tile and (up to
 *    four of its) stage counts, then split-K and its reduction schemes and CTA swizzling on the
 *    best of those, as cublasLtMatmulAlgoCheck accepts them. The earlier looks (E1, K1) tried only
 *    the heuristic's candidates. Each configuration is timed as a CUDA graph of back-to-back
 *    products over copies of the weights that together exceed L2 several times (as a decode
 *    step reads them: once each, from memory), median of SAMPLES graph launches. The best one's
 *    output is compared with cublasGemmEx's.
 *
 * 2. chain: does asking L2 for the first bytes of a product's weights, from the small kernel
 *    that runs before it (the norm before qkv and gate|up, swiglu before down), shorten a decode
 *    layer? One layer's kernels as the engine runs them at 32 rows (norm, qkv, a stand-in for
 *    attention's output write, o with the residual in its epilogue, norm, gate|up, swiglu,
 *    down with the residual), the small kernels as programmatic dependent launches, LAYERS
 *    layers of distinct weights in one CUDA graph. Variants: the prefetched bytes (--prefetch-mb)
 *    as the head of the weights or spread as the first bytes of every weight row, and the
 *    products on cublasGemmEx or on the search's best configuration.
 *
 * Usage: bench_decode_products [--rows 32] [--search-s 20] [--prefetch-mb 0,4,8,16,32]
 *                              [--no-search] [--no-chain]
 * Prints medians in us and TB/s of the weights read; the chain's per-layer time against the
 * baseline's (cublasGemmEx, nothing prefetched) in the same run. Needs an sm_90 GPU for the
 * chain's programmatic launches (it runs without them elsewhere). */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.cuh" /* the kernels' programmatic-launch and L2 helpers (shard/kernels) */

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define SAMPLES 9            /* graph launches timed per configuration (median) */
#define WS_BYTES (32u << 20) /* the backend's cuBLAS workspace (BLAS_WS_BYTES) */
#define COPY_BYTES (256u << 20) /* weights cycled per shape: several times L2 */
#define LAYERS 8             /* the chain's layers of distinct weights */
#define MAX_STAGES 4         /* stage counts tried per tile */
#define TOP_FOR_SPLIT 6      /* phase-1 configurations that phase 2 tries split-K on */

static void check_cuda(cudaError_t e, const char *what, int line)
{
    if (e != cudaSuccess) {
        fprintf(stderr, "FATAL: %s (line %d): %s\n", what, line, cudaGetErrorString(e));
        exit(1);
    }
}
static void check_blas(cublasStatus_t s, const char *what, int line)
{
    if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "FATAL: %s (line %d): cuBLAS status %d\n", what, line, (int)s);
        exit(1);
    }
}
#define CK(x) check_cuda((x), #x, __LINE__)
#define BK(x) check_blas((x), #x, __LINE__)

struct shape {
    const char *name;
    int n, k;
    float beta; /* o and down take the residual in the epilogue, as matmul_residual does */
};
static const shape SHAPES[] = {{"qkv", 6144, 4096, 0.0f},
                               {"o", 4096, 4096, 1.0f},
                               {"gate+up", 28672, 4096, 0.0f},
                               {"down", 4096, 14336, 1.0f}};
#define N_SHAPES 4

/* A configuration: cublasGemmEx's pick (lt = false) or a cuBLASLt algorithm as configured. */
struct config {
    bool lt;
    cublasLtMatmulAlgo_t algo;
    int id, tile, stages, splitk, red, swizzle, custom;
    double us;
};

struct ctx {
    cudaStream_t st;
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    void *ws;
    int t;
};

/* Deterministic bf16 values in [-scale, scale), made on the device (the backend's generator). */
static void fill(void *dev, size_t n, uint64_t seed, float scale)
{
    CK(uc_cuda_weight_random(dev, (int64_t)n, seed, 0.0f, scale / sqrtf(3.0f), UC_CUDA_BF16, 0));
    CK(cudaDeviceSynchronize()); /* the benchmark's stream does not wait on the legacy one */
}

static void *dalloc(size_t bytes)
{
    void *p = nullptr;
    CK(cudaMalloc(&p, bytes));
    return p;
}

/* row-major y (T, N) = x (T, K) w^T + beta y is column-major y^T (N, T) = w (K, N)^T x^T */
struct layouts {
    cublasLtMatrixLayout_t a, b, c;
};
static layouts make_layouts(int t, int n, int k)
{
    layouts l;
    BK(cublasLtMatrixLayoutCreate(&l.a, CUDA_R_16BF, (uint64_t)k, (uint64_t)n, k));
    BK(cublasLtMatrixLayoutCreate(&l.b, CUDA_R_16BF, (uint64_t)k, (uint64_t)t, k));
    BK(cublasLtMatrixLayoutCreate(&l.c, CUDA_R_16BF, (uint64_t)n, (uint64_t)t, n));
    return l;
}
static void free_layouts(layouts &l)
{
    cublasLtMatrixLayoutDestroy(l.a);
    cublasLtMatrixLayoutDestroy(l.b);
    cublasLtMatrixLayoutDestroy(l.c);
}

/* Enqueues y = x w^T + beta y with configuration c; false where the library refuses it. */
static bool product(const ctx &cx, const config &c, const layouts &l, void *y, const void *x,
                    const void *w, int n, int k, float beta)
{
    const float alpha = 1.0f;
    if (!c.lt) {
        return cublasGemmEx(cx.blas, CUBLAS_OP_T, CUBLAS_OP_N, n, cx.t, k, &alpha, w, CUDA_R_16BF,
                            k, x, CUDA_R_16BF, k, &beta, y, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
    }
    return cublasLtMatmul(cx.lt, cx.desc, &alpha, w, l.a, x, l.b, &beta, y, l.c, y, l.c, &c.algo,
                          cx.ws, WS_BYTES, cx.st) == CUBLAS_STATUS_SUCCESS;
}

/* The median of SAMPLES timed launches of ge on st, in ms (after a warm-up launch by the
 * caller); destroys ge and g. */
static double graph_median_ms(cudaGraphExec_t ge, cudaGraph_t g, cudaStream_t st)
{
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    double t[SAMPLES];
    for (int i = 0; i < SAMPLES; i++) {
        CK(cudaEventRecord(a, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms = 0.0f;
        CK(cudaEventElapsedTime(&ms, a, b));
        t[i] = ms;
    }
    std::sort(t, t + SAMPLES);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    return t[SAMPLES / 2];
}

/* Median time of one product (us): a graph of `reps` passes over the weight copies. A negative
 * result: the configuration failed to run or to capture. */
static double time_config(const ctx &cx, const config &c, const layouts &l, void *y,
                          const void *x, void *const *w, int copies, const shape &s)
{
    const int reps = 2;
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    bool ok = true;
    CK(cudaStreamBeginCapture(cx.st, cudaStreamCaptureModeThreadLocal));
    for (int r = 0; r < reps && ok; r++) {
        for (int i = 0; i < copies && ok; i++) {
            ok = product(cx, c, l, y, x, w[i], s.n, s.k, s.beta);
        }
    }
    cudaError_t e = cudaStreamEndCapture(cx.st, &g);
    if (!ok || e != cudaSuccess || cudaGraphInstantiate(&ge, g, 0) != cudaSuccess) {
        if (g) {
            cudaGraphDestroy(g);
        }
        (void)cudaGetLastError();
        return -1.0;
    }
    /* warm-up; a configuration the library accepted may still fail to launch */
    if (cudaGraphLaunch(ge, cx.st) != cudaSuccess || cudaStreamSynchronize(cx.st) != cudaSuccess) {
        (void)cudaGetLastError();
        cudaGraphExecDestroy(ge);
        cudaGraphDestroy(g);
        return -1.0;
    }
    return graph_median_ms(ge, g, cx.st) * 1e3 / (reps * copies);
}

template <typename V>
static std::vector<V> cap_list(const cublasLtMatmulAlgo_t &a, cublasLtMatmulAlgoCapAttributes_t at)
{
    size_t bytes = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(&a, at, nullptr, 0, &bytes) != CUBLAS_STATUS_SUCCESS ||
        bytes == 0) {
        return {};
    }
    std::vector<V> v(bytes / sizeof(V));
    if (cublasLtMatmulAlgoCapGetAttribute(&a, at, v.data(), bytes, &bytes) !=
        CUBLAS_STATUS_SUCCESS) {
        return {};
    }
    return v;
}

template <typename V>
static V cap_value(const cublasLtMatmulAlgo_t &a, cublasLtMatmulAlgoCapAttributes_t at, V dflt)
{
    V v = dflt;
    size_t got = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(&a, at, &v, sizeof v, &got) != CUBLAS_STATUS_SUCCESS) {
        return dflt;
    }
    return v;
}

/* Sets c's fields on c.algo (initialised for c.id); false where the library refuses them. */
static bool configure(const ctx &cx, config &c, const layouts &l)
{
    if (cublasLtMatmulAlgoInit(cx.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF,
                               CUDA_R_16BF, CUDA_R_16BF, c.id, &c.algo) != CUBLAS_STATUS_SUCCESS) {
        return false;
    }
    uint32_t tile = (uint32_t)c.tile, stages = (uint32_t)c.stages, red = (uint32_t)c.red,
             custom = (uint32_t)c.custom;
    int32_t splitk = c.splitk;
    uint32_t swz = (uint32_t)c.swizzle;
    struct {
        cublasLtMatmulAlgoConfigAttributes_t at;
        const void *v;
        size_t n;
    } sets[] = {{CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile},
                {CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages},
                {CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk},
                {CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof red},
                {CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swz, sizeof swz},
                {CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom, sizeof custom}};
    for (auto &s : sets) {
        if (cublasLtMatmulAlgoConfigSetAttribute(&c.algo, s.at, s.v, s.n) !=
            CUBLAS_STATUS_SUCCESS) {
            return false;
        }
    }
    cublasLtMatmulHeuristicResult_t r;
    memset(&r, 0, sizeof r);
    if (cublasLtMatmulAlgoCheck(cx.lt, cx.desc, l.a, l.b, l.c, l.c, &c.algo, &r) !=
        CUBLAS_STATUS_SUCCESS) {
        return false;
    }
    return r.workspaceSize <= WS_BYTES;
}

static std::string describe(const config &c)
{
    if (!c.lt) {
        return "cublasGemmEx default";
    }
    char b[160];
    snprintf(b, sizeof b, "algo %d tile %d stages %d splitK %d reduction %d swizzle %d custom %d",
             c.id, c.tile, c.stages, c.splitk, c.red, c.swizzle, c.custom);
    return b;
}

/* Largest |a - b| over the largest |b|, both bf16 arrays of n values. */
static double rel_diff(const void *da, const void *db, size_t n)
{
    std::vector<__nv_bfloat16> a(n), b(n);
    CK(cudaMemcpy(a.data(), da, n * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), db, n * 2, cudaMemcpyDeviceToHost));
    double md = 0.0, mb = 0.0;
    for (size_t i = 0; i < n; i++) {
        double x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
        md = std::max(md, std::fabs(x - y));
        mb = std::max(mb, std::fabs(y));
    }
    return mb > 0.0 ? md / mb : md;
}

static bool faster(const config &p, const config &q) { return p.us < q.us; }

/* A shape's operands: weight copies that together exceed L2 several times, x (T, K), y (T, N). */
struct operands {
    std::vector<void *> w;
    void *x, *y;
    layouts l;
};
static operands make_operands(const ctx &cx, const shape &s)
{
    const size_t wbytes = (size_t)s.n * s.k * 2;
    operands o;
    o.w.resize(std::max<size_t>(3, (COPY_BYTES + wbytes - 1) / wbytes));
    for (size_t i = 0; i < o.w.size(); i++) {
        o.w[i] = dalloc(wbytes);
        fill(o.w[i], (size_t)s.n * s.k, 11 + i, 0.02f);
    }
    o.x = dalloc((size_t)cx.t * s.k * 2);
    o.y = dalloc((size_t)cx.t * s.n * 2);
    fill(o.x, (size_t)cx.t * s.k, 7, 1.0f);
    o.l = make_layouts(cx.t, s.n, s.k);
    return o;
}
static void free_operands(operands &o)
{
    free_layouts(o.l);
    for (void *p : o.w) {
        cudaFree(p);
    }
    cudaFree(o.x);
    cudaFree(o.y);
}

/* The search for one shape: returns the fastest configuration (cublasGemmEx's where nothing
 * beats it), after printing what was found. */
static config search_shape(const ctx &cx, const shape &s, double budget_s)
{
    const size_t wbytes = (size_t)s.n * s.k * 2;
    operands o = make_operands(cx, s);
    const std::vector<void *> &w = o.w;
    const int copies = (int)w.size();
    void *x = o.x, *y = o.y, *y_ref = dalloc((size_t)cx.t * s.n * 2);
    const layouts &l = o.l;
    auto tbps = [&](double us) { return wbytes / (us * 1e-6) / 1e12; };

    config base = {};
    base.lt = false;
    base.us = time_config(cx, base, l, y, x, w.data(), copies, s);

    /* the heuristic's own candidates, for reference */
    cublasLtMatmulPreference_t pref;
    BK(cublasLtMatmulPreferenceCreate(&pref));
    size_t wsb = WS_BYTES;
    BK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                            sizeof wsb));
    cublasLtMatmulHeuristicResult_t hr[32];
    int nh = 0;
    if (cublasLtMatmulAlgoGetHeuristic(cx.lt, cx.desc, l.a, l.b, l.c, l.c, pref, 32, hr, &nh) !=
        CUBLAS_STATUS_SUCCESS) {
        nh = 0;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    config heur = base;
    heur.us = 1e30;
    for (int i = 0; i < nh; i++) {
        if (hr[i].state != CUBLAS_STATUS_SUCCESS) {
            continue;
        }
        config c = {};
        c.lt = true;
        c.algo = hr[i].algo;
        size_t got;
        int v[6] = {-1, -1, -1, -1, -1, -1};
        cublasLtMatmulAlgoConfigAttributes_t ats[6] = {
            CUBLASLT_ALGO_CONFIG_ID, CUBLASLT_ALGO_CONFIG_TILE_ID,
            CUBLASLT_ALGO_CONFIG_STAGES_ID, CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
            CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING};
        for (int a = 0; a < 6; a++) {
            (void)cublasLtMatmulAlgoConfigGetAttribute(&c.algo, ats[a], &v[a], sizeof v[a], &got);
        }
        c.id = v[0], c.tile = v[1], c.stages = v[2], c.splitk = v[3], c.red = v[4];
        c.swizzle = v[5];
        c.us = time_config(cx, c, l, y, x, w.data(), copies, s);
        if (c.us > 0 && c.us < heur.us) {
            heur = c;
        }
    }

    /* phase 1: every algorithm x tile x (up to MAX_STAGES) stage counts x custom options, no
     * split-K; phase 2: split-K, reductions and swizzling on phase 1's best few */
    std::vector<config> tried;
    auto t0 = std::chrono::steady_clock::now();
    auto elapsed = [&]() {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    int ids[256], n_ids = 0;
    if (cublasLtMatmulAlgoGetIds(cx.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF,
                                 CUDA_R_16BF, CUDA_R_16BF, 256, ids, &n_ids) !=
        CUBLAS_STATUS_SUCCESS) {
        n_ids = 0;
    }
    int n_checked = 0;
    auto attempt = [&](config c) { /* configured as the library accepts it, timed if it runs */
        n_checked++;
        if (configure(cx, c, l)) {
            c.us = time_config(cx, c, l, y, x, w.data(), copies, s);
            if (c.us > 0) {
                tried.push_back(c);
            }
        }
    };
    for (int a = 0; a < n_ids && elapsed() < budget_s * 0.6; a++) {
        cublasLtMatmulAlgo_t probe;
        if (cublasLtMatmulAlgoInit(cx.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF,
                                   CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, ids[a], &probe) !=
            CUBLAS_STATUS_SUCCESS) {
            continue;
        }
        std::vector<uint32_t> tiles = cap_list<uint32_t>(probe, CUBLASLT_ALGO_CAP_TILE_IDS);
        std::vector<uint32_t> stages = cap_list<uint32_t>(probe, CUBLASLT_ALGO_CAP_STAGES_IDS);
        if (tiles.empty()) {
            tiles.push_back(0);
        }
        if (stages.empty()) {
            stages.push_back(0);
        }
        std::vector<uint32_t> st_pick;
        for (int i = 0; i < MAX_STAGES && i < (int)stages.size(); i++) {
            st_pick.push_back(stages[(size_t)i * stages.size() / std::min<size_t>(MAX_STAGES,
                                                                                  stages.size())]);
        }
        int cmax = std::min(cap_value<int32_t>(probe, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX, 0), 3);
        for (uint32_t tl : tiles) {
            for (uint32_t sg : st_pick) {
                for (int cu = 0; cu <= cmax; cu++) {
                    config c = {};
                    c.lt = true;
                    c.id = ids[a], c.tile = (int)tl, c.stages = (int)sg, c.splitk = 1;
                    c.red = 0, c.swizzle = 0, c.custom = cu;
                    attempt(c);
                }
            }
        }
    }
    std::sort(tried.begin(), tried.end(), faster);
    std::vector<config> seeds(tried.begin(), tried.begin() + std::min<size_t>(TOP_FOR_SPLIT,
                                                                              tried.size()));
    static const int SPLITS[] = {2, 3, 4, 6, 8, 12, 16, 24, 32};
    static const int REDS[] = {CUBLASLT_REDUCTION_SCHEME_INPLACE,
                               CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE,
                               CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE};
    for (const config &sd : seeds) {
        cublasLtMatmulAlgo_t probe;
        if (cublasLtMatmulAlgoInit(cx.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF,
                                   CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, sd.id, &probe) !=
            CUBLAS_STATUS_SUCCESS) {
            continue;
        }
        bool split_ok = cap_value<int32_t>(probe, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, 0) != 0;
        uint32_t red_mask = cap_value<uint32_t>(probe, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, 0);
        bool swz_ok = cap_value<uint32_t>(probe, CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT, 0) != 0;
        for (int sw = 0; sw <= (swz_ok ? 1 : 0); sw++) {
            for (int sk : SPLITS) {
                for (int rd : REDS) {
                    if (!split_ok || !(red_mask & (uint32_t)rd) || elapsed() > budget_s) {
                        continue;
                    }
                    config c = sd;
                    c.splitk = sk, c.red = rd, c.swizzle = sw;
                    attempt(c);
                }
            }
            if (sw == 1 || !swz_ok) {
                continue;
            }
            config c = sd; /* swizzling without split-K */
            c.swizzle = 1;
            attempt(c);
        }
    }
    std::sort(tried.begin(), tried.end(), faster);

    printf("search %-7s T=%d N=%-5d K=%-5d beta=%g, %d weight copies (%.0f MB each)\n", s.name,
           cx.t, s.n, s.k, s.beta, copies, wbytes / 1e6);
    printf("  cublasGemmEx default      %7.2f us %5.2f TB/s\n", base.us, tbps(base.us));
    if (heur.us < 1e29) {
        printf("  heuristic's best of %2d    %7.2f us %5.2f TB/s  (%s)\n", nh, heur.us,
               tbps(heur.us), describe(heur).c_str());
    }
    printf("  searched: %d configurations checked, %zu ran, %.1f s\n", n_checked, tried.size(),
           elapsed());
    for (size_t i = 0; i < tried.size() && i < 5; i++) {
        printf("  #%zu %7.2f us %5.2f TB/s  x%.3f of default  (%s)\n", i + 1, tried[i].us,
               tbps(tried[i].us), base.us / tried[i].us, describe(tried[i]).c_str());
    }
    config best = base;
    if (!tried.empty() && tried[0].us < base.us) {
        best = tried[0];
    }
    if (heur.us < best.us) {
        best = heur;
    }
    if (best.lt) { /* the same inputs through both: the best must compute the same product */
        fill(y, (size_t)cx.t * s.n, 5, 1.0f);
        fill(y_ref, (size_t)cx.t * s.n, 5, 1.0f);
        bool ok = product(cx, best, l, y, x, w[0], s.n, s.k, s.beta) &&
                  product(cx, base, l, y_ref, x, w[0], s.n, s.k, s.beta);
        CK(cudaStreamSynchronize(cx.st));
        double d = ok ? rel_diff(y, y_ref, (size_t)cx.t * s.n) : INFINITY;
        printf("  best against cublasGemmEx's output: largest difference %.2e of the largest "
               "value%s\n", d, d < 2e-2 ? "" : "  -- MISMATCH, not used");
        if (!(d < 2e-2)) {
            best = base;
        }
    }
    free_operands(o);
    cudaFree(y_ref);
    return best;
}

/* ---- the chain ------------------------------------------------------------------------------ */

/* Lines of 128 bytes asked of L2: `rows` rows of `row_bytes` from base, `ld` bytes apart. */
struct prefetch {
    const char *base;
    long long rows, row_bytes, ld;
};

/* The whole grid's threads share the lines; issued before the kernel waits for its input. */
static __device__ void issue_prefetch(const prefetch &p)
{
    if (!p.base) {
        return;
    }
    const long long per_row = p.row_bytes / 128, n = p.rows * per_row;
    const long long nth = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += nth) {
        const char *a = p.base + (i / per_row) * p.ld + (i % per_row) * 128;
        uck_prefetch_l2(a);
    }
}

/* y = x / rms(x), a block per row (the engine's norm at decode rows, its weight all ones) */
static __global__ void norm_kernel(__nv_bfloat16 *y, const __nv_bfloat16 *x, int dim, prefetch p)
{
    __shared__ float red[32];
    uck_launch_dependents();
    issue_prefetch(p);
    uck_grid_wait();
    const __nv_bfloat16 *r = x + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = __bfloat162float(r[j]);
        ss += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
    }
    if ((threadIdx.x & 31) == 0) {
        red[threadIdx.x >> 5] = ss;
    }
    __syncthreads();
    float tot = 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) {
        tot += red[i];
    }
    const float inv = rsqrtf(tot / dim + 1e-5f);
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        y[(size_t)blockIdx.x * dim + j] = __float2bfloat16(__bfloat162float(r[j]) * inv);
    }
}

/* act = silu(gate) * up over rows of gu = [gate | up] */
static __global__ void swiglu_kernel(__nv_bfloat16 *act, const __nv_bfloat16 *gu, int rows,
                                     int n_ffn, prefetch p)
{
    uck_launch_dependents();
    issue_prefetch(p);
    uck_grid_wait();
    const long long n = (long long)rows * n_ffn;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n_ffn, c = i % n_ffn;
        float g = __bfloat162float(gu[r * 2 * n_ffn + c]);
        float u = __bfloat162float(gu[r * 2 * n_ffn + n_ffn + c]);
        act[i] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
    }
}

/* attention's stand-in: its output rows (the query part of qkv, copied) */
static __global__ void attn_out_kernel(__nv_bfloat16 *att, const __nv_bfloat16 *qkv, int rows,
                                       int q_dim, int ld)
{
    uck_grid_wait();
    const long long n = (long long)rows * q_dim;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        att[i] = qkv[(i / q_dim) * ld + i % q_dim];
    }
}

struct chain_layer {
    void *w[N_SHAPES];
};

/* The prefetch of `mb` MB of a product's weights (n rows of k bf16): the head, or the first bytes
 * of every row. None for mb = 0. */
static prefetch prefetch_of(const void *w, int n, int k, double mb, bool spread)
{
    prefetch p = {nullptr, 0, 0, 0};
    const long long total = (long long)n * k * 2, want = std::min((long long)(mb * 1e6), total);
    if (want < 128) {
        return p;
    }
    p.base = (const char *)w;
    if (!spread) {
        p.rows = 1;
        p.row_bytes = want / 128 * 128;
        p.ld = 0;
        return p;
    }
    p.rows = n;
    p.ld = (long long)k * 2;
    p.row_bytes = std::min(p.ld, std::max(128LL, (want / n + 127) / 128 * 128));
    return p;
}

/* Median time of one chain layer (us): LAYERS layers in one graph, SAMPLES launches. */
static double time_chain(const ctx &cx, const std::vector<chain_layer> &layers,
                         const config *cfg, double mb, bool spread, void *x, void *xn,
                         void *qkv, void *att, void *gu, void *act)
{
    layouts l[N_SHAPES];
    for (int i = 0; i < N_SHAPES; i++) {
        l[i] = make_layouts(cx.t, SHAPES[i].n, SHAPES[i].k);
    }
    const int c = 4096, n_ffn = 14336, t = cx.t;
    cudaGraph_t g;
    cudaGraphExec_t ge;
    bool ok = true;
    CK(cudaStreamBeginCapture(cx.st, cudaStreamCaptureModeThreadLocal));
    for (size_t i = 0; i < layers.size(); i++) {
        const chain_layer &ly = layers[i];
        uck_launch(norm_kernel, dim3(t), dim3(256), 0, cx.st, (__nv_bfloat16 *)xn,
                   (const __nv_bfloat16 *)x, c, prefetch_of(ly.w[0], 6144, c, mb, spread));
        ok = ok && product(cx, cfg[0], l[0], qkv, xn, ly.w[0], 6144, c, 0.0f);
        uck_launch(attn_out_kernel, dim3(32), dim3(256), 0, cx.st, (__nv_bfloat16 *)att,
                   (const __nv_bfloat16 *)qkv, t, c, 6144);
        ok = ok && product(cx, cfg[1], l[1], x, att, ly.w[1], c, c, 1.0f);
        uck_launch(norm_kernel, dim3(t), dim3(256), 0, cx.st, (__nv_bfloat16 *)xn,
                   (const __nv_bfloat16 *)x, c, prefetch_of(ly.w[2], 2 * n_ffn, c, mb, spread));
        ok = ok && product(cx, cfg[2], l[2], gu, xn, ly.w[2], 2 * n_ffn, c, 0.0f);
        uck_launch(swiglu_kernel, dim3(132), dim3(256), 0, cx.st, (__nv_bfloat16 *)act,
                   (const __nv_bfloat16 *)gu, t, n_ffn, prefetch_of(ly.w[3], c, n_ffn, mb, spread));
        ok = ok && product(cx, cfg[3], l[3], x, act, ly.w[3], c, n_ffn, 1.0f);
    }
    CK(cudaStreamEndCapture(cx.st, &g));
    if (!ok) {
        fprintf(stderr, "FATAL: a chain product failed to enqueue\n");
        exit(1);
    }
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, cx.st)); /* warm-up */
    for (int i = 0; i < N_SHAPES; i++) {
        free_layouts(l[i]);
    }
    return graph_median_ms(ge, g, cx.st) * 1e3 / (double)layers.size();
}

static void run_chain(const ctx &cx, const config *best, const std::vector<double> &mbs)
{
    std::vector<chain_layer> layers(LAYERS);
    double wbytes = 0.0;
    for (int i = 0; i < LAYERS; i++) {
        for (int s = 0; s < N_SHAPES; s++) {
            size_t n = (size_t)SHAPES[s].n * SHAPES[s].k;
            layers[i].w[s] = dalloc(n * 2);
            fill(layers[i].w[s], n, 100 + 4 * i + s, 0.02f);
            wbytes += i == 0 ? n * 2.0 : 0.0;
        }
    }
    const int t = cx.t;
    void *x = dalloc((size_t)t * 4096 * 2), *xn = dalloc((size_t)t * 4096 * 2),
         *qkv = dalloc((size_t)t * 6144 * 2), *att = dalloc((size_t)t * 4096 * 2),
         *gu = dalloc((size_t)t * 28672 * 2), *act = dalloc((size_t)t * 14336 * 2);
    fill(x, (size_t)t * 4096, 3, 1.0f);
    config dflt[N_SHAPES];
    for (int s = 0; s < N_SHAPES; s++) {
        dflt[s] = config{};
        dflt[s].lt = false;
    }
    bool have_best = false;
    for (int s = 0; s < N_SHAPES; s++) {
        have_best = have_best || best[s].lt;
    }
    printf("chain T=%d: %d layers of distinct weights in one graph (%.0f MB a layer), small "
           "kernels %s programmatic launches\n", t, LAYERS, wbytes / 1e6,
           uck_pdl_enabled() ? "as" : "NOT as");
    const double base = time_chain(cx, layers, dflt, 0.0, false, x, xn, qkv, att, gu, act);
    printf("  %-22s %-6s %8s %8s %9s\n", "products", "L2", "MB", "us/layer", "vs base");
    printf("  %-22s %-6s %8.1f %8.2f %9s  (%.2f TB/s of weights; 32 layers %.3f ms)\n",
           "cublasGemmEx", "-", 0.0, base, "1.000", wbytes / (base * 1e-6) / 1e12, base * 32e-3);
    for (int v = 0; v < (have_best ? 2 : 1); v++) {
        const config *cf = v == 0 ? dflt : best;
        for (int spread = 0; spread < 2; spread++) {
            for (double mb : mbs) {
                if (mb <= 0.0 && (spread || v == 0)) {
                    continue; /* the baseline is above; one no-prefetch row for the best */
                }
                double us = time_chain(cx, layers, cf, mb, spread != 0, x, xn, qkv, att, gu,
                                       act);
                printf("  %-22s %-6s %8.1f %8.2f %9.3f  (%+.2f us a layer, %+.3f ms a 32-layer "
                       "step)\n", v == 0 ? "cublasGemmEx" : "searched best",
                       mb <= 0.0 ? "-" : spread ? "spread" : "head", mb, us, us / base, us - base,
                       (us - base) * 32e-3);
            }
        }
    }
    for (auto &ly : layers) {
        for (void *p : ly.w) {
            cudaFree(p);
        }
    }
    for (void *p : {x, xn, qkv, att, gu, act}) {
        cudaFree(p);
    }
}

int main(int argc, char **argv)
{
    int rows = 32;
    double search_s = 20.0;
    bool do_search = true, do_chain = true;
    std::vector<double> mbs = {0.0, 4.0, 8.0, 16.0, 32.0};
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "--rows" && i + 1 < argc) {
            rows = atoi(argv[++i]);
        } else if (a == "--search-s" && i + 1 < argc) {
            search_s = atof(argv[++i]);
        } else if (a == "--prefetch-mb" && i + 1 < argc) {
            mbs.clear();
            for (const char *p = argv[++i]; *p;) {
                char *end;
                mbs.push_back(strtod(p, &end));
                if (end == p) {
                    fprintf(stderr, "--prefetch-mb expects numbers separated by commas\n");
                    return 2;
                }
                p = *end == ',' ? end + 1 : end;
            }
        } else if (a == "--no-search") {
            do_search = false;
        } else if (a == "--no-chain") {
            do_chain = false;
        } else {
            fprintf(stderr, "usage: %s [--rows 32] [--search-s 20] [--prefetch-mb 0,4,8,16,32] "
                    "[--no-search] [--no-chain]\n", argv[0]);
            return 2;
        }
    }
    if (rows < 1 || rows > 4096) {
        fprintf(stderr, "--rows must be 1-4096\n");
        return 2;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        fprintf(stderr, "no CUDA device\n");
        return 77;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
           prop.l2CacheSize >> 20);
    ctx cx = {};
    cx.t = rows;
    CK(cudaStreamCreateWithFlags(&cx.st, cudaStreamNonBlocking));
    BK(cublasCreate(&cx.blas));
    BK(cublasSetStream(cx.blas, cx.st));
    cx.ws = dalloc(WS_BYTES);
    BK(cublasSetWorkspace(cx.blas, cx.ws, WS_BYTES));
    BK(cublasLtCreate(&cx.lt));
    BK(cublasLtMatmulDescCreate(&cx.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    BK(cublasLtMatmulDescSetAttribute(cx.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof op_t));
    BK(cublasLtMatmulDescSetAttribute(cx.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof op_n));

    config best[N_SHAPES];
    double sum_base = 0.0, sum_best = 0.0;
    for (int s = 0; s < N_SHAPES; s++) {
        best[s] = config{};
        best[s].lt = false;
    }
    if (do_search) {
        for (int s = 0; s < N_SHAPES; s++) {
            best[s] = search_shape(cx, SHAPES[s], search_s);
        }
        /* the four again, alone, both ways: the layer's sum in one breath */
        for (int s = 0; s < N_SHAPES; s++) {
            const shape &sh = SHAPES[s];
            operands o = make_operands(cx, sh);
            const int copies = (int)o.w.size();
            config d = {};
            d.lt = false;
            sum_base += time_config(cx, d, o.l, o.y, o.x, o.w.data(), copies, sh);
            sum_best += time_config(cx, best[s].lt ? best[s] : d, o.l, o.y, o.x, o.w.data(),
                                    copies, sh);
            free_operands(o);
        }
        printf("search: a layer's four products at T=%d: cublasGemmEx %.1f us, searched best "
               "%.1f us (x%.3f): %+.3f ms a 32-layer step\n", rows, sum_base, sum_best,
               sum_base / sum_best, (sum_best - sum_base) * 32e-3);
    }
    if (do_chain) {
        uc_cuda_set_pdl(prop.major >= 9); /* as the backend sets it */
        run_chain(cx, best, mbs);
    }
    cublasLtMatmulDescDestroy(cx.desc);
    cublasLtDestroy(cx.lt);
    cublasDestroy(cx.blas);
    cudaFree(cx.ws);
    cudaStreamDestroy(cx.st);
    return 0;
}
