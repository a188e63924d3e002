/* LoRC's arithmetic without a model (compress/lorc.h): bases and singular values of a projection
 * slice with a known SVD, condition numbers, progressive ranks (hand-computed cases, clipping),
 * the lorc stage in policy specs and parameters, and the profile's "lorc" object. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "base/mem.h"
#include "compress/lorc.h"
#include "compress/policy.h"
#include "compress/profile.h"

#define assert_near(a, b, tol) assert_true(fabs((double)(a) - (double)(b)) <= (tol))

/* W (4, 6) = U diag(8, 4, 2, 0.5) V^T with U a signed permutation and V's columns orthonormal:
 * its basis rows are U's columns (up to sign) and its singular values are the diagonal. */
static void test_basis(void **state)
{
    (void)state;
    const double s[4] = {8, 4, 2, 0.5};
    const int perm[4] = {2, 0, 3, 1}; /* singular vector i is e_perm[i] */
    float w[4 * 6];
    memset(w, 0, sizeof w);
    for (int i = 0; i < 4; i++) {
        /* v_0 = (e_0 + e_4) / sqrt 2, v_1 = (e_1 + e_5) / sqrt 2, v_2 = e_2, v_3 = e_3 */
        for (int c = 0; c < 6; c++) {
            double v = i < 2 ? ((c == i || c == i + 4) ? 1.0 / sqrt(2.0) : 0.0) : (c == i);
            w[perm[i] * 6 + c] += (float)(s[i] * v * (i == 1 ? -1.0 : 1.0));
        }
    }
    float basis[16];
    double sv[4];
    assert_int_equal(uc_lorc_basis(basis, sv, w, 4, 6), UC_OK);
    for (int i = 0; i < 4; i++) {
        assert_near(sv[i], s[i], 1e-5);
        for (int c = 0; c < 4; c++) {
            assert_near(fabs(basis[i * 4 + c]), c == perm[i] ? 1.0 : 0.0, 1e-5);
        }
    }
    assert_near(uc_lorc_log_cond(sv, 4), log(16.0), 1e-5);
    double zero[3] = {2.0, 1.0, 0.0};
    assert_near(uc_lorc_log_cond(zero, 3), log(1e30), 1e-9); /* a zero s_min is capped */
    assert_int_equal(uc_lorc_basis(basis, sv, w, 0, 6), UC_ERR_INVALID_ARG);
}

/* log_cond 1, 1, 1, 1: cumulative 4, 3, 2, 1, u = 1, 2/3, 1/3, 0, weights 1.5 .. 0.5 (mean 1). */
static void test_ranks(void **state)
{
    (void)state;
    const double lc[4] = {1, 1, 1, 1};
    int32_t r[4];
    uc_lorc_ranks(r, lc, 4, 8, 0.5f); /* 6, 4.67, 3.33, 2 */
    assert_int_equal(r[0], 6);
    assert_int_equal(r[1], 5);
    assert_int_equal(r[2], 3);
    assert_int_equal(r[3], 2);
    uc_lorc_ranks(r, lc, 4, 8, 1.0f); /* everything: every layer clipped at D */
    for (int l = 0; l < 4; l++) {
        assert_int_equal(r[l], 8);
    }
    /* 0.75: c w = 9, 7, 5, 3 before clipping; layer 0 clipped at 8, its excess spread:
     * c (7/6 + 5/6 + 1/2) = 24 - 8, c = 6.4: 8, 7.47, 5.33, 3.2 */
    uc_lorc_ranks(r, lc, 4, 8, 0.75f);
    assert_int_equal(r[0], 8);
    assert_int_equal(r[1], 7);
    assert_int_equal(r[2], 5);
    assert_int_equal(r[3], 3);
    uc_lorc_ranks(r, lc, 4, 8, 0.01f); /* at least 1 */
    for (int l = 0; l < 4; l++) {
        assert_int_equal(r[l], 1);
    }
    const double flat[3] = {0, 0, 0}; /* no spread: rho D everywhere */
    uc_lorc_ranks(r, flat, 3, 32, 0.25f);
    assert_int_equal(r[0], 8);
    assert_int_equal(r[2], 8);
    const double deep[3] = {5, 0.1, 0.1}; /* the first layer carries the sensitivity */
    uc_lorc_ranks(r, deep, 3, 32, 0.5f);
    assert_true(r[0] > r[1] && r[1] >= r[2]);
}

static void test_spec(void **state)
{
    (void)state;
    struct uc_compress_params p = uc_compress_default_params();
    char msg[512], name[64];
    assert_int_equal(uc_policy_spec_parse("snapkv+lorc", &p, msg, sizeof msg), UC_OK);
    assert_int_equal(p.policy, UC_POLICY_SNAPKV);
    assert_true(p.stages == UC_STAGE_LORC);
    uc_policy_spec_name(&p, name, sizeof name);
    assert_string_equal(name, "snapkv+lorc");
    assert_near(uc_policy_lorc_ratio(&p), UC_LORC_DEFAULT_RATIO, 1e-7);
    p.lorc_ratio = 0.125f;
    assert_near(uc_policy_lorc_ratio(&p), 0.125, 1e-7);
    assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_OK);
    assert_int_equal(uc_policy_spec_parse("lorc", &p, msg, sizeof msg), UC_OK);
    uc_policy_spec_name(&p, name, sizeof name);
    assert_string_equal(name, "lorc");
    assert_int_equal(uc_policy_spec_parse("uncomp-stage+lorc", &p, msg, sizeof msg), UC_OK);
    p.stages = 0;
    assert_true(uc_policy_lorc_ratio(&p) == 0.0f); /* the stage is off */
    assert_int_equal(uc_policy_spec_parse("lorc+lorc", &p, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(msg, "twice"));
    const struct {
        const char *spec;
        float ratio;
        enum uc_decode_mode mode;
        const char *says;
    } bad[] = {{"snapkv+think+lorc", 0, UC_DECODE_APPEND, "lorc does not combine"},
               {"uncomp+kvsharer+lorc", 0, UC_DECODE_APPEND, "lorc does not combine"},
               {"snapkv+lorc", 0, UC_DECODE_EVICT, "evict does not combine with lorc"},
               {"lorc", 1.5f, UC_DECODE_APPEND, "lorc_ratio"},
               {"lorc", -0.5f, UC_DECODE_APPEND, "lorc_ratio"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        p = uc_compress_default_params();
        assert_int_equal(uc_policy_spec_parse(bad[i].spec, &p, msg, sizeof msg), UC_OK);
        p.lorc_ratio = bad[i].ratio;
        p.decode_mode = bad[i].mode;
        assert_int_equal(uc_compress_params_validate(&p, 8, msg, sizeof msg), UC_ERR_INVALID_ARG);
        assert_non_null(strstr(msg, bad[i].says));
    }
}

static void test_profile(void **state)
{
    (void)state;
    struct uc_profile a, b;
    assert_int_equal(uc_profile_init(&a, 4, 4, 2, 8, 16), UC_OK);
    const double lc[4] = {1, 1, 1, 1};
    assert_int_equal(uc_profile_set_lorc(&a, lc, 0.5), UC_OK);
    assert_int_equal(a.lorc_rank[0], 6);
    assert_int_equal(a.lorc_rank[3], 2);
    assert_int_equal(uc_profile_set_lorc(&a, lc, 0.0), UC_ERR_INVALID_ARG);
    uc_profile_finish(&a, 2, 1.0);
    char *json = uc_profile_to_json(&a);
    assert_non_null(strstr(json, "\"lorc\":"));
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_parse(&b, json, "mem", 4, 4, 2), UC_OK);
    assert_true(b.has_lorc && b.lorc_ratio == 0.5);
    assert_memory_equal(b.lorc_rank, a.lorc_rank, 4 * sizeof(int32_t));
    uc_profile_fini(&b);
    /* ranks that the sensitivities do not give: refused */
    char *at = strstr(json, "\"ranks\":");
    assert_non_null(at);
    char *six = strchr(at, '6');
    assert_non_null(six);
    *six = '7';
    memset(&b, 0, sizeof b);
    assert_int_equal(uc_profile_parse(&b, json, "mem", 4, 4, 2), UC_ERR_FORMAT);
    uc_free(json);
    uc_profile_fini(&a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basis),
        cmocka_unit_test(test_ranks),
        cmocka_unit_test(test_spec),
        cmocka_unit_test(test_profile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
