/* A host-staged data plane of uc_comm for the CUDA backend (UC_CUDA_DATA_PLANE=mpi): MPI carries
 * the activations through pinned host memory instead of NCCL, so tensor parallelism runs where
 * NCCL cannot (ranks sharing one GPU, e.g. a tp 2 check on a one-GPU host). */
#ifndef UC_SHARD_COMM_STAGED_H
#define UC_SHARD_COMM_STAGED_H

#include "base/status.h"
#include "comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Installs the host-staged data plane on `c` for device buffers of CUDA device `device`: each
 * uc_comm_dp_allreduce_sum copies the buffer to pinned host memory on the caller's stream, waits,
 * sums over MPI (bf16 in float32, rounded once to nearest even; f32, f64 as they are) and copies
 * it back on the stream. Every rank must install the same data plane (the engine agrees on it
 * first). With one rank it does nothing. UC_ERR_NOMEM on failure. */
uc_status uc_comm_staged_attach(struct uc_comm *c, int device);

#ifdef __cplusplus
}
#endif
#endif
