/* convert: element type conversion between float32 and bf16 (round to nearest even), for
 * uploads of host float32 data and float32 downloads of activations. */
#include "common.cuh"

template <typename D, typename S>
static __global__ void convert_kernel(D *dst, const S *src, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        dst[i] = uck_from_f<D>(uck_to_f(src[i]));
    }
}

extern "C" cudaError_t uc_cuda_convert(void *dst, enum uc_cuda_dtype dst_dt, const void *src,
                                       enum uc_cuda_dtype src_dt, int64_t n, cudaStream_t stream)
{
    if (n <= 0) {
        return cudaGetLastError();
    }
    unsigned g = uck_blocks(n, 256);
    if (dst_dt == UC_CUDA_BF16 && src_dt == UC_CUDA_F32) {
        convert_kernel<<<g, 256, 0, stream>>>((uc_bf16_t *)dst, (const float *)src, n);
    } else if (dst_dt == UC_CUDA_F32 && src_dt == UC_CUDA_BF16) {
        convert_kernel<<<g, 256, 0, stream>>>((float *)dst, (const uc_bf16_t *)src, n);
    } else {
        size_t es = dst_dt == UC_CUDA_F32 ? 4 : 2;
        return cudaMemcpyAsync(dst, src, (size_t)n * es, cudaMemcpyDeviceToDevice, stream);
    }
    return cudaGetLastError();
}
