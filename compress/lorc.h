/* LoRC (arXiv 2410.03111): low-rank KV cache compression from the key and value projection
 * weights, with ranks that fall progressively with depth. For one KV head, the D x C slice W of
 * a projection has the truncated SVD W ~ U_r S_r V_r^T; its rank-r latent of a row x is
 * z = S_r V_r^T x = U_r^T (W x), r values instead of D, and W x ~ U_r z. The basis rows kept
 * here are the left singular vectors U^T (descending), so a latent of any rank r uses the first
 * r rows, and the latent of a computed key or value k is U_r^T k (exact: U_r^T W = S_r V_r^T).
 *
 * Ranks: a layer's sensitivity is its condition number, log(s_max / s_min) of the key and value
 * slices averaged over the model's KV heads; errors of layer l propagate through every later
 * layer, so layer l is ranked by the cumulative sum over layers i >= l (the log of the product of
 * the condition numbers), normalised to [0, 1] (u_l; 1 for the most sensitive, shallowest
 * layer). Layer l keeps r_l = round_half_up(min(D, max(1, c w_l))) dimensions for keys and for
 * values, where w_l = (0.5 + u_l) / mean over layers of (0.5 + u) (the most sensitive layer
 * weighs three times what the least does) and c is the scale at which the clipped values sum to
 * rho D L: the layers keep rho of the dimensions on average (before rounding), what a layer
 * clipped at D cannot take goes to the others, and rho = 1 keeps every dimension.
 * No engine, MPI or GPU here. */
#ifndef UC_COMPRESS_LORC_H
#define UC_COMPRESS_LORC_H

#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Default share of the key and value dimensions kept (rho): the paper's headline setting
 * halves the cache. */
#define UC_LORC_DEFAULT_RATIO 0.5f
/* Layers uc_lorc_ranks handles (the engine refuses deeper models for lorc). */
#define UC_LORC_MAX_LAYERS 1024

/* Left singular basis of one head's projection slice w (D, C), row-major float32: basis (D, D)
 * gets the left singular vectors as rows, largest singular value first, and sv (D) the singular
 * values, descending (both from a double-precision eigendecomposition of W W^T, LAPACK dsyevd).
 * UC_ERR_NOMEM, UC_ERR_INTERNAL when the eigensolver fails, UC_ERR_INVALID_ARG for D < 1 or
 * C < 1. */
uc_status uc_lorc_basis(float *basis, double *sv, const float *w, int64_t head_dim, int64_t cols);

/* log(s_max / s_min) of singular values sv (n, descending); a zero s_min counts as
 * s_max * 1e-30 (log cond 69.1). */
double uc_lorc_log_cond(const double *sv, int64_t n);

/* Ranks per layer (rank (L), L <= UC_LORC_MAX_LAYERS) for a kept share rho in (0, 1] from the layers' sensitivities
 * log_cond (L), as the file header says. */
void uc_lorc_ranks(int32_t *rank, const double *log_cond, int64_t n_layers, int64_t head_dim,
                   float rho);

#ifdef __cplusplus
}
#endif
#endif
