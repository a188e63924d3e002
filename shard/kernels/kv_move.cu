/* kv_move: copies one pool slot (K and V) to another in a single launch (evict-mode
 * compaction shifts a head's later tokens down one slot at a time, in stream order). */
#include "common.cuh"

template <typename T>
static __global__ void kv_move_kernel(T *pk, T *pv, int64_t d, int64_t dst, int64_t src)
{
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        pk[dst * d + c] = pk[src * d + c];
        pv[dst * d + c] = pv[src * d + c];
    }
}

template <typename T>
static void launch(void *pk, void *pv, int64_t d, int64_t dst, int64_t src, cudaStream_t stream)
{
    kv_move_kernel<T><<<1, 128, 0, stream>>>((T *)pk, (T *)pv, d, dst, src);
}

extern "C" cudaError_t uc_cuda_kv_move(void *pool_k, void *pool_v, int64_t head_dim,
                                       int32_t dst_slot, int32_t src_slot, enum uc_cuda_dtype dt,
                                       cudaStream_t stream)
{
    if (dst_slot != src_slot) {
        UCK_DISPATCH(dt, launch, pool_k, pool_v, head_dim, (int64_t)dst_slot, (int64_t)src_slot,
                     stream);
    }
    return cudaGetLastError();
}
