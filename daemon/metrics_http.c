/* GET /metrics over HTTP with libmicrohttpd: one internal polling thread answers scrapes with
 * the text a render callback produces (Prometheus text format 0.0.4). Nothing else is served.
 * Bound with SO_REUSEADDR only (MHD's default), so a second daemon on the same port fails. */
#include "metrics_http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "base/log.h"
#include "base/mem.h"

/* A scraper needs one or two connections: idle ones (opened and left, or a request that stopped
 * arriving) are closed after HTTP_IDLE_TIMEOUT_S, and the limit is far above what scrapers use,
 * so idle connections cannot hold the port (issue 17: 64 idle connections used to). */
#define HTTP_IDLE_TIMEOUT_S 5
#define HTTP_MAX_CONNECTIONS 512

struct metrics_http {
    struct MHD_Daemon *d;
    metrics_http_render_fn render;
    void *user;
};

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned int code, const char *ctype,
                             const char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)(uintptr_t)body, MHD_RESPMEM_MUST_COPY);
    if (!r) {
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload_data,
                              size_t *upload_data_size, void **con_cls)
{
    struct metrics_http *h = cls;
    static const char text[] = "text/plain; charset=utf-8";
    bool get = strcmp(method, MHD_HTTP_METHOD_GET) == 0;
    bool head = strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    if (!get && !head) {
        /* drain any upload first (MHD calls again with the body), then refuse */
        if (*upload_data_size != 0) {
            *upload_data_size = 0;
            return MHD_YES;
        }
        static const char msg[] = "method not allowed\n";
        return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, text, msg, sizeof msg - 1);
    }
    if (strcmp(url, "/metrics") != 0) {
        static const char msg[] = "not found: try /metrics\n";
        return reply(conn, MHD_HTTP_NOT_FOUND, text, msg, sizeof msg - 1);
    }
    struct uc_buf b;
    uc_buf_init(&b);
    h->render(h->user, &b);
    enum MHD_Result ret;
    if (b.oom) {
        static const char msg[] = "out of memory\n";
        ret = reply(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, text, msg, sizeof msg - 1);
    } else {
        ret = reply(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8",
                    b.data ? b.data : "", b.len);
    }
    uc_buf_fini(&b);
    return ret;
}

uc_status metrics_http_create(struct metrics_http **out, const char *host, int port,
                              metrics_http_render_fn render, void *user)
{
    *out = NULL;
    if (port <= 0 || port > 65535) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "metrics port=%d must be in [1, 65535]", port);
    }
    struct metrics_http *h = uc_calloc(1, sizeof *h);
    if (!h) {
        return UC_ERRF(UC_ERR_NOMEM, "metrics http: out of memory");
    }
    h->render = render;
    h->user = user;

    struct sockaddr_in sa4;
    struct sockaddr_in6 sa6;
    memset(&sa4, 0, sizeof sa4);
    memset(&sa6, 0, sizeof sa6);
    sa4.sin_family = AF_INET;
    sa4.sin_port = htons((uint16_t)port);
    sa4.sin_addr.s_addr = htonl(INADDR_ANY);
    sa6.sin6_family = AF_INET6;
    sa6.sin6_port = htons((uint16_t)port);
    const struct sockaddr *sa = (const struct sockaddr *)&sa4;
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL;
    if (host && strcmp(host, "localhost") == 0) {
        sa4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (host && host[0] && inet_pton(AF_INET6, host, &sa6.sin6_addr) == 1) {
        sa = (const struct sockaddr *)&sa6;
        flags |= MHD_USE_IPv6;
    } else if (host && host[0] && inet_pton(AF_INET, host, &sa4.sin_addr) != 1) {
        UC_LOG_WARN("metrics http: host=%s is not an address literal; listening on 0.0.0.0",
                    host);
        sa4.sin_addr.s_addr = htonl(INADDR_ANY);
    }
    h->d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, handle, h, MHD_OPTION_SOCK_ADDR,
                            sa, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)HTTP_IDLE_TIMEOUT_S,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned int)HTTP_MAX_CONNECTIONS,
                            MHD_OPTION_END);
    if (!h->d) {
        uc_free(h);
        return UC_ERRF(UC_ERR_IO, "metrics http: cannot listen on %s:%d (port in use?)",
                       host && host[0] ? host : "0.0.0.0", port);
    }
    *out = h;
    return UC_OK;
}

void metrics_http_destroy(struct metrics_http *h)
{
    if (!h) {
        return;
    }
    MHD_stop_daemon(h->d);
    uc_free(h);
}
