/* Unit tests for shard/sampler.c: greedy is the argmax; temperature, top-k, top-p and min-p
 * restrict the support exactly (many seeded draws: nothing outside the allowed set, everything
 * inside it appears, frequencies match the renormalised distribution); seeds reproduce;
 * repetition, frequency and presence penalties follow vLLM's definitions (checked through the
 * greedy choice flipping exactly where the arithmetic says); ban_once; logprobs equal the
 * log-softmax of the unmodified logits; parameter validation names the field; no leaks. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "sampler.h"
#include "test_util.h"


static struct uc_sampler *make(const struct uc_sampling_params *p, int64_t vocab,
                               const int32_t *prompt, int64_t n_prompt)
{
    struct uc_sampler *s = NULL;
    assert_int_equal(uc_sampler_create(&s, p, vocab, prompt, n_prompt, 12345), UC_OK);
    assert_non_null(s);
    return s;
}

static struct uc_sampling_params params(float temperature, uint64_t seed)
{
    struct uc_sampling_params p = uc_sampling_default_params();
    p.temperature = temperature;
    p.seed = seed;
    p.has_seed = true;
    return p;
}

/* Draws n samples, counting each token. */
static void draw(struct uc_sampler *s, const float *logits, int64_t vocab, int n, int *counts)
{
    memset(counts, 0, (size_t)vocab * sizeof *counts);
    for (int i = 0; i < n; i++) {
        int32_t t = uc_sampler_sample(s, logits, NULL);
        assert_true(t >= 0 && t < vocab);
        counts[t]++;
    }
}

/* Checks that exactly the tokens in `allowed` appeared. */
static void assert_support(const int *counts, int64_t vocab, const bool *allowed)
{
    for (int64_t i = 0; i < vocab; i++) {
        if (allowed[i] && counts[i] == 0) {
            fail_msg("allowed token %lld never drawn", (long long)i);
        }
        if (!allowed[i] && counts[i] != 0) {
            fail_msg("token %lld outside the allowed set drawn %d times", (long long)i, counts[i]);
        }
    }
}

/* Logits whose softmax is exactly proportional to probs. */
static void logits_of(float *logits, const double *probs, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        logits[i] = probs[i] > 0 ? (float)log(probs[i]) : -INFINITY;
    }
}

/* ---- greedy ------------------------------------------------------------------------------- */

static void test_greedy_is_argmax(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    enum { V = 300 };
    struct uc_sampling_params p = params(0.0f, 1);
    p.top_k = 3;      /* ignored by greedy */
    p.top_p = 0.5f;   /* ignored by greedy */
    struct uc_sampler *s = make(&p, V, NULL, 0);
    float lg[V];
    for (int trial = 0; trial < 20; trial++) {
        uc_test_fill(lg, V, 100 + (uint64_t)trial, 0, 0);
        int32_t best = 0;
        for (int i = 1; i < V; i++) {
            best = lg[i] > lg[best] ? i : best;
        }
        assert_int_equal(uc_sampler_sample(s, lg, NULL), best);
    }
    /* ties go to the lower id; NaN never wins */
    for (int i = 0; i < V; i++) {
        lg[i] = -1.0f;
    }
    lg[7] = 3.0f;
    lg[200] = 3.0f;
    lg[3] = NAN;
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 7);
    lg[0] = NAN;
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 7);
    uc_sampler_destroy(s);
    uc_sampler_destroy(NULL);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* ---- support restrictions ------------------------------------------------------------------ */

static void test_top_k_support(void **state)
{
    (void)state;
    enum { V = 1000, N = 4000 };
    float lg[V];
    int counts[V];
    bool allowed[V];
    /* random logits in [-1, 1): flat enough that every survivor gets drawn */
    uc_test_fill(lg, V, 9, 0, 0);
    for (int k = 1; k <= 8; k += 3) {
        struct uc_sampling_params p = params(1.0f, 77);
        p.top_k = k;
        struct uc_sampler *s = make(&p, V, NULL, 0);
        /* the k largest by brute force */
        for (int i = 0; i < V; i++) {
            int above = 0;
            for (int j = 0; j < V; j++) {
                above += lg[j] > lg[i];
            }
            allowed[i] = above < k;
        }
        draw(s, lg, V, N, counts);
        assert_support(counts, V, allowed);
        uc_sampler_destroy(s);
    }
    /* top_k larger than the vocabulary keeps everything */
    enum { V2 = 6 };
    double pr[V2] = {0.3, 0.2, 0.2, 0.1, 0.1, 0.1};
    float lg2[V2];
    logits_of(lg2, pr, V2);
    struct uc_sampling_params p = params(1.0f, 5);
    p.top_k = 50;
    struct uc_sampler *s = make(&p, V2, NULL, 0);
    draw(s, lg2, V2, 2000, counts);
    bool all[V2] = {true, true, true, true, true, true};
    assert_support(counts, V2, all);
    uc_sampler_destroy(s);
}

static void test_top_p_support(void **state)
{
    (void)state;
    enum { V = 8, N = 20000 };
    /* probabilities 0.4, 0.3, 0.2, 0.1 at scattered ids; the rest impossible */
    double pr[V] = {0, 0.2, 0, 0.4, 0.1, 0, 0.3, 0};
    float lg[V];
    logits_of(lg, pr, V);
    int counts[V];
    struct {
        float top_p;
        bool allowed[V];
        double renorm; /* mass kept */
    } cases[] = {
        {1.0f, {0, 1, 0, 1, 1, 0, 1, 0}, 1.0},
        {0.95f, {0, 1, 0, 1, 1, 0, 1, 0}, 1.0},
        {0.85f, {0, 1, 0, 1, 0, 0, 1, 0}, 0.9},
        {0.65f, {0, 0, 0, 1, 0, 0, 1, 0}, 0.7},
        {0.35f, {0, 0, 0, 1, 0, 0, 0, 0}, 0.4},
        {0.01f, {0, 0, 0, 1, 0, 0, 0, 0}, 0.4},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        struct uc_sampling_params p = params(1.0f, 31 + c);
        p.top_p = cases[c].top_p;
        struct uc_sampler *s = make(&p, V, NULL, 0);
        draw(s, lg, V, N, counts);
        assert_support(counts, V, cases[c].allowed);
        /* frequencies follow the renormalised distribution */
        for (int i = 0; i < V; i++) {
            if (cases[c].allowed[i]) {
                double want = pr[i] / cases[c].renorm, got = (double)counts[i] / N;
                if (fabs(got - want) > 0.015) {
                    fail_msg("top_p=%g token %d: frequency %.4f, want %.4f",
                             (double)cases[c].top_p, i, got, want);
                }
            }
        }
        uc_sampler_destroy(s);
    }
}

static void test_min_p_support(void **state)
{
    (void)state;
    enum { V = 5, N = 10000 };
    double pr[V] = {0.1, 0.4, 0.05, 0.3, 0.15};
    float lg[V];
    logits_of(lg, pr, V);
    int counts[V];
    struct {
        float min_p;
        bool allowed[V];
    } cases[] = {
        {0.0f, {1, 1, 1, 1, 1}},
        {0.2f, {1, 1, 0, 1, 1}},  /* threshold 0.08 */
        {0.3f, {0, 1, 0, 1, 1}},  /* 0.12 */
        {0.6f, {0, 1, 0, 1, 0}},  /* 0.24 */
        {0.9f, {0, 1, 0, 0, 0}},  /* 0.36 */
        {1.0f, {0, 1, 0, 0, 0}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        struct uc_sampling_params p = params(1.0f, 99 + c);
        p.min_p = cases[c].min_p;
        struct uc_sampler *s = make(&p, V, NULL, 0);
        draw(s, lg, V, N, counts);
        assert_support(counts, V, cases[c].allowed);
        uc_sampler_destroy(s);
    }
    /* min-p applies to the tempered distribution: at T = 2, p ~ sqrt(pr), so min_p 0.6 keeps
     * tokens with sqrt(pr) >= 0.6 sqrt(0.4), i.e. pr >= 0.144: ids 1, 3, 4 */
    struct uc_sampling_params p = params(2.0f, 3);
    p.min_p = 0.6f;
    struct uc_sampler *s = make(&p, V, NULL, 0);
    draw(s, lg, V, N, counts);
    bool allowed[V] = {0, 1, 0, 1, 1};
    assert_support(counts, V, allowed);
    uc_sampler_destroy(s);
}

/* Temperature reshapes the distribution to p ~ exp(l / T) exactly; top-k, top-p and min-p
 * combine as intersections. */
static void test_temperature_and_combinations(void **state)
{
    (void)state;
    enum { V = 4, N = 40000 };
    float lg[V] = {0.0f, 1.0f, -1.0f, 0.5f};
    int counts[V];
    const float temps[] = {0.5f, 1.0f, 2.0f};
    for (size_t t = 0; t < 3; t++) {
        struct uc_sampling_params p = params(temps[t], 1000 + t);
        struct uc_sampler *s = make(&p, V, NULL, 0);
        draw(s, lg, V, N, counts);
        double z = 0;
        for (int i = 0; i < V; i++) {
            z += exp(lg[i] / temps[t]);
        }
        for (int i = 0; i < V; i++) {
            double want = exp(lg[i] / temps[t]) / z, got = (double)counts[i] / N;
            if (fabs(got - want) > 0.01) {
                fail_msg("T=%g token %d: frequency %.4f, want %.4f", (double)temps[t], i, got,
                         want);
            }
        }
        uc_sampler_destroy(s);
    }
    /* top_k 3 drops id 2; of {1, 3, 0} (0.506, 0.307, 0.186) top_p 0.6 keeps 1 and 3 */
    struct uc_sampling_params p = params(1.0f, 8);
    p.top_k = 3;
    p.top_p = 0.6f;
    struct uc_sampler *s = make(&p, V, NULL, 0);
    draw(s, lg, V, 4000, counts);
    bool a1[V] = {0, 1, 0, 1};
    assert_support(counts, V, a1);
    uc_sampler_destroy(s);
    /* min_p 0.7 (threshold e^1 * 0.7 = 1.90 > e^0.5 = 1.65) leaves only id 1 whatever top_k */
    p = params(1.0f, 8);
    p.min_p = 0.7f;
    p.top_k = 3;
    s = make(&p, V, NULL, 0);
    draw(s, lg, V, 500, counts);
    bool a2[V] = {0, 1, 0, 0};
    assert_support(counts, V, a2);
    uc_sampler_destroy(s);
}

/* ---- seeds ---------------------------------------------------------------------------------- */

static void test_seeds(void **state)
{
    (void)state;
    enum { V = 50, N = 200 };
    float lg[V];
    uc_test_fill(lg, V, 4, 0, 0);
    int32_t a[N], b[N], c[N], d[N], e[N];
    struct uc_sampling_params p = params(1.0f, 42);
    struct uc_sampler *s1 = make(&p, V, NULL, 0), *s2 = make(&p, V, NULL, 0);
    p.seed = 43;
    struct uc_sampler *s3 = make(&p, V, NULL, 0);
    for (int i = 0; i < N; i++) {
        a[i] = uc_sampler_sample(s1, lg, NULL);
        b[i] = uc_sampler_sample(s2, lg, NULL);
        c[i] = uc_sampler_sample(s3, lg, NULL);
    }
    assert_memory_equal(a, b, sizeof a);
    int same = 0;
    for (int i = 0; i < N; i++) {
        same += a[i] == c[i];
    }
    assert_true(same < N / 4); /* 50 tokens: chance agreement is about 1 in 25 */
    uc_sampler_destroy(s1);
    uc_sampler_destroy(s2);
    uc_sampler_destroy(s3);
    /* without a seed the fallback seeds the generator; with one the fallback is ignored */
    p.has_seed = false;
    struct uc_sampler *f1 = NULL, *f2 = NULL, *f3 = NULL;
    assert_int_equal(uc_sampler_create(&f1, &p, V, NULL, 0, 42), UC_OK);
    assert_int_equal(uc_sampler_create(&f2, &p, V, NULL, 0, 777), UC_OK);
    p.has_seed = true;
    p.seed = 42;
    assert_int_equal(uc_sampler_create(&f3, &p, V, NULL, 0, 777), UC_OK);
    for (int i = 0; i < N; i++) {
        d[i] = uc_sampler_sample(f1, lg, NULL);
        e[i] = uc_sampler_sample(f2, lg, NULL);
        c[i] = uc_sampler_sample(f3, lg, NULL);
    }
    assert_memory_equal(d, a, sizeof a);  /* fallback 42 == seed 42 */
    assert_memory_equal(c, a, sizeof a);  /* seed 42 wins over fallback 777 */
    assert_memory_not_equal(e, a, sizeof a);
    uc_sampler_destroy(f1);
    uc_sampler_destroy(f2);
    uc_sampler_destroy(f3);
}

/* ---- penalties (vLLM): repetition r divides positive / multiplies negative logits of every
 * token seen in the prompt or the output; frequency f subtracts f x count and presence p
 * subtracts p once, for output tokens only. Greedy makes each choice a comparison. ---------- */

static void test_repetition_penalty(void **state)
{
    (void)state;
    float lg[3] = {2.0f, 1.5f, -5.0f};
    int32_t prompt[2] = {0, 2};
    struct uc_sampling_params p = params(0.0f, 1);
    p.repetition_penalty = 1.5f; /* 2 / 1.5 = 1.33 < 1.5: token 1 wins */
    struct uc_sampler *s = make(&p, 3, prompt, 2);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 1);
    uc_sampler_destroy(s);
    p.repetition_penalty = 1.2f; /* 2 / 1.2 = 1.67 > 1.5: token 0 stays */
    s = make(&p, 3, prompt, 2);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    /* now token 0 is also an output token: no double penalty (still 1.67) */
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    uc_sampler_destroy(s);
    /* negative logits are multiplied: -1 x 1.5 = -1.5 < -1.3 */
    float neg[3] = {-1.0f, -1.3f, -9.0f};
    p.repetition_penalty = 1.5f;
    s = make(&p, 3, prompt, 2);
    assert_int_equal(uc_sampler_sample(s, neg, NULL), 1);
    uc_sampler_destroy(s);
    p.repetition_penalty = 1.25f; /* -1.25 > -1.3 */
    s = make(&p, 3, prompt, 2);
    assert_int_equal(uc_sampler_sample(s, neg, NULL), 0);
    uc_sampler_destroy(s);
    /* a penalty below 1 favours seen tokens: 1.5 / 0.5 = 3 > 2 */
    p.repetition_penalty = 0.5f;
    int32_t p1 = 1;
    s = make(&p, 3, &p1, 1);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 1);
    uc_sampler_destroy(s);
    /* output tokens count too: first 0 (not in the prompt), then 0 is penalised */
    p.repetition_penalty = 1.5f;
    s = make(&p, 3, NULL, 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 1);
    uc_sampler_destroy(s);
    /* prompt ids outside the vocabulary are ignored */
    int32_t odd[3] = {-1, 3, 1000};
    s = make(&p, 3, odd, 3);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    uc_sampler_destroy(s);
}

static void test_frequency_and_presence(void **state)
{
    (void)state;
    float lg[3] = {2.0f, 1.5f, -5.0f};
    int32_t seq[6];
    /* frequency 0.3: 0 (2.0), 0 (1.7), 1 (0's 1.4 < 1.5), 0 (1.4 > 1.2), 1 (1.1 < 1.2), ... */
    struct uc_sampling_params p = params(0.0f, 1);
    p.frequency_penalty = 0.3f;
    struct uc_sampler *s = make(&p, 3, NULL, 0);
    for (int i = 0; i < 6; i++) {
        seq[i] = uc_sampler_sample(s, lg, NULL);
    }
    int32_t want_f[6] = {0, 0, 1, 0, 1, 0};
    assert_memory_equal(seq, want_f, sizeof seq);
    uc_sampler_destroy(s);
    /* presence 0.3 does not grow with the count: 0 forever (1.7 > 1.5) */
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.3f;
    s = make(&p, 3, NULL, 0);
    for (int i = 0; i < 6; i++) {
        assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    }
    uc_sampler_destroy(s);
    /* presence 0.6: 0, then 1 (1.4 < 1.5), then 0 (1.4 > 0.9) and 0 stays ahead */
    p.presence_penalty = 0.6f;
    s = make(&p, 3, NULL, 0);
    int32_t want_p[6] = {0, 1, 0, 0, 0, 0};
    for (int i = 0; i < 6; i++) {
        seq[i] = uc_sampler_sample(s, lg, NULL);
    }
    assert_memory_equal(seq, want_p, sizeof seq);
    uc_sampler_destroy(s);
    /* neither applies to prompt tokens */
    int32_t prompt[4] = {0, 0, 0, 0};
    p.presence_penalty = 2.0f;
    p.frequency_penalty = 2.0f;
    s = make(&p, 3, prompt, 4);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 1); /* 2 - 2 - 2 < 1.5 */
    uc_sampler_destroy(s);
    /* a negative frequency penalty rewards repeats: token 1 (banned away from 0 once) then
     * beats 0 at 1.9 + 0.5 = 2.4 > 2.0, and again at 2.9 */
    float lg2[3] = {2.0f, 1.9f, -5.0f};
    p.presence_penalty = 0.0f;
    p.frequency_penalty = -0.5f;
    s = make(&p, 3, NULL, 0);
    uc_sampler_ban_once(s, 0);
    assert_int_equal(uc_sampler_sample(s, lg2, NULL), 1);
    assert_int_equal(uc_sampler_sample(s, lg2, NULL), 1);
    assert_int_equal(uc_sampler_sample(s, lg2, NULL), 1);
    uc_sampler_destroy(s);
    p.frequency_penalty = 0.0f; /* without it, 0 comes back */
    s = make(&p, 3, NULL, 0);
    uc_sampler_ban_once(s, 0);
    assert_int_equal(uc_sampler_sample(s, lg2, NULL), 1);
    assert_int_equal(uc_sampler_sample(s, lg2, NULL), 0);
    uc_sampler_destroy(s);
    /* all three at once: 2.0 / 1.25 - 0.1 - 0.2 = 1.3 < 1.5 after one output of token 0 */
    p = params(0.0f, 1);
    p.repetition_penalty = 1.25f;
    p.frequency_penalty = 0.1f;
    p.presence_penalty = 0.2f;
    s = make(&p, 3, NULL, 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 1);
    uc_sampler_destroy(s);
    p.presence_penalty = 0.0f; /* 1.6 - 0.05 = 1.55 > 1.5 */
    p.frequency_penalty = 0.05f;
    s = make(&p, 3, NULL, 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    uc_sampler_destroy(s);
}

/* ---- ban_once ------------------------------------------------------------------------------- */

static void test_ban_once(void **state)
{
    (void)state;
    float lg[4] = {5.0f, 4.0f, 3.0f, -1.0f};
    struct uc_sampling_params p = params(0.0f, 1);
    struct uc_sampler *s = make(&p, 4, NULL, 0);
    uc_sampler_ban_once(s, 0);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 1);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0); /* only for one sample */
    uc_sampler_ban_once(s, 0);
    uc_sampler_ban_once(s, 1);
    uc_sampler_ban_once(s, -1);  /* ignored */
    uc_sampler_ban_once(s, 4);   /* ignored */
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 2);
    assert_int_equal(uc_sampler_sample(s, lg, NULL), 0);
    uc_sampler_destroy(s);
    /* sampling: a dominant banned token never appears, the others do */
    float big[4] = {30.0f, 0.0f, 0.0f, 0.0f};
    p = params(1.0f, 5);
    s = make(&p, 4, NULL, 0);
    int counts[4] = {0};
    for (int i = 0; i < 3000; i++) {
        uc_sampler_ban_once(s, 0);
        counts[uc_sampler_sample(s, big, NULL)]++;
    }
    bool allowed[4] = {0, 1, 1, 1};
    assert_support(counts, 4, allowed);
    assert_int_equal(uc_sampler_sample(s, big, NULL), 0); /* no ban now: 1 - 3e-13 */
    uc_sampler_destroy(s);
}

/* ---- logprobs ------------------------------------------------------------------------------- */

static double log_softmax(const float *lg, int64_t n, int64_t i)
{
    double mx = -INFINITY, z = 0;
    for (int64_t j = 0; j < n; j++) {
        mx = lg[j] > mx ? lg[j] : mx;
    }
    for (int64_t j = 0; j < n; j++) {
        z += exp((double)lg[j] - mx);
    }
    return (double)lg[i] - mx - log(z);
}

static void test_logprobs(void **state)
{
    (void)state;
    enum { V = 64 };
    float lg[V];
    uc_test_fill(lg, V, 21, 0, 0);
    for (int i = 0; i < V; i++) {
        lg[i] *= 8.0f;
    }
    lg[10] = lg[11] = 9.5f; /* a tie at the top */
    /* penalties and temperature change the choice, never the reported logprob */
    struct uc_sampling_params p = params(0.7f, 3);
    p.repetition_penalty = 1.3f;
    p.presence_penalty = 0.5f;
    p.top_k = 5;
    struct uc_sampler *s = make(&p, V, NULL, 0);
    for (int k = 0; k < 50; k++) {
        float lp = 1.0f;
        int32_t t = uc_sampler_sample(s, lg, &lp);
        if (fabs(lp - log_softmax(lg, V, t)) > 1e-5) {
            fail_msg("token %d: logprob %.7f, want %.7f", t, (double)lp, log_softmax(lg, V, t));
        }
        assert_true(lp <= 0.0f);
    }
    int32_t ids[8];
    float lps[8];
    uc_sampler_top_logprobs(s, lg, 5, ids, lps);
    /* ids 10 and 11 first (tie: lower id first), then descending */
    assert_int_equal(ids[0], 10);
    assert_int_equal(ids[1], 11);
    for (int k = 0; k < 5; k++) {
        assert_true(fabs(lps[k] - log_softmax(lg, V, ids[k])) < 1e-5);
        if (k > 0) {
            assert_true(lg[ids[k]] <= lg[ids[k - 1]]);
        }
        int above = 0;
        for (int j = 0; j < V; j++) {
            above += lg[j] > lg[ids[k]];
        }
        assert_true(above <= k); /* it really is the k-th largest */
    }
    uc_sampler_destroy(s);
    /* n larger than the vocabulary: every token, in order; probabilities sum to one */
    float small[3] = {0.0f, 2.0f, 1.0f};
    s = make(&p, 3, NULL, 0);
    memset(ids, 0xff, sizeof ids);
    uc_sampler_top_logprobs(s, small, 8, ids, lps);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], 0);
    assert_int_equal(ids[3], -1); /* nothing written past the vocabulary */
    assert_true(fabs(exp(lps[0]) + exp(lps[1]) + exp(lps[2]) - 1.0) < 1e-6);
    assert_true(fabs(lps[0] - (2.0 - log(1.0 + exp(2.0) + exp(1.0)))) < 1e-6);
    uc_sampler_destroy(s);
}

/* ---- validation and lifetime ---------------------------------------------------------------- */

static void test_validation(void **state)
{
    (void)state;
    char msg[256];
    struct uc_sampling_params p = uc_sampling_default_params();
    assert_true(p.temperature == 1.0f && p.top_k == 0 && p.top_p == 1.0f && p.min_p == 0.0f);
    assert_true(p.repetition_penalty == 1.0f && p.frequency_penalty == 0.0f);
    assert_false(p.has_seed);
    assert_int_equal(uc_sampling_params_validate(&p, msg, sizeof msg), UC_OK);
    struct {
        const char *field;
        struct uc_sampling_params p;
        bool ok;
    } cases[16];
    int n = 0;
#define CASE(f, stmt, good)                                                                        \
    do {                                                                                           \
        cases[n].field = f;                                                                        \
        cases[n].p = uc_sampling_default_params();                                                 \
        struct uc_sampling_params *q = &cases[n].p;                                                \
        stmt;                                                                                      \
        cases[n++].ok = good;                                                                      \
    } while (0)
    CASE("sampling.temperature", q->temperature = -0.1f, false);
    CASE("sampling.temperature", q->temperature = NAN, false);
    CASE("sampling.temperature", q->temperature = 100.5f, false);
    CASE("sampling.top_k", q->top_k = -1, false);
    CASE("sampling.top_p", q->top_p = 0.0f, false);
    CASE("sampling.top_p", q->top_p = 1.01f, false);
    CASE("sampling.min_p", q->min_p = -0.01f, false);
    CASE("sampling.min_p", q->min_p = 1.5f, false);
    CASE("sampling.repetition_penalty", q->repetition_penalty = 0.0f, false);
    CASE("sampling.repetition_penalty", q->repetition_penalty = 101.0f, false);
    CASE("sampling.frequency_penalty", q->frequency_penalty = 2.5f, false);
    CASE("sampling.frequency_penalty", q->frequency_penalty = NAN, false);
    CASE("sampling.presence_penalty", q->presence_penalty = -2.01f, false);
    CASE("", (q->temperature = 0.0f, q->top_p = 1.0f, q->min_p = 1.0f, q->top_k = 100000), true);
    CASE("", (q->frequency_penalty = -2.0f, q->presence_penalty = 2.0f,
              q->repetition_penalty = 100.0f), true);
    CASE("", (q->temperature = 100.0f, q->top_p = 1e-6f), true);
#undef CASE
    for (int i = 0; i < n; i++) {
        msg[0] = '\0';
        uc_status rc = uc_sampling_params_validate(&cases[i].p, msg, sizeof msg);
        if (cases[i].ok) {
            assert_int_equal(rc, UC_OK);
        } else {
            assert_int_equal(rc, UC_ERR_INVALID_ARG);
            if (!strstr(msg, cases[i].field)) {
                fail_msg("case %d: message '%s' does not name %s", i, msg, cases[i].field);
            }
        }
    }
}

static void test_allocation_failures(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_sampling_params p = params(1.0f, 1);
    int32_t prompt[3] = {1, 2, 3};
    for (int64_t n = 1; n <= 5; n++) {
        struct uc_sampler *s = (struct uc_sampler *)(uintptr_t)1;
        uc_mem_fail_after(n);
        uc_status rc = uc_sampler_create(&s, &p, 1000, prompt, 3, 0);
        uc_mem_fail_after(0);
        assert_int_equal(rc, UC_ERR_NOMEM);
        assert_null(s);
        assert_int_equal(uc_mem_blocks_in_use(), blocks);
    }
    struct uc_sampler *s = NULL;
    uc_mem_fail_after(6);
    assert_int_equal(uc_sampler_create(&s, &p, 1000, prompt, 3, 0), UC_OK);
    uc_mem_fail_after(0);
    /* sampling itself allocates nothing */
    int64_t calls = uc_mem_alloc_calls();
    float lg[1000];
    uc_test_fill(lg, 1000, 2, 0, 0);
    for (int i = 0; i < 20; i++) {
        uc_sampler_sample(s, lg, NULL);
    }
    int32_t ids[4];
    float lps[4];
    uc_sampler_top_logprobs(s, lg, 4, ids, lps);
    assert_int_equal(uc_mem_alloc_calls(), calls);
    uc_sampler_destroy(s);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

int main(void)
{
    tu_log_capture(); /* quiet: refusals are expected */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_is_argmax),
        cmocka_unit_test(test_top_k_support),
        cmocka_unit_test(test_top_p_support),
        cmocka_unit_test(test_min_p_support),
        cmocka_unit_test(test_temperature_and_combinations),
        cmocka_unit_test(test_seeds),
        cmocka_unit_test(test_repetition_penalty),
        cmocka_unit_test(test_frequency_and_presence),
        cmocka_unit_test(test_ban_once),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
