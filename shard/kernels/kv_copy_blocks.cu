/* kv_copy_blocks: whole-block copies inside the paged K and V pools (forking a sequence), one
 * grid for every block, 16-byte vectors. */
#include "common.cuh"

static __global__ void copy_kernel(uint4 *k, uint4 *v, const int32_t *dst, const int32_t *src,
                                   int64_t vecs_per_block)
{
    int64_t b = blockIdx.y;
    const uint4 *ks = k + (int64_t)src[b] * vecs_per_block;
    const uint4 *vs = v + (int64_t)src[b] * vecs_per_block;
    uint4 *kd = k + (int64_t)dst[b] * vecs_per_block;
    uint4 *vd = v + (int64_t)dst[b] * vecs_per_block;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < vecs_per_block;
         i += (int64_t)gridDim.x * blockDim.x) {
        kd[i] = ks[i];
        vd[i] = vs[i];
    }
}

extern "C" cudaError_t uc_cuda_kv_copy_blocks(void *k, void *v, const int32_t *dst,
                                              const int32_t *src, int64_t n, int64_t block_elems,
                                              enum uc_cuda_dtype dt, cudaStream_t stream)
{
    int64_t bytes = block_elems * (dt == UC_CUDA_BF16 ? 2 : 4);
    if (n <= 0 || bytes % 16 != 0 || n > 65535 * 1024LL) {
        return n <= 0 ? cudaSuccess : cudaErrorInvalidValue;
    }
    int64_t vecs = bytes / 16;
    for (int64_t b0 = 0; b0 < n; b0 += 65535) { /* grid.y is limited to 65535 */
        int64_t m = n - b0 < 65535 ? n - b0 : 65535;
        dim3 grid((unsigned)((vecs + 255) / 256), (unsigned)m);
        copy_kernel<<<grid, 256, 0, stream>>>((uint4 *)k, (uint4 *)v, dst + b0, src + b0, vecs);
    }
    return cudaGetLastError();
}
