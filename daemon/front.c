/* Shared serving setup (front.h). */
#include "front.h"

#include <stdio.h>
#include <string.h>

#include "auth.h"
#include "base/log.h"
#include "base/mem.h"
#include "chat_template.h"
#ifdef UC_HAVE_GRPC
#include "http_openai.h"
#endif

#define DEFAULT_HTTP_LISTEN "127.0.0.1:8000"

struct uc_front {
    struct uc_auth *auth;
    struct uc_chat_template *chat;
    char model_name[256];
#ifdef UC_HAVE_GRPC
    struct uc_http_openai *http;
#endif
};

bool uc_front_is_loopback(const char *hp)
{
    char host[256];
    const char *colon = strrchr(hp, ':');
    size_t n = colon ? (size_t)(colon - hp) : strlen(hp);
    if (n >= sizeof host) {
        return false;
    }
    memcpy(host, hp, n);
    host[n] = '\0';
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        memmove(host, host + 1, n - 2);
        host[n - 2] = '\0';
    }
    return strncmp(host, "127.", 4) == 0 || strcmp(host, "localhost") == 0 ||
           strcmp(host, "::1") == 0;
}

uc_status uc_front_create(struct uc_front **out, const struct uc_config *c, const char *model_dir,
                          char *msg, size_t msg_size)
{
    *out = NULL;
    struct uc_front *f = uc_calloc(1, sizeof *f);
    if (!f) {
        snprintf(msg, msg_size, "out of memory");
        return UC_ERR_NOMEM;
    }
    uc_status rc = uc_auth_create(&f->auth, c->api_key, c->api_key_file, c->admin_api_key, msg,
                                  msg_size);
    if (rc != UC_OK) {
        goto out_fail;
    }
    bool tls = c->tls_cert[0] && c->tls_key[0];
    bool http_on = strcmp(c->http_listen, "0") != 0 && c->http_listen[0];
    const char *remote = !uc_front_is_loopback(c->listen)                ? c->listen
                         : http_on && !uc_front_is_loopback(c->http_listen) ? c->http_listen
                                                                            : NULL;
    if (remote && (!tls || !uc_auth_enabled(f->auth))) {
        snprintf(msg, msg_size, "listening on %s (beyond loopback) needs TLS (--tls-cert and "
                 "--tls-key) and an API key (--api-key or --api-key-file); without them bind to "
                 "127.0.0.1, or put a TLS proxy in front", remote);
        rc = UC_ERR_INVALID_ARG;
        goto out_fail;
    }
    char why[512];
    rc = uc_chat_template_load(&f->chat, model_dir, c->chat_template, why, sizeof why);
    if (rc != UC_OK) {
        snprintf(msg, msg_size, "%s", why);
        goto out_fail;
    }
    if (c->served_model_name[0]) {
        snprintf(f->model_name, sizeof f->model_name, "%s", c->served_model_name);
    } else {
        size_t n = strlen(model_dir);
        while (n > 1 && model_dir[n - 1] == '/') {
            n--;
        }
        size_t b = n;
        while (b > 0 && model_dir[b - 1] != '/') {
            b--;
        }
        snprintf(f->model_name, sizeof f->model_name, "%.*s", (int)(n - b), model_dir + b);
    }
    if (f->chat) {
        UC_LOG_INFO("front: chat template from %s", uc_chat_template_origin(f->chat));
    }
    *out = f;
    return UC_OK;
out_fail:
    uc_front_destroy(f);
    return rc;
}

uc_status uc_front_start_http(struct uc_front *f, const struct uc_config *c,
                              struct uc_sched *sched, const struct uc_tokenizer *tok,
                              struct metrics *metrics, int64_t vocab, int64_t n_layers,
                              int64_t max_model_len, int (*state)(void *), void *state_user)
{
#ifdef UC_HAVE_GRPC
    if (!c->http_listen[0] || strcmp(c->http_listen, "0") == 0) {
        return UC_OK;
    }
    struct uc_http_openai_params hp = {
        .listen = c->http_listen,
        .tls_cert = c->tls_cert[0] ? c->tls_cert : NULL,
        .tls_key = c->tls_key[0] ? c->tls_key : NULL,
        .sched = sched,
        .tok = tok,
        .chat = f->chat,
        .auth = f->auth,
        .metrics = metrics,
        .model_name = f->model_name,
        .vocab = vocab,
        .n_layers = n_layers,
        .max_model_len = max_model_len,
        .max_body_bytes = c->max_message_bytes,
        .state = state,
        .state_user = state_user,
    };
    uc_status rc = uc_http_openai_create(&f->http, &hp);
    if (rc == UC_ERR_IO && strcmp(c->http_listen, DEFAULT_HTTP_LISTEN) == 0) {
        UC_LOG_WARN("front: the OpenAI HTTP front is off: %s is busy (set --http-listen to "
                    "another address, or 0)", c->http_listen);
        return UC_OK;
    }
    if (rc == UC_OK) {
        UC_LOG_NOTICE("front: OpenAI-compatible HTTP on %s%s (model \"%s\"%s)", c->http_listen,
                      hp.tls_cert ? " with TLS" : "", f->model_name,
                      uc_auth_enabled(f->auth) ? ", API key required" : "");
    }
    return rc;
#else
    (void)f, (void)c, (void)sched, (void)tok, (void)metrics, (void)vocab, (void)n_layers;
    (void)max_model_len, (void)state, (void)state_user;
    return UC_OK;
#endif
}

void uc_front_destroy(struct uc_front *f)
{
    if (!f) {
        return;
    }
#ifdef UC_HAVE_GRPC
    uc_http_openai_destroy(f->http);
#endif
    uc_chat_template_destroy(f->chat);
    uc_auth_destroy(f->auth);
    uc_free(f);
}

const struct uc_auth *uc_front_auth(const struct uc_front *f) { return f ? f->auth : NULL; }
const struct uc_chat_template *uc_front_chat(const struct uc_front *f)
{
    return f ? f->chat : NULL;
}

const char *uc_front_model_name(const struct uc_front *f)
{
    return f ? f->model_name : "";
}
