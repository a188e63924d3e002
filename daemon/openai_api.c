/* The OpenAI request model (openai_api.h): decoding the JSON bodies into the request model both
 * fronts share (request.h), then the response, chunk and error JSON. Decoding checks the JSON
 * shapes only (a number, a list, a string, OpenAI's fields this server does not take); every
 * value is checked by uc_req_validate, as gRPC's are. */
#include "openai_api.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "base/mem.h"
#include "chat_template.h"
#include "tokenizer.h"

/* ---- decoding helpers ----------------------------------------------------------------------- */

/* Integers JSON carries exactly (a double's 53 bits): wider values are refused while decoding,
 * the meaningful ranges by validation. */
#define JSON_INT_MAX (1LL << 53)

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

static uc_status nomem(struct pctx *p)
{
    snprintf(p->msg, p->msg_size, "out of memory");
    p->param[0] = '\0';
    return UC_ERR_NOMEM;
}

static const cJSON *field(const cJSON *o, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, name);
    return f && !cJSON_IsNull(f) ? f : NULL; /* null means "not set" */
}

/* An integer field in [lo, hi]; absent leaves *out. `param` names it (NULL: name). */
static uc_status get_int_named(struct pctx *p, const cJSON *o, const char *name,
                               const char *param, int64_t lo, int64_t hi, int64_t *out,
                               bool *present)
{
    const cJSON *f = field(o, name);
    if (present) {
        *present = f != NULL;
    }
    if (!f) {
        return UC_OK;
    }
    param = param ? param : name;
    if (!cJSON_IsNumber(f) || f->valuedouble != floor(f->valuedouble) ||
        !isfinite(f->valuedouble)) {
        return bad(p, param, "%s must be an integer", param);
    }
    if (f->valuedouble < (double)lo || f->valuedouble > (double)hi) {
        return bad(p, param, "%s=%.0f must be in [%lld, %lld]", param, f->valuedouble,
                   (long long)lo, (long long)hi);
    }
    *out = (int64_t)f->valuedouble;
    return UC_OK;
}

static uc_status get_int(struct pctx *p, const cJSON *o, const char *name, int64_t *out,
                         bool *present)
{
    return get_int_named(p, o, name, NULL, -JSON_INT_MAX, JSON_INT_MAX, out, present);
}

static uc_status get_num(struct pctx *p, const cJSON *o, const char *name, const char *param,
                         double *out, bool *present)
{
    const cJSON *f = field(o, name);
    if (present) {
        *present = f != NULL;
    }
    if (!f) {
        return UC_OK;
    }
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble)) {
        return bad(p, param ? param : name, "%s must be a number", param ? param : name);
    }
    *out = f->valuedouble;
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

static uc_status get_str(struct pctx *p, const cJSON *o, const char *name, const char *param,
                         const char **out)
{
    const cJSON *f = field(o, name);
    if (!f) {
        return UC_OK;
    }
    if (!cJSON_IsString(f)) {
        return bad(p, param ? param : name, "%s must be a string", param ? param : name);
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

/* A list of integers (token ids, layers) into out[0..n) (allocated here). `name` names the list
 * in messages, `param` the field. */
static uc_status ints_of(struct pctx *p, const cJSON *a, const char *name, const char *param,
                         int64_t **out, size_t *n_out)
{
    if (uc_req_alloc_i64(out, n_out, (size_t)cJSON_GetArraySize(a)) != UC_OK) {
        return nomem(p);
    }
    size_t i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, a) {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) ||
            fabs(t->valuedouble) > (double)JSON_INT_MAX) {
            return bad(p, param, "%s[%zu] must be an integer", name, i);
        }
        (*out)[i++] = (int64_t)t->valuedouble;
    }
    return UC_OK;
}

/* ---- decoding -------------------------------------------------------------------------------- */

static uc_status decode_prompt(struct pctx *p, struct uc_req *g, const cJSON *pr)
{
    if (!pr) {
        return UC_OK; /* validation: the prompt is missing */
    }
    bool list = cJSON_IsArray(pr);
    bool ids_only = list && pr->child && cJSON_IsNumber(pr->child);
    if (list && !pr->child) {
        return bad(p, "prompt", "prompt is an empty list");
    }
    g->prompt_list = list && !ids_only;
    const cJSON *it = g->prompt_list ? pr->child : pr;
    for (int i = 0; it; i++, it = g->prompt_list ? it->next : NULL) {
        char name[32];
        snprintf(name, sizeof name, g->prompt_list ? "prompt[%d]" : "prompt", i);
        if (cJSON_IsString(it)) {
            if (uc_req_add_text(g, it->valuestring, strlen(it->valuestring)) != UC_OK) {
                return nomem(p);
            }
        } else if (cJSON_IsArray(it)) {
            int64_t *ids = NULL;
            size_t n = 0;
            uc_status rc = ints_of(p, it, name, "prompt", &ids, &n);
            int64_t *dst = rc == UC_OK ? uc_req_add_ids(g, (int64_t)n) : NULL;
            if (dst && n) {
                memcpy(dst, ids, n * sizeof *ids);
            }
            uc_free(ids);
            if (rc != UC_OK) {
                return rc;
            }
            if (!dst) {
                return nomem(p);
            }
        } else {
            return bad(p, "prompt", "%s must be a string, a list of strings or token ids", name);
        }
    }
    return UC_OK;
}

/* Chat: the messages and template variables move into the request (validation checks them). */
static uc_status decode_messages(struct pctx *p, struct uc_req *g, cJSON *root)
{
    uc_status rc = get_bool(p, root, "add_generation_prompt", &g->add_generation_prompt);
    if (rc != UC_OK) {
        return rc;
    }
    const cJSON *kw = field(root, "chat_template_kwargs");
    if (kw && !cJSON_IsObject(kw)) {
        return bad(p, "chat_template_kwargs", "chat_template_kwargs must be an object");
    }
    if (kw) {
        g->template_kwargs = cJSON_DetachItemFromObjectCaseSensitive(root, "chat_template_kwargs");
    }
    g->messages = cJSON_DetachItemFromObjectCaseSensitive(root, "messages");
    return UC_OK;
}

static uc_status decode_stop(struct pctx *p, struct uc_req *g, const cJSON *root)
{
    const cJSON *s = field(root, "stop");
    if (s && !cJSON_IsArray(s) && !cJSON_IsString(s)) {
        return bad(p, "stop", "stop must be a string or a list of strings");
    }
    const cJSON *it = !s ? NULL : cJSON_IsArray(s) ? s->child : s;
    for (int i = 0; it; i++, it = cJSON_IsArray(s) ? it->next : NULL) {
        if (!cJSON_IsString(it)) {
            return bad(p, "stop", "stop[%d] must be a string", i);
        }
        if (uc_req_add_stop(g, it->valuestring, strlen(it->valuestring)) != UC_OK) {
            return nomem(p);
        }
    }
    const cJSON *a = field(root, "stop_token_ids");
    if (!a) {
        return UC_OK;
    }
    if (!cJSON_IsArray(a)) {
        return bad(p, "stop_token_ids", "stop_token_ids must be a list of token ids");
    }
    return ints_of(p, a, "stop_token_ids", "stop_token_ids", &g->stop_ids, &g->n_stop_ids);
}

static uc_status decode_uncomp(struct pctx *p, struct uc_req *g, const cJSON *root)
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
                                        "grouping", "stage_starts", "r_min",
                                        "think_ratio", "minicache_t", "minicache_gamma",
                                        "minicache_start", "lorc_ratio", NULL};
    const cJSON *f;
    cJSON_ArrayForEach(f, u) {
        bool ok = false;
        for (int i = 0; known[i]; i++) {
            ok = ok || strcmp(f->string, known[i]) == 0;
        }
        if (!ok) {
            return bad(p, "uncomp", "uncomp.%.40s is not a compression parameter (policy, "
                       "kv_budget, window, pool_kernel, sink_tokens, head_groups, decode_mode, "
                       "grouping, stage_starts, r_min, think_ratio, minicache_t, minicache_gamma, "
                       "minicache_start, lorc_ratio)", f->string);
        }
    }
    g->has_compress = true;
    struct uc_req_compress *c = &g->compress;
    uc_status rc;
    static const struct {
        const char *name, *param;
        size_t off;
    } strs[] = {
        {"policy", "uncomp.policy", offsetof(struct uc_req_compress, policy)},
        {"decode_mode", "uncomp.decode_mode", offsetof(struct uc_req_compress, decode_mode)},
        {"grouping", "uncomp.grouping", offsetof(struct uc_req_compress, grouping)},
    };
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        const char *s = NULL;
        if ((rc = get_str(p, u, strs[i].name, strs[i].param, &s)) != UC_OK) {
            return rc;
        }
        if (s && uc_req_set_str((char **)((char *)c + strs[i].off), s) != UC_OK) {
            return nomem(p);
        }
    }
    static const struct {
        const char *name, *param;
        size_t off;
    } ints[] = {
        {"kv_budget", "uncomp.kv_budget", offsetof(struct uc_req_compress, kv_budget)},
        {"window", "uncomp.window", offsetof(struct uc_req_compress, window)},
        {"pool_kernel", "uncomp.pool_kernel", offsetof(struct uc_req_compress, pool_kernel)},
        {"sink_tokens", "uncomp.sink_tokens", offsetof(struct uc_req_compress, sink_tokens)},
        {"head_groups", "uncomp.head_groups", offsetof(struct uc_req_compress, head_groups)},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int64_t v = 0;
        rc = get_int_named(p, u, ints[i].name, ints[i].param, -JSON_INT_MAX, JSON_INT_MAX, &v,
                           NULL);
        if (rc != UC_OK) {
            return rc;
        }
        memcpy((char *)c + ints[i].off, &v, sizeof v);
    }
    const cJSON *st = field(u, "stage_starts");
    if (st) {
        if (!cJSON_IsArray(st)) {
            return bad(p, "uncomp.stage_starts", "uncomp.stage_starts must be a list of layers");
        }
        rc = ints_of(p, st, "uncomp.stage_starts", "uncomp.stage_starts", &c->stage_starts,
                     &c->n_stage_starts);
        if (rc != UC_OK) {
            return rc;
        }
    }
    rc = get_num(p, u, "r_min", "uncomp.r_min", &c->r_min, &c->has_r_min);
    if (rc != UC_OK) {
        return rc;
    }
    rc = get_num(p, u, "think_ratio", "uncomp.think_ratio", &c->think_ratio,
                 &c->has_think_ratio);
    if (rc != UC_OK) {
        return rc;
    }
    rc = get_num(p, u, "minicache_t", "uncomp.minicache_t", &c->minicache_t,
                 &c->has_minicache_t);
    if (rc != UC_OK) {
        return rc;
    }
    rc = get_num(p, u, "minicache_gamma", "uncomp.minicache_gamma", &c->minicache_gamma,
                 &c->has_minicache_gamma);
    if (rc != UC_OK) {
        return rc;
    }
    double start = 0.0;
    bool has_start = false;
    rc = get_num(p, u, "minicache_start", "uncomp.minicache_start", &start, &has_start);
    if (rc != UC_OK) {
        return rc;
    }
    if (has_start) {
        if (!(start >= 0.0 && start <= 65536.0) || start != floor(start)) {
            return bad(p, "uncomp", "uncomp.minicache_start=%g must be a layer number", start);
        }
        c->has_minicache_start = true;
        c->minicache_start = (int64_t)start;
    }
    return get_num(p, u, "lorc_ratio", "uncomp.lorc_ratio", &c->lorc_ratio, &c->has_lorc_ratio);
}

static uc_status decode_sampling(struct pctx *p, struct uc_req *g, const cJSON *root)
{
    uc_status rc = UC_OK;
    bool present = false;
    TRY(get_num(p, root, "temperature", NULL, &g->temperature, &g->has_temperature));
    TRY(get_num(p, root, "top_p", NULL, &g->top_p, &g->has_top_p));
    TRY(get_num(p, root, "min_p", NULL, &g->min_p, &g->has_min_p));
    TRY(get_num(p, root, "repetition_penalty", NULL, &g->repetition_penalty,
                &g->has_repetition_penalty));
    TRY(get_num(p, root, "frequency_penalty", NULL, &g->frequency_penalty, NULL));
    TRY(get_num(p, root, "presence_penalty", NULL, &g->presence_penalty, NULL));
    TRY(get_int(p, root, "top_k", &g->top_k, NULL)); /* -1 = off, as vLLM */
    int64_t seed = 0;
    TRY(get_int(p, root, "seed", &seed, &present));
    g->has_seed = present;
    g->seed = (uint64_t)seed;
    /* lengths: max_completion_tokens (the newer name) wins */
    int64_t mct = 0;
    bool has_mct = false;
    TRY(get_int(p, root, "max_tokens", &g->max_tokens, &g->has_max_tokens));
    TRY(get_int(p, root, "max_completion_tokens", &mct, &has_mct));
    if (has_mct) {
        g->max_tokens = mct;
        g->has_max_tokens = true;
    }
    TRY(get_int(p, root, "min_tokens", &g->min_tokens, NULL));
    TRY(get_bool(p, root, "ignore_eos", &g->ignore_eos));
    return UC_OK;
out_fail:
    return rc;
}

static uc_status decode_logprobs(struct pctx *p, struct uc_req *g, enum uc_oai_kind kind,
                                 const cJSON *root)
{
    uc_status rc = UC_OK;
    if (kind == UC_OAI_CHAT) {
        bool has_top = false;
        TRY(get_bool(p, root, "logprobs", &g->logprobs));
        TRY(get_int(p, root, "top_logprobs", &g->top_logprobs, &has_top));
        if (has_top && !g->logprobs) {
            return bad(p, "top_logprobs", "top_logprobs needs logprobs: true");
        }
        return UC_OK;
    }
    const cJSON *f = field(root, "logprobs");
    if (f && cJSON_IsBool(f)) {
        return bad(p, "logprobs", "logprobs of /v1/completions is an integer (0 to 20)");
    }
    TRY(get_int(p, root, "logprobs", &g->top_logprobs, &g->logprobs));
    /* echo with logprobs: the prompt tokens' logprobs lead each choice's (the first token's is
     * null, as in OpenAI and vLLM) */
    TRY(get_bool(p, root, "echo", &g->echo));
    return UC_OK;
out_fail:
    return rc;
}

/* The fields of OpenAI's API this server refuses, and the HTTP-only ones. */
static uc_status decode_unsupported(struct pctx *p, const cJSON *root, int64_t n)
{
    uc_status rc = UC_OK;
    int64_t best_of = n;
    bool has_best_of = false;
    TRY(get_int_named(p, root, "best_of", NULL, 1, UC_REQ_MAX_N, &best_of, &has_best_of));
    if (has_best_of && best_of != n) {
        return bad(p, "best_of", "best_of must equal n (best-of ranking is not supported)");
    }
    static const char *const unsupported[] = {"suffix", "tools", "functions", "tool_choice",
                                              NULL};
    for (int i = 0; unsupported[i]; i++) {
        const cJSON *f = field(root, unsupported[i]);
        if (f && !(cJSON_IsArray(f) && cJSON_GetArraySize(f) == 0) &&
            !(cJSON_IsString(f) && (!strcmp(f->valuestring, "none") || !f->valuestring[0]))) {
            return bad(p, unsupported[i], "%s is not supported by this server", unsupported[i]);
        }
    }
    const cJSON *lb = field(root, "logit_bias");
    if (lb && !(cJSON_IsObject(lb) && !lb->child)) {
        return bad(p, "logit_bias", "logit_bias is not supported by this server");
    }
    const cJSON *rf = field(root, "response_format");
    if (rf) {
        const cJSON *t = cJSON_IsObject(rf) ? field(rf, "type") : NULL;
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "text") != 0) {
            return bad(p, "response_format", "response_format other than {\"type\": \"text\"} "
                       "is not supported");
        }
    }
    const char *user = NULL;
    TRY(get_str(p, root, "user", NULL, &user));
    return UC_OK;
out_fail:
    return rc;
}

uc_status uc_oai_decode(struct uc_oai_request *out, enum uc_oai_kind kind, const char *body,
                        size_t len, const struct uc_oai_ctx *ctx, int *status_out, char *msg,
                        size_t msg_size, char *param, size_t param_size)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    uc_req_init(&out->gen, UC_REQ_FRONT_HTTP,
                kind == UC_OAI_CHAT ? UC_REQ_CHAT : UC_REQ_COMPLETION);
    *status_out = 400;
    msg[0] = '\0';
    param[0] = '\0';
    struct pctx pc = {.msg = msg, .msg_size = msg_size, .param = param, .param_size = param_size};
    struct pctx *p = &pc;
    struct uc_req *g = &out->gen;
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
    TRY(get_str(p, root, "model", NULL, &model));
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
    TRY(get_int(p, root, "n", &g->n, NULL));
    TRY(decode_unsupported(p, root, g->n));
    TRY(decode_sampling(p, g, root));
    TRY(decode_logprobs(p, g, kind, root));
    TRY(decode_stop(p, g, root));
    TRY(decode_uncomp(p, g, root));
    if (kind == UC_OAI_CHAT) {
        TRY(decode_messages(p, g, root));
    } else {
        TRY(decode_prompt(p, g, field(root, "prompt")));
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

uc_status uc_oai_parse(struct uc_oai_request *out, enum uc_oai_kind kind, const char *body,
                       size_t len, const struct uc_oai_ctx *ctx, int *status_out, char *msg,
                       size_t msg_size, char *param, size_t param_size)
{
    uc_status rc = uc_oai_decode(out, kind, body, len, ctx, status_out, msg, msg_size, param,
                                 param_size);
    if (rc != UC_OK) {
        return rc;
    }
    struct uc_req_error err;
    rc = uc_req_validate(&out->gen, &ctx->req, &err);
    if (rc != UC_OK) {
        snprintf(msg, msg_size, "%s", err.message);
        snprintf(param, param_size, "%s", err.param);
        uc_oai_request_fini(out);
    }
    return rc;
}

void uc_oai_request_fini(struct uc_oai_request *r)
{
    uc_req_fini(&r->gen);
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
        if (i % r->gen.n == 0) { /* each prompt counts once, whatever n */
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
    struct uc_compress_params named = uc_compress_default_params();
    named.policy = rp->policy;
    named.stages = rp->stages;
    char pname[64];
    uc_policy_spec_name(&named, pname, sizeof pname);
    cJSON_AddStringToObject(u, "policy", pname);
    cJSON_AddNumberToObject(u, "shared_layers", rp->n_shared_layers);
    cJSON_AddNumberToObject(u, "kv_budget", rp->kv_budget);
    cJSON_AddNumberToObject(u, "kv_tokens_full", (double)rp->kv_tokens_full);
    cJSON_AddNumberToObject(u, "kv_tokens_kept", (double)rp->kv_tokens_kept);
    cJSON_AddNumberToObject(u, "kv_bytes_full", (double)rp->kv_bytes_full);
    cJSON_AddNumberToObject(u, "kv_bytes_kept", (double)rp->kv_bytes_kept);
    cJSON_AddNumberToObject(u, "key_channels", (double)rp->key_channels);
    if (rp->minicache_pairs > 0) {
        cJSON *mc = cJSON_AddObjectToObject(u, "minicache");
        if (mc) {
            cJSON_AddNumberToObject(mc, "pairs", rp->minicache_pairs);
            cJSON_AddNumberToObject(mc, "start", rp->minicache_start);
            cJSON *ly = cJSON_AddArrayToObject(mc, "layers");
            for (int32_t i = 0; ly && i < rp->minicache_pairs && i < UC_MINICACHE_MAX_PAIRS; i++) {
                cJSON_AddItemToArray(ly, cJSON_CreateNumber(rp->minicache_first[i]));
            }
            cJSON_AddNumberToObject(mc, "merged", (double)rp->minicache_merged);
            cJSON_AddNumberToObject(mc, "retained", (double)rp->minicache_retained);
        }
    }
    if (rp->lorc_ratio > 0.0f) {
        cJSON_AddNumberToObject(u, "lorc_ratio", (double)rp->lorc_ratio);
        cJSON_AddNumberToObject(u, "lorc_rank_first", rp->lorc_rank_first);
        cJSON_AddNumberToObject(u, "lorc_rank_last", rp->lorc_rank_last);
    }
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
