/* Logging: leveled, key=value lines on stderr (or a sink), prefixed with pid, rank and a UTC
 * timestamp, in the style of redis's serverLog. Arguments are evaluated only when the level is on. */
#ifndef UC_BASE_LOG_H
#define UC_BASE_LOG_H

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

enum uc_log_level {
    UC_LOG_LEVEL_ERROR = 0,
    UC_LOG_LEVEL_WARN = 1,
    UC_LOG_LEVEL_NOTICE = 2,
    UC_LOG_LEVEL_INFO = 3,
    UC_LOG_LEVEL_DEBUG = 4,
};

typedef void (*uc_log_sink_fn)(enum uc_log_level level, const char *line, void *user);

extern enum uc_log_level uc_log_level_current;

/* Sets the most verbose level that is printed. */
void uc_log_set_level(enum uc_log_level level);
/* Parses "error|warn|notice|info|debug"; returns false for anything else. */
bool uc_log_level_parse(const char *name, enum uc_log_level *out);
/* Routes every line to `fn` instead of stderr (NULL restores stderr). */
void uc_log_set_sink(uc_log_sink_fn fn, void *user);
/* Sets the rank shown in the prefix ("r0"); -1 shows no rank. */
void uc_log_set_rank(int rank);
int uc_log_rank(void);
/* Formats and emits one line. Use the UC_LOG_* macros instead. */
void uc_log_write(enum uc_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define UC_LOG_AT(lvl, ...)                                                                        \
    do {                                                                                           \
        if ((lvl) <= uc_log_level_current) {                                                       \
            uc_log_write((lvl), __VA_ARGS__);                                                      \
        }                                                                                          \
    } while (0)
#define UC_LOG_ERROR(...) UC_LOG_AT(UC_LOG_LEVEL_ERROR, __VA_ARGS__)
#define UC_LOG_WARN(...) UC_LOG_AT(UC_LOG_LEVEL_WARN, __VA_ARGS__)
#define UC_LOG_NOTICE(...) UC_LOG_AT(UC_LOG_LEVEL_NOTICE, __VA_ARGS__)
#define UC_LOG_INFO(...) UC_LOG_AT(UC_LOG_LEVEL_INFO, __VA_ARGS__)
#define UC_LOG_DEBUG(...) UC_LOG_AT(UC_LOG_LEVEL_DEBUG, __VA_ARGS__)
/* Logs on rank 0 only (or when no rank is set). */
#define UC_LOG0(lvl, ...)                                                                          \
    do {                                                                                           \
        if (uc_log_rank() <= 0) {                                                                  \
            UC_LOG_AT((lvl), __VA_ARGS__);                                                         \
        }                                                                                          \
    } while (0)
#define UC_LOG_WARN_ONCE(...)                                                                      \
    do {                                                                                           \
        static bool uc_warned_once_;                                                               \
        if (!uc_warned_once_) {                                                                    \
            uc_warned_once_ = true;                                                                \
            UC_LOG_WARN(__VA_ARGS__);                                                              \
        }                                                                                          \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
