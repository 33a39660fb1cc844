/*
 * msg: life-cycle helpers for the message header (see msg.h for the ownership rules).
 */
#include "runtime/msg.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

void msg_init(msg_t *m, uint32_t type, msg_free_fn free_fn, msg_fail_fn fail_fn)
{
    m->type = type;
    m->_flags = 0;
    m->free = free_fn;
    m->fail = fail_fn;
    m->deadline_ns = 0;
    m->_enqueued_ns = 0;
    m->_prev = NULL;
    m->_next = NULL;
}

void msg_dispose(msg_t *m)
{
    if (m == NULL)
        return;
    if (m->free == NULL) {
        /* A message nobody can free is a programming error that would leak silently. */
        fprintf(stderr, "msg: message of type %u has no free function\n", m->type);
        abort();
    }
    m->free(m);
}

void msg_fail(msg_t *m, int err)
{
    if (m == NULL)
        return;
    if (m->fail != NULL)
        m->fail(m, err);
    else
        msg_dispose(m);
}

uint64_t time_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
