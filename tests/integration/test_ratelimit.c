/*
 * test_ratelimit: the rate limiter (actors/ratelimit.c, io/redis.c) in real paymentd
 * processes against the real Redis of a stack this test starts (scripts/stack.sh up in a
 * temporary directory; down at exit). A missing redis-server fails the group setup, naming it.
 *
 * Whatever the ledger answers an allowed request, it is "allowed": the limiter's verdict is
 * read from the status and the trailers (RESOURCE_EXHAUSTED = rejected; UNAVAILABLE
 * "rate limiter unavailable" = failed closed; x-ratelimit-remaining == the limit = failed
 * open, since a counted request leaves at most limit-1).
 *
 * Covered: a burst of 10·L concurrent calls from one client → exactly L allowed, with the
 * remaining values L-1..0 each once; the three methods share one bucket; clients are
 * independent; retry-after within 1 s of when a slot really frees, and rejected calls do not
 * push that back; allowed again after the window; x-forwarded-for ignored from an untrusted
 * peer and honoured from a trusted one; a per-method limit; a flushed script cache
 * (NOSCRIPT → EVAL); three instances sharing one Redis allow exactly L in total; Redis
 * stopped mid-load (fail open counts and logs once; fail closed → UNAVAILABLE; both recover
 * without restart); Redis paused (CLIENT PAUSE 2000) → calls end within the timeout in both
 * modes; health and reflection never limited, even for an identity over its limit.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "e2e/grpc_client.h"
#include "e2e/paymentd_proc.h"
#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "payment/v1/payment.pb-c.h"

#define BALANCE   "/payment.v1.PaymentService/GetAccountBalance"
#define GETPAY    "/payment.v1.PaymentService/GetPayment"
#define AUTHORIZE "/payment.v1.PaymentService/AuthorizePayment"
#define CHECK     "/grpc.health.v1.Health/Check"
#define REFL_V1   "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

static char stack_dir[256];
static char database_url[1100], redis_url[1100];
static int redis_port;
static char run_id[32]; /* makes client ids unique per run */

/* ---- helpers ---------------------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    return rc == 0 ? 0 : -1;
}

static void redis_cmd(const char *args)
{
    assert_int_equal(sh("redis-cli -h 127.0.0.1 -p %d %s >/dev/null", redis_port, args), 0);
}

/* An integer reply of redis-cli (ZCARD, PTTL, ...). */
static long long redis_int(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static long long redis_int(const char *fmt, ...)
{
    char args[512], cmd[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "redis-cli -h 127.0.0.1 -p %d %s", redis_port, args);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    long long v = -999;
    if (fscanf(f, "%lld", &v) != 1)
        v = -999;
    pclose(f);
    return v;
}

static void stack_down(void)
{
    if (!stack_dir[0])
        return;
    if (sh("'%s/scripts/stack.sh' down '%s' >/dev/null 2>&1; rm -rf '%s'", getenv("PAY_SOURCE_DIR"),
           stack_dir, stack_dir) != 0)
        fprintf(stderr, "warning: stopping the stack in %s failed\n", stack_dir);
    stack_dir[0] = '\0';
}

static void stack_drill(const char *what)
{
    assert_int_equal(sh("'%s/scripts/stack.sh' %s '%s' >>'%s/drill.log' 2>&1",
                        getenv("PAY_SOURCE_DIR"), what, stack_dir, stack_dir),
                     0);
}

static int setup_group(void **state)
{
    (void)state;
    const char *src = getenv("PAY_SOURCE_DIR");
    if (!src || !getenv("PAY_BUILD_DIR")) {
        fprintf(stderr, "PAY_SOURCE_DIR and PAY_BUILD_DIR must be set (CTest sets them)\n");
        return -1;
    }
    if (sh("command -v redis-server >/dev/null && command -v redis-cli >/dev/null") != 0) {
        fprintf(stderr, "redis-server / redis-cli not found: this test needs a real Redis "
                        "(Debian package redis-server; scripts/bootstrap.sh installs it)\n");
        return -1;
    }
    snprintf(stack_dir, sizeof stack_dir, "/tmp/pay-test-rl.XXXXXX");
    if (!mkdtemp(stack_dir)) {
        stack_dir[0] = '\0';
        return -1;
    }
    atexit(stack_down);
    if (sh("'%s/scripts/stack.sh' up '%s' >'%s/up.log' 2>&1", src, stack_dir, stack_dir) != 0) {
        sh("cat '%s/up.log' >&2", stack_dir);
        fprintf(stderr, "scripts/stack.sh up %s failed (log above)\n", stack_dir);
        return -1;
    }
    char path[512], line[1024];
    snprintf(path, sizeof path, "%s/env", stack_dir);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "export DATABASE_URL=", 20) == 0)
            snprintf(database_url, sizeof database_url, "DATABASE_URL=%s", line + 20);
        else if (strncmp(line, "export REDIS_URL=", 17) == 0)
            snprintf(redis_url, sizeof redis_url, "REDIS_URL=%s", line + 17);
    }
    fclose(f);
    snprintf(path, sizeof path, "%s/redis.port", stack_dir);
    f = fopen(path, "r");
    if (!f || fscanf(f, "%d", &redis_port) != 1) {
        if (f)
            fclose(f);
        fprintf(stderr, "no redis port in %s\n", path);
        return -1;
    }
    fclose(f);
    snprintf(run_id, sizeof run_id, "%ld", (long)getpid());
    return database_url[0] && redis_url[0] ? 0 : -1;
}

static int teardown_group(void **state)
{
    (void)state;
    stack_down();
    return 0;
}

/* Every test starts from an empty Redis (the peer bucket is shared by all). */
static int setup(void **state)
{
    (void)state;
    return sh("redis-cli -h 127.0.0.1 -p %d FLUSHALL >/dev/null", redis_port);
}

#define MAX_PROCS 4
typedef struct procs {
    pd_proc_t p[MAX_PROCS];
    int n;
} procs_t;
static procs_t procs;
static bool test_passed;

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < procs.n; i++) {
        if (!test_passed)
            pd_dump_log(&procs.p[i]);
        pd_cleanup(&procs.p[i]);
    }
    procs.n = 0;
    test_passed = false;
    return 0;
}

/* Starts paymentd with the stack's URLs, the limiter on, and extra settings. */
static pd_proc_t *start(const char *const *extra)
{
    const char *env[24];
    size_t n = 0;
    env[n++] = database_url;
    env[n++] = redis_url;
    env[n++] = "RATE_LIMIT_ENABLED=true";
    env[n++] = "LOG_FORMAT=console";
    for (size_t i = 0; extra && extra[i] && n < 23; i++)
        env[n++] = extra[i];
    env[n] = NULL;
    assert_true(procs.n < MAX_PROCS);
    pd_proc_t *p = &procs.p[procs.n++];
    assert_int_equal(pd_start(p, env), 0);
    return p;
}

typedef enum verdict { V_ALLOWED, V_REJECTED, V_FAILED_OPEN, V_FAILED_CLOSED, V_OTHER } verdict_t;

typedef struct outcome {
    verdict_t v;
    grpc_status_code status;
    long limit, remaining, retry_after; /* -1 when absent */
    double elapsed_s;
    char details[256];
} outcome_t;

static long trailer(const gc_result_t *r, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i < r->ntrailers; i++)
        if (strncmp(r->trailers[i], key, kl) == 0 && r->trailers[i][kl] == ':')
            return strtol(r->trailers[i] + kl + 2, NULL, 10);
    return -1;
}

static const char *method_of(int i)
{
    return i == 0 ? BALANCE : i == 1 ? GETPAY : AUTHORIZE;
}

/* One payment call (kind 0 balance, 1 get payment, 2 authorize) from client_id (NULL:
 * none) with x-forwarded-for xff (NULL: none); classifies the limiter's verdict. */
static outcome_t pay_call(gc_t *gc, int kind, const char *client_id, const char *xff)
{
    uint8_t buf[512];
    size_t len = 0;
    if (kind == 0) {
        Payment__V1__GetAccountBalanceRequest q = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
        q.account_id = "rl-test-account";
        len = payment__v1__get_account_balance_request__pack(&q, buf);
    } else if (kind == 1) {
        Payment__V1__GetPaymentRequest q = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
        q.payment_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
        len = payment__v1__get_payment_request__pack(&q, buf);
    } else {
        Payment__V1__AuthorizePaymentRequest q = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
        char key[64];
        static atomic_int seq;
        snprintf(key, sizeof key, "rl-%s-%d", run_id, atomic_fetch_add(&seq, 1));
        q.idempotency_key = key;
        q.payer_account_id = "rl-payer";
        q.payee_account_id = "rl-payee";
        q.amount_cents = 1;
        q.currency = "USD";
        len = payment__v1__authorize_payment_request__pack(&q, buf);
    }
    gc_md_t md[2];
    size_t nmd = 0;
    if (client_id)
        md[nmd++] = (gc_md_t){"x-client-id", client_id};
    if (xff)
        md[nmd++] = (gc_md_t){"x-forwarded-for", xff};
    gc_result_t r;
    double t0 = now_s();
    int rc = gc_unary(gc, method_of(kind), buf, len, 20000, md, nmd, &r);
    outcome_t o = {.elapsed_s = now_s() - t0};
    assert_int_equal(rc, 0);
    o.status = r.status;
    o.limit = trailer(&r, "x-ratelimit-limit");
    o.remaining = trailer(&r, "x-ratelimit-remaining");
    o.retry_after = trailer(&r, "retry-after");
    snprintf(o.details, sizeof o.details, "%.200s", r.details);
    if (r.status == GRPC_STATUS_RESOURCE_EXHAUSTED)
        o.v = V_REJECTED;
    else if (r.status == GRPC_STATUS_UNAVAILABLE && strstr(r.details, "rate limiter unavailable"))
        o.v = V_FAILED_CLOSED;
    else if (o.limit > 0 && o.remaining == o.limit)
        o.v = V_FAILED_OPEN;
    else if (o.limit > 0 && o.remaining >= 0 && o.remaining < o.limit)
        o.v = V_ALLOWED;
    else
        o.v = V_OTHER; /* no rate-limit trailers: a bug */
    gc_result_free(&r);
    return o;
}

/* SIGTERM: the server drains and exits 0 (under ASan, LeakSanitizer's verdict too). */
static void stop_clean(pd_proc_t *p)
{
    int status = 0;
    char desc[64];
    assert_int_equal(pd_signal(p, SIGTERM), 0);
    assert_int_equal(pd_wait(p, 30000, &status), 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "paymentd ended with %s\n", pd_status_str(status, desc, sizeof desc));
        fail();
    }
}

static outcome_t call1(pd_proc_t *p, int kind, const char *client_id, const char *xff)
{
    gc_t *gc;
    assert_int_equal(gc_connect(&gc, p->target), 0);
    outcome_t o = pay_call(gc, kind, client_id, xff);
    gc_close(gc);
    return o;
}

/* ---- concurrent bursts ------------------------------------------------------------------- */

typedef struct burst_thread {
    pthread_t th;
    const char *target;
    const char *client_id;
    int kind;
    pthread_barrier_t *barrier;
    gc_t *gc;
    outcome_t o;
    int rc;
} burst_thread_t;

static void *burst_run(void *arg)
{
    burst_thread_t *t = arg;
    pthread_barrier_wait(t->barrier);
    t->o = pay_call(t->gc, t->kind, t->client_id, NULL);
    return NULL;
}

/* n concurrent calls from client_id, spread over the targets; fills out[n]. */
static void burst(pd_proc_t **targets, int ntargets, const char *client_id, int n, outcome_t *out)
{
    burst_thread_t *t = calloc((size_t)n, sizeof(*t));
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)n);
    for (int i = 0; i < n; i++) {
        t[i] = (burst_thread_t){.target = targets[i % ntargets]->target,
                                .client_id = client_id,
                                .kind = i % 3,
                                .barrier = &barrier};
        assert_int_equal(gc_connect(&t[i].gc, t[i].target), 0);
        /* Connect now, so the burst is not serialised by connection set-up. */
        gc_result_t r;
        Grpc__Health__V1__HealthCheckRequest hq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        hq.service = "";
        assert_int_equal(gc_unary_msg(t[i].gc, CHECK, &hq.base, 10000, &r), 0);
        gc_result_free(&r);
    }
    for (int i = 0; i < n; i++)
        assert_int_equal(pthread_create(&t[i].th, NULL, burst_run, &t[i]), 0);
    for (int i = 0; i < n; i++)
        pthread_join(t[i].th, NULL);
    for (int i = 0; i < n; i++) {
        out[i] = t[i].o;
        gc_close(t[i].gc);
    }
    pthread_barrier_destroy(&barrier);
    free(t);
}

static int count_v(const outcome_t *o, int n, verdict_t v)
{
    int k = 0;
    for (int i = 0; i < n; i++)
        k += o[i].v == v;
    return k;
}

/* ---- tests ------------------------------------------------------------------------------- */

/* 10·L concurrent calls from one client over the three methods: exactly L allowed, each
 * remaining value once; every response carries the limit; another client is unaffected. */
static void test_burst_exact(void **state)
{
    (void)state;
    static const char *const env[] = {"RATE_LIMIT_MAX_REQUESTS=5", "RATE_LIMIT_WINDOW_SECONDS=30",
                                      "RATE_LIMIT_TIMEOUT_MS=2000", NULL};
    pd_proc_t *p = start(env);
    enum { L = 5, N = 50 };
    char client[64];
    snprintf(client, sizeof client, "burst-%s", run_id);
    outcome_t o[N];
    burst(&p, 1, client, N, o);
    assert_int_equal(count_v(o, N, V_ALLOWED), L);
    assert_int_equal(count_v(o, N, V_REJECTED), N - L);
    bool seen[L] = {false};
    for (int i = 0; i < N; i++) {
        assert_int_equal(o[i].limit, L);
        if (o[i].v == V_ALLOWED) {
            assert_in_range(o[i].remaining, 0, L - 1);
            assert_false(seen[o[i].remaining]);
            seen[o[i].remaining] = true;
            assert_int_equal(o[i].retry_after, -1);
        } else {
            assert_int_equal(o[i].remaining, 0);
            assert_in_range(o[i].retry_after, 29, 30);
            assert_non_null(strstr(o[i].details, "rate limit exceeded: 5 requests per 30 s"));
        }
    }
    /* Only the allowed requests are in the window; the key expires with it. */
    assert_int_equal(redis_int("ZCARD ratelimit:all:client:%s", client), L);
    long long pttl = redis_int("PTTL ratelimit:all:client:%s", client);
    assert_true(pttl > 25000 && pttl <= 30000);
    /* Clients are independent: another id still has its whole quota. */
    char other[64];
    snprintf(other, sizeof other, "other-%s", run_id);
    for (int i = 0; i < L; i++) {
        outcome_t x = call1(p, i % 3, other, NULL);
        assert_int_equal(x.v, V_ALLOWED);
        assert_int_equal(x.remaining, L - 1 - i);
    }
    assert_int_equal(call1(p, 0, other, NULL).v, V_REJECTED);
    /* An odd client id (long, binary-ish) is its own bucket too, and works. */
    char odd[400];
    memset(odd, 'x', sizeof odd - 1);
    odd[sizeof odd - 1] = '\0';
    memcpy(odd, "a:b c%~", 7);
    assert_int_equal(call1(p, 0, odd, NULL).v, V_ALLOWED);
    stop_clean(p);
    test_passed = true;
}

/* retry-after is within 1 s of when a slot really frees; the rejected calls made while
 * waiting do not push that back; after the window the whole quota is back. */
static void test_retry_after_and_window(void **state)
{
    (void)state;
    static const char *const env[] = {"RATE_LIMIT_MAX_REQUESTS=3", "RATE_LIMIT_WINDOW_SECONDS=2",
                                      "RATE_LIMIT_TIMEOUT_MS=2000", NULL};
    pd_proc_t *p = start(env);
    char client[64];
    snprintf(client, sizeof client, "retry-%s", run_id);
    gc_t *gc;
    assert_int_equal(gc_connect(&gc, p->target), 0);
    double t_first = now_s();
    for (int i = 0; i < 3; i++)
        assert_int_equal(pay_call(gc, 0, client, NULL).v, V_ALLOWED);
    double t_reject = now_s();
    outcome_t r = pay_call(gc, 0, client, NULL);
    assert_int_equal(r.v, V_REJECTED);
    assert_in_range(r.retry_after, 1, 2);
    /* Hammer it while waiting: every rejection must leave the window alone. */
    double t_free = 0;
    int rejected_meanwhile = 0;
    while (now_s() - t_reject < 5) {
        outcome_t x = pay_call(gc, 0, client, NULL);
        if (x.v == V_ALLOWED) {
            t_free = now_s();
            break;
        }
        assert_int_equal(x.v, V_REJECTED);
        rejected_meanwhile++;
        sleep_s(0.05);
    }
    assert_true(t_free > 0);
    assert_true(rejected_meanwhile >= 5);
    double truth = t_free - t_reject;
    assert_true(truth > (double)r.retry_after - 1.0 && truth < (double)r.retry_after + 1.0);
    assert_true(t_free - t_first < 2.0 + 1.0); /* not extended by the rejections */
    /* After a whole window without calls, the full quota again. */
    sleep_s(2.1);
    for (int i = 0; i < 3; i++) {
        outcome_t x = pay_call(gc, i, client, NULL);
        assert_int_equal(x.v, V_ALLOWED);
        assert_int_equal(x.remaining, 2 - i);
    }
    assert_int_equal(pay_call(gc, 1, client, NULL).v, V_REJECTED);
    gc_close(gc);
    test_passed = true;
}

/* x-forwarded-for: ignored from an untrusted peer (the peer's bucket), honoured from a
 * trusted proxy (the first address's bucket); a client id wins over both. */
static void test_forwarded_for(void **state)
{
    (void)state;
    static const char *const untrusted_env[] = {
        "RATE_LIMIT_MAX_REQUESTS=2", "RATE_LIMIT_WINDOW_SECONDS=30",
        "RATE_LIMIT_TRUSTED_PROXIES=10.9.9.9,192.168.0.0/16", NULL};
    static const char *const trusted_env[] = {
        "RATE_LIMIT_MAX_REQUESTS=2", "RATE_LIMIT_WINDOW_SECONDS=30",
        "RATE_LIMIT_TRUSTED_PROXIES=10.9.9.9,127.0.0.0/8", NULL};
    pd_proc_t *u = start(untrusted_env);
    pd_proc_t *t = start(trusted_env);

    /* Untrusted: three different forwarded addresses, one bucket (the peer 127.0.0.1). */
    assert_int_equal(call1(u, 0, NULL, "10.0.0.1").v, V_ALLOWED);
    assert_int_equal(call1(u, 0, NULL, "10.0.0.2").v, V_ALLOWED);
    outcome_t x = call1(u, 0, NULL, "10.0.0.3");
    assert_int_equal(x.v, V_REJECTED);
    assert_non_null(strstr(x.details, "per peer"));

    /* Trusted: the first address of the list is the identity. The peer bucket is full,
     * yet these pass: they are counted elsewhere. */
    assert_int_equal(call1(t, 0, NULL, "10.0.0.1, 127.0.0.1").v, V_ALLOWED);
    assert_int_equal(call1(t, 1, NULL, " 10.0.0.1 ,10.0.0.7").v, V_ALLOWED);
    x = call1(t, 2, NULL, "10.0.0.1");
    assert_int_equal(x.v, V_REJECTED);
    assert_non_null(strstr(x.details, "per ip"));
    assert_int_equal(call1(t, 0, NULL, "10.0.0.2").v, V_ALLOWED);
    /* The same address written differently (v4-mapped IPv6) is the same bucket. */
    x = call1(t, 0, NULL, "::ffff:10.0.0.2");
    assert_int_equal(x.v, V_ALLOWED);
    assert_int_equal(x.remaining, 0);
    /* Garbage in x-forwarded-for falls back to the peer (full). */
    x = call1(t, 0, NULL, "not-an-address");
    assert_int_equal(x.v, V_REJECTED);
    assert_non_null(strstr(x.details, "per peer"));
    /* A client id wins over the forwarded address. */
    assert_int_equal(call1(t, 0, "xff-client", "10.0.0.1").v, V_ALLOWED);
    test_passed = true;
}

/* A method with its own limit has its own bucket; the others share one. A flushed script
 * cache is reloaded (NOSCRIPT → EVAL) without losing a check. */
static void test_method_limit_and_noscript(void **state)
{
    (void)state;
    static const char *const env[] = {"RATE_LIMIT_MAX_REQUESTS=3", "RATE_LIMIT_WINDOW_SECONDS=30",
                                      "RATE_LIMIT_METHOD_LIMITS=GetPayment=2", NULL};
    pd_proc_t *p = start(env);
    char client[64];
    snprintf(client, sizeof client, "method-%s", run_id);
    outcome_t x = call1(p, 1, client, NULL);
    assert_int_equal(x.v, V_ALLOWED);
    assert_int_equal(x.limit, 2);
    assert_int_equal(x.remaining, 1);
    redis_cmd("SCRIPT FLUSH");
    x = call1(p, 1, client, NULL);
    assert_int_equal(x.v, V_ALLOWED);
    assert_int_equal(x.remaining, 0);
    x = call1(p, 1, client, NULL);
    assert_int_equal(x.v, V_REJECTED);
    assert_non_null(strstr(x.details, "2 requests per 30 s"));
    assert_int_equal(redis_int("ZCARD ratelimit:GetPayment:client:%s", client), 2);
    /* Balance and authorize share the common bucket, untouched so far. */
    x = call1(p, 0, client, NULL);
    assert_int_equal(x.v, V_ALLOWED);
    assert_int_equal(x.limit, 3);
    assert_int_equal(x.remaining, 2);
    x = call1(p, 2, client, NULL);
    assert_int_equal(x.remaining, 1);
    assert_int_equal(x.v, V_ALLOWED);
    test_passed = true;
}

/* Three paymentd instances on one Redis: one global limit. */
static void test_three_instances(void **state)
{
    (void)state;
    static const char *const env[] = {"RATE_LIMIT_MAX_REQUESTS=6", "RATE_LIMIT_WINDOW_SECONDS=30",
                                      "RATE_LIMIT_TIMEOUT_MS=2000", NULL};
    pd_proc_t *ps[3] = {start(env), start(env), start(env)};
    enum { N = 60 };
    char client[64];
    snprintf(client, sizeof client, "global-%s", run_id);
    outcome_t o[N];
    burst(ps, 3, client, N, o);
    assert_int_equal(count_v(o, N, V_ALLOWED), 6);
    assert_int_equal(count_v(o, N, V_REJECTED), N - 6);
    test_passed = true;
}

/* Health and reflection carry no limit, even for an identity over its limit. */
static void test_health_reflection_unlimited(void **state)
{
    (void)state;
    static const char *const env[] = {"RATE_LIMIT_MAX_REQUESTS=1", "RATE_LIMIT_WINDOW_SECONDS=30",
                                      NULL};
    pd_proc_t *p = start(env);
    gc_t *gc;
    assert_int_equal(gc_connect(&gc, p->target), 0);
    assert_int_equal(pay_call(gc, 0, NULL, NULL).v, V_ALLOWED);
    assert_int_equal(pay_call(gc, 0, NULL, NULL).v, V_REJECTED); /* the peer is over */
    assert_int_equal(pay_call(gc, 0, "hc", NULL).v, V_ALLOWED);
    assert_int_equal(pay_call(gc, 0, "hc", NULL).v, V_REJECTED); /* so is client "hc" */
    for (int i = 0; i < 20; i++) {
        Grpc__Health__V1__HealthCheckRequest hq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        hq.service = "";
        uint8_t buf[64];
        size_t len = grpc__health__v1__health_check_request__pack(&hq, buf);
        gc_md_t md[] = {{"x-client-id", "hc"}};
        gc_result_t r;
        assert_int_equal(gc_unary(gc, CHECK, buf, len, 10000, md, i % 2, &r), 0);
        assert_int_equal(r.status, GRPC_STATUS_OK);
        assert_int_equal(trailer(&r, "x-ratelimit-limit"), -1);
        gc_result_free(&r);
    }
    for (int i = 0; i < 5; i++) {
        gc_stream_t *s;
        assert_int_equal(gc_stream_open(gc, REFL_V1, 10000, &s), 0);
        Grpc__Reflection__V1__ServerReflectionRequest rq =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
        rq.message_request_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES;
        rq.list_services = "";
        assert_int_equal(gc_stream_send_msg(s, &rq.base), 0);
        uint8_t *data = NULL;
        size_t len = 0;
        assert_int_equal(gc_stream_recv(s, 10000, &data, &len), 1);
        Grpc__Reflection__V1__ServerReflectionResponse *resp =
            grpc__reflection__v1__server_reflection_response__unpack(NULL, len, data);
        assert_non_null(resp);
        assert_int_equal(
            resp->message_response_case,
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE);
        grpc__reflection__v1__server_reflection_response__free_unpacked(resp, NULL);
        free(data);
        assert_int_equal(gc_stream_half_close(s), 0);
        grpc_status_code code;
        char details[256];
        assert_int_equal(gc_stream_status(s, 10000, &code, details, sizeof details), 0);
        assert_int_equal(code, GRPC_STATUS_OK);
        gc_stream_free(s);
    }
    assert_int_equal(pay_call(gc, 0, "hc", NULL).v, V_REJECTED); /* still over */
    gc_close(gc);
    test_passed = true;
}

/* ---- Redis failures ---------------------------------------------------------------------- */

typedef struct load {
    pthread_t th;
    pd_proc_t *p;
    const char *client;
    atomic_bool stop;
    outcome_t *o;
    double *at;
    int n, cap;
} load_t;

static void *load_run(void *arg)
{
    load_t *l = arg;
    gc_t *gc;
    if (gc_connect(&gc, l->p->target) < 0)
        return NULL;
    while (!atomic_load(&l->stop) && l->n < l->cap) {
        outcome_t o = pay_call(gc, l->n % 3, l->client, NULL);
        l->at[l->n] = now_s();
        l->o[l->n++] = o;
        sleep_s(0.01);
    }
    gc_close(gc);
    return NULL;
}

static int count_log(const pd_proc_t *p, const char *text)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "grep -c -F '%s' '%s'", text, p->log_path);
    FILE *f = popen(cmd, "r");
    int n = 0;
    if (f) {
        if (fscanf(f, "%d", &n) != 1)
            n = 0;
        pclose(f);
    }
    return n;
}

/* Redis stopped while calls flow: fail-open lets them through (counted, logged once),
 * fail-closed ends them UNAVAILABLE; both limit again after Redis is back, no restart. */
static void test_redis_stopped(void **state)
{
    (void)state;
    static const char *const open_env[] = {"RATE_LIMIT_MAX_REQUESTS=3",
                                           "RATE_LIMIT_WINDOW_SECONDS=60",
                                           "RATE_LIMIT_TIMEOUT_MS=300", NULL};
    static const char *const closed_env[] = {
        "RATE_LIMIT_MAX_REQUESTS=3", "RATE_LIMIT_WINDOW_SECONDS=60", "RATE_LIMIT_TIMEOUT_MS=300",
        "RATE_LIMIT_FAIL_OPEN=false", NULL};
    pd_proc_t *po = start(open_env);
    pd_proc_t *pc = start(closed_env);
    enum { CAP = 4000 };
    load_t lo = {.p = po, .client = "load-open", .cap = CAP},
           lc = {.p = pc, .client = "load-closed", .cap = CAP};
    lo.o = calloc(CAP, sizeof(outcome_t));
    lo.at = calloc(CAP, sizeof(double));
    lc.o = calloc(CAP, sizeof(outcome_t));
    lc.at = calloc(CAP, sizeof(double));
    assert_int_equal(pthread_create(&lo.th, NULL, load_run, &lo), 0);
    assert_int_equal(pthread_create(&lc.th, NULL, load_run, &lc), 0);
    sleep_s(0.5);
    stack_drill("redis-stop");
    double t_stopped = now_s();
    sleep_s(1.0);
    double t_restart = now_s();
    stack_drill("redis-start");
    /* Recovery: both limit again within a few seconds (backoff is capped at 2 s). */
    double deadline = now_s() + 8;
    bool open_ok = false, closed_ok = false;
    while (now_s() < deadline && !(open_ok && closed_ok)) {
        sleep_s(0.2);
        for (int i = 0; i < lo.n; i++)
            open_ok |= lo.at[i] > t_restart && lo.o[i].v == V_REJECTED;
        for (int i = 0; i < lc.n; i++)
            closed_ok |= lc.at[i] > t_restart && lc.o[i].v == V_REJECTED;
    }
    atomic_store(&lo.stop, true);
    atomic_store(&lc.stop, true);
    pthread_join(lo.th, NULL);
    pthread_join(lc.th, NULL);
    assert_true(open_ok);
    assert_true(closed_ok);

    /* Before the stop: limited (3 allowed, then rejected). During the outage (calls that
     * started after the stop and ended before the restart): fail open / fail closed. */
    int open_failed = 0, open_during = 0, closed_during = 0;
    for (int i = 0; i < lo.n; i++) {
        const outcome_t *o = &lo.o[i];
        assert_int_not_equal(o->v, V_OTHER);
        assert_int_not_equal(o->v, V_FAILED_CLOSED);
        assert_int_equal(o->limit, 3);
        open_failed += o->v == V_FAILED_OPEN;
        if (lo.at[i] - o->elapsed_s > t_stopped && lo.at[i] < t_restart) {
            assert_int_equal(o->v, V_FAILED_OPEN);
            open_during++;
        }
    }
    for (int i = 0; i < lc.n; i++) {
        const outcome_t *o = &lc.o[i];
        assert_int_not_equal(o->v, V_OTHER);
        assert_int_not_equal(o->v, V_FAILED_OPEN);
        if (lc.at[i] - o->elapsed_s > t_stopped && lc.at[i] < t_restart) {
            assert_int_equal(o->v, V_FAILED_CLOSED);
            assert_int_equal(o->status, GRPC_STATUS_UNAVAILABLE);
            assert_int_equal(o->limit, 3);
            closed_during++;
        }
    }
    assert_true(open_during >= 10);
    assert_true(closed_during >= 10);
    assert_int_equal(lo.o[0].v, V_ALLOWED);
    assert_int_equal(lo.o[3].v, V_REJECTED);
    /* Counted and logged once per outage: one WARNING, then one recovery line with the
     * exact number of requests that went through unlimited. */
    assert_int_equal(count_log(po, "redis unavailable ("), 1);
    char line[128];
    snprintf(line, sizeof line, "redis answers again; %d requests failed open", open_failed);
    assert_int_equal(count_log(po, line), 1);
    assert_int_equal(count_log(pc, "redis unavailable ("), 1);
    assert_int_equal(count_log(pc, "redis answers again;"), 1);
    stop_clean(po);
    stop_clean(pc);
    free(lo.o);
    free(lo.at);
    free(lc.o);
    free(lc.at);
    test_passed = true;
}

/* Redis paused: calls end within the timeout (plus margin) in both modes, then it limits
 * again once the pause is over. */
static void test_redis_paused(void **state)
{
    (void)state;
    static const char *const open_env[] = {"RATE_LIMIT_MAX_REQUESTS=3",
                                           "RATE_LIMIT_WINDOW_SECONDS=60",
                                           "RATE_LIMIT_TIMEOUT_MS=200", NULL};
    static const char *const closed_env[] = {
        "RATE_LIMIT_MAX_REQUESTS=3", "RATE_LIMIT_WINDOW_SECONDS=60", "RATE_LIMIT_TIMEOUT_MS=200",
        "RATE_LIMIT_FAIL_OPEN=false", NULL};
    pd_proc_t *po = start(open_env);
    pd_proc_t *pc = start(closed_env);
    gc_t *go, *gcl;
    assert_int_equal(gc_connect(&go, po->target), 0);
    assert_int_equal(gc_connect(&gcl, pc->target), 0);
    assert_int_equal(pay_call(go, 0, "pause", NULL).v, V_ALLOWED);
    assert_int_equal(pay_call(gcl, 0, "pause", NULL).v, V_ALLOWED);
    double t0 = now_s();
    redis_cmd("CLIENT PAUSE 2000");
    /* Each verdict proves Redis did not answer (the pause lasts 2 s); each call ended
     * within the 200 ms timeout plus a generous margin, well before the pause's end. */
    outcome_t a0 = pay_call(go, 0, "pause", NULL);
    assert_int_equal(a0.v, V_FAILED_OPEN);
    assert_true(a0.elapsed_s < 0.2 + 0.8);
    outcome_t b0 = pay_call(gcl, 0, "pause", NULL);
    assert_int_equal(b0.v, V_FAILED_CLOSED);
    assert_true(b0.elapsed_s < 0.2 + 0.8);
    /* After the pause: Redis decides again. (A check our timer gave up on may still have
     * run in Redis once the pause ended, so the bucket may hold more than the first
     * request: the verdict is Redis', allowed or rejected, no longer failed open/closed.) */
    sleep_s(2.0 - (now_s() - t0) + 0.3);
    double deadline = now_s() + 6;
    outcome_t a = {0}, b = {0};
    while (now_s() < deadline) {
        a = pay_call(go, 0, "pause", NULL);
        if (a.v != V_FAILED_OPEN)
            break;
        sleep_s(0.1);
    }
    assert_true(a.v == V_ALLOWED || a.v == V_REJECTED);
    assert_int_equal(a.limit, 3);
    while (now_s() < deadline) {
        b = pay_call(gcl, 0, "pause", NULL);
        if (b.v != V_FAILED_CLOSED)
            break;
        sleep_s(0.1);
    }
    assert_true(b.v == V_ALLOWED || b.v == V_REJECTED);
    assert_int_equal(b.limit, 3);
    /* One outage, logged once by the limiter. */
    assert_int_equal(count_log(po, "redis unavailable ("), 1);
    assert_int_equal(count_log(pc, "redis unavailable ("), 1);
    gc_close(go);
    gc_close(gcl);
    stop_clean(po);
    stop_clean(pc);
    test_passed = true;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_burst_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retry_after_and_window, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forwarded_for, setup, teardown),
        cmocka_unit_test_setup_teardown(test_method_limit_and_noscript, setup, teardown),
        cmocka_unit_test_setup_teardown(test_three_instances, setup, teardown),
        cmocka_unit_test_setup_teardown(test_health_reflection_unlimited, setup, teardown),
        cmocka_unit_test_setup_teardown(test_redis_stopped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_redis_paused, setup, teardown),
    };
    return cmocka_run_group_tests_name("integration_ratelimit", tests, setup_group, teardown_group);
}
