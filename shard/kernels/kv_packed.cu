/* Packed heads (ThinK key channel pruning; the layout is in backend.h): each token of such a
 * head is one row of kdim kept key channels then D values, in the stream that a block's K area
 * followed by its V area forms. Scatter at the end of prefill, the decode append, the evict
 * move, the channel energies ThinK scores by, and the reader of the packed entries' rows for
 * their decode attention (decode_rows.cuh; the tensor-core decode kernel sees them empty). */
#include "decode_rows.cuh"

/* Tokens per block of a head keeping kd key channels. */
static __device__ __forceinline__ int64_t packed_tpb(int64_t bt, int64_t d, int64_t kd)
{
    return 2 * bt * d / (kd + d);
}

/* Element i of packed slot `slot`. */
template <typename T>
static __device__ __forceinline__ T *packed_at(T *pk, T *pv, int64_t bt, int64_t d, int64_t kd,
                                               int64_t slot, int64_t i)
{
    int64_t per = bt * d, tpb = packed_tpb(bt, d, kd);
    int64_t b = slot / tpb, at = (slot - b * tpb) * (kd + d) + i;
    return at < per ? pk + b * per + at : pv + b * per + (at - per);
}

/* ---- scatter, append, move ------------------------------------------------------------- */

template <typename T>
static __global__ void scatter_kernel(T *pk, T *pv, const T *ks, const T *vs, int64_t ld,
                                      const int32_t *src_row, const int32_t *src_head,
                                      const int32_t *slot, int64_t n, int64_t kd,
                                      const int32_t *chan, int64_t bt, int64_t d)
{
    int64_t w = kd + d, total = n * w;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t e = idx / w, i = idx - e * w;
        int64_t src = (int64_t)src_row[e] * ld + (int64_t)src_head[e] * d;
        T val = i < kd ? ks[src + chan[i]] : vs[src + i - kd];
        *packed_at(pk, pv, bt, d, kd, slot[e], i) = val;
    }
}

template <typename T>
static void launch_scatter(void *pk, void *pv, const void *ks, const void *vs, int64_t ld,
                           const int32_t *src_row, const int32_t *src_head, const int32_t *slot,
                           int64_t n, int64_t kd, const int32_t *chan, int64_t bt, int64_t d,
                           cudaStream_t stream)
{
    scatter_kernel<T><<<uck_blocks(n * (kd + d), 256), 256, 0, stream>>>(
        (T *)pk, (T *)pv, (const T *)ks, (const T *)vs, ld, src_row, src_head, slot, n, kd, chan,
        bt, d);
}

extern "C" cudaError_t uc_cuda_kv_scatter_packed(void *pool_k, void *pool_v, const void *k_src,
                                                 const void *v_src, int64_t ld,
                                                 const int32_t *src_row, const int32_t *src_head,
                                                 const int32_t *slot, int64_t n, int64_t kdim,
                                                 const int32_t *chan, int64_t block_tokens,
                                                 int64_t head_dim, enum uc_cuda_dtype dt,
                                                 cudaStream_t stream)
{
    if (n > 0) {
        UCK_DISPATCH(dt, launch_scatter, pool_k, pool_v, k_src, v_src, ld, src_row, src_head,
                     slot, n, kdim, chan, block_tokens, head_dim, stream);
    }
    return cudaGetLastError();
}

/* Items (entry, i < 2D): entry e = t * Hkv + j with kdim[e] > 0 writes element i < kdim + D of
 * its packed row from row t's rotated k head j (kept channels) and v head j. */
template <typename T>
static __global__ void append_kernel(T *pk, T *pv, const T *x, int64_t ld, int n_heads, int n_kv,
                                     const int32_t *slot, const int32_t *kdim,
                                     const int32_t *coff, const int32_t *chan, int64_t n_tok,
                                     int64_t bt, int64_t d)
{
    uck_launch_dependents();
    uck_grid_wait();
    int64_t total = n_tok * n_kv * 2 * d;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t e = idx / (2 * d), i = idx - e * 2 * d;
        int64_t kd = kdim[e];
        if (kd <= 0 || i >= kd + d) {
            continue;
        }
        int64_t t = e / n_kv, j = e - t * n_kv;
        const T *k = x + t * ld + (int64_t)(n_heads + j) * d;
        T val = i < kd ? k[chan[coff[e] + i]] : k[(int64_t)n_kv * d + i - kd];
        *packed_at(pk, pv, bt, d, kd, -(int64_t)slot[e] - 1, i) = val;
    }
}

template <typename T>
static void launch_append(void *pk, void *pv, const void *qkv, int64_t ld, int64_t n_heads,
                          int64_t n_kv, const int32_t *slot, const int32_t *kdim,
                          const int32_t *coff, const int32_t *chan, int64_t n_tok, int64_t bt,
                          int64_t d, cudaStream_t stream)
{
    uck_launch(append_kernel<T>, dim3(uck_blocks(n_tok * n_kv * 2 * d, 256)), dim3(256), 0,
               stream, (T *)pk, (T *)pv, (const T *)qkv, ld, (int)n_heads, (int)n_kv, slot, kdim,
               coff, chan, n_tok, bt, d);
}

extern "C" cudaError_t uc_cuda_kv_append_packed(void *pool_k, void *pool_v, const void *qkv,
                                                int64_t ld, int64_t n_heads, int64_t n_heads_kv,
                                                const int32_t *slot, const int32_t *kdim,
                                                const int32_t *coff, const int32_t *chan,
                                                int64_t n_tok, int64_t block_tokens,
                                                int64_t head_dim, enum uc_cuda_dtype dt,
                                                cudaStream_t stream)
{
    if (n_tok > 0) {
        UCK_DISPATCH(dt, launch_append, pool_k, pool_v, qkv, ld, n_heads, n_heads_kv, slot, kdim,
                     coff, chan, n_tok, block_tokens, head_dim, stream);
    }
    return cudaGetLastError();
}

template <typename T>
static __global__ void move_kernel(T *pk, T *pv, int64_t bt, int64_t d, int64_t kd, int64_t dst,
                                   int64_t src)
{
    for (int64_t i = threadIdx.x; i < kd + d; i += blockDim.x) {
        *packed_at(pk, pv, bt, d, kd, dst, i) = *packed_at(pk, pv, bt, d, kd, src, i);
    }
}

template <typename T>
static void launch_move(void *pk, void *pv, int64_t bt, int64_t d, int64_t kd, int64_t dst,
                        int64_t src, cudaStream_t stream)
{
    move_kernel<T><<<1, 256, 0, stream>>>((T *)pk, (T *)pv, bt, d, kd, dst, src);
}

extern "C" cudaError_t uc_cuda_kv_move_packed(void *pool_k, void *pool_v, int64_t block_tokens,
                                              int64_t head_dim, int64_t kdim, int32_t dst_slot,
                                              int32_t src_slot, enum uc_cuda_dtype dt,
                                              cudaStream_t stream)
{
    if (dst_slot != src_slot) {
        UCK_DISPATCH(dt, launch_move, pool_k, pool_v, block_tokens, head_dim, kdim,
                     (int64_t)dst_slot, (int64_t)src_slot, stream);
    }
    return cudaGetLastError();
}

/* ---- channel energies ------------------------------------------------------------------- */

/* out[c] = sum over the listed rows of x[row, c]^2 (doubles), one thread per column. */
template <typename T>
static __global__ void sumsq_kernel(double *out, const T *x, int64_t ld, const int32_t *rows,
                                    int64_t n_rows, int64_t width)
{
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < width;
         c += (int64_t)gridDim.x * blockDim.x) {
        double acc = 0.0;
        for (int64_t i = 0; i < n_rows; i++) {
            double v = (double)uck_to_f(x[(int64_t)rows[i] * ld + c]);
            acc += v * v;
        }
        out[c] = acc;
    }
}

template <typename T>
static void launch_sumsq(double *out, const void *x, int64_t ld, const int32_t *rows,
                         int64_t n_rows, int64_t width, cudaStream_t stream)
{
    sumsq_kernel<T><<<uck_blocks(width, 128), 128, 0, stream>>>(out, (const T *)x, ld, rows,
                                                                n_rows, width);
}

extern "C" cudaError_t uc_cuda_chan_sumsq(double *out, const void *x, int64_t ld,
                                          const int32_t *rows, int64_t n_rows, int64_t width,
                                          enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (width > 0) {
        UCK_DISPATCH(dt, launch_sumsq, out, x, ld, rows, n_rows, width, stream);
    }
    return cudaGetLastError();
}

/* ---- decode attention of packed entries ---------------------------------------------------- */

/* out[e] = kdim[e] > 0 ? 0 : n_tokens[e]: the tensor-core kernel's view, packed entries empty. */
static __global__ void mask_kernel(int32_t *out, const int32_t *n_tokens, const int32_t *kdim,
                                   int64_t n)
{
    uck_launch_dependents();
    uck_grid_wait();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        out[e] = kdim[e] > 0 ? 0 : n_tokens[e];
    }
}

extern "C" cudaError_t uc_cuda_decode_mask_packed(int32_t *out, const int32_t *n_tokens,
                                                  const int32_t *kdim, int64_t n,
                                                  cudaStream_t stream)
{
    if (n > 0) {
        uck_launch(mask_kernel, dim3(uck_blocks(n, 256)), dim3(256), 0, stream, out, n_tokens,
                   kdim, n);
    }
    return cudaGetLastError();
}

/* The packed entries' rows for dr_decode (decode_rows.cuh): kd kept key channels (the query's
 * channels chan[coff[e] + c]) then D values. */
template <typename T>
struct packed_rows : dr_reader_defaults {
    const T *pk, *pv;
    int64_t bt, d;
    const int32_t *n_tokens, *offset, *blocks, *kdim, *coff, *chan;

    struct entry {
        const int32_t *blk, *ch;
        int64_t nt;
        int kd, tpb;
    };

    __device__ bool entry_of(int64_t e, entry &en) const
    {
        en.kd = kdim[e];
        if (en.kd <= 0) {
            return false;
        }
        en.blk = blocks + offset[e];
        en.ch = chan + coff[e];
        en.nt = n_tokens[e];
        en.tpb = (int)packed_tpb(bt, d, en.kd);
        return true;
    }
    __device__ int64_t count(const entry &en) const { return en.nt; }
    __device__ int segs(const entry &) const { return 1; }
    __device__ int seg_rows(const entry &en, int) const { return (int)en.nt; }
    __device__ int seg_tpb(const entry &en, int) const { return en.tpb; }
    __device__ const int32_t *seg_ids(const entry &en, int) const { return en.blk; }
    __device__ int64_t kwidth(const entry &en) const { return en.kd; }
    __device__ int64_t qchan(const entry &en, int64_t c) const { return en.ch[c]; }
    __device__ float key(const entry &en, int, const T *img, int in, int c) const
    {
        return uck_to_f(img[in * (en.kd + (int)d) + c]);
    }
    __device__ float val(const entry &en, int, const T *img, int in, int c) const
    {
        return uck_to_f(img[in * (en.kd + (int)d) + en.kd + c]);
    }
    __device__ float kscale(const entry &, int, const T *, int) const { return 1.0f; }
    __device__ float vscale(const entry &, int, const T *, int) const { return 1.0f; }
};

template <typename T>
static void launch_decode(void *out, const void *q, int64_t ld_q, const void *pk, const void *pv,
                          int64_t bt, int64_t d, const int32_t *n_tokens, const int32_t *offset,
                          const int32_t *blocks, const int32_t *kdim, const int32_t *coff,
                          const int32_t *chan, int64_t n_rows, int64_t n_heads, int64_t n_kv,
                          int splits, float *ws, float *psum, int64_t maxn, cudaStream_t stream)
{
    packed_rows<T> rows = {{}, (const T *)pk, (const T *)pv, bt,   d,    n_tokens,
                           offset,        blocks,        kdim, coff, chan};
    dr_decode<T>(rows, (T *)out, (const T *)q, ld_q, (const T *)pk, (const T *)pv, bt, d, n_rows,
                 n_heads, n_kv, splits, ws, psum, maxn, stream);
}

extern "C" cudaError_t uc_cuda_attn_decode_packed(void *out, const void *q, int64_t ld_q,
                                                  const void *pool_k, const void *pool_v,
                                                  int64_t block_tokens, int64_t head_dim,
                                                  const int32_t *n_tokens, const int32_t *offset,
                                                  const int32_t *blocks, const int32_t *kdim,
                                                  const int32_t *coff, const int32_t *chan,
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
                     n_tokens, offset, blocks, kdim, coff, chan, n_rows, n_heads, n_heads_kv,
                     splits, ws, psum, max_tokens, stream);
    }
    return cudaGetLastError();
}
