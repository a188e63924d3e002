/* cuda_lt: the prefill products on cuBLASLt, with the algorithm chosen for the load a serving
 * GPU runs under.
 *
 * cublasGemmEx runs the first algorithm of cuBLASLt's heuristic. A long prefill, though, runs
 * power-capped (an H200 serving 8K prompts back to back sits at ~1,500 MHz of its 1,980 in 86%
 * of the samples: tests/cuda/NOTES.md, call N3), and there the heuristic's first pick is not
 * the fastest. Call K4 ran every candidate it offers for a Llama-3-8B layer's four products at
 * 8,192 rows for 1.2 s each and took the rate over the last 0.8 s: the 176x128 and 168x128
 * tiles gave gate|up 680 and 679 TFLOP/s against the first pick's 657 (+3.5%), and qkv 672 and
 * 665 against 651-657 (+2-3%); for o and down (an output no wider than the input) they were
 * 1-4% slower than the first pick.
 *
 * So a product of at least LT_MIN_ROWS rows whose output is wider than its input runs the
 * first of those tiles, in LT_TILES' order, that the heuristic offers for its shape and its
 * operands' alignment (the same choice for the same shape, every time); anything else, or a
 * shape with neither tile on offer, stays on cublasGemmEx. The choices are kept per shape (LT_CACHE of them, the oldest
 * replaced). UC_CUDA_LT_TILES=0 turns the chooser off (a measurement switch). */
#include "cuda_lt.h"

#include <cublasLt.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "cuda_status.h"

#define LT_MIN_ROWS 4096  /* prefill passes (8,192 rows by default; call K4's shapes) */
#define LT_CANDIDATES 16  /* heuristic results looked through */
#define LT_CACHE 64       /* shapes whose choice is kept (a mixed step adds its decode rows) */

/* The tiles preferred, best first (call K4, sustained TFLOP/s of gate|up and qkv). */
static const int LT_TILES[] = {CUBLASLT_MATMUL_TILE_176x128, CUBLASLT_MATMUL_TILE_168x128};

struct lt_shape {
    int64_t t, n, k;
    bool beta1;
    uint32_t align; /* the operands' least alignment, bytes (256 at most): algorithms need it */
    int tile; /* 0: no preferred tile offered, cublasGemmEx runs it */
    cublasLtMatmulAlgo_t algo;
    cublasLtMatrixLayout_t la, lb, lc;
};

struct uc_cuda_lt {
    cublasLtHandle_t h;
    cublasLtMatmulDesc_t desc;
    void *ws;
    size_t ws_bytes;
    struct lt_shape shapes[LT_CACHE];
    int n_shapes, next; /* next: the entry replaced when the cache is full */
};

static void shape_fini(struct lt_shape *s)
{
    cublasLtMatrixLayout_t l[] = {s->la, s->lb, s->lc};
    for (size_t i = 0; i < sizeof l / sizeof l[0]; i++) {
        if (l[i]) {
            (void)cublasLtMatrixLayoutDestroy(l[i]);
        }
    }
    memset(s, 0, sizeof(*s));
}

void uc_cuda_lt_fini(struct uc_cuda_lt *lt)
{
    if (!lt) {
        return;
    }
    for (int i = 0; i < lt->n_shapes; i++) {
        shape_fini(&lt->shapes[i]);
    }
    if (lt->desc) {
        (void)cublasLtMatmulDescDestroy(lt->desc);
    }
    if (lt->h) {
        (void)cublasLtDestroy(lt->h);
    }
    uc_free(lt);
}

uc_status uc_cuda_lt_init(struct uc_cuda_lt **out, int sm_major, void *ws, size_t ws_bytes)
{
    *out = NULL;
    const char *env = getenv("UC_CUDA_LT_TILES");
    if (sm_major != 9 || (env && !strcmp(env, "0"))) {
        return UC_OK; /* measured on Hopper only */
    }
    struct uc_cuda_lt *lt = uc_calloc(1, sizeof(*lt));
    if (!lt) {
        return UC_ERRF(UC_ERR_NOMEM, "cuda_lt: out of memory");
    }
    lt->ws = ws;
    lt->ws_bytes = ws_bytes;
    /* row-major y (T, N) = x (T, K) w^T is column-major y^T (N, T) = w (K, N)^T x^T (K, T) */
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    uc_status rc;
    UC_CHECK(BLAS(cublasLtCreate(&lt->h)), rc, fail);
    UC_CHECK(BLAS(cublasLtMatmulDescCreate(&lt->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)), rc, fail);
    UC_CHECK(BLAS(cublasLtMatmulDescSetAttribute(lt->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t,
                                                 sizeof op_t)),
             rc, fail);
    UC_CHECK(BLAS(cublasLtMatmulDescSetAttribute(lt->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n,
                                                 sizeof op_n)),
             rc, fail);
    *out = lt;
    return UC_OK;
fail:
    uc_cuda_lt_fini(lt);
    return rc;
}

static int algo_tile(const cublasLtMatmulAlgo_t *a)
{
    uint32_t tile = 0, splits = 1;
    size_t got = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile,
                                             &got) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits,
                                             sizeof splits, &got) != CUBLAS_STATUS_SUCCESS) {
        return 0;
    }
    return splits <= 1 ? (int)tile : 0; /* split-K sums in another order: not these */
}

/* The shape's layouts and choice: s->tile stays 0 where the heuristic offers no preferred tile */
static uc_status shape_pick(struct uc_cuda_lt *lt, struct lt_shape *s)
{
    uc_status rc;
    cublasLtMatmulPreference_t pref = NULL;
    UC_CHECK(BLAS(cublasLtMatrixLayoutCreate(&s->la, CUDA_R_16BF, (uint64_t)s->k, (uint64_t)s->n,
                                             s->k)),
             rc, out);
    UC_CHECK(BLAS(cublasLtMatrixLayoutCreate(&s->lb, CUDA_R_16BF, (uint64_t)s->k, (uint64_t)s->t,
                                             s->k)),
             rc, out);
    UC_CHECK(BLAS(cublasLtMatrixLayoutCreate(&s->lc, CUDA_R_16BF, (uint64_t)s->n, (uint64_t)s->t,
                                             s->n)),
             rc, out);
    UC_CHECK(BLAS(cublasLtMatmulPreferenceCreate(&pref)), rc, out);
    UC_CHECK(BLAS(cublasLtMatmulPreferenceSetAttribute(pref,
                                                       CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                       &lt->ws_bytes, sizeof lt->ws_bytes)),
             rc, out);
    /* the heuristic assumes 256-byte aligned operands unless told: a pass's rows start anywhere */
    static const cublasLtMatmulPreferenceAttributes_t aligns[] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (size_t i = 0; i < sizeof aligns / sizeof aligns[0]; i++) {
        UC_CHECK(BLAS(cublasLtMatmulPreferenceSetAttribute(pref, aligns[i], &s->align,
                                                           sizeof s->align)),
                 rc, out);
    }
    cublasLtMatmulHeuristicResult_t res[LT_CANDIDATES];
    int n = 0;
    if (cublasLtMatmulAlgoGetHeuristic(lt->h, lt->desc, s->la, s->lb, s->lc, s->lc, pref,
                                       LT_CANDIDATES, res, &n) != CUBLAS_STATUS_SUCCESS) {
        n = 0; /* nothing on offer: cublasGemmEx decides */
    }
    for (size_t p = 0; p < sizeof LT_TILES / sizeof LT_TILES[0] && !s->tile; p++) {
        for (int i = 0; i < n; i++) {
            if (res[i].state == CUBLAS_STATUS_SUCCESS && algo_tile(&res[i].algo) == LT_TILES[p]) {
                s->algo = res[i].algo;
                s->tile = LT_TILES[p];
                break;
            }
        }
    }
    UC_LOG_DEBUG("cuda_lt: T=%lld N=%lld K=%lld beta=%d align=%u: %s (tile %d of %d candidates)",
                 (long long)s->t, (long long)s->n, (long long)s->k, (int)s->beta1, s->align,
                 s->tile ? "cuBLASLt" : "cublasGemmEx", s->tile, n);
out:
    if (pref) {
        (void)cublasLtMatmulPreferenceDestroy(pref);
    }
    return rc;
}

/* The least alignment of the operands' addresses, 256 at most (bf16: 2 at least). */
static uint32_t operands_align(const void *y, const void *x, const void *w)
{
    uintptr_t a = (uintptr_t)y | (uintptr_t)x | (uintptr_t)w | 256u;
    return (uint32_t)(a & (~a + 1u));
}

/* The kept choice for a shape (and alignment), picked now if it is new; NULL where the chooser
 * does not apply */
static struct lt_shape *shape_of(struct uc_cuda_lt *lt, int64_t n_tok, int64_t n_out,
                                 int64_t n_in, float beta, uint32_t align, uc_status *rc)
{
    *rc = UC_OK;
    if (!lt || n_tok < LT_MIN_ROWS || n_out <= n_in || (beta != 0.0f && beta != 1.0f)) {
        return NULL;
    }
    const bool beta1 = beta != 0.0f;
    for (int i = 0; i < lt->n_shapes; i++) {
        struct lt_shape *s = &lt->shapes[i];
        if (s->t == n_tok && s->n == n_out && s->k == n_in && s->beta1 == beta1 &&
            s->align == align) {
            return s;
        }
    }
    struct lt_shape *s;
    if (lt->n_shapes < LT_CACHE) {
        s = &lt->shapes[lt->n_shapes++];
    } else {
        s = &lt->shapes[lt->next];
        lt->next = (lt->next + 1) % LT_CACHE;
        shape_fini(s);
    }
    *s = (struct lt_shape){.t = n_tok, .n = n_out, .k = n_in, .beta1 = beta1, .align = align};
    *rc = shape_pick(lt, s);
    if (*rc != UC_OK) { /* a half-built entry does not stay */
        shape_fini(s);
        return NULL;
    }
    return s;
}

int uc_cuda_lt_tile(struct uc_cuda_lt *lt, int64_t n_tok, int64_t n_out, int64_t n_in,
                    float beta, uint32_t align)
{
    uc_status rc;
    struct lt_shape *s = shape_of(lt, n_tok, n_out, n_in, beta, align, &rc);
    return s ? s->tile : 0;
}

uc_status uc_cuda_lt_product(struct uc_cuda_lt *lt, cudaStream_t st, void *y, const void *x,
                             const void *w, int64_t n_tok, int64_t n_out, int64_t n_in,
                             float beta, bool *done)
{
    *done = false;
    uc_status rc;
    struct lt_shape *s = shape_of(lt, n_tok, n_out, n_in, beta, operands_align(y, x, w), &rc);
    if (!s || !s->tile) {
        return rc;
    }
    const float alpha = 1.0f;
    cublasStatus_t bs = cublasLtMatmul(lt->h, lt->desc, &alpha, w, s->la, x, s->lb, &beta, y,
                                       s->lc, y, s->lc, &s->algo, lt->ws, lt->ws_bytes, st);
    if (bs == CUBLAS_STATUS_NOT_SUPPORTED) { /* ran nothing: this shape stays on cublasGemmEx */
        UC_LOG_WARN("cuda_lt: T=%lld N=%lld K=%lld: tile %d not supported here; cublasGemmEx "
                    "runs it", (long long)n_tok, (long long)n_out, (long long)n_in, s->tile);
        s->tile = 0;
        return UC_OK;
    }
    rc = uc_cublas_status(bs, "cublasLtMatmul", __FILE__, __LINE__, __func__);
    *done = rc == UC_OK;
    return rc;
}
