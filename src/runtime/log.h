/*
 * log: structured log lines to stderr (or any fd), one write(2) per line.
 *
 * Formats: `json` (one object per line: ts, level, logger, msg, then the caller's
 * key/value fields, every string JSON-escaped and made valid UTF-8) and `console` (one
 * human-readable line). Levels DEBUG < INFO < WARNING < ERROR; a line is written when its
 * level is at or above the threshold. The LOG_* macros test the threshold with one relaxed
 * atomic load before evaluating their arguments, so filtered lines cost almost nothing.
 *
 * Credentials never reach the sink: every message, field value and log_mask() output has
 * URL passwords (`scheme://user:pass@`, `scheme://:pass@`) and `password=…` / `password: …`
 * pairs (any key ending in password, passwd, pwd or secret, any case) replaced by `***`,
 * whatever the call site passed. A field whose key is such a key is masked entirely.
 *
 * Thread-safety: every function may be called from any thread at any time. log_init and
 * log_set_fd are meant for start-up (and tests); lines racing with them use either the old
 * or the new setting.
 *
 * Naming: LOG_INFO is both an enumerator (`log_kv(LOG_INFO, …)`) and a function-like
 * macro (`LOG_INFO("ledger", "fmt", …)`); the preprocessor only expands it when followed
 * by `(`. Do not include <syslog.h> in the same file (it defines the same names).
 */
#ifndef PAY_RUNTIME_LOG_H
#define PAY_RUNTIME_LOG_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

typedef enum log_level {
    LOG_DEBUG = 0,
    LOG_INFO = 1,
    LOG_WARNING = 2,
    LOG_ERROR = 3,
} log_level_t;

typedef enum log_format {
    LOG_FORMAT_JSON = 0,
    LOG_FORMAT_CONSOLE = 1,
} log_format_t;

/* Private: the threshold, read by log_enabled() on every call site. Relaxed loads are
 * enough: it is an independent flag, no other memory is published through it. */
extern _Atomic int log__threshold;

/** Set the threshold and the format (defaults before any call: INFO, json). */
void log_init(log_level_t level, log_format_t format);
/** Write lines to fd instead of 2 (stderr); tests point it at a pipe. Returns the old fd. */
int log_set_fd(int fd);
/** True when a line of this level would be written. */
static inline bool log_enabled(log_level_t level)
{
    return (int)level >= atomic_load_explicit(&log__threshold, memory_order_relaxed);
}

/** "DEBUG", "INFO", "WARNING" (also "WARN") or "ERROR", any case → 0, else -EINVAL. */
int log_level_parse(log_level_t *out, const char *s);
/** "json" or "console", any case → 0, else -EINVAL. */
int log_format_parse(log_format_t *out, const char *s);
/** "DEBUG", "INFO", "WARNING", "ERROR". */
const char *log_level_name(log_level_t level);

/** One line with a printf-formatted message. */
void log_msg(log_level_t level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/** One line: msg plus key, value, key, value, …, NULL (string values; NULL value = null;
 *  at most 64 pairs are kept). */
void log_kv(log_level_t level, const char *module, const char *msg, ...) __attribute__((sentinel));
/** One line: msg plus npairs key/value pairs from kv[0..2*npairs). */
void log_kvv(log_level_t level, const char *module, const char *msg, const char *const *kv,
             size_t npairs);

/** Copy text to dst with every credential masked (see top). Always NUL-terminates when
 *  dstlen > 0. 0, or -ENOSPC when the masked text was truncated to fit. */
int log_mask(char *dst, size_t dstlen, const char *text);
/** log_mask for text that is one URL (`postgresql://u:pw@h/db` → `postgresql://u:***@h/db`):
 *  the userinfo may contain anything, even a space, and is still masked whole. */
int log_mask_url(char *dst, size_t dstlen, const char *url);

#define LOG_DEBUG(module, ...)                                                                     \
    do {                                                                                           \
        if (log_enabled(LOG_DEBUG))                                                                \
            log_msg(LOG_DEBUG, (module), __VA_ARGS__);                                             \
    } while (0)
#define LOG_INFO(module, ...)                                                                      \
    do {                                                                                           \
        if (log_enabled(LOG_INFO))                                                                 \
            log_msg(LOG_INFO, (module), __VA_ARGS__);                                              \
    } while (0)
#define LOG_WARNING(module, ...)                                                                   \
    do {                                                                                           \
        if (log_enabled(LOG_WARNING))                                                              \
            log_msg(LOG_WARNING, (module), __VA_ARGS__);                                           \
    } while (0)
#define LOG_WARN(module, ...) LOG_WARNING(module, __VA_ARGS__)
#define LOG_ERROR(module, ...)                                                                     \
    do {                                                                                           \
        if (log_enabled(LOG_ERROR))                                                                \
            log_msg(LOG_ERROR, (module), __VA_ARGS__);                                             \
    } while (0)

#endif
