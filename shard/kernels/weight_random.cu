/* weight_random: synthetic weights generated where they live. Element i is splitmix64 of
 * (seed * golden ^ i) mapped to [-1, 1) exactly as uc_test_fill does on the host (rank 0,
 * index0 0), then mean + std * sqrt(3) * u with unfused float32 operations, so a float32 CUDA
 * weight equals the CPU backend's bit for bit and a bf16 one is its rounding. */
#include "common.cuh"

template <typename T>
static __global__ void weight_random_kernel(T *w, int64_t n, uint64_t seed, float mean, float k)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint64_t x = seed * 0x9e3779b97f4a7c15ULL ^ (uint64_t)i;
        uint64_t z = x + 0x9e3779b97f4a7c15ULL;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z = z ^ (z >> 31);
        double u = __dsub_rn(__dmul_rn(__dmul_rn((double)(z >> 11), 0x1.0p-53), 2.0), 1.0);
        w[i] = uck_from_f<T>(__fadd_rn(mean, __fmul_rn(k, (float)u)));
    }
}

template <typename T>
static void launch(void *w, int64_t n, uint64_t seed, float mean, float k, cudaStream_t stream)
{
    weight_random_kernel<T><<<uck_blocks(n, 256), 256, 0, stream>>>((T *)w, n, seed, mean, k);
}

extern "C" cudaError_t uc_cuda_weight_random(void *w, int64_t n, uint64_t seed, float mean,
                                             float std, enum uc_cuda_dtype dt,
                                             cudaStream_t stream)
{
    if (n > 0) {
        float k = std * 1.7320508f;
        UCK_DISPATCH(dt, launch, w, n, seed, mean, k, stream);
    }
    return cudaGetLastError();
}
