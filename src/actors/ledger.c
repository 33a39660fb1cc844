/*
 * ledger: see ledger.h and db/migrations/002_ledger_authorize.sql.
 *
 * DESIGN
 * Each actor keeps the messages it took in a local FIFO and works through JOBS on its
 * connection, which is in libpq pipeline mode (io/pgconn.h); results come back through
 * pgconn's on_entry on the same thread, in order. Ending a message is always: end the
 * call, actor_done, dispose — with no failure point in between, so a failing incarnation
 * can never answer a call twice. Messages still in the FIFO or in a job when an
 * incarnation fails are on its taken-work list and the runtime fails them (UNAVAILABLE).
 * When the connection goes down every message in flight or queued ends UNAVAILABLE at
 * once, and so does every new one until it is back: callers never wait for a database
 * that is not there.
 * Jobs: at most MAX_JOBS = 2 in flight, and a job is started only behind jobs whose sync
 * (the end of their transaction) is already queued, so statements never land in another
 * job's transaction. The second job's statements wait in the server's input while the
 * first commits: a writer keeps PostgreSQL busy without a round trip between batches.
 * Batches (two phases, one transaction ended by a sync):
 *   A. lock the batch's idempotency keys (advisory locks in ascending lock value), drop
 *      expired ones and read the stored ones, lock every account the batch may touch
 *      (sorted by id); then a flush request, so the results come back before any commit;
 *   B. decide() in C, in arrival order, with the balances in memory (a hot account is read
 *      and written once per batch; a key repeated in the batch replays its first use),
 *      then one multi-row statement writes payments, entries, balances, keys and outbox
 *      rows, and the sync commits. Replies go out after the sync came back.
 * Expected outcomes never raise an SQL error. An SQL error rolls the batch back at its
 * sync: its messages go back to the FIFO head and are retried in halves
 * (split_pending/split_size) down to single requests, which take ledger_authorize() (002),
 * so one bad payment never fails its neighbours. A lost connection after a batch's commit
 * was queued means an unknown outcome: those calls end UNAVAILABLE and say so. The FIFO
 * has batch_max spare slots so a failed batch always fits back; admission counts queued
 * plus in-flight messages.
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

/* One AuthorizePayment request of a batch: its ids and times, then its outcome. */
typedef enum { OUT_NEW, OUT_DUPLICATE, OUT_CONFLICT } outcome_t;
typedef struct breq {
    char scope[300];
    char kid[300 + 1 + 256]; /* scope, US (0x1f), key: the key's identity and lock name */
    char fp[65];             /* SHA-256 fingerprint, hex */
    char pid[ULID_SIZE], eid[ULID_SIZE];
    char now_s[ULID_TIME_SIZE], exp_s[ULID_TIME_SIZE];
    int first;  /* the first request of the batch with the same key (itself when none) */
    int stored; /* the key's stored row in the job's keys result, -1 = none */
    outcome_t outcome;
    /* the reply: pointers into this request, its first, or the keys result */
    const char *res_pid, *status, *code, *res_msg, *res_at;
    char msg[256];
    int64_t deb_after, cred_after;
} breq_t;

/* What a job does on the connection: prepare the statements (after each connect), purge
 * expired keys, run one message's statement, or apply a batch in two phases (A: lock keys,
 * read keys, lock accounts; B: write, then the sync commits). */
typedef enum { JOB_PREPARE, JOB_PURGE, JOB_ONE, JOB_BATCH } job_kind_t;

#define MAX_JOBS 2 /* one transaction committing, the next one's phase A queued behind it */

typedef struct job {
    job_kind_t kind;
    payment_msg_t **ms; /* batch_max slots */
    size_t n;
    size_t nnew;    /* batch: requests recorded now (OUT_NEW) */
    bool sync_sent; /* its transaction's end is queued: a later job may follow */
    bool sql_error; /* the server refused a statement: nothing of the job was applied */
    bool lost;      /* the connection went first: on_down ends the job */
    char sqlstate[8];
    char why[400];
    PGresult *res;         /* JOB_ONE, JOB_PURGE: the statement's result */
    PGresult *keys, *accs; /* JOB_BATCH: stored keys, locked accounts */
    breq_t *rq;            /* batch_max */
    const char **kptr;     /* batch_max: rq[i].kid */
    const char **aptr;     /* 2 batch_max: the locked accounts' ids */
    int64_t *abal;         /* their balances as the batch goes */
    int *aupd;             /* the last request that moved them, -1 = untouched */
    int *kslot, *aslot;    /* hash tables over kptr / aptr: room for smask + 1 slots, */
    size_t smask;          /* of which this batch uses kmask + 1 and amask + 1 (>= 2x */
    size_t kmask, amask;   /* its keys or accounts), so only those are cleared */
} job_t;

/* An actor incarnation's state (its thread only). */
typedef struct lstate {
    ledger_slot_t *slot;
    ledger_pool_t *pool;
    actor_t *a;
    pgconn_t *pg;
    payment_msg_t **fifo; /* room for mailbox_capacity + batch_max: a failed batch goes back */
    size_t cap, head, len;
    job_t jobs[MAX_JOBS]; /* in flight, oldest at jhead */
    unsigned jhead, njobs;
    size_t inflight;      /* messages in the jobs */
    bool prepared;        /* the statements are prepared (or queued) on this connection */
    size_t split_pending; /* messages at the FIFO head retried after a failed batch */
    size_t split_size;    /* ... taken at most this many per batch */
    bool purge_due;
    actor_timer_t *purge_timer;
} lstate_t;

#define CONFLICT_TEXT                                                                              \
    "idempotency_key: already used for a different request (payer, payee, amount_cents or "        \
    "currency differ)"

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

/* An AuthorizePayment reply (NEW or replayed). */
static void answer_authorize_fields(lstate_t *s, payment_msg_t *m, bool duplicate, const char *pid,
                                    const char *status, const char *code, const char *message,
                                    const char *processed_at)
{
    Payment__V1__AuthorizePaymentResponse resp = PAYMENT__V1__AUTHORIZE_PAYMENT_RESPONSE__INIT;
    Payment__V1__PaymentError perr = PAYMENT__V1__PAYMENT_ERROR__INIT;
    resp.payment_id = (char *)pid;
    resp.status =
        duplicate ? PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DUPLICATE : status_of(status);
    if (code) {
        perr.code = error_code_of(code);
        perr.message = (char *)(message ? message : "");
        resp.error = &perr;
    }
    resp.processed_at = (char *)processed_at;
    end_reply(s, m, &resp.base);
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

/* Prepared on every connection (once the schema exists), by name. */
enum { S_AUTH1, S_GETP, S_GETB, S_PURGE, S_LOCKK, S_READK, S_LOCKA, S_APPLY, NSTMT };

static const struct {
    const char *name, *sql;
} STMTS[NSTMT] = {
    [S_AUTH1] = {"auth1", SQL_AUTHORIZE},
    [S_GETP] = {"getp", SQL_GET_PAYMENT},
    [S_GETB] = {"getb", SQL_GET_BALANCE},
    [S_PURGE] = {"purge", SQL_PURGE},
    /* A batch, phase A: lock its idempotency keys in ascending order of the lock value
     * (the lock of 002's ledger_authorize: one key's lock is the same on both paths) ... */
    [S_LOCKK] = {"lockk",
                 "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
                 " FROM unnest($1::text[]) AS t(k) ORDER BY 1) AS s"},
    /* ... read the stored ones, one primary-key probe each, and drop the expired ones
     * (absent, as in 002) by their tuple ids ... */
    [S_READK] = {"readk",
                 "WITH q AS (SELECT DISTINCT s, k FROM unnest($1::text[], $2::text[]) AS t(s, k)),"
                 " f AS MATERIALIZED (SELECT i.* FROM q CROSS JOIN LATERAL"
                 " (SELECT x.ctid AS tid, x.scope, x.key, encode(x.fingerprint, 'hex') AS fp,"
                 " x.payment_id, x.status, x.error_code, x.error_message, x.processed_at,"
                 " x.expires_at FROM idempotency_keys x WHERE x.scope = q.s AND x.key = q.k) AS i),"
                 " d AS (DELETE FROM idempotency_keys"
                 " WHERE ctid = ANY (ARRAY(SELECT tid FROM f WHERE expires_at <= now())))"
                 " SELECT scope, key, fp, payment_id, status, error_code, error_message,"
                 " pay_format_ts(processed_at) FROM f WHERE expires_at > now()"},
    /* ... then lock the accounts, sorted, once. */
    [S_LOCKA] = {"locka",
                 "SELECT id, currency, balance_cents, status = 'active' AND kind = 'customer'"
                 " FROM accounts WHERE id = ANY ($1::text[]) ORDER BY id FOR NO KEY UPDATE"},
    /* Phase B: every row of the batch's new payments in one statement (multi-row inserts
     * from arrays, entries in the order applied so their ids follow it), one UPDATE of the
     * touched balances, one NOTIFY. */
    [S_APPLY] =
        {"apply",
         "WITH p AS (INSERT INTO payments (id, payer_account_id, payee_account_id,"
         " amount_cents, currency, status, error_code, error_message, description,"
         " idempotency_scope, idempotency_key, idempotency_expires_at, created_at,"
         " updated_at)"
         " SELECT id, py, pe, am, cu, st, co, ms, de, sc, k, ex, ts, ts"
         " FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],"
         " $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],"
         " $12::timestamptz[], $13::timestamptz[])"
         " AS t(id, py, pe, am, cu, st, co, ms, de, sc, k, ex, ts)),"
         " e AS (INSERT INTO ledger_entries (payment_id, account_id, entry_type,"
         " amount_cents, currency, balance_after_cents, created_at)"
         " SELECT * FROM unnest($17::text[], $18::text[], $19::text[], $20::bigint[],"
         " $21::text[], $22::bigint[], $23::timestamptz[])),"
         " u AS (UPDATE accounts a SET balance_cents = v.bal, updated_at = v.upd"
         " FROM unnest($24::text[], $25::bigint[], $26::timestamptz[]) AS v(id, bal, upd)"
         " WHERE a.id = v.id),"
         " k AS (INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, status,"
         " error_code, error_message, processed_at, expires_at)"
         " SELECT sc, k, decode(fp, 'hex'), id, st, co, ms, ts, ex"
         " FROM unnest($10::text[], $11::text[], $14::text[], $1::text[], $6::text[],"
         " $7::text[], $8::text[], $13::timestamptz[], $12::timestamptz[])"
         " AS t(sc, k, fp, id, st, co, ms, ts, ex)),"
         " o AS (INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,"
         " created_at, next_attempt_at)"
         " SELECT ev, 'Payment', id, CASE WHEN co IS NULL THEN 'PaymentAuthorized'"
         " ELSE 'PaymentDeclined' END, pl::jsonb, ts, ts"
         " FROM unnest($15::text[], $1::text[], $7::text[], $16::text[], $13::timestamptz[])"
         " AS t(ev, id, co, pl, ts))"
         " SELECT pg_notify('outbox_pending', '')"},
};
#define APPLY_NPARAMS 26

/* The steps of a job's pipeline entries. */
enum { STEP_PREPARE = 1, STEP_STMT, STEP_LOCKK, STEP_READK, STEP_LOCKA, STEP_APPLY, STEP_SYNC };

static int exec_one(lstate_t *s, job_t *j, payment_msg_t *m)
{
    const char *p[13];
    char scope[300], fphex[2 + 64 + 1], pid[ULID_SIZE], eid[ULID_SIZE], now_s[ULID_TIME_SIZE];
    char amount[24], ttl[32], max[24];
    switch ((payment_method_t)m->hdr.type) {
    case PAYMENT_AUTHORIZE: {
        const Payment__V1__AuthorizePaymentRequest *r = m->req.authorize;
        const ledger_config_t *cfg = &s->pool->cfg;
        uint8_t fp[32];
        int64_t now_us;
        idempotency_scope(scope, sizeof scope, cfg->idempotency_per_client, m);
        ledger_fingerprint(fp, r->payer_account_id, r->payee_account_id, r->amount_cents,
                           r->currency);
        fphex[0] = '\\';
        fphex[1] = 'x';
        hex(fphex + 2, fp, 32);
        ulid_new_at(pid, &now_us);
        ulid_new(eid);
        ulid_format_time(now_s, now_us);
        snprintf(amount, sizeof amount, "%" PRId64, r->amount_cents);
        snprintf(ttl, sizeof ttl, "%" PRId64 " hours", cfg->idempotency_ttl_hours);
        snprintf(max, sizeof max, "%" PRId64, cfg->max_amount_cents);
        const char *v[13] = {scope,
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
        memcpy(p, v, sizeof v);
        return pgconn_exec(s->pg, STMTS[S_AUTH1].name, 13, p, j, STEP_STMT);
    }
    case PAYMENT_GET_PAYMENT:
        p[0] = m->req.get_payment->payment_id;
        return pgconn_exec(s->pg, STMTS[S_GETP].name, 1, p, j, STEP_STMT);
    case PAYMENT_GET_BALANCE:
        p[0] = m->req.get_balance->account_id;
        return pgconn_exec(s->pg, STMTS[S_GETB].name, 1, p, j, STEP_STMT);
    }
    return -EINVAL;
}

/* ---- batches: building the statements' array parameters -------------------------------- */

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
 * only '"' and '\\' need a backslash, so any text (commas, braces, spaces) survives.
 * NULL appends an SQL NULL element. */
static void sbuf_elem(sbuf_t *b, const char *s)
{
    sbuf_put(b, b->len == 0 ? "{" : ",", 1);
    if (!s) {
        sbuf_put(b, "NULL", 4);
        return;
    }
    sbuf_put(b, "\"", 1);
    const char *run = s;
    for (const char *q = s; *q; q++) {
        if (*q == '"' || *q == '\\') {
            sbuf_put(b, run, (size_t)(q - run));
            sbuf_put(b, "\\", 1);
            run = q;
        }
    }
    sbuf_put(b, run, strlen(run));
    sbuf_put(b, "\"", 1);
}

static void sbuf_i64(sbuf_t *b, int64_t v)
{
    char t[24];
    snprintf(t, sizeof t, "%" PRId64, v);
    sbuf_elem(b, t);
}

/* The finished literal ("{}" when empty). */
static const char *sbuf_array(sbuf_t *b)
{
    sbuf_put(b, b->len == 0 ? "{}" : "}", b->len == 0 ? 2 : 1);
    return b->p;
}

/* s as a JSON string (quotes included). */
static void sbuf_json_str(sbuf_t *b, const char *s)
{
    sbuf_put(b, "\"", 1);
    for (const unsigned char *q = (const unsigned char *)s; *q; q++) {
        char t[8];
        if (*q == '"' || *q == '\\') {
            t[0] = '\\';
            t[1] = (char)*q;
            sbuf_put(b, t, 2);
        } else if (*q < 0x20) {
            snprintf(t, sizeof t, "\\u%04x", *q);
            sbuf_put(b, t, 6);
        } else {
            sbuf_put(b, (const char *)q, 1);
        }
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

/* The mask of a table with at least twice n slots (a power of two), at most max + 1. */
static size_t table_mask(size_t n, size_t max)
{
    size_t slots = 16;
    while (slots < 2 * n && slots <= max)
        slots *= 2;
    return slots - 1 < max ? slots - 1 : max;
}

/* Open addressing over strings, storing indexes into keys[]: the index of k, or -1 after
 * inserting idx (when idx >= 0). slot has mask + 1 entries, all -1 initially. */
static int smap(int *slot, size_t mask, const char *const *keys, const char *k, int idx)
{
    for (size_t h = hash_str(k) & mask;; h = (h + 1) & mask) {
        if (slot[h] < 0) {
            if (idx >= 0)
                slot[h] = idx;
            return -1;
        }
        if (strcmp(keys[slot[h]], k) == 0)
            return slot[h];
    }
}

/* Phase A of a batch (>= 2 AuthorizePayment messages in j->ms): make its ids and times,
 * find keys repeated inside it, and queue the locks and reads. */
static int send_phase_a(lstate_t *s, job_t *j)
{
    const ledger_config_t *cfg = &s->pool->cfg;
    sbuf_t kids = {0}, scopes = {0}, keys = {0}, accs = {0};
    j->kmask = table_mask(j->n, j->smask);
    memset(j->kslot, 0xff, (j->kmask + 1) * sizeof(*j->kslot));
    int64_t ttl_us = cfg->idempotency_ttl_hours * INT64_C(3600000000);
    for (size_t i = 0; i < j->n; i++) {
        breq_t *q = &j->rq[i];
        const Payment__V1__AuthorizePaymentRequest *r = j->ms[i]->req.authorize;
        uint8_t fp[32];
        int64_t now_us;
        idempotency_scope(q->scope, sizeof q->scope, cfg->idempotency_per_client, j->ms[i]);
        snprintf(q->kid, sizeof q->kid, "%s\x1f%s", q->scope, r->idempotency_key);
        ledger_fingerprint(fp, r->payer_account_id, r->payee_account_id, r->amount_cents,
                           r->currency);
        hex(q->fp, fp, 32);
        ulid_new_at(q->pid, &now_us);
        ulid_new(q->eid);
        ulid_format_time(q->now_s, now_us);
        ulid_format_time(q->exp_s, now_us + ttl_us);
        j->kptr[i] = q->kid;
        int f = smap(j->kslot, j->kmask, j->kptr, q->kid, (int)i);
        q->first = f < 0 ? (int)i : f;
        q->stored = -1;
        if (q->first == (int)i) {
            sbuf_elem(&kids, q->kid);
            sbuf_elem(&scopes, q->scope);
            sbuf_elem(&keys, r->idempotency_key);
        }
        /* Every account a request may need (a superset: replays lock theirs too, which
         * changes nothing but the lock set; the order stays keys, then accounts). */
        if (r->amount_cents > 0 && r->amount_cents <= cfg->max_amount_cents &&
            strcmp(r->payer_account_id, r->payee_account_id) != 0) {
            sbuf_elem(&accs, r->payer_account_id);
            sbuf_elem(&accs, r->payee_account_id);
        }
    }
    const char *p1[1] = {sbuf_array(&kids)};
    const char *p2[2] = {sbuf_array(&scopes), sbuf_array(&keys)};
    const char *p3[1] = {sbuf_array(&accs)};
    int rc = pgconn_exec(s->pg, STMTS[S_LOCKK].name, 1, p1, j, STEP_LOCKK);
    if (rc == 0)
        rc = pgconn_exec(s->pg, STMTS[S_READK].name, 2, p2, j, STEP_READK);
    if (rc == 0)
        rc = pgconn_exec(s->pg, STMTS[S_LOCKA].name, 1, p3, j, STEP_LOCKA);
    if (rc == 0)
        rc = pgconn_push(s->pg, true, cfg->statement_timeout_ns);
    free(kids.p);
    free(scopes.p);
    free(keys.p);
    free(accs.p);
    return rc;
}

static void replay_stored(job_t *j, breq_t *q, int row)
{
    PGresult *k = j->keys;
    q->outcome = strcmp(PQgetvalue(k, row, 2), q->fp) == 0 ? OUT_DUPLICATE : OUT_CONFLICT;
    q->res_pid = PQgetvalue(k, row, 3);
    q->status = PQgetvalue(k, row, 4);
    q->code = PQgetisnull(k, row, 5) ? NULL : PQgetvalue(k, row, 5);
    q->res_msg = PQgetisnull(k, row, 6) ? NULL : PQgetvalue(k, row, 6);
    q->res_at = PQgetvalue(k, row, 7);
}

/* Decides every request of the batch in arrival order with the balances in memory: the
 * outcome each would get from ledger_authorize() (002) alone, one after the other. */
static void decide(lstate_t *s, job_t *j)
{
    const ledger_config_t *cfg = &s->pool->cfg;
    PGresult *k = j->keys, *a = j->accs;
    char kid[sizeof j->rq[0].kid];
    for (int row = 0; row < PQntuples(k); row++) {
        snprintf(kid, sizeof kid, "%s\x1f%s", PQgetvalue(k, row, 0), PQgetvalue(k, row, 1));
        int f = smap(j->kslot, j->kmask, j->kptr, kid, -1);
        if (f >= 0)
            j->rq[f].stored = row;
    }
    int na = PQntuples(a);
    j->amask = table_mask((size_t)na, j->smask);
    memset(j->aslot, 0xff, (j->amask + 1) * sizeof(*j->aslot));
    for (int row = 0; row < na; row++) {
        j->aptr[row] = PQgetvalue(a, row, 0);
        smap(j->aslot, j->amask, j->aptr, j->aptr[row], row);
        j->abal[row] = strtoll(PQgetvalue(a, row, 2), NULL, 10);
        j->aupd[row] = -1;
    }
    for (size_t i = 0; i < j->n; i++) {
        breq_t *q = &j->rq[i];
        const Payment__V1__AuthorizePaymentRequest *r = j->ms[i]->req.authorize;
        breq_t *f = &j->rq[q->first];
        if (f->stored >= 0) {
            replay_stored(j, q, f->stored);
            continue;
        }
        if (f != q) { /* the first request with this key executed: replay it */
            q->outcome = strcmp(f->fp, q->fp) == 0 ? OUT_DUPLICATE : OUT_CONFLICT;
            q->res_pid = f->res_pid;
            q->status = f->status;
            q->code = f->code;
            q->res_msg = f->res_msg;
            q->res_at = f->res_at;
            continue;
        }
        const char *payer = r->payer_account_id, *payee = r->payee_account_id;
        int pi = -1, ei = -1;
        q->code = NULL;
        if (r->amount_cents <= 0 || r->amount_cents > cfg->max_amount_cents) {
            q->code = "INVALID_AMOUNT";
            snprintf(q->msg, sizeof q->msg,
                     "amount_cents must be between 1 and %" PRId64 ", got %" PRId64,
                     cfg->max_amount_cents, r->amount_cents);
        } else if (strcmp(payer, payee) == 0) {
            q->code = "SAME_ACCOUNT";
            snprintf(q->msg, sizeof q->msg, "payer and payee are the same account %s", payer);
        } else {
            pi = smap(j->aslot, j->amask, j->aptr, payer, -1);
            ei = smap(j->aslot, j->amask, j->aptr, payee, -1);
            if (pi < 0 || strcmp(PQgetvalue(a, pi, 3), "t") != 0) {
                q->code = "ACCOUNT_NOT_FOUND";
                snprintf(q->msg, sizeof q->msg, "payer account %s not found", payer);
            } else if (ei < 0 || strcmp(PQgetvalue(a, ei, 3), "t") != 0) {
                q->code = "ACCOUNT_NOT_FOUND";
                snprintf(q->msg, sizeof q->msg, "payee account %s not found", payee);
            } else if (strcmp(PQgetvalue(a, pi, 1), r->currency) != 0) {
                q->code = "CURRENCY_MISMATCH";
                snprintf(q->msg, sizeof q->msg, "currency %s does not match payer account %s (%s)",
                         r->currency, payer, PQgetvalue(a, pi, 1));
            } else if (strcmp(PQgetvalue(a, ei, 1), r->currency) != 0) {
                q->code = "CURRENCY_MISMATCH";
                snprintf(q->msg, sizeof q->msg, "currency %s does not match payee account %s (%s)",
                         r->currency, payee, PQgetvalue(a, ei, 1));
            } else if (j->abal[pi] < r->amount_cents) {
                q->code = "INSUFFICIENT_FUNDS";
                snprintf(q->msg, sizeof q->msg, "insufficient funds in payer account %s", payer);
            }
        }
        q->outcome = OUT_NEW;
        q->res_pid = q->pid;
        q->res_at = q->now_s;
        q->status = q->code ? "DECLINED" : "AUTHORIZED";
        q->res_msg = q->code ? q->msg : NULL;
        j->nnew++;
        if (!q->code) {
            j->abal[pi] -= r->amount_cents;
            j->abal[ei] += r->amount_cents;
            q->deb_after = j->abal[pi];
            q->cred_after = j->abal[ei];
            j->aupd[pi] = (int)i;
            j->aupd[ei] = (int)i;
        }
    }
}

/* Phase B: the new payments' rows in one statement (when there are any), then the sync
 * that commits the whole batch. */
static int send_phase_b(lstate_t *s, job_t *j)
{
    enum {
        PID,
        PAYER,
        PAYEE,
        AMT,
        CUR,
        ST,
        CODE,
        MSG,
        DESCR,
        SCOPE,
        KEY,
        EXP,
        TS,
        FP,
        EID,
        PL,
        E_PID,
        E_ACC,
        E_TYPE,
        E_AMT,
        E_CUR,
        E_AFTER,
        E_TS,
        A_ID,
        A_BAL,
        A_UPD
    };
    int rc = 0;
    if (j->nnew > 0) {
        sbuf_t b[APPLY_NPARAMS] = {{0}};
        sbuf_t pl = {0};
        for (size_t i = 0; i < j->n; i++) {
            breq_t *q = &j->rq[i];
            if (q->outcome != OUT_NEW)
                continue;
            const Payment__V1__AuthorizePaymentRequest *r = j->ms[i]->req.authorize;
            sbuf_elem(&b[PID], q->pid);
            sbuf_elem(&b[PAYER], r->payer_account_id);
            sbuf_elem(&b[PAYEE], r->payee_account_id);
            sbuf_i64(&b[AMT], r->amount_cents);
            sbuf_elem(&b[CUR], r->currency);
            sbuf_elem(&b[ST], q->status);
            sbuf_elem(&b[CODE], q->code);
            sbuf_elem(&b[MSG], q->res_msg);
            sbuf_elem(&b[DESCR], r->description ? r->description : "");
            sbuf_elem(&b[SCOPE], q->scope);
            sbuf_elem(&b[KEY], r->idempotency_key);
            sbuf_elem(&b[EXP], q->exp_s);
            sbuf_elem(&b[TS], q->now_s);
            sbuf_elem(&b[FP], q->fp);
            sbuf_elem(&b[EID], q->eid);
            pl.len = 0;
            sbuf_put(&pl, "{\"payment_id\":", 14);
            sbuf_json_str(&pl, q->pid);
            sbuf_put(&pl, ",\"payer_account_id\":", 20);
            sbuf_json_str(&pl, r->payer_account_id);
            sbuf_put(&pl, ",\"payee_account_id\":", 20);
            sbuf_json_str(&pl, r->payee_account_id);
            char amt[40];
            int an = snprintf(amt, sizeof amt, ",\"amount_cents\":%" PRId64, r->amount_cents);
            sbuf_put(&pl, amt, (size_t)an);
            sbuf_put(&pl, ",\"currency\":", 12);
            sbuf_json_str(&pl, r->currency);
            if (q->code) {
                sbuf_put(&pl, ",\"error_code\":", 14);
                sbuf_json_str(&pl, q->code);
                sbuf_put(&pl, ",\"error_message\":", 17);
                sbuf_json_str(&pl, q->res_msg);
            }
            sbuf_put(&pl, "}", 1);
            sbuf_elem(&b[PL], pl.p);
            if (q->code)
                continue;
            for (int side = 0; side < 2; side++) {
                sbuf_elem(&b[E_PID], q->pid);
                sbuf_elem(&b[E_ACC], side == 0 ? r->payer_account_id : r->payee_account_id);
                sbuf_elem(&b[E_TYPE], side == 0 ? "DEBIT" : "CREDIT");
                sbuf_i64(&b[E_AMT], r->amount_cents);
                sbuf_elem(&b[E_CUR], r->currency);
                sbuf_i64(&b[E_AFTER], side == 0 ? q->deb_after : q->cred_after);
                sbuf_elem(&b[E_TS], q->now_s);
            }
        }
        for (int row = 0; row < PQntuples(j->accs); row++) {
            if (j->aupd[row] < 0)
                continue;
            sbuf_elem(&b[A_ID], j->aptr[row]);
            sbuf_i64(&b[A_BAL], j->abal[row]);
            sbuf_elem(&b[A_UPD], j->rq[j->aupd[row]].now_s);
        }
        const char *params[APPLY_NPARAMS];
        for (int i = 0; i < APPLY_NPARAMS; i++)
            params[i] = sbuf_array(&b[i]);
        rc = pgconn_exec(s->pg, STMTS[S_APPLY].name, APPLY_NPARAMS, params, j, STEP_APPLY);
        for (int i = 0; i < APPLY_NPARAMS; i++)
            free(b[i].p);
        free(pl.p);
    }
    return rc;
}

/* ---- jobs ------------------------------------------------------------------------------- */

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

static job_t *job_at(lstate_t *s, unsigned k)
{
    return &s->jobs[(s->jhead + k) % MAX_JOBS];
}

static void job_clear(job_t *j)
{
    PQclear(j->res);
    PQclear(j->keys);
    PQclear(j->accs);
    j->res = j->keys = j->accs = NULL;
    j->n = 0;
    j->nnew = 0;
    j->sync_sent = j->sql_error = j->lost = false;
    j->sqlstate[0] = j->why[0] = '\0';
}

/* Ends the oldest job (its sync came back). */
static void job_pop(lstate_t *s)
{
    job_clear(job_at(s, 0));
    s->jhead = (s->jhead + 1) % MAX_JOBS;
    s->njobs--;
}

/* Queues the end of j's transaction and sends everything queued. */
static int send_sync(lstate_t *s, job_t *j)
{
    j->sync_sent = true;
    int rc = pgconn_sync(s->pg, j, STEP_SYNC);
    if (rc == 0)
        rc = pgconn_push(s->pg, false, s->pool->cfg.statement_timeout_ns);
    return rc;
}

/* Starts the next job when the connection allows one: at most MAX_JOBS in flight, and
 * only behind jobs whose transaction end is already queued (a new job's statements must
 * never land inside an open transaction). First the statements' preparation after a
 * (re)connect, then a due purge, then the oldest queued messages: AuthorizePayment
 * messages queued together go as one batch of whatever is queued now (up to batch_max;
 * fewer while retrying a failed batch split), so a lone request never waits for company;
 * a read stops the batch, so the FIFO order is kept. A failure to queue means the
 * connection is being dropped: on_down ends the jobs in flight. */
static void pump(lstate_t *s)
{
    while (s->pg && pgconn_up(s->pg) && s->njobs < MAX_JOBS &&
           (s->njobs == 0 || job_at(s, s->njobs - 1)->sync_sent)) {
        bool ready = atomic_load_explicit(&s->pool->schema_ready, memory_order_acquire);
        if (!s->prepared) {
            if (!ready)
                return;
            job_t *j = job_at(s, s->njobs++);
            j->kind = JOB_PREPARE;
            s->prepared = true;
            int rc = 0;
            for (int i = 0; i < NSTMT && rc == 0; i++)
                rc = pgconn_prepare(s->pg, STMTS[i].name, STMTS[i].sql, j, STEP_PREPARE);
            if (rc == 0)
                rc = send_sync(s, j);
            if (rc < 0)
                return;
            continue;
        }
        if (s->purge_due && ready) {
            char lim[16];
            snprintf(lim, sizeof lim, "%d", PURGE_BATCH);
            const char *p[1] = {lim};
            s->purge_due = false;
            job_t *j = job_at(s, s->njobs++);
            j->kind = JOB_PURGE;
            if (pgconn_exec(s->pg, STMTS[S_PURGE].name, 1, p, j, STEP_STMT) < 0 ||
                send_sync(s, j) < 0)
                return;
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
        job_t *j = job_at(s, s->njobs++);
        j->ms[0] = m;
        j->n = 1;
        while (m->hdr.type == PAYMENT_AUTHORIZE && j->n < limit && s->len > 0 &&
               s->fifo[s->head]->hdr.type == PAYMENT_AUTHORIZE) {
            payment_msg_t *next = fifo_pop(s);
            if (!expired(s, next))
                j->ms[j->n++] = next;
        }
        s->inflight += j->n;
        if (m->hdr.type == PAYMENT_AUTHORIZE)
            record_batch(s->pool, j->n);
        int rc;
        if (j->n == 1) {
            j->kind = JOB_ONE;
            rc = exec_one(s, j, m);
            if (rc == 0)
                rc = send_sync(s, j);
        } else {
            j->kind = JOB_BATCH;
            rc = send_phase_a(s, j);
        }
        if (rc < 0)
            return;
    }
}

/* Row `row` of r, whose columns from c0 are ledger_authorize()'s. */
static void answer_authorize_row(lstate_t *s, payment_msg_t *m, PGresult *r, int row, int c0)
{
    const char *outcome = PQgetvalue(r, row, c0);
    if (strcmp(outcome, "CONFLICT") == 0) {
        end_fail(s, m, GRPC_STATUS_ALREADY_EXISTS, CONFLICT_TEXT);
        return;
    }
    answer_authorize_fields(s, m, strcmp(outcome, "DUPLICATE") == 0, PQgetvalue(r, row, c0 + 1),
                            PQgetvalue(r, row, c0 + 2),
                            PQgetisnull(r, row, c0 + 3) ? NULL : PQgetvalue(r, row, c0 + 3),
                            PQgetvalue(r, row, c0 + 4), PQgetvalue(r, row, c0 + 5));
}

/* A batch failed with an SQL error, so nothing of it was applied (its transaction rolled
 * back at its sync): put its messages back at the FIFO head, in order, to be retried in
 * halves (down to one payment, which takes the single-payment path), so one bad payment
 * never fails its neighbours. A job started behind it is not affected (its own
 * transaction); the retried payments then come after that job's. */
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

/* An error that may come with the server going away (connection exception, admin/crash
 * shutdown, or no SQLSTATE at all): the connection is about to be lost, and callers are
 * told the outcome is unknown, as for any loss after the commit was queued. */
static bool outcome_unknown(const char *sqlstate)
{
    return sqlstate[0] == '\0' || strncmp(sqlstate, "08", 2) == 0 ||
           strncmp(sqlstate, "57P", 3) == 0;
}

/* One message's statement ended (its sync came back). */
static void finish_one(lstate_t *s, job_t *j)
{
    payment_msg_t *m = j->ms[0];
    const char *path = payment_method_path((payment_method_t)m->hdr.type);
    if (j->sql_error || !j->res) {
        char text[200];
        if (transient(j->sqlstate)) {
            snprintf(text, sizeof text, "database temporarily unavailable (SQLSTATE %s); retry",
                     j->sqlstate);
            LOG_WARNING(MOD, "%s: %s: %s", s->slot->name, path, j->why);
            end_fail(s, m, GRPC_STATUS_UNAVAILABLE, text);
        } else {
            LOG_ERROR(MOD, "%s: %s: %s", s->slot->name, path, j->why);
            end_fail(s, m, GRPC_STATUS_INTERNAL, "server error: the database refused the request");
        }
        return;
    }
    PGresult *r = j->res;
    switch ((payment_method_t)m->hdr.type) {
    case PAYMENT_AUTHORIZE:
        if (PQntuples(r) != 1 || PQnfields(r) != 6) {
            LOG_ERROR(MOD, "%s: ledger_authorize returned %d rows of %d columns", s->slot->name,
                      PQntuples(r), PQnfields(r));
            end_fail(s, m, GRPC_STATUS_INTERNAL, "server error: unexpected database answer");
            return;
        }
        answer_authorize_row(s, m, r, 0, 0);
        return;
    case PAYMENT_GET_PAYMENT:
        answer_get_payment(s, m, r);
        return;
    case PAYMENT_GET_BALANCE:
        answer_get_balance(s, m, r);
        return;
    }
}

/* The oldest job's sync came back: its transaction is over (committed, or rolled back
 * after an SQL error). */
static void finish_job(lstate_t *s, job_t *j)
{
    switch (j->kind) {
    case JOB_PREPARE:
        if (j->sql_error) {
            LOG_ERROR(MOD, "%s: preparing the ledger's statements failed: %s", s->slot->name,
                      j->why);
            job_pop(s);
            pgconn_reset(s->pg, "the ledger's statements could not be prepared");
            return;
        }
        break;
    case JOB_PURGE:
        if (!j->sql_error && j->res) {
            long long n = PQntuples(j->res) == 1 ? strtoll(PQgetvalue(j->res, 0, 0), NULL, 10) : 0;
            if (n > 0)
                LOG_INFO(MOD, "purged %lld expired idempotency keys", n);
            s->purge_due = n >= PURGE_BATCH;
        } else {
            LOG_WARNING(MOD, "purging expired idempotency keys failed: %s", j->why);
        }
        break;
    case JOB_ONE:
        s->inflight -= j->n;
        finish_one(s, j);
        break;
    case JOB_BATCH:
        s->inflight -= j->n;
        if (j->sql_error) {
            requeue_split(s, j->ms, j->n, j->why);
            break;
        }
        for (size_t i = 0; i < j->n; i++) {
            breq_t *q = &j->rq[i];
            if (q->outcome == OUT_CONFLICT)
                end_fail(s, j->ms[i], GRPC_STATUS_ALREADY_EXISTS, CONFLICT_TEXT);
            else
                answer_authorize_fields(s, j->ms[i], q->outcome == OUT_DUPLICATE, q->res_pid,
                                        q->status, q->code, q->res_msg, q->res_at);
        }
        break;
    }
    job_pop(s);
}

static void on_entry(pgconn_t *c, void *arg, void *tag, int step, PGresult *res, int err,
                     const char *sqlstate, const char *why)
{
    (void)c;
    lstate_t *s = arg;
    job_t *j = tag;
    if (err == -EIO && !j->sql_error) {
        j->sql_error = true;
        snprintf(j->sqlstate, sizeof j->sqlstate, "%s", sqlstate);
        snprintf(j->why, sizeof j->why, "%s", why);
    } else if (err == -ENOTCONN || err == -ETIMEDOUT) {
        j->lost = true; /* on_down follows and ends the job */
    }
    switch (step) {
    case STEP_STMT:
        j->res = res;
        return;
    case STEP_READK:
        j->keys = res;
        return;
    case STEP_LOCKA:
        j->accs = res;
        if (j->lost)
            return;
        if (!j->sql_error) {
            decide(s, j);
            if (send_phase_b(s, j) < 0)
                return;
        }
        /* After an error the sync only ends (rolls back) the transaction. */
        if (send_sync(s, j) < 0)
            return;
        pump(s);
        return;
    case STEP_SYNC:
        if (j->lost)
            return;
        finish_job(s, j);
        pump(s);
        return;
    default: /* STEP_PREPARE, STEP_LOCKK, STEP_APPLY: only their errors matter */
        PQclear(res);
        return;
    }
}

static void on_up(pgconn_t *c, void *arg)
{
    (void)c;
    lstate_t *s = arg;
    atomic_store_explicit(&s->slot->up, true, memory_order_relaxed);
    s->prepared = false;
    if (s->slot->maintenance) /* purge at once after (re)connecting, then periodically */
        actor_timer_arm(s->purge_timer, 1, 0);
    pump(s);
}

/* The connection is gone: every job in flight ends UNAVAILABLE (an authorization whose
 * commit was already queued has an unknown outcome, and says so), then every queued
 * message. */
static void on_down(pgconn_t *c, void *arg, const char *why)
{
    (void)c;
    lstate_t *s = arg;
    atomic_store_explicit(&s->slot->up, false, memory_order_relaxed);
    s->prepared = false;
    char text[400];
    snprintf(text, sizeof text, "database unavailable: %s; retry", why);
    while (s->njobs > 0) {
        job_t *j = job_at(s, 0);
        if (j->kind == JOB_ONE || j->kind == JOB_BATCH) {
            for (size_t i = 0; i < j->n; i++) {
                payment_msg_t *m = j->ms[i];
                bool unknown = m->hdr.type == PAYMENT_AUTHORIZE && j->sync_sent &&
                               (!j->sql_error || outcome_unknown(j->sqlstate));
                end_fail(s, m, GRPC_STATUS_UNAVAILABLE,
                         unknown ? "database connection lost before the payment's outcome was "
                                   "known; retry with the same idempotency_key"
                                 : text);
            }
            s->inflight -= j->n;
        }
        job_pop(s);
    }
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
    size_t bm = pool->cfg.batch_max;
    s->cap = pool->cfg.mailbox_capacity + bm;
    s->fifo = calloc(s->cap, sizeof(*s->fifo));
    int rc = -ENOMEM;
    if (!s->fifo)
        goto fail;
    size_t slots = 16;
    while (slots < 4 * bm)
        slots *= 2;
    for (unsigned k = 0; k < MAX_JOBS; k++) {
        job_t *j = &s->jobs[k];
        j->smask = slots - 1;
        j->ms = calloc(bm, sizeof(*j->ms));
        j->rq = calloc(bm, sizeof(*j->rq));
        j->kptr = calloc(bm, sizeof(*j->kptr));
        j->aptr = calloc(2 * bm, sizeof(*j->aptr));
        j->abal = calloc(2 * bm, sizeof(*j->abal));
        j->aupd = calloc(2 * bm, sizeof(*j->aupd));
        j->kslot = calloc(slots, sizeof(*j->kslot));
        j->aslot = calloc(slots, sizeof(*j->aslot));
        if (!j->ms || !j->rq || !j->kptr || !j->aptr || !j->abal || !j->aupd || !j->kslot ||
            !j->aslot)
            goto fail;
    }
    if (slot->maintenance) {
        if ((rc = actor_timer_new(&s->purge_timer, a, on_purge_timer, NULL)) < 0)
            goto fail;
        actor_timer_arm(s->purge_timer, pool->cfg.purge_interval_ns, 0);
    }
    pgconn_config_t pc = {
        .conninfo = pool->conninfo,
        .application_name = "paymentd-ledger",
        /* Every statement is prepared once per connection and planned once for any batch
         * (generic plans): planning each batch again, as the default "auto" mode does when
         * custom plans look cheaper, cost ~10% of the backend's CPU on the hot path (perf).
         * A plan made while a table was empty (a fresh database) must not scan it whole
         * once it has grown: the batch's key lookup was such a plan (a hash join over a
         * sequential scan of idempotency_keys, until an autovacuum ANALYZE replanned it).
         * Every statement here is index probes, so the ledger's connections plan with
         * enable_seqscan=off (the foreign-key checks' plans too).
         * A backend whose client went away (we drop a connection that does not answer
         * within the statement timeout) stops its statement within a second instead of
         * going on, e.g. once a lock it waits for is released, and committing a batch
         * nobody will be told about. */
        .options = "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off"
                   " -c client_connection_check_interval=1000",
        .backoff_base_ns = pool->cfg.backoff_base_ns,
        .backoff_cap_ns = pool->cfg.backoff_cap_ns,
    };
    pgconn_callbacks_t cb = {.on_up = on_up, .on_down = on_down, .on_entry = on_entry};
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
    /* Queued messages and those of the jobs are still on the taken-work list: the runtime
     * fails them. */
    for (unsigned k = 0; k < MAX_JOBS; k++) {
        job_t *j = &s->jobs[k];
        job_clear(j);
        free(j->ms);
        free(j->rq);
        free(j->kptr);
        free(j->aptr);
        free(j->abal);
        free(j->aupd);
        free(j->kslot);
        free(j->aslot);
    }
    free(s->fifo);
    free(s);
}

static bool ledger_idle(actor_t *a, void *state)
{
    (void)a;
    lstate_t *s = state;
    return !s || (s->len == 0 && s->njobs == 0);
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
        else if (s->len + s->inflight >= s->pool->cfg.mailbox_capacity)
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
        /* Few writers, many readers: a writer batches, so one absorbs a growing load with
         * growing batches, while every extra writer adds its own commits and smaller
         * batches (bench/RESULTS.md, "Routing"); reads do not batch and scale with readers. */
        p->nwriters = c->pool_size / 4 ? c->pool_size / 4 : 1;
        p->nreaders = c->pool_size - p->nwriters;
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
