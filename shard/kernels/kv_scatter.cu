/* kv_scatter: writes selected K/V head rows of the fused QKV activations into paged-pool slots.
 * One thread per (entry, element); consecutive threads of an entry read and write contiguously. */
#include "common.cuh"

template <typename T>
static __global__ void kv_scatter_kernel(T *pk, T *pv, const T *ks, const T *vs, int64_t ld,
                                         const int32_t *src_row, const int32_t *src_head,
                                         const int32_t *slot, int64_t n, int64_t d)
{
    int64_t total = n * d;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t e = i / d, c = i - e * d;
        int64_t src = (int64_t)src_row[e] * ld + (int64_t)src_head[e] * d + c;
        int64_t dst = (int64_t)slot[e] * d + c;
        pk[dst] = ks[src];
        pv[dst] = vs[src];
    }
}

template <typename T>
static void launch(void *pk, void *pv, const void *ks, const void *vs, int64_t ld,
                   const int32_t *src_row, const int32_t *src_head, const int32_t *slot, int64_t n,
                   int64_t d, cudaStream_t stream)
{
    kv_scatter_kernel<T><<<uck_blocks(n * d, 256), 256, 0, stream>>>(
        (T *)pk, (T *)pv, (const T *)ks, (const T *)vs, ld, src_row, src_head, slot, n, d);
}

extern "C" cudaError_t uc_cuda_kv_scatter(void *pool_k, void *pool_v, const void *k_src,
                                          const void *v_src, int64_t ld, const int32_t *src_row,
                                          const int32_t *src_head, const int32_t *slot, int64_t n,
                                          int64_t head_dim, enum uc_cuda_dtype dt,
                                          cudaStream_t stream)
{
    if (n > 0) {
        UCK_DISPATCH(dt, launch, pool_k, pool_v, k_src, v_src, ld, src_row, src_head, slot, n,
                     head_dim, stream);
    }
    return cudaGetLastError();
}
