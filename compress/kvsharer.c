/* KVSharer's calibration decision: pair ranking by cache distance and the greedy, similarity
 * checked acceptance (kvsharer.h). */
#include "compress/kvsharer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"

struct uc_kvsharer_params uc_kvsharer_default_params(void)
{
    struct uc_kvsharer_params p = {.threshold = 0.5, .ratio = 0.3, .target = 0};
    return p;
}

int32_t uc_kvsharer_target(const struct uc_kvsharer_params *p, int64_t n_layers)
{
    int64_t t = p->target > 0 ? p->target : (int64_t)uc_round_half_up(p->ratio * (double)n_layers);
    int64_t most = n_layers / 2 < UC_MAX_SHARE_PAIRS ? n_layers / 2 : UC_MAX_SHARE_PAIRS;
    t = t < most ? t : most;
    return (int32_t)(t > 0 ? t : 0);
}

struct ranked {
    double d;
    int32_t a, b;
};

static int cmp_ranked(const void *x, const void *y)
{
    const struct ranked *p = x, *q = y;
    if (p->d != q->d) {
        return p->d > q->d ? -1 : 1;
    }
    if (p->a != q->a) {
        return p->a < q->a ? -1 : 1;
    }
    return (p->b > q->b) - (p->b < q->b);
}

int64_t uc_kvsharer_rank(struct uc_share_pair *out, const double *dist2, int64_t n_layers)
{
    int64_t n = n_layers * (n_layers - 1) / 2, k = 0;
    struct ranked *r = uc_malloc((size_t)(n > 0 ? n : 1) * sizeof *r);
    if (!r) {
        return -1;
    }
    for (int64_t a = 0; a < n_layers; a++) {
        for (int64_t b = a + 1; b < n_layers; b++) {
            r[k++] = (struct ranked){dist2[a * n_layers + b], (int32_t)a, (int32_t)b};
        }
    }
    qsort(r, (size_t)n, sizeof *r, cmp_ranked);
    for (int64_t i = 0; i < n; i++) {
        out[i].src = (int16_t)r[i].a;
        out[i].dst = (int16_t)r[i].b;
    }
    uc_free(r);
    return n;
}

uc_status uc_kvsharer_search(struct uc_kvsharer_result *out, const double *dist2,
                             int64_t n_layers, const struct uc_kvsharer_params *p,
                             uc_kvsharer_eval_fn eval, void *user)
{
    memset(out, 0, sizeof *out);
    out->cosine = 1.0;
    if (n_layers < 2 || n_layers > INT16_MAX) {
        return n_layers < 2 ? UC_OK : UC_ERRF(UC_ERR_INVALID_ARG, "kvsharer: %lld layers",
                                              (long long)n_layers);
    }
    int32_t target = uc_kvsharer_target(p, n_layers);
    int64_t n = n_layers * (n_layers - 1) / 2;
    struct uc_share_pair *cand = uc_malloc((size_t)n * sizeof *cand);
    char *role = uc_calloc((size_t)n_layers, 1); /* 0 free, 's' source, 't' target */
    uc_status rc = UC_OK;
    if (!cand || !role || uc_kvsharer_rank(cand, dist2, n_layers) != n) {
        rc = UC_ERRF(UC_ERR_NOMEM, "kvsharer: %lld pairs", (long long)n);
        goto out;
    }
    for (int64_t i = 0; i < n && out->n_pairs < target; i++) {
        int32_t a = cand[i].src, b = cand[i].dst;
        if (role[b] != 0 || role[a] == 't') {
            continue;
        }
        out->pairs[out->n_pairs] = cand[i];
        double cs = 0.0;
        UC_CHECK(eval(user, out->pairs, out->n_pairs + 1, &cs), rc, out);
        out->n_tried++;
        if (cs > p->threshold) {
            role[a] = 's';
            role[b] = 't';
            out->n_pairs++;
            out->cosine = cs;
        }
    }
out:
    uc_free(cand);
    uc_free(role);
    return rc;
}

double uc_cosine_rows_mean(const float *a, const float *b, int64_t n_rows, int64_t dim)
{
    double sum = 0.0;
    for (int64_t r = 0; r < n_rows; r++) {
        double ab = 0, aa = 0, bb = 0;
        for (int64_t i = 0; i < dim; i++) {
            double x = a[r * dim + i], y = b[r * dim + i];
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        sum += aa > 0 && bb > 0 ? ab / sqrt(aa * bb) : (aa == bb ? 1.0 : 0.0);
    }
    return n_rows > 0 ? sum / (double)n_rows : 1.0;
}
