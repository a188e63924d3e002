/* Flash-decoding over rows of a layout of their own (ThinK's packed rows, kv_packed.cu;
 * MiniCache's merged rows beside an entry's own tokens, kv_merged.cu): the decode attention of
 * the entries the tensor-core kernel sees empty.
 *
 * Work item: (entry e = row b * Hkv + KV head j, token range s, query-head tile z), a block of
 * DR_WARPS warps. A warp takes one token at a time (two loaded before either is used): lane l
 * holds row elements l, l + 32, ... of the token's key and value, the query heads' matching
 * channels sit in registers, the scores are reduced across the warp, and each warp keeps an
 * online softmax per query head. The block merges its warps into one unnormalised partial (O,
 * max, sum) per head; a second kernel merges the ranges and writes out (and the
 * probabilities, when asked: the scores are kept, then weighed by the final max and sum).
 *
 * A layout supplies a reader R with
 *   struct entry;                                         what one entry's rows need
 *   bool entry_of(int64_t e, entry &en) const;            false: not this layout's entry
 *   int64_t count(const entry &) const;                   tokens (rows) of the entry
 *   int64_t kwidth(const entry &) const;                  key elements of a row (<= 256)
 *   int64_t qchan(const entry &, int64_t c) const;        query channel of key element c
 *   template <int NL> void load(const entry &, int t, int lane, float *kf, float *vf,
 *                               float &ks, float &vs) const;
 *       key elements lane + 32 i (kf) and value channels lane + 32 i (vf), i < NL, zero past
 *       the row, and the factors the score and the values take (1 for a plain row).
 * NL = D / 32 (at least 1): a lane's share of a row, so the registers fit the head size. */
#ifndef UC_SHARD_KERNELS_DECODE_ROWS_CUH
#define UC_SHARD_KERNELS_DECODE_ROWS_CUH

#include "common.cuh"

#define DR_THREADS 128
#define DR_WARPS (DR_THREADS / 32)
#define DR_GT 4         /* query heads per block */
#define DR_PER_LANE 8   /* row elements per lane at most: key widths and head sizes up to 256 */
#define DR_U 4          /* tokens a warp loads before using any */
#define DR_MAX_SPLITS 32

/* Rows of w elements in the stream that a pool block's K area (bt * d elements) followed by its
 * V area forms, tpb = floor(2 bt d / w) rows a block (the packed, merged and latent layouts of
 * backend.h). A row, located once: element i is lo[i] for i < cut, else hi[off + i] (the V
 * area's part of a row that starts in the K area). */
template <typename T>
struct dr_row {
    const T *lo, *hi;
    int64_t cut, off;
};

/* Row `in` (< tpb) of pool block `b`. */
template <typename T>
static __device__ __forceinline__ dr_row<T> dr_locate_in(const T *pk, const T *pv, int64_t bt,
                                                         int64_t d, int w, int64_t b, int in)
{
    int64_t per = bt * d, at = (int64_t)in * w;
    dr_row<T> r;
    r.hi = pv + b * per;
    r.off = at - per;
    if (at < per) {
        r.lo = pk + b * per + at;
        r.cut = per - at;
    } else {
        r.lo = pv + b * per + (at - per);
        r.cut = w;
    }
    return r;
}

/* Row `slot` = block * tpb + row. */
template <typename T>
static __device__ __forceinline__ dr_row<T> dr_locate(const T *pk, const T *pv, int64_t bt,
                                                      int64_t d, int64_t w, int64_t tpb,
                                                      int64_t slot)
{
    int64_t b = slot / tpb;
    return dr_locate_in(pk, pv, bt, d, (int)w, b, (int)(slot - b * tpb));
}

template <typename T>
static __device__ __forceinline__ float dr_get(const dr_row<T> &r, int64_t i)
{
    return uck_to_f(i < r.cut ? r.lo[i] : r.hi[r.off + i]);
}

/* Ranges per (entry, head tile) and the workspace floats: partial O, then (max, sum) per range
 * and head, then the final (max, sum) per head, then with probabilities the scores. */
static inline int dr_splits(int64_t n_rows, int64_t n_heads, int64_t n_kv, int n_sms)
{
    int64_t tiles = n_rows * n_kv * ((n_heads / n_kv + DR_GT - 1) / DR_GT);
    int64_t want = (4 * (int64_t)(n_sms > 0 ? n_sms : 132) + tiles - 1) / tiles;
    return (int)(want < 1 ? 1 : want > DR_MAX_SPLITS ? DR_MAX_SPLITS : want);
}

static inline size_t dr_ws_floats(int64_t n_rows, int64_t n_heads, int64_t n_kv, int64_t d,
                                  int splits, int64_t max_tokens, bool with_psum)
{
    size_t heads = (size_t)(n_rows * n_heads);
    return heads * (size_t)splits * (size_t)(d + 2) + heads * 2 +
           (with_psum ? heads * (size_t)max_tokens : 0);
}

template <typename T, typename R, int NL>
static __global__ void __launch_bounds__(DR_THREADS)
    dr_split_kernel(R rows, const T *q, int64_t ld_q, int d, int n_kv, int group, float scale,
                    int n_splits, float *part_o, float *part_ml, float *scores, int64_t maxn)
{
    __shared__ float red_o[DR_WARPS][DR_GT][NL * 32];
    __shared__ float red_ml[DR_WARPS][DR_GT][2];
    uck_grid_wait();
    typename R::entry en;
    const int64_t e = blockIdx.x;
    if (!rows.entry_of(e, en)) {
        return;
    }
    const int split = blockIdx.y, g0 = blockIdx.z * DR_GT;
    const int gc = group - g0 < DR_GT ? group - g0 : DR_GT;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t b = e / n_kv, j = e - b * n_kv;
    const int64_t n = rows.count(en), kw = rows.kwidth(en);
    const int64_t step = (n + n_splits - 1) / n_splits;
    const int64_t t_begin = split * step, t_end = t_begin + step < n ? t_begin + step : n;

    float qr[DR_GT][NL];
#pragma unroll
    for (int g = 0; g < DR_GT; g++) {
        const T *qh = q + b * ld_q + (j * group + g0 + g) * (int64_t)d;
#pragma unroll
        for (int i = 0; i < NL; i++) {
            const int64_t c = lane + 32 * i;
            qr[g][i] = g < gc && c < kw ? uck_to_f(qh[rows.qchan(en, c)]) : 0.0f;
        }
    }
    float m[DR_GT], l[DR_GT], acc[DR_GT][NL];
#pragma unroll
    for (int g = 0; g < DR_GT; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < NL; i++) {
            acc[g][i] = 0.0f;
        }
    }
    for (int t0 = (int)t_begin + DR_U * warp; t0 < (int)t_end; t0 += DR_U * DR_WARPS) {
        float kf[DR_U][NL], vf[DR_U][NL], ks[DR_U], vs[DR_U];
#pragma unroll
        for (int u = 0; u < DR_U; u++) {
            if (t0 + u < t_end) {
                rows.template load<NL>(en, t0 + u, lane, kf[u], vf[u], ks[u], vs[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < DR_U; u++) {
            if (t0 + u >= t_end) {
                break;
            }
            float s[DR_GT];
#pragma unroll
            for (int g = 0; g < DR_GT; g++) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < NL; i++) {
                    dot += qr[g][i] * kf[u][i];
                }
                s[g] = dot;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int g = 0; g < DR_GT; g++) {
                    s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
                }
            }
#pragma unroll
            for (int g = 0; g < DR_GT; g++) {
                if (g >= gc) {
                    continue;
                }
                const float sg = s[g] * ks[u] * scale;
                if (scores && lane == 0) {
                    scores[(e * group + g0 + g) * maxn + t0 + u] = sg;
                }
                const float mn = fmaxf(m[g], sg);
                const float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mn);
                const float p = expf(sg - mn);
                l[g] = l[g] * alpha + p;
                const float pv = p * vs[u];
#pragma unroll
                for (int i = 0; i < NL; i++) {
                    acc[g][i] = acc[g][i] * alpha + pv * vf[u][i];
                }
                m[g] = mn;
            }
        }
    }
    /* the warps' partials into one per head */
#pragma unroll
    for (int g = 0; g < DR_GT; g++) {
#pragma unroll
        for (int i = 0; i < NL; i++) {
            red_o[warp][g][lane + 32 * i] = acc[g][i];
        }
        if (lane == 0) {
            red_ml[warp][g][0] = m[g];
            red_ml[warp][g][1] = l[g];
        }
    }
    __syncthreads();
    const int64_t base = (e * n_splits + split) * group + g0;
    for (int idx = threadIdx.x; idx < gc * d; idx += DR_THREADS) {
        const int g = idx / d, c = idx - g * d;
        float mx = -INFINITY;
        for (int w = 0; w < DR_WARPS; w++) {
            mx = fmaxf(mx, red_ml[w][g][0]);
        }
        float o = 0.0f, sum = 0.0f;
        for (int w = 0; w < DR_WARPS; w++) {
            const float mw = red_ml[w][g][0];
            const float f = mw == -INFINITY ? 0.0f : expf(mw - mx);
            o += f * red_o[w][g][c];
            sum += f * red_ml[w][g][1];
        }
        part_o[(base + g) * d + c] = o;
        if (c == 0) {
            part_ml[(base + g) * 2] = mx;
            part_ml[(base + g) * 2 + 1] = sum;
        }
    }
}

/* One block per entry: out = sum_s f_s O_s / sum_s f_s l_s, f_s = exp(m_s - M), and (M, L) per
 * head into fin_ml. */
template <typename T, typename R>
static __global__ void __launch_bounds__(DR_THREADS)
    dr_combine_kernel(R rows, T *out, int d, int n_kv, int group, int n_splits,
                      const float *part_o, const float *part_ml, float *fin_ml)
{
    uck_grid_wait();
    typename R::entry en;
    const int64_t e = blockIdx.x;
    if (!rows.entry_of(e, en)) {
        return;
    }
    const int64_t b = e / n_kv, j = e - b * n_kv;
    for (int idx = threadIdx.x; idx < group * d; idx += DR_THREADS) {
        const int g = idx / d, c = idx - g * d;
        const float *ml = part_ml + (e * n_splits * group + g) * 2;
        float mx = -INFINITY;
        for (int s = 0; s < n_splits; s++) {
            mx = fmaxf(mx, ml[(int64_t)s * group * 2]);
        }
        float o = 0.0f, sum = 0.0f;
        for (int s = 0; s < n_splits; s++) {
            const float ms = ml[(int64_t)s * group * 2];
            const float f = ms == -INFINITY ? 0.0f : expf(ms - mx);
            o += f * part_o[((e * n_splits + s) * group + g) * d + c];
            sum += f * ml[(int64_t)s * group * 2 + 1];
        }
        out[(b * n_kv * group + j * group + g) * d + c] = uck_from_f<T>(sum > 0.0f ? o / sum : 0.0f);
        if (c == 0) {
            fin_ml[(e * group + g) * 2] = mx;
            fin_ml[(e * group + g) * 2 + 1] = sum;
        }
    }
}

/* psum[e, t] = sum over the entry's query heads of exp(score - M) / L, zero past its tokens. */
template <typename R>
static __global__ void dr_psum_kernel(R rows, float *psum, const float *scores,
                                      const float *fin_ml, int group, int64_t maxn)
{
    uck_grid_wait();
    typename R::entry en;
    const int64_t e = blockIdx.x;
    if (!rows.entry_of(e, en)) {
        return;
    }
    const int64_t n = rows.count(en);
    for (int64_t t = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; t < maxn;
         t += (int64_t)gridDim.y * blockDim.x) {
        float p = 0.0f;
        for (int g = 0; t < n && g < group; g++) {
            const float *ml = fin_ml + (e * group + g) * 2;
            p += ml[1] > 0.0f ? expf(scores[(e * group + g) * maxn + t] - ml[0]) / ml[1] : 0.0f;
        }
        psum[e * maxn + t] = p;
    }
}

/* The three kernels for the entries R reads; ws holds dr_ws_floats(...) floats. */
template <typename T, typename R>
static void dr_decode(const R &rows, T *out, const T *q, int64_t ld_q, int64_t d, int64_t n_rows,
                      int64_t n_heads, int64_t n_kv, int splits, float *ws, float *psum,
                      int64_t maxn, cudaStream_t stream)
{
    const int64_t entries = n_rows * n_kv, group = n_heads / n_kv;
    const size_t heads = (size_t)(n_rows * n_heads);
    float *part_o = ws, *part_ml = part_o + heads * splits * d;
    float *fin_ml = part_ml + heads * splits * 2;
    float *scores = psum ? fin_ml + heads * 2 : NULL;
    dim3 grid((unsigned)entries, (unsigned)splits, (unsigned)((group + DR_GT - 1) / DR_GT));
    void (*kernel)(R, const T *, int64_t, int, int, int, float, int, float *, float *, float *,
                   int64_t) = d <= 32    ? dr_split_kernel<T, R, 1>
                              : d <= 64  ? dr_split_kernel<T, R, 2>
                              : d <= 128 ? dr_split_kernel<T, R, 4>
                                         : dr_split_kernel<T, R, 8>;
    uck_launch(kernel, grid, dim3(DR_THREADS), 0, stream, rows, q, ld_q, (int)d, (int)n_kv,
               (int)group, 1.0f / sqrtf((float)d), splits, part_o, part_ml, scores, maxn);
    uck_launch(dr_combine_kernel<T, R>, dim3((unsigned)entries), dim3(DR_THREADS), 0, stream,
               rows, out, (int)d, (int)n_kv, (int)group, splits, (const float *)part_o,
               (const float *)part_ml, fin_ml);
    if (psum) {
        int64_t ys = (maxn + 255) / 256;
        uck_launch(dr_psum_kernel<R>, dim3((unsigned)entries, (unsigned)(ys < 64 ? ys : 64)),
                   dim3(256), 0, stream, rows, psum, (const float *)scores,
                   (const float *)fin_ml, (int)group, maxn);
    }
}

#endif
