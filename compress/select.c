/* Token and row selection: pure functions of the scores, so every rank that holds the same
 * scores picks the same indices. */
#include "compress/select.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

size_t uc_select_scratch_bytes(int64_t n)
{
    return (size_t)(n > 0 ? n : 1) * 3 * sizeof(double);
}

/* max that ignores NaN in b (a never holds one: every chain starts at -inf) */
static inline double mx(double a, double b) { return b > a ? b : a; }

/* The k-th largest of v[0..n) (1 <= k <= n); v is reordered. Expected O(n). */
static double kth_largest(double *v, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        double pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) {
                i++;
            }
            while (v[j] < pivot) {
                j--;
            }
            if (i <= j) {
                double t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j) {
            hi = j;
        } else if (want >= i) {
            lo = i;
        } else {
            break; /* v[j+1 .. i-1] all equal the pivot */
        }
    }
    return v[want];
}

int64_t uc_topk_lowpos(int32_t *out, const double *score, int64_t n, int64_t k, void *scratch)
{
    if (k > n) {
        k = n;
    }
    if (k <= 0) {
        return 0;
    }
    double *v = scratch;
    for (int64_t i = 0; i < n; i++) {
        v[i] = isnan(score[i]) ? -INFINITY : score[i];
    }
    /* the k-th largest value: everything above it is kept, and of the values equal to it the
     * lowest positions, as many as are left; one pass in position order writes them sorted */
    double thr = kth_largest(v, n, k);
    int64_t above = 0;
    for (int64_t i = 0; i < n; i++) {
        above += !isnan(score[i]) && score[i] > thr;
    }
    int64_t ties = k - above, m = 0;
    for (int64_t i = 0; i < n && m < k; i++) {
        double x = isnan(score[i]) ? -INFINITY : score[i];
        if (x > thr || (x == thr && ties-- > 0)) {
            out[m++] = (int32_t)i;
        }
    }
    return m;
}

void uc_maxpool1d(double *restrict out, const double *restrict s, int64_t n, int32_t kernel,
                  double *restrict scratch)
{
    const int64_t half = kernel / 2, w = 2 * half + 1;
    /* the direct loop: windows of positions near the ends (cut short by the padding), and
     * everything when there is no scratch or little to gain */
    int64_t direct_end = scratch && kernel >= 3 && n >= 2 * w ? half : n;
    for (int64_t i = 0; i < n; i++) {
        if (i == direct_end) {
            i = n - half; /* the middle is done below */
        }
        int64_t a = i - half < 0 ? 0 : i - half;
        int64_t b = i + half >= n ? n - 1 : i + half;
        double m = -INFINITY;
        for (int64_t j = a; j <= b; j++) {
            m = mx(m, s[j]);
        }
        out[i] = m;
    }
    if (direct_end == n) {
        return;
    }
    /* van Herk / Gil-Werman over blocks of w positions: prefix maxima forward into scratch,
     * suffix maxima as a running value backward; the full window [a, a + w) is then
     * max(suffix from a to its block's end, prefix from the next block's start to a + w - 1).
     * mx is associative on NaN-free chains, so this equals the direct loop exactly. */
    double *pre = scratch;
    for (int64_t b0 = 0; b0 < n; b0 += w) {
        double m = -INFINITY;
        for (int64_t i = b0; i < b0 + w && i < n; i++) {
            m = mx(m, s[i]);
            pre[i] = m;
        }
    }
    /* the first start walked, n - w, may sit inside a block: its suffix runs to the block end */
    int64_t a = n - w, e = (a / w + 1) * w - 1;
    double suf = -INFINITY;
    for (int64_t j = e; j > a; j--) {
        suf = mx(suf, s[j]);
    }
    for (int64_t b0 = a - a % w; b0 >= 0; b0 -= w) { /* blocks downwards */
        for (; a >= b0; a--) {
            suf = mx(suf, s[a]);
            out[a + half] = mx(suf, pre[a + w - 1]);
        }
        suf = -INFINITY;
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
    double *v = scratch, *pooled = v + (n > 0 ? n : 1), *pre = pooled + (n > 0 ? n : 1);
    uc_maxpool1d(pooled, colscore, m, kernel, pre);
    int64_t k = uc_topk_lowpos(keep, pooled, m, budget - w, v);
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
