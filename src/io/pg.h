/*
 * pg: the PostgreSQL adapter over libpq. It knows no business: URLs, connecting with a
 * deadline, running statements with precise error strings, transactions, and applying
 * the embedded migrations (io/migrations.h).
 *
 * Errors: functions return 0 or a negative errno-style code and write one sentence to
 * err (when err is not NULL):
 *   -EINVAL     bad argument (a URL that is not PostgreSQL's, a malformed migration name)
 *   -ETIMEDOUT  the connect deadline passed, or a lock wait timed out
 *   -ENOTCONN   the connection is lost (or was never made); the caller reconnects.
 *               After a COMMIT this means the outcome is unknown.
 *   -EIO        the server reported an error; err has its message, detail and SQLSTATE:
 *               `duplicate key value violates unique constraint "x" (SQLSTATE 23505):
 *               Key (id)=(a) already exists.`
 * URLs in messages have their password masked (log_mask_url).
 *
 * Threads: a PGconn belongs to one thread at a time (libpq's rule); these functions keep
 * no state of their own, so any thread may call them on a connection it owns.
 */
#ifndef PAY_IO_PG_H
#define PAY_IO_PG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "io/migrations.h"

/** The advisory lock pg_migrate holds (two-int form: pg_advisory_lock(KEY1, KEY2)). */
#define PG_MIGRATE_LOCK_KEY1 0x70617900 /* "pay\0" */
#define PG_MIGRATE_LOCK_KEY2 1

/**
 * DATABASE_URL → a libpq connection string (caller frees *out). Accepts postgresql://,
 * postgres:// and postgresql+asyncpg:// (the +asyncpg is stripped, and asyncpg's
 * ?ssl=X becomes sslmode=X: true → require, false → disable). The result is checked by
 * libpq's own parser, whose message is passed on: e.g. `DATABASE_URL: invalid URI query
 * parameter: "sslmod"`.
 */
int pg_url_to_conninfo(char **out, const char *url, char *err, size_t errlen);

/**
 * Connect to conninfo (a URL or key=value string), giving up after timeout_ms (the whole
 * connection, including TLS and authentication). application_name is a fallback (the URL
 * may set its own). On success *out is yours (PQfinish). -ETIMEDOUT, -ENOTCONN with
 * libpq's reason (refused, authentication failed, no such database, ...).
 */
int pg_connect(PGconn **out, const char *conninfo, const char *application_name, int timeout_ms,
               char *err, size_t errlen);

/**
 * Run one statement with text parameters (params[i] NULL = SQL NULL). On success, when out
 * is not NULL *out is the result (yours to PQclear), else it is cleared. A statement
 * returning no rows and one returning rows are both success. sql may hold several
 * statements only when nparams is 0.
 */
int pg_exec(PGconn *c, PGresult **out, const char *sql, int nparams, const char *const *params,
            char *err, size_t errlen);

/** Format an error for a failed result (or the connection, when r is NULL) into err and
 *  return the code above (-EIO or -ENOTCONN). For callers using libpq directly. */
int pg_result_error(PGconn *c, const PGresult *r, char *err, size_t errlen);

/** BEGIN (READ COMMITTED). */
int pg_begin(PGconn *c, char *err, size_t errlen);
/** COMMIT. -ENOTCONN means the outcome is unknown: never report it as failed. A COMMIT of
 *  a failed transaction (which the server turns into a ROLLBACK) is -EIO. */
int pg_commit(PGconn *c, char *err, size_t errlen);
/** ROLLBACK, best effort: a lost connection needs no rollback. */
void pg_rollback(PGconn *c);

/** What pg_migrate did. */
typedef struct pg_migrate_result {
    int applied; /* migrations applied by this call */
    int already; /* migrations found already applied */
    int unknown; /* applied versions this binary does not know (a newer schema) */
    int version; /* highest applied version after the call */
} pg_migrate_result_t;

/** Called after each migration this call applied. */
typedef void (*pg_migrate_applied_fn)(const char *name, double ms, void *arg);

/**
 * Apply the pending migrations of all (terminated by name == NULL; names are
 * `NNN_words.sql`, versions strictly increasing) to the connection's database, in the
 * first schema of its search_path. Several processes may call this at once: a session
 * advisory lock (PG_MIGRATE_LOCK_KEY1/2) serialises them; waiting longer than
 * lock_timeout_ms is -ETIMEDOUT. Each migration runs in its own transaction together with
 * its schema_migrations(version, name, checksum, applied_at) row, so a failing migration
 * leaves no trace (-EIO naming it and the server's error). A recorded migration whose name
 * or SHA-256 differs from the embedded one is -EINVAL (edited after it was applied).
 */
int pg_migrate(PGconn *c, const migration_t *all, int lock_timeout_ms,
               pg_migrate_applied_fn on_applied, void *arg, pg_migrate_result_t *res, char *err,
               size_t errlen);

#endif
