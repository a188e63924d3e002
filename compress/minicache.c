/* MiniCache's arithmetic: layer pairs, angular distance, SLERP merge, retention (minicache.h). */
#include "compress/minicache.h"

#include <math.h>
#include <stdlib.h>

#include "base/util.h"

int64_t uc_minicache_start(int32_t start, int64_t n_layers)
{
    return start > 0 ? start : n_layers / 2;
}

int32_t uc_minicache_pairs(int16_t *partner, int16_t *pair_of, int64_t n_layers, int64_t start)
{
    int32_t n = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        partner[l] = -1;
        if (pair_of) {
            pair_of[l] = -1;
        }
    }
    for (int64_t a = start; a >= 0 && a + 1 < n_layers && n < UC_MINICACHE_MAX_PAIRS; a += 2) {
        partner[a] = (int16_t)(a + 1);
        partner[a + 1] = (int16_t)a;
        if (pair_of) {
            pair_of[a] = pair_of[a + 1] = (int16_t)n;
        }
        n++;
    }
    return n;
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
