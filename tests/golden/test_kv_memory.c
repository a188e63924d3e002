/* KV memory: the bytes a compression report claims are the bytes the cache holds, and a
 * sequence compressed to 10% of its prompt lets about 10x as many such sequences fit in the
 * same KV pool as uncompressed ones (sequences are prefilled until the pool is full, so the
 * count is of real allocations, not of a formula); forks share their source's blocks
 * copy-on-write (n = 3 choices of a long prompt hold about one prompt's blocks); the prefill
 * buffers a prompt held never exceed what admission counts for them, which for `full` is
 * exactly its residual stream and Q/K/V. Usage: test_kv_memory SHARED_DIR */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"

#define PROMPT 640
#define BUDGET 64 /* 10% of the prompt */

/* Prefills sequences with the given policy until the pool cannot take another; returns how
 * many fit, and checks every report against the blocks actually held. */
static int64_t fill_pool(struct uc_engine *e, const int32_t *ids, enum uc_policy policy,
                         int64_t *bytes_kept_each)
{
    struct uc_compress_params cp = uc_compress_default_params();
    cp.policy = policy;
    cp.kv_budget = BUDGET;
    cp.grouping = UC_GROUPING_PROMPT;
    struct uc_step_new probe = {.max_new_tokens = 0, .cp = cp, .n_prompt = PROMPT, .prompt = ids};
    int64_t fitted = 0, total = uc_engine_kv_blocks_total(e);
    size_t per_token = uc_engine_kv_bytes_per_token(e);
    while (uc_engine_kv_blocks_used(e) + uc_engine_kv_blocks_needed(e, &probe) <= total) {
        int64_t before = uc_engine_kv_blocks_used(e);
        if (tu_prefill(e, 100 + fitted, ids, PROMPT, 0, &cp, 0) != UC_OK) {
            TU_CHECK(0, "%s: prefill %lld failed", uc_policy_name(policy), (long long)fitted);
            break;
        }
        struct uc_compress_report r;
        uc_engine_seq_report(e, 100 + fitted, &r);
        int64_t used = uc_engine_kv_blocks_used(e) - before;
        TU_CHECK(used == r.kv_blocks_held_local, "%s: pool grew by %lld blocks, report says %lld",
                 uc_policy_name(policy), (long long)used, (long long)r.kv_blocks_held_local);
        /* admission reserves exactly what the prefill takes (at tp 1: one rank, every head);
         * uncomp's prompt grouping once reserved its largest group budget for every head */
        TU_CHECK(uc_engine_kv_blocks_needed(e, &probe) == used,
                 "%s: admission reserves %lld blocks, the prefill took %lld",
                 uc_policy_name(policy), (long long)uc_engine_kv_blocks_needed(e, &probe),
                 (long long)used);
        TU_CHECK(r.kv_bytes_kept == r.kv_tokens_held_local * (int64_t)per_token,
                 "%s: reported kv_bytes_kept %lld != bytes of the %lld tokens held",
                 uc_policy_name(policy), (long long)r.kv_bytes_kept,
                 (long long)r.kv_tokens_held_local);
        TU_CHECK(r.kv_tokens_kept == r.kv_tokens_held_local, "%s: kept %lld vs held %lld",
                 uc_policy_name(policy), (long long)r.kv_tokens_kept,
                 (long long)r.kv_tokens_held_local);
        *bytes_kept_each = r.kv_bytes_kept;
        fitted++;
    }
    for (int64_t i = 0; i < fitted; i++) {
        tu_free(e, 100 + i);
    }
    TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "%s: %lld blocks not returned to the pool",
             uc_policy_name(policy), (long long)uc_engine_kv_blocks_used(e));
    return fitted;
}

/* A prompt of n tokens prefilled into sequence id: how many of its (layer, KV head) caches end
 * in a partly filled block (what each fork copies; the rest it shares), and the blocks a fork
 * decoding gen tokens needs beside the shared ones. Each head holds min(budget, n) tokens. */
static int64_t fork_copies(struct uc_engine *e, int64_t id, int64_t n, int64_t gen,
                           int64_t *fork_need)
{
    const struct uc_model_config *c = uc_engine_config(e);
    const struct uc_plan *plan = uc_engine_seq_plan(e, id);
    int64_t bt = uc_engine_kv_block_tokens(e), copies = 0;
    *fork_need = 0;
    for (int64_t i = 0; i < c->n_layers * c->n_heads_kv; i++) {
        int64_t kept = plan->budget[i] < n ? plan->budget[i] : n;
        copies += kept % bt != 0;
        *fork_need += (kept % bt + gen + bt - 1) / bt;
    }
    return copies;
}

/* issue 12: forks share their source's cache copy-on-write. n = 3 forks of a long prompt hold
 * about one prompt's blocks, not three (each copies only its heads' partly filled last blocks),
 * and a fork decodes bit-identically to its source (also after the source is freed), with
 * per-head budgets that differ (uncomp) and with eviction rewriting shared blocks. */
static void check_fork(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = uc_engine_config(e)->vocab, rows;
    /* a long prompt, not a multiple of the block size: every head has a partial block */
    struct uc_compress_params cp = uc_compress_default_params();
    cp.policy = UC_POLICY_FULL;
    TU_CHECK(tu_prefill(e, 1, ids, PROMPT - 3, 0, &cp, 8) == UC_OK, "fork: prefill");
    int64_t need, used1 = uc_engine_kv_blocks_used(e);
    int64_t copies = fork_copies(e, 1, PROMPT - 3, 8, &need);
    struct uc_step_new f[2];
    for (int i = 0; i < 2; i++) {
        f[i] = (struct uc_step_new){.seq_id = 2 + i, .flags = UC_SEQ_FORK, .fork_of = 1,
                                    .max_new_tokens = 8, .cp = cp};
        TU_CHECK(uc_engine_kv_blocks_needed(e, &f[i]) == need, "fork: needs %lld blocks, want "
                 "%lld", (long long)uc_engine_kv_blocks_needed(e, &f[i]), (long long)need);
    }
    struct uc_step st = {.op = UC_STEP_RUN, .n_new = 2, .news = f};
    TU_CHECK(uc_engine_step(e, &st) == UC_OK, "fork: step");
    int64_t used3 = uc_engine_kv_blocks_used(e);
    printf("fork: a %d-token prompt holds %lld blocks; with 2 forks (n = 3) %lld (%.3fx; 3 "
           "copies would be %lld)\n", PROMPT - 3, (long long)used1, (long long)used3,
           (double)used3 / (double)used1, (long long)(3 * used1));
    TU_CHECK(used3 == used1 + 2 * copies, "fork: %lld blocks used after 2 forks, want %lld + "
             "2 x %lld copied last blocks", (long long)used3, (long long)used1,
             (long long)copies);
    TU_CHECK(used3 <= used1 * 11 / 10, "fork: %lld blocks for n = 3, one prompt is %lld",
             (long long)used3, (long long)used1);
    /* greedy: the three choices continue alike, and like the prompt prefilled on its own */
    int32_t alone[8], out[3][8];
    TU_CHECK(tu_prefill(e, 9, ids, PROMPT - 3, 0, &cp, 8) == UC_OK, "fork: second prefill");
    TU_CHECK(tu_greedy(e, 9, 8, alone) == 8, "fork: greedy alone");
    tu_free(e, 9);
    for (int k = 0; k < 8; k++) {
        struct uc_step_decode d[3];
        for (int i = 0; i < 3; i++) {
            out[i][k] = tu_argmax(uc_engine_seq_logits(e, 1 + i, &rows), v);
            d[i] = (struct uc_step_decode){1 + i, out[i][k], 0};
        }
        struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = 3, .decodes = d};
        if (k + 1 < 8) {
            TU_CHECK(uc_engine_step(e, &s2) == UC_OK, "fork: decode");
        }
    }
    for (int i = 0; i < 3; i++) {
        TU_CHECK(memcmp(out[i], alone, sizeof alone) == 0, "fork: choice %d's greedy tokens "
                 "differ from the prompt decoded alone", i);
    }
    tu_free(e, 1); /* the source first: the forks keep the blocks they share */
    TU_CHECK(uc_engine_kv_blocks_used(e) >= used1, "fork: shared blocks freed with the source");
    TU_CHECK(tu_decode(e, 2, ids[200]) == UC_OK && tu_decode(e, 3, ids[200]) == UC_OK,
             "fork: decode after the source ended");
    tu_free(e, 2);
    tu_free(e, 3);
    TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "fork: blocks not returned");

    /* per-head budgets (uncomp: two groups) and eviction (rewrites shared blocks): the fork
     * decodes bit-identically to its source with the same tokens */
    for (int evict = 0; evict < 2; evict++) {
        cp = uc_compress_default_params();
        cp.policy = UC_POLICY_UNCOMP;
        cp.grouping = UC_GROUPING_PROMPT;
        cp.kv_budget = BUDGET;
        cp.decode_mode = evict ? UC_DECODE_EVICT : UC_DECODE_APPEND;
        TU_CHECK(tu_prefill(e, 1, ids, PROMPT, 0, &cp, 40) == UC_OK, "fork: prefill");
        used1 = uc_engine_kv_blocks_used(e);
        copies = fork_copies(e, 1, PROMPT, 40, &need);
        struct uc_step_new g = {.seq_id = 2, .flags = UC_SEQ_FORK, .fork_of = 1,
                                .max_new_tokens = 40, .cp = cp};
        struct uc_step s1 = {.op = UC_STEP_RUN, .n_new = 1, .news = &g};
        TU_CHECK(uc_engine_step(e, &s1) == UC_OK, "fork: step");
        TU_CHECK(uc_engine_kv_blocks_used(e) == used1 + copies,
                 "fork (%s): %lld blocks used, want %lld + %lld", evict ? "evict" : "append",
                 (long long)uc_engine_kv_blocks_used(e), (long long)used1, (long long)copies);
        float *a = uc_malloc((size_t)v * sizeof(float)), *b = uc_malloc((size_t)v * sizeof(float));
        for (int k = 0; k < 32; k++) {
            int32_t tok = ids[100 + k];
            struct uc_step_decode d[2] = {{1, tok, 0}, {2, tok, 0}};
            struct uc_step s2 = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = d};
            TU_CHECK(uc_engine_step(e, &s2) == UC_OK, "fork: decode");
            memcpy(a, uc_engine_seq_logits(e, 1, &rows), (size_t)v * sizeof(float));
            memcpy(b, uc_engine_seq_logits(e, 2, &rows), (size_t)v * sizeof(float));
            TU_CHECK(memcmp(a, b, (size_t)v * sizeof(float)) == 0,
                     "fork (%s): step %d logits differ", evict ? "evict" : "append", k);
        }
        if (evict) {
            /* evicting from shared blocks copied them first (each cache stays at its budget,
             * so the pool grew by those copies alone) */
            int64_t used = uc_engine_kv_blocks_used(e);
            printf("fork (evict): %lld blocks after 32 steps (%lld at the fork, %lld if "
                   "nothing were shared)\n", (long long)used, (long long)(used1 + copies),
                   (long long)(2 * used1));
            TU_CHECK(used > used1 + copies && used <= 2 * used1,
                     "fork (evict): %lld blocks used", (long long)used);
        }
        tu_free(e, 1);
        TU_CHECK(tu_decode(e, 2, ids[200]) == UC_OK, "fork: decode after the source ended");
        tu_free(e, 2);
        TU_CHECK(uc_engine_kv_blocks_used(e) == 0, "fork: blocks not returned");
        uc_free(a);
        uc_free(b);
    }
    printf("fork: shared copy-on-write, decodes bit-identically to its source (append and "
           "evict, per-head budgets) %s\n", tu_failures ? "FAIL" : "ok");
}

/* decode_mode=evict keeps every head at its budget while append grows by a token per step; the
 * first decoded token (attention over the same B + 1 tokens in both modes) is bit-identical. */
static void check_evict(struct uc_engine *e, const int32_t *ids)
{
    int64_t v = uc_engine_config(e)->vocab, rows;
    struct uc_compress_params cp = uc_compress_default_params();
    cp.policy = UC_POLICY_SNAPKV;
    cp.kv_budget = BUDGET;
    tu_prefill(e, 1, ids, PROMPT, 0, &cp, 40);
    cp.decode_mode = UC_DECODE_EVICT;
    tu_prefill(e, 2, ids, PROMPT, 0, &cp, 40);
    struct uc_compress_report ra, rb;
    uc_engine_seq_report(e, 1, &ra);
    uc_engine_seq_report(e, 2, &rb);
    int64_t kept = rb.kv_tokens_held_local, heads = 8 * 4, steps = 32;
    TU_CHECK(ra.kv_tokens_held_local == kept, "evict: prefill kept %lld vs %lld tokens",
             (long long)ra.kv_tokens_held_local, (long long)kept);
    float *a = uc_malloc((size_t)v * sizeof(float)), *b = uc_malloc((size_t)v * sizeof(float));
    bool finite = true;
    for (int64_t k = 0; k < steps; k++) {
        int32_t tok = ids[300 + k];
        struct uc_step_decode d[2] = {{1, tok, 0}, {2, tok, 0}};
        struct uc_step s = {.op = UC_STEP_RUN, .n_decode = 2, .decodes = d};
        TU_CHECK(uc_engine_step(e, &s) == UC_OK, "evict: decode step %lld", (long long)k);
        memcpy(a, uc_engine_seq_logits(e, 1, &rows), (size_t)v * sizeof(float));
        memcpy(b, uc_engine_seq_logits(e, 2, &rows), (size_t)v * sizeof(float));
        if (k == 0) {
            TU_CHECK(memcmp(a, b, (size_t)v * sizeof(float)) == 0,
                     "evict: the first decode step differs from append");
        }
        for (int64_t j = 0; j < v; j++) {
            finite = finite && isfinite(b[j]);
        }
    }
    uc_engine_seq_report(e, 1, &ra);
    uc_engine_seq_report(e, 2, &rb);
    TU_CHECK(finite, "evict: non-finite logits");
    TU_CHECK(rb.kv_tokens_held_local == kept, "evict: %lld tokens held after %lld steps, want %lld",
             (long long)rb.kv_tokens_held_local, (long long)steps, (long long)kept);
    TU_CHECK(ra.kv_tokens_held_local == kept + steps * heads,
             "append: %lld tokens held after %lld steps, want %lld",
             (long long)ra.kv_tokens_held_local, (long long)steps, (long long)(kept + steps * heads));
    printf("evict: %lld tokens held after %lld steps (append: %lld), first step identical %s\n",
           (long long)rb.kv_tokens_held_local, (long long)steps, (long long)ra.kv_tokens_held_local,
           tu_failures ? "FAIL" : "ok");
    tu_free(e, 1);
    tu_free(e, 2);
    uc_free(a);
    uc_free(b);
}

/* Each compression's prefill buffers, as held (the report's peak) against admission's count
 * (uc_engine_prefill_bytes): never more; `full` holds exactly its residual stream and Q/K/V;
 * KVSharer's three source layers (1, 3 and 5, for layers 2, 4 and 6) keep their K|V rows;
 * uncomp-stage cuts rows at layers 2 and 5. */
static void check_prefill_bytes(struct uc_engine *e, const int32_t *ids)
{
    static const char *specs[] = {"full", "snapkv", "pyramidkv", "uncomp", "uncomp-stage",
                                  "full+kvsharer", "snapkv+kvsharer"};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        struct uc_compress_params cp = tu_spec(specs[i], BUDGET);
        if (uc_policy_kvsharer(&cp)) {
            cp.n_share = 3;
            for (int k = 0; k < 3; k++) {
                cp.share[k] = (struct uc_share_pair){.src = (int16_t)(2 * k + 1),
                                                     .dst = (int16_t)(2 * k + 2)};
            }
        }
        if (cp.policy == UC_POLICY_UNCOMP_STAGE) {
            cp.n_stage_starts = 2;
            cp.stage_starts[0] = 2;
            cp.stage_starts[1] = 5;
        }
        if (tu_prefill(e, 50, ids, PROMPT, 0, &cp, 0) != UC_OK) {
            TU_CHECK(0, "%s: prefill failed", specs[i]);
            continue;
        }
        struct uc_compress_report r;
        uc_engine_seq_report(e, 50, &r);
        int64_t counted = uc_engine_prefill_bytes(e, &cp, PROMPT);
        printf("prefill buffers of %-16s held at most %lld bytes, admission counts %lld\n",
               specs[i], (long long)r.prefill_bytes_peak_local, (long long)counted);
        TU_CHECK(r.prefill_bytes_peak_local > 0 && r.prefill_bytes_peak_local <= counted,
                 "%s: prefill buffers held %lld bytes, admission counted %lld", specs[i],
                 (long long)r.prefill_bytes_peak_local, (long long)counted);
        if (strcmp(specs[i], "full") == 0) {
            TU_CHECK(r.prefill_bytes_peak_local == counted,
                     "full: prefill buffers held %lld bytes, admission counted %lld",
                     (long long)r.prefill_bytes_peak_local, (long long)counted);
        }
        tu_free(e, 50);
    }
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
    ep.backend = tu_backend_params(); /* UC_TEST_BACKEND=cuda: device_check.sh kvmem */
    ep.block_tokens = 8;
    /* room for exactly 3 uncompressed sequences: 80 blocks x 8 layers x 4 KV heads each */
    ep.kv_blocks = 3 * (PROMPT / 8) * 8 * 4;
    ep.profile_path = "/nonexistent/uncomp_profile.json";
    struct uc_engine *e = NULL;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        return 1;
    }
    int32_t ids[PROMPT];
    struct uc_rng rng;
    uc_rng_seed(&rng, 5);
    ids[0] = 0;
    for (int i = 1; i < PROMPT; i++) {
        ids[i] = (int32_t)(2 + uc_rng_next(&rng) % 4000);
    }
    check_prefill_bytes(e, ids);
    check_fork(e, ids);
    check_evict(e, ids);
    int64_t full_bytes = 0, snap_bytes = 0, unc_bytes = 0;
    int64_t n_full = fill_pool(e, ids, UC_POLICY_FULL, &full_bytes);
    int64_t n_snap = fill_pool(e, ids, UC_POLICY_SNAPKV, &snap_bytes);
    int64_t n_unc = fill_pool(e, ids, UC_POLICY_UNCOMP, &unc_bytes);
    double r_snap = (double)n_snap / (double)(n_full ? n_full : 1);
    double r_unc = (double)n_unc / (double)(n_full ? n_full : 1);
    printf("pool %lld blocks: full fits %lld (%lld KV bytes each), snapkv@%d fits %lld (%lld), "
           "uncomp@%d fits %lld (%lld): %.1fx and %.1fx\n",
           (long long)uc_engine_kv_blocks_total(e), (long long)n_full, (long long)full_bytes,
           BUDGET, (long long)n_snap, (long long)snap_bytes, BUDGET, (long long)n_unc,
           (long long)unc_bytes, r_snap, r_unc);
    TU_CHECK(n_full == 3, "full: %lld sequences fit, expected 3", (long long)n_full);
    TU_CHECK(r_snap >= 9.0 && r_snap <= 11.0, "snapkv at 10%%: %.1fx as many, expected ~10x",
             r_snap);
    TU_CHECK(r_unc >= 8.0 && r_unc <= 11.0, "uncomp at 10%%: %.1fx as many, expected ~10x", r_unc);
    uc_engine_destroy(e);
    uc_comm_destroy(comm);
    printf("%s: %d failure(s)\n", tu_failures ? "FAILED" : "PASSED", tu_failures);
    return tu_failures ? 1 : 0;
}
