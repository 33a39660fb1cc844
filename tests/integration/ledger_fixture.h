/*
 * ledger_fixture: the stack, fixture and call helpers test_ledger and test_ledger_batch
 * share: scripts/stack.sh started in a temporary directory (stopped at exit), each test in
 * a fresh schema of its own (selected with the URL's search_path) with its own
 * build/paymentd, gRPC calls through src/io/grpc_client.c, SQL helpers on
 * src/io/pg.c, concurrent random load and PostgreSQL stopped or killed mid-load.
 *
 * What differs between the tests is a configuration, set with lf_configure() before the
 * group setup (stack_up) runs.
 */
#ifndef PAY_TESTS_INTEGRATION_LEDGER_FIXTURE_H
#define PAY_TESTS_INTEGRATION_LEDGER_FIXTURE_H

#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "e2e/paymentd_proc.h"
#include "io/grpc_client.h"
#include "io/pg.h"
#include "payment/v1/payment.pb-c.h"

#define AUTHORIZE   "/payment.v1.PaymentService/AuthorizePayment"
#define GET_PAYMENT "/payment.v1.PaymentService/GetPayment"
#define GET_BALANCE "/payment.v1.PaymentService/GetAccountBalance"
#define CHECK       "/grpc.health.v1.Health/Check"

#define ST_AUTHORIZED  PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_AUTHORIZED
#define ST_DECLINED    PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DECLINED
#define ST_DUPLICATE   PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DUPLICATE
#define E_INSUFFICIENT PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_INSUFFICIENT_FUNDS
#define E_NOT_FOUND    PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_ACCOUNT_NOT_FOUND
#define E_AMOUNT       PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_INVALID_AMOUNT
#define E_SAME         PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_SAME_ACCOUNT
#define E_CURRENCY     PAYMENT__V1__PAYMENT_ERROR_CODE__PAYMENT_ERROR_CODE_CURRENCY_MISMATCH

#define ULID_RE "^[0-9A-HJKMNP-TV-Z]{26}$"
#define TS_RE   "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}\\+00:00$"

typedef struct lf_config {
    const char *stack_template;    /* mkdtemp() template of the stack's directory */
    const char *app_name;          /* application_name of the test's connections */
    const char *schema_prefix;     /* each test's schema: <prefix>_<pid>_<n> */
    const char *const *server_env; /* NULL-terminated, for every paymentd, or NULL */
} lf_config_t;

/* Sets what the helpers below use; call before cmocka_run_group_tests(). */
void lf_configure(const lf_config_t *cfg);

extern char stack_dir[256]; /* the stack's directory (stack.sh up) */
extern char base_url[1024]; /* its DATABASE_URL */

/* ---- the stack ------------------------------------------------------------------------- */

/* Copies src into dst (size n), truncating. */
void cpy(char *dst, size_t n, const char *src);
void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int sh_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void stack_down(void);
int stack_up(void **state);       /* group setup */
int stack_teardown(void **state); /* group teardown */

/* ---- fixture: a schema, its accounts, a paymentd ---------------------------------------- */

typedef struct fixture {
    char schema[64];
    char url[1400];
    char env_url[1500];
    PGconn *db;
    pd_proc_t pd, pd2;
    gc_t *gc, *gc2;
} fixture_t;

PGconn *connect_url(const char *url);
void exec_sql(PGconn *c, const char *sql);
/* The first column of the first row as text ("(none)" without rows). */
const char *scalar(PGconn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int64_t scalar_i64(PGconn *c, const char *sql);
void open_account(fixture_t *f, const char *id, const char *cur, int64_t fund);
/* Starts a paymentd on f's schema (with the configured server_env, then extra). */
void start_server(fixture_t *f, pd_proc_t *pd, gc_t **gc, const char *const *extra);
/* A fresh schema, migrated, alice/bob/carol/erin-eur funded, a paymentd (extra env). */
int setup_env(void **state, const char *const *extra);
int setup(void **state);
int setup_pool_of_one(void **state); /* DB_POOL_SIZE=1 */
int teardown(void **state);

/* ---- calls ------------------------------------------------------------------------------ */

typedef struct auth {
    const char *key, *payer, *payee, *currency, *description;
    int64_t amount;
    const char *client_id; /* x-client-id, or NULL */
} auth_t;

typedef struct outcome {
    grpc_status_code grpc;
    char details[512];
    int status;     /* PaymentStatus */
    int error_code; /* PaymentErrorCode, 0 when unset */
    bool has_error;
    char error_message[256];
    char payment_id[32];
    char processed_at[48];
} outcome_t;

void authorize_on(gc_t *gc, const auth_t *a, int timeout_ms, outcome_t *o);
void expect_ok(const outcome_t *o, int status, int code);
int64_t balance(gc_t *gc, const char *account, char *currency);
void ledger_check_passes(fixture_t *f);
int64_t customer_total(fixture_t *f);

/* ---- concurrency ------------------------------------------------------------------------ */

typedef struct worker {
    fixture_t *f;
    gc_t *gc;
    const char *target;
    auth_t a;
    outcome_t o;
    int id;
    /* random load */
    int calls;
    const char *const *accounts;
    int naccounts;
    int64_t max_amount;
    atomic_int *authorized, *declined, *errors;
    char bad[256];
} worker_t;

void *one_call(void *arg);
void run_parallel(worker_t *ws, int n, void *(*fn)(void *));
void *random_load(void *arg);
/* nthreads workers spread over the targets, calls each, among accounts; then the ledger
 * holds, money is conserved, and every reply matches a stored payment. */
void hammer(fixture_t *f, const char *const *targets, int ntargets, int nthreads, int calls,
            const char *const *accounts, int naccounts, int64_t max_amount);

extern const char *const ACCOUNTS[4];

/* ---- PostgreSQL stopped mid-load --------------------------------------------------------- */

int health(gc_t *gc);
/* Waits up to ms for the health status; the time it took, or -1. */
int64_t wait_health(gc_t *gc, int want, int64_t ms);
/* Brings the stack's PostgreSQL back (after pg-stop or a kill -9 of its postmaster, whose
 * orphaned backends may take a moment to exit): pg-start until it answers. */
void postgres_back(void);

typedef enum { STOP_FAST, KILL_POSTMASTER } outage_t;

/* nworkers (at most 16) threads of load while PostgreSQL goes away and comes back:
 * calls end UNAVAILABLE within their deadline, health follows, nothing acknowledged is
 * lost, the ledger holds. */
void postgres_killed_mid_load(fixture_t *f, outage_t how, int nworkers);

#endif
