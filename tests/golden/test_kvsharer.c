/* KVSharer (compress/kvsharer.h) on the uncomp-tiny fixture against a float32 numpy reference of
 * our own (kvsharer_ref.py): the calibration picks the same layer pairs, with the same cache
 * distances, and records them in the profile file; a prompt shared with them gives the
 * reference's logits at the end of the prefill and over teacher-forced decode steps (batched
 * beside an unshared sequence, which keeps its own logits); and a shared layer holds no KV
 * blocks, alone and under snapkv. Run at tp = 1 and tp = 2 (ranks sum their heads' distances
 * and must reach the same pairs and logits). Exit 77 when numpy is missing.
 * Usage: test_kvsharer SHARED_DIR */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "compress/profile.h"
#include "engine.h"
#include "test_util.h"

#define CALIB 256
#define WINDOW 128
#define PROMPT 100
#define STEPS 3 /* teacher-forced decode steps after the prompt */
#define TOL_CPU 1e-4 /* float32 on both sides: summation order only */
#define TOL_GPU 2e-3

/* Runs the reference on the calibration text and the prompt; NULL on failure. */
static cJSON *run_reference(const char *model_dir, const int32_t *calib, const int32_t *prompt,
                            const char *tmp, const struct uc_kvsharer_params *kp)
{
    cJSON *q = cJSON_CreateObject();
    cJSON_AddItemToObject(q, "calib", cJSON_CreateIntArray(calib, CALIB));
    cJSON_AddNumberToObject(q, "window", WINDOW);
    cJSON_AddNumberToObject(q, "threshold", kp->threshold);
    cJSON_AddNumberToObject(q, "target", uc_kvsharer_target(kp, 8));
    cJSON_AddItemToObject(q, "prompt", cJSON_CreateIntArray(prompt, PROMPT + STEPS));
    cJSON_AddNumberToObject(q, "n_logits", STEPS + 1);
    return tu_run_reference(UC_TEST_SRC_DIR "/kvsharer_ref.py", model_dir, q, tmp);
}

static double max_rel_err(const float *x, const cJSON *ref, int64_t n)
{
    double mx = 0.0, scale = 0.0;
    for (int64_t i = 0; i < n; i++) {
        scale = fmax(scale, fabs(cJSON_GetArrayItem(ref, (int)i)->valuedouble));
    }
    for (int64_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs(x[i] - cJSON_GetArrayItem(ref, (int)i)->valuedouble));
    }
    return mx / (scale > 0 ? scale : 1.0);
}

static double max_rel_err_f(const float *x, const float *y, int64_t n)
{
    double mx = 0.0, scale = 0.0;
    for (int64_t i = 0; i < n; i++) {
        scale = fmax(scale, fabs(y[i]));
        mx = fmax(mx, fabs(x[i] - y[i]));
    }
    return mx / (scale > 0 ? scale : 1.0);
}

/* The calibration's pairs and distances against the reference, and the profile file. */
static void check_calibration(struct uc_engine *e, const int32_t *calib, const cJSON *ref,
                              const char *prof_path, const struct uc_kvsharer_params *kpp)
{
    struct uc_kvsharer_params kp = *kpp;
    struct uc_kvsharer_result res;
    int64_t L = uc_engine_config(e)->n_layers;
    TU_CHECK(uc_engine_kvsharer_calibrate(e, calib, CALIB, WINDOW, &kp, &res) == UC_OK,
             "calibrate");
    const cJSON *rp = cJSON_GetObjectItem(ref, "pairs");
    char got[256] = "", want[256] = "";
    for (int32_t i = 0; i < res.n_pairs; i++) {
        snprintf(got + strlen(got), sizeof got - strlen(got), " %d->%d", res.pairs[i].src,
                 res.pairs[i].dst);
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, rp)
    {
        snprintf(want + strlen(want), sizeof want - strlen(want), " %d->%d",
                 cJSON_GetArrayItem(it, 0)->valueint, cJSON_GetArrayItem(it, 1)->valueint);
    }
    printf("kvsharer pairs:%s (reference:%s), cosine %.6f (reference %.6f), %d tried (%d)\n", got,
           want, res.cosine, cJSON_GetObjectItem(ref, "cosine")->valuedouble, res.n_tried,
           cJSON_GetObjectItem(ref, "tried")->valueint);
    TU_CHECK(strcmp(got, want) == 0 && res.n_pairs > 0, "pairs%s differ from the reference's%s",
             got, want);
    /* the distances the pairs were ranked by: every rank's heads summed */
    const double *dist = uc_engine_kvsharer_distances(e);
    const cJSON *rd = cJSON_GetObjectItem(ref, "dist2");
    double worst = 0.0;
    for (int64_t a = 0; dist && a < L; a++) {
        for (int64_t b = a + 1; b < L; b++) {
            double r = cJSON_GetArrayItem(cJSON_GetArrayItem(rd, (int)a), (int)b)->valuedouble;
            worst = fmax(worst, fabs(dist[a * L + b] - r) / fmax(fabs(r), 1e-30));
        }
    }
    printf("kvsharer distances vs reference: max relative error %.2e\n", worst);
    TU_CHECK(dist && worst < 1e-4, "distances differ from the reference by %.2e", worst);
    TU_CHECK(fabs(res.cosine - cJSON_GetObjectItem(ref, "cosine")->valuedouble) < 1e-4,
             "cosine %.6f vs %.6f", res.cosine, cJSON_GetObjectItem(ref, "cosine")->valuedouble);
    TU_CHECK(res.n_tried == cJSON_GetObjectItem(ref, "tried")->valueint, "tried %d vs %d",
             res.n_tried, cJSON_GetObjectItem(ref, "tried")->valueint);
    /* the profile file holds the pairs, and loads back with them */
    struct uc_profile p;
    const struct uc_model_config *c = uc_engine_config(e);
    TU_CHECK(uc_profile_load(&p, prof_path, L, c->n_heads, c->n_heads_kv) == UC_OK,
             "profile load");
    TU_CHECK(p.has_share && p.n_share == res.n_pairs &&
                 memcmp(p.share, res.pairs, (size_t)res.n_pairs * sizeof *p.share) == 0,
             "profile file: %d pairs, want %d", p.n_share, res.n_pairs);
    uc_profile_fini(&p);
    const struct uc_profile *ep = uc_engine_profile(e);
    TU_CHECK(ep && ep->has_share && ep->n_share == res.n_pairs, "engine profile pairs");
}

/* Reference logits of the shared prompt, at the prefill and each decode step; an unshared
 * sequence decoded in the same steps keeps its own. */
static void check_logits(struct uc_engine *e, const int32_t *prompt, const cJSON *ref)
{
    int64_t v = uc_engine_config(e)->vocab, rows;
    struct uc_compress_params cp = uc_compress_default_params();
    char msg[256];
    TU_CHECK(uc_policy_spec_parse("kvsharer", &cp, msg, sizeof msg) == UC_OK, "%s", msg);
    struct uc_compress_params full = uc_compress_default_params();
    TU_CHECK(tu_prefill(e, 1, prompt, PROMPT, 0, &cp, STEPS) == UC_OK, "prefill kvsharer");
    TU_CHECK(tu_prefill(e, 2, prompt, PROMPT, 0, &full, STEPS) == UC_OK, "prefill full");
    float *alone = uc_malloc((size_t)(STEPS + 1) * (size_t)v * sizeof(float));
    TU_CHECK(tu_prefill(e, 3, prompt, PROMPT, 0, &full, STEPS) == UC_OK, "prefill full alone");
    memcpy(alone, uc_engine_seq_logits(e, 3, &rows), (size_t)v * sizeof(float));
    for (int k = 0; k < STEPS; k++) {
        TU_CHECK(tu_decode(e, 3, prompt[PROMPT + k]) == UC_OK, "decode alone");
        memcpy(alone + (k + 1) * v, uc_engine_seq_logits(e, 3, &rows), (size_t)v * sizeof(float));
    }
    tu_free(e, 3);
    const cJSON *lg = cJSON_GetObjectItem(ref, "logits");
    double worst = 0.0, worst_full = 0.0;
    for (int k = 0; k <= STEPS; k++) {
        if (k > 0) {
            struct uc_step_decode d[2] = {{1, prompt[PROMPT + k - 1], 0},
                                          {2, prompt[PROMPT + k - 1], 0}};
            struct uc_step s = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = d};
            TU_CHECK(uc_engine_step(e, &s) == UC_OK, "decode step %d", k);
        }
        double err = max_rel_err(uc_engine_seq_logits(e, 1, &rows), cJSON_GetArrayItem(lg, k), v);
        worst = fmax(worst, err);
        const float *f = uc_engine_seq_logits(e, 2, &rows);
        worst_full = fmax(worst_full, max_rel_err_f(f, alone + k * v, v));
    }
    printf("kvsharer logits vs reference: max relative error %.2e over the prefill and %d "
           "decode steps; the unshared sequence beside it: max difference %.2e\n", worst, STEPS,
           worst_full);
    double tol = tu_backend_params().kind == UC_BACKEND_CPU ? TOL_CPU : TOL_GPU;
    TU_CHECK(worst < tol, "kvsharer logits differ from the reference by %.2e", worst);
    TU_CHECK(worst_full < 1e-5, "an unshared sequence decoded beside a shared one changed "
             "(%.2e)", worst_full);
    /* the shared model is a different function: its logits are not the full model's */
    double diff = max_rel_err(alone, cJSON_GetArrayItem(lg, 0), v);
    TU_CHECK(diff > 10 * TOL_GPU, "the shared logits equal the unshared ones (%.2e)", diff);
    uc_free(alone);
    tu_free(e, 1);
    tu_free(e, 2);
}

/* A shared layer holds no blocks: the pool grows by the own layers' blocks only, alone and
 * under snapkv, and snapkv+kvsharer whose budget covers the prompt equals kvsharer. */
static void check_memory(struct uc_engine *e, const int32_t *prompt)
{
    const struct uc_model_config *c = uc_engine_config(e);
    int64_t L = c->n_layers, hkv_l = c->n_heads_kv / uc_comm_size(uc_engine_comm(e));
    hkv_l = hkv_l > 0 ? hkv_l : 1;
    int64_t bt = uc_engine_kv_block_tokens(e), v = c->vocab, rows;
    const struct uc_profile *p = uc_engine_profile(e);
    int64_t nsh = p ? p->n_share : 0;
    const char *specs[] = {"full", "kvsharer", "snapkv+kvsharer", "snapkv+kvsharer", "snapkv"};
    int32_t budgets[] = {0, 0, 32, 128, 32};
    float *ks = uc_malloc((size_t)v * sizeof(float));
    for (int i = 0; i < 5; i++) {
        struct uc_compress_params cp = uc_compress_default_params();
        char msg[256];
        TU_CHECK(uc_policy_spec_parse(specs[i], &cp, msg, sizeof msg) == UC_OK, "%s", msg);
        if (budgets[i]) {
            cp.kv_budget = budgets[i];
        }
        int64_t before = uc_engine_kv_blocks_used(e);
        TU_CHECK(tu_prefill(e, 10, prompt, PROMPT, 0, &cp, 0) == UC_OK, "prefill %s", specs[i]);
        struct uc_compress_report r;
        uc_engine_seq_report(e, 10, &r);
        int64_t held = budgets[i] && budgets[i] < PROMPT ? budgets[i] : PROMPT;
        int64_t per_head = (held + bt - 1) / bt;
        int64_t own = uc_policy_kvsharer(&cp) ? L - nsh : L;
        int64_t used = uc_engine_kv_blocks_used(e) - before;
        printf("%-16s budget %3d: %lld blocks held (%lld layers x %lld heads x %lld), KV bytes "
               "kept %lld, %d shared layers\n", specs[i], budgets[i], (long long)used,
               (long long)own, (long long)hkv_l, (long long)per_head, (long long)r.kv_bytes_kept,
               r.n_shared_layers);
        TU_CHECK(used == own * hkv_l * per_head && used == r.kv_blocks_held_local,
                 "%s: %lld blocks held, want %lld (shared layers hold none)", specs[i],
                 (long long)used, (long long)(own * hkv_l * per_head));
        TU_CHECK(r.n_shared_layers == (uc_policy_kvsharer(&cp) ? nsh : 0), "%s: %d shared",
                 specs[i], r.n_shared_layers);
        const float *lg = uc_engine_seq_logits(e, 10, &rows);
        if (i == 1) {
            memcpy(ks, lg, (size_t)v * sizeof(float));
        } else if (i == 3) {
            TU_CHECK(memcmp(ks, lg, (size_t)v * sizeof(float)) == 0,
                     "snapkv+kvsharer with a budget covering the prompt differs from kvsharer");
        }
        tu_free(e, 10);
    }
    uc_free(ks);
    TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "blocks not returned");
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 120000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    if (!tu_have_numpy()) {
        printf("SKIPPED: numpy is missing (%s)\n", tu_python());
        uc_comm_destroy(comm);
        return 77;
    }
    char dir[4096], src[4200], prof[256], *text = NULL;
    snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, "uncomp-tiny"));
    /* every rank loads a copy of the fixture's profile; rank 0 saves the pairs into its own */
    snprintf(src, sizeof src, "%s/uncomp_profile.json", dir);
    snprintf(prof, sizeof prof, "/tmp/uc_test_kvsharer_%d_r%d.json", (int)getpid(),
             uc_comm_rank(comm));
    size_t len = 0;
    if (uc_file_read_all(&text, &len, src) != UC_OK ||
        uc_file_write_all(prof, text, len) != UC_OK) {
        fprintf(stderr, "FAIL: cannot copy %s to %s\n", src, prof);
        return 1;
    }
    uc_free(text);
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
    } else {
        char path[4200];
        snprintf(path, sizeof path, "%s/golden.json", dir);
        cJSON *gold = tu_json_load(path);
        int32_t *ids = NULL;
        int64_t n = 0;
        const cJSON *p;
        cJSON_ArrayForEach(p, cJSON_GetObjectItem(gold, "prompts"))
        {
            int64_t m = 0;
            int32_t *x = tu_json_ints(cJSON_GetObjectItem(p, "ids"), &m);
            if (m > n) {
                uc_free(ids);
                ids = x;
                n = m;
            } else {
                uc_free(x);
            }
        }
        TU_CHECK(n >= 1024, "golden.json: no prompt of 1024 tokens");
        if (n >= 1024) {
            const int32_t *prompt = ids + 600;
            struct uc_kvsharer_params kp = uc_kvsharer_default_params();
            cJSON *ref = run_reference(dir, ids, prompt, prof, &kp);
            TU_CHECK(ref != NULL, "reference");
            if (ref) {
                check_calibration(e, ids, ref, prof, &kp);
                check_logits(e, prompt, ref);
                check_memory(e, prompt);
            }
            cJSON_Delete(ref);
            /* a strict threshold and more layers: candidates are rejected on the way */
            kp.threshold = 0.9;
            kp.target = 3;
            ref = run_reference(dir, ids, prompt, prof, &kp);
            TU_CHECK(ref != NULL, "reference (strict)");
            if (ref) {
                check_calibration(e, ids, ref, prof, &kp);
            }
            cJSON_Delete(ref);
        }
        uc_free(ids);
        cJSON_Delete(gold);
        uc_engine_shutdown(e);
        printf("%s: %d failure(s) at tp=%d\n", tu_failures ? "FAILED" : "PASSED", tu_failures,
               uc_comm_size(comm));
    }
    int failures = tu_failures;
    uc_engine_destroy(e);
    unlink(prof);
    uc_comm_destroy(comm);
    return failures ? 1 : 0;
}
