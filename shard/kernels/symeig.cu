/* Eigenvalues of a batch of small symmetric matrices, in two kernels:
 *
 * 1. Tridiagonalisation, one block per matrix: the matrix is reduced by Householder reflections
 *    (as LAPACK's dsytd2 does, one column at a time) while it stays in the block's registers,
 *    64 words a thread (rows interleaved over the warps, columns over the lanes), in double, or
 *    in float for the covariances of bf16 queries (224 or 127 registers a thread: all of its
 *    multiprocessor's register file, or half, taken from the prefill it runs beside). A step
 *    costs three barriers: the warp holding the column forms the reflector, every warp forms its
 *    rows of p = beta A v (row sums over the lanes by a transposing reduction), then every warp
 *    forms p'v for itself and applies the rank-2 update to what it holds, skipping the rows and
 *    the column groups left of the trailing block. The diagonal and off-diagonal are written
 *    over the matrix's own first 2d - 1 words.
 * 2. Multisection on Sturm counts in double, eight lanes per eigenvalue: they count the
 *    eigenvalues below 8 points of the eigenvalue's current interval at once, so an iteration
 *    narrows it 9-fold (about 17 iterations to LAPACK dstebz's tolerance, eps times the matrix's
 *    norm, instead of some 50 bisection steps), the counts need no division, and the batch
 *    spreads over every multiprocessor rather than one block per matrix. Each eigenvalue is
 *    found on its own, so a caller that needs only the largest n_top (a truncated entropy: k =
 *    d / 4 by default) pays for those alone: the multisection is about half of the solve at
 *    d = 128.
 *
 * The matrices are the query covariances of UNCOMP.md section 1, so the values come out
 * descending and clamped at 0, as uc_entropy_eigvals gives them on the host. */
#include <cfloat>

#include "common.cuh"

#define TRI_THREADS 256
#define SECT_WARPS 8

/* Thread (warp w, lane l) of the tridiagonalisation holds A(i, j) for the rows i = w + 8 r and
 * the columns j = l + 32 c in registers. */
#define TRI_WARPS (TRI_THREADS / 32)
#define TRI_R (UC_CUDA_SYMEIG_MAX_D / TRI_WARPS)
#define TRI_C (UC_CUDA_SYMEIG_MAX_D / 32)
static_assert(TRI_R == 16, "the row sums reduce 16 rows per warp (warp_sum16)");

static __device__ __forceinline__ double warp_sum_t(double v) { return uck_warp_sum_d(v); }
static __device__ __forceinline__ float warp_sum_t(float v) { return uck_warp_sum(v); }

/* Sums each of the 16 values over the warp's lanes; lane l gets the sum of value (l >> 1) & 15
 * (a transposing reduction: 16 exchanges instead of 16 x 5). */
template <typename T> static __device__ __forceinline__ T warp_sum16(T (&x)[16], int lane)
{
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const bool up = (lane >> 4) & 1;
        const T send = up ? x[i] : x[i + 8], keep = up ? x[i + 8] : x[i];
        x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const bool up = (lane >> 3) & 1;
        const T send = up ? x[i] : x[i + 4], keep = up ? x[i + 4] : x[i];
        x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const bool up = (lane >> 2) & 1;
        const T send = up ? x[i] : x[i + 2], keep = up ? x[i + 2] : x[i];
        x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
    }
    {
        const bool up = (lane >> 1) & 1;
        const T send = up ? x[0] : x[1], keep = up ? x[1] : x[0];
        x[0] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
    }
    return x[0] + __shfl_xor_sync(0xffffffffu, x[0], 1);
}

/* T: the arithmetic of the reduction. double, or float where the matrices came from bf16
 * queries (their covariances carry that rounding already, and a float reduction's error, about
 * d x 6e-8 of the trace, is far inside it): half the registers and shuffles of a step. */
template <typename T>
static __global__ void __launch_bounds__(TRI_THREADS, 1) tridiag_kernel(double *mats, int d)
{
    __shared__ T vs[UC_CUDA_SYMEIG_MAX_D], ws[UC_CUDA_SYMEIG_MAX_D];
    __shared__ T dg[UC_CUDA_SYMEIG_MAX_D], e[UC_CUDA_SYMEIG_MAX_D];
    __shared__ T sh_beta;
    __shared__ int sh_skip;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    double *mat = mats + (size_t)blockIdx.x * d * d;
    T a[TRI_R][TRI_C];
#pragma unroll
    for (int r = 0; r < TRI_R; r++) {
#pragma unroll
        for (int c = 0; c < TRI_C; c++) {
            const int i = warp + TRI_WARPS * r, j = lane + 32 * c;
            a[r][c] = i < d && j < d ? (T)mat[(size_t)i * d + j] : T(0);
        }
    }
    for (int k = 0; k + 2 < d; k++) {
        const int o = k + 1;
        /* the warp holding row k forms the reflector of its part right of the diagonal (the
         * column below it: the matrix is kept symmetric) */
        if (warp == k % TRI_WARPS) {
            /* in float the squares below the column's first entry are summed apart: nx2 - x0^2
             * would lose a tail under sqrt(eps) |x0| to cancellation and take the column for
             * tridiagonal (double keeps its bits: the fp32 mode's kept sets rest on them) */
            constexpr bool apart = sizeof(T) < sizeof(double);
            T x[TRI_C];
            T s = T(0), x0 = T(0);
#pragma unroll
            for (int r = 0; r < TRI_R; r++) {
                if (warp + TRI_WARPS * r == k) {
#pragma unroll
                    for (int c = 0; c < TRI_C; c++) {
                        const int j = lane + 32 * c;
                        x[c] = j >= o && j < d ? a[r][c] : T(0);
                        s += apart && j == o ? T(0) : x[c] * x[c];
                        if (j == o) {
                            x0 = x[c];
                        }
                        if (j == k) {
                            dg[k] = a[r][c];
                        }
                    }
                }
            }
            const T sum = warp_sum_t(s);
            x0 = __shfl_sync(0xffffffffu, x0, o & 31);
            const T nx2 = apart ? sum + x0 * x0 : sum, tail2 = apart ? sum : sum - x0 * x0;
            const T alpha = x0 >= T(0) ? -sqrt(nx2) : sqrt(nx2);
            const bool skip = !(tail2 > T(0)); /* this column is already tridiagonal */
#pragma unroll
            for (int c = 0; c < TRI_C; c++) {
                const int j = lane + 32 * c;
                vs[j] = skip ? T(0) : x[c] - (j == o ? alpha : T(0));
            }
            if (lane == 0) {
                e[k] = skip ? x0 : alpha;
                sh_skip = skip;
                sh_beta = skip ? T(0) : T(2) / (tail2 + (x0 - alpha) * (x0 - alpha)); /* 2/v'v */
            }
        }
        __syncthreads();
        const bool skip = sh_skip;
        const T beta = sh_beta;
        if (!skip) {
            /* p = A v for the rows below k (v is zero left of o): row sums over the lanes */
            T part[TRI_R];
            T vj[TRI_C];
#pragma unroll
            for (int c = 0; c < TRI_C; c++) {
                vj[c] = vs[lane + 32 * c];
            }
#pragma unroll
            for (int r = 0; r < TRI_R; r++) {
                part[r] = T(0);
                if (warp + TRI_WARPS * r >= o) {
#pragma unroll
                    for (int c = 0; c < TRI_C; c++) {
                        if (32 * c + 31 >= o) {
                            part[r] += a[r][c] * vj[c];
                        }
                    }
                }
            }
            const T pi = warp_sum16(part, lane);
            const int i = warp + TRI_WARPS * ((lane >> 1) & 15);
            if ((lane & 1) == 0 && i < UC_CUDA_SYMEIG_MAX_D) {
                ws[i] = i >= o && i < d ? beta * pi : T(0); /* p = beta A v, for now */
            }
        }
        __syncthreads();
        if (!skip) {
            /* every warp: K = beta p'v / 2 and w = p - K v; then A <- A - v w' - w v' */
            T pv = T(0);
#pragma unroll
            for (int c = 0; c < TRI_C; c++) {
                pv += ws[lane + 32 * c] * vs[lane + 32 * c];
            }
            const T kk = T(0.5) * beta * warp_sum_t(pv);
            T vj[TRI_C], wj[TRI_C];
#pragma unroll
            for (int c = 0; c < TRI_C; c++) {
                vj[c] = vs[lane + 32 * c];
                wj[c] = ws[lane + 32 * c] - kk * vj[c];
            }
#pragma unroll
            for (int r = 0; r < TRI_R; r++) {
                const int i = warp + TRI_WARPS * r;
                if (i >= o) {
                    const T vi = vs[i], wi = ws[i] - kk * vi;
#pragma unroll
                    for (int c = 0; c < TRI_C; c++) {
                        if (32 * c + 31 >= o) {
                            a[r][c] -= vi * wj[c] + wi * vj[c];
                        }
                    }
                }
            }
        }
        __syncthreads(); /* vs and ws are rewritten by the next step */
    }
    /* the last 2 x 2 block */
#pragma unroll
    for (int r = 0; r < TRI_R; r++) {
#pragma unroll
        for (int c = 0; c < TRI_C; c++) {
            const int i = warp + TRI_WARPS * r, j = lane + 32 * c;
            if (d >= 2 && i == d - 2 && j == d - 2) {
                dg[d - 2] = a[r][c];
            }
            if (d >= 2 && i == d - 1 && j == d - 2) {
                e[d - 2] = a[r][c];
            }
            if (i == d - 1 && j == d - 1) {
                dg[d - 1] = a[r][c];
            }
        }
    }
    __syncthreads();
    /* the matrix's first 2d - 1 words: the diagonal, then the off-diagonal */
    for (int i = tid; i < 2 * d - 1; i += TRI_THREADS) {
        mat[i] = i < d ? dg[i] : e[i - d];
    }
}

/* Eigenvalues of the tridiagonal (dg, e2 = squared off-diagonal) below x: the sign changes of
 * the Sturm sequence p_0 = 1, p_1 = dg_0 - x, p_k+1 = (dg_k - x) p_k - e2_k-1 p_k-1, with no
 * division. A zero term becomes a tiny one of the sign opposite to the term before it (the
 * pivot -pivmin of the LDL' form), so a split of the matrix (e2 = 0) is counted right; the pair
 * is rescaled by a power of two every 8 terms, so nothing overflows or underflows. */
static __device__ __forceinline__ void sturm_term(double dgi, double e2i, double x, double &a,
                                                  double &b, int &cnt)
{
    double c = (dgi - x) * b - e2i * a;
    if (c == 0.0) {
        c = -copysign(fabs(b) * 0x1p-60, b);
    }
    cnt += (c < 0.0) != (b < 0.0);
    a = b;
    b = c;
}

static __device__ int sturm_below(const double *dg, const double *e2, int d, double x)
{
    double a = 1.0, b = dg[0] - x;
    if (b == 0.0) {
        b = -0x1p-60;
    }
    int cnt = b < 0.0;
    int i = 1;
    for (; i + 8 <= d; i += 8) { /* eight terms with their loads issued together, then a rescale */
#pragma unroll
        for (int u = 0; u < 8; u++) {
            sturm_term(dg[i + u], e2[i + u - 1], x, a, b, cnt);
        }
        const double m = fmax(fabs(a), fabs(b));
        if (m > 0x1p+256 || m < 0x1p-256) {
            const double sc = scalbn(1.0, -ilogb(m));
            a *= sc;
            b *= sc;
        }
    }
    for (; i < d; i++) {
        sturm_term(dg[i], e2[i - 1], x, a, b, cnt);
    }
    return cnt;
}

/* Block (chunk of SECT_WARPS * 4 eigenvalues, matrix): each warp finds four eigenvalues, eight
 * lanes each; eigenvalue t (the t-th largest) is the r-th smallest, r = d - 1 - t. Only the
 * n_top largest are sought (the chunks past them are not launched); the rest of the matrix's
 * d entries are written 0, by its first chunk for those no chunk covers. */
static __global__ void __launch_bounds__(SECT_WARPS * 32)
    multisect_kernel(double *eig, const double *mats, int d, int n_top)
{
    extern __shared__ double tri[];
    double *dg = tri, *e2 = tri + d;
    __shared__ double sh_lo, sh_hi, sh_abstol;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int seg = lane >> 3, k = lane & 7; /* eight lanes per eigenvalue */
    const double *src = mats + (size_t)blockIdx.y * d * d;
    for (int i = tid; i < 2 * d - 1; i += blockDim.x) {
        const double x = src[i];
        if (i < d) {
            dg[i] = x;
        } else {
            e2[i - d] = x * x;
        }
    }
    __syncthreads();
    if (warp == 0) { /* Gershgorin bounds hold every eigenvalue */
        double lo = INFINITY, hi = -INFINITY;
        for (int i = lane; i < d; i += 32) {
            const double r = (i > 0 ? sqrt(e2[i - 1]) : 0.0) + (i + 1 < d ? sqrt(e2[i]) : 0.0);
            lo = fmin(lo, dg[i] - r);
            hi = fmax(hi, dg[i] + r);
        }
        for (int s = 16; s > 0; s >>= 1) {
            lo = fmin(lo, __shfl_xor_sync(0xffffffffu, lo, s));
            hi = fmax(hi, __shfl_xor_sync(0xffffffffu, hi, s));
        }
        if (lane == 0) {
            const double span = fmax(fabs(lo), fabs(hi));
            sh_lo = lo - (2.0 * DBL_EPSILON * span + DBL_MIN);
            sh_hi = hi + (2.0 * DBL_EPSILON * span + DBL_MIN);
            sh_abstol = DBL_EPSILON * span; /* as LAPACK's dstebz: eps times the norm */
        }
    }
    __syncthreads();
    const int t = (blockIdx.x * SECT_WARPS + warp) * 4 + seg;
    const int r = d - 1 - t;
    const double abstol = sh_abstol;
    double l = sh_lo, h = sh_hi;
    bool done = t >= n_top;
    for (int it = 0; it < 64; it++) {
        done = done || h - l <= 2.0 * DBL_EPSILON * fmax(fabs(l), fabs(h)) + abstol;
        if (__all_sync(0xffffffffu, done)) {
            break;
        }
        /* lane k probes l + (k + 1) (h - l) / 9; the eigenvalue lies between the last probe
         * with at most r eigenvalues below it and the first with more */
        const double x = l + (h - l) * (double)(k + 1) / 9.0;
        const bool in = !done && x > l && x < h;
        const bool above = in && sturm_below(dg, e2, d, x) > r;
        const unsigned hi_m = (__ballot_sync(0xffffffffu, above) >> (seg * 8)) & 0xffu;
        const unsigned in_m = (__ballot_sync(0xffffffffu, in && !above) >> (seg * 8)) & 0xffu;
        /* counts rise with x: the probes below the first one above are all at or under it */
        const int first = hi_m ? __ffs(hi_m) - 1 : 8;
        const unsigned lo_m = in_m & (first < 8 ? (1u << first) - 1u : 0xffu);
        const int last = lo_m ? 31 - __clz(lo_m) : 0;
        const double x_hi = __shfl_sync(0xffffffffu, x, seg * 8 + (first < 8 ? first : 7));
        const double x_lo = __shfl_sync(0xffffffffu, x, seg * 8 + last);
        const double nl = lo_m ? x_lo : l, nh = first < 8 ? x_hi : h;
        done = done || (nl == l && nh == h); /* no representable point left inside */
        l = nl;
        h = nh;
    }
    double *out = eig + (size_t)blockIdx.y * d;
    if (k == 0 && t < d) {
        const double x = 0.5 * (l + h);
        out[t] = t < n_top && x > 0.0 ? x : 0.0;
    }
    if (blockIdx.x == 0) {
        for (int j = gridDim.x * SECT_WARPS * 4 + tid; j < d; j += blockDim.x) {
            out[j] = 0.0;
        }
    }
}

extern "C" cudaError_t uc_cuda_symeig(double *eig, double *mats, int64_t n_mats, int64_t d,
                                      int64_t n_top, int single, cudaStream_t stream)
{
    if (n_mats <= 0 || d <= 0 || d > UC_CUDA_SYMEIG_MAX_D) {
        return cudaErrorInvalidValue;
    }
    if (n_top <= 0 || n_top > d) {
        n_top = d;
    }
    if (single) {
        tridiag_kernel<float><<<(unsigned)n_mats, TRI_THREADS, 0, stream>>>(mats, (int)d);
    } else {
        tridiag_kernel<double><<<(unsigned)n_mats, TRI_THREADS, 0, stream>>>(mats, (int)d);
    }
    dim3 grid((unsigned)((n_top + 4 * SECT_WARPS - 1) / (4 * SECT_WARPS)), (unsigned)n_mats);
    multisect_kernel<<<grid, SECT_WARPS * 32, (size_t)(2 * d) * sizeof(double), stream>>>(
        eig, mats, (int)d, (int)n_top);
    return cudaGetLastError();
}
