/*
 * redis_fixture: the redis-server of the rate limiter's integration tests (see
 * redis_fixture.h).
 */
#include "redis_fixture.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

char tmpdir[128];
pid_t redis_pid;
int redis_port;

void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

pid_t redis_start(int port, const char *password)
{
    char ports[16];
    snprintf(ports, sizeof ports, "%d", port);
    pid_t pid = fork();
    if (pid == 0) {
        if (chdir(tmpdir) != 0)
            _exit(126);
        if (password)
            execlp("redis-server", "redis-server", "--bind", "127.0.0.1", "--port", ports, "--save",
                   "", "--appendonly", "no", "--requirepass", password, "--logfile", "redis.log",
                   (char *)NULL);
        else
            execlp("redis-server", "redis-server", "--bind", "127.0.0.1", "--port", ports, "--save",
                   "", "--appendonly", "no", "--logfile", "redis.log", (char *)NULL);
        _exit(127);
    }
    char cmd[256], auth[160] = "";
    if (password)
        snprintf(auth, sizeof auth, " -a %s --no-auth-warning", password);
    snprintf(cmd, sizeof cmd, "redis-cli -h 127.0.0.1 -p %d%s ping 2>/dev/null | grep -q PONG",
             port, auth);
    for (int i = 0; i < 200; i++) {
        if (system(cmd) == 0)
            return pid;
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            fprintf(stderr, "redis-server exited at start (status %d)\n", st);
            return -1;
        }
        sleep_ms(50);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    fprintf(stderr, "redis-server did not answer on port %d within 10 s\n", port);
    return -1;
}

void redis_stop(pid_t *pid)
{
    if (*pid > 0) {
        kill(*pid, SIGTERM);
        waitpid(*pid, NULL, 0);
        *pid = 0;
    }
}

void redis_fixture_cleanup(void)
{
    redis_stop(&redis_pid);
    if (tmpdir[0]) {
        char cmd[256];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
        if (system(cmd) != 0)
            fprintf(stderr, "cannot remove %s\n", tmpdir);
        tmpdir[0] = '\0';
    }
}

int redis_fixture_prepare(const char *dir_template)
{
    if (system("command -v redis-server >/dev/null && command -v redis-cli >/dev/null") != 0) {
        fprintf(stderr, "redis-server / redis-cli not found: this test needs a real Redis "
                        "(Debian package redis-server; scripts/bootstrap.sh installs it)\n");
        return -1;
    }
    snprintf(tmpdir, sizeof tmpdir, "%s", dir_template);
    if (!mkdtemp(tmpdir)) {
        tmpdir[0] = '\0';
        return -1;
    }
    atexit(redis_fixture_cleanup);
    return 0;
}
