/*
 * Supervisor tests: restarts with doubling backoff, failed-back taken work and served queued
 * work, pushes during backoff, ordered shutdown with and without a deadline, degraded health.
 * Label `runtime`: also run in TSan.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "runtime/actor.h"
#include "runtime/supervisor.h"

#define MS 1000000ull

enum { K_WORK = 1, K_HOLD, K_POISON };

typedef struct tmsg {
    msg_t hdr;
    int id;
} tmsg_t;

static atomic_int g_freed, g_canceled, g_timedout, g_shutdown, g_other;

static void tmsg_free(msg_t *m)
{
    atomic_fetch_add(&g_freed, 1);
    free(m);
}

static void tmsg_fail(msg_t *m, int err)
{
    if (err == -ECANCELED)
        atomic_fetch_add(&g_canceled, 1);
    else if (err == -ETIMEDOUT)
        atomic_fetch_add(&g_timedout, 1);
    else if (err == -ESHUTDOWN)
        atomic_fetch_add(&g_shutdown, 1);
    else
        atomic_fetch_add(&g_other, 1);
    tmsg_free(m);
}

static tmsg_t *tmsg_new(int kind, int id)
{
    tmsg_t *m = calloc(1, sizeof(*m));

    assert_non_null(m);
    msg_init(&m->hdr, (uint32_t)kind, tmsg_free, tmsg_fail);
    m->id = id;
    return m;
}

static int reset_counters(void **state)
{
    (void)state;
    atomic_store(&g_freed, 0);
    atomic_store(&g_canceled, 0);
    atomic_store(&g_timedout, 0);
    atomic_store(&g_shutdown, 0);
    atomic_store(&g_other, 0);
    return 0;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

#define WAIT_FOR(cond, ms)                                                                         \
    ({                                                                                             \
        bool ok_ = false;                                                                          \
        for (long i_ = 0; i_ < (ms); i_++) {                                                       \
            if (cond) {                                                                            \
                ok_ = true;                                                                        \
                break;                                                                             \
            }                                                                                      \
            sleep_ms(1);                                                                           \
        }                                                                                          \
        ok_ || (cond);                                                                             \
    })

/* A generic test actor: WORK is served (optionally slowly), HOLD is kept on the taken list,
 * POISON fails the incarnation. Records incarnation start times and threads. */
struct ctx {
    atomic_int starts;
    uint64_t start_ns[16];
    pthread_t start_thread;
    atomic_int served;
    atomic_int wrong_thread;
    atomic_int refuse_start; /* start fails while set */
    long work_sleep_us;      /* per WORK message */
    uint64_t first_served_ns;
};

static int t_start(actor_t *a, void *arg, void **state)
{
    struct ctx *c = arg;
    int k = atomic_load(&c->starts);

    if (k < 16)
        c->start_ns[k] = time_now_ns();
    c->start_thread = pthread_self();
    atomic_fetch_add(&c->starts, 1); /* seq_cst: publishes start_ns[k] */
    *state = c;
    if (atomic_load(&c->refuse_start))
        return -ECONNREFUSED;
    return 0;
}

static int t_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct ctx *c = state;

    for (size_t i = 0; i < n; i++) {
        msg_t *m = msgs[i];

        if (!pthread_equal(pthread_self(), c->start_thread))
            atomic_fetch_add(&c->wrong_thread, 1);
        switch (m->type) {
        case K_WORK:
            if (c->work_sleep_us > 0) {
                struct timespec ts = {0, c->work_sleep_us * 1000L};
                nanosleep(&ts, NULL);
            }
            if (c->first_served_ns == 0)
                c->first_served_ns = time_now_ns();
            actor_done(a, m);
            msg_dispose(m);
            atomic_fetch_add(&c->served, 1);
            break;
        case K_HOLD:
            break; /* stays on the taken list */
        case K_POISON:
            return -EIO;
        default:
            return -EINVAL;
        }
    }
    return 0;
}

static actor_spec_t t_spec(const char *name, struct ctx *c)
{
    return (actor_spec_t){.name = name, .start = t_start, .handle = t_handle, .arg = c};
}

/* Three failures: restarted three times, each delay at least double the last; taken work
 * failed back with -ECANCELED, queued work served by the next incarnation. */
static void test_restart_backoff_doubles(void **state)
{
    supervisor_config_t cfg = {
        .backoff_base_ns = 50 * MS, .backoff_cap_ns = 2000 * MS, .degraded_after = 10};
    struct ctx c = {0};
    actor_spec_t spec = t_spec("crashy", &c);
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    int id = 0;

    (void)state;
    spec.batch_max = 6;
    spec.mailbox_capacity = 63;
    assert_int_equal(supervisor_create(&s, &cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    /* Each incarnation takes one batch of 6: five held, then the poison. */
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 5; i++)
            assert_int_equal(actor_send(a, &tmsg_new(K_HOLD, id++)->hdr), 0);
        assert_int_equal(actor_send(a, &tmsg_new(K_POISON, id++)->hdr), 0);
    }
    for (int i = 0; i < 10; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_WORK, id++)->hdr), 0);
    assert_int_equal(supervisor_start(s), 0);

    assert_true(WAIT_FOR(atomic_load(&c.served) == 10, 20000));
    actor_stats(a, &st);
    assert_int_equal(atomic_load(&c.starts), 4);
    assert_int_equal(st.restarts, 3);
    assert_int_equal(atomic_load(&g_canceled), 18);
    assert_int_equal(st.failed_back, 18);
    assert_int_equal(st.messages, 28);
    assert_true(st.up);
    for (int k = 1; k < 4; k++) {
        uint64_t gap = c.start_ns[k] - c.start_ns[k - 1];
        uint64_t min = (50 * MS) << (k - 1); /* 50, 100, 200 ms */

        print_message("restart %d after %llu ms (backoff >= %llu ms)\n", k,
                      (unsigned long long)(gap / MS), (unsigned long long)(min / MS));
        assert_true(gap >= min);
    }
    assert_true(supervisor_healthy(s)); /* not critical */
    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000 * MS), 0);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_freed), 28);
    assert_int_equal(atomic_load(&g_shutdown) + atomic_load(&g_timedout), 0);
}

/* While the actor waits for its restart, pushes are accepted up to capacity and refused
 * beyond; expired ones fail -ETIMEDOUT when the next incarnation takes them. */
static void test_pushes_during_backoff(void **state)
{
    supervisor_config_t cfg = {.backoff_base_ns = 1000 * MS, .backoff_cap_ns = 2000 * MS};
    struct ctx c = {0};
    actor_spec_t spec = t_spec("backoff", &c);
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    tmsg_t *refused;

    (void)state;
    spec.mailbox_capacity = 15;
    assert_int_equal(supervisor_create(&s, &cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_POISON, 0)->hdr), 0);
    assert_int_equal(supervisor_start(s), 0);
    assert_true(WAIT_FOR(atomic_load(&g_canceled) == 1, 5000));
    actor_stats(a, &st);
    assert_false(st.up);
    assert_int_equal(st.restarts, 0); /* not yet: it is in its 1 s backoff */

    for (int i = 0; i < 15; i++) {
        tmsg_t *m = tmsg_new(K_WORK, i + 1);

        if (i == 0)
            m->hdr.deadline_ns = time_now_ns() + 50 * MS; /* expires during the backoff */
        assert_int_equal(actor_send(a, &m->hdr), 0);
    }
    refused = tmsg_new(K_WORK, 99);
    assert_int_equal(actor_send(a, &refused->hdr), -EAGAIN);
    msg_dispose(&refused->hdr);
    actor_stats(a, &st);
    assert_int_equal(st.depth, 15);

    assert_true(WAIT_FOR(atomic_load(&c.served) == 14, 5000));
    assert_int_equal(atomic_load(&g_timedout), 1);
    actor_stats(a, &st);
    assert_int_equal(st.restarts, 1);
    assert_int_equal(st.failed_back, 2);
    assert_int_equal(atomic_load(&c.starts), 2);
    assert_true(c.start_ns[1] - c.start_ns[0] >= 1000 * MS);
    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000 * MS), 0);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_freed), 17);
}

/* Shutdown lets the actor process every queued message, on its own thread, and finish the
 * work it holds (completed later by a timer) before stopping it. */
struct hold_ctx {
    struct ctx base;
    msg_t *held[64];
    int nheld;
    atomic_int completed;
    atomic_int timer_wrong_thread;
};

static int h_tick(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    struct hold_ctx *h = state;

    if (!pthread_equal(pthread_self(), h->base.start_thread))
        atomic_fetch_add(&h->timer_wrong_thread, 1);
    if (h->nheld > 0) {
        msg_t *m = h->held[--h->nheld];

        actor_done(a, m);
        msg_dispose(m);
        atomic_fetch_add(&h->completed, 1);
    }
    return 0;
}

static int h_start(actor_t *a, void *arg, void **state)
{
    struct hold_ctx *h = arg;
    actor_timer_t *t;
    int rc = t_start(a, &h->base, state);

    *state = h;
    if (rc < 0)
        return rc;
    if ((rc = actor_timer_new(&t, a, h_tick, NULL)) < 0)
        return rc;
    return actor_timer_arm(t, 2 * MS, 2 * MS);
}

static int h_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct hold_ctx *h = state;

    for (size_t i = 0; i < n; i++)
        if (msgs[i]->type == K_HOLD)
            h->held[h->nheld++] = msgs[i];
    return t_handle(a, &h->base, msgs, n);
}

static void test_shutdown_drains_on_actor_thread(void **state)
{
    struct hold_ctx h = {0};
    actor_spec_t spec = {.name = "drain",
                         .start = h_start,
                         .handle = h_handle,
                         .arg = &h,
                         .mailbox_capacity = 2047,
                         .batch_max = 32};
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    tmsg_t *late;

    (void)state;
    assert_int_equal(supervisor_create(&s, NULL), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    for (int i = 0; i < 20; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_HOLD, i)->hdr), 0);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_WORK, i)->hdr), 0);
    assert_int_equal(supervisor_start(s), 0);
    /* At once: everything is still queued or held. */
    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 10000 * MS), 0);

    assert_int_equal(atomic_load(&h.base.served), 1000);
    assert_int_equal(atomic_load(&h.completed), 20);
    assert_int_equal(atomic_load(&h.base.wrong_thread), 0);
    assert_int_equal(atomic_load(&h.timer_wrong_thread), 0);
    assert_int_equal(atomic_load(&h.base.starts), 1);
    actor_stats(a, &st);
    assert_int_equal(st.messages, 1020);
    assert_int_equal(st.failed_back, 0);
    assert_false(st.up);
    late = tmsg_new(K_WORK, 0);
    assert_int_equal(actor_send(a, &late->hdr), -ESHUTDOWN);
    msg_dispose(&late->hdr);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_freed), 1021);
    assert_int_equal(atomic_load(&g_canceled) + atomic_load(&g_shutdown), 0);
}

/* Shutdown also waits for work the actor tracks itself (spec.idle), not only messages. */
struct busy {
    int pending; /* actor thread only */
    atomic_int finished;
};

static int busy_tick(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    struct busy *b = state;

    if (b->pending > 0 && --b->pending == 0)
        atomic_store(&b->finished, 1);
    return 0;
}

static int busy_start(actor_t *a, void *arg, void **state)
{
    struct busy *b = arg;
    actor_timer_t *t;
    int rc;

    *state = b;
    b->pending = 20;
    if ((rc = actor_timer_new(&t, a, busy_tick, NULL)) < 0)
        return rc;
    return actor_timer_arm(t, 5 * MS, 5 * MS);
}

static bool busy_idle(actor_t *a, void *state)
{
    return ((struct busy *)state)->pending == 0;
}

static void test_shutdown_waits_for_idle(void **state)
{
    struct busy b = {0};
    actor_spec_t spec = {
        .name = "busy", .start = busy_start, .handle = t_handle, .idle = busy_idle, .arg = &b};
    supervisor_t *s;
    uint64_t t0;

    (void)state;
    assert_int_equal(supervisor_create(&s, NULL), 0);
    assert_int_equal(supervisor_add(s, &spec, NULL), 0);
    assert_int_equal(supervisor_start(s), 0);
    t0 = time_now_ns();
    assert_int_equal(supervisor_shutdown(s, t0 + 10000 * MS), 0);
    assert_int_equal(atomic_load(&b.finished), 1);
    assert_true(time_now_ns() - t0 >= 100 * MS - 5 * MS); /* 20 ticks of 5 ms */
    supervisor_destroy(s);
}

/* With a short deadline: what was processed plus what was failed back equals what was
 * queued, exactly; held work is failed back too. */
static void test_shutdown_deadline_fails_back_the_rest(void **state)
{
    struct ctx c = {.work_sleep_us = 2000};
    actor_spec_t spec = t_spec("slow", &c);
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    uint64_t t0;
    int processed;

    (void)state;
    spec.mailbox_capacity = 2047;
    spec.batch_max = 8;
    assert_int_equal(supervisor_create(&s, NULL), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_HOLD, i)->hdr), 0);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_WORK, i)->hdr), 0);
    assert_int_equal(supervisor_start(s), 0);
    t0 = time_now_ns();
    assert_int_equal(supervisor_shutdown(s, t0 + 300 * MS), -ETIMEDOUT);
    /* It stops soon after the deadline: one batch (8 x 2 ms) plus slack. */
    assert_true(time_now_ns() - t0 < 2000 * MS);

    processed = atomic_load(&c.served);
    print_message("deadline: %d processed, %d failed back\n", processed, atomic_load(&g_shutdown));
    assert_true(processed > 0);
    assert_true(processed < 1000);
    assert_int_equal(processed + atomic_load(&g_shutdown), 1005);
    assert_int_equal(atomic_load(&g_canceled) + atomic_load(&g_timedout), 0);
    actor_stats(a, &st);
    assert_int_equal(st.failed_back, (uint64_t)(1005 - processed));
    assert_int_equal(st.depth, 0);
    assert_int_equal(atomic_load(&c.wrong_thread), 0);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_freed), 1005);
}

/* An actor in backoff at shutdown gets one incarnation at once to drain its queue. */
static void test_shutdown_during_backoff_drains(void **state)
{
    supervisor_config_t cfg = {.backoff_base_ns = 5000 * MS, .backoff_cap_ns = 5000 * MS};
    struct ctx c = {0};
    actor_spec_t spec = t_spec("late", &c);
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    uint64_t t0;

    (void)state;
    assert_int_equal(supervisor_create(&s, &cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_POISON, 0)->hdr), 0);
    assert_int_equal(supervisor_start(s), 0);
    assert_true(WAIT_FOR(atomic_load(&g_canceled) == 1, 5000));
    for (int i = 0; i < 10; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_WORK, i)->hdr), 0);
    t0 = time_now_ns();
    assert_int_equal(supervisor_shutdown(s, t0 + 3000 * MS), 0);
    assert_true(time_now_ns() - t0 < 3000 * MS); /* did not wait for the 5 s backoff */
    assert_int_equal(atomic_load(&c.served), 10);
    actor_stats(a, &st);
    assert_int_equal(st.restarts, 1);
    assert_int_equal(atomic_load(&c.starts), 2);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_freed), 11);
}

/* An incarnation that fails while draining at shutdown is replaced once, at once. */
static void test_failure_during_drain_restarts_once(void **state)
{
    supervisor_config_t cfg = {.backoff_base_ns = 5000 * MS, .backoff_cap_ns = 5000 * MS};
    struct ctx c = {0};
    actor_spec_t spec = t_spec("drainfail", &c);
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    uint64_t t0;

    (void)state;
    spec.batch_max = 1; /* a failure takes down only the message being handled */
    assert_int_equal(supervisor_create(&s, &cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_WORK, i)->hdr), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_POISON, 5)->hdr), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_POISON, 6)->hdr), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(actor_send(a, &tmsg_new(K_WORK, 7 + i)->hdr), 0);
    assert_int_equal(supervisor_start(s), 0);
    t0 = time_now_ns();
    /* Whether the first poison hits before or during the shutdown, the second one ends
     * the one extra incarnation: the five WORK behind it are failed back. */
    assert_int_equal(supervisor_shutdown(s, t0 + 3000 * MS), -ETIMEDOUT);
    assert_true(time_now_ns() - t0 < 3000 * MS);
    assert_int_equal(atomic_load(&c.served), 5);
    assert_int_equal(atomic_load(&g_canceled), 2);
    assert_int_equal(atomic_load(&g_shutdown), 5);
    actor_stats(a, &st);
    assert_int_equal(st.restarts, 1);
    assert_int_equal(st.failed_back, 7);
    assert_int_equal(atomic_load(&c.starts), 2);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_freed), 12);
}

/* A timer callback that fails ends the incarnation like a failing handle. */
static int fail_once_tick(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    struct ctx *c = state;

    return atomic_load(&c->starts) == 1 ? -EIO : 0;
}

static int fail_once_start(actor_t *a, void *arg, void **state)
{
    actor_timer_t *t;
    int rc = t_start(a, arg, state);

    if (rc < 0)
        return rc;
    if ((rc = actor_timer_new(&t, a, fail_once_tick, NULL)) < 0)
        return rc;
    return actor_timer_arm(t, 5 * MS, 0);
}

static void test_callback_failure_restarts(void **state)
{
    supervisor_config_t cfg = {.backoff_base_ns = 10 * MS, .backoff_cap_ns = 100 * MS};
    struct ctx c = {0};
    actor_spec_t spec = t_spec("cbfail", &c);
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;

    (void)state;
    spec.start = fail_once_start;
    assert_int_equal(supervisor_create(&s, &cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    assert_int_equal(supervisor_start(s), 0);
    assert_true(WAIT_FOR(({
                             actor_stats(a, &st);
                             st.restarts == 1 && st.up;
                         }),
                         5000));
    sleep_ms(50); /* the second incarnation's timer fires and does not fail */
    actor_stats(a, &st);
    assert_int_equal(st.restarts, 1);
    assert_true(st.up);
    assert_int_equal(atomic_load(&c.starts), 2);
    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000 * MS), 0);
    supervisor_destroy(s);
}

/* A critical actor that keeps failing makes the supervisor unhealthy after degraded_after
 * failures; it keeps being retried at the cap and is healthy again once it runs cleanly.
 * A non-critical actor that always fails never affects health. */
static void test_health_degraded_and_recovered(void **state)
{
    supervisor_config_t cfg = {.backoff_base_ns = 20 * MS,
                               .backoff_cap_ns = 80 * MS,
                               .degraded_after = 3,
                               .stable_ns = 300 * MS};
    struct ctx crit = {0}, flaky = {0};
    actor_spec_t spec_crit = t_spec("critical", &crit);
    actor_spec_t spec_flaky = t_spec("flaky", &flaky);
    supervisor_t *s;
    actor_t *a, *f;
    actor_stats_t st;
    int starts_then;

    (void)state;
    spec_crit.critical = true;
    atomic_store(&crit.refuse_start, 1);
    atomic_store(&flaky.refuse_start, 1);
    assert_int_equal(supervisor_create(&s, &cfg), 0);
    assert_int_equal(supervisor_add(s, &spec_crit, &a), 0);
    assert_int_equal(supervisor_add(s, &spec_flaky, &f), 0);
    assert_true(supervisor_healthy(s));
    assert_int_equal(supervisor_start(s), 0);

    assert_true(WAIT_FOR(!supervisor_healthy(s), 5000));
    assert_true(atomic_load(&crit.starts) >= 3);
    /* Still retried, at the cap (80 ms): several more attempts within a second. */
    starts_then = atomic_load(&crit.starts);
    sleep_ms(1000);
    assert_true(atomic_load(&crit.starts) - starts_then >= 5);
    assert_false(supervisor_healthy(s));

    atomic_store(&crit.refuse_start, 0);
    assert_true(WAIT_FOR(supervisor_healthy(s), 5000));
    actor_stats(a, &st);
    assert_true(st.up);
    assert_true(st.restarts >= 8);
    actor_stats(f, &st);
    assert_false(st.up);
    assert_true(st.restarts >= 8);
    assert_true(supervisor_healthy(s)); /* the flaky one is not critical */

    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000 * MS), 0);
    supervisor_destroy(s);
}

static void collect_name(actor_t *a, void *arg)
{
    char *buf = arg;

    strcat(buf, actor_name(a));
    strcat(buf, ";");
}

static void test_config_and_spec_validation(void **state)
{
    supervisor_config_t bad = {.backoff_base_ns = 200 * MS, .backoff_cap_ns = 100 * MS};
    actor_spec_t no_handle = {.name = "x"};
    actor_spec_t no_name = {.handle = t_handle};
    supervisor_t *s = NULL;
    actor_t *a = NULL;

    (void)state;
    assert_int_equal(supervisor_create(&s, &bad), -EINVAL);
    assert_null(s);
    assert_int_equal(supervisor_create(&s, NULL), 0);
    assert_int_equal(supervisor_add(s, &no_handle, &a), -EINVAL);
    assert_int_equal(supervisor_add(s, &no_name, &a), -EINVAL);
    assert_null(a);
    /* Never started: destroy still fails queued work back, and leaks nothing. */
    struct ctx c = {0};
    actor_spec_t spec = t_spec("unstarted", &c);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    actor_spec_t spec2 = t_spec("second", &c);
    assert_int_equal(supervisor_add(s, &spec2, NULL), 0);
    char names[64] = "";
    supervisor_foreach(s, collect_name, names);
    assert_string_equal(names, "unstarted;second;");
    assert_int_equal(actor_send(a, &tmsg_new(K_WORK, 0)->hdr), 0);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_shutdown), 1);
    assert_int_equal(atomic_load(&c.starts), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_restart_backoff_doubles, reset_counters),
        cmocka_unit_test_setup(test_pushes_during_backoff, reset_counters),
        cmocka_unit_test_setup(test_shutdown_drains_on_actor_thread, reset_counters),
        cmocka_unit_test_setup(test_shutdown_waits_for_idle, reset_counters),
        cmocka_unit_test_setup(test_shutdown_deadline_fails_back_the_rest, reset_counters),
        cmocka_unit_test_setup(test_shutdown_during_backoff_drains, reset_counters),
        cmocka_unit_test_setup(test_failure_during_drain_restarts_once, reset_counters),
        cmocka_unit_test_setup(test_callback_failure_restarts, reset_counters),
        cmocka_unit_test_setup(test_health_degraded_and_recovered, reset_counters),
        cmocka_unit_test_setup(test_config_and_spec_validation, reset_counters),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
