/* The decode lookahead (shard/engine/decode.c): after a decode-only step's layers are launched,
 * the next step's blocks are taken and the block tables synced for the same batch while the
 * device runs this one. Checked on uncomp-tiny (blocks of 8 tokens, so heads cross block
 * boundaries often), running one schedule with and without it:
 * - every decode step's logits are bitwise the same, under a schedule that changes the batch
 *   (a sequence ends and is freed with the next step, one is forked mid-decode, one is admitted
 *   mid-decode) with full, snapkv and uncomp heads (uneven lengths, so heads cross block
 *   boundaries at different steps);
 * - the lookahead is used on the steps that follow a decode-only step of the same batch, or
 *   a prefill-only step (a prompt admitted mid-decode: the prefill's lookahead readies every
 *   sequence that decodes after it, the new one too) when the decode step frees nothing, and
 *   only there;
 * - blocks in use never exceed what admission reserved for the live sequences (a sequence
 *   decodes at most max_new - 1 tokens, and the lookahead takes only its next token's blocks),
 *   and every block is back in the pool at the end;
 * - with a pool too short for the next step's blocks the lookahead takes nothing and is not
 *   fatal; the step that follows (after a free) runs as without it.
 * Usage: test_decode_lookahead SHARED_DIR */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"

#define BT 8     /* tokens per block */
#define STEPS 40 /* decode steps of the schedule (the last frees the last two) */
#define NSEQ 6

struct plan {
    int64_t id;
    const char *spec; /* policy; NULL: a fork of fork_of */
    int32_t budget;
    int64_t prompt;
    int32_t max_new;
    int start; /* the decode step before which it is added */
    int64_t fork_of;
};

static const struct plan PLANS[NSEQ] = {
    {1, "full", 0, 61, 40, 0, 0},   {2, "full", 0, 37, 12, 0, 0},
    {3, "snapkv", 24, 83, 40, 0, 0}, {4, "uncomp", 24, 90, 33, 0, 0},
    {5, NULL, 0, 0, 14, 6, 1},      {6, "full", 0, 45, 20, 9, 0},
};

struct run {
    float *logits;         /* (STEPS, NSEQ, V): each decode's logits, 0 where none */
    bool lookahead[STEPS]; /* the step's info.lookahead */
    int64_t n_rows[STEPS];
    bool prefilled[STEPS]; /* a prompt was prefilled (prefill-only steps) before the decode */
    bool freed[STEPS];     /* the decode step freed a sequence */
};

static struct uc_engine *make_engine(struct uc_comm *comm, const char *shared, int64_t blocks,
                                     bool no_lookahead)
{
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, "uncomp-tiny"));
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = dir;
    ep.backend = tu_backend_params();
    ep.block_tokens = BT;
    ep.kv_blocks = blocks;
    ep.max_batch = 8;
    ep.no_lookahead = no_lookahead;
    ep.profile_path = "/nonexistent/uncomp_profile.json";
    struct uc_engine *e = NULL;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        fprintf(stderr, "cannot create the engine\n");
        exit(1);
    }
    return e;
}

static int32_t argmax_of(struct uc_engine *e, int64_t id, int64_t vocab)
{
    int64_t rows = 0;
    const float *lg = uc_engine_seq_logits(e, id, &rows);
    return lg ? tu_argmax(lg + (rows - 1) * vocab, vocab) : -1;
}

/* Runs the schedule; fills r. Returns the blocks admission reserved, summed over every
 * sequence (the pool the tight run gets). */
static int64_t run_schedule(struct uc_engine *e, struct run *r)
{
    const int64_t V = uc_engine_config(e)->vocab;
    int32_t pending[NSEQ] = {0}, made[NSEQ] = {0};
    int64_t reserved[NSEQ] = {0}, all_reserved = 0;
    bool live[NSEQ] = {false}, done[NSEQ] = {false};
    int32_t ids[128];
    for (int step = 0; step < STEPS; step++) {
        /* those that made max_new tokens end with this step (as the daemon frees them) */
        int64_t frees[NSEQ];
        int32_t n_free = 0;
        for (int i = 0; i < NSEQ; i++) {
            if (live[i] && made[i] == PLANS[i].max_new) {
                frees[n_free++] = PLANS[i].id;
                live[i] = false;
                done[i] = true;
            }
        }
        for (int i = 0; i < NSEQ; i++) {
            const struct plan *p = &PLANS[i];
            if (p->start != step || live[i] || done[i]) {
                continue;
            }
            struct uc_step_new nw = {.seq_id = p->id, .max_new_tokens = p->max_new};
            if (p->spec) {
                tu_prompt_ids(ids, p->prompt, 40 + (uint64_t)i);
                nw.cp = tu_spec(p->spec, p->budget);
                nw.n_prompt = p->prompt;
                nw.prompt = ids;
            } else {
                nw.flags = UC_SEQ_FORK;
                nw.fork_of = p->fork_of;
                nw.cp = tu_spec("full", 0);
            }
            reserved[i] = uc_engine_kv_blocks_needed(e, &nw);
            all_reserved += reserved[i];
            uc_status rc;
            if (p->spec) {
                rc = tu_prefill(e, p->id, ids, p->prompt, 0, &nw.cp, p->max_new);
                pending[i] = argmax_of(e, p->id, V);
            } else {
                struct uc_step s = {.op = UC_STEP_RUN, .n_new = 1, .news = &nw};
                rc = uc_engine_step(e, &s);
                int src = 0;
                while (PLANS[src].id != p->fork_of) {
                    src++;
                }
                pending[i] = pending[src]; /* it goes on from where its source is */
            }
            TU_CHECK(rc == UC_OK, "step %d: adding sequence %lld failed", step, (long long)p->id);
            live[i] = true;
            made[i] = 1;
            r->prefilled[step] = r->prefilled[step] || p->spec != NULL;
        }
        struct uc_step_decode dec[NSEQ];
        int who[NSEQ];
        int32_t n_dec = 0;
        for (int i = 0; i < NSEQ; i++) {
            if (live[i]) {
                who[n_dec] = i;
                dec[n_dec++] = (struct uc_step_decode){.seq_id = PLANS[i].id, .token = pending[i]};
            }
        }
        struct uc_step s = {.op = UC_STEP_RUN, .n_decode = n_dec, .decodes = dec,
                            .n_free = n_free, .frees = frees};
        TU_CHECK(uc_engine_step(e, &s) == UC_OK, "decode step %d failed", step);
        struct uc_engine_step_info info;
        uc_engine_last_step_info(e, &info);
        r->lookahead[step] = info.lookahead;
        r->n_rows[step] = n_dec;
        r->freed[step] = n_free > 0;
        for (int k = 0; k < n_dec; k++) {
            int i = who[k];
            int64_t rows = 0;
            const float *lg = uc_engine_seq_logits(e, PLANS[i].id, &rows);
            TU_CHECK(lg != NULL, "step %d: no logits for sequence %lld", step,
                     (long long)PLANS[i].id);
            if (lg) {
                memcpy(r->logits + ((int64_t)step * NSEQ + i) * V, lg + (rows - 1) * V,
                       (size_t)V * sizeof(float));
            }
            pending[i] = argmax_of(e, PLANS[i].id, V);
            made[i]++;
        }
        tu_check_reserved(e, step, live, reserved, NSEQ);
    }
    int64_t ids_all[NSEQ];
    for (int i = 0; i < NSEQ; i++) {
        ids_all[i] = PLANS[i].id;
    }
    tu_free_live(e, ids_all, live, NSEQ);
    return all_reserved;
}

/* A pool too short for the next step's blocks: the lookahead after a step takes none (and is
 * not fatal); the next step, which frees a filler sequence first, takes them itself. Returns
 * the logits of the two steps of sequence A, (2, V). */
static void short_pool(struct uc_comm *comm, const char *shared, bool no_lookahead, float *out)
{
    /* A: 63 tokens in 8 blocks a head (8 layers x 4 KV heads = 32 heads); its first decode
     * fills them, the second needs a block each. F fills the pool but for 10 blocks. */
    const int64_t heads = 32, a_blocks = 8 * heads, f_prompt = 9 * BT;
    const int64_t pool = a_blocks + (f_prompt / BT) * heads + 10;
    struct uc_engine *e = make_engine(comm, shared, pool, no_lookahead);
    const int64_t V = uc_engine_config(e)->vocab;
    int32_t ids[80];
    struct uc_compress_params full = tu_spec("full", 0);
    tu_prompt_ids(ids, 63, 77);
    TU_CHECK(tu_prefill(e, 1, ids, 63, 0, &full, 8) == UC_OK, "short pool: prefill A");
    int32_t tok = argmax_of(e, 1, V);
    tu_prompt_ids(ids, f_prompt, 78);
    TU_CHECK(tu_prefill(e, 2, ids, f_prompt, 0, &full, 0) == UC_OK, "short pool: prefill F");
    int64_t used = uc_engine_kv_blocks_used(e);
    TU_CHECK(pool - used == 10, "short pool: %lld blocks free, expected 10",
             (long long)(pool - used));
    struct uc_step_decode d = {.seq_id = 1, .token = tok};
    struct uc_step s = {.op = UC_STEP_RUN, .n_decode = 1, .decodes = &d};
    TU_CHECK(uc_engine_step(e, &s) == UC_OK, "short pool: first decode");
    TU_CHECK(uc_engine_kv_blocks_used(e) == used,
             "short pool: %lld blocks in use after the first decode, expected %lld (the "
             "lookahead cannot take 32 of 10)",
             (long long)uc_engine_kv_blocks_used(e), (long long)used);
    int64_t rows = 0;
    const float *lg = uc_engine_seq_logits(e, 1, &rows);
    memcpy(out, lg + (rows - 1) * V, (size_t)V * sizeof(float));
    d.token = argmax_of(e, 1, V);
    int64_t f = 2;
    s = (struct uc_step){.op = UC_STEP_RUN, .n_decode = 1, .decodes = &d, .n_free = 1,
                         .frees = &f};
    TU_CHECK(uc_engine_step(e, &s) == UC_OK, "short pool: second decode");
    struct uc_engine_step_info info;
    uc_engine_last_step_info(e, &info);
    TU_CHECK(!info.lookahead && info.blocks_taken == heads,
             "short pool: second decode took %lld blocks (lookahead %d), expected %lld in the "
             "step", (long long)info.blocks_taken, (int)info.lookahead, (long long)heads);
    lg = uc_engine_seq_logits(e, 1, &rows);
    memcpy(out + V, lg + (rows - 1) * V, (size_t)V * sizeof(float));
    uc_engine_destroy(e);
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 120000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    struct run on = {0}, off = {0};
    struct uc_engine *e = make_engine(comm, shared, 4096, false);
    const int64_t V = uc_engine_config(e)->vocab;
    size_t bytes = (size_t)STEPS * NSEQ * (size_t)V * sizeof(float);
    on.logits = uc_calloc(1, bytes);
    off.logits = uc_calloc(1, bytes);
    /* the roomy pool first, to learn what admission reserves; then both runs on exactly that */
    int64_t reserved = run_schedule(e, &on);
    uc_engine_destroy(e);
    memset(on.logits, 0, bytes);
    e = make_engine(comm, shared, reserved, false);
    run_schedule(e, &on);
    uc_engine_destroy(e);
    e = make_engine(comm, shared, reserved, true);
    run_schedule(e, &off);
    uc_engine_destroy(e);
    int first_diff = -1, used = 0;
    for (int step = 0; step < STEPS && first_diff < 0; step++) {
        if (memcmp(on.logits + (int64_t)step * NSEQ * V, off.logits + (int64_t)step * NSEQ * V,
                   (size_t)NSEQ * (size_t)V * sizeof(float)) != 0) {
            first_diff = step;
        }
    }
    TU_CHECK(first_diff < 0, "decode step %d: logits differ with the lookahead", first_diff);
    for (int step = 0; step < STEPS; step++) {
        /* used exactly where the step before was a decode of the same rows with nothing added
         * since (an end frees its sequence in the step, which changes the rows), or a prefill
         * whose lookahead took every live sequence when nothing is freed */
        bool added = false;
        for (int i = 0; i < NSEQ; i++) {
            added = added || PLANS[i].start == step;
        }
        bool want = (step > 0 && !added && off.n_rows[step] > 0 &&
                     off.n_rows[step] == off.n_rows[step - 1]) ||
                    (off.prefilled[step] && !off.freed[step]);
        TU_CHECK(!off.lookahead[step], "step %d: lookahead used while off", step);
        TU_CHECK(on.lookahead[step] == want, "step %d: lookahead %s", step,
                 want ? "not used after a decode of the same rows" : "used after the rows changed");
        used += on.lookahead[step];
    }
    float *sp_on = uc_malloc((size_t)(2 * V) * sizeof(float));
    float *sp_off = uc_malloc((size_t)(2 * V) * sizeof(float));
    short_pool(comm, shared, false, sp_on);
    short_pool(comm, shared, true, sp_off);
    TU_CHECK(memcmp(sp_on, sp_off, (size_t)(2 * V) * sizeof(float)) == 0,
             "short pool: logits differ with the lookahead");
    printf("lookahead: %d of %d decode steps; %lld blocks reserved in all\n", used, STEPS,
           (long long)reserved);
    uc_free(sp_on);
    uc_free(sp_off);
    uc_free(on.logits);
    uc_free(off.logits);
    uc_comm_destroy(comm);
    printf("%s: %d failure(s)\n", tu_failures ? "FAILED" : "PASSED", tu_failures);
    return tu_failures ? 1 : 0;
}
