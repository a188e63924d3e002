/* Truncated matrix entropy (UNCOMP.md section 1): centre rows, scale each to unit L2 norm,
 * C = X^T X / N (trace 1), eigenvalues by LAPACK's symmetric solver, then
 * H_k = -sum_{j<=k} l_j ln l_j / ln d. */
#ifndef UC_COMPRESS_ENTROPY_H
#define UC_COMPRESS_ENTROPY_H

#include <stdbool.h>
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

/* The eigenvalues of uc_entropy_eigvals_of_rows, computed a slice of rows at a time, so that a
 * long window's spectrum never costs one step its whole covariance. The mean comes first: from
 * every row at once (_begin), or a slice at a time (_reset, then _mean until all n rows are
 * in); then each _add folds in rows [i0, i0 + k) (O(k d^2); on the Gram path of n < d,
 * O(k (i0 + k) d), rows added in order from 0), and _eigvals, once every row is in, solves.
 * A row must be the same in the mean and in its _add. */
struct uc_entropy_acc {
    int64_t n, d, cap; /* cap: the largest n the buffers hold */
    int64_t mean_rows; /* rows in the mean so far */
    int64_t done;      /* rows added */
    bool gram;         /* n < d: the n x n Gram matrix */
    double *mean;      /* (d) */
    double *acc;       /* (d, d) covariance or (n, n) Gram matrix, upper triangle */
    double *xc;        /* Gram: (n, d) centred, normalised rows; else (UC_ENTROPY_CHUNK, d) */
};
#define UC_ENTROPY_CHUNK 64
/* Caller-owned storage, empty (fini is safe on it). */
void uc_entropy_acc_fini(struct uc_entropy_acc *a);
/* Starts a spectrum of n_rows rows of d floats: sizes the buffers (reused when big enough) and
 * zeroes the sums. UC_ERR_NOMEM leaves a state that uc_entropy_acc_fini frees. */
uc_status uc_entropy_acc_reset(struct uc_entropy_acc *a, int64_t n_rows, int64_t d);
/* Adds the next k rows of x (row stride `stride` floats) to the mean. */
uc_status uc_entropy_acc_mean(struct uc_entropy_acc *a, const float *x, int64_t stride,
                              int64_t k);
/* _reset, then the mean of all n_rows rows of x. */
uc_status uc_entropy_acc_begin(struct uc_entropy_acc *a, const float *x, int64_t n_rows,
                               int64_t d, int64_t stride);
/* Folds rows [i0, i0 + k) into the matrix; x points at row 0 (row i at x + i * stride). The
 * mean must be complete. */
uc_status uc_entropy_acc_add(struct uc_entropy_acc *a, const float *x, int64_t stride, int64_t i0,
                             int64_t k);
/* After every row was added: eig (d values, descending) as uc_entropy_eigvals_of_rows gives
 * them. UC_ERR_INVALID_ARG when rows are missing. */
uc_status uc_entropy_acc_eigvals(struct uc_entropy_acc *a, double *eig);
/* -sum_{j<k} eig_j ln eig_j / ln d, with 0 ln 0 = 0; eig descending, d >= 2. */
double uc_entropy_truncated(const double *eig, int64_t d, int64_t k);
/* The default truncation: max(1, d / 4). */
int64_t uc_entropy_default_k(int64_t d);
/* Keeps the n_top largest values of each of n spectra of d (descending) and sets the rest to 0:
 * the form in which a backend's qspec hands back spectra solved only that far (n_top <= 0 or
 * >= d: nothing changes). */
void uc_entropy_keep_top(double *eig, int64_t n, int64_t d, int64_t n_top);
/* All of the above for one matrix: *out = normalised truncated entropy with k (0 = default). */
uc_status uc_entropy_of_rows(double *out, const float *x, int64_t n_rows, int64_t d, int64_t stride,
                             int64_t k);
/* The same from an already computed covariance (destroyed). */
uc_status uc_entropy_of_cov(double *out, double *cov, int64_t d, int64_t k);

#ifdef __cplusplus
}
#endif
#endif
