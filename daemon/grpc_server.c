/* The gRPC server on rank 0 (gRPC C core 1.51, completion queues): the Inference, Admin and
 * grpc.health.v1.Health services of API.md, and the Prometheus endpoint (metrics_http.c). The
 * server moves bytes and runs calls: completion-queue threads, per-call state and reference
 * counts, streaming with one send in flight per call, health watch, drain and shutdown. Every
 * message is decoded, validated and encoded by grpc_codec.c (generation requests through the
 * request model both fronts share, request.h); requests go to the scheduler. The gRPC headers
 * declare `f()` prototypes, so -Wstrict-prototypes is silenced around them. */
#include <errno.h>
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
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#pragma GCC diagnostic pop

#include "admin.h"
#include "auth.h"
#include "base/log.h"
#include "base/mem.h"
#include "base/status.h"
#include "grpc_codec.h"
#include "metrics_http.h"
#include "model_config.h"
#include "request.h"
#include "sched.h"
#include "server.h"
#include "tokenizer.h"

/* ---- byte buffers ---------------------------------------------------------------------------- */

/* A unary reply: a message (NULL for an error) with a status code and, for errors, a message
 * a person can act on. */
struct unary_reply {
    grpc_byte_buffer *msg;
    grpc_status_code code;
    char detail[512];
};

/* Takes the encoded bytes over (no copy): gRPC frees them with uc_free when sent. NULL when out
 * of memory (m is then freed). */
static grpc_byte_buffer *byte_buffer_of(struct uc_grpc_msg *m)
{
    if (!m->data) {
        return NULL;
    }
    grpc_slice sl = grpc_slice_new(m->data, m->len, uc_free);
    m->data = NULL;
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

/* The request's wire bytes (a slice to unref), or false when none was sent. */
static bool payload_bytes(grpc_byte_buffer *bb, grpc_slice *out)
{
    grpc_byte_buffer_reader r;
    if (!bb || !grpc_byte_buffer_reader_init(&r, bb)) {
        return false;
    }
    *out = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    return true;
}

/* Decodes a call's request message; on failure fills r with the error to send. */
static bool payload_decode(grpc_byte_buffer *bb, enum uc_grpc_method m,
                           struct uc_grpc_request *req, struct unary_reply *r)
{
    grpc_slice sl;
    struct uc_req_error err;
    uc_status rc;
    if (payload_bytes(bb, &sl)) {
        rc = uc_grpc_request_decode(req, m, GRPC_SLICE_START_PTR(sl), GRPC_SLICE_LENGTH(sl),
                                    &err);
        grpc_slice_unref(sl);
    } else {
        rc = uc_grpc_request_decode(req, m, NULL, 0, &err);
        if (rc == UC_OK) {
            rc = err.status = UC_ERR_INVALID_ARG;
        }
        snprintf(err.message, sizeof err.message, "the request is not a valid %s message (no "
                 "message was sent)", uc_grpc_method_message(m));
    }
    if (rc != UC_OK) {
        r->msg = NULL;
        r->code = (grpc_status_code)uc_grpc_status_of(rc);
        snprintf(r->detail, sizeof r->detail, "%s", err.message);
        return false;
    }
    return true;
}

static void reply_set_error(struct unary_reply *r, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reply_set_error(struct unary_reply *r, grpc_status_code code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->detail, sizeof r->detail, fmt, ap);
    va_end(ap);
    r->code = code;
    r->msg = NULL;
}

/* A reply of encoded bytes (rc: the encoder's result), or RESOURCE_EXHAUSTED when encoding ran
 * out of memory. */
static void reply_set_msg(struct unary_reply *r, uc_status rc, struct uc_grpc_msg *m)
{
    r->msg = rc == UC_OK ? byte_buffer_of(m) : NULL;
    uc_free(m->data);
    m->data = NULL;
    if (!r->msg) {
        reply_set_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    r->code = GRPC_STATUS_OK;
    r->detail[0] = '\0';
}

/* ---- server state ---------------------------------------------------------------------------- */

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

/* Calls of a method nobody registered get UNIMPLEMENTED. */
#define M_GENERIC UC_GRPC_METHOD_COUNT

/* Generate and Chat: the same stream of a scheduler request. */
static bool is_gen(enum uc_grpc_method m) { return uc_grpc_method_streams_generation(m); }

enum tag_kind { TAG_NEW, TAG_CLOSE, TAG_SEND, TAG_SHUTDOWN };

/* --send-trace: one streamed chunk's way out (monotonic seconds, uc_time_s). */
struct send_stamp {
    double emit_first, emit_last; /* the scheduler's emission of its oldest and newest token */
    double start;                 /* handed to grpc_call_start_batch */
    int32_t tokens;
    int32_t choice;
};

struct call;
struct tag {
    struct call *c;
    enum tag_kind kind;
};

struct call {
    struct uc_server *srv;
    enum uc_grpc_method m;
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
    struct uc_grpc_event *q_head, *q_tail;
    struct send_stamp chunk;    /* --send-trace: the token chunk in flight (tokens 0: none) */
    char peer[80];              /* --send-trace: the client's address (one per connection) */
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
    void *reg[UC_GRPC_METHOD_COUNT];
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

    FILE *send_trace;           /* --send-trace (NULL: none) */
    pthread_mutex_t trace_mu;   /* one line at a time */

    /* Calls kicked by the scheduler's sinks with a step's results, handed to the pump in one go
     * when the round ends (the scheduler's round hook, flush_kicks): one wake-up a step instead
     * of one an event. */
    pthread_mutex_t defer_mu;   /* guards the three below */
    struct call *defer_head, *defer_tail;
    bool defer_on;              /* the hook is set: kicks from inside a round may wait for it */
};

static const char *const state_names[] = {"LOADING", "SERVING", "DRAINING", "STOPPED"};

const char *uc_server_state_name(enum uc_server_state s)
{
    return s >= UC_SERVER_LOADING && s <= UC_SERVER_STOPPED ? state_names[s] : "UNKNOWN";
}

static void call_free(struct call *c);
static void pump_locked(struct call *c);

static const char *method_path(const struct call *c) { return uc_grpc_method_path(c->m); }
static void arm(struct uc_server *s, enum uc_grpc_method m);

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

/* Appends the calls head..tail (linked by kick_next) to the list *first..*last. */
static void kick_append(struct call **first, struct call **last, struct call *head,
                        struct call *tail)
{
    if (*last) {
        (*last)->kick_next = head;
    } else {
        *first = head;
    }
    *last = tail;
}

/* Hands the calls head..tail to the pump and wakes it. */
static void kick_list(struct uc_server *s, struct call *head, struct call *tail)
{
    pthread_mutex_lock(&s->mu);
    kick_append(&s->kick_head, &s->kick_tail, head, tail);
    pthread_cond_signal(&s->kick_cv);
    pthread_mutex_unlock(&s->mu);
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
    c->kick_next = NULL;
    if (uc_sched_batching()) { /* a step's results: the round's end wakes the pump */
        pthread_mutex_lock(&s->defer_mu);
        bool deferred = s->defer_on;
        if (deferred) {
            kick_append(&s->defer_head, &s->defer_tail, c, c);
        }
        pthread_mutex_unlock(&s->defer_mu);
        if (deferred) {
            return;
        }
    }
    kick_list(s, c, c);
}

/* The scheduler's round hook: the round's kicks to the pump, one wake-up. */
static void flush_kicks(void *user)
{
    struct uc_server *s = user;
    pthread_mutex_lock(&s->defer_mu);
    struct call *head = s->defer_head, *tail = s->defer_tail;
    s->defer_head = s->defer_tail = NULL;
    pthread_mutex_unlock(&s->defer_mu);
    if (head) {
        kick_list(s, head, tail);
    }
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

static enum uc_grpc_health health_status(struct uc_server *s)
{
    return s->state == UC_SERVER_SERVING ? UC_GRPC_HEALTH_SERVING : UC_GRPC_HEALTH_NOT_SERVING;
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
    enum uc_grpc_health st = c->watch_unknown ? UC_GRPC_HEALTH_SERVICE_UNKNOWN : health_status(s);
    if ((int)st != c->watch_last) {
        struct uc_grpc_msg m;
        grpc_byte_buffer *bb = uc_grpc_encode_health(&m, st) == UC_OK ? byte_buffer_of(&m) : NULL;
        if (!bb) {
            start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        c->watch_last = (int)st;
        start_send(c, bb, false, GRPC_STATUS_OK, NULL);
        return;
    }
    if (stopping) {
        start_send(c, NULL, true, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
    }
}

/* References to the live calls of one method (uc_malloc'd array, *n entries). Lock order is
 * call before server, so the calls are collected under srv->mu and locked afterwards. */
static struct call **live_calls(struct uc_server *s, enum uc_grpc_method m, int64_t *n)
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
    struct call **v = live_calls(s, UC_GRPC_HEALTH_WATCH, &n);
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
    struct uc_grpc_event *it = c->q_head;
    while (it) {
        struct uc_grpc_event *n = it->next;
        uc_grpc_event_free(it);
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
    struct uc_grpc_event *it = uc_grpc_event_copy(ev);
    if (it) {
        it->t_emit = uc_time_s();
    }
    pthread_mutex_lock(&c->mu);
    if (!c->request_id[0] && ev->request_id) {
        snprintf(c->request_id, sizeof c->request_id, "%s", ev->request_id);
    }
    if (!it) {
        c->lost_event = true;
    } else if (c->cancelled || c->final_sent) {
        uc_grpc_event_free(it); /* nobody will read it */
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
    struct uc_grpc_event *first = c->q_head, *end = first;
    bool any = false;
    struct send_stamp st = {0}; /* the chunk's way out (the metric's and --send-trace's) */
    while (end && end->kind == UC_EVENT_TOKENS && end->index == first->index) {
        any = any || end->n_ids > 0 || end->text_len > 0;
        st.tokens += (int32_t)end->n_ids;
        st.emit_last = end->t_emit;
        end = end->next;
    }
    if (any) {
        st.emit_first = first->t_emit; /* the chunk's oldest token */
        st.choice = first->index;
        struct uc_grpc_msg m;
        grpc_byte_buffer *bb =
            uc_grpc_encode_chunk(&m, c->request_id, first, end, first->index) == UC_OK
                ? byte_buffer_of(&m)
                : NULL;
        while (c->q_head != end) {
            struct uc_grpc_event *n = c->q_head->next;
            uc_grpc_event_free(c->q_head);
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
        if (c->srv->send_trace) {
            st.start = uc_time_s();
            c->chunk = st; /* before start_send: the completion may come before it returns */
        }
        if (start_send(c, bb, false, GRPC_STATUS_OK, NULL) && c->srv->p.metrics) {
            metrics_observe(c->srv->p.metrics, METRIC_SEND_LAG, uc_time_s() - st.emit_first);
        }
        return;
    }
    /* drop empty token events */
    while (c->q_head && c->q_head->kind == UC_EVENT_TOKENS) {
        struct uc_grpc_event *n = c->q_head->next;
        uc_grpc_event_free(c->q_head);
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
    struct uc_grpc_event *d = c->q_head;
    c->q_head = d->next;
    if (!c->q_head) {
        c->q_tail = NULL;
    }
    if (c->lost_event) {
        UC_LOG_ERROR("grpc: out of memory queueing an event req=%s", c->request_id);
        uc_grpc_event_free(d);
        start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED,
                   "out of memory while streaming the response");
        return;
    }
    grpc_status_code code = (grpc_status_code)uc_grpc_status_of(d->status);
    /* the Complete goes out when the request ran to an end or was aborted; a request that
     * failed outright gets only the error status */
    bool with_complete = d->status == UC_OK || d->finish == UC_FINISH_ABORTED;
    struct uc_grpc_msg m;
    grpc_byte_buffer *bb = with_complete && uc_grpc_encode_complete(&m, c->request_id, d) == UC_OK
                               ? byte_buffer_of(&m)
                               : NULL;
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
        uc_grpc_event_free(d);
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
        code = (grpc_status_code)uc_grpc_status_of(c->first_err);
        snprintf(detail, sizeof detail, "%s", c->first_err_msg);
    }
    if (code == GRPC_STATUS_INTERNAL) {
        UC_LOG_ERROR("grpc: Generate failed req=%s status=%s: %s", c->request_id,
                     uc_status_str(d->status), detail);
    }
    uc_grpc_event_free(d);
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

/* What validating a request needs from the server now: its tokenizer, chat template, model
 * shape and current default compression. */
static void req_ctx(struct uc_server *s, struct uc_req_ctx *ctx)
{
    memset(ctx, 0, sizeof *ctx);
    ctx->tok = s->p.tok;
    ctx->chat = s->p.chat;
    ctx->defaults = uc_compress_default_params();
    if (s->p.engine) {
        const struct uc_model_config *cfg = uc_engine_config(s->p.engine);
        ctx->vocab = cfg->vocab;
        ctx->n_layers = cfg->n_layers;
    }
    if (s->p.sched) {
        uc_sched_get_default_compress(s->p.sched, &ctx->defaults);
    }
}

/* Generate and Chat: the request validated by the model both fronts share (request.h; Chat's
 * messages rendered by the chat template as HTTP chat renders them), then one scheduler request
 * with its n choices, whose events the sink streams. */
static void handle_generation(struct call *c, struct uc_grpc_request *req)
{
    struct uc_server *s = c->srv;
    enum uc_server_state st = (enum uc_server_state)s->state;
    if (!s->p.sched || !s->p.tok || !s->p.engine) {
        reply_error(c, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        return;
    }
    if (c->m == UC_GRPC_CHAT && !s->p.chat) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, GRPC_STATUS_FAILED_PRECONDITION,
                    "the model has no chat template: start uncompd with --chat-template FILE");
        return;
    }
    if (st != UC_SERVER_SERVING) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, GRPC_STATUS_UNAVAILABLE, "%s",
                    st == UC_SERVER_LOADING ? "the model is still loading; retry shortly"
                                            : "the server is draining and admits no new requests");
        return;
    }
    struct uc_req_ctx ctx;
    req_ctx(s, &ctx);
    struct uc_req_error err;
    uc_status rc = uc_grpc_request_validate(req, &ctx, &err);
    if (rc != UC_OK) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, (grpc_status_code)uc_grpc_status_of(rc), "%s", err.message);
        return;
    }
    struct uc_request q;
    uc_req_choice(&req->gen, 0, (int32_t)req->gen.n, &q);
    bool expired = false;
    q.deadline_ms = deadline_ms_of(c->deadline, &expired);
    if (expired) {
        metrics_request_rejected(s->p.metrics);
        reply_error(c, GRPC_STATUS_DEADLINE_EXCEEDED, "the deadline passed before the request "
                                                      "was queued");
        return;
    }
    int32_t n_choices = q.n > 1 ? q.n : 1;
    pthread_mutex_lock(&c->mu);
    c->deadline_ms = q.deadline_ms;
    c->n_choices = n_choices;
    snprintf(c->request_id, sizeof c->request_id, "%s", q.request_id);
    pthread_mutex_unlock(&c->mu);
    if (s->send_trace) {
        char *peer = grpc_call_get_peer(c->call);
        snprintf(c->peer, sizeof c->peer, "%s", peer ? peer : "");
        gpr_free(peer);
    }
    for (int32_t i = 0; i < n_choices; i++) {
        call_ref(c); /* the scheduler's, until each choice's DONE */
    }
    char id[UC_REQUEST_ID_MAX] = "";
    char msg[512] = "";
    rc = uc_sched_submit(s->p.sched, &q, gen_sink, c, id, msg, sizeof msg);
    if (rc != UC_OK) {
        atomic_fetch_sub(&c->refs, n_choices); /* the sink will never run; dispatch keeps c
                                                  alive */
        grpc_status_code code = (grpc_status_code)uc_grpc_status_of(rc);
        if (code == GRPC_STATUS_INTERNAL) {
            UC_LOG_ERROR("grpc: Generate submit failed req=%s: %s", q.request_id, msg);
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
    UC_LOG_DEBUG("grpc: %s queued req=%s", c->m == UC_GRPC_CHAT ? "Chat" : "Generate", id);
    if (cancel_now) {
        uc_sched_abort(s->p.sched, id,
                       dl > 0 && uc_time_ms() >= dl - 50 ? UC_ERR_TIMEOUT : UC_ERR_CANCELLED);
    }
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
    struct call *c;                 /* NULL for uc_server_drain */
    struct uc_grpc_request *req;    /* the call's validated request (owned) */
};

/* The active CompressionProfile (GetCompressionProfile, and Calibrate's answer). */
static void reply_set_profile(struct unary_reply *r, const struct uc_admin_src *src)
{
    struct uc_grpc_msg m;
    char msg[256];
    uc_status rc = uc_grpc_encode_profile(&m, src, msg, sizeof msg);
    if (rc == UC_ERR_UNAVAILABLE) {
        reply_set_error(r, GRPC_STATUS_UNAVAILABLE, "%s", msg);
    } else if (rc == UC_ERR_FORMAT) {
        UC_LOG_ERROR("grpc: %s", msg);
        reply_set_error(r, GRPC_STATUS_INTERNAL, "%s", msg);
    } else {
        reply_set_msg(r, rc, &m);
    }
}

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
    struct uc_grpc_request *req = w->req;
    uc_free(w);
    bool notify = false;
    if (!c) {
        int32_t f, ab;
        notify = run_drain(s, s->p.drain_timeout_ms, &f, &ab);
    } else if (c->m == UC_GRPC_DRAIN) {
        int64_t t = req->drain_timeout_ms ? req->drain_timeout_ms : s->p.drain_timeout_ms;
        int32_t f, ab;
        notify = run_drain(s, t, &f, &ab);
        struct unary_reply r = {0};
        struct uc_grpc_msg m;
        reply_set_msg(&r, uc_grpc_encode_drain(&m, f, ab), &m);
        reply(c, &r);
    } else if (c->m == UC_GRPC_CALIBRATE) {
        /* `calib_cancel` turns true when the client goes away (on_close): the calibration
         * then ends */
        struct unary_reply r = {0};
        const char *text = req->calibrate.text && req->calibrate.text[0] ? req->calibrate.text
                                                                         : NULL;
        char msg[256] = "";
        uc_status rc = uc_sched_calibrate(s->p.sched, text, (int32_t)req->calibrate.window_tokens,
                                          (int32_t)req->calibrate.max_windows, &c->calib_cancel,
                                          msg, sizeof msg);
        if (rc != UC_OK) {
            reply_set_error(&r, (grpc_status_code)uc_grpc_status_of(rc), "calibration failed: %s",
                            msg[0] ? msg : uc_status_str(rc));
        } else {
            struct uc_admin_src src;
            uint64_t codes[UC_ADMIN_N_CODES];
            admin_src(s, &src, codes);
            reply_set_profile(&r, &src);
        }
        reply(c, &r);
    }
    uc_grpc_request_fini(req);
    uc_free(req);
    worker_exit(s, c, notify);
    return NULL;
}

/* Runs a blocking operation on its own detached thread, which takes req over; false (and
 * nothing started, req still the caller's) when the thread cannot be created. */
static bool spawn_worker(struct uc_server *s, struct call *c, struct uc_grpc_request *req)
{
    struct worker *w = uc_calloc(1, sizeof *w);
    if (!w) {
        return false;
    }
    w->s = s;
    w->c = c;
    w->req = req;
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
    if (!uc_auth_enabled(auth) || c->m == UC_GRPC_HEALTH_CHECK || c->m == UC_GRPC_HEALTH_WATCH) {
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
    bool admin = c->m == UC_GRPC_SET_POLICY || c->m == UC_GRPC_CALIBRATE || c->m == UC_GRPC_DRAIN;
    return admin ? uc_auth_check_admin(auth, key, key_len) : uc_auth_check(auth, key, key_len);
}

/* Tokenize and Detokenize, validated (r->tokenize.ids, r->detokenize.ids). */
static void do_tokenize(struct unary_reply *r, struct uc_server *s, struct uc_grpc_request *req)
{
    struct uc_grpc_msg m;
    if (req->method == UC_GRPC_TOKENIZE) {
        reply_set_msg(r, uc_grpc_encode_tokenize(&m, s->p.tok, req->tokenize.ids,
                                                 req->tokenize.n_ids), &m);
        return;
    }
    char *text = NULL;
    size_t len = 0;
    uc_status rc = uc_tokenizer_decode(s->p.tok, req->detokenize.ids, (int64_t)req->detokenize.n,
                                       req->detokenize.skip_special_tokens, &text, &len);
    if (rc != UC_OK) {
        reply_set_error(r, rc == UC_ERR_INVALID_ARG ? GRPC_STATUS_INVALID_ARGUMENT
                                                    : (grpc_status_code)uc_grpc_status_of(rc),
                        "token_ids: decode failed: %s", uc_status_str(rc));
        return;
    }
    reply_set_msg(r, uc_grpc_encode_detokenize(&m, text, len), &m);
    uc_free(text);
}

/* SetCompressionPolicy, validated onto the current default (req->set_policy.params). */
static void do_set_policy(struct unary_reply *r, struct uc_server *s,
                          const struct uc_grpc_request *req)
{
    char msg[256] = "";
    uc_status rc = uc_sched_set_default_compress(s->p.sched, &req->set_policy.params, msg,
                                                 sizeof msg);
    if (rc != UC_OK) {
        reply_set_error(r, (grpc_status_code)uc_grpc_status_of(rc), "%s",
                        msg[0] ? msg : uc_status_str(rc));
        return;
    }
    struct uc_compress_params cp;
    uc_sched_get_default_compress(s->p.sched, &cp);
    UC_LOG_NOTICE("grpc: default compression set policy=%s kv_budget=%d decode_mode=%s "
                  "grouping=%s", uc_policy_name(cp.policy), cp.kv_budget,
                  uc_decode_mode_name(cp.decode_mode), uc_grouping_name(cp.grouping));
    struct uc_grpc_msg m;
    reply_set_msg(r, uc_grpc_encode_set_policy(&m, &cp), &m);
}

/* Decodes and validates the request (grpc_codec.h), then answers it: unary calls here,
 * Generate and Chat through the scheduler, Calibrate and Drain on a worker thread. */
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
                    c->m == UC_GRPC_SET_POLICY || c->m == UC_GRPC_CALIBRATE || c->m == UC_GRPC_DRAIN
                        ? " (the admin key for this call)" : "");
        return;
    }
    struct unary_reply r = {0};
    struct uc_grpc_request *req = uc_calloc(1, sizeof *req);
    if (!req) {
        reply_error(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    if (!payload_decode(c->payload, c->m, req, &r)) {
        if (is_gen(c->m) && r.code == GRPC_STATUS_INVALID_ARGUMENT) {
            metrics_request_rejected(s->p.metrics);
        }
        reply(c, &r);
        goto out;
    }
    if (is_gen(c->m)) {
        handle_generation(c, req);
        goto out;
    }
    bool loaded = s->p.sched && s->p.engine;
    bool needs_model = c->m == UC_GRPC_SET_POLICY || c->m == UC_GRPC_CALIBRATE;
    if (needs_model && !loaded) {
        reply_error(c, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        goto out;
    }
    struct uc_req_ctx ctx;
    req_ctx(s, &ctx);
    struct uc_req_error err;
    uc_status rc = uc_grpc_request_validate(req, &ctx, &err);
    if (rc != UC_OK) {
        reply_error(c, (grpc_status_code)uc_grpc_status_of(rc), "%s", err.message);
        goto out;
    }
    struct uc_admin_src src;
    uint64_t codes[UC_ADMIN_N_CODES];
    admin_src(s, &src, codes);
    struct uc_grpc_msg m;
    bool replied = false;
    switch (c->m) {
    case UC_GRPC_TOKENIZE:
    case UC_GRPC_DETOKENIZE:
        do_tokenize(&r, s, req);
        break;
    case UC_GRPC_ABORT:
        if (!s->p.sched) {
            reply_set_error(&r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        } else {
            bool found = uc_sched_abort(s->p.sched, req->request_id, UC_OK);
            UC_LOG_INFO("grpc: Abort req=%s found=%d", req->request_id, (int)found);
            reply_set_msg(&r, uc_grpc_encode_abort(&m, found), &m);
        }
        break;
    case UC_GRPC_SERVER_INFO:
        reply_set_msg(&r, uc_grpc_encode_server_info(&m, &src), &m);
        break;
    case UC_GRPC_MODEL_INFO:
        rc = uc_grpc_encode_model_info(&m, &src);
        if (rc == UC_ERR_UNAVAILABLE) {
            reply_set_error(&r, GRPC_STATUS_UNAVAILABLE, "the model is not loaded yet");
        } else {
            reply_set_msg(&r, rc, &m);
        }
        break;
    case UC_GRPC_STATS:
        reply_set_msg(&r, uc_grpc_encode_stats(&m, &src, req->section), &m);
        break;
    case UC_GRPC_PROFILE:
        reply_set_profile(&r, &src);
        break;
    case UC_GRPC_SET_POLICY:
        do_set_policy(&r, s, req);
        break;
    case UC_GRPC_CALIBRATE:
    case UC_GRPC_DRAIN:
        if (!spawn_worker(s, c, req)) {
            reply_set_error(&r, GRPC_STATUS_RESOURCE_EXHAUSTED, "cannot start a worker thread");
        } else {
            req = NULL; /* the worker's now */
            replied = true;
        }
        break;
    case UC_GRPC_HEALTH_CHECK:
        if (!req->health.known) {
            reply_set_error(&r, GRPC_STATUS_NOT_FOUND, "unknown service %.128s",
                            req->health.service ? req->health.service : "");
        } else {
            reply_set_msg(&r, uc_grpc_encode_health(&m, health_status(s)), &m);
        }
        break;
    case UC_GRPC_HEALTH_WATCH:
        pthread_mutex_lock(&c->mu);
        c->watch_unknown = !req->health.known;
        c->watch_last = -1;
        c->watch_ready = true;
        watch_pump(c);
        pthread_mutex_unlock(&c->mu);
        replied = true;
        break;
    case UC_GRPC_GENERATE:
    case UC_GRPC_CHAT:
    case UC_GRPC_METHOD_COUNT:
        break;
    }
    if (!replied) {
        reply(c, &r);
    }
out:
    uc_grpc_request_fini(req);
    uc_free(req);
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
static void arm(struct uc_server *s, enum uc_grpc_method m)
{
    struct call *c = uc_calloc(1, sizeof *c);
    if (!c) {
        UC_LOG_ERROR("grpc: out of memory: %s stops accepting calls",
                     m < UC_GRPC_METHOD_COUNT ? uc_grpc_method_path(m) : "unregistered methods");
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
        calib = c->m == UC_GRPC_CALIBRATE;
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

/* A JSON string's characters: request ids are printable ASCII without spaces (request.c) and
 * peers are addresses, so only '"' and '\\' need escaping. */
static void trace_json_chars(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') {
            fputc('\\', f);
        }
        fputc(*s, f);
    }
}

/* --send-trace: the line of a token chunk whose send completed (c->mu held). The file is
 * flushed when a stream's last send completes (trace_flush), not once per chunk: at 256 streams
 * that would be thousands of writes a second on the threads being measured. */
static void trace_send(struct call *c, double t_done, bool ok)
{
    struct uc_server *s = c->srv;
    const struct send_stamp *st = &c->chunk;
    pthread_mutex_lock(&s->trace_mu);
    fputs("{\"req\":\"", s->send_trace);
    trace_json_chars(s->send_trace, c->request_id);
    fputs("\",\"peer\":\"", s->send_trace);
    trace_json_chars(s->send_trace, c->peer);
    fprintf(s->send_trace,
            "\",\"choice\":%d,\"tokens\":%d,\"emit_first\":%.6f,\"emit_last\":%.6f,"
            "\"start\":%.6f,\"done\":%.6f,\"ok\":%s}\n",
            st->choice, st->tokens, st->emit_first, st->emit_last, st->start, t_done,
            ok ? "true" : "false");
    pthread_mutex_unlock(&s->trace_mu);
}

static void trace_flush(struct uc_server *s)
{
    pthread_mutex_lock(&s->trace_mu);
    fflush(s->send_trace);
    pthread_mutex_unlock(&s->trace_mu);
}

static void on_send(struct call *c, bool ok)
{
    double t_done = c->srv->send_trace ? uc_time_s() : 0.0;
    pthread_mutex_lock(&c->mu);
    if (c->chunk.tokens > 0) {
        trace_send(c, t_done, ok);
        c->chunk.tokens = 0;
    }
    if (c->final_sent && c->srv->send_trace) {
        trace_flush(c->srv); /* the stream's last send: its lines reach the file */
    }
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
    } else if (c->m == UC_GRPC_HEALTH_WATCH) {
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
    if (s->send_trace) {
        fclose(s->send_trace);
    }
    pthread_cond_destroy(&s->kick_cv);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->trace_mu);
    pthread_mutex_destroy(&s->defer_mu);
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
    pthread_mutex_init(&s->trace_mu, NULL);
    pthread_mutex_init(&s->defer_mu, NULL);
    pthread_cond_init(&s->kick_cv, NULL);
    pthread_cond_init(&s->cv, NULL);
    grpc_init();
    if (!s->listen) {
        rc = UC_ERRF(UC_ERR_NOMEM, "server");
        goto out_teardown;
    }
    if (p->send_trace_path && p->send_trace_path[0]) {
        s->send_trace = fopen(p->send_trace_path, "w");
        if (!s->send_trace) {
            rc = UC_ERRF(UC_ERR_IO, "--send-trace %s: %s", p->send_trace_path, strerror(errno));
            goto out_teardown;
        }
        /* the CQ threads write it while they hold a call's lock: a write(2) per 1 MiB of lines
         * and at streams' ends (trace_flush) instead of one per 4 KiB */
        setvbuf(s->send_trace, NULL, _IOFBF, 1 << 20);
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
    for (int m = 0; m < UC_GRPC_METHOD_COUNT; m++) {
        s->reg[m] = grpc_server_register_method(s->server, uc_grpc_method_path(m), NULL,
                                                GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        if (!s->reg[m]) {
            rc = UC_ERRF(UC_ERR_INTERNAL, "grpc: cannot register %s", uc_grpc_method_path(m));
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
    for (int m = 0; m < UC_GRPC_METHOD_COUNT; m++) {
        arm(s, (enum uc_grpc_method)m);
    }
    arm(s, M_GENERIC);
    if (p->sched) { /* the scheduler's sinks leave their wake-ups to the round's end */
        s->defer_on = true;
        uc_sched_set_round_hook(p->sched, flush_kicks, s);
    }
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
    if (!spawn_worker(s, NULL, NULL)) {
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
    /* the round hook off, then what it left: from here every kick wakes the pump itself */
    if (s->p.sched) {
        uc_sched_set_round_hook(s->p.sched, NULL, NULL);
    }
    pthread_mutex_lock(&s->defer_mu);
    s->defer_on = false;
    pthread_mutex_unlock(&s->defer_mu);
    flush_kicks(s);
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    pthread_mutex_unlock(&s->mu);
    s->state = UC_SERVER_STOPPED;
    kick_watchers(s);
    /* requests still in the scheduler end now (a stopped scheduler has already ended them) */
    int64_t n;
    struct call **v = live_calls(s, UC_GRPC_GENERATE, &n);
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
