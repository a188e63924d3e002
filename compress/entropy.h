/* Truncated matrix entropy (UNCOMP.md section 1): centre rows, scale each to unit L2 norm,
 * C = X^T X / N (trace 1), eigenvalues by LAPACK's symmetric solver, then
 * H_k = -sum_{j<=k} l_j ln l_j / ln d. */
#ifndef UC_COMPRESS_ENTROPY_H
#define UC_COMPRESS_ENTROPY_H

#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* C (d, d) = Xn^T Xn / N of the centred, row-normalised X (N rows of d floats, row stride
 * `stride` floats). Double precision throughout. */
uc_status uc_entropy_cov(double *UC_RESTRICT cov, const float *UC_RESTRICT x, int64_t n_rows, int64_t d,
                         int64_t stride);
/* Eigenvalues of a symmetric (d, d) matrix, descending, tiny negatives clamped to 0. `cov` is
 * overwritten. */
/* Eigenvalues (d, descending) of the covariance of uc_entropy_cov of the rows of x; with fewer
 * rows than d through the n x n Gram matrix, which has the same nonzero eigenvalues (the others
 * are 0): a 1024-row window of a 4096-wide model costs a 1024 eigensolve, not a 4096 one. */
uc_status uc_entropy_eigvals_of_rows(double *eig, const float *x, int64_t n_rows, int64_t d,
                                     int64_t stride);
uc_status uc_entropy_eigvals(double *UC_RESTRICT eig, double *UC_RESTRICT cov, int64_t d);
/* -sum_{j<k} eig_j ln eig_j / ln d, with 0 ln 0 = 0; eig descending, d >= 2. */
double uc_entropy_truncated(const double *eig, int64_t d, int64_t k);
/* The default truncation: max(1, d / 4). */
int64_t uc_entropy_default_k(int64_t d);
/* All of the above for one matrix: *out = normalised truncated entropy with k (0 = default). */
uc_status uc_entropy_of_rows(double *out, const float *x, int64_t n_rows, int64_t d, int64_t stride,
                             int64_t k);
/* The same from an already computed covariance (destroyed). */
uc_status uc_entropy_of_cov(double *out, double *cov, int64_t d, int64_t k);

#ifdef __cplusplus
}
#endif
#endif
