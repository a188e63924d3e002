/* ThinK (key channel pruning) in the paged cache: a pruned head's keys take fewer bytes in the
 * pool (counted from the pool, against the packed layout's blocks), forks share packed blocks
 * and decode bit-identically to their source, eviction moves packed rows, the non-finite
 * diagnosis reads packed blocks, and composed with a token policy the savings multiply.
 *
 * Usage: test_think SHARED_DIR. Environment:
 *   UC_THINK_REF=FILE  writes the prompt, each (layer, KV head)'s kept channels and the logits
 *                      of 4 decode steps of plain think, for tests/golden/think_reference.py
 *   UC_TEST_DUMP=FILE / UC_TEST_COMPARE=FILE  writes / compares (at another tp, within 1e-4
 *                      relative) the decode logits of think and snapkv+think; at tp > 1 only
 *                      that part runs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "compress/think.h"
#include "engine.h"
#include "test_util.h"

#define PROMPT 200
#define STEPS 4
#define TP_REL 1e-4

static const struct uc_model_config *cfg;

/* Blocks the caches of sequence id hold by the packed layout's count: every head keeps
 * kdim channels (full: D), so ceil(tokens / tokens per block) blocks each. */
static int64_t expected_blocks(struct uc_engine *e, int64_t id, int64_t kdim)
{
    const struct uc_plan *plan = uc_engine_seq_plan(e, id);
    int64_t tpb = uc_kv_packed_tokens(uc_engine_kv_block_tokens(e), cfg->head_dim,
                                      kdim < cfg->head_dim ? kdim : 0);
    int64_t n = uc_engine_seq_len(e, id), blocks = 0;
    for (int64_t i = 0; i < cfg->n_layers * cfg->n_heads_kv; i++) {
        int64_t kept = plan->budget[i] < n ? plan->budget[i] : n;
        blocks += (kept + tpb - 1) / tpb;
    }
    return blocks;
}

/* A policy with and without +think: the pool holds fewer blocks for the pruned sequence, by
 * the packed layout's count, and the report's bytes are those of the rows. */
static void check_memory(struct uc_engine *e, const int32_t *ids, const char *base,
                         int32_t budget)
{
    char with[64];
    snprintf(with, sizeof with, "%s+think", base);
    struct uc_compress_params a = tu_spec(base, budget), b = tu_spec(with, budget);
    int64_t d = cfg->head_dim, kdim = uc_think_kdim(UC_THINK_DEFAULT_RATIO, d);
    /* admission reserves what the packed layout needs: less with +think */
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
    int64_t want_a = expected_blocks(e, 1, d), want_b = expected_blocks(e, 2, kdim);
    printf("%-13s %lld tokens held, %lld blocks, %lld row bytes (key channels %lld)\n", base,
           (long long)ra.kv_tokens_held_local, (long long)(u1 - u0),
           (long long)ra.kv_row_bytes_local, (long long)ra.key_channels);
    printf("%-13s %lld tokens held, %lld blocks, %lld row bytes (key channels %lld): %.3fx the "
           "blocks\n", with, (long long)rb.kv_tokens_held_local, (long long)(u2 - u1),
           (long long)rb.kv_row_bytes_local, (long long)rb.key_channels,
           (double)(u2 - u1) / (double)(u1 - u0));
    TU_CHECK(ra.kv_tokens_held_local == rb.kv_tokens_held_local,
             "%s: +think changed the tokens kept (%lld vs %lld)", base,
             (long long)ra.kv_tokens_held_local, (long long)rb.kv_tokens_held_local);
    TU_CHECK(u1 - u0 == want_a && u2 - u1 == want_b,
             "%s: the pool grew by %lld and %lld blocks, the layouts need %lld and %lld", base,
             (long long)(u1 - u0), (long long)(u2 - u1), (long long)want_a, (long long)want_b);
    TU_CHECK(u2 - u1 < u1 - u0, "%s+think holds %lld blocks, not fewer than %lld", base,
             (long long)(u2 - u1), (long long)(u1 - u0));
    /* exact where the budgets are known before the prompt (full, snapkv); a bound for uncomp
     * with groups from the prompt (the larger group budget) */
    bool exact = a.policy != UC_POLICY_UNCOMP;
    TU_CHECK(need_b < need_a && need_a >= u1 - u0 && need_b >= u2 - u1 &&
                 (!exact || (need_a == u1 - u0 && need_b == u2 - u1)),
             "%s: admission reserves %lld and %lld blocks, the caches hold %lld and %lld", base,
             (long long)need_a, (long long)need_b, (long long)(u1 - u0), (long long)(u2 - u1));
    TU_CHECK(rb.key_channels == kdim && ra.key_channels == d, "%s: key channels %lld / %lld",
             base, (long long)ra.key_channels, (long long)rb.key_channels);
    int64_t a_size = (int64_t)uc_engine_kv_bytes_per_token(e) / (2 * d);
    TU_CHECK(rb.kv_row_bytes_local == rb.kv_tokens_held_local * (kdim + d) * a_size,
             "%s: row bytes %lld", with, (long long)rb.kv_row_bytes_local);
    TU_CHECK(rb.kv_bytes_kept == rb.kv_row_bytes_local && ra.kv_bytes_kept == ra.kv_row_bytes_local,
             "%s: reported kv_bytes_kept %lld / %lld, rows hold %lld / %lld", base,
             (long long)ra.kv_bytes_kept, (long long)rb.kv_bytes_kept,
             (long long)ra.kv_row_bytes_local, (long long)rb.kv_row_bytes_local);
    for (int64_t l = 0; l < cfg->n_layers; l++) {
        for (int64_t j = 0; j < cfg->n_heads_kv; j++) {
            int64_t n;
            const int32_t *ch = uc_engine_seq_key_channels(e, 2, l, j, &n);
            TU_CHECK(ch && n == kdim, "%s: layer %lld head %lld keeps %lld channels", with,
                     (long long)l, (long long)j, (long long)n);
            TU_CHECK(!uc_engine_seq_key_channels(e, 1, l, j, &n) && n == 0,
                     "%s: unpruned head has channels", base);
        }
    }
    int64_t first = -1;
    TU_CHECK(uc_engine_diagnose_nonfinite(e, 2, &first) == UC_OK && first == cfg->n_layers,
             "%s: non-finite diagnosis of packed blocks says layer %lld", with,
             (long long)first);
    tu_free(e, 1);
    tu_free(e, 2);
    TU_CHECK(uc_engine_kv_blocks_used(e) == u0, "%s: blocks not returned", base);
}

/* A fork of a pruned sequence shares its full packed blocks and decodes bit-identically to its
 * source, in append and evict mode (eviction moves packed rows, copying shared blocks first). */
static void check_fork_evict(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = cfg->vocab, rows;
    for (int evict = 0; evict < 2; evict++) {
        struct uc_compress_params cp = tu_spec("snapkv+think", 48);
        cp.decode_mode = evict ? UC_DECODE_EVICT : UC_DECODE_APPEND;
        const char *mode = evict ? "evict" : "append";
        TU_CHECK(tu_prefill(e, 1, ids, PROMPT, 0, &cp, 40) == UC_OK, "fork: prefill");
        int64_t used1 = uc_engine_kv_blocks_used(e);
        struct uc_compress_report r0;
        uc_engine_seq_report(e, 1, &r0);
        struct uc_step_new g = {.seq_id = 2, .flags = UC_SEQ_FORK, .fork_of = 1,
                                .max_new_tokens = 40, .cp = cp};
        int64_t need = uc_engine_kv_blocks_needed(e, &g);
        struct uc_step s1 = {.op = UC_STEP_RUN, .n_new = 1, .news = &g};
        TU_CHECK(uc_engine_step(e, &s1) == UC_OK, "fork (%s): step", mode);
        /* 48 kept tokens per head: a copy for each head whose last packed block is partial */
        int64_t tpb = uc_kv_packed_tokens(uc_engine_kv_block_tokens(e), cfg->head_dim,
                                          uc_think_kdim(UC_THINK_DEFAULT_RATIO, cfg->head_dim));
        int64_t heads = cfg->n_layers * cfg->n_heads_kv;
        int64_t copies = 48 % tpb != 0 ? heads : 0;
        /* the fork's own blocks at most: its heads' last partial packed block plus 40 tokens
         * (appending), or whole heads (evicting rewrites shared blocks) */
        int64_t want_need = heads * (((evict ? 48 : 48 % tpb) + 40 + tpb - 1) / tpb);
        TU_CHECK(need == want_need, "fork (%s): admission reserves %lld blocks, want %lld", mode,
                 (long long)need, (long long)want_need);
        TU_CHECK(uc_engine_kv_blocks_used(e) == used1 + copies,
                 "fork (%s): %lld blocks used, want %lld + %lld", mode,
                 (long long)uc_engine_kv_blocks_used(e), (long long)used1, (long long)copies);
        float *a = uc_malloc((size_t)v * sizeof(float)), *b = uc_malloc((size_t)v * sizeof(float));
        bool finite = true;
        for (int k = 0; k < 24; k++) {
            int32_t tok = ids[50 + k];
            struct uc_step_decode d[2] = {{1, tok, 0}, {2, tok, 0}};
            struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = d};
            TU_CHECK(uc_engine_step(e, &s2) == UC_OK, "fork (%s): decode", mode);
            memcpy(a, uc_engine_seq_logits(e, 1, &rows), (size_t)v * sizeof(float));
            memcpy(b, uc_engine_seq_logits(e, 2, &rows), (size_t)v * sizeof(float));
            TU_CHECK(memcmp(a, b, (size_t)v * sizeof(float)) == 0,
                     "fork (%s): step %d logits differ", mode, k);
            for (int64_t j = 0; j < v; j++) {
                finite = finite && isfinite(a[j]);
            }
        }
        TU_CHECK(finite, "fork (%s): non-finite logits", mode);
        struct uc_compress_report r1;
        uc_engine_seq_report(e, 2, &r1);
        int64_t want = r0.kv_tokens_held_local + (evict ? 0 : 24 * heads);
        TU_CHECK(r1.kv_tokens_held_local == want, "fork (%s): %lld tokens held, want %lld", mode,
                 (long long)r1.kv_tokens_held_local, (long long)want);
        printf("fork (%s): %lld blocks at the fork (%lld copied), %lld after 24 steps of both; "
               "bit-identical\n", mode, (long long)(used1 + copies), (long long)copies,
               (long long)uc_engine_kv_blocks_used(e));
        tu_free(e, 1);
        TU_CHECK(tu_decode(e, 2, ids[90]) == UC_OK, "fork (%s): decode after the source ended",
                 mode);
        tu_free(e, 2);
        TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "fork (%s): blocks not returned", mode);
        uc_free(a);
        uc_free(b);
    }
}

/* A decode batch mixing a pruned sequence with a KVSharer one (whose shared layers take their
 * source layer's entries of the step's index arrays, laid out for packed heads then) decodes
 * each as it decodes alone. */
static void check_mixed_batch(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = cfg->vocab, rows;
    struct uc_compress_params a = tu_spec("snapkv+think", 64), b = tu_spec("snapkv+kvsharer", 64);
    b.n_share = 1;
    b.share[0] = (struct uc_share_pair){.src = 2, .dst = 5};
    TU_CHECK(tu_prefill(e, 11, ids, PROMPT, 0, &a, 8) == UC_OK &&
                 tu_prefill(e, 12, ids, PROMPT, 0, &b, 8) == UC_OK &&
                 tu_prefill(e, 13, ids, PROMPT, 0, &a, 8) == UC_OK &&
                 tu_prefill(e, 14, ids, PROMPT, 0, &b, 8) == UC_OK,
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
    printf("mixed batch (think beside kvsharer): max relative difference to alone %.2e\n", worst);
    TU_CHECK(worst <= 1e-5, "mixed: logits differ from each decoded alone by %.2e", worst);
    for (int64_t id = 11; id <= 14; id++) {
        tu_free(e, id);
    }
}

/* A sequence with packed heads decoding alone right after a plain one: a decode step of the same
 * batch size as the step before records its graph at once, and packed heads need workspaces
 * (their mask, the packed rows' partials) the plain steps never grew. The recording must not
 * allocate: it did on the GPU (the graph's alloc node made its next launch fail with
 * cudaErrorInvalidValue, and the daemon died in the e2e suite). Two rounds: the second
 * replays what the first recorded, and decodes the same logits bit for bit. */
static void check_graph_switch(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = cfg->vocab, rows;
    struct uc_compress_params plain = tu_spec("snapkv", 64), think = tu_spec("snapkv+think", 64);
    float *first = uc_malloc((size_t)(STEPS * v) * sizeof(float));
    double worst = 0.0;
    for (int round = 0; round < 2; round++) {
        TU_CHECK(tu_prefill(e, 21, ids, PROMPT, 0, &plain, STEPS) == UC_OK &&
                     tu_prefill(e, 22, ids, PROMPT, 0, &think, STEPS) == UC_OK,
                 "graph switch: prefill");
        for (int k = 0; k < STEPS; k++) {
            TU_CHECK(tu_decode(e, 21, ids[30 + k]) == UC_OK, "graph switch: plain step %d", k);
        }
        for (int k = 0; k < STEPS; k++) {
            TU_CHECK(tu_decode(e, 22, ids[30 + k]) == UC_OK, "graph switch: packed step %d", k);
            const float *x = uc_engine_seq_logits(e, 22, &rows);
            for (int64_t j = 0; x && j < v; j++) {
                if (round == 0) {
                    first[k * v + j] = x[j];
                } else {
                    double d = fabs((double)x[j] - first[k * v + j]);
                    worst = d > worst ? d : worst;
                }
            }
        }
        tu_free(e, 21);
        tu_free(e, 22);
    }
    printf("graph switch (packed heads after plain ones at batch 1): max difference between "
           "the rounds %.3g\n", worst);
    TU_CHECK(worst == 0.0, "graph switch: the replayed round differs by %.3g", worst);
    uc_free(first);
}

/* Decode logits of STEPS teacher-forced tokens after a prompt; with `ref`, the dump for the
 * numpy reference (prompt, kept channels, logits). */
static void decode_logits(struct uc_engine *e, const int32_t *ids, const char *policy,
                          float *out, FILE *ref)
{
    int64_t v = cfg->vocab, rows;
    struct uc_compress_params cp = tu_spec(policy, 64);
    TU_CHECK(tu_prefill(e, 7, ids, PROMPT, 0, &cp, STEPS) == UC_OK, "%s: prefill", policy);
    if (ref) {
        fprintf(ref, "prompt %d", PROMPT);
        for (int i = 0; i < PROMPT; i++) {
            fprintf(ref, " %d", ids[i]);
        }
        fprintf(ref, "\nratio %.6f window %d\n", (double)uc_policy_think_ratio(&cp), cp.window);
        for (int64_t l = 0; l < cfg->n_layers; l++) {
            for (int64_t j = 0; j < cfg->n_heads_kv; j++) {
                int64_t n;
                const int32_t *ch = uc_engine_seq_key_channels(e, 7, l, j, &n);
                fprintf(ref, "chan %lld %lld", (long long)l, (long long)j);
                for (int64_t c = 0; c < n; c++) {
                    fprintf(ref, " %d", ch[c]);
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
        check_graph_switch(e, ids); /* first: no packed head has grown a workspace yet */
        check_memory(e, ids, "full", 64);
        check_memory(e, ids, "snapkv", 128);
        check_memory(e, ids, "uncomp", 128);
        check_fork_evict(e, ids);
        check_mixed_batch(e, ids);
    }
    float *lg = uc_malloc((size_t)(STEPS * cfg->vocab) * sizeof(float));
    float *full = uc_malloc((size_t)(STEPS * cfg->vocab) * sizeof(float));
    const char *rp = getenv("UC_THINK_REF");
    FILE *ref = rp && tp == 1 ? fopen(rp, "w") : NULL;
    TU_CHECK(!rp || tp > 1 || ref, "cannot write %s", rp ? rp : "");
    decode_logits(e, ids, "think", lg, ref);
    if (ref) {
        fclose(ref);
    }
    tu_check_tp(lg, STEPS * cfg->vocab, "think", TP_REL);
    decode_logits(e, ids, "full", full, NULL);
    TU_CHECK(memcmp(lg, full, (size_t)(STEPS * cfg->vocab) * sizeof(float)) != 0,
             "think decodes exactly like full: no channel was pruned");
    decode_logits(e, ids, "snapkv+think", lg, NULL);
    tu_check_tp(lg, STEPS * cfg->vocab, "snapkv+think", TP_REL);
    uc_free(lg);
    uc_free(full);
    uc_engine_shutdown(e);
    uc_engine_destroy(e);
    printf("%s: %d failure(s) at tp=%d\n", tu_failures ? "FAILED" : "PASSED", tu_failures, tp);
    uc_comm_destroy(comm);
    return tu_failures ? 1 : 0;
}
