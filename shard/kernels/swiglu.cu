/* swiglu: y (T, F) = silu(g) * u with gu (T, 2F) = [gate | up], float32 arithmetic as the CPU
 * reference writes it (g / (1 + exp(-g)) * u). */
#include "common.cuh"

template <typename T>
static __global__ void swiglu_kernel(T *y, const T *gu, int64_t n_tok, int64_t n_ffn)
{
    int64_t n = n_tok * n_ffn;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / n_ffn, j = i - t * n_ffn;
        const T *row = gu + t * 2 * n_ffn;
        float g = uck_to_f(row[j]), u = uck_to_f(row[n_ffn + j]);
        y[i] = uck_from_f<T>(g / (1.0f + expf(-g)) * u);
    }
}

template <typename T>
static void launch(void *y, const void *gu, int64_t n_tok, int64_t n_ffn, cudaStream_t stream)
{
    swiglu_kernel<T><<<uck_blocks(n_tok * n_ffn, 256), 256, 0, stream>>>((T *)y, (const T *)gu,
                                                                         n_tok, n_ffn);
}

extern "C" cudaError_t uc_cuda_swiglu(void *y, const void *gu, int64_t n_tok, int64_t n_ffn,
                                      enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_tok > 0 && n_ffn > 0) {
        UCK_DISPATCH(dt, launch, y, gu, n_tok, n_ffn, stream);
    }
    return cudaGetLastError();
}
