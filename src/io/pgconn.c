/*
 * pgconn: see pgconn.h.
 *
 * DESIGN
 * States: DOWN (waiting for the retry timer) → CONNECTING (PQconnectPoll decides whether
 * the socket is watched for reading or writing; the socket may change between polls, e.g.
 * for a multi-host URL, so the watch follows PQsocket) → UP. While UP the socket is always
 * watched for input, so a server that goes away is noticed at once even when idle (and
 * health can follow it); output is watched only while PQflush has data pending.
 * One timer serves the retry delay, the connect timeout and the progress timeout: at most
 * one of them is meaningful in each state. The progress timer is set once, not per entry:
 * entries only record when they ended, and when it fires it sets itself again for what is
 * left of the timeout after the last progress. Losses found inside a queueing call are handled
 * from a zero-delay timer so no callback runs from inside a call of the owner.
 * Pending entries live in a ring in the order they were queued, which is the order libpq
 * returns their results: a statement's results end with a NULL from PQgetResult (its last
 * result is the one reported), a sync is one PGRES_PIPELINE_SYNC.
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
    char *options;
    uint64_t connect_timeout_ns, backoff_base_ns, backoff_cap_ns;

    state_t state;
    PGconn *pg;
    int fd;               /* watched socket, -1 = none */
    uint32_t events;      /* what fd is watched for */
    actor_timer_t *timer; /* retry delay / connect timeout / statement timeout */
    actor_timer_t *defer; /* deferred loss handling */
    char defer_why[256];
    uint64_t next_delay_ns;
    unsigned failures;    /* consecutive failed attempts (for logging once) */
    uint64_t timeout_ns;  /* progress timeout of the last push; 0 = none */
    uint64_t progress_ns; /* when an entry last ended (or the first was queued) */
    bool progress_armed;  /* the timer is set for the progress timeout */
    /* pending entries: a ring of ent_cap (a power of two) */
    struct entry {
        void *tag;
        int step;
        bool sync;
    } * ent;
    size_t ent_cap, ent_head, ent_len;
    PGresult *last; /* the head statement's last result so far */
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

/* The connection failed or was lost: end every pending entry, tell the owner, retry later. */
static void go_down(pgconn_t *c, int err, const char *why)
{
    bool was_up = c->state == ST_UP;
    close_pg(c);
    c->state = ST_DOWN;
    uint64_t delay = c->next_delay_ns;
    c->next_delay_ns = delay * 2 > c->backoff_cap_ns ? c->backoff_cap_ns : delay * 2;
    actor_timer_arm(c->timer, delay, 0);
    c->progress_armed = false;
    if (was_up || c->failures == 0)
        LOG_WARNING(MOD, "PostgreSQL %s: %s; retrying in %.0f ms",
                    was_up ? "connection lost" : "unreachable", why, delay / 1e6);
    c->failures++;
    while (c->ent_len > 0) {
        struct entry e = c->ent[c->ent_head];
        c->ent_head = (c->ent_head + 1) & (c->ent_cap - 1);
        c->ent_len--;
        c->cb.on_entry(c, c->arg, e.tag, e.step, NULL, err, "", why);
    }
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
    if (PQsetnonblocking(c->pg, 1) != 0 || !PQenterPipelineMode(c->pg)) {
        lost(c);
        return;
    }
    c->state = ST_UP;
    c->next_delay_ns = c->backoff_base_ns;
    actor_timer_arm(c->timer, 0, 0);
    c->progress_armed = false;
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
    const char *keys[] = {
        "keepalives_idle", "keepalives_interval",       "keepalives_count", "dbname",
        "options",         "fallback_application_name", "client_encoding",  NULL};
    const char *vals[] = {"10", "3", "3", c->conninfo, c->options, c->appname, "UTF8", NULL};
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

/* Ends the head entry. */
static void pop_entry(pgconn_t *c, PGresult *r, int err, const char *sqlstate, const char *why)
{
    struct entry e = c->ent[c->ent_head];
    c->ent_head = (c->ent_head + 1) & (c->ent_cap - 1);
    c->ent_len--;
    c->progress_ns = time_now_ns(); /* the timeout counts again from here */
    c->cb.on_entry(c, c->arg, e.tag, e.step, r, err, sqlstate, why);
}

/* The head statement's results are complete: report its last one. */
static void end_statement(pgconn_t *c)
{
    PGresult *r = c->last;
    c->last = NULL;
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
        pop_entry(c, r, 0, "", "");
        return;
    }
    if (st == PGRES_PIPELINE_ABORTED) {
        PQclear(r);
        pop_entry(c, NULL, -ECANCELED, "",
                  "not run: an earlier statement of its transaction failed");
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
        go_down(c, -ENOTCONN, why);
        return;
    }
    pop_entry(c, NULL, -EIO, sqlstate, why);
}

/* Reads what arrived and ends every entry whose results are complete. */
static void read_input(pgconn_t *c)
{
    if (!PQconsumeInput(c->pg)) {
        lost(c);
        return;
    }
    PGnotify *n;
    while ((n = PQnotifies(c->pg)) != NULL)
        PQfreemem(n);
    while (c->state == ST_UP && c->pg && !PQisBusy(c->pg)) {
        PGresult *r = PQgetResult(c->pg);
        if (!r) {
            /* the end of the head statement's results, or nothing more for now */
            if (c->ent_len > 0 && !c->ent[c->ent_head].sync && c->last) {
                end_statement(c);
                continue;
            }
            break;
        }
        if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            if (c->ent_len == 0 || !c->ent[c->ent_head].sync) {
                go_down(c, -ENOTCONN, "PostgreSQL pipeline out of step (unexpected sync)");
                return;
            }
            pop_entry(c, NULL, 0, "", "");
            continue;
        }
        if (c->ent_len == 0 || c->ent[c->ent_head].sync) {
            PQclear(r);
            go_down(c, -ENOTCONN, "PostgreSQL pipeline out of step (unexpected result)");
            return;
        }
        if (c->last)
            PQclear(c->last);
        c->last = r;
    }
    if (c->state == ST_UP && (!c->pg || PQstatus(c->pg) == CONNECTION_BAD))
        lost(c);
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
    case ST_UP: {
        c->progress_armed = false;
        if (c->ent_len == 0 || c->timeout_ns == 0)
            break;
        uint64_t idle = time_now_ns() - c->progress_ns;
        if (idle < c->timeout_ns) {
            actor_timer_arm(c->timer, c->timeout_ns - idle, 0);
            c->progress_armed = true;
            break;
        }
        /* The entries' outcome is unknown; a fresh connection is the only way to stop
         * waiting for them (the server aborts its work when it sees the socket close). */
        go_down(c, -ETIMEDOUT, "no answer from PostgreSQL within the statement timeout");
        break;
    }
    }
    return 0;
}

static int on_defer(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    (void)a;
    (void)state;
    (void)t;
    pgconn_t *c = arg;
    if (c->state == ST_UP) /* armed only when libpq refused to queue or send */
        go_down(c, -ENOTCONN, c->defer_why);
    return 0;
}

/* The server options of the connection: those of the conninfo (or, without any, of
 * PGOPTIONS, as libpq would use), then ours, so both apply (a later -c wins). */
static char *merged_options(const char *conninfo, const char *ours)
{
    const char *theirs = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strcmp(o->keyword, "options") == 0 && o->val && o->val[0])
            theirs = o->val;
    if (!theirs)
        theirs = getenv("PGOPTIONS");
    size_t n = (theirs ? strlen(theirs) : 0) + (ours ? strlen(ours) : 0) + 2;
    char *m = malloc(n);
    if (m)
        snprintf(m, n, "%s%s%s", theirs ? theirs : "", theirs && ours ? " " : "", ours ? ours : "");
    PQconninfoFree(opts);
    return m;
}

int pgconn_create(pgconn_t **out, actor_t *a, const pgconn_config_t *cfg,
                  const pgconn_callbacks_t *cb, void *arg)
{
    *out = NULL;
    if (!cfg || !cfg->conninfo || !cb || !cb->on_entry)
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
    c->options = merged_options(c->conninfo, cfg->options);
    c->connect_timeout_ns = cfg->connect_timeout_ns ? cfg->connect_timeout_ns : 5000000000ull;
    c->backoff_base_ns = cfg->backoff_base_ns ? cfg->backoff_base_ns : 100000000ull;
    c->backoff_cap_ns = cfg->backoff_cap_ns ? cfg->backoff_cap_ns : 2000000000ull;
    c->next_delay_ns = c->backoff_base_ns;
    c->ent_cap = 64;
    c->ent = calloc(c->ent_cap, sizeof(*c->ent));
    int rc = -ENOMEM;
    if (!c->conninfo || !c->appname || !c->options || !c->ent)
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
    free(c->options);
    free(c->ent);
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
    free(c->options);
    free(c->ent);
    free(c);
}

bool pgconn_up(const pgconn_t *c)
{
    return c && c->state == ST_UP;
}

size_t pgconn_pending(const pgconn_t *c)
{
    return c ? c->ent_len : 0;
}

/* libpq refused to queue or send: only a broken connection does that. Handle the loss from
 * the loop, not from inside the owner's call. */
static int refused(pgconn_t *c)
{
    one_line(c->defer_why, sizeof c->defer_why, PQerrorMessage(c->pg));
    if (!c->defer_why[0])
        snprintf(c->defer_why, sizeof c->defer_why, "libpq refused to queue a statement");
    actor_timer_arm(c->defer, 1, 0);
    return -ENOTCONN;
}

/* Room for one more entry; allocation failure is fatal (as everywhere in the runtime). */
static void add_entry(pgconn_t *c, void *tag, int step, bool sync)
{
    if (c->ent_len == c->ent_cap) {
        size_t cap = c->ent_cap * 2;
        struct entry *e = malloc(cap * sizeof(*e));
        if (!e)
            abort();
        for (size_t i = 0; i < c->ent_len; i++)
            e[i] = c->ent[(c->ent_head + i) & (c->ent_cap - 1)];
        free(c->ent);
        c->ent = e;
        c->ent_cap = cap;
        c->ent_head = 0;
    }
    if (c->ent_len == 0)
        c->progress_ns = time_now_ns(); /* waiting starts now */
    c->ent[(c->ent_head + c->ent_len) & (c->ent_cap - 1)] = (struct entry){tag, step, sync};
    c->ent_len++;
}

int pgconn_prepare(pgconn_t *c, const char *name, const char *sql, void *tag, int step)
{
    if (c->state != ST_UP || !c->pg)
        return -ENOTCONN;
    if (!PQsendPrepare(c->pg, name, sql, 0, NULL))
        return refused(c);
    add_entry(c, tag, step, false);
    return 0;
}

int pgconn_exec(pgconn_t *c, const char *name, int nparams, const char *const *params, void *tag,
                int step)
{
    if (c->state != ST_UP || !c->pg)
        return -ENOTCONN;
    if (!PQsendQueryPrepared(c->pg, name, nparams, params, NULL, NULL, 0))
        return refused(c);
    add_entry(c, tag, step, false);
    return 0;
}

int pgconn_sync(pgconn_t *c, void *tag, int step)
{
    if (c->state != ST_UP || !c->pg)
        return -ENOTCONN;
    if (!PQpipelineSync(c->pg))
        return refused(c);
    add_entry(c, tag, step, true);
    return 0;
}

int pgconn_push(pgconn_t *c, bool flush, uint64_t timeout_ns)
{
    if (c->state != ST_UP || !c->pg)
        return -ENOTCONN;
    if (flush && !PQsendFlushRequest(c->pg))
        return refused(c);
    int f = PQflush(c->pg);
    if (f < 0)
        return refused(c);
    if (watch(c, f == 1 ? EPOLLIN | EPOLLOUT : EPOLLIN) < 0) {
        snprintf(c->defer_why, sizeof c->defer_why, "cannot watch the PostgreSQL socket");
        actor_timer_arm(c->defer, 1, 0);
        return -ENOTCONN;
    }
    c->timeout_ns = timeout_ns;
    if (c->ent_len > 0 && timeout_ns && !c->progress_armed) {
        actor_timer_arm(c->timer, timeout_ns, 0);
        c->progress_armed = true;
    }
    return 0;
}

void pgconn_reset(pgconn_t *c, const char *why)
{
    if (c->state == ST_DOWN)
        return;
    go_down(c, -ENOTCONN, why);
}
