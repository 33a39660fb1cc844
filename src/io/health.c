/*
 * health: see health.h. Each Watch stream has a watcher on a list guarded by H.mu; a
 * watcher sends one message at a time and, when its send completes, sends again if the
 * status it last sent is no longer the current one, so rapid flips coalesce and the last
 * status always gets through. Lock order: H.mu, then the call's own lock (inside the
 * rpc_stream_* functions); the server never calls us with a call lock held.
 */
#include "io/health.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/health/v1/health.pb-c.h"
#include "runtime/log.h"

#define MOD "health"

typedef Grpc__Health__V1__HealthCheckResponse__ServingStatus health_status_t;
#define ST_SERVING         GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
#define ST_NOT_SERVING     GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
#define ST_SERVICE_UNKNOWN GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN

typedef struct watcher {
    struct watcher *prev, *next;
    rpc_call_t *call;
    bool known;    /* the service exists */
    bool busy;     /* a send is in flight */
    int last_sent; /* status last sent, -1 before the first */
} watcher_t;

static struct {
    pthread_mutex_t mu;
    char **services;
    size_t nservices;
    bool serving;
    bool shutting_down;
    watcher_t *head;
    size_t nwatchers;
} H = {.mu = PTHREAD_MUTEX_INITIALIZER};

int health_init(const char *const *services, size_t nservices)
{
    char **copy = calloc(nservices + 1, sizeof(*copy));
    if (!copy)
        return -ENOMEM;
    for (size_t i = 0; i < nservices; i++) {
        copy[i] = strdup(services[i]);
        if (!copy[i]) {
            for (size_t j = 0; j < i; j++)
                free(copy[j]);
            free(copy);
            return -ENOMEM;
        }
    }
    pthread_mutex_lock(&H.mu);
    H.services = copy;
    H.nservices = nservices;
    H.serving = false;
    H.shutting_down = false;
    pthread_mutex_unlock(&H.mu);
    return 0;
}

void health_fini(void)
{
    pthread_mutex_lock(&H.mu);
    for (size_t i = 0; i < H.nservices; i++)
        free(H.services[i]);
    free(H.services);
    H.services = NULL;
    H.nservices = 0;
    if (H.nwatchers)
        LOG_ERROR(MOD, "%zu Watch streams still open at exit", H.nwatchers);
    pthread_mutex_unlock(&H.mu);
}

/* With H.mu held. */
static bool known_locked(const char *service)
{
    if (!service || !*service)
        return true;
    for (size_t i = 0; i < H.nservices; i++)
        if (strcmp(H.services[i], service) == 0)
            return true;
    return false;
}

static health_status_t current_locked(void)
{
    return H.serving && !H.shutting_down ? ST_SERVING : ST_NOT_SERVING;
}

static void unlink_locked(watcher_t *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        H.head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    H.nwatchers--;
}

/* Ends w's stream and forgets w. With H.mu held. */
static void finish_locked(watcher_t *w, grpc_status_code code, const char *message)
{
    rpc_call_t *call = w->call;
    unlink_locked(w);
    free(w);
    rpc_stream_finish(call, code, message);
}

/* Brings w up to date: sends the current status if w has not sent it yet, or ends the
 * stream once shutdown's NOT_SERVING went out. With H.mu held. */
static void advance_locked(watcher_t *w)
{
    if (w->busy)
        return;
    int want = w->known ? (int)current_locked() : (int)ST_SERVICE_UNKNOWN;
    if (want != w->last_sent) {
        Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        resp.status = (health_status_t)want;
        if (rpc_stream_send(w->call, &resp.base) < 0) {
            finish_locked(w, GRPC_STATUS_INTERNAL, "server error: cannot send the status");
            return;
        }
        w->busy = true;
        w->last_sent = want;
    } else if (H.shutting_down) {
        finish_locked(w, GRPC_STATUS_UNAVAILABLE, "server shutting down");
    }
}

void health_set_serving(bool serving)
{
    pthread_mutex_lock(&H.mu);
    if (H.serving != serving) {
        H.serving = serving;
        if (!H.shutting_down)
            LOG_INFO(MOD, "health: %s", serving ? "SERVING" : "NOT_SERVING");
        for (watcher_t *w = H.head, *next; w; w = next) {
            next = w->next;
            advance_locked(w);
        }
    }
    pthread_mutex_unlock(&H.mu);
}

bool health_serving(void)
{
    pthread_mutex_lock(&H.mu);
    bool serving = current_locked() == ST_SERVING;
    pthread_mutex_unlock(&H.mu);
    return serving;
}

void health_shutdown(void)
{
    pthread_mutex_lock(&H.mu);
    if (!H.shutting_down) {
        H.shutting_down = true;
        LOG_INFO(MOD, "health: NOT_SERVING (shutting down)");
        for (watcher_t *w = H.head, *next; w; w = next) {
            next = w->next;
            advance_locked(w);
        }
    }
    pthread_mutex_unlock(&H.mu);
}

size_t health_watchers(void)
{
    pthread_mutex_lock(&H.mu);
    size_t n = H.nwatchers;
    pthread_mutex_unlock(&H.mu);
    return n;
}

/* ---- the RPCs, on CQ threads ---- */

static void check(rpc_call_t *call, const ProtobufCMessage *msg, const uint8_t *wire,
                  size_t wire_len, void *arg)
{
    const Grpc__Health__V1__HealthCheckRequest *req =
        (const Grpc__Health__V1__HealthCheckRequest *)msg;
    pthread_mutex_lock(&H.mu);
    bool known = known_locked(req->service);
    health_status_t st = current_locked();
    pthread_mutex_unlock(&H.mu);
    if (!known) {
        char text[300];
        snprintf(text, sizeof(text), "unknown service \"%.200s\"", req->service);
        rpc_call_fail(call, GRPC_STATUS_NOT_FOUND, text, NULL, 0);
        return;
    }
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = st;
    rpc_call_reply(call, &resp.base, NULL, 0);
}

static void watch_start(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    const Grpc__Health__V1__HealthCheckRequest *req =
        (const Grpc__Health__V1__HealthCheckRequest *)msg;
    watcher_t *w = calloc(1, sizeof(*w));
    if (!w) {
        rpc_stream_finish(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "server out of memory");
        return;
    }
    w->call = call;
    w->last_sent = -1;
    rpc_call_set_user(call, w);
    pthread_mutex_lock(&H.mu);
    w->known = known_locked(req->service);
    w->next = H.head;
    if (H.head)
        H.head->prev = w;
    H.head = w;
    H.nwatchers++;
    advance_locked(w);
    pthread_mutex_unlock(&H.mu);
}

static void watch_sent(rpc_call_t *call, void *arg)
{
    pthread_mutex_lock(&H.mu);
    watcher_t *w = rpc_call_user(call);
    w->busy = false;
    advance_locked(w);
    pthread_mutex_unlock(&H.mu);
}

static void watch_close(rpc_call_t *call, bool cancelled, void *arg)
{
    pthread_mutex_lock(&H.mu);
    finish_locked(rpc_call_user(call), GRPC_STATUS_CANCELLED, "watch ended by the client");
    pthread_mutex_unlock(&H.mu);
}

int health_register(rpc_server_t *srv)
{
    rpc_unary_method_t c = {
        .path = HEALTH_CHECK_PATH,
        .request = &grpc__health__v1__health_check_request__descriptor,
        .handle = check,
    };
    int rc = rpc_server_add_unary(srv, &c);
    if (rc < 0)
        return rc;
    rpc_stream_method_t w = {
        .path = HEALTH_WATCH_PATH,
        .request = &grpc__health__v1__health_check_request__descriptor,
        .on_start = watch_start,
        .on_sent = watch_sent,
        .on_close = watch_close,
    };
    return rpc_server_add_stream(srv, &w);
}
