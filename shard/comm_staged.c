/* uc_comm's host-staged data plane for the CUDA backend: each all-reduce copies the device
 * buffer to pinned host memory on the caller's stream, waits for it, sums over MPI in float32
 * (bf16 widened exactly, the sum rounded once to nearest even on the way back; float32 and
 * float64 as they are) and copies the result back on the stream. It needs neither NCCL nor a GPU
 * of its own per rank, so ranks can share one device; it is slower than NCCL (a host round trip
 * a collective) and is chosen with UC_CUDA_DATA_PLANE=mpi. The MPI collective carries the comm's
 * watchdog like every host collective. */
#include "comm_staged.h"

#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "cuda_status.h"

struct staged_dp {
    struct uc_comm *comm;
    int device;
    void *pinned;     /* the device buffer's bytes */
    float *wide;      /* bf16 widened to float32 for the MPI sum */
    size_t cap_bytes; /* of pinned; wide holds cap_bytes / 2 floats */
};

static size_t dtype_bytes(enum uc_comm_dtype dt)
{
    switch (dt) {
    case UC_COMM_BF16:
        return 2;
    case UC_COMM_F32:
        return 4;
    case UC_COMM_F64:
        return 8;
    default:
        return 0;
    }
}

/* Room for `bytes` of the device buffer (and, for bf16, its float32 widening). */
static uc_status reserve(struct staged_dp *d, size_t bytes)
{
    if (bytes <= d->cap_bytes) {
        return UC_OK;
    }
    size_t cap = d->cap_bytes ? d->cap_bytes : (size_t)1 << 20;
    while (cap < bytes) {
        cap *= 2;
    }
    if (d->pinned) {
        (void)cudaFreeHost(d->pinned);
        d->pinned = NULL;
    }
    uc_free(d->wide);
    d->cap_bytes = 0;
    uc_status rc = CU(cudaMallocHost(&d->pinned, cap));
    if (rc != UC_OK) {
        d->pinned = NULL;
        return rc;
    }
    d->wide = uc_malloc((cap / 2) * sizeof(float));
    if (!d->wide) {
        return UC_ERRF(UC_ERR_NOMEM, "staged data plane: %zu bytes", (cap / 2) * sizeof(float));
    }
    d->cap_bytes = cap;
    return UC_OK;
}

static uc_status dp_allreduce_sum(void *ctx, void *buf, int64_t n, enum uc_comm_dtype dt,
                                  void *stream, int64_t timeout_ms)
{
    (void)timeout_ms; /* the host collective below has the comm's own watchdog */
    struct staged_dp *d = ctx;
    size_t es = dtype_bytes(dt), bytes = (size_t)n * es;
    cudaStream_t st = (cudaStream_t)stream;
    uc_status rc;
    if (n <= 0) {
        return UC_OK;
    }
    if (es == 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "staged all-reduce of dtype %d", (int)dt);
    }
    UC_CHECK(reserve(d, bytes), rc, out);
    /* stream order also keeps this copy behind the previous call's copy back from `pinned` */
    UC_CHECK(CU(cudaMemcpyAsync(d->pinned, buf, bytes, cudaMemcpyDeviceToHost, st)), rc, out);
    UC_CHECK(CU(cudaStreamSynchronize(st)), rc, out);
    if (dt == UC_COMM_BF16) {
        const uc_bf16 *h = d->pinned;
        for (int64_t i = 0; i < n; i++) {
            d->wide[i] = uc_bf16_to_f32(h[i]);
        }
        UC_CHECK(uc_comm_allreduce_sum(d->comm, d->wide, n, UC_COMM_F32), rc, out);
        uc_bf16 *o = d->pinned;
        for (int64_t i = 0; i < n; i++) {
            o[i] = uc_f32_to_bf16(d->wide[i]);
        }
    } else {
        UC_CHECK(uc_comm_allreduce_sum(d->comm, d->pinned, n, dt), rc, out);
    }
    rc = CU(cudaMemcpyAsync(buf, d->pinned, bytes, cudaMemcpyHostToDevice, st));
out:
    return rc;
}

static void dp_destroy(void *ctx)
{
    struct staged_dp *d = ctx;
    if (!d) {
        return;
    }
    if (d->pinned) {
        (void)cudaSetDevice(d->device);
        (void)cudaDeviceSynchronize(); /* a last copy back may still read it */
        (void)cudaFreeHost(d->pinned);
    }
    uc_free(d->wide);
    uc_free(d);
}

static const struct uc_comm_dp_ops staged_ops = {
    .allreduce_sum = dp_allreduce_sum,
    .abort = NULL,
    .destroy = dp_destroy,
};

uc_status uc_comm_staged_attach(struct uc_comm *c, int device)
{
    if (uc_comm_size(c) <= 1) {
        return UC_OK;
    }
    struct staged_dp *d = uc_calloc(1, sizeof *d);
    if (!d) {
        return UC_ERRF(UC_ERR_NOMEM, "staged data plane");
    }
    d->comm = c;
    d->device = device;
    uc_comm_set_data_plane(c, &staged_ops, d);
    UC_LOG_INFO("comm: host-staged MPI data plane rank=%d of %d device=%d", uc_comm_rank(c),
                uc_comm_size(c), device);
    return UC_OK;
}
