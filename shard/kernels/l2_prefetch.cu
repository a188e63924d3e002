/* l2_prefetch: asks L2 for the first bytes of a product's weights while the small kernel before
 * the product (a norm, swiglu) runs. Launched as a programmatic dependent launch right after
 * that kernel, which lets its dependents start at once (uck_launch_dependents): the requests go
 * out while it runs, and the product, an ordinary launch after this one, still starts only after
 * both, since this kernel waits for its predecessor before it ends. */
#include "common.cuh"

static __global__ void l2_prefetch_kernel(const char *base, int64_t rows, int64_t row_lines,
                                          int64_t ld)
{
    const int64_t n = rows * row_lines, nth = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += nth) {
        uck_prefetch_l2(base + (i / row_lines) * ld + (i % row_lines) * 128);
    }
    uck_grid_wait(); /* ends after the kernel before it: what follows is ordered behind both */
}

extern "C" cudaError_t uc_cuda_l2_prefetch(const void *w, int64_t rows, int64_t row_bytes,
                                           int64_t bytes, bool spread, cudaStream_t stream)
{
    const int64_t total = rows * row_bytes, want = bytes < total ? bytes : total;
    if (!w || rows <= 0 || row_bytes <= 0 || want < 128) {
        return cudaSuccess;
    }
    int64_t n_rows = 1, lines = want / 128, ld = 0;
    if (spread) { /* the first bytes of every row, a line at least */
        int64_t per = (want / rows + 127) / 128;
        int64_t max = row_bytes / 128;
        n_rows = rows;
        lines = per < 1 ? 1 : per > max ? max : per;
        ld = row_bytes;
    }
    uck_launch(l2_prefetch_kernel, dim3(64), dim3(256), 0, stream,
               static_cast<const char *>(w), n_rows, lines, ld);
    return cudaGetLastError();
}
