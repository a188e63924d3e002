/* gather_rows: dst[i, :] = src[idx[i], :] (the embedding rows of the tokens, the rows a pruning
 * stage keeps). One block per row. gather_ids checks each id against the source's rows (ids the
 * device made: a decode step's argmax, -1 for a non-finite row) and writes zeros for one
 * outside. */
#include "common.cuh"

template <typename T>
static __global__ void gather_kernel(T *dst, const T *src, const int32_t *idx, int64_t n_src,
                                     int64_t width)
{
    int64_t i = blockIdx.x, r = idx[i];
    T *d = dst + i * width;
    if (n_src >= 0 && (r < 0 || r >= n_src)) { /* checked ids: a row outside gives zeros */
        for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
            d[j] = T(0.0f);
        }
        return;
    }
    const T *s = src + r * width;
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
        d[j] = s[j];
    }
}

template <typename T>
static void launch(void *dst, const void *src, const int32_t *idx, int64_t n_idx, int64_t n_src,
                   int64_t width, cudaStream_t stream)
{
    gather_kernel<T><<<(unsigned)n_idx, 256, 0, stream>>>((T *)dst, (const T *)src, idx, n_src,
                                                          width);
}

extern "C" cudaError_t uc_cuda_gather_rows(void *dst, const void *src, const int32_t *idx,
                                           int64_t n_idx, int64_t width, enum uc_cuda_dtype dt,
                                           cudaStream_t stream)
{
    if (n_idx > 0 && width > 0) {
        UCK_DISPATCH(dt, launch, dst, src, idx, n_idx, (int64_t)-1, width, stream);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t uc_cuda_gather_ids(void *dst, const void *src, const int32_t *idx,
                                          int64_t n_idx, int64_t n_src, int64_t width,
                                          enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_idx > 0 && width > 0) {
        UCK_DISPATCH(dt, launch, dst, src, idx, n_idx, n_src < 0 ? 0 : n_src, width, stream);
    }
    return cudaGetLastError();
}
