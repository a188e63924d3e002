/* Daemon metrics: counters, gauges, latency rings and Prometheus histograms behind GetStats, the
 * INFO text and GET /metrics. One mutex guards everything; writers are the scheduler thread
 * (a handful of calls per request and per step), readers the gRPC and HTTP threads. Percentiles
 * come from a bounded ring of the most recent samples, so they describe recent traffic; the
 * histograms and counters are cumulative since start-up, as Prometheus expects. */
#include "metrics.h"

#include <math.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "compress/policy.h"

#define RING_SAMPLES 10000
#define MAX_POLICY_LABELS 16
#define POLICY_NAME_MAX 32

/* Upper bounds in seconds, shared by every latency histogram: from a millisecond (one decode
 * step of a tiny model on a CPU) to ten minutes (a long prompt on a busy server). */
static const double bucket_bounds[] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0,   2.5,    5.0,   7.5,  10.0,  20.0, 40.0,  80.0, 160.0, 320.0, 640.0,
};
#define N_BUCKETS ((int)(sizeof bucket_bounds / sizeof bucket_bounds[0]))

struct lat_series {
    double ring[RING_SAMPLES];
    int64_t ring_next;            /* samples ever written (ring index = next % RING_SAMPLES) */
    uint64_t buckets[N_BUCKETS];  /* non-cumulative counts per bucket; +Inf = count - sum */
    uint64_t count;
    double sum;
};

struct policy_counts {
    char name[POLICY_NAME_MAX];
    uint64_t requests;
    uint64_t kv_tokens_full;
    uint64_t kv_tokens_kept;
    uint64_t rows_dropped;
    double compress_s;
};

struct metrics {
    pthread_mutex_t mu;
    uint64_t requests_total, requests_finished, requests_failed, requests_aborted,
        requests_rejected, requests_success;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t kv_tokens_full, kv_tokens_kept, rows_dropped;
    double compress_s;
    int32_t running, waiting;
    double kv_usage;
    struct lat_series lat[METRIC_LAT_COUNT];
    uint64_t steps[METRIC_STEP_KINDS];
    struct policy_counts pol[MAX_POLICY_LABELS];
    int n_pol;
    char model_name[256]; /* the model_name label ("" = none) */
};

struct lat_desc {
    const char *name;
    const char *help;
};

static const struct lat_desc lat_descs[METRIC_LAT_COUNT] = {
    [METRIC_TTFT] = {"uncomp:time_to_first_token_seconds",
                     "Time from submission to the first generated token."},
    [METRIC_ITL] = {"uncomp:inter_token_latency_seconds",
                    "Time between two consecutive generated tokens of a request."},
    [METRIC_E2E] = {"uncomp:e2e_request_latency_seconds",
                    "Time from submission to the end of a request."},
    [METRIC_QUEUE] = {"uncomp:request_queue_time_seconds",
                      "Time a request waited in the queue before it was admitted."},
    [METRIC_PREFILL] = {"uncomp:request_prefill_time_seconds",
                        "Time a request spent in prefill (prompt processing and compression)."},
    [METRIC_SEND_LAG] = {"uncomp:grpc_send_lag_seconds",
                         "Time from the scheduler's emission of a streamed token to gRPC taking "
                         "the message that carries it (the daemon's share of delivery)."},
};

/* The kind label of uncomp:engine_steps_total. */
static const char *const step_kinds[METRIC_STEP_KINDS] = {
    [METRIC_STEP_DECODE] = "decode",
    [METRIC_STEP_PREFILL] = "prefill",
    [METRIC_STEP_MIXED] = "mixed",
};

const char *metrics_step_name(enum metric_step k)
{
    return (unsigned)k < METRIC_STEP_KINDS ? step_kinds[k] : "other";
}

/* ---- lifecycle ------------------------------------------------------------------------ */

uc_status metrics_create(struct metrics **out)
{
    *out = NULL;
    struct metrics *m = uc_calloc(1, sizeof *m);
    if (!m) {
        return UC_ERRF(UC_ERR_NOMEM, "metrics: out of memory");
    }
    if (pthread_mutex_init(&m->mu, NULL) != 0) {
        uc_free(m);
        return UC_ERRF(UC_ERR_INTERNAL, "metrics: pthread_mutex_init failed");
    }
    /* every known policy gets a labelled series from the start, so scrapers see zeros */
    for (int i = 0; i < UC_POLICY_COUNT && i < MAX_POLICY_LABELS; i++) {
        snprintf(m->pol[i].name, sizeof m->pol[i].name, "%s", uc_policy_name((enum uc_policy)i));
        m->n_pol++;
    }
    *out = m;
    return UC_OK;
}

void metrics_destroy(struct metrics *m)
{
    if (!m) {
        return;
    }
    pthread_mutex_destroy(&m->mu);
    uc_free(m);
}

/* ---- events --------------------------------------------------------------------------- */

void metrics_set_model_name(struct metrics *m, const char *name)
{
    if (!m) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    snprintf(m->model_name, sizeof m->model_name, "%s", name ? name : "");
    pthread_mutex_unlock(&m->mu);
}

void metrics_request_submitted(struct metrics *m)
{
    if (!m) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    m->requests_total++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_request_rejected(struct metrics *m)
{
    if (!m) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    m->requests_rejected++;
    pthread_mutex_unlock(&m->mu);
}

/* The labelled slot of a policy (created on first use; the last slot collects overflow). */
static struct policy_counts *policy_slot(struct metrics *m, const char *policy)
{
    if (!policy || !policy[0]) {
        policy = "unknown";
    }
    for (int i = 0; i < m->n_pol; i++) {
        if (strcmp(m->pol[i].name, policy) == 0) {
            return &m->pol[i];
        }
    }
    if (m->n_pol < MAX_POLICY_LABELS) {
        struct policy_counts *p = &m->pol[m->n_pol++];
        memset(p, 0, sizeof *p);
        snprintf(p->name, sizeof p->name, "%s", policy);
        return p;
    }
    return &m->pol[MAX_POLICY_LABELS - 1];
}

static uint64_t nonneg(int64_t v) { return v > 0 ? (uint64_t)v : 0; }

void metrics_request_finished(struct metrics *m, const char *policy, bool ok, bool aborted,
                              int64_t prompt_tokens, int64_t completion_tokens,
                              int64_t kv_tokens_full, int64_t kv_tokens_kept,
                              int64_t rows_dropped, double compress_s)
{
    if (!m) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    m->requests_finished++;
    if (aborted) {
        m->requests_aborted++;
    } else if (!ok) {
        m->requests_failed++;
    } else {
        m->requests_success++;
    }
    m->prompt_tokens += nonneg(prompt_tokens);
    m->generation_tokens += nonneg(completion_tokens);
    m->kv_tokens_full += nonneg(kv_tokens_full);
    m->kv_tokens_kept += nonneg(kv_tokens_kept);
    m->rows_dropped += nonneg(rows_dropped);
    if (isfinite(compress_s) && compress_s > 0) {
        m->compress_s += compress_s;
    }
    struct policy_counts *p = policy_slot(m, policy);
    p->requests++;
    p->kv_tokens_full += nonneg(kv_tokens_full);
    p->kv_tokens_kept += nonneg(kv_tokens_kept);
    p->rows_dropped += nonneg(rows_dropped);
    if (isfinite(compress_s) && compress_s > 0) {
        p->compress_s += compress_s;
    }
    pthread_mutex_unlock(&m->mu);
}

void metrics_observe(struct metrics *m, enum metric_lat which, double seconds)
{
    if (!m || which < 0 || which >= METRIC_LAT_COUNT || !isfinite(seconds)) {
        return;
    }
    if (seconds < 0) {
        seconds = 0;
    }
    pthread_mutex_lock(&m->mu);
    struct lat_series *s = &m->lat[which];
    s->ring[s->ring_next % RING_SAMPLES] = seconds;
    s->ring_next++;
    for (int i = 0; i < N_BUCKETS; i++) {
        if (seconds <= bucket_bounds[i]) {
            s->buckets[i]++;
            break;
        }
    }
    s->count++;
    s->sum += seconds;
    pthread_mutex_unlock(&m->mu);
}

void metrics_step(struct metrics *m, enum metric_step kind)
{
    if (!m || kind < 0 || kind >= METRIC_STEP_KINDS) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    m->steps[kind]++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_set_gauges(struct metrics *m, int32_t running, int32_t waiting, double kv_usage)
{
    if (!m) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    m->running = running;
    m->waiting = waiting;
    m->kv_usage = isfinite(kv_usage) ? kv_usage : 0.0;
    pthread_mutex_unlock(&m->mu);
}

/* ---- snapshot ------------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted v (n > 0). */
static double pct(const double *v, int64_t n, double q)
{
    int64_t k = (int64_t)ceil(q * (double)n) - 1;
    if (k < 0) {
        k = 0;
    }
    if (k >= n) {
        k = n - 1;
    }
    return v[k];
}

void metrics_snapshot(struct metrics *m, struct metrics_snapshot *out)
{
    memset(out, 0, sizeof *out);
    if (!m) {
        return;
    }
    /* copy rings out under the lock, sort outside it */
    double *tmp = uc_malloc(sizeof(double) * RING_SAMPLES);
    for (int k = 0; k < METRIC_LAT_COUNT; k++) {
        pthread_mutex_lock(&m->mu);
        if (k == 0) {
            out->requests_total = m->requests_total;
            out->requests_finished = m->requests_finished;
            out->requests_failed = m->requests_failed;
            out->requests_aborted = m->requests_aborted;
            out->requests_rejected = m->requests_rejected;
            out->prompt_tokens = m->prompt_tokens;
            out->generation_tokens = m->generation_tokens;
            out->kv_tokens_full = m->kv_tokens_full;
            out->kv_tokens_kept = m->kv_tokens_kept;
            out->rows_dropped = m->rows_dropped;
            out->compress_s = m->compress_s;
            out->running = m->running;
            out->waiting = m->waiting;
            out->kv_usage = m->kv_usage;
            memcpy(out->steps, m->steps, sizeof out->steps);
        }
        const struct lat_series *s = &m->lat[k];
        int64_t n = s->ring_next < RING_SAMPLES ? s->ring_next : RING_SAMPLES;
        out->lat[k].count = s->count;
        if (tmp && n > 0) {
            memcpy(tmp, s->ring, sizeof(double) * (size_t)n);
        }
        pthread_mutex_unlock(&m->mu);
        if (!tmp || n == 0) {
            continue;
        }
        qsort(tmp, (size_t)n, sizeof(double), cmp_double);
        double sum = 0;
        for (int64_t i = 0; i < n; i++) {
            sum += tmp[i];
        }
        out->lat[k].p50 = pct(tmp, n, 0.50);
        out->lat[k].p90 = pct(tmp, n, 0.90);
        out->lat[k].p99 = pct(tmp, n, 0.99);
        out->lat[k].mean = sum / (double)n;
        out->lat[k].max = tmp[n - 1];
    }
    uc_free(tmp);
}

/* ---- Prometheus text exposition (format 0.0.4) ----------------------------------------- */

static void prom_head(struct uc_buf *b, const char *name, const char *type, const char *help)
{
    uc_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Prometheus floats: Go's strconv style is not required, but NaN/Inf must be spelled out. */
static void prom_value(struct uc_buf *b, double v)
{
    if (isnan(v)) {
        uc_buf_puts(b, "NaN");
    } else if (isinf(v)) {
        uc_buf_puts(b, v > 0 ? "+Inf" : "-Inf");
    } else {
        uc_buf_printf(b, "%.17g", v);
    }
}

/* Label values: escape backslash, double quote and newline. */
static void prom_label_value(struct uc_buf *b, const char *v)
{
    for (const char *p = v; *p; p++) {
        if (*p == '\\') {
            uc_buf_puts(b, "\\\\");
        } else if (*p == '"') {
            uc_buf_puts(b, "\\\"");
        } else if (*p == '\n') {
            uc_buf_puts(b, "\\n");
        } else {
            uc_buf_append(b, p, 1);
        }
    }
}

/* A sample's name and labels, then a space: name{model_name="M",key="value"} (either label
 * left out when its value is NULL or ""; no braces without labels). `value` is written as it
 * is (the caller escapes it when needed), model_name escaped. */
static void prom_sample(struct uc_buf *b, const struct metrics *m, const char *name,
                        const char *key, const char *value)
{
    bool model = m->model_name[0] != '\0';
    bool extra = key && value && value[0];
    uc_buf_puts(b, name);
    if (model || extra) {
        uc_buf_puts(b, "{");
        if (model) {
            uc_buf_puts(b, "model_name=\"");
            prom_label_value(b, m->model_name);
            uc_buf_printf(b, "\"%s", extra ? "," : "");
        }
        if (extra) {
            uc_buf_printf(b, "%s=\"%s\"", key, value);
        }
        uc_buf_puts(b, "}");
    }
    uc_buf_puts(b, " ");
}

static void prom_u64(struct uc_buf *b, const struct metrics *m, const char *name,
                     const char *type, const char *help, uint64_t v)
{
    prom_head(b, name, type, help);
    prom_sample(b, m, name, NULL, NULL);
    uc_buf_printf(b, "%llu\n", (unsigned long long)v);
}

static void prom_f64(struct uc_buf *b, const struct metrics *m, const char *name,
                     const char *type, const char *help, double v)
{
    prom_head(b, name, type, help);
    prom_sample(b, m, name, NULL, NULL);
    prom_value(b, v);
    uc_buf_puts(b, "\n");
}

enum pol_field { PF_FULL, PF_KEPT, PF_COMPRESS_S, PF_DROPPED, PF_REQUESTS };

static void prom_policy(struct uc_buf *b, const struct metrics *m, const char *name,
                        const char *help, enum pol_field f)
{
    prom_head(b, name, "counter", help);
    for (int i = 0; i < m->n_pol; i++) {
        const struct policy_counts *p = &m->pol[i];
        struct uc_buf v;
        uc_buf_init(&v);
        prom_label_value(&v, p->name);
        prom_sample(b, m, name, "policy", v.oom || !v.data ? "" : v.data);
        uc_buf_fini(&v);
        switch (f) {
        case PF_FULL:
            uc_buf_printf(b, "%llu", (unsigned long long)p->kv_tokens_full);
            break;
        case PF_KEPT:
            uc_buf_printf(b, "%llu", (unsigned long long)p->kv_tokens_kept);
            break;
        case PF_DROPPED:
            uc_buf_printf(b, "%llu", (unsigned long long)p->rows_dropped);
            break;
        case PF_REQUESTS:
            uc_buf_printf(b, "%llu", (unsigned long long)p->requests);
            break;
        case PF_COMPRESS_S:
            prom_value(b, p->compress_s);
            break;
        }
        uc_buf_puts(b, "\n");
    }
}

static void prom_hist(struct uc_buf *b, const struct metrics *m, const struct lat_series *s,
                      const struct lat_desc *d)
{
    char bucket[128], sum[128], count[128], le[64];
    snprintf(bucket, sizeof bucket, "%s_bucket", d->name);
    snprintf(sum, sizeof sum, "%s_sum", d->name);
    snprintf(count, sizeof count, "%s_count", d->name);
    prom_head(b, d->name, "histogram", d->help);
    uint64_t cum = 0;
    for (int i = 0; i < N_BUCKETS; i++) {
        cum += s->buckets[i];
        snprintf(le, sizeof le, "%.17g", bucket_bounds[i]); /* finite: prom_value's spelling */
        prom_sample(b, m, bucket, "le", le);
        uc_buf_printf(b, "%llu\n", (unsigned long long)cum);
    }
    prom_sample(b, m, bucket, "le", "+Inf");
    uc_buf_printf(b, "%llu\n", (unsigned long long)s->count);
    prom_sample(b, m, sum, NULL, NULL);
    prom_value(b, s->sum);
    uc_buf_puts(b, "\n");
    prom_sample(b, m, count, NULL, NULL);
    uc_buf_printf(b, "%llu\n", (unsigned long long)s->count);
}

void metrics_prometheus_sample(struct metrics *m, struct uc_buf *b, const char *name,
                               const char *key, const char *value)
{
    if (!m) {
        uc_buf_printf(b, "%s", name);
        if (key && value && value[0]) {
            uc_buf_printf(b, "{%s=\"%s\"}", key, value);
        }
        uc_buf_puts(b, " ");
        return;
    }
    pthread_mutex_lock(&m->mu);
    prom_sample(b, m, name, key, value);
    pthread_mutex_unlock(&m->mu);
}

void metrics_prometheus(struct metrics *m, struct uc_buf *b)
{
    if (!m) {
        return;
    }
    pthread_mutex_lock(&m->mu);
    prom_f64(b, m, "uncomp:num_requests_running", "gauge",
             "Number of requests in prefill or decode.", m->running);
    prom_f64(b, m, "uncomp:num_requests_waiting", "gauge",
             "Number of requests waiting to be admitted.", m->waiting);
    prom_f64(b, m, "uncomp:kv_cache_usage_perc", "gauge",
             "Fraction of the KV cache blocks in use on rank 0 (1 = full).", m->kv_usage);
    prom_u64(b, m, "uncomp:prompt_tokens_total", "counter", "Prompt tokens processed.",
             m->prompt_tokens);
    prom_u64(b, m, "uncomp:generation_tokens_total", "counter", "Tokens generated.",
             m->generation_tokens);
    prom_u64(b, m, "uncomp:request_received_total", "counter", "Requests accepted into the queue.",
             m->requests_total);
    prom_u64(b, m, "uncomp:request_success_total", "counter",
             "Requests that finished normally (stop or length).", m->requests_success);
    prom_u64(b, m, "uncomp:request_failure_total", "counter", "Requests that ended with an error.",
             m->requests_failed);
    prom_u64(b, m, "uncomp:request_aborted_total", "counter",
             "Requests aborted (Abort, cancellation, deadline, drain).", m->requests_aborted);
    prom_u64(b, m, "uncomp:request_rejected_total", "counter",
             "Requests refused at submission (invalid, queue full, draining).",
             m->requests_rejected);
    prom_head(b, "uncomp:engine_steps_total", "counter",
              "Engine steps by what they carried: decode rows only (decode), prompt slices only "
              "(prefill) or both (mixed).");
    for (int k = 0; k < METRIC_STEP_KINDS; k++) {
        prom_sample(b, m, "uncomp:engine_steps_total", "kind", step_kinds[k]);
        uc_buf_printf(b, "%llu\n", (unsigned long long)m->steps[k]);
    }
    for (int k = 0; k < METRIC_LAT_COUNT; k++) {
        prom_hist(b, m, &m->lat[k], &lat_descs[k]);
    }
    prom_policy(b, m, "uncomp:kv_tokens_full_total",
                "KV tokens a full cache would hold after prefill (prompt x layers x KV heads).",
                PF_FULL);
    prom_policy(b, m, "uncomp:kv_tokens_kept_total",
                "KV tokens kept after prefill compression (summed over layers and KV heads).",
                PF_KEPT);
    prom_policy(b, m, "uncomp:compression_seconds",
                "Seconds spent in compression (entropy, selection, gathers).", PF_COMPRESS_S);
    prom_policy(b, m, "uncomp:prefill_rows_dropped_total",
                "Hidden-state rows dropped by staged prefill compression.", PF_DROPPED);
    prom_policy(b, m, "uncomp:compressed_requests_total", "Finished requests by policy.",
                PF_REQUESTS);
    pthread_mutex_unlock(&m->mu);
}
