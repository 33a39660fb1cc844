/*
 * test_ratelimit_redis: the Redis client the rate limiter runs on (io/redis.c), inside a real
 * actor, against a real redis-server this test starts (requirepass, so AUTH is exercised) and
 * against a silent TCP listener that accepts connections and never answers.
 *
 * Covered: 1000 commands queued in one actor turn come back in order, each once; AUTH and
 * SELECT from the configuration; a wrong password drops the connection with the server's
 * reason; a silent server: the command's callback gets NULL within the timeout (plus margin),
 * the connection is dropped and re-established with backoff (attempts spaced out, not a
 * busy loop); a refused port: commands are refused at once (-ENOTCONN) while reconnecting,
 * and the client connects by itself once a server listens there.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "io/redis.h"
#include "runtime/actor.h"
#include "runtime/msg.h"
#include "runtime/supervisor.h"

#include "redis_fixture.h"

#define PASSWORD "s3cret-pw"

static double now_s(void)
{
    return (double)time_now_ns() / 1e9;
}

/* A port that was free a moment ago (bind to 0, read it, close). */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static int setup_group(void **state)
{
    (void)state;
    if (redis_fixture_prepare("/tmp/pay-test-redis.XXXXXX") != 0)
        return -1;
    redis_port = free_port();
    redis_pid = redis_start(redis_port, PASSWORD);
    return redis_pid > 0 ? 0 : -1;
}

static int teardown_group(void **state)
{
    (void)state;
    redis_fixture_cleanup();
    return 0;
}

/* ---- an actor owning one client ---------------------------------------------------------- */

typedef struct harness {
    redis_config_t cfg;
    supervisor_t *sup;
    actor_t *a;
    redis_client_t *c; /* actor thread */
    pthread_mutex_t mu;
    /* Results, under mu. */
    int replies, nulls, out_of_order, errors;
    long long expect_next;
    char last_err[256];
    int downs;
    double down_at[64];
    char last_down[256];
    int cmd_rc;
    double null_at;
    redis_client_stats_t stats;
} harness_t;

typedef struct run_msg {
    msg_t hdr;
    void (*fn)(harness_t *h, void *arg);
    void *arg;
    sem_t *done;
} run_msg_t;

static void run_free(msg_t *m)
{
    free(m);
}

static void on_down(redis_client_t *c, const char *why, void *arg)
{
    (void)c;
    harness_t *h = arg;
    pthread_mutex_lock(&h->mu);
    if (h->downs < 64)
        h->down_at[h->downs] = now_s();
    h->downs++;
    snprintf(h->last_down, sizeof h->last_down, "%s", why);
    pthread_mutex_unlock(&h->mu);
}

static int h_start(actor_t *a, void *arg, void **state)
{
    harness_t *h = arg;
    h->cfg.on_down = on_down;
    h->cfg.arg = h;
    int rc = redis_client_create(&h->c, a, &h->cfg);
    *state = h;
    return rc;
}

static int h_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    harness_t *h = state;
    for (size_t i = 0; i < n; i++) {
        run_msg_t *m = (run_msg_t *)msgs[i];
        m->fn(h, m->arg);
        sem_post(m->done);
        actor_done(a, msgs[i]);
        msg_dispose(msgs[i]);
    }
    return 0;
}

static void h_stop(actor_t *a, void *state)
{
    (void)a;
    harness_t *h = state;
    redis_client_destroy(h->c);
    h->c = NULL;
}

static harness_t *harness_new(int port, const char *password, int db, uint64_t timeout_ns)
{
    harness_t *h = calloc(1, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    h->cfg = (redis_config_t){.host = "127.0.0.1",
                              .port = port,
                              .password = password,
                              .db = db,
                              .connect_timeout_ns = timeout_ns,
                              .command_timeout_ns = timeout_ns,
                              .backoff_base_ns = 50000000u,
                              .backoff_cap_ns = 400000000u,
                              .name = "test"};
    assert_int_equal(supervisor_create(&h->sup, NULL), 0);
    actor_spec_t spec = {
        .name = "redis-test", .arg = h, .start = h_start, .handle = h_handle, .stop = h_stop};
    assert_int_equal(supervisor_add(h->sup, &spec, &h->a), 0);
    assert_int_equal(supervisor_start(h->sup), 0);
    return h;
}

static void harness_free(harness_t *h)
{
    supervisor_shutdown(h->sup, time_now_ns() + 5000000000ull);
    supervisor_destroy(h->sup);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

/* Runs fn on the actor's thread and waits for it. */
static void on_actor(harness_t *h, void (*fn)(harness_t *, void *), void *arg)
{
    sem_t done;
    sem_init(&done, 0, 0);
    run_msg_t *m = calloc(1, sizeof *m);
    msg_init(&m->hdr, 1, run_free, NULL);
    m->fn = fn;
    m->arg = arg;
    m->done = &done;
    assert_int_equal(actor_send(h->a, &m->hdr), 0);
    sem_wait(&done);
    sem_destroy(&done);
}

static void on_reply(redis_client_t *c, redisReply *r, void *arg)
{
    (void)c;
    harness_t *h = arg;
    pthread_mutex_lock(&h->mu);
    if (!r) {
        h->nulls++;
        h->null_at = now_s();
    } else if (r->type == REDIS_REPLY_ERROR) {
        h->errors++;
        snprintf(h->last_err, sizeof h->last_err, "%s", r->str);
    } else {
        h->replies++;
        if (r->type == REDIS_REPLY_INTEGER) {
            if (r->integer != h->expect_next)
                h->out_of_order++;
            h->expect_next++;
        }
    }
    pthread_mutex_unlock(&h->mu);
}

static void do_cmd(harness_t *h, void *arg)
{
    const char *const *argv = arg;
    int argc = 0;
    while (argv[argc])
        argc++;
    int rc = redis_client_command(h->c, on_reply, h, argc, (const char **)argv, NULL);
    pthread_mutex_lock(&h->mu);
    h->cmd_rc = rc;
    pthread_mutex_unlock(&h->mu);
}

static void do_incr_1000(harness_t *h, void *arg)
{
    (void)arg;
    const char *argv[] = {"INCR", "test:counter"};
    for (int i = 0; i < 1000; i++)
        assert_int_equal(redis_client_command(h->c, on_reply, h, 2, argv, NULL), 0);
    pthread_mutex_lock(&h->mu);
    h->cmd_rc = (int)redis_client_pending(h->c);
    pthread_mutex_unlock(&h->mu);
}

static void do_stats(harness_t *h, void *arg)
{
    (void)arg;
    redis_client_stats_t s;
    redis_client_stats(h->c, &s);
    pthread_mutex_lock(&h->mu);
    h->stats = s;
    pthread_mutex_unlock(&h->mu);
}

static int get_int(harness_t *h, int *field)
{
    pthread_mutex_lock(&h->mu);
    int v = *field;
    pthread_mutex_unlock(&h->mu);
    return v;
}

/* Waits up to ms for *field >= want. */
static bool wait_for(harness_t *h, int *field, int want, int ms)
{
    for (int i = 0; i < ms / 10; i++) {
        if (get_int(h, field) >= want)
            return true;
        sleep_ms(10);
    }
    return get_int(h, field) >= want;
}

static char *redis_get(const char *key, int db)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "redis-cli -h 127.0.0.1 -p %d -a %s --no-auth-warning -n %d GET %s",
             redis_port, PASSWORD, db, key);
    FILE *f = popen(cmd, "r");
    static char out[128];
    out[0] = '\0';
    if (f) {
        if (!fgets(out, sizeof out, f))
            out[0] = '\0';
        pclose(f);
    }
    out[strcspn(out, "\n")] = '\0';
    return out;
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_pipeline_auth_select(void **state)
{
    (void)state;
    harness_t *h = harness_new(redis_port, PASSWORD, 3, 2000000000u);
    const char *del[] = {"DEL", "test:counter", NULL};
    on_actor(h, do_cmd, del);
    assert_int_equal(get_int(h, &h->cmd_rc), 0);
    assert_true(wait_for(h, &h->replies, 1, 5000));
    h->expect_next = 1;
    on_actor(h, do_incr_1000, NULL);
    assert_int_equal(get_int(h, &h->cmd_rc), 1000); /* all queued in one turn */
    assert_true(wait_for(h, &h->replies, 1001, 5000));
    assert_int_equal(get_int(h, &h->out_of_order), 0);
    assert_int_equal(get_int(h, &h->nulls), 0);
    assert_int_equal(get_int(h, &h->errors), 0);
    assert_int_equal(get_int(h, &h->downs), 0);
    /* AUTH and SELECT 3 happened: the counter is in db 3, not 0. */
    assert_string_equal(redis_get("test:counter", 3), "1000");
    assert_string_equal(redis_get("test:counter", 0), "");
    on_actor(h, do_stats, NULL);
    assert_true(h->stats.connected);
    assert_int_equal(h->stats.connects, 1);
    assert_int_equal(h->stats.failures, 0);
    harness_free(h);
}

static void test_wrong_password(void **state)
{
    (void)state;
    harness_t *h = harness_new(redis_port, "not-the-password", 0, 2000000000u);
    const char *ping[] = {"PING", NULL};
    on_actor(h, do_cmd, ping);
    assert_true(wait_for(h, &h->downs, 1, 5000));
    pthread_mutex_lock(&h->mu);
    assert_non_null(strstr(h->last_down, "AUTH failed"));
    pthread_mutex_unlock(&h->mu);
    /* The PING queued behind the refused AUTH got no answer of its own. */
    assert_true(wait_for(h, &h->nulls, 1, 1000));
    harness_free(h);
}

static void test_silent_server_times_out(void **state)
{
    (void)state;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_int_equal(bind(lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(lfd, 64), 0); /* the kernel accepts; nobody ever answers */
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&a, &len), 0);
    harness_t *h = harness_new(ntohs(a.sin_port), NULL, 0, 100000000u);
    sleep_ms(50);
    const char *ping[] = {"PING", NULL};
    double t0 = now_s();
    on_actor(h, do_cmd, ping);
    assert_int_equal(get_int(h, &h->cmd_rc), 0);
    assert_true(wait_for(h, &h->nulls, 1, 3000));
    pthread_mutex_lock(&h->mu);
    double took = h->null_at - t0;
    assert_non_null(strstr(h->last_down, "no reply within 100 ms"));
    pthread_mutex_unlock(&h->mu);
    assert_true(took >= 0.09);
    assert_true(took < 0.1 + 0.5);
    /* The dropped connection is replaced after the backoff (50 ms); the next command times
     * out the same way (the server still says nothing): two outages, each bounded. */
    sleep_ms(200);
    t0 = now_s();
    on_actor(h, do_cmd, ping);
    assert_int_equal(get_int(h, &h->cmd_rc), 0);
    assert_true(wait_for(h, &h->nulls, 2, 3000));
    pthread_mutex_lock(&h->mu);
    took = h->null_at - t0;
    pthread_mutex_unlock(&h->mu);
    assert_true(took < 0.1 + 0.5);
    on_actor(h, do_stats, NULL);
    assert_int_equal(h->stats.timeouts, 2);
    assert_int_equal(h->stats.connects, 2);
    assert_int_equal(get_int(h, &h->downs), 2);
    harness_free(h);
    close(lfd);
}

static void test_refused_then_server_appears(void **state)
{
    (void)state;
    int port = free_port();
    harness_t *h = harness_new(port, PASSWORD, 0, 500000000u);
    assert_true(wait_for(h, &h->downs, 3, 3000)); /* refused, retried, refused... */
    /* Attempts are spaced by the backoff (50, 100, 200 ms ...), not a busy loop. */
    pthread_mutex_lock(&h->mu);
    assert_true(h->down_at[2] - h->down_at[0] >= 0.1);
    int downs_before = h->downs;
    pthread_mutex_unlock(&h->mu);
    sleep_ms(1000);
    /* Capped at 400 ms: at most ~1000/400+1 more attempts in a second, at least one. */
    int more = get_int(h, &h->downs) - downs_before;
    assert_true(more >= 1 && more <= 5);
    /* Between attempts a command is refused at once. */
    const char *ping[] = {"PING", NULL};
    int refused = 0;
    for (int i = 0; i < 50 && !refused; i++) {
        on_actor(h, do_cmd, ping);
        refused = get_int(h, &h->cmd_rc) == -ENOTCONN;
        if (!refused)
            sleep_ms(5);
    }
    assert_true(refused);
    /* A server appears on that port: the client connects by itself. */
    pid_t pid = redis_start(port, PASSWORD);
    assert_true(pid > 0);
    int ok = 0;
    for (int i = 0; i < 100 && !ok; i++) {
        int before = get_int(h, &h->replies);
        on_actor(h, do_cmd, ping);
        if (get_int(h, &h->cmd_rc) == 0 && wait_for(h, &h->replies, before + 1, 1000))
            ok = 1;
        else
            sleep_ms(50);
    }
    assert_true(ok);
    harness_free(h);
    redis_stop(&pid);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pipeline_auth_select),
        cmocka_unit_test(test_wrong_password),
        cmocka_unit_test(test_silent_server_times_out),
        cmocka_unit_test(test_refused_then_server_appears),
    };
    return cmocka_run_group_tests_name("integration_ratelimit_redis", tests, setup_group,
                                       teardown_group);
}
