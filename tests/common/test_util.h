/* Helpers shared by the tests: where the fixtures are, JSON access, and driving the engine from
 * rank 0 (the other ranks serve). */
#ifndef UC_TESTS_TEST_UTIL_H
#define UC_TESTS_TEST_UTIL_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/status.h"
#include "compress/policy.h"
#include "engine.h"
#include "model_config.h"

/* The shared fixtures folder: argv[1] if given, else $UC_SHARED_DIR, else the build's default.
 * Exits 1 with a message when it does not exist (a missing fixture fails, never skips). */
const char *tu_shared_dir(int argc, char **argv);
/* "<shared>/models/<name>" (static storage, overwritten by the next call). */
const char *tu_model_dir(const char *shared, const char *name);
/* The tokenizer of fixture model `name`; exits 1 with a message if it cannot be loaded. */
struct uc_tokenizer *tu_tokenizer(const char *shared, const char *name);
/* Parses a JSON file; exits 1 with a message if it cannot. */
cJSON *tu_json_load(const char *path);
/* Reads an int array field into a uc_malloc'd buffer. */
int32_t *tu_json_ints(const cJSON *arr, int64_t *n);

/* The backend the golden tests run on: UC_TEST_BACKEND=cuda (default cpu), UC_TEST_FP32=1 for
 * float32 CUDA. */
struct uc_backend_params tu_backend_params(void);

/* Rank 0: adds a sequence and prefills it completely. */
/* The compression stages' golden tests' prompt: id 0 (BOS) then a fixed hash sequence below
 * 4002 (their numpy references read the ids from the dumps). */
void tu_hash_ids(int32_t *ids, int64_t n);
/* A policy spec ("snapkv+think") at a budget with prompt grouping; a TU_CHECK failure for a
 * spec the parser refuses. */
struct uc_compress_params tu_spec(const char *spec, int32_t budget);
uc_status tu_prefill(struct uc_engine *e, int64_t seq_id, const int32_t *ids, int64_t n,
                     int32_t flags, const struct uc_compress_params *cp, int32_t max_new);
/* Rank 0: one decode step of one sequence. */
uc_status tu_decode(struct uc_engine *e, int64_t seq_id, int32_t token);
/* A made-up prompt of n ids: 0 (BOS), then ids in [2, 4002) from the seed. */
void tu_prompt_ids(int32_t *ids, int64_t n, uint64_t seed);
/* Rank 0: ends a sequence. */
uc_status tu_free(struct uc_engine *e, int64_t seq_id);
/* Checks that the pool holds no more blocks than admission reserved for the live ones of n
 * sequences (reserved[i] each) after step `step`. */
void tu_check_reserved(struct uc_engine *e, int step, const bool *live, const int64_t *reserved,
                       int n);
/* Ends the live ones of n sequences (ids[i]) in one step; the pool must then be empty. */
void tu_free_live(struct uc_engine *e, const int64_t *ids, const bool *live, int n);
/* Greedy continuation of a prefilled sequence: n tokens (stops after an EOS id, which is
 * included). Returns how many were written to out. */
int64_t tu_greedy(struct uc_engine *e, int64_t seq_id, int64_t n, int32_t *out);
int32_t tu_argmax(const float *x, int64_t n);
/* FLOPs of prefilling n tokens (the products, causal attention, one LM-head row), the count the
 * benchmarks divide by to report TFLOP/s. */
double tu_prefill_flops(const struct uc_model_config *c, int64_t n);
/* The same when layers from starts[i] on keep rows[i + 1] of the rows (rows[0] = n before the
 * first start): projections and MLP over the rows a layer keeps, causal attention among them. */
double tu_prefill_flops_staged(const struct uc_model_config *c, int64_t n, const int32_t *starts,
                               int32_t n_starts, const int64_t *rows);
/* Median of v (n values, sorted in place); 0 for none. */
double tu_median(double *v, int64_t n);

/* Log capture, for tests that check what was logged: after tu_log_capture() every line goes to
 * tu_log_text (newline-separated, since the last tu_log_reset, cut at the buffer's end) and
 * ERROR and WARN lines are counted. */
#define TU_LOG_BYTES 65536
extern char tu_log_text[TU_LOG_BYTES];
extern int tu_log_errors, tu_log_warns;
void tu_log_capture(void);
void tu_log_reset(void);
/* The python the numpy references run under: $UC_PYTHON, else /usr/bin/python3. */
const char *tu_python(void);
/* Whether that python imports numpy (the reference tests exit 77 when it does not). */
bool tu_have_numpy(void);
/* Runs `python script model_dir QUERY` with the query written to "<tmp>.query.json" (removed
 * after) and parses the JSON the script prints; NULL (with a FAIL line) on any failure. The query
 * is deleted. */
cJSON *tu_run_reference(const char *script, const char *model_dir, cJSON *query,
                        const char *tmp);
/* Removes a folder and everything below it: 0, or -1 with errno. */
int tu_rmtree(const char *dir);

/* A tp = 2 run against tp = 1: with UC_TEST_DUMP the n values are appended to that file (the
 * tp = 1 run), with UC_TEST_COMPARE they are read back from it in the same order and checked
 * within rel of the largest (at least 1) (a TU_CHECK failure otherwise; what names them). */
void tu_check_tp(const float *v, int64_t n, const char *what, double rel);

#define TU_CHECK(cond, ...)                                                                        \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            tu_failures++;                                                                         \
        }                                                                                          \
    } while (0)
extern int tu_failures;

#endif
