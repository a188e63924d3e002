/* LoRC (low-rank latent KV heads) in the paged cache: a latent head's rows take fewer bytes and
 * its blocks more tokens (counted from the pool against the latent layout), admission reserves
 * exactly that, composed with a token policy the savings multiply, forks of a latent sequence
 * decode bit-identically to their source, a latent sequence decoded beside a plain one decodes
 * as it does alone, and the ranks fall with depth.
 *
 * Usage: test_lorc SHARED_DIR [MODEL] (default uncomp-tiny, whose fixture profile is loaded from a
 * copy and must exist; another model without one skips the profile check, saying so).
 * Environment:
 *   UC_LORC_REF=FILE   writes the prompt, the sensitivities, the ranks and the logits of 4
 *                      decode steps of plain lorc, for tests/golden/lorc_ref.py
 *   UC_TEST_DUMP=FILE / UC_TEST_COMPARE=FILE  writes / compares (at another tp, within 1e-4
 *                      relative) the sensitivities and the decode logits of lorc and
 *                      snapkv+lorc; at tp > 1 only that part runs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "compress/lorc.h"
#include "compress/profile.h"
#include "engine.h"
#include "test_util.h"

#define PROMPT 200
#define STEPS 4
#define TP_REL 1e-4

static const struct uc_model_config *cfg;

/* Blocks and row bytes the caches of sequence id hold by the latent layout (rank 0: plain). */
static void expected(struct uc_engine *e, int64_t id, const int32_t *rank, int64_t *blocks,
                     int64_t *row_bytes)
{
    const struct uc_plan *plan = uc_engine_seq_plan(e, id);
    int64_t bt = uc_engine_kv_block_tokens(e), d = cfg->head_dim;
    size_t a = uc_engine_kv_bytes_per_token(e) / (size_t)(2 * d);
    int64_t n = uc_engine_seq_len(e, id);
    *blocks = *row_bytes = 0;
    for (int64_t l = 0; l < cfg->n_layers; l++) {
        int64_t w = rank ? uc_kv_latent_width(rank[l], a) : 2 * d;
        int64_t tpb = rank ? uc_kv_latent_tokens(bt, d, w) : bt;
        for (int64_t j = 0; j < cfg->n_heads_kv; j++) {
            int64_t b = plan->budget[l * cfg->n_heads_kv + j];
            int64_t kept = b < n ? b : n;
            *blocks += (kept + tpb - 1) / tpb;
            *row_bytes += kept * w * (int64_t)a;
        }
    }
}

/* A policy with and without +lorc: the pool holds fewer blocks for the latent sequence, by the
 * latent layout's count, admission reserves that, and the report's bytes are the rows'. */
static void check_memory(struct uc_engine *e, const int32_t *ids, const char *base,
                         int32_t budget, float ratio)
{
    char with[64];
    snprintf(with, sizeof with, "%s+lorc", base);
    struct uc_compress_params a = tu_spec(base, budget), b = tu_spec(with, budget);
    b.lorc_ratio = ratio;
    struct uc_step_new pa = {.cp = a, .n_prompt = PROMPT, .prompt = ids};
    struct uc_step_new pb = {.cp = b, .n_prompt = PROMPT, .prompt = ids};
    int64_t need_a = uc_engine_kv_blocks_needed(e, &pa), need_b = uc_engine_kv_blocks_needed(e, &pb);
    int64_t u0 = uc_engine_kv_blocks_used(e);
    TU_CHECK(tu_prefill(e, 1, ids, PROMPT, 0, &a, 0) == UC_OK, "%s: prefill", base);
    int64_t u1 = uc_engine_kv_blocks_used(e);
    TU_CHECK(tu_prefill(e, 2, ids, PROMPT, 0, &b, 0) == UC_OK, "%s: prefill", with);
    int64_t u2 = uc_engine_kv_blocks_used(e);
    struct uc_compress_report ra, rb;
    uc_engine_seq_report(e, 1, &ra);
    uc_engine_seq_report(e, 2, &rb);
    TU_CHECK(rb.lorc_rank != NULL && ra.lorc_rank == NULL, "%s: lorc ranks in the report", with);
    if (!rb.lorc_rank) {
        return;
    }
    int64_t want_a, want_b, bytes_a, bytes_b;
    expected(e, 1, NULL, &want_a, &bytes_a);
    expected(e, 2, rb.lorc_rank, &want_b, &bytes_b);
    printf("%-13s %lld tokens, %5lld blocks, %8lld row bytes\n", base,
           (long long)ra.kv_tokens_held_local, (long long)(u1 - u0),
           (long long)ra.kv_row_bytes_local);
    printf("%-13s %lld tokens, %5lld blocks, %8lld row bytes (ratio %.4g): %.3fx the blocks, "
           "%.3fx the bytes; ranks", with, (long long)rb.kv_tokens_held_local,
           (long long)(u2 - u1), (long long)rb.kv_row_bytes_local, (double)rb.lorc_ratio,
           (double)(u2 - u1) / (double)(u1 - u0),
           (double)rb.kv_row_bytes_local / (double)ra.kv_row_bytes_local);
    for (int64_t l = 0; l < cfg->n_layers; l++) {
        printf(" %d", rb.lorc_rank[l]);
    }
    printf("\n");
    TU_CHECK(ra.kv_tokens_held_local == rb.kv_tokens_held_local,
             "%s: +lorc changed the tokens kept (%lld vs %lld)", base,
             (long long)ra.kv_tokens_held_local, (long long)rb.kv_tokens_held_local);
    TU_CHECK(u1 - u0 == want_a && u2 - u1 == want_b,
             "%s: the pool grew by %lld and %lld blocks, the layouts need %lld and %lld", base,
             (long long)(u1 - u0), (long long)(u2 - u1), (long long)want_a, (long long)want_b);
    TU_CHECK(u2 - u1 < u1 - u0, "%s holds %lld blocks, not fewer than %lld", with,
             (long long)(u2 - u1), (long long)(u1 - u0));
    /* exact where the budgets are known before the prompt (full, snapkv); a bound for uncomp
     * with groups from the prompt (the larger group budget) */
    bool exact = a.policy != UC_POLICY_UNCOMP;
    TU_CHECK(need_b < need_a && need_a >= u1 - u0 && need_b >= u2 - u1 &&
                 (!exact || (need_a == u1 - u0 && need_b == u2 - u1)),
             "%s: admission reserves %lld and %lld blocks, the caches hold %lld and %lld", base,
             (long long)need_a, (long long)need_b, (long long)(u1 - u0), (long long)(u2 - u1));
    TU_CHECK(rb.kv_row_bytes_local == bytes_b && ra.kv_row_bytes_local == bytes_a,
             "%s: row bytes %lld, the layout's %lld", with, (long long)rb.kv_row_bytes_local,
             (long long)bytes_b);
    TU_CHECK(rb.kv_bytes_kept == rb.kv_row_bytes_local, "%s: reported kv_bytes_kept %lld, rows "
             "hold %lld", with, (long long)rb.kv_bytes_kept, (long long)rb.kv_row_bytes_local);
    /* progressive: no layer keeps more than the one before it */
    for (int64_t l = 1; l < cfg->n_layers; l++) {
        TU_CHECK(rb.lorc_rank[l] <= rb.lorc_rank[l - 1], "%s: rank of layer %lld (%d) above "
                 "layer %lld's (%d)", with, (long long)l, rb.lorc_rank[l], (long long)(l - 1),
                 rb.lorc_rank[l - 1]);
    }
    TU_CHECK(rb.lorc_rank[0] > rb.lorc_rank[cfg->n_layers - 1], "%s: ranks do not fall", with);
    tu_free(e, 1);
    tu_free(e, 2);
    TU_CHECK(uc_engine_kv_blocks_used(e) == u0, "%s: blocks not returned", base);
}

/* A fork of a latent sequence shares its full blocks and decodes bit-identically to it; a
 * latent sequence decoded in one batch with a plain one decodes as each does alone. */
static void check_fork_mixed(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = cfg->vocab, rows;
    struct uc_compress_params cp = tu_spec("snapkv+lorc", 48);
    TU_CHECK(tu_prefill(e, 1, ids, PROMPT, 0, &cp, 40) == UC_OK, "fork: prefill");
    struct uc_step_new g = {.seq_id = 2, .flags = UC_SEQ_FORK, .fork_of = 1, .max_new_tokens = 40,
                            .cp = cp};
    struct uc_step s1 = {.op = UC_STEP_RUN, .n_new = 1, .news = &g};
    TU_CHECK(uc_engine_step(e, &s1) == UC_OK, "fork: step");
    float *a = uc_malloc((size_t)v * sizeof(float)), *b = uc_malloc((size_t)v * sizeof(float));
    bool finite = true;
    for (int k = 0; k < 20; k++) {
        int32_t tok = ids[50 + k];
        struct uc_step_decode d[2] = {{1, tok, 0}, {2, tok, 0}};
        struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = d};
        TU_CHECK(uc_engine_step(e, &s2) == UC_OK, "fork: decode");
        memcpy(a, uc_engine_seq_logits(e, 1, &rows), (size_t)v * sizeof(float));
        memcpy(b, uc_engine_seq_logits(e, 2, &rows), (size_t)v * sizeof(float));
        TU_CHECK(memcmp(a, b, (size_t)v * sizeof(float)) == 0, "fork: step %d logits differ", k);
        for (int64_t j = 0; j < v; j++) {
            finite = finite && isfinite(a[j]);
        }
    }
    TU_CHECK(finite, "fork: non-finite logits");
    printf("fork of snapkv+lorc: 20 decode steps bit-identical to the source\n");
    tu_free(e, 1);
    tu_free(e, 2);
    struct uc_compress_params pl = tu_spec("snapkv", 64), lo = tu_spec("uncomp+lorc", 64);
    TU_CHECK(tu_prefill(e, 11, ids, PROMPT, 0, &lo, 8) == UC_OK &&
                 tu_prefill(e, 12, ids, PROMPT, 0, &pl, 8) == UC_OK &&
                 tu_prefill(e, 13, ids, PROMPT, 0, &lo, 8) == UC_OK &&
                 tu_prefill(e, 14, ids, PROMPT, 0, &pl, 8) == UC_OK,
             "mixed: prefill");
    double worst = 0.0;
    for (int k = 0; k < 4; k++) {
        int32_t tok = ids[60 + k];
        struct uc_step_decode both[2] = {{11, tok, 0}, {12, tok, 0}};
        struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = both};
        TU_CHECK(uc_engine_step(e, &s2) == UC_OK && tu_decode(e, 13, tok) == UC_OK &&
                     tu_decode(e, 14, tok) == UC_OK,
                 "mixed: decode");
        for (int i = 0; i < 2; i++) {
            const float *x = uc_engine_seq_logits(e, 11 + i, &rows);
            const float *y = uc_engine_seq_logits(e, 13 + i, &rows);
            double mag = 1.0, diff = 0.0;
            for (int64_t j = 0; x && y && j < v; j++) {
                mag = fabs(y[j]) > mag ? fabs(y[j]) : mag;
                diff = fabs(x[j] - y[j]) > diff ? fabs(x[j] - y[j]) : diff;
            }
            worst = diff / mag > worst ? diff / mag : worst;
        }
    }
    printf("mixed batch (uncomp+lorc beside snapkv): max relative difference to alone %.2e\n",
           worst);
    TU_CHECK(worst <= 1e-5, "mixed: logits differ from each decoded alone by %.2e", worst);
    for (int64_t id = 11; id <= 14; id++) {
        tu_free(e, id);
    }
    uc_free(a);
    uc_free(b);
}

/* The loaded calibration profile holds LoRC's sensitivities (equal to the engine's, agreed over
 * the ranks) and the ranks at the default ratio, and a profile file written from it reads them
 * back. */
static void check_profile(struct uc_engine *e, const int32_t *ids)
{
    const struct uc_profile *p = uc_engine_profile(e);
    const double *lc = uc_engine_lorc_log_cond(e);
    TU_CHECK(p && p->has_lorc && lc, "profile: no lorc record (profile %s)", p ? "loaded" : "none");
    if (!p || !p->has_lorc || !lc) {
        return;
    }
    TU_CHECK(p->lorc_ratio == (double)UC_LORC_DEFAULT_RATIO, "profile: ratio %g", p->lorc_ratio);
    struct uc_compress_params cp = tu_spec("lorc", 64);
    TU_CHECK(tu_prefill(e, 9, ids, 32, 0, &cp, 0) == UC_OK, "profile: prefill");
    struct uc_compress_report r;
    uc_engine_seq_report(e, 9, &r);
    for (int64_t l = 0; l < cfg->n_layers && r.lorc_rank; l++) {
        TU_CHECK(p->lorc_log_cond[l] == lc[l] && p->lorc_rank[l] == r.lorc_rank[l],
                 "profile: layer %lld sensitivity %.17g / %.17g, rank %d / %d", (long long)l,
                 p->lorc_log_cond[l], lc[l], p->lorc_rank[l], r.lorc_rank[l]);
    }
    tu_free(e, 9);
    char path[64];
    snprintf(path, sizeof path, "/tmp/uc_test_lorc_saved_%d.json", (int)getpid());
    struct uc_profile b;
    memset(&b, 0, sizeof b);
    TU_CHECK(uc_profile_save(p, path) == UC_OK &&
                 uc_profile_load(&b, path, cfg->n_layers, cfg->n_heads, cfg->n_heads_kv) == UC_OK,
             "profile: save and load %s", path);
    TU_CHECK(b.has_lorc && memcmp(b.lorc_rank, p->lorc_rank, (size_t)cfg->n_layers * 4) == 0,
             "profile: the file's lorc ranks differ");
    for (int64_t l = 0; b.has_lorc && l < cfg->n_layers; l++) {
        TU_CHECK(fabs(b.lorc_log_cond[l] - lc[l]) <= 1e-9 * (1.0 + fabs(lc[l])),
                 "profile: the file's sensitivity of layer %lld", (long long)l);
    }
    printf("profile: lorc sensitivities and ranks at %.2g recorded, read back from the file\n",
           p->lorc_ratio);
    uc_profile_fini(&b);
    unlink(path);
}

/* Decode logits of STEPS teacher-forced tokens after a prompt; with `ref`, the dump for the
 * numpy reference (prompt, sensitivities, ranks, logits). */
static void decode_logits(struct uc_engine *e, const int32_t *ids, const char *policy,
                          float *out, FILE *ref)
{
    int64_t v = cfg->vocab, rows;
    struct uc_compress_params cp = tu_spec(policy, 64);
    TU_CHECK(tu_prefill(e, 7, ids, PROMPT, 0, &cp, STEPS) == UC_OK, "%s: prefill", policy);
    if (ref) {
        struct uc_compress_report r;
        uc_engine_seq_report(e, 7, &r);
        const double *lc = uc_engine_lorc_log_cond(e);
        fprintf(ref, "prompt %d", PROMPT);
        for (int i = 0; i < PROMPT; i++) {
            fprintf(ref, " %d", ids[i]);
        }
        fprintf(ref, "\nratio %.6f\n", (double)r.lorc_ratio);
        for (int64_t l = 0; l < cfg->n_layers && r.lorc_rank && lc; l++) {
            fprintf(ref, "layer %lld %.12g %d\n", (long long)l, lc[l], r.lorc_rank[l]);
        }
    }
    for (int k = 0; k < STEPS; k++) {
        int32_t tok = ids[20 + k];
        TU_CHECK(tu_decode(e, 7, tok) == UC_OK, "%s: decode", policy);
        memcpy(out + k * v, uc_engine_seq_logits(e, 7, &rows), (size_t)v * sizeof(float));
        if (ref) {
            fprintf(ref, "step %d %d", k, tok);
            for (int64_t j = 0; j < v; j++) {
                fprintf(ref, " %.9g", (double)out[k * v + j]);
            }
            fprintf(ref, "\n");
        }
    }
    tu_free(e, 7);
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 120000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    struct uc_engine_params ep = uc_engine_default_params();
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, argc > 2 ? argv[2] : "uncomp-tiny"));
    ep.model_dir = dir;
    ep.backend = tu_backend_params();
    ep.kv_memory_bytes = 64 << 20;
    /* a copy of the fixture's calibration profile (the engine records LoRC's sensitivities in
     * the profile it loads) */
    char prof[64], *text = NULL;
    size_t text_len = 0;
    snprintf(prof, sizeof prof, "/tmp/uc_test_lorc_profile_%d.json", (int)getpid());
    char src[4200];
    snprintf(src, sizeof src, "%s/uncomp_profile.json", dir);
    bool have_prof = uc_file_read_all(&text, &text_len, src) == UC_OK &&
                     uc_file_write_all(prof, text, text_len) == UC_OK;
    uc_free(text);
    if (!have_prof && argc <= 2) { /* uncomp-tiny's fixture has one: a missing one fails */
        fprintf(stderr, "FAIL: cannot copy the fixture profile %s to %s\n", src, prof);
        return 1;
    }
    ep.profile_path = have_prof ? prof : "/nonexistent/uncomp_profile.json";
    struct uc_engine *e = NULL;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        return 1;
    }
    int rank = uc_comm_rank(comm), tp = uc_comm_size(comm);
    unlink(prof); /* loaded: the copy is not needed any more */
    if (rank != 0) {
        uc_engine_serve(e);
        uc_engine_destroy(e);
        uc_comm_destroy(comm);
        return 0;
    }
    cfg = uc_engine_config(e);
    const double *lc = uc_engine_lorc_log_cond(e);
    TU_CHECK(lc != NULL, "lorc is unavailable on %s", dir);
    int32_t ids[PROMPT];
    tu_hash_ids(ids, PROMPT);
    if (tp == 1 && lc) {
        check_memory(e, ids, "full", 64, 0.0f);
        check_memory(e, ids, "full", 64, 0.25f);
        check_memory(e, ids, "snapkv", 128, 0.0f);
        check_memory(e, ids, "uncomp", 128, 0.125f);
        check_fork_mixed(e, ids);
        if (have_prof) {
            check_profile(e, ids);
        } else {
            printf("profile: %s has no calibration profile, its check not run\n", dir);
        }
        /* bad input is refused with a reason */
        struct uc_compress_params bad = tu_spec("snapkv+lorc", 64);
        bad.decode_mode = UC_DECODE_EVICT;
        char msg[256] = "";
        TU_CHECK(uc_compress_params_validate(&bad, cfg->n_layers, msg, sizeof msg) != UC_OK &&
                     strstr(msg, "lorc"),
                 "evict with lorc accepted (%s)", msg);
        bad = tu_spec("lorc", 64);
        bad.lorc_ratio = 1.5f;
        TU_CHECK(uc_compress_params_validate(&bad, cfg->n_layers, msg, sizeof msg) != UC_OK &&
                     strstr(msg, "lorc_ratio"),
                 "lorc_ratio 1.5 accepted (%s)", msg);
    }
    float *lg = uc_malloc((size_t)(STEPS * cfg->vocab) * sizeof(float));
    float *full = uc_malloc((size_t)(STEPS * cfg->vocab) * sizeof(float));
    float lcf[UC_LORC_MAX_LAYERS];
    for (int64_t l = 0; lc && l < cfg->n_layers; l++) {
        lcf[l] = (float)lc[l];
    }
    tu_check_tp(lcf, cfg->n_layers, "lorc sensitivities", TP_REL);
    const char *rp = getenv("UC_LORC_REF");
    FILE *ref = rp && tp == 1 ? fopen(rp, "w") : NULL;
    TU_CHECK(!rp || tp > 1 || ref, "cannot write %s", rp ? rp : "");
    decode_logits(e, ids, "lorc", lg, ref);
    if (ref) {
        fclose(ref);
    }
    tu_check_tp(lg, STEPS * cfg->vocab, "lorc", TP_REL);
    decode_logits(e, ids, "full", full, NULL);
    TU_CHECK(memcmp(lg, full, (size_t)(STEPS * cfg->vocab) * sizeof(float)) != 0,
             "lorc decodes exactly like full: nothing was compressed");
    decode_logits(e, ids, "snapkv+lorc", lg, NULL);
    tu_check_tp(lg, STEPS * cfg->vocab, "snapkv+lorc", TP_REL);
    uc_free(lg);
    uc_free(full);
    uc_engine_shutdown(e);
    uc_engine_destroy(e);
    printf("%s: %d failure(s) at tp=%d\n", tu_failures ? "FAILED" : "PASSED", tu_failures, tp);
    uc_comm_destroy(comm);
    return tu_failures ? 1 : 0;
}
