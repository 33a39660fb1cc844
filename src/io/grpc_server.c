/*
 * grpc_server: see grpc_server.h for the model. Notes on the implementation:
 *
 * - Tags: every asynchronous operation carries a pointer to an rpc_tag_t embedded in its
 *   call (or the server, for shutdown), naming what completed.
 * - One completion queue per CQ thread. A call is bound to the queue that accepted it, so
 *   its completions and its release all happen on that one thread; a handler running on
 *   that thread therefore never sees its call freed under it.
 * - Unary calls need no lock: the owner starts one final batch and never touches the call
 *   again; the CQ thread frees it when the batch completes.
 * - Stream calls have a mutex serializing the owner's operations (from any thread) with
 *   the CQ thread's completions. `pending` counts operations in flight plus a completion
 *   being dispatched, and the call is freed when it is finishing and nothing is pending,
 *   by whichever thread brings `pending` to zero (at most one can).
 */
#include "io/grpc_server.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "runtime/log.h"

#define MOD "grpc"

/* A call changes owner through gRPC's uninstrumented completion queue; tell TSan. */
#if defined(__SANITIZE_THREAD__)
#define PAY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PAY_TSAN 1
#endif
#endif
#ifdef PAY_TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define TSAN_ACQUIRE(p) __tsan_acquire(p)
#define TSAN_RELEASE(p) __tsan_release(p)
#else
#define TSAN_ACQUIRE(p) ((void)(p))
#define TSAN_RELEASE(p) ((void)(p))
#endif

typedef enum method_kind {
    M_UNARY,
    M_STREAM,
    M_GENERIC, /* every unregistered path */
} method_kind_t;

typedef struct rpc_method {
    method_kind_t kind;
    char *path;
    void *registered; /* grpc_server_register_method handle */
    const ProtobufCMessageDescriptor *request;
    rpc_unary_fn unary;
    void *arg;
    rpc_stream_method_t stream;
    rpc_respond_fn respond; /* responder streams */
    void *respond_arg;
} rpc_method_t;

typedef enum tag_kind {
    TAG_NEW,    /* an armed request delivered a call (or failed at shutdown) */
    TAG_UNARY,  /* the final batch of a unary (or unknown-method) call */
    TAG_CLOSE,  /* stream: RECV_CLOSE_ON_SERVER */
    TAG_SEND,   /* stream: SEND_MESSAGE */
    TAG_RECV,   /* stream: RECV_MESSAGE */
    TAG_STATUS, /* stream: SEND_STATUS_FROM_SERVER */
    TAG_SHUTDOWN,
} tag_kind_t;

typedef struct rpc_tag {
    tag_kind_t kind;
    rpc_call_t *call;
} rpc_tag_t;

typedef struct rpc_cq {
    rpc_server_t *srv;
    grpc_completion_queue *cq;
    pthread_t thread;
    bool running;
    unsigned index;
} rpc_cq_t;

struct rpc_server {
    rpc_server_config_t cfg;
    char *host;
    grpc_server *server;
    rpc_method_t **methods;
    size_t nmethods;
    rpc_method_t generic;
    rpc_cq_t *cqs;
    unsigned ncq;
    int port;
    rpc_finish_hook_fn hook;
    void *hook_arg;
    bool started;   /* main thread */
    bool accepting; /* main thread: shutdown_and_notify not yet called */
    /* Set once by the main at stop_accepting, read by CQ threads to stop re-arming; a
     * stale read only arms a request that then fails at once: relaxed is enough. */
    atomic_bool stopping;
    rpc_tag_t shutdown_tag;
    pthread_mutex_t mu; /* guards shutdown_done; pairs with cv for the waits below */
    pthread_cond_t cv;
    bool shutdown_done;
    /* Calls accepted and not yet freed. The decrement that reaches zero takes mu before
     * broadcasting, so a waiter that read a non-zero count under mu cannot miss it. */
    atomic_size_t inflight;
};

struct rpc_call {
    rpc_server_t *srv;
    rpc_cq_t *q;
    rpc_method_t *method;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_call_details details; /* generic calls: path and deadline */
    grpc_metadata_array md;
    grpc_byte_buffer *payload; /* first message, for methods registered to read it */
    ProtobufCMessage *request;
    uint64_t start_ns;
    uint64_t deadline_ns;
    void *user;
    rpc_tag_t tag_new, tag_unary, tag_close, tag_send, tag_recv, tag_status;

    /* The end of the call, written by its owner before the final batch. */
    grpc_status_code status;
    grpc_slice status_details;
    bool has_details;
    grpc_metadata *trailers;
    size_t ntrailers;
    grpc_byte_buffer *send_buf;
    int cancelled; /* RECV_CLOSE_ON_SERVER result */

    /* Streams only; guarded by mu. */
    bool is_stream;
    pthread_mutex_t mu;
    unsigned pending;
    bool md_sent, send_busy, recv_busy, finishing, finish_deferred, released;
    grpc_byte_buffer *recv_buf;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        LOG_ERROR(MOD, "out of memory");
        abort();
    }
    return p;
}

static char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p) {
        LOG_ERROR(MOD, "out of memory");
        abort();
    }
    return p;
}

const char *rpc_status_name(grpc_status_code code)
{
    static const char *const names[] = {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    if ((unsigned)code < sizeof(names) / sizeof(names[0]))
        return names[code];
    return "UNKNOWN";
}

/* ---- calls: allocation and release ---- */

static rpc_call_t *call_new(rpc_cq_t *q, rpc_method_t *m)
{
    rpc_call_t *c = xcalloc(1, sizeof(*c));
    c->srv = q->srv;
    c->q = q;
    c->method = m;
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    c->tag_new = (rpc_tag_t){TAG_NEW, c};
    c->tag_unary = (rpc_tag_t){TAG_UNARY, c};
    c->tag_close = (rpc_tag_t){TAG_CLOSE, c};
    c->tag_send = (rpc_tag_t){TAG_SEND, c};
    c->tag_recv = (rpc_tag_t){TAG_RECV, c};
    c->tag_status = (rpc_tag_t){TAG_STATUS, c};
    c->status = GRPC_STATUS_UNKNOWN;
    return c;
}

static void call_free_fields(rpc_call_t *c)
{
    if (c->call)
        grpc_call_unref(c->call);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    if (c->request)
        protobuf_c_message_free_unpacked(c->request, NULL);
    if (c->send_buf)
        grpc_byte_buffer_destroy(c->send_buf);
    if (c->recv_buf)
        grpc_byte_buffer_destroy(c->recv_buf);
    for (size_t i = 0; i < c->ntrailers; i++) {
        grpc_slice_unref(c->trailers[i].key);
        grpc_slice_unref(c->trailers[i].value);
    }
    free(c->trailers);
    if (c->has_details)
        grpc_slice_unref(c->status_details);
    if (c->is_stream)
        pthread_mutex_destroy(&c->mu);
    free(c);
}

/* The end of an accepted call: the finish hook, then the memory. */
static void call_release(rpc_call_t *c)
{
    rpc_server_t *s = c->srv;
    grpc_status_code code = c->status;
    if (c->cancelled && code == GRPC_STATUS_OK)
        code = GRPC_STATUS_CANCELLED;
    if (c->cancelled && c->deadline_ns && now_ns() >= c->deadline_ns)
        code = GRPC_STATUS_DEADLINE_EXCEEDED;
    if (s->hook)
        s->hook(s->hook_arg, rpc_call_method(c), code, now_ns() - c->start_ns);
    call_free_fields(c);
    /* acq_rel: the memory freed above is done with before a waiter may destroy the server. */
    if (atomic_fetch_sub_explicit(&s->inflight, 1, memory_order_acq_rel) == 1) {
        pthread_mutex_lock(&s->mu);
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
}

/* ---- arming requests ---- */

static int arm(rpc_cq_t *q, rpc_method_t *m)
{
    rpc_server_t *s = q->srv;
    rpc_call_t *c = call_new(q, m);
    grpc_call_error e;
    if (m->kind == M_GENERIC)
        e = grpc_server_request_call(s->server, &c->call, &c->details, &c->md, q->cq, q->cq,
                                     &c->tag_new);
    else
        e = grpc_server_request_registered_call(s->server, m->registered, &c->call, &c->deadline,
                                                &c->md, m->request ? &c->payload : NULL, q->cq,
                                                q->cq, &c->tag_new);
    if (e != GRPC_CALL_OK) {
        LOG_ERROR(MOD, "cannot arm a request for %s: %s", m->path, grpc_call_error_to_string(e));
        call_free_fields(c);
        return -EIO;
    }
    return 0;
}

/* ---- the final batch of a unary call ---- */

static bool trailers_legal(const rpc_md_t *tr, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!tr[i].key || !tr[i].value)
            return false;
        grpc_slice k = grpc_slice_from_static_string(tr[i].key);
        grpc_slice v = grpc_slice_from_static_string(tr[i].value);
        if (!grpc_header_key_is_legal(k) || grpc_is_binary_header(k) ||
            !grpc_header_nonbin_value_is_legal(v) || tr[i].key[0] == ':' ||
            strncmp(tr[i].key, "grpc-", 5) == 0)
            return false;
    }
    return true;
}

/* Records status, message and trailers in the call (kept until it is freed). */
static void set_status(rpc_call_t *c, grpc_status_code code, const char *message,
                       const rpc_md_t *tr, size_t ntr)
{
    if (ntr && !trailers_legal(tr, ntr)) {
        LOG_ERROR(MOD, "%s: illegal trailing metadata dropped; call ends INTERNAL",
                  rpc_call_method(c));
        code = GRPC_STATUS_INTERNAL;
        message = "server error: illegal trailing metadata";
        ntr = 0;
    }
    c->status = code;
    if (message && *message) {
        c->status_details = grpc_slice_from_copied_string(message);
        c->has_details = true;
    }
    if (ntr) {
        c->trailers = xcalloc(ntr, sizeof(*c->trailers));
        for (size_t i = 0; i < ntr; i++) {
            c->trailers[i].key = grpc_slice_from_copied_string(tr[i].key);
            c->trailers[i].value = grpc_slice_from_copied_string(tr[i].value);
        }
        c->ntrailers = ntr;
    }
}

static void fill_status_op(rpc_call_t *c, grpc_op *op)
{
    op->op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    op->data.send_status_from_server.status = c->status;
    op->data.send_status_from_server.status_details = c->has_details ? &c->status_details : NULL;
    op->data.send_status_from_server.trailing_metadata = c->trailers;
    op->data.send_status_from_server.trailing_metadata_count = c->ntrailers;
}

static grpc_byte_buffer *pack(const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    grpc_slice sl = grpc_slice_malloc(len);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(sl));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

static grpc_byte_buffer *bytes_buffer(const uint8_t *data, size_t len)
{
    grpc_slice sl = grpc_slice_from_copied_buffer((const char *)data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

static int stream_finish(rpc_call_t *c, grpc_status_code code, const char *message,
                         const rpc_md_t *tr, size_t ntr);

static int unary_complete(rpc_call_t *c, grpc_status_code code, const char *message,
                          grpc_byte_buffer *bb, const rpc_md_t *tr, size_t ntr)
{
    if (c->is_stream) {
        if (bb)
            grpc_byte_buffer_destroy(bb);
        return stream_finish(c, code, message, tr, ntr);
    }
    set_status(c, code, message, tr, ntr);
    c->send_buf = bb;
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (bb) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = bb;
    }
    fill_status_op(c, &ops[n++]);
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    /* From here the call is the CQ thread's: publish our writes to it, and read nothing
     * of it once start_batch may have handed it over. */
    grpc_call *gcall = c->call;
    TSAN_RELEASE(c);
    grpc_call_error e = grpc_call_start_batch(gcall, ops, n, &c->tag_unary, NULL);
    if (e != GRPC_CALL_OK) {
        LOG_ERROR(MOD, "%s: cannot complete the call: %s", rpc_call_method(c),
                  grpc_call_error_to_string(e));
        grpc_call_cancel(c->call, NULL);
        c->status = GRPC_STATUS_INTERNAL;
        call_release(c);
        return -EIO;
    }
    return 0;
}

int rpc_call_reply(rpc_call_t *call, const ProtobufCMessage *resp, const rpc_md_t *trailers,
                   size_t ntrailers)
{
    return unary_complete(call, GRPC_STATUS_OK, NULL, pack(resp), trailers, ntrailers);
}

int rpc_call_fail(rpc_call_t *call, grpc_status_code code, const char *message,
                  const rpc_md_t *trailers, size_t ntrailers)
{
    if (code == GRPC_STATUS_OK) {
        LOG_ERROR(MOD, "%s: rpc_call_fail with OK; call ends INTERNAL", rpc_call_method(call));
        code = GRPC_STATUS_INTERNAL;
        message = "server error: failure without a status";
    }
    return unary_complete(call, code, message, NULL, trailers, ntrailers);
}

/* ---- call accessors ---- */

const char *rpc_call_method(const rpc_call_t *call)
{
    return call->method->kind == M_GENERIC ? "unknown" : call->method->path;
}

int rpc_call_peer(const rpc_call_t *call, char *buf, size_t buflen)
{
    char *p = grpc_call_get_peer(call->call);
    int rc = 0;
    if (buflen == 0)
        rc = -ENOSPC;
    else if ((size_t)snprintf(buf, buflen, "%s", p ? p : "") >= buflen)
        rc = -ENOSPC;
    gpr_free(p);
    return rc;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

int rpc_call_peer_ip(const rpc_call_t *call, char *buf, size_t buflen)
{
    char peer[256], dec[256];
    int rc = rpc_call_peer(call, peer, sizeof(peer));
    if (rc < 0)
        return rc;
    /* gRPC writes URIs: "ipv4:1.2.3.4:5", "ipv6:[::1]:5" or "ipv6:%5B::1%5D:5". */
    size_t n = 0;
    for (const char *p = peer; *p && n + 1 < sizeof(dec); p++) {
        if (p[0] == '%' && hexval(p[1]) >= 0 && hexval(p[2]) >= 0) {
            dec[n++] = (char)(hexval(p[1]) * 16 + hexval(p[2]));
            p += 2;
        } else {
            dec[n++] = *p;
        }
    }
    dec[n] = '\0';
    const char *start, *end;
    if (strncmp(dec, "ipv4:", 5) == 0) {
        start = dec + 5;
        end = strrchr(start, ':');
    } else if (strncmp(dec, "ipv6:[", 6) == 0) {
        start = dec + 6;
        end = strchr(start, ']');
    } else {
        return -ENOENT;
    }
    if (!end || end == start)
        return -ENOENT;
    size_t len = (size_t)(end - start);
    if (len + 1 > buflen)
        return -ENOSPC;
    memcpy(buf, start, len);
    buf[len] = '\0';
    return 0;
}

bool rpc_call_metadata(const rpc_call_t *call, const char *key, const char **value, size_t *len)
{
    for (size_t i = 0; i < call->md.count; i++) {
        if (grpc_slice_str_cmp(call->md.metadata[i].key, key) == 0) {
            *value = (const char *)GRPC_SLICE_START_PTR(call->md.metadata[i].value);
            *len = GRPC_SLICE_LENGTH(call->md.metadata[i].value);
            return true;
        }
    }
    return false;
}

uint64_t rpc_call_deadline_ns(const rpc_call_t *call)
{
    return call->deadline_ns;
}

void rpc_call_set_user(rpc_call_t *call, void *user)
{
    call->user = user;
}

void *rpc_call_user(const rpc_call_t *call)
{
    return call->user;
}

/* Converts gRPC's deadline to our monotonic clock: now + what remains of it. */
static uint64_t deadline_to_ns(gpr_timespec d, uint64_t now)
{
    if (d.tv_sec == INT64_MAX || d.clock_type == GPR_TIMESPAN)
        return 0;
    gpr_timespec left = gpr_time_sub(d, gpr_now(d.clock_type));
    if (left.tv_sec < 0)
        return now;
    if (left.tv_sec > 100L * 365 * 24 * 3600) /* effectively none */
        return 0;
    return now + (uint64_t)left.tv_sec * 1000000000u + (uint64_t)left.tv_nsec;
}

/* ---- decoding ---- */

/* Reads a received buffer into one contiguous slice. -EINVAL if it cannot be read. */
static int read_buffer(grpc_byte_buffer *bb, grpc_slice *out)
{
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return -EINVAL;
    *out = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    return 0;
}

/* Decodes the first message. On failure writes the INVALID_ARGUMENT message. */
static int decode_request(rpc_call_t *c, grpc_slice *wire, char *err, size_t errlen)
{
    const ProtobufCMessageDescriptor *d = c->method->request;
    if (!c->payload) {
        snprintf(err, errlen, "request: missing %s message", d->name);
        return -EINVAL;
    }
    if (read_buffer(c->payload, wire) < 0) {
        snprintf(err, errlen, "request: cannot decompress the %s message", d->name);
        return -EINVAL;
    }
    grpc_byte_buffer_destroy(c->payload);
    c->payload = NULL;
    c->request =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(*wire), GRPC_SLICE_START_PTR(*wire));
    if (!c->request) {
        grpc_slice_unref(*wire);
        snprintf(err, errlen, "request: malformed %s message", d->name);
        return -EINVAL;
    }
    return 0;
}

/* ---- streams ---- */

/* Called with c->mu held. */
static int start_status_locked(rpc_call_t *c)
{
    grpc_op ops[2];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    if (!c->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->md_sent = true;
    }
    fill_status_op(c, &ops[n++]);
    c->pending++;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &c->tag_status, NULL);
    if (e != GRPC_CALL_OK) {
        LOG_ERROR(MOD, "%s: cannot send the status: %s", rpc_call_method(c),
                  grpc_call_error_to_string(e));
        c->pending--;
        grpc_call_cancel(c->call, NULL);
        return -EIO;
    }
    return 0;
}

/* Drops one pending count; frees the call if that was the last thing keeping it. */
static void stream_unpend(rpc_call_t *c)
{
    pthread_mutex_lock(&c->mu);
    c->pending--;
    bool release = c->finishing && c->pending == 0 && !c->released;
    if (release)
        c->released = true;
    pthread_mutex_unlock(&c->mu);
    if (release)
        call_release(c);
}

static int stream_finish(rpc_call_t *c, grpc_status_code code, const char *message,
                         const rpc_md_t *tr, size_t ntr)
{
    pthread_mutex_lock(&c->mu);
    if (c->finishing) {
        pthread_mutex_unlock(&c->mu);
        return -EALREADY;
    }
    c->finishing = true;
    set_status(c, code, message, tr, ntr);
    int rc = 0;
    c->pending++; /* ours, so that a failure below can release the call */
    if (c->send_busy)
        c->finish_deferred = true; /* one message at a time; the status follows it */
    else
        rc = start_status_locked(c);
    pthread_mutex_unlock(&c->mu);
    stream_unpend(c);
    return rc;
}

int rpc_stream_finish(rpc_call_t *call, grpc_status_code code, const char *message)
{
    return stream_finish(call, code, message, NULL, 0);
}

static int stream_send_buffer(rpc_call_t *c, grpc_byte_buffer *bb)
{
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    if (c->finishing) {
        rc = -EPIPE;
    } else if (c->send_busy) {
        rc = -EBUSY;
    } else {
        grpc_op ops[2];
        memset(ops, 0, sizeof(ops));
        size_t n = 0;
        bool md = !c->md_sent;
        if (md)
            ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = bb;
        c->send_buf = bb;
        c->send_busy = true;
        c->md_sent = true;
        c->pending++;
        grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &c->tag_send, NULL);
        if (e != GRPC_CALL_OK) {
            LOG_ERROR(MOD, "%s: cannot send a message: %s", rpc_call_method(c),
                      grpc_call_error_to_string(e));
            c->send_buf = NULL;
            c->send_busy = false;
            c->md_sent = !md;
            c->pending--;
            grpc_call_cancel(c->call, NULL);
            rc = -EIO;
        }
    }
    pthread_mutex_unlock(&c->mu);
    if (rc < 0)
        grpc_byte_buffer_destroy(bb);
    return rc;
}

int rpc_stream_send(rpc_call_t *call, const ProtobufCMessage *msg)
{
    return stream_send_buffer(call, pack(msg));
}

int rpc_stream_recv(rpc_call_t *call)
{
    rpc_call_t *c = call;
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    if (c->finishing) {
        rc = -EPIPE;
    } else if (c->recv_busy) {
        rc = -EBUSY;
    } else {
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_RECV_MESSAGE;
        op.data.recv_message.recv_message = &c->recv_buf;
        c->recv_busy = true;
        c->pending++;
        grpc_call_error e = grpc_call_start_batch(c->call, &op, 1, &c->tag_recv, NULL);
        if (e != GRPC_CALL_OK) {
            LOG_ERROR(MOD, "%s: cannot read a message: %s", rpc_call_method(c),
                      grpc_call_error_to_string(e));
            c->recv_busy = false;
            c->pending--;
            grpc_call_cancel(c->call, NULL);
            rc = -EIO;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

static void stream_start(rpc_call_t *c)
{
    rpc_method_t *m = c->method;
    c->is_stream = true;
    pthread_mutex_init(&c->mu, NULL);
    /* Learn when the client is gone, whatever the stream is doing. */
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    c->pending = 2; /* the close operation, and this dispatch */
    grpc_call_error e = grpc_call_start_batch(c->call, &op, 1, &c->tag_close, NULL);
    if (e != GRPC_CALL_OK) {
        LOG_ERROR(MOD, "%s: cannot watch the call: %s", m->path, grpc_call_error_to_string(e));
        grpc_call_cancel(c->call, NULL);
        c->status = GRPC_STATUS_INTERNAL;
        c->pending = 0;
        call_release(c);
        return;
    }
    if (m->request) {
        char err[256];
        grpc_slice wire;
        if (decode_request(c, &wire, err, sizeof(err)) < 0) {
            stream_finish(c, GRPC_STATUS_INVALID_ARGUMENT, err, NULL, 0);
        } else {
            grpc_slice_unref(wire);
            m->stream.on_start(c, c->request, m->stream.arg);
        }
    } else {
        m->stream.on_start(c, NULL, m->stream.arg);
    }
    stream_unpend(c);
}

static void stream_on_close(rpc_call_t *c)
{
    pthread_mutex_lock(&c->mu);
    bool notify = !c->finishing;
    pthread_mutex_unlock(&c->mu);
    if (notify) {
        if (c->method->stream.on_close)
            c->method->stream.on_close(c, c->cancelled != 0, c->method->stream.arg);
        else
            stream_finish(c, GRPC_STATUS_CANCELLED, "call ended by the client", NULL, 0);
    }
    stream_unpend(c);
}

static void stream_on_sent(rpc_call_t *c)
{
    pthread_mutex_lock(&c->mu);
    c->send_busy = false;
    grpc_byte_buffer_destroy(c->send_buf);
    c->send_buf = NULL;
    if (c->finish_deferred) {
        c->finish_deferred = false;
        start_status_locked(c);
    }
    bool notify = !c->finishing;
    pthread_mutex_unlock(&c->mu);
    if (notify && c->method->stream.on_sent)
        c->method->stream.on_sent(c, c->method->stream.arg);
    stream_unpend(c);
}

static void stream_on_recv(rpc_call_t *c, bool success)
{
    pthread_mutex_lock(&c->mu);
    c->recv_busy = false;
    grpc_byte_buffer *bb = c->recv_buf;
    c->recv_buf = NULL;
    bool notify = !c->finishing && success;
    pthread_mutex_unlock(&c->mu);
    if (notify) {
        if (!bb) {
            c->method->stream.on_message(c, NULL, 0, c->method->stream.arg);
        } else {
            grpc_slice s;
            if (read_buffer(bb, &s) < 0) {
                stream_finish(c, GRPC_STATUS_INVALID_ARGUMENT,
                              "request: cannot decompress the message", NULL, 0);
            } else {
                c->method->stream.on_message(c, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s),
                                             c->method->stream.arg);
                grpc_slice_unref(s);
            }
        }
    }
    if (bb)
        grpc_byte_buffer_destroy(bb);
    stream_unpend(c);
}

/* ---- responder streams (reflection): one response per request ---- */

static void responder_on_start(rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    if (rpc_stream_recv(call) < 0)
        rpc_stream_finish(call, GRPC_STATUS_INTERNAL, "server error: cannot read the stream");
}

static void responder_on_message(rpc_call_t *call, const uint8_t *data, size_t len, void *arg)
{
    rpc_method_t *m = arg;
    if (!data) { /* half-close: every request was answered */
        rpc_stream_finish(call, GRPC_STATUS_OK, NULL);
        return;
    }
    uint8_t *resp = NULL;
    size_t resp_len = 0;
    int rc = m->respond(m->respond_arg, data, len, &resp, &resp_len);
    if (rc == -EINVAL) {
        rpc_stream_finish(call, GRPC_STATUS_INVALID_ARGUMENT, "request: malformed message");
        return;
    }
    if (rc < 0) {
        LOG_ERROR(MOD, "%s: responder failed: %s", m->path, strerror(-rc));
        rpc_stream_finish(call, GRPC_STATUS_INTERNAL, "server error: cannot answer the request");
        return;
    }
    grpc_byte_buffer *bb = bytes_buffer(resp, resp_len);
    free(resp);
    if (stream_send_buffer(call, bb) < 0)
        rpc_stream_finish(call, GRPC_STATUS_INTERNAL, "server error: cannot send the response");
}

static void responder_on_sent(rpc_call_t *call, void *arg)
{
    if (rpc_stream_recv(call) < 0)
        rpc_stream_finish(call, GRPC_STATUS_INTERNAL, "server error: cannot read the stream");
}

static void responder_on_close(rpc_call_t *call, bool cancelled, void *arg)
{
    rpc_stream_finish(call, GRPC_STATUS_CANCELLED, "call ended by the client");
}

/* ---- dispatch on the CQ thread ---- */

static void unknown_method(rpc_call_t *c)
{
    char path[160];
    size_t len = GRPC_SLICE_LENGTH(c->details.method);
    const uint8_t *p = GRPC_SLICE_START_PTR(c->details.method);
    size_t n = 0;
    for (size_t i = 0; i < len && n + 4 < sizeof(path); i++)
        path[n++] = (p[i] >= 0x20 && p[i] < 0x7f) ? (char)p[i] : '?';
    if (len > n)
        memcpy(path + n, "...", 4);
    else
        path[n] = '\0';
    char msg[200];
    snprintf(msg, sizeof(msg), "unknown method %s", path);
    rpc_call_fail(c, GRPC_STATUS_UNIMPLEMENTED, msg, NULL, 0);
}

static void unary_start(rpc_call_t *c)
{
    char err[256];
    grpc_slice wire;
    if (decode_request(c, &wire, err, sizeof(err)) < 0) {
        rpc_call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, err, NULL, 0);
        return;
    }
    rpc_method_t *m = c->method;
    /* The handler completes the call or hands it on; wire is ours, not the call's. */
    m->unary(c, c->request, GRPC_SLICE_START_PTR(wire), GRPC_SLICE_LENGTH(wire), m->arg);
    grpc_slice_unref(wire);
}

static void on_new_call(rpc_cq_t *q, rpc_call_t *c, bool success)
{
    rpc_server_t *s = q->srv;
    if (!success) { /* an armed request cancelled by shutdown */
        call_free_fields(c);
        return;
    }
    atomic_fetch_add_explicit(&s->inflight, 1, memory_order_relaxed);
    c->start_ns = now_ns();
    c->deadline_ns = deadline_to_ns(
        c->method->kind == M_GENERIC ? c->details.deadline : c->deadline, c->start_ns);
    if (!atomic_load_explicit(&s->stopping, memory_order_relaxed))
        arm(q, c->method);
    switch (c->method->kind) {
    case M_GENERIC:
        unknown_method(c);
        break;
    case M_UNARY:
        unary_start(c);
        break;
    case M_STREAM:
        stream_start(c);
        break;
    }
}

static void *cq_thread(void *arg)
{
    rpc_cq_t *q = arg;
    char name[16];
    snprintf(name, sizeof(name), "grpc-cq-%u", q->index);
    pthread_setname_np(pthread_self(), name);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(q->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        rpc_tag_t *t = ev.tag;
        rpc_call_t *c = t->call;
        switch (t->kind) {
        case TAG_NEW:
            on_new_call(q, c, ev.success != 0);
            break;
        case TAG_UNARY:
            TSAN_ACQUIRE(c); /* the owner's writes before start_batch */
            call_release(c);
            break;
        case TAG_CLOSE:
            stream_on_close(c);
            break;
        case TAG_SEND:
            stream_on_sent(c);
            break;
        case TAG_RECV:
            stream_on_recv(c, ev.success != 0);
            break;
        case TAG_STATUS:
            stream_unpend(c);
            break;
        case TAG_SHUTDOWN:
            pthread_mutex_lock(&q->srv->mu);
            q->srv->shutdown_done = true;
            pthread_cond_broadcast(&q->srv->cv);
            pthread_mutex_unlock(&q->srv->mu);
            break;
        }
    }
    return NULL;
}

/* ---- the server ---- */

int rpc_server_create(rpc_server_t **out, const rpc_server_config_t *cfg)
{
    rpc_server_t *s = xcalloc(1, sizeof(*s));
    s->cfg = *cfg;
    s->host = xstrdup(cfg->host && *cfg->host ? cfg->host : "0.0.0.0");
    s->cfg.host = s->host;
    if (s->cfg.cq_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        s->cfg.cq_threads = n > 0 ? (unsigned)n : 1;
    }
    if (s->cfg.max_receive_bytes == 0)
        s->cfg.max_receive_bytes = RPC_DEFAULT_MAX_RECEIVE_BYTES;
    if (s->cfg.max_receive_bytes > (size_t)INT32_MAX || cfg->port < 0 || cfg->port > 65535) {
        free(s->host);
        free(s);
        return -EINVAL;
    }
    if (s->cfg.armed_per_method == 0)
        s->cfg.armed_per_method = 32;
    s->generic = (rpc_method_t){.kind = M_GENERIC, .path = "unknown"};
    s->shutdown_tag = (rpc_tag_t){TAG_SHUTDOWN, NULL};
    s->accepting = true;
    atomic_init(&s->stopping, false);
    atomic_init(&s->inflight, 0);
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);

    grpc_init();
    grpc_arg args[2];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)s->cfg.max_receive_bytes;
    /* A port already in use must fail the start, not be shared silently. */
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_ALLOW_REUSEPORT;
    args[1].value.integer = 0;
    grpc_channel_args ch = {.num_args = 2, .args = args};
    s->server = grpc_server_create(&ch, NULL);
    s->ncq = s->cfg.cq_threads;
    s->cqs = xcalloc(s->ncq, sizeof(*s->cqs));
    for (unsigned i = 0; i < s->ncq; i++) {
        s->cqs[i].srv = s;
        s->cqs[i].index = i;
        s->cqs[i].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(s->server, s->cqs[i].cq, NULL);
    }
    *out = s;
    return 0;
}

static int add_method(rpc_server_t *s, rpc_method_t *m)
{
    if (s->started || !m->path || m->path[0] != '/') {
        free(m);
        return -EINVAL;
    }
    for (size_t i = 0; i < s->nmethods; i++) {
        if (strcmp(s->methods[i]->path, m->path) == 0) {
            free(m);
            return -EEXIST;
        }
    }
    m->path = xstrdup(m->path);
    rpc_method_t **grown = realloc(s->methods, (s->nmethods + 1) * sizeof(*grown));
    if (!grown) {
        LOG_ERROR(MOD, "out of memory");
        abort();
    }
    s->methods = grown;
    s->methods[s->nmethods++] = m;
    return 0;
}

int rpc_server_add_unary(rpc_server_t *s, const rpc_unary_method_t *um)
{
    if (!um->request || !um->handle)
        return -EINVAL;
    rpc_method_t *m = xcalloc(1, sizeof(*m));
    m->kind = M_UNARY;
    m->path = (char *)um->path;
    m->request = um->request;
    m->unary = um->handle;
    m->arg = um->arg;
    return add_method(s, m);
}

int rpc_server_add_stream(rpc_server_t *s, const rpc_stream_method_t *sm)
{
    if (!sm->on_start || (!sm->request && !sm->on_message))
        return -EINVAL;
    rpc_method_t *m = xcalloc(1, sizeof(*m));
    m->kind = M_STREAM;
    m->path = (char *)sm->path;
    m->request = sm->request;
    m->stream = *sm;
    return add_method(s, m);
}

int rpc_server_add_responder(rpc_server_t *s, const char *path, rpc_respond_fn respond, void *arg)
{
    if (!respond)
        return -EINVAL;
    rpc_method_t *m = xcalloc(1, sizeof(*m));
    m->kind = M_STREAM;
    m->path = (char *)path;
    m->respond = respond;
    m->respond_arg = arg;
    m->stream = (rpc_stream_method_t){
        .on_start = responder_on_start,
        .on_message = responder_on_message,
        .on_sent = responder_on_sent,
        .on_close = responder_on_close,
        .arg = m,
    };
    return add_method(s, m);
}

void rpc_server_set_finish_hook(rpc_server_t *s, rpc_finish_hook_fn hook, void *arg)
{
    s->hook = hook;
    s->hook_arg = arg;
}

int rpc_server_start(rpc_server_t *s)
{
    if (s->started)
        return -EINVAL;
    for (size_t i = 0; i < s->nmethods; i++) {
        rpc_method_t *m = s->methods[i];
        m->registered = grpc_server_register_method(
            s->server, m->path, NULL,
            m->request ? GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER : GRPC_SRM_PAYLOAD_NONE, 0);
        if (!m->registered) {
            LOG_ERROR(MOD, "cannot register method %s", m->path);
            return -EINVAL;
        }
    }
    char addr[300];
    bool v6 = strchr(s->host, ':') != NULL && s->host[0] != '[';
    snprintf(addr, sizeof(addr), v6 ? "[%s]:%d" : "%s:%d", s->host, s->cfg.port);
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    s->port = grpc_server_add_http2_port(s->server, addr, creds);
    grpc_server_credentials_release(creds);
    if (s->port == 0) {
        LOG_ERROR(MOD, "cannot listen on %s (address in use or not local)", addr);
        return -EADDRINUSE;
    }
    grpc_server_start(s->server);
    s->started = true;
    for (unsigned i = 0; i < s->ncq; i++) {
        rpc_cq_t *q = &s->cqs[i];
        for (size_t k = 0; k < s->nmethods; k++)
            for (unsigned j = 0; j < s->cfg.armed_per_method; j++)
                arm(q, s->methods[k]);
        for (unsigned j = 0; j < 2; j++)
            arm(q, &s->generic);
        int rc = pthread_create(&q->thread, NULL, cq_thread, q);
        if (rc != 0) {
            LOG_ERROR(MOD, "cannot start a CQ thread: %s", strerror(rc));
            return -rc;
        }
        q->running = true;
    }
    return 0;
}

int rpc_server_port(const rpc_server_t *s)
{
    return s->port;
}

void rpc_server_stop_accepting(rpc_server_t *s)
{
    if (!s->accepting)
        return;
    s->accepting = false;
    atomic_store_explicit(&s->stopping, true, memory_order_relaxed);
    grpc_server_shutdown_and_notify(s->server, s->cqs[0].cq, &s->shutdown_tag);
}

size_t rpc_server_inflight(const rpc_server_t *s)
{
    return atomic_load_explicit(&s->inflight, memory_order_acquire);
}

/* One wait on cv, bounded by deadline_ns; false once the deadline has passed. With s->mu. */
static bool timed_wait(rpc_server_t *s, uint64_t deadline_ns)
{
    if (now_ns() >= deadline_ns)
        return false;
    struct timespec ts = {.tv_sec = (time_t)(deadline_ns / 1000000000u),
                          .tv_nsec = (long)(deadline_ns % 1000000000u)};
    pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    return true;
}

int rpc_server_wait_idle(rpc_server_t *s, uint64_t deadline_ns)
{
    pthread_mutex_lock(&s->mu);
    while (rpc_server_inflight(s) > 0 && timed_wait(s, deadline_ns))
        ;
    bool idle = rpc_server_inflight(s) == 0;
    pthread_mutex_unlock(&s->mu);
    return idle ? 0 : -ETIMEDOUT;
}

void rpc_server_cancel_all(rpc_server_t *s)
{
    if (s->started && !s->accepting)
        grpc_server_cancel_all_calls(s->server);
}

/* Waits for the shutdown notification until deadline_ns; true once it came. */
static bool wait_shutdown(rpc_server_t *s, uint64_t deadline_ns)
{
    pthread_mutex_lock(&s->mu);
    while (!s->shutdown_done && timed_wait(s, deadline_ns))
        ;
    bool done = s->shutdown_done;
    pthread_mutex_unlock(&s->mu);
    return done;
}

void rpc_server_destroy(rpc_server_t *s)
{
    if (!s)
        return;
    if (s->started) {
        rpc_server_stop_accepting(s);
        /* Calls still open now (streams the clients keep, calls nobody ended) are
         * cancelled; their owners' completions still come back to the CQ threads. */
        if (rpc_server_inflight(s) > 0) {
            grpc_server_cancel_all_calls(s->server);
            if (rpc_server_wait_idle(s, now_ns() + 5000000000u) < 0)
                LOG_ERROR(MOD, "%zu calls still held by their owners at shutdown",
                          rpc_server_inflight(s));
        }
        /* gRPC reports shutdown once every connection is closed. Clients close theirs
         * after the GOAWAY; forcing it earlier could drop replies not yet written. */
        bool done = wait_shutdown(s, now_ns() + 1000000000u);
        if (!done) {
            grpc_server_cancel_all_calls(s->server); /* also disconnects idle clients */
            done = wait_shutdown(s, now_ns() + 5000000000u);
        }
        if (!done) {
            /* Destroying the server now would be a use-after-free inside gRPC. */
            LOG_ERROR(MOD, "gRPC server shutdown did not complete; leaving it behind");
            return;
        }
    }
    /* A server that never started has no listener, no armed request and no thread. */
    for (unsigned i = 0; i < s->ncq; i++)
        grpc_completion_queue_shutdown(s->cqs[i].cq);
    for (unsigned i = 0; i < s->ncq; i++) {
        if (s->cqs[i].running) {
            pthread_join(s->cqs[i].thread, NULL);
            continue;
        }
        for (;;) {
            grpc_event ev =
                grpc_completion_queue_next(s->cqs[i].cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            if (ev.type == GRPC_QUEUE_SHUTDOWN)
                break;
            rpc_tag_t *t = ev.tag;
            if (ev.type == GRPC_OP_COMPLETE && t->kind == TAG_NEW)
                call_free_fields(t->call);
        }
    }
    grpc_server_destroy(s->server);
    for (unsigned i = 0; i < s->ncq; i++)
        grpc_completion_queue_destroy(s->cqs[i].cq);
    grpc_shutdown_blocking();
    for (size_t i = 0; i < s->nmethods; i++) {
        free(s->methods[i]->path);
        free(s->methods[i]);
    }
    free(s->methods);
    free(s->cqs);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s->host);
    free(s);
}
