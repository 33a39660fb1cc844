/*
 * paymentd_settings: paymentd's whole configuration (DESIGN.md §2 "Configuration"), read
 * by the runtime's config engine from the environment and flags.
 *
 * Every variable of the design table is here with its name, default and a flag derived
 * from its name (DATABASE_URL → --database-url); GRPC_CQ_THREADS and
 * GRPC_MAX_RECEIVE_BYTES are additions. Cross-setting rules are checked after loading:
 * ENVIRONMENT=production refuses the default DATABASE_URL and one without a password;
 * OUTBOX_BASE_DELAY_SECONDS must not exceed OUTBOX_MAX_DELAY_SECONDS.
 *
 * URLs are validated and broken down at load: `db` and `redis` hold the parsed parts
 * (percent-decoded), `database_url` is normalised for libpq (postgresql+asyncpg:// →
 * postgresql://, asyncpg's ?ssl=X → ?sslmode=X). Passwords only ever leave this struct
 * masked (paymentd_settings_log).
 *
 * Main thread, at start-up. The struct owns its strings: paymentd_settings_free.
 */
#ifndef PAY_APP_PAYMENTD_SETTINGS_H
#define PAY_APP_PAYMENTD_SETTINGS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "runtime/config.h"
#include "runtime/log.h"

/** paymentd_settings_load result for --help: print paymentd_settings_help, exit 0. */
#define PAYMENTD_SETTINGS_HELP CONFIG_HELP

#define PAYMENTD_DEFAULT_DATABASE_URL "postgresql://payment:payment@localhost:5432/payment_db"
#define PAYMENTD_MAX_TRUSTED_PROXIES  64

typedef enum paymentd_environment {
    PAYMENTD_ENV_DEVELOPMENT = 0,
    PAYMENTD_ENV_STAGING = 1,
    PAYMENTD_ENV_PRODUCTION = 2,
    PAYMENTD_ENV_TEST = 3, /* test harnesses; behaves as development */
} paymentd_environment_t;

typedef enum paymentd_idempotency_scope {
    PAYMENTD_IDEMPOTENCY_GLOBAL = 0, /* one key space, as the Python service */
    PAYMENTD_IDEMPOTENCY_CLIENT = 1, /* keys scoped per client identity */
} paymentd_idempotency_scope_t;

/** DATABASE_URL broken down (by libpq's own parser). Multi-host URLs keep libpq's
 *  comma lists in host; port is then the first host's port. */
typedef struct paymentd_db_url {
    char host[256];
    int port; /* 5432 when absent */
    char user[64];
    char password[256]; /* "" when absent */
    char dbname[64];
} paymentd_db_url_t;

/** REDIS_URL broken down: redis://[[user]:password@]host[:port][/db]. */
typedef struct paymentd_redis_url {
    char host[256]; /* without brackets for IPv6 */
    int port;       /* 6379 when absent */
    char user[64];  /* "" unless given (Redis 6 ACL user) */
    char password[256];
    int db; /* 0 when absent */
} paymentd_redis_url_t;

/** One RATE_LIMIT_TRUSTED_PROXIES entry: an address, or a network with /prefix. */
typedef struct paymentd_proxy {
    int family;       /* AF_INET or AF_INET6 */
    uint8_t addr[16]; /* network byte order; 4 bytes used for AF_INET */
    int prefix_len;   /* 32 / 128 for a single address */
} paymentd_proxy_t;

typedef struct paymentd_settings {
    char *database_url; /* normalised for libpq */
    paymentd_db_url_t db;
    char *redis_url;
    paymentd_redis_url_t redis;
    char *kafka_brokers; /* comma list, whitespace removed */

    char *grpc_host;
    int64_t grpc_port; /* 0 = pick a free port */
    int64_t grpc_cq_threads;
    int64_t grpc_max_receive_bytes;

    bool metrics_enabled;
    char *metrics_host;
    int64_t metrics_port; /* 0 = pick a free port */

    bool rate_limit_enabled;
    int64_t rate_limit_max_requests;
    int64_t rate_limit_window_seconds;
    bool rate_limit_fail_open;
    int64_t rate_limit_timeout_ms;
    char *rate_limit_trusted_proxies; /* as given */
    paymentd_proxy_t trusted_proxies[PAYMENTD_MAX_TRUSTED_PROXIES];
    size_t trusted_proxies_n;
    char *rate_limit_method_limits; /* as given, e.g. "GetPayment=1000,AuthorizePayment=50" */
    /* Per-method limits from RATE_LIMIT_METHOD_LIMITS; 0 = the method shares the common
     * bucket of RATE_LIMIT_MAX_REQUESTS. */
    int64_t limit_authorize_payment;
    int64_t limit_get_payment;
    int64_t limit_get_account_balance;

    int64_t outbox_batch_size;
    double outbox_poll_interval_seconds;
    int64_t outbox_max_retries;
    double outbox_base_delay_seconds;
    double outbox_max_delay_seconds;
    char *kafka_topic_prefix;

    log_level_t log_level;
    log_format_t log_format;
    paymentd_environment_t environment;

    double shutdown_grace_seconds;
    int64_t db_pool_size;
    int64_t ledger_batch_max;
    int64_t db_statement_timeout_ms;
    paymentd_idempotency_scope_t idempotency_scope;
    int64_t idempotency_ttl_hours;
    int64_t max_amount_cents;

    unsigned char _source[64]; /* private: config_source_t of each table entry */
} paymentd_settings_t;

/**
 * Fill *out from the process environment and argv. 0; PAYMENTD_SETTINGS_HELP for --help;
 * or -EINVAL with one precise sentence in err (out is then already freed).
 */
int paymentd_settings_load(paymentd_settings_t *out, int argc, char **argv, char *err,
                           size_t errlen);
/** paymentd_settings_load with an explicit NULL-terminated "NAME=value" environment. */
int paymentd_settings_load_env(paymentd_settings_t *out, int argc, char **argv, char **envp,
                               char *err, size_t errlen);
/** The --help text: every setting with flag, variable, default and meaning. */
void paymentd_settings_help(FILE *out);
/** Log the effective configuration (one INFO line, credentials masked). */
void paymentd_settings_log(const paymentd_settings_t *s);
/** Release the strings; *s is zeroed. */
void paymentd_settings_free(paymentd_settings_t *s);

#endif
