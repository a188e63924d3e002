/* cuda_lt: prefill-sized products on cuBLASLt, with the algorithm chosen for the sustained,
 * power-capped load a serving GPU runs under rather than cuBLAS's first pick (cuda_lt.c). */
#ifndef UC_SHARD_CUDA_LT_H
#define UC_SHARD_CUDA_LT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include "base/status.h"

struct uc_cuda_lt;

/* A chooser for products in bf16 (fp32 activations keep cublasGemmEx) sharing the caller's
 * cuBLAS workspace (the same stream orders their uses); *out stays NULL where the device is not
 * a Hopper or UC_CUDA_LT_TILES=0 turns it off. */
uc_status uc_cuda_lt_init(struct uc_cuda_lt **out, int sm_major, void *ws, size_t ws_bytes);
void uc_cuda_lt_fini(struct uc_cuda_lt *lt);

/* y (T, N) = x (T, K) w^T + beta y (beta 0 or 1), row-major bf16, on stream st, where this
 * shape has a preferred algorithm: *done says whether it ran (false: use cublasGemmEx). */
uc_status uc_cuda_lt_product(struct uc_cuda_lt *lt, cudaStream_t st, void *y, const void *x,
                             const void *w, int64_t n_tok, int64_t n_out, int64_t n_in,
                             float beta, bool *done);

/* The tile id (cublasLt's CUBLASLT_MATMUL_TILE_*) chosen for a shape whose operands are
 * `align`-byte aligned (256 at most), 0 where none is: for the op checks. */
int uc_cuda_lt_tile(struct uc_cuda_lt *lt, int64_t n_tok, int64_t n_out, int64_t n_in,
                    float beta, uint32_t align);

#endif
