/*
 * Mailbox tests: bounds, refusal, close, wake-up protocol and a multi-producer stress run
 * (exactly once, per-producer order, refusals retried). Label `runtime`: also run in TSan.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "runtime/mailbox.h"

#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif

typedef struct tmsg {
    msg_t hdr;
    uint32_t producer;
    uint64_t seq;
} tmsg_t;

static atomic_int g_freed;
static atomic_int g_failed;
static atomic_int g_last_err;

static void tmsg_free(msg_t *m)
{
    atomic_fetch_add(&g_freed, 1);
    free(m);
}

static void tmsg_fail(msg_t *m, int err)
{
    atomic_fetch_add(&g_failed, 1);
    atomic_store(&g_last_err, err);
    tmsg_free(m);
}

static tmsg_t *tmsg_new(uint32_t producer, uint64_t seq)
{
    tmsg_t *m = malloc(sizeof(*m));

    assert_non_null(m);
    msg_init(&m->hdr, 1, tmsg_free, tmsg_fail);
    m->producer = producer;
    m->seq = seq;
    return m;
}

static int reset_counters(void **state)
{
    (void)state;
    atomic_store(&g_freed, 0);
    atomic_store(&g_failed, 0);
    atomic_store(&g_last_err, 0);
    return 0;
}

static bool fd_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};

    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static void test_create_exact_capacity(void **state)
{
    mailbox_t *mb = NULL;

    (void)state;
    assert_int_equal(mailbox_create(&mb, "x", 0), -EINVAL);
    assert_null(mb);
    assert_int_equal(mailbox_create(&mb, "exact", 255), 0);
    assert_int_equal(mailbox_capacity(mb), 255);
    assert_string_equal(mailbox_name(mb), "exact");
    assert_int_equal(mailbox_depth(mb), 0);
    assert_false(mailbox_is_closed(mb));
    mailbox_destroy(mb);
    assert_int_equal(mailbox_create(&mb, "pow2", 256), 0);
    assert_int_equal(mailbox_capacity(mb), 256);
    mailbox_destroy(mb);
    assert_int_equal(mailbox_create(&mb, "one", 1), 0);
    assert_int_equal(mailbox_capacity(mb), 1);
    mailbox_destroy(mb);
}

/* A full mailbox refuses at once with -EAGAIN and the message stays the sender's. */
static void test_full_refuses_and_sender_keeps_message(void **state)
{
    mailbox_t *mb;
    tmsg_t *kept[7];
    msg_t *out[16];
    tmsg_t *extra;
    size_t n;

    (void)state;
    assert_int_equal(mailbox_create(&mb, "full", 7), 0);
    for (int i = 0; i < 7; i++) {
        kept[i] = tmsg_new(0, (uint64_t)i);
        assert_int_equal(mailbox_push(mb, &kept[i]->hdr), 0);
    }
    assert_int_equal(mailbox_depth(mb), 7);
    extra = tmsg_new(0, 99);
    assert_int_equal(mailbox_push(mb, &extra->hdr), -EAGAIN);
    assert_int_equal(mailbox_push(mb, &extra->hdr), -EAGAIN);
    assert_int_equal(mailbox_depth(mb), 7);
    /* Still ours: we free it; ASan would report a double free if the mailbox kept it. */
    assert_int_equal(extra->seq, 99);
    msg_dispose(&extra->hdr);
    assert_int_equal(atomic_load(&g_freed), 1);

    n = mailbox_pop_batch(mb, out, 3);
    assert_int_equal(n, 3);
    for (size_t i = 0; i < n; i++)
        assert_ptr_equal(out[i], &kept[i]->hdr);
    n += mailbox_pop_batch(mb, out + 3, 16);
    assert_int_equal(n, 7);
    for (size_t i = 0; i < n; i++) {
        assert_ptr_equal(out[i], &kept[i]->hdr);
        msg_dispose(out[i]);
    }
    assert_int_equal(mailbox_pop_batch(mb, out, 16), 0);
    assert_int_equal(atomic_load(&g_freed), 8);
    assert_int_equal(atomic_load(&g_failed), 0);
    mailbox_destroy(mb);
    assert_int_equal(atomic_load(&g_freed), 8);
}

/* Closed: later pushes refused with -ESHUTDOWN; queued ones can still be popped. */
static void test_close_refuses_and_drains(void **state)
{
    mailbox_t *mb;
    msg_t *out[8];
    tmsg_t *late;

    (void)state;
    assert_int_equal(mailbox_create(&mb, "close", 15), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(mailbox_push(mb, &tmsg_new(0, (uint64_t)i)->hdr), 0);
    assert_false(mailbox_drained(mb));
    mailbox_close(mb);
    mailbox_close(mb); /* idempotent */
    assert_true(mailbox_is_closed(mb));
    assert_true(fd_readable(mailbox_fd(mb))); /* close wakes the consumer */
    late = tmsg_new(1, 0);
    assert_int_equal(mailbox_push(mb, &late->hdr), -ESHUTDOWN);
    msg_dispose(&late->hdr);
    assert_false(mailbox_drained(mb));
    assert_int_equal(mailbox_pop_batch(mb, out, 8), 3);
    assert_true(mailbox_drained(mb));
    for (int i = 0; i < 3; i++) {
        assert_int_equal(((tmsg_t *)out[i])->seq, (uint64_t)i);
        msg_dispose(out[i]);
    }
    assert_int_equal(atomic_load(&g_freed), 4);
    mailbox_destroy(mb);
}

/* Destroy fails what is still queued with -ESHUTDOWN (through the fail function). */
static void test_destroy_fails_queued(void **state)
{
    mailbox_t *mb;

    (void)state;
    assert_int_equal(mailbox_create(&mb, "destroy", 15), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(mailbox_push(mb, &tmsg_new(0, (uint64_t)i)->hdr), 0);
    mailbox_destroy(mb);
    assert_int_equal(atomic_load(&g_failed), 5);
    assert_int_equal(atomic_load(&g_freed), 5);
    assert_int_equal(atomic_load(&g_last_err), -ESHUTDOWN);
}

/* The eventfd is written only when the consumer announced it sleeps, and only once. */
static void test_wakeup_only_when_sleeping(void **state)
{
    mailbox_t *mb;
    msg_t *out[32];
    int fd;

    (void)state;
    assert_int_equal(mailbox_create(&mb, "wake", 31), 0);
    fd = mailbox_fd(mb);
    assert_false(fd_readable(fd));
    /* Awake consumer (it just popped): pushes do not touch the eventfd. */
    assert_int_equal(mailbox_pop_batch(mb, out, 32), 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(mailbox_push(mb, &tmsg_new(0, (uint64_t)i)->hdr), 0);
    assert_false(fd_readable(fd));
    /* Messages waiting: prepare_wait says do not sleep. */
    assert_true(mailbox_prepare_wait(mb));
    assert_int_equal(mailbox_pop_batch(mb, out, 32), 10);
    for (int i = 0; i < 10; i++)
        msg_dispose(out[i]);
    /* Empty: the consumer may sleep; the first push writes the eventfd, the rest do not. */
    assert_false(mailbox_prepare_wait(mb));
    assert_false(fd_readable(fd));
    for (int i = 0; i < 5; i++)
        assert_int_equal(mailbox_push(mb, &tmsg_new(0, (uint64_t)i)->hdr), 0);
    assert_true(fd_readable(fd));
    uint64_t v = 0;
    assert_int_equal(read(fd, &v, sizeof(v)), (ssize_t)sizeof(v));
    assert_int_equal(v, 1);
    /* prepare_wait clears a pending wake-up. */
    mailbox_wake(mb);
    assert_true(fd_readable(fd));
    assert_true(mailbox_prepare_wait(mb)); /* 5 still waiting */
    assert_false(fd_readable(fd));
    assert_int_equal(mailbox_pop_batch(mb, out, 32), 5);
    for (int i = 0; i < 5; i++)
        msg_dispose(out[i]);
    mailbox_destroy(mb);
    assert_int_equal(atomic_load(&g_freed), 15);
}

/* ---------- several senders ---------- */

struct pusher {
    mailbox_t *mb;
    int first, n;
    int rc[8];
};

static void *push_some(void *arg)
{
    struct pusher *p = arg;

    for (int i = 0; i < p->n; i++) {
        tmsg_t *m = tmsg_new(1, (uint64_t)(p->first + i));
        p->rc[i] = mailbox_push(p->mb, &m->hdr);
        if (p->rc[i] != 0)
            free(m);
    }
    return NULL;
}

static void run_pusher(struct pusher *p)
{
    pthread_t t;

    assert_int_equal(pthread_create(&t, NULL, push_some, p), 0);
    pthread_join(t, NULL);
}

/* The bound is the mailbox's, not each sender's; order follows arrival across senders
 * (each push here happens before the next one starts, on another thread). */
static void test_senders_share_bound_and_order(void **state)
{
    mailbox_t *mb;
    struct pusher a = {.first = 0, .n = 2}, b = {.first = 2, .n = 3}, c = {.first = 5, .n = 3};
    msg_t *out[16];
    tmsg_t *m;

    (void)state;
    assert_int_equal(mailbox_create(&mb, "shared", 7), 0);
    a.mb = b.mb = c.mb = mb;
    run_pusher(&a);       /* seq 0, 1 from thread A */
    m = tmsg_new(0, 100); /* then this thread */
    assert_int_equal(mailbox_push(mb, &m->hdr), 0);
    run_pusher(&b); /* seq 2, 3, 4 from thread B */
    run_pusher(&c); /* 5 fits, 6 and 7 refused */
    assert_int_equal(c.rc[0], 0);
    assert_int_equal(c.rc[1], -EAGAIN);
    assert_int_equal(c.rc[2], -EAGAIN);
    assert_int_equal(mailbox_depth(mb), 7);
    m = tmsg_new(0, 101);
    assert_int_equal(mailbox_push(mb, &m->hdr), -EAGAIN);
    free(m);

    assert_int_equal(mailbox_pop_batch(mb, out, 2), 2);
    assert_int_equal(mailbox_depth(mb), 5);
    m = tmsg_new(0, 102); /* room again */
    assert_int_equal(mailbox_push(mb, &m->hdr), 0);
    assert_int_equal(mailbox_pop_batch(mb, out + 2, 16), 6);
    const uint64_t want[8] = {0, 1, 100, 2, 3, 4, 5, 102};
    for (int i = 0; i < 8; i++) {
        assert_int_equal(((tmsg_t *)out[i])->seq, want[i]);
        msg_dispose(out[i]);
    }
    assert_int_equal(mailbox_depth(mb), 0);
    mailbox_destroy(mb);
    assert_int_equal(atomic_load(&g_freed), 8);
}

/* ---------- stress: many producers, one consumer ---------- */

#define STRESS_PRODUCERS 4

struct stress {
    mailbox_t *mb;
    uint64_t per_producer;
    atomic_uint_fast64_t refusals;
    atomic_int errors; /* anything other than 0/-EAGAIN from push */
    /* consumer results */
    uint64_t received;
    uint64_t out_of_order;
    uint64_t next[STRESS_PRODUCERS];
    uint64_t wakeups;
};

struct producer_arg {
    struct stress *st;
    uint32_t id;
};

static void *stress_producer(void *arg)
{
    struct producer_arg *pa = arg;
    struct stress *st = pa->st;
    uint64_t refused = 0;

    for (uint64_t seq = 0; seq < st->per_producer; seq++) {
        tmsg_t *m = malloc(sizeof(*m));
        int rc;

        if (m == NULL)
            abort();
        msg_init(&m->hdr, 1, tmsg_free, tmsg_fail);
        m->producer = pa->id;
        m->seq = seq;
        while ((rc = mailbox_push(st->mb, &m->hdr)) == -EAGAIN) {
            /* Publish the first refusal at once: the consumer waits for one. */
            if (refused++ == 0)
                atomic_fetch_add(&st->refusals, 1);
            sched_yield();
        }
        if (rc != 0) {
            atomic_fetch_add(&st->errors, 1);
            free(m);
        }
    }
    if (refused > 1)
        atomic_fetch_add(&st->refusals, refused - 1);
    return NULL;
}

static void *stress_consumer(void *arg)
{
    struct stress *st = arg;
    uint64_t total = st->per_producer * STRESS_PRODUCERS;
    msg_t *batch[64];

    /* Let the producers fill the mailbox first, so refusals are certain to happen. */
    while (atomic_load(&st->refusals) == 0) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    while (st->received < total) {
        size_t n = mailbox_pop_batch(st->mb, batch, 64);

        for (size_t i = 0; i < n; i++) {
            tmsg_t *m = (tmsg_t *)batch[i];

            if (m->producer >= STRESS_PRODUCERS || m->seq != st->next[m->producer])
                st->out_of_order++;
            else
                st->next[m->producer]++;
            free(m);
        }
        st->received += n;
        if (n == 0 && !mailbox_prepare_wait(st->mb)) {
            struct pollfd p = {.fd = mailbox_fd(st->mb), .events = POLLIN};

            /* A lost wake-up would hang here: the test's timeout would catch it. */
            poll(&p, 1, -1);
            st->wakeups++;
        }
    }
    return NULL;
}

static void test_stress_many_producers(void **state)
{
    struct stress st = {0};
    struct producer_arg pa[STRESS_PRODUCERS];
    pthread_t prod[STRESS_PRODUCERS], cons;
    uint64_t total = 4000000;
    const char *env = getenv("PAY_STRESS_MESSAGES");

    (void)state;
#ifdef UNDER_TSAN
    total = 200000; /* TSan is ~10x slower; still well above 100k */
#endif
    if (env != NULL && *env != '\0')
        total = strtoull(env, NULL, 10);
    st.per_producer = total / STRESS_PRODUCERS;
    assert_int_equal(mailbox_create(&st.mb, "stress", 256), 0);
    assert_int_equal(mailbox_capacity(st.mb), 256);
    atomic_init(&st.refusals, 0);
    atomic_init(&st.errors, 0);

    assert_int_equal(pthread_create(&cons, NULL, stress_consumer, &st), 0);
    for (uint32_t i = 0; i < STRESS_PRODUCERS; i++) {
        pa[i] = (struct producer_arg){.st = &st, .id = i};
        assert_int_equal(pthread_create(&prod[i], NULL, stress_producer, &pa[i]), 0);
    }
    for (int i = 0; i < STRESS_PRODUCERS; i++)
        pthread_join(prod[i], NULL);
    pthread_join(cons, NULL);

    print_message("stress: %llu messages, %llu refusals, %llu consumer wake-ups\n",
                  (unsigned long long)st.received, (unsigned long long)atomic_load(&st.refusals),
                  (unsigned long long)st.wakeups);
    assert_int_equal(atomic_load(&st.errors), 0);
    assert_int_equal(st.out_of_order, 0);
    assert_int_equal(st.received, st.per_producer * STRESS_PRODUCERS);
    for (int i = 0; i < STRESS_PRODUCERS; i++)
        assert_int_equal(st.next[i], st.per_producer);
    assert_true(atomic_load(&st.refusals) > 0);
    assert_int_equal(mailbox_depth(st.mb), 0);
    mailbox_destroy(st.mb);
}

/* Pushes racing with close: each is either refused or popped; none is accepted after
 * mailbox_drained() said so. */
struct close_race {
    mailbox_t *mb;
    atomic_int accepted;
    atomic_int refused;
    atomic_int other;
};

static void *close_race_producer(void *arg)
{
    struct close_race *cr = arg;

    for (;;) {
        tmsg_t *m = malloc(sizeof(*m));
        int rc;

        if (m == NULL)
            abort();
        msg_init(&m->hdr, 1, tmsg_free, tmsg_fail);
        rc = mailbox_push(cr->mb, &m->hdr);
        if (rc == 0) {
            atomic_fetch_add(&cr->accepted, 1);
            continue;
        }
        free(m);
        if (rc == -ESHUTDOWN) {
            atomic_fetch_add(&cr->refused, 1);
            return NULL;
        }
        if (rc != -EAGAIN)
            atomic_fetch_add(&cr->other, 1);
        sched_yield();
    }
}

static void test_close_race_exact(void **state)
{
    struct close_race cr;
    pthread_t prod[3];
    msg_t *batch[64];
    int popped = 0;

    (void)state;
    for (int round = 0; round < 20; round++) {
        memset(&cr, 0, sizeof(cr));
        popped = 0;
        assert_int_equal(mailbox_create(&cr.mb, "race", 63), 0);
        for (int i = 0; i < 3; i++)
            assert_int_equal(pthread_create(&prod[i], NULL, close_race_producer, &cr), 0);
        for (int spins = 0; spins < 2000; spins++) {
            size_t n = mailbox_pop_batch(cr.mb, batch, 64);

            for (size_t i = 0; i < n; i++)
                msg_dispose(batch[i]);
            popped += (int)n;
            if (spins == 1000)
                mailbox_close(cr.mb);
        }
        while (!mailbox_drained(cr.mb)) {
            size_t n = mailbox_pop_batch(cr.mb, batch, 64);

            for (size_t i = 0; i < n; i++)
                msg_dispose(batch[i]);
            popped += (int)n;
            if (n == 0)
                sched_yield();
        }
        for (int i = 0; i < 3; i++)
            pthread_join(prod[i], NULL);
        /* Nothing may appear after drained: all producers have returned by now. */
        assert_int_equal(mailbox_pop_batch(cr.mb, batch, 64), 0);
        assert_int_equal(atomic_load(&cr.other), 0);
        assert_int_equal(atomic_load(&cr.refused), 3);
        assert_int_equal(popped, atomic_load(&cr.accepted));
        mailbox_destroy(cr.mb);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_create_exact_capacity, reset_counters),
        cmocka_unit_test_setup(test_full_refuses_and_sender_keeps_message, reset_counters),
        cmocka_unit_test_setup(test_close_refuses_and_drains, reset_counters),
        cmocka_unit_test_setup(test_destroy_fails_queued, reset_counters),
        cmocka_unit_test_setup(test_wakeup_only_when_sleeping, reset_counters),
        cmocka_unit_test_setup(test_senders_share_bound_and_order, reset_counters),
        cmocka_unit_test_setup(test_close_race_exact, reset_counters),
        cmocka_unit_test_setup(test_stress_many_producers, reset_counters),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
