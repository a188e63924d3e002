/* Unit tests for shard/base/pbwire.c: a field written by hand with its length (NUL bytes
 * included) is found again; repeated fields are counted across every occurrence of their
 * embedded message (protobuf merges them), a singular field is its last occurrence; truncated
 * or invalid bytes are "not found", never a read past the buffer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "base/pbwire.h"

/* Appends an embedded message (field) holding the given length-delimited fields. */
static size_t put_msg(uint8_t *out, uint32_t field, const uint32_t *fields,
                      const char *const *data, const size_t *len, int n)
{
    uint8_t body[256];
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        k += uc_pb_put_bytes_field(body + k, fields[i], data[i], len[i]);
    }
    return uc_pb_put_bytes_field(out, field, body, k);
}

static void test_text_with_nul(void **state)
{
    (void)state;
    uint8_t msg[64];
    size_t n = 0;
    msg[n++] = 0x08; /* field 1, varint 150 */
    msg[n++] = 0x96;
    msg[n++] = 0x01;
    n += uc_pb_put_bytes_field(msg + n, 2, "a\0b", 3);
    assert_int_equal(uc_pb_bytes_field_size(2, 3), 5);
    const uint8_t *d = NULL;
    size_t len = 0;
    const uint32_t path[] = {2};
    assert_true(uc_pb_find_bytes(msg, n, path, 1, SIZE_MAX, &d, &len));
    assert_int_equal(len, 3);
    assert_memory_equal(d, "a\0b", 3);
    const uint32_t absent[] = {3};
    assert_false(uc_pb_find_bytes(msg, n, absent, 1, SIZE_MAX, &d, &len));
    /* every truncation is "not found" */
    for (size_t cut = 1; cut < n; cut++) {
        assert_false(uc_pb_find_bytes(msg, cut, path, 1, SIZE_MAX, &d, &len));
    }
}

static void test_merged_parents(void **state)
{
    (void)state;
    uint8_t msg[256];
    size_t n = 0;
    /* sampling (4) twice: stop strings (11) "x\0" and "yy" in the first, "z" in the second;
     * a singular field 2 in both */
    const uint32_t f1[] = {11, 2, 11};
    const char *const d1[] = {"x\0", "first", "yy"};
    const size_t l1[] = {2, 5, 2};
    n += put_msg(msg + n, 4, f1, d1, l1, 3);
    n += uc_pb_put_bytes_field(msg + n, 2, "text", 4);
    const uint32_t f2[] = {2, 11};
    const char *const d2[] = {"last", "z"};
    const size_t l2[] = {4, 1};
    n += put_msg(msg + n, 4, f2, d2, l2, 2);

    const uint32_t stop[] = {4, 11};
    const char *const want[] = {"x\0", "yy", "z"};
    const size_t want_len[] = {2, 2, 1};
    const uint8_t *d = NULL;
    size_t len = 0;
    for (size_t i = 0; i < 3; i++) {
        assert_true(uc_pb_find_bytes(msg, n, stop, 2, i, &d, &len));
        assert_int_equal(len, want_len[i]);
        assert_memory_equal(d, want[i], len);
    }
    assert_false(uc_pb_find_bytes(msg, n, stop, 2, 3, &d, &len));
    const uint32_t single[] = {4, 2};
    assert_true(uc_pb_find_bytes(msg, n, single, 2, SIZE_MAX, &d, &len));
    assert_int_equal(len, 4);
    assert_memory_equal(d, "last", 4);
    const uint32_t top[] = {2};
    assert_true(uc_pb_find_bytes(msg, n, top, 1, SIZE_MAX, &d, &len));
    assert_memory_equal(d, "text", 4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_with_nul),
        cmocka_unit_test(test_merged_parents),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
