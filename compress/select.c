/* Token and row selection: pure functions of the scores, so every rank that holds the same
 * scores picks the same indices. */
#include "compress/select.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

struct scored {
    double v;
    int64_t i;
};

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

size_t uc_select_scratch_bytes(int64_t n)
{
    return (size_t)(n > 0 ? n : 1) * (sizeof(struct scored) + sizeof(double));
}

/* Orders by score descending, then position ascending: a strict total order. */
static bool before(const struct scored *a, const struct scored *b)
{
    return a->v > b->v || (a->v == b->v && a->i < b->i);
}

/* Moves the k first elements (in `before` order) of v[0..n) to the front, unordered. */
static void select_first(struct scored *v, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        struct scored pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (before(&v[i], &pivot)) {
                i++;
            }
            while (before(&pivot, &v[j])) {
                j--;
            }
            if (i <= j) {
                struct scored t = v[i];
                v[i] = v[j];
                v[j] = t;
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

int64_t uc_topk_lowpos(int32_t *out, const double *score, int64_t n, int64_t k, void *scratch)
{
    if (k > n) {
        k = n;
    }
    if (k <= 0) {
        return 0;
    }
    struct scored *v = scratch;
    for (int64_t i = 0; i < n; i++) {
        v[i].v = isnan(score[i]) ? -INFINITY : score[i];
        v[i].i = i;
    }
    /* expected O(n) selection, then only the k winners are sorted, by position */
    select_first(v, n, k);
    for (int64_t i = 0; i < k; i++) {
        out[i] = (int32_t)v[i].i;
    }
    qsort(out, (size_t)k, sizeof *out, cmp_i32);
    return k;
}

void uc_maxpool1d(double *restrict out, const double *restrict s, int64_t n, int32_t kernel)
{
    int64_t half = kernel / 2;
    for (int64_t i = 0; i < n; i++) {
        int64_t a = i - half < 0 ? 0 : i - half;
        int64_t b = i + half >= n ? n - 1 : i + half;
        double m = -INFINITY;
        for (int64_t j = a; j <= b; j++) {
            m = s[j] > m ? s[j] : m;
        }
        out[i] = m;
    }
}

static int64_t append_tail(int32_t *keep, int64_t k, int64_t from, int64_t n)
{
    for (int64_t j = from; j < n; j++) {
        keep[k++] = (int32_t)j;
    }
    return k;
}

static int64_t keep_all(int32_t *keep, int64_t n) { return append_tail(keep, 0, 0, n); }

int64_t uc_select_snapkv(int32_t *keep, const double *colscore, int64_t n, int64_t budget,
                         int32_t window, int32_t kernel, void *scratch)
{
    if (budget >= n) {
        return keep_all(keep, n);
    }
    int64_t w = window < n ? window : n;
    int64_t m = n - w;
    struct scored *sv = scratch;
    double *pooled = (double *)(void *)(sv + (n > 0 ? n : 1));
    uc_maxpool1d(pooled, colscore, m, kernel);
    int64_t k = uc_topk_lowpos(keep, pooled, m, budget - w, sv);
    return append_tail(keep, k, m, n);
}

int64_t uc_select_h2o(int32_t *keep, const double *acc, int64_t n, int64_t budget, void *scratch)
{
    if (budget >= n) {
        return keep_all(keep, n);
    }
    int64_t r = budget / 2;
    int64_t k = uc_topk_lowpos(keep, acc, n - r, budget - r, scratch);
    return append_tail(keep, k, n - r, n);
}

int64_t uc_select_streaming(int32_t *keep, int64_t n, int64_t budget, int32_t sink)
{
    if (budget >= n) {
        return keep_all(keep, n);
    }
    int64_t k = 0;
    for (int64_t j = 0; j < sink && j < n; j++) {
        keep[k++] = (int32_t)j;
    }
    return append_tail(keep, k, n - (budget - sink), n);
}

int64_t uc_select_rows(int32_t *keep, const double *rowscore, int64_t n, int64_t keep_n,
                       int32_t window, void *scratch)
{
    if (keep_n >= n) {
        return keep_all(keep, n);
    }
    int64_t w = window < n ? window : n;
    int64_t k = uc_topk_lowpos(keep, rowscore, n - w, keep_n - w, scratch);
    return append_tail(keep, k, n - w, n);
}
