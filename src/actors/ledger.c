/*
 * ledger: see ledger.h and db/migrations/002_ledger_authorize.sql.
 *
 * DESIGN
 * Each actor keeps the messages it took in a local FIFO and runs one statement at a time
 * on its connection; results come back through pgconn's callbacks on the same thread.
 * Ending a message is always: end the call, actor_done, dispose — with no failure point
 * in between, so a failing incarnation can never answer a call twice. Messages still in
 * the FIFO when an incarnation fails are on its taken-work list and the runtime fails them
 * (UNAVAILABLE). When the connection goes down every queued message ends UNAVAILABLE at
 * once, and so does every new one until it is back: callers never wait for a database that
 * is not there.
 * Batches (writers): pump takes the AuthorizePayment messages at the FIFO head into
 * s->inflight (a read stops the batch, so the FIFO order is kept) and sends one
 * ledger_authorize_batch statement; its rows answer the calls in order. An SQL error put
 * the whole batch back at the FIFO head (nothing was applied), to be retried in halves
 * (split_pending/split_size) down to single ledger_authorize statements; errors that may
 * come after COMMIT end every call UNAVAILABLE instead. The FIFO has batch_max spare slots
 * so a failed batch always fits back; admission counts queued plus in-flight messages.
 */
#include "actors/ledger.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "io/pgconn.h"
#include "runtime/log.h"
#include "runtime/msg.h"
#include "runtime/ulid.h"

#define MOD "ledger"

#define PURGE_BATCH 10000

static const char SQL_AUTHORIZE[] =
    "SELECT outcome, payment_id, status, error_code, error_message, processed_at"
    " FROM ledger_authorize($1, $2, $3::bytea, $4, $5, $6, $7, $8::bigint, $9, $10,"
    " $11::timestamptz, $12::interval, $13::bigint)";
static const char SQL_AUTHORIZE_BATCH[] =
    "SELECT ord, outcome, payment_id, status, error_code, error_message, processed_at"
    " FROM ledger_authorize_batch($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::text[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::timestamptz[],"
    " $12::interval, $13::bigint)";
static const char SQL_GET_PAYMENT[] =
    "SELECT id, payer_account_id, payee_account_id, amount_cents, currency, status,"
    " description, pay_format_ts(created_at), pay_format_ts(updated_at)"
    " FROM payments WHERE id = $1";
static const char SQL_GET_BALANCE[] =
    "SELECT id, balance_cents, currency FROM accounts WHERE id = $1";
static const char SQL_PURGE[] = "SELECT ledger_purge_idempotency($1::integer)";

/* One actor of the pool: what the pool knows of it (shared, read by any thread). */
typedef struct ledger_slot {
    ledger_pool_t *pool;
    unsigned index;
    bool writes, reads, maintenance;
    char name[32];
    actor_t *actor;
    atomic_bool up; /* connected; relaxed: a health hint, nothing is published through it */
} ledger_slot_t;

struct ledger_pool {
    ledger_config_t cfg;
    char *conninfo;
    unsigned nwriters, nreaders, nslots;
    ledger_slot_t *slots; /* writers first, then readers */
    /* Batch-size histogram (bucket b counts batches of 2^b .. 2^(b+1)-1 payments) and the
     * largest batch. Relaxed: statistics, nothing is published through them. */
    atomic_uint_fast64_t batch_hist[LEDGER_BATCH_BUCKETS];
    atomic_uint_fast64_t batch_max_seen;
    atomic_bool schema_ready;        /* release/acquire: set after the migrations committed */
    struct ledger_pool *next_legacy; /* ledger_actor_add's pools, freed at exit */
    bool legacy;                     /* one of those: freed at exit, logs nothing */
};

/* An actor incarnation's state (its thread only). */
typedef struct lstate {
    ledger_slot_t *slot;
    ledger_pool_t *pool;
    actor_t *a;
    pgconn_t *pg;
    payment_msg_t **fifo; /* room for mailbox_capacity + batch_max: a failed batch goes back */
    size_t cap, head, len;
    payment_msg_t **inflight; /* the statement in flight: one message, or a batch */
    size_t ninflight;
    bool batch_inflight;  /* ledger_authorize_batch (else one message's statement) */
    size_t split_pending; /* messages at the FIFO head retried after a failed batch */
    size_t split_size;    /* ... taken at most this many per batch */
    bool purge_inflight, purge_due;
    actor_timer_t *purge_timer;
} lstate_t;

/* ---- helpers ---------------------------------------------------------------------------- */

static uint32_t hash_str(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; s && *s; s++) {
        h ^= (uint8_t)*s;
        h *= 16777619u;
    }
    return h;
}

void ledger_fingerprint(uint8_t out[32], const char *payer, const char *payee, int64_t amount_cents,
                        const char *currency)
{
    char amount[24];
    snprintf(amount, sizeof amount, "%" PRId64, amount_cents);
    const char *parts[4] = {payer, payee, amount, currency};
    /* Length-prefixed, so ("ab","c") and ("a","bc") differ; ~200 bytes: one buffer. */
    uint8_t buf[4 * 4 + 4 * 64 + 64];
    size_t at = 0;
    for (int i = 0; i < 4; i++) {
        size_t n = strlen(parts[i]);
        if (n > 64)
            n = 64; /* validated ids are <= 64, currencies 3, amounts <= 20 */
        buf[at++] = (uint8_t)(n >> 24);
        buf[at++] = (uint8_t)(n >> 16);
        buf[at++] = (uint8_t)(n >> 8);
        buf[at++] = (uint8_t)n;
        memcpy(buf + at, parts[i], n);
        at += n;
    }
    unsigned int len = 32;
    if (!EVP_Digest(buf, at, out, &len, EVP_sha256(), NULL))
        abort(); /* libcrypto cannot fail to hash memory: loud, as an allocation failure */
}

static void hex(char *out, const uint8_t *b, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

/* The idempotency scope of a request: "global", or per client identity: x-client-id
 * ("client:ID", hashed when long or not printable ASCII), else the peer's address. */
static void idempotency_scope(char *out, size_t outlen, bool per_client, payment_msg_t *m)
{
    if (!per_client) {
        snprintf(out, outlen, "global");
        return;
    }
    const char *v;
    size_t n;
    if (m->call && rpc_call_metadata(m->call, "x-client-id", &v, &n) && n > 0) {
        bool printable = n <= 200;
        for (size_t i = 0; printable && i < n; i++)
            printable = v[i] >= 0x20 && v[i] <= 0x7e;
        if (printable) {
            snprintf(out, outlen, "client:%.*s", (int)n, v);
        } else {
            uint8_t d[32];
            char h[65];
            unsigned int dl = 32;
            if (!EVP_Digest(v, n, d, &dl, EVP_sha256(), NULL))
                abort();
            hex(h, d, 32);
            snprintf(out, outlen, "client-sha256:%s", h);
        }
        return;
    }
    char ip[64];
    if (m->call && rpc_call_peer_ip(m->call, ip, sizeof ip) == 0)
        snprintf(out, outlen, "ip:%s", ip);
    else
        snprintf(out, outlen, "ip:unknown");
}

static Payment__V1__PaymentStatus status_of(const char *s)
{
    if (strcmp(s, "AUTHORIZED") == 0)
        return PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_AUTHORIZED;
    if (strcmp(s, "DECLINED") == 0)
        return PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DECLINED;
    return PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_UNSPECIFIED;
}

static Payment__V1__PaymentErrorCode error_code_of(const char *s)
{
    static const struct {
        const char *name;
        Payment__V1__PaymentErrorCode code;
    } codes[] = {
        {"INSUFFICIENT_FUNDS",
         PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_INSUFFICIENT_FUNDS},
        {"ACCOUNT_NOT_FOUND",
         PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_ACCOUNT_NOT_FOUND},
        {"INVALID_AMOUNT", PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_INVALID_AMOUNT},
        {"SAME_ACCOUNT", PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_SAME_ACCOUNT},
        {"CURRENCY_MISMATCH",
         PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_CURRENCY_MISMATCH},
    };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (strcmp(s, codes[i].name) == 0)
            return codes[i].code;
    return PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_UNSPECIFIED;
}

/* ---- ending messages -------------------------------------------------------------------- */

static void end_reply(lstate_t *s, payment_msg_t *m, const ProtobufCMessage *resp)
{
    payment_msg_reply(m, resp, NULL, 0);
    actor_done(s->a, &m->hdr);
    msg_dispose(&m->hdr);
}

static void end_fail(lstate_t *s, payment_msg_t *m, grpc_status_code code, const char *text)
{
    payment_msg_fail(m, code, text, NULL, 0);
    actor_done(s->a, &m->hdr);
    msg_dispose(&m->hdr);
}

static void fail_queued(lstate_t *s, const char *text)
{
    while (s->len > 0) {
        payment_msg_t *m = s->fifo[s->head];
        s->head = (s->head + 1) % s->cap;
        s->len--;
        end_fail(s, m, GRPC_STATUS_UNAVAILABLE, text);
    }
    s->split_pending = 0;
}

/* ---- statements ------------------------------------------------------------------------- */

static int start_authorize(lstate_t *s, payment_msg_t *m)
{
    const Payment__V1__AuthorizePaymentRequest *r = m->req.authorize;
    const ledger_config_t *cfg = &s->pool->cfg;
    char scope[300], fphex[2 + 64 + 1], pid[ULID_SIZE], eid[ULID_SIZE], now_s[ULID_TIME_SIZE];
    char amount[24], ttl[32], max[24];
    uint8_t fp[32];
    int64_t now_us;

    idempotency_scope(scope, sizeof scope, cfg->idempotency_per_client, m);
    ledger_fingerprint(fp, r->payer_account_id, r->payee_account_id, r->amount_cents, r->currency);
    fphex[0] = '\\';
    fphex[1] = 'x';
    hex(fphex + 2, fp, 32);
    ulid_new_at(pid, &now_us);
    ulid_new(eid);
    ulid_format_time(now_s, now_us);
    snprintf(amount, sizeof amount, "%" PRId64, r->amount_cents);
    snprintf(ttl, sizeof ttl, "%" PRId64 " hours", cfg->idempotency_ttl_hours);
    snprintf(max, sizeof max, "%" PRId64, cfg->max_amount_cents);
    const char *params[13] = {scope,
                              r->idempotency_key,
                              fphex,
                              pid,
                              eid,
                              r->payer_account_id,
                              r->payee_account_id,
                              amount,
                              r->currency,
                              r->description ? r->description : "",
                              now_s,
                              ttl,
                              max};
    return pgconn_query(s->pg, SQL_AUTHORIZE, 13, params, cfg->statement_timeout_ns);
}

static int start_message(lstate_t *s, payment_msg_t *m)
{
    const char *p[1];
    switch ((payment_method_t)m->hdr.type) {
    case PAYMENT_AUTHORIZE:
        return start_authorize(s, m);
    case PAYMENT_GET_PAYMENT:
        p[0] = m->req.get_payment->payment_id;
        return pgconn_query(s->pg, SQL_GET_PAYMENT, 1, p, s->pool->cfg.statement_timeout_ns);
    case PAYMENT_GET_BALANCE:
        p[0] = m->req.get_balance->account_id;
        return pgconn_query(s->pg, SQL_GET_BALANCE, 1, p, s->pool->cfg.statement_timeout_ns);
    }
    return -EINVAL;
}

/* ---- batches ---------------------------------------------------------------------------- */

/* A growing string (a PostgreSQL array literal); allocation failure is fatal. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf_t;

static void sbuf_put(sbuf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            abort();
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

/* Appends s as one quoted element of an array literal ("{"...","..."}"): inside quotes
 * only '"' and '\\' need a backslash, so any text (commas, braces, spaces) survives. */
static void sbuf_elem(sbuf_t *b, const char *s)
{
    sbuf_put(b, b->len == 0 ? "{\"" : ",\"", 2);
    for (const char *q = s; *q; q++) {
        if (*q == '"' || *q == '\\')
            sbuf_put(b, "\\", 1);
        sbuf_put(b, q, 1);
    }
    sbuf_put(b, "\"", 1);
}

static void record_batch(ledger_pool_t *p, size_t n)
{
    unsigned b = 0;
    while (b + 1 < LEDGER_BATCH_BUCKETS && (n >> (b + 1)) != 0)
        b++;
    atomic_fetch_add_explicit(&p->batch_hist[b], 1, memory_order_relaxed);
    uint_fast64_t seen = atomic_load_explicit(&p->batch_max_seen, memory_order_relaxed);
    while (seen < n &&
           !atomic_compare_exchange_weak_explicit(&p->batch_max_seen, &seen, n,
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

/* One statement for the n (>= 2) AuthorizePayment messages of s->inflight. */
static int start_batch(lstate_t *s)
{
    enum { SCOPE, KEY, FP, PID, EID, PAYER, PAYEE, AMOUNT, CURRENCY, DESCR, NOW, NARRAYS };
    const ledger_config_t *cfg = &s->pool->cfg;
    sbuf_t arr[NARRAYS] = {{0}};
    for (size_t i = 0; i < s->ninflight; i++) {
        payment_msg_t *m = s->inflight[i];
        const Payment__V1__AuthorizePaymentRequest *r = m->req.authorize;
        char scope[300], fphex[65], pid[ULID_SIZE], eid[ULID_SIZE], now_s[ULID_TIME_SIZE];
        char amount[24];
        uint8_t fp[32];
        int64_t now_us;
        idempotency_scope(scope, sizeof scope, cfg->idempotency_per_client, m);
        ledger_fingerprint(fp, r->payer_account_id, r->payee_account_id, r->amount_cents,
                           r->currency);
        hex(fphex, fp, 32);
        ulid_new_at(pid, &now_us);
        ulid_new(eid);
        ulid_format_time(now_s, now_us);
        snprintf(amount, sizeof amount, "%" PRId64, r->amount_cents);
        sbuf_elem(&arr[SCOPE], scope);
        sbuf_elem(&arr[KEY], r->idempotency_key);
        sbuf_elem(&arr[FP], fphex);
        sbuf_elem(&arr[PID], pid);
        sbuf_elem(&arr[EID], eid);
        sbuf_elem(&arr[PAYER], r->payer_account_id);
        sbuf_elem(&arr[PAYEE], r->payee_account_id);
        sbuf_elem(&arr[AMOUNT], amount);
        sbuf_elem(&arr[CURRENCY], r->currency);
        sbuf_elem(&arr[DESCR], r->description ? r->description : "");
        sbuf_elem(&arr[NOW], now_s);
    }
    char ttl[32], max[24];
    snprintf(ttl, sizeof ttl, "%" PRId64 " hours", cfg->idempotency_ttl_hours);
    snprintf(max, sizeof max, "%" PRId64, cfg->max_amount_cents);
    const char *params[13];
    for (int i = 0; i < NARRAYS; i++) {
        sbuf_put(&arr[i], "}", 1);
        params[i] = arr[i].p;
    }
    params[11] = ttl;
    params[12] = max;
    int rc = pgconn_query(s->pg, SQL_AUTHORIZE_BATCH, 13, params, cfg->statement_timeout_ns);
    for (int i = 0; i < NARRAYS; i++)
        free(arr[i].p);
    return rc;
}

static payment_msg_t *fifo_pop(lstate_t *s)
{
    payment_msg_t *m = s->fifo[s->head];
    s->head = (s->head + 1) % s->cap;
    s->len--;
    if (s->split_pending > 0)
        s->split_pending--;
    return m;
}

static bool expired(lstate_t *s, payment_msg_t *m)
{
    if (m->hdr.deadline_ns && time_now_ns() >= m->hdr.deadline_ns) {
        actor_done(s->a, &m->hdr);
        msg_fail(&m->hdr, -ETIMEDOUT);
        return true;
    }
    return false;
}

/* Starts the next statement when the connection is idle: a due purge first, else the
 * oldest queued message (expired ones end DEADLINE_EXCEEDED without touching the DB).
 * AuthorizePayment messages queued together go as one batch of whatever is queued now
 * (up to batch_max; fewer while retrying a failed batch split): a lone request never
 * waits for company. */
static void pump(lstate_t *s)
{
    while (s->pg && pgconn_idle(s->pg) && s->ninflight == 0 && !s->purge_inflight) {
        if (s->purge_due && atomic_load_explicit(&s->pool->schema_ready, memory_order_acquire)) {
            char lim[16];
            snprintf(lim, sizeof lim, "%d", PURGE_BATCH);
            const char *p[1] = {lim};
            s->purge_due = false;
            if (pgconn_query(s->pg, SQL_PURGE, 1, p, s->pool->cfg.statement_timeout_ns) == 0)
                s->purge_inflight = true;
            continue;
        }
        if (s->len == 0)
            return;
        size_t limit = s->pool->cfg.batch_max;
        if (s->split_pending > 0 && s->split_size < limit)
            limit = s->split_size;
        payment_msg_t *m = fifo_pop(s);
        if (expired(s, m))
            continue;
        s->inflight[0] = m;
        s->ninflight = 1;
        while (m->hdr.type == PAYMENT_AUTHORIZE && s->ninflight < limit && s->len > 0 &&
               s->fifo[s->head]->hdr.type == PAYMENT_AUTHORIZE) {
            payment_msg_t *next = fifo_pop(s);
            if (!expired(s, next))
                s->inflight[s->ninflight++] = next;
        }
        s->batch_inflight = s->ninflight > 1;
        int rc = s->batch_inflight ? start_batch(s) : start_message(s, m);
        if (rc < 0) {
            /* Nothing reached the database: safe to say so. */
            size_t n = s->ninflight;
            s->ninflight = 0;
            for (size_t i = 0; i < n; i++)
                end_fail(s, s->inflight[i], GRPC_STATUS_UNAVAILABLE, "database unavailable; retry");
            continue;
        }
        if (m->hdr.type == PAYMENT_AUTHORIZE)
            record_batch(s->pool, s->ninflight);
    }
}

/* Row `row` of r, whose columns from c0 are ledger_authorize()'s. */
static void answer_authorize_row(lstate_t *s, payment_msg_t *m, PGresult *r, int row, int c0)
{
    const char *outcome = PQgetvalue(r, row, c0);
    if (strcmp(outcome, "CONFLICT") == 0) {
        end_fail(s, m, GRPC_STATUS_ALREADY_EXISTS,
                 "idempotency_key: already used for a different request (payer, payee, "
                 "amount_cents or currency differ)");
        return;
    }
    Payment__V1__AuthorizePaymentResponse resp = PAYMENT__V1__AUTHORIZE_PAYMENT_RESPONSE__INIT;
    Payment__V1__PaymentError perr = PAYMENT__V1__PAYMENT_ERROR__INIT;
    resp.payment_id = PQgetvalue(r, row, c0 + 1);
    resp.status = strcmp(outcome, "DUPLICATE") == 0
                      ? PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DUPLICATE
                      : status_of(PQgetvalue(r, row, c0 + 2));
    if (!PQgetisnull(r, row, c0 + 3)) {
        perr.code = error_code_of(PQgetvalue(r, row, c0 + 3));
        perr.message = PQgetvalue(r, row, c0 + 4);
        resp.error = &perr;
    }
    resp.processed_at = PQgetvalue(r, row, c0 + 5);
    end_reply(s, m, &resp.base);
}

static void answer_authorize(lstate_t *s, payment_msg_t *m, PGresult *r)
{
    if (PQntuples(r) != 1 || PQnfields(r) != 6) {
        LOG_ERROR(MOD, "%s: ledger_authorize returned %d rows of %d columns", s->slot->name,
                  PQntuples(r), PQnfields(r));
        end_fail(s, m, GRPC_STATUS_INTERNAL, "server error: unexpected database answer");
        return;
    }
    answer_authorize_row(s, m, r, 0, 0);
}

/* The batch's rows come in input order (ord 1..n). */
static void answer_batch(lstate_t *s, payment_msg_t **ms, size_t n, PGresult *r)
{
    bool shape = PQntuples(r) == (int)n && PQnfields(r) == 7;
    for (size_t i = 0; shape && i < n; i++)
        shape = strtol(PQgetvalue(r, (int)i, 0), NULL, 10) == (long)i + 1;
    if (!shape) {
        /* Committed, but the answer cannot be matched to the calls: never guess. */
        LOG_ERROR(MOD, "%s: ledger_authorize_batch returned %d rows of %d columns for %zu",
                  s->slot->name, PQntuples(r), PQnfields(r), n);
        for (size_t i = 0; i < n; i++)
            end_fail(s, ms[i], GRPC_STATUS_INTERNAL, "server error: unexpected database answer");
        return;
    }
    for (size_t i = 0; i < n; i++)
        answer_authorize_row(s, ms[i], r, (int)i, 1);
}

/* A batch failed with an SQL error, so nothing of it was applied: put its messages back
 * at the FIFO head, in order, to be retried in halves (down to one payment, which takes
 * the single-payment path), so one bad payment never fails its neighbours. */
static void requeue_split(lstate_t *s, payment_msg_t **ms, size_t n, const char *why)
{
    LOG_WARNING(MOD, "%s: a batch of %zu payments failed (%s); retrying it split", s->slot->name, n,
                why);
    for (size_t i = n; i-- > 0;) {
        s->head = (s->head + s->cap - 1) % s->cap;
        s->fifo[s->head] = ms[i];
        s->len++;
    }
    s->split_pending += n;
    s->split_size = n / 2 ? n / 2 : 1;
}

static void answer_get_payment(lstate_t *s, payment_msg_t *m, PGresult *r)
{
    if (PQntuples(r) != 1) {
        char text[96];
        snprintf(text, sizeof text, "payment %s not found", m->req.get_payment->payment_id);
        end_fail(s, m, GRPC_STATUS_NOT_FOUND, text);
        return;
    }
    Payment__V1__Payment p = PAYMENT__V1__PAYMENT__INIT;
    p.payment_id = PQgetvalue(r, 0, 0);
    p.payer_account_id = PQgetvalue(r, 0, 1);
    p.payee_account_id = PQgetvalue(r, 0, 2);
    p.amount_cents = strtoll(PQgetvalue(r, 0, 3), NULL, 10);
    p.currency = PQgetvalue(r, 0, 4);
    p.status = status_of(PQgetvalue(r, 0, 5));
    p.description = PQgetvalue(r, 0, 6);
    p.created_at = PQgetvalue(r, 0, 7);
    p.updated_at = PQgetvalue(r, 0, 8);
    Payment__V1__GetPaymentResponse resp = PAYMENT__V1__GET_PAYMENT_RESPONSE__INIT;
    resp.payment = &p;
    end_reply(s, m, &resp.base);
}

static void answer_get_balance(lstate_t *s, payment_msg_t *m, PGresult *r)
{
    if (PQntuples(r) != 1) {
        char text[128];
        snprintf(text, sizeof text, "account %s not found", m->req.get_balance->account_id);
        end_fail(s, m, GRPC_STATUS_NOT_FOUND, text);
        return;
    }
    Payment__V1__GetAccountBalanceResponse resp = PAYMENT__V1__GET_ACCOUNT_BALANCE_RESPONSE__INIT;
    resp.account_id = PQgetvalue(r, 0, 0);
    resp.available_balance_cents = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    resp.pending_balance_cents = 0;
    resp.currency = PQgetvalue(r, 0, 2);
    end_reply(s, m, &resp.base);
}

/* SQLSTATE classes that mean "try again": transaction rollback (serialization, deadlock),
 * insufficient resources, operator intervention (shutdown), connection exceptions. */
static bool transient(const char *sqlstate)
{
    return strncmp(sqlstate, "40", 2) == 0 || strncmp(sqlstate, "53", 2) == 0 ||
           strncmp(sqlstate, "57", 2) == 0 || strncmp(sqlstate, "08", 2) == 0;
}

/* An error that may have come after COMMIT (the server going away: connection exception,
 * admin/crash shutdown, or no SQLSTATE at all): the batch's outcome is unknown, so its
 * calls end UNAVAILABLE rather than being re-run (a re-run would answer DUPLICATE). Any
 * other error aborted the statement's transaction: nothing of the batch was applied. */
static bool outcome_unknown(const char *sqlstate)
{
    return sqlstate[0] == '\0' || strncmp(sqlstate, "08", 2) == 0 ||
           strncmp(sqlstate, "57P", 3) == 0;
}

static void on_result(pgconn_t *c, void *arg, PGresult *res, int err, const char *sqlstate,
                      const char *why)
{
    (void)c;
    lstate_t *s = arg;
    if (s->purge_inflight) {
        s->purge_inflight = false;
        if (err == 0) {
            long long n = PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : 0;
            if (n > 0)
                LOG_INFO(MOD, "purged %lld expired idempotency keys", n);
            s->purge_due = n >= PURGE_BATCH;
        } else {
            LOG_WARNING(MOD, "purging expired idempotency keys failed: %s", why);
        }
        if (res)
            PQclear(res);
        pump(s);
        return;
    }
    size_t n = s->ninflight;
    s->ninflight = 0;
    if (n == 0) {
        if (res)
            PQclear(res);
        return;
    }
    payment_msg_t *m = s->inflight[0];
    if (s->batch_inflight) {
        s->batch_inflight = false;
        if (err == 0) {
            answer_batch(s, s->inflight, n, res);
            PQclear(res);
        } else if (err == -EIO && !outcome_unknown(sqlstate)) {
            requeue_split(s, s->inflight, n, why);
        } else {
            for (size_t i = 0; i < n; i++)
                end_fail(s, s->inflight[i], GRPC_STATUS_UNAVAILABLE,
                         "database connection lost before the payment's outcome was known; "
                         "retry with the same idempotency_key");
        }
        pump(s);
        return;
    }
    if (err == 0) {
        switch ((payment_method_t)m->hdr.type) {
        case PAYMENT_AUTHORIZE:
            answer_authorize(s, m, res);
            break;
        case PAYMENT_GET_PAYMENT:
            answer_get_payment(s, m, res);
            break;
        case PAYMENT_GET_BALANCE:
            answer_get_balance(s, m, res);
            break;
        }
        PQclear(res);
    } else if (err == -EIO) {
        char text[200];
        if (transient(sqlstate)) {
            snprintf(text, sizeof text, "database temporarily unavailable (SQLSTATE %s); retry",
                     sqlstate);
            LOG_WARNING(MOD, "%s: %s: %s", s->slot->name,
                        payment_method_path((payment_method_t)m->hdr.type), why);
            end_fail(s, m, GRPC_STATUS_UNAVAILABLE, text);
        } else {
            LOG_ERROR(MOD, "%s: %s: %s", s->slot->name,
                      payment_method_path((payment_method_t)m->hdr.type), why);
            end_fail(s, m, GRPC_STATUS_INTERNAL, "server error: the database refused the request");
        }
    } else if (m->hdr.type == PAYMENT_AUTHORIZE) {
        end_fail(s, m, GRPC_STATUS_UNAVAILABLE,
                 "database connection lost before the payment's outcome was known; retry with "
                 "the same idempotency_key");
    } else {
        end_fail(s, m, GRPC_STATUS_UNAVAILABLE, "database connection lost; retry");
    }
    pump(s);
}

static void on_up(pgconn_t *c, void *arg)
{
    (void)c;
    lstate_t *s = arg;
    atomic_store_explicit(&s->slot->up, true, memory_order_relaxed);
    if (s->slot->maintenance) /* purge at once after (re)connecting, then periodically */
        actor_timer_arm(s->purge_timer, 1, 0);
    pump(s);
}

static void on_down(pgconn_t *c, void *arg, const char *why)
{
    (void)c;
    lstate_t *s = arg;
    atomic_store_explicit(&s->slot->up, false, memory_order_relaxed);
    s->purge_inflight = false;
    char text[400];
    snprintf(text, sizeof text, "database unavailable: %s; retry", why);
    fail_queued(s, text);
}

static int on_purge_timer(actor_t *a, void *state, actor_timer_t *t, void *arg)
{
    (void)a;
    (void)t;
    (void)arg;
    lstate_t *s = state;
    if (!atomic_load_explicit(&s->pool->schema_ready, memory_order_acquire)) {
        /* Connected before the main thread finished migrating: look again soon. */
        actor_timer_arm(s->purge_timer, 200000000ull, 0);
        return 0;
    }
    s->purge_due = true;
    actor_timer_arm(s->purge_timer, s->pool->cfg.purge_interval_ns, 0);
    pump(s);
    return 0;
}

/* ---- the actor -------------------------------------------------------------------------- */

static void ledger_stop(actor_t *a, void *state);

static int ledger_start(actor_t *a, void *arg, void **state)
{
    ledger_slot_t *slot = arg;
    ledger_pool_t *pool = slot->pool;
    lstate_t *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->slot = slot;
    s->pool = pool;
    s->a = a;
    s->cap = pool->cfg.mailbox_capacity + pool->cfg.batch_max;
    s->fifo = calloc(s->cap, sizeof(*s->fifo));
    s->inflight = calloc(pool->cfg.batch_max, sizeof(*s->inflight));
    int rc = -ENOMEM;
    if (!s->fifo || !s->inflight)
        goto fail;
    if (slot->maintenance) {
        if ((rc = actor_timer_new(&s->purge_timer, a, on_purge_timer, NULL)) < 0)
            goto fail;
        actor_timer_arm(s->purge_timer, pool->cfg.purge_interval_ns, 0);
    }
    pgconn_config_t pc = {
        .conninfo = pool->conninfo,
        .application_name = "paymentd-ledger",
        .backoff_base_ns = pool->cfg.backoff_base_ns,
        .backoff_cap_ns = pool->cfg.backoff_cap_ns,
    };
    pgconn_callbacks_t cb = {.on_up = on_up, .on_down = on_down, .on_result = on_result};
    if (pool->conninfo[0] == '\0') {
        /* No database configured (ledger_actor_add without one): every call ends
         * UNAVAILABLE; never fall back to libpq's defaults (a system PostgreSQL). */
        *state = s;
        return 0;
    }
    if ((rc = pgconn_create(&s->pg, a, &pc, &cb, s)) < 0)
        goto fail;
    *state = s;
    return 0;
fail:
    *state = NULL;
    ledger_stop(a, s);
    return rc;
}

static void ledger_stop(actor_t *a, void *state)
{
    (void)a;
    lstate_t *s = state;
    if (!s)
        return;
    atomic_store_explicit(&s->slot->up, false, memory_order_relaxed);
    pgconn_destroy(s->pg);
    if (s->purge_timer)
        actor_timer_free(s->purge_timer);
    /* Queued messages are still on the taken-work list: the runtime fails them. */
    free(s->fifo);
    free(s->inflight);
    free(s);
}

static bool ledger_idle(actor_t *a, void *state)
{
    (void)a;
    lstate_t *s = state;
    return !s || (s->len == 0 && s->ninflight == 0);
}

static int ledger_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    lstate_t *s = state;
    bool ready = atomic_load_explicit(&s->pool->schema_ready, memory_order_acquire);
    for (size_t i = 0; i < n; i++) {
        msg_t *hdr = msgs[i];
        if (hdr->type != PAYMENT_AUTHORIZE && hdr->type != PAYMENT_GET_PAYMENT &&
            hdr->type != PAYMENT_GET_BALANCE) {
            LOG_ERROR(MOD, "unexpected message type %u", (unsigned)hdr->type);
            actor_done(a, hdr);
            msg_fail(hdr, -EINVAL);
            continue;
        }
        payment_msg_t *m = (payment_msg_t *)hdr;
        if (!ready)
            end_fail(s, m, GRPC_STATUS_UNAVAILABLE, "database not ready (schema); retry");
        else if (!pgconn_up(s->pg))
            end_fail(s, m, GRPC_STATUS_UNAVAILABLE, "database unavailable; retry");
        else if (s->len + s->ninflight >= s->pool->cfg.mailbox_capacity)
            end_fail(s, m, GRPC_STATUS_UNAVAILABLE,
                     "server overloaded: request queue full; retry later");
        else {
            s->fifo[(s->head + s->len) % s->cap] = m;
            s->len++;
        }
    }
    pump(s);
    return 0;
}

/* ---- the pool --------------------------------------------------------------------------- */

int ledger_pool_add(ledger_pool_t **out, supervisor_t *sup, const ledger_config_t *cfg)
{
    *out = NULL;
    ledger_pool_t *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    if (cfg)
        p->cfg = *cfg;
    ledger_config_t *c = &p->cfg;
    if (!c->mailbox_capacity)
        c->mailbox_capacity = 4096;
    if (!c->batch_max)
        c->batch_max = 256;
    if (!c->pool_size)
        c->pool_size = 4;
    if (c->idempotency_ttl_hours <= 0)
        c->idempotency_ttl_hours = 24;
    if (c->max_amount_cents <= 0)
        c->max_amount_cents = INT64_C(1000000000000000);
    if (!c->statement_timeout_ns)
        c->statement_timeout_ns = 10000000000ull;
    if (!c->purge_interval_ns)
        c->purge_interval_ns = 60000000000ull;
    p->conninfo = strdup(c->conninfo ? c->conninfo : "");
    c->conninfo = NULL;
    if (c->pool_size == 1) {
        p->nwriters = 1;
        p->nreaders = 0;
    } else {
        p->nreaders = c->pool_size / 4 ? c->pool_size / 4 : 1;
        p->nwriters = c->pool_size - p->nreaders;
    }
    p->nslots = p->nwriters + p->nreaders;
    for (unsigned b = 0; b < LEDGER_BATCH_BUCKETS; b++)
        atomic_init(&p->batch_hist[b], 0);
    atomic_init(&p->batch_max_seen, 0);
    p->slots = calloc(p->nslots, sizeof(*p->slots));
    if (!p->conninfo || !p->slots) {
        ledger_pool_free(p);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < p->nslots; i++) {
        ledger_slot_t *sl = &p->slots[i];
        sl->pool = p;
        sl->index = i;
        sl->writes = i < p->nwriters;
        sl->reads = !sl->writes || p->nreaders == 0;
        sl->maintenance = i == 0;
        if (sl->writes)
            snprintf(sl->name, sizeof sl->name, "ledger-w%u", i);
        else
            snprintf(sl->name, sizeof sl->name, "ledger-r%u", i - p->nwriters);
        atomic_init(&sl->up, false);
        actor_spec_t spec = {
            .name = sl->name,
            .mailbox_capacity = c->mailbox_capacity,
            .batch_max = c->batch_max,
            .critical = true,
            .arg = sl,
            .start = ledger_start,
            .handle = ledger_handle,
            .stop = ledger_stop,
            .idle = ledger_idle,
        };
        int rc = supervisor_add(sup, &spec, &sl->actor);
        if (rc < 0) {
            /* The supervisor keeps the actors added so far: the pool must outlive them. */
            *out = p;
            return rc;
        }
    }
    *out = p;
    return 0;
}

void ledger_pool_batch_stats(const ledger_pool_t *p, uint64_t counts[LEDGER_BATCH_BUCKETS],
                             uint64_t *max)
{
    for (unsigned b = 0; b < LEDGER_BATCH_BUCKETS; b++)
        counts[b] = atomic_load_explicit(&p->batch_hist[b], memory_order_relaxed);
    *max = atomic_load_explicit(&p->batch_max_seen, memory_order_relaxed);
}

/* One INFO line: "ledger batches: total=T max=M 1:a 2-3:b 4-7:c ..." up to the bucket of
 * batch_max. */
static void log_batch_stats(const ledger_pool_t *p)
{
    uint64_t counts[LEDGER_BATCH_BUCKETS], max, total = 0;
    ledger_pool_batch_stats(p, counts, &max);
    unsigned last = 0;
    while (last + 1 < LEDGER_BATCH_BUCKETS && (p->cfg.batch_max >> (last + 1)) != 0)
        last++;
    char line[LEDGER_BATCH_BUCKETS * 48];
    size_t at = 0;
    for (unsigned b = 0; b <= last; b++) {
        total += counts[b];
        uint64_t lo = UINT64_C(1) << b, hi = (UINT64_C(1) << (b + 1)) - 1;
        if (lo == hi)
            at += (size_t)snprintf(line + at, sizeof line - at, " %" PRIu64 ":%" PRIu64, lo,
                                   counts[b]);
        else
            at += (size_t)snprintf(line + at, sizeof line - at, " %" PRIu64 "-%" PRIu64 ":%" PRIu64,
                                   lo, hi, counts[b]);
    }
    LOG_INFO(MOD, "ledger batches: total=%" PRIu64 " max=%" PRIu64 "%s", total, max, line);
}

void ledger_pool_free(ledger_pool_t *p)
{
    if (!p)
        return;
    if (p->conninfo && p->conninfo[0] && !p->legacy && p->nwriters > 0)
        log_batch_stats(p);
    free(p->slots);
    free(p->conninfo);
    free(p);
}

actor_t *ledger_pool_route(void *pool, const payment_msg_t *m)
{
    ledger_pool_t *p = pool;
    switch ((payment_method_t)m->hdr.type) {
    case PAYMENT_AUTHORIZE:
        return p->slots[hash_str(m->req.authorize->payer_account_id) % p->nwriters].actor;
    case PAYMENT_GET_PAYMENT:
    case PAYMENT_GET_BALANCE: {
        const char *id = m->hdr.type == PAYMENT_GET_PAYMENT ? m->req.get_payment->payment_id
                                                            : m->req.get_balance->account_id;
        if (p->nreaders == 0)
            return p->slots[hash_str(id) % p->nwriters].actor;
        return p->slots[p->nwriters + hash_str(id) % p->nreaders].actor;
    }
    }
    return NULL;
}

void ledger_pool_set_schema_ready(ledger_pool_t *p, bool ready)
{
    atomic_store_explicit(&p->schema_ready, ready, memory_order_release);
}

bool ledger_pool_db_up(const ledger_pool_t *p)
{
    for (unsigned i = 0; i < p->nslots; i++)
        if (!atomic_load_explicit(&p->slots[i].up, memory_order_relaxed))
            return false;
    return p->nslots > 0;
}

unsigned ledger_pool_writers(const ledger_pool_t *p)
{
    return p->nwriters;
}

unsigned ledger_pool_readers(const ledger_pool_t *p)
{
    return p->nreaders;
}

/* ledger_actor_add: pools it created, freed at exit (the actor may outlive any caller). */
static pthread_mutex_t legacy_mu = PTHREAD_MUTEX_INITIALIZER;
static ledger_pool_t *legacy_pools;

static void legacy_free(void)
{
    pthread_mutex_lock(&legacy_mu);
    while (legacy_pools) {
        ledger_pool_t *p = legacy_pools;
        legacy_pools = p->next_legacy;
        ledger_pool_free(p);
    }
    pthread_mutex_unlock(&legacy_mu);
}

int ledger_actor_add(supervisor_t *s, const ledger_config_t *cfg, actor_t **out)
{
    ledger_config_t c = cfg ? *cfg : (ledger_config_t){0};
    c.pool_size = 1;
    ledger_pool_t *p = NULL;
    int rc = ledger_pool_add(&p, s, &c);
    if (!p)
        return rc;
    pthread_mutex_lock(&legacy_mu);
    if (!legacy_pools)
        atexit(legacy_free);
    p->legacy = true;
    p->next_legacy = legacy_pools;
    legacy_pools = p;
    pthread_mutex_unlock(&legacy_mu);
    if (rc < 0)
        return rc;
    *out = p->slots[0].actor;
    return 0;
}
