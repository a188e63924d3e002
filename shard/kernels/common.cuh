/* Device helpers shared by the kernels of this folder: element conversion between the
 * activation types (bf16, float32) and float, warp reductions, and the dtype dispatch the C
 * launchers use. Included only by .cu files. */
#ifndef UC_SHARD_KERNELS_COMMON_CUH
#define UC_SHARD_KERNELS_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels.h"

typedef __nv_bfloat16 uc_bf16_t;

static __device__ __forceinline__ float uck_to_f(float x) { return x; }
static __device__ __forceinline__ float uck_to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> static __device__ __forceinline__ T uck_from_f(float x);
template <> __device__ __forceinline__ float uck_from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 uck_from_f<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

static __device__ __forceinline__ float uck_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

static __device__ __forceinline__ double uck_warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

static __device__ __forceinline__ float uck_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

/* Block-wide sum for blocks of up to 1024 threads (a multiple of 32); every thread gets it.
 * `red` holds 32 floats of shared memory. */
static __device__ __forceinline__ float uck_block_sum(float v, float *red)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = uck_warp_sum(v);
    __syncthreads(); /* red may still be read from a previous call */
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return uck_warp_sum(v);
}

static __device__ __forceinline__ float uck_block_max(float v, float *red)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = uck_warp_max(v);
    __syncthreads();
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    v = lane < nw ? red[lane] : -INFINITY;
    return uck_warp_max(v);
}

/* Programmatic dependent launch (sm_90): a kernel launched with the programmatic-serialization
 * attribute may start while the previous kernel of its stream drains; it must call this before
 * touching anything that kernel writes. A no-op for a kernel launched the ordinary way. */
static __device__ __forceinline__ void uck_grid_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* Lets the next kernel of the stream, when launched as a programmatic dependent launch, start
 * now: its blocks become resident and wait (uck_grid_wait) for this kernel to finish. Called
 * first by the one-wave decode kernels so the next product loads weights meanwhile. */
static __device__ __forceinline__ void uck_launch_dependents(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Whether uck_launch uses programmatic dependent launches (uc_cuda_set_pdl; launch.cu). */
bool uck_pdl_enabled(void);

/* kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when
 * enabled. Only for kernels that call uck_grid_wait before reading what earlier kernels
 * wrote (and before writing what they read). */
template <typename... P, typename... A>
static void uck_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, A... args)
{
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = uck_pdl_enabled() ? 1 : 0;
    (void)cudaLaunchKernelEx(&cfg, kernel, static_cast<P>(args)...);
}

/* Asks for the 128-byte line at p to be brought into L2 (no register, no wait). */
static __device__ __forceinline__ void uck_prefetch_l2(const void *p)
{
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

/* Whether p may be read or written as 16-byte vectors (uint4). */
static inline bool uck_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Grid size for a grid-stride loop over n items with `threads` per block. */
static inline unsigned uck_blocks(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    if (b < 1) {
        b = 1;
    }
    return (unsigned)(b > 65535 * 16 ? 65535 * 16 : b);
}

/* Calls F<uc_bf16_t> or F<float> according to the runtime dtype. */
#define UCK_DISPATCH(dt, F, ...)                                                                   \
    ((dt) == UC_CUDA_F32 ? F<float>(__VA_ARGS__) : F<uc_bf16_t>(__VA_ARGS__))

#endif
