/* The gRPC server on rank 0 (gRPC C core, completion queues): the Inference, Admin and
 * grpc.health.v1.Health services of API.md, plus the Prometheus endpoint over HTTP. Requests go
 * to the scheduler; messages are decoded, validated and encoded by grpc_codec.h, and
 * protobuf-c structs never leave daemon/grpc_codec.c. */
#ifndef UC_DAEMON_SERVER_H
#define UC_DAEMON_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "base/util.h"
#include "metrics.h"
#include "sched.h"

#ifdef __cplusplus
extern "C" {
#endif

enum uc_server_state {
    UC_SERVER_LOADING = 0,
    UC_SERVER_SERVING = 1,
    UC_SERVER_DRAINING = 2,
    UC_SERVER_STOPPED = 3,
};
const char *uc_server_state_name(enum uc_server_state s);

/* What every rank reported at start-up (for GetServerInfo and the # Cluster section). */
struct uc_rank_info {
    int rank;
    char host[64];
    char device[128];
    uint64_t weight_bytes;
    uint64_t kv_bytes;
};

struct uc_cluster_info {
    int tp_size;
    struct uc_rank_info *ranks; /* (tp_size) */
    char backend[16];
    char build[256];            /* "backend=cpu mpi=Open MPI 4.1.4 ..." */
    char version[32];
    char model_path[1024];
};

struct uc_server_params {
    const char *listen;        /* HOST:PORT */
    const char *tls_cert;      /* PEM files; both NULL = insecure (loopback use) */
    const char *tls_key;
    int metrics_port;          /* 0 = no HTTP endpoint */
    int64_t max_message_bytes;
    int64_t drain_timeout_ms;
    struct uc_sched *sched;
    struct metrics *metrics;
    struct uc_engine *engine;  /* read-only: config; profile through the scheduler */
    const struct uc_tokenizer *tok;
    const struct uc_cluster_info *cluster;
    const struct uc_auth *auth; /* API keys (auth.h); NULL = open */
    const struct uc_chat_template *chat; /* Inference.Chat; NULL = FAILED_PRECONDITION */
    const char *send_trace_path; /* a JSON line per streamed chunk of Generate/Chat (NULL: none) */
    /* writes the "# Config" section of the INFO text */
    void (*write_config_info)(void *user, struct uc_buf *b);
    void *config_user;
    /* called (from a server thread) once a Drain, from Admin.Drain or uc_server_drain, has
     * finished: the daemon then stops */
    void (*on_drained)(void *user);
    void *drained_user;
};

struct uc_server;
struct uc_auth;
struct uc_chat_template;

/* Binds and starts serving (state LOADING until uc_server_set_state). A port that cannot be
 * bound is UC_ERR_IO with the address in the message. */
uc_status uc_server_create(struct uc_server **out, const struct uc_server_params *p);
/* Health follows the state: SERVING only in UC_SERVER_SERVING. */
void uc_server_set_state(struct uc_server *s, enum uc_server_state st);
enum uc_server_state uc_server_get_state(struct uc_server *s);
/* Starts a drain on a server thread (SIGTERM path): NOT_SERVING, UNAVAILABLE for new requests,
 * in-flight requests finish up to drain_timeout_ms, then on_drained runs. */
void uc_server_drain(struct uc_server *s);
/* Stops accepting, cancels what is left, joins the threads, frees everything. */
void uc_server_destroy(struct uc_server *s);

#ifdef __cplusplus
}
#endif
#endif
