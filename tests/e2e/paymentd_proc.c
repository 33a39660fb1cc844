/*
 * paymentd_proc: see paymentd_proc.h.
 */
#include "e2e/paymentd_proc.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

void pd_dump_log(const pd_proc_t *p)
{
    FILE *f = fopen(p->log_path, "r");
    if (!f)
        return;
    fprintf(stderr, "---- paymentd log (%s) ----\n", p->log_path);
    char line[4096];
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fprintf(stderr, "---- end of paymentd log ----\n");
    fclose(f);
}

bool pd_log_contains(const pd_proc_t *p, const char *text)
{
    FILE *f = fopen(p->log_path, "r");
    if (!f)
        return false;
    char line[8192];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f))
        found = strstr(line, text) != NULL;
    fclose(f);
    return found;
}

const char *pd_status_str(int status, char *buf, size_t len)
{
    if (WIFEXITED(status))
        snprintf(buf, len, "exit %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "signal %d", WTERMSIG(status));
    else
        snprintf(buf, len, "status 0x%x", status);
    return buf;
}

static int read_port(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    int port = 0;
    if (fscanf(f, "%d", &port) != 1)
        port = 0;
    fclose(f);
    return port;
}

int pd_start(pd_proc_t *p, const char *const *env)
{
    memset(p, 0, sizeof(*p));
    const char *build = getenv("PAY_BUILD_DIR");
    const char *source = getenv("PAY_SOURCE_DIR");
    if (!build || !source) {
        fprintf(stderr, "pd_start: PAY_BUILD_DIR and PAY_SOURCE_DIR must be set (run via ctest)\n");
        return -EINVAL;
    }
    char exe[512];
    snprintf(exe, sizeof(exe), "%s/paymentd", build);
    if (access(exe, X_OK) != 0) {
        fprintf(stderr, "pd_start: %s is missing (build the paymentd target)\n", exe);
        return -ENOENT;
    }
    snprintf(p->dir, sizeof(p->dir), "/tmp/pay-e2e-XXXXXX");
    if (!mkdtemp(p->dir)) {
        fprintf(stderr, "pd_start: mkdtemp: %s\n", strerror(errno));
        return -errno;
    }
    snprintf(p->log_path, sizeof(p->log_path), "%s/paymentd.log", p->dir);
    snprintf(p->port_path, sizeof(p->port_path), "%s/port", p->dir);
    char supp[600];
    snprintf(supp, sizeof(supp), "suppressions=%s/tests/lsan.supp:print_suppressions=0", source);

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int err = -errno;
        pd_cleanup(p);
        return err;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int fd = open(p->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0)
            _exit(127);
        dup2(fd, 1);
        dup2(fd, 2);
        setenv("GRPC_HOST", "127.0.0.1", 1);
        setenv("GRPC_PORT", "0", 1);
        setenv("METRICS_HOST", "127.0.0.1", 1);
        setenv("METRICS_PORT", "0", 1);
        setenv("ASAN_OPTIONS", "detect_leaks=1", 0);
        setenv("LSAN_OPTIONS", supp, 0);
        /* Never a Redis the test did not start (a system one on 6379): tests that want
         * the rate limiter say so in env. */
        setenv("RATE_LIMIT_ENABLED", "false", 1);
        for (size_t i = 0; env && env[i]; i++)
            putenv((char *)env[i]);
        char *argv[] = {exe, "--port-file", p->port_path, NULL};
        execv(exe, argv);
        _exit(127);
    }
    p->pid = pid;
    long deadline = now_ms() + 60000;
    while (now_ms() < deadline) {
        p->port = read_port(p->port_path);
        if (p->port > 0) {
            snprintf(p->target, sizeof(p->target), "127.0.0.1:%d", p->port);
            return 0;
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            char why[64];
            fprintf(stderr, "pd_start: paymentd ended before listening (%s)\n",
                    pd_status_str(status, why, sizeof(why)));
            p->pid = 0;
            pd_dump_log(p);
            pd_cleanup(p);
            return -ECHILD;
        }
        sleep_ms(20);
    }
    fprintf(stderr, "pd_start: paymentd did not write its port within 60 s\n");
    pd_dump_log(p);
    pd_cleanup(p);
    return -ETIMEDOUT;
}

int pd_run(const char *const *args, const char *const *env, int timeout_ms, int *status, char *out,
           size_t outlen)
{
    const char *build = getenv("PAY_BUILD_DIR");
    const char *source = getenv("PAY_SOURCE_DIR");
    if (!build || !source) {
        fprintf(stderr, "pd_run: PAY_BUILD_DIR and PAY_SOURCE_DIR must be set (run via ctest)\n");
        return -EINVAL;
    }
    char exe[512];
    snprintf(exe, sizeof(exe), "%s/paymentd", build);
    char log[] = "/tmp/pay-e2e-run-XXXXXX";
    int fd = mkstemp(log);
    if (fd < 0)
        return -errno;
    char supp[600];
    snprintf(supp, sizeof(supp), "suppressions=%s/tests/lsan.supp:print_suppressions=0", source);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int err = -errno;
        close(fd);
        unlink(log);
        return err;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(fd, 1);
        dup2(fd, 2);
        setenv("GRPC_HOST", "127.0.0.1", 1);
        setenv("METRICS_HOST", "127.0.0.1", 1);
        setenv("METRICS_PORT", "0", 1);
        setenv("ASAN_OPTIONS", "detect_leaks=1", 0);
        setenv("LSAN_OPTIONS", supp, 0);
        /* Never a Redis the test did not start (a system one on 6379): tests that want
         * the rate limiter say so in env. */
        setenv("RATE_LIMIT_ENABLED", "false", 1);
        for (size_t i = 0; env && env[i]; i++)
            putenv((char *)env[i]);
        const char *argv[32] = {exe};
        size_t n = 1;
        for (size_t i = 0; args && args[i] && n < 31; i++)
            argv[n++] = args[i];
        argv[n] = NULL;
        execv(exe, (char *const *)argv);
        _exit(127);
    }
    pd_proc_t p = {.pid = pid};
    int rc = pd_wait(&p, timeout_ms, status);
    if (rc == -ETIMEDOUT) {
        kill(pid, SIGKILL);
        waitpid(pid, status, 0);
    }
    ssize_t got = pread(fd, out, outlen - 1, 0);
    out[got > 0 ? got : 0] = '\0';
    close(fd);
    unlink(log);
    return rc;
}

int pd_signal(pd_proc_t *p, int sig)
{
    if (p->pid <= 0)
        return -ESRCH;
    return kill(p->pid, sig) == 0 ? 0 : -errno;
}

int pd_wait(pd_proc_t *p, int timeout_ms, int *status)
{
    if (p->pid <= 0)
        return -ECHILD;
    long deadline = now_ms() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(p->pid, status, WNOHANG);
        if (r == p->pid) {
            p->pid = 0;
            return 0;
        }
        if (r < 0)
            return -errno;
        if (now_ms() >= deadline)
            return -ETIMEDOUT;
        sleep_ms(10);
    }
}

void pd_cleanup(pd_proc_t *p)
{
    if (p->pid > 0) {
        kill(p->pid, SIGKILL);
        int status;
        waitpid(p->pid, &status, 0);
        p->pid = 0;
    }
    if (p->dir[0]) {
        unlink(p->log_path);
        unlink(p->port_path);
        rmdir(p->dir);
        p->dir[0] = '\0';
    }
}

int pd_stack_up(pd_stack_t *s)
{
    memset(s, 0, sizeof(*s));
    const char *source = getenv("PAY_SOURCE_DIR");
    if (!source || !getenv("PAY_BUILD_DIR")) {
        fprintf(stderr,
                "pd_stack_up: PAY_BUILD_DIR and PAY_SOURCE_DIR must be set (run via ctest)\n");
        return -1;
    }
    snprintf(s->dir, sizeof(s->dir), "/tmp/pay-e2e-stack-XXXXXX");
    if (!mkdtemp(s->dir)) {
        fprintf(stderr, "pd_stack_up: mkdtemp: %s\n", strerror(errno));
        s->dir[0] = '\0';
        return -1;
    }
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "'%s/scripts/stack.sh' up '%s' >'%s/up.log' 2>&1", source, s->dir,
             s->dir);
    if (system(cmd) != 0) {
        snprintf(cmd, sizeof(cmd), "cat '%s/up.log' >&2", s->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "pd_stack_up: cannot show %s/up.log\n", s->dir);
        fprintf(stderr,
                "pd_stack_up: scripts/stack.sh up %s failed (log above): PostgreSQL is "
                "required\n",
                s->dir);
        pd_stack_down(s);
        return -1;
    }
    char path[200], line[1200];
    snprintf(path, sizeof(path), "%s/env", s->dir);
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof(line), f)) {
        const char *k = "export DATABASE_URL=";
        if (strncmp(line, k, strlen(k)) == 0) {
            line[strcspn(line, "\r\n")] = '\0';
            snprintf(s->env_entry, sizeof(s->env_entry), "DATABASE_URL=%.1000s", line + strlen(k));
        }
    }
    if (f)
        fclose(f);
    if (!s->env_entry[0]) {
        fprintf(stderr, "pd_stack_up: no DATABASE_URL in %s\n", path);
        pd_stack_down(s);
        return -1;
    }
    return 0;
}

void pd_stack_down(pd_stack_t *s)
{
    if (!s->dir[0])
        return;
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "'%s/scripts/stack.sh' down '%s' >/dev/null 2>&1; rm -rf '%s'",
             getenv("PAY_SOURCE_DIR"), s->dir, s->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "warning: stopping the stack in %s failed\n", s->dir);
    s->dir[0] = '\0';
}
