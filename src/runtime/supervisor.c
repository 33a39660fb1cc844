/*
 * supervisor: owns the actors, restarts failed incarnations with exponential backoff and
 * shuts everything down in order.
 *
 * DESIGN
 * - One mutex and one condition variable (CLOCK_MONOTONIC) guard every actor's
 *   supervision fields (actor_internal.h). A monitor thread sleeps on the condition until
 *   an incarnation exits or the earliest restart is due: no periodic wake-ups.
 * - An incarnation's thread reports its own end (supervisor_incarnation_exited) as its last
 *   action; whoever next holds the mutex joins it: the monitor in normal operation,
 *   supervisor_shutdown for the actor it is stopping.
 * - Backoff after the k-th consecutive failure: base * 2^(k-1), capped. An incarnation that
 *   was up for stable_ns before failing resets the count first.
 * - Shutdown takes actors over one at a time (`shutting`: the monitor leaves them alone),
 *   closes the mailbox, waits for a clean exit until the deadline, then sets `abort`. After
 *   the join this thread is the mailbox's only consumer and fails what is left.
 */
#include "runtime/supervisor.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "runtime/actor_internal.h"

#define DEFAULT_BASE_NS   (100ull * 1000000ull)
#define DEFAULT_CAP_NS    (30ull * 1000000000ull)
#define DEFAULT_DEGRADED  3u
#define DEFAULT_STABLE_NS (5ull * 1000000000ull)

struct supervisor {
    supervisor_config_t cfg; /* immutable after create */

    pthread_mutex_t mu;
    pthread_cond_t cond; /* incarnation exits, monitor stop; CLOCK_MONOTONIC */
    /* Under mu (the array only grows, from the main thread). */
    actor_t **actors;
    size_t n, cap;
    bool started;
    bool monitor_stop;
    bool shut_down;
    pthread_t monitor;
};

int supervisor_create(supervisor_t **out, const supervisor_config_t *cfg)
{
    supervisor_t *s;
    pthread_condattr_t ca;
    int rc;

    *out = NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    if (cfg != NULL)
        s->cfg = *cfg;
    if (s->cfg.backoff_base_ns == 0)
        s->cfg.backoff_base_ns = DEFAULT_BASE_NS;
    if (s->cfg.backoff_cap_ns == 0)
        s->cfg.backoff_cap_ns = DEFAULT_CAP_NS;
    if (s->cfg.degraded_after == 0)
        s->cfg.degraded_after = DEFAULT_DEGRADED;
    if (s->cfg.stable_ns == 0)
        s->cfg.stable_ns = DEFAULT_STABLE_NS;
    if (s->cfg.backoff_cap_ns < s->cfg.backoff_base_ns) {
        free(s);
        return -EINVAL;
    }
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    rc = pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (rc != 0) {
        free(s);
        return -rc;
    }
    pthread_mutex_init(&s->mu, NULL);
    *out = s;
    return 0;
}

/* Under mu: starts a new incarnation of a. */
static int spawn_locked(supervisor_t *s, actor_t *a)
{
    int rc;

    atomic_store_explicit(&a->abort, false, memory_order_relaxed);
    a->exit = ACTOR_EXIT_NONE;
    a->started_ns = time_now_ns();
    a->state = ACTOR_RUNNING;
    /* Counted before the thread exists, so nobody sees its work before the restart. */
    if (a->restart_pending)
        atomic_fetch_add_explicit(&a->st_restarts, 1, memory_order_relaxed);
    rc = pthread_create(&a->thread, NULL, actor_thread_main, a);
    if (rc != 0) {
        if (a->restart_pending)
            atomic_fetch_sub_explicit(&a->st_restarts, 1, memory_order_relaxed);
        /* Counted as a failure of the incarnation: retried after the backoff. */
        fprintf(stderr, "supervisor: cannot start a thread for actor %s: %s\n", a->spec.name,
                strerror(rc));
        a->state = ACTOR_EXITED;
        a->exit = ACTOR_EXIT_FAILED;
        a->failures++;
        a->restart_pending = true;
        pthread_cond_broadcast(&s->cond);
        return -rc;
    }
    a->joinable = true;
    a->restart_pending = false;
    return 0;
}

/* Under mu: joins the thread of an exited incarnation (it no longer needs mu). */
static void join_locked(actor_t *a)
{
    if (a->state == ACTOR_EXITED && a->joinable) {
        pthread_join(a->thread, NULL);
        a->joinable = false;
    }
}

static uint64_t backoff_delay(const supervisor_t *s, unsigned failures)
{
    uint64_t d = s->cfg.backoff_base_ns;

    for (unsigned i = 1; i < failures && d < s->cfg.backoff_cap_ns; i++)
        d = d > s->cfg.backoff_cap_ns / 2 ? s->cfg.backoff_cap_ns : d * 2;
    return d < s->cfg.backoff_cap_ns ? d : s->cfg.backoff_cap_ns;
}

void supervisor_incarnation_exited(actor_t *a, actor_exit_t why)
{
    supervisor_t *s = a->sup;

    pthread_mutex_lock(&s->mu);
    if (why == ACTOR_EXIT_FAILED) {
        if (time_now_ns() - a->started_ns >= s->cfg.stable_ns)
            a->failures = 0;
        a->failures++;
        a->restart_pending = true;
    } else if (time_now_ns() - a->started_ns >= s->cfg.stable_ns) {
        a->failures = 0;
    }
    a->exit = why;
    a->state = ACTOR_EXITED;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
}

static void abs_timespec(struct timespec *ts, uint64_t ns)
{
    ts->tv_sec = (time_t)(ns / 1000000000u);
    ts->tv_nsec = (long)(ns % 1000000000u);
}

static void *monitor_main(void *arg)
{
    supervisor_t *s = arg;

    pthread_mutex_lock(&s->mu);
    while (!s->monitor_stop) {
        uint64_t now = time_now_ns(), next = UINT64_MAX;

        for (size_t i = 0; i < s->n; i++) {
            actor_t *a = s->actors[i];

            if (a->shutting)
                continue;
            if (a->state == ACTOR_EXITED) {
                join_locked(a);
                if (a->exit == ACTOR_EXIT_FAILED) {
                    uint64_t d = backoff_delay(s, a->failures);

                    fprintf(stderr,
                            "supervisor: actor %s failed (%u in a row); restart in %llu ms\n",
                            a->spec.name, a->failures, (unsigned long long)(d / 1000000u));
                    a->state = ACTOR_BACKOFF;
                    a->restart_at_ns = now + d;
                } else {
                    a->state = ACTOR_STOPPED; /* its mailbox was closed by someone */
                }
            }
            if (a->state == ACTOR_BACKOFF) {
                if (now >= a->restart_at_ns)
                    spawn_locked(s, a);
                else if (a->restart_at_ns < next)
                    next = a->restart_at_ns;
            }
        }
        if (s->monitor_stop)
            break;
        /* A failed spawn leaves an EXITED actor behind: go round again at once. */
        bool again = false;
        for (size_t i = 0; i < s->n; i++)
            if (!s->actors[i]->shutting && s->actors[i]->state == ACTOR_EXITED)
                again = true;
        if (again)
            continue;
        if (next == UINT64_MAX) {
            pthread_cond_wait(&s->cond, &s->mu);
        } else {
            struct timespec ts;

            abs_timespec(&ts, next);
            pthread_cond_timedwait(&s->cond, &s->mu, &ts);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int supervisor_add(supervisor_t *s, const actor_spec_t *spec, actor_t **out)
{
    actor_t *a;
    int rc;

    if (out != NULL)
        *out = NULL;
    if (spec == NULL || spec->name == NULL || spec->name[0] == '\0' || spec->handle == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    if (s->shut_down) {
        rc = -ESHUTDOWN;
        goto out;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap != 0 ? s->cap * 2 : 8;
        actor_t **v = realloc(s->actors, cap * sizeof(*v));

        if (v == NULL) {
            rc = -ENOMEM;
            goto out;
        }
        s->actors = v;
        s->cap = cap;
    }
    rc = actor_create(&a, s, spec);
    if (rc < 0)
        goto out;
    s->actors[s->n++] = a;
    if (s->started)
        spawn_locked(s, a);
    if (out != NULL)
        *out = a;
out:
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int supervisor_start(supervisor_t *s)
{
    int rc = 0;

    pthread_mutex_lock(&s->mu);
    if (s->started || s->shut_down) {
        rc = -EALREADY;
        goto out;
    }
    rc = -pthread_create(&s->monitor, NULL, monitor_main, s);
    if (rc != 0)
        goto out;
    s->started = true;
    for (size_t i = 0; i < s->n; i++)
        if (s->actors[i]->state == ACTOR_IDLE)
            spawn_locked(s, s->actors[i]); /* a failed spawn is retried by the monitor */
out:
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* Stops one actor; returns the number of messages failed back because of the shutdown. */
static uint64_t shutdown_actor(supervisor_t *s, actor_t *a, uint64_t deadline_ns)
{
    uint64_t before = atomic_load_explicit(&a->st_failed_back, memory_order_relaxed);
    bool aborted = false, restarted = false;

    mailbox_close(a->mb); /* stop intake first; what is queued stays */
    pthread_mutex_lock(&s->mu);
    a->shutting = true; /* the monitor leaves it to us from now on */
    for (;;) {
        if (a->state == ACTOR_EXITED) {
            join_locked(a);
            a->state = a->exit == ACTOR_EXIT_FAILED ? ACTOR_BACKOFF : ACTOR_STOPPED;
        }
        if (a->state == ACTOR_BACKOFF) {
            /* Failed before or during the drain: one more incarnation, without backoff,
             * for the queued work; a second failure leaves the rest to be failed back. */
            if (!restarted && !aborted && mailbox_depth(a->mb) > 0 && time_now_ns() < deadline_ns) {
                restarted = true;
                spawn_locked(s, a);
                continue;
            }
            a->state = ACTOR_STOPPED;
        }
        if (a->state != ACTOR_RUNNING)
            break;
        if (aborted) {
            pthread_cond_wait(&s->cond, &s->mu);
        } else if (time_now_ns() >= deadline_ns) {
            /* Past the deadline: the incarnation fails back what it holds and stops. */
            atomic_store_explicit(&a->abort, true, memory_order_seq_cst);
            mailbox_wake(a->mb);
            aborted = true;
        } else {
            struct timespec ts;

            abs_timespec(&ts, deadline_ns);
            pthread_cond_timedwait(&s->cond, &s->mu, &ts);
        }
    }
    a->state = ACTOR_STOPPED;
    pthread_mutex_unlock(&s->mu);

    /* No incarnation runs: this thread is the only consumer left. */
    actor_fail_queued(a);
    return atomic_load_explicit(&a->st_failed_back, memory_order_relaxed) - before;
}

int supervisor_shutdown(supervisor_t *s, uint64_t deadline_ns)
{
    uint64_t failed = 0;
    size_t n;

    pthread_mutex_lock(&s->mu);
    if (s->shut_down) {
        pthread_mutex_unlock(&s->mu);
        return 0;
    }
    n = s->n;
    pthread_mutex_unlock(&s->mu);

    /* The actor array only grows from this (the main) thread, so reading it here is safe. */
    for (size_t i = 0; i < n; i++)
        failed += shutdown_actor(s, s->actors[i], deadline_ns);

    pthread_mutex_lock(&s->mu);
    s->shut_down = true;
    s->monitor_stop = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    if (s->started)
        pthread_join(s->monitor, NULL);
    return failed != 0 ? -ETIMEDOUT : 0;
}

void supervisor_destroy(supervisor_t *s)
{
    if (s == NULL)
        return;
    if (!s->shut_down)
        supervisor_shutdown(s, time_now_ns());
    for (size_t i = 0; i < s->n; i++)
        actor_free(s->actors[i]);
    free(s->actors);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

bool supervisor_healthy(const supervisor_t *s)
{
    /* The mutex is not part of the observable state; locking it does not modify s. */
    supervisor_t *m = (supervisor_t *)s;
    uint64_t now;
    bool healthy = true;

    /* now is read under mu: read before it, a spawn in between (started_ns > now) would
     * make now - started_ns wrap around and call a brand-new incarnation stable. */
    pthread_mutex_lock(&m->mu);
    now = time_now_ns();
    for (size_t i = 0; i < m->n && healthy; i++) {
        const actor_t *a = m->actors[i];
        bool clean_again;

        if (!a->spec.critical || a->failures < m->cfg.degraded_after)
            continue;
        /* Recovered once the current incarnation has run cleanly for stable_ns. */
        clean_again = a->state == ACTOR_RUNNING &&
                      atomic_load_explicit(&a->st_up, memory_order_relaxed) &&
                      now >= a->started_ns && now - a->started_ns >= m->cfg.stable_ns;
        if (!clean_again)
            healthy = false;
    }
    pthread_mutex_unlock(&m->mu);
    return healthy;
}

void supervisor_foreach(const supervisor_t *s, void (*fn)(actor_t *a, void *arg), void *arg)
{
    supervisor_t *m = (supervisor_t *)s; /* see supervisor_healthy */

    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n; i++)
        fn(m->actors[i], arg);
    pthread_mutex_unlock(&m->mu);
}
