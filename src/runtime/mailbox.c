/*
 * mailbox: bounded multi-producer, single-consumer queue of msg_t* on Concurrency Kit's
 * ck_ring, plus an eventfd.
 *
 * DESIGN
 * - One single-producer ring ("lane") per producing thread, not one multi-producer ring.
 *   ck's mpsc enqueue is reserve (CAS on p_head) + commit (spin until p_tail reaches our
 *   ticket): a producer preempted between the two stalls every later producer, spinning.
 *   Measured here (bench/mailbox_bench.c, 2 cores): with 4 producers the mpsc ring convoys
 *   (200k messages did not finish in 100 s), while spsc lanes never wait on another
 *   thread. Push is wait-free apart from the capacity CAS.
 * - Lanes are found through a process-wide small integer per thread (its "slot", recycled
 *   when the thread exits, handed over under a mutex so a lane always has one producer at
 *   a time): mb->by_slot[slot] is that thread's lane in this mailbox, created on its first
 *   push. The consumer walks the compact mb->lanes[] list.
 * - Exact global bound: `count` (accepted, not yet popped) is raised with a CAS before the
 *   enqueue and lowered after the pop, so a lane (sized like the whole mailbox) can never
 *   be full, and mailbox_capacity() is exactly what was asked for.
 * - Arrival order across lanes: each message is stamped (_enqueued_ns) just before its
 *   enqueue; the consumer stages the head of every lane and hands out the oldest first.
 *   Per-producer FIFO is exact; across producers this keeps causal order (if A's push
 *   happened before B's, A's stamp is not later than B's and A's message is visible by
 *   the time B's is).
 * - Exact close: a producer re-checks `closed` after raising `count` (both seq_cst) and
 *   backs out if it closed meanwhile; mailbox_drained() is `closed && count == 0`.
 * - Wake-up without a syscall per message: the consumer announces `sleeping` before it
 *   blocks; producers write the eventfd only when they see it, and only the one that flips
 *   it back to 0 does. See mailbox_signal() and mailbox_prepare_wait() for the fences.
 * - ThreadSanitizer cannot see ck's volatile-plus-barrier atomics. We tell it about the
 *   hand-over of each message with __tsan_release(m) before the enqueue and
 *   __tsan_acquire(m) after the dequeue; the races it would report inside ck_ring_* and
 *   ck_pr_* themselves are suppressed in tests/tsan-runtime.supp. Nothing of ours is.
 */
#include "runtime/mailbox.h"

#include <ck_pr.h>
#include <ck_ring.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#if defined(__SANITIZE_THREAD__)
#define PAY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PAY_TSAN 1
#endif
#endif

#ifdef PAY_TSAN
#include <sanitizer/tsan_interface.h>
#define tsan_release(p) __tsan_release(p)
#define tsan_acquire(p) __tsan_acquire(p)
#else
#define tsan_release(p) ((void)(p))
#define tsan_acquire(p) ((void)(p))
#endif

/* Threads that have pushed and are still alive, process-wide. */
#define MAX_PRODUCER_THREADS 1024

/* ---------- per-thread producer slots ---------- */

static pthread_mutex_t slot_mu = PTHREAD_MUTEX_INITIALIZER;
static int slot_free[MAX_PRODUCER_THREADS]; /* under slot_mu */
static int slot_nfree, slot_next;           /* under slot_mu */
static pthread_once_t slot_once = PTHREAD_ONCE_INIT;
static pthread_key_t slot_key;
static _Thread_local int my_slot = -1;

/* Thread exit: the slot (and with it this thread's lane in every mailbox) goes to the next
 * thread. The mutex orders our last enqueue before the next owner's first one. */
static void slot_release(void *v)
{
    pthread_mutex_lock(&slot_mu);
    slot_free[slot_nfree++] = (int)((intptr_t)v - 1);
    pthread_mutex_unlock(&slot_mu);
    my_slot = -1;
}

static void slot_key_create(void)
{
    if (pthread_key_create(&slot_key, slot_release) != 0)
        abort();
}

static int thread_slot(void)
{
    int s;

    if (my_slot >= 0)
        return my_slot;
    pthread_once(&slot_once, slot_key_create);
    pthread_mutex_lock(&slot_mu);
    if (slot_nfree > 0)
        s = slot_free[--slot_nfree];
    else if (slot_next < MAX_PRODUCER_THREADS)
        s = slot_next++;
    else
        s = -1;
    pthread_mutex_unlock(&slot_mu);
    if (s < 0) {
        fprintf(stderr, "mailbox: more than %d live threads push to mailboxes\n",
                MAX_PRODUCER_THREADS);
        abort();
    }
    my_slot = s;
    pthread_setspecific(slot_key, (void *)(intptr_t)(s + 1));
    return s;
}

/* ---------- the mailbox ---------- */

struct lane {
    /* ck keeps c_head (consumer) and p_head/p_tail (producer) on separate cache lines. */
    ck_ring_t ring;
    ck_ring_buffer_t *buf;
    msg_t *staged; /* consumer only: dequeued head, not yet handed out */
};

struct mailbox {
    /* Immutable after create. */
    size_t capacity;
    unsigned int ring_size; /* per lane: power of two > capacity */
    int efd;
    char *name;

    /* Written by the consumer (pop) and every producer (push): own cache line. */
    alignas(64) atomic_size_t count; /* accepted and not yet popped */

    /* Read by every producer on every push, written rarely. */
    alignas(64) atomic_bool closed;
    atomic_int sleeping;  /* 1: the consumer is (about to be) blocked on efd */
    atomic_size_t nlanes; /* lanes[0..nlanes) are published */

    alignas(64) pthread_mutex_t lanes_mu; /* lane creation */
    struct lane *lanes[MAX_PRODUCER_THREADS];
    _Atomic(struct lane *) by_slot[MAX_PRODUCER_THREADS];
};

int mailbox_create(mailbox_t **out, const char *name, size_t capacity)
{
    mailbox_t *mb;
    unsigned int size = 2;

    *out = NULL;
    if (capacity == 0 || capacity >= (size_t)INT_MAX / 2)
        return -EINVAL;
    while (size - 1 < capacity)
        size <<= 1;

    mb = aligned_alloc(64, (sizeof(*mb) + 63) & ~(size_t)63);
    if (mb == NULL)
        return -ENOMEM;
    memset(mb, 0, sizeof(*mb));
    mb->capacity = capacity;
    mb->ring_size = size;
    mb->name = strdup(name != NULL ? name : "mailbox");
    if (mb->name == NULL) {
        free(mb);
        return -ENOMEM;
    }
    mb->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (mb->efd < 0) {
        int err = -errno;

        free(mb->name);
        free(mb);
        return err;
    }
    atomic_init(&mb->count, 0);
    atomic_init(&mb->closed, false);
    atomic_init(&mb->sleeping, 0);
    atomic_init(&mb->nlanes, 0);
    for (size_t i = 0; i < MAX_PRODUCER_THREADS; i++)
        atomic_init(&mb->by_slot[i], NULL);
    pthread_mutex_init(&mb->lanes_mu, NULL);
    *out = mb;
    return 0;
}

void mailbox_destroy(mailbox_t *mb)
{
    msg_t *batch[64];
    size_t n, nl;

    if (mb == NULL)
        return;
    mailbox_close(mb);
    /* No consumer runs any more: this thread may pop. */
    while ((n = mailbox_pop_batch(mb, batch, 64)) > 0)
        for (size_t i = 0; i < n; i++)
            msg_fail(batch[i], -ESHUTDOWN);
    nl = atomic_load_explicit(&mb->nlanes, memory_order_acquire);
    for (size_t i = 0; i < nl; i++) {
        free(mb->lanes[i]->buf);
        free(mb->lanes[i]);
    }
    pthread_mutex_destroy(&mb->lanes_mu);
    close(mb->efd);
    free(mb->name);
    free(mb);
}

/* This thread's lane, created on its first push. */
static struct lane *my_lane(mailbox_t *mb)
{
    int slot = thread_slot();
    struct lane *l;
    size_t idx;

    /* Only this thread (the slot's owner) stores by_slot[slot]; relaxed suffices for
     * reading its own store, and the slot hand-over mutex orders a previous owner's. */
    l = atomic_load_explicit(&mb->by_slot[slot], memory_order_relaxed);
    if (l != NULL)
        return l;
    l = aligned_alloc(64, (sizeof(*l) + 63) & ~(size_t)63);
    if (l != NULL) {
        memset(l, 0, sizeof(*l));
        l->buf = calloc(mb->ring_size, sizeof(*l->buf));
    }
    if (l == NULL || l->buf == NULL) {
        /* Hot path: out of memory is fatal and loud, not one more error for every sender. */
        fprintf(stderr, "mailbox %s: out of memory for a producer lane\n", mb->name);
        abort();
    }
    ck_ring_init(&l->ring, mb->ring_size);
    pthread_mutex_lock(&mb->lanes_mu);
    idx = atomic_load_explicit(&mb->nlanes, memory_order_relaxed);
    mb->lanes[idx] = l;
    /* release: the consumer that sees nlanes > idx (acquire) sees the initialized lane. */
    atomic_store_explicit(&mb->nlanes, idx + 1, memory_order_release);
    pthread_mutex_unlock(&mb->lanes_mu);
    atomic_store_explicit(&mb->by_slot[slot], l, memory_order_relaxed);
    return l;
}

/* Wakes the consumer if it announced that it sleeps. Called after an enqueue (or a
 * backed-out reservation, which changes what mailbox_drained() says). */
static void mailbox_signal(mailbox_t *mb)
{
    int expected = 1;

    /* Store-buffer pattern with mailbox_prepare_wait(): we stored p_tail (enqueue) and now
     * load `sleeping`; the consumer stored `sleeping` and then loads p_tail. With a seq_cst
     * fence between store and load on both sides, at least one of us sees the other's
     * store: either the consumer finds the message and does not block, or we see
     * sleeping == 1 and write the eventfd. A busy consumer has sleeping == 0: no syscall. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&mb->sleeping, memory_order_relaxed) == 0)
        return;
    /* Only the producer that flips 1 -> 0 pays for the write; relaxed is enough, the
     * eventfd syscall itself orders what the consumer reads after waking. */
    if (atomic_compare_exchange_strong_explicit(&mb->sleeping, &expected, 0, memory_order_relaxed,
                                                memory_order_relaxed))
        (void)eventfd_write(mb->efd, 1);
}

int mailbox_push(mailbox_t *mb, msg_t *m)
{
    struct lane *l;
    size_t c;

    /* Early refusal; relaxed suffices because the check after the reservation decides. */
    if (atomic_load_explicit(&mb->closed, memory_order_relaxed))
        return -ESHUTDOWN;
    l = my_lane(mb);
    /* Reserve room. The successful CAS is seq_cst: its acquire half pairs with the
     * consumer's release decrement (once we see the room it freed we also see its c_head,
     * so the lane cannot look full); its place in the single total order S matters for
     * close, below. */
    c = atomic_load_explicit(&mb->count, memory_order_relaxed);
    do {
        if (c >= mb->capacity)
            return -EAGAIN;
    } while (!atomic_compare_exchange_weak_explicit(&mb->count, &c, c + 1, memory_order_seq_cst,
                                                    memory_order_relaxed));
    /* Exact close: increment and this load are seq_cst, so if we read "open" our increment
     * precedes the close in S, and mailbox_drained() (seq_cst loads of closed, then count)
     * sees count > 0 until this message is popped. No fence needed (x86: a plain load). */
    if (atomic_load_explicit(&mb->closed, memory_order_seq_cst)) {
        atomic_fetch_sub_explicit(&mb->count, 1, memory_order_relaxed);
        mailbox_signal(mb);
        return -ESHUTDOWN;
    }
    m->_enqueued_ns = time_now_ns();
    tsan_release(m);
    if (!ck_ring_enqueue_spsc(&l->ring, l->buf, m)) {
        /* Impossible: a lane holds at most `count` <= capacity < ring size messages. */
        fprintf(stderr, "mailbox %s: lane full below capacity\n", mb->name);
        abort();
    }
    mailbox_signal(mb);
    return 0;
}

/* Consumer: the lane's head, dequeued into its stage if needed. */
static msg_t *lane_head(struct lane *l)
{
    void *p;

    if (l->staged == NULL && ck_ring_dequeue_spsc(&l->ring, l->buf, &p)) {
        tsan_acquire(p);
        l->staged = p;
    }
    return l->staged;
}

size_t mailbox_pop_batch(mailbox_t *mb, msg_t **out, size_t max)
{
    size_t n = 0, nl;

    /* The consumer is awake: producers need not write the eventfd. It sets the flag again,
     * with the re-check, in mailbox_prepare_wait() before it blocks. */
    if (atomic_load_explicit(&mb->sleeping, memory_order_relaxed) != 0)
        atomic_store_explicit(&mb->sleeping, 0, memory_order_relaxed);
    nl = atomic_load_explicit(&mb->nlanes, memory_order_acquire);

    if (nl == 1) {
        /* One producer: its lane is already in order. */
        struct lane *l = mb->lanes[0];
        msg_t *m;

        while (n < max && (m = lane_head(l)) != NULL) {
            l->staged = NULL;
            out[n++] = m;
        }
    } else {
        /* Oldest stamp first. Every lane is looked at again for each message: one that was
         * empty may have received a message that must precede the next one we hand out. */
        while (n < max) {
            struct lane *best = NULL;

            for (size_t i = 0; i < nl; i++) {
                msg_t *h = lane_head(mb->lanes[i]);

                if (h != NULL && (best == NULL || h->_enqueued_ns < best->staged->_enqueued_ns))
                    best = mb->lanes[i];
            }
            if (best == NULL)
                break;
            out[n++] = best->staged;
            best->staged = NULL;
        }
    }
    if (n > 0) /* release: see mailbox_push */
        atomic_fetch_sub_explicit(&mb->count, n, memory_order_release);
    return n;
}

int mailbox_fd(const mailbox_t *mb)
{
    return mb->efd;
}

bool mailbox_prepare_wait(mailbox_t *mb)
{
    eventfd_t v;
    size_t nl;

    /* Clear a pending wake-up first: anything signalled after this read keeps the fd
     * readable, so the wait that follows cannot miss it. */
    (void)eventfd_read(mb->efd, &v);
    atomic_store_explicit(&mb->sleeping, 1, memory_order_relaxed);
    /* See mailbox_signal(): store `sleeping`, full fence, then look at the lanes. */
    atomic_thread_fence(memory_order_seq_cst);
    nl = atomic_load_explicit(&mb->nlanes, memory_order_acquire);
    for (size_t i = 0; i < nl; i++) {
        struct lane *l = mb->lanes[i];

        if (l->staged != NULL || ck_ring_size(&l->ring) != 0) {
            atomic_store_explicit(&mb->sleeping, 0, memory_order_relaxed);
            return true;
        }
    }
    return false;
}

void mailbox_close(mailbox_t *mb)
{
    /* seq_cst: ordered against the producers' post-reservation check (see mailbox_push). */
    atomic_store_explicit(&mb->closed, true, memory_order_seq_cst);
    mailbox_wake(mb);
}

bool mailbox_is_closed(const mailbox_t *mb)
{
    return atomic_load_explicit(&mb->closed, memory_order_acquire);
}

bool mailbox_drained(mailbox_t *mb)
{
    /* seq_cst loads, in this order: see mailbox_push. A producer that read "open" has its
     * increment before the close in S, hence before our load of count. */
    if (!atomic_load_explicit(&mb->closed, memory_order_seq_cst))
        return false;
    return atomic_load_explicit(&mb->count, memory_order_seq_cst) == 0;
}

void mailbox_wake(mailbox_t *mb)
{
    (void)eventfd_write(mb->efd, 1);
}

size_t mailbox_depth(const mailbox_t *mb)
{
    /* Includes pushes that have reserved room and are about to enqueue. */
    return atomic_load_explicit(&mb->count, memory_order_relaxed);
}

size_t mailbox_capacity(const mailbox_t *mb)
{
    return mb->capacity;
}

const char *mailbox_name(const mailbox_t *mb)
{
    return mb->name;
}
