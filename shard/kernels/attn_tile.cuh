/* A 32-query x 64-key tile of attention scores on CUDA cores, shared by window_probs and
 * attn_colsum: Q and K are staged through shared memory in 32-dimension slices (as float), and
 * each of the 256 threads accumulates 8 scores: key (tid & 63), rows (tid >> 6) + 4k. Any head
 * size and activation type; the two colsum passes get bit-identical scores from it. */
#ifndef UC_SHARD_KERNELS_ATTN_TILE_CUH
#define UC_SHARD_KERNELS_ATTN_TILE_CUH

#include "common.cuh"

#define AT_THREADS 256
#define AT_ROWS 32
#define AT_KEYS 64
#define AT_DC 32

struct at_smem {
    float q[AT_ROWS][AT_DC + 1];
    float k[AT_DC][AT_KEYS + 1];
};

/* acc[k] = dot(tile row (tid >> 6) + 4k, k row key0 + (tid & 63)), where qrow(r) is the start of
 * tile row r's query (its head's column) or nullptr for a row that reads as zero; keys at or
 * past n_keys read as zero. The sums run over 32-dimension slices, dimensions in order, the
 * same for every tile layout, so a score does not depend on which rows share its tile. */
template <typename T, typename QRow>
static __device__ __forceinline__ void at_scores_rows(float acc[8], at_smem &sm, QRow qrow,
                                                      const T *k, int64_t ld_kv, int64_t key0,
                                                      int64_t n_keys, int d)
{
    const int tid = threadIdx.x, jj = tid & (AT_KEYS - 1), rb = tid / AT_KEYS;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] = 0.0f;
    }
    for (int dc = 0; dc < d; dc += AT_DC) {
        __syncthreads(); /* the previous slice (or tile) is no longer read */
        for (int i = tid; i < AT_ROWS * AT_DC; i += AT_THREADS) {
            int r = i / AT_DC, c = i % AT_DC;
            const T *qr = qrow(r);
            sm.q[r][c] = (qr && dc + c < d) ? uck_to_f(qr[dc + c]) : 0.0f;
        }
        for (int i = tid; i < AT_KEYS * AT_DC; i += AT_THREADS) {
            int kk = i / AT_DC, c = i % AT_DC;
            int64_t key = key0 + kk;
            sm.k[c][kk] = (key < n_keys && dc + c < d) ? uck_to_f(k[key * ld_kv + dc + c]) : 0.0f;
        }
        __syncthreads();
        int cmax = d - dc < AT_DC ? d - dc : AT_DC;
        for (int c = 0; c < cmax; c++) {
            float kv = sm.k[c][jj];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                acc[i] += sm.q[rb + 4 * i][c] * kv;
            }
        }
    }
}

/* The tile's rows are query rows qrow0 .. qrow0 + 31 of one head (q points at its column);
 * rows at or past n_qrows read as zero. */
template <typename T>
static __device__ __forceinline__ void at_scores(float acc[8], at_smem &sm, const T *q,
                                                 int64_t ld_q, int64_t qrow0, int64_t n_qrows,
                                                 const T *k, int64_t ld_kv, int64_t key0,
                                                 int64_t n_keys, int d)
{
    at_scores_rows<T>(
        acc, sm,
        [=](int r) -> const T * { return qrow0 + r < n_qrows ? q + (qrow0 + r) * ld_q : nullptr; },
        k, ld_kv, key0, n_keys, d);
}

#endif
