/* uc_comm over MPI: nonblocking collectives polled against a deadline (the watchdog), with a
 * short spin and then sleeps so oversubscribed ranks do not starve each other. */
#include "comm.h"

#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"

struct uc_comm {
    int rank;
    int size;
    int64_t timeout_ms;
    int64_t step;
    char host[256];
    bool owns_mpi;
    MPI_Comm side;      /* the watchdog's side channel: "are you there?" pings and answers */
    const struct uc_comm_dp_ops *dp;
    void *dp_ctx;
};

static void abort_hook(void *user)
{
    struct uc_comm *c = user;
    if (c->dp && c->dp->abort) {
        c->dp->abort(c->dp_ctx);
    }
    MPI_Abort(MPI_COMM_WORLD, 134);
}

/* OpenMP threads spin after every parallel region by default; ranks that share cores (and the
 * OpenBLAS calls that share the OpenMP pool) then burn the cycles the others need. libgomp reads
 * its wait policy only at start-up, so a process started without one is re-executed once with
 * OMP_WAIT_POLICY=PASSIVE (a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept). */
static void set_wait_policy(char **argv)
{
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || !argv || !argv[0]) {
        return;
    }
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the default policy */
}

uc_status uc_comm_create(struct uc_comm **out, int *argc, char ***argv, int64_t timeout_ms)
{
    *out = NULL;
    set_wait_policy(argv ? *argv : NULL);
    struct uc_comm *c = uc_calloc(1, sizeof *c);
    if (!c) {
        return UC_ERRF(UC_ERR_NOMEM, "comm");
    }
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            uc_free(c);
            return UC_ERRF(UC_ERR_MPI, "MPI_Init_thread failed");
        }
        c->owns_mpi = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->size);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    c->side = MPI_COMM_NULL;
    if (c->size > 1 && MPI_Comm_dup(MPI_COMM_WORLD, &c->side) != MPI_SUCCESS) {
        c->side = MPI_COMM_NULL; /* the watchdog then cannot name the stuck rank */
    }
    gethostname(c->host, sizeof c->host - 1);
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 30000;
    if (c->size > 1) {
        uc_log_set_rank(c->rank);
    }
    uc_set_abort_hook(abort_hook, c);
    *out = c;
    return UC_OK;
}

void uc_comm_destroy(struct uc_comm *c)
{
    if (!c) {
        return;
    }
    uc_set_abort_hook(NULL, NULL);
    if (c->dp && c->dp->destroy) {
        c->dp->destroy(c->dp_ctx);
    }
    int fin_side = 0;
    MPI_Finalized(&fin_side);
    if (c->side != MPI_COMM_NULL && !fin_side) {
        MPI_Comm_free(&c->side);
    }
    if (c->owns_mpi) {
        int fin = 0;
        MPI_Finalized(&fin);
        if (!fin) {
            MPI_Finalize();
        }
    }
    uc_free(c);
}

int uc_comm_rank(const struct uc_comm *c) { return c ? c->rank : 0; }
int uc_comm_size(const struct uc_comm *c) { return c ? c->size : 1; }
const char *uc_comm_host(const struct uc_comm *c) { return c->host; }
void uc_comm_set_timeout(struct uc_comm *c, int64_t timeout_ms) { c->timeout_ms = timeout_ms; }
int64_t uc_comm_timeout_ms(const struct uc_comm *c) { return c->timeout_ms; }
void uc_comm_set_step(struct uc_comm *c, int64_t step) { c->step = step; }

void uc_comm_set_data_plane(struct uc_comm *c, const struct uc_comm_dp_ops *ops, void *ctx)
{
    if (c->dp && c->dp->destroy) {
        c->dp->destroy(c->dp_ctx);
    }
    c->dp = ops;
    c->dp_ctx = ctx;
}

void uc_comm_abort(struct uc_comm *c, int code)
{
    uc_set_abort_hook(NULL, NULL);
    if (c && c->dp && c->dp->abort) {
        c->dp->abort(c->dp_ctx);
    }
    MPI_Abort(MPI_COMM_WORLD, code);
    _exit(code); /* MPI_Abort does not return; keep the compiler sure of it */
}

/* The watchdog's side channel. A rank waiting in a collective answers pings with its step; the
 * rank whose watchdog fires pings every other rank and names those that do not answer (stopped,
 * dead, or stuck outside any collective) instead of only itself. */
enum { TAG_PING = 7101, TAG_PONG = 7102 };

static void answer_pings(struct uc_comm *c)
{
    if (c->side == MPI_COMM_NULL) {
        return;
    }
    for (;;) {
        int flag = 0;
        MPI_Status st;
        if (MPI_Iprobe(MPI_ANY_SOURCE, TAG_PING, c->side, &flag, &st) != MPI_SUCCESS || !flag) {
            return;
        }
        int64_t ping = 0, step = c->step;
        MPI_Recv(&ping, 1, MPI_INT64_T, st.MPI_SOURCE, TAG_PING, c->side, MPI_STATUS_IGNORE);
        MPI_Request r;
        if (MPI_Isend(&step, 1, MPI_INT64_T, st.MPI_SOURCE, TAG_PONG, c->side, &r) ==
            MPI_SUCCESS) {
            MPI_Request_free(&r); /* eager: a one-word message is buffered at once */
        }
    }
}

/* Writes the ranks that did not answer a ping within wait_ms into out ("1" or "1,3"), and
 * returns how many. */
static int find_silent(struct uc_comm *c, int64_t wait_ms, char *out, size_t out_size)
{
    out[0] = '\0';
    if (c->side == MPI_COMM_NULL) {
        snprintf(out, out_size, "unknown (no side channel)");
        return -1;
    }
    int n = c->size;
    MPI_Request *rq = uc_calloc((size_t)n * 2, sizeof *rq);
    int64_t *pong = uc_calloc((size_t)n, sizeof *pong);
    int *got = uc_calloc((size_t)n, sizeof *got);
    if (!rq || !pong || !got) {
        uc_free(rq);
        uc_free(pong);
        uc_free(got);
        snprintf(out, out_size, "unknown (out of memory)");
        return -1;
    }
    static int64_t ping_word;
    for (int r = 0; r < n; r++) {
        rq[r] = rq[n + r] = MPI_REQUEST_NULL;
        if (r == c->rank) {
            got[r] = 1;
            continue;
        }
        MPI_Irecv(&pong[r], 1, MPI_INT64_T, r, TAG_PONG, c->side, &rq[r]);
        MPI_Isend(&ping_word, 1, MPI_INT64_T, r, TAG_PING, c->side, &rq[n + r]);
    }
    int64_t deadline = uc_time_ms() + wait_ms;
    int missing = n - 1;
    while (missing > 0 && uc_time_ms() < deadline) {
        answer_pings(c); /* another rank may be asking the same of us */
        for (int r = 0; r < n; r++) {
            int flag = 0;
            if (!got[r] && MPI_Test(&rq[r], &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag) {
                got[r] = 1;
                missing--;
            }
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    size_t len = 0;
    for (int r = 0; r < n; r++) {
        if (!got[r] && len + 16 < out_size) {
            len += (size_t)snprintf(out + len, out_size - len, "%s%d", len ? "," : "", r);
        }
    }
    /* the job is aborted next: the requests are left to MPI_Abort */
    uc_free(pong);
    uc_free(got);
    uc_free(rq);
    return missing;
}

/* Polls a request until it completes or the watchdog fires (then the job is aborted). */
static uc_status wait_req(struct uc_comm *c, MPI_Request *req, const char *what)
{
    int64_t deadline = uc_time_ms() + c->timeout_ms;
    int done = 0;
    int64_t spins = 0;
    long sleep_ns = 2000;
    for (;;) {
        if (MPI_Test(req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
            UC_LOG_ERROR("comm: collective=%s failed rank=%d step=%lld", what, c->rank,
                         (long long)c->step);
            uc_comm_abort(c, 135);
        }
        if (done) {
            return UC_OK;
        }
        if (++spins < 200) {
            continue;
        }
        answer_pings(c);
        if (uc_time_ms() > deadline) {
            char silent[256];
            int64_t wait_ms = c->timeout_ms / 4 < 2000 ? c->timeout_ms / 4 : 2000;
            int k = find_silent(c, wait_ms, silent, sizeof silent);
            UC_LOG_ERROR("comm: watchdog: collective=%s timed out after %lld ms on rank=%d "
                         "step=%lld; %s%s%s; aborting the job",
                         what, (long long)c->timeout_ms, c->rank, (long long)c->step,
                         k == 0 ? "every rank answers (a collective mismatch?)"
                                : "stuck or dead: rank=",
                         k == 0 ? "" : silent,
                         k > 0 ? " (did not answer the watchdog's ping)" : "");
            uc_comm_abort(c, 124);
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 500000) {
            sleep_ns *= 2;
        }
    }
}

static MPI_Datatype mpi_type(enum uc_comm_dtype dt)
{
    switch (dt) {
    case UC_COMM_F32: return MPI_FLOAT;
    case UC_COMM_F64: return MPI_DOUBLE;
    case UC_COMM_U64: return MPI_UINT64_T;
    case UC_COMM_I64: return MPI_INT64_T;
    case UC_COMM_BF16: break;
    }
    return MPI_DATATYPE_NULL;
}

static uc_status allreduce(struct uc_comm *c, void *buf, int64_t n, enum uc_comm_dtype dt,
                           MPI_Op op, const char *what)
{
    if (c->size == 1 || n == 0) {
        return UC_OK;
    }
    MPI_Datatype t = mpi_type(dt);
    if (t == MPI_DATATYPE_NULL || n > INT32_MAX) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "collective=%s dtype=%d n=%lld", what, (int)dt,
                       (long long)n);
    }
    MPI_Request req;
    if (MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, t, op, MPI_COMM_WORLD, &req) != MPI_SUCCESS) {
        return UC_ERRF(UC_ERR_MPI, "collective=%s could not start", what);
    }
    return wait_req(c, &req, what);
}

uc_status uc_comm_allreduce_sum(struct uc_comm *c, void *buf, int64_t n, enum uc_comm_dtype dt)
{
    return allreduce(c, buf, n, dt, MPI_SUM, "allreduce_sum");
}

uc_status uc_comm_allreduce_max(struct uc_comm *c, void *buf, int64_t n, enum uc_comm_dtype dt)
{
    return allreduce(c, buf, n, dt, MPI_MAX, "allreduce_max");
}

uc_status uc_comm_allgather(struct uc_comm *c, const void *send, void *recv, size_t bytes_each)
{
    if (c->size == 1) {
        if (recv != send) {
            memcpy(recv, send, bytes_each);
        }
        return UC_OK;
    }
    if (bytes_each > INT32_MAX) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "allgather bytes=%zu", bytes_each);
    }
    MPI_Request req;
    if (MPI_Iallgather(send, (int)bytes_each, MPI_BYTE, recv, (int)bytes_each, MPI_BYTE,
                       MPI_COMM_WORLD, &req) != MPI_SUCCESS) {
        return UC_ERRF(UC_ERR_MPI, "allgather could not start");
    }
    return wait_req(c, &req, "allgather");
}

uc_status uc_comm_bcast(struct uc_comm *c, void *buf, size_t size_bytes, int root)
{
    if (c->size == 1 || size_bytes == 0) {
        return UC_OK;
    }
    if (size_bytes > INT32_MAX) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "bcast bytes=%zu", size_bytes);
    }
    MPI_Request req;
    if (MPI_Ibcast(buf, (int)size_bytes, MPI_BYTE, root, MPI_COMM_WORLD, &req) != MPI_SUCCESS) {
        return UC_ERRF(UC_ERR_MPI, "bcast could not start");
    }
    return wait_req(c, &req, "bcast");
}

uc_status uc_comm_barrier(struct uc_comm *c)
{
    if (c->size == 1) {
        return UC_OK;
    }
    MPI_Request req;
    if (MPI_Ibarrier(MPI_COMM_WORLD, &req) != MPI_SUCCESS) {
        return UC_ERRF(UC_ERR_MPI, "barrier could not start");
    }
    return wait_req(c, &req, "barrier");
}

uc_status uc_comm_agree_u64(struct uc_comm *c, uint64_t value, const char *what, int *all_equal)
{
    uint64_t mx = value, mn = ~value; /* max of ~v gives ~min(v) */
    uc_status rc = uc_comm_allreduce_max(c, &mx, 1, UC_COMM_U64);
    if (rc == UC_OK) {
        rc = uc_comm_allreduce_max(c, &mn, 1, UC_COMM_U64);
    }
    if (rc != UC_OK) {
        return rc;
    }
    *all_equal = (mx == value && ~mn == value) ? 1 : 0;
    if (!*all_equal) {
        UC_LOG_ERROR("comm: ranks disagree on %s (rank=%d has %016llx, min %016llx max %016llx)",
                     what, c->rank, (unsigned long long)value, (unsigned long long)~mn,
                     (unsigned long long)mx);
    }
    return UC_OK;
}

uc_status uc_comm_dp_allreduce_sum(struct uc_comm *c, void *buf, int64_t n, enum uc_comm_dtype dt,
                                   void *stream)
{
    if (c->size == 1) {
        return UC_OK;
    }
    if (c->dp) {
        return c->dp->allreduce_sum(c->dp_ctx, buf, n, dt, stream, c->timeout_ms);
    }
    return allreduce(c, buf, n, dt, MPI_SUM, "dp_allreduce_sum");
}
