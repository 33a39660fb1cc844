/*
 * ledger_fixture: what test_ledger and test_ledger_batch share (see ledger_fixture.h).
 */
#include "ledger_fixture.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "actors/ledger.h"
#include "actors/ledger_store.h"
#include "grpc/health/v1/health.pb-c.h"

char stack_dir[256];
char base_url[1024];
static int schema_seq;
static lf_config_t config;

void lf_configure(const lf_config_t *cfg)
{
    config = *cfg;
}

/* ---- the stack ------------------------------------------------------------------------- */

void cpy(char *dst, size_t n, const char *src)
{
    size_t len = strnlen(src, n - 1);
    memcpy(dst, src, len);
    dst[len] = '\0';
}

static int vsh(const char *fmt, va_list ap)
{
    char cmd[4096];
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

int sh_status(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vsh(fmt, ap);
    va_end(ap);
    return rc;
}

void sh(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vsh(fmt, ap);
    va_end(ap);
    if (rc != 0)
        fail_msg("shell command failed with status %d", rc);
}

void stack_down(void)
{
    if (!stack_dir[0])
        return;
    if (sh_status("'%s/scripts/stack.sh' down '%s' >/dev/null 2>&1; rm -rf '%s'",
                  getenv("PAY_SOURCE_DIR"), stack_dir, stack_dir) != 0)
        fprintf(stderr, "warning: stopping the stack in %s failed\n", stack_dir);
    stack_dir[0] = '\0';
}

int stack_up(void **state)
{
    (void)state;
    const char *src = getenv("PAY_SOURCE_DIR");
    if (!src || !getenv("PAY_BUILD_DIR")) {
        fprintf(stderr, "PAY_SOURCE_DIR and PAY_BUILD_DIR must be set (CTest sets them)\n");
        return -1;
    }
    snprintf(stack_dir, sizeof stack_dir, "%s", config.stack_template);
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

int stack_teardown(void **state)
{
    (void)state;
    stack_down();
    return 0;
}

/* ---- fixture: a schema, its accounts, a paymentd ---------------------------------------- */

PGconn *connect_url(const char *url)
{
    PGconn *c = NULL;
    char err[512];
    if (pg_connect(&c, url, config.app_name, 10000, err, sizeof err) != 0)
        fail_msg("connect: %s", err);
    return c;
}

void exec_sql(PGconn *c, const char *sql)
{
    char err[768];
    if (pg_exec(c, NULL, sql, 0, NULL, err, sizeof err) != 0)
        fail_msg("%s: %s", sql, err);
}

const char *scalar(PGconn *c, const char *fmt, ...)
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

int64_t scalar_i64(PGconn *c, const char *sql)
{
    return strtoll(scalar(c, "%s", sql), NULL, 10);
}

void open_account(fixture_t *f, const char *id, const char *cur, int64_t fund)
{
    char err[768];
    bool created;
    if (ledger_store_open_account(f->db, &created, id, cur, NULL, err, sizeof err) != 0)
        fail_msg("open %s: %s", id, err);
    if (fund > 0 && ledger_store_fund_account(f->db, NULL, id, fund, 0, err, sizeof err) != 0)
        fail_msg("fund %s: %s", id, err);
}

void start_server(fixture_t *f, pd_proc_t *pd, gc_t **gc, const char *const *extra)
{
    const char *env[16];
    size_t n = 0;
    env[n++] = f->env_url;
    env[n++] = "RATE_LIMIT_ENABLED=false";
    env[n++] = "LOG_LEVEL=INFO";
    for (size_t i = 0; config.server_env && config.server_env[i] && n < 15; i++)
        env[n++] = config.server_env[i];
    for (size_t i = 0; extra && extra[i] && n < 15; i++)
        env[n++] = extra[i];
    env[n] = NULL;
    assert_int_equal(pd_start(pd, env), 0);
    assert_int_equal(gc_connect(gc, pd->target), 0);
}

int setup_env(void **state, const char *const *extra)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    char sql[256], err[768];
    snprintf(f->schema, sizeof f->schema, "%s_%d_%d", config.schema_prefix, (int)getpid(),
             ++schema_seq);
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

int setup(void **state)
{
    return setup_env(state, NULL);
}

int setup_pool_of_one(void **state)
{
    static const char *const extra[] = {"DB_POOL_SIZE=1", NULL};
    return setup_env(state, extra);
}

int teardown(void **state)
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

void authorize_on(gc_t *gc, const auth_t *a, int timeout_ms, outcome_t *o)
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

void expect_ok(const outcome_t *o, int status, int code)
{
    if (o->grpc != GRPC_STATUS_OK)
        fail_msg("gRPC status %d (%s), expected OK", o->grpc, o->details);
    assert_int_equal(o->status, status);
    assert_int_equal(o->error_code, code);
    assert_int_equal(o->has_error, code != 0);
}

int64_t balance(gc_t *gc, const char *account, char *currency)
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

void ledger_check_passes(fixture_t *f)
{
    int rc = sh_status("DATABASE_URL='%s' '%s/paymentctl' ledger check >'%s/check.out' 2>&1",
                       f->url, getenv("PAY_BUILD_DIR"), stack_dir);
    if (rc != 0) {
        sh_status("cat '%s/check.out' >&2", stack_dir);
        fail_msg("paymentctl ledger check exited %d", rc);
    }
}

int64_t customer_total(fixture_t *f)
{
    return scalar_i64(f->db, "SELECT coalesce(sum(balance_cents), 0) FROM accounts"
                             " WHERE kind = 'customer'");
}

void *one_call(void *arg)
{
    worker_t *w = arg;
    gc_t *gc;
    if (gc_connect(&gc, w->target) != 0)
        return NULL;
    authorize_on(gc, &w->a, 30000, &w->o);
    gc_close(gc);
    return NULL;
}

void run_parallel(worker_t *ws, int n, void *(*fn)(void *))
{
    pthread_t *t = calloc((size_t)n, sizeof(*t));
    for (int i = 0; i < n; i++)
        assert_int_equal(pthread_create(&t[i], NULL, fn, &ws[i]), 0);
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    free(t);
}

void *random_load(void *arg)
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
void hammer(fixture_t *f, const char *const *targets, int ntargets, int nthreads, int calls,
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

const char *const ACCOUNTS[4] = {"alice", "bob", "carol", "dave"};

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
#define CHAOS_MAX_WORKERS 16

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

int health(gc_t *gc)
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
int64_t wait_health(gc_t *gc, int want, int64_t ms)
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
void postgres_back(void)
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

void postgres_killed_mid_load(fixture_t *f, outage_t how, int nworkers)
{
    const char *src = getenv("PAY_SOURCE_DIR");
    chaos_t c = {.target = f->pd.target, .cap = 100000};
    pthread_mutex_init(&c.mu, NULL);
    c.acked = calloc(c.cap, sizeof(*c.acked));
    const int n = nworkers;
    chaos_worker_t ws[CHAOS_MAX_WORKERS];
    pthread_t th[CHAOS_MAX_WORKERS];
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
