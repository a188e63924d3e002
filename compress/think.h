/* ThinK (arXiv 2407.21018): query-driven pruning of key channels. For each KV head, channel c
 * of the keys is scored by how much it can contribute to the observation window's attention
 * logits, ||Q_win[:, c]|| ||K[:, c]|| (the Frobenius norm of the rank-one product of the two
 * columns); with GQA the scores of the KV head's query heads are summed. The head keeps the
 * kdim best channels and decode multiplies only those channels of the query. */
#ifndef UC_COMPRESS_THINK_H
#define UC_COMPRESS_THINK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The paper's default share of key channels pruned (lambda). */
#define UC_THINK_DEFAULT_RATIO 0.4f

/* Key channels a head of D channels keeps when a share `ratio` is pruned: D - floor(ratio D)
 * (at least 1); D for ratio 0. */
int64_t uc_think_kdim(float ratio, int64_t head_dim);

/* Query part of the scores of one KV head: out[c] = sum over its g query heads h of
 * sqrt(q_sumsq[h * D + c]), c < D, where q_sumsq holds each query head's per-channel sums of
 * squares over the window rows. */
void uc_think_query_part(double *out, const double *q_sumsq, int64_t n_q_heads, int64_t head_dim);

/* The kept channels of one KV head: the kdim channels of largest score
 * q_part[c] * sqrt(k_sumsq[c]) (k_sumsq: the per-channel sums of squares of the head's keys),
 * ties to the lower channel, written ascending into chan (kdim). */
void uc_think_select(int32_t *chan, const double *q_part, const double *k_sumsq,
                     int64_t head_dim, int64_t kdim);

#ifdef __cplusplus
}
#endif
#endif
