/*
 * Shutdown of a real paymentd under load (DESIGN.md §3 "Shutdown"): 10,000 calls, then
 * SIGTERM, exit 0 (in the ASan tree LeakSanitizer runs at exit and would fail the exit
 * code); and SIGTERM while many calls are in flight: every call ends with a status, exit 0,
 * and every call the server accepted got its answer: the server's own per-call log (the
 * finish hook, at DEBUG) counts exactly the answers the clients received, and no other
 * outcome. The clients' other calls were never handed to the server: refused once it
 * stopped accepting (UNAVAILABLE), or cancelled by gRPC core, which cancels the calls it
 * has received but not yet delivered when shutdown starts, and those that race with it.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "e2e/grpc_client.h"
#include "e2e/paymentd_proc.h"
#include "payment/v1/payment.pb-c.h"

#define GET_BALANCE "/payment.v1.PaymentService/GetAccountBalance"

typedef struct fixture {
    pd_proc_t pd;
    gc_t *gc;
    bool passed;
    uint8_t req[64];
    size_t req_len;
} fixture_t;

/* The ledger answers from the stack's PostgreSQL (acct_alice does not exist: NOT_FOUND). */
static pd_stack_t stack;

static int stack_up(void **state)
{
    (void)state;
    return pd_stack_up(&stack);
}

static int stack_down(void **state)
{
    (void)state;
    pd_stack_down(&stack);
    return 0;
}

#define NO_ALICE "account acct_alice not found"

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    Payment__V1__GetAccountBalanceRequest r = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    r.account_id = "acct_alice";
    f->req_len = payment__v1__get_account_balance_request__pack(&r, f->req);
    const char *const env[] = {"SHUTDOWN_GRACE_SECONDS=10", stack.env_entry, NULL};
    if (pd_start(&f->pd, env) < 0)
        return -1;
    return gc_connect(&f->gc, f->pd.target);
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    if (!f->passed)
        pd_dump_log(&f->pd);
    gc_close(f->gc);
    pd_cleanup(&f->pd);
    free(f);
    return 0;
}

static void print_counts(const gc_load_t *l)
{
    for (int i = 0; i < GC_NSTATUS; i++)
        if (l->counts[i])
            fprintf(stderr, "  status %d: %zu (e.g. \"%s\")\n", i, l->counts[i],
                    l->last_details[i]);
}

static void expect_clean_exit(fixture_t *f, int within_ms)
{
    int status;
    assert_int_equal(pd_wait(&f->pd, within_ms, &status), 0);
    char why[64];
    pd_status_str(status, why, sizeof(why));
    if (strcmp(why, "exit 0") != 0) {
        pd_dump_log(&f->pd);
        fail_msg("paymentd ended with %s, want exit 0", why);
    }
}

static void test_ten_thousand_calls_then_sigterm(void **state)
{
    fixture_t *f = *state;
    gc_load_t l = {.method = GET_BALANCE,
                   .req = f->req,
                   .req_len = f->req_len,
                   .total = 10000,
                   .concurrency = 64,
                   .timeout_ms = 30000};
    assert_int_equal(gc_unary_load(f->gc, &l), 0);
    print_counts(&l);
    assert_int_equal(l.counts[GRPC_STATUS_NOT_FOUND], 10000);
    assert_string_equal(l.last_details[GRPC_STATUS_NOT_FOUND], NO_ALICE);
    assert_int_equal(pd_signal(&f->pd, SIGTERM), 0);
    expect_clean_exit(f, 30000);
    assert_true(pd_log_contains(&f->pd, "\"msg\":\"stopped\""));
    f->passed = true;
}

typedef struct loader {
    gc_t *gc;
    gc_load_t load;
    int rc;
} loader_t;

static void *run_load(void *arg)
{
    loader_t *ld = arg;
    ld->rc = gc_unary_load(ld->gc, &ld->load);
    return NULL;
}

/* Lines of the server's log containing every one of the given texts. */
static size_t count_log_lines(const pd_proc_t *p, const char *a, const char *b)
{
    FILE *fp = fopen(p->log_path, "r");
    assert_non_null(fp);
    char line[4096];
    size_t n = 0;
    while (fgets(line, sizeof(line), fp))
        if (strstr(line, a) && (!b || strstr(line, b)))
            n++;
    fclose(fp);
    return n;
}

static int setup_debug(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    Payment__V1__GetAccountBalanceRequest r = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    r.account_id = "acct_alice";
    f->req_len = payment__v1__get_account_balance_request__pack(&r, f->req);
    const char *const env[] = {"SHUTDOWN_GRACE_SECONDS=10", "LOG_LEVEL=DEBUG", stack.env_entry,
                               NULL};
    if (pd_start(&f->pd, env) < 0)
        return -1;
    return gc_connect(&f->gc, f->pd.target);
}

static void test_sigterm_with_calls_in_flight(void **state)
{
    fixture_t *f = *state;
    enum { LOADERS = 2 };
    loader_t ld[LOADERS];
    pthread_t th[LOADERS];
    for (int i = 0; i < LOADERS; i++) {
        memset(&ld[i], 0, sizeof(ld[i]));
        assert_int_equal(gc_connect(&ld[i].gc, f->pd.target), 0);
        ld[i].load = (gc_load_t){.method = GET_BALANCE,
                                 .req = f->req,
                                 .req_len = f->req_len,
                                 .total = 20000,
                                 .concurrency = 128,
                                 .timeout_ms = 30000};
        assert_int_equal(pthread_create(&th[i], NULL, run_load, &ld[i]), 0);
    }
    /* Let the load build up, then pull the plug while calls are in flight. */
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        size_t done = atomic_load(&ld[0].load.completed) + atomic_load(&ld[1].load.completed);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (done >= 3000)
            break;
        if (now.tv_sec - t0.tv_sec > 60)
            fail_msg("only %zu calls completed in 60 s", done);
        struct timespec ms = {.tv_nsec = 1000000};
        nanosleep(&ms, NULL);
    }
    size_t in_flight = 0;
    for (int i = 0; i < LOADERS; i++)
        in_flight += atomic_load(&ld[i].load.started) - atomic_load(&ld[i].load.completed);
    assert_int_equal(pd_signal(&f->pd, SIGTERM), 0);
    for (int i = 0; i < LOADERS; i++)
        pthread_join(th[i], NULL);
    fprintf(stderr, "  %zu calls in flight at SIGTERM\n", in_flight);
    assert_true(in_flight > 0);

    size_t answered = 0;
    for (int i = 0; i < LOADERS; i++) {
        gc_load_t *l = &ld[i].load;
        print_counts(l);
        assert_int_equal(ld[i].rc, 0);
        assert_int_equal(atomic_load(&l->started), 20000);
        assert_int_equal(atomic_load(&l->completed), 20000);
        /* Answered by the ledger, or never handed to the server (see the top). */
        assert_int_equal(l->counts[GRPC_STATUS_NOT_FOUND] + l->counts[GRPC_STATUS_UNAVAILABLE] +
                             l->counts[GRPC_STATUS_CANCELLED],
                         20000);
        if (l->counts[GRPC_STATUS_CANCELLED])
            assert_string_equal(l->last_details[GRPC_STATUS_CANCELLED], "CANCELLED");
        answered += l->counts[GRPC_STATUS_NOT_FOUND];
        gc_close(ld[i].gc);
    }
    assert_true(answered >= 3000);
    expect_clean_exit(f, 30000);
    /* Server side: one finished call per answer the clients got, and nothing else. */
    size_t server_calls = count_log_lines(&f->pd, "\"logger\":\"grpc\"", " ms\"");
    size_t server_answers = count_log_lines(&f->pd, "\"msg\":\"" GET_BALANCE " NOT_FOUND ", NULL);
    fprintf(stderr, "  server finished %zu calls, %zu answered\n", server_calls, server_answers);
    assert_int_equal(server_answers, answered);
    assert_int_equal(server_calls, answered);
    f->passed = true;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ten_thousand_calls_then_sigterm, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sigterm_with_calls_in_flight, setup_debug, teardown),
    };
    return cmocka_run_group_tests_name("e2e_shutdown", tests, stack_up, stack_down);
}
