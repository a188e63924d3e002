/* Model configuration from a Hugging Face config.json (Llama, Mistral, Qwen2 families): shapes,
 * RoPE parameters (including llama3 scaling), norms, special token ids. */
#ifndef UC_SHARD_MODEL_CONFIG_H
#define UC_SHARD_MODEL_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define UC_MAX_EOS_IDS 8

enum uc_rope_kind {
    UC_ROPE_DEFAULT = 0,
    UC_ROPE_LLAMA3 = 1,
    UC_ROPE_LINEAR = 2,
};

struct uc_model_config {
    char arch[64];       /* "LlamaForCausalLM", ... */
    char model_type[32]; /* "llama", "mistral", "qwen2" */
    int64_t n_layers;    /* L */
    int64_t hidden;      /* C */
    int64_t ffn;         /* F */
    int64_t n_heads;     /* H (whole model) */
    int64_t n_heads_kv;  /* Hkv (whole model) */
    int64_t head_dim;    /* D */
    int64_t vocab;       /* V */
    int64_t max_ctx;     /* max_position_embeddings */
    double norm_eps;
    double rope_theta;
    enum uc_rope_kind rope_kind;
    double rope_factor;            /* llama3 / linear */
    double rope_low_freq_factor;   /* llama3 */
    double rope_high_freq_factor;  /* llama3 */
    double rope_orig_max_ctx;      /* llama3 original_max_position_embeddings */
    bool tie_embeddings;
    bool qkv_bias;
    bool o_bias;
    bool mlp_bias;
    int64_t sliding_window; /* 0 = none; else contexts are limited to it (max_ctx lowered) */
    int32_t bos_id;         /* -1 when absent */
    int32_t eos_ids[UC_MAX_EOS_IDS];
    int n_eos;
    char torch_dtype[16];
};

/* Parses config.json text. `path` names the file in error messages. Unsupported architectures,
 * activations or rope types are UC_ERR_UNSUPPORTED; missing or invalid fields UC_ERR_FORMAT. */
uc_status uc_model_config_parse(struct uc_model_config *cfg, const char *json_text,
                                const char *path);
/* Reads and parses DIR/config.json. */
uc_status uc_model_config_load(struct uc_model_config *cfg, const char *model_dir);
/* Shapes of well-known models for synthetic (seeded random) weights: "llama3-8b",
 * "llama3-1b", "llama3-70b", "tiny" (uncomp-tiny's shape), optionally followed by ":layers=N"
 * to keep only N layers (per-rank slices of a large model on one GPU). */
uc_status uc_model_config_synthetic(struct uc_model_config *cfg, const char *spec);
/* Whether a --model value names a synthetic model ("synthetic:SPEC"). */
bool uc_model_is_synthetic(const char *model_dir);

/* A stable hash of every field (for cross-rank agreement). */
uint64_t uc_model_config_hash(const struct uc_model_config *cfg);
/* Whether token id `id` is one of the configured end-of-sequence ids. */
bool uc_model_config_is_eos(const struct uc_model_config *cfg, int32_t id);

#ifdef __cplusplus
}
#endif
#endif
