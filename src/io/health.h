/*
 * health: the grpc.health.v1.Health service (Check and Watch) over one process-wide
 * serving flag.
 *
 * Every known service ("" and the names given to health_init) reports the same status:
 * SERVING while the flag is set and the process is not shutting down, else NOT_SERVING.
 * Check answers at once (unknown service → NOT_FOUND). Watch sends the current status at
 * once and then every change until the client cancels; an unknown service gets
 * SERVICE_UNKNOWN and the stream stays open. health_shutdown() makes every status
 * NOT_SERVING for good; each Watch stream receives it and then ends UNAVAILABLE
 * ("server shutting down"), before the server stops.
 *
 * The state is a module singleton: health_init/register/fini from the main thread;
 * health_set_serving, health_serving and health_shutdown from any thread (a mutex guards
 * the state and the list of Watch streams; its holder only starts non-blocking batches).
 */
#ifndef PAY_IO_HEALTH_H
#define PAY_IO_HEALTH_H

#include <stdbool.h>
#include <stddef.h>

#include "io/grpc_server.h"

#define HEALTH_CHECK_PATH "/grpc.health.v1.Health/Check"
#define HEALTH_WATCH_PATH "/grpc.health.v1.Health/Watch"

/** Known services besides "" (copied). Starts NOT_SERVING. 0 or -errno. */
int health_init(const char *const *services, size_t nservices);
/** Adds Check and Watch to the server (before it starts). */
int health_register(rpc_server_t *srv);
/** Any thread: the serving flag (e.g. the database is reachable). */
void health_set_serving(bool serving);
/** Any thread: true when known services report SERVING. */
bool health_serving(void);
/** Any thread, idempotent: NOT_SERVING from now on; Watch streams get it, then end. */
void health_shutdown(void);
/** Number of open Watch streams (tests, metrics). */
size_t health_watchers(void);
/** After the server is destroyed: frees the state. */
void health_fini(void);

#endif
