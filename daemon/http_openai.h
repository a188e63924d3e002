/* The OpenAI-compatible HTTP front (libmicrohttpd, a thread per connection): GET /v1/models,
 * POST /v1/completions and /v1/chat/completions (whole JSON or server-sent events), GET /health.
 * Requests are parsed by openai_api.c and go to the same scheduler as gRPC; a client that goes
 * away aborts its requests. API keys (auth.h) are checked from "Authorization: Bearer KEY". */
#ifndef UC_DAEMON_HTTP_OPENAI_H
#define UC_DAEMON_HTTP_OPENAI_H

#include <stdint.h>

#include "base/status.h"
#include "sched.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_http_openai;
struct uc_chat_template;
struct uc_auth;
struct metrics;

struct uc_http_openai_params {
    const char *listen;                  /* HOST:PORT */
    const char *tls_cert, *tls_key;      /* PEM files; both NULL = plain HTTP */
    struct uc_sched *sched;
    const struct uc_tokenizer *tok;
    const struct uc_chat_template *chat; /* NULL: /v1/chat/completions answers 400 */
    const struct uc_auth *auth;          /* NULL: open */
    struct metrics *metrics;             /* may be NULL */
    const char *model_name;
    int64_t vocab, n_layers, max_model_len;
    int64_t max_body_bytes;
    /* 0 loading, 1 serving, 2 draining or stopped; NULL = always serving */
    int (*state)(void *user);
    void *state_user;
};

/* Binds and starts serving. Everything in p is borrowed until destroy. A port that cannot be
 * bound is UC_ERR_IO naming the address. */
uc_status uc_http_openai_create(struct uc_http_openai **out,
                                const struct uc_http_openai_params *p);
/* Stops listening and joins the connection threads: call after the scheduler has ended every
 * request (uc_sched_run returned), so no connection waits forever. NULL is fine. */
void uc_http_openai_destroy(struct uc_http_openai *h);

#ifdef __cplusplus
}
#endif
#endif
