/* uc_status: the error codes every action returns, and the macros that log an error once, at
 * its origin, and jump to a cleanup label. Part of uc_base; no other dependency. */
#ifndef UC_BASE_STATUS_H
#define UC_BASE_STATUS_H

/* `restrict` for headers that C++ (and CUDA) code includes too. */
#ifdef __cplusplus
#define UC_RESTRICT __restrict__
#else
#define UC_RESTRICT restrict
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum uc_status {
    UC_OK = 0,
    UC_ERR_INVALID_ARG = -1,
    UC_ERR_NOMEM = -2,
    UC_ERR_DEVICE_NOMEM = -3,
    UC_ERR_KV_FULL = -4, /* retryable: the KV pool cannot hold it now */
    UC_ERR_IO = -5,
    UC_ERR_FORMAT = -6,
    UC_ERR_UNSUPPORTED = -7,
    UC_ERR_TIMEOUT = -8,
    UC_ERR_CANCELLED = -9,
    UC_ERR_UNAVAILABLE = -10, /* draining or shutting down */
    UC_ERR_CUDA = -11,
    UC_ERR_NCCL = -12,
    UC_ERR_MPI = -13,
    UC_ERR_INTERNAL = -14,
} uc_status;

/* Returns a static, human-readable name for a status ("UC_ERR_FORMAT"). */
const char *uc_status_str(uc_status st);

/* Logs "func: message" at ERROR with file:line and returns `st`. Used through UC_ERRF. */
uc_status uc_error_at(uc_status st, const char *file, int line, const char *func, const char *fmt,
                      ...) __attribute__((format(printf, 5, 6)));

/* Logs the error once, where it happens, and evaluates to the status code. */
#define UC_ERRF(st, ...) uc_error_at((st), __FILE__, __LINE__, __func__, __VA_ARGS__)

/* Evaluates `e`; on failure stores the status in `rc` and jumps to `label`. */
#define UC_CHECK(e, rc, label)                                                                     \
    do {                                                                                           \
        (rc) = (e);                                                                                \
        if ((rc) != UC_OK) {                                                                       \
            goto label;                                                                            \
        }                                                                                          \
    } while (0)

/* A broken invariant: logs condition, rank and host, runs the abort hook (which aborts every
 * communicator and the MPI job), then aborts. Stays on under NDEBUG. */
void uc_fatal_at(const char *file, int line, const char *func, const char *fmt, ...)
    __attribute__((format(printf, 4, 5), noreturn));
#define UC_FATAL(...) uc_fatal_at(__FILE__, __LINE__, __func__, __VA_ARGS__)
#define UC_ASSERT(cond)                                                                            \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            uc_fatal_at(__FILE__, __LINE__, __func__, "assertion failed: %s", #cond);              \
        }                                                                                          \
    } while (0)

/* Registers the hook UC_FATAL runs before abort() (uc_comm installs MPI_Abort here). */
void uc_set_abort_hook(void (*hook)(void *user), void *user);

#ifdef __cplusplus
}
#endif
#endif
