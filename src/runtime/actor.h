/*
 * actor: a thread that owns its state and connections and reads one mailbox.
 *
 * Each incarnation runs on its own thread and waits in one epoll set on the mailbox's
 * eventfd, the file descriptors it registers and its timers (timerfds); it never spins.
 * Messages are drained in batches of up to spec->batch_max and handed to spec->handle.
 *
 * Taken work: every message handed to `handle` is on the incarnation's taken-work list
 * until the actor calls actor_done() (it completed, freed or forwarded it). If the
 * incarnation fails (a callback returns < 0 or actor_inject_fault), the runtime fails every
 * message still on that list with -ECANCELED, calls spec->stop, and the supervisor starts a
 * new incarnation after a backoff; queued messages wait for it (expired ones fail
 * -ETIMEDOUT).
 *
 * Every actor_* function taking an actor_t* runs on that actor's thread, except
 * actor_send, actor_mailbox, actor_name, actor_stats and actor_inject_fault (any thread).
 */
#ifndef PAY_RUNTIME_ACTOR_H
#define PAY_RUNTIME_ACTOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "runtime/mailbox.h"

typedef struct actor actor_t;
typedef struct actor_timer actor_timer_t;

typedef struct actor_spec {
    const char *name;
    size_t mailbox_capacity; /* default 1024 */
    size_t batch_max;        /* messages per handle call, default 64 */
    bool critical;           /* supervisor_healthy() is false while a critical actor is down
                                after degraded_after consecutive failures (supervisor.h) */
    void *arg;               /* passed to start */
    /** New incarnation, on its thread: build state (connections, timers). < 0 = failure;
     *  a failing start releases what it built (stop is not called). Optional. */
    int (*start)(actor_t *a, void *arg, void **state);
    /** A batch of messages in arrival order, now on the taken-work list. < 0 = failure.
     *  Required. Must not block: the shutdown deadline is enforced between callbacks. */
    int (*handle)(actor_t *a, void *state, msg_t **msgs, size_t n);
    /** End of an incarnation (normal or failed) that started: release state, close the
     *  fds it watched (the runtime only unregisters them; its timers it frees). Optional. */
    void (*stop)(actor_t *a, void *state);
    /** Optional: true when the actor has no work of its own in progress (drained). Shutdown
     *  waits for it and for an empty taken-work list; without it, the list alone decides. */
    bool (*idle)(actor_t *a, void *state);
} actor_spec_t;

typedef struct actor_stats {
    uint64_t messages;      /* messages handed to handle */
    uint64_t restarts;      /* incarnations started after a failure */
    uint64_t failed_back;   /* messages failed with -ECANCELED / -ETIMEDOUT / -ESHUTDOWN */
    uint64_t queue_wait_ns; /* sum of time messages waited in the mailbox */
    size_t depth;           /* mailbox depth now */
    bool up;                /* an incarnation is running */
} actor_stats_t;

/** fd readiness callback; < 0 fails the incarnation. */
typedef int (*actor_fd_cb)(actor_t *a, void *state, int fd, uint32_t events, void *arg);
/** timer callback; < 0 fails the incarnation. */
typedef int (*actor_timer_cb)(actor_t *a, void *state, actor_timer_t *t, void *arg);

/** Watch fd for EPOLLIN/EPOLLOUT/... in this actor's epoll set (or change the events). */
int actor_watch_fd(actor_t *a, int fd, uint32_t events, actor_fd_cb cb, void *arg);
/** Stop watching fd. */
int actor_unwatch_fd(actor_t *a, int fd);
/** A timer of this incarnation (freed with it if not before; a callback may free its own
 *  timer). */
int actor_timer_new(actor_timer_t **out, actor_t *a, actor_timer_cb cb, void *arg);
/** Fires after delay_ns, then every interval_ns if non-zero. delay 0 disarms. */
int actor_timer_arm(actor_timer_t *t, uint64_t delay_ns, uint64_t interval_ns);
void actor_timer_free(actor_timer_t *t);

/** The actor is finished with a message it was handed (it is not freed here). */
void actor_done(actor_t *a, msg_t *m);
/** actor_done + push to another mailbox. On refusal (-EAGAIN/-ESHUTDOWN) the message is
 *  the caller's again, not on the taken-work list. */
int actor_forward(actor_t *a, msg_t *m, mailbox_t *to);
/** Any thread: push a message to this actor's mailbox (see mailbox_push). */
int actor_send(actor_t *a, msg_t *m);
/** Any thread: fail the running incarnation at its next loop turn (chaos drills, tests). */
void actor_inject_fault(actor_t *a);

mailbox_t *actor_mailbox(actor_t *a);
const char *actor_name(const actor_t *a);
/** Any thread: a snapshot of the counters. */
void actor_stats(const actor_t *a, actor_stats_t *out);

#endif
