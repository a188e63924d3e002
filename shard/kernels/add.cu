/* add: y (n) += x (n), the residual connection. bf16 is processed eight elements (one 16-byte
 * access) a thread where both are 16-byte aligned, else two at a time; the sums are the same. */
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

/* Eight bf16 of y and x, one 16-byte load each. */
static __global__ void add_bf16x8_kernel(uint4 *y, const uint4 *x, int64_t n8)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint4 a = y[i], b = x[i];
        __nv_bfloat162 *pa = reinterpret_cast<__nv_bfloat162 *>(&a);
        const __nv_bfloat162 *pb = reinterpret_cast<const __nv_bfloat162 *>(&b);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 fa = __bfloat1622float2(pa[k]), fb = __bfloat1622float2(pb[k]);
            pa[k] = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
        }
        y[i] = a;
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
    if (dt == UC_CUDA_BF16 && n % 8 == 0 && uck_aligned16(y) && uck_aligned16(x)) {
        add_bf16x8_kernel<<<uck_blocks(n / 8, 256), 256, 0, stream>>>((uint4 *)y,
                                                                       (const uint4 *)x, n / 8);
    } else if (dt == UC_CUDA_BF16 && n % 2 == 0 && ((uintptr_t)y | (uintptr_t)x) % 4 == 0) {
        add_bf16x2_kernel<<<uck_blocks(n / 2, 256), 256, 0, stream>>>(
            (__nv_bfloat162 *)y, (const __nv_bfloat162 *)x, n / 2);
    } else {
        UCK_DISPATCH(dt, launch, y, x, n, stream);
    }
    return cudaGetLastError();
}
