/*
 * ledger_store: the ledger's business SQL, synchronous (one blocking libpq connection),
 * for paymentctl and for maintenance work of the ledger actor: open, fund and show
 * accounts, outbox statistics, and `ledger check`, which verifies every invariant of
 * DESIGN.md §4 in one consistent snapshot.
 *
 * The schema and its write protocol are described at the top of
 * db/migrations/001_ledger.sql. Funding follows that protocol: a funding transfer is an
 * AUTHORIZED payment from the currency's system account (sys:funding:USD, created on
 * demand, the only kind of account allowed to go negative) with two ledger entries, both
 * balances, and one PaymentAuthorized outbox row, in one transaction that locks the two
 * account rows in id order.
 *
 * Errors: 0 or a negative errno-style code with one sentence in err:
 *   -EINVAL bad input (id, currency, owner, amount), -ENOENT no such account,
 *   -EEXIST the account exists with other attributes, -EPERM the account cannot take
 *   the operation (closed, or a system account), -EOVERFLOW a balance would leave int64,
 *   -ENOTCONN / -EIO / -ETIMEDOUT from io/pg.h (a lost connection during COMMIT means
 *   the outcome is unknown).
 *
 * Threads: the caller owns the connection; no state is kept between calls.
 */
#ifndef PAY_ACTORS_LEDGER_STORE_H
#define PAY_ACTORS_LEDGER_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "runtime/ulid.h"

#define LEDGER_ACCOUNT_ID_MAX  64
#define LEDGER_OWNER_MAX_CHARS 255
#define LEDGER_FUNDING_PREFIX  "sys:funding:"
/** Writers of outbox rows NOTIFY this channel after inserting (the relay LISTENs). */
#define LEDGER_OUTBOX_CHANNEL "outbox_pending"
/** Default upper bound of one funding transfer (MAX_AMOUNT_CENTS's default). */
#define LEDGER_MAX_AMOUNT_CENTS INT64_C(1000000000000000)
/** ledger check reports at most this many fault lines per kind of fault. */
#define LEDGER_CHECK_MAX_LINES 1000

typedef struct ledger_account {
    char id[LEDGER_ACCOUNT_ID_MAX + 1];
    char currency[4];
    char owner[4 * LEDGER_OWNER_MAX_CHARS + 1]; /* "" when the account has none */
    bool has_owner;
    char status[8]; /* active | closed */
    char kind[9];   /* customer | system */
    int64_t balance_cents;
    int64_t entries; /* ledger entries of the account */
    char created_at[ULID_TIME_SIZE];
    char updated_at[ULID_TIME_SIZE];
} ledger_account_t;

typedef struct ledger_fund_result {
    char payment_id[ULID_SIZE];
    char event_id[ULID_SIZE];
    char funding_account[LEDGER_ACCOUNT_ID_MAX + 1];
    int64_t balance_cents;         /* the funded account's balance after */
    int64_t funding_balance_cents; /* the funding account's balance after */
    char processed_at[ULID_TIME_SIZE];
} ledger_fund_result_t;

typedef struct ledger_outbox_status {
    int64_t pending;                   /* not yet published */
    int64_t published;                 /* delivered (to their topic or to the DLQ) */
    int64_t failed;                    /* pending with at least one failed attempt */
    int64_t dead_lettered;             /* published to the DLQ */
    int64_t claimed;                   /* pending and leased by a relay right now */
    double oldest_pending_age_seconds; /* -1 when nothing is pending */
} ledger_outbox_status_t;

typedef struct ledger_check_result {
    int64_t accounts, payments, entries; /* what was checked */
    int64_t faults;                      /* 0 = every invariant holds */
} ledger_check_result_t;

/** Receives one line per fault found by ledger_store_check (no newline). */
typedef void (*ledger_fault_fn)(const char *line, void *arg);

/** 1-64 characters of [A-Za-z0-9_.:-]. */
bool ledger_account_id_valid(const char *id);
/** ^[A-Z]{3}$. */
bool ledger_currency_valid(const char *currency);

/**
 * Open a customer account with a zero balance. Opening an account that exists with the
 * same currency and owner is a no-op (*created = false); another currency or owner is
 * -EEXIST. owner may be NULL (none); else 1-255 characters of UTF-8 without control
 * characters. Ids starting with "sys:" are reserved for system accounts (-EINVAL).
 */
int ledger_store_open_account(PGconn *c, bool *created, const char *id, const char *currency,
                              const char *owner, char *err, size_t errlen);

/** Read an account with its balance and entry count; -ENOENT when it does not exist. */
int ledger_store_get_account(PGconn *c, ledger_account_t *out, const char *id, char *err,
                             size_t errlen);

/**
 * Move amount_cents (1..max_amount_cents) from the currency's funding account to the
 * active customer account id, as described at the top. out may be NULL.
 */
int ledger_store_fund_account(PGconn *c, ledger_fund_result_t *out, const char *id,
                              int64_t amount_cents, int64_t max_amount_cents, char *err,
                              size_t errlen);

/** Outbox counts and the age of the oldest pending event. */
int ledger_store_outbox_status(PGconn *c, ledger_outbox_status_t *out, char *err, size_t errlen);

/**
 * Verify the invariants of DESIGN.md §4 in one REPEATABLE READ snapshot, calling fault
 * once per fault with a line naming the currency, account, payment, event or key at fault.
 * Returns 0 when the check ran (res->faults says whether it passed), or an error when it
 * could not run.
 */
int ledger_store_check(PGconn *c, ledger_check_result_t *res, ledger_fault_fn fault, void *arg,
                       char *err, size_t errlen);

#endif
