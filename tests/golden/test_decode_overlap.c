/* The decode step in flight (shard/engine/next.c): a greedy decode step whose scheduler expects
 * the same batch again launches that step before the host reads its own tokens, fed by its
 * argmax on the backend. Checked on uncomp-tiny (blocks of 8 tokens, so heads cross block
 * boundaries often) by running one schedule of greedy steps, every one marked decode_again, on
 * an engine with the overlap and on one without (no_overlap):
 * - every decode step's tokens are the same on both, under a schedule that takes the step in
 *   flight as the next one (the same batch), takes it for fewer rows (a sequence that stopped
 *   is left out and freed; one is left out of a step while it goes on, so its heads go back a
 *   token and it decodes that token in a later step), discards it for a step that adds a
 *   sequence, and with full, snapkv, uncomp and streamingllm heads (the last evicting as it
 *   decodes, which the overlap leaves alone);
 * - the step in flight is taken exactly on the steps expected, and nothing is launched for a
 *   sequence at its last token (max_new) or when the scheduler does not expect the batch again;
 * - blocks in use never exceed what admission reserved for the live sequences, and every block
 *   is back in the pool at the end.
 * Usage: test_decode_overlap SHARED_DIR */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"

#define BT 8     /* tokens per block */
#define STEPS 36 /* decode steps of the schedule */
#define NSEQ 6

struct plan {
    int64_t id;
    const char *spec;
    int32_t budget;
    int64_t prompt;
    int32_t max_new; /* ends when it has made this many tokens (length) */
    int start;       /* the decode step before which it is added */
    int stop;        /* the step whose decode it leaves (an EOS: freed in that step); 0: none */
    int skip;        /* a step it is left out of while it goes on; 0: none */
};

static const struct plan PLANS[NSEQ] = {
    {1, "full", 0, 61, 40, 0, 0, 0},        {2, "snapkv", 24, 83, 9, 0, 0, 0},
    {3, "uncomp", 24, 90, 40, 0, 0, 12},    {4, "full", 0, 45, 13, 5, 0, 0},
    {5, "full", 0, 30, 40, 0, 21, 0},       {6, "streamingllm", 24, 50, 8, 27, 0, 0},
};

/* Whether the scheduler expects the batch again after this step: always but before step 27
 * (step 4 expects it and is wrong: a sequence is added before step 5). */
static bool quiet_before(int step) { return step + 1 != 27; }

struct run {
    int32_t tok[STEPS][NSEQ]; /* each decode's greedy token, -2 where none */
    bool overlapped[STEPS];
    enum uc_step_graph graph[STEPS];
};

static struct uc_engine *make_engine(struct uc_comm *comm, const char *shared, bool no_overlap)
{
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, "uncomp-tiny"));
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = dir;
    ep.backend = tu_backend_params();
    ep.block_tokens = BT;
    ep.kv_blocks = 4096;
    ep.max_batch = 8;
    ep.no_overlap = no_overlap;
    ep.overlap_sync = true; /* the CPU backend too (on it, no gain) */
    ep.profile_path = "/nonexistent/uncomp_profile.json";
    struct uc_engine *e = NULL;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        fprintf(stderr, "cannot create the engine\n");
        exit(1);
    }
    return e;
}

static void run_schedule(struct uc_engine *e, struct run *r)
{
    const int64_t V = uc_engine_config(e)->vocab;
    int32_t pending[NSEQ] = {0}, made[NSEQ] = {0};
    int64_t reserved[NSEQ] = {0};
    bool live[NSEQ] = {false}, done[NSEQ] = {false};
    int32_t ids[128];
    for (int step = 0; step < STEPS; step++) {
        int64_t frees[NSEQ];
        int32_t n_free = 0;
        for (int i = 0; i < NSEQ; i++) {
            bool stops = PLANS[i].stop > 0 && PLANS[i].stop == step; /* an EOS, say */
            if (live[i] && (made[i] == PLANS[i].max_new || stops)) {
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
            struct uc_step_new nw = {.seq_id = p->id, .max_new_tokens = p->max_new,
                                     .cp = tu_spec(p->spec, p->budget), .n_prompt = p->prompt,
                                     .prompt = ids};
            if (strcmp(p->spec, "streamingllm") == 0) {
                nw.cp.decode_mode = UC_DECODE_EVICT; /* its window slides as it decodes */
            }
            tu_prompt_ids(ids, p->prompt, 70 + (uint64_t)i);
            reserved[i] = uc_engine_kv_blocks_needed(e, &nw);
            TU_CHECK(tu_prefill(e, p->id, ids, p->prompt, 0, &nw.cp, p->max_new) == UC_OK,
                     "step %d: adding sequence %lld failed", step, (long long)p->id);
            int64_t rows = 0;
            const float *lg = uc_engine_seq_logits(e, p->id, &rows);
            pending[i] = lg ? tu_argmax(lg + (rows - 1) * V, V) : 0;
            live[i] = true;
            made[i] = 1;
        }
        struct uc_step_decode dec[NSEQ];
        int who[NSEQ];
        int32_t n_dec = 0;
        for (int i = 0; i < NSEQ; i++) {
            r->tok[step][i] = -2;
            if (live[i] && (PLANS[i].skip == 0 || PLANS[i].skip != step)) {
                who[n_dec] = i;
                dec[n_dec++] = (struct uc_step_decode){.seq_id = PLANS[i].id, .token = pending[i],
                                                       .flags = UC_DECODE_GREEDY};
            }
        }
        struct uc_step s = {.op = UC_STEP_RUN, .n_decode = n_dec, .decodes = dec,
                            .n_free = n_free, .frees = frees, .decode_again = quiet_before(step)};
        TU_CHECK(uc_engine_step(e, &s) == UC_OK, "decode step %d failed", step);
        struct uc_engine_step_info info;
        uc_engine_last_step_info(e, &info);
        r->overlapped[step] = info.overlapped;
        r->graph[step] = info.graph;
        for (int k = 0; k < n_dec; k++) {
            int i = who[k];
            int32_t t = -1;
            TU_CHECK(uc_engine_seq_greedy(e, PLANS[i].id, &t), "step %d: no token for %lld", step,
                     (long long)PLANS[i].id);
            r->tok[step][i] = t;
            pending[i] = t;
            made[i]++;
        }
        tu_check_reserved(e, step, live, reserved, NSEQ);
    }
    int64_t ids_all[NSEQ];
    for (int i = 0; i < NSEQ; i++) {
        ids_all[i] = PLANS[i].id;
    }
    tu_free_live(e, ids_all, live, NSEQ);
    TU_CHECK(!uc_engine_decode_in_flight(e), "a decode step still in flight after the frees");
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 120000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    static struct run on, off;
    struct uc_engine *e = make_engine(comm, shared, false);
    bool graphs = uc_engine_backend(e)->ops->graph_begin != NULL;
    run_schedule(e, &on);
    uc_engine_destroy(e);
    e = make_engine(comm, shared, true);
    run_schedule(e, &off);
    uc_engine_destroy(e);
    /* the steps not taken from a step in flight, and why */
    static const int not_taken[] = {
        0,  /* the first */
        5,  /* sequence 4 added: the step in flight discarded */
        8,  /* sequence 2 decoded its last token (max_new) in step 7: nothing launched */
        13, /* step 12 took fewer rows (sequence 3 left out): nothing launched behind it */
        17, /* sequence 4's last token in step 16 */
        22, /* step 21 took fewer rows (sequence 5 stopped) */
        27, /* step 26 did not expect the batch again; sequence 6 added */
        28, 29, 30, 31, 32, 33, 34, /* sequence 6 evicts (streamingllm) */
    };
    int taken = 0;
    for (int step = 0; step < STEPS; step++) {
        for (int i = 0; i < NSEQ; i++) {
            TU_CHECK(on.tok[step][i] == off.tok[step][i],
                     "step %d, sequence %lld: token %d with the overlap, %d without", step,
                     (long long)PLANS[i].id, on.tok[step][i], off.tok[step][i]);
        }
        TU_CHECK(!off.overlapped[step], "step %d: overlapped while off", step);
        bool want = true;
        for (size_t k = 0; k < sizeof not_taken / sizeof not_taken[0]; k++) {
            want = want && not_taken[k] != step;
        }
        /* with graphs, nothing is launched in flight whose graphs would be recorded (the
         * second step of a batch size), nor behind a step that recorded them */
        want = want && on.graph[step] != UC_STEP_GRAPH_RECORDED &&
               (step == 0 || on.graph[step - 1] != UC_STEP_GRAPH_RECORDED);
        TU_CHECK(on.overlapped[step] == want, "step %d: %s (graph %d, before it %d)", step,
                 want ? "not taken from the step in flight" : "taken from a step in flight",
                 (int)on.graph[step], step > 0 ? (int)on.graph[step - 1] : -1);
        taken += on.overlapped[step];
    }
    TU_CHECK(taken >= (graphs ? 10 : 22), "the step in flight was taken on %d of %d steps", taken,
             STEPS);
    printf("decode overlap: %d of %d steps taken from the step in flight; tokens equal\n", taken,
           STEPS);
    uc_comm_destroy(comm);
    return tu_failures ? 1 : 0;
}
