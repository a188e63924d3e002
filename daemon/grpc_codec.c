/* protobuf-c side of the gRPC services: a per-request arena (also the ProtobufCAllocator of
 * unpacked requests), validation of GenerateRequest into a uc_request with messages that name
 * the offending field, deep copies of scheduler events for the streaming queues, and the
 * builders of every response message. No gRPC call state lives here (see grpc_server.c). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "compress/profile.h"
#include "grpc_impl.h"
#include "model_config.h"
#include "tokenizer.h"

/* ---- arena ---------------------------------------------------------------------------- */

struct uc_grpc_arena_blk {
    struct uc_grpc_arena_blk *next;
    size_t pad; /* keeps the payload 16-byte aligned */
};

static void *arena_pb_alloc(void *data, size_t size) { return uc_grpc_arena_alloc(data, size); }
static void arena_pb_free(void *data, void *p) {}

void uc_grpc_arena_init(struct uc_grpc_arena *a)
{
    a->head = NULL;
    a->oom = false;
    a->pb.alloc = arena_pb_alloc;
    a->pb.free = arena_pb_free;
    a->pb.allocator_data = a;
}

void *uc_grpc_arena_alloc(struct uc_grpc_arena *a, size_t size_bytes)
{
    if (size_bytes > SIZE_MAX - sizeof(struct uc_grpc_arena_blk) - 16) {
        a->oom = true;
        return NULL;
    }
    struct uc_grpc_arena_blk *b = uc_calloc(1, sizeof *b + size_bytes + 1);
    if (!b) {
        a->oom = true;
        return NULL;
    }
    b->next = a->head;
    a->head = b;
    return b + 1;
}

char *uc_grpc_arena_strdup(struct uc_grpc_arena *a, const char *s)
{
    size_t n = strlen(s);
    char *d = uc_grpc_arena_alloc(a, n + 1);
    if (d) {
        memcpy(d, s, n + 1);
    }
    return d;
}

void uc_grpc_arena_fini(struct uc_grpc_arena *a)
{
    struct uc_grpc_arena_blk *b = a->head;
    while (b) {
        struct uc_grpc_arena_blk *n = b->next;
        uc_free(b);
        b = n;
    }
    a->head = NULL;
}

/* ---- byte buffers ----------------------------------------------------------------------- */

ProtobufCMessage *uc_grpc_unpack(struct uc_grpc_arena *a, const ProtobufCMessageDescriptor *d,
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
    grpc_slice_unref(s);
    return m;
}

grpc_byte_buffer *uc_grpc_pack(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

grpc_status_code uc_grpc_code(uc_status st)
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
        return GRPC_STATUS_UNIMPLEMENTED;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

void uc_grpc_reply_error(struct uc_grpc_reply *r, grpc_status_code code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->detail, sizeof r->detail, fmt, ap);
    va_end(ap);
    r->code = code;
    r->msg = NULL;
}

/* A packed reply, or INTERNAL when packing ran out of memory. */
static void reply_msg(struct uc_grpc_reply *r, const ProtobufCMessage *m, bool oom)
{
    r->msg = oom ? NULL : uc_grpc_pack(m);
    if (!r->msg) {
        uc_grpc_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    r->code = GRPC_STATUS_OK;
    r->detail[0] = '\0';
}

/* ---- GenerateRequest validation --------------------------------------------------------- */

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

static uc_status sampling_from(struct uc_grpc_gen_req *out, const Uncomp__V1__SamplingParams *s,
                               const struct uc_grpc_gen_ctx *ctx, char *msg, size_t msg_size)
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
        if (!out->stop) {
            snprintf(msg, msg_size, "out of memory");
            rc = UC_ERR_NOMEM;
            goto out_fail;
        }
        for (size_t i = 0; i < s->n_stop; i++) {
            size_t len = strlen(s->stop[i]);
            if (len == 0) {
                BAD("sampling.stop[%zu] is empty", i);
            }
            if (len > MAX_STOP_BYTES) {
                BAD("sampling.stop[%zu] is %zu bytes; at most %d", i, len, MAX_STOP_BYTES);
            }
            out->stop[i] = s->stop[i];
        }
        r->stop = out->stop;
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
                               const struct uc_grpc_gen_ctx *ctx, char *msg, size_t msg_size)
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

uc_status uc_grpc_gen_request(struct uc_grpc_gen_req *out, const Uncomp__V1__GenerateRequest *in,
                              const struct uc_grpc_gen_ctx *ctx, char *msg, size_t msg_size)
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
        size_t len = in->text ? strlen(in->text) : 0;
        if (len == 0) {
            BAD("text is empty: the prompt needs at least one token");
        }
        bool add_special = in->has_add_special_tokens ? in->add_special_tokens : true;
        int64_t n = 0;
        uc_status trc = uc_tokenizer_encode(ctx->tok, in->text, len, add_special, &out->prompt, &n);
        if (trc == UC_ERR_INVALID_ARG) {
            BAD("text is not valid UTF-8");
        } else if (trc != UC_OK) {
            snprintf(msg, msg_size, "tokenizer failed: %s", uc_status_str(trc));
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
    uc_grpc_gen_req_fini(out);
    return rc;
}

#undef BAD

void uc_grpc_gen_req_fini(struct uc_grpc_gen_req *r)
{
    UC_FREE(r->prompt);
    UC_FREE(r->stop_ids);
    UC_FREE(r->stop);
    r->req.prompt = NULL;
    r->req.stop = NULL;
    r->req.stop_ids = NULL;
}

/* ---- stream events ---------------------------------------------------------------------- */

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

void uc_grpc_item_free(struct uc_grpc_item *it)
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

struct uc_grpc_item *uc_grpc_item_from_event(const struct uc_gen_event *ev)
{
    struct uc_grpc_item *it = uc_calloc(1, sizeof *it);
    if (!it) {
        return NULL;
    }
    it->kind = ev->kind;
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
                struct uc_grpc_lp *d = &it->lps[i];
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
    it->matched_stop = dup_str(ev->matched_stop ? ev->matched_stop : "",
                               ev->matched_stop ? strlen(ev->matched_stop) : 0);
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
    uc_grpc_item_free(it);
    return NULL;
}

grpc_byte_buffer *uc_grpc_pack_chunk(const char *request_id, const struct uc_grpc_item *first,
                                     const struct uc_grpc_item *end)
{
    size_t n_ids = 0, n_text = 0;
    bool any_lp = false;
    for (const struct uc_grpc_item *it = first; it != end; it = it->next) {
        n_ids += (size_t)it->n_ids;
        n_text += it->text_len;
        any_lp = any_lp || it->lps;
    }
    struct uc_grpc_arena a;
    uc_grpc_arena_init(&a);
    uint32_t *ids = uc_grpc_arena_alloc(&a, n_ids * sizeof *ids);
    char *text = uc_grpc_arena_alloc(&a, n_text + 1);
    Uncomp__V1__TokenLogprob **lps = NULL;
    if (any_lp) {
        lps = uc_grpc_arena_alloc(&a, n_ids * sizeof *lps);
    }
    grpc_byte_buffer *bb = NULL;
    if (a.oom) {
        goto out;
    }
    size_t k = 0, t = 0;
    for (const struct uc_grpc_item *it = first; it != end; it = it->next) {
        for (int32_t i = 0; i < it->n_ids; i++) {
            if (lps) {
                Uncomp__V1__TokenLogprob *lp = uc_grpc_arena_alloc(&a, sizeof *lp);
                if (!lp) {
                    goto out;
                }
                uncomp__v1__token_logprob__init(lp);
                lp->token_id = (uint32_t)it->ids[i];
                if (it->lps) {
                    const struct uc_grpc_lp *s = &it->lps[i];
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
    chunk.text = text;
    chunk.n_logprobs = lps ? n_ids : 0;
    chunk.logprobs = lps;
    Uncomp__V1__GenerateResponse resp;
    uncomp__v1__generate_response__init(&resp);
    resp.request_id = (char *)(uintptr_t)request_id;
    resp.kind_case = UNCOMP__V1__GENERATE_RESPONSE__KIND_CHUNK;
    resp.chunk = &chunk;
    bb = uc_grpc_pack(&resp.base);
out:
    uc_grpc_arena_fini(&a);
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

grpc_byte_buffer *uc_grpc_pack_complete(const char *request_id, const struct uc_grpc_item *d)
{
    struct uc_grpc_arena a;
    uc_grpc_arena_init(&a);
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
            rep.stage_rows = uc_grpc_arena_alloc(&a, (size_t)ns * sizeof *rep.stage_rows);
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
            rep.stage_starts = uc_grpc_arena_alloc(&a, (size_t)nb * sizeof *rep.stage_starts);
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
            rep.groups = uc_grpc_arena_alloc(&a, (size_t)ng * sizeof *rep.groups);
            if (!rep.groups) {
                goto out;
            }
            for (int32_t g = 0; g < ng; g++) {
                Uncomp__V1__GroupReport *gr = uc_grpc_arena_alloc(&a, sizeof *gr);
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
            rep.entropy = uc_grpc_arena_alloc(&a, (size_t)r->n_layers * sizeof *rep.entropy);
            if (!rep.entropy) {
                goto out;
            }
            size_t k = 0;
            for (int64_t l = 0; l < r->n_layers; l++) {
                if (isnan(r->entropy_mean[l])) {
                    continue;
                }
                Uncomp__V1__LayerEntropy *le = uc_grpc_arena_alloc(&a, sizeof *le);
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
    comp.matched_stop = d->matched_stop ? d->matched_stop : (char *)(uintptr_t)"";
    comp.usage = &usage;
    comp.compression = &rep;
    comp.timing = &timing;
    Uncomp__V1__GenerateResponse resp;
    uncomp__v1__generate_response__init(&resp);
    resp.request_id = (char *)(uintptr_t)request_id;
    resp.kind_case = UNCOMP__V1__GENERATE_RESPONSE__KIND_COMPLETE;
    resp.complete = &comp;
    bb = uc_grpc_pack(&resp.base);
out:
    uc_grpc_arena_fini(&a);
    return bb;
}

/* ---- Tokenize / Detokenize -------------------------------------------------------------- */

void uc_grpc_tokenize(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                      const Uncomp__V1__TokenizeRequest *req)
{
    if (!src->tok) {
        uc_grpc_reply_error(r, GRPC_STATUS_UNAVAILABLE, "the tokenizer is not loaded yet");
        return;
    }
    const char *text = req->text ? req->text : "";
    int32_t *ids = NULL;
    int64_t n = 0;
    uc_status rc = uc_tokenizer_encode(src->tok, text, strlen(text), req->add_special_tokens,
                                       &ids, &n);
    if (rc == UC_ERR_INVALID_ARG) {
        uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT, "text is not valid UTF-8");
        return;
    }
    if (rc != UC_OK) {
        uc_grpc_reply_error(r, uc_grpc_code(rc), "tokenizer failed: %s", uc_status_str(rc));
        return;
    }
    struct uc_grpc_arena a;
    uc_grpc_arena_init(&a);
    Uncomp__V1__TokenizeResponse resp;
    uncomp__v1__tokenize_response__init(&resp);
    resp.token_ids = uc_grpc_arena_alloc(&a, (size_t)n * sizeof *resp.token_ids);
    resp.tokens = uc_grpc_arena_alloc(&a, (size_t)n * sizeof *resp.tokens);
    if (!a.oom) {
        for (int64_t i = 0; i < n; i++) {
            const char *s = uc_tokenizer_token_str(src->tok, ids[i]);
            resp.token_ids[i] = (uint32_t)ids[i];
            resp.tokens[i] = (char *)(uintptr_t)(s ? s : "");
        }
        resp.n_token_ids = resp.n_tokens = (size_t)n;
    }
    reply_msg(r, &resp.base, a.oom);
    uc_grpc_arena_fini(&a);
    uc_free(ids);
}

void uc_grpc_detokenize(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                        const Uncomp__V1__DetokenizeRequest *req)
{
    if (!src->tok) {
        uc_grpc_reply_error(r, GRPC_STATUS_UNAVAILABLE, "the tokenizer is not loaded yet");
        return;
    }
    int64_t vocab = uc_tokenizer_vocab_size(src->tok);
    int32_t *ids = uc_malloc((req->n_token_ids ? req->n_token_ids : 1) * sizeof *ids);
    if (!ids) {
        uc_grpc_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    for (size_t i = 0; i < req->n_token_ids; i++) {
        if ((int64_t)req->token_ids[i] >= vocab) {
            uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT,
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
        uc_grpc_reply_error(r, rc == UC_ERR_INVALID_ARG ? GRPC_STATUS_INVALID_ARGUMENT
                                                        : uc_grpc_code(rc),
                            "token_ids: decode failed: %s", uc_status_str(rc));
        return;
    }
    Uncomp__V1__DetokenizeResponse resp;
    uncomp__v1__detokenize_response__init(&resp);
    resp.text = text;
    reply_msg(r, &resp.base, false);
    uc_free(text);
}

/* ---- Admin ------------------------------------------------------------------------------ */

void uc_grpc_server_info(struct uc_grpc_reply *r, const struct uc_admin_src *src)
{
    struct uc_grpc_arena a;
    uc_grpc_arena_init(&a);
    Uncomp__V1__ServerInfo si;
    uncomp__v1__server_info__init(&si);
    const struct uc_cluster_info *c = src->cluster;
    if (c) {
        si.version = (char *)(uintptr_t)c->version;
        si.build = (char *)(uintptr_t)c->build;
        si.backend = (char *)(uintptr_t)c->backend;
        si.tp_size = (uint32_t)(c->tp_size > 0 ? c->tp_size : 0);
        if (c->ranks && c->tp_size > 0) {
            si.ranks = uc_grpc_arena_alloc(&a, (size_t)c->tp_size * sizeof *si.ranks);
            for (int i = 0; si.ranks && i < c->tp_size; i++) {
                Uncomp__V1__RankInfo *ri = uc_grpc_arena_alloc(&a, sizeof *ri);
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
    uc_grpc_arena_fini(&a);
}

void uc_grpc_model_info(struct uc_grpc_reply *r, const struct uc_admin_src *src)
{
    if (!src->engine) {
        uc_grpc_reply_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    const struct uc_model_config *cfg = uc_engine_config(src->engine);
    Uncomp__V1__ModelInfo mi;
    uncomp__v1__model_info__init(&mi);
    mi.path = (char *)(uintptr_t)(src->cluster ? src->cluster->model_path : "");
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
    int32_t eos[UC_MAX_EOS_IDS];
    for (int i = 0; i < cfg->n_eos && i < UC_MAX_EOS_IDS; i++) {
        eos[i] = cfg->eos_ids[i];
    }
    mi.n_eos_token_ids = (size_t)(cfg->n_eos < UC_MAX_EOS_IDS ? cfg->n_eos : UC_MAX_EOS_IDS);
    if (mi.n_eos_token_ids == 0 && src->tok && uc_tokenizer_eos(src->tok) >= 0) {
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

void uc_grpc_stats(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                   const Uncomp__V1__GetStatsRequest *req)
{
    const char *section = req->section ? req->section : "";
    if (!uc_admin_section_known(section)) {
        uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT,
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
static void profile_reply(struct uc_grpc_reply *r, const struct uc_admin_src *src)
{
    if (!src->sched || !src->engine) {
        uc_grpc_reply_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    const struct uc_model_config *cfg = uc_engine_config(src->engine);
    const char *path = uc_engine_profile_path(src->engine);
    Uncomp__V1__CompressionProfile cp;
    uncomp__v1__compression_profile__init(&cp);
    cp.path = (char *)(uintptr_t)(path ? path : "");
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
        uc_grpc_reply_error(r, GRPC_STATUS_INTERNAL, "the active profile does not parse: %s",
                            uc_status_str(rc));
        uc_free(json);
        return;
    }
    struct uc_grpc_arena a;
    uc_grpc_arena_init(&a);
    cp.present = true;
    cp.json = json;
    cp.source = p.source;
    cp.created_unix_ms = p.created_unix_ms;
    cp.calib_tokens = u64_of(p.calib_tokens);
    cp.head_groups = (uint32_t)(p.head_groups > 0 ? p.head_groups : 0);
    int32_t ns = p.n_stage_starts > UC_MAX_STAGES ? UC_MAX_STAGES : p.n_stage_starts;
    if (ns > 0) {
        cp.stage_starts = uc_grpc_arena_alloc(&a, (size_t)ns * sizeof *cp.stage_starts);
        for (int32_t i = 0; cp.stage_starts && i < ns; i++) {
            cp.stage_starts[i] = (uint32_t)p.stage_starts[i];
        }
        cp.n_stage_starts = cp.stage_starts ? (size_t)ns : 0;
    }
    int64_t L = p.n_layers, H = p.n_heads, Hkv = p.n_heads_kv;
    cp.layers = uc_grpc_arena_alloc(&a, (size_t)L * sizeof *cp.layers);
    for (int64_t l = 0; cp.layers && l < L; l++) {
        Uncomp__V1__LayerProfile *lp = uc_grpc_arena_alloc(&a, sizeof *lp);
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
            lp->kv_head_group = uc_grpc_arena_alloc(&a, (size_t)Hkv * sizeof(uint32_t));
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
    uc_grpc_arena_fini(&a);
    uc_profile_fini(&p);
    uc_free(json);
}

void uc_grpc_profile(struct uc_grpc_reply *r, const struct uc_admin_src *src)
{
    profile_reply(r, src);
}

void uc_grpc_set_policy(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                        const Uncomp__V1__SetCompressionPolicyRequest *req)
{
    if (!src->sched || !src->engine) {
        uc_grpc_reply_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    struct uc_compress_params cp;
    uc_sched_get_default_compress(src->sched, &cp);
    if (req->policy && req->policy[0] && !uc_policy_parse(req->policy, &cp.policy)) {
        char names[160];
        policy_list(names, sizeof names);
        uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                            "policy=\"%.64s\" is unknown; use one of: %s", req->policy, names);
        return;
    }
    if (req->kv_budget) {
        cp.kv_budget = clamp_u32(req->kv_budget);
    }
    if (req->decode_mode && req->decode_mode[0] &&
        !uc_decode_mode_parse(req->decode_mode, &cp.decode_mode)) {
        uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                            "decode_mode=\"%.64s\" must be append or evict", req->decode_mode);
        return;
    }
    if (req->grouping && req->grouping[0] && !uc_grouping_parse(req->grouping, &cp.grouping)) {
        uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT,
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
        uc_grpc_reply_error(r, uc_grpc_code(rc), "%s", msg[0] ? msg : uc_status_str(rc));
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

void uc_grpc_calibrate(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                       const Uncomp__V1__CalibrateRequest *req)
{
    if (!src->sched || !src->engine) {
        uc_grpc_reply_error(r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    if (req->window_tokens > INT32_MAX) {
        uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT, "window_tokens=%u is too large",
                            req->window_tokens);
        return;
    }
    if (req->max_windows > INT32_MAX) {
        uc_grpc_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT, "max_windows=%u is too large",
                            req->max_windows);
        return;
    }
    const char *text = req->text && req->text[0] ? req->text : NULL;
    char msg[256] = "";
    uc_status rc = uc_sched_calibrate(src->sched, text, (int32_t)req->window_tokens,
                                      (int32_t)req->max_windows, msg, sizeof msg);
    if (rc != UC_OK) {
        uc_grpc_reply_error(r, uc_grpc_code(rc), "calibration failed: %s",
                            msg[0] ? msg : uc_status_str(rc));
        return;
    }
    profile_reply(r, src);
}

grpc_byte_buffer *uc_grpc_pack_drain(int32_t finished, int32_t aborted)
{
    Uncomp__V1__DrainResponse d;
    uncomp__v1__drain_response__init(&d);
    d.finished = (uint32_t)(finished > 0 ? finished : 0);
    d.aborted = (uint32_t)(aborted > 0 ? aborted : 0);
    return uc_grpc_pack(&d.base);
}

grpc_byte_buffer *uc_grpc_pack_health(int status)
{
    Grpc__Health__V1__HealthCheckResponse h;
    grpc__health__v1__health_check_response__init(&h);
    h.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    return uc_grpc_pack(&h.base);
}
