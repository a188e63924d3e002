/* The backend op table: every computation of the forward pass and of the compression path,
 * on buffers the backend owns ("device" memory: host memory on the CPU backend, GPU memory on
 * CUDA). model.c only calls these ops and never touches activation data. Shapes use shapes.h
 * letters; `ld` arguments are row strides in elements. Activations are in the backend's
 * activation dtype (float32 on CPU, bf16 on CUDA); weights in its weight format. Host-side index
 * arrays (positions, kept rows, block tables) are passed as host pointers and copied by the
 * backend as it needs. */
#ifndef UC_SHARD_BACKEND_H
#define UC_SHARD_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

enum uc_backend_kind {
    UC_BACKEND_CPU = 0,
    UC_BACKEND_CUDA = 1,
};

struct uc_backend;

/* Query spectra batches a backend holds in flight at once (qspec_begin). */
#define UC_QSPEC_BATCHES 2

/* Paged KV pool: n_blocks blocks of block_tokens tokens of one KV head (D values each) for K
 * and for V. A slot is block * block_tokens + offset. */
struct uc_kv_pool_view {
    void *k;              /* (n_blocks, block_tokens, D) */
    void *v;              /* (n_blocks, block_tokens, D) */
    int64_t block_tokens; /* tokens per block */
    int64_t head_dim;     /* D */
};

/* Packed heads (ThinK key channel pruning): a head whose keys keep only kdim < D channels
 * stores each token as one row of kdim + D values, its kept key channels then its D values,
 * so its keys take fewer bytes. Block b's K and V areas (bt * D values each) form one stream
 * of 2 * bt * D values, element i of which is k[b * bt * D + i] for i < bt * D and
 * v[b * bt * D + i - bt * D] after; token r of the block takes elements
 * [r * (kdim + D), (r + 1) * (kdim + D)) (a row may run from the K area into the V area). Such
 * a head's blocks hold uc_kv_packed_tokens tokens, and its packed slot s is token s % tpb of
 * block s / tpb (tpb tokens per block). An unpacked head (kdim 0) is the layout above. */
static inline int64_t uc_kv_packed_tokens(int64_t block_tokens, int64_t head_dim, int64_t kdim)
{
    return kdim <= 0 ? block_tokens : 2 * block_tokens * head_dim / (kdim + head_dim);
}

/* Merged rows (MiniCache, compress/minicache.h): the tokens a layer pair (a, b) merged are held
 * once for the pair, each as one row of 2 D + 4 values: the shared key direction (D), the
 * shared value direction (D), then the key magnitudes of layers a and b and the value
 * magnitudes of a and b. Rows are packed across a block's K and V areas as packed heads' rows
 * are (element i of block b is k[b bt D + i] for i < bt D, v[...] after), so a block holds
 * uc_kv_merged_tokens rows instead of bt tokens of one layer. Layer a restores a key as
 * k_mag_a * key_dir, layer b as k_mag_b * key_dir (values alike). */
#define UC_KV_MERGED_EXTRA 4
static inline int64_t uc_kv_merged_tokens(int64_t block_tokens, int64_t head_dim)
{
    return 2 * block_tokens * head_dim / (2 * head_dim + UC_KV_MERGED_EXTRA);
}
/* Latent heads (LoRC, compress/lorc.h): a head whose keys and values are cached as rank-r
 * latents stores each token as one row of uc_kv_latent_width elements: the token's RoPE
 * position as a little-endian int32 in its first 4 bytes (one float32 element, or two bf16
 * elements), then the r key latents (of the key before RoPE), then the r value latents. Rows are
 * packed across a block's K and V areas as packed heads' are (one stream of 2 bt D values), so
 * such a head's blocks hold floor(2 bt D / width) tokens; its slot s is row s % tpb of block
 * s / tpb. The bases are (Hkv_local, 2, D, D) per layer: for local KV head j, rows
 * [j 2 D, j 2 D + D) are the key basis U_k^T (left singular vectors of the head's key
 * projection, largest first), the next D rows the value basis; a rank-r latent uses the first r
 * rows: z = U_r^T k, k ~ U_r z. */
#define UC_LATENT_MAX_D 512 /* largest head_dim latent heads take */
#define UC_LATENT_CUDA_MAX_D 128 /* on CUDA (a multiple of 32): the decode keeps the key basis
                                    in shared memory as floats */
static inline int64_t uc_kv_latent_width(int64_t rank, size_t act_bytes)
{
    return (int64_t)(4 / act_bytes) + 2 * rank;
}
static inline int64_t uc_kv_latent_tokens(int64_t block_tokens, int64_t head_dim, int64_t width)
{
    return 2 * block_tokens * head_dim / width;
}

/* One decode batch's view of the paged cache for one layer: for row b and local KV head j,
 * entry e = b * Hkv + j holds n_tokens[e] tokens in blocks blocks[offset[e] ...]. With
 * on_device the three arrays are already in backend memory (uploaded once for a whole decode
 * step) and max_tokens may be 0, "not known on the host": the op then sizes its work by the
 * batch alone, so the same recorded graph serves every context length. */
struct uc_kv_batch_view {
    const int32_t *n_tokens; /* (B * Hkv) */
    const int32_t *offset;   /* (B * Hkv) into blocks */
    const int32_t *blocks;   /* concatenated block ids */
    int64_t n_blocks_total;
    int64_t max_tokens;      /* max over entries of n_tokens (0: unknown, on_device only) */
    bool on_device;
    /* Packed entries (NULL when the batch has none): kdim[e] key channels kept by entry e (0:
     * unpacked), whose kept channel numbers are chan[coff[e] ...], ascending; the query's
     * channels with those numbers are the ones that multiply the keys. Same memory as the
     * arrays above. */
    const int32_t *kdim;     /* (B * Hkv) */
    const int32_t *coff;     /* (B * Hkv) */
    const int32_t *chan;
    /* Merged entries (NULL when the batch has none): entry e also attends over mc_n[e] merged
     * rows (MiniCache) in blocks blocks[mc_off[e] ...], restored with the magnitudes of side
     * mc_side[e] (0: the pair's layer a, 1: layer b). Same memory as the arrays above. */
    const int32_t *mc_n;     /* (B * Hkv) */
    const int32_t *mc_off;   /* (B * Hkv) */
    const int32_t *mc_side;  /* (B * Hkv) */
    /* Latent entries (LoRC; NULL when the batch has none): lat_rank[e] > 0 is entry e's latent
     * rank (0: not latent), its tokens rows of uc_kv_latent_width(lat_rank[e]); lat_basis is the
     * layer's bases (see uc_kv_latent_width), in backend memory. attn_decode computes latent
     * entries itself: their keys rebuilt from the latents and rotated at each row's position,
     * the value latents summed by probability, then one product by the value basis. */
    const int32_t *lat_rank; /* (B * Hkv), same memory as the arrays above */
    const void *lat_basis;
};

struct uc_backend_ops {
    /* memory */
    uc_status (*alloc)(struct uc_backend *be, void **out, size_t size_bytes);
    /* (optional) Bytes that allocations could still take now: the device's free memory, or the
     * host's available memory for the CPU backend. */
    uc_status (*mem_available)(struct uc_backend *be, int64_t *bytes);
    void (*free)(struct uc_backend *be, void *p);
    uc_status (*upload)(struct uc_backend *be, void *dst, const void *src, size_t size_bytes);
    uc_status (*download)(struct uc_backend *be, void *dst, const void *src, size_t size_bytes);
    uc_status (*copy)(struct uc_backend *be, void *dst, const void *src, size_t size_bytes);
    /* Activations (n elements) to host float32. */
    uc_status (*download_f32)(struct uc_backend *be, float *dst, const void *src, int64_t n);
    /* Host float32 to activations (n elements). */
    uc_status (*upload_f32)(struct uc_backend *be, void *dst, const float *src, int64_t n);
    uc_status (*sync)(struct uc_backend *be);
    /* (optional) dst[pos[i]] = val[i] for i < n: int32 words of backend memory at dst, from host
     * arrays (a few words far apart, without uploading what lies between them). */
    uc_status (*scatter_ints)(struct uc_backend *be, void *dst, const int32_t *pos,
                              const int32_t *val, int64_t n);
    /* Bytes of one activation element. */
    size_t (*act_size)(struct uc_backend *be);
    /* Weight (rows, cols) from host float32, in the backend's weight format; *out owned by the
     * caller, freed with weight_free. */
    uc_status (*weight_create)(struct uc_backend *be, void **out, const float *host, int64_t rows,
                               int64_t cols);
    void (*weight_free)(struct uc_backend *be, void *w);
    /* A synthetic weight (rows, cols): mean + std * N(0,1)-like values from a counter-based
     * generator of (seed, element index), generated where the weight lives (no host copy). */
    uc_status (*weight_random)(struct uc_backend *be, void **out, int64_t rows, int64_t cols,
                               uint64_t seed, float mean, float std);
    /* RoPE tables for positions [0, max_pos): cos/sin of pos * inv_freq[i], i < D/2. */
    uc_status (*rope_init)(struct uc_backend *be, const float *inv_freq, int64_t half_dim,
                           int64_t max_pos);

    /* compute */
    /* y (T, C) = x / rms(x) * w. */
    uc_status (*rmsnorm)(struct uc_backend *be, void *y, const void *x, const void *w,
                         int64_t n_tok, int64_t dim, float eps);
    /* Residual add then norm, fused: x (T, C) += d; y = x / rms(x) * w. */
    uc_status (*add_rmsnorm)(struct uc_backend *be, void *y, void *x, const void *d, const void *w,
                             int64_t n_tok, int64_t dim, float eps);
    /* A residual branch's last product, fused where it pays: x (T, N) += a (T, K) w^T, then,
     * when norm_w is non-NULL, y = x / rms(x) * norm_w (the norm that follows); tmp (T, N) is
     * scratch. One rank's whole product only: under TP the ranks' partial products are summed
     * between the product and the add (uc_backend_matmul_residual_parts is the op made of
     * matmul and add_rmsnorm, which a backend without a fused form uses). */
    uc_status (*matmul_residual)(struct uc_backend *be, void *x, void *y, void *tmp, const void *a,
                                 const void *w, const void *norm_w, int64_t n_tok, int64_t n_out,
                                 int64_t n_in, float eps);
    /* The MLP's first half, fused where it pays: y (T, F) = silu(x Wg^T) * (x Wu^T) with
     * wgu (2F, K) holding the gate rows then the up rows; gu (T, 2F) is scratch. */
    uc_status (*matmul_swiglu)(struct uc_backend *be, void *y, void *gu, const void *x,
                               const void *wgu, int64_t n_tok, int64_t n_ffn, int64_t n_in);
    /* y (T, N) = x (T, K) w^T, w: weight (N, K). */
    uc_status (*matmul)(struct uc_backend *be, void *y, const void *x, const void *w, int64_t n_tok,
                        int64_t n_out, int64_t n_in);
    /* y (T, N) += b (N) (b: weight (1, N)). */
    uc_status (*add_bias)(struct uc_backend *be, void *y, const void *b, int64_t n_tok,
                          int64_t n_out);
    /* y (n) += x (n). */
    uc_status (*add)(struct uc_backend *be, void *y, const void *x, int64_t n);
    /* Rotates heads [0, n_heads) of each row of x (T rows, stride ld) in place, rotate-half
     * convention, row t at position pos[t]. */
    uc_status (*rope)(struct uc_backend *be, void *x, int64_t ld, int64_t n_heads, int64_t head_dim,
                      const int32_t *pos, int64_t n_tok);
    /* y (T, F) = silu(gu[:, :F]) * gu[:, F:]  (gu: (T, 2F)). */
    uc_status (*swiglu)(struct uc_backend *be, void *y, const void *gu, int64_t n_tok,
                        int64_t n_ffn);
    /* dst[t, :width] = src[t, :width] for T rows with strides. */
    uc_status (*copy_rows)(struct uc_backend *be, void *dst, int64_t dst_ld, const void *src,
                           int64_t src_ld, int64_t width, int64_t n_rows);
    /* dst[i, :] = src[idx[i], :] (width elements, contiguous rows), n_idx rows. dst != src.
     * src may be activations or a weight such as the embedding table (both backends keep
     * weights in the activation format). */
    uc_status (*gather_rows)(struct uc_backend *be, void *dst, const void *src, const int32_t *idx,
                             int64_t n_idx, int64_t width);
    /* Causal attention of T queries (rows q0..q0+T-1 of the sequence; q: (T, ld_q), heads first)
     * over keys/values 0..q0+T-1 (k, v: (n, ld_kv), head j at column j*D). GQA: query head h
     * uses KV head h / (H / Hkv). out: (T, H*D). */
    uc_status (*attn_prefill)(struct uc_backend *be, void *out, const void *q, int64_t ld_q,
                              const void *k, const void *v, int64_t ld_kv, int64_t n_tok,
                              int64_t q0, int64_t n_heads, int64_t n_heads_kv, int64_t head_dim);
    /* Window probabilities: for each query head h, out[(h * W + r) * n + j] =
     * softmax(q k^T / sqrt(D))[n - W + r, j] for the last W query rows (q_win: (W, ld_q), causal)
     * over the n keys. out: host (H, W, n) floats. */
    uc_status (*window_probs)(struct uc_backend *be, float *out, const void *q_win, int64_t ld_q,
                              const void *k, int64_t ld_kv, int64_t n_win, int64_t n,
                              int64_t n_heads, int64_t n_heads_kv, int64_t head_dim);
    /* Window scores, reduced where the probabilities are: col (Hkv, n) = window_probs summed
     * over each KV head's query heads and the W rows; row (n), when non-NULL, = the W-row sums
     * summed over all query heads (or their max over heads with row_max). Host doubles. */
    uc_status (*window_scores)(struct uc_backend *be, double *col, double *row, bool row_max,
                               const void *q_win, int64_t ld_q, const void *k, int64_t ld_kv,
                               int64_t n_win, int64_t n, int64_t n_heads, int64_t n_heads_kv,
                               int64_t head_dim);
    /* The same in two halves, so the host can queue more work before it needs the scores:
     * window_scores_begin queues them (row scores too when `row` is set) into staging slot
     * `slot` (any slot >= 0; a slot holds one result until its end), after the ops queued so
     * far; window_scores_end waits for the slot's result only and writes col (and row, when
     * begun with row) as window_scores does. */
    uc_status (*window_scores_begin)(struct uc_backend *be, int32_t slot, bool row, bool row_max,
                                     const void *q_win, int64_t ld_q, const void *k,
                                     int64_t ld_kv, int64_t n_win, int64_t n, int64_t n_heads,
                                     int64_t n_heads_kv, int64_t head_dim);
    uc_status (*window_scores_end)(struct uc_backend *be, int32_t slot, double *col, double *row);
    /* H2O accumulation: out[h, j] = sum over all causal query rows i of P[h, i, j]. Host (H, n). */
    uc_status (*attn_colsum)(struct uc_backend *be, double *out, const void *q, int64_t ld_q,
                             const void *k, int64_t ld_kv, int64_t n, int64_t n_heads,
                             int64_t n_heads_kv, int64_t head_dim);
    /* Per-head covariance for matrix entropy: for head h of q (n rows, ld), the (D, D) matrix of
     * UNCOMP.md section 1, into host out (H, D, D) doubles. */
    uc_status (*qcov)(struct uc_backend *be, double *out, const void *q, int64_t ld, int64_t n,
                      int64_t n_heads, int64_t head_dim);
    /* Query spectra: for each head h of q, the n_top largest eigenvalues of its matrix above,
     * descending and clamped at 0 (as uc_entropy_eigvals gives them), into host out (H, D)
     * doubles, each head's other D - n_top entries 0 (n_top <= 0 or >= D: the whole spectrum).
     * A truncated entropy of k <= n_top needs only those. Only the eigenvalues cross to the
     * host. */
    uc_status (*qspec)(struct uc_backend *be, double *out, const void *q, int64_t ld, int64_t n,
                       int64_t n_heads, int64_t head_dim, int64_t n_top);
    /* The same for `count` query buffers at once (q[i]: n[i] rows of ld), begun where the
     * backend can run it beside the ops that follow (the CUDA backend: on a second stream); the
     * buffers must stay unchanged until qspec_end, which writes (count, H, D) eigenvalues to host
     * out, waiting for them if need be, or until qspec_fence. Up to UC_QSPEC_BATCHES batches
     * at a time; qspec_end takes the oldest. */
    uc_status (*qspec_begin)(struct uc_backend *be, const void *const *q, const int64_t *n,
                             int64_t count, int64_t ld, int64_t n_heads, int64_t head_dim,
                             int64_t n_top);
    uc_status (*qspec_end)(struct uc_backend *be, double *out);
    /* The ops queued after this one wait until every begun batch has read its queries, so they
     * may overwrite them before qspec_end; nothing when no batch is pending. */
    uc_status (*qspec_fence)(struct uc_backend *be);
    /* Paged KV pool: allocate / free. */
    uc_status (*kv_pool_create)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                int64_t n_blocks, int64_t block_tokens, int64_t head_dim);
    void (*kv_pool_destroy)(struct uc_backend *be, struct uc_kv_pool_view *pool);
    /* Scatter: for e < n, slot[e] of the pool gets K/V row src_row[e], head src_head[e] of
     * k_src/v_src ((rows, ld) activations). */
    uc_status (*kv_scatter)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                            const void *k_src, const void *v_src, int64_t ld,
                            const int32_t *src_row, const int32_t *src_head, const int32_t *slot,
                            int64_t n);
    /* Decode step, fused: rotates the q and k heads of the T rows of qkv (ld; q heads, then k
     * heads, then v heads) at positions pos[t], then appends each row's k and v head j to pool
     * slot slot[t * Hkv + j] (nothing where the slot is negative: a KVSharer layer, or a packed
     * head, which kv_append_packed writes). The q and k heads stay rotated in qkv. pos and slot
     * are in backend memory, so the op can be recorded. */
    uc_status (*rope_append)(struct uc_backend *be, struct uc_kv_pool_view *pool, void *qkv,
                             int64_t ld, int64_t n_heads, int64_t n_heads_kv, int64_t head_dim,
                             const int32_t *pos, const int32_t *slot, int64_t n_tok);
    /* Decode attention over the paged cache for B rows (one query token each): out (B, H*D);
     * q (B, ld_q). When psum is non-NULL it receives, for each entry b*Hkv+j, the attention
     * probabilities summed over the KV head's query heads, (B * Hkv, view->max_tokens) floats
     * on the host (view->max_tokens must then be known). */
    uc_status (*attn_decode)(struct uc_backend *be, void *out, const void *q, int64_t ld_q,
                             const struct uc_kv_pool_view *pool,
                             const struct uc_kv_batch_view *view, int64_t n_rows, int64_t n_heads,
                             int64_t n_heads_kv, float *psum);
    /* Packed heads, at the end of prefill: for e < n, packed slot slot[e] of a head keeping the
     * kdim key channels chan (host, ascending) gets the kept channels of K row src_row[e], head
     * src_head[e] of k_src, then that row's V head of v_src ((rows, ld) activations). */
    uc_status (*kv_scatter_packed)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                   const void *k_src, const void *v_src, int64_t ld,
                                   const int32_t *src_row, const int32_t *src_head,
                                   const int32_t *slot, int64_t n, int64_t kdim,
                                   const int32_t *chan);
    /* Packed heads, in a decode step after rope_append (whose k heads are rotated in qkv): for
     * each entry e = t * Hkv + j with kdim[e] > 0, the kept channels of row t's k head j and
     * its v head go to packed slot -slot[e] - 1. slot, kdim, coff, chan as in the batch view,
     * in backend memory (recordable). */
    uc_status (*kv_append_packed)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                  const void *qkv, int64_t ld, int64_t n_heads,
                                  int64_t n_heads_kv, const int32_t *slot, const int32_t *kdim,
                                  const int32_t *coff, const int32_t *chan, int64_t n_tok);
    /* Packed heads, evict mode: copies packed slot src_slot to dst_slot of a head keeping kdim
     * key channels. */
    uc_status (*kv_move_packed)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                int32_t dst_slot, int32_t src_slot, int64_t kdim);
    /* Channel energies: out[c] = sum over the n_rows rows rows[i] of x (ld) of x[rows[i], c]^2,
     * c < width, to host doubles (ThinK's key and query channel norms). rows is a host array. */
    uc_status (*chan_sumsq)(struct uc_backend *be, double *out, const void *x, int64_t ld,
                            const int32_t *rows, int64_t n_rows, int64_t width);
    /* Latent heads, at the end of prefill: for e < n, latent slot slot[e] of a head of rank
     * `rank` gets the position pos[e], the key latents of K row src_row[e], head src_head[e] of
     * k_src (rotated at pos[e]: the op rotates it back first) and the value latents of that
     * row's V head in v_src ((rows, ld) activations), with local head src_head[e]'s bases of
     * `basis` (the layer's, see uc_kv_latent_width). Host arrays. */
    uc_status (*kv_scatter_latent)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                   const void *k_src, const void *v_src, int64_t ld,
                                   const int32_t *src_row, const int32_t *src_head,
                                   const int32_t *pos, const int32_t *slot, int64_t n,
                                   int64_t rank, const void *basis);
    /* Latent heads, in a decode step BEFORE rope_append (the k heads of qkv not yet rotated):
     * for each entry e = t * Hkv + j with rank[e] > 0, latent slot -slot[e] - 1 gets pos[t]
     * and the latents of row t's k head j and v head j under the layer's bases. pos, slot and
     * rank in backend memory (recordable). */
    uc_status (*kv_append_latent)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                  const void *qkv, int64_t ld, int64_t n_heads,
                                  int64_t n_heads_kv, const int32_t *pos, const int32_t *slot,
                                  const int32_t *rank, const void *basis, int64_t n_tok);
    /* Copies whole blocks: block dst[i] of K and V gets block src[i], for i < n (forks). */
    uc_status (*kv_copy_blocks)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                const int32_t *dst, const int32_t *src, int64_t n);
    /* Diagnosis after non-finite logits (never on a serving step): bad[e] = 1 when one of the
     * first n_valid[e] slots of pool block blocks[e] holds a NaN or Inf in K or V, else 0, for
     * e < n; with kdim non-NULL, a block with kdim[e] > 0 is a packed head's (its first
     * n_valid[e] packed rows are checked). blocks, n_valid, kdim and bad are host arrays; the
     * call synchronises. */
    uc_status (*kv_nonfinite)(struct uc_backend *be, const struct uc_kv_pool_view *pool,
                              const int32_t *blocks, const int32_t *n_valid, const int32_t *kdim,
                              int64_t n, int32_t *bad);
    /* MiniCache, at the end of a merged pair's second layer b in prefill: for e < n, the
     * angular distances (compress/minicache.h) between layer a's cached token at (unpacked)
     * slot a_slot[e] and layer b's row src_row[e], KV head `head`, of k_src/v_src ((rows, ld)
     * activations): dist[2 e] of the keys, dist[2 e + 1] of the values. a_slot, src_row and
     * dist are host arrays; the call synchronises. */
    uc_status (*kv_merge_dist)(struct uc_backend *be, double *dist,
                               const struct uc_kv_pool_view *pool, const int32_t *a_slot,
                               const void *k_src, const void *v_src, int64_t ld,
                               const int32_t *src_row, int64_t head, int64_t n);
    /* MiniCache: for e < n, merged row m_slot[e] (layout above) gets the SLERP at t of layer
     * a's token at slot a_slot[e] and layer b's row src_row[e] (as in kv_merge_dist), and the
     * four magnitudes. Host index arrays. */
    uc_status (*kv_merge_write)(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                const int32_t *a_slot, const void *k_src, const void *v_src,
                                int64_t ld, const int32_t *src_row, int64_t head,
                                const int32_t *m_slot, int64_t n, float t);
    /* Copies one slot of the pool to another (evict mode compaction). */
    uc_status (*kv_move)(struct uc_backend *be, struct uc_kv_pool_view *pool, int32_t dst_slot,
                         int32_t src_slot);
    /* (optional) Graphs: the ops issued between graph_begin and graph_end are recorded (not
     * run) into a replayable graph; graph_launch runs it again with the same buffers. Only ops
     * with no host input or output may be recorded. NULL slots: no graph support. */
    uc_status (*graph_begin)(struct uc_backend *be);
    uc_status (*graph_end)(struct uc_backend *be, void **graph);
    uc_status (*graph_launch)(struct uc_backend *be, void *graph);
    void (*graph_destroy)(struct uc_backend *be, void *graph);
    /* (optional with graphs) Changes whenever the backend replaces an internal workspace that a
     * recorded op may use; graphs recorded under another value must be recorded again. */
    uint64_t (*graph_epoch)(struct uc_backend *be);
    /* (optional) Greedy/sampling support: index of the max of each row of x (T, N) to host;
     * -1 for a row holding a NaN or Inf. */
    uc_status (*argmax)(struct uc_backend *be, int32_t *out, const void *x, int64_t n_tok,
                        int64_t n);
    /* (optional, all four or none) A decode step launched before the host has read the one
     * before it (shard/engine/decode.c, "the next step in flight"):
     * - argmax_keep: as argmax, but the ids stay in backend memory (dev_out, n_tok int32s);
     * - embed_ids: dst[i, :] = table[ids[i], :] for ids in backend memory (argmax_keep's), a
     *   row of zeros for an id outside [0, n_table) (argmax's -1 of a non-finite row);
     * - ids_fetch_begin: copies n ids from backend memory to the host behind the work queued
     *   so far, into slot `slot` (0 or 1), without waiting; ids_fetch_end waits for that copy
     *   alone (not for work queued after it) and hands the ids over. */
    uc_status (*argmax_keep)(struct uc_backend *be, int32_t *dev_out, const void *x,
                             int64_t n_tok, int64_t n);
    uc_status (*embed_ids)(struct uc_backend *be, void *dst, const void *table,
                           const int32_t *ids, int64_t n_ids, int64_t n_table, int64_t width);
    uc_status (*ids_fetch_begin)(struct uc_backend *be, int slot, const int32_t *dev, int64_t n);
    uc_status (*ids_fetch_end)(struct uc_backend *be, int slot, int32_t *out, int64_t n);
    void (*destroy)(struct uc_backend *be);
};

struct uc_backend {
    const struct uc_backend_ops *ops;
    void *ctx;
    enum uc_backend_kind kind;
    const char *name;
    char device_name[128];
    int device_index;
    void *stream; /* the backend's stream (CUDA), NULL on CPU */
};

struct uc_backend_params {
    enum uc_backend_kind kind;
    int device_index;  /* CUDA: GPU ordinal (default: local rank) */
    int n_threads;     /* CPU: 0 = all cores */
    bool fp32;         /* CUDA: float32 activations and weights (accuracy mode) */
};

struct uc_backend_params uc_backend_default_params(void);
/* Creates the backend; CUDA without a GPU or without UC_CUDA is UC_ERR_UNSUPPORTED. */
uc_status uc_backend_create(struct uc_backend **out, const struct uc_backend_params *p);
void uc_backend_destroy(struct uc_backend *be);
bool uc_backend_parse(const char *name, enum uc_backend_kind *out);
const char *uc_backend_kind_name(enum uc_backend_kind k);

/* matmul_residual made of matmul (into tmp) and add_rmsnorm (or add without a norm). */
uc_status uc_backend_matmul_residual_parts(struct uc_backend *be, void *x, void *y, void *tmp,
                                           const void *a, const void *w, const void *norm_w,
                                           int64_t n_tok, int64_t n_out, int64_t n_in, float eps);

/* Constructors of each backend (backend_cpu.c, backend_cuda.c or backend_cuda_stub.c). */
uc_status uc_backend_cpu_create(struct uc_backend **out, const struct uc_backend_params *p);
uc_status uc_backend_cuda_create(struct uc_backend **out, const struct uc_backend_params *p);
/* Number of CUDA devices usable (0 without a GPU or without UC_CUDA). */
int uc_backend_cuda_device_count(void);

#ifdef __cplusplus
}
#endif
#endif
