/* The protobuf codec of the gRPC API (proto/uncomp/v1/uncomp.proto and grpc.health.v1): every
 * request message decoded from its wire bytes into plain C (Generate and Chat into the common
 * struct uc_req of request.h, which the HTTP front shares) and validated, and every response
 * encoded to wire bytes. No network: grpc_server.c moves the bytes; the unit tests and the
 * fuzzer call this directly. protobuf-c structs never leave grpc_codec.c. Text fields keep their
 * NUL bytes both ways (protobuf-c alone would cut them). Any thread. */
#ifndef UC_DAEMON_GRPC_CODEC_H
#define UC_DAEMON_GRPC_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "request.h"
#include "sched.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_admin_src;
struct uc_tokenizer;

/* The methods the server registers, in a fixed order (the fuzzer's selector byte picks one). */
enum uc_grpc_method {
    UC_GRPC_GENERATE = 0,
    UC_GRPC_TOKENIZE,
    UC_GRPC_DETOKENIZE,
    UC_GRPC_ABORT,
    UC_GRPC_SERVER_INFO,
    UC_GRPC_MODEL_INFO,
    UC_GRPC_STATS,
    UC_GRPC_PROFILE,
    UC_GRPC_SET_POLICY,
    UC_GRPC_CALIBRATE,
    UC_GRPC_DRAIN,
    UC_GRPC_HEALTH_CHECK,
    UC_GRPC_HEALTH_WATCH,
    UC_GRPC_CHAT,
    UC_GRPC_METHOD_COUNT,
};

/* grpc.health.v1 HealthCheckResponse.ServingStatus */
enum uc_grpc_health {
    UC_GRPC_HEALTH_UNKNOWN = 0,
    UC_GRPC_HEALTH_SERVING = 1,
    UC_GRPC_HEALTH_NOT_SERVING = 2,
    UC_GRPC_HEALTH_SERVICE_UNKNOWN = 3,
};

/* "/uncomp.v1.Inference/Generate" */
const char *uc_grpc_method_path(enum uc_grpc_method m);
/* The request message's full name ("uncomp.v1.GenerateRequest"). */
const char *uc_grpc_method_message(enum uc_grpc_method m);
/* Generate and Chat: a stream of GenerateResponse. */
bool uc_grpc_method_streams_generation(enum uc_grpc_method m);
/* The gRPC status code (grpc_status_code) of a uc_status: INVALID_ARG 3, KV_FULL 8,
 * UNAVAILABLE 14, TIMEOUT 4, CANCELLED 1, UNSUPPORTED 9 (FAILED_PRECONDITION), else 13. */
int uc_grpc_status_of(uc_status st);

/* ---- requests ------------------------------------------------------------------------------- */

/* A decoded request message; only the part of its method is used. Owns everything. */
struct uc_grpc_request {
    enum uc_grpc_method method;
    struct uc_req gen;                 /* Generate, Chat */
    struct {
        char *text;                    /* text_len bytes (NUL bytes kept) then a NUL */
        size_t text_len;
        bool add_special_tokens;
        int32_t *ids;                  /* set by validation: the tokens */
        int64_t n_ids;
    } tokenize;
    struct {
        int64_t *token_ids;            /* (n) as sent */
        size_t n;
        bool skip_special_tokens;
        int32_t *ids;                  /* set by validation */
    } detokenize;
    char *request_id;                  /* Abort */
    char *section;                     /* GetStats ("" = all) */
    struct {
        struct uc_req_compress c;      /* policy, kv_budget, decode_mode, grouping */
        struct uc_compress_params params; /* set by validation: the new default */
    } set_policy;
    struct {
        char *text;                    /* "" = the built-in default text */
        int64_t window_tokens, max_windows;
    } calibrate;
    int64_t drain_timeout_ms;          /* 0 = the server's */
    struct {
        char *service;
        bool known;                    /* set by validation */
    } health;
};

/* Decodes the wire bytes data[0..len) of method m's request message into out (which needs no
 * init; fini it whatever the result). A message that does not parse is UC_ERR_INVALID_ARG
 * ("the request is not a valid uncomp.v1.TokenizeRequest message"); UC_ERR_NOMEM; a method out
 * of range is UC_ERR_INVALID_ARG with field NONE. */
uc_status uc_grpc_request_decode(struct uc_grpc_request *out, enum uc_grpc_method m,
                                 const uint8_t *data, size_t len, struct uc_req_error *err);
/* Validates a decoded request as its handler needs it: Generate and Chat by uc_req_validate
 * (ctx->defaults is the server's default compression), Tokenize by tokenizing (ids), Detokenize
 * by the tokenizer's vocabulary (ids), Abort's request id, GetStats's section,
 * SetCompressionPolicy onto ctx->defaults (params), Calibrate's sizes, Health's service name
 * (known; an unknown one is not an error here). ctx->tok may be NULL only for methods that do
 * not need it (else UC_ERR_UNAVAILABLE). */
uc_status uc_grpc_request_validate(struct uc_grpc_request *r, const struct uc_req_ctx *ctx,
                                   struct uc_req_error *err);
void uc_grpc_request_fini(struct uc_grpc_request *r);

/* Decode and validate in one call, for tests and the fuzzer: the gRPC status code the call
 * would get from them (0 = OK), or -1 for no such method. */
int uc_grpc_request_check(int method, const uint8_t *data, size_t len,
                          const struct uc_req_ctx *ctx);

/* ---- responses ------------------------------------------------------------------------------ */

/* Encoded wire bytes (uc_malloc'd; the receiver frees data with uc_free). */
struct uc_grpc_msg {
    uint8_t *data;
    size_t len;
};

/* A scheduler event, deep-copied out of the engine thread's buffers (grpc_server.c queues them
 * per call). */
struct uc_grpc_logprob {
    int32_t token_id;
    float logprob;
    int32_t n_top;
    int32_t *top_ids;                  /* (n_top) */
    float *top_lps;                    /* (n_top) */
};

struct uc_grpc_event {
    struct uc_grpc_event *next;
    double t_emit;                     /* uc_time_s() when the scheduler's sink queued it */
    enum uc_event_kind kind;
    int32_t index;                     /* the choice */
    /* TOKENS */
    int32_t *ids;                      /* (n_ids) */
    int32_t n_ids;
    char *text;                        /* (text_len + 1), NUL-terminated */
    size_t text_len;
    struct uc_grpc_logprob *lps;       /* (n_ids) or NULL */
    /* DONE */
    uc_status status;
    char *message;
    enum uc_finish_reason finish;
    char *matched_stop;                /* (matched_stop_len + 1), NUL-terminated */
    size_t matched_stop_len;
    int64_t prompt_tokens, completion_tokens;
    struct uc_timing timing;
    struct uc_compress_params compress;
    bool has_report;
    struct uc_compress_report report;  /* entropy arrays owned by the event */
};

/* A copy of ev, or NULL when out of memory. */
struct uc_grpc_event *uc_grpc_event_copy(const struct uc_gen_event *ev);
void uc_grpc_event_free(struct uc_grpc_event *e);

/* A GenerateResponse with one Chunk: the tokens, text and logprobs of the TOKENS events
 * first .. end (exclusive) of one choice, index. */
uc_status uc_grpc_encode_chunk(struct uc_grpc_msg *out, const char *request_id,
                               const struct uc_grpc_event *first, const struct uc_grpc_event *end,
                               int32_t index);
/* A GenerateResponse with the Complete of a DONE event. */
uc_status uc_grpc_encode_complete(struct uc_grpc_msg *out, const char *request_id,
                                  const struct uc_grpc_event *done);
uc_status uc_grpc_encode_tokenize(struct uc_grpc_msg *out, const struct uc_tokenizer *tok,
                                  const int32_t *ids, int64_t n);
/* DetokenizeResponse with text[0..len) (NUL bytes kept). */
uc_status uc_grpc_encode_detokenize(struct uc_grpc_msg *out, const char *text, size_t len);
uc_status uc_grpc_encode_abort(struct uc_grpc_msg *out, bool found);
uc_status uc_grpc_encode_server_info(struct uc_grpc_msg *out, const struct uc_admin_src *src);
/* ModelInfo; UC_ERR_UNAVAILABLE without an engine. */
uc_status uc_grpc_encode_model_info(struct uc_grpc_msg *out, const struct uc_admin_src *src);
/* Stats with the INFO text of `section` (already validated). */
uc_status uc_grpc_encode_stats(struct uc_grpc_msg *out, const struct uc_admin_src *src,
                               const char *section);
/* The active CompressionProfile (present false when none), parsed from the scheduler's JSON;
 * UC_ERR_UNAVAILABLE without a model, UC_ERR_FORMAT when the profile does not parse (msg). */
uc_status uc_grpc_encode_profile(struct uc_grpc_msg *out, const struct uc_admin_src *src,
                                 char *msg, size_t msg_size);
uc_status uc_grpc_encode_set_policy(struct uc_grpc_msg *out, const struct uc_compress_params *cp);
uc_status uc_grpc_encode_drain(struct uc_grpc_msg *out, int32_t finished, int32_t aborted);
uc_status uc_grpc_encode_health(struct uc_grpc_msg *out, enum uc_grpc_health status);

#ifdef __cplusplus
}
#endif
#endif
