/* Compression policies (UNCOMP.md section 8) behind one parameter struct, and the plan a
 * sequence is compressed with: per (layer, KV head) budgets and head groups, and the hidden-state
 * stages. Every policy gets the same mean budget B per KV head per layer (window included). */
#ifndef UC_COMPRESS_POLICY_H
#define UC_COMPRESS_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

enum uc_policy {
    UC_POLICY_FULL = 0,
    UC_POLICY_STREAMINGLLM = 1,
    UC_POLICY_SNAPKV = 2,
    UC_POLICY_PYRAMIDKV = 3,
    UC_POLICY_H2O = 4,
    UC_POLICY_UNCOMP = 5,
    UC_POLICY_UNCOMP_STAGE = 6,
    UC_POLICY_COUNT = 7,
};

enum uc_decode_mode {
    UC_DECODE_APPEND = 0,
    UC_DECODE_EVICT = 1,
};

enum uc_grouping {
    UC_GROUPING_PROFILE = 0,
    UC_GROUPING_PROMPT = 1,
};

#define UC_MAX_STAGES 16
#define UC_MAX_HEAD_GROUPS 16
#define UC_MAX_SHARE_PAIRS 64

/* Stages that compose with a token policy ("snapkv+kvsharer"): bits of
 * uc_compress_params.stages. The names and what each may not be combined with are one table in
 * policy.c. */
enum uc_stage_flag {
    UC_STAGE_KVSHARER = 1u << 0, /* KVSharer: a later layer reads an earlier layer's KV cache */
    UC_STAGE_THINK = 1u << 1,    /* ThinK: each KV head keeps only its best key channels */
    UC_STAGE_MINICACHE = 1u << 2, /* MiniCache: adjacent layer pairs share merged K/V directions */
    UC_STAGE_LORC = 1u << 3,     /* LoRC: K and V cached as low-rank latents (lorc.h) */
};

/* KVSharer: layer dst holds no KV of its own and attends over layer src's cache (src < dst). */
struct uc_share_pair {
    int16_t src;
    int16_t dst;
};

/* (plain values; copied into step descriptors, so no pointers) */
struct uc_compress_params {
    enum uc_policy policy;
    int32_t kv_budget;   /* B: mean tokens kept per KV head per layer, window included */
    int32_t window;      /* W, default 8 */
    int32_t pool_kernel; /* default 7 */
    int32_t sink_tokens; /* streamingllm sinks, default 4 */
    int32_t head_groups; /* m, default 2 */
    float spread;        /* s, default 1/3 */
    float r_min;         /* smallest stage's share of the prompt rows */
    int32_t entropy_k;   /* 0 = max(1, d / 4) */
    enum uc_decode_mode decode_mode;
    enum uc_grouping grouping;
    /* Stage boundaries for uncomp-stage: when n_stage_starts > 0 these first layers of stages
     * 1.. override the profile's. */
    int32_t n_stage_starts;
    int32_t stage_starts[UC_MAX_STAGES];
    /* Row score for stage pruning: 0 = attention of the last W rows summed over heads at the
     * layer before the boundary (UNCOMP.md section 6). */
    int32_t row_score;
    uint32_t stages;     /* enum uc_stage_flag bits */
    /* With UC_STAGE_KVSHARER: explicit layer pairs (calibration tries them); 0 = the
     * calibrated profile's pairs. */
    int32_t n_share;
    struct uc_share_pair share[UC_MAX_SHARE_PAIRS];
    /* With UC_STAGE_THINK: share of each KV head's key channels pruned (lambda); 0 = the
     * paper's default, UC_THINK_DEFAULT_RATIO (uc_policy_think_ratio). */
    float think_ratio;
    /* With UC_STAGE_MINICACHE (compress/minicache.h): the first merged layer (0: L / 2), the
     * SLERP parameter t (0: 0.6) and the share of common tokens kept unmerged (0: 0.05; a
     * negative value: none). */
    int32_t minicache_start;
    float minicache_t;
    float minicache_gamma;
    /* With UC_STAGE_LORC: mean share of the key and value dimensions kept (rho, in (0, 1]); 0 =
     * UC_LORC_DEFAULT_RATIO (uc_policy_lorc_ratio). */
    float lorc_ratio;
};

enum uc_row_score {
    UC_ROW_SCORE_SUM = 0,       /* sum over heads and window rows of layer l-1 (the paper) */
    UC_ROW_SCORE_MAX = 1,       /* max over heads of the window-summed probabilities, layer l-1 */
    UC_ROW_SCORE_ACCUM = 2,     /* the paper's score summed over every layer before l */
    UC_ROW_SCORE_ACCUM_MAX = 3, /* max over heads and over every layer before l */
    UC_ROW_SCORE_COUNT = 4,
};
const char *uc_row_score_name(enum uc_row_score r);
bool uc_row_score_parse(const char *name, enum uc_row_score *out);

struct uc_compress_params uc_compress_default_params(void);
const char *uc_policy_name(enum uc_policy p);
bool uc_policy_parse(const char *name, enum uc_policy *out);
const char *uc_decode_mode_name(enum uc_decode_mode m);
bool uc_decode_mode_parse(const char *name, enum uc_decode_mode *out);
const char *uc_grouping_name(enum uc_grouping g);
bool uc_grouping_parse(const char *name, enum uc_grouping *out);
/* Parses a policy spec: a token policy, stages, or both joined by '+' ("snapkv+kvsharer",
 * "uncomp+kvsharer"; "kvsharer" alone is full + kvsharer). Sets p->policy and p->stages (and
 * nothing else). On failure writes a message naming the bad part into msg. */
uc_status uc_policy_spec_parse(const char *spec, struct uc_compress_params *p, char *msg,
                               size_t msg_size);
/* Writes the spec of p's policy and stages ("snapkv+kvsharer", "kvsharer" for full + kvsharer)
 * into buf; returns what snprintf returns. */
int uc_policy_spec_name(const struct uc_compress_params *p, char *buf, size_t size);
/* ThinK's share of key channels pruned for p: 0 without the think stage. */
float uc_policy_think_ratio(const struct uc_compress_params *p);
/* MiniCache's parameters for p with the defaults filled in (uc_policy_minicache: the stage). */
static inline bool uc_policy_minicache(const struct uc_compress_params *p)
{
    return (p->stages & UC_STAGE_MINICACHE) != 0;
}
float uc_policy_minicache_t(const struct uc_compress_params *p);
float uc_policy_minicache_gamma(const struct uc_compress_params *p);
/* LoRC's kept share for p: 0 without the lorc stage. */
float uc_policy_lorc_ratio(const struct uc_compress_params *p);
/* Whether p shares layers' KV caches (KVSharer). */
static inline bool uc_policy_kvsharer(const struct uc_compress_params *p)
{
    return (p->stages & UC_STAGE_KVSHARER) != 0;
}
/* Checks a KVSharer pair list against L layers: 0 <= src < dst < L, each layer the target of
 * one pair at most, and no target also a source (no chains). Writes the reason into msg. */
uc_status uc_share_pairs_validate(const struct uc_share_pair *pairs, int32_t n, int64_t n_layers,
                                  char *msg, size_t msg_size);
/* src_of[l] (L) = the layer whose KV cache layer l reads: l itself, or its pair's source. */
void uc_share_map(int16_t *src_of, int64_t n_layers, const struct uc_share_pair *pairs,
                  int32_t n);
/* Checks every field; on failure writes a message naming the field into msg. */
uc_status uc_compress_params_validate(const struct uc_compress_params *p, int64_t n_layers,
                                      char *msg, size_t msg_size);
/* Whether the policy keeps fewer tokens than the prompt at all (false for full). */
bool uc_policy_compresses(enum uc_policy p);
bool uc_policy_uses_entropy(enum uc_policy p);
/* What a policy's kept tokens are chosen by: nothing (position: full, streamingllm), the
 * attention of the prompt's last `window` queries (snapkv, pyramidkv, uncomp, uncomp-stage), or
 * every query's attention summed over the prompt (h2o). */
enum uc_policy_scores {
    UC_SCORES_NONE = 0,
    UC_SCORES_WINDOW = 1,
    UC_SCORES_COLSUM = 2,
};
enum uc_policy_scores uc_policy_scores(enum uc_policy p);
bool uc_policy_uses_window(enum uc_policy p); /* scores == UC_SCORES_WINDOW */
/* Whether the policy cuts hidden-state rows at stage boundaries (uncomp-stage). */
bool uc_policy_cuts_rows(enum uc_policy p);

/* Head groups: m groups of (nearly) equal size, lowest entropy first; stable sort by value with
 * ties broken by head index. groups[j] in [0, m). */
void uc_group_heads(int32_t *groups, const double *entropy, int64_t n_heads, int32_t m);
/* B_g = round_half_up(B * (1 - s + 2 s g / (m - 1))) (B when m == 1). */
int32_t uc_group_budget(int32_t budget, int32_t g, int32_t m, float spread);
/* The r-th largest (r = 0: the largest) of the n_heads budgets that uc_group_heads and
 * uc_group_budget give a layer, whatever the entropies: the group sizes are fixed, only which
 * head falls in which group depends on them. */
int32_t uc_group_budget_nth(int32_t budget, int64_t n_heads, int32_t m, float spread, int64_t r);
/* pyramidkv: B_l = round_half_up(1.5 B - B l / (L - 1)). */
int32_t uc_pyramid_budget(int32_t budget, int64_t layer, int64_t n_layers);

/* Stage boundaries from per-layer scores s_l (x100 entropies): a new stage starts at l when
 * s_l - s_{l-1} < -eps. Writes at most max_out layer indices, returns how many. */
int32_t uc_stage_starts_from_scores(int32_t *starts, int32_t max_out, const double *scores,
                                    int64_t n_layers, double eps);
/* Rows kept by stage c of C for a prompt of n0 tokens: ceil(n0 (1 - (1 - r_min) c / (C - 1))),
 * at least min_rows, at most n0. */
int64_t uc_stage_rows(int64_t n0, int32_t c, int32_t n_stages, float r_min, int64_t min_rows);

/* The plan one sequence is compressed with. Identical on every rank. */
struct uc_plan {
    int64_t n_layers;        /* L */
    int64_t n_heads_kv;      /* Hkv (whole model) */
    int32_t *budget;         /* (L, Hkv): tokens each KV head keeps at the end of prefill */
    int32_t *group;          /* (L, Hkv): head group, -1 where the policy has none */
    double *entropy;         /* (L, Hkv): KV-head entropies used for grouping (NaN if none) */
    int32_t n_stage_starts;  /* uncomp-stage only */
    int32_t stage_starts[UC_MAX_STAGES];
    int64_t stage_rows[UC_MAX_STAGES + 1]; /* rows present in stage c */
    int16_t *share_src;      /* (L): the layer whose KV cache layer l reads (l: its own) */
};

uc_status uc_plan_init(struct uc_plan *plan, int64_t n_layers, int64_t n_heads_kv);
void uc_plan_fini(struct uc_plan *plan);
/* FNV-1a over budgets, groups, stages and shared layers (not entropies, which differ in the last bits). */
uint64_t uc_plan_checksum(const struct uc_plan *plan);
/* Fills the budgets of one layer for a policy. `kv_entropy` (Hkv) is needed for uncomp*. */
void uc_plan_set_layer(struct uc_plan *plan, const struct uc_compress_params *p, int64_t layer,
                       const double *kv_entropy);

#ifdef __cplusplus
}
#endif
#endif
