/* qcov, normalisation half: per head, the column means over the n rows (double; parts of 512
 * rows summed over many blocks, then the parts in order), then each row centred and scaled to
 * unit L2 norm into a dense (hb, n_pad, D) buffer (rows past n zero), from which the backend
 * forms C = Xn^T Xn / n with strided-batched products over row chunks (split K) whose partial
 * products qcov_sum adds in order (UNCOMP.md section 1). The buffer holds doubles for DGEMMs
 * (float32 activations: the checks against the CPU), or IEEE halves for tensor-core products
 * with float32 sums (bf16 activations: the rows have unit norm, so a half's 11 significant bits
 * put the entropies within ~1e-6 of the double path's, far inside what bf16 queries move them). */
#include <cuda_fp16.h>

#include <type_traits>

#include "common.cuh"


/* Mean, first pass: block (head, 32 columns, row part r) sums its part's rows (8 row lanes,
 * then the lanes in order) into part[(r * hb + hh) * d + c]. */
template <typename T>
static __global__ void qcov_mean_kernel(double *part, const T *q, int64_t ld, int64_t n,
                                        int64_t h0, int hb, int d)
{
    __shared__ double red[8][32];
    const int hh = blockIdx.x, r = blockIdx.z;
    const int c = blockIdx.y * 32 + threadIdx.x;
    const int64_t i0 = (int64_t)r * UC_CUDA_QCOV_MEAN_ROWS;
    const int64_t i1 = i0 + UC_CUDA_QCOV_MEAN_ROWS < n ? i0 + UC_CUDA_QCOV_MEAN_ROWS : n;
    double s = 0.0;
    if (c < d) {
        const T *base = q + (h0 + hh) * d + c;
        for (int64_t i = i0 + threadIdx.y; i < i1; i += 8) {
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
        part[((int64_t)r * hb + hh) * d + c] = t;
    }
}

/* Mean, second pass: the parts in order, over n. */
static __global__ void qcov_mean_finish_kernel(double *mean, const double *part, int parts, int hb,
                                               int d, int64_t n)
{
    const int hh = blockIdx.x;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        double t = 0.0;
        for (int r = 0; r < parts; r++) {
            t += part[((int64_t)r * hb + hh) * d + c];
        }
        mean[(int64_t)hh * d + c] = t / (double)n;
    }
}

static __device__ __forceinline__ void qcov_store(double *p, double x) { *p = x; }
static __device__ __forceinline__ void qcov_store(__half *p, double x)
{
    *p = __double2half(x);
}

/* Rows at or past n (up to n_pad, the padded rows per head) are written as zeros. */
template <typename T, typename X>
static __global__ void qcov_norm_kernel(X *xn, const double *mean, const T *q, int64_t ld,
                                        int64_t n, int64_t n_pad, int64_t h0, int d)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t i = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp;
    const int hh = blockIdx.y;
    if (i >= n_pad) {
        return;
    }
    X *out = xn + ((int64_t)hh * n_pad + i) * d;
    if (i >= n) {
        for (int c = lane; c < d; c += 32) {
            qcov_store(out + c, 0.0);
        }
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
    for (int c = lane; c < d; c += 32) {
        double x = (double)uck_to_f(row[c]) - mu[c];
        qcov_store(out + c, nrm > 0.0 ? x / nrm : x);
    }
}

/* Half mode at D = 128 (the bf16 engine's case): lane l holds a row's elements 4l .. 4l + 3 (one
 * 8-byte load), a warp takes QN_ROWS rows with all their loads issued first, and a row's centring
 * and scaling run in float with one reciprocal square root. The halves keep 11 bits, so float's
 * 24 do not show in them; the generic kernel above stays for other head sizes and for the
 * float32 checks, whose doubles divide as the CPU does. */
#define QN_ROWS 4
#define QN_WARPS 8
static __global__ void __launch_bounds__(QN_WARPS * 32)
    qcov_norm_half128_kernel(__half *xn, const double *mean, const uc_bf16_t *q, int64_t ld,
                             int64_t n, int64_t n_pad, int64_t h0)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, hh = blockIdx.y;
    const int64_t i0 = ((int64_t)blockIdx.x * QN_WARPS + warp) * QN_ROWS;
    const double *mu = mean + (int64_t)hh * 128 + 4 * lane;
    const float m0 = (float)mu[0], m1 = (float)mu[1], m2 = (float)mu[2], m3 = (float)mu[3];
    uint2 raw[QN_ROWS];
#pragma unroll
    for (int k = 0; k < QN_ROWS; k++) {
        const int64_t i = i0 + k;
        raw[k] = i < n ? *reinterpret_cast<const uint2 *>(q + i * ld + (h0 + hh) * 128 + 4 * lane)
                       : make_uint2(0u, 0u);
    }
#pragma unroll
    for (int k = 0; k < QN_ROWS; k++) {
        const int64_t i = i0 + k;
        if (i >= n_pad) {
            break;
        }
        uint2 *out = reinterpret_cast<uint2 *>(xn + ((int64_t)hh * n_pad + i) * 128) + lane;
        if (i >= n) {
            *out = make_uint2(0u, 0u);
            continue;
        }
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&raw[k].x));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&raw[k].y));
        const float x0 = a.x - m0, x1 = a.y - m1, x2 = b.x - m2, x3 = b.y - m3;
        const float ss = uck_warp_sum(x0 * x0 + x1 * x1 + x2 * x2 + x3 * x3);
        const float inv = ss > 0.0f ? rsqrtf(ss) : 1.0f;
        __half2 lo = __floats2half2_rn(x0 * inv, x1 * inv);
        __half2 hi = __floats2half2_rn(x2 * inv, x3 * inv);
        *out = make_uint2(*reinterpret_cast<unsigned *>(&lo), *reinterpret_cast<unsigned *>(&hi));
    }
}

template <typename T>
static void launch(void *xn, double *mean, const void *q, int64_t ld, int64_t n, int64_t n_pad,
                   int64_t h0, int64_t hb, int64_t d, bool half, cudaStream_t stream)
{
    /* the parts live at the start of xn, which the normalisation overwrites afterwards (a
     * part's hb * D doubles per 512 rows fit in the rows' halves too) */
    const int parts = (int)((n + UC_CUDA_QCOV_MEAN_ROWS - 1) / UC_CUDA_QCOV_MEAN_ROWS);
    double *part = static_cast<double *>(xn);
    dim3 g1((unsigned)hb, (unsigned)((d + 31) / 32), (unsigned)parts);
    qcov_mean_kernel<T><<<g1, dim3(32, 8), 0, stream>>>(part, (const T *)q, ld, n, h0, (int)hb,
                                                        (int)d);
    qcov_mean_finish_kernel<<<(unsigned)hb, 128, 0, stream>>>(mean, part, parts, (int)hb, (int)d,
                                                              n);
    dim3 g2((unsigned)((n_pad + 7) / 8), (unsigned)hb);
    const bool lean = std::is_same<T, uc_bf16_t>::value && half && d == 128 && ld % 4 == 0 &&
                      ((uintptr_t)q & 7u) == 0;
    if (lean) {
        const int64_t per_block = QN_WARPS * QN_ROWS;
        dim3 g3((unsigned)((n_pad + per_block - 1) / per_block), (unsigned)hb);
        qcov_norm_half128_kernel<<<g3, QN_WARPS * 32, 0, stream>>>(
            static_cast<__half *>(xn), mean, (const uc_bf16_t *)q, ld, n, n_pad, h0);
    } else if (half) {
        qcov_norm_kernel<T, __half><<<g2, 256, 0, stream>>>(static_cast<__half *>(xn), mean,
                                                             (const T *)q, ld, n, n_pad, h0,
                                                             (int)d);
    } else {
        qcov_norm_kernel<T, double><<<g2, 256, 0, stream>>>(static_cast<double *>(xn), mean,
                                                             (const T *)q, ld, n, n_pad, h0,
                                                             (int)d);
    }
}

/* cov[h] = scale x the sum over s < split of part[h * split + s], in that order. */
template <typename P>
static __global__ void qcov_sum_kernel(double *cov, const P *part, int split, int64_t dd,
                                       double scale)
{
    const int64_t h = blockIdx.y;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < dd;
         e += (int64_t)gridDim.x * blockDim.x) {
        double t = 0.0;
        for (int s = 0; s < split; s++) {
            t += (double)part[(h * split + s) * dd + e];
        }
        cov[h * dd + e] = t * scale;
    }
}

extern "C" cudaError_t uc_cuda_qcov_sum(double *cov, const void *part, int64_t hb, int64_t split,
                                        int64_t head_dim, int part_f32, double scale,
                                        cudaStream_t stream)
{
    if (hb <= 0 || split <= 0 || head_dim <= 0) {
        return cudaErrorInvalidValue;
    }
    int64_t dd = head_dim * head_dim;
    dim3 grid((unsigned)((dd + 255) / 256), (unsigned)hb);
    if (part_f32) {
        qcov_sum_kernel<float><<<grid, 256, 0, stream>>>(cov, static_cast<const float *>(part),
                                                         (int)split, dd, scale);
    } else {
        qcov_sum_kernel<double><<<grid, 256, 0, stream>>>(cov, static_cast<const double *>(part),
                                                          (int)split, dd, scale);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t uc_cuda_qcov_normalize(void *xn, double *mean, const void *q, int64_t ld,
                                              int64_t n, int64_t n_pad, int64_t h0, int64_t hb,
                                              int64_t head_dim, int half, enum uc_cuda_dtype dt,
                                              cudaStream_t stream)
{
    if (n <= 0 || n_pad < n || hb <= 0 || head_dim <= 0) {
        return cudaErrorInvalidValue;
    }
    UCK_DISPATCH(dt, launch, xn, mean, q, ld, n, n_pad, h0, hb, head_dim, half != 0, stream);
    return cudaGetLastError();
}
