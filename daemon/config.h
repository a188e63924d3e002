/* The daemon's options: one table (name, type, offset, default, range, flags, help) behind the
 * config file, the --long-options, --help, the start-up table and the # Config section, as
 * redis's config.c does. A file line `kv-budget 512` and the flag `--kv-budget 512` are the same
 * option; the command line wins. */
#ifndef UC_DAEMON_CONFIG_H
#define UC_DAEMON_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "base/util.h"

#ifdef __cplusplus
extern "C" {
#endif

#define UC_CFG_MAX_STOP 16

struct uc_config {
    /* model and engine */
    char *model;
    char *config_file;
    int64_t tp;
    char *backend;
    int64_t device;
    int64_t kv_memory;
    int64_t kv_block_tokens;
    int64_t prefill_chunk;
    char *decode_overlap; /* auto, yes or no */
    int64_t prefill_step_tokens;
    int64_t prefill_memory;
    char *schedule;
    int64_t max_decode_wait_ms;
    char *step_trace;
    int64_t max_batch;
    int64_t max_context;
    int64_t comm_timeout_ms;
    int64_t heartbeat_ms;
    char *profile;
    char *calibration_text;
    int64_t calib_window;
    int64_t calib_windows;
    double kvsharer_threshold;
    double kvsharer_layers;
    int64_t kvsharer_window;
    int64_t minicache_pairs;
    int64_t minicache_window;
    int64_t calib_max_text_bytes;
    char *log_level;
    bool fp32;
    /* serving */
    char *listen;
    int64_t metrics_port;
    char *tls_cert;
    char *tls_key;
    char *send_trace;
    int64_t max_running;
    int64_t max_queued_requests;
    int64_t max_queued_tokens;
    int64_t default_max_tokens;
    int64_t max_tokens_limit;
    int64_t max_stop_strings;
    int64_t max_message_bytes;
    int64_t drain_timeout_ms;
    /* OpenAI-compatible HTTP front and API keys */
    char *http_listen;
    char *served_model_name;
    char *chat_template;
    char *api_key;
    char *api_key_file;
    char *admin_api_key;
    /* default compression */
    char *policy;
    int64_t kv_budget;
    int64_t window;
    int64_t pool_kernel;
    int64_t sink_tokens;
    int64_t head_groups;
    double spread;
    double r_min;
    double think_ratio;
    double minicache_t;
    double minicache_gamma;
    int64_t minicache_start;
    double lorc_ratio;
    char *decode_mode;
    char *grouping;
    char *stage_starts;
    char *row_score;
    /* one-shot mode */
    char *prompt;
    char *prompt_file;
    int64_t max_tokens;
    double temperature;
    int64_t seed;
    int64_t top_k;
    double top_p;
    double min_p;
    double repetition_penalty;
    char *stop;
    bool report;
    bool ignore_eos;
};

enum uc_cfg_type {
    UC_CFG_STR = 0,
    UC_CFG_INT = 1,
    UC_CFG_DBL = 2,
    UC_CFG_BOOL = 3,
    UC_CFG_BYTES = 4, /* integer with an optional KiB/MiB/GiB suffix */
};

enum uc_cfg_flags {
    UC_CFG_IMMUTABLE = 1 << 0,  /* fixed after start-up */
    UC_CFG_RANK_LOCAL = 1 << 1, /* may differ between ranks (left out of the config hash) */
    UC_CFG_ONESHOT = 1 << 2,    /* one-shot mode only */
    UC_CFG_CLI_ONLY = 1 << 3,   /* not valid in a config file */
    UC_CFG_SECRET = 1 << 4,     /* shown as "(set)" in the start-up table and # Config */
};

struct uc_cfg_option {
    const char *name;
    enum uc_cfg_type type;
    size_t offset;
    const char *dflt;
    double min, max;
    int flags;
    const char *help;
};

/* The table, terminated by a NULL name. */
const struct uc_cfg_option *uc_config_options(void);

/* Defaults, then the config file (--config), then the command line. On a usage error returns
 * UC_ERR_INVALID_ARG with the message in msg. `*help` is set for --help, `*list` for
 * --list-options. */
uc_status uc_config_load(struct uc_config *c, int argc, char **argv, char *msg, size_t msg_size,
                         bool *help, bool *list);
void uc_config_fini(struct uc_config *c);
/* Cross-field validation (after the world size is known). */
uc_status uc_config_validate(const struct uc_config *c, int world_size, char *msg,
                             size_t msg_size);
/* Hash of every option that is not rank-local (ranks must agree on it). */
uint64_t uc_config_hash(const struct uc_config *c);
/* --help text, the effective-config table, and the INFO "# Config" section. */
void uc_config_write_help(struct uc_buf *b);
void uc_config_write_table(const struct uc_config *c, struct uc_buf *b);
void uc_config_write_info(const struct uc_config *c, struct uc_buf *b);
/* Value of one option as text (NULL for unknown names). */
char *uc_config_get(const struct uc_config *c, const char *name);

#ifdef __cplusplus
}
#endif
#endif
