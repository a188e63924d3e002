/* MiniCache's calibrated merge set on the fixtures (uncomp-tiny, 8 layers, and uncomp-deep, 16):
 * after an entropy calibration on the calibration text, uc_engine_minicache_calibrate measures
 * the mean angular distance between adjacent layers on 4 windows of 256 tokens; the distances
 * must equal a float32 numpy reference's (minicache_calib_ref.py) and the pairs the reference's
 * exhaustive choice; the profile file holds them and loads back, and the same file with other
 * pairs is refused; a minicache sequence merges exactly the calibrated pairs (its report says
 * so) and decodes as minicache_ref.py does with those pairs (and as at tp = 1), an explicit
 * minicache_start still gives the paper's contiguous pairs, and a sequence merged before the
 * calibration forks after it with its own pairs.
 *
 * Usage: test_minicache_calib SHARED_DIR. At tp = 1 without UC_TEST_DUMP the reference runs (exit
 * 77 when numpy is missing); UC_TEST_DUMP=FILE / UC_TEST_COMPARE=FILE write / compare (at
 * another tp) the distances (within 1e-6) and the pairs (exactly) of both models. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "compress/minicache.h"
#include "compress/profile.h"
#include "engine.h"
#include "test_util.h"
#include "tokenizer.h"

#define WINDOW 256
#define WINDOWS 4
#define ENTROPY_WINDOW 512
#define PROMPT 120
#define DIST_TOL_CPU 1e-7 /* float32 K/V on both sides; the profile's 1e-9 grid */
#define DIST_TOL_GPU 2e-3 /* bf16 K/V in the cache */
#define TP_DIST 1e-6
#define TP_LOGITS 1e-4
#define STEPS 4 /* teacher-forced decode steps after the prompt */

/* The reference's distances and pairs for these windows; NULL on failure. */
static cJSON *run_reference(const char *model_dir, const int32_t *win, int32_t n_pairs,
                            const char *tmp)
{
    cJSON *q = cJSON_CreateObject(), *ws = cJSON_AddArrayToObject(q, "windows");
    for (int i = 0; i < WINDOWS; i++) {
        cJSON_AddItemToArray(ws, cJSON_CreateIntArray(win + i * WINDOW, WINDOW));
    }
    cJSON_AddNumberToObject(q, "n_pairs", n_pairs);
    return tu_run_reference(UC_TEST_SRC_DIR "/minicache_calib_ref.py", model_dir, q, tmp);
}

/* The windows as the daemon builds them (sched_calib.c): BOS, then the text's next tokens. */
static int32_t *calib_windows(const char *shared, const char *name, int64_t w, int64_t nw)
{
    struct uc_tokenizer *tok = tu_tokenizer(shared, name);
    char *text = NULL;
    int32_t *ids = NULL, *win = NULL;
    int64_t n = 0;
    int32_t bos = uc_tokenizer_bos(tok);
    int64_t body = w - (bos >= 0 ? 1 : 0);
    if (uc_file_read_all(&text, NULL, UC_TEST_CALIB_TEXT) != UC_OK ||
        uc_tokenizer_encode(tok, text, strlen(text), false, &ids, &n) != UC_OK ||
        n < body * nw) {
        fprintf(stderr, "FAIL: %s: %lld tokens, the windows need %lld\n", UC_TEST_CALIB_TEXT,
                (long long)n, (long long)(body * nw));
        exit(1);
    }
    win = uc_malloc((size_t)(w * nw) * sizeof(int32_t));
    for (int64_t i = 0; win && i < nw; i++) {
        int32_t *x = win + i * w;
        if (bos >= 0) {
            *x++ = bos;
        }
        memcpy(x, ids + i * body, (size_t)body * sizeof(int32_t));
    }
    uc_free(text);
    uc_free(ids);
    uc_tokenizer_destroy(tok);
    return win;
}

/* The entropy profile from two windows, as the daemon's calibration job makes it. */
static void entropy_calibration(struct uc_engine *e, const int32_t *win)
{
    struct uc_step reset = {.op = UC_STEP_PROFILE_RESET};
    TU_CHECK(uc_engine_step(e, &reset) == UC_OK, "profile reset");
    for (int i = 0; i < 2; i++) {
        TU_CHECK(tu_prefill(e, 50 + i, win + i * ENTROPY_WINDOW, ENTROPY_WINDOW,
                            UC_SEQ_CALIBRATE, NULL, 0) == UC_OK, "entropy window %d", i);
        while (uc_engine_seq_phase(e, 50 + i) == UC_SEQ_PREFILLING) {
            struct uc_step_prefill pf = {.seq_id = 50 + i, .budget_rows = 0};
            struct uc_step st = {.op = UC_STEP_RUN, .n_prefill = 1, .prefills = &pf};
            TU_CHECK(uc_engine_step(e, &st) == UC_OK, "entropy window %d", i);
        }
        tu_free(e, 50 + i);
    }
    struct uc_step fin = {.op = UC_STEP_PROFILE_FINISH, .profile_groups = 2, .profile_eps = 1.0};
    snprintf(fin.profile_source, sizeof fin.profile_source, "calibration.txt");
    TU_CHECK(uc_engine_step(e, &fin) == UC_OK, "profile finish");
    const struct uc_profile *p = uc_engine_profile(e);
    TU_CHECK(p && !p->has_minicache, "a fresh entropy profile has no minicache pairs");
}

static void pairs_text(char *buf, size_t size, const int16_t *first, int64_t n)
{
    buf[0] = '\0';
    for (int64_t i = 0; i < n; i++) {
        snprintf(buf + strlen(buf), size - strlen(buf), " %d-%d", first[i], first[i] + 1);
    }
}

/* The engine's calibration against the reference (when it runs) and the other tp. */
static void check_calibration(struct uc_engine *e, const char *name, const int32_t *win,
                              const cJSON *ref)
{
    int64_t L = uc_engine_config(e)->n_layers;
    int32_t np = uc_minicache_default_pairs(L);
    double t0 = uc_time_s();
    TU_CHECK(uc_engine_minicache_calibrate(e, win, WINDOWS * WINDOW, WINDOW, 0) == UC_OK,
             "%s: calibrate", name);
    double secs = uc_time_s() - t0;
    const struct uc_profile *p = uc_engine_profile(e);
    if (!p || !p->has_minicache) {
        TU_CHECK(false, "%s: the profile has no minicache pairs", name);
        return;
    }
    char got[256], want[256] = "";
    pairs_text(got, sizeof got, p->mc_first, p->mc_n_pairs);
    printf("%s: minicache calibration in %.2f s over %lld tokens, pairs%s; distances", name, secs,
           (long long)p->mc_tokens, got);
    for (int64_t l = 0; l + 1 < L; l++) {
        printf(" %.4f", p->mc_dist[l]);
    }
    printf("\n");
    TU_CHECK(p->mc_n_pairs == np && p->mc_tokens == WINDOWS * WINDOW,
             "%s: %d pairs over %lld tokens, want %d over %d", name, p->mc_n_pairs,
             (long long)p->mc_tokens, np, WINDOWS * WINDOW);
    if (ref) {
        const cJSON *rd = cJSON_GetObjectItem(ref, "distances");
        double worst = cJSON_GetArraySize(rd) == L - 1 ? 0.0 : INFINITY;
        for (int64_t l = 0; l + 1 < L && isfinite(worst); l++) {
            worst = fmax(worst, fabs(p->mc_dist[l] -
                                     cJSON_GetArrayItem(rd, (int)l)->valuedouble));
        }
        int16_t rp[UC_MINICACHE_MAX_PAIRS];
        int64_t nr = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(ref, "pairs"))
        {
            if (nr < UC_MINICACHE_MAX_PAIRS) {
                rp[nr++] = (int16_t)it->valueint;
            }
        }
        pairs_text(want, sizeof want, rp, nr);
        const cJSON *mg = cJSON_GetObjectItem(ref, "margin");
        printf("%s: distances vs the reference: max |difference| %.2e; reference pairs%s "
               "(the next best set sums %.4f more)\n", name, worst, want,
               cJSON_IsNumber(mg) ? mg->valuedouble : NAN);
        double tol = tu_backend_params().kind == UC_BACKEND_CPU ? DIST_TOL_CPU : DIST_TOL_GPU;
        TU_CHECK(worst <= tol, "%s: distances differ from the reference by %.2e", name, worst);
        /* the pairs must agree unless the distances' error could reorder the best two sets */
        bool decided = !cJSON_IsNumber(mg) || mg->valuedouble > 2.0 * np * tol;
        TU_CHECK(!decided || strcmp(got, want) == 0, "%s: pairs%s, the reference's%s", name, got,
                 want);
    }
    float v[1024 + UC_MINICACHE_MAX_PAIRS];
    for (int64_t l = 0; l + 1 < L && l < 1024; l++) {
        v[l] = (float)p->mc_dist[l];
    }
    tu_check_tp(v, L - 1, "minicache distances", TP_DIST);
    for (int32_t i = 0; i < p->mc_n_pairs; i++) {
        v[i] = (float)p->mc_first[i];
    }
    tu_check_tp(v, p->mc_n_pairs, "minicache pairs", 0.0);
}

/* The file holds what the engine holds, and the same file with other pairs is refused. */
static void check_profile_file(struct uc_engine *e, const char *path)
{
    const struct uc_model_config *c = uc_engine_config(e);
    const struct uc_profile *ep = uc_engine_profile(e);
    int64_t L = c->n_layers;
    struct uc_profile p;
    memset(&p, 0, sizeof p);
    TU_CHECK(uc_profile_load(&p, path, L, c->n_heads, c->n_heads_kv) == UC_OK, "profile load");
    TU_CHECK(p.has_minicache && ep && p.mc_n_pairs == ep->mc_n_pairs &&
                 memcmp(p.mc_first, ep->mc_first, (size_t)p.mc_n_pairs * sizeof *p.mc_first) ==
                     0 &&
                 memcmp(p.mc_dist, ep->mc_dist, (size_t)(L - 1) * sizeof(double)) == 0,
             "the profile file's minicache object differs from the engine's");
    uc_profile_fini(&p);
    char *text = NULL;
    TU_CHECK(uc_file_read_all(&text, NULL, path) == UC_OK, "read %s", path);
    cJSON *root = cJSON_Parse(text);
    cJSON *pairs = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "minicache"), "pairs");
    cJSON *last = cJSON_GetArrayItem(pairs, cJSON_GetArraySize(pairs) - 1);
    if (last) {
        /* the deepest pair moved one layer down (still disjoint and adjacent: the distances do
         * not give it) */
        int a = cJSON_GetArrayItem(last, 0)->valueint;
        int b = a == L - 2 ? a - 1 : a + 1;
        cJSON_ReplaceItemInArray(last, 0, cJSON_CreateNumber(b));
        cJSON_ReplaceItemInArray(last, 1, cJSON_CreateNumber(b + 1));
    }
    char *edited = cJSON_Print(root);
    memset(&p, 0, sizeof p);
    tu_log_reset();
    TU_CHECK(edited && uc_profile_parse(&p, edited, "edited.json", L, c->n_heads,
                                        c->n_heads_kv) == UC_ERR_FORMAT &&
                 strstr(tu_log_text, "but its distances give"),
             "a profile whose pairs the distances do not give loaded");
    cJSON_free(edited);
    cJSON_Delete(root);
    uc_free(text);
}

/* The kept and merged sets and the decode logits of sequence 7 in tests/golden/minicache_ref.py's
 * dump format, with the calibrated pairs. */
static void dump_sets(FILE *f, struct uc_engine *e, const int32_t *ids,
                      const struct uc_compress_params *cp, const struct uc_compress_report *r)
{
    const struct uc_model_config *c = uc_engine_config(e);
    fprintf(f, "policy minicache\nprompt %d", PROMPT);
    for (int i = 0; i < PROMPT; i++) {
        fprintf(f, " %d", ids[i]);
    }
    fprintf(f, "\nparams t %.9g gamma %.9g start %d\npairs", (double)uc_policy_minicache_t(cp),
            (double)uc_policy_minicache_gamma(cp), r->minicache_start);
    for (int32_t i = 0; i < r->minicache_pairs; i++) {
        fprintf(f, " %d", r->minicache_first[i]);
    }
    fprintf(f, "\n");
    for (int64_t l = 0; l < c->n_layers; l++) {
        for (int64_t j = 0; j < c->n_heads_kv; j++) {
            int64_t n, nm;
            const int32_t *k = uc_engine_seq_kept(e, 7, l, j, &n);
            const int32_t *mg = uc_engine_seq_merged(e, 7, l, j, &nm);
            fprintf(f, "kept %lld %lld", (long long)l, (long long)j);
            for (int64_t i = 0; i < n; i++) {
                fprintf(f, " %d", k[i]);
            }
            fprintf(f, "\nmerged %lld %lld", (long long)l, (long long)j);
            for (int64_t i = 0; i < nm; i++) {
                fprintf(f, " %d", mg[i]);
            }
            fprintf(f, "\n");
        }
    }
}

/* A minicache sequence merges the calibrated pairs and decodes as the numpy reference does with
 * them (dump: its file for minicache_ref.py --dump, at tp = 1) and as at tp = 1;
 * minicache_start gives the paper's pairs. */
static void check_sequences(struct uc_engine *e, const int32_t *ids, const char *dump,
                            const char *model_dir)
{
    const struct uc_profile *p = uc_engine_profile(e);
    int64_t L = uc_engine_config(e)->n_layers, v = uc_engine_config(e)->vocab, rows;
    struct uc_compress_params cp = tu_spec("minicache", 64);
    TU_CHECK(tu_prefill(e, 7, ids, PROMPT, UC_SEQ_RECORD_KEPT, &cp, STEPS) == UC_OK, "prefill");
    struct uc_compress_report r;
    uc_engine_seq_report(e, 7, &r);
    TU_CHECK(p && r.minicache_pairs == p->mc_n_pairs && r.minicache_start == p->mc_first[0] &&
                 memcmp(r.minicache_first, p->mc_first,
                        (size_t)p->mc_n_pairs * sizeof *p->mc_first) == 0,
             "report: %d pairs from %d, the profile's %d from %d", r.minicache_pairs,
             r.minicache_start, p ? p->mc_n_pairs : -1, p ? p->mc_first[0] : -1);
    /* KV head 0 (on rank 0 at any tp): merged tokens in the pairs' layers only */
    int64_t bad = 0;
    for (int64_t l = 0; p && l < L; l++) {
        bool paired = false;
        for (int32_t i = 0; i < p->mc_n_pairs; i++) {
            paired = paired || l == p->mc_first[i] || l == p->mc_first[i] + 1;
        }
        int64_t nm = 0;
        uc_engine_seq_merged(e, 7, l, 0, &nm);
        bad += paired != (nm > 0);
    }
    TU_CHECK(bad == 0 && r.minicache_merged > 0, "%lld layers merged outside the calibrated "
             "pairs (or pairs unmerged); %lld merged", (long long)bad,
             (long long)r.minicache_merged);
    FILE *f = dump ? fopen(dump, "w") : NULL;
    TU_CHECK(!dump || f, "cannot write %s", dump ? dump : "");
    if (f) {
        dump_sets(f, e, ids, &cp, &r);
    }
    float *lg = uc_malloc((size_t)(STEPS * v) * sizeof(float));
    for (int k = 0; lg && k < STEPS; k++) {
        TU_CHECK(tu_decode(e, 7, ids[20 + k]) == UC_OK, "decode");
        memcpy(lg + k * v, uc_engine_seq_logits(e, 7, &rows), (size_t)v * sizeof(float));
        if (f) {
            fprintf(f, "step %d %d", k, ids[20 + k]);
            for (int64_t j = 0; j < v; j++) {
                fprintf(f, " %.9g", (double)lg[k * v + j]);
            }
            fprintf(f, "\n");
        }
    }
    if (lg) {
        tu_check_tp(lg, STEPS * v, "decode logits with the calibrated pairs", TP_LOGITS);
    }
    uc_free(lg);
    tu_free(e, 7);
    if (f) {
        fclose(f);
        char cmd[8192];
        snprintf(cmd, sizeof cmd, "%s %s/minicache_ref.py --dump %s %s", tu_python(),
                 UC_TEST_SRC_DIR, dump, model_dir);
        fflush(stdout);
        TU_CHECK(system(cmd) == 0, "the merged sets or decode logits differ from "
                 "minicache_ref.py's with the calibrated pairs (%s)", cmd);
        unlink(dump);
    }
    cp.minicache_start = 2;
    TU_CHECK(tu_prefill(e, 8, ids, PROMPT, 0, &cp, 0) == UC_OK, "prefill with a start");
    uc_engine_seq_report(e, 8, &r);
    int32_t want = (int32_t)((L - 2) / 2);
    bool contiguous = r.minicache_pairs == want && r.minicache_start == 2;
    for (int32_t i = 0; contiguous && i < want; i++) {
        contiguous = r.minicache_first[i] == 2 + 2 * i;
    }
    TU_CHECK(contiguous, "minicache_start=2: %d pairs from %d, want %d contiguous from 2",
             r.minicache_pairs, r.minicache_start, want);
    tu_free(e, 8);
    TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "blocks not returned");
}

/* A fork keeps its source's pairs when the profile's changed in between: a sequence merged with
 * the paper's pairs before the calibration forks after it and decodes bit-identically. */
static void check_fork_across_calibration(struct uc_engine *e, int64_t src, const int32_t *ids)
{
    int64_t v = uc_engine_config(e)->vocab, rows;
    struct uc_step_new g = {.seq_id = src + 1, .flags = UC_SEQ_FORK, .fork_of = src,
                            .max_new_tokens = 4, .cp = tu_spec("minicache", 64)};
    struct uc_step s1 = {.op = UC_STEP_RUN, .n_new = 1, .news = &g};
    TU_CHECK(uc_engine_step(e, &s1) == UC_OK, "fork after the calibration");
    struct uc_compress_report ra, rb;
    uc_engine_seq_report(e, src, &ra);
    uc_engine_seq_report(e, src + 1, &rb);
    TU_CHECK(ra.minicache_pairs == rb.minicache_pairs &&
                 memcmp(ra.minicache_first, rb.minicache_first, sizeof ra.minicache_first) == 0,
             "the fork merges %d pairs from %d, its source %d from %d", rb.minicache_pairs,
             rb.minicache_start, ra.minicache_pairs, ra.minicache_start);
    float *a = uc_malloc((size_t)v * sizeof(float));
    int same = 1;
    for (int k = 0; a && k < 4; k++) {
        struct uc_step_decode d[2] = {{src, ids[10 + k], 0}, {src + 1, ids[10 + k], 0}};
        struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = d};
        TU_CHECK(uc_engine_step(e, &s2) == UC_OK, "decode the fork");
        memcpy(a, uc_engine_seq_logits(e, src, &rows), (size_t)v * sizeof(float));
        same = same && memcmp(a, uc_engine_seq_logits(e, src + 1, &rows),
                              (size_t)v * sizeof(float)) == 0;
    }
    TU_CHECK(same, "the fork's logits differ from its source's");
    uc_free(a);
    tu_free(e, src);
    tu_free(e, src + 1);
}

static void run_model(const char *shared, const char *name, struct uc_comm *comm, bool reference)
{
    char dir[4096], prof[256];
    snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, name));
    snprintf(prof, sizeof prof, "/tmp/uc_test_mccal_%d_%s_r%d.json", (int)getpid(), name,
             uc_comm_rank(comm));
    unlink(prof);
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = dir;
    ep.kv_memory_bytes = 64 << 20;
    ep.profile_path = prof;
    ep.backend = tu_backend_params();
    struct uc_engine *e = NULL;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        uc_comm_abort(comm, 1);
    }
    if (uc_comm_rank(comm) != 0) {
        uc_engine_serve(e);
        uc_engine_destroy(e);
        unlink(prof);
        return;
    }
    int32_t *ew = calib_windows(shared, name, ENTROPY_WINDOW, 2);
    int32_t *win = calib_windows(shared, name, WINDOW, WINDOWS);
    TU_CHECK(uc_engine_minicache_calibrate(e, win, WINDOWS * WINDOW, WINDOW, 0) ==
                 UC_ERR_UNAVAILABLE, "%s: calibrated without a profile to record it in", name);
    entropy_calibration(e, ew);
    int64_t L = uc_engine_config(e)->n_layers;
    TU_CHECK(uc_engine_minicache_calibrate(e, win, WINDOWS * WINDOW, WINDOW,
                                           (int32_t)(L / 2 + 1)) == UC_ERR_INVALID_ARG,
             "%s: %lld pairs of %lld layers accepted", name, (long long)(L / 2 + 1),
             (long long)L);
    /* merged with the paper's pairs (the profile has none yet), forked after the calibration */
    int32_t ids[PROMPT];
    tu_hash_ids(ids, PROMPT);
    struct uc_compress_params mc = tu_spec("minicache", 64);
    TU_CHECK(tu_prefill(e, 20, ids, PROMPT, 0, &mc, 8) == UC_OK, "%s: prefill before", name);
    cJSON *ref = NULL;
    if (reference) {
        ref = run_reference(dir, win, uc_minicache_default_pairs(L), prof);
        TU_CHECK(ref != NULL, "%s: reference", name);
    }
    check_calibration(e, name, win, ref);
    check_profile_file(e, prof);
    check_fork_across_calibration(e, 20, ids);
    char dump[300];
    snprintf(dump, sizeof dump, "%s.dump", prof);
    check_sequences(e, ids, reference ? dump : NULL, dir);
    cJSON_Delete(ref);
    uc_free(ew);
    uc_free(win);
    uc_engine_shutdown(e);
    uc_engine_destroy(e);
    unlink(prof);
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 120000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    int tp = uc_comm_size(comm);
    bool reference = tp == 1 && !getenv("UC_TEST_DUMP") && !getenv("UC_TEST_COMPARE");
    if (reference && !tu_have_numpy()) {
        printf("SKIPPED: numpy is missing (%s)\n", tu_python());
        uc_comm_destroy(comm);
        return 77;
    }
    tu_log_capture();
    /* UC_TEST_ONLY_MODEL names one of the two (the device carries uncomp-tiny only) */
    const char *only = getenv("UC_TEST_ONLY_MODEL");
    const char *models[2] = {"uncomp-tiny", "uncomp-deep"};
    for (int i = 0; i < 2; i++) {
        if (!only || strcmp(only, models[i]) == 0) {
            run_model(shared, models[i], comm, reference);
        }
    }
    int failures = tu_failures;
    if (uc_comm_rank(comm) == 0) {
        printf("%s: %d failure(s) at tp=%d\n", failures ? "FAILED" : "PASSED", failures, tp);
    }
    uc_comm_destroy(comm);
    return failures ? 1 : 0;
}
