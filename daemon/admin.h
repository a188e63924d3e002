/* The redis-INFO-style status text behind GetStats.text and `uncompctl info`: "# Section" headers
 * followed by key:value lines. Built on rank 0 from what it already holds (metrics, scheduler
 * counts, the cluster info gathered at start-up, the engine's constant configuration), never from
 * a collective, so a stuck rank cannot stall it. */
#ifndef UC_DAEMON_ADMIN_H
#define UC_DAEMON_ADMIN_H

#include <stdbool.h>
#include <stdint.h>

#include "base/util.h"
#include "server.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of gRPC status codes counted in the # Errors section (OK .. UNAUTHENTICATED). */
#define UC_ADMIN_N_CODES 17

/* Everything the text is built from; every pointer may be NULL (its lines are left out). */
struct uc_admin_src {
    const struct uc_cluster_info *cluster;
    struct uc_engine *engine;       /* constant facts only: config, sizes */
    const struct uc_tokenizer *tok;
    struct uc_sched *sched;         /* counts and the default compression (thread-safe calls) */
    struct metrics *metrics;
    const char *state;              /* "SERVING", ... */
    double uptime_s;
    const char *listen;
    int metrics_port;
    bool tls;
    int64_t calls_active;           /* gRPC calls in progress */
    const uint64_t *errors_by_code; /* (UC_ADMIN_N_CODES) replies per gRPC status code */
    void (*write_config_info)(void *user, struct uc_buf *b);
    void *config_user;
};

/* Whether `section` names a section ("" and "all" and "everything" mean all of them;
 * case-insensitive). */
bool uc_admin_section_known(const char *section);
/* Appends the sections (all, or the one named; case-insensitive) to b. */
void uc_admin_info(struct uc_buf *b, const struct uc_admin_src *src, const char *section);
/* The gRPC status code name for the # Errors section ("INVALID_ARGUMENT"). */
const char *uc_admin_code_name(int code);

#ifdef __cplusplus
}
#endif
#endif
