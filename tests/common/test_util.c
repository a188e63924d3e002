/* Test helpers: fixtures, JSON, engine driving. */
#include "test_util.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "tokenizer.h"

int tu_failures;

char tu_log_text[TU_LOG_BYTES];
int tu_log_errors, tu_log_warns;
static size_t tu_log_len;

static void log_sink(enum uc_log_level level, const char *line, void *user)
{
    (void)user;
    tu_log_errors += level == UC_LOG_LEVEL_ERROR;
    tu_log_warns += level == UC_LOG_LEVEL_WARN;
    int n = snprintf(tu_log_text + tu_log_len, sizeof tu_log_text - tu_log_len, "%s\n", line);
    if (n > 0 && (size_t)n < sizeof tu_log_text - tu_log_len) {
        tu_log_len += (size_t)n;
    }
}

void tu_log_capture(void) { uc_log_set_sink(log_sink, NULL); }

void tu_log_reset(void)
{
    tu_log_text[0] = '\0';
    tu_log_len = 0;
    tu_log_errors = 0;
    tu_log_warns = 0;
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

int tu_rmtree(const char *dir) { return nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS); }

const char *tu_shared_dir(int argc, char **argv)
{
    const char *d = argc > 1 ? argv[1] : getenv("UC_SHARED_DIR");
#ifdef UC_SHARED_DIR_DEFAULT
    if (!d) {
        d = UC_SHARED_DIR_DEFAULT;
    }
#endif
    struct stat st;
    if (!d || stat(d, &st) != 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "FAIL: shared fixtures folder %s not found (pass it as argv[1] or set "
                "UC_SHARED_DIR)\n", d ? d : "(unset)");
        exit(1);
    }
    return d;
}

const char *tu_model_dir(const char *shared, const char *name)
{
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/models/%s", shared, name);
    return buf;
}

struct uc_tokenizer *tu_tokenizer(const char *shared, const char *name)
{
    struct uc_tokenizer *tok = NULL;
    if (uc_tokenizer_create(&tok, tu_model_dir(shared, name)) != UC_OK) {
        fprintf(stderr, "FAIL: cannot load the %s tokenizer from %s\n", name, shared);
        exit(1);
    }
    return tok;
}

cJSON *tu_json_load(const char *path)
{
    char *text = NULL;
    if (uc_file_read_all(&text, NULL, path) != UC_OK) {
        fprintf(stderr, "FAIL: cannot read %s\n", path);
        exit(1);
    }
    cJSON *j = cJSON_Parse(text);
    uc_free(text);
    if (!j) {
        fprintf(stderr, "FAIL: %s is not valid JSON\n", path);
        exit(1);
    }
    return j;
}

int32_t *tu_json_ints(const cJSON *arr, int64_t *n)
{
    *n = cJSON_GetArraySize(arr);
    int32_t *v = uc_malloc((size_t)(*n > 0 ? *n : 1) * sizeof(int32_t));
    int64_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr)
    {
        v[i++] = (int32_t)it->valuedouble;
    }
    return v;
}

struct uc_backend_params tu_backend_params(void)
{
    struct uc_backend_params p = uc_backend_default_params();
    const char *b = getenv("UC_TEST_BACKEND");
    if (b && !uc_backend_parse(b, &p.kind)) {
        fprintf(stderr, "FAIL: UC_TEST_BACKEND=%s is not cpu or cuda\n", b);
        exit(1);
    }
    const char *f = getenv("UC_TEST_FP32");
    p.fp32 = f && strcmp(f, "0") != 0;
    return p;
}

uc_status tu_prefill(struct uc_engine *e, int64_t seq_id, const int32_t *ids, int64_t n,
                     int32_t flags, const struct uc_compress_params *cp, int32_t max_new)
{
    struct uc_step_new nw = {.seq_id = seq_id, .flags = flags, .max_new_tokens = max_new,
                             .cp = cp ? *cp : uc_compress_default_params(), .n_prompt = n,
                             .prompt = ids};
    struct uc_step_prefill pf = {.seq_id = seq_id, .budget_rows = 0};
    struct uc_step s = {.op = UC_STEP_RUN, .n_new = 1, .news = &nw, .n_prefill = 1,
                        .prefills = &pf};
    return uc_engine_step(e, &s);
}

uc_status tu_decode(struct uc_engine *e, int64_t seq_id, int32_t token)
{
    struct uc_step_decode d = {.seq_id = seq_id, .token = token};
    struct uc_step s = {.op = UC_STEP_RUN, .n_decode = 1, .decodes = &d};
    return uc_engine_step(e, &s);
}

uc_status tu_free(struct uc_engine *e, int64_t seq_id)
{
    struct uc_step s = {.op = UC_STEP_RUN, .n_free = 1, .frees = &seq_id};
    return uc_engine_step(e, &s);
}

void tu_prompt_ids(int32_t *ids, int64_t n, uint64_t seed)
{
    struct uc_rng rng;
    uc_rng_seed(&rng, seed);
    ids[0] = 0;
    for (int64_t i = 1; i < n; i++) {
        ids[i] = (int32_t)(2 + uc_rng_next(&rng) % 4000);
    }
}

void tu_check_reserved(struct uc_engine *e, int step, const bool *live, const int64_t *reserved,
                       int n)
{
    int64_t held = 0;
    for (int i = 0; i < n; i++) {
        held += live[i] ? reserved[i] : 0;
    }
    TU_CHECK(uc_engine_kv_blocks_used(e) <= held,
             "step %d: %lld blocks in use, admission reserved %lld for the live sequences", step,
             (long long)uc_engine_kv_blocks_used(e), (long long)held);
}

void tu_free_live(struct uc_engine *e, const int64_t *ids, const bool *live, int n)
{
    int64_t *rest = uc_malloc((size_t)(n > 0 ? n : 1) * sizeof *rest);
    int32_t n_rest = 0;
    for (int i = 0; i < n && rest; i++) {
        if (live[i]) {
            rest[n_rest++] = ids[i];
        }
    }
    struct uc_step s = {.op = UC_STEP_RUN, .n_free = n_rest, .frees = rest};
    TU_CHECK(rest && uc_engine_step(e, &s) == UC_OK, "the last frees failed");
    TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "%lld blocks still in use after every free",
             (long long)uc_engine_kv_blocks_used(e));
    uc_free(rest);
}

int32_t tu_argmax(const float *x, int64_t n)
{
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++) {
        if (x[i] > x[b]) {
            b = i;
        }
    }
    return (int32_t)b;
}

int64_t tu_greedy(struct uc_engine *e, int64_t seq_id, int64_t n, int32_t *out)
{
    const struct uc_model_config *cfg = uc_engine_config(e);
    int64_t rows;
    for (int64_t i = 0; i < n; i++) {
        const float *lg = uc_engine_seq_logits(e, seq_id, &rows);
        if (!lg) {
            return i;
        }
        int32_t t = tu_argmax(lg + (rows - 1) * cfg->vocab, cfg->vocab);
        out[i] = t;
        if (uc_model_config_is_eos(cfg, t) || i + 1 == n) {
            return i + 1;
        }
        if (tu_decode(e, seq_id, t) != UC_OK) {
            return i + 1;
        }
    }
    return n;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double tu_median(double *v, int64_t n)
{
    if (n <= 0) {
        return 0;
    }
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* FLOPs of one layer over r rows: projections, MLP, causal attention. */
static double layer_flops(const struct uc_model_config *c, int64_t r)
{
    double per_tok = 2.0 * ((double)c->hidden * (double)(c->n_heads + 2 * c->n_heads_kv) *
                                c->head_dim +
                            (double)c->n_heads * c->head_dim * c->hidden +
                            3.0 * c->hidden * c->ffn);
    double attn = 2.0 * 2.0 * (double)c->n_heads * c->head_dim * ((double)r * (r + 1) / 2.0);
    return per_tok * (double)r + attn;
}

double tu_prefill_flops(const struct uc_model_config *c, int64_t n)
{
    return tu_prefill_flops_staged(c, n, NULL, 0, &n);
}

double tu_prefill_flops_staged(const struct uc_model_config *c, int64_t n, const int32_t *starts,
                               int32_t n_starts, const int64_t *rows)
{
    double f = 2.0 * (double)c->hidden * c->vocab; /* the last row's logits */
    int32_t stage = 0;
    for (int64_t l = 0; l < c->n_layers; l++) {
        while (stage < n_starts && l >= starts[stage]) {
            stage++;
        }
        f += layer_flops(c, stage == 0 ? n : rows[stage]);
    }
    return f;
}

void tu_check_tp(const float *v, int64_t n, const char *what, double rel)
{
    const char *d = getenv("UC_TEST_DUMP"), *c = getenv("UC_TEST_COMPARE");
    static FILE *dump, *cmp;
    if (d && !dump) {
        dump = fopen(d, "wb");
        TU_CHECK(dump, "cannot write %s", d);
    }
    if (c && !cmp) {
        cmp = fopen(c, "rb");
        TU_CHECK(cmp, "cannot read the tp=1 reference %s", c);
    }
    if (dump) {
        fwrite(v, sizeof(float), (size_t)n, dump);
        fflush(dump);
    }
    if (!cmp) {
        return;
    }
    float *ref = uc_malloc((size_t)n * sizeof(float));
    TU_CHECK(ref, "%s: out of memory", what);
    size_t got = ref ? fread(ref, sizeof(float), (size_t)n, cmp) : 0;
    TU_CHECK(got == (size_t)n, "%s: the tp=1 reference ends early", what);
    double mag = 1.0, diff = 0.0;
    for (int64_t j = 0; got == (size_t)n && j < n; j++) {
        mag = fabs(ref[j]) > mag ? fabs(ref[j]) : mag;
        diff = fabs(v[j] - ref[j]) > diff ? fabs(v[j] - ref[j]) : diff;
    }
    TU_CHECK(diff / mag <= rel, "%s: differs from tp=1 by %.2e relative", what, diff / mag);
    printf("%s: max relative difference to tp=1: %.2e\n", what, diff / mag);
    uc_free(ref);
}

void tu_hash_ids(int32_t *ids, int64_t n)
{
    ids[0] = 0;
    for (int64_t i = 1; i < n; i++) {
        ids[i] = (int32_t)(2 + ((uint64_t)i * 2654435761u >> 7) % 4000);
    }
}

struct uc_compress_params tu_spec(const char *spec, int32_t budget)
{
    struct uc_compress_params cp = uc_compress_default_params();
    char msg[256];
    TU_CHECK(uc_policy_spec_parse(spec, &cp, msg, sizeof msg) == UC_OK, "spec %s: %s", spec, msg);
    cp.kv_budget = budget;
    cp.grouping = UC_GROUPING_PROMPT;
    return cp;
}

const char *tu_python(void)
{
    const char *p = getenv("UC_PYTHON");
    return p && p[0] ? p : "/usr/bin/python3";
}

bool tu_have_numpy(void)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s -c 'import numpy' 2>/dev/null", tu_python());
    return system(cmd) == 0;
}

cJSON *tu_run_reference(const char *script, const char *model_dir, cJSON *query,
                        const char *tmp)
{
    char *text = cJSON_Print(query);
    cJSON_Delete(query);
    char qpath[512], cmd[8192];
    snprintf(qpath, sizeof qpath, "%s.query.json", tmp);
    uc_status rc = text ? uc_file_write_all(qpath, text, strlen(text)) : UC_ERR_NOMEM;
    cJSON_free(text);
    if (rc != UC_OK) {
        fprintf(stderr, "FAIL: could not write %s\n", qpath);
        return NULL;
    }
    snprintf(cmd, sizeof cmd, "%s %s %s %s", tu_python(), script, model_dir, qpath);
    FILE *f = popen(cmd, "r");
    struct uc_buf b = {0};
    char chunk[65536];
    size_t n;
    while (f && (n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        uc_buf_append(&b, chunk, n);
    }
    int st = f ? pclose(f) : -1;
    unlink(qpath);
    uc_buf_append(&b, "", 1);
    cJSON *out = st == 0 && b.data ? cJSON_Parse(b.data) : NULL;
    if (!out) {
        fprintf(stderr, "FAIL: the reference failed (%s, status %d)\n", cmd, st);
    }
    uc_buf_fini(&b);
    return out;
}
