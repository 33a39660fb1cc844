/*
 * grpc_server: the gRPC face of the process, on gRPC's C core. Owns the grpc_server, one
 * completion queue per CQ thread and the state of every call (rpc_call_t). It knows no
 * business: the main hands it a method table (paths, protobuf-c request descriptors and
 * handlers) before rpc_server_start. Names use the prefix rpc_ so they never collide
 * with gRPC core's grpc_server_*.
 *
 * DESIGN
 * - Every method is registered with grpc_server_register_method; unary and
 *   server-streaming ones with GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, so one completion
 *   brings the call, its deadline, its metadata and the request body. Each CQ thread keeps
 *   several requests armed per method on its own queue and re-arms one as each arrives.
 *   Unregistered paths arrive through grpc_server_request_call and end UNIMPLEMENTED.
 * - A call is bound to the queue of the thread that accepted it, so every completion of
 *   that call comes back to that one thread, which also frees it. CQ threads block only
 *   in grpc_completion_queue_next and never do blocking I/O.
 * - Unary calls: the body is decoded with protobuf-c (no body or an undecodable one →
 *   INVALID_ARGUMENT; over the receive limit → RESOURCE_EXHAUSTED, by gRPC core) and handed
 *   to the method's handler on the CQ thread. The handler either completes the call at once
 *   or hands it to someone else (an actor, inside a message). Exactly one thread owns a
 *   call at a time; the owner ends it with exactly one rpc_call_reply or rpc_call_fail,
 *   which starts one batch (initial metadata, message, status, close) and gives the call
 *   back to gRPC: the owner must not touch it afterwards. The batch's completion returns on
 *   the CQ, whose thread runs the finish hook and frees the call.
 * - Streams (health Watch, reflection): the stream functions below may be called from any
 *   thread, serialized by a lock per call; callbacks run on the call's CQ thread without
 *   that lock held.
 * - Shutdown (main thread): rpc_server_stop_accepting, rpc_server_wait_idle (grace), let
 *   the owners end what they still hold (supervisor_shutdown fails it back), then
 *   rpc_server_destroy, which cancels the rest (open streams) and lets clients close
 *   their connections before forcing them, so replies already sent are not lost.
 *   gRPC core cancels (CANCELLED) the calls it has received but not yet matched to an
 *   armed request when shutdown starts; keeping many requests armed keeps those few.
 */
#ifndef PAY_IO_GRPC_SERVER_H
#define PAY_IO_GRPC_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>

typedef struct rpc_server rpc_server_t;
typedef struct rpc_call rpc_call_t;

#define RPC_DEFAULT_MAX_RECEIVE_BYTES (4u * 1024u * 1024u)

typedef struct rpc_server_config {
    const char *host;          /* e.g. "0.0.0.0", "127.0.0.1", "::" */
    int port;                  /* 0 = pick a free port (see rpc_server_port) */
    unsigned cq_threads;       /* 0 = one per online core */
    size_t max_receive_bytes;  /* 0 = RPC_DEFAULT_MAX_RECEIVE_BYTES */
    unsigned armed_per_method; /* requests kept armed per method and CQ; 0 = 32 */
} rpc_server_config_t;

/** A key/value pair of trailing metadata (ASCII; keys lowercase, not ending in -bin). */
typedef struct rpc_md {
    const char *key;
    const char *value;
} rpc_md_t;

/** Unary handler, on a CQ thread. req (owned by the call, valid until it ends) was decoded
 *  from wire[0..wire_len) (valid only during this function). The handler must complete the
 *  call or pass its ownership on before returning. */
typedef void (*rpc_unary_fn)(rpc_call_t *call, const ProtobufCMessage *req, const uint8_t *wire,
                             size_t wire_len, void *arg);

typedef struct rpc_unary_method {
    const char *path; /* "/package.Service/Method"; copied */
    const ProtobufCMessageDescriptor *request;
    rpc_unary_fn handle;
    void *arg;
} rpc_unary_method_t;

/* Stream callbacks, on the call's CQ thread; the call is the owner's until it calls
 * rpc_stream_finish, and stays valid during every callback. */
typedef struct rpc_stream_method {
    const char *path; /* copied */
    /* Server streaming: the single request, decoded before on_start (errors end the call
     * INVALID_ARGUMENT). NULL: client or bidi streaming, read with rpc_stream_recv. */
    const ProtobufCMessageDescriptor *request;
    /** The call arrived; req is NULL without a request descriptor. */
    void (*on_start)(rpc_call_t *call, const ProtobufCMessage *req, void *arg);
    /** A message read by rpc_stream_recv; data NULL = the client half-closed. Not called
     *  when the read failed because the call ended (on_close follows). */
    void (*on_message)(rpc_call_t *call, const uint8_t *data, size_t len, void *arg);
    /** The last rpc_stream_send completed; another may be started. Optional. */
    void (*on_sent)(rpc_call_t *call, void *arg);
    /** The call is over on the client's side (cancelled: client cancel, deadline, or
     *  connection lost). Not called once rpc_stream_finish was called. The owner must
     *  then call rpc_stream_finish (any status) so the call can be freed. */
    void (*on_close)(rpc_call_t *call, bool cancelled, void *arg);
    void *arg;
} rpc_stream_method_t;

/** Bidi responder: one response per request message (see rpc_server_add_responder).
 *  *resp is malloc'd, freed by the server. 0, or < 0: the stream ends INTERNAL. */
typedef int (*rpc_respond_fn)(void *arg, const uint8_t *req, size_t req_len, uint8_t **resp,
                              size_t *resp_len);

/** Called once per finished call (any thread, normally a CQ thread): method path or
 *  "unknown", the status the call ended with, and its duration from arrival. */
typedef void (*rpc_finish_hook_fn)(void *arg, const char *method, grpc_status_code code,
                                   uint64_t duration_ns);

/** Initializes gRPC and creates a server (not started). 0 or -errno. */
int rpc_server_create(rpc_server_t **out, const rpc_server_config_t *cfg);
/** Before start: adds a unary method. -EEXIST if the path is taken. */
int rpc_server_add_unary(rpc_server_t *s, const rpc_unary_method_t *m);
/** Before start: adds a streaming method. */
int rpc_server_add_stream(rpc_server_t *s, const rpc_stream_method_t *m);
/** Before start: adds a bidi stream that answers each request message with respond()'s
 *  response and finishes OK when the client half-closes (server reflection). */
int rpc_server_add_responder(rpc_server_t *s, const char *path, rpc_respond_fn respond, void *arg);
/** Before start: the hook called for every finished call. */
void rpc_server_set_finish_hook(rpc_server_t *s, rpc_finish_hook_fn hook, void *arg);
/** Binds host:port and starts the CQ threads. -EADDRINUSE (or -EINVAL) if it cannot bind. */
int rpc_server_start(rpc_server_t *s);
/** The bound port (after start). */
int rpc_server_port(const rpc_server_t *s);
/** Stops accepting calls (GOAWAY to clients); calls in flight continue. Main thread. */
void rpc_server_stop_accepting(rpc_server_t *s);
/** Waits until no call is in flight or CLOCK_MONOTONIC deadline_ns: 0 or -ETIMEDOUT. */
int rpc_server_wait_idle(rpc_server_t *s, uint64_t deadline_ns);
/** Cancels every call in flight (after stop_accepting). Owners still complete the calls
 *  they hold (cheaply: the batch fails at once). */
void rpc_server_cancel_all(rpc_server_t *s);
/** Calls accepted and not yet freed. Any thread. */
size_t rpc_server_inflight(const rpc_server_t *s);
/** Stops accepting if not done, cancels calls still open and waits (bounded) for their
 *  owners to end them, waits (bounded) for clients to close their connections, shuts
 *  down and drains the queues, joins the CQ threads, destroys the server, grpc_shutdown. */
void rpc_server_destroy(rpc_server_t *s);

/* ---- calls: the owner's thread ---- */

/** Ends the call with OK and resp (serialized here), plus optional trailing metadata.
 *  The call is gRPC's afterwards. 0, or -errno if the batch could not start (the call is
 *  then cancelled and freed). */
int rpc_call_reply(rpc_call_t *call, const ProtobufCMessage *resp, const rpc_md_t *trailers,
                   size_t ntrailers);
/** Ends the call with a non-OK status and message, plus optional trailing metadata. */
int rpc_call_fail(rpc_call_t *call, grpc_status_code code, const char *message,
                  const rpc_md_t *trailers, size_t ntrailers);
/** The method path ("/payment.v1.PaymentService/AuthorizePayment"), or "unknown". */
const char *rpc_call_method(const rpc_call_t *call);
/** The peer as gRPC names it ("ipv4:127.0.0.1:54321", "ipv6:[::1]:5000"), copied to buf.
 *  0, or -ENOSPC (truncated). */
int rpc_call_peer(const rpc_call_t *call, char *buf, size_t buflen);
/** The peer's IP address without port or brackets ("127.0.0.1", "::1"). 0, -ENOENT if the
 *  peer is not an IP endpoint, -ENOSPC. */
int rpc_call_peer_ip(const rpc_call_t *call, char *buf, size_t buflen);
/** The first value of request metadata key (lowercase); *value is not NUL-terminated and
 *  lives as long as the call. false if absent. */
bool rpc_call_metadata(const rpc_call_t *call, const char *key, const char **value, size_t *len);
/** The call's deadline on CLOCK_MONOTONIC (time_now_ns's clock) in ns; 0 = none. */
uint64_t rpc_call_deadline_ns(const rpc_call_t *call);
/** The owner's pointer (e.g. a stream's state). */
void rpc_call_set_user(rpc_call_t *call, void *user);
void *rpc_call_user(const rpc_call_t *call);

/* ---- streams: any thread, serialized per call ---- */

/** Sends one message (initial metadata first if not sent). -EBUSY while a send is in
 *  flight (wait for on_sent), -EPIPE after finish, -EIO if the batch failed to start. */
int rpc_stream_send(rpc_call_t *call, const ProtobufCMessage *msg);
/** Reads the next message: on_message follows. -EBUSY if a read is in flight. */
int rpc_stream_recv(rpc_call_t *call);
/** Ends the stream with a status (after any send in flight). The owner must not touch the
 *  call afterwards. -EALREADY if already finished. */
int rpc_stream_finish(rpc_call_t *call, grpc_status_code code, const char *message);

/** The canonical name of a status code ("OK", "INVALID_ARGUMENT", …). */
const char *rpc_status_name(grpc_status_code code);

#endif
