/* The OpenAI request model (openai_api.h): request parsing and validation, then the response,
 * chunk and error JSON. */
#include "openai_api.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "base/mem.h"
#include "chat_template.h"
#include "tokenizer.h"

/* ---- parsing helpers ------------------------------------------------------------------------ */

struct pctx {
    char *msg;
    size_t msg_size;
    char *param;
    size_t param_size;
};

static uc_status bad(struct pctx *p, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static uc_status bad(struct pctx *p, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->msg, p->msg_size, fmt, ap);
    va_end(ap);
    snprintf(p->param, p->param_size, "%s", param);
    return UC_ERR_INVALID_ARG;
}

static const cJSON *field(const cJSON *o, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, name);
    return f && !cJSON_IsNull(f) ? f : NULL; /* null means "not set" */
}

/* An integer field in [lo, hi]; absent leaves *out. */
static uc_status get_int(struct pctx *p, const cJSON *o, const char *name, int64_t lo, int64_t hi,
                         int64_t *out, bool *present)
{
    const cJSON *f = field(o, name);
    if (present) {
        *present = f != NULL;
    }
    if (!f) {
        return UC_OK;
    }
    if (!cJSON_IsNumber(f) || f->valuedouble != floor(f->valuedouble) ||
        !isfinite(f->valuedouble)) {
        return bad(p, name, "%s must be an integer", name);
    }
    if (f->valuedouble < (double)lo || f->valuedouble > (double)hi) {
        return bad(p, name, "%s=%.0f must be in [%lld, %lld]", name, f->valuedouble,
                   (long long)lo, (long long)hi);
    }
    *out = (int64_t)f->valuedouble;
    return UC_OK;
}

static uc_status get_num(struct pctx *p, const cJSON *o, const char *name, double lo, double hi,
                         bool lo_open, float *out, bool *present)
{
    const cJSON *f = field(o, name);
    if (present) {
        *present = f != NULL;
    }
    if (!f) {
        return UC_OK;
    }
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble)) {
        return bad(p, name, "%s must be a number", name);
    }
    double v = f->valuedouble;
    if (v > hi || (lo_open ? v <= lo : v < lo)) {
        return bad(p, name, "%s=%g must be in %s%g, %g]", name, v, lo_open ? "(" : "[", lo, hi);
    }
    *out = (float)v;
    return UC_OK;
}

static uc_status get_bool(struct pctx *p, const cJSON *o, const char *name, bool *out)
{
    const cJSON *f = field(o, name);
    if (!f) {
        return UC_OK;
    }
    if (!cJSON_IsBool(f)) {
        return bad(p, name, "%s must be true or false", name);
    }
    *out = cJSON_IsTrue(f);
    return UC_OK;
}

static uc_status get_str(struct pctx *p, const cJSON *o, const char *name, const char **out)
{
    const cJSON *f = field(o, name);
    if (!f) {
        return UC_OK;
    }
    if (!cJSON_IsString(f)) {
        return bad(p, name, "%s must be a string", name);
    }
    *out = f->valuestring;
    return UC_OK;
}

#define TRY(e)                                                                                     \
    do {                                                                                           \
        rc = (e);                                                                                  \
        if (rc != UC_OK) {                                                                         \
            goto out_fail;                                                                         \
        }                                                                                          \
    } while (0)

static uc_status add_prompt(struct uc_oai_request *r, int32_t *ids, int64_t n, const char *text,
                            size_t text_len)
{
    int32_t k = r->n_prompts;
    r->prompts[k] = ids;
    r->n_prompt[k] = n;
    r->prompt_text[k] = NULL;
    r->prompt_text_len[k] = 0;
    r->n_prompts++;
    if (text) {
        r->prompt_text[k] = uc_malloc(text_len + 1);
        if (!r->prompt_text[k]) {
            return UC_ERR_NOMEM;
        }
        memcpy(r->prompt_text[k], text, text_len);
        r->prompt_text[k][text_len] = '\0';
        r->prompt_text_len[k] = text_len;
    }
    return UC_OK;
}

static uc_status encode(struct pctx *p, const struct uc_oai_ctx *ctx, const char *text, size_t len,
                        bool add_special, const char *param, int32_t **ids, int64_t *n)
{
    char why[256];
    uc_status rc = uc_tokenizer_encode_msg(ctx->tok, text, len, add_special, ids, n, why,
                                           sizeof why);
    if (rc == UC_ERR_INVALID_ARG) {
        return bad(p, param, "%s: %s", param, why);
    }
    if (rc != UC_OK) {
        snprintf(p->msg, p->msg_size, "tokenizer failed: %s", why);
        return rc;
    }
    if (*n == 0) {
        uc_free(*ids);
        *ids = NULL;
        return bad(p, param, "%s produced no tokens", param);
    }
    return UC_OK;
}

/* an array of token ids */
static uc_status ids_of(struct pctx *p, const struct uc_oai_ctx *ctx, const cJSON *a,
                        const char *param, int32_t **out, int64_t *n_out)
{
    int n = cJSON_GetArraySize(a);
    if (n == 0) {
        return bad(p, param, "%s is empty: the prompt needs at least one token", param);
    }
    int32_t *ids = uc_malloc((size_t)n * sizeof *ids);
    if (!ids) {
        return UC_ERR_NOMEM;
    }
    int i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, a) {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) ||
            t->valuedouble < 0 || t->valuedouble >= (double)ctx->vocab) {
            uc_free(ids);
            return bad(p, param, "%s[%d] must be a token id in [0, %lld)", param, i,
                       (long long)ctx->vocab);
        }
        ids[i++] = (int32_t)t->valuedouble;
    }
    *out = ids;
    *n_out = n;
    return UC_OK;
}

static uc_status parse_prompt(struct pctx *p, struct uc_oai_request *r,
                              const struct uc_oai_ctx *ctx, const cJSON *pr)
{
    uc_status rc;
    if (!pr) {
        return bad(p, "prompt", "prompt is missing");
    }
    int count = cJSON_IsArray(pr) ? cJSON_GetArraySize(pr) : 1;
    bool ids_only = cJSON_IsArray(pr) && count > 0 && cJSON_IsNumber(pr->child);
    if (ids_only) {
        count = 1;
    }
    if (cJSON_IsArray(pr) && count == 0) {
        return bad(p, "prompt", "prompt is an empty list");
    }
    if (count > UC_OAI_MAX_PROMPTS) {
        return bad(p, "prompt", "prompt has %d entries; at most %d", count, UC_OAI_MAX_PROMPTS);
    }
    r->prompts = uc_calloc((size_t)count, sizeof *r->prompts);
    r->n_prompt = uc_calloc((size_t)count, sizeof *r->n_prompt);
    r->prompt_text = uc_calloc((size_t)count, sizeof *r->prompt_text);
    r->prompt_text_len = uc_calloc((size_t)count, sizeof *r->prompt_text_len);
    if (!r->prompts || !r->n_prompt || !r->prompt_text || !r->prompt_text_len) {
        return UC_ERR_NOMEM;
    }
    const cJSON *items[UC_OAI_MAX_PROMPTS];
    if (cJSON_IsArray(pr) && !ids_only) {
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, pr) {
            items[i++] = it;
        }
    } else {
        items[0] = pr;
    }
    for (int i = 0; i < count; i++) {
        const cJSON *it = items[i];
        char param[32];
        snprintf(param, sizeof param, count > 1 || (cJSON_IsArray(pr) && !ids_only)
                                          ? "prompt[%d]" : "prompt", i);
        int32_t *ids = NULL;
        int64_t n = 0;
        if (cJSON_IsString(it)) {
            size_t len = strlen(it->valuestring);
            if (len == 0) {
                return bad(p, "prompt", "%s is empty: the prompt needs at least one token",
                           param);
            }
            rc = encode(p, ctx, it->valuestring, len, true, param, &ids, &n);
            if (rc != UC_OK) {
                return rc;
            }
            rc = add_prompt(r, ids, n, it->valuestring, len);
        } else if (cJSON_IsArray(it)) {
            rc = ids_of(p, ctx, it, param, &ids, &n);
            if (rc != UC_OK) {
                return rc;
            }
            rc = add_prompt(r, ids, n, NULL, 0);
        } else {
            return bad(p, "prompt", "%s must be a string, a list of strings or token ids",
                       param);
        }
        if (rc != UC_OK) {
            uc_free(ids);
            return rc;
        }
    }
    return UC_OK;
}

static uc_status parse_messages(struct pctx *p, struct uc_oai_request *r,
                                const struct uc_oai_ctx *ctx, const cJSON *root)
{
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!msgs) {
        return bad(p, "messages", "messages is missing");
    }
    uc_status rc = uc_chat_messages_validate(msgs, p->msg, p->msg_size);
    if (rc != UC_OK) {
        snprintf(p->param, p->param_size, "messages");
        return rc;
    }
    if (!ctx->chat) {
        return bad(p, "messages", "the model has no chat template (tokenizer_config.json "
                   "chat_template or chat_template.jinja); start uncompd with "
                   "--chat-template FILE, or use /v1/completions");
    }
    bool add_gen = true;
    rc = get_bool(p, root, "add_generation_prompt", &add_gen);
    if (rc != UC_OK) {
        return rc;
    }
    const cJSON *kw = field(root, "chat_template_kwargs");
    if (kw && !cJSON_IsObject(kw)) {
        return bad(p, "chat_template_kwargs", "chat_template_kwargs must be an object");
    }
    char *text = NULL;
    size_t len = 0;
    char why[320];
    rc = uc_chat_template_render(ctx->chat, msgs, add_gen, kw, &text, &len, why, sizeof why);
    if (rc == UC_ERR_INVALID_ARG) {
        return bad(p, "messages", "the chat template refused the messages: %s", why);
    }
    if (rc != UC_OK) {
        snprintf(p->msg, p->msg_size, "chat template: %s", why);
        return rc;
    }
    r->prompts = uc_calloc(1, sizeof *r->prompts);
    r->n_prompt = uc_calloc(1, sizeof *r->n_prompt);
    r->prompt_text = uc_calloc(1, sizeof *r->prompt_text);
    r->prompt_text_len = uc_calloc(1, sizeof *r->prompt_text_len);
    if (!r->prompts || !r->n_prompt || !r->prompt_text || !r->prompt_text_len) {
        uc_free(text);
        return UC_ERR_NOMEM;
    }
    int32_t *ids = NULL;
    int64_t n = 0;
    /* the template writes the special tokens itself (bos_token), as apply_chat_template does */
    rc = len ? encode(p, ctx, text, len, false, "messages", &ids, &n)
             : bad(p, "messages", "the chat template rendered nothing");
    if (rc == UC_OK) {
        rc = add_prompt(r, ids, n, text, len);
        if (rc != UC_OK) {
            uc_free(ids);
        }
    }
    uc_free(text);
    return rc;
}

static uc_status parse_stop(struct pctx *p, struct uc_oai_request *r, const cJSON *root)
{
    const cJSON *s = field(root, "stop");
    if (!s) {
        return UC_OK;
    }
    int n = cJSON_IsArray(s) ? cJSON_GetArraySize(s) : 1;
    if (!cJSON_IsArray(s) && !cJSON_IsString(s)) {
        return bad(p, "stop", "stop must be a string or a list of strings");
    }
    if (n > 64) {
        return bad(p, "stop", "stop has %d strings; at most 64", n);
    }
    if (n == 0) {
        return UC_OK;
    }
    r->stop = uc_calloc((size_t)n, sizeof *r->stop);
    if (!r->stop) {
        return UC_ERR_NOMEM;
    }
    const cJSON *it = cJSON_IsArray(s) ? s->child : s;
    for (int i = 0; i < n; i++, it = it->next) {
        if (!cJSON_IsString(it)) {
            return bad(p, "stop", "stop[%d] must be a string", i);
        }
        size_t len = strlen(it->valuestring);
        if (len == 0) {
            return bad(p, "stop", "stop[%d] is empty", i);
        }
        if (len > 1024) {
            return bad(p, "stop", "stop[%d] is %zu bytes; at most 1024", i, len);
        }
        r->stop[i] = uc_strdup(it->valuestring);
        if (!r->stop[i]) {
            return UC_ERR_NOMEM;
        }
        r->base.n_stop = i + 1;
    }
    r->base.stop = (const char *const *)r->stop;
    return UC_OK;
}

static uc_status parse_stop_ids(struct pctx *p, struct uc_oai_request *r,
                                const struct uc_oai_ctx *ctx, const cJSON *root)
{
    const cJSON *a = field(root, "stop_token_ids");
    if (!a) {
        return UC_OK;
    }
    if (!cJSON_IsArray(a)) {
        return bad(p, "stop_token_ids", "stop_token_ids must be a list of token ids");
    }
    int n = cJSON_GetArraySize(a);
    if (n > 64) {
        return bad(p, "stop_token_ids", "stop_token_ids has %d ids; at most 64", n);
    }
    if (n == 0) {
        return UC_OK;
    }
    int64_t k = 0;
    uc_status rc = ids_of(p, ctx, a, "stop_token_ids", &r->stop_ids, &k);
    if (rc == UC_OK) {
        r->base.stop_ids = r->stop_ids;
        r->base.n_stop_ids = (int32_t)k;
    }
    return rc;
}

static uc_status parse_uncomp(struct pctx *p, struct uc_oai_request *r,
                              const struct uc_oai_ctx *ctx, const cJSON *root)
{
    const cJSON *u = field(root, "uncomp");
    if (!u) {
        return UC_OK;
    }
    if (!cJSON_IsObject(u)) {
        return bad(p, "uncomp", "uncomp must be an object of compression parameters");
    }
    static const char *const known[] = {"policy", "kv_budget", "window", "pool_kernel",
                                        "sink_tokens", "head_groups", "decode_mode",
                                        "grouping", "stage_starts", "r_min", NULL};
    const cJSON *f;
    cJSON_ArrayForEach(f, u) {
        bool ok = false;
        for (int i = 0; known[i]; i++) {
            ok = ok || strcmp(f->string, known[i]) == 0;
        }
        if (!ok) {
            return bad(p, "uncomp", "uncomp.%.40s is not a compression parameter (policy, "
                       "kv_budget, window, pool_kernel, sink_tokens, head_groups, decode_mode, "
                       "grouping, stage_starts, r_min)", f->string);
        }
    }
    struct uc_compress_params cp = ctx->defaults;
    uc_status rc;
    const char *s = NULL;
    if ((rc = get_str(p, u, "policy", &s)) != UC_OK) {
        return rc;
    }
    if (s && s[0] && !uc_policy_parse(s, &cp.policy)) {
        return bad(p, "uncomp.policy", "uncomp.policy=\"%.40s\" is unknown; use one of full, "
                   "uncomp, uncomp-stage, snapkv, pyramidkv, streamingllm, h2o", s);
    }
    struct {
        const char *name;
        int32_t *dst;
        int64_t hi;
    } ints[] = {{"kv_budget", &cp.kv_budget, 1 << 24}, {"window", &cp.window, 1 << 16},
                {"pool_kernel", &cp.pool_kernel, 1 << 16}, {"sink_tokens", &cp.sink_tokens, 1 << 24},
                {"head_groups", &cp.head_groups, 1 << 10}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int64_t v = 0;
        bool present = false;
        if ((rc = get_int(p, u, ints[i].name, 0, ints[i].hi, &v, &present)) != UC_OK) {
            snprintf(p->param, p->param_size, "uncomp.%s", ints[i].name);
            return rc;
        }
        if (present && v > 0) {
            *ints[i].dst = (int32_t)v;
        }
    }
    s = NULL;
    if ((rc = get_str(p, u, "decode_mode", &s)) != UC_OK) {
        return rc;
    }
    if (s && s[0] && !uc_decode_mode_parse(s, &cp.decode_mode)) {
        return bad(p, "uncomp.decode_mode", "uncomp.decode_mode must be append or evict");
    }
    s = NULL;
    if ((rc = get_str(p, u, "grouping", &s)) != UC_OK) {
        return rc;
    }
    if (s && s[0] && !uc_grouping_parse(s, &cp.grouping)) {
        return bad(p, "uncomp.grouping", "uncomp.grouping must be profile or prompt");
    }
    const cJSON *st = field(u, "stage_starts");
    if (st) {
        if (!cJSON_IsArray(st) || cJSON_GetArraySize(st) > UC_MAX_STAGES - 1) {
            return bad(p, "uncomp.stage_starts", "uncomp.stage_starts must be a list of at most "
                       "%d layers", UC_MAX_STAGES - 1);
        }
        cp.n_stage_starts = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, st) {
            if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > 1e6) {
                return bad(p, "uncomp.stage_starts", "uncomp.stage_starts holds a non-layer");
            }
            cp.stage_starts[cp.n_stage_starts++] = (int32_t)it->valuedouble;
        }
    }
    bool has_rmin = false;
    float rmin = 0;
    if ((rc = get_num(p, u, "r_min", 0, 1, true, &rmin, &has_rmin)) != UC_OK) {
        return rc;
    }
    if (has_rmin) {
        cp.r_min = rmin;
    }
    char why[256];
    if (uc_compress_params_validate(&cp, ctx->n_layers, why, sizeof why) != UC_OK) {
        return bad(p, "uncomp", "uncomp: %s", why);
    }
    r->base.has_compress = true;
    r->base.compress = cp;
    return UC_OK;
}

static uc_status parse_sampling(struct pctx *p, struct uc_oai_request *r, const cJSON *root)
{
    uc_status rc = UC_OK;
    struct uc_sampling_params sp = uc_sampling_default_params();
    float v = 0;
    bool present = false;
    TRY(get_num(p, root, "temperature", 0, 100, false, &v, &present));
    if (present) {
        sp.temperature = v;
    }
    TRY(get_num(p, root, "top_p", 0, 1, true, &v, &present));
    if (present) {
        sp.top_p = v;
    }
    TRY(get_num(p, root, "min_p", 0, 1, false, &v, &present));
    if (present) {
        sp.min_p = v;
    }
    TRY(get_num(p, root, "repetition_penalty", 0, 100, true, &v, &present));
    if (present) {
        sp.repetition_penalty = v;
    }
    TRY(get_num(p, root, "frequency_penalty", -2, 2, false, &v, &present));
    if (present) {
        sp.frequency_penalty = v;
    }
    TRY(get_num(p, root, "presence_penalty", -2, 2, false, &v, &present));
    if (present) {
        sp.presence_penalty = v;
    }
    int64_t k = 0;
    TRY(get_int(p, root, "top_k", -1, 1 << 24, &k, &present));
    if (present) {
        sp.top_k = k < 0 ? 0 : (int32_t)k; /* -1 = off, as vLLM */
    }
    int64_t seed = 0;
    TRY(get_int(p, root, "seed", -(1LL << 53), 1LL << 53, &seed, &present));
    if (present) {
        sp.has_seed = true;
        sp.seed = (uint64_t)seed;
    }
    char why[256];
    if (uc_sampling_params_validate(&sp, why, sizeof why) != UC_OK) {
        return bad(p, "sampling", "%s", why);
    }
    r->base.sampling = sp;
    return UC_OK;
out_fail:
    return rc;
}

uc_status uc_oai_parse(struct uc_oai_request *out, enum uc_oai_kind kind, const char *body,
                       size_t len, const struct uc_oai_ctx *ctx, int *status_out, char *msg,
                       size_t msg_size, char *param, size_t param_size)
{
    memset(out, 0, sizeof *out);
    uc_request_init(&out->base);
    out->kind = kind;
    out->n = 1;
    *status_out = 400;
    msg[0] = '\0';
    param[0] = '\0';
    struct pctx pc = {.msg = msg, .msg_size = msg_size, .param = param, .param_size = param_size};
    struct pctx *p = &pc;
    uc_status rc = UC_OK;
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!root) {
        rc = bad(p, "", "the body is not valid JSON");
        goto out_fail;
    }
    if (!cJSON_IsObject(root)) {
        rc = bad(p, "", "the body must be a JSON object");
        goto out_fail;
    }
    const char *model = NULL;
    TRY(get_str(p, root, "model", &model));
    if (model && model[0] && strcmp(model, ctx->model_name) != 0) {
        *status_out = 404;
        rc = bad(p, "model", "The model `%.64s` does not exist; this server serves `%.64s`",
                 model, ctx->model_name);
        goto out_fail;
    }
    snprintf(out->model, sizeof out->model, "%s", ctx->model_name);
    TRY(get_bool(p, root, "stream", &out->stream));
    const cJSON *so = field(root, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so)) {
            rc = bad(p, "stream_options", "stream_options must be an object");
            goto out_fail;
        }
        TRY(get_bool(p, so, "include_usage", &out->include_usage));
    }
    int64_t n = 1;
    TRY(get_int(p, root, "n", 1, UC_OAI_MAX_N, &n, NULL));
    out->n = (int32_t)n;
    int64_t best_of = n;
    bool has_best_of = false;
    TRY(get_int(p, root, "best_of", 1, UC_OAI_MAX_N, &best_of, &has_best_of));
    if (has_best_of && best_of != n) {
        rc = bad(p, "best_of", "best_of must equal n (best-of ranking is not supported)");
        goto out_fail;
    }
    const char *unsupported[] = {"suffix", "tools", "functions", "tool_choice", NULL};
    for (int i = 0; unsupported[i]; i++) {
        const cJSON *f = field(root, unsupported[i]);
        if (f && !(cJSON_IsArray(f) && cJSON_GetArraySize(f) == 0) &&
            !(cJSON_IsString(f) && (!strcmp(f->valuestring, "none") || !f->valuestring[0]))) {
            rc = bad(p, unsupported[i], "%s is not supported by this server", unsupported[i]);
            goto out_fail;
        }
    }
    const cJSON *lb = field(root, "logit_bias");
    if (lb && !(cJSON_IsObject(lb) && !lb->child)) {
        rc = bad(p, "logit_bias", "logit_bias is not supported by this server");
        goto out_fail;
    }
    const cJSON *rf = field(root, "response_format");
    if (rf) {
        const cJSON *t = cJSON_IsObject(rf) ? field(rf, "type") : NULL;
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "text") != 0) {
            rc = bad(p, "response_format", "response_format other than {\"type\": \"text\"} "
                     "is not supported");
            goto out_fail;
        }
    }
    const char *user = NULL;
    TRY(get_str(p, root, "user", &user));

    /* lengths */
    int64_t max_tokens = 0, mct = 0, min_tokens = 0;
    bool has_mt = false, has_mct = false;
    TRY(get_int(p, root, "max_tokens", 1, 1 << 30, &max_tokens, &has_mt));
    TRY(get_int(p, root, "max_completion_tokens", 1, 1 << 30, &mct, &has_mct));
    if (has_mct) {
        max_tokens = mct;
    }
    TRY(get_int(p, root, "min_tokens", 0, 1 << 30, &min_tokens, NULL));
    if (max_tokens && min_tokens > max_tokens) {
        rc = bad(p, "min_tokens", "min_tokens=%lld must be <= max_tokens=%lld",
                 (long long)min_tokens, (long long)max_tokens);
        goto out_fail;
    }
    out->base.max_tokens = (int32_t)max_tokens;
    out->base.min_tokens = (int32_t)min_tokens;
    TRY(get_bool(p, root, "ignore_eos", &out->base.ignore_eos));
    TRY(parse_sampling(p, out, root));

    /* logprobs */
    if (kind == UC_OAI_CHAT) {
        TRY(get_bool(p, root, "logprobs", &out->logprobs));
        int64_t top = 0;
        bool has_top = false;
        TRY(get_int(p, root, "top_logprobs", 0, 20, &top, &has_top));
        if (has_top && !out->logprobs) {
            rc = bad(p, "top_logprobs", "top_logprobs needs logprobs: true");
            goto out_fail;
        }
        out->top_logprobs = (int32_t)top;
    } else {
        int64_t lp = 0;
        bool has_lp = false;
        const cJSON *f = field(root, "logprobs");
        if (f && cJSON_IsBool(f)) {
            rc = bad(p, "logprobs", "logprobs of /v1/completions is an integer (0 to 20)");
            goto out_fail;
        }
        TRY(get_int(p, root, "logprobs", 0, 20, &lp, &has_lp));
        out->logprobs = has_lp;
        out->top_logprobs = (int32_t)lp;
        TRY(get_bool(p, root, "echo", &out->echo));
        /* echo with logprobs: the prompt tokens' logprobs lead each choice's (the first
         * token's is null, as in OpenAI and vLLM) */
        out->base.prompt_logprobs = out->echo && out->logprobs;
    }
    /* the scheduler's logprobs is "top-n per token"; 1 also gives the chosen token's */
    out->base.logprobs = out->logprobs ? (out->top_logprobs > 0 ? out->top_logprobs : 1) : 0;

    TRY(parse_stop(p, out, root));
    TRY(parse_stop_ids(p, out, ctx, root));
    TRY(parse_uncomp(p, out, ctx, root));
    if (kind == UC_OAI_CHAT) {
        TRY(parse_messages(p, out, ctx, root));
    } else {
        TRY(parse_prompt(p, out, ctx, field(root, "prompt")));
    }
    if ((int64_t)out->n_prompts * out->n > UC_OAI_MAX_CHOICES) {
        rc = bad(p, "n", "%d prompts x n=%d choices; at most %d in one request", out->n_prompts,
                 out->n, UC_OAI_MAX_CHOICES);
        goto out_fail;
    }
    cJSON_Delete(root);
    return UC_OK;
out_fail:
    if (rc == UC_ERR_NOMEM && !msg[0]) {
        snprintf(msg, msg_size, "out of memory");
    }
    cJSON_Delete(root);
    uc_oai_request_fini(out);
    return rc;
}

void uc_oai_request_fini(struct uc_oai_request *r)
{
    for (int32_t i = 0; i < r->n_prompts; i++) {
        uc_free(r->prompts[i]);
        uc_free(r->prompt_text[i]);
    }
    UC_FREE(r->prompts);
    UC_FREE(r->n_prompt);
    UC_FREE(r->prompt_text);
    UC_FREE(r->prompt_text_len);
    for (int32_t i = 0; r->stop && i < r->base.n_stop; i++) {
        uc_free(r->stop[i]);
    }
    UC_FREE(r->stop);
    UC_FREE(r->stop_ids);
    r->n_prompts = 0;
    r->base.stop = NULL;
    r->base.n_stop = 0;
    r->base.stop_ids = NULL;
    r->base.n_stop_ids = 0;
}

void uc_oai_choice_request(const struct uc_oai_request *r, int32_t i, struct uc_request *out)
{
    *out = r->base;
    int32_t p = i / r->n;
    out->prompt = r->prompts[p];
    out->n_prompt = r->n_prompt[p];
    if (out->sampling.has_seed) {
        out->sampling.seed += (uint64_t)(i % r->n);
    }
}

/* ---- responses ------------------------------------------------------------------------------ */

/* cJSON text (malloc'd by cJSON) as a uc_malloc'd string */
static char *print_take(cJSON *o)
{
    char *j = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!j) {
        return NULL;
    }
    char *s = uc_strdup(j);
    cJSON_free(j);
    return s;
}

int uc_oai_http_status(uc_status st)
{
    switch (st) {
    case UC_OK:
        return 200;
    case UC_ERR_INVALID_ARG:
    case UC_ERR_FORMAT:
    case UC_ERR_UNSUPPORTED:
        return 400;
    case UC_ERR_KV_FULL:
        return 429;
    case UC_ERR_UNAVAILABLE:
        return 503;
    case UC_ERR_TIMEOUT:
        return 408;
    case UC_ERR_CANCELLED:
        return 499;
    default:
        return 500;
    }
}

char *uc_oai_error_json(int http_status, const char *message, const char *param)
{
    const char *type, *code;
    switch (http_status) {
    case 400: type = "invalid_request_error"; code = "invalid_request"; break;
    case 401: type = "authentication_error"; code = "invalid_api_key"; break;
    case 404: type = "not_found_error"; code = "model_not_found"; break;
    case 405: type = "invalid_request_error"; code = "method_not_allowed"; break;
    case 408: type = "timeout_error"; code = "timeout"; break;
    case 413: type = "invalid_request_error"; code = "request_too_large"; break;
    case 429: type = "rate_limit_error"; code = "server_busy"; break;
    case 503: type = "service_unavailable_error"; code = "unavailable"; break;
    default: type = "server_error"; code = "internal_error"; break;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(e, "message", message ? message : "");
    cJSON_AddStringToObject(e, "type", type);
    if (param && param[0]) {
        cJSON_AddStringToObject(e, "param", param);
    } else {
        cJSON_AddNullToObject(e, "param");
    }
    cJSON_AddStringToObject(e, "code", code);
    return print_take(o);
}

const char *uc_oai_finish_name(enum uc_finish_reason f)
{
    switch (f) {
    case UC_FINISH_STOP:
        return "stop";
    case UC_FINISH_LENGTH:
        return "length";
    case UC_FINISH_ABORTED:
        return "abort";
    default:
        return "error";
    }
}

void uc_oai_choice_init(struct uc_oai_choice *c, int32_t index)
{
    memset(c, 0, sizeof *c);
    c->index = index;
    uc_buf_init(&c->text);
}

void uc_oai_choice_fini(struct uc_oai_choice *c)
{
    uc_buf_fini(&c->text);
    cJSON_Delete(c->logprobs);
    c->logprobs = NULL;
}

static char *token_text(const struct uc_tokenizer *tok, int32_t id)
{
    char *s = NULL;
    size_t n = 0;
    if (uc_tokenizer_decode(tok, &id, 1, false, &s, &n) != UC_OK) {
        return NULL;
    }
    return s;
}

static cJSON *bytes_of(const char *s)
{
    cJSON *a = cJSON_CreateArray();
    for (const unsigned char *p = (const unsigned char *)s; a && *p; p++) {
        cJSON_AddItemToArray(a, cJSON_CreateNumber(*p));
    }
    return a;
}

void uc_oai_add_logprobs(cJSON **lp, enum uc_oai_kind kind, const struct uc_tokenizer *tok,
                         const int32_t *ids, int32_t n_ids,
                         const struct uc_token_logprob *lp_in, int32_t top_n,
                         size_t *text_offset)
{
    if (!*lp) {
        *lp = cJSON_CreateObject();
        if (!*lp) {
            return;
        }
        if (kind == UC_OAI_CHAT) {
            cJSON_AddArrayToObject(*lp, "content");
        } else {
            cJSON_AddArrayToObject(*lp, "tokens");
            cJSON_AddArrayToObject(*lp, "token_logprobs");
            cJSON_AddArrayToObject(*lp, "top_logprobs");
            cJSON_AddArrayToObject(*lp, "text_offset");
        }
    }
    for (int32_t i = 0; i < n_ids; i++) {
        char *t = token_text(tok, ids[i]);
        const char *ts = t ? t : "";
        double lpv = lp_in ? lp_in[i].logprob : 0.0;
        int32_t nt = lp_in ? lp_in[i].n_top : 0;
        if (nt > top_n) {
            nt = top_n;
        }
        if (kind == UC_OAI_CHAT) {
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "token", ts);
            cJSON_AddNumberToObject(e, "logprob", lpv);
            cJSON_AddItemToObject(e, "bytes", bytes_of(ts));
            cJSON *tops = cJSON_AddArrayToObject(e, "top_logprobs");
            for (int32_t k = 0; k < nt; k++) {
                char *tt = token_text(tok, lp_in[i].top_ids[k]);
                cJSON *o = cJSON_CreateObject();
                cJSON_AddStringToObject(o, "token", tt ? tt : "");
                cJSON_AddNumberToObject(o, "logprob", lp_in[i].top_logprobs[k]);
                cJSON_AddItemToObject(o, "bytes", bytes_of(tt ? tt : ""));
                cJSON_AddItemToArray(tops, o);
                uc_free(tt);
            }
            cJSON_AddItemToArray(cJSON_GetObjectItem(*lp, "content"), e);
        } else {
            cJSON_AddItemToArray(cJSON_GetObjectItem(*lp, "tokens"), cJSON_CreateString(ts));
            /* a prompt's first token has no logprob (NaN): null, and null alternatives */
            bool none = isnan(lpv);
            cJSON_AddItemToArray(cJSON_GetObjectItem(*lp, "token_logprobs"),
                                 none ? cJSON_CreateNull() : cJSON_CreateNumber(lpv));
            cJSON *tops = none ? cJSON_CreateNull() : cJSON_CreateObject();
            for (int32_t k = 0; k < nt; k++) {
                char *tt = token_text(tok, lp_in[i].top_ids[k]);
                if (!cJSON_GetObjectItemCaseSensitive(tops, tt ? tt : "")) {
                    cJSON_AddNumberToObject(tops, tt ? tt : "", lp_in[i].top_logprobs[k]);
                }
                uc_free(tt);
            }
            cJSON_AddItemToArray(cJSON_GetObjectItem(*lp, "top_logprobs"), tops);
            cJSON_AddItemToArray(cJSON_GetObjectItem(*lp, "text_offset"),
                                 cJSON_CreateNumber((double)*text_offset));
            *text_offset += strlen(ts);
        }
        uc_free(t);
    }
}

static void add_usage(cJSON *o, const struct uc_oai_request *r,
                      const struct uc_oai_choice *choices, int32_t n)
{
    int64_t prompt = 0, completion = 0;
    for (int32_t i = 0; i < n; i++) {
        completion += choices[i].completion_tokens;
        if (i % r->n == 0) { /* each prompt counts once, whatever n */
            prompt += choices[i].prompt_tokens;
        }
    }
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)completion);
    cJSON_AddNumberToObject(u, "total_tokens", (double)(prompt + completion));
}

static void add_report(cJSON *o, const struct uc_oai_choice *c)
{
    if (!c || !c->has_report) {
        return;
    }
    const struct uc_compress_report *rp = &c->report;
    cJSON *u = cJSON_AddObjectToObject(o, "uncomp");
    cJSON_AddStringToObject(u, "policy", uc_policy_name(rp->policy));
    cJSON_AddNumberToObject(u, "kv_budget", rp->kv_budget);
    cJSON_AddNumberToObject(u, "kv_tokens_full", (double)rp->kv_tokens_full);
    cJSON_AddNumberToObject(u, "kv_tokens_kept", (double)rp->kv_tokens_kept);
    cJSON_AddNumberToObject(u, "kv_bytes_full", (double)rp->kv_bytes_full);
    cJSON_AddNumberToObject(u, "kv_bytes_kept", (double)rp->kv_bytes_kept);
    cJSON_AddNumberToObject(u, "ratio", isfinite(rp->ratio) ? rp->ratio : 0.0);
    cJSON_AddNumberToObject(u, "compress_ms", rp->compress_ms);
    cJSON *t = cJSON_AddObjectToObject(u, "timing_ms");
    cJSON_AddNumberToObject(t, "queue", c->timing.queue_ms);
    cJSON_AddNumberToObject(t, "ttft", c->timing.ttft_ms);
    cJSON_AddNumberToObject(t, "prefill", c->timing.prefill_ms);
    cJSON_AddNumberToObject(t, "decode", c->timing.decode_ms);
    cJSON_AddNumberToObject(t, "total", c->timing.total_ms);
}

static cJSON *head(const struct uc_oai_request *r, const char *id, int64_t created,
                   const char *model, bool chunk)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "object", r->kind == UC_OAI_CHAT
                                             ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                             : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)created);
    cJSON_AddStringToObject(o, "model", model);
    return o;
}

char *uc_oai_response_json(const struct uc_oai_request *r, const char *id, int64_t created,
                           const char *model, struct uc_oai_choice *choices, int32_t n_choices)
{
    cJSON *o = head(r, id, created, model, false);
    cJSON *arr = cJSON_AddArrayToObject(o, "choices");
    for (int32_t i = 0; i < n_choices; i++) {
        struct uc_oai_choice *c = &choices[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", c->index);
        const char *text = c->text.data ? c->text.data : "";
        if (r->kind == UC_OAI_CHAT) {
            cJSON *m = cJSON_AddObjectToObject(ch, "message");
            cJSON_AddStringToObject(m, "role", "assistant");
            cJSON_AddStringToObject(m, "content", text);
        } else {
            cJSON_AddStringToObject(ch, "text", text);
        }
        if (c->logprobs) {
            cJSON_AddItemToObject(ch, "logprobs", c->logprobs);
            c->logprobs = NULL;
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
        cJSON_AddStringToObject(ch, "finish_reason", uc_oai_finish_name(c->finish));
        cJSON_AddItemToArray(arr, ch);
    }
    add_usage(o, r, choices, n_choices);
    add_report(o, n_choices ? &choices[0] : NULL);
    return print_take(o);
}

static char *sse(cJSON *o)
{
    char *j = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!j) {
        return NULL;
    }
    size_t n = strlen(j);
    char *s = uc_malloc(n + 9);
    if (s) {
        memcpy(s, "data: ", 6);
        memcpy(s + 6, j, n);
        memcpy(s + 6 + n, "\n\n", 3);
    }
    cJSON_free(j);
    return s;
}

char *uc_oai_chunk_sse(const struct uc_oai_request *r, const char *id, int64_t created,
                       const char *model, int32_t choice, bool role, const char *text,
                       size_t text_len, cJSON *logprobs, enum uc_finish_reason finish,
                       const struct uc_oai_choice *usage_from, int32_t n_usage,
                       const struct uc_oai_choice *report_from)
{
    cJSON *o = head(r, id, created, model, true);
    cJSON *arr = cJSON_AddArrayToObject(o, "choices");
    if (choice >= 0) {
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", choice);
        cJSON *t = cJSON_CreateStringReference("");
        if (text_len) {
            char *tmp = uc_malloc(text_len + 1);
            if (tmp) {
                memcpy(tmp, text, text_len);
                tmp[text_len] = '\0';
                cJSON_Delete(t);
                t = cJSON_CreateString(tmp);
                uc_free(tmp);
            }
        }
        if (r->kind == UC_OAI_CHAT) {
            cJSON *d = cJSON_AddObjectToObject(ch, "delta");
            if (role) {
                cJSON_AddStringToObject(d, "role", "assistant");
            }
            if (finish == UC_FINISH_NONE || text_len) {
                cJSON_AddItemToObject(d, "content", t);
            } else {
                cJSON_Delete(t);
            }
        } else {
            cJSON_AddItemToObject(ch, "text", t);
        }
        if (logprobs) {
            cJSON_AddItemToObject(ch, "logprobs", logprobs);
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
        if (finish != UC_FINISH_NONE) {
            cJSON_AddStringToObject(ch, "finish_reason", uc_oai_finish_name(finish));
        } else {
            cJSON_AddNullToObject(ch, "finish_reason");
        }
        cJSON_AddItemToArray(arr, ch);
    } else {
        cJSON_Delete(logprobs);
    }
    if (usage_from) {
        add_usage(o, r, usage_from, n_usage);
    } else if (r->include_usage) {
        cJSON_AddNullToObject(o, "usage");
    }
    add_report(o, report_from);
    return sse(o);
}

char *uc_oai_models_json(const char *model, int64_t created, int64_t max_model_len)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *d = cJSON_AddArrayToObject(o, "data");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", model);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)created);
    cJSON_AddStringToObject(m, "owned_by", "uncomp");
    cJSON_AddNumberToObject(m, "max_model_len", (double)max_model_len);
    cJSON_AddItemToArray(d, m);
    return print_take(o);
}
