/* Unit tests for compress/: the matrix entropy of matrices with known spectra (UNCOMP.md section
 * 1), head grouping, budgets and stage sizes (sections 3-4 and 8, half-up rounding), stage
 * boundaries from layer scores, token and row selection (sections 5, 6 and 8: SnapKV with max
 * pooling, H2O, StreamingLLM, stage rows; ties to the lower position), the plan and its
 * checksum, the profile's JSON round trip and refusals, and parameter validation. */
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
#include "compress/entropy.h"
#include "compress/policy.h"
#include "compress/kvsharer.h"
#include "compress/profile.h"
#include "compress/select.h"
#include "compress/minicache.h"
#include "compress/think.h"
#include "test_util.h"

/* ---- log capture ------------------------------------------------------------------------- */


#define assert_has(hay, needle)                                                                    \
    do {                                                                                           \
        if (!strstr((hay), (needle))) {                                                            \
            fail_msg("'%s' not found in: %s", (needle), (hay));                                    \
        }                                                                                          \
    } while (0)

#define assert_near(a, b, tol)                                                                     \
    do {                                                                                           \
        double a_ = (a), b_ = (b);                                                                 \
        if (!(fabs(a_ - b_) <= (tol))) {                                                           \
            fail_msg("%s = %.12g, want %.12g (tol %g)", #a, a_, b_, (double)(tol));                \
        }                                                                                          \
    } while (0)

/* ---- entropy ------------------------------------------------------------------------------ */

/* Entropy of x (n, d) with truncation k, through the public one-call path. */
static double entropy(const float *x, int64_t n, int64_t d, int64_t stride, int64_t k)
{
    double h = -1;
    assert_int_equal(uc_entropy_of_rows(&h, x, n, d, stride, k), UC_OK);
    return h;
}

/* Rows +e_i and -e_i for every i: centred already, unit norm, C = I / d. */
static void test_entropy_orthogonal_rows(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    enum { D = 8, N = 2 * D };
    float x[N * D] = {0};
    for (int i = 0; i < D; i++) {
        x[(2 * i) * D + i] = 1.0f;
        x[(2 * i + 1) * D + i] = -1.0f;
    }
    double cov[D * D], eig[D];
    assert_int_equal(uc_entropy_cov(cov, x, N, D, D), UC_OK);
    for (int i = 0; i < D; i++) {
        for (int j = 0; j < D; j++) {
            assert_near(cov[i * D + j], i == j ? 1.0 / D : 0.0, 1e-15);
        }
    }
    assert_int_equal(uc_entropy_eigvals(eig, cov, D), UC_OK);
    for (int i = 0; i < D; i++) {
        assert_near(eig[i], 1.0 / D, 1e-14);
    }
    assert_near(entropy(x, N, D, D, D), 1.0, 1e-12);     /* full: log d / log d */
    assert_near(entropy(x, N, D, D, 2), 0.25, 1e-12);    /* k = d/4 of d equal terms */
    assert_near(entropy(x, N, D, D, 0), 0.25, 1e-12);    /* 0 = the default k = d/4 */
    assert_near(entropy(x, N, D, D, 100), 1.0, 1e-12);   /* k > d clamps */
    /* effective rank exp(H_d ln d) = d */
    assert_near(exp(entropy(x, N, D, D, D) * log((double)D)), (double)D, 1e-9);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void assert_spectra_equal(const double *got, const double *want, int64_t d)
{
    for (int64_t i = 0; i < d; i++) {
        assert_near(got[i], want[i], 1e-13);
    }
}

/* issue 17: the spectrum accumulated a slice of rows at a time (as a calibration window's
 * prefill slices arrive) equals the one-piece spectrum, on the covariance path (n >= d, slices
 * in any order) and on the Gram path (n < d, slices in order); the accumulator is reused across
 * sizes; missing rows and an out-of-order Gram slice are refused. */
static void test_entropy_sliced(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    enum { N = 150, D = 24, STRIDE = 30 };
    float *x = uc_malloc((size_t)(N * STRIDE) * sizeof(float));
    double want[D], got[D];
    uc_test_fill(x, N * STRIDE, 41, 0, 0);
    for (int64_t i = 0; i < N; i++) { /* a non-zero mean, so the centring matters */
        x[i * STRIDE + 3] += 2.0f;
    }
    struct uc_entropy_acc a;
    memset(&a, 0, sizeof a);
    /* covariance path: slices of 1, 70 (past a chunk), 64, 15, added out of order */
    assert_int_equal(uc_entropy_eigvals_of_rows(want, x, N, D, STRIDE), UC_OK);
    assert_int_equal(uc_entropy_acc_begin(&a, x, N, D, STRIDE), UC_OK);
    assert_false(a.gram);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 71, 64), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 0, 1), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 135, 15), UC_OK);
    assert_int_equal(uc_entropy_acc_eigvals(&a, got), UC_ERR_INVALID_ARG); /* 70 rows missing */
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 1, 70), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 140, 11), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_entropy_acc_eigvals(&a, got), UC_OK);
    assert_spectra_equal(got, want, D);
    assert_true(want[0] > 0.05 && want[0] < 1.0);
    /* Gram path (10 rows of 24): slices of 3, 3, 4 in order */
    int64_t n = 10;
    assert_int_equal(uc_entropy_eigvals_of_rows(want, x, n, D, STRIDE), UC_OK);
    assert_int_equal(uc_entropy_acc_begin(&a, x, n, D, STRIDE), UC_OK);
    assert_true(a.gram);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 0, 3), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 6, 4), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 3, 3), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 6, 4), UC_OK);
    assert_int_equal(uc_entropy_acc_eigvals(&a, got), UC_OK);
    assert_spectra_equal(got, want, D);
    assert_true(got[n] == 0.0 && got[D - 1] == 0.0 && got[0] > 0.1);
    /* the mean a slice at a time too (as the rows of a layer are produced); no _add before
     * every row is in the mean */
    assert_int_equal(uc_entropy_acc_reset(&a, n, D), UC_OK);
    assert_int_equal(uc_entropy_acc_mean(&a, x, STRIDE, 4), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 0, 4), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_entropy_acc_mean(&a, x + 4 * STRIDE, STRIDE, 6), UC_OK);
    assert_int_equal(uc_entropy_acc_mean(&a, x, STRIDE, 1), UC_ERR_INVALID_ARG); /* 11 of 10 */
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 0, 4), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 4, 6), UC_OK);
    assert_int_equal(uc_entropy_acc_eigvals(&a, got), UC_OK);
    assert_spectra_equal(got, want, D);
    /* the same rows again into the reused buffers, in one slice */
    assert_int_equal(uc_entropy_acc_begin(&a, x, n, D, STRIDE), UC_OK);
    assert_int_equal(uc_entropy_acc_add(&a, x, STRIDE, 0, n), UC_OK);
    assert_int_equal(uc_entropy_acc_eigvals(&a, got), UC_OK);
    assert_spectra_equal(got, want, D);
    uc_entropy_acc_fini(&a);
    uc_entropy_acc_fini(&a); /* safe twice */
    uc_free(x);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Every row a multiple of one vector: after centring and normalising, C = v v^T: entropy 0. */
static void test_entropy_rank_one(void **state)
{
    (void)state;
    enum { D = 16, N = 6 };
    float v[D], x[N * D];
    uc_test_fill(v, D, 3, 0, 0);
    const float a[N] = {2.0f, -1.0f, 3.0f, -4.0f, 0.5f, -0.5f}; /* sums to 0 */
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < D; j++) {
            x[i * D + j] = a[i] * v[j];
        }
    }
    assert_near(entropy(x, N, D, D, D), 0.0, 1e-9);
    assert_near(entropy(x, N, D, D, 4), 0.0, 1e-9);
    double cov[D * D], eig[D];
    assert_int_equal(uc_entropy_cov(cov, x, N, D, D), UC_OK);
    assert_int_equal(uc_entropy_eigvals(eig, cov, D), UC_OK);
    assert_near(eig[0], 1.0, 1e-12); /* trace 1, all in one direction */
    for (int i = 1; i < D; i++) {
        assert_true(eig[i] >= 0.0); /* tiny negatives clamped */
        assert_near(eig[i], 0.0, 1e-12);
    }
}

/* Rows +-e0 three times each and +-e1 once each: eigenvalues 3/4 and 1/4 exactly. */
static void test_entropy_known_spectrum(void **state)
{
    (void)state;
    enum { D = 4, N = 8 };
    float x[N * D] = {0};
    for (int i = 0; i < 6; i++) {
        x[i * D + 0] = i % 2 ? -1.0f : 1.0f;
    }
    x[6 * D + 1] = 1.0f;
    x[7 * D + 1] = -1.0f;
    double h1 = -0.75 * log(0.75) / log(4.0);
    double h2 = h1 - 0.25 * log(0.25) / log(4.0);
    assert_near(entropy(x, N, D, D, 1), h1, 1e-12);
    assert_near(entropy(x, N, D, D, 2), h2, 1e-12);
    assert_near(entropy(x, N, D, D, 4), h2, 1e-12); /* zero eigenvalues add nothing */
    assert_near(entropy(x, N, D, D, 0), h1, 1e-12); /* default k = max(1, 4/4) = 1 */

    /* centring: adding the same offset to every row changes nothing */
    float y[N * D];
    for (int i = 0; i < N * D; i++) {
        y[i] = x[i] + (float)(i % D) * 3.0f - 5.0f;
    }
    assert_near(entropy(y, N, D, D, 2), h2, 1e-9);
    /* normalisation: scaling rows by positive factors changes nothing (pairs share a factor so
     * the rows stay centred) */
    for (int i = 0; i < N; i += 2) {
        for (int j = 0; j < D; j++) {
            y[i * D + j] = x[i * D + j] * (float)(i + 1);
            y[(i + 1) * D + j] = x[(i + 1) * D + j] * (float)(i + 1);
        }
    }
    assert_near(entropy(y, N, D, D, 2), h2, 1e-12);
    /* the stride: the same rows inside wider ones */
    enum { LD = 7 };
    float w[N * LD];
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < LD; j++) {
            w[i * LD + j] = j < D ? x[i * D + j] : 99.0f;
        }
    }
    assert_near(entropy(w, N, D, LD, 2), h2, 1e-12);
}

/* A row equal to the mean is zero after centring: it stays zero (no NaN) and still counts in N,
 * so the covariance has trace (N - zero rows) / N. */
static void test_entropy_zero_rows(void **state)
{
    (void)state;
    enum { D = 2, N = 6 };
    const float x[N * D] = {1, 0, -1, 0, 0, 1, 0, -1, 0, 0, 0, 0};
    double cov[D * D];
    assert_int_equal(uc_entropy_cov(cov, x, N, D, D), UC_OK);
    assert_near(cov[0], 2.0 / 6.0, 1e-15);
    assert_near(cov[3], 2.0 / 6.0, 1e-15);
    assert_near(cov[1], 0.0, 1e-15);
    assert_near(cov[2], 0.0, 1e-15);
    /* all rows identical: everything is zero, the entropy is 0 (not NaN) */
    float same[3 * D] = {1, 2, 1, 2, 1, 2};
    double h = entropy(same, 3, D, D, D);
    assert_near(h, 0.0, 0.0);
}

static void test_entropy_eigvals_and_helpers(void **state)
{
    (void)state;
    /* [[2,1],[1,2]]: 3 and 1, descending */
    double c2[4] = {2, 1, 1, 2}, e2[2];
    assert_int_equal(uc_entropy_eigvals(e2, c2, 2), UC_OK);
    assert_near(e2[0], 3.0, 1e-12);
    assert_near(e2[1], 1.0, 1e-12);
    /* a diagonal with a tiny negative: sorted, clamped */
    double c4[16] = {0.1, 0, 0, 0, 0, 0.5, 0, 0, 0, 0, -1e-17, 0, 0, 0, 0, 0.4}, e4[4];
    assert_int_equal(uc_entropy_eigvals(e4, c4, 4), UC_OK);
    assert_near(e4[0], 0.5, 1e-15);
    assert_near(e4[1], 0.4, 1e-15);
    assert_near(e4[2], 0.1, 1e-15);
    assert_true(e4[3] == 0.0);
    /* uc_entropy_of_cov */
    double c3[9] = {0.5, 0, 0, 0, 0.25, 0, 0, 0, 0.25}, h;
    assert_int_equal(uc_entropy_of_cov(&h, c3, 3, 3), UC_OK);
    assert_near(h, (0.5 * log(2.0) + 0.5 * log(4.0)) / log(3.0), 1e-12);
    /* truncated entropy by hand */
    const double eig[4] = {0.5, 0.25, 0.25, 0.0};
    assert_near(uc_entropy_truncated(eig, 4, 1), 0.5 * log(2.0) / log(4.0), 1e-15);
    assert_near(uc_entropy_truncated(eig, 4, 3), 1.5 * log(2.0) / log(4.0), 1e-15);
    assert_near(uc_entropy_truncated(eig, 4, 9), 0.75, 1e-15);
    assert_near(uc_entropy_truncated(eig, 4, 0), 0.0, 0.0);
    assert_near(uc_entropy_truncated(eig, 1, 1), 0.0, 0.0); /* d = 1: no normaliser */
    assert_int_equal(uc_entropy_default_k(128), 32);
    assert_int_equal(uc_entropy_default_k(64), 16);
    assert_int_equal(uc_entropy_default_k(8), 2);
    assert_int_equal(uc_entropy_default_k(7), 1);
    assert_int_equal(uc_entropy_default_k(4), 1);
    assert_int_equal(uc_entropy_default_k(1), 1);
    /* a backend's truncated spectra: two of d = 4, the largest 2 kept, the rest 0 */
    double sp[8] = {0.5, 0.3, 0.15, 0.05, 0.4, 0.3, 0.2, 0.1};
    uc_entropy_keep_top(sp, 2, 4, 2);
    const double want[8] = {0.5, 0.3, 0, 0, 0.4, 0.3, 0, 0};
    for (int i = 0; i < 8; i++) {
        assert_true(sp[i] == want[i]);
    }
    assert_near(uc_entropy_truncated(sp, 4, 2), -(0.5 * log(0.5) + 0.3 * log(0.3)) / log(4.0),
                1e-15);
    uc_entropy_keep_top(sp + 4, 1, 4, 0); /* 0 and d or more: the whole spectrum stays */
    uc_entropy_keep_top(sp + 4, 1, 4, 4);
    assert_true(sp[4] == 0.4 && sp[5] == 0.3);
    /* refusals and allocation failures */
    int64_t blocks = uc_mem_blocks_in_use();
    float x[8] = {1, 0, 0, 1, -1, 0, 0, -1};
    double cov[4];
    tu_log_reset();
    assert_int_equal(uc_entropy_cov(cov, x, 0, 2, 2), UC_ERR_INVALID_ARG);
    assert_has(tu_log_text, "rows=0");
    assert_int_equal(uc_entropy_cov(cov, x, 4, 0, 2), UC_ERR_INVALID_ARG);
    for (int64_t n = 1; n <= 6; n++) {
        uc_mem_fail_after(n);
        uc_status rc = uc_entropy_of_rows(&h, x, 4, 2, 2, 0);
        uc_mem_fail_after(0);
        assert_true(rc == UC_ERR_NOMEM || (n > 5 && rc == UC_OK));
        assert_int_equal(uc_mem_blocks_in_use(), blocks);
    }
}

/* ---- grouping ----------------------------------------------------------------------------- */

/* Fewer rows than features: the spectrum through the Gram matrix equals the covariance's (the
 * hidden-state spectrum of a 1024-token window of a 4096-wide model takes this path). */
static void test_entropy_gram_path(void **state)
{
    (void)state;
    enum { N = 9, D = 24 };
    float x[N * D];
    uint64_t r = 12345;
    for (int i = 0; i < N * D; i++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = (float)((double)(r >> 11) / 9007199254740992.0 - 0.5) + (i % D == 3 ? 2.0f : 0.0f);
    }
    double cov[D * D], ref[D], got[D];
    assert_int_equal(uc_entropy_cov(cov, x, N, D, D), UC_OK);
    assert_int_equal(uc_entropy_eigvals(ref, cov, D), UC_OK);
    assert_int_equal(uc_entropy_eigvals_of_rows(got, x, N, D, D), UC_OK);
    double sum = 0;
    for (int i = 0; i < D; i++) {
        assert_true(fabs(got[i] - ref[i]) < 1e-12);
        sum += got[i];
    }
    assert_true(fabs(sum - 1.0) < 1e-12); /* trace 1: every row had a nonzero norm */
    assert_true(got[N - 1] < 1e-12);      /* centred rows: rank at most N - 1 */
    /* as many rows as features: the covariance path, same numbers */
    float y[D * D];
    for (int i = 0; i < D * D; i++) {
        y[i] = x[i % (N * D)] * (float)(1 + i / (N * D));
    }
    assert_int_equal(uc_entropy_cov(cov, y, D, D, D), UC_OK);
    assert_int_equal(uc_entropy_eigvals(ref, cov, D), UC_OK);
    assert_int_equal(uc_entropy_eigvals_of_rows(got, y, D, D, D), UC_OK);
    for (int i = 0; i < D; i++) {
        assert_true(fabs(got[i] - ref[i]) < 1e-15);
    }
}

static void test_group_heads(void **state)
{
    (void)state;
    int32_t g[300];
    const double e4[4] = {0.5, 0.1, 0.9, 0.3};
    uc_group_heads(g, e4, 4, 2);
    assert_int_equal(g[0], 1);
    assert_int_equal(g[1], 0);
    assert_int_equal(g[2], 1);
    assert_int_equal(g[3], 0);
    /* ties: by head index */
    const double tie[4] = {0.5, 0.5, 0.5, 0.5};
    uc_group_heads(g, tie, 4, 2);
    assert_int_equal(g[0], 0);
    assert_int_equal(g[1], 0);
    assert_int_equal(g[2], 1);
    assert_int_equal(g[3], 1);
    const double tie2[6] = {0.2, 0.7, 0.2, 0.7, 0.2, 0.7};
    uc_group_heads(g, tie2, 6, 3); /* order 0 2 4 1 3 5 */
    const int32_t want2[6] = {0, 1, 0, 2, 1, 2};
    assert_memory_equal(g, want2, sizeof want2);
    /* uneven: group g holds ranks [floor(n g / m), floor(n (g + 1) / m)) */
    const double e5[5] = {5, 4, 3, 2, 1};
    uc_group_heads(g, e5, 5, 2); /* ranks: head 4, 3 | 2, 1, 0 */
    const int32_t want5[5] = {1, 1, 1, 0, 0};
    assert_memory_equal(g, want5, sizeof want5);
    const double e7[7] = {0, 1, 2, 3, 4, 5, 6};
    uc_group_heads(g, e7, 7, 3); /* sizes 2, 2, 3 */
    const int32_t want7[7] = {0, 0, 1, 1, 2, 2, 2};
    assert_memory_equal(g, want7, sizeof want7);
    uc_group_heads(g, e7, 7, 1);
    for (int i = 0; i < 7; i++) {
        assert_int_equal(g[i], 0);
    }
    /* more heads than the stack buffer: the same rule */
    double big[300];
    for (int j = 0; j < 300; j++) {
        big[j] = (double)((j * 7) % 300);
    }
    int64_t blocks = uc_mem_blocks_in_use();
    uc_group_heads(g, big, 300, 2);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    for (int j = 0; j < 300; j++) {
        assert_int_equal(g[j], big[j] >= 150.0 ? 1 : 0);
    }
}

/* ---- budgets and stages -------------------------------------------------------------------- */

static int cmp_desc_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x < y) - (x > y);
}

/* The r-th largest group budget of a layer (what admission reserves with prompt grouping)
 * is the r-th largest of the budgets any entropies give its heads. */
static void test_group_budget_nth(void **state)
{
    (void)state;
    uint64_t seed = 12345;
    for (int64_t n = 1; n <= 13; n++) {
        for (int32_t m = 1; m <= 4 && m <= n; m++) {
            for (int trial = 0; trial < 5; trial++) {
                double ent[13];
                int32_t g[13], b[13];
                for (int64_t j = 0; j < n; j++) {
                    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
                    ent[j] = (double)(seed >> 40) / (double)(1 << 24);
                }
                uc_group_heads(g, ent, n, m);
                for (int64_t j = 0; j < n; j++) {
                    b[j] = uc_group_budget(410, g[j], m, 1.0f / 3.0f);
                }
                qsort(b, (size_t)n, sizeof b[0], cmp_desc_i32);
                for (int64_t r = 0; r < n; r++) {
                    assert_int_equal(uc_group_budget_nth(410, n, m, 1.0f / 3.0f, r), b[r]);
                }
            }
        }
    }
}

static void test_budgets(void **state)
{
    (void)state;
    const float s = 1.0f / 3.0f;
    /* UNCOMP.md section 4: B = 384, m = 2 gives 256 / 512 */
    assert_int_equal(uc_group_budget(384, 0, 2, s), 256);
    assert_int_equal(uc_group_budget(384, 1, 2, s), 512);
    assert_int_equal(uc_group_budget(128, 0, 2, s), 85);  /* 85.33 */
    assert_int_equal(uc_group_budget(128, 1, 2, s), 171); /* 170.67 */
    assert_int_equal(uc_group_budget(300, 0, 3, s), 200);
    assert_int_equal(uc_group_budget(300, 1, 3, s), 300);
    assert_int_equal(uc_group_budget(300, 2, 3, s), 400);
    assert_int_equal(uc_group_budget(300, 0, 1, s), 300);
    assert_int_equal(uc_group_budget(300, 1, 2, 0.0f), 300);
    /* half up: 1.5 -> 2 and 4.5 -> 5 (round-half-even would give 2 and 4) */
    assert_int_equal(uc_group_budget(3, 0, 2, 0.5f), 2);
    assert_int_equal(uc_group_budget(3, 1, 2, 0.5f), 5);
    assert_int_equal(uc_group_budget(5, 0, 2, 0.5f), 3); /* 2.5 -> 3 */
    assert_int_equal(uc_round_half_up(2.5), 3);
    assert_int_equal(uc_round_half_up(-2.5), -2);
    assert_int_equal(uc_round_half_up(2.4999), 2);

    /* pyramidkv: 1.5 B at the first layer, 0.5 B at the last, mean B */
    int64_t sum = 0;
    const int32_t want8[8] = {192, 174, 155, 137, 119, 101, 82, 64};
    for (int l = 0; l < 8; l++) {
        int32_t b = uc_pyramid_budget(128, l, 8);
        assert_int_equal(b, want8[l]);
        sum += b;
    }
    assert_int_equal(sum, 8 * 128);
    for (int64_t L = 2; L <= 40; L++) {
        double mean = 0;
        for (int64_t l = 0; l < L; l++) {
            mean += uc_pyramid_budget(384, l, L);
        }
        assert_near(mean / (double)L, 384.0, 0.5);
        assert_int_equal(uc_pyramid_budget(384, 0, L), 576);
        assert_int_equal(uc_pyramid_budget(384, L - 1, L), 192);
    }
    assert_int_equal(uc_pyramid_budget(3, 0, 3), 5); /* 4.5 */
    assert_int_equal(uc_pyramid_budget(3, 1, 3), 3);
    assert_int_equal(uc_pyramid_budget(3, 2, 3), 2); /* 1.5 */
    assert_int_equal(uc_pyramid_budget(77, 0, 1), 77);
}

static void test_stage_rows(void **state)
{
    (void)state;
    /* the reference's 1536 of 4096 */
    assert_int_equal(uc_stage_rows(4096, 0, 2, 0.375f, 0), 4096);
    assert_int_equal(uc_stage_rows(4096, 1, 2, 0.375f, 0), 1536);
    assert_int_equal(uc_stage_rows(4096, 1, 3, 0.375f, 0), 2816); /* 1 - 0.625 / 2 */
    assert_int_equal(uc_stage_rows(4096, 2, 3, 0.375f, 0), 1536);
    assert_int_equal(uc_stage_rows(1000, 1, 2, 0.375f, 0), 375);  /* exact: no ceil bump */
    assert_int_equal(uc_stage_rows(100, 1, 2, 0.375f, 0), 38);    /* ceil(37.5) */
    assert_int_equal(uc_stage_rows(101, 1, 3, 0.5f, 0), 76);      /* ceil(75.75) */
    assert_int_equal(uc_stage_rows(100, 1, 2, 0.375f, 50), 50);   /* at least min_rows */
    assert_int_equal(uc_stage_rows(100, 1, 2, 0.375f, 500), 100); /* at most n0 */
    assert_int_equal(uc_stage_rows(100, 3, 1, 0.375f, 0), 100);   /* one stage */
    assert_int_equal(uc_stage_rows(100, 1, 2, 1.0f, 0), 100);
    /* monotone in c */
    int64_t prev = 1 << 30;
    for (int32_t c = 0; c < 6; c++) {
        int64_t r = uc_stage_rows(5000, c, 6, 0.25f, 0);
        assert_true(r < prev);
        prev = r;
    }
    assert_int_equal(prev, 1250);
}

/* Regression (compress/policy.c, uc_stage_rows): r_min arrives as a float, so r_min = 0.3 is
 * 0.30000001192 and n0 x 0.3000000119 = 3.0000001 for n0 = 10; the 1e-9 guard before ceil() is
 * far below float precision, and the stage keeps 4 rows where UNCOMP.md's ceil(n0 r_min) gives
 * 3 (the daemon's --r-min 0.3 reaches here as (float)0.3). Likewise 0.6 x 1000 -> 601. */
static void test_regression_stage_rows_float_r_min(void **state)
{
    (void)state;
    int64_t a = uc_stage_rows(10, 1, 2, 0.3f, 0);
    int64_t b = uc_stage_rows(1000, 1, 2, 0.6f, 0);
    if (a != 3 || b != 600) {
        fail_msg("regression: uc_stage_rows(10, 1, 2, 0.3f) = %lld (want 3), uc_stage_rows(1000, 1, 2, "
                 "0.6f) = %lld (want 600)", (long long)a, (long long)b);
    }
}

static void test_stage_starts(void **state)
{
    (void)state;
    int32_t st[16];
    /* UNCOMP.md section 9: uncomp-tiny's scores start stages at layers 6 and 7 with eps = 1
     * (the drops at layers 3 and 5 are exactly 1.0, not more) */
    const double s[8] = {53.6, 59.7, 59.1, 58.1, 57.6, 56.6, 54.7, 53.5};
    assert_int_equal(uc_stage_starts_from_scores(st, 15, s, 8, 1.0), 2);
    assert_int_equal(st[0], 6);
    assert_int_equal(st[1], 7);
    assert_int_equal(uc_stage_starts_from_scores(st, 15, s, 8, 0.55), 5);
    const int32_t want[5] = {2, 3, 5, 6, 7};
    assert_memory_equal(st, want, sizeof want);
    assert_int_equal(uc_stage_starts_from_scores(st, 2, s, 8, 0.55), 2); /* max_out */
    assert_int_equal(st[0], 2);
    assert_int_equal(st[1], 3);
    assert_int_equal(uc_stage_starts_from_scores(st, 15, s, 8, 5.0), 0);
    assert_int_equal(uc_stage_starts_from_scores(st, 15, s, 1, 0.0), 0);
}

/* ---- selection ------------------------------------------------------------------------------ */

static void *scratch_for(int64_t n)
{
    void *p = malloc(uc_select_scratch_bytes(n)); /* exact size: ASan sees any overrun */
    assert_non_null(p);
    return p;
}

static void test_topk_and_maxpool(void **state)
{
    (void)state;
    void *sc = scratch_for(10);
    int32_t out[10];
    const double s[10] = {1, 5, 3, 5, 0, 5, 2, NAN, 4, -1};
    /* ties: lower position first; NaN is never chosen over a number; output ascending */
    assert_int_equal(uc_topk_lowpos(out, s, 10, 2, sc), 2);
    assert_int_equal(out[0], 1);
    assert_int_equal(out[1], 3);
    assert_int_equal(uc_topk_lowpos(out, s, 10, 4, sc), 4);
    const int32_t w4[4] = {1, 3, 5, 8};
    assert_memory_equal(out, w4, sizeof w4);
    assert_int_equal(uc_topk_lowpos(out, s, 10, 9, sc), 9);
    for (int i = 0; i < 9; i++) {
        assert_true(out[i] != 7);
        if (i) {
            assert_true(out[i] > out[i - 1]);
        }
    }
    assert_int_equal(uc_topk_lowpos(out, s, 10, 50, sc), 10);
    assert_int_equal(uc_topk_lowpos(out, s, 10, 0, sc), 0);
    assert_int_equal(uc_topk_lowpos(out, s, 10, -3, sc), 0);
    free(sc);

    double p[10];
    const double sp[10] = {0, 0, 5, 0, 0, 0, 0, 0, 0, 1};
    uc_maxpool1d(p, sp, 10, 3, NULL);
    const double w3[10] = {0, 5, 5, 5, 0, 0, 0, 0, 1, 1};
    assert_memory_equal(p, w3, sizeof w3);
    uc_maxpool1d(p, sp, 10, 7, NULL); /* padding 3 */
    const double w7[10] = {5, 5, 5, 5, 5, 5, 1, 1, 1, 1};
    assert_memory_equal(p, w7, sizeof w7);
    uc_maxpool1d(p, sp, 10, 1, NULL);
    assert_memory_equal(p, sp, sizeof sp);
    uc_maxpool1d(p, sp, 2, 7, NULL);
    assert_true(p[0] == 0 && p[1] == 0);
}

/* Reference selections, written the obvious way: a window max per position, and k rounds of
 * "the largest score not yet taken, lowest position on ties". */
static void ref_maxpool(double *out, const double *s, int64_t n, int32_t kernel)
{
    for (int64_t i = 0; i < n; i++) {
        double m = -INFINITY;
        for (int64_t j = i - kernel / 2; j <= i + kernel / 2; j++) {
            if (j >= 0 && j < n && s[j] > m) {
                m = s[j];
            }
        }
        out[i] = m;
    }
}

static int64_t ref_topk(int32_t *out, const double *s, int64_t n, int64_t k, bool *taken)
{
    memset(taken, 0, (size_t)n);
    for (int64_t r = 0; r < k && r < n; r++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++) {
            double v = isnan(s[i]) ? -INFINITY : s[i];
            double b = best < 0 ? 0 : (isnan(s[best]) ? -INFINITY : s[best]);
            if (!taken[i] && (best < 0 || v > b)) {
                best = i;
            }
        }
        taken[best] = true;
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (taken[i]) {
            out[m++] = (int32_t)i;
        }
    }
    return m;
}

/* The O(n) pooling (with scratch) and the threshold top-k against the references on random
 * scores with many ties, NaNs and -inf, every kernel size the policies use and odd lengths. */
static void test_select_fast_equals_reference(void **state)
{
    (void)state;
    struct uc_rng r;
    uc_rng_seed(&r, 77);
    enum { NMAX = 700 };
    double *s = malloc(NMAX * sizeof(double)), *a = malloc(NMAX * sizeof(double));
    double *b = malloc(NMAX * sizeof(double)), *pre = malloc(NMAX * sizeof(double));
    int32_t *o1 = malloc(NMAX * sizeof(int32_t)), *o2 = malloc(NMAX * sizeof(int32_t));
    bool *taken = malloc(NMAX);
    void *sc = scratch_for(NMAX);
    assert_true(s && a && b && pre && o1 && o2 && taken);
    for (int trial = 0; trial < 300; trial++) {
        int64_t n = 1 + (int64_t)(uc_rng_next(&r) % NMAX);
        int levels = 1 + (int)(uc_rng_next(&r) % 12); /* few levels: many ties */
        for (int64_t i = 0; i < n; i++) {
            uint64_t u = uc_rng_next(&r);
            s[i] = u % 31 == 0 ? NAN : u % 37 == 0 ? -INFINITY : (double)(u % (uint64_t)levels);
        }
        int32_t kernel = 1 + 2 * (int32_t)(uc_rng_next(&r) % 8);
        ref_maxpool(a, s, n, kernel);
        uc_maxpool1d(b, s, n, kernel, pre);
        assert_memory_equal(a, b, (size_t)n * sizeof(double));
        uc_maxpool1d(b, s, n, kernel, NULL);
        assert_memory_equal(a, b, (size_t)n * sizeof(double));
        int64_t k = (int64_t)(uc_rng_next(&r) % (uint64_t)(n + 2));
        int64_t m1 = ref_topk(o1, a, n, k, taken), m2 = uc_topk_lowpos(o2, a, n, k, sc);
        assert_int_equal(m1, m2);
        assert_memory_equal(o1, o2, (size_t)m1 * sizeof(int32_t));
    }
    free(s);
    free(a);
    free(b);
    free(pre);
    free(o1);
    free(o2);
    free(taken);
    free(sc);
}

static void test_select_snapkv(void **state)
{
    (void)state;
    enum { N = 20 };
    void *sc = scratch_for(N);
    int32_t keep[N];
    double s[N] = {0};
    s[10] = 1.0;
    s[3] = 0.5;
    s[18] = 100.0; /* inside the window: never scored */
    /* kernel 1 (no pooling): top 2 of the first 16 by score, then the 4 window positions */
    assert_int_equal(uc_select_snapkv(keep, s, N, 6, 4, 1, sc), 6);
    const int32_t w1[6] = {3, 10, 16, 17, 18, 19};
    assert_memory_equal(keep, w1, sizeof w1);
    /* kernel 7: position 10's score spreads over 7..13 (ties: lowest first), 3's over 0..6 */
    assert_int_equal(uc_select_snapkv(keep, s, N, 8, 4, 7, sc), 8);
    const int32_t w7[8] = {7, 8, 9, 10, 16, 17, 18, 19};
    assert_memory_equal(keep, w7, sizeof w7);
    assert_int_equal(uc_select_snapkv(keep, s, N, 14, 4, 7, sc), 14);
    /* 7 ones (7..13), then three of the 0.5s (0, 1, 2: ties to the lower position) */
    const int32_t w14[14] = {0, 1, 2, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 19};
    assert_memory_equal(keep, w14, sizeof w14);
    /* pooling happens in position order over the first n - W only: the window's 100 does not
     * leak into position 15 */
    assert_int_equal(uc_select_snapkv(keep, s, N, 5, 4, 7, sc), 5);
    assert_int_equal(keep[0], 7);
    /* budget >= n keeps everything */
    assert_int_equal(uc_select_snapkv(keep, s, N, N, 4, 7, sc), N);
    assert_int_equal(uc_select_snapkv(keep, s, N, 1000, 4, 7, sc), N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(keep[i], i);
    }
    /* budget == window: just the window */
    assert_int_equal(uc_select_snapkv(keep, s, N, 4, 4, 7, sc), 4);
    assert_int_equal(keep[0], 16);
    free(sc);
}

static void test_select_h2o_streaming_rows(void **state)
{
    (void)state;
    enum { N = 10 };
    void *sc = scratch_for(N);
    int32_t keep[N];
    /* h2o: the recent floor(B/2) plus the heaviest before them */
    const double acc[N] = {9, 1, 7, 7, 2, 8, 0, 50, 50, 50};
    assert_int_equal(uc_select_h2o(keep, acc, N, 6, sc), 6); /* recent 7,8,9; heavy 0,5 and 2 */
    const int32_t h6[6] = {0, 2, 5, 7, 8, 9};
    assert_memory_equal(keep, h6, sizeof h6);
    assert_int_equal(uc_select_h2o(keep, acc, N, 7, sc), 7); /* recent 3 (7..9); heavy 4 of 0..6 */
    const int32_t h7[7] = {0, 2, 3, 5, 7, 8, 9};
    assert_memory_equal(keep, h7, sizeof h7);
    assert_int_equal(uc_select_h2o(keep, acc, N, 2, sc), 2); /* recent 9; heaviest of 0..8: 7 */
    assert_int_equal(keep[0], 7);
    assert_int_equal(keep[1], 9);
    assert_int_equal(uc_select_h2o(keep, acc, N, 10, sc), 10);
    /* streamingllm: the first `sink` and the most recent budget - sink */
    assert_int_equal(uc_select_streaming(keep, N, 6, 4), 6);
    const int32_t s6[6] = {0, 1, 2, 3, 8, 9};
    assert_memory_equal(keep, s6, sizeof s6);
    assert_int_equal(uc_select_streaming(keep, N, 3, 0), 3);
    assert_int_equal(keep[0], 7);
    assert_int_equal(uc_select_streaming(keep, N, 12, 4), N);
    assert_int_equal(keep[9], 9);
    /* stage rows: top keep_n - W of the first n - W (ties: lower), then the last W */
    const double rs[N] = {3, 1, 3, 0, 3, 2, 3, 1, 9, 9};
    assert_int_equal(uc_select_rows(keep, rs, N, 5, 2, sc), 5);
    const int32_t r5[5] = {0, 2, 4, 8, 9};
    assert_memory_equal(keep, r5, sizeof r5);
    assert_int_equal(uc_select_rows(keep, rs, N, 2, 2, sc), 2);
    assert_int_equal(keep[0], 8);
    assert_int_equal(uc_select_rows(keep, rs, N, N, 2, sc), N);
    free(sc);
}

/* ---- plans --------------------------------------------------------------------------------- */

static void test_plan(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_plan a, b;
    assert_int_equal(uc_plan_init(&a, 4, 4), UC_OK);
    assert_int_equal(uc_plan_init(&b, 4, 4), UC_OK);
    for (int i = 0; i < 16; i++) {
        assert_int_equal(a.group[i], -1);
        assert_true(isnan(a.entropy[i]));
        assert_int_equal(a.budget[i], 0);
    }
    struct uc_compress_params p = uc_compress_default_params();
    const double ent[4] = {0.8, 0.2, 0.5, 0.1};
    /* full */
    p.policy = UC_POLICY_FULL;
    uc_plan_set_layer(&a, &p, 0, NULL);
    assert_int_equal(a.budget[0], INT32_MAX);
    /* snapkv / h2o / streamingllm: B everywhere */
    p.policy = UC_POLICY_SNAPKV;
    p.kv_budget = 64;
    uc_plan_set_layer(&a, &p, 1, NULL);
    for (int j = 0; j < 4; j++) {
        assert_int_equal(a.budget[4 + j], 64);
        assert_int_equal(a.group[4 + j], -1);
    }
    /* pyramidkv: by layer */
    p.policy = UC_POLICY_PYRAMIDKV;
    p.kv_budget = 128;
    uc_plan_set_layer(&a, &p, 3, NULL);
    assert_int_equal(a.budget[12], 64); /* last of 4 layers: 0.5 B */
    /* uncomp: groups from the entropies, budgets per group */
    p.policy = UC_POLICY_UNCOMP;
    p.kv_budget = 384;
    uc_plan_set_layer(&a, &p, 2, ent);
    const int32_t wg[4] = {1, 0, 1, 0}, wb[4] = {512, 256, 512, 256};
    assert_memory_equal(a.group + 8, wg, sizeof wg);
    assert_memory_equal(a.budget + 8, wb, sizeof wb);
    assert_true(a.entropy[8] == 0.8 && a.entropy[11] == 0.1);
    /* the mean budget over KV heads is B */
    assert_int_equal((a.budget[8] + a.budget[9] + a.budget[10] + a.budget[11]) / 4, 384);

    /* checksums: equal plans agree; a budget, a group or a stage boundary changes it */
    uc_plan_fini(&a);
    assert_int_equal(uc_plan_init(&a, 4, 4), UC_OK);
    p.policy = UC_POLICY_SNAPKV;
    p.kv_budget = 64;
    for (int l = 0; l < 4; l++) {
        uc_plan_set_layer(&a, &p, l, NULL);
        uc_plan_set_layer(&b, &p, l, NULL);
    }
    uint64_t h = uc_plan_checksum(&a);
    assert_true(h == uc_plan_checksum(&b));
    b.budget[13]++;
    assert_true(uc_plan_checksum(&b) != h);
    b.budget[13]--;
    assert_true(uc_plan_checksum(&b) == h);
    p.kv_budget = 65;
    uc_plan_set_layer(&b, &p, 2, NULL);
    assert_true(uc_plan_checksum(&b) != h);
    p.kv_budget = 64;
    uc_plan_set_layer(&b, &p, 2, NULL);
    b.group[0] = 1;
    assert_true(uc_plan_checksum(&b) != h);
    b.group[0] = -1;
    b.n_stage_starts = 1;
    b.stage_starts[0] = 2;
    b.stage_rows[0] = 100;
    b.stage_rows[1] = 50;
    uint64_t hs = uc_plan_checksum(&b);
    assert_true(hs != h);
    b.stage_rows[1] = 51;
    assert_true(uc_plan_checksum(&b) != hs);
    b.n_stage_starts = 0;
    b.stage_rows[0] = 0;
    b.stage_rows[1] = 0;
    /* entropies are not part of it */
    b.entropy[5] = 0.123;
    assert_true(uc_plan_checksum(&b) == h);
    uc_plan_fini(&a);
    uc_plan_fini(&b);
    uc_plan_fini(&b); /* safe twice */
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    for (int64_t n = 1; n <= 3; n++) {
        uc_mem_fail_after(n);
        assert_int_equal(uc_plan_init(&a, 4, 4), UC_ERR_NOMEM);
        uc_mem_fail_after(0);
        assert_null(a.budget);
        assert_int_equal(uc_mem_blocks_in_use(), blocks);
    }
}

/* ---- profile ------------------------------------------------------------------------------- */

static char prof_path[64];

static void fill_profile(struct uc_profile *p)
{
    /* L = 4, H = 4, Hkv = 2 (2 query heads each); values with few decimals round-trip exactly */
    assert_int_equal(uc_profile_init(p, 4, 4, 2, 16, 64), UC_OK);
    const double le[4] = {0.55, 0.6, 0.58, 0.52}; /* x100: drops of 2 and 6 after layer 1 */
    for (int l = 0; l < 4; l++) {
        p->layer_entropy[l] = le[l];
        for (int h = 0; h < 4; h++) {
            p->head_entropy[l * 4 + h] = 0.125 * (double)((l + 3 * h) % 5) + 0.25;
        }
    }
    p->entropy_k_head = 4;
    p->entropy_k_hidden = 16;
    snprintf(p->source, sizeof p->source, "calib.txt");
    p->created_unix_ms = 1700000000123;
    p->calib_tokens = 4096;
    p->calib_windows = 4;
    p->model_hash = 0x0123456789abcdefULL;
    uc_profile_finish(p, 2, 1.0);
}

static void test_profile_round_trip(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    snprintf(prof_path, sizeof prof_path, "/tmp/uc_test_profile_%d.json", (int)getpid());
    struct uc_profile a;
    fill_profile(&a);
    /* finish: KV-head means, groups, stage boundaries from 100 x layer entropy */
    for (int l = 0; l < 4; l++) {
        for (int j = 0; j < 2; j++) {
            double m = (a.head_entropy[l * 4 + 2 * j] + a.head_entropy[l * 4 + 2 * j + 1]) / 2;
            assert_near(a.kv_entropy[l * 2 + j], m, 1e-15);
        }
        int32_t g[2];
        uc_group_heads(g, a.kv_entropy + l * 2, 2, 2);
        assert_memory_equal(a.kv_group + l * 2, g, sizeof g);
    }
    assert_int_equal(a.n_stage_starts, 2); /* 60 -> 58 (-2) and 58 -> 52 (-6) */
    assert_int_equal(a.stage_starts[0], 2);
    assert_int_equal(a.stage_starts[1], 3);
    assert_int_equal(uc_profile_save(&a, prof_path), UC_OK);

    struct uc_profile b;
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_load(&b, prof_path, 4, 4, 2), UC_OK);
    assert_int_equal(b.n_layers, 4);
    assert_int_equal(b.n_heads, 4);
    assert_int_equal(b.n_heads_kv, 2);
    assert_int_equal(b.head_dim, 16);
    assert_int_equal(b.hidden, 64);
    assert_int_equal(b.entropy_k_head, 4);
    assert_int_equal(b.entropy_k_hidden, 16);
    assert_string_equal(b.source, "calib.txt");
    assert_true(b.created_unix_ms == 1700000000123);
    assert_int_equal(b.calib_tokens, 4096);
    assert_int_equal(b.calib_windows, 4);
    assert_true(b.model_hash == 0x0123456789abcdefULL);
    assert_int_equal(b.head_groups, 2);
    assert_true(b.stage_eps == 1.0);
    assert_memory_equal(b.layer_entropy, a.layer_entropy, 4 * sizeof(double));
    assert_memory_equal(b.head_entropy, a.head_entropy, 16 * sizeof(double));
    assert_memory_equal(b.kv_entropy, a.kv_entropy, 8 * sizeof(double));
    assert_memory_equal(b.kv_group, a.kv_group, 8 * sizeof(int32_t));
    assert_int_equal(b.n_stage_starts, 2);
    assert_int_equal(b.stage_starts[0], 2);
    assert_int_equal(b.stage_starts[1], 3);
    uc_profile_fini(&b);

    /* the JSON names its fields */
    char *json = uc_profile_to_json(&a);
    assert_non_null(json);
    assert_has(json, "\"format\":\t\"uncomp-profile-v1\"");
    assert_has(json, "\"model_hash\":\t\"0123456789abcdef\"");
    assert_has(json, "\"num_kv_heads\":\t2");
    assert_has(json, "\"stage_starts\":\t[2, 3]");
    uc_free(json);
    uc_profile_fini(&a);
    uc_profile_fini(&a);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Replaces the first occurrence of `from` in the saved profile and parses the result. */
static uc_status parse_edited(struct uc_profile *p, const char *from, const char *to, int64_t L,
                              int64_t H, int64_t Hkv)
{
    char *text = NULL;
    assert_int_equal(uc_file_read_all(&text, NULL, prof_path), UC_OK);
    char *at = strstr(text, from);
    if (!at) {
        fail_msg("'%s' not in the profile", from);
    }
    size_t n = strlen(text) + strlen(to) + 1;
    char *ed = malloc(n);
    assert_non_null(ed);
    snprintf(ed, n, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    memset(p, 0, sizeof *p);
    tu_log_reset();
    uc_status rc = uc_profile_parse(p, ed, "/x/profile.json", L, H, Hkv);
    free(ed);
    uc_free(text);
    return rc;
}

static void test_profile_refusals(void **state)
{
    (void)state;
    struct uc_profile a, b;
    fill_profile(&a);
    assert_int_equal(uc_profile_save(&a, prof_path), UC_OK);
    uc_profile_fini(&a);
    int64_t blocks = uc_mem_blocks_in_use();

    /* shapes that differ from the model */
    const struct {
        int64_t L, H, Hkv;
        const char *field;
    } shapes[] = {{5, 4, 2, "field=num_layers=4 but the model has 5"},
                  {4, 8, 2, "field=num_heads=4 but the model has 8"},
                  {4, 4, 4, "field=num_kv_heads=2 but the model has 4"}};
    for (int i = 0; i < 3; i++) {
        memset(&b, 0, sizeof b);
        tu_log_reset();
        assert_int_equal(uc_profile_load(&b, prof_path, shapes[i].L, shapes[i].H, shapes[i].Hkv),
                         UC_ERR_FORMAT);
        assert_has(tu_log_text, shapes[i].field);
        assert_has(tu_log_text, prof_path);
        assert_null(b.layer_entropy);
        assert_int_equal(uc_mem_blocks_in_use(), blocks);
    }
    /* pinned stage boundaries win over the derived ones */
    assert_int_equal(parse_edited(&b, "[2, 3]", "[1, 3]", 4, 4, 2), UC_OK);
    assert_int_equal(b.n_stage_starts, 2);
    assert_int_equal(b.stage_starts[0], 1);
    assert_int_equal(b.stage_starts[1], 3);
    uc_profile_fini(&b);
    assert_int_equal(parse_edited(&b, "[2, 3]", "[3]", 4, 4, 2), UC_OK);
    assert_int_equal(b.n_stage_starts, 1);
    assert_int_equal(b.stage_starts[0], 3);
    uc_profile_fini(&b);
    /* without the array, the boundaries come from the scores and stage_eps */
    assert_int_equal(parse_edited(&b, "\"stage_starts\":", "\"unused\":", 4, 4, 2), UC_OK);
    assert_int_equal(b.n_stage_starts, 2);
    assert_int_equal(b.stage_starts[0], 2);
    uc_profile_fini(&b);
    assert_int_equal(parse_edited(&b, "\"stage_eps\":\t1", "\"stage_eps\":\t3", 4, 4, 2), UC_OK);
    assert_true(b.stage_eps == 3.0);
    assert_int_equal(b.n_stage_starts, 2); /* the pinned [2, 3] still win */
    uc_profile_fini(&b);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    /* bad boundaries, fields and values: UC_ERR_FORMAT naming the field, nothing leaked */
    const struct {
        const char *from, *to, *field;
    } bad[] = {
        {"[2, 3]", "[3, 2]", "field=stage_starts"},
        {"[2, 3]", "[0, 2]", "field=stage_starts"},
        {"[2, 3]", "[2, 4]", "field=stage_starts"},
        {"[2, 3]", "[2, \"x\"]", "field=stage_starts"},
        {"\"layer_entropy\":", "\"layer_entropy_x\":", "field=layer_entropy"},
        {"\"layer_entropy\":\t[", "\"layer_entropy\":\t[0.5, ", "field=layer_entropy"},
        {"\"head_entropy\":\t[", "\"head_entropy\":\t[\"a\", ", "field=layers[].head_entropy"},
        {"\"head_entropy\":\t[", "\"head_entropy\":\t[1, ", "field=layers[].head_entropy"},
        {"\"layers\":", "\"layers_x\":", "field=layers"},
        {"\"head_groups\":\t2", "\"head_groups\":\t0", "head_groups"},
        {"\"head_groups\":\t2", "\"head_groups\":\t17", "head_groups"},
        {"\"stage_eps\":\t1", "\"stage_eps\":\t\"1\"", "stage_eps"},
        {"\"num_layers\":\t4", "\"num_layers\":\t\"4\"", "field=num_layers"},
        {"{", "[", "not a JSON object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uc_status rc = parse_edited(&b, bad[i].from, bad[i].to, 4, 4, 2);
        if (rc != UC_ERR_FORMAT) {
            fail_msg("edit %zu (%s -> %s): got %s", i, bad[i].from, bad[i].to, uc_status_str(rc));
        }
        assert_has(tu_log_text, bad[i].field);
        assert_has(tu_log_text, "/x/profile.json");
        assert_null(b.layer_entropy); /* finished on failure */
        assert_int_equal(uc_mem_blocks_in_use(), blocks);
    }
    /* a missing file */
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_load(&b, "/nonexistent/uncomp_profile.json", 4, 4, 2), UC_ERR_IO);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    unlink(prof_path);
}

/* ---- parameters ---------------------------------------------------------------------------- */


/* ---- kvsharer (issue 15) -------------------------------------------------------------------- */

/* Policy specs: a token policy, stages joined by '+', and clear refusals. */
static void test_policy_spec(void **state)
{
    (void)state;
    char msg[512], name[64];
    struct uc_compress_params p = uc_compress_default_params();
    const struct {
        const char *spec;
        enum uc_policy policy;
        uint32_t stages;
        const char *name;
    } ok[] = {
        {"snapkv", UC_POLICY_SNAPKV, 0, "snapkv"},
        {"kvsharer", UC_POLICY_FULL, UC_STAGE_KVSHARER, "kvsharer"},
        {"full+kvsharer", UC_POLICY_FULL, UC_STAGE_KVSHARER, "kvsharer"},
        {"uncomp+kvsharer", UC_POLICY_UNCOMP, UC_STAGE_KVSHARER, "uncomp+kvsharer"},
        {"snapkv+kvsharer", UC_POLICY_SNAPKV, UC_STAGE_KVSHARER, "snapkv+kvsharer"},
        {"h2o+kvsharer", UC_POLICY_H2O, UC_STAGE_KVSHARER, "h2o+kvsharer"},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        p = uc_compress_default_params();
        assert_int_equal(uc_policy_spec_parse(ok[i].spec, &p, msg, sizeof msg), UC_OK);
        assert_int_equal(p.policy, ok[i].policy);
        assert_int_equal(p.stages, ok[i].stages);
        assert_int_equal(uc_policy_kvsharer(&p), ok[i].stages != 0);
        uc_policy_spec_name(&p, name, sizeof name);
        assert_string_equal(name, ok[i].name);
        assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_OK);
    }
    const struct {
        const char *spec, *says;
    } bad[] = {
        {"snapkv+kvshare", "unknown policy or stage 'kvshare'"},
        {"kvsharer+kvsharer", "names kvsharer twice"},
        {"kvsharer+snapkv", "must come first"},
        {"snapkv+uncomp", "must come first"},
        {"uncomp-stage+kvsharer", "does not combine with uncomp-stage"},
        {"snapkv+", "empty"},
        {"+kvsharer", "empty"},
        {"", "not a policy"},
        {"think+think", "names think twice"},
        {"think+snapkv", "must come first"},
        {"snapkv+thinkk", "unknown policy or stage 'thinkk'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        p = uc_compress_default_params();
        msg[0] = '\0';
        assert_int_equal(uc_policy_spec_parse(bad[i].spec, &p, msg, sizeof msg),
                         UC_ERR_INVALID_ARG);
        assert_has(msg, bad[i].says);
        assert_int_equal(p.policy, UC_POLICY_FULL); /* unchanged on failure */
        assert_int_equal(p.stages, 0);
    }
    /* the error lists what exists */
    uc_policy_spec_parse("nope", &p, msg, sizeof msg);
    assert_has(msg, "uncomp-stage");
    assert_has(msg, "+kvsharer");
    /* validation: eviction, pair lists, stage bits */
    p = uc_compress_default_params();
    uc_policy_spec_parse("snapkv+kvsharer", &p, msg, sizeof msg);
    p.decode_mode = UC_DECODE_EVICT;
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_has(msg, "evict");
    p.decode_mode = UC_DECODE_APPEND;
    p.n_share = 2;
    p.share[0] = (struct uc_share_pair){1, 5};
    p.share[1] = (struct uc_share_pair){2, 6};
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_OK);
    p.share[1] = (struct uc_share_pair){5, 6}; /* a chain */
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_has(msg, "both a source and a target");
    p.share[1] = (struct uc_share_pair){2, 5}; /* a target twice */
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_has(msg, "target of two pairs");
    p.share[1] = (struct uc_share_pair){6, 2}; /* backwards */
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    p.share[1] = (struct uc_share_pair){2, 8}; /* past the last layer */
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    p.stages = 0; /* pairs without the stage */
    p.n_share = 1;
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    p.n_share = 0;
    p.stages = 1u << 7;
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_has(msg, "unknown stage");
}

/* The plan of a shared layer: budget 0 (nothing kept), its source in share_src, and the
 * checksum tells shared plans apart. */
static void test_plan_shared(void **state)
{
    (void)state;
    struct uc_plan a, b;
    struct uc_compress_params p = uc_compress_default_params();
    p.policy = UC_POLICY_SNAPKV;
    p.stages = UC_STAGE_KVSHARER;
    assert_int_equal(uc_plan_init(&a, 4, 2), UC_OK);
    assert_int_equal(uc_plan_init(&b, 4, 2), UC_OK);
    struct uc_share_pair pr = {0, 3};
    uc_share_map(a.share_src, 4, &pr, 1);
    for (int l = 0; l < 4; l++) {
        uc_plan_set_layer(&a, &p, l, NULL);
        uc_plan_set_layer(&b, &p, l, NULL);
    }
    const int16_t want[4] = {0, 1, 2, 0};
    assert_memory_equal(a.share_src, want, sizeof want);
    assert_int_equal(a.budget[3 * 2], 0);
    assert_int_equal(a.budget[3 * 2 + 1], 0);
    assert_int_equal(a.budget[0], 128);
    assert_int_equal(b.budget[3 * 2], 128);
    assert_true(uc_plan_checksum(&a) != uc_plan_checksum(&b));
    uc_plan_fini(&a);
    uc_plan_fini(&b);
}

/* The pair ranking and the greedy search, with a model stand-in whose cosine is a known
 * function of the pairs: most dissimilar first, conflicts skipped, the threshold applied, and
 * the search stopping at the target. */
struct fake_model {
    double bad_dst; /* pairs into this layer drop the cosine below any threshold */
    int calls;
    int32_t last_n;
};

static uc_status fake_eval(void *user, const struct uc_share_pair *pairs, int32_t n,
                           double *cosine)
{
    struct fake_model *m = user;
    m->calls++;
    m->last_n = n;
    *cosine = 1.0 - 0.05 * n;
    for (int32_t i = 0; i < n; i++) {
        if (pairs[i].dst == m->bad_dst) {
            *cosine = 0.2;
        }
    }
    return UC_OK;
}

static void test_kvsharer_search(void **state)
{
    (void)state;
    enum { L = 6 };
    double d[L * L] = {0};
    /* distances: |a - b| scaled, with (0, 5) largest, then (0, 4) and (1, 5), ... ties by a */
    for (int a = 0; a < L; a++) {
        for (int b = 0; b < L; b++) {
            d[a * L + b] = (double)((a - b) * (a - b));
        }
    }
    d[2 * L + 3] = d[3 * L + 2] = 100.0; /* (2, 3) is the most dissimilar */
    struct uc_share_pair r[L * (L - 1) / 2];
    assert_int_equal(uc_kvsharer_rank(r, d, L), 15);
    assert_int_equal(r[0].src, 2);
    assert_int_equal(r[0].dst, 3);
    assert_int_equal(r[1].src, 0);
    assert_int_equal(r[1].dst, 5);
    assert_int_equal(r[2].src, 0); /* 16 for (0, 4) and (1, 5): lower source first */
    assert_int_equal(r[2].dst, 4);
    assert_int_equal(r[3].src, 1);
    assert_int_equal(r[3].dst, 5);

    struct uc_kvsharer_params kp = uc_kvsharer_default_params();
    assert_true(kp.threshold == 0.5 && kp.ratio == 0.3);
    assert_int_equal(uc_kvsharer_target(&kp, 6), 2);  /* 1.8 -> 2 */
    assert_int_equal(uc_kvsharer_target(&kp, 16), 5); /* 4.8 -> 5 */
    assert_int_equal(uc_kvsharer_target(&kp, 8), 2);  /* 2.4 -> 2 */
    kp.target = 9;
    assert_int_equal(uc_kvsharer_target(&kp, 6), 3); /* at most L / 2 */
    kp.target = 3;
    struct fake_model m = {.bad_dst = 4};
    struct uc_kvsharer_result res;
    assert_int_equal(uc_kvsharer_search(&res, d, L, &kp, fake_eval, &m), UC_OK);
    /* (2,3) kept; (0,5) kept; (0,4) rejected (bad target); (1,5) skipped (5 taken);
     * (1,4) rejected; (0,3)/(1,3)/(2,5)... 3 and 5 taken, 2 a source; (2,4) rejected;
     * (3, x) skipped (3 is a target); (0,2): 2 is a source; (0,1) kept: target reached */
    assert_int_equal(res.n_pairs, 3);
    assert_int_equal(res.pairs[0].src, 2);
    assert_int_equal(res.pairs[0].dst, 3);
    assert_int_equal(res.pairs[1].src, 0);
    assert_int_equal(res.pairs[1].dst, 5);
    assert_int_equal(res.pairs[2].dst, 1);
    assert_near(res.cosine, 1.0 - 0.05 * 3, 1e-12);
    assert_int_equal(res.n_tried, m.calls);
    assert_true(res.n_tried > 3); /* the rejected ones were tried */
    char msg[256];
    assert_int_equal(uc_share_pairs_validate(res.pairs, res.n_pairs, L, msg, sizeof msg), UC_OK);
    /* a threshold nothing passes keeps nothing */
    kp.threshold = 0.99;
    m.calls = 0;
    assert_int_equal(uc_kvsharer_search(&res, d, L, &kp, fake_eval, &m), UC_OK);
    assert_int_equal(res.n_pairs, 0);
    assert_true(res.cosine == 1.0);
    /* cosine of rows */
    const float x[4] = {1, 0, 0, 2}, y[4] = {2, 0, 0, -1};
    assert_near(uc_cosine_rows_mean(x, x, 2, 2), 1.0, 1e-12);
    assert_near(uc_cosine_rows_mean(x, y, 2, 2), 0.0, 1e-12); /* (1 + -1) / 2 */
}

/* The profile records KVSharer's pairs and loads them back; a profile without them (every
 * profile written before) still loads, and bad pairs are refused by name. */
static void test_profile_kvsharer(void **state)
{
    (void)state;
    struct uc_profile a, b;
    fill_profile(&a);
    assert_int_equal(uc_profile_save(&a, prof_path), UC_OK);
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_load(&b, prof_path, 4, 4, 2), UC_OK); /* an old profile */
    assert_false(b.has_share);
    assert_int_equal(b.n_share, 0);
    uc_profile_fini(&b);
    a.has_share = true;
    a.n_share = 2;
    a.share[0] = (struct uc_share_pair){0, 3};
    a.share[1] = (struct uc_share_pair){0, 2};
    a.share_threshold = 0.5;
    a.share_cosine = 0.875;
    a.share_target = 2;
    a.share_tokens = 256;
    assert_int_equal(uc_profile_save(&a, prof_path), UC_OK);
    char *json = uc_profile_to_json(&a);
    assert_has(json, "\"kvsharer\":");
    assert_has(json, "\"threshold\":\t0.5");
    uc_free(json);
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_load(&b, prof_path, 4, 4, 2), UC_OK);
    assert_true(b.has_share);
    assert_int_equal(b.n_share, 2);
    assert_memory_equal(b.share, a.share, 2 * sizeof a.share[0]);
    assert_true(b.share_threshold == 0.5 && b.share_cosine == 0.875);
    assert_int_equal(b.share_target, 2);
    assert_int_equal(b.share_tokens, 256);
    uc_profile_fini(&b);
    uc_profile_fini(&a);
    /* a target past the model's layers, a chain, a malformed pair */
    const struct {
        const char *from, *to, *says;
    } bad[] = {{"[0, 3]", "[0, 4]", "kvsharer.pairs[0]"},
               {"[0, 3]", "[2, 3]", "both a source and a target"},
               {"[0, 3]", "[0]", "kvsharer.pairs[0]"}};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(parse_edited(&b, bad[i].from, bad[i].to, 4, 4, 2), UC_ERR_FORMAT);
        assert_has(tu_log_text, bad[i].says);
    }
}

static void test_params(void **state)
{
    (void)state;
    struct uc_compress_params d = uc_compress_default_params();
    assert_int_equal(d.policy, UC_POLICY_FULL);
    assert_int_equal(d.window, 8);
    assert_int_equal(d.pool_kernel, 7);
    assert_int_equal(d.sink_tokens, 4);
    assert_int_equal(d.head_groups, 2);
    assert_near(d.spread, 1.0 / 3.0, 1e-7);
    assert_near(d.r_min, 0.375, 0.0);
    assert_int_equal(d.entropy_k, 0);
    assert_int_equal(d.decode_mode, UC_DECODE_APPEND);
    assert_int_equal(d.grouping, UC_GROUPING_PROFILE);
    char msg[256];
    assert_int_equal(uc_compress_params_validate(&d, 8, msg, sizeof msg), UC_OK);
    /* names round-trip */
    for (int i = 0; i < UC_POLICY_COUNT; i++) {
        enum uc_policy p;
        assert_true(uc_policy_parse(uc_policy_name((enum uc_policy)i), &p));
        assert_int_equal(p, i);
    }
    enum uc_policy pp;
    assert_false(uc_policy_parse("snap-kv", &pp));
    assert_string_equal(uc_policy_name(UC_POLICY_UNCOMP_STAGE), "uncomp-stage");
    assert_string_equal(uc_policy_name(UC_POLICY_COUNT), "?");
    enum uc_decode_mode dm;
    assert_true(uc_decode_mode_parse("evict", &dm) && dm == UC_DECODE_EVICT);
    assert_false(uc_decode_mode_parse("Evict", &dm));
    enum uc_grouping gr;
    assert_true(uc_grouping_parse("prompt", &gr) && gr == UC_GROUPING_PROMPT);
    assert_false(uc_grouping_parse("", &gr));
    assert_true(uc_policy_compresses(UC_POLICY_H2O));
    assert_false(uc_policy_compresses(UC_POLICY_FULL));
    assert_true(uc_policy_uses_entropy(UC_POLICY_UNCOMP_STAGE));
    assert_false(uc_policy_uses_entropy(UC_POLICY_PYRAMIDKV));

    struct {
        const char *field;
        struct uc_compress_params p;
        bool ok;
    } c[40];
    int n = 0;
#define CASE(f, stmt, good)                                                                        \
    do {                                                                                           \
        c[n].field = f;                                                                            \
        c[n].p = uc_compress_default_params();                                                     \
        struct uc_compress_params *q = &c[n].p;                                                    \
        stmt;                                                                                      \
        c[n++].ok = good;                                                                          \
    } while (0)
    CASE("compression.policy", q->policy = UC_POLICY_COUNT, false);
    CASE("compression.window", q->window = 0, false);
    CASE("compression.window", q->window = 65, false);
    CASE("compression.pool_kernel", q->pool_kernel = 4, false);
    CASE("compression.pool_kernel", q->pool_kernel = 65, false);
    CASE("compression.head_groups", q->head_groups = 0, false);
    CASE("compression.head_groups", q->head_groups = 17, false);
    CASE("compression.spread", q->spread = 1.0f, false);
    CASE("compression.spread", q->spread = -0.1f, false);
    CASE("compression.spread", q->spread = NAN, false);
    CASE("compression.r_min", q->r_min = 0.0f, false);
    CASE("compression.r_min", q->r_min = 1.01f, false);
    CASE("compression.entropy_k", q->entropy_k = -1, false);
    CASE("compression.decode_mode", q->decode_mode = (enum uc_decode_mode)2, false);
    CASE("compression.grouping", q->grouping = (enum uc_grouping)7, false);
    CASE("compression.row_score", q->row_score = UC_ROW_SCORE_COUNT, false);
    CASE("compression.kv_budget=8 must be at least 9",
         (q->policy = UC_POLICY_SNAPKV, q->kv_budget = 8), false);
    CASE("", (q->policy = UC_POLICY_SNAPKV, q->kv_budget = 9), true);
    CASE("compression.kv_budget=4 must be at least 5 for policy streamingllm",
         (q->policy = UC_POLICY_STREAMINGLLM, q->kv_budget = 4), false);
    CASE("", (q->policy = UC_POLICY_STREAMINGLLM, q->kv_budget = 5), true);
    CASE("", (q->policy = UC_POLICY_FULL, q->kv_budget = 0), true); /* full ignores it */
    CASE("compression.kv_budget", (q->policy = UC_POLICY_H2O, q->kv_budget = (1 << 24) + 1),
         false);
    CASE("compression.sink_tokens", q->sink_tokens = -1, false);
    CASE("compression.sink_tokens", q->sink_tokens = 1025, false);
    /* issue 17: the range before sink_tokens + 1 (2^31 - 1 overflowed; 1025 blamed kv_budget) */
    CASE("compression.sink_tokens",
         (q->policy = UC_POLICY_STREAMINGLLM, q->kv_budget = 100, q->sink_tokens = INT32_MAX),
         false);
    CASE("compression.sink_tokens",
         (q->policy = UC_POLICY_STREAMINGLLM, q->kv_budget = 4, q->sink_tokens = 1025), false);
    CASE("compression.stage_starts", (q->n_stage_starts = 1, q->stage_starts[0] = 0), false);
    CASE("compression.stage_starts", (q->n_stage_starts = 1, q->stage_starts[0] = 8), false);
    CASE("compression.stage_starts",
         (q->n_stage_starts = 2, q->stage_starts[0] = 3, q->stage_starts[1] = 3), false);
    CASE("compression.stage_starts", q->n_stage_starts = UC_MAX_STAGES, false);
    CASE("compression.stage_starts", q->n_stage_starts = -1, false);
    CASE("", (q->n_stage_starts = 2, q->stage_starts[0] = 1, q->stage_starts[1] = 7), true);
    CASE("", (q->window = 64, q->pool_kernel = 63, q->head_groups = 16, q->spread = 0.0f,
              q->r_min = 1.0f), true);
#undef CASE
    for (int i = 0; i < n; i++) {
        msg[0] = '\0';
        uc_status rc = uc_compress_params_validate(&c[i].p, 8, msg, sizeof msg);
        if (c[i].ok) {
            if (rc != UC_OK) {
                fail_msg("case %d refused: %s", i, msg);
            }
        } else {
            assert_int_equal(rc, UC_ERR_INVALID_ARG);
            if (!strstr(msg, c[i].field)) {
                fail_msg("case %d: '%s' does not name %s", i, msg, c[i].field);
            }
        }
    }
}

/* ThinK as a stage: specs with +think, its ratio (the paper's default unless set), names
 * round-trip, the combination with kvsharer refused, and ThinK's channel count and selection. */
static void test_policy_spec_think(void **state)
{
    (void)state;
    struct uc_compress_params p = uc_compress_default_params();
    char name[64], msg[256];
    assert_int_equal(uc_policy_spec_parse("snapkv+think", &p, msg, sizeof msg), UC_OK);
    assert_int_equal(p.policy, UC_POLICY_SNAPKV);
    assert_true((p.stages & UC_STAGE_THINK) && !uc_policy_kvsharer(&p));
    assert_near(uc_policy_think_ratio(&p), 0.4, 1e-7);
    uc_policy_spec_name(&p, name, sizeof name);
    assert_string_equal(name, "snapkv+think");
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_OK);
    p.think_ratio = 0.25f; /* a ratio of its own */
    assert_near(uc_policy_think_ratio(&p), 0.25, 1e-7);
    assert_int_equal(uc_policy_spec_parse("uncomp", &p, msg, sizeof msg), UC_OK);
    assert_true(uc_policy_think_ratio(&p) == 0.0f); /* the stage is off */
    assert_int_equal(uc_policy_spec_parse("think", &p, msg, sizeof msg), UC_OK);
    assert_int_equal(p.policy, UC_POLICY_FULL);
    uc_policy_spec_name(&p, name, sizeof name);
    assert_string_equal(name, "think");
    assert_int_equal(uc_policy_spec_parse("uncomp+kvsharer+think", &p, msg, sizeof msg), UC_OK);
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(msg, "think does not combine with kvsharer"));
    p = uc_compress_default_params();
    p.think_ratio = 1.0f;
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(msg, "think_ratio"));
    p.think_ratio = -0.1f;
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    /* kept channels: D - floor(ratio D), at least one */
    assert_int_equal(uc_think_kdim(0.4f, 32), 20);
    assert_int_equal(uc_think_kdim(0.4f, 128), 77);
    assert_int_equal(uc_think_kdim(0.5f, 64), 32);
    assert_int_equal(uc_think_kdim(0.0f, 64), 64);
    assert_int_equal(uc_think_kdim(0.999f, 8), 1);
    /* scores: sum over query heads of sqrt(q sumsq) times sqrt(k sumsq) */
    double qsq[2 * 4] = {1, 4, 9, 0, /* head 0: norms 1 2 3 0 */
                         1, 0, 0, 16}; /* head 1: norms 1 0 0 4 */
    double qpart[4], ksq[4] = {4, 1, 1, 1}; /* key norms 2 1 1 1 */
    uc_think_query_part(qpart, qsq, 2, 4);
    assert_near(qpart[0], 2.0, 1e-12);
    assert_near(qpart[3], 4.0, 1e-12);
    int32_t chan[4];
    uc_think_select(chan, qpart, ksq, 4, 2); /* scores 4 2 3 4: channels 0 and 3 */
    assert_int_equal(chan[0], 0);
    assert_int_equal(chan[1], 3);
    uc_think_select(chan, qpart, ksq, 4, 3); /* then channel 2 (3 > 2) */
    assert_int_equal(chan[0], 0);
    assert_int_equal(chan[1], 2);
    assert_int_equal(chan[2], 3);
    double tie[4] = {1, 1, 1, 1}, one[4] = {1, 1, 1, 1};
    uc_think_select(chan, tie, one, 4, 2); /* ties: lower channels */
    assert_int_equal(chan[0], 0);
    assert_int_equal(chan[1], 1);
    double nan_q[4] = {NAN, 1, 2, 3};
    uc_think_select(chan, nan_q, one, 4, 2); /* a NaN score ranks last */
    assert_int_equal(chan[0], 2);
    assert_int_equal(chan[1], 3);
}

/* MiniCache's arithmetic: pairs from L/2, distances, SLERP, retention; its spec and checks. */
static void test_minicache_rules(void **state)
{
    (void)state;
    int16_t partner[16], pair_of[16];
    assert_int_equal(uc_minicache_start(0, 8), 4);
    assert_int_equal(uc_minicache_start(3, 8), 3);
    assert_int_equal(uc_minicache_pairs(partner, pair_of, 8, 4), 2);
    const int16_t want_partner[8] = {-1, -1, -1, -1, 5, 4, 7, 6};
    const int16_t want_pair[8] = {-1, -1, -1, -1, 0, 0, 1, 1};
    assert_memory_equal(partner, want_partner, sizeof want_partner);
    assert_memory_equal(pair_of, want_pair, sizeof want_pair);
    assert_int_equal(uc_minicache_pairs(partner, NULL, 9, 4), 2); /* 8 has no partner */
    assert_int_equal(partner[8], -1);
    assert_int_equal(uc_minicache_pairs(partner, NULL, 16, 8), 4);
    /* distances: same direction 0, orthogonal 1/2, opposite 1, a zero vector 0 */
    const float a[4] = {1, 0, 0, 0}, b[4] = {0, 2, 0, 0}, c[4] = {-3, 0, 0, 0}, z[4] = {0};
    const float a2[4] = {5, 0, 0, 0};
    assert_true(fabs(uc_minicache_distance(a, a2, 4)) < 1e-12);
    assert_true(fabs(uc_minicache_distance(a, b, 4) - 0.5) < 1e-12);
    assert_true(fabs(uc_minicache_distance(a, c, 4) - 1.0) < 1e-12);
    assert_true(uc_minicache_distance(a, z, 4) == 0.0);
    /* SLERP of orthogonal unit directions at t: (cos(t pi/2), sin(t pi/2)); magnitudes kept */
    float dir[4], na, nb;
    uc_minicache_merge(dir, &na, &nb, a2, b, 4, 0.6f);
    assert_true(fabsf(na - 5.0f) < 1e-6f && fabsf(nb - 2.0f) < 1e-6f);
    assert_true(fabs(dir[0] - cos(0.6 * M_PI / 2)) < 1e-6 &&
                fabs(dir[1] - sin(0.6 * M_PI / 2)) < 1e-6);
    uc_minicache_merge(dir, &na, &nb, a2, b, 4, 0.0f); /* t = 0: layer a's direction */
    assert_true(fabsf(dir[0] - 1.0f) < 1e-6f && fabsf(dir[1]) < 1e-6f);
    uc_minicache_merge(dir, &na, &nb, a, a2, 4, 0.6f); /* parallel: that direction */
    assert_true(fabsf(dir[0] - 1.0f) < 1e-6f);
    /* retention: round_half_up(gamma n) largest distances, ties to the lower index */
    const double d[6] = {0.1, 0.9, 0.3, 0.9, 0.2, 0.95};
    bool keep[6];
    struct uc_minicache_rank scratch[6];
    assert_int_equal(uc_minicache_retain(keep, d, 6, 0.5f, scratch), 3);
    const bool want_keep[6] = {false, true, false, true, false, true};
    assert_memory_equal(keep, want_keep, sizeof keep);
    assert_int_equal(uc_minicache_retain(keep, d, 6, 0.25f, scratch), 2); /* 1.5 -> 2 */
    assert_true(keep[5] && keep[1] && !keep[3]);
    assert_int_equal(uc_minicache_retain(keep, d, 6, 0.0f, scratch), 0);
    /* spec and checks */
    struct uc_compress_params p = uc_compress_default_params();
    char msg[256], name[64];
    assert_int_equal(uc_policy_spec_parse("snapkv+minicache", &p, msg, sizeof msg), UC_OK);
    assert_int_equal(p.policy, UC_POLICY_SNAPKV);
    assert_int_equal(p.stages, UC_STAGE_MINICACHE);
    uc_policy_spec_name(&p, name, sizeof name);
    assert_string_equal(name, "snapkv+minicache");
    assert_true(uc_policy_minicache_t(&p) == 0.6f && uc_policy_minicache_gamma(&p) == 0.05f);
    p.minicache_gamma = -1.0f;
    assert_true(uc_policy_minicache_gamma(&p) == 0.0f);
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_OK);
    p.minicache_start = 7; /* no layer after it */
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_has(msg, "no pair");
    p = uc_compress_default_params();
    assert_int_equal(uc_policy_spec_parse("minicache", &p, msg, sizeof msg), UC_OK);
    uc_policy_spec_name(&p, name, sizeof name);
    assert_string_equal(name, "minicache");
    assert_int_equal(uc_policy_spec_parse("uncomp-stage+minicache", &p, msg, sizeof msg),
                     UC_ERR_INVALID_ARG);
    assert_has(msg, "does not combine with uncomp-stage");
}

/* MiniCache's calibrated merge set: the pairs of least total distance, by hand. */
static void test_minicache_select(void **state)
{
    (void)state;
    int16_t first[8], partner[16], pair_of[16];
    /* the paper's count: floor((L - L / 2) / 2) */
    assert_int_equal(uc_minicache_default_pairs(8), 2);
    assert_int_equal(uc_minicache_default_pairs(9), 2);
    assert_int_equal(uc_minicache_default_pairs(16), 4);
    assert_int_equal(uc_minicache_default_pairs(2), 0);
    /* two low pairs apart */
    const double d1[7] = {0.5, 0.5, 0.1, 0.5, 0.5, 0.2, 0.5};
    assert_int_equal(uc_minicache_select(first, d1, 8, 2), UC_OK);
    assert_int_equal(first[0], 2);
    assert_int_equal(first[1], 5);
    assert_int_equal(uc_minicache_pairs_of(partner, pair_of, 8, first, 2), 2);
    const int16_t want_partner[8] = {-1, -1, 3, 2, -1, 6, 5, -1};
    const int16_t want_pair[8] = {-1, -1, 0, 0, -1, 1, 1, -1};
    assert_memory_equal(partner, want_partner, sizeof want_partner);
    assert_memory_equal(pair_of, want_pair, sizeof want_pair);
    /* pairs are disjoint: (1, 2) and (2, 3) share layer 2; {0, 2} and {1, 3} tie at 1.0 and
     * the deeper set wins */
    const double d2[4] = {0.9, 0.1, 0.1, 0.9};
    assert_int_equal(uc_minicache_select(first, d2, 5, 2), UC_OK);
    assert_int_equal(first[0], 1);
    assert_int_equal(first[1], 3);
    /* the greedy choice (the least pair first, 1, then 3) sums 1.1; the best is {0, 2}, 0.6 */
    const double d3[4] = {0.3, 0.2, 0.3, 0.9};
    assert_int_equal(uc_minicache_select(first, d3, 5, 2), UC_OK);
    assert_int_equal(first[0], 0);
    assert_int_equal(first[1], 2);
    /* equal distances: the deepest pairs, the paper's set from L / 2 when L is even */
    double flat[15];
    for (int i = 0; i < 15; i++) {
        flat[i] = 0.5;
    }
    assert_int_equal(uc_minicache_select(first, flat, 8, 2), UC_OK);
    assert_int_equal(first[0], 4);
    assert_int_equal(first[1], 6);
    assert_int_equal(uc_minicache_select(first, flat, 16, 4), UC_OK);
    const int16_t want16[4] = {8, 10, 12, 14};
    assert_memory_equal(first, want16, sizeof want16);
    assert_int_equal(uc_minicache_select(first, flat, 9, 2), UC_OK); /* odd L: 5-6, 7-8 */
    assert_int_equal(first[0], 5);
    assert_int_equal(first[1], 7);
    /* a tie below a strictly better pair: 0.25 at 1 is taken, the rest tie deep */
    flat[1] = 0.25;
    assert_int_equal(uc_minicache_select(first, flat, 8, 2), UC_OK);
    assert_int_equal(first[0], 1);
    assert_int_equal(first[1], 6);
    /* every layer paired */
    assert_int_equal(uc_minicache_select(first, d1, 8, 4), UC_OK);
    const int16_t all[4] = {0, 2, 4, 6};
    assert_memory_equal(first, all, sizeof all);
    /* refused: no pair, more than L / 2, a distance that is not finite */
    tu_log_reset();
    assert_int_equal(uc_minicache_select(first, d1, 8, 0), UC_ERR_INVALID_ARG);
    assert_has(tu_log_text, "0 pairs of 8 layers");
    assert_int_equal(uc_minicache_select(first, d1, 8, 5), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_minicache_select(first, d1, 5, 3), UC_ERR_INVALID_ARG);
    const double dn[3] = {0.5, NAN, 0.5};
    assert_int_equal(uc_minicache_select(first, dn, 4, 1), UC_ERR_INVALID_ARG);
    assert_has(tu_log_text, "layers 1 and 2 is not finite");
}

/* The profile's minicache object: round trip, old profiles, hand edits refused. */
static void test_profile_minicache(void **state)
{
    (void)state;
    struct uc_profile a, b;
    fill_profile(&a);
    assert_int_equal(uc_profile_save(&a, prof_path), UC_OK);
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_load(&b, prof_path, 4, 4, 2), UC_OK); /* an old profile */
    assert_false(b.has_minicache);
    uc_profile_fini(&b);
    /* stored on the file's 1e-9 grid; one pair of L = 4 (the paper's count) */
    const double d[3] = {0.4, 0.1000000000004, 0.3};
    assert_int_equal(uc_profile_set_minicache(&a, d, 0, 1024), UC_ERR_INVALID_ARG);
    assert_false(a.has_minicache);
    assert_int_equal(uc_profile_set_minicache(&a, d, 1, 1024), UC_OK);
    assert_true(a.has_minicache && a.mc_n_pairs == 1 && a.mc_first[0] == 1);
    assert_true(a.mc_dist[1] == 0.1 && a.mc_dist[0] == 0.4 && a.mc_tokens == 1024);
    assert_int_equal(uc_profile_save(&a, prof_path), UC_OK);
    char *json = uc_profile_to_json(&a);
    assert_has(json, "\"minicache\":");
    assert_has(json, "\"distances\":\t[0.4, 0.1, 0.3]");
    uc_free(json);
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_load(&b, prof_path, 4, 4, 2), UC_OK);
    assert_true(b.has_minicache && b.mc_n_pairs == 1 && b.mc_first[0] == 1);
    assert_memory_equal(b.mc_dist, a.mc_dist, 3 * sizeof(double));
    assert_int_equal(b.mc_tokens, 1024);
    uc_profile_fini(&b);
    uc_profile_fini(&a);
    /* pairs the distances do not give, distances that give other pairs, too many pairs, a pair
     * of layers that are not adjacent, a distance out of [0, 1] */
    const struct {
        const char *from, *to, *says;
    } bad[] = {{"[[1, 2]]", "[[2, 3]]", "minicache.pairs=[[2, 3]] but its distances give [[1, 2]]"},
               {"[0.4, 0.1, 0.3]", "[0.4, 0.5, 0.3]", "but its distances give [[2, 3]]"},
               {"\"n_pairs\":\t1", "\"n_pairs\":\t3", "minicache.n_pairs=3"},
               {"[[1, 2]]", "[[1, 3]]", "minicache.pairs must be"},
               {"[0.4, 0.1, 0.3]", "[1.4, 0.1, 0.3]", "minicache.distances[0]=1.4"},
               {"[0.4, 0.1, 0.3]", "[0.4, 0.1]", "minicache.distances must be an array of 3"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(parse_edited(&b, bad[i].from, bad[i].to, 4, 4, 2), UC_ERR_FORMAT);
        assert_has(tu_log_text, bad[i].says);
    }
}

int main(void)
{
    tu_log_capture();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_entropy_orthogonal_rows),
        cmocka_unit_test(test_entropy_sliced),
        cmocka_unit_test(test_entropy_rank_one),
        cmocka_unit_test(test_entropy_known_spectrum),
        cmocka_unit_test(test_entropy_zero_rows),
        cmocka_unit_test(test_entropy_eigvals_and_helpers),
        cmocka_unit_test(test_entropy_gram_path),
        cmocka_unit_test(test_group_heads),
        cmocka_unit_test(test_budgets),
        cmocka_unit_test(test_group_budget_nth),
        cmocka_unit_test(test_stage_rows),
        cmocka_unit_test(test_stage_starts),
        cmocka_unit_test(test_topk_and_maxpool),
        cmocka_unit_test(test_select_fast_equals_reference),
        cmocka_unit_test(test_select_snapkv),
        cmocka_unit_test(test_select_h2o_streaming_rows),
        cmocka_unit_test(test_plan),
        cmocka_unit_test(test_profile_round_trip),
        cmocka_unit_test(test_profile_refusals),
        cmocka_unit_test(test_params),
        cmocka_unit_test(test_policy_spec),
        cmocka_unit_test(test_plan_shared),
        cmocka_unit_test(test_kvsharer_search),
        cmocka_unit_test(test_profile_kvsharer),
        cmocka_unit_test(test_policy_spec_think),
        cmocka_unit_test(test_minicache_rules),
        cmocka_unit_test(test_minicache_select),
        cmocka_unit_test(test_profile_minicache),
        cmocka_unit_test(test_regression_stage_rows_float_r_min),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
