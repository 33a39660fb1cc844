/*
 * grpc.health.v1.Health against a real paymentd (DESIGN.md §3 "Health"): Check for the
 * known services and an unknown one; Watch streams SERVING then NOT_SERVING at SIGTERM
 * and ends before the server exits 0; Watch on an unknown service streams
 * SERVICE_UNKNOWN and stays open; a cancelled Watch does not hold shutdown.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <cmocka.h>

#include "e2e/grpc_client.h"
#include "e2e/paymentd_proc.h"
#include "grpc/health/v1/health.pb-c.h"

#define CHECK "/grpc.health.v1.Health/Check"
#define WATCH "/grpc.health.v1.Health/Watch"

#define SERVING         GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
#define NOT_SERVING     GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
#define SERVICE_UNKNOWN GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN

typedef struct fixture {
    pd_proc_t pd;
    gc_t *gc;
    bool passed;
} fixture_t;

/* Health follows the database: the servers here get the stack's PostgreSQL. */
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

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    const char *const env[] = {"SHUTDOWN_GRACE_SECONDS=30", stack.env_entry, NULL};
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

static int check_status(gc_t *gc, const char *service, gc_result_t *r)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    assert_int_equal(gc_unary_msg(gc, CHECK, &req.base, 5000, r), 0);
    if (r->status != GRPC_STATUS_OK)
        return -1;
    Grpc__Health__V1__HealthCheckResponse *resp =
        grpc__health__v1__health_check_response__unpack(NULL, r->body_len, r->body);
    assert_non_null(resp);
    int st = resp->status;
    grpc__health__v1__health_check_response__free_unpacked(resp, NULL);
    return st;
}

static gc_stream_t *watch(gc_t *gc, const char *service)
{
    gc_stream_t *s;
    assert_int_equal(gc_stream_open(gc, WATCH, 60000, &s), 0);
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    assert_int_equal(gc_stream_send_msg(s, &req.base), 0);
    assert_int_equal(gc_stream_half_close(s), 0);
    return s;
}

/* The next status on a Watch stream, or -1 at the end of the stream. */
static int next_status(gc_stream_t *s, int wait_ms)
{
    uint8_t *data = NULL;
    size_t len = 0;
    int rc = gc_stream_recv(s, wait_ms, &data, &len);
    assert_true(rc >= 0);
    if (rc == 0)
        return -1;
    Grpc__Health__V1__HealthCheckResponse *resp =
        grpc__health__v1__health_check_response__unpack(NULL, len, data);
    free(data);
    assert_non_null(resp);
    int st = resp->status;
    grpc__health__v1__health_check_response__free_unpacked(resp, NULL);
    return st;
}

static void test_check(void **state)
{
    fixture_t *f = *state;
    gc_result_t r;
    assert_int_equal(check_status(f->gc, "", &r), SERVING);
    gc_result_free(&r);
    assert_int_equal(check_status(f->gc, "payment.v1.PaymentService", &r), SERVING);
    gc_result_free(&r);
    assert_int_equal(check_status(f->gc, "payment.v1.NoSuchService", &r), -1);
    assert_int_equal(r.status, GRPC_STATUS_NOT_FOUND);
    assert_string_equal(r.details, "unknown service \"payment.v1.NoSuchService\"");
    assert_null(r.body);
    gc_result_free(&r);
    f->passed = true;
}

static void test_watch_sees_shutdown(void **state)
{
    fixture_t *f = *state;
    gc_stream_t *all = watch(f->gc, "");
    gc_stream_t *pay = watch(f->gc, "payment.v1.PaymentService");
    assert_int_equal(next_status(all, 10000), SERVING);
    assert_int_equal(next_status(pay, 10000), SERVING);
    /* Nothing changes while nothing happens. */
    uint8_t *data;
    size_t len;
    assert_int_equal(gc_stream_recv(all, 300, &data, &len), -ETIMEDOUT);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(pd_signal(&f->pd, SIGTERM), 0);
    assert_int_equal(next_status(all, 10000), NOT_SERVING);
    assert_int_equal(next_status(pay, 10000), NOT_SERVING);
    /* Then the streams end, before the process does. */
    assert_int_equal(next_status(all, 10000), -1);
    assert_int_equal(next_status(pay, 10000), -1);
    grpc_status_code code;
    char details[256];
    assert_int_equal(gc_stream_status(all, 10000, &code, details, sizeof(details)), 0);
    assert_int_equal(code, GRPC_STATUS_UNAVAILABLE);
    assert_string_equal(details, "server shutting down");
    assert_int_equal(gc_stream_status(pay, 10000, &code, details, sizeof(details)), 0);
    assert_int_equal(code, GRPC_STATUS_UNAVAILABLE);
    gc_stream_free(all);
    gc_stream_free(pay);

    int status;
    assert_int_equal(pd_wait(&f->pd, 20000, &status), 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    char why[64];
    assert_string_equal(pd_status_str(status, why, sizeof(why)), "exit 0");
    /* Nothing was in flight: no reason to sit out the 30 s grace period. */
    assert_true(t1.tv_sec - t0.tv_sec < 15);
    f->passed = true;
}

static void test_watch_unknown_stays_open(void **state)
{
    fixture_t *f = *state;
    gc_stream_t *s = watch(f->gc, "no.such.Service");
    assert_int_equal(next_status(s, 10000), SERVICE_UNKNOWN);
    uint8_t *data;
    size_t len;
    grpc_status_code code;
    assert_int_equal(gc_stream_recv(s, 500, &data, &len), -ETIMEDOUT);
    assert_int_equal(gc_stream_status(s, 10, &code, NULL, 0), -ETIMEDOUT);
    /* The server is fine meanwhile. */
    gc_result_t r;
    assert_int_equal(check_status(f->gc, "", &r), SERVING);
    gc_result_free(&r);
    gc_stream_free(s); /* cancels */

    /* A Watch the client cancelled is gone: shutdown does not wait for it. */
    gc_stream_t *s2 = watch(f->gc, "");
    assert_int_equal(next_status(s2, 10000), SERVING);
    gc_stream_cancel(s2);
    assert_int_equal(gc_stream_status(s2, 10000, &code, NULL, 0), 0);
    assert_int_equal(code, GRPC_STATUS_CANCELLED);
    gc_stream_free(s2);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(pd_signal(&f->pd, SIGTERM), 0);
    int status;
    assert_int_equal(pd_wait(&f->pd, 40000, &status), 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    char why[64];
    assert_string_equal(pd_status_str(status, why, sizeof(why)), "exit 0");
    assert_true(t1.tv_sec - t0.tv_sec < 15);
    f->passed = true;
}

static void test_watch_bad_request(void **state)
{
    fixture_t *f = *state;
    gc_stream_t *s;
    assert_int_equal(gc_stream_open(f->gc, WATCH, 10000, &s), 0);
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff};
    assert_int_equal(gc_stream_send(s, junk, sizeof(junk)), 0);
    gc_stream_half_close(s);
    uint8_t *data;
    size_t len;
    assert_int_equal(gc_stream_recv(s, 10000, &data, &len), 0);
    grpc_status_code code;
    char details[256];
    assert_int_equal(gc_stream_status(s, 10000, &code, details, sizeof(details)), 0);
    assert_int_equal(code, GRPC_STATUS_INVALID_ARGUMENT);
    assert_string_equal(details, "request: malformed grpc.health.v1.HealthCheckRequest message");
    gc_stream_free(s);
    f->passed = true;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_check, setup, teardown),
        cmocka_unit_test_setup_teardown(test_watch_sees_shutdown, setup, teardown),
        cmocka_unit_test_setup_teardown(test_watch_unknown_stays_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_watch_bad_request, setup, teardown),
    };
    return cmocka_run_group_tests_name("e2e_health", tests, stack_up, stack_down);
}
