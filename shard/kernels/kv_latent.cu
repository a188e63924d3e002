/* Latent heads (LoRC low-rank K/V; the layout is in backend.h, uc_kv_latent_width): each token
 * of such a head is one row of the token's position (an int32 in the row's first 4 bytes) then
 * r key latents of the key before RoPE, then r value latents, in the stream that a block's K
 * area followed by its V area forms. Scatter at the end of prefill (the prompt's keys are
 * rotated: each is rotated back at its position first), the decode append (from the step's keys
 * before RoPE), and the decode attention of the latent entries: the split decode of
 * decode_rows.cuh over a reader that rebuilds each row's key from its latents, rotates it at the
 * row's position and scores it (q . RoPE_pos(U_k z_k)); the probabilities weigh the value
 * latents, and one product by U_v per head finishes. The tensor-core decode kernel sees these
 * entries empty. */
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

#define LT_DECODE_MAX_D 128 /* = UC_LATENT_CUDA_MAX_D (backend.h) */
#define LT_CH 16            /* float32: rotation pairs a lane rebuilds at a time */
#define LT_KC (LT_DECODE_MAX_D / 16) /* bf16: k-steps of 16 latents at most */

/* The latent entries' rows for dr_decode (decode_rows.cuh): the position, r key latents, r value
 * latents. The layer's key basis of the entry's KV head goes to shared memory once per CUDA
 * block. Scores: in bf16 the warp rebuilds its 32 rows' keys on tensor cores (two 16-row tiles:
 * Z (16 x r) times U^T (r x 8) per 8 channels, mma m16n8k16, the channels c and c + D/2 of a
 * RoPE pair landing in the same thread), rotates each at its row's position and scores it
 * against the block's query heads (the four threads of a row's quad summed); in float32 a lane
 * rebuilds its own row, LT_CH rotation pairs at a time, on CUDA cores. The values stay latent:
 * the chunk's probabilities weigh the value latents, and the combine kernel finishes each head
 * with the value basis (out = U_v^T zacc / L). */
template <typename T>
struct latent_rows : dr_reader_defaults {
    const T *basis; /* (Hkv_local, 2, D, D): key basis rows, then value basis rows */
    int64_t bt, d;
    const int32_t *n_tokens, *offset, *blocks, *lat_rank;
    const float *cos_t, *sin_t;
    int n_kv;

    static constexpr bool rebuilds = true;
    static constexpr bool mma = sizeof(T) == 2;
    static constexpr size_t stage_budget = 32 * 1024; /* latent rows are few per pool block */
    /* bf16: U^T (D x (D + 8)), channel-major, latents contiguous (padded against bank
     * conflicts); float32: U (D x D) */
    static size_t smem_extra(int64_t dd)
    {
        return mma ? (size_t)(dd * (dd + 8)) * sizeof(T) : (size_t)(dd * dd) * sizeof(float);
    }

    struct entry {
        const int32_t *blk;
        const void *u; /* the key basis in shared memory (smem_extra) */
        int64_t nt;
        int j, rank, w, tpb;
    };

    __device__ bool entry_of(int64_t e, entry &en) const
    {
        en.rank = lat_rank[e];
        if (en.rank <= 0) {
            return false;
        }
        en.blk = blocks + offset[e];
        en.nt = n_tokens[e];
        en.w = (int)(pos_elems<T>() + 2 * en.rank);
        en.tpb = (int)latent_tpb(bt, d, en.w);
        en.j = (int)(e % n_kv);
        en.u = NULL;
        return true;
    }
    __device__ void prepare(entry &en, float *sm, int tid) const
    {
        const T *bk = basis + (int64_t)en.j * 2 * d * d;
        const int dd = (int)d;
        if constexpr (mma) { /* latents past the rank (to the 16 a k-step takes) are zero */
            T *ut = reinterpret_cast<T *>(sm);
            const int kp = (en.rank + 15) / 16 * 16;
            for (int x = tid; x < kp * dd; x += DR_THREADS) {
                const int i = x / dd, c = x - i * dd;
                ut[c * (dd + 8) + i] = i < en.rank ? bk[x] : uck_from_f<T>(0.0f);
            }
        } else {
            for (int x = tid; x < en.rank * dd; x += DR_THREADS) {
                sm[x] = uck_to_f(bk[x]);
            }
        }
        en.u = sm;
    }
    __device__ int64_t count(const entry &en) const { return en.nt; }
    __device__ int segs(const entry &) const { return 1; }
    __device__ int seg_rows(const entry &en, int) const { return (int)en.nt; }
    __device__ int seg_tpb(const entry &en, int) const { return en.tpb; }
    __device__ const int32_t *seg_ids(const entry &en, int) const { return en.blk; }
    __device__ int64_t kwidth(const entry &) const { return d; }
    __device__ int64_t qchan(const entry &, int64_t c) const { return c; }
    __device__ float val(const entry &en, int, const T *img, int in, int c) const
    {
        return c < en.rank ? uck_to_f(img[in * en.w + (int)pos_elems<T>() + en.rank + c]) : 0.0f;
    }
    __device__ float kscale(const entry &, int, const T *, int) const { return 1.0f; }
    __device__ float vscale(const entry &, int, const T *, int) const { return 1.0f; }
    __device__ int vwidth(const entry &en, int) const { return en.rank; }

    template <int NL>
    __device__ void scores(const entry &en, int, const T *img, int in, bool valid,
                           const float (*qs)[DR_PER_LANE * 32], float *s) const
    {
        const T *row = img + in * en.w;
        if constexpr (mma) {
            scores_mma<NL>(en, row, qs, s);
        } else if (valid) {
            scores_lane(en, row, qs, s);
        }
    }

    /* bf16: the warp's 32 rows (row = this lane's, a stand-in where not valid); D <= 32 NL,
     * the channel tiles unrolled so that their loads and products overlap */
    template <int NL>
    __device__ void scores_mma(const entry &en, const T *row,
                               const float (*qs)[DR_PER_LANE * 32], float *s) const
    {
        const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
        const int half = (int)d / 2, ldu = (int)d + 8, kn = (en.rank + 15) / 16;
        const T *ut = reinterpret_cast<const T *>(en.u);
        const int pos = *reinterpret_cast<const int32_t *>(row); /* 4-byte aligned: even
                                                                    widths in bf16 */
        const unsigned long long rp = reinterpret_cast<unsigned long long>(row);
#pragma unroll
        for (int t = 0; t < 2; t++) {
            /* A fragments: latents of rows gid and gid + 8 of tile t, zero past the rank */
            const T *r0 = reinterpret_cast<const T *>(__shfl_sync(0xffffffffu, rp, 16 * t + gid)) +
                          pos_elems<T>();
            const T *r1 = reinterpret_cast<const T *>(
                              __shfl_sync(0xffffffffu, rp, 16 * t + gid + 8)) +
                          pos_elems<T>();
            const int p0 = __shfl_sync(0xffffffffu, pos, 16 * t + gid);
            const int p1 = __shfl_sync(0xffffffffu, pos, 16 * t + gid + 8);
            uint32_t a[LT_KC][4];
#pragma unroll
            for (int kc = 0; kc < LT_KC; kc++) {
                const int i0 = kc * 16 + tig * 2;
                a[kc][0] = latent_pair(r0, i0, en.rank);
                a[kc][1] = latent_pair(r1, i0, en.rank);
                a[kc][2] = latent_pair(r0, i0 + 8, en.rank);
                a[kc][3] = latent_pair(r1, i0 + 8, en.rank);
            }
            float part[2][DR_GT];
#pragma unroll
            for (int g = 0; g < DR_GT; g++) {
                part[0][g] = 0.0f;
                part[1][g] = 0.0f;
            }
#pragma unroll
            for (int nt = 0; nt < 2 * NL; nt++) {
                if (nt >= half / 8) {
                    break;
                }
                float ca[4] = {0.0f, 0.0f, 0.0f, 0.0f}, cb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                const T *ua = ut + (nt * 8 + gid) * ldu + tig * 2, *ub = ua + half * ldu;
#pragma unroll
                for (int kc = 0; kc < LT_KC; kc++) {
                    if (kc < kn) {
                        mma_bf16(ca, a[kc], *reinterpret_cast<const uint32_t *>(ua + kc * 16),
                                 *reinterpret_cast<const uint32_t *>(ua + kc * 16 + 8));
                        mma_bf16(cb, a[kc], *reinterpret_cast<const uint32_t *>(ub + kc * 16),
                                 *reinterpret_cast<const uint32_t *>(ub + kc * 16 + 8));
                    }
                }
                /* this thread: channels c, c + 1 (and their pairs + D/2) of rows gid, gid + 8 */
                const int c = nt * 8 + tig * 2;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int64_t at = (int64_t)(h ? p1 : p0) * half + c;
                    const float2 co = *reinterpret_cast<const float2 *>(cos_t + at);
                    const float2 si = *reinterpret_cast<const float2 *>(sin_t + at);
                    const float a0 = ca[2 * h], a1 = ca[2 * h + 1];
                    const float b0 = cb[2 * h], b1 = cb[2 * h + 1];
                    const float ra0 = a0 * co.x - b0 * si.x, rb0 = b0 * co.x + a0 * si.x;
                    const float ra1 = a1 * co.y - b1 * si.y, rb1 = b1 * co.y + a1 * si.y;
#pragma unroll
                    for (int g = 0; g < DR_GT; g++) {
                        part[h][g] += qs[g][c] * ra0 + qs[g][c + 1] * ra1 +
                                      qs[g][c + half] * rb0 + qs[g][c + half + 1] * rb1;
                    }
                }
            }
            /* the quad's sums, then lane L (row L of the warp) takes its row's from tile t */
            const int rr = lane & 15, src = 4 * (rr & 7);
#pragma unroll
            for (int g = 0; g < DR_GT; g++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    part[h][g] += __shfl_xor_sync(0xffffffffu, part[h][g], 1);
                    part[h][g] += __shfl_xor_sync(0xffffffffu, part[h][g], 2);
                }
                const float v0 = __shfl_sync(0xffffffffu, part[0][g], src);
                const float v1 = __shfl_sync(0xffffffffu, part[1][g], src);
                if ((lane >> 4) == t) {
                    s[g] = rr < 8 ? v0 : v1;
                }
            }
        }
    }

    /* Latents i and i + 1 of a row as a bf16 pair (4-byte aligned: even offsets), zero past r. */
    static __device__ __forceinline__ uint32_t latent_pair(const T *z, int i, int r)
    {
        if (i >= r) {
            return 0u;
        }
        const uint32_t v = *reinterpret_cast<const uint32_t *>(z + i);
        return i + 1 < r ? v : (v & 0xffffu);
    }

    /* float32: this lane's row on CUDA cores */
    __device__ void scores_lane(const entry &en, const T *row,
                                const float (*qs)[DR_PER_LANE * 32], float *s) const
    {
        const int pos = *reinterpret_cast<const int32_t *>(row);
        const T *z = row + pos_elems<T>();
        const int half = (int)d / 2;
        const float *uk = reinterpret_cast<const float *>(en.u);
        const float *cs = cos_t + (int64_t)pos * half, *sn = sin_t + (int64_t)pos * half;
        for (int c0 = 0; c0 < half; c0 += LT_CH) {
            float a[LT_CH], b[LT_CH];
#pragma unroll
            for (int k = 0; k < LT_CH; k++) {
                a[k] = 0.0f;
                b[k] = 0.0f;
            }
            for (int i = 0; i < en.rank; i++) {
                const float zi = uck_to_f(z[i]);
                const float4 *ua = reinterpret_cast<const float4 *>(uk + i * (int)d + c0);
                const float4 *ub = reinterpret_cast<const float4 *>(uk + i * (int)d + half + c0);
#pragma unroll
                for (int k = 0; k < LT_CH / 4; k++) {
                    const float4 x = ua[k], y = ub[k];
                    a[4 * k] += zi * x.x;
                    a[4 * k + 1] += zi * x.y;
                    a[4 * k + 2] += zi * x.z;
                    a[4 * k + 3] += zi * x.w;
                    b[4 * k] += zi * y.x;
                    b[4 * k + 1] += zi * y.y;
                    b[4 * k + 2] += zi * y.z;
                    b[4 * k + 3] += zi * y.w;
                }
            }
#pragma unroll
            for (int k = 0; k < LT_CH; k++) {
                const int c = c0 + k;
                const float co = cs[c], si = sn[c];
                const float ra = a[k] * co - b[k] * si, rb = b[k] * co + a[k] * si;
#pragma unroll
                for (int g = 0; g < DR_GT; g++) {
                    s[g] += qs[g][c] * ra + qs[g][c + half] * rb;
                }
            }
        }
    }
    __device__ float out(const entry &en, int64_t j, const float *om, int g, int c, int dd) const
    {
        const T *bv = basis + j * 2 * d * d + d * d;
        float v = 0.0f;
        for (int i = 0; i < en.rank; i++) {
            v += om[g * dd + i] * uck_to_f(bv[(int64_t)i * d + c]);
        }
        return v;
    }
};

template <typename T>
static void launch_decode(void *out, const void *q, int64_t ld_q, const void *pk, const void *pv,
                          int64_t bt, int64_t d, const int32_t *n_tokens, const int32_t *offset,
                          const int32_t *blocks, const int32_t *lat_rank, const void *basis,
                          int64_t n_rows, int64_t n_heads, int64_t n_kv, const float *cos_t,
                          const float *sin_t, int splits, float *ws, cudaStream_t stream)
{
    latent_rows<T> rows = {{},     (const T *)basis, bt,    d,     n_tokens, offset,
                           blocks, lat_rank,         cos_t, sin_t, (int)n_kv};
    dr_decode<T>(rows, (T *)out, (const T *)q, ld_q, (const T *)pk, (const T *)pv, bt, d, n_rows,
                 n_heads, n_kv, splits, ws, (float *)NULL, 0, stream);
}

extern "C" cudaError_t uc_cuda_attn_decode_latent(void *out, const void *q, int64_t ld_q,
                                                  const void *pool_k, const void *pool_v,
                                                  int64_t block_tokens, int64_t head_dim,
                                                  const int32_t *n_tokens, const int32_t *offset,
                                                  const int32_t *blocks, const int32_t *lat_rank,
                                                  const void *basis, int64_t n_rows,
                                                  int64_t n_heads, int64_t n_heads_kv,
                                                  const float *cos_t, const float *sin_t,
                                                  int splits, float *ws, enum uc_cuda_dtype dt,
                                                  cudaStream_t stream)
{
    if (head_dim > LT_DECODE_MAX_D || head_dim % (2 * LT_CH) || splits < 1 ||
        n_rows * n_heads_kv > 0x7fffffffLL || block_tokens * head_dim % 8 != 0) {
        return cudaErrorInvalidValue;
    }
    if (n_rows > 0) {
        UCK_DISPATCH(dt, launch_decode, out, q, ld_q, pool_k, pool_v, block_tokens, head_dim,
                     n_tokens, offset, blocks, lat_rank, basis, n_rows, n_heads, n_heads_kv,
                     cos_t, sin_t, splits, ws, stream);
    }
    return cudaGetLastError();
}
