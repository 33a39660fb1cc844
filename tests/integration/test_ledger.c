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

#include "ledger_fixture.h"

/* ---- fixture ---------------------------------------------------------------------------- */

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

/* ---- calls ------------------------------------------------------------------------------ */

static void authorize(fixture_t *f, const auth_t *a, outcome_t *o)
{
    authorize_on(f->gc, a, 10000, o);
}

static bool matches(const char *re, const char *s)
{
    regex_t rx;
    assert_int_equal(regcomp(&rx, re, REG_EXTENDED | REG_NOSUB), 0);
    bool ok = regexec(&rx, s, 0, NULL, 0) == 0;
    regfree(&rx);
    return ok;
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

static void test_postgres_stopped_mid_load(void **state)
{
    postgres_killed_mid_load(*state, STOP_FAST, 6);
}

static void test_postmaster_killed_mid_load(void **state)
{
    postgres_killed_mid_load(*state, KILL_POSTMASTER, 6);
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
    static const lf_config_t cfg = {.stack_template = "/tmp/pay-test-ledger.XXXXXX",
                                    .app_name = "test_ledger",
                                    .schema_prefix = "tl"};
    lf_configure(&cfg);
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
