/* Merged rows (MiniCache cross-layer merging; the layout is in backend.h): a layer pair's
 * common tokens held once, each as one row of 2 D + 4 values (key direction, value direction,
 * key magnitudes of layers a and b, value magnitudes of a and b) in the stream that a block's
 * K area followed by its V area forms. The prefill merge (angular distances, then the SLERP
 * rows) and the reader of the entries that read merged rows beside their own tokens, for their
 * decode attention (decode_rows.cuh; the tensor-core decode kernel sees them empty). */
#include "decode_rows.cuh"

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

/* The merged entries' tokens for dr_decode (decode_rows.cuh): token t < nt is the entry's own
 * row (plain K and V rows), token nt + r merged row r, whose key and value directions take the
 * magnitudes of the entry's layer (side 0: a, 1: b). */
template <typename T>
struct merged_rows : dr_reader_defaults {
    const T *pk, *pv;
    int64_t bt, d;
    const int32_t *n_tokens, *offset, *blocks, *mc_n, *mc_off, *mc_side;

    struct entry {
        const int32_t *blk, *mblk;
        int nt, mn, side, mtpb, bt;
    };

    __device__ bool entry_of(int64_t e, entry &en) const
    {
        en.mn = mc_n[e];
        if (en.mn <= 0) {
            return false;
        }
        en.blk = blocks + offset[e];
        en.mblk = blocks + mc_off[e];
        en.nt = n_tokens[e];
        en.side = mc_side[e];
        en.mtpb = (int)merged_tpb(bt, d);
        en.bt = (int)bt;
        return true;
    }
    __device__ int64_t count(const entry &en) const { return en.nt + en.mn; }
    __device__ int segs(const entry &) const { return 2; }
    __device__ int seg_rows(const entry &en, int s) const { return s ? en.mn : en.nt; }
    __device__ int seg_tpb(const entry &en, int s) const { return s ? en.mtpb : en.bt; }
    __device__ const int32_t *seg_ids(const entry &en, int s) const { return s ? en.mblk : en.blk; }
    __device__ int64_t kwidth(const entry &) const { return d; }
    __device__ int64_t qchan(const entry &, int64_t c) const { return c; }
    /* a staged block: own rows are plain (K area row in, V area row in), merged rows are
     * 2 D + MC_EXTRA elements from the block's start */
    __device__ float key(const entry &, int s, const T *img, int in, int c) const
    {
        return uck_to_f(img[in * (s ? 2 * (int)d + MC_EXTRA : (int)d) + c]);
    }
    __device__ float val(const entry &en, int s, const T *img, int in, int c) const
    {
        return uck_to_f(s ? img[in * (2 * (int)d + MC_EXTRA) + (int)d + c]
                          : img[(en.bt + in) * (int)d + c]);
    }
    __device__ float kscale(const entry &en, int s, const T *img, int in) const
    {
        return s ? uck_to_f(img[in * (2 * (int)d + MC_EXTRA) + 2 * (int)d + en.side]) : 1.0f;
    }
    __device__ float vscale(const entry &en, int s, const T *img, int in) const
    {
        return s ? uck_to_f(img[in * (2 * (int)d + MC_EXTRA) + 2 * (int)d + 2 + en.side]) : 1.0f;
    }
};

template <typename T>
static void launch_decode(void *out, const void *q, int64_t ld_q, const void *pk, const void *pv,
                          int64_t bt, int64_t d, const int32_t *n_tokens, const int32_t *offset,
                          const int32_t *blocks, const int32_t *mc_n, const int32_t *mc_off,
                          const int32_t *mc_side, int64_t n_rows, int64_t n_heads, int64_t n_kv,
                          int splits, float *ws, float *psum, int64_t maxn, cudaStream_t stream)
{
    merged_rows<T> rows = {{}, (const T *)pk, (const T *)pv, bt,   d,      n_tokens,
                           offset,        blocks,        mc_n, mc_off, mc_side};
    dr_decode<T>(rows, (T *)out, (const T *)q, ld_q, (const T *)pk, (const T *)pv, bt, d, n_rows,
                 n_heads, n_kv, splits, ws, psum, maxn, stream);
}

extern "C" cudaError_t uc_cuda_attn_decode_merged(void *out, const void *q, int64_t ld_q,
                                                  const void *pool_k, const void *pool_v,
                                                  int64_t block_tokens, int64_t head_dim,
                                                  const int32_t *n_tokens, const int32_t *offset,
                                                  const int32_t *blocks, const int32_t *mc_n,
                                                  const int32_t *mc_off, const int32_t *mc_side,
                                                  int64_t n_rows, int64_t n_heads,
                                                  int64_t n_heads_kv, int splits, float *ws,
                                                  float *psum, int64_t max_tokens,
                                                  enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (head_dim > 32 * DR_PER_LANE || n_rows * n_heads_kv > 0x7fffffffLL || splits < 1 ||
        block_tokens * head_dim % 8 != 0) {
        return cudaErrorInvalidValue;
    }
    if (n_rows > 0) {
        UCK_DISPATCH(dt, launch_decode, out, q, ld_q, pool_k, pool_v, block_tokens, head_dim,
                     n_tokens, offset, blocks, mc_n, mc_off, mc_side, n_rows, n_heads,
                     n_heads_kv, splits, ws, psum, max_tokens, stream);
    }
    return cudaGetLastError();
}
