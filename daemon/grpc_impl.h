/* Internals shared by daemon/grpc_server.c (completion queues, calls, streaming, lifecycle) and
 * daemon/grpc_codec.c (protobuf-c messages: request validation, queued stream events, response
 * builders). Not a public header: only daemon/grpc_*.c include it, and protobuf-c structs never
 * leave these files. The gRPC C headers declare `f()` prototypes, so they are included here with
 * -Wstrict-prototypes silenced. */
#ifndef UC_DAEMON_GRPC_IMPL_H
#define UC_DAEMON_GRPC_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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
#include "base/status.h"
#include "grpc/health/v1/health.pb-c.h"
#include "sched.h"
#include "server.h"
#include "uncomp/v1/uncomp.pb-c.h"

/* ---- per-request arena: unpacked requests and response messages ------------------------- */

struct uc_grpc_arena_blk;
struct uc_grpc_arena {
    struct uc_grpc_arena_blk *head;
    bool oom;                  /* an allocation failed */
    ProtobufCAllocator pb;     /* allocates from this arena (free is a no-op) */
};

void uc_grpc_arena_init(struct uc_grpc_arena *a);
/* Zeroed memory that lives until uc_grpc_arena_fini; NULL (and a->oom) on failure. */
void *uc_grpc_arena_alloc(struct uc_grpc_arena *a, size_t size_bytes);
char *uc_grpc_arena_strdup(struct uc_grpc_arena *a, const char *s);
void uc_grpc_arena_fini(struct uc_grpc_arena *a);

/* ---- messages <-> byte buffers ----------------------------------------------------------- */

/* Unpacks a received buffer into a message allocated from the arena. NULL when the buffer is
 * NULL (no message) or is not a valid message of that type. */
ProtobufCMessage *uc_grpc_unpack(struct uc_grpc_arena *a, const ProtobufCMessageDescriptor *d,
                                 grpc_byte_buffer *bb);
/* Serialises a message into a new byte buffer (the caller destroys it); NULL on OOM. */
grpc_byte_buffer *uc_grpc_pack(const ProtobufCMessage *m);

/* uc_status -> gRPC status code (API.md's mapping; everything unexpected is INTERNAL). */
grpc_status_code uc_grpc_code(uc_status st);

/* ---- Generate ---------------------------------------------------------------------------- */

struct uc_grpc_gen_ctx {
    const struct uc_tokenizer *tok;
    int64_t vocab;                       /* ids must be below this */
    int64_t n_layers;
    struct uc_compress_params defaults;  /* the server's current default compression */
};

/* A validated request, ready for uc_sched_submit; owns the arrays it points into (strings point
 * into the unpacked message, which must outlive it). */
struct uc_grpc_gen_req {
    struct uc_request req;
    int32_t *prompt;        /* uc_malloc'd */
    int32_t *stop_ids;      /* uc_malloc'd */
    const char **stop;      /* uc_malloc'd array of borrowed strings */
};

/* Validates every field of a GenerateRequest and tokenizes text input. On a bad field returns
 * UC_ERR_INVALID_ARG with a message naming it ("sampling.top_p=1.5 must be in (0, 1]"). */
uc_status uc_grpc_gen_request(struct uc_grpc_gen_req *out, const Uncomp__V1__GenerateRequest *in,
                              const struct uc_grpc_gen_ctx *ctx, char *msg, size_t msg_size);
void uc_grpc_gen_req_fini(struct uc_grpc_gen_req *r);

/* One scheduler event, copied out of the engine thread's buffers into a call's queue. */
struct uc_grpc_lp {
    int32_t token_id;
    float logprob;
    int32_t n_top;
    int32_t *top_ids;   /* (n_top) */
    float *top_lps;     /* (n_top) */
};

struct uc_grpc_item {
    struct uc_grpc_item *next;
    enum uc_event_kind kind;
    /* TOKENS */
    int32_t *ids;               /* (n_ids) */
    int32_t n_ids;
    char *text;                 /* (text_len + 1), NUL-terminated */
    size_t text_len;
    struct uc_grpc_lp *lps;     /* (n_ids) or NULL */
    /* DONE */
    uc_status status;
    char *message;
    enum uc_finish_reason finish;
    char *matched_stop;
    int64_t prompt_tokens, completion_tokens;
    struct uc_timing timing;
    struct uc_compress_params compress;
    bool has_report;
    struct uc_compress_report report;   /* entropy arrays owned by the item */
};

/* Deep copy of an event (NULL on OOM). */
struct uc_grpc_item *uc_grpc_item_from_event(const struct uc_gen_event *ev);
void uc_grpc_item_free(struct uc_grpc_item *it);
/* A GenerateResponse{chunk} holding the tokens, text and logprobs of the TOKENS items from
 * `first` up to (not including) `end`; NULL on OOM. */
grpc_byte_buffer *uc_grpc_pack_chunk(const char *request_id, const struct uc_grpc_item *first,
                                     const struct uc_grpc_item *end);
/* A GenerateResponse{complete} for a DONE item; NULL on OOM. */
grpc_byte_buffer *uc_grpc_pack_complete(const char *request_id, const struct uc_grpc_item *done);

/* ---- unary responses ---------------------------------------------------------------------- */

/* A reply: a message (NULL for an error) with a status code and, for errors, a message. */
struct uc_grpc_reply {
    grpc_byte_buffer *msg;
    grpc_status_code code;
    char detail[512];
};

void uc_grpc_tokenize(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                      const Uncomp__V1__TokenizeRequest *req);
void uc_grpc_detokenize(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                        const Uncomp__V1__DetokenizeRequest *req);
void uc_grpc_server_info(struct uc_grpc_reply *r, const struct uc_admin_src *src);
void uc_grpc_model_info(struct uc_grpc_reply *r, const struct uc_admin_src *src);
void uc_grpc_stats(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                   const Uncomp__V1__GetStatsRequest *req);
/* The active profile (from the scheduler's JSON); present=false when there is none. */
void uc_grpc_profile(struct uc_grpc_reply *r, const struct uc_admin_src *src);
void uc_grpc_set_policy(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                        const Uncomp__V1__SetCompressionPolicyRequest *req);
/* Runs a calibration (blocks until the engine thread has done it) and replies with the new
 * profile. */
void uc_grpc_calibrate(struct uc_grpc_reply *r, const struct uc_admin_src *src,
                       const Uncomp__V1__CalibrateRequest *req);
grpc_byte_buffer *uc_grpc_pack_drain(int32_t finished, int32_t aborted);
/* HealthCheckResponse with the given grpc.health.v1 status (SERVING = 1, ...). */
grpc_byte_buffer *uc_grpc_pack_health(int status);

/* Sets an error reply: code and a printf-style message. */
void uc_grpc_reply_error(struct uc_grpc_reply *r, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
