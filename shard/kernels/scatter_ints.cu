/* scatter_ints: dst[pos[i]] = val[i] for i < n (int32 words scattered into backend memory: a
 * step's appended block ids, far apart in the block-table arena). */
#include "common.cuh"

static __global__ void scatter_ints_kernel(int32_t *dst, const int32_t *pos, const int32_t *val,
                                           int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        dst[pos[i]] = val[i];
    }
}

extern "C" cudaError_t uc_cuda_scatter_ints(int32_t *dst, const int32_t *pos, const int32_t *val,
                                            int64_t n, cudaStream_t stream)
{
    if (n <= 0) {
        return cudaGetLastError();
    }
    int64_t blocks = (n + 255) / 256;
    scatter_ints_kernel<<<(unsigned)(blocks < 1024 ? blocks : 1024), 256, 0, stream>>>(dst, pos,
                                                                                     val, n);
    return cudaGetLastError();
}
