/*
 * test_ledger_batch: the batched ledger engine (issue 5) end to end: a real build/paymentd
 * on the real PostgreSQL of scripts/stack.sh (started in a temporary directory, stopped at
 * exit), through a real gRPC client, each test in a fresh schema with its own paymentd.
 * The stack, fixture and call helpers are ledger_fixture.c's, shared with test_ledger.c
 * (whose tests run unchanged with batching on); here every paymentd gets LEDGER_BATCH_MAX=256.
 *
 * Covered, each forced into ONE batch through the server (the writer is held on a row lock
 * while the requests queue) and proved by the batch-size histogram paymentd logs at
 * shutdown: a batch mixing every outcome (valid payments, an overdraft, a key repeated with
 * the same fingerprint -> DUPLICATE of the first, with another -> CONFLICT, an unknown
 * account, a currency mismatch); a batch with stored keys (replayed, expired -> new,
 * a stored decline replayed), three payments drawing on one balance, the same account;
 * a batch with a failing payment, retried split; a batch stuck behind a rogue lock (the
 * connection is dropped after DB_STATEMENT_TIMEOUT_MS, nothing is applied, retries execute
 * once); batches larger than one under concurrent load; two
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

/* ---- batches held together behind a lock ---------------------------------------------- */

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

static int64_t lock_waiters(fixture_t *f)
{
    return scalar_i64(f->db,
                      "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'");
}

/* Sends ws[0..n) as ONE batch of the only writer: a payment of account "hold" (opened by
 * the caller with at least 2 cents) waits on the test's row lock, a second one is
 * pipelined behind it (a writer keeps at most two transactions in flight), the n requests
 * arrive 20 ms apart and queue meanwhile; then the lock is released. Both holders end
 * AUTHORIZED (1 cent each to carol, keys "<tag>-hold" and "<tag>-hold2"). */
static void run_held_batch(fixture_t *f, const char *tag, staggered_t *ws, int n)
{
    PGconn *locker = connect_url(f->url);
    exec_sql(locker, "BEGIN");
    exec_sql(locker, "SELECT id FROM accounts WHERE id = 'hold' FOR UPDATE");
    char k1[64], k2[64];
    snprintf(k1, sizeof k1, "%s-hold", tag);
    snprintf(k2, sizeof k2, "%s-hold2", tag);
    staggered_t hold[2] = {
        {.w = {.target = f->pd.target,
               .a = {.key = k1, .payer = "hold", .payee = "carol", .amount = 1}}},
        {.w = {.target = f->pd.target,
               .a = {.key = k2, .payer = "hold", .payee = "carol", .amount = 1}}},
    };
    pthread_t ht[2], th[64];
    assert_true(n <= 64);
    assert_int_equal(pthread_create(&ht[0], NULL, staggered_call, &hold[0]), 0);
    for (int i = 0; i < 100 && lock_waiters(f) == 0; i++)
        usleep(50000);
    assert_int_equal(lock_waiters(f), 1);
    assert_int_equal(pthread_create(&ht[1], NULL, staggered_call, &hold[1]), 0);
    usleep(300000); /* in flight behind the first before the batch arrives */
    for (int i = 0; i < n; i++) {
        ws[i].w.target = f->pd.target;
        ws[i].delay_ms = 20 * i;
        assert_int_equal(pthread_create(&th[i], NULL, staggered_call, &ws[i]), 0);
    }
    usleep(300000 + 20000 * (useconds_t)n); /* all queued in the writer */
    exec_sql(locker, "COMMIT");
    PQfinish(locker);
    for (int i = 0; i < 2; i++) {
        pthread_join(ht[i], NULL);
        expect_ok(&hold[i].w.o, ST_AUTHORIZED, 0);
    }
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
}

/* Every outcome inside ONE batch, decided in arrival order with the balances in memory:
 * valid payments, an overdraft of what earlier payments of the batch left, a key repeated
 * with the same fingerprint (one executes, the other replays it) and with another
 * (ALREADY_EXISTS), an unknown account, a currency mismatch, the histogram shows the
 * batch of nine. */
static void test_mixed_batch_through_server(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 100);
    open_account(f, "hold", "USD", 10);
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
        ws[i].w.a = reqs[i];
    run_held_batch(f, "mb", ws, 9);
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
    assert_string_equal(ws[8].w.o.error_message,
                        "currency USD does not match payee account erin-eur (EUR)");
    assert_int_equal(balance(f->gc, "alice", NULL), 100000 - 1000 - 300 + conf);
    assert_int_equal(balance(f->gc, "bob", NULL), 50000 - 2000 + 300 - conf);
    assert_int_equal(balance(f->gc, "carol", NULL), 1000 + 2000 + 1 + 1);
    assert_int_equal(balance(f->gc, "dave", NULL), 100);
    /* the holders, and the nine less the two replays */
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE idempotency_key"
                                       " LIKE 'mb-%'"),
                     9);
    ledger_check_passes(f);
    batches_t b;
    stop_and_read_batches(&f->pd, &b);
    /* The two holders alone (1 + 1), the nine together (9); balance reads go to readers. */
    assert_int_equal(b.max, 9);
    assert_int_equal(b.total, 3);
    assert_int_equal(b.single, 2);
}

/* Stored keys inside one batch, and what the balances in memory decide: a key stored
 * before replays (DUPLICATE with the stored id and time), a stored key past its TTL is a
 * new payment, a key stored as a decline replays the decline; dave's three payments draw
 * on one balance (600 + 600 of 1000: the second is declined, the third of 400 fits); the
 * same account is declined; every row lands once. */
static void test_stored_keys_in_batch(void **state)
{
    fixture_t *f = *state;
    open_account(f, "dave", "USD", 1000);
    open_account(f, "hold", "USD", 10);
    outcome_t old, expd, decl;
    auth_t a_old = {.key = "sk-old", .payer = "alice", .payee = "bob", .amount = 7};
    auth_t a_exp = {.key = "sk-exp", .payer = "alice", .payee = "bob", .amount = 11};
    auth_t a_decl = {.key = "sk-decl", .payer = "ghost", .payee = "bob", .amount = 5};
    authorize_on(f->gc, &a_old, 10000, &old);
    authorize_on(f->gc, &a_exp, 10000, &expd);
    authorize_on(f->gc, &a_decl, 10000, &decl);
    expect_ok(&old, ST_AUTHORIZED, 0);
    expect_ok(&expd, ST_AUTHORIZED, 0);
    expect_ok(&decl, ST_DECLINED, E_NOT_FOUND);
    exec_sql(f->db, "UPDATE idempotency_keys SET processed_at = processed_at - interval '25h',"
                    " expires_at = expires_at - interval '25h' WHERE key = 'sk-exp'");
    exec_sql(f->db, "UPDATE payments SET idempotency_expires_at = idempotency_expires_at -"
                    " interval '25h', created_at = created_at - interval '25h',"
                    " updated_at = updated_at - interval '25h' WHERE idempotency_key = 'sk-exp'");
    const auth_t reqs[7] = {
        a_old,
        a_exp,
        a_decl,
        {.key = "sk-d1", .payer = "dave", .payee = "carol", .amount = 600},
        {.key = "sk-d2", .payer = "dave", .payee = "carol", .amount = 600},
        {.key = "sk-d3", .payer = "dave", .payee = "carol", .amount = 400},
        {.key = "sk-same", .payer = "carol", .payee = "carol", .amount = 1},
    };
    staggered_t ws[7];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < 7; i++)
        ws[i].w.a = reqs[i];
    run_held_batch(f, "sk", ws, 7);
    expect_ok(&ws[0].w.o, ST_DUPLICATE, 0);
    assert_string_equal(ws[0].w.o.payment_id, old.payment_id);
    assert_string_equal(ws[0].w.o.processed_at, old.processed_at);
    expect_ok(&ws[1].w.o, ST_AUTHORIZED, 0);
    assert_string_not_equal(ws[1].w.o.payment_id, expd.payment_id);
    expect_ok(&ws[2].w.o, ST_DUPLICATE, E_NOT_FOUND);
    assert_string_equal(ws[2].w.o.payment_id, decl.payment_id);
    assert_string_equal(ws[2].w.o.error_message, "payer account ghost not found");
    expect_ok(&ws[3].w.o, ST_AUTHORIZED, 0);
    expect_ok(&ws[4].w.o, ST_DECLINED, E_INSUFFICIENT);
    expect_ok(&ws[5].w.o, ST_AUTHORIZED, 0);
    expect_ok(&ws[6].w.o, ST_DECLINED, E_SAME);
    assert_string_equal(ws[6].w.o.error_message, "payer and payee are the same account carol");
    assert_int_equal(balance(f->gc, "dave", NULL), 0);
    assert_int_equal(balance(f->gc, "alice", NULL), 100000 - 7 - 11 - 11);
    assert_int_equal(balance(f->gc, "bob", NULL), 50000 + 7 + 11 + 11);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE idempotency_key"
                                       " = 'sk-exp'"),
                     2);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM idempotency_keys WHERE key = 'sk-exp'"
                                       " AND expires_at > now()"),
                     1);
    assert_int_equal(scalar_i64(f->db,
                                "SELECT count(*) FROM outbox o JOIN payments p ON"
                                " p.id = o.aggregate_id WHERE p.idempotency_key LIKE 'sk-%'"),
                     10); /* 3 before, 2 holders, sk-exp again, 3 of dave, sk-same */
    ledger_check_passes(f);
    batches_t b;
    stop_and_read_batches(&f->pd, &b);
    assert_int_equal(b.max, 7);
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
    staggered_t ws[6];
    char keys[6][16];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < 6; i++) {
        snprintf(keys[i], sizeof keys[i], "sp-%d", i);
        ws[i].w.a = (auth_t){.key = keys[i],
                             .payer = "alice",
                             .payee = "carol",
                             .amount = 1 + i,
                             .description = i == 3 ? "boom" : "fine"};
    }
    run_held_batch(f, "sp", ws, 6);
    for (int i = 0; i < 6; i++)
        if (i == 3)
            expect_grpc(&ws[i].w.o, GRPC_STATUS_INTERNAL,
                        "server error: the database refused the request");
        else
            expect_ok(&ws[i].w.o, ST_AUTHORIZED, 0);
    assert_int_equal(balance(f->gc, "carol", NULL), 1 + 1 + 1 + 2 + 3 + 5 + 6);
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
    /* 1 + 1 (the holders), 6 (fails), 3 + 3 (the second fails), 1 + 1 + 1. */
    assert_int_equal(b.total, 8);
    assert_int_equal(b.max, 6);
    assert_int_equal(b.single, 5);
}

/* ---- a batch stuck behind a lock nobody releases ----------------------------------------- */

static int setup_short_timeout(void **state)
{
    static const char *const extra[] = {"DB_POOL_SIZE=1", "DB_STATEMENT_TIMEOUT_MS=1500", NULL};
    return setup_env(state, extra);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A rogue session holds an account's row lock: the payments queued behind it get no answer
 * from PostgreSQL. After DB_STATEMENT_TIMEOUT_MS the writer drops its connection: the
 * calls whose commit was already sent end UNAVAILABLE saying their outcome is unknown, the
 * others UNAVAILABLE too, and the writer is back at once for other payments. The abandoned
 * backend notices its client is gone within a second (client_connection_check_interval)
 * and gives up, so when the lock is finally released nothing of those payments is applied,
 * and the clients' retries with the same keys execute each payment exactly once. */
static void test_stuck_batch_times_out(void **state)
{
    fixture_t *f = *state;
    open_account(f, "hold", "USD", 100);
    PGconn *locker = connect_url(f->url);
    exec_sql(locker, "BEGIN");
    exec_sql(locker, "SELECT id FROM accounts WHERE id = 'hold' FOR UPDATE");
    staggered_t ws[4];
    char keys[4][16];
    memset(ws, 0, sizeof ws);
    pthread_t th[4];
    int64_t t0 = now_ms();
    for (int i = 0; i < 4; i++) {
        snprintf(keys[i], sizeof keys[i], "st-%d", i);
        ws[i].w.target = f->pd.target;
        ws[i].w.a = (auth_t){.key = keys[i], .payer = "hold", .payee = "carol", .amount = 1 + i};
        ws[i].delay_ms = 20 * i;
        assert_int_equal(pthread_create(&th[i], NULL, staggered_call, &ws[i]), 0);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    int64_t took = now_ms() - t0;
    for (int i = 0; i < 4; i++)
        assert_int_equal(ws[i].w.o.grpc, GRPC_STATUS_UNAVAILABLE);
    expect_grpc(&ws[0].w.o, GRPC_STATUS_UNAVAILABLE,
                "database connection lost before the payment's outcome was known; retry with "
                "the same idempotency_key");
    assert_true(took >= 1400 && took < 6000);
    /* The writer reconnected: another payer's payment goes through. */
    outcome_t o;
    auth_t other = {.key = "st-other", .payer = "alice", .payee = "bob", .amount = 5};
    for (int i = 0; i < 100; i++) {
        authorize_on(f->gc, &other, 10000, &o);
        if (o.grpc != GRPC_STATUS_UNAVAILABLE)
            break;
        usleep(50000);
    }
    expect_ok(&o, ST_AUTHORIZED, 0);
    /* The abandoned backend stopped waiting for the lock. */
    int64_t waiting = 1;
    for (int i = 0; i < 100 && waiting != 0; i++) {
        waiting = lock_waiters(f);
        if (waiting)
            usleep(50000);
    }
    assert_int_equal(waiting, 0);
    exec_sql(locker, "COMMIT");
    PQfinish(locker);
    usleep(300000);
    assert_int_equal(scalar_i64(f->db, "SELECT count(*) FROM payments WHERE idempotency_key"
                                       " LIKE 'st-_'"),
                     0);
    for (int i = 0; i < 4; i++) {
        authorize_on(f->gc, &ws[i].w.a, 10000, &o);
        expect_ok(&o, ST_AUTHORIZED, 0);
    }
    assert_int_equal(balance(f->gc, "hold", NULL), 100 - (1 + 2 + 3 + 4));
    ledger_check_passes(f);
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
        cmocka_unit_test_setup_teardown(test_mixed_batch_through_server, setup_pool_of_one,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_stored_keys_in_batch, setup_pool_of_one, teardown),
        cmocka_unit_test_setup_teardown(test_failed_batch_is_split, setup_pool_of_one, teardown),
        cmocka_unit_test_setup_teardown(test_stuck_batch_times_out, setup_short_timeout, teardown),
        cmocka_unit_test_setup_teardown(test_load_forms_batches, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_instances_batched, setup, teardown),
        cmocka_unit_test_setup_teardown(test_postmaster_killed_mid_batch, setup, teardown),
    };
    return cmocka_run_group_tests(tests, stack_up, stack_teardown);
}
