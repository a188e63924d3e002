/* The gRPC server on rank 0 (gRPC C core 1.51, completion queues): the Inference, Admin and
 * grpc.health.v1.Health services of API.md, and the Prometheus endpoint (metrics_http.c).
 * Two parts, top to bottom: the protobuf-c codec (request validation that names the offending
 * field, copies of scheduler events, response builders) and the server (completion-queue
 * threads, per-call state and reference counts, streaming with one send in flight per call,
 * health watch, drain and shutdown). Requests go to the scheduler; protobuf-c structs never leave
 * this file. The gRPC headers declare `f()` prototypes, so -Wstrict-prototypes is silenced
 * around them. */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/status.h>
#include <grpc/support/time.h>
#pragma GCC diagnostic pop

#include "admin.h"
#include "auth.h"
#include "base/log.h"
#include "base/mem.h"
#include "base/pbwire.h"
#include "base/status.h"
#include "chat_template.h"
#include "compress/profile.h"
#include "grpc/health/v1/health.pb-c.h"
#include "metrics_http.h"
#include "model_config.h"
#include "sched.h"
#include "server.h"
#include "tokenizer.h"
#include "uncomp/v1/uncomp.pb-c.h"

/* =========================================================================================== */
/* Codec                                                                                       */
/* =========================================================================================== */

/* A per-request arena: unpacked requests (as their ProtobufCAllocator) and response messages
 * under construction; everything is freed at once by arena_fini. */
struct arena_blk {
    struct arena_blk *next;
    size_t pad; /* keeps the payload 16-byte aligned */
};

struct arena {
    struct arena_blk *head;
    bool oom;                  /* an allocation failed */
    ProtobufCAllocator pb;     /* allocates from this arena (free is a no-op) */
    const uint8_t *raw;        /* the request as received (unpack_msg keeps a copy), for the */
    size_t raw_len;            /* text fields protobuf-c would cut at a NUL byte */
};

/* What Generate validation needs from the server. */
struct gen_ctx {
    const struct uc_tokenizer *tok;
    const uint8_t *raw;                  /* the request's wire bytes (see raw_text) */
    size_t raw_len;
    int64_t vocab;                       /* ids must be below this */
    int64_t n_layers;
    struct uc_compress_params defaults;  /* the server's current default compression */
};

/* A validated request, ready for uc_sched_submit; owns the arrays it points into (strings point
 * into the unpacked message, which must outlive it). */
struct gen_req {
    struct uc_request req;
    int32_t *prompt;        /* uc_malloc'd */
    int32_t *stop_ids;      /* uc_malloc'd */
    const char **stop;      /* uc_malloc'd array of strings borrowed from the request bytes */
    size_t *stop_len;       /* uc_malloc'd: their lengths (they may hold NUL bytes) */
};

/* One scheduler event, deep-copied out of the engine thread's buffers into a call's queue. */
struct ev_logprob {
    int32_t token_id;
    float logprob;
    int32_t n_top;
    int32_t *top_ids;   /* (n_top) */
    float *top_lps;     /* (n_top) */
};

struct ev_item {
    struct ev_item *next;
    enum uc_event_kind kind;
    int32_t index;              /* the choice */
    /* TOKENS */
    int32_t *ids;               /* (n_ids) */
    int32_t n_ids;
    char *text;                 /* (text_len + 1), NUL-terminated */
    size_t text_len;
    struct ev_logprob *lps;     /* (n_ids) or NULL */
    /* DONE */
    uc_status status;
    char *message;
    enum uc_finish_reason finish;
    char *matched_stop;         /* (matched_stop_len + 1), NUL-terminated */
    size_t matched_stop_len;
    int64_t prompt_tokens, completion_tokens;
    struct uc_timing timing;
    struct uc_compress_params compress;
    bool has_report;
    struct uc_compress_report report;   /* entropy arrays owned by the item */
};

/* A unary reply: a message (NULL for an error) with a status code and, for errors, a message
 * a person can act on. */
struct unary_reply {
    grpc_byte_buffer *msg;
    grpc_status_code code;
    char detail[512];
};

/* ---- arena ----------------------------------------------------------------------------------- */

static void *arena_alloc(struct arena *a, size_t size_bytes);
static void gen_req_fini(struct gen_req *r);

static void *arena_pb_alloc(void *data, size_t size) { return arena_alloc(data, size); }
static void arena_pb_free(void *data, void *p) {}

static void arena_init(struct arena *a)
{
    a->head = NULL;
    a->oom = false;
    a->raw = NULL;
    a->raw_len = 0;
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

/* ---- byte buffers ---------------------------------------------------------------------------- */

static ProtobufCMessage *unpack_msg(struct arena *a, const ProtobufCMessageDescriptor *d,
                                    grpc_byte_buffer *bb)
{
    if (!bb) {
        return NULL;
    }
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb)) {
        return NULL;
    }
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(d, &a->pb, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    if (m) {
        uint8_t *raw = arena_alloc(a, GRPC_SLICE_LENGTH(s));
        if (raw) {
            memcpy(raw, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s));
            a->raw = raw;
            a->raw_len = GRPC_SLICE_LENGTH(s);
        } else {
            m = NULL;
        }
    }
    grpc_slice_unref(s);
    return m;
}

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

static grpc_byte_buffer *bytes_msg(const uint8_t *data, size_t n)
{
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)data, n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

static grpc_byte_buffer *pack_msg(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

static grpc_status_code status_code_of(uc_status st)
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
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

static void reply_set_error(struct unary_reply *r, grpc_status_code code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->detail, sizeof r->detail, fmt, ap);
    va_end(ap);
    r->code = code;
    r->msg = NULL;
}

/* A packed reply, or INTERNAL when packing ran out of memory. */
static void reply_msg(struct unary_reply *r, const ProtobufCMessage *m, bool oom)
{
    r->msg = oom ? NULL : pack_msg(m);
    if (!r->msg) {
        reply_set_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    r->code = GRPC_STATUS_OK;
    r->detail[0] = '\0';
}

/* ---- GenerateRequest validation -------------------------------------------------------------- */

#define BAD(...)                                                                                   \
    do {                                                                                           \
        snprintf(msg, msg_size, __VA_ARGS__);                                                      \
        rc = UC_ERR_INVALID_ARG;                                                                   \
        goto out_fail;                                                                             \
    } while (0)

static void policy_list(char *out, size_t cap)
{
    size_t n = 0;
    out[0] = '\0';
    for (int i = 0; i < UC_POLICY_COUNT && n < cap; i++) {
        n += (size_t)snprintf(out + n, cap - n, "%s%s", i ? ", " : "",
                              uc_policy_name((enum uc_policy)i));
    }
}

static bool printable_id(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p <= 0x20 || *p >= 0x7f) {
            return false;
        }
    }
    return true;
}

/* Largest values a request may carry (the scheduler applies the configured, smaller limits). */
#define MAX_LOGPROBS 20
#define MAX_STOP_STRINGS 64
#define MAX_STOP_BYTES 1024

static uc_status sampling_from(struct gen_req *out, const Uncomp__V1__SamplingParams *s,
                               const struct gen_ctx *ctx, char *msg, size_t msg_size)
{
    uc_status rc = UC_OK;
    struct uc_request *r = &out->req;
    struct uc_sampling_params sp = uc_sampling_default_params();
    if (!s) {
        r->sampling = sp;
        return UC_OK;
    }
    /* temperature: an explicit value (has_temperature, or any non-zero value) is used as is */
    if (s->has_temperature || s->temperature != 0.0f) {
        if (!isfinite(s->temperature) || s->temperature < 0.0f) {
            BAD("sampling.temperature=%g must be a finite number >= 0 (0 = greedy)",
                (double)s->temperature);
        }
        sp.temperature = s->temperature;
    }
    if (s->top_p != 0.0f) {
        if (!(s->top_p > 0.0f && s->top_p <= 1.0f)) {
            BAD("sampling.top_p=%g must be in (0, 1]", (double)s->top_p);
        }
        sp.top_p = s->top_p;
    }
    if (s->top_k > INT32_MAX) {
        BAD("sampling.top_k=%u is too large", s->top_k);
    }
    sp.top_k = (int32_t)s->top_k;
    if (!(s->min_p >= 0.0f && s->min_p <= 1.0f)) {
        BAD("sampling.min_p=%g must be in [0, 1]", (double)s->min_p);
    }
    sp.min_p = s->min_p;
    if (s->repetition_penalty != 0.0f) {
        if (!(isfinite(s->repetition_penalty) && s->repetition_penalty > 0.0f)) {
            BAD("sampling.repetition_penalty=%g must be a finite number > 0 (1 = off)",
                (double)s->repetition_penalty);
        }
        sp.repetition_penalty = s->repetition_penalty;
    }
    if (!(s->frequency_penalty >= -2.0f && s->frequency_penalty <= 2.0f)) {
        BAD("sampling.frequency_penalty=%g must be in [-2, 2]", (double)s->frequency_penalty);
    }
    sp.frequency_penalty = s->frequency_penalty;
    if (!(s->presence_penalty >= -2.0f && s->presence_penalty <= 2.0f)) {
        BAD("sampling.presence_penalty=%g must be in [-2, 2]", (double)s->presence_penalty);
    }
    sp.presence_penalty = s->presence_penalty;
    sp.has_seed = s->has_seed;
    sp.seed = s->seed;
    rc = uc_sampling_params_validate(&sp, msg, msg_size);
    if (rc != UC_OK) {
        goto out_fail;
    }
    r->sampling = sp;

    if (s->max_tokens > INT32_MAX) {
        BAD("sampling.max_tokens=%u is too large", s->max_tokens);
    }
    if (s->min_tokens > INT32_MAX) {
        BAD("sampling.min_tokens=%u is too large", s->min_tokens);
    }
    if (s->max_tokens != 0 && s->min_tokens > s->max_tokens) {
        BAD("sampling.min_tokens=%u must be <= sampling.max_tokens=%u", s->min_tokens,
            s->max_tokens);
    }
    r->max_tokens = (int32_t)s->max_tokens;
    r->min_tokens = (int32_t)s->min_tokens;
    r->ignore_eos = s->ignore_eos;
    if (s->logprobs > MAX_LOGPROBS) {
        BAD("sampling.logprobs=%u must be <= %d", s->logprobs, MAX_LOGPROBS);
    }
    r->logprobs = (int32_t)s->logprobs;

    if (s->n_stop > MAX_STOP_STRINGS) {
        BAD("sampling.stop has %zu strings; at most %d", s->n_stop, MAX_STOP_STRINGS);
    }
    if (s->n_stop > 0) {
        out->stop = uc_calloc(s->n_stop, sizeof *out->stop);
        out->stop_len = uc_calloc(s->n_stop, sizeof *out->stop_len);
        if (!out->stop || !out->stop_len) {
            snprintf(msg, msg_size, "out of memory");
            rc = UC_ERR_NOMEM;
            goto out_fail;
        }
        for (size_t i = 0; i < s->n_stop; i++) {
            /* the bytes as sent: a stop string may hold NUL bytes */
            static const uint32_t stop_path[] = {4, 11}; /* sampling.stop */
            size_t len = 0;
            const char *stop = raw_text(ctx->raw, ctx->raw_len, stop_path, 2, i, s->stop[i], &len);
            if (len == 0) {
                BAD("sampling.stop[%zu] is empty", i);
            }
            if (len > MAX_STOP_BYTES) {
                BAD("sampling.stop[%zu] is %zu bytes; at most %d", i, len, MAX_STOP_BYTES);
            }
            out->stop[i] = stop;
            out->stop_len[i] = len;
        }
        r->stop = out->stop;
        r->stop_len = out->stop_len;
        r->n_stop = (int32_t)s->n_stop;
    }
    if (s->n_stop_token_ids > MAX_STOP_STRINGS) {
        BAD("sampling.stop_token_ids has %zu ids; at most %d", s->n_stop_token_ids,
            MAX_STOP_STRINGS);
    }
    if (s->n_stop_token_ids > 0) {
        out->stop_ids = uc_calloc(s->n_stop_token_ids, sizeof *out->stop_ids);
        if (!out->stop_ids) {
            snprintf(msg, msg_size, "out of memory");
            rc = UC_ERR_NOMEM;
            goto out_fail;
        }
        for (size_t i = 0; i < s->n_stop_token_ids; i++) {
            if ((int64_t)s->stop_token_ids[i] >= ctx->vocab) {
                BAD("sampling.stop_token_ids[%zu]=%u is out of range [0, %lld)", i,
                    s->stop_token_ids[i], (long long)ctx->vocab);
            }
            out->stop_ids[i] = (int32_t)s->stop_token_ids[i];
        }
        r->stop_ids = out->stop_ids;
        r->n_stop_ids = (int32_t)s->n_stop_token_ids;
    }
    return UC_OK;
out_fail:
    return rc;
}

static int32_t clamp_u32(uint32_t v) { return v > INT32_MAX ? INT32_MAX : (int32_t)v; }

static uc_status compress_from(struct uc_request *r, const Uncomp__V1__CompressionParams *c,
                               const struct gen_ctx *ctx, char *msg, size_t msg_size)
{
    uc_status rc = UC_OK;
    if (!c) {
        r->has_compress = false;
        return UC_OK;
    }
    struct uc_compress_params cp = ctx->defaults;
    if (c->policy && c->policy[0] && !uc_policy_parse(c->policy, &cp.policy)) {
        char names[160];
        policy_list(names, sizeof names);
        BAD("compression.policy=\"%.64s\" is unknown; use one of: %s", c->policy, names);
    }
    if (c->kv_budget) {
        cp.kv_budget = clamp_u32(c->kv_budget);
    }
    if (c->window) {
        cp.window = clamp_u32(c->window);
    }
    if (c->pool_kernel) {
        cp.pool_kernel = clamp_u32(c->pool_kernel);
    }
    if (c->sink_tokens) {
        cp.sink_tokens = clamp_u32(c->sink_tokens);
    }
    if (c->head_groups) {
        cp.head_groups = clamp_u32(c->head_groups);
    }
    if (c->decode_mode && c->decode_mode[0] && !uc_decode_mode_parse(c->decode_mode,
                                                                     &cp.decode_mode)) {
        BAD("compression.decode_mode=\"%.64s\" must be append or evict", c->decode_mode);
    }
    if (c->grouping && c->grouping[0] && !uc_grouping_parse(c->grouping, &cp.grouping)) {
        BAD("compression.grouping=\"%.64s\" must be profile or prompt", c->grouping);
    }
    if (c->n_stage_starts > 0) {
        if (c->n_stage_starts > UC_MAX_STAGES - 1) {
            BAD("compression.stage_starts has %zu boundaries; at most %d", c->n_stage_starts,
                UC_MAX_STAGES - 1);
        }
        cp.n_stage_starts = (int32_t)c->n_stage_starts;
        for (size_t i = 0; i < c->n_stage_starts; i++) {
            cp.stage_starts[i] = clamp_u32(c->stage_starts[i]);
        }
    }
    if (c->r_min != 0.0f) {
        cp.r_min = c->r_min;
    }
    rc = uc_compress_params_validate(&cp, ctx->n_layers, msg, msg_size);
    if (rc != UC_OK) {
        goto out_fail;
    }
    r->has_compress = true;
    r->compress = cp;
    return UC_OK;
out_fail:
    return rc;
}

static uc_status gen_request_parse(struct gen_req *out, const Uncomp__V1__GenerateRequest *in,
                                   const struct gen_ctx *ctx, char *msg, size_t msg_size)
{
    uc_status rc = UC_OK;
    memset(out, 0, sizeof *out);
    uc_request_init(&out->req);
    struct uc_request *r = &out->req;
    msg[0] = '\0';

    /* request id */
    const char *id = in->request_id ? in->request_id : "";
    if (strlen(id) >= UC_REQUEST_ID_MAX) {
        BAD("request_id is %zu bytes; at most %d", strlen(id), UC_REQUEST_ID_MAX - 1);
    }
    if (!printable_id(id)) {
        BAD("request_id must be printable ASCII without spaces");
    }
    snprintf(r->request_id, sizeof r->request_id, "%s", id);

    /* input */
    switch (in->input_case) {
    case UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT: {
        static const uint32_t text_path[] = {2}; /* GenerateRequest.text */
        size_t len = 0;
        const char *text = raw_text(ctx->raw, ctx->raw_len, text_path, 1, SIZE_MAX, in->text,
                                    &len);
        if (len == 0) {
            BAD("text is empty: the prompt needs at least one token");
        }
        bool add_special = in->has_add_special_tokens ? in->add_special_tokens : true;
        int64_t n = 0;
        char why[256];
        uc_status trc = uc_tokenizer_encode_msg(ctx->tok, text, len, add_special, &out->prompt,
                                                &n, why, sizeof why);
        if (trc == UC_ERR_INVALID_ARG) {
            BAD("text: %s", why);
        } else if (trc != UC_OK) {
            snprintf(msg, msg_size, "tokenizer failed: %s: %s", uc_status_str(trc), why);
            rc = trc;
            goto out_fail;
        }
        if (n == 0) {
            BAD("text produced no tokens");
        }
        r->prompt = out->prompt;
        r->n_prompt = n;
        break;
    }
    case UNCOMP__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS: {
        size_t n = in->token_ids ? in->token_ids->n_ids : 0;
        if (n == 0) {
            BAD("token_ids is empty: the prompt needs at least one token");
        }
        out->prompt = uc_malloc(n * sizeof *out->prompt);
        if (!out->prompt) {
            snprintf(msg, msg_size, "out of memory");
            rc = UC_ERR_NOMEM;
            goto out_fail;
        }
        for (size_t i = 0; i < n; i++) {
            uint32_t t = in->token_ids->ids[i];
            if ((int64_t)t >= ctx->vocab) {
                BAD("token_ids[%zu]=%u is out of range [0, %lld)", i, t, (long long)ctx->vocab);
            }
            out->prompt[i] = (int32_t)t;
        }
        r->prompt = out->prompt;
        r->n_prompt = (int64_t)n;
        break;
    }
    default:
        BAD("input is missing: set text or token_ids");
    }

    if (in->n > UC_SCHED_MAX_N) {
        BAD("n=%u must be in [1, %d] (0 = 1)", in->n, UC_SCHED_MAX_N);
    }
    r->n = (int32_t)in->n;
    rc = sampling_from(out, in->sampling, ctx, msg, msg_size);
    if (rc != UC_OK) {
        goto out_fail;
    }
    rc = compress_from(r, in->compression, ctx, msg, msg_size);
    if (rc != UC_OK) {
        goto out_fail;
    }
    return UC_OK;
out_fail:
    gen_req_fini(out);
    return rc;
}

#undef BAD

static void gen_req_fini(struct gen_req *r)
{
    UC_FREE(r->prompt);
    UC_FREE(r->stop_ids);
    UC_FREE(r->stop);
    UC_FREE(r->stop_len);
    r->req.prompt = NULL;
    r->req.stop = NULL;
    r->req.stop_len = NULL;
    r->req.stop_ids = NULL;
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

static char *dup_str(const char *s, size_t n)
{
    char *d = uc_malloc(n + 1);
    if (d) {
        if (n) {
            memcpy(d, s, n);
        }
        d[n] = '\0';
    }
    return d;
}

static void ev_item_free(struct ev_item *it)
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

static struct ev_item *ev_item_copy(const struct uc_gen_event *ev)
{
    struct ev_item *it = uc_calloc(1, sizeof *it);
    if (!it) {
        return NULL;
    }
    it->kind = ev->kind;
    it->index = ev->index;
    if (ev->kind == UC_EVENT_TOKENS) {
        int32_t n = ev->n_ids > 0 ? ev->n_ids : 0;
        it->n_ids = n;
        it->ids = dup_mem(ev->ids, (size_t)n * sizeof(int32_t));
        it->text = dup_str(ev->text ? ev->text : "", ev->text ? ev->text_len : 0);
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
                struct ev_logprob *d = &it->lps[i];
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
    it->message = dup_str(ev->message ? ev->message : "", ev->message ? strlen(ev->message) : 0);
    it->matched_stop_len = ev->matched_stop ? ev->matched_stop_len : 0;
    it->matched_stop = dup_str(ev->matched_stop ? ev->matched_stop : "", it->matched_stop_len);
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
    ev_item_free(it);
    return NULL;
}

static grpc_byte_buffer *pack_chunk(const char *request_id, const struct ev_item *first,
                                    const struct ev_item *end, int32_t index)
{
    size_t n_ids = 0, n_text = 0;
    bool any_lp = false;
    for (const struct ev_item *it = first; it != end; it = it->next) {
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
    grpc_byte_buffer *bb = NULL;
    if (a.oom) {
        goto out;
    }
    size_t k = 0, t = 0;
    for (const struct ev_item *it = first; it != end; it = it->next) {
        for (int32_t i = 0; i < it->n_ids; i++) {
            if (lps) {
                Uncomp__V1__TokenLogprob *lp = arena_alloc(&a, sizeof *lp);
                if (!lp) {
                    goto out;
                }
                uncomp__v1__token_logprob__init(lp);
                lp->token_id = (uint32_t)it->ids[i];
                if (it->lps) {
                    const struct ev_logprob *s = &it->lps[i];
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
        bb = bytes_msg(resp_bytes, resp_len);
    }
out:
    arena_fini(&a);
    return bb;
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

static uint64_t u64_of(int64_t v) { return v > 0 ? (uint64_t)v : 0; }

static grpc_byte_buffer *pack_complete(const char *request_id, const struct ev_item *d)
{
    struct arena a;
    arena_init(&a);
    grpc_byte_buffer *bb = NULL;
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

    uncomp__v1__compression_report__init(&rep);
    rep.policy = (char *)(uintptr_t)uc_policy_name(d->has_report ? d->report.policy
                                                                 : d->compress.policy);
    rep.kv_budget = (uint32_t)(d->compress.kv_budget > 0 ? d->compress.kv_budget : 0);
    rep.decode_mode = (char *)(uintptr_t)uc_decode_mode_name(d->compress.decode_mode);
    rep.grouping = (char *)(uintptr_t)uc_grouping_name(d->compress.grouping);
    if (d->has_report) {
        const struct uc_compress_report *r = &d->report;
        rep.kv_budget = (uint32_t)(r->kv_budget > 0 ? r->kv_budget : 0);
        rep.kv_tokens_full = u64_of(r->kv_tokens_full);
        rep.kv_tokens_kept = u64_of(r->kv_tokens_kept);
        rep.kv_bytes_full = u64_of(r->kv_bytes_full);
        rep.kv_bytes_kept = u64_of(r->kv_bytes_kept);
        rep.ratio = r->ratio;
        rep.compress_ms = r->compress_ms;
        rep.plan_checksum = r->plan_checksum;
        int32_t ns = r->n_stages;
        if (ns > UC_MAX_STAGES + 1) {
            ns = UC_MAX_STAGES + 1;
        }
        if (ns > 0) {
            rep.stage_rows = arena_alloc(&a, (size_t)ns * sizeof *rep.stage_rows);
            if (!rep.stage_rows) {
                goto out;
            }
            for (int32_t i = 0; i < ns; i++) {
                rep.stage_rows[i] = u64_of(r->stage_rows[i]);
            }
            rep.n_stage_rows = (size_t)ns;
        }
        int32_t nb = ns > 1 ? ns - 1 : 0;
        if (nb > UC_MAX_STAGES) {
            nb = UC_MAX_STAGES;
        }
        if (nb > 0) {
            rep.stage_starts = arena_alloc(&a, (size_t)nb * sizeof *rep.stage_starts);
            if (!rep.stage_starts) {
                goto out;
            }
            for (int32_t i = 0; i < nb; i++) {
                rep.stage_starts[i] = (uint32_t)(r->stage_starts[i] > 0 ? r->stage_starts[i] : 0);
            }
            rep.n_stage_starts = (size_t)nb;
        }
        int32_t ng = r->n_groups > UC_MAX_HEAD_GROUPS ? UC_MAX_HEAD_GROUPS : r->n_groups;
        if (ng > 0) {
            rep.groups = arena_alloc(&a, (size_t)ng * sizeof *rep.groups);
            if (!rep.groups) {
                goto out;
            }
            for (int32_t g = 0; g < ng; g++) {
                Uncomp__V1__GroupReport *gr = arena_alloc(&a, sizeof *gr);
                if (!gr) {
                    goto out;
                }
                uncomp__v1__group_report__init(gr);
                gr->group = (uint32_t)g;
                gr->budget = (uint32_t)(r->group_budget[g] > 0 ? r->group_budget[g] : 0);
                gr->mean_kept = r->group_mean_kept[g];
                rep.groups[g] = gr;
            }
            rep.n_groups = (size_t)ng;
        }
        if (r->n_layers > 0 && r->entropy_mean) {
            rep.entropy = arena_alloc(&a, (size_t)r->n_layers * sizeof *rep.entropy);
            if (!rep.entropy) {
                goto out;
            }
            size_t k = 0;
            for (int64_t l = 0; l < r->n_layers; l++) {
                if (isnan(r->entropy_mean[l])) {
                    continue;
                }
                Uncomp__V1__LayerEntropy *le = arena_alloc(&a, sizeof *le);
                if (!le) {
                    goto out;
                }
                uncomp__v1__layer_entropy__init(le);
                le->layer = (uint32_t)l;
                le->min = r->entropy_min[l];
                le->mean = r->entropy_mean[l];
                le->max = r->entropy_max[l];
                rep.entropy[k++] = le;
            }
            rep.n_entropy = k;
        }
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
        bb = bytes_msg(resp_bytes, resp_len);
    }
out:
    arena_fini(&a);
    return bb;
}

/* ---- Tokenize / Detokenize ------------------------------------------------------------------- */

static void do_tokenize(struct unary_reply *r, const struct uc_admin_src *src,
                        const Uncomp__V1__TokenizeRequest *req, const struct arena *in)
{
    if (!src->tok) {
        reply_set_error(r, GRPC_STATUS_UNAVAILABLE, "the tokenizer is not loaded yet");
        return;
    }
    static const uint32_t text_path[] = {1}; /* TokenizeRequest.text */
    size_t len = 0;
    const char *text = raw_text(in->raw, in->raw_len, text_path, 1, SIZE_MAX, req->text, &len);
    int32_t *ids = NULL;
    int64_t n = 0;
    char why[256];
    uc_status rc = uc_tokenizer_encode_msg(src->tok, text, len, req->add_special_tokens, &ids,
                                           &n, why, sizeof why);
    if (rc == UC_ERR_INVALID_ARG) {
        reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT, "text: %s", why);
        return;
    }
    if (rc != UC_OK) {
        reply_set_error(r, status_code_of(rc), "tokenizer failed: %s: %s", uc_status_str(rc),
                        why);
        return;
    }
    struct arena a;
    arena_init(&a);
    Uncomp__V1__TokenizeResponse resp;
    uncomp__v1__tokenize_response__init(&resp);
    resp.token_ids = arena_alloc(&a, (size_t)n * sizeof *resp.token_ids);
    resp.tokens = arena_alloc(&a, (size_t)n * sizeof *resp.tokens);
    if (!a.oom) {
        for (int64_t i = 0; i < n; i++) {
            const char *s = uc_tokenizer_token_str(src->tok, ids[i]);
            resp.token_ids[i] = (uint32_t)ids[i];
            resp.tokens[i] = (char *)(uintptr_t)(s ? s : "");
        }
        resp.n_token_ids = resp.n_tokens = (size_t)n;
    }
    reply_msg(r, &resp.base, a.oom);
    arena_fini(&a);
    uc_free(ids);
}

static void do_detokenize(struct unary_reply *r, const struct uc_admin_src *src,
                          const Uncomp__V1__DetokenizeRequest *req)
{
    if (!src->tok) {
        reply_set_error(r, GRPC_STATUS_UNAVAILABLE, "the tokenizer is not loaded yet");
        return;
    }
    int64_t vocab = uc_tokenizer_vocab_size(src->tok);
    int32_t *ids = uc_malloc((req->n_token_ids ? req->n_token_ids : 1) * sizeof *ids);
    if (!ids) {
        reply_set_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    for (size_t i = 0; i < req->n_token_ids; i++) {
        if ((int64_t)req->token_ids[i] >= vocab) {
            reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                            "token_ids[%zu]=%u is out of range [0, %lld)", i,
                            req->token_ids[i], (long long)vocab);
            uc_free(ids);
            return;
        }
        ids[i] = (int32_t)req->token_ids[i];
    }
    char *text = NULL;
    size_t len = 0;
    uc_status rc = uc_tokenizer_decode(src->tok, ids, (int64_t)req->n_token_ids,
                                       req->skip_special_tokens, &text, &len);
    uc_free(ids);
    if (rc != UC_OK) {
        reply_set_error(r, rc == UC_ERR_INVALID_ARG ? GRPC_STATUS_INVALID_ARGUMENT
                                                    : status_code_of(rc),
                        "token_ids: decode failed: %s", uc_status_str(rc));
        return;
    }
    Uncomp__V1__DetokenizeResponse resp;
    uncomp__v1__detokenize_response__init(&resp);
    struct arena a;
    arena_init(&a);
    size_t n = 0;
    uint8_t *bytes = pack_with_text(&a, &resp.base, 1, text, len, &n); /* NUL bytes kept */
    r->msg = bytes ? bytes_msg(bytes, n) : NULL;
    if (!r->msg) {
        reply_set_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        r->code = GRPC_STATUS_OK;
        r->detail[0] = '\0';
    }
    arena_fini(&a);
    uc_free(text);
}

/* ---- Admin ----------------------------------------------------------------------------------- */

static void do_server_info(struct unary_reply *r, const struct uc_admin_src *src)
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
        si.default_policy = (char *)(uintptr_t)uc_policy_name(cp.policy);
        si.default_kv_budget = (uint32_t)(cp.kv_budget > 0 ? cp.kv_budget : 0);
    }
    reply_msg(r, &si.base, a.oom);
    arena_fini(&a);
}


/* The last component of a path ("uncomp-tiny" of "/srv/models/uncomp-tiny/"), in a thread-local
 * buffer valid until the next call. */
static const char *base_name(const char *path)
{
    static __thread char buf[256];
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') {
        n--;
    }
    size_t b = n;
    while (b > 0 && path[b - 1] != '/') {
        b--;
    }
    snprintf(buf, sizeof buf, "%.*s", (int)(n - b), path + b);
    return buf;
}
static void do_model_info(struct unary_reply *r, const struct uc_admin_src *src)
{
    if (!src->engine) {
        reply_set_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    const struct uc_model_config *cfg = uc_engine_config(src->engine);
    Uncomp__V1__ModelInfo mi;
    uncomp__v1__model_info__init(&mi);
    /* the folder's name only: a client has no business with the server's file system */
    mi.path = (char *)(uintptr_t)base_name(src->cluster ? src->cluster->model_path : "");
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
    reply_msg(r, &mi.base, false);
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

static void do_stats(struct unary_reply *r, const struct uc_admin_src *src,
                     const Uncomp__V1__GetStatsRequest *req)
{
    const char *section = req->section ? req->section : "";
    if (!uc_admin_section_known(section)) {
        reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                        "section=\"%.64s\" is unknown; use one of: server, cluster, model, "
                        "memory, kv, compress, requests, errors, config (or \"\" for all)",
                        section);
        return;
    }
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
    uc_admin_info(&b, src, section);
    st.text = b.data ? b.data : (char *)(uintptr_t)"";
    reply_msg(r, &st.base, b.oom);
    uc_buf_fini(&b);
}

/* Builds a CompressionProfile from the scheduler's JSON (parsed here, so no engine state is
 * read from this thread). */
static void profile_reply(struct unary_reply *r, const struct uc_admin_src *src)
{
    if (!src->sched || !src->engine) {
        reply_set_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    const struct uc_model_config *cfg = uc_engine_config(src->engine);
    const char *path = uc_engine_profile_path(src->engine);
    Uncomp__V1__CompressionProfile cp;
    uncomp__v1__compression_profile__init(&cp);
    cp.path = (char *)(uintptr_t)base_name(path ? path : ""); /* no server paths */
    char *json = uc_sched_profile_json(src->sched);
    if (!json) {
        cp.present = false;
        reply_msg(r, &cp.base, false);
        return;
    }
    struct uc_profile p;
    memset(&p, 0, sizeof p);
    uc_status rc = uc_profile_parse(&p, json, path ? path : "profile", cfg->n_layers,
                                    cfg->n_heads, cfg->n_heads_kv);
    if (rc != UC_OK) {
        UC_LOG_ERROR("grpc: the active profile does not parse: %s", uc_status_str(rc));
        reply_set_error(r, GRPC_STATUS_INTERNAL, "the active profile does not parse: %s",
                        uc_status_str(rc));
        uc_free(json);
        return;
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
    reply_msg(r, &cp.base, a.oom);
    arena_fini(&a);
    uc_profile_fini(&p);
    uc_free(json);
}

static void do_profile(struct unary_reply *r, const struct uc_admin_src *src)
{
    profile_reply(r, src);
}

static void do_set_policy(struct unary_reply *r, const struct uc_admin_src *src,
                          const Uncomp__V1__SetCompressionPolicyRequest *req)
{
    if (!src->sched || !src->engine) {
        reply_set_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    struct uc_compress_params cp;
    uc_sched_get_default_compress(src->sched, &cp);
    if (req->policy && req->policy[0] && !uc_policy_parse(req->policy, &cp.policy)) {
        char names[160];
        policy_list(names, sizeof names);
        reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy=\"%.64s\" is unknown; use one of: %s", req->policy, names);
        return;
    }
    if (req->kv_budget) {
        cp.kv_budget = clamp_u32(req->kv_budget);
    }
    if (req->decode_mode && req->decode_mode[0] &&
        !uc_decode_mode_parse(req->decode_mode, &cp.decode_mode)) {
        reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                        "decode_mode=\"%.64s\" must be append or evict", req->decode_mode);
        return;
    }
    if (req->grouping && req->grouping[0] && !uc_grouping_parse(req->grouping, &cp.grouping)) {
        reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                        "grouping=\"%.64s\" must be profile or prompt", req->grouping);
        return;
    }
    char msg[256] = "";
    const struct uc_model_config *cfg = uc_engine_config(src->engine);
    uc_status rc = uc_compress_params_validate(&cp, cfg->n_layers, msg, sizeof msg);
    if (rc == UC_OK) {
        rc = uc_sched_set_default_compress(src->sched, &cp, msg, sizeof msg);
    }
    if (rc != UC_OK) {
        reply_set_error(r, status_code_of(rc), "%s", msg[0] ? msg : uc_status_str(rc));
        return;
    }
    uc_sched_get_default_compress(src->sched, &cp);
    UC_LOG_NOTICE("grpc: default compression set policy=%s kv_budget=%d decode_mode=%s "
                  "grouping=%s", uc_policy_name(cp.policy), cp.kv_budget,
                  uc_decode_mode_name(cp.decode_mode), uc_grouping_name(cp.grouping));
    Uncomp__V1__SetCompressionPolicyResponse resp;
    uncomp__v1__set_compression_policy_response__init(&resp);
    resp.policy = (char *)(uintptr_t)uc_policy_name(cp.policy);
    resp.kv_budget = (uint32_t)(cp.kv_budget > 0 ? cp.kv_budget : 0);
    resp.decode_mode = (char *)(uintptr_t)uc_decode_mode_name(cp.decode_mode);
    resp.grouping = (char *)(uintptr_t)uc_grouping_name(cp.grouping);
    reply_msg(r, &resp.base, false);
}

/* `cancel` turns true when the client goes away (on_close): the calibration then ends. */
static void do_calibrate(struct unary_reply *r, const struct uc_admin_src *src,
                         const Uncomp__V1__CalibrateRequest *req, const atomic_bool *cancel)
{
    if (!src->sched || !src->engine) {
        reply_set_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    if (req->window_tokens > INT32_MAX) {
        reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT, "window_tokens=%u is too large",
                        req->window_tokens);
        return;
    }
    if (req->max_windows > INT32_MAX) {
        reply_set_error(r, GRPC_STATUS_INVALID_ARGUMENT, "max_windows=%u is too large",
                        req->max_windows);
        return;
    }
    const char *text = req->text && req->text[0] ? req->text : NULL;
    char msg[256] = "";
    uc_status rc = uc_sched_calibrate(src->sched, text, (int32_t)req->window_tokens,
                                      (int32_t)req->max_windows, cancel, msg, sizeof msg);
    if (rc != UC_OK) {
        reply_set_error(r, status_code_of(rc), "calibration failed: %s",
                        msg[0] ? msg : uc_status_str(rc));
        return;
    }
    profile_reply(r, src);
}

static grpc_byte_buffer *pack_drain(int32_t finished, int32_t aborted)
{
    Uncomp__V1__DrainResponse d;
    uncomp__v1__drain_response__init(&d);
    d.finished = (uint32_t)(finished > 0 ? finished : 0);
    d.aborted = (uint32_t)(aborted > 0 ? aborted : 0);
    return pack_msg(&d.base);
}

static grpc_byte_buffer *pack_health(int status)
{
    Grpc__Health__V1__HealthCheckResponse h;
    grpc__health__v1__health_check_response__init(&h);
    h.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    return pack_msg(&h.base);
}

/* =========================================================================================== */
/* Server: completion queue, calls, streaming, lifecycle                                       */
/* =========================================================================================== */

/* Threads:
 * - CQ threads (N_CQ_THREADS) run grpc_completion_queue_next: new calls are dispatched there
 *   (quick unary work inline; Calibrate and Drain on a worker thread each, since they block),
 *   and send/close completions chain the next send of a stream.
 * - The pump thread wakes on a condition variable. Scheduler sinks (engine thread) and health
 *   changes put a call on the kick list; the pump starts that call's next send if none is in
 *   flight. So the engine thread never blocks on gRPC and a token reaches the wire in one hop.
 * A call is freed when its reference count drops to zero: one reference per outstanding gRPC
 * tag (the close batch, a send batch), one for the scheduler until its DONE event, one while on
 * the kick list, one per worker thread and one while being dispatched. */

#define N_CQ_THREADS 2
#define SHUTDOWN_GRACE_MS 3000  /* in-flight calls finish before they are cancelled */
#define SHUTDOWN_WAIT_MS 15000  /* then everything must be gone, or we leak rather than hang */

enum method {
    M_GENERATE,
    M_TOKENIZE,
    M_DETOKENIZE,
    M_ABORT,
    M_SERVER_INFO,
    M_MODEL_INFO,
    M_STATS,
    M_PROFILE,
    M_SET_POLICY,
    M_CALIBRATE,
    M_DRAIN,
    M_HEALTH_CHECK,
    M_HEALTH_WATCH,
    M_CHAT,
    M_COUNT,
    M_GENERIC = M_COUNT, /* a method nobody registered: UNIMPLEMENTED */
};

struct method_desc {
    const char *path;
    const ProtobufCMessageDescriptor *req;
};

static const struct method_desc methods[M_COUNT] = {
    [M_GENERATE] = {"/uncomp.v1.Inference/Generate", &uncomp__v1__generate_request__descriptor},
    [M_TOKENIZE] = {"/uncomp.v1.Inference/Tokenize", &uncomp__v1__tokenize_request__descriptor},
    [M_DETOKENIZE] = {"/uncomp.v1.Inference/Detokenize",
                      &uncomp__v1__detokenize_request__descriptor},
    [M_ABORT] = {"/uncomp.v1.Inference/Abort", &uncomp__v1__abort_request__descriptor},
    [M_SERVER_INFO] = {"/uncomp.v1.Admin/GetServerInfo",
                       &uncomp__v1__get_server_info_request__descriptor},
    [M_MODEL_INFO] = {"/uncomp.v1.Admin/GetModelInfo",
                      &uncomp__v1__get_model_info_request__descriptor},
    [M_STATS] = {"/uncomp.v1.Admin/GetStats", &uncomp__v1__get_stats_request__descriptor},
    [M_PROFILE] = {"/uncomp.v1.Admin/GetCompressionProfile",
                   &uncomp__v1__get_compression_profile_request__descriptor},
    [M_SET_POLICY] = {"/uncomp.v1.Admin/SetCompressionPolicy",
                      &uncomp__v1__set_compression_policy_request__descriptor},
    [M_CALIBRATE] = {"/uncomp.v1.Admin/Calibrate", &uncomp__v1__calibrate_request__descriptor},
    [M_DRAIN] = {"/uncomp.v1.Admin/Drain", &uncomp__v1__drain_request__descriptor},
    [M_HEALTH_CHECK] = {"/grpc.health.v1.Health/Check",
                        &grpc__health__v1__health_check_request__descriptor},
    [M_HEALTH_WATCH] = {"/grpc.health.v1.Health/Watch",
                        &grpc__health__v1__health_check_request__descriptor},
    [M_CHAT] = {"/uncomp.v1.Inference/Chat", &uncomp__v1__chat_request__descriptor},
};

/* Generate and Chat: the same stream of a scheduler request. */
static bool is_gen(enum method m) { return m == M_GENERATE || m == M_CHAT; }

enum tag_kind { TAG_NEW, TAG_CLOSE, TAG_SEND, TAG_SHUTDOWN };

struct call;
struct tag {
    struct call *c;
    enum tag_kind kind;
};

struct call {
    struct uc_server *srv;
    enum method m;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details;  /* M_GENERIC only */
    grpc_byte_buffer *payload;  /* the request message (registered methods) */
    struct tag t_new, t_close, t_send;
    int close_cancelled;        /* written by gRPC when the close batch completes */

    atomic_int refs;            /* see the reference rules above; no lock needed */
    atomic_bool calib_cancel;   /* Calibrate: the client went away (read by the scheduler) */
    pthread_mutex_t mu;         /* guards everything below */
    bool cancelled;             /* the client went away (or the deadline passed) */
    bool sending;               /* a send batch is in flight */
    bool kicked;                /* on the server's kick list */
    bool md_sent, final_sent, send_failed;
    grpc_byte_buffer *send_buf; /* kept until its batch completes */
    grpc_slice status_details;
    bool has_details;
    struct call *kick_next;
    struct call *live_prev, *live_next; /* under srv->mu */

    /* Generate */
    char request_id[UC_REQUEST_ID_MAX];
    int64_t deadline_ms;
    bool submitted, sched_done, lost_event;
    int32_t n_choices;          /* DONE events to wait for (GenerateRequest.n) */
    int32_t n_sched_done;       /* DONE events delivered by the scheduler */
    int32_t n_completes;        /* DONE events taken by the pump */
    uc_status first_err;        /* n > 1: a choice that failed outright before the last ended */
    char first_err_msg[320];
    bool abort_sent;            /* uc_server_destroy aborted it */
    struct ev_item *q_head, *q_tail;
    /* Health.Watch */
    bool watch_ready;           /* dispatched: the service name is known */
    int watch_last;             /* last status sent, -1 = none */
    bool watch_unknown;         /* the service is unknown: report SERVICE_UNKNOWN */
};

struct uc_server {
    struct uc_server_params p;
    char *listen;
    char *tls_cert, *tls_key;
    grpc_server *server;
    grpc_completion_queue *cq;
    void *reg[M_COUNT];
    pthread_t cq_threads[N_CQ_THREADS];
    int n_cq_threads;
    pthread_t pump_thread;
    bool pump_started;
    struct metrics_http *http;
    int64_t start_ms;
    struct tag t_shutdown;
    _Atomic int state;
    uint64_t codes[UC_ADMIN_N_CODES]; /* replies per status code (__atomic ops) */

    pthread_mutex_t mu;         /* guards everything below */
    pthread_cond_t kick_cv;     /* wakes the pump */
    pthread_cond_t cv;          /* destroy waits here for calls, workers, shutdown */
    struct call *kick_head, *kick_tail;
    struct call *live;          /* dispatched calls not yet freed */
    int64_t n_live;
    int n_workers;
    bool stopping;              /* destroy has begun: no re-arming, no new work */
    bool shutdown_done;         /* the server shutdown tag fired */
    bool pump_quit;
    bool drain_started, drained_notified;
};

static const char *const state_names[] = {"LOADING", "SERVING", "DRAINING", "STOPPED"};

const char *uc_server_state_name(enum uc_server_state s)
{
    return s >= UC_SERVER_LOADING && s <= UC_SERVER_STOPPED ? state_names[s] : "UNKNOWN";
}

static void call_free(struct call *c);
static void pump_locked(struct call *c);

static const char *method_path(const struct call *c)
{
    return c->m < M_COUNT ? methods[c->m].path : "(unregistered method)";
}
static void arm(struct uc_server *s, enum method m);

/* ---- references and the kick list ------------------------------------------------------------ */

static void call_ref(struct call *c) { atomic_fetch_add(&c->refs, 1); }

/* A reference to a call found on the live list, unless it is already being freed. */
static bool call_tryref(struct call *c)
{
    int v = atomic_load(&c->refs);
    while (v > 0) {
        if (atomic_compare_exchange_weak(&c->refs, &v, v + 1)) {
            return true;
        }
    }
    return false;
}

static void call_unref(struct call *c)
{
    if (atomic_fetch_sub(&c->refs, 1) == 1) {
        call_free(c);
    }
}

/* Puts a call on the kick list (c->mu held, srv->mu not held by the caller). */
static void kick_locked_call(struct call *c)
{
    if (c->kicked || c->sending) {
        return;
    }
    c->kicked = true;
    call_ref(c);
    struct uc_server *s = c->srv;
    pthread_mutex_lock(&s->mu);
    c->kick_next = NULL;
    if (s->kick_tail) {
        s->kick_tail->kick_next = c;
    } else {
        s->kick_head = c;
    }
    s->kick_tail = c;
    pthread_cond_signal(&s->kick_cv);
    pthread_mutex_unlock(&s->mu);
}

static void *pump_main(void *arg)
{
    struct uc_server *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->kick_head && !s->pump_quit) {
            pthread_cond_wait(&s->kick_cv, &s->mu);
        }
        struct call *c = s->kick_head;
        if (!c) {
            break; /* quit with an empty list */
        }
        s->kick_head = c->kick_next;
        if (!s->kick_head) {
            s->kick_tail = NULL;
        }
        pthread_mutex_unlock(&s->mu);
        pthread_mutex_lock(&c->mu);
        c->kicked = false;
        pump_locked(c);
        pthread_mutex_unlock(&c->mu);
        call_unref(c);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- sending --------------------------------------------------------------------------------- */

static void count_code(struct uc_server *s, grpc_status_code code)
{
    if ((int)code >= 0 && (int)code < UC_ADMIN_N_CODES) {
        __atomic_fetch_add(&s->codes[code], 1, __ATOMIC_RELAXED);
    }
}

/* Starts one send batch: initial metadata (first time), a message (optional) and the final
 * status (optional). c->mu held (released around the gRPC call), no send in flight. Takes
 * ownership of msg. */
static bool start_send(struct call *c, grpc_byte_buffer *msg, bool with_status,
                       grpc_status_code code, const char *details)
{
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
        c->md_sent = true;
    }
    if (msg) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = msg;
        n++;
    }
    if (with_status) {
        c->status_details = grpc_slice_from_copied_string(details ? details : "");
        c->has_details = true;
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = code;
        ops[n].data.send_status_from_server.status_details = &c->status_details;
        n++;
        c->final_sent = true;
        count_code(c->srv, code);
    }
    c->send_buf = msg;
    c->sending = true;
    call_ref(c);
    /* gRPC may write to the socket inside start_batch: do it unlocked, so a scheduler sink
     * waiting for c->mu never waits on I/O. `sending` keeps every other sender out meanwhile;
     * the completion may even run (on a CQ thread) before start_batch returns. */
    pthread_mutex_unlock(&c->mu);
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL);
    pthread_mutex_lock(&c->mu);
    if (e != GRPC_CALL_OK) {
        UC_LOG_ERROR("grpc: start_batch failed error=%d method=%s req=%s", (int)e,
                     method_path(c), c->request_id);
        c->sending = false;
        atomic_fetch_sub(&c->refs, 1); /* never the last: the caller holds one */
        if (c->send_buf) {
            grpc_byte_buffer_destroy(c->send_buf);
            c->send_buf = NULL;
        }
        if (c->has_details) {
            grpc_slice_unref(c->status_details);
            c->has_details = false;
        }
        c->final_sent = true;
        c->send_failed = true;
        return false;
    }
    return true;
}

/* Ends a call with a status (and a message when msg != NULL). c->mu held. */
static void finish_call(struct call *c, grpc_byte_buffer *msg, grpc_status_code code,
                        const char *details)
{
    if (c->final_sent || c->sending) {
        if (msg) {
            grpc_byte_buffer_destroy(msg);
        }
        return;
    }
    start_send(c, msg, true, code, details);
}

static void reply(struct call *c, struct unary_reply *r)
{
    if (r->code != GRPC_STATUS_OK && r->code != GRPC_STATUS_INTERNAL) {
        UC_LOG_DEBUG("grpc: %s -> %s: %s", method_path(c), uc_admin_code_name(r->code),
                     r->detail);
    } else if (r->code == GRPC_STATUS_INTERNAL) {
        UC_LOG_ERROR("grpc: %s -> INTERNAL: %s", method_path(c), r->detail);
    }
    pthread_mutex_lock(&c->mu);
    finish_call(c, r->code == GRPC_STATUS_OK ? r->msg : NULL, r->code,
                r->code == GRPC_STATUS_OK ? "" : r->detail);
    if (r->code != GRPC_STATUS_OK && r->msg) {
        grpc_byte_buffer_destroy(r->msg);
    }
    r->msg = NULL;
    pthread_mutex_unlock(&c->mu);
}

static void reply_error(struct call *c, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reply_error(struct call *c, grpc_status_code code, const char *fmt, ...)
{
    struct unary_reply r = {0};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r.detail, sizeof r.detail, fmt, ap);
    va_end(ap);
    r.code = code;
    reply(c, &r);
}

/* ---- health ---------------------------------------------------------------------------------- */

static int health_status(struct uc_server *s)
{
    return s->state == UC_SERVER_SERVING
               ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
               : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static bool health_service_known(const char *svc)
{
    return !svc || !svc[0] || strcmp(svc, "uncomp.v1.Inference") == 0 ||
           strcmp(svc, "uncomp.v1.Admin") == 0 || strcmp(svc, "grpc.health.v1.Health") == 0;
}

static void watch_pump(struct call *c)
{
    if (c->sending || c->final_sent || c->cancelled || c->send_failed) {
        return;
    }
    struct uc_server *s = c->srv;
    pthread_mutex_lock(&s->mu);
    bool stopping = s->stopping;
    pthread_mutex_unlock(&s->mu);
    int st = c->watch_unknown
                 ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN
                 : health_status(s);
    if (st != c->watch_last) {
        grpc_byte_buffer *bb = pack_health(st);
        if (!bb) {
            start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        c->watch_last = st;
        start_send(c, bb, false, GRPC_STATUS_OK, NULL);
        return;
    }
    if (stopping) {
        start_send(c, NULL, true, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
    }
}

/* References to the live calls of one method (uc_malloc'd array, *n entries). Lock order is
 * call before server, so the calls are collected under srv->mu and locked afterwards. */
static struct call **live_calls(struct uc_server *s, enum method m, int64_t *n)
{
    *n = 0;
    pthread_mutex_lock(&s->mu);
    struct call **v = uc_malloc((size_t)(s->n_live + 1) * sizeof *v);
    for (struct call *c = s->live; v && c; c = c->live_next) {
        if ((c->m == m || (is_gen(m) && is_gen(c->m))) && call_tryref(c)) {
            v[(*n)++] = c;
        }
    }
    pthread_mutex_unlock(&s->mu);
    if (!v) {
        UC_LOG_ERROR("grpc: out of memory listing calls");
    }
    return v;
}

/* Kicks every Health.Watch stream (after a state change or at shutdown). */
static void kick_watchers(struct uc_server *s)
{
    int64_t n;
    struct call **v = live_calls(s, M_HEALTH_WATCH, &n);
    for (int64_t i = 0; i < n; i++) {
        struct call *c = v[i];
        pthread_mutex_lock(&c->mu);
        if (c->watch_ready && !c->final_sent && !c->cancelled) {
            kick_locked_call(c);
        }
        pthread_mutex_unlock(&c->mu);
        call_unref(c);
    }
    uc_free(v);
}

/* ---- Generate -------------------------------------------------------------------------------- */

static void gen_drop_queue(struct call *c)
{
    struct ev_item *it = c->q_head;
    while (it) {
        struct ev_item *n = it->next;
        ev_item_free(it);
        it = n;
    }
    c->q_head = c->q_tail = NULL;
}

/* The scheduler's sink (engine thread): copy the event, queue it, kick. Never blocks on I/O. */
static void gen_sink(void *user, const struct uc_gen_event *ev)
{
    struct call *c = user;
    bool done = ev->kind == UC_EVENT_DONE;
    if (ev->kind == UC_EVENT_PROMPT) {
        return; /* Generate never asks for prompt logprobs */
    }
    struct ev_item *it = ev_item_copy(ev);
    pthread_mutex_lock(&c->mu);
    if (!c->request_id[0] && ev->request_id) {
        snprintf(c->request_id, sizeof c->request_id, "%s", ev->request_id);
    }
    if (!it) {
        c->lost_event = true;
    } else if (c->cancelled || c->final_sent) {
        ev_item_free(it); /* nobody will read it */
    } else {
        if (c->q_tail) {
            c->q_tail->next = it;
        } else {
            c->q_head = it;
        }
        c->q_tail = it;
    }
    if (done && ++c->n_sched_done >= (c->n_choices > 1 ? c->n_choices : 1)) {
        c->sched_done = true;
    }
    kick_locked_call(c);
    pthread_mutex_unlock(&c->mu);
    if (done) {
        call_unref(c); /* the scheduler's reference */
    }
}

/* Sends what the queue holds: all queued tokens as one chunk, then the Complete with the final
 * status. c->mu held. */
static void gen_pump(struct call *c)
{
    if (c->sending || c->final_sent) {
        return;
    }
    if (c->cancelled || c->send_failed) {
        gen_drop_queue(c);
        return;
    }
    /* skip empty token events; find the first DONE */
    struct ev_item *first = c->q_head, *end = first;
    bool any = false;
    while (end && end->kind == UC_EVENT_TOKENS && end->index == first->index) {
        any = any || end->n_ids > 0 || end->text_len > 0;
        end = end->next;
    }
    if (any) {
        grpc_byte_buffer *bb = pack_chunk(c->request_id, first, end, first->index);
        while (c->q_head != end) {
            struct ev_item *n = c->q_head->next;
            ev_item_free(c->q_head);
            c->q_head = n;
        }
        if (!c->q_head) {
            c->q_tail = NULL;
        }
        if (!bb) {
            UC_LOG_ERROR("grpc: out of memory packing a chunk req=%s", c->request_id);
            start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        start_send(c, bb, false, GRPC_STATUS_OK, NULL);
        return;
    }
    /* drop empty token events */
    while (c->q_head && c->q_head->kind == UC_EVENT_TOKENS) {
        struct ev_item *n = c->q_head->next;
        ev_item_free(c->q_head);
        c->q_head = n;
    }
    if (!c->q_head) {
        c->q_tail = NULL;
        if (c->sched_done && c->lost_event) {
            UC_LOG_ERROR("grpc: out of memory queueing an event req=%s", c->request_id);
            start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED,
                       "out of memory while streaming the response");
        }
        return;
    }
    struct ev_item *d = c->q_head;
    c->q_head = d->next;
    if (!c->q_head) {
        c->q_tail = NULL;
    }
    if (c->lost_event) {
        UC_LOG_ERROR("grpc: out of memory queueing an event req=%s", c->request_id);
        ev_item_free(d);
        start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED,
                   "out of memory while streaming the response");
        return;
    }
    grpc_status_code code = status_code_of(d->status);
    /* the Complete goes out when the request ran to an end or was aborted; a request that
     * failed outright gets only the error status */
    bool with_complete = d->status == UC_OK || d->finish == UC_FINISH_ABORTED;
    grpc_byte_buffer *bb = with_complete ? pack_complete(c->request_id, d) : NULL;
    char detail[320];
    if (d->status == UC_OK) {
        detail[0] = '\0';
    } else {
        snprintf(detail, sizeof detail, "%s", d->message && d->message[0]
                                                 ? d->message : uc_status_str(d->status));
    }
    /* n > 1: every choice's Complete is a message; the stream's status comes with the last
     * (the first failure's, when a choice failed) */
    if (++c->n_completes < (c->n_choices > 1 ? c->n_choices : 1)) {
        if (d->status != UC_OK && c->first_err == UC_OK) {
            c->first_err = d->status;
            snprintf(c->first_err_msg, sizeof c->first_err_msg, "%s", detail);
        }
        ev_item_free(d);
        if (with_complete && !bb) {
            start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        } else if (bb) {
            start_send(c, bb, false, GRPC_STATUS_OK, NULL);
        } else {
            gen_pump(c);
        }
        return;
    }
    if (d->status == UC_OK && c->first_err != UC_OK) {
        code = status_code_of(c->first_err);
        snprintf(detail, sizeof detail, "%s", c->first_err_msg);
    }
    if (code == GRPC_STATUS_INTERNAL) {
        UC_LOG_ERROR("grpc: Generate failed req=%s status=%s: %s", c->request_id,
                     uc_status_str(d->status), detail);
    }
    ev_item_free(d);
    if (with_complete && !bb) {
        start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    start_send(c, bb, true, code, detail);
}

/* gpr deadline -> absolute uc_time_ms() (0 = none); *expired when it already passed. */
static int64_t deadline_ms_of(gpr_timespec d, bool *expired)
{
    *expired = false;
    if (d.clock_type == GPR_TIMESPAN || d.tv_sec == INT64_MAX ||
        gpr_time_cmp(d, gpr_inf_future(d.clock_type)) == 0) {
        return 0;
    }
    gpr_timespec mono = gpr_convert_clock_type(d, GPR_CLOCK_MONOTONIC);
    gpr_timespec left = gpr_time_sub(mono, gpr_now(GPR_CLOCK_MONOTONIC));
    if (left.tv_sec > 100LL * 365 * 86400) {
        return 0; /* effectively infinite */
    }
    int64_t left_ms = left.tv_sec * 1000 + left.tv_nsec / 1000000;
    if (left_ms <= 0) {
        *expired = true;
        return 0;
    }
    return uc_time_ms() + left_ms;
}

static void admin_src(struct uc_server *s, struct uc_admin_src *a, uint64_t *codes);

static void handle_generate(struct call *c, const Uncomp__V1__GenerateRequest *req,
                            const struct arena *in)
{
    struct uc_server *s = c->srv;
    enum uc_server_state st = (enum uc_server_state)s->state;
    if (!s->p.sched || !s->p.tok || !s->p.engine) {
        reply_error(c, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    if (st != UC_SERVER_SERVING) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, GRPC_STATUS_UNAVAILABLE, "%s",
                    st == UC_SERVER_LOADING ? "the model is still loading; retry shortly"
                                            : "the server is draining and admits no new requests");
        return;
    }
    const struct uc_model_config *cfg = uc_engine_config(s->p.engine);
    struct gen_ctx ctx = {
        .tok = s->p.tok,
        .raw = in->raw,
        .raw_len = in->raw_len,
        .vocab = cfg->vocab,
        .n_layers = cfg->n_layers,
    };
    uc_sched_get_default_compress(s->p.sched, &ctx.defaults);
    struct gen_req gr;
    char msg[512];
    uc_status rc = gen_request_parse(&gr, req, &ctx, msg, sizeof msg);
    if (rc != UC_OK) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, status_code_of(rc), "%s", msg);
        return;
    }
    bool expired = false;
    gr.req.deadline_ms = deadline_ms_of(c->deadline, &expired);
    if (expired) {
        gen_req_fini(&gr);
        metrics_request_rejected(s->p.metrics);
        reply_error(c, GRPC_STATUS_DEADLINE_EXCEEDED, "the deadline passed before the request "
                                                      "was queued");
        return;
    }
    int32_t n_choices = gr.req.n > 1 ? gr.req.n : 1;
    pthread_mutex_lock(&c->mu);
    c->deadline_ms = gr.req.deadline_ms;
    c->n_choices = n_choices;
    snprintf(c->request_id, sizeof c->request_id, "%s", gr.req.request_id);
    pthread_mutex_unlock(&c->mu);
    for (int32_t i = 0; i < n_choices; i++) {
        call_ref(c); /* the scheduler's, until each choice's DONE */
    }
    char id[UC_REQUEST_ID_MAX] = "";
    rc = uc_sched_submit(s->p.sched, &gr.req, gen_sink, c, id, msg, sizeof msg);
    gen_req_fini(&gr);
    if (rc != UC_OK) {
        atomic_fetch_sub(&c->refs, n_choices); /* the sink will never run; dispatch keeps c
                                                  alive */
        grpc_status_code code = status_code_of(rc);
        if (code == GRPC_STATUS_INTERNAL) {
            UC_LOG_ERROR("grpc: Generate submit failed req=%s: %s", gr.req.request_id, msg);
        }
        reply_error(c, code, "%s", msg[0] ? msg : uc_status_str(rc));
        return;
    }
    pthread_mutex_lock(&c->mu);
    snprintf(c->request_id, sizeof c->request_id, "%s", id);
    c->submitted = true;
    bool cancel_now = c->cancelled && !c->sched_done;
    int64_t dl = c->deadline_ms;
    pthread_mutex_unlock(&c->mu);
    UC_LOG_DEBUG("grpc: Generate queued req=%s", id);
    if (cancel_now) {
        uc_sched_abort(s->p.sched, id,
                       dl > 0 && uc_time_ms() >= dl - 50 ? UC_ERR_TIMEOUT : UC_ERR_CANCELLED);
    }
}

/* Chat: the messages rendered by the chat template (as HTTP's /v1/chat/completions renders
 * them), tokenized without added special tokens, then the Generate path with those ids (the
 * field numbers of sampling, compression and n are Generate's, so its parsing applies). */
static void handle_chat(struct call *c, const Uncomp__V1__ChatRequest *req,
                        const struct arena *in)
{
    struct uc_server *s = c->srv;
    if (!s->p.tok) {
        reply_error(c, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    if (!s->p.chat) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, GRPC_STATUS_FAILED_PRECONDITION,
                    "the model has no chat template: start uncompd with --chat-template FILE");
        return;
    }
    char msg[512] = "";
    grpc_status_code code = GRPC_STATUS_OK;
    char *text = NULL;
    size_t len = 0;
    int32_t *ids = NULL;
    uint32_t *uids = NULL;
    int64_t n = 0;
    cJSON *msgs = cJSON_CreateArray();
    for (size_t i = 0; msgs && i < req->n_messages; i++) {
        cJSON *m = cJSON_CreateObject();
        if (!m || !cJSON_AddItemToArray(msgs, m) ||
            !cJSON_AddStringToObject(m, "role", req->messages[i]->role) ||
            !cJSON_AddStringToObject(m, "content", req->messages[i]->content)) {
            cJSON_Delete(msgs);
            msgs = NULL;
        }
    }
    if (!msgs) {
        code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        snprintf(msg, sizeof msg, "out of memory");
        goto out;
    }
    if (req->n_messages == 0) {
        code = GRPC_STATUS_INVALID_ARGUMENT;
        snprintf(msg, sizeof msg, "messages is empty");
        goto out;
    }
    uc_status rc = uc_chat_messages_validate(msgs, msg, sizeof msg);
    if (rc == UC_OK) {
        rc = uc_chat_template_render(s->p.chat, msgs, true, NULL, &text, &len, msg, sizeof msg);
    }
    if (rc == UC_OK) {
        rc = uc_tokenizer_encode_msg(s->p.tok, text, len, false, &ids, &n, msg, sizeof msg);
    }
    if (rc != UC_OK) {
        code = status_code_of(rc);
        goto out;
    }
    uids = uc_malloc((size_t)(n + 1) * sizeof *uids);
    if (!uids) {
        code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        snprintf(msg, sizeof msg, "out of memory");
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        uids[i] = (uint32_t)ids[i];
    }
    Uncomp__V1__TokenIds tids;
    uncomp__v1__token_ids__init(&tids);
    tids.n_ids = (size_t)n;
    tids.ids = uids;
    Uncomp__V1__GenerateRequest g;
    uncomp__v1__generate_request__init(&g);
    g.request_id = req->request_id;
    g.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS;
    g.token_ids = &tids;
    g.sampling = req->sampling;
    g.compression = req->compression;
    g.n = req->n;
    handle_generate(c, &g, in);
out:
    if (code != GRPC_STATUS_OK) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, code, "messages: %s", msg);
    }
    cJSON_Delete(msgs);
    uc_free(text);
    uc_free(ids);
    uc_free(uids);
}

/* ---- Drain and workers ----------------------------------------------------------------------- */

/* Drains the scheduler (blocking); returns whether this caller must run on_drained. */
static bool run_drain(struct uc_server *s, int64_t timeout_ms, int32_t *finished,
                      int32_t *aborted)
{
    pthread_mutex_lock(&s->mu);
    s->drain_started = true;
    pthread_mutex_unlock(&s->mu);
    int st = s->state;
    if (st == UC_SERVER_SERVING || st == UC_SERVER_LOADING) {
        uc_server_set_state(s, UC_SERVER_DRAINING);
    }
    UC_LOG_NOTICE("grpc: draining (up to %lld ms)", (long long)timeout_ms);
    *finished = *aborted = 0;
    if (s->p.sched) {
        uc_sched_drain(s->p.sched, timeout_ms, finished, aborted);
    }
    UC_LOG_NOTICE("grpc: drained finished=%d aborted=%d", *finished, *aborted);
    pthread_mutex_lock(&s->mu);
    bool notify = !s->drained_notified;
    s->drained_notified = true;
    pthread_mutex_unlock(&s->mu);
    return notify;
}

struct worker {
    struct uc_server *s;
    struct call *c;         /* NULL for uc_server_drain */
    grpc_byte_buffer *payload;
};

/* Ends a worker: drop the call, then (last) leave the server's worker count, so that
 * uc_server_destroy may proceed; nothing of the server is touched afterwards. */
static void worker_exit(struct uc_server *s, struct call *c, bool notify)
{
    void (*on_drained)(void *) = s->p.on_drained;
    void *user = s->p.drained_user;
    if (c) {
        call_unref(c);
    }
    pthread_mutex_lock(&s->mu);
    s->n_workers--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (notify && on_drained) {
        on_drained(user);
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct uc_server *s = w->s;
    struct call *c = w->c;
    uc_free(w);
    bool notify = false;
    struct arena a;
    arena_init(&a);
    if (!c) {
        int32_t f, ab;
        notify = run_drain(s, s->p.drain_timeout_ms, &f, &ab);
    } else if (c->m == M_DRAIN) {
        const Uncomp__V1__DrainRequest *req =
            (const Uncomp__V1__DrainRequest *)unpack_msg(&a, methods[M_DRAIN].req,
                                                        c->payload);
        int64_t t = req && req->timeout_ms ? (int64_t)req->timeout_ms : s->p.drain_timeout_ms;
        int32_t f, ab;
        notify = run_drain(s, t, &f, &ab);
        grpc_byte_buffer *bb = pack_drain(f, ab);
        pthread_mutex_lock(&c->mu);
        if (bb) {
            finish_call(c, bb, GRPC_STATUS_OK, "");
        } else {
            finish_call(c, NULL, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        }
        pthread_mutex_unlock(&c->mu);
    } else if (c->m == M_CALIBRATE) {
        const Uncomp__V1__CalibrateRequest *req =
            (const Uncomp__V1__CalibrateRequest *)unpack_msg(&a, methods[M_CALIBRATE].req,
                                                            c->payload);
        struct unary_reply r = {0};
        struct uc_admin_src src;
        uint64_t codes[UC_ADMIN_N_CODES];
        admin_src(s, &src, codes);
        do_calibrate(&r, &src, req, &c->calib_cancel);
        reply(c, &r);
    }
    arena_fini(&a);
    worker_exit(s, c, notify);
    return NULL;
}

/* Runs a blocking operation on its own detached thread; false (and nothing started) when the
 * thread cannot be created. */
static bool spawn_worker(struct uc_server *s, struct call *c)
{
    struct worker *w = uc_calloc(1, sizeof *w);
    if (!w) {
        return false;
    }
    w->s = s;
    w->c = c;
    if (c) {
        pthread_mutex_lock(&c->mu);
        call_ref(c);
        pthread_mutex_unlock(&c->mu);
    }
    pthread_mutex_lock(&s->mu);
    s->n_workers++;
    pthread_mutex_unlock(&s->mu);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    int err = pthread_create(&th, &attr, worker_main, w);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        UC_LOG_ERROR("grpc: cannot start a worker thread (errno=%d)", err);
        uc_free(w);
        pthread_mutex_lock(&s->mu);
        s->n_workers--;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        if (c) {
            call_unref(c);
        }
        return false;
    }
    return true;
}

/* ---- dispatch -------------------------------------------------------------------------------- */

/* The admin view of the server; codes (UC_ADMIN_N_CODES) receives a snapshot of the counts. */
static void admin_src(struct uc_server *s, struct uc_admin_src *a, uint64_t *codes)
{
    memset(a, 0, sizeof *a);
    a->cluster = s->p.cluster;
    a->engine = s->p.engine;
    a->tok = s->p.tok;
    a->sched = s->p.sched;
    a->metrics = s->p.metrics;
    a->state = uc_server_state_name((enum uc_server_state)s->state);
    a->uptime_s = (double)(uc_time_ms() - s->start_ms) / 1e3;
    a->listen = s->listen;
    a->metrics_port = s->p.metrics_port;
    a->tls = s->tls_cert != NULL;
    pthread_mutex_lock(&s->mu);
    a->calls_active = s->n_live;
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < UC_ADMIN_N_CODES; i++) {
        codes[i] = __atomic_load_n(&s->codes[i], __ATOMIC_RELAXED);
    }
    a->errors_by_code = codes;
    a->write_config_info = s->p.write_config_info;
    a->config_user = s->p.config_user;
}

static void dispatch_generic(struct call *c)
{
    char path[256];
    size_t n = GRPC_SLICE_LENGTH(c->details.method);
    if (n >= sizeof path) {
        n = sizeof path - 1;
    }
    memcpy(path, GRPC_SLICE_START_PTR(c->details.method), n);
    path[n] = '\0';
    reply_error(c, GRPC_STATUS_UNIMPLEMENTED, "method %s is not implemented by uncompd", path);
}

/* API keys (auth.h) from the metadata "authorization: Bearer KEY" or "x-api-key: KEY". Health
 * stays open; Drain, SetCompressionPolicy and Calibrate need the admin key when one is set. */
static bool call_authorized(const struct call *c)
{
    const struct uc_auth *auth = c->srv->p.auth;
    if (!uc_auth_enabled(auth) || c->m == M_HEALTH_CHECK || c->m == M_HEALTH_WATCH) {
        return true;
    }
    const char *key = NULL;
    size_t key_len = 0;
    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_metadata *m = &c->md.metadata[i];
        const char *k = (const char *)GRPC_SLICE_START_PTR(m->key);
        size_t kl = GRPC_SLICE_LENGTH(m->key);
        const char *v = (const char *)GRPC_SLICE_START_PTR(m->value);
        size_t vl = GRPC_SLICE_LENGTH(m->value);
        if (kl == 13 && memcmp(k, "authorization", 13) == 0) {
            if (!uc_auth_bearer(v, vl, &key, &key_len)) {
                key = NULL;
            }
        } else if (kl == 9 && memcmp(k, "x-api-key", 9) == 0) {
            key = v;
            key_len = vl;
        }
    }
    bool admin = c->m == M_SET_POLICY || c->m == M_CALIBRATE || c->m == M_DRAIN;
    return admin ? uc_auth_check_admin(auth, key, key_len) : uc_auth_check(auth, key, key_len);
}

static void dispatch(struct call *c)
{
    struct uc_server *s = c->srv;
    if (c->m == M_GENERIC) {
        dispatch_generic(c);
        return;
    }
    if (!call_authorized(c)) {
        reply_error(c, GRPC_STATUS_UNAUTHENTICATED, "a valid API key is needed: send the "
                    "metadata 'authorization: Bearer KEY'%s",
                    c->m == M_SET_POLICY || c->m == M_CALIBRATE || c->m == M_DRAIN
                        ? " (the admin key for this call)" : "");
        return;
    }
    struct arena a;
    arena_init(&a);
    const ProtobufCMessage *req = unpack_msg(&a, methods[c->m].req, c->payload);
    if (!req) {
        if (a.oom) {
            reply_error(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        } else {
            if (is_gen(c->m)) {
                metrics_request_rejected(s->p.metrics);
            }
            reply_error(c, GRPC_STATUS_INVALID_ARGUMENT,
                        "the request is not a valid %s message%s", methods[c->m].req->name,
                        c->payload ? "" : " (no message was sent)");
        }
        arena_fini(&a);
        return;
    }
    struct uc_admin_src src;
    uint64_t codes[UC_ADMIN_N_CODES];
    admin_src(s, &src, codes);
    struct unary_reply r = {0};
    bool replied = false;
    switch (c->m) {
    case M_GENERATE:
        handle_generate(c, (const Uncomp__V1__GenerateRequest *)req, &a);
        replied = true;
        break;
    case M_CHAT:
        handle_chat(c, (const Uncomp__V1__ChatRequest *)req, &a);
        replied = true;
        break;
    case M_TOKENIZE:
        do_tokenize(&r, &src, (const Uncomp__V1__TokenizeRequest *)req, &a);
        break;
    case M_DETOKENIZE:
        do_detokenize(&r, &src, (const Uncomp__V1__DetokenizeRequest *)req);
        break;
    case M_ABORT: {
        const Uncomp__V1__AbortRequest *ar = (const Uncomp__V1__AbortRequest *)req;
        if (!ar->request_id || !ar->request_id[0]) {
            reply_set_error(&r, GRPC_STATUS_INVALID_ARGUMENT, "request_id is empty");
        } else if (strlen(ar->request_id) >= UC_REQUEST_ID_MAX) {
            reply_set_error(&r, GRPC_STATUS_INVALID_ARGUMENT,
                            "request_id is longer than %d bytes", UC_REQUEST_ID_MAX - 1);
        } else if (!s->p.sched) {
            reply_set_error(&r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        } else {
            Uncomp__V1__AbortResponse resp;
            uncomp__v1__abort_response__init(&resp);
            resp.found = uc_sched_abort(s->p.sched, ar->request_id, UC_OK);
            UC_LOG_INFO("grpc: Abort req=%s found=%d", ar->request_id, (int)resp.found);
            r.msg = pack_msg(&resp.base);
            r.code = r.msg ? GRPC_STATUS_OK : GRPC_STATUS_RESOURCE_EXHAUSTED;
            snprintf(r.detail, sizeof r.detail, "%s", r.msg ? "" : "out of memory");
        }
        break;
    }
    case M_SERVER_INFO:
        do_server_info(&r, &src);
        break;
    case M_MODEL_INFO:
        do_model_info(&r, &src);
        break;
    case M_STATS:
        do_stats(&r, &src, (const Uncomp__V1__GetStatsRequest *)req);
        break;
    case M_PROFILE:
        do_profile(&r, &src);
        break;
    case M_SET_POLICY:
        do_set_policy(&r, &src, (const Uncomp__V1__SetCompressionPolicyRequest *)req);
        break;
    case M_CALIBRATE:
    case M_DRAIN:
        if (c->m == M_CALIBRATE && (!s->p.sched || !s->p.engine)) {
            reply_set_error(&r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        } else if (!spawn_worker(s, c)) {
            reply_set_error(&r, GRPC_STATUS_RESOURCE_EXHAUSTED,
                            "cannot start a worker thread");
        } else {
            replied = true;
        }
        break;
    case M_HEALTH_CHECK: {
        const Grpc__Health__V1__HealthCheckRequest *hr =
            (const Grpc__Health__V1__HealthCheckRequest *)req;
        if (!health_service_known(hr->service)) {
            reply_set_error(&r, GRPC_STATUS_NOT_FOUND, "unknown service %.128s",
                            hr->service);
        } else {
            r.msg = pack_health(health_status(s));
            r.code = r.msg ? GRPC_STATUS_OK : GRPC_STATUS_RESOURCE_EXHAUSTED;
            snprintf(r.detail, sizeof r.detail, "%s", r.msg ? "" : "out of memory");
        }
        break;
    }
    case M_HEALTH_WATCH: {
        const Grpc__Health__V1__HealthCheckRequest *hr =
            (const Grpc__Health__V1__HealthCheckRequest *)req;
        pthread_mutex_lock(&c->mu);
        c->watch_unknown = !health_service_known(hr->service);
        c->watch_last = -1;
        c->watch_ready = true;
        watch_pump(c);
        pthread_mutex_unlock(&c->mu);
        replied = true;
        break;
    }
    case M_COUNT:
        break;
    }
    if (!replied) {
        reply(c, &r);
    }
    arena_fini(&a);
}

/* ---- completion queue ------------------------------------------------------------------------ */

static void call_free(struct call *c)
{
    struct uc_server *s = c->srv;
    pthread_mutex_lock(&s->mu);
    if (c->live_prev || c->live_next || s->live == c) {
        if (c->live_prev) {
            c->live_prev->live_next = c->live_next;
        } else {
            s->live = c->live_next;
        }
        if (c->live_next) {
            c->live_next->live_prev = c->live_prev;
        }
        s->n_live--;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    gen_drop_queue(c);
    if (c->send_buf) {
        grpc_byte_buffer_destroy(c->send_buf);
    }
    if (c->has_details) {
        grpc_slice_unref(c->status_details);
    }
    if (c->payload) {
        grpc_byte_buffer_destroy(c->payload);
    }
    grpc_metadata_array_destroy(&c->md);
    if (c->m == M_GENERIC) {
        grpc_call_details_destroy(&c->details);
    }
    if (c->call) {
        grpc_call_unref(c->call);
    }
    pthread_mutex_destroy(&c->mu);
    uc_free(c);
}

/* Asks gRPC for the next call of method m. */
static void arm(struct uc_server *s, enum method m)
{
    struct call *c = uc_calloc(1, sizeof *c);
    if (!c) {
        UC_LOG_ERROR("grpc: out of memory: %s stops accepting calls",
                     m < M_COUNT ? methods[m].path : "unregistered methods");
        return;
    }
    c->srv = s;
    c->m = m;
    c->watch_last = -1;
    c->t_new = (struct tag){c, TAG_NEW};
    c->t_close = (struct tag){c, TAG_CLOSE};
    c->t_send = (struct tag){c, TAG_SEND};
    pthread_mutex_init(&c->mu, NULL);
    grpc_metadata_array_init(&c->md);
    grpc_call_error e;
    if (m == M_GENERIC) {
        grpc_call_details_init(&c->details);
        e = grpc_server_request_call(s->server, &c->call, &c->details, &c->md, s->cq, s->cq,
                                     &c->t_new);
    } else {
        e = grpc_server_request_registered_call(s->server, s->reg[m], &c->call, &c->deadline,
                                                &c->md, &c->payload, s->cq, s->cq, &c->t_new);
    }
    if (e != GRPC_CALL_OK) {
        UC_LOG_ERROR("grpc: request_call failed error=%d", (int)e);
        call_free(c);
    }
}

static void on_new(struct call *c, bool ok)
{
    struct uc_server *s = c->srv;
    if (!ok) {
        call_free(c); /* the server is shutting down */
        return;
    }
    if (c->m == M_GENERIC) {
        c->deadline = c->details.deadline;
    }
    /* one reference for the dispatch, one for the close batch, taken before the call is
     * visible on the live list */
    atomic_store(&c->refs, 2);
    pthread_mutex_lock(&s->mu);
    bool stopping = s->stopping;
    c->live_next = s->live;
    if (s->live) {
        s->live->live_prev = c;
    }
    s->live = c;
    s->n_live++;
    pthread_mutex_unlock(&s->mu);
    if (!stopping) {
        arm(s, c->m);
    }
    /* the close batch reports cancellation; it completes when the call is over */
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL) != GRPC_CALL_OK) {
        UC_LOG_ERROR("grpc: cannot start the close batch method=%s",
                     method_path(c));
        atomic_fetch_sub(&c->refs, 1);
        pthread_mutex_lock(&c->mu);
        c->cancelled = true;
        pthread_mutex_unlock(&c->mu);
    }
    if (stopping) {
        reply_error(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
    } else {
        dispatch(c);
    }
    call_unref(c);
}

static void on_close(struct call *c)
{
    pthread_mutex_lock(&c->mu);
    bool cancelled = c->close_cancelled != 0;
    bool abort_it = false;
    char id[UC_REQUEST_ID_MAX];
    int64_t dl = c->deadline_ms;
    bool calib = false;
    if (cancelled) {
        c->cancelled = true;
        abort_it = is_gen(c->m) && c->submitted && !c->sched_done;
        calib = c->m == M_CALIBRATE;
        snprintf(id, sizeof id, "%s", c->request_id);
        gen_drop_queue(c);
    }
    pthread_mutex_unlock(&c->mu);
    if (abort_it) {
        uc_status why = dl > 0 && uc_time_ms() >= dl - 50 ? UC_ERR_TIMEOUT : UC_ERR_CANCELLED;
        UC_LOG_INFO("grpc: client %s req=%s", why == UC_ERR_TIMEOUT ? "deadline" : "cancel", id);
        uc_sched_abort(c->srv->p.sched, id, why);
    }
    if (calib && c->srv->p.sched) {
        UC_LOG_INFO("grpc: Calibrate client went away: the calibration ends");
        atomic_store(&c->calib_cancel, true);
        uc_sched_calibrate_wake(c->srv->p.sched);
    }
    call_unref(c);
}

static void on_send(struct call *c, bool ok)
{
    pthread_mutex_lock(&c->mu);
    c->sending = false;
    if (c->send_buf) {
        grpc_byte_buffer_destroy(c->send_buf);
        c->send_buf = NULL;
    }
    if (c->has_details) {
        grpc_slice_unref(c->status_details);
        c->has_details = false;
    }
    if (!ok) {
        c->send_failed = true;
    }
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    call_unref(c);
}

static void pump_locked(struct call *c)
{
    if (is_gen(c->m)) {
        gen_pump(c);
    } else if (c->m == M_HEALTH_WATCH) {
        watch_pump(c);
    }
}

static void *cq_main(void *arg)
{
    struct uc_server *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME),
                                                   NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            break;
        }
        if (ev.type != GRPC_OP_COMPLETE) {
            continue;
        }
        struct tag *t = ev.tag;
        switch (t->kind) {
        case TAG_SHUTDOWN:
            pthread_mutex_lock(&s->mu);
            s->shutdown_done = true;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
            break;
        case TAG_NEW:
            on_new(t->c, ev.success != 0);
            break;
        case TAG_CLOSE:
            on_close(t->c);
            break;
        case TAG_SEND:
            on_send(t->c, ev.success != 0);
            break;
        }
    }
    return NULL;
}

/* ---- metrics endpoint ------------------------------------------------------------------------ */

static void render_metrics(void *user, struct uc_buf *b)
{
    struct uc_server *s = user;
    if (s->p.sched && s->p.metrics) {
        /* refresh the gauges so an idle server reports current values */
        struct uc_sched_counts sc;
        uc_sched_counts(s->p.sched, &sc);
        metrics_set_gauges(s->p.metrics, sc.running, sc.queued,
                           sc.kv_blocks_total > 0
                               ? (double)sc.kv_blocks_used / (double)sc.kv_blocks_total
                               : 0.0);
    }
    metrics_prometheus(s->p.metrics, b);
    uc_buf_puts(b, "# HELP uncomp:health_serving 1 when the health service reports SERVING.\n"
                   "# TYPE uncomp:health_serving gauge\n");
    metrics_prometheus_sample(s->p.metrics, b, "uncomp:health_serving", NULL, NULL);
    uc_buf_printf(b, "%d\n", s->state == UC_SERVER_SERVING ? 1 : 0);
    uc_buf_puts(b, "# HELP uncomp:uptime_seconds Seconds since the server started.\n"
                   "# TYPE uncomp:uptime_seconds gauge\n");
    metrics_prometheus_sample(s->p.metrics, b, "uncomp:uptime_seconds", NULL, NULL);
    uc_buf_printf(b, "%.3f\n", (double)(uc_time_ms() - s->start_ms) / 1e3);
    uc_buf_puts(b, "# HELP uncomp:grpc_responses_total gRPC calls answered, by status code.\n"
                   "# TYPE uncomp:grpc_responses_total counter\n");
    for (int i = 0; i < UC_ADMIN_N_CODES; i++) {
        metrics_prometheus_sample(s->p.metrics, b, "uncomp:grpc_responses_total", "code",
                                  uc_admin_code_name(i));
        uc_buf_printf(b, "%llu\n",
                      (unsigned long long)__atomic_load_n(&s->codes[i], __ATOMIC_RELAXED));
    }
}

/* Host part of HOST:PORT ("[::1]:80" -> "::1"); empty when there is none. */
static void listen_host(char *out, size_t cap, const char *listen)
{
    out[0] = '\0';
    const char *colon = strrchr(listen, ':');
    if (!colon) {
        return;
    }
    const char *h = listen;
    size_t n = (size_t)(colon - listen);
    if (n >= 2 && h[0] == '[' && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n >= cap) {
        n = cap - 1;
    }
    memcpy(out, h, n);
    out[n] = '\0';
}

/* ---- lifecycle ------------------------------------------------------------------------------- */

/* Waits on s->cv (s->mu held) until pred holds or uc_time_ms() reaches deadline_ms. */
static bool wait_until(struct uc_server *s, bool (*pred)(struct uc_server *), int64_t deadline_ms)
{
    while (!pred(s)) {
        int64_t left = deadline_ms - uc_time_ms();
        if (left <= 0) {
            return false;
        }
        if (left > 50) {
            left = 50;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (long)left * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    return true;
}

static bool pred_shutdown(struct uc_server *s) { return s->shutdown_done; }
static bool pred_quiet(struct uc_server *s) { return s->n_live == 0 && s->n_workers == 0; }

/* Shuts gRPC down and frees the server; returns false (leaking, rather than hanging or freeing
 * memory still in use) when calls or workers did not finish in time. */
static bool teardown(struct uc_server *s, bool started)
{
    bool clean = true;
    if (s->server) {
        if (started) {
            grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
            pthread_mutex_lock(&s->mu);
            bool done = wait_until(s, pred_shutdown, uc_time_ms() + SHUTDOWN_GRACE_MS);
            pthread_mutex_unlock(&s->mu);
            if (!done) {
                UC_LOG_WARN("grpc: calls still open after %d ms; cancelling them",
                            SHUTDOWN_GRACE_MS);
                grpc_server_cancel_all_calls(s->server);
            }
            pthread_mutex_lock(&s->mu);
            clean = wait_until(s, pred_shutdown, uc_time_ms() + SHUTDOWN_WAIT_MS) &&
                    wait_until(s, pred_quiet, uc_time_ms() + SHUTDOWN_WAIT_MS);
            pthread_mutex_unlock(&s->mu);
        }
    }
    if (!clean) {
        UC_LOG_ERROR("grpc: %lld calls and %d workers still alive at shutdown; leaking the "
                     "server instead of waiting", (long long)s->n_live, s->n_workers);
        metrics_http_destroy(s->http);
        s->http = NULL;
        return false;
    }
    if (s->pump_started) {
        pthread_mutex_lock(&s->mu);
        s->pump_quit = true;
        pthread_cond_broadcast(&s->kick_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->pump_thread, NULL);
    }
    if (s->cq) {
        grpc_completion_queue_shutdown(s->cq);
        for (int i = 0; i < s->n_cq_threads; i++) {
            pthread_join(s->cq_threads[i], NULL);
        }
        if (s->n_cq_threads == 0) {
            /* never started: drain here */
            for (;;) {
                grpc_event ev = grpc_completion_queue_next(
                    s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
                if (ev.type == GRPC_QUEUE_SHUTDOWN) {
                    break;
                }
            }
        }
    }
    if (s->server) {
        grpc_server_destroy(s->server);
    }
    if (s->cq) {
        grpc_completion_queue_destroy(s->cq);
    }
    metrics_http_destroy(s->http);
    grpc_shutdown();
    pthread_cond_destroy(&s->kick_cv);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    uc_free(s->listen);
    uc_free(s->tls_cert);
    uc_free(s->tls_key);
    uc_free(s);
    return true;
}

static grpc_server_credentials *make_creds(struct uc_server *s, uc_status *rc)
{
    *rc = UC_OK;
    if (!s->tls_cert && !s->tls_key) {
        return grpc_insecure_server_credentials_create();
    }
    if (!s->tls_cert || !s->tls_key) {
        *rc = UC_ERRF(UC_ERR_INVALID_ARG, "TLS needs both --tls-cert and --tls-key");
        return NULL;
    }
    char *cert = NULL, *key = NULL;
    *rc = uc_file_read_all(&cert, NULL, s->tls_cert);
    if (*rc == UC_OK) {
        *rc = uc_file_read_all(&key, NULL, s->tls_key);
    }
    grpc_server_credentials *cr = NULL;
    if (*rc == UC_OK) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        cr = grpc_ssl_server_credentials_create(NULL, &pair, 1, 0, NULL);
        if (!cr) {
            *rc = UC_ERRF(UC_ERR_INVALID_ARG, "TLS credentials from cert=%s key=%s are invalid",
                          s->tls_cert, s->tls_key);
        }
    } else {
        *rc = UC_ERRF(UC_ERR_IO, "cannot read the TLS certificate %s or key %s", s->tls_cert,
                      s->tls_key);
    }
    uc_free(cert);
    uc_free(key);
    return cr;
}

uc_status uc_server_create(struct uc_server **out, const struct uc_server_params *p)
{
    *out = NULL;
    if (!p->listen || !p->listen[0]) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "server: listen address is empty");
    }
    uc_status rc = UC_OK;
    struct uc_server *s = uc_calloc(1, sizeof *s);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "server");
    }
    s->p = *p;
    s->listen = uc_strdup(p->listen);
    s->tls_cert = p->tls_cert && p->tls_cert[0] ? uc_strdup(p->tls_cert) : NULL;
    s->tls_key = p->tls_key && p->tls_key[0] ? uc_strdup(p->tls_key) : NULL;
    s->start_ms = uc_time_ms();
    s->state = UC_SERVER_LOADING;
    s->t_shutdown = (struct tag){NULL, TAG_SHUTDOWN};
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->kick_cv, NULL);
    pthread_cond_init(&s->cv, NULL);
    grpc_init();
    if (!s->listen) {
        rc = UC_ERRF(UC_ERR_NOMEM, "server");
        goto out_teardown;
    }

    /* metrics first: a busy port fails before gRPC binds anything */
    if (p->metrics_port > 0) {
        char host[256];
        listen_host(host, sizeof host, p->listen);
        rc = metrics_http_create(&s->http, host, p->metrics_port, render_metrics, s);
        if (rc != UC_OK) {
            goto out_teardown;
        }
    }

    grpc_arg args[3];
    int n_args = 0;
    args[n_args].type = GRPC_ARG_INTEGER;
    args[n_args].key = (char *)(uintptr_t)GRPC_ARG_ALLOW_REUSEPORT;
    args[n_args].value.integer = 0;
    n_args++;
    if (p->max_message_bytes > 0) {
        int v = p->max_message_bytes > INT32_MAX ? INT32_MAX : (int)p->max_message_bytes;
        args[n_args].type = GRPC_ARG_INTEGER;
        args[n_args].key = (char *)(uintptr_t)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
        args[n_args].value.integer = v;
        n_args++;
        args[n_args].type = GRPC_ARG_INTEGER;
        args[n_args].key = (char *)(uintptr_t)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
        args[n_args].value.integer = v;
        n_args++;
    }
    grpc_channel_args ch = {.num_args = (size_t)n_args, .args = args};
    s->server = grpc_server_create(&ch, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    if (!s->server || !s->cq) {
        rc = UC_ERRF(UC_ERR_INTERNAL, "grpc: cannot create the server");
        goto out_teardown;
    }
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    for (int m = 0; m < M_COUNT; m++) {
        s->reg[m] = grpc_server_register_method(s->server, methods[m].path, NULL,
                                                GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        if (!s->reg[m]) {
            rc = UC_ERRF(UC_ERR_INTERNAL, "grpc: cannot register %s", methods[m].path);
            goto out_teardown;
        }
    }
    grpc_server_credentials *creds = make_creds(s, &rc);
    if (!creds) {
        goto out_teardown;
    }
    int port = grpc_server_add_http2_port(s->server, s->listen, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        rc = UC_ERRF(UC_ERR_IO, "grpc: cannot listen on %s (address in use or invalid)",
                     s->listen);
        goto out_teardown;
    }
    grpc_server_start(s->server);
    for (int i = 0; i < N_CQ_THREADS; i++) {
        if (pthread_create(&s->cq_threads[i], NULL, cq_main, s) != 0) {
            break;
        }
        s->n_cq_threads++;
    }
    if (pthread_create(&s->pump_thread, NULL, pump_main, s) == 0) {
        s->pump_started = true;
    }
    if (s->n_cq_threads == 0 || !s->pump_started) {
        rc = UC_ERRF(UC_ERR_INTERNAL, "grpc: cannot start the server threads");
        teardown(s, true);
        return rc;
    }
    for (int m = 0; m < M_COUNT; m++) {
        arm(s, (enum method)m);
    }
    arm(s, M_GENERIC);
    UC_LOG_NOTICE("grpc: listening on %s (port %d, %s)", s->listen, port,
                  s->tls_cert ? "TLS" : "insecure");
    if (p->metrics_port > 0) {
        UC_LOG_NOTICE("grpc: Prometheus metrics on port %d, path /metrics", p->metrics_port);
    }
    *out = s;
    return UC_OK;
out_teardown:
    if (s->server) {
        /* not started: shutting down needs the notification, and a started CQ loop */
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
        for (;;) {
            grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME),
                                                       NULL);
            if (ev.type != GRPC_OP_COMPLETE || ev.tag == &s->t_shutdown) {
                break;
            }
        }
    }
    teardown(s, false);
    return rc;
}

void uc_server_set_state(struct uc_server *s, enum uc_server_state st)
{
    if (!s) {
        return;
    }
    int old = s->state;
    if (old == (int)st) {
        return;
    }
    s->state = st;
    UC_LOG_NOTICE("grpc: state %s -> %s", uc_server_state_name((enum uc_server_state)old),
                  uc_server_state_name(st));
    kick_watchers(s);
}

enum uc_server_state uc_server_get_state(struct uc_server *s)
{
    return s ? (enum uc_server_state)s->state : UC_SERVER_STOPPED;
}

void uc_server_drain(struct uc_server *s)
{
    if (!s) {
        return;
    }
    pthread_mutex_lock(&s->mu);
    bool skip = s->stopping || s->drain_started;
    pthread_mutex_unlock(&s->mu);
    if (skip) {
        return;
    }
    if (!spawn_worker(s, NULL)) {
        /* no thread: drain on the caller's thread rather than not at all */
        int32_t f, a;
        bool notify = run_drain(s, s->p.drain_timeout_ms, &f, &a);
        if (notify && s->p.on_drained) {
            s->p.on_drained(s->p.drained_user);
        }
    }
}

void uc_server_destroy(struct uc_server *s)
{
    if (!s) {
        return;
    }
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    pthread_mutex_unlock(&s->mu);
    s->state = UC_SERVER_STOPPED;
    kick_watchers(s);
    /* requests still in the scheduler end now (a stopped scheduler has already ended them) */
    int64_t n;
    struct call **v = live_calls(s, M_GENERATE, &n);
    for (int64_t i = 0; i < n; i++) {
        struct call *c = v[i];
        char id[UC_REQUEST_ID_MAX] = "";
        pthread_mutex_lock(&c->mu);
        if (c->submitted && !c->sched_done && !c->cancelled && !c->abort_sent) {
            snprintf(id, sizeof id, "%s", c->request_id);
            c->abort_sent = true;
        }
        pthread_mutex_unlock(&c->mu);
        if (id[0] && s->p.sched) {
            uc_sched_abort(s->p.sched, id, UC_ERR_UNAVAILABLE);
        }
        call_unref(c);
    }
    uc_free(v);
    teardown(s, true);
}

/* ---- fuzzing entry ------------------------------------------------------------------------ */

int uc_grpc_fuzz_request(int method, const uint8_t *data, size_t size,
                         const struct uc_tokenizer *tok, int64_t vocab, int64_t n_layers)
{
    if (method < 0 || method >= M_COUNT) {
        return -1;
    }
    struct arena a;
    arena_init(&a);
    ProtobufCMessage *m = protobuf_c_message_unpack(methods[method].req, &a.pb, size, data);
    int code = m ? GRPC_STATUS_OK : GRPC_STATUS_INVALID_ARGUMENT;
    if (m && method == M_GENERATE) {
        struct gen_ctx ctx = {.tok = tok, .raw = data, .raw_len = size, .vocab = vocab,
                              .n_layers = n_layers, .defaults = uc_compress_default_params()};
        struct gen_req gr;
        char msg[512];
        uc_status rc = gen_request_parse(&gr, (const Uncomp__V1__GenerateRequest *)(void *)m,
                                         &ctx, msg, sizeof msg);
        if (rc == UC_OK) {
            gen_req_fini(&gr);
        }
        code = (int)status_code_of(rc);
    }
    arena_fini(&a);
    return code;
}
