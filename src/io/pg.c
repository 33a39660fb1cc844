/*
 * pg: see pg.h.
 *
 * DESIGN
 * Connecting uses libpq's non-blocking start (PQconnectStartParams + PQconnectPoll) and
 * poll(2) against one deadline, because libpq's own connect_timeout is per host, counted
 * in whole seconds, and not applied by PQconnectPoll at all.
 * Migrations: a session-level advisory lock serialises concurrent migrators (every
 * instance of a deployment may start at once); only the lock holder creates
 * schema_migrations and reads it, so CREATE TABLE IF NOT EXISTS never races. Each
 * migration commits together with its schema_migrations row.
 */
#include "io/pg.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

#include "runtime/log.h"

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* libpq messages end with a newline and may span lines ("...failed: Connection refused\n
 * \tIs the server running...?"): make them one line. */
static void one_line(char *dst, size_t dstlen, const char *msg)
{
    size_t n = 0;
    bool space = false;
    if (dstlen == 0)
        return;
    for (const char *p = msg ? msg : ""; *p && n + 1 < dstlen; p++) {
        if (*p == '\n' || *p == '\t' || *p == '\r') {
            space = n > 0;
            continue;
        }
        if (space && n + 2 < dstlen)
            dst[n++] = ' ';
        space = false;
        dst[n++] = *p;
    }
    dst[n] = '\0';
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- URLs ------------------------------------------------------------------------------ */

static const char *const sslmodes[] = {"disable",   "allow",       "prefer", "require",
                                       "verify-ca", "verify-full", NULL};

static bool valid_sslmode(const char *v, size_t n)
{
    for (const char *const *m = sslmodes; *m; m++)
        if (strlen(*m) == n && strncmp(*m, v, n) == 0)
            return true;
    return false;
}

int pg_url_to_conninfo(char **out, const char *url, char *err, size_t errlen)
{
    static const struct {
        const char *prefix;
        const char *scheme; /* what libpq gets */
    } schemes[] = {
        {"postgresql+asyncpg://", "postgresql://"},
        {"postgresql://", "postgresql://"},
        {"postgres://", "postgresql://"},
    };
    char masked[512];
    const char *rest = NULL;
    const char *scheme = NULL;
    char *buf = NULL;
    int rc = -EINVAL;

    *out = NULL;
    if (!url || !*url) {
        seterr(err, errlen, "is empty (expected postgresql://user:password@host:port/db)");
        return -EINVAL;
    }
    log_mask_url(masked, sizeof masked, url);
    for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++)
        if (strncmp(url, schemes[i].prefix, strlen(schemes[i].prefix)) == 0) {
            rest = url + strlen(schemes[i].prefix);
            scheme = schemes[i].scheme;
            break;
        }
    if (!rest) {
        seterr(err, errlen,
               "\"%s\" is not a PostgreSQL URL (expected postgresql://, postgres:// or "
               "postgresql+asyncpg://)",
               masked);
        return -EINVAL;
    }

    /* Rebuild the query string, turning asyncpg's ssl=X into libpq's sslmode=Y (which grows
     * a parameter by at most 7 bytes, never beyond twice its size). */
    size_t cap = strlen(scheme) + 2 * strlen(rest) + 32;
    buf = malloc(cap);
    if (!buf) {
        seterr(err, errlen, "out of memory");
        return -ENOMEM;
    }
    const char *q = strchr(rest, '?');
    size_t base_len = q ? (size_t)(q - rest) : strlen(rest);
    size_t n = (size_t)snprintf(buf, cap, "%s%.*s", scheme, (int)base_len, rest);
    bool have_ssl = false, have_sslmode = false;
    char sep = '?';
    for (const char *p = q ? q + 1 : NULL; p && *p;) {
        const char *amp = strchr(p, '&');
        size_t len = amp ? (size_t)(amp - p) : strlen(p);
        if (len > 4 && strncmp(p, "ssl=", 4) == 0) {
            const char *v = p + 4;
            size_t vlen = len - 4;
            const char *mode;
            char modebuf[16];
            if (vlen == 4 && strncmp(v, "true", 4) == 0)
                mode = "require";
            else if (vlen == 5 && strncmp(v, "false", 5) == 0)
                mode = "disable";
            else if (valid_sslmode(v, vlen)) {
                snprintf(modebuf, sizeof modebuf, "%.*s", (int)vlen, v);
                mode = modebuf;
            } else {
                seterr(err, errlen,
                       "\"%s\": ssl=%.*s is not one of true, false, disable, allow, prefer, "
                       "require, verify-ca, verify-full",
                       masked, (int)(vlen > 32 ? 32 : vlen), v);
                goto fail;
            }
            have_ssl = true;
            n += (size_t)snprintf(buf + n, cap - n, "%csslmode=%s", sep, mode);
        } else if (len > 0) {
            if (len >= 8 && strncmp(p, "sslmode=", 8) == 0)
                have_sslmode = true;
            n += (size_t)snprintf(buf + n, cap - n, "%c%.*s", sep, (int)len, p);
        }
        if (len > 0)
            sep = '&';
        p = amp ? amp + 1 : NULL;
    }
    if (have_ssl && have_sslmode) {
        seterr(err, errlen, "\"%s\" sets both ssl and sslmode", masked);
        goto fail;
    }

    /* Let libpq judge the rest (host, port, parameters), with its own words. */
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(buf, &perr);
    if (!opts) {
        char why[256];
        one_line(why, sizeof why, perr ? perr : "out of memory");
        seterr(err, errlen, "\"%s\": %s", masked, why);
        PQfreemem(perr);
        goto fail;
    }
    PQconninfoFree(opts);
    *out = buf;
    return 0;

fail:
    free(buf);
    return rc;
}

/* ---- connecting ------------------------------------------------------------------------ */

/* Server notices (e.g. "relation ... already exists, skipping") go to our log instead of
 * libpq's default of printing them to stderr: WARNING and above as warnings, the rest at
 * DEBUG. */
static void notice_to_log(void *arg, const PGresult *r)
{
    (void)arg;
    const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    bool warn = sev && strcmp(sev, "NOTICE") != 0 && strcmp(sev, "INFO") != 0 &&
                strcmp(sev, "LOG") != 0 && strncmp(sev, "DEBUG", 5) != 0;
    log_kv(warn ? LOG_WARNING : LOG_DEBUG, "pg", "server notice", "severity", sev ? sev : "?",
           "message", msg ? msg : "", NULL);
}

int pg_connect(PGconn **out, const char *conninfo, const char *application_name, int timeout_ms,
               char *err, size_t errlen)
{
    const char *keys[] = {"dbname", "fallback_application_name", "client_encoding", NULL};
    const char *vals[] = {conninfo, application_name ? application_name : "paymentd", "UTF8", NULL};
    int64_t deadline = mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    char why[512];

    *out = NULL;
    PGconn *c = PQconnectStartParams(keys, vals, 1);
    if (!c) {
        seterr(err, errlen, "cannot connect to PostgreSQL: out of memory");
        return -ENOMEM;
    }
    if (PQstatus(c) == CONNECTION_BAD) {
        one_line(why, sizeof why, PQerrorMessage(c));
        seterr(err, errlen, "cannot connect to PostgreSQL: %s", why);
        PQfinish(c);
        return -ENOTCONN;
    }
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    for (;;) {
        if (st == PGRES_POLLING_OK)
            break;
        if (st == PGRES_POLLING_FAILED) {
            one_line(why, sizeof why, PQerrorMessage(c));
            seterr(err, errlen, "cannot connect to PostgreSQL: %s", why);
            PQfinish(c);
            return -ENOTCONN;
        }
        int64_t left = deadline - mono_ms();
        if (left <= 0) {
            seterr(err, errlen, "cannot connect to PostgreSQL at %s:%s: no answer within %d ms",
                   PQhost(c) ? PQhost(c) : "?", PQport(c) ? PQport(c) : "?", timeout_ms);
            PQfinish(c);
            return -ETIMEDOUT;
        }
        struct pollfd pfd = {
            .fd = PQsocket(c),
            .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT,
        };
        int pr = poll(&pfd, 1, (int)left);
        if (pr < 0 && errno != EINTR) {
            seterr(err, errlen, "cannot connect to PostgreSQL: poll: %s", strerror(errno));
            PQfinish(c);
            return -ENOTCONN;
        }
        if (pr > 0)
            st = PQconnectPoll(c);
    }
    PQsetNoticeReceiver(c, notice_to_log, NULL);
    *out = c;
    return 0;
}

/* ---- statements ------------------------------------------------------------------------ */

int pg_result_error(PGconn *c, const PGresult *r, char *err, size_t errlen)
{
    char msg[512];
    if (!c || PQstatus(c) == CONNECTION_BAD) {
        one_line(msg, sizeof msg, c ? PQerrorMessage(c) : "no connection");
        seterr(err, errlen, "connection to PostgreSQL lost: %s", msg[0] ? msg : "no reason given");
        return -ENOTCONN;
    }
    if (!r) {
        one_line(msg, sizeof msg, PQerrorMessage(c));
        seterr(err, errlen, "%s", msg[0] ? msg : "no result from PostgreSQL");
        return -EIO;
    }
    const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    const char *detail = PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL);
    if (!primary) {
        one_line(msg, sizeof msg, PQresultErrorMessage(r));
        seterr(err, errlen, "%s", msg[0] ? msg : PQresStatus(PQresultStatus(r)));
        return -EIO;
    }
    one_line(msg, sizeof msg, primary);
    if (detail) {
        char d[512];
        one_line(d, sizeof d, detail);
        seterr(err, errlen, "%s (SQLSTATE %s): %s", msg, state ? state : "?", d);
    } else {
        seterr(err, errlen, "%s (SQLSTATE %s)", msg, state ? state : "?");
    }
    return -EIO;
}

int pg_exec(PGconn *c, PGresult **out, const char *sql, int nparams, const char *const *params,
            char *err, size_t errlen)
{
    if (out)
        *out = NULL;
    if (!c || PQstatus(c) != CONNECTION_OK)
        return pg_result_error(c, NULL, err, errlen);
    PGresult *r =
        nparams > 0 ? PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0) : PQexec(c, sql);
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        int rc = pg_result_error(c, r, err, errlen);
        PQclear(r);
        return rc;
    }
    if (out)
        *out = r;
    else
        PQclear(r);
    return 0;
}

int pg_begin(PGconn *c, char *err, size_t errlen)
{
    return pg_exec(c, NULL, "BEGIN", 0, NULL, err, errlen);
}

int pg_commit(PGconn *c, char *err, size_t errlen)
{
    PGresult *r = NULL;
    if (!c || PQstatus(c) != CONNECTION_OK)
        return pg_result_error(c, NULL, err, errlen);
    r = PQexec(c, "COMMIT");
    if (!r || PQresultStatus(r) != PGRES_COMMAND_OK) {
        if (PQstatus(c) == CONNECTION_BAD) {
            char msg[512];
            one_line(msg, sizeof msg, PQerrorMessage(c));
            seterr(err, errlen, "connection to PostgreSQL lost during COMMIT, outcome unknown: %s",
                   msg);
            PQclear(r);
            return -ENOTCONN;
        }
        int rc = pg_result_error(c, r, err, errlen);
        PQclear(r);
        return rc;
    }
    /* COMMIT of an aborted transaction succeeds as a command but rolls back. */
    bool rolled_back = strcmp(PQcmdStatus(r), "ROLLBACK") == 0;
    PQclear(r);
    if (rolled_back) {
        seterr(err, errlen, "COMMIT rolled the transaction back: an earlier statement failed");
        return -EIO;
    }
    return 0;
}

void pg_rollback(PGconn *c)
{
    if (c && PQstatus(c) == CONNECTION_OK && PQtransactionStatus(c) != PQTRANS_IDLE)
        PQclear(PQexec(c, "ROLLBACK"));
}

/* ---- migrations ------------------------------------------------------------------------ */

/* "001_ledger.sql" → 1; -1 unless the name is digits, '_', [A-Za-z0-9_.-]+, ".sql". */
static int migration_version(const char *name)
{
    const char *p = name;
    long v = 0;
    if (!name || !(*p >= '0' && *p <= '9'))
        return -1;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        if (v > 1000000)
            return -1;
        p++;
    }
    if (*p++ != '_')
        return -1;
    size_t len = strlen(p);
    if (len <= 4 || strcmp(p + len - 4, ".sql") != 0)
        return -1;
    for (size_t i = 0; i < len - 4; i++) {
        char ch = p[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return -1;
    }
    return v > 0 ? (int)v : -1;
}

static int sha256_hex(char out[65], const char *text)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!EVP_Digest(text, strlen(text), md, &mdlen, EVP_sha256(), NULL) || mdlen != 32)
        return -EIO;
    for (unsigned i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
    return 0;
}

/* Line of a 1-based character position in text, for error messages. */
static int line_of(const char *text, const char *pos)
{
    long off = pos ? strtol(pos, NULL, 10) : 0;
    int line = 1;
    for (long i = 0; i + 1 < off && text[i]; i++)
        if (text[i] == '\n')
            line++;
    return line;
}

static const char create_schema_migrations[] =
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version integer PRIMARY KEY CHECK (version > 0),"
    " name text NOT NULL UNIQUE,"
    " checksum bytea NOT NULL CHECK (octet_length(checksum) = 32),"
    " applied_at timestamptz NOT NULL DEFAULT now())";

static int apply_one(PGconn *c, const migration_t *m, int version, const char *sum, char *err,
                     size_t errlen)
{
    char why[768];
    char vtext[16];
    int rc = pg_begin(c, why, sizeof why);
    if (rc < 0) {
        seterr(err, errlen, "migration %s: %s", m->name, why);
        return rc;
    }
    PGresult *r = PQexec(c, m->sql);
    if (!r || PQresultStatus(r) != PGRES_COMMAND_OK) {
        if (r && PQresultStatus(r) == PGRES_TUPLES_OK) {
            /* a SELECT at the end: fine */
        } else {
            rc = pg_result_error(c, r, why, sizeof why);
            const char *pos = r ? PQresultErrorField(r, PG_DIAG_STATEMENT_POSITION) : NULL;
            if (pos)
                seterr(err, errlen, "migration %s failed at line %d: %s", m->name,
                       line_of(m->sql, pos), why);
            else
                seterr(err, errlen, "migration %s failed: %s", m->name, why);
            PQclear(r);
            pg_rollback(c);
            return rc;
        }
    }
    PQclear(r);
    if (PQtransactionStatus(c) != PQTRANS_INTRANS) {
        seterr(err, errlen,
               "migration %s ended the transaction itself (no BEGIN/COMMIT in "
               "migrations)",
               m->name);
        pg_rollback(c);
        return -EINVAL;
    }
    snprintf(vtext, sizeof vtext, "%d", version);
    const char *params[] = {vtext, m->name, sum};
    rc = pg_exec(c, NULL,
                 "INSERT INTO schema_migrations (version, name, checksum)"
                 " VALUES ($1::integer, $2, decode($3, 'hex'))",
                 3, params, why, sizeof why);
    if (rc == 0)
        rc = pg_commit(c, why, sizeof why);
    if (rc < 0) {
        seterr(err, errlen, "migration %s: recording it failed: %s", m->name, why);
        pg_rollback(c);
    }
    return rc;
}

int pg_migrate(PGconn *c, const migration_t *all, int lock_timeout_ms,
               pg_migrate_applied_fn on_applied, void *arg, pg_migrate_result_t *res, char *err,
               size_t errlen)
{
    pg_migrate_result_t tmp;
    PGresult *r = NULL;
    char why[768];
    char sql[128];
    int rc;
    int n = 0;
    bool locked = false;

    if (!res)
        res = &tmp;
    memset(res, 0, sizeof *res);

    /* The embedded list must be well-formed before anything touches the database. */
    for (int prev = 0; all && all[n].name; n++) {
        int v = migration_version(all[n].name);
        if (v < 0) {
            seterr(err, errlen, "migration name \"%s\" is not NNN_words.sql", all[n].name);
            return -EINVAL;
        }
        if (v <= prev) {
            seterr(err, errlen, "migration %s: version %d does not follow version %d", all[n].name,
                   v, prev);
            return -EINVAL;
        }
        if (!all[n].sql) {
            seterr(err, errlen, "migration %s has no SQL", all[n].name);
            return -EINVAL;
        }
        prev = v;
    }
    if (!c || PQstatus(c) != CONNECTION_OK)
        return pg_result_error(c, NULL, err, errlen);
    if (PQtransactionStatus(c) != PQTRANS_IDLE) {
        seterr(err, errlen, "pg_migrate needs a connection that is not in a transaction");
        return -EINVAL;
    }

    snprintf(sql, sizeof sql, "SET lock_timeout = %d", lock_timeout_ms > 0 ? lock_timeout_ms : 0);
    rc = pg_exec(c, NULL, sql, 0, NULL, why, sizeof why);
    if (rc == 0) {
        snprintf(sql, sizeof sql, "SELECT pg_advisory_lock(%d, %d)", PG_MIGRATE_LOCK_KEY1,
                 PG_MIGRATE_LOCK_KEY2);
        r = PQexec(c, sql);
        if (!r || PQresultStatus(r) != PGRES_TUPLES_OK) {
            const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
            if (state && strcmp(state, "55P03") == 0) {
                seterr(err, errlen,
                       "timed out after %d ms waiting for the migration lock (another "
                       "instance is migrating this database)",
                       lock_timeout_ms);
                rc = -ETIMEDOUT;
            } else {
                rc = pg_result_error(c, r, why, sizeof why);
                seterr(err, errlen, "taking the migration lock: %s", why);
            }
            PQclear(r);
            r = NULL;
            pg_exec(c, NULL, "RESET lock_timeout", 0, NULL, NULL, 0);
            return rc;
        }
        PQclear(r);
        r = NULL;
        locked = true;
        rc = pg_exec(c, NULL, "RESET lock_timeout", 0, NULL, why, sizeof why);
    }
    if (rc == 0)
        rc = pg_exec(c, NULL, create_schema_migrations, 0, NULL, why, sizeof why);
    if (rc == 0)
        rc = pg_exec(c, &r,
                     "SELECT version, name, encode(checksum, 'hex') FROM schema_migrations"
                     " ORDER BY version",
                     0, NULL, why, sizeof why);
    if (rc < 0) {
        seterr(err, errlen, "preparing migrations: %s", why);
        goto done;
    }

    /* Compare what is recorded with what is embedded. */
    int recorded_max = 0;
    for (int i = 0; i < PQntuples(r); i++) {
        int v = atoi(PQgetvalue(r, i, 0));
        const char *name = PQgetvalue(r, i, 1);
        const char *sum = PQgetvalue(r, i, 2);
        const migration_t *m = NULL;
        int mv = 0;
        if (v > recorded_max)
            recorded_max = v;
        for (int j = 0; j < n; j++)
            if ((mv = migration_version(all[j].name)) == v) {
                m = &all[j];
                break;
            }
        if (!m) {
            res->unknown++;
            continue;
        }
        char want[65];
        if (sha256_hex(want, m->sql) < 0) {
            seterr(err, errlen, "SHA-256 unavailable");
            rc = -EIO;
            goto done;
        }
        if (strcmp(name, m->name) != 0) {
            seterr(err, errlen,
                   "schema_migrations records version %d as %s, but this binary's version %d is "
                   "%s",
                   v, name, mv, m->name);
            rc = -EINVAL;
            goto done;
        }
        if (strcmp(sum, want) != 0) {
            seterr(err, errlen,
                   "migration %s was changed after it was applied (recorded SHA-256 %.12s…, "
                   "embedded %.12s…); add a new migration instead",
                   m->name, sum, want);
            rc = -EINVAL;
            goto done;
        }
        res->already++;
    }
    res->version = recorded_max;

    for (int j = 0; j < n; j++) {
        int v = migration_version(all[j].name);
        bool applied = false;
        for (int i = 0; i < PQntuples(r); i++)
            if (atoi(PQgetvalue(r, i, 0)) == v)
                applied = true;
        if (applied)
            continue;
        if (v < recorded_max) {
            seterr(err, errlen,
                   "migration %s is pending but the database already has version %d (migrations "
                   "must be applied in order)",
                   all[j].name, recorded_max);
            rc = -EINVAL;
            goto done;
        }
        char sum[65];
        if (sha256_hex(sum, all[j].sql) < 0) {
            seterr(err, errlen, "SHA-256 unavailable");
            rc = -EIO;
            goto done;
        }
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        rc = apply_one(c, &all[j], v, sum, err, errlen);
        if (rc < 0)
            goto done;
        clock_gettime(CLOCK_MONOTONIC, &b);
        res->applied++;
        res->version = v;
        recorded_max = v;
        if (on_applied)
            on_applied(all[j].name,
                       (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6,
                       arg);
    }

done:
    PQclear(r);
    if (locked) {
        pg_rollback(c);
        snprintf(sql, sizeof sql, "SELECT pg_advisory_unlock(%d, %d)", PG_MIGRATE_LOCK_KEY1,
                 PG_MIGRATE_LOCK_KEY2);
        /* A lost connection released the lock with the session. */
        if (PQstatus(c) == CONNECTION_OK)
            PQclear(PQexec(c, sql));
    }
    return rc;
}
