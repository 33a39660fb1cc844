/*
 * test_pg: the PostgreSQL adapter (io/pg.c) against a real PostgreSQL.
 *
 * URL conversion and the connect deadline need no server; everything else runs against
 * the stack this test starts itself (scripts/stack.sh up in a temporary directory, down at
 * exit), each test in a fresh schema of its own. Set PAY_TEST_DATABASE_URL to use an
 * existing server instead.
 *
 * Covered: URL forms and their errors; connect timeout and refusal; error strings with
 * SQLSTATE and detail; COMMIT of a failed transaction and COMMIT on a lost connection
 * (outcome unknown); migrations: names checked, applied in order with a callback, a failing
 * migration leaves no trace and releases the lock, renamed or edited migrations refused,
 * unknown newer versions tolerated, out-of-order pending refused, lock timeout, and four
 * threads migrating at once apply each migration exactly once.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "io/pg.h"

static char stack_dir[256];
static char base_url[1024];
static int schema_seq;

/* ---- the stack ------------------------------------------------------------------------- */

static void stack_down(void)
{
    if (!stack_dir[0])
        return;
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s/scripts/stack.sh' down '%s' >/dev/null 2>&1; rm -rf '%s'",
             getenv("PAY_SOURCE_DIR"), stack_dir, stack_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "warning: stopping the stack in %s failed\n", stack_dir);
    stack_dir[0] = '\0';
}

static int stack_up(void **state)
{
    (void)state;
    const char *given = getenv("PAY_TEST_DATABASE_URL");
    if (given && *given) {
        snprintf(base_url, sizeof base_url, "%s", given);
        return 0;
    }
    const char *src = getenv("PAY_SOURCE_DIR");
    if (!src || !getenv("PAY_BUILD_DIR")) {
        fprintf(stderr, "PAY_SOURCE_DIR and PAY_BUILD_DIR must be set (CTest sets them)\n");
        return -1;
    }
    snprintf(stack_dir, sizeof stack_dir, "/tmp/pay-test-pg.XXXXXX");
    if (!mkdtemp(stack_dir)) {
        stack_dir[0] = '\0';
        return -1;
    }
    atexit(stack_down);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s/scripts/stack.sh' up '%s' >'%s/up.log' 2>&1", src, stack_dir,
             stack_dir);
    if (system(cmd) != 0) {
        snprintf(cmd, sizeof cmd, "cat '%s/up.log' >&2", stack_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "(no log)\n");
        fprintf(stderr, "scripts/stack.sh up %s failed (log above)\n", stack_dir);
        return -1;
    }
    char path[512], line[1024];
    snprintf(path, sizeof path, "%s/env", stack_dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "no %s after stack.sh up\n", path);
        return -1;
    }
    while (fgets(line, sizeof line, f)) {
        const char *k = "export DATABASE_URL=";
        if (strncmp(line, k, strlen(k)) == 0) {
            snprintf(base_url, sizeof base_url, "%s", line + strlen(k));
            base_url[strcspn(base_url, "\r\n")] = '\0';
        }
    }
    fclose(f);
    if (!base_url[0]) {
        fprintf(stderr, "no DATABASE_URL in %s\n", path);
        return -1;
    }
    return 0;
}

static int stack_teardown(void **state)
{
    (void)state;
    stack_down();
    return 0;
}

/* ---- helpers --------------------------------------------------------------------------- */

static PGconn *connect_url(const char *url)
{
    PGconn *c = NULL;
    char err[512];
    int rc = pg_connect(&c, url, "test_pg", 10000, err, sizeof err);
    if (rc != 0)
        fail_msg("connect: %s", err);
    return c;
}

/* A fresh schema; *url_out selects it through search_path. */
static PGconn *fresh_schema(char *url_out, size_t urllen, char *name, size_t namelen)
{
    char err[512], sql[256];
    snprintf(name, namelen, "tpg_%d_%d", (int)getpid(), ++schema_seq);
    PGconn *c = connect_url(base_url);
    snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE; CREATE SCHEMA %s", name, name);
    assert_int_equal(pg_exec(c, NULL, sql, 0, NULL, err, sizeof err), 0);
    PQfinish(c);
    snprintf(url_out, urllen, "%s%soptions=-csearch_path%%3D%s", base_url,
             strchr(base_url, '?') ? "&" : "?", name);
    return connect_url(url_out);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *scalar(PGconn *c, const char *sql)
{
    static char buf[512];
    char err[512];
    PGresult *r = NULL;
    if (pg_exec(c, &r, sql, 0, NULL, err, sizeof err) != 0)
        fail_msg("%s: %s", sql, err);
    snprintf(buf, sizeof buf, "%s", PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "(none)");
    PQclear(r);
    return buf;
}

/* ---- URLs ------------------------------------------------------------------------------ */

static void expect_conninfo(const char *url, const char *want)
{
    char *out = NULL;
    char err[512] = "";
    int rc = pg_url_to_conninfo(&out, url, err, sizeof err);
    if (rc != 0)
        fail_msg("%s: %s", url, err);
    assert_string_equal(out, want);
    free(out);
}

static void expect_url_error(const char *url, const char *want)
{
    char *out = (char *)"unchanged";
    char err[512] = "";
    assert_int_equal(pg_url_to_conninfo(&out, url, err, sizeof err), -EINVAL);
    assert_null(out);
    assert_string_equal(err, want);
}

static void test_url_forms(void **state)
{
    (void)state;
    expect_conninfo("postgresql://u:p@h:5433/db", "postgresql://u:p@h:5433/db");
    expect_conninfo("postgres://u:p@h/db", "postgresql://u:p@h/db");
    expect_conninfo("postgresql+asyncpg://u:p@h:5/db", "postgresql://u:p@h:5/db");
    expect_conninfo("postgresql+asyncpg://u:p@h/db?ssl=require",
                    "postgresql://u:p@h/db?sslmode=require");
    expect_conninfo("postgresql+asyncpg://h/db?ssl=true&application_name=x",
                    "postgresql://h/db?sslmode=require&application_name=x");
    expect_conninfo("postgresql+asyncpg://h/db?application_name=x&ssl=false",
                    "postgresql://h/db?application_name=x&sslmode=disable");
    expect_conninfo("postgresql://h/db?sslmode=verify-full",
                    "postgresql://h/db?sslmode=verify-full");
}

static void test_url_errors(void **state)
{
    (void)state;
    expect_url_error("", "is empty (expected postgresql://user:password@host:port/db)");
    expect_url_error("mysql://u:secret@h/db",
                     "\"mysql://u:***@h/db\" is not a PostgreSQL URL (expected postgresql://, "
                     "postgres:// or postgresql+asyncpg://)");
    expect_url_error("host=h dbname=x",
                     "\"host=h dbname=x\" is not a PostgreSQL URL (expected postgresql://, "
                     "postgres:// or postgresql+asyncpg://)");
    expect_url_error("postgresql+asyncpg://u:secret@h/db?ssl=maybe",
                     "\"postgresql+asyncpg://u:***@h/db?ssl=maybe\": ssl=maybe is not one of "
                     "true, false, disable, allow, prefer, require, verify-ca, verify-full");
    expect_url_error("postgresql+asyncpg://h/db?ssl=true&sslmode=disable",
                     "\"postgresql+asyncpg://h/db?ssl=true&sslmode=disable\" sets both ssl and "
                     "sslmode");
    expect_url_error("postgresql://u:secret@h/db?bogus=1",
                     "\"postgresql://u:***@h/db?bogus=1\": invalid URI query parameter: \"bogus\"");
}

/* ---- connecting ------------------------------------------------------------------------ */

static void test_connect_deadline(void **state)
{
    (void)state;
    /* A listener that never accepts: the kernel completes the handshake, the server never
     * answers the startup packet. */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(s, 8), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(s, (struct sockaddr *)&a, &len), 0);
    int port = ntohs(a.sin_port);

    char url[128], err[512], want[256];
    snprintf(url, sizeof url, "postgresql://u:p@127.0.0.1:%d/db", port);
    PGconn *c = (PGconn *)1;
    int64_t t0 = mono_ms();
    assert_int_equal(pg_connect(&c, url, "test", 300, err, sizeof err), -ETIMEDOUT);
    int64_t took = mono_ms() - t0;
    assert_null(c);
    snprintf(want, sizeof want,
             "cannot connect to PostgreSQL at 127.0.0.1:%d: no answer within 300 ms", port);
    assert_string_equal(err, want);
    assert_true(took >= 300);
    assert_true(took < 5000);

    /* Nobody listening any more: refused at once. */
    close(s);
    t0 = mono_ms();
    assert_int_equal(pg_connect(&c, url, "test", 5000, err, sizeof err), -ENOTCONN);
    assert_true(mono_ms() - t0 < 4000);
    snprintf(want, sizeof want,
             "cannot connect to PostgreSQL: connection to server at \"127.0.0.1\", port %d "
             "failed: Connection refused Is the server running on that host and accepting "
             "TCP/IP connections?",
             port);
    assert_string_equal(err, want);
}

/* ---- statements and transactions ------------------------------------------------------- */

static void test_exec_errors(void **state)
{
    (void)state;
    char url[1280], name[64], err[512];
    PGconn *c = fresh_schema(url, sizeof url, name, sizeof name);
    PGresult *r = (PGresult *)1;

    assert_int_equal(pg_exec(c, &r, "SELECT 1/0", 0, NULL, err, sizeof err), -EIO);
    assert_null(r);
    assert_string_equal(err, "division by zero (SQLSTATE 22012)");

    assert_int_equal(
        pg_exec(c, NULL, "CREATE TABLE t (id int PRIMARY KEY, v text)", 0, NULL, err, sizeof err),
        0);
    const char *p1[] = {"1", NULL};
    assert_int_equal(pg_exec(c, NULL, "INSERT INTO t VALUES ($1, $2)", 2, p1, err, sizeof err), 0);
    assert_int_equal(pg_exec(c, NULL, "INSERT INTO t VALUES ($1, $2)", 2, p1, err, sizeof err),
                     -EIO);
    assert_string_equal(err, "duplicate key value violates unique constraint \"t_pkey\" "
                             "(SQLSTATE 23505): Key (id)=(1) already exists.");
    assert_string_equal(scalar(c, "SELECT coalesce(v, 'null') FROM t WHERE id = 1"), "null");

    /* Rows and no rows are both success. */
    assert_int_equal(pg_exec(c, &r, "SELECT id FROM t WHERE id = 2", 0, NULL, err, sizeof err), 0);
    assert_int_equal(PQntuples(r), 0);
    PQclear(r);
    PQfinish(c);
}

static void test_commit_semantics(void **state)
{
    (void)state;
    char url[1280], name[64], err[512];
    PGconn *c = fresh_schema(url, sizeof url, name, sizeof name);
    assert_int_equal(
        pg_exec(c, NULL, "CREATE TABLE t (id int PRIMARY KEY)", 0, NULL, err, sizeof err), 0);

    /* A committed transaction. */
    assert_int_equal(pg_begin(c, err, sizeof err), 0);
    assert_int_equal(pg_exec(c, NULL, "INSERT INTO t VALUES (1)", 0, NULL, err, sizeof err), 0);
    assert_int_equal(pg_commit(c, err, sizeof err), 0);

    /* A failed statement: COMMIT rolls back and says so. */
    assert_int_equal(pg_begin(c, err, sizeof err), 0);
    assert_int_equal(pg_exec(c, NULL, "INSERT INTO t VALUES (2)", 0, NULL, err, sizeof err), 0);
    assert_int_equal(pg_exec(c, NULL, "INSERT INTO t VALUES (1)", 0, NULL, err, sizeof err), -EIO);
    assert_int_equal(pg_commit(c, err, sizeof err), -EIO);
    assert_string_equal(err, "COMMIT rolled the transaction back: an earlier statement failed");
    assert_string_equal(scalar(c, "SELECT string_agg(id::text, ',' ORDER BY id) FROM t"), "1");

    /* Rollback. */
    assert_int_equal(pg_begin(c, err, sizeof err), 0);
    assert_int_equal(pg_exec(c, NULL, "INSERT INTO t VALUES (3)", 0, NULL, err, sizeof err), 0);
    pg_rollback(c);
    assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
    assert_string_equal(scalar(c, "SELECT count(*) FROM t"), "1");

    /* The connection dies inside a transaction: COMMIT's outcome is unknown. */
    assert_int_equal(pg_begin(c, err, sizeof err), 0);
    assert_int_equal(pg_exec(c, NULL, "INSERT INTO t VALUES (4)", 0, NULL, err, sizeof err), 0);
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", PQbackendPID(c));
    PGconn *killer = connect_url(url);
    assert_string_equal(scalar(killer, sql), "t");
    assert_int_equal(pg_commit(c, err, sizeof err), -ENOTCONN);
    assert_non_null(strstr(err, "connection to PostgreSQL lost during COMMIT, outcome unknown: "));
    assert_int_equal(pg_exec(c, NULL, "SELECT 1", 0, NULL, err, sizeof err), -ENOTCONN);
    assert_non_null(strstr(err, "connection to PostgreSQL lost: "));
    pg_rollback(c); /* harmless on a dead connection */
    assert_string_equal(scalar(killer, "SELECT count(*) FROM t"), "1");
    PQfinish(killer);
    PQfinish(c);
}

/* ---- migrations ------------------------------------------------------------------------ */

typedef struct applied_log {
    char names[8][64];
    int n;
} applied_log_t;

static void on_applied(const char *name, double ms, void *arg)
{
    applied_log_t *l = arg;
    assert_true(ms >= 0);
    if (l->n < 8)
        snprintf(l->names[l->n++], sizeof l->names[0], "%s", name);
}

static void expect_bad_list(const migration_t *list, const char *want)
{
    char err[512] = "";
    /* No connection needed: the list is checked first. */
    assert_int_equal(pg_migrate(NULL, list, 1000, NULL, NULL, NULL, err, sizeof err), -EINVAL);
    assert_string_equal(err, want);
}

static void test_migration_names(void **state)
{
    (void)state;
    expect_bad_list((const migration_t[]){{"1.sql", "SELECT 1"}, {NULL, NULL}},
                    "migration name \"1.sql\" is not NNN_words.sql");
    expect_bad_list((const migration_t[]){{"001-init.sql", "SELECT 1"}, {NULL, NULL}},
                    "migration name \"001-init.sql\" is not NNN_words.sql");
    expect_bad_list((const migration_t[]){{"001_in it.sql", "SELECT 1"}, {NULL, NULL}},
                    "migration name \"001_in it.sql\" is not NNN_words.sql");
    expect_bad_list((const migration_t[]){{"000_zero.sql", "SELECT 1"}, {NULL, NULL}},
                    "migration name \"000_zero.sql\" is not NNN_words.sql");
    expect_bad_list(
        (const migration_t[]){{"002_b.sql", "SELECT 1"}, {"002_c.sql", "SELECT 1"}, {NULL, NULL}},
        "migration 002_c.sql: version 2 does not follow version 2");
    expect_bad_list((const migration_t[]){{"001_a.sql", NULL}, {NULL, NULL}},
                    "migration 001_a.sql has no SQL");
}

static const migration_t two[] = {
    {"001_a.sql", "CREATE TABLE a (x int);\n"},
    {"002_b.sql", "INSERT INTO a VALUES (1);\nINSERT INTO a VALUES (2);\n"},
    {NULL, NULL},
};

static void test_migrate_applies_in_order(void **state)
{
    (void)state;
    char url[1280], name[64], err[512];
    PGconn *c = fresh_schema(url, sizeof url, name, sizeof name);
    applied_log_t log = {0};
    pg_migrate_result_t res;

    assert_int_equal(pg_migrate(c, two, 5000, on_applied, &log, &res, err, sizeof err), 0);
    assert_int_equal(res.applied, 2);
    assert_int_equal(res.already, 0);
    assert_int_equal(res.unknown, 0);
    assert_int_equal(res.version, 2);
    assert_int_equal(log.n, 2);
    assert_string_equal(log.names[0], "001_a.sql");
    assert_string_equal(log.names[1], "002_b.sql");
    assert_string_equal(scalar(c, "SELECT string_agg(x::text, ',' ORDER BY x) FROM a"), "1,2");
    assert_string_equal(
        scalar(c, "SELECT string_agg(version || '=' || name, ',' ORDER BY version) FROM "
                  "schema_migrations"),
        "1=001_a.sql,2=002_b.sql");
    /* the recorded checksum is the SQL's SHA-256 */
    assert_string_equal(scalar(c, "SELECT checksum = sha256(convert_to('CREATE TABLE a (x int);' "
                                  "|| chr(10), 'UTF8')) FROM schema_migrations WHERE version = 1"),
                        "t");

    /* Again: nothing to do. */
    log.n = 0;
    assert_int_equal(pg_migrate(c, two, 5000, on_applied, &log, &res, err, sizeof err), 0);
    assert_int_equal(res.applied, 0);
    assert_int_equal(res.already, 2);
    assert_int_equal(res.version, 2);
    assert_int_equal(log.n, 0);
    assert_string_equal(scalar(c, "SELECT count(*) FROM a"), "2");

    /* A binary that only knows 001: the database is newer, which is tolerated. */
    const migration_t older[] = {two[0], {NULL, NULL}};
    assert_int_equal(pg_migrate(c, older, 5000, NULL, NULL, &res, err, sizeof err), 0);
    assert_int_equal(res.applied, 0);
    assert_int_equal(res.already, 1);
    assert_int_equal(res.unknown, 1);
    assert_int_equal(res.version, 2);

    /* The lock is released after every run: another session can take it at once. */
    PGconn *other = connect_url(url);
    assert_string_equal(scalar(other, "SELECT pg_try_advisory_lock(1885436160, 1)"), "t");
    PQfinish(other);
    PQfinish(c);
}

static void test_migrate_failure_leaves_no_trace(void **state)
{
    (void)state;
    char url[1280], name[64], err[512];
    PGconn *c = fresh_schema(url, sizeof url, name, sizeof name);
    pg_migrate_result_t res;
    const migration_t bad[] = {
        two[0],
        two[1],
        {"003_bad.sql", "CREATE TABLE c (x int);\n\nSELECT no_such_function();\n"},
        {"004_after.sql", "CREATE TABLE d (x int);"},
        {NULL, NULL},
    };
    assert_int_equal(pg_migrate(c, bad, 5000, NULL, NULL, &res, err, sizeof err), -EIO);
    assert_string_equal(err, "migration 003_bad.sql failed at line 3: function "
                             "no_such_function() does not exist (SQLSTATE 42883)");
    assert_int_equal(res.applied, 2); /* 001 and 002 went in before */
    assert_string_equal(scalar(c, "SELECT count(*) FROM schema_migrations"), "2");
    assert_string_equal(scalar(c, "SELECT to_regclass('c') IS NULL AND to_regclass('d') IS NULL"),
                        "t");
    assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
    PGconn *other = connect_url(url);
    assert_string_equal(scalar(other, "SELECT pg_try_advisory_lock(1885436160, 1)"), "t");
    PQfinish(other);
    PQfinish(c);
}

static void test_migrate_refuses_changed_history(void **state)
{
    (void)state;
    char url[1280], name[64], err[512];
    PGconn *c = fresh_schema(url, sizeof url, name, sizeof name);
    pg_migrate_result_t res;
    assert_int_equal(pg_migrate(c, two, 5000, NULL, NULL, &res, err, sizeof err), 0);

    const migration_t renamed[] = {{"001_z.sql", two[0].sql}, two[1], {NULL, NULL}};
    assert_int_equal(pg_migrate(c, renamed, 5000, NULL, NULL, &res, err, sizeof err), -EINVAL);
    assert_string_equal(err, "schema_migrations records version 1 as 001_a.sql, but this "
                             "binary's version 1 is 001_z.sql");

    const migration_t edited[] = {
        {"001_a.sql", "CREATE TABLE a (x bigint);\n"}, two[1], {NULL, NULL}};
    assert_int_equal(pg_migrate(c, edited, 5000, NULL, NULL, &res, err, sizeof err), -EINVAL);
    assert_non_null(strstr(err, "migration 001_a.sql was changed after it was applied "
                                "(recorded SHA-256 "));

    /* 004 applied, then a binary with 003 as well: out of order, refused. */
    const migration_t with4[] = {
        two[0], two[1], {"004_d.sql", "CREATE TABLE d (x int);"}, {NULL, NULL}};
    assert_int_equal(pg_migrate(c, with4, 5000, NULL, NULL, &res, err, sizeof err), 0);
    assert_int_equal(res.version, 4);
    const migration_t with3[] = {two[0],
                                 two[1],
                                 {"003_c.sql", "CREATE TABLE c (x int);"},
                                 {"004_d.sql", "CREATE TABLE d (x int);"},
                                 {NULL, NULL}};
    assert_int_equal(pg_migrate(c, with3, 5000, NULL, NULL, &res, err, sizeof err), -EINVAL);
    assert_string_equal(err, "migration 003_c.sql is pending but the database already has "
                             "version 4 (migrations must be applied in order)");
    assert_string_equal(scalar(c, "SELECT to_regclass('c') IS NULL"), "t");
    PQfinish(c);
}

static void test_migrate_lock_timeout(void **state)
{
    (void)state;
    char url[1280], name[64], err[512];
    PGconn *c = fresh_schema(url, sizeof url, name, sizeof name);
    PGconn *holder = connect_url(url);
    assert_string_equal(scalar(holder, "SELECT pg_try_advisory_lock(1885436160, 1)"), "t");
    pg_migrate_result_t res;
    int64_t t0 = mono_ms();
    assert_int_equal(pg_migrate(c, two, 300, NULL, NULL, &res, err, sizeof err), -ETIMEDOUT);
    int64_t took = mono_ms() - t0;
    assert_string_equal(err, "timed out after 300 ms waiting for the migration lock (another "
                             "instance is migrating this database)");
    assert_true(took >= 300);
    assert_true(took < 10000);
    assert_int_equal(res.applied, 0);
    /* lock_timeout was reset for the session */
    assert_string_equal(scalar(c, "SHOW lock_timeout"), "0");
    PQfinish(holder);
    /* the holder is gone: now it works */
    assert_int_equal(pg_migrate(c, two, 5000, NULL, NULL, &res, err, sizeof err), 0);
    assert_int_equal(res.applied, 2);
    PQfinish(c);
}

typedef struct migrator {
    pthread_t tid;
    const char *url;
    int rc;
    pg_migrate_result_t res;
    char err[512];
} migrator_t;

static const migration_t slow[] = {
    {"001_a.sql", "CREATE TABLE a (x int); SELECT pg_sleep(0.2);"},
    {"002_b.sql", "INSERT INTO a VALUES (1);"},
    {"003_c.sql", "INSERT INTO a VALUES (2);"},
    {NULL, NULL},
};

static void *migrator_main(void *arg)
{
    migrator_t *m = arg;
    PGconn *c = NULL;
    m->rc = pg_connect(&c, m->url, "test_pg", 10000, m->err, sizeof m->err);
    if (m->rc == 0)
        m->rc = pg_migrate(c, slow, 30000, NULL, NULL, &m->res, m->err, sizeof m->err);
    PQfinish(c);
    return NULL;
}

static void test_migrate_concurrently(void **state)
{
    (void)state;
    char url[1280], name[64];
    PGconn *c = fresh_schema(url, sizeof url, name, sizeof name);
    migrator_t m[4];
    memset(m, 0, sizeof m);
    for (int i = 0; i < 4; i++) {
        m[i].url = url;
        assert_int_equal(pthread_create(&m[i].tid, NULL, migrator_main, &m[i]), 0);
    }
    int applied = 0;
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(m[i].tid, NULL), 0);
        if (m[i].rc != 0)
            fail_msg("migrator %d: %s", i, m[i].err);
        applied += m[i].res.applied;
        assert_int_equal(m[i].res.version, 3);
        assert_int_equal(m[i].res.applied + m[i].res.already, 3);
    }
    assert_int_equal(applied, 3);
    assert_string_equal(scalar(c, "SELECT string_agg(x::text, ',' ORDER BY x) FROM a"), "1,2");
    assert_string_equal(scalar(c, "SELECT count(*) FROM schema_migrations"), "3");
    PQfinish(c);
}

int main(void)
{
    const struct CMUnitTest offline[] = {
        cmocka_unit_test(test_url_forms),
        cmocka_unit_test(test_url_errors),
        cmocka_unit_test(test_connect_deadline),
        cmocka_unit_test(test_migration_names),
    };
    const struct CMUnitTest online[] = {
        cmocka_unit_test(test_exec_errors),
        cmocka_unit_test(test_commit_semantics),
        cmocka_unit_test(test_migrate_applies_in_order),
        cmocka_unit_test(test_migrate_failure_leaves_no_trace),
        cmocka_unit_test(test_migrate_refuses_changed_history),
        cmocka_unit_test(test_migrate_lock_timeout),
        cmocka_unit_test(test_migrate_concurrently),
    };
    int failed = cmocka_run_group_tests_name("pg offline", offline, NULL, NULL);
    failed +=
        cmocka_run_group_tests_name("pg against PostgreSQL", online, stack_up, stack_teardown);
    return failed ? 1 : 0;
}
