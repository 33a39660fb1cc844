/*
 * pgconn: one asynchronous libpq connection in PIPELINE MODE, driven by an actor's epoll
 * loop. It knows no business: it connects without blocking (PQconnectStartParams +
 * PQconnectPoll, the socket watched with actor_watch_fd), enters pipeline mode, queues the
 * owner's statements and synchronisation points, and when the connection fails or is lost
 * it reconnects by itself with exponential backoff (an actor timer). A lost connection is
 * not an error of the actor: the owner is told (on_down) and keeps running.
 *
 * The pipeline: the owner queues entries (pgconn_prepare, pgconn_exec, pgconn_sync), each
 * with a tag and a step of its choosing, and pushes them (pgconn_push). The server runs
 * them in order; statements between two syncs form ONE transaction (committed at the sync,
 * rolled back there when one of them failed) unless they say BEGIN/COMMIT themselves.
 * Results come back in the same order, exactly one on_entry call per queued entry:
 *   err 0        a statement's last PGresult (the owner's to PQclear), or NULL for a sync
 *   -EIO         the server reported an error (SQLSTATE in sqlstate, "" when unknown); the
 *                transaction of that segment is rolled back at its sync
 *   -ECANCELED   not run: an earlier statement of the same segment failed
 *   -ENOTCONN    the connection was lost first: the entry's outcome is unknown
 *   -ETIMEDOUT   no progress within the push's timeout: the connection is dropped (and
 *                reconnected), so the outcome is unknown too
 * After a loss every pending entry gets its -ENOTCONN/-ETIMEDOUT call, then on_down.
 * A push that wants results before a sync (pgconn_push with flush = true) also asks the
 * server to send what it has (a flush request), so a transaction can read, decide, then
 * write without committing in between.
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
    const char *options;          /* server options ("-c name=value ..."; copied), added after
                                     the conninfo's own (or PGOPTIONS'); NULL = none */
    uint64_t connect_timeout_ns;  /* one attempt; 0 = 5 s */
    uint64_t backoff_base_ns;     /* first retry delay; 0 = 100 ms */
    uint64_t backoff_cap_ns;      /* 0 = 2 s */
} pgconn_config_t;

typedef struct pgconn_callbacks {
    /** The connection is ready, in pipeline mode, nothing prepared (first time or after a
     *  reconnect). Optional. */
    void (*on_up)(pgconn_t *c, void *arg);
    /** A connect attempt failed or the connection was lost; a retry is scheduled. Called
     *  after the on_entry calls of the pending entries. Optional. */
    void (*on_down)(pgconn_t *c, void *arg, const char *why);
    /** One queued entry ended (see above). res is NULL unless err == 0 and it was a
     *  statement. */
    void (*on_entry)(pgconn_t *c, void *arg, void *tag, int step, PGresult *res, int err,
                     const char *sqlstate, const char *why);
} pgconn_callbacks_t;

/** Creates the connection object and starts connecting. Actor thread (start callback). */
int pgconn_create(pgconn_t **out, actor_t *a, const pgconn_config_t *cfg,
                  const pgconn_callbacks_t *cb, void *arg);
/** Closes the connection and frees it; no callback runs afterwards. */
void pgconn_destroy(pgconn_t *c);
/** True when connected (entries may be pending). */
bool pgconn_up(const pgconn_t *c);
/** Entries queued whose on_entry call has not come yet. */
size_t pgconn_pending(const pgconn_t *c);
/**
 * Queue entries (sent at the next pgconn_push). Parameters are text (NULL = SQL NULL) and
 * copied before return. -ENOTCONN when not connected or when libpq refused (the connection
 * is then handled as lost, from the loop): no on_entry call follows for that entry.
 */
int pgconn_prepare(pgconn_t *c, const char *name, const char *sql, void *tag, int step);
int pgconn_exec(pgconn_t *c, const char *name, int nparams, const char *const *params, void *tag,
                int step);
int pgconn_sync(pgconn_t *c, void *tag, int step);
/** Sends what is queued; flush = also ask for the results so far (no sync needed).
 *  timeout_ns (0 = none): the connection is dropped when no entry ends for that long. */
int pgconn_push(pgconn_t *c, bool flush, uint64_t timeout_ns);
/** Drops the connection now and reconnects after the backoff (e.g. the owner gave up on a
 *  statement). Pending entries end -ENOTCONN. */
void pgconn_reset(pgconn_t *c, const char *why);

#endif
