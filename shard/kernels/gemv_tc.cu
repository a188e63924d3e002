/* gemv_tc: y (T, N) = x (T, K) w^T for 1 to 8 rows (decode) in bf16, the weights streamed once
 * from memory into the tensor cores, each output summed the same way whatever T is.
 *
 * gemv.cu does a row's multiply-adds on the CUDA cores, so its cost grows with T: a decode step
 * at batch 8 takes 10.3 ms on it against 5.4 here (H200, Llama-3-8B shapes; call F4). cuBLAS
 * sums in an order that depends on T, and then the n choices of a greedy request part from the
 * request run alone. Here every output is one entry of m16n8k16 mmas whose other entries are the
 * other rows of the batch, so the work and the order of every sum are the same at any T.
 *
 * A block owns 8 weight rows, the B operand of the mma: lane (g, c) of a warp (g = lane / 4,
 * c = lane % 4) loads 16 bytes of weight row g, and the batch is the A operand (row g of x in
 * lanes g, rows 8-15 zero). The mma's k order is permuted the same way for both operands (its k
 * = 2c, 2c+1, 2c+8, 2c+9 are the columns 8c..8c+3 of a 32-column chunk, a second mma takes
 * 8c+4..8c+7), so the 16-byte loads go straight into the fragments with no shuffle or shared
 * memory. The block's 8 warps take the chunks in turn (chunk j to warp j % 8), four at a time
 * into two register buffers, each refilled right after its mmas, so one group of loads is in
 * flight while the other's mmas run. The loads ask L2 for the 128 bytes around them: the warps
 * of a block read neighbouring 64-byte pieces of each row (call F3: 121 against 128 us for a
 * layer's four products at one row). The warps' float32 sums are added in warp order at the end
 * and rounded to bf16. The swiglu form streams the gate and up rows of the same 8 features and
 * writes silu(g) * u, g and u rounded to bf16 first as the unfused product then swiglu would.
 *
 * At one row gemv.cu is faster (a decode step 4.44 against 4.73 ms, F4); the backend uses this
 * kernel for every batch of 1-8 rows all the same (UC_CUDA_GEMV_TC=0 turns it off), since a row
 * must be summed the same way alone and in a batch.
 *
 * As a programmatic dependent launch the kernel loads its first weights before it waits for
 * the kernel that writes x. */
#include "common.cuh"
#include "mma.cuh"

#define GT_WARPS 8
#define GT_THREADS (GT_WARPS * 32)
#define GT_ROWS 8   /* weight rows (features) of a block: the mma's n */
#define GT_CHUNK 32 /* K columns of a chunk: 16 bytes per lane and weight row */
#define GT_GROUP 4  /* chunks a lane loads at once, per buffer and weight operand */

/* A weight vector: 16 bytes read once (streaming), L2 fetching the 128 bytes around it. */
static __device__ __forceinline__ uint4 gt_load(const uint4 *p)
{
    uint4 v;
    asm volatile("ld.global.cs.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

template <bool SWIGLU>
static __global__ void __launch_bounds__(GT_THREADS)
    gemv_tc_kernel(uc_bf16_t *__restrict__ y, const uc_bf16_t *__restrict__ x,
                   const uc_bf16_t *__restrict__ w, int t, int n_out, int n_in)
{
    constexpr int NA = SWIGLU ? 2 : 1; /* weight operands: the product's, or gate and up */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * GT_ROWS;
    const int n_chunks = n_in / GT_CHUNK;
    const int count = (n_chunks - warp + GT_WARPS - 1) / GT_WARPS; /* chunks warp + 8 i */
    const int n_groups = (count + GT_GROUP - 1) / GT_GROUP;
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

    /* group grp: the warp's chunks i = GT_GROUP grp + u, i.e. columns 32 (warp + 8 i) */
    auto load_w = [&](uint4 (&dst)[GT_GROUP][NA], int grp) {
#pragma unroll
        for (int u = 0; u < GT_GROUP; u++) {
            const int i = grp * GT_GROUP + u, j = warp + i * GT_WARPS;
#pragma unroll
            for (int a = 0; a < NA; a++) {
                dst[u][a] = ok && i < count ? gt_load(wr[a] + j * 4) : zero;
            }
        }
    };
    float acc[NA][4];
#pragma unroll
    for (int a = 0; a < NA; a++) {
        acc[a][0] = acc[a][1] = acc[a][2] = acc[a][3] = 0.0f;
    }
    auto mma_group = [&](const uint4 (&wv)[GT_GROUP][NA], int grp) {
        uint4 xv[GT_GROUP];
#pragma unroll
        for (int u = 0; u < GT_GROUP; u++) {
            const int i = grp * GT_GROUP + u, j = warp + i * GT_WARPS;
            xv[u] = xin && i < count ? __ldg(xr + j * 4) : zero;
        }
#pragma unroll
        for (int u = 0; u < GT_GROUP; u++) {
#pragma unroll
            for (int a = 0; a < NA; a++) {
                const uint32_t f0[4] = {xv[u].x, 0u, xv[u].y, 0u}; /* columns 8c..8c+3 */
                const uint32_t f1[4] = {xv[u].z, 0u, xv[u].w, 0u}; /* columns 8c+4..8c+7 */
                mma_bf16(acc[a], f0, wv[u][a].x, wv[u][a].y);
                mma_bf16(acc[a], f1, wv[u][a].z, wv[u][a].w);
            }
        }
    };
    uint4 wa[GT_GROUP][NA], wb[GT_GROUP][NA];
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

    /* acc[a][i]: token g, row 2c + i (i < 2; 2 and 3 are the zero rows 8-15 of A) */
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
    auto kernel = swiglu ? gemv_tc_kernel<true> : gemv_tc_kernel<false>;
    uck_launch(kernel, dim3(blocks), dim3(GT_THREADS), 0, stream, (uc_bf16_t *)y,
               (const uc_bf16_t *)x, (const uc_bf16_t *)w, (int)n_tok, (int)n_out, (int)n_in);
    return cudaGetLastError();
}
