/* attn_decode: one query token per sequence against the paged KV cache (flash-decoding).
 *
 * Work item: (entry e = row b * Hkv + KV head j, token range s, query-head tile z). A block of
 * 128 threads loads the range's K/V rows once for up to 4 query heads of the KV head (GQA),
 * walking 128-token sub-chunks: the sub-chunk's V rows are copied into shared memory
 * asynchronously (cp.async) at its start, so they are in flight while the scores are computed
 * from K rows loaded into registers (16-byte row loads, D/VEC lanes per token, shuffle
 * reduction) and while the online softmax runs; then P V with threads over (row chunk, token
 * group) reads the staged rows. Rows wider than 256 bytes (fp32 at D > 64) load V into
 * registers instead.
 * Each range writes an unnormalised partial (O, max, sum); the last range of an (entry, tile) to
 * finish (a counter per tile, reset by that block) merges the ranges and writes out, so a decode
 * layer's attention is one kernel. With psum requested, the raw scores go to the workspace and
 * a second kernel turns them into probabilities summed over the KV head's query heads. */
#include <cuda_pipeline.h>

#include "common.cuh"

#define DEC_THREADS 128
#define DEC_SUB 128 /* tokens per sub-chunk (shared score buffer, staged V rows) */
#define DEC_STAGE_ROW 256 /* widest row (bytes) whose V is staged in shared memory */
#define DEC_GT 4    /* query heads per block */
#define DEC_U 4     /* K or V rows each thread loads before using any (loads in flight) */
/* ranges per (entry, tile): the merge keeps DEC_GT x splits weights in the block's `red` */
#define DEC_MAX_SPLITS 256

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* A 16-byte row chunk of VEC elements, loaded, to float. */
template <typename T, int VEC>
static __device__ __forceinline__ void unpack_vec(float *dst, uint4 raw)
{
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; i++) {
        dst[i] = uck_to_f(e[i]);
    }
}

template <typename T, bool STAGE_V>
static __global__ void __launch_bounds__(DEC_THREADS, 4)
    decode_split_kernel(const T *q, int64_t ld_q, const T *pk, const T *pv, int bt, int d,
                        const int32_t *n_tokens, const int32_t *offset, const int32_t *blocks,
                        int hkv, int group, int chunk, int n_splits, float scale, float *part_o,
                        float *part_ml, float *scores, int64_t max_tokens, T *out, float *fin_ml,
                        int32_t *counters)
{
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float q_s[DEC_GT][256];
    __shared__ float sc[DEC_GT][DEC_SUB];
    __shared__ float run_m[DEC_GT], run_l[DEC_GT], alpha[DEC_GT];
    __shared__ float red[DEC_THREADS * VEC * DEC_GT];
    __shared__ int32_t blk_s[DEC_SUB + 2]; /* the sub-chunk's block ids */
    extern __shared__ __align__(16) unsigned char dyn[]; /* STAGE_V: (DEC_SUB, d) V rows */
    T *vs = reinterpret_cast<T *>(dyn);

    uck_grid_wait();
    const int e = blockIdx.x, split = blockIdx.y, g0 = blockIdx.z * DEC_GT;
    const int gc = group - g0 < DEC_GT ? group - g0 : DEC_GT;
    const int b = e / hkv, j = e % hkv;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nt = n_tokens[e];
    const int step = chunk > 0 ? chunk : (nt + n_splits * 64 - 1) / (n_splits * 64) * 64;
    const int t_begin = split * step;
    const int t_end = t_begin + step < nt ? t_begin + step : nt;
    const int32_t *blk = blocks + offset[e];

    for (int i = tid; i < DEC_GT * d; i += DEC_THREADS) {
        int gl = i / d, c = i % d;
        int64_t qi = (int64_t)b * ld_q + (int64_t)(j * group + g0 + gl) * d + c;
        q_s[gl][c] = gl < gc ? uck_to_f(q[qi]) : 0.0f;
    }
    if (tid < DEC_GT) {
        run_m[tid] = -INFINITY;
        run_l[tid] = 0.0f;
    }
    /* score lanes: LPT lanes per token, each one 16-byte chunk */
    const int n_ch = d / VEC;
    int lpt = 1;
    while (lpt < n_ch) {
        lpt <<= 1;
    }
    const int tpw = 32 / lpt; /* tokens per warp pass */
    const int sub_tok = lane / lpt, ch = lane % lpt;
    /* PV threads: n_ch chunks x tg token groups */
    const int tg = DEC_THREADS / n_ch;
    const int pv_c = tid % n_ch, pv_r = tid / n_ch;
    const bool pv_on = pv_r < tg;
    float acc[DEC_GT][VEC];
#pragma unroll
    for (int gl = 0; gl < DEC_GT; gl++) {
#pragma unroll
        for (int v = 0; v < VEC; v++) {
            acc[gl][v] = 0.0f;
        }
    }
    __syncthreads();
    float qr[DEC_GT][VEC];
#pragma unroll
    for (int gl = 0; gl < DEC_GT; gl++) {
#pragma unroll
        for (int v = 0; v < VEC; v++) {
            qr[gl][v] = ch < n_ch ? q_s[gl][ch * VEC + v] : 0.0f;
        }
    }

    for (int c0 = t_begin; c0 < t_end; c0 += DEC_SUB) {
        const int n_sub = t_end - c0 < DEC_SUB ? t_end - c0 : DEC_SUB;
        /* the block ids once into shared memory: no dependent index load before each row */
        const int b_first = c0 / bt, n_b = (c0 + n_sub - 1) / bt - b_first + 1;
        for (int i = tid; i < n_b; i += DEC_THREADS) {
            blk_s[i] = blk[b_first + i];
        }
        __syncthreads();
        if (STAGE_V) { /* the V rows start on their way now; P V reads them from shared memory */
            const int rs = DEC_THREADS / n_ch, vc = tid % n_ch;
            for (int tt = tid / n_ch; tt < n_sub; tt += rs) {
                int t = c0 + tt;
                int64_t slot = (int64_t)blk_s[t / bt - b_first] * bt + t % bt;
                __pipeline_memcpy_async(vs + tt * d + vc * VEC, pv + slot * d + vc * VEC, 16);
            }
            __pipeline_commit();
        }
        /* scores: DEC_U rows per lane loaded, then used */
        for (int base = warp * tpw; base < n_sub; base += 4 * tpw * DEC_U) {
            uint4 raw[DEC_U];
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                int tt = base + u * 4 * tpw + sub_tok;
                if (tt < n_sub && ch < n_ch) {
                    int t = c0 + tt;
                    int64_t slot = (int64_t)blk_s[t / bt - b_first] * bt + t % bt;
                    raw[u] = *reinterpret_cast<const uint4 *>(pk + slot * d + ch * VEC);
                }
            }
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                int tt = base + u * 4 * tpw + sub_tok;
                bool ok = tt < n_sub && ch < n_ch;
                float dot[DEC_GT] = {0.0f, 0.0f, 0.0f, 0.0f};
                if (ok) {
                    float kv[VEC];
                    unpack_vec<T, VEC>(kv, raw[u]);
#pragma unroll
                    for (int gl = 0; gl < DEC_GT; gl++) {
#pragma unroll
                        for (int v = 0; v < VEC; v++) {
                            dot[gl] += qr[gl][v] * kv[v];
                        }
                    }
                }
#pragma unroll
                for (int gl = 0; gl < DEC_GT; gl++) {
                    for (int o = lpt >> 1; o > 0; o >>= 1) {
                        dot[gl] += __shfl_xor_sync(0xffffffffu, dot[gl], o);
                    }
                }
                if (ok && ch == 0) {
#pragma unroll
                    for (int gl = 0; gl < DEC_GT; gl++) {
                        sc[gl][tt] = dot[gl] * scale;
                    }
                }
            }
        }
        __syncthreads();
        /* online softmax: warp w owns query head w of the tile */
        if (warp < gc) {
            float mx = -INFINITY;
            for (int tt = lane; tt < n_sub; tt += 32) {
                mx = fmaxf(mx, sc[warp][tt]);
                if (scores) {
                    scores[((int64_t)e * group + g0 + warp) * max_tokens + c0 + tt] = sc[warp][tt];
                }
            }
            mx = uck_warp_max(mx);
            float m_old = run_m[warp];
            float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int tt = lane; tt < n_sub; tt += 32) {
                float p = expf(sc[warp][tt] - m_new);
                sc[warp][tt] = p;
                sum += p;
            }
            sum = uck_warp_sum(sum);
            if (lane == 0) {
                float a = expf(m_old - m_new);
                alpha[warp] = a;
                run_l[warp] = run_l[warp] * a + sum;
                run_m[warp] = m_new;
            }
        }
        if (STAGE_V) {
            __pipeline_wait_prior(0);
        }
        __syncthreads();
        /* O += P V */
        if (pv_on) {
#pragma unroll
            for (int gl = 0; gl < DEC_GT; gl++) {
                float a = gl < gc ? alpha[gl] : 0.0f;
#pragma unroll
                for (int v = 0; v < VEC; v++) {
                    acc[gl][v] *= a;
                }
            }
            if (STAGE_V) {
                for (int tt = pv_r; tt < n_sub; tt += tg) {
                    float vv[VEC];
                    unpack_vec<T, VEC>(vv,
                                       *reinterpret_cast<const uint4 *>(vs + tt * d + pv_c * VEC));
#pragma unroll
                    for (int gl = 0; gl < DEC_GT; gl++) {
                        float p = sc[gl][tt];
#pragma unroll
                        for (int v = 0; v < VEC; v++) {
                            acc[gl][v] += p * vv[v];
                        }
                    }
                }
            } else {
                for (int tt0 = pv_r; tt0 < n_sub; tt0 += tg * DEC_U) {
                    uint4 raw[DEC_U];
#pragma unroll
                    for (int u = 0; u < DEC_U; u++) {
                        int tt = tt0 + u * tg;
                        if (tt < n_sub) {
                            int t = c0 + tt;
                            int64_t slot = (int64_t)blk_s[t / bt - b_first] * bt + t % bt;
                            raw[u] = *reinterpret_cast<const uint4 *>(pv + slot * d + pv_c * VEC);
                        }
                    }
#pragma unroll
                    for (int u = 0; u < DEC_U; u++) {
                        int tt = tt0 + u * tg;
                        if (tt < n_sub) {
                            float vv[VEC];
                            unpack_vec<T, VEC>(vv, raw[u]);
#pragma unroll
                            for (int gl = 0; gl < DEC_GT; gl++) {
                                float p = sc[gl][tt];
#pragma unroll
                                for (int v = 0; v < VEC; v++) {
                                    acc[gl][v] += p * vv[v];
                                }
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();
    }
    /* reduce the token groups and write this range's partial */
    if (pv_on) {
#pragma unroll
        for (int gl = 0; gl < DEC_GT; gl++) {
#pragma unroll
            for (int v = 0; v < VEC; v++) {
                red[(pv_r * DEC_GT + gl) * d + pv_c * VEC + v] = acc[gl][v];
            }
        }
    }
    __syncthreads();
    int64_t pbase = ((int64_t)e * n_splits + split) * group;
    for (int i = tid; i < gc * d; i += DEC_THREADS) {
        int gl = i / d, c = i % d;
        float s = 0.0f;
        for (int r = 0; r < tg; r++) {
            s += red[(r * DEC_GT + gl) * d + c];
        }
        part_o[(pbase + g0 + gl) * d + c] = s;
    }
    if (tid < gc) {
        part_ml[(pbase + g0 + tid) * 2] = run_m[tid];
        part_ml[(pbase + g0 + tid) * 2 + 1] = run_l[tid];
    }
    /* The last range of this (entry, head tile) to finish merges them all: out = sum_s w_s O_s
     * / sum_s w_s l_s with w_s = exp(m_s - M), empty ranges skipped; then it resets the
     * counter for the next launch. */
    __shared__ int last;
    __threadfence();
    __syncthreads();
    int32_t *cnt = counters + (int64_t)e * gridDim.z + blockIdx.z;
    if (tid == 0) {
        last = atomicAdd(cnt, 1) == n_splits - 1;
    }
    __syncthreads();
    if (!last) {
        return;
    }
    __threadfence();
    __shared__ float inv_s[DEC_GT];
    float *w_s = red; /* (gc, n_splits) weights; red is free again */
    const int64_t mlb = (int64_t)e * n_splits * group;
    if (warp < gc) {
        const int h = g0 + warp;
        float mx = -INFINITY;
        for (int sp = lane; sp < n_splits; sp += 32) {
            mx = fmaxf(mx, __ldcg(part_ml + (mlb + (int64_t)sp * group + h) * 2));
        }
        mx = uck_warp_max(mx);
        float l = 0.0f;
        for (int sp = lane; sp < n_splits; sp += 32) {
            const float *ml = part_ml + (mlb + (int64_t)sp * group + h) * 2;
            float m = __ldcg(ml);
            float w = m == -INFINITY ? 0.0f : expf(m - mx);
            l += __ldcg(ml + 1) * w;
            w_s[warp * n_splits + sp] = w;
        }
        l = uck_warp_sum(l);
        if (lane == 0) {
            inv_s[warp] = l > 0.0f ? 1.0f / l : 0.0f;
            if (fin_ml) {
                fin_ml[((int64_t)e * group + h) * 2] = mx;
                fin_ml[((int64_t)e * group + h) * 2 + 1] = l;
            }
        }
    }
    __syncthreads();
    /* the non-empty ranges are a prefix: [0, n_act); 4 columns per thread, loads batched */
    const int n_act = step > 0 ? min(n_splits, (nt + step - 1) / step) : 0;
    const int d4 = d / 4;
    for (int i = tid; i < gc * d4; i += DEC_THREADS) {
        int gl = i / d4, c4 = i % d4;
        const float4 *po = reinterpret_cast<const float4 *>(part_o + (mlb + g0 + gl) * d) + c4;
        const int64_t stride = (int64_t)group * d4; /* float4s from one range to the next */
        float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
        for (int sp = 0; sp < n_act; sp++) {
            float w = w_s[gl * n_splits + sp];
            float4 v = __ldcg(po + sp * stride);
            o.x += v.x * w;
            o.y += v.y * w;
            o.z += v.z * w;
            o.w += v.w * w;
        }
        float inv = inv_s[gl];
        T *dst = out + (int64_t)b * (hkv * group * d) + (int64_t)(j * group + g0 + gl) * d + 4 * c4;
        dst[0] = uck_from_f<T>(o.x * inv);
        dst[1] = uck_from_f<T>(o.y * inv);
        dst[2] = uck_from_f<T>(o.z * inv);
        dst[3] = uck_from_f<T>(o.w * inv);
    }
    if (tid == 0) {
        *cnt = 0;
    }
}

static __global__ void decode_psum_kernel(float *psum, const float *scores, const float *fin_ml,
                                          const int32_t *n_tokens, int group, int64_t max_tokens)
{
    const int e = blockIdx.x;
    const int nt = n_tokens[e];
    for (int64_t t = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; t < max_tokens;
         t += (int64_t)gridDim.y * blockDim.x) {
        float s = 0.0f;
        if (t < nt) {
            for (int gl = 0; gl < group; gl++) {
                const float *ml = fin_ml + ((int64_t)e * group + gl) * 2;
                s += expf(scores[((int64_t)e * group + gl) * max_tokens + t] - ml[0]) / ml[1];
            }
        }
        psum[(int64_t)e * max_tokens + t] = s;
    }
}

extern "C" int uc_cuda_attn_decode_supported(int64_t head_dim, enum uc_cuda_dtype dt)
{
    int64_t vec = dt == UC_CUDA_F32 ? 4 : 8;
    return head_dim > 0 && head_dim <= 256 && head_dim % vec == 0 && head_dim / vec <= 32;
}

extern "C" void uc_cuda_attn_decode_plan(struct uc_cuda_decode_plan *plan, int64_t n_rows,
                                         int64_t n_heads, int64_t n_heads_kv, int64_t head_dim,
                                         int64_t max_tokens, int with_psum, int n_sms)
{
    int64_t entries = n_rows * n_heads_kv, group = n_heads / n_heads_kv;
    int64_t g_tiles = ceil_div(group, DEC_GT);
    int64_t mt = max_tokens > 0 ? max_tokens : 1;
    int64_t want = ceil_div(2 * (int64_t)(n_sms > 0 ? n_sms : 132), entries * g_tiles);
    int64_t splits, chunk;
    want = want < DEC_MAX_SPLITS ? want : DEC_MAX_SPLITS;
    if (max_tokens <= 0) { /* dynamic: ranges sized in the kernel from each entry's length */
        splits = want;
        chunk = 0;
    } else {
        splits = want < ceil_div(mt, 64) ? want : ceil_div(mt, 64);
        splits = splits < 1 ? 1 : splits;
        chunk = ceil_div(ceil_div(mt, splits), 64) * 64;
        splits = ceil_div(mt, chunk);
    }
    plan->n_splits = (int)splits;
    plan->chunk = (int)chunk;
    plan->g_tiles = (int)g_tiles;
    plan->n_counters = (size_t)(entries * g_tiles);
    size_t f = (size_t)(entries * splits * group) * (size_t)(head_dim + 2); /* part_o, part_ml */
    f += (size_t)(entries * group * 2);                                       /* fin_ml */
    if (with_psum) {
        f += (size_t)(entries * group * mt); /* scores */
    }
    plan->ws_floats = f;
}

template <typename T>
static void launch(void *out, const void *q, int64_t ld_q, const void *pk, const void *pv,
                   int64_t bt, int64_t d, const int32_t *n_tokens, const int32_t *offset,
                   const int32_t *blocks, int64_t n_rows, int64_t n_heads, int64_t n_heads_kv,
                   int64_t max_tokens, const struct uc_cuda_decode_plan *plan, float *ws,
                   int32_t *counters, float *psum, cudaStream_t stream)
{
    int64_t entries = n_rows * n_heads_kv, group = n_heads / n_heads_kv;
    int64_t mt = max_tokens > 0 ? max_tokens : 1;
    float *part_o = ws;
    float *part_ml = part_o + entries * plan->n_splits * group * d;
    float *fin_ml = part_ml + entries * plan->n_splits * group * 2;
    float *scores = psum ? fin_ml + entries * group * 2 : NULL;
    dim3 grid((unsigned)entries, (unsigned)plan->n_splits, (unsigned)plan->g_tiles);
    const float scale = 1.0f / sqrtf((float)d);
    if (d * (int64_t)sizeof(T) <= DEC_STAGE_ROW) {
        size_t smem = (size_t)DEC_SUB * (size_t)d * sizeof(T);
        static size_t smem_set = 0; /* per type: the opt-in above 48 KiB, once per size */
        if (smem > smem_set) {
            (void)cudaFuncSetAttribute(decode_split_kernel<T, true>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
            smem_set = smem;
        }
        uck_launch(decode_split_kernel<T, true>, grid, dim3(DEC_THREADS), smem, stream, q, ld_q,
                   pk, pv, (int)bt, (int)d, n_tokens, offset, blocks, (int)n_heads_kv,
                   (int)group, plan->chunk, plan->n_splits, scale, part_o, part_ml, scores, mt,
                   out, psum ? fin_ml : NULL, counters);
    } else {
        uck_launch(decode_split_kernel<T, false>, grid, dim3(DEC_THREADS), 0, stream, q, ld_q, pk,
                   pv, (int)bt, (int)d, n_tokens, offset, blocks, (int)n_heads_kv, (int)group,
                   plan->chunk, plan->n_splits, scale, part_o, part_ml, scores, mt, out,
                   psum ? fin_ml : NULL, counters);
    }
    if (psum) {
        dim3 pgrid((unsigned)entries, (unsigned)ceil_div(mt, 256) < 64 ? (unsigned)ceil_div(mt, 256)
                                                                       : 64u);
        decode_psum_kernel<<<pgrid, 256, 0, stream>>>(psum, scores, fin_ml, n_tokens, (int)group,
                                                       mt);
    }
}

extern "C" cudaError_t uc_cuda_attn_decode(void *out, const void *q, int64_t ld_q,
                                           const void *pool_k, const void *pool_v,
                                           int64_t block_tokens, int64_t head_dim,
                                           const int32_t *n_tokens, const int32_t *offset,
                                           const int32_t *blocks, int64_t n_rows, int64_t n_heads,
                                           int64_t n_heads_kv, int64_t max_tokens,
                                           const struct uc_cuda_decode_plan *plan, float *ws,
                                           int32_t *counters, float *psum, enum uc_cuda_dtype dt,
                                           cudaStream_t stream)
{
    if (n_rows <= 0) {
        return cudaGetLastError();
    }
    if (!uc_cuda_attn_decode_supported(head_dim, dt) || n_heads_kv <= 0 ||
        n_heads % n_heads_kv != 0 || n_rows * n_heads_kv > 0x7fffffff) {
        return cudaErrorInvalidValue;
    }
    UCK_DISPATCH(dt, launch, out, q, ld_q, pool_k, pool_v, block_tokens, head_dim, n_tokens,
                 offset, blocks, n_rows, n_heads, n_heads_kv, max_tokens, plan, ws, counters, psum,
                 stream);
    return cudaGetLastError();
}
