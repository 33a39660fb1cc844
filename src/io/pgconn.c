/*
 * pgconn: see pgconn.h.
 *
 * DESIGN
 * States: DOWN (waiting for the retry timer) → CONNECTING (PQconnectPoll decides whether
 * the socket is watched for reading or writing; the socket may change between polls, e.g.
 * for a multi-host URL, so the watch follows PQsocket) → UP. While UP the socket is always
 * watched for input, so a server that goes away is noticed at once even when idle (and
 * health can follow it); output is watched only while PQflush has data pending.
 * One timer serves the retry delay, the connect timeout and the statement timeout: at most
 * one of them is meaningful in each state. Losses found inside pgconn_query are handled
 * from a zero-delay timer so no callback runs from inside a call of the owner.
 */
#include "io/pgconn.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "io/pg.h"
#include "runtime/log.h"
#include "runtime/msg.h"

#define MOD "pgconn"

typedef enum { ST_DOWN, ST_CONNECTING, ST_UP } state_t;

struct pgconn {
    actor_t *actor;
    pgconn_callbacks_t cb;
    void *arg;
    char *conninfo;
    char *appname;
    uint64_t connect_timeout_ns, backoff_base_ns, backoff_cap_ns;

    state_t state;
    PGconn *pg;
    int fd;               /* watched socket, -1 = none */
    uint32_t events;      /* what fd is watched for */
    actor_timer_t *timer; /* retry delay / connect timeout / statement timeout */
    actor_timer_t *defer; /* deferred loss handling */
    char defer_why[256];
    uint64_t next_delay_ns;
    unsigned failures; /* consecutive failed attempts (for logging once) */
    bool busy;         /* a statement is running */
    PGresult *last;    /* the running statement's last result */
};

static int on_fd(actor_t *a, void *state, int fd, uint32_t events, void *arg);
static void start_connect(pgconn_t *c);

static void one_line(char *dst, size_t len, const char *src)
{
    size_t j = 0;
    for (size_t i = 0; src && src[i] && j + 1 < len; i++) {
        char ch = src[i];
        if (ch == '\n' || ch == '\r' || ch == '\t')
            ch = ' ';
        dst[j++] = ch;
    }
    while (j > 0 && dst[j - 1] == ' ')
        j--;
    dst[j] = '\0';
}

static void unwatch(pgconn_t *c)
{
    if (c->fd >= 0)
        actor_unwatch_fd(c->actor, c->fd);
    c->fd = -1;
    c->events = 0;
}

static int watch(pgconn_t *c, uint32_t events)
{
    int fd = c->pg ? PQsocket(c->pg) : -1;
    if (fd < 0)
        return -ENOTCONN;
    if (fd != c->fd)
        unwatch(c);
    if (fd == c->fd && events == c->events)
        return 0;
    int rc = actor_watch_fd(c->actor, fd, events, on_fd, c);
    if (rc < 0)
        return rc;
    c->fd = fd;
    c->events = events;
    return 0;
}

static void close_pg(pgconn_t *c)
{
    unwatch(c);
    if (c->last) {
        PQclear(c->last);
        c->last = NULL;
    }
    if (c->pg) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
}

/* The connection failed or was lost: end a running statement, tell the owner, retry later. */
static void go_down(pgconn_t *c, int err, const char *why)
{
    bool was_busy = c->busy;
    bool was_up = c->state == ST_UP;
    close_pg(c);
    c->busy = false;
    c->state = ST_DOWN;
    uint64_t delay = c->next_delay_ns;
    c->next_delay_ns = delay * 2 > c->backoff_cap_ns ? c->backoff_cap_ns : delay * 2;
    actor_timer_arm(c->timer, delay, 0);
    if (was_up || c->failures == 0)
        LOG_WARNING(MOD, "PostgreSQL %s: %s; retrying in %.0f ms",
                    was_up ? "connection lost" : "unreachable", why, delay / 1e6);
    c->failures++;
    if (was_busy && c->cb.on_result)
        c->cb.on_result(c, c->arg, NULL, err, "", why);
    if (c->cb.on_down)
        c->cb.on_down(c, c->arg, why);
}

static void lost(pgconn_t *c)
{
    char why[300];
    one_line(why, sizeof why, c->pg ? PQerrorMessage(c->pg) : "no connection");
    go_down(c, -ENOTCONN, why[0] ? why : "connection closed");
}

static void became_up(pgconn_t *c)
{
    PQsetnonblocking(c->pg, 1);
    c->state = ST_UP;
    c->busy = false;
    c->next_delay_ns = c->backoff_base_ns;
    actor_timer_arm(c->timer, 0, 0);
    if (c->failures > 0)
        LOG_INFO(MOD, "PostgreSQL connection re-established");
    c->failures = 0;
    if (watch(c, EPOLLIN) < 0) {
        lost(c);
        return;
    }
    if (c->cb.on_up)
        c->cb.on_up(c, c->arg);
}

static void connect_poll(pgconn_t *c)
{
    PostgresPollingStatusType st = PQconnectPoll(c->pg);
    switch (st) {
    case PGRES_POLLING_OK:
        became_up(c);
        return;
    case PGRES_POLLING_READING:
        if (watch(c, EPOLLIN) < 0)
            lost(c);
        return;
    case PGRES_POLLING_WRITING:
        if (watch(c, EPOLLOUT) < 0)
            lost(c);
        return;
    default:
        lost(c);
        return;
    }
}

static void start_connect(pgconn_t *c)
{
    /* TCP keepalives (before dbname, so the URL may override them): a peer that vanished
     * without a FIN is noticed by an idle connection within about 20 s, not hours. */
    const char *keys[] = {"keepalives_idle",
                          "keepalives_interval",
                          "keepalives_count",
                          "dbname",
                          "fallback_application_name",
                          "client_encoding",
                          NULL};
    const char *vals[] = {"10", "3", "3", c->conninfo, c->appname, "UTF8", NULL};
    c->pg = PQconnectStartParams(keys, vals, 1);
    if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD) {
        lost(c);
        return;
    }
    c->state = ST_CONNECTING;
    actor_timer_arm(c->timer, c->connect_timeout_ns, 0);
    if (watch(c, EPOLLOUT) < 0)
        lost(c);
}

/* Reads what arrived; when the running statement has all its results, reports them. */
static void read_input(pgconn_t *c)
{
    if (!PQconsumeInput(c->pg)) {
        lost(c);
        return;
    }
    PGnotify *n;
    while ((n = PQnotifies(c->pg)) != NULL)
        PQfreemem(n);
    while (!PQisBusy(c->pg)) {
        PGresult *r = PQgetResult(c->pg);
        if (!r)
            break;
        if (c->last)
            PQclear(c->last);
        c->last = r;
        if (!c->busy) { /* nothing asked: stray result (should not happen) */
            PQclear(c->last);
            c->last = NULL;
        }
    }
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        lost(c);
        return;
    }
    if (!c->busy || PQisBusy(c->pg))
        return;
    /* PQgetResult returned NULL with the input complete: the statement is over. */
    PGresult *r = c->last;
    c->last = NULL;
    c->busy = false;
    actor_timer_arm(c->timer, 0, 0);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
        c->cb.on_result(c, c->arg, r, 0, "", "");
        return;
    }
    char why[700];
    int err = pg_result_error(c->pg, r, why, sizeof why);
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    char sqlstate[8];
    snprintf(sqlstate, sizeof sqlstate, "%s", state ? state : "");
    if (r)
        PQclear(r);
    if (err == -ENOTCONN) {
        c->busy = true; /* so go_down reports it as the statement's end */
        go_down(c, -ENOTCONN, why);
        return;
    }
    c->cb.on_result(c, c->arg, NULL, -EIO, sqlstate, why);
}

static int on_fd(actor_t *a, void *state, int fd, uint32_t events, void *arg)
{
    (void)a;
    (void)state;
    (void)fd;
    pgconn_t *c = arg;
    if (c->state == ST_CONNECTING) {
        connect_poll(c);
        return 0;
    }
    if (c->state != ST_UP)
        return 0;
    if (events & EPOLLOUT) {
        int f = PQflush(c->pg);
        if (f < 0) {
            lost(c);
            return 0;
        }
        if (f == 0 && watch(c, EPOLLIN) < 0) {
            lost(c);
            return 0;
        }
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        read_input(c);
    return 0;
}

static int on_timer(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    (void)a;
    (void)state;
    (void)t;
    pgconn_t *c = arg;
    switch (c->state) {
    case ST_DOWN:
        start_connect(c);
        break;
    case ST_CONNECTING: {
        char why[200];
        snprintf(why, sizeof why, "no connection within %.0f ms", c->connect_timeout_ns / 1e6);
        go_down(c, -ETIMEDOUT, why);
        break;
    }
    case ST_UP:
        if (c->busy) {
            /* The statement's outcome is unknown; a fresh connection is the only way to
             * stop waiting for it (the server aborts it when it sees the socket close). */
            go_down(c, -ETIMEDOUT, "no answer from PostgreSQL within the statement timeout");
        }
        break;
    }
    return 0;
}

static int on_defer(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    (void)a;
    (void)state;
    (void)t;
    pgconn_t *c = arg;
    if (c->state == ST_UP && (!c->pg || PQstatus(c->pg) == CONNECTION_BAD))
        go_down(c, -ENOTCONN, c->defer_why);
    return 0;
}

int pgconn_create(pgconn_t **out, actor_t *a, const pgconn_config_t *cfg,
                  const pgconn_callbacks_t *cb, void *arg)
{
    *out = NULL;
    if (!cfg || !cfg->conninfo || !cb || !cb->on_result)
        return -EINVAL;
    pgconn_t *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->actor = a;
    c->cb = *cb;
    c->arg = arg;
    c->fd = -1;
    c->conninfo = strdup(cfg->conninfo);
    c->appname = strdup(cfg->application_name ? cfg->application_name : "paymentd");
    c->connect_timeout_ns = cfg->connect_timeout_ns ? cfg->connect_timeout_ns : 5000000000ull;
    c->backoff_base_ns = cfg->backoff_base_ns ? cfg->backoff_base_ns : 100000000ull;
    c->backoff_cap_ns = cfg->backoff_cap_ns ? cfg->backoff_cap_ns : 2000000000ull;
    c->next_delay_ns = c->backoff_base_ns;
    int rc = -ENOMEM;
    if (!c->conninfo || !c->appname)
        goto fail;
    if ((rc = actor_timer_new(&c->timer, a, on_timer, c)) < 0)
        goto fail;
    if ((rc = actor_timer_new(&c->defer, a, on_defer, c)) < 0)
        goto fail;
    c->state = ST_DOWN;
    start_connect(c);
    *out = c;
    return 0;
fail:
    if (c->timer)
        actor_timer_free(c->timer);
    free(c->conninfo);
    free(c->appname);
    free(c);
    return rc;
}

void pgconn_destroy(pgconn_t *c)
{
    if (!c)
        return;
    close_pg(c);
    actor_timer_free(c->timer);
    actor_timer_free(c->defer);
    free(c->conninfo);
    free(c->appname);
    free(c);
}

bool pgconn_idle(const pgconn_t *c)
{
    return c && c->state == ST_UP && !c->busy;
}

bool pgconn_up(const pgconn_t *c)
{
    return c && c->state == ST_UP;
}

int pgconn_query(pgconn_t *c, const char *sql, int nparams, const char *const *params,
                 uint64_t timeout_ns)
{
    if (c->state != ST_UP)
        return -ENOTCONN;
    if (c->busy)
        return -EBUSY;
    if (!PQsendQueryParams(c->pg, sql, nparams, NULL, params, NULL, NULL, 0)) {
        /* Nothing reached the server in a usable form; if the connection is the cause,
         * handle its loss from the loop, not from inside the owner's call. */
        one_line(c->defer_why, sizeof c->defer_why, PQerrorMessage(c->pg));
        if (PQstatus(c->pg) == CONNECTION_BAD)
            actor_timer_arm(c->defer, 1, 0);
        return -ENOTCONN;
    }
    c->busy = true;
    int f = PQflush(c->pg);
    if (f < 0) {
        one_line(c->defer_why, sizeof c->defer_why, PQerrorMessage(c->pg));
        /* The statement may have reached the server: its end is reported as a loss. */
        actor_timer_arm(c->defer, 1, 0);
        unwatch(c);
        PQfinish(c->pg);
        c->pg = NULL;
        return 0;
    }
    if (watch(c, f == 1 ? EPOLLIN | EPOLLOUT : EPOLLIN) < 0) {
        snprintf(c->defer_why, sizeof c->defer_why, "cannot watch the PostgreSQL socket");
        actor_timer_arm(c->defer, 1, 0);
        unwatch(c);
        PQfinish(c->pg);
        c->pg = NULL;
        return 0;
    }
    if (timeout_ns)
        actor_timer_arm(c->timer, timeout_ns, 0);
    return 0;
}

void pgconn_reset(pgconn_t *c, const char *why)
{
    if (c->state == ST_DOWN)
        return;
    go_down(c, -ENOTCONN, why);
}
