/* kv_scatter: writes selected K/V head rows of the fused QKV activations into paged-pool slots.
 * Where a head row is a whole number of 16-byte vectors and every address is 16-byte aligned
 * (bf16 or float32 heads of 8 or more, the usual case), a block holds several entries and a
 * thread copies one vector of an entry's K and V (threadIdx.x the vector, threadIdx.y the
 * entry): no division per element, and one 16-byte access where the element kernel made eight.
 * Otherwise one thread per (entry, element). Either way a plain copy: the bytes are the same. */
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

/* Addresses in 16-byte vectors: ld_v and d_v are the row stride and head size in vectors. */
static __global__ void kv_scatter_vec_kernel(uint4 *pk, uint4 *pv, const uint4 *ks,
                                             const uint4 *vs, int64_t ld_v,
                                             const int32_t *src_row, const int32_t *src_head,
                                             const int32_t *slot, int64_t n, int d_v)
{
    const int c = threadIdx.x;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; e < n;
         e += (int64_t)gridDim.x * blockDim.y) {
        int64_t src = (int64_t)src_row[e] * ld_v + (int64_t)src_head[e] * d_v + c;
        int64_t dst = (int64_t)slot[e] * d_v + c;
        pk[dst] = ks[src];
        pv[dst] = vs[src];
    }
}

template <typename T>
static void launch(void *pk, void *pv, const void *ks, const void *vs, int64_t ld,
                   const int32_t *src_row, const int32_t *src_head, const int32_t *slot, int64_t n,
                   int64_t d, cudaStream_t stream)
{
    const int64_t per_v = 16 / (int64_t)sizeof(T);
    if (d % per_v == 0 && d / per_v <= 128 && ld % per_v == 0 && uck_aligned16(pk) &&
        uck_aligned16(pv) && uck_aligned16(ks) && uck_aligned16(vs)) {
        const int d_v = (int)(d / per_v), rows = 256 / d_v; /* d_v <= 128: 2 rows or more */
        kv_scatter_vec_kernel<<<uck_blocks(n, rows), dim3((unsigned)d_v, (unsigned)rows), 0,
                                stream>>>((uint4 *)pk, (uint4 *)pv, (const uint4 *)ks,
                                          (const uint4 *)vs, ld / per_v, src_row, src_head, slot,
                                          n, d_v);
        return;
    }
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
