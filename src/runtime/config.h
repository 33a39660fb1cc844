/*
 * config: a typed-settings engine. It knows no business: a main declares a table of
 * settings and config_load fills the fields they point at.
 *
 * Each setting has an environment variable name (e.g. GRPC_PORT), optional alias names
 * (e.g. REDPANDA_BROKERS for KAFKA_BROKERS), a flag derived from the name (--grpc-port),
 * a type, a default written as text (parsed like any other input), help text, a target
 * field and an optional validate callback. Values are applied in order: default, then
 * environment, then flags (`--name value` or `--name=value`; a bool flag alone means
 * true). Every value applied is parsed and validated, so a bad environment value is an
 * error even when a flag also sets the setting: nothing is ever silently replaced.
 *
 * Errors are one precise sentence naming where the value came from, the value and what
 * is expected, e.g. `GRPC_PORT: "70000" is not an integer in 0..65535` or
 * `--grpc-port: "x" is not an integer in 0..65535`. Values quoted in errors, help and
 * config_log_effective have credentials masked (log_mask_url), and CONFIG_F_SECRET settings
 * are shown as *** entirely.
 *
 * Target types: CONFIG_STRING char ** (heap; config_free releases it; must start NULL),
 * CONFIG_INT int64_t *, CONFIG_DOUBLE and CONFIG_DURATION double * (seconds),
 * CONFIG_BOOL bool *, CONFIG_ENUM int * (the chosen config_choice_t value).
 *
 * Not thread-safe: call from main at start-up, before other threads exist.
 */
#ifndef PAY_RUNTIME_CONFIG_H
#define PAY_RUNTIME_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/** config_load result when --help (or -h) was given: print help and exit 0. */
#define CONFIG_HELP 1

typedef enum config_type {
    CONFIG_STRING,
    CONFIG_INT,      /* decimal int64 within [imin, imax] */
    CONFIG_DOUBLE,   /* finite number within [dmin, dmax] */
    CONFIG_DURATION, /* seconds: 1.5, 1.5s, 250ms, 2m, 1h; within [dmin, dmax] seconds */
    CONFIG_BOOL,     /* true/false, 1/0, yes/no, on/off, any case */
    CONFIG_ENUM,     /* one of choices, any case */
} config_type_t;

typedef enum config_source {
    CONFIG_SOURCE_DEFAULT,
    CONFIG_SOURCE_ENV,
    CONFIG_SOURCE_FLAG,
} config_source_t;

/** An enum name and the value stored for it; several names may share a value (WARN). */
typedef struct config_choice {
    const char *name;
    int value;
} config_choice_t;

/** The value is a credential: shown as *** (when non-empty) in errors, help and dumps. */
#define CONFIG_F_SECRET 0x1u

/**
 * Check (and possibly normalise, e.g. rewrite a string) a freshly parsed value in place.
 * On failure write what is wrong, phrased to follow the quoted value (e.g. `is not a
 * PostgreSQL URL: missing host`), to why and return a negative errno (-EINVAL).
 */
typedef int (*config_validate_fn)(void *target, char *why, size_t whylen, void *arg);

typedef struct config_setting {
    const char *name;           /* environment variable; NULL ends the table */
    const char *const *aliases; /* other variable names, NULL-terminated; or NULL */
    config_type_t type;
    const char *def;                /* default as text; NULL means "" */
    const char *help;               /* one line */
    void *target;                   /* see the top of this file */
    int64_t imin, imax;             /* CONFIG_INT bounds (both mandatory) */
    double dmin, dmax;              /* CONFIG_DOUBLE / CONFIG_DURATION bounds (mandatory) */
    const config_choice_t *choices; /* CONFIG_ENUM, terminated by {NULL, 0} */
    unsigned flags;                 /* CONFIG_F_* */
    config_validate_fn validate;    /* optional */
    void *validate_arg;
    /* private, written by config_load: */
    config_source_t _source;
    const char *_origin; /* for CONFIG_SOURCE_ENV: the variable (name or alias) used */
} config_setting_t;

/**
 * Apply defaults, then the environment, then the flags in argv[1..argc) to every setting
 * of the table (terminated by an entry with name NULL). envp is a NULL-terminated
 * "NAME=value" array, or NULL to read the process environment with getenv.
 * Returns 0, CONFIG_HELP when argv has --help or -h (nothing else is checked), or
 * -EINVAL with the reason in err. After any return, config_free releases the strings.
 */
int config_load(config_setting_t *table, int argc, char **argv, char **envp, char *err,
                size_t errlen);

/** Free the strings config_load stored in CONFIG_STRING targets (sets them to NULL). */
void config_free(config_setting_t *table);

/** "--grpc-port" for "GRPC_PORT". */
void config_flag_name(char *dst, size_t dstlen, const char *name);

/** The setting's current value as text, credentials masked (secret ones as ***). */
void config_value_text(const config_setting_t *s, char *dst, size_t dstlen);

/** Print every setting: flag, value kind, environment variable(s), default, help. */
void config_print_help(FILE *out, const char *usage, const config_setting_t *table);

/** One INFO log line "effective configuration" with NAME=value fields (masked) and an
 *  `overridden` field listing the settings not at their default, with their origin. */
void config_log_effective(const config_setting_t *table, const char *module);

#endif
