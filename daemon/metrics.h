/* Counters and latency distributions of the daemon, behind GetStats, the INFO-style text and
 * the Prometheus endpoint. Updated by the scheduler thread, read by the gRPC and HTTP threads:
 * every function is thread-safe. */
#ifndef UC_DAEMON_METRICS_H
#define UC_DAEMON_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "base/util.h"

#ifdef __cplusplus
extern "C" {
#endif

enum metric_lat {
    METRIC_TTFT = 0,
    METRIC_ITL = 1,   /* inter-token latency */
    METRIC_E2E = 2,
    METRIC_QUEUE = 3,
    METRIC_PREFILL = 4,
    METRIC_SEND_LAG = 5, /* a token's emission to gRPC taking its message (grpc_server.c) */
    METRIC_LAT_COUNT = 6,
};

/* What an engine step carried (steps with neither, e.g. only frees, are not counted). */
enum metric_step {
    METRIC_STEP_DECODE = 0,  /* decode rows only */
    METRIC_STEP_PREFILL = 1, /* prompt slices only (requests' or calibration windows') */
    METRIC_STEP_MIXED = 2,   /* both */
    METRIC_STEP_KINDS = 3,
};

/* The kind's name ("decode", "prefill", "mixed"). */
const char *metrics_step_name(enum metric_step k);

struct metrics;

uc_status metrics_create(struct metrics **out);
void metrics_destroy(struct metrics *m);
/* The served model name, the model_name label of every Prometheus series (vLLM's
 * {model_name="..."}); "" or NULL = no label. */
void metrics_set_model_name(struct metrics *m, const char *name);

/* Events (policy: the compression policy name, for labelled series). */
void metrics_request_submitted(struct metrics *m);
void metrics_request_rejected(struct metrics *m);
void metrics_request_finished(struct metrics *m, const char *policy, bool ok, bool aborted,
                              int64_t prompt_tokens, int64_t completion_tokens,
                              int64_t kv_tokens_full, int64_t kv_tokens_kept,
                              int64_t rows_dropped, double compress_s);
void metrics_observe(struct metrics *m, enum metric_lat which, double seconds);
/* One engine step that ran, by what it carried. */
void metrics_step(struct metrics *m, enum metric_step kind);
/* Gauges, set by the scheduler every step. */
void metrics_set_gauges(struct metrics *m, int32_t running, int32_t waiting, double kv_usage);

struct metric_pct {
    double p50, p90, p99, mean, max; /* over the last RING_SAMPLES samples */
    uint64_t count;
};
struct metrics_snapshot {
    uint64_t requests_total, requests_finished, requests_failed, requests_aborted,
        requests_rejected;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t kv_tokens_full, kv_tokens_kept, rows_dropped;
    double compress_s;
    int32_t running, waiting;
    double kv_usage;
    struct metric_pct lat[METRIC_LAT_COUNT]; /* in seconds */
    uint64_t steps[METRIC_STEP_KINDS];
};
void metrics_snapshot(struct metrics *m, struct metrics_snapshot *out);
/* The Prometheus text exposition (uncomp:* series, each labelled model_name once set), appended
 * to b. */
void metrics_prometheus(struct metrics *m, struct uc_buf *b);
/* For series written elsewhere: a sample's name and labels, then a space, as metrics_prometheus
 * writes them (model_name, then key="value" when key is not NULL; value is not escaped). */
void metrics_prometheus_sample(struct metrics *m, struct uc_buf *b, const char *name,
                               const char *key, const char *value);

#ifdef __cplusplus
}
#endif
#endif
