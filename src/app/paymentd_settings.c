/*
 * paymentd_settings: the table of DESIGN.md §2 and the validators that need to know what a
 * value means (URLs, broker lists, proxy lists, topic names).
 *
 * DESIGN. The table is rebuilt on demand (load, help, log, free) from one function, so the
 * targets always point into the struct being used. Validators receive the struct as their
 * argument to store the parts they parse (db, redis, trusted_proxies, method limits).
 * DATABASE_URL is parsed by libpq itself (PQconninfoParse), so what we accept is exactly
 * what the PostgreSQL adapter will be able to connect with; we add the checks libpq defers
 * to connect time (ports, sslmode) and the ones a service needs (host, user, database).
 */
#include "app/paymentd_settings.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <libpq-fe.h>

_Static_assert(sizeof(log_level_t) == sizeof(int), "enum settings are stored through int *");
_Static_assert(sizeof(log_format_t) == sizeof(int), "enum settings are stored through int *");
_Static_assert(sizeof(paymentd_environment_t) == sizeof(int), "enum settings through int *");
_Static_assert(sizeof(paymentd_idempotency_scope_t) == sizeof(int), "enum settings through int *");

enum { TABLE_MAX = 64 };
#define TOPIC_SUFFIX_MAX "paymentauthorized" /* longest "{prefix}.<suffix>" we publish */
#define KAFKA_TOPIC_MAX  249

/* ---- small parsing helpers ---- */

static bool parse_port(const char *s, size_t n, int *out)
{
    if (n == 0 || n > 5)
        return false;
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return false;
        v = v * 10 + (s[i] - '0');
    }
    if (v < 1 || v > 65535)
        return false;
    *out = v;
    return true;
}

/* RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens. */
static bool valid_hostname(const char *s, size_t n)
{
    if (n == 0 || n > 253)
        return false;
    size_t label = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '.') {
            if (label == 0 || s[i - 1] == '-')
                return false;
            label = 0;
            continue;
        }
        if (!isalnum(c) && c != '-')
            return false;
        if (c == '-' && label == 0)
            return false;
        if (++label > 63)
            return false;
    }
    if (s[n - 1] == '-')
        return false;
    /* an all-numeric last label is a mistyped IPv4 address (300.1.1.1), not a name */
    size_t k = n;
    while (k > 0 && s[k - 1] != '.')
        k--;
    for (size_t i = k; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return true;
    return false;
}

static bool valid_ip(const char *s, size_t n)
{
    char buf[INET6_ADDRSTRLEN + 1];
    unsigned char addr[16];
    if (n == 0 || n >= sizeof buf)
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return inet_pton(AF_INET, buf, addr) == 1 || inet_pton(AF_INET6, buf, addr) == 1;
}

static bool valid_host(const char *s, size_t n)
{
    if (n >= 2 && s[0] == '[' && s[n - 1] == ']')
        return valid_ip(s + 1, n - 2) && memchr(s + 1, ':', n - 2) != NULL;
    return valid_ip(s, n) || valid_hostname(s, n);
}

/* Percent-decode s[0..n) into dst (dstlen bytes). -EINVAL bad escape, -ENOSPC too long. */
static int pct_decode(char *dst, size_t dstlen, const char *s, size_t n)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= n || !isxdigit((unsigned char)s[i + 1]) ||
                !isxdigit((unsigned char)s[i + 2]))
                return -EINVAL;
            char hex[3] = {s[i + 1], s[i + 2], 0};
            c = (char)strtol(hex, NULL, 16);
            if (c == '\0')
                return -EINVAL; /* %00 would cut the string */
            i += 2;
        }
        if (j + 1 >= dstlen)
            return -ENOSPC;
        dst[j++] = c;
    }
    dst[j] = '\0';
    return 0;
}

static bool copy_field(char *dst, size_t dstlen, const char *src)
{
    size_t n = strlen(src);
    if (n >= dstlen)
        return false;
    memcpy(dst, src, n + 1);
    return true;
}

/*
 * libpq quotes what it rejects: either the decoded token itself ("invalid percent-encoded
 * token: \"…\"") or the whole URI (IPv6 bracket errors). Copy msg to dst with a quoted
 * token equal to the password replaced by *** and a quoted URI masked (log_mask_url).
 */
static void redact_libpq_message(char *dst, size_t dstlen, const char *msg, const char *password)
{
    size_t j = 0;
    const char *p = msg;
    while (*p && j + 1 < dstlen) {
        const char *close = *p == '"' ? strchr(p + 1, '"') : NULL;
        if (close == NULL) {
            dst[j++] = *p++;
            continue;
        }
        size_t len = (size_t)(close - p - 1);
        char token[512], shown[512];
        snprintf(token, sizeof token, "%.*s", (int)len, p + 1);
        if (password[0] != '\0' && strcmp(token, password) == 0)
            snprintf(shown, sizeof shown, "***");
        else if (strstr(token, "://") != NULL)
            log_mask_url(shown, sizeof shown, token);
        else
            snprintf(shown, sizeof shown, "%s", token);
        int w = snprintf(dst + j, dstlen - j, "\"%s\"", shown);
        if (w < 0 || (size_t)w >= dstlen - j) {
            j = dstlen - 1;
            break;
        }
        j += (size_t)w;
        p = close + 1;
    }
    dst[j] = '\0';
}

/* ---- DATABASE_URL ---- */

static const char *const sslmodes[] = {"disable",   "allow",       "prefer", "require",
                                       "verify-ca", "verify-full", NULL};

/* asyncpg's ?ssl=X → libpq's ?sslmode=Y, into out (heap). */
static char *asyncpg_query_to_libpq(const char *url)
{
    size_t n = strlen(url);
    char *out = malloc(2 * n + 32); /* each "ssl=X" grows by at most 11 bytes */
    if (out == NULL)
        abort();
    const char *q = strchr(url, '?');
    if (q == NULL) {
        memcpy(out, url, n + 1);
        return out;
    }
    size_t j = (size_t)(q - url);
    memcpy(out, url, j);
    const char *p = q;
    while (*p) {
        char sep = *p++; /* '?' or '&' */
        const char *e = strchr(p, '&');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        out[j++] = sep;
        if (len >= 4 && strncmp(p, "ssl=", 4) == 0) {
            char v[32];
            size_t vl = len - 4 < sizeof v - 1 ? len - 4 : sizeof v - 1;
            memcpy(v, p + 4, vl);
            v[vl] = '\0';
            const char *m = v;
            if (strcasecmp(v, "true") == 0)
                m = "require";
            else if (strcasecmp(v, "false") == 0)
                m = "disable";
            /* an over-long value is cut here and then fails the sslmode check */
            j += (size_t)sprintf(out + j, "sslmode=%s", m);
        } else {
            memcpy(out + j, p, len);
            j += len;
        }
        p += len;
    }
    out[j] = '\0';
    return out;
}

static int validate_database_url(void *target, char *why, size_t whylen, void *arg)
{
    paymentd_settings_t *st = arg;
    char **url = target;
    const char *raw = *url;
    const char *rest;
    bool asyncpg = false;
    if (strncmp(raw, "postgresql+asyncpg://", 21) == 0) {
        rest = raw + 21;
        asyncpg = true;
    } else if (strncmp(raw, "postgresql://", 13) == 0) {
        rest = raw + 13;
    } else if (strncmp(raw, "postgres://", 11) == 0) {
        rest = raw + 11;
    } else {
        snprintf(why, whylen,
                 "is not a PostgreSQL URL (expected postgresql://, "
                 "postgresql+asyncpg:// or postgres://user:password@host:port/db)");
        return -EINVAL;
    }
    for (const char *p = raw; *p; p++) {
        if (isspace((unsigned char)*p) || iscntrl((unsigned char)*p)) {
            snprintf(why, whylen,
                     "is not a valid PostgreSQL URL: it contains whitespace or "
                     "control characters");
            return -EINVAL;
        }
    }

    size_t rl = strlen(rest);
    char *norm = malloc(rl + 16);
    if (norm == NULL)
        abort();
    snprintf(norm, rl + 16, "postgresql://%s", rest);
    if (asyncpg) {
        char *t = asyncpg_query_to_libpq(norm);
        free(norm);
        norm = t;
    }

    /* The raw password (between the first ':' of the userinfo and its '@'), to redact it
     * from libpq's messages, which quote the token they reject. */
    char rawpw[512] = "";
    {
        const char *at = NULL;
        const char *end = rest + strcspn(rest, "/?#");
        for (const char *p = rest; p < end; p++)
            if (*p == '@')
                at = p;
        const char *colon = at ? memchr(rest, ':', (size_t)(at - rest)) : NULL;
        if (colon && (size_t)(at - colon - 1) < sizeof rawpw) {
            memcpy(rawpw, colon + 1, (size_t)(at - colon - 1));
            rawpw[at - colon - 1] = '\0';
        }
    }

    int rc = -EINVAL;
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(norm, &perr);
    if (opts == NULL) {
        char raw_msg[400], msg[400];
        snprintf(raw_msg, sizeof raw_msg, "%s", perr ? perr : "out of memory");
        size_t ml = strlen(raw_msg);
        while (ml > 0 && (raw_msg[ml - 1] == '\n' || raw_msg[ml - 1] == ' '))
            raw_msg[--ml] = '\0';
        redact_libpq_message(msg, sizeof msg, raw_msg, rawpw);
        snprintf(why, whylen, "is not a valid PostgreSQL URL: %s", msg);
        PQfreemem(perr);
        goto done;
    }

    paymentd_db_url_t db;
    memset(&db, 0, sizeof db);
    db.port = 5432;
    const char *sslmode = NULL;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (o->val == NULL)
            continue;
        if (strcmp(o->keyword, "host") == 0 || strcmp(o->keyword, "hostaddr") == 0) {
            if (db.host[0] == '\0' && !copy_field(db.host, sizeof db.host, o->val)) {
                snprintf(why, whylen,
                         "is not a valid PostgreSQL URL: host is longer than %zu bytes",
                         sizeof db.host - 1);
                goto done;
            }
        } else if (strcmp(o->keyword, "port") == 0) {
            const char *p = o->val;
            bool first = true;
            for (;;) {
                size_t len = strcspn(p, ",");
                int port;
                if (len == 0 && first && p[len] == '\0')
                    break; /* "host:/db": default port */
                if (!parse_port(p, len, &port)) {
                    snprintf(why, whylen,
                             "is not a valid PostgreSQL URL: port \"%.*s\" is not an "
                             "integer in 1..65535",
                             (int)(len > 20 ? 20 : len), p);
                    goto done;
                }
                if (first)
                    db.port = port;
                first = false;
                if (p[len] == '\0')
                    break;
                p += len + 1;
            }
        } else if (strcmp(o->keyword, "user") == 0) {
            if (!copy_field(db.user, sizeof db.user, o->val)) {
                snprintf(why, whylen,
                         "is not a valid PostgreSQL URL: user name is longer than "
                         "%zu bytes",
                         sizeof db.user - 1);
                goto done;
            }
        } else if (strcmp(o->keyword, "password") == 0) {
            if (!copy_field(db.password, sizeof db.password, o->val)) {
                snprintf(why, whylen,
                         "is not a valid PostgreSQL URL: password is longer than "
                         "%zu bytes",
                         sizeof db.password - 1);
                goto done;
            }
        } else if (strcmp(o->keyword, "dbname") == 0) {
            if (!copy_field(db.dbname, sizeof db.dbname, o->val)) {
                snprintf(why, whylen,
                         "is not a valid PostgreSQL URL: database name is longer "
                         "than %zu bytes",
                         sizeof db.dbname - 1);
                goto done;
            }
        } else if (strcmp(o->keyword, "sslmode") == 0) {
            sslmode = o->val;
        }
    }
    if (db.host[0] == '\0') {
        snprintf(why, whylen, "is not a valid PostgreSQL URL: it has no host");
        goto done;
    }
    if (db.user[0] == '\0') {
        snprintf(why, whylen, "is not a valid PostgreSQL URL: it has no user name");
        goto done;
    }
    if (db.dbname[0] == '\0') {
        snprintf(why, whylen, "is not a valid PostgreSQL URL: it has no database name");
        goto done;
    }
    if (sslmode) {
        bool ok = false;
        for (size_t i = 0; sslmodes[i]; i++)
            ok = ok || strcmp(sslmode, sslmodes[i]) == 0;
        if (!ok) {
            snprintf(why, whylen,
                     "is not a valid PostgreSQL URL: sslmode \"%.20s\" is not one of "
                     "disable, allow, prefer, require, verify-ca, verify-full",
                     sslmode);
            goto done;
        }
    }
    st->db = db;
    free(*url);
    *url = norm;
    norm = NULL;
    rc = 0;
done:
    if (opts)
        PQconninfoFree(opts);
    free(norm);
    return rc;
}

/* ---- REDIS_URL ---- */

static int validate_redis_url(void *target, char *why, size_t whylen, void *arg)
{
    paymentd_settings_t *st = arg;
    const char *raw = *(char **)target;
    static const char form[] = "redis://[[user]:password@]host[:port][/db]";
    if (strncmp(raw, "rediss://", 9) == 0) {
        snprintf(why, whylen, "uses TLS (rediss://), which hiredis 0.14 cannot do; expected %s",
                 form);
        return -EINVAL;
    }
    if (strncmp(raw, "redis://", 8) != 0) {
        snprintf(why, whylen, "is not a Redis URL (expected %s)", form);
        return -EINVAL;
    }
    const char *p = raw + 8;
    paymentd_redis_url_t r;
    memset(&r, 0, sizeof r);
    r.port = 6379;

    size_t alen = strcspn(p, "/?#");
    const char *auth_end = p + alen;
    const char *at = NULL;
    for (const char *q = p; q < auth_end; q++)
        if (*q == '@')
            at = q;
    const char *hp = p;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        int drc;
        if (colon)
            drc = pct_decode(r.user, sizeof r.user, p, (size_t)(colon - p)) < 0 ||
                          pct_decode(r.password, sizeof r.password, colon + 1,
                                     (size_t)(at - colon - 1)) < 0
                      ? -EINVAL
                      : 0;
        else /* redis://secret@host: redis-py reads a lone userinfo as the password */
            drc = pct_decode(r.password, sizeof r.password, p, (size_t)(at - p));
        if (drc < 0) {
            snprintf(why, whylen,
                     "is not a valid Redis URL: bad percent-escape or over-long "
                     "user or password");
            return -EINVAL;
        }
        hp = at + 1;
    }
    size_t hl = (size_t)(auth_end - hp);
    const char *host = hp;
    size_t host_len;
    const char *port = NULL;
    size_t port_len = 0;
    if (hl > 0 && hp[0] == '[') {
        const char *rb = memchr(hp, ']', hl);
        if (rb == NULL) {
            snprintf(why, whylen, "is not a valid Redis URL: unclosed '[' in the host");
            return -EINVAL;
        }
        host = hp + 1;
        host_len = (size_t)(rb - hp - 1);
        if (rb + 1 < auth_end) {
            if (rb[1] != ':') {
                snprintf(why, whylen, "is not a valid Redis URL: expected ':port' after ']'");
                return -EINVAL;
            }
            port = rb + 2;
            port_len = (size_t)(auth_end - port);
        }
    } else {
        const char *colon = memchr(hp, ':', hl);
        host_len = colon ? (size_t)(colon - hp) : hl;
        if (colon) {
            port = colon + 1;
            port_len = (size_t)(auth_end - port);
        }
    }
    if (host_len == 0) {
        snprintf(why, whylen, "is not a valid Redis URL: it has no host");
        return -EINVAL;
    }
    if (host_len >= sizeof r.host || !valid_host(host, host_len)) {
        snprintf(why, whylen,
                 "is not a valid Redis URL: \"%.*s\" is not an IP address or host name",
                 (int)(host_len > 64 ? 64 : host_len), host);
        return -EINVAL;
    }
    memcpy(r.host, host, host_len);
    r.host[host_len] = '\0';
    if (port && !parse_port(port, port_len, &r.port)) {
        snprintf(why, whylen,
                 "is not a valid Redis URL: port \"%.*s\" is not an integer in 1..65535",
                 (int)(port_len > 20 ? 20 : port_len), port);
        return -EINVAL;
    }
    const char *rest = auth_end;
    if (*rest == '/') {
        rest++;
        size_t dl = strcspn(rest, "?#");
        if (dl > 0) {
            long long v = 0;
            bool ok = dl <= 9;
            for (size_t i = 0; ok && i < dl; i++) {
                ok = isdigit((unsigned char)rest[i]);
                v = v * 10 + (rest[i] - '0');
            }
            if (!ok) {
                snprintf(why, whylen,
                         "is not a valid Redis URL: database \"%.*s\" is not a "
                         "number (e.g. /0)",
                         (int)(dl > 20 ? 20 : dl), rest);
                return -EINVAL;
            }
            r.db = (int)v;
        }
        rest += dl;
    }
    if (*rest != '\0') {
        snprintf(why, whylen,
                 "is not a valid Redis URL: query parameters and fragments are not "
                 "supported (expected %s)",
                 form);
        return -EINVAL;
    }
    st->redis = r;
    return 0;
}

/* ---- KAFKA_BROKERS ---- */

static int validate_brokers(void *target, char *why, size_t whylen, void *arg)
{
    char **val = target;
    const char *p = *val;
    size_t n = strlen(p);
    char *out = malloc(n + 1);
    if (out == NULL)
        abort();
    size_t j = 0;
    for (;;) {
        size_t len = strcspn(p, ",");
        const char *e = p;
        size_t el = len;
        while (el > 0 && isspace((unsigned char)*e))
            e++, el--;
        while (el > 0 && isspace((unsigned char)e[el - 1]))
            el--;
        if (el == 0) {
            snprintf(why, whylen, "has an empty broker entry (expected host:port[,host:port...])");
            goto fail;
        }
        const char *host = e, *port = NULL;
        size_t host_len = el, port_len = 0;
        if (e[0] == '[') {
            const char *rb = memchr(e, ']', el);
            if (rb && rb + 1 < e + el && rb[1] == ':') {
                port = rb + 2;
                port_len = (size_t)(e + el - port);
                host_len = (size_t)(rb + 1 - e);
            } else if (rb && rb + 1 == e + el) {
                host_len = el;
            } else {
                host_len = 0;
            }
        } else {
            const char *colon = memchr(e, ':', el);
            if (colon) {
                if (memchr(colon + 1, ':', (size_t)(e + el - colon - 1)) != NULL) {
                    host_len = 0; /* bare IPv6 without brackets */
                } else {
                    host_len = (size_t)(colon - e);
                    port = colon + 1;
                    port_len = (size_t)(e + el - port);
                }
            }
        }
        int pv;
        if (host_len == 0 || !valid_host(host, host_len) ||
            (port && !parse_port(port, port_len, &pv))) {
            snprintf(why, whylen,
                     "has broker \"%.*s\", expected host:port with a host name or IP "
                     "address and a port in 1..65535",
                     (int)(el > 80 ? 80 : el), e);
            goto fail;
        }
        if (j)
            out[j++] = ',';
        memcpy(out + j, e, el);
        j += el;
        if (p[len] == '\0')
            break;
        p += len + 1;
    }
    out[j] = '\0';
    free(*val);
    *val = out;
    return 0;
fail:
    free(out);
    return -EINVAL;
}

/* ---- GRPC_HOST, METRICS_HOST ---- */

static int validate_listen_host(void *target, char *why, size_t whylen, void *arg)
{
    char **val = target;
    size_t n = strlen(*val);
    if (!valid_host(*val, n)) {
        snprintf(why, whylen,
                 "is not an IP address or host name (e.g. 0.0.0.0, 127.0.0.1, ::, localhost)");
        return -EINVAL;
    }
    if (n >= 2 && (*val)[0] == '[') { /* store IPv6 without brackets */
        memmove(*val, *val + 1, n - 2);
        (*val)[n - 2] = '\0';
    }
    return 0;
}

/* ---- RATE_LIMIT_TRUSTED_PROXIES ---- */

static int validate_proxies(void *target, char *why, size_t whylen, void *arg)
{
    paymentd_settings_t *st = arg;
    const char *p = *(char **)target;
    st->trusted_proxies_n = 0;
    while (isspace((unsigned char)*p))
        p++;
    if (*p == '\0')
        return 0;
    for (;;) {
        size_t len = strcspn(p, ",");
        const char *e = p;
        size_t el = len;
        while (el > 0 && isspace((unsigned char)*e))
            e++, el--;
        while (el > 0 && isspace((unsigned char)e[el - 1]))
            el--;
        if (el == 0) {
            snprintf(why, whylen,
                     "has an empty entry (expected a comma-separated list of IP "
                     "addresses or networks such as 10.0.0.0/8)");
            return -EINVAL;
        }
        if (st->trusted_proxies_n == PAYMENTD_MAX_TRUSTED_PROXIES) {
            snprintf(why, whylen, "has more than %d entries (use networks such as 10.0.0.0/8)",
                     PAYMENTD_MAX_TRUSTED_PROXIES);
            return -EINVAL;
        }
        char buf[INET6_ADDRSTRLEN + 8];
        paymentd_proxy_t px;
        memset(&px, 0, sizeof px);
        bool ok = el < sizeof buf;
        if (ok) {
            memcpy(buf, e, el);
            buf[el] = '\0';
            char *slash = strchr(buf, '/');
            if (slash)
                *slash = '\0';
            if (inet_pton(AF_INET, buf, px.addr) == 1) {
                px.family = AF_INET;
                px.prefix_len = 32;
            } else if (inet_pton(AF_INET6, buf, px.addr) == 1) {
                px.family = AF_INET6;
                px.prefix_len = 128;
            } else {
                ok = false;
            }
            if (ok && slash) {
                int max = px.prefix_len, v = 0;
                const char *d = slash + 1;
                ok = *d != '\0' && strlen(d) <= 3;
                for (; ok && *d; d++) {
                    ok = isdigit((unsigned char)*d);
                    v = v * 10 + (*d - '0');
                }
                ok = ok && v <= max;
                px.prefix_len = v;
            }
        }
        if (!ok) {
            snprintf(why, whylen, "has \"%.*s\", which is not an IP address or address/prefix",
                     (int)(el > 64 ? 64 : el), e);
            return -EINVAL;
        }
        st->trusted_proxies[st->trusted_proxies_n++] = px;
        if (p[len] == '\0')
            break;
        p += len + 1;
    }
    return 0;
}

/* ---- RATE_LIMIT_METHOD_LIMITS ---- */

static int validate_method_limits(void *target, char *why, size_t whylen, void *arg)
{
    paymentd_settings_t *st = arg;
    static const char *const names[] = {"AuthorizePayment", "GetPayment", "GetAccountBalance"};
    int64_t *slots[] = {&st->limit_authorize_payment, &st->limit_get_payment,
                        &st->limit_get_account_balance};
    int64_t vals[3] = {0, 0, 0};
    const char *p = *(char **)target;
    while (isspace((unsigned char)*p))
        p++;
    if (*p != '\0') {
        for (;;) {
            size_t len = strcspn(p, ",");
            const char *e = p;
            size_t el = len;
            while (el > 0 && isspace((unsigned char)*e))
                e++, el--;
            while (el > 0 && isspace((unsigned char)e[el - 1]))
                el--;
            const char *eq = memchr(e, '=', el);
            if (el == 0 || eq == NULL) {
                snprintf(why, whylen,
                         "has \"%.*s\", expected Method=LIMIT entries such as "
                         "GetPayment=1000,AuthorizePayment=50",
                         (int)(el > 64 ? 64 : el), e);
                return -EINVAL;
            }
            const char *name = e;
            size_t nl = (size_t)(eq - e);
            while (nl > 0 && isspace((unsigned char)name[nl - 1]))
                nl--;
            static const char prefix[] = "/payment.v1.PaymentService/";
            if (nl > sizeof prefix - 1 && strncmp(name, prefix, sizeof prefix - 1) == 0) {
                name += sizeof prefix - 1;
                nl -= sizeof prefix - 1;
            }
            int m = -1;
            for (int i = 0; i < 3; i++)
                if (strlen(names[i]) == nl && strncasecmp(name, names[i], nl) == 0)
                    m = i;
            if (m < 0) {
                snprintf(why, whylen,
                         "has unknown method \"%.*s\" (expected AuthorizePayment, "
                         "GetPayment or GetAccountBalance)",
                         (int)(nl > 64 ? 64 : nl), name);
                return -EINVAL;
            }
            if (vals[m] != 0) {
                snprintf(why, whylen, "names %s twice", names[m]);
                return -EINVAL;
            }
            const char *v = eq + 1;
            size_t vl = (size_t)(e + el - v);
            while (vl > 0 && isspace((unsigned char)*v))
                v++, vl--;
            int64_t lim = 0;
            bool ok = vl > 0 && vl <= 10;
            for (size_t i = 0; ok && i < vl; i++) {
                ok = isdigit((unsigned char)v[i]);
                lim = lim * 10 + (v[i] - '0');
            }
            if (!ok || lim < 1 || lim > 1000000000) {
                snprintf(why, whylen, "has %s=\"%.*s\", expected a limit in 1..1000000000",
                         names[m], (int)(vl > 20 ? 20 : vl), v);
                return -EINVAL;
            }
            vals[m] = lim;
            if (p[len] == '\0')
                break;
            p += len + 1;
        }
    }
    for (int i = 0; i < 3; i++)
        *slots[i] = vals[i];
    return 0;
}

/* ---- KAFKA_TOPIC_PREFIX ---- */

static int validate_topic_prefix(void *target, char *why, size_t whylen, void *arg)
{
    const char *v = *(char **)target;
    size_t n = strlen(v);
    size_t max = KAFKA_TOPIC_MAX - (sizeof TOPIC_SUFFIX_MAX - 1) - 1;
    if (n == 0) {
        snprintf(why, whylen,
                 "is empty; expected a Kafka topic prefix of letters, digits, '.', "
                 "'_' or '-'");
        return -EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (!isalnum(c) && c != '.' && c != '_' && c != '-') {
            snprintf(why, whylen,
                     "is not a Kafka topic prefix: only letters, digits, '.', '_' "
                     "and '-' are allowed");
            return -EINVAL;
        }
    }
    if (n > max) {
        snprintf(why, whylen,
                 "is longer than %zu characters (Kafka topic names are at most %d, "
                 "with \".%s\" appended)",
                 max, KAFKA_TOPIC_MAX, TOPIC_SUFFIX_MAX);
        return -EINVAL;
    }
    return 0;
}

/* ---- the table ---- */

static const char *const kafka_aliases[] = {"REDPANDA_BROKERS", NULL};

static const config_choice_t log_levels[] = {
    {"DEBUG", LOG_DEBUG},  {"INFO", LOG_INFO},   {"WARNING", LOG_WARNING},
    {"WARN", LOG_WARNING}, {"ERROR", LOG_ERROR}, {NULL, 0},
};
static const config_choice_t log_formats[] = {
    {"json", LOG_FORMAT_JSON},
    {"console", LOG_FORMAT_CONSOLE},
    {NULL, 0},
};
static const config_choice_t environments[] = {
    {"development", PAYMENTD_ENV_DEVELOPMENT},
    {"staging", PAYMENTD_ENV_STAGING},
    {"production", PAYMENTD_ENV_PRODUCTION},
    {"test", PAYMENTD_ENV_TEST},
    {NULL, 0},
};
static const config_choice_t idem_scopes[] = {
    {"global", PAYMENTD_IDEMPOTENCY_GLOBAL},
    {"client", PAYMENTD_IDEMPOTENCY_CLIENT},
    {NULL, 0},
};

static char cq_threads_default[16];

#define S_STR(n, d, tgt, h, v)                                                                     \
    {                                                                                              \
        .name = n, .type = CONFIG_STRING, .def = d, .target = tgt, .help = h, .validate = v,       \
        .validate_arg = s                                                                          \
    }
#define S_INT(n, d, tgt, lo, hi, h)                                                                \
    {                                                                                              \
        .name = n, .type = CONFIG_INT, .def = d, .target = tgt, .imin = lo, .imax = hi, .help = h  \
    }
#define S_DUR(n, d, tgt, lo, hi, h)                                                                \
    {                                                                                              \
        .name = n, .type = CONFIG_DURATION, .def = d, .target = tgt, .dmin = lo, .dmax = hi,       \
        .help = h                                                                                  \
    }
#define S_BOOL(n, d, tgt, h)                                                                       \
    {                                                                                              \
        .name = n, .type = CONFIG_BOOL, .def = d, .target = tgt, .help = h                         \
    }
#define S_ENUM(n, d, tgt, ch, h)                                                                   \
    {                                                                                              \
        .name = n, .type = CONFIG_ENUM, .def = d, .target = (int *)(tgt), .choices = ch, .help = h \
    }

static void table_init(config_setting_t *t, paymentd_settings_t *s)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1)
        cores = 1;
    if (cores > 256)
        cores = 256;
    snprintf(cq_threads_default, sizeof cq_threads_default, "%ld", cores);

    const config_setting_t rows[] = {
        S_STR("DATABASE_URL", PAYMENTD_DEFAULT_DATABASE_URL, &s->database_url,
              "PostgreSQL URL: postgresql://, postgresql+asyncpg:// or "
              "postgres://user:password@host:port/db",
              validate_database_url),
        S_STR("REDIS_URL", "redis://localhost:6379/0", &s->redis_url,
              "Redis URL for rate limiting: redis://[[user]:password@]host[:port][/db]",
              validate_redis_url),
        {.name = "KAFKA_BROKERS",
         .aliases = kafka_aliases,
         .type = CONFIG_STRING,
         .def = "localhost:19092",
         .target = &s->kafka_brokers,
         .help = "Kafka bootstrap servers, host:port[,host:port...]; REDPANDA_BROKERS is an alias "
                 "(both set and different is an error)",
         .validate = validate_brokers,
         .validate_arg = s},
        S_STR("GRPC_HOST", "0.0.0.0", &s->grpc_host, "gRPC listen address", validate_listen_host),
        S_INT("GRPC_PORT", "50051", &s->grpc_port, 0, 65535,
              "gRPC listen port; 0 picks a free port (logged at start-up)"),
        {.name = "GRPC_CQ_THREADS",
         .type = CONFIG_INT,
         .def = cq_threads_default,
         .target = &s->grpc_cq_threads,
         .imin = 1,
         .imax = 256,
         .help = "gRPC completion-queue threads (default: the number of online CPUs)"},
        S_INT("GRPC_MAX_RECEIVE_BYTES", "4194304", &s->grpc_max_receive_bytes, 1024, 1073741824,
              "largest request message accepted, in bytes; larger ones end RESOURCE_EXHAUSTED"),
        S_BOOL("METRICS_ENABLED", "true", &s->metrics_enabled,
               "serve Prometheus /metrics and /health over HTTP"),
        S_STR("METRICS_HOST", "127.0.0.1", &s->metrics_host,
              "metrics listen address (loopback by default; containers set 0.0.0.0)",
              validate_listen_host),
        S_INT("METRICS_PORT", "9090", &s->metrics_port, 0, 65535,
              "metrics listen port; 0 picks a free port (logged at start-up)"),
        S_BOOL("RATE_LIMIT_ENABLED", "true", &s->rate_limit_enabled,
               "rate-limit the payment methods per client identity (Redis)"),
        S_INT("RATE_LIMIT_MAX_REQUESTS", "100", &s->rate_limit_max_requests, 1, 1000000000,
              "requests allowed per identity and window"),
        S_INT("RATE_LIMIT_WINDOW_SECONDS", "60", &s->rate_limit_window_seconds, 1, 86400,
              "rate-limit window, whole seconds"),
        S_BOOL("RATE_LIMIT_FAIL_OPEN", "true", &s->rate_limit_fail_open,
               "allow requests when Redis is down or slow (false: reject them UNAVAILABLE)"),
        S_INT("RATE_LIMIT_TIMEOUT_MS", "50", &s->rate_limit_timeout_ms, 1, 60000,
              "Redis answer deadline for a rate-limit check, milliseconds"),
        S_STR("RATE_LIMIT_TRUSTED_PROXIES", "", &s->rate_limit_trusted_proxies,
              "comma-separated IP addresses or networks (10.0.0.0/8) whose x-forwarded-for is "
              "believed",
              validate_proxies),
        S_STR("RATE_LIMIT_METHOD_LIMITS", "", &s->rate_limit_method_limits,
              "optional per-method limits with their own bucket, e.g. "
              "GetPayment=1000,AuthorizePayment=50",
              validate_method_limits),
        S_INT("OUTBOX_BATCH_SIZE", "100", &s->outbox_batch_size, 1, 10000,
              "outbox rows claimed per relay round"),
        S_DUR("OUTBOX_POLL_INTERVAL_SECONDS", "1.0", &s->outbox_poll_interval_seconds, 0.001, 3600,
              "outbox polling fallback when no NOTIFY arrives"),
        S_INT("OUTBOX_MAX_RETRIES", "5", &s->outbox_max_retries, 0, 1000,
              "permanent per-message Kafka errors tolerated before the event goes to the DLQ"),
        S_DUR("OUTBOX_BASE_DELAY_SECONDS", "1.0", &s->outbox_base_delay_seconds, 0.001, 3600,
              "first retry delay (doubles each attempt)"),
        S_DUR("OUTBOX_MAX_DELAY_SECONDS", "60.0", &s->outbox_max_delay_seconds, 0.001, 86400,
              "retry delay cap"),
        S_STR("KAFKA_TOPIC_PREFIX", "payments", &s->kafka_topic_prefix,
              "topics are {prefix}.paymentauthorized, {prefix}.paymentdeclined and {prefix}.dlq",
              validate_topic_prefix),
        S_ENUM("LOG_LEVEL", "INFO", &s->log_level, log_levels,
               "lowest level logged: DEBUG, INFO, WARNING (or WARN), ERROR; any case"),
        S_ENUM("LOG_FORMAT", "json", &s->log_format, log_formats,
               "json (one object per line) or console (human readable)"),
        S_ENUM("ENVIRONMENT", "development", &s->environment, environments,
               "production refuses the default DATABASE_URL and one without a password"),
        S_DUR("SHUTDOWN_GRACE_SECONDS", "10", &s->shutdown_grace_seconds, 0, 3600,
              "time in-flight calls get to finish on SIGTERM/SIGINT"),
        S_INT("DB_POOL_SIZE", "4", &s->db_pool_size, 1, 64,
              "PostgreSQL connections for ledger actors (one each): max(1, N/4) writers, the "
              "rest readers"),
        S_INT("LEDGER_BATCH_MAX", "256", &s->ledger_batch_max, 1, 4096,
              "payments applied per ledger transaction at most"),
        S_INT("DB_STATEMENT_TIMEOUT_MS", "10000", &s->db_statement_timeout_ms, 100, 3600000,
              "a ledger connection with no answer for this long is dropped and reconnected; "
              "its calls end UNAVAILABLE, milliseconds"),
        S_ENUM("IDEMPOTENCY_SCOPE", "global", &s->idempotency_scope, idem_scopes,
               "global: one key space; client: keys scoped per client identity"),
        S_INT("IDEMPOTENCY_TTL_HOURS", "24", &s->idempotency_ttl_hours, 1, 87600,
              "idempotency keys are kept at least this long, then purged"),
        S_INT("MAX_AMOUNT_CENTS", "1000000000000000", &s->max_amount_cents, 1, INT64_MAX,
              "larger amounts are declined INVALID_AMOUNT"),
        {.name = NULL},
    };
    _Static_assert(sizeof rows / sizeof rows[0] <= TABLE_MAX, "TABLE_MAX too small");
    memcpy(t, rows, sizeof rows);
}

static int check_cross(const paymentd_settings_t *s, char *err, size_t errlen)
{
    if (s->environment == PAYMENTD_ENV_PRODUCTION) {
        if (strcmp(s->database_url, PAYMENTD_DEFAULT_DATABASE_URL) == 0) {
            snprintf(err, errlen,
                     "ENVIRONMENT=production refuses the default DATABASE_URL "
                     "(postgresql://payment:***@localhost:5432/payment_db); set "
                     "DATABASE_URL to the production database");
            return -EINVAL;
        }
        if (s->db.password[0] == '\0') {
            snprintf(err, errlen,
                     "ENVIRONMENT=production requires a password in DATABASE_URL "
                     "(postgresql://user:password@host:port/db)");
            return -EINVAL;
        }
    }
    if (s->outbox_base_delay_seconds > s->outbox_max_delay_seconds) {
        snprintf(err, errlen,
                 "OUTBOX_BASE_DELAY_SECONDS (%.15g) must not exceed "
                 "OUTBOX_MAX_DELAY_SECONDS (%.15g)",
                 s->outbox_base_delay_seconds, s->outbox_max_delay_seconds);
        return -EINVAL;
    }
    if (s->metrics_enabled && s->grpc_port != 0 && s->grpc_port == s->metrics_port) {
        snprintf(err, errlen, "GRPC_PORT and METRICS_PORT are both %lld; they need different ports",
                 (long long)s->grpc_port);
        return -EINVAL;
    }
    return 0;
}

int paymentd_settings_load_env(paymentd_settings_t *out, int argc, char **argv, char **envp,
                               char *err, size_t errlen)
{
    config_setting_t table[TABLE_MAX];
    memset(out, 0, sizeof *out);
    table_init(table, out);
    int rc = config_load(table, argc, argv, envp, err, errlen);
    if (rc == CONFIG_HELP) {
        config_free(table);
        memset(out, 0, sizeof *out);
        return PAYMENTD_SETTINGS_HELP;
    }
    if (rc == 0)
        rc = check_cross(out, err, errlen);
    if (rc < 0) {
        config_free(table);
        memset(out, 0, sizeof *out);
        return rc;
    }
    for (size_t i = 0; table[i].name; i++)
        out->_source[i] = (unsigned char)table[i]._source;
    return 0;
}

int paymentd_settings_load(paymentd_settings_t *out, int argc, char **argv, char *err,
                           size_t errlen)
{
    return paymentd_settings_load_env(out, argc, argv, NULL, err, errlen);
}

void paymentd_settings_help(FILE *out)
{
    paymentd_settings_t dummy;
    config_setting_t table[TABLE_MAX];
    memset(&dummy, 0, sizeof dummy);
    table_init(table, &dummy);
    config_print_help(out, NULL, table); /* the main prints its own usage line */
}

void paymentd_settings_log(const paymentd_settings_t *s)
{
    config_setting_t table[TABLE_MAX];
    /* The table only reads through its targets here. */
    table_init(table, (paymentd_settings_t *)s);
    for (size_t i = 0; table[i].name; i++)
        table[i]._source = (config_source_t)s->_source[i];
    config_log_effective(table, "config");
}

void paymentd_settings_free(paymentd_settings_t *s)
{
    config_setting_t table[TABLE_MAX];
    table_init(table, s);
    config_free(table);
    memset(s, 0, sizeof *s);
}
