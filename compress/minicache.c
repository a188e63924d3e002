/* MiniCache's arithmetic: layer pairs (the paper's and the calibrated), angular distance, SLERP
 * merge, retention (minicache.h). */
#include "compress/minicache.h"

#include <math.h>
#include <stdlib.h>

#include "base/mem.h"
#include "base/util.h"

int64_t uc_minicache_start(int32_t start, int64_t n_layers)
{
    return start > 0 ? start : n_layers / 2;
}

static void pairs_clear(int16_t *partner, int16_t *pair_of, int64_t n_layers)
{
    for (int64_t l = 0; l < n_layers; l++) {
        partner[l] = -1;
        if (pair_of) {
            pair_of[l] = -1;
        }
    }
}

static void pair_set(int16_t *partner, int16_t *pair_of, int64_t a, int32_t p)
{
    partner[a] = (int16_t)(a + 1);
    partner[a + 1] = (int16_t)a;
    if (pair_of) {
        pair_of[a] = pair_of[a + 1] = (int16_t)p;
    }
}

int32_t uc_minicache_pairs(int16_t *partner, int16_t *pair_of, int64_t n_layers, int64_t start)
{
    int32_t n = 0;
    pairs_clear(partner, pair_of, n_layers);
    for (int64_t a = start; a >= 0 && a + 1 < n_layers && n < UC_MINICACHE_MAX_PAIRS; a += 2) {
        pair_set(partner, pair_of, a, n);
        n++;
    }
    return n;
}

int32_t uc_minicache_pairs_of(int16_t *partner, int16_t *pair_of, int64_t n_layers,
                              const int16_t *first, int32_t n_pairs)
{
    pairs_clear(partner, pair_of, n_layers);
    for (int32_t p = 0; p < n_pairs; p++) {
        pair_set(partner, pair_of, first[p], p);
    }
    return n_pairs;
}

int32_t uc_minicache_default_pairs(int64_t n_layers)
{
    int64_t n = (n_layers - n_layers / 2) / 2;
    n = n < UC_MINICACHE_MAX_PAIRS ? n : UC_MINICACHE_MAX_PAIRS;
    return (int32_t)(n > 0 ? n : 0);
}

uc_status uc_minicache_select(int16_t *first, const double *dist, int64_t n_layers,
                              int32_t n_pairs)
{
    int64_t L = n_layers, P = n_pairs;
    if (P < 1 || 2 * P > L || P > UC_MINICACHE_MAX_PAIRS || L > UC_MINICACHE_MAX_LAYERS) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "minicache: %lld pairs of %lld layers (1 to L / 2 = "
                       "%lld pairs, at most %d, of at most %d layers)", (long long)P,
                       (long long)L, (long long)(L / 2), UC_MINICACHE_MAX_PAIRS,
                       UC_MINICACHE_MAX_LAYERS);
    }
    for (int64_t l = 0; l + 1 < L; l++) {
        if (!isfinite(dist[l])) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "minicache: distance of layers %lld and %lld is "
                           "not finite", (long long)l, (long long)(l + 1));
        }
    }
    /* f[i][k]: least sum of k disjoint pairs inside layers 0 .. i - 1 (INFINITY: no room).
     * The pair (i - 2, i - 1) is either in the best set of [0, i) or not. */
    double *f = uc_malloc((size_t)((L + 1) * (P + 1)) * sizeof(double));
    if (!f) {
        return UC_ERRF(UC_ERR_NOMEM, "minicache selection L=%lld", (long long)L);
    }
#define F(i, k) f[(i) * (P + 1) + (k)]
    for (int64_t i = 0; i <= L; i++) {
        for (int64_t k = 0; k <= P; k++) {
            double best = k == 0 ? 0.0 : INFINITY;
            if (k > 0 && i >= 2) {
                double skip = F(i - 1, k), take = F(i - 2, k - 1) + dist[i - 2];
                best = take < skip ? take : skip;
            }
            F(i, k) = best;
        }
    }
    /* from the deepest layer down: a pair is taken whenever that is as good as skipping it, so
     * of equal sums the set with the deepest pairs wins */
    for (int64_t i = L, k = P; k > 0;) {
        if (F(i - 2, k - 1) + dist[i - 2] <= F(i - 1, k)) {
            first[k - 1] = (int16_t)(i - 2);
            i -= 2;
            k--;
        } else {
            i--;
        }
    }
#undef F
    uc_free(f);
    return UC_OK;
}

static double norm2(const float *x, int64_t d)
{
    double s = 0.0;
    for (int64_t i = 0; i < d; i++) {
        s += (double)x[i] * (double)x[i];
    }
    return sqrt(s);
}

double uc_minicache_distance(const float *xa, const float *xb, int64_t d)
{
    double na = norm2(xa, d), nb = norm2(xb, d), dot = 0.0;
    if (na == 0.0 || nb == 0.0) {
        return 0.0;
    }
    for (int64_t i = 0; i < d; i++) {
        dot += (double)xa[i] * (double)xb[i];
    }
    double c = dot / (na * nb);
    c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
    return acos(c) / M_PI;
}

void uc_minicache_merge(float *dir, float *na, float *nb, const float *xa, const float *xb,
                        int64_t d, float t)
{
    double a = norm2(xa, d), b = norm2(xb, d);
    *na = (float)a;
    *nb = (float)b;
    double ia = a > 0.0 ? 1.0 / a : 0.0, ib = b > 0.0 ? 1.0 / b : 0.0, dot = 0.0;
    for (int64_t i = 0; i < d; i++) {
        dot += (double)xa[i] * ia * (double)xb[i] * ib;
    }
    dot = dot > 1.0 ? 1.0 : (dot < -1.0 ? -1.0 : dot);
    double w = acos(dot), s = sin(w), ca, cb;
    if (w < 1e-6 || s < 1e-6) {
        ca = 1.0 - t;
        cb = t;
    } else {
        ca = sin((1.0 - t) * w) / s;
        cb = sin(t * w) / s;
    }
    double n = 0.0;
    for (int64_t i = 0; i < d; i++) {
        double v = ca * (double)xa[i] * ia + cb * (double)xb[i] * ib;
        n += v * v;
    }
    double inv = n > 0.0 ? 1.0 / sqrt(n) : 0.0;
    for (int64_t i = 0; i < d; i++) {
        dir[i] = (float)((ca * (double)xa[i] * ia + cb * (double)xb[i] * ib) * inv);
    }
}

static int cmp_desc(const void *x, const void *y)
{
    const struct uc_minicache_rank *a = x, *b = y;
    if (a->dist != b->dist) {
        return a->dist > b->dist ? -1 : 1;
    }
    return (a->i > b->i) - (a->i < b->i);
}

int64_t uc_minicache_retain(bool *retain, const double *dist, int64_t n, float gamma,
                            struct uc_minicache_rank *scratch)
{
    int64_t k = (int64_t)uc_round_half_up((double)gamma * (double)n);
    k = k < n ? k : n;
    for (int64_t i = 0; i < n; i++) {
        retain[i] = false;
        scratch[i].dist = dist[i];
        scratch[i].i = i;
    }
    if (k <= 0) {
        return 0;
    }
    qsort(scratch, (size_t)n, sizeof *scratch, cmp_desc);
    for (int64_t r = 0; r < k; r++) {
        retain[scratch[r].i] = true;
    }
    return k;
}
