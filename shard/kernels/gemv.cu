/* gemv: y (T, N) = x (T, K) w^T for a few rows (T <= 8, decode), bf16 weights streamed once at
 * close to the memory bandwidth: one warp per output column n, each lane loading 16-byte vectors
 * of w's row n (cache-streaming loads: the weights are read once per step) and the matching x
 * vectors (shared by every warp, so they stay in L1/L2), float32 accumulation, a warp
 * reduction at the end. cuBLAS handles larger T and float32. A row's sums are the same at
 * any T (batch-invariant), but each further row adds its multiply-adds on the CUDA cores (a
 * decode step at batch 8 takes 10.3 ms here), so bf16 products with K % 32 == 0 run on
 * gemv_tc.cu's tensor cores instead (5.4 ms), though this kernel is the faster at one row
 * (UC_CUDA_GEMV_TC=0 in backend_cuda.c keeps it for 1-8 rows).
 *
 * As programmatic dependent launches (uck_launch) the products start while the kernel before
 * them (a norm, the attention merge, the previous product) runs or drains: the weights do not
 * depend on it, so each warp loads its first vectors and asks L2 for the next ones before it
 * waits for x. */
#include <type_traits>

#include "common.cuh"

#define GEMV_WARPS 8

static __device__ __forceinline__ void unpack8(const uint4 v, float *f)
{
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

#define GEMV_UNROLL 4
#define GEMV_PREFETCH 4 /* vectors per lane asked of L2 before the wait, past the first loads */

/* The part of a row a lane reads first, before the kernel waits for its input: N vectors
 * into registers (returns whether the row holds them all) and P more asked of L2. */
template <int N, int P>
static __device__ __forceinline__ bool gemv_preload(uint4 *wv, const uint4 *wr, int lane, int nv)
{
    bool pre = lane + 32 * (N - 1) < nv;
    if (pre) {
#pragma unroll
        for (int u = 0; u < N; u++) {
            wv[u] = __ldcs(wr + lane + 32 * u);
        }
    }
#pragma unroll
    for (int u = 0; u < P; u++) {
        int v = lane + 32 * (N + u);
        if (v < nv) {
            uck_prefetch_l2(wr + v);
        }
    }
    return pre;
}

/* One warp per output column; each lane issues GEMV_UNROLL independent 16-byte weight loads
 * before using any of them, so every SM keeps enough bytes in flight to cover the memory
 * latency (Little's law), then reads the matching x vectors (L1 hits after the first warp). */
/* Calls launch(std::integral_constant<int, T>) for the row count T in [1, 8]: the kernels are
 * templates on it so their accumulators stay in registers. */
template <typename F> static cudaError_t dispatch_rows(int64_t n_tok, F launch)
{
    switch (n_tok) {
    case 1: launch(std::integral_constant<int, 1>()); break;
    case 2: launch(std::integral_constant<int, 2>()); break;
    case 3: launch(std::integral_constant<int, 3>()); break;
    case 4: launch(std::integral_constant<int, 4>()); break;
    case 5: launch(std::integral_constant<int, 5>()); break;
    case 6: launch(std::integral_constant<int, 6>()); break;
    case 7: launch(std::integral_constant<int, 7>()); break;
    case 8: launch(std::integral_constant<int, 8>()); break;
    default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

template <int TT>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(uc_bf16_t *__restrict__ y, const uc_bf16_t *__restrict__ x,
                const uc_bf16_t *__restrict__ w, int n_out, int n_in)
{
    int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n_out) {
        return;
    }
    const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)row * n_in);
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) {
        acc[t] = 0.0f;
    }
    int nv = n_in >> 3;
    int v = lane;
    uint4 wv[GEMV_UNROLL];
    bool pre = gemv_preload<GEMV_UNROLL, GEMV_PREFETCH>(wv, wr, lane, nv);
    uck_grid_wait(); /* x is the previous kernel's output */
    for (; v + 32 * (GEMV_UNROLL - 1) < nv; v += 32 * GEMV_UNROLL) {
        if (!pre) {
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) {
                wv[u] = __ldcs(wr + v + 32 * u);
            }
        }
        pre = false;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            float wf[8];
            unpack8(wv[u], wf);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                uint4 xv = __ldg(reinterpret_cast<const uint4 *>(x + (size_t)t * n_in) + v +
                                 32 * u);
                float xf[8];
                unpack8(xv, xf);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    acc[t] = fmaf(wf[i], xf[i], acc[t]);
                }
            }
        }
    }
    for (; v < nv; v += 32) {
        uint4 wv = __ldcs(wr + v);
        float wf[8];
        unpack8(wv, wf);
#pragma unroll
        for (int t = 0; t < TT; t++) {
            uint4 xv = __ldg(reinterpret_cast<const uint4 *>(x + (size_t)t * n_in) + v);
            float xf[8];
            unpack8(xv, xf);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                acc[t] = fmaf(wf[i], xf[i], acc[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) {
        float s = uck_warp_sum(acc[t]);
        if (lane == 0) {
            y[(size_t)t * n_out + row] = __float2bfloat16_rn(s);
        }
    }
}

/* y (T, F) = silu(x wg^T) * (x wu^T): one warp per output column n streams row n of the gate
 * half and row n of the up half. */
template <int TT>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_swiglu_kernel(uc_bf16_t *__restrict__ y, const uc_bf16_t *__restrict__ x,
                       const uc_bf16_t *__restrict__ w, int n_ffn, int n_in)
{
    int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n_ffn) {
        return;
    }
    const uint4 *wg = reinterpret_cast<const uint4 *>(w + (size_t)row * n_in);
    const uint4 *wu = reinterpret_cast<const uint4 *>(w + ((size_t)n_ffn + row) * n_in);
    float ag[TT], au[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) {
        ag[t] = 0.0f;
        au[t] = 0.0f;
    }
    int nv = n_in >> 3;
    int v = lane;
    /* before the wait: this lane's first two vectors of each matrix, more of both in L2 */
    uint4 gv[2], uv[2];
    bool pre = gemv_preload<2, GEMV_PREFETCH / 2>(gv, wg, lane, nv);
    gemv_preload<2, GEMV_PREFETCH / 2>(uv, wu, lane, nv);
    uck_grid_wait();
    for (; v + 32 < nv; v += 64) { /* two vectors of each matrix in flight per lane */
        if (!pre) {
#pragma unroll
            for (int u = 0; u < 2; u++) {
                gv[u] = __ldcs(wg + v + 32 * u);
                uv[u] = __ldcs(wu + v + 32 * u);
            }
        }
        pre = false;
#pragma unroll
        for (int u = 0; u < 2; u++) {
            float gf[8], uf[8];
            unpack8(gv[u], gf);
            unpack8(uv[u], uf);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                uint4 xv = __ldg(reinterpret_cast<const uint4 *>(x + (size_t)t * n_in) + v +
                                 32 * u);
                float xf[8];
                unpack8(xv, xf);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    ag[t] = fmaf(gf[i], xf[i], ag[t]);
                    au[t] = fmaf(uf[i], xf[i], au[t]);
                }
            }
        }
    }
    for (; v < nv; v += 32) {
        uint4 gv = __ldcs(wg + v), uv = __ldcs(wu + v);
        float gf[8], uf[8];
        unpack8(gv, gf);
        unpack8(uv, uf);
#pragma unroll
        for (int t = 0; t < TT; t++) {
            uint4 xv = __ldg(reinterpret_cast<const uint4 *>(x + (size_t)t * n_in) + v);
            float xf[8];
            unpack8(xv, xf);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                ag[t] = fmaf(gf[i], xf[i], ag[t]);
                au[t] = fmaf(uf[i], xf[i], au[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) {
        /* the products round to bf16 first, as the unfused matmul then swiglu would */
        float g = __bfloat162float(__float2bfloat16_rn(uck_warp_sum(ag[t])));
        float u = __bfloat162float(__float2bfloat16_rn(uck_warp_sum(au[t])));
        if (lane == 0) {
            y[(size_t)t * n_ffn + row] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
        }
    }
}

extern "C" cudaError_t uc_cuda_gemv_swiglu(void *y, const void *x, const void *w, int64_t n_tok,
                                           int64_t n_ffn, int64_t n_in, cudaStream_t stream)
{
    unsigned blocks = (unsigned)((n_ffn + GEMV_WARPS - 1) / GEMV_WARPS);
    return dispatch_rows(n_tok, [&](auto rows) {
        uck_launch(gemv_swiglu_kernel<decltype(rows)::value>, dim3(blocks), dim3(GEMV_WARPS * 32),
                   0, stream, y, x, w, (int)n_ffn, (int)n_in);
    });
}

extern "C" bool uc_cuda_gemv_supported(int64_t n_tok, int64_t n_out, int64_t n_in,
                                       enum uc_cuda_dtype dt)
{
    return dt == UC_CUDA_BF16 && n_tok >= 1 && n_tok <= 8 && n_in % 8 == 0 && n_in <= INT32_MAX &&
           n_out <= INT32_MAX;
}

extern "C" cudaError_t uc_cuda_gemv(void *y, const void *x, const void *w, int64_t n_tok,
                                    int64_t n_out, int64_t n_in, cudaStream_t stream)
{
    unsigned blocks = (unsigned)((n_out + GEMV_WARPS - 1) / GEMV_WARPS);
    return dispatch_rows(n_tok, [&](auto rows) {
        uck_launch(gemv_kernel<decltype(rows)::value>, dim3(blocks), dim3(GEMV_WARPS * 32), 0,
                   stream, y, x, w, (int)n_out, (int)n_in);
    });
}
