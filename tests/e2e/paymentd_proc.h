/*
 * paymentd_proc: runs build/paymentd as a child process for end-to-end tests: on
 * 127.0.0.1 with a free port (GRPC_PORT=0, --port-file), its log in a temporary directory,
 * and SIGKILL if the test process dies first (PR_SET_PDEATHSIG). pd_cleanup always leaves
 * no process and no file behind; call it from every teardown.
 *
 * The child gets ASAN_OPTIONS/LSAN_OPTIONS (detect_leaks=1, tests/lsan.supp) unless the
 * environment sets them, so an ASan build's leak report fails its exit code.
 */
#ifndef PAY_TESTS_PAYMENTD_PROC_H
#define PAY_TESTS_PAYMENTD_PROC_H

#include <stdbool.h>
#include <sys/types.h>

typedef struct pd_proc {
    pid_t pid; /* 0 when not running */
    int port;
    char target[64]; /* "127.0.0.1:PORT" */
    char dir[128];
    char log_path[192];
    char port_path[192];
} pd_proc_t;

/** Starts paymentd with extra "NAME=value" environment entries (NULL-terminated list, or
 *  NULL) and waits up to 60 s for its port. 0, or -errno after printing why (and the log). */
int pd_start(pd_proc_t *p, const char *const *env);
/** Sends a signal. */
int pd_signal(pd_proc_t *p, int sig);
/** Waits up to timeout_ms for the process to exit; 0 with the waitpid status, -ETIMEDOUT. */
int pd_wait(pd_proc_t *p, int timeout_ms, int *status);
/** Describes a waitpid status ("exit 0", "signal 9") into buf. */
const char *pd_status_str(int status, char *buf, size_t len);
/** Prints the server's log to stderr (use after a failed assertion). */
void pd_dump_log(const pd_proc_t *p);
/** True if the server's log contains text. */
bool pd_log_contains(const pd_proc_t *p, const char *text);
/** Runs paymentd to completion with args (NULL-terminated, after argv[0]) and extra
 *  environment, on 127.0.0.1; its output (stdout and stderr) into out. 0 with the waitpid
 *  status, -ETIMEDOUT (killed) if it ran longer than timeout_ms. */
int pd_run(const char *const *args, const char *const *env, int timeout_ms, int *status, char *out,
           size_t outlen);
/** Kills the server if still running, reaps it, removes its directory. Idempotent. */
void pd_cleanup(pd_proc_t *p);

/** The local stack (scripts/stack.sh up in a temporary directory) for tests whose paymentd
 *  needs its database: pass env_entry ("DATABASE_URL=...") to pd_start. */
typedef struct pd_stack {
    char dir[128];
    char env_entry[1100];
} pd_stack_t;

/** Starts the stack (PostgreSQL is required: a missing one fails, naming it). 0, or -1
 *  after printing why (and stack.sh's log). */
int pd_stack_up(pd_stack_t *s);
/** Stops the stack and removes its directory. Idempotent. */
void pd_stack_down(pd_stack_t *s);

#endif
