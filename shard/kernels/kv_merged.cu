/* Merged rows (MiniCache cross-layer merging; the layout is in backend.h): a layer pair's
 * common tokens held once, each as one row of 2 D + 4 values (key direction, value direction,
 * key magnitudes of layers a and b, value magnitudes of a and b) in the stream that a block's
 * K area followed by its V area forms. The prefill merge (angular distances, then the SLERP
 * rows) and the decode attention of the entries that read merged rows beside their own tokens
 * (a plain kernel: one CUDA block per (row, KV head), its query heads in turn, two passes; the
 * tensor-core decode kernel sees these entries empty). */
#include "common.cuh"

#define MC_THREADS 128
#define MC_EXTRA 4

/* Merged rows per block. */
static __device__ __forceinline__ int64_t merged_tpb(int64_t bt, int64_t d)
{
    return 2 * bt * d / (2 * d + MC_EXTRA);
}

/* Element i of merged row `slot`. */
template <typename T>
static __device__ __forceinline__ T *merged_at(T *pk, T *pv, int64_t bt, int64_t d, int64_t slot,
                                               int64_t i)
{
    int64_t per = bt * d, tpb = merged_tpb(bt, d);
    int64_t b = slot / tpb, at = (slot - b * tpb) * (2 * d + MC_EXTRA) + i;
    return at < per ? pk + b * per + at : pv + b * per + (at - per);
}

/* Warp-wide double sum. */
static __device__ __forceinline__ double warp_sum(double v)
{
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

/* ---- prefill: distances and merged rows ------------------------------------------------- */

/* One warp per token e (8 per block): dist[2e] / dist[2e+1] = angular distance of layer a's
 * cached K / V row at slot a_slot[e] and layer b's row src_row[e], head `head`. */
template <typename T>
static __global__ void dist_kernel(double *dist, const T *pk, const T *pv, const T *ks,
                                   const T *vs, int64_t ld, const int32_t *a_slot,
                                   const int32_t *src_row, int64_t head, int64_t n, int64_t d)
{
    int64_t e = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (e >= n) {
        return;
    }
    for (int which = 0; which < 2; which++) {
        const T *a = (which ? pv : pk) + (int64_t)a_slot[e] * d;
        const T *b = (which ? vs : ks) + (int64_t)src_row[e] * ld + head * d;
        double aa = 0.0, bb = 0.0, ab = 0.0;
        for (int64_t i = lane; i < d; i += 32) {
            double x = (double)uck_to_f(a[i]), y = (double)uck_to_f(b[i]);
            aa += x * x;
            bb += y * y;
            ab += x * y;
        }
        aa = warp_sum(aa);
        bb = warp_sum(bb);
        ab = warp_sum(ab);
        if (lane == 0) {
            double r = 0.0;
            if (aa > 0.0 && bb > 0.0) {
                double c = ab / (sqrt(aa) * sqrt(bb));
                c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
                r = acos(c) / 3.14159265358979323846;
            }
            dist[2 * e + which] = r;
        }
    }
}

template <typename T>
static void launch_dist(double *dist, const void *pk, const void *pv, const void *ks,
                        const void *vs, int64_t ld, const int32_t *a_slot, const int32_t *src_row,
                        int64_t head, int64_t n, int64_t d, cudaStream_t stream)
{
    dist_kernel<T><<<uck_blocks(n, 8), 256, 0, stream>>>(dist, (const T *)pk, (const T *)pv,
                                                          (const T *)ks, (const T *)vs, ld,
                                                          a_slot, src_row, head, n, d);
}

extern "C" cudaError_t uc_cuda_kv_merge_dist(double *dist, const void *pool_k, const void *pool_v,
                                             const void *k_src, const void *v_src, int64_t ld,
                                             const int32_t *a_slot, const int32_t *src_row,
                                             int64_t head, int64_t n, int64_t head_dim,
                                             enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n > 0) {
        UCK_DISPATCH(dt, launch_dist, dist, pool_k, pool_v, k_src, v_src, ld, a_slot, src_row,
                     head, n, head_dim, stream);
    }
    return cudaGetLastError();
}

/* One warp per token e: merged row m_slot[e] = the SLERP at t of the unit directions of layer
 * a's row (slot a_slot[e]) and layer b's row (src_row[e], head `head`), keys then values,
 * renormalised, and the four magnitudes (compress/minicache.c's arithmetic, in double). The
 * source rows are read before any merged row is written: merged heads never share blocks with
 * the layers' own heads. */
template <typename T>
static __global__ void write_kernel(T *pk, T *pv, const T *ks, const T *vs, int64_t ld,
                                    const int32_t *a_slot, const int32_t *src_row, int64_t head,
                                    const int32_t *m_slot, int64_t n, float t, int64_t bt,
                                    int64_t d)
{
    int64_t e = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (e >= n) {
        return;
    }
    for (int which = 0; which < 2; which++) {
        const T *a = (which ? pv : pk) + (int64_t)a_slot[e] * d;
        const T *b = (which ? vs : ks) + (int64_t)src_row[e] * ld + head * d;
        double aa = 0.0, bb = 0.0;
        for (int64_t i = lane; i < d; i += 32) {
            double x = (double)uck_to_f(a[i]), y = (double)uck_to_f(b[i]);
            aa += x * x;
            bb += y * y;
        }
        aa = sqrt(warp_sum(aa));
        bb = sqrt(warp_sum(bb));
        double ia = aa > 0.0 ? 1.0 / aa : 0.0, ib = bb > 0.0 ? 1.0 / bb : 0.0, dot = 0.0;
        for (int64_t i = lane; i < d; i += 32) {
            dot += (double)uck_to_f(a[i]) * ia * (double)uck_to_f(b[i]) * ib;
        }
        dot = warp_sum(dot);
        dot = dot > 1.0 ? 1.0 : (dot < -1.0 ? -1.0 : dot);
        double w = acos(dot), s = sin(w), ca, cb;
        if (w < 1e-6 || s < 1e-6) {
            ca = 1.0 - (double)t;
            cb = (double)t;
        } else {
            ca = sin((1.0 - (double)t) * w) / s;
            cb = sin((double)t * w) / s;
        }
        double nn = 0.0;
        for (int64_t i = lane; i < d; i += 32) {
            double v = ca * (double)uck_to_f(a[i]) * ia + cb * (double)uck_to_f(b[i]) * ib;
            nn += v * v;
        }
        nn = warp_sum(nn);
        double inv = nn > 0.0 ? 1.0 / sqrt(nn) : 0.0;
        for (int64_t i = lane; i < d; i += 32) {
            double v = ca * (double)uck_to_f(a[i]) * ia + cb * (double)uck_to_f(b[i]) * ib;
            *merged_at(pk, pv, bt, d, m_slot[e], which * d + i) = uck_from_f<T>((float)(v * inv));
        }
        if (lane == 0) {
            *merged_at(pk, pv, bt, d, m_slot[e], 2 * d + 2 * which) = uck_from_f<T>((float)aa);
            *merged_at(pk, pv, bt, d, m_slot[e], 2 * d + 2 * which + 1) =
                uck_from_f<T>((float)bb);
        }
    }
}

template <typename T>
static void launch_write(void *pk, void *pv, const void *ks, const void *vs, int64_t ld,
                         const int32_t *a_slot, const int32_t *src_row, int64_t head,
                         const int32_t *m_slot, int64_t n, float t, int64_t bt, int64_t d,
                         cudaStream_t stream)
{
    write_kernel<T><<<uck_blocks(n, 8), 256, 0, stream>>>((T *)pk, (T *)pv, (const T *)ks,
                                                           (const T *)vs, ld, a_slot, src_row,
                                                           head, m_slot, n, t, bt, d);
}

extern "C" cudaError_t uc_cuda_kv_merge_write(void *pool_k, void *pool_v, const void *k_src,
                                              const void *v_src, int64_t ld,
                                              const int32_t *a_slot, const int32_t *src_row,
                                              int64_t head, const int32_t *m_slot, int64_t n,
                                              float t, int64_t block_tokens, int64_t head_dim,
                                              enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n > 0) {
        UCK_DISPATCH(dt, launch_write, pool_k, pool_v, k_src, v_src, ld, a_slot, src_row, head,
                     m_slot, n, t, block_tokens, head_dim, stream);
    }
    return cudaGetLastError();
}

/* ---- decode attention of merged entries ---------------------------------------------------- */

/* out[e] = mc_n[e] > 0 ? 0 : n_tokens[e] (out may be n_tokens): the tensor-core kernel's view,
 * merged entries empty. */
static __global__ void mask_kernel(int32_t *out, const int32_t *n_tokens, const int32_t *mc_n,
                                   int64_t n)
{
    uck_launch_dependents();
    uck_grid_wait();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        out[e] = mc_n[e] > 0 ? 0 : n_tokens[e];
    }
}

extern "C" cudaError_t uc_cuda_decode_mask_merged(int32_t *out, const int32_t *n_tokens,
                                                  const int32_t *mc_n, int64_t n,
                                                  cudaStream_t stream)
{
    if (n > 0) {
        uck_launch(mask_kernel, dim3(uck_blocks(n, 256)), dim3(256), 0, stream, out, n_tokens,
                   mc_n, n);
    }
    return cudaGetLastError();
}

/* Block-wide max or sum of v over MC_THREADS threads (red: MC_THREADS / 32 floats). */
static __device__ float block_reduce(float v, float *red, bool is_max)
{
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        red[threadIdx.x >> 5] = v;
    }
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < MC_THREADS / 32; i++) {
        r = is_max ? fmaxf(r, red[i]) : r + red[i];
    }
    return r;
}

/* Token t of entry e: its own (unpacked) token t < nt, else merged row t - nt. */
struct mc_entry {
    const int32_t *blk, *mblk;
    int64_t nt, mn, side;
};

template <typename T>
static __device__ __forceinline__ float mc_score(const float *qs, const T *pk, const T *pv,
                                                 int64_t bt, int64_t d, int64_t mtpb,
                                                 const mc_entry &en, int64_t t)
{
    float s = 0.0f;
    if (t < en.nt) {
        const T *k = pk + ((int64_t)en.blk[t / bt] * bt + t % bt) * d;
        for (int64_t i = 0; i < d; i++) {
            s += qs[i] * uck_to_f(k[i]);
        }
        return s;
    }
    int64_t r = t - en.nt, slot = (int64_t)en.mblk[r / mtpb] * mtpb + r % mtpb;
    for (int64_t i = 0; i < d; i++) {
        s += qs[i] * uck_to_f(*merged_at(pk, pv, bt, d, slot, i));
    }
    return s * uck_to_f(*merged_at(pk, pv, bt, d, slot, 2 * d + en.side));
}

/* Value channel c of token t, times its magnitude for a merged row. */
template <typename T>
static __device__ __forceinline__ float mc_value(const T *pk, const T *pv, int64_t bt, int64_t d,
                                                 int64_t mtpb, const mc_entry &en, int64_t t,
                                                 int64_t c)
{
    if (t < en.nt) {
        return uck_to_f(pv[((int64_t)en.blk[t / bt] * bt + t % bt) * d + c]);
    }
    int64_t r = t - en.nt, slot = (int64_t)en.mblk[r / mtpb] * mtpb + r % mtpb;
    return uck_to_f(*merged_at(pk, pv, bt, d, slot, d + c)) *
           uck_to_f(*merged_at(pk, pv, bt, d, slot, 2 * d + 2 + en.side));
}

/* One CUDA block per entry e (row b, KV head j); nothing for entries without merged rows. For
 * each query head of the group in turn: the query into shared memory, the max score over the
 * entry's own tokens then its merged rows, then the probabilities of MC_THREADS tokens at a
 * time into shared memory and the values weighted by them (each thread owns channels tid,
 * tid + MC_THREADS), then the sum; with psum the probabilities summed over the group's heads,
 * own tokens first, zeros past them. */
template <typename T>
static __global__ void __launch_bounds__(MC_THREADS)
    decode_kernel(T *out, const T *q, int64_t ld_q, const T *pk, const T *pv, int64_t bt,
                  int64_t d, const int32_t *n_tokens, const int32_t *offset,
                  const int32_t *blocks, const int32_t *mc_n, const int32_t *mc_off,
                  const int32_t *mc_side, int n_kv, int group, float scale, float *psum,
                  int64_t maxn)
{
    __shared__ float qs[2 * MC_THREADS];
    __shared__ float pr[MC_THREADS];
    __shared__ float red[MC_THREADS / 32];
    uck_launch_dependents();
    uck_grid_wait();
    const int64_t e = blockIdx.x;
    if (mc_n[e] <= 0) {
        return;
    }
    const int tid = threadIdx.x;
    const int64_t b = e / n_kv, j = e - b * n_kv;
    mc_entry en;
    en.blk = blocks + offset[e];
    en.mblk = blocks + mc_off[e];
    en.nt = n_tokens[e];
    en.mn = mc_n[e];
    en.side = mc_side[e];
    const int64_t all = en.nt + en.mn, mtpb = merged_tpb(bt, d);
    for (int gh = 0; gh < group; gh++) {
        const int64_t h = j * group + gh;
        for (int64_t c = tid; c < d; c += MC_THREADS) {
            qs[c] = uck_to_f(q[b * ld_q + h * d + c]);
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int64_t t = tid; t < all; t += MC_THREADS) {
            mx = fmaxf(mx, mc_score(qs, pk, pv, bt, d, mtpb, en, t) * scale);
        }
        mx = block_reduce(mx, red, true);
        float sum = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
        for (int64_t t0 = 0; t0 < all; t0 += MC_THREADS) {
            int64_t t = t0 + tid;
            float p = t < all ? expf(mc_score(qs, pk, pv, bt, d, mtpb, en, t) * scale - mx) : 0.0f;
            sum += p;
            __syncthreads();
            pr[tid] = p;
            __syncthreads();
            int64_t m = all - t0 < MC_THREADS ? all - t0 : MC_THREADS;
            for (int64_t r = 0; r < m; r++) {
                if (tid < d) {
                    acc0 += pr[r] * mc_value(pk, pv, bt, d, mtpb, en, t0 + r, tid);
                }
                if (tid + MC_THREADS < d) {
                    acc1 += pr[r] * mc_value(pk, pv, bt, d, mtpb, en, t0 + r, tid + MC_THREADS);
                }
            }
        }
        sum = block_reduce(sum, red, false);
        float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        T *o = out + b * (int64_t)n_kv * group * d + h * d;
        if (tid < d) {
            o[tid] = uck_from_f<T>(acc0 * inv);
        }
        if (tid + MC_THREADS < d) {
            o[tid + MC_THREADS] = uck_from_f<T>(acc1 * inv);
        }
        if (psum) {
            float *ps = psum + e * maxn;
            for (int64_t t = tid; t < maxn; t += MC_THREADS) {
                float p = t < all ? expf(mc_score(qs, pk, pv, bt, d, mtpb, en, t) * scale - mx) *
                                        inv
                                  : 0.0f;
                ps[t] = gh == 0 ? p : ps[t] + p;
            }
        }
        __syncthreads(); /* qs is rewritten for the next head */
    }
}

template <typename T>
static void launch_decode(void *out, const void *q, int64_t ld_q, const void *pk, const void *pv,
                          int64_t bt, int64_t d, const int32_t *n_tokens, const int32_t *offset,
                          const int32_t *blocks, const int32_t *mc_n, const int32_t *mc_off,
                          const int32_t *mc_side, int64_t n_rows, int64_t n_heads, int64_t n_kv,
                          float *psum, int64_t maxn, cudaStream_t stream)
{
    uck_launch(decode_kernel<T>, dim3((unsigned)(n_rows * n_kv)), dim3(MC_THREADS), 0, stream,
               (T *)out, (const T *)q, ld_q, (const T *)pk, (const T *)pv, bt, d, n_tokens,
               offset, blocks, mc_n, mc_off, mc_side, (int)n_kv, (int)(n_heads / n_kv),
               1.0f / sqrtf((float)d), psum, maxn);
}

extern "C" cudaError_t uc_cuda_attn_decode_merged(void *out, const void *q, int64_t ld_q,
                                                  const void *pool_k, const void *pool_v,
                                                  int64_t block_tokens, int64_t head_dim,
                                                  const int32_t *n_tokens, const int32_t *offset,
                                                  const int32_t *blocks, const int32_t *mc_n,
                                                  const int32_t *mc_off, const int32_t *mc_side,
                                                  int64_t n_rows, int64_t n_heads,
                                                  int64_t n_heads_kv, float *psum,
                                                  int64_t max_tokens, enum uc_cuda_dtype dt,
                                                  cudaStream_t stream)
{
    if (head_dim > 2 * MC_THREADS || n_rows * n_heads_kv > 0x7fffffffLL) {
        return cudaErrorInvalidValue;
    }
    if (n_rows > 0) {
        UCK_DISPATCH(dt, launch_decode, out, q, ld_q, pool_k, pool_v, block_tokens, head_dim,
                     n_tokens, offset, blocks, mc_n, mc_off, mc_side, n_rows, n_heads,
                     n_heads_kv, psum, max_tokens, stream);
    }
    return cudaGetLastError();
}
