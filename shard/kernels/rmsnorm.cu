/* rmsnorm: y = x / sqrt(mean(x^2) + eps) * w per row, in float32 as the CPU reference orders it
 * (w * (x * inv)). One block per row; the row is read twice (the second time from cache).
 * Launched with uck_launch: the product after a norm starts loading weights while it runs. */
#include "common.cuh"

template <typename T>
static __global__ void rmsnorm_kernel(T *y, const T *x, const T *w, int64_t dim, float eps)
{
    __shared__ float red[32];
    uck_launch_dependents();
    uck_grid_wait();
    int64_t t = blockIdx.x;
    const T *r = x + t * dim;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = uck_to_f(r[j]);
        ss += v * v;
    }
    ss = uck_block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    T *o = y + t * dim;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        o[j] = uck_from_f<T>(uck_to_f(w[j]) * (uck_to_f(r[j]) * inv));
    }
}

/* One pass with the row in registers: each thread loads one 16-byte vector of the row (and of
 * d when ADD), so a decode row costs one round trip to memory instead of a strided loop. Rows
 * of up to 1024 vectors (8192 bf16 values) with 16-byte aligned rows. */
template <typename T, bool ADD>
static __global__ void norm_vec_kernel(T *y, T *x, const T *d, const T *w, int dim, float eps)
{
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float red[32];
    uck_launch_dependents();
    uck_grid_wait();
    const int64_t off = (int64_t)blockIdx.x * dim;
    const int c = threadIdx.x * VEC;
    const bool on = c < dim;
    float v[VEC];
    float ss = 0.0f;
    if (on) {
        uint4 raw = *reinterpret_cast<const uint4 *>(x + off + c);
        const T *xe = reinterpret_cast<const T *>(&raw);
        if (ADD) {
            uint4 rd = *reinterpret_cast<const uint4 *>(d + off + c);
            const T *de = reinterpret_cast<const T *>(&rd);
            uint4 sum;
            T *se = reinterpret_cast<T *>(&sum);
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                se[i] = uck_from_f<T>(uck_to_f(xe[i]) + uck_to_f(de[i])); /* rounds as add() */
                v[i] = uck_to_f(se[i]);
            }
            *reinterpret_cast<uint4 *>(x + off + c) = sum;
        } else {
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                v[i] = uck_to_f(xe[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            ss += v[i] * v[i];
        }
    }
    ss = uck_block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    if (on) {
        uint4 rw = *reinterpret_cast<const uint4 *>(w + c), o;
        const T *we = reinterpret_cast<const T *>(&rw);
        T *oe = reinterpret_cast<T *>(&o);
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            oe[i] = uck_from_f<T>(uck_to_f(we[i]) * (v[i] * inv));
        }
        *reinterpret_cast<uint4 *>(y + off + c) = o;
    }
}

/* Threads for norm_vec_kernel, or 0 where the row does not suit it. */
template <typename T>
static int vec_threads(int64_t dim, const void *y, const void *x, const void *d, const void *w)
{
    constexpr int VEC = 16 / sizeof(T);
    uintptr_t a = (uintptr_t)y | (uintptr_t)x | (uintptr_t)d | (uintptr_t)w;
    if (dim % VEC != 0 || dim / VEC > 1024 || a % 16 != 0) {
        return 0;
    }
    return (int)((dim / VEC + 31) / 32 * 32);
}

template <typename T>
static void launch(void *y, const void *x, const void *w, int64_t n_tok, int64_t dim, float eps,
                   cudaStream_t stream)
{
    int vt = vec_threads<T>(dim, y, x, NULL, w);
    if (vt > 0) {
        uck_launch(norm_vec_kernel<T, false>, dim3((unsigned)n_tok), dim3(vt), 0, stream, y,
                   const_cast<void *>(x), (const void *)NULL, w, (int)dim, eps);
        return;
    }
    int threads = dim >= 1024 ? 512 : (dim >= 256 ? 256 : 64);
    uck_launch(rmsnorm_kernel<T>, dim3((unsigned)n_tok), dim3(threads), 0, stream, y, x, w, dim,
               eps);
}

/* x += d, then y = rmsnorm(x): the residual add and the next norm in one pass. */
template <typename T>
static __global__ void add_rmsnorm_kernel(T *y, T *x, const T *d, const T *w, int64_t dim,
                                          float eps)
{
    __shared__ float red[32];
    uck_launch_dependents();
    uck_grid_wait();
    int64_t t = blockIdx.x;
    T *r = x + t * dim;
    const T *dr = d + t * dim;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        T s = uck_from_f<T>(uck_to_f(r[j]) + uck_to_f(dr[j])); /* the add rounds as add() does */
        r[j] = s;
        float v = uck_to_f(s);
        ss += v * v;
    }
    ss = uck_block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    T *o = y + t * dim;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        o[j] = uck_from_f<T>(uck_to_f(w[j]) * (uck_to_f(r[j]) * inv));
    }
}

template <typename T>
static void launch_add(void *y, void *x, const void *d, const void *w, int64_t n_tok, int64_t dim,
                       float eps, cudaStream_t stream)
{
    int vt = vec_threads<T>(dim, y, x, d, w);
    if (vt > 0) {
        uck_launch(norm_vec_kernel<T, true>, dim3((unsigned)n_tok), dim3(vt), 0, stream, y, x, d, w,
                   (int)dim, eps);
        return;
    }
    int threads = dim >= 1024 ? 512 : (dim >= 256 ? 256 : 64);
    uck_launch(add_rmsnorm_kernel<T>, dim3((unsigned)n_tok), dim3(threads), 0, stream, y, x, d, w,
               dim, eps);
}

extern "C" cudaError_t uc_cuda_add_rmsnorm(void *y, void *x, const void *d, const void *w,
                                           int64_t n_tok, int64_t dim, float eps,
                                           enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_tok > 0) {
        UCK_DISPATCH(dt, launch_add, y, x, d, w, n_tok, dim, eps, stream);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t uc_cuda_rmsnorm(void *y, const void *x, const void *w, int64_t n_tok,
                                       int64_t dim, float eps, enum uc_cuda_dtype dt,
                                       cudaStream_t stream)
{
    if (n_tok > 0) {
        UCK_DISPATCH(dt, launch, y, x, w, n_tok, dim, eps, stream);
    }
    return cudaGetLastError();
}
