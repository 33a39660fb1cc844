/*
 * test_settings: paymentd's configuration table against DESIGN.md §2. Defaults are
 * compared one by one, every variable has invalid values whose exact error names it (both
 * as an environment variable and as a flag), and the cross-setting rules (production,
 * outbox delays, port clash) and the parsed URL/list parts are checked.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "app/paymentd_settings.h"

static char err[1024];

/* Load with env entries (NULL-terminated) and argv[1..] (NULL-terminated). */
static int load(paymentd_settings_t *s, char **env, char **args)
{
    char *argv[32] = {"paymentd"};
    int argc = 1;
    for (; args && args[argc - 1]; argc++)
        argv[argc] = args[argc - 1];
    argv[argc] = NULL;
    char *noenv[] = {NULL};
    return paymentd_settings_load_env(s, argc, argv, env ? env : noenv, err, sizeof err);
}

static void test_defaults_are_the_design(void **state)
{
    paymentd_settings_t s;
    assert_int_equal(load(&s, NULL, NULL), 0);
    assert_string_equal(s.database_url, "postgresql://payment:payment@localhost:5432/payment_db");
    assert_string_equal(s.db.host, "localhost");
    assert_int_equal(s.db.port, 5432);
    assert_string_equal(s.db.user, "payment");
    assert_string_equal(s.db.password, "payment");
    assert_string_equal(s.db.dbname, "payment_db");
    assert_string_equal(s.redis_url, "redis://localhost:6379/0");
    assert_string_equal(s.redis.host, "localhost");
    assert_int_equal(s.redis.port, 6379);
    assert_int_equal(s.redis.db, 0);
    assert_string_equal(s.redis.password, "");
    assert_string_equal(s.kafka_brokers, "localhost:19092");
    assert_string_equal(s.grpc_host, "0.0.0.0");
    assert_int_equal(s.grpc_port, 50051);
    assert_int_equal(s.grpc_cq_threads, sysconf(_SC_NPROCESSORS_ONLN));
    assert_int_equal(s.grpc_max_receive_bytes, 4 * 1024 * 1024);
    assert_true(s.metrics_enabled);
    assert_string_equal(s.metrics_host, "127.0.0.1");
    assert_int_equal(s.metrics_port, 9090);
    assert_true(s.rate_limit_enabled);
    assert_int_equal(s.rate_limit_max_requests, 100);
    assert_int_equal(s.rate_limit_window_seconds, 60);
    assert_true(s.rate_limit_fail_open);
    assert_int_equal(s.rate_limit_timeout_ms, 50);
    assert_string_equal(s.rate_limit_trusted_proxies, "");
    assert_int_equal(s.trusted_proxies_n, 0);
    assert_string_equal(s.rate_limit_method_limits, "");
    assert_int_equal(s.limit_authorize_payment, 0);
    assert_int_equal(s.limit_get_payment, 0);
    assert_int_equal(s.limit_get_account_balance, 0);
    assert_int_equal(s.outbox_batch_size, 100);
    assert_true(s.outbox_poll_interval_seconds == 1.0);
    assert_int_equal(s.outbox_max_retries, 5);
    assert_true(s.outbox_base_delay_seconds == 1.0);
    assert_true(s.outbox_max_delay_seconds == 60.0);
    assert_string_equal(s.kafka_topic_prefix, "payments");
    assert_int_equal(s.log_level, LOG_INFO);
    assert_int_equal(s.log_format, LOG_FORMAT_JSON);
    assert_int_equal(s.environment, PAYMENTD_ENV_DEVELOPMENT);
    assert_true(s.shutdown_grace_seconds == 10.0);
    assert_int_equal(s.db_pool_size, 4);
    assert_int_equal(s.ledger_batch_max, 256);
    assert_int_equal(s.idempotency_scope, PAYMENTD_IDEMPOTENCY_GLOBAL);
    assert_int_equal(s.idempotency_ttl_hours, 24);
    assert_int_equal(s.max_amount_cents, 1000000000000000LL);
    paymentd_settings_free(&s);
    assert_null(s.database_url);
}

/* ---- invalid values: every variable, exact errors ---- */

#define URL_FORM        "redis://[[user]:password@]host[:port][/db]"
#define BOOL_EXP        "is not a boolean (true/false, 1/0, yes/no, on/off)"
#define DUR_EXP(lo, hi) "is not a duration in " lo ".." hi " seconds (e.g. 1.5, 1.5s, 250ms, 2m)"
#define PG_BAD          "is not a valid PostgreSQL URL: "
#define REDIS_BAD       "is not a valid Redis URL: "
#define BROKER_EXP      ", expected host:port with a host name or IP address and a port in 1..65535"
#define HOST_EXP        "is not an IP address or host name (e.g. 0.0.0.0, 127.0.0.1, ::, localhost)"
#define PROXY_EMPTY                                                                                \
    "has an empty entry (expected a comma-separated list of IP addresses or networks such as "     \
    "10.0.0.0/8)"
#define TOPIC_CHARS                                                                                \
    "is not a Kafka topic prefix: only letters, digits, '.', '_' and '-' are allowed"

static const struct bad {
    const char *var, *value, *why; /* error = VAR: "masked value" why */
    const char *shown;             /* the value as quoted, when it differs (masked) */
} bad[] = {
    {"DATABASE_URL", "mysql://u:Pw1@h/db",
     "is not a PostgreSQL URL (expected postgresql://, postgresql+asyncpg:// or "
     "postgres://user:password@host:port/db)",
     "mysql://u:***@h/db"},
    {"DATABASE_URL", "",
     "is not a PostgreSQL URL (expected postgresql://, postgresql+asyncpg:// or "
     "postgres://user:password@host:port/db)",
     NULL},
    {"DATABASE_URL", "postgresql://u:Pw1@h:99999/db",
     PG_BAD "port \"99999\" is not an integer in 1..65535", "postgresql://u:***@h:99999/db"},
    {"DATABASE_URL", "postgresql://u:Pw1@h:abc/db",
     PG_BAD "port \"abc\" is not an integer in 1..65535", "postgresql://u:***@h:abc/db"},
    {"DATABASE_URL", "postgresql://u:Pw1@/db", PG_BAD "it has no host", "postgresql://u:***@/db"},
    {"DATABASE_URL", "postgresql://u:Pw1@h", PG_BAD "it has no database name",
     "postgresql://u:***@h"},
    {"DATABASE_URL", "postgresql://:Pw1@h/db", PG_BAD "it has no user name",
     "postgresql://:***@h/db"},
    {"DATABASE_URL", "postgresql://u:Pw1@h/db?foo=1", PG_BAD "invalid URI query parameter: \"foo\"",
     "postgresql://u:***@h/db?foo=1"},
    {"DATABASE_URL", "postgresql://u:Pw1%zz@h/db", PG_BAD "invalid percent-encoded token: \"***\"",
     "postgresql://u:***@h/db"},
    {"DATABASE_URL", "postgresql://u:p@h/db?param=1",
     PG_BAD "invalid URI query parameter: \"param\"", "postgresql://u:***@h/db?param=1"},
    {"DATABASE_URL", "postgresql://u:p%z@h/db", PG_BAD "invalid percent-encoded token: \"***\"",
     "postgresql://u:***@h/db"},
    {"DATABASE_URL", "postgresql://u:Pw1@[::1/db",
     PG_BAD "end of string reached when looking for matching \"]\" in IPv6 host address in URI: "
            "\"postgresql://u:***@[::1/db\"",
     "postgresql://u:***@[::1/db"},
    {"DATABASE_URL", "postgresql://u:Pw1@h/db?sslmode=sometimes",
     PG_BAD
     "sslmode \"sometimes\" is not one of disable, allow, prefer, require, verify-ca, verify-full",
     "postgresql://u:***@h/db?sslmode=sometimes"},
    {"DATABASE_URL", "postgresql://u:Pw 1@h/db",
     PG_BAD "it contains whitespace or control characters", "postgresql://u:***@h/db"},
    {"REDIS_URL", "rediss://h:6379/0",
     "uses TLS (rediss://), which hiredis 0.14 cannot do; expected " URL_FORM, NULL},
    {"REDIS_URL", "http://h", "is not a Redis URL (expected " URL_FORM ")", NULL},
    {"REDIS_URL", "redis://h:0/0", REDIS_BAD "port \"0\" is not an integer in 1..65535", NULL},
    {"REDIS_URL", "redis://:Pw1@h:99999", REDIS_BAD "port \"99999\" is not an integer in 1..65535",
     "redis://:***@h:99999"},
    {"REDIS_URL", "redis://h/x", REDIS_BAD "database \"x\" is not a number (e.g. /0)", NULL},
    {"REDIS_URL", "redis://h:6379/0?timeout=1",
     REDIS_BAD "query parameters and fragments are not supported (expected " URL_FORM ")", NULL},
    {"REDIS_URL", "redis://", REDIS_BAD "it has no host", NULL},
    {"REDIS_URL", "redis://bad_host!/0",
     REDIS_BAD "\"bad_host!\" is not an IP address or host name", NULL},
    {"REDIS_URL", "redis://:p%zz@h/0", REDIS_BAD "bad percent-escape or over-long user or password",
     "redis://:***@h/0"},
    {"REDIS_URL", "redis://:ab%00cd@h/0",
     REDIS_BAD "bad percent-escape or over-long user or password", "redis://:***@h/0"},
    {"KAFKA_BROKERS", "", "has an empty broker entry (expected host:port[,host:port...])", NULL},
    {"KAFKA_BROKERS", "a:1,,b:2", "has an empty broker entry (expected host:port[,host:port...])",
     NULL},
    {"KAFKA_BROKERS", "h:0", "has broker \"h:0\"" BROKER_EXP, NULL},
    {"KAFKA_BROKERS", "a:1, h:abc", "has broker \"h:abc\"" BROKER_EXP, NULL},
    {"KAFKA_BROKERS", "bad host:1", "has broker \"bad host:1\"" BROKER_EXP, NULL},
    {"KAFKA_BROKERS", "::1:9092", "has broker \"::1:9092\"" BROKER_EXP, NULL},
    {"REDPANDA_BROKERS", "h:70000", "has broker \"h:70000\"" BROKER_EXP, NULL},
    {"GRPC_HOST", "", HOST_EXP, NULL},
    {"GRPC_HOST", "not a host", HOST_EXP, NULL},
    {"GRPC_HOST", "300.1.1.1", HOST_EXP, NULL},
    {"GRPC_HOST", "-bad.example", HOST_EXP, NULL},
    {"GRPC_PORT", "70000", "is not an integer in 0..65535", NULL},
    {"GRPC_PORT", "-1", "is not an integer in 0..65535", NULL},
    {"GRPC_PORT", "http", "is not an integer in 0..65535", NULL},
    {"GRPC_CQ_THREADS", "0", "is not an integer in 1..256", NULL},
    {"GRPC_CQ_THREADS", "257", "is not an integer in 1..256", NULL},
    {"GRPC_MAX_RECEIVE_BYTES", "100", "is not an integer in 1024..1073741824", NULL},
    {"GRPC_MAX_RECEIVE_BYTES", "4MiB", "is not an integer in 1024..1073741824", NULL},
    {"METRICS_ENABLED", "maybe", BOOL_EXP, NULL},
    {"METRICS_HOST", "bad_host", HOST_EXP, NULL},
    {"METRICS_PORT", "65536", "is not an integer in 0..65535", NULL},
    {"RATE_LIMIT_ENABLED", "2", BOOL_EXP, NULL},
    {"RATE_LIMIT_MAX_REQUESTS", "0", "is not an integer in 1..1000000000", NULL},
    {"RATE_LIMIT_WINDOW_SECONDS", "0", "is not an integer in 1..86400", NULL},
    {"RATE_LIMIT_WINDOW_SECONDS", "1.5", "is not an integer in 1..86400", NULL},
    {"RATE_LIMIT_FAIL_OPEN", "nope", BOOL_EXP, NULL},
    {"RATE_LIMIT_TIMEOUT_MS", "0", "is not an integer in 1..60000", NULL},
    {"RATE_LIMIT_TIMEOUT_MS", "60001", "is not an integer in 1..60000", NULL},
    {"RATE_LIMIT_TRUSTED_PROXIES", "10.0.0.1,bogus",
     "has \"bogus\", which is not an IP address or address/prefix", NULL},
    {"RATE_LIMIT_TRUSTED_PROXIES", "10.0.0.0/33",
     "has \"10.0.0.0/33\", which is not an IP address or address/prefix", NULL},
    {"RATE_LIMIT_TRUSTED_PROXIES", "::1/129",
     "has \"::1/129\", which is not an IP address or address/prefix", NULL},
    {"RATE_LIMIT_TRUSTED_PROXIES", "10.0.0.0/",
     "has \"10.0.0.0/\", which is not an IP address or address/prefix", NULL},
    {"RATE_LIMIT_TRUSTED_PROXIES", "1.2.3.4,", PROXY_EMPTY, NULL},
    {"RATE_LIMIT_METHOD_LIMITS", "Foo=1",
     "has unknown method \"Foo\" (expected AuthorizePayment, GetPayment or GetAccountBalance)",
     NULL},
    {"RATE_LIMIT_METHOD_LIMITS", "GetPayment",
     "has \"GetPayment\", expected Method=LIMIT entries such as "
     "GetPayment=1000,AuthorizePayment=50",
     NULL},
    {"RATE_LIMIT_METHOD_LIMITS", "GetPayment=0",
     "has GetPayment=\"0\", expected a limit in 1..1000000000", NULL},
    {"RATE_LIMIT_METHOD_LIMITS", "GetPayment=1,getpayment=2", "names GetPayment twice", NULL},
    {"OUTBOX_BATCH_SIZE", "0", "is not an integer in 1..10000", NULL},
    {"OUTBOX_BATCH_SIZE", "10001", "is not an integer in 1..10000", NULL},
    {"OUTBOX_POLL_INTERVAL_SECONDS", "0", DUR_EXP("0.001", "3600"), NULL},
    {"OUTBOX_POLL_INTERVAL_SECONDS", "fast", DUR_EXP("0.001", "3600"), NULL},
    {"OUTBOX_MAX_RETRIES", "-1", "is not an integer in 0..1000", NULL},
    {"OUTBOX_BASE_DELAY_SECONDS", "0", DUR_EXP("0.001", "3600"), NULL},
    {"OUTBOX_MAX_DELAY_SECONDS", "1e9", DUR_EXP("0.001", "86400"), NULL},
    {"KAFKA_TOPIC_PREFIX", "",
     "is empty; expected a Kafka topic prefix of letters, digits, '.', '_' or '-'", NULL},
    {"KAFKA_TOPIC_PREFIX", "pay ments", TOPIC_CHARS, NULL},
    {"KAFKA_TOPIC_PREFIX", "a/b", TOPIC_CHARS, NULL},
    {"LOG_LEVEL", "verbose", "is not one of DEBUG, INFO, WARNING, WARN, ERROR", NULL},
    {"LOG_FORMAT", "text", "is not one of json, console", NULL},
    {"ENVIRONMENT", "prod", "is not one of development, staging, production, test", NULL},
    {"SHUTDOWN_GRACE_SECONDS", "-1", DUR_EXP("0", "3600"), NULL},
    {"SHUTDOWN_GRACE_SECONDS", "2h", DUR_EXP("0", "3600"), NULL},
    {"DB_POOL_SIZE", "0", "is not an integer in 1..64", NULL},
    {"DB_POOL_SIZE", "65", "is not an integer in 1..64", NULL},
    {"LEDGER_BATCH_MAX", "0", "is not an integer in 1..4096", NULL},
    {"LEDGER_BATCH_MAX", "4097", "is not an integer in 1..4096", NULL},
    {"IDEMPOTENCY_SCOPE", "tenant", "is not one of global, client", NULL},
    {"IDEMPOTENCY_TTL_HOURS", "0", "is not an integer in 1..87600", NULL},
    {"MAX_AMOUNT_CENTS", "0", "is not an integer in 1..9223372036854775807", NULL},
    {"MAX_AMOUNT_CENTS", "-5", "is not an integer in 1..9223372036854775807", NULL},
    {"MAX_AMOUNT_CENTS", "9223372036854775808", "is not an integer in 1..9223372036854775807",
     NULL},
};

static const char *const all_vars[] = {
    "DATABASE_URL",
    "REDIS_URL",
    "KAFKA_BROKERS",
    "REDPANDA_BROKERS",
    "GRPC_HOST",
    "GRPC_PORT",
    "GRPC_CQ_THREADS",
    "GRPC_MAX_RECEIVE_BYTES",
    "METRICS_ENABLED",
    "METRICS_HOST",
    "METRICS_PORT",
    "RATE_LIMIT_ENABLED",
    "RATE_LIMIT_MAX_REQUESTS",
    "RATE_LIMIT_WINDOW_SECONDS",
    "RATE_LIMIT_FAIL_OPEN",
    "RATE_LIMIT_TIMEOUT_MS",
    "RATE_LIMIT_TRUSTED_PROXIES",
    "RATE_LIMIT_METHOD_LIMITS",
    "OUTBOX_BATCH_SIZE",
    "OUTBOX_POLL_INTERVAL_SECONDS",
    "OUTBOX_MAX_RETRIES",
    "OUTBOX_BASE_DELAY_SECONDS",
    "OUTBOX_MAX_DELAY_SECONDS",
    "KAFKA_TOPIC_PREFIX",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "ENVIRONMENT",
    "SHUTDOWN_GRACE_SECONDS",
    "DB_POOL_SIZE",
    "LEDGER_BATCH_MAX",
    "IDEMPOTENCY_SCOPE",
    "IDEMPOTENCY_TTL_HOURS",
    "MAX_AMOUNT_CENTS",
};

static void flag_of(char *dst, size_t n, const char *var)
{
    config_flag_name(dst, n, var);
}

static void test_every_variable_has_invalid_cases(void **state)
{
    for (size_t v = 0; v < sizeof all_vars / sizeof all_vars[0]; v++) {
        bool found = false;
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
            found = found || strcmp(bad[i].var, all_vars[v]) == 0;
        if (!found)
            fail_msg("no invalid-value case for %s", all_vars[v]);
    }
}

static void test_invalid_values_env(void **state)
{
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char kv[512], want[1024];
        snprintf(kv, sizeof kv, "%s=%s", bad[i].var, bad[i].value);
        snprintf(want, sizeof want, "%s: \"%s\" %s", bad[i].var,
                 bad[i].shown ? bad[i].shown : bad[i].value, bad[i].why);
        paymentd_settings_t s;
        char *env[] = {kv, NULL};
        int rc = load(&s, env, NULL);
        if (rc != -EINVAL)
            fail_msg("%s accepted", kv);
        if (strcmp(err, want) != 0)
            fail_msg("%s\n  got:  %s\n  want: %s", kv, err, want);
        assert_null(s.database_url); /* freed and zeroed on failure */
        assert_null(strstr(err, "Pw1"));
    }
}

static void test_invalid_values_flags(void **state)
{
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (strcmp(bad[i].var, "REDPANDA_BROKERS") == 0)
            continue; /* an alias has no flag of its own */
        char flag[128], arg[512], want[1024];
        flag_of(flag, sizeof flag, bad[i].var);
        snprintf(arg, sizeof arg, "%s=%s", flag, bad[i].value);
        snprintf(want, sizeof want, "%s: \"%s\" %s", flag,
                 bad[i].shown ? bad[i].shown : bad[i].value, bad[i].why);
        paymentd_settings_t s;
        char *args[] = {arg, NULL};
        int rc = load(&s, NULL, args);
        if (rc != -EINVAL)
            fail_msg("%s accepted", arg);
        if (strcmp(err, want) != 0)
            fail_msg("%s\n  got:  %s\n  want: %s", arg, err, want);
    }
}

static void test_topic_prefix_length(void **state)
{
    char v[260], kv[300], want[600];
    memset(v, 'p', 231);
    v[231] = '\0';
    snprintf(kv, sizeof kv, "KAFKA_TOPIC_PREFIX=%s", v);
    paymentd_settings_t s;
    char *env[] = {kv, NULL};
    assert_int_equal(load(&s, env, NULL), 0);
    assert_int_equal(strlen(s.kafka_topic_prefix), 231);
    paymentd_settings_free(&s);

    strcat(kv, "p");
    assert_int_equal(load(&s, env, NULL), -EINVAL);
    memset(v, 'p', 200);
    v[200] = '\0';
    snprintf(want, sizeof want,
             "KAFKA_TOPIC_PREFIX: \"%s...\" is longer than 231 characters (Kafka topic "
             "names are at most 249, with \".paymentauthorized\" appended)",
             v);
    assert_string_equal(err, want);
}

static void test_too_many_proxies(void **state)
{
    char list[2048] = "";
    for (int i = 0; i < 65; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s10.0.0.%d", i ? "," : "", i);
    char kv[2100];
    snprintf(kv, sizeof kv, "RATE_LIMIT_TRUSTED_PROXIES=%s", list);
    paymentd_settings_t s;
    char *env[] = {kv, NULL};
    assert_int_equal(load(&s, env, NULL), -EINVAL);
    assert_non_null(strstr(err, "\" has more than 64 entries (use networks such as 10.0.0.0/8)"));
    assert_int_equal(strncmp(err, "RATE_LIMIT_TRUSTED_PROXIES: \"10.0.0.0,10.0.0.1,", 47), 0);
    *strrchr(kv, ',') = '\0'; /* 64 entries: fine */
    assert_int_equal(load(&s, env, NULL), 0);
    assert_int_equal(s.trusted_proxies_n, 64);
    paymentd_settings_free(&s);
}

/* ---- valid values and what they become ---- */

static void test_database_url_forms(void **state)
{
    static const struct {
        const char *in, *norm, *host, *user, *password, *db;
        int port;
    } cases[] = {
        {"postgresql+asyncpg://app:p%40ss@db.internal:6543/ledger",
         "postgresql://app:p%40ss@db.internal:6543/ledger", "db.internal", "app", "p@ss", "ledger",
         6543},
        {"postgres://app:pw@10.1.2.3/ledger", "postgresql://app:pw@10.1.2.3/ledger", "10.1.2.3",
         "app", "pw", "ledger", 5432},
        {"postgresql://app@[::1]:5433/ledger", "postgresql://app@[::1]:5433/ledger", "::1", "app",
         "", "ledger", 5433},
        {"postgresql+asyncpg://app:pw@h/l?ssl=true", "postgresql://app:pw@h/l?sslmode=require", "h",
         "app", "pw", "l", 5432},
        {"postgresql+asyncpg://app:pw@h/l?ssl=false&application_name=x",
         "postgresql://app:pw@h/l?sslmode=disable&application_name=x", "h", "app", "pw", "l", 5432},
        {"postgresql://app:pw@h1:5432,h2:5433/l?target_session_attrs=read-write",
         "postgresql://app:pw@h1:5432,h2:5433/l?target_session_attrs=read-write", "h1,h2", "app",
         "pw", "l", 5432},
        {"postgresql:///l?host=/var/run/postgresql&user=app",
         "postgresql:///l?host=/var/run/postgresql&user=app", "/var/run/postgresql", "app", "", "l",
         5432},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char kv[300];
        snprintf(kv, sizeof kv, "DATABASE_URL=%s", cases[i].in);
        paymentd_settings_t s;
        char *env[] = {kv, NULL};
        if (load(&s, env, NULL) != 0)
            fail_msg("%s: %s", kv, err);
        assert_string_equal(s.database_url, cases[i].norm);
        assert_string_equal(s.db.host, cases[i].host);
        assert_string_equal(s.db.user, cases[i].user);
        assert_string_equal(s.db.password, cases[i].password);
        assert_string_equal(s.db.dbname, cases[i].db);
        assert_int_equal(s.db.port, cases[i].port);
        paymentd_settings_free(&s);
    }
}

static void test_redis_url_forms(void **state)
{
    static const struct {
        const char *in, *host, *user, *password;
        int port, db;
    } cases[] = {
        {"redis://:pw@r.internal:6380/2", "r.internal", "", "pw", 6380, 2},
        {"redis://acl:p%2Fw@[::1]", "::1", "acl", "p/w", 6379, 0},
        {"redis://secret@h/", "h", "", "secret", 6379, 0},
        {"redis://10.0.0.5:7000", "10.0.0.5", "", "", 7000, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char kv[300];
        snprintf(kv, sizeof kv, "REDIS_URL=%s", cases[i].in);
        paymentd_settings_t s;
        char *env[] = {kv, NULL};
        if (load(&s, env, NULL) != 0)
            fail_msg("%s: %s", kv, err);
        assert_string_equal(s.redis_url, cases[i].in);
        assert_string_equal(s.redis.host, cases[i].host);
        assert_string_equal(s.redis.user, cases[i].user);
        assert_string_equal(s.redis.password, cases[i].password);
        assert_int_equal(s.redis.port, cases[i].port);
        assert_int_equal(s.redis.db, cases[i].db);
        paymentd_settings_free(&s);
    }
}

static void test_lists(void **state)
{
    paymentd_settings_t s;
    char *env[] = {"KAFKA_BROKERS= a:1 , b.example:9092,[::1]:9093,c ",
                   "RATE_LIMIT_TRUSTED_PROXIES=10.0.0.1, 192.168.0.0/16 ,::1,fd00::/8",
                   "RATE_LIMIT_METHOD_LIMITS=GetPayment=1000, AuthorizePayment = 50",
                   "GRPC_HOST=[::]", NULL};
    if (load(&s, env, NULL) != 0)
        fail_msg("%s", err);
    assert_string_equal(s.kafka_brokers, "a:1,b.example:9092,[::1]:9093,c");
    assert_string_equal(s.grpc_host, "::");
    assert_int_equal(s.trusted_proxies_n, 4);
    uint8_t a[16];
    assert_int_equal(s.trusted_proxies[0].family, AF_INET);
    assert_int_equal(s.trusted_proxies[0].prefix_len, 32);
    inet_pton(AF_INET, "10.0.0.1", a);
    assert_memory_equal(s.trusted_proxies[0].addr, a, 4);
    assert_int_equal(s.trusted_proxies[1].family, AF_INET);
    assert_int_equal(s.trusted_proxies[1].prefix_len, 16);
    inet_pton(AF_INET, "192.168.0.0", a);
    assert_memory_equal(s.trusted_proxies[1].addr, a, 4);
    assert_int_equal(s.trusted_proxies[2].family, AF_INET6);
    assert_int_equal(s.trusted_proxies[2].prefix_len, 128);
    inet_pton(AF_INET6, "::1", a);
    assert_memory_equal(s.trusted_proxies[2].addr, a, 16);
    assert_int_equal(s.trusted_proxies[3].family, AF_INET6);
    assert_int_equal(s.trusted_proxies[3].prefix_len, 8);
    assert_int_equal(s.limit_get_payment, 1000);
    assert_int_equal(s.limit_authorize_payment, 50);
    assert_int_equal(s.limit_get_account_balance, 0);
    paymentd_settings_free(&s);

    char *env2[] = {"RATE_LIMIT_METHOD_LIMITS=/payment.v1.PaymentService/GetAccountBalance=7",
                    NULL};
    assert_int_equal(load(&s, env2, NULL), 0);
    assert_int_equal(s.limit_get_account_balance, 7);
    paymentd_settings_free(&s);
}

static void test_flags_override_env(void **state)
{
    paymentd_settings_t s;
    char *env[] = {"GRPC_PORT=1111", "LOG_LEVEL=error", "METRICS_ENABLED=false", "DB_POOL_SIZE=8",
                   NULL};
    char *args[] = {"--grpc-port",
                    "2222",
                    "--log-level=debug",
                    "--metrics-enabled",
                    "--log-format",
                    "Console",
                    "--outbox-poll-interval-seconds=250ms",
                    NULL};
    assert_int_equal(load(&s, env, args), 0);
    assert_int_equal(s.grpc_port, 2222);
    assert_int_equal(s.log_level, LOG_DEBUG);
    assert_true(s.metrics_enabled);
    assert_int_equal(s.db_pool_size, 8);
    assert_int_equal(s.log_format, LOG_FORMAT_CONSOLE);
    assert_true(s.outbox_poll_interval_seconds == 0.25);
    paymentd_settings_free(&s);
}

static void test_booleans(void **state)
{
    static const struct {
        const char *text;
        bool want;
    } cases[] = {
        {"true", true}, {"True", true}, {"1", true},      {"yes", true},    {"YES", true},
        {"on", true},   {"On", true},   {"false", false}, {"FALSE", false}, {"0", false},
        {"no", false},  {"No", false},  {"off", false},   {"OFF", false},   {" off ", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char e1[64], e2[64], e3[64], f1[64];
        snprintf(e1, sizeof e1, "METRICS_ENABLED=%s", cases[i].text);
        snprintf(e2, sizeof e2, "RATE_LIMIT_ENABLED=%s", cases[i].text);
        snprintf(e3, sizeof e3, "RATE_LIMIT_FAIL_OPEN=%s", cases[i].text);
        paymentd_settings_t s;
        char *env[] = {e1, e2, e3, NULL};
        assert_int_equal(load(&s, env, NULL), 0);
        assert_int_equal(s.metrics_enabled, cases[i].want);
        assert_int_equal(s.rate_limit_enabled, cases[i].want);
        assert_int_equal(s.rate_limit_fail_open, cases[i].want);
        paymentd_settings_free(&s);
        snprintf(f1, sizeof f1, "--rate-limit-fail-open=%s", cases[i].text);
        char *args[] = {f1, NULL};
        assert_int_equal(load(&s, NULL, args), 0);
        assert_int_equal(s.rate_limit_fail_open, cases[i].want);
        paymentd_settings_free(&s);
    }
}

static void test_kafka_alias(void **state)
{
    paymentd_settings_t s;
    char *e1[] = {"REDPANDA_BROKERS=rp:9092", NULL};
    assert_int_equal(load(&s, e1, NULL), 0);
    assert_string_equal(s.kafka_brokers, "rp:9092");
    paymentd_settings_free(&s);

    char *e2[] = {"KAFKA_BROKERS=rp:9092", "REDPANDA_BROKERS=rp:9092", NULL};
    assert_int_equal(load(&s, e2, NULL), 0);
    assert_string_equal(s.kafka_brokers, "rp:9092");
    paymentd_settings_free(&s);

    char *e3[] = {"KAFKA_BROKERS=k:9092", "REDPANDA_BROKERS=rp:9092", NULL};
    assert_int_equal(load(&s, e3, NULL), -EINVAL);
    assert_string_equal(err, "KAFKA_BROKERS and REDPANDA_BROKERS are both set and differ "
                             "(\"k:9092\" vs \"rp:9092\"); set only one");
}

static void test_production_rules(void **state)
{
    static const char *const refused_default =
        "ENVIRONMENT=production refuses the default DATABASE_URL "
        "(postgresql://payment:***@localhost:5432/payment_db); set DATABASE_URL to the production "
        "database";
    static const char *const no_password = "ENVIRONMENT=production requires a password in "
                                           "DATABASE_URL (postgresql://user:password@host:port/db)";
    static const struct {
        const char *env, *url, *err;
    } cases[] = {
        {"ENVIRONMENT=production", NULL, refused_default},
        {"ENVIRONMENT=PRODUCTION",
         "DATABASE_URL=postgresql+asyncpg://payment:payment@localhost:5432/payment_db",
         refused_default},
        {"ENVIRONMENT=production", "DATABASE_URL=postgresql://app@db/ledger", no_password},
        {"ENVIRONMENT=production", "DATABASE_URL=postgresql://app:@db/ledger", no_password},
        {"ENVIRONMENT=production", "DATABASE_URL=postgresql://app:Str0ng@db/ledger", NULL},
        {"ENVIRONMENT=staging", NULL, NULL},
        {"ENVIRONMENT=test", "DATABASE_URL=postgresql://app@db/ledger", NULL},
        {"ENVIRONMENT=Development", NULL, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        paymentd_settings_t s;
        char *env[] = {(char *)cases[i].env, (char *)cases[i].url, NULL};
        int rc = load(&s, env, NULL);
        if (cases[i].err) {
            if (rc != -EINVAL)
                fail_msg("%s %s accepted", cases[i].env, cases[i].url ? cases[i].url : "");
            assert_string_equal(err, cases[i].err);
        } else {
            if (rc != 0)
                fail_msg("%s %s: %s", cases[i].env, cases[i].url ? cases[i].url : "", err);
            paymentd_settings_free(&s);
        }
    }
    paymentd_settings_t s;
    char *env[] = {"ENVIRONMENT=production", "DATABASE_URL=postgresql://app:Str0ng@db/ledger",
                   NULL};
    assert_int_equal(load(&s, env, NULL), 0);
    assert_int_equal(s.environment, PAYMENTD_ENV_PRODUCTION);
    paymentd_settings_free(&s);
}

static void test_cross_rules(void **state)
{
    paymentd_settings_t s;
    char *e1[] = {"OUTBOX_BASE_DELAY_SECONDS=120", NULL};
    assert_int_equal(load(&s, e1, NULL), -EINVAL);
    assert_string_equal(
        err, "OUTBOX_BASE_DELAY_SECONDS (120) must not exceed OUTBOX_MAX_DELAY_SECONDS (60)");

    char *e2[] = {"GRPC_PORT=9090", NULL};
    assert_int_equal(load(&s, e2, NULL), -EINVAL);
    assert_string_equal(err, "GRPC_PORT and METRICS_PORT are both 9090; they need different ports");

    char *e3[] = {"GRPC_PORT=9090", "METRICS_ENABLED=no", NULL};
    assert_int_equal(load(&s, e3, NULL), 0);
    paymentd_settings_free(&s);

    char *e4[] = {"GRPC_PORT=0", "METRICS_PORT=0", NULL};
    assert_int_equal(load(&s, e4, NULL), 0);
    assert_int_equal(s.grpc_port, 0);
    assert_int_equal(s.metrics_port, 0);
    paymentd_settings_free(&s);
}

static void test_help(void **state)
{
    paymentd_settings_t s;
    char *args[] = {"--grpc-port", "bogus", "--help", NULL};
    assert_int_equal(load(&s, NULL, args), PAYMENTD_SETTINGS_HELP);

    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    paymentd_settings_help(m);
    fclose(m);
    for (size_t v = 0; v < sizeof all_vars / sizeof all_vars[0]; v++) {
        char flag[128];
        flag_of(flag, sizeof flag, all_vars[v]);
        if (strcmp(all_vars[v], "REDPANDA_BROKERS") == 0) {
            assert_non_null(strstr(
                text, "env KAFKA_BROKERS (alias REDPANDA_BROKERS); default: localhost:19092\n"));
            continue;
        }
        char line[256];
        snprintf(line, sizeof line, "  %s <", flag);
        if (strstr(text, line) == NULL)
            fail_msg("help lacks %s", flag);
        snprintf(line, sizeof line, "      env %s", all_vars[v]);
        if (strstr(text, line) == NULL)
            fail_msg("help lacks %s", all_vars[v]);
    }
    assert_non_null(strstr(text, "  --database-url <text>\n      env DATABASE_URL; default: "
                                 "postgresql://payment:***@localhost:5432/payment_db\n"));
    assert_non_null(
        strstr(text, "  --grpc-port <integer 0..65535>\n      env GRPC_PORT; default: 50051\n"));
    assert_non_null(strstr(
        text,
        "  --log-level <DEBUG|INFO|WARNING|WARN|ERROR>\n      env LOG_LEVEL; default: INFO\n"));
    assert_non_null(strstr(text, "  --rate-limit-trusted-proxies <text>\n      env "
                                 "RATE_LIMIT_TRUSTED_PROXIES; default: empty\n"));
    free(text);
}

static void test_effective_config_logged_masked(void **state)
{
    paymentd_settings_t s;
    char *env[] = {"DATABASE_URL=postgresql://app:DbS3cret@db:5432/ledger",
                   "REDIS_URL=redis://:RdS3cret@r:6379/1", "GRPC_PORT=0", NULL};
    assert_int_equal(load(&s, env, NULL), 0);
    int p[2];
    assert_int_equal(pipe(p), 0);
    log_init(LOG_INFO, LOG_FORMAT_JSON);
    int old = log_set_fd(p[1]);
    paymentd_settings_log(&s);
    log_init(LOG_INFO, LOG_FORMAT_CONSOLE);
    paymentd_settings_log(&s);
    log_set_fd(old);
    log_init(LOG_INFO, LOG_FORMAT_JSON);
    close(p[1]);
    char buf[32768];
    size_t n = 0;
    ssize_t r;
    while ((r = read(p[0], buf + n, sizeof buf - 1 - n)) > 0)
        n += (size_t)r;
    close(p[0]);
    buf[n] = '\0';
    assert_null(strstr(buf, "DbS3cret"));
    assert_null(strstr(buf, "RdS3cret"));
    assert_non_null(strstr(buf, "\"DATABASE_URL\":\"postgresql://app:***@db:5432/ledger\""));
    assert_non_null(strstr(buf, "\"REDIS_URL\":\"redis://:***@r:6379/1\""));
    assert_non_null(strstr(buf, "\"GRPC_PORT\":\"0\""));
    assert_non_null(strstr(buf, "\"MAX_AMOUNT_CENTS\":\"1000000000000000\""));
    assert_non_null(
        strstr(buf, "\"overridden\":\"DATABASE_URL=env,REDIS_URL=env,GRPC_PORT=env\"}\n"));
    assert_non_null(strstr(
        buf, " DATABASE_URL=postgresql://app:***@db:5432/ledger REDIS_URL=redis://:***@r:6379/1 "));
    paymentd_settings_free(&s);
}

static void test_process_environment(void **state)
{
    paymentd_settings_t s;
    setenv("GRPC_PORT", "6001", 1);
    setenv("IDEMPOTENCY_SCOPE", "CLIENT", 1);
    char *argv[] = {"paymentd", "--db-pool-size", "2", NULL};
    int rc = paymentd_settings_load(&s, 3, argv, err, sizeof err);
    unsetenv("GRPC_PORT");
    unsetenv("IDEMPOTENCY_SCOPE");
    if (rc != 0)
        fail_msg("%s", err);
    assert_int_equal(s.grpc_port, 6001);
    assert_int_equal(s.idempotency_scope, PAYMENTD_IDEMPOTENCY_CLIENT);
    assert_int_equal(s.db_pool_size, 2);
    paymentd_settings_free(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_are_the_design),
        cmocka_unit_test(test_every_variable_has_invalid_cases),
        cmocka_unit_test(test_invalid_values_env),
        cmocka_unit_test(test_invalid_values_flags),
        cmocka_unit_test(test_topic_prefix_length),
        cmocka_unit_test(test_too_many_proxies),
        cmocka_unit_test(test_database_url_forms),
        cmocka_unit_test(test_redis_url_forms),
        cmocka_unit_test(test_lists),
        cmocka_unit_test(test_flags_override_env),
        cmocka_unit_test(test_booleans),
        cmocka_unit_test(test_kafka_alias),
        cmocka_unit_test(test_production_rules),
        cmocka_unit_test(test_cross_rules),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_effective_config_logged_masked),
        cmocka_unit_test(test_process_environment),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
