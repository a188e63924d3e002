/* embed: y (T, C) = table[ids] for token ids already on the device. One block per token. */
#include "common.cuh"

template <typename T>
static __global__ void embed_kernel(T *y, const T *table, const int32_t *ids, int64_t dim)
{
    int64_t t = blockIdx.x;
    const T *src = table + (int64_t)ids[t] * dim;
    T *dst = y + t * dim;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        dst[j] = src[j];
    }
}

template <typename T>
static void launch(void *y, const void *table, const int32_t *ids, int64_t n_tok, int64_t dim,
                   cudaStream_t stream)
{
    embed_kernel<T><<<(unsigned)n_tok, 256, 0, stream>>>((T *)y, (const T *)table, ids, dim);
}

extern "C" cudaError_t uc_cuda_embed(void *y, const void *table, const int32_t *ids,
                                     int64_t n_tok, int64_t dim, enum uc_cuda_dtype dt,
                                     cudaStream_t stream)
{
    if (n_tok > 0) {
        UCK_DISPATCH(dt, launch, y, table, ids, n_tok, dim, stream);
    }
    return cudaGetLastError();
}
