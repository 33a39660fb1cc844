/*
 * mailbox_bench: the measurement behind the mailbox design (DESIGN.md §5).
 *
 * P producer threads push into one consumer, which sleeps on the eventfd when idle (the
 * real protocol: sleeping flag, seq_cst fences). Designs compared:
 *   lanes  runtime/mailbox.c as shipped: one ck_ring spsc ring per producing thread,
 *          exact global bound, oldest-first merge;
 *   mpsc   one ck_ring mpsc ring (reserve + commit; commit spins while an earlier
 *          producer has not published its slot);
 *   mpsc+y the same ring with our own commit that yields after 64 spins.
 * Each run goes in a child process with a time limit: the plain mpsc ring can convoy
 * (producers spin for whole time slices behind a preempted one) and never finish.
 * Reports wall time per message, refused pushes and the push latency tail.
 *
 *   build/tests/mailbox-bench [messages=1000000] [capacity=256] [limit_s=20]
 */
#include <ck_pr.h>
#include <ck_ring.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/mailbox.h"

#define MAXP      8
#define POOL      4096 /* messages per producer, reused cyclically (> capacity) */
#define LAT_SLOTS 40   /* log2 ns buckets */

enum design { LANES, MPSC, MPSC_YIELD };
static const char *design_name[] = {"lanes", "mpsc", "mpsc+y"};

static void nop_free(msg_t *m)
{
    (void)m;
}

/* ---------- the mpsc prototype ---------- */

struct mpsc_box {
    ck_ring_t ring;
    ck_ring_buffer_t *buf;
    int efd;
    bool yield;
    atomic_int sleeping;
};

static int mpsc_push(struct mpsc_box *b, msg_t *m)
{
    unsigned int ticket;
    ck_ring_buffer_t *slot;
    int expected = 1;

    slot = ck_ring_enqueue_reserve_mpsc(&b->ring, b->buf, &ticket);
    if (slot == NULL)
        return -EAGAIN;
    ck_pr_store_ptr(&slot->value, m);
    if (b->yield) {
        /* ck's commit, but giving the CPU away while an earlier producer is late. */
        for (unsigned spins = 0; ck_pr_load_uint(&b->ring.p_tail) != ticket; spins++) {
            if (spins < 64)
                ck_pr_stall();
            else
                sched_yield();
        }
        ck_pr_fence_store();
        ck_pr_store_uint(&b->ring.p_tail, ticket + 1);
    } else {
        ck_ring_enqueue_commit_mpsc(&b->ring, ticket);
    }
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&b->sleeping, memory_order_relaxed) &&
        atomic_compare_exchange_strong(&b->sleeping, &expected, 0))
        (void)eventfd_write(b->efd, 1);
    return 0;
}

static size_t mpsc_pop(struct mpsc_box *b, msg_t **out, size_t max)
{
    size_t n = 0;
    void *v;

    atomic_store_explicit(&b->sleeping, 0, memory_order_relaxed);
    while (n < max && ck_ring_dequeue_mpsc(&b->ring, b->buf, &v))
        out[n++] = v;
    return n;
}

static bool mpsc_prepare_wait(struct mpsc_box *b)
{
    eventfd_t v;

    (void)eventfd_read(b->efd, &v);
    atomic_store_explicit(&b->sleeping, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    if (ck_ring_size(&b->ring) != 0) {
        atomic_store_explicit(&b->sleeping, 0, memory_order_relaxed);
        return true;
    }
    return false;
}

/* ---------- harness ---------- */

struct run {
    enum design d;
    int np;
    uint64_t per_producer;
    mailbox_t *mb;
    struct mpsc_box xb;
    atomic_uint_fast64_t refused;
    uint64_t lat[MAXP][LAT_SLOTS];
    uint64_t lat_max[MAXP];
};

struct parg {
    struct run *r;
    int id;
    msg_t *pool;
};

static void *producer(void *arg)
{
    struct parg *pa = arg;
    struct run *r = pa->r;
    uint64_t refused = 0;

    for (uint64_t i = 0; i < r->per_producer; i++) {
        msg_t *m = &pa->pool[i % POOL];

        for (;;) {
            uint64_t t0 = time_now_ns(), dt;
            int rc = r->d == LANES ? mailbox_push(r->mb, m) : mpsc_push(&r->xb, m);

            dt = time_now_ns() - t0;
            if (rc == 0) {
                int slot = 63 - __builtin_clzll(dt | 1);

                r->lat[pa->id][slot < LAT_SLOTS ? slot : LAT_SLOTS - 1]++;
                if (dt > r->lat_max[pa->id])
                    r->lat_max[pa->id] = dt;
                break;
            }
            refused++;
            sched_yield();
        }
    }
    atomic_fetch_add(&r->refused, refused);
    return NULL;
}

static void *consumer(void *arg)
{
    struct run *r = arg;
    uint64_t total = r->per_producer * (uint64_t)r->np, got = 0;
    msg_t *batch[64];
    int fd = r->d == LANES ? mailbox_fd(r->mb) : r->xb.efd;

    while (got < total) {
        size_t n =
            r->d == LANES ? mailbox_pop_batch(r->mb, batch, 64) : mpsc_pop(&r->xb, batch, 64);

        got += n;
        if (n == 0 && !(r->d == LANES ? mailbox_prepare_wait(r->mb) : mpsc_prepare_wait(&r->xb))) {
            struct pollfd p = {.fd = fd, .events = POLLIN};

            poll(&p, 1, -1);
        }
    }
    return NULL;
}

static void run_child(enum design d, int np, uint64_t total, size_t capacity)
{
    struct run *r = calloc(1, sizeof(*r));
    pthread_t pt[MAXP], ct;
    struct parg pa[MAXP];
    uint64_t t0, t1, hist[LAT_SLOTS] = {0}, count = 0, max = 0, acc = 0, p999 = 0;

    r->d = d;
    r->np = np;
    r->per_producer = total / (uint64_t)np;
    if (d == LANES) {
        if (mailbox_create(&r->mb, "bench", capacity) != 0)
            exit(1);
    } else {
        unsigned size = 2;

        while (size - 1 < capacity)
            size <<= 1;
        r->xb.buf = calloc(size, sizeof(ck_ring_buffer_t));
        ck_ring_init(&r->xb.ring, size);
        r->xb.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        r->xb.yield = d == MPSC_YIELD;
    }
    for (int p = 0; p < np; p++) {
        pa[p] = (struct parg){.r = r, .id = p, .pool = calloc(POOL, sizeof(msg_t))};
        for (int i = 0; i < POOL; i++)
            msg_init(&pa[p].pool[i], 1, nop_free, NULL);
    }
    t0 = time_now_ns();
    pthread_create(&ct, NULL, consumer, r);
    for (int p = 0; p < np; p++)
        pthread_create(&pt[p], NULL, producer, &pa[p]);
    for (int p = 0; p < np; p++)
        pthread_join(pt[p], NULL);
    pthread_join(ct, NULL);
    t1 = time_now_ns();

    for (int p = 0; p < np; p++) {
        for (int i = 0; i < LAT_SLOTS; i++) {
            hist[i] += r->lat[p][i];
            count += r->lat[p][i];
        }
        if (r->lat_max[p] > max)
            max = r->lat_max[p];
    }
    for (int i = 0; i < LAT_SLOTS; i++) {
        acc += hist[i];
        if (acc * 1000 >= count * 999) {
            p999 = 2ull << i; /* upper edge of the bucket */
            break;
        }
    }
    printf("%-6s producers=%d  %7.1f ns/msg  refused=%-8llu push p99.9 < %6llu ns  "
           "max %6llu us\n",
           design_name[d], np, (double)(t1 - t0) / (double)(r->per_producer * np),
           (unsigned long long)atomic_load(&r->refused), (unsigned long long)p999,
           (unsigned long long)(max / 1000));
    exit(0);
}

static void run_one(enum design d, int np, uint64_t total, size_t capacity, int limit_s)
{
    pid_t pid = fork();
    int status;

    if (pid == 0) {
        alarm((unsigned)limit_s);
        run_child(d, np, total, capacity);
    }
    if (pid < 0 || waitpid(pid, &status, 0) < 0)
        exit(1);
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
        printf("%-6s producers=%d  did not finish in %d s\n", design_name[d], np, limit_s);
    else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        printf("%-6s producers=%d  failed\n", design_name[d], np);
}

int main(int argc, char **argv)
{
    uint64_t total = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000;
    size_t capacity = argc > 2 ? strtoull(argv[2], NULL, 10) : 256;
    int limit_s = argc > 3 ? atoi(argv[3]) : 20;
    const int producers[] = {1, 2, 4, 8};

    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("mailbox_bench: %llu messages per run, capacity %zu, %ld CPUs\n",
           (unsigned long long)total, capacity, sysconf(_SC_NPROCESSORS_ONLN));
    for (size_t i = 0; i < sizeof(producers) / sizeof(producers[0]); i++)
        for (int d = LANES; d <= MPSC_YIELD; d++)
            run_one((enum design)d, producers[i], total, capacity, limit_s);
    return 0;
}
