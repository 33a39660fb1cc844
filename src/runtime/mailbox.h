/*
 * mailbox: a bounded multi-producer, single-consumer queue of msg_t* on Concurrency Kit's
 * ck_ring (one single-producer ring per sending thread, so a preempted sender never stalls
 * another), with an eventfd that becomes readable when messages wait and the consumer
 * sleeps. Any thread may push; only the owning actor's thread pops. Messages come out in
 * arrival order: per sender exactly, across senders by enqueue time (causal order kept).
 *
 * Pushing never blocks: a full mailbox refuses at once (-EAGAIN) and the message stays the
 * sender's (load shedding). A closed mailbox refuses with -ESHUTDOWN. The mailbox outlives
 * the actor incarnations that consume it (the supervisor owns it).
 */
#ifndef PAY_RUNTIME_MAILBOX_H
#define PAY_RUNTIME_MAILBOX_H

#include <stdbool.h>
#include <stddef.h>
#include "runtime/msg.h"

typedef struct mailbox mailbox_t;

/** Creates a mailbox holding exactly `capacity` messages (1 .. INT_MAX/2). 0 or -errno. */
int mailbox_create(mailbox_t **out, const char *name, size_t capacity);
/** Destroys the mailbox, failing any message still queued with -ESHUTDOWN. */
void mailbox_destroy(mailbox_t *mb);
/** Any thread. 0: ownership passed. -EAGAIN full / -ESHUTDOWN closed: still the caller's. */
int mailbox_push(mailbox_t *mb, msg_t *m);
/** Consumer thread only. Takes up to max messages in arrival order; returns the count. */
size_t mailbox_pop_batch(mailbox_t *mb, msg_t **out, size_t max);
/** The eventfd to wait on (readable when messages may be waiting). */
int mailbox_fd(const mailbox_t *mb);
/** Consumer thread: clears the eventfd and announces that the consumer is about to sleep;
 *  returns true if messages are waiting (do not sleep). */
bool mailbox_prepare_wait(mailbox_t *mb);
/** Refuses every later push with -ESHUTDOWN and wakes the consumer. Any thread; idempotent.
 *  A push racing with close either succeeds (the message is queued before the close takes
 *  effect) or is refused; none is accepted after mailbox_drained() turned true. */
void mailbox_close(mailbox_t *mb);
/** Any thread: true once mailbox_close was called. */
bool mailbox_is_closed(const mailbox_t *mb);
/** Consumer thread: true when the mailbox is closed and every message it accepted has been
 *  popped (no push can still be in flight). */
bool mailbox_drained(mailbox_t *mb);
/** Any thread: makes the eventfd readable so the consumer wakes up (control signals). */
void mailbox_wake(mailbox_t *mb);
/** Approximate number of queued messages. Any thread. */
size_t mailbox_depth(const mailbox_t *mb);
/** Usable capacity. */
size_t mailbox_capacity(const mailbox_t *mb);
const char *mailbox_name(const mailbox_t *mb);

#endif
