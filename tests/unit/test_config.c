/* Unit tests for daemon/config.c: defaults from the table, --name value / --name=value / bare
 * boolean flags, config file lines (comments, quotes, whitespace, CRLF), the command line
 * winning over the file, refusals naming the option (unknown names, values out of range or of
 * the wrong type, CLI-only options in a file), cross-field validation (--tls-cert without
 * --tls-key, ...), the config hash skipping exactly the rank-local options, the help and info
 * texts; and that deploy/uncompd.conf (argv[1]) documents every option that belongs in a config
 * file, with its help text and its default, and loads to exactly the defaults. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "daemon/config.h"
#include "test_util.h"

static const char *conf_path = "deploy/uncompd.conf";
static char tmp_conf[64];


#define assert_has(hay, needle)                                                                    \
    do {                                                                                           \
        if (!strstr((hay), (needle))) {                                                            \
            fail_msg("'%s' not found in: %s", (needle), (hay));                                    \
        }                                                                                          \
    } while (0)

/* ---- helpers ------------------------------------------------------------------------------- */

static char msg[1024];
static bool help_flag, list_flag;

/* Loads a NULL-terminated argument list (argv[0] is added). */
static uc_status load_v(struct uc_config *c, const char *const *args)
{
    char *argv[64];
    int argc = 0;
    argv[argc++] = (char *)(uintptr_t)"uncompd";
    for (int i = 0; args[i]; i++) {
        argv[argc++] = (char *)(uintptr_t)args[i];
    }
    argv[argc] = NULL;
    return uc_config_load(c, argc, argv, msg, sizeof msg, &help_flag, &list_flag);
}

#define LOAD(c, ...) load_v((c), (const char *const[]){__VA_ARGS__, NULL})

static void write_tmp(const char *text)
{
    assert_int_equal(uc_file_write_all(tmp_conf, text, strlen(text)), UC_OK);
}

static const struct uc_cfg_option *opt(const char *name)
{
    for (const struct uc_cfg_option *o = uc_config_options(); o->name; o++) {
        if (strcmp(o->name, name) == 0) {
            return o;
        }
    }
    fail_msg("no option %s", name);
    return NULL;
}

/* The value of an option as text (freed here). */
static const char *get(const struct uc_config *c, const char *name)
{
    static char buf[4][256];
    static int k;
    char *v = uc_config_get(c, name);
    assert_non_null(v);
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s", v);
    uc_free(v);
    return buf[k];
}

/* Expects a usage error whose message contains each given string; frees the config. */
static void expect_refused(struct uc_config *c, uc_status rc, const char *a, const char *b)
{
    if (rc != UC_ERR_INVALID_ARG) {
        fail_msg("want UC_ERR_INVALID_ARG, got %s (msg '%s')", uc_status_str(rc), msg);
    }
    assert_has(msg, a);
    if (b) {
        assert_has(msg, b);
    }
    uc_config_fini(c);
}

/* ---- defaults and syntax ----------------------------------------------------------------- */

static void test_defaults(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_config c;
    assert_int_equal(LOAD(&c, "--fp32=no"), UC_OK); /* (a no-op flag: the list may not be empty) */
    assert_false(help_flag);
    assert_false(list_flag);
    assert_string_equal(c.model, "");
    assert_int_equal(c.tp, 0);
    assert_string_equal(c.backend, "cpu");
    assert_int_equal(c.device, -1);
    assert_false(c.fp32);
    assert_int_equal(c.kv_memory, 256LL << 20);
    assert_int_equal(c.kv_block_tokens, 16);
    assert_int_equal(c.prefill_chunk, 0);
    assert_string_equal(c.schedule, "mixed"); /* today's steps unless asked */
    assert_int_equal(c.max_decode_wait_ms, 0);
    assert_int_equal(c.max_batch, 64);
    assert_int_equal(c.max_context, 0);
    assert_int_equal(c.comm_timeout_ms, 30000);
    assert_int_equal(c.heartbeat_ms, 1000);
    assert_string_equal(c.log_level, "notice");
    assert_string_equal(c.listen, "127.0.0.1:50051");
    assert_int_equal(c.metrics_port, 0);
    assert_string_equal(c.tls_cert, "");
    assert_int_equal(c.max_message_bytes, 64LL << 20);
    assert_string_equal(c.policy, "full");
    assert_int_equal(c.kv_budget, 128);
    assert_int_equal(c.window, 8);
    assert_int_equal(c.pool_kernel, 7);
    assert_true(fabs(c.spread - 1.0 / 3.0) < 1e-9);
    assert_true(c.r_min == 0.375);
    assert_string_equal(c.decode_mode, "append");
    assert_string_equal(c.grouping, "profile");
    assert_string_equal(c.row_score, "accum-max");
    assert_string_equal(c.prompt, "");
    assert_int_equal(c.max_tokens, 128);
    assert_true(c.temperature == 0.0);
    assert_true(c.top_p == 1.0);
    assert_true(c.repetition_penalty == 1.0);
    assert_false(c.report);
    assert_false(c.ignore_eos);
    assert_int_equal(uc_config_validate(&c, 1, msg, sizeof msg), UC_OK);
    /* every option's value is its default, as the table states it */
    for (const struct uc_cfg_option *o = uc_config_options(); o->name; o++) {
        const char *v = get(&c, o->name);
        if (o->type == UC_CFG_BYTES) {
            continue; /* "256MiB" reads back as a byte count (checked above) */
        }
        if (o->type == UC_CFG_DBL) {
            assert_true(fabs(strtod(v, NULL) - strtod(o->dflt, NULL)) < 1e-5);
        } else {
            assert_string_equal(v, o->dflt);
        }
    }
    assert_null(uc_config_get(&c, "no-such-option"));
    uc_config_fini(&c);
    uc_config_fini(&c); /* safe twice */
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_command_line_forms(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_config c;
    assert_int_equal(LOAD(&c, "--kv-budget", "512", "--window=16", "--policy", "uncomp",
                          "--spread=0.25", "--kv-memory", "1.5GiB", "--max-message-bytes=2m",
                          "--device", "-1", "--stage-starts=6,7", "--model", "synthetic:tiny"),
                     UC_OK);
    assert_int_equal(c.kv_budget, 512);
    assert_int_equal(c.window, 16);
    assert_string_equal(c.policy, "uncomp");
    assert_true(c.spread == 0.25);
    assert_int_equal(c.kv_memory, 1536LL << 20);
    assert_int_equal(c.max_message_bytes, 2LL << 20);
    assert_int_equal(c.device, -1);
    assert_string_equal(c.stage_starts, "6,7");
    assert_string_equal(c.model, "synthetic:tiny");
    uc_config_fini(&c);
    /* sizes in TiB (a big host's pool) */
    assert_int_equal(LOAD(&c, "--kv-memory", "1.5TiB"), UC_OK);
    assert_int_equal(c.kv_memory, 1536LL << 30);
    uc_config_fini(&c);
    /* booleans: bare (followed by another flag or at the end), with a value, with = */
    assert_int_equal(LOAD(&c, "--fp32", "--report", "--ignore-eos"), UC_OK);
    assert_true(c.fp32);
    assert_true(c.report);
    assert_true(c.ignore_eos);
    uc_config_fini(&c);
    assert_int_equal(LOAD(&c, "--fp32", "no", "--report=yes", "--ignore-eos", "off"), UC_OK);
    assert_false(c.fp32);
    assert_true(c.report);
    assert_false(c.ignore_eos);
    uc_config_fini(&c);
    assert_int_equal(LOAD(&c, "--fp32=true", "--report=0", "--ignore-eos", "1"), UC_OK);
    assert_true(c.fp32);
    assert_false(c.report);
    assert_true(c.ignore_eos);
    uc_config_fini(&c);
    /* the last of repeated flags wins; an empty value is allowed for strings */
    assert_int_equal(LOAD(&c, "--kv-budget", "64", "--kv-budget=96", "--profile="), UC_OK);
    assert_int_equal(c.kv_budget, 96);
    assert_string_equal(c.profile, "");
    uc_config_fini(&c);
    /* --help, -h and --list-options only raise flags */
    assert_int_equal(LOAD(&c, "--help"), UC_OK);
    assert_true(help_flag);
    uc_config_fini(&c);
    assert_int_equal(LOAD(&c, "-h", "--list-options"), UC_OK);
    assert_true(help_flag);
    assert_true(list_flag);
    uc_config_fini(&c);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_refusals(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_config c;
    expect_refused(&c, LOAD(&c, "--kv-budgt", "5"), "unknown option --kv-budgt", NULL);
    expect_refused(&c, LOAD(&c, "--kv-budget"), "--kv-budget needs a value", NULL);
    expect_refused(&c, LOAD(&c, "kv-budget", "5"), "unexpected argument 'kv-budget'", NULL);
    expect_refused(&c, LOAD(&c, "-k", "5"), "unexpected argument '-k'", NULL);
    /* ranges */
    expect_refused(&c, LOAD(&c, "--kv-budget", "0"), "--kv-budget=0", "must be in [1, ");
    expect_refused(&c, LOAD(&c, "--window=65"), "--window=65 must be in [1, 64]", NULL);
    expect_refused(&c, LOAD(&c, "--spread", "1.5"), "--spread=1.5", "must be in [0, 0.999]");
    expect_refused(&c, LOAD(&c, "--tp", "-1"), "--tp=-1 must be in [0, 4096]", NULL);
    expect_refused(&c, LOAD(&c, "--metrics-port", "65536"), "--metrics-port=65536", NULL);
    expect_refused(&c, LOAD(&c, "--kv-memory", "1KiB"), "--kv-memory=1KiB must be in [65536",
                   NULL);
    expect_refused(&c, LOAD(&c, "--max-message-bytes", "2GiB"), "--max-message-bytes=2GiB", NULL);
    expect_refused(&c, LOAD(&c, "--top-p", "0"), "--top-p=0", NULL);
    expect_refused(&c, LOAD(&c, "--temperature=-0.5"), "--temperature=-0.5", NULL);
    expect_refused(&c, LOAD(&c, "--max-decode-wait-ms", "-1"),
                   "--max-decode-wait-ms=-1 must be in [0, ", NULL);
    /* types */
    expect_refused(&c, LOAD(&c, "--tp", "two"), "--tp: 'two' is not an integer number", NULL);
    expect_refused(&c, LOAD(&c, "--tp", "1.5"), "--tp: '1.5' is not an integer", NULL);
    expect_refused(&c, LOAD(&c, "--kv-budget", "12abc"), "--kv-budget: '12abc'", NULL);
    expect_refused(&c, LOAD(&c, "--spread", ""), "--spread: '' is not a number", NULL);
    expect_refused(&c, LOAD(&c, "--r-min", "nan"), "--r-min: 'nan' is not a number", NULL);
    expect_refused(&c, LOAD(&c, "--kv-memory", "12XB"), "--kv-memory: '12XB' is not a size",
                   NULL);
    expect_refused(&c, LOAD(&c, "--fp32=maybe"), "--fp32: 'maybe' is not yes or no", NULL);
    /* a later good flag does not hide an earlier bad one */
    expect_refused(&c, LOAD(&c, "--window", "0", "--window", "8"), "--window=0", NULL);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* ---- config files -------------------------------------------------------------------------- */

static void test_config_file(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_config c;
    write_tmp("# a comment\n"
              "\n"
              "   kv-budget    512   \n"
              "policy snapkv\r\n"
              "\tlisten\t\"0.0.0.0:6000\"\n"
              "stage-starts \"\"\n"
              "kv-memory 1GiB\n"
              "fp32 yes\n"
              "  # indented comment\n"
              "log-level debug");
    assert_int_equal(LOAD(&c, "--config", tmp_conf), UC_OK);
    assert_string_equal(c.config_file, tmp_conf);
    assert_int_equal(c.kv_budget, 512);
    assert_string_equal(c.policy, "snapkv"); /* CR stripped */
    assert_string_equal(c.listen, "0.0.0.0:6000");
    assert_string_equal(c.stage_starts, "");
    assert_int_equal(c.kv_memory, 1LL << 30);
    assert_true(c.fp32);
    assert_string_equal(c.log_level, "debug"); /* the last line needs no newline */
    uc_config_fini(&c);
    /* the command line wins, whether it comes before or after --config */
    assert_int_equal(LOAD(&c, "--kv-budget", "256", "--config", tmp_conf, "--policy=h2o"), UC_OK);
    assert_int_equal(c.kv_budget, 256);
    assert_string_equal(c.policy, "h2o");
    assert_string_equal(c.listen, "0.0.0.0:6000"); /* the file still applies elsewhere */
    uc_config_fini(&c);
    assert_int_equal(LOAD(&c, "--config=" "/dev/null"), UC_OK); /* an empty file */
    assert_int_equal(c.kv_budget, 128);
    uc_config_fini(&c);
    /* refusals name the file and line */
    char want[128];
    write_tmp("kv-budget 64\nwindow 99\n");
    snprintf(want, sizeof want, "%s:2: --window=99 must be in [1, 64]", tmp_conf);
    expect_refused(&c, LOAD(&c, "--config", tmp_conf), want, NULL);
    write_tmp("# ok\nbogus-option 1\n");
    snprintf(want, sizeof want, "%s:2: unknown option 'bogus-option'", tmp_conf);
    expect_refused(&c, LOAD(&c, "--config", tmp_conf), want, NULL);
    write_tmp("prompt hello\n"); /* CLI-only */
    expect_refused(&c, LOAD(&c, "--config", tmp_conf), "unknown option 'prompt'", NULL);
    write_tmp("config /etc/other.conf\n");
    expect_refused(&c, LOAD(&c, "--config", tmp_conf), "unknown option 'config'", NULL);
    write_tmp("kv-budget=64\n");
    expect_refused(&c, LOAD(&c, "--config", tmp_conf), "unknown option 'kv-budget=64'", NULL);
    write_tmp("fp32 perhaps\n");
    expect_refused(&c, LOAD(&c, "--config", tmp_conf), ":1: --fp32: 'perhaps' is not yes or no",
                   NULL);
    expect_refused(&c, LOAD(&c, "--config", "/nonexistent/uncompd.conf"),
                   "--config: cannot read /nonexistent/uncompd.conf", NULL);
    /* a bad value on the command line is still refused after a good file */
    write_tmp("kv-budget 64\n");
    expect_refused(&c, LOAD(&c, "--config", tmp_conf, "--kv-budget", "-3"), "--kv-budget=-3", NULL);
    unlink(tmp_conf);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* ---- cross-field validation ---------------------------------------------------------------- */

static void expect_invalid(const char *const *args, int world, const char *want)
{
    struct uc_config c;
    assert_int_equal(load_v(&c, args), UC_OK);
    msg[0] = '\0';
    uc_status rc = uc_config_validate(&c, world, msg, sizeof msg);
    uc_config_fini(&c);
    if (!want) {
        if (rc != UC_OK) {
            fail_msg("refused: %s", msg);
        }
        return;
    }
    assert_int_equal(rc, UC_ERR_INVALID_ARG);
    assert_has(msg, want);
}

#define VALID(world, ...) expect_invalid((const char *const[]){__VA_ARGS__, NULL}, (world), NULL)
#define INVALID(world, want, ...)                                                                  \
    expect_invalid((const char *const[]){__VA_ARGS__, NULL}, (world), (want))

static void test_validate(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    INVALID(1, "--tls-cert and --tls-key go together", "--tls-cert", "/etc/uncomp/cert.pem");
    INVALID(1, "--tls-cert and --tls-key go together", "--tls-key", "/etc/uncomp/key.pem");
    VALID(1, "--tls-cert", "/c.pem", "--tls-key", "/k.pem");
    INVALID(1, "--tp=2 but mpirun started 1 rank(s)", "--tp", "2");
    VALID(2, "--tp", "2");
    VALID(4, "--tp", "0");
    INVALID(1, "--backend=gpu must be cpu or cuda", "--backend", "gpu");
    VALID(1, "--backend", "cuda");
    INVALID(1, "--heartbeat=1000 must be at most a third of --comm-timeout=2999",
            "--comm-timeout", "2999");
    VALID(1, "--comm-timeout", "3000");
    INVALID(1, "--pool-kernel=6 must be odd", "--pool-kernel", "6");
    /* the step schedule: a name of its two, nothing else (case and spelling matter) */
    VALID(1, "--schedule", "mixed");
    VALID(1, "--schedule=prefill-first", "--max-decode-wait-ms", "50");
    INVALID(1, "--schedule=fifo must be mixed or prefill-first", "--schedule", "fifo");
    INVALID(1, "--schedule=Prefill-First must be mixed or prefill-first", "--schedule",
            "Prefill-First");
    INVALID(1, "--schedule= must be mixed or prefill-first", "--schedule", "");
    INVALID(1, "--listen=localhost must be HOST:PORT", "--listen", "localhost");
    INVALID(1, "--listen=:50051 must be HOST:PORT", "--listen", ":50051");
    INVALID(1, "must be HOST:PORT", "--listen", "host:0");
    INVALID(1, "must be HOST:PORT", "--listen", "host:65536");
    VALID(1, "--listen", "[::1]:50051");
    INVALID(1, "--prompt and --prompt-file exclude each other", "--prompt", "hi",
            "--prompt-file", "/tmp/p.txt");
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* ---- the hash ------------------------------------------------------------------------------- */

/* A valid value for an option that differs from its default. */
static void other_value(const struct uc_cfg_option *o, char *out, size_t n)
{
    switch (o->type) {
    case UC_CFG_STR:
        snprintf(out, n, "%s-x", o->dflt);
        break;
    case UC_CFG_BOOL:
        snprintf(out, n, "%s", strcmp(o->dflt, "no") == 0 ? "yes" : "no");
        break;
    default: {
        double d = strtod(o->dflt, NULL), v = o->min;
        if (o->type == UC_CFG_BYTES || fabs(v - d) < 1e-3 * (fabs(d) + 1)) {
            v = o->max < 1e12 ? o->max : 1e12;
        }
        if (o->type == UC_CFG_BYTES && v == d) {
            v = o->min;
        }
        snprintf(out, n, o->type == UC_CFG_DBL ? "%.6g" : "%.0f", v);
    }
    }
}

static void test_hash(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_config a, b;
    assert_int_equal(LOAD(&a, "--fp32=no"), UC_OK);
    assert_int_equal(LOAD(&b, "--fp32=no"), UC_OK);
    uint64_t h = uc_config_hash(&a);
    assert_true(h == uc_config_hash(&b));
    uc_config_fini(&b);
    /* the same value spelled differently is the same configuration */
    assert_int_equal(LOAD(&b, "--kv-memory", "268435456", "--spread=0.333333333"), UC_OK);
    assert_true(h == uc_config_hash(&b));
    uc_config_fini(&b);
    /* every option: changing it changes the hash exactly when it is not rank-local */
    int n_local = 0;
    for (const struct uc_cfg_option *o = uc_config_options(); o->name; o++) {
        char v[128], flag[256];
        if (o->offset == offsetof(struct uc_config, config_file)) {
            continue; /* --config=<file> would be read (rank-local: checked below) */
        }
        other_value(o, v, sizeof v);
        snprintf(flag, sizeof flag, "--%s=%s", o->name, v);
        uc_status rc = LOAD(&b, flag);
        if (rc != UC_OK) {
            fail_msg("%s refused: %s", flag, msg);
        }
        bool same = uc_config_hash(&b) == h;
        bool local = (o->flags & UC_CFG_RANK_LOCAL) != 0;
        n_local += local;
        if (same != local) {
            fail_msg("%s: hash %s but the option is %srank-local", flag,
                     same ? "unchanged" : "changed", local ? "" : "not ");
        }
        uc_config_fini(&b);
    }
    assert_true(n_local >= 2); /* device and log-level at least */
    assert_true(opt("config")->flags & UC_CFG_RANK_LOCAL);
    assert_true(opt("device")->flags & UC_CFG_RANK_LOCAL);
    assert_true(opt("log-level")->flags & UC_CFG_RANK_LOCAL);
    assert_false(opt("kv-budget")->flags & UC_CFG_RANK_LOCAL);
    assert_false(opt("tp")->flags & UC_CFG_RANK_LOCAL);
    uc_config_fini(&a);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Regression (daemon/config.c, write_value): doubles are written with "%g" (6 significant digits), so
 * uc_config_hash cannot tell --spread 0.3333331 from --spread 0.3333334 (or --r-min 0.1234561
 * from 0.1234564): ranks started with different values agree on the hash. uc_config_get and
 * the # Config section lose the same digits. */
static void test_regression_hash_double_precision(void **state)
{
    (void)state;
    struct uc_config a, b;
    assert_int_equal(LOAD(&a, "--spread", "0.3333331"), UC_OK);
    assert_int_equal(LOAD(&b, "--spread", "0.3333334"), UC_OK);
    assert_true(a.spread != b.spread);
    bool same = uc_config_hash(&a) == uc_config_hash(&b);
    char *ga = uc_config_get(&a, "spread");
    bool round_trips = ga && strtod(ga, NULL) == a.spread;
    uc_free(ga);
    uc_config_fini(&a);
    uc_config_fini(&b);
    if (same || !round_trips) {
        fail_msg("regression: --spread 0.3333331 and 0.3333334 hash %s; uc_config_get(spread) %s",
                 same ? "equal" : "differently", round_trips ? "round-trips" : "loses digits");
    }
}

/* ---- help, table, info ---------------------------------------------------------------------- */

static void test_texts(void **state)
{
    (void)state;
    struct uc_config c;
    assert_int_equal(LOAD(&c, "--kv-budget", "300", "--prompt", "hi"), UC_OK);
    struct uc_buf help, table, info;
    uc_buf_init(&help);
    uc_buf_init(&table);
    uc_buf_init(&info);
    uc_config_write_help(&help);
    uc_config_write_table(&c, &table);
    uc_config_write_info(&c, &info);
    assert_has(info.data, "# Config\n");
    assert_has(info.data, "\nkv-budget:300\n");
    assert_has(table.data, "kv-budget");
    for (const struct uc_cfg_option *o = uc_config_options(); o->name; o++) {
        char name[96], line[128];
        snprintf(name, sizeof name, "--%s ", o->name);
        assert_has(help.data, name);
        assert_has(help.data, o->help);
        snprintf(line, sizeof line, "\n%s:", o->name);
        bool in_info = strstr(info.data, line) != NULL;
        assert_int_equal(in_info, !(o->flags & (UC_CFG_ONESHOT | UC_CFG_CLI_ONLY)));
        snprintf(line, sizeof line, "  %s ", o->name);
        bool in_table = strstr(table.data, line) != NULL;
        assert_int_equal(in_table, !(o->flags & UC_CFG_ONESHOT));
    }
    assert_has(help.data, "(default: 256MiB)");
    assert_has(help.data, "(default: \"\")");
    /* sections, in this order, and value placeholders */
    static const char *const sections[] = {
        "\nModel and engine:\n", "\nServer (gRPC, limits, logging):\n",
        "\nOpenAI-compatible HTTP front and API keys:\n", "\nCompression (",
        "\nCalibration (", "\nOne-shot mode (",
    };
    const char *prev = help.data;
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++) {
        const char *at = strstr(help.data, sections[i]);
        if (!at || at < prev) {
            fail_msg("--help lacks section \"%s\" after the one before:\n%s", sections[i] + 1,
                     help.data);
        }
        prev = at;
    }
    /* each option under its section */
    assert_true(strstr(help.data, "--kv-memory BYTES") < strstr(help.data, "\nServer ("));
    assert_true(strstr(help.data, "--listen HOST:PORT") > strstr(help.data, "\nServer ("));
    assert_true(strstr(help.data, "--policy NAME") > strstr(help.data, "\nCompression ("));
    assert_true(strstr(help.data, "--calib-window N") > strstr(help.data, "\nCalibration ("));
    assert_true(strstr(help.data, "\n  --prompt TEXT ") > strstr(help.data, "\nOne-shot mode ("));
    assert_has(help.data, "--report [yes|no] ");
    assert_has(help.data, "--temperature X ");
    uc_buf_fini(&help);
    uc_buf_fini(&table);
    uc_buf_fini(&info);
    uc_config_fini(&c);
}

/* ---- deploy/uncompd.conf ------------------------------------------------------------------ */

static bool belongs_in_file(const struct uc_cfg_option *o)
{
    return !(o->flags & (UC_CFG_CLI_ONLY | UC_CFG_ONESHOT));
}

static void test_example_conf(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    char *text = NULL;
    if (uc_file_read_all(&text, NULL, conf_path) != UC_OK) {
        fail_msg("cannot read %s (pass its path as argv[1])", conf_path);
    }
    /* split into lines, keeping the empty ones (they end comment blocks) */
    int n_lines = 0;
    char *lines[2048];
    for (char *p = text; *p && n_lines < 2048;) {
        lines[n_lines++] = p;
        char *nl = strchr(p, '\n');
        if (!nl) {
            break;
        }
        *nl = '\0';
        p = nl + 1;
    }
    char uncommented[65536];
    size_t ulen = 0;
    uncommented[0] = '\0';
    for (const struct uc_cfg_option *o = uc_config_options(); o->name; o++) {
        char active[256], commented[260];
        snprintf(active, sizeof active, "%s %s", o->name, o->dflt[0] ? o->dflt : "\"\"");
        snprintf(commented, sizeof commented, "# %s", active);
        int found = -1, n_found = 0;
        for (int i = 0; i < n_lines; i++) {
            if (strcmp(lines[i], active) == 0 || strcmp(lines[i], commented) == 0) {
                found = i;
                n_found++;
            }
        }
        if (!belongs_in_file(o)) {
            /* never as an active line */
            for (int i = 0; i < n_lines; i++) {
                size_t k = strlen(o->name);
                if (strncmp(lines[i], o->name, k) == 0 && (lines[i][k] == ' ' ||
                                                           lines[i][k] == '\t')) {
                    fail_msg("%s: line %d sets the %s option %s", conf_path, i + 1,
                             o->flags & UC_CFG_CLI_ONLY ? "command-line-only" : "one-shot",
                             o->name);
                }
            }
            continue;
        }
        if (n_found != 1) {
            fail_msg("%s: option %s must appear once as '%s' or '%s' (its default), found %d",
                     conf_path, o->name, active, commented, n_found);
        }
        /* the comment block just above holds the help text (lines joined by spaces) */
        char block[2048] = "";
        size_t bl = 0;
        int start = found;
        while (start > 0 && strncmp(lines[start - 1], "# ", 2) == 0) {
            start--;
        }
        for (int i = start; i < found; i++) {
            bl += (size_t)snprintf(block + bl, sizeof block - bl, "%s%s", bl ? " " : "",
                                   lines[i] + 2);
        }
        if (!strstr(block, o->help)) {
            fail_msg("%s: the comment above '%s' lacks the help text \"%s\"", conf_path,
                     lines[found], o->help);
        }
        ulen += (size_t)snprintf(uncommented + ulen, sizeof uncommented - ulen, "%s\n", active);
    }
    /* as shipped, the file loads and changes nothing */
    struct uc_config def, c;
    assert_int_equal(LOAD(&def, "--fp32=no"), UC_OK);
    uc_status rc = LOAD(&c, "--config", conf_path);
    if (rc != UC_OK) {
        fail_msg("%s does not load: %s", conf_path, msg);
    }
    assert_true(uc_config_hash(&c) == uc_config_hash(&def));
    uc_config_fini(&c);
    /* every documented default, uncommented, is valid and is the default */
    write_tmp(uncommented);
    rc = LOAD(&c, "--config", tmp_conf);
    if (rc != UC_OK) {
        fail_msg("the documented defaults do not load: %s", msg);
    }
    assert_true(uc_config_hash(&c) == uc_config_hash(&def));
    for (const struct uc_cfg_option *o = uc_config_options(); o->name; o++) {
        if (o->offset == offsetof(struct uc_config, config_file)) {
            continue; /* the one option that names the file itself */
        }
        char *x = uc_config_get(&c, o->name), *y = uc_config_get(&def, o->name);
        assert_string_equal(x, y);
        uc_free(x);
        uc_free(y);
    }
    uc_config_fini(&c);
    uc_config_fini(&def);
    unlink(tmp_conf);
    uc_free(text);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Regression: appending nothing from a NULL pointer (an empty chunk of streamed text) passed NULL
 * to memcpy, undefined behaviour that the UBSan build of the daemon stopped on. */
static void test_buf_append_nothing(void **state)
{
    (void)state;
    struct uc_buf b;
    uc_buf_init(&b);
    uc_buf_append(&b, NULL, 0);
    assert_non_null(b.data);
    assert_int_equal(b.len, 0);
    assert_string_equal(b.data, "");
    uc_buf_append(&b, "ab", 2);
    uc_buf_append(&b, NULL, 0);
    assert_string_equal(b.data, "ab");
    uc_buf_fini(&b);
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        conf_path = argv[1];
    }
    snprintf(tmp_conf, sizeof tmp_conf, "/tmp/uc_test_config_%d.conf", (int)getpid());
    tu_log_capture(); /* quiet: refusals are expected */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_buf_append_nothing),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_command_line_forms),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_config_file),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_hash),
        cmocka_unit_test(test_texts),
        cmocka_unit_test(test_example_conf),
        cmocka_unit_test(test_regression_hash_double_precision),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
