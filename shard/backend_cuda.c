/* The CUDA backend: bf16 weights and activations with float32 accumulation (or float32
 * throughout with params.fp32, for accuracy checks), cuBLAS GemmEx for every projection, our
 * kernels (kernels/) for the rest. Everything runs in order on one stream (be->stream); memory
 * comes from the device's stream-ordered pool (cudaMallocAsync, release threshold raised so it
 * is kept), so a free right after a launch is safe. Host index arrays (ids, positions, kept rows,
 * scatter lists, block tables) travel through a ring of pinned staging slots, each guarded by
 * an event, into a device index buffer that only grows. Ops that return host results (download,
 * window_probs, colsum, qcov, decode psum, argmax) synchronise the stream; nothing else does. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "base/log.h"
#include "base/mem.h"
#include "compress/entropy.h"
#include "cuda_lt.h"
#include "cuda_status.h"
#include "kernels/kernels.h"

#define STAGE_SLOTS 32
#define STAGE_UPLOAD_MAX ((size_t)1 << 20) /* uploads up to this size go through a slot */
#define BLAS_WS_BYTES ((size_t)32 << 20)
#define CONVERT_CHUNK ((int64_t)32 << 20) /* elements per float32 conversion pass */
#define QCOV_WS_BYTES ((size_t)512 << 20)
#define QCOV_CHUNK_ROWS 2048 /* rows per split-K chunk of the covariance products */

/* ---- context ---------------------------------------------------------------------------- */

struct stage_slot {
    void *host; /* pinned */
    size_t cap;
    cudaEvent_t done; /* recorded after the last copy out of this slot */
};

/* A device workspace that grows and is kept. */
struct dev_buf {
    void *p;
    size_t cap;
};

/* A query spectra batch in flight (qspec_begin): its eigenvalues come to `pin`. */
struct qs_slot {
    cudaEvent_t read; /* the batch has read its queries (qspec_fence) */
    cudaEvent_t done; /* the eigenvalues are in `pin` */
    double *pin;      /* pinned host copy of the eigenvalues */
    size_t pin_cap;
    double *host;     /* a batch of heads past the kernel's size, done at its begin */
    int64_t n;        /* eigenvalues */
    bool on_host;
};

struct cuda_ctx {
    int device;
    bool fp32;
    enum uc_cuda_dtype dt;
    size_t act;
    int n_sms;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;
    struct uc_cuda_lt *lt; /* prefill products' algorithm chooser (cuda_lt.c); NULL: off */
    float *rope_cos; /* (max_pos, D/2) */
    float *rope_sin;
    int64_t rope_half;
    int64_t rope_max_pos;
    struct stage_slot slots[STAGE_SLOTS];
    int next_slot;
    struct dev_buf idx;  /* int32 index arrays of the current op */
    struct dev_buf conv; /* float32 staging of conversions */
    struct dev_buf work; /* float workspaces: window probs, colsum row stats, decode partials */
    struct dev_buf outp; /* results on their way to the host: psum, colsum, covariances */
    struct dev_buf dbl;  /* double workspaces: qcov rows and means */
    struct dev_buf cnt;  /* int32 counters of the decode attention, kept at zero between uses */
    struct dev_buf pmask; /* int32 n_tokens with packed entries at 0 (decode with packed heads) */
    struct dev_buf lmask; /* int32 n_tokens with latent entries at 0 too (decode with LoRC heads) */
    struct dev_buf rows;  /* float partials of the packed and merged entries' split decode */
    int64_t gemv_rows;    /* products of at most this many rows run on gemv_tc.cu or gemv.cu */
    bool gemv_tc;         /* those on the tensor cores (gemv_tc.cu; UC_CUDA_GEMV_TC=0: gemv.cu) */
    bool residual_epilogue; /* matmul_residual adds in cuBLAS's epilogue
                               (UC_CUDA_RESIDUAL_EPILOGUE=0: a separate add, a measurement
                               switch) */
    uint64_t epoch;      /* bumped when a workspace above moves (recorded graphs go stale) */
    bool capturing;      /* between graph_begin and graph_end */
    /* the last RoPE positions: every layer of a prefill slice rotates at the same positions,
     * so they are uploaded once per slice, not once per layer (decode steps bring theirs in
     * the step's index arrays: rope_append) */
    int32_t *pos_pin;    /* pinned copy of what pos_dev holds */
    int32_t *pos_dev;
    int64_t pos_n, pos_cap;
    cudaEvent_t pos_done;
    /* query spectra begun early (qspec_begin, qspec_end): their own stream, cuBLAS handle and
     * buffers, so they run beside the main stream's later work; made at the first batch. Up
     * to UC_QSPEC_BATCHES batches in flight, a ring of slots, oldest first. */
    struct {
        cudaStream_t stream;
        cublasHandle_t blas;
        cudaEvent_t ready; /* the main stream has written the queries */
        struct dev_buf dbl, outp;
        struct qs_slot slot[UC_QSPEC_BATCHES];
        int first, count;
    } qs;
    /* window scores begun (window_scores_begin), by slot */
    struct ws_slot *ws;
    int32_t n_ws;
    /* ids_fetch_begin's copies, by slot: pinned, and the event that follows each copy */
    struct {
        int32_t *pin;
        int64_t cap, n;
        cudaEvent_t done;
    } fetch[2];
};

/* A begun window score result: Hkv n column floats, then n row floats when asked, copied to
 * pinned memory; `done` follows the copy. */
struct ws_slot {
    float *pin;
    size_t cap; /* floats */
    cudaEvent_t done;
    int64_t n_col; /* 0: nothing begun */
    int64_t n;
    bool row;
};

static struct cuda_ctx *ctx_of(struct uc_backend *be) { return be->ctx; }

/* Grows b to at least `bytes`, in the order of stream st (the stream that uses b). */
static uc_status buf_reserve_on(struct cuda_ctx *c, struct dev_buf *b, size_t bytes,
                                cudaStream_t st)
{
    if (bytes <= b->cap) {
        return UC_OK;
    }
    if (c->capturing) {
        /* a graph must not allocate: its free and alloc nodes would make a second launch fail
         * (cudaErrorInvalidValue). Refused quietly: the engine runs those ops directly, and
         * that run grows the workspace for the next recording (decode.c) */
        return UC_ERR_UNSUPPORTED;
    }
    size_t cap = b->cap + b->cap / 2;
    cap = cap > bytes ? cap : bytes;
    cap = (cap + 255) & ~(size_t)255;
    c->epoch++;
    if (b->p) {
        uc_status rc = CU(cudaFreeAsync(b->p, st));
        b->p = NULL;
        b->cap = 0;
        if (rc != UC_OK) {
            return rc;
        }
    }
    uc_status rc = CU(cudaMallocAsync(&b->p, cap, st));
    if (rc == UC_OK) {
        b->cap = cap;
    }
    return rc;
}

static uc_status buf_reserve(struct cuda_ctx *c, struct dev_buf *b, size_t bytes)
{
    return buf_reserve_on(c, b, bytes, c->stream);
}

/* The next pinned staging slot, at least `bytes` large, once its previous copy has left. */
static uc_status stage_take(struct cuda_ctx *c, size_t bytes, struct stage_slot **out)
{
    uc_status rc;
    struct stage_slot *s = &c->slots[c->next_slot];
    c->next_slot = (c->next_slot + 1) % STAGE_SLOTS;
    UC_CHECK(CU(cudaEventSynchronize(s->done)), rc, out);
    if (bytes > s->cap) {
        size_t cap = bytes > 2 * s->cap ? bytes : 2 * s->cap;
        if (s->host) {
            UC_CHECK(CU(cudaFreeHost(s->host)), rc, out);
            s->host = NULL;
            s->cap = 0;
        }
        UC_CHECK(CU(cudaHostAlloc(&s->host, cap, cudaHostAllocDefault)), rc, out);
        s->cap = cap;
    }
    *out = s;
out:
    return rc;
}

/* Copies s's first `bytes` to dst in stream order; the slot is reusable once `done` passes. */
static uc_status stage_send(struct cuda_ctx *c, struct stage_slot *s, void *dst, size_t bytes)
{
    uc_status rc = CU(cudaMemcpyAsync(dst, s->host, bytes, cudaMemcpyHostToDevice, c->stream));
    return rc == UC_OK ? CU(cudaEventRecord(s->done, c->stream)) : rc;
}

/* Copies `n_parts` host int32 arrays into the device index buffer through a pinned staging
 * slot; dev[i] receives the device address of part i. Stream-ordered: the kernels of this op
 * read them before any later op's copy lands. */
static uc_status upload_idx(struct cuda_ctx *c, int32_t **dev, const int32_t *const *parts,
                            const int64_t *counts, int n_parts)
{
    size_t bytes = 0;
    for (int i = 0; i < n_parts; i++) {
        bytes += (size_t)counts[i] * sizeof(int32_t);
    }
    bytes = bytes ? bytes : sizeof(int32_t);
    uc_status rc;
    struct stage_slot *s;
    UC_CHECK(buf_reserve(c, &c->idx, bytes), rc, out);
    UC_CHECK(stage_take(c, bytes, &s), rc, out);
    size_t off = 0;
    for (int i = 0; i < n_parts; i++) {
        size_t nb = (size_t)counts[i] * sizeof(int32_t);
        if (nb) {
            memcpy((char *)s->host + off, parts[i], nb);
        }
        dev[i] = (int32_t *)((char *)c->idx.p + off);
        off += nb;
    }
    rc = stage_send(c, s, c->idx.p, off ? off : sizeof(int32_t));
out:
    return rc;
}

static uc_status cuda_scatter_ints(struct uc_backend *be, void *dst, const int32_t *pos,
                                   const int32_t *val, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    int32_t *dev[2];
    const int32_t *parts[2] = {pos, val};
    const int64_t counts[2] = {n, n};
    uc_status rc = upload_idx(c, dev, parts, counts, 2);
    return rc == UC_OK ? CU(uc_cuda_scatter_ints(dst, dev[0], dev[1], n, c->stream)) : rc;
}

/* Device to host and wait. */
static uc_status download_sync(struct cuda_ctx *c, void *dst, const void *src, size_t bytes)
{
    uc_status rc = UC_OK;
    if (bytes) {
        rc = CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    }
    return rc == UC_OK ? CU(cudaStreamSynchronize(c->stream)) : rc;
}

/* ---- memory ----------------------------------------------------------------------------- */

static uc_status cuda_alloc(struct uc_backend *be, void **out, size_t size_bytes)
{
    struct cuda_ctx *c = ctx_of(be);
    *out = NULL;
    cudaError_t e = cudaMallocAsync(out, size_bytes ? size_bytes : 256, c->stream);
    if (e != cudaSuccess) {
        *out = NULL;
        return uc_error_at(e == cudaErrorMemoryAllocation ? UC_ERR_DEVICE_NOMEM : UC_ERR_CUDA,
                           __FILE__, __LINE__, __func__, "cuda alloc bytes=%zu: %s", size_bytes,
                           cudaGetErrorString(e));
    }
    return UC_OK;
}

/* The device's free memory plus what the stream-ordered pool holds unused (freed blocks it keeps
 * for reuse, which cudaMemGetInfo counts as taken). */
static uc_status cuda_mem_available(struct uc_backend *be, int64_t *bytes)
{
    (void)be;
    size_t free_b = 0, total_b = 0;
    int dev = 0;
    cudaMemPool_t mp;
    uint64_t reserved = 0, used = 0;
    uc_status rc;
    UC_CHECK(CU(cudaMemGetInfo(&free_b, &total_b)), rc, out);
    UC_CHECK(CU(cudaGetDevice(&dev)), rc, out);
    UC_CHECK(CU(cudaDeviceGetDefaultMemPool(&mp, dev)), rc, out);
    UC_CHECK(CU(cudaMemPoolGetAttribute(mp, cudaMemPoolAttrReservedMemCurrent, &reserved)), rc,
             out);
    UC_CHECK(CU(cudaMemPoolGetAttribute(mp, cudaMemPoolAttrUsedMemCurrent, &used)), rc, out);
    *bytes = (int64_t)free_b + (reserved > used ? (int64_t)(reserved - used) : 0);
out:
    return rc;
}

static void cuda_free(struct uc_backend *be, void *p)
{
    if (p) {
        (void)CU(cudaFreeAsync(p, ctx_of(be)->stream));
    }
}

static uc_status cuda_upload(struct uc_backend *be, void *dst, const void *src, size_t size_bytes)
{
    struct cuda_ctx *c = ctx_of(be);
    if (!size_bytes) {
        return UC_OK;
    }
    /* src is free to reuse when this returns. A small copy goes through a pinned staging slot,
     * so it never waits for the work queued before it (a decode step uploads each part's index
     * arrays while earlier parts run); a large one (weights) is staged by the driver. */
    if (size_bytes <= STAGE_UPLOAD_MAX && !c->capturing) {
        struct stage_slot *s;
        uc_status rc = stage_take(c, size_bytes, &s);
        if (rc == UC_OK) {
            memcpy(s->host, src, size_bytes);
            rc = stage_send(c, s, dst, size_bytes);
        }
        return rc;
    }
    return CU(cudaMemcpyAsync(dst, src, size_bytes, cudaMemcpyHostToDevice, c->stream));
}

static uc_status cuda_download(struct uc_backend *be, void *dst, const void *src, size_t size_bytes)
{
    return download_sync(ctx_of(be), dst, src, size_bytes);
}

static uc_status cuda_copy(struct uc_backend *be, void *dst, const void *src, size_t size_bytes)
{
    if (!size_bytes || dst == src) {
        return UC_OK;
    }
    return CU(cudaMemcpyAsync(dst, src, size_bytes, cudaMemcpyDeviceToDevice, ctx_of(be)->stream));
}

static uc_status cuda_download_f32(struct uc_backend *be, float *dst, const void *src, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (c->fp32) {
        return download_sync(c, dst, src, (size_t)n * sizeof(float));
    }
    uc_status rc;
    for (int64_t i0 = 0; i0 < n; i0 += CONVERT_CHUNK) {
        int64_t m = n - i0 < CONVERT_CHUNK ? n - i0 : CONVERT_CHUNK;
        UC_CHECK(buf_reserve(c, &c->conv, (size_t)m * sizeof(float)), rc, out);
        UC_CHECK(CU(uc_cuda_convert(c->conv.p, UC_CUDA_F32, (const char *)src + i0 * 2,
                                    UC_CUDA_BF16, m, c->stream)),
                 rc, out);
        UC_CHECK(download_sync(c, dst + i0, c->conv.p, (size_t)m * sizeof(float)), rc, out);
    }
    return CU(cudaStreamSynchronize(c->stream));
out:
    return rc;
}

static uc_status cuda_upload_f32(struct uc_backend *be, void *dst, const float *src, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (c->fp32) {
        return cuda_upload(be, dst, src, (size_t)n * sizeof(float));
    }
    uc_status rc = UC_OK;
    for (int64_t i0 = 0; i0 < n; i0 += CONVERT_CHUNK) {
        int64_t m = n - i0 < CONVERT_CHUNK ? n - i0 : CONVERT_CHUNK;
        UC_CHECK(buf_reserve(c, &c->conv, (size_t)m * sizeof(float)), rc, out);
        UC_CHECK(CU(cudaMemcpyAsync(c->conv.p, src + i0, (size_t)m * sizeof(float),
                                    cudaMemcpyHostToDevice, c->stream)),
                 rc, out);
        UC_CHECK(CU(uc_cuda_convert((char *)dst + i0 * 2, UC_CUDA_BF16, c->conv.p, UC_CUDA_F32, m,
                                    c->stream)),
                 rc, out);
    }
out:
    return rc;
}

static uc_status cuda_sync(struct uc_backend *be)
{
    return CU(cudaStreamSynchronize(ctx_of(be)->stream));
}

static size_t cuda_act_size(struct uc_backend *be) { return ctx_of(be)->act; }

static uc_status cuda_weight_create(struct uc_backend *be, void **out, const float *host,
                                    int64_t rows, int64_t cols)
{
    uc_status rc = cuda_alloc(be, out, (size_t)(rows * cols) * ctx_of(be)->act);
    if (rc == UC_OK) {
        rc = cuda_upload_f32(be, *out, host, rows * cols);
        if (rc != UC_OK) {
            cuda_free(be, *out);
            *out = NULL;
        }
    }
    return rc;
}

static void cuda_weight_free(struct uc_backend *be, void *w) { cuda_free(be, w); }

static uc_status cuda_weight_random(struct uc_backend *be, void **out, int64_t rows, int64_t cols,
                                    uint64_t seed, float mean, float std)
{
    struct cuda_ctx *c = ctx_of(be);
    uc_status rc = cuda_alloc(be, out, (size_t)(rows * cols) * c->act);
    if (rc == UC_OK) {
        rc = CU(uc_cuda_weight_random(*out, rows * cols, seed, mean, std, c->dt, c->stream));
        if (rc != UC_OK) {
            cuda_free(be, *out);
            *out = NULL;
        }
    }
    return rc;
}

static uc_status cuda_rope_init(struct uc_backend *be, const float *inv_freq, int64_t half_dim,
                                int64_t max_pos)
{
    struct cuda_ctx *c = ctx_of(be);
    uc_status rc;
    cuda_free(be, c->rope_cos);
    cuda_free(be, c->rope_sin);
    c->rope_cos = c->rope_sin = NULL;
    c->rope_half = c->rope_max_pos = 0;
    size_t n = (size_t)(half_dim * max_pos) * sizeof(float);
    UC_CHECK(cuda_alloc(be, (void **)&c->rope_cos, n), rc, out);
    UC_CHECK(cuda_alloc(be, (void **)&c->rope_sin, n), rc, out);
    UC_CHECK(buf_reserve(c, &c->conv, (size_t)half_dim * sizeof(float)), rc, out);
    UC_CHECK(cuda_upload(be, c->conv.p, inv_freq, (size_t)half_dim * sizeof(float)), rc, out);
    UC_CHECK(CU(uc_cuda_rope_table(c->rope_cos, c->rope_sin, c->conv.p, half_dim, max_pos,
                                   c->stream)),
             rc, out);
    c->rope_half = half_dim;
    c->rope_max_pos = max_pos;
out:
    return rc;
}

/* ---- element-wise ops and projections --------------------------------------------------- */

static uc_status cuda_rmsnorm(struct uc_backend *be, void *y, const void *x, const void *w,
                              int64_t n_tok, int64_t dim, float eps)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_rmsnorm(y, x, w, n_tok, dim, eps, c->dt, c->stream));
}

/* Whether a product of n_tok rows (n_out outputs, n_w weight rows) runs on gemv_tc.cu, or else
 * on gemv.cu: within the backend's row limit (UC_CUDA_GEMV_ROWS) and the kernel's shapes. Which
 * one never depends on n_tok below the limit, so a row is summed the same way at any batch. */
static bool gemv_tc_applies(const struct cuda_ctx *c, int64_t n_tok, int64_t n_out, int64_t n_in)
{
    return n_tok <= c->gemv_rows && c->gemv_tc &&
           uc_cuda_gemv_tc_supported(n_tok, n_out, n_in, c->dt);
}

static bool gemv_applies(const struct cuda_ctx *c, int64_t n_tok, int64_t n_w, int64_t n_in)
{
    return n_tok <= c->gemv_rows && uc_cuda_gemv_supported(n_tok, n_w, n_in, c->dt);
}

static uc_status product_shape_ok(int64_t n_tok, int64_t n_out, int64_t n_in)
{
    if (n_tok > INT32_MAX || n_out > INT32_MAX || n_in > INT32_MAX) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "matmul too large T=%lld N=%lld K=%lld",
                       (long long)n_tok, (long long)n_out, (long long)n_in);
    }
    return UC_OK;
}

/* y (T, N) = x (T, K) w^T + beta y on cuBLAS (beta 0 or 1: y's old values added in the
 * product's epilogue, rounded once); prefill shapes with a preferred algorithm on cuBLASLt
 * (cuda_lt.c). */
static uc_status cublas_product(struct cuda_ctx *c, void *y, const void *x, const void *w,
                                int64_t n_tok, int64_t n_out, int64_t n_in, float beta)
{
    bool done; /* c->lt is NULL in float32 and off Hopper: nothing runs there */
    uc_status rc = uc_cuda_lt_product(c->lt, c->stream, y, x, w, n_tok, n_out, n_in, beta, &done);
    if (rc != UC_OK || done) {
        return rc;
    }
    const float alpha = 1.0f;
    cudaDataType_t t = c->fp32 ? CUDA_R_32F : CUDA_R_16BF;
    /* row-major y (T, N) = x (T, K) w^T is column-major y^T (N, T) = w (K, N)^T x^T (K, T) */
    return BLAS(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n_tok, (int)n_in,
                             &alpha, w, t, (int)n_in, x, t, (int)n_in, &beta, y, t, (int)n_out,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static uc_status cuda_matmul(struct uc_backend *be, void *y, const void *x, const void *w,
                             int64_t n_tok, int64_t n_out, int64_t n_in)
{
    struct cuda_ctx *c = ctx_of(be);
    uc_status rc;
    if (n_tok <= 0) {
        return UC_OK;
    }
    UC_CHECK(product_shape_ok(n_tok, n_out, n_in), rc, out);
    if (gemv_tc_applies(c, n_tok, n_out, n_in)) {
        return CU(uc_cuda_gemv_tc(y, x, w, n_tok, n_out, n_in, false, c->stream));
    }
    if (gemv_applies(c, n_tok, n_out, n_in)) {
        /* decode: stream the weights once with our kernel */
        return CU(uc_cuda_gemv(y, x, w, n_tok, n_out, n_in, c->stream));
    }
    rc = cublas_product(c, y, x, w, n_tok, n_out, n_in, 0.0f);
out:
    return rc;
}

static uc_status cuda_add_rmsnorm(struct uc_backend *be, void *y, void *x, const void *d,
                                  const void *w, int64_t n_tok, int64_t dim, float eps)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_add_rmsnorm(y, x, d, w, n_tok, dim, eps, c->dt, c->stream));
}

static uc_status cuda_matmul_swiglu(struct uc_backend *be, void *y, void *gu, const void *x,
                                   const void *wgu, int64_t n_tok, int64_t n_ffn, int64_t n_in)
{
    struct cuda_ctx *c = ctx_of(be);
    if (gemv_tc_applies(c, n_tok, n_ffn, n_in)) {
        return CU(uc_cuda_gemv_tc(y, x, wgu, n_tok, n_ffn, n_in, true, c->stream));
    }
    if (gemv_applies(c, n_tok, 2 * n_ffn, n_in)) {
        return CU(uc_cuda_gemv_swiglu(y, x, wgu, n_tok, n_ffn, n_in, c->stream));
    }
    uc_status rc = be->ops->matmul(be, gu, x, wgu, n_tok, 2 * n_ffn, n_in);
    return rc == UC_OK ? be->ops->swiglu(be, y, gu, n_tok, n_ffn) : rc;
}

static uc_status cuda_add_bias(struct uc_backend *be, void *y, const void *b, int64_t n_tok,
                               int64_t n_out)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_add_bias(y, b, n_tok, n_out, c->dt, c->stream));
}

static uc_status cuda_add(struct uc_backend *be, void *y, const void *x, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_add(y, x, n, c->dt, c->stream));
}

/* Rows on cuBLAS take the residual into the product's epilogue (x is its C and D), and the
 * norm after it is a plain one: at 32K rows that saves three passes over the hidden states a
 * layer. Decode's rows (gemv_tc / gemv) keep the product into tmp and the fused add + norm. */
static uc_status cuda_matmul_residual(struct uc_backend *be, void *x, void *y, void *tmp,
                                      const void *a, const void *w, const void *norm_w,
                                      int64_t n_tok, int64_t n_out, int64_t n_in, float eps)
{
    struct cuda_ctx *c = ctx_of(be);
    uc_status rc;
    if (n_tok <= 0) {
        return UC_OK;
    }
    UC_CHECK(product_shape_ok(n_tok, n_out, n_in), rc, out);
    if (!c->residual_epilogue || gemv_tc_applies(c, n_tok, n_out, n_in) ||
        gemv_applies(c, n_tok, n_out, n_in)) {
        return uc_backend_matmul_residual_parts(be, x, y, tmp, a, w, norm_w, n_tok, n_out, n_in,
                                                eps);
    }
    UC_CHECK(cublas_product(c, x, a, w, n_tok, n_out, n_in, 1.0f), rc, out);
    if (norm_w) {
        rc = cuda_rmsnorm(be, y, x, norm_w, n_tok, n_out, eps);
    }
out:
    return rc;
}

static uc_status cuda_rope(struct uc_backend *be, void *x, int64_t ld, int64_t n_heads,
                           int64_t head_dim, const int32_t *pos, int64_t n_tok)
{
    struct cuda_ctx *c = ctx_of(be);
    if (head_dim / 2 != c->rope_half) {
        return UC_ERRF(UC_ERR_INTERNAL, "rope table half_dim=%lld, op asks %lld",
                       (long long)c->rope_half, (long long)(head_dim / 2));
    }
    for (int64_t t = 0; t < n_tok; t++) {
        if (pos[t] < 0 || pos[t] >= c->rope_max_pos) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "position %d outside the rope table (%lld)", pos[t],
                           (long long)c->rope_max_pos);
        }
    }
    uc_status rc = UC_OK;
    if (n_tok <= 0) {
        return UC_OK;
    }
    if (n_tok != c->pos_n || memcmp(c->pos_pin, pos, (size_t)n_tok * sizeof(int32_t)) != 0) {
        if (n_tok > c->pos_cap) {
            int64_t cap = n_tok > 2 * c->pos_cap ? n_tok : 2 * c->pos_cap;
            UC_CHECK(CU(cudaStreamSynchronize(c->stream)), rc, out);
            if (c->pos_pin) {
                (void)cudaFreeHost(c->pos_pin);
                (void)cudaFree(c->pos_dev);
                c->pos_pin = NULL;
                c->pos_dev = NULL;
                c->pos_cap = 0;
            }
            UC_CHECK(CU(cudaHostAlloc((void **)&c->pos_pin, (size_t)cap * sizeof(int32_t),
                                      cudaHostAllocDefault)),
                     rc, out);
            UC_CHECK(CU(cudaMalloc((void **)&c->pos_dev, (size_t)cap * sizeof(int32_t))), rc, out);
            c->pos_cap = cap;
        }
        if (!c->pos_done) {
            UC_CHECK(CU(cudaEventCreateWithFlags(&c->pos_done, cudaEventDisableTiming)), rc, out);
        }
        UC_CHECK(CU(cudaEventSynchronize(c->pos_done)), rc, out); /* the last copy has left */
        memcpy(c->pos_pin, pos, (size_t)n_tok * sizeof(int32_t));
        UC_CHECK(CU(cudaMemcpyAsync(c->pos_dev, c->pos_pin, (size_t)n_tok * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, c->stream)),
                 rc, out);
        UC_CHECK(CU(cudaEventRecord(c->pos_done, c->stream)), rc, out);
        c->pos_n = n_tok;
    }
    rc = CU(uc_cuda_rope(x, ld, n_heads, head_dim, c->pos_dev, n_tok, c->rope_cos, c->rope_sin,
                         c->dt, c->stream));
out:
    if (rc != UC_OK) {
        c->pos_n = -1; /* nothing cached */
    }
    return rc;
}

static uc_status cuda_swiglu(struct uc_backend *be, void *y, const void *gu, int64_t n_tok,
                             int64_t n_ffn)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_swiglu(y, gu, n_tok, n_ffn, c->dt, c->stream));
}

static uc_status cuda_copy_rows(struct uc_backend *be, void *dst, int64_t dst_ld, const void *src,
                                int64_t src_ld, int64_t width, int64_t n_rows)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n_rows <= 0 || width <= 0) {
        return UC_OK;
    }
    size_t a = c->act;
    return CU(cudaMemcpy2DAsync(dst, (size_t)dst_ld * a, src, (size_t)src_ld * a, (size_t)width * a,
                                (size_t)n_rows, cudaMemcpyDeviceToDevice, c->stream));
}

static uc_status cuda_gather_rows(struct uc_backend *be, void *dst, const void *src,
                                  const int32_t *idx, int64_t n_idx, int64_t width)
{
    struct cuda_ctx *c = ctx_of(be);
    int32_t *d_idx;
    uc_status rc = upload_idx(c, &d_idx, &idx, &n_idx, 1);
    if (rc == UC_OK) {
        rc = CU(uc_cuda_gather_rows(dst, src, d_idx, n_idx, width, c->dt, c->stream));
    }
    return rc;
}

/* ---- attention and compression scores --------------------------------------------------- */

static uc_status cuda_attn_prefill(struct uc_backend *be, void *out, const void *q, int64_t ld_q,
                                   const void *k, const void *v, int64_t ld_kv, int64_t n_tok,
                                   int64_t q0, int64_t n_heads, int64_t n_heads_kv,
                                   int64_t head_dim)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_attn_prefill(out, q, ld_q, k, v, ld_kv, n_tok, q0, n_heads, n_heads_kv,
                                   head_dim, c->dt, c->stream));
}

/* Where window_probs_into lays out the window's queries for the bf16 product: past the
 * probabilities (H, W, n) and the caller's `after` bytes, at a 256-byte boundary. */
static size_t window_pack_at(int64_t n_win, int64_t n, int64_t n_heads, size_t after)
{
    return ((size_t)(n_heads * n_win * n) * sizeof(float) + after + 255) / 256 * 256;
}

/* The bytes of c->work that window_probs_into and the caller's `after` bytes take. */
static size_t window_probs_bytes(const struct cuda_ctx *c, int64_t n_win, int64_t n,
                                 int64_t n_heads, int64_t head_dim, size_t after)
{
    size_t at = window_pack_at(n_win, n, n_heads, after);
    return c->dt == UC_CUDA_BF16 ? at + (size_t)(n_heads * n_win * head_dim) * 2 : at;
}

/* The window probabilities into p (H, W, n) on the main stream; `after` bytes past them are the
 * caller's, and window_probs_bytes says how much of c->work the whole takes. With bf16
 * activations each KV head's scores are one tensor-core product (its group's W query rows each
 * against its n keys, float32 sums: 262 us a layer on CUDA cores at 32K); the float32 runs keep
 * the CUDA-core tiles, dimensions summed in order, that the kept sets of the checks rest on. */
static uc_status window_probs_into(struct cuda_ctx *c, float *p, size_t after, const void *q_win,
                                   int64_t ld_q, const void *k, int64_t ld_kv, int64_t n_win,
                                   int64_t n, int64_t n_heads, int64_t n_heads_kv, int64_t head_dim)
{
    if (c->dt != UC_CUDA_BF16) {
        return CU(uc_cuda_window_probs(p, q_win, ld_q, k, ld_kv, n_win, n, n_heads, n_heads_kv,
                                       head_dim, c->dt, c->stream));
    }
    if (n_win <= 0 || n <= 0) {
        return UC_OK;
    }
    if (n_win > n || n_heads_kv <= 0 || n_heads % n_heads_kv != 0 || n > INT32_MAX) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "window probs w=%lld n=%lld heads %lld/%lld",
                       (long long)n_win, (long long)n, (long long)n_heads, (long long)n_heads_kv);
    }
    void *qp = (char *)p + window_pack_at(n_win, n, n_heads, after);
    int64_t d = head_dim, gw = n_heads / n_heads_kv * n_win;
    const float scale = 1.0f / sqrtf((float)d), zero = 0.0f;
    uc_status rc;
    UC_CHECK(CU(uc_cuda_window_pack(qp, q_win, ld_q, n_win, n_heads, d, c->dt, c->stream)), rc,
             out);
    /* column-major: KV head g's keys are A^T (n, D), its group's rows B (D, group x W), and
     * C (n, group x W) is probs from row g x group x W on */
    UC_CHECK(BLAS(cublasGemmStridedBatchedEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)gw,
                                             (int)d, &scale, k, CUDA_R_16BF, (int)ld_kv, d, qp,
                                             CUDA_R_16BF, (int)d, gw * d, &zero, p, CUDA_R_32F,
                                             (int)n, gw * n, (int)n_heads_kv, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT)),
             rc, out);
    rc = CU(uc_cuda_window_softmax(p, n_win, n, n_heads, c->stream));
out:
    return rc;
}

static uc_status cuda_window_probs(struct uc_backend *be, float *out, const void *q_win,
                                   int64_t ld_q, const void *k, int64_t ld_kv, int64_t n_win,
                                   int64_t n, int64_t n_heads, int64_t n_heads_kv,
                                   int64_t head_dim)
{
    struct cuda_ctx *c = ctx_of(be);
    size_t bytes = (size_t)(n_heads * n_win * n) * sizeof(float);
    uc_status rc;
    UC_CHECK(buf_reserve(c, &c->work, window_probs_bytes(c, n_win, n, n_heads, head_dim, 0)), rc,
             out);
    UC_CHECK(window_probs_into(c, c->work.p, 0, q_win, ld_q, k, ld_kv, n_win, n, n_heads,
                               n_heads_kv, head_dim),
             rc, out);
    rc = download_sync(c, out, c->work.p, bytes);
out:
    return rc;
}

/* Queues the window scores into c->work: *scores = the Hkv n column sums, then the n row
 * scores when `row` is set. */
static uc_status window_scores_queue(struct cuda_ctx *c, float **scores, bool row, bool row_max,
                                     const void *q_win, int64_t ld_q, const void *k,
                                     int64_t ld_kv, int64_t n_win, int64_t n, int64_t n_heads,
                                     int64_t n_heads_kv, int64_t head_dim)
{
    size_t probs = (size_t)(n_heads * n_win * n), red = (size_t)((n_heads_kv + 1) * n);
    uc_status rc;
    UC_CHECK(buf_reserve(c, &c->work,
                         window_probs_bytes(c, n_win, n, n_heads, head_dim, red * sizeof(float))),
             rc, out);
    float *p = c->work.p, *cs = p + probs, *rs = cs + n_heads_kv * n;
    UC_CHECK(window_probs_into(c, p, red * sizeof(float), q_win, ld_q, k, ld_kv, n_win, n,
                               n_heads, n_heads_kv, head_dim),
             rc, out);
    UC_CHECK(CU(uc_cuda_window_reduce(cs, row ? rs : NULL, p, n_win, n, n_heads, n_heads_kv,
                                      row_max, c->stream)),
             rc, out);
    *scores = cs;
out:
    return rc;
}

/* The host doubles of window_scores from the floats `host` holds (columns, then the row). */
static void window_scores_widen(double *col, double *row, const float *host, int64_t n_col,
                                int64_t n)
{
    for (int64_t i = 0; i < n_col; i++) {
        col[i] = host[i];
    }
    for (int64_t i = 0; row && i < n; i++) {
        row[i] = host[n_col + i];
    }
}

static uc_status cuda_window_scores(struct uc_backend *be, double *col, double *row, bool row_max,
                                    const void *q_win, int64_t ld_q, const void *k, int64_t ld_kv,
                                    int64_t n_win, int64_t n, int64_t n_heads, int64_t n_heads_kv,
                                    int64_t head_dim)
{
    struct cuda_ctx *c = ctx_of(be);
    size_t n_col = (size_t)(n_heads_kv * n), red = n_col + (row ? (size_t)n : 0);
    float *cs = NULL;
    uc_status rc;
    UC_CHECK(window_scores_queue(c, &cs, row != NULL, row_max, q_win, ld_q, k, ld_kv, n_win, n,
                                 n_heads, n_heads_kv, head_dim),
             rc, out);
    float *host = uc_malloc(red * sizeof(float));
    if (!host) {
        rc = UC_ERRF(UC_ERR_NOMEM, "window scores");
        goto out;
    }
    rc = download_sync(c, host, cs, red * sizeof(float));
    if (rc == UC_OK) {
        window_scores_widen(col, row, host, (int64_t)n_col, n);
    }
    uc_free(host);
out:
    return rc;
}

static uc_status cuda_window_scores_begin(struct uc_backend *be, int32_t slot, bool row,
                                          bool row_max, const void *q_win, int64_t ld_q,
                                          const void *k, int64_t ld_kv, int64_t n_win, int64_t n,
                                          int64_t n_heads, int64_t n_heads_kv, int64_t head_dim)
{
    struct cuda_ctx *c = ctx_of(be);
    if (slot < 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "window scores slot=%d", (int)slot);
    }
    if (!uc_grow_zeroed((void **)&c->ws, &c->n_ws, slot + 1, sizeof *c->ws)) {
        return UC_ERRF(UC_ERR_NOMEM, "window score slots=%d", (int)slot + 1);
    }
    struct ws_slot *w = &c->ws[slot];
    size_t red = (size_t)(n_heads_kv * n) + (row ? (size_t)n : 0);
    float *cs = NULL;
    uc_status rc;
    if (!w->done) {
        UC_CHECK(CU(cudaEventCreateWithFlags(&w->done, cudaEventDisableTiming)), rc, out);
    }
    if (red > w->cap) {
        if (w->pin) {
            UC_CHECK(CU(cudaEventSynchronize(w->done)), rc, out); /* its last copy has landed */
            (void)cudaFreeHost(w->pin);
            w->pin = NULL;
            w->cap = 0;
        }
        UC_CHECK(CU(cudaMallocHost((void **)&w->pin, red * sizeof(float))), rc, out);
        w->cap = red;
    }
    UC_CHECK(window_scores_queue(c, &cs, row, row_max, q_win, ld_q, k, ld_kv, n_win, n, n_heads,
                                 n_heads_kv, head_dim),
             rc, out);
    UC_CHECK(CU(cudaMemcpyAsync(w->pin, cs, red * sizeof(float), cudaMemcpyDeviceToHost,
                                c->stream)),
             rc, out);
    UC_CHECK(CU(cudaEventRecord(w->done, c->stream)), rc, out);
    w->n_col = n_heads_kv * n;
    w->n = n;
    w->row = row;
out:
    return rc;
}

static uc_status cuda_window_scores_end(struct uc_backend *be, int32_t slot, double *col,
                                        double *row)
{
    struct cuda_ctx *c = ctx_of(be);
    if (slot < 0 || slot >= c->n_ws || !c->ws[slot].n_col) {
        return UC_ERRF(UC_ERR_INTERNAL, "window_scores_end: slot %d was not begun", (int)slot);
    }
    struct ws_slot *w = &c->ws[slot];
    uc_status rc = CU(cudaEventSynchronize(w->done));
    if (rc == UC_OK) {
        window_scores_widen(col, w->row ? row : NULL, w->pin, w->n_col, w->n);
    }
    w->n_col = 0;
    return rc;
}

static uc_status cuda_attn_colsum(struct uc_backend *be, double *out, const void *q, int64_t ld_q,
                                  const void *k, int64_t ld_kv, int64_t n, int64_t n_heads,
                                  int64_t n_heads_kv, int64_t head_dim)
{
    struct cuda_ctx *c = ctx_of(be);
    uc_status rc;
    UC_CHECK(buf_reserve(c, &c->work, (size_t)(2 * n_heads * n) * sizeof(float)), rc, out);
    UC_CHECK(buf_reserve(c, &c->outp, (size_t)(n_heads * n) * sizeof(double)), rc, out);
    UC_CHECK(CU(uc_cuda_attn_colsum(c->outp.p, c->work.p, q, ld_q, k, ld_kv, n, n_heads,
                                    n_heads_kv, head_dim, c->dt, c->stream)),
             rc, out);
    rc = download_sync(c, out, c->outp.p, (size_t)(n_heads * n) * sizeof(double));
out:
    return rc;
}

/* The (H, D, D) covariances of qcov into cov on the device, on stream st with handle blas;
 * dbl is the workspace of the normalised rows. With bf16 activations the rows are halves and
 * the products run on the tensor cores with float32 sums (qcov.cu says why that is enough);
 * with float32 ones (the checks against the CPU) doubles and DGEMMs. */
static uc_status qcov_into(struct cuda_ctx *c, cudaStream_t st, cublasHandle_t blas,
                           struct dev_buf *dbl, double *cov, const void *q, int64_t ld, int64_t n,
                           int64_t n_heads, int64_t d)
{
    if (n <= 0 || d <= 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "qcov rows=%lld d=%lld", (long long)n, (long long)d);
    }
    if (n > INT32_MAX) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "qcov rows=%lld", (long long)n);
    }
    /* Split K: a long prompt's rows go in `split` chunks of `chunk` (the last padded with zero
     * rows), one strided-batched product over (head, chunk) pairs gives enough output tiles to
     * fill the GPU (one 128 x 128 product per head over 32K rows did not), and qcov_sum adds
     * each head's partial products in chunk order. */
    const bool half = c->dt == UC_CUDA_BF16;
    const int64_t xs = half ? 2 : (int64_t)sizeof(double), ps = half ? 4 : (int64_t)sizeof(double);
    int64_t split = n / QCOV_CHUNK_ROWS;
    split = split < 1 ? 1 : (split > 16 ? 16 : split);
    int64_t chunk = (n + split - 1) / split, n_pad = chunk * split;
    int64_t per_head = n_pad * d * xs + split * d * d * ps + d * (int64_t)sizeof(double);
    int64_t hb = (int64_t)QCOV_WS_BYTES / per_head;
    hb = hb < 1 ? 1 : (hb > n_heads ? n_heads : hb);
    /* the rows (and the mean's parts before them), the partial products, the means */
    size_t x_bytes = (size_t)(hb * n_pad * d * xs), p_bytes = (size_t)(hb * split * d * d * ps);
    size_t mean_parts = (size_t)((n + UC_CUDA_QCOV_MEAN_ROWS - 1) / UC_CUDA_QCOV_MEAN_ROWS * hb *
                                 d) *
                        sizeof(double);
    x_bytes = ((x_bytes > mean_parts ? x_bytes : mean_parts) + 255) / 256 * 256;
    uc_status rc;
    UC_CHECK(buf_reserve_on(c, dbl, x_bytes + p_bytes + (size_t)(hb * d) * sizeof(double), st), rc,
             out);
    void *xn = dbl->p, *part = (char *)dbl->p + x_bytes;
    double *mean = (double *)((char *)part + p_bytes);
    for (int64_t h0 = 0; h0 < n_heads; h0 += hb) {
        int64_t nb = n_heads - h0 < hb ? n_heads - h0 : hb;
        UC_CHECK(CU(uc_cuda_qcov_normalize(xn, mean, q, ld, n, n_pad, h0, nb, d, half, c->dt, st)),
                 rc, out);
        /* column-major: chunk b of xn is A (D, chunk), C_b = A A^T */
        if (half) {
            const float one = 1.0f, zero = 0.0f;
            UC_CHECK(BLAS(cublasGemmStridedBatchedEx(
                         blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)d, (int)d, (int)chunk, &one, xn,
                         CUDA_R_16F, (int)d, chunk * d, xn, CUDA_R_16F, (int)d, chunk * d, &zero,
                         part, CUDA_R_32F, (int)d, d * d, (int)(nb * split), CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT)),
                     rc, out);
        } else {
            /* each partial scaled by 1 / n in the product, then summed (nothing to sum when
             * split is 1) */
            const double alpha = 1.0 / (double)n, zero = 0.0;
            double *dst = split == 1 ? cov + h0 * d * d : part;
            UC_CHECK(BLAS(cublasDgemmStridedBatched(blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)d, (int)d,
                                                    (int)chunk, &alpha, xn, (int)d, chunk * d, xn,
                                                    (int)d, chunk * d, &zero, dst, (int)d, d * d,
                                                    (int)(nb * split))),
                     rc, out);
            if (split == 1) {
                continue;
            }
        }
        UC_CHECK(CU(uc_cuda_qcov_sum(cov + h0 * d * d, part, nb, split, d, half,
                                     half ? 1.0 / (double)n : 1.0, st)),
                 rc, out);
    }
out:
    return rc;
}

/* The (H, D, D) covariances of qcov into c->outp on the device (extra_doubles more after them). */
static uc_status qcov_device(struct cuda_ctx *c, const void *q, int64_t ld, int64_t n,
                             int64_t n_heads, int64_t d, size_t extra_doubles)
{
    uc_status rc = buf_reserve(c, &c->outp, (size_t)(n_heads * d * d) * sizeof(double) +
                                                extra_doubles * sizeof(double));
    return rc == UC_OK ? qcov_into(c, c->stream, c->blas, &c->dbl, c->outp.p, q, ld, n, n_heads, d)
                       : rc;
}

static uc_status cuda_qcov(struct uc_backend *be, double *out, const void *q, int64_t ld, int64_t n,
                           int64_t n_heads, int64_t head_dim)
{
    struct cuda_ctx *c = ctx_of(be);
    int64_t d = head_dim;
    uc_status rc = qcov_device(c, q, ld, n, n_heads, d, 0);
    if (rc == UC_OK) {
        rc = download_sync(c, out, c->outp.p, (size_t)(n_heads * d * d) * sizeof(double));
    }
    return rc;
}

static uc_status cuda_qspec(struct uc_backend *be, double *out, const void *q, int64_t ld,
                            int64_t n, int64_t n_heads, int64_t head_dim, int64_t n_top)
{
    struct cuda_ctx *c = ctx_of(be);
    int64_t d = head_dim;
    if (d > UC_CUDA_SYMEIG_MAX_D) { /* the matrix would not fit a block's shared memory */
        double *cov = uc_malloc((size_t)(n_heads * d * d) * sizeof(double));
        if (!cov) {
            return UC_ERRF(UC_ERR_NOMEM, "query spectra");
        }
        uc_status rc = cuda_qcov(be, cov, q, ld, n, n_heads, head_dim);
        for (int64_t h = 0; rc == UC_OK && h < n_heads; h++) {
            rc = uc_entropy_eigvals(out + h * d, cov + h * d * d, d);
        }
        uc_free(cov);
        uc_entropy_keep_top(out, n_heads, d, n_top);
        return rc;
    }
    uc_status rc;
    UC_CHECK(qcov_device(c, q, ld, n, n_heads, d, (size_t)(n_heads * d)), rc, out);
    double *cov = c->outp.p, *eig = cov + n_heads * d * d;
    UC_CHECK(CU(uc_cuda_symeig(eig, cov, n_heads, d, n_top, !c->fp32, c->stream)), rc, out);
    rc = download_sync(c, out, eig, (size_t)(n_heads * d) * sizeof(double));
out:
    return rc;
}

static uc_status qspec_side_init(struct cuda_ctx *c)
{
    if (c->qs.stream) {
        return UC_OK;
    }
    uc_status rc;
    /* The default priority: with UC_QSPEC_PRIORITY=1 the eigensolves' blocks (latency-bound, a
     * block per matrix) take SMs as the main stream's blocks finish rather than after its
     * queue, which made 32K prefills slower (uncomp 1.049x full's time against 1.039x, same
     * run: tests/cuda/NOTES.md, call Y1); their latency is hidden by the pipelined layer ends
     * instead. */
    int lo = 0, hi = 0;
    const char *pr = getenv("UC_QSPEC_PRIORITY");
    if (pr && strcmp(pr, "1") == 0) {
        UC_CHECK(CU(cudaDeviceGetStreamPriorityRange(&lo, &hi)), rc, out);
    }
    UC_CHECK(CU(cudaStreamCreateWithPriority(&c->qs.stream, cudaStreamNonBlocking, hi)), rc, out);
    UC_CHECK(CU(cudaEventCreateWithFlags(&c->qs.ready, cudaEventDisableTiming)), rc, out);
    for (int i = 0; i < UC_QSPEC_BATCHES; i++) {
        UC_CHECK(CU(cudaEventCreateWithFlags(&c->qs.slot[i].read, cudaEventDisableTiming)), rc,
                 out);
        UC_CHECK(CU(cudaEventCreateWithFlags(&c->qs.slot[i].done, cudaEventDisableTiming)), rc,
                 out);
    }
    UC_CHECK(BLAS(cublasCreate(&c->qs.blas)), rc, out);
    UC_CHECK(BLAS(cublasSetStream(c->qs.blas, c->qs.stream)), rc, out);
out:
    return rc;
}

/* The batch's covariances and eigenvalues on the second stream, after what the main stream has
 * queued so far (the queries); the eigenvalues come back to pinned memory. */
static uc_status cuda_qspec_begin(struct uc_backend *be, const void *const *q, const int64_t *n,
                                  int64_t count, int64_t ld, int64_t n_heads, int64_t head_dim,
                                  int64_t n_top)
{
    struct cuda_ctx *c = ctx_of(be);
    int64_t d = head_dim, per = n_heads * d, total = count * per;
    if (c->qs.count == UC_QSPEC_BATCHES) {
        return UC_ERRF(UC_ERR_INTERNAL, "qspec_begin: %d batches are pending", UC_QSPEC_BATCHES);
    }
    struct qs_slot *sl = &c->qs.slot[(c->qs.first + c->qs.count) % UC_QSPEC_BATCHES];
    uc_status rc = UC_OK;
    if (d > UC_CUDA_SYMEIG_MAX_D) { /* past the kernel: the host eigensolver, at once */
        double *h = uc_realloc(sl->host, (size_t)total * sizeof(double));
        if (!h) {
            return UC_ERRF(UC_ERR_NOMEM, "query spectra of %lld sequences", (long long)count);
        }
        sl->host = h;
        for (int64_t i = 0; rc == UC_OK && i < count; i++) {
            rc = cuda_qspec(be, h + i * per, q[i], ld, n[i], n_heads, head_dim, n_top);
        }
        if (rc == UC_OK) {
            sl->on_host = true;
            sl->n = total;
            c->qs.count++;
        }
        return rc;
    }
    UC_CHECK(qspec_side_init(c), rc, out);
    UC_CHECK(CU(cudaEventRecord(c->qs.ready, c->stream)), rc, out);
    UC_CHECK(CU(cudaStreamWaitEvent(c->qs.stream, c->qs.ready, 0)), rc, out);
    UC_CHECK(buf_reserve_on(c, &c->qs.outp, (size_t)(total * d + total) * sizeof(double),
                            c->qs.stream),
             rc, out);
    double *cov = c->qs.outp.p, *eig = cov + total * d;
    for (int64_t i = 0; i < count; i++) {
        UC_CHECK(qcov_into(c, c->qs.stream, c->qs.blas, &c->qs.dbl, cov + i * per * d, q[i], ld,
                           n[i], n_heads, d),
                 rc, out);
    }
    UC_CHECK(CU(cudaEventRecord(sl->read, c->qs.stream)), rc, out); /* q is read by now */
    UC_CHECK(CU(uc_cuda_symeig(eig, cov, count * n_heads, d, n_top, !c->fp32, c->qs.stream)),
             rc, out);
    if ((size_t)total * sizeof(double) > sl->pin_cap) {
        if (sl->pin) {
            (void)cudaFreeHost(sl->pin); /* nothing pending writes it: the slot is free */
            sl->pin = NULL;
            sl->pin_cap = 0;
        }
        UC_CHECK(CU(cudaMallocHost((void **)&sl->pin, (size_t)total * sizeof(double))), rc, out);
        sl->pin_cap = (size_t)total * sizeof(double);
    }
    UC_CHECK(CU(cudaMemcpyAsync(sl->pin, eig, (size_t)total * sizeof(double),
                                cudaMemcpyDeviceToHost, c->qs.stream)),
             rc, out);
    UC_CHECK(CU(cudaEventRecord(sl->done, c->qs.stream)), rc, out);
    sl->on_host = false;
    sl->n = total;
    c->qs.count++;
out:
    return rc;
}

/* The newest batch's reads come after every older one's (one stream, in order). */
static uc_status cuda_qspec_fence(struct uc_backend *be)
{
    struct cuda_ctx *c = ctx_of(be);
    if (!c->qs.count) {
        return UC_OK;
    }
    struct qs_slot *sl = &c->qs.slot[(c->qs.first + c->qs.count - 1) % UC_QSPEC_BATCHES];
    return sl->on_host ? UC_OK : CU(cudaStreamWaitEvent(c->stream, sl->read, 0));
}

static uc_status cuda_qspec_end(struct uc_backend *be, double *out)
{
    struct cuda_ctx *c = ctx_of(be);
    if (!c->qs.count) {
        return UC_ERRF(UC_ERR_INTERNAL, "qspec_end: no batch was begun");
    }
    struct qs_slot *sl = &c->qs.slot[c->qs.first];
    c->qs.first = (c->qs.first + 1) % UC_QSPEC_BATCHES;
    c->qs.count--;
    size_t bytes = (size_t)sl->n * sizeof(double);
    sl->n = 0;
    if (sl->on_host) {
        memcpy(out, sl->host, bytes);
        return UC_OK;
    }
    uc_status rc = CU(cudaEventSynchronize(sl->done));
    if (rc == UC_OK) {
        memcpy(out, sl->pin, bytes);
    }
    return rc;
}

/* ---- paged KV --------------------------------------------------------------------------- */

static uc_status cuda_kv_pool_create(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                     int64_t n_blocks, int64_t block_tokens, int64_t head_dim)
{
    struct cuda_ctx *c = ctx_of(be);
    size_t n = (size_t)(n_blocks * block_tokens * head_dim) * c->act;
    uc_status rc;
    pool->k = pool->v = NULL;
    UC_CHECK(cuda_alloc(be, &pool->k, n), rc, out);
    UC_CHECK(cuda_alloc(be, &pool->v, n), rc, out);
    UC_CHECK(CU(cudaMemsetAsync(pool->k, 0, n, c->stream)), rc, out);
    UC_CHECK(CU(cudaMemsetAsync(pool->v, 0, n, c->stream)), rc, out);
    pool->block_tokens = block_tokens;
    pool->head_dim = head_dim;
    return UC_OK;
out:
    cuda_free(be, pool->k);
    cuda_free(be, pool->v);
    pool->k = pool->v = NULL;
    return rc;
}

static void cuda_kv_pool_destroy(struct uc_backend *be, struct uc_kv_pool_view *pool)
{
    cuda_free(be, pool->k);
    cuda_free(be, pool->v);
    pool->k = pool->v = NULL;
}

static uc_status cuda_kv_scatter(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                 const void *k_src, const void *v_src, int64_t ld,
                                 const int32_t *src_row, const int32_t *src_head,
                                 const int32_t *slot, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    const int32_t *parts[3] = {src_row, src_head, slot};
    int64_t counts[3] = {n, n, n};
    int32_t *dev[3];
    uc_status rc = upload_idx(c, dev, parts, counts, 3);
    if (rc == UC_OK) {
        rc = CU(uc_cuda_kv_scatter(pool->k, pool->v, k_src, v_src, ld, dev[0], dev[1], dev[2], n,
                                   pool->head_dim, c->dt, c->stream));
    }
    return rc;
}

static uc_status cuda_attn_decode(struct uc_backend *be, void *out, const void *q, int64_t ld_q,
                                  const struct uc_kv_pool_view *pool,
                                  const struct uc_kv_batch_view *view, int64_t n_rows,
                                  int64_t n_heads, int64_t n_heads_kv, float *psum)
{
    struct cuda_ctx *c = ctx_of(be);
    int64_t d = pool->head_dim, entries = n_rows * n_heads_kv;
    int64_t maxn = view->max_tokens > 0 ? view->max_tokens : 1;
    if (n_rows <= 0) {
        return UC_OK;
    }
    if (!uc_cuda_attn_decode_supported(d, c->dt)) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "cuda decode attention: head_dim=%lld", (long long)d);
    }
    if (psum && view->max_tokens <= 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "decode probabilities need max_tokens");
    }
    struct uc_cuda_decode_plan plan;
    uc_cuda_attn_decode_plan(&plan, n_rows, n_heads, n_heads_kv, d, view->max_tokens,
                             psum != NULL, c->n_sms);
    /* packed entries (ThinK): the tensor-core kernel sees them empty, their own kernel follows */
    int64_t n_chan = 0;
    for (int64_t e = 0; view->kdim && !view->on_device && e < entries; e++) {
        int64_t end = view->kdim[e] > 0 ? (int64_t)view->coff[e] + view->kdim[e] : 0;
        n_chan = end > n_chan ? end : n_chan;
    }
    /* merged entries (MiniCache) and latent entries (LoRC): likewise, each read by a kernel
     * of its own. The parts of the index arrays: the first three, then ThinK's three, then
     * MiniCache's three, then LoRC's ranks; a part the batch lacks has no elements. */
    const int32_t *parts[10] = {view->n_tokens, view->offset, view->blocks,
                                view->kdim,     view->coff,   view->chan,
                                view->mc_n,     view->mc_off, view->mc_side, view->lat_rank};
    int64_t pe = view->kdim ? entries : 0, me = view->mc_n ? entries : 0;
    int64_t le = view->lat_rank ? entries : 0;
    int64_t counts[10] = {entries, entries, view->n_blocks_total, pe, pe, n_chan, me, me, me, le};
    const int32_t *dev[10] = {view->n_tokens, view->offset, view->blocks,
                              view->kdim,     view->coff,   view->chan,
                              view->mc_n,     view->mc_off, view->mc_side, view->lat_rank};
    int32_t *up[10];
    int n_parts = view->lat_rank ? 10 : view->mc_n ? 9 : view->kdim ? 6 : 3;
    if (psum && view->lat_rank) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "decode probabilities of latent heads (lorc evicts "
                       "nothing)");
    }
    uc_status rc;
    UC_CHECK(buf_reserve(c, &c->work, plan.ws_floats * sizeof(float)), rc, out);
    if (plan.n_counters * sizeof(int32_t) > c->cnt.cap) {
        UC_CHECK(buf_reserve(c, &c->cnt, plan.n_counters * sizeof(int32_t)), rc, out);
        UC_CHECK(CU(cudaMemsetAsync(c->cnt.p, 0, c->cnt.cap, c->stream)), rc, out);
    }
    if (psum) {
        UC_CHECK(buf_reserve(c, &c->outp, (size_t)(entries * maxn) * sizeof(float)), rc, out);
    }
    if (!view->on_device) {
        UC_CHECK(upload_idx(c, up, parts, counts, n_parts), rc, out);
        for (int i = 0; i < n_parts; i++) {
            dev[i] = counts[i] > 0 ? up[i] : NULL;
        }
    }
    const int32_t *ntok = dev[0];
    if (view->kdim || view->mc_n) {
        UC_CHECK(buf_reserve(c, &c->pmask, (size_t)entries * sizeof(int32_t)), rc, out);
    }
    if (view->kdim) {
        UC_CHECK(CU(uc_cuda_decode_mask_packed(c->pmask.p, dev[0], dev[3], entries, c->stream)),
                 rc, out);
        ntok = c->pmask.p;
    }
    if (view->mc_n) {
        UC_CHECK(CU(uc_cuda_decode_mask_merged(c->pmask.p, ntok, dev[6], entries, c->stream)), rc,
                 out);
        ntok = c->pmask.p;
    }
    if (view->lat_rank) {
        /* latent entries (LoRC): empty for the tensor-core kernel too, their own kernel after */
        UC_CHECK(buf_reserve(c, &c->lmask, (size_t)entries * sizeof(int32_t)), rc, out);
        UC_CHECK(CU(uc_cuda_decode_mask_packed(c->lmask.p, ntok, dev[9], entries, c->stream)),
                 rc, out);
        ntok = c->lmask.p;
    }
    UC_CHECK(CU(uc_cuda_attn_decode(out, q, ld_q, pool->k, pool->v, pool->block_tokens, d, ntok,
                                    dev[1], dev[2], n_rows, n_heads, n_heads_kv, maxn, &plan,
                                    c->work.p, c->cnt.p, psum ? c->outp.p : NULL, c->dt,
                                    c->stream)),
             rc, out);
    int splits = uc_cuda_decode_rows_splits(n_rows, n_heads, n_heads_kv, c->n_sms);
    if (view->kdim || view->mc_n || view->lat_rank) {
        UC_CHECK(buf_reserve(c, &c->rows,
                             uc_cuda_decode_rows_ws(n_rows, n_heads, n_heads_kv, d, splits, maxn,
                                                    psum != NULL) *
                                 sizeof(float)),
                 rc, out);
    }
    if (view->kdim) {
        UC_CHECK(CU(uc_cuda_attn_decode_packed(out, q, ld_q, pool->k, pool->v, pool->block_tokens,
                                               d, dev[0], dev[1], dev[2], dev[3], dev[4], dev[5],
                                               n_rows, n_heads, n_heads_kv, splits, c->rows.p,
                                               psum ? c->outp.p : NULL, maxn, c->dt, c->stream)),
                 rc, out);
    }
    if (view->mc_n) {
        UC_CHECK(CU(uc_cuda_attn_decode_merged(out, q, ld_q, pool->k, pool->v, pool->block_tokens,
                                               d, dev[0], dev[1], dev[2], dev[6], dev[7], dev[8],
                                               n_rows, n_heads, n_heads_kv, splits, c->rows.p,
                                               psum ? c->outp.p : NULL, maxn, c->dt, c->stream)),
                 rc, out);
    }
    if (view->lat_rank) {
        UC_CHECK(CU(uc_cuda_attn_decode_latent(out, q, ld_q, pool->k, pool->v,
                                               pool->block_tokens, d, dev[0], dev[1], dev[2],
                                               dev[9], view->lat_basis, n_rows, n_heads,
                                               n_heads_kv, c->rope_cos, c->rope_sin, splits,
                                               c->rows.p, c->dt, c->stream)),
                 rc, out);
    }
    if (psum) {
        rc = download_sync(c, psum, c->outp.p, (size_t)(entries * maxn) * sizeof(float));
    }
out:
    return rc;
}

static uc_status cuda_rope_append(struct uc_backend *be, struct uc_kv_pool_view *pool, void *qkv,
                                   int64_t ld, int64_t n_heads, int64_t n_heads_kv,
                                   int64_t head_dim, const int32_t *pos, const int32_t *slot,
                                   int64_t n_tok)
{
    struct cuda_ctx *c = ctx_of(be);
    if (head_dim / 2 != c->rope_half || head_dim != pool->head_dim) {
        return UC_ERRF(UC_ERR_INTERNAL, "rope table half_dim=%lld, pool D=%lld, op asks D=%lld",
                       (long long)c->rope_half, (long long)pool->head_dim, (long long)head_dim);
    }
    /* positions are on the device: the caller checked them against the table */
    return CU(uc_cuda_rope_append(qkv, ld, n_heads, n_heads_kv, head_dim, pos, slot, n_tok,
                                  c->rope_cos, c->rope_sin, pool->k, pool->v, c->dt, c->stream));
}

static uc_status cuda_kv_copy_blocks(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                    const int32_t *dst, const int32_t *src, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    const int32_t *parts[2] = {dst, src};
    int64_t counts[2] = {n, n};
    int32_t *dev[2];
    uc_status rc = upload_idx(c, dev, parts, counts, 2);
    if (rc == UC_OK) {
        rc = CU(uc_cuda_kv_copy_blocks(pool->k, pool->v, dev[0], dev[1], n,
                                       pool->block_tokens * pool->head_dim, c->dt, c->stream));
    }
    return rc;
}

static uc_status cuda_kv_nonfinite(struct uc_backend *be, const struct uc_kv_pool_view *pool,
                                   const int32_t *blocks, const int32_t *n_valid,
                                   const int32_t *kdim, int64_t n, int32_t *bad)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    const int32_t *parts[3] = {blocks, n_valid, kdim};
    int64_t counts[3] = {n, n, n};
    int32_t *dev[3];
    uc_status rc;
    UC_CHECK(upload_idx(c, dev, parts, counts, kdim ? 3 : 2), rc, out);
    UC_CHECK(buf_reserve(c, &c->outp, (size_t)n * sizeof(int32_t)), rc, out);
    UC_CHECK(CU(uc_cuda_kv_nonfinite(c->outp.p, pool->k, pool->v, dev[0], dev[1],
                                     kdim ? dev[2] : NULL, n, pool->block_tokens, pool->head_dim,
                                     c->dt, c->stream)),
             rc, out);
    rc = download_sync(c, bad, c->outp.p, (size_t)n * sizeof(int32_t));
out:
    return rc;
}

/* ---- packed heads (ThinK) --------------------------------------------------------------- */

static uc_status cuda_kv_scatter_packed(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                        const void *k_src, const void *v_src, int64_t ld,
                                        const int32_t *src_row, const int32_t *src_head,
                                        const int32_t *slot, int64_t n, int64_t kdim,
                                        const int32_t *chan)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    const int32_t *parts[4] = {src_row, src_head, slot, chan};
    int64_t counts[4] = {n, n, n, kdim};
    int32_t *dev[4];
    uc_status rc = upload_idx(c, dev, parts, counts, 4);
    if (rc == UC_OK) {
        rc = CU(uc_cuda_kv_scatter_packed(pool->k, pool->v, k_src, v_src, ld, dev[0], dev[1],
                                          dev[2], n, kdim, dev[3], pool->block_tokens,
                                          pool->head_dim, c->dt, c->stream));
    }
    return rc;
}

static uc_status cuda_kv_scatter_latent(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                        const void *k_src, const void *v_src, int64_t ld,
                                        const int32_t *src_row, const int32_t *src_head,
                                        const int32_t *pos, const int32_t *slot, int64_t n,
                                        int64_t rank, const void *basis)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    if (pool->head_dim / 2 != c->rope_half) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "latent scatter: D=%lld, rope half %lld",
                       (long long)pool->head_dim, (long long)c->rope_half);
    }
    for (int64_t e = 0; e < n; e++) {
        if (pos[e] < 0 || pos[e] >= c->rope_max_pos) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "latent scatter: position %d outside the rope "
                           "table", pos[e]);
        }
    }
    const int32_t *parts[4] = {src_row, src_head, pos, slot};
    int64_t counts[4] = {n, n, n, n};
    int32_t *dev[4];
    uc_status rc = upload_idx(c, dev, parts, counts, 4);
    if (rc == UC_OK) {
        rc = CU(uc_cuda_kv_scatter_latent(pool->k, pool->v, k_src, v_src, ld, dev[0], dev[1],
                                          dev[2], dev[3], n, rank, basis, c->rope_cos,
                                          c->rope_sin, pool->block_tokens, pool->head_dim, c->dt,
                                          c->stream));
    }
    return rc;
}

static uc_status cuda_kv_append_latent(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                       const void *qkv, int64_t ld, int64_t n_heads,
                                       int64_t n_heads_kv, const int32_t *pos,
                                       const int32_t *slot, const int32_t *rank,
                                       const void *basis, int64_t n_tok)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_kv_append_latent(pool->k, pool->v, qkv, ld, n_heads, n_heads_kv, pos, slot,
                                       rank, basis, n_tok, pool->block_tokens, pool->head_dim,
                                       c->dt, c->stream));
}

static uc_status cuda_kv_append_packed(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                       const void *qkv, int64_t ld, int64_t n_heads,
                                       int64_t n_heads_kv, const int32_t *slot,
                                       const int32_t *kdim, const int32_t *coff,
                                       const int32_t *chan, int64_t n_tok)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_kv_append_packed(pool->k, pool->v, qkv, ld, n_heads, n_heads_kv, slot,
                                       kdim, coff, chan, n_tok, pool->block_tokens,
                                       pool->head_dim, c->dt, c->stream));
}

static uc_status cuda_kv_move_packed(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                     int32_t dst_slot, int32_t src_slot, int64_t kdim)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_kv_move_packed(pool->k, pool->v, pool->block_tokens, pool->head_dim, kdim,
                                     dst_slot, src_slot, c->dt, c->stream));
}

/* ---- merged rows (MiniCache) ------------------------------------------------------------ */

static uc_status cuda_kv_merge_dist(struct uc_backend *be, double *dist,
                                    const struct uc_kv_pool_view *pool, const int32_t *a_slot,
                                    const void *k_src, const void *v_src, int64_t ld,
                                    const int32_t *src_row, int64_t head, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    const int32_t *parts[2] = {a_slot, src_row};
    int64_t counts[2] = {n, n};
    int32_t *dev[2];
    uc_status rc;
    UC_CHECK(upload_idx(c, dev, parts, counts, 2), rc, out);
    UC_CHECK(buf_reserve(c, &c->outp, (size_t)(2 * n) * sizeof(double)), rc, out);
    UC_CHECK(CU(uc_cuda_kv_merge_dist(c->outp.p, pool->k, pool->v, k_src, v_src, ld, dev[0],
                                      dev[1], head, n, pool->head_dim, c->dt, c->stream)),
             rc, out);
    rc = download_sync(c, dist, c->outp.p, (size_t)(2 * n) * sizeof(double));
out:
    return rc;
}

static uc_status cuda_kv_merge_write(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                     const int32_t *a_slot, const void *k_src, const void *v_src,
                                     int64_t ld, const int32_t *src_row, int64_t head,
                                     const int32_t *m_slot, int64_t n, float t)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n <= 0) {
        return UC_OK;
    }
    const int32_t *parts[3] = {a_slot, src_row, m_slot};
    int64_t counts[3] = {n, n, n};
    int32_t *dev[3];
    uc_status rc = upload_idx(c, dev, parts, counts, 3);
    if (rc == UC_OK) {
        rc = CU(uc_cuda_kv_merge_write(pool->k, pool->v, k_src, v_src, ld, dev[0], dev[1], head,
                                       dev[2], n, t, pool->block_tokens, pool->head_dim, c->dt,
                                       c->stream));
    }
    return rc;
}

static uc_status cuda_chan_sumsq(struct uc_backend *be, double *out, const void *x, int64_t ld,
                                 const int32_t *rows, int64_t n_rows, int64_t width)
{
    struct cuda_ctx *c = ctx_of(be);
    if (width <= 0) {
        return UC_OK;
    }
    const int32_t *parts[1] = {rows};
    int64_t counts[1] = {n_rows};
    int32_t *dev[1];
    uc_status rc;
    UC_CHECK(upload_idx(c, dev, parts, counts, 1), rc, out);
    UC_CHECK(buf_reserve(c, &c->outp, (size_t)width * sizeof(double)), rc, out);
    UC_CHECK(CU(uc_cuda_chan_sumsq(c->outp.p, x, ld, dev[0], n_rows, width, c->dt, c->stream)),
             rc, out);
    rc = download_sync(c, out, c->outp.p, (size_t)width * sizeof(double));
out:
    return rc;
}

static uc_status cuda_kv_move(struct uc_backend *be, struct uc_kv_pool_view *pool, int32_t dst_slot,
                              int32_t src_slot)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_kv_move(pool->k, pool->v, pool->head_dim, dst_slot, src_slot, c->dt,
                              c->stream));
}

static uc_status cuda_argmax(struct uc_backend *be, int32_t *out, const void *x, int64_t n_tok,
                             int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (n_tok <= 0) {
        return UC_OK;
    }
    uc_status rc;
    UC_CHECK(buf_reserve(c, &c->outp, (size_t)n_tok * sizeof(int32_t)), rc, out);
    UC_CHECK(CU(uc_cuda_argmax(c->outp.p, x, n_tok, n, c->dt, c->stream)), rc, out);
    rc = download_sync(c, out, c->outp.p, (size_t)n_tok * sizeof(int32_t));
out:
    return rc;
}

static uc_status cuda_argmax_keep(struct uc_backend *be, int32_t *dev_out, const void *x,
                                  int64_t n_tok, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    return n_tok > 0 ? CU(uc_cuda_argmax(dev_out, x, n_tok, n, c->dt, c->stream)) : UC_OK;
}

static uc_status cuda_embed_ids(struct uc_backend *be, void *dst, const void *table,
                                const int32_t *ids, int64_t n_ids, int64_t n_table, int64_t width)
{
    struct cuda_ctx *c = ctx_of(be);
    return CU(uc_cuda_gather_ids(dst, table, ids, n_ids, n_table, width, c->dt, c->stream));
}

static uc_status cuda_ids_fetch_begin(struct uc_backend *be, int slot, const int32_t *dev,
                                      int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (slot < 0 || slot > 1 || n < 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "ids fetch slot %d of %lld ids", slot, (long long)n);
    }
    uc_status rc = UC_OK;
    if (!c->fetch[slot].done) {
        UC_CHECK(CU(cudaEventCreateWithFlags(&c->fetch[slot].done, cudaEventDisableTiming)), rc,
                 out);
    }
    if (n > c->fetch[slot].cap) {
        /* nothing pending writes the old copy: its end was waited for before this begin */
        if (c->fetch[slot].pin) {
            (void)cudaFreeHost(c->fetch[slot].pin);
            c->fetch[slot].pin = NULL;
            c->fetch[slot].cap = 0;
        }
        UC_CHECK(CU(cudaHostAlloc((void **)&c->fetch[slot].pin, (size_t)n * sizeof(int32_t),
                                  cudaHostAllocDefault)),
                 rc, out);
        c->fetch[slot].cap = n;
    }
    if (n > 0) {
        UC_CHECK(CU(cudaMemcpyAsync(c->fetch[slot].pin, dev, (size_t)n * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, c->stream)),
                 rc, out);
    }
    UC_CHECK(CU(cudaEventRecord(c->fetch[slot].done, c->stream)), rc, out);
    c->fetch[slot].n = n;
out:
    return rc;
}

static uc_status cuda_ids_fetch_end(struct uc_backend *be, int slot, int32_t *out, int64_t n)
{
    struct cuda_ctx *c = ctx_of(be);
    if (slot < 0 || slot > 1 || n != c->fetch[slot].n) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "ids fetch slot %d: %lld ids asked, %lld begun", slot,
                       (long long)n, (long long)(slot >= 0 && slot <= 1 ? c->fetch[slot].n : 0));
    }
    uc_status rc = CU(cudaEventSynchronize(c->fetch[slot].done));
    if (rc == UC_OK && n > 0) {
        memcpy(out, c->fetch[slot].pin, (size_t)n * sizeof(int32_t));
    }
    c->fetch[slot].n = -1;
    return rc;
}

/* ---- lifecycle -------------------------------------------------------------------------- */

/* ---- graphs ---------------------------------------------------------------------------- */

static uc_status cuda_graph_begin(struct uc_backend *be)
{
    struct cuda_ctx *c = ctx_of(be);
    uc_status rc = CU(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    c->capturing = rc == UC_OK;
    return rc;
}

static uc_status cuda_graph_end(struct uc_backend *be, void **out)
{
    struct cuda_ctx *c = ctx_of(be);
    cudaGraph_t g = NULL;
    cudaGraphExec_t x = NULL;
    *out = NULL;
    c->capturing = false;
    uc_status rc = CU(cudaStreamEndCapture(c->stream, &g));
    if (rc == UC_OK) {
        rc = CU(cudaGraphInstantiate(&x, g, 0));
    }
    if (g) {
        (void)cudaGraphDestroy(g);
    }
    if (rc == UC_OK) {
        *out = x;
    }
    return rc;
}

static uc_status cuda_graph_launch(struct uc_backend *be, void *graph)
{
    return CU(cudaGraphLaunch((cudaGraphExec_t)graph, ctx_of(be)->stream));
}

static void cuda_graph_destroy(struct uc_backend *be, void *graph)
{
    if (graph) {
        (void)cudaGraphExecDestroy((cudaGraphExec_t)graph);
    }
}

static uint64_t cuda_graph_epoch(struct uc_backend *be) { return ctx_of(be)->epoch; }

/* A staging buffer in pinned memory and the event that follows its last copy. */
static void pinned_free(void *pin, cudaEvent_t done)
{
    if (pin) {
        (void)cudaFreeHost(pin);
    }
    if (done) {
        (void)cudaEventDestroy(done);
    }
}

static void cuda_destroy(struct uc_backend *be)
{
    if (!be) {
        return;
    }
    struct cuda_ctx *c = be->ctx;
    if (c) {
        if (c->stream) {
            (void)cudaStreamSynchronize(c->stream);
            struct dev_buf *bufs[] = {&c->idx,  &c->conv,  &c->work, &c->outp,
                                      &c->dbl,  &c->cnt,   &c->pmask, &c->lmask, &c->rows};
            for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
                if (bufs[i]->p) {
                    (void)cudaFreeAsync(bufs[i]->p, c->stream);
                }
            }
            if (c->rope_cos) {
                (void)cudaFreeAsync(c->rope_cos, c->stream);
            }
            if (c->rope_sin) {
                (void)cudaFreeAsync(c->rope_sin, c->stream);
            }
            (void)cudaStreamSynchronize(c->stream);
        }
        if (c->qs.stream) {
            (void)cudaStreamSynchronize(c->qs.stream);
            struct dev_buf *side[] = {&c->qs.dbl, &c->qs.outp};
            for (size_t i = 0; i < sizeof side / sizeof side[0]; i++) {
                if (side[i]->p) {
                    (void)cudaFreeAsync(side[i]->p, c->qs.stream);
                }
            }
            (void)cudaStreamSynchronize(c->qs.stream);
        }
        if (c->qs.blas) {
            (void)cublasDestroy(c->qs.blas);
        }
        if (c->qs.ready) {
            (void)cudaEventDestroy(c->qs.ready);
        }
        for (int i = 0; i < 2; i++) {
            if (c->fetch[i].pin) {
                (void)cudaFreeHost(c->fetch[i].pin);
            }
            if (c->fetch[i].done) {
                (void)cudaEventDestroy(c->fetch[i].done);
            }
        }
        for (int i = 0; i < UC_QSPEC_BATCHES; i++) {
            struct qs_slot *sl = &c->qs.slot[i];
            pinned_free(sl->pin, sl->done);
            if (sl->read) {
                (void)cudaEventDestroy(sl->read);
            }
            uc_free(sl->host);
        }
        for (int32_t i = 0; i < c->n_ws; i++) {
            pinned_free(c->ws[i].pin, c->ws[i].done);
        }
        uc_free(c->ws);
        if (c->qs.stream) {
            (void)cudaStreamDestroy(c->qs.stream);
        }

        if (c->pos_pin) {
            (void)cudaFreeHost(c->pos_pin);
            (void)cudaFree(c->pos_dev);
        }
        if (c->pos_done) {
            (void)cudaEventDestroy(c->pos_done);
        }
        for (int i = 0; i < STAGE_SLOTS; i++) {
            pinned_free(c->slots[i].host, c->slots[i].done);
        }
        uc_cuda_lt_fini(c->lt);
        if (c->blas) {
            (void)cublasDestroy(c->blas);
        }
        if (c->blas_ws) {
            (void)cudaFree(c->blas_ws);
        }
        if (c->stream) {
            (void)cudaStreamDestroy(c->stream);
        }
        uc_free(c);
    }
    uc_free(be);
}

static const struct uc_backend_ops cuda_ops = {
    .alloc = cuda_alloc,
    .mem_available = cuda_mem_available,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .copy = cuda_copy,
    .scatter_ints = cuda_scatter_ints,
    .download_f32 = cuda_download_f32,
    .upload_f32 = cuda_upload_f32,
    .sync = cuda_sync,
    .act_size = cuda_act_size,
    .weight_create = cuda_weight_create,
    .weight_free = cuda_weight_free,
    .weight_random = cuda_weight_random,
    .rope_init = cuda_rope_init,
    .rmsnorm = cuda_rmsnorm,
    .matmul = cuda_matmul,
    .add_rmsnorm = cuda_add_rmsnorm,
    .matmul_residual = cuda_matmul_residual,
    .matmul_swiglu = cuda_matmul_swiglu,
    .add_bias = cuda_add_bias,
    .add = cuda_add,
    .rope = cuda_rope,
    .swiglu = cuda_swiglu,
    .copy_rows = cuda_copy_rows,
    .gather_rows = cuda_gather_rows,
    .attn_prefill = cuda_attn_prefill,
    .window_probs = cuda_window_probs,
    .window_scores = cuda_window_scores,
    .window_scores_begin = cuda_window_scores_begin,
    .window_scores_end = cuda_window_scores_end,
    .attn_colsum = cuda_attn_colsum,
    .qcov = cuda_qcov,
    .qspec = cuda_qspec,
    .argmax_keep = cuda_argmax_keep,
    .embed_ids = cuda_embed_ids,
    .ids_fetch_begin = cuda_ids_fetch_begin,
    .ids_fetch_end = cuda_ids_fetch_end,
    .qspec_begin = cuda_qspec_begin,
    .qspec_fence = cuda_qspec_fence,
    .qspec_end = cuda_qspec_end,
    .kv_pool_create = cuda_kv_pool_create,
    .kv_pool_destroy = cuda_kv_pool_destroy,
    .kv_scatter = cuda_kv_scatter,
    .rope_append = cuda_rope_append,
    .attn_decode = cuda_attn_decode,
    .kv_move = cuda_kv_move,
    .kv_copy_blocks = cuda_kv_copy_blocks,
    .kv_nonfinite = cuda_kv_nonfinite,
    .kv_scatter_packed = cuda_kv_scatter_packed,
    .kv_scatter_latent = cuda_kv_scatter_latent,
    .kv_append_latent = cuda_kv_append_latent,
    .kv_append_packed = cuda_kv_append_packed,
    .kv_move_packed = cuda_kv_move_packed,
    .kv_merge_dist = cuda_kv_merge_dist,
    .kv_merge_write = cuda_kv_merge_write,
    .chan_sumsq = cuda_chan_sumsq,
    .graph_begin = cuda_graph_begin,
    .graph_end = cuda_graph_end,
    .graph_launch = cuda_graph_launch,
    .graph_destroy = cuda_graph_destroy,
    .graph_epoch = cuda_graph_epoch,
    .argmax = cuda_argmax,
    .destroy = cuda_destroy,
};

int uc_backend_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

/* device_index if set, else this rank's local rank under mpirun, else 0 (modulo the count). */
static int pick_device(const struct uc_backend_params *p, int count)
{
    if (p && p->device_index >= 0) {
        return p->device_index;
    }
    const char *lr = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    int d = lr ? atoi(lr) : 0;
    return d >= 0 ? d % count : 0;
}

uc_status uc_backend_cuda_create(struct uc_backend **out, const struct uc_backend_params *p)
{
    *out = NULL;
    int count = uc_backend_cuda_device_count();
    if (count <= 0) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "backend=cuda: no CUDA device is visible");
    }
    int dev = pick_device(p, count);
    if (dev >= count) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "backend=cuda: device %d of %d", dev, count);
    }
    uc_status rc;
    struct uc_backend *be = uc_calloc(1, sizeof *be);
    struct cuda_ctx *c = uc_calloc(1, sizeof *c);
    if (!be || !c) {
        uc_free(be);
        uc_free(c);
        return UC_ERRF(UC_ERR_NOMEM, "cuda backend");
    }
    be->ops = &cuda_ops;
    be->ctx = c;
    be->kind = UC_BACKEND_CUDA;
    be->name = "cuda";
    be->device_index = dev;
    c->device = dev;
    c->fp32 = p && p->fp32;
    c->dt = c->fp32 ? UC_CUDA_F32 : UC_CUDA_BF16;
    c->act = c->fp32 ? sizeof(float) : 2;
    UC_CHECK(CU(cudaSetDevice(dev)), rc, out_destroy);
    struct cudaDeviceProp prop;
    UC_CHECK(CU(cudaGetDeviceProperties(&prop, dev)), rc, out_destroy);
    c->n_sms = prop.multiProcessorCount;
    /* decode kernels as programmatic dependent launches on sm_90 (UC_CUDA_PDL=0: off, a
     * measurement switch) */
    const char *pdl_env = getenv("UC_CUDA_PDL");
    int pdl = prop.major >= 9 && !(pdl_env && !strcmp(pdl_env, "0"));
    uc_cuda_set_pdl(pdl);
    /* Products of up to 8 rows run on gemv_tc.cu (bf16, sm_80+; gemv.cu otherwise), each row
     * summed the same way at any row count, so the n choices of a greedy request equal the
     * request alone (tests/e2e: n_choices_*). cuBLAS's sums depend on the row count (call E6:
     * those two e2e checks fail with it from two rows). gemv_tc puts the rows on the tensor
     * cores: decode steps at batch 2 / 4 / 8 of 4.90 / 5.26 / 5.43 ms against 4.95 / 6.41 /
     * 10.34 on gemv.cu, which does each row's multiply-adds on the CUDA cores; at batch 1 gemv.cu
     * is the faster, 4.44 against 4.73 (H200, Llama-3-8B shapes, call F4). UC_CUDA_GEMV_TC=0
     * keeps gemv.cu for every batch of 1-8; UC_CUDA_GEMV_ROWS=1 sends batches of 2-8 to cuBLAS,
     * trading the equality for its speed. */
    const char *gemv_env = getenv("UC_CUDA_GEMV_ROWS");
    c->gemv_rows = gemv_env ? strtol(gemv_env, NULL, 10) : 8;
    const char *tc_env = getenv("UC_CUDA_GEMV_TC");
    c->gemv_tc = prop.major >= 8 && !(tc_env && !strcmp(tc_env, "0"));
    const char *re_env = getenv("UC_CUDA_RESIDUAL_EPILOGUE");
    c->residual_epilogue = !(re_env && !strcmp(re_env, "0"));
    snprintf(be->device_name, sizeof be->device_name, "%.100s (sm_%d%d)%s", prop.name, prop.major,
             prop.minor, c->fp32 ? " fp32" : "");
    /* keep freed pool memory instead of returning it to the driver at every sync */
    cudaMemPool_t mp;
    UC_CHECK(CU(cudaDeviceGetDefaultMemPool(&mp, dev)), rc, out_destroy);
    uint64_t thr = UINT64_MAX;
    UC_CHECK(CU(cudaMemPoolSetAttribute(mp, cudaMemPoolAttrReleaseThreshold, &thr)), rc,
             out_destroy);
    UC_CHECK(CU(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)), rc, out_destroy);
    be->stream = c->stream;
    for (int i = 0; i < STAGE_SLOTS; i++) {
        UC_CHECK(CU(cudaEventCreateWithFlags(&c->slots[i].done, cudaEventDisableTiming)), rc,
                 out_destroy);
    }
    UC_CHECK(BLAS(cublasCreate(&c->blas)), rc, out_destroy);
    UC_CHECK(BLAS(cublasSetStream(c->blas, c->stream)), rc, out_destroy);
    UC_CHECK(CU(cudaMalloc(&c->blas_ws, BLAS_WS_BYTES)), rc, out_destroy);
    UC_CHECK(BLAS(cublasSetWorkspace(c->blas, c->blas_ws, BLAS_WS_BYTES)), rc, out_destroy);
    UC_CHECK(BLAS(cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH)), rc, out_destroy);
    if (!c->fp32) {
        UC_CHECK(uc_cuda_lt_init(&c->lt, prop.major, c->blas_ws, BLAS_WS_BYTES), rc, out_destroy);
    }
    UC_LOG_INFO("cuda backend: device=%d name=\"%s\" sms=%d mem=%.1fGiB dtype=%s pdl=%d "
                "lt_tiles=%d",
                dev, be->device_name, c->n_sms, (double)prop.totalGlobalMem / 1073741824.0,
                c->fp32 ? "f32" : "bf16", pdl, c->lt != NULL);
    *out = be;
    return UC_OK;
out_destroy:
    cuda_destroy(be);
    return rc;
}
