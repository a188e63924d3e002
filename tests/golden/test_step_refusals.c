/* The step's validation (shard/engine/step.c) and the engine's sequences by id (seq_map.c), on
 * uncomp-tiny: a step that decodes a sequence twice, adds one that exists, decodes one that is
 * not there or frees and decodes the same one is refused whole (UC_ERR_INVALID_ARG) and changes
 * nothing: the next valid step decodes the same rows to the same logits as an engine that never
 * saw the refusals; a refused step's marks do not refuse the next one. Then 48 sequences added
 * and freed in a scrambled order: each live one still decodes, each freed one is refused.
 * Usage: test_step_refusals SHARED_DIR */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"

#define NMANY 48

/* uncomp-tiny with room for every sequence of the test in one step */
static struct uc_engine *make_engine(struct uc_comm *comm, const char *shared)
{
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = tu_model_dir(shared, "uncomp-tiny");
    ep.backend = tu_backend_params();
    ep.kv_blocks = 4096;
    ep.max_batch = NMANY + 2;
    ep.profile_path = "/nonexistent/uncomp_profile.json"; /* full heads need none */
    struct uc_engine *e = NULL;
    TU_CHECK(uc_engine_create(&e, &ep, comm) == UC_OK, "cannot create the engine");
    if (!e) {
        exit(1);
    }
    return e;
}

/* A sequence of an n-token prompt, prefilled. */
static void add(struct uc_engine *e, int64_t id, int64_t n)
{
    int32_t ids[64];
    tu_hash_ids(ids, n);
    struct uc_compress_params cp = tu_spec("full", 0);
    TU_CHECK(tu_prefill(e, id, ids, n, 0, &cp, 64) == UC_OK, "prefill of %lld", (long long)id);
}

static uc_status step(struct uc_engine *e, const struct uc_step_decode *dec, int32_t n_dec,
                      const int64_t *frees, int32_t n_free, const struct uc_step_new *news,
                      int32_t n_new)
{
    struct uc_step s = {.op = UC_STEP_RUN, .n_decode = n_dec, .decodes = dec, .n_free = n_free,
                        .frees = frees, .n_new = n_new, .news = news};
    return uc_engine_step(e, &s);
}

/* Logits of the last row of seq `id` (V floats, copied). */
static float *logits_of(struct uc_engine *e, int64_t id, int64_t v)
{
    int64_t rows = 0;
    const float *lg = uc_engine_seq_logits(e, id, &rows);
    float *out = uc_calloc((size_t)v, sizeof(float));
    if (lg && out) {
        memcpy(out, lg + (rows - 1) * v, (size_t)v * sizeof(float));
    }
    TU_CHECK(lg != NULL, "no logits for %lld", (long long)id);
    return out;
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 120000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    struct uc_engine *e = make_engine(comm, shared), *ref = make_engine(comm, shared);
    const int64_t V = uc_engine_config(e)->vocab;
    for (int k = 0; k < 2; k++) {
        struct uc_engine *x = k ? ref : e;
        add(x, 1, 21);
        add(x, 2, 34);
    }
    const struct uc_step_decode twice[] = {{.seq_id = 1, .token = 5}, {.seq_id = 1, .token = 5}};
    const struct uc_step_decode unknown[] = {{.seq_id = 1, .token = 5}, {.seq_id = 9, .token = 5}};
    const struct uc_step_decode both[] = {{.seq_id = 1, .token = 5}, {.seq_id = 2, .token = 7}};
    const int64_t free1[] = {1};
    int32_t ids[8] = {0, 3, 4, 5, 6, 7, 8, 9};
    const struct uc_step_new again = {.seq_id = 2, .n_prompt = 8, .prompt = ids,
                                      .max_new_tokens = 4, .cp = tu_spec("full", 0)};
    TU_CHECK(step(e, twice, 2, NULL, 0, NULL, 0) == UC_ERR_INVALID_ARG,
             "a sequence decoded twice in a step was not refused");
    TU_CHECK(step(e, unknown, 2, NULL, 0, NULL, 0) == UC_ERR_INVALID_ARG,
             "a decode of a sequence that is not there was not refused");
    TU_CHECK(step(e, both, 2, NULL, 0, &again, 1) == UC_ERR_INVALID_ARG,
             "a new sequence with a live id was not refused");
    TU_CHECK(step(e, both, 2, free1, 1, NULL, 0) == UC_ERR_INVALID_ARG,
             "a sequence freed and decoded in one step was not refused");
    /* the same rows after the refusals: accepted, and as if nothing had been asked before */
    TU_CHECK(step(e, both, 2, NULL, 0, NULL, 0) == UC_OK, "a valid step after refusals failed");
    TU_CHECK(step(ref, both, 2, NULL, 0, NULL, 0) == UC_OK, "the reference's step failed");
    for (int64_t id = 1; id <= 2; id++) {
        float *a = logits_of(e, id, V), *b = logits_of(ref, id, V);
        TU_CHECK(memcmp(a, b, (size_t)V * sizeof(float)) == 0,
                 "sequence %lld: logits differ after refused steps", (long long)id);
        uc_free(a);
        uc_free(b);
    }
    uc_engine_destroy(ref);
    /* many sequences, freed in a scrambled order between decode steps of all that live */
    bool live[NMANY + 3] = {false};
    live[1] = live[2] = true;
    for (int64_t id = 3; id < NMANY + 3; id++) {
        add(e, id, 9 + id % 13);
        live[id] = true;
    }
    struct uc_rng rng;
    uc_rng_seed(&rng, 77);
    for (int round = 0; round < NMANY; round++) {
        int64_t victim = 1 + (int64_t)(uc_rng_next(&rng) % (NMANY + 2));
        while (!live[victim]) {
            victim = victim % (NMANY + 2) + 1;
        }
        struct uc_step_decode dec[NMANY + 2];
        int32_t n = 0;
        for (int64_t id = 1; id < NMANY + 3; id++) {
            if (live[id] && id != victim) {
                dec[n++] = (struct uc_step_decode){.seq_id = id, .token = 11};
            }
        }
        TU_CHECK(step(e, dec, n, &victim, 1, NULL, 0) == UC_OK, "round %d: freeing %lld and "
                 "decoding %d others failed", round, (long long)victim, n);
        live[victim] = false;
        const struct uc_step_decode gone = {.seq_id = victim, .token = 11};
        TU_CHECK(step(e, &gone, 1, NULL, 0, NULL, 0) == UC_ERR_INVALID_ARG,
                 "round %d: sequence %lld decoded after its free", round, (long long)victim);
        TU_CHECK(uc_engine_n_seqs(e) == n, "round %d: %lld sequences held, %d live", round,
                 (long long)uc_engine_n_seqs(e), n);
        if (n == 0) {
            break;
        }
    }
    uc_engine_destroy(e);
    uc_comm_destroy(comm);
    if (tu_failures) {
        fprintf(stderr, "FAIL: %d check(s)\n", tu_failures);
        return 1;
    }
    printf("step refusals and the sequence map: ok\n");
    return 0;
}
