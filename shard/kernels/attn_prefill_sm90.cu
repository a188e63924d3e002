/* attn_prefill_sm90: causal GQA prefill attention for Hopper (sm_90a), head size 128, bf16, in
 * the FlashAttention-3 manner: TMA loads, wgmma from shared memory, a producer warp group and
 * consumer warp groups that hand tiles over through mbarriers.
 *
 * The kernel is persistent: one block per SM takes items (64 query rows of two query heads of
 * one KV group, group size even) heaviest first, one consumer warp group per head, so every
 * K/V tile it loads serves both (GQA sharing). The producer warp group's first thread streams
 * each item's Q and then its K and V tiles of 128 keys through a three-stage ring with TMA
 * (128-byte swizzle, rows past the end zero-filled); the ring runs on from one item to the
 * next, and the next Q loads once the consumers have issued their last Q K^T. Tiles wholly
 * above the diagonal are never loaded.
 *
 * Each consumer computes S = Q K^T with wgmma (both operands K-major in shared memory), masks
 * the causal diagonal, runs the online softmax on its accumulators (exp2, float32 row sums, P
 * rounded to bf16 as in the FA2-style kernel) and accumulates O += P V with P from registers
 * and V read transposed from shared memory. Tile j's Q K^T runs beside tile j-1's P V and tile
 * j's softmax beside that P V (FlashAttention-3's intra-warpgroup overlap); setmaxnreg moves the
 * producer's registers to the consumers (24 / 240) so S, O and P of two tiles fit. The
 * arithmetic is the same as tile by tile, so are the bits. Anything else (other head sizes, odd
 * groups, float32, other devices) takes attn_prefill.cu's kernels, which stay the checked
 * reference (UC_CUDA_PREFILL_SM90=0 forces them). */
#include <cuda.h>

#include "common.cuh"
#include "kernels.h"
#include "mma.cuh"

#define F3_D 128     /* head size */
#define F3_M 64      /* query rows per consumer warp group (and per item) */
#define F3_N 128     /* keys per tile */
#define F3_STAGES 3  /* K/V ring depth: 2% faster than 2 at 8K and 32K (NOTES.md, call L6) */
#define F3_CONSUMERS 2 /* query heads of an item, one consumer warp group each */
#define F3_THREADS (128 * (1 + F3_CONSUMERS))
#define F3_HALF_Q (F3_M * 64)  /* elements of a 64-column half of a Q tile */
#define F3_HALF_KV (F3_N * 64) /* elements of a 64-column half of a K or V tile */

/* Q of an item (one 64-row tile per consumer), the K and V ring; barriers: Q loaded / free,
 * each ring slot full / free */
struct f3_smem {
    uc_bf16_t q[F3_CONSUMERS][2][F3_HALF_Q];
    uc_bf16_t k[F3_STAGES][2][F3_HALF_KV];
    uc_bf16_t v[F3_STAGES][2][F3_HALF_KV];
    uint64_t full_q, empty_q;
    uint64_t full_k[F3_STAGES], full_v[F3_STAGES], empty_k[F3_STAGES], empty_v[F3_STAGES];
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define F3_DEVICE 1
#endif

#ifdef F3_DEVICE
static __device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

static __device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}

static __device__ __forceinline__ void mbar_arrive(uint32_t bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

static __device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity)
{
    asm volatile("{\n\t.reg .pred p;\n"
                 "F3_WAIT:\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t"
                 "@p bra.uni F3_DONE;\n\t"
                 "bra.uni F3_WAIT;\n"
                 "F3_DONE:\n}" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}

/* One box of the tensor map (columns c0.., rows c1..) into shared memory at dst. */
static __device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap *map,
                                                uint32_t bar, int c0, int c1)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
                 : "memory");
}

/* One K or V tile of F3_N keys (two 64-column halves from column col0) into a ring slot, once
 * the consumers have freed it (from the ring's second round on) */
static __device__ __forceinline__ void f3_load_tile(uc_bf16_t (*dst)[F3_HALF_KV], uint32_t full,
                                                    uint32_t empty, bool wait_empty, uint32_t ph,
                                                    const CUtensorMap *map, int col0, int row0)
{
    if (wait_empty) {
        mbar_wait(empty, ph ^ 1u);
    }
    mbar_expect_tx(full, (uint32_t)(2 * F3_HALF_KV * sizeof(uc_bf16_t)));
    for (int half = 0; half < 2; half++) {
        tma_load(smem_u32(dst[half]), map, full, col0 + 64 * half, row0);
    }
}

/* 2^x with denormal results flushed to zero: the bare MUFU.EX2. exp2f keeps denormal results,
 * which takes extra instructions around it for every one of a tile's 8,192 elements (and P
 * below 2^-126 adds nothing beside a row sum of at least 1). Under the power cap a long prefill
 * runs at, fewer instructions are what make it faster (tests/cuda/NOTES.md, call C1). */
static __device__ __forceinline__ float f3_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* Shared memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
 * offsets (each in 16-byte units). */
static __device__ __forceinline__ uint64_t f3_desc(uint32_t addr, uint32_t lbo, uint32_t sbo)
{
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
           ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}

static __device__ __forceinline__ void wg_fence()
{
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

static __device__ __forceinline__ void wg_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

template <int N> static __device__ __forceinline__ void wg_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

/* wgmma runs asynchronously with the registers it names: these tell the compiler that the
 * accumulators change here (after a wait: reads must not move above it) and that operand
 * registers are still read here (before a wait: they must not be reused earlier). */
static __device__ __forceinline__ void wg_fence_acc(float d[64])
{
#pragma unroll
    for (int i = 0; i < 64; i++) {
        asm volatile("" : "+f"(d[i])::"memory");
    }
}

template <int N> static __device__ __forceinline__ void wg_keep(const uint32_t (*a)[4])
{
#pragma unroll
    for (int i = 0; i < N; i++) {
        asm volatile("" ::"r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]) : "memory");
    }
}

/* d (64 x 128 per warp group, float32) (+)= A (64 x 16, K-major, shared) B (16 x 128; K-major
 * in shared memory); scale_d = 0 overwrites d. The descriptors da and db advance by OA and OB
 * (16-byte units) inside the asm, so a tile's sixteen descriptors never sit in registers. */
template <int OA, int OB>
static __device__ __forceinline__ void wg_ss_at(float d[64], uint64_t da, uint64_t db, int scale_d)
{
    asm volatile("{\n.reg .pred p;\n.reg .b64 a, b;\nsetp.ne.b32 p, %66, 0;\n"
                 "add.s64 a, %64, %67;\nadd.s64 b, %65, %68;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, a, b, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(OA), "n"(OB));
}

/* d (64 x 128) += A (64 x 16 bf16 in registers) B (16 x 128, MN-major in shared memory, read
 * transposed), B's descriptor advanced by OB inside the asm. */
template <int OB>
static __device__ __forceinline__ void wg_rs_at(float d[64], const uint32_t a[4], uint64_t db)
{
    asm volatile("{\n.reg .pred p;\n.reg .b64 b;\nsetp.ne.b32 p, %69, 0;\n"
                 "add.s64 b, %68, %70;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, {%64, %65, %66, %67}, b, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(1), "n"(OB));
}

template <int N> static __device__ __forceinline__ void reg_set_dec()
{
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N> static __device__ __forceinline__ void reg_set_inc()
{
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

/* S (64 x 128 keys) = Q K^T for one consumer warp group, issued (not waited for); Q and K at
 * the shared addresses given */
template <int KK = 0>
static __device__ __forceinline__ void f3_issue_qk(float s[64], uint64_t dq, uint64_t dk)
{
    if constexpr (KK < F3_D / 16) {
        /* 16 columns = 32 bytes into a 64-column half; the halves a tile half apart */
        wg_ss_at<((KK / 4) * F3_HALF_Q * 2 + (KK % 4) * 32) / 16,
                 ((KK / 4) * F3_HALF_KV * 2 + (KK % 4) * 32) / 16>(s, dq, dk, KK > 0);
        f3_issue_qk<KK + 1>(s, dq, dk);
    }
}

/* O += P V for one consumer warp group, issued: 16 keys of 128 bytes per 64-column half, the
 * halves F3_HALF_KV apart */
template <int KK = 0>
static __device__ __forceinline__ void f3_issue_pv(float o[64], const uint32_t (*p)[4],
                                                   uint64_t dv)
{
    if constexpr (KK < F3_N / 16) {
        wg_rs_at<KK * 16 * 128 / 16>(o, p[KK], dv);
        f3_issue_pv<KK + 1>(o, p, dv);
    }
}

/* The causal mask of a tile that crosses the diagonal, then the online softmax of S (left as
 * exponentials in s); corr gets each row's factor for O (1 where the maximum stayed). */
static __device__ __forceinline__ void f3_softmax(float s[64], float m_r[2], float l_r[2],
                                                  float corr[2], int64_t key0, int64_t pos0,
                                                  int64_t block_min_pos, int t4, float scale_log2)
{
    if (key0 + F3_N - 1 > block_min_pos) {
        /* element i is key key0 + (i/4) 8 + 2 t4 + (i&1) of row pos0 + ((i>>1)&1) 8: masked
         * where (i/4) 8 + (i&1) - ((i>>1)&1) 8 > pos0 - key0 - 2 t4 (clamped: the left side
         * lies in [-8, 121]) */
        const int64_t d = pos0 - key0 - 2 * t4;
        const int lim = d < -16 ? -16 : (d > F3_N ? F3_N : (int)d);
#pragma unroll
        for (int i = 0; i < 64; i++) {
            if ((i / 4) * 8 + (i & 1) - ((i >> 1) & 1) * 8 > lim) {
                s[i] = -INFINITY;
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 16; n++) {
            mx = fmaxf(mx, fmaxf(s[4 * n + 2 * rr], s[4 * n + 2 * rr + 1]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float m_new = fmaxf(m_r[rr], mx); /* finite: key 0 is in tile 0 of every row */
        corr[rr] = f3_exp2((m_r[rr] - m_new) * scale_log2);
        m_r[rr] = m_new;
        float ms = m_new * scale_log2;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < 16; n++) {
            float p0 = f3_exp2(fmaf(s[4 * n + 2 * rr], scale_log2, -ms));
            float p1 = f3_exp2(fmaf(s[4 * n + 2 * rr + 1], scale_log2, -ms));
            s[4 * n + 2 * rr] = p0;
            s[4 * n + 2 * rr + 1] = p1;
            sum += p0 + p1;
        }
        l_r[rr] = l_r[rr] * corr[rr] + sum;
    }
}

/* P as bf16 pairs, the A operand of P V (kept in place: nothing may move it under the wgmma) */
static __device__ __forceinline__ void f3_pack(const float s[64], uint32_t p[F3_N / 16][4])
{
#pragma unroll
    for (int kk = 0; kk < F3_N / 16; kk++) {
        p[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
        p[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        p[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        p[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
    wg_keep<F3_N / 16>(p);
}

/* A warp's part in freeing a ring slot once its wgmma completed: lane 0 arrives for the warp */
static __device__ __forceinline__ void f3_release(uint64_t *bar, int lane)
{
    __syncwarp();
    if (lane == 0) {
        mbar_arrive(smem_u32(bar));
    }
}

/* The K slot of a finished Q K^T, and with the item's last one its Q */
static __device__ __forceinline__ void f3_release_k(f3_smem &sm, int st, bool last, int lane)
{
    __syncwarp();
    if (lane == 0) {
        mbar_arrive(smem_u32(&sm.empty_k[st]));
        if (last) { /* the item's last Q K^T: its Q may go */
            mbar_arrive(smem_u32(&sm.empty_q));
        }
    }
}

/* O moves to the new maxima only where one moved (the warp decides as one) */
static __device__ __forceinline__ void f3_rescale(float (&o)[64], const float (&corr)[2])
{
    if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
        for (int n = 0; n < 16; n++) {
            o[4 * n] *= corr[0];
            o[4 * n + 1] *= corr[0];
            o[4 * n + 2] *= corr[1];
            o[4 * n + 3] *= corr[1];
        }
    }
}

/* Tile j of an item whose first tile is the ring's it-th, in the FlashAttention-3 order: tile
 * j's Q K^T is issued, O moves to tile j-1's maxima, tile j-1's P V is issued, and tile j's
 * softmax runs while that P V finishes; P is packed once the P V has read it. */
static __device__ __forceinline__ void
f3_step(f3_smem &sm, int it, int j, int n_tiles, int lane, uint64_t dq, float (&s)[64],
        float (&o)[64], uint32_t (&p)[F3_N / 16][4], float (&m_r)[2], float (&l_r)[2],
        float (&corr)[2], int64_t pos0, int64_t block_min_pos, int t4, float scale_log2)
{
    const int sk = (it + j) % F3_STAGES, sv = (it + j - 1) % F3_STAGES;
    mbar_wait(smem_u32(&sm.full_k[sk]), (uint32_t)((it + j) / F3_STAGES) & 1u);
    wg_fence();
    f3_issue_qk(s, dq, f3_desc(smem_u32(sm.k[sk][0]), 16, 1024));
    wg_commit();
    f3_rescale(o, corr);
    mbar_wait(smem_u32(&sm.full_v[sv]), (uint32_t)((it + j - 1) / F3_STAGES) & 1u);
    wg_fence_acc(o);
    wg_fence();
    f3_issue_pv(o, p, f3_desc(smem_u32(sm.v[sv][0]), F3_HALF_KV * 2, 1024));
    wg_commit();
    wg_wait<1>();
    wg_fence_acc(s);
    f3_release_k(sm, sk, j == n_tiles - 1, lane);
    f3_softmax(s, m_r, l_r, corr, (int64_t)j * F3_N, pos0, block_min_pos, t4, scale_log2);
    wg_wait<0>();
    wg_keep<F3_N / 16>(p);
    wg_fence_acc(o);
    f3_release(&sm.empty_v[sv], lane);
    f3_pack(s, p);
}

/* The P V of the ring's tile t, the item's last */
static __device__ __forceinline__ void f3_last(f3_smem &sm, int t, int lane, float (&o)[64],
                                               uint32_t (&p)[F3_N / 16][4],
                                               const float (&corr)[2])
{
    const int sv = t % F3_STAGES;
    f3_rescale(o, corr);
    mbar_wait(smem_u32(&sm.full_v[sv]), (uint32_t)(t / F3_STAGES) & 1u);
    wg_fence_acc(o);
    wg_fence();
    f3_issue_pv(o, p, f3_desc(smem_u32(sm.v[sv][0]), F3_HALF_KV * 2, 1024));
    wg_commit();
    wg_wait<0>();
    wg_keep<F3_N / 16>(p);
    wg_fence_acc(o);
    f3_release(&sm.empty_v[sv], lane);
}
#endif

/* The item (pair of heads, block of 64 query rows) a persistent block takes in round r: items
 * in order of falling cost (late rows first), dealt to the blocks forwards in even rounds and
 * backwards in odd ones, so every block's sum of costs is about the same. */
static __device__ __forceinline__ bool f3_item(int r, int n_items, int n_pairs, int n_mb,
                                               int *pair, int *mb)
{
    const int b = (r & 1) ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
    const int w = r * (int)gridDim.x + b;
    if (w >= n_items) {
        return false;
    }
    *mb = n_mb - 1 - w / n_pairs;
    *pair = w % n_pairs;
    return true;
}

static __global__ void __launch_bounds__(F3_THREADS, 1)
    f3_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
              const __grid_constant__ CUtensorMap map_v, uc_bf16_t *out, int64_t ld_o,
              int64_t n_tok, int64_t q0, int group, int n_pairs, float scale_log2)
{
#ifdef F3_DEVICE
    extern __shared__ uint8_t f3_raw[];
    f3_smem &sm = *reinterpret_cast<f3_smem *>(
        (reinterpret_cast<uintptr_t>(f3_raw) + 1023) & ~(uintptr_t)1023);
    const int n_mb = (int)((n_tok + F3_M - 1) / F3_M);
    const int n_items = n_pairs * n_mb;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid & 31;

    if (tid == 0) {
        mbar_init(smem_u32(&sm.full_q), 1);
        mbar_init(smem_u32(&sm.empty_q), 4 * F3_CONSUMERS);
        for (int s = 0; s < F3_STAGES; s++) {
            mbar_init(smem_u32(&sm.full_k[s]), 1);
            mbar_init(smem_u32(&sm.full_v[s]), 1);
            mbar_init(smem_u32(&sm.empty_k[s]), 4 * F3_CONSUMERS);
            mbar_init(smem_u32(&sm.empty_v[s]), 4 * F3_CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) { /* producer: one thread streams Q, then K and V, item after item */
        reg_set_dec<24>();
        if (tid == 0) {
            int it = 0, pair, mb;
            for (int r = 0; f3_item(r, n_items, n_pairs, n_mb, &pair, &mb); r++) {
                const int64_t row0 = (int64_t)mb * F3_M;
                const int64_t last_row = (row0 + F3_M < n_tok ? row0 + F3_M : n_tok) - 1;
                const int n_tiles = (int)((q0 + last_row + 1 + F3_N - 1) / F3_N);
                const int kvh = pair * F3_CONSUMERS / group;
                const uint32_t bq = smem_u32(&sm.full_q);
                if (r > 0) { /* the consumers are done with the last item's Q */
                    mbar_wait(smem_u32(&sm.empty_q), (uint32_t)(r - 1) & 1u);
                }
                mbar_expect_tx(bq, (uint32_t)sizeof(sm.q));
                for (int c = 0; c < F3_CONSUMERS; c++) {
                    for (int half = 0; half < 2; half++) {
                        tma_load(smem_u32(sm.q[c][half]), &map_q, bq,
                                 (pair * F3_CONSUMERS + c) * F3_D + 64 * half, (int)row0);
                    }
                }
                for (int j = 0; j < n_tiles; j++, it++) {
                    const int s = it % F3_STAGES;
                    const uint32_t ph = (uint32_t)(it / F3_STAGES) & 1u;
                    f3_load_tile(sm.k[s], smem_u32(&sm.full_k[s]), smem_u32(&sm.empty_k[s]),
                                 it >= F3_STAGES, ph, &map_k, kvh * F3_D, j * F3_N);
                    f3_load_tile(sm.v[s], smem_u32(&sm.full_v[s]), smem_u32(&sm.empty_v[s]),
                                 it >= F3_STAGES, ph, &map_v, kvh * F3_D, j * F3_N);
                }
            }
        }
        return;
    }

    /* consumer warp group c: head 2 pair + c of each item. Tile j's Q K^T runs beside tile
     * j-1's P V, and tile j's softmax while that P V finishes. */
    reg_set_inc<240>();
    const int c = wg - 1;
    const int g = lane >> 2, t4 = lane & 3;
    const uint32_t q_base = smem_u32(sm.q[c][0]);
    int it = 0, pair, mb;
    for (int r = 0; f3_item(r, n_items, n_pairs, n_mb, &pair, &mb); r++) {
        const int64_t row0 = (int64_t)mb * F3_M;
        const int64_t last_row = (row0 + F3_M < n_tok ? row0 + F3_M : n_tok) - 1;
        const int n_tiles = (int)((q0 + last_row + 1 + F3_N - 1) / F3_N);
        const int64_t pos0 = q0 + row0 + warp * 16 + g; /* this thread's first row */
        const int64_t block_min_pos = q0 + row0;
        float o[64], s[64], corr[2];
        uint32_t p[F3_N / 16][4];
#pragma unroll
        for (int i = 0; i < 64; i++) {
            o[i] = 0.0f;
        }
        float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
        const uint64_t dq = f3_desc(q_base, 16, 1024);
        mbar_wait(smem_u32(&sm.full_q), (uint32_t)r & 1u);

        /* tile 0: Q K^T and softmax alone */
        {
            const int st = it % F3_STAGES;
            mbar_wait(smem_u32(&sm.full_k[st]), (uint32_t)(it / F3_STAGES) & 1u);
            wg_fence();
            f3_issue_qk(s, dq, f3_desc(smem_u32(sm.k[st][0]), 16, 1024));
            wg_commit();
            wg_wait<0>();
            wg_fence_acc(s);
            f3_release_k(sm, st, n_tiles == 1, lane);
            f3_softmax(s, m_r, l_r, corr, 0, pos0, block_min_pos, t4, scale_log2);
            f3_pack(s, p);
        }
        for (int j = 1; j < n_tiles; j++) {
            f3_step(sm, it, j, n_tiles, lane, dq, s, o, p, m_r, l_r, corr, pos0, block_min_pos,
                    t4, scale_log2);
        }
        f3_last(sm, it + n_tiles - 1, lane, o, p, corr);
        it += n_tiles;

        const int h = pair * F3_CONSUMERS + c;
        mma_store_normalised<F3_D / 8>(out, ld_o, (int64_t)h * F3_D, row0 + warp * 16 + g, n_tok,
                                       l_r, t4, [&](int t, int rr, int k) {
                                           return o[4 * t + 2 * rr + k];
                                       });
    }
#endif
}

/* cuTensorMapEncodeTiled through the runtime's driver entry point (no libcuda link). */
typedef CUresult (*f3_encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                 const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                 const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static f3_encode_fn f3_encoder(void)
{
    static f3_encode_fn fn;
    static bool tried;
    if (!tried) {
        tried = true;
        void *p = NULL;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                             cudaEnableDefault, &q) == cudaSuccess &&
            q == cudaDriverEntryPointSuccess) {
            fn = (f3_encode_fn)p;
        }
        (void)cudaGetLastError();
    }
    return fn;
}

/* A (rows, ld) bf16 matrix seen in boxes of 64 columns x box_rows rows, 128-byte swizzle. */
static bool f3_map(CUtensorMap *map, const void *base, int64_t ld, int64_t rows, int box_rows)
{
    f3_encode_fn enc = f3_encoder();
    if (!enc) {
        return false;
    }
    cuuint64_t dims[2] = {(cuuint64_t)ld, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)ld * sizeof(uc_bf16_t)};
    cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
    cuuint32_t estr[2] = {1, 1};
    return enc(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void *>(base), dims, strides,
               box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

extern "C" cudaError_t uc_cuda_attn_prefill_sm90(void *out, const void *q, int64_t ld_q,
                                                 const void *k, const void *v, int64_t ld_kv,
                                                 int64_t n_tok, int64_t q0, int64_t n_heads,
                                                 int64_t n_heads_kv, cudaStream_t stream)
{
    const int64_t group = n_heads / n_heads_kv;
    const int64_t n_keys = q0 + n_tok;
    if (group % F3_CONSUMERS != 0 || n_keys > INT32_MAX ||
        n_heads / F3_CONSUMERS * ((n_tok + F3_M - 1) / F3_M) > INT32_MAX) {
        return cudaErrorNotSupported;
    }
    CUtensorMap mq, mk, mv;
    if (!f3_map(&mq, q, ld_q, n_tok, F3_M) || !f3_map(&mk, k, ld_kv, n_keys, F3_N) ||
        !f3_map(&mv, v, ld_kv, n_keys, F3_N)) {
        return cudaErrorNotSupported;
    }
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)F3_D);
    const size_t smem = sizeof(f3_smem) + 1024;
    static bool attr_set;
    static int n_sm;
    if (!attr_set) {
        cudaError_t e = cudaFuncSetAttribute(f3_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem);
        int dev = 0;
        if (e != cudaSuccess || (e = cudaGetDevice(&dev)) != cudaSuccess ||
            (e = cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev)) !=
                cudaSuccess) {
            return e;
        }
        attr_set = true;
    }
    /* persistent: one block per SM (or per item, where there are fewer) */
    const int64_t n_pairs = n_heads / F3_CONSUMERS;
    const int64_t n_items = n_pairs * ((n_tok + F3_M - 1) / F3_M);
    const unsigned grid = (unsigned)(n_items < n_sm ? n_items : n_sm);
    f3_kernel<<<grid, F3_THREADS, smem, stream>>>(mq, mk, mv, (uc_bf16_t *)out, n_heads * F3_D,
                                                  n_tok, q0, (int)group, (int)n_pairs,
                                                  scale_log2);
    return cudaGetLastError();
}
