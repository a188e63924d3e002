/* Unit tests for shard/kv_cache.c on the CPU backend: block accounting (reserve, trim, free),
 * UC_ERR_KV_FULL with nothing allocated when the pool runs out, logical slots in position order
 * across non-contiguous blocks, uc_kv_head_remove shifting the later tokens (K and V data
 * written with kv_scatter and read back from pool memory), blocks freed by one sequence reused
 * by another, allocation failures, and forks: full blocks shared by reference count, the partly
 * filled last block copied, shared blocks returned to the pool only by their last holder, and
 * copy-on-write when a holder rewrites a shared block (eviction); packed heads (ThinK). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "base/log.h"
#include "base/mem.h"
#include "kv_cache.h"
#include "test_util.h"


enum { BT = 4, HD = 3, NB = 8 };

struct fixture {
    struct uc_backend *be;
    struct uc_kv_cache kv;
    int64_t blocks0;
};

static int setup(void **state)
{
    static struct fixture f;
    memset(&f, 0, sizeof f);
    f.blocks0 = uc_mem_blocks_in_use();
    struct uc_backend_params bp = uc_backend_default_params();
    bp.n_threads = 1;
    if (uc_backend_cpu_create(&f.be, &bp) != UC_OK) {
        return -1;
    }
    if (uc_kv_cache_init(&f.kv, f.be, NB, BT, HD) != UC_OK) {
        return -1;
    }
    tu_log_errors = 0;
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    uc_kv_cache_fini(&f->kv);
    uc_backend_destroy(f->be);
    /* everything the cache and backend took is back (a test that failed half-way may leave its
     * sequences behind: then this reports them too) */
    int64_t leaked = uc_mem_blocks_in_use() - f->blocks0;
    if (leaked != 0) {
        fprintf(stderr, "teardown: %lld blocks still allocated\n", (long long)leaked);
        return -1;
    }
    return 0;
}

/* The float K (or V) row stored at a slot of the pool. */
static const float *k_at(const struct uc_kv_cache *kv, int32_t slot)
{
    return (const float *)kv->pool.k + (int64_t)slot * HD;
}

static const float *v_at(const struct uc_kv_cache *kv, int32_t slot)
{
    return (const float *)kv->pool.v + (int64_t)slot * HD;
}

/* The rows a write of tokens `tags` scatters: token `tag`'s K row is {tag, tag + 0.25,
 * tag + 0.5}, its V row the negation, into the head's next slots. */
struct token_rows {
    float k[64 * HD], v[64 * HD];
    int32_t row[64], head[64], slot[64];
};

static void token_rows(struct token_rows *t, const struct uc_kv_cache *kv,
                       const struct uc_kv_head *h, const int32_t *tags, int32_t n)
{
    assert_true(n <= 64);
    for (int32_t i = 0; i < n; i++) {
        for (int d = 0; d < HD; d++) {
            t->k[i * HD + d] = (float)tags[i] + 0.25f * (float)d;
            t->v[i * HD + d] = -t->k[i * HD + d];
        }
        t->row[i] = i;
        t->head[i] = 0;
        t->slot[i] = uc_kv_head_slot(kv, h, h->n_tokens + i);
    }
}

static void write_tokens(struct uc_kv_cache *kv, struct uc_kv_head *h, const int32_t *tags,
                         int32_t n)
{
    struct token_rows t;
    token_rows(&t, kv, h, tags, n);
    assert_int_equal(kv->be->ops->kv_scatter(kv->be, &kv->pool, t.k, t.v, HD, t.row, t.head,
                                             t.slot, n),
                     UC_OK);
    h->n_tokens += n;
}

/* Checks that logical token i of h holds tags[i], reading the pool directly. */
static void assert_tokens(const struct uc_kv_cache *kv, const struct uc_kv_head *h,
                          const int32_t *tags, int32_t n)
{
    assert_int_equal(h->n_tokens, n);
    for (int32_t i = 0; i < n; i++) {
        int32_t s = uc_kv_head_slot(kv, h, i);
        for (int d = 0; d < HD; d++) {
            float want = (float)tags[i] + 0.25f * (float)d;
            if (k_at(kv, s)[d] != want || v_at(kv, s)[d] != -want) {
                fail_msg("token %d (slot %d) dim %d: K %g V %g, want tag %d", i, s, d,
                         (double)k_at(kv, s)[d], (double)v_at(kv, s)[d], tags[i]);
            }
        }
    }
}

static void test_init_and_sizes(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    assert_int_equal(kv->n_blocks, NB);
    assert_int_equal(kv->n_free, NB);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
    assert_int_equal(kv->bytes_per_block, 2 * BT * HD * sizeof(float));
    assert_int_equal(kv->pool.block_tokens, BT);
    assert_int_equal(kv->pool.head_dim, HD);
    assert_int_equal(uc_kv_blocks_for(kv, 0), 0);
    assert_int_equal(uc_kv_blocks_for(kv, 1), 1);
    assert_int_equal(uc_kv_blocks_for(kv, 4), 1);
    assert_int_equal(uc_kv_blocks_for(kv, 5), 2);
    assert_int_equal(uc_kv_blocks_for(kv, 32), 8);
    /* invalid shapes */
    struct uc_kv_cache bad;
    assert_int_equal(uc_kv_cache_init(&bad, f->be, 0, BT, HD), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_cache_init(&bad, f->be, NB, 0, HD), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_cache_init(&bad, f->be, NB, BT, 0), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_cache_init(&bad, f->be, INT32_MAX, BT, HD), UC_ERR_INVALID_ARG);
    uc_kv_cache_fini(&bad); /* fini of a failed init is safe */
    /* allocation failures: the free list, then each half of the pool */
    int64_t before = uc_mem_blocks_in_use();
    for (int64_t n = 1; n <= 3; n++) {
        uc_mem_fail_after(n);
        uc_status rc = uc_kv_cache_init(&bad, f->be, NB, BT, HD);
        uc_mem_fail_after(0);
        assert_int_equal(rc, UC_ERR_NOMEM);
        uc_kv_cache_fini(&bad);
        assert_int_equal(uc_mem_blocks_in_use(), before);
    }
}

static void test_reserve_trim_free(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq s;
    assert_int_equal(uc_kv_seq_init(&s, 2, 3), UC_OK);
    assert_int_equal(s.n_layers, 2);
    assert_int_equal(s.n_heads_kv, 3);
    struct uc_kv_head *h = uc_kv_seq_head(&s, 1, 2);
    assert_ptr_equal(h, &s.heads[5]);
    assert_int_equal(h->n_blocks, 0);

    assert_int_equal(uc_kv_head_reserve(kv, h, 5), UC_OK);
    assert_int_equal(h->n_blocks, 2);
    assert_int_equal(h->n_tokens, 0); /* reserve does not add tokens */
    assert_int_equal(h->blocks[0], 0); /* block 0 pops first */
    assert_int_equal(h->blocks[1], 1);
    assert_int_equal(uc_kv_used_blocks(kv), 2);
    assert_int_equal(uc_kv_head_reserve(kv, h, 8), UC_OK); /* still 2 blocks */
    assert_int_equal(uc_kv_used_blocks(kv), 2);
    assert_int_equal(uc_kv_head_reserve(kv, h, 0), UC_OK);
    assert_int_equal(h->n_blocks, 2);
    assert_int_equal(uc_kv_head_reserve(kv, h, 9), UC_OK);
    assert_int_equal(h->n_blocks, 3);
    assert_int_equal(h->blocks[2], 2);

    struct uc_kv_head *h2 = uc_kv_seq_head(&s, 0, 0);
    assert_int_equal(uc_kv_head_reserve(kv, h2, 1), UC_OK);
    assert_int_equal(h2->blocks[0], 3);
    assert_int_equal(uc_kv_seq_blocks(&s), 4);
    h->n_tokens = 9;
    h2->n_tokens = 1;
    assert_int_equal(uc_kv_seq_tokens(&s), 10);

    /* trim frees what n_tokens does not need, last block first */
    h->n_tokens = 4;
    uc_kv_head_trim(kv, h);
    assert_int_equal(h->n_blocks, 1);
    assert_int_equal(h->blocks[0], 0);
    assert_int_equal(uc_kv_used_blocks(kv), 2);
    uc_kv_head_trim(kv, h); /* idempotent */
    assert_int_equal(uc_kv_used_blocks(kv), 2);
    h->n_tokens = 0;
    uc_kv_head_trim(kv, h);
    assert_int_equal(h->n_blocks, 0);
    assert_int_equal(uc_kv_used_blocks(kv), 1);

    /* a long head grows its block table past its first capacity */
    assert_int_equal(uc_kv_head_reserve(kv, h, 7 * BT), UC_OK);
    assert_int_equal(h->n_blocks, 7);
    assert_true(h->cap_blocks >= 7);
    assert_int_equal(uc_kv_used_blocks(kv), NB);
    bool seen[NB] = {false};
    for (int b = 0; b < 7; b++) {
        assert_false(seen[h->blocks[b]]); /* no block handed out twice */
        seen[h->blocks[b]] = true;
    }
    assert_false(seen[h2->blocks[0]]);

    /* fini returns every block */
    uc_kv_seq_fini(kv, &s);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
    assert_null(s.heads);
    uc_kv_seq_fini(kv, &s); /* safe twice */
    assert_int_equal(kv->n_free, NB);
    assert_int_equal(tu_log_errors, 0);
}

static void test_kv_full(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq s;
    assert_int_equal(uc_kv_seq_init(&s, 1, 2), UC_OK);
    struct uc_kv_head *a = uc_kv_seq_head(&s, 0, 0), *b = uc_kv_seq_head(&s, 0, 1);
    assert_int_equal(uc_kv_head_reserve(kv, a, 3 * BT), UC_OK);
    /* 5 blocks left: 6 is too many, and nothing is taken */
    assert_int_equal(uc_kv_head_reserve(kv, b, 5 * BT + 1), UC_ERR_KV_FULL);
    assert_int_equal(b->n_blocks, 0);
    assert_int_equal(uc_kv_used_blocks(kv), 3);
    /* a head that already has some needs only the difference */
    assert_int_equal(uc_kv_head_reserve(kv, a, 9 * BT), UC_ERR_KV_FULL);
    assert_int_equal(a->n_blocks, 3);
    assert_int_equal(uc_kv_head_reserve(kv, a, 8 * BT), UC_OK);
    assert_int_equal(uc_kv_used_blocks(kv), NB);
    assert_int_equal(kv->n_free, 0);
    assert_int_equal(uc_kv_head_reserve(kv, b, 1), UC_ERR_KV_FULL);
    assert_int_equal(b->n_blocks, 0);
    assert_int_equal(uc_kv_head_reserve(kv, a, 8 * BT), UC_OK); /* nothing new needed */
    assert_int_equal(tu_log_errors, 0); /* retryable: the cache itself does not log */
    /* freeing makes room again */
    a->n_tokens = 6 * BT;
    uc_kv_head_trim(kv, a);
    assert_int_equal(uc_kv_head_reserve(kv, b, 2 * BT), UC_OK);
    assert_int_equal(uc_kv_used_blocks(kv), NB);
    uc_kv_seq_fini(kv, &s);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
}

/* Slots follow the block table: logical i in block i / BT at offset i % BT, even when the
 * head's blocks are not contiguous. */
static void test_slots_across_blocks(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq x, y;
    assert_int_equal(uc_kv_seq_init(&x, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&y, 1, 1), UC_OK);
    struct uc_kv_head *hx = uc_kv_seq_head(&x, 0, 0), *hy = uc_kv_seq_head(&y, 0, 0);
    assert_int_equal(uc_kv_head_reserve(kv, hx, BT), UC_OK);     /* block 0 */
    assert_int_equal(uc_kv_head_reserve(kv, hy, BT), UC_OK);     /* block 1 */
    assert_int_equal(uc_kv_head_reserve(kv, hx, 3 * BT), UC_OK); /* blocks 2, 3 */
    const int32_t want[12] = {0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int i = 0; i < 12; i++) {
        assert_int_equal(uc_kv_head_slot(kv, hx, i), want[i]);
    }
    assert_int_equal(uc_kv_head_slot(kv, hy, 3), 7);
    /* data written through the slots sits in position order, and y's block is untouched */
    int32_t tags[10], ty[2] = {100, 101};
    for (int i = 0; i < 10; i++) {
        tags[i] = i + 1;
    }
    write_tokens(kv, hy, ty, 2);
    write_tokens(kv, hx, tags, 6);
    write_tokens(kv, hx, tags + 6, 4); /* appended after the first 6 */
    assert_tokens(kv, hx, tags, 10);
    assert_tokens(kv, hy, ty, 2);
    assert_true(k_at(kv, 4)[0] == 100.0f); /* slot 4 = y's token 0 */
    uc_kv_seq_fini(kv, &x);
    uc_kv_seq_fini(kv, &y);
}

/* Removing logical token i shifts every later token down by one, across block boundaries, and
 * frees the last block once it is empty. */
static void test_head_remove(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq x, other;
    assert_int_equal(uc_kv_seq_init(&x, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&other, 1, 1), UC_OK);
    struct uc_kv_head *h = uc_kv_seq_head(&x, 0, 0), *ho = uc_kv_seq_head(&other, 0, 0);
    /* x holds blocks 0 and 2 (block 1 belongs to another sequence) */
    assert_int_equal(uc_kv_head_reserve(kv, h, 1), UC_OK);
    assert_int_equal(uc_kv_head_reserve(kv, ho, 1), UC_OK);
    assert_int_equal(uc_kv_head_reserve(kv, h, 7), UC_OK);
    assert_int_equal(h->blocks[1], 2);
    int32_t tags[7] = {10, 11, 12, 13, 14, 15, 16}, to[3] = {90, 91, 92};
    write_tokens(kv, h, tags, 7);
    write_tokens(kv, ho, to, 3);

    assert_int_equal(uc_kv_head_remove(kv, h, 2), UC_OK);
    const int32_t w1[6] = {10, 11, 13, 14, 15, 16};
    assert_tokens(kv, h, w1, 6);
    assert_int_equal(h->n_blocks, 2);
    /* the first token */
    assert_int_equal(uc_kv_head_remove(kv, h, 0), UC_OK);
    const int32_t w2[5] = {11, 13, 14, 15, 16};
    assert_tokens(kv, h, w2, 5);
    assert_int_equal(h->n_blocks, 2);
    assert_int_equal(uc_kv_used_blocks(kv), 3);
    /* down to 4 tokens: the second block is returned */
    assert_int_equal(uc_kv_head_remove(kv, h, 3), UC_OK);
    const int32_t w3[4] = {11, 13, 14, 16};
    assert_tokens(kv, h, w3, 4);
    assert_int_equal(h->n_blocks, 1);
    assert_int_equal(uc_kv_used_blocks(kv), 2);
    /* the last token: nothing moves */
    assert_int_equal(uc_kv_head_remove(kv, h, 3), UC_OK);
    assert_tokens(kv, h, w3, 3);
    /* the other sequence's block never changed */
    assert_tokens(kv, ho, to, 3);
    uc_kv_seq_fini(kv, &x);
    uc_kv_seq_fini(kv, &other);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
}

/* Blocks a finished sequence frees go to the next sequence (most recently freed first). */
static void test_freed_blocks_reused(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq a, b, c;
    assert_int_equal(uc_kv_seq_init(&a, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&b, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&c, 1, 1), UC_OK);
    struct uc_kv_head *ha = uc_kv_seq_head(&a, 0, 0), *hb = uc_kv_seq_head(&b, 0, 0),
                      *hc = uc_kv_seq_head(&c, 0, 0);
    assert_int_equal(uc_kv_head_reserve(kv, ha, 4 * BT), UC_OK); /* 0..3 */
    assert_int_equal(uc_kv_head_reserve(kv, hb, 4 * BT), UC_OK); /* 4..7 */
    assert_int_equal(uc_kv_head_reserve(kv, hc, 1), UC_ERR_KV_FULL);
    int32_t tags[4] = {1, 2, 3, 4};
    write_tokens(kv, ha, tags, 4);
    uc_kv_seq_fini(kv, &a);
    assert_int_equal(uc_kv_used_blocks(kv), 4);
    assert_int_equal(uc_kv_head_reserve(kv, hc, 4 * BT), UC_OK);
    bool mine[NB] = {false};
    for (int i = 0; i < 4; i++) {
        assert_true(hc->blocks[i] >= 0 && hc->blocks[i] < 4); /* a's old blocks */
        assert_false(mine[hc->blocks[i]]);
        mine[hc->blocks[i]] = true;
    }
    assert_int_equal(hc->blocks[0], 3); /* LIFO: a's last block, freed last */
    /* new data overwrites the old */
    int32_t t2[5] = {50, 51, 52, 53, 54};
    write_tokens(kv, hc, t2, 5);
    assert_tokens(kv, hc, t2, 5);
    assert_int_equal(uc_kv_head_reserve(kv, hc, 4 * BT + 1), UC_ERR_KV_FULL);
    uc_kv_seq_fini(kv, &b);
    uc_kv_seq_fini(kv, &c);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
}

/* A sequence of UC_KV_PARALLEL_MIN_BLOCKS blocks or more goes back on several threads while no
 * block is shared: every one of its blocks returns exactly once (the free list holds each id
 * once, none held), the other sequence's blocks stay held, and the whole pool can be taken
 * again; with a fork sharing its blocks the same free runs on one thread and leaves the
 * fork's blocks held. */
static void test_long_sequence_freed(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache kv;
    enum { L = 4, H = 8, PER = UC_KV_PARALLEL_MIN_BLOCKS / (L * H) + 7, TOTAL = 3 * L * H * PER };
    assert_int_equal(uc_kv_cache_init(&kv, f->be, TOTAL, 1, 1), UC_OK);
    struct uc_kv_seq a, b, c;
    assert_int_equal(uc_kv_seq_init(&a, L, H), UC_OK);
    assert_int_equal(uc_kv_seq_init(&b, 1, 1), UC_OK);
    for (int64_t i = 0; i < L * H; i++) {
        assert_int_equal(uc_kv_head_reserve(&kv, &a.heads[i], PER), UC_OK);
        a.heads[i].n_tokens = PER;
    }
    assert_int_equal(uc_kv_head_reserve(&kv, &b.heads[0], 5), UC_OK);
    assert_true(uc_kv_seq_blocks(&a) >= UC_KV_PARALLEL_MIN_BLOCKS);
    uc_kv_seq_fini(&kv, &a);
    assert_int_equal(uc_kv_used_blocks(&kv), 5);
    uint8_t *seen = calloc(TOTAL, 1);
    assert_non_null(seen);
    for (int64_t i = 0; i < kv.n_free; i++) {
        int32_t id = kv.free_list[i];
        assert_true(id >= 0 && id < TOTAL);
        assert_int_equal(seen[id], 0);
        seen[id] = 1;
        assert_int_equal(kv.refs[id], 0);
    }
    for (int32_t i = 0; i < b.heads[0].n_blocks; i++) {
        assert_int_equal(seen[b.heads[0].blocks[i]], 0);
        assert_int_equal(kv.refs[b.heads[0].blocks[i]], 1);
    }
    free(seen);
    /* shared blocks: a fork of a long sequence, the original freed, the fork's blocks held */
    assert_int_equal(uc_kv_seq_init(&a, L, H), UC_OK);
    assert_int_equal(uc_kv_seq_init(&c, L, H), UC_OK);
    for (int64_t i = 0; i < L * H; i++) {
        assert_int_equal(uc_kv_head_reserve(&kv, &a.heads[i], PER), UC_OK);
        a.heads[i].n_tokens = PER;
        int32_t cd, cs;
        int64_t n_copy = 0;
        assert_int_equal(uc_kv_head_fork(&kv, &c.heads[i], &a.heads[i], &cd, &cs, &n_copy), UC_OK);
        assert_int_equal(n_copy, 0); /* one-token blocks: all full, all shared */
    }
    assert_true(uc_kv_shared_blocks(&kv) > 0);
    uc_kv_seq_fini(&kv, &a);
    assert_int_equal(uc_kv_shared_blocks(&kv), 0);
    assert_int_equal(uc_kv_used_blocks(&kv), 5 + uc_kv_seq_blocks(&c));
    uc_kv_seq_fini(&kv, &c);
    uc_kv_seq_fini(&kv, &b);
    assert_int_equal(uc_kv_used_blocks(&kv), 0);
    uc_kv_cache_fini(&kv);
}

static void test_allocation_failures(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    int64_t before = uc_mem_blocks_in_use();
    struct uc_kv_seq s;
    uc_mem_fail_after(1);
    assert_int_equal(uc_kv_seq_init(&s, 2, 2), UC_ERR_NOMEM);
    uc_mem_fail_after(0);
    assert_null(s.heads);
    assert_int_equal(uc_mem_blocks_in_use(), before);
    assert_int_equal(uc_kv_seq_init(&s, 2, 2), UC_OK);
    struct uc_kv_head *h = uc_kv_seq_head(&s, 0, 0);
    /* the block table cannot grow: NOMEM, and no block leaves the pool */
    uc_mem_fail_after(1);
    assert_int_equal(uc_kv_head_reserve(kv, h, 2), UC_ERR_NOMEM);
    uc_mem_fail_after(0);
    assert_int_equal(h->n_blocks, 0);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
    assert_int_equal(uc_kv_head_reserve(kv, h, BT), UC_OK);
    int64_t cap = h->cap_blocks; /* a table with room for a few more */
    assert_true(cap > 1 && cap < NB);
    assert_int_equal(uc_kv_head_reserve(kv, h, cap * BT), UC_OK);
    uc_mem_fail_after(1);
    assert_int_equal(uc_kv_head_reserve(kv, h, (cap + 1) * BT), UC_ERR_NOMEM); /* grows */
    uc_mem_fail_after(0);
    assert_int_equal(h->n_blocks, cap);
    assert_int_equal(uc_kv_used_blocks(kv), cap);
    uc_kv_seq_fini(kv, &s);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
    assert_int_equal(uc_mem_blocks_in_use(), before);
}

/* A head reserved for a whole prompt has room in its table for the decode that follows: a
 * prompt of a power-of-two number of blocks (8192 tokens at 16 a block) left none, and the
 * first decode step of a batch reallocated every head's table (8,192 tables at batch 32). */
static void test_table_room_after_prompt(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache kv;
    assert_int_equal(uc_kv_cache_init(&kv, f->kv.be, 128, BT, HD), UC_OK);
    struct uc_kv_seq s;
    assert_int_equal(uc_kv_seq_init(&s, 1, 1), UC_OK);
    struct uc_kv_head *h = uc_kv_seq_head(&s, 0, 0);
    assert_int_equal(uc_kv_head_reserve(&kv, h, 64 * BT), UC_OK);
    const int32_t *table = h->blocks;
    assert_true(h->cap_blocks >= 64 + 64 / 4);
    for (int64_t n = 64 * BT + 1; n <= 80 * BT; n++) {
        assert_int_equal(uc_kv_head_reserve(&kv, h, n), UC_OK);
    }
    assert_ptr_equal(h->blocks, table); /* no reallocation on the way */
    uc_kv_seq_fini(&kv, &s);
    uc_kv_cache_fini(&kv);
}

/* Reserving many heads at once (room, then the blocks taken in one piece, then handed out, as
 * a decode step whose batch crosses a block boundary does on several threads) gives every head
 * the ids that uc_kv_head_reserve one head after another gives it, and the same accounting. */
static void test_taken_blocks_match_reserve(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache kv[2];
    struct uc_kv_seq s[2];
    enum { HEADS = 6 };
    /* the tokens each head holds before the step: some start a block with the next token */
    static const int64_t held[HEADS] = {BT, 2 * BT, BT - 1, 0, 3 * BT, BT + 2};
    for (int w = 0; w < 2; w++) {
        assert_int_equal(uc_kv_cache_init(&kv[w], f->kv.be, 64, BT, HD), UC_OK);
        assert_int_equal(uc_kv_seq_init(&s[w], 2, 3), UC_OK);
        for (int i = 0; i < HEADS; i++) {
            s[w].heads[i].n_tokens = 0;
            assert_int_equal(uc_kv_head_reserve(&kv[w], &s[w].heads[i], held[i]), UC_OK);
            s[w].heads[i].n_tokens = (int32_t)held[i];
        }
    }
    /* way 0: one head after another */
    for (int i = 0; i < HEADS; i++) {
        assert_int_equal(uc_kv_head_reserve(&kv[0], &s[0].heads[i], held[i] + 1), UC_OK);
    }
    /* way 1: room, take, hand out */
    int64_t need = 0;
    for (int i = 0; i < HEADS; i++) {
        struct uc_kv_head *h = &s[1].heads[i];
        int64_t blocks = uc_kv_head_blocks_for(&kv[1], h, held[i] + 1);
        need += blocks > h->n_blocks ? blocks - h->n_blocks : 0;
        assert_int_equal(uc_kv_head_make_room(h, blocks), UC_OK);
    }
    assert_int_equal(need, 4); /* the heads at 0, BT, 2 BT and 3 BT tokens */
    int32_t ids[HEADS] = {0};
    assert_false(uc_kv_take_blocks(&kv[1], kv[1].n_free + 1, ids)); /* too many: none taken */
    assert_int_equal(uc_kv_used_blocks(&kv[1]), uc_kv_used_blocks(&kv[0]) - need);
    assert_true(uc_kv_take_blocks(&kv[1], need, ids));
    const int32_t *next = ids;
    for (int i = 0; i < HEADS; i++) {
        next += uc_kv_head_add_taken(&kv[1], &s[1].heads[i], held[i] + 1, next);
    }
    assert_int_equal(next - ids, need);
    assert_int_equal(uc_kv_used_blocks(&kv[1]), uc_kv_used_blocks(&kv[0]));
    for (int i = 0; i < HEADS; i++) {
        assert_int_equal(s[1].heads[i].n_blocks, s[0].heads[i].n_blocks);
        for (int j = 0; j < s[0].heads[i].n_blocks; j++) {
            assert_int_equal(s[1].heads[i].blocks[j], s[0].heads[i].blocks[j]);
        }
    }
    for (int w = 0; w < 2; w++) {
        uc_kv_seq_fini(&kv[w], &s[w]);
        assert_int_equal(uc_kv_used_blocks(&kv[w]), 0); /* every taken block came back */
        uc_kv_cache_fini(&kv[w]);
    }
}

/* Copies the blocks uc_kv_head_fork listed, as the engine does after forking every head. */
static void fork_head(struct uc_kv_cache *kv, struct uc_kv_head *dst, const struct uc_kv_head *src)
{
    int32_t cd[2], cs[2];
    int64_t n = 0;
    assert_int_equal(uc_kv_head_fork(kv, dst, src, cd, cs, &n), UC_OK);
    assert_true(n <= 1);
    assert_int_equal(kv->be->ops->kv_copy_blocks(kv->be, &kv->pool, cd, cs, n), UC_OK);
}

/* issue 12: a fork shares the full blocks (one copy of the prompt in the pool) and copies only
 * the partly filled last block; both append into blocks of their own; the shared blocks stay
 * until their last holder is gone, whichever ends first. */
static void test_fork_shares_full_blocks(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq a, b, c;
    assert_int_equal(uc_kv_seq_init(&a, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&b, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&c, 1, 1), UC_OK);
    struct uc_kv_head *ha = uc_kv_seq_head(&a, 0, 0), *hb = uc_kv_seq_head(&b, 0, 0),
                      *hc = uc_kv_seq_head(&c, 0, 0);
    int32_t tags[10] = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
    assert_int_equal(uc_kv_head_reserve(kv, ha, 10), UC_OK); /* 2 full blocks + 2 tokens */
    write_tokens(kv, ha, tags, 10);
    assert_int_equal(uc_kv_used_blocks(kv), 3);
    fork_head(kv, hb, ha);
    fork_head(kv, hc, ha);
    /* 3 + one copied last block per fork, not 3 x 3 */
    assert_int_equal(uc_kv_used_blocks(kv), 5);
    assert_int_equal(uc_kv_shared_blocks(kv), 2);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(hb->blocks[i], ha->blocks[i]);
        assert_int_equal(hc->blocks[i], ha->blocks[i]);
        assert_true(uc_kv_block_shared(kv, ha->blocks[i]));
    }
    assert_true(hb->blocks[2] != ha->blocks[2] && hc->blocks[2] != ha->blocks[2] &&
                hb->blocks[2] != hc->blocks[2]);
    assert_false(uc_kv_block_shared(kv, ha->blocks[2]));
    assert_int_equal(uc_kv_seq_blocks(&b), 3); /* what each holds, shared blocks included */
    assert_tokens(kv, hb, tags, 10);
    assert_tokens(kv, hc, tags, 10);
    /* each appends its own tokens: into its own last block, then a new one */
    int32_t ta[13], tb[13];
    memcpy(ta, tags, sizeof tags);
    memcpy(tb, tags, sizeof tags);
    int32_t add_a[3] = {20, 21, 22}, add_b[3] = {70, 71, 72};
    memcpy(ta + 10, add_a, sizeof add_a);
    memcpy(tb + 10, add_b, sizeof add_b);
    assert_int_equal(uc_kv_head_reserve(kv, ha, 13), UC_OK);
    write_tokens(kv, ha, add_a, 3);
    assert_int_equal(uc_kv_head_reserve(kv, hb, 13), UC_OK);
    write_tokens(kv, hb, add_b, 3);
    assert_tokens(kv, ha, ta, 13);
    assert_tokens(kv, hb, tb, 13);
    assert_tokens(kv, hc, tags, 10);
    assert_int_equal(uc_kv_used_blocks(kv), 7);
    /* the source ends first: its own blocks return, the shared ones stay with the forks */
    int32_t shared0 = ha->blocks[0];
    uc_kv_seq_fini(kv, &a);
    assert_int_equal(uc_kv_used_blocks(kv), 5);
    assert_int_equal(uc_kv_shared_blocks(kv), 2);
    assert_tokens(kv, hb, tb, 13);
    assert_tokens(kv, hc, tags, 10);
    uc_kv_seq_fini(kv, &c);
    assert_int_equal(uc_kv_used_blocks(kv), 4); /* b alone: 2 formerly shared + 2 own */
    assert_int_equal(uc_kv_shared_blocks(kv), 0);
    assert_false(uc_kv_block_shared(kv, shared0));
    assert_tokens(kv, hb, tb, 13);
    uc_kv_seq_fini(kv, &b);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
    assert_int_equal(kv->n_free, NB);
    /* every block is back exactly once */
    bool seen[NB] = {false};
    for (int64_t i = 0; i < kv->n_free; i++) {
        assert_false(seen[kv->free_list[i]]);
        seen[kv->free_list[i]] = true;
    }
}

/* A head whose tokens fill whole blocks is shared entirely; forking needs a free block only for
 * a partly filled last block, and fails with nothing changed when there is none. */
static void test_fork_full_head_and_kv_full(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq a, b, c;
    assert_int_equal(uc_kv_seq_init(&a, 1, 2), UC_OK);
    assert_int_equal(uc_kv_seq_init(&b, 1, 2), UC_OK);
    assert_int_equal(uc_kv_seq_init(&c, 1, 2), UC_OK);
    struct uc_kv_head *a0 = uc_kv_seq_head(&a, 0, 0), *a1 = uc_kv_seq_head(&a, 0, 1);
    int32_t tags[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    assert_int_equal(uc_kv_head_reserve(kv, a0, 2 * BT), UC_OK);
    write_tokens(kv, a0, tags, 2 * BT);
    assert_int_equal(uc_kv_head_reserve(kv, a1, 5 * BT + 1), UC_OK); /* the pool is full */
    write_tokens(kv, a1, tags, 1);
    a1->n_tokens = 5 * BT + 1; /* the rest stays unwritten: only counts matter here */
    assert_int_equal(uc_kv_used_blocks(kv), NB);
    fork_head(kv, uc_kv_seq_head(&b, 0, 0), a0); /* whole blocks: no block needed */
    assert_int_equal(uc_kv_used_blocks(kv), NB);
    assert_tokens(kv, uc_kv_seq_head(&b, 0, 0), tags, 2 * BT);
    int32_t cd[1], cs[1];
    int64_t n = 0;
    assert_int_equal(uc_kv_head_fork(kv, uc_kv_seq_head(&b, 0, 1), a1, cd, cs, &n),
                     UC_ERR_KV_FULL);
    assert_int_equal(n, 0);
    assert_int_equal(uc_kv_seq_head(&b, 0, 1)->n_blocks, 0);
    assert_int_equal(uc_kv_seq_head(&b, 0, 1)->n_tokens, 0);
    assert_int_equal(uc_kv_shared_blocks(kv), 2);
    /* forking into a head that already holds blocks is refused */
    assert_int_equal(uc_kv_head_fork(kv, uc_kv_seq_head(&b, 0, 0), a0, cd, cs, &n),
                     UC_ERR_INVALID_ARG);
    /* a failed table allocation changes nothing either */
    uc_mem_fail_after(1);
    assert_int_equal(uc_kv_head_fork(kv, uc_kv_seq_head(&c, 0, 0), a0, cd, cs, &n),
                     UC_ERR_NOMEM);
    uc_mem_fail_after(0);
    assert_int_equal(uc_kv_shared_blocks(kv), 2);
    assert_int_equal(kv->refs[a0->blocks[0]], 2);
    uc_kv_seq_fini(kv, &a);
    assert_int_equal(uc_kv_used_blocks(kv), 2);
    uc_kv_seq_fini(kv, &b);
    uc_kv_seq_fini(kv, &c);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
}

/* Eviction rewrites the slots after the removed token: a holder of shared blocks first gets its
 * own copies of them (from the removed token's block on), and the other holders keep theirs. */
static void test_remove_unshares(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq a, b;
    assert_int_equal(uc_kv_seq_init(&a, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&b, 1, 1), UC_OK);
    struct uc_kv_head *ha = uc_kv_seq_head(&a, 0, 0), *hb = uc_kv_seq_head(&b, 0, 0);
    int32_t tags[12] = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21};
    assert_int_equal(uc_kv_head_reserve(kv, ha, 12), UC_OK);
    write_tokens(kv, ha, tags, 12);
    fork_head(kv, hb, ha); /* all 3 blocks shared */
    assert_int_equal(uc_kv_used_blocks(kv), 3);
    assert_int_equal(uc_kv_shared_blocks(kv), 3);
    /* b drops token 6 (block 1): blocks 1 and 2 become b's own, block 0 stays shared */
    assert_int_equal(uc_kv_head_remove(kv, hb, 6), UC_OK);
    const int32_t wb[11] = {10, 11, 12, 13, 14, 15, 17, 18, 19, 20, 21};
    assert_tokens(kv, hb, wb, 11);
    assert_tokens(kv, ha, tags, 12);
    assert_int_equal(hb->blocks[0], ha->blocks[0]);
    assert_true(hb->blocks[1] != ha->blocks[1] && hb->blocks[2] != ha->blocks[2]);
    assert_int_equal(uc_kv_shared_blocks(kv), 1);
    assert_int_equal(uc_kv_used_blocks(kv), 5);
    /* a drops token 0: its block 0 is copied too; nothing is shared any more */
    assert_int_equal(uc_kv_head_remove(kv, ha, 0), UC_OK);
    assert_tokens(kv, ha, tags + 1, 11);
    assert_tokens(kv, hb, wb, 11);
    assert_int_equal(uc_kv_shared_blocks(kv), 0);
    assert_int_equal(uc_kv_used_blocks(kv), 6);
    /* with the pool full, a remove that would need a copy is refused and changes nothing */
    struct uc_kv_seq c, d;
    assert_int_equal(uc_kv_seq_init(&c, 1, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&d, 1, 1), UC_OK);
    struct uc_kv_head *hc = uc_kv_seq_head(&c, 0, 0), *hd = uc_kv_seq_head(&d, 0, 0);
    assert_int_equal(uc_kv_head_reserve(kv, hc, 2 * BT), UC_OK);
    write_tokens(kv, hc, tags, 2 * BT);
    fork_head(kv, hd, hc);
    assert_int_equal(uc_kv_used_blocks(kv), NB);
    assert_int_equal(uc_kv_head_remove(kv, hd, 1), UC_ERR_KV_FULL);
    assert_tokens(kv, hd, tags, 2 * BT);
    assert_tokens(kv, hc, tags, 2 * BT);
    /* its last token: only the block holding it is copied, the first stays shared */
    uc_kv_seq_fini(kv, &a);
    assert_int_equal(uc_kv_head_remove(kv, hd, 2 * BT - 1), UC_OK);
    assert_tokens(kv, hd, tags, 2 * BT - 1);
    assert_tokens(kv, hc, tags, 2 * BT);
    assert_int_equal(uc_kv_shared_blocks(kv), 1);
    uc_kv_seq_fini(kv, &b);
    uc_kv_seq_fini(kv, &c);
    uc_kv_seq_fini(kv, &d);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
    assert_int_equal(uc_kv_shared_blocks(kv), 0);
}

/* Element i of packed row `slot` of a head keeping kdim key channels, read from the pool by
 * the layout backend.h describes (a block's K area then its V area as one stream of rows of
 * kdim + HD values). */
static float packed_read(const struct uc_kv_cache *kv, int64_t kdim, int32_t slot, int64_t i)
{
    int64_t tpb = 2 * BT * HD / (kdim + HD), per = BT * HD;
    int64_t b = slot / tpb, at = (slot % tpb) * (kdim + HD) + i;
    return at < per ? ((const float *)kv->pool.k)[b * per + at]
                    : ((const float *)kv->pool.v)[b * per + at - per];
}

/* Token `tag` as write_tokens makes it, into a packed head through kv_scatter_packed. */
static void write_packed(struct uc_kv_cache *kv, struct uc_kv_head *h, const int32_t *tags,
                         int32_t n)
{
    struct token_rows t;
    token_rows(&t, kv, h, tags, n);
    assert_int_equal(kv->be->ops->kv_scatter_packed(kv->be, &kv->pool, t.k, t.v, HD, t.row,
                                                    t.head, t.slot, n, h->kdim, h->chan),
                     UC_OK);
    h->n_tokens += n;
}

/* Logical token i of packed head h holds tags[i]: its kept key channels, then its V row. */
static void assert_packed(const struct uc_kv_cache *kv, const struct uc_kv_head *h,
                          const int32_t *tags, int32_t n)
{
    assert_int_equal(h->n_tokens, n);
    for (int32_t i = 0; i < n; i++) {
        int32_t s = uc_kv_head_slot(kv, h, i);
        for (int32_t c = 0; c < h->kdim; c++) {
            float want = (float)tags[i] + 0.25f * (float)h->chan[c];
            if (packed_read(kv, h->kdim, s, c) != want) {
                fail_msg("token %d (slot %d) key channel %d: %g, want tag %d", i, s, h->chan[c],
                         (double)packed_read(kv, h->kdim, s, c), tags[i]);
            }
        }
        for (int d = 0; d < HD; d++) {
            float want = -((float)tags[i] + 0.25f * (float)d);
            if (packed_read(kv, h->kdim, s, h->kdim + d) != want) {
                fail_msg("token %d (slot %d) value %d: %g, want tag %d", i, s, d,
                         (double)packed_read(kv, h->kdim, s, h->kdim + d), tags[i]);
            }
        }
    }
}

/* issue 15 (ThinK): a packed head keeps kdim of the D key channels in rows of kdim + D values,
 * so its blocks hold more tokens (kdim 1 of 3: 6 per block instead of 4); its slots, reserve,
 * trim, forks (the channel list copied, full blocks shared) and removal (copy-on-write, rows
 * moved whole, also rows that run from a block's K area into its V area: kdim 2) work as for
 * unpacked heads, and the bytes of its rows are counted at kdim + D. */
static void test_packed_heads(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq a, b;
    assert_int_equal(uc_kv_seq_init(&a, 1, 2), UC_OK);
    assert_int_equal(uc_kv_seq_init(&b, 1, 2), UC_OK);
    struct uc_kv_head *ha = uc_kv_seq_head(&a, 0, 0), *hb = uc_kv_seq_head(&b, 0, 0);
    const int32_t two[2] = {1, 0}, same[2] = {1, 1}, out_of[1] = {3}, ch1[1] = {2};
    assert_int_equal(uc_kv_head_set_packed(kv, ha, 0, ch1), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_head_set_packed(kv, ha, HD, ch1), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_head_set_packed(kv, ha, 2, two), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_head_set_packed(kv, ha, 2, same), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_head_set_packed(kv, ha, 1, out_of), UC_ERR_INVALID_ARG);
    assert_int_equal(ha->kdim, 0);
    assert_int_equal(uc_kv_head_set_packed(kv, ha, 1, ch1), UC_OK);
    assert_int_equal(uc_kv_head_set_packed(kv, ha, 1, ch1), UC_ERR_INVALID_ARG); /* once */
    assert_int_equal(uc_kv_head_block_tokens(kv, ha), 6);
    int32_t tags[16] = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25};
    assert_int_equal(uc_kv_head_reserve(kv, ha, 13), UC_OK);
    assert_int_equal(ha->n_blocks, 3); /* 13 tokens: 3 blocks, where an unpacked head needs 4 */
    write_packed(kv, ha, tags, 13);
    assert_packed(kv, ha, tags, 13);
    assert_int_equal(uc_kv_seq_row_bytes(kv, &a), 13 * (1 + HD) * (int64_t)sizeof(float));
    /* a fork shares the two full blocks, copies the third, and keeps the channels */
    fork_head(kv, hb, ha);
    assert_int_equal(hb->kdim, 1);
    assert_true(hb->chan != ha->chan && hb->chan[0] == 2);
    assert_int_equal(uc_kv_used_blocks(kv), 4);
    assert_int_equal(uc_kv_shared_blocks(kv), 2);
    assert_packed(kv, hb, tags, 13);
    /* b drops token 2: its first two blocks become its own, a keeps its tokens */
    assert_int_equal(uc_kv_head_remove(kv, hb, 2), UC_OK);
    const int32_t wb[12] = {10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22};
    assert_packed(kv, hb, wb, 12);
    assert_packed(kv, ha, tags, 13);
    /* its two shared blocks copied, and its third released: 12 tokens fill 2 packed blocks */
    assert_int_equal(uc_kv_shared_blocks(kv), 0);
    assert_int_equal(hb->n_blocks, 2);
    assert_int_equal(uc_kv_used_blocks(kv), 5);
    /* a head holding blocks is no fork target */
    assert_int_equal(uc_kv_head_fork(kv, hb, ha, NULL, NULL, NULL), UC_ERR_INVALID_ARG);
    /* kdim 2 of 3: rows of 5 values, 4 per block (12 + 12 values: row 2 straddles the areas) */
    struct uc_kv_head *h2 = uc_kv_seq_head(&a, 0, 1);
    const int32_t ch2[2] = {0, 2};
    assert_int_equal(uc_kv_head_set_packed(kv, h2, 2, ch2), UC_OK);
    assert_int_equal(uc_kv_head_block_tokens(kv, h2), 4);
    assert_int_equal(uc_kv_head_reserve(kv, h2, 6), UC_OK);
    write_packed(kv, h2, tags, 6);
    assert_packed(kv, h2, tags, 6);
    assert_int_equal(uc_kv_head_remove(kv, h2, 1), UC_OK);
    const int32_t w2[5] = {10, 12, 13, 14, 15};
    assert_packed(kv, h2, w2, 5);
    uc_kv_seq_fini(kv, &a);
    uc_kv_seq_fini(kv, &b);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
}

/* MiniCache's merged heads: rows of 2 D + 4 values, uc_kv_merged_tokens per block; forks
 * share their full blocks and keep the layout; nothing is ever removed from them. */
static void test_merged_heads(void **state)
{
    struct fixture *f = *state;
    struct uc_kv_cache *kv = &f->kv;
    struct uc_kv_seq a, b;
    assert_int_equal(uc_kv_seq_init(&a, 2, 1), UC_OK);
    assert_int_equal(uc_kv_seq_init(&b, 2, 1), UC_OK);
    struct uc_kv_head *ha = uc_kv_seq_head(&a, 1, 0), *hb = uc_kv_seq_head(&b, 1, 0);
    const int32_t ch1[1] = {2};
    assert_int_equal(uc_kv_head_set_packed(kv, uc_kv_seq_head(&a, 0, 0), 1, ch1), UC_OK);
    assert_int_equal(uc_kv_head_set_merged(kv, uc_kv_seq_head(&a, 0, 0)), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_kv_head_set_merged(kv, ha), UC_OK);
    assert_int_equal(uc_kv_head_set_packed(kv, ha, 1, ch1), UC_ERR_INVALID_ARG);
    /* BT 4, D 3: 24 values per block, rows of 10: 2 rows per block */
    assert_int_equal(uc_kv_head_block_tokens(kv, ha), uc_kv_merged_tokens(BT, HD));
    assert_int_equal(uc_kv_head_block_tokens(kv, ha), 2);
    assert_int_equal(uc_kv_head_reserve(kv, ha, 5), UC_OK);
    assert_int_equal(ha->n_blocks, 3);
    ha->n_tokens = 5;
    assert_int_equal(uc_kv_head_slot(kv, ha, 3), ha->blocks[1] * 2 + 1);
    assert_int_equal(uc_kv_seq_row_bytes(kv, &a),
                     5 * (2 * HD + UC_KV_MERGED_EXTRA) * (int64_t)sizeof(float));
    assert_int_equal(uc_kv_head_remove(kv, ha, 0), UC_ERR_INVALID_ARG);
    fork_head(kv, hb, ha);
    assert_int_equal(hb->merged, 1);
    assert_int_equal(hb->n_tokens, 5);
    assert_int_equal(uc_kv_shared_blocks(kv), 2);
    assert_int_equal(uc_kv_used_blocks(kv), 4);
    uc_kv_seq_fini(kv, &a);
    uc_kv_seq_fini(kv, &b);
    assert_int_equal(uc_kv_used_blocks(kv), 0);
}

int main(void)
{
    tu_log_capture();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_init_and_sizes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reserve_trim_free, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kv_full, setup, teardown),
        cmocka_unit_test_setup_teardown(test_slots_across_blocks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_remove, setup, teardown),
        cmocka_unit_test_setup_teardown(test_freed_blocks_reused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_sequence_freed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_allocation_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_table_room_after_prompt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_taken_blocks_match_reserve, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fork_shares_full_blocks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fork_full_head_and_kv_full, setup, teardown),
        cmocka_unit_test_setup_teardown(test_remove_unshares, setup, teardown),
        cmocka_unit_test_setup_teardown(test_packed_heads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_merged_heads, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
