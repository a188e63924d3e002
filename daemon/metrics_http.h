/* The Prometheus endpoint: GET /metrics over HTTP (libmicrohttpd, its own polling thread),
 * 404 for any other path, 405 for methods other than GET and HEAD. The body comes from a render
 * callback, called on the HTTP thread for every scrape. */
#ifndef UC_DAEMON_METRICS_HTTP_H
#define UC_DAEMON_METRICS_HTTP_H

#include "base/status.h"
#include "base/util.h"

#ifdef __cplusplus
extern "C" {
#endif

struct metrics_http;

/* Appends the exposition text to b; must be thread-safe with respect to the caller's state. */
typedef void (*metrics_http_render_fn)(void *user, struct uc_buf *b);

/* Listens on host:port (host: an IPv4 or IPv6 literal, "localhost", or NULL / "" / "0.0.0.0"
 * for every IPv4 address). A port that cannot be bound is UC_ERR_IO naming the address. The
 * callback and user are retained until metrics_http_destroy. */
uc_status metrics_http_create(struct metrics_http **out, const char *host, int port,
                              metrics_http_render_fn render, void *user);
/* Stops the HTTP thread (waits for scrapes in progress) and frees everything. NULL is fine. */
void metrics_http_destroy(struct metrics_http *h);

#ifdef __cplusplus
}
#endif
#endif
