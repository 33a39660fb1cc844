/*
 * paymentctl: the operator tool (DESIGN.md §2 Commands). Migrations, accounts, the outbox's
 * state and the ledger's invariants, against the database paymentd uses (DATABASE_URL).
 *
 * Results go to stdout, errors to stderr as one line `paymentctl: error: ...`.
 * Exit status: 0 success; 1 the operation failed (database unreachable, account missing,
 * a ledger check fault, ...); 2 the invocation is wrong (arguments, options, environment).
 *
 * Single-threaded; one connection per run.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "actors/ledger_store.h"
#include "io/migrations.h"
#include "io/pg.h"
#include "runtime/log.h"

#define DEFAULT_DATABASE_URL "postgresql://payment:payment@localhost:5432/payment_db"
#define EXIT_FAIL            1
#define EXIT_USAGE           2

static const char usage_text[] =
    "Usage: paymentctl [OPTIONS] COMMAND [ARGS]\n"
    "\n"
    "Operator tool of the payment ledger. Reads the same environment as paymentd.\n"
    "\n"
    "Commands:\n"
    "  migrate                              apply the pending database migrations (safe to run\n"
    "                                       from several processes at once)\n"
    "  account open ID --currency CUR [--owner NAME]\n"
    "                                       open a customer account with a zero balance; a no-op\n"
    "                                       when it exists with the same currency and owner\n"
    "  account fund ID CENTS                move CENTS from the currency's funding account\n"
    "                                       (sys:funding:CUR) to ID, as an AUTHORIZED payment\n"
    "  account show ID                      currency, owner, status, balance and entry count\n"
    "  outbox status                        pending, published, failed and dead-lettered events,\n"
    "                                       and the age of the oldest pending one\n"
    "  ledger check                         verify every ledger invariant; one line per fault,\n"
    "                                       exit status 1 when any fails\n"
    "\n"
    "Options:\n"
    "  --database-url URL       PostgreSQL URL: postgresql://, postgres:// or\n"
    "                           postgresql+asyncpg:// (env DATABASE_URL; default\n"
    "                           " DEFAULT_DATABASE_URL ")\n"
    "  --connect-timeout SECS   give up connecting after SECS seconds (default 10)\n"
    "  --lock-timeout SECS      migrate: wait at most SECS for another migrator (default 60)\n"
    "  -h, --help               this help\n"
    "\n"
    "Environment:\n"
    "  DATABASE_URL             as --database-url\n"
    "  MAX_AMOUNT_CENTS         largest amount one funding may move (default 1000000000000000)\n"
    "  ENVIRONMENT              production refuses the default DATABASE_URL and one without a\n"
    "                           password\n"
    "\n"
    "Exit status: 0 success, 1 failure (including a failed ledger check), 2 invalid\n"
    "invocation (arguments, options or environment).\n";

typedef struct opts {
    const char *database_url;
    const char *currency;
    const char *owner;
    double connect_timeout;
    double lock_timeout;
    bool have_currency, have_owner;
    const char *pos[8]; /* positional arguments */
    int npos;
} opts_t;

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "paymentctl: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\nTry 'paymentctl --help'.\n");
    va_end(ap);
    return EXIT_USAGE;
}

static int fail(const char *msg)
{
    fprintf(stderr, "paymentctl: error: %s\n", msg);
    return EXIT_FAIL;
}

static int parse_seconds(double *out, const char *flag, const char *v)
{
    char *end = NULL;
    errno = 0;
    double d = v ? strtod(v, &end) : 0;
    if (!v || !*v || errno || *end || !(d > 0) || d > 86400) {
        usage_error("%s: \"%s\" is not a number of seconds in (0, 86400]", flag, v ? v : "");
        return -EINVAL;
    }
    *out = d;
    return 0;
}

/* Strict decimal int64: digits with an optional leading '-'. */
static bool parse_i64(int64_t *out, const char *s)
{
    char *end = NULL;
    if (!s || !*s || !((*s >= '0' && *s <= '9') || (*s == '-' && s[1] >= '0' && s[1] <= '9')))
        return false;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

/* A value for an option: `--opt=value` or the next argument. */
static const char *opt_value(int argc, char **argv, int *i, const char *arg, size_t namelen)
{
    if (arg[namelen] == '=')
        return arg + namelen + 1;
    if (*i + 1 < argc)
        return argv[++*i];
    return NULL;
}

/* 0, 1 for --help, or EXIT_USAGE (already reported). */
static int parse_args(opts_t *o, int argc, char **argv)
{
    bool only_pos = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool negative_number = a[0] == '-' && a[1] >= '0' && a[1] <= '9';
        if (only_pos || a[0] != '-' || a[1] == '\0' || negative_number) {
            if (o->npos == (int)(sizeof o->pos / sizeof o->pos[0]))
                return usage_error("too many arguments");
            o->pos[o->npos++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_pos = true;
            continue;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0)
            return 1;
        static const char *const names[] = {"--database-url",    "--currency",     "--owner",
                                            "--connect-timeout", "--lock-timeout", NULL};
        int which = -1;
        size_t len = 0;
        for (int k = 0; names[k]; k++) {
            len = strlen(names[k]);
            if (strncmp(a, names[k], len) == 0 && (a[len] == '\0' || a[len] == '=')) {
                which = k;
                break;
            }
        }
        if (which < 0)
            return usage_error("unknown option \"%s\"", a);
        const char *v = opt_value(argc, argv, &i, a, len);
        if (!v)
            return usage_error("option %s needs a value", names[which]);
        switch (which) {
        case 0:
            o->database_url = v;
            break;
        case 1:
            o->currency = v;
            o->have_currency = true;
            break;
        case 2:
            o->owner = v;
            o->have_owner = true;
            break;
        case 3:
            if (parse_seconds(&o->connect_timeout, names[which], v) < 0)
                return EXIT_USAGE;
            break;
        case 4:
            if (parse_seconds(&o->lock_timeout, names[which], v) < 0)
                return EXIT_USAGE;
            break;
        }
    }
    return 0;
}

/* ---- connecting ------------------------------------------------------------------------ */

static int connect_db(PGconn **out, const opts_t *o)
{
    char err[1024];
    char masked[512];
    char *conninfo = NULL;
    const char *url = o->database_url ? o->database_url : getenv("DATABASE_URL");
    const char *source = o->database_url ? "--database-url" : "DATABASE_URL";
    if (!url)
        url = DEFAULT_DATABASE_URL;

    if (pg_url_to_conninfo(&conninfo, url, err, sizeof err) < 0) {
        fprintf(stderr, "paymentctl: error: %s: %s\n", source, err);
        return EXIT_USAGE;
    }
    const char *env = getenv("ENVIRONMENT");
    if (env && strcasecmp(env, "production") == 0) {
        PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
        bool has_password = false;
        for (PQconninfoOption *p = opts; p && p->keyword; p++)
            if (strcmp(p->keyword, "password") == 0 && p->val && *p->val)
                has_password = true;
        PQconninfoFree(opts);
        if (strcmp(url, DEFAULT_DATABASE_URL) == 0 || !has_password) {
            fprintf(stderr,
                    "paymentctl: error: %s: ENVIRONMENT=production refuses the default database "
                    "URL and URLs without a password\n",
                    source);
            free(conninfo);
            return EXIT_USAGE;
        }
    }
    int rc =
        pg_connect(out, conninfo, "paymentctl", (int)(o->connect_timeout * 1000), err, sizeof err);
    free(conninfo);
    if (rc < 0) {
        log_mask_url(masked, sizeof masked, url);
        fprintf(stderr, "paymentctl: error: %s (%s %s)\n", err, source, masked);
        return EXIT_FAIL;
    }
    return 0;
}

/* ---- commands -------------------------------------------------------------------------- */

static void print_applied(const char *name, double ms, void *arg)
{
    (void)arg;
    printf("migrate: applied %s (%.1f ms)\n", name, ms);
    fflush(stdout);
}

static int cmd_migrate(PGconn *c, const opts_t *o)
{
    char err[1024];
    pg_migrate_result_t res;
    int rc = pg_migrate(c, migrations_all(), (int)(o->lock_timeout * 1000), print_applied, NULL,
                        &res, err, sizeof err);
    if (rc < 0)
        return fail(err);
    printf("migrate: %d applied, %d already applied; schema version %d\n", res.applied, res.already,
           res.version);
    if (res.unknown > 0)
        printf("migrate: warning: the database has %d applied migration(s) this binary does not "
               "know (a newer schema)\n",
               res.unknown);
    return 0;
}

static int exit_for(int rc)
{
    return rc == -EINVAL ? EXIT_USAGE : EXIT_FAIL;
}

static int cmd_account_open(PGconn *c, const opts_t *o)
{
    char err[1024];
    bool created = false;
    const char *id = o->pos[2];
    int rc = ledger_store_open_account(c, &created, id, o->currency,
                                       o->have_owner ? o->owner : NULL, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "paymentctl: error: %s\n", err);
        return exit_for(rc);
    }
    if (created)
        printf("account %s opened (%s)\n", id, o->currency);
    else
        printf("account %s already exists (%s); nothing to do\n", id, o->currency);
    return 0;
}

static int64_t max_amount_cents(bool *ok)
{
    const char *s = getenv("MAX_AMOUNT_CENTS");
    int64_t v = LEDGER_MAX_AMOUNT_CENTS;
    *ok = true;
    if (s && (!parse_i64(&v, s) || v < 1)) {
        fprintf(stderr,
                "paymentctl: error: MAX_AMOUNT_CENTS: \"%s\" is not an integer in "
                "1..9223372036854775807\n",
                s);
        *ok = false;
    }
    return v;
}

static int cmd_account_fund(PGconn *c, const opts_t *o, int64_t amount, int64_t max)
{
    char err[1024];
    ledger_fund_result_t res;
    const char *id = o->pos[2];
    int rc = ledger_store_fund_account(c, &res, id, amount, max, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "paymentctl: error: %s\n", err);
        return exit_for(rc);
    }
    printf("account %s funded with %" PRId64 " cents by payment %s from %s; balance %" PRId64
           " cents\n",
           id, amount, res.payment_id, res.funding_account, res.balance_cents);
    return 0;
}

static int cmd_account_show(PGconn *c, const opts_t *o)
{
    char err[1024];
    ledger_account_t a;
    int rc = ledger_store_get_account(c, &a, o->pos[2], err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "paymentctl: error: %s\n", err);
        return exit_for(rc);
    }
    printf("id: %s\n", a.id);
    printf("currency: %s\n", a.currency);
    printf("owner: %s\n", a.has_owner ? a.owner : "");
    printf("kind: %s\n", a.kind);
    printf("status: %s\n", a.status);
    printf("balance_cents: %" PRId64 "\n", a.balance_cents);
    printf("entries: %" PRId64 "\n", a.entries);
    printf("created_at: %s\n", a.created_at);
    printf("updated_at: %s\n", a.updated_at);
    return 0;
}

static int cmd_outbox_status(PGconn *c)
{
    char err[1024];
    ledger_outbox_status_t s;
    int rc = ledger_store_outbox_status(c, &s, err, sizeof err);
    if (rc < 0)
        return fail(err);
    printf("pending: %" PRId64 "\n", s.pending);
    printf("published: %" PRId64 "\n", s.published);
    printf("failed: %" PRId64 "\n", s.failed);
    printf("dead_lettered: %" PRId64 "\n", s.dead_lettered);
    printf("claimed: %" PRId64 "\n", s.claimed);
    if (s.oldest_pending_age_seconds < 0)
        printf("oldest_pending_age_seconds: none\n");
    else
        printf("oldest_pending_age_seconds: %.3f\n", s.oldest_pending_age_seconds);
    return 0;
}

static void print_fault(const char *line, void *arg)
{
    (void)arg;
    printf("%s\n", line);
}

static int cmd_ledger_check(PGconn *c)
{
    char err[1024];
    ledger_check_result_t res;
    int rc = ledger_store_check(c, &res, print_fault, NULL, err, sizeof err);
    if (rc < 0)
        return fail(err);
    if (res.faults > 0) {
        printf("ledger check: FAILED (%" PRId64 " fault%s; %" PRId64 " accounts, %" PRId64
               " payments, %" PRId64 " entries)\n",
               res.faults, res.faults == 1 ? "" : "s", res.accounts, res.payments, res.entries);
        return EXIT_FAIL;
    }
    printf("ledger check: OK (%" PRId64 " accounts, %" PRId64 " payments, %" PRId64 " entries)\n",
           res.accounts, res.payments, res.entries);
    return 0;
}

/* ---- main ------------------------------------------------------------------------------ */

enum command { CMD_MIGRATE, CMD_OPEN, CMD_FUND, CMD_SHOW, CMD_OUTBOX, CMD_CHECK };

int main(int argc, char **argv)
{
    opts_t o = {.connect_timeout = 10, .lock_timeout = 60};
    int rc = parse_args(&o, argc, argv);
    if (rc == 1) {
        fputs(usage_text, stdout);
        return 0;
    }
    if (rc != 0)
        return rc;
    if (o.npos == 0)
        return usage_error("missing command (migrate, account, outbox or ledger)");

    const char *c0 = o.pos[0];
    const char *c1 = o.npos > 1 ? o.pos[1] : NULL;
    enum command cmd;
    int want_pos;
    if (strcmp(c0, "migrate") == 0) {
        cmd = CMD_MIGRATE;
        want_pos = 1;
    } else if (strcmp(c0, "account") == 0) {
        if (!c1)
            return usage_error("account: missing subcommand (open, fund or show)");
        if (strcmp(c1, "open") == 0) {
            cmd = CMD_OPEN;
            want_pos = 3;
        } else if (strcmp(c1, "fund") == 0) {
            cmd = CMD_FUND;
            want_pos = 4;
        } else if (strcmp(c1, "show") == 0) {
            cmd = CMD_SHOW;
            want_pos = 3;
        } else {
            return usage_error("account: unknown subcommand \"%s\" (expected open, fund or show)",
                               c1);
        }
    } else if (strcmp(c0, "outbox") == 0) {
        if (!c1 || strcmp(c1, "status") != 0)
            return usage_error("outbox: expected the subcommand status");
        cmd = CMD_OUTBOX;
        want_pos = 2;
    } else if (strcmp(c0, "ledger") == 0) {
        if (!c1 || strcmp(c1, "check") != 0)
            return usage_error("ledger: expected the subcommand check");
        cmd = CMD_CHECK;
        want_pos = 2;
    } else {
        return usage_error("unknown command \"%s\" (expected migrate, account, outbox or "
                           "ledger)",
                           c0);
    }

    /* Arguments and options the command takes, checked before connecting. */
    if (o.npos < want_pos) {
        if (cmd == CMD_FUND && o.npos == 3)
            return usage_error("account fund: missing CENTS (usage: account fund ID CENTS)");
        return usage_error("%s: missing ID", cmd == CMD_OPEN   ? "account open"
                                             : cmd == CMD_FUND ? "account fund"
                                                               : "account show");
    }
    if (o.npos > want_pos)
        return usage_error("unexpected argument \"%s\"", o.pos[want_pos]);
    if ((o.have_currency || o.have_owner) && cmd != CMD_OPEN)
        return usage_error("%s is only valid with account open",
                           o.have_currency ? "--currency" : "--owner");
    if (cmd == CMD_OPEN || cmd == CMD_FUND || cmd == CMD_SHOW) {
        if (!ledger_account_id_valid(o.pos[2]))
            return usage_error("account id \"%s\" is not 1-64 characters of [A-Za-z0-9_.:-]",
                               o.pos[2]);
    }
    if (cmd == CMD_OPEN) {
        if (!o.have_currency)
            return usage_error("account open: --currency is required (e.g. --currency USD)");
        if (!ledger_currency_valid(o.currency))
            return usage_error("--currency: \"%s\" is not three upper-case letters (e.g. USD)",
                               o.currency);
    }
    int64_t amount = 0, max = 0;
    if (cmd == CMD_FUND) {
        bool ok;
        max = max_amount_cents(&ok);
        if (!ok)
            return EXIT_USAGE;
        if (!parse_i64(&amount, o.pos[3]))
            return usage_error("account fund: CENTS \"%s\" is not a whole number of cents",
                               o.pos[3]);
        if (amount < 1 || amount > max) {
            char range[64];
            snprintf(range, sizeof range, "1..%" PRId64, max);
            return usage_error("account fund: CENTS %s is not in %s", o.pos[3], range);
        }
    }

    PGconn *c = NULL;
    rc = connect_db(&c, &o);
    if (rc != 0)
        return rc;
    switch (cmd) {
    case CMD_MIGRATE:
        rc = cmd_migrate(c, &o);
        break;
    case CMD_OPEN:
        rc = cmd_account_open(c, &o);
        break;
    case CMD_FUND:
        rc = cmd_account_fund(c, &o, amount, max);
        break;
    case CMD_SHOW:
        rc = cmd_account_show(c, &o);
        break;
    case CMD_OUTBOX:
        rc = cmd_outbox_status(c);
        break;
    case CMD_CHECK:
        rc = cmd_ledger_check(c);
        break;
    }
    PQfinish(c);
    fflush(stdout);
    return rc;
}
