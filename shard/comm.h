/* uc_comm: the collectives tensor parallelism needs, with a watchdog on every one. MPI is always
 * the control plane (bootstrap, step descriptors, config agreement, heartbeats); the data plane
 * (all-reduce/all-gather of activations) is MPI on CPU and NCCL on GPU (or, with
 * UC_CUDA_DATA_PLANE=mpi, MPI through pinned host memory: comm_staged.c). No call waits forever:
 * a peer that does not answer within the timeout aborts the whole job with a log line naming
 * the rank, the collective and the step. */
#ifndef UC_SHARD_COMM_H
#define UC_SHARD_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_comm;

enum uc_comm_dtype {
    UC_COMM_F32 = 0,
    UC_COMM_F64 = 1,
    UC_COMM_U64 = 2,
    UC_COMM_I64 = 3,
    UC_COMM_BF16 = 4, /* data plane on GPU only */
};

/* Initialises MPI (MPI_THREAD_FUNNELED; works without mpirun as a single rank) and returns the
 * world communicator. `timeout_ms` bounds every collective. */
uc_status uc_comm_create(struct uc_comm **out, int *argc, char ***argv, int64_t timeout_ms);
/* Finalises MPI. Safe with NULL. */
void uc_comm_destroy(struct uc_comm *c);

int uc_comm_rank(const struct uc_comm *c);
int uc_comm_size(const struct uc_comm *c);
/* Host name of this rank (for logs and GetServerInfo). */
const char *uc_comm_host(const struct uc_comm *c);
void uc_comm_set_timeout(struct uc_comm *c, int64_t timeout_ms);
int64_t uc_comm_timeout_ms(const struct uc_comm *c);
/* The step number shown in watchdog messages. */
void uc_comm_set_step(struct uc_comm *c, int64_t step);

/* Host-memory collectives over MPI (control plane, and the CPU data plane). */
uc_status uc_comm_allreduce_sum(struct uc_comm *c, void *buf, int64_t n, enum uc_comm_dtype dt);
uc_status uc_comm_allreduce_max(struct uc_comm *c, void *buf, int64_t n, enum uc_comm_dtype dt);
uc_status uc_comm_allgather(struct uc_comm *c, const void *send, void *recv, size_t bytes_each);
uc_status uc_comm_bcast(struct uc_comm *c, void *buf, size_t size_bytes, int root);
uc_status uc_comm_barrier(struct uc_comm *c);
/* Whether every rank passed the same 64-bit value (an all-reduce of min and max). */
uc_status uc_comm_agree_u64(struct uc_comm *c, uint64_t value, const char *what, int *all_equal);

/* Data plane on device buffers: all-reduce sum in place. On the CPU backend the buffer is host
 * memory and MPI carries it; on CUDA the NCCL communicator attached with uc_comm_attach_nccl
 * does, on the given stream. */
uc_status uc_comm_dp_allreduce_sum(struct uc_comm *c, void *buf, int64_t n, enum uc_comm_dtype dt,
                                   void *stream);

/* Data-plane hooks a GPU backend installs (comm_nccl.c). */
struct uc_comm_dp_ops {
    uc_status (*allreduce_sum)(void *ctx, void *buf, int64_t n, enum uc_comm_dtype dt, void *stream,
                               int64_t timeout_ms);
    void (*abort)(void *ctx);
    void (*destroy)(void *ctx);
};
void uc_comm_set_data_plane(struct uc_comm *c, const struct uc_comm_dp_ops *ops, void *ctx);

/* Aborts the whole job now (MPI_Abort after aborting the data plane). */
void uc_comm_abort(struct uc_comm *c, int code) __attribute__((noreturn));

#ifdef __cplusplus
}
#endif
#endif
