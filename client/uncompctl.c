/* uncompctl: the command-line client of the uncomp daemon (DESIGN.md "Command-line contract").
 *
 *     uncompctl [--server HOST:PORT] [global options] COMMAND [options] [arguments]
 *
 * Commands: generate, chat, tokenize, detokenize, abort, info, health, profile, set-policy,
 * calibrate, drain, bench (bench.c). Every command takes --help and --json (one JSON object on
 * stdout; chat: one per turn). Results go to stdout, diagnostics to stderr. Exit codes: 0 ok,
 * 1 the server answered with an error (its gRPC code name and message are printed), 2 usage
 * error, 3 cannot connect or the server is unavailable. Built on the client library (uncomp_client.h) only. */
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "base/mem.h"
#include "base/util.h"
#include "bench.h"
#include "uncomp_client.h"

#define UC_CTL_VERSION "0.1.0"
#define DEFAULT_SERVER "127.0.0.1:50051"

/* ========================================================================================= */
/* Usage                                                                                     */
/* ========================================================================================= */

static const char usage_main[] =
    "usage: uncompctl [global options] COMMAND [options] [arguments]\n"
    "\n"
    "Talks to an uncompd server over gRPC.\n"
    "\n"
    "Commands:\n"
    "  generate     generate text from a prompt (streams it as it arrives)\n"
    "  chat         interactive chat with history (the server's chat template)\n"
    "  tokenize     turn text into token ids\n"
    "  detokenize   turn token ids into text\n"
    "  abort        stop a running request by id\n"
    "  info         the server's INFO text, or one section of it\n"
    "  health       grpc.health.v1 check (exit 0 when SERVING)\n"
    "  profile      the active compression profile as a table\n"
    "  set-policy   change the server's default compression policy\n"
    "  calibrate    recompute, install and persist the compression profile\n"
    "  drain        stop admitting requests and finish the running ones\n"
    "  bench        load generator: throughput and latency percentiles\n"
    "Run 'uncompctl COMMAND --help' for a command's options.\n"
    "\n"
    "Global options:\n"
    "  -s, --server HOST:PORT      server address (default: $UNCOMP_SERVER, else " DEFAULT_SERVER
    ")\n"
    "  -t, --timeout-ms N          deadline of each call in ms (default: none; health: 5000)\n"
    "      --connect-timeout-ms N  how long to wait for the connection (default 5000)\n"
    "  -w, --wait                  retry the connection until --connect-timeout-ms (a server\n"
    "                              that is still starting) instead of failing at once\n"
    "      --tls-ca FILE           use TLS, trusting the PEM root certificates in FILE\n"
    "      --tls-server-name NAME  the name expected in the server certificate\n"
    "      --api-key KEY           API key for a server started with keys (default:\n"
    "                              $UNCOMP_API_KEY); the admin key for admin commands\n"
    "  -j, --json                  print one JSON object on stdout (every command)\n"
    "  -h, --help                  this help\n"
    "  -V, --version               print the version\n"
    "\n"
    "Exit codes:\n"
    "  0  success\n"
    "  1  the server answered with an error (the gRPC code name and message go to stderr),\n"
    "     or a generation ended aborted/with an error\n"
    "  2  usage error (bad command, option or value)\n"
    "  3  cannot connect, or the server is unavailable (UNAVAILABLE, draining, NOT_SERVING)\n";

static const char usage_generate[] =
    "usage: uncompctl generate [options] [PROMPT...]\n"
    "\n"
    "Generates a completion and streams its text to stdout as it arrives (a newline follows the\n"
    "completion). The prompt is the arguments joined by spaces, or --file F, or --ids, or stdin.\n"
    "\n"
    "Input:\n"
    "  -f, --file F                read the prompt from file F ('-' = stdin)\n"
    "      --ids 1,2,3             send token ids instead of text\n"
    "      --no-special            do not add the tokenizer's special tokens (BOS) to text\n"
    "      --request-id ID         the request id (default: assigned by the server)\n"
    "Sampling (0 or unset = the server default):\n"
    "  -n, --max-tokens N          tokens to generate\n"
    "      --min-tokens N          tokens before EOS/stop may end the generation\n"
    "      --temperature T         0 = greedy (default 1)\n"
    "      --top-p P  --top-k K  --min-p P\n"
    "      --seed S                sampling seed (reproducible sampling)\n"
    "      --stop STR              stop string (repeatable)\n"
    "      --stop-token-id ID      stop token id (repeatable)\n"
    "      --repetition-penalty R  --frequency-penalty F  --presence-penalty P\n"
    "      --ignore-eos            keep generating past EOS\n"
    "      --logprobs N            return top-N log-probabilities per token\n"
    "Compression (unset = the server's default policy):\n"
    "      --policy NAME           full, uncomp, uncomp-stage, snapkv, pyramidkv,\n"
    "                              streamingllm, h2o; +kvsharer, +think and +minicache\n"
    "                              compose (snapkv+kvsharer, snapkv+think, snapkv+minicache)\n"
    "      --kv-budget N           mean KV tokens kept per head and layer\n"
    "      --window N  --pool-kernel N  --sink-tokens N  --head-groups N  --r-min X\n"
    "      --think-ratio X         with +think: share of key channels pruned (default 0.4)\n"
    "      --minicache-t X  --minicache-gamma X  --minicache-start L\n"
    "                              with +minicache: SLERP t (0.6), share of common tokens\n"
    "                              kept unmerged (0.05), first merged layer (the\n"
    "                              profile's calibrated pairs, else L/2)\n"
    "                              streamingllm, h2o; +kvsharer, +think and +lorc\n"
    "                              compose (snapkv+kvsharer, snapkv+think, snapkv+lorc)\n"
    "      --kv-budget N           mean KV tokens kept per head and layer\n"
    "      --window N  --pool-kernel N  --sink-tokens N  --head-groups N  --r-min X\n"
    "      --think-ratio X         with +think: share of key channels pruned (default 0.4)\n"
    "      --lorc-ratio X          with +lorc: mean share of K/V dimensions kept (default 0.5)\n"
    "      --decode-mode MODE      append or evict\n"
    "      --grouping G            profile or prompt\n"
    "      --stage-starts L1,L2    explicit uncomp-stage boundaries (layers)\n"
    "Output:\n"
    "  -v, --verbose               usage, timing and the compression report on stderr\n"
    "  -j, --json                  no streaming: one JSON object with text, token ids, finish\n"
    "                              reason, usage, timing and the compression report\n"
    "Exit: 0 ok; 1 server error or a generation that ended aborted/with an error; 2 usage;\n"
    "3 cannot connect / unavailable.\n";

static const char usage_chat[] =
    "usage: uncompctl chat [options]\n"
    "\n"
    "An interactive chat over the Chat call (the server needs --chat-template). Each line read\n"
    "from stdin is a user message; the whole conversation is sent each turn and the assistant's\n"
    "reply is streamed to stdout (a newline follows it) and kept in the history. A prompt '> '\n"
    "is shown when stdin is a terminal. Commands, alone on a line: /reset clears the history\n"
    "(the --system message stays), /exit ends; the end of stdin ends too. Empty lines are\n"
    "ignored.\n"
    "\n"
    "  -S, --system TEXT           a system message at the start of the conversation\n"
    "      --request-id ID         the request id of every turn (default: assigned by the\n"
    "                              server)\n"
    "Sampling and compression: as 'uncompctl generate' (-n/--max-tokens, --temperature, --top-p,\n"
    "--top-k, --min-p, --seed, --stop, --stop-token-id, --min-tokens, the penalties,\n"
    "--ignore-eos, --logprobs, --policy, --kv-budget, --window, --pool-kernel, --sink-tokens,\n"
    "--head-groups, --r-min, --think-ratio, --lorc-ratio, --decode-mode, --grouping,\n"
    "--stage-starts).\n"
    "Output:\n"
    "  -v, --verbose               usage, timing and the compression report of each turn on\n"
    "                              stderr\n"
    "  -j, --json                  no streaming: one JSON object per turn (text, finish reason,\n"
    "                              usage, timing, compression report)\n"
    "Exit: 0 ok; 1 a server error or a reply that ended aborted/with an error (a terminal session\n"
    "reports it and goes on; the failed turn leaves the history as it was); 2 usage; 3 cannot\n"
    "connect / unavailable.\n";

static const char usage_tokenize[] =
    "usage: uncompctl tokenize [options] [TEXT...]\n"
    "\n"
    "Prints the token ids of TEXT (the arguments joined by spaces, --file F, or stdin) on one\n"
    "line, separated by spaces.\n"
    "  -f, --file F       read the text from file F\n"
    "      --no-special   do not add special tokens (BOS); the ids then detokenize to TEXT\n"
    "  -p, --pieces       one token per line: id, a tab, the token string\n"
    "  -j, --json         {\"token_ids\": [...], \"tokens\": [...], \"count\": N}\n";

static const char usage_detokenize[] =
    "usage: uncompctl detokenize [options] ID...\n"
    "\n"
    "Prints the text of token ids (arguments, separated by spaces or commas, or stdin).\n"
    "      --skip-special   leave special tokens out of the text\n"
    "  -j, --json           {\"text\": \"...\"}\n";

static const char usage_abort[] =
    "usage: uncompctl abort REQUEST_ID\n"
    "\n"
    "Stops a running request on every rank; its stream ends with finish reason aborted.\n"
    "Prints whether the request was found.\n"
    "  -j, --json   {\"request_id\": \"...\", \"found\": true|false}\n";

static const char usage_info[] =
    "usage: uncompctl info [SECTION]\n"
    "\n"
    "Prints the server's INFO text (GetStats): '# Section' headers, then key:value lines.\n"
    "SECTION: server, cluster, model, memory, kv, compress, requests, errors, config, or all\n"
    "(default); 'stats' is a synonym of all. An unknown section is a server error (exit 1).\n"
    "  -j, --json   'server': GetServerInfo; 'model': GetModelInfo; any other section: GetStats\n"
    "               (counters, percentiles and the text); no section: all three\n";

static const char usage_health[] =
    "usage: uncompctl health [options]\n"
    "\n"
    "grpc.health.v1.Health/Check. Prints the status; exit 0 when SERVING, 3 when NOT_SERVING\n"
    "or unreachable.\n"
    "      --service NAME   check one service (default: the whole server)\n"
    "      --wait-ms N      poll until SERVING for up to N ms\n"
    "  -j, --json           {\"status\": \"SERVING\"}\n";

static const char usage_profile[] =
    "usage: uncompctl profile [options]\n"
    "\n"
    "Prints the active compression profile: its source, then one row per layer with the layer's\n"
    "entropy, score (100 x entropy) and stage, and each KV head's entropy and group.\n"
    "      --raw    print the profile file (JSON) as the server stores it\n"
    "  -j, --json   the profile as one JSON object\n";

static const char usage_set_policy[] =
    "usage: uncompctl set-policy [POLICY] [options]\n"
    "\n"
    "Changes the server's default compression settings for new requests (validated by the\n"
    "server: an unknown policy is INVALID_ARGUMENT, exit 1). Unset options keep their value.\n"
    "      --policy NAME        full, uncomp, uncomp-stage, snapkv, pyramidkv, streamingllm, h2o\n"
    "                           (+kvsharer composes: snapkv+kvsharer)\n"
    "      --kv-budget N        mean KV tokens kept per head and layer\n"
    "      --decode-mode MODE   append or evict\n"
    "      --grouping G         profile or prompt\n"
    "  -j, --json               the settings now in force\n";

static const char usage_calibrate[] =
    "usage: uncompctl calibrate [options]\n"
    "\n"
    "Runs calibration on the server (on the given text, or the built-in calibration text),\n"
    "installs and persists the new profile, and prints it as 'profile' does.\n"
    "  -f, --file F             calibration text from file F\n"
    "      --text TEXT          calibration text from the command line\n"
    "      --window-tokens N    tokens per calibration window (0 = server default)\n"
    "      --max-windows N      windows to use (0 = server default)\n"
    "  -j, --json               the new profile as one JSON object\n";

static const char usage_drain[] =
    "usage: uncompctl drain [options]\n"
    "\n"
    "Stops admitting requests, lets the running ones finish (up to the timeout, then aborts\n"
    "them) and reports; health turns NOT_SERVING.\n"
    "      --timeout-ms N   drain timeout (default: the server's --drain-timeout)\n"
    "  -j, --json           {\"finished\": N, \"aborted\": M}\n";

/* ========================================================================================= */
/* Helpers                                                                                   */
/* ========================================================================================= */

/* Prints "uncompctl: CMD: message" and exits 2. */
static void usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3),
                                                                             noreturn));
static void usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "uncompctl: %s%s", cmd ? cmd : "", cmd ? ": " : "");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see 'uncompctl %s%s--help')\n", cmd ? cmd : "", cmd ? " " : "");
    va_end(ap);
    exit(UC_CTL_EXIT_USAGE);
}

static void oom_exit(void) __attribute__((noreturn));
static void oom_exit(void)
{
    fprintf(stderr, "uncompctl: out of memory\n");
    exit(UC_CTL_EXIT_RPC);
}

static uint64_t num_u64(const char *cmd, const char *opt, const char *v, uint64_t max)
{
    uint64_t x;
    if (!uc_ctl_parse_u64(v, max, &x)) {
        usage_error(cmd, "%s expects an integer in [0, %" PRIu64 "], got '%s'", opt, max, v);
    }
    return x;
}

static uint32_t num_u32(const char *cmd, const char *opt, const char *v)
{
    return (uint32_t)num_u64(cmd, opt, v, UINT32_MAX);
}

static float num_float(const char *cmd, const char *opt, const char *v, double lo, double hi)
{
    double x;
    if (!uc_ctl_parse_double(v, &x) || x < lo || x > hi) {
        usage_error(cmd, "%s expects a number in [%g, %g], got '%s'", opt, lo, hi, v);
    }
    return (float)x;
}

/* Reads all of stdin into a uc_malloc'd buffer of *len bytes (NUL bytes included) and a NUL. */
static char *read_stdin(size_t *len)
{
    struct uc_buf b;
    char tmp[65536];
    size_t n;
    uc_buf_init(&b);
    while ((n = fread(tmp, 1, sizeof(tmp), stdin)) > 0) {
        uc_buf_append(&b, tmp, n);
    }
    if (b.oom || ferror(stdin)) {
        uc_buf_fini(&b);
        return NULL;
    }
    *len = b.len;
    char *s = uc_buf_take(&b);
    uc_buf_fini(&b);
    if (!s) {
        *len = 0;
        s = uc_strdup("");
    }
    return s;
}

/* Reads a whole file ('-' = stdin): *len bytes (NUL bytes included), then a NUL; or exits 2
 * naming it. */
static char *read_input_file(const char *cmd, const char *path, size_t *len)
{
    char *s = NULL;
    if (strcmp(path, "-") == 0) {
        s = read_stdin(len);
        if (!s) {
            usage_error(cmd, "cannot read stdin");
        }
        return s;
    }
    if (uc_file_read_all(&s, len, path) != UC_OK) {
        usage_error(cmd, "cannot read file '%s'", path);
    }
    return s;
}

/* Joins argv[from..argc) with spaces; NULL when there are none. */
static char *join_args(int argc, char **argv, int from)
{
    if (from >= argc) {
        return NULL;
    }
    struct uc_buf b;
    uc_buf_init(&b);
    for (int i = from; i < argc; i++) {
        if (i > from) {
            uc_buf_puts(&b, " ");
        }
        uc_buf_puts(&b, argv[i]);
    }
    if (b.oom) {
        oom_exit();
    }
    char *s = uc_buf_take(&b);
    uc_buf_fini(&b);
    return s;
}

/* The command's text input: positional arguments, else --file, else stdin; *len bytes (a file
 * or stdin may hold NUL bytes), then a NUL. */
static char *text_input(const char *cmd, int argc, char **argv, int from, const char *file,
                        size_t *len)
{
    if (file && from < argc) {
        usage_error(cmd, "give the text either as arguments or with --file, not both");
    }
    if (file) {
        return read_input_file(cmd, file, len);
    }
    char *s = join_args(argc, argv, from);
    if (s) {
        *len = strlen(s);
        return s;
    }
    if (isatty(STDIN_FILENO)) {
        fprintf(stderr, "uncompctl: %s: reading the text from stdin (end with Ctrl-D)\n", cmd);
    }
    s = read_stdin(len);
    if (!s) {
        usage_error(cmd, "cannot read stdin");
    }
    return s;
}

static void print_json_u32_array(FILE *f, const uint32_t *v, size_t n)
{
    fputc('[', f);
    for (size_t i = 0; i < n; i++) {
        fprintf(f, "%s%" PRIu32, i ? "," : "", v[i]);
    }
    fputc(']', f);
}

static void print_json_u64_array(FILE *f, const uint64_t *v, size_t n)
{
    fputc('[', f);
    for (size_t i = 0; i < n; i++) {
        fprintf(f, "%s%" PRIu64, i ? "," : "", v[i]);
    }
    fputc(']', f);
}

static void print_json_double_array(FILE *f, const double *v, size_t n)
{
    fputc('[', f);
    for (size_t i = 0; i < n; i++) {
        if (i) {
            fputc(',', f);
        }
        uc_ctl_json_num(f, v[i]);
    }
    fputc(']', f);
}

/* Common option ids (beyond the single-letter ones). */
enum {
    OPT_HELP = 'h',
    OPT_JSON = 'j',
    OPT_FIRST = 256,
    OPT_IDS,
    OPT_NO_SPECIAL,
    OPT_REQUEST_ID,
    OPT_MIN_TOKENS,
    OPT_TEMPERATURE,
    OPT_TOP_P,
    OPT_TOP_K,
    OPT_MIN_P,
    OPT_SEED,
    OPT_STOP,
    OPT_STOP_TOKEN_ID,
    OPT_REP_PENALTY,
    OPT_FREQ_PENALTY,
    OPT_PRES_PENALTY,
    OPT_IGNORE_EOS,
    OPT_LOGPROBS,
    OPT_POLICY,
    OPT_KV_BUDGET,
    OPT_WINDOW,
    OPT_POOL_KERNEL,
    OPT_SINK_TOKENS,
    OPT_HEAD_GROUPS,
    OPT_R_MIN,
    OPT_THINK_RATIO,
    OPT_MINICACHE_T,
    OPT_MINICACHE_GAMMA,
    OPT_MINICACHE_START,
    OPT_LORC_RATIO,
    OPT_DECODE_MODE,
    OPT_GROUPING,
    OPT_STAGE_STARTS,
    OPT_SKIP_SPECIAL,
    OPT_SERVICE,
    OPT_WAIT_MS,
    OPT_RAW,
    OPT_TEXT,
    OPT_WINDOW_TOKENS,
    OPT_MAX_WINDOWS,
    OPT_TIMEOUT_MS,
    OPT_CONNECT_TIMEOUT,
    OPT_TLS_CA,
    OPT_TLS_NAME,
    OPT_API_KEY,
};

/* Parses a command's options. Handles --help (prints `usage`, exits 0), --json and unknown
 * options (exit 2); calls `on_opt` for the rest. Returns the index of the first positional
 * argument. */
typedef void (*opt_fn)(int opt, const char *arg, void *user);

static int parse_cmd_opts(struct uc_ctl *ctl, const char *cmd, const char *usage, int argc,
                          char **argv, const char *shortopts, const struct option *longopts,
                          opt_fn on_opt, void *user)
{
    char spec[64];
    snprintf(spec, sizeof(spec), ":%s", shortopts); /* ':' tells a missing value from unknown */
    optind = 0;                                     /* GNU: reinitialise and start at argv[1] */
    opterr = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, spec, longopts, NULL)) != -1) {
        if (opt == OPT_HELP) {
            fputs(usage, stdout);
            exit(UC_CTL_EXIT_OK);
        } else if (opt == OPT_JSON) {
            ctl->json = true;
        } else if (opt == ':') {
            usage_error(cmd, "option '%s' needs a value", argv[optind - 1]);
        } else if (opt == '?') {
            if (optopt && optopt < OPT_FIRST) {
                usage_error(cmd, "unknown option '-%c'", optopt);
            }
            usage_error(cmd, "unknown option '%s'", argv[optind - 1]);
        } else if (on_opt) {
            on_opt(opt, optarg, user);
        } else {
            usage_error(cmd, "unexpected option");
        }
    }
    return optind;
}

/* ========================================================================================= */
/* JSON and text renderings of the results                                                   */
/* ========================================================================================= */

static void json_report(FILE *f, const struct uc_compression_report *r)
{
    fprintf(f, "{\"policy\":");
    uc_ctl_json_str(f, r->policy);
    fprintf(f,
            ",\"kv_budget\":%" PRIu32 ",\"kv_tokens_full\":%" PRIu64 ",\"kv_tokens_kept\":%" PRIu64
            ",\"kv_bytes_full\":%" PRIu64 ",\"kv_bytes_kept\":%" PRIu64 ",\"ratio\":",
            r->kv_budget, r->kv_tokens_full, r->kv_tokens_kept, r->kv_bytes_full,
            r->kv_bytes_kept);
    uc_ctl_json_num(f, r->ratio);
    fprintf(f, ",\"stage_rows\":");
    print_json_u64_array(f, r->stage_rows, r->n_stage_rows);
    fprintf(f, ",\"stage_starts\":");
    print_json_u32_array(f, r->stage_starts, r->n_stage_starts);
    fprintf(f, ",\"groups\":[");
    for (size_t i = 0; i < r->n_groups; i++) {
        fprintf(f, "%s{\"group\":%" PRIu32 ",\"budget\":%" PRIu32 ",\"mean_kept\":", i ? "," : "",
                r->groups[i].group, r->groups[i].budget);
        uc_ctl_json_num(f, r->groups[i].mean_kept);
        fputc('}', f);
    }
    fprintf(f, "],\"entropy\":[");
    for (size_t i = 0; i < r->n_entropy; i++) {
        fprintf(f, "%s{\"layer\":%" PRIu32 ",\"min\":", i ? "," : "", r->entropy[i].layer);
        uc_ctl_json_num(f, r->entropy[i].min);
        uc_ctl_json_field_num(f, "mean", r->entropy[i].mean);
        uc_ctl_json_field_num(f, "max", r->entropy[i].max);
        fputc('}', f);
    }
    fprintf(f, "],\"compress_ms\":");
    uc_ctl_json_num(f, r->compress_ms);
    uc_ctl_json_field_str(f, "decode_mode", r->decode_mode);
    uc_ctl_json_field_str(f, "grouping", r->grouping);
    fprintf(f, ",\"plan_checksum\":\"%016" PRIx64 "\"", r->plan_checksum);
    uc_ctl_json_field_num(f, "shared_layers", r->shared_layers);
    uc_ctl_json_field_num(f, "key_channels", r->key_channels);
    if (r->minicache_pairs) {
        uc_ctl_json_field_num(f, "minicache_pairs", r->minicache_pairs);
        uc_ctl_json_field_num(f, "minicache_start", r->minicache_start);
        fprintf(f, ",\"minicache_layers\":");
        print_json_u32_array(f, r->minicache_layers, r->n_minicache_layers);
        uc_ctl_json_field_num(f, "minicache_merged", (double)r->minicache_merged);
        uc_ctl_json_field_num(f, "minicache_retained", (double)r->minicache_retained);
    }
    if (r->lorc_ratio > 0.0f) {
        uc_ctl_json_field_num(f, "lorc_ratio", r->lorc_ratio);
        uc_ctl_json_field_num(f, "lorc_rank_first", r->lorc_rank_first);
        uc_ctl_json_field_num(f, "lorc_rank_last", r->lorc_rank_last);
    }
    fputc('}', f);
}

static void json_completion_fields(FILE *f, const struct uc_completion *c)
{
    fprintf(f, "\"request_id\":");
    uc_ctl_json_str(f, c->request_id);
    uc_ctl_json_field_str(f, "finish_reason", uc_client_finish_reason_name(c->finish_reason));
    fprintf(f, ",\"matched_stop\":");
    uc_ctl_json_strn(f, c->matched_stop, c->matched_stop ? c->matched_stop_len : 0);
    fprintf(f, ",\"usage\":{\"prompt_tokens\":%" PRIu32 ",\"completion_tokens\":%" PRIu32 "}",
            c->prompt_tokens, c->completion_tokens);
    fprintf(f, ",\"timing\":{\"queue_ms\":");
    uc_ctl_json_num(f, c->timing.queue_ms);
    uc_ctl_json_field_num(f, "ttft_ms", c->timing.ttft_ms);
    uc_ctl_json_field_num(f, "prefill_ms", c->timing.prefill_ms);
    uc_ctl_json_field_num(f, "decode_ms", c->timing.decode_ms);
    uc_ctl_json_field_num(f, "total_ms", c->timing.total_ms);
    uc_ctl_json_field_num(f, "client_ttft_ms", c->client_ttft_ms);
    uc_ctl_json_field_num(f, "client_total_ms", c->client_total_ms);
    fprintf(f, "},\"compression\":");
    if (c->has_compression) {
        json_report(f, &c->compression);
    } else {
        fprintf(f, "null");
    }
}

static void verbose_completion(FILE *f, const struct uc_completion *c)
{
    fprintf(f, "request_id: %s\n", c->request_id ? c->request_id : "");
    fprintf(f, "finish: %s", uc_client_finish_reason_name(c->finish_reason));
    if (c->matched_stop && c->matched_stop_len > 0) {
        fprintf(f, " (matched stop \"");
        fwrite(c->matched_stop, 1, c->matched_stop_len, f);
        fprintf(f, "\")");
    }
    fprintf(f, "\nusage: prompt %" PRIu32 " tokens, completion %" PRIu32 " tokens\n",
            c->prompt_tokens, c->completion_tokens);
    double tok_s = c->timing.decode_ms > 0 && c->completion_tokens > 1
                       ? (c->completion_tokens - 1) / (c->timing.decode_ms / 1e3)
                       : 0;
    fprintf(f,
            "timing: queue %.1f ms, ttft %.1f ms (client %.1f ms), prefill %.1f ms, decode %.1f ms "
            "(%.1f tok/s), total %.1f ms (client %.1f ms)\n",
            c->timing.queue_ms, c->timing.ttft_ms, c->client_ttft_ms, c->timing.prefill_ms,
            c->timing.decode_ms, tok_s, c->timing.total_ms, c->client_total_ms);
    if (!c->has_compression) {
        fprintf(f, "compression: no report\n");
        return;
    }
    const struct uc_compression_report *r = &c->compression;
    fprintf(f,
            "compression: policy %s, kv_budget %" PRIu32 ", decode_mode %s, grouping %s\n"
            "  kv tokens %" PRIu64 " -> %" PRIu64 ", bytes %" PRIu64 " -> %" PRIu64
            " (ratio %.4f), compress %.2f ms, plan %016" PRIx64 ", shared layers %" PRIu32
            ", key channels %" PRIu32 "\n",
            r->policy, r->kv_budget, r->decode_mode, r->grouping, r->kv_tokens_full,
            r->kv_tokens_kept, r->kv_bytes_full, r->kv_bytes_kept, r->ratio, r->compress_ms,
            r->plan_checksum, r->shared_layers, r->key_channels);
    if (r->minicache_pairs) {
        fprintf(f, "  minicache: %" PRIu32 " pairs (layers", r->minicache_pairs);
        for (size_t i = 0; i < r->n_minicache_layers; i++) {
            fprintf(f, " %" PRIu32 "-%" PRIu32, r->minicache_layers[i],
                    r->minicache_layers[i] + 1);
        }
        fprintf(f, "), %" PRIu64 " merged, %" PRIu64 " retained\n", r->minicache_merged,
                r->minicache_retained);
    }
    if (r->lorc_ratio > 0.0f) {
        fprintf(f, "  lorc: ratio %.4g, latent ranks %" PRIu32 " (first layer) .. %" PRIu32
                " (last)\n", (double)r->lorc_ratio, r->lorc_rank_first, r->lorc_rank_last);
    }
    if (r->n_stage_rows || r->n_stage_starts) {
        fprintf(f, "  stages: starts");
        for (size_t i = 0; i < r->n_stage_starts; i++) {
            fprintf(f, " %" PRIu32, r->stage_starts[i]);
        }
        fprintf(f, "; prefill rows kept");
        for (size_t i = 0; i < r->n_stage_rows; i++) {
            fprintf(f, " %" PRIu64, r->stage_rows[i]);
        }
        fputc('\n', f);
    }
    for (size_t i = 0; i < r->n_groups; i++) {
        fprintf(f, "  group %" PRIu32 ": budget %" PRIu32 ", mean kept %.1f\n", r->groups[i].group,
                r->groups[i].budget, r->groups[i].mean_kept);
    }
    if (r->n_entropy) {
        fprintf(f, "  entropy per layer (min/mean/max):");
        for (size_t i = 0; i < r->n_entropy; i++) {
            fprintf(f, "%s L%" PRIu32 " %.3f/%.3f/%.3f", i % 4 == 0 ? "\n   " : "",
                    r->entropy[i].layer, r->entropy[i].min, r->entropy[i].mean,
                    r->entropy[i].max);
        }
        fputc('\n', f);
    }
}

static void json_profile(FILE *f, const struct uc_client_profile *p, bool with_file)
{
    fprintf(f, "{\"present\":%s,\"source\":", p->present ? "true" : "false");
    uc_ctl_json_str(f, p->source);
    uc_ctl_json_field_str(f, "path", p->path);
    fprintf(f, ",\"created_unix_ms\":%" PRId64 ",\"calib_tokens\":%" PRIu64
               ",\"head_groups\":%" PRIu32 ",\"stage_starts\":",
            p->created_unix_ms, p->calib_tokens, p->head_groups);
    print_json_u32_array(f, p->stage_starts, p->n_stage_starts);
    fprintf(f, ",\"layers\":[");
    for (size_t i = 0; i < p->n_layers; i++) {
        const struct uc_layer_profile *l = &p->layers[i];
        fprintf(f, "%s{\"layer\":%" PRIu32 ",\"entropy\":", i ? "," : "", l->layer);
        uc_ctl_json_num(f, l->entropy);
        uc_ctl_json_field_num(f, "score", l->score);
        fprintf(f, ",\"stage\":%" PRIu32 ",\"head_entropy\":", l->stage);
        print_json_double_array(f, l->head_entropy, l->n_head_entropy);
        fprintf(f, ",\"kv_head_entropy\":");
        print_json_double_array(f, l->kv_head_entropy, l->n_kv_heads);
        fprintf(f, ",\"kv_head_group\":");
        print_json_u32_array(f, l->kv_head_group, l->n_kv_heads);
        fputc('}', f);
    }
    fputc(']', f);
    if (with_file) {
        uc_ctl_json_field_str(f, "json", p->json);
    }
    fputc('}', f);
}

static void print_profile_table(FILE *f, const struct uc_client_profile *p)
{
    if (!p->present) {
        fprintf(f, "no compression profile is installed\n");
        return;
    }
    char when[64] = "unknown";
    if (p->created_unix_ms > 0) {
        time_t t = (time_t)(p->created_unix_ms / 1000);
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    }
    fprintf(f, "source:        %s\n", p->source);
    fprintf(f, "path:          %s\n", p->path && p->path[0] ? p->path : "(not persisted)");
    fprintf(f, "created:       %s\n", when);
    fprintf(f, "calib tokens:  %" PRIu64 "\n", p->calib_tokens);
    fprintf(f, "head groups:   %" PRIu32 "\n", p->head_groups);
    fprintf(f, "stage starts:  ");
    for (size_t i = 0; i < p->n_stage_starts; i++) {
        fprintf(f, "%s%" PRIu32, i ? ", " : "", p->stage_starts[i]);
    }
    fprintf(f, "%s\n\n", p->n_stage_starts ? "" : "-");
    fprintf(f, "%5s  %8s  %7s  %5s  %s\n", "layer", "entropy", "score", "stage",
            "kv-head entropy (group)");
    for (size_t i = 0; i < p->n_layers; i++) {
        const struct uc_layer_profile *l = &p->layers[i];
        fprintf(f, "%5" PRIu32 "  %8.4f  %7.2f  %5" PRIu32 " ", l->layer, l->entropy, l->score,
                l->stage);
        for (size_t h = 0; h < l->n_kv_heads; h++) {
            fprintf(f, " %.4f(g%" PRIu32 ")", l->kv_head_entropy[h], l->kv_head_group[h]);
        }
        fputc('\n', f);
    }
}

static void json_server_info(FILE *f, const struct uc_server_info *s)
{
    fprintf(f, "{\"version\":");
    uc_ctl_json_str(f, s->version);
    uc_ctl_json_field_str(f, "build", s->build);
    uc_ctl_json_field_num(f, "uptime_s", s->uptime_s);
    uc_ctl_json_field_str(f, "state", s->state);
    fprintf(f, ",\"tp_size\":%" PRIu32 ",\"backend\":", s->tp_size);
    uc_ctl_json_str(f, s->backend);
    fprintf(f, ",\"running_requests\":%" PRIu32 ",\"queued_requests\":%" PRIu32
               ",\"default_policy\":",
            s->running_requests, s->queued_requests);
    uc_ctl_json_str(f, s->default_policy);
    fprintf(f, ",\"default_kv_budget\":%" PRIu32 ",\"ranks\":[", s->default_kv_budget);
    for (size_t i = 0; i < s->n_ranks; i++) {
        fprintf(f, "%s{\"rank\":%" PRIu32 ",\"host\":", i ? "," : "", s->ranks[i].rank);
        uc_ctl_json_str(f, s->ranks[i].host);
        uc_ctl_json_field_str(f, "device", s->ranks[i].device);
        fprintf(f, ",\"weight_bytes\":%" PRIu64 ",\"kv_bytes\":%" PRIu64 "}",
                s->ranks[i].weight_bytes, s->ranks[i].kv_bytes);
    }
    fprintf(f, "]}");
}

static void json_model_info(FILE *f, const struct uc_model_info *m)
{
    fprintf(f, "{\"path\":");
    uc_ctl_json_str(f, m->path);
    uc_ctl_json_field_str(f, "architecture", m->architecture);
    fprintf(f,
            ",\"layers\":%" PRIu32 ",\"heads\":%" PRIu32 ",\"kv_heads\":%" PRIu32
            ",\"head_dim\":%" PRIu32 ",\"hidden_size\":%" PRIu32 ",\"intermediate_size\":%" PRIu32
            ",\"vocab_size\":%" PRIu32 ",\"context_length\":%" PRIu32 ",\"dtype\":",
            m->layers, m->heads, m->kv_heads, m->head_dim, m->hidden_size, m->intermediate_size,
            m->vocab_size, m->context_length);
    uc_ctl_json_str(f, m->dtype);
    uc_ctl_json_field_str(f, "tokenizer", m->tokenizer);
    fprintf(f, ",\"bos_token_id\":%" PRId32 ",\"eos_token_ids\":[", m->bos_token_id);
    for (size_t i = 0; i < m->n_eos_token_ids; i++) {
        fprintf(f, "%s%" PRId32, i ? "," : "", m->eos_token_ids[i]);
    }
    fprintf(f, "]}");
}

static void json_pct(FILE *f, const char *name, const struct uc_percentiles *p)
{
    fprintf(f, ",\"%s\":{\"p50\":", name);
    uc_ctl_json_num(f, p->p50);
    uc_ctl_json_field_num(f, "p90", p->p90);
    uc_ctl_json_field_num(f, "p99", p->p99);
    uc_ctl_json_field_num(f, "mean", p->mean);
    fprintf(f, ",\"count\":%" PRIu64 "}", p->count);
}

static void json_stats(FILE *f, const struct uc_stats *s)
{
    fprintf(f,
            "{\"requests_total\":%" PRIu64 ",\"requests_finished\":%" PRIu64
            ",\"requests_failed\":%" PRIu64 ",\"requests_aborted\":%" PRIu64
            ",\"requests_rejected\":%" PRIu64 ",\"prompt_tokens_total\":%" PRIu64
            ",\"generation_tokens_total\":%" PRIu64 ",\"running\":%" PRIu32 ",\"queued\":%" PRIu32
            ",\"kv_usage\":",
            s->requests_total, s->requests_finished, s->requests_failed, s->requests_aborted,
            s->requests_rejected, s->prompt_tokens_total, s->generation_tokens_total, s->running,
            s->queued);
    uc_ctl_json_num(f, s->kv_usage);
    fprintf(f,
            ",\"kv_tokens_full_total\":%" PRIu64 ",\"kv_tokens_kept_total\":%" PRIu64
            ",\"prefill_rows_dropped_total\":%" PRIu64 ",\"compression_seconds_total\":",
            s->kv_tokens_full_total, s->kv_tokens_kept_total, s->prefill_rows_dropped_total);
    uc_ctl_json_num(f, s->compression_seconds_total);
    json_pct(f, "ttft_ms", &s->ttft_ms);
    json_pct(f, "inter_token_ms", &s->inter_token_ms);
    json_pct(f, "e2e_ms", &s->e2e_ms);
    json_pct(f, "queue_ms", &s->queue_ms);
    uc_ctl_json_field_str(f, "text", s->text);
    fputc('}', f);
}

/* ========================================================================================= */
/* generate                                                                                  */
/* ========================================================================================= */

struct gen_cli {
    const char *cmd;
    struct uc_generate_params p;
    const char *file;
    uint32_t *ids;
    size_t n_ids;
    const char **stop;
    size_t n_stop;
    uint32_t *stop_ids;
    size_t n_stop_ids;
    uint32_t *stage_starts;
    size_t n_stage_starts;
    bool verbose;
};

static void gen_opt(int opt, const char *arg, void *user)
{
    struct gen_cli *g = user;
    struct uc_sampling *s = &g->p.sampling;
    struct uc_compression *c = &g->p.compression;
    const char *cmd = g->cmd;
    switch (opt) {
    case 'f':
        g->file = arg;
        break;
    case 'v':
        g->verbose = true;
        break;
    case 'n':
        s->max_tokens = num_u32(cmd, "--max-tokens", arg);
        break;
    case OPT_IDS:
        uc_free(g->ids);
        if (!uc_ctl_parse_u32_list(arg, &g->ids, &g->n_ids) || g->n_ids == 0) {
            usage_error(cmd, "--ids expects token ids separated by commas, got '%s'", arg);
        }
        break;
    case OPT_NO_SPECIAL:
        g->p.has_add_special_tokens = true;
        g->p.add_special_tokens = false;
        break;
    case OPT_REQUEST_ID:
        g->p.request_id = arg;
        break;
    case OPT_MIN_TOKENS:
        s->min_tokens = num_u32(cmd, "--min-tokens", arg);
        break;
    case OPT_TEMPERATURE:
        s->temperature = num_float(cmd, "--temperature", arg, 0, 100);
        s->has_temperature = true;
        break;
    case OPT_TOP_P:
        s->top_p = num_float(cmd, "--top-p", arg, 0, 1);
        break;
    case OPT_TOP_K:
        s->top_k = num_u32(cmd, "--top-k", arg);
        break;
    case OPT_MIN_P:
        s->min_p = num_float(cmd, "--min-p", arg, 0, 1);
        break;
    case OPT_SEED:
        s->seed = num_u64(cmd, "--seed", arg, UINT64_MAX);
        s->has_seed = true;
        break;
    case OPT_STOP: {
        const char **n = uc_realloc(g->stop, (g->n_stop + 1) * sizeof(*n));
        if (!n) {
            oom_exit();
        }
        g->stop = n;
        g->stop[g->n_stop++] = arg;
        break;
    }
    case OPT_STOP_TOKEN_ID: {
        uint32_t *n = uc_realloc(g->stop_ids, (g->n_stop_ids + 1) * sizeof(*n));
        if (!n) {
            oom_exit();
        }
        g->stop_ids = n;
        g->stop_ids[g->n_stop_ids++] = num_u32(cmd, "--stop-token-id", arg);
        break;
    }
    case OPT_REP_PENALTY:
        s->repetition_penalty = num_float(cmd, "--repetition-penalty", arg, 0, 100);
        break;
    case OPT_FREQ_PENALTY:
        s->frequency_penalty = num_float(cmd, "--frequency-penalty", arg, -100, 100);
        break;
    case OPT_PRES_PENALTY:
        s->presence_penalty = num_float(cmd, "--presence-penalty", arg, -100, 100);
        break;
    case OPT_IGNORE_EOS:
        s->ignore_eos = true;
        break;
    case OPT_LOGPROBS:
        s->logprobs = num_u32(cmd, "--logprobs", arg);
        break;
    case OPT_POLICY:
        c->policy = arg;
        break;
    case OPT_KV_BUDGET:
        c->kv_budget = num_u32(cmd, "--kv-budget", arg);
        break;
    case OPT_WINDOW:
        c->window = num_u32(cmd, "--window", arg);
        break;
    case OPT_POOL_KERNEL:
        c->pool_kernel = num_u32(cmd, "--pool-kernel", arg);
        break;
    case OPT_SINK_TOKENS:
        c->sink_tokens = num_u32(cmd, "--sink-tokens", arg);
        break;
    case OPT_HEAD_GROUPS:
        c->head_groups = num_u32(cmd, "--head-groups", arg);
        break;
    case OPT_R_MIN:
        c->r_min = num_float(cmd, "--r-min", arg, 0, 1);
        break;
    case OPT_THINK_RATIO:
        c->think_ratio = num_float(cmd, "--think-ratio", arg, 0, 1);
        break;
    case OPT_MINICACHE_T:
        c->minicache_t = num_float(cmd, "--minicache-t", arg, 0, 1);
        break;
    case OPT_MINICACHE_GAMMA:
        c->minicache_gamma = num_float(cmd, "--minicache-gamma", arg, 0, 1);
        c->minicache_retain_none = c->minicache_gamma == 0.0f;
        break;
    case OPT_MINICACHE_START:
        c->minicache_start = num_u32(cmd, "--minicache-start", arg);
        break;
    case OPT_LORC_RATIO:
        c->lorc_ratio = num_float(cmd, "--lorc-ratio", arg, 0.001, 1);
        break;
    case OPT_DECODE_MODE:
        c->decode_mode = arg;
        break;
    case OPT_GROUPING:
        c->grouping = arg;
        break;
    case OPT_STAGE_STARTS:
        uc_free(g->stage_starts);
        if (!uc_ctl_parse_u32_list(arg, &g->stage_starts, &g->n_stage_starts)) {
            usage_error(cmd, "--stage-starts expects layers separated by commas, got '%s'", arg);
        }
        break;
    default:
        usage_error(cmd, "unexpected option");
    }
}

/* The request options generate and chat share: sampling and compression. */
#define REQUEST_LONGOPTS \
    {"request-id", required_argument, NULL, OPT_REQUEST_ID}, \
    {"min-tokens", required_argument, NULL, OPT_MIN_TOKENS}, \
    {"temperature", required_argument, NULL, OPT_TEMPERATURE}, \
    {"top-p", required_argument, NULL, OPT_TOP_P}, \
    {"top-k", required_argument, NULL, OPT_TOP_K}, \
    {"min-p", required_argument, NULL, OPT_MIN_P}, \
    {"seed", required_argument, NULL, OPT_SEED}, \
    {"stop", required_argument, NULL, OPT_STOP}, \
    {"stop-token-id", required_argument, NULL, OPT_STOP_TOKEN_ID}, \
    {"repetition-penalty", required_argument, NULL, OPT_REP_PENALTY}, \
    {"frequency-penalty", required_argument, NULL, OPT_FREQ_PENALTY}, \
    {"presence-penalty", required_argument, NULL, OPT_PRES_PENALTY}, \
    {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS}, \
    {"logprobs", required_argument, NULL, OPT_LOGPROBS}, \
    {"policy", required_argument, NULL, OPT_POLICY}, \
    {"kv-budget", required_argument, NULL, OPT_KV_BUDGET}, \
    {"window", required_argument, NULL, OPT_WINDOW}, \
    {"pool-kernel", required_argument, NULL, OPT_POOL_KERNEL}, \
    {"sink-tokens", required_argument, NULL, OPT_SINK_TOKENS}, \
    {"head-groups", required_argument, NULL, OPT_HEAD_GROUPS}, \
    {"r-min", required_argument, NULL, OPT_R_MIN}, \
    {"think-ratio", required_argument, NULL, OPT_THINK_RATIO}, \
    {"minicache-t", required_argument, NULL, OPT_MINICACHE_T}, \
    {"minicache-gamma", required_argument, NULL, OPT_MINICACHE_GAMMA}, \
    {"minicache-start", required_argument, NULL, OPT_MINICACHE_START}, \
    {"lorc-ratio", required_argument, NULL, OPT_LORC_RATIO}, \
    {"decode-mode", required_argument, NULL, OPT_DECODE_MODE}, \
    {"grouping", required_argument, NULL, OPT_GROUPING}, \
    {"stage-starts", required_argument, NULL, OPT_STAGE_STARTS},

static const struct option gen_longopts[] = {
    {"help", no_argument, NULL, OPT_HELP},
    {"json", no_argument, NULL, OPT_JSON},
    {"file", required_argument, NULL, 'f'},
    {"verbose", no_argument, NULL, 'v'},
    {"max-tokens", required_argument, NULL, 'n'},
    {"ids", required_argument, NULL, OPT_IDS},
    {"no-special", no_argument, NULL, OPT_NO_SPECIAL},
    REQUEST_LONGOPTS
    {NULL, 0, NULL, 0},
};

struct stream_state {
    bool verbose;
    uint32_t logprobs;
    bool wrote_any;
};

static int stream_chunk(const struct uc_chunk *ch, void *user)
{
    struct stream_state *st = user;
    if (ch->text_len) {
        fwrite(ch->text, 1, ch->text_len, stdout);
        fflush(stdout);
        st->wrote_any = true;
    }
    if (st->verbose && st->logprobs) {
        for (size_t i = 0; i < ch->n_logprobs; i++) {
            const struct uc_client_token_logprob *lp = &ch->logprobs[i];
            fprintf(stderr, "[logprob] token %" PRIu32 " %.4f top:", lp->token_id, lp->logprob);
            for (size_t k = 0; k < lp->n_top; k++) {
                fprintf(stderr, " %" PRIu32 "=%.4f", lp->top_ids[k], lp->top_logprobs[k]);
            }
            fputc('\n', stderr);
        }
    }
    return 0;
}

static int finish_exit(const char *cmd, const struct uc_completion *c)
{
    if (c->finish_reason == UC_FINISH_ABORTED || c->finish_reason == UC_FINISH_ERROR) {
        fprintf(stderr, "uncompctl: %s: the request ended with finish reason %s\n", cmd,
                uc_client_finish_reason_name(c->finish_reason));
        return UC_CTL_EXIT_RPC;
    }
    return UC_CTL_EXIT_OK;
}

static int cmd_generate(struct uc_ctl *ctl, int argc, char **argv)
{
    struct gen_cli g;
    memset(&g, 0, sizeof(g));
    g.cmd = "generate";
    g.p = uc_generate_default_params();
    /* GNU getopt permutes: options may follow the prompt words ("--" ends the options) */
    int pos = parse_cmd_opts(ctl, g.cmd, usage_generate, argc, argv, "hjf:vn:", gen_longopts,
                             gen_opt, &g);
    char *text = NULL;
    if (g.n_ids) {
        if (g.file || pos < argc) {
            usage_error(g.cmd, "give the prompt either as --ids or as text, not both");
        }
        g.p.token_ids = g.ids;
        g.p.n_token_ids = g.n_ids;
    } else {
        size_t text_len = 0;
        text = text_input(g.cmd, argc, argv, pos, g.file, &text_len);
        g.p.text = text;
        g.p.text_len = text_len;
    }
    g.p.sampling.stop = g.stop;
    g.p.sampling.n_stop = g.n_stop;
    g.p.sampling.stop_token_ids = g.stop_ids;
    g.p.sampling.n_stop_token_ids = g.n_stop_ids;
    g.p.compression.stage_starts = g.stage_starts;
    g.p.compression.n_stage_starts = g.n_stage_starts;

    int code;
    struct uc_client *c = uc_ctl_connect(ctl, g.cmd, &code);
    if (!c) {
        goto out;
    }
    struct uc_client_error err;
    if (ctl->json) {
        struct uc_generation gen;
        uc_status rc = uc_client_generate(c, &g.p, &gen, &err);
        if (rc != UC_OK) {
            code = uc_ctl_fail(ctl, g.cmd, &err);
        } else {
            fprintf(stdout, "{\"text\":");
            uc_ctl_json_strn(stdout, gen.text, gen.text_len);
            fprintf(stdout, ",\"token_ids\":");
            print_json_u32_array(stdout, gen.token_ids, gen.n_token_ids);
            if (g.p.sampling.logprobs) {
                fprintf(stdout, ",\"logprobs\":[");
                for (size_t i = 0; i < gen.n_logprobs; i++) {
                    if (i) {
                        fputc(',', stdout);
                    }
                    uc_ctl_json_num(stdout, gen.logprobs[i]);
                }
                fputc(']', stdout);
            }
            fputc(',', stdout);
            json_completion_fields(stdout, &gen.completion);
            fprintf(stdout, "}\n");
            if (g.verbose) {
                verbose_completion(stderr, &gen.completion);
            }
            code = finish_exit(g.cmd, &gen.completion);
        }
        uc_generation_fini(&gen);
    } else {
        struct stream_state st = {.verbose = g.verbose, .logprobs = g.p.sampling.logprobs};
        struct uc_completion comp;
        uc_status rc = uc_client_generate_stream(c, &g.p, stream_chunk, &st, &comp, &err);
        if (rc == UC_OK || st.wrote_any) {
            fputc('\n', stdout); /* the completion ends with a newline, like a line of text */
            fflush(stdout);
        }
        if (rc != UC_OK) {
            code = uc_ctl_fail(ctl, g.cmd, &err);
        } else {
            if (g.verbose) {
                verbose_completion(stderr, &comp);
            }
            code = finish_exit(g.cmd, &comp);
        }
        uc_completion_fini(&comp);
    }
    uc_client_close(c);
out:
    uc_free(text);
    uc_free(g.ids);
    uc_free(g.stop);
    uc_free(g.stop_ids);
    uc_free(g.stage_starts);
    return code;
}

/* ========================================================================================= */
/* chat                                                                                      */
/* ========================================================================================= */

struct chat_cli {
    struct gen_cli g;
    const char *system;
};

static void chat_opt(int opt, const char *arg, void *user)
{
    struct chat_cli *ch = user;
    if (opt == 'S') {
        ch->system = arg;
    } else {
        gen_opt(opt, arg, &ch->g);
    }
}

static const struct option chat_longopts[] = {
    {"help", no_argument, NULL, OPT_HELP},
    {"json", no_argument, NULL, OPT_JSON},
    {"system", required_argument, NULL, 'S'},
    {"verbose", no_argument, NULL, 'v'},
    {"max-tokens", required_argument, NULL, 'n'},
    REQUEST_LONGOPTS
    {NULL, 0, NULL, 0},
};

/* One turn's reply: streamed to stdout (unless --json) and kept for the history. */
struct chat_turn {
    struct stream_state st;
    bool stream;
    struct uc_buf reply;
};

static int chat_chunk(const struct uc_chunk *ch, void *user)
{
    struct chat_turn *t = user;
    uc_buf_append(&t->reply, ch->text, ch->text_len);
    if (t->reply.oom) {
        oom_exit();
    }
    return t->stream ? stream_chunk(ch, &t->st) : 0;
}

/* The conversation. Messages from index `keep` on own their content (uc_malloc'd); the ones
 * before (the --system message) borrow it and survive /reset. */
struct chat_history {
    struct uc_chat_message *msgs;
    size_t n, cap;
    size_t keep;
};

static void history_push(struct chat_history *h, const char *role, char *content, size_t len)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 8;
        struct uc_chat_message *m = uc_realloc(h->msgs, cap * sizeof *m);
        if (!m) {
            oom_exit();
        }
        h->msgs = m;
        h->cap = cap;
    }
    h->msgs[h->n++] =
        (struct uc_chat_message){.role = role, .content = content, .content_len = len};
}

/* Drops the messages from index `to` on. */
static void history_truncate(struct chat_history *h, size_t to)
{
    while (h->n > to) {
        h->n--;
        if (h->n >= h->keep) {
            uc_free((char *)(uintptr_t)h->msgs[h->n].content);
        }
    }
}

/* One turn: sends the history, streams (or prints as JSON) the reply and returns the exit code
 * of the turn; on success *reply holds the reply (*reply_len bytes). */
static int chat_turn(struct uc_ctl *ctl, struct uc_client *c, struct chat_cli *ch,
                     struct uc_chat_params *p, const struct chat_history *h, char **reply,
                     size_t *reply_len)
{
    struct chat_turn t = {.st = {.verbose = ch->g.verbose, .logprobs = p->sampling.logprobs},
                          .stream = !ctl->json};
    uc_buf_init(&t.reply);
    struct uc_completion comp;
    struct uc_client_error err;
    p->messages = h->msgs;
    p->n_messages = h->n;
    uc_status rc = uc_client_chat_stream(c, p, chat_chunk, &t, &comp, &err);
    if (t.stream && (rc == UC_OK || t.st.wrote_any)) {
        fputc('\n', stdout); /* the reply ends with a newline, like a line of text */
        fflush(stdout);
    }
    int code;
    if (rc != UC_OK) {
        code = uc_ctl_fail(ctl, ch->g.cmd, &err);
    } else {
        if (ctl->json) {
            fprintf(stdout, "{\"text\":");
            uc_ctl_json_strn(stdout, t.reply.data ? t.reply.data : "", t.reply.len);
            fputc(',', stdout);
            json_completion_fields(stdout, &comp);
            fprintf(stdout, "}\n");
            fflush(stdout);
        }
        if (ch->g.verbose) {
            verbose_completion(stderr, &comp);
        }
        code = finish_exit(ch->g.cmd, &comp);
    }
    uc_completion_fini(&comp);
    *reply_len = t.reply.len;
    *reply = uc_buf_take(&t.reply);
    if (!*reply) {
        *reply = uc_strdup("");
        *reply_len = 0;
        if (!*reply) {
            oom_exit();
        }
    }
    uc_buf_fini(&t.reply);
    return code;
}

static int cmd_chat(struct uc_ctl *ctl, int argc, char **argv)
{
    struct chat_cli ch;
    memset(&ch, 0, sizeof(ch));
    struct gen_cli *g = &ch.g;
    g->cmd = "chat";
    g->p = uc_generate_default_params();
    int pos = parse_cmd_opts(ctl, g->cmd, usage_chat, argc, argv, "hjvn:S:", chat_longopts,
                             chat_opt, &ch);
    if (pos < argc) {
        usage_error(g->cmd, "chat takes no arguments: the messages come from stdin");
    }
    struct uc_chat_params p = uc_chat_default_params();
    p.request_id = g->p.request_id;
    p.sampling = g->p.sampling;
    p.sampling.stop = g->stop;
    p.sampling.n_stop = g->n_stop;
    p.sampling.stop_token_ids = g->stop_ids;
    p.sampling.n_stop_token_ids = g->n_stop_ids;
    p.compression = g->p.compression;
    p.compression.stage_starts = g->stage_starts;
    p.compression.n_stage_starts = g->n_stage_starts;

    struct chat_history h;
    memset(&h, 0, sizeof(h));
    if (ch.system) {
        history_push(&h, "system", (char *)(uintptr_t)ch.system, strlen(ch.system));
        h.keep = 1;
    }
    bool tty = isatty(STDIN_FILENO);
    char *line = NULL;
    size_t line_cap = 0;
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, g->cmd, &code);
    if (!c) {
        goto out;
    }
    code = UC_CTL_EXIT_OK;
    for (;;) {
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        ssize_t n = getline(&line, &line_cap, stdin);
        if (n < 0) {
            if (tty) {
                fputc('\n', stdout);
            }
            break;
        }
        size_t len = (size_t)n;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            len--;
        }
        line[len] = '\0';
        if (len == 0) {
            continue;
        }
        if (strcmp(line, "/exit") == 0) {
            break;
        }
        if (strcmp(line, "/reset") == 0) {
            history_truncate(&h, h.keep);
            if (tty) {
                fprintf(stderr, "(history cleared)\n");
            }
            continue;
        }
        char *content = uc_malloc(len + 1);
        if (!content) {
            oom_exit();
        }
        memcpy(content, line, len + 1);
        size_t user_at = h.n;
        history_push(&h, "user", content, len);
        char *reply = NULL;
        size_t reply_len = 0;
        int turn = chat_turn(ctl, c, &ch, &p, &h, &reply, &reply_len);
        if (turn == UC_CTL_EXIT_OK) {
            history_push(&h, "assistant", reply, reply_len);
        } else {
            uc_free(reply);
            history_truncate(&h, user_at); /* a failed turn leaves the history as it was */
            code = turn;
            if (!tty) {
                break; /* a script gets the exit code of the first failure */
            }
        }
    }
    uc_client_close(c);
out:
    history_truncate(&h, 0);
    uc_free(h.msgs);
    free(line);
    uc_free(g->stop);
    uc_free(g->stop_ids);
    uc_free(g->stage_starts);
    return code;
}

/* ========================================================================================= */
/* tokenize, detokenize, abort                                                               */
/* ========================================================================================= */

struct tok_cli {
    const char *file;
    bool no_special;
    bool pieces;
    bool skip_special;
};

static void tok_opt(int opt, const char *arg, void *user)
{
    struct tok_cli *t = user;
    switch (opt) {
    case 'f':
        t->file = arg;
        break;
    case 'p':
        t->pieces = true;
        break;
    case OPT_NO_SPECIAL:
        t->no_special = true;
        break;
    case OPT_SKIP_SPECIAL:
        t->skip_special = true;
        break;
    default:
        break;
    }
}

static int cmd_tokenize(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {"file", required_argument, NULL, 'f'},
        {"pieces", no_argument, NULL, 'p'},
        {"no-special", no_argument, NULL, OPT_NO_SPECIAL},
        {NULL, 0, NULL, 0},
    };
    struct tok_cli t = {0};
    int pos = parse_cmd_opts(ctl, "tokenize", usage_tokenize, argc, argv, "hjf:p", longopts,
                             tok_opt, &t);
    size_t text_len = 0;
    char *text = text_input("tokenize", argc, argv, pos, t.file, &text_len);
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, "tokenize", &code);
    if (c) {
        struct uc_tokens toks;
        struct uc_client_error err;
        if (uc_client_tokenize(c, text, text_len, !t.no_special, &toks, &err) != UC_OK) {
            code = uc_ctl_fail(ctl, "tokenize", &err);
        } else if (ctl->json) {
            printf("{\"token_ids\":");
            print_json_u32_array(stdout, toks.ids, toks.n_ids);
            printf(",\"tokens\":[");
            for (size_t i = 0; i < toks.n_pieces; i++) {
                if (i) {
                    putchar(',');
                }
                uc_ctl_json_str(stdout, toks.pieces[i]);
            }
            printf("],\"count\":%zu}\n", toks.n_ids);
        } else if (t.pieces) {
            for (size_t i = 0; i < toks.n_ids; i++) {
                printf("%" PRIu32 "\t%s\n", toks.ids[i],
                       i < toks.n_pieces ? toks.pieces[i] : "");
            }
        } else {
            for (size_t i = 0; i < toks.n_ids; i++) {
                printf("%s%" PRIu32, i ? " " : "", toks.ids[i]);
            }
            putchar('\n');
        }
        uc_tokens_fini(&toks);
        uc_client_close(c);
    }
    uc_free(text);
    return code;
}

static int cmd_detokenize(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {"skip-special", no_argument, NULL, OPT_SKIP_SPECIAL},
        {NULL, 0, NULL, 0},
    };
    struct tok_cli t = {0};
    int pos = parse_cmd_opts(ctl, "detokenize", usage_detokenize, argc, argv, "hj", longopts,
                             tok_opt, &t);
    size_t list_len = 0;
    char *list = text_input("detokenize", argc, argv, pos, NULL, &list_len);
    uint32_t *ids = NULL;
    size_t n = 0;
    if (!uc_ctl_parse_u32_list(list, &ids, &n)) {
        usage_error("detokenize", "expected token ids separated by spaces or commas");
    }
    uc_free(list);
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, "detokenize", &code);
    if (c) {
        char *text = NULL;
        size_t text_len = 0;
        struct uc_client_error err;
        if (uc_client_detokenize(c, ids, n, t.skip_special, &text, &text_len, &err) != UC_OK) {
            code = uc_ctl_fail(ctl, "detokenize", &err);
        } else if (ctl->json) {
            printf("{\"text\":");
            uc_ctl_json_strn(stdout, text, text_len);
            printf("}\n");
        } else {
            fwrite(text, 1, text_len, stdout); /* whole: the text may hold NUL bytes */
            putchar('\n');
        }
        uc_free(text);
        uc_client_close(c);
    }
    uc_free(ids);
    return code;
}

static int cmd_abort(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {NULL, 0, NULL, 0},
    };
    int pos = parse_cmd_opts(ctl, "abort", usage_abort, argc, argv, "hj", longopts, NULL, NULL);
    if (argc - pos != 1) {
        usage_error("abort", "expects exactly one REQUEST_ID");
    }
    const char *id = argv[pos];
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, "abort", &code);
    if (c) {
        bool found = false;
        struct uc_client_error err;
        if (uc_client_abort(c, id, &found, &err) != UC_OK) {
            code = uc_ctl_fail(ctl, "abort", &err);
        } else if (ctl->json) {
            printf("{\"request_id\":");
            uc_ctl_json_str(stdout, id);
            printf(",\"found\":%s}\n", found ? "true" : "false");
        } else {
            printf("%s: %s\n", id, found ? "aborted" : "not found (already finished?)");
        }
        uc_client_close(c);
    }
    return code;
}

/* ========================================================================================= */
/* info, health                                                                              */
/* ========================================================================================= */

static int cmd_info(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {NULL, 0, NULL, 0},
    };
    int pos = parse_cmd_opts(ctl, "info", usage_info, argc, argv, "hj", longopts, NULL, NULL);
    if (argc - pos > 1) {
        usage_error("info", "expects at most one SECTION");
    }
    const char *section = pos < argc ? argv[pos] : "";
    bool is_server = strcasecmp(section, "server") == 0;
    bool is_model = strcasecmp(section, "model") == 0;
    const char *stats_section = strcasecmp(section, "stats") == 0 ? "" : section;
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, "info", &code);
    if (!c) {
        return code;
    }
    struct uc_client_error err;
    if (!ctl->json) {
        struct uc_stats st;
        if (uc_client_stats(c, stats_section, &st, &err) != UC_OK) {
            code = uc_ctl_fail(ctl, "info", &err);
        } else {
            fputs(st.text, stdout);
            size_t n = strlen(st.text);
            if (n == 0 || st.text[n - 1] != '\n') {
                putchar('\n');
            }
        }
        uc_stats_fini(&st);
        uc_client_close(c);
        return code;
    }
    bool all = section[0] == '\0';
    struct uc_server_info si;
    struct uc_model_info mi;
    struct uc_stats st;
    memset(&si, 0, sizeof(si));
    memset(&mi, 0, sizeof(mi));
    memset(&st, 0, sizeof(st));
    if ((all || is_server) && uc_client_server_info(c, &si, &err) != UC_OK) {
        goto fail;
    }
    if ((all || is_model) && uc_client_model_info(c, &mi, &err) != UC_OK) {
        goto fail;
    }
    bool want_stats = all || (!is_server && !is_model);
    if (want_stats && uc_client_stats(c, stats_section, &st, &err) != UC_OK) {
        goto fail;
    }
    if (all) {
        printf("{\"server\":");
        json_server_info(stdout, &si);
        printf(",\"model\":");
        json_model_info(stdout, &mi);
        printf(",\"stats\":");
        json_stats(stdout, &st);
        printf("}\n");
    } else if (is_server) {
        json_server_info(stdout, &si);
        putchar('\n');
    } else if (is_model) {
        json_model_info(stdout, &mi);
        putchar('\n');
    } else {
        json_stats(stdout, &st);
        putchar('\n');
    }
    goto done;
fail:
    code = uc_ctl_fail(ctl, "info", &err);
done:
    uc_server_info_fini(&si);
    uc_model_info_fini(&mi);
    uc_stats_fini(&st);
    uc_client_close(c);
    return code;
}

struct health_cli {
    const char *service;
    int64_t wait_ms;
};

static void health_opt(int opt, const char *arg, void *user)
{
    struct health_cli *h = user;
    if (opt == OPT_SERVICE) {
        h->service = arg;
    } else if (opt == OPT_WAIT_MS) {
        h->wait_ms = (int64_t)num_u64("health", "--wait-ms", arg, INT32_MAX);
    }
}

static int cmd_health(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {"service", required_argument, NULL, OPT_SERVICE},
        {"wait-ms", required_argument, NULL, OPT_WAIT_MS},
        {NULL, 0, NULL, 0},
    };
    struct health_cli h = {.service = "", .wait_ms = 0};
    int pos = parse_cmd_opts(ctl, "health", usage_health, argc, argv, "hj", longopts, health_opt,
                             &h);
    if (pos < argc) {
        usage_error("health", "takes no arguments");
    }
    if (ctl->opts.call_timeout_ms == 0) {
        ctl->opts.call_timeout_ms = 5000;
    }
    double deadline = uc_time_s() + (double)h.wait_ms / 1e3;
    enum uc_health_status status = UC_HEALTH_UNKNOWN;
    struct uc_client_error err = {0};
    bool rpc_ok = false;
    bool connected = false;
    for (;;) {
        struct uc_client *c = NULL;
        connected = uc_client_connect(&c, ctl->server, &ctl->opts, &err) == UC_OK;
        if (connected) {
            rpc_ok = uc_client_health(c, h.service, &status, &err) == UC_OK;
            uc_client_close(c);
        }
        if ((rpc_ok && status == UC_HEALTH_SERVING) || uc_time_s() >= deadline) {
            break;
        }
        /* a server error other than UNAVAILABLE will not go away by waiting */
        if (!rpc_ok && err.grpc_code != UC_GRPC_UNAVAILABLE &&
            err.grpc_code != UC_GRPC_DEADLINE_EXCEEDED) {
            break;
        }
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (!rpc_ok) {
        return connected ? uc_ctl_fail(ctl, "health", &err)
                         : uc_ctl_connect_fail(ctl, "health", &err);
    }
    if (ctl->json) {
        printf("{\"status\":\"%s\",\"serving\":%s}\n", uc_health_status_name(status),
               status == UC_HEALTH_SERVING ? "true" : "false");
    } else {
        printf("%s\n", uc_health_status_name(status));
    }
    return status == UC_HEALTH_SERVING ? UC_CTL_EXIT_OK : UC_CTL_EXIT_UNAVAILABLE;
}

/* ========================================================================================= */
/* profile, calibrate, set-policy, drain                                                     */
/* ========================================================================================= */

struct admin_cli {
    const char *cmd;
    bool raw;
    const char *file;
    const char *text;
    uint32_t window_tokens;
    uint32_t max_windows;
    const char *policy;
    uint32_t kv_budget;
    const char *decode_mode;
    const char *grouping;
    uint32_t timeout_ms;
};

static void admin_opt(int opt, const char *arg, void *user)
{
    struct admin_cli *a = user;
    switch (opt) {
    case OPT_RAW:
        a->raw = true;
        break;
    case 'f':
        a->file = arg;
        break;
    case OPT_TEXT:
        a->text = arg;
        break;
    case OPT_WINDOW_TOKENS:
        a->window_tokens = num_u32(a->cmd, "--window-tokens", arg);
        break;
    case OPT_MAX_WINDOWS:
        a->max_windows = num_u32(a->cmd, "--max-windows", arg);
        break;
    case OPT_POLICY:
        a->policy = arg;
        break;
    case OPT_KV_BUDGET:
        a->kv_budget = num_u32(a->cmd, "--kv-budget", arg);
        break;
    case OPT_DECODE_MODE:
        a->decode_mode = arg;
        break;
    case OPT_GROUPING:
        a->grouping = arg;
        break;
    case OPT_TIMEOUT_MS:
        a->timeout_ms = num_u32(a->cmd, "--timeout-ms", arg);
        break;
    default:
        break;
    }
}

static int show_profile(struct uc_ctl *ctl, const struct uc_client_profile *p, bool raw)
{
    if (ctl->json) {
        json_profile(stdout, p, raw);
        putchar('\n');
    } else if (raw) {
        fputs(p->json, stdout);
        if (!p->json[0] || p->json[strlen(p->json) - 1] != '\n') {
            putchar('\n');
        }
    } else {
        print_profile_table(stdout, p);
    }
    return UC_CTL_EXIT_OK;
}

static int cmd_profile(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {"raw", no_argument, NULL, OPT_RAW},
        {NULL, 0, NULL, 0},
    };
    struct admin_cli a = {.cmd = "profile"};
    int pos = parse_cmd_opts(ctl, a.cmd, usage_profile, argc, argv, "hj", longopts, admin_opt,
                             &a);
    if (pos < argc) {
        usage_error(a.cmd, "takes no arguments");
    }
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, a.cmd, &code);
    if (c) {
        struct uc_client_profile p;
        struct uc_client_error err;
        if (uc_client_profile(c, &p, &err) != UC_OK) {
            code = uc_ctl_fail(ctl, a.cmd, &err);
        } else {
            code = show_profile(ctl, &p, a.raw);
        }
        uc_client_profile_fini(&p);
        uc_client_close(c);
    }
    return code;
}

static int cmd_calibrate(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {"file", required_argument, NULL, 'f'},
        {"text", required_argument, NULL, OPT_TEXT},
        {"window-tokens", required_argument, NULL, OPT_WINDOW_TOKENS},
        {"max-windows", required_argument, NULL, OPT_MAX_WINDOWS},
        {NULL, 0, NULL, 0},
    };
    struct admin_cli a = {.cmd = "calibrate"};
    int pos = parse_cmd_opts(ctl, a.cmd, usage_calibrate, argc, argv, "hjf:", longopts, admin_opt,
                             &a);
    if (pos < argc) {
        usage_error(a.cmd, "takes no arguments (use --file F or --text TEXT)");
    }
    if (a.file && a.text) {
        usage_error(a.cmd, "give either --file or --text, not both");
    }
    size_t text_len = 0;
    char *text = a.file ? read_input_file(a.cmd, a.file, &text_len) : NULL;
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, a.cmd, &code);
    if (c) {
        struct uc_client_profile p;
        struct uc_client_error err;
        if (uc_client_calibrate(c, text ? text : a.text, a.window_tokens, a.max_windows, &p,
                                &err) != UC_OK) {
            code = uc_ctl_fail(ctl, a.cmd, &err);
        } else {
            code = show_profile(ctl, &p, false);
        }
        uc_client_profile_fini(&p);
        uc_client_close(c);
    }
    uc_free(text);
    return code;
}

static int cmd_set_policy(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {"policy", required_argument, NULL, OPT_POLICY},
        {"kv-budget", required_argument, NULL, OPT_KV_BUDGET},
        {"decode-mode", required_argument, NULL, OPT_DECODE_MODE},
        {"grouping", required_argument, NULL, OPT_GROUPING},
        {NULL, 0, NULL, 0},
    };
    struct admin_cli a = {.cmd = "set-policy"};
    int pos = parse_cmd_opts(ctl, a.cmd, usage_set_policy, argc, argv, "hj", longopts, admin_opt,
                             &a);
    if (argc - pos > 1) {
        usage_error(a.cmd, "expects at most one POLICY argument");
    }
    if (pos < argc) {
        if (a.policy) {
            usage_error(a.cmd, "give the policy either as an argument or with --policy");
        }
        a.policy = argv[pos];
    }
    if (!a.policy && !a.kv_budget && !a.decode_mode && !a.grouping) {
        usage_error(a.cmd, "nothing to change: give a POLICY or an option");
    }
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, a.cmd, &code);
    if (c) {
        struct uc_client_policy req = {.policy = (char *)(uintptr_t)a.policy,
                                .kv_budget = a.kv_budget,
                                .decode_mode = (char *)(uintptr_t)a.decode_mode,
                                .grouping = (char *)(uintptr_t)a.grouping};
        struct uc_client_policy now;
        struct uc_client_error err;
        if (uc_client_set_policy(c, &req, &now, &err) != UC_OK) {
            code = uc_ctl_fail(ctl, a.cmd, &err);
        } else if (ctl->json) {
            printf("{\"policy\":");
            uc_ctl_json_str(stdout, now.policy);
            printf(",\"kv_budget\":%" PRIu32 ",\"decode_mode\":", now.kv_budget);
            uc_ctl_json_str(stdout, now.decode_mode);
            printf(",\"grouping\":");
            uc_ctl_json_str(stdout, now.grouping);
            printf("}\n");
        } else {
            printf("policy=%s kv_budget=%" PRIu32 " decode_mode=%s grouping=%s\n", now.policy,
                   now.kv_budget, now.decode_mode, now.grouping);
        }
        uc_client_policy_fini(&now);
        uc_client_close(c);
    }
    return code;
}

static int cmd_drain(struct uc_ctl *ctl, int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},
        {"json", no_argument, NULL, OPT_JSON},
        {"timeout-ms", required_argument, NULL, OPT_TIMEOUT_MS},
        {NULL, 0, NULL, 0},
    };
    struct admin_cli a = {.cmd = "drain"};
    int pos = parse_cmd_opts(ctl, a.cmd, usage_drain, argc, argv, "hj", longopts, admin_opt, &a);
    if (pos < argc) {
        usage_error(a.cmd, "takes no arguments");
    }
    int code;
    struct uc_client *c = uc_ctl_connect(ctl, a.cmd, &code);
    if (c) {
        struct uc_drain_result r;
        struct uc_client_error err;
        if (uc_client_drain(c, a.timeout_ms, &r, &err) != UC_OK) {
            code = uc_ctl_fail(ctl, a.cmd, &err);
        } else if (ctl->json) {
            printf("{\"finished\":%" PRIu32 ",\"aborted\":%" PRIu32 "}\n", r.finished, r.aborted);
        } else {
            printf("drained: %" PRIu32 " finished, %" PRIu32 " aborted\n", r.finished, r.aborted);
        }
        uc_client_close(c);
    }
    return code;
}

/* ========================================================================================= */
/* main                                                                                      */
/* ========================================================================================= */

struct command {
    const char *name;
    int (*fn)(struct uc_ctl *ctl, int argc, char **argv);
    const char *usage;
};

static int cmd_bench(struct uc_ctl *ctl, int argc, char **argv)
{
    return uc_bench_main(ctl, argc, argv);
}

static const struct command commands[] = {
    {"generate", cmd_generate, usage_generate},
    {"chat", cmd_chat, usage_chat},
    {"tokenize", cmd_tokenize, usage_tokenize},
    {"detokenize", cmd_detokenize, usage_detokenize},
    {"abort", cmd_abort, usage_abort},
    {"info", cmd_info, usage_info},
    {"health", cmd_health, usage_health},
    {"profile", cmd_profile, usage_profile},
    {"set-policy", cmd_set_policy, usage_set_policy},
    {"calibrate", cmd_calibrate, usage_calibrate},
    {"drain", cmd_drain, usage_drain},
    {"bench", cmd_bench, NULL},
};

static const struct command *find_command(const char *name)
{
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(commands[i].name, name) == 0) {
            return &commands[i];
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"server", required_argument, NULL, 's'},
        {"timeout-ms", required_argument, NULL, 't'},
        {"connect-timeout-ms", required_argument, NULL, OPT_CONNECT_TIMEOUT},
        {"wait", no_argument, NULL, 'w'},
        {"tls-ca", required_argument, NULL, OPT_TLS_CA},
        {"tls-server-name", required_argument, NULL, OPT_TLS_NAME},
        {"api-key", required_argument, NULL, OPT_API_KEY},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    struct uc_ctl ctl = {.server = NULL, .opts = uc_client_default_opts(), .json = false};
    const char *env = getenv("UNCOMP_SERVER");
    ctl.server = env && env[0] ? env : DEFAULT_SERVER;
    ctl.opts.api_key = getenv("UNCOMP_API_KEY");

    opterr = 0;
    int opt;
    /* "+": stop at the command name; its options are parsed by the command */
    while ((opt = getopt_long(argc, argv, "+:s:t:wjhV", longopts, NULL)) != -1) {
        switch (opt) {
        case 's':
            ctl.server = optarg;
            break;
        case 't':
            ctl.opts.call_timeout_ms = (int64_t)num_u64(NULL, "--timeout-ms", optarg, INT32_MAX);
            break;
        case OPT_CONNECT_TIMEOUT:
            ctl.opts.connect_timeout_ms =
                (int64_t)num_u64(NULL, "--connect-timeout-ms", optarg, INT32_MAX);
            break;
        case 'w':
            ctl.opts.wait_for_server = true;
            break;
        case OPT_TLS_CA:
            ctl.opts.root_certs_file = optarg;
            break;
        case OPT_TLS_NAME:
            ctl.opts.tls_server_name = optarg;
            break;
        case OPT_API_KEY:
            ctl.opts.api_key = optarg;
            break;
        case 'j':
            ctl.json = true;
            break;
        case 'h':
            fputs(usage_main, stdout);
            return UC_CTL_EXIT_OK;
        case 'V':
            printf("uncompctl %s\n", UC_CTL_VERSION);
            return UC_CTL_EXIT_OK;
        case ':':
            usage_error(NULL, "option '%s' needs a value", argv[optind - 1]);
        default:
            if (optopt && optopt < OPT_FIRST) {
                usage_error(NULL, "unknown option '-%c'", optopt);
            }
            usage_error(NULL, "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc) {
        fputs(usage_main, stderr);
        return UC_CTL_EXIT_USAGE;
    }
    const char *name = argv[optind];
    if (strcmp(name, "help") == 0) {
        const struct command *c = optind + 1 < argc ? find_command(argv[optind + 1]) : NULL;
        if (c && c->usage) {
            fputs(c->usage, stdout);
            return UC_CTL_EXIT_OK;
        }
        if (c) { /* bench prints its own help */
            char *hv[] = {(char *)(uintptr_t)c->name, (char *)(uintptr_t)"--help", NULL};
            return c->fn(&ctl, 2, hv);
        }
        fputs(usage_main, stdout);
        return UC_CTL_EXIT_OK;
    }
    const struct command *c = find_command(name);
    if (!c) {
        usage_error(NULL, "unknown command '%s'", name);
    }
    return c->fn(&ctl, argc - optind, argv + optind);
}
