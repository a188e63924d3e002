/* gather_rows: dst[i, :] = src[idx[i], :] (the embedding rows of the tokens, the rows a pruning
 * stage keeps). One block per row. */
#include "common.cuh"

template <typename T>
static __global__ void gather_kernel(T *dst, const T *src, const int32_t *idx, int64_t width)
{
    int64_t i = blockIdx.x;
    const T *s = src + (int64_t)idx[i] * width;
    T *d = dst + i * width;
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
        d[j] = s[j];
    }
}

template <typename T>
static void launch(void *dst, const void *src, const int32_t *idx, int64_t n_idx, int64_t width,
                   cudaStream_t stream)
{
    gather_kernel<T><<<(unsigned)n_idx, 256, 0, stream>>>((T *)dst, (const T *)src, idx, width);
}

extern "C" cudaError_t uc_cuda_gather_rows(void *dst, const void *src, const int32_t *idx,
                                           int64_t n_idx, int64_t width, enum uc_cuda_dtype dt,
                                           cudaStream_t stream)
{
    if (n_idx > 0 && width > 0) {
        UCK_DISPATCH(dt, launch, dst, src, idx, n_idx, width, stream);
    }
    return cudaGetLastError();
}
