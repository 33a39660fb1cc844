/*
 * redis_fixture: the real redis-server test_ratelimit_actor and test_ratelimit_redis start
 * themselves: redis-server and redis-cli looked for on PATH, a temporary directory (removed
 * at exit, with the server stopped), a server on a loopback port, optionally with
 * requirepass.
 */
#ifndef PAY_TESTS_INTEGRATION_REDIS_FIXTURE_H
#define PAY_TESTS_INTEGRATION_REDIS_FIXTURE_H

#include <sys/types.h>

extern char tmpdir[128]; /* the server's working directory (redis.log) */
extern pid_t redis_pid;  /* the group's server, 0 when stopped */
extern int redis_port;   /* its port */

/* Sleeps ms milliseconds (through EINTR). */
void sleep_ms(int ms);

/* Group setup, first half: redis-server and redis-cli must be found; tmpdir is created
 * from dir_template and, with the server at redis_pid, removed at exit. 0, or -1 with the
 * reason on stderr. */
int redis_fixture_prepare(const char *dir_template);

/* Starts redis-server in tmpdir on 127.0.0.1:port (with requirepass password unless NULL)
 * and waits until it answers PING (10 s at most): its pid, or -1. */
pid_t redis_start(int port, const char *password);

/* Stops the server *pid (SIGTERM, waited for), if any, and sets *pid to 0. */
void redis_stop(pid_t *pid);

/* Stops redis_pid and removes tmpdir. */
void redis_fixture_cleanup(void);

#endif
