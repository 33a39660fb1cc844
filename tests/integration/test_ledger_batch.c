/*
 * test_ledger_batch: the batched ledger engine (issue 5) end to end: a real build/paymentd
 * on the real PostgreSQL of scripts/stack.sh (started in a temporary directory, stopped at
 * exit), through a real gRPC client, each test in a fresh schema with its own paymentd.
 * The stack, fixture and call helpers are test_ledger.c's (copied; its tests run unchanged
 * with batching on).
 *
 * Covered: ledger_authorize_batch() called directly with one deterministic batch mixing
 * every outcome (valid payments, an overdraft after earlier debits, a key repeated with
 * the same fingerprint -> DUPLICATE of the first, with another -> CONFLICT, an unknown
 * account, a currency mismatch, an invalid amount, the same account) and a second batch
 * replaying stored keys; the same mix through the server, forced into ONE batch (the
 * writer is held on a row lock while the requests queue) and proved by the batch-size
 * histogram paymentd logs at shutdown; batches larger than one under concurrent load; two
 * instances batching (ledger check passes, money conserved); PostgreSQL's postmaster
 * killed mid-batch (nothing half-applied, nothing acknowledged lost).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "actors/ledger.h"
#include "actors/ledger_store.h"
#include "e2e/paymentd_proc.h"
#include "grpc/health/v1/health.pb-c.h"
#include "io/grpc_client.h"
#include "io/pg.h"
#include "payment/v1/payment.pb-c.h"

#define AUTHORIZE   "/payment.v1.PaymentService/AuthorizePayment"
#define GET_PAYMENT "/payment.v1.PaymentService/GetPayment"
#define GET_BALANCE "/payment.v1.PaymentService/GetAccountBalance"
#define CHECK       "/grpc.health.v1.Health/Check"

#define ST_AUTHORIZED  PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_AUTHORIZED
#define ST_DECLINED    PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DECLINED
#define ST_DUPLICATE   PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DUPLICATE
#define E_INSUFFICIENT PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_INSUFFICIENT_FUNDS
#define E_NOT_FOUND    PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_ACCOUNT_NOT_FOUND
#define E_AMOUNT       PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_INVALID_AMOUNT
#define E_SAME         PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_SAME_ACCOUNT
#define E_CURRENCY     PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_CURRENCY_MISMATCH

static char stack_dir[256];
static char base_url[1024];
static int schema_seq;

/* ---- the stack ------------------------------------------------------------------------- */

/* Copies src into dst (size n), truncating. */
static void cpy(char *dst, size_t n, const char *src)
{
    size_t len = strnlen(src, n - 1);
    memcpy(dst, src, len);
    dst[len] = '\0';
}

static void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int vsh(const char *fmt, va_list ap)
{
    char cmd[4096];
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int sh_status(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vsh(fmt, ap);
    va_end(ap);
    return rc;
}

static void sh(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vsh(fmt, ap);
    va_end(ap);
    if (rc != 0)
        fail_msg("shell command failed with status %d", rc);
}

static void stack_down(void)
{
    if (!stack_dir[0])
        return;
    if (sh_status("'%s/scripts/stack.sh' down '%s' >/dev/null 2>&1; rm -rf '%s'",
                  getenv("PAY_SOURCE_DIR"), stack_dir, stack_dir) != 0)
        fprintf(stderr, "warning: stopping the stack in %s failed\n", stack_dir);
    stack_dir[0] = '\0';
}

static int stack_up(void **state)
{
    (void)state;
    const char *src = getenv("PAY_SOURCE_DIR");
    if (!src || !getenv("PAY_BUILD_DIR")) {
        fprintf(stderr, "PAY_SOURCE_DIR and PAY_BUILD_DIR must be set (CTest sets them)\n");
        return -1;
    }
    snprintf(stack_dir, sizeof stack_dir, "/tmp/pay-test-ledger-batch.XXXXXX");
    if (!mkdtemp(stack_dir)) {
        stack_dir[0] = '\0';
        return -1;
    }
    atexit(stack_down);
    if (sh_status("'%s/scripts/stack.sh' up '%s' >'%s/up.log' 2>&1", src, stack_dir, stack_dir) !=
        0) {
        sh_status("cat '%s/up.log' >&2", stack_dir);
        fprintf(stderr, "scripts/stack.sh up %s failed (log above): PostgreSQL is required\n",
                stack_dir);
        return -1;
    }
    char path[300], line[1200];
    snprintf(path, sizeof path, "%s/env", stack_dir); /* what stack.sh env prints */
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        const char *k = "export DATABASE_URL=";
        if (strncmp(line, k, strlen(k)) == 0) {
            cpy(base_url, sizeof base_url, line + strlen(k));
            base_url[strcspn(base_url, "\r\n")] = '\0';
        }
    }
    fclose(f);
    if (!base_url[0]) {
        fprintf(stderr, "no DATABASE_URL from stack.sh env\n");
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

/* ---- fixture: a schema, its accounts, a paymentd ---------------------------------------- */

typedef struct fixture {
    char schema[64];
    char url[1400];
    char env_url[1500];
    PGconn *db;
    pd_proc_t pd, pd2;
    gc_t *gc, *gc2;
} fixture_t;

static PGconn *connect_url(const char *url)
{
    PGconn *c = NULL;
    char err[512];
    if (pg_connect(&c, url, "test_ledger_batch", 10000, err, sizeof err) != 0)
        fail_msg("connect: %s", err);
    return c;
}

static void exec_sql(PGconn *c, const char *sql)
{
    char err[768];
    if (pg_exec(c, NULL, sql, 0, NULL, err, sizeof err) != 0)
        fail_msg("%s: %s", sql, err);
}

/* The first column of the first row as text ("(none)" without rows). */
static const char *scalar(PGconn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const char *scalar(PGconn *c, const char *fmt, ...)
{
    static char buf[2048];
    char sql[2048], err[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    PGresult *r = NULL;
    if (pg_exec(c, &r, sql, 0, NULL, err, sizeof err) != 0)
        fail_msg("%s: %s", sql, err);
    snprintf(buf, sizeof buf, "%s",
             PQntuples(r) > 0 ? (PQgetisnull(r, 0, 0) ? "(null)" : PQgetvalue(r, 0, 0)) : "(none)");
    PQclear(r);
    return buf;
}

static int64_t scalar_i64(PGconn *c, const char *sql)
{
    return strtoll(scalar(c, "%s", sql), NULL, 10);
}

static void open_account(fixture_t *f, const char *id, const char *cur, int64_t fund)
{
    char err[768];
    bool created;
    if (ledger_store_open_account(f->db, &created, id, cur, NULL, err, sizeof err) != 0)
        fail_msg("open %s: %s", id, err);
    if (fund > 0 && ledger_store_fund_account(f->db, NULL, id, fund, 0, err, sizeof err) != 0)
        fail_msg("fund %s: %s", id, err);
}

static void start_server(fixture_t *f, pd_proc_t *pd, gc_t **gc, const char *const *extra)
{
    const char *env[16];
    size_t n = 0;
    env[n++] = f->env_url;
    env[n++] = "RATE_LIMIT_ENABLED=false";
    env[n++] = "LOG_LEVEL=INFO";
    env[n++] = "LEDGER_BATCH_MAX=256"; /* the default, whatever the environment says */
    for (size_t i = 0; extra && extra[i] && n < 15; i++)
        env[n++] = extra[i];
    env[n] = NULL;
    assert_int_equal(pd_start(pd, env), 0);
    assert_int_equal(gc_connect(gc, pd->target), 0);
}

static int setup_env(void **state, const char *const *extra)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    char sql[256], err[768];
    snprintf(f->schema, sizeof f->schema, "tlb_%d_%d", (int)getpid(), ++schema_seq);
    PGconn *c = connect_url(base_url);
    snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE; CREATE SCHEMA %s", f->schema,
             f->schema);
    exec_sql(c, sql);
    PQfinish(c);
    snprintf(f->url, sizeof f->url, "%s%soptions=-csearch_path%%3D%s", base_url,
             strchr(base_url, '?') ? "&" : "?", f->schema);
    snprintf(f->env_url, sizeof f->env_url, "DATABASE_URL=%s", f->url);
    f->db = connect_url(f->url);
    pg_migrate_result_t res;
    if (pg_migrate(f->db, migrations_all(), 30000, NULL, NULL, &res, err, sizeof err) != 0)
        fail_msg("migrate: %s", err);
    open_account(f, "alice", "USD", 100000);
    open_account(f, "bob", "USD", 50000);
    open_account(f, "carol", "USD", 0);
    open_account(f, "erin-eur", "EUR", 70000);
    start_server(f, &f->pd, &f->gc, extra);
    return 0;
}

static int setup(void **state)
{
    return setup_env(state, NULL);
}
static int teardown(void **state)
{
    fixture_t *f = *state;
    if (!f)
        return 0;
    gc_close(f->gc);
    gc_close(f->gc2);
    int status;
    bool clean = true;
    pd_proc_t *pds[2] = {&f->pd, &f->pd2};
    for (int i = 0; i < 2; i++) {
        if (pds[i]->pid > 0) {
            pd_signal(pds[i], SIGTERM);
            if (pd_wait(pds[i], 20000, &status) < 0 || !WIFEXITED(status) ||
                WEXITSTATUS(status) != 0) {
                pd_dump_log(pds[i]);
                clean = false;
            }
        }
        pd_cleanup(pds[i]);
    }
    if (f->db)
        PQfinish(f->db);
    free(f);
    if (!clean)
        fprintf(stderr, "paymentd did not exit 0 at SIGTERM\n");
    return clean ? 0 : -1;
}

/* ---- calls ------------------------------------------------------------------------------ */

typedef struct auth {
    const char *key, *payer, *payee, *currency, *description;
    int64_t amount;
    const char *client_id; /* x-client-id, or NULL */
} auth_t;

typedef struct outcome {
    grpc_status_code grpc;
    char details[512];
    int status;     /* PaymentStatus */
    int error_code; /* PaymentErrorCode, 0 when unset */
    bool has_error;
    char error_message[256];
    char payment_id[32];
    char processed_at[48];
} outcome_t;

static void authorize_on(gc_t *gc, const auth_t *a, int timeout_ms, outcome_t *o)
{
    Payment__V1__AuthorizePaymentRequest req = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    req.idempotency_key = (char *)a->key;
    req.payer_account_id = (char *)a->payer;
    req.payee_account_id = (char *)a->payee;
    req.amount_cents = a->amount;
    req.currency = (char *)(a->currency ? a->currency : "USD");
    req.description = (char *)(a->description ? a->description : "");
    uint8_t buf[4096];
    size_t len = payment__v1__authorize_payment_request__pack(&req, buf);
    gc_md_t md[1] = {{"x-client-id", a->client_id}};
    gc_result_t r;
    memset(o, 0, sizeof *o);
    assert_int_equal(gc_unary(gc, AUTHORIZE, buf, len, timeout_ms, md, a->client_id ? 1 : 0, &r),
                     0);
    o->grpc = r.status;
    cpy(o->details, sizeof o->details, r.details);
    if (r.status == GRPC_STATUS_OK) {
        Payment__V1__AuthorizePaymentResponse *resp =
            payment__v1__authorize_payment_response__unpack(NULL, r.body_len, r.body);
        assert_non_null(resp);
        o->status = resp->status;
        snprintf(o->payment_id, sizeof o->payment_id, "%s", resp->payment_id);
        snprintf(o->processed_at, sizeof o->processed_at, "%s", resp->processed_at);
        if (resp->error) {
            o->has_error = true;
            o->error_code = resp->error->code;
            snprintf(o->error_message, sizeof o->error_message, "%s", resp->error->message);
        }
        payment__v1__authorize_payment_response__free_unpacked(resp, NULL);
    }
    gc_result_free(&r);
}

static void expect_ok(const outcome_t *o, int status, int code)
{
    if (o->grpc != GRPC_STATUS_OK)
        fail_msg("gRPC status %d (%s), expected OK", o->grpc, o->details);
    assert_int_equal(o->status, status);
    assert_int_equal(o->error_code, code);
    assert_int_equal(o->has_error, code != 0);
}

static int64_t balance(gc_t *gc, const char *account, char *currency)
{
    Payment__V1__GetAccountBalanceRequest req = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    req.account_id = (char *)account;
    gc_result_t r;
    assert_int_equal(gc_unary_msg(gc, GET_BALANCE, &req.base, 10000, &r), 0);
    if (r.status != GRPC_STATUS_OK)
        fail_msg("GetAccountBalance %s: status %d (%s)", account, r.status, r.details);
    Payment__V1__GetAccountBalanceResponse *resp =
        payment__v1__get_account_balance_response__unpack(NULL, r.body_len, r.body);
    assert_non_null(resp);
    assert_string_equal(resp->account_id, account);
    assert_int_equal(resp->pending_balance_cents, 0);
    if (currency)
        snprintf(currency, 4, "%s", resp->currency);
    int64_t b = resp->available_balance_cents;
    payment__v1__get_account_balance_response__free_unpacked(resp, NULL);
    gc_result_free(&r);
    return b;
}

#define ULID_RE "^[0-9A-HJKMNP-TV-Z]{26}$"
#define TS_RE   "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}\\+00:00$"

static void ledger_check_passes(fixture_t *f)
{
    int rc = sh_status("DATABASE_URL='%s' '%s/paymentctl' ledger check >'%s/check.out' 2>&1",
                       f->url, getenv("PAY_BUILD_DIR"), stack_dir);
    if (rc != 0) {
        sh_status("cat '%s/check.out' >&2", stack_dir);
        fail_msg("paymentctl ledger check exited %d", rc);
    }
}

static int64_t customer_total(fixture_t *f)
{
    return scalar_i64(f->db, "SELECT coalesce(sum(balance_cents), 0) FROM accounts"
                             " WHERE kind = 'customer'");
}

/* ---- the full flow ---------------------------------------------------------------------- */
/* ---- concurrency ------------------------------------------------------------------------ */

typedef struct worker {
    fixture_t *f;
    gc_t *gc;
    const char *target;
    auth_t a;
    outcome_t o;
    int id;
    /* random load */
    int calls;
    const char *const *accounts;
    int naccounts;
    int64_t max_amount;
    atomic_int *authorized, *declined, *errors;
    char bad[256];
} worker_t;

static void *one_call(void *arg)
{
    worker_t *w = arg;
    gc_t *gc;
    if (gc_connect(&gc, w->target) != 0)
        return NULL;
    authorize_on(gc, &w->a, 30000, &w->o);
    gc_close(gc);
    return NULL;
}

static void run_parallel(worker_t *ws, int n, void *(*fn)(void *))
{
    pthread_t *t = calloc((size_t)n, sizeof(*t));
    for (int i = 0; i < n; i++)
        assert_int_equal(pthread_create(&t[i], NULL, fn, &ws[i]), 0);
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    free(t);
}
static void *random_load(void *arg)
{
    worker_t *w = arg;
    gc_t *gc;
    if (gc_connect(&gc, w->target) != 0) {
        snprintf(w->bad, sizeof w->bad, "cannot connect");
        return NULL;
    }
    unsigned seed = (unsigned)w->id * 7919u + 1;
    for (int i = 0; i < w->calls; i++) {
        char key[64];
        snprintf(key, sizeof key, "rnd-%s-%d-%d", w->target, w->id, i);
        int p = rand_r(&seed) % w->naccounts;
        int q = (p + 1 + rand_r(&seed) % (w->naccounts - 1)) % w->naccounts;
        auth_t a = {.key = key,
                    .payer = w->accounts[p],
                    .payee = w->accounts[q],
                    .amount = 1 + rand_r(&seed) % w->max_amount};
        outcome_t o;
        authorize_on(gc, &a, 30000, &o);
        if (o.grpc == GRPC_STATUS_OK && o.status == ST_AUTHORIZED)
            atomic_fetch_add(w->authorized, 1);
        else if (o.grpc == GRPC_STATUS_OK && o.status == ST_DECLINED &&
                 o.error_code == E_INSUFFICIENT)
            atomic_fetch_add(w->declined, 1);
        else {
            atomic_fetch_add(w->errors, 1);
            snprintf(w->bad, sizeof w->bad, "status %d/%d: %.200s", o.grpc, o.status, o.details);
        }
    }
    gc_close(gc);
    return NULL;
}

/* nthreads workers spread over the targets, calls each, among accounts; then the ledger
 * holds, money is conserved, and every reply matches a stored payment. */
static void hammer(fixture_t *f, const char *const *targets, int ntargets, int nthreads, int calls,
                   const char *const *accounts, int naccounts, int64_t max_amount)
{
    int64_t total = customer_total(f);
    int64_t before = scalar_i64(f->db, "SELECT count(*) FROM payments");
    atomic_int authorized = 0, declined = 0, errors = 0;
    worker_t *ws = calloc((size_t)nthreads, sizeof(*ws));
    for (int i = 0; i < nthreads; i++)
        ws[i] = (worker_t){.f = f,
                           .target = targets[i % ntargets],
                           .id = i,
                           .calls = calls,
                           .accounts = accounts,
                           .naccounts = naccounts,
                           .max_amount = max_amount,
                           .authorized = &authorized,
                           .declined = &declined,
                           .errors = &errors};
    run_parallel(ws, nthreads, random_load);
    for (int i = 0; i < nthreads; i++)
        if (ws[i].bad[0])
            fail_msg("worker %d: %s", i, ws[i].bad);
    free(ws);
    assert_int_equal(atomic_load(&errors), 0);
    assert_int_equal(atomic_load(&authorized) + atomic_load(&declined), nthreads * calls);
    assert_true(atomic_load(&declined) > 0); /* some overdrew */
    assert_true(atomic_load(&authorized) > 0);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments") - before, nthreads * calls);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE status ="
                                       " 'AUTHORIZED' AND idempotency_key LIKE 'rnd-%'"),
                     atomic_load(&authorized));
    assert_int_equal(customer_total(f), total);
    ledger_check_passes(f);
}

static const char *const ACCOUNTS[] = {"alice", "bob", "carol", "dave"};

/* ---- PostgreSQL stopped mid-load --------------------------------------------------------- */

typedef struct chaos {
    const char *target;
    atomic_bool stop;
    pthread_mutex_t mu;
    char (*acked)[32]; /* AUTHORIZED payment ids */
    size_t nacked, cap;
    atomic_int ok, unavailable, other, hung;
    char other_details[256];
    int64_t max_ms;
} chaos_t;

typedef struct chaos_worker {
    chaos_t *c;
    int id;
} chaos_worker_t;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#define CHAOS_DEADLINE_MS 3000

static void *chaos_load(void *arg)
{
    chaos_worker_t *w = arg;
    chaos_t *c = w->c;
    gc_t *gc;
    if (gc_connect(&gc, c->target) != 0)
        return NULL;
    const char *const acc[] = {"alice", "bob"};
    for (int i = 0; !atomic_load(&c->stop); i++) {
        char key[64];
        snprintf(key, sizeof key, "chaos-%d-%d", w->id, i);
        auth_t a = {.key = key,
                    .payer = acc[(w->id + i) % 2],
                    .payee = acc[(w->id + i + 1) % 2],
                    .amount = 1 + i % 50};
        outcome_t o;
        int64_t t0 = now_ms();
        authorize_on(gc, &a, CHAOS_DEADLINE_MS, &o);
        int64_t took = now_ms() - t0;
        pthread_mutex_lock(&c->mu);
        if (took > c->max_ms)
            c->max_ms = took;
        if (o.grpc == GRPC_STATUS_OK) {
            atomic_fetch_add(&c->ok, 1);
            if (o.status == ST_AUTHORIZED && c->nacked < c->cap)
                snprintf(c->acked[c->nacked++], 32, "%s", o.payment_id);
        } else if (o.grpc == GRPC_STATUS_UNAVAILABLE) {
            atomic_fetch_add(&c->unavailable, 1);
        } else if (o.grpc == GRPC_STATUS_DEADLINE_EXCEEDED) {
            atomic_fetch_add(&c->hung, 1);
        } else {
            atomic_fetch_add(&c->other, 1);
            snprintf(c->other_details, sizeof c->other_details, "%d: %.200s", o.grpc, o.details);
        }
        pthread_mutex_unlock(&c->mu);
        if (o.grpc == GRPC_STATUS_UNAVAILABLE)
            usleep(20000); /* a client's retry pause */
    }
    gc_close(gc);
    return NULL;
}

static int health(gc_t *gc)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = "payment.v1.PaymentService";
    gc_result_t r;
    assert_int_equal(gc_unary_msg(gc, CHECK, &req.base, 5000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_OK);
    Grpc__Health__V1__HealthCheckResponse *resp =
        grpc__health__v1__health_check_response__unpack(NULL, r.body_len, r.body);
    assert_non_null(resp);
    int st = resp->status;
    grpc__health__v1__health_check_response__free_unpacked(resp, NULL);
    gc_result_free(&r);
    return st;
}

/* Waits up to ms for the health status; the time it took, or -1. */
static int64_t wait_health(gc_t *gc, int want, int64_t ms)
{
    int64_t t0 = now_ms();
    while (now_ms() - t0 < ms) {
        if (health(gc) == want)
            return now_ms() - t0;
        usleep(50000);
    }
    return -1;
}

/* Brings the stack's PostgreSQL back (after pg-stop or a kill -9 of its postmaster, whose
 * orphaned backends may take a moment to exit): pg-start until it answers. */
static void postgres_back(void)
{
    const char *src = getenv("PAY_SOURCE_DIR");
    for (int i = 0; i < 40; i++) {
        if (sh_status("'%s/scripts/stack.sh' pg-start '%s' >>'%s/drill.log' 2>&1 &&"
                      " ! tail -1 '%s/drill.log' | grep -q 'already running'",
                      src, stack_dir, stack_dir, stack_dir) == 0)
            return;
        usleep(250000);
    }
    fail_msg("PostgreSQL did not come back (see %s/drill.log)", stack_dir);
}

typedef enum { STOP_FAST, KILL_POSTMASTER } outage_t;

static void postgres_killed_mid_load(fixture_t *f, outage_t how)
{
    const char *src = getenv("PAY_SOURCE_DIR");
    chaos_t c = {.target = f->pd.target, .cap = 100000};
    pthread_mutex_init(&c.mu, NULL);
    c.acked = calloc(c.cap, sizeof(*c.acked));
    const int n = 16;
    chaos_worker_t ws[16];
    pthread_t th[16];
    int64_t total = customer_total(f);
    assert_int_equal(health(f->gc),
                     GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    for (int i = 0; i < n; i++) {
        ws[i] = (chaos_worker_t){&c, i};
        assert_int_equal(pthread_create(&th[i], NULL, chaos_load, &ws[i]), 0);
    }
    usleep(1000000);
    int ok_before = atomic_load(&c.ok);
    assert_true(ok_before > 0);
    if (how == STOP_FAST)
        sh("'%s/scripts/stack.sh' pg-stop '%s' >>'%s/drill.log' 2>&1", src, stack_dir, stack_dir);
    else /* abrupt: no shutdown, crash recovery at restart */
        sh("kill -9 \"$(head -1 \"$(cat '%s/pg.base')/data/postmaster.pid\")\"", stack_dir);
    int64_t down = wait_health(
        f->gc, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING, 5000);
    assert_true(down >= 0);
    /* The outage: calls keep ending, UNAVAILABLE, within their deadline. */
    int unavailable_before = atomic_load(&c.unavailable);
    usleep(1500000);
    assert_true(atomic_load(&c.unavailable) > unavailable_before);
    postgres_back();
    int64_t up =
        wait_health(f->gc, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING, 20000);
    assert_true(up >= 0);
    int ok_after_restart = atomic_load(&c.ok);
    usleep(1000000);
    atomic_store(&c.stop, true);
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    if (atomic_load(&c.other) || atomic_load(&c.hung))
        fail_msg("%d calls ended otherwise (%s), %d hit their deadline", atomic_load(&c.other),
                 c.other_details, atomic_load(&c.hung));
    assert_true(c.max_ms < CHAOS_DEADLINE_MS + 2000);
    assert_true(atomic_load(&c.ok) > ok_after_restart); /* recovered by itself */

    /* Nothing acknowledged is lost. */
    PQfinish(f->db);
    f->db = connect_url(f->url);
    char *ids = malloc(c.nacked * 30 + 16);
    size_t at = 0;
    ids[at++] = '{';
    for (size_t i = 0; i < c.nacked; i++)
        at += (size_t)sprintf(ids + at, "%s%s", i ? "," : "", c.acked[i]);
    ids[at++] = '}';
    ids[at] = '\0';
    const char *params[1] = {ids};
    PGresult *r = NULL;
    char err[768];
    if (pg_exec(
            f->db, &r,
            "SELECT count(*) FROM payments WHERE status = 'AUTHORIZED' AND id = ANY($1::text[])", 1,
            params, err, sizeof err) != 0)
        fail_msg("acknowledged payments: %s", err);
    assert_int_equal(strtoll(PQgetvalue(r, 0, 0), NULL, 10), (int64_t)c.nacked);
    PQclear(r);
    free(ids);
    assert_int_equal(customer_total(f), total);
    ledger_check_passes(f);
    fprintf(stderr,
            "chaos (%s): %d ok (%zu authorized), %d unavailable; NOT_SERVING after %lld ms,"
            " SERVING %lld ms after restart; slowest call %lld ms\n",
            how == STOP_FAST ? "pg-stop" : "kill -9", atomic_load(&c.ok), c.nacked,
            atomic_load(&c.unavailable), (long long)down, (long long)up, (long long)c.max_ms);
    free(c.acked);
}

static void expect_grpc(const outcome_t *o, grpc_status_code code, const char *details)
{
    assert_int_equal(o->grpc, code);
    assert_string_equal(o->details, details);
}

/* ---- the batch-size histogram ------------------------------------------------------------ */

typedef struct batches {
    uint64_t total, max, single; /* batches, the largest, batches of one */
} batches_t;

/* Stops pd with SIGTERM (it must exit 0) and parses the "ledger batches:" line of its log. */
static void stop_and_read_batches(pd_proc_t *pd, batches_t *b)
{
    int status;
    assert_int_equal(pd_signal(pd, SIGTERM), 0);
    assert_int_equal(pd_wait(pd, 20000, &status), 0);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    FILE *fp = fopen(pd->log_path, "r");
    assert_non_null(fp);
    char line[4096];
    int found = 0;
    memset(b, 0, sizeof *b);
    while (fgets(line, sizeof line, fp)) {
        const char *at = strstr(line, "ledger batches: total=");
        if (!at)
            continue;
        found++;
        unsigned long long total, max, single;
        assert_int_equal(
            sscanf(at, "ledger batches: total=%llu max=%llu 1:%llu", &total, &max, &single), 3);
        b->total = total;
        b->max = max;
        b->single = single;
    }
    fclose(fp);
    if (found != 1) {
        pd_dump_log(pd);
        fail_msg("expected one \"ledger batches:\" line in the log, found %d", found);
    }
}

/* ---- ledger_authorize_batch() directly: every outcome in one batch, in order ------------ */

#define BATCH_SQL                                                                                  \
    "SELECT ord, outcome, payment_id, status, coalesce(error_code, '-'),"                          \
    " coalesce(error_message, '-'), processed_at FROM ledger_authorize_batch($1::text[],"          \
    " $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[],"       \
    " $9::text[], $10::text[], $11::timestamptz[], '24 hours', 1000000)"

typedef struct row_want {
    const char *outcome, *payment_id, *status, *code, *message;
} row_want_t;

static void run_batch(fixture_t *f, const char *const params[11], const row_want_t *want, int n)
{
    PGresult *r = NULL;
    char err[768];
    if (pg_exec(f->db, &r, BATCH_SQL, 11, params, err, sizeof err) != 0)
        fail_msg("ledger_authorize_batch: %s", err);
    assert_int_equal(PQntuples(r), n);
    for (int i = 0; i < n; i++) {
        char ord[16];
        snprintf(ord, sizeof ord, "%d", i + 1);
        assert_string_equal(PQgetvalue(r, i, 0), ord);
        assert_string_equal(PQgetvalue(r, i, 1), want[i].outcome);
        assert_string_equal(PQgetvalue(r, i, 2), want[i].payment_id);
        assert_string_equal(PQgetvalue(r, i, 3), want[i].status);
        assert_string_equal(PQgetvalue(r, i, 4), want[i].code);
        assert_string_equal(PQgetvalue(r, i, 5), want[i].message);
        assert_string_equal(PQgetvalue(r, i, 6), "2030-01-02T03:04:05.000006+00:00");
    }
    PQclear(r);
}

#define P(n) "01J0000000000000000000000" #n
#define E(n) "01J1000000000000000000000" #n
/* 64 hex digits: c repeated (a fingerprint) */
#define FP16(c) c c c c c c c c c c c c c c c c
#define FP(c)   FP16(c) FP16(c) FP16(c) FP16(c)
#define TS      "2030-01-02T03:04:05.000006+00:00"
#define TS10    "{" TS "," TS "," TS "," TS "," TS "," TS "," TS "," TS "," TS "," TS "}"

static void test_batch_function_outcomes(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 1000);
    /* In arrival order: dave pays 600 twice (the second overdraws what the first left),
     * k-dup twice with one fingerprint and k-dup a third time with another, an unknown
     * payee, a currency mismatch, an invalid amount, the same account, and a valid one. */
    const char *params[11] = {
        "{global,global,global,global,global,global,global,global,global,global}",
        "{k-a,k-b,k-dup,k-dup,k-dup,k-nf,k-cur,k-amt,k-same,k-ok}",
        "{" FP("1") "," FP("2") "," FP("3") "," FP("3") "," FP("4") "," FP("5") "," FP("6") "," FP(
            "7") "," FP("8") "," FP("9") "}",
        "{" P(0) "," P(1) "," P(2) "," P(3) "," P(4) "," P(5) "," P(6) "," P(7) "," P(8) "," P(
            9) "}",
        "{" E(0) "," E(1) "," E(2) "," E(3) "," E(4) "," E(5) "," E(6) "," E(7) "," E(8) "," E(
            9) "}",
        "{dave,dave,alice,alice,alice,alice,alice,alice,bob,bob}",
        "{carol,carol,bob,bob,bob,ghost,erin-eur,bob,bob,dave}",
        "{600,600,250,250,251,10,10,0,5,70}",
        "{USD,USD,USD,USD,USD,USD,USD,USD,USD,USD}",
        "{d0,d1,d2,d3,d4,d5,d6,d7,d8,\"a \\\"quoted\\\", {braced} one\"}",
        TS10,
    };
    const row_want_t want[10] = {
        {"NEW", P(0), "AUTHORIZED", "-", "-"},
        {"NEW", P(1), "DECLINED", "INSUFFICIENT_FUNDS", "insufficient funds in payer account dave"},
        {"NEW", P(2), "AUTHORIZED", "-", "-"},
        {"DUPLICATE", P(2), "AUTHORIZED", "-", "-"},
        {"CONFLICT", P(2), "AUTHORIZED", "-", "-"},
        {"NEW", P(5), "DECLINED", "ACCOUNT_NOT_FOUND", "payee account ghost not found"},
        {"NEW", P(6), "DECLINED", "CURRENCY_MISMATCH",
         "currency USD does not match payee account erin-eur (EUR)"},
        {"NEW", P(7), "DECLINED", "INVALID_AMOUNT",
         "amount_cents must be between 1 and 1000000, got 0"},
        {"NEW", P(8), "DECLINED", "SAME_ACCOUNT", "payer and payee are the same account bob"},
        {"NEW", P(9), "AUTHORIZED", "-", "-"},
    };
    run_batch(f, params, want, 10);
    assert_int_equal(scalar_i64(f->db, "SELECT balance_cents FROM accounts WHERE id = 'dave'"),
                     1000 - 600 + 70);
    assert_int_equal(scalar_i64(f->db, "SELECT balance_cents FROM accounts WHERE id = 'alice'"),
                     100000 - 250);
    assert_int_equal(scalar_i64(f->db, "SELECT balance_cents FROM accounts WHERE id = 'bob'"),
                     50000 + 250 - 70);
    assert_int_equal(scalar_i64(f->db, "SELECT balance_cents FROM accounts WHERE id = 'carol'"),
                     600);
    /* 8 payments (the replays write nothing), 3 authorized with 2 entries each, one key and
     * one event per payment; entries in the order applied. */
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE id LIKE '01J0%'"), 8);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM ledger_entries WHERE payment_id"
                                       " LIKE '01J0%'"),
                     6);
    assert_string_equal(scalar(f->db, "SELECT string_agg(payment_id || ':' || entry_type || ':' ||"
                                      " balance_after_cents, ',' ORDER BY id) FROM ledger_entries"
                                      " WHERE payment_id LIKE '01J0%%'"),
                        P(0) ":DEBIT:400," P(0) ":CREDIT:600," P(2) ":DEBIT:99750," P(
                            2) ":CREDIT:50250," P(9) ":DEBIT:50180," P(9) ":CREDIT:470");
    assert_int_equal(
        scalar_i64(f->db, "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'k-%'"), 8);
    assert_int_equal(
        scalar_i64(f->db, "SELECT count(*) FROM outbox WHERE aggregate_id LIKE '01J0%'"), 8);
    assert_string_equal(scalar(f->db, "SELECT description FROM payments WHERE id = '" P(9) "'"),
                        "a \"quoted\", {braced} one");
    assert_string_equal(scalar(f->db, "SELECT encode(fingerprint, 'hex') FROM idempotency_keys"
                                      " WHERE key = 'k-dup'"),
                        FP("3"));

    /* A second batch: stored keys replay (same fingerprint DUPLICATE, other CONFLICT), a
     * declined key replays its decline, a new key executes. */
    const char *again[11] = {
        "{global,global,global,global}",
        "{k-dup,k-a,k-nf,k-new}",
        "{" FP("4") "," FP("1") "," FP("5") "," FP("a") "}",
        "{" P(A) "," P(B) "," P(C) "," P(D) "}",
        "{" E(A) "," E(B) "," E(C) "," E(D) "}",
        "{alice,dave,alice,carol}",
        "{bob,carol,ghost,dave}",
        "{251,600,10,600}",
        "{USD,USD,USD,USD}",
        "{x,x,x,x}",
        "{" TS "," TS "," TS "," TS "}",
    };
    const row_want_t want2[4] = {
        {"CONFLICT", P(2), "AUTHORIZED", "-", "-"},
        {"DUPLICATE", P(0), "AUTHORIZED", "-", "-"},
        {"DUPLICATE", P(5), "DECLINED", "ACCOUNT_NOT_FOUND", "payee account ghost not found"},
        {"NEW", P(D), "AUTHORIZED", "-", "-"},
    };
    run_batch(f, again, want2, 4);
    assert_int_equal(scalar_i64(f->db, "SELECT balance_cents FROM accounts WHERE id = 'dave'"),
                     1000 - 600 + 70 + 600);
    assert_int_equal(scalar_i64(f->db, "SELECT balance_cents FROM accounts WHERE id = 'carol'"), 0);
    ledger_check_passes(f);
}

/* ---- one batch through the server --------------------------------------------------------- */

typedef struct staggered {
    worker_t w;
    int delay_ms;
} staggered_t;

static void *staggered_call(void *arg)
{
    staggered_t *s = arg;
    usleep((useconds_t)s->delay_ms * 1000);
    return one_call(&s->w);
}

static int setup_pool_of_one(void **state)
{
    static const char *const extra[] = {"DB_POOL_SIZE=1", NULL};
    return setup_env(state, extra);
}

/* The only writer is held on a row lock (a payment of "hold" waits for the test's
 * transaction); nine requests mixing every outcome queue behind it meanwhile, so they
 * go as one batch when the lock is released: each gets its own outcome, and the
 * histogram shows that batch of nine. */
static void test_mixed_batch_through_server(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 100);
    open_account(f, "hold", "USD", 10);
    PGconn *locker = connect_url(f->url);
    exec_sql(locker, "BEGIN");
    exec_sql(locker, "SELECT id FROM accounts WHERE id = 'hold' FOR UPDATE");
    staggered_t blocker = {
        .w = {.target = f->pd.target,
              .a = {.key = "mb-hold", .payer = "hold", .payee = "carol", .amount = 1}}};
    pthread_t bt;
    assert_int_equal(pthread_create(&bt, NULL, staggered_call, &blocker), 0);
    /* The blocker waits on the lock (visible in pg_stat_activity) before the others. */
    for (int i = 0; i < 100 && scalar_i64(f->db, "SELECT count(*) FROM pg_stat_activity WHERE"
                                                 " wait_event_type = 'Lock'") == 0;
         i++)
        usleep(50000);
    assert_int_equal(
        scalar_i64(f->db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"),
        1);
    const auth_t reqs[9] = {
        {.key = "mb-v1", .payer = "alice", .payee = "carol", .amount = 1000},
        {.key = "mb-v2", .payer = "bob", .payee = "carol", .amount = 2000},
        {.key = "mb-over", .payer = "dave", .payee = "carol", .amount = 500},
        {.key = "mb-dup", .payer = "alice", .payee = "bob", .amount = 300},
        {.key = "mb-dup", .payer = "alice", .payee = "bob", .amount = 300},
        {.key = "mb-conf", .payer = "bob", .payee = "alice", .amount = 400},
        {.key = "mb-conf", .payer = "bob", .payee = "alice", .amount = 401},
        {.key = "mb-nf", .payer = "ghost", .payee = "carol", .amount = 10},
        {.key = "mb-cur", .payer = "alice", .payee = "erin-eur", .amount = 10},
    };
    staggered_t ws[9];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < 9; i++)
        ws[i] = (staggered_t){.w = {.target = f->pd.target, .a = reqs[i]}, .delay_ms = 20 * i};
    pthread_t th[9];
    for (int i = 0; i < 9; i++)
        assert_int_equal(pthread_create(&th[i], NULL, staggered_call, &ws[i]), 0);
    usleep(1500000); /* all nine queued in the writer behind the blocker */
    exec_sql(locker, "COMMIT");
    PQfinish(locker);
    pthread_join(bt, NULL);
    for (int i = 0; i < 9; i++)
        pthread_join(th[i], NULL);
    expect_ok(&blocker.w.o, ST_AUTHORIZED, 0);
    expect_ok(&ws[0].w.o, ST_AUTHORIZED, 0);
    expect_ok(&ws[1].w.o, ST_AUTHORIZED, 0);
    expect_ok(&ws[2].w.o, ST_DECLINED, E_INSUFFICIENT);
    /* One key twice, one fingerprint: one executes, the other replays it. */
    outcome_t *d1 = &ws[3].w.o, *d2 = &ws[4].w.o;
    assert_int_equal(d1->grpc, GRPC_STATUS_OK);
    assert_int_equal(d2->grpc, GRPC_STATUS_OK);
    assert_int_equal(d1->status + d2->status, ST_AUTHORIZED + ST_DUPLICATE);
    assert_string_equal(d1->payment_id, d2->payment_id);
    assert_string_equal(d1->processed_at, d2->processed_at);
    /* One key, two fingerprints: one executes, the other is ALREADY_EXISTS. */
    outcome_t *c1 = &ws[5].w.o, *c2 = &ws[6].w.o;
    bool first_won = c1->grpc == GRPC_STATUS_OK;
    outcome_t *won = first_won ? c1 : c2, *lost = first_won ? c2 : c1;
    expect_ok(won, ST_AUTHORIZED, 0);
    expect_grpc(lost, GRPC_STATUS_ALREADY_EXISTS,
                "idempotency_key: already used for a different request (payer, payee, "
                "amount_cents or currency differ)");
    int64_t conf = first_won ? 400 : 401;
    expect_ok(&ws[7].w.o, ST_DECLINED, E_NOT_FOUND);
    expect_ok(&ws[8].w.o, ST_DECLINED, E_CURRENCY);
    assert_string_equal(ws[2].w.o.error_message, "insufficient funds in payer account dave");
    assert_string_equal(ws[7].w.o.error_message, "payer account ghost not found");
    assert_int_equal(balance(f->gc, "alice", NULL), 100000 - 1000 - 300 + conf);
    assert_int_equal(balance(f->gc, "bob", NULL), 50000 - 2000 + 300 - conf);
    assert_int_equal(balance(f->gc, "carol", NULL), 1000 + 2000 + 1);
    assert_int_equal(balance(f->gc, "dave", NULL), 100);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE idempotency_key"
                                       " LIKE 'mb-%'"),
                     8);
    ledger_check_passes(f);
    batches_t b;
    stop_and_read_batches(&f->pd, &b);
    /* The blocker alone (1), the nine together (9), then the balance reads (readers). */
    assert_int_equal(b.max, 9);
    assert_int_equal(b.total, 2);
    assert_int_equal(b.single, 1);
}

/* A failing payment (a trigger the test adds raises for description "boom": what a
 * constraint bug would do) makes its batch fail as a whole: the batch is retried split, so
 * its neighbours are applied, the bad one alone ends INTERNAL and stores nothing. */
static void test_failed_batch_is_split(void **state)
{
    fixture_t *f = *state;
    open_account(f, "hold", "USD", 10);
    exec_sql(f->db, "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.description = 'boom' THEN RAISE EXCEPTION 'boom payment'; END IF;"
                    " RETURN NEW; END $$");
    exec_sql(f->db, "CREATE TRIGGER boom BEFORE INSERT ON payments FOR EACH ROW"
                    " EXECUTE FUNCTION boom()");
    PGconn *locker = connect_url(f->url);
    exec_sql(locker, "BEGIN");
    exec_sql(locker, "SELECT id FROM accounts WHERE id = 'hold' FOR UPDATE");
    staggered_t blocker = {
        .w = {.target = f->pd.target,
              .a = {.key = "sp-hold", .payer = "hold", .payee = "carol", .amount = 1}}};
    pthread_t bt;
    assert_int_equal(pthread_create(&bt, NULL, staggered_call, &blocker), 0);
    for (int i = 0; i < 100 && scalar_i64(f->db, "SELECT count(*) FROM pg_stat_activity WHERE"
                                                 " wait_event_type = 'Lock'") == 0;
         i++)
        usleep(50000);
    staggered_t ws[6];
    char keys[6][16];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < 6; i++) {
        snprintf(keys[i], sizeof keys[i], "sp-%d", i);
        ws[i] = (staggered_t){.w = {.target = f->pd.target,
                                    .a = {.key = keys[i],
                                          .payer = "alice",
                                          .payee = "carol",
                                          .amount = 1 + i,
                                          .description = i == 3 ? "boom" : "fine"}},
                              .delay_ms = 20 * i};
    }
    pthread_t th[6];
    for (int i = 0; i < 6; i++)
        assert_int_equal(pthread_create(&th[i], NULL, staggered_call, &ws[i]), 0);
    usleep(1500000);
    exec_sql(locker, "COMMIT");
    PQfinish(locker);
    pthread_join(bt, NULL);
    for (int i = 0; i < 6; i++)
        pthread_join(th[i], NULL);
    expect_ok(&blocker.w.o, ST_AUTHORIZED, 0);
    for (int i = 0; i < 6; i++)
        if (i == 3)
            expect_grpc(&ws[i].w.o, GRPC_STATUS_INTERNAL,
                        "server error: the database refused the request");
        else
            expect_ok(&ws[i].w.o, ST_AUTHORIZED, 0);
    assert_int_equal(balance(f->gc, "carol", NULL), 1 + 1 + 2 + 3 + 5 + 6);
    assert_int_equal(balance(f->gc, "alice", NULL), 100000 - (1 + 2 + 3 + 5 + 6));
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE idempotency_key"
                                       " = 'sp-3'"),
                     0);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM idempotency_keys WHERE key = 'sp-3'"),
                     0);
    ledger_check_passes(f);
    assert_true(pd_log_contains(&f->pd, "a batch of 6 payments failed"));
    assert_true(pd_log_contains(&f->pd, "a batch of 3 payments failed"));
    batches_t b;
    stop_and_read_batches(&f->pd, &b);
    /* 1 (the blocker), 6 (fails), 3 + 3 (the second fails), 1 + 1 + 1. */
    assert_int_equal(b.total, 7);
    assert_int_equal(b.max, 6);
    assert_int_equal(b.single, 4);
}

/* ---- batches under load; two instances -------------------------------------------------- */

static void test_load_forms_batches(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 30000);
    const char *const t[] = {f->pd.target};
    hammer(f, t, 1, 32, 40, ACCOUNTS, 4, 60000);
    batches_t b;
    stop_and_read_batches(&f->pd, &b);
    fprintf(stderr, "load: %llu batches for %d payments, largest %llu, %llu of one\n",
            (unsigned long long)b.total, 32 * 40, (unsigned long long)b.max,
            (unsigned long long)b.single);
    assert_true(b.max > 1);
    assert_true(b.total < 32 * 40);
}

static void test_two_instances_batched(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 30000);
    start_server(f, &f->pd2, &f->gc2, NULL);
    const char *const t[] = {f->pd.target, f->pd2.target};
    hammer(f, t, 2, 32, 30, ACCOUNTS, 4, 60000);
    batches_t b1, b2;
    stop_and_read_batches(&f->pd, &b1);
    stop_and_read_batches(&f->pd2, &b2);
    assert_true(b1.max > 1);
    assert_true(b2.max > 1);
    ledger_check_passes(f);
}

static void test_postmaster_killed_mid_batch(void **state)
{
    fixture_t *f = *state;
    postgres_killed_mid_load(f, KILL_POSTMASTER);
    batches_t b;
    stop_and_read_batches(&f->pd, &b);
    assert_true(b.max > 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_batch_function_outcomes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mixed_batch_through_server, setup_pool_of_one,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_failed_batch_is_split, setup_pool_of_one, teardown),
        cmocka_unit_test_setup_teardown(test_load_forms_batches, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_instances_batched, setup, teardown),
        cmocka_unit_test_setup_teardown(test_postmaster_killed_mid_batch, setup, teardown),
    };
    return cmocka_run_group_tests(tests, stack_up, stack_teardown);
}
