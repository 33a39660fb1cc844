/*
 * test_ledger_batch: the batched ledger engine (issue 5) end to end: a real build/paymentd
 * on the real PostgreSQL of scripts/stack.sh (started in a temporary directory, stopped at
 * exit), through a real gRPC client, each test in a fresh schema with its own paymentd.
 * The stack, fixture and call helpers are ledger_fixture.c's, shared with test_ledger.c
 * (whose tests run unchanged with batching on); here every paymentd gets LEDGER_BATCH_MAX=256.
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

#include "ledger_fixture.h"

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
    postgres_killed_mid_load(f, KILL_POSTMASTER, 16);
    batches_t b;
    stop_and_read_batches(&f->pd, &b);
    assert_true(b.max > 1);
}

int main(void)
{
    /* LEDGER_BATCH_MAX: the default, whatever the environment says. */
    static const char *const server_env[] = {"LEDGER_BATCH_MAX=256", NULL};
    static const lf_config_t cfg = {.stack_template = "/tmp/pay-test-ledger-batch.XXXXXX",
                                    .app_name = "test_ledger_batch",
                                    .schema_prefix = "tlb",
                                    .server_env = server_env};
    lf_configure(&cfg);
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
