/*
 * paymentd as a program: --version, --help, precise start-up errors (bad setting, bad
 * flag, port already in use: non-zero exit, one clear line), the "grpc listening" log line
 * and --port-file that tests rely on, and SIGINT as a clean stop.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <cmocka.h>

#include "e2e/paymentd_proc.h"
#include "version.h"

static char out[1 << 16];
static pd_proc_t srv; /* the server a test started; the teardown always cleans it up */

static int cleanup_server(void **state)
{
    pd_cleanup(&srv);
    return 0;
}

static void run(const char *const *args, const char *const *env, int want_exit)
{
    int status;
    assert_int_equal(pd_run(args, env, 60000, &status, out, sizeof(out)), 0);
    char why[64];
    char want[64];
    snprintf(want, sizeof(want), "exit %d", want_exit);
    if (strcmp(pd_status_str(status, why, sizeof(why)), want) != 0)
        fail_msg("paymentd ended with %s, want %s; output:\n%s", why, want, out);
}

static void test_version(void **state)
{
    const char *const args[] = {"--version", NULL};
    run(args, NULL, 0);
    assert_string_equal(out, "paymentd " PAY_VERSION "\n");
}

static void test_help(void **state)
{
    const char *const args[] = {"--help", NULL};
    run(args, NULL, 0);
    const char *want[] = {"--version",   "--port-file",       "--grpc-host",
                          "GRPC_PORT",   "--grpc-cq-threads", "SHUTDOWN_GRACE_SECONDS",
                          "DATABASE_URL"};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        if (!strstr(out, want[i]))
            fail_msg("--help does not mention %s:\n%s", want[i], out);
}

static void test_bad_setting(void **state)
{
    const char *const env[] = {"GRPC_PORT=70000", NULL};
    run(NULL, env, 2);
    assert_string_equal(out, "paymentd: GRPC_PORT: \"70000\" is not an integer in 0..65535\n");
}

static void test_bad_flags(void **state)
{
    const char *const missing[] = {"--port-file", NULL};
    run(missing, NULL, 2);
    assert_string_equal(out, "paymentd: --port-file: missing value (expected a file path)\n");
    const char *const unknown[] = {"--no-such-flag", NULL};
    run(unknown, NULL, 2);
    assert_non_null(strstr(out, "paymentd: unknown flag \"--no-such-flag\""));
}

static void test_port_in_use(void **state)
{
    pd_proc_t *a = &srv;
    assert_int_equal(pd_start(a, NULL), 0);
    char port[32], want[128];
    snprintf(port, sizeof(port), "GRPC_PORT=%d", a->port);
    snprintf(want, sizeof(want), "cannot listen on 127.0.0.1:%d for gRPC", a->port);
    const char *const env[] = {port, NULL};
    run(NULL, env, 1);
    if (!strstr(out, want))
        fail_msg("no \"%s\" in:\n%s", want, out);
    /* The first server is untouched. */
    assert_int_equal(pd_signal(a, 0), 0);
    assert_int_equal(pd_signal(a, SIGTERM), 0);
    int status;
    assert_int_equal(pd_wait(a, 30000, &status), 0);
    char why[64];
    assert_string_equal(pd_status_str(status, why, sizeof(why)), "exit 0");
}

static void test_listening_line_and_sigint(void **state)
{
    pd_proc_t *p = &srv;
    assert_int_equal(pd_start(p, NULL), 0);
    char line[128];
    snprintf(line, sizeof(line), "\"msg\":\"grpc listening on 127.0.0.1:%d\"", p->port);
    bool ok = pd_log_contains(p, line);
    snprintf(line, sizeof(line), "\"grpc_port\":\"%d\"", p->port);
    ok = ok && pd_log_contains(p, line);
    if (!ok)
        pd_dump_log(p);
    assert_true(ok);
    assert_int_equal(pd_signal(p, SIGINT), 0);
    int status;
    assert_int_equal(pd_wait(p, 30000, &status), 0);
    char why[64];
    assert_string_equal(pd_status_str(status, why, sizeof(why)), "exit 0");
    assert_true(pd_log_contains(p, "SIGINT: shutting down"));
    assert_true(pd_log_contains(p, "\"msg\":\"stopped\""));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_bad_setting),
        cmocka_unit_test(test_bad_flags),
        cmocka_unit_test_teardown(test_port_in_use, cleanup_server),
        cmocka_unit_test_teardown(test_listening_line_and_sigint, cleanup_server),
    };
    return cmocka_run_group_tests_name("e2e_cli", tests, NULL, NULL);
}
