/* The calibration profile (UNCOMP.md section 3): per-layer hidden-state entropies and the stage
 * boundaries they imply, per-layer query-head and KV-head entropies and the head groups. A
 * readable JSON file, built by a calibration run and loaded by grouping=profile. */
#ifndef UC_COMPRESS_PROFILE_H
#define UC_COMPRESS_PROFILE_H

#include <stdbool.h>
#include <stdint.h>

#include "base/status.h"
#include "compress/minicache.h"
#include "compress/policy.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_profile {
    int64_t n_layers;        /* L */
    int64_t n_heads;         /* H */
    int64_t n_heads_kv;      /* Hkv */
    int64_t head_dim;        /* D */
    int64_t hidden;          /* C */
    int32_t entropy_k_head;  /* truncation used for heads */
    int32_t entropy_k_hidden;
    double *layer_entropy;   /* (L): normalised truncated entropy of each layer's input */
    double *head_entropy;    /* (L, H) */
    double *kv_entropy;      /* (L, Hkv): mean of the KV head's query heads */
    int32_t *kv_group;       /* (L, Hkv) */
    int32_t head_groups;     /* m */
    double stage_eps;
    int32_t n_stage_starts;
    int32_t stage_starts[UC_MAX_STAGES];
    char source[512];        /* calibration text (path or "builtin") */
    int64_t created_unix_ms;
    int64_t calib_tokens;
    int64_t calib_windows;
    uint64_t model_hash;
    /* KVSharer (kvsharer.h): the layer pairs calibration kept. has_share is false in a profile
     * calibrated without it (or written before it existed); such profiles still load. */
    bool has_share;
    int32_t n_share;
    struct uc_share_pair share[UC_MAX_SHARE_PAIRS];
    double share_threshold; /* T the pairs were checked against */
    double share_cosine;    /* last hidden states' cosine similarity with them */
    int32_t share_target;   /* shared layers searched for */
    int64_t share_tokens;   /* calibration tokens of the search */
    /* LoRC (lorc.h): each layer's sensitivity (mean over KV heads of the key and value slices'
     * log condition numbers, from the weights, agreed over ranks) and the ranks they give at
     * lorc_ratio. has_lorc is false in a profile written without it; such profiles still load. */
    bool has_lorc;
    double *lorc_log_cond;  /* (L) */
    int32_t *lorc_rank;     /* (L) at lorc_ratio */
    double lorc_ratio;
    /* MiniCache (minicache.h): the mean angular distance between adjacent layers' keys and
     * values on the calibration text (agreed over ranks), rounded to 1e-9 as the file holds it,
     * and the pairs uc_minicache_select gives for mc_n_pairs. has_minicache is false in a
     * profile written without it; such profiles still load. */
    bool has_minicache;
    double *mc_dist;        /* (L - 1): layers l and l + 1 */
    int32_t mc_n_pairs;
    int16_t mc_first[UC_MINICACHE_MAX_PAIRS]; /* each pair's first layer, ascending */
    int64_t mc_tokens;      /* calibration tokens measured */
};

uc_status uc_profile_init(struct uc_profile *p, int64_t n_layers, int64_t n_heads,
                          int64_t n_heads_kv, int64_t head_dim, int64_t hidden);
void uc_profile_fini(struct uc_profile *p);
/* From layer_entropy and head_entropy: KV-head means, m groups per layer, stage boundaries. */
void uc_profile_finish(struct uc_profile *p, int32_t head_groups, double stage_eps);
/* Records LoRC's per-layer sensitivities (L values, copied) and the ranks for ratio rho. */
uc_status uc_profile_set_lorc(struct uc_profile *p, const double *log_cond, double rho);
/* Records MiniCache's distances (L - 1 values, copied after rounding to 1e-9, so the file
 * reproduces them exactly) and the n_pairs pairs uc_minicache_select gives for them; tokens is
 * what they were measured on. UC_ERR_INVALID_ARG (the selection's), UC_ERR_NOMEM; on failure
 * the profile's previous record stays. */
uc_status uc_profile_set_minicache(struct uc_profile *p, const double *dist, int32_t n_pairs,
                                   int64_t tokens);
/* Serialises to pretty JSON (uc_malloc'd). */
char *uc_profile_to_json(const struct uc_profile *p);
uc_status uc_profile_save(const struct uc_profile *p, const char *path);
/* Loads a profile and checks its shapes against the model (UC_ERR_FORMAT naming the field when
 * they differ). `p` must be zeroed or finished. */
uc_status uc_profile_load(struct uc_profile *p, const char *path, int64_t n_layers,
                          int64_t n_heads, int64_t n_heads_kv);
uc_status uc_profile_parse(struct uc_profile *p, const char *json, const char *path,
                           int64_t n_layers, int64_t n_heads, int64_t n_heads_kv);

#ifdef __cplusplus
}
#endif
#endif
