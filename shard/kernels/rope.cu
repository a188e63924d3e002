/* rope: the cos/sin table (built on the device, in double as the CPU reference does, from the
 * float32 angle pos * inv_freq[i]) and the rotate-half rotation of q and k heads in place. */
#include "common.cuh"

static __global__ void rope_table_kernel(float *cos_t, float *sin_t, const float *inv_freq,
                                         int64_t half, int64_t max_pos)
{
    int64_t n = half * max_pos;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t p = i / half, f = i - p * half;
        float ang = __fmul_rn((float)p, inv_freq[f]);
        cos_t[i] = (float)cos((double)ang);
        sin_t[i] = (float)sin((double)ang);
    }
}

/* Rows on grid y (strided past 65535); on x, two adjacent rotation pairs (i, i + 1) of a head
 * per thread when D/2 is even, else one. */
template <typename T, int P>
static __global__ void rope_kernel(T *x, int64_t ld, int n_heads, int half, const int32_t *pos,
                                   int64_t n_tok, const float *cos_t, const float *sin_t)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x, per_head = half / P;
    if (idx >= n_heads * per_head) {
        return;
    }
    const int h = idx / per_head, i = (idx - h * per_head) * P;
    for (int64_t t = blockIdx.y; t < n_tok; t += gridDim.y) {
        T *v = x + t * ld + (int64_t)h * 2 * half;
        const int64_t tab = (int64_t)pos[t] * half + i;
#pragma unroll
        for (int k = 0; k < P; k++) {
            float c = cos_t[tab + k], s = sin_t[tab + k];
            float a = uck_to_f(v[i + k]), b = uck_to_f(v[i + k + half]);
            v[i + k] = uck_from_f<T>(a * c - b * s);
            v[i + k + half] = uck_from_f<T>(b * c + a * s);
        }
    }
}

/* P elements of a row, one 16-byte access. */
template <typename T, int P> struct alignas(16) rope_vec {
    T v[P];
};

/* The vector form of rope_kernel, where a head's halves are whole 16-byte vectors and the rows
 * 16-byte aligned (bf16 heads of 16 or more, float32 of 8 or more): a thread rotates P
 * adjacent pairs of one head of one token with 16-byte loads (the two halves, their cos and
 * sin), where rope_kernel made two-pair accesses of 4 or 8 bytes from grids of one token per
 * row; the arithmetic of each pair is the same. Items (token, head, vector) on a grid-stride
 * loop. */
template <typename T, int P>
static __global__ void rope_vec_kernel(T *x, int64_t ld, int n_heads, int half, const int32_t *pos,
                                       int n_items, const float *cos_t, const float *sin_t)
{
    const int per_head = half / P, per_tok = n_heads * per_head;
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n_items;
         idx += gridDim.x * blockDim.x) {
        const int t = idx / per_tok, r = idx - t * per_tok, h = r / per_head;
        const int i = (r - h * per_head) * P;
        T *v = x + (int64_t)t * ld + (int64_t)h * 2 * half;
        const int64_t tab = (int64_t)pos[t] * half + i;
        rope_vec<T, P> a = *reinterpret_cast<const rope_vec<T, P> *>(v + i);
        rope_vec<T, P> b = *reinterpret_cast<const rope_vec<T, P> *>(v + i + half);
        const rope_vec<float, P> c = *reinterpret_cast<const rope_vec<float, P> *>(cos_t + tab);
        const rope_vec<float, P> s = *reinterpret_cast<const rope_vec<float, P> *>(sin_t + tab);
        rope_vec<T, P> ra, rb;
#pragma unroll
        for (int k = 0; k < P; k++) {
            float fa = uck_to_f(a.v[k]), fb = uck_to_f(b.v[k]);
            ra.v[k] = uck_from_f<T>(fa * c.v[k] - fb * s.v[k]);
            rb.v[k] = uck_from_f<T>(fb * c.v[k] + fa * s.v[k]);
        }
        *reinterpret_cast<rope_vec<T, P> *>(v + i) = ra;
        *reinterpret_cast<rope_vec<T, P> *>(v + i + half) = rb;
    }
}

/* rope_append: items (t, h, i < D/2) over the q heads, the k heads (rotated, and written to
 * the pool slot as well) and the v heads (copied to the pool slot); a negative slot (a KVSharer
 * layer reading another layer's cache) is not written. */
template <typename T>
static __global__ void rope_append_kernel(T *x, int64_t ld, int n_heads, int n_kv, int head_dim,
                                          const int32_t *pos, const int32_t *slot, int64_t n_tok,
                                          const float *cos_t, const float *sin_t, T *pk, T *pv)
{
    uck_launch_dependents();
    uck_grid_wait();
    int64_t half = head_dim / 2, per_tok = (int64_t)(n_heads + 2 * n_kv) * half;
    int64_t n = n_tok * per_tok;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = idx / per_tok, r = idx - t * per_tok, h = r / half, i = r - h * half;
        T *v = x + t * ld + h * head_dim;
        if (h >= n_heads + n_kv) { /* a v head: copy (slot -1: a shared layer, no append) */
            int32_t sl = slot[t * n_kv + (h - n_heads - n_kv)];
            if (sl < 0) {
                continue;
            }
            T *dst = pv + (int64_t)sl * head_dim;
            dst[i] = v[i];
            dst[i + half] = v[i + half];
            continue;
        }
        int64_t tab = (int64_t)pos[t] * half + i;
        float c = cos_t[tab], s = sin_t[tab];
        float a = uck_to_f(v[i]), b = uck_to_f(v[i + half]);
        T ra = uck_from_f<T>(a * c - b * s), rb = uck_from_f<T>(b * c + a * s);
        v[i] = ra;
        v[i + half] = rb;
        if (h >= n_heads && slot[t * n_kv + (h - n_heads)] >= 0) {
            T *dst = pk + (int64_t)slot[t * n_kv + (h - n_heads)] * head_dim;
            dst[i] = ra;
            dst[i + half] = rb;
        }
    }
}

template <typename T>
static void launch_append(void *x, int64_t ld, int64_t n_heads, int64_t n_kv, int64_t head_dim,
                          const int32_t *pos, const int32_t *slot, int64_t n_tok,
                          const float *cos_t, const float *sin_t, void *pk, void *pv,
                          cudaStream_t stream)
{
    uck_launch(rope_append_kernel<T>, dim3(uck_blocks(n_tok * (n_heads + 2 * n_kv) * (head_dim / 2),
                                                      256)),
               dim3(256), 0, stream, x, ld, (int)n_heads, (int)n_kv, (int)head_dim, pos, slot,
               n_tok, cos_t, sin_t, pk, pv);
}

template <typename T>
static void launch(void *x, int64_t ld, int64_t n_heads, int64_t head_dim, const int32_t *pos,
                   int64_t n_tok, const float *cos_t, const float *sin_t, cudaStream_t stream)
{
    const int half = (int)(head_dim / 2), pairs = half % 2 == 0 ? 2 : 1;
    constexpr int P = 16 / (int)sizeof(T);
    const int64_t n_vec = n_tok * n_heads * (half / P);
    const bool aligned = uck_aligned16(x) && uck_aligned16(cos_t) && uck_aligned16(sin_t);
    if (half % P == 0 && ld % P == 0 && aligned && n_vec <= INT32_MAX / 2) { /* int indices */
        rope_vec_kernel<T, P><<<uck_blocks(n_vec, 256), 256, 0, stream>>>(
            (T *)x, ld, (int)n_heads, half, pos, (int)n_vec, cos_t, sin_t);
        return;
    }
    const int64_t items = n_heads * (half / pairs);
    dim3 grid((unsigned)((items + 255) / 256), (unsigned)(n_tok < 65535 ? n_tok : 65535));
    if (pairs == 2) {
        rope_kernel<T, 2><<<grid, 256, 0, stream>>>((T *)x, ld, (int)n_heads, half, pos, n_tok,
                                                     cos_t, sin_t);
    } else {
        rope_kernel<T, 1><<<grid, 256, 0, stream>>>((T *)x, ld, (int)n_heads, half, pos, n_tok,
                                                     cos_t, sin_t);
    }
}

extern "C" cudaError_t uc_cuda_rope_table(float *cos_t, float *sin_t, const float *inv_freq,
                                          int64_t half_dim, int64_t max_pos, cudaStream_t stream)
{
    if (half_dim > 0 && max_pos > 0) {
        rope_table_kernel<<<uck_blocks(half_dim * max_pos, 256), 256, 0, stream>>>(
            cos_t, sin_t, inv_freq, half_dim, max_pos);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t uc_cuda_rope(void *x, int64_t ld, int64_t n_heads, int64_t head_dim,
                                    const int32_t *pos, int64_t n_tok, const float *cos_t,
                                    const float *sin_t, enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_tok > 0 && n_heads > 0 && head_dim >= 2 && n_heads * head_dim <= INT32_MAX) {
        UCK_DISPATCH(dt, launch, x, ld, n_heads, head_dim, pos, n_tok, cos_t, sin_t, stream);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t uc_cuda_rope_append(void *qkv, int64_t ld, int64_t n_heads,
                                           int64_t n_heads_kv, int64_t head_dim,
                                           const int32_t *pos, const int32_t *slot, int64_t n_tok,
                                           const float *cos_t, const float *sin_t, void *pool_k,
                                           void *pool_v, enum uc_cuda_dtype dt,
                                           cudaStream_t stream)
{
    if (n_tok > 0 && head_dim >= 2) {
        UCK_DISPATCH(dt, launch_append, qkv, ld, n_heads, n_heads_kv, head_dim, pos, slot, n_tok,
                     cos_t, sin_t, pool_k, pool_v, stream);
    }
    return cudaGetLastError();
}
