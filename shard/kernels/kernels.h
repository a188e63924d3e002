/* C launchers of the CUDA kernels (one op per kernels/<op>.cu). Every launcher enqueues its work
 * on `stream` and returns cudaGetLastError(); none synchronises, allocates or logs. Device
 * pointers throughout, except where a comment says host. Activations and weights are bf16 or
 * float32 (`dt`); shapes use shapes.h letters and `ld` arguments are row strides in elements.
 * Included by backend_cuda.c (C) and the .cu files (C++). */
#ifndef UC_SHARD_KERNELS_KERNELS_H
#define UC_SHARD_KERNELS_KERNELS_H

#include <cuda_runtime.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum uc_cuda_dtype {
    UC_CUDA_BF16 = 0,
    UC_CUDA_F32 = 1,
};

/* Block copies in both pools: block dst[i] gets block src[i] (block_elems elements each). */
cudaError_t uc_cuda_kv_copy_blocks(void *k, void *v, const int32_t *dst, const int32_t *src,
                                   int64_t n, int64_t block_elems, enum uc_cuda_dtype dt,
                                   cudaStream_t stream);
/* bad (n) int32 on the device = 1 where the first n_valid[e] slots of pool block blocks[e] hold
 * a NaN or Inf in K or V, else 0; with kdim non-NULL, kdim[e] > 0 marks a packed head's block
 * (its first n_valid[e] packed rows are checked). blocks, n_valid, kdim: device arrays. */
cudaError_t uc_cuda_kv_nonfinite(int32_t *bad, const void *k, const void *v,
                                 const int32_t *blocks, const int32_t *n_valid,
                                 const int32_t *kdim, int64_t n, int64_t block_tokens,
                                 int64_t head_dim, enum uc_cuda_dtype dt, cudaStream_t stream);
/* Packed heads (ThinK; layout in backend.h, kernels in kv_packed.cu). Scatter: packed slot
 * slot[e] of a head keeping the kdim channels chan gets K row src_row[e] head src_head[e]'s kept
 * channels and its V head. */
cudaError_t uc_cuda_kv_scatter_packed(void *pool_k, void *pool_v, const void *k_src,
                                      const void *v_src, int64_t ld, const int32_t *src_row,
                                      const int32_t *src_head, const int32_t *slot, int64_t n,
                                      int64_t kdim, const int32_t *chan, int64_t block_tokens,
                                      int64_t head_dim, enum uc_cuda_dtype dt,
                                      cudaStream_t stream);
/* Decode append of the packed entries e (kdim[e] > 0) of the rotated qkv rows to packed slot
 * -slot[e] - 1 (the batch view's arrays; recordable). */
cudaError_t uc_cuda_kv_append_packed(void *pool_k, void *pool_v, const void *qkv, int64_t ld,
                                     int64_t n_heads, int64_t n_heads_kv, const int32_t *slot,
                                     const int32_t *kdim, const int32_t *coff,
                                     const int32_t *chan, int64_t n_tok, int64_t block_tokens,
                                     int64_t head_dim, enum uc_cuda_dtype dt, cudaStream_t stream);
/* Evict move of one packed row. */
cudaError_t uc_cuda_kv_move_packed(void *pool_k, void *pool_v, int64_t block_tokens,
                                   int64_t head_dim, int64_t kdim, int32_t dst_slot,
                                   int32_t src_slot, enum uc_cuda_dtype dt, cudaStream_t stream);
/* out (width) doubles on the device = per-column sums of squares over rows rows[i] of x. */
cudaError_t uc_cuda_chan_sumsq(double *out, const void *x, int64_t ld, const int32_t *rows,
                               int64_t n_rows, int64_t width, enum uc_cuda_dtype dt,
                               cudaStream_t stream);
/* out (n) = n_tokens with the packed entries (kdim > 0) set to 0: the decode kernel's view. */
cudaError_t uc_cuda_decode_mask_packed(int32_t *out, const int32_t *n_tokens,
                                       const int32_t *kdim, int64_t n, cudaStream_t stream);
/* Latent heads (LoRC; layout in backend.h): prefill scatter of n kept rows (keys rotated at
 * pos[e], rotated back before the projection; basis: the layer's (Hkv_local, 2, D, D)), and
 * the decode append of entries with rank[e] > 0 from keys not yet rotated. Device arrays.
 * D <= 512 and even. */
cudaError_t uc_cuda_kv_scatter_latent(void *pool_k, void *pool_v, const void *k_src,
                                      const void *v_src, int64_t ld, const int32_t *src_row,
                                      const int32_t *src_head, const int32_t *pos,
                                      const int32_t *slot, int64_t n, int64_t rank,
                                      const void *basis, const float *cos_t, const float *sin_t,
                                      int64_t block_tokens, int64_t head_dim,
                                      enum uc_cuda_dtype dt, cudaStream_t stream);
cudaError_t uc_cuda_kv_append_latent(void *pool_k, void *pool_v, const void *qkv, int64_t ld,
                                     int64_t n_heads, int64_t n_heads_kv, const int32_t *pos,
                                     const int32_t *slot, const int32_t *rank, const void *basis,
                                     int64_t n_tok, int64_t block_tokens, int64_t head_dim,
                                     enum uc_cuda_dtype dt, cudaStream_t stream);
/* Decode attention of the latent entries (lat_rank[e] > 0) only, written over out's rows of
 * their query heads (q rotated; each key rebuilt and rotated at its stored position): the split
 * decode of decode_rows.cuh, D a multiple of 32 up to 128; ws: uc_cuda_decode_rows_ws floats
 * (without probabilities). */
cudaError_t uc_cuda_attn_decode_latent(void *out, const void *q, int64_t ld_q, const void *pool_k,
                                       const void *pool_v, int64_t block_tokens, int64_t head_dim,
                                       const int32_t *n_tokens, const int32_t *offset,
                                       const int32_t *blocks, const int32_t *lat_rank,
                                       const void *basis, int64_t n_rows, int64_t n_heads,
                                       int64_t n_heads_kv, const float *cos_t,
                                       const float *sin_t, int splits, float *ws,
                                       enum uc_cuda_dtype dt, cudaStream_t stream);
/* The split decode of the packed and merged entries (decode_rows.cuh): token ranges per
 * (entry, head tile), and the float workspace it takes (max_tokens: with probabilities). */
int uc_cuda_decode_rows_splits(int64_t n_rows, int64_t n_heads, int64_t n_heads_kv, int n_sms);
size_t uc_cuda_decode_rows_ws(int64_t n_rows, int64_t n_heads, int64_t n_heads_kv,
                              int64_t head_dim, int splits, int64_t max_tokens, bool with_psum);
/* Decode attention of the packed entries (kdim[e] > 0) only, written over out's rows of their
 * query heads (and, with psum, their (B * Hkv, max_tokens) probability rows). D <= 256; ws:
 * uc_cuda_decode_rows_ws floats. */
cudaError_t uc_cuda_attn_decode_packed(void *out, const void *q, int64_t ld_q, const void *pool_k,
                                       const void *pool_v, int64_t block_tokens, int64_t head_dim,
                                       const int32_t *n_tokens, const int32_t *offset,
                                       const int32_t *blocks, const int32_t *kdim,
                                       const int32_t *coff, const int32_t *chan, int64_t n_rows,
                                       int64_t n_heads, int64_t n_heads_kv, int splits, float *ws,
                                       float *psum, int64_t max_tokens, enum uc_cuda_dtype dt,
                                       cudaStream_t stream);
/* MiniCache merged rows (layout in backend.h, kernels in kv_merged.cu). dist (2 n doubles, device)
 * = angular distances of layer a's cached K and V at slots a_slot[e] and layer b's rows
 * src_row[e], head `head`, of k_src/v_src. */
cudaError_t uc_cuda_kv_merge_dist(double *dist, const void *pool_k, const void *pool_v,
                                  const void *k_src, const void *v_src, int64_t ld,
                                  const int32_t *a_slot, const int32_t *src_row, int64_t head,
                                  int64_t n, int64_t head_dim, enum uc_cuda_dtype dt,
                                  cudaStream_t stream);
/* Merged row m_slot[e] = the SLERP at t of those two rows' directions and their magnitudes. */
cudaError_t uc_cuda_kv_merge_write(void *pool_k, void *pool_v, const void *k_src,
                                   const void *v_src, int64_t ld, const int32_t *a_slot,
                                   const int32_t *src_row, int64_t head, const int32_t *m_slot,
                                   int64_t n, float t, int64_t block_tokens, int64_t head_dim,
                                   enum uc_cuda_dtype dt, cudaStream_t stream);
/* out (n) = n_tokens with the merged entries (mc_n > 0) set to 0 (out may be n_tokens). */
cudaError_t uc_cuda_decode_mask_merged(int32_t *out, const int32_t *n_tokens,
                                       const int32_t *mc_n, int64_t n, cudaStream_t stream);
/* Decode attention of the merged entries (mc_n[e] > 0) only, over their own n_tokens[e] tokens
 * and mc_n[e] merged rows (the batch view's arrays), written over out's rows of their query
 * heads (and, with psum, their probability rows). D <= 256; ws as for the packed entries. */
cudaError_t uc_cuda_attn_decode_merged(void *out, const void *q, int64_t ld_q, const void *pool_k,
                                       const void *pool_v, int64_t block_tokens, int64_t head_dim,
                                       const int32_t *n_tokens, const int32_t *offset,
                                       const int32_t *blocks, const int32_t *mc_n,
                                       const int32_t *mc_off, const int32_t *mc_side,
                                       int64_t n_rows, int64_t n_heads, int64_t n_heads_kv,
                                       int splits, float *ws, float *psum, int64_t max_tokens,
                                       enum uc_cuda_dtype dt, cudaStream_t stream);
/* Sums window probabilities (H, W, n) into col (Hkv, n) (over each KV head's query heads and
 * the W rows) and row (n) (over all heads, or their max with row_max; row may be NULL). */
cudaError_t uc_cuda_window_reduce(float *col, float *row, const float *probs, int64_t n_win,
                                  int64_t n, int64_t n_heads, int64_t n_heads_kv, bool row_max,
                                  cudaStream_t stream);
/* Decode-path kernels (norms, RoPE+append, decode attention, the products) as programmatic
 * dependent launches (sm_90): each may start while the previous kernel runs and waits for it
 * on the device. Off by default; the backend turns it on for sm_90 devices. */
void uc_cuda_set_pdl(int on);
/* Decode-size matrix product y (T, N) = x (T, K) w^T in bf16 (float32 accumulation) for
 * T <= 8 and K a multiple of 8: streams w at close to the memory bandwidth. */
bool uc_cuda_gemv_supported(int64_t n_tok, int64_t n_out, int64_t n_in, enum uc_cuda_dtype dt);
cudaError_t uc_cuda_gemv(void *y, const void *x, const void *w, int64_t n_tok, int64_t n_out,
                         int64_t n_in, cudaStream_t stream);
/* y (T, F) = silu(x Wg^T) * (x Wu^T), w (2F, K) = [gate rows; up rows], for T <= 8 in bf16. */
cudaError_t uc_cuda_gemv_swiglu(void *y, const void *x, const void *w, int64_t n_tok,
                                int64_t n_ffn, int64_t n_in, cudaStream_t stream);
/* The same for T <= 8 and K a multiple of 32 on the tensor cores (gemv_tc.cu, sm_80+): every
 * output summed the same way at any T. With swiglu, w is (2F, K) = [gate rows; up rows], n_out
 * = F, and y (T, F) = silu(x Wg^T) * (x Wu^T). */
bool uc_cuda_gemv_tc_supported(int64_t n_tok, int64_t n_out, int64_t n_in,
                               enum uc_cuda_dtype dt);
cudaError_t uc_cuda_gemv_tc(void *y, const void *x, const void *w, int64_t n_tok, int64_t n_out,
                            int64_t n_in, bool swiglu, cudaStream_t stream);
/* x (T, C) += d, then y = x / rms(x) * w. */
cudaError_t uc_cuda_add_rmsnorm(void *y, void *x, const void *d, const void *w, int64_t n_tok,
                                int64_t dim, float eps, enum uc_cuda_dtype dt,
                                cudaStream_t stream);
/* y (T, C) = x / rms(x) * w, float32 arithmetic. */
cudaError_t uc_cuda_rmsnorm(void *y, const void *x, const void *w, int64_t n_tok, int64_t dim,
                            float eps, enum uc_cuda_dtype dt, cudaStream_t stream);
/* y (T, N) += b (N). */
cudaError_t uc_cuda_add_bias(void *y, const void *b, int64_t n_tok, int64_t n_out,
                             enum uc_cuda_dtype dt, cudaStream_t stream);
/* y (n) += x (n). */
cudaError_t uc_cuda_add(void *y, const void *x, int64_t n, enum uc_cuda_dtype dt,
                        cudaStream_t stream);
/* cos/sin tables (max_pos, D/2) floats of pos * inv_freq[i] (inv_freq (D/2) floats). */
cudaError_t uc_cuda_rope_table(float *cos_t, float *sin_t, const float *inv_freq, int64_t half_dim,
                               int64_t max_pos, cudaStream_t stream);
/* Rotate-half RoPE in place on heads [0, n_heads) of T rows of x (stride ld); pos (T). */
cudaError_t uc_cuda_rope(void *x, int64_t ld, int64_t n_heads, int64_t head_dim,
                         const int32_t *pos, int64_t n_tok, const float *cos_t,
                         const float *sin_t, enum uc_cuda_dtype dt, cudaStream_t stream);
/* Decode: RoPE on the q and k heads of T rows of qkv (q heads, k heads, v heads; stride ld),
 * then k and v head j of row t to pool slot slot[t * Hkv + j]. pos (T), slot (T * Hkv). */
cudaError_t uc_cuda_rope_append(void *qkv, int64_t ld, int64_t n_heads, int64_t n_heads_kv,
                                int64_t head_dim, const int32_t *pos, const int32_t *slot,
                                int64_t n_tok, const float *cos_t, const float *sin_t,
                                void *pool_k, void *pool_v, enum uc_cuda_dtype dt,
                                cudaStream_t stream);
/* y (T, F) = silu(gu[:, :F]) * gu[:, F:]. */
cudaError_t uc_cuda_swiglu(void *y, const void *gu, int64_t n_tok, int64_t n_ffn,
                           enum uc_cuda_dtype dt, cudaStream_t stream);
/* dst[i, :] = src[idx[i], :] for n_idx rows of `width` elements; idx (n_idx) on the device. */
cudaError_t uc_cuda_gather_rows(void *dst, const void *src, const int32_t *idx, int64_t n_idx,
                                int64_t width, enum uc_cuda_dtype dt, cudaStream_t stream);
/* The same with ids checked against the source's n_src rows: a row of zeros for one outside. */
cudaError_t uc_cuda_gather_ids(void *dst, const void *src, const int32_t *idx, int64_t n_idx,
                               int64_t n_src, int64_t width, enum uc_cuda_dtype dt,
                               cudaStream_t stream);
/* dst (n, dst_dt) = src (n, src_dt), round to nearest even into bf16. */
cudaError_t uc_cuda_convert(void *dst, enum uc_cuda_dtype dst_dt, const void *src,
                            enum uc_cuda_dtype src_dt, int64_t n, cudaStream_t stream);
/* w (n) = mean + std * sqrt(3) * u, u uniform in [-1, 1) from splitmix64 of (seed, index): the
 * same values as the CPU backend's weight_random before rounding to dt. */
cudaError_t uc_cuda_weight_random(void *w, int64_t n, uint64_t seed, float mean, float std,
                                  enum uc_cuda_dtype dt, cudaStream_t stream);
/* Causal GQA attention (flash-style, never an N x N matrix): T queries (rows q0..q0+T-1; q
 * (T, ld_q), head h at column h*D) over keys/values 0..q0+T-1 (k, v (n, ld_kv), KV head j at
 * column j*D). out (T, H*D). bf16 with D 64 or 128 runs on tensor cores (mma.sync); the rest
 * (float32, other D <= 256) on a CUDA-core kernel. */
cudaError_t uc_cuda_attn_prefill(void *out, const void *q, int64_t ld_q, const void *k,
                                 const void *v, int64_t ld_kv, int64_t n_tok, int64_t q0,
                                 int64_t n_heads, int64_t n_heads_kv, int64_t head_dim,
                                 enum uc_cuda_dtype dt, cudaStream_t stream);
/* The same on Hopper (attn_prefill_sm90.cu, built for sm_90a when 90 is among the CUDA
 * architectures): bf16, D = 128, an even number of query heads per KV head, 16-byte aligned
 * rows. cudaErrorNotSupported when a case is not its own (the caller then takes the kernels
 * above); uc_cuda_attn_prefill tries it first on compute capability 9.0 unless
 * UC_CUDA_PREFILL_SM90=0. */
cudaError_t uc_cuda_attn_prefill_sm90(void *out, const void *q, int64_t ld_q, const void *k,
                                      const void *v, int64_t ld_kv, int64_t n_tok, int64_t q0,
                                      int64_t n_heads, int64_t n_heads_kv, cudaStream_t stream);
/* Window probabilities: out (H, W, n) floats on the device, row r of head h = the causal
 * softmax of query row n-W+r (q_win (W, ld_q)) over the n keys, zeros past the diagonal. */
cudaError_t uc_cuda_window_probs(float *out, const void *q_win, int64_t ld_q, const void *k,
                                 int64_t ld_kv, int64_t n_win, int64_t n, int64_t n_heads,
                                 int64_t n_heads_kv, int64_t head_dim, enum uc_cuda_dtype dt,
                                 cudaStream_t stream);
/* The same in two parts around a product the caller runs: window_pack lays the window's queries
 * out as dst (H, W, D) (activation type), so that KV head g's scores are one product of its
 * group's (group x W, D) rows with its keys into probs (H, W, n) (scaled by 1/sqrt(D)); then
 * window_softmax turns those scores into the causal probabilities in place. */
cudaError_t uc_cuda_window_pack(void *dst, const void *q_win, int64_t ld_q, int64_t n_win,
                                int64_t n_heads, int64_t head_dim, enum uc_cuda_dtype dt,
                                cudaStream_t stream);
cudaError_t uc_cuda_window_softmax(float *probs, int64_t n_win, int64_t n, int64_t n_heads,
                                   cudaStream_t stream);
/* H2O column sums: out (H, n) doubles on the device = sum over causal query rows i of
 * P[h, i, j]. row_ml: workspace of 2 * H * n floats (each row's max and 1 / exp-sum, from the
 * first pass). */
cudaError_t uc_cuda_attn_colsum(double *out, float *row_ml, const void *q, int64_t ld_q,
                                const void *k, int64_t ld_kv, int64_t n, int64_t n_heads,
                                int64_t n_heads_kv, int64_t head_dim, enum uc_cuda_dtype dt,
                                cudaStream_t stream);
/* dst[pos[i]] = val[i] for i < n (int32; pos and val in device memory). */
cudaError_t uc_cuda_scatter_ints(int32_t *dst, const int32_t *pos, const int32_t *val, int64_t n,
                                 cudaStream_t stream);
/* Rows a block of qcov's mean pass sums: its parts (hb * D doubles per this many rows) sit at
 * the start of the xn buffer before the normalised rows overwrite them. */
#define UC_CUDA_QCOV_MEAN_ROWS 512
/* qcov, first half: for heads [h0, h0+hb) of q (n rows, ld), xn (hb, n_pad, D) doubles (half:
 * IEEE halves) = each row centred by the column means (over the n rows) and scaled to unit L2
 * norm (zero rows stay zero; rows n .. n_pad - 1 are zeros). mean: workspace of hb * D doubles.
 * The covariance is then xn^T xn / n (DGEMM, or a half product with float32 sums). */
cudaError_t uc_cuda_qcov_normalize(void *xn, double *mean, const void *q, int64_t ld, int64_t n,
                                   int64_t n_pad, int64_t h0, int64_t hb, int64_t head_dim,
                                   int half, enum uc_cuda_dtype dt, cudaStream_t stream);
/* cov (hb, D, D) = scale x the sum over s < split of part (hb * split, D, D; doubles, or floats
 * with part_f32), in order of s: the split-K partial covariances of qcov. */
cudaError_t uc_cuda_qcov_sum(double *cov, const void *part, int64_t hb, int64_t split,
                             int64_t head_dim, int part_f32, double scale, cudaStream_t stream);
/* Eigenvalues of n_mats symmetric (d, d) double matrices (mats, consecutive), descending and
 * clamped at 0, into eig (n_mats, d): Householder tridiagonalisation in registers, one block per
 * matrix (in float arithmetic when `single`: for covariances of bf16 queries), then multisection
 * on Sturm counts in double, eight lanes per eigenvalue, for the n_top largest only (n_top <= 0
 * or >= d: all), the rest written 0. The matrices are overwritten (each keeps its tridiagonal
 * form in its first 2d - 1 words). d <= UC_CUDA_SYMEIG_MAX_D. */
#define UC_CUDA_SYMEIG_MAX_D 128
cudaError_t uc_cuda_symeig(double *eig, double *mats, int64_t n_mats, int64_t d, int64_t n_top,
                           int single, cudaStream_t stream);
/* Paged KV scatter: for e < n, pool slot slot[e] of K and V gets row src_row[e], head
 * src_head[e] of k_src/v_src ((rows, ld)). Index arrays on the device. */
cudaError_t uc_cuda_kv_scatter(void *pool_k, void *pool_v, const void *k_src, const void *v_src,
                               int64_t ld, const int32_t *src_row, const int32_t *src_head,
                               const int32_t *slot, int64_t n, int64_t head_dim,
                               enum uc_cuda_dtype dt, cudaStream_t stream);
/* Copies pool slot src to slot dst, K and V. */
cudaError_t uc_cuda_kv_move(void *pool_k, void *pool_v, int64_t head_dim, int32_t dst_slot,
                            int32_t src_slot, enum uc_cuda_dtype dt, cudaStream_t stream);

/* Paged decode attention (split-K / flash-decoding). A plan from uc_cuda_attn_decode_plan sizes
 * the split and the float workspace (max_tokens 0: not known, the split then depends on the
 * batch alone and each entry's ranges on its own length, for recorded graphs); the launch then takes the device index arrays n_tokens
 * and offset ((B * Hkv) each) and blocks, the queries q (B, ld_q), and writes out (B, H*D).
 * With psum non-NULL (device, (B * Hkv, max_tokens) floats) it also writes the probabilities
 * summed over each KV head's query heads, zeros past each entry's n_tokens. */
struct uc_cuda_decode_plan {
    int n_splits;   /* token ranges per (row, KV head) */
    int chunk;      /* tokens per range; 0: each entry splits its own n_tokens in n_splits */
    int g_tiles;    /* query-head tiles of up to 4 heads per KV head */
    size_t n_counters; /* int32 counters the launch needs, zero before it (and left zero) */
    size_t ws_floats; /* workspace the launch needs */
};
void uc_cuda_attn_decode_plan(struct uc_cuda_decode_plan *plan, int64_t n_rows, int64_t n_heads,
                              int64_t n_heads_kv, int64_t head_dim, int64_t max_tokens,
                              int with_psum, int n_sms);
/* Whether the decode kernel supports this head size and dtype (16-byte rows chunks, D <= 256). */
int uc_cuda_attn_decode_supported(int64_t head_dim, enum uc_cuda_dtype dt);
cudaError_t uc_cuda_attn_decode(void *out, const void *q, int64_t ld_q, const void *pool_k,
                                const void *pool_v, int64_t block_tokens, int64_t head_dim,
                                const int32_t *n_tokens, const int32_t *offset,
                                const int32_t *blocks, int64_t n_rows, int64_t n_heads,
                                int64_t n_heads_kv, int64_t max_tokens,
                                const struct uc_cuda_decode_plan *plan, float *ws,
                                int32_t *counters, float *psum, enum uc_cuda_dtype dt,
                                cudaStream_t stream);
/* out (T) int32 on the device = index of the first maximum of each row of x (T, N). */
cudaError_t uc_cuda_argmax(int32_t *out, const void *x, int64_t n_tok, int64_t n,
                           enum uc_cuda_dtype dt, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
