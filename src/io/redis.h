/*
 * redis: one asynchronous Redis connection (hiredis 0.14 async API) driven by the epoll loop
 * of the actor that owns it, with the timeouts and the reconnection hiredis 0.14 lacks.
 *
 * DESIGN
 * - Event adapter: hiredis' ac->ev hooks (addRead/delRead/addWrite/delWrite/cleanup) map to
 *   actor_watch_fd / actor_unwatch_fd on the owning actor; readiness calls
 *   redisAsyncHandleRead/Write. Commands issued during one actor turn sit in hiredis' output
 *   buffer and leave in one write at the next loop turn: a batch is one round trip.
 * - Replies come back in command order, so every command goes through one trampoline and
 *   a FIFO of {callback, arg, deadline}: no allocation per command in the steady state.
 * - Timeouts: one actor timer watches the oldest command's deadline (and the connect
 *   deadline). When it passes, the connection is dropped: hiredis then calls every pending
 *   callback with reply == NULL (the caller's "no answer" path), and a reconnection follows.
 * - Reconnection: after a failed connect or a lost connection, retries with exponential
 *   backoff (base, doubling, capped); the first reply on a connection resets it (a paused
 *   Redis accepts connections and answers nothing). One WARNING line per outage, one INFO
 *   line when Redis answers again; the attempts in between log at DEBUG.
 * - AUTH and SELECT (from the URL) are queued first on every new connection, then the
 *   owner's on_open hook (e.g. SCRIPT LOAD) before any other command.
 *
 * Owner: one actor. Every function runs on that actor's thread (inside its start/handle/
 * fd/timer callbacks); redis_client_destroy from its stop callback.
 */
#ifndef PAY_IO_REDIS_H
#define PAY_IO_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include "runtime/actor.h"

typedef struct redis_client redis_client_t;

/** A command's reply: reply is hiredis' (valid during the call only), or NULL when no
 *  answer came (connection lost or dropped on timeout, or the client is being destroyed). */
typedef void (*redis_reply_fn)(redis_client_t *c, redisReply *reply, void *arg);

typedef struct redis_config {
    const char *host;            /* copied */
    int port;                    /* default 6379 */
    const char *user;            /* Redis 6 ACL user, NULL/"" for none; copied */
    const char *password;        /* NULL/"" for none; copied */
    int db;                      /* SELECT db when non-zero */
    uint64_t connect_timeout_ns; /* default 1 s */
    uint64_t command_timeout_ns; /* default 1 s */
    uint64_t backoff_base_ns;    /* default 50 ms */
    uint64_t backoff_cap_ns;     /* default 2 s */
    const char *name;            /* for logs, default "redis"; must outlive the client */
    /** A new connection was created (still connecting): queue its first commands. */
    void (*on_open)(redis_client_t *c, void *arg);
    /** The connection is gone (lost, refused, timed out); pending callbacks have run. */
    void (*on_down)(redis_client_t *c, const char *why, void *arg);
    void *arg;
} redis_config_t;

typedef struct redis_client_stats {
    uint64_t connects; /* successful connections */
    uint64_t failures; /* failed connects + lost connections */
    uint64_t timeouts; /* connections dropped because a command or connect timed out */
    uint64_t commands; /* commands queued */
    bool connected;    /* TCP connection established now */
} redis_client_stats_t;

/** Creates the client on actor a and starts connecting. 0 or -errno. */
int redis_client_create(redis_client_t **out, actor_t *a, const redis_config_t *cfg);
/** Drops the connection (pending callbacks get NULL), frees everything. NULL allowed. */
void redis_client_destroy(redis_client_t *c);
/** Queues a command (argv form). 0; -ENOTCONN while there is no connection (waiting to
 *  reconnect): cb is then not called; -EIO if hiredis refused it. */
int redis_client_command(redis_client_t *c, redis_reply_fn cb, void *arg, int argc,
                         const char **argv, const size_t *argvlen);
/** True while a connection exists (connecting or connected): commands are accepted. */
bool redis_client_usable(const redis_client_t *c);
/** Commands sent and not answered yet. */
size_t redis_client_pending(const redis_client_t *c);
/** Drops the connection now (as on a timeout) and schedules the reconnection. */
void redis_client_drop(redis_client_t *c, const char *why);
void redis_client_stats(const redis_client_t *c, redis_client_stats_t *out);

#endif
