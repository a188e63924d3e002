/* Unit tests for shard/kv_table.c on the CPU backend: after every sync, the arena in backend
 * memory holds each head's block ids (and a packed head's channels) at its offset, through
 * random steps of appends, trims, forks, copy-on-write, packed heads, shared layers, sequences
 * joining and leaving the batch and compactions; and steps of appends alone upload exactly the
 * new ids, not the tables. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <omp.h>

#include "backend.h"
#include "base/log.h"
#include "base/mem.h"
#include "kv_cache.h"
#include "kv_table.h"
#include "test_util.h"

enum { BT = 4, HD = 8, NB = 65536, L = 3, HKV = 2, MAX_SEQS = 24 };

struct tseq {
    bool live;
    struct uc_kv_seq kv;
    struct uc_kv_table_region r;
    int16_t share[L];
};

struct fixture {
    struct uc_backend *be;
    struct uc_kv_cache kv;
    struct uc_kv_table t;
    struct tseq s[MAX_SEQS];
    uint64_t rng;
};

static uint32_t rnd(struct fixture *f, uint32_t n)
{
    f->rng = f->rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(f->rng >> 33) % n;
}

static int setup(void **state)
{
    static struct fixture f;
    memset(&f, 0, sizeof f);
    struct uc_backend_params bp = uc_backend_default_params();
    bp.n_threads = 1;
    if (uc_backend_cpu_create(&f.be, &bp) != UC_OK ||
        uc_kv_cache_init(&f.kv, f.be, NB, BT, HD) != UC_OK) {
        return -1;
    }
    uc_kv_table_init(&f.t, f.be);
    f.rng = 12345;
    tu_log_errors = 0;
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    for (int i = 0; i < MAX_SEQS; i++) {
        if (f->s[i].live) {
            uc_kv_seq_fini(&f->kv, &f->s[i].kv);
            uc_kv_table_region_fini(&f->s[i].r);
        }
    }
    uc_kv_table_fini(&f->t);
    uc_kv_cache_fini(&f->kv);
    uc_backend_destroy(f->be);
    return 0;
}

static void seq_new(struct fixture *f, int i, int64_t n_tokens, bool packed, bool shared)
{
    struct tseq *s = &f->s[i];
    memset(s, 0, sizeof *s);
    assert_int_equal(uc_kv_seq_init(&s->kv, L, HKV), UC_OK);
    for (int l = 0; l < L; l++) {
        s->share[l] = (int16_t)(shared && l == 2 ? 1 : l);
    }
    static const int32_t chan[] = {0, 2, 3, 5, 7};
    for (int l = 0; l < L; l++) {
        for (int j = 0; j < HKV; j++) {
            struct uc_kv_head *h = uc_kv_seq_head(&s->kv, l, j);
            if (s->share[l] != l) {
                continue;
            }
            if (packed && j == 1) {
                assert_int_equal(uc_kv_head_set_packed(&f->kv, h, 5, chan), UC_OK);
            }
            int64_t n = n_tokens + (l + j) % 3; /* heads of different lengths */
            assert_int_equal(uc_kv_head_reserve(&f->kv, h, n), UC_OK);
            h->n_tokens = (int32_t)n;
        }
    }
    s->live = true;
}

static void seq_fork(struct fixture *f, int dst, int src)
{
    struct tseq *d = &f->s[dst], *s = &f->s[src];
    memset(d, 0, sizeof *d);
    assert_int_equal(uc_kv_seq_init(&d->kv, L, HKV), UC_OK);
    memcpy(d->share, s->share, sizeof d->share);
    int32_t cd[1], cs[1];
    for (int64_t i = 0; i < L * HKV; i++) {
        int64_t n = 0;
        if (s->share[i / HKV] == i / HKV) {
            assert_int_equal(uc_kv_head_fork(&f->kv, &d->kv.heads[i], &s->kv.heads[i], cd, cs, &n),
                             UC_OK);
        }
    }
    d->live = true;
}

static void seq_drop(struct fixture *f, int i)
{
    uc_kv_seq_fini(&f->kv, &f->s[i].kv);
    uc_kv_table_region_fini(&f->s[i].r);
    f->s[i].live = false;
}

/* Syncs the batch and checks the arena in backend memory against every head. */
static void sync_and_check(struct fixture *f, const int *batch, int nb)
{
    struct uc_kv_table_seq ts[MAX_SEQS];
    for (int b = 0; b < nb; b++) {
        struct tseq *s = &f->s[batch[b]];
        ts[b] = (struct uc_kv_table_seq){&s->kv, s->share, L, &s->r};
    }
    assert_int_equal(uc_kv_table_sync(&f->t, ts, nb), UC_OK);
    int32_t *dev = malloc((size_t)(f->t.cap > 0 ? f->t.cap : 1) * sizeof *dev);
    assert_non_null(dev);
    assert_int_equal(f->be->ops->download(f->be, dev, f->t.dev, (size_t)f->t.cap * sizeof *dev),
                     UC_OK);
    for (int b = 0; b < nb; b++) {
        struct tseq *s = &f->s[batch[b]];
        for (int64_t i = 0; i < L * HKV; i++) {
            const struct uc_kv_head *h = &s->kv.heads[i];
            const struct uc_kv_table_head *a = &s->r.heads[i];
            if (s->share[i / HKV] != i / HKV) {
                continue;
            }
            assert_true(a->off + a->cap + h->kdim <= f->t.cap);
            assert_memory_equal(dev + a->off, h->blocks, (size_t)h->n_blocks * sizeof *dev);
            if (h->kdim > 0) {
                assert_memory_equal(dev + a->off + a->cap, h->chan, (size_t)h->kdim * sizeof *dev);
            }
        }
    }
    free(dev);
}

/* Appends one token to every owning head of the batch's sequences. */
static void append_all(struct fixture *f, const int *batch, int nb)
{
    for (int b = 0; b < nb; b++) {
        struct tseq *s = &f->s[batch[b]];
        for (int64_t i = 0; i < L * HKV; i++) {
            struct uc_kv_head *h = &s->kv.heads[i];
            if (s->share[i / HKV] == i / HKV) {
                assert_int_equal(uc_kv_head_reserve(&f->kv, h, h->n_tokens + 1), UC_OK);
                h->n_tokens++;
            }
        }
    }
}

static void random_steps(struct fixture *f)
{
    for (int i = 0; i < 8; i++) {
        seq_new(f, i, 5 + 7 * i, i % 3 == 1, i % 4 == 2);
    }
    for (int step = 0; step < 400; step++) {
        int batch[MAX_SEQS], nb = 0;
        for (int i = 0; i < MAX_SEQS; i++) {
            if (f->s[i].live && rnd(f, 8) != 0) { /* now and then a sequence sits a step out */
                batch[nb++] = i;
            }
        }
        append_all(f, batch, nb);
        /* something other than an append, now and then */
        int i = (int)rnd(f, MAX_SEQS);
        struct tseq *s = &f->s[i];
        switch (rnd(f, 10)) {
        case 0: /* a trim (compression, eviction), then as many tokens again on other blocks */
            if (s->live && s->share[0] == 0) {
                struct uc_kv_head *h = &s->kv.heads[0], tmp = {0};
                int32_t n0 = h->n_tokens;
                h->n_tokens = n0 / 2;
                uc_kv_head_trim(&f->kv, h);
                assert_int_equal(uc_kv_head_reserve(&f->kv, &tmp, n0), UC_OK); /* takes them */
                assert_int_equal(uc_kv_head_reserve(&f->kv, h, n0), UC_OK);
                h->n_tokens = n0;
                uc_kv_head_trim(&f->kv, &tmp);
                uc_free(tmp.blocks);
            }
            break;
        case 1: { /* a fork, then copy-on-write of the source's shared blocks */
            int d = -1;
            for (int k = 0; k < MAX_SEQS && d < 0; k++) {
                d = f->s[k].live ? -1 : k;
            }
            if (s->live && d >= 0) {
                seq_fork(f, d, i);
                if (s->share[1] == 1) {
                    assert_int_equal(uc_kv_head_unshare(&f->kv, &s->kv.heads[HKV], 0), UC_OK);
                }
            }
            break;
        }
        case 2: /* a sequence ends */
            if (s->live && step % 3 == 0) {
                seq_drop(f, i);
            }
            break;
        case 3: /* a sequence joins */
            if (!s->live) {
                seq_new(f, i, 1 + (int64_t)rnd(f, 60), rnd(f, 2), rnd(f, 2));
            }
            break;
        default:
            break;
        }
        nb = 0;
        for (int k = 0; k < MAX_SEQS; k++) {
            if (f->s[k].live && rnd(f, 6) != 0) {
                batch[nb++] = k;
            }
        }
        sync_and_check(f, batch, nb);
    }
    print_message("400 steps: %lld compactions, %lld uploads, %lld ints\n",
                  (long long)f->t.n_compactions, (long long)f->t.n_uploads,
                  (long long)f->t.ints_uploaded);
    assert_true(f->t.n_compactions >= 2); /* the churn above made the arena compact */
}

static void test_random_steps(void **state) { random_steps(*state); }

/* The same with every whole region written by the OpenMP threads (at scale only a batch of
 * long sequences joining is; here every sync that writes one is), and every sync's sequences
 * looked over for what changed by them too (at scale a batch of 128 8B sequences or more). */
static void test_random_steps_parallel(void **state)
{
    struct fixture *f = *state;
    f->t.par_min = 1;
    f->t.par_min_heads = 1;
    omp_set_num_threads(4); /* the fixture's backend set one */
    random_steps(f);
    omp_set_num_threads(1);
}

static void test_appends_upload_new_ids(void **state)
{
    struct fixture *f = *state;
    f->t.merge_gap = 0; /* every span its own copy: what goes up is exactly what changed */
    int batch[16];
    for (int i = 0; i < 16; i++) {
        seq_new(f, i, 40 + 3 * i, false, false);
        batch[i] = i;
    }
    sync_and_check(f, batch, 16);
    int64_t before = f->t.ints_uploaded, tables = 0, new_ids = 0;
    for (int step = 0; step < 28; step++) { /* 7 blocks a head: inside its room */
        int64_t held = 0;
        for (int i = 0; i < 16; i++) {
            held += uc_kv_seq_blocks(&f->s[i].kv);
        }
        append_all(f, batch, 16);
        int64_t now = 0;
        for (int i = 0; i < 16; i++) {
            now += uc_kv_seq_blocks(&f->s[i].kv);
        }
        new_ids += now - held;
        tables += now;
        sync_and_check(f, batch, 16);
    }
    int64_t up = f->t.ints_uploaded - before;
    print_message("28 steps of appends: %lld ints uploaded for %lld new ids (%lld in the "
                  "tables)\n", (long long)up, (long long)new_ids, (long long)tables);
    assert_int_equal(up, new_ids);
    assert_true(up * 20 < tables);
    assert_int_equal(f->t.n_compactions, 1); /* the first sync only */
}

/* A batch crossing block boundaries together: each head appends one id, far from the others
 * (a region holds a head's room; here merge_gap is smaller than that distance, as the default
 * is against an 8B model's regions). Merged copies would carry the arena between the ids, or
 * one copy per id: the sync scatters (position, value) pairs in one upload instead. */
/* Steps of appends by 16 sequences of about n0 tokens: each step whose heads took blocks
 * uploads their new ids as one scatter of (position, value) pairs. */
static void check_appends_scatter(struct fixture *f, int64_t n0)
{
    int batch[16];
    for (int i = 0; i < 16; i++) {
        seq_new(f, i, n0 + 4 * i, false, false);
        batch[i] = i;
    }
    sync_and_check(f, batch, 16);
    for (int step = 0; step < 8; step++) {
        int64_t held = 0, now = 0;
        for (int i = 0; i < 16; i++) {
            held += uc_kv_seq_blocks(&f->s[i].kv);
        }
        append_all(f, batch, 16);
        for (int i = 0; i < 16; i++) {
            now += uc_kv_seq_blocks(&f->s[i].kv);
        }
        int64_t ints = f->t.ints_uploaded, copies = f->t.n_uploads;
        sync_and_check(f, batch, 16);
        if (now > held) { /* heads at a block boundary appended an id each */
            assert_true(now - held >= 16);
            assert_int_equal(f->t.n_uploads - copies, 1);
            assert_int_equal(f->t.ints_uploaded - ints, 2 * (now - held));
        }
    }
}

static void test_appends_scatter(void **state)
{
    struct fixture *f = *state;
    f->t.merge_gap = 8;
    check_appends_scatter(f, 40);
}

/* The same with the default merge gap, which is wider than the room between two heads' new
 * ids: their spans must stay apart until the upload weighs copies against a scatter (they were
 * joined as they were added, so a batch crossing a block boundary uploaded the whole arena
 * between its first and last new id). */
static void test_boundary_scatter_default_gap(void **state)
{
    struct fixture *f = *state;
    assert_int_equal(f->t.merge_gap, UC_KV_TABLE_MERGE_GAP);
    check_appends_scatter(f, 4 * 300);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_random_steps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_random_steps_parallel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_appends_upload_new_ids, setup, teardown),
        cmocka_unit_test_setup_teardown(test_appends_scatter, setup, teardown),
        cmocka_unit_test_setup_teardown(test_boundary_scatter_default_gap, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
