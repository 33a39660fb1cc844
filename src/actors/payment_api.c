/*
 * payment_api: see payment_api.h. The handlers run on gRPC CQ threads: they only validate
 * (pure functions), allocate the message and push it (never blocks); nothing waits.
 */
#include "actors/payment_api.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "actors/payment_validate.h"
#include "runtime/log.h"

#define MOD "payment_api"

const char *payment_method_path(payment_method_t method)
{
    switch (method) {
    case PAYMENT_AUTHORIZE:
        return "/payment.v1.PaymentService/AuthorizePayment";
    case PAYMENT_GET_PAYMENT:
        return "/payment.v1.PaymentService/GetPayment";
    case PAYMENT_GET_BALANCE:
        return "/payment.v1.PaymentService/GetAccountBalance";
    }
    return "unknown";
}

/* Room for the caller's trailers plus the two rate-limit ones. */
#define PAYMENT_TRAILERS_MAX 16

typedef struct rl_trailers {
    rpc_md_t md[PAYMENT_TRAILERS_MAX];
    char limit[24], remaining[24];
} rl_trailers_t;

/* The caller's trailers, plus x-ratelimit-limit/-remaining when the message carries a
 * rate-limit verdict (rl_limit > 0). */
static const rpc_md_t *with_rl_trailers(rl_trailers_t *t, const payment_msg_t *m,
                                        const rpc_md_t *trailers, size_t *ntrailers)
{
    if (m->rl_limit <= 0)
        return trailers;
    size_t n = *ntrailers;
    if (n + 2 > PAYMENT_TRAILERS_MAX) {
        LOG_ERROR(MOD, "%zu trailers: no room for the rate-limit ones", n);
        return trailers;
    }
    for (size_t i = 0; i < n; i++)
        t->md[i] = trailers[i];
    snprintf(t->limit, sizeof(t->limit), "%lld", (long long)m->rl_limit);
    snprintf(t->remaining, sizeof(t->remaining), "%lld",
             (long long)(m->rl_remaining < 0 ? 0 : m->rl_remaining));
    t->md[n++] = (rpc_md_t){"x-ratelimit-limit", t->limit};
    t->md[n++] = (rpc_md_t){"x-ratelimit-remaining", t->remaining};
    *ntrailers = n;
    return t->md;
}

int payment_msg_reply(payment_msg_t *m, const ProtobufCMessage *resp, const rpc_md_t *trailers,
                      size_t ntrailers)
{
    rpc_call_t *call = m->call;
    if (!call)
        return -EALREADY;
    m->call = NULL;
    rl_trailers_t t;
    trailers = with_rl_trailers(&t, m, trailers, &ntrailers);
    return rpc_call_reply(call, resp, trailers, ntrailers);
}

int payment_msg_fail(payment_msg_t *m, grpc_status_code code, const char *message,
                     const rpc_md_t *trailers, size_t ntrailers)
{
    rpc_call_t *call = m->call;
    if (!call)
        return -EALREADY;
    m->call = NULL;
    rl_trailers_t t;
    trailers = with_rl_trailers(&t, m, trailers, &ntrailers);
    return rpc_call_fail(call, code, message, trailers, ntrailers);
}

static void payment_msg_free(msg_t *hdr)
{
    payment_msg_t *m = (payment_msg_t *)hdr;
    if (m->call) {
        /* A holder that ends a message without answering is a bug; never leave the client
         * (or the server's shutdown) waiting for it. */
        LOG_ERROR(MOD, "%s: message disposed of without a reply; call ends INTERNAL",
                  payment_method_path((payment_method_t)hdr->type));
        payment_msg_fail(m, GRPC_STATUS_INTERNAL, "server error: request dropped", NULL, 0);
    }
    free(m);
}

static void payment_msg_failed(msg_t *hdr, int err)
{
    payment_msg_t *m = (payment_msg_t *)hdr;
    switch (err) {
    case -ETIMEDOUT:
        payment_msg_fail(m, GRPC_STATUS_DEADLINE_EXCEEDED,
                         "deadline exceeded while the request waited in the server", NULL, 0);
        break;
    case -ESHUTDOWN:
        payment_msg_fail(m, GRPC_STATUS_UNAVAILABLE, "server shutting down; retry", NULL, 0);
        break;
    default:
        payment_msg_fail(m, GRPC_STATUS_UNAVAILABLE,
                         "the server actor handling the request failed; retry", NULL, 0);
        break;
    }
    free(m);
}

static void handle(rpc_call_t *call, const ProtobufCMessage *req, const uint8_t *wire,
                   size_t wire_len, void *arg)
{
    const payment_api_route_t *r = arg;
    char why[PAYMENT_VALIDATE_MSG_MAX];
    int rc = -EINVAL;
    switch (r->method) {
    case PAYMENT_AUTHORIZE:
        rc = payment_validate_authorize_wire(
            wire, wire_len, (const Payment__V1__AuthorizePaymentRequest *)req, why, sizeof(why));
        break;
    case PAYMENT_GET_PAYMENT:
        rc = payment_validate_get_payment_wire(
            wire, wire_len, (const Payment__V1__GetPaymentRequest *)req, why, sizeof(why));
        break;
    case PAYMENT_GET_BALANCE:
        rc = payment_validate_get_balance_wire(
            wire, wire_len, (const Payment__V1__GetAccountBalanceRequest *)req, why, sizeof(why));
        break;
    }
    if (rc < 0) {
        rpc_call_fail(call, GRPC_STATUS_INVALID_ARGUMENT, why, NULL, 0);
        return;
    }
    payment_msg_t *m = calloc(1, sizeof(*m));
    if (!m) {
        rpc_call_fail(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory", NULL, 0);
        return;
    }
    msg_init(&m->hdr, r->method, payment_msg_free, payment_msg_failed);
    m->hdr.deadline_ns = rpc_call_deadline_ns(call);
    m->call = call;
    m->req.any = req;
    rc = r->api->target ? actor_send(r->api->target, &m->hdr) : payment_api_dispatch(r->api, m);
    if (rc < 0) {
        /* Refused: the message (and the call) are still ours. */
        m->call = NULL;
        free(m);
        rpc_call_fail(call, GRPC_STATUS_UNAVAILABLE,
                      rc == -EAGAIN ? "server overloaded: request queue full; retry later"
                                    : "server shutting down; retry",
                      NULL, 0);
    }
}

actor_t *payment_api_route(payment_api_t *api, const payment_msg_t *m)
{
    return api->route ? api->route(api->route_ctx, m) : NULL;
}

int payment_api_dispatch(payment_api_t *api, payment_msg_t *m)
{
    actor_t *to = payment_api_route(api, m);
    if (!to)
        return -ENOENT;
    return actor_send(to, &m->hdr);
}

int payment_api_register(rpc_server_t *srv, payment_api_t *api)
{
    static const ProtobufCMessageDescriptor *const requests[3] = {
        &payment__v1__authorize_payment_request__descriptor,
        &payment__v1__get_payment_request__descriptor,
        &payment__v1__get_account_balance_request__descriptor,
    };
    static const payment_method_t methods[3] = {PAYMENT_AUTHORIZE, PAYMENT_GET_PAYMENT,
                                                PAYMENT_GET_BALANCE};
    for (size_t i = 0; i < 3; i++) {
        api->_routes[i] = (payment_api_route_t){methods[i], api};
        rpc_unary_method_t m = {
            .path = payment_method_path(methods[i]),
            .request = requests[i],
            .handle = handle,
            .arg = &api->_routes[i],
        };
        int rc = rpc_server_add_unary(srv, &m);
        if (rc < 0)
            return rc;
    }
    return 0;
}
