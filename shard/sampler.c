/* Sampling: penalties, then temperature, min-p, top-k and top-p on a scratch copy of the
 * logits, then an inverse-CDF draw from the seeded generator. */
#include "sampler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"

#define MAX_BANS 8

struct uc_sampler {
    struct uc_sampling_params p;
    int64_t vocab;
    struct uc_rng rng;
    int32_t *counts;   /* (V) generated-token counts */
    uint8_t *in_prompt; /* (V) */
    float *work;       /* (V) */
    int32_t *idx;      /* (V) */
    int32_t bans[MAX_BANS];
    int n_bans;
};

struct uc_sampling_params uc_sampling_default_params(void)
{
    struct uc_sampling_params p = {
        .temperature = 1.0f,
        .top_k = 0,
        .top_p = 1.0f,
        .min_p = 0.0f,
        .repetition_penalty = 1.0f,
        .frequency_penalty = 0.0f,
        .presence_penalty = 0.0f,
        .seed = 0,
        .has_seed = false,
    };
    return p;
}

uc_status uc_sampling_params_validate(const struct uc_sampling_params *p, char *msg,
                                      size_t msg_size)
{
#define BAD(...)                                                                                   \
    do {                                                                                           \
        snprintf(msg, msg_size, __VA_ARGS__);                                                      \
        return UC_ERR_INVALID_ARG;                                                                 \
    } while (0)
    if (!(p->temperature >= 0.0f) || p->temperature > 100.0f) {
        BAD("sampling.temperature=%g must be in [0, 100]", (double)p->temperature);
    }
    if (p->top_k < 0) {
        BAD("sampling.top_k=%d must not be negative", p->top_k);
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        BAD("sampling.top_p=%g must be in (0, 1]", (double)p->top_p);
    }
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) {
        BAD("sampling.min_p=%g must be in [0, 1]", (double)p->min_p);
    }
    if (!(p->repetition_penalty > 0.0f) || p->repetition_penalty > 100.0f) {
        BAD("sampling.repetition_penalty=%g must be in (0, 100]", (double)p->repetition_penalty);
    }
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f)) {
        BAD("sampling.frequency_penalty=%g must be in [-2, 2]", (double)p->frequency_penalty);
    }
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f)) {
        BAD("sampling.presence_penalty=%g must be in [-2, 2]", (double)p->presence_penalty);
    }
    return UC_OK;
#undef BAD
}

uc_status uc_sampler_create(struct uc_sampler **out, const struct uc_sampling_params *p,
                            int64_t vocab, const int32_t *prompt, int64_t n_prompt,
                            uint64_t fallback_seed)
{
    *out = NULL;
    struct uc_sampler *s = uc_calloc(1, sizeof *s);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "sampler");
    }
    s->p = *p;
    s->vocab = vocab;
    s->counts = uc_calloc((size_t)vocab, sizeof *s->counts);
    s->in_prompt = uc_calloc((size_t)vocab, 1);
    s->work = uc_malloc((size_t)vocab * sizeof *s->work);
    s->idx = uc_malloc((size_t)vocab * sizeof *s->idx);
    if (!s->counts || !s->in_prompt || !s->work || !s->idx) {
        uc_sampler_destroy(s);
        return UC_ERRF(UC_ERR_NOMEM, "sampler vocab=%lld", (long long)vocab);
    }
    for (int64_t i = 0; i < n_prompt; i++) {
        if (prompt[i] >= 0 && prompt[i] < vocab) {
            s->in_prompt[prompt[i]] = 1;
        }
    }
    uc_rng_seed(&s->rng, p->has_seed ? p->seed : fallback_seed);
    *out = s;
    return UC_OK;
}

void uc_sampler_destroy(struct uc_sampler *s)
{
    if (!s) {
        return;
    }
    uc_free(s->counts);
    uc_free(s->in_prompt);
    uc_free(s->work);
    uc_free(s->idx);
    uc_free(s);
}

void uc_sampler_ban_once(struct uc_sampler *s, int32_t token)
{
    if (s->n_bans < MAX_BANS && token >= 0 && token < s->vocab) {
        s->bans[s->n_bans++] = token;
    }
}

static float log_sum_exp(const float *x, int64_t n)
{
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        mx = x[i] > mx ? x[i] : mx;
    }
    double sum = 0;
    for (int64_t i = 0; i < n; i++) {
        sum += exp((double)(x[i] - mx));
    }
    return mx + (float)log(sum);
}

static int cmp_desc(const void *a, const void *b, void *key)
{
    const float *k = key;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (k[x] != k[y]) {
        return k[x] > k[y] ? -1 : 1;
    }
    return (x > y) - (x < y);
}

/* Moves the k largest of w[idx[0..n)] to the front (unordered), quickselect style. */
static void select_top(int32_t *idx, int64_t n, int64_t k, const float *w)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = w[idx[(lo + hi) / 2]];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (w[idx[i]] > pivot) {
                i++;
            }
            while (w[idx[j]] < pivot) {
                j--;
            }
            if (i <= j) {
                int32_t t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
                i++;
                j--;
            }
        }
        if (k - 1 <= j) {
            hi = j;
        } else if (k - 1 >= i) {
            lo = i;
        } else {
            break;
        }
    }
}

int32_t uc_sampler_sample(struct uc_sampler *s, const float *logits, float *logprob)
{
    const struct uc_sampling_params *p = &s->p;
    int64_t v = s->vocab;
    float *w = s->work;
    memcpy(w, logits, (size_t)v * sizeof *w);
    for (int64_t i = 0; i < v; i++) {
        if (isnan(w[i])) {
            w[i] = -INFINITY;
        }
        bool seen = s->in_prompt[i] || s->counts[i] > 0;
        if (p->repetition_penalty != 1.0f && seen) {
            w[i] = w[i] > 0 ? w[i] / p->repetition_penalty : w[i] * p->repetition_penalty;
        }
        if (s->counts[i] > 0) {
            w[i] -= p->frequency_penalty * (float)s->counts[i] + p->presence_penalty;
        }
    }
    for (int i = 0; i < s->n_bans; i++) {
        w[s->bans[i]] = -INFINITY;
    }
    s->n_bans = 0;
    int32_t tok;
    if (p->temperature == 0.0f) {
        int64_t best = 0;
        for (int64_t i = 1; i < v; i++) {
            if (w[i] > w[best]) {
                best = i;
            }
        }
        tok = (int32_t)best;
    } else {
        for (int64_t i = 0; i < v; i++) {
            w[i] /= p->temperature;
        }
        float mx = -INFINITY;
        for (int64_t i = 0; i < v; i++) {
            mx = w[i] > mx ? w[i] : mx;
        }
        /* candidates: min-p threshold, then top-k, then top-p over the sorted survivors */
        float floor_logit = p->min_p > 0.0f ? mx + logf(p->min_p) : -INFINITY;
        int64_t n = 0;
        for (int64_t i = 0; i < v; i++) {
            if (w[i] >= floor_logit && w[i] > -INFINITY) {
                s->idx[n++] = (int32_t)i;
            }
        }
        if (p->top_k > 0 && n > p->top_k) {
            select_top(s->idx, n, p->top_k, w);
            n = p->top_k;
        }
        qsort_r(s->idx, (size_t)n, sizeof *s->idx, cmp_desc, w);
        double total = 0;
        for (int64_t i = 0; i < n; i++) {
            total += exp((double)(w[s->idx[i]] - mx));
        }
        if (p->top_p < 1.0f) {
            double cum = 0;
            int64_t keep = n;
            for (int64_t i = 0; i < n; i++) {
                cum += exp((double)(w[s->idx[i]] - mx)) / total;
                if (cum >= p->top_p) {
                    keep = i + 1;
                    break;
                }
            }
            n = keep;
            total = 0;
            for (int64_t i = 0; i < n; i++) {
                total += exp((double)(w[s->idx[i]] - mx));
            }
        }
        double r = uc_rng_uniform(&s->rng) * total, acc = 0;
        tok = s->idx[n > 0 ? n - 1 : 0];
        for (int64_t i = 0; i < n; i++) {
            acc += exp((double)(w[s->idx[i]] - mx));
            if (r < acc) {
                tok = s->idx[i];
                break;
            }
        }
    }
    if (logprob) {
        *logprob = logits[tok] - log_sum_exp(logits, v);
    }
    s->counts[tok]++;
    return tok;
}

void uc_sampler_top_logprobs(struct uc_sampler *s, const float *logits, int32_t n, int32_t *ids,
                             float *logprobs)
{
    int64_t v = s->vocab;
    if (n > v) {
        n = (int32_t)v;
    }
    for (int64_t i = 0; i < v; i++) {
        s->idx[i] = (int32_t)i;
    }
    select_top(s->idx, v, n, logits);
    qsort_r(s->idx, (size_t)n, sizeof *s->idx, cmp_desc, (void *)(uintptr_t)logits);
    float lse = log_sum_exp(logits, v);
    for (int32_t i = 0; i < n; i++) {
        ids[i] = s->idx[i];
        logprobs[i] = logits[s->idx[i]] - lse;
    }
}
