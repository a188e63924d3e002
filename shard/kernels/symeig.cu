/* Eigenvalues of a batch of small symmetric matrices in double precision, one block each: the
 * matrix is reduced to tridiagonal form in shared memory by Householder reflections (as LAPACK's
 * dsytrd does, one column at a time), then every eigenvalue is found by bisection on Sturm
 * counts, one thread each. The matrices are the query covariances of UNCOMP.md section 1, so the
 * values come out descending and clamped at 0, as uc_entropy_eigvals gives them on the host. */
#include <cfloat>

#include "common.cuh"

#define SYMEIG_THREADS 256

/* Sum over the block; every thread gets it. red: 32 doubles of shared memory. */
static __device__ double block_sum(double v, double *red)
{
    v = uck_warp_sum_d(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads(); /* red may still be read from the last call */
    if (lane == 0) {
        red[w] = v;
    }
    __syncthreads();
    double t = 0.0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) {
        t += red[i];
    }
    return t;
}

/* Eigenvalues of the tridiagonal (dg, e) that are below x (Sturm sequence). */
static __device__ int sturm_below(const double *dg, const double *e, int d, double x,
                                  double pivmin)
{
    int cnt = 0;
    double q = dg[0] - x;
    for (int i = 0;; i++) {
        if (fabs(q) < pivmin) {
            q = -pivmin;
        }
        cnt += q < 0.0;
        if (i + 1 == d) {
            break;
        }
        q = dg[i + 1] - x - e[i] * e[i] / q;
    }
    return cnt;
}

static __global__ void __launch_bounds__(SYMEIG_THREADS)
    symeig_kernel(double *eig, const double *mats, int d)
{
    extern __shared__ double sm[];
    double *a = sm;          /* (d, d) */
    double *v = a + d * d;   /* Householder vector */
    double *p = v + d;       /* A v, then w */
    double *dg = p + d;      /* diagonal */
    double *e = dg + d;      /* off-diagonal: e[i] couples i and i + 1 */
    __shared__ double red[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const double *src = mats + (size_t)blockIdx.x * d * d;
    for (int i = threadIdx.x; i < d * d; i += blockDim.x) {
        a[i] = src[i];
    }
    __syncthreads();
    for (int k = 0; k + 2 < d; k++) {
        /* the column below the diagonal, read as row k right of it (the matrix is kept whole
         * and symmetric, and a row is consecutive in shared memory) */
        const int m = d - k - 1;
        const int o = k + 1;
        const double *xk = a + k * d + o;
        double s = 0.0;
        for (int i = threadIdx.x; i < m; i += blockDim.x) {
            s += xk[i] * xk[i];
        }
        const double nx2 = block_sum(s, red);
        const double x0 = xk[0];
        const double tail2 = nx2 - x0 * x0;
        if (threadIdx.x == 0) {
            dg[k] = a[k * d + k];
        }
        if (!(tail2 > 0.0)) { /* this column is already tridiagonal */
            if (threadIdx.x == 0) {
                e[k] = x0;
            }
            __syncthreads();
            continue;
        }
        const double alpha = x0 >= 0.0 ? -sqrt(nx2) : sqrt(nx2);
        for (int i = threadIdx.x; i < m; i += blockDim.x) {
            v[i] = xk[i] - (i == 0 ? alpha : 0.0);
        }
        const double beta = 2.0 / (tail2 + (x0 - alpha) * (x0 - alpha)); /* 2 / v'v */
        __syncthreads();
        /* p = beta A v over the trailing block: a warp per row, lanes along the row (the
         * block is symmetric, so rows and columns read alike) */
        for (int i = warp; i < m; i += nwarps) {
            const double *row = a + (o + i) * d + o;
            double t = 0.0;
            for (int j = lane; j < m; j += 32) {
                t += row[j] * v[j];
            }
            t = uck_warp_sum_d(t);
            if (lane == 0) {
                p[i] = beta * t;
            }
        }
        __syncthreads();
        double pv = 0.0;
        for (int i = threadIdx.x; i < m; i += blockDim.x) {
            pv += p[i] * v[i];
        }
        const double kk = 0.5 * beta * block_sum(pv, red);
        for (int i = threadIdx.x; i < m; i += blockDim.x) {
            p[i] -= kk * v[i]; /* w = p - K v */
        }
        __syncthreads();
        /* A <- A - v w' - w v': a warp per row, lanes along it (consecutive addresses) */
        for (int i = warp; i < m; i += nwarps) {
            double *row = a + (o + i) * d + o;
            const double vi = v[i], pi = p[i];
            for (int j = lane; j < m; j += 32) {
                row[j] -= vi * p[j] + pi * v[j];
            }
        }
        if (threadIdx.x == 0) {
            e[k] = alpha;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        if (d >= 2) {
            dg[d - 2] = a[(d - 2) * d + d - 2];
            e[d - 2] = a[(d - 1) * d + d - 2];
        }
        dg[d - 1] = a[(d - 1) * d + d - 1];
    }
    __syncthreads();
    /* Gershgorin bounds hold every eigenvalue */
    double lo = dg[0], hi = dg[0], emax = 0.0;
    for (int i = 0; i < d; i++) {
        double r = (i > 0 ? fabs(e[i - 1]) : 0.0) + (i + 1 < d ? fabs(e[i]) : 0.0);
        lo = fmin(lo, dg[i] - r);
        hi = fmax(hi, dg[i] + r);
        if (i + 1 < d) {
            emax = fmax(emax, e[i] * e[i]);
        }
    }
    const double span = fmax(fabs(lo), fabs(hi));
    lo -= 2.0 * DBL_EPSILON * span + DBL_MIN;
    hi += 2.0 * DBL_EPSILON * span + DBL_MIN;
    const double pivmin = DBL_MIN * fmax(1.0, emax);
    for (int t = threadIdx.x; t < d; t += blockDim.x) {
        const int r = d - 1 - t; /* the t-th largest is the r-th smallest */
        double l = lo, h = hi;
        for (int it = 0; it < 200; it++) {
            const double mid = 0.5 * (l + h);
            if (mid <= l || mid >= h || h - l <= 2.0 * DBL_EPSILON * fmax(fabs(l), fabs(h))) {
                break;
            }
            if (sturm_below(dg, e, d, mid, pivmin) > r) {
                h = mid;
            } else {
                l = mid;
            }
        }
        const double x = 0.5 * (l + h);
        eig[(size_t)blockIdx.x * d + t] = x > 0.0 ? x : 0.0;
    }
}

extern "C" cudaError_t uc_cuda_symeig(double *eig, const double *mats, int64_t n_mats, int64_t d,
                                      cudaStream_t stream)
{
    if (n_mats <= 0 || d <= 0 || d > UC_CUDA_SYMEIG_MAX_D) {
        return cudaErrorInvalidValue;
    }
    size_t smem = (size_t)(d * d + 4 * d) * sizeof(double);
    cudaError_t err = cudaFuncSetAttribute(symeig_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)smem);
    if (err != cudaSuccess) {
        return err;
    }
    symeig_kernel<<<(unsigned)n_mats, SYMEIG_THREADS, smem, stream>>>(eig, mats, (int)d);
    return cudaGetLastError();
}
