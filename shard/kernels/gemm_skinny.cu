/* gemm_skinny: y (T, N) = x (T, K) w^T in bf16 for 9 to 64 rows (a decode batch), the weights
 * streamed once on the tensor cores.
 *
 * cuBLAS runs these shapes at 2.2-2.8 TB/s of weights on an H200 for the layer's small products
 * (qkv, o) where a read-only stream reaches 4.5, and its kernels cannot start while the kernel
 * before them drains. Here a CTA owns a tile of SK_BN weight rows (output features) and a slice
 * of K; the slices are sized so every CTA of the grid is resident at once (SK_RESIDENT per
 * multiprocessor). Weight tiles of SK_BK columns stream through shared memory SK_STAGES deep
 * (cp.async; the first ones are asked for before the kernel waits for x, which the kernel
 * before it writes: a programmatic dependent launch), x's matching columns beside them (rows
 * past T zero-filled). Each warp takes 16 weight rows: w as the A operand of an m16n8k16 mma
 * (rows = features), x as B (columns = tokens), float32 sums.
 *
 * The K slices of a tile form one thread-block cluster (at most 8): each CTA leaves its float32
 * sums in its shared memory, and after a cluster barrier each adds a share of the tile's
 * outputs over the cluster's CTAs in slice order (distributed shared memory) and writes bf16,
 * so the result does not depend on which CTA ran first and nothing goes through global memory.
 * The swiglu form takes w (2F, K) = [gate rows; up rows]: a tile holds SK_BN / 2 gate rows and
 * the same features' up rows and writes silu(g) * u, g and u rounded to bf16 first as the
 * unfused product then swiglu would. */
#include <cooperative_groups.h>

#include "common.cuh"
#include "mma.cuh"

namespace cg = cooperative_groups;

#define SK_WARPS 8
#define SK_THREADS (SK_WARPS * 32)
#define SK_BN (16 * SK_WARPS) /* weight rows per tile */
#define SK_BK 64              /* K columns per stage: 128 bytes of a row */
#define SK_STAGES 4
#define SK_RESIDENT 2         /* CTAs per multiprocessor the grid is sized for */
#define SK_MAX_SPLITS 8       /* a cluster's CTAs (the portable limit) */
#define SK_MIN_STEPS 4        /* stages of K a slice holds at least */
#define SK_MAX_T 64
#define SK_RED_LD (SK_BN + 4) /* floats per token row of the sums (a bank shift per 2 rows) */

struct sk_args {
    uc_bf16_t *y;
    const uc_bf16_t *x;
    const uc_bf16_t *w;
    int t;     /* rows of x */
    int n_w;   /* rows of w */
    int n_in;  /* K */
    int ffn;   /* swiglu: F (w has 2F rows); 0: plain product */
    int steps; /* SK_BK stages per K slice */
};

/* Row of w that row r of tile `tile` holds, or -1 past the end. */
static __device__ __forceinline__ int sk_wrow(const sk_args &a, int tile, int r)
{
    if (a.ffn == 0) {
        int n = tile * SK_BN + r;
        return n < a.n_w ? n : -1;
    }
    int f = tile * (SK_BN / 2) + (r % (SK_BN / 2));
    return f < a.ffn ? f + (r < SK_BN / 2 ? 0 : a.ffn) : -1;
}

template <int TP> struct sk_pipe {
    uc_bf16_t w[SK_STAGES][SK_BN * SK_BK];
    uc_bf16_t x[SK_STAGES][TP * SK_BK];
};

template <int TP> struct sk_smem_size {
    static constexpr size_t pipe = sizeof(sk_pipe<TP>);
    static constexpr size_t red = (size_t)TP * SK_RED_LD * sizeof(float);
    static constexpr size_t value = pipe > red ? pipe : red;
};

/* TP: rows of x padded to a multiple of 16 (16, 32, 48 or 64). */
template <int TP>
static __global__ void __launch_bounds__(SK_THREADS) gemm_skinny_kernel(const sk_args a)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char sk_raw[];
    sk_pipe<TP> &sm = *reinterpret_cast<sk_pipe<TP> *>(sk_raw);
    float *red = reinterpret_cast<float *>(sk_raw); /* (TP, SK_RED_LD) once the loop is done */
    cg::cluster_group cluster = cg::this_cluster();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int k_first = split * a.steps;
    const int n_steps = min(a.steps, a.n_in / SK_BK - k_first);

    /* this thread's weight chunks of a stage: SK_BN rows x 8 chunks of 16 bytes */
    constexpr int WCH = SK_BN * 8 / SK_THREADS;
    const uc_bf16_t *wsrc[WCH];
    uint32_t wdst[WCH];
#pragma unroll
    for (int i = 0; i < WCH; i++) {
        int c = tid + i * SK_THREADS, r = c >> 3, ch = c & 7;
        int wr = sk_wrow(a, tile, r);
        wsrc[i] = wr < 0 ? nullptr : a.w + (size_t)wr * a.n_in + ch * 8;
        wdst[i] = (uint32_t)(swz<SK_BK>(r, ch) * sizeof(uc_bf16_t));
    }
    auto load_w = [&](int s, int kstep) {
        const uint32_t base = smem_u32(sm.w[s]);
#pragma unroll
        for (int i = 0; i < WCH; i++) {
            const uc_bf16_t *src = wsrc[i] ? wsrc[i] + (size_t)kstep * SK_BK : a.w;
            cp_async16(base + wdst[i], src, wsrc[i] ? 16 : 0);
        }
    };
    auto load_x = [&](int s, int kstep) {
        const uint32_t base = smem_u32(sm.x[s]);
#pragma unroll
        for (int i = 0; i < (TP * 8 + SK_THREADS - 1) / SK_THREADS; i++) {
            int c = tid + i * SK_THREADS, r = c >> 3, ch = c & 7;
            if (c < TP * 8) {
                bool in = r < a.t;
                const uc_bf16_t *src = in ? a.x + (size_t)r * a.n_in + kstep * SK_BK + ch * 8 : a.x;
                cp_async16(base + (uint32_t)(swz<SK_BK>(r, ch) * sizeof(uc_bf16_t)), src,
                           in ? 16 : 0);
            }
        }
    };

    /* the weights do not depend on the kernel before: ask for the first stages, then wait */
#pragma unroll
    for (int s = 0; s < SK_STAGES - 1; s++) {
        if (s < n_steps) {
            load_w(s, k_first + s);
        }
    }
    uck_grid_wait();
#pragma unroll
    for (int s = 0; s < SK_STAGES - 1; s++) {
        if (s < n_steps) {
            load_x(s, k_first + s);
        }
        cp_async_commit();
    }

    float acc[TP / 8][4];
#pragma unroll
    for (int j = 0; j < TP / 8; j++) {
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    }
    const int a_row = warp * 16 + (lane & 15), a_ch = lane >> 4;
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_ch = (lane >> 3) & 1;
    for (int it = 0; it < n_steps; it++) {
        cp_async_wait<SK_STAGES - 2>();
        __syncthreads(); /* stage `it` landed for every thread; stage it - 1 is free again */
        int nx = it + SK_STAGES - 1;
        if (nx < n_steps) {
            load_w(nx % SK_STAGES, k_first + nx);
            load_x(nx % SK_STAGES, k_first + nx);
        }
        cp_async_commit();
        const uint32_t wb = smem_u32(sm.w[it % SK_STAGES]);
        const uint32_t xb = smem_u32(sm.x[it % SK_STAGES]);
#pragma unroll
        for (int kk = 0; kk < SK_BK / 16; kk++) {
            uint32_t af[4];
            ldsm_x4(af, wb + (uint32_t)(swz<SK_BK>(a_row, kk * 2 + a_ch) * sizeof(uc_bf16_t)));
#pragma unroll
            for (int j = 0; j < TP / 16; j++) {
                uint32_t bf[4];
                ldsm_x4(bf, xb + (uint32_t)(swz<SK_BK>(j * 16 + b_row, kk * 2 + b_ch) *
                                            sizeof(uc_bf16_t)));
                mma_bf16(acc[2 * j], af, bf[0], bf[1]);
                mma_bf16(acc[2 * j + 1], af, bf[2], bf[3]);
            }
        }
    }
    cp_async_wait_all();
    __syncthreads(); /* the pipeline's buffers become the sums */

    /* acc[j] holds rows warp*16 + lane/4 (+8) and tokens 8j + 2(lane%4) (+1) */
    const int r0 = warp * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < TP / 8; j++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int tok = 8 * j + 2 * (lane & 3) + h;
            red[tok * SK_RED_LD + r0] = acc[j][h];
            red[tok * SK_RED_LD + r0 + 8] = acc[j][2 + h];
        }
    }
    cluster.sync(); /* every slice's sums are in its CTA's shared memory */

    /* this CTA's share of the tile's outputs, added over the slices in order */
    if (a.ffn == 0) {
        for (int i = split * SK_THREADS + tid; i < a.t * SK_BN; i += splits * SK_THREADS) {
            int tok = i / SK_BN, r = i % SK_BN, n = tile * SK_BN + r;
            if (n < a.n_w) {
                float v[SK_MAX_SPLITS]; /* every slice's load in flight, then added in order */
#pragma unroll
                for (int sp = 0; sp < SK_MAX_SPLITS; sp++) {
                    v[sp] = sp < splits ? cluster.map_shared_rank(red, sp)[tok * SK_RED_LD + r]
                                        : 0.0f;
                }
                float s = 0.0f;
#pragma unroll
                for (int sp = 0; sp < SK_MAX_SPLITS; sp++) {
                    s += sp < splits ? v[sp] : 0.0f;
                }
                a.y[(size_t)tok * a.n_w + n] = __float2bfloat16_rn(s);
            }
        }
    } else {
        constexpr int F = SK_BN / 2;
        for (int i = split * SK_THREADS + tid; i < a.t * F; i += splits * SK_THREADS) {
            int tok = i / F, r = i % F, f = tile * F + r;
            if (f < a.ffn) {
                float vg[SK_MAX_SPLITS], vu[SK_MAX_SPLITS];
#pragma unroll
                for (int sp = 0; sp < SK_MAX_SPLITS; sp++) {
                    const float *rr = sp < splits
                                          ? cluster.map_shared_rank(red, sp) + tok * SK_RED_LD
                                          : nullptr;
                    vg[sp] = rr ? rr[r] : 0.0f;
                    vu[sp] = rr ? rr[r + F] : 0.0f;
                }
                float g = 0.0f, u = 0.0f;
#pragma unroll
                for (int sp = 0; sp < SK_MAX_SPLITS; sp++) {
                    g += sp < splits ? vg[sp] : 0.0f;
                    u += sp < splits ? vu[sp] : 0.0f;
                }
                g = __bfloat162float(__float2bfloat16_rn(g));
                u = __bfloat162float(__float2bfloat16_rn(u));
                a.y[(size_t)tok * a.ffn + f] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
            }
        }
    }
    cluster.sync(); /* no CTA leaves while another reads its shared memory */
#endif
}

extern "C" bool uc_cuda_skinny_supported(int64_t n_tok, int64_t n_w, int64_t n_in,
                                         enum uc_cuda_dtype dt)
{
    return dt == UC_CUDA_BF16 && n_tok > 8 && n_tok <= SK_MAX_T && n_in % SK_BK == 0 &&
           n_in <= INT32_MAX && n_w <= INT32_MAX / SK_MAX_T;
}

extern "C" void uc_cuda_skinny_plan(struct uc_cuda_skinny_plan *p, int64_t n_tok, int64_t n_w,
                                    int64_t n_in, bool swiglu, int n_sms)
{
    (void)n_tok;
    int64_t rows = swiglu ? SK_BN / 2 : SK_BN;
    int64_t feats = swiglu ? n_w / 2 : n_w;
    int64_t tiles = (feats + rows - 1) / rows, k_steps = n_in / SK_BK;
    int64_t splits = (int64_t)SK_RESIDENT * n_sms / tiles;
    int64_t most = k_steps / SK_MIN_STEPS < SK_MAX_SPLITS ? k_steps / SK_MIN_STEPS : SK_MAX_SPLITS;
    splits = splits > most ? most : splits;
    splits = splits < 1 ? 1 : splits;
    p->tiles = tiles;
    p->steps = (k_steps + splits - 1) / splits;
    p->splits = (k_steps + p->steps - 1) / p->steps;
}

template <int TP>
static cudaError_t sk_launch(const sk_args &a, unsigned tiles, unsigned splits,
                             cudaStream_t stream)
{
    const size_t smem = sk_smem_size<TP>::value;
    static int opted = -1; /* the device this instantiation may use more than 48 KiB on */
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess && opted != dev) {
        e = cudaFuncSetAttribute(gemm_skinny_kernel<TP>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        opted = e == cudaSuccess ? dev : -1;
    }
    if (e != cudaSuccess) {
        return e;
    }
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = splits;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(tiles, splits);
    cfg.blockDim = dim3(SK_THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = uck_pdl_enabled() ? 2 : 1;
    return cudaLaunchKernelEx(&cfg, gemm_skinny_kernel<TP>, a);
}

extern "C" cudaError_t uc_cuda_skinny(void *y, const void *x, const void *w, int64_t n_tok,
                                      int64_t n_w, int64_t n_in, bool swiglu,
                                      const struct uc_cuda_skinny_plan *p, cudaStream_t stream)
{
    sk_args a;
    a.y = static_cast<uc_bf16_t *>(y);
    a.x = static_cast<const uc_bf16_t *>(x);
    a.w = static_cast<const uc_bf16_t *>(w);
    a.t = (int)n_tok;
    a.n_w = (int)n_w;
    a.n_in = (int)n_in;
    a.ffn = swiglu ? (int)(n_w / 2) : 0;
    a.steps = (int)p->steps;
    unsigned tiles = (unsigned)p->tiles, splits = (unsigned)p->splits;
    switch ((n_tok + 15) / 16 * 16) {
    case 16: return sk_launch<16>(a, tiles, splits, stream);
    case 32: return sk_launch<32>(a, tiles, splits, stream);
    case 48: return sk_launch<48>(a, tiles, splits, stream);
    case 64: return sk_launch<64>(a, tiles, splits, stream);
    default: return cudaErrorInvalidValue;
    }
}
