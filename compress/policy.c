/* Policy names and validation, head grouping, budgets and stage sizes: the arithmetic of
 * UNCOMP.md sections 3-4 and 8, with half-up rounding everywhere. */
#include "compress/policy.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "compress/minicache.h"
#include "compress/lorc.h"
#include "compress/think.h"

/* What each token policy is made of; the engine asks these rather than naming policies. */
static const struct policy_desc {
    const char *name;
    enum uc_policy_scores scores; /* what its kept tokens are chosen by */
    bool entropy;                 /* head groups by matrix entropy (UNCOMP.md section 3) */
    bool stages;                  /* hidden-state rows cut at stage boundaries */
} policy_table[UC_POLICY_COUNT] = {
    [UC_POLICY_FULL] = {"full", UC_SCORES_NONE, false, false},
    [UC_POLICY_STREAMINGLLM] = {"streamingllm", UC_SCORES_NONE, false, false},
    [UC_POLICY_SNAPKV] = {"snapkv", UC_SCORES_WINDOW, false, false},
    [UC_POLICY_PYRAMIDKV] = {"pyramidkv", UC_SCORES_WINDOW, false, false},
    [UC_POLICY_H2O] = {"h2o", UC_SCORES_COLSUM, false, false},
    [UC_POLICY_UNCOMP] = {"uncomp", UC_SCORES_WINDOW, true, false},
    [UC_POLICY_UNCOMP_STAGE] = {"uncomp-stage", UC_SCORES_WINDOW, true, true},
};

/* The stages a policy spec may add after '+', and the token policies each cannot run beside. */
static const struct stage_desc {
    const char *name;
    uint32_t flag;
    uint32_t bad_policies; /* bits 1 << enum uc_policy */
    const char *why;       /* said when combined with one of them */
} stage_table[] = {
    {"kvsharer", UC_STAGE_KVSHARER, 1u << UC_POLICY_UNCOMP_STAGE,
     "a shared layer reads its source layer's keys for every prompt row, and uncomp-stage drops "
     "rows between layers"},
    {"think", UC_STAGE_THINK, 0, ""},
    {"minicache", UC_STAGE_MINICACHE, 1u << UC_POLICY_UNCOMP_STAGE,
     "a merged pair needs both layers' rows of every token, and uncomp-stage drops rows between "
     "layers"},
    {"lorc", UC_STAGE_LORC, 0, ""},
};
#define N_STAGES ((int)(sizeof stage_table / sizeof stage_table[0]))

struct uc_compress_params uc_compress_default_params(void)
{
    struct uc_compress_params p = {
        .policy = UC_POLICY_FULL,
        .kv_budget = 128,
        .window = 8,
        .pool_kernel = 7,
        .sink_tokens = 4,
        .head_groups = 2,
        .spread = 1.0f / 3.0f,
        .r_min = 0.375f,
        .entropy_k = 0,
        .decode_mode = UC_DECODE_APPEND,
        .grouping = UC_GROUPING_PROFILE,
        .n_stage_starts = 0,
        /* the max over heads and over every layer before the boundary: the study of
         * docs/UNCOMP.md section 5 shows it keeps the needle rows the paper's sum loses */
        .row_score = UC_ROW_SCORE_ACCUM_MAX,
        .think_ratio = 0.0f,
    };
    return p;
}

const char *uc_policy_name(enum uc_policy p)
{
    return (p >= 0 && p < UC_POLICY_COUNT) ? policy_table[p].name : "?";
}

bool uc_policy_parse(const char *name, enum uc_policy *out)
{
    for (int i = 0; i < UC_POLICY_COUNT; i++) {
        if (strcmp(name, policy_table[i].name) == 0) {
            *out = (enum uc_policy)i;
            return true;
        }
    }
    return false;
}

uc_status uc_policy_spec_parse(const char *spec, struct uc_compress_params *p, char *msg,
                               size_t msg_size)
{
    char names[256];
    int o = 0;
    for (int i = 0; i < UC_POLICY_COUNT; i++) {
        o += snprintf(names + o, sizeof names - (size_t)o, "%s%s", i ? ", " : "", policy_table[i].name);
    }
    for (int i = 0; i < N_STAGES && o < (int)sizeof names; i++) {
        o += snprintf(names + o, sizeof names - (size_t)o, "%s+%s", i ? ", " : "; stages: ",
                      stage_table[i].name);
    }
    size_t len = spec ? strlen(spec) : 0;
    if (len == 0 || len > 200) {
        snprintf(msg, msg_size, "policy: '%.200s' is not a policy (policies: %s)", spec ? spec : "",
                 names);
        return UC_ERR_INVALID_ARG;
    }
    bool have_base = false;
    enum uc_policy base = UC_POLICY_FULL;
    uint32_t stages = 0;
    const char *t = spec;
    while (t) {
        const char *plus = strchr(t, '+');
        size_t n = plus ? (size_t)(plus - t) : strlen(t);
        char tok[64];
        if (n == 0 || n >= sizeof tok) {
            snprintf(msg, msg_size, "policy: '%s' has an empty or overlong part", spec);
            return UC_ERR_INVALID_ARG;
        }
        memcpy(tok, t, n);
        tok[n] = '\0';
        enum uc_policy pol;
        int st = -1;
        for (int i = 0; i < N_STAGES; i++) {
            if (strcmp(tok, stage_table[i].name) == 0) {
                st = i;
            }
        }
        if (st >= 0) {
            if (stages & stage_table[st].flag) {
                snprintf(msg, msg_size, "policy: '%s' names %s twice", spec, tok);
                return UC_ERR_INVALID_ARG;
            }
            stages |= stage_table[st].flag;
        } else if (uc_policy_parse(tok, &pol)) {
            if (have_base || stages) {
                snprintf(msg, msg_size, "policy: '%s': the token policy (%s) must come first and "
                         "only once, stages after it", spec, tok);
                return UC_ERR_INVALID_ARG;
            }
            have_base = true;
            base = pol;
        } else {
            snprintf(msg, msg_size, "policy: unknown policy or stage '%s' in '%s' (policies: %s)",
                     tok, spec, names);
            return UC_ERR_INVALID_ARG;
        }
        t = plus ? plus + 1 : NULL;
    }
    for (int i = 0; i < N_STAGES; i++) {
        if ((stages & stage_table[i].flag) && (stage_table[i].bad_policies & (1u << base))) {
            snprintf(msg, msg_size, "policy: '%s': %s does not combine with %s (%s)", spec,
                     stage_table[i].name, policy_table[base].name, stage_table[i].why);
            return UC_ERR_INVALID_ARG;
        }
    }
    p->policy = base;
    p->stages = stages;
    return UC_OK;
}

int uc_policy_spec_name(const struct uc_compress_params *p, char *buf, size_t size)
{
    bool bare = p->policy == UC_POLICY_FULL && p->stages != 0;
    int o = bare ? snprintf(buf, size, "%s", "") : snprintf(buf, size, "%s", uc_policy_name(p->policy));
    for (int i = 0; i < N_STAGES; i++) {
        if ((p->stages & stage_table[i].flag) && o >= 0 && (size_t)o < size) {
            o += snprintf(buf + o, size - (size_t)o, "%s%s", o ? "+" : "", stage_table[i].name);
        }
    }
    return o;
}

float uc_policy_think_ratio(const struct uc_compress_params *p)
{
    if (!(p->stages & UC_STAGE_THINK)) {
        return 0.0f;
    }
    return p->think_ratio > 0.0f ? p->think_ratio : UC_THINK_DEFAULT_RATIO;
}

float uc_policy_minicache_t(const struct uc_compress_params *p)
{
    return p->minicache_t > 0.0f ? p->minicache_t : UC_MINICACHE_DEFAULT_T;
}

float uc_policy_minicache_gamma(const struct uc_compress_params *p)
{
    if (p->minicache_gamma < 0.0f) {
        return 0.0f;
    }
    return p->minicache_gamma > 0.0f ? p->minicache_gamma : UC_MINICACHE_DEFAULT_GAMMA;
}

float uc_policy_lorc_ratio(const struct uc_compress_params *p)
{
    if (!(p->stages & UC_STAGE_LORC)) {
        return 0.0f;
    }
    return p->lorc_ratio > 0.0f ? p->lorc_ratio : UC_LORC_DEFAULT_RATIO;
}

uc_status uc_share_pairs_validate(const struct uc_share_pair *pairs, int32_t n, int64_t n_layers,
                                  char *msg, size_t msg_size)
{
    if (n < 0 || n > UC_MAX_SHARE_PAIRS) {
        snprintf(msg, msg_size, "kvsharer: %d layer pairs (at most %d)", n, UC_MAX_SHARE_PAIRS);
        return UC_ERR_INVALID_ARG;
    }
    for (int32_t i = 0; i < n; i++) {
        int64_t a = pairs[i].src, b = pairs[i].dst;
        if (a < 0 || a >= b || b >= n_layers) {
            snprintf(msg, msg_size, "kvsharer: pair %d (%lld -> %lld) must have 0 <= source < "
                     "target < %lld", i, (long long)a, (long long)b, (long long)n_layers);
            return UC_ERR_INVALID_ARG;
        }
        for (int32_t k = 0; k < n; k++) {
            if (k != i && pairs[k].dst == b) {
                snprintf(msg, msg_size, "kvsharer: layer %lld is the target of two pairs",
                         (long long)b);
                return UC_ERR_INVALID_ARG;
            }
            if (pairs[k].dst == a) {
                snprintf(msg, msg_size, "kvsharer: layer %lld is both a source and a target",
                         (long long)a);
                return UC_ERR_INVALID_ARG;
            }
        }
    }
    return UC_OK;
}

void uc_share_map(int16_t *src_of, int64_t n_layers, const struct uc_share_pair *pairs,
                  int32_t n)
{
    for (int64_t l = 0; l < n_layers; l++) {
        src_of[l] = (int16_t)l;
    }
    for (int32_t i = 0; i < n; i++) {
        if (pairs[i].dst >= 0 && pairs[i].dst < n_layers) {
            src_of[pairs[i].dst] = pairs[i].src;
        }
    }
}

const char *uc_decode_mode_name(enum uc_decode_mode m)
{
    return m == UC_DECODE_EVICT ? "evict" : "append";
}

bool uc_decode_mode_parse(const char *name, enum uc_decode_mode *out)
{
    if (strcmp(name, "append") == 0) {
        *out = UC_DECODE_APPEND;
    } else if (strcmp(name, "evict") == 0) {
        *out = UC_DECODE_EVICT;
    } else {
        return false;
    }
    return true;
}

const char *uc_grouping_name(enum uc_grouping g)
{
    return g == UC_GROUPING_PROMPT ? "prompt" : "profile";
}

bool uc_grouping_parse(const char *name, enum uc_grouping *out)
{
    if (strcmp(name, "profile") == 0) {
        *out = UC_GROUPING_PROFILE;
    } else if (strcmp(name, "prompt") == 0) {
        *out = UC_GROUPING_PROMPT;
    } else {
        return false;
    }
    return true;
}

static const char *row_score_names[UC_ROW_SCORE_COUNT] = {"sum", "max", "accum", "accum-max"};

const char *uc_row_score_name(enum uc_row_score r)
{
    return (r >= 0 && r < UC_ROW_SCORE_COUNT) ? row_score_names[r] : "?";
}

bool uc_row_score_parse(const char *name, enum uc_row_score *out)
{
    for (int i = 0; i < UC_ROW_SCORE_COUNT; i++) {
        if (strcmp(name, row_score_names[i]) == 0) {
            *out = (enum uc_row_score)i;
            return true;
        }
    }
    return false;
}

bool uc_policy_compresses(enum uc_policy p) { return p != UC_POLICY_FULL; }

bool uc_policy_uses_entropy(enum uc_policy p)
{
    return p >= 0 && p < UC_POLICY_COUNT && policy_table[p].entropy;
}

enum uc_policy_scores uc_policy_scores(enum uc_policy p)
{
    return p >= 0 && p < UC_POLICY_COUNT ? policy_table[p].scores : UC_SCORES_NONE;
}

bool uc_policy_uses_window(enum uc_policy p) { return uc_policy_scores(p) == UC_SCORES_WINDOW; }

bool uc_policy_cuts_rows(enum uc_policy p)
{
    return p >= 0 && p < UC_POLICY_COUNT && policy_table[p].stages;
}

uc_status uc_compress_params_validate(const struct uc_compress_params *p, int64_t n_layers,
                                      char *msg, size_t msg_size)
{
#define BAD(...)                                                                                   \
    do {                                                                                           \
        snprintf(msg, msg_size, __VA_ARGS__);                                                      \
        return UC_ERR_INVALID_ARG;                                                                 \
    } while (0)
    if (p->policy < 0 || p->policy >= UC_POLICY_COUNT) {
        BAD("compression.policy: unknown policy");
    }
    if (p->window < 1 || p->window > 64) {
        BAD("compression.window=%d must be in [1, 64]", p->window);
    }
    if (p->pool_kernel < 1 || p->pool_kernel > 63 || p->pool_kernel % 2 == 0) {
        BAD("compression.pool_kernel=%d must be odd, in [1, 63]", p->pool_kernel);
    }
    if (p->head_groups < 1 || p->head_groups > UC_MAX_HEAD_GROUPS) {
        BAD("compression.head_groups=%d must be in [1, %d]", p->head_groups, UC_MAX_HEAD_GROUPS);
    }
    if (!(p->spread >= 0.0f && p->spread < 1.0f)) {
        BAD("compression.spread=%g must be in [0, 1)", (double)p->spread);
    }
    if (!(p->r_min > 0.0f && p->r_min <= 1.0f)) {
        BAD("compression.r_min=%g must be in (0, 1]", (double)p->r_min);
    }
    if (p->entropy_k < 0) {
        BAD("compression.entropy_k=%d must be >= 0", p->entropy_k);
    }
    if (p->decode_mode != UC_DECODE_APPEND && p->decode_mode != UC_DECODE_EVICT) {
        BAD("compression.decode_mode: must be append or evict");
    }
    if (p->grouping != UC_GROUPING_PROFILE && p->grouping != UC_GROUPING_PROMPT) {
        BAD("compression.grouping: must be profile or prompt");
    }
    if (p->row_score < 0 || p->row_score >= UC_ROW_SCORE_COUNT) {
        BAD("compression.row_score: must be sum, max, accum or accum-max");
    }
    /* before sink_tokens + 1 below: checked ranges first, then arithmetic */
    if (p->sink_tokens < 0 || p->sink_tokens > 1024) {
        BAD("compression.sink_tokens=%d must be in [0, 1024]", p->sink_tokens);
    }
    if (p->policy != UC_POLICY_FULL) {
        int32_t min_budget = p->policy == UC_POLICY_STREAMINGLLM ? p->sink_tokens + 1 : p->window + 1;
        if (p->kv_budget < min_budget) {
            BAD("compression.kv_budget=%d must be at least %d for policy %s", p->kv_budget,
                min_budget, uc_policy_name(p->policy));
        }
        if (p->kv_budget > (1 << 24)) {
            BAD("compression.kv_budget=%d is too large", p->kv_budget);
        }
    }
    uint32_t known = 0;
    for (int i = 0; i < N_STAGES; i++) {
        known |= stage_table[i].flag;
        if ((p->stages & stage_table[i].flag) && (stage_table[i].bad_policies & (1u << p->policy))) {
            BAD("compression.policy: %s does not combine with %s (%s)", stage_table[i].name,
                uc_policy_name(p->policy), stage_table[i].why);
        }
    }
    if (p->stages & ~known) {
        BAD("compression.stages: unknown stage bits 0x%x", (unsigned)(p->stages & ~known));
    }
    if (uc_policy_kvsharer(p)) {
        if (p->decode_mode == UC_DECODE_EVICT && p->policy != UC_POLICY_FULL) {
            BAD("compression.decode_mode=evict does not combine with kvsharer (a shared layer "
                "reads its source's cache, which eviction rewrites mid-step)");
        }
        uc_status src = uc_share_pairs_validate(p->share, p->n_share, n_layers, msg, msg_size);
        if (src != UC_OK) {
            return src;
        }
    } else if (p->n_share != 0) {
        BAD("compression: %d kvsharer layer pairs given without the kvsharer stage", p->n_share);
    }
    if (!(p->think_ratio >= 0.0f && p->think_ratio < 1.0f)) {
        BAD("compression.think_ratio=%g must be in [0, 1)", (double)p->think_ratio);
    }
    if ((p->stages & UC_STAGE_THINK) && uc_policy_kvsharer(p)) {
        BAD("compression.policy: think does not combine with kvsharer yet (a shared layer would "
            "read its source layer's pruned keys with its own queries)");
    }
    if (!(p->minicache_t >= 0.0f && p->minicache_t <= 1.0f)) {
        BAD("compression.minicache_t=%g must be in [0, 1]", (double)p->minicache_t);
    }
    if (!(p->minicache_gamma >= -1.0f && p->minicache_gamma <= 1.0f)) {
        BAD("compression.minicache_gamma=%g must be in [0, 1] (negative: none retained)",
            (double)p->minicache_gamma);
    }
    if (p->minicache_start < 0 || p->minicache_start >= n_layers) {
        BAD("compression.minicache_start=%d must be in [0, %lld) (0: half the layers)",
            p->minicache_start, (long long)n_layers);
    }
    if (uc_policy_minicache(p)) {
        if (uc_minicache_start(p->minicache_start, n_layers) + 1 >= n_layers) {
            BAD("compression.minicache_start=%d leaves no pair of layers to merge (L=%lld)",
                p->minicache_start, (long long)n_layers);
        }
        if (p->stages & (UC_STAGE_KVSHARER | UC_STAGE_THINK)) {
            BAD("compression.policy: minicache does not combine with kvsharer or think yet (a "
                "merged row holds both layers' whole key and value directions)");
        }
        if (p->decode_mode == UC_DECODE_EVICT && p->policy != UC_POLICY_FULL) {
            BAD("compression.decode_mode=evict does not combine with minicache (merged rows "
                "are shared by two layers, which would evict different tokens)");
        }
    }
    if (!(p->lorc_ratio >= 0.0f && p->lorc_ratio <= 1.0f)) {
        BAD("compression.lorc_ratio=%g must be in (0, 1] (0: the default %g)",
            (double)p->lorc_ratio, (double)UC_LORC_DEFAULT_RATIO);
    }
    if (p->stages & UC_STAGE_LORC) {
        if (p->stages & (UC_STAGE_THINK | UC_STAGE_KVSHARER | UC_STAGE_MINICACHE)) {
            BAD("compression.policy: lorc does not combine with think, kvsharer or minicache (a "
                "latent head stores neither pruned key channels, nor another layer's cache, nor "
                "merged rows)");
        }
        if (p->decode_mode == UC_DECODE_EVICT && p->policy != UC_POLICY_FULL) {
            BAD("compression.decode_mode=evict does not combine with lorc (latent rows are not "
                "moved by eviction yet)");
        }
    }
    if (p->n_stage_starts < 0 || p->n_stage_starts > UC_MAX_STAGES - 1) {
        BAD("compression.stage_starts: at most %d boundaries", UC_MAX_STAGES - 1);
    }
    for (int i = 0; i < p->n_stage_starts; i++) {
        int32_t s = p->stage_starts[i];
        if (s < 1 || s >= n_layers || (i > 0 && s <= p->stage_starts[i - 1])) {
            BAD("compression.stage_starts: %d must be increasing layers in [1, %lld)", s,
                (long long)n_layers);
        }
    }
    return UC_OK;
#undef BAD
}

struct ent_idx {
    double v;
    int64_t i;
};

static int cmp_ent(const void *a, const void *b)
{
    const struct ent_idx *x = a, *y = b;
    if (x->v != y->v) {
        return x->v < y->v ? -1 : 1;
    }
    return (x->i > y->i) - (x->i < y->i);
}

void uc_group_heads(int32_t *groups, const double *entropy, int64_t n_heads, int32_t m)
{
    struct ent_idx v[256];
    struct ent_idx *e = n_heads <= 256 ? v : uc_malloc((size_t)n_heads * sizeof *e);
    if (!e) {
        for (int64_t j = 0; j < n_heads; j++) {
            groups[j] = 0;
        }
        return;
    }
    for (int64_t j = 0; j < n_heads; j++) {
        e[j].v = entropy[j];
        e[j].i = j;
    }
    qsort(e, (size_t)n_heads, sizeof *e, cmp_ent);
    /* group g holds ranks [floor(n g / m), floor(n (g + 1) / m)) */
    for (int64_t r = 0; r < n_heads; r++) {
        int32_t g = 0;
        while (g + 1 < m && r >= n_heads * (g + 1) / m) {
            g++;
        }
        groups[e[r].i] = g;
    }
    if (e != v) {
        uc_free(e);
    }
}

int32_t uc_group_budget(int32_t budget, int32_t g, int32_t m, float spread)
{
    if (m <= 1) {
        return budget;
    }
    double s = spread;
    return (int32_t)uc_round_half_up((double)budget * (1.0 - s + 2.0 * s * g / (m - 1)));
}

int32_t uc_group_budget_nth(int32_t budget, int64_t n_heads, int32_t m, float spread, int64_t r)
{
    int64_t k = n_heads - 1 - r; /* its rank in entropy order, lowest first (uc_group_heads) */
    int32_t g = 0;
    while (g + 1 < m && k >= n_heads * (g + 1) / m) {
        g++;
    }
    return uc_group_budget(budget, g, m, spread);
}

int32_t uc_pyramid_budget(int32_t budget, int64_t layer, int64_t n_layers)
{
    if (n_layers <= 1) {
        return budget;
    }
    return (int32_t)uc_round_half_up(1.5 * budget - (double)budget * (double)layer /
                                                        (double)(n_layers - 1));
}

int32_t uc_stage_starts_from_scores(int32_t *starts, int32_t max_out, const double *scores,
                                    int64_t n_layers, double eps)
{
    int32_t n = 0;
    for (int64_t l = 1; l < n_layers && n < max_out; l++) {
        if (scores[l] - scores[l - 1] < -eps) {
            starts[n++] = (int32_t)l;
        }
    }
    return n;
}

int64_t uc_stage_rows(int64_t n0, int32_t c, int32_t n_stages, float r_min, int64_t min_rows)
{
    if (n_stages <= 1 || c == 0) {
        return n0;
    }
    /* r_min arrives as a float (0.3f is 0.30000001): round it to 6 decimals first, so a product
     * that is an integer in decimal is not pushed past it by the float error */
    double r = round((double)r_min * 1e6) / 1e6;
    double keep = ceil((double)n0 * (1.0 - (1.0 - r) * c / (n_stages - 1)) - 1e-9 * (double)n0);
    int64_t k = (int64_t)keep;
    if (k < min_rows) {
        k = min_rows;
    }
    return k < n0 ? k : n0;
}

uc_status uc_plan_init(struct uc_plan *plan, int64_t n_layers, int64_t n_heads_kv)
{
    memset(plan, 0, sizeof *plan);
    size_t n = (size_t)(n_layers * n_heads_kv);
    plan->budget = uc_calloc(n, sizeof *plan->budget);
    plan->group = uc_calloc(n, sizeof *plan->group);
    plan->entropy = uc_calloc(n, sizeof *plan->entropy);
    plan->share_src = uc_calloc((size_t)n_layers, sizeof *plan->share_src);
    if (!plan->budget || !plan->group || !plan->entropy || !plan->share_src) {
        uc_plan_fini(plan);
        return UC_ERRF(UC_ERR_NOMEM, "plan L=%lld Hkv=%lld", (long long)n_layers,
                       (long long)n_heads_kv);
    }
    plan->n_layers = n_layers;
    plan->n_heads_kv = n_heads_kv;
    for (size_t i = 0; i < n; i++) {
        plan->group[i] = -1;
        plan->entropy[i] = NAN;
    }
    uc_share_map(plan->share_src, n_layers, NULL, 0);
    return UC_OK;
}

void uc_plan_fini(struct uc_plan *plan)
{
    uc_free(plan->budget);
    uc_free(plan->group);
    uc_free(plan->entropy);
    uc_free(plan->share_src);
    memset(plan, 0, sizeof *plan);
}

uint64_t uc_plan_checksum(const struct uc_plan *plan)
{
    size_t n = (size_t)(plan->n_layers * plan->n_heads_kv);
    uint64_t h = UC_FNV_INIT;
    h = uc_fnv1a(h, plan->budget, n * sizeof *plan->budget);
    h = uc_fnv1a(h, plan->group, n * sizeof *plan->group);
    h = uc_fnv1a(h, &plan->n_stage_starts, sizeof plan->n_stage_starts);
    h = uc_fnv1a(h, plan->stage_starts, (size_t)plan->n_stage_starts * sizeof(int32_t));
    h = uc_fnv1a(h, plan->stage_rows, (size_t)(plan->n_stage_starts + 1) * sizeof(int64_t));
    h = uc_fnv1a(h, plan->share_src, (size_t)plan->n_layers * sizeof *plan->share_src);
    return h;
}

void uc_plan_set_layer(struct uc_plan *plan, const struct uc_compress_params *p, int64_t layer,
                       const double *kv_entropy)
{
    int64_t hkv = plan->n_heads_kv;
    int32_t *b = plan->budget + layer * hkv;
    int32_t *g = plan->group + layer * hkv;
    double *e = plan->entropy + layer * hkv;
    switch (p->policy) {
    case UC_POLICY_FULL:
        for (int64_t j = 0; j < hkv; j++) {
            b[j] = INT32_MAX;
        }
        break;
    case UC_POLICY_PYRAMIDKV: {
        int32_t bl = uc_pyramid_budget(p->kv_budget, layer, plan->n_layers);
        for (int64_t j = 0; j < hkv; j++) {
            b[j] = bl;
        }
        break;
    }
    case UC_POLICY_UNCOMP:
    case UC_POLICY_UNCOMP_STAGE:
        uc_group_heads(g, kv_entropy, hkv, p->head_groups);
        for (int64_t j = 0; j < hkv; j++) {
            e[j] = kv_entropy[j];
            b[j] = uc_group_budget(p->kv_budget, g[j], p->head_groups, p->spread);
        }
        break;
    default:
        for (int64_t j = 0; j < hkv; j++) {
            b[j] = p->kv_budget;
        }
        break;
    }
    if (plan->share_src[layer] != layer) {
        /* KVSharer: the layer reads its source's cache and holds no tokens of its own */
        for (int64_t j = 0; j < hkv; j++) {
            b[j] = 0;
        }
    }
}
