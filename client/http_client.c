/* The minimal HTTP/1.1 client of http_client.h: a buffered socket reader, the response head,
 * chunked / Content-Length / close-delimited bodies, and a server-sent events splitter fed with
 * the body bytes as they arrive. */
#include "http_client.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/mem.h"
#include "base/util.h"

#define MAX_LINE 65536     /* status, header and chunk-size lines */
#define MAX_EVENT (64 << 20)

struct uc_http_conn {
    _Atomic int fd;        /* -1 = not connected */
    atomic_bool cancelled;
    char host[256];
    int port;
    bool used;             /* served a response: the server may have closed it since */
    char buf[16384];
    size_t len, off;       /* buf[off..len) not read yet */
};

/* ---- URL and connection ---------------------------------------------------------------------- */

uc_status uc_http_url_parse(const char *url, char *host, size_t host_cap, int *port,
                            char *prefix, size_t prefix_cap)
{
    if (strncmp(url, "http://", 7) != 0) {
        return UC_ERR_INVALID_ARG;
    }
    const char *h = url + 7;
    const char *slash = strchr(h, '/');
    const char *hp_end = slash ? slash : h + strlen(h); /* end of HOST[:PORT] */
    const char *h_end, *colon;
    if (h[0] == '[') { /* [v6 address] */
        const char *rb = memchr(h, ']', (size_t)(hp_end - h));
        if (!rb || (rb + 1 != hp_end && rb[1] != ':')) {
            return UC_ERR_INVALID_ARG;
        }
        colon = rb + 1 != hp_end ? rb + 1 : NULL;
        h++;
        h_end = rb;
    } else {
        colon = memchr(h, ':', (size_t)(hp_end - h));
        h_end = colon ? colon : hp_end;
    }
    size_t hl = (size_t)(h_end - h);
    if (hl == 0 || hl >= host_cap) {
        return UC_ERR_INVALID_ARG;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = 80;
    if (colon) {
        char *end = NULL;
        long p = strtol(colon + 1, &end, 10);
        if (end != hp_end || end == colon + 1 || p < 1 || p > 65535) {
            return UC_ERR_INVALID_ARG;
        }
        *port = (int)p;
    }
    size_t pl = strlen(hp_end);
    while (pl > 0 && hp_end[pl - 1] == '/') {
        pl--;
    }
    if (pl >= prefix_cap) {
        return UC_ERR_INVALID_ARG;
    }
    memcpy(prefix, hp_end, pl);
    prefix[pl] = '\0';
    return UC_OK;
}

static uc_status dial(struct uc_http_conn *c, char *msg, size_t msg_size)
{
    char port[16];
    snprintf(port, sizeof port, "%d", c->port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(c->host, port, &hints, &res);
    if (gai != 0) {
        snprintf(msg, msg_size, "cannot resolve %s: %s", c->host, gai_strerror(gai));
        return UC_ERR_UNAVAILABLE;
    }
    int fd = -1, err = 0;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
            err = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) {
        snprintf(msg, msg_size, "cannot connect to %s:%d: %s", c->host, c->port,
                 strerror(err ? err : ECONNREFUSED));
        return UC_ERR_UNAVAILABLE;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* small requests, no delay */
    atomic_store(&c->fd, fd);
    c->len = c->off = 0;
    c->used = false;
    return UC_OK;
}

static void hang_up(struct uc_http_conn *c)
{
    int fd = atomic_exchange(&c->fd, -1);
    if (fd >= 0) {
        close(fd);
    }
    c->len = c->off = 0;
}

uc_status uc_http_connect(struct uc_http_conn **out, const char *host, int port, char *msg,
                          size_t msg_size)
{
    *out = NULL;
    struct uc_http_conn *c = uc_calloc(1, sizeof *c);
    if (!c) {
        snprintf(msg, msg_size, "out of memory");
        return UC_ERR_NOMEM;
    }
    atomic_init(&c->fd, -1);
    atomic_init(&c->cancelled, false);
    snprintf(c->host, sizeof c->host, "%s", host);
    c->port = port;
    uc_status rc = dial(c, msg, msg_size);
    if (rc != UC_OK) {
        uc_free(c);
        return rc;
    }
    *out = c;
    return UC_OK;
}

void uc_http_cancel(struct uc_http_conn *c)
{
    if (!c) {
        return;
    }
    atomic_store(&c->cancelled, true);
    int fd = atomic_load(&c->fd);
    if (fd >= 0) {
        shutdown(fd, SHUT_RDWR);
    }
}

void uc_http_close(struct uc_http_conn *c)
{
    if (!c) {
        return;
    }
    hang_up(c);
    uc_free(c);
}

/* ---- reading --------------------------------------------------------------------------------- */

/* Refills the buffer: > 0 bytes, 0 at the end of the stream, < 0 on an error. */
static ssize_t fill(struct uc_http_conn *c)
{
    c->off = c->len = 0;
    for (;;) {
        ssize_t n = recv(atomic_load(&c->fd), c->buf, sizeof c->buf, 0);
        if (n < 0 && errno == EINTR && !atomic_load(&c->cancelled)) {
            continue;
        }
        if (n > 0) {
            c->len = (size_t)n;
        }
        return n;
    }
}

/* One line without its "\r\n" into line (reset first); false at the end of the stream. */
static bool read_line(struct uc_http_conn *c, struct uc_buf *line)
{
    line->len = 0;
    for (;;) {
        if (c->off == c->len && fill(c) <= 0) {
            return false;
        }
        const char *start = c->buf + c->off;
        const char *nl = memchr(start, '\n', c->len - c->off);
        size_t take = nl ? (size_t)(nl - start) : c->len - c->off;
        uc_buf_append(line, start, take);
        c->off += take + (nl ? 1 : 0);
        if (line->oom || line->len > MAX_LINE) {
            return false;
        }
        if (nl) {
            if (line->len && line->data[line->len - 1] == '\r') {
                line->len--;
            }
            if (line->data) {
                line->data[line->len] = '\0';
            }
            return true;
        }
    }
}

/* Where body bytes go: the event splitter (a 2xx event stream) or one buffer (else). */
struct body {
    bool sse;
    uc_http_event_fn on_event;
    void *user;
    bool stopped;            /* the callback asked to stop */
    struct uc_buf line;      /* sse: the line being read */
    struct uc_buf data;      /* sse: the event being read */
    bool has_data;
    struct uc_buf whole;     /* not sse */
};

static void sse_line(struct body *b)
{
    struct uc_buf *l = &b->line;
    if (l->len && l->data[l->len - 1] == '\r') {
        l->len--;
    }
    if (l->len == 0) { /* the blank line ends an event */
        if (b->has_data && !b->stopped) {
            const char *d = b->data.data ? b->data.data : "";
            if (b->on_event(b->user, d, b->data.len) != 0) {
                b->stopped = true;
            }
        }
        b->data.len = 0;
        if (b->data.data) {
            b->data.data[0] = '\0';
        }
        b->has_data = false;
        return;
    }
    if (l->len >= 5 && memcmp(l->data, "data:", 5) == 0) {
        size_t skip = l->len > 5 && l->data[5] == ' ' ? 6 : 5;
        if (b->has_data) {
            uc_buf_append(&b->data, "\n", 1);
        }
        uc_buf_append(&b->data, l->data + skip, l->len - skip);
        b->has_data = true;
    } /* other fields (event:, id:, retry:) and comments are not used */
    l->len = 0;
}

static void body_feed(struct body *b, const char *p, size_t n)
{
    if (!b->sse) {
        uc_buf_append(&b->whole, p, n);
        return;
    }
    while (n > 0 && !b->stopped) {
        const char *nl = memchr(p, '\n', n);
        size_t take = nl ? (size_t)(nl - p) : n;
        uc_buf_append(&b->line, p, take);
        if (nl) {
            sse_line(b);
            take++;
        }
        p += take;
        n -= take;
    }
}

/* Reads exactly n body bytes (n < 0: to the end of the stream). */
static bool read_body_bytes(struct uc_http_conn *c, struct body *b, int64_t n)
{
    while (n != 0 && !b->stopped) {
        if (c->off == c->len) {
            ssize_t got = fill(c);
            if (got <= 0) {
                return n < 0 && got == 0;
            }
        }
        size_t take = c->len - c->off;
        if (n > 0 && (uint64_t)take > (uint64_t)n) {
            take = (size_t)n;
        }
        body_feed(b, c->buf + c->off, take);
        c->off += take;
        if (n > 0) {
            n -= (int64_t)take;
        }
        if (b->data.len > MAX_EVENT || b->line.len > MAX_EVENT) {
            return false;
        }
    }
    return true;
}

static bool read_chunked(struct uc_http_conn *c, struct body *b, struct uc_buf *line)
{
    for (;;) {
        if (!read_line(c, line)) {
            return false;
        }
        char *end = NULL;
        unsigned long long size = strtoull(line->data ? line->data : "", &end, 16);
        if (end == line->data || size > (1ULL << 40)) {
            return false;
        }
        if (size == 0) { /* the last chunk; then trailers up to a blank line */
            do {
                if (!read_line(c, line)) {
                    return false;
                }
            } while (line->len > 0);
            return true;
        }
        if (!read_body_bytes(c, b, (int64_t)size)) {
            return false;
        }
        if (b->stopped) {
            return true;
        }
        if (!read_line(c, line) || line->len != 0) {
            return false;
        }
    }
}

/* ---- requests -------------------------------------------------------------------------------- */

static bool send_all(struct uc_http_conn *c, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t k = send(atomic_load(&c->fd), p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR && !atomic_load(&c->cancelled)) {
            continue;
        }
        if (k <= 0) {
            return false;
        }
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* Sends the request and reads the status line; false (nothing read) when the connection is
 * gone. */
static bool request_head(struct uc_http_conn *c, const char *head, size_t head_len,
                         const char *body, size_t len, struct uc_buf *line)
{
    return send_all(c, head, head_len) && send_all(c, body, len) && read_line(c, line);
}

uc_status uc_http_post(struct uc_http_conn *c, const char *path, const char *body, size_t len,
                       const char *api_key, int *status, uc_http_event_fn on_event, void *user,
                       char *msg, size_t msg_size)
{
    *status = 0;
    msg[0] = '\0';
    uc_status rc = UC_OK;
    struct uc_buf head, line;
    uc_buf_init(&head);
    uc_buf_init(&line);
    struct body b;
    memset(&b, 0, sizeof b);
    uc_buf_init(&b.line);
    uc_buf_init(&b.data);
    uc_buf_init(&b.whole);
    b.on_event = on_event;
    b.user = user;
    uc_buf_printf(&head, "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                  "Accept: text/event-stream, application/json\r\nContent-Length: %zu\r\n",
                  path, c->host, c->port, len);
    if (api_key && api_key[0]) {
        uc_buf_printf(&head, "Authorization: Bearer %s\r\n", api_key);
    }
    uc_buf_puts(&head, "\r\n");
    if (head.oom) {
        snprintf(msg, msg_size, "out of memory");
        rc = UC_ERR_NOMEM;
        goto out;
    }
    /* a kept-alive connection the server has closed meanwhile: once more on a new one */
    for (int attempt = 0;; attempt++) {
        if (atomic_load(&c->fd) < 0 && (rc = dial(c, msg, msg_size)) != UC_OK) {
            goto out;
        }
        bool reused = c->used;
        if (request_head(c, head.data, head.len, body, len, &line)) {
            break;
        }
        hang_up(c);
        if (atomic_load(&c->cancelled)) {
            rc = UC_ERR_CANCELLED;
            goto out;
        }
        if (!reused || attempt > 0) {
            snprintf(msg, msg_size, "the connection to %s:%d failed: %s", c->host, c->port,
                     errno ? strerror(errno) : "closed by the server");
            rc = UC_ERR_UNAVAILABLE;
            goto out;
        }
    }
    int minor = 0;
    if (sscanf(line.data ? line.data : "", "HTTP/1.%d %d", &minor, status) != 2) {
        snprintf(msg, msg_size, "not an HTTP/1.x response: %.80s", line.data ? line.data : "");
        rc = UC_ERR_FORMAT;
        goto out_hang_up;
    }
    int64_t content_length = -1;
    bool chunked = false, close_after = minor == 0, sse = false;
    for (;;) {
        if (!read_line(c, &line)) {
            snprintf(msg, msg_size, "the response head was cut short");
            rc = UC_ERR_UNAVAILABLE;
            goto out_hang_up;
        }
        if (line.len == 0) {
            break;
        }
        const char *v = strchr(line.data, ':');
        if (!v) {
            continue;
        }
        size_t kl = (size_t)(v - line.data);
        v++;
        while (*v == ' ' || *v == '\t') {
            v++;
        }
        if (kl == 14 && strncasecmp(line.data, "content-length", 14) == 0) {
            content_length = strtoll(v, NULL, 10);
        } else if (kl == 17 && strncasecmp(line.data, "transfer-encoding", 17) == 0) {
            chunked = strcasestr(v, "chunked") != NULL;
        } else if (kl == 10 && strncasecmp(line.data, "connection", 10) == 0) {
            close_after = strcasestr(v, "close") != NULL;
        } else if (kl == 12 && strncasecmp(line.data, "content-type", 12) == 0) {
            sse = strcasestr(v, "text/event-stream") != NULL;
        }
    }
    b.sse = sse && *status >= 200 && *status < 300 && on_event;
    bool ok = chunked ? read_chunked(c, &b, &line)
                      : read_body_bytes(c, &b, content_length >= 0 ? content_length : -1);
    if (b.sse && ok && !b.stopped && b.line.len > 0) {
        sse_line(&b); /* a last line without its newline */
    }
    if (b.sse && ok && !b.stopped && b.has_data) {
        b.line.len = 0;
        sse_line(&b); /* a last event without its blank line */
    }
    if (!b.sse) {
        snprintf(msg, msg_size, "%.*s", (int)(b.whole.len < 4096 ? b.whole.len : 4096),
                 b.whole.data ? b.whole.data : "");
    }
    if (!ok) {
        if (atomic_load(&c->cancelled)) {
            rc = UC_ERR_CANCELLED;
        } else {
            snprintf(msg, msg_size, "the response body was cut short");
            rc = UC_ERR_UNAVAILABLE;
        }
        goto out_hang_up;
    }
    c->used = true;
    if (b.stopped || close_after || (!chunked && content_length < 0)) {
        goto out_hang_up;
    }
    goto out;
out_hang_up:
    hang_up(c);
out:
    uc_buf_fini(&head);
    uc_buf_fini(&line);
    uc_buf_fini(&b.line);
    uc_buf_fini(&b.data);
    uc_buf_fini(&b.whole);
    return rc;
}
