/*
 * actor_internal: what actor.c and supervisor.c share; nothing outside src/runtime uses it.
 *
 * The actor_t outlives its incarnations. Its fields have three owners:
 *  - immutable after supervisor_add: spec, mb, sup;
 *  - the supervisor, under sup's mutex: everything in the "supervisor" block;
 *  - the running incarnation's thread: inc.
 * Control flags and stats are atomics any thread may touch (orders documented at the uses).
 */
#ifndef PAY_RUNTIME_ACTOR_INTERNAL_H
#define PAY_RUNTIME_ACTOR_INTERNAL_H

#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include "runtime/actor.h"
#include "runtime/supervisor.h"

typedef enum actor_state {
    ACTOR_IDLE,    /* added, never started */
    ACTOR_RUNNING, /* a thread runs an incarnation */
    ACTOR_EXITED,  /* the incarnation's thread finished its work and awaits join */
    ACTOR_BACKOFF, /* joined after a failure; restarts at restart_at_ns */
    ACTOR_STOPPED, /* no more incarnations */
} actor_state_t;

typedef enum actor_exit {
    ACTOR_EXIT_NONE,
    ACTOR_EXIT_CLEAN,   /* mailbox closed and drained, nothing held */
    ACTOR_EXIT_FAILED,  /* a callback returned < 0, start failed, or a fault was injected */
    ACTOR_EXIT_ABORTED, /* the shutdown deadline passed */
} actor_exit_t;

struct incarnation;

struct actor {
    /* Immutable after supervisor_add. */
    actor_spec_t spec;
    mailbox_t *mb;
    supervisor_t *sup;

    /* Supervisor: under sup's mutex. */
    actor_state_t state;
    actor_exit_t exit;
    pthread_t thread;
    bool joinable;          /* thread was created and not joined yet */
    bool shutting;          /* shutdown took it over: no more restarts */
    bool restart_pending;   /* the next incarnation starts after a failure */
    unsigned failures;      /* consecutive failures */
    uint64_t started_ns;    /* when the current/last incarnation was spawned */
    uint64_t restart_at_ns; /* ACTOR_BACKOFF: when to start the next incarnation */

    /* Control, any thread -> incarnation. seq_cst store then mailbox_wake(); the incarnation
     * loads them after mailbox_prepare_wait() cleared the eventfd, so a flag set before that
     * read is seen and one set after it leaves the fd readable. */
    alignas(64) atomic_bool fault;
    atomic_bool abort;

    /* Stats: relaxed everywhere. They are independent counters that publish nothing else,
     * so a reader only needs each value to be untorn; a snapshot may mix moments. */
    alignas(64) atomic_uint_fast64_t st_messages;
    atomic_uint_fast64_t st_restarts;
    atomic_uint_fast64_t st_failed_back;
    atomic_uint_fast64_t st_queue_wait_ns;
    atomic_bool st_up;

    /* The running incarnation's thread only. */
    alignas(64) struct incarnation *inc;
};

/** supervisor.c: creates an actor (mailbox included) for supervisor_add. */
int actor_create(actor_t **out, supervisor_t *s, const actor_spec_t *spec);
/** supervisor.c: frees an actor with no running incarnation (destroys its mailbox). */
void actor_free(actor_t *a);
/** pthread entry of one incarnation (arg: the actor_t). */
void *actor_thread_main(void *arg);
/** Fails every queued message (-ETIMEDOUT if expired, else -ESHUTDOWN) from a thread that
 *  is the mailbox's only consumer now. Returns how many. */
size_t actor_fail_queued(actor_t *a);

/** actor.c -> supervisor.c: the incarnation has ended (called last on its thread). */
void supervisor_incarnation_exited(actor_t *a, actor_exit_t why);

#endif
