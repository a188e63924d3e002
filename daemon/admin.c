/* The INFO text (redis `INFO` layout): sections Server, Cluster, Model, Memory, KV, Compress,
 * Requests, Errors and Config, each "# Name" then key:value lines, CRLF-free, one blank line
 * between sections. Every value comes from data rank 0 already holds: thread-safe snapshots of
 * the metrics and the scheduler, and facts that do not change after start-up. */
#include "admin.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "base/mem.h"
#include "compress/policy.h"
#include "engine.h"
#include "model_config.h"
#include "tokenizer.h"

static const char *const code_names[UC_ADMIN_N_CODES] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *uc_admin_code_name(int code)
{
    return code >= 0 && code < UC_ADMIN_N_CODES ? code_names[code] : "?";
}

/* ---- sections ------------------------------------------------------------------------- */

static void human_bytes(char *out, size_t cap, double v)
{
    static const char *const units[] = {"B", "K", "M", "G", "T"};
    int u = 0;
    while (v >= 1024.0 && u < 4) {
        v /= 1024.0;
        u++;
    }
    snprintf(out, cap, "%.2f%s", v, units[u]);
}

static void sec_server(struct uc_buf *b, const struct uc_admin_src *s)
{
    const struct uc_cluster_info *c = s->cluster;
    uc_buf_printf(b, "version:%s\n", c && c->version[0] ? c->version : "unknown");
    if (c) {
        uc_buf_printf(b, "build:%s\n", c->build);
        uc_buf_printf(b, "backend:%s\n", c->backend);
    }
    uc_buf_printf(b, "state:%s\n", s->state ? s->state : "UNKNOWN");
    uc_buf_printf(b, "process_id:%ld\n", (long)getpid());
    uc_buf_printf(b, "uptime_s:%.0f\n", s->uptime_s);
    uc_buf_printf(b, "uptime_days:%.0f\n", s->uptime_s / 86400.0);
    if (s->listen) {
        uc_buf_printf(b, "listen:%s\n", s->listen);
    }
    uc_buf_printf(b, "metrics_port:%d\n", s->metrics_port);
    uc_buf_printf(b, "tls:%s\n", s->tls ? "on" : "off");
    uc_buf_printf(b, "grpc_calls_active:%lld\n", (long long)s->calls_active);
}

static void sec_cluster(struct uc_buf *b, const struct uc_admin_src *s)
{
    const struct uc_cluster_info *c = s->cluster;
    if (!c) {
        uc_buf_puts(b, "tp_size:1\n");
        return;
    }
    uc_buf_printf(b, "tp_size:%d\n", c->tp_size);
    for (int r = 0; c->ranks && r < c->tp_size; r++) {
        const struct uc_rank_info *ri = &c->ranks[r];
        uc_buf_printf(b, "r%d_host:%s\n", r, ri->host);
        uc_buf_printf(b, "r%d_device:%s\n", r, ri->device);
        uc_buf_printf(b, "r%d_weight_bytes:%llu\n", r, (unsigned long long)ri->weight_bytes);
        uc_buf_printf(b, "r%d_kv_bytes:%llu\n", r, (unsigned long long)ri->kv_bytes);
    }
}

static void sec_model(struct uc_buf *b, const struct uc_admin_src *s)
{
    if (s->cluster) {
        uc_buf_printf(b, "model_path:%s\n", s->cluster->model_path);
    }
    if (s->engine) {
        const struct uc_model_config *cfg = uc_engine_config(s->engine);
        uc_buf_printf(b, "architecture:%s\n", cfg->arch);
        uc_buf_printf(b, "model_type:%s\n", cfg->model_type);
        uc_buf_printf(b, "layers:%lld\n", (long long)cfg->n_layers);
        uc_buf_printf(b, "hidden_size:%lld\n", (long long)cfg->hidden);
        uc_buf_printf(b, "intermediate_size:%lld\n", (long long)cfg->ffn);
        uc_buf_printf(b, "heads:%lld\n", (long long)cfg->n_heads);
        uc_buf_printf(b, "kv_heads:%lld\n", (long long)cfg->n_heads_kv);
        uc_buf_printf(b, "head_dim:%lld\n", (long long)cfg->head_dim);
        uc_buf_printf(b, "vocab_size:%lld\n", (long long)cfg->vocab);
        uc_buf_printf(b, "max_position_embeddings:%lld\n", (long long)cfg->max_ctx);
        uc_buf_printf(b, "context_length:%lld\n", (long long)uc_engine_max_ctx(s->engine));
        uc_buf_printf(b, "dtype:%s\n", cfg->torch_dtype);
        uc_buf_printf(b, "bos_token_id:%d\n", cfg->bos_id);
        uc_buf_puts(b, "eos_token_ids:");
        for (int i = 0; i < cfg->n_eos; i++) {
            uc_buf_printf(b, "%s%d", i ? "," : "", cfg->eos_ids[i]);
        }
        uc_buf_puts(b, "\n");
    }
    if (s->tok) {
        uc_buf_printf(b, "tokenizer:%s\n", uc_tokenizer_kind(s->tok));
        uc_buf_printf(b, "tokenizer_vocab_size:%lld\n",
                      (long long)uc_tokenizer_vocab_size(s->tok));
    }
}

/* Resident set size from /proc/self/statm (0 if unavailable). */
static uint64_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) {
        return 0;
    }
    unsigned long long size = 0, rss = 0;
    int n = fscanf(f, "%llu %llu", &size, &rss);
    fclose(f);
    if (n != 2) {
        return 0;
    }
    long page = sysconf(_SC_PAGESIZE);
    return (uint64_t)rss * (uint64_t)(page > 0 ? page : 4096);
}

static void sec_memory(struct uc_buf *b, const struct uc_admin_src *s)
{
    char h[32];
    size_t used = uc_mem_bytes_in_use();
    human_bytes(h, sizeof h, (double)used);
    uc_buf_printf(b, "used_memory:%zu\n", used);
    uc_buf_printf(b, "used_memory_human:%s\n", h);
    uc_buf_printf(b, "used_memory_blocks:%lld\n", (long long)uc_mem_blocks_in_use());
    uint64_t rss = rss_bytes();
    human_bytes(h, sizeof h, (double)rss);
    uc_buf_printf(b, "used_memory_rss:%llu\n", (unsigned long long)rss);
    uc_buf_printf(b, "used_memory_rss_human:%s\n", h);
    if (s->engine) {
        size_t w = uc_engine_weight_bytes(s->engine);
        human_bytes(h, sizeof h, (double)w);
        uc_buf_printf(b, "weight_bytes:%zu\n", w);
        uc_buf_printf(b, "weight_human:%s\n", h);
    }
    if (s->cluster && s->cluster->ranks) {
        uint64_t wsum = 0, ksum = 0;
        for (int r = 0; r < s->cluster->tp_size; r++) {
            wsum += s->cluster->ranks[r].weight_bytes;
            ksum += s->cluster->ranks[r].kv_bytes;
        }
        uc_buf_printf(b, "cluster_weight_bytes:%llu\n", (unsigned long long)wsum);
        uc_buf_printf(b, "cluster_kv_bytes:%llu\n", (unsigned long long)ksum);
    }
}

static void sec_kv(struct uc_buf *b, const struct uc_admin_src *s,
                   const struct metrics_snapshot *ms)
{
    if (s->sched) {
        struct uc_sched_counts sc;
        uc_sched_counts(s->sched, &sc);
        uc_buf_printf(b, "r0_blocks_total:%lld\n", (long long)sc.kv_blocks_total);
        uc_buf_printf(b, "r0_blocks_used:%lld\n", (long long)sc.kv_blocks_used);
        uc_buf_printf(b, "r0_blocks_free:%lld\n",
                      (long long)(sc.kv_blocks_total - sc.kv_blocks_used));
        uc_buf_printf(b, "r0_blocks_reserved:%lld\n", (long long)sc.kv_blocks_reserved);
        uc_buf_printf(b, "r0_blocks_shared:%lld\n", (long long)sc.kv_blocks_shared);
    }
    if (s->engine) {
        uc_buf_printf(b, "block_tokens:%lld\n", (long long)uc_engine_kv_block_tokens(s->engine));
        uc_buf_printf(b, "bytes_per_token_head:%zu\n", uc_engine_kv_bytes_per_token(s->engine));
    }
    uc_buf_printf(b, "kv_usage:%.4f\n", ms->kv_usage);
    if (s->cluster && s->cluster->ranks) {
        for (int r = 0; r < s->cluster->tp_size; r++) {
            uc_buf_printf(b, "r%d_kv_bytes:%llu\n", r,
                          (unsigned long long)s->cluster->ranks[r].kv_bytes);
        }
    }
}

static void sec_compress(struct uc_buf *b, const struct uc_admin_src *s,
                         const struct metrics_snapshot *ms)
{
    if (s->sched) {
        struct uc_compress_params cp;
        uc_sched_get_default_compress(s->sched, &cp);
        char pname[64];
        uc_policy_spec_name(&cp, pname, sizeof pname);
        uc_buf_printf(b, "default_policy:%s\n", pname);
        uc_buf_printf(b, "default_kv_budget:%d\n", cp.kv_budget);
        uc_buf_printf(b, "window:%d\n", cp.window);
        uc_buf_printf(b, "pool_kernel:%d\n", cp.pool_kernel);
        uc_buf_printf(b, "sink_tokens:%d\n", cp.sink_tokens);
        uc_buf_printf(b, "head_groups:%d\n", cp.head_groups);
        uc_buf_printf(b, "decode_mode:%s\n", uc_decode_mode_name(cp.decode_mode));
        uc_buf_printf(b, "grouping:%s\n", uc_grouping_name(cp.grouping));
    }
    if (s->engine) {
        const char *pp = uc_engine_profile_path(s->engine);
        uc_buf_printf(b, "profile_path:%s\n", pp ? pp : "");
    }
    uc_buf_printf(b, "kv_tokens_full_total:%llu\n", (unsigned long long)ms->kv_tokens_full);
    uc_buf_printf(b, "kv_tokens_kept_total:%llu\n", (unsigned long long)ms->kv_tokens_kept);
    uc_buf_printf(b, "kv_kept_ratio:%.4f\n",
                  ms->kv_tokens_full ? (double)ms->kv_tokens_kept / (double)ms->kv_tokens_full
                                     : 1.0);
    uc_buf_printf(b, "prefill_rows_dropped_total:%llu\n", (unsigned long long)ms->rows_dropped);
    uc_buf_printf(b, "compression_seconds_total:%.6f\n", ms->compress_s);
}

static void lat_lines(struct uc_buf *b, const char *name, const struct metric_pct *p)
{
    uc_buf_printf(b, "%s_ms_p50:%.3f\n%s_ms_p90:%.3f\n%s_ms_p99:%.3f\n%s_ms_mean:%.3f\n", name,
                  p->p50 * 1e3, name, p->p90 * 1e3, name, p->p99 * 1e3, name, p->mean * 1e3);
    uc_buf_printf(b, "%s_ms_max:%.3f\n", name, p->max * 1e3);
    uc_buf_printf(b, "%s_count:%llu\n", name, (unsigned long long)p->count);
}

static void sec_requests(struct uc_buf *b, const struct uc_admin_src *s,
                         const struct metrics_snapshot *ms)
{
    int32_t running = ms->running, queued = ms->waiting;
    int64_t queued_tokens = 0;
    if (s->sched) {
        struct uc_sched_counts sc;
        uc_sched_counts(s->sched, &sc);
        running = sc.running;
        queued = sc.queued;
        queued_tokens = sc.queued_tokens;
    }
    uc_buf_printf(b, "running:%d\n", running);
    uc_buf_printf(b, "queued:%d\n", queued);
    uc_buf_printf(b, "queued_tokens:%lld\n", (long long)queued_tokens);
    uc_buf_printf(b, "requests_total:%llu\n", (unsigned long long)ms->requests_total);
    uc_buf_printf(b, "requests_finished:%llu\n", (unsigned long long)ms->requests_finished);
    uc_buf_printf(b, "prompt_tokens_total:%llu\n", (unsigned long long)ms->prompt_tokens);
    uc_buf_printf(b, "generation_tokens_total:%llu\n",
                  (unsigned long long)ms->generation_tokens);
    uc_buf_printf(b, "steps_decode:%llu\n", (unsigned long long)ms->steps[METRIC_STEP_DECODE]);
    uc_buf_printf(b, "steps_prefill:%llu\n", (unsigned long long)ms->steps[METRIC_STEP_PREFILL]);
    uc_buf_printf(b, "steps_mixed:%llu\n", (unsigned long long)ms->steps[METRIC_STEP_MIXED]);
    lat_lines(b, "ttft", &ms->lat[METRIC_TTFT]);
    lat_lines(b, "inter_token", &ms->lat[METRIC_ITL]);
    lat_lines(b, "e2e", &ms->lat[METRIC_E2E]);
    lat_lines(b, "queue", &ms->lat[METRIC_QUEUE]);
    lat_lines(b, "prefill", &ms->lat[METRIC_PREFILL]);
    lat_lines(b, "send_lag", &ms->lat[METRIC_SEND_LAG]);
}

static void sec_errors(struct uc_buf *b, const struct uc_admin_src *s,
                       const struct metrics_snapshot *ms)
{
    uc_buf_printf(b, "requests_failed:%llu\n", (unsigned long long)ms->requests_failed);
    uc_buf_printf(b, "requests_aborted:%llu\n", (unsigned long long)ms->requests_aborted);
    uc_buf_printf(b, "requests_rejected:%llu\n", (unsigned long long)ms->requests_rejected);
    if (s->errors_by_code) {
        for (int c = 1; c < UC_ADMIN_N_CODES; c++) {
            if (s->errors_by_code[c]) {
                uc_buf_printf(b, "errorstat_%s:count=%llu\n", code_names[c],
                              (unsigned long long)s->errors_by_code[c]);
            }
        }
    }
}

/* The callback may or may not write the "# Config" header itself; the header is written here
 * exactly once either way. */
static void sec_config(struct uc_buf *b, const struct uc_admin_src *s)
{
    if (!s->write_config_info) {
        return;
    }
    struct uc_buf tmp;
    uc_buf_init(&tmp);
    s->write_config_info(s->config_user, &tmp);
    const char *body = tmp.data ? tmp.data : "";
    if (strncmp(body, "# ", 2) == 0) {
        const char *nl = strchr(body, '\n');
        body = nl ? nl + 1 : "";
    }
    uc_buf_puts(b, body);
    if (tmp.oom) {
        b->oom = true;
    }
    uc_buf_fini(&tmp);
}

/* ---- the text -------------------------------------------------------------------------- */

enum sec_id { S_SERVER, S_CLUSTER, S_MODEL, S_MEMORY, S_KV, S_COMPRESS, S_REQUESTS, S_ERRORS,
              S_CONFIG, S_COUNT };

static const char *const sec_names[S_COUNT] = {
    "Server", "Cluster", "Model", "Memory", "KV", "Compress", "Requests", "Errors", "Config",
};

static bool all_sections(const char *section)
{
    return !section || !section[0] || strcasecmp(section, "all") == 0 ||
           strcasecmp(section, "everything") == 0 || strcasecmp(section, "default") == 0;
}

bool uc_admin_section_known(const char *section)
{
    if (all_sections(section)) {
        return true;
    }
    for (int i = 0; i < S_COUNT; i++) {
        if (strcasecmp(section, sec_names[i]) == 0) {
            return true;
        }
    }
    return false;
}

void uc_admin_info(struct uc_buf *b, const struct uc_admin_src *src, const char *section)
{
    bool all = all_sections(section);
    struct metrics_snapshot ms;
    metrics_snapshot(src->metrics, &ms);
    bool first = true;
    for (int i = 0; i < S_COUNT; i++) {
        if (!all && strcasecmp(section, sec_names[i]) != 0) {
            continue;
        }
        uc_buf_printf(b, "%s# %s\n", first ? "" : "\n", sec_names[i]);
        first = false;
        switch ((enum sec_id)i) {
        case S_SERVER:
            sec_server(b, src);
            break;
        case S_CLUSTER:
            sec_cluster(b, src);
            break;
        case S_MODEL:
            sec_model(b, src);
            break;
        case S_MEMORY:
            sec_memory(b, src);
            break;
        case S_KV:
            sec_kv(b, src, &ms);
            break;
        case S_COMPRESS:
            sec_compress(b, src, &ms);
            break;
        case S_REQUESTS:
            sec_requests(b, src, &ms);
            break;
        case S_ERRORS:
            sec_errors(b, src, &ms);
            break;
        case S_CONFIG:
            sec_config(b, src);
            break;
        case S_COUNT:
            break;
        }
    }
}
