/* Flash-decoding over rows of a layout of their own (ThinK's packed rows, kv_packed.cu;
 * MiniCache's merged rows beside an entry's own tokens, kv_merged.cu; LoRC's latent rows,
 * kv_latent.cu): the decode attention of the entries the tensor-core kernel sees empty.
 *
 * Work item: (entry e = row b * Hkv + KV head j, range s of the entry's pool blocks, query-head
 * tile z), a block of DR_WARPS warps. The range streams through shared memory a stage of whole
 * pool blocks at a time (each block's K area then its V area, copied with 16-byte cp.async, two
 * stages in flight), so a row never straddles the two areas there and the rows' own alignment
 * does not matter. A warp takes 32 rows of a stage, a row a lane: the lane's scores against the
 * query heads (held in shared memory), an online softmax per head with the chunk's max, then
 * the values weighted by the chunk's probabilities: in bf16 on tensor cores (P, heads x 16 rows,
 * times the rows' values, 16 x 8 channels, dr_values_mma), in float32 a row at a time with lane l
 * holding value channels l, l + 32, ... (UC_DR_VALUES=lane takes that path in bf16 too). The
 * block merges its warps into one unnormalised partial (O, max, sum) per head; a second
 * kernel merges the ranges and writes out (and the probabilities, when asked: the scores are
 * kept, then weighed by the final max and sum).
 *
 * A layout supplies a reader R: an entry's rows are one or two segments (MiniCache: the entry's
 * own plain rows, then its merged rows), each a block list with rows per block:
 *   struct entry;                                         what one entry's rows need
 *   bool entry_of(int64_t e, entry &en) const;            false: not this layout's entry
 *   int segs(const entry &) const;                        1 or 2
 *   int seg_rows(const entry &, int s) const;             rows (tokens) of segment s
 *   int seg_tpb(const entry &, int s) const;              rows a pool block of segment s holds
 *   const int32_t *seg_ids(const entry &, int s) const;   its pool block ids
 *   int64_t kwidth(const entry &) const;                  key elements of a row (<= 256)
 *   int64_t qchan(const entry &, int64_t c) const;        query channel of key element c
 *   float key(const entry &, int s, const T *img, int in, int c) const;   from a staged block
 *       (not for a reader that rebuilds: see below)
 *   float val(const entry &, int s, const T *img, int in, int c) const;   (K area then V area)
 *   float kscale(...), vscale(...) (same arguments but c): the factors the score and the
 *       values take (1 for a plain row).
 * and what dr_reader_defaults gives the plain layouts, which a layout may replace:
 *   rebuilds: the reader scores the warp's rows itself, scores<NL>(entry, s, img, in, valid,
 *       qs, s[DR_GT]), called by every lane of the warp with its own row (a stand-in row where
 *       not valid) (LoRC's latent rows: keys rebuilt from latents and rotated, kv_latent.cu);
 *   stage_budget: bytes of pool blocks a stage takes (two stages);
 *   smem_extra(d) (host): shared memory bytes the reader's prepare() fills once per CUDA block;
 *   vwidth(entry, d): value channels a row has (past them val() is 0);
 *   out(entry, j, om, g, c, d): output channel c of query head g from the merged, normalised
 *       value accumulators om (group x D; the latent rows finish with the value basis).
 * NL = D / 32 (at least 1): a lane's share of the value channels. */
#ifndef UC_SHARD_KERNELS_DECODE_ROWS_CUH
#define UC_SHARD_KERNELS_DECODE_ROWS_CUH

#include <string.h>

#include "common.cuh"
#include "mma.cuh"

#define DR_THREADS 128
#define DR_WARPS (DR_THREADS / 32)
#define DR_GT 4         /* query heads per block */
#define DR_PER_LANE 8   /* row elements per lane at most: key widths and head sizes up to 256 */
#define DR_SB_MAX 4     /* pool blocks a stage */
#define DR_MAX_SPLITS 32

/* The hooks a plain layout leaves as they are (see the reader interface above). */
struct dr_reader_defaults {
    static constexpr bool rebuilds = false;
    static constexpr size_t stage_budget = 20 * 1024;
    static size_t smem_extra(int64_t) { return 0; }
    template <typename E>
    __device__ void prepare(E &, float *, int) const
    {
    }
    template <typename E>
    __device__ int vwidth(const E &, int d) const
    {
        return d;
    }
    template <typename E>
    __device__ float out(const E &, int64_t, const float *om, int g, int c, int d) const
    {
        return om[g * d + c];
    }
};

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

/* Bytes of the split kernel's staged blocks (two stages of sb) or, at the end, of its warps'
 * value slices, whichever is larger: a reader's own shared memory follows. */
static __host__ __device__ __forceinline__ size_t dr_stage_bytes(int sb, size_t img_bytes,
                                                                 int64_t d)
{
    size_t st = 2 * (size_t)sb * img_bytes;
    size_t red = (size_t)DR_WARPS * DR_GT * (size_t)d * sizeof(float);
    return st > red ? st : red;
}

/* Where staged pool block `o` (an ordinal over the entry's segments) comes from. */
struct dr_blk {
    int seg, id, rows, tbase; /* segment, pool block id, rows it holds, token of its row 0 */
};

template <typename R>
static __device__ __forceinline__ dr_blk dr_blk_of(const R &rows, const typename R::entry &en,
                                                   int o)
{
    dr_blk k;
    int n0 = rows.seg_rows(en, 0), t0 = rows.seg_tpb(en, 0), nb0 = (n0 + t0 - 1) / t0;
    k.seg = o < nb0 ? 0 : 1;
    int oi = o - k.seg * nb0;
    int tpb = rows.seg_tpb(en, k.seg), n = rows.seg_rows(en, k.seg);
    k.id = rows.seg_ids(en, k.seg)[oi];
    k.rows = n - oi * tpb < tpb ? n - oi * tpb : tpb;
    k.tbase = k.seg * n0 + oi * tpb;
    return k;
}

/* bf16 values on tensor cores: the warp's rows (lane = row, nv of them; p its probabilities,
 * vsc its value scale, (kk, in) where it is staged: block kk of the stage at `stage`) weigh the
 * rows' values into vacc, two k-steps of 16 rows; the A operand is the query heads' p x vsc
 * (heads in its rows 0..DR_GT-1, the rest zero), B the rows' values at 8 channels a tile. */
template <typename T, typename R, int NT>
static __device__ __forceinline__ void dr_values_mma(const R &rows, const typename R::entry &en,
                                                     const float *p, float vsc, int kk, int in,
                                                     int nv, const T *stage, int img,
                                                     const dr_blk *blk, int d, float (*vacc)[2])
{
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    float pv[DR_GT];
#pragma unroll
    for (int g = 0; g < DR_GT; g++) {
        pv[g] = p[g] * vsc;
    }
    const int vw = rows.vwidth(en, d);
#pragma unroll
    for (int ks = 0; ks < 2; ks++) {
        if (16 * ks >= nv) {
            break;
        }
        /* this thread's k (row) slots: 2 tig, + 1, + 8, + 9 of the k-step */
        float pr[4];
        const T *im[4];
        int ir[4], sr[4];
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const int src = 16 * ks + 2 * tig + (x & 1) + 8 * (x >> 1);
            pr[x] = 0.0f;
#pragma unroll
            for (int g = 0; g < DR_GT; g++) {
                const float v = __shfl_sync(0xffffffffu, pv[g], src);
                pr[x] = g == gid ? v : pr[x];
            }
            const int kr = __shfl_sync(0xffffffffu, kk, src);
            ir[x] = __shfl_sync(0xffffffffu, in, src);
            im[x] = stage + (int64_t)kr * img;
            sr[x] = blk[kr].seg;
        }
        const uint32_t a[4] = {pack_bf16(pr[0], pr[1]), 0u, pack_bf16(pr[2], pr[3]), 0u};
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (8 * t >= vw) {
                break;
            }
            const int c = 8 * t + gid;
            const uint32_t b0 = pack_bf16(rows.val(en, sr[0], im[0], ir[0], c),
                                          rows.val(en, sr[1], im[1], ir[1], c));
            const uint32_t b1 = pack_bf16(rows.val(en, sr[2], im[2], ir[2], c),
                                          rows.val(en, sr[3], im[3], ir[3], c));
            float cc[4] = {vacc[t][0], vacc[t][1], 0.0f, 0.0f};
            mma_bf16(cc, a, b0, b1);
            vacc[t][0] = cc[0];
            vacc[t][1] = cc[1];
        }
    }
}

template <typename T, typename R, int NL, bool MV>
static __global__ void __launch_bounds__(DR_THREADS, MV ? 3 : 1)
    dr_split_kernel(R rows, const T *q, int64_t ld_q, const T *pk, const T *pv, int bt, int d,
                    int n_kv, int group, float scale, int n_splits, int sb, float *part_o,
                    float *part_ml, float *scores, int64_t maxn)
{
    extern __shared__ __align__(16) uint8_t dr_smem[];
    __shared__ float qs[DR_GT][DR_PER_LANE * 32];
    __shared__ float red_ml[DR_WARPS][DR_GT][2];
    __shared__ dr_blk st_blk[2][DR_SB_MAX];
    T *img0 = reinterpret_cast<T *>(dr_smem);
    const int img = 2 * bt * d; /* elements of a staged pool block */
    uck_grid_wait();
    typename R::entry en;
    const int64_t e = blockIdx.x;
    if (!rows.entry_of(e, en)) {
        return;
    }
    const int split = blockIdx.y, g0 = blockIdx.z * DR_GT;
    const int gc = group - g0 < DR_GT ? group - g0 : DR_GT;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int64_t b = e / n_kv, j = e - b * n_kv;
    const int kw = (int)rows.kwidth(en);
    int nb = 0;
    for (int sg = 0; sg < rows.segs(en); sg++) {
        nb += (rows.seg_rows(en, sg) + rows.seg_tpb(en, sg) - 1) / rows.seg_tpb(en, sg);
    }
    const int step = (nb + n_splits - 1) / n_splits;
    const int o_begin = split * step, o_end = o_begin + step < nb ? o_begin + step : nb;
    const int n_st = o_end > o_begin ? (o_end - o_begin + sb - 1) / sb : 0;

    /* the reader's own shared memory (read after the first stage's barrier) */
    rows.prepare(en, reinterpret_cast<float *>(dr_smem + dr_stage_bytes(sb, img * sizeof(T), d)),
                 tid);
    for (int i = tid; i < DR_GT * kw; i += DR_THREADS) {
        const int g = i / kw, c = i - g * kw;
        qs[g][c] = g < gc ? uck_to_f(q[b * ld_q + (j * group + g0 + g) * (int64_t)d +
                                       rows.qchan(en, c)])
                          : 0.0f;
    }
    /* stage st: its blocks' origins (the buffer's previous readers passed the barrier that
     * ends each stage), then their K and V areas by 16-byte copies */
    auto load_stage = [&](int st) {
        const int buf = st & 1, o0 = o_begin + st * sb;
        const int cnt = o_end - o0 < sb ? o_end - o0 : sb;
        const int chunks = bt * d * (int)sizeof(T) / 16; /* of one area */
        if (tid < cnt) {
            st_blk[buf][tid] = dr_blk_of(rows, en, o0 + tid);
        }
        __syncthreads();
        for (int i = tid; i < cnt * 2 * chunks; i += DR_THREADS) {
            const int k = i / (2 * chunks), r = i - k * 2 * chunks;
            const int area = r / chunks, ch = r - area * chunks;
            const T *src = (area ? pv : pk) + (int64_t)st_blk[buf][k].id * bt * d +
                           ch * (16 / sizeof(T));
            T *dst = img0 + (int64_t)(buf * sb + k) * img + area * bt * d + ch * (16 / sizeof(T));
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                             (uint32_t)__cvta_generic_to_shared(dst)),
                         "l"(src));
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    /* the values: bf16 on tensor cores (P, the query heads x 16 rows, times V, 16 rows x 8
     * channels: vacc[t] holds head gid's channels 8 t + 2 tig, + 1), float32 a row at a time
     * (acc[g][i]: head g's channel lane + 32 i) */
    constexpr bool VT = MV && sizeof(T) == 2;
    constexpr int NT = VT ? 4 * NL : 1;
    const int gid = lane >> 2, tig = lane & 3;
    float m[DR_GT], l[DR_GT], acc[DR_GT][NL], vacc[NT][2];
#pragma unroll
    for (int g = 0; g < DR_GT; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < NL; i++) {
            acc[g][i] = 0.0f;
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        vacc[t][0] = 0.0f;
        vacc[t][1] = 0.0f;
    }
    if (n_st > 0) {
        load_stage(0);
    }
    for (int st = 0; st < n_st; st++) {
        if (st + 1 < n_st) {
            load_stage(st + 1);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        const int buf = st & 1;
        const int cnt = o_end - (o_begin + st * sb) < sb ? o_end - (o_begin + st * sb) : sb;
        int total = 0;
        for (int k = 0; k < cnt; k++) {
            total += st_blk[buf][k].rows;
        }
        for (int r0 = warp * 32; r0 < total; r0 += DR_WARPS * 32) {
            /* this lane's row: staged block kk, row in */
            int rr = r0 + lane, kk = 0;
            const bool valid = rr < total;
            while (kk + 1 < cnt && rr >= st_blk[buf][kk].rows) {
                rr -= st_blk[buf][kk].rows;
                kk++;
            }
            const int sg = st_blk[buf][kk].seg, in = valid ? rr : 0;
            const T *im = img0 + (int64_t)(buf * sb + kk) * img;
            float s[DR_GT], vsc = 0.0f;
#pragma unroll
            for (int g = 0; g < DR_GT; g++) {
                s[g] = 0.0f;
            }
            if constexpr (R::rebuilds) { /* every lane takes part (tensor cores) */
                rows.template scores<NL>(en, sg, im, in, valid, qs, s);
            }
            if (valid) {
                if constexpr (!R::rebuilds) {
                    for (int c = 0; c < kw; c++) {
                        const float kv = rows.key(en, sg, im, in, c);
#pragma unroll
                        for (int g = 0; g < DR_GT; g++) {
                            s[g] += qs[g][c] * kv;
                        }
                    }
                }
                const float ksc = rows.kscale(en, sg, im, in) * scale;
                vsc = rows.vscale(en, sg, im, in);
#pragma unroll
                for (int g = 0; g < DR_GT; g++) {
                    s[g] *= ksc;
                    if (scores && g < gc) {
                        scores[(e * group + g0 + g) * maxn + st_blk[buf][kk].tbase + in] = s[g];
                    }
                }
            }
            float p[DR_GT], ag = 0.0f;
#pragma unroll
            for (int g = 0; g < DR_GT; g++) {
                const float cm = uck_warp_max(valid ? s[g] : -INFINITY);
                const float mn = fmaxf(m[g], cm);
                const float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - mn);
                p[g] = valid ? expf(s[g] - mn) : 0.0f;
                l[g] = l[g] * alpha + p[g];
#pragma unroll
                for (int i = 0; i < NL; i++) {
                    acc[g][i] *= alpha;
                }
                ag = g == gid ? alpha : ag;
                m[g] = mn;
            }
            const int nv = total - r0 < 32 ? total - r0 : 32;
            if constexpr (VT) {
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    vacc[t][0] *= ag;
                    vacc[t][1] *= ag;
                }
                dr_values_mma<T, R, NT>(rows, en, p, vsc, kk, in, nv,
                                        img0 + (int64_t)buf * sb * img, img, st_blk[buf], d,
                                        vacc);
            } else {
                for (int jj = 0; jj < nv; jj++) {
                    const int kj = __shfl_sync(0xffffffffu, kk, jj);
                    const int ij = __shfl_sync(0xffffffffu, in, jj);
                    const float vj = __shfl_sync(0xffffffffu, vsc, jj);
                    const T *imj = img0 + (int64_t)(buf * sb + kj) * img;
                    const int sj = st_blk[buf][kj].seg;
                    float v[NL];
#pragma unroll
                    for (int i = 0; i < NL; i++) {
                        const int c = lane + 32 * i;
                        v[i] = c < d ? rows.val(en, sj, imj, ij, c) * vj : 0.0f;
                    }
#pragma unroll
                    for (int g = 0; g < DR_GT; g++) {
                        const float pj = __shfl_sync(0xffffffffu, p[g], jj);
#pragma unroll
                        for (int i = 0; i < NL; i++) {
                            acc[g][i] += pj * v[i];
                        }
                    }
                }
            }
        }
        __syncthreads(); /* the buffer is refilled by the stage after next */
    }
    /* the warps' partials into one per head (the value slices reuse the staging memory) */
    float *red_o = reinterpret_cast<float *>(dr_smem); /* (warp, head, D) */
#pragma unroll
    for (int g = 0; g < DR_GT; g++) {
        const float lw = uck_warp_sum(l[g]);
#pragma unroll
        for (int i = 0; i < NL; i++) {
            if (!VT && lane + 32 * i < d) {
                red_o[(warp * DR_GT + g) * d + lane + 32 * i] = acc[g][i];
            }
        }
        if (VT && g == gid) {
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const int c = 8 * t + 2 * tig;
                if (c < d) {
                    red_o[(warp * DR_GT + g) * d + c] = vacc[t][0];
                    red_o[(warp * DR_GT + g) * d + c + 1] = vacc[t][1];
                }
            }
        }
        if (lane == 0) {
            red_ml[warp][g][0] = m[g];
            red_ml[warp][g][1] = lw;
        }
    }
    __syncthreads();
    const int64_t base = (e * n_splits + split) * group + g0;
    for (int idx = tid; idx < gc * d; idx += DR_THREADS) {
        const int g = idx / d, c = idx - g * d;
        float mx = -INFINITY;
        for (int w = 0; w < DR_WARPS; w++) {
            mx = fmaxf(mx, red_ml[w][g][0]);
        }
        float o = 0.0f, sum = 0.0f;
        for (int w = 0; w < DR_WARPS; w++) {
            const float mw = red_ml[w][g][0];
            const float f = mw == -INFINITY ? 0.0f : expf(mw - mx);
            o += f * red_o[(w * DR_GT + g) * d + c];
            sum += f * red_ml[w][g][1];
        }
        part_o[(base + g) * d + c] = o;
        if (c == 0) {
            part_ml[(base + g) * 2] = mx;
            part_ml[(base + g) * 2 + 1] = sum;
        }
    }
}

/* One block per entry: O = sum_s f_s O_s / sum_s f_s l_s, f_s = exp(m_s - M), in shared memory
 * (group x D floats), then out through the reader (O itself for a plain layout); (M, L) per head
 * into fin_ml. */
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
    extern __shared__ float om[];
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
        om[idx] = sum > 0.0f ? o / sum : 0.0f;
        if (c == 0) {
            fin_ml[(e * group + g) * 2] = mx;
            fin_ml[(e * group + g) * 2 + 1] = sum;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * d; idx += DR_THREADS) {
        const int g = idx / d, c = idx - g * d;
        out[(b * n_kv * group + j * group + g) * d + c] =
            uck_from_f<T>(rows.out(en, j, om, g, c, d));
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
static void dr_decode(const R &rows, T *out, const T *q, int64_t ld_q, const T *pk, const T *pv,
                      int64_t bt, int64_t d, int64_t n_rows, int64_t n_heads, int64_t n_kv,
                      int splits, float *ws, float *psum, int64_t maxn, cudaStream_t stream)
{
    const int64_t entries = n_rows * n_kv, group = n_heads / n_kv;
    const size_t heads = (size_t)(n_rows * n_heads);
    float *part_o = ws, *part_ml = part_o + heads * splits * d;
    float *fin_ml = part_ml + heads * splits * 2;
    float *scores = psum ? fin_ml + heads * 2 : NULL;
    dim3 grid((unsigned)entries, (unsigned)splits, (unsigned)((group + DR_GT - 1) / DR_GT));
    /* two stages of up to DR_SB_MAX pool blocks in 2 x the reader's stage budget (the plain
     * layouts' 40 KiB, with the kernel's 4.3 KiB of static shared memory, are inside the 48 KiB
     * a launch gets without opting in); the warps' value slices reuse that memory at the end,
     * the reader's own follows */
    size_t img = (size_t)(2 * bt * d) * sizeof(T);
    int sb = (int)(R::stage_budget / img);
    sb = sb < 1 ? 1 : sb > DR_SB_MAX ? DR_SB_MAX : sb;
    size_t smem = dr_stage_bytes(sb, img, d) + R::smem_extra(d);
    /* the values on tensor cores in bf16 unless UC_DR_VALUES=lane (a row at a time per warp,
     * as in float32: the variant knob the device check compares) */
    static const char *vk = getenv("UC_DR_VALUES");
    const bool mv = !(vk && strcmp(vk, "lane") == 0);
    void (*kernel)(R, const T *, int64_t, const T *, const T *, int, int, int, int, float, int,
                   int, float *, float *, float *, int64_t) =
        mv ? (d <= 32    ? dr_split_kernel<T, R, 1, true>
              : d <= 64  ? dr_split_kernel<T, R, 2, true>
              : d <= 128 ? dr_split_kernel<T, R, 4, true>
                         : dr_split_kernel<T, R, 8, true>)
           : (d <= 32    ? dr_split_kernel<T, R, 1, false>
              : d <= 64  ? dr_split_kernel<T, R, 2, false>
              : d <= 128 ? dr_split_kernel<T, R, 4, false>
                         : dr_split_kernel<T, R, 8, false>);
    if (smem > 40 * 1024) {
        (void)cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)smem);
    }
    uck_launch(kernel, grid, dim3(DR_THREADS), smem, stream, rows, q, ld_q, pk, pv, (int)bt,
               (int)d, (int)n_kv, (int)group, 1.0f / sqrtf((float)d), splits, sb, part_o, part_ml,
               scores, maxn);
    uck_launch(dr_combine_kernel<T, R>, dim3((unsigned)entries), dim3(DR_THREADS),
               (size_t)(group * d) * sizeof(float), stream,
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
