/*
 * supervisor: owns the actors (their mailboxes outlive incarnations), starts them, restarts
 * an incarnation that fails with exponential backoff, and shuts them down in order.
 *
 * Restart delays: base, then each at least double the last, capped at cap; after
 * `degraded_after` consecutive failures a critical actor makes supervisor_healthy() false
 * until an incarnation runs cleanly again (it keeps retrying at the cap).
 *
 * Shutdown, actor by actor in the order they were added: close the mailbox (stop intake),
 * let the actor process what is queued and what it holds, then stop its thread. Anything
 * left when the deadline passes is failed back (-ESHUTDOWN; -ETIMEDOUT if its own deadline
 * passed). An actor that is down (in backoff) or fails during shutdown gets one more
 * incarnation at once, without backoff, to drain its queue; after another failure what is
 * left is failed back.
 * Handlers must not block: the deadline is enforced between callbacks.
 *
 * Create/add/start/shutdown/destroy from one thread (the main's); the rest from any thread.
 */
#ifndef PAY_RUNTIME_SUPERVISOR_H
#define PAY_RUNTIME_SUPERVISOR_H

#include <stdbool.h>
#include <stdint.h>
#include "runtime/actor.h"

typedef struct supervisor supervisor_t;

typedef struct supervisor_config {
    uint64_t backoff_base_ns; /* default 100 ms */
    uint64_t backoff_cap_ns;  /* default 30 s */
    unsigned degraded_after;  /* consecutive failures, default 3 */
    uint64_t stable_ns;       /* an incarnation up this long ran cleanly: the failure count
                                 and the backoff start over (default 5 s) */
} supervisor_config_t;

int supervisor_create(supervisor_t **out, const supervisor_config_t *cfg);
/** Adds an actor (not yet running). The spec is copied; strings must outlive the actor. */
int supervisor_add(supervisor_t *s, const actor_spec_t *spec, actor_t **out);
/** Starts every added actor. */
int supervisor_start(supervisor_t *s);
/** Ordered shutdown with an absolute CLOCK_MONOTONIC deadline. Returns 0, or -ETIMEDOUT
 *  if work had to be failed back. */
int supervisor_shutdown(supervisor_t *s, uint64_t deadline_ns);
/** After shutdown: frees the actors and mailboxes. */
void supervisor_destroy(supervisor_t *s);
/** Any thread: false while a critical actor is down past degraded_after failures. */
bool supervisor_healthy(const supervisor_t *s);
/** Any thread: calls fn for each actor in the order added (e.g. to export actor_stats as
 *  metrics). fn runs under the supervisor's lock: it must not call supervisor_* itself. */
void supervisor_foreach(const supervisor_t *s, void (*fn)(actor_t *a, void *arg), void *arg);

#endif
