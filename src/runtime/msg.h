/*
 * msg: the header every actor message starts with.
 *
 * A message is a struct of the sender's that embeds msg_t as its first member. Whoever
 * holds the pointer owns the message and everything it points to; pushing it into a
 * mailbox transfers ownership to the receiving actor (only on success: a refused push
 * leaves it with the sender). The owner ends a message's life in exactly one of two ways:
 *   msg_dispose(m)      normal end: m->free(m)
 *   msg_fail(m, err)    the work cannot be done (actor died, shutdown, deadline): m->fail
 *                       tells the message's originator (e.g. ends a gRPC call UNAVAILABLE)
 *                       and then frees; without a fail function it only frees.
 * Fields starting with '_' belong to the runtime.
 */
#ifndef PAY_RUNTIME_MSG_H
#define PAY_RUNTIME_MSG_H

#include <stdint.h>

typedef struct msg msg_t;

/** Frees the message and everything it owns. */
typedef void (*msg_free_fn)(msg_t *m);
/** Reports failure to the originator, then frees. err is a negative errno:
 *  -ECANCELED (the actor that held it died), -ESHUTDOWN, -ETIMEDOUT (deadline passed). */
typedef void (*msg_fail_fn)(msg_t *m, int err);

struct msg {
    uint32_t type;         /* sender-defined message kind */
    uint32_t _flags;       /* runtime */
    msg_free_fn free;      /* required */
    msg_fail_fn fail;      /* optional */
    uint64_t deadline_ns;  /* CLOCK_MONOTONIC deadline, 0 = none: expired messages are failed
                              with -ETIMEDOUT instead of being handed to an actor */
    uint64_t _enqueued_ns; /* runtime: set by mailbox_push, for queue-wait metrics */
    msg_t *_prev, *_next;  /* runtime: links of the owning actor's taken-work list */
};

/** Initializes the header of a message about to be sent. */
void msg_init(msg_t *m, uint32_t type, msg_free_fn free_fn, msg_fail_fn fail_fn);
/** Ends a message normally (calls its free function). NULL is allowed. */
void msg_dispose(msg_t *m);
/** Ends a message as failed with a negative errno (fail function or, without one, free). */
void msg_fail(msg_t *m, int err);

/** CLOCK_MONOTONIC now in nanoseconds. */
uint64_t time_now_ns(void);

#endif
