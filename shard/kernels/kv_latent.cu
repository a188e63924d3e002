/* Latent heads (LoRC low-rank K/V; the layout is in backend.h, uc_kv_latent_width): each token
 * of such a head is one row of the token's position (an int32 in the row's first 4 bytes) then
 * r key latents of the key before RoPE, then r value latents, in the stream that a block's K
 * area followed by its V area forms. Scatter at the end of prefill (the prompt's keys are
 * rotated: each is rotated back at its position first), the decode append (from the step's keys
 * before RoPE), and the decode attention of the latent entries: one CUDA block per (row, KV
 * head), its query heads in turn; a token's score is q . RoPE_pos(U_k z_k), computed as
 * (R_pos^T q) . (U_k z_k), then the probabilities weight the value latents and one product by
 * U_v gives the head's output. The tensor-core decode kernel sees these entries empty. */
#include "decode_rows.cuh"

#define LT_THREADS 128
#define LT_MAX_D 512 /* = UC_LATENT_MAX_D (backend.h): the largest head_dim latent heads take */

/* Tokens per block of a head with latent rows of w elements. */
static __device__ __forceinline__ int64_t latent_tpb(int64_t bt, int64_t d, int64_t w)
{
    return 2 * bt * d / w;
}

/* Element i of latent slot `slot` (rows of w elements). */
template <typename T>
static __device__ __forceinline__ T *latent_at(T *pk, T *pv, int64_t bt, int64_t d, int64_t w,
                                               int64_t slot, int64_t i)
{
    int64_t per = bt * d, tpb = latent_tpb(bt, d, w);
    int64_t b = slot / tpb, at = (slot - b * tpb) * w + i;
    return at < per ? pk + b * per + at : pv + b * per + (at - per);
}

/* Elements the position takes (4 bytes). */
template <typename T>
static __device__ __forceinline__ int64_t pos_elems()
{
    return (int64_t)(4 / sizeof(T));
}

/* ---- scatter and append ----------------------------------------------------------------- */

/* One CUDA block per entry: the key (rotated by rot_pos when rot is set: rotated back first) and
 * the value head into shared memory, then the rank latents of each against the first rank rows
 * of the head's bases, and the position, into latent slot `slot`. */
template <typename T>
static __device__ void latent_write(T *pk, T *pv, int64_t bt, int64_t d, int64_t rank,
                                    int64_t slot, int32_t pos, const T *k, const T *v, bool rot,
                                    const float *cos_t, const float *sin_t, const T *bk,
                                    const T *bv, float *ks, float *vs)
{
    const int tid = threadIdx.x;
    const int64_t half = d / 2, w = pos_elems<T>() + 2 * rank;
    for (int64_t i = tid; i < half; i += blockDim.x) {
        float a = uck_to_f(k[i]), b = uck_to_f(k[i + half]);
        if (rot) {
            float c = cos_t[(int64_t)pos * half + i], s = sin_t[(int64_t)pos * half + i];
            ks[i] = a * c + b * s;
            ks[i + half] = b * c - a * s;
        } else {
            ks[i] = a;
            ks[i + half] = b;
        }
        vs[i] = uck_to_f(v[i]);
        vs[i + half] = uck_to_f(v[i + half]);
    }
    __syncthreads();
    for (int64_t i = tid; i < rank; i += blockDim.x) {
        float zk = 0.0f, zv = 0.0f;
        for (int64_t c = 0; c < d; c++) {
            zk += uck_to_f(bk[i * d + c]) * ks[c];
            zv += uck_to_f(bv[i * d + c]) * vs[c];
        }
        *latent_at(pk, pv, bt, d, w, slot, pos_elems<T>() + i) = uck_from_f<T>(zk);
        *latent_at(pk, pv, bt, d, w, slot, pos_elems<T>() + rank + i) = uck_from_f<T>(zv);
    }
    if (tid == 0) { /* the row start is 4-byte aligned: rows and areas have even element counts
                       in bf16 */
        *(int32_t *)latent_at(pk, pv, bt, d, w, slot, 0) = pos;
    }
    __syncthreads(); /* ks and vs are rewritten by the next entry */
}

template <typename T>
static __global__ void __launch_bounds__(LT_THREADS)
    scatter_kernel(T *pk, T *pv, const T *ksrc, const T *vsrc, int64_t ld,
                   const int32_t *src_row, const int32_t *src_head, const int32_t *pos,
                   const int32_t *slot, int64_t n, int64_t rank, const T *basis,
                   const float *cos_t, const float *sin_t, int64_t bt, int64_t d)
{
    __shared__ float ks[LT_MAX_D], vs[LT_MAX_D];
    for (int64_t e = blockIdx.x; e < n; e += gridDim.x) {
        int64_t off = (int64_t)src_row[e] * ld + (int64_t)src_head[e] * d;
        const T *bk = basis + (int64_t)src_head[e] * 2 * d * d;
        latent_write(pk, pv, bt, d, rank, slot[e], pos[e], ksrc + off, vsrc + off, true, cos_t,
                     sin_t, bk, bk + d * d, ks, vs);
    }
}

template <typename T>
static void launch_scatter(void *pk, void *pv, const void *ks, const void *vs, int64_t ld,
                           const int32_t *src_row, const int32_t *src_head, const int32_t *pos,
                           const int32_t *slot, int64_t n, int64_t rank, const void *basis,
                           const float *cos_t, const float *sin_t, int64_t bt, int64_t d,
                           cudaStream_t stream)
{
    unsigned grid = (unsigned)(n < 65535 ? n : 65535);
    scatter_kernel<T><<<grid, LT_THREADS, 0, stream>>>(
        (T *)pk, (T *)pv, (const T *)ks, (const T *)vs, ld, src_row, src_head, pos, slot, n,
        rank, (const T *)basis, cos_t, sin_t, bt, d);
}

extern "C" cudaError_t uc_cuda_kv_scatter_latent(void *pool_k, void *pool_v, const void *k_src,
                                                 const void *v_src, int64_t ld,
                                                 const int32_t *src_row, const int32_t *src_head,
                                                 const int32_t *pos, const int32_t *slot,
                                                 int64_t n, int64_t rank, const void *basis,
                                                 const float *cos_t, const float *sin_t,
                                                 int64_t block_tokens, int64_t head_dim,
                                                 enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (head_dim > LT_MAX_D || head_dim % 2 || rank < 1 || rank > head_dim) {
        return cudaErrorInvalidValue;
    }
    if (n > 0) {
        UCK_DISPATCH(dt, launch_scatter, pool_k, pool_v, k_src, v_src, ld, src_row, src_head,
                     pos, slot, n, rank, basis, cos_t, sin_t, block_tokens, head_dim, stream);
    }
    return cudaGetLastError();
}

/* One CUDA block per entry e = t * Hkv + j; nothing where rank[e] <= 0. The keys of qkv are not
 * rotated yet (this runs before rope_append). */
template <typename T>
static __global__ void __launch_bounds__(LT_THREADS)
    append_kernel(T *pk, T *pv, const T *x, int64_t ld, int n_heads, int n_kv,
                  const int32_t *pos, const int32_t *slot, const int32_t *rank, const T *basis,
                  int64_t bt, int64_t d)
{
    __shared__ float ks[LT_MAX_D], vs[LT_MAX_D];
    uck_launch_dependents();
    uck_grid_wait();
    const int64_t e = blockIdx.x;
    const int64_t r = rank[e];
    if (r <= 0) {
        return;
    }
    int64_t t = e / n_kv, j = e - t * n_kv;
    const T *k = x + t * ld + (int64_t)(n_heads + j) * d;
    const T *bk = basis + j * 2 * d * d;
    latent_write(pk, pv, bt, d, r, -(int64_t)slot[e] - 1, pos[t], k, k + (int64_t)n_kv * d,
                 false, (const float *)NULL, (const float *)NULL, bk, bk + d * d, ks, vs);
}

template <typename T>
static void launch_append(void *pk, void *pv, const void *qkv, int64_t ld, int64_t n_heads,
                          int64_t n_kv, const int32_t *pos, const int32_t *slot,
                          const int32_t *rank, const void *basis, int64_t n_tok, int64_t bt,
                          int64_t d, cudaStream_t stream)
{
    uck_launch(append_kernel<T>, dim3((unsigned)(n_tok * n_kv)), dim3(LT_THREADS), 0, stream,
               (T *)pk, (T *)pv, (const T *)qkv, ld, (int)n_heads, (int)n_kv, pos, slot, rank,
               (const T *)basis, bt, d);
}

extern "C" cudaError_t uc_cuda_kv_append_latent(void *pool_k, void *pool_v, const void *qkv,
                                                int64_t ld, int64_t n_heads, int64_t n_heads_kv,
                                                const int32_t *pos, const int32_t *slot,
                                                const int32_t *rank, const void *basis,
                                                int64_t n_tok, int64_t block_tokens,
                                                int64_t head_dim, enum uc_cuda_dtype dt,
                                                cudaStream_t stream)
{
    if (head_dim > LT_MAX_D || head_dim % 2 || n_tok * n_heads_kv > 0x7fffffffLL) {
        return cudaErrorInvalidValue;
    }
    if (n_tok > 0) {
        UCK_DISPATCH(dt, launch_append, pool_k, pool_v, qkv, ld, n_heads, n_heads_kv, pos, slot,
                     rank, basis, n_tok, block_tokens, head_dim, stream);
    }
    return cudaGetLastError();
}

/* ---- decode attention of latent entries ---------------------------------------------------- */

/* Block-wide max or sum of v over LT_THREADS threads (red: LT_THREADS / 32 floats). */
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
    for (int i = 1; i < LT_THREADS / 32; i++) {
        r = is_max ? fmaxf(r, red[i]) : r + red[i];
    }
    return r;
}

/* Score of a latent row: q (shared, D floats, rotated) against the row's key rebuilt from its
 * latents and rotated at its position: sum over c < D/2 of the rotated pair's products. The
 * position is the row's first 4 bytes (never split: rows and areas have even element counts in
 * bf16). */
template <typename T>
static __device__ float latent_score(const float *qs, const dr_row<T> &row, int64_t d,
                                     int64_t rank, const T *bk, const float *cos_t,
                                     const float *sin_t)
{
    const int64_t half = d / 2, pe = pos_elems<T>();
    int32_t pos = *(const int32_t *)row.lo;
    const float *cs = cos_t + (int64_t)pos * half, *sn = sin_t + (int64_t)pos * half;
    float acc = 0.0f;
    for (int64_t c = 0; c < half; c++) {
        float a = 0.0f, b = 0.0f;
        for (int64_t i = 0; i < rank; i++) {
            float z = dr_get(row, pe + i);
            a += z * uck_to_f(bk[i * d + c]);
            b += z * uck_to_f(bk[i * d + c + half]);
        }
        acc += qs[c] * (a * cs[c] - b * sn[c]) + qs[c + half] * (b * cs[c] + a * sn[c]);
    }
    return acc;
}

/* One CUDA block per entry e (row b, KV head j); nothing where lat_rank[e] <= 0. For each query
 * head of the group in turn: the query into shared memory, the max score, then the
 * probabilities of LT_THREADS tokens at a time into shared memory and the value latents weighted
 * by them (thread i owns latents i, i + LT_THREADS), then the sum, and out = U_v zacc / sum. */
template <typename T>
static __global__ void __launch_bounds__(LT_THREADS)
    decode_kernel(T *out, const T *q, int64_t ld_q, const T *pk, const T *pv, int64_t bt,
                  int64_t d, const int32_t *n_tokens, const int32_t *offset,
                  const int32_t *blocks, const int32_t *lat_rank, const T *basis, int n_kv,
                  int group, float scale, const float *cos_t, const float *sin_t)
{
    __shared__ float qs[LT_MAX_D];
    __shared__ float zacc[LT_MAX_D];
    __shared__ float pr[LT_THREADS];
    __shared__ float red[LT_THREADS / 32];
    uck_launch_dependents();
    uck_grid_wait();
    const int64_t e = blockIdx.x;
    const int64_t rank = lat_rank[e];
    if (rank <= 0) {
        return;
    }
    const int tid = threadIdx.x;
    const int64_t b = e / n_kv, j = e - b * n_kv, nt = n_tokens[e];
    const int64_t w = pos_elems<T>() + 2 * rank, pe = pos_elems<T>();
    const int32_t *blk = blocks + offset[e];
    const int64_t tpb = latent_tpb(bt, d, w);
    const T *bk = basis + j * 2 * d * d, *bv = bk + d * d;
    for (int gh = 0; gh < group; gh++) {
        const int64_t h = j * group + gh;
        for (int64_t c = tid; c < d; c += LT_THREADS) {
            qs[c] = uck_to_f(q[b * ld_q + h * d + c]);
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int64_t t = tid; t < nt; t += LT_THREADS) {
            dr_row<T> row = dr_locate(pk, pv, bt, d, w, tpb,
                                              (int64_t)blk[t / tpb] * tpb + t % tpb);
            mx = fmaxf(mx, latent_score(qs, row, d, rank, bk, cos_t, sin_t) * scale);
        }
        mx = block_reduce(mx, red, true);
        float sum = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
        for (int64_t t0 = 0; t0 < nt; t0 += LT_THREADS) {
            int64_t t = t0 + tid;
            float p = 0.0f;
            if (t < nt) {
                dr_row<T> row = dr_locate(pk, pv, bt, d, w, tpb,
                                                  (int64_t)blk[t / tpb] * tpb + t % tpb);
                p = expf(latent_score(qs, row, d, rank, bk, cos_t, sin_t) * scale - mx);
            }
            sum += p;
            __syncthreads();
            pr[tid] = p;
            __syncthreads();
            int64_t m = nt - t0 < LT_THREADS ? nt - t0 : LT_THREADS;
            for (int64_t r = 0; r < m; r++) {
                int64_t tt = t0 + r;
                dr_row<T> row = dr_locate(pk, pv, bt, d, w, tpb,
                                                  (int64_t)blk[tt / tpb] * tpb + tt % tpb);
                if (tid < rank) {
                    acc0 += pr[r] * dr_get(row, pe + rank + tid);
                }
                if (tid + LT_THREADS < rank) {
                    acc1 += pr[r] * dr_get(row, pe + rank + tid + LT_THREADS);
                }
            }
        }
        sum = block_reduce(sum, red, false);
        float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        if (tid < rank) {
            zacc[tid] = acc0;
        }
        if (tid + LT_THREADS < rank) {
            zacc[tid + LT_THREADS] = acc1;
        }
        __syncthreads();
        T *o = out + b * (int64_t)n_kv * group * d + h * d;
        for (int64_t c = tid; c < d; c += LT_THREADS) {
            float v = 0.0f;
            for (int64_t i = 0; i < rank; i++) {
                v += zacc[i] * uck_to_f(bv[i * d + c]);
            }
            o[c] = uck_from_f<T>(v * inv);
        }
        __syncthreads(); /* qs and zacc are rewritten for the next head */
    }
}

template <typename T>
static void launch_decode(void *out, const void *q, int64_t ld_q, const void *pk, const void *pv,
                          int64_t bt, int64_t d, const int32_t *n_tokens, const int32_t *offset,
                          const int32_t *blocks, const int32_t *lat_rank, const void *basis,
                          int64_t n_rows, int64_t n_heads, int64_t n_kv, const float *cos_t,
                          const float *sin_t, cudaStream_t stream)
{
    uck_launch(decode_kernel<T>, dim3((unsigned)(n_rows * n_kv)), dim3(LT_THREADS), 0, stream,
               (T *)out, (const T *)q, ld_q, (const T *)pk, (const T *)pv, bt, d, n_tokens,
               offset, blocks, lat_rank, (const T *)basis, (int)n_kv, (int)(n_heads / n_kv),
               1.0f / sqrtf((float)d), cos_t, sin_t);
}

extern "C" cudaError_t uc_cuda_attn_decode_latent(void *out, const void *q, int64_t ld_q,
                                                  const void *pool_k, const void *pool_v,
                                                  int64_t block_tokens, int64_t head_dim,
                                                  const int32_t *n_tokens, const int32_t *offset,
                                                  const int32_t *blocks, const int32_t *lat_rank,
                                                  const void *basis, int64_t n_rows,
                                                  int64_t n_heads, int64_t n_heads_kv,
                                                  const float *cos_t, const float *sin_t,
                                                  enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (head_dim > LT_MAX_D || head_dim % 2 || n_rows * n_heads_kv > 0x7fffffffLL) {
        return cudaErrorInvalidValue;
    }
    if (n_rows > 0) {
        UCK_DISPATCH(dt, launch_decode, out, q, ld_q, pool_k, pool_v, block_tokens, head_dim,
                     n_tokens, offset, blocks, lat_rank, basis, n_rows, n_heads, n_heads_kv,
                     cos_t, sin_t, stream);
    }
    return cudaGetLastError();
}
