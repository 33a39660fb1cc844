/*
 * The gRPC layer in one process with real actors under a real supervisor, driven by a
 * gRPC client over loopback: an actor replies with a message and trailing metadata and
 * sees the caller's metadata, peer and deadline; the ledger actor counts the messages it
 * gets (invalid requests never reach it); an actor dying while it holds a call ends the
 * call UNAVAILABLE and is restarted; a full mailbox refuses at once (UNAVAILABLE); shutdown
 * fails back the calls an actor still holds (UNAVAILABLE); the finish hook sees every call.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "actors/ledger.h"
#include "actors/payment_api.h"
#include "e2e/grpc_client.h"
#include "io/grpc_server.h"
#include "runtime/supervisor.h"

#define GET_BALANCE "/payment.v1.PaymentService/GetAccountBalance"
#define GET_PAYMENT "/payment.v1.PaymentService/GetPayment"
#define AUTHORIZE   "/payment.v1.PaymentService/AuthorizePayment"

typedef enum tmode {
    MODE_REPLY, /* answer at once */
    MODE_DIE,   /* fail the incarnation while holding the message */
    MODE_BLOCK, /* block in handle until released, then answer */
    MODE_HOLD,  /* keep every message, never answer */
} tmode_t;

typedef struct tactor {
    tmode_t mode;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool blocked, release;
    size_t nheld;
    int64_t deadline_left_ns; /* of the last message, as the actor saw it */
} tactor_t;

#define MAX_FINISHED 256
typedef struct finished {
    char method[96];
    grpc_status_code code;
} finished_t;

typedef struct fixture {
    tactor_t t;
    supervisor_t *sup;
    actor_t *target, *ledger;
    payment_api_t api;
    rpc_server_t *srv;
    gc_t *gc;
    pthread_mutex_t mu; /* guards finished */
    finished_t finished[MAX_FINISHED];
    size_t nfinished;
} fixture_t;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- the test actor ---- */

static void reply(payment_msg_t *m, tactor_t *t)
{
    char client[64] = "-", peer[64] = "-", account[256];
    const char *v;
    size_t len;
    if (rpc_call_metadata(m->call, "x-client-id", &v, &len))
        snprintf(client, sizeof(client), "%.*s", (int)len, v);
    if (rpc_call_peer_ip(m->call, peer, sizeof(peer)) < 0)
        snprintf(peer, sizeof(peer), "?");
    snprintf(account, sizeof(account), "%s|%s|%s", client, peer, rpc_call_method(m->call));
    uint64_t dl = rpc_call_deadline_ns(m->call);
    pthread_mutex_lock(&t->mu);
    t->deadline_left_ns = dl ? (int64_t)(dl - now_ns()) : -1;
    pthread_mutex_unlock(&t->mu);
    Payment__V1__GetAccountBalanceResponse resp = PAYMENT__V1__GET_ACCOUNT_BALANCE_RESPONSE__INIT;
    resp.account_id = account;
    resp.available_balance_cents = 4200;
    resp.currency = "EUR";
    const rpc_md_t trailers[] = {{"x-ratelimit-limit", "100"}, {"x-ratelimit-remaining", "99"}};
    assert_int_equal(payment_msg_reply(m, &resp.base, trailers, 2), 0);
    assert_null(m->call);
}

static int t_start(actor_t *a, void *arg, void **state)
{
    *state = arg;
    return 0;
}

static int t_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    tactor_t *t = state;
    for (size_t i = 0; i < n; i++) {
        payment_msg_t *m = (payment_msg_t *)msgs[i];
        switch (t->mode) {
        case MODE_DIE:
            return -EIO;
        case MODE_HOLD:
            pthread_mutex_lock(&t->mu);
            t->nheld++;
            pthread_cond_broadcast(&t->cv);
            pthread_mutex_unlock(&t->mu);
            continue;
        case MODE_BLOCK: {
            pthread_mutex_lock(&t->mu);
            t->blocked = true;
            pthread_cond_broadcast(&t->cv);
            uint64_t until = now_ns() + 30000000000u;
            while (!t->release && now_ns() < until) {
                pthread_mutex_unlock(&t->mu);
                sleep_ms(2);
                pthread_mutex_lock(&t->mu);
            }
            pthread_mutex_unlock(&t->mu);
            break;
        }
        case MODE_REPLY:
            break;
        }
        reply(m, t);
        actor_done(a, &m->hdr);
        msg_dispose(&m->hdr);
    }
    return 0;
}

static bool t_idle(actor_t *a, void *state)
{
    tactor_t *t = state;
    pthread_mutex_lock(&t->mu);
    bool idle = t->nheld == 0;
    pthread_mutex_unlock(&t->mu);
    return idle;
}

/* ---- fixture ---- */

static void on_finish(void *arg, const char *method, grpc_status_code code, uint64_t duration_ns)
{
    fixture_t *f = arg;
    pthread_mutex_lock(&f->mu);
    if (f->nfinished < MAX_FINISHED) {
        snprintf(f->finished[f->nfinished].method, sizeof(f->finished[0].method), "%s", method);
        f->finished[f->nfinished].code = code;
        f->nfinished++;
    }
    pthread_mutex_unlock(&f->mu);
}

static int setup_mode(void **state, tmode_t mode, bool to_ledger)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    pthread_mutex_init(&f->mu, NULL);
    f->t.mode = mode;
    pthread_mutex_init(&f->t.mu, NULL);
    pthread_cond_init(&f->t.cv, NULL);
    supervisor_config_t scfg = {.backoff_base_ns = 50000000u, .backoff_cap_ns = 1000000000u};
    assert_int_equal(supervisor_create(&f->sup, &scfg), 0);
    actor_spec_t spec = {
        .name = "test-target",
        .mailbox_capacity = 4,
        .batch_max = 1,
        .arg = &f->t,
        .start = t_start,
        .handle = t_handle,
        .idle = t_idle,
    };
    assert_int_equal(supervisor_add(f->sup, &spec, &f->target), 0);
    assert_int_equal(ledger_actor_add(f->sup, NULL, &f->ledger), 0);
    assert_int_equal(supervisor_start(f->sup), 0);
    f->api.target = to_ledger ? f->ledger : f->target;
    rpc_server_config_t cfg = {.host = "127.0.0.1", .port = 0, .cq_threads = 2};
    assert_int_equal(rpc_server_create(&f->srv, &cfg), 0);
    assert_int_equal(payment_api_register(f->srv, &f->api), 0);
    rpc_server_set_finish_hook(f->srv, on_finish, f);
    assert_int_equal(rpc_server_start(f->srv), 0);
    assert_true(rpc_server_port(f->srv) > 0);
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", rpc_server_port(f->srv));
    assert_int_equal(gc_connect(&f->gc, target), 0);
    return 0;
}

static int setup_reply(void **state)
{
    return setup_mode(state, MODE_REPLY, false);
}
static int setup_ledger(void **state)
{
    return setup_mode(state, MODE_REPLY, true);
}
static int setup_die(void **state)
{
    return setup_mode(state, MODE_DIE, false);
}
static int setup_block(void **state)
{
    return setup_mode(state, MODE_BLOCK, false);
}
static int setup_hold(void **state)
{
    return setup_mode(state, MODE_HOLD, false);
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    pthread_mutex_lock(&f->t.mu);
    f->t.release = true;
    pthread_mutex_unlock(&f->t.mu);
    gc_close(f->gc);
    if (f->srv) {
        rpc_server_stop_accepting(f->srv);
        rpc_server_wait_idle(f->srv, now_ns() + 5000000000u);
        supervisor_shutdown(f->sup, now_ns() + 1000000000u);
        rpc_server_destroy(f->srv);
    } else {
        supervisor_shutdown(f->sup, now_ns() + 1000000000u);
    }
    supervisor_destroy(f->sup);
    pthread_cond_destroy(&f->t.cv);
    pthread_mutex_destroy(&f->t.mu);
    pthread_mutex_destroy(&f->mu);
    free(f);
    return 0;
}

/* Waits (bounded) until the finish hook saw n calls. */
static void wait_finished(fixture_t *f, size_t n)
{
    uint64_t until = now_ns() + 10000000000u;
    for (;;) {
        pthread_mutex_lock(&f->mu);
        size_t got = f->nfinished;
        pthread_mutex_unlock(&f->mu);
        if (got >= n)
            break;
        if (now_ns() > until)
            fail_msg("finish hook saw %zu calls, want %zu", got, n);
        sleep_ms(1);
    }
    pthread_mutex_lock(&f->mu);
    assert_int_equal(f->nfinished, n);
    pthread_mutex_unlock(&f->mu);
}

/* Whether the hook recorded a call of method ending with code. */
static size_t finished_count(fixture_t *f, const char *method, grpc_status_code code)
{
    size_t n = 0;
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->nfinished; i++)
        if (strcmp(f->finished[i].method, method) == 0 && f->finished[i].code == code)
            n++;
    pthread_mutex_unlock(&f->mu);
    return n;
}

static size_t pack_balance(uint8_t *buf, const char *account)
{
    Payment__V1__GetAccountBalanceRequest r = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    r.account_id = (char *)account;
    return payment__v1__get_account_balance_request__pack(&r, buf);
}

static bool has_trailer(const gc_result_t *r, const char *kv)
{
    for (size_t i = 0; i < r->ntrailers; i++)
        if (strcmp(r->trailers[i], kv) == 0)
            return true;
    return false;
}

/* ---- tests ---- */

static void test_reply_metadata_peer_deadline(void **state)
{
    fixture_t *f = *state;
    uint8_t buf[128];
    size_t len = pack_balance(buf, "acct_1");
    const gc_md_t md[] = {{"x-client-id", "client-7"}};
    gc_result_t r;
    assert_int_equal(gc_unary(f->gc, GET_BALANCE, buf, len, 5000, md, 1, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_OK);
    Payment__V1__GetAccountBalanceResponse *resp =
        payment__v1__get_account_balance_response__unpack(NULL, r.body_len, r.body);
    assert_non_null(resp);
    assert_string_equal(resp->account_id, "client-7|127.0.0.1|" GET_BALANCE);
    assert_int_equal(resp->available_balance_cents, 4200);
    assert_int_equal(resp->pending_balance_cents, 0);
    assert_string_equal(resp->currency, "EUR");
    payment__v1__get_account_balance_response__free_unpacked(resp, NULL);
    assert_true(has_trailer(&r, "x-ratelimit-limit: 100"));
    assert_true(has_trailer(&r, "x-ratelimit-remaining: 99"));
    gc_result_free(&r);
    /* The actor saw the client's 5 s deadline (grpc-timeout is rounded up on the wire). */
    pthread_mutex_lock(&f->t.mu);
    int64_t left = f->t.deadline_left_ns;
    pthread_mutex_unlock(&f->t.mu);
    assert_true(left > 0);
    assert_true(left <= 6000000000);

    /* Without x-client-id. */
    assert_int_equal(gc_unary(f->gc, GET_BALANCE, buf, len, 5000, NULL, 0, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_OK);
    resp = payment__v1__get_account_balance_response__unpack(NULL, r.body_len, r.body);
    assert_non_null(resp);
    assert_string_equal(resp->account_id, "-|127.0.0.1|" GET_BALANCE);
    payment__v1__get_account_balance_response__free_unpacked(resp, NULL);
    gc_result_free(&r);

    /* Invalid and unknown calls never reach the actor, and the hook sees all of them. */
    len = pack_balance(buf, "bad id");
    assert_int_equal(gc_unary(f->gc, GET_BALANCE, buf, len, 5000, NULL, 0, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_INVALID_ARGUMENT);
    gc_result_free(&r);
    assert_int_equal(
        gc_unary(f->gc, "/payment.v1.PaymentService/Refund", buf, len, 5000, NULL, 0, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_UNIMPLEMENTED);
    gc_result_free(&r);
    wait_finished(f, 4);
    assert_int_equal(finished_count(f, GET_BALANCE, GRPC_STATUS_OK), 2);
    assert_int_equal(finished_count(f, GET_BALANCE, GRPC_STATUS_INVALID_ARGUMENT), 1);
    assert_int_equal(finished_count(f, "unknown", GRPC_STATUS_UNIMPLEMENTED), 1);
    actor_stats_t st;
    actor_stats(f->target, &st);
    assert_int_equal(st.messages, 2);
}

static void test_ledger_counts_messages(void **state)
{
    fixture_t *f = *state;
    uint8_t buf[256];
    gc_result_t r;
    size_t len;
    for (int i = 0; i < 3; i++) {
        len = pack_balance(buf, "acct_1");
        assert_int_equal(gc_unary(f->gc, GET_BALANCE, buf, len, 5000, NULL, 0, &r), 0);
        assert_int_equal(r.status, GRPC_STATUS_UNAVAILABLE);
        assert_string_equal(r.details, "database not ready (schema); retry");
        gc_result_free(&r);
    }
    Payment__V1__GetPaymentRequest gp = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
    gp.payment_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    assert_int_equal(gc_unary_msg(f->gc, GET_PAYMENT, &gp.base, 5000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_UNAVAILABLE);
    assert_string_equal(r.details, "database not ready (schema); retry");
    gc_result_free(&r);
    gp.payment_id = "nope";
    assert_int_equal(gc_unary_msg(f->gc, GET_PAYMENT, &gp.base, 5000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_INVALID_ARGUMENT);
    gc_result_free(&r);
    len = pack_balance(buf, "");
    assert_int_equal(gc_unary(f->gc, GET_BALANCE, buf, len, 5000, NULL, 0, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_INVALID_ARGUMENT);
    gc_result_free(&r);
    wait_finished(f, 6);
    actor_stats_t st;
    actor_stats(f->ledger, &st);
    assert_int_equal(st.messages, 4);
    assert_int_equal(st.failed_back, 0);
    assert_int_equal(st.restarts, 0);
    actor_stats(f->target, &st);
    assert_int_equal(st.messages, 0);
}

static void test_holder_dies(void **state)
{
    fixture_t *f = *state;
    uint8_t buf[128];
    size_t len = pack_balance(buf, "acct_1");
    gc_result_t r;
    assert_int_equal(gc_unary(f->gc, GET_BALANCE, buf, len, 10000, NULL, 0, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_UNAVAILABLE);
    assert_string_equal(r.details, "the server actor handling the request failed; retry");
    gc_result_free(&r);
    wait_finished(f, 1);
    assert_int_equal(finished_count(f, GET_BALANCE, GRPC_STATUS_UNAVAILABLE), 1);
    /* The supervisor brings the actor back. */
    uint64_t until = now_ns() + 10000000000u;
    actor_stats_t st;
    do {
        sleep_ms(5);
        actor_stats(f->target, &st);
    } while (st.restarts < 1 && now_ns() < until);
    assert_int_equal(st.restarts, 1);
    assert_int_equal(st.failed_back, 1);
}

typedef struct one_call {
    gc_t *gc;
    const char *target;
    gc_result_t r;
    int rc;
} one_call_t;

static void *run_one(void *arg)
{
    one_call_t *c = arg;
    uint8_t buf[128];
    size_t len = pack_balance(buf, "acct_first");
    c->rc = gc_unary(c->gc, GET_BALANCE, buf, len, 30000, NULL, 0, &c->r);
    return NULL;
}

typedef struct load_thread {
    gc_t *gc;
    gc_load_t load;
    int rc;
} load_thread_t;

static void *run_load(void *arg)
{
    load_thread_t *l = arg;
    l->rc = gc_unary_load(l->gc, &l->load);
    return NULL;
}

static void test_mailbox_full_sheds_load(void **state)
{
    fixture_t *f = *state;
    size_t cap = mailbox_capacity(actor_mailbox(f->target));
    assert_true(cap >= 4 && cap < 64);
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", rpc_server_port(f->srv));

    /* The first call occupies the actor... */
    one_call_t first = {0};
    assert_int_equal(gc_connect(&first.gc, target), 0);
    pthread_t th1;
    assert_int_equal(pthread_create(&th1, NULL, run_one, &first), 0);
    pthread_mutex_lock(&f->t.mu);
    uint64_t until = now_ns() + 10000000000u;
    while (!f->t.blocked && now_ns() < until) {
        pthread_mutex_unlock(&f->t.mu);
        sleep_ms(1);
        pthread_mutex_lock(&f->t.mu);
    }
    assert_true(f->t.blocked);
    pthread_mutex_unlock(&f->t.mu);

    /* ...cap more fill its mailbox, and 3 beyond are refused at once. */
    uint8_t buf[128];
    load_thread_t lt = {0};
    assert_int_equal(gc_connect(&lt.gc, target), 0);
    lt.load = (gc_load_t){.method = GET_BALANCE,
                          .req = buf,
                          .req_len = pack_balance(buf, "acct_more"),
                          .total = cap + 3,
                          .concurrency = cap + 3,
                          .timeout_ms = 30000};
    pthread_t th2;
    assert_int_equal(pthread_create(&th2, NULL, run_load, &lt), 0);
    until = now_ns() + 10000000000u;
    while (atomic_load(&lt.load.completed) < 3 && now_ns() < until)
        sleep_ms(1);
    assert_int_equal(atomic_load(&lt.load.completed), 3);
    /* The refusals did not wait for the actor. */
    assert_int_equal(mailbox_depth(actor_mailbox(f->target)), cap);

    pthread_mutex_lock(&f->t.mu);
    f->t.release = true;
    pthread_mutex_unlock(&f->t.mu);
    pthread_join(th1, NULL);
    pthread_join(th2, NULL);
    assert_int_equal(first.rc, 0);
    assert_int_equal(first.r.status, GRPC_STATUS_OK);
    gc_result_free(&first.r);
    assert_int_equal(lt.rc, 0);
    assert_int_equal(lt.load.counts[GRPC_STATUS_UNAVAILABLE], 3);
    assert_string_equal(lt.load.last_details[GRPC_STATUS_UNAVAILABLE],
                        "server overloaded: request queue full; retry later");
    assert_int_equal(lt.load.counts[GRPC_STATUS_OK], cap);
    gc_close(first.gc);
    gc_close(lt.gc);
    wait_finished(f, cap + 4);
    assert_int_equal(finished_count(f, GET_BALANCE, GRPC_STATUS_UNAVAILABLE), 3);
    assert_int_equal(finished_count(f, GET_BALANCE, GRPC_STATUS_OK), cap + 1);
}

static void test_shutdown_fails_back_held_calls(void **state)
{
    fixture_t *f = *state;
    uint8_t buf[128];
    load_thread_t lt = {0};
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", rpc_server_port(f->srv));
    assert_int_equal(gc_connect(&lt.gc, target), 0);
    lt.load = (gc_load_t){.method = GET_BALANCE,
                          .req = buf,
                          .req_len = pack_balance(buf, "acct_held"),
                          .total = 3,
                          .concurrency = 3,
                          .timeout_ms = 30000};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, run_load, &lt), 0);
    uint64_t until = now_ns() + 10000000000u;
    pthread_mutex_lock(&f->t.mu);
    while (f->t.nheld < 3 && now_ns() < until) {
        pthread_mutex_unlock(&f->t.mu);
        sleep_ms(1);
        pthread_mutex_lock(&f->t.mu);
    }
    assert_int_equal(f->t.nheld, 3);
    pthread_mutex_unlock(&f->t.mu);

    /* paymentd's order: stop accepting, grace, drain the actors, cancel the rest. */
    rpc_server_stop_accepting(f->srv);
    uint64_t t0 = now_ns();
    assert_int_equal(rpc_server_wait_idle(f->srv, t0 + 200000000u), -ETIMEDOUT);
    assert_true(now_ns() - t0 >= 200000000u);
    assert_int_equal(rpc_server_inflight(f->srv), 3);
    assert_int_equal(supervisor_shutdown(f->sup, now_ns() + 300000000u), -ETIMEDOUT);
    pthread_join(th, NULL);
    assert_int_equal(lt.rc, 0);
    assert_int_equal(lt.load.counts[GRPC_STATUS_UNAVAILABLE], 3);
    assert_string_equal(lt.load.last_details[GRPC_STATUS_UNAVAILABLE],
                        "server shutting down; retry");
    assert_int_equal(rpc_server_wait_idle(f->srv, now_ns() + 5000000000u), 0);
    wait_finished(f, 3);
    assert_int_equal(finished_count(f, GET_BALANCE, GRPC_STATUS_UNAVAILABLE), 3);
    actor_stats_t st;
    actor_stats(f->target, &st);
    assert_int_equal(st.failed_back, 3);
    pthread_mutex_lock(&f->t.mu);
    f->t.nheld = 0; /* the runtime failed them back */
    pthread_mutex_unlock(&f->t.mu);
    gc_close(lt.gc);
    rpc_server_destroy(f->srv);
    f->srv = NULL;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_reply_metadata_peer_deadline, setup_reply, teardown),
        cmocka_unit_test_setup_teardown(test_ledger_counts_messages, setup_ledger, teardown),
        cmocka_unit_test_setup_teardown(test_holder_dies, setup_die, teardown),
        cmocka_unit_test_setup_teardown(test_mailbox_full_sheds_load, setup_block, teardown),
        cmocka_unit_test_setup_teardown(test_shutdown_fails_back_held_calls, setup_hold, teardown),
    };
    return cmocka_run_group_tests_name("e2e_rpc_actors", tests, NULL, NULL);
}
