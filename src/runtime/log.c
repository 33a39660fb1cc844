/*
 * log: formatting, masking and the single write(2) per line.
 *
 * DESIGN. A line is built in a growable buffer that starts on the stack (most lines never
 * touch the heap): the message is formatted in full, masked in full (masking after a
 * truncation could cut a URL before its '@' and let half a password through), then
 * escaped into the line with a size cap. The finished line goes out with one write(2);
 * short writes (a full pipe) are continued, EINTR retried. Nothing here takes a lock:
 * configuration lives in relaxed atomics and each call owns its buffers.
 */
#include "runtime/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* Relaxed everywhere: these are independent settings; a line racing with a change may use
 * either value, and no other data is published through them. */
_Atomic int log__threshold = LOG_INFO;
static _Atomic int g_format = LOG_FORMAT_JSON;
static _Atomic int g_fd = 2;

enum {
    MSG_CAP = 16 * 1024,  /* bytes of (masked) message kept in a line */
    VALUE_CAP = 4 * 1024, /* bytes of each field value */
};

/* ---- growable buffer: inline storage first, heap beyond it ---- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    char inline_[1024];
} sbuf_t;

static void sb_init(sbuf_t *b)
{
    b->p = b->inline_;
    b->len = 0;
    b->cap = sizeof b->inline_;
}

static void sb_free(sbuf_t *b)
{
    if (b->p != b->inline_)
        free(b->p);
    sb_init(b);
}

static void sb_reserve(sbuf_t *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap * 2;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = b->p == b->inline_ ? malloc(cap) : realloc(b->p, cap);
    if (p == NULL)
        abort(); /* allocation failure while logging: nothing sensible left to do */
    if (b->p == b->inline_)
        memcpy(p, b->inline_, b->len);
    b->p = p;
    b->cap = cap;
}

static void sb_put(sbuf_t *b, const char *s, size_t n)
{
    sb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf_t *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_putc(sbuf_t *b, char c)
{
    sb_put(b, &c, 1);
}

/* ---- masking ---- */

static bool is_key_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-' || c == '.';
}

static bool is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Does the key (any case) name a credential? Keys ending in one of these words do. */
static bool key_is_secret(const char *k, size_t n)
{
    static const char *const words[] = {"password", "passwd", "pwd", "secret"};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++) {
        size_t wl = strlen(words[i]);
        if (n >= wl && strncasecmp(k + n - wl, words[i], wl) == 0)
            return true;
    }
    return false;
}

/* End of a URL token starting at s[j]: whitespace, quotes, angle brackets or the end;
 * just the end when the whole text is one URL (log_mask_url). */
static size_t url_token_end(const char *s, size_t j, size_t n, bool whole)
{
    if (whole)
        return n;
    while (j < n && !is_space((unsigned char)s[j]) && s[j] != '"' && s[j] != '\'' && s[j] != '<' &&
           s[j] != '>' && s[j] != '`')
        j++;
    return j;
}

/*
 * URL userinfo at s[j..] (just after "://"). The userinfo ends at the last '@' before the
 * first '/', '?' or '#' that follows the first '@': a raw password may contain '/' or '@',
 * and masking a little too much is always better than too little. Returns true and the
 * positions of the first ':' and of that '@' when the userinfo holds a password.
 */
static bool url_password_span(const char *s, size_t j, size_t n, bool whole, size_t *colon,
                              size_t *at)
{
    size_t t = url_token_end(s, j, n, whole);
    size_t a1 = j;
    while (a1 < t && s[a1] != '@')
        a1++;
    if (a1 == t)
        return false;
    size_t e = a1 + 1;
    while (e < t && s[e] != '/' && s[e] != '?' && s[e] != '#')
        e++;
    size_t a = e;
    while (s[a - 1] != '@')
        a--;
    a--; /* s[a] == '@', a >= a1 */
    size_t c = j;
    while (c < a && s[c] != ':')
        c++;
    if (c == a)
        return false; /* user only, no password */
    *colon = c;
    *at = a;
    return true;
}

/* Length of a credential value at s[p..]: a quoted string (with backslash escapes, quotes
 * included) or a run up to whitespace, '&', or a quote. */
static size_t secret_value_len(const char *s, size_t p, size_t n)
{
    size_t q = p;
    if (q < n && (s[q] == '"' || s[q] == '\'')) {
        char quote = s[q++];
        while (q < n && s[q] != quote) {
            if (s[q] == '\\' && q + 1 < n)
                q++;
            q++;
        }
        if (q < n)
            q++; /* closing quote */
        return q - p;
    }
    while (q < n && !is_space((unsigned char)s[q]) && s[q] != '&' && s[q] != '"' && s[q] != '\'')
        q++;
    return q - p;
}

/* Append s[0..n) to out with every credential replaced by "***". whole: s is one URL, so
 * its userinfo may even contain characters that end a URL in running text. */
static void mask_append(sbuf_t *out, const char *s, size_t n, bool whole)
{
    size_t i = 0;
    while (i < n) {
        if (n - i >= 3 && s[i] == ':' && s[i + 1] == '/' && s[i + 2] == '/') {
            size_t colon, at;
            sb_put(out, "://", 3);
            i += 3;
            if (url_password_span(s, i, n, whole, &colon, &at)) {
                sb_put(out, s + i, colon + 1 - i);
                sb_put(out, "***", 3);
                i = at; /* continue at '@': host, path and query are scanned normally */
            }
            continue;
        }
        if (is_key_char((unsigned char)s[i]) && (i == 0 || !is_key_char((unsigned char)s[i - 1]))) {
            size_t ke = i;
            while (ke < n && is_key_char((unsigned char)s[ke]))
                ke++;
            if (key_is_secret(s + i, ke - i)) {
                size_t p = ke;
                if (p < n && (s[p] == '"' || s[p] == '\'') && i > 0 && s[i - 1] == s[p])
                    p++; /* "password": … */
                while (p < n && (s[p] == ' ' || s[p] == '\t'))
                    p++;
                bool sep =
                    p < n && (s[p] == '=' ||
                              (s[p] == ':' && !(p + 2 < n && s[p + 1] == '/' && s[p + 2] == '/')));
                if (sep) {
                    p++;
                    while (p < n && (s[p] == ' ' || s[p] == '\t'))
                        p++;
                    size_t vl = secret_value_len(s, p, n);
                    if (vl > 0) {
                        sb_put(out, s + i, p - i);
                        sb_put(out, "***", 3);
                        i = p + vl;
                        continue;
                    }
                }
            }
            sb_put(out, s + i, ke - i);
            i = ke;
            continue;
        }
        sb_putc(out, s[i]);
        i++;
    }
}

static int mask_copy(char *dst, size_t dstlen, const char *text, bool whole)
{
    sbuf_t b;
    sb_init(&b);
    mask_append(&b, text, strlen(text), whole);
    int rc = 0;
    if (dstlen > 0) {
        size_t n = b.len;
        if (n >= dstlen) {
            n = dstlen - 1;
            rc = -ENOSPC;
        }
        memcpy(dst, b.p, n);
        dst[n] = '\0';
    } else if (b.len > 0) {
        rc = -ENOSPC;
    }
    sb_free(&b);
    return rc;
}

int log_mask(char *dst, size_t dstlen, const char *text)
{
    return mask_copy(dst, dstlen, text, false);
}

int log_mask_url(char *dst, size_t dstlen, const char *url)
{
    return mask_copy(dst, dstlen, url, true);
}

/* ---- escaping ---- */

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one. */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[k] & 0x3f);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return len;
}

/* Append s[0..n) as the inside of a JSON string (or, console = true, as readable text
 * with control characters escaped), at most cap input bytes, then a truncation mark. */
static void escape_append(sbuf_t *out, const char *s, size_t n, size_t cap, bool console,
                          bool quote_escapes)
{
    size_t i = 0;
    while (i < n) {
        if (i >= cap) {
            sb_puts(out, "...[truncated]");
            return;
        }
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            size_t l = utf8_seq_len((const unsigned char *)s + i, n - i);
            if (l == 0) {
                if (console) {
                    char hex[8];
                    snprintf(hex, sizeof hex, "\\x%02x", c);
                    sb_puts(out, hex);
                } else {
                    sb_puts(out, "\\ufffd");
                }
                i++;
            } else {
                sb_put(out, s + i, l);
                i += l;
            }
            continue;
        }
        switch (c) {
        case '"':
            if (!console || quote_escapes)
                sb_puts(out, "\\\"");
            else
                sb_putc(out, '"');
            break;
        case '\\':
            if (!console || quote_escapes)
                sb_puts(out, "\\\\");
            else
                sb_putc(out, '\\');
            break;
        case '\n':
            sb_puts(out, "\\n");
            break;
        case '\r':
            sb_puts(out, "\\r");
            break;
        case '\t':
            sb_puts(out, "\\t");
            break;
        case '\b':
            sb_puts(out, "\\b");
            break;
        case '\f':
            sb_puts(out, "\\f");
            break;
        default:
            if (c < 0x20 || c == 0x7f) {
                char hex[8];
                snprintf(hex, sizeof hex, console ? "\\x%02x" : "\\u%04x", c);
                sb_puts(out, hex);
            } else {
                sb_putc(out, (char)c);
            }
        }
        i++;
    }
}

/* ---- the line ---- */

static const char *const level_names[] = {"DEBUG", "INFO", "WARNING", "ERROR"};

const char *log_level_name(log_level_t level)
{
    if ((unsigned)level > LOG_ERROR)
        return "UNKNOWN";
    return level_names[level];
}

int log_level_parse(log_level_t *out, const char *s)
{
    for (int i = 0; i <= LOG_ERROR; i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (log_level_t)i;
            return 0;
        }
    }
    if (strcasecmp(s, "WARN") == 0) {
        *out = LOG_WARNING;
        return 0;
    }
    return -EINVAL;
}

int log_format_parse(log_format_t *out, const char *s)
{
    if (strcasecmp(s, "json") == 0) {
        *out = LOG_FORMAT_JSON;
        return 0;
    }
    if (strcasecmp(s, "console") == 0) {
        *out = LOG_FORMAT_CONSOLE;
        return 0;
    }
    return -EINVAL;
}

void log_init(log_level_t level, log_format_t format)
{
    atomic_store_explicit(&log__threshold, (int)level, memory_order_relaxed);
    atomic_store_explicit(&g_format, (int)format, memory_order_relaxed);
}

int log_set_fd(int fd)
{
    return atomic_exchange_explicit(&g_fd, fd, memory_order_relaxed);
}

/* RFC 3339 UTC with microseconds: 2025-01-31T12:00:00.123456Z */
static void put_timestamp(sbuf_t *b)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    char buf[96]; /* room for any int the compiler can imagine */
    snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000);
    sb_puts(b, buf);
}

/* Mask s, then escape the masked text into line (capped at cap bytes). */
static void put_masked(sbuf_t *line, const char *s, size_t cap, bool console, bool quote_escapes)
{
    sbuf_t m;
    sb_init(&m);
    mask_append(&m, s, strlen(s), false);
    escape_append(line, m.p, m.len, cap, console, quote_escapes);
    sb_free(&m);
}

static bool json_reserved_key(const char *k)
{
    return strcmp(k, "ts") == 0 || strcmp(k, "level") == 0 || strcmp(k, "logger") == 0 ||
           strcmp(k, "msg") == 0;
}

/* Console values are quoted when they would not read back as one token. */
static bool console_needs_quotes(const char *v)
{
    if (*v == '\0')
        return true;
    for (const unsigned char *p = (const unsigned char *)v; *p; p++)
        if (*p <= ' ' || *p == '"' || *p == '=' || *p == '\\' || *p == 0x7f)
            return true;
    return false;
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return; /* nowhere left to report a failing log sink */
        }
        p += w;
        n -= (size_t)w;
    }
}

static void emit(log_level_t level, const char *module, const char *msg, const char *const *kv,
                 size_t npairs)
{
    bool console = atomic_load_explicit(&g_format, memory_order_relaxed) == LOG_FORMAT_CONSOLE;
    if (module == NULL)
        module = "";
    sbuf_t line;
    sb_init(&line);
    if (console) {
        put_timestamp(&line);
        char lv[16];
        snprintf(lv, sizeof lv, " %-7s ", log_level_name(level));
        sb_puts(&line, lv);
        put_masked(&line, module, 256, true, false);
        sb_puts(&line, ": ");
        put_masked(&line, msg, MSG_CAP, true, false);
        for (size_t i = 0; i < npairs; i++) {
            const char *k = kv[2 * i] ? kv[2 * i] : "";
            const char *v = kv[2 * i + 1];
            sb_putc(&line, ' ');
            put_masked(&line, k, 256, true, false);
            sb_putc(&line, '=');
            if (v == NULL) {
                sb_puts(&line, "null");
            } else if (key_is_secret(k, strlen(k))) {
                sb_puts(&line, "***");
            } else if (console_needs_quotes(v)) {
                sb_putc(&line, '"');
                put_masked(&line, v, VALUE_CAP, true, true);
                sb_putc(&line, '"');
            } else {
                put_masked(&line, v, VALUE_CAP, true, true);
            }
        }
    } else {
        sb_puts(&line, "{\"ts\":\"");
        put_timestamp(&line);
        sb_puts(&line, "\",\"level\":\"");
        sb_puts(&line, log_level_name(level));
        sb_puts(&line, "\",\"logger\":\"");
        put_masked(&line, module, 256, false, true);
        sb_puts(&line, "\",\"msg\":\"");
        put_masked(&line, msg, MSG_CAP, false, true);
        sb_putc(&line, '"');
        for (size_t i = 0; i < npairs; i++) {
            const char *k = kv[2 * i] ? kv[2 * i] : "";
            const char *v = kv[2 * i + 1];
            sb_puts(&line, ",\"");
            if (json_reserved_key(k))
                sb_puts(&line, "field_"); /* never a duplicate key */
            put_masked(&line, k, 256, false, true);
            sb_puts(&line, "\":");
            if (v == NULL) {
                sb_puts(&line, "null");
            } else if (key_is_secret(k, strlen(k))) {
                sb_puts(&line, "\"***\"");
            } else {
                sb_putc(&line, '"');
                put_masked(&line, v, VALUE_CAP, false, true);
                sb_putc(&line, '"');
            }
        }
        sb_putc(&line, '}');
    }
    sb_putc(&line, '\n');
    write_all(atomic_load_explicit(&g_fd, memory_order_relaxed), line.p, line.len);
    sb_free(&line);
}

void log_msg(log_level_t level, const char *module, const char *fmt, ...)
{
    if (!log_enabled(level))
        return;
    char small[1024];
    char *msg = small;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        msg = "(log format error)";
    } else if ((size_t)n >= sizeof small) {
        msg = malloc((size_t)n + 1);
        if (msg == NULL)
            abort();
        va_start(ap, fmt);
        vsnprintf(msg, (size_t)n + 1, fmt, ap);
        va_end(ap);
    }
    emit(level, module, msg, NULL, 0);
    if (msg != small && n >= 0)
        free(msg);
}

void log_kvv(log_level_t level, const char *module, const char *msg, const char *const *kv,
             size_t npairs)
{
    if (!log_enabled(level))
        return;
    emit(level, module, msg ? msg : "", kv, npairs);
}

void log_kv(log_level_t level, const char *module, const char *msg, ...)
{
    if (!log_enabled(level))
        return;
    enum { MAX_PAIRS = 64 };
    const char *kv[2 * MAX_PAIRS];
    size_t n = 0;
    va_list ap;
    va_start(ap, msg);
    for (;;) {
        const char *k = va_arg(ap, const char *);
        if (k == NULL)
            break;
        const char *v = va_arg(ap, const char *);
        if (n < MAX_PAIRS) {
            kv[2 * n] = k;
            kv[2 * n + 1] = v;
            n++;
        }
    }
    va_end(ap);
    emit(level, module, msg ? msg : "", kv, n);
}
