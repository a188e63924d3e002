/* add: y (n) += x (n), the residual connection. bf16 pairs are processed two at a time. */
#include "common.cuh"

template <typename T>
static __global__ void add_kernel(T *y, const T *x, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        y[i] = uck_from_f<T>(uck_to_f(y[i]) + uck_to_f(x[i]));
    }
}

static __global__ void add_bf16x2_kernel(__nv_bfloat162 *y, const __nv_bfloat162 *x, int64_t n2)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n2;
         i += (int64_t)gridDim.x * blockDim.x) {
        float2 a = __bfloat1622float2(y[i]), b = __bfloat1622float2(x[i]);
        y[i] = __floats2bfloat162_rn(a.x + b.x, a.y + b.y);
    }
}

template <typename T>
static void launch(void *y, const void *x, int64_t n, cudaStream_t stream)
{
    add_kernel<T><<<uck_blocks(n, 256), 256, 0, stream>>>((T *)y, (const T *)x, n);
}

extern "C" cudaError_t uc_cuda_add(void *y, const void *x, int64_t n, enum uc_cuda_dtype dt,
                                   cudaStream_t stream)
{
    if (n <= 0) {
        return cudaGetLastError();
    }
    if (dt == UC_CUDA_BF16 && n % 2 == 0 && ((uintptr_t)y | (uintptr_t)x) % 4 == 0) {
        add_bf16x2_kernel<<<uck_blocks(n / 2, 256), 256, 0, stream>>>(
            (__nv_bfloat162 *)y, (const __nv_bfloat162 *)x, n / 2);
    } else {
        UCK_DISPATCH(dt, launch, y, x, n, stream);
    }
    return cudaGetLastError();
}
