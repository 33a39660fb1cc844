/*
 * ledger_store: see ledger_store.h and db/migrations/001_ledger.sql.
 *
 * DESIGN
 * Every function is one short transaction (or one statement) on a blocking connection.
 * Inputs are validated here first, so bad input gets a sentence about the input rather
 * than a constraint name; the schema's constraints stay the last line of defence.
 * `ledger check` runs each invariant as one query that formats its own fault lines, all
 * inside one REPEATABLE READ READ ONLY transaction: the queries see one snapshot, so
 * payments committed meanwhile cannot produce false faults. Sums are computed as numeric
 * so a corrupted amount cannot make the check itself fail with an overflow.
 */
#include "actors/ledger_store.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/pg.h"

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void copy_str(char *dst, size_t dstlen, const char *src)
{
    snprintf(dst, dstlen, "%s", src ? src : "");
}

static int64_t get_i64(const PGresult *r, int row, int col)
{
    return strtoll(PQgetvalue(r, row, col), NULL, 10);
}

bool ledger_account_id_valid(const char *id)
{
    size_t n = 0;
    if (!id)
        return false;
    for (; id[n]; n++) {
        char ch = id[n];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == ':' || ch == '-'))
            return false;
        if (n >= LEDGER_ACCOUNT_ID_MAX)
            return false;
    }
    return n >= 1;
}

bool ledger_currency_valid(const char *cur)
{
    if (!cur)
        return false;
    for (int i = 0; i < 3; i++)
        if (!(cur[i] >= 'A' && cur[i] <= 'Z'))
            return false;
    return cur[3] == '\0';
}

/* Characters of valid UTF-8 without control characters, or -1. */
static long utf8_chars(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    long chars = 0;
    while (*p) {
        unsigned c = *p;
        int len;
        uint32_t cp;
        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f)
                return -1;
            p++;
            chars++;
            continue;
        }
        if ((c & 0xe0) == 0xc0) {
            len = 2;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return -1;
        }
        for (int i = 1; i < len; i++) {
            if ((p[i] & 0xc0) != 0x80)
                return -1;
            cp = cp << 6 | (p[i] & 0x3f);
        }
        /* overlong forms, surrogates, beyond U+10FFFF, C1 controls */
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff || (cp >= 0x80 && cp < 0xa0))
            return -1;
        p += len;
        chars++;
    }
    return chars;
}

/* ---- accounts -------------------------------------------------------------------------- */

int ledger_store_open_account(PGconn *c, bool *created, const char *id, const char *currency,
                              const char *owner, char *err, size_t errlen)
{
    char why[768];
    PGresult *r = NULL;
    int rc;

    if (created)
        *created = false;
    if (!ledger_account_id_valid(id)) {
        seterr(err, errlen, "account id must be 1-64 characters of [A-Za-z0-9_.:-]");
        return -EINVAL;
    }
    if (strncmp(id, "sys:", 4) == 0) {
        seterr(err, errlen,
               "account id %s: ids starting with \"sys:\" are reserved for system "
               "accounts",
               id);
        return -EINVAL;
    }
    if (!ledger_currency_valid(currency)) {
        seterr(err, errlen, "currency must be three upper-case letters (ISO 4217, e.g. USD)");
        return -EINVAL;
    }
    if (owner) {
        long n = utf8_chars(owner);
        if (n < 1 || n > LEDGER_OWNER_MAX_CHARS) {
            seterr(err, errlen,
                   "owner must be 1-%d characters of UTF-8 without control "
                   "characters",
                   LEDGER_OWNER_MAX_CHARS);
            return -EINVAL;
        }
    }

    const char *params[] = {id, currency, owner};
    rc = pg_exec(c, &r,
                 "INSERT INTO accounts (id, currency, owner, kind) VALUES ($1, $2, $3, 'customer')"
                 " ON CONFLICT (id) DO NOTHING RETURNING id",
                 3, params, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    if (PQntuples(r) == 1) {
        PQclear(r);
        if (created)
            *created = true;
        return 0;
    }
    PQclear(r);

    /* It exists: identical is fine, anything else is a conflict worth naming. */
    rc = pg_exec(c, &r, "SELECT currency, owner, kind, status FROM accounts WHERE id = $1", 1,
                 params, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    if (PQntuples(r) != 1) { /* deleted meanwhile: accounts are never deleted */
        PQclear(r);
        seterr(err, errlen, "account %s: exists and vanished while being opened", id);
        return -EIO;
    }
    const char *have_cur = PQgetvalue(r, 0, 0);
    bool have_owner = !PQgetisnull(r, 0, 1);
    const char *have_owner_s = PQgetvalue(r, 0, 1);
    if (strcmp(have_cur, currency) != 0) {
        seterr(err, errlen, "account %s already exists with currency %s (not %s)", id, have_cur,
               currency);
        rc = -EEXIST;
    } else if (have_owner != (owner != NULL) || (owner && strcmp(have_owner_s, owner) != 0)) {
        if (have_owner)
            seterr(err, errlen, "account %s already exists with owner \"%s\"", id, have_owner_s);
        else
            seterr(err, errlen, "account %s already exists without an owner", id);
        rc = -EEXIST;
    } else {
        rc = 0;
    }
    PQclear(r);
    return rc;

sqlfail:
    seterr(err, errlen, "opening account %s: %s", id, why);
    return rc;
}

int ledger_store_get_account(PGconn *c, ledger_account_t *out, const char *id, char *err,
                             size_t errlen)
{
    char why[768];
    PGresult *r = NULL;
    memset(out, 0, sizeof *out);
    if (!ledger_account_id_valid(id)) {
        seterr(err, errlen, "account id must be 1-64 characters of [A-Za-z0-9_.:-]");
        return -EINVAL;
    }
    const char *params[] = {id};
    int rc = pg_exec(c, &r,
                     "SELECT a.id, a.currency, a.owner, a.status, a.kind, a.balance_cents,"
                     " pay_format_ts(a.created_at), pay_format_ts(a.updated_at),"
                     " (SELECT count(*) FROM ledger_entries e WHERE e.account_id = a.id)"
                     " FROM accounts a WHERE a.id = $1",
                     1, params, why, sizeof why);
    if (rc < 0) {
        seterr(err, errlen, "reading account %s: %s", id, why);
        return rc;
    }
    if (PQntuples(r) != 1) {
        PQclear(r);
        seterr(err, errlen, "account %s does not exist", id);
        return -ENOENT;
    }
    copy_str(out->id, sizeof out->id, PQgetvalue(r, 0, 0));
    copy_str(out->currency, sizeof out->currency, PQgetvalue(r, 0, 1));
    out->has_owner = !PQgetisnull(r, 0, 2);
    copy_str(out->owner, sizeof out->owner, PQgetvalue(r, 0, 2));
    copy_str(out->status, sizeof out->status, PQgetvalue(r, 0, 3));
    copy_str(out->kind, sizeof out->kind, PQgetvalue(r, 0, 4));
    out->balance_cents = get_i64(r, 0, 5);
    copy_str(out->created_at, sizeof out->created_at, PQgetvalue(r, 0, 6));
    copy_str(out->updated_at, sizeof out->updated_at, PQgetvalue(r, 0, 7));
    out->entries = get_i64(r, 0, 8);
    PQclear(r);
    return 0;
}

/* ---- funding --------------------------------------------------------------------------- */

typedef struct locked_account {
    char currency[4];
    char kind[9];
    char status[8];
    int64_t balance;
} locked_account_t;

int ledger_store_fund_account(PGconn *c, ledger_fund_result_t *out, const char *id, int64_t amount,
                              int64_t max_amount, char *err, size_t errlen)
{
    ledger_fund_result_t tmp;
    char why[768];
    PGresult *r = NULL;
    int rc;

    if (!out)
        out = &tmp;
    memset(out, 0, sizeof *out);
    if (max_amount <= 0)
        max_amount = LEDGER_MAX_AMOUNT_CENTS;
    if (!ledger_account_id_valid(id)) {
        seterr(err, errlen, "account id must be 1-64 characters of [A-Za-z0-9_.:-]");
        return -EINVAL;
    }
    if (amount < 1 || amount > max_amount) {
        seterr(err, errlen, "amount %" PRId64 " is not in 1..%" PRId64 " cents", amount,
               max_amount);
        return -EINVAL;
    }

    rc = pg_begin(c, why, sizeof why);
    if (rc < 0)
        goto sqlfail;

    /* The account's currency names its funding account. Not locked yet: locks are taken
     * below, both rows at once in id order. */
    const char *p_id[] = {id};
    rc = pg_exec(c, &r, "SELECT currency, kind FROM accounts WHERE id = $1", 1, p_id, why,
                 sizeof why);
    if (rc < 0)
        goto sqlfail;
    if (PQntuples(r) != 1) {
        seterr(err, errlen, "account %s does not exist", id);
        rc = -ENOENT;
        goto fail;
    }
    char currency[4];
    copy_str(currency, sizeof currency, PQgetvalue(r, 0, 0));
    if (strcmp(PQgetvalue(r, 0, 1), "customer") != 0) {
        seterr(err, errlen, "account %s is a system account and cannot be funded", id);
        rc = -EPERM;
        goto fail;
    }
    PQclear(r);
    r = NULL;

    char funding[LEDGER_ACCOUNT_ID_MAX + 1];
    snprintf(funding, sizeof funding, "%s%s", LEDGER_FUNDING_PREFIX, currency);
    const char *p_fund[] = {funding, currency};
    rc = pg_exec(
        c, NULL,
        "INSERT INTO accounts (id, currency, owner, kind) VALUES ($1, $2, 'system', 'system')"
        " ON CONFLICT (id) DO NOTHING",
        2, p_fund, why, sizeof why);
    if (rc < 0)
        goto sqlfail;

    /* The global lock order: accounts sorted by id (bytewise, as the C collation). */
    const char *p_lock[] = {id, funding};
    rc = pg_exec(c, &r,
                 "SELECT id, currency, kind, status, balance_cents FROM accounts"
                 " WHERE id IN ($1, $2) ORDER BY id FOR NO KEY UPDATE",
                 2, p_lock, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    locked_account_t acct = {0}, fund = {0};
    int seen = 0;
    for (int i = 0; i < PQntuples(r); i++) {
        locked_account_t *a = strcmp(PQgetvalue(r, i, 0), id) == 0 ? &acct : &fund;
        copy_str(a->currency, sizeof a->currency, PQgetvalue(r, i, 1));
        copy_str(a->kind, sizeof a->kind, PQgetvalue(r, i, 2));
        copy_str(a->status, sizeof a->status, PQgetvalue(r, i, 3));
        a->balance = get_i64(r, i, 4);
        seen++;
    }
    PQclear(r);
    r = NULL;
    if (seen != 2) {
        seterr(err, errlen, "funding account %s: account or %s vanished while locking", id,
               funding);
        rc = -EIO;
        goto fail;
    }
    if (strcmp(acct.status, "active") != 0) {
        seterr(err, errlen, "account %s is %s and cannot be funded", id, acct.status);
        rc = -EPERM;
        goto fail;
    }
    if (strcmp(fund.currency, currency) != 0 || strcmp(fund.kind, "system") != 0) {
        seterr(err, errlen, "funding account %s is not a %s system account", funding, currency);
        rc = -EIO;
        goto fail;
    }
    int64_t acct_after, fund_after;
    if (__builtin_add_overflow(acct.balance, amount, &acct_after)) {
        seterr(err, errlen, "account %s: balance %" PRId64 " + %" PRId64 " would overflow", id,
               acct.balance, amount);
        rc = -EOVERFLOW;
        goto fail;
    }
    if (__builtin_sub_overflow(fund.balance, amount, &fund_after)) {
        seterr(err, errlen, "funding account %s: balance %" PRId64 " - %" PRId64 " would overflow",
               funding, fund.balance, amount);
        rc = -EOVERFLOW;
        goto fail;
    }

    int64_t now_us;
    char amount_s[24], acct_s[24], fund_s[24];
    ulid_new_at(out->payment_id, &now_us);
    ulid_new(out->event_id);
    ulid_format_time(out->processed_at, now_us);
    snprintf(amount_s, sizeof amount_s, "%" PRId64, amount);
    snprintf(acct_s, sizeof acct_s, "%" PRId64, acct_after);
    snprintf(fund_s, sizeof fund_s, "%" PRId64, fund_after);

    const char *p_pay[] = {out->payment_id, funding, id, amount_s, currency, out->processed_at};
    rc = pg_exec(c, NULL,
                 "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents,"
                 " currency, status, description, created_at, updated_at)"
                 " VALUES ($1, $2, $3, $4, $5, 'AUTHORIZED', 'funding (paymentctl account fund)',"
                 " $6, $6)",
                 6, p_pay, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    const char *p_ent[] = {out->payment_id, funding, id,     amount_s,
                           currency,        fund_s,  acct_s, out->processed_at};
    rc = pg_exec(c, NULL,
                 "INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents,"
                 " currency, balance_after_cents, created_at)"
                 " VALUES ($1, $2, 'DEBIT', $4, $5, $6, $8), ($1, $3, 'CREDIT', $4, $5, $7, $8)",
                 8, p_ent, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    const char *p_bal[] = {funding, fund_s, id, acct_s, out->processed_at};
    rc = pg_exec(c, &r,
                 "UPDATE accounts a SET balance_cents = v.balance, updated_at = $5::timestamptz"
                 " FROM (VALUES ($1::text, $2::bigint), ($3::text, $4::bigint)) AS v (id, balance)"
                 " WHERE a.id = v.id",
                 5, p_bal, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    if (strcmp(PQcmdTuples(r), "2") != 0) {
        seterr(err, errlen, "funding account %s: updated %s balances instead of 2", id,
               PQcmdTuples(r));
        rc = -EIO;
        goto fail;
    }
    PQclear(r);
    r = NULL;
    const char *p_out[] = {out->event_id, out->payment_id, funding,          id,
                           amount_s,      currency,        out->processed_at};
    rc = pg_exec(c, NULL,
                 "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,"
                 " created_at, next_attempt_at)"
                 " VALUES ($1, 'Payment', $2, 'PaymentAuthorized',"
                 " jsonb_build_object('payment_id', $2::text, 'payer_account_id', $3::text,"
                 " 'payee_account_id', $4::text, 'amount_cents', $5::bigint, 'currency', $6::text),"
                 " $7, $7)",
                 7, p_out, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    rc = pg_exec(c, NULL, "SELECT pg_notify('" LEDGER_OUTBOX_CHANNEL "', '')", 0, NULL, why,
                 sizeof why);
    if (rc < 0)
        goto sqlfail;
    rc = pg_commit(c, why, sizeof why);
    if (rc < 0)
        goto sqlfail;
    copy_str(out->funding_account, sizeof out->funding_account, funding);
    out->balance_cents = acct_after;
    out->funding_balance_cents = fund_after;
    return 0;

sqlfail:
    seterr(err, errlen, "funding account %s: %s", id, why);
fail:
    PQclear(r);
    pg_rollback(c);
    return rc;
}

/* ---- outbox ---------------------------------------------------------------------------- */

int ledger_store_outbox_status(PGconn *c, ledger_outbox_status_t *out, char *err, size_t errlen)
{
    char why[768];
    PGresult *r = NULL;
    memset(out, 0, sizeof *out);
    int rc = pg_exec(c, &r,
                     "SELECT count(*) FILTER (WHERE published_at IS NULL),"
                     " count(*) FILTER (WHERE published_at IS NOT NULL),"
                     " count(*) FILTER (WHERE published_at IS NULL AND attempts > 0),"
                     " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL),"
                     " count(*) FILTER (WHERE published_at IS NULL AND claimed_until > now()),"
                     " coalesce(extract(epoch FROM now() - min(created_at)"
                     "   FILTER (WHERE published_at IS NULL)), -1)"
                     " FROM outbox",
                     0, NULL, why, sizeof why);
    if (rc < 0) {
        seterr(err, errlen, "reading the outbox: %s", why);
        return rc;
    }
    out->pending = get_i64(r, 0, 0);
    out->published = get_i64(r, 0, 1);
    out->failed = get_i64(r, 0, 2);
    out->dead_lettered = get_i64(r, 0, 3);
    out->claimed = get_i64(r, 0, 4);
    out->oldest_pending_age_seconds = strtod(PQgetvalue(r, 0, 5), NULL);
    if (out->pending > 0 && out->oldest_pending_age_seconds < 0)
        out->oldest_pending_age_seconds = 0; /* created "in the future" by a skewed clock */
    PQclear(r);
    return 0;
}

/* ---- ledger check ---------------------------------------------------------------------- */

/* Each query returns (line text, total bigint): the fault lines of one kind, at most
 * LEDGER_CHECK_MAX_LINES of them, and how many there are in all. */
typedef struct check_query {
    const char *what;
    const char *sql;
} check_query_t;

#define CHECK_TAIL " LIMIT 1000"

static const check_query_t checks[] = {
    /* 1. per currency, sum of DEBIT == sum of CREDIT */
    {"debits and credits per currency",
     "SELECT format('currency %s: sum of DEBIT entries %s != sum of CREDIT entries %s"
     " (difference %s)', currency, d, cr, d - cr), count(*) OVER ()"
     " FROM (SELECT currency,"
     "   coalesce(sum(amount_cents) FILTER (WHERE entry_type = 'DEBIT'), 0) AS d,"
     "   coalesce(sum(amount_cents) FILTER (WHERE entry_type = 'CREDIT'), 0) AS cr"
     "   FROM ledger_entries GROUP BY currency) s"
     " WHERE d <> cr ORDER BY currency" CHECK_TAIL},
    /* 2a. balance == credits - debits */
    {"balances against entries",
     "SELECT format('account %s: balance_cents %s != credits - debits %s', a.id,"
     " a.balance_cents, coalesce(s.net, 0)), count(*) OVER ()"
     " FROM accounts a LEFT JOIN (SELECT account_id, sum(CASE entry_type WHEN 'CREDIT'"
     "   THEN amount_cents::numeric ELSE -amount_cents::numeric END) AS net"
     "   FROM ledger_entries GROUP BY account_id) s ON s.account_id = a.id"
     " WHERE a.balance_cents <> coalesce(s.net, 0) ORDER BY a.id" CHECK_TAIL},
    /* 2b. the latest entry's balance_after_cents == balance */
    {"balances against latest entries",
     "SELECT format('account %s: balance_cents %s != balance_after_cents %s of its latest"
     " entry #%s (payment %s)', a.id, a.balance_cents, l.balance_after_cents, l.id,"
     " l.payment_id), count(*) OVER ()"
     " FROM accounts a JOIN LATERAL (SELECT e.id, e.balance_after_cents, e.payment_id"
     "   FROM ledger_entries e WHERE e.account_id = a.id ORDER BY e.id DESC LIMIT 1) l ON true"
     " WHERE l.balance_after_cents <> a.balance_cents ORDER BY a.id" CHECK_TAIL},
    /* 2c. every entry's balance_after_cents follows from the previous one */
    {"balance_after_cents chains",
     "SELECT format('account %s: entry #%s (payment %s, %s %s) has balance_after_cents %s,"
     " expected %s', account_id, id, payment_id, entry_type, amount_cents,"
     " balance_after_cents, expected), count(*) OVER ()"
     " FROM (SELECT e.*, coalesce(lag(balance_after_cents::numeric) OVER (PARTITION BY"
     "   account_id ORDER BY id), 0) + CASE entry_type WHEN 'CREDIT' THEN amount_cents::numeric"
     "   ELSE -amount_cents::numeric END AS expected FROM ledger_entries e) x"
     " WHERE balance_after_cents <> expected ORDER BY account_id, id" CHECK_TAIL},
    /* 3. no customer balance negative, now or after any entry */
    {"negative customer balances",
     "SELECT format('account %s: customer balance is negative (%s cents)', id, balance_cents),"
     " count(*) OVER ()"
     " FROM accounts WHERE kind = 'customer' AND balance_cents < 0 ORDER BY id" CHECK_TAIL},
    {"negative customer entries",
     "SELECT format('account %s: entry #%s (payment %s) left the customer balance negative"
     " (%s cents)', e.account_id, e.id, e.payment_id, e.balance_after_cents), count(*) OVER ()"
     " FROM ledger_entries e JOIN accounts a ON a.id = e.account_id"
     " WHERE a.kind = 'customer' AND e.balance_after_cents < 0 ORDER BY e.account_id, "
     "e.id" CHECK_TAIL},
    /* 4a. AUTHORIZED: one DEBIT of the payer and one CREDIT of the payee, both the payment's
     * amount and currency; DECLINED: no entries */
    {"entries per payment",
     "SELECT CASE"
     "  WHEN p.status = 'DECLINED' THEN format('payment %s: DECLINED but has %s ledger"
     " entries (expected none): %s', p.id, count(e.id), string_agg(format('%s %s %s %s',"
     "   e.entry_type, e.account_id, e.amount_cents, e.currency), ', ' ORDER BY e.id))"
     "  WHEN count(e.id) = 0 THEN format('payment %s: AUTHORIZED but has no ledger entries"
     " (expected DEBIT %s and CREDIT %s of %s %s)', p.id, p.payer_account_id,"
     "   p.payee_account_id, p.amount_cents, p.currency)"
     "  ELSE format('payment %s: AUTHORIZED %s %s from %s to %s, but its %s ledger entries are"
     " %s (expected DEBIT %s and CREDIT %s of that amount)', p.id, p.amount_cents,"
     "   p.currency, p.payer_account_id, p.payee_account_id, count(e.id),"
     "   string_agg(format('%s %s %s %s', e.entry_type, e.account_id, e.amount_cents,"
     "   e.currency), ', ' ORDER BY e.id), p.payer_account_id, p.payee_account_id) END,"
     " count(*) OVER ()"
     " FROM payments p LEFT JOIN ledger_entries e ON e.payment_id = p.id"
     " GROUP BY p.id"
     " HAVING (p.status = 'DECLINED' AND count(e.id) <> 0)"
     "  OR (p.status = 'AUTHORIZED' AND NOT (count(e.id) = 2"
     "   AND count(*) FILTER (WHERE e.entry_type = 'DEBIT' AND e.account_id = p.payer_account_id"
     "     AND e.amount_cents = p.amount_cents AND e.currency = p.currency) = 1"
     "   AND count(*) FILTER (WHERE e.entry_type = 'CREDIT' AND e.account_id = p.payee_account_id"
     "     AND e.amount_cents = p.amount_cents AND e.currency = p.currency) = 1))"
     " ORDER BY p.id" CHECK_TAIL},
    /* 4b. exactly one event per payment, of the right type and content; payments older than
     * the outbox's purge horizon may have lost theirs to the purge */
    {"outbox events per payment",
     "SELECT CASE"
     "  WHEN count(o.id) = 0 THEN format('payment %s: %s but has no outbox event (expected"
     " one %s)', p.id, p.status, want)"
     "  WHEN count(o.id) > 1 THEN format('payment %s: has %s outbox events (expected one)',"
     "   p.id, count(o.id))"
     "  WHEN min(o.event_type) <> want THEN format('payment %s: %s but its outbox event %s is"
     " %s (expected %s)', p.id, p.status, min(o.id), min(o.event_type), want)"
     "  ELSE format('payment %s: its outbox event %s has payload %s, which does not match the"
     " payment', p.id, min(o.id), min(o.payload::text)) END,"
     " count(*) OVER ()"
     " FROM (SELECT p.*, CASE p.status WHEN 'AUTHORIZED' THEN 'PaymentAuthorized'"
     "   ELSE 'PaymentDeclined' END AS want FROM payments p) p"
     " LEFT JOIN outbox o ON o.aggregate_type = 'Payment' AND o.aggregate_id = p.id"
     " GROUP BY p.id, p.status, p.want, p.created_at, p.payer_account_id, p.payee_account_id,"
     "  p.amount_cents, p.currency"
     " HAVING count(o.id) > 1"
     "  OR (count(o.id) = 0 AND p.created_at >= coalesce((SELECT purged_before FROM"
     "   outbox_retention), '-infinity'))"
     "  OR (count(o.id) = 1 AND min(o.event_type) <> p.want)"
     "  OR (count(o.id) = 1 AND NOT bool_and(o.payload @> jsonb_build_object('payment_id',"
     "   p.id::text, 'payer_account_id', p.payer_account_id, 'payee_account_id',"
     "   p.payee_account_id, 'amount_cents', p.amount_cents, 'currency', p.currency::text)))"
     " ORDER BY p.id" CHECK_TAIL},
    {"outbox events without payment",
     "SELECT format('outbox event %s: %s for payment %s, which does not exist', o.id,"
     " o.event_type, o.aggregate_id), count(*) OVER ()"
     " FROM outbox o WHERE o.aggregate_type = 'Payment'"
     " AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = o.aggregate_id)"
     " ORDER BY o.id" CHECK_TAIL},
    /* 5a. a retained key and its payment agree */
    {"idempotency keys against payments",
     "SELECT format('idempotency key %s in scope %s: %s', to_jsonb(k.key), to_jsonb(k.scope),"
     " CASE WHEN p.id IS NULL THEN format('its payment %s does not exist', k.payment_id)"
     "  WHEN p.idempotency_scope IS DISTINCT FROM k.scope OR p.idempotency_key IS DISTINCT FROM"
     "   k.key THEN format('its payment %s carries key %s in scope %s', p.id,"
     "   coalesce(to_jsonb(p.idempotency_key)::text, 'none'),"
     "   coalesce(to_jsonb(p.idempotency_scope)::text, 'none'))"
     "  ELSE format('stored outcome %s/%s differs from payment %s, which is %s/%s', k.status,"
     "   coalesce(k.error_code, 'NONE'), p.id, p.status, coalesce(p.error_code, 'NONE')) END),"
     " count(*) OVER ()"
     " FROM idempotency_keys k LEFT JOIN payments p ON p.id = k.payment_id"
     " WHERE p.id IS NULL OR p.idempotency_scope IS DISTINCT FROM k.scope"
     "  OR p.idempotency_key IS DISTINCT FROM k.key OR p.status <> k.status"
     "  OR p.error_code IS DISTINCT FROM k.error_code"
     " ORDER BY k.scope, k.key" CHECK_TAIL},
    /* 5b. two payments with one key while the first one's key was retained */
    {"payments per idempotency key",
     "SELECT format('idempotency key %s in scope %s: payments %s and %s both hold it (%s was"
     " created at %s, before the key of %s expired at %s)', to_jsonb(k), to_jsonb(s), prev_id,"
     " id, id, pay_format_ts(created_at), prev_id, pay_format_ts(prev_exp)), count(*) OVER ()"
     " FROM (SELECT id, idempotency_scope AS s, idempotency_key AS k, created_at,"
     "   lag(id) OVER w AS prev_id, lag(idempotency_expires_at) OVER w AS prev_exp"
     "   FROM payments WHERE idempotency_key IS NOT NULL"
     "   WINDOW w AS (PARTITION BY idempotency_scope, idempotency_key ORDER BY created_at, id)) x"
     " WHERE prev_exp > created_at ORDER BY s, k, id" CHECK_TAIL},
};

int ledger_store_check(PGconn *c, ledger_check_result_t *res, ledger_fault_fn fault, void *arg,
                       char *err, size_t errlen)
{
    char why[768];
    PGresult *r = NULL;
    int rc;

    memset(res, 0, sizeof *res);
    rc = pg_exec(c, NULL, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL, why,
                 sizeof why);
    if (rc < 0) {
        seterr(err, errlen, "ledger check: %s", why);
        return rc;
    }
    rc = pg_exec(c, &r,
                 "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM payments),"
                 " (SELECT count(*) FROM ledger_entries)",
                 0, NULL, why, sizeof why);
    if (rc < 0) {
        seterr(err, errlen, "ledger check: counting rows: %s", why);
        goto fail;
    }
    res->accounts = get_i64(r, 0, 0);
    res->payments = get_i64(r, 0, 1);
    res->entries = get_i64(r, 0, 2);
    PQclear(r);
    r = NULL;

    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        rc = pg_exec(c, &r, checks[i].sql, 0, NULL, why, sizeof why);
        if (rc < 0) {
            seterr(err, errlen, "ledger check: checking %s: %s", checks[i].what, why);
            goto fail;
        }
        int n = PQntuples(r);
        int64_t total = n > 0 ? get_i64(r, 0, 1) : 0;
        for (int j = 0; j < n; j++)
            if (fault)
                fault(PQgetvalue(r, j, 0), arg);
        if (total > n && fault) {
            char more[160];
            snprintf(more, sizeof more, "... and %" PRId64 " more faults of this kind (%s)",
                     total - n, checks[i].what);
            fault(more, arg);
        }
        res->faults += total;
        PQclear(r);
        r = NULL;
    }
    pg_rollback(c); /* read only: nothing to keep */
    return 0;

fail:
    PQclear(r);
    pg_rollback(c);
    return rc;
}
