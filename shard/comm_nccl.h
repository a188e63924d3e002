/* The NCCL data plane of uc_comm (GPU tensor parallelism). MPI stays the control plane: it
 * carries the NCCL unique id from rank 0 to the others. */
#ifndef UC_SHARD_COMM_NCCL_H
#define UC_SHARD_COMM_NCCL_H

#include "base/status.h"
#include "comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Creates an NCCL communicator over every rank of `c` on CUDA device `device` (the backend's
 * be->device_index) and installs it as c's data plane, so uc_comm_dp_allreduce_sum runs
 * ncclAllReduce (bf16, f32, f64) in place on the caller's stream. A watchdog thread polls the
 * enqueued collectives (an event after each) and ncclCommGetAsyncError; a collective that makes
 * no progress for c's timeout, or an asynchronous NCCL error, is logged with the rank and the
 * collective number and ends the job (ncclCommAbort, then MPI_Abort). Sets NCCL_NVLS_ENABLE=0
 * unless the environment sets it. Collective: every rank must call it, after creating its
 * backend and before the first data-plane all-reduce. With one rank it does nothing; a second
 * call on the same comm does nothing. The comm owns the data plane from then on (it is torn
 * down by uc_comm_destroy). UC_ERR_NCCL / UC_ERR_CUDA on failure. */
uc_status uc_comm_nccl_attach(struct uc_comm *c, int device);

#ifdef __cplusplus
}
#endif
#endif
