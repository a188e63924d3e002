/* attn_prefill: causal GQA attention of a prompt chunk, flash-style (tiled, online softmax; no
 * N x N matrix is ever stored).
 *
 * Fast path (bf16, D = 64 or 128, 16-byte aligned rows): FlashAttention-2 structure on tensor
 * cores. A block owns 128 query rows of one head (8 warps x 16 rows); Q fragments come from
 * shared memory (D = 128, two blocks per SM) or stay in registers (D = 64); K and V tiles of 64
 * keys stream through shared memory with cp.async (the V load overlaps QK^T, the next K load
 * overlaps PV); S = QK^T and O += PV run as mma.sync.m16n8k16 bf16 with float32 accumulators;
 * shared memory rows are XOR-swizzled in 16-byte chunks so ldmatrix is conflict-free. Blocks of
 * the heaviest (last) query tiles start first. P is rounded to bf16 for PV; the row sums stay
 * float32.
 *
 * Generic path (float32, or other head sizes up to 256): one warp per query row, lanes over 32
 * keys at a time for the scores, lanes over dimensions for PV, exact expf.
 *
 * On Hopper, bf16 with D = 128 and an even GQA group goes to attn_prefill_sm90.cu first (wgmma
 * and TMA); the fast path here is then its checked reference. */
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "mma.cuh"

/* ---- fast path: tensor cores ------------------------------------------------------------ */

#define FA_BR 128 /* query rows per block */
#define FA_BC 64  /* keys per tile */
#define FA_WARPS 8

/* Asynchronously loads R rows of D bf16 (global row stride ld) into a swizzled tile; rows at
 * or past n_valid are zero-filled. */
template <int D, int R>
static __device__ __forceinline__ void load_tile(uc_bf16_t *s, const uc_bf16_t *g, int64_t ld,
                                                 int64_t n_valid, int tid)
{
    constexpr int CH = D / 8;
#pragma unroll
    for (int i = 0; i < (R * CH) / (FA_WARPS * 32); i++) {
        int idx = tid + i * FA_WARPS * 32;
        int r = idx / CH, c = idx % CH;
        bool ok = r < n_valid;
        const uc_bf16_t *src = ok ? g + (int64_t)r * ld + c * 8 : g;
        cp_async16(smem_u32(s + swz<D>(r, c)), src, ok ? 16 : 0);
    }
}

/* QS: Q fragments re-read from shared memory for every key tile instead of living in registers,
 * so two blocks fit on a multiprocessor (128 registers); otherwise one block of 8 warps for
 * D = 128 (216 registers) and two for D = 64. */
template <int D, bool QS>
static __global__ void __launch_bounds__(FA_WARPS * 32, (QS || D <= 64) ? 2 : 1)
    fa_fwd_kernel(uc_bf16_t *out, int64_t ld_o, const uc_bf16_t *q, int64_t ld_q,
                  const uc_bf16_t *k, const uc_bf16_t *v, int64_t ld_kv, int64_t n_tok,
                  int64_t q0, int group, float scale_log2)
{
    extern __shared__ __align__(128) uint8_t fa_smem[];
    uc_bf16_t *sQ = reinterpret_cast<uc_bf16_t *>(fa_smem);
    uc_bf16_t *sK = sQ + FA_BR * D;
    uc_bf16_t *sV = sK + FA_BC * D;

    const int h = blockIdx.x;
    const int64_t mb = (int64_t)gridDim.y - 1 - blockIdx.y; /* heavy (late) tiles first */
    const int kvh = h / group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int64_t row0 = mb * FA_BR;
    const int64_t n_keys = q0 + n_tok;
    const int64_t last_row = (row0 + FA_BR < n_tok ? row0 + FA_BR : n_tok) - 1;
    const int64_t kv_end = q0 + last_row + 1;
    const int n_tiles = (int)((kv_end + FA_BC - 1) / FA_BC);

    const uc_bf16_t *kb = k + (int64_t)kvh * D;
    const uc_bf16_t *vb = v + (int64_t)kvh * D;

    load_tile<D, FA_BR>(sQ, q + row0 * ld_q + (int64_t)h * D, ld_q, n_tok - row0, tid);
    load_tile<D, FA_BC>(sK, kb, ld_kv, n_keys, tid);
    cp_async_commit();

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    }
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
    uint32_t qf[QS ? 1 : D / 16][4];

    cp_async_wait_all();
    __syncthreads();
    if constexpr (!QS) {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            int r = warp * 16 + (lane & 15), c = kk * 2 + (lane >> 4);
            ldsm_x4(qf[kk], smem_u32(sQ + swz<D>(r, c)));
        }
    }
    /* absolute position of this thread's first row (row g of the warp's 16) */
    const int64_t qpos0 = q0 + row0 + warp * 16 + g;
    const int64_t warp_min_pos = q0 + row0 + warp * 16;

    for (int j = 0; j < n_tiles; j++) {
        const int64_t key0 = (int64_t)j * FA_BC;
        if (j > 0) {
            cp_async_wait_all(); /* K_j landed */
            __syncthreads();     /* and every warp is done with V_{j-1} */
        }
        load_tile<D, FA_BC>(sV, vb + key0 * ld_kv, ld_kv, n_keys - key0, tid);
        cp_async_commit();

        float s[FA_BC / 8][4];
#pragma unroll
        for (int i = 0; i < FA_BC / 8; i++) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const int qi = QS ? 0 : kk;
            if constexpr (QS) {
                int r = warp * 16 + (lane & 15), c = kk * 2 + (lane >> 4);
                ldsm_x4(qf[0], smem_u32(sQ + swz<D>(r, c)));
            }
#pragma unroll
            for (int np = 0; np < FA_BC / 16; np++) {
                int mat = lane >> 3;
                int r = np * 16 + (lane & 7) + (mat >> 1) * 8, c = kk * 2 + (mat & 1);
                uint32_t b[4];
                ldsm_x4(b, smem_u32(sK + swz<D>(r, c)));
                mma_bf16(s[2 * np], qf[qi], b[0], b[1]);
                mma_bf16(s[2 * np + 1], qf[qi], b[2], b[3]);
            }
        }
        /* causal mask, only where the tile crosses this warp's diagonal */
        if (key0 + FA_BC - 1 > warp_min_pos) {
#pragma unroll
            for (int nt = 0; nt < FA_BC / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int64_t key = key0 + nt * 8 + t4 * 2 + (e & 1);
                    int64_t pos = qpos0 + (e >> 1) * 8;
                    if (key > pos) {
                        s[nt][e] = -INFINITY;
                    }
                }
            }
        }
        /* online softmax (rows g and g+8; each row's values live in the 4 lanes of a quad) */
        uint32_t pf[FA_BC / 16][4];
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < FA_BC / 8; nt++) {
                mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(m_r[rr], mx); /* finite: key 0 is in tile 0 of every row */
            float corr = exp2f((m_r[rr] - m_new) * scale_log2);
            m_r[rr] = m_new;
            float ms = m_new * scale_log2;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < FA_BC / 8; nt++) {
                float p0 = exp2f(fmaf(s[nt][2 * rr], scale_log2, -ms));
                float p1 = exp2f(fmaf(s[nt][2 * rr + 1], scale_log2, -ms));
                s[nt][2 * rr] = p0;
                s[nt][2 * rr + 1] = p1;
                sum += p0 + p1;
            }
            l_r[rr] = l_r[rr] * corr + sum;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                o[dt][2 * rr] *= corr;
                o[dt][2 * rr + 1] *= corr;
            }
        }
#pragma unroll
        for (int kk = 0; kk < FA_BC / 16; kk++) {
            pf[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pf[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pf[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
        cp_async_wait_all(); /* V_j landed */
        __syncthreads();     /* and every warp is done with K_j */
        if (j + 1 < n_tiles) {
            load_tile<D, FA_BC>(sK, kb + (key0 + FA_BC) * ld_kv, ld_kv, n_keys - key0 - FA_BC,
                                tid);
            cp_async_commit();
        }
#pragma unroll
        for (int kk = 0; kk < FA_BC / 16; kk++) {
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                int mat = lane >> 3;
                int r = kk * 16 + (lane & 7) + (mat & 1) * 8, c = dp * 2 + (mat >> 1);
                uint32_t b[4];
                ldsm_x4_t(b, smem_u32(sV + swz<D>(r, c)));
                mma_bf16(o[2 * dp], pf[kk], b[0], b[1]);
                mma_bf16(o[2 * dp + 1], pf[kk], b[2], b[3]);
            }
        }
    }
    /* finish: full row sums across the quad, normalise, store */
    mma_store_normalised<D / 8>(out, ld_o, (int64_t)h * D, row0 + warp * 16 + g, n_tok, l_r, t4,
                                [&](int t, int rr, int k) { return o[t][2 * rr + k]; });
}

template <int D, bool QS>
static cudaError_t launch_fast(void *out, const void *q, int64_t ld_q, const void *k,
                               const void *v, int64_t ld_kv, int64_t n_tok, int64_t q0,
                               int64_t n_heads, int64_t n_heads_kv, cudaStream_t stream)
{
    size_t smem = (size_t)(FA_BR + 2 * FA_BC) * D * sizeof(uc_bf16_t);
    cudaError_t e = cudaFuncSetAttribute(fa_fwd_kernel<D, QS>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) {
        return e;
    }
    dim3 grid((unsigned)n_heads, (unsigned)((n_tok + FA_BR - 1) / FA_BR));
    float scale_log2 = 1.4426950408889634f / sqrtf((float)D);
    fa_fwd_kernel<D, QS><<<grid, FA_WARPS * 32, smem, stream>>>(
        (uc_bf16_t *)out, n_heads * D, (const uc_bf16_t *)q, ld_q, (const uc_bf16_t *)k,
        (const uc_bf16_t *)v, ld_kv, n_tok, q0, (int)(n_heads / n_heads_kv), scale_log2);
    return cudaGetLastError();
}

/* ---- generic path ----------------------------------------------------------------------- */

#define GEN_WARPS 4
#define GEN_MAX_D 256

template <typename T>
static __global__ void __launch_bounds__(GEN_WARPS * 32)
    attn_generic_kernel(T *out, const T *q, int64_t ld_q, const T *k, const T *v, int64_t ld_kv,
                        int64_t n_tok, int64_t q0, int n_heads, int group, int d, float scale)
{
    extern __shared__ float gen_q[]; /* (GEN_WARPS, D) */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t i = (int64_t)blockIdx.x * GEN_WARPS + warp;
    const int h = blockIdx.y;
    if (i >= n_tok) {
        return; /* whole warp; no block-wide barrier follows */
    }
    float *qs = gen_q + warp * d;
    for (int c = lane; c < d; c += 32) {
        qs[c] = uck_to_f(q[i * ld_q + (int64_t)h * d + c]);
    }
    __syncwarp();
    const T *kb = k + (int64_t)(h / group) * d, *vb = v + (int64_t)(h / group) * d;
    const int64_t n_keys = q0 + i + 1;
    float m = -INFINITY, l = 0.0f;
    float o[GEN_MAX_D / 32];
#pragma unroll
    for (int c = 0; c < GEN_MAX_D / 32; c++) {
        o[c] = 0.0f;
    }
    for (int64_t j0 = 0; j0 < n_keys; j0 += 32) {
        int64_t j = j0 + lane;
        float s = -INFINITY;
        if (j < n_keys) {
            const T *kr = kb + j * ld_kv;
            float acc = 0.0f;
            for (int c = 0; c < d; c++) {
                acc += qs[c] * uck_to_f(kr[c]);
            }
            s = acc * scale;
        }
        float m_new = fmaxf(m, uck_warp_max(s));
        float p = j < n_keys ? expf(s - m_new) : 0.0f;
        float corr = expf(m - m_new);
        l = l * corr + uck_warp_sum(p);
        m = m_new;
#pragma unroll
        for (int c = 0; c < GEN_MAX_D / 32; c++) {
            o[c] *= corr;
        }
        int cnt = n_keys - j0 < 32 ? (int)(n_keys - j0) : 32;
        for (int jj = 0; jj < cnt; jj++) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const T *vr = vb + (j0 + jj) * ld_kv;
#pragma unroll
            for (int c = 0; c < GEN_MAX_D / 32; c++) {
                int dd = lane + 32 * c;
                if (dd < d) {
                    o[c] += pj * uck_to_f(vr[dd]);
                }
            }
        }
    }
    float inv = 1.0f / l;
    T *orow = out + i * (int64_t)n_heads * d + (int64_t)h * d;
#pragma unroll
    for (int c = 0; c < GEN_MAX_D / 32; c++) {
        int dd = lane + 32 * c;
        if (dd < d) {
            orow[dd] = uck_from_f<T>(o[c] * inv);
        }
    }
}

template <typename T>
static void launch_generic(void *out, const void *q, int64_t ld_q, const void *k, const void *v,
                           int64_t ld_kv, int64_t n_tok, int64_t q0, int64_t n_heads,
                           int64_t n_heads_kv, int64_t d, cudaStream_t stream)
{
    dim3 grid((unsigned)((n_tok + GEN_WARPS - 1) / GEN_WARPS), (unsigned)n_heads);
    size_t smem = (size_t)GEN_WARPS * d * sizeof(float);
    attn_generic_kernel<T><<<grid, GEN_WARPS * 32, smem, stream>>>(
        (T *)out, (const T *)q, ld_q, (const T *)k, (const T *)v, ld_kv, n_tok, q0,
        (int)n_heads, (int)(n_heads / n_heads_kv), (int)d, 1.0f / sqrtf((float)d));
}

#ifdef UC_KERNELS_SM90
/* Whether the current device is compute capability 9.0 and UC_CUDA_PREFILL_SM90 is not 0. */
static bool sm90_enabled(void)
{
    static int cc[64]; /* per device ordinal: 0 unknown, 1 sm_90, 2 other */
    const char *v = getenv("UC_CUDA_PREFILL_SM90"); /* read each time: benchmarks switch it */
    int dev = 0;
    if ((v && strcmp(v, "0") == 0) || cudaGetDevice(&dev) != cudaSuccess || dev < 0 ||
        dev >= 64) {
        return false;
    }
    if (cc[dev] == 0) {
        int major = 0, minor = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        cc[dev] = major == 9 && minor == 0 ? 1 : 2;
    }
    return cc[dev] == 1;
}
#endif

extern "C" cudaError_t uc_cuda_attn_prefill(void *out, const void *q, int64_t ld_q, const void *k,
                                            const void *v, int64_t ld_kv, int64_t n_tok,
                                            int64_t q0, int64_t n_heads, int64_t n_heads_kv,
                                            int64_t head_dim, enum uc_cuda_dtype dt,
                                            cudaStream_t stream)
{
    if (n_tok <= 0) {
        return cudaGetLastError();
    }
    if (head_dim <= 0 || head_dim > GEN_MAX_D || n_heads_kv <= 0 || n_heads % n_heads_kv != 0 ||
        (n_tok + FA_BR - 1) / FA_BR > 65535) {
        return cudaErrorInvalidValue;
    }
    uintptr_t align = (uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)out |
                      (uintptr_t)(ld_q * 2) | (uintptr_t)(ld_kv * 2);
    bool fast = dt == UC_CUDA_BF16 && align % 16 == 0;
    /* D = 128 re-reads Q from shared memory (two blocks per SM: 278-295 TFLOP/s against 257-277
     * with Q in registers, n = 8K-32K on H100); D = 64 keeps Q in registers (269 against 248).
     * tests/cuda/NOTES.md has the measurements. */
#ifdef UC_KERNELS_SM90
    if (fast && head_dim == 128 && sm90_enabled()) {
        cudaError_t e = uc_cuda_attn_prefill_sm90(out, q, ld_q, k, v, ld_kv, n_tok, q0, n_heads,
                                                  n_heads_kv, stream);
        if (e != cudaErrorNotSupported) {
            return e;
        }
    }
#endif
    if (fast && head_dim == 128) {
        return launch_fast<128, true>(out, q, ld_q, k, v, ld_kv, n_tok, q0, n_heads, n_heads_kv,
                                      stream);
    }
    if (fast && head_dim == 64) {
        return launch_fast<64, false>(out, q, ld_q, k, v, ld_kv, n_tok, q0, n_heads, n_heads_kv,
                                      stream);
    }
    UCK_DISPATCH(dt, launch_generic, out, q, ld_q, k, v, ld_kv, n_tok, q0, n_heads, n_heads_kv,
                 head_dim, stream);
    return cudaGetLastError();
}
