/*
 * ratelimit: the actor (see ratelimit.h).
 *
 * DESIGN
 * - handle() resolves each message's identity and bucket, and queues one EVALSHA per
 *   message on the Redis client; the client writes them all in one go at the next loop
 *   turn, so a batch costs one round trip. Each check is a check_t from a free list (no
 *   allocation in the steady state) holding the message until its reply.
 * - The script is loaded with SCRIPT LOAD first thing on every new connection; its SHA-1 is
 *   computed locally, so checks need not wait for that reply. A NOSCRIPT error (script
 *   cache flushed) re-sends that check once as EVAL, which also caches the script again.
 * - No answer (timeout: the client drops the connection; connection lost; no connection):
 *   the check fails open or closed at once. The outage flag lives in ratelimit_t so one
 *   outage is logged once even across incarnations.
 * - Counters are relaxed atomics in ratelimit_t: monotonic statistics read by other
 *   threads, nothing is published through them.
 */
#include "actors/ratelimit.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "io/redis.h"
#include "runtime/log.h"

#define MOD "ratelimit"

struct ratelimit {
    ratelimit_config_t cfg;
    char *redis_host, *redis_user, *redis_password;
    ratelimit_net_t trusted[RATELIMIT_MAX_TRUSTED];
    actor_t *actor;
    char sha[41];
    /* Owned by the actor thread (the incarnations, one at a time). */
    bool outage;
    uint64_t outage_failed;
    /* Statistics: written by the actor thread, read anywhere (relaxed, see top). */
    atomic_uint_fast64_t checks, allowed, rejected, rejected_by_type[3], failed_open, failed_closed,
        outages, forward_refused;
    atomic_bool redis_up;
};

typedef struct rl_state rl_state_t;

typedef struct check {
    rl_state_t *st;
    payment_msg_t *m;
    struct check *next_free;
    ratelimit_id_type_t type;
    int64_t limit;
    bool eval_sent; /* NOSCRIPT fallback already used */
    size_t keylen;
    char key[RATELIMIT_KEY_MAX];
    char member[48];
} check_t;

struct rl_state {
    ratelimit_t *rl;
    actor_t *a;
    redis_client_t *redis;
    bool stopping;
    size_t inflight;
    char instance[17]; /* random per incarnation: members are unique across instances */
    uint64_t seq;
    check_t *free_checks;
};

static inline void count(atomic_uint_fast64_t *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* ---- checks ------------------------------------------------------------------------------ */

static check_t *check_new(rl_state_t *st)
{
    check_t *c = st->free_checks;
    if (c) {
        st->free_checks = c->next_free;
    } else if (!(c = malloc(sizeof(*c)))) {
        LOG_ERROR(MOD, "out of memory");
        abort();
    }
    c->st = st;
    c->eval_sent = false;
    st->inflight++;
    return c;
}

static void check_free(check_t *c)
{
    rl_state_t *st = c->st;
    st->inflight--;
    c->m = NULL;
    c->next_free = st->free_checks;
    st->free_checks = c;
}

/* Ends the message's call (the actor is done with it). */
static void finish(rl_state_t *st, payment_msg_t *m, grpc_status_code code, const char *why,
                   const rpc_md_t *md, size_t nmd)
{
    actor_done(st->a, &m->hdr);
    payment_msg_fail(m, code, why, md, nmd);
    msg_dispose(&m->hdr);
}

static void forward(rl_state_t *st, payment_msg_t *m)
{
    actor_done(st->a, &m->hdr);
    int rc = st->rl->cfg.forward(st->rl->cfg.forward_arg, m);
    if (rc < 0) {
        count(&st->rl->forward_refused);
        payment_msg_fail(m, GRPC_STATUS_UNAVAILABLE,
                         rc == -EAGAIN ? "server overloaded: request queue full; retry later"
                                       : "server shutting down; retry",
                         NULL, 0);
        msg_dispose(&m->hdr);
    }
}

/* Redis gave no usable answer for c: fail open or closed. */
static void check_unavailable(check_t *c, const char *why)
{
    rl_state_t *st = c->st;
    ratelimit_t *rl = st->rl;
    payment_msg_t *m = c->m;
    atomic_store_explicit(&rl->redis_up, false, memory_order_relaxed);
    if (!rl->outage) {
        rl->outage = true;
        rl->outage_failed = 0;
        count(&rl->outages);
        LOG_WARNING(MOD, "redis unavailable (%s): failing %s until it answers again", why,
                    rl->cfg.fail_open ? "open (requests pass unlimited)"
                                      : "closed (requests end UNAVAILABLE)");
    }
    rl->outage_failed++;
    m->rl_limit = c->limit;
    if (rl->cfg.fail_open) {
        count(&rl->failed_open);
        m->rl_remaining = c->limit; /* unknown: nothing was counted */
        check_free(c);
        forward(st, m);
    } else {
        count(&rl->failed_closed);
        m->rl_remaining = 0;
        check_free(c);
        finish(st, m, GRPC_STATUS_UNAVAILABLE,
               "rate limiter unavailable (redis not answering); retry later", NULL, 0);
    }
}

static void check_verdict(check_t *c, const ratelimit_verdict_t *v)
{
    rl_state_t *st = c->st;
    ratelimit_t *rl = st->rl;
    payment_msg_t *m = c->m;
    atomic_store_explicit(&rl->redis_up, true, memory_order_relaxed);
    if (rl->outage) {
        rl->outage = false;
        LOG_INFO(MOD, "redis answers again; %" PRIu64 " requests failed %s during the outage",
                 rl->outage_failed, rl->cfg.fail_open ? "open" : "closed");
    }
    m->rl_limit = c->limit;
    m->rl_remaining = v->remaining;
    if (v->allowed) {
        count(&rl->allowed);
        check_free(c);
        forward(st, m);
        return;
    }
    count(&rl->rejected);
    count(&rl->rejected_by_type[c->type]);
    char why[200], retry[24];
    snprintf(why, sizeof(why),
             "rate limit exceeded: %lld requests per %lld s per %s; retry after %lld s",
             (long long)c->limit, (long long)rl->cfg.window_seconds,
             ratelimit_id_type_name(c->type), (long long)v->retry_after_s);
    snprintf(retry, sizeof(retry), "%lld", (long long)v->retry_after_s);
    rpc_md_t md[] = {{"retry-after", retry}};
    check_free(c);
    finish(st, m, GRPC_STATUS_RESOURCE_EXHAUSTED, why, md, 1);
}

static int check_send(check_t *c, bool eval);

static void on_check_reply(redis_client_t *r, redisReply *reply, void *arg)
{
    (void)r;
    check_t *c = arg;
    rl_state_t *st = c->st;
    if (st->stopping) { /* the runtime already failed the messages back */
        check_free(c);
        return;
    }
    if (!reply) {
        check_unavailable(c, "no reply");
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        if (!c->eval_sent && reply->len >= 8 && strncmp(reply->str, "NOSCRIPT", 8) == 0) {
            if (check_send(c, true) == 0)
                return;
            check_unavailable(c, "connection lost");
            return;
        }
        char why[160];
        snprintf(why, sizeof(why), "script error: %.*s", (int)(reply->len > 120 ? 120 : reply->len),
                 reply->str);
        check_unavailable(c, why);
        return;
    }
    ratelimit_verdict_t v;
    if (ratelimit_reply_parse(&v, reply) < 0) {
        check_unavailable(c, "unexpected reply to the script");
        return;
    }
    check_verdict(c, &v);
}

static int check_send(check_t *c, bool eval)
{
    rl_state_t *st = c->st;
    ratelimit_args_t args;
    ratelimit_args_build(&args, eval ? NULL : st->rl->sha, c->key, c->keylen, c->limit,
                         st->rl->cfg.window_seconds, c->member);
    c->eval_sent = eval;
    return redis_client_command(st->redis, on_check_reply, c, args.argc, args.argv, args.argvlen);
}

/* ---- the Redis connection -------------------------------------------------------------- */

static void on_script_loaded(redis_client_t *r, redisReply *reply, void *arg)
{
    (void)r;
    rl_state_t *st = arg;
    if (!reply || st->stopping)
        return;
    if (reply->type != REDIS_REPLY_STRING || strcmp(reply->str, st->rl->sha) != 0)
        LOG_ERROR(MOD, "SCRIPT LOAD answered %s instead of the script's SHA-1 %s",
                  reply->type == REDIS_REPLY_STRING || reply->type == REDIS_REPLY_ERROR
                      ? reply->str
                      : "(not a string)",
                  st->rl->sha);
}

static void on_redis_down(redis_client_t *r, const char *why, void *arg)
{
    (void)r, (void)why;
    rl_state_t *st = arg;
    atomic_store_explicit(&st->rl->redis_up, false, memory_order_relaxed);
}

static void on_redis_open(redis_client_t *r, void *arg)
{
    const char *argv[] = {"SCRIPT", "LOAD", ratelimit_lua};
    redis_client_command(r, on_script_loaded, arg, 3, argv, NULL);
}

/* ---- the actor --------------------------------------------------------------------------- */

static int rl_start(actor_t *a, void *arg, void **state)
{
    ratelimit_t *rl = arg;
    rl_state_t *st = calloc(1, sizeof(*st));
    if (!st)
        return -ENOMEM;
    st->rl = rl;
    st->a = a;
    uint64_t rnd = 0;
    if (getrandom(&rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
        rnd = time_now_ns() ^ ((uint64_t)getpid() << 32);
    snprintf(st->instance, sizeof(st->instance), "%016" PRIx64, rnd);
    redis_config_t rc = {
        .host = rl->redis_host,
        .port = rl->cfg.redis_port,
        .user = rl->redis_user,
        .password = rl->redis_password,
        .db = rl->cfg.redis_db,
        .connect_timeout_ns = (uint64_t)rl->cfg.timeout_ms * 1000000u,
        .command_timeout_ns = (uint64_t)rl->cfg.timeout_ms * 1000000u,
        .backoff_base_ns = 50000000u,
        .backoff_cap_ns = 2000000000u,
        .name = "ratelimit",
        .on_open = on_redis_open,
        .on_down = on_redis_down,
        .arg = st,
    };
    int err = redis_client_create(&st->redis, a, &rc);
    if (err < 0) {
        free(st);
        return err;
    }
    *state = st;
    return 0;
}

static const char *bucket_of(const ratelimit_t *rl, payment_method_t method, int64_t *limit)
{
    if (method >= 1 && method <= 3 && rl->cfg.method_limit[method] > 0) {
        *limit = rl->cfg.method_limit[method];
        switch (method) {
        case PAYMENT_AUTHORIZE:
            return "AuthorizePayment";
        case PAYMENT_GET_PAYMENT:
            return "GetPayment";
        case PAYMENT_GET_BALANCE:
            return "GetAccountBalance";
        }
    }
    *limit = rl->cfg.max_requests;
    return "all";
}

static int rl_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    (void)a;
    rl_state_t *st = state;
    ratelimit_t *rl = st->rl;
    for (size_t i = 0; i < n; i++) {
        payment_msg_t *m = (payment_msg_t *)msgs[i];
        count(&rl->checks);
        if (!m->call) { /* cannot happen: a message always brings its call */
            actor_done(st->a, &m->hdr);
            msg_dispose(&m->hdr);
            continue;
        }
        const char *cid = NULL, *xff = NULL;
        size_t cid_len = 0, xff_len = 0;
        char peer[64];
        if (!rpc_call_metadata(m->call, "x-client-id", &cid, &cid_len))
            cid = NULL;
        if (!rpc_call_metadata(m->call, "x-forwarded-for", &xff, &xff_len))
            xff = NULL;
        bool have_peer = rpc_call_peer_ip(m->call, peer, sizeof(peer)) == 0;
        ratelimit_identity_t id;
        ratelimit_identity_resolve(&id, cid, cid_len, xff, xff_len, have_peer ? peer : NULL,
                                   rl->trusted, rl->cfg.ntrusted);
        check_t *c = check_new(st);
        c->m = m;
        c->type = id.type;
        const char *bucket = bucket_of(rl, (payment_method_t)m->hdr.type, &c->limit);
        c->keylen = ratelimit_key_build(c->key, bucket, &id);
        snprintf(c->member, sizeof(c->member), "%s:%" PRIu64, st->instance, ++st->seq);
        if (!redis_client_usable(st->redis)) {
            check_unavailable(c, "no connection");
            continue;
        }
        if (check_send(c, false) < 0)
            check_unavailable(c, "connection lost");
    }
    return 0;
}

static void rl_stop(actor_t *a, void *state)
{
    (void)a;
    rl_state_t *st = state;
    st->stopping = true;
    redis_client_destroy(st->redis); /* pending checks: callbacks with NULL, freed */
    check_t *c = st->free_checks;
    while (c) {
        check_t *next = c->next_free;
        free(c);
        c = next;
    }
    free(st);
}

static bool rl_idle(actor_t *a, void *state)
{
    (void)a;
    const rl_state_t *st = state;
    return st->inflight == 0;
}

/* ---- public ------------------------------------------------------------------------------ */

int ratelimit_actor_add(ratelimit_t **out, supervisor_t *s, const ratelimit_config_t *cfg)
{
    if (cfg->max_requests <= 0 || cfg->window_seconds <= 0 || cfg->timeout_ms <= 0 ||
        cfg->ntrusted > RATELIMIT_MAX_TRUSTED || !cfg->forward)
        return -EINVAL;
    for (int i = 1; i <= 3; i++)
        if (cfg->method_limit[i] < 0)
            return -EINVAL;
    ratelimit_t *rl = calloc(1, sizeof(*rl));
    if (!rl)
        return -ENOMEM;
    rl->cfg = *cfg;
    rl->redis_host = strdup(cfg->redis_host ? cfg->redis_host : "localhost");
    rl->redis_user = strdup(cfg->redis_user ? cfg->redis_user : "");
    rl->redis_password = strdup(cfg->redis_password ? cfg->redis_password : "");
    int rc = -ENOMEM;
    if (!rl->redis_host || !rl->redis_user || !rl->redis_password)
        goto fail;
    if (cfg->ntrusted)
        memcpy(rl->trusted, cfg->trusted, cfg->ntrusted * sizeof(*cfg->trusted));
    rl->cfg.trusted = rl->trusted;
    rl->cfg.redis_host = rl->redis_host;
    rl->cfg.redis_user = rl->redis_user;
    rl->cfg.redis_password = rl->redis_password;
    ratelimit_lua_sha(rl->sha);
    actor_spec_t spec = {
        .name = "ratelimit",
        .mailbox_capacity = cfg->mailbox_capacity ? cfg->mailbox_capacity : 4096,
        .batch_max = cfg->batch_max ? cfg->batch_max : 256,
        .critical = false, /* it degrades (fails open/closed) rather than going down */
        .arg = rl,
        .start = rl_start,
        .handle = rl_handle,
        .stop = rl_stop,
        .idle = rl_idle,
    };
    if ((rc = supervisor_add(s, &spec, &rl->actor)) < 0)
        goto fail;
    LOG_INFO(MOD,
             "%lld requests per %lld s per identity, fail %s, timeout %lld ms, %zu trusted "
             "proxies, script sha1 %s",
             (long long)cfg->max_requests, (long long)cfg->window_seconds,
             cfg->fail_open ? "open" : "closed", (long long)cfg->timeout_ms, cfg->ntrusted,
             rl->sha);
    *out = rl;
    return 0;
fail:
    free(rl->redis_host);
    free(rl->redis_user);
    free(rl->redis_password);
    free(rl);
    return rc;
}

actor_t *ratelimit_actor(const ratelimit_t *rl)
{
    return rl->actor;
}

void ratelimit_stats(const ratelimit_t *rl, ratelimit_stats_t *out)
{
#define LD(f) atomic_load_explicit(&rl->f, memory_order_relaxed)
    *out = (ratelimit_stats_t){
        .checks = LD(checks),
        .allowed = LD(allowed),
        .rejected = LD(rejected),
        .rejected_by_type = {LD(rejected_by_type[0]), LD(rejected_by_type[1]),
                             LD(rejected_by_type[2])},
        .failed_open = LD(failed_open),
        .failed_closed = LD(failed_closed),
        .outages = LD(outages),
        .forward_refused = LD(forward_refused),
        .redis_up = LD(redis_up),
    };
#undef LD
}

void ratelimit_destroy(ratelimit_t *rl)
{
    if (!rl)
        return;
    free(rl->redis_host);
    free(rl->redis_user);
    free(rl->redis_password);
    free(rl);
}
