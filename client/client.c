/* The uncomp client library (uncomp_client.h) over the gRPC C core 1.51 and protobuf-c.
 * Top to bottom: errors and small copies; the handle (channel, pluck completion queue, connect
 * wait); the call machinery (one batch in flight per call, pluck on its tag); Generate
 * (streaming and blocking); the unary Inference, Health and Admin calls with their conversions
 * from protobuf-c to the plain structs of the header. protobuf-c types never leave this file.
 * The library never logs: every failure is written to the caller's uc_client_error. The gRPC
 * headers declare `f()` prototypes, so -Wstrict-prototypes is silenced around them. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

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

#include "base/mem.h"
#include "base/pbwire.h"
#include "base/util.h"
#include "grpc/health/v1/health.pb-c.h"
#include "uncomp/v1/uncomp.pb-c.h"
#include "uncomp_client.h"

/* ========================================================================================= */
/* Errors and copies                                                                         */
/* ========================================================================================= */

static const char *const code_names[UC_GRPC_N_CODES] = {
    "OK",        "CANCELLED",          "UNKNOWN",           "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED", "NOT_FOUND",  "ALREADY_EXISTS",    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL",       "UNAVAILABLE",       "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *uc_client_code_name(int grpc_code)
{
    if (grpc_code < 0 || grpc_code >= UC_GRPC_N_CODES) {
        return "UNKNOWN_CODE";
    }
    return code_names[grpc_code];
}

uc_status uc_client_code_status(int grpc_code)
{
    switch (grpc_code) {
    case UC_GRPC_OK:
        return UC_OK;
    case UC_GRPC_CANCELLED:
        return UC_ERR_CANCELLED;
    case UC_GRPC_INVALID_ARGUMENT:
    case UC_GRPC_NOT_FOUND:
    case UC_GRPC_OUT_OF_RANGE:
    case UC_GRPC_FAILED_PRECONDITION:
        return UC_ERR_INVALID_ARG;
    case UC_GRPC_DEADLINE_EXCEEDED:
        return UC_ERR_TIMEOUT;
    case UC_GRPC_RESOURCE_EXHAUSTED:
        return UC_ERR_KV_FULL;
    case UC_GRPC_UNIMPLEMENTED:
        return UC_ERR_UNSUPPORTED;
    case UC_GRPC_UNAVAILABLE:
        return UC_ERR_UNAVAILABLE;
    case UC_GRPC_DATA_LOSS:
        return UC_ERR_FORMAT;
    default:
        return UC_ERR_INTERNAL;
    }
}

const char *uc_client_finish_reason_name(enum uc_finish_reason r)
{
    switch (r) {
    case UC_FINISH_STOP:
        return "stop";
    case UC_FINISH_LENGTH:
        return "length";
    case UC_FINISH_ABORTED:
        return "aborted";
    case UC_FINISH_ERROR:
        return "error";
    default:
        return "unspecified";
    }
}

const char *uc_health_status_name(enum uc_health_status s)
{
    switch (s) {
    case UC_HEALTH_SERVING:
        return "SERVING";
    case UC_HEALTH_NOT_SERVING:
        return "NOT_SERVING";
    case UC_HEALTH_SERVICE_UNKNOWN:
        return "SERVICE_UNKNOWN";
    default:
        return "UNKNOWN";
    }
}

static void err_clear(struct uc_client_error *err)
{
    if (err) {
        err->grpc_code = UC_GRPC_OK;
        err->message[0] = '\0';
    }
}

/* Fills err (if any) and returns the uc_status for the code; `st` overrides it unless UC_OK. */
static uc_status set_err(struct uc_client_error *err, int code, uc_status st, const char *fmt,
                         ...) __attribute__((format(printf, 4, 5)));
static uc_status set_err(struct uc_client_error *err, int code, uc_status st, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->grpc_code = code;
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
        va_end(ap);
    }
    return st != UC_OK ? st : uc_client_code_status(code);
}

static uc_status err_nomem(struct uc_client_error *err)
{
    return set_err(err, UC_GRPC_RESOURCE_EXHAUSTED, UC_ERR_NOMEM, "client: out of memory");
}

/* Copies a string (NULL as ""), recording a failed allocation in *oom. */
static char *sdup(const char *s, bool *oom)
{
    char *d = uc_strdup(s ? s : "");
    if (!d) {
        *oom = true;
    }
    return d;
}

/* Copies n elements of elt bytes; NULL for n == 0. */
static void *adup(const void *src, size_t n, size_t elt, bool *oom)
{
    if (n == 0 || !src) {
        return NULL;
    }
    void *d = uc_malloc(n * elt);
    if (!d) {
        *oom = true;
        return NULL;
    }
    memcpy(d, src, n * elt);
    return d;
}

/* protobuf-c allocations go through uc_malloc, so they are counted like everything else. */
static void *pb_alloc(void *data, size_t size)
{
    (void)data;
    return uc_malloc(size);
}

static void pb_free(void *data, void *p)
{
    (void)data;
    uc_free(p);
}

static ProtobufCAllocator pb_allocator = {
    .alloc = pb_alloc, .free = pb_free, .allocator_data = NULL};

/* ========================================================================================= */
/* The handle                                                                                */
/* ========================================================================================= */

struct uc_client {
    grpc_channel *channel;
    grpc_completion_queue *cq; /* pluck queue: every operation waits on its own tag */
    char *target;
    int64_t call_timeout_ms;
    char *auth;                /* "Bearer KEY", or NULL */
    pthread_mutex_t mu;        /* guards active and cancel_requested */
    grpc_call *active;         /* the call in progress, for uc_client_cancel */
    bool cancel_requested;
};

struct uc_client_opts uc_client_default_opts(void)
{
    struct uc_client_opts o = {
        .root_certs_file = NULL,
        .tls_server_name = NULL,
        .connect_timeout_ms = 5000,
        .wait_for_server = false,
        .call_timeout_ms = 0,
        .max_message_bytes = 64 << 20,
    };
    return o;
}

static const char *conn_state_name(grpc_connectivity_state s)
{
    switch (s) {
    case GRPC_CHANNEL_IDLE:
        return "IDLE";
    case GRPC_CHANNEL_CONNECTING:
        return "CONNECTING";
    case GRPC_CHANNEL_READY:
        return "READY";
    case GRPC_CHANNEL_TRANSIENT_FAILURE:
        return "TRANSIENT_FAILURE";
    default:
        return "SHUTDOWN";
    }
}

static gpr_timespec deadline_after_ms(int64_t ms)
{
    if (ms <= 0) {
        return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    }
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* Waits until the channel is READY, or fails with UNAVAILABLE. */
static uc_status wait_ready(struct uc_client *c, const struct uc_client_opts *o,
                            struct uc_client_error *err)
{
    gpr_timespec deadline = deadline_after_ms(o->connect_timeout_ms);
    grpc_connectivity_state st = grpc_channel_check_connectivity_state(c->channel, 1);
    bool was_failing = false;
    /* Without wait_for_server a refused connection fails at once. A TLS handshake gets one more
     * try, within a second: gRPC 1.51 with OpenSSL 3 now and then fails the first
     * SSL_do_handshake call (SSL_ERROR_SYSCALL) on a good connection, while a real certificate
     * problem fails every time. The channel stays in TRANSIENT_FAILURE between attempts (sticky),
     * so the watch ends only at READY or at its deadline. */
    bool retried = false;
    gpr_timespec watch_deadline = deadline;
    while (st != GRPC_CHANNEL_READY) {
        if (st == GRPC_CHANNEL_SHUTDOWN) {
            break;
        }
        if (st == GRPC_CHANNEL_TRANSIENT_FAILURE) {
            was_failing = true;
            if (!o->wait_for_server) {
                if (!o->root_certs_file || retried) {
                    break;
                }
                retried = true;
                gpr_timespec grace = deadline_after_ms(1000);
                watch_deadline = gpr_time_cmp(grace, deadline) < 0 ? grace : deadline;
            }
        }
        grpc_channel_watch_connectivity_state(c->channel, st, watch_deadline, c->cq, &c->channel);
        grpc_event ev = grpc_completion_queue_pluck(c->cq, &c->channel,
                                                    gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE || !ev.success) {
            break; /* the deadline passed with the state unchanged */
        }
        st = grpc_channel_check_connectivity_state(c->channel, 1);
    }
    if (st == GRPC_CHANNEL_READY) {
        return UC_OK;
    }
    const char *tls = o->root_certs_file ? " with TLS" : "";
    if (was_failing && !o->wait_for_server) {
        return set_err(err, UC_GRPC_UNAVAILABLE, UC_ERR_UNAVAILABLE,
                       "cannot connect to %s%s: connection refused, unreachable or handshake "
                       "failed (state %s)",
                       c->target, tls, conn_state_name(st));
    }
    return set_err(err, UC_GRPC_UNAVAILABLE, UC_ERR_UNAVAILABLE,
                   "cannot connect to %s%s within %lld ms (state %s)", c->target, tls,
                   (long long)o->connect_timeout_ms, conn_state_name(st));
}

/* Reads a PEM file into a NUL-terminated uc_malloc'd string (plain stdio: the library does not
 * log, and uc_file_read_all would). */
static uc_status read_pem(char **out, const char *path, struct uc_client_error *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        return set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_IO,
                       "cannot read root certificates %s: %s", path, strerror(errno));
    }
    struct uc_buf b;
    char tmp[4096];
    size_t n;
    uc_buf_init(&b);
    while ((n = fread(tmp, 1, sizeof(tmp), f)) > 0) {
        uc_buf_append(&b, tmp, n);
    }
    bool bad = ferror(f) != 0;
    fclose(f);
    if (bad || b.oom || b.len == 0) {
        uc_buf_fini(&b);
        return set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_IO,
                       "cannot read root certificates %s: %s", path,
                       bad ? "read error" : b.oom ? "out of memory" : "empty file");
    }
    *out = uc_buf_take(&b);
    uc_buf_fini(&b);
    return UC_OK;
}

uc_status uc_client_connect(struct uc_client **out, const char *target,
                            const struct uc_client_opts *opts, struct uc_client_error *err)
{
    struct uc_client_opts o = opts ? *opts : uc_client_default_opts();
    struct uc_client *c = NULL;
    char *pem = NULL;
    grpc_channel_credentials *creds = NULL;
    uc_status rc = UC_OK;

    err_clear(err);
    *out = NULL;
    if (!target || !target[0]) {
        return set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_INVALID_ARG,
                       "server address is empty (expected HOST:PORT)");
    }
    if (o.root_certs_file) {
        rc = read_pem(&pem, o.root_certs_file, err);
        if (rc != UC_OK) {
            return rc;
        }
    }
    c = uc_calloc(1, sizeof(*c));
    if (!c) {
        rc = err_nomem(err);
        goto out_free_pem;
    }
    c->target = uc_strdup(target);
    if (!c->target) {
        rc = err_nomem(err);
        goto out_free_client;
    }
    pthread_mutex_init(&c->mu, NULL);
    c->call_timeout_ms = o.call_timeout_ms;
    if (o.api_key && o.api_key[0]) {
        size_t n = strlen(o.api_key) + 8;
        c->auth = uc_malloc(n);
        if (c->auth) {
            snprintf(c->auth, n, "Bearer %s", o.api_key);
        }
    }
    grpc_init();

    int max_msg = o.max_message_bytes > 0 && o.max_message_bytes < INT32_MAX
                      ? (int)o.max_message_bytes
                      : 64 << 20;
    grpc_arg args[7];
    size_t n_args = 0;
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                                .key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                                .value.integer = max_msg};
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                                .key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH,
                                .value.integer = max_msg};
    /* a daemon that is still starting is retried every 100 ms to 1 s, not after 1 s to 120 s */
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                                .key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
                                .value.integer = 100};
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                                .key = (char *)GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
                                .value.integer = 100};
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                                .key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
                                .value.integer = 1000};
    if (o.connection) { /* gRPC keys its shared connections by the channel's arguments */
        args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                                    .key = (char *)"uncomp.connection",
                                    .value.integer = o.connection};
    }
    if (pem && o.tls_server_name && o.tls_server_name[0]) {
        args[n_args++] = (grpc_arg){.type = GRPC_ARG_STRING,
                                    .key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG,
                                    .value.string = (char *)(uintptr_t)o.tls_server_name};
    }
    grpc_channel_args chargs = {.num_args = n_args, .args = args};
    creds = pem ? grpc_ssl_credentials_create(pem, NULL, NULL, NULL)
                : grpc_insecure_credentials_create();
    if (!creds) {
        rc = set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_INVALID_ARG,
                     "cannot create channel credentials");
        goto out_shutdown;
    }
    c->channel = grpc_channel_create(target, creds, &chargs);
    grpc_channel_credentials_release(creds);
    c->cq = grpc_completion_queue_create_for_pluck(NULL);
    if (!c->channel || !c->cq) {
        rc = set_err(err, UC_GRPC_INTERNAL, UC_ERR_INTERNAL, "cannot create a channel to %s",
                     target);
        goto out_shutdown;
    }
    if (o.connect_timeout_ms > 0) {
        UC_CHECK(wait_ready(c, &o, err), rc, out_shutdown);
    }
    uc_free(pem);
    *out = c;
    return UC_OK;

out_shutdown:
    uc_client_close(c);
    c = NULL;
out_free_client:
    if (c) {
        uc_free(c->target);
        uc_free(c);
    }
out_free_pem:
    uc_free(pem);
    return rc;
}

void uc_client_close(struct uc_client *c)
{
    if (!c) {
        return;
    }
    uc_free(c->auth);
    if (c->channel) {
        grpc_channel_destroy(c->channel);
    }
    if (c->cq) {
        grpc_completion_queue_shutdown(c->cq);
        for (;;) {
            grpc_event ev = grpc_completion_queue_pluck(c->cq, NULL,
                                                        gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            if (ev.type == GRPC_QUEUE_SHUTDOWN) {
                break;
            }
        }
        grpc_completion_queue_destroy(c->cq);
    }
    pthread_mutex_destroy(&c->mu);
    uc_free(c->target);
    uc_free(c);
    grpc_shutdown();
}

void uc_client_set_call_timeout(struct uc_client *c, int64_t timeout_ms)
{
    c->call_timeout_ms = timeout_ms;
}

void uc_client_cancel(struct uc_client *c)
{
    pthread_mutex_lock(&c->mu);
    c->cancel_requested = true;
    if (c->active) {
        grpc_call_cancel(c->active, NULL);
    }
    pthread_mutex_unlock(&c->mu);
}

/* ========================================================================================= */
/* Calls                                                                                     */
/* ========================================================================================= */

/* One call's state: the ops of its batches point into it. */
struct call {
    struct uc_client *c;
    grpc_call *call;
    grpc_metadata_array md_initial;
    grpc_metadata_array md_trailing;
    grpc_status_code status;
    grpc_slice details;
    grpc_byte_buffer *send_buf;
};

/* A length-delimited field written by hand after what protobuf-c packed: text with its length
 * (protobuf-c packs strings with strlen, so a NUL byte would end them), or an embedded message
 * packed the same way. The message packed by protobuf-c leaves these fields empty. */
struct wire_field {
    uint32_t field;
    const void *data;
    size_t len;
};

/* Packs m followed by fields[0..n) into one uc_malloc'd buffer (*out_len bytes); NULL when out
 * of memory. */
static uint8_t *pack_bytes(const ProtobufCMessage *m, const struct wire_field *fields, size_t n,
                           size_t *out_len)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    for (size_t i = 0; i < n; i++) {
        len += uc_pb_bytes_field_size(fields[i].field, fields[i].len);
    }
    uint8_t *buf = uc_malloc(len ? len : 1);
    if (!buf) {
        return NULL;
    }
    size_t at = protobuf_c_message_pack(m, buf);
    for (size_t i = 0; i < n; i++) {
        at += uc_pb_put_bytes_field(buf + at, fields[i].field, fields[i].data, fields[i].len);
    }
    *out_len = at;
    return buf;
}

/* The request message on the wire: m, then fields[0..n). NULL when out of memory. */
static grpc_byte_buffer *pack_message(const ProtobufCMessage *m, const struct wire_field *fields,
                                      size_t n)
{
    size_t len = 0;
    uint8_t *buf = pack_bytes(m, fields, n, &len);
    if (!buf) {
        return NULL;
    }
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, len);
    uc_free(buf);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1); /* takes its own ref */
    grpc_slice_unref(s);
    return bb;
}

/* Unpacks and destroys a received buffer; NULL on garbage. When raw is not NULL it receives
 * the message's wire bytes (the caller unrefs it; an empty slice on failure), from which the
 * lengths of text fields with NUL bytes are read (see text_len). */
static ProtobufCMessage *unpack_message(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d,
                                        grpc_slice *raw)
{
    grpc_byte_buffer_reader r;
    ProtobufCMessage *m = NULL;
    if (raw) {
        *raw = grpc_empty_slice();
    }
    if (grpc_byte_buffer_reader_init(&r, bb)) {
        grpc_slice s = grpc_byte_buffer_reader_readall(&r);
        m = protobuf_c_message_unpack(d, &pb_allocator, GRPC_SLICE_LENGTH(s),
                                      GRPC_SLICE_START_PTR(s));
        if (raw && m) {
            *raw = s;
        } else {
            grpc_slice_unref(s);
        }
        grpc_byte_buffer_reader_destroy(&r);
    }
    grpc_byte_buffer_destroy(bb);
    return m;
}

/* The length of an unpacked text field, NUL bytes included: protobuf-c copies every byte of a
 * string (and a NUL after them) but its length is lost, so it is read from the wire bytes.
 * `path` is the field numbers from the message down to the field, `index` the occurrence of a
 * repeated field (SIZE_MAX for a singular one). */
static size_t text_len(const char *unpacked, grpc_slice raw, const uint32_t *path, int depth,
                       size_t index)
{
    size_t n = unpacked ? strlen(unpacked) : 0;
    const uint8_t *d = NULL;
    size_t len = 0;
    if (unpacked &&
        uc_pb_find_bytes(GRPC_SLICE_START_PTR(raw), GRPC_SLICE_LENGTH(raw), path, depth, index,
                         &d, &len) &&
        len > n && memcmp(d, unpacked, n + 1) == 0) {
        return len;
    }
    return n;
}

/* Copies n bytes and a NUL after them, recording a failed allocation in *oom. */
static char *mdup(const char *s, size_t n, bool *oom)
{
    char *d = uc_malloc(n + 1);
    if (!d) {
        *oom = true;
        return NULL;
    }
    if (n > 0) {
        memcpy(d, s, n);
    }
    d[n] = '\0';
    return d;
}

/* Starts a call to `method` with the handle's deadline and registers it for cancellation. */
static uc_status call_start(struct call *k, struct uc_client *c, const char *method,
                            struct uc_client_error *err)
{
    memset(k, 0, sizeof(*k));
    k->c = c;
    k->details = grpc_empty_slice();
    grpc_metadata_array_init(&k->md_initial);
    grpc_metadata_array_init(&k->md_trailing);
    grpc_slice m = grpc_slice_from_static_string(method);
    gpr_timespec deadline = c->call_timeout_ms > 0 ? deadline_after_ms(c->call_timeout_ms)
                                                   : gpr_inf_future(GPR_CLOCK_REALTIME);
    k->call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, m, NULL,
                                       deadline, NULL);
    if (!k->call) {
        return set_err(err, UC_GRPC_INTERNAL, UC_ERR_INTERNAL, "cannot create a call to %s",
                       method);
    }
    pthread_mutex_lock(&c->mu);
    c->active = k->call;
    c->cancel_requested = false;
    pthread_mutex_unlock(&c->mu);
    return UC_OK;
}

static void call_end(struct call *k)
{
    if (k->call) {
        pthread_mutex_lock(&k->c->mu);
        k->c->active = NULL;
        pthread_mutex_unlock(&k->c->mu);
        grpc_call_unref(k->call);
        k->call = NULL;
    }
    if (k->send_buf) {
        grpc_byte_buffer_destroy(k->send_buf);
        k->send_buf = NULL;
    }
    grpc_metadata_array_destroy(&k->md_initial);
    grpc_metadata_array_destroy(&k->md_trailing);
    grpc_slice_unref(k->details);
    k->details = grpc_empty_slice();
}

/* Starts one batch and waits for it; returns whether it succeeded. */
static bool call_batch(struct call *k, const grpc_op *ops, size_t n, void *tag)
{
    grpc_call_error e = grpc_call_start_batch(k->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        return false;
    }
    grpc_event ev = grpc_completion_queue_pluck(k->c->cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME),
                                                NULL);
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

/* Turns a received status into the caller's error. */
static uc_status status_to_err(struct call *k, struct uc_client_error *err)
{
    if (k->status == GRPC_STATUS_OK) {
        return UC_OK;
    }
    size_t n = GRPC_SLICE_LENGTH(k->details);
    bool cancelled_here;
    pthread_mutex_lock(&k->c->mu);
    cancelled_here = k->c->cancel_requested;
    pthread_mutex_unlock(&k->c->mu);
    if (k->status == GRPC_STATUS_CANCELLED && cancelled_here) {
        return set_err(err, UC_GRPC_CANCELLED, UC_ERR_CANCELLED, "cancelled by the client");
    }
    return set_err(err, (int)k->status, UC_OK, "%.*s", (int)(n < 480 ? n : 480),
                   (const char *)GRPC_SLICE_START_PTR(k->details));
}

/* Receives the final status (after the last message or a failed batch). */
static void call_recv_status(struct call *k)
{
    grpc_op op = {0};
    op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op.data.recv_status_on_client.trailing_metadata = &k->md_trailing;
    op.data.recv_status_on_client.status = &k->status;
    op.data.recv_status_on_client.status_details = &k->details;
    if (!call_batch(k, &op, 1, &k->status)) {
        k->status = GRPC_STATUS_INTERNAL;
    }
}

/* Sends the request (req, then the hand-written fields[0..n_fields)), half-closes and receives
 * the initial metadata (one batch). */
static bool call_send_request(struct call *k, const ProtobufCMessage *req,
                              const struct wire_field *fields, size_t n_fields)
{
    k->send_buf = pack_message(req, fields, n_fields);
    if (!k->send_buf) {
        grpc_call_cancel(k->call, NULL); /* out of memory: the status says CANCELLED */
        return false;
    }
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    grpc_metadata md;
    memset(&md, 0, sizeof md);
    if (k->c->auth) { /* the API key (uc_client_opts.api_key) */
        md.key = grpc_slice_from_static_string("authorization");
        md.value = grpc_slice_from_copied_string(k->c->auth);
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &md;
    }
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = k->send_buf;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &k->md_initial;
    bool ok = call_batch(k, ops, 4, &k->md_initial);
    if (k->c->auth) {
        grpc_slice_unref(md.value);
    }
    return ok;
}

/* A unary call: request in (req and the hand-written fields[0..n_fields)), one response
 * (unpacked with `d`) out in *resp, and its wire bytes in *raw when raw is not NULL (the caller
 * unrefs them). */
static uc_status unary_raw(struct uc_client *c, const char *method, const ProtobufCMessage *req,
                           const struct wire_field *fields, size_t n_fields,
                           const ProtobufCMessageDescriptor *d, ProtobufCMessage **resp,
                           grpc_slice *raw, struct uc_client_error *err)
{
    struct call k;
    grpc_byte_buffer *recv = NULL;
    uc_status rc;

    *resp = NULL;
    if (raw) {
        *raw = grpc_empty_slice();
    }
    err_clear(err);
    UC_CHECK(call_start(&k, c, method, err), rc, out);
    if (call_send_request(&k, req, fields, n_fields)) {
        grpc_op op = {0};
        op.op = GRPC_OP_RECV_MESSAGE;
        op.data.recv_message.recv_message = &recv;
        call_batch(&k, &op, 1, &recv);
    }
    call_recv_status(&k);
    UC_CHECK(status_to_err(&k, err), rc, out_free_recv);
    if (!recv) {
        rc = set_err(err, UC_GRPC_INTERNAL, UC_ERR_FORMAT, "%s: the server sent no response",
                     method);
        goto out_end;
    }
    *resp = unpack_message(recv, d, raw);
    recv = NULL;
    if (!*resp) {
        rc = set_err(err, UC_GRPC_INTERNAL, UC_ERR_FORMAT, "%s: malformed response", method);
    }
    goto out_end;

out_free_recv:
    if (recv) {
        grpc_byte_buffer_destroy(recv);
    }
out_end:
    call_end(&k);
out:
    return rc;
}

/* A unary call whose request and response need no hand-written fields. */
static uc_status unary(struct uc_client *c, const char *method, const ProtobufCMessage *req,
                       const ProtobufCMessageDescriptor *d, ProtobufCMessage **resp,
                       struct uc_client_error *err)
{
    return unary_raw(c, method, req, NULL, 0, d, resp, NULL, err);
}

/* ========================================================================================= */
/* Generate                                                                                  */
/* ========================================================================================= */

struct uc_generate_params uc_generate_default_params(void)
{
    struct uc_generate_params p;
    memset(&p, 0, sizeof(p));
    return p;
}

static void report_fini(struct uc_compression_report *r)
{
    uc_free(r->policy);
    uc_free(r->stage_rows);
    uc_free(r->stage_starts);
    uc_free(r->minicache_layers);
    uc_free(r->groups);
    uc_free(r->entropy);
    uc_free(r->decode_mode);
    uc_free(r->grouping);
    memset(r, 0, sizeof(*r));
}

void uc_completion_fini(struct uc_completion *comp)
{
    if (!comp) {
        return;
    }
    uc_free(comp->request_id);
    uc_free(comp->matched_stop);
    report_fini(&comp->compression);
    memset(comp, 0, sizeof(*comp));
}

void uc_generation_fini(struct uc_generation *g)
{
    if (!g) {
        return;
    }
    uc_free(g->text);
    uc_free(g->token_ids);
    uc_free(g->logprobs);
    uc_completion_fini(&g->completion);
    memset(g, 0, sizeof(*g));
}

static void copy_report(struct uc_compression_report *r, const Uncomp__V1__CompressionReport *m,
                        bool *oom)
{
    r->policy = sdup(m->policy, oom);
    r->kv_budget = m->kv_budget;
    r->kv_tokens_full = m->kv_tokens_full;
    r->kv_tokens_kept = m->kv_tokens_kept;
    r->kv_bytes_full = m->kv_bytes_full;
    r->kv_bytes_kept = m->kv_bytes_kept;
    r->ratio = m->ratio;
    r->stage_rows = adup(m->stage_rows, m->n_stage_rows, sizeof(uint64_t), oom);
    r->n_stage_rows = r->stage_rows ? m->n_stage_rows : 0;
    r->stage_starts = adup(m->stage_starts, m->n_stage_starts, sizeof(uint32_t), oom);
    r->n_stage_starts = r->stage_starts ? m->n_stage_starts : 0;
    if (m->n_groups) {
        r->groups = uc_calloc(m->n_groups, sizeof(*r->groups));
        if (r->groups) {
            r->n_groups = m->n_groups;
            for (size_t i = 0; i < m->n_groups; i++) {
                r->groups[i] = (struct uc_group_report){.group = m->groups[i]->group,
                                                        .budget = m->groups[i]->budget,
                                                        .mean_kept = m->groups[i]->mean_kept};
            }
        } else {
            *oom = true;
        }
    }
    if (m->n_entropy) {
        r->entropy = uc_calloc(m->n_entropy, sizeof(*r->entropy));
        if (r->entropy) {
            r->n_entropy = m->n_entropy;
            for (size_t i = 0; i < m->n_entropy; i++) {
                r->entropy[i] = (struct uc_layer_entropy){.layer = m->entropy[i]->layer,
                                                          .min = m->entropy[i]->min,
                                                          .mean = m->entropy[i]->mean,
                                                          .max = m->entropy[i]->max};
            }
        } else {
            *oom = true;
        }
    }
    r->compress_ms = m->compress_ms;
    r->decode_mode = sdup(m->decode_mode, oom);
    r->grouping = sdup(m->grouping, oom);
    r->plan_checksum = m->plan_checksum;
    r->shared_layers = m->shared_layers;
    r->key_channels = m->key_channels;
    r->minicache_pairs = m->minicache_pairs;
    r->minicache_start = m->minicache_start;
    r->minicache_layers = adup(m->minicache_layers, m->n_minicache_layers, sizeof(uint32_t), oom);
    r->n_minicache_layers = r->minicache_layers ? m->n_minicache_layers : 0;
    r->minicache_merged = m->minicache_merged;
    r->minicache_retained = m->minicache_retained;
    r->lorc_ratio = m->lorc_ratio;
    r->lorc_rank_first = m->lorc_rank_first;
    r->lorc_rank_last = m->lorc_rank_last;
}

/* Copies the Complete message of a GenerateResponse (raw: its wire bytes). */
static void copy_complete(struct uc_completion *o, const Uncomp__V1__Complete *m, grpc_slice raw,
                          bool *oom)
{
    static const uint32_t stop_path[] = {3, 2}; /* GenerateResponse.complete.matched_stop */
    o->complete = true;
    o->finish_reason = (enum uc_finish_reason)m->finish_reason;
    uc_free(o->matched_stop);
    size_t stop_len = text_len(m->matched_stop, raw, stop_path, 2, SIZE_MAX);
    o->matched_stop = mdup(m->matched_stop ? m->matched_stop : "", stop_len, oom);
    o->matched_stop_len = o->matched_stop ? stop_len : 0;
    if (m->usage) {
        o->prompt_tokens = m->usage->prompt_tokens;
        o->completion_tokens = m->usage->completion_tokens;
    }
    if (m->compression) {
        report_fini(&o->compression);
        o->has_compression = true;
        copy_report(&o->compression, m->compression, oom);
    }
    if (m->timing) {
        o->timing = (struct uc_client_timing){.queue_ms = m->timing->queue_ms,
                                       .ttft_ms = m->timing->ttft_ms,
                                       .prefill_ms = m->timing->prefill_ms,
                                       .decode_ms = m->timing->decode_ms,
                                       .total_ms = m->timing->total_ms};
    }
}

/* Hands one chunk to the callback (raw: the response's wire bytes); returns its verdict
 * (non-zero: stop). */
static int deliver_chunk(const Uncomp__V1__GenerateResponse *r, grpc_slice raw, double now,
                         uc_chunk_fn fn, void *user, bool *oom)
{
    static const uint32_t text_path[] = {2, 2}; /* GenerateResponse.chunk.text */
    const Uncomp__V1__Chunk *m = r->chunk;
    struct uc_client_token_logprob *lp = NULL;
    if (m->n_logprobs) {
        lp = uc_calloc(m->n_logprobs, sizeof(*lp));
        if (!lp) {
            *oom = true;
            return 1;
        }
        for (size_t i = 0; i < m->n_logprobs; i++) {
            const Uncomp__V1__TokenLogprob *t = m->logprobs[i];
            size_t n_top = t->n_top_ids < t->n_top_logprobs ? t->n_top_ids : t->n_top_logprobs;
            lp[i] = (struct uc_client_token_logprob){.token_id = t->token_id,
                                              .logprob = t->logprob,
                                              .top_ids = t->top_ids,
                                              .top_logprobs = t->top_logprobs,
                                              .n_top = n_top};
        }
    }
    const char *text = m->text ? m->text : "";
    struct uc_chunk ch = {.request_id = r->request_id ? r->request_id : "",
                          .token_ids = m->token_ids,
                          .n_token_ids = m->n_token_ids,
                          .text = text,
                          .text_len = text_len(m->text, raw, text_path, 2, SIZE_MAX),
                          .logprobs = lp,
                          .n_logprobs = m->n_logprobs,
                          .arrival_s = now};
    int verdict = fn ? fn(&ch, user) : 0;
    uc_free(lp);
    return verdict;
}

/* Builds the GenerateRequest in caller-provided storage (borrowing the caller's strings). The
 * text and the SamplingParams (whose stop strings may hold NUL bytes) go on the wire by hand:
 * fields[0..n_fields) follow the packed request, and `sampling_bytes` (uc_malloc'd) holds the
 * packed SamplingParams with its stop strings. */
struct gen_req {
    Uncomp__V1__GenerateRequest req;
    Uncomp__V1__SamplingParams sampling;
    Uncomp__V1__CompressionParams compression;
    Uncomp__V1__TokenIds ids;
    uint8_t *sampling_bytes;
    struct wire_field fields[2];
    size_t n_fields;
};

static void gen_req_fini(struct gen_req *g)
{
    UC_FREE(g->sampling_bytes);
}

/* The sampling and compression parts of a request (Generate's and Chat's): g->compression, and
 * g->sampling packed by hand with its stop strings into g->sampling_bytes, appended to
 * g->fields as field 4. */
static uc_status build_options(struct gen_req *g, const struct uc_sampling *s,
                               const struct uc_compression *cp, const char *what,
                               struct uc_client_error *err)
{
    protobuf_c_message_init(&uncomp__v1__sampling_params__descriptor, &g->sampling);
    protobuf_c_message_init(&uncomp__v1__compression_params__descriptor, &g->compression);
    g->sampling.max_tokens = s->max_tokens;
    g->sampling.min_tokens = s->min_tokens;
    g->sampling.temperature = s->temperature;
    g->sampling.has_temperature = s->has_temperature;
    g->sampling.top_p = s->top_p;
    g->sampling.top_k = s->top_k;
    g->sampling.min_p = s->min_p;
    g->sampling.repetition_penalty = s->repetition_penalty;
    g->sampling.frequency_penalty = s->frequency_penalty;
    g->sampling.presence_penalty = s->presence_penalty;
    g->sampling.n_stop_token_ids = s->n_stop_token_ids;
    g->sampling.stop_token_ids = (uint32_t *)(uintptr_t)s->stop_token_ids;
    g->sampling.seed = s->seed;
    g->sampling.has_seed = s->has_seed;
    g->sampling.ignore_eos = s->ignore_eos;
    g->sampling.logprobs = s->logprobs;
    /* field 4 (sampling) by hand: the packed SamplingParams, then each stop string (field 11)
     * with its length */
    if (s->n_stop > 0 && !s->stop) {
        return set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_INVALID_ARG,
                       "%s: sampling.n_stop is %zu but sampling.stop is NULL", what,
                       s->n_stop);
    }
    struct wire_field *stops = NULL;
    if (s->n_stop > 0) {
        stops = uc_calloc(s->n_stop, sizeof *stops);
        if (!stops) {
            return err_nomem(err);
        }
    }
    for (size_t i = 0; i < s->n_stop; i++) {
        const char *stop = s->stop[i] ? s->stop[i] : "";
        stops[i] = (struct wire_field){
            .field = 11, .data = stop, .len = s->stop_len ? s->stop_len[i] : strlen(stop)};
    }
    size_t sampling_len = 0;
    g->sampling_bytes = pack_bytes(&g->sampling.base, stops, s->n_stop, &sampling_len);
    uc_free(stops);
    if (!g->sampling_bytes) {
        return err_nomem(err);
    }
    g->fields[g->n_fields++] =
        (struct wire_field){.field = 4, .data = g->sampling_bytes, .len = sampling_len};

    if (cp->policy) {
        g->compression.policy = (char *)(uintptr_t)cp->policy;
    }
    g->compression.kv_budget = cp->kv_budget;
    g->compression.window = cp->window;
    g->compression.pool_kernel = cp->pool_kernel;
    g->compression.sink_tokens = cp->sink_tokens;
    g->compression.head_groups = cp->head_groups;
    if (cp->decode_mode) {
        g->compression.decode_mode = (char *)(uintptr_t)cp->decode_mode;
    }
    if (cp->grouping) {
        g->compression.grouping = (char *)(uintptr_t)cp->grouping;
    }
    g->compression.n_stage_starts = cp->n_stage_starts;
    g->compression.stage_starts = (uint32_t *)(uintptr_t)cp->stage_starts;
    g->compression.r_min = cp->r_min;
    g->compression.think_ratio = cp->think_ratio;
    g->compression.minicache_t = cp->minicache_t;
    g->compression.minicache_gamma = cp->minicache_gamma;
    g->compression.minicache_retain_none = cp->minicache_retain_none;
    g->compression.minicache_start = cp->minicache_start;
    g->compression.lorc_ratio = cp->lorc_ratio;
    return UC_OK;
}

static uc_status build_generate(struct gen_req *g, const struct uc_generate_params *p,
                                struct uc_client_error *err)
{
    protobuf_c_message_init(&uncomp__v1__generate_request__descriptor, &g->req);
    protobuf_c_message_init(&uncomp__v1__token_ids__descriptor, &g->ids);
    g->sampling_bytes = NULL;
    g->n_fields = 0;

    bool has_text = p->text != NULL;
    bool has_ids = p->n_token_ids > 0;
    if (has_text == has_ids) {
        return set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_INVALID_ARG,
                       "generate: give exactly one of text or token_ids");
    }
    if (p->request_id) {
        g->req.request_id = (char *)(uintptr_t)p->request_id;
    }
    if (has_text) {
        /* field 2 (text) by hand, with its length: the oneof case comes from the field */
        g->fields[g->n_fields++] = (struct wire_field){
            .field = 2, .data = p->text, .len = p->text_len ? p->text_len : strlen(p->text)};
    } else {
        g->ids.n_ids = p->n_token_ids;
        g->ids.ids = (uint32_t *)(uintptr_t)p->token_ids;
        g->req.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS;
        g->req.token_ids = &g->ids;
    }
    g->req.add_special_tokens = p->add_special_tokens;
    g->req.has_add_special_tokens = p->has_add_special_tokens;
    uc_status rc = build_options(g, &p->sampling, &p->compression, "generate", err);
    g->req.compression = &g->compression;
    return rc;
}

/* A call answered by a stream of GenerateResponse (Generate, Chat): sends req and
 * fields[0..n_fields), gives each chunk to on_chunk and fills *comp (zeroed by the caller) from
 * the Complete message. `what` names the call in error messages. */
static uc_status response_stream(struct uc_client *c, const char *method, const char *what,
                                 const ProtobufCMessage *req, const struct wire_field *fields,
                                 size_t n_fields, uc_chunk_fn on_chunk, void *user,
                                 struct uc_completion *comp, struct uc_client_error *err)
{
    struct call k;
    bool oom = false;
    bool stopped = false;
    bool malformed = false;
    uc_status rc;

    double t0 = uc_time_s();
    UC_CHECK(call_start(&k, c, method, err), rc, out);

    if (call_send_request(&k, req, fields, n_fields)) {
        for (;;) {
            grpc_byte_buffer *recv = NULL;
            grpc_op op = {0};
            op.op = GRPC_OP_RECV_MESSAGE;
            op.data.recv_message.recv_message = &recv;
            if (!call_batch(&k, &op, 1, &recv) || !recv) {
                break; /* the stream ended (or failed): the status says which */
            }
            double now = uc_time_s();
            grpc_slice raw;
            Uncomp__V1__GenerateResponse *r = (Uncomp__V1__GenerateResponse *)unpack_message(
                recv, &uncomp__v1__generate_response__descriptor, &raw);
            if (!r) {
                malformed = true;
                grpc_call_cancel(k.call, NULL);
                break;
            }
            if (!comp->request_id && r->request_id && r->request_id[0]) {
                comp->request_id = sdup(r->request_id, &oom);
            }
            int verdict = 0;
            if (r->kind_case == UNCOMP__V1__GENERATE_RESPONSE__KIND_CHUNK && r->chunk) {
                comp->n_chunks++;
                if (comp->client_ttft_ms == 0 && r->chunk->n_token_ids > 0) {
                    comp->client_ttft_ms = (now - t0) * 1e3;
                }
                verdict = deliver_chunk(r, raw, now, on_chunk, user, &oom);
            } else if (r->kind_case == UNCOMP__V1__GENERATE_RESPONSE__KIND_COMPLETE &&
                       r->complete) {
                copy_complete(comp, r->complete, raw, &oom);
            }
            protobuf_c_message_free_unpacked(&r->base, &pb_allocator);
            grpc_slice_unref(raw);
            if (verdict != 0 || oom) {
                stopped = true;
                grpc_call_cancel(k.call, NULL);
                break;
            }
        }
    }
    call_recv_status(&k);
    comp->client_total_ms = (uc_time_s() - t0) * 1e3;
    if (oom) {
        rc = err_nomem(err);
    } else if (malformed) {
        rc = set_err(err, UC_GRPC_INTERNAL, UC_ERR_FORMAT, "%s: malformed response", what);
    } else if (stopped) {
        rc = set_err(err, UC_GRPC_CANCELLED, UC_ERR_CANCELLED, "stopped by the chunk callback");
    } else {
        rc = status_to_err(&k, err);
        if (rc == UC_OK && !comp->complete) {
            rc = set_err(err, UC_GRPC_INTERNAL, UC_ERR_FORMAT,
                         "%s: the stream ended without a Complete message", what);
        }
    }
    call_end(&k);
out:
    return rc;
}

uc_status uc_client_generate_stream(struct uc_client *c, const struct uc_generate_params *p,
                                    uc_chunk_fn on_chunk, void *user, struct uc_completion *out,
                                    struct uc_client_error *err)
{
    struct uc_completion local;
    struct uc_completion *comp = out ? out : &local;
    struct gen_req g;

    memset(comp, 0, sizeof(*comp));
    memset(&g, 0, sizeof(g));
    err_clear(err);
    uc_status rc = build_generate(&g, p, err);
    if (rc == UC_OK) {
        rc = response_stream(c, "/uncomp.v1.Inference/Generate", "Generate", &g.req.base,
                             g.fields, g.n_fields, on_chunk, user, comp, err);
    }
    gen_req_fini(&g);
    if (!out) {
        uc_completion_fini(&local);
    }
    return rc;
}

/* ========================================================================================= */
/* Chat                                                                                      */
/* ========================================================================================= */

struct uc_chat_params uc_chat_default_params(void)
{
    struct uc_chat_params p;
    memset(&p, 0, sizeof(p));
    return p;
}

uc_status uc_client_chat_stream(struct uc_client *c, const struct uc_chat_params *p,
                                uc_chunk_fn on_chunk, void *user, struct uc_completion *out,
                                struct uc_client_error *err)
{
    struct uc_completion local;
    struct uc_completion *comp = out ? out : &local;
    struct gen_req g;
    Uncomp__V1__ChatRequest req;
    struct wire_field *fields = NULL;
    uint8_t *msg_bytes = NULL;
    uc_status rc;

    memset(comp, 0, sizeof(*comp));
    memset(&g, 0, sizeof(g));
    err_clear(err);
    protobuf_c_message_init(&uncomp__v1__chat_request__descriptor, &req);
    if (p->n_messages == 0 || !p->messages) {
        rc = set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_INVALID_ARG,
                     "chat: give at least one message");
        goto out;
    }
    UC_CHECK(build_options(&g, &p->sampling, &p->compression, "chat", err), rc, out);
    if (p->request_id) {
        req.request_id = (char *)(uintptr_t)p->request_id;
    }
    req.compression = &g.compression;
    /* each message (field 9) by hand: role (1) and content (2) with their lengths */
    size_t total = 0;
    for (size_t i = 0; i < p->n_messages; i++) {
        const struct uc_chat_message *m = &p->messages[i];
        const char *content = m->content ? m->content : "";
        size_t clen = m->content_len ? m->content_len : strlen(content);
        total += uc_pb_bytes_field_size(1, m->role ? strlen(m->role) : 0) +
                 uc_pb_bytes_field_size(2, clen);
    }
    fields = uc_calloc(p->n_messages + 1, sizeof *fields);
    msg_bytes = uc_malloc(total ? total : 1);
    if (!fields || !msg_bytes) {
        rc = err_nomem(err);
        goto out;
    }
    fields[0] = g.fields[0]; /* the sampling parameters */
    size_t at = 0;
    for (size_t i = 0; i < p->n_messages; i++) {
        const struct uc_chat_message *m = &p->messages[i];
        const char *role = m->role ? m->role : "";
        const char *content = m->content ? m->content : "";
        size_t clen = m->content_len ? m->content_len : strlen(content);
        size_t start = at;
        at += uc_pb_put_bytes_field(msg_bytes + at, 1, role, strlen(role));
        at += uc_pb_put_bytes_field(msg_bytes + at, 2, content, clen);
        fields[i + 1] =
            (struct wire_field){.field = 9, .data = msg_bytes + start, .len = at - start};
    }
    rc = response_stream(c, "/uncomp.v1.Inference/Chat", "Chat", &req.base, fields,
                         p->n_messages + 1, on_chunk, user, comp, err);
out:
    uc_free(fields);
    uc_free(msg_bytes);
    gen_req_fini(&g);
    if (!out) {
        uc_completion_fini(&local);
    }
    return rc;
}

/* Accumulates a blocking generation. */
struct gather {
    struct uc_buf text;
    uint32_t *ids;
    size_t n_ids, cap_ids;
    float *lp;
    size_t n_lp, cap_lp;
    bool oom;
};

static bool grow(void **p, size_t *cap, size_t need, size_t elt)
{
    if (need <= *cap) {
        return true;
    }
    size_t n = *cap ? *cap * 2 : 64;
    while (n < need) {
        n *= 2;
    }
    void *q = uc_realloc(*p, n * elt);
    if (!q) {
        return false;
    }
    *p = q;
    *cap = n;
    return true;
}

static int gather_chunk(const struct uc_chunk *ch, void *user)
{
    struct gather *g = user;
    uc_buf_append(&g->text, ch->text, ch->text_len);
    if (!grow((void **)&g->ids, &g->cap_ids, g->n_ids + ch->n_token_ids, sizeof(uint32_t)) ||
        !grow((void **)&g->lp, &g->cap_lp, g->n_lp + ch->n_logprobs, sizeof(float)) ||
        g->text.oom) {
        g->oom = true;
        return 1;
    }
    if (ch->n_token_ids) {
        memcpy(g->ids + g->n_ids, ch->token_ids, ch->n_token_ids * sizeof(uint32_t));
        g->n_ids += ch->n_token_ids;
    }
    for (size_t i = 0; i < ch->n_logprobs; i++) {
        g->lp[g->n_lp++] = ch->logprobs[i].logprob;
    }
    return 0;
}

/* Runs Generate (p) or else Chat (chat) to the end into *out. */
static uc_status gather_all(struct uc_client *c, const struct uc_generate_params *p,
                            const struct uc_chat_params *chat, struct uc_generation *out,
                            struct uc_client_error *err)
{
    struct gather g;
    memset(&g, 0, sizeof(g));
    memset(out, 0, sizeof(*out));
    uc_buf_init(&g.text);
    uc_status rc = p ? uc_client_generate_stream(c, p, gather_chunk, &g, &out->completion, err)
                     : uc_client_chat_stream(c, chat, gather_chunk, &g, &out->completion, err);
    if (g.oom) {
        rc = err_nomem(err);
    }
    out->text_len = g.text.len;
    out->text = uc_buf_take(&g.text);
    if (!out->text) {
        out->text = uc_strdup("");
        out->text_len = 0;
    }
    out->token_ids = g.ids;
    out->n_token_ids = g.n_ids;
    out->logprobs = g.lp;
    out->n_logprobs = g.n_lp;
    uc_buf_fini(&g.text);
    if (!out->text && rc == UC_OK) {
        rc = err_nomem(err);
    }
    return rc;
}

uc_status uc_client_generate(struct uc_client *c, const struct uc_generate_params *p,
                             struct uc_generation *out, struct uc_client_error *err)
{
    return gather_all(c, p, NULL, out, err);
}

uc_status uc_client_chat(struct uc_client *c, const struct uc_chat_params *p,
                         struct uc_generation *out, struct uc_client_error *err)
{
    return gather_all(c, NULL, p, out, err);
}

/* ========================================================================================= */
/* Tokenize, Detokenize, Abort, Health                                                       */
/* ========================================================================================= */

void uc_tokens_fini(struct uc_tokens *t)
{
    if (!t) {
        return;
    }
    for (size_t i = 0; i < t->n_pieces; i++) {
        uc_free(t->pieces[i]);
    }
    uc_free(t->pieces);
    uc_free(t->ids);
    memset(t, 0, sizeof(*t));
}

uc_status uc_client_tokenize(struct uc_client *c, const char *text, size_t text_len,
                             bool add_special_tokens, struct uc_tokens *out,
                             struct uc_client_error *err)
{
    Uncomp__V1__TokenizeRequest req;
    protobuf_c_message_init(&uncomp__v1__tokenize_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    bool oom = false;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    if (!text && text_len > 0) {
        return set_err(err, UC_GRPC_INVALID_ARGUMENT, UC_ERR_INVALID_ARG,
                       "tokenize: text is NULL but text_len is %zu", text_len);
    }
    /* field 1 (text) by hand, with its length */
    const struct wire_field text_field = {.field = 1, .data = text, .len = text_len};
    req.add_special_tokens = add_special_tokens;
    UC_CHECK(unary_raw(c, "/uncomp.v1.Inference/Tokenize", &req.base, &text_field,
                       text_len > 0 ? 1 : 0, &uncomp__v1__tokenize_response__descriptor, &m, NULL,
                       err),
             rc, out);
    const Uncomp__V1__TokenizeResponse *r = (const Uncomp__V1__TokenizeResponse *)m;
    out->ids = adup(r->token_ids, r->n_token_ids, sizeof(uint32_t), &oom);
    out->n_ids = out->ids ? r->n_token_ids : 0;
    if (r->n_tokens) {
        out->pieces = uc_calloc(r->n_tokens, sizeof(char *));
        if (out->pieces) {
            out->n_pieces = r->n_tokens;
            for (size_t i = 0; i < r->n_tokens; i++) {
                out->pieces[i] = sdup(r->tokens[i], &oom);
            }
        } else {
            oom = true;
        }
    }
    protobuf_c_message_free_unpacked(m, &pb_allocator);
    if (oom) {
        uc_tokens_fini(out);
        rc = err_nomem(err);
    }
out:
    return rc;
}

uc_status uc_client_detokenize(struct uc_client *c, const uint32_t *ids, size_t n_ids,
                               bool skip_special_tokens, char **text_out, size_t *text_len_out,
                               struct uc_client_error *err)
{
    static const uint32_t text_path[] = {1}; /* DetokenizeResponse.text */
    grpc_slice raw = grpc_empty_slice();
    Uncomp__V1__DetokenizeRequest req;
    protobuf_c_message_init(&uncomp__v1__detokenize_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    bool oom = false;
    uc_status rc;

    *text_out = NULL;
    if (text_len_out) {
        *text_len_out = 0;
    }
    req.n_token_ids = n_ids;
    req.token_ids = (uint32_t *)(uintptr_t)ids;
    req.skip_special_tokens = skip_special_tokens;
    UC_CHECK(unary_raw(c, "/uncomp.v1.Inference/Detokenize", &req.base, NULL, 0,
                       &uncomp__v1__detokenize_response__descriptor, &m, &raw, err),
             rc, out);
    const char *text = ((const Uncomp__V1__DetokenizeResponse *)m)->text;
    size_t len = text_len(text, raw, text_path, 1, SIZE_MAX);
    *text_out = mdup(text ? text : "", len, &oom);
    protobuf_c_message_free_unpacked(m, &pb_allocator);
    if (oom) {
        rc = err_nomem(err);
    } else if (text_len_out) {
        *text_len_out = len;
    }
out:
    grpc_slice_unref(raw);
    return rc;
}

uc_status uc_client_abort(struct uc_client *c, const char *request_id, bool *found,
                          struct uc_client_error *err)
{
    Uncomp__V1__AbortRequest req;
    protobuf_c_message_init(&uncomp__v1__abort_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    uc_status rc;

    if (found) {
        *found = false;
    }
    req.request_id = (char *)(uintptr_t)(request_id ? request_id : "");
    UC_CHECK(unary(c, "/uncomp.v1.Inference/Abort", &req.base,
                   &uncomp__v1__abort_response__descriptor, &m, err),
             rc, out);
    if (found) {
        *found = ((const Uncomp__V1__AbortResponse *)m)->found;
    }
    protobuf_c_message_free_unpacked(m, &pb_allocator);
out:
    return rc;
}

uc_status uc_client_health(struct uc_client *c, const char *service,
                           enum uc_health_status *out, struct uc_client_error *err)
{
    Grpc__Health__V1__HealthCheckRequest req;
    protobuf_c_message_init(&grpc__health__v1__health_check_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    uc_status rc;

    *out = UC_HEALTH_UNKNOWN;
    req.service = (char *)(uintptr_t)(service ? service : "");
    UC_CHECK(unary(c, "/grpc.health.v1.Health/Check", &req.base,
                   &grpc__health__v1__health_check_response__descriptor, &m, err),
             rc, out);
    *out = (enum uc_health_status)((const Grpc__Health__V1__HealthCheckResponse *)m)->status;
    protobuf_c_message_free_unpacked(m, &pb_allocator);
out:
    return rc;
}

/* ========================================================================================= */
/* Admin                                                                                     */
/* ========================================================================================= */

void uc_server_info_fini(struct uc_server_info *s)
{
    if (!s) {
        return;
    }
    uc_free(s->version);
    uc_free(s->build);
    uc_free(s->state);
    uc_free(s->default_policy);
    uc_free(s->backend);
    for (size_t i = 0; i < s->n_ranks; i++) {
        uc_free(s->ranks[i].host);
        uc_free(s->ranks[i].device);
    }
    uc_free(s->ranks);
    memset(s, 0, sizeof(*s));
}

uc_status uc_client_server_info(struct uc_client *c, struct uc_server_info *out,
                                struct uc_client_error *err)
{
    Uncomp__V1__GetServerInfoRequest req;
    protobuf_c_message_init(&uncomp__v1__get_server_info_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    bool oom = false;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    UC_CHECK(unary(c, "/uncomp.v1.Admin/GetServerInfo", &req.base,
                   &uncomp__v1__server_info__descriptor, &m, err),
             rc, out);
    const Uncomp__V1__ServerInfo *r = (const Uncomp__V1__ServerInfo *)m;
    out->version = sdup(r->version, &oom);
    out->build = sdup(r->build, &oom);
    out->uptime_s = r->uptime_s;
    out->state = sdup(r->state, &oom);
    out->tp_size = r->tp_size;
    out->running_requests = r->running_requests;
    out->queued_requests = r->queued_requests;
    out->default_policy = sdup(r->default_policy, &oom);
    out->default_kv_budget = r->default_kv_budget;
    out->backend = sdup(r->backend, &oom);
    if (r->n_ranks) {
        out->ranks = uc_calloc(r->n_ranks, sizeof(*out->ranks));
        if (out->ranks) {
            out->n_ranks = r->n_ranks;
            for (size_t i = 0; i < r->n_ranks; i++) {
                const Uncomp__V1__RankInfo *ri = r->ranks[i];
                out->ranks[i].rank = ri->rank;
                out->ranks[i].host = sdup(ri->host, &oom);
                out->ranks[i].device = sdup(ri->device, &oom);
                out->ranks[i].weight_bytes = ri->weight_bytes;
                out->ranks[i].kv_bytes = ri->kv_bytes;
            }
        } else {
            oom = true;
        }
    }
    protobuf_c_message_free_unpacked(m, &pb_allocator);
    if (oom) {
        uc_server_info_fini(out);
        rc = err_nomem(err);
    }
out:
    return rc;
}

void uc_model_info_fini(struct uc_model_info *mi)
{
    if (!mi) {
        return;
    }
    uc_free(mi->path);
    uc_free(mi->architecture);
    uc_free(mi->dtype);
    uc_free(mi->tokenizer);
    uc_free(mi->eos_token_ids);
    memset(mi, 0, sizeof(*mi));
}

uc_status uc_client_model_info(struct uc_client *c, struct uc_model_info *out,
                               struct uc_client_error *err)
{
    Uncomp__V1__GetModelInfoRequest req;
    protobuf_c_message_init(&uncomp__v1__get_model_info_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    bool oom = false;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    UC_CHECK(unary(c, "/uncomp.v1.Admin/GetModelInfo", &req.base,
                   &uncomp__v1__model_info__descriptor, &m, err),
             rc, out);
    const Uncomp__V1__ModelInfo *r = (const Uncomp__V1__ModelInfo *)m;
    out->path = sdup(r->path, &oom);
    out->architecture = sdup(r->architecture, &oom);
    out->layers = r->layers;
    out->heads = r->heads;
    out->kv_heads = r->kv_heads;
    out->head_dim = r->head_dim;
    out->hidden_size = r->hidden_size;
    out->intermediate_size = r->intermediate_size;
    out->vocab_size = r->vocab_size;
    out->context_length = r->context_length;
    out->dtype = sdup(r->dtype, &oom);
    out->tokenizer = sdup(r->tokenizer, &oom);
    out->bos_token_id = r->bos_token_id;
    out->eos_token_ids = adup(r->eos_token_ids, r->n_eos_token_ids, sizeof(int32_t), &oom);
    out->n_eos_token_ids = out->eos_token_ids ? r->n_eos_token_ids : 0;
    protobuf_c_message_free_unpacked(m, &pb_allocator);
    if (oom) {
        uc_model_info_fini(out);
        rc = err_nomem(err);
    }
out:
    return rc;
}

void uc_stats_fini(struct uc_stats *s)
{
    if (!s) {
        return;
    }
    uc_free(s->text);
    memset(s, 0, sizeof(*s));
}

static struct uc_percentiles copy_pct(const Uncomp__V1__Percentiles *p)
{
    struct uc_percentiles o = {0};
    if (p) {
        o = (struct uc_percentiles){
            .p50 = p->p50, .p90 = p->p90, .p99 = p->p99, .mean = p->mean, .count = p->count};
    }
    return o;
}

uc_status uc_client_stats(struct uc_client *c, const char *section, struct uc_stats *out,
                          struct uc_client_error *err)
{
    Uncomp__V1__GetStatsRequest req;
    protobuf_c_message_init(&uncomp__v1__get_stats_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    bool oom = false;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    req.section = (char *)(uintptr_t)(section ? section : "");
    UC_CHECK(unary(c, "/uncomp.v1.Admin/GetStats", &req.base, &uncomp__v1__stats__descriptor, &m,
                   err),
             rc, out);
    const Uncomp__V1__Stats *r = (const Uncomp__V1__Stats *)m;
    out->requests_total = r->requests_total;
    out->requests_finished = r->requests_finished;
    out->requests_failed = r->requests_failed;
    out->requests_aborted = r->requests_aborted;
    out->requests_rejected = r->requests_rejected;
    out->prompt_tokens_total = r->prompt_tokens_total;
    out->generation_tokens_total = r->generation_tokens_total;
    out->running = r->running;
    out->queued = r->queued;
    out->kv_usage = r->kv_usage;
    out->kv_tokens_full_total = r->kv_tokens_full_total;
    out->kv_tokens_kept_total = r->kv_tokens_kept_total;
    out->prefill_rows_dropped_total = r->prefill_rows_dropped_total;
    out->compression_seconds_total = r->compression_seconds_total;
    out->ttft_ms = copy_pct(r->ttft_ms);
    out->inter_token_ms = copy_pct(r->inter_token_ms);
    out->e2e_ms = copy_pct(r->e2e_ms);
    out->queue_ms = copy_pct(r->queue_ms);
    out->text = sdup(r->text, &oom);
    protobuf_c_message_free_unpacked(m, &pb_allocator);
    if (oom) {
        uc_stats_fini(out);
        rc = err_nomem(err);
    }
out:
    return rc;
}

void uc_client_profile_fini(struct uc_client_profile *p)
{
    if (!p) {
        return;
    }
    uc_free(p->source);
    uc_free(p->path);
    uc_free(p->stage_starts);
    for (size_t i = 0; i < p->n_layers; i++) {
        uc_free(p->layers[i].head_entropy);
        uc_free(p->layers[i].kv_head_entropy);
        uc_free(p->layers[i].kv_head_group);
    }
    uc_free(p->layers);
    uc_free(p->json);
    memset(p, 0, sizeof(*p));
}

static uc_status copy_profile(struct uc_client_profile *out, const Uncomp__V1__CompressionProfile *r,
                              struct uc_client_error *err)
{
    bool oom = false;
    out->present = r->present;
    out->source = sdup(r->source, &oom);
    out->path = sdup(r->path, &oom);
    out->created_unix_ms = r->created_unix_ms;
    out->calib_tokens = r->calib_tokens;
    out->head_groups = r->head_groups;
    out->stage_starts = adup(r->stage_starts, r->n_stage_starts, sizeof(uint32_t), &oom);
    out->n_stage_starts = out->stage_starts ? r->n_stage_starts : 0;
    out->json = sdup(r->json, &oom);
    if (r->n_layers) {
        out->layers = uc_calloc(r->n_layers, sizeof(*out->layers));
        if (out->layers) {
            out->n_layers = r->n_layers;
            for (size_t i = 0; i < r->n_layers; i++) {
                const Uncomp__V1__LayerProfile *l = r->layers[i];
                struct uc_layer_profile *o = &out->layers[i];
                o->layer = l->layer;
                o->entropy = l->entropy;
                o->score = l->score;
                o->stage = l->stage;
                o->head_entropy = adup(l->head_entropy, l->n_head_entropy, sizeof(double), &oom);
                o->n_head_entropy = o->head_entropy ? l->n_head_entropy : 0;
                /* entropy and group come in pairs; a short list pads with zeros */
                size_t n = l->n_kv_head_entropy > l->n_kv_head_group ? l->n_kv_head_entropy
                                                                     : l->n_kv_head_group;
                if (n) {
                    o->kv_head_entropy = uc_calloc(n, sizeof(double));
                    o->kv_head_group = uc_calloc(n, sizeof(uint32_t));
                    if (!o->kv_head_entropy || !o->kv_head_group) {
                        oom = true;
                        continue;
                    }
                    o->n_kv_heads = n;
                    for (size_t h = 0; h < l->n_kv_head_entropy; h++) {
                        o->kv_head_entropy[h] = l->kv_head_entropy[h];
                    }
                    for (size_t h = 0; h < l->n_kv_head_group; h++) {
                        o->kv_head_group[h] = l->kv_head_group[h];
                    }
                }
            }
        } else {
            oom = true;
        }
    }
    if (oom) {
        uc_client_profile_fini(out);
        return err_nomem(err);
    }
    return UC_OK;
}

uc_status uc_client_profile(struct uc_client *c, struct uc_client_profile *out,
                            struct uc_client_error *err)
{
    Uncomp__V1__GetCompressionProfileRequest req;
    protobuf_c_message_init(&uncomp__v1__get_compression_profile_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    UC_CHECK(unary(c, "/uncomp.v1.Admin/GetCompressionProfile", &req.base,
                   &uncomp__v1__compression_profile__descriptor, &m, err),
             rc, out);
    rc = copy_profile(out, (const Uncomp__V1__CompressionProfile *)m, err);
    protobuf_c_message_free_unpacked(m, &pb_allocator);
out:
    return rc;
}

uc_status uc_client_calibrate(struct uc_client *c, const char *text, uint32_t window_tokens,
                              uint32_t max_windows, struct uc_client_profile *out,
                              struct uc_client_error *err)
{
    Uncomp__V1__CalibrateRequest req;
    protobuf_c_message_init(&uncomp__v1__calibrate_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    req.text = (char *)(uintptr_t)(text ? text : "");
    req.window_tokens = window_tokens;
    req.max_windows = max_windows;
    UC_CHECK(unary(c, "/uncomp.v1.Admin/Calibrate", &req.base,
                   &uncomp__v1__compression_profile__descriptor, &m, err),
             rc, out);
    rc = copy_profile(out, (const Uncomp__V1__CompressionProfile *)m, err);
    protobuf_c_message_free_unpacked(m, &pb_allocator);
out:
    return rc;
}

void uc_client_policy_fini(struct uc_client_policy *p)
{
    if (!p) {
        return;
    }
    uc_free(p->policy);
    uc_free(p->decode_mode);
    uc_free(p->grouping);
    memset(p, 0, sizeof(*p));
}

uc_status uc_client_set_policy(struct uc_client *c, const struct uc_client_policy *in,
                               struct uc_client_policy *out, struct uc_client_error *err)
{
    Uncomp__V1__SetCompressionPolicyRequest req;
    protobuf_c_message_init(&uncomp__v1__set_compression_policy_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    bool oom = false;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    if (in->policy) {
        req.policy = in->policy;
    }
    req.kv_budget = in->kv_budget;
    if (in->decode_mode) {
        req.decode_mode = in->decode_mode;
    }
    if (in->grouping) {
        req.grouping = in->grouping;
    }
    UC_CHECK(unary(c, "/uncomp.v1.Admin/SetCompressionPolicy", &req.base,
                   &uncomp__v1__set_compression_policy_response__descriptor, &m, err),
             rc, out);
    const Uncomp__V1__SetCompressionPolicyResponse *r =
        (const Uncomp__V1__SetCompressionPolicyResponse *)m;
    out->policy = sdup(r->policy, &oom);
    out->kv_budget = r->kv_budget;
    out->decode_mode = sdup(r->decode_mode, &oom);
    out->grouping = sdup(r->grouping, &oom);
    protobuf_c_message_free_unpacked(m, &pb_allocator);
    if (oom) {
        uc_client_policy_fini(out);
        rc = err_nomem(err);
    }
out:
    return rc;
}

uc_status uc_client_drain(struct uc_client *c, uint32_t timeout_ms, struct uc_drain_result *out,
                          struct uc_client_error *err)
{
    Uncomp__V1__DrainRequest req;
    protobuf_c_message_init(&uncomp__v1__drain_request__descriptor, &req);
    ProtobufCMessage *m = NULL;
    uc_status rc;

    memset(out, 0, sizeof(*out));
    req.timeout_ms = timeout_ms;
    UC_CHECK(unary(c, "/uncomp.v1.Admin/Drain", &req.base, &uncomp__v1__drain_response__descriptor,
                   &m, err),
             rc, out);
    const Uncomp__V1__DrainResponse *r = (const Uncomp__V1__DrainResponse *)m;
    out->finished = r->finished;
    out->aborted = r->aborted;
    protobuf_c_message_free_unpacked(m, &pb_allocator);
out:
    return rc;
}
