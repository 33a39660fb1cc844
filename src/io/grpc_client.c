/*
 * grpc_client: see grpc_client.h. Every wait is bounded: a stuck server makes a caller fail
 * with a timeout, never hang it.
 */
/* Same-directory include: tests/e2e/grpc_client.c compiles this file into test programs
 * that do not link pay_io (nor see its include path). */
#include "grpc_client.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

struct gc {
    grpc_channel *ch;
    grpc_completion_queue *cq;
};

struct gc_stream {
    grpc_call *call;
    grpc_completion_queue *cq;
    grpc_metadata_array init_md, trailing;
    grpc_status_code status;
    grpc_slice details;
    grpc_byte_buffer *recv_buf;
    int outstanding;
    bool recv_pending, recv_done, send_done, send_ok, close_done, status_done;
    char tag_open, tag_send, tag_recv, tag_close, tag_status;
};

static gpr_timespec after_ms(int ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        abort();
    return p;
}

/* Copies a received buffer into a malloc'd block. */
static uint8_t *buffer_bytes(grpc_byte_buffer *bb, size_t *len)
{
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb)) {
        *len = 0;
        return NULL;
    }
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    *len = GRPC_SLICE_LENGTH(s);
    uint8_t *out = xmalloc(*len);
    memcpy(out, GRPC_SLICE_START_PTR(s), *len);
    grpc_slice_unref(s);
    return out;
}

grpc_byte_buffer *gc_buffer_pack(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

ProtobufCMessage *gc_buffer_unpack(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb)
{
    if (bb == NULL)
        return NULL;
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    grpc_byte_buffer_reader_destroy(&r);
    return m;
}

void gc_slice_copy(char *dst, size_t dstlen, grpc_slice s)
{
    size_t n = GRPC_SLICE_LENGTH(s);
    if (n >= dstlen)
        n = dstlen - 1;
    memcpy(dst, GRPC_SLICE_START_PTR(s), n);
    dst[n] = '\0';
}

static grpc_byte_buffer *bytes_buffer(const void *data, size_t len)
{
    grpc_slice s = grpc_slice_from_copied_buffer(data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

int gc_connect(gc_t **out, const char *target)
{
    grpc_init();
    gc_t *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    grpc_arg args[1];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = -1;
    grpc_channel_args ca = {.num_args = 1, .args = args};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    c->ch = grpc_channel_create(target, creds, &ca);
    grpc_channel_credentials_release(creds);
    c->cq = grpc_completion_queue_create_for_next(NULL);
    *out = c;
    return 0;
}

static void drain_and_destroy(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
    }
    grpc_completion_queue_destroy(cq);
}

void gc_close(gc_t *c)
{
    if (!c)
        return;
    grpc_channel_destroy(c->ch);
    drain_and_destroy(c->cq);
    free(c);
    grpc_shutdown_blocking();
}

static grpc_call *new_call(grpc_channel *ch, grpc_completion_queue *cq, const char *method,
                           int timeout_ms)
{
    grpc_slice m = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL,
                                               after_ms(timeout_ms), NULL);
    grpc_slice_unref(m);
    return call;
}

int gc_unary(gc_t *c, const char *method, const void *req, size_t req_len, int timeout_ms,
             const gc_md_t *md, size_t nmd, gc_result_t *out)
{
    memset(out, 0, sizeof(*out));
    grpc_call *call = new_call(c->ch, c->cq, method, timeout_ms);
    grpc_metadata send_md[8];
    if (nmd > 8)
        return -EINVAL;
    for (size_t i = 0; i < nmd; i++) {
        memset(&send_md[i], 0, sizeof(send_md[i]));
        send_md[i].key = grpc_slice_from_copied_string(md[i].key);
        send_md[i].value = grpc_slice_from_copied_string(md[i].value);
    }
    grpc_byte_buffer *sbuf = bytes_buffer(req, req_len);
    grpc_byte_buffer *rbuf = NULL;
    grpc_metadata_array init_md, trailing;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trailing);
    grpc_slice details = grpc_empty_slice();
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = nmd;
    ops[0].data.send_initial_metadata.metadata = nmd ? send_md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = sbuf;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &rbuf;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trailing;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    int rc = 0;
    if (grpc_call_start_batch(call, ops, 6, call, NULL) != GRPC_CALL_OK) {
        rc = -EIO;
    } else {
        grpc_event ev = grpc_completion_queue_next(c->cq, after_ms(timeout_ms + 5000), NULL);
        if (ev.type != GRPC_OP_COMPLETE) {
            /* Stuck: cancel and collect the batch so nothing dangles. */
            grpc_call_cancel(call, NULL);
            grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            rc = -ETIMEDOUT;
        }
    }
    if (rc == 0) {
        out->status = status;
        gc_slice_copy(out->details, sizeof(out->details), details);
        if (rbuf)
            out->body = buffer_bytes(rbuf, &out->body_len);
        for (size_t i = 0; i < trailing.count && out->ntrailers < 16; i++) {
            char k[128], v[120];
            gc_slice_copy(k, sizeof(k), trailing.metadata[i].key);
            gc_slice_copy(v, sizeof(v), trailing.metadata[i].value);
            snprintf(out->trailers[out->ntrailers++], sizeof(out->trailers[0]), "%s: %s", k, v);
        }
    }
    if (rbuf)
        grpc_byte_buffer_destroy(rbuf);
    grpc_byte_buffer_destroy(sbuf);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trailing);
    for (size_t i = 0; i < nmd; i++) {
        grpc_slice_unref(send_md[i].key);
        grpc_slice_unref(send_md[i].value);
    }
    grpc_call_unref(call);
    return rc;
}

int gc_unary_msg(gc_t *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
                 gc_result_t *out)
{
    size_t len = protobuf_c_message_get_packed_size(req);
    uint8_t *buf = xmalloc(len);
    protobuf_c_message_pack(req, buf);
    int rc = gc_unary(c, method, buf, len, timeout_ms, NULL, 0, out);
    free(buf);
    return rc;
}

void gc_result_free(gc_result_t *r)
{
    free(r->body);
    r->body = NULL;
}

/* ---- streams ---- */

/* Handles one completion (or times out). */
static int pump(gc_stream_t *s, gpr_timespec deadline)
{
    grpc_event ev = grpc_completion_queue_next(s->cq, deadline, NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT)
        return -ETIMEDOUT;
    if (ev.type != GRPC_OP_COMPLETE)
        return -EIO;
    s->outstanding--;
    if (ev.tag == &s->tag_send) {
        s->send_done = true;
        s->send_ok = ev.success != 0;
    } else if (ev.tag == &s->tag_recv) {
        s->recv_done = true;
    } else if (ev.tag == &s->tag_close) {
        s->close_done = true;
    } else if (ev.tag == &s->tag_status) {
        s->status_done = true;
    }
    return 0;
}

static int start(gc_stream_t *s, grpc_op *ops, size_t n, void *tag)
{
    if (grpc_call_start_batch(s->call, ops, n, tag, NULL) != GRPC_CALL_OK)
        return -EIO;
    s->outstanding++;
    return 0;
}

int gc_stream_open(gc_t *c, const char *method, int timeout_ms, gc_stream_t **out)
{
    gc_stream_t *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->cq = grpc_completion_queue_create_for_next(NULL);
    s->call = new_call(c->ch, s->cq, method, timeout_ms);
    grpc_metadata_array_init(&s->init_md);
    grpc_metadata_array_init(&s->trailing);
    s->details = grpc_empty_slice();
    grpc_op ops[2];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[1].data.recv_initial_metadata.recv_initial_metadata = &s->init_md;
    int rc = start(s, ops, 2, &s->tag_open);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &s->trailing;
    ops[0].data.recv_status_on_client.status = &s->status;
    ops[0].data.recv_status_on_client.status_details = &s->details;
    if (rc == 0)
        rc = start(s, ops, 1, &s->tag_status);
    *out = s;
    return rc;
}

int gc_stream_send(gc_stream_t *s, const void *data, size_t len)
{
    grpc_byte_buffer *bb = bytes_buffer(data, len);
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = bb;
    s->send_done = false;
    int rc = start(s, &op, 1, &s->tag_send);
    gpr_timespec deadline = after_ms(10000);
    while (rc == 0 && !s->send_done)
        rc = pump(s, deadline);
    grpc_byte_buffer_destroy(bb);
    if (rc == 0 && !s->send_ok)
        rc = -EPIPE;
    return rc;
}

int gc_stream_send_msg(gc_stream_t *s, const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = xmalloc(len);
    protobuf_c_message_pack(msg, buf);
    int rc = gc_stream_send(s, buf, len);
    free(buf);
    return rc;
}

int gc_stream_half_close(gc_stream_t *s)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    int rc = start(s, &op, 1, &s->tag_close);
    gpr_timespec deadline = after_ms(10000);
    while (rc == 0 && !s->close_done)
        rc = pump(s, deadline);
    return rc;
}

int gc_stream_recv(gc_stream_t *s, int wait_ms, uint8_t **data, size_t *len)
{
    if (!s->recv_pending) {
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_RECV_MESSAGE;
        op.data.recv_message.recv_message = &s->recv_buf;
        s->recv_done = false;
        int rc = start(s, &op, 1, &s->tag_recv);
        if (rc < 0)
            return rc;
        s->recv_pending = true;
    }
    gpr_timespec deadline = after_ms(wait_ms);
    while (!s->recv_done) {
        int rc = pump(s, deadline);
        if (rc < 0)
            return rc;
    }
    s->recv_pending = false;
    if (!s->recv_buf)
        return 0;
    *data = buffer_bytes(s->recv_buf, len);
    grpc_byte_buffer_destroy(s->recv_buf);
    s->recv_buf = NULL;
    return 1;
}

int gc_stream_status(gc_stream_t *s, int wait_ms, grpc_status_code *code, char *details,
                     size_t dlen)
{
    gpr_timespec deadline = after_ms(wait_ms);
    while (!s->status_done) {
        int rc = pump(s, deadline);
        if (rc < 0)
            return rc;
    }
    *code = s->status;
    if (details)
        gc_slice_copy(details, dlen, s->details);
    return 0;
}

void gc_stream_cancel(gc_stream_t *s)
{
    grpc_call_cancel(s->call, NULL);
}

void gc_stream_free(gc_stream_t *s)
{
    if (!s)
        return;
    if (!s->status_done)
        grpc_call_cancel(s->call, NULL);
    while (s->outstanding > 0)
        if (pump(s, after_ms(30000)) < 0)
            abort(); /* gRPC lost a completion: nothing sane left to do */
    if (s->recv_buf)
        grpc_byte_buffer_destroy(s->recv_buf);
    grpc_call_unref(s->call);
    drain_and_destroy(s->cq);
    grpc_metadata_array_destroy(&s->init_md);
    grpc_metadata_array_destroy(&s->trailing);
    grpc_slice_unref(s->details);
    free(s);
}

/* ---- load ---- */

typedef struct load_call {
    grpc_call *call;
    grpc_byte_buffer *sbuf, *rbuf;
    grpc_metadata_array init_md, trailing;
    grpc_status_code status;
    grpc_slice details;
} load_call_t;

static int load_start(gc_t *c, gc_load_t *l, load_call_t *lc)
{
    memset(lc, 0, sizeof(*lc));
    lc->call = new_call(c->ch, c->cq, l->method, l->timeout_ms);
    lc->sbuf = bytes_buffer(l->req, l->req_len);
    grpc_metadata_array_init(&lc->init_md);
    grpc_metadata_array_init(&lc->trailing);
    lc->details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = lc->sbuf;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &lc->init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &lc->rbuf;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &lc->trailing;
    ops[5].data.recv_status_on_client.status = &lc->status;
    ops[5].data.recv_status_on_client.status_details = &lc->details;
    if (grpc_call_start_batch(lc->call, ops, 6, lc, NULL) != GRPC_CALL_OK)
        return -EIO;
    atomic_fetch_add(&l->started, 1);
    return 0;
}

static void load_finish(gc_load_t *l, load_call_t *lc)
{
    unsigned st = (unsigned)lc->status < GC_NSTATUS ? (unsigned)lc->status : GRPC_STATUS_UNKNOWN;
    l->counts[st]++;
    gc_slice_copy(l->last_details[st], sizeof(l->last_details[st]), lc->details);
    if (lc->rbuf)
        grpc_byte_buffer_destroy(lc->rbuf);
    grpc_byte_buffer_destroy(lc->sbuf);
    grpc_metadata_array_destroy(&lc->init_md);
    grpc_metadata_array_destroy(&lc->trailing);
    grpc_slice_unref(lc->details);
    grpc_call_unref(lc->call);
    atomic_fetch_add(&l->completed, 1);
}

int gc_unary_load(gc_t *c, gc_load_t *l)
{
    size_t window = l->concurrency ? l->concurrency : 1;
    load_call_t *calls = calloc(window, sizeof(*calls));
    if (!calls)
        return -ENOMEM;
    size_t started = 0, inflight = 0;
    int rc = 0;
    for (size_t i = 0; i < window && started < l->total; i++, started++, inflight++)
        if ((rc = load_start(c, l, &calls[i])) < 0)
            break;
    while (inflight > 0 && rc == 0) {
        grpc_event ev = grpc_completion_queue_next(c->cq, after_ms(l->timeout_ms + 10000), NULL);
        if (ev.type != GRPC_OP_COMPLETE) {
            rc = -ETIMEDOUT;
            break;
        }
        load_call_t *lc = ev.tag;
        load_finish(l, lc);
        inflight--;
        if (started < l->total) {
            if ((rc = load_start(c, l, lc)) < 0)
                break;
            started++;
            inflight++;
        }
    }
    if (inflight == 0)
        free(calls); /* else gRPC may still write into them: leak rather than corrupt */
    return rc;
}
