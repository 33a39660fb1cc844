/*
 * pgconn: one asynchronous libpq connection driven by an actor's epoll loop. It knows no
 * business: it connects without blocking (PQconnectStartParams + PQconnectPoll, the socket
 * watched with actor_watch_fd), runs one statement at a time (PQsendQueryParams, text
 * parameters and results), and when the connection fails or is lost it reconnects by
 * itself with exponential backoff (an actor timer). A lost connection is not an error of
 * the actor: the owner is told (on_down) and keeps running.
 *
 * Results: on_result gets 0 and the statement's last PGresult (the owner's to PQclear), or
 * an error with one sentence:
 *   -EIO        the server reported an error (SQLSTATE in *sqlstate, "" when unknown);
 *               the connection stays usable
 *   -ENOTCONN   the connection was lost while the statement ran: its outcome is unknown
 *   -ETIMEDOUT  no answer within the statement's timeout: the connection is dropped (and
 *               reconnected), so the outcome is unknown too
 *
 * Threads: everything runs on the owning actor's thread, inside its callbacks (created in
 * the actor's start, destroyed in its stop).
 */
#ifndef PAY_IO_PGCONN_H
#define PAY_IO_PGCONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "runtime/actor.h"

typedef struct pgconn pgconn_t;

typedef struct pgconn_config {
    const char *conninfo;         /* URL or key=value string (copied) */
    const char *application_name; /* fallback_application_name (copied); NULL = "paymentd" */
    uint64_t connect_timeout_ns;  /* one attempt; 0 = 5 s */
    uint64_t backoff_base_ns;     /* first retry delay; 0 = 100 ms */
    uint64_t backoff_cap_ns;      /* 0 = 2 s */
} pgconn_config_t;

typedef struct pgconn_callbacks {
    /** The connection is ready (first time or after a reconnect). Optional. */
    void (*on_up)(pgconn_t *c, void *arg);
    /** A connect attempt failed or the connection was lost; a retry is scheduled.
     *  Called after on_result for a statement that was running. Optional. */
    void (*on_down)(pgconn_t *c, void *arg, const char *why);
    /** The running statement ended (see above). res is NULL unless err == 0. */
    void (*on_result)(pgconn_t *c, void *arg, PGresult *res, int err, const char *sqlstate,
                      const char *why);
} pgconn_callbacks_t;

/** Creates the connection object and starts connecting. Actor thread (start callback). */
int pgconn_create(pgconn_t **out, actor_t *a, const pgconn_config_t *cfg,
                  const pgconn_callbacks_t *cb, void *arg);
/** Closes the connection and frees it; no callback runs afterwards. */
void pgconn_destroy(pgconn_t *c);
/** True when connected and no statement is running. */
bool pgconn_idle(const pgconn_t *c);
/** True when connected (a statement may be running). */
bool pgconn_up(const pgconn_t *c);
/**
 * Starts one statement with text parameters (NULL = SQL NULL), copied before return.
 * timeout_ns 0 = no timeout. -ENOTCONN when not connected, -EBUSY when a statement is
 * running; then no callback follows. Else on_result follows exactly once (not from inside
 * this call).
 */
int pgconn_query(pgconn_t *c, const char *sql, int nparams, const char *const *params,
                 uint64_t timeout_ns);
/** Drops the connection now and reconnects after the backoff (e.g. the owner gave up on a
 *  statement). A running statement ends -ENOTCONN. */
void pgconn_reset(pgconn_t *c, const char *why);

#endif
