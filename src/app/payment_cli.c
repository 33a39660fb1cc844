/*
 * payment-cli: a tiny gRPC client of payment.v1.PaymentService for humans.
 *
 *   payment-cli [--addr H:P] [--timeout SECS] [--client-id ID] COMMAND
 *     authorize --key K --payer A --payee B --amount CENTS --currency CUR [--description D]
 *     get-payment ID
 *     balance ACCOUNT_ID
 *
 * Prints the response as JSON (enum values by name, 64-bit integers as numbers) and exits
 * 0; a gRPC error is printed to stderr as "payment-cli: STATUS: details" with exit 1;
 * usage errors exit 2. The address defaults to $PAYMENT_ADDR, else 127.0.0.1:50051.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/grpc_client.h"
#include "io/grpc_server.h"
#include "payment/v1/payment.pb-c.h"

#define DEFAULT_ADDR "127.0.0.1:50051"

static const char USAGE[] =
    "Usage: payment-cli [--addr HOST:PORT] [--timeout SECS] [--client-id ID] COMMAND\n"
    "\n"
    "Commands:\n"
    "  authorize --key K --payer A --payee B --amount CENTS --currency CUR [--description D]\n"
    "                       AuthorizePayment\n"
    "  get-payment ID       GetPayment\n"
    "  balance ACCOUNT_ID   GetAccountBalance\n"
    "\n"
    "Options:\n"
    "  --addr HOST:PORT     server address (default $PAYMENT_ADDR, else " DEFAULT_ADDR ")\n"
    "  --timeout SECS       call deadline (default 10)\n"
    "  --client-id ID       send x-client-id metadata (rate limiting, idempotency scope)\n"
    "\n"
    "Prints the response as JSON; a gRPC error goes to stderr and exits 1.\n";

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "payment-cli: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(payment-cli --help for usage)\n");
    return 2;
}

/* A JSON string literal. */
static void json_str(const char *s)
{
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        switch (*p) {
        case '"':
            fputs("\\\"", stdout);
            break;
        case '\\':
            fputs("\\\\", stdout);
            break;
        case '\n':
            fputs("\\n", stdout);
            break;
        case '\r':
            fputs("\\r", stdout);
            break;
        case '\t':
            fputs("\\t", stdout);
            break;
        default:
            if (*p < 0x20)
                printf("\\u%04x", *p);
            else
                putchar(*p);
        }
    }
    putchar('"');
}

static const char *enum_name(const ProtobufCEnumDescriptor *d, int v)
{
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(d, v);
    return ev ? ev->name : "UNKNOWN";
}

static void print_authorize(const Payment__V1__AuthorizePaymentResponse *r)
{
    printf("{\n  \"payment_id\": ");
    json_str(r->payment_id);
    printf(",\n  \"status\": ");
    json_str(enum_name(&payment__v1__payment_status__descriptor, r->status));
    if (r->error) {
        printf(",\n  \"error\": {\"code\": ");
        json_str(enum_name(&payment__v1__payment_error_code__descriptor, r->error->code));
        printf(", \"message\": ");
        json_str(r->error->message);
        printf("}");
    }
    printf(",\n  \"processed_at\": ");
    json_str(r->processed_at);
    printf("\n}\n");
}

static void print_payment(const Payment__V1__GetPaymentResponse *r)
{
    const Payment__V1__Payment *p = r->payment;
    if (!p) {
        printf("{}\n");
        return;
    }
    printf("{\n  \"payment\": {\n    \"payment_id\": ");
    json_str(p->payment_id);
    printf(",\n    \"payer_account_id\": ");
    json_str(p->payer_account_id);
    printf(",\n    \"payee_account_id\": ");
    json_str(p->payee_account_id);
    printf(",\n    \"amount_cents\": %" PRId64 ",\n    \"currency\": ", p->amount_cents);
    json_str(p->currency);
    printf(",\n    \"status\": ");
    json_str(enum_name(&payment__v1__payment_status__descriptor, p->status));
    printf(",\n    \"description\": ");
    json_str(p->description);
    printf(",\n    \"created_at\": ");
    json_str(p->created_at);
    printf(",\n    \"updated_at\": ");
    json_str(p->updated_at);
    printf("\n  }\n}\n");
}

static void print_balance(const Payment__V1__GetAccountBalanceResponse *r)
{
    printf("{\n  \"account_id\": ");
    json_str(r->account_id);
    printf(",\n  \"available_balance_cents\": %" PRId64 ",\n  \"pending_balance_cents\": %" PRId64
           ",\n  \"currency\": ",
           r->available_balance_cents, r->pending_balance_cents);
    json_str(r->currency);
    printf("\n}\n");
}

static bool parse_i64(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end)
        return false;
    *out = v;
    return true;
}

int main(int argc, char **argv)
{
    const char *addr = getenv("PAYMENT_ADDR");
    const char *client_id = NULL;
    double timeout_s = 10;
    int i = 1;
    if (!addr || !*addr)
        addr = DEFAULT_ADDR;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (i + 1 >= argc)
            return usage_error("%s: missing value", a);
        if (strcmp(a, "--addr") == 0) {
            addr = argv[++i];
        } else if (strcmp(a, "--client-id") == 0) {
            client_id = argv[++i];
        } else if (strcmp(a, "--timeout") == 0) {
            char *end;
            timeout_s = strtod(argv[++i], &end);
            if (*end || !(timeout_s > 0 && timeout_s <= 3600))
                return usage_error("--timeout: \"%s\" is not a number of seconds in (0, 3600]",
                                   argv[i]);
        } else {
            return usage_error("unknown option %s", a);
        }
    }
    if (i >= argc)
        return usage_error("%s", "missing command (authorize, get-payment or balance)");
    const char *cmd = argv[i++];

    const char *method;
    const ProtobufCMessage *req;
    Payment__V1__AuthorizePaymentRequest ar = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    Payment__V1__GetPaymentRequest gp = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
    Payment__V1__GetAccountBalanceRequest gb = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    if (strcmp(cmd, "authorize") == 0) {
        bool has_amount = false;
        for (; i < argc; i++) {
            const char *a = argv[i];
            if (i + 1 >= argc)
                return usage_error("authorize: %s: missing value", a);
            const char *v = argv[++i];
            if (strcmp(a, "--key") == 0)
                ar.idempotency_key = (char *)v;
            else if (strcmp(a, "--payer") == 0)
                ar.payer_account_id = (char *)v;
            else if (strcmp(a, "--payee") == 0)
                ar.payee_account_id = (char *)v;
            else if (strcmp(a, "--currency") == 0)
                ar.currency = (char *)v;
            else if (strcmp(a, "--description") == 0)
                ar.description = (char *)v;
            else if (strcmp(a, "--amount") == 0) {
                if (!parse_i64(v, &ar.amount_cents))
                    return usage_error("authorize: --amount: \"%s\" is not a whole number of cents",
                                       v);
                has_amount = true;
            } else {
                return usage_error("authorize: unknown option %s", a);
            }
        }
        const char *missing = !ar.idempotency_key[0]    ? "--key"
                              : !ar.payer_account_id[0] ? "--payer"
                              : !ar.payee_account_id[0] ? "--payee"
                              : !has_amount             ? "--amount"
                              : !ar.currency[0]         ? "--currency"
                                                        : NULL;
        if (missing)
            return usage_error("authorize: %s is required", missing);
        method = "/payment.v1.PaymentService/AuthorizePayment";
        req = &ar.base;
    } else if (strcmp(cmd, "get-payment") == 0 || strcmp(cmd, "balance") == 0) {
        if (argc - i != 1)
            return usage_error("%s: expected exactly one id", cmd);
        if (cmd[0] == 'g') {
            gp.payment_id = argv[i];
            method = "/payment.v1.PaymentService/GetPayment";
            req = &gp.base;
        } else {
            gb.account_id = argv[i];
            method = "/payment.v1.PaymentService/GetAccountBalance";
            req = &gb.base;
        }
    } else {
        return usage_error("unknown command \"%s\" (authorize, get-payment or balance)", cmd);
    }

    size_t len = protobuf_c_message_get_packed_size(req);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        return 1;
    protobuf_c_message_pack(req, buf);
    gc_t *gc = NULL;
    if (gc_connect(&gc, addr) < 0) {
        fprintf(stderr, "payment-cli: cannot create a channel to %s\n", addr);
        free(buf);
        return 1;
    }
    gc_md_t md[1] = {{"x-client-id", client_id}};
    gc_result_t r;
    int rc = gc_unary(gc, method, buf, len, (int)(timeout_s * 1000), md, client_id ? 1 : 0, &r);
    free(buf);
    int exit_code = 1;
    if (rc < 0) {
        fprintf(stderr, "payment-cli: %s: the client got stuck (%s)\n", addr, strerror(-rc));
    } else if (r.status != GRPC_STATUS_OK) {
        fprintf(stderr, "payment-cli: %s: %s\n", rpc_status_name(r.status), r.details);
    } else {
        ProtobufCMessage *resp = NULL;
        const ProtobufCMessageDescriptor *d =
            req == &ar.base   ? &payment__v1__authorize_payment_response__descriptor
            : req == &gp.base ? &payment__v1__get_payment_response__descriptor
                              : &payment__v1__get_account_balance_response__descriptor;
        resp = protobuf_c_message_unpack(d, NULL, r.body_len, r.body);
        if (!resp) {
            fprintf(stderr, "payment-cli: undecodable response (%zu bytes)\n", r.body_len);
        } else {
            if (req == &ar.base)
                print_authorize((const Payment__V1__AuthorizePaymentResponse *)resp);
            else if (req == &gp.base)
                print_payment((const Payment__V1__GetPaymentResponse *)resp);
            else
                print_balance((const Payment__V1__GetAccountBalanceResponse *)resp);
            protobuf_c_message_free_unpacked(resp, NULL);
            exit_code = 0;
        }
    }
    if (rc == 0)
        gc_result_free(&r);
    gc_close(gc);
    return exit_code;
}
