/*
 * test_log: structured logging. Lines are captured through a pipe (log_set_fd) and JSON
 * lines are checked with a strict parser below: every line must be one valid object whose
 * decoded strings equal what was logged, and credentials never appear in either format.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "runtime/log.h"

/* ---- capture ---- */

static int cap_r = -1, cap_w = -1, cap_old = -1;

static void capture_begin(void)
{
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    cap_r = p[0];
    cap_w = p[1];
    cap_old = log_set_fd(cap_w);
}

/* Stop capturing; returns everything written (caller frees). */
static char *capture_end(void)
{
    log_set_fd(cap_old);
    close(cap_w);
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    for (;;) {
        if (len + 1 >= cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        ssize_t n = read(cap_r, buf + len, cap - len - 1);
        assert_true(n >= 0);
        if (n == 0)
            break;
        len += (size_t)n;
    }
    buf[len] = '\0';
    close(cap_r);
    return buf;
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* ---- a strict JSON object parser (string and null values only, as our lines are) ---- */

typedef struct jobj {
    int n;
    char *key[80];
    char *val[80]; /* NULL for null */
} jobj_t;

static void jobj_free(jobj_t *o)
{
    for (int i = 0; i < o->n; i++) {
        free(o->key[i]);
        free(o->val[i]);
    }
    o->n = 0;
}

static void put_utf8(char **d, uint32_t cp)
{
    unsigned char *p = (unsigned char *)*d;
    if (cp < 0x80) {
        *p++ = (unsigned char)cp;
    } else if (cp < 0x800) {
        *p++ = (unsigned char)(0xc0 | (cp >> 6));
        *p++ = (unsigned char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        *p++ = (unsigned char)(0xe0 | (cp >> 12));
        *p++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        *p++ = (unsigned char)(0x80 | (cp & 0x3f));
    } else {
        *p++ = (unsigned char)(0xf0 | (cp >> 18));
        *p++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
        *p++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        *p++ = (unsigned char)(0x80 | (cp & 0x3f));
    }
    *d = (char *)p;
}

static int hex4(const char *s, uint32_t *out)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (uint32_t)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* Parse a JSON string at *p (at the opening quote); returns heap text or NULL if invalid. */
static char *jstring(const char **p)
{
    const char *s = *p;
    if (*s != '"')
        return NULL;
    s++;
    char *out = malloc(strlen(s) * 4 + 1);
    char *d = out;
    for (;;) {
        unsigned char c = (unsigned char)*s;
        if (c == '\0' || c < 0x20) {
            free(out);
            return NULL; /* unterminated, or a raw control character */
        }
        if (c == '"') {
            s++;
            break;
        }
        if (c != '\\') {
            *d++ = (char)c;
            s++;
            continue;
        }
        s++;
        uint32_t cp;
        switch (*s) {
        case '"':
            *d++ = '"';
            break;
        case '\\':
            *d++ = '\\';
            break;
        case '/':
            *d++ = '/';
            break;
        case 'b':
            *d++ = '\b';
            break;
        case 'f':
            *d++ = '\f';
            break;
        case 'n':
            *d++ = '\n';
            break;
        case 'r':
            *d++ = '\r';
            break;
        case 't':
            *d++ = '\t';
            break;
        case 'u':
            if (hex4(s + 1, &cp) < 0) {
                free(out);
                return NULL;
            }
            s += 4;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                uint32_t lo;
                if (s[1] != '\\' || s[2] != 'u' || hex4(s + 3, &lo) < 0 || lo < 0xdc00 ||
                    lo > 0xdfff) {
                    free(out);
                    return NULL;
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                s += 6;
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                free(out);
                return NULL;
            }
            put_utf8(&d, cp);
            break;
        default:
            free(out);
            return NULL;
        }
        s++;
    }
    *d = '\0';
    *p = s;
    return out;
}

/* One line "{...}\n" → 0 and o filled, or -1. */
static int jparse_line(const char *line, size_t len, jobj_t *o)
{
    o->n = 0;
    char *copy = strndup(line, len);
    const char *p = copy;
    int rc = -1;
    if (*p++ != '{')
        goto out;
    if (*p == '}') {
        p++;
    } else {
        for (;;) {
            if (o->n == 80)
                goto out;
            char *k = jstring(&p);
            if (k == NULL)
                goto out;
            o->key[o->n] = k;
            o->val[o->n] = NULL;
            o->n++;
            if (*p++ != ':')
                goto out;
            if (strncmp(p, "null", 4) == 0) {
                p += 4;
            } else {
                char *v = jstring(&p);
                if (v == NULL)
                    goto out;
                o->val[o->n - 1] = v;
            }
            if (*p == ',') {
                p++;
                continue;
            }
            if (*p++ != '}')
                goto out;
            break;
        }
    }
    if (*p != '\n' || p[1] != '\0')
        goto out;
    /* no duplicate keys */
    for (int i = 0; i < o->n; i++)
        for (int j = i + 1; j < o->n; j++)
            if (strcmp(o->key[i], o->key[j]) == 0)
                goto out;
    rc = 0;
out:
    free(copy);
    if (rc < 0)
        jobj_free(o);
    return rc;
}

/* Exactly one line in buf, parsed. */
static void parse_one(const char *buf, jobj_t *o)
{
    assert_int_equal(count_lines(buf), 1);
    assert_int_equal(jparse_line(buf, strlen(buf), o), 0);
}

static const char *jget(const jobj_t *o, const char *key)
{
    for (int i = 0; i < o->n; i++)
        if (strcmp(o->key[i], key) == 0)
            return o->val[i] ? o->val[i] : "(null)";
    return NULL;
}

static bool matches(const char *re, const char *s)
{
    regex_t r;
    assert_int_equal(regcomp(&r, re, REG_EXTENDED | REG_NOSUB), 0);
    int m = regexec(&r, s, 0, NULL, 0);
    regfree(&r);
    return m == 0;
}

static int setup(void **state)
{
    log_init(LOG_DEBUG, LOG_FORMAT_JSON);
    return 0;
}

/* ---- tests ---- */

static void test_json_line_fields(void **state)
{
    capture_begin();
    log_kv(LOG_INFO, "ledger", "connected", "host", "db.local", "port", "5432", NULL);
    char *out = capture_end();
    jobj_t o;
    parse_one(out, &o);
    assert_int_equal(o.n, 6);
    assert_string_equal(o.key[0], "ts");
    assert_string_equal(o.key[1], "level");
    assert_string_equal(o.key[2], "logger");
    assert_string_equal(o.key[3], "msg");
    assert_true(matches("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z$",
                        jget(&o, "ts")));
    assert_string_equal(jget(&o, "level"), "INFO");
    assert_string_equal(jget(&o, "logger"), "ledger");
    assert_string_equal(jget(&o, "msg"), "connected");
    assert_string_equal(jget(&o, "host"), "db.local");
    assert_string_equal(jget(&o, "port"), "5432");
    jobj_free(&o);
    free(out);
}

static void test_json_timestamp_is_now_utc(void **state)
{
    time_t before = time(NULL);
    capture_begin();
    LOG_INFO("t", "tick");
    char *out = capture_end();
    time_t after = time(NULL);
    jobj_t o;
    parse_one(out, &o);
    struct tm tm = {0};
    const char *ts = jget(&o, "ts");
    assert_non_null(strptime(ts, "%Y-%m-%dT%H:%M:%S", &tm));
    time_t t = timegm(&tm);
    assert_true(t >= before && t <= after);
    jobj_free(&o);
    free(out);
}

static void test_json_escaping(void **state)
{
    const char *msg =
        "quote \" backslash \\ newline \n tab \t cr \r bs \b ff \f ctl \x01\x1f del \x7f "
        "utf8 \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 slash /";
    capture_begin();
    log_msg(LOG_WARNING, "esc\"mod", "%s", msg);
    log_kv(LOG_ERROR, "m", "fields", "k\"ey", "v\\al\nue", "nul", NULL, NULL);
    char *out = capture_end();
    assert_int_equal(count_lines(out), 2);
    for (const unsigned char *p = (const unsigned char *)out; *p; p++)
        assert_true(*p >= 0x20 || *p == '\n'); /* no raw control characters anywhere */

    char *nl = strchr(out, '\n');
    jobj_t o;
    assert_int_equal(jparse_line(out, (size_t)(nl - out) + 1, &o), 0);
    assert_string_equal(jget(&o, "msg"), msg);
    assert_string_equal(jget(&o, "logger"), "esc\"mod");
    assert_string_equal(jget(&o, "level"), "WARNING");
    jobj_free(&o);

    assert_int_equal(jparse_line(nl + 1, strlen(nl + 1), &o), 0);
    assert_string_equal(jget(&o, "level"), "ERROR");
    assert_string_equal(jget(&o, "k\"ey"), "v\\al\nue");
    assert_string_equal(jget(&o, "nul"), "(null)");
    assert_non_null(strstr(nl + 1, "\"nul\":null"));
    jobj_free(&o);
    free(out);
}

static void test_json_invalid_utf8_replaced(void **state)
{
    capture_begin();
    LOG_INFO("u", "bad \xff\xfe byte, cut \xe2\x82, overlong \xc0\xaf, surrogate \xed\xa0\x80 end");
    char *out = capture_end();
    jobj_t o;
    parse_one(out, &o);
    assert_string_equal(
        jget(&o, "msg"),
        "bad \xef\xbf\xbd\xef\xbf\xbd byte, cut \xef\xbf\xbd\xef\xbf\xbd, overlong "
        "\xef\xbf\xbd\xef\xbf\xbd, surrogate \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd end");
    jobj_free(&o);
    free(out);
}

static void test_reserved_keys_renamed(void **state)
{
    capture_begin();
    log_kv(LOG_INFO, "m", "real", "msg", "fake", "level", "x", "ts", "y", "logger", "z", NULL);
    char *out = capture_end();
    jobj_t o;
    parse_one(out, &o);
    assert_string_equal(jget(&o, "msg"), "real");
    assert_string_equal(jget(&o, "level"), "INFO");
    assert_string_equal(jget(&o, "field_msg"), "fake");
    assert_string_equal(jget(&o, "field_level"), "x");
    assert_string_equal(jget(&o, "field_ts"), "y");
    assert_string_equal(jget(&o, "field_logger"), "z");
    jobj_free(&o);
    free(out);
}

static void test_long_message(void **state)
{
    /* longer than every inline buffer: exercises the heap path, then the 16 KiB cap */
    size_t big = 40000;
    char *msg = malloc(big + 1);
    for (size_t i = 0; i < big; i++)
        msg[i] = (char)('a' + i % 26);
    msg[big] = '\0';
    capture_begin();
    log_msg(LOG_INFO, "big", "%s", msg);
    msg[3000] = '\0';
    log_msg(LOG_INFO, "mid", "%s", msg);
    char *out = capture_end();
    char *nl = strchr(out, '\n');
    jobj_t o;
    assert_int_equal(jparse_line(out, (size_t)(nl - out) + 1, &o), 0);
    const char *m = jget(&o, "msg");
    assert_int_equal(strlen(m), 16384 + strlen("...[truncated]"));
    assert_memory_equal(m, msg, 3000);
    assert_string_equal(m + 16384, "...[truncated]");
    jobj_free(&o);
    assert_int_equal(jparse_line(nl + 1, strlen(nl + 1), &o), 0);
    assert_string_equal(jget(&o, "msg"), msg);
    jobj_free(&o);
    free(out);
    free(msg);
}

static int evaluations;
static const char *counted(const char *s)
{
    evaluations++;
    return s;
}

static void test_level_threshold(void **state)
{
    log_init(LOG_WARNING, LOG_FORMAT_JSON);
    evaluations = 0;
    capture_begin();
    LOG_DEBUG("m", "debug %s", counted("x"));
    LOG_INFO("m", "info %s", counted("x"));
    log_kv(LOG_INFO, "m", "info kv", "k", "v", NULL);
    log_msg(LOG_INFO, "m", "info direct");
    LOG_WARNING("m", "warning %s", counted("w"));
    LOG_WARN("m", "warn %s", counted("w2"));
    LOG_ERROR("m", "error %s", counted("e"));
    char *out = capture_end();
    assert_int_equal(evaluations, 3); /* filtered lines do not evaluate their arguments */
    assert_int_equal(count_lines(out), 3);
    assert_null(strstr(out, "debug"));
    assert_null(strstr(out, "info"));
    assert_non_null(strstr(out, "\"level\":\"WARNING\",\"logger\":\"m\",\"msg\":\"warning w\""));
    assert_non_null(strstr(out, "\"level\":\"WARNING\",\"logger\":\"m\",\"msg\":\"warn w2\""));
    assert_non_null(strstr(out, "\"level\":\"ERROR\",\"logger\":\"m\",\"msg\":\"error e\""));
    assert_false(log_enabled(LOG_INFO));
    assert_true(log_enabled(LOG_WARNING));
    free(out);

    log_init(LOG_ERROR, LOG_FORMAT_JSON);
    capture_begin();
    LOG_WARNING("m", "no");
    LOG_ERROR("m", "yes");
    out = capture_end();
    assert_int_equal(count_lines(out), 1);
    assert_non_null(strstr(out, "\"msg\":\"yes\""));
    free(out);

    log_init(LOG_DEBUG, LOG_FORMAT_JSON);
    capture_begin();
    LOG_DEBUG("m", "dbg");
    out = capture_end();
    assert_non_null(strstr(out, "\"level\":\"DEBUG\""));
    free(out);
}

static void test_level_and_format_parse(void **state)
{
    static const struct {
        const char *in;
        log_level_t want;
    } ok[] = {
        {"DEBUG", LOG_DEBUG},  {"debug", LOG_DEBUG},     {"Info", LOG_INFO},
        {"INFO", LOG_INFO},    {"WARNING", LOG_WARNING}, {"warning", LOG_WARNING},
        {"WARN", LOG_WARNING}, {"wArN", LOG_WARNING},    {"ERROR", LOG_ERROR},
        {"error", LOG_ERROR},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        log_level_t l = (log_level_t)-1;
        assert_int_equal(log_level_parse(&l, ok[i].in), 0);
        assert_int_equal(l, ok[i].want);
    }
    static const char *const bad[] = {"", "verbose", "WARNINGS", "info ", "CRITICAL", "3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        log_level_t l = LOG_INFO;
        assert_int_equal(log_level_parse(&l, bad[i]), -EINVAL);
    }
    log_format_t f;
    assert_int_equal(log_format_parse(&f, "JSON"), 0);
    assert_int_equal(f, LOG_FORMAT_JSON);
    assert_int_equal(log_format_parse(&f, "Console"), 0);
    assert_int_equal(f, LOG_FORMAT_CONSOLE);
    assert_int_equal(log_format_parse(&f, "text"), -EINVAL);
    assert_string_equal(log_level_name(LOG_WARNING), "WARNING");
}

static void test_console_format(void **state)
{
    log_init(LOG_INFO, LOG_FORMAT_CONSOLE);
    capture_begin();
    log_kv(LOG_INFO, "ledger", "connected", "host", "db", "note", "two words", "q", "a\"b", "e", "",
           "n", NULL, NULL);
    LOG_WARNING("grpc", "line one\nline two\ttab");
    char *out = capture_end();
    log_init(LOG_DEBUG, LOG_FORMAT_JSON);
    assert_int_equal(count_lines(out), 2);
    assert_true(
        matches("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z "
                "INFO    ledger: connected host=db note=\"two words\" q=\"a\\\\\"b\" e=\"\" "
                "n=null\n[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{15}Z WARNING grpc: "
                "line one\\\\nline two\\\\ttab\n$",
                out));
    free(out);
}

/* ---- credentials ---- */

static void test_mask_table(void **state)
{
    static const struct {
        const char *in, *want;
    } cases[] = {
        {"postgresql://payment:S3cretPw@db:5432/payment_db",
         "postgresql://payment:***@db:5432/payment_db"},
        {"redis://:R3disPw@localhost:6379/0", "redis://:***@localhost:6379/0"},
        {"postgresql+asyncpg://u:p%40ss@h/db", "postgresql+asyncpg://u:***@h/db"},
        {"postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"},
        {"postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"},
        {"amqp://u:p:w@h", "amqp://u:***@h"},
        {"postgresql://user@h/db", "postgresql://user@h/db"},
        {"redis://localhost:6379/0", "redis://localhost:6379/0"},
        {"http://example.com/a?b=c", "http://example.com/a?b=c"},
        {"postgresql://u@h/db?password=QueryPw&sslmode=require",
         "postgresql://u@h/db?password=***&sslmode=require"},
        {"host=db user=app password=ConnPw dbname=x", "host=db user=app password=*** dbname=x"},
        {"password='a b c' host=x", "password=*** host=x"},
        {"password='it\\'s' host=x", "password=*** host=x"},
        {"PASSWORD = UpperPw", "PASSWORD = ***"},
        {"{\"password\": \"JsonPw\", \"user\": \"u\"}", "{\"password\": ***, \"user\": \"u\"}"},
        {"password: ColonPw", "password: ***"},
        {"db_password=UnderPw;", "db_password=***"},
        {"client_secret=Sec", "client_secret=***"},
        {"password authentication failed for user \"x\"",
         "password authentication failed for user \"x\""},
        {"connect to \"postgresql://a:QuotedPw@h/d\" failed",
         "connect to \"postgresql://a:***@h/d\" failed"},
        {"two postgresql://a:One@h/d redis://:Two@r:1/0 end",
         "two postgresql://a:***@h/d redis://:***@r:1/0 end"},
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[256];
        assert_int_equal(log_mask(out, sizeof out, cases[i].in), 0);
        assert_string_equal(out, cases[i].want);
    }
}

static void test_mask_url_truncation(void **state)
{
    char out[64];
    assert_int_equal(
        log_mask_url(out, sizeof out, "postgresql://payment:S3cretPw@db:5432/payment_db"), 0);
    assert_string_equal(out, "postgresql://payment:***@db:5432/payment_db");
    char small[20];
    memset(small, 'X', sizeof small);
    assert_int_equal(
        log_mask_url(small, sizeof small, "postgresql://payment:S3cretPw@db:5432/payment_db"),
        -ENOSPC);
    assert_string_equal(small, "postgresql://paymen");
    /* a whole URL: even a raw space in the password does not end it */
    assert_int_equal(log_mask_url(out, sizeof out, "postgresql://u:p w@h/db"), 0);
    assert_string_equal(out, "postgresql://u:***@h/db");
    /* the cut is made after masking: no prefix of the password survives */
    char tiny[26];
    assert_int_equal(log_mask_url(tiny, sizeof tiny, "postgresql://payment:S3cretPw@db"), -ENOSPC);
    assert_string_equal(tiny, "postgresql://payment:***@");
}

static const char *const secrets[] = {"S3cretPw", "R3disPw", "ConnPw", "KvPw",
                                      "ColonPw",  "FieldPw", "AliasPw"};

static void log_credentials(void)
{
    LOG_INFO("db", "connecting to postgresql://payment:S3cretPw@db:5432/payment_db");
    LOG_WARNING("redis", "redis url redis://:R3disPw@localhost:6379/0 down");
    LOG_ERROR("db", "conninfo host=db password=ConnPw dbname=x failed");
    log_kv(LOG_INFO, "kv", "fields", "url", "postgresql+asyncpg://u:KvPw@h/db", "cfg",
           "password: ColonPw", "password", "FieldPw", "DB_PASSWORD", "AliasPw", NULL);
}

static void check_no_secret(const char *out)
{
    for (size_t i = 0; i < sizeof secrets / sizeof secrets[0]; i++)
        if (strstr(out, secrets[i]) != NULL)
            fail_msg("secret %s leaked in: %s", secrets[i], out);
}

static void test_credentials_never_logged_json(void **state)
{
    log_init(LOG_DEBUG, LOG_FORMAT_JSON);
    capture_begin();
    log_credentials();
    char *out = capture_end();
    assert_int_equal(count_lines(out), 4);
    check_no_secret(out);
    jobj_t o;
    const char *line = out;
    const char *want[] = {
        "connecting to postgresql://payment:***@db:5432/payment_db",
        "redis url redis://:***@localhost:6379/0 down",
        "conninfo host=db password=*** dbname=x failed",
        "fields",
    };
    for (int i = 0; i < 4; i++) {
        const char *nl = strchr(line, '\n');
        assert_int_equal(jparse_line(line, (size_t)(nl - line) + 1, &o), 0);
        assert_string_equal(jget(&o, "msg"), want[i]);
        if (i == 3) {
            assert_string_equal(jget(&o, "url"), "postgresql+asyncpg://u:***@h/db");
            assert_string_equal(jget(&o, "cfg"), "password: ***");
            assert_string_equal(jget(&o, "password"), "***");
            assert_string_equal(jget(&o, "DB_PASSWORD"), "***");
        }
        jobj_free(&o);
        line = nl + 1;
    }
    free(out);
}

static void test_credentials_never_logged_console(void **state)
{
    log_init(LOG_DEBUG, LOG_FORMAT_CONSOLE);
    capture_begin();
    log_credentials();
    char *out = capture_end();
    log_init(LOG_DEBUG, LOG_FORMAT_JSON);
    assert_int_equal(count_lines(out), 4);
    check_no_secret(out);
    assert_non_null(strstr(out, "connecting to postgresql://payment:***@db:5432/payment_db\n"));
    assert_non_null(strstr(out, "redis url redis://:***@localhost:6379/0 down\n"));
    assert_non_null(strstr(out, "conninfo host=db password=*** dbname=x failed\n"));
    assert_non_null(strstr(out, "fields url=postgresql+asyncpg://u:***@h/db cfg=\"password: ***\" "
                                "password=*** DB_PASSWORD=***\n"));
    free(out);
}

/* ---- threads: one write per line, so concurrent lines never interleave ---- */

enum { THREADS = 8, LINES = 400 };

typedef struct reader {
    int fd;
    char *buf;
    size_t len, cap;
} reader_t;

static void *reader_main(void *arg)
{
    reader_t *r = arg;
    for (;;) {
        if (r->len + 65536 > r->cap) {
            r->cap = r->cap * 2 + 65536;
            r->buf = realloc(r->buf, r->cap);
        }
        ssize_t n = read(r->fd, r->buf + r->len, r->cap - r->len - 1);
        if (n <= 0)
            break;
        r->len += (size_t)n;
    }
    r->buf[r->len] = '\0';
    return NULL;
}

static void *writer_main(void *arg)
{
    int t = (int)(intptr_t)arg;
    char pad[1800];
    memset(pad, 'a' + t, sizeof pad - 1);
    pad[sizeof pad - 1] = '\0';
    for (int i = 0; i < LINES; i++) {
        char idx[16];
        snprintf(idx, sizeof idx, "%d", i);
        log_kv(LOG_INFO, "w", pad, "thread", (char[]){(char)('0' + t), 0}, "i", idx, NULL);
    }
    return NULL;
}

static void test_concurrent_lines_intact(void **state)
{
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    int old = log_set_fd(p[1]);
    reader_t r = {.fd = p[0]};
    pthread_t rd, w[THREADS];
    assert_int_equal(pthread_create(&rd, NULL, reader_main, &r), 0);
    for (int t = 0; t < THREADS; t++)
        assert_int_equal(pthread_create(&w[t], NULL, writer_main, (void *)(intptr_t)t), 0);
    for (int t = 0; t < THREADS; t++)
        pthread_join(w[t], NULL);
    log_set_fd(old);
    close(p[1]);
    pthread_join(rd, NULL);
    close(p[0]);

    int seen[THREADS][LINES];
    memset(seen, 0, sizeof seen);
    int lines = 0;
    const char *line = r.buf;
    while (*line) {
        const char *nl = strchr(line, '\n');
        assert_non_null(nl);
        jobj_t o;
        assert_int_equal(jparse_line(line, (size_t)(nl - line) + 1, &o), 0);
        int t = jget(&o, "thread")[0] - '0';
        int i = atoi(jget(&o, "i"));
        assert_true(t >= 0 && t < THREADS && i >= 0 && i < LINES);
        const char *m = jget(&o, "msg");
        assert_int_equal(strlen(m), 1799);
        assert_int_equal(strspn(m, (char[]){(char)('a' + t), 0}), 1799);
        seen[t][i]++;
        jobj_free(&o);
        lines++;
        line = nl + 1;
    }
    assert_int_equal(lines, THREADS * LINES);
    for (int t = 0; t < THREADS; t++)
        for (int i = 0; i < LINES; i++)
            assert_int_equal(seen[t][i], 1);
    free(r.buf);
}

static void test_set_fd_returns_previous(void **state)
{
    int old = log_set_fd(7);
    assert_int_equal(log_set_fd(old), 7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_json_line_fields, setup),
        cmocka_unit_test_setup(test_json_timestamp_is_now_utc, setup),
        cmocka_unit_test_setup(test_json_escaping, setup),
        cmocka_unit_test_setup(test_json_invalid_utf8_replaced, setup),
        cmocka_unit_test_setup(test_reserved_keys_renamed, setup),
        cmocka_unit_test_setup(test_long_message, setup),
        cmocka_unit_test_setup(test_level_threshold, setup),
        cmocka_unit_test_setup(test_level_and_format_parse, setup),
        cmocka_unit_test_setup(test_console_format, setup),
        cmocka_unit_test_setup(test_mask_table, setup),
        cmocka_unit_test_setup(test_mask_url_truncation, setup),
        cmocka_unit_test_setup(test_credentials_never_logged_json, setup),
        cmocka_unit_test_setup(test_credentials_never_logged_console, setup),
        cmocka_unit_test_setup(test_concurrent_lines_intact, setup),
        cmocka_unit_test_setup(test_set_fd_returns_previous, setup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
