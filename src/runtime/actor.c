/*
 * actor: one incarnation = one thread running an epoll loop over the mailbox's eventfd,
 * the fds the actor watches and its timerfds.
 *
 * DESIGN
 * - Loop turn: check control flags (fault, abort), pop up to batch_max messages, fail the
 *   expired ones (-ETIMEDOUT), put the rest on the taken-work list and hand them to
 *   spec->handle. While the mailbox stays busy, a non-blocking epoll_wait at least every
 *   millisecond serves fds and timers; an empty mailbox leads to mailbox_prepare_wait()
 *   and a blocking epoll_wait: an idle actor costs no CPU.
 * - The taken-work list is intrusive (msg_t _prev/_next) and flagged in msg_t _flags, so
 *   actor_done is O(1) and a second actor_done on the same message is caught.
 * - Watches and timers unregistered during an epoll dispatch may still be referenced by
 *   the events array of that dispatch: they are marked dead and freed after it.
 * - End of an incarnation: fail the taken work (-ECANCELED after a failure, -ESHUTDOWN on
 *   the shutdown deadline), call spec->stop, release watches and timers, then tell the
 *   supervisor (last touch of the actor from this thread).
 */
#include "runtime/actor_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define MSG_F_TAKEN     (1u << 0)
#define EPOLL_BATCH     32
#define DEFAULT_MAILBOX 1024
#define DEFAULT_BATCH   64
/* While the mailbox stays busy, fds and timers are still polled at least this often. */
#define BUSY_POLL_NS (1000000ull)

enum watch_kind { WATCH_FD, WATCH_TIMER };

/* A registered fd or timer. Owned by the incarnation. */
struct watch {
    enum watch_kind kind;
    int fd;
    bool dead;
    actor_fd_cb fd_cb;
    actor_timer_cb timer_cb;
    void *arg;
    actor_t *actor;
    struct watch *prev, *next; /* live list, or dead list once unregistered */
};

struct actor_timer {
    struct watch w;
};

struct incarnation {
    int epfd;
    void *state;
    msg_t **batch; /* batch_max slots */
    msg_t *taken_head, *taken_tail;
    struct watch *live;    /* registered watches and timers */
    struct watch *dead;    /* unregistered, freed after the current dispatch */
    size_t nwatch;         /* live count: skip epoll polls when nothing is watched */
    uint64_t last_poll_ns; /* last epoll_wait */
};

/* ---------- taken-work list ---------- */

static void taken_append(struct incarnation *inc, msg_t *m)
{
    m->_flags |= MSG_F_TAKEN;
    m->_next = NULL;
    m->_prev = inc->taken_tail;
    if (inc->taken_tail != NULL)
        inc->taken_tail->_next = m;
    else
        inc->taken_head = m;
    inc->taken_tail = m;
}

static void taken_unlink(struct incarnation *inc, msg_t *m)
{
    if (m->_prev != NULL)
        m->_prev->_next = m->_next;
    else
        inc->taken_head = m->_next;
    if (m->_next != NULL)
        m->_next->_prev = m->_prev;
    else
        inc->taken_tail = m->_prev;
    m->_prev = m->_next = NULL;
    m->_flags &= ~MSG_F_TAKEN;
}

/* Fails everything still taken; returns how many. */
static uint64_t taken_fail_all(struct incarnation *inc, int err)
{
    uint64_t n = 0;

    while (inc->taken_head != NULL) {
        msg_t *m = inc->taken_head;

        taken_unlink(inc, m);
        msg_fail(m, err);
        n++;
    }
    return n;
}

void actor_done(actor_t *a, msg_t *m)
{
    if (!(m->_flags & MSG_F_TAKEN)) {
        /* Unlinking a message we do not hold would corrupt the list: stop loudly. */
        fprintf(stderr, "actor %s: actor_done on a message it does not hold (type %u)\n",
                a->spec.name, m->type);
        abort();
    }
    taken_unlink(a->inc, m);
}

int actor_forward(actor_t *a, msg_t *m, mailbox_t *to)
{
    /* Unlink first: once pushed, the receiver may reuse _prev/_next at once. */
    actor_done(a, m);
    return mailbox_push(to, m);
}

int actor_send(actor_t *a, msg_t *m)
{
    return mailbox_push(a->mb, m);
}

void actor_inject_fault(actor_t *a)
{
    atomic_store_explicit(&a->fault, true, memory_order_seq_cst);
    mailbox_wake(a->mb);
}

mailbox_t *actor_mailbox(actor_t *a)
{
    return a->mb;
}

const char *actor_name(const actor_t *a)
{
    return a->spec.name;
}

void actor_stats(const actor_t *a, actor_stats_t *out)
{
    out->messages = atomic_load_explicit(&a->st_messages, memory_order_relaxed);
    out->restarts = atomic_load_explicit(&a->st_restarts, memory_order_relaxed);
    out->failed_back = atomic_load_explicit(&a->st_failed_back, memory_order_relaxed);
    out->queue_wait_ns = atomic_load_explicit(&a->st_queue_wait_ns, memory_order_relaxed);
    out->depth = mailbox_depth(a->mb);
    out->up = atomic_load_explicit(&a->st_up, memory_order_relaxed);
}

/* ---------- watches and timers ---------- */

static struct watch *watch_find(struct incarnation *inc, int fd)
{
    for (struct watch *w = inc->live; w != NULL; w = w->next)
        if (w->fd == fd)
            return w;
    return NULL;
}

static void watch_link(struct watch **head, struct watch *w)
{
    w->prev = NULL;
    w->next = *head;
    if (*head != NULL)
        (*head)->prev = w;
    *head = w;
}

static void watch_unlink(struct watch **head, struct watch *w)
{
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        *head = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

/* Unregisters w now; frees it after the current dispatch. */
static void watch_retire(struct incarnation *inc, struct watch *w)
{
    epoll_ctl(inc->epfd, EPOLL_CTL_DEL, w->fd, NULL);
    if (w->kind == WATCH_TIMER)
        close(w->fd);
    w->dead = true;
    watch_unlink(&inc->live, w);
    watch_link(&inc->dead, w);
    inc->nwatch--;
}

static void watch_free_list(struct watch **head)
{
    while (*head != NULL) {
        struct watch *w = *head;

        *head = w->next;
        free(w);
    }
}

int actor_watch_fd(actor_t *a, int fd, uint32_t events, actor_fd_cb cb, void *arg)
{
    struct incarnation *inc = a->inc;
    struct epoll_event ev = {.events = events};
    struct watch *w;

    if (fd < 0 || cb == NULL)
        return -EINVAL;
    w = watch_find(inc, fd);
    if (w != NULL) {
        if (w->kind != WATCH_FD)
            return -EEXIST;
        ev.data.ptr = w;
        /* ENOENT: the fd was closed (which unregistered it) and the number reused. */
        if (epoll_ctl(inc->epfd, EPOLL_CTL_MOD, fd, &ev) < 0 &&
            (errno != ENOENT || epoll_ctl(inc->epfd, EPOLL_CTL_ADD, fd, &ev) < 0))
            return -errno;
        w->fd_cb = cb;
        w->arg = arg;
        return 0;
    }
    w = calloc(1, sizeof(*w));
    if (w == NULL)
        return -ENOMEM;
    *w = (struct watch){.kind = WATCH_FD, .fd = fd, .fd_cb = cb, .arg = arg, .actor = a};
    ev.data.ptr = w;
    if (epoll_ctl(inc->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = -errno;

        free(w);
        return err;
    }
    watch_link(&inc->live, w);
    inc->nwatch++;
    return 0;
}

int actor_unwatch_fd(actor_t *a, int fd)
{
    struct watch *w = watch_find(a->inc, fd);

    if (w == NULL || w->kind != WATCH_FD)
        return -ENOENT;
    watch_retire(a->inc, w);
    return 0;
}

int actor_timer_new(actor_timer_t **out, actor_t *a, actor_timer_cb cb, void *arg)
{
    struct incarnation *inc = a->inc;
    struct epoll_event ev = {.events = EPOLLIN};
    actor_timer_t *t;
    int err;

    *out = NULL;
    if (cb == NULL)
        return -EINVAL;
    t = calloc(1, sizeof(*t));
    if (t == NULL)
        return -ENOMEM;
    t->w = (struct watch){.kind = WATCH_TIMER, .timer_cb = cb, .arg = arg, .actor = a};
    t->w.fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (t->w.fd < 0) {
        err = -errno;
        free(t);
        return err;
    }
    ev.data.ptr = &t->w;
    if (epoll_ctl(inc->epfd, EPOLL_CTL_ADD, t->w.fd, &ev) < 0) {
        err = -errno;
        close(t->w.fd);
        free(t);
        return err;
    }
    watch_link(&inc->live, &t->w);
    inc->nwatch++;
    *out = t;
    return 0;
}

int actor_timer_arm(actor_timer_t *t, uint64_t delay_ns, uint64_t interval_ns)
{
    struct itimerspec its = {
        .it_value = {.tv_sec = (time_t)(delay_ns / 1000000000u),
                     .tv_nsec = (long)(delay_ns % 1000000000u)},
        .it_interval = {.tv_sec = (time_t)(interval_ns / 1000000000u),
                        .tv_nsec = (long)(interval_ns % 1000000000u)},
    };

    if (delay_ns == 0)
        its.it_interval = (struct timespec){0, 0};
    if (timerfd_settime(t->w.fd, 0, &its, NULL) < 0)
        return -errno;
    return 0;
}

void actor_timer_free(actor_timer_t *t)
{
    if (t == NULL || t->w.dead)
        return;
    watch_retire(t->w.actor->inc, &t->w);
}

/* ---------- the loop ---------- */

static void actor_log_failure(const actor_t *a, const char *what, int rc)
{
    fprintf(stderr, "actor %s: %s failed (%d: %s); incarnation ends\n", a->spec.name, what, rc,
            strerror(rc < 0 ? -rc : rc));
}

/* One epoll_wait and the dispatch of its events. Returns < 0 if a callback failed. */
static int actor_poll(actor_t *a, struct incarnation *inc, int timeout_ms)
{
    struct epoll_event evs[EPOLL_BATCH];
    int n, rc = 0;

    n = epoll_wait(inc->epfd, evs, EPOLL_BATCH, timeout_ms);
    inc->last_poll_ns = time_now_ns();
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n && rc >= 0; i++) {
        struct watch *w = evs[i].data.ptr;

        if (w == NULL || w->dead)
            continue; /* the mailbox: served by the next pop */
        if (w->kind == WATCH_TIMER) {
            uint64_t expirations;

            if (read(w->fd, &expirations, sizeof(expirations)) != sizeof(expirations))
                continue; /* re-armed or disarmed since it fired */
            rc = w->timer_cb(a, inc->state, (actor_timer_t *)w, w->arg);
            if (rc < 0)
                actor_log_failure(a, "timer callback", rc);
        } else {
            rc = w->fd_cb(a, inc->state, w->fd, evs[i].events, w->arg);
            if (rc < 0)
                actor_log_failure(a, "fd callback", rc);
        }
    }
    watch_free_list(&inc->dead);
    return rc < 0 ? rc : 0;
}

/* Filters expired messages, takes the rest and hands them to handle. */
static int actor_deliver(actor_t *a, struct incarnation *inc, size_t n)
{
    uint64_t now = time_now_ns(), wait = 0, expired = 0;
    msg_t **b = inc->batch;
    size_t k = 0;
    int rc;

    for (size_t i = 0; i < n; i++) {
        msg_t *m = b[i];

        if (m->deadline_ns != 0 && now >= m->deadline_ns) {
            msg_fail(m, -ETIMEDOUT);
            expired++;
            continue;
        }
        if (now > m->_enqueued_ns)
            wait += now - m->_enqueued_ns;
        taken_append(inc, m);
        b[k++] = m;
    }
    if (expired != 0)
        atomic_fetch_add_explicit(&a->st_failed_back, expired, memory_order_relaxed);
    if (k == 0)
        return 0;
    atomic_fetch_add_explicit(&a->st_messages, k, memory_order_relaxed);
    atomic_fetch_add_explicit(&a->st_queue_wait_ns, wait, memory_order_relaxed);
    rc = a->spec.handle(a, inc->state, b, k);
    if (rc < 0)
        actor_log_failure(a, "handle", rc);
    return rc < 0 ? rc : 0;
}

static bool actor_is_idle(actor_t *a, struct incarnation *inc)
{
    if (inc->taken_head != NULL)
        return false;
    return a->spec.idle == NULL || a->spec.idle(a, inc->state);
}

/* Closed, nothing can still arrive, nothing held: the incarnation may end cleanly. */
static bool actor_finished(actor_t *a, struct incarnation *inc)
{
    return mailbox_is_closed(a->mb) && mailbox_drained(a->mb) && actor_is_idle(a, inc);
}

static bool actor_control_pending(actor_t *a)
{
    return atomic_load_explicit(&a->abort, memory_order_seq_cst) ||
           atomic_load_explicit(&a->fault, memory_order_seq_cst);
}

static actor_exit_t actor_loop(actor_t *a, struct incarnation *inc)
{
    size_t batch_max = a->spec.batch_max;

    for (;;) {
        size_t n;

        if (atomic_load_explicit(&a->abort, memory_order_seq_cst))
            return ACTOR_EXIT_ABORTED;
        if (atomic_exchange_explicit(&a->fault, false, memory_order_seq_cst)) {
            fprintf(stderr, "actor %s: fault injected; incarnation ends\n", a->spec.name);
            return ACTOR_EXIT_FAILED;
        }
        n = mailbox_pop_batch(a->mb, inc->batch, batch_max);
        if (n > 0) {
            if (actor_deliver(a, inc, n) < 0)
                return ACTOR_EXIT_FAILED;
            /* A busy mailbox must not starve fds and timers (one clock read per batch). */
            if (inc->nwatch > 0 && time_now_ns() - inc->last_poll_ns >= BUSY_POLL_NS &&
                actor_poll(a, inc, 0) < 0)
                return ACTOR_EXIT_FAILED;
            continue;
        }
        if (actor_finished(a, inc))
            return ACTOR_EXIT_CLEAN;
        if (mailbox_prepare_wait(a->mb))
            continue;
        /* The eventfd is clear now: re-check what is signalled through it (close, abort,
         * fault) so a signal that came before the clear is not slept through. */
        if (actor_control_pending(a) || actor_finished(a, inc))
            continue;
        if (actor_poll(a, inc, -1) < 0)
            return ACTOR_EXIT_FAILED;
    }
}

void *actor_thread_main(void *arg)
{
    actor_t *a = arg;
    struct incarnation inc = {.epfd = -1};
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    actor_exit_t why = ACTOR_EXIT_FAILED;
    char tname[16];
    uint64_t failed;
    int rc;

    snprintf(tname, sizeof(tname), "%s", a->spec.name);
    pthread_setname_np(pthread_self(), tname);
    /* A fault injected while no incarnation ran is not this incarnation's. */
    atomic_store_explicit(&a->fault, false, memory_order_relaxed);

    inc.batch = calloc(a->spec.batch_max, sizeof(*inc.batch));
    inc.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (inc.batch == NULL || inc.epfd < 0 ||
        epoll_ctl(inc.epfd, EPOLL_CTL_ADD, mailbox_fd(a->mb), &ev) < 0) {
        actor_log_failure(a, "incarnation setup", -errno);
        goto out;
    }
    a->inc = &inc;
    rc = a->spec.start != NULL ? a->spec.start(a, a->spec.arg, &inc.state) : 0;
    if (rc < 0) {
        actor_log_failure(a, "start", rc);
        /* start cleans up after itself; stop is only for a started incarnation. */
        goto release;
    }
    atomic_store_explicit(&a->st_up, true, memory_order_relaxed);
    why = actor_loop(a, &inc);
    atomic_store_explicit(&a->st_up, false, memory_order_relaxed);

    /* Failure: the owners of taken work learn at once (their calls end UNAVAILABLE). */
    failed = taken_fail_all(&inc, why == ACTOR_EXIT_FAILED ? -ECANCELED : -ESHUTDOWN);
    if (failed != 0)
        atomic_fetch_add_explicit(&a->st_failed_back, failed, memory_order_relaxed);
    if (a->spec.stop != NULL)
        a->spec.stop(a, inc.state);

release:
    /* Whatever stop left registered goes with the incarnation (timerfds are ours). */
    while (inc.live != NULL)
        watch_retire(&inc, inc.live);
    watch_free_list(&inc.dead);
    /* Taken work left by a failed start is failed back like any other. */
    failed = taken_fail_all(&inc, -ECANCELED);
    if (failed != 0)
        atomic_fetch_add_explicit(&a->st_failed_back, failed, memory_order_relaxed);
    a->inc = NULL;
out:
    if (inc.epfd >= 0)
        close(inc.epfd);
    free(inc.batch);
    supervisor_incarnation_exited(a, why);
    return NULL;
}

/* ---------- life cycle (supervisor.c) ---------- */

int actor_create(actor_t **out, supervisor_t *s, const actor_spec_t *spec)
{
    actor_t *a;
    int rc;

    *out = NULL;
    a = aligned_alloc(64, (sizeof(*a) + 63) & ~(size_t)63);
    if (a == NULL)
        return -ENOMEM;
    memset(a, 0, sizeof(*a));
    a->spec = *spec;
    if (a->spec.mailbox_capacity == 0)
        a->spec.mailbox_capacity = DEFAULT_MAILBOX;
    if (a->spec.batch_max == 0)
        a->spec.batch_max = DEFAULT_BATCH;
    rc = mailbox_create(&a->mb, spec->name, a->spec.mailbox_capacity);
    if (rc < 0) {
        free(a);
        return rc;
    }
    a->sup = s;
    a->state = ACTOR_IDLE;
    atomic_init(&a->fault, false);
    atomic_init(&a->abort, false);
    atomic_init(&a->st_messages, 0);
    atomic_init(&a->st_restarts, 0);
    atomic_init(&a->st_failed_back, 0);
    atomic_init(&a->st_queue_wait_ns, 0);
    atomic_init(&a->st_up, false);
    *out = a;
    return 0;
}

void actor_free(actor_t *a)
{
    if (a == NULL)
        return;
    mailbox_destroy(a->mb);
    free(a);
}

size_t actor_fail_queued(actor_t *a)
{
    msg_t *b[64];
    size_t n, total = 0;

    while ((n = mailbox_pop_batch(a->mb, b, 64)) > 0) {
        uint64_t now = time_now_ns();

        for (size_t i = 0; i < n; i++) {
            bool expired = b[i]->deadline_ns != 0 && now >= b[i]->deadline_ns;

            msg_fail(b[i], expired ? -ETIMEDOUT : -ESHUTDOWN);
        }
        total += n;
    }
    if (total != 0)
        atomic_fetch_add_explicit(&a->st_failed_back, total, memory_order_relaxed);
    return total;
}
