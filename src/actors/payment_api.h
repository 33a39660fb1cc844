/*
 * payment_api: the payment.v1.PaymentService method table. Each method is decoded by the
 * gRPC layer, validated here on the CQ thread (payment_validate_*_wire: the first failure
 * ends the call INVALID_ARGUMENT "<field>: <reason>"), then posted as a payment_msg_t to
 * the actor the main chose (the ledger now, the rate limiter later). A full mailbox ends
 * the call UNAVAILABLE at once (load shedding); a closed one (shutdown) too.
 *
 * A payment_msg_t owns its call: whoever holds the message ends the call exactly once,
 * normally with payment_msg_reply / payment_msg_fail (any thread), then disposes of the
 * message. If the message is failed instead (msg_fail: the actor holding it died, the
 * deadline passed while it was queued, shutdown) its call ends UNAVAILABLE (or
 * DEADLINE_EXCEEDED) with a message saying why.
 */
#ifndef PAY_ACTORS_PAYMENT_API_H
#define PAY_ACTORS_PAYMENT_API_H

#include <stddef.h>
#include <stdint.h>

#include "io/grpc_server.h"
#include "payment/v1/payment.pb-c.h"
#include "runtime/actor.h"
#include "runtime/msg.h"

#define PAYMENT_SERVICE_NAME "payment.v1.PaymentService"

/** The msg_t type of a payment_msg_t: which RPC it carries. */
typedef enum payment_method {
    PAYMENT_AUTHORIZE = 1,
    PAYMENT_GET_PAYMENT = 2,
    PAYMENT_GET_BALANCE = 3,
} payment_method_t;

typedef struct payment_msg {
    msg_t hdr;        /* type = payment_method_t; deadline_ns = the call's deadline */
    rpc_call_t *call; /* NULL once the call was ended */
    union {           /* the decoded request, owned by the call */
        const Payment__V1__AuthorizePaymentRequest *authorize;
        const Payment__V1__GetPaymentRequest *get_payment;
        const Payment__V1__GetAccountBalanceRequest *get_balance;
        const ProtobufCMessage *any;
    } req;
    /* Rate-limit verdict, set by the ratelimit actor: when rl_limit > 0, payment_msg_reply
     * and payment_msg_fail append x-ratelimit-limit / x-ratelimit-remaining to the
     * trailers, whichever actor answers. */
    int64_t rl_limit;
    int64_t rl_remaining;
} payment_msg_t;

typedef struct payment_api payment_api_t;

/* Private: binds a method to its API for the gRPC handler. */
typedef struct payment_api_route {
    payment_method_t method;
    payment_api_t *api;
} payment_api_route_t;

struct payment_api {
    actor_t *target; /* the first hop of every valid request (the rate limiter); NULL = the
                        router below; outlives the server */
    /* The router (the ledger pool): the actor that serves m (ledger_pool_route). Any
     * thread. route_ctx outlives the server. */
    actor_t *(*route)(void *route_ctx, const payment_msg_t *m);
    void *route_ctx;
    payment_api_route_t _routes[3];
};

/** Adds the three methods to the server (before it starts); api must outlive it. */
int payment_api_register(rpc_server_t *srv, payment_api_t *api);

/** The full method path of a payment method ("/payment.v1.PaymentService/GetPayment"). */
const char *payment_method_path(payment_method_t method);

/** The actor the router picks for m (NULL without a router). Any thread. */
actor_t *payment_api_route(payment_api_t *api, const payment_msg_t *m);
/** Routes m and pushes it to that actor's mailbox (any thread). 0: the actor owns m;
 *  -EAGAIN (full) / -ESHUTDOWN (closed) / -ENOENT (no router): the caller still owns m. */
int payment_api_dispatch(payment_api_t *api, payment_msg_t *m);

/** Ends m's call with OK and resp (+ trailing metadata); m keeps no call afterwards. */
int payment_msg_reply(payment_msg_t *m, const ProtobufCMessage *resp, const rpc_md_t *trailers,
                      size_t ntrailers);
/** Ends m's call with a non-OK status (+ trailing metadata). */
int payment_msg_fail(payment_msg_t *m, grpc_status_code code, const char *message,
                     const rpc_md_t *trailers, size_t ntrailers);

#endif
