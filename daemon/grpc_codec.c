/* The protobuf codec of the gRPC API (grpc_codec.h). Top to bottom: the per-message arena and
 * the wire helpers (text with its NUL bytes), the method table, request decoding (Generate and
 * Chat into struct uc_req, the others into plain fields), request validation, then the response
 * encoders (stream chunks and Completes from copied scheduler events, unary replies). The gRPC
 * header included here is <grpc/status.h> alone, for the status code names: nothing of the
 * network. */
#include "grpc_codec.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <grpc/status.h>

#include "admin.h"
#include "base/log.h"
#include "base/mem.h"
#include "base/pbwire.h"
#include "compress/profile.h"
#include "grpc/health/v1/health.pb-c.h"
#include "metrics.h"
#include "model_config.h"
#include "tokenizer.h"
#include "uncomp/v1/uncomp.pb-c.h"

/* ---- arena ----------------------------------------------------------------------------------- */

/* A per-message arena: unpacked requests (as their ProtobufCAllocator) and response messages
 * under construction; everything is freed at once by arena_fini. */
struct arena_blk {
    struct arena_blk *next;
    size_t pad; /* keeps the payload 16-byte aligned */
};

struct arena {
    struct arena_blk *head;
    bool oom;                  /* an allocation failed */
    ProtobufCAllocator pb;     /* allocates from this arena (free is a no-op) */
};

static void *arena_alloc(struct arena *a, size_t size_bytes);

static void *arena_pb_alloc(void *data, size_t size) { return arena_alloc(data, size); }
static void arena_pb_free(void *data, void *p)
{
    (void)data;
    (void)p;
}

static void arena_init(struct arena *a)
{
    a->head = NULL;
    a->oom = false;
    a->pb.alloc = arena_pb_alloc;
    a->pb.free = arena_pb_free;
    a->pb.allocator_data = a;
}

static void *arena_alloc(struct arena *a, size_t size_bytes)
{
    if (size_bytes > SIZE_MAX - sizeof(struct arena_blk) - 16) {
        a->oom = true;
        return NULL;
    }
    struct arena_blk *b = uc_calloc(1, sizeof *b + size_bytes + 1);
    if (!b) {
        a->oom = true;
        return NULL;
    }
    b->next = a->head;
    a->head = b;
    return b + 1;
}

static void arena_fini(struct arena *a)
{
    struct arena_blk *b = a->head;
    while (b) {
        struct arena_blk *n = b->next;
        uc_free(b);
        b = n;
    }
    a->head = NULL;
}

/* ---- wire helpers ---------------------------------------------------------------------------- */

/* The bytes of a text field as sent, NUL bytes included (protobuf-c's copy stops at the first
 * one). `path` is the field numbers from the request down to the field; `index` the occurrence
 * of a repeated one (SIZE_MAX for a singular field). Falls back to the unpacked string. */
static const char *raw_text(const uint8_t *raw, size_t raw_len, const uint32_t *path, int depth,
                            size_t index, const char *unpacked, size_t *len)
{
    const uint8_t *d = NULL;
    size_t n = 0;
    if (uc_pb_find_bytes(raw, raw_len, path, depth, index, &d, &n)) {
        *len = n;
        return (const char *)d;
    }
    *len = unpacked ? strlen(unpacked) : 0;
    return unpacked ? unpacked : "";
}

/* Packs m, which leaves its text field `field` empty, and appends that field with text[0..len)
 * so that NUL bytes survive (protobuf-c packs strings with strlen). NULL when out of memory. */
static uint8_t *pack_with_text(struct arena *a, const ProtobufCMessage *m, uint32_t field,
                               const char *text, size_t len, size_t *out_len)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    size_t extra = len > 0 ? uc_pb_bytes_field_size(field, len) : 0;
    uint8_t *buf = arena_alloc(a, n + extra);
    if (!buf) {
        return NULL;
    }
    protobuf_c_message_pack(m, buf);
    if (len > 0) {
        uc_pb_put_bytes_field(buf + n, field, text, len);
    }
    *out_len = n + extra;
    return buf;
}

/* out = a uc_malloc'd copy of data[0..n). */
static uc_status msg_of_bytes(struct uc_grpc_msg *out, const uint8_t *data, size_t n)
{
    out->data = uc_malloc(n ? n : 1);
    out->len = 0;
    if (!out->data) {
        return UC_ERR_NOMEM;
    }
    if (n) {
        memcpy(out->data, data, n);
    }
    out->len = n;
    return UC_OK;
}

/* out = m packed (oom: the message was built short of memory). */
static uc_status msg_of(struct uc_grpc_msg *out, const ProtobufCMessage *m, bool oom)
{
    out->data = NULL;
    out->len = 0;
    if (oom) {
        return UC_ERR_NOMEM;
    }
    size_t n = protobuf_c_message_get_packed_size(m);
    out->data = uc_malloc(n ? n : 1);
    if (!out->data) {
        return UC_ERR_NOMEM;
    }
    protobuf_c_message_pack(m, out->data);
    out->len = n;
    return UC_OK;
}

static uint64_t u64_of(int64_t v) { return v > 0 ? (uint64_t)v : 0; }

/* ---- methods --------------------------------------------------------------------------------- */

struct method_desc {
    const char *path;
    const ProtobufCMessageDescriptor *req;
};

static const struct method_desc methods[UC_GRPC_METHOD_COUNT] = {
    [UC_GRPC_GENERATE] = {"/uncomp.v1.Inference/Generate",
                          &uncomp__v1__generate_request__descriptor},
    [UC_GRPC_TOKENIZE] = {"/uncomp.v1.Inference/Tokenize",
                          &uncomp__v1__tokenize_request__descriptor},
    [UC_GRPC_DETOKENIZE] = {"/uncomp.v1.Inference/Detokenize",
                            &uncomp__v1__detokenize_request__descriptor},
    [UC_GRPC_ABORT] = {"/uncomp.v1.Inference/Abort", &uncomp__v1__abort_request__descriptor},
    [UC_GRPC_SERVER_INFO] = {"/uncomp.v1.Admin/GetServerInfo",
                             &uncomp__v1__get_server_info_request__descriptor},
    [UC_GRPC_MODEL_INFO] = {"/uncomp.v1.Admin/GetModelInfo",
                            &uncomp__v1__get_model_info_request__descriptor},
    [UC_GRPC_STATS] = {"/uncomp.v1.Admin/GetStats", &uncomp__v1__get_stats_request__descriptor},
    [UC_GRPC_PROFILE] = {"/uncomp.v1.Admin/GetCompressionProfile",
                         &uncomp__v1__get_compression_profile_request__descriptor},
    [UC_GRPC_SET_POLICY] = {"/uncomp.v1.Admin/SetCompressionPolicy",
                            &uncomp__v1__set_compression_policy_request__descriptor},
    [UC_GRPC_CALIBRATE] = {"/uncomp.v1.Admin/Calibrate",
                           &uncomp__v1__calibrate_request__descriptor},
    [UC_GRPC_DRAIN] = {"/uncomp.v1.Admin/Drain", &uncomp__v1__drain_request__descriptor},
    [UC_GRPC_HEALTH_CHECK] = {"/grpc.health.v1.Health/Check",
                              &grpc__health__v1__health_check_request__descriptor},
    [UC_GRPC_HEALTH_WATCH] = {"/grpc.health.v1.Health/Watch",
                              &grpc__health__v1__health_check_request__descriptor},
    [UC_GRPC_CHAT] = {"/uncomp.v1.Inference/Chat", &uncomp__v1__chat_request__descriptor},
};

const char *uc_grpc_method_path(enum uc_grpc_method m)
{
    return m >= 0 && m < UC_GRPC_METHOD_COUNT ? methods[m].path : "(unregistered method)";
}

const char *uc_grpc_method_message(enum uc_grpc_method m)
{
    return m >= 0 && m < UC_GRPC_METHOD_COUNT ? methods[m].req->name : "";
}

bool uc_grpc_method_streams_generation(enum uc_grpc_method m)
{
    return m == UC_GRPC_GENERATE || m == UC_GRPC_CHAT;
}

int uc_grpc_status_of(uc_status st)
{
    switch (st) {
    case UC_OK:
        return GRPC_STATUS_OK;
    case UC_ERR_INVALID_ARG:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case UC_ERR_KV_FULL:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case UC_ERR_UNAVAILABLE:
        return GRPC_STATUS_UNAVAILABLE;
    case UC_ERR_TIMEOUT:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    case UC_ERR_CANCELLED:
        return GRPC_STATUS_CANCELLED;
    case UC_ERR_UNSUPPORTED:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case UC_ERR_NOMEM:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

/* ---- request decoding ------------------------------------------------------------------------ */

/* A decoding failure: a message that does not parse, or out of memory. */
static uc_status decode_fail(struct uc_req_error *err, uc_status st, enum uc_grpc_method m)
{
    if (st == UC_ERR_NOMEM) {
        return uc_req_fail(err, st, UC_REQ_F_NONE, "", "out of memory");
    }
    if (m >= 0 && m < UC_GRPC_METHOD_COUNT) {
        return uc_req_fail(err, st, UC_REQ_F_NONE, "", "the request is not a valid %s message",
                           methods[m].req->name);
    }
    return uc_req_fail(err, st, UC_REQ_F_NONE, "", "no such method");
}

/* SamplingParams (field 4 of both GenerateRequest and ChatRequest): 0 means the default, so
 * only non-zero values count as sent (a NaN is non-zero: validation refuses it). */
static uc_status decode_sampling(struct uc_req *r, const Uncomp__V1__SamplingParams *s,
                                 const uint8_t *raw, size_t raw_len)
{
    if (!s) {
        return UC_OK;
    }
    r->has_temperature = s->has_temperature || s->temperature != 0.0f;
    r->temperature = s->temperature;
    r->has_top_p = s->top_p != 0.0f;
    r->top_p = s->top_p;
    r->top_k = s->top_k;
    r->has_min_p = s->min_p != 0.0f;
    r->min_p = s->min_p;
    r->has_repetition_penalty = s->repetition_penalty != 0.0f;
    r->repetition_penalty = s->repetition_penalty;
    r->frequency_penalty = s->frequency_penalty;
    r->presence_penalty = s->presence_penalty;
    r->has_seed = s->has_seed;
    r->seed = s->seed;
    r->has_max_tokens = s->max_tokens != 0;
    r->max_tokens = s->max_tokens;
    r->min_tokens = s->min_tokens;
    r->ignore_eos = s->ignore_eos;
    r->logprobs = s->logprobs > 0; /* top-n per token: 1 and more also give the chosen one's */
    r->top_logprobs = s->logprobs;
    for (size_t i = 0; i < s->n_stop; i++) {
        static const uint32_t stop_path[] = {4, 11}; /* sampling.stop: stop strings hold bytes */
        size_t len = 0;
        const char *stop = raw_text(raw, raw_len, stop_path, 2, i, s->stop[i], &len);
        if (uc_req_add_stop(r, stop, len) != UC_OK) {
            return UC_ERR_NOMEM;
        }
    }
    if (uc_req_alloc_i64(&r->stop_ids, &r->n_stop_ids, s->n_stop_token_ids) != UC_OK) {
        return UC_ERR_NOMEM;
    }
    for (size_t i = 0; i < s->n_stop_token_ids; i++) {
        r->stop_ids[i] = s->stop_token_ids[i];
    }
    return UC_OK;
}

static uc_status decode_compress(struct uc_req *r, const Uncomp__V1__CompressionParams *c)
{
    r->has_compress = c != NULL;
    if (!c) {
        return UC_OK;
    }
    struct uc_req_compress *o = &r->compress;
    if (uc_req_set_str(&o->policy, c->policy) != UC_OK ||
        uc_req_set_str(&o->decode_mode, c->decode_mode) != UC_OK ||
        uc_req_set_str(&o->grouping, c->grouping) != UC_OK ||
        uc_req_alloc_i64(&o->stage_starts, &o->n_stage_starts, c->n_stage_starts) != UC_OK) {
        return UC_ERR_NOMEM;
    }
    o->kv_budget = c->kv_budget;
    o->window = c->window;
    o->pool_kernel = c->pool_kernel;
    o->sink_tokens = c->sink_tokens;
    o->head_groups = c->head_groups;
    for (size_t i = 0; i < c->n_stage_starts; i++) {
        o->stage_starts[i] = c->stage_starts[i];
    }
    o->has_r_min = c->r_min != 0.0f;
    o->r_min = c->r_min;
    o->has_think_ratio = c->think_ratio != 0.0f;
    o->think_ratio = c->think_ratio;
    o->has_minicache_t = c->minicache_t != 0.0f;
    o->minicache_t = c->minicache_t;
    o->has_minicache_gamma = c->minicache_gamma != 0.0f || c->minicache_retain_none;
    o->minicache_gamma = c->minicache_retain_none ? 0.0 : c->minicache_gamma;
    o->has_minicache_start = c->minicache_start != 0;
    o->minicache_start = c->minicache_start;
    o->has_lorc_ratio = c->lorc_ratio != 0.0f;
    o->lorc_ratio = c->lorc_ratio;
    return UC_OK;
}

static uc_status decode_generate(struct uc_req *r, const Uncomp__V1__GenerateRequest *in,
                                 const uint8_t *raw, size_t raw_len)
{
    uc_req_init(r, UC_REQ_FRONT_GRPC, UC_REQ_COMPLETION);
    if (uc_req_set_str(&r->request_id, in->request_id) != UC_OK) {
        return UC_ERR_NOMEM;
    }
    if (in->input_case == UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT) {
        static const uint32_t text_path[] = {2}; /* GenerateRequest.text */
        size_t len = 0;
        const char *text = raw_text(raw, raw_len, text_path, 1, SIZE_MAX, in->text, &len);
        if (uc_req_add_text(r, text, len) != UC_OK) {
            return UC_ERR_NOMEM;
        }
    } else if (in->input_case == UNCOMP__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS) {
        size_t n = in->token_ids ? in->token_ids->n_ids : 0;
        int64_t *ids = uc_req_add_ids(r, (int64_t)n);
        if (!ids) {
            return UC_ERR_NOMEM;
        }
        for (size_t i = 0; i < n; i++) {
            ids[i] = in->token_ids->ids[i];
        }
    }
    r->add_special_tokens = in->has_add_special_tokens ? in->add_special_tokens : true;
    r->n = in->n ? in->n : 1;
    uc_status rc = decode_sampling(r, in->sampling, raw, raw_len);
    return rc == UC_OK ? decode_compress(r, in->compression) : rc;
}

/* Chat: the messages as an OpenAI messages array (what the HTTP front hands validation). */
static uc_status decode_chat(struct uc_req *r, const Uncomp__V1__ChatRequest *in,
                             const uint8_t *raw, size_t raw_len)
{
    uc_req_init(r, UC_REQ_FRONT_GRPC, UC_REQ_CHAT);
    if (uc_req_set_str(&r->request_id, in->request_id) != UC_OK) {
        return UC_ERR_NOMEM;
    }
    r->messages = cJSON_CreateArray();
    for (size_t i = 0; r->messages && i < in->n_messages; i++) {
        cJSON *m = cJSON_CreateObject();
        if (!m || !cJSON_AddItemToArray(r->messages, m)) {
            cJSON_Delete(m);
            cJSON_Delete(r->messages);
            r->messages = NULL;
        } else if (!cJSON_AddStringToObject(m, "role", in->messages[i]->role) ||
                   !cJSON_AddStringToObject(m, "content", in->messages[i]->content)) {
            cJSON_Delete(r->messages); /* m with it */
            r->messages = NULL;
        }
    }
    if (!r->messages) {
        return UC_ERR_NOMEM;
    }
    r->n = in->n ? in->n : 1;
    uc_status rc = decode_sampling(r, in->sampling, raw, raw_len);
    return rc == UC_OK ? decode_compress(r, in->compression) : rc;
}

static uc_status decode_msg(struct uc_grpc_request *out, const ProtobufCMessage *m,
                            const uint8_t *data, size_t len)
{
    switch (out->method) {
    case UC_GRPC_GENERATE:
        return decode_generate(&out->gen, (const Uncomp__V1__GenerateRequest *)(const void *)m,
                               data, len);
    case UC_GRPC_CHAT:
        return decode_chat(&out->gen, (const Uncomp__V1__ChatRequest *)(const void *)m, data,
                           len);
    case UC_GRPC_TOKENIZE: {
        const Uncomp__V1__TokenizeRequest *t = (const void *)m;
        static const uint32_t text_path[] = {1}; /* TokenizeRequest.text */
        size_t n = 0;
        const char *text = raw_text(data, len, text_path, 1, SIZE_MAX, t->text, &n);
        out->tokenize.text = uc_strndup(text, n); /* NUL bytes kept */
        if (!out->tokenize.text) {
            return UC_ERR_NOMEM;
        }
        out->tokenize.text_len = n;
        out->tokenize.add_special_tokens = t->add_special_tokens;
        return UC_OK;
    }
    case UC_GRPC_DETOKENIZE: {
        const Uncomp__V1__DetokenizeRequest *d = (const void *)m;
        if (uc_req_alloc_i64(&out->detokenize.token_ids, &out->detokenize.n, d->n_token_ids) !=
            UC_OK) {
            return UC_ERR_NOMEM;
        }
        for (size_t i = 0; i < d->n_token_ids; i++) {
            out->detokenize.token_ids[i] = d->token_ids[i];
        }
        out->detokenize.skip_special_tokens = d->skip_special_tokens;
        return UC_OK;
    }
    case UC_GRPC_ABORT:
        return uc_req_set_str(&out->request_id,
                              ((const Uncomp__V1__AbortRequest *)(const void *)m)->request_id);
    case UC_GRPC_STATS:
        return uc_req_set_str(&out->section,
                              ((const Uncomp__V1__GetStatsRequest *)(const void *)m)->section);
    case UC_GRPC_SET_POLICY: {
        const Uncomp__V1__SetCompressionPolicyRequest *p = (const void *)m;
        struct uc_req_compress *c = &out->set_policy.c;
        c->kv_budget = p->kv_budget;
        if (uc_req_set_str(&c->policy, p->policy) != UC_OK ||
            uc_req_set_str(&c->decode_mode, p->decode_mode) != UC_OK ||
            uc_req_set_str(&c->grouping, p->grouping) != UC_OK) {
            return UC_ERR_NOMEM;
        }
        return UC_OK;
    }
    case UC_GRPC_CALIBRATE: {
        const Uncomp__V1__CalibrateRequest *c = (const void *)m;
        out->calibrate.window_tokens = c->window_tokens;
        out->calibrate.max_windows = c->max_windows;
        return uc_req_set_str(&out->calibrate.text, c->text);
    }
    case UC_GRPC_DRAIN:
        out->drain_timeout_ms = ((const Uncomp__V1__DrainRequest *)(const void *)m)->timeout_ms;
        return UC_OK;
    case UC_GRPC_HEALTH_CHECK:
    case UC_GRPC_HEALTH_WATCH:
        return uc_req_set_str(
            &out->health.service,
            ((const Grpc__Health__V1__HealthCheckRequest *)(const void *)m)->service);
    case UC_GRPC_SERVER_INFO:
    case UC_GRPC_MODEL_INFO:
    case UC_GRPC_PROFILE:
    case UC_GRPC_METHOD_COUNT:
        break;
    }
    return UC_OK;
}

static void request_init(struct uc_grpc_request *r, enum uc_grpc_method m)
{
    memset(r, 0, sizeof *r);
    r->method = m;
    uc_req_init(&r->gen, UC_REQ_FRONT_GRPC,
                m == UC_GRPC_CHAT ? UC_REQ_CHAT : UC_REQ_COMPLETION);
}

uc_status uc_grpc_request_decode(struct uc_grpc_request *out, enum uc_grpc_method m,
                                 const uint8_t *data, size_t len, struct uc_req_error *err)
{
    request_init(out, m);
    memset(err, 0, sizeof *err);
    if (m < 0 || m >= UC_GRPC_METHOD_COUNT) {
        return decode_fail(err, UC_ERR_INVALID_ARG, m);
    }
    struct arena a;
    arena_init(&a);
    ProtobufCMessage *msg = protobuf_c_message_unpack(methods[m].req, &a.pb, len, data);
    uc_status rc;
    if (!msg) {
        rc = decode_fail(err, a.oom ? UC_ERR_NOMEM : UC_ERR_INVALID_ARG, m);
    } else {
        rc = decode_msg(out, msg, data, len);
        if (rc != UC_OK) {
            decode_fail(err, rc, m);
        }
    }
    arena_fini(&a);
    return rc;
}

void uc_grpc_request_fini(struct uc_grpc_request *r)
{
    if (!r) {
        return;
    }
    uc_req_fini(&r->gen);
    uc_free(r->tokenize.text);
    uc_free(r->tokenize.ids);
    uc_free(r->detokenize.token_ids);
    uc_free(r->detokenize.ids);
    uc_free(r->request_id);
    uc_free(r->section);
    uc_req_compress_fini(&r->set_policy.c);
    uc_free(r->calibrate.text);
    uc_free(r->health.service);
    request_init(r, r->method);
}

/* ---- request validation ---------------------------------------------------------------------- */

static bool health_service_known(const char *svc)
{
    return !svc || !svc[0] || strcmp(svc, "uncomp.v1.Inference") == 0 ||
           strcmp(svc, "uncomp.v1.Admin") == 0 || strcmp(svc, "grpc.health.v1.Health") == 0;
}

static uc_status validate_tokenize(struct uc_grpc_request *r, const struct uc_req_ctx *ctx,
                                   struct uc_req_error *err)
{
    if (!ctx->tok) {
        return uc_req_fail(err, UC_ERR_UNAVAILABLE, UC_REQ_F_NONE,
                           "", "the tokenizer is not loaded yet");
    }
    char why[256];
    uc_status rc = uc_tokenizer_encode_msg(ctx->tok, r->tokenize.text, r->tokenize.text_len,
                                           r->tokenize.add_special_tokens, &r->tokenize.ids,
                                           &r->tokenize.n_ids, why, sizeof why);
    if (rc == UC_ERR_INVALID_ARG) {
        return uc_req_fail(err, rc, UC_REQ_F_NONE, "text", "text: %s", why);
    }
    if (rc != UC_OK) {
        return uc_req_fail(err, rc, UC_REQ_F_NONE,
                           "text", "tokenizer failed: %s: %s", uc_status_str(rc), why);
    }
    return UC_OK;
}

static uc_status validate_detokenize(struct uc_grpc_request *r, const struct uc_req_ctx *ctx,
                                     struct uc_req_error *err)
{
    if (!ctx->tok) {
        return uc_req_fail(err, UC_ERR_UNAVAILABLE, UC_REQ_F_NONE,
                           "", "the tokenizer is not loaded yet");
    }
    int64_t vocab = uc_tokenizer_vocab_size(ctx->tok);
    size_t n = r->detokenize.n;
    r->detokenize.ids = uc_malloc((n ? n : 1) * sizeof *r->detokenize.ids);
    if (!r->detokenize.ids) {
        return uc_req_fail(err, UC_ERR_NOMEM, UC_REQ_F_NONE, "", "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        int64_t t = r->detokenize.token_ids[i];
        if (t < 0 || t >= vocab) {
            return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_NONE, "token_ids",
                               "token_ids[%zu]=%lld is out of range [0, %lld)", i, (long long)t,
                               (long long)vocab);
        }
        r->detokenize.ids[i] = (int32_t)t;
    }
    return UC_OK;
}

uc_status uc_grpc_request_validate(struct uc_grpc_request *r, const struct uc_req_ctx *ctx,
                                   struct uc_req_error *err)
{
    memset(err, 0, sizeof *err);
    switch (r->method) {
    case UC_GRPC_GENERATE:
    case UC_GRPC_CHAT:
        return uc_req_validate(&r->gen, ctx, err);
    case UC_GRPC_TOKENIZE:
        return validate_tokenize(r, ctx, err);
    case UC_GRPC_DETOKENIZE:
        return validate_detokenize(r, ctx, err);
    case UC_GRPC_ABORT: {
        const char *id = r->request_id ? r->request_id : "";
        if (!id[0]) {
            return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_NONE,
                               "request_id", "request_id is empty");
        }
        if (strlen(id) >= UC_REQUEST_ID_MAX) {
            return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_NONE, "request_id",
                               "request_id is longer than %d bytes", UC_REQUEST_ID_MAX - 1);
        }
        return UC_OK;
    }
    case UC_GRPC_STATS: {
        const char *section = r->section ? r->section : "";
        if (!uc_admin_section_known(section)) {
            return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_NONE, "section",
                               "section=\"%.64s\" is unknown; use one of: server, cluster, model, "
                               "memory, kv, compress, requests, errors, config (or \"\" for all)",
                               section);
        }
        return UC_OK;
    }
    case UC_GRPC_SET_POLICY:
        return uc_req_compress_resolve(&r->set_policy.c, &ctx->defaults, ctx->n_layers, "",
                                       NULL, &r->set_policy.params, err);
    case UC_GRPC_CALIBRATE:
        if (r->calibrate.window_tokens > INT32_MAX) {
            return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_NONE, "window_tokens",
                               "window_tokens=%lld is too large",
                               (long long)r->calibrate.window_tokens);
        }
        if (r->calibrate.max_windows > INT32_MAX) {
            return uc_req_fail(err, UC_ERR_INVALID_ARG, UC_REQ_F_NONE,
                               "max_windows", "max_windows=%lld is too large",
                               (long long)r->calibrate.max_windows);
        }
        return UC_OK;
    case UC_GRPC_HEALTH_CHECK:
    case UC_GRPC_HEALTH_WATCH:
        r->health.known = health_service_known(r->health.service);
        return UC_OK;
    case UC_GRPC_SERVER_INFO:
    case UC_GRPC_MODEL_INFO:
    case UC_GRPC_PROFILE:
    case UC_GRPC_DRAIN:
    case UC_GRPC_METHOD_COUNT:
        break;
    }
    return UC_OK;
}

int uc_grpc_request_check(int method, const uint8_t *data, size_t len,
                          const struct uc_req_ctx *ctx)
{
    if (method < 0 || method >= UC_GRPC_METHOD_COUNT) {
        return -1;
    }
    struct uc_grpc_request r;
    struct uc_req_error err;
    uc_status rc = uc_grpc_request_decode(&r, (enum uc_grpc_method)method, data, len, &err);
    if (rc == UC_OK) {
        rc = uc_grpc_request_validate(&r, ctx, &err);
    }
    if (rc == UC_OK && (method == UC_GRPC_GENERATE || method == UC_GRPC_CHAT)) {
        /* what the handler submits: every choice's scheduler request */
        struct uc_request q;
        uc_req_choice(&r.gen, 0, (int32_t)r.gen.n, &q);
        if (!q.prompt || q.n_prompt < 1) {
            rc = UC_ERR_INTERNAL;
        }
    }
    if (rc == UC_OK && method == UC_GRPC_HEALTH_CHECK && !r.health.known) {
        uc_grpc_request_fini(&r);
        return GRPC_STATUS_NOT_FOUND;
    }
    uc_grpc_request_fini(&r);
    return uc_grpc_status_of(rc);
}

/* ---- stream events --------------------------------------------------------------------------- */

static void *dup_mem(const void *p, size_t n)
{
    void *d = uc_malloc(n ? n : 1);
    if (d && n) {
        memcpy(d, p, n);
    }
    return d;
}

void uc_grpc_event_free(struct uc_grpc_event *it)
{
    if (!it) {
        return;
    }
    uc_free(it->ids);
    uc_free(it->text);
    if (it->lps) {
        for (int32_t i = 0; i < it->n_ids; i++) {
            uc_free(it->lps[i].top_ids);
            uc_free(it->lps[i].top_lps);
        }
        uc_free(it->lps);
    }
    uc_free(it->message);
    uc_free(it->matched_stop);
    uc_free(it->report.entropy_min);
    uc_free(it->report.entropy_mean);
    uc_free(it->report.entropy_max);
    uc_free(it);
}

struct uc_grpc_event *uc_grpc_event_copy(const struct uc_gen_event *ev)
{
    struct uc_grpc_event *it = uc_calloc(1, sizeof *it);
    if (!it) {
        return NULL;
    }
    it->kind = ev->kind;
    it->index = ev->index;
    if (ev->kind == UC_EVENT_TOKENS) {
        int32_t n = ev->n_ids > 0 ? ev->n_ids : 0;
        it->n_ids = n;
        it->ids = dup_mem(ev->ids, (size_t)n * sizeof(int32_t));
        it->text = uc_strndup(ev->text ? ev->text : "", ev->text ? ev->text_len : 0);
        it->text_len = ev->text ? ev->text_len : 0;
        if (!it->ids || !it->text) {
            goto out_free;
        }
        if (ev->logprobs && n > 0) {
            it->lps = uc_calloc((size_t)n, sizeof *it->lps);
            if (!it->lps) {
                goto out_free;
            }
            for (int32_t i = 0; i < n; i++) {
                const struct uc_token_logprob *s = &ev->logprobs[i];
                struct uc_grpc_logprob *d = &it->lps[i];
                d->token_id = s->token_id;
                d->logprob = s->logprob;
                d->n_top = s->n_top > 0 && s->top_ids && s->top_logprobs ? s->n_top : 0;
                if (d->n_top > 0) {
                    d->top_ids = dup_mem(s->top_ids, (size_t)d->n_top * sizeof(int32_t));
                    d->top_lps = dup_mem(s->top_logprobs, (size_t)d->n_top * sizeof(float));
                    if (!d->top_ids || !d->top_lps) {
                        goto out_free;
                    }
                }
            }
        }
        return it;
    }
    it->status = ev->status;
    it->message = uc_strndup(ev->message ? ev->message : "", ev->message ? strlen(ev->message) : 0);
    it->matched_stop_len = ev->matched_stop ? ev->matched_stop_len : 0;
    it->matched_stop = uc_strndup(ev->matched_stop ? ev->matched_stop : "", it->matched_stop_len);
    if (!it->message || !it->matched_stop) {
        goto out_free;
    }
    it->finish = ev->finish;
    it->prompt_tokens = ev->prompt_tokens;
    it->completion_tokens = ev->completion_tokens;
    it->timing = ev->timing;
    it->compress = ev->compress;
    if (ev->report) {
        it->has_report = true;
        it->report = *ev->report;
        it->report.entropy_min = NULL;
        it->report.entropy_mean = NULL;
        it->report.entropy_max = NULL;
        int64_t L = ev->report->n_layers > 0 ? ev->report->n_layers : 0;
        if (L > 0 && ev->report->entropy_min && ev->report->entropy_mean &&
            ev->report->entropy_max) {
            size_t bytes = (size_t)L * sizeof(double);
            it->report.entropy_min = dup_mem(ev->report->entropy_min, bytes);
            it->report.entropy_mean = dup_mem(ev->report->entropy_mean, bytes);
            it->report.entropy_max = dup_mem(ev->report->entropy_max, bytes);
            if (!it->report.entropy_min || !it->report.entropy_mean || !it->report.entropy_max) {
                goto out_free;
            }
        } else {
            it->report.n_layers = 0;
        }
    }
    return it;
out_free:
    uc_grpc_event_free(it);
    return NULL;
}

/* ---- GenerateResponse ------------------------------------------------------------------------ */

uc_status uc_grpc_encode_chunk(struct uc_grpc_msg *out, const char *request_id,
                               const struct uc_grpc_event *first, const struct uc_grpc_event *end,
                               int32_t index)
{
    out->data = NULL;
    out->len = 0;
    size_t n_ids = 0, n_text = 0;
    bool any_lp = false;
    for (const struct uc_grpc_event *it = first; it != end; it = it->next) {
        n_ids += (size_t)it->n_ids;
        n_text += it->text_len;
        any_lp = any_lp || it->lps;
    }
    struct arena a;
    arena_init(&a);
    uint32_t *ids = arena_alloc(&a, n_ids * sizeof *ids);
    char *text = arena_alloc(&a, n_text + 1);
    Uncomp__V1__TokenLogprob **lps = NULL;
    if (any_lp) {
        lps = arena_alloc(&a, n_ids * sizeof *lps);
    }
    uc_status rc = UC_ERR_NOMEM;
    if (a.oom) {
        goto out;
    }
    size_t k = 0, t = 0;
    for (const struct uc_grpc_event *it = first; it != end; it = it->next) {
        for (int32_t i = 0; i < it->n_ids; i++) {
            if (lps) {
                Uncomp__V1__TokenLogprob *lp = arena_alloc(&a, sizeof *lp);
                if (!lp) {
                    goto out;
                }
                uncomp__v1__token_logprob__init(lp);
                lp->token_id = (uint32_t)it->ids[i];
                if (it->lps) {
                    const struct uc_grpc_logprob *s = &it->lps[i];
                    lp->logprob = s->logprob;
                    lp->n_top_ids = lp->n_top_logprobs = (size_t)s->n_top;
                    lp->top_ids = (uint32_t *)s->top_ids;
                    lp->top_logprobs = s->top_lps;
                }
                lps[k] = lp;
            }
            ids[k++] = (uint32_t)it->ids[i];
        }
        memcpy(text + t, it->text, it->text_len);
        t += it->text_len;
    }
    text[t] = '\0';
    Uncomp__V1__Chunk chunk;
    uncomp__v1__chunk__init(&chunk);
    chunk.n_token_ids = n_ids;
    chunk.token_ids = ids;
    chunk.n_logprobs = lps ? n_ids : 0;
    chunk.logprobs = lps;
    chunk.index = (uint32_t)index;
    /* the text goes on the wire by hand, with its length (it may hold NUL bytes) */
    size_t chunk_len = 0, resp_len = 0;
    uint8_t *chunk_bytes = pack_with_text(&a, &chunk.base, 2, text, t, &chunk_len);
    if (!chunk_bytes) {
        goto out;
    }
    Uncomp__V1__GenerateResponse resp;
    uncomp__v1__generate_response__init(&resp);
    resp.request_id = (char *)(uintptr_t)request_id;
    uint8_t *resp_bytes = pack_with_text(&a, &resp.base, 2, (const char *)chunk_bytes, chunk_len,
                                         &resp_len);
    if (chunk_len == 0 && resp_bytes) {
        /* an empty chunk is still a chunk: the oneof case needs its (empty) field */
        uint8_t *b2 = arena_alloc(&a, resp_len + 2);
        if (!b2) {
            goto out;
        }
        memcpy(b2, resp_bytes, resp_len);
        b2[resp_len] = (uint8_t)(2 << 3 | 2);
        b2[resp_len + 1] = 0;
        resp_bytes = b2;
        resp_len += 2;
    }
    if (resp_bytes) {
        rc = msg_of_bytes(out, resp_bytes, resp_len);
    }
out:
    arena_fini(&a);
    return rc;
}

static Uncomp__V1__FinishReason finish_pb(enum uc_finish_reason f)
{
    switch (f) {
    case UC_FINISH_STOP:
        return UNCOMP__V1__FINISH_REASON__STOP;
    case UC_FINISH_LENGTH:
        return UNCOMP__V1__FINISH_REASON__LENGTH;
    case UC_FINISH_ABORTED:
        return UNCOMP__V1__FINISH_REASON__ABORTED;
    case UC_FINISH_ERROR:
        return UNCOMP__V1__FINISH_REASON__ERROR;
    default:
        return UNCOMP__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
    }
}

/* The CompressionReport of a DONE event into rep (arrays from the arena); false when out of
 * memory. */
static bool report_pb(struct arena *a, Uncomp__V1__CompressionReport *rep,
                      const struct uc_grpc_event *d)
{
    uncomp__v1__compression_report__init(rep);
    struct uc_compress_params named = d->compress;
    if (d->has_report) {
        named.policy = d->report.policy;
        named.stages = d->report.stages;
    }
    char *pname = arena_alloc(a, 64);
    if (!pname) {
        return false;
    }
    uc_policy_spec_name(&named, pname, 64);
    rep->policy = pname;
    rep->kv_budget = (uint32_t)(d->compress.kv_budget > 0 ? d->compress.kv_budget : 0);
    rep->decode_mode = (char *)(uintptr_t)uc_decode_mode_name(d->compress.decode_mode);
    rep->grouping = (char *)(uintptr_t)uc_grouping_name(d->compress.grouping);
    if (!d->has_report) {
        return true;
    }
    const struct uc_compress_report *r = &d->report;
    rep->kv_budget = (uint32_t)(r->kv_budget > 0 ? r->kv_budget : 0);
    rep->kv_tokens_full = u64_of(r->kv_tokens_full);
    rep->shared_layers = (uint32_t)(r->n_shared_layers > 0 ? r->n_shared_layers : 0);
    rep->kv_tokens_kept = u64_of(r->kv_tokens_kept);
    rep->kv_bytes_full = u64_of(r->kv_bytes_full);
    rep->kv_bytes_kept = u64_of(r->kv_bytes_kept);
    rep->ratio = r->ratio;
    rep->compress_ms = r->compress_ms;
    rep->plan_checksum = r->plan_checksum;
    rep->key_channels = (uint32_t)(r->key_channels > 0 ? r->key_channels : 0);
    rep->minicache_pairs = (uint32_t)(r->minicache_pairs > 0 ? r->minicache_pairs : 0);
    rep->minicache_start = (uint32_t)(r->minicache_start > 0 ? r->minicache_start : 0);
    rep->minicache_merged = (uint64_t)(r->minicache_merged > 0 ? r->minicache_merged : 0);
    rep->minicache_retained = (uint64_t)(r->minicache_retained > 0 ? r->minicache_retained : 0);
    rep->lorc_ratio = r->lorc_ratio;
    rep->lorc_rank_first = (uint32_t)(r->lorc_rank_first > 0 ? r->lorc_rank_first : 0);
    rep->lorc_rank_last = (uint32_t)(r->lorc_rank_last > 0 ? r->lorc_rank_last : 0);
    int32_t mp = r->minicache_pairs < UC_MINICACHE_MAX_PAIRS ? r->minicache_pairs
                                                              : UC_MINICACHE_MAX_PAIRS;
    if (mp > 0) {
        rep->minicache_layers = arena_alloc(a, (size_t)mp * sizeof *rep->minicache_layers);
        if (!rep->minicache_layers) {
            return false;
        }
        for (int32_t i = 0; i < mp; i++) {
            rep->minicache_layers[i] = (uint32_t)r->minicache_first[i];
        }
        rep->n_minicache_layers = (size_t)mp;
    }
    int32_t ns = r->n_stages;
    if (ns > UC_MAX_STAGES + 1) {
        ns = UC_MAX_STAGES + 1;
    }
    if (ns > 0) {
        rep->stage_rows = arena_alloc(a, (size_t)ns * sizeof *rep->stage_rows);
        if (!rep->stage_rows) {
            return false;
        }
        for (int32_t i = 0; i < ns; i++) {
            rep->stage_rows[i] = u64_of(r->stage_rows[i]);
        }
        rep->n_stage_rows = (size_t)ns;
    }
    int32_t nb = ns > 1 ? ns - 1 : 0;
    if (nb > UC_MAX_STAGES) {
        nb = UC_MAX_STAGES;
    }
    if (nb > 0) {
        rep->stage_starts = arena_alloc(a, (size_t)nb * sizeof *rep->stage_starts);
        if (!rep->stage_starts) {
            return false;
        }
        for (int32_t i = 0; i < nb; i++) {
            rep->stage_starts[i] = (uint32_t)(r->stage_starts[i] > 0 ? r->stage_starts[i] : 0);
        }
        rep->n_stage_starts = (size_t)nb;
    }
    int32_t ng = r->n_groups > UC_MAX_HEAD_GROUPS ? UC_MAX_HEAD_GROUPS : r->n_groups;
    if (ng > 0) {
        rep->groups = arena_alloc(a, (size_t)ng * sizeof *rep->groups);
        if (!rep->groups) {
            return false;
        }
        for (int32_t g = 0; g < ng; g++) {
            Uncomp__V1__GroupReport *gr = arena_alloc(a, sizeof *gr);
            if (!gr) {
                return false;
            }
            uncomp__v1__group_report__init(gr);
            gr->group = (uint32_t)g;
            gr->budget = (uint32_t)(r->group_budget[g] > 0 ? r->group_budget[g] : 0);
            gr->mean_kept = r->group_mean_kept[g];
            rep->groups[g] = gr;
        }
        rep->n_groups = (size_t)ng;
    }
    if (r->n_layers > 0 && r->entropy_mean) {
        rep->entropy = arena_alloc(a, (size_t)r->n_layers * sizeof *rep->entropy);
        if (!rep->entropy) {
            return false;
        }
        size_t k = 0;
        for (int64_t l = 0; l < r->n_layers; l++) {
            if (isnan(r->entropy_mean[l])) {
                continue;
            }
            Uncomp__V1__LayerEntropy *le = arena_alloc(a, sizeof *le);
            if (!le) {
                return false;
            }
            uncomp__v1__layer_entropy__init(le);
            le->layer = (uint32_t)l;
            le->min = r->entropy_min[l];
            le->mean = r->entropy_mean[l];
            le->max = r->entropy_max[l];
            rep->entropy[k++] = le;
        }
        rep->n_entropy = k;
    }
    return true;
}

uc_status uc_grpc_encode_complete(struct uc_grpc_msg *out, const char *request_id,
                                  const struct uc_grpc_event *d)
{
    out->data = NULL;
    out->len = 0;
    struct arena a;
    arena_init(&a);
    uc_status rc = UC_ERR_NOMEM;
    Uncomp__V1__Usage usage;
    uncomp__v1__usage__init(&usage);
    usage.prompt_tokens = (uint32_t)u64_of(d->prompt_tokens);
    usage.completion_tokens = (uint32_t)u64_of(d->completion_tokens);
    Uncomp__V1__Timing timing;
    uncomp__v1__timing__init(&timing);
    timing.queue_ms = d->timing.queue_ms;
    timing.ttft_ms = d->timing.ttft_ms;
    timing.prefill_ms = d->timing.prefill_ms;
    timing.decode_ms = d->timing.decode_ms;
    timing.total_ms = d->timing.total_ms;
    Uncomp__V1__CompressionReport rep;
    if (!report_pb(&a, &rep, d)) {
        goto out;
    }
    Uncomp__V1__Complete comp;
    uncomp__v1__complete__init(&comp);
    comp.finish_reason = finish_pb(d->finish);
    comp.index = (uint32_t)d->index;
    comp.usage = &usage;
    comp.compression = &rep;
    comp.timing = &timing;
    /* matched_stop (2) goes on the wire by hand, with its length (it may hold NUL bytes), and
     * the Complete (3) after the response (never empty: usage is always there) */
    size_t comp_len = 0, resp_len = 0;
    uint8_t *comp_bytes = pack_with_text(&a, &comp.base, 2, d->matched_stop,
                                         d->matched_stop ? d->matched_stop_len : 0, &comp_len);
    if (!comp_bytes) {
        goto out;
    }
    Uncomp__V1__GenerateResponse resp;
    uncomp__v1__generate_response__init(&resp);
    resp.request_id = (char *)(uintptr_t)request_id;
    uint8_t *resp_bytes = pack_with_text(&a, &resp.base, 3, (const char *)comp_bytes, comp_len,
                                         &resp_len);
    if (resp_bytes) {
        rc = msg_of_bytes(out, resp_bytes, resp_len);
    }
out:
    arena_fini(&a);
    return rc;
}

/* ---- Inference unary replies ----------------------------------------------------------------- */

uc_status uc_grpc_encode_tokenize(struct uc_grpc_msg *out, const struct uc_tokenizer *tok,
                                  const int32_t *ids, int64_t n)
{
    struct arena a;
    arena_init(&a);
    Uncomp__V1__TokenizeResponse resp;
    uncomp__v1__tokenize_response__init(&resp);
    resp.token_ids = arena_alloc(&a, (size_t)n * sizeof *resp.token_ids);
    resp.tokens = arena_alloc(&a, (size_t)n * sizeof *resp.tokens);
    if (!a.oom) {
        for (int64_t i = 0; i < n; i++) {
            const char *s = uc_tokenizer_token_str(tok, ids[i]);
            resp.token_ids[i] = (uint32_t)ids[i];
            resp.tokens[i] = (char *)(uintptr_t)(s ? s : "");
        }
        resp.n_token_ids = resp.n_tokens = (size_t)n;
    }
    uc_status rc = msg_of(out, &resp.base, a.oom);
    arena_fini(&a);
    return rc;
}

uc_status uc_grpc_encode_detokenize(struct uc_grpc_msg *out, const char *text, size_t len)
{
    Uncomp__V1__DetokenizeResponse resp;
    uncomp__v1__detokenize_response__init(&resp);
    struct arena a;
    arena_init(&a);
    size_t n = 0;
    uint8_t *bytes = pack_with_text(&a, &resp.base, 1, text, len, &n); /* NUL bytes kept */
    uc_status rc = bytes ? msg_of_bytes(out, bytes, n) : UC_ERR_NOMEM;
    arena_fini(&a);
    return rc;
}

uc_status uc_grpc_encode_abort(struct uc_grpc_msg *out, bool found)
{
    Uncomp__V1__AbortResponse resp;
    uncomp__v1__abort_response__init(&resp);
    resp.found = found;
    return msg_of(out, &resp.base, false);
}

/* ---- Admin replies --------------------------------------------------------------------------- */

uc_status uc_grpc_encode_server_info(struct uc_grpc_msg *out, const struct uc_admin_src *src)
{
    struct arena a;
    arena_init(&a);
    Uncomp__V1__ServerInfo si;
    uncomp__v1__server_info__init(&si);
    const struct uc_cluster_info *c = src->cluster;
    if (c) {
        si.version = (char *)(uintptr_t)c->version;
        si.build = (char *)(uintptr_t)c->build;
        si.backend = (char *)(uintptr_t)c->backend;
        si.tp_size = (uint32_t)(c->tp_size > 0 ? c->tp_size : 0);
        if (c->ranks && c->tp_size > 0) {
            si.ranks = arena_alloc(&a, (size_t)c->tp_size * sizeof *si.ranks);
            for (int i = 0; si.ranks && i < c->tp_size; i++) {
                Uncomp__V1__RankInfo *ri = arena_alloc(&a, sizeof *ri);
                if (!ri) {
                    break;
                }
                uncomp__v1__rank_info__init(ri);
                ri->rank = (uint32_t)c->ranks[i].rank;
                ri->host = (char *)(uintptr_t)c->ranks[i].host;
                ri->device = (char *)(uintptr_t)c->ranks[i].device;
                ri->weight_bytes = c->ranks[i].weight_bytes;
                ri->kv_bytes = c->ranks[i].kv_bytes;
                si.ranks[i] = ri;
                si.n_ranks++;
            }
        }
    }
    si.uptime_s = src->uptime_s;
    si.state = (char *)(uintptr_t)(src->state ? src->state : "UNKNOWN");
    if (src->sched) {
        struct uc_sched_counts sc;
        uc_sched_counts(src->sched, &sc);
        si.running_requests = (uint32_t)(sc.running > 0 ? sc.running : 0);
        si.queued_requests = (uint32_t)(sc.queued > 0 ? sc.queued : 0);
        struct uc_compress_params cp;
        uc_sched_get_default_compress(src->sched, &cp);
        char *pname = arena_alloc(&a, 64);
        if (pname) {
            uc_policy_spec_name(&cp, pname, 64);
        }
        si.default_policy = pname ? pname : (char *)(uintptr_t)uc_policy_name(cp.policy);
        si.default_kv_budget = (uint32_t)(cp.kv_budget > 0 ? cp.kv_budget : 0);
    }
    uc_status rc = msg_of(out, &si.base, a.oom);
    arena_fini(&a);
    return rc;
}

/* The last component of a path ("uncomp-tiny" of "/srv/models/uncomp-tiny/") into buf. */
static const char *base_name(char *buf, size_t cap, const char *path)
{
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') {
        n--;
    }
    size_t b = n;
    while (b > 0 && path[b - 1] != '/') {
        b--;
    }
    snprintf(buf, cap, "%.*s", (int)(n - b), path + b);
    return buf;
}

uc_status uc_grpc_encode_model_info(struct uc_grpc_msg *out, const struct uc_admin_src *src)
{
    out->data = NULL;
    out->len = 0;
    if (!src->engine) {
        return UC_ERR_UNAVAILABLE;
    }
    const struct uc_model_config *cfg = uc_engine_config(src->engine);
    Uncomp__V1__ModelInfo mi;
    uncomp__v1__model_info__init(&mi);
    /* the folder's name only: a client has no business with the server's file system */
    char name[256];
    mi.path = (char *)(uintptr_t)base_name(name, sizeof name,
                                           src->cluster ? src->cluster->model_path : "");
    mi.architecture = (char *)(uintptr_t)cfg->arch;
    mi.layers = (uint32_t)cfg->n_layers;
    mi.heads = (uint32_t)cfg->n_heads;
    mi.kv_heads = (uint32_t)cfg->n_heads_kv;
    mi.head_dim = (uint32_t)cfg->head_dim;
    mi.hidden_size = (uint32_t)cfg->hidden;
    mi.intermediate_size = (uint32_t)cfg->ffn;
    mi.vocab_size = (uint32_t)cfg->vocab;
    mi.context_length = (uint32_t)uc_engine_max_ctx(src->engine);
    mi.dtype = (char *)(uintptr_t)cfg->torch_dtype;
    mi.tokenizer = (char *)(uintptr_t)(src->tok ? uc_tokenizer_kind(src->tok) : "");
    mi.bos_token_id = src->tok ? uc_tokenizer_bos(src->tok) : cfg->bos_id;
    if (mi.bos_token_id < 0) {
        mi.bos_token_id = cfg->bos_id;
    }
    /* the EOS the tokenizer really adds: the one its template appends, else the model's */
    int32_t eos[UC_MAX_EOS_IDS];
    for (int i = 0; i < cfg->n_eos && i < UC_MAX_EOS_IDS; i++) {
        eos[i] = cfg->eos_ids[i];
    }
    mi.n_eos_token_ids = (size_t)(cfg->n_eos < UC_MAX_EOS_IDS ? cfg->n_eos : UC_MAX_EOS_IDS);
    if (src->tok && uc_tokenizer_eos_added(src->tok) >= 0) {
        eos[0] = uc_tokenizer_eos_added(src->tok);
        mi.n_eos_token_ids = 1;
    } else if (mi.n_eos_token_ids == 0 && src->tok && uc_tokenizer_eos(src->tok) >= 0) {
        eos[0] = uc_tokenizer_eos(src->tok);
        mi.n_eos_token_ids = 1;
    }
    mi.eos_token_ids = eos;
    return msg_of(out, &mi.base, false);
}

static void pct_ms(Uncomp__V1__Percentiles *o, const struct metric_pct *p)
{
    uncomp__v1__percentiles__init(o);
    o->p50 = p->p50 * 1e3;
    o->p90 = p->p90 * 1e3;
    o->p99 = p->p99 * 1e3;
    o->mean = p->mean * 1e3;
    o->count = p->count;
}

uc_status uc_grpc_encode_stats(struct uc_grpc_msg *out, const struct uc_admin_src *src,
                               const char *section)
{
    struct metrics_snapshot ms;
    metrics_snapshot(src->metrics, &ms);
    Uncomp__V1__Stats st;
    uncomp__v1__stats__init(&st);
    st.requests_total = ms.requests_total;
    st.requests_finished = ms.requests_finished;
    st.requests_failed = ms.requests_failed;
    st.requests_aborted = ms.requests_aborted;
    st.requests_rejected = ms.requests_rejected;
    st.prompt_tokens_total = ms.prompt_tokens;
    st.generation_tokens_total = ms.generation_tokens;
    st.running = (uint32_t)(ms.running > 0 ? ms.running : 0);
    st.queued = (uint32_t)(ms.waiting > 0 ? ms.waiting : 0);
    if (src->sched) {
        struct uc_sched_counts sc;
        uc_sched_counts(src->sched, &sc);
        st.running = (uint32_t)(sc.running > 0 ? sc.running : 0);
        st.queued = (uint32_t)(sc.queued > 0 ? sc.queued : 0);
    }
    st.kv_usage = ms.kv_usage;
    st.kv_tokens_full_total = ms.kv_tokens_full;
    st.kv_tokens_kept_total = ms.kv_tokens_kept;
    st.prefill_rows_dropped_total = ms.rows_dropped;
    st.compression_seconds_total = ms.compress_s;
    Uncomp__V1__Percentiles ttft, itl, e2e, queue;
    pct_ms(&ttft, &ms.lat[METRIC_TTFT]);
    pct_ms(&itl, &ms.lat[METRIC_ITL]);
    pct_ms(&e2e, &ms.lat[METRIC_E2E]);
    pct_ms(&queue, &ms.lat[METRIC_QUEUE]);
    st.ttft_ms = &ttft;
    st.inter_token_ms = &itl;
    st.e2e_ms = &e2e;
    st.queue_ms = &queue;
    struct uc_buf b;
    uc_buf_init(&b);
    uc_admin_info(&b, src, section ? section : "");
    st.text = b.data ? b.data : (char *)(uintptr_t)"";
    uc_status rc = msg_of(out, &st.base, b.oom);
    uc_buf_fini(&b);
    return rc;
}

uc_status uc_grpc_encode_profile(struct uc_grpc_msg *out, const struct uc_admin_src *src,
                                 char *msg, size_t msg_size)
{
    out->data = NULL;
    out->len = 0;
    msg[0] = '\0';
    if (!src->sched || !src->engine) {
        snprintf(msg, msg_size, "the model is not loaded yet");
        return UC_ERR_UNAVAILABLE;
    }
    const struct uc_model_config *cfg = uc_engine_config(src->engine);
    const char *path = uc_engine_profile_path(src->engine);
    Uncomp__V1__CompressionProfile cp;
    uncomp__v1__compression_profile__init(&cp);
    char name[256];
    cp.path = (char *)(uintptr_t)base_name(name, sizeof name, path ? path : ""); /* no paths */
    /* parsed here from the scheduler's JSON, so no engine state is read from this thread */
    char *json = uc_sched_profile_json(src->sched);
    if (!json) {
        cp.present = false;
        return msg_of(out, &cp.base, false);
    }
    struct uc_profile p;
    memset(&p, 0, sizeof p);
    uc_status rc = uc_profile_parse(&p, json, path ? path : "profile", cfg->n_layers,
                                    cfg->n_heads, cfg->n_heads_kv);
    if (rc != UC_OK) {
        snprintf(msg, msg_size, "the active profile does not parse: %s", uc_status_str(rc));
        uc_free(json);
        return UC_ERR_FORMAT;
    }
    struct arena a;
    arena_init(&a);
    cp.present = true;
    cp.json = json;
    cp.source = p.source;
    cp.created_unix_ms = p.created_unix_ms;
    cp.calib_tokens = u64_of(p.calib_tokens);
    cp.head_groups = (uint32_t)(p.head_groups > 0 ? p.head_groups : 0);
    int32_t ns = p.n_stage_starts > UC_MAX_STAGES ? UC_MAX_STAGES : p.n_stage_starts;
    if (ns > 0) {
        cp.stage_starts = arena_alloc(&a, (size_t)ns * sizeof *cp.stage_starts);
        for (int32_t i = 0; cp.stage_starts && i < ns; i++) {
            cp.stage_starts[i] = (uint32_t)p.stage_starts[i];
        }
        cp.n_stage_starts = cp.stage_starts ? (size_t)ns : 0;
    }
    int64_t L = p.n_layers, H = p.n_heads, Hkv = p.n_heads_kv;
    cp.layers = arena_alloc(&a, (size_t)L * sizeof *cp.layers);
    for (int64_t l = 0; cp.layers && l < L; l++) {
        Uncomp__V1__LayerProfile *lp = arena_alloc(&a, sizeof *lp);
        if (!lp) {
            break;
        }
        uncomp__v1__layer_profile__init(lp);
        lp->layer = (uint32_t)l;
        lp->entropy = p.layer_entropy ? p.layer_entropy[l] : 0.0;
        lp->score = 100.0 * lp->entropy;
        uint32_t stage = 0;
        for (int32_t i = 0; i < ns; i++) {
            if (l >= p.stage_starts[i]) {
                stage = (uint32_t)i + 1;
            }
        }
        lp->stage = stage;
        if (p.head_entropy) {
            lp->head_entropy = p.head_entropy + l * H;
            lp->n_head_entropy = (size_t)H;
        }
        if (p.kv_entropy) {
            lp->kv_head_entropy = p.kv_entropy + l * Hkv;
            lp->n_kv_head_entropy = (size_t)Hkv;
        }
        if (p.kv_group) {
            lp->kv_head_group = arena_alloc(&a, (size_t)Hkv * sizeof(uint32_t));
            for (int64_t j = 0; lp->kv_head_group && j < Hkv; j++) {
                int32_t g = p.kv_group[l * Hkv + j];
                lp->kv_head_group[j] = (uint32_t)(g > 0 ? g : 0);
            }
            lp->n_kv_head_group = lp->kv_head_group ? (size_t)Hkv : 0;
        }
        cp.layers[l] = lp;
        cp.n_layers++;
    }
    rc = msg_of(out, &cp.base, a.oom);
    arena_fini(&a);
    uc_profile_fini(&p);
    uc_free(json);
    return rc;
}

uc_status uc_grpc_encode_set_policy(struct uc_grpc_msg *out, const struct uc_compress_params *cp)
{
    Uncomp__V1__SetCompressionPolicyResponse resp;
    uncomp__v1__set_compression_policy_response__init(&resp);
    char pname[64];
    uc_policy_spec_name(cp, pname, sizeof pname);
    resp.policy = pname;
    resp.kv_budget = (uint32_t)(cp->kv_budget > 0 ? cp->kv_budget : 0);
    resp.decode_mode = (char *)(uintptr_t)uc_decode_mode_name(cp->decode_mode);
    resp.grouping = (char *)(uintptr_t)uc_grouping_name(cp->grouping);
    return msg_of(out, &resp.base, false);
}

uc_status uc_grpc_encode_drain(struct uc_grpc_msg *out, int32_t finished, int32_t aborted)
{
    Uncomp__V1__DrainResponse d;
    uncomp__v1__drain_response__init(&d);
    d.finished = (uint32_t)(finished > 0 ? finished : 0);
    d.aborted = (uint32_t)(aborted > 0 ? aborted : 0);
    return msg_of(out, &d.base, false);
}

uc_status uc_grpc_encode_health(struct uc_grpc_msg *out, enum uc_grpc_health status)
{
    Grpc__Health__V1__HealthCheckResponse h;
    grpc__health__v1__health_check_response__init(&h);
    h.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    return msg_of(out, &h.base, false);
}
