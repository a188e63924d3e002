/* attn_colsum (H2O scores): out[h, j] = sum over query rows i >= j of softmax(q_i k^T)[j].
 * Pass 1, one block per 32-query tile, runs an online max / exp-sum over the causal keys and
 * stores each row's (max, 1 / sum). Pass 2, one block per 64-key tile, walks the query tiles from
 * the diagonal down, recomputes the same scores, and sums exp(s - max) / sum down each column
 * (double accumulators). Nothing of size n x n is stored. */
#include "attn_tile.cuh"

static __device__ __forceinline__ void ml_merge(float &m, float &l, float m2, float l2)
{
    float mn = fmaxf(m, m2);
    if (mn == -INFINITY) {
        m = mn;
        l = 0.0f;
        return;
    }
    l = l * expf(m - mn) + l2 * expf(m2 - mn);
    m = mn;
}

template <typename T>
static __global__ void __launch_bounds__(AT_THREADS)
    colsum_rowstats_kernel(float *row_ml, const T *q, int64_t ld_q, const T *k, int64_t ld_kv,
                           int64_t n, int group, int d, float scale)
{
    __shared__ at_smem sm;
    __shared__ float xm[AT_THREADS / 32][8], xl[AT_THREADS / 32][8];
    const int h = blockIdx.y;
    const int64_t r0 = (int64_t)blockIdx.x * AT_ROWS;
    const int jj = threadIdx.x & (AT_KEYS - 1), rb = threadIdx.x / AT_KEYS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t last = (r0 + AT_ROWS < n ? r0 + AT_ROWS : n) - 1;
    float m[8], l[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    for (int64_t key0 = 0; key0 <= last; key0 += AT_KEYS) {
        at_scores<T>(acc, sm, q + (int64_t)h * d, ld_q, r0, n, k + (int64_t)(h / group) * d,
                     ld_kv, key0, n, d);
        int64_t key = key0 + jj;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int64_t r = r0 + rb + 4 * i;
            if (r < n && key <= r) {
                float s = acc[i] * scale;
                if (s > m[i]) {
                    l[i] = l[i] * expf(m[i] - s) + 1.0f;
                    m[i] = s;
                } else {
                    l[i] += expf(s - m[i]);
                }
            }
        }
    }
    /* merge the 64 threads of each row: within the warp, then the warp pair */
#pragma unroll
    for (int i = 0; i < 8; i++) {
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m[i], o);
            float l2 = __shfl_xor_sync(0xffffffffu, l[i], o);
            ml_merge(m[i], l[i], m2, l2);
        }
        if (lane == 0) {
            xm[warp][i] = m[i];
            xl[warp][i] = l[i];
        }
    }
    __syncthreads();
    if ((warp & 1) == 0 && lane == 0) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float mm = xm[warp][i], ll = xl[warp][i];
            ml_merge(mm, ll, xm[warp + 1][i], xl[warp + 1][i]);
            int64_t r = r0 + rb + 4 * i;
            if (r < n) {
                row_ml[((int64_t)h * n + r) * 2] = mm;
                row_ml[((int64_t)h * n + r) * 2 + 1] = 1.0f / ll;
            }
        }
    }
}

template <typename T>
static __global__ void __launch_bounds__(AT_THREADS)
    colsum_cols_kernel(double *out, const float *row_ml, const T *q, int64_t ld_q, const T *k,
                       int64_t ld_kv, int64_t n, int group, int d, float scale)
{
    __shared__ at_smem sm;
    __shared__ double red[AT_THREADS / AT_KEYS][AT_KEYS];
    const int h = blockIdx.y;
    const int64_t key0 = (int64_t)blockIdx.x * AT_KEYS;
    const int jj = threadIdx.x & (AT_KEYS - 1), rb = threadIdx.x / AT_KEYS;
    const int64_t key = key0 + jj;
    const float *ml = row_ml + (int64_t)h * n * 2;
    double cs = 0.0;
    float acc[8];
    for (int64_t r0 = (key0 / AT_ROWS) * AT_ROWS; r0 < n; r0 += AT_ROWS) {
        at_scores<T>(acc, sm, q + (int64_t)h * d, ld_q, r0, n, k + (int64_t)(h / group) * d,
                     ld_kv, key0, n, d);
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int64_t r = r0 + rb + 4 * i;
            if (r < n && key <= r) {
                part += expf(acc[i] * scale - ml[r * 2]) * ml[r * 2 + 1];
            }
        }
        cs += (double)part;
    }
    red[rb][jj] = cs;
    __syncthreads();
    if (rb == 0 && key < n) {
        double s = 0.0;
        for (int i = 0; i < AT_THREADS / AT_KEYS; i++) {
            s += red[i][jj];
        }
        out[(int64_t)h * n + key] = s;
    }
}

template <typename T>
static void launch(double *out, float *row_ml, const void *q, int64_t ld_q, const void *k,
                   int64_t ld_kv, int64_t n, int64_t n_heads, int64_t n_heads_kv, int64_t d,
                   cudaStream_t stream)
{
    int group = (int)(n_heads / n_heads_kv);
    float scale = 1.0f / sqrtf((float)d);
    dim3 g1((unsigned)((n + AT_ROWS - 1) / AT_ROWS), (unsigned)n_heads);
    colsum_rowstats_kernel<T><<<g1, AT_THREADS, 0, stream>>>(row_ml, (const T *)q, ld_q,
                                                             (const T *)k, ld_kv, n, group,
                                                             (int)d, scale);
    dim3 g2((unsigned)((n + AT_KEYS - 1) / AT_KEYS), (unsigned)n_heads);
    colsum_cols_kernel<T><<<g2, AT_THREADS, 0, stream>>>(out, row_ml, (const T *)q, ld_q,
                                                         (const T *)k, ld_kv, n, group, (int)d,
                                                         scale);
}

extern "C" cudaError_t uc_cuda_attn_colsum(double *out, float *row_ml, const void *q,
                                           int64_t ld_q, const void *k, int64_t ld_kv, int64_t n,
                                           int64_t n_heads, int64_t n_heads_kv, int64_t head_dim,
                                           enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n <= 0) {
        return cudaGetLastError();
    }
    if (n_heads_kv <= 0 || n_heads % n_heads_kv != 0 || head_dim <= 0) {
        return cudaErrorInvalidValue;
    }
    UCK_DISPATCH(dt, launch, out, row_ml, q, ld_q, k, ld_kv, n, n_heads, n_heads_kv, head_dim,
                 stream);
    return cudaGetLastError();
}
