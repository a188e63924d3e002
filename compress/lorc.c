/* LoRC's bases (a symmetric eigendecomposition of W W^T) and progressive ranks (lorc.h). */
#include "compress/lorc.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"

/* LAPACK's divide-and-conquer symmetric eigensolver (Fortran ABI, as entropy.c declares it). */
void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda,
             double *w, double *work, const int *lwork, int *iwork, const int *liwork, int *info,
             size_t jobz_len, size_t uplo_len);

uc_status uc_lorc_basis(float *basis, double *sv, const float *w, int64_t head_dim, int64_t cols)
{
    if (head_dim < 1 || cols < 1 || head_dim > 4096) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "lorc basis D=%lld C=%lld", (long long)head_dim,
                       (long long)cols);
    }
    int64_t d = head_dim;
    double *wd = uc_malloc((size_t)(d * cols) * sizeof *wd);
    double *g = uc_calloc((size_t)(d * d), sizeof *g);
    double *eig = uc_malloc((size_t)d * sizeof *eig);
    double *work = NULL;
    int *iwork = NULL;
    uc_status rc = UC_OK;
    if (!wd || !g || !eig) {
        rc = UC_ERRF(UC_ERR_NOMEM, "lorc basis D=%lld C=%lld", (long long)d, (long long)cols);
        goto out;
    }
    for (int64_t i = 0; i < d * cols; i++) {
        wd[i] = w[i];
    }
    /* G = W W^T (upper triangle, row-major; symmetric, so LAPACK's column-major reads it too) */
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)d, (int)cols, 1.0, wd, (int)cols,
                0.0, g, (int)d);
    for (int64_t i = 0; i < d; i++) {
        for (int64_t j = 0; j < i; j++) {
            g[i * d + j] = g[j * d + i];
        }
    }
    int n = (int)d, lwork = -1, liwork = -1, info = 0, iwq = 0;
    double wq = 0;
    dsyevd_("V", "U", &n, g, &n, eig, &wq, &lwork, &iwq, &liwork, &info, 1, 1);
    if (info != 0) {
        rc = UC_ERRF(UC_ERR_INTERNAL, "lorc dsyevd workspace query info=%d", info);
        goto out;
    }
    lwork = (int)wq;
    liwork = iwq;
    work = uc_malloc((size_t)lwork * sizeof *work);
    iwork = uc_malloc((size_t)liwork * sizeof *iwork);
    if (!work || !iwork) {
        rc = UC_ERRF(UC_ERR_NOMEM, "lorc dsyevd workspace D=%lld", (long long)d);
        goto out;
    }
    dsyevd_("V", "U", &n, g, &n, eig, work, &lwork, iwork, &liwork, &info, 1, 1);
    if (info != 0) {
        rc = UC_ERRF(UC_ERR_INTERNAL, "lorc dsyevd info=%d D=%lld", info, (long long)d);
        goto out;
    }
    /* column k of the column-major result (row k here) is the eigenvector of eig[k], ascending */
    for (int64_t i = 0; i < d; i++) {
        int64_t k = d - 1 - i;
        sv[i] = eig[k] > 0.0 ? sqrt(eig[k]) : 0.0;
        for (int64_t c = 0; c < d; c++) {
            basis[i * d + c] = (float)g[k * d + c];
        }
    }
out:
    uc_free(wd);
    uc_free(g);
    uc_free(eig);
    uc_free(work);
    uc_free(iwork);
    return rc;
}

double uc_lorc_log_cond(const double *sv, int64_t n)
{
    double hi = sv[0], lo = sv[n - 1];
    if (!(hi > 0.0)) {
        return 0.0;
    }
    if (!(lo > hi * 1e-30)) {
        lo = hi * 1e-30;
    }
    return log(hi / lo);
}

/* sum over layers of min(D, max(1, c w_l)): the ranks' total before rounding. */
static double clipped_total(const double *w, int64_t n, double c, double d)
{
    double t = 0.0;
    for (int64_t l = 0; l < n; l++) {
        double x = c * w[l];
        t += x < 1.0 ? 1.0 : (x > d ? d : x);
    }
    return t;
}

void uc_lorc_ranks(int32_t *rank, const double *log_cond, int64_t n_layers, int64_t head_dim,
                   float rho)
{
    /* rho arrives as a float (0.3f is 0.30000001): round it to 6 decimals first */
    double r = round((double)rho * 1e6) / 1e6;
    double lo = INFINITY, hi = -INFINITY, cum = 0.0;
    double u[UC_LORC_MAX_LAYERS];
    int64_t L = n_layers < UC_LORC_MAX_LAYERS ? n_layers : UC_LORC_MAX_LAYERS;
    for (int64_t l = L - 1; l >= 0; l--) {
        cum += log_cond[l];
        u[l] = cum;
        lo = cum < lo ? cum : lo;
        hi = cum > hi ? cum : hi;
    }
    double mean = 0.0, wmin = INFINITY;
    for (int64_t l = 0; l < L; l++) {
        u[l] = 0.5 + (hi > lo ? (u[l] - lo) / (hi - lo) : 0.5);
        mean += u[l];
    }
    mean /= (double)L;
    for (int64_t l = 0; l < L; l++) {
        u[l] /= mean; /* w_l: mean 1 */
        wmin = u[l] < wmin ? u[l] : wmin;
    }
    /* the scale c with sum_l min(D, max(1, c w_l)) = rho D L: what a clipped layer cannot take
     * goes to the others (bisection; f is nondecreasing in c) */
    double d = (double)head_dim, target = r * d * (double)L;
    double c_lo = 0.0, c_hi = d / wmin;
    for (int it = 0; it < 200; it++) {
        double c = 0.5 * (c_lo + c_hi);
        if (clipped_total(u, L, c, d) < target) {
            c_lo = c;
        } else {
            c_hi = c;
        }
    }
    for (int64_t l = 0; l < L; l++) {
        double x = c_hi * u[l];
        x = x < 1.0 ? 1.0 : (x > d ? d : x);
        int64_t k = (int64_t)floor(x + 0.5);
        rank[l] = (int32_t)(k < 1 ? 1 : (k > head_dim ? head_dim : k));
    }
}
