/* The OpenAI-compatible HTTP front (http_openai.h). libmicrohttpd runs a thread per connection:
 * the handler reads the body, parses it (openai_api.c), submits one scheduler request per choice
 * and then either waits for them all (whole response) or hands a content reader to MHD that
 * turns events into server-sent events as they arrive (streaming). The scheduler's sink only
 * copies an event into the call's queue and signals (it runs on the engine thread and must not
 * block). Waits are timed so that a peer that hung up (poll: POLLRDHUP) is noticed while nothing
 * is being written: its requests are aborted, as gRPC does on a cancelled call. */
#include "http_openai.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>

#include "auth.h"
#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "metrics.h"
#include "openai_api.h"
#include "tokenizer.h"

#define WAIT_SLICE_MS 100

struct uc_http_openai {
    struct uc_http_openai_params p;
    struct MHD_Daemon *d;
    char *model_name;
    char *cert_pem, *key_pem;
    atomic_uint_fast64_t next_id;
    int64_t started_s;
};

/* ---- calls: one HTTP request and its choices -------------------------------------------------- */

struct ev {
    struct ev *next;
    int32_t choice;
    bool done;
    bool prompt;        /* prompt logprobs of the prompt of choices choice .. choice + n - 1 */
    char *text;
    size_t text_len;
    int32_t *ids;
    int32_t n_ids;
    struct uc_token_logprob *lps; /* (n_ids), tops point into top_ids/top_lps */
    int32_t *top_ids;
    float *top_lps;
    /* done */
    uc_status status;
    char message[256];
    enum uc_finish_reason finish;
    int64_t prompt_tokens, completion_tokens;
    bool has_report;
    struct uc_compress_report report;
    struct uc_timing timing;
};

struct call;
struct sinkref {
    struct call *c;
    int32_t idx;
};

struct call {
    struct uc_http_openai *h;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int refs;
    struct uc_oai_request req;
    char id[48];
    int64_t created;
    int32_t n_choices;
    int32_t n_submitted;    /* scheduler requests: one per prompt (n choices each) */
    int32_t n_expected;     /* DONE events they will send: n per prompt */
    int32_t per;            /* choices per scheduler request (n, or 1 beyond uc_sched_max_n) */
    struct sinkref *sinks;
    struct uc_oai_choice *choices;
    bool *role_sent;
    struct ev *head, *tail; /* under mu */
    bool lost;              /* an event could not be copied (out of memory) */
    int32_t n_done;         /* choices whose DONE was consumed (consumer side) */
    int32_t n_sched_done;   /* DONE events delivered (under mu) */
    bool aborted;
    int fd;
    /* streaming */
    struct uc_buf pending;
    size_t pending_off;
    bool stream_over;
    bool error_sent;
};

static void ev_free(struct ev *e)
{
    if (!e) {
        return;
    }
    uc_free(e->text);
    uc_free(e->ids);
    uc_free(e->lps);
    uc_free(e->top_ids);
    uc_free(e->top_lps);
    uc_free(e);
}

static struct ev *ev_copy(const struct uc_gen_event *in, int32_t choice)
{
    struct ev *e = uc_calloc(1, sizeof *e);
    if (!e) {
        return NULL;
    }
    e->choice = choice;
    e->prompt = in->kind == UC_EVENT_PROMPT;
    if (in->kind == UC_EVENT_DONE) {
        e->done = true;
        e->status = in->status;
        snprintf(e->message, sizeof e->message, "%s", in->message ? in->message : "");
        e->finish = in->finish;
        e->prompt_tokens = in->prompt_tokens;
        e->completion_tokens = in->completion_tokens;
        e->timing = in->timing;
        if (in->report) {
            e->has_report = true;
            e->report = *in->report;
            e->report.entropy_min = e->report.entropy_mean = e->report.entropy_max = NULL;
        }
        return e;
    }
    if (in->text_len) {
        e->text = uc_malloc(in->text_len);
        if (!e->text) {
            goto fail;
        }
        memcpy(e->text, in->text, in->text_len);
        e->text_len = in->text_len;
    }
    if (in->n_ids > 0) {
        e->ids = uc_malloc((size_t)in->n_ids * sizeof *e->ids);
        if (!e->ids) {
            goto fail;
        }
        memcpy(e->ids, in->ids, (size_t)in->n_ids * sizeof *e->ids);
        e->n_ids = in->n_ids;
        if (in->logprobs) {
            int64_t tops = 0;
            for (int32_t i = 0; i < in->n_ids; i++) {
                tops += in->logprobs[i].n_top;
            }
            e->lps = uc_calloc((size_t)in->n_ids, sizeof *e->lps);
            e->top_ids = uc_malloc((size_t)(tops + 1) * sizeof *e->top_ids);
            e->top_lps = uc_malloc((size_t)(tops + 1) * sizeof *e->top_lps);
            if (!e->lps || !e->top_ids || !e->top_lps) {
                goto fail;
            }
            int64_t k = 0;
            for (int32_t i = 0; i < in->n_ids; i++) {
                e->lps[i] = in->logprobs[i];
                e->lps[i].top_ids = e->top_ids + k;
                e->lps[i].top_logprobs = e->top_lps + k;
                for (int32_t j = 0; j < in->logprobs[i].n_top; j++, k++) {
                    e->top_ids[k] = in->logprobs[i].top_ids[j];
                    e->top_lps[k] = in->logprobs[i].top_logprobs[j];
                }
            }
        }
    }
    return e;
fail:
    ev_free(e);
    return NULL;
}

static void call_unref(struct call *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1) {
        return;
    }
    struct ev *e = c->head;
    while (e) {
        struct ev *n = e->next;
        ev_free(e);
        e = n;
    }
    for (int32_t i = 0; c->choices && i < c->n_choices; i++) {
        uc_oai_choice_fini(&c->choices[i]);
    }
    uc_free(c->choices);
    uc_free(c->sinks);
    uc_free(c->role_sent);
    uc_buf_fini(&c->pending);
    uc_oai_request_fini(&c->req);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    uc_free(c);
}

/* The scheduler's sink (engine thread): copy, queue, signal. */
static void sink(void *user, const struct uc_gen_event *ev)
{
    struct sinkref *s = user;
    struct call *c = s->c;
    bool done = ev->kind == UC_EVENT_DONE;
    struct ev *e = ev_copy(ev, s->idx + ev->index);
    pthread_mutex_lock(&c->mu);
    if (!e) {
        c->lost = true;
        if (done) {
            /* keep the count right even without memory for the event */
            c->n_sched_done++;
        }
    } else {
        if (c->tail) {
            c->tail->next = e;
        } else {
            c->head = e;
        }
        c->tail = e;
        if (done) {
            c->n_sched_done++;
        }
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (done) {
        call_unref(c); /* the scheduler's reference */
    }
}

static void abort_all(struct call *c, uc_status why)
{
    if (c->aborted) {
        return;
    }
    c->aborted = true;
    for (int32_t i = 0; i < c->n_submitted; i++) {
        char id[UC_REQUEST_ID_MAX];
        snprintf(id, sizeof id, "%s-%d", c->id, (int)i);
        uc_sched_abort(c->h->p.sched, id, why);
    }
}

static bool peer_gone(int fd)
{
    if (fd < 0) {
        return false;
    }
    struct pollfd pf = {.fd = fd, .events = POLLIN | POLLRDHUP};
    if (poll(&pf, 1, 0) <= 0) {
        return false;
    }
    if (pf.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) {
        return true;
    }
    if (pf.revents & POLLIN) {
        char b;
        return recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
    }
    return false;
}

/* Takes the queued events (waiting up to WAIT_SLICE_MS for one). */
static struct ev *take_events(struct call *c, bool *lost)
{
    pthread_mutex_lock(&c->mu);
    if (!c->head && !c->lost) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += WAIT_SLICE_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    struct ev *e = c->head;
    c->head = c->tail = NULL;
    *lost = c->lost;
    pthread_mutex_unlock(&c->mu);
    return e;
}

static bool all_sched_done(struct call *c)
{
    pthread_mutex_lock(&c->mu);
    bool done = c->n_sched_done >= c->n_expected;
    pthread_mutex_unlock(&c->mu);
    return done;
}

/* Applies one event to its choice (whole responses and streaming both keep the totals). */
static void apply_done(struct call *c, const struct ev *e)
{
    struct uc_oai_choice *ch = &c->choices[e->choice];
    ch->done = true;
    ch->finish = e->finish;
    ch->status = e->status;
    snprintf(ch->message, sizeof ch->message, "%s", e->message);
    ch->prompt_tokens = e->prompt_tokens;
    ch->completion_tokens = e->completion_tokens;
    ch->has_report = e->has_report;
    ch->report = e->report;
    ch->timing = e->timing;
    c->n_done++;
}

/* Prompt logprobs (echo with logprobs): they lead the logprobs of each choice of the prompt;
 * streaming sends them at once (emit). */
static void apply_prompt(struct call *c, const struct ev *e,
                         void (*emit)(struct call *c, int32_t choice, cJSON *lp))
{
    for (int32_t j = 0; j < c->per && e->choice + j < c->n_choices; j++) {
        struct uc_oai_choice *ch = &c->choices[e->choice + j];
        size_t off = 0;
        if (emit) {
            cJSON *lp = NULL;
            uc_oai_add_logprobs(&lp, c->req.kind, c->h->p.tok, e->ids, e->n_ids, e->lps,
                                (int32_t)c->req.gen.top_logprobs, &off);
            emit(c, e->choice + j, lp);
        } else {
            uc_oai_add_logprobs(&ch->logprobs, c->req.kind, c->h->p.tok, e->ids, e->n_ids,
                                e->lps, (int32_t)c->req.gen.top_logprobs, &off);
        }
        /* generated tokens' offsets continue after the echoed prompt text */
        ch->text_offset = off > ch->text_offset ? off : ch->text_offset;
    }
}

/* ---- replies ---------------------------------------------------------------------------------- */

static enum MHD_Result reply_owned(struct MHD_Connection *conn, unsigned int code,
                                   const char *ctype, char *body)
{
    if (!body) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                                  "\"server_error\",\"param\":null,\"code\":\"internal_error\"}}";
        struct MHD_Response *r = MHD_create_response_from_buffer(
            sizeof oom - 1, (void *)(uintptr_t)oom, MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, r);
        MHD_destroy_response(r);
        return ret;
    }
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_COPY);
    uc_free(body);
    if (!r) {
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result reply_error(struct MHD_Connection *conn, int code, const char *message,
                                   const char *param)
{
    struct MHD_Response *r;
    char *body = uc_oai_error_json(code, message, param);
    if (!body) {
        return reply_owned(conn, 500, "application/json", NULL);
    }
    r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_COPY);
    uc_free(body);
    if (!r) {
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (code == 401) {
        MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    }
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned int)code, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- streaming -------------------------------------------------------------------------------- */

static void pend(struct call *c, char *s)
{
    if (s) {
        uc_buf_puts(&c->pending, s);
        uc_free(s);
    } else {
        c->pending.oom = true;
    }
}

static void stream_prompt(struct call *c, int32_t choice, cJSON *lp)
{
    pend(c, uc_oai_chunk_sse(&c->req, c->id, c->created, c->h->model_name, choice, false, NULL, 0,
                             lp, UC_FINISH_NONE, NULL, 0, NULL));
}

static void stream_event(struct call *c, struct ev *e)
{
    struct uc_http_openai *h = c->h;
    struct uc_oai_choice *ch = &c->choices[e->choice];
    if (e->prompt) {
        apply_prompt(c, e, stream_prompt);
        return;
    }
    if (!e->done) {
        if (!e->text_len && !(c->req.gen.logprobs && e->n_ids)) {
            return;
        }
        cJSON *lp = NULL;
        if (c->req.gen.logprobs && e->n_ids) {
            uc_oai_add_logprobs(&lp, c->req.kind, h->p.tok, e->ids, e->n_ids, e->lps,
                                (int32_t)c->req.gen.top_logprobs, &ch->text_offset);
        }
        bool role = c->req.kind == UC_OAI_CHAT && !c->role_sent[e->choice];
        c->role_sent[e->choice] = true;
        ch->completion_tokens += e->n_ids;
        pend(c, uc_oai_chunk_sse(&c->req, c->id, c->created, h->model_name, e->choice, role,
                                 e->text, e->text_len, lp, UC_FINISH_NONE, NULL, 0, NULL));
        return;
    }
    apply_done(c, e);
    if (e->status != UC_OK && e->finish != UC_FINISH_ABORTED) {
        if (!c->error_sent) {
            char *err = uc_oai_error_json(uc_oai_http_status(e->status),
                                          e->message[0] ? e->message : uc_status_str(e->status),
                                          NULL);
            if (err) {
                uc_buf_printf(&c->pending, "data: %s\n\n", err);
                uc_free(err);
            }
            c->error_sent = true;
        }
        return;
    }
    bool role = c->req.kind == UC_OAI_CHAT && !c->role_sent[e->choice];
    c->role_sent[e->choice] = true;
    pend(c, uc_oai_chunk_sse(&c->req, c->id, c->created, h->model_name, e->choice, role, NULL, 0,
                             NULL, e->finish, NULL, 0, e->choice == 0 ? ch : NULL));
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct call *c = cls;
    (void)pos;
    for (;;) {
        if (c->pending.len > c->pending_off) {
            size_t n = c->pending.len - c->pending_off;
            if (n > max) {
                n = max;
            }
            memcpy(buf, c->pending.data + c->pending_off, n);
            c->pending_off += n;
            if (c->pending_off == c->pending.len) {
                c->pending.len = 0;
                c->pending_off = 0;
                if (c->pending.data) {
                    c->pending.data[0] = '\0';
                }
            }
            return (ssize_t)n;
        }
        if (c->stream_over) {
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        if (c->pending.oom) {
            abort_all(c, UC_ERR_CANCELLED);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        bool lost = false;
        struct ev *e = take_events(c, &lost);
        while (e) {
            struct ev *n = e->next;
            stream_event(c, e);
            ev_free(e);
            e = n;
        }
        if (lost && !c->error_sent) {
            pend(c, uc_strdup("data: {\"error\":{\"message\":\"out of memory while streaming\","
                              "\"type\":\"server_error\",\"param\":null,\"code\":"
                              "\"internal_error\"}}\n\n"));
            c->error_sent = true;
            abort_all(c, UC_ERR_CANCELLED);
        }
        if (c->n_done >= c->n_expected || (lost && all_sched_done(c))) {
            if (c->req.include_usage && !c->error_sent) {
                pend(c, uc_oai_chunk_sse(&c->req, c->id, c->created, c->h->model_name, -1,
                                         false, NULL, 0, NULL, UC_FINISH_NONE, c->choices,
                                         c->n_choices, NULL));
            }
            uc_buf_puts(&c->pending, "data: [DONE]\n\n");
            c->stream_over = true;
            continue;
        }
        if (c->pending.len == 0 && peer_gone(c->fd)) {
            UC_LOG_INFO("http: client went away mid-stream req=%s: aborting", c->id);
            abort_all(c, UC_ERR_CANCELLED);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static void stream_free(void *cls)
{
    struct call *c = cls;
    if (c->n_done < c->n_expected) {
        abort_all(c, UC_ERR_CANCELLED); /* the client closed the connection */
    }
    call_unref(c);
}

/* ---- completions ------------------------------------------------------------------------------ */

struct conn {
    struct uc_buf body;
    bool too_big;
};

static enum MHD_Result finish_whole(struct MHD_Connection *conn, struct call *c)
{
    struct uc_http_openai *h = c->h;
    for (;;) {
        bool lost = false;
        struct ev *e = take_events(c, &lost);
        while (e) {
            struct ev *n = e->next;
            struct uc_oai_choice *ch = &c->choices[e->choice];
            if (e->prompt) {
                apply_prompt(c, e, NULL);
            } else if (e->done) {
                apply_done(c, e);
            } else {
                uc_buf_append(&ch->text, e->text, e->text_len);
                if (c->req.gen.logprobs && e->n_ids) {
                    uc_oai_add_logprobs(&ch->logprobs, c->req.kind, h->p.tok, e->ids, e->n_ids,
                                        e->lps, (int32_t)c->req.gen.top_logprobs, &ch->text_offset);
                }
            }
            ev_free(e);
            e = n;
        }
        if (c->n_done >= c->n_expected || (lost && all_sched_done(c))) {
            if (lost) {
                return reply_error(conn, 500, "out of memory while collecting the response",
                                   NULL);
            }
            break;
        }
        if (!c->aborted && peer_gone(c->fd)) {
            UC_LOG_INFO("http: client went away req=%s: aborting", c->id);
            abort_all(c, UC_ERR_CANCELLED);
        }
    }
    if (c->aborted) {
        return MHD_NO; /* nobody to answer */
    }
    for (int32_t i = 0; i < c->n_choices; i++) {
        const struct uc_oai_choice *ch = &c->choices[i];
        if (ch->status != UC_OK && ch->finish != UC_FINISH_ABORTED) {
            return reply_error(conn, uc_oai_http_status(ch->status),
                               ch->message[0] ? ch->message : uc_status_str(ch->status), NULL);
        }
    }
    char *body = uc_oai_response_json(&c->req, c->id, c->created, h->model_name, c->choices,
                                      c->n_choices);
    return reply_owned(conn, MHD_HTTP_OK, "application/json", body);
}

static enum MHD_Result handle_generate(struct uc_http_openai *h, struct MHD_Connection *conn,
                                       enum uc_oai_kind kind, const struct conn *cc)
{
    int st = h->p.state ? h->p.state(h->p.state_user) : 1;
    if (st != 1) {
        metrics_request_rejected(h->p.metrics);
        return reply_error(conn, 503, st == 0 ? "the model is still loading; retry shortly"
                                              : "the server is draining and admits no new "
                                                "requests", NULL);
    }
    struct call *c = uc_calloc(1, sizeof *c);
    if (!c) {
        return reply_owned(conn, 500, "application/json", NULL);
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    atomic_init(&c->refs, 1);
    uc_buf_init(&c->pending);
    c->h = h;
    c->created = (int64_t)time(NULL);
    c->fd = -1;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci) {
        c->fd = ci->connect_fd;
    }
    snprintf(c->id, sizeof c->id, "%s-%llx%04llx", kind == UC_OAI_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)h->started_s,
             (unsigned long long)atomic_fetch_add(&h->next_id, 1));
    struct uc_oai_ctx ctx = {
        .req = {.tok = h->p.tok, .chat = h->p.chat, .vocab = h->p.vocab,
                .n_layers = h->p.n_layers},
        .model_name = h->model_name,
    };
    uc_sched_get_default_compress(h->p.sched, &ctx.req.defaults);
    char msg[512], param[64];
    int status = 400;
    uc_status rc = uc_oai_parse(&c->req, kind, cc->body.data ? cc->body.data : "", cc->body.len,
                                &ctx, &status, msg, sizeof msg, param, sizeof param);
    if (rc != UC_OK) {
        metrics_request_rejected(h->p.metrics);
        call_unref(c);
        return reply_error(conn, rc == UC_ERR_INVALID_ARG ? status : uc_oai_http_status(rc), msg,
                           param);
    }
    int32_t n_per = (int32_t)c->req.gen.n; /* choices per prompt */
    c->n_choices = c->req.gen.n_inputs * n_per;
    c->choices = uc_calloc((size_t)c->n_choices, sizeof *c->choices);
    c->sinks = uc_calloc((size_t)c->n_choices, sizeof *c->sinks);
    c->role_sent = uc_calloc((size_t)c->n_choices, sizeof *c->role_sent);
    if (!c->choices || !c->sinks || !c->role_sent) {
        call_unref(c);
        return reply_owned(conn, 500, "application/json", NULL);
    }
    for (int32_t i = 0; i < c->n_choices; i++) {
        uc_oai_choice_init(&c->choices[i], i);
        const struct uc_req_prompt *pr =
            c->req.gen.prompts && i / n_per < c->req.gen.n_prompts ? &c->req.gen.prompts[i / n_per]
                                                                   : NULL;
        if (c->req.gen.echo && pr) {
            uc_buf_append(&c->choices[i].text, pr->text, pr->text ? pr->text_len : 0);
        }
        c->sinks[i] = (struct sinkref){.c = c, .idx = i};
    }
    /* submit every choice; a refusal aborts the ones already queued */
    uc_status sub_rc = UC_OK;
    char sub_msg[512] = "";
    /* one request per prompt: its n choices fork its prefilled, compressed cache; n beyond
     * what the scheduler runs at once (max_running) falls back to one request per choice */
    int32_t per = n_per <= uc_sched_max_n(h->p.sched) ? n_per : 1;
    c->per = per;
    for (int32_t i = 0; i < c->n_choices; i += per) {
        struct uc_request r;
        uc_req_choice(&c->req.gen, i, per, &r);
        snprintf(r.request_id, sizeof r.request_id, "%s-%d", c->id, (int)c->n_submitted);
        atomic_fetch_add(&c->refs, per);
        sub_rc = uc_sched_submit(h->p.sched, &r, sink, &c->sinks[i], NULL, sub_msg,
                                 sizeof sub_msg);
        if (sub_rc != UC_OK) {
            atomic_fetch_sub(&c->refs, per);
            break;
        }
        c->n_submitted++;
        c->n_expected += per;
    }
    if (sub_rc != UC_OK) {
        abort_all(c, UC_ERR_CANCELLED);
        while (!all_sched_done(c)) { /* the queued ones end at once; their sinks hold refs */
            bool lost;
            struct ev *e = take_events(c, &lost);
            while (e) {
                struct ev *n = e->next;
                ev_free(e);
                e = n;
            }
        }
        call_unref(c);
        return reply_error(conn, uc_oai_http_status(sub_rc),
                           sub_msg[0] ? sub_msg : uc_status_str(sub_rc), NULL);
    }
    UC_LOG_DEBUG("http: %s queued req=%s choices=%d", kind == UC_OAI_CHAT ? "chat" : "completion",
                 c->id, (int)c->n_choices);
    if (!c->req.stream) {
        enum MHD_Result ret = finish_whole(conn, c);
        call_unref(c);
        return ret;
    }
    if (c->req.gen.echo) { /* the prompt leads each choice's stream */
        for (int32_t i = 0; i < c->n_choices; i++) {
            pend(c, uc_oai_chunk_sse(&c->req, c->id, c->created, h->model_name, i, false,
                                     c->choices[i].text.data, c->choices[i].text.len, NULL,
                                     UC_FINISH_NONE, NULL, 0, NULL));
        }
    }
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, c, stream_free);
    if (!resp) {
        abort_all(c, UC_ERR_CANCELLED);
        call_unref(c);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp); /* the response (and stream_free) own c's reference now */
    return ret;
}

/* ---- routing ---------------------------------------------------------------------------------- */

static bool authorized(struct uc_http_openai *h, struct MHD_Connection *conn)
{
    if (!uc_auth_enabled(h->p.auth)) {
        return true;
    }
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_AUTHORIZATION);
    const char *key = NULL;
    size_t key_len = 0;
    if (!v || !uc_auth_bearer(v, strlen(v), &key, &key_len)) {
        return uc_auth_check(h->p.auth, NULL, 0);
    }
    return uc_auth_check(h->p.auth, key, key_len);
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload_data,
                              size_t *upload_data_size, void **con_cls)
{
    struct uc_http_openai *h = cls;
    (void)version;
    struct conn *cc = *con_cls;
    if (!cc) {
        cc = uc_calloc(1, sizeof *cc);
        if (!cc) {
            return MHD_NO;
        }
        uc_buf_init(&cc->body);
        *con_cls = cc;
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!cc->too_big) {
            if (cc->body.len + *upload_data_size > (size_t)h->p.max_body_bytes) {
                cc->too_big = true;
            } else {
                uc_buf_append(&cc->body, upload_data, *upload_data_size);
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    bool get = strcmp(method, MHD_HTTP_METHOD_GET) == 0;
    bool post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
    /* strip a query string for routing */
    char path[128];
    snprintf(path, sizeof path, "%s", url);
    char *q = strchr(path, '?');
    if (q) {
        *q = '\0';
    }
    size_t pl = strlen(path);
    while (pl > 1 && path[pl - 1] == '/') {
        path[--pl] = '\0';
    }
    if (strcmp(path, "/health") == 0) {
        int st = h->p.state ? h->p.state(h->p.state_user) : 1;
        return reply_owned(conn, st == 1 ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
                           "application/json",
                           uc_strdup(st == 1 ? "{\"status\":\"ok\"}"
                                             : st == 0 ? "{\"status\":\"loading\"}"
                                                       : "{\"status\":\"draining\"}"));
    }
    bool models = strcmp(path, "/v1/models") == 0;
    bool compl = strcmp(path, "/v1/completions") == 0;
    bool chat = strcmp(path, "/v1/chat/completions") == 0;
    if (!models && !compl && !chat) {
        char m[200];
        snprintf(m, sizeof m, "no route for %.100s; try /v1/models, /v1/completions, "
                 "/v1/chat/completions or /health", path);
        return reply_error(conn, 404, m, NULL);
    }
    if (!authorized(h, conn)) {
        return reply_error(conn, 401, "a valid API key is needed: send the header "
                           "'Authorization: Bearer KEY'", NULL);
    }
    if (models) {
        if (!get) {
            return reply_error(conn, 405, "use GET for /v1/models", NULL);
        }
        return reply_owned(conn, MHD_HTTP_OK, "application/json",
                           uc_oai_models_json(h->model_name, h->started_s, h->p.max_model_len));
    }
    if (!post) {
        return reply_error(conn, 405, "use POST for completions", NULL);
    }
    if (cc->too_big) {
        char m[128];
        snprintf(m, sizeof m, "the body is over %lld bytes", (long long)h->p.max_body_bytes);
        return reply_error(conn, 413, m, NULL);
    }
    return handle_generate(h, conn, chat ? UC_OAI_CHAT : UC_OAI_COMPLETION, cc);
}

static void completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    (void)toe;
    struct conn *cc = *con_cls;
    if (cc) {
        uc_buf_fini(&cc->body);
        uc_free(cc);
        *con_cls = NULL;
    }
}

/* ---- lifecycle -------------------------------------------------------------------------------- */

uc_status uc_http_openai_create(struct uc_http_openai **out,
                                const struct uc_http_openai_params *p)
{
    *out = NULL;
    const char *colon = p->listen ? strrchr(p->listen, ':') : NULL;
    int port = colon ? atoi(colon + 1) : 0;
    if (!colon || port <= 0 || port > 65535) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "--http-listen=%s must be HOST:PORT or 0",
                       p->listen ? p->listen : "");
    }
    char host[256];
    size_t hl = (size_t)(colon - p->listen);
    if (hl >= sizeof host) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "--http-listen: host too long");
    }
    memcpy(host, p->listen, hl);
    host[hl] = '\0';
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    struct uc_http_openai *h = uc_calloc(1, sizeof *h);
    if (!h) {
        return UC_ERRF(UC_ERR_NOMEM, "http: out of memory");
    }
    h->p = *p;
    if (h->p.max_body_bytes <= 0) {
        h->p.max_body_bytes = 16 << 20;
    }
    h->model_name = uc_strdup(p->model_name ? p->model_name : "uncomp");
    h->started_s = (int64_t)time(NULL);
    atomic_init(&h->next_id, 1);
    uc_status rc = UC_OK;
    if (!h->model_name) {
        rc = UC_ERRF(UC_ERR_NOMEM, "http: out of memory");
        goto out_free;
    }
    struct sockaddr_in sa4;
    struct sockaddr_in6 sa6;
    memset(&sa4, 0, sizeof sa4);
    memset(&sa6, 0, sizeof sa6);
    sa4.sin_family = AF_INET;
    sa4.sin_port = htons((uint16_t)port);
    sa6.sin6_family = AF_INET6;
    sa6.sin6_port = htons((uint16_t)port);
    const struct sockaddr *sa = (const struct sockaddr *)&sa4;
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                         MHD_USE_POLL;
    if (!host[0] || strcmp(host, "0.0.0.0") == 0) {
        sa4.sin_addr.s_addr = htonl(INADDR_ANY);
    } else if (strcmp(host, "localhost") == 0) {
        sa4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (inet_pton(AF_INET6, host, &sa6.sin6_addr) == 1) {
        sa = (const struct sockaddr *)&sa6;
        flags |= MHD_USE_IPv6;
    } else if (inet_pton(AF_INET, host, &sa4.sin_addr) != 1) {
        rc = UC_ERRF(UC_ERR_INVALID_ARG, "--http-listen: host=%s is not an address literal",
                     host);
        goto out_free;
    }
    if (p->tls_cert && p->tls_key) {
        if (uc_file_read_all(&h->cert_pem, NULL, p->tls_cert) != UC_OK ||
            uc_file_read_all(&h->key_pem, NULL, p->tls_key) != UC_OK) {
            rc = UC_ERRF(UC_ERR_IO, "http: cannot read --tls-cert %s or --tls-key %s",
                         p->tls_cert, p->tls_key);
            goto out_free;
        }
        flags |= MHD_USE_TLS;
        h->d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, handle, h,
                                MHD_OPTION_SOCK_ADDR, sa, MHD_OPTION_CONNECTION_TIMEOUT,
                                (unsigned int)600, MHD_OPTION_CONNECTION_LIMIT,
                                (unsigned int)512, MHD_OPTION_NOTIFY_COMPLETED, completed, h,
                                MHD_OPTION_HTTPS_MEM_CERT, h->cert_pem, MHD_OPTION_HTTPS_MEM_KEY,
                                h->key_pem, MHD_OPTION_END);
    } else {
        h->d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, handle, h,
                                MHD_OPTION_SOCK_ADDR, sa, MHD_OPTION_CONNECTION_TIMEOUT,
                                (unsigned int)600, MHD_OPTION_CONNECTION_LIMIT,
                                (unsigned int)512, MHD_OPTION_NOTIFY_COMPLETED, completed, h,
                                MHD_OPTION_END);
    }
    if (!h->d) {
        rc = UC_ERRF(UC_ERR_IO, "http: cannot listen on %s (port in use?)", p->listen);
        goto out_free;
    }
    *out = h;
    return UC_OK;
out_free:
    uc_free(h->cert_pem);
    uc_free(h->key_pem);
    uc_free(h->model_name);
    uc_free(h);
    return rc;
}

void uc_http_openai_destroy(struct uc_http_openai *h)
{
    if (!h) {
        return;
    }
    MHD_stop_daemon(h->d);
    uc_free(h->cert_pem);
    uc_free(h->key_pem);
    uc_free(h->model_name);
    uc_free(h);
}
