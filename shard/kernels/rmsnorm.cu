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

template <typename T>
static void launch(void *y, const void *x, const void *w, int64_t n_tok, int64_t dim, float eps,
                   cudaStream_t stream)
{
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
