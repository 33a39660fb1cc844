/*
 * redis: see redis.h. hiredis 0.14 frees its context itself on any connection error
 * (inside redisAsyncHandleRead/Write) and calls the adapter's cleanup hook from that free;
 * that hook is therefore the one place where "the connection is gone" is handled.
 */
#include "io/redis.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include <hiredis/async.h>

#include "runtime/log.h"
#include "runtime/msg.h"

#define MOD "redis"

typedef struct cmd_slot {
    redis_reply_fn cb;
    void *arg;
    uint64_t deadline_ns;
} cmd_slot_t;

struct redis_client {
    actor_t *a;
    redis_config_t cfg;
    char *host, *user, *password;
    char name[64];
    redisAsyncContext *ac; /* NULL while waiting to reconnect */
    int fd;
    uint32_t events; /* what the actor watches on fd now */
    bool connected;
    bool outage; /* a WARNING was logged for the current outage */
    bool destroying;
    uint64_t connect_deadline_ns; /* while connecting */
    uint64_t backoff_ns;
    char drop_reason[256]; /* why we dropped the connection ourselves */
    /* Commands awaiting a reply, in send order (ring buffer). */
    cmd_slot_t *q;
    size_t qcap, qhead, qlen;
    actor_timer_t *deadline_timer;
    actor_timer_t *retry_timer;
    redis_client_stats_t stats;
};

static void client_connect(redis_client_t *c);

/* ---- the event adapter ------------------------------------------------------------------ */

static int on_fd(actor_t *a, void *state, int fd, uint32_t events, void *arg)
{
    (void)a, (void)state, (void)fd;
    redis_client_t *c = arg;
    redisAsyncContext *ac = c->ac;
    if (!ac)
        return 0;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        redisAsyncHandleRead(ac);
    /* The read may have freed the context (error, peer closed): c->ac is then NULL. */
    if (c->ac == ac && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && (c->events & EPOLLOUT))
        redisAsyncHandleWrite(ac);
    return 0;
}

static void ev_set(redis_client_t *c, uint32_t events)
{
    if (c->fd < 0 || events == c->events)
        return;
    int rc;
    if (events == 0)
        rc = actor_unwatch_fd(c->a, c->fd);
    else
        rc = actor_watch_fd(c->a, c->fd, events, on_fd, c);
    if (rc < 0)
        LOG_ERROR(MOD, "%s: cannot watch fd %d: %s", c->name, c->fd, strerror(-rc));
    else
        c->events = events;
}

static void ev_add_read(void *p)
{
    redis_client_t *c = p;
    ev_set(c, c->events | EPOLLIN);
}

static void ev_del_read(void *p)
{
    redis_client_t *c = p;
    ev_set(c, c->events & ~(uint32_t)EPOLLIN);
}

static void ev_add_write(void *p)
{
    redis_client_t *c = p;
    ev_set(c, c->events | EPOLLOUT);
}

static void ev_del_write(void *p)
{
    redis_client_t *c = p;
    ev_set(c, c->events & ~(uint32_t)EPOLLOUT);
}

static void retry_schedule(redis_client_t *c)
{
    uint64_t d = c->backoff_ns;
    c->backoff_ns = d * 2 > c->cfg.backoff_cap_ns ? c->cfg.backoff_cap_ns : d * 2;
    int rc = actor_timer_arm(c->retry_timer, d, 0);
    if (rc < 0)
        LOG_ERROR(MOD, "%s: cannot arm the reconnect timer: %s", c->name, strerror(-rc));
}

/* The connection is gone (or never came up). Pending callbacks have already run. */
static void conn_lost(redis_client_t *c, const char *why)
{
    c->ac = NULL;
    c->fd = -1;
    c->events = 0;
    c->connected = false;
    c->connect_deadline_ns = 0;
    if (c->destroying)
        return;
    c->stats.failures++;
    if (!c->outage) {
        c->outage = true;
        LOG_WARNING(MOD, "%s: redis %s:%d unavailable: %s; reconnecting with backoff", c->name,
                    c->host, c->cfg.port, why);
    } else {
        LOG_DEBUG(MOD, "%s: redis %s:%d still unavailable: %s", c->name, c->host, c->cfg.port, why);
    }
    retry_schedule(c);
    if (c->cfg.on_down)
        c->cfg.on_down(c, why, c->cfg.arg);
}

static void ev_cleanup(void *p)
{
    redis_client_t *c = p;
    char why[256];
    if (c->drop_reason[0])
        snprintf(why, sizeof(why), "%s", c->drop_reason);
    else if (c->ac && c->ac->err)
        snprintf(why, sizeof(why), "%s", c->ac->errstr);
    else
        snprintf(why, sizeof(why), "connection closed");
    c->drop_reason[0] = '\0';
    if (c->events && c->fd >= 0)
        actor_unwatch_fd(c->a, c->fd);
    c->events = 0;
    conn_lost(c, why);
}

/* ---- command queue and deadlines -------------------------------------------------------- */

static void deadline_arm(redis_client_t *c)
{
    uint64_t next = 0;
    if (c->ac && !c->connected && c->connect_deadline_ns)
        next = c->connect_deadline_ns;
    if (c->qlen) {
        uint64_t d = c->q[c->qhead].deadline_ns;
        if (!next || d < next)
            next = d;
    }
    if (!next)
        return;
    uint64_t now = time_now_ns();
    actor_timer_arm(c->deadline_timer, next > now ? next - now : 1, 0);
}

static int on_deadline(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    (void)a, (void)state, (void)t;
    redis_client_t *c = arg;
    uint64_t now = time_now_ns();
    if (!c->ac)
        return 0;
    if (!c->connected && c->connect_deadline_ns && now >= c->connect_deadline_ns) {
        char why[96];
        snprintf(why, sizeof(why), "connect timed out after %llu ms",
                 (unsigned long long)(c->cfg.connect_timeout_ns / 1000000));
        c->stats.timeouts++;
        redis_client_drop(c, why);
        return 0;
    }
    if (c->qlen && now >= c->q[c->qhead].deadline_ns) {
        char why[96];
        snprintf(why, sizeof(why), "no reply within %llu ms",
                 (unsigned long long)(c->cfg.command_timeout_ns / 1000000));
        c->stats.timeouts++;
        redis_client_drop(c, why);
        return 0;
    }
    deadline_arm(c);
    return 0;
}

/* A reply arrived: the server really answers (a TCP connect alone proves nothing: a paused
 * Redis accepts connections). Ends an outage and resets the backoff. */
static void answered(redis_client_t *c)
{
    c->backoff_ns = c->cfg.backoff_base_ns;
    if (c->outage) {
        c->outage = false;
        LOG_INFO(MOD, "%s: redis %s:%d answers again", c->name, c->host, c->cfg.port);
    }
}

static void trampoline(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)ac;
    redis_client_t *c = priv;
    if (c->qlen == 0) {
        LOG_ERROR(MOD, "%s: reply without a pending command (ignored)", c->name);
        return;
    }
    cmd_slot_t s = c->q[c->qhead];
    c->qhead = (c->qhead + 1) % c->qcap;
    c->qlen--;
    if (reply)
        answered(c);
    s.cb(c, reply, s.arg);
}

static void q_push(redis_client_t *c, redis_reply_fn cb, void *arg)
{
    if (c->qlen == c->qcap) {
        size_t ncap = c->qcap ? c->qcap * 2 : 256;
        cmd_slot_t *nq = malloc(ncap * sizeof(*nq));
        if (!nq) {
            LOG_ERROR(MOD, "out of memory");
            abort();
        }
        for (size_t i = 0; i < c->qlen; i++)
            nq[i] = c->q[(c->qhead + i) % c->qcap];
        free(c->q);
        c->q = nq;
        c->qcap = ncap;
        c->qhead = 0;
    }
    c->q[(c->qhead + c->qlen) % c->qcap] =
        (cmd_slot_t){cb, arg, time_now_ns() + c->cfg.command_timeout_ns};
    c->qlen++;
    if (c->qlen == 1)
        deadline_arm(c);
}

/* ---- connection ------------------------------------------------------------------------- */

static void on_connect(const redisAsyncContext *ac, int status)
{
    redis_client_t *c = ac->data;
    if (status != REDIS_OK)
        return; /* hiredis frees the context next: ev_cleanup reports it */
    c->connected = true;
    c->connect_deadline_ns = 0;
    c->stats.connects++;
    LOG_DEBUG(MOD, "%s: connected to redis %s:%d", c->name, c->host, c->cfg.port);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)ac, (void)status; /* handled in ev_cleanup, which hiredis called just before */
}

static void internal_reply(redis_client_t *c, redisReply *r, void *arg)
{
    const char *what = arg;
    if (r && r->type == REDIS_REPLY_ERROR) {
        char why[200];
        snprintf(why, sizeof(why), "%s failed: %.*s", what, (int)(r->len > 120 ? 120 : r->len),
                 r->str);
        redis_client_drop(c, why);
    }
}

static void client_connect(redis_client_t *c)
{
    redisAsyncContext *ac = redisAsyncConnect(c->host, c->cfg.port);
    if (!ac) {
        conn_lost(c, "out of memory creating the connection");
        return;
    }
    if (ac->err) {
        char why[200];
        snprintf(why, sizeof(why), "%s", ac->errstr);
        redisAsyncFree(ac); /* no adapter attached yet: no hook runs */
        conn_lost(c, why);
        return;
    }
    ac->data = c;
    ac->ev.data = c;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    c->fd = ac->c.fd;
    c->events = 0;
    c->connected = false;
    c->drop_reason[0] = '\0';
    c->connect_deadline_ns = time_now_ns() + c->cfg.connect_timeout_ns;
    /* Writable = connected (or failed): hiredis completes the connect on the first event. */
    ev_add_write(c);
    deadline_arm(c);
    if (c->password[0]) {
        if (c->user[0]) {
            const char *argv[] = {"AUTH", c->user, c->password};
            redis_client_command(c, internal_reply, "AUTH", 3, argv, NULL);
        } else {
            const char *argv[] = {"AUTH", c->password};
            redis_client_command(c, internal_reply, "AUTH", 2, argv, NULL);
        }
    }
    if (c->cfg.db) {
        char db[16];
        snprintf(db, sizeof(db), "%d", c->cfg.db);
        const char *argv[] = {"SELECT", db};
        redis_client_command(c, internal_reply, "SELECT", 2, argv, NULL);
    }
    if (c->cfg.on_open && c->ac)
        c->cfg.on_open(c, c->cfg.arg);
}

static int on_retry(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    (void)a, (void)state, (void)t;
    redis_client_t *c = arg;
    if (!c->ac)
        client_connect(c);
    return 0;
}

/* ---- public ----------------------------------------------------------------------------- */

int redis_client_create(redis_client_t **out, actor_t *a, const redis_config_t *cfg)
{
    redis_client_t *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->a = a;
    c->cfg = *cfg;
    c->fd = -1;
    if (!c->cfg.port)
        c->cfg.port = 6379;
    if (!c->cfg.connect_timeout_ns)
        c->cfg.connect_timeout_ns = 1000000000u;
    if (!c->cfg.command_timeout_ns)
        c->cfg.command_timeout_ns = 1000000000u;
    if (!c->cfg.backoff_base_ns)
        c->cfg.backoff_base_ns = 50000000u;
    if (!c->cfg.backoff_cap_ns)
        c->cfg.backoff_cap_ns = 2000000000u;
    if (c->cfg.backoff_cap_ns < c->cfg.backoff_base_ns)
        c->cfg.backoff_cap_ns = c->cfg.backoff_base_ns;
    c->backoff_ns = c->cfg.backoff_base_ns;
    snprintf(c->name, sizeof(c->name), "%s", cfg->name ? cfg->name : "redis");
    c->host = strdup(cfg->host ? cfg->host : "localhost");
    c->user = strdup(cfg->user ? cfg->user : "");
    c->password = strdup(cfg->password ? cfg->password : "");
    int rc = -ENOMEM;
    if (!c->host || !c->user || !c->password)
        goto fail;
    if ((rc = actor_timer_new(&c->deadline_timer, a, on_deadline, c)) < 0 ||
        (rc = actor_timer_new(&c->retry_timer, a, on_retry, c)) < 0)
        goto fail;
    client_connect(c);
    *out = c;
    return 0;
fail:
    actor_timer_free(c->deadline_timer);
    actor_timer_free(c->retry_timer);
    free(c->host);
    free(c->user);
    free(c->password);
    free(c);
    return rc;
}

void redis_client_destroy(redis_client_t *c)
{
    if (!c)
        return;
    c->destroying = true;
    if (c->ac)
        redisAsyncFree(c->ac); /* pending callbacks run with NULL, then ev_cleanup */
    actor_timer_free(c->deadline_timer);
    actor_timer_free(c->retry_timer);
    free(c->q);
    free(c->host);
    free(c->user);
    free(c->password);
    free(c);
}

int redis_client_command(redis_client_t *c, redis_reply_fn cb, void *arg, int argc,
                         const char **argv, const size_t *argvlen)
{
    if (!c->ac)
        return -ENOTCONN;
    if (redisAsyncCommandArgv(c->ac, trampoline, c, argc, argv, argvlen) != REDIS_OK)
        return -EIO; /* disconnecting or freeing: the callback will not run */
    c->stats.commands++;
    q_push(c, cb, arg);
    return 0;
}

bool redis_client_usable(const redis_client_t *c)
{
    return c->ac != NULL;
}

size_t redis_client_pending(const redis_client_t *c)
{
    return c->qlen;
}

void redis_client_drop(redis_client_t *c, const char *why)
{
    if (!c->ac)
        return;
    snprintf(c->drop_reason, sizeof(c->drop_reason), "%s", why);
    redisAsyncFree(c->ac); /* deferred by hiredis when called from one of its callbacks */
}

void redis_client_stats(const redis_client_t *c, redis_client_stats_t *out)
{
    *out = c->stats;
    out->connected = c->connected;
}
