/* `uncompctl bench`: a load generator for uncompd, in the manner of vLLM's benchmark_serving
 * and ghz, plus the output helpers uncompctl shares with it (bench.h).
 *
 * One worker thread per concurrent client, each with its own connection (made before the clock
 * starts). Closed loop by default (--concurrency N); with --rate R the i-th request is due at a
 * seeded Poisson arrival time and a free worker sends it then (at most N in flight). Prompts are
 * lines of a file, whole files of a folder, or synthetic token ids (seeded per request index),
 * so two settings compared with --compare see exactly the same requests and arrival times.
 * Per request: TTFT (call start to the first chunk with tokens), inter-token latencies (each
 * chunk's gap spread over its tokens), TPOT and end-to-end latency, all on the monotonic clock;
 * failures are counted by gRPC code. The report gives throughput and mean/p50/p90/p99.
 *
 * With --http URL the same requests go to the OpenAI-compatible front as streamed
 * /v1/completions (http_client.c, a keep-alive connection per worker; the prompt as token ids
 * or text, the same sampling and compression, usage from the stream's last chunk). A stream
 * event carries text, not token ids, so there each content event counts as one token for TTFT
 * and the inter-token gaps; TPOT and the token totals come from the usage. A setting's
 * front=grpc or front=http picks the front, so --compare front=grpc front=http measures the
 * HTTP front's overhead on identical load; --rounds N alternates the settings N times and adds
 * a table of the medians. */
#include <errno.h>
#include <dirent.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "base/mem.h"
#include "base/util.h"
#include "bench.h"
#include "http_client.h"

/* ========================================================================================= */
/* Shared CLI helpers                                                                        */
/* ========================================================================================= */

int uc_ctl_exit_code(int grpc_code)
{
    if (grpc_code == UC_GRPC_OK) {
        return UC_CTL_EXIT_OK;
    }
    return grpc_code == UC_GRPC_UNAVAILABLE ? UC_CTL_EXIT_UNAVAILABLE : UC_CTL_EXIT_RPC;
}

int uc_ctl_fail(const struct uc_ctl *ctl, const char *what, const struct uc_client_error *err)
{
    fprintf(stderr, "uncompctl: %s: %s: %s\n", what, uc_client_code_name(err->grpc_code),
            err->message);
    if (ctl->json) {
        fprintf(stdout, "{\"error\":{\"code\":%d,\"name\":\"%s\",\"message\":", err->grpc_code,
                uc_client_code_name(err->grpc_code));
        uc_ctl_json_str(stdout, err->message);
        fprintf(stdout, "}}\n");
    }
    int code = uc_ctl_exit_code(err->grpc_code);
    return code == UC_CTL_EXIT_OK ? UC_CTL_EXIT_RPC : code;
}

int uc_ctl_connect_fail(const struct uc_ctl *ctl, const char *what,
                        const struct uc_client_error *err)
{
    int code = uc_ctl_fail(ctl, what, err);
    if (err->grpc_code == UC_GRPC_UNAVAILABLE || err->grpc_code == UC_GRPC_DEADLINE_EXCEEDED) {
        code = UC_CTL_EXIT_UNAVAILABLE;
    } else if (err->grpc_code == UC_GRPC_INVALID_ARGUMENT) {
        code = UC_CTL_EXIT_USAGE; /* a bad address or certificate file: local */
    }
    return code;
}

struct uc_client *uc_ctl_connect(const struct uc_ctl *ctl, const char *what, int *exit_code)
{
    struct uc_client *c = NULL;
    struct uc_client_error err;
    if (uc_client_connect(&c, ctl->server, &ctl->opts, &err) != UC_OK) {
        *exit_code = uc_ctl_connect_fail(ctl, what, &err);
        return NULL;
    }
    *exit_code = UC_CTL_EXIT_OK;
    return c;
}

/* Length of the valid UTF-8 sequence at s[0..avail) (1-4), or 0 if it is not one. */
static int utf8_len(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0];
    int n;
    uint32_t cp;
    if (c < 0x80) {
        return 1;
    } else if ((c & 0xE0) == 0xC0) {
        n = 2;
        cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
        n = 3;
        cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if ((size_t)n > avail) {
        return 0;
    }
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            return 0;
        }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        return 0;
    }
    return n;
}

void uc_ctl_json_str(FILE *f, const char *s)
{
    uc_ctl_json_strn(f, s, s ? strlen(s) : 0);
}

void uc_ctl_json_strn(FILE *f, const char *s, size_t len)
{
    struct uc_buf b;
    uc_buf_init(&b);
    uc_ctl_json_buf(&b, s, len);
    fwrite(b.data ? b.data : "\"\"", 1, b.data ? b.len : 2, f);
    uc_buf_fini(&b);
}

void uc_ctl_json_buf(struct uc_buf *b, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    const unsigned char *end = p + (s ? len : 0);
    uc_buf_append(b, "\"", 1);
    while (p < end) {
        unsigned char c = *p;
        const char *esc = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\n' ? "\\n"
                        : c == '\r' ? "\\r" : c == '\t' ? "\\t" : c == '\b' ? "\\b"
                        : c == '\f' ? "\\f" : NULL;
        if (esc) {
            uc_buf_puts(b, esc);
        } else if (c < 0x20 || c == 0x7F) {
            uc_buf_printf(b, "\\u%04x", c);
        } else if (c < 0x80) {
            uc_buf_append(b, p, 1);
        } else {
            int n = utf8_len(p, (size_t)(end - p));
            if (n == 0) {
                uc_buf_puts(b, "\\ufffd");
            } else {
                uc_buf_append(b, p, (size_t)n);
                p += n;
                continue;
            }
        }
        p++;
    }
    uc_buf_append(b, "\"", 1);
}

void uc_ctl_json_num(FILE *f, double v)
{
    if (!isfinite(v)) {
        fputs("null", f);
    } else {
        fprintf(f, "%.6g", v);
    }
}

void uc_ctl_json_field_num(FILE *f, const char *key, double v)
{
    fprintf(f, ",\"%s\":", key);
    uc_ctl_json_num(f, v);
}

void uc_ctl_json_field_str(FILE *f, const char *key, const char *s)
{
    fprintf(f, ",\"%s\":", key);
    uc_ctl_json_str(f, s);
}

bool uc_ctl_parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    if (!s || !*s || *s == '-' || *s == '+') {
        return false;
    }
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || v > max) {
        return false;
    }
    *out = (uint64_t)v;
    return true;
}

bool uc_ctl_parse_double(const char *s, double *out)
{
    if (!s || !*s) {
        return false;
    }
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || *end != '\0' || !isfinite(v)) {
        return false;
    }
    *out = v;
    return true;
}

bool uc_ctl_parse_u32_list(const char *s, uint32_t **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    size_t cap = 0;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\n' || *p == '\t' || *p == '\r' || *p == ':') {
            p++;
        }
        if (!*p) {
            return true;
        }
        if (*p < '0' || *p > '9') {
            goto fail;
        }
        char *end = NULL;
        errno = 0;
        unsigned long long v = strtoull(p, &end, 10);
        if (errno != 0 || v > UINT32_MAX) {
            goto fail;
        }
        if (*end && *end != ' ' && *end != ',' && *end != '\n' && *end != '\t' && *end != '\r' &&
            *end != ':') {
            goto fail;
        }
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            uint32_t *q = uc_realloc(*out, cap * sizeof(uint32_t));
            if (!q) {
                goto fail;
            }
            *out = q;
        }
        (*out)[(*n)++] = (uint32_t)v;
        p = end;
    }
fail:
    UC_FREE(*out);
    *n = 0;
    return false;
}

/* ========================================================================================= */
/* Configuration                                                                             */
/* ========================================================================================= */

#define MAX_SETTINGS 4
#define MAX_STAGE_STARTS 64
#define MAX_ROUNDS 16

enum front { FRONT_DEFAULT = 0, FRONT_GRPC, FRONT_HTTP };

/* One setting: a label, the front and the compression parameters (strings point into `buf`). */
struct setting {
    char *label;
    char *buf;
    enum front front;            /* FRONT_DEFAULT until resolved: HTTP with --http, else gRPC */
    struct uc_compression comp;
    uint32_t stage_starts[MAX_STAGE_STARTS];
};

struct bench_cfg {
    int concurrency;
    double rate;                 /* requests/s; 0 = closed loop */
    int64_t requests;            /* 0 = until the duration ends */
    double duration_s;           /* 0 = until `requests` are sent */
    const char *prompt_file;
    const char *prompt_dir;
    uint32_t prompt_tokens;
    uint32_t max_tokens;
    uint64_t seed;
    double temperature;
    bool ignore_eos;
    int warmup;
    int rounds;                  /* the settings run in turn this many times */
    bool progress;
    int connections;             /* the gRPC clients' connections (clients dealt in turn) */
    FILE *token_times;           /* --token-times: every chunk's arrival, for latency studies */
    /* --http: the OpenAI-compatible front */
    const char *http_url;
    char http_host[256];
    int http_port;
    char http_path[512];         /* URL prefix + /v1/completions */
    const char *api_key;
    /* prompts */
    char **texts;
    size_t n_texts;
    char *file_data;             /* owns the lines of --prompt-file */
    uint32_t vocab;
    int32_t bos;
    int32_t *eos;
    size_t n_eos;
    /* settings */
    struct setting settings[MAX_SETTINGS];
    int n_settings;
};

static const char usage_bench[] =
    "usage: uncompctl bench [options]\n"
    "\n"
    "Sends Generate requests (or /v1/completions with --http) and reports throughput\n"
    "(requests/s, output tokens/s, total tokens/s) and latency (TTFT, inter-token, TPOT,\n"
    "end-to-end: mean, p50, p90, p99) with failures counted by gRPC code. One thread per\n"
    "concurrent client; the gRPC clients share --connections connections, the HTTP clients\n"
    "have one each; times on the monotonic clock; a progress bar on stderr when it is a\n"
    "terminal.\n"
    "\n"
    "Load:\n"
    "  -c, --concurrency N     concurrent clients / most requests in flight (default 1; with\n"
    "                          --rate: 16)\n"
    "  -r, --rate R            open loop: Poisson arrivals at R requests/s (seeded)\n"
    "  -n, --requests N        requests per run (default 32 unless --duration)\n"
    "  -d, --duration S        run for S seconds (with --requests: whichever comes first)\n"
    "      --warmup N          N requests before the measurement, not counted, sent at the\n"
    "                          run's concurrency (default 0)\n"
    "      --rounds N          run the settings in turn N times (A B A B ...) and add a table of\n"
    "                          each figure's median over the rounds (default 1)\n"
    "      --connections N     the gRPC clients' TCP connections, clients dealt to them in\n"
    "                          turn (default 1: every stream on one HTTP/2 connection, as one\n"
    "                          process's channels to a server are; -c's value: one each, as\n"
    "                          separate users have)\n"
    "Front (default: gRPC at --server):\n"
    "      --http URL          send the requests to the OpenAI-compatible HTTP front at URL\n"
    "                          (http://HOST:PORT) as streamed /v1/completions: the same prompts\n"
    "                          (token ids or text), sampling and compression; each stream event\n"
    "                          counts as one token for TTFT and ITL (TPOT and totals use the\n"
    "                          usage); a setting's front=grpc or front=http overrides it\n"
    "Prompts (default: --prompt-tokens 128):\n"
    "      --prompt-file F     one prompt per line of F, used in turn\n"
    "      --prompt-dir D      each regular file of D is one prompt (sorted by name)\n"
    "      --prompt-tokens N   synthetic: N random token ids per request (seeded), sent as ids\n"
    "Generation:\n"
    "  -m, --max-tokens N      tokens per request (default 32)\n"
    "      --temperature T     default 0 (greedy)\n"
    "      --seed S            seed of prompts, arrivals and sampling (default 0)\n"
    "      --no-ignore-eos     let EOS end a request early (default: ignore EOS, so every\n"
    "                          request generates --max-tokens)\n"
    "Compression (one setting; default: the server's):\n"
    "      --policy NAME  --kv-budget N  --window N  --decode-mode M  --grouping G\n"
    "      --stage-starts L1,L2\n"
    "      --compare A B [C D] run the same load once per setting and print them side by side;\n"
    "                          a setting is key=value pairs joined by commas, keys: policy,\n"
    "                          kv_budget, window, pool_kernel, sink_tokens, head_groups,\n"
    "                          decode_mode, grouping, stage_starts (layers joined by ':'), r_min,\n"
    "                          front (grpc or http)\n"
    "                          e.g. --compare policy=full policy=uncomp,kv_budget=128\n"
    "                          --http http://127.0.0.1:8000 --compare front=grpc front=http\n"
    "Output:\n"
    "      --no-progress       no progress bar\n"
    "      --token-times FILE  write every streamed chunk's arrival as a line 'SETTING REQUEST\n"
    "                          TOKENS SECONDS ID MONOTONIC' (seconds from the run's start, the\n"
    "                          server's request id, the monotonic clock), then '#stall' lines:\n"
    "                          when a 1 ms sleep of this process woke over 1 ms late (the host\n"
    "                          was busy); tests/bench/token_times.py reads it\n"
    "  -j, --json              one JSON object: the configuration and one entry per run\n"
    "\n"
    "Exit: 0 the runs completed (failed requests are reported, not fatal); 1 every request of\n"
    "a run failed; 2 usage; 3 cannot connect.\n";

static void bench_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void bench_usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "uncompctl: bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see 'uncompctl bench --help')\n");
    va_end(ap);
    exit(UC_CTL_EXIT_USAGE);
}

/* Parses "policy=uncomp,kv_budget=128,..." into *s (label = the spec). */
static void parse_setting(struct setting *s, const char *spec)
{
    memset(s, 0, sizeof(*s));
    s->label = uc_strdup(spec);
    s->buf = uc_strdup(spec);
    if (!s->label || !s->buf) {
        bench_usage_error("out of memory");
    }
    char *save = NULL;
    for (char *kv = strtok_r(s->buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq || eq == kv) {
            bench_usage_error("setting '%s': expected key=value, got '%s'", spec, kv);
        }
        *eq = '\0';
        char *key = kv;
        const char *val = eq + 1;
        for (char *k = key; *k; k++) {
            if (*k == '-') {
                *k = '_';
            }
        }
        uint64_t u = 0;
        double d = 0;
        if (strcmp(key, "policy") == 0) {
            s->comp.policy = val;
        } else if (strcmp(key, "front") == 0) {
            if (strcmp(val, "grpc") != 0 && strcmp(val, "http") != 0) {
                bench_usage_error("setting '%s': front is grpc or http", spec);
            }
            s->front = strcmp(val, "http") == 0 ? FRONT_HTTP : FRONT_GRPC;
        } else if (strcmp(key, "decode_mode") == 0) {
            s->comp.decode_mode = val;
        } else if (strcmp(key, "grouping") == 0) {
            s->comp.grouping = val;
        } else if (strcmp(key, "r_min") == 0) {
            if (!uc_ctl_parse_double(val, &d) || d < 0 || d > 1) {
                bench_usage_error("setting '%s': r_min expects a number in [0, 1]", spec);
            }
            s->comp.r_min = (float)d;
        } else if (strcmp(key, "stage_starts") == 0) {
            uint32_t *v = NULL;
            size_t n = 0;
            if (!uc_ctl_parse_u32_list(val, &v, &n) || n > MAX_STAGE_STARTS) {
                bench_usage_error("setting '%s': stage_starts expects layers joined by ':'",
                                  spec);
            }
            if (n) {
                memcpy(s->stage_starts, v, n * sizeof(uint32_t));
            }
            uc_free(v);
            s->comp.stage_starts = s->stage_starts;
            s->comp.n_stage_starts = n;
        } else {
            uint32_t *dst = strcmp(key, "kv_budget") == 0     ? &s->comp.kv_budget
                            : strcmp(key, "window") == 0      ? &s->comp.window
                            : strcmp(key, "pool_kernel") == 0 ? &s->comp.pool_kernel
                            : strcmp(key, "sink_tokens") == 0 ? &s->comp.sink_tokens
                            : strcmp(key, "head_groups") == 0 ? &s->comp.head_groups
                                                              : NULL;
            if (!dst) {
                bench_usage_error("setting '%s': unknown key '%s'", spec, key);
            }
            if (!uc_ctl_parse_u64(val, UINT32_MAX, &u)) {
                bench_usage_error("setting '%s': %s expects an integer", spec, key);
            }
            *dst = (uint32_t)u;
        }
    }
}

static void setting_fini(struct setting *s)
{
    uc_free(s->label);
    uc_free(s->buf);
    memset(s, 0, sizeof(*s));
}

/* Loads --prompt-file (one prompt per non-empty line) or --prompt-dir (one per file). */
static void load_prompts(struct bench_cfg *cfg)
{
    if (cfg->prompt_file) {
        if (uc_file_read_all(&cfg->file_data, NULL, cfg->prompt_file) != UC_OK) {
            bench_usage_error("cannot read --prompt-file '%s'", cfg->prompt_file);
        }
        size_t cap = 0;
        char *save = NULL;
        for (char *line = strtok_r(cfg->file_data, "\n", &save); line;
             line = strtok_r(NULL, "\n", &save)) {
            size_t len = strlen(line);
            if (len && line[len - 1] == '\r') {
                line[len - 1] = '\0';
            }
            if (!line[0]) {
                continue;
            }
            if (cfg->n_texts == cap) {
                cap = cap ? cap * 2 : 64;
                char **t = uc_realloc(cfg->texts, cap * sizeof(char *));
                if (!t) {
                    bench_usage_error("out of memory");
                }
                cfg->texts = t;
            }
            cfg->texts[cfg->n_texts++] = line;
        }
        if (cfg->n_texts == 0) {
            bench_usage_error("--prompt-file '%s' has no non-empty line", cfg->prompt_file);
        }
        return;
    }
    if (cfg->prompt_dir) {
        struct dirent **names = NULL;
        int n = scandir(cfg->prompt_dir, &names, NULL, alphasort);
        if (n < 0) {
            bench_usage_error("cannot read --prompt-dir '%s'", cfg->prompt_dir);
        }
        cfg->texts = uc_calloc((size_t)n + 1, sizeof(char *));
        for (int i = 0; i < n; i++) {
            if (names[i]->d_name[0] != '.' && cfg->texts) {
                char *path = uc_path_join(cfg->prompt_dir, names[i]->d_name);
                char *data = NULL;
                if (path && uc_file_exists(path) &&
                    uc_file_read_all(&data, NULL, path) == UC_OK) {
                    if (data[0]) {
                        cfg->texts[cfg->n_texts++] = data;
                    } else {
                        uc_free(data);
                    }
                }
                uc_free(path);
            }
            free(names[i]); /* scandir allocates with malloc */
        }
        free(names);
        if (cfg->n_texts == 0) {
            bench_usage_error("--prompt-dir '%s' has no readable non-empty file",
                              cfg->prompt_dir);
        }
    }
}

static void cfg_fini(struct bench_cfg *cfg)
{
    if (cfg->prompt_dir) {
        for (size_t i = 0; i < cfg->n_texts; i++) {
            uc_free(cfg->texts[i]);
        }
    }
    uc_free(cfg->texts);
    uc_free(cfg->file_data);
    if (cfg->token_times) {
        fclose(cfg->token_times);
    }
    uc_free(cfg->eos);
    for (int i = 0; i < cfg->n_settings; i++) {
        setting_fini(&cfg->settings[i]);
    }
}

/* ========================================================================================= */
/* Running                                                                                   */
/* ========================================================================================= */

/* One finished (or failed) request. */
struct rec {
    double ttft_ms;
    double e2e_ms;
    double tpot_ms;              /* (e2e - ttft) / (output tokens - 1); NAN with < 2 tokens */
    uint32_t prompt_tokens;
    uint32_t output_tokens;
    int code;                    /* gRPC code; 0 = success */
    uint64_t kv_full;
    uint64_t kv_kept;
};

struct run;

/* One chunk's arrival (--token-times). */
struct arrival {
    int64_t request;
    uint32_t tokens;
    double t;                    /* monotonic clock (uc_time_s), as the daemon's traces */
    char id[64];                 /* the server's request id (joins --send-trace) */
};

/* --token-times: a thread that sleeps 1 ms at a time and notes every wake-up that came more
 * than STALL_PROBE_LATE_MS late, so a late token can be told apart from a host whose CPUs were
 * all busy (this process's threads waited for a core as well). */
#define STALL_PROBE_LATE_MS 1.0
#define STALL_PROBE_MAX 65536
struct stall_probe {
    pthread_t thread;
    bool started;
    atomic_bool quit;
    size_t n;
    double t[STALL_PROBE_MAX];   /* when it woke (monotonic seconds) */
    float late_ms[STALL_PROBE_MAX];
};

struct worker {
    struct run *run;
    struct uc_client *client;    /* gRPC settings */
    struct uc_http_conn *http;   /* HTTP settings */
    struct uc_buf body;          /* HTTP: the request body being built */
    pthread_t thread;
    struct rec *recs;
    size_t n_recs, cap_recs;
    double *itl;                 /* inter-token latencies, ms */
    size_t n_itl, cap_itl;
    struct arrival *arr;         /* --token-times: each chunk (kept in memory while it runs) */
    size_t n_arr, cap_arr;
    uint32_t *ids;               /* synthetic prompt buffer */
    bool oom;
    double t_done;               /* when its last request ended (uc_time_s) */
};

struct run {
    const struct bench_cfg *cfg;
    const struct setting *set;
    struct worker *workers;
    int n_workers;
    pthread_mutex_t mu;          /* guards next, next_arrival_s, rng */
    int64_t next;                /* next request index to claim */
    double next_arrival_s;       /* offset of request `next` from t0 (rate mode) */
    struct uc_rng rng;           /* arrivals */
    double t0;
    double t_end;
    atomic_int_fast64_t done;
    atomic_int_fast64_t failed;
    atomic_int workers_done;
    atomic_int warm_next;        /* --warmup: the next warm-up request to send */
};

static volatile sig_atomic_t bench_interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    bench_interrupted = 1;
}

/* The prompt of request `idx`: text, or synthetic ids written to w->ids. */
static void make_prompt(const struct bench_cfg *cfg, struct worker *w, int64_t idx,
                        struct uc_generate_params *p)
{
    if (cfg->n_texts) {
        p->text = cfg->texts[(size_t)idx % cfg->n_texts];
        return;
    }
    struct uc_rng r;
    uc_rng_seed(&r, cfg->seed * 0x9E3779B97F4A7C15ULL + (uint64_t)idx + 1);
    uint32_t lo = cfg->vocab > 512 ? 256 : 0; /* skip byte and special tokens of larger vocabs */
    uint32_t span = cfg->vocab - lo;
    for (uint32_t i = 0; i < cfg->prompt_tokens; i++) {
        uint32_t id;
        bool special;
        do {
            id = lo + (uint32_t)(uc_rng_next(&r) % span);
            special = (int64_t)id == cfg->bos;
            for (size_t e = 0; e < cfg->n_eos; e++) {
                special = special || (int64_t)id == cfg->eos[e];
            }
        } while (special && span > 1 + cfg->n_eos);
        w->ids[i] = id;
    }
    p->token_ids = w->ids;
    p->n_token_ids = cfg->prompt_tokens;
}

struct track {
    struct worker *w;
    int64_t idx; /* the request's index (-1: a warm-up) */
    double t0;
    double t_prev;
    double ttft_ms;
    uint64_t tokens;
};

static bool push_itl(struct worker *w, double v)
{
    if (w->n_itl == w->cap_itl) {
        size_t cap = w->cap_itl ? w->cap_itl * 2 : 1024;
        double *q = uc_realloc(w->itl, cap * sizeof(double));
        if (!q) {
            return false;
        }
        w->itl = q;
        w->cap_itl = cap;
    }
    w->itl[w->n_itl++] = v;
    return true;
}

/* A measured request's TTFT (first chunk) or inter-token gaps (a chunk of n tokens: n gaps of
 * 1/n of its interval; the first chunk's extra tokens came with the first: gap 0). False: out
 * of memory. */
static bool sample_gaps(struct track *t, const struct uc_chunk *ch)
{
    if (t->tokens == 0) {
        t->ttft_ms = (ch->arrival_s - t->t0) * 1e3;
        for (size_t i = 1; i < ch->n_token_ids; i++) {
            if (!push_itl(t->w, 0.0)) {
                return false;
            }
        }
        return true;
    }
    double gap = (ch->arrival_s - t->t_prev) * 1e3 / (double)ch->n_token_ids;
    for (size_t i = 0; i < ch->n_token_ids; i++) {
        if (!push_itl(t->w, gap)) {
            return false;
        }
    }
    return true;
}

static int track_chunk(const struct uc_chunk *ch, void *user)
{
    struct track *t = user;
    if (ch->n_token_ids == 0) {
        return 0;
    }
    struct worker *w = t->w;
    if (w->run->cfg->token_times && t->idx >= 0) {
        if (w->n_arr == w->cap_arr) {
            size_t cap = w->cap_arr ? w->cap_arr * 2 : 1024;
            struct arrival *q = uc_realloc(w->arr, cap * sizeof *q);
            if (!q) {
                w->oom = true;
                return 1;
            }
            w->arr = q;
            w->cap_arr = cap;
        }
        struct arrival *a = &w->arr[w->n_arr++];
        *a = (struct arrival){t->idx, (uint32_t)ch->n_token_ids, ch->arrival_s, ""};
        snprintf(a->id, sizeof a->id, "%s",
                 ch->request_id && ch->request_id[0] ? ch->request_id : "-");
    }
    if (t->idx >= 0 && !sample_gaps(t, ch)) { /* a warm-up (idx -1) leaves no samples */
        t->w->oom = true;
        return 1;
    }
    t->tokens += ch->n_token_ids;
    t->t_prev = ch->arrival_s;
    return 0;
}

/* Records a request: its status code (0 = success), the tracked chunks, the totals from the
 * final message. */
static void fill_rec(struct rec *rec, int code, const struct track *t, double t1,
                     uint32_t prompt_tokens, uint32_t completion_tokens, uint64_t kv_full,
                     uint64_t kv_kept)
{
    memset(rec, 0, sizeof(*rec));
    rec->code = code;
    rec->e2e_ms = (t1 - t->t0) * 1e3;
    rec->ttft_ms = t->tokens ? t->ttft_ms : NAN;
    rec->prompt_tokens = prompt_tokens;
    rec->output_tokens = completion_tokens ? completion_tokens : (uint32_t)t->tokens;
    rec->tpot_ms = rec->output_tokens > 1
                       ? (rec->e2e_ms - rec->ttft_ms) / (double)(rec->output_tokens - 1)
                       : NAN;
    rec->kv_full = kv_full;
    rec->kv_kept = kv_kept;
}

/* Sends one request over gRPC and records it (when rec is not NULL). */
static void one_request_grpc(struct worker *w, const struct bench_cfg *cfg,
                             const struct setting *set, int64_t idx, struct rec *rec)
{
    struct uc_generate_params p = uc_generate_default_params();
    make_prompt(cfg, w, idx, &p);
    p.sampling.max_tokens = cfg->max_tokens;
    p.sampling.temperature = (float)cfg->temperature;
    p.sampling.has_temperature = true;
    p.sampling.seed = cfg->seed + (uint64_t)idx;
    p.sampling.has_seed = true;
    p.sampling.ignore_eos = cfg->ignore_eos;
    if (set) {
        p.compression = set->comp;
    }
    struct track t = {.w = w, .idx = rec ? idx : -1, .t0 = uc_time_s()};
    struct uc_completion comp;
    struct uc_client_error err;
    uc_status rc = uc_client_generate_stream(w->client, &p, track_chunk, &t, &comp, &err);
    double t1 = uc_time_s();
    if (rec) {
        int code = rc == UC_OK ? UC_GRPC_OK : err.grpc_code;
        if (code == UC_GRPC_OK && comp.finish_reason == UC_FINISH_ABORTED) {
            code = UC_GRPC_ABORTED;
        }
        fill_rec(rec, code, &t, t1, comp.prompt_tokens, comp.completion_tokens,
                 comp.has_compression ? comp.compression.kv_tokens_full : 0,
                 comp.has_compression ? comp.compression.kv_tokens_kept : 0);
    }
    uc_completion_fini(&comp);
}

/* ---- the HTTP front ---------------------------------------------------------------------- */

/* The value of "key" in a JSON object's text (after the colon), or NULL. Enough for the
 * compact, well-formed chunks of an OpenAI server: a key inside a string value would have
 * escaped quotes. */
static const char *json_value(const char *json, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = strchr(json, '"'); p; p = strchr(p + 1, '"')) {
        if (strncmp(p + 1, key, kl) != 0 || p[kl + 1] != '"' || (p > json && p[-1] == '\\')) {
            continue;
        }
        const char *v = p + kl + 2;
        while (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r') {
            v++;
        }
        if (*v != ':') {
            continue;
        }
        v++;
        while (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r') {
            v++;
        }
        return v;
    }
    return NULL;
}

static uint64_t json_u64(const char *json, const char *key)
{
    const char *v = json_value(json, key);
    return v && *v >= '0' && *v <= '9' ? strtoull(v, NULL, 10) : 0;
}

/* A streamed completion as it arrives. */
struct http_track {
    struct track t;
    uint32_t prompt_tokens, completion_tokens;
    uint64_t kv_full, kv_kept;
    bool aborted, failed;
};

static int http_event(void *user, const char *data, size_t len)
{
    struct http_track *h = user;
    double now = uc_time_s();
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
        return 0;
    }
    if (json_value(data, "error")) { /* the request failed after the stream began */
        h->failed = true;
        return 0;
    }
    const char *v = json_value(data, "text");
    if (v && v[0] == '"' && v[1] != '"') { /* text, so a token (or several held back) */
        struct uc_chunk ch = {.n_token_ids = 1, .arrival_s = now};
        if (track_chunk(&ch, &h->t) != 0) {
            return 1;
        }
    }
    v = json_value(data, "finish_reason");
    if (v && strncmp(v, "\"abort\"", 7) == 0) {
        h->aborted = true;
    }
    v = json_value(data, "usage");
    if (v && *v == '{') {
        h->prompt_tokens = (uint32_t)json_u64(v, "prompt_tokens");
        h->completion_tokens = (uint32_t)json_u64(v, "completion_tokens");
    }
    if (json_value(data, "kv_tokens_full")) { /* the compression report, under "uncomp" */
        h->kv_full = json_u64(data, "kv_tokens_full");
        h->kv_kept = json_u64(data, "kv_tokens_kept");
    }
    return 0;
}

/* The request of one_request_grpc as a streamed /v1/completions body. */
static void http_body(struct uc_buf *b, const struct bench_cfg *cfg, const struct setting *set,
                      const struct uc_generate_params *p, int64_t idx)
{
    b->len = 0;
    b->oom = false;
    uc_buf_puts(b, "{\"prompt\":");
    if (p->text) {
        uc_ctl_json_buf(b, p->text, strlen(p->text));
    } else {
        for (size_t i = 0; i < p->n_token_ids; i++) {
            uc_buf_printf(b, "%c%" PRIu32, i ? ',' : '[', p->token_ids[i]);
        }
        uc_buf_puts(b, "]");
    }
    if (cfg->max_tokens) {
        uc_buf_printf(b, ",\"max_tokens\":%" PRIu32, cfg->max_tokens);
    }
    uc_buf_printf(b, ",\"temperature\":%.17g,\"seed\":%" PRIu64 ",\"ignore_eos\":%s,"
                  "\"stream\":true,\"stream_options\":{\"include_usage\":true}",
                  cfg->temperature, cfg->seed + (uint64_t)idx,
                  cfg->ignore_eos ? "true" : "false");
    const struct uc_compression *c = set ? &set->comp : NULL;
    if (c && (c->policy || c->kv_budget || c->window || c->pool_kernel || c->sink_tokens ||
              c->head_groups || c->decode_mode || c->grouping || c->n_stage_starts ||
              c->r_min != 0.0f)) {
        char sep = '{';
        uc_buf_puts(b, ",\"uncomp\":");
        const char *strs[][2] = {{"policy", c->policy}, {"decode_mode", c->decode_mode},
                                 {"grouping", c->grouping}};
        for (size_t i = 0; i < 3; i++) {
            if (strs[i][1]) {
                uc_buf_printf(b, "%c\"%s\":", sep, strs[i][0]);
                uc_ctl_json_buf(b, strs[i][1], strlen(strs[i][1]));
                sep = ',';
            }
        }
        const struct {
            const char *key;
            uint32_t v;
        } ints[] = {{"kv_budget", c->kv_budget}, {"window", c->window},
                    {"pool_kernel", c->pool_kernel}, {"sink_tokens", c->sink_tokens},
                    {"head_groups", c->head_groups}};
        for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
            if (ints[i].v) {
                uc_buf_printf(b, "%c\"%s\":%" PRIu32, sep, ints[i].key, ints[i].v);
                sep = ',';
            }
        }
        for (size_t i = 0; i < c->n_stage_starts; i++) {
            uc_buf_printf(b, "%s%" PRIu32, i ? "," : sep == '{' ? "{\"stage_starts\":["
                                                                 : ",\"stage_starts\":[",
                          c->stage_starts[i]);
            sep = ',';
        }
        if (c->n_stage_starts) {
            uc_buf_puts(b, "]");
        }
        if (c->r_min != 0.0f) {
            uc_buf_printf(b, "%c\"r_min\":%.9g", sep, (double)c->r_min);
        }
        uc_buf_puts(b, "}");
    }
    uc_buf_puts(b, "}");
}

/* The gRPC code a bench report counts an HTTP status under. */
static int http_code(int status)
{
    switch (status) {
    case 200:
        return UC_GRPC_OK;
    case 400:
        return UC_GRPC_INVALID_ARGUMENT;
    case 401:
        return UC_GRPC_UNAUTHENTICATED;
    case 404:
        return UC_GRPC_NOT_FOUND;
    case 408:
        return UC_GRPC_DEADLINE_EXCEEDED;
    case 429:
        return UC_GRPC_RESOURCE_EXHAUSTED;
    case 499:
        return UC_GRPC_CANCELLED;
    case 503:
        return UC_GRPC_UNAVAILABLE;
    default:
        return status >= 500 ? UC_GRPC_INTERNAL : UC_GRPC_UNKNOWN;
    }
}

/* Sends one request to the HTTP front and records it (when rec is not NULL). */
static void one_request_http(struct worker *w, const struct bench_cfg *cfg,
                             const struct setting *set, int64_t idx, struct rec *rec)
{
    struct uc_generate_params p = uc_generate_default_params();
    make_prompt(cfg, w, idx, &p);
    http_body(&w->body, cfg, set, &p, idx);
    struct http_track h = {.t = {.w = w, .idx = rec ? idx : -1, .t0 = uc_time_s()}};
    int status = 0;
    char msg[512];
    uc_status rc = w->body.oom ? UC_ERR_NOMEM
                               : uc_http_post(w->http, cfg->http_path, w->body.data, w->body.len,
                                              cfg->api_key, &status, http_event, &h, msg,
                                              sizeof msg);
    double t1 = uc_time_s();
    if (!rec) {
        return;
    }
    int code = rc == UC_OK ? http_code(status)
               : rc == UC_ERR_CANCELLED ? UC_GRPC_CANCELLED
               : rc == UC_ERR_NOMEM ? UC_GRPC_RESOURCE_EXHAUSTED
                                    : UC_GRPC_UNAVAILABLE;
    if (code == UC_GRPC_OK && h.failed) {
        code = UC_GRPC_INTERNAL;
    } else if (code == UC_GRPC_OK && h.aborted) {
        code = UC_GRPC_ABORTED;
    }
    fill_rec(rec, code, &h.t, t1, h.prompt_tokens, h.completion_tokens, h.kv_full, h.kv_kept);
}

/* Sends one request to the setting's front and records it (when rec is not NULL). */
static void one_request(struct worker *w, const struct bench_cfg *cfg, const struct setting *set,
                        int64_t idx, struct rec *rec)
{
    if (set && set->front == FRONT_HTTP) {
        one_request_http(w, cfg, set, idx, rec);
    } else {
        one_request_grpc(w, cfg, set, idx, rec);
    }
}

/* A client sending warm-up requests until none is left. */
static void *warm_main(void *arg)
{
    struct worker *w = arg;
    struct run *r = w->run;
    for (;;) {
        int i = atomic_fetch_add(&r->warm_next, 1);
        if (i >= r->cfg->warmup || bench_interrupted) {
            break;
        }
        one_request(w, r->cfg, r->set, (int64_t)1 << 40 | i, NULL);
    }
    return NULL;
}

/* --warmup N: N requests at the run's concurrency (min(N, clients) at once), not recorded, so
 * what the server does the first time at that concurrency (a batch size's first decode, its
 * buffers) comes before the measurement. False: a client thread could not start. */
static bool warm_up(struct run *r)
{
    int n = r->cfg->warmup < r->n_workers ? r->cfg->warmup : r->n_workers;
    int started = 0;
    atomic_store(&r->warm_next, 0);
    for (; started < n; started++) {
        if (pthread_create(&r->workers[started].thread, NULL, warm_main, &r->workers[started]) !=
            0) {
            fprintf(stderr, "uncompctl: bench: cannot start warm-up client %d\n", started);
            break;
        }
    }
    for (int i = 0; i < started; i++) {
        pthread_join(r->workers[i].thread, NULL);
    }
    return started == n;
}

static void sleep_until(double t)
{
    for (;;) {
        double d = t - uc_time_s();
        if (d <= 0 || bench_interrupted) {
            return;
        }
        if (d > 0.05) {
            d = 0.05; /* wake up now and then to notice an interrupt */
        }
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(d * 1e9)}; /* d < 1 s */
        nanosleep(&ts, NULL);
    }
}

static void *stall_probe_main(void *arg)
{
    struct stall_probe *p = arg;
    const struct timespec ms1 = {.tv_sec = 0, .tv_nsec = 1000 * 1000};
    while (!atomic_load(&p->quit)) {
        double t0 = uc_time_s();
        nanosleep(&ms1, NULL);
        double t1 = uc_time_s();
        double late = (t1 - t0) * 1e3 - 1.0;
        if (late > STALL_PROBE_LATE_MS && p->n < STALL_PROBE_MAX) {
            p->t[p->n] = t1;
            p->late_ms[p->n] = (float)late;
            p->n++;
        }
    }
    return NULL;
}

static struct stall_probe *stall_probe_start(void)
{
    struct stall_probe *p = uc_calloc(1, sizeof *p);
    if (p && pthread_create(&p->thread, NULL, stall_probe_main, p) == 0) {
        p->started = true;
    }
    return p;
}

/* Stops the probe (NULL: none was started) and writes its late wake-ups as '#stall MONOTONIC
 * LATE_MS' lines. */
static void stall_probe_finish(struct stall_probe *p, FILE *out)
{
    if (!p) {
        return;
    }
    if (p->started) {
        atomic_store(&p->quit, true);
        pthread_join(p->thread, NULL);
        fprintf(out, "#probe %.6f 1ms-sleeps late by over %.1f ms: %zu\n", uc_time_s(),
                STALL_PROBE_LATE_MS, p->n);
        for (size_t i = 0; i < p->n; i++) {
            fprintf(out, "#stall %.6f %.3f\n", p->t[i], (double)p->late_ms[i]);
        }
    }
    uc_free(p);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct run *r = w->run;
    const struct bench_cfg *cfg = r->cfg;
    for (;;) {
        if (bench_interrupted || w->oom) {
            break;
        }
        pthread_mutex_lock(&r->mu);
        int64_t idx = r->next;
        double due = 0;
        bool go = cfg->requests == 0 || idx < cfg->requests;
        if (go && cfg->rate > 0) {
            due = r->next_arrival_s;
            go = cfg->duration_s <= 0 || due < cfg->duration_s;
        }
        if (go && cfg->duration_s > 0 && uc_time_s() - r->t0 >= cfg->duration_s) {
            go = false;
        }
        if (go) {
            r->next++;
            if (cfg->rate > 0) {
                double u = uc_rng_uniform(&r->rng);
                r->next_arrival_s += -log(1.0 - u) / cfg->rate;
            }
        }
        pthread_mutex_unlock(&r->mu);
        if (!go) {
            break;
        }
        if (cfg->rate > 0) {
            sleep_until(r->t0 + due);
            if (bench_interrupted) {
                break;
            }
        }
        if (w->n_recs == w->cap_recs) {
            size_t cap = w->cap_recs ? w->cap_recs * 2 : 64;
            struct rec *q = uc_realloc(w->recs, cap * sizeof(*q));
            if (!q) {
                w->oom = true;
                break;
            }
            w->recs = q;
            w->cap_recs = cap;
        }
        struct rec *rec = &w->recs[w->n_recs++];
        one_request(w, cfg, r->set, idx, rec);
        if (rec->code != UC_GRPC_OK) {
            atomic_fetch_add(&r->failed, 1);
        }
        atomic_fetch_add(&r->done, 1);
    }
    w->t_done = uc_time_s();
    atomic_fetch_add(&r->workers_done, 1);
    return NULL;
}

static void draw_progress(const struct run *r, bool final)
{
    const struct bench_cfg *cfg = r->cfg;
    double el = uc_time_s() - r->t0;
    int64_t done = atomic_load(&r->done);
    int64_t failed = atomic_load(&r->failed);
    double frac = 0;
    if (cfg->requests > 0) {
        frac = (double)done / (double)cfg->requests;
    }
    if (cfg->duration_s > 0) {
        double f2 = el / cfg->duration_s;
        frac = cfg->requests > 0 ? fmax(frac, f2) : f2;
    }
    if (final) {
        frac = 1;
    }
    frac = fmin(fmax(frac, 0), 1);
    char bar[31];
    int fill = (int)(frac * 30);
    for (int i = 0; i < 30; i++) {
        bar[i] = i < fill ? '#' : '.';
    }
    bar[30] = '\0';
    fprintf(stderr, "\r[%s] %3d%%  %" PRId64 " done  %" PRId64 " failed  %.1f req/s  %.1fs   ", bar,
            (int)(frac * 100), done, failed, el > 0 ? (double)done / el : 0.0, el);
    if (final) {
        fputc('\n', stderr);
    }
    fflush(stderr);
}

/* Connects every worker, runs the load for one setting, and keeps the workers' records. */
static int run_load(const struct uc_ctl *ctl, const struct bench_cfg *cfg,
                    const struct setting *set, struct run *r)
{
    memset(r, 0, sizeof(*r));
    r->cfg = cfg;
    r->set = set;
    r->n_workers = cfg->concurrency;
    pthread_mutex_init(&r->mu, NULL);
    uc_rng_seed(&r->rng, cfg->seed ^ 0xA5A5A5A5A5A5A5A5ULL);
    if (cfg->rate > 0) {
        r->next_arrival_s = -log(1.0 - uc_rng_uniform(&r->rng)) / cfg->rate;
    }
    r->workers = uc_calloc((size_t)r->n_workers, sizeof(*r->workers));
    if (!r->workers) {
        fprintf(stderr, "uncompctl: bench: out of memory\n");
        return UC_CTL_EXIT_RPC;
    }
    for (int i = 0; i < r->n_workers; i++) {
        struct worker *w = &r->workers[i];
        w->run = r;
        if (cfg->prompt_tokens && !cfg->n_texts) {
            w->ids = uc_calloc(cfg->prompt_tokens, sizeof(uint32_t));
            if (!w->ids) {
                fprintf(stderr, "uncompctl: bench: out of memory\n");
                return UC_CTL_EXIT_RPC;
            }
        }
        uc_buf_init(&w->body);
        if (set->front == FRONT_HTTP) {
            char msg[256];
            if (uc_http_connect(&w->http, cfg->http_host, cfg->http_port, msg, sizeof msg) !=
                UC_OK) {
                fprintf(stderr, "uncompctl: bench: UNAVAILABLE: %s (--http %s)\n", msg,
                        cfg->http_url);
                return UC_CTL_EXIT_UNAVAILABLE;
            }
            continue;
        }
        /* client i on connection i mod N (gRPC shares one among equal channels) */
        struct uc_ctl mine = *ctl;
        mine.opts.connection = cfg->connections > 1 ? i % cfg->connections + 1 : 0;
        int code;
        w->client = uc_ctl_connect(&mine, "bench", &code);
        if (!w->client) {
            return code;
        }
    }
    /* warm-up requests: same setting, not recorded, indices after the measured ones */
    if (!warm_up(r)) {
        return UC_CTL_EXIT_RPC;
    }
    struct stall_probe *probe = cfg->token_times ? stall_probe_start() : NULL;
    r->t0 = uc_time_s();
    int started = 0;
    for (; started < r->n_workers; started++) {
        if (pthread_create(&r->workers[started].thread, NULL, worker_main, &r->workers[started]) !=
            0) {
            fprintf(stderr, "uncompctl: bench: cannot start worker %d\n", started);
            bench_interrupted = 1;
            break;
        }
    }
    bool bar = cfg->progress && isatty(STDERR_FILENO);
    bool cancelled = false;
    while (atomic_load(&r->workers_done) < started) {
        if (bench_interrupted && !cancelled) {
            cancelled = true; /* Ctrl-C: stop sending, cancel what is in flight, report */
            for (int i = 0; i < started; i++) {
                if (r->workers[i].http) {
                    uc_http_cancel(r->workers[i].http);
                } else {
                    uc_client_cancel(r->workers[i].client);
                }
            }
        }
        if (bar) {
            draw_progress(r, false);
        }
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    /* the run ends with its last request, not when this loop next looks (up to 100 ms later:
     * 0.6% of a 17 s run's rate) */
    r->t_end = r->t0;
    for (int i = 0; i < started; i++) {
        pthread_join(r->workers[i].thread, NULL);
        r->t_end = fmax(r->t_end, r->workers[i].t_done);
    }
    if (bar) {
        draw_progress(r, true);
    }
    /* --token-times: one line per chunk, "setting request tokens seconds-since-start
     * request-id monotonic-seconds", then the stall probe's late wake-ups */
    for (int i = 0; cfg->token_times && i < r->n_workers; i++) {
        const struct worker *w = &r->workers[i];
        for (size_t k = 0; k < w->n_arr; k++) {
            const struct arrival *a = &w->arr[k];
            fprintf(cfg->token_times, "%s %" PRId64 " %u %.6f %s %.6f\n",
                    set && set->label ? set->label : "-", a->request, a->tokens, a->t - r->t0,
                    a->id, a->t);
        }
    }
    stall_probe_finish(probe, cfg->token_times);
    for (int i = 0; i < r->n_workers; i++) {
        if (r->workers[i].oom) {
            fprintf(stderr, "uncompctl: bench: out of memory\n");
            return UC_CTL_EXIT_RPC;
        }
    }
    return started == r->n_workers ? UC_CTL_EXIT_OK : UC_CTL_EXIT_RPC;
}

static void run_fini(struct run *r)
{
    for (int i = 0; r->workers && i < r->n_workers; i++) {
        struct worker *w = &r->workers[i];
        uc_client_close(w->client);
        uc_http_close(w->http);
        uc_buf_fini(&w->body);
        uc_free(w->recs);
        uc_free(w->itl);
        uc_free(w->arr);
        uc_free(w->ids);
    }
    uc_free(r->workers);
    pthread_mutex_destroy(&r->mu);
    memset(r, 0, sizeof(*r));
}

/* ========================================================================================= */
/* Summary and report                                                                        */
/* ========================================================================================= */

struct dist {
    double mean, p50, p90, p99, max;
    size_t n;
};

struct summary {
    const char *label;
    double duration_s;
    int64_t completed;
    int64_t failed;
    int64_t errors[UC_GRPC_N_CODES];
    uint64_t prompt_tokens;
    uint64_t output_tokens;
    double req_s, out_tok_s, total_tok_s;
    struct dist ttft, itl, tpot, e2e;
    uint64_t kv_full, kv_kept;
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a;
    double y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Percentile with linear interpolation between closest ranks (numpy's default). */
static double pct(const double *sorted, size_t n, double q)
{
    if (n == 0) {
        return NAN;
    }
    double pos = q * (double)(n - 1);
    size_t lo = (size_t)pos;
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    double f = pos - (double)lo;
    return sorted[lo] + (sorted[hi] - sorted[lo]) * f;
}

/* Sorts v (finite values only are kept) and summarises it. */
static struct dist summarise(double *v, size_t n)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (isfinite(v[i])) {
            v[m++] = v[i];
        }
    }
    struct dist d = {NAN, NAN, NAN, NAN, NAN, m};
    if (m == 0) {
        return d;
    }
    qsort(v, m, sizeof(double), cmp_double);
    double sum = 0;
    for (size_t i = 0; i < m; i++) {
        sum += v[i];
    }
    d.mean = sum / (double)m;
    d.p50 = pct(v, m, 0.50);
    d.p90 = pct(v, m, 0.90);
    d.p99 = pct(v, m, 0.99);
    d.max = v[m - 1];
    return d;
}

static bool summarise_run(const struct run *r, const char *label, struct summary *s)
{
    memset(s, 0, sizeof(*s));
    s->label = label;
    s->duration_s = r->t_end - r->t0;
    size_t n = 0, n_itl = 0;
    for (int i = 0; i < r->n_workers; i++) {
        n += r->workers[i].n_recs;
        n_itl += r->workers[i].n_itl;
    }
    double *ttft = uc_calloc(n + 1, sizeof(double));
    double *tpot = uc_calloc(n + 1, sizeof(double));
    double *e2e = uc_calloc(n + 1, sizeof(double));
    double *itl = uc_calloc(n_itl + 1, sizeof(double));
    bool ok = ttft && tpot && e2e && itl;
    if (ok) {
        size_t k = 0, ki = 0;
        for (int i = 0; i < r->n_workers; i++) {
            const struct worker *w = &r->workers[i];
            for (size_t j = 0; j < w->n_recs; j++) {
                const struct rec *x = &w->recs[j];
                if (x->code != UC_GRPC_OK) {
                    s->failed++;
                    s->errors[x->code >= 0 && x->code < UC_GRPC_N_CODES ? x->code
                                                                        : UC_GRPC_UNKNOWN]++;
                    continue;
                }
                s->completed++;
                s->prompt_tokens += x->prompt_tokens;
                s->output_tokens += x->output_tokens;
                s->kv_full += x->kv_full;
                s->kv_kept += x->kv_kept;
                ttft[k] = x->ttft_ms;
                tpot[k] = x->tpot_ms;
                e2e[k] = x->e2e_ms;
                k++;
            }
            if (w->n_itl > 0) { /* a worker whose requests all failed has no samples */
                memcpy(itl + ki, w->itl, w->n_itl * sizeof(double));
            }
            ki += w->n_itl;
        }
        s->ttft = summarise(ttft, k);
        s->tpot = summarise(tpot, k);
        s->e2e = summarise(e2e, k);
        s->itl = summarise(itl, ki);
        double d = s->duration_s > 0 ? s->duration_s : 1e-9;
        s->req_s = (double)s->completed / d;
        s->out_tok_s = (double)s->output_tokens / d;
        s->total_tok_s = (double)(s->output_tokens + s->prompt_tokens) / d;
    }
    uc_free(ttft);
    uc_free(tpot);
    uc_free(e2e);
    uc_free(itl);
    return ok;
}

static void json_dist(FILE *f, const char *name, const struct dist *d)
{
    fprintf(f, ",\"%s\":{\"mean\":", name);
    uc_ctl_json_num(f, d->mean);
    uc_ctl_json_field_num(f, "p50", d->p50);
    uc_ctl_json_field_num(f, "p90", d->p90);
    uc_ctl_json_field_num(f, "p99", d->p99);
    uc_ctl_json_field_num(f, "max", d->max);
    fprintf(f, ",\"count\":%zu}", d->n);
}

static void json_run(FILE *f, const struct summary *x, int round)
{
    fprintf(f, "{\"setting\":");
    uc_ctl_json_str(f, x->label);
    if (round > 0) {
        fprintf(f, ",\"round\":%d", round);
    }
    fprintf(f, ",\"completed\":%" PRId64 ",\"failed\":%" PRId64 ",\"duration_s\":",
            x->completed, x->failed);
    uc_ctl_json_num(f, x->duration_s);
    uc_ctl_json_field_num(f, "requests_per_s", x->req_s);
    uc_ctl_json_field_num(f, "output_tokens_per_s", x->out_tok_s);
    uc_ctl_json_field_num(f, "total_tokens_per_s", x->total_tok_s);
    fprintf(f, ",\"prompt_tokens_total\":%" PRIu64 ",\"output_tokens_total\":%" PRIu64,
            x->prompt_tokens, x->output_tokens);
    json_dist(f, "ttft_ms", &x->ttft);
    json_dist(f, "itl_ms", &x->itl);
    json_dist(f, "tpot_ms", &x->tpot);
    json_dist(f, "e2e_ms", &x->e2e);
    fprintf(f, ",\"kv_tokens_full\":%" PRIu64 ",\"kv_tokens_kept\":%" PRIu64
               ",\"kv_kept_ratio\":",
            x->kv_full, x->kv_kept);
    uc_ctl_json_num(f, x->kv_full ? (double)x->kv_kept / (double)x->kv_full : NAN);
    fprintf(f, ",\"errors\":{");
    bool first = true;
    for (int c = 0; c < UC_GRPC_N_CODES; c++) {
        if (x->errors[c]) {
            fprintf(f, "%s\"%s\":%" PRId64, first ? "" : ",", uc_client_code_name(c),
                    x->errors[c]);
            first = false;
        }
    }
    fprintf(f, "}}");
}

/* s: rounds x n summaries (round-major); med: the n medians when rounds > 1. */
static void print_json(const struct uc_ctl *ctl, const struct bench_cfg *cfg,
                       const struct summary *s, int n, int rounds, const struct summary *med)
{
    FILE *f = stdout;
    fprintf(f, "{\"server\":");
    uc_ctl_json_str(f, ctl->server);
    if (cfg->http_url) {
        uc_ctl_json_field_str(f, "http", cfg->http_url);
    }
    fprintf(f, ",\"config\":{\"concurrency\":%d,\"rate\":", cfg->concurrency);
    uc_ctl_json_num(f, cfg->rate);
    fprintf(f, ",\"requests\":%" PRId64 ",\"duration_s\":", cfg->requests);
    uc_ctl_json_num(f, cfg->duration_s);
    uc_ctl_json_field_str(f, "prompts", cfg->prompt_file  ? "file"
                       : cfg->prompt_dir ? "dir"
                                         : "synthetic");
    fprintf(f, ",\"prompt_tokens\":%" PRIu32 ",\"max_tokens\":%" PRIu32 ",\"seed\":%" PRIu64
               ",\"temperature\":",
            cfg->n_texts ? 0 : cfg->prompt_tokens, cfg->max_tokens, cfg->seed);
    uc_ctl_json_num(f, cfg->temperature);
    fprintf(f, ",\"ignore_eos\":%s,\"warmup\":%d,\"rounds\":%d,\"connections\":%d},\"runs\":[",
            cfg->ignore_eos ? "true" : "false", cfg->warmup, rounds, cfg->connections);
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < n; i++) {
            fprintf(f, "%s", r || i ? "," : "");
            json_run(f, &s[r * n + i], rounds > 1 ? r + 1 : 0);
        }
    }
    fprintf(f, "]");
    if (rounds > 1) {
        fprintf(f, ",\"medians\":[");
        for (int i = 0; i < n; i++) {
            fprintf(f, "%s", i ? "," : "");
            json_run(f, &med[i], 0);
        }
        fprintf(f, "]");
    }
    fprintf(f, "}\n");
}

/* The median of n values (v is reordered). */
static double median_of(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The median over the rounds of the double (or, with u64, the uint64_t) at byte offset off of
 * setting i's summaries (s: rounds x n, round-major). */
static double median_at(const struct summary *s, int n, int rounds, int i, size_t off, bool u64)
{
    double v[MAX_ROUNDS];
    for (int r = 0; r < rounds; r++) {
        const char *p = (const char *)&s[r * n + i] + off;
        uint64_t u;
        if (u64) {
            memcpy(&u, p, sizeof u);
            v[r] = (double)u;
        } else {
            memcpy(&v[r], p, sizeof v[r]);
        }
    }
    return median_of(v, rounds);
}

/* Each figure's median over the rounds of setting i; failures and errors are summed. */
static void median_summary(const struct summary *s, int n, int rounds, int i, struct summary *out)
{
    *out = s[i];
    static const size_t doubles[] = {offsetof(struct summary, duration_s),
                                     offsetof(struct summary, req_s),
                                     offsetof(struct summary, out_tok_s),
                                     offsetof(struct summary, total_tok_s)};
    static const size_t dists[] = {offsetof(struct summary, ttft), offsetof(struct summary, itl),
                                   offsetof(struct summary, tpot), offsetof(struct summary, e2e)};
    static const size_t stats[] = {offsetof(struct dist, mean), offsetof(struct dist, p50),
                                   offsetof(struct dist, p90), offsetof(struct dist, p99),
                                   offsetof(struct dist, max)};
    static const size_t u64s[] = {offsetof(struct summary, prompt_tokens),
                                  offsetof(struct summary, output_tokens),
                                  offsetof(struct summary, kv_full),
                                  offsetof(struct summary, kv_kept)};
    for (size_t k = 0; k < sizeof(doubles) / sizeof(doubles[0]); k++) {
        double m = median_at(s, n, rounds, i, doubles[k], false);
        memcpy((char *)out + doubles[k], &m, sizeof m);
    }
    for (size_t k = 0; k < sizeof(dists) / sizeof(dists[0]); k++) {
        for (size_t j = 0; j < sizeof(stats) / sizeof(stats[0]); j++) {
            double m = median_at(s, n, rounds, i, dists[k] + stats[j], false);
            memcpy((char *)out + dists[k] + stats[j], &m, sizeof m);
        }
    }
    for (size_t k = 0; k < sizeof(u64s) / sizeof(u64s[0]); k++) {
        uint64_t m = (uint64_t)median_at(s, n, rounds, i, u64s[k], true);
        memcpy((char *)out + u64s[k], &m, sizeof m);
    }
    out->completed = 0;
    out->failed = 0;
    for (int r = 0; r < rounds; r++) {
        out->completed += s[r * n + i].completed;
        out->failed += s[r * n + i].failed;
    }
    out->completed /= rounds; /* per round, for the table */
    out->failed /= rounds;
    for (int c = 0; c < UC_GRPC_N_CODES; c++) {
        out->errors[c] = 0;
        for (int r = 0; r < rounds; r++) {
            out->errors[c] += s[r * n + i].errors[c];
        }
    }
}

/* One table row: a label, then one value per run. */
static void row(int w, const char *label, const struct summary *s, int n, int decimals,
                double (*get)(const struct summary *))
{
    printf("%-26s", label);
    for (int i = 0; i < n; i++) {
        double v = get(&s[i]);
        char buf[64];
        if (isfinite(v)) {
            snprintf(buf, sizeof(buf), "%.*f", decimals, v);
        } else {
            snprintf(buf, sizeof(buf), "-");
        }
        printf("  %*s", w, buf);
    }
    putchar('\n');
}

#define GETTER(name, expr)                                                                         \
    static double name(const struct summary *s)                                                    \
    {                                                                                              \
        return (expr);                                                                             \
    }
GETTER(g_completed, (double)s->completed)
GETTER(g_failed, (double)s->failed)
GETTER(g_duration, s->duration_s)
GETTER(g_req_s, s->req_s)
GETTER(g_out_tok_s, s->out_tok_s)
GETTER(g_total_tok_s, s->total_tok_s)
GETTER(g_prompt_mean, s->completed ? (double)s->prompt_tokens / (double)s->completed : NAN)
GETTER(g_output_mean, s->completed ? (double)s->output_tokens / (double)s->completed : NAN)
GETTER(g_ttft_mean, s->ttft.mean)
GETTER(g_ttft_p50, s->ttft.p50)
GETTER(g_ttft_p90, s->ttft.p90)
GETTER(g_ttft_p99, s->ttft.p99)
GETTER(g_itl_mean, s->itl.mean)
GETTER(g_itl_p50, s->itl.p50)
GETTER(g_itl_p90, s->itl.p90)
GETTER(g_itl_p99, s->itl.p99)
GETTER(g_tpot_mean, s->tpot.mean)
GETTER(g_tpot_p50, s->tpot.p50)
GETTER(g_tpot_p90, s->tpot.p90)
GETTER(g_tpot_p99, s->tpot.p99)
GETTER(g_e2e_mean, s->e2e.mean)
GETTER(g_e2e_p50, s->e2e.p50)
GETTER(g_e2e_p90, s->e2e.p90)
GETTER(g_e2e_p99, s->e2e.p99)
GETTER(g_kv_ratio, s->kv_full ? (double)s->kv_kept / (double)s->kv_full : NAN)
#undef GETTER

/* One table of n runs side by side, under a title line when title is not NULL. */
static void print_table(const struct uc_ctl *ctl, const struct bench_cfg *cfg,
                        const struct summary *s, int n, const char *title)
{
    if (title) {
        printf("== %s\n", title);
    }
    if (cfg->http_url) {
        printf("uncompctl bench: gRPC %s, HTTP %s, ", ctl->server, cfg->http_url);
    } else {
        printf("uncompctl bench: %s, ", ctl->server);
    }
    if (cfg->rate > 0) {
        printf("rate %.3g req/s (Poisson), max concurrency %d", cfg->rate, cfg->concurrency);
    } else {
        printf("concurrency %d", cfg->concurrency);
    }
    if (cfg->connections > 1) {
        printf(" over %d gRPC connections", cfg->connections);
    }
    if (cfg->requests) {
        printf(", %" PRId64 " requests", cfg->requests);
    }
    if (cfg->duration_s > 0) {
        printf(", %.3g s", cfg->duration_s);
    }
    if (cfg->n_texts) {
        printf(", %zu prompts from %s", cfg->n_texts,
               cfg->prompt_file ? cfg->prompt_file : cfg->prompt_dir);
    } else {
        printf(", synthetic prompts of %" PRIu32 " tokens", cfg->prompt_tokens);
    }
    printf(", max_tokens %" PRIu32 ", seed %" PRIu64 "\n\n", cfg->max_tokens, cfg->seed);

    int w = 14;
    for (int i = 0; i < n; i++) {
        int len = (int)strlen(s[i].label);
        w = len > w ? len : w;
    }
    printf("%-26s", "");
    for (int i = 0; i < n; i++) {
        printf("  %*s", w, s[i].label);
    }
    putchar('\n');
    row(w, "requests completed", s, n, 0, g_completed);
    row(w, "requests failed", s, n, 0, g_failed);
    row(w, "duration (s)", s, n, 2, g_duration);
    row(w, "throughput (req/s)", s, n, 3, g_req_s);
    row(w, "output tokens/s", s, n, 1, g_out_tok_s);
    row(w, "total tokens/s", s, n, 1, g_total_tok_s);
    row(w, "prompt tokens (mean)", s, n, 1, g_prompt_mean);
    row(w, "output tokens (mean)", s, n, 1, g_output_mean);
    row(w, "TTFT mean (ms)", s, n, 2, g_ttft_mean);
    row(w, "TTFT p50 (ms)", s, n, 2, g_ttft_p50);
    row(w, "TTFT p90 (ms)", s, n, 2, g_ttft_p90);
    row(w, "TTFT p99 (ms)", s, n, 2, g_ttft_p99);
    row(w, "ITL mean (ms)", s, n, 2, g_itl_mean);
    row(w, "ITL p50 (ms)", s, n, 2, g_itl_p50);
    row(w, "ITL p90 (ms)", s, n, 2, g_itl_p90);
    row(w, "ITL p99 (ms)", s, n, 2, g_itl_p99);
    row(w, "TPOT mean (ms)", s, n, 2, g_tpot_mean);
    row(w, "TPOT p50 (ms)", s, n, 2, g_tpot_p50);
    row(w, "TPOT p90 (ms)", s, n, 2, g_tpot_p90);
    row(w, "TPOT p99 (ms)", s, n, 2, g_tpot_p99);
    row(w, "E2E mean (ms)", s, n, 2, g_e2e_mean);
    row(w, "E2E p50 (ms)", s, n, 2, g_e2e_p50);
    row(w, "E2E p90 (ms)", s, n, 2, g_e2e_p90);
    row(w, "E2E p99 (ms)", s, n, 2, g_e2e_p99);
    row(w, "KV kept / full", s, n, 4, g_kv_ratio);
    printf("%-26s", "errors");
    for (int i = 0; i < n; i++) {
        char buf[256] = "-";
        size_t used = 0;
        for (int c = 0; c < UC_GRPC_N_CODES; c++) {
            if (s[i].errors[c] && used < sizeof(buf) - 1) {
                int k = snprintf(buf + used, sizeof(buf) - used, "%s%s=%" PRId64,
                                 used ? " " : "", uc_client_code_name(c), s[i].errors[c]);
                used += k > 0 ? (size_t)k : 0;
            }
        }
        printf("  %*s", w, buf);
    }
    putchar('\n');
}

/* ========================================================================================= */
/* Command line                                                                              */
/* ========================================================================================= */

enum {
    B_PROMPT_FILE = 300,
    B_PROMPT_DIR,
    B_PROMPT_TOKENS,
    B_SEED,
    B_TEMPERATURE,
    B_IGNORE_EOS,
    B_NO_IGNORE_EOS,
    B_WARMUP,
    B_COMPARE,
    B_POLICY,
    B_KV_BUDGET,
    B_WINDOW,
    B_DECODE_MODE,
    B_GROUPING,
    B_STAGE_STARTS,
    B_NO_PROGRESS,
    B_HTTP,
    B_ROUNDS,
    B_TOKEN_TIMES,
    B_CONNECTIONS,
};

static uint64_t bench_u64(const char *opt, const char *v, uint64_t max)
{
    uint64_t x;
    if (!uc_ctl_parse_u64(v, max, &x)) {
        bench_usage_error("%s expects an integer in [0, %" PRIu64 "], got '%s'", opt, max, v);
    }
    return x;
}

static double bench_double(const char *opt, const char *v, double lo, double hi)
{
    double x;
    if (!uc_ctl_parse_double(v, &x) || x < lo || x > hi) {
        bench_usage_error("%s expects a number in [%g, %g], got '%s'", opt, lo, hi, v);
    }
    return x;
}

int uc_bench_main(const struct uc_ctl *ctl_in, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"json", no_argument, NULL, 'j'},
        {"concurrency", required_argument, NULL, 'c'},
        {"rate", required_argument, NULL, 'r'},
        {"requests", required_argument, NULL, 'n'},
        {"duration", required_argument, NULL, 'd'},
        {"max-tokens", required_argument, NULL, 'm'},
        {"prompt-file", required_argument, NULL, B_PROMPT_FILE},
        {"prompt-dir", required_argument, NULL, B_PROMPT_DIR},
        {"prompt-tokens", required_argument, NULL, B_PROMPT_TOKENS},
        {"seed", required_argument, NULL, B_SEED},
        {"temperature", required_argument, NULL, B_TEMPERATURE},
        {"ignore-eos", no_argument, NULL, B_IGNORE_EOS},
        {"no-ignore-eos", no_argument, NULL, B_NO_IGNORE_EOS},
        {"warmup", required_argument, NULL, B_WARMUP},
        {"compare", required_argument, NULL, B_COMPARE},
        {"policy", required_argument, NULL, B_POLICY},
        {"kv-budget", required_argument, NULL, B_KV_BUDGET},
        {"window", required_argument, NULL, B_WINDOW},
        {"decode-mode", required_argument, NULL, B_DECODE_MODE},
        {"grouping", required_argument, NULL, B_GROUPING},
        {"stage-starts", required_argument, NULL, B_STAGE_STARTS},
        {"no-progress", no_argument, NULL, B_NO_PROGRESS},
        {"http", required_argument, NULL, B_HTTP},
        {"rounds", required_argument, NULL, B_ROUNDS},
        {"token-times", required_argument, NULL, B_TOKEN_TIMES},
        {"connections", required_argument, NULL, B_CONNECTIONS},
        {NULL, 0, NULL, 0},
    };
    struct uc_ctl ctl = *ctl_in;
    struct bench_cfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.max_tokens = 32;
    cfg.ignore_eos = true;
    cfg.progress = true;
    cfg.rounds = 1;
    cfg.connections = 1;
    cfg.api_key = ctl_in->opts.api_key;
    cfg.bos = -1;
    bool prompt_tokens_set = false;
    const char *compare[MAX_SETTINGS + 1];
    int n_compare = 0;
    struct uc_buf base;
    uc_buf_init(&base);

    optind = 0;
    opterr = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, ":hjc:r:n:d:m:", longopts, NULL)) != -1) {
        switch (opt) {
        case 'h':
            fputs(usage_bench, stdout);
            exit(UC_CTL_EXIT_OK);
        case 'j':
            ctl.json = true;
            break;
        case 'c':
            cfg.concurrency = (int)bench_u64("--concurrency", optarg, 4096);
            if (cfg.concurrency < 1) {
                bench_usage_error("--concurrency must be at least 1");
            }
            break;
        case 'r':
            cfg.rate = bench_double("--rate", optarg, 1e-6, 1e6);
            break;
        case 'n':
            cfg.requests = (int64_t)bench_u64("--requests", optarg, INT32_MAX);
            if (cfg.requests < 1) {
                bench_usage_error("--requests must be at least 1");
            }
            break;
        case 'd':
            cfg.duration_s = bench_double("--duration", optarg, 1e-3, 1e7);
            break;
        case 'm':
            cfg.max_tokens = (uint32_t)bench_u64("--max-tokens", optarg, UINT32_MAX);
            break;
        case B_PROMPT_FILE:
            cfg.prompt_file = optarg;
            break;
        case B_PROMPT_DIR:
            cfg.prompt_dir = optarg;
            break;
        case B_PROMPT_TOKENS:
            cfg.prompt_tokens = (uint32_t)bench_u64("--prompt-tokens", optarg, 1 << 24);
            prompt_tokens_set = true;
            if (cfg.prompt_tokens < 1) {
                bench_usage_error("--prompt-tokens must be at least 1");
            }
            break;
        case B_SEED:
            cfg.seed = bench_u64("--seed", optarg, UINT64_MAX);
            break;
        case B_TEMPERATURE:
            cfg.temperature = bench_double("--temperature", optarg, 0, 100);
            break;
        case B_IGNORE_EOS:
            cfg.ignore_eos = true;
            break;
        case B_NO_IGNORE_EOS:
            cfg.ignore_eos = false;
            break;
        case B_WARMUP:
            cfg.warmup = (int)bench_u64("--warmup", optarg, 1 << 20);
            break;
        case B_COMPARE:
            if (n_compare >= MAX_SETTINGS) {
                bench_usage_error("--compare takes at most %d settings", MAX_SETTINGS);
            }
            compare[n_compare++] = optarg;
            break;
        case B_POLICY:
            uc_buf_printf(&base, "%spolicy=%s", base.len ? "," : "", optarg);
            break;
        case B_KV_BUDGET:
            bench_u64("--kv-budget", optarg, UINT32_MAX);
            uc_buf_printf(&base, "%skv_budget=%s", base.len ? "," : "", optarg);
            break;
        case B_WINDOW:
            bench_u64("--window", optarg, UINT32_MAX);
            uc_buf_printf(&base, "%swindow=%s", base.len ? "," : "", optarg);
            break;
        case B_DECODE_MODE:
            uc_buf_printf(&base, "%sdecode_mode=%s", base.len ? "," : "", optarg);
            break;
        case B_GROUPING:
            uc_buf_printf(&base, "%sgrouping=%s", base.len ? "," : "", optarg);
            break;
        case B_STAGE_STARTS: {
            char *v = uc_strdup(optarg);
            for (char *p = v; p && *p; p++) {
                if (*p == ',') {
                    *p = ':';
                }
            }
            uc_buf_printf(&base, "%sstage_starts=%s", base.len ? "," : "", v ? v : "");
            uc_free(v);
            break;
        }
        case B_NO_PROGRESS:
            cfg.progress = false;
            break;
        case B_CONNECTIONS:
            cfg.connections = (int)bench_u64("--connections", optarg, 1 << 16);
            if (cfg.connections < 1) {
                bench_usage_error("--connections must be at least 1");
            }
            break;
        case B_TOKEN_TIMES:
            if (cfg.token_times) {
                fclose(cfg.token_times);
            }
            cfg.token_times = fopen(optarg, "w");
            if (!cfg.token_times) {
                bench_usage_error("--token-times: cannot write '%s': %s", optarg, strerror(errno));
            }
            break;
        case B_HTTP: {
            char prefix[256];
            cfg.http_url = optarg;
            if (uc_http_url_parse(optarg, cfg.http_host, sizeof cfg.http_host, &cfg.http_port,
                                  prefix, sizeof prefix) != UC_OK) {
                bench_usage_error("--http expects http://HOST:PORT, got '%s'", optarg);
            }
            snprintf(cfg.http_path, sizeof cfg.http_path, "%s/v1/completions", prefix);
            break;
        }
        case B_ROUNDS:
            cfg.rounds = (int)bench_u64("--rounds", optarg, MAX_ROUNDS);
            if (cfg.rounds < 1) {
                bench_usage_error("--rounds must be at least 1");
            }
            break;
        case ':':
            bench_usage_error("option '%s' needs a value", argv[optind - 1]);
        default:
            if (optopt && optopt < 256) {
                bench_usage_error("unknown option '-%c'", optopt);
            }
            bench_usage_error("unknown option '%s'", argv[optind - 1]);
        }
    }
    /* --compare A B: the settings after the first are positional */
    for (int i = optind; i < argc; i++) {
        if (n_compare == 0) {
            bench_usage_error("unexpected argument '%s'", argv[i]);
        }
        if (n_compare >= MAX_SETTINGS) {
            bench_usage_error("--compare takes at most %d settings", MAX_SETTINGS);
        }
        compare[n_compare++] = argv[i];
    }
    if (n_compare == 1) {
        bench_usage_error("--compare needs at least two settings");
    }
    if (n_compare && base.len) {
        bench_usage_error("--compare replaces --policy/--kv-budget/...: give them in the settings");
    }
    if ((cfg.prompt_file != NULL) + (cfg.prompt_dir != NULL) + prompt_tokens_set > 1) {
        bench_usage_error("give one of --prompt-file, --prompt-dir, --prompt-tokens");
    }
    if (!cfg.prompt_file && !cfg.prompt_dir && !prompt_tokens_set) {
        cfg.prompt_tokens = 128;
    }
    if (cfg.concurrency == 0) {
        cfg.concurrency = cfg.rate > 0 ? 16 : 1;
    }
    if (cfg.connections > cfg.concurrency) { /* a connection has one client at least */
        cfg.connections = cfg.concurrency;
    }
    if (cfg.requests == 0 && cfg.duration_s <= 0) {
        cfg.requests = 32;
    }
    if (n_compare) {
        for (int i = 0; i < n_compare; i++) {
            parse_setting(&cfg.settings[i], compare[i]);
        }
        cfg.n_settings = n_compare;
    } else {
        if (base.oom) {
            bench_usage_error("out of memory");
        }
        parse_setting(&cfg.settings[0], base.len ? base.data : "");
        uc_free(cfg.settings[0].label);
        cfg.settings[0].label = uc_strdup(base.len ? base.data : "server default");
        cfg.n_settings = 1;
    }
    uc_buf_fini(&base);
    /* each setting's front: its own front=, else HTTP with --http */
    bool any_grpc = false;
    for (int i = 0; i < cfg.n_settings; i++) {
        struct setting *st = &cfg.settings[i];
        if (st->front == FRONT_HTTP && !cfg.http_url) {
            bench_usage_error("setting '%s' needs --http URL", st->label);
        }
        if (st->front == FRONT_DEFAULT) {
            st->front = cfg.http_url ? FRONT_HTTP : FRONT_GRPC;
        }
        any_grpc = any_grpc || st->front == FRONT_GRPC;
    }
    load_prompts(&cfg);

    /* a gRPC connection first: it checks the server is there and gives the vocabulary (HTTP
     * runs of text prompts need neither) */
    int code = UC_CTL_EXIT_OK;
    cfg.vocab = 256;
    if (any_grpc || !cfg.n_texts) {
        struct uc_client *probe = uc_ctl_connect(&ctl, "bench", &code);
        if (!probe) {
            cfg_fini(&cfg);
            return code;
        }
        struct uc_model_info mi;
        struct uc_client_error err;
        if (uc_client_model_info(probe, &mi, &err) != UC_OK) {
            code = uc_ctl_fail(&ctl, "bench", &err);
            uc_client_close(probe);
            cfg_fini(&cfg);
            return code;
        }
        cfg.vocab = mi.vocab_size ? mi.vocab_size : 256;
        cfg.bos = mi.bos_token_id;
        cfg.eos = mi.eos_token_ids;
        cfg.n_eos = mi.n_eos_token_ids;
        mi.eos_token_ids = NULL;
        mi.n_eos_token_ids = 0;
        uc_model_info_fini(&mi);
        uc_client_close(probe);
    }

    struct sigaction sa, old_sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_sa);
    bench_interrupted = 0;

    /* rounds x settings, round-major: A B A B ... on the same load */
    static struct summary sums[MAX_ROUNDS * MAX_SETTINGS];
    int n_sums = 0;
    for (int round = 0; round < cfg.rounds && !bench_interrupted; round++) {
        for (int i = 0; i < cfg.n_settings && !bench_interrupted; i++) {
            struct run r;
            if ((cfg.n_settings > 1 || cfg.rounds > 1) && !ctl.json && cfg.progress &&
                isatty(STDERR_FILENO)) {
                fprintf(stderr, "run %d/%d: %s\n", round * cfg.n_settings + i + 1,
                        cfg.rounds * cfg.n_settings, cfg.settings[i].label);
            }
            int rc = run_load(&ctl, &cfg, &cfg.settings[i], &r);
            if (rc != UC_CTL_EXIT_OK) {
                run_fini(&r);
                code = rc;
                goto out;
            }
            if (!summarise_run(&r, cfg.settings[i].label, &sums[n_sums])) {
                fprintf(stderr, "uncompctl: bench: out of memory\n");
                run_fini(&r);
                code = UC_CTL_EXIT_RPC;
                goto out;
            }
            n_sums++;
            run_fini(&r);
        }
    }
    /* complete rounds (fewer after an interrupt; then a part of the first one alone) */
    int rounds = n_sums / cfg.n_settings;
    int n_cols = rounds > 0 ? cfg.n_settings : n_sums;
    struct summary med[MAX_SETTINGS];
    for (int i = 0; rounds > 1 && i < cfg.n_settings; i++) {
        median_summary(sums, cfg.n_settings, rounds, i, &med[i]);
    }
    if (ctl.json) {
        print_json(&ctl, &cfg, sums, n_cols, rounds > 0 ? rounds : 1, med);
    } else if (rounds <= 1) {
        print_table(&ctl, &cfg, sums, n_cols, NULL);
    } else {
        for (int r = 0; r < rounds; r++) {
            char title[64];
            snprintf(title, sizeof title, "round %d of %d", r + 1, rounds);
            print_table(&ctl, &cfg, &sums[r * cfg.n_settings], cfg.n_settings, title);
            putchar('\n');
        }
        char title[64];
        snprintf(title, sizeof title, "median of %d rounds (failures: per round)", rounds);
        print_table(&ctl, &cfg, med, cfg.n_settings, title);
    }
    if (bench_interrupted) {
        fprintf(stderr, "uncompctl: bench: interrupted; the report covers what finished\n");
    }
    for (int i = 0; i < n_sums; i++) {
        if (sums[i].completed == 0) {
            int worst = UC_GRPC_UNKNOWN;
            int64_t most = 0;
            for (int c = 1; c < UC_GRPC_N_CODES; c++) {
                if (sums[i].errors[c] > most) {
                    most = sums[i].errors[c];
                    worst = c;
                }
            }
            fprintf(stderr, "uncompctl: bench: every request of '%s' failed (mostly %s)\n",
                    sums[i].label, uc_client_code_name(worst));
            code = worst == UC_GRPC_UNAVAILABLE ? UC_CTL_EXIT_UNAVAILABLE : UC_CTL_EXIT_RPC;
        }
    }
out:
    sigaction(SIGINT, &old_sa, NULL);
    cfg_fini(&cfg);
    return code;
}
