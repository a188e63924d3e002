/* swiglu: y (T, F) = silu(g) * u with gu (T, 2F) = [gate | up], float32 arithmetic as the CPU
 * reference writes it (g / (1 + exp(-g)) * u). */
#include "common.cuh"

/* Rows on grid y (strided past 65535), 8 columns per thread on x: with VEC (bf16, F a multiple
 * of 8, 16-byte aligned rows) as one 16-byte load of gate, one of up and one store. */
template <typename T, bool VEC>
static __global__ void swiglu_kernel(T *y, const T *gu, int64_t n_tok, int n_ffn)
{
    const int j0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (j0 >= n_ffn) {
        return;
    }
    for (int64_t t = blockIdx.y; t < n_tok; t += gridDim.y) {
        const T *g = gu + t * 2 * n_ffn + j0, *u = g + n_ffn;
        T *out = y + t * n_ffn + j0;
        if constexpr (VEC) {
            uint4 gv = *reinterpret_cast<const uint4 *>(g);
            uint4 uv = *reinterpret_cast<const uint4 *>(u);
            const __nv_bfloat16 *gb = reinterpret_cast<const __nv_bfloat16 *>(&gv);
            const __nv_bfloat16 *ub = reinterpret_cast<const __nv_bfloat16 *>(&uv);
            uint4 ov;
            __nv_bfloat16 *ob = reinterpret_cast<__nv_bfloat16 *>(&ov);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float a = __bfloat162float(gb[k]), b = __bfloat162float(ub[k]);
                ob[k] = __float2bfloat16(a / (1.0f + expf(-a)) * b);
            }
            *reinterpret_cast<uint4 *>(out) = ov;
        } else {
            const int m = n_ffn - j0 < 8 ? n_ffn - j0 : 8;
            for (int k = 0; k < m; k++) {
                float a = uck_to_f(g[k]), b = uck_to_f(u[k]);
                out[k] = uck_from_f<T>(a / (1.0f + expf(-a)) * b);
            }
        }
    }
}

template <typename T>
static void launch(void *y, const void *gu, int64_t n_tok, int64_t n_ffn, cudaStream_t stream)
{
    dim3 grid((unsigned)((n_ffn + 8 * 256 - 1) / (8 * 256)),
              (unsigned)(n_tok < 65535 ? n_tok : 65535));
    bool vec = sizeof(T) == 2 && n_ffn % 8 == 0 && ((uintptr_t)y | (uintptr_t)gu) % 16 == 0;
    if (vec) {
        swiglu_kernel<T, true><<<grid, 256, 0, stream>>>((T *)y, (const T *)gu, n_tok, (int)n_ffn);
    } else {
        swiglu_kernel<T, false><<<grid, 256, 0, stream>>>((T *)y, (const T *)gu, n_tok,
                                                          (int)n_ffn);
    }
}

extern "C" cudaError_t uc_cuda_swiglu(void *y, const void *gu, int64_t n_tok, int64_t n_ffn,
                                      enum uc_cuda_dtype dt, cudaStream_t stream)
{
    if (n_tok > 0 && n_ffn > 0 && n_ffn <= INT32_MAX / 2) {
        UCK_DISPATCH(dt, launch, y, gu, n_tok, n_ffn, stream);
    }
    return cudaGetLastError();
}
