/* Tokenizer conformance: compares uc_tokenizer with reference ids and decodes made by the official
 * Hugging Face tokenizers library (reference.js writes them). For every string: ids without and
 * with special tokens, and the decodes of the ids with special tokens (skip_special false and
 * true). Then times the encode of 100 KB and 400 KB of the same strings (linear time: the second
 * should take about 4x the first). Exit 0 only when everything matches.
 * Usage: tok_conformance REF.json MODEL_DIR [MAX_REPORTS] */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/mem.h"
#include "base/util.h"
#include "tokenizer.h"

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Decodes a hex string into a uc_malloc'd buffer (NUL-terminated, may hold NULs). */
static char *unhex(const char *h, size_t *n)
{
    size_t m = strlen(h) / 2;
    char *out = uc_malloc(m + 1);
    if (!out) {
        return NULL;
    }
    for (size_t i = 0; i < m; i++) {
        out[i] = (char)(hexval(h[2 * i]) * 16 + hexval(h[2 * i + 1]));
    }
    out[m] = '\0';
    *n = m;
    return out;
}

static void print_text(const char *label, const char *s, size_t n)
{
    fprintf(stderr, "    %s (%zu bytes): \"", label, n);
    for (size_t i = 0; i < n && i < 120; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f || c == '"' || c == '\\') {
            fprintf(stderr, "\\x%02x", c);
        } else {
            fputc(c, stderr);
        }
    }
    fprintf(stderr, "%s\"\n", n > 120 ? "..." : "");
}

static void print_ids(const char *label, const cJSON *want, const int32_t *got, int64_t n)
{
    fprintf(stderr, "    %s want:", label);
    int k = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, want)
    {
        if (k++ < 30) {
            fprintf(stderr, " %d", (int)it->valuedouble);
        }
    }
    fprintf(stderr, "%s\n    %s got: ", k > 30 ? " ..." : "", label);
    for (int64_t i = 0; i < n && i < 30; i++) {
        fprintf(stderr, " %d", got[i]);
    }
    fprintf(stderr, "%s\n", n > 30 ? " ..." : "");
}

static bool same_ids(const cJSON *want, const int32_t *got, int64_t n)
{
    if (cJSON_GetArraySize(want) != n) {
        return false;
    }
    int64_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, want)
    {
        if ((int32_t)it->valuedouble != got[i++]) {
            return false;
        }
    }
    return true;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Best of 3 encode times of text[0..n). */
static double time_encode(const struct uc_tokenizer *tok, const char *text, size_t n)
{
    double best = 1e30;
    for (int r = 0; r < 3; r++) {
        int32_t *ids = NULL;
        int64_t k = 0;
        double t0 = now_ms();
        uc_status rc = uc_tokenizer_encode(tok, text, n, false, &ids, &k);
        double t = now_ms() - t0;
        uc_free(ids);
        if (rc != UC_OK) {
            return -1;
        }
        best = t < best ? t : best;
    }
    return best;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s REF.json MODEL_DIR [MAX_REPORTS]\n", argv[0]);
        return 2;
    }
    int max_reports = argc > 3 ? atoi(argv[3]) : 8;
    char *json = NULL;
    if (uc_file_read_all(&json, NULL, argv[1]) != UC_OK) {
        fprintf(stderr, "FAIL cannot read %s\n", argv[1]);
        return 1;
    }
    cJSON *root = cJSON_Parse(json);
    uc_free(json);
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "name"));
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(root, "cases");
    struct uc_tokenizer *tok = NULL;
    if (!name || !cJSON_IsArray(cases) || uc_tokenizer_create(&tok, argv[2]) != UC_OK) {
        fprintf(stderr, "FAIL %s: cannot load the reference or the tokenizer in %s\n", argv[1],
                argv[2]);
        cJSON_Delete(root);
        return 1;
    }
    int n = 0, ok_plain = 0, ok_special = 0, ok_dec = 0, ok_skip = 0, reports = 0;
    struct uc_buf corpus;
    uc_buf_init(&corpus);
    const cJSON *c;
    cJSON_ArrayForEach(c, cases)
    {
        size_t len = 0;
        char *text = unhex(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "hex")), &len);
        const cJSON *want = cJSON_GetObjectItemCaseSensitive(c, "ids");
        const cJSON *want_sp = cJSON_GetObjectItemCaseSensitive(c, "ids_special");
        if (len < 1000) {
            uc_buf_append(&corpus, text, len);
            uc_buf_append(&corpus, "\n", 1);
        }
        n++;
        bool bad = false;
        for (int sp = 0; sp < 2; sp++) {
            int32_t *ids = NULL;
            int64_t k = 0;
            char why[256];
            uc_status rc = uc_tokenizer_encode_msg(tok, text, len, sp == 1, &ids, &k, why,
                                                   sizeof why);
            bool eq = rc == UC_OK && same_ids(sp ? want_sp : want, ids, k);
            *(sp ? &ok_special : &ok_plain) += eq;
            if (!eq && reports < max_reports) {
                if (!bad) {
                    fprintf(stderr, "  MISMATCH %s case %d\n", name, n - 1);
                    print_text("text", text, len);
                }
                if (rc != UC_OK) {
                    fprintf(stderr, "    encode failed: %s\n", why);
                } else {
                    print_ids(sp ? "special" : "plain", sp ? want_sp : want, ids, k);
                }
                bad = true;
            }
            uc_free(ids);
        }
        /* decodes of the reference ids */
        int64_t nw = cJSON_GetArraySize(want_sp);
        int32_t *wids = uc_malloc((size_t)(nw > 0 ? nw : 1) * sizeof *wids);
        int64_t i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, want_sp)
        {
            wids[i++] = (int32_t)it->valuedouble;
        }
        for (int skip = 0; skip < 2; skip++) {
            size_t wl = 0, gl = 0;
            char *wt = unhex(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(
                                 c, skip ? "dec_skip_hex" : "dec_hex")),
                             &wl);
            char *got = NULL;
            uc_status rc = uc_tokenizer_decode(tok, wids, nw, skip == 1, &got, &gl);
            bool eq = rc == UC_OK && gl == wl && memcmp(got, wt, wl) == 0;
            *(skip ? &ok_skip : &ok_dec) += eq;
            if (!eq && reports < max_reports) {
                if (!bad) {
                    fprintf(stderr, "  MISMATCH %s case %d\n", name, n - 1);
                    print_text("text", text, len);
                }
                fprintf(stderr, "    decode (skip_special=%d):\n", skip);
                print_text("want", wt, wl);
                print_text("got ", got ? got : "", got ? gl : 0);
                bad = true;
            }
            uc_free(wt);
            uc_free(got);
        }
        reports += bad;
        uc_free(wids);
        uc_free(text);
    }
    /* linear time: 100 KB and 400 KB of the test strings */
    struct uc_buf big;
    uc_buf_init(&big);
    while (big.len < 400 * 1024) {
        uc_buf_append(&big, corpus.data, corpus.len);
    }
    double t100 = time_encode(tok, big.data, 100 * 1024);
    double t400 = time_encode(tok, big.data, 400 * 1024);
    bool all = ok_plain == n && ok_special == n && ok_dec == n && ok_skip == n;
    printf("%-14s strings=%d ids_plain=%d ids_special=%d decode=%d decode_skip=%d "
           "ms_per_100KB=%.1f (400KB: %.1f ms, ratio %.2f) %s\n",
           name, n, ok_plain, ok_special, ok_dec, ok_skip, t100, t400, t400 / (t100 > 0 ? t100 : 1),
           all ? "OK" : "FAIL");
    uc_buf_fini(&big);
    uc_buf_fini(&corpus);
    uc_tokenizer_destroy(tok);
    cJSON_Delete(root);
    return all && t100 >= 0 ? 0 : 1;
}
