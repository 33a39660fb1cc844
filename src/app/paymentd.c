/*
 * paymentd: the payment ledger server.
 *
 * Start-up: settings (environment and flags, DESIGN.md §2), logging, the supervisor and
 * its actors, then the gRPC server (payment API, health, reflection v1 and v1alpha) on
 * GRPC_HOST:GRPC_PORT. Port 0 picks a free port; the log line "grpc listening on H:P"
 * (field grpc_port) and --port-file F tell which.
 *
 * The database: the embedded migrations are applied at start (pg_migrate, under its
 * advisory lock); if PostgreSQL cannot be reached yet the server still starts and the main
 * loop retries every second, while the ledger actors answer UNAVAILABLE.
 *
 * The main thread then waits for SIGTERM/SIGINT (blocked in every thread, taken with
 * sigtimedwait), waking once a second to mirror health: SERVING when the migrations are
 * applied, the critical actors run and every ledger connection is up. Shutdown:
 * health NOT_SERVING (Watch streams see it) → stop accepting → in-flight calls finish
 * within SHUTDOWN_GRACE_SECONDS → mailboxes drain (supervisor_shutdown; calls still held
 * at its deadline end UNAVAILABLE) → remaining calls (open streams) are cancelled → the
 * server and gRPC are torn down → exit 0.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "actors/ledger.h"
#include "actors/payment_api.h"
#include "actors/ratelimit.h"
#include "app/paymentd_settings.h"
#include "io/grpc_server.h"
#include "io/health.h"
#include "io/migrations.h"
#include "io/pg.h"
#include "io/reflection.h"
#include "runtime/log.h"
#include "runtime/msg.h"
#include "runtime/supervisor.h"
#include "version.h"

#define MOD "paymentd"

/* Served services, in the order reflection's list_services reports them. */
static const char *const SERVICES[] = {
    PAYMENT_SERVICE_NAME,
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
};
#define NSERVICES (sizeof(SERVICES) / sizeof(SERVICES[0]))

/* Flags of the program itself, not settings: taken out of argv before the settings. */
typedef struct app_flags {
    const char *port_file;
    bool version;
} app_flags_t;

static int take_app_flags(app_flags_t *f, int *argc, char **argv, char *err, size_t errlen)
{
    int out = 1;
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--version") == 0) {
            f->version = true;
        } else if (strncmp(a, "--port-file=", 12) == 0) {
            f->port_file = a + 12;
        } else if (strcmp(a, "--port-file") == 0) {
            if (i + 1 >= *argc) {
                snprintf(err, errlen, "--port-file: missing value (expected a file path)");
                return -EINVAL;
            }
            f->port_file = argv[++i];
        } else {
            argv[out++] = argv[i];
            continue;
        }
        if (f->port_file && !*f->port_file) {
            snprintf(err, errlen, "--port-file: \"\" is not a file path");
            return -EINVAL;
        }
    }
    argv[out] = NULL;
    *argc = out;
    return 0;
}

/* Writes the port atomically (temporary file + rename): a reader never sees half. */
static int write_port_file(const char *path, int port)
{
    char tmp[4200];
    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= sizeof(tmp))
        return -ENAMETOOLONG;
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -errno;
    int rc = 0;
    if (fprintf(f, "%d\n", port) < 0)
        rc = -EIO;
    if (fclose(f) != 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -errno;
    if (rc < 0)
        unlink(tmp);
    return rc;
}

static void on_call_finished(void *arg, const char *method, grpc_status_code code,
                             uint64_t duration_ns)
{
    /* The metrics actor will count these; for now a DEBUG line. */
    LOG_DEBUG("grpc", "%s %s %.3f ms", method, rpc_status_name(code), duration_ns / 1e6);
}

static int respond_reflection(void *arg, const uint8_t *req, size_t req_len, uint8_t **resp,
                              size_t *resp_len)
{
    return reflection_respond(arg, req, req_len, resp, resp_len);
}

/* The rate limiter's next hop: the ledger router. */
static int forward_to_ledger(void *arg, payment_msg_t *m)
{
    return payment_api_dispatch(arg, m);
}

/* RATE_LIMIT_ENABLED: the rate limiter becomes the first hop of every valid request. */
static int add_ratelimit(ratelimit_t **out, supervisor_t *sup, const paymentd_settings_t *cfg,
                         payment_api_t *api)
{
    ratelimit_config_t rcfg = {
        .redis_host = cfg->redis.host,
        .redis_port = cfg->redis.port,
        .redis_user = cfg->redis.user,
        .redis_password = cfg->redis.password,
        .redis_db = cfg->redis.db,
        .max_requests = cfg->rate_limit_max_requests,
        .window_seconds = cfg->rate_limit_window_seconds,
        .fail_open = cfg->rate_limit_fail_open,
        .timeout_ms = cfg->rate_limit_timeout_ms,
        .method_limit = {0, cfg->limit_authorize_payment, cfg->limit_get_payment,
                         cfg->limit_get_account_balance},
        .forward = forward_to_ledger,
        .forward_arg = api,
    };
    ratelimit_net_t nets[RATELIMIT_MAX_TRUSTED];
    for (size_t i = 0; i < cfg->trusted_proxies_n && i < RATELIMIT_MAX_TRUSTED; i++) {
        nets[i].family = cfg->trusted_proxies[i].family;
        memcpy(nets[i].addr, cfg->trusted_proxies[i].addr, 16);
        nets[i].prefix_len = cfg->trusted_proxies[i].prefix_len;
        rcfg.ntrusted = i + 1;
    }
    rcfg.trusted = nets;
    int rc = ratelimit_actor_add(out, sup, &rcfg);
    if (rc == 0)
        api->target = ratelimit_actor(*out);
    return rc;
}

static uint64_t seconds_ns(double s)
{
    return s <= 0 ? 0 : (uint64_t)(s * 1e9);
}

/* Applies the embedded migrations (pg_migrate: advisory lock, so several instances may
 * start at once) and opens the ledger's gate. False when the database cannot be reached
 * yet: the main loop retries every tick, health stays NOT_SERVING meanwhile. */
static bool migrate_database(const paymentd_settings_t *cfg, ledger_pool_t *ledger)
{
    char err[768];
    PGconn *c = NULL;
    static bool warned; /* main thread only: one warning per start, not one per tick */
    int rc = pg_connect(&c, cfg->database_url, "paymentd-migrate", 2000, err, sizeof(err));
    if (rc < 0) {
        if (!warned)
            LOG_WARNING(MOD, "migrations not applied yet (retrying every second): %s", err);
        warned = true;
        return false;
    }
    pg_migrate_result_t res;
    rc = pg_migrate(c, migrations_all(), 10000, NULL, NULL, &res, err, sizeof(err));
    PQfinish(c);
    if (rc < 0) {
        LOG_ERROR(MOD, "migrations failed: %s", err);
        return false;
    }
    LOG_INFO(MOD, "database schema version %d (%d migrations applied now, %d already)", res.version,
             res.applied, res.already);
    ledger_pool_set_schema_ready(ledger, true);
    return true;
}

/* Health: the critical actors run, the schema is there, and every ledger connection is up. */
static bool serving(const supervisor_t *sup, const ledger_pool_t *ledger, bool migrated)
{
    return migrated && supervisor_healthy(sup) && ledger_pool_db_up(ledger);
}

int main(int argc, char **argv)
{
    char err[512];
    app_flags_t flags = {0};
    if (take_app_flags(&flags, &argc, argv, err, sizeof(err)) < 0) {
        fprintf(stderr, "paymentd: %s\n", err);
        return 2;
    }
    if (flags.version) {
        printf("paymentd %s\n", PAY_VERSION);
        return 0;
    }
    paymentd_settings_t cfg;
    int rc = paymentd_settings_load(&cfg, argc, argv, err, sizeof(err));
    if (rc == PAYMENTD_SETTINGS_HELP) {
        printf("Usage: paymentd [--version] [--port-file FILE] [SETTING FLAGS]\n\n"
               "  --version          print the version and exit\n"
               "  --port-file FILE   write the bound gRPC port to FILE once listening\n\n");
        paymentd_settings_help(stdout);
        return 0;
    }
    if (rc < 0) {
        fprintf(stderr, "paymentd: %s\n", err);
        return 2;
    }
    log_init(cfg.log_level, cfg.log_format);
    LOG_INFO(MOD, "paymentd %s starting", PAY_VERSION);
    paymentd_settings_log(&cfg);

    /* Every thread created from here on inherits the mask: only the main takes them. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    int exit_code = 1;
    supervisor_t *sup = NULL;
    reflection_t *refl = NULL;
    rpc_server_t *srv = NULL;
    bool health_ready = false, sup_started = false;
    payment_api_t api = {0};
    ledger_pool_t *ledger = NULL;
    ratelimit_t *ratelimit = NULL;
    bool migrated = false;

    if ((rc = health_init(SERVICES, 1)) < 0) {
        LOG_ERROR(MOD, "cannot initialize health: %s", strerror(-rc));
        goto cleanup;
    }
    health_ready = true;
    if ((rc = supervisor_create(&sup, NULL)) < 0) {
        LOG_ERROR(MOD, "cannot create the supervisor: %s", strerror(-rc));
        goto cleanup;
    }
    ledger_config_t lcfg = {
        .batch_max = (size_t)cfg.ledger_batch_max,
        .conninfo = cfg.database_url,
        .pool_size = (unsigned)cfg.db_pool_size,
        .idempotency_per_client = cfg.idempotency_scope == PAYMENTD_IDEMPOTENCY_CLIENT,
        .idempotency_ttl_hours = cfg.idempotency_ttl_hours,
        .max_amount_cents = cfg.max_amount_cents,
        .statement_timeout_ns = (uint64_t)cfg.db_statement_timeout_ms * 1000000ull,
    };
    /* Added first, so shutdown drains it first, into ledger mailboxes still open. */
    if (cfg.rate_limit_enabled && (rc = add_ratelimit(&ratelimit, sup, &cfg, &api)) < 0) {
        LOG_ERROR(MOD, "cannot add the rate limiter: %s", strerror(-rc));
        goto cleanup;
    }
    rc = ledger_pool_add(&ledger, sup, &lcfg);
    if (rc < 0) {
        LOG_ERROR(MOD, "cannot add the ledger actors: %s", strerror(-rc));
        goto cleanup;
    }
    api.route = ledger_pool_route;
    api.route_ctx = ledger;
    if ((rc = supervisor_start(sup)) < 0) {
        LOG_ERROR(MOD, "cannot start the actors: %s", strerror(-rc));
        goto cleanup;
    }
    sup_started = true;
    /* Before listening: a server that announces its port is ready when the database is. */
    migrated = migrate_database(&cfg, ledger);
    for (int i = 0; migrated && i < 300 && !ledger_pool_db_up(ledger); i++)
        nanosleep(&(struct timespec){.tv_nsec = 10000000}, NULL);
    if ((rc = reflection_create(&refl, pay_descriptor_set, pay_descriptor_set_len, SERVICES,
                                NSERVICES)) < 0) {
        LOG_ERROR(MOD, "cannot index the embedded descriptors for reflection: %s", strerror(-rc));
        goto cleanup;
    }
    rpc_server_config_t scfg = {
        .host = cfg.grpc_host,
        .port = (int)cfg.grpc_port,
        .cq_threads = (unsigned)cfg.grpc_cq_threads,
        .max_receive_bytes = (size_t)cfg.grpc_max_receive_bytes,
    };
    if ((rc = rpc_server_create(&srv, &scfg)) < 0) {
        LOG_ERROR(MOD, "cannot create the gRPC server: %s", strerror(-rc));
        goto cleanup;
    }
    if ((rc = health_register(srv)) < 0 || (rc = payment_api_register(srv, &api)) < 0 ||
        (rc = rpc_server_add_responder(
             srv, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
             respond_reflection, refl)) < 0 ||
        (rc = rpc_server_add_responder(srv,
                                       "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                       respond_reflection, refl)) < 0) {
        LOG_ERROR(MOD, "cannot register the gRPC methods: %s", strerror(-rc));
        goto cleanup;
    }
    rpc_server_set_finish_hook(srv, on_call_finished, NULL);
    if ((rc = rpc_server_start(srv)) < 0) {
        LOG_ERROR(MOD, "cannot listen on %s:%lld for gRPC: %s", cfg.grpc_host,
                  (long long)cfg.grpc_port, strerror(-rc));
        goto cleanup;
    }
    /* Set before the port is announced, so whoever learns the port finds the server
     * SERVING when the database is there. */
    health_set_serving(serving(sup, ledger, migrated));
    int port = rpc_server_port(srv);
    char port_s[16];
    snprintf(port_s, sizeof(port_s), "%d", port);
    char listening[300];
    snprintf(listening, sizeof(listening), "grpc listening on %s:%d", cfg.grpc_host, port);
    log_kv(LOG_INFO, MOD, listening, "grpc_host", cfg.grpc_host, "grpc_port", port_s, NULL);
    if (flags.port_file && (rc = write_port_file(flags.port_file, port)) < 0) {
        LOG_ERROR(MOD, "cannot write the port file %s: %s", flags.port_file, strerror(-rc));
        goto cleanup;
    }

    int sig;
    for (;;) {
        struct timespec tick = {.tv_sec = 1};
        sig = sigtimedwait(&sigs, NULL, &tick);
        if (sig == SIGTERM || sig == SIGINT)
            break;
        if (!migrated)
            migrated = migrate_database(&cfg, ledger);
        health_set_serving(serving(sup, ledger, migrated));
    }
    LOG_INFO(MOD, "%s: shutting down (grace %.1f s)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
             cfg.shutdown_grace_seconds);

    health_shutdown();
    rpc_server_stop_accepting(srv);
    uint64_t grace_end = time_now_ns() + seconds_ns(cfg.shutdown_grace_seconds);
    if (rpc_server_wait_idle(srv, grace_end) < 0)
        LOG_WARNING(MOD, "%zu calls still in flight after the grace period",
                    rpc_server_inflight(srv));
    /* Drain the mailboxes; what an actor still holds at the deadline is failed back, so
     * its caller gets UNAVAILABLE (retry elsewhere) rather than a bare cancellation. */
    if (supervisor_shutdown(sup, time_now_ns() + 2000000000u) < 0)
        LOG_WARNING(MOD, "actors did not drain in time; their work was failed back");
    /* rpc_server_destroy (below) cancels what is left (open streams), lets the clients
     * close their connections, and tears the server down. */
    exit_code = 0;

cleanup:
    if (srv)
        rpc_server_destroy(srv);
    if (sup_started && exit_code != 0)
        supervisor_shutdown(sup, time_now_ns() + 2000000000u);
    if (sup)
        supervisor_destroy(sup);
    ledger_pool_free(ledger);
    ratelimit_destroy(ratelimit);
    reflection_destroy(refl);
    if (health_ready)
        health_fini();
    paymentd_settings_free(&cfg);
    if (exit_code == 0)
        LOG_INFO(MOD, "stopped");
    return exit_code;
}
