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
