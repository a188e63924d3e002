/* window_probs: softmax rows of the last W queries over all n keys (causal), as floats
 * (H, W, n) on the device. Pass 1 writes the scaled scores tile by tile (here on CUDA cores; the
 * bf16 backend forms them with one tensor-core product per KV head over the window rows that
 * window_pack lays out); pass 2, one block per row, takes the row max and exp-sum over the keys
 * at or before the row's diagonal, normalises in place and writes zeros past it. */
#include "attn_tile.cuh"

template <typename T>
static __global__ void __launch_bounds__(AT_THREADS)
    window_scores_kernel(float *out, const T *q, int64_t ld_q, const T *k, int64_t ld_kv,
                         int64_t w, int64_t n, int group, int d, float scale)
{
    __shared__ at_smem sm;
    const int h = blockIdx.z;
    const int64_t key0 = (int64_t)blockIdx.x * AT_KEYS, r0 = (int64_t)blockIdx.y * AT_ROWS;
    float acc[8];
    at_scores<T>(acc, sm, q + (int64_t)h * d, ld_q, r0, w, k + (int64_t)(h / group) * d, ld_kv,
                 key0, n, d);
    const int jj = threadIdx.x & (AT_KEYS - 1), rb = threadIdx.x / AT_KEYS;
    const int64_t key = key0 + jj;
    if (key >= n) {
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int64_t r = r0 + rb + 4 * i;
        if (r < w) {
            out[((int64_t)h * w + r) * n + key] = acc[i] * scale;
        }
    }
}

/* The same scores when a KV group's window rows fit one tile (group x W <= 32): the tile's rows
 * are (query head of the group, window row) pairs, so each K tile is loaded once for the whole
 * group and no tile row is idle. blockIdx.y is the KV head. */
template <typename T>
static __global__ void __launch_bounds__(AT_THREADS)
    window_scores_gqa_kernel(float *out, const T *q, int64_t ld_q, const T *k, int64_t ld_kv,
                             int w, int64_t n, int group, int d, float scale)
{
    __shared__ at_smem sm;
    const int kvh = blockIdx.y;
    const int64_t key0 = (int64_t)blockIdx.x * AT_KEYS;
    const int rows = group * w;
    float acc[8];
    at_scores_rows<T>(
        acc, sm,
        [=](int r) -> const T * {
            return r < rows ? q + (int64_t)(r % w) * ld_q + (int64_t)(kvh * group + r / w) * d
                            : nullptr;
        },
        k + (int64_t)kvh * d, ld_kv, key0, n, d);
    const int jj = threadIdx.x & (AT_KEYS - 1), rb = threadIdx.x / AT_KEYS;
    const int64_t key = key0 + jj;
    if (key >= n) {
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int t = rb + 4 * i;
        if (t < rows) {
            int h = kvh * group + t / w, r = t % w;
            out[((int64_t)h * w + r) * n + key] = acc[i] * scale;
        }
    }
}

/* Row (h, r) of out: the softmax over keys 0 .. n - w + r; the keys past it become zeros. */
static __global__ void window_softmax_kernel(float *out, int64_t w, int64_t n)
{
    __shared__ float red[32];
    float *row = out + (int64_t)blockIdx.x * n;
    const int64_t last = n - w + (int64_t)blockIdx.x % w;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j <= last; j += blockDim.x) {
        mx = fmaxf(mx, row[j]);
    }
    mx = uck_block_max(mx, red);
    float sum = 0.0f;
    for (int64_t j = threadIdx.x; j <= last; j += blockDim.x) {
        sum += expf(row[j] - mx);
    }
    sum = uck_block_sum(sum, red);
    float inv = 1.0f / sum;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        row[j] = j <= last ? expf(row[j] - mx) * inv : 0.0f;
    }
}

extern "C" cudaError_t uc_cuda_window_softmax(float *probs, int64_t n_win, int64_t n,
                                              int64_t n_heads, cudaStream_t stream)
{
    if (n_win <= 0 || n_win > n || n_heads <= 0) {
        return cudaErrorInvalidValue;
    }
    window_softmax_kernel<<<(unsigned)(n_heads * n_win), 256, 0, stream>>>(probs, n_win, n);
    return cudaGetLastError();
}

/* dst (H, W, D) = the window's query rows head by head (q_win (W, ld_q)). */
template <typename T>
static __global__ void window_pack_kernel(T *dst, const T *q, int64_t ld_q, int64_t w,
                                          int64_t n_heads, int64_t d)
{
    const int64_t total = n_heads * w * d;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = e % d, r = e / d % w, h = e / (d * w);
        dst[e] = q[r * ld_q + h * d + c];
    }
}

template <typename T>
static void pack(void *dst, const void *q, int64_t ld_q, int64_t w, int64_t n_heads, int64_t d,
                 cudaStream_t stream)
{
    window_pack_kernel<T><<<uck_blocks(n_heads * w * d, 256), 256, 0, stream>>>(
        static_cast<T *>(dst), static_cast<const T *>(q), ld_q, w, n_heads, d);
}

extern "C" cudaError_t uc_cuda_window_pack(void *dst, const void *q_win, int64_t ld_q,
                                           int64_t n_win, int64_t n_heads, int64_t head_dim,
                                           enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_win <= 0 || n_heads <= 0 || head_dim <= 0) {
        return cudaErrorInvalidValue;
    }
    UCK_DISPATCH(dt, pack, dst, q_win, ld_q, n_win, n_heads, head_dim, stream);
    return cudaGetLastError();
}

template <typename T>
static void launch(float *out, const void *q, int64_t ld_q, const void *k, int64_t ld_kv,
                   int64_t w, int64_t n, int64_t n_heads, int64_t n_heads_kv, int64_t d,
                   cudaStream_t stream)
{
    const int64_t group = n_heads / n_heads_kv;
    if (group * w <= AT_ROWS) {
        dim3 grid((unsigned)((n + AT_KEYS - 1) / AT_KEYS), (unsigned)n_heads_kv);
        window_scores_gqa_kernel<T><<<grid, AT_THREADS, 0, stream>>>(
            out, (const T *)q, ld_q, (const T *)k, ld_kv, (int)w, n, (int)group, (int)d,
            1.0f / sqrtf((float)d));
    } else {
        dim3 grid((unsigned)((n + AT_KEYS - 1) / AT_KEYS),
                  (unsigned)((w + AT_ROWS - 1) / AT_ROWS), (unsigned)n_heads);
        window_scores_kernel<T><<<grid, AT_THREADS, 0, stream>>>(
            out, (const T *)q, ld_q, (const T *)k, ld_kv, w, n, (int)group, (int)d,
            1.0f / sqrtf((float)d));
    }
    window_softmax_kernel<<<(unsigned)(n_heads * w), 256, 0, stream>>>(out, w, n);
}

/* col (Hkv, n) and row (n) from probs (H, W, n): one thread per key. */
static __global__ void window_reduce_kernel(float *col, float *row, const float *p, int64_t w,
                                            int64_t n, int n_heads, int group, int row_max)
{
    int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (j >= n) {
        return;
    }
    float rv = row_max ? -INFINITY : 0.0f;
    for (int kv = 0; kv < n_heads / group; kv++) {
        float c = 0.0f;
        for (int g = 0; g < group; g++) {
            const float *ph = p + (int64_t)(kv * group + g) * w * n + j;
            float hsum = 0.0f;
            for (int64_t r = 0; r < w; r++) {
                hsum += ph[r * n];
            }
            c += hsum;
            rv = row_max ? fmaxf(rv, hsum) : rv + hsum;
        }
        col[(int64_t)kv * n + j] = c;
    }
    if (row) {
        row[j] = rv;
    }
}

extern "C" cudaError_t uc_cuda_window_reduce(float *col, float *row, const float *probs,
                                             int64_t n_win, int64_t n, int64_t n_heads,
                                             int64_t n_heads_kv, bool row_max,
                                             cudaStream_t stream)
{
    if (n <= 0) {
        return cudaGetLastError();
    }
    window_reduce_kernel<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(
        col, row, probs, n_win, n, (int)n_heads, (int)(n_heads / n_heads_kv), row_max ? 1 : 0);
    return cudaGetLastError();
}

extern "C" cudaError_t uc_cuda_window_probs(float *out, const void *q_win, int64_t ld_q,
                                            const void *k, int64_t ld_kv, int64_t n_win,
                                            int64_t n, int64_t n_heads, int64_t n_heads_kv,
                                            int64_t head_dim, enum uc_cuda_dtype dt,
                                            cudaStream_t stream)
{
    if (n_win <= 0 || n <= 0) {
        return cudaGetLastError();
    }
    if (n_win > n || n_heads_kv <= 0 || n_heads % n_heads_kv != 0 || head_dim <= 0) {
        return cudaErrorInvalidValue;
    }
    UCK_DISPATCH(dt, launch, out, q_win, ld_q, k, ld_kv, n_win, n, n_heads, n_heads_kv, head_dim,
                 stream);
    return cudaGetLastError();
}
