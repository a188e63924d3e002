/* MiniCache (cross-layer KV merging) in the paged cache: a merged pair's common tokens are held
 * once, as merged rows, so the pool holds fewer blocks (counted from the pool against the
 * layout's count); the report says how many were merged; forks share merged blocks and decode
 * bit-identically; a batch mixing merged, packed and plain sequences decodes each as alone; with
 * every common token retained the logits equal full's bit for bit; bad combinations are refused.
 *
 * Usage: test_minicache SHARED_DIR. Environment:
 *   UC_MINICACHE_REF=FILE  writes, for "minicache" and "snapkv+minicache", the prompt, the
 *                          parameters, each (layer, KV head)'s kept and merged positions and the
 *                          logits of 4 decode steps, for tests/golden/minicache_ref.py
 *   UC_TEST_DUMP=FILE / UC_TEST_COMPARE=FILE  writes / compares (at another tp, within 1e-4
 *                          relative) the decode logits and merge counts of both; at tp > 1
 *                          only that part runs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "compress/minicache.h"
#include "engine.h"
#include "test_util.h"

#define PROMPT 200
#define STEPS 4
#define TP_REL 1e-4

static const struct uc_model_config *cfg;

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* full against full+minicache: every token is common to both layers of a pair, so each pair's
 * KV head holds round_half_up(0.05 n) retained tokens in each layer and the rest merged; the
 * pool grows by exactly that layout's blocks. */
static void check_memory_full(struct uc_engine *e, const int32_t *ids)
{
    struct uc_compress_params a = tu_spec("full", 64), b = tu_spec("minicache", 64);
    int64_t L = cfg->n_layers, hkv = cfg->n_heads_kv, d = cfg->head_dim;
    int64_t bt = uc_engine_kv_block_tokens(e), mtpb = uc_kv_merged_tokens(bt, d);
    int64_t start = uc_minicache_start(0, L), pairs = (L - start) / 2;
    int64_t ret = uc_round_half_up(UC_MINICACHE_DEFAULT_GAMMA * PROMPT), merged = PROMPT - ret;
    struct uc_step_new pb = {.cp = b, .n_prompt = PROMPT, .prompt = ids};
    int64_t need_b = uc_engine_kv_blocks_needed(e, &pb);
    int64_t u0 = uc_engine_kv_blocks_used(e);
    TU_CHECK(tu_prefill(e, 1, ids, PROMPT, 0, &a, 0) == UC_OK, "full: prefill");
    int64_t u1 = uc_engine_kv_blocks_used(e);
    TU_CHECK(tu_prefill(e, 2, ids, PROMPT, 0, &b, 0) == UC_OK, "minicache: prefill");
    int64_t u2 = uc_engine_kv_blocks_used(e);
    struct uc_compress_report ra, rb;
    uc_engine_seq_report(e, 1, &ra);
    uc_engine_seq_report(e, 2, &rb);
    int64_t want_a = L * hkv * ceil_div(PROMPT, bt);
    int64_t want_b = (L - 2 * pairs) * hkv * ceil_div(PROMPT, bt) +
                     pairs * hkv * (2 * ceil_div(ret, bt) + ceil_div(merged, mtpb));
    printf("full           %lld blocks, %lld row bytes\n", (long long)(u1 - u0),
           (long long)ra.kv_row_bytes_local);
    printf("full+minicache %lld blocks, %lld row bytes (%d pairs from layer %d, %lld merged, "
           "%lld retained): %.3fx the blocks, %.3fx the bytes\n", (long long)(u2 - u1),
           (long long)rb.kv_row_bytes_local, rb.minicache_pairs, rb.minicache_start,
           (long long)rb.minicache_merged, (long long)rb.minicache_retained,
           (double)(u2 - u1) / (double)(u1 - u0),
           (double)rb.kv_row_bytes_local / (double)ra.kv_row_bytes_local);
    TU_CHECK(u1 - u0 == want_a && u2 - u1 == want_b,
             "the pool grew by %lld and %lld blocks, the layouts need %lld and %lld",
             (long long)(u1 - u0), (long long)(u2 - u1), (long long)want_a, (long long)want_b);
    TU_CHECK(rb.minicache_pairs == pairs && rb.minicache_start == start &&
                 rb.minicache_merged == pairs * hkv * merged &&
                 rb.minicache_retained == pairs * hkv * ret && ra.minicache_pairs == 0,
             "report: %d pairs from %d, %lld merged, %lld retained", rb.minicache_pairs,
             rb.minicache_start, (long long)rb.minicache_merged, (long long)rb.minicache_retained);
    TU_CHECK(rb.kv_blocks_held_local == u2 - u1, "report holds %lld blocks, the pool %lld",
             (long long)rb.kv_blocks_held_local, (long long)(u2 - u1));
    int64_t first = -1;
    TU_CHECK(uc_engine_diagnose_nonfinite(e, 2, &first) == UC_OK && first == L,
             "the non-finite diagnosis of merged rows says layer %lld", (long long)first);
    int64_t asz = (int64_t)uc_engine_kv_bytes_per_token(e) / (2 * d);
    int64_t rows = (L * hkv * PROMPT - 2 * pairs * hkv * merged) * 2 * d +
                   pairs * hkv * merged * (2 * d + UC_KV_MERGED_EXTRA);
    TU_CHECK(rb.kv_row_bytes_local == rows * asz && rb.kv_bytes_kept == rb.kv_row_bytes_local,
             "row bytes %lld, reported kept %lld, want %lld", (long long)rb.kv_row_bytes_local,
             (long long)rb.kv_bytes_kept, (long long)(rows * asz));
    TU_CHECK(need_b >= u2 - u1, "admission reserves %lld blocks, the cache holds %lld",
             (long long)need_b, (long long)(u2 - u1));
    tu_free(e, 1);
    tu_free(e, 2);
    TU_CHECK(uc_engine_kv_blocks_used(e) == u0, "blocks not returned");
}

/* A token policy with and without +minicache: the same tokens selected, fewer blocks; merged
 * tokens are only those both layers of a pair keep. */
static void check_memory_policy(struct uc_engine *e, const int32_t *ids, const char *base,
                                int32_t budget)
{
    char with[64];
    snprintf(with, sizeof with, "%s+minicache", base);
    struct uc_compress_params a = tu_spec(base, budget), b = tu_spec(with, budget);
    struct uc_step_new pb = {.cp = b, .n_prompt = PROMPT, .prompt = ids};
    int64_t need_b = uc_engine_kv_blocks_needed(e, &pb);
    int64_t u0 = uc_engine_kv_blocks_used(e);
    TU_CHECK(tu_prefill(e, 1, ids, PROMPT, UC_SEQ_RECORD_KEPT, &a, 0) == UC_OK, "%s", base);
    int64_t u1 = uc_engine_kv_blocks_used(e);
    TU_CHECK(tu_prefill(e, 2, ids, PROMPT, UC_SEQ_RECORD_KEPT, &b, 0) == UC_OK, "%s", with);
    int64_t u2 = uc_engine_kv_blocks_used(e);
    struct uc_compress_report ra, rb;
    uc_engine_seq_report(e, 1, &ra);
    uc_engine_seq_report(e, 2, &rb);
    /* every kept set of the plain policy = the merged policy's own plus merged tokens */
    int64_t common = 0, bad = 0;
    for (int64_t l = 0; l < cfg->n_layers; l++) {
        for (int64_t j = 0; j < cfg->n_heads_kv; j++) {
            int64_t n1, n2, nm;
            const int32_t *k1 = uc_engine_seq_kept(e, 1, l, j, &n1);
            const int32_t *k2 = uc_engine_seq_kept(e, 2, l, j, &n2);
            const int32_t *mg = uc_engine_seq_merged(e, 2, l, j, &nm);
            bool second = mg && l > 0 && uc_engine_seq_merged(e, 2, l - 1, j, &(int64_t){0}) &&
                          (l - uc_minicache_start(0, cfg->n_layers)) % 2 == 1;
            int64_t want = second ? n2 + nm : n2;
            bad += want != n1;
            if (second) {
                common += nm;
                /* merged positions are kept by the plain policy in both layers */
                int64_t na;
                const int32_t *ka = uc_engine_seq_kept(e, 1, l - 1, j, &na);
                for (int64_t i = 0; i < nm; i++) {
                    bool in_a = false, in_b = false;
                    for (int64_t x = 0; x < na; x++) {
                        in_a = in_a || ka[x] == mg[i];
                    }
                    for (int64_t x = 0; x < n1; x++) {
                        in_b = in_b || k1[x] == mg[i];
                    }
                    bad += !(in_a && in_b);
                }
            }
            (void)k2;
        }
    }
    printf("%-14s %lld blocks; %s %lld blocks (%lld merged, %lld retained): %.3fx\n", base,
           (long long)(u1 - u0), with, (long long)(u2 - u1), (long long)rb.minicache_merged,
           (long long)rb.minicache_retained, (double)(u2 - u1) / (double)(u1 - u0));
    TU_CHECK(bad == 0, "%s: %lld kept/merged sets disagree with %s's", with, (long long)bad,
             base);
    TU_CHECK(common == rb.minicache_merged && common > 0, "%s: %lld merged recorded, %lld "
             "reported", with, (long long)common, (long long)rb.minicache_merged);
    TU_CHECK(u2 - u1 < u1 - u0 && rb.kv_blocks_held_local == u2 - u1,
             "%s holds %lld blocks (report %lld), %s %lld", with, (long long)(u2 - u1),
             (long long)rb.kv_blocks_held_local, base, (long long)(u1 - u0));
    TU_CHECK(need_b >= u2 - u1, "%s: admission reserves %lld blocks, the cache holds %lld", with,
             (long long)need_b, (long long)(u2 - u1));
    TU_CHECK(rb.kv_bytes_kept < ra.kv_bytes_kept && rb.kv_bytes_kept == rb.kv_row_bytes_local,
             "%s: reported bytes %lld (rows %lld), %s %lld", with, (long long)rb.kv_bytes_kept,
             (long long)rb.kv_row_bytes_local, base, (long long)ra.kv_bytes_kept);
    tu_free(e, 1);
    tu_free(e, 2);
    TU_CHECK(uc_engine_kv_blocks_used(e) == u0, "%s: blocks not returned", with);
}

/* A fork of a merged sequence shares its merged blocks and decodes bit-identically. */
static void check_fork(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = cfg->vocab, rows;
    struct uc_compress_params cp = tu_spec("snapkv+minicache", 96);
    TU_CHECK(tu_prefill(e, 1, ids, PROMPT, 0, &cp, 40) == UC_OK, "fork: prefill");
    int64_t used1 = uc_engine_kv_blocks_used(e);
    struct uc_step_new g = {.seq_id = 2, .flags = UC_SEQ_FORK, .fork_of = 1,
                            .max_new_tokens = 40, .cp = cp};
    int64_t need = uc_engine_kv_blocks_needed(e, &g);
    struct uc_step s1 = {.op = UC_STEP_RUN, .n_new = 1, .news = &g};
    TU_CHECK(uc_engine_step(e, &s1) == UC_OK, "fork: step");
    int64_t copied = uc_engine_kv_blocks_used(e) - used1;
    TU_CHECK(copied <= need, "fork: %lld blocks copied, admission reserved %lld",
             (long long)copied, (long long)need);
    float *a = uc_malloc((size_t)v * sizeof(float)), *b = uc_malloc((size_t)v * sizeof(float));
    for (int k = 0; k < 16; k++) {
        int32_t tok = ids[50 + k];
        struct uc_step_decode d[2] = {{1, tok, 0}, {2, tok, 0}};
        struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = d};
        TU_CHECK(uc_engine_step(e, &s2) == UC_OK, "fork: decode");
        memcpy(a, uc_engine_seq_logits(e, 1, &rows), (size_t)v * sizeof(float));
        memcpy(b, uc_engine_seq_logits(e, 2, &rows), (size_t)v * sizeof(float));
        TU_CHECK(memcmp(a, b, (size_t)v * sizeof(float)) == 0, "fork: step %d logits differ", k);
    }
    printf("fork: %lld blocks at the fork (%lld copied); 16 steps bit-identical\n",
           (long long)(used1 + copied), (long long)copied);
    tu_free(e, 1);
    TU_CHECK(tu_decode(e, 2, ids[90]) == UC_OK, "fork: decode after the source ended");
    tu_free(e, 2);
    TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "fork: blocks not returned");
    uc_free(a);
    uc_free(b);
}

/* A batch mixing merged, packed (think), latent (lorc) and plain sequences decodes each as
 * alone (every part of the decode index arrays at once). */
static void check_mixed_batch(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = cfg->vocab, rows;
    enum { N = 4 };
    const char *specs[N] = {"snapkv+minicache", "snapkv+think", "minicache", "snapkv+lorc"};
    for (int i = 0; i < N; i++) {
        struct uc_compress_params cp = tu_spec(specs[i], 64);
        TU_CHECK(tu_prefill(e, 21 + i, ids, PROMPT, 0, &cp, 8) == UC_OK &&
                     tu_prefill(e, 31 + i, ids, PROMPT, 0, &cp, 8) == UC_OK,
                 "mixed: prefill %s", specs[i]);
    }
    double worst = 0.0;
    for (int k = 0; k < 4; k++) {
        int32_t tok = ids[60 + k];
        struct uc_step_decode all[N] = {{21, tok, 0}, {22, tok, 0}, {23, tok, 0}, {24, tok, 0}};
        struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = N, .decodes = all};
        TU_CHECK(uc_engine_step(e, &s2) == UC_OK, "mixed: decode");
        for (int i = 0; i < N; i++) {
            TU_CHECK(tu_decode(e, 31 + i, tok) == UC_OK, "mixed: decode alone");
            const float *x = uc_engine_seq_logits(e, 21 + i, &rows);
            const float *y = uc_engine_seq_logits(e, 31 + i, &rows);
            double mag = 1.0, diff = 0.0;
            for (int64_t j = 0; x && y && j < v; j++) {
                mag = fabs(y[j]) > mag ? fabs(y[j]) : mag;
                diff = fabs(x[j] - y[j]) > diff ? fabs(x[j] - y[j]) : diff;
            }
            worst = diff / mag > worst ? diff / mag : worst;
        }
    }
    printf("mixed batch (minicache beside think, full+minicache and lorc): max relative "
           "difference to alone %.2e\n", worst);
    TU_CHECK(worst <= 1e-5, "mixed: logits differ from each decoded alone by %.2e", worst);
    for (int i = 0; i < N; i++) {
        tu_free(e, 21 + i);
        tu_free(e, 31 + i);
    }
}

/* Refused combinations name the reason. */
static void check_refused(void)
{
    struct uc_compress_params cp = uc_compress_default_params();
    char msg[256];
    TU_CHECK(uc_policy_spec_parse("uncomp-stage+minicache", &cp, msg, sizeof msg) ==
                     UC_ERR_INVALID_ARG && strstr(msg, "uncomp-stage"),
             "uncomp-stage+minicache: %s", msg);
    const char *bad[] = {"snapkv+minicache+think", "snapkv+kvsharer+minicache"};
    for (int i = 0; i < 2; i++) {
        cp = uc_compress_default_params();
        TU_CHECK(uc_policy_spec_parse(bad[i], &cp, msg, sizeof msg) == UC_OK, "%s", bad[i]);
        cp.n_share = cp.stages & UC_STAGE_KVSHARER ? 1 : 0;
        cp.share[0] = (struct uc_share_pair){.src = 1, .dst = 2};
        TU_CHECK(uc_compress_params_validate(&cp, cfg->n_layers, msg, sizeof msg) ==
                         UC_ERR_INVALID_ARG && strstr(msg, "minicache"),
                 "%s accepted (%s)", bad[i], msg);
    }
    cp = uc_compress_default_params();
    TU_CHECK(uc_policy_spec_parse("snapkv+minicache", &cp, msg, sizeof msg) == UC_OK, "spec");
    cp.decode_mode = UC_DECODE_EVICT;
    TU_CHECK(uc_compress_params_validate(&cp, cfg->n_layers, msg, sizeof msg) ==
                     UC_ERR_INVALID_ARG && strstr(msg, "evict"),
             "minicache with evict accepted (%s)", msg);
    cp.decode_mode = UC_DECODE_APPEND;
    cp.minicache_start = (int32_t)cfg->n_layers - 1;
    TU_CHECK(uc_compress_params_validate(&cp, cfg->n_layers, msg, sizeof msg) ==
                     UC_ERR_INVALID_ARG && strstr(msg, "no pair"),
             "minicache_start=L-1 accepted (%s)", msg);
    cp.minicache_start = 0;
    cp.minicache_t = 1.5f;
    TU_CHECK(uc_compress_params_validate(&cp, cfg->n_layers, msg, sizeof msg) ==
                     UC_ERR_INVALID_ARG && strstr(msg, "minicache_t"),
             "minicache_t=1.5 accepted (%s)", msg);
}

/* Decode logits of STEPS teacher-forced tokens after a prompt; with `ref`, the dump for the
 * numpy reference. */
static void decode_logits(struct uc_engine *e, const int32_t *ids, const char *policy,
                          float gamma, float *out, FILE *ref, struct uc_compress_report *rep)
{
    int64_t v = cfg->vocab, rows;
    struct uc_compress_params cp = tu_spec(policy, 64);
    cp.minicache_gamma = gamma;
    TU_CHECK(tu_prefill(e, 7, ids, PROMPT, UC_SEQ_RECORD_KEPT, &cp, STEPS) == UC_OK,
             "%s: prefill", policy);
    uc_engine_seq_report(e, 7, rep);
    if (ref) {
        fprintf(ref, "policy %s\nprompt %d", policy, PROMPT);
        for (int i = 0; i < PROMPT; i++) {
            fprintf(ref, " %d", ids[i]);
        }
        fprintf(ref, "\nparams t %.9g gamma %.9g start %d\n",
                (double)uc_policy_minicache_t(&cp), (double)uc_policy_minicache_gamma(&cp),
                rep->minicache_start);
        for (int64_t l = 0; l < cfg->n_layers; l++) {
            for (int64_t j = 0; j < cfg->n_heads_kv; j++) {
                int64_t n, nm;
                const int32_t *k = uc_engine_seq_kept(e, 7, l, j, &n);
                const int32_t *mg = uc_engine_seq_merged(e, 7, l, j, &nm);
                fprintf(ref, "kept %lld %lld", (long long)l, (long long)j);
                for (int64_t i = 0; i < n; i++) {
                    fprintf(ref, " %d", k[i]);
                }
                fprintf(ref, "\nmerged %lld %lld", (long long)l, (long long)j);
                for (int64_t i = 0; i < nm; i++) {
                    fprintf(ref, " %d", mg[i]);
                }
                fprintf(ref, "\n");
            }
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
    snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, "uncomp-tiny"));
    ep.model_dir = dir;
    ep.backend = tu_backend_params();
    ep.kv_memory_bytes = 64 << 20;
    ep.profile_path = "/nonexistent/uncomp_profile.json";
    struct uc_engine *e = NULL;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        return 1;
    }
    int rank = uc_comm_rank(comm), tp = uc_comm_size(comm);
    if (rank != 0) {
        uc_engine_serve(e);
        uc_engine_destroy(e);
        uc_comm_destroy(comm);
        return 0;
    }
    cfg = uc_engine_config(e);
    int32_t ids[PROMPT];
    tu_hash_ids(ids, PROMPT);
    if (tp == 1) {
        check_refused();
        check_memory_full(e, ids);
        check_memory_policy(e, ids, "snapkv", 96);
        check_memory_policy(e, ids, "uncomp", 96);
        check_fork(e, ids);
        check_mixed_batch(e, ids);
    }
    int64_t nl = STEPS * cfg->vocab;
    float *lg = uc_malloc((size_t)nl * sizeof(float));
    float *full = uc_malloc((size_t)nl * sizeof(float));
    const char *rp = getenv("UC_MINICACHE_REF");
    FILE *ref = rp && tp == 1 ? fopen(rp, "w") : NULL;
    TU_CHECK(!rp || tp > 1 || ref, "cannot write %s", rp ? rp : "");
    struct uc_compress_report rep;
    const char *pols[2] = {"minicache", "snapkv+minicache"};
    for (int i = 0; i < 2; i++) {
        decode_logits(e, ids, pols[i], 0.0f, lg, ref, &rep);
        tu_check_tp(lg, nl, pols[i], TP_REL);
        float counts[2] = {(float)rep.minicache_merged, (float)rep.minicache_retained};
        printf("%s: %lld merged, %lld retained over the model\n", pols[i],
               (long long)rep.minicache_merged, (long long)rep.minicache_retained);
        tu_check_tp(counts, 2, "merge counts", TP_REL);
    }
    if (ref) {
        fclose(ref);
    }
    /* with every common token retained nothing is merged: full's logits bit for bit; with the
     * default share the merge changes them */
    decode_logits(e, ids, "full", 0.0f, full, NULL, &rep);
    decode_logits(e, ids, "minicache", 1.0f, lg, NULL, &rep);
    TU_CHECK(rep.minicache_merged == 0 && memcmp(lg, full, (size_t)nl * sizeof(float)) == 0,
             "minicache retaining every token: %lld merged, logits differ from full",
             (long long)rep.minicache_merged);
    decode_logits(e, ids, "minicache", 0.0f, lg, NULL, &rep);
    TU_CHECK(memcmp(lg, full, (size_t)nl * sizeof(float)) != 0,
             "minicache decodes exactly like full: nothing merged");
    uc_free(lg);
    uc_free(full);
    uc_engine_shutdown(e);
    uc_engine_destroy(e);
    printf("%s: %d failure(s) at tp=%d\n", tu_failures ? "FAILED" : "PASSED", tu_failures, tp);
    uc_comm_destroy(comm);
    return tu_failures ? 1 : 0;
}
