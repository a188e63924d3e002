/* Unit tests for shard/safetensors.c on files this test writes into a temporary folder: F32, F16
 * and BF16 tensors read back bit-exactly (whole and as 2D slices), single files and shards
 * listed by model.safetensors.index.json, and every kind of corruption (truncation, a header
 * length past the end, a header that is not JSON, offsets outside the data, sizes that do not
 * match shape x dtype, overlaps, unsupported dtypes, an index naming a missing shard or a
 * tensor its shard lacks, uc_st_expect refusals). Each refusal is checked for its status, a log
 * line naming the file and tensor, and zero leaked blocks; allocation N fails for every N. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "safetensors.h"
#include "test_util.h"

/* ---- log capture ------------------------------------------------------------------------- */


#define assert_log_has(s)                                                                          \
    do {                                                                                           \
        if (!strstr(tu_log_text, (s))) {                                                              \
            fail_msg("log lacks '%s':\n%s", (s), tu_log_text);                                        \
        }                                                                                          \
    } while (0)

/* ---- a temporary folder per test --------------------------------------------------------- */

static char tmp_dir[64];


static int setup_dir(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/uc_test_st_XXXXXX");
    return mkdtemp(tmp_dir) ? 0 : -1;
}

static int teardown_dir(void **state)
{
    (void)state;
    return tu_rmtree(tmp_dir);
}

static const char *in_tmp(const char *name)
{
    static char buf[4][256];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmp_dir, name);
    return buf[k];
}

/* ---- writing safetensors files ----------------------------------------------------------- */

/* Writes 8-byte length (or `hlen_override` when non-zero), header text, then data. */
static void write_raw(const char *path, const char *header, const void *data, size_t n_data,
                      uint64_t hlen_override)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint64_t hlen = hlen_override ? hlen_override : strlen(header);
    unsigned char le[8];
    for (int i = 0; i < 8; i++) {
        le[i] = (unsigned char)(hlen >> (8 * i));
    }
    assert_int_equal(fwrite(le, 1, 8, f), 8);
    assert_int_equal(fwrite(header, 1, strlen(header), f), strlen(header));
    if (n_data) {
        assert_int_equal(fwrite(data, 1, n_data, f), n_data);
    }
    assert_int_equal(fclose(f), 0);
}

static const unsigned char DATA16[16] = {0};

struct tdef {
    const char *name;
    const char *dtype;
    int n_dims;
    int64_t shape[4];
    const void *data;
    size_t bytes;
};

/* Writes tensors back to back (offsets computed), with a __metadata__ entry first. */
static void write_st(const char *path, const struct tdef *t, int n)
{
    char header[8192];
    size_t total = 0;
    int k = snprintf(header, sizeof header, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        k += snprintf(header + k, sizeof header - (size_t)k,
                      ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", t[i].name, t[i].dtype);
        for (int d = 0; d < t[i].n_dims; d++) {
            k += snprintf(header + k, sizeof header - (size_t)k, "%s%lld", d ? "," : "",
                          (long long)t[i].shape[d]);
        }
        k += snprintf(header + k, sizeof header - (size_t)k, "],\"data_offsets\":[%zu,%zu]}", total,
                      total + t[i].bytes);
        total += t[i].bytes;
    }
    k += snprintf(header + k, sizeof header - (size_t)k, "}");
    while (k % 8) { /* the format pads the header with spaces to 8 bytes */
        header[k++] = ' ';
        header[k] = '\0';
    }
    unsigned char *data = malloc(total ? total : 1);
    assert_non_null(data);
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        memcpy(data + off, t[i].data, t[i].bytes);
        off += t[i].bytes;
    }
    write_raw(path, header, data, total, 0);
    free(data);
}

/* A header over 16 zero data bytes. */
static void write_hdr(const char *path, const char *header)
{
    write_raw(path, header, DATA16, sizeof DATA16, 0);
}

static void write_text(const char *path, const char *text)
{
    assert_int_equal(uc_file_write_all(path, text, strlen(text)), UC_OK);
}

/* Opens a file that must be refused: the status, the log naming `a` and `b`, no leak. */
static void expect_file_refused(const char *path, uc_status want, const char *a, const char *b)
{
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    struct uc_st *st = (struct uc_st *)(uintptr_t)1;
    uc_status rc = uc_st_open_file(&st, path);
    if (rc != want) {
        fail_msg("%s: want %s, got %s", path, uc_status_str(want), uc_status_str(rc));
    }
    assert_null(st);
    assert_int_equal(tu_log_errors, 1);
    assert_log_has(uc_status_str(want));
    assert_log_has(path);
    if (a) {
        assert_log_has(a);
    }
    if (b) {
        assert_log_has(b);
    }
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* The same for a model folder. */
static void expect_dir_refused(const char *dir, uc_status want, const char *a, const char *b)
{
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    struct uc_st *st = (struct uc_st *)(uintptr_t)1;
    uc_status rc = uc_st_open(&st, dir);
    if (rc != want) {
        fail_msg("%s: want %s, got %s", dir, uc_status_str(want), uc_status_str(rc));
    }
    assert_null(st);
    assert_true(tu_log_errors >= 1);
    assert_log_has(uc_status_str(want));
    if (a) {
        assert_log_has(a);
    }
    if (b) {
        assert_log_has(b);
    }
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Bit-exact float comparison (so -0.0, infinities and subnormals count). */
static void assert_bits_equal(const float *got, const float *want, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0 &&
            !(isnan(got[i]) && isnan(want[i]))) {
            fail_msg("element %lld: got %a, want %a", (long long)i, (double)got[i],
                     (double)want[i]);
        }
    }
}

/* ---- reading back ------------------------------------------------------------------------ */

/* F16 and BF16 bit patterns with the float32 each stands for exactly. */
static const uint16_t F16_BITS[] = {0x3C00, 0xC000, 0x3555, 0x7BFF, 0x0001, 0x8000,
                                    0x7C00, 0x3800, 0x03FF, 0xFC00, 0x0000, 0x4248};
static const float F16_VALS[] = {1.0f, -2.0f, 0.333251953125f, 65504.0f, 0x1p-24f, -0.0f,
                                 INFINITY, 0.5f, 0x3FFp-24f, -INFINITY, 0.0f, 3.140625f};
static const uint16_t BF16_BITS[] = {0x3F80, 0xC040, 0x4049, 0x0001, 0x7F80, 0xFF80,
                                     0x3E80, 0x8000, 0x7F7F, 0x0080, 0xBF00, 0x4780};
static const float BF16_VALS[] = {1.0f, -3.0f, 3.140625f, 0x1p-133f, INFINITY, -INFINITY,
                                  0.25f, -0.0f, 0x1.FEp127f, 0x1p-126f, -0.5f, 65536.0f};

static void test_dtypes_exact(void **state)
{
    (void)state;
    float f32[12];
    uc_test_fill(f32, 12, 7, 0, 0);
    f32[3] = -0.0f;
    f32[4] = 0x1p-149f; /* the smallest subnormal */
    f32[5] = -INFINITY;
    struct tdef t[] = {
        {"a.f32", "F32", 2, {3, 4}, f32, sizeof f32},
        {"b.f16", "F16", 1, {12}, F16_BITS, sizeof F16_BITS},
        {"c.bf16", "BF16", 3, {2, 3, 2}, BF16_BITS, sizeof BF16_BITS},
    };
    const char *path = in_tmp("model.safetensors");
    write_st(path, t, 3);
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_st *st = NULL;
    assert_int_equal(uc_st_open_file(&st, path), UC_OK);
    assert_int_equal(uc_st_count(st), 3); /* __metadata__ is not a tensor */
    assert_null(uc_st_find(st, "__metadata__"));
    assert_null(uc_st_find(st, "a"));

    const struct uc_st_tensor *a = uc_st_find(st, "a.f32");
    assert_non_null(a);
    assert_string_equal(a->name, "a.f32");
    assert_int_equal(a->dtype, UC_DTYPE_F32);
    assert_int_equal(a->n_dims, 2);
    assert_int_equal(a->shape[0], 3);
    assert_int_equal(a->shape[1], 4);
    assert_int_equal(a->size_bytes, 48);
    assert_string_equal(uc_st_file_name(st, a), path);
    float out[12];
    assert_int_equal(uc_st_read_f32(a, 0, 3, 0, 4, out), UC_OK);
    assert_bits_equal(out, f32, 12);

    const struct uc_st_tensor *b = uc_st_find(st, "b.f16");
    assert_non_null(b);
    assert_int_equal(b->dtype, UC_DTYPE_F16);
    assert_int_equal(b->size_bytes, 24);
    memset(out, 0x55, sizeof out);
    assert_int_equal(uc_st_read_f32(b, 0, 1, 0, 12, out), UC_OK); /* 1D as one row */
    assert_bits_equal(out, F16_VALS, 12);

    const struct uc_st_tensor *c = uc_st_find(st, "c.bf16");
    assert_non_null(c);
    assert_int_equal(c->dtype, UC_DTYPE_BF16);
    assert_int_equal(c->n_dims, 3);
    assert_int_equal(c->shape[2], 2);
    memset(out, 0x55, sizeof out);
    uc_convert_to_f32(out, c->data, c->dtype, 12);
    assert_bits_equal(out, BF16_VALS, 12);
    /* a 3D tensor cannot be sliced as 2D */
    tu_log_reset();
    assert_int_equal(uc_st_read_f32(c, 0, 1, 0, 1, out), UC_ERR_INVALID_ARG);
    assert_log_has("tensor=c.bf16");

    /* the tensors sit where the header says, in file order */
    assert_ptr_equal(b->data, a->data + 48);
    assert_ptr_equal(c->data, b->data + 24);
    assert_ptr_equal(uc_st_at(st, 0), a);
    assert_ptr_equal(uc_st_at(st, 2), c);

    assert_string_equal(uc_dtype_name(UC_DTYPE_F32), "F32");
    assert_string_equal(uc_dtype_name(UC_DTYPE_F16), "F16");
    assert_string_equal(uc_dtype_name(UC_DTYPE_BF16), "BF16");
    assert_int_equal(uc_dtype_size(UC_DTYPE_F32), 4);
    assert_int_equal(uc_dtype_size(UC_DTYPE_F16), 2);
    assert_int_equal(uc_dtype_size(UC_DTYPE_BF16), 2);
    uc_st_destroy(st);
    uc_st_destroy(NULL);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Slices of 2D tensors in every dtype equal the same block of the full tensor. */
static void test_slices(void **state)
{
    (void)state;
    enum { R = 5, C = 7 };
    float f32[R * C];
    uint16_t f16[R * C], bf16[R * C];
    float f16v[R * C], bf16v[R * C];
    for (int i = 0; i < R * C; i++) {
        f32[i] = (float)(i * 3 - 50) / 8.0f;
        f16[i] = uc_f32_to_f16(f32[i]);
        bf16[i] = uc_f32_to_bf16(f32[i]);
        f16v[i] = f32[i]; /* multiples of 1/8 below 100: exact in both */
        bf16v[i] = f32[i];
    }
    struct tdef t[] = {
        {"w32", "F32", 2, {R, C}, f32, sizeof f32},
        {"w16", "F16", 2, {R, C}, f16, sizeof f16},
        {"wbf", "BF16", 2, {R, C}, bf16, sizeof bf16},
        {"vec", "F32", 1, {C}, f32, C * sizeof(float)},
    };
    const char *path = in_tmp("s.safetensors");
    write_st(path, t, 4);
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_st *st = NULL;
    assert_int_equal(uc_st_open_file(&st, path), UC_OK);
    const float *ref[3] = {f32, f16v, bf16v};
    const char *names[3] = {"w32", "w16", "wbf"};
    for (int k = 0; k < 3; k++) {
        const struct uc_st_tensor *w = uc_st_find(st, names[k]);
        assert_non_null(w);
        /* every block [r0, r0+nr) x [c0, c0+nc) */
        for (int r0 = 0; r0 < R; r0++) {
            for (int nr = 0; r0 + nr <= R; nr++) {
                for (int c0 = 0; c0 < C; c0 += 2) {
                    for (int nc = 1; c0 + nc <= C; nc += 3) {
                        float out[R * C], want[R * C];
                        for (int i = 0; i < nr; i++) {
                            for (int j = 0; j < nc; j++) {
                                want[i * nc + j] = ref[k][(r0 + i) * C + c0 + j];
                            }
                        }
                        assert_int_equal(uc_st_read_f32(w, r0, nr, c0, nc, out), UC_OK);
                        assert_bits_equal(out, want, nr * nc);
                    }
                }
            }
        }
        /* outside the tensor */
        float out[R * C];
        tu_log_reset();
        assert_int_equal(uc_st_read_f32(w, 3, 3, 0, 1, out), UC_ERR_INVALID_ARG);
        assert_log_has(names[k]);
        assert_log_has("outside 5x7");
        assert_int_equal(uc_st_read_f32(w, 0, 1, 5, 3, out), UC_ERR_INVALID_ARG);
        assert_int_equal(uc_st_read_f32(w, -1, 1, 0, 1, out), UC_ERR_INVALID_ARG);
        assert_int_equal(uc_st_read_f32(w, 0, 1, -1, 1, out), UC_ERR_INVALID_ARG);
        assert_int_equal(uc_st_read_f32(w, 0, -1, 0, 1, out), UC_ERR_INVALID_ARG);
    }
    /* a 1D tensor is one row */
    const struct uc_st_tensor *v = uc_st_find(st, "vec");
    float out[C];
    assert_int_equal(uc_st_read_f32(v, 0, 1, 2, 4, out), UC_OK);
    assert_bits_equal(out, f32 + 2, 4);
    assert_int_equal(uc_st_read_f32(v, 1, 1, 0, 1, out), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_st_read_f32(v, 0, 1, 4, 4, out), UC_ERR_INVALID_ARG);
    uc_st_destroy(st);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* uc_st_open on a folder with model.safetensors, and on one with nothing. */
static void test_open_dir_single(void **state)
{
    (void)state;
    float x[4] = {1, 2, 3, 4};
    struct tdef t[] = {{"x", "F32", 1, {4}, x, sizeof x}};
    expect_dir_refused(tmp_dir, UC_ERR_IO, tmp_dir, "model.safetensors.index.json");
    write_st(in_tmp("model.safetensors"), t, 1);
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_st *st = NULL;
    assert_int_equal(uc_st_open(&st, tmp_dir), UC_OK);
    assert_int_equal(uc_st_count(st), 1);
    float out[4];
    assert_int_equal(uc_st_read_f32(uc_st_find(st, "x"), 0, 1, 0, 4, out), UC_OK);
    assert_bits_equal(out, x, 4);
    assert_string_equal(uc_st_file_name(st, uc_st_find(st, "x")), in_tmp("model.safetensors"));
    uc_st_destroy(st);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Two shards through the index: every tensor found, in the file the index names, with its data. */
static const float S1A[6] = {1, 2, 3, 4, 5, 6}, S1B[2] = {-1, -2}, S2C[3] = {7, 8, 9};

static void write_two_shards(void)
{
    struct tdef s1[] = {{"model.a", "F32", 2, {2, 3}, S1A, sizeof S1A},
                        {"model.b", "F32", 1, {2}, S1B, sizeof S1B}};
    struct tdef s2[] = {{"model.c", "F32", 1, {3}, S2C, sizeof S2C}};
    write_st(in_tmp("model-00001-of-00002.safetensors"), s1, 2);
    write_st(in_tmp("model-00002-of-00002.safetensors"), s2, 1);
}

static void test_sharded(void **state)
{
    (void)state;
    write_two_shards();
    write_text(in_tmp("model.safetensors.index.json"),
               "{\"metadata\":{\"total_size\":44},\"weight_map\":{"
               "\"model.a\":\"model-00001-of-00002.safetensors\","
               "\"model.c\":\"model-00002-of-00002.safetensors\","
               "\"model.b\":\"model-00001-of-00002.safetensors\"}}");
    /* a stray single file is ignored when the index exists */
    write_text(in_tmp("model.safetensors"), "garbage");
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_st *st = NULL;
    assert_int_equal(uc_st_open(&st, tmp_dir), UC_OK);
    assert_int_equal(uc_st_count(st), 3);
    const struct uc_st_tensor *a = uc_st_find(st, "model.a"), *b = uc_st_find(st, "model.b"),
                              *c = uc_st_find(st, "model.c");
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_string_equal(uc_st_file_name(st, a), in_tmp("model-00001-of-00002.safetensors"));
    assert_string_equal(uc_st_file_name(st, b), in_tmp("model-00001-of-00002.safetensors"));
    assert_string_equal(uc_st_file_name(st, c), in_tmp("model-00002-of-00002.safetensors"));
    assert_int_equal(a->file, b->file);
    assert_true(a->file != c->file);
    float out[6];
    assert_int_equal(uc_st_read_f32(a, 1, 1, 0, 3, out), UC_OK);
    assert_bits_equal(out, S1A + 3, 3);
    assert_int_equal(uc_st_read_f32(b, 0, 1, 0, 2, out), UC_OK);
    assert_bits_equal(out, S1B, 2);
    assert_int_equal(uc_st_read_f32(c, 0, 1, 0, 3, out), UC_OK);
    assert_bits_equal(out, S2C, 3);
    /* uc_st_expect on the open set */
    int64_t sa[2] = {2, 3}, sbad[2] = {3, 2}, s1[1] = {3};
    assert_int_equal(uc_st_expect(st, "model.a", 2, sa), UC_OK);
    assert_int_equal(uc_st_expect(st, "model.c", 1, s1), UC_OK);
    tu_log_reset();
    assert_int_equal(uc_st_expect(st, "model.a", 2, sbad), UC_ERR_FORMAT);
    assert_log_has("tensor=model.a");
    assert_log_has("model-00001-of-00002.safetensors");
    assert_log_has("shape [2,3], config needs [3,2]");
    tu_log_reset();
    assert_int_equal(uc_st_expect(st, "model.c", 2, sa), UC_ERR_FORMAT); /* rank differs */
    assert_log_has("tensor=model.c");
    assert_log_has("shape [3], config needs [2,3]");
    tu_log_reset();
    assert_int_equal(uc_st_expect(st, "model.zzz", 1, s1), UC_ERR_FORMAT);
    assert_log_has("tensor=model.zzz is missing");
    uc_st_destroy(st);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);

    /* allocation failure N for every N up to a successful open: NOMEM, nothing leaked */
    int64_t calls0 = uc_mem_alloc_calls();
    assert_int_equal(uc_st_open(&st, tmp_dir), UC_OK);
    int64_t n_calls = uc_mem_alloc_calls() - calls0;
    uc_st_destroy(st);
    assert_true(n_calls >= 8);
    for (int64_t n = 1; n <= n_calls; n++) {
        tu_log_reset();
        uc_mem_fail_after(n);
        uc_status rc = uc_st_open(&st, tmp_dir);
        uc_mem_fail_after(0);
        if (rc != UC_ERR_NOMEM) {
            fail_msg("allocation %lld of %lld failed but open returned %s", (long long)n,
                     (long long)n_calls, uc_status_str(rc));
        }
        assert_null(st);
        assert_int_equal(uc_mem_blocks_in_use(), blocks);
    }
}

/* ---- corruption ---------------------------------------------------------------------------- */

static void test_truncated_and_header_length(void **state)
{
    (void)state;
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    struct tdef t[] = {{"w", "F32", 1, {8}, x, sizeof x}};
    const char *path = in_tmp("t.safetensors");
    write_st(path, t, 1);
    char *whole = NULL;
    size_t n = 0;
    assert_int_equal(uc_file_read_all(&whole, &n, path), UC_OK);
    /* data cut short: the tensor's end offset lies past the data */
    assert_int_equal(uc_file_write_all(path, whole, n - 4), UC_OK);
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets [0, 32]");
    /* cut inside the header: the length field points past the end */
    assert_int_equal(uc_file_write_all(path, whole, 20), UC_OK);
    expect_file_refused(path, UC_ERR_FORMAT, "header length", "truncated");
    /* shorter than the 8-byte length itself, and empty */
    assert_int_equal(uc_file_write_all(path, whole, 5), UC_OK);
    expect_file_refused(path, UC_ERR_FORMAT, "5 bytes", "too short");
    assert_int_equal(uc_file_write_all(path, whole, 0), UC_OK);
    expect_file_refused(path, UC_ERR_FORMAT, "too short", NULL);
    uc_free(whole);
    /* a header length larger than the file, and an absurd one */
    write_raw(path, "{}", DATA16, 16, 4096);
    expect_file_refused(path, UC_ERR_FORMAT, "header length 4096", "exceeds the file");
    write_raw(path, "{}", DATA16, 16, UINT64_MAX);
    expect_file_refused(path, UC_ERR_FORMAT, "header length", NULL);
    /* the file does not exist */
    expect_file_refused(in_tmp("absent.safetensors"), UC_ERR_IO, "cannot open", NULL);
    /* an empty header object is a valid file without tensors */
    write_raw(path, "{}      ", DATA16, 0, 0);
    struct uc_st *st = NULL;
    assert_int_equal(uc_st_open_file(&st, path), UC_OK);
    assert_int_equal(uc_st_count(st), 0);
    uc_st_destroy(st);
}

static void test_header_not_json(void **state)
{
    (void)state;
    const char *path = in_tmp("h.safetensors");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]");
    expect_file_refused(path, UC_ERR_FORMAT, "not a JSON object", NULL);
    write_hdr(path, "[1,2,3]");
    expect_file_refused(path, UC_ERR_FORMAT, "not a JSON object", NULL);
    write_hdr(path, "\x01\x02garbage");
    expect_file_refused(path, UC_ERR_FORMAT, "not a JSON object", NULL);
    /* entries that are not {dtype, shape, data_offsets} objects */
    write_hdr(path, "{\"w\":5}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "not an object");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "shape");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[\"0\",16]}}", DATA16,
              16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-4],\"data_offsets\":[0,16]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "bad shape");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,6]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "bad shape");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,4],\"data_offsets\":[0,16]}}",
              DATA16, 16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "5 dims");
    write_hdr(path, "{\"w\":{\"dtype\":7,\"shape\":[4],\"data_offsets\":[0,16]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", NULL);
}

static void test_offsets_and_sizes(void **state)
{
    (void)state;
    const char *path = in_tmp("o.safetensors");
    /* end past the 16 data bytes */
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[5],\"data_offsets\":[0,20]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "outside the data section of 16 bytes");
    /* begin past the end, end before begin, negative */
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[17,17]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets [17, 17]");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets [8, 4]");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.5,4.5]}}", DATA16,
              16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w", "data_offsets");
    /* sizes that do not match shape x dtype (too many bytes, too few, wrong dtype size) */
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w holds 16 bytes", "needs 12");
    write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", DATA16,
              16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w holds 16 bytes", "needs 24");
    write_hdr(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}");
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=w holds 16 bytes", "needs 8");
    /* the second of two tensors is the bad one: its name is reported */
    write_raw(path,
              "{\"ok\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"bad\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,16]}}",
              DATA16, 16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "tensor=bad", "needs 4");
    /* bytes of the data section that no tensor uses are allowed */
    write_hdr(path, "{\"w\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[8,16]}}");
    struct uc_st *st = NULL;
    assert_int_equal(uc_st_open_file(&st, path), UC_OK);
    assert_int_equal(uc_st_find(st, "w")->size_bytes, 8);
    uc_st_destroy(st);
}

static void test_overlap(void **state)
{
    (void)state;
    const char *path = in_tmp("ov.safetensors");
    write_raw(path,
              "{\"first\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"second\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
              DATA16, 16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "first and second overlap", NULL);
    /* listed out of order, and the same range twice */
    write_raw(path,
              "{\"z\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
              "\"y\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
              "\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
              DATA16, 16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "tensors x and z overlap", NULL);
    write_raw(path,
              "{\"p\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
              "\"q\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
              DATA16, 16, 0);
    expect_file_refused(path, UC_ERR_FORMAT, "overlap", NULL);
    /* adjacent and out-of-order but disjoint ranges are fine */
    write_raw(path,
              "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
              "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
              DATA16, 16, 0);
    struct uc_st *st = NULL;
    assert_int_equal(uc_st_open_file(&st, path), UC_OK);
    assert_int_equal(uc_st_count(st), 2);
    uc_st_destroy(st);
}

/* Regression (shard/safetensors.c, map_file's overlap check): a zero-sized tensor (shape [0], offsets
 * [k, k]) overlaps nothing, but when it starts where a non-empty tensor starts and comes after
 * it in the header, the ranges sort by start only and the check reports an overlap. Files from
 * the safetensors writer can hold such tensors (their offsets are the running total). */
static void test_regression_empty_tensor_is_not_an_overlap(void **state)
{
    (void)state;
    const char *path = in_tmp("empty.safetensors");
    write_raw(path,
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
              "\"empty\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]}}",
              DATA16, 16, 0);
    tu_log_reset();
    struct uc_st *st = NULL;
    uc_status rc = uc_st_open_file(&st, path);
    if (rc != UC_OK) {
        fail_msg("regression: a zero-sized tensor at offset 8 was refused: %s", tu_log_text);
    }
    assert_int_equal(uc_st_count(st), 3);
    assert_int_equal(uc_st_find(st, "empty")->size_bytes, 0);
    uc_st_destroy(st);
}

static void test_unsupported_dtype(void **state)
{
    (void)state;
    const char *path = in_tmp("d.safetensors");
    static const char *bad[] = {"F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "f32", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char hdr[256], want[64];
        snprintf(hdr, sizeof hdr,
                 "{\"ok\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"odd\":{\"dtype\":\"%s\",\"shape\":[1],\"data_offsets\":[4,5]}}",
                 bad[i]);
        write_raw(path, hdr, DATA16, 16, 0);
        snprintf(want, sizeof want, "dtype=%s is not supported", bad[i]);
        expect_file_refused(path, UC_ERR_UNSUPPORTED, "tensor=odd", want);
    }
}

static void test_index_errors(void **state)
{
    (void)state;
    write_two_shards();
    const char *index = in_tmp("model.safetensors.index.json");
    /* a shard that does not exist */
    write_text(index, "{\"weight_map\":{\"model.a\":\"model-00001-of-00002.safetensors\","
                      "\"model.x\":\"model-00003-of-00003.safetensors\"}}");
    expect_dir_refused(tmp_dir, UC_ERR_IO, in_tmp("model-00003-of-00003.safetensors"),
                       "cannot open");
    /* a tensor its shard does not have */
    write_text(index, "{\"weight_map\":{\"model.a\":\"model-00001-of-00002.safetensors\","
                      "\"model.nope\":\"model-00002-of-00002.safetensors\"}}");
    expect_dir_refused(tmp_dir, UC_ERR_FORMAT, "tensor=model.nope",
                       "absent from model-00002-of-00002.safetensors");
    assert_log_has("model.safetensors.index.json");
    /* no weight_map, not JSON, a shard name that leaves the folder */
    write_text(index, "{\"metadata\":{}}");
    expect_dir_refused(tmp_dir, UC_ERR_FORMAT, "field=weight_map", index);
    write_text(index, "{\"weight_map\":");
    expect_dir_refused(tmp_dir, UC_ERR_FORMAT, "field=weight_map", NULL);
    write_text(index, "{\"weight_map\":{\"model.a\":\"../model-00001-of-00002.safetensors\"}}");
    expect_dir_refused(tmp_dir, UC_ERR_FORMAT, "tensor=model.a", "invalid shard name");
    write_text(index, "{\"weight_map\":{\"model.a\":\"/etc/passwd\"}}");
    expect_dir_refused(tmp_dir, UC_ERR_FORMAT, "tensor=model.a", "invalid shard name");
    write_text(index, "{\"weight_map\":{\"model.a\":1}}");
    expect_dir_refused(tmp_dir, UC_ERR_FORMAT, "tensor=model.a", "invalid shard name");
    /* a corrupt shard is reported with its own path */
    write_raw(in_tmp("model-00002-of-00002.safetensors"), "{\"model.c\":{", DATA16, 16, 0);
    write_text(index, "{\"weight_map\":{\"model.a\":\"model-00001-of-00002.safetensors\","
                      "\"model.c\":\"model-00002-of-00002.safetensors\"}}");
    expect_dir_refused(tmp_dir, UC_ERR_FORMAT, in_tmp("model-00002-of-00002.safetensors"),
                       "not a JSON object");
}

/* Regression (shard/safetensors.c, open_sharded): "Every tensor of the index must be in the shard it
 * names" is checked with uc_st_find over all shards, so an index that puts a tensor in the
 * wrong shard is accepted. Here the index says model.c lives in shard 1, but only shard 2 has
 * it; the open should fail with UC_ERR_FORMAT naming model.c and the shard. */
static void test_regression_index_tensor_in_other_shard(void **state)
{
    (void)state;
    write_two_shards();
    write_text(in_tmp("model.safetensors.index.json"),
               "{\"weight_map\":{\"model.a\":\"model-00001-of-00002.safetensors\","
               "\"model.b\":\"model-00002-of-00002.safetensors\","
               "\"model.c\":\"model-00001-of-00002.safetensors\"}}");
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    struct uc_st *st = NULL;
    uc_status rc = uc_st_open(&st, tmp_dir);
    uc_st_destroy(st);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    if (rc != UC_ERR_FORMAT) {
        fail_msg("regression: index places model.b in shard 2 and model.c in shard 1, the files say "
                 "otherwise, and uc_st_open returned %s", uc_status_str(rc));
    }
    assert_log_has("tensor=model.");
}

int main(void)
{
    tu_log_capture();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_dtypes_exact, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_slices, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_open_dir_single, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_sharded, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_truncated_and_header_length, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_header_not_json, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_offsets_and_sizes, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_overlap, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_unsupported_dtype, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_index_errors, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_regression_empty_tensor_is_not_an_overlap, setup_dir,
                                        teardown_dir),
        cmocka_unit_test_setup_teardown(test_regression_index_tensor_in_other_shard, setup_dir,
                                        teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
