/* Log lines: "pid:rN 2025-06-01T12:00:00.123Z W message", to stderr or a registered sink. */
#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum uc_log_level uc_log_level_current = UC_LOG_LEVEL_NOTICE;

static uc_log_sink_fn sink_fn;
static void *sink_user;
static int log_rank = -1;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

void uc_log_set_level(enum uc_log_level level) { uc_log_level_current = level; }

bool uc_log_level_parse(const char *name, enum uc_log_level *out)
{
    static const char *names[] = {"error", "warn", "notice", "info", "debug"};
    for (int i = 0; i < 5; i++) {
        if (strcmp(name, names[i]) == 0) {
            *out = (enum uc_log_level)i;
            return true;
        }
    }
    return false;
}

void uc_log_set_sink(uc_log_sink_fn fn, void *user)
{
    pthread_mutex_lock(&log_lock);
    sink_fn = fn;
    sink_user = user;
    pthread_mutex_unlock(&log_lock);
}

void uc_log_set_rank(int rank) { log_rank = rank; }

int uc_log_rank(void) { return log_rank; }

void uc_log_write(enum uc_log_level level, const char *fmt, ...)
{
    static const char letters[] = "EWNID";
    char line[2048];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    int n;
    if (log_rank >= 0) {
        n = snprintf(line, sizeof line, "%d:r%d ", (int)getpid(), log_rank);
    } else {
        n = snprintf(line, sizeof line, "%d ", (int)getpid());
    }
    n += (int)strftime(line + n, sizeof line - (size_t)n, "%Y-%m-%dT%H:%M:%S", &tm);
    n += snprintf(line + n, sizeof line - (size_t)n, ".%03dZ %c ", (int)(tv.tv_usec / 1000),
                  letters[level]);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&log_lock);
    if (sink_fn) {
        sink_fn(level, line, sink_user);
    } else {
        fprintf(stderr, "%s\n", line);
        fflush(stderr);
    }
    pthread_mutex_unlock(&log_lock);
}
