/* uc_status names, error logging at the origin, and the fatal path with its abort hook. */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "log.h"

static void (*abort_hook)(void *user);
static void *abort_hook_user;

const char *uc_status_str(uc_status st)
{
    switch (st) {
    case UC_OK: return "UC_OK";
    case UC_ERR_INVALID_ARG: return "UC_ERR_INVALID_ARG";
    case UC_ERR_NOMEM: return "UC_ERR_NOMEM";
    case UC_ERR_DEVICE_NOMEM: return "UC_ERR_DEVICE_NOMEM";
    case UC_ERR_KV_FULL: return "UC_ERR_KV_FULL";
    case UC_ERR_IO: return "UC_ERR_IO";
    case UC_ERR_FORMAT: return "UC_ERR_FORMAT";
    case UC_ERR_UNSUPPORTED: return "UC_ERR_UNSUPPORTED";
    case UC_ERR_TIMEOUT: return "UC_ERR_TIMEOUT";
    case UC_ERR_CANCELLED: return "UC_ERR_CANCELLED";
    case UC_ERR_UNAVAILABLE: return "UC_ERR_UNAVAILABLE";
    case UC_ERR_CUDA: return "UC_ERR_CUDA";
    case UC_ERR_NCCL: return "UC_ERR_NCCL";
    case UC_ERR_MPI: return "UC_ERR_MPI";
    case UC_ERR_INTERNAL: return "UC_ERR_INTERNAL";
    }
    return "UC_ERR_UNKNOWN";
}

uc_status uc_error_at(uc_status st, const char *file, int line, const char *func, const char *fmt,
                      ...)
{
    if (UC_LOG_LEVEL_ERROR <= uc_log_level_current) {
        char msg[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        uc_log_write(UC_LOG_LEVEL_ERROR, "%s: %s (%s at %s:%d)", func, msg, uc_status_str(st), file,
                     line);
    }
    return st;
}

void uc_set_abort_hook(void (*hook)(void *user), void *user)
{
    abort_hook = hook;
    abort_hook_user = user;
}

void uc_fatal_at(const char *file, int line, const char *func, const char *fmt, ...)
{
    char msg[1024];
    char host[256] = "?";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    gethostname(host, sizeof host - 1);
    uc_log_write(UC_LOG_LEVEL_ERROR, "FATAL %s: %s rank=%d host=%s (%s:%d)", func, msg,
                 uc_log_rank(), host, file, line);
    if (abort_hook) {
        void (*hook)(void *) = abort_hook;
        abort_hook = NULL;
        hook(abort_hook_user);
    }
    abort();
}
