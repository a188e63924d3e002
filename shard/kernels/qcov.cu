/* qcov, normalisation half: per head, the column means over the n rows (double), then each row
 * centred and scaled to unit L2 norm into a dense (hb, n, D) double buffer, from which the
 * backend forms C = Xn^T Xn / n with one strided-batched DGEMM (UNCOMP.md section 1). */
#include "common.cuh"

template <typename T>
static __global__ void qcov_mean_kernel(double *mean, const T *q, int64_t ld, int64_t n,
                                        int64_t h0, int d)
{
    __shared__ double red[8][32];
    const int hh = blockIdx.x;
    const int c = blockIdx.y * 32 + threadIdx.x;
    double s = 0.0;
    if (c < d) {
        const T *base = q + (h0 + hh) * d + c;
        for (int64_t i = threadIdx.y; i < n; i += 8) {
            s += (double)uck_to_f(base[i * ld]);
        }
    }
    red[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        double t = 0.0;
        for (int y = 0; y < 8; y++) {
            t += red[y][threadIdx.x];
        }
        mean[(int64_t)hh * d + c] = t / (double)n;
    }
}

template <typename T>
static __global__ void qcov_norm_kernel(double *xn, const double *mean, const T *q, int64_t ld,
                                        int64_t n, int64_t h0, int d)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t i = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp;
    const int hh = blockIdx.y;
    if (i >= n) {
        return;
    }
    const T *row = q + i * ld + (h0 + hh) * d;
    const double *mu = mean + (int64_t)hh * d;
    double ss = 0.0;
    for (int c = lane; c < d; c += 32) {
        double x = (double)uck_to_f(row[c]) - mu[c];
        ss += x * x;
    }
    ss = uck_warp_sum_d(ss);
    double nrm = sqrt(ss);
    double *out = xn + ((int64_t)hh * n + i) * d;
    for (int c = lane; c < d; c += 32) {
        double x = (double)uck_to_f(row[c]) - mu[c];
        out[c] = nrm > 0.0 ? x / nrm : x;
    }
}

template <typename T>
static void launch(double *xn, double *mean, const void *q, int64_t ld, int64_t n, int64_t h0,
                   int64_t hb, int64_t d, cudaStream_t stream)
{
    dim3 g1((unsigned)hb, (unsigned)((d + 31) / 32));
    qcov_mean_kernel<T><<<g1, dim3(32, 8), 0, stream>>>(mean, (const T *)q, ld, n, h0, (int)d);
    dim3 g2((unsigned)((n + 7) / 8), (unsigned)hb);
    qcov_norm_kernel<T><<<g2, 256, 0, stream>>>(xn, mean, (const T *)q, ld, n, h0, (int)d);
}

extern "C" cudaError_t uc_cuda_qcov_normalize(double *xn, double *mean, const void *q, int64_t ld,
                                              int64_t n, int64_t h0, int64_t hb,
                                              int64_t head_dim, enum uc_cuda_dtype dt,
                                              cudaStream_t stream)
{
    if (n <= 0 || hb <= 0 || head_dim <= 0) {
        return cudaErrorInvalidValue;
    }
    UCK_DISPATCH(dt, launch, xn, mean, q, ld, n, h0, hb, head_dim, stream);
    return cudaGetLastError();
}
