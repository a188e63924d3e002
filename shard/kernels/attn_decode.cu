/* attn_decode: one query token per sequence against the paged KV cache (flash-decoding).
 *
 * Work item: (entry e = row b * Hkv + KV head j, token range s, query-head tile z): a block of
 * 128 threads reads the range's K/V rows once for up to 4 query heads of the KV head (GQA).
 * With grouped queries the work per byte of K/V is 2 x group multiply-adds, which on the CUDA
 * cores alone keeps the multiprocessors too busy to stream K/V at the memory's rate, so:
 *
 * Tensor-core path (bf16, D = 64, 128 or 256): the range streams through shared memory in tiles
 * of 64 tokens, three stages deep (cp.async with zero fill; the block ids read by the loading
 * threads, once a tile where blocks hold 16 tokens), the rows XOR-swizzled so ldmatrix is
 * conflict-free. Each warp takes 16 tokens of a tile: S = Q K^T with the query heads as the
 * rows of an m16n8k16 mma (rows past the tile's heads are zero), an online softmax per head
 * over the quad of lanes that holds its row, then O += P V with P rounded to bf16 (the sums
 * stay float32), as in the prefill kernel.
 *
 * Generic path (float32, other head sizes): every warp streams its own tokens with no barrier:
 * LPT lanes hold one token's row (16 bytes each) and each lane issues the K and V loads of
 * DEC_U tokens before using any; the LPT lanes of a token form a sub-stream with its own online
 * softmax; scores are reduced across those lanes with shuffles.
 *
 * Both end the same way: the block merges its sub-streams (warps, or lane groups) into one
 * unnormalised partial (O, max, sum) per query head; the last range of an (entry, tile) to
 * finish (a counter per tile, reset by that block) merges the ranges and writes out, so a
 * decode layer's attention is one kernel. With psum requested, the raw scores go to the
 * workspace and a second kernel turns them into probabilities summed over the KV head's query
 * heads. */
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

#define DEC_THREADS 128
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_GT 4        /* query heads per block */
#define DEC_U 4         /* generic path: tokens each lane loads (K and V) before using any */
#define DEC_PAGES 256   /* generic path: block ids staged per window */
#define DEC_TILE 64     /* tensor-core path: tokens per shared-memory tile */
#define DEC_STAGES 3    /* tensor-core path: tiles in flight */
#define DEC_RESIDENT 2  /* blocks per SM the plan counts on */
/* Waves of resident blocks the ranges aim at when the rows alone do not fill the GPU: with one,
 * a block's start (Q, the first tiles' latency) and end (the merges) leave its SM's share of
 * the memory idle, and a batch of 33-125 rows ran 1.0-1.4 waves of one range each. Two (call
 * D2, distinct contexts, a step's decode attention): batch 12 x 4608 3.03 -> 2.45 ms, 45 x 922
 * 2.21 -> 2.01 ms; 32 x 8256 and 256 x 1280 unchanged; four is slower at both small shapes. */
#define DEC_WAVES 2
/* ranges per (entry, tile): the merge keeps DEC_GT x splits weights in shared memory */
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

/* What both paths share: the item's coordinates and the range merges. */
struct dec_item {
    int e, split, g0, gc, b, j, nt, step, t_begin, t_end;
};

static __device__ __forceinline__ dec_item dec_item_of(const int32_t *n_tokens, int hkv,
                                                       int group, int chunk, int n_splits)
{
    dec_item it;
    it.e = blockIdx.x;
    it.split = blockIdx.y;
    it.g0 = blockIdx.z * DEC_GT;
    it.gc = group - it.g0 < DEC_GT ? group - it.g0 : DEC_GT;
    it.b = it.e / hkv;
    it.j = it.e % hkv;
    it.nt = n_tokens[it.e];
    it.step = chunk > 0 ? chunk : (it.nt + n_splits * 64 - 1) / (n_splits * 64) * 64;
    it.t_begin = it.split * it.step;
    it.t_end = it.t_begin + it.step < it.nt ? it.t_begin + it.step : it.nt;
    return it;
}

/* Merges the block's n_sub sub-streams (red: (sub, head, d) slices of O; ml: (sub, head) max
 * and sum) into this range's partial (part_o, part_ml). Ends with the block synchronised. */
static __device__ void dec_merge_substreams(const dec_item &it, const float *red,
                                            const float (*ml)[DEC_GT][2], int n_sub, int d,
                                            int group, int n_splits, float *part_o,
                                            float *part_ml)
{
    const int64_t pbase = ((int64_t)it.e * n_splits + it.split) * group;
    for (int i = threadIdx.x; i < it.gc * d; i += DEC_THREADS) {
        const int gl = i / d, c = i % d;
        float mx = -INFINITY;
        for (int r = 0; r < n_sub; r++) {
            mx = fmaxf(mx, ml[r][gl][0]);
        }
        float o = 0.0f, l = 0.0f;
        for (int r = 0; r < n_sub; r++) {
            const float m = ml[r][gl][0];
            const float w = m == -INFINITY ? 0.0f : expf(m - mx);
            o += w * red[(r * DEC_GT + gl) * d + c];
            l += w * ml[r][gl][1];
        }
        part_o[(pbase + it.g0 + gl) * d + c] = o;
        if (c == 0) {
            part_ml[(pbase + it.g0 + gl) * 2] = mx;
            part_ml[(pbase + it.g0 + gl) * 2 + 1] = l;
        }
    }
}

/* The last range of this (entry, head tile) to finish merges them all: out = sum_s w_s O_s
 * / sum_s w_s l_s with w_s = exp(m_s - M), empty ranges skipped; then it resets the counter
 * for the next launch. w_s: DEC_GT x n_splits floats of shared memory no longer in use. */
template <typename T>
static __device__ void dec_merge_ranges(const dec_item &it, int hkv, int group, int d,
                                        int n_splits, const float *part_o, const float *part_ml,
                                        T *out, float *fin_ml, int32_t *counters, float *w_s)
{
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int e = it.e, g0 = it.g0, gc = it.gc;
    __shared__ int last;
    __shared__ float inv_s[DEC_GT];
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
    const int n_act = it.step > 0 ? min(n_splits, (it.nt + it.step - 1) / it.step) : 0;
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
        T *dst = out + (int64_t)it.b * (hkv * group * d) + (int64_t)(it.j * group + g0 + gl) * d +
                 4 * c4;
        dst[0] = uck_from_f<T>(o.x * inv);
        dst[1] = uck_from_f<T>(o.y * inv);
        dst[2] = uck_from_f<T>(o.z * inv);
        dst[3] = uck_from_f<T>(o.w * inv);
    }
    if (tid == 0) {
        *cnt = 0;
    }
}

/* ---- tensor-core path ------------------------------------------------------------------- */

/* Starts the copy of tile `tile` (DEC_TILE tokens of K and V from t0) into stage buffers sk,
 * sv; tokens at or past t_end are zero-filled. Any block size (bt). */
template <int D>
static __device__ __forceinline__ void dec_load_tile(uc_bf16_t *sk, uc_bf16_t *sv,
                                                     const uc_bf16_t *pk, const uc_bf16_t *pv,
                                                     const int32_t *blk, int bt, int bt_shift,
                                                     bool bt_pow2, int t0, int t_end)
{
    constexpr int CH = D / 8;
#pragma unroll
    for (int i = 0; i < DEC_TILE * CH / DEC_THREADS; i++) {
        const int idx = threadIdx.x + i * DEC_THREADS;
        const int r = idx / CH, c = idx % CH, t = t0 + r;
        const bool ok = t < t_end;
        int64_t off = 0;
        if (ok) {
            const int pg = bt_pow2 ? t >> bt_shift : t / bt;
            const int in = bt_pow2 ? t & (bt - 1) : t - pg * bt;
            off = ((int64_t)__ldg(blk + pg) * bt + in) * D + c * 8;
        }
        cp_async16(smem_u32(sk + swz<D>(r, c)), pk + off, ok ? 16 : 0);
        cp_async16(smem_u32(sv + swz<D>(r, c)), pv + off, ok ? 16 : 0);
    }
}

/* The same for blocks of DEC_BT16 tokens (the engine's default on a GPU), t0 a multiple of
 * them: a thread's rows r0 + i R (R rows a pass, which divides DEC_BT16) fall in the tile's
 * blocks (i R) / DEC_BT16 at row r0 + (i R) % DEC_BT16, so the tile reads its DEC_TILE /
 * DEC_BT16 block ids once and every copy's offset is one of them plus a constant. A third of
 * the kernel's instructions were the general loader's index arithmetic (ncu: an instruction
 * issued every 2.4 cycles, 2 warps a scheduler, the rest waiting on dependencies). */
#define DEC_BT16 16
template <int D>
static __device__ __forceinline__ void dec_load_tile16(uc_bf16_t *sk, uc_bf16_t *sv,
                                                       const uc_bf16_t *pk, const uc_bf16_t *pv,
                                                       const int32_t *blk, int t0, int t_end)
{
    constexpr int CH = D / 8, R = DEC_THREADS / CH, NB = DEC_TILE / DEC_BT16;
    static_assert(DEC_BT16 % R == 0 && DEC_TILE % DEC_BT16 == 0, "rows a pass divide a block");
    const int r0 = threadIdx.x / CH, c = threadIdx.x % CH;
    int64_t base[NB];
#pragma unroll
    for (int k = 0; k < NB; k++) {
        const bool any = t0 + k * DEC_BT16 < t_end;
        base[k] = any ? (int64_t)__ldg(blk + t0 / DEC_BT16 + k) * (DEC_BT16 * D) : 0;
    }
    const int64_t own = (int64_t)r0 * D + c * 8;
#pragma unroll
    for (int i = 0; i < DEC_TILE * CH / DEC_THREADS; i++) {
        const int r = r0 + i * R;
        const bool ok = t0 + r < t_end;
        const int64_t off = ok ? base[(i * R) / DEC_BT16] + own + ((i * R) % DEC_BT16) * D : 0;
        cp_async16(smem_u32(sk + swz<D>(r, c)), pk + off, ok ? 16 : 0);
        cp_async16(smem_u32(sv + swz<D>(r, c)), pv + off, ok ? 16 : 0);
    }
}

template <int D, bool BT16>
static __global__ void __launch_bounds__(DEC_THREADS, DEC_RESIDENT)
    decode_tc_kernel(const uc_bf16_t *q, int64_t ld_q, const uc_bf16_t *pk, const uc_bf16_t *pv,
                     int bt, const int32_t *n_tokens, const int32_t *offset,
                     const int32_t *blocks, int hkv, int group, int chunk, int n_splits,
                     float scale, float *part_o, float *part_ml, float *scores,
                     int64_t max_tokens, uc_bf16_t *out, float *fin_ml, int32_t *counters)
{
    extern __shared__ __align__(128) uint8_t dec_smem[];
    uc_bf16_t *sk = reinterpret_cast<uc_bf16_t *>(dec_smem);
    uc_bf16_t *sv = sk + DEC_STAGES * DEC_TILE * D;
    __shared__ float ml_s[DEC_WARPS][DEC_GT][2];

    uck_grid_wait();
    const dec_item it = dec_item_of(n_tokens, hkv, group, chunk, n_splits);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int qrow = lane >> 2, t4 = lane & 3;
    const int32_t *blk = blocks + offset[it.e];
    const bool bt_pow2 = (bt & (bt - 1)) == 0;
    const int bt_shift = __ffs(bt) - 1;
    const int n_tiles = it.t_end > it.t_begin ? (it.t_end - it.t_begin + DEC_TILE - 1) / DEC_TILE
                                              : 0;

    /* Q as the A operand: row qrow = query head g0 + qrow (zero past the tile's heads); the
     * fragment's rows 8..15 are always zero */
    uint32_t qa[D / 16][2];
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        qa[ks][0] = qa[ks][1] = 0u;
        if (qrow < it.gc) {
            const uc_bf16_t *src = q + (int64_t)it.b * ld_q +
                                   (int64_t)(it.j * group + it.g0 + qrow) * D + ks * 16 + t4 * 2;
            qa[ks][0] = *reinterpret_cast<const uint32_t *>(src);
            qa[ks][1] = *reinterpret_cast<const uint32_t *>(src + 8);
        }
    }
    auto load = [&](int tile, int stage) {
        const int t0 = it.t_begin + tile * DEC_TILE;
        if (BT16) {
            dec_load_tile16<D>(sk + stage * DEC_TILE * D, sv + stage * DEC_TILE * D, pk, pv, blk,
                               t0, it.t_end);
        } else {
            dec_load_tile<D>(sk + stage * DEC_TILE * D, sv + stage * DEC_TILE * D, pk, pv, blk,
                             bt, bt_shift, bt_pow2, t0, it.t_end);
        }
    };
#pragma unroll
    for (int s = 0; s < DEC_STAGES - 1; s++) {
        if (s < n_tiles) {
            load(s, s);
        }
        cp_async_commit();
    }
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    }
    float m_r = -INFINITY, l_r = 0.0f; /* row qrow; l_r is this lane's share of the sum */
    const int tb = warp * 16;          /* the warp's 16 tokens of each tile */
    for (int ti = 0; ti < n_tiles; ti++) {
        cp_async_wait<DEC_STAGES - 2>();
        __syncthreads(); /* tile ti is in; every warp is done with tile ti - 1's stage */
        {
            const int nx = ti + DEC_STAGES - 1, sx = nx % DEC_STAGES;
            if (nx < n_tiles) {
                load(nx, sx);
            }
            cp_async_commit();
        }
        const int st = ti % DEC_STAGES;
        const uc_bf16_t *kt = sk + st * DEC_TILE * D, *vt = sv + st * DEC_TILE * D;
        /* S = Q K^T over the warp's 16 tokens (two n-tiles of 8), the head dimension's even
         * and odd k-steps in separate sums: four chains of dependent mmas instead of two */
        float s0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float u0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, u1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            uint32_t r[4];
            const int row = tb + (lane & 7) + ((lane >> 4) << 3);
            ldsm_x4(r, smem_u32(kt + swz<D>(row, 2 * ks + ((lane >> 3) & 1))));
            const uint32_t a[4] = {qa[ks][0], 0u, qa[ks][1], 0u};
            mma_bf16(ks & 1 ? u0 : s0, a, r[0], r[1]);
            mma_bf16(ks & 1 ? u1 : s1, a, r[2], r[3]);
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            s0[k] += u0[k];
            s1[k] += u1[k];
        }
        /* this lane's four scores of row qrow: tokens ta, ta + 1, ta + 8, ta + 9 */
        const int ta = it.t_begin + ti * DEC_TILE + tb + t4 * 2;
        float sc[4] = {s0[0] * scale, s0[1] * scale, s1[0] * scale, s1[1] * scale};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int t = ta + (k & 1) + (k >> 1) * 8;
            if (t >= it.t_end) {
                sc[k] = -INFINITY;
            } else if (scores && qrow < it.gc) {
                scores[((int64_t)it.e * group + it.g0 + qrow) * max_tokens + t] = sc[k];
            }
        }
        float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_r, mx);
        const float ref = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = expf(m_r - ref);
        m_r = m_new;
        float p[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            p[k] = expf(sc[k] - ref);
        }
        l_r = l_r * alpha + (p[0] + p[1]) + (p[2] + p[3]);
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            o[n][0] *= alpha;
            o[n][1] *= alpha;
        }
        /* O += P V: P (row qrow, the warp's 16 tokens) as the A operand */
        const uint32_t pa[4] = {pack_bf16(p[0], p[1]), 0u, pack_bf16(p[2], p[3]), 0u};
#pragma unroll
        for (int c = 0; c < D / 8; c += 2) {
            uint32_t r[4];
            const int row = tb + (lane & 7) + (((lane >> 3) & 1) << 3);
            ldsm_x4_t(r, smem_u32(vt + swz<D>(row, c + (lane >> 4))));
            mma_bf16(o[c], pa, r[0], r[1]);
            mma_bf16(o[c + 1], pa, r[2], r[3]);
        }
    }
    cp_async_wait_all();
    __syncthreads(); /* the stage buffers are free: they hold the warps' O slices now */
    float *red = reinterpret_cast<float *>(dec_smem);
    l_r += __shfl_xor_sync(0xffffffffu, l_r, 1);
    l_r += __shfl_xor_sync(0xffffffffu, l_r, 2);
    if (qrow < it.gc) {
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            red[(warp * DEC_GT + qrow) * D + n * 8 + t4 * 2] = o[n][0];
            red[(warp * DEC_GT + qrow) * D + n * 8 + t4 * 2 + 1] = o[n][1];
        }
        if (t4 == 0) {
            ml_s[warp][qrow][0] = m_r;
            ml_s[warp][qrow][1] = l_r;
        }
    }
    __syncthreads();
    dec_merge_substreams(it, red, ml_s, DEC_WARPS, D, group, n_splits, part_o, part_ml);
    dec_merge_ranges<uc_bf16_t>(it, hkv, group, D, n_splits, part_o, part_ml, out, fin_ml,
                                counters, red + DEC_WARPS * DEC_GT * D);
}

/* ---- generic path ----------------------------------------------------------------------- */

template <typename T>
static __global__ void __launch_bounds__(DEC_THREADS, 4)
    decode_split_kernel(const T *q, int64_t ld_q, const T *pk, const T *pv, int bt, int d,
                        const int32_t *n_tokens, const int32_t *offset, const int32_t *blocks,
                        int hkv, int group, int chunk, int n_splits, float scale, float *part_o,
                        float *part_ml, float *scores, int64_t max_tokens, T *out, float *fin_ml,
                        int32_t *counters)
{
    constexpr int VEC = 16 / sizeof(T);
    /* the sub-streams' O slices, then the merge weights of the ranges */
    __shared__ float red[DEC_THREADS * VEC * DEC_GT];
    __shared__ float ml_s[DEC_THREADS][DEC_GT][2]; /* (sub-stream, head): max, sum */
    __shared__ int32_t blk_s[DEC_PAGES];

    uck_grid_wait();
    const dec_item it = dec_item_of(n_tokens, hkv, group, chunk, n_splits);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int32_t *blk = blocks + offset[it.e];
    const bool bt_pow2 = (bt & (bt - 1)) == 0;
    const int bt_shift = __ffs(bt) - 1;

    /* LPT lanes per token, each one 16-byte chunk; TPW tokens per warp load */
    const int n_ch = d / VEC;
    int lpt = 1;
    while (lpt < n_ch) {
        lpt <<= 1;
    }
    const int tpw = 32 / lpt, sub = lane / lpt, ch = lane % lpt;
    const bool lane_on = ch < n_ch;
    const int per_warp = DEC_U * tpw; /* tokens of one warp iteration */
    const int per_block = DEC_WARPS * per_warp;

    float qr[DEC_GT][VEC];
#pragma unroll
    for (int gl = 0; gl < DEC_GT; gl++) {
        const T *qrow =
            q + (int64_t)it.b * ld_q + (int64_t)(it.j * group + it.g0 + gl) * d + ch * VEC;
#pragma unroll
        for (int v = 0; v < VEC; v++) {
            qr[gl][v] = gl < it.gc && lane_on ? uck_to_f(qrow[v]) : 0.0f;
        }
    }
    float m_r[DEC_GT], l_r[DEC_GT], acc[DEC_GT][VEC];
#pragma unroll
    for (int gl = 0; gl < DEC_GT; gl++) {
        m_r[gl] = -INFINITY;
        l_r[gl] = 0.0f;
#pragma unroll
        for (int v = 0; v < VEC; v++) {
            acc[gl][v] = 0.0f;
        }
    }

    for (int c0 = it.t_begin; c0 < it.t_end;) {
        const int p0 = bt_pow2 ? c0 >> bt_shift : c0 / bt;
        const int c1 = it.t_end < (p0 + DEC_PAGES) * bt ? it.t_end : (p0 + DEC_PAGES) * bt;
        const int np = (c1 - 1) / bt - p0 + 1;
        __syncthreads(); /* the previous window's ids are no longer read */
        for (int i = tid; i < np; i += DEC_THREADS) {
            blk_s[i] = blk[p0 + i];
        }
        __syncthreads();
        for (int base = c0 + warp * per_warp; base < c1; base += per_block) {
            uint4 rk[DEC_U], rv[DEC_U];
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                const int t = base + u * tpw + sub;
                if (t < c1 && lane_on) {
                    const int pg = bt_pow2 ? t >> bt_shift : t / bt;
                    const int in = bt_pow2 ? t & (bt - 1) : t - pg * bt;
                    const int64_t off = ((int64_t)blk_s[pg - p0] * bt + in) * d + ch * VEC;
                    rk[u] = __ldcs(reinterpret_cast<const uint4 *>(pk + off));
                    rv[u] = __ldcs(reinterpret_cast<const uint4 *>(pv + off));
                } else {
                    rk[u] = make_uint4(0u, 0u, 0u, 0u);
                    rv[u] = rk[u];
                }
            }
            float s[DEC_U][DEC_GT];
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                float kf[VEC];
                unpack_vec<T, VEC>(kf, rk[u]);
#pragma unroll
                for (int gl = 0; gl < DEC_GT; gl++) {
                    float dot = 0.0f;
#pragma unroll
                    for (int v = 0; v < VEC; v++) {
                        dot += qr[gl][v] * kf[v];
                    }
                    for (int o = lpt >> 1; o > 0; o >>= 1) {
                        dot += __shfl_xor_sync(0xffffffffu, dot, o);
                    }
                    s[u][gl] = dot * scale;
                }
                const int t = base + u * tpw + sub;
                if (t >= c1) {
#pragma unroll
                    for (int gl = 0; gl < DEC_GT; gl++) {
                        s[u][gl] = -INFINITY;
                    }
                } else if (scores && ch == 0) {
                    for (int gl = 0; gl < it.gc; gl++) {
                        scores[((int64_t)it.e * group + it.g0 + gl) * max_tokens + t] = s[u][gl];
                    }
                }
            }
            /* online softmax of this sub-stream over its DEC_U new tokens */
#pragma unroll
            for (int gl = 0; gl < DEC_GT; gl++) {
                float mx = m_r[gl];
#pragma unroll
                for (int u = 0; u < DEC_U; u++) {
                    mx = fmaxf(mx, s[u][gl]);
                }
                const float ref = mx == -INFINITY ? 0.0f : mx;
                const float a = expf(m_r[gl] - ref);
                m_r[gl] = mx;
                float sum = 0.0f;
#pragma unroll
                for (int u = 0; u < DEC_U; u++) {
                    s[u][gl] = expf(s[u][gl] - ref);
                    sum += s[u][gl];
                }
                l_r[gl] = l_r[gl] * a + sum;
#pragma unroll
                for (int v = 0; v < VEC; v++) {
                    acc[gl][v] *= a;
                }
            }
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                float vf[VEC];
                unpack_vec<T, VEC>(vf, rv[u]);
#pragma unroll
                for (int gl = 0; gl < DEC_GT; gl++) {
#pragma unroll
                    for (int v = 0; v < VEC; v++) {
                        acc[gl][v] += s[u][gl] * vf[v];
                    }
                }
            }
        }
        c0 = c1;
    }
    /* merge the sub-streams into this range's partial, then the ranges */
    const int si = warp * tpw + sub;
    if (lane_on) {
#pragma unroll
        for (int gl = 0; gl < DEC_GT; gl++) {
#pragma unroll
            for (int v = 0; v < VEC; v++) {
                red[(si * DEC_GT + gl) * d + ch * VEC + v] = acc[gl][v];
            }
        }
    }
    if (ch == 0) {
#pragma unroll
        for (int gl = 0; gl < DEC_GT; gl++) {
            ml_s[si][gl][0] = m_r[gl];
            ml_s[si][gl][1] = l_r[gl];
        }
    }
    __syncthreads();
    dec_merge_substreams(it, red, ml_s, DEC_WARPS * tpw, d, group, n_splits, part_o, part_ml);
    dec_merge_ranges<T>(it, hkv, group, d, n_splits, part_o, part_ml, out, fin_ml, counters, red);
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
    /* DEC_WAVES waves of resident blocks when the rows alone do not fill the GPU */
    int64_t want = ceil_div(DEC_WAVES * DEC_RESIDENT * (int64_t)(n_sms > 0 ? n_sms : 132),
                            entries * g_tiles);
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

/* The tensor-core path for bf16 rows of D = 64, 128 or 256; false where it does not apply (or
 * UC_CUDA_DECODE_TC=0 turns it off, for A/B timings against the generic path). */
template <int D>
static void dec_tc_go(dim3 grid, cudaStream_t stream, const void *q, int64_t ld_q, const void *pk,
                      const void *pv, int64_t bt, const int32_t *n_tokens, const int32_t *offset,
                      const int32_t *blocks, int64_t hkv, int64_t group,
                      const struct uc_cuda_decode_plan *plan, float scale, float *part_o,
                      float *part_ml, float *scores, int64_t mt, void *out, float *fin_ml,
                      int32_t *counters)
{
    const size_t smem = (size_t)2 * DEC_STAGES * DEC_TILE * D * sizeof(uc_bf16_t);
    static bool smem_set = false; /* the opt-in above 48 KiB, once per head size */
    if (!smem_set) {
        (void)cudaFuncSetAttribute(decode_tc_kernel<D, false>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        (void)cudaFuncSetAttribute(decode_tc_kernel<D, true>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        smem_set = true;
    }
    uck_launch(bt == DEC_BT16 ? decode_tc_kernel<D, true> : decode_tc_kernel<D, false>, grid,
               dim3(DEC_THREADS), smem, stream,
               static_cast<const uc_bf16_t *>(q), ld_q, static_cast<const uc_bf16_t *>(pk),
               static_cast<const uc_bf16_t *>(pv), (int)bt, n_tokens, offset, blocks, (int)hkv,
               (int)group, plan->chunk, plan->n_splits, scale, part_o, part_ml, scores, mt,
               static_cast<uc_bf16_t *>(out), fin_ml, counters);
}

static bool dec_tc_launch(int64_t d, dim3 grid, cudaStream_t stream, const void *q, int64_t ld_q,
                          const void *pk, const void *pv, int64_t bt, const int32_t *n_tokens,
                          const int32_t *offset, const int32_t *blocks, int64_t hkv,
                          int64_t group, const struct uc_cuda_decode_plan *plan, float scale,
                          float *part_o, float *part_ml, float *scores, int64_t mt, void *out,
                          float *fin_ml, float *psum, int32_t *counters)
{
    static int enabled = -1;
    if (enabled < 0) {
        const char *v = getenv("UC_CUDA_DECODE_TC");
        enabled = !(v && strcmp(v, "0") == 0);
    }
    float *fm = psum ? fin_ml : NULL;
    if (!enabled || (ld_q & 1) != 0) { /* Q rows are read two elements at a time */
        return false;
    }
    switch (d) {
    case 64:
        dec_tc_go<64>(grid, stream, q, ld_q, pk, pv, bt, n_tokens, offset, blocks, hkv, group,
                      plan, scale, part_o, part_ml, scores, mt, out, fm, counters);
        return true;
    case 128:
        dec_tc_go<128>(grid, stream, q, ld_q, pk, pv, bt, n_tokens, offset, blocks, hkv, group,
                       plan, scale, part_o, part_ml, scores, mt, out, fm, counters);
        return true;
    case 256:
        dec_tc_go<256>(grid, stream, q, ld_q, pk, pv, bt, n_tokens, offset, blocks, hkv, group,
                       plan, scale, part_o, part_ml, scores, mt, out, fm, counters);
        return true;
    default:
        return false;
    }
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
    if (!(std::is_same<T, uc_bf16_t>::value && dec_tc_launch(d, grid, stream, q, ld_q, pk, pv, bt,
                                                            n_tokens, offset, blocks, n_heads_kv,
                                                            group, plan, scale, part_o, part_ml,
                                                            scores, mt, out, fin_ml, psum,
                                                            counters))) {
        uck_launch(decode_split_kernel<T>, grid, dim3(DEC_THREADS), 0, stream,
                   static_cast<const T *>(q), ld_q, static_cast<const T *>(pk),
                   static_cast<const T *>(pv), (int)bt, (int)d, n_tokens, offset, blocks,
                   (int)n_heads_kv, (int)group, plan->chunk, plan->n_splits, scale, part_o, part_ml,
                   scores, mt, static_cast<T *>(out), psum ? fin_ml : NULL, counters);
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
