/* Unit tests for shard/engine/seq_map.c (the engine's sequences by id): random puts, gets and
 * deletes against a plain list, with ids drawn from a narrow range (so probe runs collide, wrap
 * around the table and are cut by deletions) and from the far ends of int64 (calibration windows
 * use negative ids). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "engine/internal.h"

enum { POOL = 600, OPS = 200000 };

static uint64_t next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void random_ops(void **state)
{
    (void)state;
    static struct seq seqs[POOL];
    bool in[POOL] = {false};
    for (int i = 0; i < POOL; i++) {
        seqs[i].id = i < POOL - 8 ? (int64_t)i * 7 : (i % 2 ? INT64_MAX - i : -1000 - i);
    }
    struct eng_seq_map m = {0};
    uint64_t rng = 0x5eed;
    int64_t n = 0;
    for (int op = 0; op < OPS; op++) {
        int i = (int)(next(&rng) % POOL);
        if (next(&rng) % 2) {
            uc_status rc = eng_seq_map_put(&m, &seqs[i]);
            assert_int_equal(rc, in[i] ? UC_ERR_INTERNAL : UC_OK); /* a second entry refused */
            n += !in[i];
            in[i] = true;
        } else {
            /* the entry taken out, or NULL for an id not there */
            assert_ptr_equal(eng_seq_map_del(&m, seqs[i].id), in[i] ? &seqs[i] : NULL);
            n -= in[i];
            in[i] = false;
        }
        assert_int_equal(m.n, n);
        assert_true(2 * m.n <= m.cap);
        if (op % 97 == 0 || op > OPS - 500) { /* every id, present or not */
            for (int k = 0; k < POOL; k++) {
                assert_ptr_equal(eng_seq_map_get(&m, seqs[k].id), in[k] ? &seqs[k] : NULL);
            }
            assert_null(eng_seq_map_get(&m, 3)); /* never put: not a multiple of 7 */
        }
    }
    for (int k = 0; k < POOL; k++) { /* empty it: every delete leaves the rest findable */
        assert_ptr_equal(eng_seq_map_del(&m, seqs[k].id), in[k] ? &seqs[k] : NULL);
        in[k] = false;
        for (int j = k + 1; j < POOL && k % 50 == 0; j++) {
            assert_ptr_equal(eng_seq_map_get(&m, seqs[j].id), in[j] ? &seqs[j] : NULL);
        }
    }
    assert_int_equal(m.n, 0);
    assert_null(eng_seq_map_get(&m, 0));
    eng_seq_map_fini(&m);
    assert_null(eng_seq_map_get(&m, 0)); /* an empty (finished) map answers too */
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(random_ops)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
