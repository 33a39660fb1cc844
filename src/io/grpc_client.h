/*
 * grpc_client: a small gRPC client on the C core: blocking unary calls, blocking streams
 * with timeouts, and a unary load generator keeping many calls in flight on one channel.
 * Used by build/payment-cli and by the end-to-end and integration tests. It knows no
 * business: requests and responses are bytes or protobuf-c messages. Every wait is
 * bounded: a stuck server ends a call with a timeout, never hangs the caller.
 *
 * Threads: each gc_t owns one insecure channel and one completion queue; use a gc_t (and
 * its streams) from one thread at a time. Different gc_t may be used from different
 * threads at once.
 */
#ifndef PAY_IO_GRPC_CLIENT_H
#define PAY_IO_GRPC_CLIENT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/grpc.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>

#define GC_NSTATUS 17

typedef struct gc gc_t;
typedef struct gc_stream gc_stream_t;

typedef struct gc_result {
    grpc_status_code status;
    char details[2048];
    uint8_t *body; /* the response message (malloc'd) or NULL */
    size_t body_len;
    size_t ntrailers; /* trailing metadata, "key: value" strings */
    char trailers[16][256];
} gc_result_t;

/** A metadata pair to send with a call. */
typedef struct gc_md {
    const char *key;
    const char *value;
} gc_md_t;

/** A byte buffer holding m serialized (for grpc_op SEND_MESSAGE); the caller destroys it. */
grpc_byte_buffer *gc_buffer_pack(const ProtobufCMessage *m);
/** Unpacks a received buffer with desc (free with protobuf_c_message_free_unpacked); NULL if
 *  bb is NULL or malformed. bb stays the caller's. */
ProtobufCMessage *gc_buffer_unpack(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb);
/** Copies a slice into dst as a NUL-terminated string, truncated to dstlen - 1 bytes. */
void gc_slice_copy(char *dst, size_t dstlen, grpc_slice s);

/** Connects (lazily) to target, e.g. "127.0.0.1:50051". 0 or -errno. */
int gc_connect(gc_t **out, const char *target);
void gc_close(gc_t *c);

/** One unary call with raw request bytes. 0 when the call ended (any status) within
 *  timeout_ms + 5 s; -ETIMEDOUT if the client itself got stuck. */
int gc_unary(gc_t *c, const char *method, const void *req, size_t req_len, int timeout_ms,
             const gc_md_t *md, size_t nmd, gc_result_t *out);
/** gc_unary with a protobuf-c request. */
int gc_unary_msg(gc_t *c, const char *method, const ProtobufCMessage *req, int timeout_ms,
                 gc_result_t *out);
void gc_result_free(gc_result_t *r);

/** Opens a stream (initial metadata sent); timeout_ms is the call's deadline. */
int gc_stream_open(gc_t *c, const char *method, int timeout_ms, gc_stream_t **out);
/** Sends one message and waits for the send to complete. */
int gc_stream_send(gc_stream_t *s, const void *data, size_t len);
int gc_stream_send_msg(gc_stream_t *s, const ProtobufCMessage *msg);
/** Half-closes the client side. */
int gc_stream_half_close(gc_stream_t *s);
/** Next message: 1 with *data malloc'd, 0 at the end of the stream, -ETIMEDOUT if
 *  none within wait_ms (the read stays armed for the next call). */
int gc_stream_recv(gc_stream_t *s, int wait_ms, uint8_t **data, size_t *len);
/** The final status: 0, or -ETIMEDOUT if the call did not end within wait_ms. */
int gc_stream_status(gc_stream_t *s, int wait_ms, grpc_status_code *code, char *details,
                     size_t dlen);
/** Cancels the call (client side). */
void gc_stream_cancel(gc_stream_t *s);
/** Cancels if still running, waits for outstanding operations, frees. */
void gc_stream_free(gc_stream_t *s);

/** A unary load: total calls of one request, up to concurrency in flight. */
typedef struct gc_load {
    const char *method;
    const void *req;
    size_t req_len;
    size_t total;
    size_t concurrency;
    int timeout_ms;
    atomic_size_t started, completed;   /* progress, readable from other threads */
    size_t counts[GC_NSTATUS];          /* final statuses */
    char last_details[GC_NSTATUS][256]; /* one message seen per status */
} gc_load_t;

/** Runs the load to the end (every call ends with a status). 0 or -errno. */
int gc_unary_load(gc_t *c, gc_load_t *load);

#endif
