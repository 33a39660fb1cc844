/*
 * config: defaults → environment → flags, each value parsed and validated as applied.
 *
 * DESIGN. The table is the only description of a setting; the flag name, the help and the
 * error messages are all derived from it, so they cannot drift apart. Parsing is strict
 * (no trailing junk, no hex, no NaN, ranges inclusive) and errors always quote the
 * offending text after masking credentials and escaping control characters, so an error
 * message is safe to log as is.
 */
#include "runtime/config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "runtime/log.h"

enum { QUOTE_MAX = 200 }; /* bytes of an offending value quoted in an error */

/* ---- helpers ---- */

void config_flag_name(char *dst, size_t dstlen, const char *name)
{
    if (dstlen == 0)
        return;
    size_t j = 0;
    for (const char *p = "--"; *p && j + 1 < dstlen; p++)
        dst[j++] = *p;
    for (const char *p = name; *p && j + 1 < dstlen; p++)
        dst[j++] = *p == '_' ? '-' : (char)tolower((unsigned char)*p);
    dst[j] = '\0';
}

/* The value as it may appear in a message: credentials masked (all of it for a secret
 * setting), control characters and quotes escaped, cut at QUOTE_MAX bytes. */
static void quote_value(char *dst, size_t dstlen, const config_setting_t *s, const char *raw)
{
    char masked[QUOTE_MAX * 2];
    if ((s->flags & CONFIG_F_SECRET) && raw[0] != '\0')
        snprintf(masked, sizeof masked, "***");
    else
        log_mask_url(masked, sizeof masked, raw);
    size_t j = 0, i = 0;
    for (; masked[i] && i < QUOTE_MAX; i++) {
        unsigned char c = (unsigned char)masked[i];
        char esc[8];
        if (c == '"' || c == '\\')
            snprintf(esc, sizeof esc, "\\%c", c);
        else if (c == '\n')
            snprintf(esc, sizeof esc, "\\n");
        else if (c == '\t')
            snprintf(esc, sizeof esc, "\\t");
        else if (c == '\r')
            snprintf(esc, sizeof esc, "\\r");
        else if (c < 0x20 || c == 0x7f)
            snprintf(esc, sizeof esc, "\\x%02x", c);
        else
            esc[0] = (char)c, esc[1] = '\0';
        size_t el = strlen(esc);
        if (j + el + 4 >= dstlen)
            break;
        memcpy(dst + j, esc, el);
        j += el;
    }
    if (masked[i] != '\0' && j + 4 < dstlen) {
        memcpy(dst + j, "...", 3);
        j += 3;
    }
    dst[j] = '\0';
}

/* Copy of s without surrounding whitespace (heap). */
static char *trimmed_dup(const char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        n--;
    char *d = malloc(n + 1);
    if (d == NULL)
        abort();
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static int parse_int64(const char *t, int64_t *out)
{
    const char *p = t;
    if (*p == '+' || *p == '-')
        p++;
    if (!isdigit((unsigned char)*p))
        return -EINVAL;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q))
            return -EINVAL;
    errno = 0;
    long long v = strtoll(t, NULL, 10);
    if (errno == ERANGE)
        return -ERANGE;
    *out = (int64_t)v;
    return 0;
}

/* A decimal number (digits, '.', exponent) at the start of t; *end after it. */
static int parse_number_prefix(const char *t, double *out, const char **end)
{
    const char *p = t;
    if (*p == '+' || *p == '-')
        p++;
    bool digits = false;
    while (isdigit((unsigned char)*p))
        p++, digits = true;
    if (*p == '.') {
        p++;
        while (isdigit((unsigned char)*p))
            p++, digits = true;
    }
    if (!digits)
        return -EINVAL;
    if (*p == 'e' || *p == 'E') {
        const char *e = p + 1;
        if (*e == '+' || *e == '-')
            e++;
        if (isdigit((unsigned char)*e)) {
            while (isdigit((unsigned char)*e))
                e++;
            p = e;
        }
    }
    char *sx;
    errno = 0;
    double v = strtod(t, &sx);
    if (sx != p || errno == ERANGE || !isfinite(v))
        return -EINVAL;
    *out = v;
    *end = p;
    return 0;
}

static int parse_bool(const char *t, bool *out)
{
    static const char *const yes[] = {"true", "1", "yes", "on"};
    static const char *const no[] = {"false", "0", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(t, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(t, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

/* Seconds from "1.5", "1.5s", "250ms", "2m", "1h" (a space before the unit is allowed). */
static int parse_duration(const char *t, double *out)
{
    const char *end;
    double v;
    if (parse_number_prefix(t, &v, &end) < 0)
        return -EINVAL;
    while (*end == ' ')
        end++;
    if (*end == '\0' || strcasecmp(end, "s") == 0)
        *out = v;
    else if (strcasecmp(end, "ms") == 0)
        *out = v / 1000.0;
    else if (strcasecmp(end, "m") == 0)
        *out = v * 60.0;
    else if (strcasecmp(end, "h") == 0)
        *out = v * 3600.0;
    else
        return -EINVAL;
    return 0;
}

static void choices_text(char *dst, size_t dstlen, const config_choice_t *c, const char *sep)
{
    size_t j = 0;
    dst[0] = '\0';
    for (; c && c->name; c++) {
        int n = snprintf(dst + j, dstlen - j, "%s%s", j ? sep : "", c->name);
        if (n < 0 || (size_t)n >= dstlen - j)
            break;
        j += (size_t)n;
    }
}

/* What a value of this setting must be, phrased after "is not". */
static void expectation(char *dst, size_t dstlen, const config_setting_t *s)
{
    char list[512];
    switch (s->type) {
    case CONFIG_STRING:
        snprintf(dst, dstlen, "a valid value");
        break;
    case CONFIG_INT:
        snprintf(dst, dstlen, "an integer in %" PRId64 "..%" PRId64, s->imin, s->imax);
        break;
    case CONFIG_DOUBLE:
        snprintf(dst, dstlen, "a number in %.15g..%.15g", s->dmin, s->dmax);
        break;
    case CONFIG_DURATION:
        snprintf(dst, dstlen, "a duration in %.15g..%.15g seconds (e.g. 1.5, 1.5s, 250ms, 2m)",
                 s->dmin, s->dmax);
        break;
    case CONFIG_BOOL:
        snprintf(dst, dstlen, "a boolean (true/false, 1/0, yes/no, on/off)");
        break;
    case CONFIG_ENUM:
        choices_text(list, sizeof list, s->choices, ", ");
        snprintf(dst, dstlen, "one of %s", list);
        break;
    }
}

/* Parse raw into the setting's target and validate it. label names the source in errors. */
static int apply(config_setting_t *s, const char *raw, const char *label, char *err, size_t errlen)
{
    char q[QUOTE_MAX * 2 + 8];
    char expect[600];
    int rc = 0;
    char *t = s->type == CONFIG_STRING ? NULL : trimmed_dup(raw);

    switch (s->type) {
    case CONFIG_STRING: {
        char **dst = s->target;
        char *v = strdup(raw);
        if (v == NULL)
            abort();
        free(*dst);
        *dst = v;
        break;
    }
    case CONFIG_INT: {
        int64_t v;
        if (parse_int64(t, &v) < 0 || v < s->imin || v > s->imax)
            rc = -EINVAL;
        else
            *(int64_t *)s->target = v;
        break;
    }
    case CONFIG_DOUBLE:
    case CONFIG_DURATION: {
        double v;
        const char *end;
        if (s->type == CONFIG_DOUBLE)
            rc = parse_number_prefix(t, &v, &end) < 0 || *end != '\0' ? -EINVAL : 0;
        else
            rc = parse_duration(t, &v);
        if (rc == 0 && (v < s->dmin || v > s->dmax))
            rc = -EINVAL;
        if (rc == 0)
            *(double *)s->target = v;
        break;
    }
    case CONFIG_BOOL: {
        bool v;
        rc = parse_bool(t, &v);
        if (rc == 0)
            *(bool *)s->target = v;
        break;
    }
    case CONFIG_ENUM: {
        rc = -EINVAL;
        for (const config_choice_t *c = s->choices; c && c->name; c++) {
            if (strcasecmp(t, c->name) == 0) {
                *(int *)s->target = c->value;
                rc = 0;
                break;
            }
        }
        break;
    }
    }
    free(t);

    if (rc < 0) {
        quote_value(q, sizeof q, s, raw);
        expectation(expect, sizeof expect, s);
        snprintf(err, errlen, "%s: \"%s\" is not %s", label, q, expect);
        return -EINVAL;
    }
    if (s->validate) {
        char why[512] = "is not valid";
        rc = s->validate(s->target, why, sizeof why, s->validate_arg);
        if (rc < 0) {
            quote_value(q, sizeof q, s, raw);
            snprintf(err, errlen, "%s: \"%s\" %s", label, q, why);
            return -EINVAL;
        }
    }
    return 0;
}

static const char *env_lookup(char **envp, const char *name)
{
    if (envp == NULL)
        return getenv(name);
    size_t n = strlen(name);
    for (char **e = envp; *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
            return *e + n + 1;
    return NULL;
}

/* The environment value of s (its name or one alias); two different ones are an error. */
static int env_value(const config_setting_t *s, char **envp, const char **value,
                     const char **origin, char *err, size_t errlen)
{
    *value = NULL;
    *origin = NULL;
    const char *names[17];
    size_t n = 0;
    names[n++] = s->name;
    for (const char *const *a = s->aliases; a && *a && n < 16; a++)
        names[n++] = *a;
    for (size_t i = 0; i < n; i++) {
        const char *v = env_lookup(envp, names[i]);
        if (v == NULL)
            continue;
        if (*value == NULL) {
            *value = v;
            *origin = names[i];
        } else if (strcmp(v, *value) != 0) {
            char q1[QUOTE_MAX * 2 + 8], q2[QUOTE_MAX * 2 + 8];
            quote_value(q1, sizeof q1, s, *value);
            quote_value(q2, sizeof q2, s, v);
            snprintf(err, errlen,
                     "%s and %s are both set and differ (\"%s\" vs \"%s\"); set only one", *origin,
                     names[i], q1, q2);
            return -EINVAL;
        }
    }
    return 0;
}

static config_setting_t *find_flag(config_setting_t *table, const char *flag, size_t len)
{
    char f[128];
    for (config_setting_t *s = table; s->name; s++) {
        config_flag_name(f, sizeof f, s->name);
        if (strlen(f) == len && strncmp(f, flag, len) == 0)
            return s;
    }
    return NULL;
}

int config_load(config_setting_t *table, int argc, char **argv, char **envp, char *err,
                size_t errlen)
{
    if (errlen > 0)
        err[0] = '\0';
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return CONFIG_HELP;

    for (config_setting_t *s = table; s->name; s++) {
        char label[160];
        snprintf(label, sizeof label, "%s (default)", s->name);
        if (apply(s, s->def ? s->def : "", label, err, errlen) < 0)
            return -EINVAL;
        s->_source = CONFIG_SOURCE_DEFAULT;
        s->_origin = NULL;
    }

    for (config_setting_t *s = table; s->name; s++) {
        const char *v, *origin;
        if (env_value(s, envp, &v, &origin, err, errlen) < 0)
            return -EINVAL;
        if (v == NULL)
            continue;
        if (apply(s, v, origin, err, errlen) < 0)
            return -EINVAL;
        s->_source = CONFIG_SOURCE_ENV;
        s->_origin = origin;
    }

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            snprintf(err, errlen,
                     "unexpected argument \"%.100s\" (settings are flags such as --grpc-port "
                     "50051; see --help)",
                     arg);
            return -EINVAL;
        }
        const char *eq = strchr(arg, '=');
        size_t flen = eq ? (size_t)(eq - arg) : strlen(arg);
        config_setting_t *s = find_flag(table, arg, flen);
        if (s == NULL) {
            snprintf(err, errlen, "unknown flag \"%.*s\" (see --help)",
                     (int)(flen > 100 ? 100 : flen), arg);
            return -EINVAL;
        }
        char flag[128];
        config_flag_name(flag, sizeof flag, s->name);
        const char *v;
        if (eq) {
            v = eq + 1;
        } else if (i + 1 < argc &&
                   !(s->type == CONFIG_BOOL && strncmp(argv[i + 1], "--", 2) == 0)) {
            v = argv[++i];
        } else if (s->type == CONFIG_BOOL) {
            v = "true"; /* --metrics-enabled alone */
        } else {
            char expect[600];
            expectation(expect, sizeof expect, s);
            snprintf(err, errlen, "%s: missing value (expected %s)", flag, expect);
            return -EINVAL;
        }
        if (apply(s, v, flag, err, errlen) < 0)
            return -EINVAL;
        s->_source = CONFIG_SOURCE_FLAG;
        s->_origin = NULL;
    }
    return 0;
}

void config_free(config_setting_t *table)
{
    for (config_setting_t *s = table; s->name; s++) {
        if (s->type == CONFIG_STRING && s->target) {
            char **p = s->target;
            free(*p);
            *p = NULL;
        }
    }
}

void config_value_text(const config_setting_t *s, char *dst, size_t dstlen)
{
    if (dstlen == 0)
        return;
    switch (s->type) {
    case CONFIG_STRING: {
        const char *v = *(char *const *)s->target;
        if (v == NULL)
            v = "";
        if ((s->flags & CONFIG_F_SECRET) && v[0] != '\0')
            snprintf(dst, dstlen, "***");
        else
            log_mask_url(dst, dstlen, v);
        break;
    }
    case CONFIG_INT:
        snprintf(dst, dstlen, "%" PRId64, *(const int64_t *)s->target);
        break;
    case CONFIG_DOUBLE:
    case CONFIG_DURATION:
        snprintf(dst, dstlen, "%.15g", *(const double *)s->target);
        break;
    case CONFIG_BOOL:
        snprintf(dst, dstlen, "%s", *(const bool *)s->target ? "true" : "false");
        break;
    case CONFIG_ENUM: {
        int v = *(const int *)s->target;
        snprintf(dst, dstlen, "%d", v);
        for (const config_choice_t *c = s->choices; c && c->name; c++) {
            if (c->value == v) {
                snprintf(dst, dstlen, "%s", c->name);
                break;
            }
        }
        break;
    }
    }
}

static void kind_text(char *dst, size_t dstlen, const config_setting_t *s)
{
    char list[512];
    switch (s->type) {
    case CONFIG_STRING:
        snprintf(dst, dstlen, "<text>");
        break;
    case CONFIG_INT:
        snprintf(dst, dstlen, "<integer %" PRId64 "..%" PRId64 ">", s->imin, s->imax);
        break;
    case CONFIG_DOUBLE:
        snprintf(dst, dstlen, "<number %.15g..%.15g>", s->dmin, s->dmax);
        break;
    case CONFIG_DURATION:
        snprintf(dst, dstlen, "<seconds %.15g..%.15g>", s->dmin, s->dmax);
        break;
    case CONFIG_BOOL:
        snprintf(dst, dstlen, "<true|false>");
        break;
    case CONFIG_ENUM:
        choices_text(list, sizeof list, s->choices, "|");
        snprintf(dst, dstlen, "<%s>", list);
        break;
    }
}

void config_print_help(FILE *out, const char *usage, const config_setting_t *table)
{
    if (usage && *usage)
        fprintf(out, "%s\n\n", usage);
    fprintf(out, "Every setting is an environment variable and a flag (--name value or "
                 "--name=value);\nflags override the environment. Booleans accept "
                 "true/false, 1/0, yes/no, on/off.\n\n");
    for (const config_setting_t *s = table; s->name; s++) {
        char flag[128], kind[600], def[512];
        config_flag_name(flag, sizeof flag, s->name);
        kind_text(kind, sizeof kind, s);
        const char *d = s->def ? s->def : "";
        if ((s->flags & CONFIG_F_SECRET) && d[0] != '\0')
            snprintf(def, sizeof def, "***");
        else
            log_mask_url(def, sizeof def, d);
        fprintf(out, "  %s %s\n      env %s", flag, kind, s->name);
        for (const char *const *a = s->aliases; a && *a; a++)
            fprintf(out, " (alias %s)", *a);
        if (d[0] == '\0')
            fprintf(out, "; default: empty\n");
        else
            fprintf(out, "; default: %s\n", def);
        if (s->help && *s->help)
            fprintf(out, "      %s\n", s->help);
    }
}

void config_log_effective(const config_setting_t *table, const char *module)
{
    if (!log_enabled(LOG_INFO))
        return;
    size_t n = 0;
    for (const config_setting_t *s = table; s->name; s++)
        n++;
    enum { VLEN = 512 };
    const char **kv = calloc(2 * n + 2, sizeof *kv);
    char *vals = malloc(n * VLEN + 1);
    size_t olen = n * 64 + 1;
    char *over = malloc(olen);
    if (kv == NULL || vals == NULL || over == NULL)
        abort();
    size_t oj = 0;
    over[0] = '\0';
    size_t i = 0;
    for (const config_setting_t *s = table; s->name; s++, i++) {
        config_value_text(s, vals + i * VLEN, VLEN);
        kv[2 * i] = s->name;
        kv[2 * i + 1] = vals + i * VLEN;
        if (s->_source != CONFIG_SOURCE_DEFAULT) {
            const char *from = s->_source == CONFIG_SOURCE_FLAG ? "flag" : "env";
            const char *via =
                s->_source == CONFIG_SOURCE_ENV && s->_origin && strcmp(s->_origin, s->name) != 0
                    ? s->_origin
                    : NULL;
            int w = snprintf(over + oj, olen - oj, "%s%s=%s%s%s", oj ? "," : "", s->name, from,
                             via ? ":" : "", via ? via : "");
            if (w > 0 && (size_t)w < olen - oj)
                oj += (size_t)w;
        }
    }
    kv[2 * n] = "overridden";
    kv[2 * n + 1] = over;
    log_kvv(LOG_INFO, module, "effective configuration", kv, n + 1);
    free(kv);
    free(vals);
    free(over);
}
