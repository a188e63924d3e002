/* The OpenAI-compatible front's wire format: the JSON of /v1/completions and
 * /v1/chat/completions decoded into the request model both fronts share (request.h: one
 * validation, one conversion to scheduler requests, the same as gRPC's), and the responses,
 * stream chunks and error objects. No network here: the HTTP server (http_openai.c) is a thin
 * layer over these functions, and the unit tests call them directly. Field names follow the
 * OpenAI API reference; vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos,
 * min_tokens, stop_token_ids) sit at the top level, and an "uncomp" object carries
 * CompressionParams (policy, kv_budget, window, pool_kernel, sink_tokens, head_groups,
 * decode_mode, grouping, stage_starts, r_min). */
#ifndef UC_DAEMON_OPENAI_API_H
#define UC_DAEMON_OPENAI_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "base/status.h"
#include "base/util.h"
#include "request.h"
#include "sched.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_chat_template;

enum uc_oai_kind {
    UC_OAI_COMPLETION = 0,
    UC_OAI_CHAT = 1,
};

/* What parsing needs from the server (borrowed). */
struct uc_oai_ctx {
    struct uc_req_ctx req;   /* tokenizer, chat template (NULL: chat is refused), shape, defaults */
    const char *model_name;  /* the served name (/v1/models) */
};

/* A parsed request: the HTTP-only fields around the shared request model. */
struct uc_oai_request {
    enum uc_oai_kind kind;
    bool stream;
    bool include_usage;      /* stream_options.include_usage */
    char model[128];
    struct uc_req gen;       /* prompts or messages, sampling, stops, n, logprobs, echo,
                                compression; validated by uc_oai_parse (gen.tokens, gen.base) */
};

/* Decodes a request body (len bytes, JSON) into out without validating its values: for tests
 * that compare it with gRPC's decoding. Errors as uc_oai_parse. */
uc_status uc_oai_decode(struct uc_oai_request *out, enum uc_oai_kind kind, const char *body,
                        size_t len, const struct uc_oai_ctx *ctx, int *status_out, char *msg,
                        size_t msg_size, char *param, size_t param_size);
/* Decodes and validates a request body (uc_req_validate: the prompts tokenized or the messages
 * rendered). On failure returns UC_ERR_INVALID_ARG (HTTP 400; *status_out 404 when the model is
 * unknown) or another status (uc_oai_http_status), the message in msg and the offending field in
 * param (both NUL-terminated); out is then empty (nothing to fini, though fini is safe). The
 * scheduler request of choices i .. i + k - 1 (prompt i / n) is uc_req_choice(&out->gen, i, k). */
uc_status uc_oai_parse(struct uc_oai_request *out, enum uc_oai_kind kind, const char *body,
                       size_t len, const struct uc_oai_ctx *ctx, int *status_out, char *msg,
                       size_t msg_size, char *param, size_t param_size);
void uc_oai_request_fini(struct uc_oai_request *r);

/* ---- responses -------------------------------------------------------------------------------- */

/* The OpenAI error object {"error": {"message", "type", "param", "code"}} for an HTTP status. */
char *uc_oai_error_json(int http_status, const char *message, const char *param);
/* HTTP status of a scheduler/parse status: INVALID_ARG 400, KV_FULL 429, UNAVAILABLE 503,
 * TIMEOUT 408, CANCELLED 499, else 500. */
int uc_oai_http_status(uc_status st);

/* One choice's result as it accumulates (whole responses) or streams. */
struct uc_oai_choice {
    int32_t index;
    struct uc_buf text;
    cJSON *logprobs;        /* completions: {tokens, token_logprobs, top_logprobs,
                               text_offset}; chat: {content: [...]}; NULL when not asked */
    size_t text_offset;     /* completions: bytes of text so far (for text_offset) */
    bool done;
    enum uc_finish_reason finish;
    uc_status status;
    char message[256];
    int64_t prompt_tokens, completion_tokens;
    bool has_report;
    struct uc_compress_report report; /* pointers cleared: scalars only */
    struct uc_timing timing;
};

void uc_oai_choice_init(struct uc_oai_choice *c, int32_t index);
void uc_oai_choice_fini(struct uc_oai_choice *c);
/* Appends logprobs of n_ids tokens (lp may be NULL) to a cJSON logprobs object in the shape of
 * the request kind, creating it when needed; the token strings come from the tokenizer. */
void uc_oai_add_logprobs(cJSON **lp, enum uc_oai_kind kind, const struct uc_tokenizer *tok,
                         const int32_t *ids, int32_t n_ids,
                         const struct uc_token_logprob *lp_in, int32_t top_n,
                         size_t *text_offset);

/* The finish_reason string: "stop", "length", "abort" or "error". */
const char *uc_oai_finish_name(enum uc_finish_reason f);

/* The whole response of a request (choices in order, usage summed, compression report of the
 * first choice under "uncomp"). uc_malloc'd JSON text. */
char *uc_oai_response_json(const struct uc_oai_request *r, const char *id, int64_t created,
                           const char *model, struct uc_oai_choice *choices, int32_t n_choices);
/* One stream chunk: a delta of text (and logprobs, taken over) for a choice, or its finish
 * (finish != NONE), or with choice < 0 the usage chunk. With role, a chat chunk carries
 * delta.role. uc_malloc'd "data: {...}\n\n" text. */
char *uc_oai_chunk_sse(const struct uc_oai_request *r, const char *id, int64_t created,
                       const char *model, int32_t choice, bool role, const char *text,
                       size_t text_len, cJSON *logprobs, enum uc_finish_reason finish,
                       const struct uc_oai_choice *usage_from, int32_t n_usage,
                       const struct uc_oai_choice *report_from);
/* GET /v1/models */
char *uc_oai_models_json(const char *model, int64_t created, int64_t max_model_len);

#ifdef __cplusplus
}
#endif
#endif
