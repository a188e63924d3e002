/* argmax: index of the first maximum of each row (greedy sampling on the device). One block per
 * row; ties go to the lower index, as in the CPU reference, and a row holding a NaN or Inf gives
 * -1 (the scheduler ends the request with the non-finite error, as on the CPU). */
#include "common.cuh"

template <typename T>
static __global__ void argmax_kernel(int32_t *out, const T *x, int64_t n)
{
    __shared__ float sv[32];
    __shared__ int64_t si[32];
    const T *row = x + (int64_t)blockIdx.x * n;
    float best = -INFINITY;
    int64_t bi = -1;
    int bad = 0; /* this thread saw a NaN or Inf */
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        float v = uck_to_f(row[j]);
        bad |= !isfinite(v);
        if (bi < 0 || v > best) {
            best = v;
            bi = j;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > best || (ov == best && oi < bi))) {
            best = ov;
            bi = oi;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    bad = __syncthreads_or(bad); /* also the barrier before sv/si are read */
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : -1;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ov > best || (ov == best && oi < bi))) {
                best = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            out[blockIdx.x] = bad ? -1 : (int32_t)(bi < 0 ? 0 : bi);
        }
    }
}

template <typename T>
static void launch(int32_t *out, const void *x, int64_t n_tok, int64_t n, cudaStream_t stream)
{
    argmax_kernel<T><<<(unsigned)n_tok, 512, 0, stream>>>(out, (const T *)x, n);
}

extern "C" cudaError_t uc_cuda_argmax(int32_t *out, const void *x, int64_t n_tok, int64_t n,
                                      enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_tok > 0 && n > 0) {
        UCK_DISPATCH(dt, launch, out, x, n_tok, n, stream);
    }
    return cudaGetLastError();
}
