/* The scheduler's insides, shared by its files (sched.h is the public face):
 *
 *   sched.c        the request queue, submit/abort/drain, streamed events, stop rules, the loop
 *   sched_step.c   admission, the prefill budget of a step, building and running one step
 *   sched_calib.c  calibration as a background job of prefill-only windows
 *   sched_fork.c   n > 1 (choices forked from choice 0 after its prefill) and prompt logprobs
 *
 * Threads: fields under `mu` may be touched from any thread; the rest belong to the engine
 * thread running uc_sched_run. */
#ifndef UC_DAEMON_SCHED_INTERNAL_H
#define UC_DAEMON_SCHED_INTERNAL_H

#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/util.h"
#include "sched.h"

enum req_state {
    REQ_WAITING = 0,
    REQ_PREFILL = 1,
    REQ_DECODE = 2,
    REQ_DONE = 3,
    REQ_FORKWAIT = 4, /* a choice > 0 waiting for choice 0's prefill (sched_fork.c) */
};

/* The KV reservation of the blocks n > 1 choices share (sched_fork.c): choice 0's own worst
 * case, held until the last of the choices that hold the share ends. */
struct kv_share {
    int64_t blocks;
    int32_t refs;   /* requests pointing here; the last one frees it */
    bool active;    /* forks exist: `blocks` moved here from choice 0's reservation */
};

struct req {
    char id[UC_REQUEST_ID_MAX];
    int64_t seq_id;
    uc_event_sink sink;
    void *user;
    int32_t *prompt;
    int64_t n_prompt;
    struct uc_sampling_params sp;
    int32_t max_tokens, min_tokens, logprobs;
    bool ignore_eos;
    char **stop;        /* each stop_len[i] bytes (NUL bytes allowed), then a NUL */
    size_t *stop_len;
    int32_t n_stop;
    size_t max_stop_len;
    int32_t *stop_ids;
    int32_t n_stop_ids;
    struct uc_compress_params cp;
    int64_t deadline_ms;
    enum req_state st;
    int64_t kv_blocks;
    bool in_engine;     /* the engine holds the sequence: free it in a step */
    bool calib;         /* a calibration window (no client; sched_calib.c owns it) */
    int64_t pf_given;   /* prefill row-layers handed to the engine so far */
    int64_t pf_bytes;   /* prefill buffer bytes held (0 until its prefill starts) */
    struct uc_sampler *sampler;
    int32_t n_gen;
    int32_t pending;    /* sampled, to be fed by the next decode; -1 = none */
    struct uc_buf bytes; /* generated text bytes */
    size_t emitted;     /* bytes of `bytes` already sent as text */
    size_t checked;     /* bytes already searched for stop strings */
    bool abort_req;
    uc_status abort_status;
    double t_submit, t_admit, t_first, t_last, t_prefill_done;
    struct req *next;
    /* n > 1 and prompt logprobs (sched_fork.c) */
    int32_t choice;      /* this choice's index */
    struct req **kids;   /* choice 0: the choices not yet forked */
    int32_t n_kids;
    struct req *parent;  /* a choice not yet forked: its choice 0 */
    int64_t kv_one;      /* choice 0 once admitted: the blocks one fork reserves */
    struct kv_share *share; /* choice 0 (from submit) and its forks */
    int32_t fork_state;  /* choice 0: 1 = prefill done, fork in the next step; 2 = forked in
                            this step (it samples after it, beside its forks) */
    bool forked_now;     /* a fork created in this step: samples after it */
    bool prompt_logprobs;
};

/* An Admin.Calibrate call waiting for its calibration. */
struct ctl {
    const char *text;
    int32_t window, max_windows;
    const atomic_bool *cancel; /* set by the caller's side when its client went away, or NULL */
    uc_status rc;
    char msg[256];
    bool done;
};

/* The calibration running now: windows of the text prefilled one after another as ordinary
 * prefill work of the steps (their entropies summed by the engine), then the profile built. */
struct calib_job {
    bool active;
    bool want_default;   /* a request needs a profile: calibrate on the default text */
    struct ctl *ctl;     /* the Admin call it answers, or NULL */
    int32_t *ids;
    int64_t n_ids, off, body, windows, max_windows;
    struct req *win;     /* the window in the engine, or NULL */
    char source[256];
    uc_status last_rc;   /* of the last job that ended (UC_OK before any) */
    char last_msg[256];
};

struct uc_sched {
    struct uc_sched_params p;
    struct uc_engine *e;
    const struct uc_tokenizer *tok;
    struct metrics *metrics;
    const struct uc_model_config *cfg;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* wakes the engine thread */
    pthread_cond_t done_cv; /* wakes drain / calibrate waiters */
    pthread_mutex_t hook_mu; /* guards the round hook, held while it runs */
    void (*round_hook)(void *user);
    void *round_hook_user;
    /* under mu */
    struct req *wait_head, *wait_tail;
    int32_t n_waiting;
    int64_t waiting_tokens;
    struct req **live;      /* every request not yet DONE (ids for abort lookup) */
    int64_t n_live, cap_live;
    bool stop;
    bool draining;
    struct ctl *ctl;        /* a Calibrate call not yet taken by the engine thread */
    struct uc_compress_params dflt;
    char *profile_json;
    int32_t n_active_pub;
    int64_t reserved_pub;
    int64_t kv_used_pub;
    int64_t kv_shared_pub;
    int64_t drain_finished;
    int64_t next_id;
    /* engine thread */
    struct req **active;    /* PREFILL or DECODE, in admission order */
    int64_t n_active, cap_active;
    int64_t reserved_blocks;
    int64_t pf_bytes_used;  /* prefill buffers of the prompts being prefilled */
    int64_t *frees;
    int64_t n_frees, cap_frees;
    struct uc_step_decode *step_dec; /* this step's decodes and their requests */
    struct req **step_req;
    int64_t cap_step;
    struct uc_step_prefill *step_pf; /* this step's prefills and their requests */
    struct req **step_pf_req;
    int64_t cap_pf;
    int64_t next_seq;
    uint64_t seed_counter;
    struct calib_job calib;
    FILE *trace;            /* --step-trace: a JSON line per step */
    double trace_t0;        /* when the trace began */
    double trace_last_end;  /* when the previous step's round ended */
};

/* sched.c */
void sched_req_free(struct req *r);
bool sched_push_ptr(struct req ***v, int64_t *n, int64_t *cap, struct req *r);
void sched_drop_ptr(struct req **v, int64_t *n, const struct req *r);
bool sched_queue_free(struct uc_sched *s, int64_t seq_id);
/* Ends a request: DONE event, KV reservation released, engine sequence freed next step. */
void sched_finish(struct uc_sched *s, struct req *q, uc_status status, const char *message,
                  enum uc_finish_reason fr, const char *matched);
/* Samples the next token from the sequence's logits and applies every stop rule. */
void sched_advance(struct uc_sched *s, struct req *q);
/* Whether the next token is simply the argmax (the engine may pick it on the device). */
bool sched_plain_greedy(const struct req *q);
/* Handles aborts and deadlines of live requests. */
void sched_reap(struct uc_sched *s);
void sched_publish(struct uc_sched *s);
/* Takes q out of the waiting queue (s->mu held); nothing when it is not there. */
void sched_wait_unlink_locked(struct uc_sched *s, struct req *q);
/* Releases what a request holds for its prefill (the prefill memory of its buffers). */
void sched_prefill_release(struct uc_sched *s, struct req *q);
/* On the engine thread, from a step's end to its round's end: the events handed out meanwhile
 * (the step's results) may leave their fronts' wake-ups to the round hook (uc_sched_batching);
 * errors and aborts before the step still go out at once. */
void sched_set_batching(bool on);

/* sched_step.c */
/* One scheduling round; returns false when there was nothing to do. */
bool sched_round(struct uc_sched *s);

/* sched_fork.c */
/* Submit: the n-1 choices of a request beside q (not queued: they wait in q->kids). */
uc_status sched_fork_make_kids(struct uc_sched *s, struct req *q, int32_t n);
/* Admission: the blocks q's n choices reserve, given choice 0's need and one fork's (what a
 * fork holds beside the blocks it shares with choice 0). */
int64_t sched_fork_reserve(struct req *q, int64_t need, int64_t fork_need);
/* sched_finish: the last finishing holder of q's share releases its reservation. */
void sched_fork_release_share(struct uc_sched *s, struct req *q);
/* Sequences active or promised to admitted requests' choices (for max_running). */
int64_t sched_fork_slots(const struct uc_sched *s);
/* End of q's prefill: prompt logprobs, then (n > 1) hold q for its forks. Returns true when q
 * must not sample now (held, or finished). */
bool sched_fork_prefill_done(struct uc_sched *s, struct req *q);
/* Start of a round: the forks of every held choice 0 join the step's new sequences. */
void sched_fork_tick(struct uc_sched *s, struct uc_step_new *news, int32_t *n_new,
                     int32_t max_new);
/* After the step: held choices 0 and their new forks sample their first tokens. */
void sched_fork_after_step(struct uc_sched *s);
/* sched_finish: unlinks a waiting choice from its choice 0, or ends the waiting choices of a
 * choice 0 that ends before forking them. */
void sched_fork_on_finish(struct uc_sched *s, struct req *q, uc_status status,
                          const char *message, enum uc_finish_reason fr);

/* sched_calib.c */
/* Starts a waiting calibration, advances the running one (its next window joins the step's
 * new sequences), or finishes it. */
void sched_calib_tick(struct uc_sched *s, struct uc_step_new *news, int32_t *n_new,
                      int32_t max_new);
/* A calibration window finished its prefill: free it and move on. */
void sched_calib_window_done(struct uc_sched *s, struct req *q);
/* Ends the running calibration (and the one waiting) with an error: shutting down. */
void sched_calib_abort(struct uc_sched *s, uc_status rc, const char *msg);
char *sched_profile_json_of(struct uc_engine *e);

#endif
