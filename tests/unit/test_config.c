/*
 * test_config: the typed-settings engine with a table of every type. Environments are
 * explicit "NAME=value" arrays (one test also reads the real environment), argv arrays
 * are literal, and every error is compared with its exact text.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "runtime/config.h"
#include "runtime/log.h"

typedef struct opts {
    char *name;
    char *brokers;
    char *token;
    char *url;
    int64_t port;
    double ratio;
    double delay;
    bool enabled;
    int level;
} opts_t;

static const char *const broker_aliases[] = {"CT_OTHER_BROKERS", NULL};
static const config_choice_t levels[] = {
    {"DEBUG", 0}, {"INFO", 1}, {"WARNING", 2}, {"WARN", 2}, {"ERROR", 3}, {NULL, 0},
};

static int nonempty(void *target, char *why, size_t whylen, void *arg)
{
    if (**(char **)target == '\0') {
        snprintf(why, whylen, "must not be empty");
        return -EINVAL;
    }
    return 0;
}

/* Normalises in place: upper-cases the value (shows validators may rewrite). */
static int upper(void *target, char *why, size_t whylen, void *arg)
{
    int *calls = arg;
    (*calls)++;
    for (char *p = *(char **)target; *p; p++)
        if (*p >= 'a' && *p <= 'z')
            *p = (char)(*p - 32);
    return 0;
}

static int reject_bad(void *target, char *why, size_t whylen, void *arg)
{
    if (strstr(*(char **)target, "bad") != NULL) {
        snprintf(why, whylen, "is rejected");
        return -EINVAL;
    }
    return 0;
}

static int upper_calls;

static void table_init(config_setting_t *t, opts_t *o)
{
    memset(o, 0, sizeof *o);
    config_setting_t rows[] = {
        {.name = "CT_NAME",
         .type = CONFIG_STRING,
         .def = "svc",
         .target = &o->name,
         .help = "service name",
         .validate = nonempty},
        {.name = "CT_BROKERS",
         .aliases = broker_aliases,
         .type = CONFIG_STRING,
         .def = "k:1",
         .target = &o->brokers,
         .help = "brokers",
         .validate = upper,
         .validate_arg = &upper_calls},
        {.name = "CT_TOKEN",
         .type = CONFIG_STRING,
         .def = "T0kenDefault",
         .target = &o->token,
         .flags = CONFIG_F_SECRET,
         .help = "api token",
         .validate = reject_bad},
        {.name = "CT_URL",
         .type = CONFIG_STRING,
         .def = "postgresql://u:UrlDefPw@h/db",
         .target = &o->url,
         .help = "a url",
         .validate = reject_bad},
        {.name = "CT_PORT",
         .type = CONFIG_INT,
         .def = "50051",
         .target = &o->port,
         .imin = 0,
         .imax = 65535,
         .help = "listen port"},
        {.name = "CT_RATIO",
         .type = CONFIG_DOUBLE,
         .def = "0.5",
         .target = &o->ratio,
         .dmin = 0,
         .dmax = 1,
         .help = "a ratio"},
        {.name = "CT_DELAY",
         .type = CONFIG_DURATION,
         .def = "1.5",
         .target = &o->delay,
         .dmin = 0.001,
         .dmax = 60,
         .help = "a delay"},
        {.name = "CT_ENABLED",
         .type = CONFIG_BOOL,
         .def = "true",
         .target = &o->enabled,
         .help = "on or off"},
        {.name = "CT_LEVEL",
         .type = CONFIG_ENUM,
         .def = "INFO",
         .target = &o->level,
         .choices = levels,
         .help = "log level"},
        {.name = NULL},
    };
    memcpy(t, rows, sizeof rows);
}

typedef struct fixture {
    config_setting_t t[16];
    opts_t o;
    char err[512];
} fixture_t;

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof *f);
    table_init(f->t, &f->o);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    config_free(f->t);
    free(f);
    return 0;
}

static int load(fixture_t *f, char **argv, char **envp)
{
    int argc = 0;
    while (argv && argv[argc])
        argc++;
    char *noargs[] = {"prog", NULL};
    return config_load(f->t, argv ? argc : 1, argv ? argv : noargs, envp, f->err, sizeof f->err);
}

static void test_defaults(void **state)
{
    fixture_t *f = *state;
    char *env[] = {NULL};
    upper_calls = 0;
    assert_int_equal(load(f, NULL, env), 0);
    assert_string_equal(f->err, "");
    assert_string_equal(f->o.name, "svc");
    assert_string_equal(f->o.brokers, "K:1"); /* the validator ran on the default */
    assert_int_equal(upper_calls, 1);
    assert_string_equal(f->o.token, "T0kenDefault");
    assert_int_equal(f->o.port, 50051);
    assert_true(f->o.ratio == 0.5);
    assert_true(f->o.delay == 1.5);
    assert_true(f->o.enabled);
    assert_int_equal(f->o.level, 1);
    for (int i = 0; f->t[i].name; i++)
        assert_int_equal(f->t[i]._source, CONFIG_SOURCE_DEFAULT);
}

static void test_env_then_flags(void **state)
{
    fixture_t *f = *state;
    char *env[] = {"CT_PORT=1000", "CT_NAME=fromenv", "CT_LEVEL=error",
                   "OTHER=1",      "CT_PORTX=5",      NULL};
    char *argv[] = {"prog", "--ct-port", "2000", "--ct-ratio=0.25", "--ct-port=3000", NULL};
    assert_int_equal(load(f, argv, env), 0);
    assert_int_equal(f->o.port, 3000); /* flags win, the last one wins */
    assert_true(f->o.ratio == 0.25);
    assert_string_equal(f->o.name, "fromenv");
    assert_int_equal(f->o.level, 3);
    assert_int_equal(f->t[4]._source, CONFIG_SOURCE_FLAG);
    assert_int_equal(f->t[5]._source, CONFIG_SOURCE_FLAG);
    assert_int_equal(f->t[0]._source, CONFIG_SOURCE_ENV);
    assert_string_equal(f->t[0]._origin, "CT_NAME");
    assert_int_equal(f->t[8]._source, CONFIG_SOURCE_ENV);
    assert_int_equal(f->t[6]._source, CONFIG_SOURCE_DEFAULT);
}

static void test_process_environment(void **state)
{
    fixture_t *f = *state;
    assert_int_equal(setenv("CT_PORT", "4242", 1), 0);
    assert_int_equal(setenv("CT_ENABLED", "off", 1), 0);
    int rc = load(f, NULL, NULL);
    unsetenv("CT_PORT");
    unsetenv("CT_ENABLED");
    assert_int_equal(rc, 0);
    assert_int_equal(f->o.port, 4242);
    assert_false(f->o.enabled);
}

static void test_strings_are_kept_verbatim(void **state)
{
    fixture_t *f = *state;
    char *env[] = {"CT_NAME=  spaced name  ", NULL};
    char *argv[] = {"prog", "--ct-url", "x=y", NULL};
    assert_int_equal(load(f, argv, env), 0);
    assert_string_equal(f->o.name, "  spaced name  ");
    assert_string_equal(f->o.url, "x=y");
}

static fixture_t *fresh(void)
{
    fixture_t *g = calloc(1, sizeof *g);
    assert_non_null(g);
    table_init(g->t, &g->o);
    return g;
}

static void dispose(fixture_t *g)
{
    config_free(g->t);
    free(g);
}

static void test_numbers_parse(void **state)
{
    static const struct {
        const char *env;
        int64_t port;
        double ratio, delay;
    } cases[] = {
        {"CT_PORT=0", 0, 0.5, 1.5},
        {"CT_PORT=65535", 65535, 0.5, 1.5},
        {"CT_PORT= 80 ", 80, 0.5, 1.5},
        {"CT_PORT=+7", 7, 0.5, 1.5},
        {"CT_PORT=0080", 80, 0.5, 1.5},
        {"CT_RATIO=1", 50051, 1, 1.5},
        {"CT_RATIO=0", 50051, 0, 1.5},
        {"CT_RATIO=.75", 50051, 0.75, 1.5},
        {"CT_RATIO=2.5e-1", 50051, 0.25, 1.5},
        {"CT_DELAY=2", 50051, 0.5, 2},
        {"CT_DELAY=1.5s", 50051, 0.5, 1.5},
        {"CT_DELAY=250ms", 50051, 0.5, 0.25},
        {"CT_DELAY=1m", 50051, 0.5, 60},
        {"CT_DELAY=0.5 S", 50051, 0.5, 0.5},
        {"CT_DELAY=1MS", 50051, 0.5, 0.001},
        {"CT_DELAY=\t3\n", 50051, 0.5, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fixture_t *g = fresh();
        char *env[] = {(char *)cases[i].env, NULL};
        if (load(g, NULL, env) != 0)
            fail_msg("%s: %s", cases[i].env, g->err);
        assert_int_equal(g->o.port, cases[i].port);
        assert_true(g->o.ratio == cases[i].ratio);
        assert_true(g->o.delay == cases[i].delay);
        dispose(g);
    }
}

static void test_booleans_every_spelling(void **state)
{
    static const struct {
        const char *text;
        bool want;
    } cases[] = {
        {"true", true},   {"TRUE", true},     {"True", true},   {"1", true},      {"yes", true},
        {"YES", true},    {"Yes", true},      {"on", true},     {"ON", true},     {"On", true},
        {" yes\t", true}, {"false", false},   {"FALSE", false}, {"False", false}, {"0", false},
        {"no", false},    {"NO", false},      {"No", false},    {"off", false},   {"OFF", false},
        {"Off", false},   {"\n off ", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char kv[64];
        snprintf(kv, sizeof kv, "CT_ENABLED=%s", cases[i].text);
        /* through the environment, starting from the opposite default */
        fixture_t *g = fresh();
        g->t[7].def = cases[i].want ? "false" : "true";
        char *env[] = {kv, NULL};
        if (load(g, NULL, env) != 0)
            fail_msg("env %s: %s", kv, g->err);
        assert_int_equal(g->o.enabled, cases[i].want);
        dispose(g);
        /* through a flag, both spellings */
        g = fresh();
        g->t[7].def = cases[i].want ? "false" : "true";
        char *argv[] = {"prog", "--ct-enabled", (char *)cases[i].text, NULL};
        if (load(g, argv, NULL) != 0)
            fail_msg("flag %s: %s", cases[i].text, g->err);
        assert_int_equal(g->o.enabled, cases[i].want);
        dispose(g);
        g = fresh();
        g->t[7].def = cases[i].want ? "false" : "true";
        char eq[64];
        snprintf(eq, sizeof eq, "--ct-enabled=%s", cases[i].text);
        char *argv2[] = {"prog", eq, NULL};
        if (load(g, argv2, NULL) != 0)
            fail_msg("flag %s: %s", eq, g->err);
        assert_int_equal(g->o.enabled, cases[i].want);
        dispose(g);
    }
}

static void test_bool_flag_alone(void **state)
{
    fixture_t *g = fresh();
    g->t[7].def = "false";
    char *a1[] = {"prog", "--ct-enabled", NULL};
    assert_int_equal(load(g, a1, NULL), 0);
    assert_true(g->o.enabled);
    dispose(g);

    g = fresh();
    g->t[7].def = "false";
    char *a2[] = {"prog", "--ct-enabled", "--ct-port", "9", NULL};
    assert_int_equal(load(g, a2, NULL), 0);
    assert_true(g->o.enabled);
    assert_int_equal(g->o.port, 9);
    dispose(g);
}

static void test_enum_any_case(void **state)
{
    static const struct {
        const char *text;
        int want;
    } cases[] = {
        {"debug", 0}, {"Info", 1}, {"WARNING", 2}, {"warn", 2}, {"WaRn", 2}, {" error ", 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fixture_t *g = fresh();
        char kv[64];
        snprintf(kv, sizeof kv, "CT_LEVEL=%s", cases[i].text);
        char *env[] = {kv, NULL};
        assert_int_equal(load(g, NULL, env), 0);
        assert_int_equal(g->o.level, cases[i].want);
        dispose(g);
    }
}

/* Every invalid value gives one exact sentence naming the variable, the value and what
 * is expected. */
static void test_invalid_values_env(void **state)
{
    static const struct {
        const char *env, *err;
    } cases[] = {
        {"CT_PORT=70000", "CT_PORT: \"70000\" is not an integer in 0..65535"},
        {"CT_PORT=-1", "CT_PORT: \"-1\" is not an integer in 0..65535"},
        {"CT_PORT=", "CT_PORT: \"\" is not an integer in 0..65535"},
        {"CT_PORT=12abc", "CT_PORT: \"12abc\" is not an integer in 0..65535"},
        {"CT_PORT=0x10", "CT_PORT: \"0x10\" is not an integer in 0..65535"},
        {"CT_PORT=1.0", "CT_PORT: \"1.0\" is not an integer in 0..65535"},
        {"CT_PORT=1 2", "CT_PORT: \"1 2\" is not an integer in 0..65535"},
        {"CT_PORT=99999999999999999999",
         "CT_PORT: \"99999999999999999999\" is not an integer in 0..65535"},
        {"CT_RATIO=1.5", "CT_RATIO: \"1.5\" is not a number in 0..1"},
        {"CT_RATIO=nan", "CT_RATIO: \"nan\" is not a number in 0..1"},
        {"CT_RATIO=inf", "CT_RATIO: \"inf\" is not a number in 0..1"},
        {"CT_RATIO=0.5x", "CT_RATIO: \"0.5x\" is not a number in 0..1"},
        {"CT_RATIO=0x0p0", "CT_RATIO: \"0x0p0\" is not a number in 0..1"},
        {"CT_RATIO=", "CT_RATIO: \"\" is not a number in 0..1"},
        {"CT_DELAY=0",
         "CT_DELAY: \"0\" is not a duration in 0.001..60 seconds (e.g. 1.5, 1.5s, 250ms, 2m)"},
        {"CT_DELAY=2h",
         "CT_DELAY: \"2h\" is not a duration in 0.001..60 seconds (e.g. 1.5, 1.5s, 250ms, 2m)"},
        {"CT_DELAY=5 parsecs", "CT_DELAY: \"5 parsecs\" is not a duration in 0.001..60 seconds "
                               "(e.g. 1.5, 1.5s, 250ms, 2m)"},
        {"CT_DELAY=s",
         "CT_DELAY: \"s\" is not a duration in 0.001..60 seconds (e.g. 1.5, 1.5s, 250ms, 2m)"},
        {"CT_ENABLED=maybe",
         "CT_ENABLED: \"maybe\" is not a boolean (true/false, 1/0, yes/no, on/off)"},
        {"CT_ENABLED=", "CT_ENABLED: \"\" is not a boolean (true/false, 1/0, yes/no, on/off)"},
        {"CT_ENABLED=2", "CT_ENABLED: \"2\" is not a boolean (true/false, 1/0, yes/no, on/off)"},
        {"CT_ENABLED=t", "CT_ENABLED: \"t\" is not a boolean (true/false, 1/0, yes/no, on/off)"},
        {"CT_LEVEL=verbose",
         "CT_LEVEL: \"verbose\" is not one of DEBUG, INFO, WARNING, WARN, ERROR"},
        {"CT_LEVEL=", "CT_LEVEL: \"\" is not one of DEBUG, INFO, WARNING, WARN, ERROR"},
        {"CT_NAME=", "CT_NAME: \"\" must not be empty"},
        {"CT_PORT=a\"b\\c\nd", "CT_PORT: \"a\\\"b\\\\c\\nd\" is not an integer in 0..65535"},
        {"CT_TOKEN=very bad token", "CT_TOKEN: \"***\" is rejected"},
        {"CT_URL=postgresql://u:SecretPw@h/bad",
         "CT_URL: \"postgresql://u:***@h/bad\" is rejected"},
        {"CT_OTHER_BROKERS=bad", NULL}, /* alias: fine, the validator does not check brokers */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fixture_t *g = fresh();
        char *env[] = {(char *)cases[i].env, NULL};
        int rc = load(g, NULL, env);
        if (cases[i].err == NULL) {
            assert_int_equal(rc, 0);
        } else {
            if (rc != -EINVAL)
                fail_msg("%s: accepted", cases[i].env);
            assert_string_equal(g->err, cases[i].err);
        }
        dispose(g);
    }
}

static void test_invalid_values_flags(void **state)
{
    static const struct {
        const char *a1, *a2, *err;
    } cases[] = {
        {"--ct-port", "x", "--ct-port: \"x\" is not an integer in 0..65535"},
        {"--ct-port=70000", NULL, "--ct-port: \"70000\" is not an integer in 0..65535"},
        {"--ct-port=", NULL, "--ct-port: \"\" is not an integer in 0..65535"},
        {"--ct-port", NULL, "--ct-port: missing value (expected an integer in 0..65535)"},
        {"--ct-level", "loud",
         "--ct-level: \"loud\" is not one of DEBUG, INFO, WARNING, WARN, ERROR"},
        {"--ct-enabled", "maybe",
         "--ct-enabled: \"maybe\" is not a boolean (true/false, 1/0, yes/no, on/off)"},
        {"--ct-token=bad", NULL, "--ct-token: \"***\" is rejected"},
        {"--nope", NULL, "unknown flag \"--nope\" (see --help)"},
        {"--nope=1", NULL, "unknown flag \"--nope\" (see --help)"},
        {"--CT-PORT", "1", "unknown flag \"--CT-PORT\" (see --help)"},
        {"--ct_port", "1", "unknown flag \"--ct_port\" (see --help)"},
        {"stray", NULL,
         "unexpected argument \"stray\" (settings are flags such as --grpc-port 50051; see "
         "--help)"},
        {"-p", "1",
         "unexpected argument \"-p\" (settings are flags such as --grpc-port 50051; see --help)"},
        {"--", NULL,
         "unexpected argument \"--\" (settings are flags such as --grpc-port 50051; see --help)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fixture_t *g = fresh();
        char *argv[] = {"prog", (char *)cases[i].a1, (char *)cases[i].a2, NULL};
        int rc = load(g, argv, (char *[]){NULL});
        if (rc != -EINVAL)
            fail_msg("%s %s: accepted", cases[i].a1, cases[i].a2 ? cases[i].a2 : "");
        assert_string_equal(g->err, cases[i].err);
        dispose(g);
    }
}

static void test_bad_env_is_an_error_even_when_a_flag_overrides(void **state)
{
    fixture_t *f = *state;
    char *env[] = {"CT_PORT=abc", NULL};
    char *argv[] = {"prog", "--ct-port", "80", NULL};
    assert_int_equal(load(f, argv, env), -EINVAL);
    assert_string_equal(f->err, "CT_PORT: \"abc\" is not an integer in 0..65535");
}

static void test_bad_default_is_an_error(void **state)
{
    fixture_t *f = *state;
    f->t[4].def = "seventy";
    assert_int_equal(load(f, NULL, (char *[]){NULL}), -EINVAL);
    assert_string_equal(f->err, "CT_PORT (default): \"seventy\" is not an integer in 0..65535");
}

static void test_aliases(void **state)
{
    fixture_t *g = fresh();
    char *e1[] = {"CT_OTHER_BROKERS=a:1", NULL};
    assert_int_equal(load(g, NULL, e1), 0);
    assert_string_equal(g->o.brokers, "A:1");
    assert_int_equal(g->t[1]._source, CONFIG_SOURCE_ENV);
    assert_string_equal(g->t[1]._origin, "CT_OTHER_BROKERS");
    dispose(g);

    g = fresh();
    char *e2[] = {"CT_BROKERS=a:1", "CT_OTHER_BROKERS=a:1", NULL};
    assert_int_equal(load(g, NULL, e2), 0);
    assert_string_equal(g->o.brokers, "A:1");
    assert_string_equal(g->t[1]._origin, "CT_BROKERS");
    dispose(g);

    g = fresh();
    char *e3[] = {"CT_OTHER_BROKERS=b:2", "CT_BROKERS=a:1", NULL};
    assert_int_equal(load(g, NULL, e3), -EINVAL);
    assert_string_equal(g->err, "CT_BROKERS and CT_OTHER_BROKERS are both set and differ "
                                "(\"a:1\" vs \"b:2\"); set only one");
    dispose(g);

    /* a flag still overrides whichever variable was used */
    g = fresh();
    char *argv[] = {"prog", "--ct-brokers", "z:9", NULL};
    assert_int_equal(load(g, argv, e1), 0);
    assert_string_equal(g->o.brokers, "Z:9");
    dispose(g);
}

static void test_help(void **state)
{
    fixture_t *f = *state;
    char *a1[] = {"prog", "--ct-port", "nonsense", "--help", NULL};
    assert_int_equal(load(f, a1, (char *[]){"CT_PORT=bad", NULL}), CONFIG_HELP);
    char *a2[] = {"prog", "-h", NULL};
    assert_int_equal(load(f, a2, NULL), CONFIG_HELP);

    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    config_print_help(m, "usage: prog [flags]", f->t);
    fclose(m);
    static const char *const want[] = {
        "usage: prog [flags]\n",
        "  --ct-name <text>\n      env CT_NAME; default: svc\n      service name\n",
        "  --ct-brokers <text>\n      env CT_BROKERS (alias CT_OTHER_BROKERS); default: k:1\n",
        "  --ct-token <text>\n      env CT_TOKEN; default: ***\n      api token\n",
        "  --ct-url <text>\n      env CT_URL; default: postgresql://u:***@h/db\n",
        "  --ct-port <integer 0..65535>\n      env CT_PORT; default: 50051\n      listen port\n",
        "  --ct-ratio <number 0..1>\n      env CT_RATIO; default: 0.5\n",
        "  --ct-delay <seconds 0.001..60>\n      env CT_DELAY; default: 1.5\n",
        "  --ct-enabled <true|false>\n      env CT_ENABLED; default: true\n",
        "  --ct-level <DEBUG|INFO|WARNING|WARN|ERROR>\n      env CT_LEVEL; default: INFO\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (strstr(text, want[i]) == NULL)
            fail_msg("help lacks <%s>:\n%s", want[i], text);
    assert_null(strstr(text, "T0kenDefault"));
    assert_null(strstr(text, "UrlDefPw"));
    free(text);
}

static void test_flag_names(void **state)
{
    char b[64];
    config_flag_name(b, sizeof b, "GRPC_PORT");
    assert_string_equal(b, "--grpc-port");
    config_flag_name(b, sizeof b, "RATE_LIMIT_TRUSTED_PROXIES");
    assert_string_equal(b, "--rate-limit-trusted-proxies");
    config_flag_name(b, 6, "GRPC_PORT");
    assert_string_equal(b, "--grp");
}

static void test_value_text_masks(void **state)
{
    fixture_t *f = *state;
    char *env[] = {"CT_URL=redis://:RedisPw@r:6379/0", "CT_LEVEL=warn", "CT_DELAY=250ms", NULL};
    assert_int_equal(load(f, NULL, env), 0);
    char b[128];
    config_value_text(&f->t[2], b, sizeof b);
    assert_string_equal(b, "***");
    config_value_text(&f->t[3], b, sizeof b);
    assert_string_equal(b, "redis://:***@r:6379/0");
    config_value_text(&f->t[4], b, sizeof b);
    assert_string_equal(b, "50051");
    config_value_text(&f->t[6], b, sizeof b);
    assert_string_equal(b, "0.25");
    config_value_text(&f->t[7], b, sizeof b);
    assert_string_equal(b, "true");
    config_value_text(&f->t[8], b, sizeof b);
    assert_string_equal(b, "WARNING");
}

static void test_log_effective(void **state)
{
    fixture_t *f = *state;
    char *env[] = {"CT_URL=postgresql://u:EnvUrlPw@h/db", "CT_OTHER_BROKERS=b:2",
                   "CT_TOKEN=SecretTok", NULL};
    char *argv[] = {"prog", "--ct-port", "81", NULL};
    assert_int_equal(load(f, argv, env), 0);
    int p[2];
    assert_int_equal(pipe(p), 0);
    log_init(LOG_INFO, LOG_FORMAT_JSON);
    int old = log_set_fd(p[1]);
    config_log_effective(f->t, "config");
    log_set_fd(old);
    close(p[1]);
    char buf[8192];
    ssize_t n = read(p[0], buf, sizeof buf - 1);
    close(p[0]);
    assert_true(n > 0);
    buf[n] = '\0';
    assert_non_null(
        strstr(buf, "\"level\":\"INFO\",\"logger\":\"config\",\"msg\":\"effective configuration\","
                    "\"CT_NAME\":\"svc\",\"CT_BROKERS\":\"B:2\",\"CT_TOKEN\":\"***\","
                    "\"CT_URL\":\"postgresql://u:***@h/db\",\"CT_PORT\":\"81\","
                    "\"CT_RATIO\":\"0.5\",\"CT_DELAY\":\"1.5\",\"CT_ENABLED\":\"true\","
                    "\"CT_LEVEL\":\"INFO\",\"overridden\":\"CT_BROKERS=env:CT_OTHER_BROKERS,"
                    "CT_TOKEN=env,CT_URL=env,CT_PORT=flag\"}\n"));
    assert_null(strstr(buf, "EnvUrlPw"));
    assert_null(strstr(buf, "SecretTok"));
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_defaults),
        T(test_env_then_flags),
        T(test_process_environment),
        T(test_strings_are_kept_verbatim),
        T(test_numbers_parse),
        T(test_booleans_every_spelling),
        T(test_bool_flag_alone),
        T(test_enum_any_case),
        T(test_invalid_values_env),
        T(test_invalid_values_flags),
        T(test_bad_env_is_an_error_even_when_a_flag_overrides),
        T(test_bad_default_is_an_error),
        T(test_aliases),
        T(test_help),
        T(test_flag_names),
        T(test_value_text_masks),
        T(test_log_effective),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
