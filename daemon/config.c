/* The option table and its one parser. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "sched.h"

#define OFF(f) offsetof(struct uc_config, f)
#define BIG 9e15

/* The table, in the order of --help: each section starts at the option named in `sections`
 * below, so a new option joins the section of the one before it. */
static const struct uc_cfg_option options[] = {
    /* model and engine */
    {"model", UC_CFG_STR, OFF(model), "", 0, 0, UC_CFG_IMMUTABLE | UC_CFG_RANK_LOCAL,
     "model directory (Hugging Face layout) or synthetic:SHAPE; empty = the bundled "
     "models/uncomp-tiny (the path may differ between hosts: ranks compare the model's hash)"},
    {"config", UC_CFG_STR, OFF(config_file), "", 0, 0, UC_CFG_CLI_ONLY | UC_CFG_RANK_LOCAL,
     "read options from this file first (lines 'name value'; the command line wins)"},
    {"tp", UC_CFG_INT, OFF(tp), "0", 0, 4096, UC_CFG_IMMUTABLE,
     "tensor-parallel ranks; must equal the MPI world size (0 = the world size)"},
    {"backend", UC_CFG_STR, OFF(backend), "cpu", 0, 0, UC_CFG_IMMUTABLE, "cpu or cuda"},
    {"device", UC_CFG_INT, OFF(device), "-1", -1, 1024, UC_CFG_RANK_LOCAL,
     "CUDA device of this rank (-1 = the local rank)"},
    {"fp32", UC_CFG_BOOL, OFF(fp32), "no", 0, 0, UC_CFG_IMMUTABLE,
     "CUDA: float32 weights and activations instead of bf16 (accuracy checks)"},
    {"kv-memory", UC_CFG_BYTES, OFF(kv_memory), "256MiB", 1 << 16, BIG, UC_CFG_IMMUTABLE,
     "KV pool per rank (K and V), e.g. 512MiB or 40GiB"},
    {"kv-block-tokens", UC_CFG_INT, OFF(kv_block_tokens), "16", 1, 4096, UC_CFG_IMMUTABLE,
     "tokens per KV block (per KV head)"},
    {"prefill-chunk", UC_CFG_INT, OFF(prefill_chunk), "0", 0, 1 << 20, UC_CFG_IMMUTABLE,
     "prompt rows per product at one layer (workspace rows; 0 = 512 on cpu, 8192 on cuda)"},
    {"prefill-step-tokens", UC_CFG_INT, OFF(prefill_step_tokens), "0", 0, 1 << 30, 0,
     "prefill work (rows x layers) per step while other sequences decode (0 = 2048 on cpu, "
     "65536 on cuda)"},
    {"prefill-memory", UC_CFG_BYTES, OFF(prefill_memory), "0", 0, BIG, UC_CFG_IMMUTABLE,
     "prefill buffers of the prompts being prefilled at once (0 = a quarter of --kv-memory)"},
    {"schedule", UC_CFG_STR, OFF(schedule), "mixed", 0, 0, 0,
     "mixed: every step carries the decode rows of all running sequences beside the prefill "
     "slices; prefill-first: while a request's prompt prefills, steps carry prompts only (at 4x "
     "the prefill budget) and decoding waits: better TTFT, one long inter-token gap per stream "
     "per wave"},
    {"decode-overlap", UC_CFG_STR, OFF(decode_overlap), "auto", 0, 0, UC_CFG_IMMUTABLE,
     "auto|yes|no: launch a greedy decode step before the host has read the one before it, "
     "when the scheduler expects the same batch again; auto = on a GPU (on the CPU it gains "
     "nothing and returns each token a step later; yes there is for tests); no = the device "
     "waits for the host between steps (A/B timings)"},
    {"max-decode-wait-ms", UC_CFG_INT, OFF(max_decode_wait_ms), "0", 0, 3600000, 0,
     "prefill-first: once a decoding sequence has waited this long for its next token, steps "
     "mix decode rows in again (0 = no bound)"},
    {"step-trace", UC_CFG_STR, OFF(step_trace), "", 0, 0, UC_CFG_IMMUTABLE,
     "write a JSON line per engine step to FILE: what it carried and where its time went "
     "(tests/bench/step_trace.py sums it up)"},
    {"max-batch", UC_CFG_INT, OFF(max_batch), "64", 1, 4096, UC_CFG_IMMUTABLE,
     "most sequences decoded in one step"},
    {"max-context", UC_CFG_INT, OFF(max_context), "0", 0, 1 << 24, UC_CFG_IMMUTABLE,
     "context length limit (0 = the model's)"},
    {"comm-timeout", UC_CFG_INT, OFF(comm_timeout_ms), "30000", 100, 3600000, UC_CFG_IMMUTABLE,
     "watchdog on every collective, ms: a stuck rank aborts the job after this"},
    {"heartbeat", UC_CFG_INT, OFF(heartbeat_ms), "1000", 10, 600000, UC_CFG_IMMUTABLE,
     "idle heartbeat from rank 0 to the other ranks, ms (must be well below comm-timeout)"},
    /* serving */
    {"listen", UC_CFG_STR, OFF(listen), "127.0.0.1:50051", 0, 0, UC_CFG_IMMUTABLE,
     "gRPC address HOST:PORT (use TLS beyond loopback)"},
    {"metrics-port", UC_CFG_INT, OFF(metrics_port), "0", 0, 65535, UC_CFG_IMMUTABLE,
     "Prometheus /metrics HTTP port (0 = off)"},
    {"tls-cert", UC_CFG_STR, OFF(tls_cert), "", 0, 0, UC_CFG_IMMUTABLE,
     "server certificate chain (PEM); with tls-key enables TLS"},
    {"tls-key", UC_CFG_STR, OFF(tls_key), "", 0, 0, UC_CFG_IMMUTABLE, "server private key (PEM)"},
    {"send-trace", UC_CFG_STR, OFF(send_trace), "", 0, 0, UC_CFG_IMMUTABLE,
     "write a JSON line per streamed gRPC chunk to FILE: when the scheduler emitted its tokens, "
     "when gRPC took it and when its send completed (tests/bench/token_times.py --send-trace "
     "joins it with the client's arrivals)"},
    {"max-running", UC_CFG_INT, OFF(max_running), "64", 1, 65536, 0,
     "sequences in prefill or decode at once"},
    {"max-queued-requests", UC_CFG_INT, OFF(max_queued_requests), "256", 0, 1 << 24, 0,
     "waiting requests before RESOURCE_EXHAUSTED"},
    {"max-queued-tokens", UC_CFG_INT, OFF(max_queued_tokens), "4194304", 1, BIG, 0,
     "waiting prompt tokens before RESOURCE_EXHAUSTED"},
    {"default-max-tokens", UC_CFG_INT, OFF(default_max_tokens), "256", 1, 1 << 24, 0,
     "max_tokens of a request that sets none"},
    {"max-tokens-limit", UC_CFG_INT, OFF(max_tokens_limit), "1048576", 1, 1 << 30, 0,
     "largest max_tokens a request may ask for"},
    {"max-stop-strings", UC_CFG_INT, OFF(max_stop_strings), "64", 0, 65536, 0,
     "most stop strings per request"},
    {"max-message-bytes", UC_CFG_BYTES, OFF(max_message_bytes), "64MiB", 1024, 1 << 30, 0,
     "largest gRPC message received"},
    {"drain-timeout", UC_CFG_INT, OFF(drain_timeout_ms), "30000", 0, 86400000, 0,
     "ms in-flight requests may run after SIGTERM or Drain"},
    {"log-level", UC_CFG_STR, OFF(log_level), "notice", 0, 0, UC_CFG_RANK_LOCAL,
     "error, warn, notice, info or debug"},
    /* OpenAI-compatible HTTP front and API keys */
    {"http-listen", UC_CFG_STR, OFF(http_listen), "127.0.0.1:8000", 0, 0, UC_CFG_IMMUTABLE,
     "OpenAI-compatible HTTP address HOST:PORT (/v1/completions, /v1/chat/completions, "
     "/v1/models, /health); 0 = off. Busy at the default address: a warning, not an error"},
    {"served-model-name", UC_CFG_STR, OFF(served_model_name), "", 0, 0, UC_CFG_IMMUTABLE,
     "model name of the HTTP API (/v1/models, requests' \"model\"; empty = the model "
     "folder's name)"},
    {"chat-template", UC_CFG_STR, OFF(chat_template), "", 0, 0, UC_CFG_IMMUTABLE,
     "Jinja chat template file (empty = MODEL/chat_template.jinja or tokenizer_config.json's)"},
    {"api-key", UC_CFG_STR, OFF(api_key), "", 0, 0, UC_CFG_IMMUTABLE | UC_CFG_SECRET,
     "API key clients must send (HTTP Authorization: Bearer KEY; gRPC metadata "
     "authorization: Bearer KEY); empty = none"},
    {"api-key-file", UC_CFG_STR, OFF(api_key_file), "", 0, 0, UC_CFG_IMMUTABLE,
     "file of API keys, one a line ('#' comments), accepted beside --api-key"},
    {"admin-api-key", UC_CFG_STR, OFF(admin_api_key), "", 0, 0,
     UC_CFG_IMMUTABLE | UC_CFG_SECRET,
     "key the Admin calls (Drain, SetCompressionPolicy, Calibrate, ...) need; empty = the API "
     "keys"},
    /* default compression */
    {"policy", UC_CFG_STR, OFF(policy), "full", 0, 0, 0,
     "default compression: full, uncomp, uncomp-stage, snapkv, pyramidkv, streamingllm, h2o; "
     "+kvsharer, +think, +minicache and +lorc compose (snapkv+kvsharer, snapkv+think, "
     "snapkv+minicache, snapkv+lorc)"},
    {"kv-budget", UC_CFG_INT, OFF(kv_budget), "128", 1, 1 << 24, 0,
     "default mean tokens kept per KV head per layer"},
    {"window", UC_CFG_INT, OFF(window), "8", 1, 64, 0, "observation window W"},
    {"pool-kernel", UC_CFG_INT, OFF(pool_kernel), "7", 1, 63, 0, "max-pool kernel (odd)"},
    {"sink-tokens", UC_CFG_INT, OFF(sink_tokens), "4", 0, 1024, 0, "streamingllm sink tokens"},
    {"head-groups", UC_CFG_INT, OFF(head_groups), "2", 1, 16, 0, "uncomp head groups m"},
    {"spread", UC_CFG_DBL, OFF(spread), "0.333333333", 0, 0.999, 0,
     "uncomp budget spread s: group g keeps B (1 - s + 2 s g / (m - 1))"},
    {"r-min", UC_CFG_DBL, OFF(r_min), "0.375", 0.01, 1, 0,
     "uncomp-stage: share of prompt rows the last stage keeps"},
    {"think-ratio", UC_CFG_DBL, OFF(think_ratio), "0.4", 0.01, 0.99, 0,
     "with a +think policy (ThinK): share of each KV head's key channels pruned"},
    {"minicache-t", UC_CFG_DBL, OFF(minicache_t), "0.6", 0.01, 1, 0,
     "with a +minicache policy (MiniCache): SLERP parameter t between a pair's layers"},
    {"minicache-gamma", UC_CFG_DBL, OFF(minicache_gamma), "0.05", 0, 1, 0,
     "with a +minicache policy: share of a pair's common tokens kept unmerged"},
    {"minicache-start", UC_CFG_INT, OFF(minicache_start), "0", 0, 4096, 0,
     "with a +minicache policy: first merged layer (0: half the layers)"},
    {"lorc-ratio", UC_CFG_DBL, OFF(lorc_ratio), "0.5", 0.01, 1.0, 0,
     "with a +lorc policy (LoRC): mean share of the key and value dimensions kept"},
    {"decode-mode", UC_CFG_STR, OFF(decode_mode), "append", 0, 0, 0, "append or evict"},
    {"grouping", UC_CFG_STR, OFF(grouping), "profile", 0, 0, 0,
     "uncomp head groups from the calibration profile or the prompt"},
    {"stage-starts", UC_CFG_STR, OFF(stage_starts), "", 0, 0, 0,
     "uncomp-stage boundaries, e.g. 6,7 (empty = the profile's)"},
    {"row-score", UC_CFG_STR, OFF(row_score), "accum-max", 0, 0, 0,
     "uncomp-stage row score: sum or max over heads at the layer before the boundary, or "
     "accum / accum-max over every layer before it"},
    /* calibration */
    {"profile", UC_CFG_STR, OFF(profile), "", 0, 0, UC_CFG_IMMUTABLE,
     "calibration profile path (empty = MODEL/uncomp_profile.json)"},
    {"calibration-text", UC_CFG_STR, OFF(calibration_text), "", 0, 0, 0,
     "text used to calibrate when no profile exists (empty = MODEL/calibration.txt)"},
    {"calib-window", UC_CFG_INT, OFF(calib_window), "1024", 32, 1 << 20, 0,
     "tokens per calibration window (an Admin.Calibrate may ask fewer, not more)"},
    {"calib-windows", UC_CFG_INT, OFF(calib_windows), "4", 1, 1024, 0,
     "most calibration windows (an Admin.Calibrate may ask fewer, not more)"},
    {"kvsharer-layers", UC_CFG_DBL, OFF(kvsharer_layers), "0.3", 0, 0.5, 0,
     "KVSharer: share of layers calibration makes read another layer's KV cache (0 = no "
     "KVSharer search)"},
    {"kvsharer-threshold", UC_CFG_DBL, OFF(kvsharer_threshold), "0.5", -1, 1, 0,
     "KVSharer: cosine similarity the last hidden states must keep for a layer pair"},
    {"kvsharer-window", UC_CFG_INT, OFF(kvsharer_window), "256", 16, 1 << 16, 0,
     "KVSharer: tokens per window of its search (at most 4 windows of the calibration text)"},
    {"minicache-pairs", UC_CFG_INT, OFF(minicache_pairs), "0", -1, 64, 0,
     "MiniCache: adjacent layer pairs calibration picks, those of least mean angular distance, "
     "for requests without minicache-start (0 = the paper's count, half the layers from L/2; "
     "-1 = no calibration: the paper's pairs from L/2)"},
    {"minicache-window", UC_CFG_INT, OFF(minicache_window), "256", 16, 1 << 16, 0,
     "MiniCache: tokens per window of its calibration (at most 4 windows of the calibration "
     "text)"},
    {"calib-max-text-bytes", UC_CFG_BYTES, OFF(calib_max_text_bytes), "1MiB", 1024, 1 << 30, 0,
     "largest text an Admin.Calibrate may send"},
    /* one-shot */
    {"prompt", UC_CFG_STR, OFF(prompt), "", 0, 0, UC_CFG_ONESHOT | UC_CFG_CLI_ONLY,
     "one-shot mode: print the completion of this text and exit"},
    {"prompt-file", UC_CFG_STR, OFF(prompt_file), "", 0, 0, UC_CFG_ONESHOT | UC_CFG_CLI_ONLY,
     "one-shot mode: read the prompt from a file ('-' = stdin)"},
    {"max-tokens", UC_CFG_INT, OFF(max_tokens), "128", 1, 1 << 24, UC_CFG_ONESHOT,
     "one-shot: tokens to generate"},
    {"temperature", UC_CFG_DBL, OFF(temperature), "0", 0, 100, UC_CFG_ONESHOT,
     "one-shot: sampling temperature (0 = greedy)"},
    {"seed", UC_CFG_INT, OFF(seed), "0", 0, BIG, UC_CFG_ONESHOT, "one-shot: sampling seed"},
    {"top-k", UC_CFG_INT, OFF(top_k), "0", 0, 1 << 24, UC_CFG_ONESHOT, "one-shot: top-k (0 = off)"},
    {"top-p", UC_CFG_DBL, OFF(top_p), "1", 1e-9, 1, UC_CFG_ONESHOT, "one-shot: top-p"},
    {"min-p", UC_CFG_DBL, OFF(min_p), "0", 0, 1, UC_CFG_ONESHOT, "one-shot: min-p"},
    {"repetition-penalty", UC_CFG_DBL, OFF(repetition_penalty), "1", 1e-6, 100, UC_CFG_ONESHOT,
     "one-shot: repetition penalty"},
    {"stop", UC_CFG_STR, OFF(stop), "", 0, 0, UC_CFG_ONESHOT, "one-shot: a stop string"},
    {"report", UC_CFG_BOOL, OFF(report), "no", 0, 0, UC_CFG_ONESHOT,
     "one-shot: print the compression report and timings to stderr"},
    {"ignore-eos", UC_CFG_BOOL, OFF(ignore_eos), "no", 0, 0, UC_CFG_ONESHOT,
     "one-shot: keep generating past EOS"},
    {NULL, UC_CFG_STR, 0, NULL, 0, 0, 0, NULL},
};

/* The sections of --help, each from its first option to the next section's. */
static const struct {
    const char *first;
    const char *title;
} sections[] = {
    {"model", "Model and engine"},
    {"listen", "Server (gRPC, limits, logging)"},
    {"http-listen", "OpenAI-compatible HTTP front and API keys"},
    {"policy", "Compression (defaults of requests that set none)"},
    {"profile", "Calibration (the compression profile)"},
    {"prompt", "One-shot mode (no server: print a completion and exit)"},
};

/* The value placeholder of --help: a name's own, else one by type. */
static const struct {
    const char *name;
    const char *value;
} placeholders[] = {
    {"model", "DIR"},
    {"config", "FILE"},
    {"backend", "cpu|cuda"},
    {"schedule", "mixed|prefill-first"},
    {"decode-overlap", "auto|yes|no"},
    {"max-decode-wait-ms", "MS"},
    {"step-trace", "FILE"},
    {"send-trace", "FILE"},
    {"comm-timeout", "MS"},
    {"heartbeat", "MS"},
    {"profile", "FILE"},
    {"calibration-text", "FILE"},
    {"log-level", "LEVEL"},
    {"listen", "HOST:PORT"},
    {"metrics-port", "PORT"},
    {"tls-cert", "FILE"},
    {"tls-key", "FILE"},
    {"drain-timeout", "MS"},
    {"http-listen", "HOST:PORT"},
    {"served-model-name", "NAME"},
    {"chat-template", "FILE"},
    {"api-key", "KEY"},
    {"api-key-file", "FILE"},
    {"admin-api-key", "KEY"},
    {"policy", "NAME"},
    {"decode-mode", "append|evict"},
    {"grouping", "profile|prompt"},
    {"stage-starts", "L1,L2"},
    {"row-score", "SCORE"},
    {"prompt-file", "FILE"},
};

static const char *placeholder(const struct uc_cfg_option *o)
{
    for (size_t i = 0; i < sizeof placeholders / sizeof placeholders[0]; i++) {
        if (strcmp(placeholders[i].name, o->name) == 0) {
            return placeholders[i].value;
        }
    }
    switch (o->type) {
    case UC_CFG_INT:
        return "N";
    case UC_CFG_BYTES:
        return "BYTES";
    case UC_CFG_DBL:
        return "X";
    case UC_CFG_BOOL:
        return "[yes|no]";
    case UC_CFG_STR:
    default:
        return "TEXT";
    }
}

const struct uc_cfg_option *uc_config_options(void) { return options; }

static const struct uc_cfg_option *find(const char *name)
{
    for (const struct uc_cfg_option *o = options; o->name; o++) {
        if (strcmp(o->name, name) == 0) {
            return o;
        }
    }
    return NULL;
}

static bool parse_bytes(const char *v, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || !isfinite(x)) {
        return false;
    }
    while (*end == ' ') {
        end++;
    }
    double mul = 1;
    if (*end) {
        if (!strcasecmp(end, "k") || !strcasecmp(end, "kib") || !strcasecmp(end, "kb")) {
            mul = 1024.0;
        } else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib") || !strcasecmp(end, "mb")) {
            mul = 1048576.0;
        } else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib") || !strcasecmp(end, "gb")) {
            mul = 1073741824.0;
        } else if (!strcasecmp(end, "t") || !strcasecmp(end, "tib") || !strcasecmp(end, "tb")) {
            mul = 1099511627776.0;
        } else {
            return false;
        }
    }
    *out = floor(x * mul);
    return true;
}

/* Sets one option from text; writes a message naming it on failure. */
static uc_status set_option(struct uc_config *c, const struct uc_cfg_option *o, const char *v,
                            char *msg, size_t msg_size)
{
    char *base = (char *)c + o->offset;
    switch (o->type) {
    case UC_CFG_STR: {
        char **dst = (char **)(void *)base;
        char *dup = uc_strdup(v);
        if (!dup) {
            return UC_ERRF(UC_ERR_NOMEM, "option %s", o->name);
        }
        uc_free(*dst);
        *dst = dup;
        return UC_OK;
    }
    case UC_CFG_BOOL: {
        bool *dst = (bool *)(void *)base;
        if (!strcmp(v, "yes") || !strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "on")) {
            *dst = true;
        } else if (!strcmp(v, "no") || !strcmp(v, "false") || !strcmp(v, "0") ||
                   !strcmp(v, "off")) {
            *dst = false;
        } else {
            snprintf(msg, msg_size, "--%s: '%s' is not yes or no", o->name, v);
            return UC_ERR_INVALID_ARG;
        }
        return UC_OK;
    }
    case UC_CFG_INT:
    case UC_CFG_BYTES:
    case UC_CFG_DBL: {
        double x;
        char *end = NULL;
        bool ok;
        if (o->type == UC_CFG_BYTES) {
            ok = parse_bytes(v, &x);
        } else {
            errno = 0;
            x = strtod(v, &end);
            ok = !errno && end != v && *end == '\0' && isfinite(x);
            if (ok && o->type == UC_CFG_INT && x != floor(x)) {
                ok = false;
            }
        }
        if (!ok && o->type == UC_CFG_BYTES) {
            snprintf(msg, msg_size, "--%s: '%s' is not a size (bytes, or a number with K, M, G or "
                     "T for KiB, MiB, GiB, TiB: 512MiB, 40GiB)", o->name, v);
            return UC_ERR_INVALID_ARG;
        }
        if (!ok) {
            snprintf(msg, msg_size, "--%s: '%s' is not a%s number", o->name, v,
                     o->type == UC_CFG_DBL ? "" : "n integer");
            return UC_ERR_INVALID_ARG;
        }
        if (x < o->min || x > o->max) {
            snprintf(msg, msg_size, "--%s=%s must be in [%g, %g]", o->name, v, o->min, o->max);
            return UC_ERR_INVALID_ARG;
        }
        if (o->type == UC_CFG_DBL) {
            *(double *)(void *)base = x;
        } else {
            *(int64_t *)(void *)base = (int64_t)x;
        }
        return UC_OK;
    }
    }
    return UC_ERR_INVALID_ARG;
}

static uc_status load_file(struct uc_config *c, const char *path, char *msg, size_t msg_size)
{
    char *text = NULL;
    if (uc_file_read_all(&text, NULL, path) != UC_OK) {
        snprintf(msg, msg_size, "--config: cannot read %s", path);
        return UC_ERR_INVALID_ARG;
    }
    uc_status rc = UC_OK;
    int line_no = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line && rc == UC_OK;
         line = strtok_r(NULL, "\n", &save)) {
        line_no++;
        while (isspace((unsigned char)*line)) {
            line++;
        }
        if (*line == '#' || *line == '\0') {
            continue;
        }
        char *sp = line;
        while (*sp && !isspace((unsigned char)*sp)) {
            sp++;
        }
        char *val = sp;
        if (*sp) {
            *sp = '\0';
            val = sp + 1;
        }
        while (isspace((unsigned char)*val)) {
            val++;
        }
        size_t n = strlen(val);
        while (n > 0 && isspace((unsigned char)val[n - 1])) {
            val[--n] = '\0';
        }
        if (n >= 2 && val[0] == '"' && val[n - 1] == '"') {
            val[n - 1] = '\0';
            val++;
        }
        const struct uc_cfg_option *o = find(line);
        if (!o || (o->flags & UC_CFG_CLI_ONLY)) {
            snprintf(msg, msg_size, "%s:%d: unknown option '%s'", path, line_no, line);
            rc = UC_ERR_INVALID_ARG;
            break;
        }
        rc = set_option(c, o, val, msg, msg_size);
        if (rc != UC_OK) {
            char tmp[512];
            snprintf(tmp, sizeof tmp, "%s:%d: %s", path, line_no, msg);
            snprintf(msg, msg_size, "%s", tmp);
        }
    }
    uc_free(text);
    return rc;
}

/* Walks argv; with `only_config` just picks up --config. */
static uc_status parse_args(struct uc_config *c, int argc, char **argv, bool only_config,
                            char *msg, size_t msg_size, bool *help, bool *list)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            *help = true;
            continue;
        }
        if (!strcmp(a, "--list-options")) {
            *list = true;
            continue;
        }
        if (strncmp(a, "--", 2) != 0) {
            snprintf(msg, msg_size, "unexpected argument '%s' (options are --name value)", a);
            return UC_ERR_INVALID_ARG;
        }
        char name[128];
        const char *val = NULL;
        const char *eq = strchr(a + 2, '=');
        size_t nl = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        if (nl >= sizeof name) {
            snprintf(msg, msg_size, "option name too long: %s", a);
            return UC_ERR_INVALID_ARG;
        }
        memcpy(name, a + 2, nl);
        name[nl] = '\0';
        const struct uc_cfg_option *o = find(name);
        if (!o) {
            snprintf(msg, msg_size, "unknown option --%s (see --help)", name);
            return UC_ERR_INVALID_ARG;
        }
        if (eq) {
            val = eq + 1;
        } else if (o->type == UC_CFG_BOOL &&
                   (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)) {
            val = "yes";
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            snprintf(msg, msg_size, "--%s needs a value", name);
            return UC_ERR_INVALID_ARG;
        }
        if (only_config != (o->offset == OFF(config_file))) {
            continue;
        }
        uc_status rc = set_option(c, o, val, msg, msg_size);
        if (rc != UC_OK) {
            return rc;
        }
    }
    return UC_OK;
}

uc_status uc_config_load(struct uc_config *c, int argc, char **argv, char *msg, size_t msg_size,
                         bool *help, bool *list)
{
    memset(c, 0, sizeof *c);
    *help = false;
    *list = false;
    msg[0] = '\0';
    for (const struct uc_cfg_option *o = options; o->name; o++) {
        uc_status rc = set_option(c, o, o->dflt, msg, msg_size);
        if (rc != UC_OK) {
            return rc;
        }
    }
    uc_status rc = parse_args(c, argc, argv, true, msg, msg_size, help, list);
    if (rc == UC_OK && c->config_file[0]) {
        rc = load_file(c, c->config_file, msg, msg_size);
    }
    if (rc == UC_OK) {
        rc = parse_args(c, argc, argv, false, msg, msg_size, help, list);
    }
    return rc;
}

void uc_config_fini(struct uc_config *c)
{
    for (const struct uc_cfg_option *o = options; o->name; o++) {
        if (o->type == UC_CFG_STR) {
            char **p = (char **)(void *)((char *)c + o->offset);
            UC_FREE(*p);
        }
    }
}

uc_status uc_config_validate(const struct uc_config *c, int world_size, char *msg,
                             size_t msg_size)
{
    if (c->tp != 0 && c->tp != world_size) {
        snprintf(msg, msg_size, "--tp=%lld but mpirun started %d rank(s): launch with mpirun -np "
                 "%lld", (long long)c->tp, world_size, (long long)c->tp);
        return UC_ERR_INVALID_ARG;
    }
    if (strcmp(c->backend, "cpu") != 0 && strcmp(c->backend, "cuda") != 0) {
        snprintf(msg, msg_size, "--backend=%s must be cpu or cuda", c->backend);
        return UC_ERR_INVALID_ARG;
    }
    enum uc_schedule sm;
    if (!uc_schedule_parse(c->schedule, &sm)) {
        snprintf(msg, msg_size, "--schedule=%.200s must be mixed or prefill-first", c->schedule);
        return UC_ERR_INVALID_ARG;
    }
    if (strcmp(c->decode_overlap, "auto") != 0 && strcmp(c->decode_overlap, "yes") != 0 &&
        strcmp(c->decode_overlap, "no") != 0) {
        snprintf(msg, msg_size, "--decode-overlap=%.200s must be auto, yes or no",
                 c->decode_overlap);
        return UC_ERR_INVALID_ARG;
    }
    if ((c->tls_cert[0] != '\0') != (c->tls_key[0] != '\0')) {
        snprintf(msg, msg_size, "--tls-cert and --tls-key go together");
        return UC_ERR_INVALID_ARG;
    }
    if (c->heartbeat_ms * 3 > c->comm_timeout_ms) {
        snprintf(msg, msg_size, "--heartbeat=%lld must be at most a third of --comm-timeout=%lld",
                 (long long)c->heartbeat_ms, (long long)c->comm_timeout_ms);
        return UC_ERR_INVALID_ARG;
    }
    if (c->pool_kernel % 2 == 0) {
        snprintf(msg, msg_size, "--pool-kernel=%lld must be odd", (long long)c->pool_kernel);
        return UC_ERR_INVALID_ARG;
    }
    const char *colon = strrchr(c->listen, ':');
    if (!colon || colon == c->listen || atoi(colon + 1) <= 0 || atoi(colon + 1) > 65535) {
        snprintf(msg, msg_size, "--listen=%s must be HOST:PORT", c->listen);
        return UC_ERR_INVALID_ARG;
    }
    if (c->prompt[0] && c->prompt_file[0]) {
        snprintf(msg, msg_size, "--prompt and --prompt-file exclude each other");
        return UC_ERR_INVALID_ARG;
    }
    return UC_OK;
}

/* The shortest decimal that reads back as the same double. */
static void write_double(struct uc_buf *b, double v)
{
    char tmp[64];
    for (int prec = 6; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, v);
        if (strtod(tmp, NULL) == v) {
            break;
        }
    }
    uc_buf_puts(b, tmp);
}

static void write_value(const struct uc_config *c, const struct uc_cfg_option *o,
                        struct uc_buf *b)
{
    const char *base = (const char *)c + o->offset;
    switch (o->type) {
    case UC_CFG_STR: uc_buf_puts(b, *(char *const *)(const void *)base); break;
    case UC_CFG_BOOL: uc_buf_puts(b, *(const bool *)(const void *)base ? "yes" : "no"); break;
    case UC_CFG_DBL: write_double(b, *(const double *)(const void *)base); break;
    case UC_CFG_INT:
    case UC_CFG_BYTES: uc_buf_printf(b, "%lld", (long long)*(const int64_t *)(const void *)base); break;
    }
}

/* write_value, with secrets masked */
static void write_shown(const struct uc_config *c, const struct uc_cfg_option *o,
                        struct uc_buf *b)
{
    if (o->flags & UC_CFG_SECRET) {
        const char *v = *(char *const *)(const void *)((const char *)c + o->offset);
        uc_buf_puts(b, v && v[0] ? "(set)" : "");
        return;
    }
    write_value(c, o, b);
}

char *uc_config_get(const struct uc_config *c, const char *name)
{
    const struct uc_cfg_option *o = find(name);
    if (!o) {
        return NULL;
    }
    struct uc_buf b;
    uc_buf_init(&b);
    write_value(c, o, &b);
    return uc_buf_take(&b);
}

uint64_t uc_config_hash(const struct uc_config *c)
{
    uint64_t h = UC_FNV_INIT;
    struct uc_buf b;
    uc_buf_init(&b);
    for (const struct uc_cfg_option *o = options; o->name; o++) {
        if (o->flags & UC_CFG_RANK_LOCAL) {
            continue;
        }
        b.len = 0;
        uc_buf_puts(&b, o->name);
        uc_buf_puts(&b, "=");
        write_value(c, o, &b);
        h = uc_fnv1a(h, b.data, b.len);
    }
    uc_buf_fini(&b);
    return h;
}

void uc_config_write_help(struct uc_buf *b)
{
    uc_buf_puts(b, "usage: uncompd [--config FILE] [--name value ...]\n"
                   "       mpirun -np R uncompd --tp R [...]      tensor parallel over R ranks\n"
                   "       uncompd --prompt TEXT [--max-tokens N] one-shot: print a completion\n\n"
                   "options (a config file line 'name value' is the same as --name value; sizes\n"
                   "take K, M or G (KiB, MiB, GiB); times are in ms):\n");
    for (const struct uc_cfg_option *o = options; o->name; o++) {
        for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++) {
            if (strcmp(sections[i].first, o->name) == 0) {
                uc_buf_printf(b, "\n%s:\n", sections[i].title);
            }
        }
        char opt[64];
        snprintf(opt, sizeof opt, "--%s %s", o->name, placeholder(o));
        uc_buf_printf(b, "  %-30s %s (default: %s)\n", opt, o->help,
                      o->dflt[0] ? o->dflt : "\"\"");
    }
}

void uc_config_write_table(const struct uc_config *c, struct uc_buf *b)
{
    for (const struct uc_cfg_option *o = options; o->name; o++) {
        if (o->flags & UC_CFG_ONESHOT) {
            continue;
        }
        uc_buf_printf(b, "  %-22s ", o->name);
        write_shown(c, o, b);
        uc_buf_puts(b, "\n");
    }
}

void uc_config_write_info(const struct uc_config *c, struct uc_buf *b)
{
    uc_buf_puts(b, "# Config\n");
    for (const struct uc_cfg_option *o = options; o->name; o++) {
        if (o->flags & (UC_CFG_ONESHOT | UC_CFG_CLI_ONLY)) {
            continue;
        }
        uc_buf_printf(b, "%s:", o->name);
        write_shown(c, o, b);
        uc_buf_puts(b, "\n");
    }
}
