/*
 * ledger: the ledger actors (DESIGN.md §3-§5), which apply payments to PostgreSQL and
 * answer the three payment RPCs.
 *
 * A pool of DB_POOL_SIZE actors, each owning one asynchronous libpq connection
 * (io/pgconn.h) on its own epoll loop, reconnecting by itself with backoff:
 *   - writers (AuthorizePayment): a request goes to the writer chosen by hashing its payer
 *     id, so one payer's payments queue in one actor instead of contending for its row;
 *   - readers (GetPayment, GetAccountBalance): reads never queue behind writes. They read
 *     the primary (the connection of DATABASE_URL), so a balance read right after a
 *     payment sees it.
 *   With DB_POOL_SIZE = 1 the one actor does both; otherwise max(1, size/4) writers and the
 *   rest readers: a writer batches, so one absorbs growing load with growing batches while
 *   each extra writer adds commits and shrinks batches; reads do not batch and scale with
 *   readers (measured: bench/RESULTS.md, "Routing").
 *   Writer 0 also does the maintenance: purging expired idempotency keys.
 * Batches: a writer keeps the messages it took in a local FIFO. When its connection can
 * take a job, the AuthorizePayment requests queued at the head (whatever is there now, up
 * to batch_max = LEDGER_BATCH_MAX; a lone request goes alone, through ledger_authorize()
 * of db/migrations/002) are applied in ONE transaction over a libpq pipeline: keys locked
 * sorted, then accounts sorted, decided in C in arrival order with the balances in memory,
 * one multi-row write, one commit; each request gets the outcome it would get alone. The
 * next batch's first statements are pipelined behind that commit. A batch that fails with
 * an SQL error was not applied at all: it is retried in halves, down to single payments.
 * The reply is sent only after the commit; a connection lost meanwhile (outcome unknown)
 * ends every call of the batch UNAVAILABLE and the client's retry with the same key
 * resolves it.
 *
 * While an actor's connection is down, or before the schema is ready
 * (ledger_pool_set_schema_ready), its calls end UNAVAILABLE at once. A lost connection is
 * not an actor failure. ledger_pool_db_up (any thread) feeds health.
 *
 * Messages: payment_msg_t (payment_api.h); an actor owns each one it is handed until it
 * has ended its call. Create and add from the main thread before supervisor_start; the
 * pool must outlive the supervisor's actors (free it after supervisor_destroy).
 */
#ifndef PAY_ACTORS_LEDGER_H
#define PAY_ACTORS_LEDGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/payment_api.h"
#include "runtime/actor.h"
#include "runtime/supervisor.h"

typedef struct ledger_config {
    size_t mailbox_capacity;       /* per actor; 0 = 4096 */
    size_t batch_max;              /* LEDGER_BATCH_MAX; 0 = 256 */
    const char *conninfo;          /* DATABASE_URL, normalised for libpq (copied) */
    unsigned pool_size;            /* DB_POOL_SIZE; 0 = 4 */
    bool idempotency_per_client;   /* IDEMPOTENCY_SCOPE=client */
    int64_t idempotency_ttl_hours; /* 0 = 24 */
    int64_t max_amount_cents;      /* 0 = 10^15 */
    uint64_t statement_timeout_ns; /* 0 = 10 s: then the connection is reset (UNAVAILABLE) */
    uint64_t purge_interval_ns;    /* 0 = 60 s */
    uint64_t backoff_base_ns;      /* reconnect; 0 = 100 ms */
    uint64_t backoff_cap_ns;       /* 0 = 2 s */
} ledger_config_t;

typedef struct ledger_pool ledger_pool_t;

/** Creates the pool and adds its actors (critical) to the supervisor. cfg is copied. */
int ledger_pool_add(ledger_pool_t **out, supervisor_t *s, const ledger_config_t *cfg);
/** After the supervisor is destroyed. NULL is allowed. */
void ledger_pool_free(ledger_pool_t *p);
/** payment_api's router (route_ctx = the pool): a writer for AuthorizePayment (by payer),
 *  a reader for the reads. Any thread. */
actor_t *ledger_pool_route(void *pool, const payment_msg_t *m);
/** Any thread: the schema was migrated; until then calls end UNAVAILABLE. */
void ledger_pool_set_schema_ready(ledger_pool_t *p, bool ready);
/** Any thread: every actor of the pool is connected to PostgreSQL. */
bool ledger_pool_db_up(const ledger_pool_t *p);
/** Number of writer / reader actors. */
unsigned ledger_pool_writers(const ledger_pool_t *p);
unsigned ledger_pool_readers(const ledger_pool_t *p);

/** One actor doing both duties (pool size 1) with cfg (NULL: no database, so every call
 *  ends UNAVAILABLE), for tests of the layers around it; the pool is freed at exit. */
int ledger_actor_add(supervisor_t *s, const ledger_config_t *cfg, actor_t **out);

/** Buckets of the batch-size histogram: bucket b counts batches of 2^b .. 2^(b+1)-1
 *  payments (a batch of one is bucket 0; every AuthorizePayment statement counts). */
#define LEDGER_BATCH_BUCKETS 16
/** Any thread: the batch-size histogram of the pool's writers so far and the largest batch.
 *  ledger_pool_free logs it as one INFO line "ledger batches: total=T max=M 1:a 2-3:b ...". */
void ledger_pool_batch_stats(const ledger_pool_t *p, uint64_t counts[LEDGER_BATCH_BUCKETS],
                             uint64_t *max);

/** The idempotency fingerprint: SHA-256 over payer, payee, amount_cents (decimal) and
 *  currency, each prefixed by its length as 4 bytes big-endian. */
void ledger_fingerprint(uint8_t out[32], const char *payer, const char *payee, int64_t amount_cents,
                        const char *currency);

#endif
