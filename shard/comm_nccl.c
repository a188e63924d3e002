/* uc_comm's NCCL data plane: an NCCL communicator bootstrapped over MPI (rank 0's unique id goes
 * out with uc_comm_bcast), all-reduce on the backend's stream, and a watchdog thread. Each
 * enqueued all-reduce records an event into a ring; the watchdog retires completed events and
 * aborts the job when the oldest pending one has made no progress for the comm timeout, or when
 * NCCL reports an asynchronous error. It also bounds ncclCommInitRank (a peer that never joins).
 * Abort order: ncclCommAbort (the comm's data-plane abort hook), then MPI_Abort. */
#include "comm_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "cuda_status.h"

#define RING 256         /* collectives in flight the watchdog tracks */
#define POLL_NS 5000000L /* watchdog period: 5 ms */

struct nccl_dp {
    struct uc_comm *comm;
    ncclComm_t nc;
    int device;
    int rank;
    int n_ranks;
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu; /* everything below */
    bool stop;
    bool init_pending;
    int64_t init_start_ms;
    int64_t timeout_ms;
    cudaEvent_t ev[RING];
    int64_t enq_ms[RING];
    int64_t head;        /* collectives recorded */
    int64_t tail;        /* collectives seen complete */
    int64_t progress_ms; /* when the tail last moved or the ring became non-empty */
};

static struct uc_comm *attached_comm; /* the comm whose data plane this file installed */

static uc_status nccl_status(ncclResult_t r, const char *expr, const char *file, int line,
                             const char *func)
{
    if (r == ncclSuccess) {
        return UC_OK;
    }
    return uc_error_at(UC_ERR_NCCL, file, line, func, "%s: %s (%s)", expr, ncclGetErrorString(r),
                       ncclGetLastError(NULL));
}
#define NCCL(e) nccl_status((e), #e, __FILE__, __LINE__, __func__)

/* Retires completed events from the tail. Caller holds mu. */
static void retire(struct nccl_dp *d, int64_t now)
{
    while (d->tail < d->head) {
        cudaError_t e = cudaEventQuery(d->ev[d->tail % RING]);
        if (e == cudaErrorNotReady) {
            break;
        }
        d->tail++;
        d->progress_ms = now;
    }
}

static void *watchdog(void *arg)
{
    struct nccl_dp *d = arg;
    (void)cudaSetDevice(d->device);
    for (;;) {
        struct timespec ts = {0, POLL_NS};
        nanosleep(&ts, NULL);
        int64_t now = uc_time_ms();
        pthread_mutex_lock(&d->mu);
        if (d->stop) {
            pthread_mutex_unlock(&d->mu);
            return NULL;
        }
        const char *why = NULL;
        char msg[256];
        if (d->init_pending) {
            if (now - d->init_start_ms > d->timeout_ms) {
                snprintf(msg, sizeof msg, "ncclCommInitRank did not finish in %lld ms",
                         (long long)d->timeout_ms);
                why = msg;
            }
        } else {
            ncclResult_t ar = ncclSuccess;
            if (ncclCommGetAsyncError(d->nc, &ar) == ncclSuccess && ar != ncclSuccess &&
                ar != ncclInProgress) {
                snprintf(msg, sizeof msg, "asynchronous NCCL error: %s", ncclGetErrorString(ar));
                why = msg;
            }
            retire(d, now);
            if (!why && d->tail < d->head) {
                int64_t since = d->enq_ms[d->tail % RING] > d->progress_ms
                                    ? d->enq_ms[d->tail % RING]
                                    : d->progress_ms;
                if (now - since > d->timeout_ms) {
                    snprintf(msg, sizeof msg,
                             "all-reduce #%lld made no progress for %lld ms (%lld pending; a "
                             "peer is stuck or dead)",
                             (long long)d->tail, (long long)(now - since),
                             (long long)(d->head - d->tail));
                    why = msg;
                }
            }
        }
        int64_t seq = d->tail;
        pthread_mutex_unlock(&d->mu);
        if (why) {
            UC_LOG_ERROR("comm: nccl watchdog: %s on rank=%d of %d collective=%lld; aborting the "
                         "job",
                         why, d->rank, d->n_ranks, (long long)seq);
            uc_comm_abort(d->comm, 124); /* runs dp_abort (ncclCommAbort), then MPI_Abort */
        }
    }
}

static ncclDataType_t nccl_type(enum uc_comm_dtype dt, bool *ok)
{
    *ok = true;
    switch (dt) {
    case UC_COMM_BF16: return ncclBfloat16;
    case UC_COMM_F32: return ncclFloat32;
    case UC_COMM_F64: return ncclFloat64;
    case UC_COMM_U64: return ncclUint64;
    case UC_COMM_I64: return ncclInt64;
    }
    *ok = false;
    return ncclFloat32;
}

static uc_status dp_allreduce_sum(void *ctx, void *buf, int64_t n, enum uc_comm_dtype dt,
                                  void *stream, int64_t timeout_ms)
{
    struct nccl_dp *d = ctx;
    bool ok;
    ncclDataType_t t = nccl_type(dt, &ok);
    if (!ok || n < 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "nccl allreduce dtype=%d n=%lld", (int)dt,
                       (long long)n);
    }
    if (n == 0) {
        return UC_OK;
    }
    cudaStream_t s = (cudaStream_t)stream;
    uc_status rc = NCCL(ncclAllReduce(buf, buf, (size_t)n, t, ncclSum, d->nc, s));
    if (rc != UC_OK) {
        return rc;
    }
    pthread_mutex_lock(&d->mu);
    d->timeout_ms = timeout_ms > 0 ? timeout_ms : d->timeout_ms;
    int64_t now = uc_time_ms();
    retire(d, now);
    while (d->head - d->tail >= RING) { /* ring full: wait for the oldest, watchdog still on */
        pthread_mutex_unlock(&d->mu);
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&d->mu);
        retire(d, uc_time_ms());
    }
    int slot = (int)(d->head % RING);
    rc = CU(cudaEventRecord(d->ev[slot], s));
    if (rc == UC_OK) {
        if (d->head == d->tail) {
            d->progress_ms = now;
        }
        d->enq_ms[slot] = now;
        d->head++;
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

static void dp_abort(void *ctx)
{
    struct nccl_dp *d = ctx;
    if (d && d->nc) {
        (void)ncclCommAbort(d->nc);
        d->nc = NULL;
    }
}

static void dp_destroy(void *ctx)
{
    struct nccl_dp *d = ctx;
    if (!d) {
        return;
    }
    if (d->thread_started) {
        pthread_mutex_lock(&d->mu);
        d->stop = true;
        pthread_mutex_unlock(&d->mu);
        pthread_join(d->thread, NULL);
    }
    (void)cudaSetDevice(d->device);
    if (d->nc) {
        (void)ncclCommDestroy(d->nc);
    }
    for (int i = 0; i < RING; i++) {
        if (d->ev[i]) {
            (void)cudaEventDestroy(d->ev[i]);
        }
    }
    pthread_mutex_destroy(&d->mu);
    if (attached_comm == d->comm) {
        attached_comm = NULL;
    }
    uc_free(d);
}

static const struct uc_comm_dp_ops nccl_ops = {
    .allreduce_sum = dp_allreduce_sum,
    .abort = dp_abort,
    .destroy = dp_destroy,
};

uc_status uc_comm_nccl_attach(struct uc_comm *c, int device)
{
    int n_ranks = uc_comm_size(c), rank = uc_comm_rank(c);
    if (n_ranks <= 1 || attached_comm == c) {
        return UC_OK;
    }
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    uc_status rc;
    struct nccl_dp *d = uc_calloc(1, sizeof *d);
    if (!d) {
        return UC_ERRF(UC_ERR_NOMEM, "nccl data plane");
    }
    d->comm = c;
    d->device = device;
    d->rank = rank;
    d->n_ranks = n_ranks;
    d->timeout_ms = uc_comm_timeout_ms(c);
    pthread_mutex_init(&d->mu, NULL);
    /* the id travels even when rank 0 failed to make one, so no rank waits for it forever */
    struct {
        int32_t ok;
        ncclUniqueId id;
    } boot;
    memset(&boot, 0, sizeof boot);
    UC_CHECK(CU(cudaSetDevice(device)), rc, out_destroy);
    for (int i = 0; i < RING; i++) {
        UC_CHECK(CU(cudaEventCreateWithFlags(&d->ev[i], cudaEventDisableTiming)), rc, out_destroy);
    }
    if (rank == 0) {
        boot.ok = NCCL(ncclGetUniqueId(&boot.id)) == UC_OK;
    }
    UC_CHECK(uc_comm_bcast(c, &boot, sizeof boot, 0), rc, out_destroy);
    if (!boot.ok) {
        rc = UC_ERRF(UC_ERR_NCCL, "rank 0 could not create the NCCL unique id");
        goto out_destroy;
    }
    d->init_pending = true;
    d->init_start_ms = uc_time_ms();
    if (pthread_create(&d->thread, NULL, watchdog, d) != 0) {
        rc = UC_ERRF(UC_ERR_INTERNAL, "nccl watchdog thread");
        goto out_destroy;
    }
    d->thread_started = true;
    ncclComm_t nc = NULL;
    rc = NCCL(ncclCommInitRank(&nc, n_ranks, boot.id, rank));
    pthread_mutex_lock(&d->mu);
    d->nc = nc;
    d->init_pending = false;
    pthread_mutex_unlock(&d->mu);
    if (rc != UC_OK) {
        goto out_destroy;
    }
    uc_comm_set_data_plane(c, &nccl_ops, d);
    attached_comm = c;
    UC_LOG_INFO("comm: nccl data plane rank=%d of %d device=%d NCCL_NVLS_ENABLE=%s", rank,
                n_ranks, device, getenv("NCCL_NVLS_ENABLE"));
    return UC_OK;
out_destroy:
    dp_destroy(d);
    return rc;
}
