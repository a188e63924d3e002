/* A minimal HTTP/1.1 client for the OpenAI-compatible front, for `uncompctl bench --http`: one
 * keep-alive connection to http://HOST:PORT (plain HTTP, no TLS), a POST with a JSON body, and
 * the response read as it arrives: a server-sent event stream is split into its events (each
 * "data:" payload handed over as soon as its blank line arrives), any other body is returned
 * whole. Bodies may be chunked or have a Content-Length. A connection the server closed is
 * opened again for the next request. One thread per connection; uc_http_cancel from any. */
#ifndef UC_CLIENT_HTTP_CLIENT_H
#define UC_CLIENT_HTTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_http_conn;

/* Splits "http://HOST:PORT[/PREFIX]" (a missing port is 80; "[::1]" brackets allowed). The
 * prefix (without a trailing '/') comes before "/v1/...": "" for a bare URL. UC_ERR_INVALID_ARG
 * for anything else (https is refused: no TLS here). */
uc_status uc_http_url_parse(const char *url, char *host, size_t host_cap, int *port,
                            char *prefix, size_t prefix_cap);

/* Connects (numeric or resolvable host). On failure *out is NULL and msg says why
 * (UC_ERR_UNAVAILABLE: refused or unreachable). */
uc_status uc_http_connect(struct uc_http_conn **out, const char *host, int port, char *msg,
                          size_t msg_size);

/* Called for each event's data (len bytes, NUL-terminated; multi-line data joined with '\n')
 * of a 2xx event stream; returning non-zero stops reading (the connection is then closed). */
typedef int (*uc_http_event_fn)(void *user, const char *data, size_t len);

/* POSTs body (len bytes, Content-Type application/json) to path, with "Authorization: Bearer
 * KEY" when api_key is non-empty, and reads the response: *status the HTTP status; a 2xx
 * text/event-stream goes to on_event event by event; any other body (an error object) is
 * copied into msg (cut to msg_size). UC_ERR_UNAVAILABLE when the connection fails (msg says
 * why), UC_ERR_CANCELLED after uc_http_cancel, UC_ERR_FORMAT for a response that is not
 * HTTP/1.x. */
uc_status uc_http_post(struct uc_http_conn *c, const char *path, const char *body, size_t len,
                       const char *api_key, int *status, uc_http_event_fn on_event, void *user,
                       char *msg, size_t msg_size);

/* Makes a request in flight end with UC_ERR_CANCELLED (shuts the socket down). Any thread. */
void uc_http_cancel(struct uc_http_conn *c);
void uc_http_close(struct uc_http_conn *c);

#ifdef __cplusplus
}
#endif
#endif
