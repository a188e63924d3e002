/* add_bias: y (T, N) += b (N), broadcast over rows. */
#include "common.cuh"

template <typename T>
static __global__ void add_bias_kernel(T *y, const T *b, int64_t n_tok, int64_t n_out)
{
    int64_t n = n_tok * n_out;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        y[i] = uck_from_f<T>(uck_to_f(y[i]) + uck_to_f(b[i % n_out]));
    }
}

template <typename T>
static void launch(void *y, const void *b, int64_t n_tok, int64_t n_out, cudaStream_t stream)
{
    add_bias_kernel<T><<<uck_blocks(n_tok * n_out, 256), 256, 0, stream>>>((T *)y, (const T *)b,
                                                                           n_tok, n_out);
}

extern "C" cudaError_t uc_cuda_add_bias(void *y, const void *b, int64_t n_tok, int64_t n_out,
                                        enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_tok > 0 && n_out > 0) {
        UCK_DISPATCH(dt, launch, y, b, n_tok, n_out, stream);
    }
    return cudaGetLastError();
}
