/*
 * ledger: the ledger actor, which will apply payments to PostgreSQL in batches
 * (DESIGN.md §5). Until the ledger issue lands it answers every payment request
 * UNIMPLEMENTED, saying the ledger is not implemented yet; it already runs under the
 * supervisor like the real one, so mailbox limits, restarts, failed-back messages and
 * actor_stats behave as they will.
 *
 * It receives payment_msg_t (payment_api.h) and owns each one it is handed until it has
 * ended its call. ledger_actor_add from the main thread, before supervisor_start.
 */
#ifndef PAY_ACTORS_LEDGER_H
#define PAY_ACTORS_LEDGER_H

#include <stddef.h>

#include "runtime/actor.h"
#include "runtime/supervisor.h"

typedef struct ledger_config {
    size_t mailbox_capacity; /* 0 = 4096 */
    size_t batch_max;        /* LEDGER_BATCH_MAX; 0 = 256 */
} ledger_config_t;

/** Adds the ledger actor (critical) to the supervisor. cfg is copied. */
int ledger_actor_add(supervisor_t *s, const ledger_config_t *cfg, actor_t **out);

#endif
