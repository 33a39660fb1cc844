/*
 * test_ledger: the ledger (issue 4) end to end: a real build/paymentd against the real
 * PostgreSQL of scripts/stack.sh (started in a temporary directory, stopped at exit),
 * through a real gRPC client. Each test runs in a fresh schema of its own (selected with
 * the URL's search_path), with its own paymentd; accounts are opened and funded with the
 * ledger's synchronous store (what paymentctl uses).
 *
 * Covered: the full flow (balances, replay with and without description, GetPayment, the
 * rows and the event written); every decline in its precedence, recorded with its event;
 * INVALID_ARGUMENT through the server storing nothing; ALREADY_EXISTS; declined keys
 * replay; client-scoped keys; an expired key; 5 concurrent overdrafts; 50 concurrent
 * requests with one key; opposite-direction transfers; thousands of random transfers on
 * one and on two instances (ledger check passes, money is conserved); PostgreSQL stopped
 * mid-load and started again (UNAVAILABLE within the deadline, health follows, nothing
 * acknowledged lost, recovery by itself); a connection terminated while a payment waits
 * (outcome unknown: UNAVAILABLE, the retry executes it once); paymentd started before
 * PostgreSQL; DB_POOL_SIZE=1; build/payment-cli against the server.
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
    snprintf(stack_dir, sizeof stack_dir, "/tmp/pay-test-ledger.XXXXXX");
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
    if (pg_connect(&c, url, "test_ledger", 10000, err, sizeof err) != 0)
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
    snprintf(f->schema, sizeof f->schema, "tl_%d_%d", (int)getpid(), ++schema_seq);
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

static int setup_small_max(void **state)
{
    static const char *const extra[] = {"MAX_AMOUNT_CENTS=1000000", NULL};
    return setup_env(state, extra);
}

static int setup_client_scope(void **state)
{
    static const char *const extra[] = {"IDEMPOTENCY_SCOPE=client", NULL};
    return setup_env(state, extra);
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

static void authorize(fixture_t *f, const auth_t *a, outcome_t *o)
{
    authorize_on(f->gc, a, 10000, o);
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

static bool matches(const char *re, const char *s)
{
    regex_t rx;
    assert_int_equal(regcomp(&rx, re, REG_EXTENDED | REG_NOSUB), 0);
    bool ok = regexec(&rx, s, 0, NULL, 0) == 0;
    regfree(&rx);
    return ok;
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

static void test_full_flow(void **state)
{
    fixture_t *f = *state;
    auth_t a = {
        .key = "flow-1", .payer = "alice", .payee = "bob", .amount = 2500, .description = "dinner"};
    outcome_t o, d;
    authorize(f, &a, &o);
    expect_ok(&o, ST_AUTHORIZED, 0);
    assert_true(matches(ULID_RE, o.payment_id));
    assert_true(matches(TS_RE, o.processed_at));
    char cur[4];
    assert_int_equal(balance(f->gc, "alice", cur), 97500);
    assert_string_equal(cur, "USD");
    assert_int_equal(balance(f->gc, "bob", NULL), 52500);

    /* Replays: same id and processed_at, no error; without the description too. */
    authorize(f, &a, &d);
    expect_ok(&d, ST_DUPLICATE, 0);
    assert_string_equal(d.payment_id, o.payment_id);
    assert_string_equal(d.processed_at, o.processed_at);
    a.description = NULL;
    authorize(f, &a, &d);
    expect_ok(&d, ST_DUPLICATE, 0);
    assert_string_equal(d.payment_id, o.payment_id);
    assert_string_equal(d.processed_at, o.processed_at);
    assert_int_equal(balance(f->gc, "alice", NULL), 97500);
    assert_int_equal(balance(f->gc, "bob", NULL), 52500);

    /* GetPayment: the stored fields. */
    Payment__V1__GetPaymentRequest gp = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
    gp.payment_id = o.payment_id;
    gc_result_t r;
    assert_int_equal(gc_unary_msg(f->gc, GET_PAYMENT, &gp.base, 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_OK);
    Payment__V1__GetPaymentResponse *gr =
        payment__v1__get_payment_response__unpack(NULL, r.body_len, r.body);
    assert_non_null(gr);
    assert_non_null(gr->payment);
    assert_string_equal(gr->payment->payment_id, o.payment_id);
    assert_string_equal(gr->payment->payer_account_id, "alice");
    assert_string_equal(gr->payment->payee_account_id, "bob");
    assert_int_equal(gr->payment->amount_cents, 2500);
    assert_string_equal(gr->payment->currency, "USD");
    assert_int_equal(gr->payment->status, ST_AUTHORIZED);
    assert_string_equal(gr->payment->description, "dinner");
    assert_string_equal(gr->payment->created_at, o.processed_at);
    assert_string_equal(gr->payment->updated_at, o.processed_at);
    payment__v1__get_payment_response__free_unpacked(gr, NULL);
    gc_result_free(&r);

    /* What was written: two entries with balances after, one event with its envelope. */
    assert_string_equal(scalar(f->db,
                               "SELECT string_agg(entry_type || ' ' || account_id || ' ' ||"
                               " amount_cents || ' ' || balance_after_cents, ', ' ORDER BY id)"
                               " FROM ledger_entries WHERE payment_id = '%s'",
                               o.payment_id),
                        "DEBIT alice 2500 97500, CREDIT bob 2500 52500");
    char want[160];
    snprintf(want, sizeof want, "PaymentAuthorized true %s", o.processed_at);
    assert_string_equal(scalar(f->db,
                               "SELECT event_type || ' ' || (payload = jsonb_build_object("
                               "'payment_id', aggregate_id, 'payer_account_id', 'alice',"
                               " 'payee_account_id', 'bob', 'amount_cents', 2500,"
                               " 'currency', 'USD'))::text || ' ' ||"
                               " (outbox_envelope(o) ->> 'timestamp')"
                               " FROM outbox o WHERE aggregate_id = '%s'",
                               o.payment_id),
                        want);
    /* The fingerprint, computed independently: SHA-256 of the length-prefixed fields. */
    assert_string_equal(
        scalar(f->db, "SELECT status || ' ' || payment_id || ' ' || (fingerprint = sha256("
                      "int4send(5) || convert_to('alice', 'UTF8') || int4send(3) ||"
                      " convert_to('bob', 'UTF8') || int4send(4) || convert_to('2500', 'UTF8')"
                      " || int4send(3) || convert_to('USD', 'UTF8')))::text ||"
                      " ' ' || pay_format_ts(processed_at)"
                      " FROM idempotency_keys WHERE scope = 'global' AND key = 'flow-1'"),
        (snprintf(want, sizeof want, "AUTHORIZED %s true %s", o.payment_id, o.processed_at), want));
    uint8_t fp[32];
    ledger_fingerprint(fp, "alice", "bob", 2500, "USD");
    char fphex[80] = "\\x";
    for (int i = 0; i < 32; i++)
        snprintf(fphex + 2 + 2 * i, 3, "%02x", fp[i]);
    assert_string_equal(scalar(f->db, "SELECT fingerprint::text FROM idempotency_keys"
                                      " WHERE key = 'flow-1'"),
                        fphex);
    ledger_check_passes(f);
}

/* ---- declines --------------------------------------------------------------------------- */

/* A decline: its code and message, recorded as a DECLINED payment with an event and no
 * entries; the key replays it as DUPLICATE with the same error. */
static void expect_decline(fixture_t *f, const auth_t *a, int code, const char *text)
{
    outcome_t o, d;
    authorize(f, a, &o);
    expect_ok(&o, ST_DECLINED, code);
    assert_string_equal(o.error_message, text);
    assert_true(matches(ULID_RE, o.payment_id));
    char want[600];
    snprintf(want, sizeof want, "DECLINED %s %s %" PRId64 " 0 PaymentDeclined true", a->payer,
             a->payee, a->amount);
    assert_string_equal(
        scalar(f->db,
               "SELECT p.status || ' ' || p.payer_account_id || ' ' || p.payee_account_id || ' '"
               " || p.amount_cents || ' ' || (SELECT count(*) FROM ledger_entries e"
               " WHERE e.payment_id = p.id) || ' ' || o.event_type || ' ' ||"
               " (o.payload ->> 'error_message' = p.error_message AND"
               "  o.payload ->> 'error_code' = p.error_code AND p.error_message = '%s')::text"
               " FROM payments p JOIN outbox o ON o.aggregate_id = p.id WHERE p.id = '%s'",
               text, o.payment_id),
        want);
    authorize(f, a, &d);
    expect_ok(&d, ST_DUPLICATE, code);
    assert_string_equal(d.payment_id, o.payment_id);
    assert_string_equal(d.processed_at, o.processed_at);
    assert_string_equal(d.error_message, text);
}

static void test_declines_in_order(void **state)
{
    fixture_t *f = *state;
    int64_t total = customer_total(f);
    /* Each case also breaks every later rule, so the order is what decides. */
    auth_t a = {
        .key = "d-amount0", .payer = "ghost", .payee = "ghost", .amount = 0, .currency = "JPY"};
    expect_decline(f, &a, E_AMOUNT, "amount_cents must be between 1 and 1000000, got 0");
    a = (auth_t){.key = "d-amount-neg", .payer = "alice", .payee = "bob", .amount = -5};
    expect_decline(f, &a, E_AMOUNT, "amount_cents must be between 1 and 1000000, got -5");
    a = (auth_t){.key = "d-amount-max", .payer = "alice", .payee = "alice", .amount = 1000001};
    expect_decline(f, &a, E_AMOUNT, "amount_cents must be between 1 and 1000000, got 1000001");
    a = (auth_t){
        .key = "d-same", .payer = "ghost", .payee = "ghost", .amount = 10, .currency = "JPY"};
    expect_decline(f, &a, E_SAME, "payer and payee are the same account ghost");
    a = (auth_t){
        .key = "d-payer", .payer = "ghost", .payee = "phantom", .amount = 10, .currency = "JPY"};
    expect_decline(f, &a, E_NOT_FOUND, "payer account ghost not found");
    a = (auth_t){
        .key = "d-payee", .payer = "carol", .payee = "phantom", .amount = 10, .currency = "JPY"};
    expect_decline(f, &a, E_NOT_FOUND, "payee account phantom not found");
    a = (auth_t){.key = "d-cur-payer",
                 .payer = "carol",
                 .payee = "erin-eur",
                 .amount = 10,
                 .currency = "EUR"};
    expect_decline(f, &a, E_CURRENCY, "currency EUR does not match payer account carol (USD)");
    a = (auth_t){.key = "d-cur-payee",
                 .payer = "carol",
                 .payee = "erin-eur",
                 .amount = 10,
                 .currency = "USD"};
    expect_decline(f, &a, E_CURRENCY, "currency USD does not match payee account erin-eur (EUR)");
    a = (auth_t){.key = "d-funds", .payer = "carol", .payee = "bob", .amount = 1};
    expect_decline(f, &a, E_INSUFFICIENT, "insufficient funds in payer account carol");
    a = (auth_t){.key = "d-funds2", .payer = "bob", .payee = "alice", .amount = 50001};
    expect_decline(f, &a, E_INSUFFICIENT, "insufficient funds in payer account bob");
    /* System accounts cannot be used through the API. */
    a = (auth_t){.key = "d-sys", .payer = "sys:funding:USD", .payee = "bob", .amount = 1};
    expect_decline(f, &a, E_NOT_FOUND, "payer account sys:funding:USD not found");
    /* Exactly the whole balance is fine. */
    outcome_t o;
    a = (auth_t){.key = "d-exact", .payer = "bob", .payee = "carol", .amount = 50000};
    authorize(f, &a, &o);
    expect_ok(&o, ST_AUTHORIZED, 0);
    assert_int_equal(balance(f->gc, "bob", NULL), 0);
    assert_int_equal(balance(f->gc, "carol", NULL), 50000);
    assert_int_equal(customer_total(f), total);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE status = 'DECLINED'"),
                     11);
    ledger_check_passes(f);
}

/* ---- errors that store nothing ---------------------------------------------------------- */

static void expect_grpc(const outcome_t *o, grpc_status_code code, const char *details)
{
    if (o->grpc != code)
        fail_msg("gRPC status %d (%s), expected %d", o->grpc, o->details, code);
    assert_string_equal(o->details, details);
}

static void test_errors_store_nothing(void **state)
{
    fixture_t *f = *state;
    outcome_t o;
    auth_t a = {.key = "", .payer = "alice", .payee = "bob", .amount = 1};
    authorize(f, &a, &o);
    expect_grpc(&o, GRPC_STATUS_INVALID_ARGUMENT,
                "idempotency_key: must be 1-255 printable ASCII characters");
    a = (auth_t){.key = "e1", .payer = "al ice", .payee = "bob", .amount = 1};
    authorize(f, &a, &o);
    assert_int_equal(o.grpc, GRPC_STATUS_INVALID_ARGUMENT);
    assert_true(strncmp(o.details, "payer_account_id: ", 18) == 0);
    a = (auth_t){.key = "e1", .payer = "alice", .payee = "", .amount = 1};
    authorize(f, &a, &o);
    assert_int_equal(o.grpc, GRPC_STATUS_INVALID_ARGUMENT);
    assert_true(strncmp(o.details, "payee_account_id: ", 18) == 0);
    a = (auth_t){.key = "e1", .payer = "alice", .payee = "bob", .amount = 1, .currency = "usd"};
    authorize(f, &a, &o);
    assert_int_equal(o.grpc, GRPC_STATUS_INVALID_ARGUMENT);
    assert_true(strncmp(o.details, "currency: ", 10) == 0);

    /* ALREADY_EXISTS: the key is taken by another request; nothing changes. */
    a = (auth_t){.key = "e-taken", .payer = "alice", .payee = "bob", .amount = 100};
    authorize(f, &a, &o);
    expect_ok(&o, ST_AUTHORIZED, 0);
    char first[32];
    snprintf(first, sizeof first, "%s", o.payment_id);
    const char *diff = "idempotency_key: already used for a different request (payer, payee, "
                       "amount_cents or currency differ)";
    a.amount = 101;
    authorize(f, &a, &o);
    expect_grpc(&o, GRPC_STATUS_ALREADY_EXISTS, diff);
    a.amount = 100;
    a.payee = "carol";
    authorize(f, &a, &o);
    expect_grpc(&o, GRPC_STATUS_ALREADY_EXISTS, diff);
    /* The description is not part of the fingerprint. */
    a.payee = "bob";
    a.description = "other words";
    authorize(f, &a, &o);
    expect_ok(&o, ST_DUPLICATE, 0);
    assert_string_equal(o.payment_id, first);

    /* Reads: malformed and unknown. */
    gc_result_t r;
    Payment__V1__GetPaymentRequest gp = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
    gp.payment_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    assert_int_equal(gc_unary_msg(f->gc, GET_PAYMENT, &gp.base, 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_NOT_FOUND);
    assert_string_equal(r.details, "payment 01ARZ3NDEKTSV4RRFFQ69G5FAV not found");
    gc_result_free(&r);
    gp.payment_id = "01arz3ndektsv4rrffq69g5fav";
    assert_int_equal(gc_unary_msg(f->gc, GET_PAYMENT, &gp.base, 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_INVALID_ARGUMENT);
    gc_result_free(&r);
    Payment__V1__GetAccountBalanceRequest gb = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    gb.account_id = "nobody";
    assert_int_equal(gc_unary_msg(f->gc, GET_BALANCE, &gb.base, 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_NOT_FOUND);
    assert_string_equal(r.details, "account nobody not found");
    gc_result_free(&r);
    gb.account_id = "";
    assert_int_equal(gc_unary_msg(f->gc, GET_BALANCE, &gb.base, 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_INVALID_ARGUMENT);
    gc_result_free(&r);

    /* Only the one authorized payment was stored, with its key and event. */
    assert_string_equal(scalar(f->db, "SELECT (SELECT count(*) FROM payments WHERE"
                                      " idempotency_key IS NOT NULL) || ' ' ||"
                                      " (SELECT count(*) FROM idempotency_keys) || ' ' ||"
                                      " (SELECT count(*) FROM outbox)"),
                        "1 1 4"); /* + the 3 funding events */
    assert_int_equal(balance(f->gc, "alice", NULL), 99900);
}

/* ---- idempotency scope and expiry ------------------------------------------------------- */

static void test_client_scope(void **state)
{
    fixture_t *f = *state;
    outcome_t o1, o2, o3, o4;
    auth_t a = {.key = "k", .payer = "alice", .payee = "bob", .amount = 10, .client_id = "c1"};
    authorize(f, &a, &o1);
    expect_ok(&o1, ST_AUTHORIZED, 0);
    a.client_id = "c2";
    authorize(f, &a, &o2);
    expect_ok(&o2, ST_AUTHORIZED, 0);
    assert_string_not_equal(o1.payment_id, o2.payment_id);
    a.client_id = "c1";
    authorize(f, &a, &o3);
    expect_ok(&o3, ST_DUPLICATE, 0);
    assert_string_equal(o3.payment_id, o1.payment_id);
    /* Without x-client-id the identity is the peer's address. */
    a.client_id = NULL;
    authorize(f, &a, &o4);
    expect_ok(&o4, ST_AUTHORIZED, 0);
    authorize(f, &a, &o3);
    expect_ok(&o3, ST_DUPLICATE, 0);
    assert_string_equal(o3.payment_id, o4.payment_id);
    assert_string_equal(scalar(f->db, "SELECT string_agg(scope, ',' ORDER BY scope)"
                                      " FROM idempotency_keys"),
                        "client:c1,client:c2,ip:127.0.0.1");
    assert_int_equal(balance(f->gc, "bob", NULL), 50030);
    ledger_check_passes(f);
}

static void test_expired_key(void **state)
{
    fixture_t *f = *state;
    outcome_t o1, o2;
    auth_t a = {.key = "old", .payer = "alice", .payee = "bob", .amount = 10};
    authorize(f, &a, &o1);
    expect_ok(&o1, ST_AUTHORIZED, 0);
    assert_string_equal(scalar(f->db, "SELECT (expires_at - processed_at)::text FROM"
                                      " idempotency_keys WHERE key = 'old'"),
                        "1 day");
    /* Past its TTL the key is as good as purged: a new payment. */
    exec_sql(f->db, "UPDATE idempotency_keys SET processed_at = processed_at - interval '25h',"
                    " expires_at = expires_at - interval '25h'");
    exec_sql(f->db, "UPDATE payments SET idempotency_expires_at = idempotency_expires_at -"
                    " interval '25h', created_at = created_at - interval '25h'"
                    " WHERE idempotency_key = 'old'");
    authorize(f, &a, &o2);
    expect_ok(&o2, ST_AUTHORIZED, 0);
    assert_string_not_equal(o1.payment_id, o2.payment_id);
    assert_int_equal(balance(f->gc, "bob", NULL), 50020);
    /* The maintenance duty purges expired keys (at connect, then periodically): restart. */
    exec_sql(f->db, "UPDATE idempotency_keys SET expires_at = now() - interval '1s',"
                    " processed_at = now() - interval '2s'");
    int status;
    pd_signal(&f->pd, SIGTERM);
    assert_int_equal(pd_wait(&f->pd, 20000, &status), 0);
    pd_cleanup(&f->pd);
    gc_close(f->gc);
    start_server(f, &f->pd, &f->gc, NULL);
    int64_t left = 1;
    for (int i = 0; i < 100 && left != 0; i++) {
        left = scalar_i64(f->db, "SELECT count(*) FROM idempotency_keys");
        if (left)
            usleep(50000);
    }
    assert_int_equal(left, 0);
    ledger_check_passes(f);
}

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

static void test_concurrent_overdraft(void **state)
{
    fixture_t *f = *state;
    int64_t amount = 100000 / 2 + 100;
    worker_t ws[5];
    memset(ws, 0, sizeof ws);
    char keys[5][16];
    for (int i = 0; i < 5; i++) {
        snprintf(keys[i], sizeof keys[i], "over-%d", i);
        ws[i] =
            (worker_t){.f = f,
                       .target = f->pd.target,
                       .a = {.key = keys[i], .payer = "alice", .payee = "carol", .amount = amount}};
    }
    run_parallel(ws, 5, one_call);
    int ok = 0, nsf = 0;
    for (int i = 0; i < 5; i++) {
        assert_int_equal(ws[i].o.grpc, GRPC_STATUS_OK);
        if (ws[i].o.status == ST_AUTHORIZED)
            ok++;
        else if (ws[i].o.status == ST_DECLINED && ws[i].o.error_code == E_INSUFFICIENT)
            nsf++;
    }
    assert_int_equal(ok, 1);
    assert_int_equal(nsf, 4);
    assert_int_equal(balance(f->gc, "alice", NULL), 100000 - amount);
    assert_int_equal(balance(f->gc, "carol", NULL), amount);
    ledger_check_passes(f);
}

static void test_concurrent_same_key(void **state)
{
    fixture_t *f = *state;
    worker_t ws[50];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < 50; i++)
        ws[i] =
            (worker_t){.f = f,
                       .target = f->pd.target,
                       .a = {.key = "one-key", .payer = "bob", .payee = "carol", .amount = 777}};
    run_parallel(ws, 50, one_call);
    int ok = 0, dup = 0;
    const char *id = NULL;
    for (int i = 0; i < 50; i++) {
        if (ws[i].o.grpc != GRPC_STATUS_OK)
            fail_msg("call %d: status %d (%s)", i, ws[i].o.grpc, ws[i].o.details);
        if (ws[i].o.status == ST_AUTHORIZED)
            ok++;
        if (ws[i].o.status == ST_DUPLICATE)
            dup++;
        if (!id)
            id = ws[i].o.payment_id;
        assert_string_equal(ws[i].o.payment_id, id);
    }
    assert_int_equal(ok, 1);
    assert_int_equal(dup, 49);
    assert_int_equal(balance(f->gc, "bob", NULL), 50000 - 777);
    assert_int_equal(balance(f->gc, "carol", NULL), 777);
    assert_int_equal(
        scalar_i64(f->db, "SELECT count(*) FROM payments WHERE idempotency_key = 'one-key'"), 1);
    ledger_check_passes(f);
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

static void test_opposite_directions(void **state)
{
    fixture_t *f = *state;
    /* Two accounts only: every pair of concurrent payments crosses or collides. */
    const char *const two[] = {"alice", "bob"};
    const char *const t[] = {f->pd.target};
    hammer(f, t, 1, 8, 60, two, 2, 40000);
}

static void test_random_transfers(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 30000);
    const char *const t[] = {f->pd.target};
    hammer(f, t, 1, 16, 150, ACCOUNTS, 4, 60000);
}

static void test_two_instances(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 30000);
    start_server(f, &f->pd2, &f->gc2, NULL);
    const char *const t[] = {f->pd.target, f->pd2.target};
    hammer(f, t, 2, 16, 100, ACCOUNTS, 4, 60000);
    /* One key on both instances at once: one payment. */
    worker_t ws[40];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < 40; i++)
        ws[i] =
            (worker_t){.f = f,
                       .target = t[i % 2],
                       .a = {.key = "two-one-key", .payer = "alice", .payee = "dave", .amount = 1}};
    int64_t dave = balance(f->gc, "dave", NULL);
    run_parallel(ws, 40, one_call);
    int ok = 0, dup = 0;
    for (int i = 0; i < 40; i++) {
        assert_int_equal(ws[i].o.grpc, GRPC_STATUS_OK);
        ok += ws[i].o.status == ST_AUTHORIZED || ws[i].o.status == ST_DECLINED;
        dup += ws[i].o.status == ST_DUPLICATE;
        assert_string_equal(ws[i].o.payment_id, ws[0].o.payment_id);
    }
    assert_int_equal(ok, 1);
    assert_int_equal(dup, 39);
    int64_t moved = balance(f->gc2, "dave", NULL) - dave;
    assert_true(moved == 0 || moved == 1);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE"
                                       " idempotency_key = 'two-one-key'"),
                     1);
    ledger_check_passes(f);
}

static int health(gc_t *gc);

/* ---- the connection lost while a payment runs ------------------------------------------ */

typedef struct pending_call {
    const char *target;
    auth_t a;
    outcome_t o;
    int64_t ms;
} pending_call_t;

static void *pending_call(void *arg)
{
    pending_call_t *p = arg;
    gc_t *gc;
    if (gc_connect(&gc, p->target) != 0)
        return NULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    authorize_on(gc, &p->a, 20000, &p->o);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    p->ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    gc_close(gc);
    return NULL;
}

/* A payment waits on a row lock held by the test; its connection is terminated: the
 * outcome is unknown to the server, so the call ends UNAVAILABLE (never a guess), the
 * actor reconnects by itself, and the client's retry with the same key executes it once. */
static void test_connection_lost_mid_payment(void **state)
{
    fixture_t *f = *state;
    PGconn *locker = connect_url(f->url);
    exec_sql(locker, "BEGIN; SELECT 1 FROM accounts WHERE id = 'alice' FOR UPDATE");
    pending_call_t p = {.target = f->pd.target,
                        .a = {.key = "lost-1", .payer = "alice", .payee = "bob", .amount = 300}};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, pending_call, &p), 0);
    /* Wait until the payment's statement waits for the lock. */
    int64_t waiting = 0;
    for (int i = 0; i < 200 && waiting == 0; i++) {
        waiting = scalar_i64(f->db, "SELECT count(*) FROM pg_stat_activity WHERE"
                                    " application_name = 'paymentd-ledger' AND wait_event_type ="
                                    " 'Lock' AND query LIKE '%ledger_authorize%'");
        if (!waiting)
            usleep(25000);
    }
    assert_int_equal(waiting, 1);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM (SELECT pg_terminate_backend(pid)"
                                       " FROM pg_stat_activity WHERE application_name ="
                                       " 'paymentd-ledger') t"),
                     4);
    pthread_join(th, NULL);
    expect_grpc(&p.o, GRPC_STATUS_UNAVAILABLE,
                "database connection lost before the payment's outcome was known; retry with "
                "the same idempotency_key");
    assert_true(p.ms < 5000);
    exec_sql(locker, "ROLLBACK");
    PQfinish(locker);
    /* Nothing was stored (the server rolled back); the retry executes it once. */
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE"
                                       " idempotency_key = 'lost-1'"),
                     0);
    outcome_t o;
    for (int i = 0; i < 100; i++) { /* until the actor is back (backoff from 100 ms) */
        authorize(f, &p.a, &o);
        if (o.grpc != GRPC_STATUS_UNAVAILABLE)
            break;
        usleep(50000);
    }
    expect_ok(&o, ST_AUTHORIZED, 0);
    authorize(f, &p.a, &o);
    expect_ok(&o, ST_DUPLICATE, 0);
    assert_int_equal(balance(f->gc, "alice", NULL), 100000 - 300);
    assert_int_equal(health(f->gc),
                     GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    ledger_check_passes(f);
}

/* ---- payment-cli ------------------------------------------------------------------------ */

/* Runs a shell command; its exit status, stdout in out. */
static int run_capture(char *out, size_t outlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int run_capture(char *out, size_t outlen, const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, outlen - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static void test_payment_cli(void **state)
{
    fixture_t *f = *state;
    const char *cli_dir = getenv("PAY_BUILD_DIR");
    char out[4096], want[4096], id[32], at[48];
    int rc = run_capture(out, sizeof out,
                         "'%s/payment-cli' --addr %s authorize --key cli-1 --payer alice"
                         " --payee bob --amount 150 --currency USD --description 'tea \"x\"'",
                         cli_dir, f->pd.target);
    assert_int_equal(rc, 0);
    assert_int_equal(sscanf(out, "{\n  \"payment_id\": \"%26[0-9A-Z]\",", id), 1);
    const char *pa = strstr(out, "\"processed_at\": \"");
    assert_non_null(pa);
    assert_int_equal(sscanf(pa, "\"processed_at\": \"%32[^\"]\"", at), 1);
    snprintf(want, sizeof want,
             "{\n  \"payment_id\": \"%s\",\n  \"status\": \"PAYMENT_STATUS_AUTHORIZED\",\n"
             "  \"processed_at\": \"%s\"\n}\n",
             id, at);
    assert_string_equal(out, want);
    assert_true(matches(TS_RE, at));

    rc = run_capture(out, sizeof out,
                     "'%s/payment-cli' --addr %s authorize --key cli-2 --payer carol --payee bob"
                     " --amount 1 --currency USD",
                     cli_dir, f->pd.target);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(out, "\"status\": \"PAYMENT_STATUS_DECLINED\",\n  \"error\":"
                                " {\"code\": \"PAYMENT_ERROR_CODE_INSUFFICIENT_FUNDS\","
                                " \"message\": \"insufficient funds in payer account carol\"},"));

    rc = run_capture(out, sizeof out, "'%s/payment-cli' --addr %s balance alice", cli_dir,
                     f->pd.target);
    assert_int_equal(rc, 0);
    assert_string_equal(out, "{\n  \"account_id\": \"alice\",\n"
                             "  \"available_balance_cents\": 99850,\n"
                             "  \"pending_balance_cents\": 0,\n  \"currency\": \"USD\"\n}\n");

    rc = run_capture(out, sizeof out, "'%s/payment-cli' --addr %s get-payment %s", cli_dir,
                     f->pd.target, id);
    assert_int_equal(rc, 0);
    snprintf(want, sizeof want,
             "{\n  \"payment\": {\n    \"payment_id\": \"%s\",\n"
             "    \"payer_account_id\": \"alice\",\n    \"payee_account_id\": \"bob\",\n"
             "    \"amount_cents\": 150,\n    \"currency\": \"USD\",\n"
             "    \"status\": \"PAYMENT_STATUS_AUTHORIZED\",\n"
             "    \"description\": \"tea \\\"x\\\"\",\n"
             "    \"created_at\": \"%s\",\n    \"updated_at\": \"%s\"\n  }\n}\n",
             id, at, at);
    assert_string_equal(out, want);

    /* Errors: gRPC status on stderr, exit 1; usage, exit 2. */
    rc = run_capture(out, sizeof out, "'%s/payment-cli' --addr %s balance nobody 2>&1", cli_dir,
                     f->pd.target);
    assert_int_equal(rc, 1);
    assert_string_equal(out, "payment-cli: NOT_FOUND: account nobody not found\n");
    rc = run_capture(out, sizeof out,
                     "'%s/payment-cli' --addr %s authorize --key k --payer a --payee b"
                     " --currency USD 2>&1",
                     cli_dir, f->pd.target);
    assert_int_equal(rc, 2);
    assert_non_null(strstr(out, "payment-cli: authorize: --amount is required\n"));
}

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
    const int n = 6;
    chaos_worker_t ws[6];
    pthread_t th[6];
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

static void test_postgres_stopped_mid_load(void **state)
{
    postgres_killed_mid_load(*state, STOP_FAST);
}

static void test_postmaster_killed_mid_load(void **state)
{
    postgres_killed_mid_load(*state, KILL_POSTMASTER);
}

/* paymentd started while PostgreSQL is down: it listens, reports NOT_SERVING, answers
 * UNAVAILABLE, and migrates and serves by itself once PostgreSQL is back. */
static void test_starts_before_postgres(void **state)
{
    fixture_t *f = *state;
    const char *src = getenv("PAY_SOURCE_DIR");
    int status;
    pd_signal(&f->pd, SIGTERM);
    assert_int_equal(pd_wait(&f->pd, 20000, &status), 0);
    pd_cleanup(&f->pd);
    gc_close(f->gc);
    f->gc = NULL;
    PQfinish(f->db);
    f->db = NULL;
    sh("'%s/scripts/stack.sh' pg-stop '%s' >>'%s/drill.log' 2>&1", src, stack_dir, stack_dir);
    start_server(f, &f->pd, &f->gc, NULL);
    assert_int_equal(health(f->gc),
                     GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
    outcome_t o;
    auth_t a = {.key = "early", .payer = "alice", .payee = "bob", .amount = 5};
    authorize(f, &a, &o);
    expect_grpc(&o, GRPC_STATUS_UNAVAILABLE, "database not ready (schema); retry");
    postgres_back();
    assert_true(wait_health(f->gc, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING,
                            20000) >= 0);
    authorize(f, &a, &o);
    expect_ok(&o, ST_AUTHORIZED, 0);
    f->db = connect_url(f->url);
    assert_int_equal(balance(f->gc, "bob", NULL), 50005);
    ledger_check_passes(f);
}

/* DB_POOL_SIZE=1: one actor writes, reads and purges. */
static int setup_pool_of_one(void **state)
{
    static const char *const extra[] = {"DB_POOL_SIZE=1", NULL};
    return setup_env(state, extra);
}

static void test_pool_of_one(void **state)
{
    fixture_t *f = *state;
    outcome_t o;
    auth_t a = {.key = "p1", .payer = "alice", .payee = "carol", .amount = 1234};
    authorize(f, &a, &o);
    expect_ok(&o, ST_AUTHORIZED, 0);
    assert_int_equal(balance(f->gc, "alice", NULL), 100000 - 1234);
    assert_int_equal(balance(f->gc, "carol", NULL), 1234);
    authorize(f, &a, &o);
    expect_ok(&o, ST_DUPLICATE, 0);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM pg_stat_activity WHERE"
                                       " application_name = 'paymentd-ledger'"),
                     1);
    ledger_check_passes(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_full_flow, setup, teardown),
        cmocka_unit_test_setup_teardown(test_declines_in_order, setup_small_max, teardown),
        cmocka_unit_test_setup_teardown(test_errors_store_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_scope, setup_client_scope, teardown),
        cmocka_unit_test_setup_teardown(test_expired_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_overdraft, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_same_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_opposite_directions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_random_transfers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_instances, setup, teardown),
        cmocka_unit_test_setup_teardown(test_payment_cli, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connection_lost_mid_payment, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pool_of_one, setup_pool_of_one, teardown),
        /* Last: they stop and restart the stack's PostgreSQL. */
        cmocka_unit_test_setup_teardown(test_postgres_stopped_mid_load, setup, teardown),
        cmocka_unit_test_setup_teardown(test_postmaster_killed_mid_load, setup, teardown),
        cmocka_unit_test_setup_teardown(test_starts_before_postgres, setup, teardown),
    };
    return cmocka_run_group_tests(tests, stack_up, stack_teardown);
}
