/* Unit tests for client/http_client.c (uncompctl bench --http) against a scripted server on
 * loopback: URLs; a chunked event stream cut at every awkward place (inside lines, events and
 * chunk sizes, CRLF or LF lines, comments, multi-line data) gives the events in order; two
 * requests share a kept-alive connection; an error body comes back whole with its status; a
 * connection the server closed is opened again; a callback that stops reading ends the
 * response; a refused connection is UC_ERR_UNAVAILABLE. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/mem.h"
#include "http_client.h"

/* ---- a scripted server ---------------------------------------------------------------------- */

#define MAX_CONNS 4
#define MAX_RESPONSES 4

struct script {
    /* per connection: the responses to its requests, in order; then it closes */
    const char *responses[MAX_CONNS][MAX_RESPONSES];
    size_t piece;                  /* write responses in pieces of this many bytes */
    int listen_fd;
    int port;
    char requests[MAX_CONNS * MAX_RESPONSES][2048]; /* what arrived, head and body */
    int n_requests;
    int n_conns;
};

/* Reads one request (head, then Content-Length bytes of body) into out; false at EOF. */
static bool read_request(int fd, char *out, size_t cap)
{
    size_t n = 0;
    char *end = NULL;
    while (!(end = strstr(out, "\r\n\r\n"))) {
        ssize_t k = recv(fd, out + n, 1, 0); /* byte by byte: never past this request */
        if (k <= 0 || n + 2 >= cap) {
            return false;
        }
        n += (size_t)k;
        out[n] = '\0';
    }
    const char *cl = strstr(out, "Content-Length: ");
    size_t body = cl ? (size_t)atol(cl + 16) : 0;
    size_t have = n - (size_t)(end + 4 - out);
    while (have < body && n + 1 < cap) {
        ssize_t k = recv(fd, out + n, body - have, 0);
        if (k <= 0) {
            return false;
        }
        n += (size_t)k;
        have += (size_t)k;
        out[n] = '\0';
    }
    return true;
}

static void *serve(void *arg)
{
    struct script *s = arg;
    for (int c = 0; c < MAX_CONNS && s->responses[c][0]; c++) {
        int fd = accept(s->listen_fd, NULL, NULL);
        if (fd < 0) {
            break;
        }
        s->n_conns++;
        for (int r = 0; r < MAX_RESPONSES && s->responses[c][r]; r++) {
            char *req = s->requests[s->n_requests];
            req[0] = '\0';
            if (!read_request(fd, req, sizeof s->requests[0])) {
                break;
            }
            s->n_requests++;
            const char *resp = s->responses[c][r];
            size_t len = strlen(resp);
            for (size_t off = 0; off < len; off += s->piece) {
                size_t k = len - off < s->piece ? len - off : s->piece;
                if (send(fd, resp + off, k, MSG_NOSIGNAL) < 0) {
                    break;
                }
                usleep(200); /* the client sees the pieces apart */
            }
        }
        close(fd);
    }
    return NULL;
}

static void script_start(struct script *s, pthread_t *th)
{
    s->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s->listen_fd >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(s->listen_fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(s->listen_fd, 4), 0);
    socklen_t al = sizeof a;
    assert_int_equal(getsockname(s->listen_fd, (struct sockaddr *)&a, &al), 0);
    s->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(th, NULL, serve, s), 0);
}

static void script_join(struct script *s, pthread_t th)
{
    pthread_join(th, NULL);
    close(s->listen_fd);
}

/* Events as they arrive, joined with '|'. */
struct events {
    char text[4096];
    int n;
    int stop_after; /* 0 = never */
};

static int on_event(void *user, const char *data, size_t len)
{
    struct events *e = user;
    assert_int_equal(strlen(data), len);
    size_t used = strlen(e->text);
    snprintf(e->text + used, sizeof e->text - used, "%s%s", e->n ? "|" : "", data);
    e->n++;
    return e->stop_after && e->n >= e->stop_after;
}

/* The events of an event stream, and its chunking: the cuts fall inside a line, between a
 * CR and its LF, and inside a field's value. */
static const char stream_payload[] = "data: {\"a\":1}\n\n: ping\n\ndata: {\"b\":2}\r\n\r\n"
                                     "data: line1\ndata: line2\n\ndata: [DONE]\n\n";
static const char stream_events[] = "{\"a\":1}|{\"b\":2}|line1\nline2|[DONE]";
static char stream_resp[1024];

static void make_stream_resp(void)
{
    const char *p = stream_payload;
    size_t len = strlen(p);
    size_t cuts[] = {(size_t)(strstr(p, "{\"b") - p) + 1, (size_t)(strstr(p, "\r\n\r") - p) + 1,
                     (size_t)(strstr(p, "line2") - p) + 2, len};
    int n = snprintf(stream_resp, sizeof stream_resp, "HTTP/1.1 200 OK\r\nContent-Type: "
                     "text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
    size_t at = 0;
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        n += snprintf(stream_resp + n, sizeof stream_resp - (size_t)n, "%zx\r\n%.*s\r\n",
                      cuts[i] - at, (int)(cuts[i] - at), p + at);
        at = cuts[i];
    }
    snprintf(stream_resp + n, sizeof stream_resp - (size_t)n, "0\r\n\r\n");
}

/* A whole response with a Content-Length. */
static char *with_length(char *out, size_t cap, const char *status_ctype, const char *body)
{
    snprintf(out, cap, "HTTP/1.1 %s\r\nContent-Length: %zu\r\n\r\n%s", status_ctype,
             strlen(body), body);
    return out;
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_http_url(void **state)
{
    (void)state;
    char host[64], prefix[64];
    int port = 0;
    assert_int_equal(uc_http_url_parse("http://127.0.0.1:8000", host, sizeof host, &port, prefix,
                                       sizeof prefix), UC_OK);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 8000);
    assert_string_equal(prefix, "");
    assert_int_equal(uc_http_url_parse("http://localhost/api/", host, sizeof host, &port, prefix,
                                       sizeof prefix), UC_OK);
    assert_string_equal(host, "localhost");
    assert_int_equal(port, 80);
    assert_string_equal(prefix, "/api");
    assert_int_equal(uc_http_url_parse("http://[::1]:9/x", host, sizeof host, &port, prefix,
                                       sizeof prefix), UC_OK);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 9);
    assert_string_equal(prefix, "/x");
    static const char *const bad[] = {"https://h:1", "h:1", "http://", "http://h:", "http://h:0",
                                      "http://h:70000", "http://h:1x", "http://[::1", "ftp://h"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (uc_http_url_parse(bad[i], host, sizeof host, &port, prefix, sizeof prefix) !=
            UC_ERR_INVALID_ARG) {
            fail_msg("%s was accepted", bad[i]);
        }
    }
}

static void test_http_stream_keep_alive_and_errors(void **state)
{
    (void)state;
    static struct script s;
    memset(&s, 0, sizeof s);
    s.piece = 7;
    s.responses[0][0] = stream_resp;
    s.responses[0][1] = stream_resp;
    static char err_resp[256];
    s.responses[0][2] = with_length(err_resp, sizeof err_resp,
                                    "400 Bad Request\r\nContent-Type: application/json",
                                    "{\"error\":{\"message\":\"no\"}}");
    pthread_t th;
    script_start(&s, &th);
    struct uc_http_conn *c = NULL;
    char msg[256];
    assert_int_equal(uc_http_connect(&c, "127.0.0.1", s.port, msg, sizeof msg), UC_OK);
    for (int i = 0; i < 2; i++) { /* two requests, one connection */
        struct events e = {.n = 0};
        int status = 0;
        assert_int_equal(uc_http_post(c, "/v1/completions", "{\"x\":1}", 7, i ? "k3y" : NULL,
                                      &status, on_event, &e, msg, sizeof msg), UC_OK);
        assert_int_equal(status, 200);
        assert_string_equal(e.text, stream_events);
    }
    int status = 0;
    struct events e = {.n = 0};
    assert_int_equal(uc_http_post(c, "/v1/completions", "{}", 2, NULL, &status, on_event, &e,
                                  msg, sizeof msg), UC_OK);
    assert_int_equal(status, 400);
    assert_int_equal(e.n, 0);
    assert_string_equal(msg, "{\"error\":{\"message\":\"no\"}}");
    uc_http_close(c);
    script_join(&s, th);
    assert_int_equal(s.n_conns, 1);
    assert_int_equal(s.n_requests, 3);
    assert_non_null(strstr(s.requests[0], "POST /v1/completions HTTP/1.1\r\n"));
    assert_non_null(strstr(s.requests[0], "Content-Length: 7\r\n"));
    assert_non_null(strstr(s.requests[0], "\r\n\r\n{\"x\":1}"));
    assert_null(strstr(s.requests[0], "Authorization"));
    assert_non_null(strstr(s.requests[1], "Authorization: Bearer k3y\r\n"));
}

static void test_http_reconnects_and_stops(void **state)
{
    (void)state;
    static struct script s;
    memset(&s, 0, sizeof s);
    s.piece = 64;
    /* the first connection answers once and closes (as a server's idle timeout would); a
     * Content-Length event stream; then a stream the client stops reading */
    static char one_two[256];
    s.responses[0][0] = with_length(one_two, sizeof one_two, "200 OK\r\nContent-Type: "
                                    "text/event-stream", "data: one\n\ndata: two");
    s.responses[1][0] = stream_resp;
    s.responses[2][0] = "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                        "data: a\n\ndata: b\n\n";
    pthread_t th;
    script_start(&s, &th);
    struct uc_http_conn *c = NULL;
    char msg[256];
    int status = 0;
    assert_int_equal(uc_http_connect(&c, "127.0.0.1", s.port, msg, sizeof msg), UC_OK);
    struct events e = {.n = 0};
    assert_int_equal(uc_http_post(c, "/v1/x", "{}", 2, NULL, &status, on_event, &e, msg,
                                  sizeof msg), UC_OK);
    assert_string_equal(e.text, "one|two"); /* the last event needs no blank line at the end */
    usleep(20000); /* the server has closed its end by now */
    memset(&e, 0, sizeof e);
    e.stop_after = 2;
    assert_int_equal(uc_http_post(c, "/v1/x", "{}", 2, NULL, &status, on_event, &e, msg,
                                  sizeof msg), UC_OK);
    assert_string_equal(e.text, "{\"a\":1}|{\"b\":2}"); /* stopped after two */
    memset(&e, 0, sizeof e);
    assert_int_equal(uc_http_post(c, "/v1/x", "{}", 2, NULL, &status, on_event, &e, msg,
                                  sizeof msg), UC_OK);
    assert_string_equal(e.text, "a|b"); /* HTTP/1.0: the body ends with the connection */
    uc_http_close(c);
    script_join(&s, th);
    assert_int_equal(s.n_conns, 3);

    /* nobody listens there any more */
    assert_int_equal(uc_http_connect(&c, "127.0.0.1", s.port, msg, sizeof msg),
                     UC_ERR_UNAVAILABLE);
    assert_null(c);
    assert_non_null(strstr(msg, "cannot connect"));
}

int main(void)
{
    make_stream_resp();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_http_url),
        cmocka_unit_test(test_http_stream_keep_alive_and_errors),
        cmocka_unit_test(test_http_reconnects_and_stops),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
