/* ThinK's channel scores and selection (think.h). */
#include "compress/think.h"

#include <math.h>

int64_t uc_think_kdim(float ratio, int64_t head_dim)
{
    /* ratio arrives as a float (0.4f is 0.40000001): round the product to 6 decimals first */
    double pruned = floor(round((double)ratio * (double)head_dim * 1e6) / 1e6);
    int64_t k = head_dim - (int64_t)pruned;
    return k < 1 ? 1 : k;
}

void uc_think_query_part(double *out, const double *q_sumsq, int64_t n_q_heads, int64_t head_dim)
{
    for (int64_t c = 0; c < head_dim; c++) {
        out[c] = 0.0;
    }
    for (int64_t h = 0; h < n_q_heads; h++) {
        for (int64_t c = 0; c < head_dim; c++) {
            out[c] += sqrt(q_sumsq[h * head_dim + c]);
        }
    }
}

/* Score of channel c; a NaN (non-finite activations) ranks last. */
static double score(const double *q_part, const double *k_sumsq, int64_t c)
{
    double s = q_part[c] * sqrt(k_sumsq[c]);
    return isnan(s) ? -INFINITY : s;
}

void uc_think_select(int32_t *chan, const double *q_part, const double *k_sumsq,
                     int64_t head_dim, int64_t kdim)
{
    /* a channel is kept when fewer than kdim channels rank above it (score, then index):
     * D^2 comparisons, D <= 256 */
    int64_t n = 0;
    for (int64_t c = 0; c < head_dim; c++) {
        double sc = score(q_part, k_sumsq, c);
        int64_t above = 0;
        for (int64_t o = 0; o < head_dim && above < kdim; o++) {
            double so = score(q_part, k_sumsq, o);
            above += so > sc || (so == sc && o < c);
        }
        if (above < kdim) {
            chan[n++] = (int32_t)c;
        }
    }
}
