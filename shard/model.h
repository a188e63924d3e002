/* The model on one rank: its slice of the weights (column-parallel Q/K/V and gate/up,
 * row-parallel O and down, a vocabulary slice of the LM head; norms and the embedding
 * replicated) and the pieces of the forward pass that engine.c strings together. Rank r owns
 * query heads [r H/R, (r+1) H/R) and the KV heads they read. */
#ifndef UC_SHARD_MODEL_H
#define UC_SHARD_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "base/status.h"
#include "comm.h"
#include "model_config.h"

#ifdef __cplusplus
extern "C" {
#endif

/* This rank's share of the model. */
struct uc_model_shard {
    int rank;
    int n_ranks;     /* R */
    int64_t h0;      /* first query head */
    int64_t n_heads; /* H_local */
    int64_t kv0;     /* first KV head */
    int64_t n_heads_kv; /* Hkv_local */
    int64_t group;   /* query heads per KV head (H / Hkv) */
    int64_t f0, n_ffn; /* MLP intermediate slice */
    int64_t v0, n_vocab; /* LM-head vocabulary slice; n_vocab_pad = ceil(V / R) */
    int64_t n_vocab_pad;
    int64_t qkv_dim; /* (H_local + 2 Hkv_local) D: the fused QKV row */
    bool kv_replicated; /* R > Hkv: several ranks hold the same KV head */
};

struct uc_model_params {
    const char *model_dir;
    struct uc_backend *be;
    struct uc_comm *comm; /* NULL: one rank */
};

struct uc_model;

/* Checks that R ranks can split this model (R divides H and the MLP size, and R divides Hkv or
 * Hkv divides R). Writes a message naming the numbers on failure. */
uc_status uc_model_tp_check(const struct uc_model_config *cfg, int n_ranks, char *msg,
                            size_t msg_size);
/* Fills the shard description of rank r of R. */
void uc_model_shard_of(struct uc_model_shard *s, const struct uc_model_config *cfg, int rank,
                       int n_ranks);

/* Loads config, validates every tensor's name, dtype and shape, and converts this rank's slices
 * into the backend's weight format. */
uc_status uc_model_create(struct uc_model **out, const struct uc_model_params *p);
void uc_model_destroy(struct uc_model *m);
const struct uc_model_config *uc_model_cfg(const struct uc_model *m);
const struct uc_model_shard *uc_model_shard(const struct uc_model *m);
/* Bytes of weights this rank holds (its slices plus the replicated tensors). */
size_t uc_model_weight_bytes(const struct uc_model *m);
/* Hash of config plus every tensor's name, dtype, shape and first bytes: equal on every rank
 * that loaded the same checkpoint. */
uint64_t uc_model_hash(const struct uc_model *m);
/* Where the first NaN or Inf weight was seen at load ("layer 3"), or NULL when all are finite. */
const char *uc_model_nonfinite_weights(const struct uc_model *m);

/* Scratch for up to max_tok rows. */
struct uc_model_ws {
    int64_t max_tok;
    int64_t max_logit_rows; /* rows uc_model_logits takes at once */
    void *xn;   /* (T, C) */
    void *tmp;  /* (T, C) */
    void *att;  /* (T, H_local D) */
    void *gu;   /* (T, 2 F_local) */
    void *act;  /* (T, F_local) */
    void *logits; /* (T, V_local) */
    float *logits_host;  /* (T, V_pad) */
    float *gather_host;  /* (R, T, V_pad) */
};
uc_status uc_model_ws_init(struct uc_model *m, struct uc_model_ws *ws, int64_t max_tok,
                           int64_t max_logit_rows);
void uc_model_ws_fini(struct uc_model *m, struct uc_model_ws *ws);

/* x (T, C) = embedding of ids. */
/* out (D, C) float32 = the rows of local KV head j's key (which 0) or value (1) projection in
 * layer l's fused QKV weight, as the backend holds them. */
uc_status uc_model_kv_proj_f32(struct uc_model *m, int64_t layer, int which, int64_t j,
                               float *out);
uc_status uc_model_embed(struct uc_model *m, void *x, const int32_t *ids, int64_t n_tok);
/* qkv (T, qkv_dim, row stride ld) = RoPE(norm(x) Wqkv^T + b) for the rows' positions. */
uc_status uc_model_qkv(struct uc_model *m, struct uc_model_ws *ws, int64_t layer, void *qkv,
                       int64_t ld, const void *x, const int32_t *pos, int64_t n_tok);
/* The pieces of uc_model_qkv, for the decode step: ws->xn = attention norm of x; qkv (T,
 * qkv_dim) = ws->xn Wqkv^T + b (no RoPE). */
uc_status uc_model_attn_norm(struct uc_model *m, struct uc_model_ws *ws, int64_t layer,
                             const void *x, int64_t n_tok);
uc_status uc_model_qkv_proj(struct uc_model *m, struct uc_model_ws *ws, int64_t layer, void *qkv,
                            int64_t n_tok);
/* x += AllReduce(att Wo^T); x += AllReduce(SwiGLU MLP(norm(x))). att in ws->att. */
uc_status uc_model_finish_layer(struct uc_model *m, struct uc_model_ws *ws, int64_t layer, void *x,
                                int64_t n_tok);
/* The same, and below the last layer also ws->xn = the next layer's attention norm of the new
 * x, fused with the last residual add (the decode step then calls uc_model_qkv_proj). */
uc_status uc_model_finish_layer_norm_next(struct uc_model *m, struct uc_model_ws *ws,
                                          int64_t layer, void *x, int64_t n_tok);
/* Logits of rows x (T <= max_logit_rows, C): the full vocabulary on every rank, host (T, V). */
uc_status uc_model_logits(struct uc_model *m, struct uc_model_ws *ws, float *out, const void *x,
                          int64_t n_tok);
/* Runs layer 0's four products (and the LM head up to max_logit_rows) once at every row count
 * from 1 to ws->max_logit_rows (the decode batches), then at twice that and every doubling up to
 * max_rows (clipped to ws->max_tok): a backend that loads its kernels and picks their shapes
 * on first use (cuBLAS) does it here, not in a request's step. Rank-local (no collective); the
 * outputs are scratch. */
uc_status uc_model_warm_products(struct uc_model *m, struct uc_model_ws *ws, int64_t max_rows);
/* Greedy tokens of rows x (T <= max_logit_rows) without bringing logits to the host: the argmax
 * runs on the backend. One rank only (with R > 1 use uc_model_logits). */
uc_status uc_model_argmax(struct uc_model *m, struct uc_model_ws *ws, int32_t *out, const void *x,
                          int64_t n_tok);
/* The same with the tokens left in backend memory (dev_out, T int32s, -1 for a non-finite row),
 * and the embedding of such tokens (a row of zeros for -1): a decode step fed by the one before
 * it without the host in between. Both need the backend's argmax_keep and embed_ids. */
uc_status uc_model_argmax_keep(struct uc_model *m, struct uc_model_ws *ws, int32_t *dev_out,
                               const void *x, int64_t n_tok);
uc_status uc_model_embed_kept(struct uc_model *m, void *x, const int32_t *dev_ids, int64_t n_tok);

#ifdef __cplusplus
}
#endif
#endif
