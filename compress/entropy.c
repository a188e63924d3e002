/* Matrix entropy with a real symmetric eigensolver (LAPACK dsyevd, from OpenBLAS's LAPACK); the
 * covariance is a double-precision SYRK of the centred, row-normalised rows. */
#include "compress/entropy.h"

#include <cblas.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "base/mem.h"

/* LAPACK's divide-and-conquer symmetric eigensolver (Fortran ABI; the hidden lengths of the two
 * character arguments come last). A symmetric matrix reads the same row- or column-major. */
void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda,
             double *w, double *work, const int *lwork, int *iwork, const int *liwork, int *info,
             size_t jobz_len, size_t uplo_len);

/* xc (n, d) = the rows of x centred over the rows, each scaled to unit L2 norm (zero rows stay
 * zero), in double precision. */
static uc_status centred_rows(double **out, const float *restrict x, int64_t n_rows, int64_t d,
                              int64_t stride)
{
    *out = NULL;
    if (n_rows <= 0 || d <= 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "rows=%lld d=%lld", (long long)n_rows, (long long)d);
    }
    double *xc = uc_malloc((size_t)(n_rows * d) * sizeof *xc);
    double *mean = uc_calloc((size_t)d, sizeof *mean);
    if (!xc || !mean) {
        uc_free(xc);
        uc_free(mean);
        return UC_ERRF(UC_ERR_NOMEM, "rows=%lld d=%lld", (long long)n_rows, (long long)d);
    }
    for (int64_t i = 0; i < n_rows; i++) {
        for (int64_t j = 0; j < d; j++) {
            mean[j] += x[i * stride + j];
        }
    }
    for (int64_t j = 0; j < d; j++) {
        mean[j] /= (double)n_rows;
    }
    for (int64_t i = 0; i < n_rows; i++) {
        double *r = xc + i * d;
        double nrm = 0;
        for (int64_t j = 0; j < d; j++) {
            r[j] = x[i * stride + j] - mean[j];
            nrm += r[j] * r[j];
        }
        nrm = sqrt(nrm);
        if (nrm > 0) {
            for (int64_t j = 0; j < d; j++) {
                r[j] /= nrm;
            }
        }
    }
    uc_free(mean);
    *out = xc;
    return UC_OK;
}

/* a (n, n) = upper triangle from SYRK mirrored into the lower one */
static void mirror_upper(double *a, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < i; j++) {
            a[i * n + j] = a[j * n + i];
        }
    }
}

uc_status uc_entropy_cov(double *restrict cov, const float *restrict x, int64_t n_rows, int64_t d,
                         int64_t stride)
{
    double *xc;
    uc_status rc = centred_rows(&xc, x, n_rows, d, stride);
    if (rc != UC_OK) {
        return rc;
    }
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)n_rows, 1.0 / (double)n_rows,
                xc, (int)d, 0.0, cov, (int)d);
    mirror_upper(cov, d);
    uc_free(xc);
    return UC_OK;
}

uc_status uc_entropy_eigvals_of_rows(double *eig, const float *x, int64_t n_rows, int64_t d,
                                     int64_t stride)
{
    if (n_rows >= d) {
        double *cov = uc_malloc((size_t)(d * d) * sizeof *cov);
        if (!cov) {
            return UC_ERRF(UC_ERR_NOMEM, "d=%lld", (long long)d);
        }
        uc_status rc = uc_entropy_cov(cov, x, n_rows, d, stride);
        if (rc == UC_OK) {
            rc = uc_entropy_eigvals(eig, cov, d);
        }
        uc_free(cov);
        return rc;
    }
    /* X^T X / n and the Gram matrix X X^T / n have the same nonzero eigenvalues */
    double *xc;
    uc_status rc = centred_rows(&xc, x, n_rows, d, stride);
    if (rc != UC_OK) {
        return rc;
    }
    double *gram = uc_malloc((size_t)(n_rows * n_rows) * sizeof *gram);
    if (!gram) {
        uc_free(xc);
        return UC_ERRF(UC_ERR_NOMEM, "rows=%lld", (long long)n_rows);
    }
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)n_rows, (int)d,
                1.0 / (double)n_rows, xc, (int)d, 0.0, gram, (int)n_rows);
    mirror_upper(gram, n_rows);
    uc_free(xc);
    rc = uc_entropy_eigvals(eig, gram, n_rows);
    uc_free(gram);
    for (int64_t i = n_rows; rc == UC_OK && i < d; i++) {
        eig[i] = 0.0;
    }
    return rc;
}

uc_status uc_entropy_eigvals(double *restrict eig, double *restrict cov, int64_t d)
{
    int n = (int)d, info = 0, lwork = -1, liwork = -1, iwq = 0;
    double wq = 0;
    dsyevd_("N", "U", &n, cov, &n, eig, &wq, &lwork, &iwq, &liwork, &info, 1, 1);
    if (info != 0) {
        return UC_ERRF(UC_ERR_INTERNAL, "dsyevd workspace query info=%d d=%lld", info,
                       (long long)d);
    }
    lwork = (int)wq + 1;
    liwork = iwq + 1;
    double *work = uc_malloc((size_t)lwork * sizeof *work);
    int *iwork = uc_malloc((size_t)liwork * sizeof *iwork);
    if (!work || !iwork) {
        uc_free(work);
        uc_free(iwork);
        return UC_ERRF(UC_ERR_NOMEM, "dsyevd workspace d=%lld", (long long)d);
    }
    dsyevd_("N", "U", &n, cov, &n, eig, work, &lwork, iwork, &liwork, &info, 1, 1);
    uc_free(work);
    uc_free(iwork);
    if (info != 0) {
        return UC_ERRF(UC_ERR_INTERNAL, "dsyevd info=%d d=%lld", info, (long long)d);
    }
    for (int64_t i = 0; i < d / 2; i++) { /* ascending -> descending */
        double t = eig[i];
        eig[i] = eig[d - 1 - i];
        eig[d - 1 - i] = t;
    }
    for (int64_t i = 0; i < d; i++) {
        if (eig[i] < 0) {
            eig[i] = 0;
        }
    }
    return UC_OK;
}

/* ---- the same spectrum a slice of rows at a time ---------------------------------------- */

void uc_entropy_acc_fini(struct uc_entropy_acc *a)
{
    uc_free(a->mean);
    uc_free(a->acc);
    uc_free(a->xc);
    memset(a, 0, sizeof *a);
}

uc_status uc_entropy_acc_reset(struct uc_entropy_acc *a, int64_t n_rows, int64_t d)
{
    if (n_rows <= 0 || d <= 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "rows=%lld d=%lld", (long long)n_rows, (long long)d);
    }
    bool gram = n_rows < d;
    int64_t m = gram ? n_rows : d; /* the matrix's side */
    if (a->d != d || a->cap < n_rows || a->gram != gram) {
        uc_entropy_acc_fini(a);
        a->mean = uc_malloc((size_t)d * sizeof *a->mean);
        a->acc = uc_malloc((size_t)(m * m) * sizeof *a->acc);
        a->xc = uc_malloc((size_t)((gram ? n_rows : UC_ENTROPY_CHUNK) * d) * sizeof *a->xc);
        if (!a->mean || !a->acc || !a->xc) {
            return UC_ERRF(UC_ERR_NOMEM, "rows=%lld d=%lld", (long long)n_rows, (long long)d);
        }
        a->d = d;
        a->cap = n_rows;
        a->gram = gram;
    }
    a->n = n_rows;
    a->mean_rows = 0;
    a->done = 0;
    memset(a->mean, 0, (size_t)d * sizeof *a->mean);
    memset(a->acc, 0, (size_t)(m * m) * sizeof *a->acc);
    return UC_OK;
}

uc_status uc_entropy_acc_mean(struct uc_entropy_acc *a, const float *x, int64_t stride,
                              int64_t k)
{
    if (k < 0 || a->mean_rows + k > a->n) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "%lld more rows for the mean of %lld (%lld in)",
                       (long long)k, (long long)a->n, (long long)a->mean_rows);
    }
    for (int64_t i = 0; i < k; i++) {
        for (int64_t j = 0; j < a->d; j++) {
            a->mean[j] += x[i * stride + j];
        }
    }
    a->mean_rows += k;
    if (a->mean_rows == a->n) {
        for (int64_t j = 0; j < a->d; j++) {
            a->mean[j] /= (double)a->n;
        }
    }
    return UC_OK;
}

uc_status uc_entropy_acc_begin(struct uc_entropy_acc *a, const float *x, int64_t n_rows,
                               int64_t d, int64_t stride)
{
    uc_status rc = uc_entropy_acc_reset(a, n_rows, d);
    return rc == UC_OK ? uc_entropy_acc_mean(a, x, stride, n_rows) : rc;
}

/* Row i of x, centred with the mean and scaled to unit norm (a zero row stays zero), into r. */
static void centre_row(double *restrict r, const float *restrict x, const double *mean,
                       int64_t d)
{
    double nrm = 0;
    for (int64_t j = 0; j < d; j++) {
        r[j] = x[j] - mean[j];
        nrm += r[j] * r[j];
    }
    nrm = sqrt(nrm);
    if (nrm > 0) {
        for (int64_t j = 0; j < d; j++) {
            r[j] /= nrm;
        }
    }
}

uc_status uc_entropy_acc_add(struct uc_entropy_acc *a, const float *x, int64_t stride, int64_t i0,
                             int64_t k)
{
    int64_t d = a->d, n = a->n;
    if (i0 < 0 || k < 0 || i0 + k > n || (a->gram && i0 != a->done) || a->mean_rows != n) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "rows [%lld, %lld) of %lld (%lld added)",
                       (long long)i0, (long long)(i0 + k), (long long)n, (long long)a->done);
    }
    if (a->gram) {
        /* rows [i0, i0 + k) of G = Xc Xc^T / n against every row so far (the lower part of the
         * block row; _eigvals mirrors it) */
        for (int64_t i = i0; i < i0 + k; i++) {
            centre_row(a->xc + i * d, x + i * stride, a->mean, d);
        }
        if (k > 0) {
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)k, (int)(i0 + k), (int)d,
                        1.0 / (double)n, a->xc + i0 * d, (int)d, a->xc, (int)d, 0.0,
                        a->acc + i0 * n, (int)n);
        }
    } else {
        for (int64_t c0 = i0; c0 < i0 + k; c0 += UC_ENTROPY_CHUNK) {
            int64_t m = i0 + k - c0 < UC_ENTROPY_CHUNK ? i0 + k - c0 : UC_ENTROPY_CHUNK;
            for (int64_t i = 0; i < m; i++) {
                centre_row(a->xc + i * d, x + (c0 + i) * stride, a->mean, d);
            }
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)m,
                        1.0 / (double)n, a->xc, (int)d, 1.0, a->acc, (int)d);
        }
    }
    a->done += k;
    return UC_OK;
}

uc_status uc_entropy_acc_eigvals(struct uc_entropy_acc *a, double *eig)
{
    if (a->n <= 0 || a->done != a->n) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "%lld of %lld rows added", (long long)a->done,
                       (long long)a->n);
    }
    int64_t m = a->gram ? a->n : a->d;
    if (a->gram) { /* the Gram blocks filled the lower triangle */
        for (int64_t i = 0; i < m; i++) {
            for (int64_t j = i + 1; j < m; j++) {
                a->acc[i * m + j] = a->acc[j * m + i];
            }
        }
    } else {
        mirror_upper(a->acc, m);
    }
    uc_status rc = uc_entropy_eigvals(eig, a->acc, m);
    for (int64_t i = m; rc == UC_OK && i < a->d; i++) {
        eig[i] = 0.0;
    }
    a->done = 0; /* the matrix is spent: a new _begin is needed */
    return rc;
}

double uc_entropy_truncated(const double *eig, int64_t d, int64_t k)
{
    if (k > d) {
        k = d;
    }
    double h = 0;
    for (int64_t j = 0; j < k; j++) {
        if (eig[j] > 0) {
            h -= eig[j] * log(eig[j]);
        }
    }
    return d > 1 ? h / log((double)d) : 0.0;
}

int64_t uc_entropy_default_k(int64_t d) { return d / 4 > 1 ? d / 4 : 1; }

void uc_entropy_keep_top(double *eig, int64_t n, int64_t d, int64_t n_top)
{
    if (n_top <= 0 || n_top >= d) {
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        memset(eig + i * d + n_top, 0, (size_t)(d - n_top) * sizeof *eig);
    }
}

uc_status uc_entropy_of_cov(double *out, double *cov, int64_t d, int64_t k)
{
    double *eig = uc_malloc((size_t)d * sizeof *eig);
    if (!eig) {
        return UC_ERRF(UC_ERR_NOMEM, "d=%lld", (long long)d);
    }
    uc_status rc = uc_entropy_eigvals(eig, cov, d);
    if (rc == UC_OK) {
        *out = uc_entropy_truncated(eig, d, k > 0 ? k : uc_entropy_default_k(d));
    }
    uc_free(eig);
    return rc;
}

uc_status uc_entropy_of_rows(double *out, const float *x, int64_t n_rows, int64_t d, int64_t stride,
                             int64_t k)
{
    double *cov = uc_malloc((size_t)(d * d) * sizeof *cov);
    if (!cov) {
        return UC_ERRF(UC_ERR_NOMEM, "d=%lld", (long long)d);
    }
    uc_status rc = uc_entropy_cov(cov, x, n_rows, d, stride);
    if (rc == UC_OK) {
        rc = uc_entropy_of_cov(out, cov, d, k);
    }
    uc_free(cov);
    return rc;
}
