/* gemv_tc: y (T, N) = x (T, K) w^T for 1 to 8 rows (decode) in bf16, the weights streamed once
 * from memory into the tensor cores, each output summed the same way whatever T is.
 *
 * gemv.cu does a row's multiply-adds on the CUDA cores, so its cost grows with T: a decode step
 * at batch 8 took 10.5 ms on it against 5.25 on cuBLAS (H200, Llama-3-8B shapes). cuBLAS sums
 * in an order that depends on T, and then the n choices of a greedy request part from the
 * request run alone. Here the batch is always one n8 tile of an m16n8k16 mma (rows past T are
 * zero), so the work and the order of every sum are those of T = 8 at any T.
 *
 * A block owns 16 weight rows; its 8 warps take K in chunks of 32 columns, chunk j to warp
 * j % 8. Lane (g, c) of a warp (g = lane / 4, c = lane % 4) loads 16 bytes of weight rows g and
 * g + 8 and of x's row g at columns 8c..8c+7 of the chunk, straight into registers: the mma's
 * k order is permuted the same way for both operands (its k = 2c, 2c+1, 2c+8, 2c+9 are the
 * columns 8c..8c+3; a second mma takes 8c+4..8c+7), so no shuffle or shared memory is needed.
 * The warps' float32 sums are added in warp order at the end and rounded to bf16. The swiglu
 * form streams the gate and up rows of the same 16 features and writes silu(g) * u, g and u
 * rounded to bf16 first as the unfused product then swiglu would.
 *
 * As a programmatic dependent launch the kernel loads its first weights before it waits for
 * the kernel that writes x. */
#include <stdlib.h>

#include "common.cuh"
#include "mma.cuh"

#define GT_WARPS 8
#define GT_THREADS (GT_WARPS * 32)
#define GT_ROWS 16  /* weight rows (features) per block: the mma's m */
#define GT_CHUNK 32 /* K columns a warp takes at a time: 16 bytes per lane and row */
#define GT_UNROLL 4 /* chunks whose loads a warp issues before it uses any */

template <bool SWIGLU, bool PIPE>
static __global__ void __launch_bounds__(GT_THREADS)
    gemv_tc_kernel(uc_bf16_t *__restrict__ y, const uc_bf16_t *__restrict__ x,
                   const uc_bf16_t *__restrict__ w, int t, int n_out, int n_in)
{
    constexpr int NA = SWIGLU ? 2 : 1; /* weight operands: the product's, or gate and up */
    /* chunks a warp loads at once: with PIPE the next group's loads are in flight while the
     * current group's mmas run, so the swiglu form (two weight operands) takes half as many */
    constexpr int U = PIPE && SWIGLU ? GT_UNROLL / 2 : GT_UNROLL;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * GT_ROWS;
    const int n_chunks = n_in / GT_CHUNK;
    const uint4 zero = make_uint4(0, 0, 0, 0);

    const uint4 *wr[NA][2];
    bool ok[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = row0 + g + 8 * h;
        ok[h] = r < n_out;
#pragma unroll
        for (int a = 0; a < NA; a++) {
            wr[a][h] = reinterpret_cast<const uint4 *>(w + (size_t)(ok[h] ? r + a * n_out : 0) *
                                                               n_in) + c;
        }
    }
    const bool xin = g < t;
    const uint4 *xr = reinterpret_cast<const uint4 *>(x + (size_t)(xin ? g : 0) * n_in) + c;

    uint4 wv[U][NA][2], wn[U][NA][2];
    auto load_w = [&](uint4 (&dst)[U][NA][2], int j0) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = j0 + GT_WARPS * u;
#pragma unroll
            for (int a = 0; a < NA; a++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    dst[u][a][h] = ok[h] && j < n_chunks ? __ldcs(wr[a][h] + j * 4) : zero;
                }
            }
        }
    };
    float acc[NA][4];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        acc[a][0] = acc[a][1] = acc[a][2] = acc[a][3] = 0.0f;
    }
    load_w(wv, warp); /* the weights do not depend on the kernel before */
    uck_grid_wait();
    for (int j0 = warp; j0 < n_chunks; j0 += GT_WARPS * U) {
        if (PIPE) {
            if (j0 + GT_WARPS * U < n_chunks) {
                load_w(wn, j0 + GT_WARPS * U);
            }
        } else if (j0 != warp) {
            load_w(wv, j0);
        }
        uint4 xv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = j0 + GT_WARPS * u;
            xv[u] = xin && j < n_chunks ? __ldg(xr + j * 4) : zero;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int a = 0; a < NA; a++) {
                const uint4 &lo = wv[u][a][0], &hi = wv[u][a][1];
                const uint32_t f0[4] = {lo.x, hi.x, lo.y, hi.y}; /* columns 8c..8c+3 */
                const uint32_t f1[4] = {lo.z, hi.z, lo.w, hi.w}; /* columns 8c+4..8c+7 */
                mma_bf16(acc[a], f0, xv[u].x, xv[u].y);
                mma_bf16(acc[a], f1, xv[u].z, xv[u].w);
            }
        }
        if (PIPE) {
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int a = 0; a < NA; a++) {
                    wv[u][a][0] = wn[u][a][0];
                    wv[u][a][1] = wn[u][a][1];
                }
            }
        }
    }

    /* acc[a][i]: row g + 8 (i / 2), token 2c + i % 2; the warps' sums added in warp order */
    __shared__ float red[GT_WARPS][NA][32][4];
#pragma unroll
    for (int a = 0; a < NA; a++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            red[warp][a][lane][i] = acc[a][i];
        }
    }
    __syncthreads();
    if (threadIdx.x >= 32 * 4) {
        return;
    }
    const int l = threadIdx.x >> 2, i = threadIdx.x & 3;
    const int row = row0 + (l >> 2) + 8 * (i >> 1), tok = 2 * (l & 3) + (i & 1);
    if (tok >= t || row >= n_out) {
        return;
    }
    float s[NA];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        s[a] = 0.0f;
        for (int v = 0; v < GT_WARPS; v++) {
            s[a] += red[v][a][l][i];
        }
    }
    if constexpr (SWIGLU) {
        const float gt = __bfloat162float(__float2bfloat16_rn(s[0]));
        const float up = __bfloat162float(__float2bfloat16_rn(s[NA - 1]));
        y[(size_t)tok * n_out + row] = __float2bfloat16_rn(gt / (1.0f + expf(-gt)) * up);
    } else {
        y[(size_t)tok * n_out + row] = __float2bfloat16_rn(s[0]);
    }
}

extern "C" bool uc_cuda_gemv_tc_supported(int64_t n_tok, int64_t n_out, int64_t n_in,
                                          enum uc_cuda_dtype dt)
{
    return dt == UC_CUDA_BF16 && n_tok >= 1 && n_tok <= 8 && n_in % GT_CHUNK == 0 &&
           n_in <= INT32_MAX && n_out <= INT32_MAX / 2;
}

extern "C" cudaError_t uc_cuda_gemv_tc(void *y, const void *x, const void *w, int64_t n_tok,
                                       int64_t n_out, int64_t n_in, bool swiglu,
                                       cudaStream_t stream)
{
    const unsigned blocks = (unsigned)((n_out + GT_ROWS - 1) / GT_ROWS);
    static int pipe = -1; /* experiment switch: UC_CUDA_GEMV_TC_PIPE=1 */
    if (pipe < 0) {
        const char *v = getenv("UC_CUDA_GEMV_TC_PIPE");
        pipe = v && v[0] == '1';
    }
    auto kernel = pipe ? (swiglu ? gemv_tc_kernel<true, true> : gemv_tc_kernel<false, true>)
                       : (swiglu ? gemv_tc_kernel<true, false> : gemv_tc_kernel<false, false>);
    uck_launch(kernel, dim3(blocks), dim3(GT_THREADS), 0, stream, (uc_bf16_t *)y,
               (const uc_bf16_t *)x, (const uc_bf16_t *)w, (int)n_tok, (int)n_out, (int)n_in);
    return cudaGetLastError();
}
