/*
 * actor-demo: the runtime on its own. Three actors under a supervisor until SIGINT/SIGTERM:
 *   ticker  - a 1 s timer: writes a byte into a pipe and sends a TICK to the counter;
 *   echo    - watches the pipe's read end and reports what it read to the counter;
 *   counter - counts what it is told and logs a summary every 5 s (its own timer).
 * On a signal the supervisor stops them in the order they were added (ticker, echo,
 * counter: producers before their consumer), each draining its mailbox, and we exit 0.
 *
 *   build/actor-demo [--tick-ms N] [--help]
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "runtime/actor.h"
#include "runtime/supervisor.h"

enum { MSG_TICK = 1, MSG_ECHO };

typedef struct demo_msg {
    msg_t hdr;
    uint64_t value;
} demo_msg_t;

/* Shared wiring, set up by main before the actors start and read-only afterwards. */
struct demo {
    int pipe_rd, pipe_wr;
    uint64_t tick_ns;
    actor_t *counter;
};

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void logf_(const char *fmt, ...)
{
    char ts[32];
    struct timespec now;
    struct tm tm;
    va_list ap;

    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%s.%03ldZ actor-demo: ", ts, now.tv_nsec / 1000000);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static void demo_msg_free(msg_t *m)
{
    free(m);
}

/* Sends to the counter; a refused message (full or closed mailbox) is still ours. */
static void tell_counter(struct demo *d, uint32_t type, uint64_t value)
{
    demo_msg_t *m = malloc(sizeof(*m));

    if (m == NULL)
        abort();
    msg_init(&m->hdr, type, demo_msg_free, NULL);
    m->value = value;
    if (actor_send(d->counter, &m->hdr) != 0)
        msg_dispose(&m->hdr);
}

/* ---------- ticker ---------- */

struct ticker {
    struct demo *d;
    uint64_t ticks;
};

static int ticker_fire(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    struct ticker *tk = state;

    tk->ticks++;
    if (write(tk->d->pipe_wr, "t", 1) < 0 && errno != EAGAIN)
        return -errno;
    tell_counter(tk->d, MSG_TICK, tk->ticks);
    if (tk->ticks % 10 == 0)
        logf_("ticker: %llu ticks", (unsigned long long)tk->ticks);
    return 0;
}

static int ticker_start(actor_t *a, void *arg, void **state)
{
    struct demo *d = arg;
    struct ticker *tk = calloc(1, sizeof(*tk));
    actor_timer_t *t;
    int rc;

    if (tk == NULL)
        return -ENOMEM;
    tk->d = d;
    if ((rc = actor_timer_new(&t, a, ticker_fire, NULL)) < 0 ||
        (rc = actor_timer_arm(t, d->tick_ns, d->tick_ns)) < 0) {
        free(tk);
        return rc;
    }
    *state = tk;
    return 0;
}

static int no_messages(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
    }
    return 0;
}

static void free_state(actor_t *a, void *state)
{
    free(state);
}

/* ---------- echo ---------- */

static int echo_readable(actor_t *a, void *state, int fd, uint32_t events, void *arg)
{
    struct demo *d = state;
    char buf[256];
    ssize_t n;
    uint64_t total = 0;

    while ((n = read(fd, buf, sizeof(buf))) > 0)
        total += (uint64_t)n;
    if (n < 0 && errno != EAGAIN)
        return -errno;
    if (total > 0)
        tell_counter(d, MSG_ECHO, total);
    return 0;
}

static int echo_start(actor_t *a, void *arg, void **state)
{
    struct demo *d = arg;

    *state = d;
    return actor_watch_fd(a, d->pipe_rd, EPOLLIN, echo_readable, NULL);
}

/* ---------- counter ---------- */

struct counter {
    uint64_t ticks, echoed_bytes, messages;
};

static int counter_report(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    struct counter *c = state;
    actor_stats_t st;

    actor_stats(a, &st);
    logf_("counter: %llu ticks, %llu bytes echoed, %llu messages (mailbox depth %zu)",
          (unsigned long long)c->ticks, (unsigned long long)c->echoed_bytes,
          (unsigned long long)c->messages, st.depth);
    return 0;
}

static int counter_start(actor_t *a, void *arg, void **state)
{
    struct counter *c = calloc(1, sizeof(*c));
    actor_timer_t *t;
    int rc;

    if (c == NULL)
        return -ENOMEM;
    if ((rc = actor_timer_new(&t, a, counter_report, NULL)) < 0 ||
        (rc = actor_timer_arm(t, 5000000000ull, 5000000000ull)) < 0) {
        free(c);
        return rc;
    }
    *state = c;
    return 0;
}

static int counter_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    struct counter *c = state;

    for (size_t i = 0; i < n; i++) {
        demo_msg_t *m = (demo_msg_t *)msgs[i];

        if (m->hdr.type == MSG_TICK)
            c->ticks++;
        else if (m->hdr.type == MSG_ECHO)
            c->echoed_bytes += m->value;
        c->messages++;
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
    }
    return 0;
}

static void counter_stop(actor_t *a, void *state)
{
    counter_report(a, state, NULL, NULL);
    free(state);
}

/* ---------- main ---------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: actor-demo [--tick-ms N]\n"
               "  Runs a ticker, an echo and a counter actor under a supervisor until\n"
               "  SIGINT or SIGTERM, then shuts them down in order and exits 0.\n"
               "  --tick-ms N   ticker period in milliseconds (1..60000, default 1000)\n");
}

int main(int argc, char **argv)
{
    struct demo d = {.pipe_rd = -1, .pipe_wr = -1, .tick_ns = 1000000000ull};
    supervisor_t *sup = NULL;
    sigset_t sigs;
    int p[2], sig, rc, status = 1;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--tick-ms") == 0 && i + 1 < argc) {
            char *end;
            long ms = strtol(argv[++i], &end, 10);

            if (*end != '\0' || ms < 1 || ms > 60000) {
                fprintf(stderr, "actor-demo: --tick-ms: expected 1..60000, got '%s'\n", argv[i]);
                return 2;
            }
            d.tick_ns = (uint64_t)ms * 1000000ull;
        } else {
            fprintf(stderr, "actor-demo: unknown argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }

    /* Signals are taken by this thread only: block them before any actor thread exists
     * (threads inherit the mask), then wait for them synchronously. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
        logf_("pipe: %s", strerror(errno));
        return 1;
    }
    d.pipe_rd = p[0];
    d.pipe_wr = p[1];

    const actor_spec_t ticker = {.name = "ticker",
                                 .start = ticker_start,
                                 .handle = no_messages,
                                 .stop = free_state,
                                 .arg = &d};
    const actor_spec_t echo = {
        .name = "echo", .start = echo_start, .handle = no_messages, .arg = &d};
    const actor_spec_t counter = {.name = "counter",
                                  .start = counter_start,
                                  .handle = counter_handle,
                                  .stop = counter_stop,
                                  .critical = true};

    if ((rc = supervisor_create(&sup, NULL)) < 0 || (rc = supervisor_add(sup, &ticker, NULL)) < 0 ||
        (rc = supervisor_add(sup, &echo, NULL)) < 0 ||
        (rc = supervisor_add(sup, &counter, &d.counter)) < 0 || (rc = supervisor_start(sup)) < 0) {
        logf_("cannot start the actors: %s", strerror(-rc));
        goto out;
    }
    logf_("running: ticker every %llu ms, echo, counter; Ctrl-C to stop",
          (unsigned long long)(d.tick_ns / 1000000u));

    for (;;) {
        struct timespec every = {30, 0};

        sig = sigtimedwait(&sigs, NULL, &every);
        if (sig == SIGINT || sig == SIGTERM)
            break;
        if (sig < 0 && errno == EAGAIN)
            logf_("supervisor: %s", supervisor_healthy(sup) ? "healthy" : "DEGRADED");
    }
    logf_("%s: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    rc = supervisor_shutdown(sup, time_now_ns() + 5000000000ull);
    if (rc < 0)
        logf_("shutdown: work was failed back (%s)", strerror(-rc));
    logf_("stopped");
    status = 0;
out:
    supervisor_destroy(sup);
    close(p[0]);
    close(p[1]);
    return status;
}
