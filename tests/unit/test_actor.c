/*
 * Actor tests: messages handled in order on the incarnation's own thread, deadlines,
 * actor_forward, timers and fds, and an idle system that costs no CPU yet answers pings.
 * Label `runtime`: also run in TSan.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "runtime/actor.h"
#include "runtime/supervisor.h"

enum { K_WORK = 1, K_HOLD, K_FWD, K_STASH, K_PING, K_UNWATCH };

typedef struct tmsg {
    msg_t hdr;
    int id;
    int reply_fd; /* K_PING: eventfd to answer on */
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
    m->reply_fd = -1;
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

/* Polls cond every millisecond for up to ms; true if it became true. */
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

static const supervisor_config_t fast_cfg = {
    .backoff_base_ns = 10 * 1000000ull,
    .backoff_cap_ns = 100 * 1000000ull,
};

/* ---------- order and thread ---------- */

struct order_ctx {
    pthread_t start_thread;
    atomic_int handled;
    atomic_int wrong_thread;
    atomic_int out_of_order;
    int next_id;
};

static int order_start(actor_t *a, void *arg, void **state)
{
    struct order_ctx *c = arg;

    c->start_thread = pthread_self();
    *state = c;
    return 0;
}

static int order_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct order_ctx *c = state;

    for (size_t i = 0; i < n; i++) {
        tmsg_t *m = (tmsg_t *)msgs[i];

        if (!pthread_equal(pthread_self(), c->start_thread))
            atomic_fetch_add(&c->wrong_thread, 1);
        if (m->id != c->next_id++)
            atomic_fetch_add(&c->out_of_order, 1);
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
        atomic_fetch_add(&c->handled, 1);
    }
    return 0;
}

static void test_handles_in_order_on_own_thread(void **state)
{
    struct order_ctx c = {0};
    actor_spec_t spec = {.name = "order",
                         .start = order_start,
                         .handle = order_handle,
                         .arg = &c,
                         .mailbox_capacity = 1023,
                         .batch_max = 16};
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    tmsg_t *late;
    int sent = 0;

    (void)state;
    assert_int_equal(supervisor_create(&s, &fast_cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    assert_string_equal(actor_name(a), "order");
    assert_int_equal(mailbox_capacity(actor_mailbox(a)), 1023);
    assert_int_equal(supervisor_start(s), 0);
    while (sent < 2000) {
        tmsg_t *m = tmsg_new(K_WORK, sent);
        int rc = actor_send(a, &m->hdr);

        if (rc == -EAGAIN) { /* shed: the sender keeps it and tries again */
            msg_dispose(&m->hdr);
            sleep_ms(1);
            continue;
        }
        assert_int_equal(rc, 0);
        sent++;
    }
    assert_true(WAIT_FOR(atomic_load(&c.handled) == 2000, 10000));
    actor_stats(a, &st);
    assert_int_equal(st.messages, 2000);
    assert_int_equal(st.failed_back, 0);
    assert_int_equal(st.restarts, 0);
    assert_int_equal(st.depth, 0);
    assert_true(st.up);
    assert_true(st.queue_wait_ns > 0);
    assert_int_equal(atomic_load(&c.wrong_thread), 0);
    assert_int_equal(atomic_load(&c.out_of_order), 0);
    assert_true(supervisor_healthy(s));

    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000000000ull), 0);
    actor_stats(a, &st);
    assert_false(st.up);
    /* Closed mailbox: refused with -ESHUTDOWN, the message is still ours. */
    late = tmsg_new(K_WORK, 1);
    assert_int_equal(actor_send(a, &late->hdr), -ESHUTDOWN);
    msg_dispose(&late->hdr);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_canceled) + atomic_load(&g_shutdown), 0);
}

/* ---------- deadlines ---------- */

static int count_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    atomic_int *seen = state; /* bit per id */

    for (size_t i = 0; i < n; i++) {
        atomic_fetch_or(seen, 1 << ((tmsg_t *)msgs[i])->id);
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
    }
    return 0;
}

static int count_start(actor_t *a, void *arg, void **state)
{
    *state = arg;
    return 0;
}

static void test_expired_messages_fail_with_etimedout(void **state)
{
    atomic_int seen = 0;
    actor_spec_t spec = {
        .name = "deadline", .start = count_start, .handle = count_handle, .arg = &seen};
    /* id: 0 past, 1 none, 2 future, 3 past, 4 none, 5 future, 6 none, 7 past */
    const int kind[8] = {0, 1, 2, 0, 1, 2, 1, 0};
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    uint64_t now = time_now_ns();

    (void)state;
    assert_int_equal(supervisor_create(&s, &fast_cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    for (int i = 0; i < 8; i++) {
        tmsg_t *m = tmsg_new(K_WORK, i);

        if (kind[i] == 0)
            m->hdr.deadline_ns = now - 1;
        else if (kind[i] == 2)
            m->hdr.deadline_ns = now + 60000000000ull;
        assert_int_equal(actor_send(a, &m->hdr), 0);
    }
    assert_int_equal(supervisor_start(s), 0);
    assert_true(WAIT_FOR(atomic_load(&g_freed) == 8, 5000));
    assert_int_equal(atomic_load(&seen), (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6));
    assert_int_equal(atomic_load(&g_timedout), 3);
    actor_stats(a, &st);
    assert_int_equal(st.messages, 5);
    assert_int_equal(st.failed_back, 3);
    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000000000ull), 0);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_canceled) + atomic_load(&g_shutdown), 0);
}

/* ---------- forward ---------- */

struct fwd_ctx {
    mailbox_t *to;   /* B's mailbox */
    mailbox_t *full; /* a mailbox with no room */
    atomic_int fwd_ok;
    atomic_int stash_rc;
    msg_t *stash; /* refused forward: ours again, off the taken list */
    atomic_int holding;
};

static int fwd_start(actor_t *a, void *arg, void **state)
{
    *state = arg;
    return 0;
}

static int fwd_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct fwd_ctx *c = state;

    for (size_t i = 0; i < n; i++) {
        msg_t *m = msgs[i];
        int rc;

        switch (m->type) {
        case K_FWD:
            rc = actor_forward(a, m, c->to);
            if (rc == 0)
                atomic_fetch_add(&c->fwd_ok, 1);
            break;
        case K_STASH:
            rc = actor_forward(a, m, c->full);
            atomic_store(&c->stash_rc, rc);
            if (rc < 0)
                c->stash = m;
            break;
        case K_HOLD:
            atomic_fetch_add(&c->holding, 1);
            break;
        default:
            return -EINVAL;
        }
    }
    return 0;
}

static void fwd_stop(actor_t *a, void *state)
{
    struct fwd_ctx *c = state;

    msg_dispose(c->stash); /* the actor's own again: its stop frees it */
    c->stash = NULL;
}

static void test_forward_moves_ownership(void **state)
{
    struct fwd_ctx c = {0};
    atomic_int seen_b = 0;
    actor_spec_t spec_a = {
        .name = "fwd-a", .start = fwd_start, .handle = fwd_handle, .stop = fwd_stop, .arg = &c};
    actor_spec_t spec_b = {
        .name = "fwd-b", .start = count_start, .handle = count_handle, .arg = &seen_b};
    supervisor_t *s;
    actor_t *a, *b;
    actor_stats_t st;
    tmsg_t *filler = tmsg_new(K_WORK, 0);

    (void)state;
    assert_int_equal(mailbox_create(&c.full, "full", 1), 0);
    assert_int_equal(mailbox_push(c.full, &filler->hdr), 0);
    assert_int_equal(supervisor_create(&s, &fast_cfg), 0);
    assert_int_equal(supervisor_add(s, &spec_a, &a), 0);
    assert_int_equal(supervisor_add(s, &spec_b, &b), 0);
    c.to = actor_mailbox(b);
    assert_int_equal(actor_send(a, &tmsg_new(K_FWD, 1)->hdr), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_FWD, 2)->hdr), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_STASH, 3)->hdr), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_HOLD, 4)->hdr), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_FWD, 5)->hdr), 0);
    assert_int_equal(actor_send(a, &tmsg_new(K_HOLD, 6)->hdr), 0);
    assert_int_equal(supervisor_start(s), 0);

    assert_true(WAIT_FOR(atomic_load(&seen_b) == ((1 << 1) | (1 << 2) | (1 << 5)), 5000));
    assert_true(WAIT_FOR(atomic_load(&c.holding) == 2, 5000));
    assert_int_equal(atomic_load(&c.fwd_ok), 3);
    assert_int_equal(atomic_load(&c.stash_rc), -EAGAIN);
    assert_int_equal(mailbox_depth(c.full), 1);

    /* A dies: only what is still on its taken list (the two HOLDs) is failed back. The
     * forwarded ones belong to B and the refused one is A's own state, freed by stop. */
    actor_inject_fault(a);
    assert_true(WAIT_FOR(({
                             actor_stats(a, &st);
                             st.restarts == 1 && st.up;
                         }),
                         5000));
    assert_int_equal(atomic_load(&g_canceled), 2);
    assert_int_equal(st.failed_back, 2);
    assert_int_equal(st.messages, 6);
    actor_stats(b, &st);
    assert_int_equal(st.messages, 3);
    assert_int_equal(st.restarts, 0);
    /* 3 forwarded freed by B, 1 stash freed by stop, 2 cancelled */
    assert_int_equal(atomic_load(&g_freed), 6);

    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000000000ull), 0);
    supervisor_destroy(s);
    mailbox_destroy(c.full);
    assert_int_equal(atomic_load(&g_shutdown), 1); /* the filler, by mailbox_destroy */
    assert_int_equal(atomic_load(&g_other) + atomic_load(&g_timedout), 0);
}

/* ---------- timers and fds ---------- */

struct tf_ctx {
    int pipe_rd;
    actor_timer_t *periodic;
    atomic_int ticks;
    atomic_int oneshot;
    atomic_int bytes;
    atomic_int ticks_at_unwatch;
};

static int tf_tick(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    struct tf_ctx *c = state;

    atomic_fetch_add(&c->ticks, 1);
    return 0;
}

static int tf_oneshot(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    struct tf_ctx *c = state;

    atomic_fetch_add(&c->oneshot, 1);
    actor_timer_free(t); /* freeing the firing timer from its own callback is allowed */
    return 0;
}

static int tf_readable(actor_t *a, void *state, int fd, uint32_t events, void *arg)
{
    struct tf_ctx *c = state;
    char buf[64];
    ssize_t n;

    while ((n = read(fd, buf, sizeof(buf))) > 0)
        atomic_fetch_add(&c->bytes, (int)n);
    return 0;
}

static int tf_start(actor_t *a, void *arg, void **state)
{
    struct tf_ctx *c = arg;
    actor_timer_t *once;
    int rc;

    *state = c;
    if ((rc = actor_timer_new(&c->periodic, a, tf_tick, NULL)) < 0)
        return rc;
    if ((rc = actor_timer_arm(c->periodic, 10000000ull, 10000000ull)) < 0)
        return rc;
    if ((rc = actor_timer_new(&once, a, tf_oneshot, NULL)) < 0)
        return rc;
    if ((rc = actor_timer_arm(once, 30000000ull, 0)) < 0)
        return rc;
    return actor_watch_fd(a, c->pipe_rd, EPOLLIN, tf_readable, NULL);
}

static int tf_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct tf_ctx *c = state;

    for (size_t i = 0; i < n; i++) {
        if (msgs[i]->type == K_UNWATCH) {
            int rc = actor_unwatch_fd(a, c->pipe_rd);

            if (rc < 0)
                return rc;
            if (actor_unwatch_fd(a, c->pipe_rd) != -ENOENT)
                return -EPROTO;
            if ((rc = actor_timer_arm(c->periodic, 0, 0)) < 0)
                return rc;
            atomic_store(&c->ticks_at_unwatch, atomic_load(&c->ticks));
        }
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
    }
    return 0;
}

static void test_timers_and_fds(void **state)
{
    struct tf_ctx c = {0};
    actor_spec_t spec = {.name = "timers", .start = tf_start, .handle = tf_handle, .arg = &c};
    supervisor_t *s;
    actor_t *a;
    actor_stats_t st;
    int p[2];

    (void)state;
    assert_int_equal(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
    c.pipe_rd = p[0];
    atomic_store(&c.ticks_at_unwatch, -1);
    assert_int_equal(supervisor_create(&s, &fast_cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &a), 0);
    assert_int_equal(supervisor_start(s), 0);

    assert_int_equal(write(p[1], "hello", 5), 5);
    assert_true(WAIT_FOR(atomic_load(&c.bytes) == 5, 5000));
    assert_true(WAIT_FOR(atomic_load(&c.ticks) >= 5, 5000));
    assert_true(WAIT_FOR(atomic_load(&c.oneshot) == 1, 5000));

    assert_int_equal(actor_send(a, &tmsg_new(K_UNWATCH, 0)->hdr), 0);
    assert_true(WAIT_FOR(atomic_load(&c.ticks_at_unwatch) >= 0, 5000));
    assert_int_equal(write(p[1], "more", 4), 4);
    sleep_ms(150);
    assert_int_equal(atomic_load(&c.bytes), 5);
    assert_int_equal(atomic_load(&c.ticks), atomic_load(&c.ticks_at_unwatch));
    assert_int_equal(atomic_load(&c.oneshot), 1);
    actor_stats(a, &st);
    assert_int_equal(st.restarts, 0);
    assert_true(st.up);

    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000000000ull), 0);
    supervisor_destroy(s);
    close(p[0]);
    close(p[1]);
}

/* ---------- a mailbox that never empties still lets timers fire ---------- */

struct flood {
    actor_t *a;
    atomic_int stop;
    atomic_int ticks;
    atomic_int handled;
};

static int flood_tick(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    atomic_fetch_add(&((struct flood *)state)->ticks, 1);
    return 0;
}

static int flood_start(actor_t *a, void *arg, void **state)
{
    actor_timer_t *t;
    int rc;

    *state = arg;
    if ((rc = actor_timer_new(&t, a, flood_tick, NULL)) < 0)
        return rc;
    return actor_timer_arm(t, 5000000ull, 5000000ull);
}

static int flood_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct flood *f = state;

    for (size_t i = 0; i < n; i++) {
        uint64_t until = time_now_ns() + 50000; /* 50 us of work each */

        while (time_now_ns() < until)
            ;
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
        atomic_fetch_add(&f->handled, 1);
    }
    return 0;
}

static void *flood_producer(void *arg)
{
    struct flood *f = arg;

    while (!atomic_load(&f->stop)) {
        tmsg_t *m = calloc(1, sizeof(*m));

        if (m == NULL)
            abort();
        msg_init(&m->hdr, K_WORK, tmsg_free, tmsg_fail);
        if (actor_send(f->a, &m->hdr) != 0) {
            free(m);
            sched_yield();
        }
    }
    return NULL;
}

static void test_busy_mailbox_still_serves_timers(void **state)
{
    struct flood f = {0};
    /* Capacity below batch_max: every pop is a partial batch, yet the mailbox never
     * empties while the producer runs. */
    actor_spec_t spec = {.name = "flooded",
                         .start = flood_start,
                         .handle = flood_handle,
                         .arg = &f,
                         .mailbox_capacity = 16,
                         .batch_max = 64};
    supervisor_t *s;
    pthread_t prod;
    int ticks_before;

    (void)state;
    assert_int_equal(supervisor_create(&s, &fast_cfg), 0);
    assert_int_equal(supervisor_add(s, &spec, &f.a), 0);
    assert_int_equal(supervisor_start(s), 0);
    assert_int_equal(pthread_create(&prod, NULL, flood_producer, &f), 0);
    assert_true(WAIT_FOR(atomic_load(&f.handled) >= 100, 5000));
    ticks_before = atomic_load(&f.ticks);
    sleep_ms(300);
    /* ~60 ticks of 5 ms expected; a generous lower bound */
    assert_true(atomic_load(&f.ticks) - ticks_before >= 15);
    atomic_store(&f.stop, 1);
    pthread_join(prod, NULL);
    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000000000ull), 0);
    supervisor_destroy(s);
    assert_int_equal(atomic_load(&g_canceled) + atomic_load(&g_shutdown), 0);
}

/* ---------- idle system: ~0 CPU, yet it answers ---------- */

#define IDLE_ACTORS 4

struct idle_ctx {
    int pipe_rd;
    atomic_int ticks;
    atomic_int bytes;
};

static int idle_tick(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    atomic_fetch_add(&((struct idle_ctx *)state)->ticks, 1);
    return 0;
}

static int idle_readable(actor_t *a, void *state, int fd, uint32_t events, void *arg)
{
    struct idle_ctx *c = state;
    char buf[64];
    ssize_t n;

    while ((n = read(fd, buf, sizeof(buf))) > 0)
        atomic_fetch_add(&c->bytes, (int)n);
    return 0;
}

static int idle_start(actor_t *a, void *arg, void **state)
{
    struct idle_ctx *c = arg;
    actor_timer_t *t;
    int rc;

    *state = c;
    if ((rc = actor_timer_new(&t, a, idle_tick, NULL)) < 0)
        return rc;
    if ((rc = actor_timer_arm(t, 100000000ull, 100000000ull)) < 0)
        return rc;
    return actor_watch_fd(a, c->pipe_rd, EPOLLIN, idle_readable, NULL);
}

static int idle_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct idle_ctx *c = state;

    for (size_t i = 0; i < n; i++) {
        tmsg_t *m = (tmsg_t *)msgs[i];

        if (m->hdr.type == K_PING) {
            /* Reply: the number of ticks so far (+1 so that 0 ticks still answers). */
            if (eventfd_write(m->reply_fd, (eventfd_t)atomic_load(&c->ticks) + 1) < 0)
                return -errno;
        }
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
    }
    return 0;
}

/* utime + stime of this process, in clock ticks (/proc/self/stat fields 14 and 15). */
static unsigned long long cpu_ticks(void)
{
    char buf[1024];
    unsigned long long ut = 0, st = 0;
    FILE *f = fopen("/proc/self/stat", "r");
    char *p;

    assert_non_null(f);
    assert_non_null(fgets(buf, sizeof(buf), f));
    fclose(f);
    p = strrchr(buf, ')'); /* the command name may contain spaces */
    assert_non_null(p);
    /* after ")": state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
     * cmajflt utime(14) stime(15) */
    assert_int_equal(
        sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st), 2);
    return ut + st;
}

static void test_idle_system_uses_no_cpu_and_answers(void **state)
{
    struct idle_ctx ctx[IDLE_ACTORS];
    actor_t *actors[IDLE_ACTORS];
    int pipes[IDLE_ACTORS][2];
    char names[IDLE_ACTORS][16];
    supervisor_t *s;
    unsigned long long before, after;
    long hz = sysconf(_SC_CLK_TCK);
    double cpu_ms;

    (void)state;
    memset(ctx, 0, sizeof(ctx));
    assert_int_equal(supervisor_create(&s, &fast_cfg), 0);
    for (int i = 0; i < IDLE_ACTORS; i++) {
        actor_spec_t spec = {.start = idle_start, .handle = idle_handle, .arg = &ctx[i]};

        assert_int_equal(pipe2(pipes[i], O_NONBLOCK | O_CLOEXEC), 0);
        ctx[i].pipe_rd = pipes[i][0];
        snprintf(names[i], sizeof(names[i]), "idle-%d", i);
        spec.name = names[i];
        assert_int_equal(supervisor_add(s, &spec, &actors[i]), 0);
    }
    assert_int_equal(supervisor_start(s), 0);
    for (int i = 0; i < IDLE_ACTORS; i++)
        assert_int_equal(write(pipes[i][1], "x", 1), 1);
    sleep_ms(200); /* start-up is not idle time */

    before = cpu_ticks();
    sleep_ms(10000);
    after = cpu_ticks();
    cpu_ms = (double)(after - before) * 1000.0 / (double)hz;
    print_message("idle: %d actors with 100 ms timers used %.0f ms CPU in 10 s\n", IDLE_ACTORS,
                  cpu_ms);
    assert_true(cpu_ms < 100.0); /* 1% of one core over 10 s */

    for (int i = 0; i < IDLE_ACTORS; i++) {
        tmsg_t *ping = tmsg_new(K_PING, i);
        int efd = eventfd(0, EFD_CLOEXEC);
        struct pollfd pfd = {.fd = efd, .events = POLLIN};
        eventfd_t v = 0;

        assert_true(efd >= 0);
        ping->reply_fd = efd;
        assert_int_equal(actor_send(actors[i], &ping->hdr), 0);
        assert_int_equal(poll(&pfd, 1, 5000), 1);
        assert_int_equal(eventfd_read(efd, &v), 0);
        /* ~100 ticks expected in 10.2 s; a generous lower bound only */
        assert_true(v - 1 >= 50);
        assert_int_equal(atomic_load(&ctx[i].bytes), 1);
        close(efd);
    }
    assert_int_equal(supervisor_shutdown(s, time_now_ns() + 5000000000ull), 0);
    supervisor_destroy(s);
    for (int i = 0; i < IDLE_ACTORS; i++) {
        close(pipes[i][0]);
        close(pipes[i][1]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_handles_in_order_on_own_thread, reset_counters),
        cmocka_unit_test_setup(test_expired_messages_fail_with_etimedout, reset_counters),
        cmocka_unit_test_setup(test_forward_moves_ownership, reset_counters),
        cmocka_unit_test_setup(test_timers_and_fds, reset_counters),
        cmocka_unit_test_setup(test_busy_mailbox_still_serves_timers, reset_counters),
        cmocka_unit_test_setup(test_idle_system_uses_no_cpu_and_answers, reset_counters),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
