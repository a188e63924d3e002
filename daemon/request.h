/* One generation request model for both fronts. gRPC Generate and Chat (grpc_codec.c) and HTTP
 * /v1/completions and /v1/chat/completions (openai_api.c) decode their wire formats into a
 * struct uc_req: types and shapes only (a number, a list, a string; "0 = default" on gRPC and
 * "absent" in JSON both become has_* false). uc_req_validate then checks every value against
 * one set of rules, tokenizes the prompts or renders the chat messages, and builds the
 * scheduler request; uc_req_choice gives the struct uc_request (sched.h) of each choice. Errors
 * name the field as the client's front spells it (gRPC "sampling.top_p", HTTP "top_p"): a
 * request gets the same error through either front, each in its own names. No network and no
 * scheduler here: the unit tests and the fuzzers call it directly. Any thread; a struct uc_req
 * belongs to one thread at a time. */
#ifndef UC_DAEMON_REQUEST_H
#define UC_DAEMON_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "base/status.h"
#include "compress/policy.h"
#include "sched.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_tokenizer;
struct uc_chat_template;

/* Whose names a request's errors use. */
enum uc_req_front {
    UC_REQ_FRONT_GRPC = 0,
    UC_REQ_FRONT_HTTP = 1,
};

enum uc_req_kind {
    UC_REQ_COMPLETION = 0, /* prompts: text or token ids */
    UC_REQ_CHAT = 1,       /* messages rendered by the chat template */
};

/* The fields validation names in its errors. */
enum uc_req_field {
    UC_REQ_F_NONE = 0,
    UC_REQ_F_REQUEST_ID,
    UC_REQ_F_INPUT,        /* the prompt as a whole: missing, too many */
    UC_REQ_F_TEXT,         /* a text prompt */
    UC_REQ_F_TOKEN_IDS,    /* a prompt of token ids */
    UC_REQ_F_MESSAGES,
    UC_REQ_F_N,
    UC_REQ_F_MAX_TOKENS,
    UC_REQ_F_MIN_TOKENS,
    UC_REQ_F_TEMPERATURE,
    UC_REQ_F_TOP_P,
    UC_REQ_F_TOP_K,
    UC_REQ_F_MIN_P,
    UC_REQ_F_REPETITION_PENALTY,
    UC_REQ_F_FREQUENCY_PENALTY,
    UC_REQ_F_PRESENCE_PENALTY,
    UC_REQ_F_LOGPROBS,     /* alternatives per token */
    UC_REQ_F_STOP,
    UC_REQ_F_STOP_TOKEN_IDS,
    UC_REQ_F_COMPRESSION,  /* the compression parameters together */
    UC_REQ_F_POLICY,
    UC_REQ_F_KV_BUDGET,
    UC_REQ_F_WINDOW,
    UC_REQ_F_POOL_KERNEL,
    UC_REQ_F_SINK_TOKENS,
    UC_REQ_F_HEAD_GROUPS,
    UC_REQ_F_DECODE_MODE,
    UC_REQ_F_GROUPING,
    UC_REQ_F_STAGE_STARTS,
    UC_REQ_F_R_MIN,
    UC_REQ_F_THINK_RATIO,
    UC_REQ_F_MINICACHE_T,
    UC_REQ_F_MINICACHE_GAMMA,
    UC_REQ_F_MINICACHE_START,
    UC_REQ_F_LORC_RATIO,
    UC_REQ_F_COUNT,
};

/* Limits every front shares (the scheduler applies the configured, smaller ones). */
#define UC_REQ_MAX_N 16            /* choices per prompt */
#define UC_REQ_MAX_PROMPTS 64      /* prompts per request (HTTP lists) */
#define UC_REQ_MAX_CHOICES 128     /* prompts x n */
#define UC_REQ_MAX_LOGPROBS 20
#define UC_REQ_MAX_STOP 64         /* stop strings, and stop token ids */
#define UC_REQ_MAX_STOP_BYTES 1024
#define UC_REQ_MAX_TOKENS (1 << 30)

/* A failed request: what a front reports. */
struct uc_req_error {
    uc_status status;          /* UC_ERR_INVALID_ARG: a bad field; UC_ERR_UNSUPPORTED: chat
                                  without a template; UC_ERR_UNAVAILABLE: nothing loaded; else
                                  the tokenizer's or template's failure, or UC_ERR_NOMEM */
    enum uc_req_field field;   /* UC_REQ_F_NONE when no field is to blame */
    char param[64];            /* the field in the front's names, no element index ("stop") */
    char message[512];         /* names the field, with its element ("stop[1] is empty") */
};

/* Fills err (message from fmt) and returns st: the one way errors are made, here and in the
 * gRPC codec. */
uc_status uc_req_fail(struct uc_req_error *err, uc_status st, enum uc_req_field field,
                      const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* What validation needs from the server (borrowed). */
struct uc_req_ctx {
    const struct uc_tokenizer *tok;
    const struct uc_chat_template *chat; /* NULL: chat requests are refused */
    int64_t vocab;                       /* token ids must be below this */
    int64_t n_layers;
    struct uc_compress_params defaults;  /* the server's current default compression */
};

/* Compression parameters as sent: 0, "" and has_r_min false take the default. Also the body
 * of Admin.SetCompressionPolicy (policy, kv_budget, decode_mode, grouping). */
struct uc_req_compress {
    char *policy;              /* uc_malloc'd or NULL, as the strings below */
    char *decode_mode;
    char *grouping;
    int64_t kv_budget, window, pool_kernel, sink_tokens, head_groups;
    int64_t *stage_starts;     /* (n_stage_starts) uc_malloc'd */
    size_t n_stage_starts;
    bool has_r_min;
    double r_min;
    bool has_think_ratio;      /* ThinK's pruned share, with a "+think" policy */
    double think_ratio;
    bool has_minicache_t;      /* MiniCache's SLERP t, with a "+minicache" policy */
    double minicache_t;
    bool has_minicache_gamma;  /* MiniCache's retained share (0: none retained) */
    double minicache_gamma;
    bool has_minicache_start;  /* MiniCache's first merged layer */
    int64_t minicache_start;
    bool has_lorc_ratio;       /* LoRC's kept share, with a "+lorc" policy */
    double lorc_ratio;
};

/* One prompt: text (text != NULL) or token ids. */
struct uc_req_prompt {
    char *text;                /* uc_malloc'd, text_len bytes then a NUL; may hold NUL bytes */
    size_t text_len;
    int64_t *ids;              /* (n_ids) uc_malloc'd, as sent */
    int64_t n_ids;
};

/* A generation request as a client sent it (decoded), then as validation leaves it. Everything
 * is owned by the struct (uc_req_fini frees it); has_* false = the client left it out. */
struct uc_req {
    enum uc_req_front front;       /* whose names errors use */
    enum uc_req_kind kind;
    char *request_id;              /* NULL or "" = the server assigns one */
    /* input */
    struct uc_req_prompt *prompts; /* (n_prompts) completions */
    int32_t n_prompts;
    bool prompt_list;              /* HTTP: "prompt" was a list (errors name prompt[i]) */
    bool add_special_tokens;       /* text prompts: the tokenizer's template (BOS); default on */
    cJSON *messages;               /* chat (owned): OpenAI messages, checked by validation */
    cJSON *template_kwargs;        /* chat (owned, may be NULL): more template variables */
    bool add_generation_prompt;    /* chat; default on */
    /* choices and what they return */
    int64_t n;                     /* choices per prompt; default 1 */
    bool echo;                     /* completions: the prompt leads each choice */
    bool logprobs;                 /* log-probabilities of the chosen tokens */
    int64_t top_logprobs;          /* alternatives per token */
    /* sampling */
    bool has_temperature, has_top_p, has_min_p, has_repetition_penalty, has_seed;
    double temperature, top_p, min_p, repetition_penalty;
    double frequency_penalty, presence_penalty; /* 0 = off */
    int64_t top_k;                 /* 0 or -1 = off */
    uint64_t seed;
    bool has_max_tokens;
    int64_t max_tokens;
    int64_t min_tokens;
    bool ignore_eos;
    /* stop rules */
    char **stop;                   /* (n_stop) uc_malloc'd, stop_len[i] bytes then a NUL */
    size_t *stop_len;
    size_t n_stop;
    int64_t *stop_ids;             /* (n_stop_ids) uc_malloc'd, as sent */
    size_t n_stop_ids;
    /* compression: has_compress = the client sent compression parameters */
    bool has_compress;
    struct uc_req_compress compress;

    /* set by uc_req_validate */
    int32_t n_inputs;              /* prompts tokenized: n_prompts, or 1 for chat */
    int32_t **tokens;              /* (n_inputs) token ids of each prompt */
    int64_t *n_tokens;
    char *rendered;                /* chat: the rendered prompt text (rendered_len bytes) */
    size_t rendered_len;
    int32_t *stop_ids32;           /* (n_stop_ids) */
    struct uc_request base;        /* everything but the prompt; points into this struct */
    bool valid;
};

/* An empty request of a kind with the defaults (n 1, special tokens and the generation prompt
 * on); errors will use front's names. */
void uc_req_init(struct uc_req *r, enum uc_req_front front, enum uc_req_kind kind);
/* Frees what r owns and leaves it empty (init again to reuse). NULL and twice are fine. */
void uc_req_fini(struct uc_req *r);

/* Decoding helpers (uc_malloc copies; UC_ERR_NOMEM when out of memory). */
/* Appends a text prompt of len bytes (NUL bytes kept). */
uc_status uc_req_add_text(struct uc_req *r, const char *text, size_t len);
/* Appends a prompt of n token ids and returns its array to fill in (NULL: out of memory). */
int64_t *uc_req_add_ids(struct uc_req *r, int64_t n);
/* Appends a stop string of len bytes (NUL bytes kept). */
uc_status uc_req_add_stop(struct uc_req *r, const char *s, size_t len);
/* Allocates n elements (zeroed) of an array the request owns: *out, *n_out = n. n == 0 leaves
 * *out NULL. */
uc_status uc_req_alloc_i64(int64_t **out, size_t *n_out, size_t n);
/* A uc_malloc'd copy of s (NULL for NULL), replacing and freeing *dst. */
uc_status uc_req_set_str(char **dst, const char *s);
void uc_req_compress_fini(struct uc_req_compress *c);

/* Checks every field (the rules of both fronts), then tokenizes each text prompt (or renders the
 * chat messages with the template and tokenizes that, without added special tokens) and
 * checks token ids against ctx->vocab, and fills r->tokens, r->stop_ids32 and r->base. On
 * failure returns err->status (the same) with the field and message; r stays decoded (fini it
 * as always). Cheap checks come first, tokenization last. */
uc_status uc_req_validate(struct uc_req *r, const struct uc_req_ctx *ctx,
                          struct uc_req_error *err);

/* The scheduler request for choices first .. first + n_fork - 1 of a validated request (choice
 * i is choice i % n of prompt i / n; the caller keeps them within one prompt): its prompt, the
 * seed + first % n when a seed is set, n = n_fork, the request id. Points into r (valid while r
 * lives). */
void uc_req_choice(const struct uc_req *r, int32_t first, int32_t n_fork, struct uc_request *out);

/* Resolves compression parameters as sent onto `defaults` and validates them for n_layers: the
 * one check behind gRPC CompressionParams, HTTP "uncomp" and Admin.SetCompressionPolicy. Field
 * names are prefix + key ("compression.policy", "uncomp.policy", "policy"); the message of a
 * combination the engine refuses is uc_compress_params_validate's, after `whole` and ": " when
 * whole is not NULL. */
uc_status uc_req_compress_resolve(const struct uc_req_compress *in,
                                  const struct uc_compress_params *defaults, int64_t n_layers,
                                  const char *prefix, const char *whole,
                                  struct uc_compress_params *out, struct uc_req_error *err);

/* The name of a field in a front's requests of a kind ("sampling.top_p", "top_p"). */
const char *uc_req_field_name(enum uc_req_front front, enum uc_req_kind kind,
                              enum uc_req_field f);
/* "full, uncomp, ..." : every policy name, for messages. */
void uc_req_policy_list(char *out, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
