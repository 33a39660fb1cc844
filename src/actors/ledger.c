/*
 * ledger: see ledger.h. For now each payment message is answered UNIMPLEMENTED.
 * The call is ended, the message marked done and disposed of in that order with no
 * failure point in between, so a failing incarnation can never answer a call twice.
 */
#include "actors/ledger.h"

#include <errno.h>
#include <stdio.h>

#include "actors/payment_api.h"
#include "runtime/log.h"

#define MOD "ledger"

static int ledger_start(actor_t *a, void *arg, void **state)
{
    *state = NULL;
    return 0;
}

static int ledger_handle(actor_t *a, void *state, msg_t **msgs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        msg_t *hdr = msgs[i];
        switch (hdr->type) {
        case PAYMENT_AUTHORIZE:
        case PAYMENT_GET_PAYMENT:
        case PAYMENT_GET_BALANCE: {
            payment_msg_t *m = (payment_msg_t *)hdr;
            const char *path = payment_method_path((payment_method_t)hdr->type);
            char text[160];
            snprintf(text, sizeof(text), "%s: the ledger is not implemented yet",
                     path + sizeof("/payment.v1.PaymentService/") - 1);
            payment_msg_fail(m, GRPC_STATUS_UNIMPLEMENTED, text, NULL, 0);
            actor_done(a, hdr);
            msg_dispose(hdr);
            break;
        }
        default:
            LOG_ERROR(MOD, "unexpected message type %u", (unsigned)hdr->type);
            actor_done(a, hdr);
            msg_fail(hdr, -EINVAL);
            break;
        }
    }
    return 0;
}

int ledger_actor_add(supervisor_t *s, const ledger_config_t *cfg, actor_t **out)
{
    actor_spec_t spec = {
        .name = "ledger",
        .mailbox_capacity = cfg && cfg->mailbox_capacity ? cfg->mailbox_capacity : 4096,
        .batch_max = cfg && cfg->batch_max ? cfg->batch_max : 256,
        .critical = true,
        .start = ledger_start,
        .handle = ledger_handle,
    };
    return supervisor_add(s, &spec, out);
}
