/* Golden test of the forward pass against PyTorch/transformers (float32): for every golden prompt
 * of each fixture, the top-5 ids at every position must be identical and the logits within
 * TOL (absolute), the last position's whole logit row within TOL, and the greedy continuation
 * identical token for token. Runs at any tensor-parallel size under mpirun.
 *
 * Backend: UC_TEST_BACKEND=cuda runs it on the CUDA backend (NCCL data plane at tp > 1), in bf16
 * unless UC_TEST_FP32=1. float32 (CPU, or CUDA with UC_TEST_FP32=1) keeps the rules above. bf16
 * uses its own: logit errors within BF16_REL of the row's largest reference logit (at least 1);
 * a top-5 id may differ only where the two logits are within twice that error (the reference
 * does not separate them beyond bf16 precision); the greedy continuation must match until its
 * first divergence, which must be a near tie of our own logits (reported as explained).
 * Equality across tensor-parallel sizes: UC_TEST_DUMP=FILE writes every prompt's logits (run it
 * at tp = 1), UC_TEST_COMPARE=FILE checks them at another tp: every row within 1e-4 of the
 * reference relative to the row's largest magnitude.
 * Usage: test_golden_model SHARED_DIR [MODEL ...] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"

#define TOL 1e-3
/* bf16 mode: relative logit error bound (2^-5: a few bf16 ulps compounded over the layers) */
#define BF16_REL 0.03125

static bool bf16_rules; /* the CUDA backend in bf16 */

/* Top-5 ids may swap where the reference logits tie to 5 decimals; count only real
 * disagreements: a different id whose reference logit differs by more than TIE. */
#define TIE 2e-5

#define TP_REL 1e-4

/* Writes (UC_TEST_DUMP) or compares with (UC_TEST_COMPARE) the logits of every prompt, in order. */
static void tp_reference(const float *lg, int64_t rows, int64_t v, const char *what)
{
    static FILE *dump, *cmp;
    static bool opened;
    static double worst;
    if (!opened) {
        opened = true;
        const char *d = getenv("UC_TEST_DUMP"), *c = getenv("UC_TEST_COMPARE");
        dump = d ? fopen(d, "wb") : NULL;
        cmp = c ? fopen(c, "rb") : NULL;
        TU_CHECK(!d || dump, "cannot write %s", d);
        TU_CHECK(!c || cmp, "cannot read the tp=1 reference %s", c);
    }
    if (dump) {
        fwrite(lg, sizeof(float), (size_t)(rows * v), dump);
        fflush(dump);
    }
    if (!cmp) {
        return;
    }
    float *ref = uc_malloc((size_t)(rows * v) * sizeof(float));
    size_t got = fread(ref, sizeof(float), (size_t)(rows * v), cmp);
    TU_CHECK(got == (size_t)(rows * v), "%s: the reference ends early", what);
    double rel = 0;
    for (int64_t t = 0; got == (size_t)(rows * v) && t < rows; t++) {
        double mag = 1.0, diff = 0.0;
        for (int64_t j = 0; j < v; j++) {
            double a = lg[t * v + j], b = ref[t * v + j];
            mag = fabs(b) > mag ? fabs(b) : mag;
            diff = fabs(a - b) > diff ? fabs(a - b) : diff;
        }
        rel = diff / mag > rel ? diff / mag : rel;
    }
    worst = rel > worst ? rel : worst;
    TU_CHECK(rel <= TP_REL, "%s: logits differ from tp=1 by %.2e relative (> %.0e)", what, rel,
             TP_REL);
    printf("  %s: max relative difference to tp=1: %.2e\n", what, rel);
    uc_free(ref);
}

static void check_prompt(struct uc_engine *e, const cJSON *p, const char *model, double *max_err)
{
    const struct uc_model_config *cfg = uc_engine_config(e);
    int64_t v = cfg->vocab, n;
    const char *name = cJSON_GetObjectItem(p, "name")->valuestring;
    int32_t *ids = tu_json_ints(cJSON_GetObjectItem(p, "ids"), &n);
    uc_status rc = tu_prefill(e, 1, ids, n, UC_SEQ_ALL_LOGITS, NULL, 64);
    TU_CHECK(rc == UC_OK, "%s/%s: prefill failed", model, name);
    int64_t rows;
    const float *lg = uc_engine_seq_logits(e, 1, &rows);
    TU_CHECK(rows == n, "%s/%s: %lld logit rows for %lld tokens", model, name, (long long)rows,
             (long long)n);
    if (lg && rows == n) {
        char what[128];
        snprintf(what, sizeof what, "%s/%s", model, name);
        tp_reference(lg, n, v, what);
    }
    const cJSON *t5i = cJSON_GetObjectItem(p, "top5_ids"), *t5l = cJSON_GetObjectItem(p, "top5_logits");
    int64_t bad_ids = 0, near_ties = 0;
    double err = 0, rel_err = 0;
    for (int64_t t = 0; t < n && lg; t++) {
        const float *row = lg + t * v;
        /* our top 5 */
        int32_t top[5];
        for (int k = 0; k < 5; k++) {
            int32_t best = -1;
            for (int64_t j = 0; j < v; j++) {
                bool used = false;
                for (int q = 0; q < k; q++) {
                    used = used || top[q] == j;
                }
                if (!used && (best < 0 || row[j] > row[best])) {
                    best = (int32_t)j;
                }
            }
            top[k] = best;
        }
        const cJSON *gi = cJSON_GetArrayItem(t5i, (int)t), *gl = cJSON_GetArrayItem(t5l, (int)t);
        double scale = 1.0; /* the row's largest reference logit magnitude (top-5), at least 1 */
        for (int k = 0; k < 5; k++) {
            double gv = fabs(cJSON_GetArrayItem(gl, k)->valuedouble);
            scale = gv > scale ? gv : scale;
        }
        for (int k = 0; k < 5; k++) {
            int32_t gid = (int32_t)cJSON_GetArrayItem(gi, k)->valuedouble;
            double gv = cJSON_GetArrayItem(gl, k)->valuedouble;
            double d = fabs((double)row[gid] - gv);
            err = d > err ? d : err;
            rel_err = d / scale > rel_err ? d / scale : rel_err;
            if (top[k] != gid && bf16_rules) {
                /* allowed where the two are not separated beyond the bf16 error */
                double other = row[top[k]];
                if (fabs(other - gv) > 2.0 * BF16_REL * scale) {
                    bad_ids++;
                    if (bad_ids <= 3) {
                        fprintf(stderr, "  %s/%s pos %lld rank %d: id %d (%.5f) vs golden %d "
                                "(%.5f), beyond bf16 error %.4f\n", model, name, (long long)t, k,
                                top[k], other, gid, gv, 2.0 * BF16_REL * scale);
                    }
                } else {
                    near_ties++;
                }
            } else if (top[k] != gid) {
                /* allowed only for a reference tie */
                double ours_ref = k < 5 ? gv : 0;
                double other = row[top[k]];
                if (fabs(other - ours_ref) > TIE + TOL) {
                    bad_ids++;
                    if (bad_ids <= 3) {
                        fprintf(stderr, "  %s/%s pos %lld rank %d: id %d (%.5f) vs golden %d "
                                "(%.5f)\n", model, name, (long long)t, k, top[k], other, gid, gv);
                    }
                }
            }
        }
    }
    const cJSON *last = cJSON_GetObjectItem(p, "last_logits");
    double last_err = 0, last_scale = 1.0;
    for (int64_t j = 0; j < v && lg; j++) {
        double ref = cJSON_GetArrayItem(last, (int)j)->valuedouble;
        double d = fabs((double)lg[(n - 1) * v + j] - ref);
        last_err = d > last_err ? d : last_err;
        last_scale = fabs(ref) > last_scale ? fabs(ref) : last_scale;
    }
    double last_rel = last_err / last_scale;
    TU_CHECK(bad_ids == 0, "%s/%s: %lld top-5 ids differ", model, name, (long long)bad_ids);
    if (bf16_rules) {
        TU_CHECK(rel_err <= BF16_REL, "%s/%s: top-5 logit error %.2e of the row scale > %.2e",
                 model, name, rel_err, BF16_REL);
        TU_CHECK(last_rel <= BF16_REL, "%s/%s: last-row logit error %.2e of the row scale > %.2e",
                 model, name, last_rel, BF16_REL);
    } else {
        TU_CHECK(err <= TOL, "%s/%s: top-5 logit error %.2e > %.0e", model, name, err, TOL);
        TU_CHECK(last_err <= TOL, "%s/%s: last-row logit error %.2e > %.0e", model, name,
                 last_err, TOL);
    }
    /* greedy continuation, keeping our logits at the first divergence */
    const struct uc_model_config *c = uc_engine_config(e);
    int64_t ng;
    int32_t *want = tu_json_ints(cJSON_GetObjectItem(p, "greedy"), &ng);
    int64_t first_diff = -1, k = 0;
    int32_t got_at = -1;
    double gap = 0, gap_tol = 0;
    for (int64_t i = 0; i < ng; i++) {
        int64_t r;
        const float *row = uc_engine_seq_logits(e, 1, &r);
        if (!row) {
            first_diff = i;
            break;
        }
        row += (r - 1) * v;
        int32_t tok = tu_argmax(row, v);
        k = i + 1;
        if (tok != want[i]) {
            double mx = 1.0;
            for (int64_t j = 0; j < v; j++) {
                mx = fabs(row[j]) > mx ? fabs(row[j]) : mx;
            }
            first_diff = i;
            got_at = tok;
            gap = (double)row[tok] - (double)row[want[i]];
            gap_tol = 2.0 * BF16_REL * mx;
            break;
        }
        if (uc_model_config_is_eos(c, tok) || i + 1 == ng || tu_decode(e, 1, tok) != UC_OK) {
            break;
        }
    }
    if (first_diff < 0 && k < ng) {
        first_diff = k;
    }
    bool explained = bf16_rules && first_diff >= 0 && got_at >= 0 && gap <= gap_tol;
    TU_CHECK(first_diff < 0 || explained,
             "%s/%s: greedy differs at token %lld (got %d, want %d, our logit gap %.4f)", model,
             name, (long long)first_diff, got_at, first_diff >= 0 ? want[first_diff] : -1, gap);
    if (explained) {
        printf("  %s/%s: greedy diverges at token %lld: got %d, want %d; our logits differ by "
               "%.4f <= %.4f (a near tie at bf16 precision): explained\n",
               model, name, (long long)first_diff, got_at, want[first_diff], gap, gap_tol);
    }
    printf("%-12s %-14s tokens=%-5lld top5_logit_err=%.2e (rel %.2e) last_row_err=%.2e (rel "
           "%.2e) near_ties=%lld greedy=%lld/%lld %s\n",
           model, name, (long long)n, err, rel_err, last_err, last_rel, (long long)near_ties,
           (long long)(first_diff < 0 ? ng : first_diff), (long long)ng,
           tu_failures ? "FAIL" : "ok");
    *max_err = err > *max_err ? err : *max_err;
    tu_free(e, 1);
    uc_free(ids);
    uc_free(want);
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 60000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    struct uc_backend_params bp = tu_backend_params();
    enum uc_backend_kind bk = bp.kind;
    bf16_rules = bk == UC_BACKEND_CUDA && !bp.fp32;
    const char *defaults[] = {"stories260K", "uncomp-tiny"};
    int n_models = argc > 2 ? argc - 2 : 2;
    int rank = uc_comm_rank(comm);
    for (int mi = 0; mi < n_models; mi++) {
        const char *model = argc > 2 ? argv[2 + mi] : defaults[mi];
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, model));
        struct uc_engine_params ep = uc_engine_default_params();
        ep.model_dir = dir;
        ep.kv_memory_bytes = 64 << 20;
        ep.backend = bp;
        struct uc_engine *e = NULL;
        if (uc_engine_create(&e, &ep, comm) != UC_OK) {
            fprintf(stderr, "FAIL: cannot load %s\n", dir);
            uc_comm_abort(comm, 1);
        }
        if (rank != 0) {
            uc_engine_serve(e);
            uc_engine_destroy(e);
            continue;
        }
        char gpath[4200];
        snprintf(gpath, sizeof gpath, "%s/golden.json", dir);
        cJSON *g = tu_json_load(gpath);
        double max_err = 0;
        const cJSON *p;
        cJSON_ArrayForEach(p, cJSON_GetObjectItem(g, "prompts"))
        {
            check_prompt(e, p, model, &max_err);
        }
        cJSON_Delete(g);
        uc_engine_shutdown(e);
        uc_engine_destroy(e);
    }
    int failures = tu_failures;
    if (rank == 0) {
        printf("%s: %d failure(s) at tp=%d backend=%s%s\n", failures ? "FAILED" : "PASSED",
               failures, uc_comm_size(comm), uc_backend_kind_name(bk),
               bk == UC_BACKEND_CUDA ? (bp.fp32 ? " (float32)" : " (bf16 rules)") : "");
    }
    uc_comm_destroy(comm);
    return failures ? 1 : 0;
}
