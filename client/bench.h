/* The load generator behind `uncompctl bench` (like vLLM's benchmark_serving or ghz), and the
 * small output helpers uncompctl shares with it (JSON strings, exit codes, error lines).
 *
 * A run drives one connection per concurrent worker thread (gRPC through uc_client, or the
 * OpenAI-compatible HTTP front with --http: the same requests as /v1/completions streams):
 * closed loop (`--concurrency N`, each worker sends its next request as soon as the last one
 * finishes) or open loop (`--rate R`, seeded Poisson arrivals, at most N in flight). Prompts come
 * from files or are synthetic token ids; the same seed gives the same prompts and arrivals, so
 * two settings (`--compare A B`: compression, or front=grpc/front=http) see exactly the same
 * load; `--rounds N` alternates them N times and reports medians. Times come from the monotonic
 * clock. */
#ifndef UC_CLIENT_BENCH_H
#define UC_CLIENT_BENCH_H

#include <stdbool.h>
#include <stdio.h>

#include "uncomp_client.h"

#ifdef __cplusplus
extern "C" {
#endif

/* uncompctl's exit codes (documented in `uncompctl --help`). */
enum uc_ctl_exit {
    UC_CTL_EXIT_OK = 0,
    UC_CTL_EXIT_RPC = 1,         /* the server answered with an error */
    UC_CTL_EXIT_USAGE = 2,       /* bad command line */
    UC_CTL_EXIT_UNAVAILABLE = 3, /* cannot connect, or the server is unavailable/not serving */
};

/* What every command gets from the global options. */
struct uc_ctl {
    const char *server;          /* HOST:PORT */
    struct uc_client_opts opts;
    bool json;                   /* --json: one JSON object on stdout */
};

/* Exit code for a failed call: UNAVAILABLE -> 3, anything else -> 1. */
int uc_ctl_exit_code(int grpc_code);

/* Prints "uncompctl: WHAT: CODE_NAME: message" on stderr (and, with json, an {"error": ...}
 * object on stdout), and returns the exit code for it. */
int uc_ctl_fail(const struct uc_ctl *ctl, const char *what, const struct uc_client_error *err);

/* Reports a failed uc_client_connect (as uc_ctl_fail) and returns its exit code: 3 when the
 * server cannot be reached, 2 for a bad address or certificate file. */
int uc_ctl_connect_fail(const struct uc_ctl *ctl, const char *what,
                        const struct uc_client_error *err);

/* Connects with ctl's options; on failure reports it (uc_ctl_connect_fail), stores the exit
 * code and returns NULL. */
struct uc_client *uc_ctl_connect(const struct uc_ctl *ctl, const char *what, int *exit_code);

/* Writes the C string `s` as a JSON string literal (quoted, escaped; invalid UTF-8 bytes become
 * U+FFFD). */
void uc_ctl_json_str(FILE *f, const char *s);
/* The same for the len bytes at s, NUL bytes included (written as \u0000). */
void uc_ctl_json_strn(FILE *f, const char *s, size_t len);
/* The same, appended to a buffer. */
struct uc_buf;
void uc_ctl_json_buf(struct uc_buf *b, const char *s, size_t len);
/* Writes a JSON number with %.6g precision, or null when it is not finite. */
void uc_ctl_json_num(FILE *f, double v);
/* Writes `,"key":` and then the number or the string, as above (a field after the first). */
void uc_ctl_json_field_num(FILE *f, const char *key, double v);
void uc_ctl_json_field_str(FILE *f, const char *key, const char *s);

/* Parses a whole unsigned/signed/double command-line value; false on garbage or overflow. */
bool uc_ctl_parse_u64(const char *s, uint64_t max, uint64_t *out);
bool uc_ctl_parse_double(const char *s, double *out);
/* Parses "a,b,c" (commas or spaces) into a uc_malloc'd array of uint32 (*n entries). */
bool uc_ctl_parse_u32_list(const char *s, uint32_t **out, size_t *n);

/* Runs `uncompctl bench ARGS`: argv[0] is "bench". Returns the exit code. */
int uc_bench_main(const struct uc_ctl *ctl, int argc, char **argv);

#ifdef __cplusplus
}
#endif
#endif
