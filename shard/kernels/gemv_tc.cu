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

/* A weight vector: 16 bytes, read once (streaming); HINT 1 / 2 asks L2 to fetch the 128 / 256
 * bytes around it from memory (the warps of a block read neighbouring 64-byte pieces of a row). */
template <int HINT> static __device__ __forceinline__ uint4 gt_load(const uint4 *p)
{
    uint4 v;
    if constexpr (HINT == 2) {
        asm volatile("ld.global.cs.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
    } else if constexpr (HINT == 1) {
        asm volatile("ld.global.cs.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
    } else {
        v = __ldcs(p);
    }
    return v;
}

/* A block owns 8 weight rows, the B operand of the mma (lane (g, c) loads row g); the batch is
 * A's rows 0-7 (rows 8-15 zero). The warp's chunks are chunk warp + 8 i (SLICE false) or
 * a contiguous slice of K (SLICE true), taken in groups of U; two register buffers of loads,
 * each refilled right after its mmas, keep a group in flight while the other's mmas run. */
template <bool SWIGLU, int HINT, bool SLICE>
static __global__ void __launch_bounds__(GT_THREADS)
    gemv_tc_kernel(uc_bf16_t *__restrict__ y, const uc_bf16_t *__restrict__ x,
                   const uc_bf16_t *__restrict__ w, int t, int n_out, int n_in)
{
    constexpr int NA = SWIGLU ? 2 : 1; /* weight operands: the product's, or gate and up */
    constexpr int R = 8;
    constexpr int U = GT_LOADS / 2; /* chunks per group: two buffers of GT_LOADS / 2 loads */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * R;
    const int n_chunks = n_in / GT_CHUNK;
    const int per = (n_chunks + GT_WARPS - 1) / GT_WARPS;
    const int first = SLICE ? warp * per : warp;
    const int count = SLICE ? max(0, min(per, n_chunks - first))
                            : (n_chunks - warp + GT_WARPS - 1) / GT_WARPS;
    const int stride = SLICE ? 1 : GT_WARPS; /* from one chunk of the warp to its next */
    const int n_groups = (count + U - 1) / U;
    const uint4 zero = make_uint4(0, 0, 0, 0);

    const int r = row0 + g;
    const bool ok = r < n_out;
    const uint4 *wr[NA];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        wr[a] = reinterpret_cast<const uint4 *>(w + (size_t)(ok ? r + a * n_out : 0) * n_in) + c;
    }
    const bool xin = g < t;
    const uint4 *xr = reinterpret_cast<const uint4 *>(x + (size_t)(xin ? g : 0) * n_in) + c;

    auto load_w = [&](uint4 (&dst)[U][NA], int grp) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = grp * U + u, j = first + i * stride;
#pragma unroll
            for (int a = 0; a < NA; a++) {
                dst[u][a] = ok && i < count ? gt_load<HINT>(wr[a] + j * 4) : zero;
            }
        }
    };
    float acc[NA][4];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        acc[a][0] = acc[a][1] = acc[a][2] = acc[a][3] = 0.0f;
    }
    auto mma_group = [&](const uint4 (&wv)[U][NA], int grp) {
        uint4 xv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = grp * U + u, j = first + i * stride;
            xv[u] = xin && i < count ? __ldg(xr + j * 4) : zero;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int a = 0; a < NA; a++) {
                /* k order: 2c, 2c+1, 2c+8, 2c+9 are columns 8c..8c+3, then 8c+4..8c+7 */
                const uint32_t f0[4] = {xv[u].x, 0u, xv[u].y, 0u};
                const uint32_t f1[4] = {xv[u].z, 0u, xv[u].w, 0u};
                mma_bf16(acc[a], f0, wv[u][a].x, wv[u][a].y);
                mma_bf16(acc[a], f1, wv[u][a].z, wv[u][a].w);
            }
        }
    };
    uint4 wa[U][NA], wb[U][NA];
    load_w(wa, 0); /* the weights do not depend on the kernel before */
    load_w(wb, 1);
    uck_grid_wait();
    for (int grp = 0; grp < n_groups; grp += 2) {
        mma_group(wa, grp);
        if (grp + 2 < n_groups) {
            load_w(wa, grp + 2);
        }
        if (grp + 1 < n_groups) {
            mma_group(wb, grp + 1);
            if (grp + 3 < n_groups) {
                load_w(wb, grp + 3);
            }
        }
    }

    /* acc[a][i]: token g, row 2c + i (i < 2); the warps' sums added in warp order */
    __shared__ float red[GT_WARPS][NA][32][2];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        red[warp][a][lane][0] = acc[a][0];
        red[warp][a][lane][1] = acc[a][1];
    }
    __syncthreads();
    if (threadIdx.x >= 64) {
        return;
    }
    const int l = threadIdx.x >> 1, i = threadIdx.x & 1;
    const int row = row0 + 2 * (l & 3) + i, tok = l >> 2;
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

template <int HINT, bool SLICE>
static void gemv_tc_go(void *y, const void *x, const void *w, int64_t n_tok, int64_t n_out,
                       int64_t n_in, bool swiglu, cudaStream_t stream)
{
    const unsigned blocks = (unsigned)((n_out + 7) / 8);
    auto kernel =
        swiglu ? gemv_tc_kernel<true, HINT, SLICE> : gemv_tc_kernel<false, HINT, SLICE>;
    uck_launch(kernel, dim3(blocks), dim3(GT_THREADS), 0, stream, (uc_bf16_t *)y,
               (const uc_bf16_t *)x, (const uc_bf16_t *)w, (int)n_tok, (int)n_out, (int)n_in);
}

/* The same product with the weights staged through shared memory: each cp.async instruction
 * of a warp copies 256 contiguous bytes of two weight rows (as gemv.cu's loads read 512 bytes
 * of one row), and ldmatrix hands them to the mma as its B operand. A warp's groups are 128
 * columns of the block's 8 rows (2 KB a weight operand), group i of warp w at columns
 * 128 (w + 8 i), three stages deep. x comes as 4-byte loads in the mma's A layout. */
#define GS_COLS 128 /* columns of a group */
#define GS_CH (GS_COLS / 8)
#define GS_ST 3

template <bool SWIGLU>
static __global__ void __launch_bounds__(GT_THREADS)
    gemv_tcs_kernel(uc_bf16_t *__restrict__ y, const uc_bf16_t *__restrict__ x,
                    const uc_bf16_t *__restrict__ w, int t, int n_out, int n_in)
{
    constexpr int NA = SWIGLU ? 2 : 1;
    extern __shared__ __align__(128) uint8_t gs_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * 8;
    const int n_groups = n_in / GS_COLS;
    const int count = (n_groups - warp + GT_WARPS - 1) / GT_WARPS;
    /* stage s, operand a, row r, chunk position p: buf + ((s NA + a) 8 + r) GS_COLS + 8 p */
    uc_bf16_t *buf = reinterpret_cast<uc_bf16_t *>(gs_smem) + warp * GS_ST * NA * 8 * GS_COLS;

    /* copy k (0-3) of a lane: row 2k + lane / 16, chunk lane % 16, stored at chunk (q ^ r) */
    const uc_bf16_t *src[NA][4];
    uint32_t dst[4];
    int bytes[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int r = 2 * k + (lane >> 4), q = lane & 15, row = row0 + r;
        const bool ok = row < n_out;
#pragma unroll
        for (int a = 0; a < NA; a++) {
            src[a][k] = w + (size_t)(ok ? row + a * n_out : 0) * n_in + q * 8;
        }
        dst[k] = smem_u32(buf + r * GS_COLS + (q ^ (r & 7)) * 8);
        bytes[k] = ok ? 16 : 0;
    }
    auto issue = [&](int i) {
        if (i < count) {
            const int col = (warp + GT_WARPS * i) * GS_COLS, st = i % GS_ST;
#pragma unroll
            for (int a = 0; a < NA; a++) {
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    cp_async16(dst[k] + (uint32_t)((st * NA + a) * 8 * GS_COLS * 2),
                               src[a][k] + col, bytes[k]);
                }
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < GS_ST - 1; i++) {
        issue(i); /* the weights do not depend on the kernel before */
    }
    uck_grid_wait();
    const bool xin = g < t;
    const uint32_t *xr = reinterpret_cast<const uint32_t *>(x + (size_t)(xin ? g : 0) * n_in) + c;
    /* ldmatrix: lane gives row lane % 8 of matrix lane / 8 (chunk 4m + lane / 8) */
    const int lr = lane & 7;
    const uint32_t lbase = smem_u32(buf + lr * GS_COLS);
    float acc[NA][2][4];
#pragma unroll
    for (int a = 0; a < NA; a++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            acc[a][h][0] = acc[a][h][1] = acc[a][h][2] = acc[a][h][3] = 0.0f;
        }
    }
    for (int i = 0; i < count; i++) {
        cp_async_wait<GS_ST - 2>();
        __syncwarp(); /* every lane's copies of group i are in; group i - 1 is read */
        issue(i + GS_ST - 1);
        const int col = (warp + GT_WARPS * i) * GS_COLS, st = i % GS_ST;
        uint32_t xa[GS_CH]; /* x[g][col + 8 q + 2c], x[g][col + 8 q + 2c + 1] */
#pragma unroll
        for (int q = 0; q < GS_CH; q++) {
            xa[q] = xin ? __ldg(xr + (col + 8 * q) / 2) : 0u;
        }
#pragma unroll
        for (int m = 0; m < GS_CH / 4; m++) {
            const int q = 4 * m + (lane >> 3);
#pragma unroll
            for (int a = 0; a < NA; a++) {
                uint32_t b[4];
                ldsm_x4(b, lbase + (uint32_t)(((st * NA + a) * 8 * GS_COLS + (q ^ lr) * 8) * 2));
                const uint32_t f0[4] = {xa[4 * m], 0u, xa[4 * m + 1], 0u};
                const uint32_t f1[4] = {xa[4 * m + 2], 0u, xa[4 * m + 3], 0u};
                mma_bf16(acc[a][0], f0, b[0], b[1]);
                mma_bf16(acc[a][1], f1, b[2], b[3]);
            }
        }
    }
    cp_async_wait_all();

    /* acc[a][h][i]: token g, row 2c + i (i < 2); the two halves, then the warps, in order */
    __shared__ float red[GT_WARPS][NA][32][2];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        red[warp][a][lane][0] = acc[a][0][0] + acc[a][1][0];
        red[warp][a][lane][1] = acc[a][0][1] + acc[a][1][1];
    }
    __syncthreads();
    if (threadIdx.x >= 64) {
        return;
    }
    const int l = threadIdx.x >> 1, i = threadIdx.x & 1;
    const int row = row0 + 2 * (l & 3) + i, tok = l >> 2;
    if (tok >= t || row >= n_out) {
        return;
    }
    float sum[NA];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        sum[a] = 0.0f;
        for (int v = 0; v < GT_WARPS; v++) {
            sum[a] += red[v][a][l][i];
        }
    }
    if constexpr (SWIGLU) {
        const float gt = __bfloat162float(__float2bfloat16_rn(sum[0]));
        const float up = __bfloat162float(__float2bfloat16_rn(sum[NA - 1]));
        y[(size_t)tok * n_out + row] = __float2bfloat16_rn(gt / (1.0f + expf(-gt)) * up);
    } else {
        y[(size_t)tok * n_out + row] = __float2bfloat16_rn(sum[0]);
    }
}

template <bool SWIGLU>
static void gemv_tcs_go(void *y, const void *x, const void *w, int64_t n_tok, int64_t n_out,
                        int64_t n_in, cudaStream_t stream)
{
    constexpr int NA = SWIGLU ? 2 : 1;
    const size_t smem = (size_t)GT_WARPS * GS_ST * NA * 8 * GS_COLS * sizeof(uc_bf16_t);
    static bool smem_set = false; /* the opt-in above 48 KiB, once per form */
    if (!smem_set) {
        (void)cudaFuncSetAttribute(gemv_tcs_kernel<SWIGLU>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        smem_set = true;
    }
    const unsigned blocks = (unsigned)((n_out + 7) / 8);
    uck_launch(gemv_tcs_kernel<SWIGLU>, dim3(blocks), dim3(GT_THREADS), smem, stream,
               (uc_bf16_t *)y, (const uc_bf16_t *)x, (const uc_bf16_t *)w, (int)n_tok,
               (int)n_out, (int)n_in);
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
    static int variant = -1; /* experiment switch UC_CUDA_GEMV_TC_VARIANT: 0-5 */
    if (variant < 0) {
        const char *v = getenv("UC_CUDA_GEMV_TC_VARIANT");
        variant = v ? atoi(v) : 0;
    }
    switch (variant) { /* 0-2: chunks interleaved; L2 fetches of 32 (sectors), 128, 256 bytes */
    case 0: gemv_tc_go<0, false>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    case 1: gemv_tc_go<1, false>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    case 2: gemv_tc_go<2, false>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    case 3: gemv_tc_go<0, true>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    case 4: gemv_tc_go<2, true>(y, x, w, n_tok, n_out, n_in, swiglu, stream); break;
    default:
        if (n_in % GS_COLS == 0) {
            if (swiglu) {
                gemv_tcs_go<true>(y, x, w, n_tok, n_out, n_in, stream);
            } else {
                gemv_tcs_go<false>(y, x, w, n_tok, n_out, n_in, stream);
            }
        } else {
            gemv_tc_go<1, false>(y, x, w, n_tok, n_out, n_in, swiglu, stream);
        }
        break;
    }
    return cudaGetLastError();
}
