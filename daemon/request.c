/* The generation request model both fronts share (request.h): decoding helpers, the one
 * validation, and the conversion to scheduler requests. Top to bottom: names and errors, the
 * decoded struct's lifecycle, compression, validation by part (request id, lengths, sampling,
 * stop rules, input), then the conversion. */
#include "request.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "base/mem.h"
#include "chat_template.h"
#include "tokenizer.h"

/* ---- names and errors ------------------------------------------------------------------------ */

/* gRPC names are the .proto paths; HTTP names the JSON keys (OpenAI's, vLLM's extensions, our
 * "uncomp" object). */
static const char *const grpc_names[UC_REQ_F_COUNT] = {
    [UC_REQ_F_NONE] = "",
    [UC_REQ_F_REQUEST_ID] = "request_id",
    [UC_REQ_F_INPUT] = "input",
    [UC_REQ_F_TEXT] = "text",
    [UC_REQ_F_TOKEN_IDS] = "token_ids",
    [UC_REQ_F_MESSAGES] = "messages",
    [UC_REQ_F_N] = "n",
    [UC_REQ_F_MAX_TOKENS] = "sampling.max_tokens",
    [UC_REQ_F_MIN_TOKENS] = "sampling.min_tokens",
    [UC_REQ_F_TEMPERATURE] = "sampling.temperature",
    [UC_REQ_F_TOP_P] = "sampling.top_p",
    [UC_REQ_F_TOP_K] = "sampling.top_k",
    [UC_REQ_F_MIN_P] = "sampling.min_p",
    [UC_REQ_F_REPETITION_PENALTY] = "sampling.repetition_penalty",
    [UC_REQ_F_FREQUENCY_PENALTY] = "sampling.frequency_penalty",
    [UC_REQ_F_PRESENCE_PENALTY] = "sampling.presence_penalty",
    [UC_REQ_F_LOGPROBS] = "sampling.logprobs",
    [UC_REQ_F_STOP] = "sampling.stop",
    [UC_REQ_F_STOP_TOKEN_IDS] = "sampling.stop_token_ids",
    [UC_REQ_F_COMPRESSION] = "compression",
    [UC_REQ_F_POLICY] = "compression.policy",
    [UC_REQ_F_KV_BUDGET] = "compression.kv_budget",
    [UC_REQ_F_WINDOW] = "compression.window",
    [UC_REQ_F_POOL_KERNEL] = "compression.pool_kernel",
    [UC_REQ_F_SINK_TOKENS] = "compression.sink_tokens",
    [UC_REQ_F_HEAD_GROUPS] = "compression.head_groups",
    [UC_REQ_F_DECODE_MODE] = "compression.decode_mode",
    [UC_REQ_F_GROUPING] = "compression.grouping",
    [UC_REQ_F_STAGE_STARTS] = "compression.stage_starts",
    [UC_REQ_F_R_MIN] = "compression.r_min",
    [UC_REQ_F_THINK_RATIO] = "compression.think_ratio",
    [UC_REQ_F_MINICACHE_T] = "compression.minicache_t",
    [UC_REQ_F_MINICACHE_GAMMA] = "compression.minicache_gamma",
    [UC_REQ_F_MINICACHE_START] = "compression.minicache_start",
    [UC_REQ_F_LORC_RATIO] = "compression.lorc_ratio",
};

static const char *const http_names[UC_REQ_F_COUNT] = {
    [UC_REQ_F_NONE] = "",
    [UC_REQ_F_REQUEST_ID] = "request_id",
    [UC_REQ_F_INPUT] = "prompt",
    [UC_REQ_F_TEXT] = "prompt",
    [UC_REQ_F_TOKEN_IDS] = "prompt",
    [UC_REQ_F_MESSAGES] = "messages",
    [UC_REQ_F_N] = "n",
    [UC_REQ_F_MAX_TOKENS] = "max_tokens",
    [UC_REQ_F_MIN_TOKENS] = "min_tokens",
    [UC_REQ_F_TEMPERATURE] = "temperature",
    [UC_REQ_F_TOP_P] = "top_p",
    [UC_REQ_F_TOP_K] = "top_k",
    [UC_REQ_F_MIN_P] = "min_p",
    [UC_REQ_F_REPETITION_PENALTY] = "repetition_penalty",
    [UC_REQ_F_FREQUENCY_PENALTY] = "frequency_penalty",
    [UC_REQ_F_PRESENCE_PENALTY] = "presence_penalty",
    [UC_REQ_F_LOGPROBS] = "logprobs",
    [UC_REQ_F_STOP] = "stop",
    [UC_REQ_F_STOP_TOKEN_IDS] = "stop_token_ids",
    [UC_REQ_F_COMPRESSION] = "uncomp",
    [UC_REQ_F_POLICY] = "uncomp.policy",
    [UC_REQ_F_KV_BUDGET] = "uncomp.kv_budget",
    [UC_REQ_F_WINDOW] = "uncomp.window",
    [UC_REQ_F_POOL_KERNEL] = "uncomp.pool_kernel",
    [UC_REQ_F_SINK_TOKENS] = "uncomp.sink_tokens",
    [UC_REQ_F_HEAD_GROUPS] = "uncomp.head_groups",
    [UC_REQ_F_DECODE_MODE] = "uncomp.decode_mode",
    [UC_REQ_F_GROUPING] = "uncomp.grouping",
    [UC_REQ_F_STAGE_STARTS] = "uncomp.stage_starts",
    [UC_REQ_F_R_MIN] = "uncomp.r_min",
    [UC_REQ_F_THINK_RATIO] = "uncomp.think_ratio",
    [UC_REQ_F_MINICACHE_T] = "uncomp.minicache_t",
    [UC_REQ_F_MINICACHE_GAMMA] = "uncomp.minicache_gamma",
    [UC_REQ_F_MINICACHE_START] = "uncomp.minicache_start",
    [UC_REQ_F_LORC_RATIO] = "uncomp.lorc_ratio",
};

const char *uc_req_field_name(enum uc_req_front front, enum uc_req_kind kind,
                              enum uc_req_field f)
{
    if (f < 0 || f >= UC_REQ_F_COUNT) {
        return "";
    }
    if (front != UC_REQ_FRONT_HTTP) {
        return grpc_names[f];
    }
    if (kind == UC_REQ_CHAT && f == UC_REQ_F_LOGPROBS) {
        return "top_logprobs"; /* chat's logprobs is a bool; the count is top_logprobs */
    }
    if (kind == UC_REQ_CHAT && f == UC_REQ_F_INPUT) {
        return "messages";
    }
    return http_names[f];
}

void uc_req_policy_list(char *out, size_t cap)
{
    size_t n = 0;
    out[0] = '\0';
    for (int i = 0; i < UC_POLICY_COUNT && n < cap; i++) {
        n += (size_t)snprintf(out + n, cap - n, "%s%s", i ? ", " : "",
                              uc_policy_name((enum uc_policy)i));
    }
    if (n < cap) {
        snprintf(out + n, cap - n, "; or one of them with +kvsharer, +think, +minicache or "
                 "+lorc (snapkv+kvsharer, snapkv+think, snapkv+minicache, snapkv+lorc; a stage "
                 "alone is full with it)");
    }
}

uc_status uc_req_fail(struct uc_req_error *err, uc_status st, enum uc_req_field field,
                      const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    err->status = st;
    err->field = field;
    snprintf(err->param, sizeof err->param, "%s", param);
    return st;
}

static const char *name_of(const struct uc_req *r, enum uc_req_field f)
{
    return uc_req_field_name(r->front, r->kind, f);
}

#define BAD(f, ...) uc_req_fail(err, UC_ERR_INVALID_ARG, (f), name_of(r, (f)), __VA_ARGS__)

static uc_status nomem(struct uc_req_error *err)
{
    return uc_req_fail(err, UC_ERR_NOMEM, UC_REQ_F_NONE, "", "out of memory");
}

/* ---- the decoded request --------------------------------------------------------------------- */

void uc_req_init(struct uc_req *r, enum uc_req_front front, enum uc_req_kind kind)
{
    memset(r, 0, sizeof *r);
    r->front = front;
    r->kind = kind;
    r->add_special_tokens = true;
    r->add_generation_prompt = true;
    r->n = 1;
    uc_request_init(&r->base);
}

void uc_req_compress_fini(struct uc_req_compress *c)
{
    UC_FREE(c->policy);
    UC_FREE(c->decode_mode);
    UC_FREE(c->grouping);
    UC_FREE(c->stage_starts);
    c->n_stage_starts = 0;
}

static void clear_validated(struct uc_req *r);

void uc_req_fini(struct uc_req *r)
{
    if (!r) {
        return;
    }
    for (int32_t i = 0; r->prompts && i < r->n_prompts; i++) {
        uc_free(r->prompts[i].text);
        uc_free(r->prompts[i].ids);
    }
    clear_validated(r);
    for (size_t i = 0; r->stop && i < r->n_stop; i++) {
        uc_free(r->stop[i]);
    }
    uc_free(r->request_id);
    uc_free(r->prompts);
    cJSON_Delete(r->messages);
    cJSON_Delete(r->template_kwargs);
    uc_free(r->stop);
    uc_free(r->stop_len);
    uc_free(r->stop_ids);
    uc_req_compress_fini(&r->compress);
    uc_req_init(r, r->front, r->kind);
}

static struct uc_req_prompt *add_prompt(struct uc_req *r)
{
    struct uc_req_prompt *p =
        uc_realloc(r->prompts, (size_t)(r->n_prompts + 1) * sizeof *r->prompts);
    if (!p) {
        return NULL;
    }
    r->prompts = p;
    memset(&p[r->n_prompts], 0, sizeof *p);
    return &p[r->n_prompts++];
}

uc_status uc_req_add_text(struct uc_req *r, const char *text, size_t len)
{
    char *t = uc_strndup(text, len);
    struct uc_req_prompt *p = t ? add_prompt(r) : NULL;
    if (!p) {
        uc_free(t);
        return UC_ERR_NOMEM;
    }
    p->text = t;
    p->text_len = len;
    return UC_OK;
}

int64_t *uc_req_add_ids(struct uc_req *r, int64_t n)
{
    if (n < 0 || (uint64_t)n > SIZE_MAX / sizeof(int64_t) - 1) {
        return NULL;
    }
    int64_t *ids = uc_calloc((size_t)n + 1, sizeof *ids);
    struct uc_req_prompt *p = ids ? add_prompt(r) : NULL;
    if (!p) {
        uc_free(ids);
        return NULL;
    }
    p->ids = ids;
    p->n_ids = n;
    return ids;
}

uc_status uc_req_add_stop(struct uc_req *r, const char *s, size_t len)
{
    char **v = uc_realloc(r->stop, (r->n_stop + 1) * sizeof *v);
    if (!v) {
        return UC_ERR_NOMEM;
    }
    r->stop = v;
    size_t *l = uc_realloc(r->stop_len, (r->n_stop + 1) * sizeof *l);
    if (!l) {
        return UC_ERR_NOMEM;
    }
    r->stop_len = l;
    char *d = uc_strndup(s, len);
    if (!d) {
        return UC_ERR_NOMEM;
    }
    v[r->n_stop] = d;
    l[r->n_stop] = len;
    r->n_stop++;
    return UC_OK;
}

uc_status uc_req_alloc_i64(int64_t **out, size_t *n_out, size_t n)
{
    UC_FREE(*out);
    *n_out = 0;
    if (n == 0) {
        return UC_OK;
    }
    *out = uc_calloc(n, sizeof **out);
    if (!*out) {
        return UC_ERR_NOMEM;
    }
    *n_out = n;
    return UC_OK;
}

uc_status uc_req_set_str(char **dst, const char *s)
{
    UC_FREE(*dst);
    if (!s) {
        return UC_OK;
    }
    *dst = uc_strdup(s);
    return *dst ? UC_OK : UC_ERR_NOMEM;
}

/* ---- compression ----------------------------------------------------------------------------- */

uc_status uc_req_compress_resolve(const struct uc_req_compress *in,
                                  const struct uc_compress_params *defaults, int64_t n_layers,
                                  const char *prefix, const char *whole,
                                  struct uc_compress_params *out, struct uc_req_error *err)
{
    char name[64];
#define CBAD(f, key, ...)                                                                          \
    (snprintf(name, sizeof name, "%s%s", prefix, key),                                             \
     uc_req_fail(err, UC_ERR_INVALID_ARG, (f), name, __VA_ARGS__))
    struct uc_compress_params cp = *defaults;
    char pmsg[512];
    if (in->policy && in->policy[0] &&
        uc_policy_spec_parse(in->policy, &cp, pmsg, sizeof pmsg) != UC_OK) {
        char names[320];
        uc_req_policy_list(names, sizeof names);
        if (strstr(pmsg, "unknown policy or stage") || strstr(pmsg, "not a policy")) {
            return CBAD(UC_REQ_F_POLICY, "policy", "%spolicy=\"%.64s\" is unknown; use one of: %s",
                        prefix, in->policy, names);
        }
        /* a known name in a combination that does not work: say why */
        return CBAD(UC_REQ_F_POLICY, "policy", "%spolicy=\"%.64s\": %s", prefix, in->policy,
                    strncmp(pmsg, "policy: ", 8) == 0 ? pmsg + 8 : pmsg);
    }
    if (in->policy && in->policy[0]) {
        cp.n_share = 0; /* a request's kvsharer uses the profile's pairs */
    }
    static const struct {
        enum uc_req_field f;
        const char *key;
        size_t in_off, out_off;
    } ints[] = {
        {UC_REQ_F_KV_BUDGET, "kv_budget", offsetof(struct uc_req_compress, kv_budget),
         offsetof(struct uc_compress_params, kv_budget)},
        {UC_REQ_F_WINDOW, "window", offsetof(struct uc_req_compress, window),
         offsetof(struct uc_compress_params, window)},
        {UC_REQ_F_POOL_KERNEL, "pool_kernel", offsetof(struct uc_req_compress, pool_kernel),
         offsetof(struct uc_compress_params, pool_kernel)},
        {UC_REQ_F_SINK_TOKENS, "sink_tokens", offsetof(struct uc_req_compress, sink_tokens),
         offsetof(struct uc_compress_params, sink_tokens)},
        {UC_REQ_F_HEAD_GROUPS, "head_groups", offsetof(struct uc_req_compress, head_groups),
         offsetof(struct uc_compress_params, head_groups)},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int64_t v;
        memcpy(&v, (const char *)in + ints[i].in_off, sizeof v);
        if (v < 0) {
            return CBAD(ints[i].f, ints[i].key, "%s%s=%lld must be >= 0 (0 = the default)",
                        prefix, ints[i].key, (long long)v);
        }
        if (v > 0) {
            /* beyond int32: the largest, which the range checks below refuse by name */
            int32_t c = v > INT32_MAX ? INT32_MAX : (int32_t)v;
            memcpy((char *)&cp + ints[i].out_off, &c, sizeof c);
        }
    }
    if (in->decode_mode && in->decode_mode[0] &&
        !uc_decode_mode_parse(in->decode_mode, &cp.decode_mode)) {
        return CBAD(UC_REQ_F_DECODE_MODE, "decode_mode",
                    "%sdecode_mode=\"%.64s\" must be append or evict", prefix, in->decode_mode);
    }
    if (in->grouping && in->grouping[0] && !uc_grouping_parse(in->grouping, &cp.grouping)) {
        return CBAD(UC_REQ_F_GROUPING, "grouping", "%sgrouping=\"%.64s\" must be profile or prompt",
                    prefix, in->grouping);
    }
    if (in->n_stage_starts > 0) {
        if (in->n_stage_starts > UC_MAX_STAGES - 1) {
            return CBAD(UC_REQ_F_STAGE_STARTS, "stage_starts",
                        "%sstage_starts has %zu boundaries; at most %d", prefix,
                        in->n_stage_starts, UC_MAX_STAGES - 1);
        }
        for (size_t i = 0; i < in->n_stage_starts; i++) {
            int64_t s = in->stage_starts[i];
            if (s < 1 || s >= n_layers) {
                return CBAD(UC_REQ_F_STAGE_STARTS, "stage_starts",
                            "%sstage_starts[%zu]=%lld must be a layer in [1, %lld)", prefix, i,
                            (long long)s, (long long)n_layers);
            }
            cp.stage_starts[i] = (int32_t)s;
        }
        cp.n_stage_starts = (int32_t)in->n_stage_starts;
    }
    if (in->has_r_min) {
        if (!(in->r_min > 0.0 && in->r_min <= 1.0)) {
            return CBAD(UC_REQ_F_R_MIN, "r_min", "%sr_min=%g must be in (0, 1]", prefix,
                        in->r_min);
        }
        cp.r_min = (float)in->r_min;
    }
    if (in->has_think_ratio) {
        if (!(in->think_ratio > 0.0 && in->think_ratio < 1.0)) {
            return CBAD(UC_REQ_F_THINK_RATIO, "think_ratio",
                        "%sthink_ratio=%g must be in (0, 1)", prefix, in->think_ratio);
        }
        if (!(cp.stages & UC_STAGE_THINK)) {
            return CBAD(UC_REQ_F_THINK_RATIO, "think_ratio",
                        "%sthink_ratio needs a policy with +think (policy=\"%s\")", prefix,
                        uc_policy_name(cp.policy));
        }
        cp.think_ratio = (float)in->think_ratio;
    }
    bool mc = (cp.stages & UC_STAGE_MINICACHE) != 0;
    if (in->has_minicache_t) {
        if (!(in->minicache_t > 0.0 && in->minicache_t <= 1.0)) {
            return CBAD(UC_REQ_F_MINICACHE_T, "minicache_t", "%sminicache_t=%g must be in (0, 1]",
                        prefix, in->minicache_t);
        }
        if (!mc) {
            return CBAD(UC_REQ_F_MINICACHE_T, "minicache_t",
                        "%sminicache_t needs a policy with +minicache", prefix);
        }
        cp.minicache_t = (float)in->minicache_t;
    }
    if (in->has_minicache_gamma) {
        if (!(in->minicache_gamma >= 0.0 && in->minicache_gamma <= 1.0)) {
            return CBAD(UC_REQ_F_MINICACHE_GAMMA, "minicache_gamma",
                        "%sminicache_gamma=%g must be in [0, 1]", prefix, in->minicache_gamma);
        }
        if (!mc) {
            return CBAD(UC_REQ_F_MINICACHE_GAMMA, "minicache_gamma",
                        "%sminicache_gamma needs a policy with +minicache", prefix);
        }
        /* 0 here means none retained; in the engine's parameters 0 is the default */
        cp.minicache_gamma = in->minicache_gamma > 0.0 ? (float)in->minicache_gamma : -1.0f;
    }
    if (in->has_minicache_start) {
        if (in->minicache_start < 1 || in->minicache_start >= n_layers - 1) {
            return CBAD(UC_REQ_F_MINICACHE_START, "minicache_start",
                        "%sminicache_start=%lld must be in [1, %lld)", prefix,
                        (long long)in->minicache_start, (long long)(n_layers - 1));
        }
        if (!mc) {
            return CBAD(UC_REQ_F_MINICACHE_START, "minicache_start",
                        "%sminicache_start needs a policy with +minicache", prefix);
        }
        cp.minicache_start = (int32_t)in->minicache_start;
    }
    if (in->has_lorc_ratio) {
        if (!(in->lorc_ratio > 0.0 && in->lorc_ratio <= 1.0)) {
            return CBAD(UC_REQ_F_LORC_RATIO, "lorc_ratio",
                        "%slorc_ratio=%g must be in (0, 1]", prefix, in->lorc_ratio);
        }
        if (!(cp.stages & UC_STAGE_LORC)) {
            return CBAD(UC_REQ_F_LORC_RATIO, "lorc_ratio",
                        "%slorc_ratio needs a policy with +lorc (policy=\"%s\")", prefix,
                        uc_policy_name(cp.policy));
        }
        cp.lorc_ratio = (float)in->lorc_ratio;
    }
#undef CBAD
    char why[256];
    if (uc_compress_params_validate(&cp, n_layers, why, sizeof why) != UC_OK) {
        char w[64];
        snprintf(w, sizeof w, "%s", whole ? whole : "compression");
        return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_COMPRESSION, w, "%s%s%s",
                           whole ? whole : "", whole ? ": " : "", why);
    }
    *out = cp;
    return UC_OK;
}

/* ---- validation ------------------------------------------------------------------------------ */

static bool printable_id(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p <= 0x20 || *p >= 0x7f) {
            return false;
        }
    }
    return true;
}

static uc_status check_request_id(const struct uc_req *r, struct uc_req_error *err)
{
    const char *id = r->request_id ? r->request_id : "";
    size_t n = strlen(id);
    if (n >= UC_REQUEST_ID_MAX) {
        return BAD(UC_REQ_F_REQUEST_ID, "%s is %zu bytes; at most %d",
                   name_of(r, UC_REQ_F_REQUEST_ID), n, UC_REQUEST_ID_MAX - 1);
    }
    if (!printable_id(id)) {
        return BAD(UC_REQ_F_REQUEST_ID, "%s must be printable ASCII without spaces",
                   name_of(r, UC_REQ_F_REQUEST_ID));
    }
    return UC_OK;
}

static uc_status check_lengths(const struct uc_req *r, struct uc_req_error *err)
{
    if (r->n < 1 || r->n > UC_REQ_MAX_N) {
        return BAD(UC_REQ_F_N, "%s=%lld must be in [1, %d]", name_of(r, UC_REQ_F_N),
                   (long long)r->n, UC_REQ_MAX_N);
    }
    if (r->has_max_tokens && (r->max_tokens < 1 || r->max_tokens > UC_REQ_MAX_TOKENS)) {
        return BAD(UC_REQ_F_MAX_TOKENS, "%s=%lld must be in [1, %d]",
                   name_of(r, UC_REQ_F_MAX_TOKENS), (long long)r->max_tokens, UC_REQ_MAX_TOKENS);
    }
    if (r->min_tokens < 0 || r->min_tokens > UC_REQ_MAX_TOKENS) {
        return BAD(UC_REQ_F_MIN_TOKENS, "%s=%lld must be in [0, %d]",
                   name_of(r, UC_REQ_F_MIN_TOKENS), (long long)r->min_tokens, UC_REQ_MAX_TOKENS);
    }
    if (r->has_max_tokens && r->min_tokens > r->max_tokens) {
        return BAD(UC_REQ_F_MIN_TOKENS, "%s=%lld must be <= %s=%lld",
                   name_of(r, UC_REQ_F_MIN_TOKENS), (long long)r->min_tokens,
                   name_of(r, UC_REQ_F_MAX_TOKENS), (long long)r->max_tokens);
    }
    if (r->top_logprobs < 0 || r->top_logprobs > UC_REQ_MAX_LOGPROBS) {
        return BAD(UC_REQ_F_LOGPROBS, "%s=%lld must be in [0, %d]", name_of(r, UC_REQ_F_LOGPROBS),
                   (long long)r->top_logprobs, UC_REQ_MAX_LOGPROBS);
    }
    return UC_OK;
}

static bool in_range(double v, double lo, bool lo_open, double hi)
{
    return isfinite(v) && (lo_open ? v > lo : v >= lo) && v <= hi;
}

static uc_status check_sampling(struct uc_req *r, struct uc_req_error *err)
{
    struct uc_sampling_params sp = uc_sampling_default_params();
    if (r->has_temperature) {
        if (!in_range(r->temperature, 0.0, false, 100.0)) {
            return BAD(UC_REQ_F_TEMPERATURE, "%s=%g must be in [0, 100] (0 = greedy)",
                       name_of(r, UC_REQ_F_TEMPERATURE), r->temperature);
        }
        sp.temperature = (float)r->temperature;
    }
    if (r->has_top_p) {
        if (!in_range(r->top_p, 0.0, true, 1.0)) {
            return BAD(UC_REQ_F_TOP_P, "%s=%g must be in (0, 1]", name_of(r, UC_REQ_F_TOP_P),
                       r->top_p);
        }
        sp.top_p = (float)r->top_p;
    }
    if (r->top_k < -1 || r->top_k > INT32_MAX) {
        return BAD(UC_REQ_F_TOP_K, "%s=%lld must be in [-1, %d] (0 or -1 = off)",
                   name_of(r, UC_REQ_F_TOP_K), (long long)r->top_k, INT32_MAX);
    }
    sp.top_k = r->top_k < 0 ? 0 : (int32_t)r->top_k;
    if (r->has_min_p) {
        if (!in_range(r->min_p, 0.0, false, 1.0)) {
            return BAD(UC_REQ_F_MIN_P, "%s=%g must be in [0, 1]", name_of(r, UC_REQ_F_MIN_P),
                       r->min_p);
        }
        sp.min_p = (float)r->min_p;
    }
    if (r->has_repetition_penalty) {
        if (!in_range(r->repetition_penalty, 0.0, true, 100.0)) {
            return BAD(UC_REQ_F_REPETITION_PENALTY, "%s=%g must be in (0, 100] (1 = off)",
                       name_of(r, UC_REQ_F_REPETITION_PENALTY), r->repetition_penalty);
        }
        sp.repetition_penalty = (float)r->repetition_penalty;
    }
    if (!in_range(r->frequency_penalty, -2.0, false, 2.0)) {
        return BAD(UC_REQ_F_FREQUENCY_PENALTY, "%s=%g must be in [-2, 2]",
                   name_of(r, UC_REQ_F_FREQUENCY_PENALTY), r->frequency_penalty);
    }
    sp.frequency_penalty = (float)r->frequency_penalty;
    if (!in_range(r->presence_penalty, -2.0, false, 2.0)) {
        return BAD(UC_REQ_F_PRESENCE_PENALTY, "%s=%g must be in [-2, 2]",
                   name_of(r, UC_REQ_F_PRESENCE_PENALTY), r->presence_penalty);
    }
    sp.presence_penalty = (float)r->presence_penalty;
    sp.has_seed = r->has_seed;
    sp.seed = r->seed;
    char why[256];
    if (uc_sampling_params_validate(&sp, why, sizeof why) != UC_OK) {
        /* the engine's own bounds, named its way; the checks above should leave nothing */
        return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_NONE, "sampling", "%s", why);
    }
    r->base.sampling = sp;
    return UC_OK;
}

static uc_status check_stops(struct uc_req *r, const struct uc_req_ctx *ctx,
                             struct uc_req_error *err)
{
    const char *stop = name_of(r, UC_REQ_F_STOP);
    if (r->n_stop > UC_REQ_MAX_STOP) {
        return BAD(UC_REQ_F_STOP, "%s has %zu strings; at most %d", stop, r->n_stop,
                   UC_REQ_MAX_STOP);
    }
    for (size_t i = 0; i < r->n_stop; i++) {
        if (r->stop_len[i] == 0) {
            return BAD(UC_REQ_F_STOP, "%s[%zu] is empty", stop, i);
        }
        if (r->stop_len[i] > UC_REQ_MAX_STOP_BYTES) {
            return BAD(UC_REQ_F_STOP, "%s[%zu] is %zu bytes; at most %d", stop, i, r->stop_len[i],
                       UC_REQ_MAX_STOP_BYTES);
        }
    }
    const char *ids = name_of(r, UC_REQ_F_STOP_TOKEN_IDS);
    if (r->n_stop_ids > UC_REQ_MAX_STOP) {
        return BAD(UC_REQ_F_STOP_TOKEN_IDS, "%s has %zu ids; at most %d", ids, r->n_stop_ids,
                   UC_REQ_MAX_STOP);
    }
    if (r->n_stop_ids > 0) {
        r->stop_ids32 = uc_calloc(r->n_stop_ids, sizeof *r->stop_ids32);
        if (!r->stop_ids32) {
            return nomem(err);
        }
    }
    for (size_t i = 0; i < r->n_stop_ids; i++) {
        int64_t t = r->stop_ids[i];
        if (t < 0 || t >= ctx->vocab) {
            return BAD(UC_REQ_F_STOP_TOKEN_IDS, "%s[%zu]=%lld is out of range [0, %lld)", ids, i,
                       (long long)t, (long long)ctx->vocab);
        }
        r->stop_ids32[i] = (int32_t)t;
    }
    r->base.stop = (const char *const *)r->stop;
    r->base.stop_len = r->stop_len;
    r->base.n_stop = (int32_t)r->n_stop;
    r->base.stop_ids = r->stop_ids32;
    r->base.n_stop_ids = (int32_t)r->n_stop_ids;
    return UC_OK;
}

static uc_status check_compress(struct uc_req *r, const struct uc_req_ctx *ctx,
                                struct uc_req_error *err)
{
    if (!r->has_compress) {
        r->base.has_compress = false;
        return UC_OK;
    }
    /* the names of the front: gRPC CompressionParams are "compression.*", HTTP "uncomp.*",
     * whose whole-object refusals read "uncomp: ..." */
    bool http = r->front == UC_REQ_FRONT_HTTP;
    uc_status rc = uc_req_compress_resolve(&r->compress, &ctx->defaults, ctx->n_layers,
                                           http ? "uncomp." : "compression.",
                                           http ? "uncomp" : NULL, &r->base.compress, err);
    if (rc != UC_OK) {
        return rc;
    }
    r->base.has_compress = true;
    return UC_OK;
}

/* Tokenizes text (len bytes) for field f (named `name`) into tokens[k]. */
static uc_status tokenize(struct uc_req *r, const struct uc_req_ctx *ctx, int32_t k,
                          enum uc_req_field f, const char *name, const char *text, size_t len,
                          bool add_special, struct uc_req_error *err)
{
    char why[256];
    int64_t n = 0;
    uc_status rc = uc_tokenizer_encode_msg(ctx->tok, text, len, add_special, &r->tokens[k], &n,
                                           why, sizeof why);
    if (rc == UC_ERR_INVALID_ARG) {
        return uc_req_fail(err, rc, f, name_of(r, f), "%s: %s", name, why);
    }
    if (rc != UC_OK) {
        return uc_req_fail(err, rc, f, name_of(r, f), "tokenizer failed: %s: %s",
                           uc_status_str(rc), why);
    }
    r->n_tokens[k] = n;
    if (n == 0) {
        return uc_req_fail(err, UC_ERR_INVALID_ARG, f, name_of(r, f), "%s produced no tokens",
                           name);
    }
    return UC_OK;
}

static uc_status check_prompts(struct uc_req *r, const struct uc_req_ctx *ctx,
                               struct uc_req_error *err)
{
    if (r->n_prompts == 0) {
        return BAD(UC_REQ_F_INPUT, "%s is missing: the request needs a prompt (text or token "
                   "ids)", name_of(r, UC_REQ_F_INPUT));
    }
    if (r->n_prompts > UC_REQ_MAX_PROMPTS) {
        return BAD(UC_REQ_F_INPUT, "%s has %d entries; at most %d", name_of(r, UC_REQ_F_INPUT),
                   r->n_prompts, UC_REQ_MAX_PROMPTS);
    }
    if ((int64_t)r->n_prompts * r->n > UC_REQ_MAX_CHOICES) {
        return BAD(UC_REQ_F_N, "%d prompts x %s=%lld choices; at most %d in one request",
                   r->n_prompts, name_of(r, UC_REQ_F_N), (long long)r->n, UC_REQ_MAX_CHOICES);
    }
    r->tokens = uc_calloc((size_t)r->n_prompts, sizeof *r->tokens);
    r->n_tokens = uc_calloc((size_t)r->n_prompts, sizeof *r->n_tokens);
    if (!r->tokens || !r->n_tokens) {
        return nomem(err);
    }
    r->n_inputs = r->n_prompts;
    for (int32_t k = 0; k < r->n_prompts; k++) {
        const struct uc_req_prompt *p = &r->prompts[k];
        enum uc_req_field f = p->text ? UC_REQ_F_TEXT : UC_REQ_F_TOKEN_IDS;
        char name[80];
        if (r->prompt_list) {
            snprintf(name, sizeof name, "%s[%d]", name_of(r, f), (int)k);
        } else {
            snprintf(name, sizeof name, "%s", name_of(r, f));
        }
        if (p->text) {
            if (p->text_len == 0) {
                return BAD(f, "%s is empty: the prompt needs at least one token", name);
            }
            uc_status rc = tokenize(r, ctx, k, f, name, p->text, p->text_len,
                                    r->add_special_tokens, err);
            if (rc != UC_OK) {
                return rc;
            }
            continue;
        }
        if (p->n_ids == 0) {
            return BAD(f, "%s is empty: the prompt needs at least one token", name);
        }
        r->tokens[k] = uc_malloc((size_t)p->n_ids * sizeof **r->tokens);
        if (!r->tokens[k]) {
            return nomem(err);
        }
        for (int64_t i = 0; i < p->n_ids; i++) {
            if (p->ids[i] < 0 || p->ids[i] >= ctx->vocab) {
                return BAD(f, "%s[%lld]=%lld is out of range [0, %lld)", name, (long long)i,
                           (long long)p->ids[i], (long long)ctx->vocab);
            }
            r->tokens[k][i] = (int32_t)p->ids[i];
        }
        r->n_tokens[k] = p->n_ids;
    }
    return UC_OK;
}

static uc_status check_messages(struct uc_req *r, const struct uc_req_ctx *ctx,
                                struct uc_req_error *err)
{
    const char *name = name_of(r, UC_REQ_F_MESSAGES);
    if (!ctx->chat) {
        return uc_req_fail(err, UC_ERR_UNSUPPORTED, UC_REQ_F_MESSAGES, name,
                           "the model has no chat template (tokenizer_config.json chat_template "
                           "or chat_template.jinja): start uncompd with --chat-template FILE%s",
                           r->front == UC_REQ_FRONT_HTTP ? ", or use /v1/completions" : "");
    }
    if (!r->messages) {
        return BAD(UC_REQ_F_MESSAGES, "%s is missing", name);
    }
    char why[320];
    uc_status rc = uc_chat_messages_validate(r->messages, why, sizeof why);
    if (rc != UC_OK) {
        return uc_req_fail(err, rc, UC_REQ_F_MESSAGES, name, "%s", why);
    }
    rc = uc_chat_template_render(ctx->chat, r->messages, r->add_generation_prompt,
                                 r->template_kwargs, &r->rendered, &r->rendered_len, why,
                                 sizeof why);
    if (rc == UC_ERR_INVALID_ARG) {
        return BAD(UC_REQ_F_MESSAGES, "the chat template refused the %s: %s", name, why);
    }
    if (rc != UC_OK) {
        return uc_req_fail(err, rc, UC_REQ_F_MESSAGES, name, "chat template: %s", why);
    }
    if (r->rendered_len == 0) {
        return BAD(UC_REQ_F_MESSAGES, "the chat template rendered nothing");
    }
    r->tokens = uc_calloc(1, sizeof *r->tokens);
    r->n_tokens = uc_calloc(1, sizeof *r->n_tokens);
    if (!r->tokens || !r->n_tokens) {
        return nomem(err);
    }
    r->n_inputs = 1;
    /* the template writes the special tokens itself (bos_token), as apply_chat_template does */
    return tokenize(r, ctx, 0, UC_REQ_F_MESSAGES, name, r->rendered, r->rendered_len, false,
                    err);
}

/* Frees what a validation left (validating twice starts over). */
static void clear_validated(struct uc_req *r)
{
    for (int32_t i = 0; r->tokens && i < r->n_inputs; i++) {
        uc_free(r->tokens[i]);
    }
    UC_FREE(r->tokens);
    UC_FREE(r->n_tokens);
    UC_FREE(r->rendered);
    UC_FREE(r->stop_ids32);
    r->n_inputs = 0;
    r->rendered_len = 0;
    uc_request_init(&r->base);
    r->valid = false;
}

uc_status uc_req_validate(struct uc_req *r, const struct uc_req_ctx *ctx,
                          struct uc_req_error *err)
{
    memset(err, 0, sizeof *err);
    clear_validated(r);
    uc_status rc;
    if (!ctx->tok) {
        return uc_req_fail(err, UC_ERR_UNAVAILABLE, UC_REQ_F_NONE, "",
                           "the model is not loaded yet");
    }
    if ((rc = check_request_id(r, err)) != UC_OK || (rc = check_lengths(r, err)) != UC_OK ||
        (rc = check_sampling(r, err)) != UC_OK || (rc = check_stops(r, ctx, err)) != UC_OK ||
        (rc = check_compress(r, ctx, err)) != UC_OK) {
        return rc;
    }
    rc = r->kind == UC_REQ_CHAT ? check_messages(r, ctx, err) : check_prompts(r, ctx, err);
    if (rc != UC_OK) {
        return rc;
    }
    struct uc_request *b = &r->base;
    snprintf(b->request_id, sizeof b->request_id, "%s", r->request_id ? r->request_id : "");
    b->max_tokens = r->has_max_tokens ? (int32_t)r->max_tokens : 0;
    b->min_tokens = (int32_t)r->min_tokens;
    b->ignore_eos = r->ignore_eos;
    /* the scheduler's logprobs is "top-n per token"; 1 also gives the chosen token's */
    b->logprobs = r->logprobs ? (r->top_logprobs > 0 ? (int32_t)r->top_logprobs : 1) : 0;
    b->prompt_logprobs = r->echo && r->logprobs;
    b->n = (int32_t)r->n;
    r->valid = true;
    return UC_OK;
}

#undef BAD

/* ---- conversion ------------------------------------------------------------------------------ */

void uc_req_choice(const struct uc_req *r, int32_t first, int32_t n_fork, struct uc_request *out)
{
    *out = r->base;
    int32_t n = r->n > 0 ? (int32_t)r->n : 1;
    int32_t p = first / n;
    if (p >= r->n_inputs) {
        p = r->n_inputs - 1;
    }
    out->prompt = p >= 0 ? r->tokens[p] : NULL;
    out->n_prompt = p >= 0 ? r->n_tokens[p] : 0;
    if (out->sampling.has_seed) {
        out->sampling.seed += (uint64_t)(first % n);
    }
    out->n = n_fork;
}
