/* The scheduler: rank 0's request queue and continuous batching loop. gRPC threads (and the
 * one-shot mode) submit requests and aborts from any thread; one engine thread runs
 * uc_sched_run, which admits requests when the KV pool can hold their post-compression
 * footprint, shares each step's prefill budget among the prompts being prefilled (the step is one
 * sweep over the layers that carries them beside every decode row), samples, applies stop rules
 * and streams events to each request's sink. Calibration runs as prefill work of the same steps. Sinks are called on the engine thread and
 * must not block. Every choice of a request (one unless n > 1) gets exactly one DONE event;
 * after the last, the scheduler never touches the sink again. */
#ifndef UC_DAEMON_SCHED_H
#define UC_DAEMON_SCHED_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "compress/policy.h"
#include "engine.h"
#include "sampler.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_sched;
struct metrics;

enum uc_finish_reason {
    UC_FINISH_NONE = 0,
    UC_FINISH_STOP = 1,
    UC_FINISH_LENGTH = 2,
    UC_FINISH_ABORTED = 3,
    UC_FINISH_ERROR = 4,
};
const char *uc_finish_reason_name(enum uc_finish_reason r);

#define UC_REQUEST_ID_MAX 64

/* A request as submitted (the scheduler copies everything it needs). */
struct uc_request {
    char request_id[UC_REQUEST_ID_MAX]; /* "" = assigned */
    const int32_t *prompt;  /* token ids (already tokenized) */
    int64_t n_prompt;
    struct uc_sampling_params sampling;
    int32_t max_tokens;     /* 0 = default */
    int32_t min_tokens;
    bool ignore_eos;
    int32_t logprobs;       /* top-n per token, 0 = none */
    const char *const *stop; /* stop strings */
    const size_t *stop_len;  /* their lengths in bytes (they may hold NUL bytes); NULL = each is
                                NUL-terminated */
    int32_t n_stop;
    const int32_t *stop_ids;
    int32_t n_stop_ids;
    /* compression: fields left at their zero value take the server default */
    bool has_compress;
    struct uc_compress_params compress;
    int64_t deadline_ms;    /* absolute uc_time_ms(); 0 = none */
    /* n > 1: n choices of the one prompt. The prompt is prefilled and compressed once; choices
     * 1..n-1 are forks of choice 0's sequence (UC_SEQ_FORK: a copy of its compressed cache,
     * plan and last logits), each with its own sampler (seed + i when a seed is set) and stop
     * state. Every event carries its choice's index; the sink gets one DONE per choice. */
    int32_t n;              /* 0 or 1 = one choice; at most UC_SCHED_MAX_N and max_running */
    bool prompt_logprobs;   /* one UC_EVENT_PROMPT (choice 0) with every prompt token's logprob
                               (and `logprobs` alternatives) before the first token */
};

#define UC_SCHED_MAX_N 16

/* Fills a request with "use the defaults" values. */
void uc_request_init(struct uc_request *r);

enum uc_event_kind {
    UC_EVENT_TOKENS = 1,
    UC_EVENT_DONE = 2,
    UC_EVENT_PROMPT = 3, /* prompt logprobs: ids = the prompt, logprobs[0].logprob is NaN (the
                            first token has none); sent for choice 0 only */
};

struct uc_token_logprob {
    int32_t token_id;
    float logprob;
    int32_t n_top;
    const int32_t *top_ids;
    const float *top_logprobs;
};

struct uc_timing {
    double queue_ms, ttft_ms, prefill_ms, decode_ms, total_ms;
};

struct uc_gen_event {
    enum uc_event_kind kind;
    const char *request_id;
    int32_t index;    /* the choice (0 .. n-1) */
    /* TOKENS (and PROMPT) */
    const int32_t *ids;
    int32_t n_ids;
    const char *text; /* complete UTF-8 only; may be empty while bytes are held back */
    size_t text_len;
    const struct uc_token_logprob *logprobs; /* n_ids entries, or NULL */
    /* DONE */
    uc_status status;          /* UC_OK, or the error (message in `message`) */
    const char *message;
    enum uc_finish_reason finish;
    const char *matched_stop;  /* the stop string (matched_stop_len bytes, then a NUL) or "" */
    size_t matched_stop_len;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    const struct uc_compress_report *report; /* NULL if the request never ran */
    struct uc_compress_params compress;      /* the effective parameters */
    struct uc_timing timing;
};

typedef void (*uc_event_sink)(void *user, const struct uc_gen_event *ev);

/* What a step carries while prompts prefill (README, "Scheduling"). */
enum uc_schedule {
    UC_SCHEDULE_MIXED = 0,         /* every decode row beside the prefill slices */
    UC_SCHEDULE_PREFILL_FIRST = 1, /* prompts only while a request's prompt prefills */
};
/* "mixed" / "prefill-first" (--schedule); false for any other text. */
bool uc_schedule_parse(const char *name, enum uc_schedule *out);

struct uc_sched_params {
    int32_t max_queued_requests;   /* waiting requests; beyond: RESOURCE_EXHAUSTED */
    int64_t max_queued_tokens;     /* prompt tokens waiting; beyond: RESOURCE_EXHAUSTED */
    int32_t max_running;           /* sequences in prefill or decode at once */
    int64_t prefill_step_tokens;   /* row-layers of prefill per step while others decode (4x
                                      when nothing decodes) */
    int64_t prefill_memory;        /* bytes of prefill buffers at once (0 = a quarter of the KV
                                      pool); one prompt may always start */
    enum uc_schedule schedule;
    int64_t max_decode_wait_ms;    /* prefill-first: a decode waiting longer makes the step
                                      mixed (0 = no bound) */
    const char *step_trace_path;   /* a JSON line per step goes here (NULL: none) */
    int32_t default_max_tokens;
    int32_t max_tokens_limit;      /* a request asking for more is INVALID_ARGUMENT */
    int32_t max_stop_strings;
    int32_t max_stop_len;
    int64_t heartbeat_ms;          /* idle heartbeat to the other ranks */
    struct uc_compress_params default_compress;
    /* calibration defaults */
    const char *calib_text_path;   /* NULL = MODEL_DIR/calibration.txt, else the fallback */
    const char *calib_fallback_path; /* the bundled model's calibration.txt */
    int32_t calib_window_tokens;   /* also the most an Admin.Calibrate may ask */
    int32_t calib_max_windows;     /* also the most an Admin.Calibrate may ask */
    size_t calib_max_text_bytes;   /* the largest text an Admin.Calibrate may send */
    /* KVSharer's search after each calibration (kvsharer.ratio 0: none) */
    struct uc_kvsharer_params kvsharer;
    int32_t kvsharer_window;
    /* MiniCache's merge set after each calibration: pairs to pick (0: the paper's count,
     * -1: no calibration), tokens per window */
    int32_t minicache_pairs;
    int32_t minicache_window;
};

struct uc_sched_params uc_sched_default_params(void);

/* The scheduler borrows the engine and tokenizer (rank 0's) and the metrics sink (may be NULL). */
uc_status uc_sched_create(struct uc_sched **out, const struct uc_sched_params *p,
                          struct uc_engine *engine, const struct uc_tokenizer *tok,
                          struct metrics *metrics);
void uc_sched_destroy(struct uc_sched *s);

/* Thread-safe. Validates and queues a request; on refusal returns INVALID_ARG (message in msg),
 * KV_FULL (the queue is full: RESOURCE_EXHAUSTED) or UNAVAILABLE (draining). The sink gets
 * events until DONE. The assigned id is written to id_out (UC_REQUEST_ID_MAX bytes) if given. */
uc_status uc_sched_submit(struct uc_sched *s, const struct uc_request *r, uc_event_sink sink,
                          void *user, char *id_out, char *msg, size_t msg_size);
/* Thread-safe. Aborts a request by id (queued or running; every choice); its stream ends with ABORTED and the
 * given status (UC_OK for Abort, UC_ERR_CANCELLED for a client cancel, UC_ERR_TIMEOUT for a
 * deadline). Returns false when no such request is live. */
bool uc_sched_abort(struct uc_sched *s, const char *request_id, uc_status why);

/* Fronts whose sinks wake a sender of theirs can wake it once a round instead of once an event
 * (a step at batch 256 hands out 256 events): fn(user) runs on the engine thread after every
 * round, and uc_sched_batching() says, on the calling thread, whether it is the engine thread
 * handing out a step's results (where a sink may leave its wake-up to fn). One hook;
 * thread-safe; NULL clears it, and once that returns fn is not running and will not run again. */
void uc_sched_set_round_hook(struct uc_sched *s, void (*fn)(void *user), void *user);
bool uc_sched_batching(void);

/* Runs the loop on the calling thread (rank 0's engine thread) until uc_sched_stop, then shuts
 * the other ranks down. */
uc_status uc_sched_run(struct uc_sched *s);
/* Thread-safe: ends uc_sched_run after the current step; queued and running requests are
 * aborted (status UNAVAILABLE). */
void uc_sched_stop(struct uc_sched *s);
/* Thread-safe: stop admitting (new submits get UNAVAILABLE), let in-flight requests finish for
 * up to timeout_ms, abort the rest, then return how many finished and were aborted. Blocks the
 * caller (not the engine thread). Does not stop the loop. */
void uc_sched_drain(struct uc_sched *s, int64_t timeout_ms, int32_t *finished, int32_t *aborted);
bool uc_sched_draining(struct uc_sched *s);

/* Thread-safe: queues a calibration (text NULL = the default text) and waits for it. Its windows
 * are prefilled by the engine thread beside the running requests (nothing stalls); the new
 * profile is installed on every rank and saved. window_tokens and max_windows (0 = the server's
 * calib_window_tokens / calib_max_windows) may ask less than those server limits, not more.
 * One calibration at a time: a second call waits for the first to end (its own cancel still
 * ends the wait). `cancel` (may be NULL): once it reads true and uc_sched_calibrate_wake is
 * called, the calibration (or the wait for it) ends with UC_ERR_CANCELLED; a drain or stop ends
 * it with UC_ERR_UNAVAILABLE. */
uc_status uc_sched_calibrate(struct uc_sched *s, const char *text, int32_t window_tokens,
                             int32_t max_windows, const atomic_bool *cancel, char *msg,
                             size_t msg_size);
/* Thread-safe: makes the engine thread and the waiting callers look at their cancel flags. */
void uc_sched_calibrate_wake(struct uc_sched *s);
/* Thread-safe: the default compression for new requests. */
void uc_sched_get_default_compress(struct uc_sched *s, struct uc_compress_params *out);
uc_status uc_sched_set_default_compress(struct uc_sched *s, const struct uc_compress_params *p,
                                        char *msg, size_t msg_size);

struct uc_sched_counts {
    int32_t running;
    int32_t queued;
    int64_t queued_tokens;
    int64_t kv_blocks_reserved;
    int64_t kv_blocks_total;
    int64_t kv_blocks_used;
    int64_t kv_blocks_shared; /* used blocks held by more than one sequence (n > 1 forks) */
};
/* Thread-safe snapshot. */
void uc_sched_counts(struct uc_sched *s, struct uc_sched_counts *out);
struct uc_engine *uc_sched_engine(struct uc_sched *s);
/* The largest n a request may ask for: UC_SCHED_MAX_N, or max_running when smaller. */
int32_t uc_sched_max_n(const struct uc_sched *s);
/* Thread-safe: the active calibration profile as JSON (uc_malloc'd), or NULL when none. */
char *uc_sched_profile_json(struct uc_sched *s);
const struct uc_tokenizer *uc_sched_tokenizer(struct uc_sched *s);

#ifdef __cplusplus
}
#endif
#endif
