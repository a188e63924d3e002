/* Packed heads (ThinK key channel pruning; the layout is in backend.h): each token of such a
 * head is one row of kdim kept key channels then D values, in the stream that a block's K area
 * followed by its V area forms. Scatter at the end of prefill, the decode append, the evict
 * move, the channel energies ThinK scores by, and the decode attention of the packed entries
 * (a plain kernel: one CUDA block per (row, KV head), its query heads in turn, two passes over
 * the tokens; the tensor-core decode kernel leaves these entries alone). */
#include "common.cuh"

#define PK_THREADS 128

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

/* A packed row, located once: element i is lo[i] for i < cut, else hi[off + i] (the V area's
 * part of a row that starts in the K area). */
template <typename T>
struct packed_row {
    const T *lo, *hi;
    int64_t cut, off;
};

template <typename T>
static __device__ __forceinline__ packed_row<T> packed_locate(const T *pk, const T *pv,
                                                              int64_t bt, int64_t d, int64_t kd,
                                                              int64_t tpb, int64_t slot)
{
    int64_t per = bt * d, b = slot / tpb, at = (slot - b * tpb) * (kd + d);
    packed_row<T> r;
    r.hi = pv + b * per;
    r.off = at - per;
    if (at < per) {
        r.lo = pk + b * per + at;
        r.cut = per - at;
    } else {
        r.lo = pv + b * per + (at - per);
        r.cut = kd + d;
    }
    return r;
}

template <typename T>
static __device__ __forceinline__ float packed_get(const packed_row<T> &r, int64_t i)
{
    return uck_to_f(i < r.cut ? r.lo[i] : r.hi[r.off + i]);
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

/* Block-wide max or sum of v over PK_THREADS threads (red: PK_THREADS / 32 floats). */
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
    for (int i = 1; i < PK_THREADS / 32; i++) {
        r = is_max ? fmaxf(r, red[i]) : r + red[i];
    }
    return r;
}

/* q . k over the kept channels (qk: the query's kept channels) of a packed row, in channel
 * order. */
template <typename T>
static __device__ __forceinline__ float packed_score(const float *qk, const packed_row<T> &row,
                                                     int64_t kd)
{
    float s = 0.0f;
    for (int64_t c = 0; c < kd; c++) {
        s += qk[c] * packed_get(row, c);
    }
    return s;
}

/* One CUDA block per entry e (row b, KV head j); nothing for unpacked entries. For each query
 * head of the group in turn: its kept channels into shared memory, the max score, then the
 * probabilities of PK_THREADS tokens at a time into shared memory and the V rows weighted by
 * them (each thread owns channels tid, tid + PK_THREADS), then the sum; with psum the
 * probabilities summed over the group's heads (in head order), zeros past n_tokens. */
template <typename T>
static __global__ void __launch_bounds__(PK_THREADS)
    decode_kernel(T *out, const T *q, int64_t ld_q, const T *pk, const T *pv, int64_t bt,
                  int64_t d, const int32_t *n_tokens, const int32_t *offset,
                  const int32_t *blocks, const int32_t *kdim, const int32_t *coff,
                  const int32_t *chan, int n_kv, int group, float scale, float *psum,
                  int64_t maxn)
{
    __shared__ float qk[256];
    __shared__ float pr[PK_THREADS];
    __shared__ float red[PK_THREADS / 32];
    uck_launch_dependents();
    uck_grid_wait();
    const int64_t e = blockIdx.x;
    const int64_t kd = kdim[e];
    if (kd <= 0) {
        return;
    }
    const int tid = threadIdx.x;
    const int64_t b = e / n_kv, j = e - b * n_kv, nt = n_tokens[e];
    const int32_t *ch = chan + coff[e], *blk = blocks + offset[e];
    const int64_t tpb = packed_tpb(bt, d, kd);
    for (int gh = 0; gh < group; gh++) {
        const int64_t h = j * group + gh;
        for (int64_t c = tid; c < kd; c += PK_THREADS) {
            qk[c] = uck_to_f(q[b * ld_q + h * d + ch[c]]);
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int64_t t = tid; t < nt; t += PK_THREADS) {
            packed_row<T> row = packed_locate(pk, pv, bt, d, kd, tpb,
                                              (int64_t)blk[t / tpb] * tpb + t % tpb);
            float s = packed_score(qk, row, kd);
            mx = fmaxf(mx, s * scale);
        }
        mx = block_reduce(mx, red, true);
        float sum = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
        for (int64_t t0 = 0; t0 < nt; t0 += PK_THREADS) {
            int64_t t = t0 + tid;
            float p = 0.0f;
            if (t < nt) {
                packed_row<T> row = packed_locate(pk, pv, bt, d, kd, tpb,
                                                  (int64_t)blk[t / tpb] * tpb + t % tpb);
                float s = packed_score(qk, row, kd);
                p = expf(s * scale - mx);
            }
            sum += p;
            __syncthreads();
            pr[tid] = p;
            __syncthreads();
            int64_t m = nt - t0 < PK_THREADS ? nt - t0 : PK_THREADS;
            for (int64_t r = 0; r < m; r++) {
                int64_t tt = t0 + r;
                packed_row<T> row = packed_locate(pk, pv, bt, d, kd, tpb,
                                                  (int64_t)blk[tt / tpb] * tpb + tt % tpb);
                if (tid < d) {
                    acc0 += pr[r] * packed_get(row, kd + tid);
                }
                if (tid + PK_THREADS < d) {
                    acc1 += pr[r] * packed_get(row, kd + tid + PK_THREADS);
                }
            }
        }
        sum = block_reduce(sum, red, false);
        float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        T *o = out + b * (int64_t)n_kv * group * d + h * d;
        if (tid < d) {
            o[tid] = uck_from_f<T>(acc0 * inv);
        }
        if (tid + PK_THREADS < d) {
            o[tid + PK_THREADS] = uck_from_f<T>(acc1 * inv);
        }
        if (psum) {
            float *ps = psum + e * maxn;
            for (int64_t t = tid; t < maxn; t += PK_THREADS) {
                float p = 0.0f;
                if (t < nt) {
                    packed_row<T> row = packed_locate(pk, pv, bt, d, kd, tpb,
                                                      (int64_t)blk[t / tpb] * tpb + t % tpb);
                    float s = packed_score(qk, row, kd);
                    p = expf(s * scale - mx) * inv;
                }
                ps[t] = gh == 0 ? p : ps[t] + p;
            }
        }
        __syncthreads(); /* qk is rewritten for the next head */
    }
}

template <typename T>
static void launch_decode(void *out, const void *q, int64_t ld_q, const void *pk, const void *pv,
                          int64_t bt, int64_t d, const int32_t *n_tokens, const int32_t *offset,
                          const int32_t *blocks, const int32_t *kdim, const int32_t *coff,
                          const int32_t *chan, int64_t n_rows, int64_t n_heads, int64_t n_kv,
                          float *psum, int64_t maxn, cudaStream_t stream)
{
    uck_launch(decode_kernel<T>, dim3((unsigned)(n_rows * n_kv)), dim3(PK_THREADS), 0, stream,
               (T *)out, (const T *)q, ld_q, (const T *)pk, (const T *)pv, bt, d, n_tokens,
               offset, blocks, kdim, coff, chan, (int)n_kv, (int)(n_heads / n_kv),
               1.0f / sqrtf((float)d), psum, maxn);
}

extern "C" cudaError_t uc_cuda_attn_decode_packed(void *out, const void *q, int64_t ld_q,
                                                  const void *pool_k, const void *pool_v,
                                                  int64_t block_tokens, int64_t head_dim,
                                                  const int32_t *n_tokens, const int32_t *offset,
                                                  const int32_t *blocks, const int32_t *kdim,
                                                  const int32_t *coff, const int32_t *chan,
                                                  int64_t n_rows, int64_t n_heads,
                                                  int64_t n_heads_kv, float *psum,
                                                  int64_t max_tokens, enum uc_cuda_dtype dt,
                                                  cudaStream_t stream)
{
    if (head_dim > 2 * PK_THREADS || n_rows * n_heads_kv > 0x7fffffffLL) {
        return cudaErrorInvalidValue;
    }
    if (n_rows > 0) {
        UCK_DISPATCH(dt, launch_decode, out, q, ld_q, pool_k, pool_v, block_tokens, head_dim,
                     n_tokens, offset, blocks, kdim, coff, chan, n_rows, n_heads, n_heads_kv,
                     psum, max_tokens, stream);
    }
    return cudaGetLastError();
}
