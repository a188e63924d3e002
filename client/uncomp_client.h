/* uc_client: a C client library for the uncomp daemon's gRPC API (API.md): the Inference
 * service (streaming and blocking Generate and Chat, Tokenize, Detokenize, Abort), every Admin
 * call and grpc.health.v1.Health/Check. Plain C structs only: no gRPC or protobuf-c type
 * appears here.
 *
 * Threads: a handle is thread-compatible, not thread-safe: one call at a time per handle (use one
 * handle per thread; handles are independent). uc_client_cancel() is the exception: it may be
 * called from any thread while another thread is inside a call on the same handle.
 *
 * Errors: every call returns uc_status (UC_OK on success) and, when `err` is not NULL, fills it
 * with the gRPC status code and the server's message (local failures use the closest gRPC code:
 * INVALID_ARGUMENT for bad parameters, UNAVAILABLE when the server cannot be reached). The
 * library never logs and never exits: every failure is described in `err` instead, so a command
 * line tool can print it once, its own way.
 *
 * Memory: result structs own what they point to (allocated with uc_malloc) and are released by
 * their _fini function, which accepts a zeroed or already finished struct. Input pointers are
 * borrowed for the duration of the call.
 *
 * Text is bytes with a length: prompts, stop strings, tokenized text, decoded and streamed text
 * may hold NUL bytes. Inputs take a length beside the pointer (a zero length field in a params
 * struct means strlen, so C strings need nothing more); outputs give their length beside a
 * pointer that is also NUL-terminated for convenience.
 *
 *     struct uc_client *c;
 *     struct uc_client_error err;
 *     struct uc_client_opts o = uc_client_default_opts();
 *     if (uc_client_connect(&c, "127.0.0.1:50051", &o, &err) != UC_OK) {
 *         fprintf(stderr, "%s: %s\n", uc_client_code_name(err.grpc_code), err.message);
 *     }
 *     struct uc_generate_params p = uc_generate_default_params();
 *     p.text = "Once upon a time";
 *     p.sampling.max_tokens = 32;
 *     struct uc_generation g;
 *     if (uc_client_generate(c, &p, &g, &err) == UC_OK) {
 *         fwrite(g.text, 1, g.text_len, stdout); // the text may hold NUL bytes
 *     }
 *     uc_generation_fini(&g);
 *     uc_client_close(c);
 */
#ifndef UC_CLIENT_UNCOMP_CLIENT_H
#define UC_CLIENT_UNCOMP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- handle, options, errors ------------------------------------------------------------ */

struct uc_client; /* opaque: one gRPC channel and a completion queue */

/* gRPC status codes (grpc/status.h numbering), so callers need no gRPC header. */
enum uc_grpc_code {
    UC_GRPC_OK = 0,
    UC_GRPC_CANCELLED = 1,
    UC_GRPC_UNKNOWN = 2,
    UC_GRPC_INVALID_ARGUMENT = 3,
    UC_GRPC_DEADLINE_EXCEEDED = 4,
    UC_GRPC_NOT_FOUND = 5,
    UC_GRPC_ALREADY_EXISTS = 6,
    UC_GRPC_PERMISSION_DENIED = 7,
    UC_GRPC_RESOURCE_EXHAUSTED = 8,
    UC_GRPC_FAILED_PRECONDITION = 9,
    UC_GRPC_ABORTED = 10,
    UC_GRPC_OUT_OF_RANGE = 11,
    UC_GRPC_UNIMPLEMENTED = 12,
    UC_GRPC_INTERNAL = 13,
    UC_GRPC_UNAVAILABLE = 14,
    UC_GRPC_DATA_LOSS = 15,
    UC_GRPC_UNAUTHENTICATED = 16,
};
#define UC_GRPC_N_CODES 17

#define UC_CLIENT_ERROR_MSG_BYTES 512

/* The outcome of a failed call: the gRPC status code and the server's message (truncated to
 * fit, always NUL-terminated). grpc_code is UC_GRPC_OK and message empty after a success. */
struct uc_client_error {
    int grpc_code;
    char message[UC_CLIENT_ERROR_MSG_BYTES];
};

/* Connection options; start from uc_client_default_opts(). */
struct uc_client_opts {
    const char *root_certs_file; /* PEM file of trusted roots: TLS on; NULL = plaintext */
    const char *tls_server_name; /* name checked against the server certificate; NULL = host */
    int64_t connect_timeout_ms;  /* how long uc_client_connect waits for READY; 0 = lazy (the
                                    first call connects) */
    bool wait_for_server;        /* keep retrying until connect_timeout_ms (a daemon that is
                                    still starting); false: fail at the first refusal */
    int64_t call_timeout_ms;     /* deadline of each call from its start; 0 = none */
    int64_t max_message_bytes;   /* largest response accepted (default 64 MiB) */
    const char *api_key;         /* sent as "authorization: Bearer KEY" on every call; NULL or
                                    "" = none */
    int connection;              /* the process's clients of one server share a connection
                                    when their options are equal: a different value here gives
                                    a different connection (default 0) */
};

/* Returns the defaults: plaintext, connect timeout 5000 ms, fail fast, no call deadline. */
struct uc_client_opts uc_client_default_opts(void);

/* Creates a handle for `target` ("host:port", or any gRPC target such as "unix:/path") and,
 * when opts->connect_timeout_ms > 0, waits until the channel is READY. Fails with UNAVAILABLE
 * when the server cannot be reached in time (or refuses at once, unless wait_for_server), with
 * INVALID_ARGUMENT on a bad target or unreadable certificate file. opts may be NULL (defaults).
 * On failure *out is NULL. The caller owns the handle: release it with uc_client_close(). */
uc_status uc_client_connect(struct uc_client **out, const char *target,
                            const struct uc_client_opts *opts, struct uc_client_error *err);

/* Closes the channel and frees the handle; NULL is fine. No call may be in progress. */
void uc_client_close(struct uc_client *c);

/* Sets the per-call deadline (ms from the start of each later call; 0 = none). */
void uc_client_set_call_timeout(struct uc_client *c, int64_t timeout_ms);

/* Cancels the call in progress on this handle, if any (thread-safe, callable from any thread;
 * not async-signal-safe). The call returns UC_ERR_CANCELLED with code CANCELLED; the server
 * aborts the request on every rank. */
void uc_client_cancel(struct uc_client *c);

/* Returns the canonical name of a gRPC code ("INVALID_ARGUMENT"), or "UNKNOWN_CODE". */
const char *uc_client_code_name(int grpc_code);

/* Maps a gRPC code to the closest uc_status (UC_OK for 0). */
uc_status uc_client_code_status(int grpc_code);

/* ---- Generate ---------------------------------------------------------------------------- */

/* Sampling parameters; zero means the server's documented default (SamplingParams). */
struct uc_sampling {
    uint32_t max_tokens;
    uint32_t min_tokens;
    float temperature;          /* used only when has_temperature (0 = greedy) */
    bool has_temperature;       /* false: the server default (1.0) */
    float top_p;
    uint32_t top_k;
    float min_p;
    float repetition_penalty;
    float frequency_penalty;
    float presence_penalty;
    const char *const *stop;    /* n_stop stop strings */
    const size_t *stop_len;     /* their lengths in bytes (they may hold NUL bytes); NULL = each
                                   is NUL-terminated */
    size_t n_stop;
    const uint32_t *stop_token_ids;
    size_t n_stop_token_ids;
    uint64_t seed;              /* used only when has_seed */
    bool has_seed;
    bool ignore_eos;
    uint32_t logprobs;          /* top-n log-probabilities per token (0 = none) */
};

/* Compression parameters; zero/NULL means the server default (CompressionParams). */
struct uc_compression {
    const char *policy;         /* full, uncomp, uncomp-stage, snapkv, pyramidkv, streamingllm,
                                   h2o */
    uint32_t kv_budget;         /* mean tokens per KV head per layer */
    uint32_t window;
    uint32_t pool_kernel;
    uint32_t sink_tokens;
    uint32_t head_groups;
    const char *decode_mode;    /* append | evict */
    const char *grouping;       /* profile | prompt */
    const uint32_t *stage_starts; /* explicit uncomp-stage boundaries (layers) */
    size_t n_stage_starts;
    float r_min;
    float think_ratio;          /* with a +think policy: share of key channels pruned; 0 = 0.4 */
    float minicache_t;          /* with +minicache: SLERP t; 0 = 0.6 */
    float minicache_gamma;      /* with +minicache: share kept unmerged; 0 = 0.05 */
    bool minicache_retain_none; /* with +minicache: keep no common token unmerged */
    uint32_t minicache_start;   /* with +minicache: first merged layer; 0 = the profile's
                                   calibrated pairs, else half the layers */
    float lorc_ratio;           /* with a +lorc policy: mean share of K/V dimensions kept; 0 = 0.5 */
};

/* One Generate request: exactly one of `text` or `token_ids` (n_token_ids > 0). */
struct uc_generate_params {
    const char *request_id;     /* NULL or "" = the server assigns one */
    const char *text;
    size_t text_len;            /* bytes of text (it may hold NUL bytes); 0 = strlen(text) */
    const uint32_t *token_ids;
    size_t n_token_ids;
    bool add_special_tokens;    /* used only when has_add_special_tokens (server default: true) */
    bool has_add_special_tokens;
    struct uc_sampling sampling;
    struct uc_compression compression;
};

/* Returns parameters with every field at the server default. */
struct uc_generate_params uc_generate_default_params(void);

/* One generated token's log-probability and its top alternatives. */
struct uc_client_token_logprob {
    uint32_t token_id;
    float logprob;
    const uint32_t *top_ids;    /* n_top entries */
    const float *top_logprobs;
    size_t n_top;
};

/* A streamed chunk, borrowed: valid only during the callback. */
struct uc_chunk {
    const char *request_id;     /* the server's id for this request (for uc_client_abort) */
    const uint32_t *token_ids;
    size_t n_token_ids;
    const char *text;           /* UTF-8, whole code points: text_len bytes (NUL bytes included),
                                   then a NUL */
    size_t text_len;
    const struct uc_client_token_logprob *logprobs;
    size_t n_logprobs;
    double arrival_s;           /* monotonic clock (uc_time_s) when the chunk arrived */
};

/* Called once per chunk; return 0 to continue, anything else to cancel the call (the call then
 * returns UC_ERR_CANCELLED). */
typedef int (*uc_chunk_fn)(const struct uc_chunk *chunk, void *user);

enum uc_finish_reason {
    UC_FINISH_UNSPECIFIED = 0,
    UC_FINISH_STOP = 1,         /* EOS, a stop string or a stop token id */
    UC_FINISH_LENGTH = 2,       /* max_tokens or the context length */
    UC_FINISH_ABORTED = 3,      /* Abort, cancellation, deadline or drain */
    UC_FINISH_ERROR = 4,
};

/* Returns "stop", "length", "aborted", "error" or "unspecified". */
const char *uc_client_finish_reason_name(enum uc_finish_reason r);

struct uc_group_report {
    uint32_t group;
    uint32_t budget;
    double mean_kept;
};

struct uc_layer_entropy {
    uint32_t layer;
    double min;
    double mean;
    double max;
};

/* What compression did to one request's KV cache (CompressionReport). */
struct uc_compression_report {
    char *policy;
    uint32_t kv_budget;
    uint64_t kv_tokens_full;    /* prompt tokens x layers x KV heads */
    uint64_t kv_tokens_kept;
    uint64_t kv_bytes_full;
    uint64_t kv_bytes_kept;
    double ratio;
    uint64_t *stage_rows;       /* prefill rows kept per stage */
    size_t n_stage_rows;
    uint32_t *stage_starts;
    size_t n_stage_starts;
    struct uc_group_report *groups;
    size_t n_groups;
    struct uc_layer_entropy *entropy;
    size_t n_entropy;
    double compress_ms;
    char *decode_mode;
    char *grouping;
    uint64_t plan_checksum;
    uint32_t shared_layers; /* KVSharer: layers reading another layer's cache (no KV held) */
    uint32_t key_channels;  /* ThinK: key channels each KV head keeps (head_dim without) */
    uint32_t minicache_pairs;    /* MiniCache: layer pairs merged (0 without +minicache) */
    uint32_t minicache_start;    /* its first merged layer */
    uint32_t *minicache_layers;  /* each pair's first layer a (pair a, a + 1), ascending */
    size_t n_minicache_layers;
    uint64_t minicache_merged;   /* (token, KV head)s stored once for two layers */
    uint64_t minicache_retained; /* common tokens kept unmerged */
    float lorc_ratio;       /* LoRC: mean kept share of the K/V dimensions (0 without +lorc) */
    uint32_t lorc_rank_first; /* LoRC: the first and the last layer's latent ranks */
    uint32_t lorc_rank_last;
};

struct uc_client_timing {
    double queue_ms;
    double ttft_ms;             /* submission to first token (server side) */
    double prefill_ms;
    double decode_ms;
    double total_ms;
};

/* The final message of a Generate stream, plus the client's own clock. */
struct uc_completion {
    char *request_id;
    bool complete;              /* a Complete message arrived */
    enum uc_finish_reason finish_reason;
    char *matched_stop;         /* matched_stop_len bytes (a stop string may hold NUL bytes),
                                   then a NUL */
    size_t matched_stop_len;
    uint32_t prompt_tokens;
    uint32_t completion_tokens;
    bool has_compression;
    struct uc_compression_report compression;
    struct uc_client_timing timing;
    double client_ttft_ms;      /* call start to the first chunk with tokens (0 if none) */
    double client_total_ms;     /* call start to the end of the stream */
    uint64_t n_chunks;
};

/* Frees what a completion owns and zeroes it. */
void uc_completion_fini(struct uc_completion *comp);

/* Runs Generate and calls on_chunk (may be NULL) for each chunk as it arrives, then fills *out
 * with the final completion (out may be NULL). *out is always initialised, even on failure:
 * release it with uc_completion_fini(). The call fails with the server's status, with
 * UC_ERR_CANCELLED when on_chunk stopped it or uc_client_cancel() was called, or with
 * UC_ERR_FORMAT (code INTERNAL) if the stream ended without a Complete message. */
uc_status uc_client_generate_stream(struct uc_client *c, const struct uc_generate_params *p,
                                    uc_chunk_fn on_chunk, void *user, struct uc_completion *out,
                                    struct uc_client_error *err);

/* A whole generation: the concatenated text and tokens, and the completion. */
struct uc_generation {
    char *text;                 /* text_len bytes (NUL bytes included), then a NUL */
    size_t text_len;
    uint32_t *token_ids;
    size_t n_token_ids;
    float *logprobs;            /* the sampled token's logprob, when requested (n_logprobs) */
    size_t n_logprobs;
    struct uc_completion completion;
};

void uc_generation_fini(struct uc_generation *g);

/* Runs Generate to the end and returns everything in *out (always initialised; release it with
 * uc_generation_fini()). Errors as uc_client_generate_stream(). */
uc_status uc_client_generate(struct uc_client *c, const struct uc_generate_params *p,
                             struct uc_generation *out, struct uc_client_error *err);

/* ---- Chat -------------------------------------------------------------------------------- */

/* One message of a conversation. */
struct uc_chat_message {
    const char *role;           /* system, user, assistant, tool, developer */
    const char *content;
    size_t content_len;         /* bytes of content (it may hold NUL bytes); 0 = strlen */
};

/* One Chat request: the whole conversation so far, rendered by the server's chat template
 * (uncompd --chat-template) with the assistant's turn opened, then generated as Generate is. */
struct uc_chat_params {
    const char *request_id;     /* NULL or "" = the server assigns one */
    const struct uc_chat_message *messages;
    size_t n_messages;          /* at least 1 */
    struct uc_sampling sampling;
    struct uc_compression compression;
};

/* Returns parameters with every field at the server default (and no messages). */
struct uc_chat_params uc_chat_default_params(void);

/* Runs Chat, streaming as uc_client_generate_stream() does (same callback, completion and
 * errors). FAILED_PRECONDITION: the server has no chat template. */
uc_status uc_client_chat_stream(struct uc_client *c, const struct uc_chat_params *p,
                                uc_chunk_fn on_chunk, void *user, struct uc_completion *out,
                                struct uc_client_error *err);

/* Runs Chat to the end: the assistant's reply in *out (always initialised; release it with
 * uc_generation_fini()). */
uc_status uc_client_chat(struct uc_client *c, const struct uc_chat_params *p,
                         struct uc_generation *out, struct uc_client_error *err);

/* ---- Tokenize, Detokenize, Abort, Health ------------------------------------------------- */

struct uc_tokens {
    uint32_t *ids;
    size_t n_ids;
    char **pieces;              /* the token strings, when the server sends them (n_pieces) */
    size_t n_pieces;
};

void uc_tokens_fini(struct uc_tokens *t);

/* Tokenizes the text_len bytes at `text` (NUL bytes included; text may be NULL when text_len
 * is 0), with the tokenizer's template/BOS when add_special_tokens. *out is always initialised;
 * release it with uc_tokens_fini(). For a C string pass strlen(text). */
uc_status uc_client_tokenize(struct uc_client *c, const char *text, size_t text_len,
                             bool add_special_tokens, struct uc_tokens *out,
                             struct uc_client_error *err);

/* Decodes token ids into *text_out: *text_len_out bytes (text_len_out may be NULL; the text may
 * hold NUL bytes), then a NUL. The caller owns it (uc_free); NULL on failure. */
uc_status uc_client_detokenize(struct uc_client *c, const uint32_t *ids, size_t n_ids,
                               bool skip_special_tokens, char **text_out, size_t *text_len_out,
                               struct uc_client_error *err);

/* Stops request `request_id` on every rank; *found (may be NULL) says whether it was running. */
uc_status uc_client_abort(struct uc_client *c, const char *request_id, bool *found,
                          struct uc_client_error *err);

enum uc_health_status {
    UC_HEALTH_UNKNOWN = 0,
    UC_HEALTH_SERVING = 1,
    UC_HEALTH_NOT_SERVING = 2,
    UC_HEALTH_SERVICE_UNKNOWN = 3,
};

/* Returns "UNKNOWN", "SERVING", "NOT_SERVING" or "SERVICE_UNKNOWN". */
const char *uc_health_status_name(enum uc_health_status s);

/* grpc.health.v1.Health/Check for `service` (NULL or "" = the whole server). */
uc_status uc_client_health(struct uc_client *c, const char *service,
                           enum uc_health_status *out, struct uc_client_error *err);

/* ---- Admin ------------------------------------------------------------------------------- */

struct uc_client_rank_info {
    uint32_t rank;
    char *host;
    char *device;
    uint64_t weight_bytes;
    uint64_t kv_bytes;
};

struct uc_server_info {
    char *version;
    char *build;                /* backend, CUDA/NCCL/MPI versions */
    double uptime_s;
    char *state;                /* LOADING, SERVING, DRAINING, STOPPED */
    uint32_t tp_size;
    struct uc_client_rank_info *ranks;
    size_t n_ranks;
    uint32_t running_requests;
    uint32_t queued_requests;
    char *default_policy;
    uint32_t default_kv_budget;
    char *backend;
};

void uc_server_info_fini(struct uc_server_info *s);
uc_status uc_client_server_info(struct uc_client *c, struct uc_server_info *out,
                                struct uc_client_error *err);

struct uc_model_info {
    char *path;
    char *architecture;
    uint32_t layers;
    uint32_t heads;
    uint32_t kv_heads;
    uint32_t head_dim;
    uint32_t hidden_size;
    uint32_t intermediate_size;
    uint32_t vocab_size;
    uint32_t context_length;
    char *dtype;
    char *tokenizer;
    int32_t bos_token_id;
    int32_t *eos_token_ids;
    size_t n_eos_token_ids;
};

void uc_model_info_fini(struct uc_model_info *m);
uc_status uc_client_model_info(struct uc_client *c, struct uc_model_info *out,
                               struct uc_client_error *err);

struct uc_percentiles {
    double p50;
    double p90;
    double p99;
    double mean;
    uint64_t count;
};

struct uc_stats {
    uint64_t requests_total;
    uint64_t requests_finished;
    uint64_t requests_failed;
    uint64_t requests_aborted;
    uint64_t requests_rejected;
    uint64_t prompt_tokens_total;
    uint64_t generation_tokens_total;
    uint32_t running;
    uint32_t queued;
    double kv_usage;            /* fraction of the KV pool in use (rank 0) */
    uint64_t kv_tokens_full_total;
    uint64_t kv_tokens_kept_total;
    uint64_t prefill_rows_dropped_total;
    double compression_seconds_total;
    struct uc_percentiles ttft_ms;
    struct uc_percentiles inter_token_ms;
    struct uc_percentiles e2e_ms;
    struct uc_percentiles queue_ms;
    char *text;                 /* INFO text: "# Section" then key:value lines */
};

void uc_stats_fini(struct uc_stats *s);

/* GetStats; `section` (NULL or "" = all) selects the sections of the INFO text. */
uc_status uc_client_stats(struct uc_client *c, const char *section, struct uc_stats *out,
                          struct uc_client_error *err);

struct uc_layer_profile {
    uint32_t layer;
    double entropy;             /* normalised truncated entropy of the layer input */
    double score;               /* 100 x entropy */
    uint32_t stage;
    double *head_entropy;       /* per query head (n_head_entropy) */
    size_t n_head_entropy;
    double *kv_head_entropy;    /* per KV head (n_kv_heads) */
    uint32_t *kv_head_group;    /* per KV head (n_kv_heads) */
    size_t n_kv_heads;
};

struct uc_client_profile {
    bool present;
    char *source;
    char *path;
    int64_t created_unix_ms;
    uint64_t calib_tokens;
    uint32_t head_groups;
    uint32_t *stage_starts;
    size_t n_stage_starts;
    struct uc_layer_profile *layers;
    size_t n_layers;
    char *json;                 /* the profile file itself */
};

void uc_client_profile_fini(struct uc_client_profile *p);
uc_status uc_client_profile(struct uc_client *c, struct uc_client_profile *out,
                            struct uc_client_error *err);

/* Calibrates on `text` (NULL or "" = the built-in text), installs and persists the new profile
 * and returns it. window_tokens / max_windows: 0 = server defaults. */
uc_status uc_client_calibrate(struct uc_client *c, const char *text, uint32_t window_tokens,
                              uint32_t max_windows, struct uc_client_profile *out,
                              struct uc_client_error *err);

/* The server's default compression settings (SetCompressionPolicy request and response). */
struct uc_client_policy {
    char *policy;
    uint32_t kv_budget;         /* request: 0 = keep */
    char *decode_mode;          /* request: NULL or "" = keep */
    char *grouping;             /* request: NULL or "" = keep */
};

void uc_client_policy_fini(struct uc_client_policy *p);

/* Changes the server's default policy (validated by the server; applies to new requests) and
 * returns the settings now in force in *out (release with uc_client_policy_fini()). */
uc_status uc_client_set_policy(struct uc_client *c, const struct uc_client_policy *req,
                               struct uc_client_policy *out, struct uc_client_error *err);

struct uc_drain_result {
    uint32_t finished;          /* in-flight requests that completed */
    uint32_t aborted;           /* requests cut off by the timeout */
};

/* Stops admitting requests, waits for in-flight ones (timeout_ms, 0 = the server's
 * --drain-timeout) and reports. Health turns NOT_SERVING. */
uc_status uc_client_drain(struct uc_client *c, uint32_t timeout_ms, struct uc_drain_result *out,
                          struct uc_client_error *err);

#ifdef __cplusplus
}
#endif
#endif
