/* Tensor-core and asynchronous-copy helpers (sm_80+) shared by the attention kernels:
 * cp.async 16-byte copies with zero fill, ldmatrix (plain and transposed), mma.sync m16n8k16
 * bf16 with float32 accumulators, and the XOR swizzle of 16-byte chunks that keeps ldmatrix
 * free of bank conflicts. Included only by .cu files, after common.cuh. */
#ifndef UC_SHARD_KERNELS_MMA_CUH
#define UC_SHARD_KERNELS_MMA_CUH

static __device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}

static __device__ __forceinline__ void cp_async_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::);
}

static __device__ __forceinline__ void cp_async_wait_all(void)
{
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

/* Waits until at most N of this thread's committed copy groups are still in flight. */
template <int N> static __device__ __forceinline__ void cp_async_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* c (16x8 f32) += a (16x16 bf16, row) * b (16x8 bf16, col) */
static __device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0,
                                                uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* The end of a warp's m16n8 output rows: lane (g = lane / 4, t4 = lane % 4) holds, for rows
 * row_g and row_g + 8 (rr = 0, 1), its share l_r[rr] of the row's softmax sum and two columns
 * of each of TILES 8-column tiles, acc(t, rr, k) (k = 0, 1). The quad's shares are added, and
 * each row below n_rows is divided by its sum and stored as bf16 pairs from column col0 of
 * out + row * ld. */
template <int TILES, typename Acc>
static __device__ __forceinline__ void mma_store_normalised(uc_bf16_t *out, int64_t ld,
                                                            int64_t col0, int64_t row_g,
                                                            int64_t n_rows, const float l_r[2],
                                                            int t4, Acc acc)
{
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float l = l_r[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        float inv = 1.0f / l;
        int64_t row = row_g + rr * 8;
        if (row < n_rows) {
            uc_bf16_t *orow = out + row * ld + col0;
#pragma unroll
            for (int t = 0; t < TILES; t++) {
                *reinterpret_cast<__nv_bfloat162 *>(orow + t * 8 + t4 * 2) =
                    __floats2bfloat162_rn(acc(t, rr, 0) * inv, acc(t, rr, 1) * inv);
            }
        }
    }
}

/* Element offset of 16-byte chunk c of row r in a swizzled (rows, D) bf16 tile. */
template <int D> static __device__ __forceinline__ int swz(int r, int c)
{
    return r * D + ((c ^ (r & 7)) << 3);
}

#endif
