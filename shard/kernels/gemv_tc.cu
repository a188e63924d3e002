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
#define GT_CHUNK 32 /* K columns a warp takes at a time: 16 bytes per lane and weight row */
#define GT_LOADS 8  /* 16-byte loads of a weight operand a lane issues before it uses any */

/* Weight rows (features) of a block: R = 16 puts them in the mma's A operand (lane (g, c) loads
 * rows g and g + 8; the batch is B's n8), R = 8 in its B operand (lane (g, c) loads row g; the
 * batch is A's rows 0-7, rows 8-15 zero), which gives twice the blocks and warps for the same
 * weights. PIPE: two register buffers of loads, each refilled right after its mmas, so a group
 * of loads is in flight while the other's mmas run (one buffer waits for each group in turn). */
template <bool SWIGLU, bool PIPE, int R>
static __global__ void __launch_bounds__(GT_THREADS)
    gemv_tc_kernel(uc_bf16_t *__restrict__ y, const uc_bf16_t *__restrict__ x,
                   const uc_bf16_t *__restrict__ w, int t, int n_out, int n_in)
{
    constexpr int NA = SWIGLU ? 2 : 1; /* weight operands: the product's, or gate and up */
    constexpr int RL = R / 8;          /* weight rows a lane loads */
    /* chunks per group: GT_LOADS loads a lane per weight operand, halved for two buffers */
    constexpr int U = GT_LOADS / (RL * (PIPE ? 2 : 1));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * R;
    const int n_chunks = n_in / GT_CHUNK;
    const uint4 zero = make_uint4(0, 0, 0, 0);

    const uint4 *wr[NA][RL];
    bool ok[RL];
#pragma unroll
    for (int h = 0; h < RL; h++) {
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

    /* group j0: chunks j0 + GT_WARPS * u, u < U */
    auto load_w = [&](uint4 (&dst)[U][NA][RL], int j0) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = j0 + GT_WARPS * u;
#pragma unroll
            for (int a = 0; a < NA; a++) {
#pragma unroll
                for (int h = 0; h < RL; h++) {
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
    auto mma_group = [&](const uint4 (&wv)[U][NA][RL], int j0) {
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
                const uint4 &lo = wv[u][a][0], &hi = wv[u][a][RL - 1];
                if constexpr (R == 16) { /* columns 8c..8c+3, then 8c+4..8c+7 */
                    const uint32_t f0[4] = {lo.x, hi.x, lo.y, hi.y};
                    const uint32_t f1[4] = {lo.z, hi.z, lo.w, hi.w};
                    mma_bf16(acc[a], f0, xv[u].x, xv[u].y);
                    mma_bf16(acc[a], f1, xv[u].z, xv[u].w);
                } else {
                    const uint32_t f0[4] = {xv[u].x, 0u, xv[u].y, 0u};
                    const uint32_t f1[4] = {xv[u].z, 0u, xv[u].w, 0u};
                    mma_bf16(acc[a], f0, lo.x, lo.y);
                    mma_bf16(acc[a], f1, lo.z, lo.w);
                }
            }
        }
    };
    constexpr int STEP = GT_WARPS * U; /* chunks from one group of a warp to its next */
    uint4 wa[U][NA][RL], wb[U][NA][RL];
    load_w(wa, warp); /* the weights do not depend on the kernel before */
    if (PIPE) {
        load_w(wb, warp + STEP);
    }
    uck_grid_wait();
    if (PIPE) {
        for (int j0 = warp; j0 < n_chunks; j0 += 2 * STEP) {
            mma_group(wa, j0);
            if (j0 + 2 * STEP < n_chunks) {
                load_w(wa, j0 + 2 * STEP);
            }
            if (j0 + STEP < n_chunks) {
                mma_group(wb, j0 + STEP);
                if (j0 + 3 * STEP < n_chunks) {
                    load_w(wb, j0 + 3 * STEP);
                }
            }
        }
    } else {
        for (int j0 = warp; j0 < n_chunks; j0 += STEP) {
            if (j0 != warp) {
                load_w(wa, j0);
            }
            mma_group(wa, j0);
        }
    }

    /* acc[a][i], R = 16: row g + 8 (i / 2), token 2c + i % 2; R = 8: token g, row 2c + i
     * (i < 2). The warps' sums added in warp order. */
    constexpr int NI = R == 16 ? 4 : 2;
    __shared__ float red[GT_WARPS][NA][32][NI];
#pragma unroll
    for (int a = 0; a < NA; a++) {
#pragma unroll
        for (int i = 0; i < NI; i++) {
            red[warp][a][lane][i] = acc[a][i];
        }
    }
    __syncthreads();
    if (threadIdx.x >= 32 * NI) {
        return;
    }
    const int l = threadIdx.x / NI, i = threadIdx.x % NI;
    const int row = R == 16 ? row0 + (l >> 2) + 8 * (i >> 1) : row0 + 2 * (l & 3) + i;
    const int tok = R == 16 ? 2 * (l & 3) + (i & 1) : l >> 2;
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

template <int R, bool PIPE>
static void gemv_tc_go(void *y, const void *x, const void *w, int64_t n_tok, int64_t n_out,
                       int64_t n_in, bool swiglu, cudaStream_t stream)
{
    const unsigned blocks = (unsigned)((n_out + R - 1) / R);
    auto kernel = swiglu ? gemv_tc_kernel<true, PIPE, R> : gemv_tc_kernel<false, PIPE, R>;
    uck_launch(kernel, dim3(blocks), dim3(GT_THREADS), 0, stream, (uc_bf16_t *)y,
               (const uc_bf16_t *)x, (const uc_bf16_t *)w, (int)n_tok, (int)n_out, (int)n_in);
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
    static int variant = -1; /* experiment switch UC_CUDA_GEMV_TC_VARIANT: 0-3 */
    if (variant < 0) {
        const char *v = getenv("UC_CUDA_GEMV_TC_VARIANT");
        variant = v ? atoi(v) & 3 : 0;
    }
    switch (variant) {
    case 0: gemv_tc_go<16, false>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    case 1: gemv_tc_go<16, true>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    case 2: gemv_tc_go<8, false>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    default: gemv_tc_go<8, true>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    }
    return cudaGetLastError();
}
