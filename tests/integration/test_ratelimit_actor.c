/*
 * test_ratelimit_actor: the ratelimit actor in one process, between the real gRPC layer
 * (payment_api) and a test "next hop" actor standing for the ledger, against a real
 * redis-server this test starts. Checks what the process-level test cannot see: the exact
 * counters of ratelimit_stats, the x-ratelimit-* trailers appended to whatever the next hop
 * answers (next to its own trailers), the next hop refusing (UNAVAILABLE, counted), and
 * invalid requests never reaching the limiter.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
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

#include "actors/payment_api.h"
#include "actors/ratelimit.h"
#include "e2e/grpc_client.h"
#include "io/grpc_server.h"
#include "runtime/supervisor.h"

#include "redis_fixture.h"

#define BALANCE "/payment.v1.PaymentService/GetAccountBalance"
#define GETPAY  "/payment.v1.PaymentService/GetPayment"

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static int start_redis(void)
{
    pid_t pid = redis_start(redis_port, NULL);
    if (pid < 0)
        return -1;
    redis_pid = pid;
    return 0;
}

static int setup_group(void **state)
{
    (void)state;
    signal(SIGPIPE, SIG_IGN);
    if (redis_fixture_prepare("/tmp/pay-test-rlactor.XXXXXX") != 0)
        return -1;
    redis_port = free_port();
    return redis_port > 0 ? start_redis() : -1;
}

static int teardown_group(void **state)
{
    (void)state;
    redis_fixture_cleanup();
    return 0;
}

/* ---- the next hop ------------------------------------------------------------------------ */

typedef struct fixture {
    supervisor_t *sup;
    ratelimit_t *rl;
    actor_t *next;
    atomic_bool refuse; /* the forward hook refuses (-EAGAIN) */
    atomic_int served;
    payment_api_t api;
    rpc_server_t *srv;
    gc_t *gc;
} fixture_t;

static int next_start(actor_t *a, void *arg, void **state)
{
    (void)a;
    *state = arg;
    return 0;
}

static int next_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    fixture_t *f = state;
    for (size_t i = 0; i < n; i++) {
        payment_msg_t *m = (payment_msg_t *)msgs[i];
        Payment__V1__GetAccountBalanceResponse resp =
            PAYMENT__V1__GET_ACCOUNT_BALANCE_RESPONSE__INIT;
        resp.account_id = "served";
        resp.currency = "EUR";
        const rpc_md_t md[] = {{"x-served-by", "next-hop"}};
        atomic_fetch_add(&f->served, 1); /* before the client can see the reply */
        payment_msg_reply(m, &resp.base, md, 1);
        actor_done(a, &m->hdr);
        msg_dispose(&m->hdr);
    }
    return 0;
}

static int forward(void *arg, payment_msg_t *m)
{
    fixture_t *f = arg;
    if (atomic_load(&f->refuse))
        return -EAGAIN;
    return actor_send(f->next, &m->hdr);
}

static int setup_mode(void **state, bool fail_open)
{
    fixture_t *f = calloc(1, sizeof *f);
    *state = f;
    assert_int_equal(supervisor_create(&f->sup, NULL), 0);
    ratelimit_config_t rc = {
        .redis_host = "127.0.0.1",
        .redis_port = redis_port,
        .max_requests = 3,
        .window_seconds = 30,
        .fail_open = fail_open,
        .timeout_ms = 1000,
        .forward = forward,
        .forward_arg = f,
    };
    assert_int_equal(ratelimit_actor_add(&f->rl, f->sup, &rc), 0);
    actor_spec_t spec = {.name = "next-hop", .arg = f, .start = next_start, .handle = next_handle};
    assert_int_equal(supervisor_add(f->sup, &spec, &f->next), 0);
    assert_int_equal(supervisor_start(f->sup), 0);
    f->api.target = ratelimit_actor(f->rl);
    rpc_server_config_t cfg = {.host = "127.0.0.1", .port = 0, .cq_threads = 1};
    assert_int_equal(rpc_server_create(&f->srv, &cfg), 0);
    assert_int_equal(payment_api_register(f->srv, &f->api), 0);
    assert_int_equal(rpc_server_start(f->srv), 0);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", rpc_server_port(f->srv));
    assert_int_equal(gc_connect(&f->gc, target), 0);
    char flush[128];
    snprintf(flush, sizeof flush, "redis-cli -h 127.0.0.1 -p %d FLUSHALL >/dev/null", redis_port);
    return system(flush) == 0 ? 0 : -1;
}

static int setup_open(void **state)
{
    if (redis_pid <= 0 && start_redis() < 0)
        return -1;
    return setup_mode(state, true);
}

static int setup_closed(void **state)
{
    if (redis_pid <= 0 && start_redis() < 0)
        return -1;
    return setup_mode(state, false);
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    gc_close(f->gc);
    rpc_server_stop_accepting(f->srv);
    rpc_server_wait_idle(f->srv, time_now_ns() + 5000000000ull);
    supervisor_shutdown(f->sup, time_now_ns() + 5000000000ull);
    rpc_server_destroy(f->srv);
    supervisor_destroy(f->sup);
    ratelimit_destroy(f->rl);
    free(f);
    return 0;
}

/* ---- calls ------------------------------------------------------------------------------- */

typedef struct res {
    grpc_status_code status;
    char details[256];
    char trailers[8][256];
    size_t ntrailers;
} res_t;

static res_t call(fixture_t *f, const char *method, const char *id, const char *client)
{
    uint8_t buf[256];
    size_t len;
    if (strcmp(method, BALANCE) == 0) {
        Payment__V1__GetAccountBalanceRequest q = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
        q.account_id = (char *)id;
        len = payment__v1__get_account_balance_request__pack(&q, buf);
    } else {
        Payment__V1__GetPaymentRequest q = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
        q.payment_id = (char *)id;
        len = payment__v1__get_payment_request__pack(&q, buf);
    }
    gc_md_t md[] = {{"x-client-id", client}};
    gc_result_t r;
    assert_int_equal(gc_unary(f->gc, method, buf, len, 10000, md, client ? 1 : 0, &r), 0);
    res_t out = {.status = r.status, .ntrailers = r.ntrailers < 8 ? r.ntrailers : 8};
    snprintf(out.details, sizeof out.details, "%.200s", r.details);
    for (size_t i = 0; i < out.ntrailers; i++)
        snprintf(out.trailers[i], sizeof out.trailers[i], "%.200s", r.trailers[i]);
    gc_result_free(&r);
    return out;
}

static bool has(const res_t *r, const char *trailer)
{
    for (size_t i = 0; i < r->ntrailers; i++)
        if (strcmp(r->trailers[i], trailer) == 0)
            return true;
    return false;
}

static ratelimit_stats_t stats(fixture_t *f)
{
    ratelimit_stats_t s;
    ratelimit_stats(f->rl, &s);
    return s;
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_counts_and_trailers(void **state)
{
    fixture_t *f = *state;
    /* Invalid requests never reach the limiter. */
    res_t r = call(f, GETPAY, "not-a-ulid", "c1");
    assert_int_equal(r.status, GRPC_STATUS_INVALID_ARGUMENT);
    assert_int_equal(r.ntrailers, 0);
    assert_int_equal(stats(f).checks, 0);
    /* Allowed: the next hop's answer with its own trailer plus the limiter's. */
    for (int i = 0; i < 3; i++) {
        r = call(f, BALANCE, "acct-1", "c1");
        assert_int_equal(r.status, GRPC_STATUS_OK);
        assert_true(has(&r, "x-served-by: next-hop"));
        assert_true(has(&r, "x-ratelimit-limit: 3"));
        char want[64];
        snprintf(want, sizeof want, "x-ratelimit-remaining: %d", 2 - i);
        assert_true(has(&r, want));
    }
    for (int i = 0; i < 2; i++) {
        r = call(f, GETPAY, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "c1");
        assert_int_equal(r.status, GRPC_STATUS_RESOURCE_EXHAUSTED);
        assert_string_equal(r.details, "rate limit exceeded: 3 requests per 30 s per client; "
                                       "retry after 30 s");
        assert_true(has(&r, "x-ratelimit-limit: 3"));
        assert_true(has(&r, "x-ratelimit-remaining: 0"));
        assert_true(has(&r, "retry-after: 30"));
        assert_false(has(&r, "x-served-by: next-hop"));
    }
    r = call(f, BALANCE, "acct-1", NULL); /* the peer's bucket */
    assert_int_equal(r.status, GRPC_STATUS_OK);
    assert_true(has(&r, "x-ratelimit-remaining: 2"));
    ratelimit_stats_t s = stats(f);
    assert_int_equal(s.checks, 6);
    assert_int_equal(s.allowed, 4);
    assert_int_equal(s.rejected, 2);
    assert_int_equal(s.rejected_by_type[RATELIMIT_ID_CLIENT], 2);
    assert_int_equal(s.rejected_by_type[RATELIMIT_ID_IP], 0);
    assert_int_equal(s.rejected_by_type[RATELIMIT_ID_PEER], 0);
    assert_int_equal(s.failed_open, 0);
    assert_int_equal(s.failed_closed, 0);
    assert_int_equal(s.outages, 0);
    assert_int_equal(s.forward_refused, 0);
    assert_true(s.redis_up);
    assert_int_equal(atomic_load(&f->served), 4);

    /* The next hop refuses: the call ends UNAVAILABLE, still with the limiter's trailers. */
    atomic_store(&f->refuse, true);
    r = call(f, BALANCE, "acct-1", "c2");
    assert_int_equal(r.status, GRPC_STATUS_UNAVAILABLE);
    assert_non_null(strstr(r.details, "overloaded"));
    assert_true(has(&r, "x-ratelimit-limit: 3"));
    assert_true(has(&r, "x-ratelimit-remaining: 2"));
    assert_int_equal(stats(f).forward_refused, 1);
    atomic_store(&f->refuse, false);
}

static void outage(fixture_t *f, bool fail_open)
{
    redis_stop(&redis_pid);
    for (int i = 0; i < 4; i++) {
        res_t r = call(f, BALANCE, "acct-1", "outage");
        if (fail_open) {
            assert_int_equal(r.status, GRPC_STATUS_OK);
            assert_true(has(&r, "x-served-by: next-hop"));
            assert_true(has(&r, "x-ratelimit-remaining: 3"));
        } else {
            assert_int_equal(r.status, GRPC_STATUS_UNAVAILABLE);
            assert_non_null(strstr(r.details, "rate limiter unavailable"));
            assert_true(has(&r, "x-ratelimit-remaining: 0"));
        }
        assert_true(has(&r, "x-ratelimit-limit: 3"));
    }
    ratelimit_stats_t s = stats(f);
    assert_int_equal(s.checks, 4);
    assert_int_equal(fail_open ? s.failed_open : s.failed_closed, 4);
    assert_int_equal(fail_open ? s.failed_closed : s.failed_open, 0);
    assert_int_equal(s.outages, 1);
    assert_false(s.redis_up);
    /* Back: counted again, without restarting anything; still one outage. */
    assert_int_equal(start_redis(), 0);
    res_t r = {0};
    for (int i = 0; i < 100; i++) {
        r = call(f, BALANCE, "acct-1", "outage");
        if (has(&r, "x-ratelimit-remaining: 2"))
            break;
        sleep_ms(50);
    }
    assert_true(has(&r, "x-ratelimit-remaining: 2"));
    s = stats(f);
    assert_int_equal(s.outages, 1);
    assert_true(s.redis_up);
    assert_int_equal(s.allowed, 1);
}

static void test_outage_fail_open(void **state)
{
    outage(*state, true);
}

static void test_outage_fail_closed(void **state)
{
    outage(*state, false);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_counts_and_trailers, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_outage_fail_open, setup_open, teardown),
        cmocka_unit_test_setup_teardown(test_outage_fail_closed, setup_closed, teardown),
    };
    return cmocka_run_group_tests_name("integration_ratelimit_actor", tests, setup_group,
                                       teardown_group);
}
