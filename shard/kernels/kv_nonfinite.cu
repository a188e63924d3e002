/* kv_nonfinite: after non-finite logits, which listed pool blocks hold a NaN or Inf in the
 * first n_valid slots of K or V, or in the first n_valid rows of a packed head's block (the
 * engine's diagnosis of the layer where activations stopped being finite). One CUDA block per
 * listed pool block; never on a serving step's path. */
#include "common.cuh"

template <typename T>
static __global__ void nonfinite_kernel(int32_t *bad, const T *pk, const T *pv,
                                        const int32_t *blocks, const int32_t *n_valid,
                                        const int32_t *kdim, int64_t block_tokens, int64_t d)
{
    int64_t e = blockIdx.x, per = block_tokens * d;
    int64_t base = (int64_t)blocks[e] * per;
    int64_t kd = kdim ? kdim[e] : 0;
    int hit = 0;
    if (kd > 0) { /* packed rows: a stream over the K area, then the V area */
        int64_t n = (int64_t)n_valid[e] * (kd + d);
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
            hit |= !isfinite(uck_to_f(i < per ? pk[base + i] : pv[base + i - per]));
        }
    } else {
        int64_t n = (int64_t)n_valid[e] * d;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
            hit |= !isfinite(uck_to_f(pk[base + i])) || !isfinite(uck_to_f(pv[base + i]));
        }
    }
    hit = __syncthreads_or(hit);
    if (threadIdx.x == 0) {
        bad[e] = hit ? 1 : 0;
    }
}

template <typename T>
static void launch(int32_t *bad, const void *k, const void *v, const int32_t *blocks,
                   const int32_t *n_valid, const int32_t *kdim, int64_t n, int64_t block_tokens,
                   int64_t d, cudaStream_t stream)
{
    nonfinite_kernel<T><<<(unsigned)n, 128, 0, stream>>>(bad, (const T *)k, (const T *)v, blocks,
                                                         n_valid, kdim, block_tokens, d);
}

extern "C" cudaError_t uc_cuda_kv_nonfinite(int32_t *bad, const void *k, const void *v,
                                            const int32_t *blocks, const int32_t *n_valid,
                                            const int32_t *kdim, int64_t n, int64_t block_tokens,
                                            int64_t head_dim, enum uc_cuda_dtype dt,
                                            cudaStream_t stream)
{
    if (n > 0x7fffffffLL) {
        return cudaErrorInvalidValue;
    }
    if (n > 0) {
        UCK_DISPATCH(dt, launch, bad, k, v, blocks, n_valid, kdim, n, block_tokens, head_dim,
                     stream);
    }
    return cudaGetLastError();
}
