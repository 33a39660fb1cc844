/*
 * Bad input against a real paymentd (DESIGN.md §3): an undecodable body is
 * INVALID_ARGUMENT; a body over 4 MiB RESOURCE_EXHAUSTED (exactly 4 MiB still gets
 * through to validation); every validation rule is INVALID_ARGUMENT with its exact
 * "<field>: <reason>" message, first failure in field order; an unknown method is
 * UNIMPLEMENTED; valid requests reach the ledger actors, which (the server runs without a
 * reachable database here) answer UNAVAILABLE: the database is not ready.
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

#include <cmocka.h>

#include "e2e/grpc_client.h"
#include "e2e/paymentd_proc.h"
#include "payment/v1/payment.pb-c.h"

#define AUTHORIZE   "/payment.v1.PaymentService/AuthorizePayment"
#define GET_PAYMENT "/payment.v1.PaymentService/GetPayment"
#define GET_BALANCE "/payment.v1.PaymentService/GetAccountBalance"

#define ACCOUNT_RULE  "must be 1-64 characters of [A-Za-z0-9_.:-]"
#define KEY_RULE      "idempotency_key: must be 1-255 printable ASCII characters"
#define CURRENCY_RULE "currency: must be a 3-letter ISO 4217 code in upper case"
/* What the ledger answers while it has no database (here: a port nothing listens on). */
#define NO_DATABASE     "database not ready (schema); retry"
#define NO_DATABASE_URL "DATABASE_URL=postgresql://payment:payment@127.0.0.1:1/payment_db"
#define ULID_RULE       "payment_id: must be a 26-character ULID in upper-case Crockford base32"

typedef struct fixture {
    pd_proc_t pd;
    gc_t *gc;
    bool passed;
} fixture_t;

static int setup_group(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    static const char *const env[] = {NO_DATABASE_URL, NULL};
    if (pd_start(&f->pd, env) < 0)
        return -1;
    return gc_connect(&f->gc, f->pd.target);
}

static int teardown_group(void **state)
{
    fixture_t *f = *state;
    if (!f->passed)
        pd_dump_log(&f->pd);
    gc_close(f->gc);
    pd_cleanup(&f->pd);
    free(f);
    return 0;
}

/* ---- a tiny protobuf writer, for bytes protobuf-c would never produce ---- */

typedef struct wire {
    uint8_t *p;
    size_t len, cap;
} wire_t;

static void put_byte(wire_t *w, uint8_t b)
{
    if (w->len == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 256;
        w->p = realloc(w->p, w->cap);
        assert_non_null(w->p);
    }
    w->p[w->len++] = b;
}

static void put_varint(wire_t *w, uint64_t v)
{
    while (v >= 0x80) {
        put_byte(w, (uint8_t)(v | 0x80));
        v >>= 7;
    }
    put_byte(w, (uint8_t)v);
}

static void put_bytes(wire_t *w, unsigned field, const void *data, size_t len)
{
    put_varint(w, (uint64_t)field << 3 | 2);
    put_varint(w, len);
    for (size_t i = 0; i < len; i++)
        put_byte(w, ((const uint8_t *)data)[i]);
}

static void put_str(wire_t *w, unsigned field, const char *s)
{
    put_bytes(w, field, s, strlen(s));
}

static void put_int(wire_t *w, unsigned field, int64_t v)
{
    put_varint(w, (uint64_t)field << 3);
    put_varint(w, (uint64_t)v);
}

/* An AuthorizePaymentRequest with fields as given (NULL = the valid default). A field may
 * carry an explicit length to embed NULs. */
typedef struct authz {
    const char *key, *payer, *payee, *currency, *description;
    size_t key_len, description_len; /* 0 = strlen */
    int64_t amount;
} authz_t;

static wire_t authz_wire(const authz_t *a)
{
    wire_t w = {0};
    const char *key = a->key ? a->key : "order-42";
    put_bytes(&w, 1, key, a->key_len ? a->key_len : strlen(key));
    put_str(&w, 2, a->payer ? a->payer : "acct_alice");
    put_str(&w, 3, a->payee ? a->payee : "acct_bob");
    put_int(&w, 4, a->amount ? a->amount : 1250);
    put_str(&w, 5, a->currency ? a->currency : "USD");
    const char *d = a->description ? a->description : "coffee";
    put_bytes(&w, 6, d, a->description_len ? a->description_len : strlen(d));
    return w;
}

static void call(fixture_t *f, const char *method, const wire_t *w, grpc_status_code code,
                 const char *details)
{
    gc_result_t r;
    assert_int_equal(gc_unary(f->gc, method, w->p, w->len, 20000, NULL, 0, &r), 0);
    if (r.status != code || strcmp(r.details, details) != 0)
        fail_msg("%s: got %d \"%s\", want %d \"%s\"", method, r.status, r.details, code, details);
    gc_result_free(&r);
}

static char *repeat(char c, size_t n)
{
    char *s = malloc(n + 1);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static void test_authorize_rules(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    char *k256 = repeat('k', 256), *k255 = repeat('k', 255);
    char *a65 = repeat('a', 65), *a64 = repeat('a', 64);
    char *d1025 = repeat('d', 1025), *d1024 = repeat('d', 1024);
    static const char NOT_IMPL[] = NO_DATABASE;
    const struct {
        authz_t req;
        grpc_status_code code;
        const char *details;
    } cases[] = {
        {{.key = ""}, GRPC_STATUS_INVALID_ARGUMENT, KEY_RULE},
        {{.key = k256}, GRPC_STATUS_INVALID_ARGUMENT, KEY_RULE},
        {{.key = "tab\there"}, GRPC_STATUS_INVALID_ARGUMENT, KEY_RULE},
        {{.key = "caf\xc3\xa9"}, GRPC_STATUS_INVALID_ARGUMENT, KEY_RULE},
        {{.key = "ab\0cd", .key_len = 5}, GRPC_STATUS_INVALID_ARGUMENT, KEY_RULE},
        {{.key = k255}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
        {{.key = " !~"}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
        {{.payer = ""}, GRPC_STATUS_INVALID_ARGUMENT, "payer_account_id: " ACCOUNT_RULE},
        {{.payer = "bad id"},
         GRPC_STATUS_INVALID_ARGUMENT,
         "payer_account_id: " ACCOUNT_RULE " (got \"bad id\")"},
        {{.payer = a65}, GRPC_STATUS_INVALID_ARGUMENT, "payer_account_id: " ACCOUNT_RULE},
        {{.payer = a64}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
        {{.payer = "A-z_0.9:x"}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
        {{.payee = ""}, GRPC_STATUS_INVALID_ARGUMENT, "payee_account_id: " ACCOUNT_RULE},
        {{.payee = "x/y"},
         GRPC_STATUS_INVALID_ARGUMENT,
         "payee_account_id: " ACCOUNT_RULE " (got \"x/y\")"},
        {{.payee = a65}, GRPC_STATUS_INVALID_ARGUMENT, "payee_account_id: " ACCOUNT_RULE},
        {{.currency = ""}, GRPC_STATUS_INVALID_ARGUMENT, CURRENCY_RULE},
        {{.currency = "usd"}, GRPC_STATUS_INVALID_ARGUMENT, CURRENCY_RULE " (got \"usd\")"},
        {{.currency = "USDX"}, GRPC_STATUS_INVALID_ARGUMENT, CURRENCY_RULE " (got \"USDX\")"},
        {{.currency = "US"}, GRPC_STATUS_INVALID_ARGUMENT, CURRENCY_RULE " (got \"US\")"},
        {{.description = d1025},
         GRPC_STATUS_INVALID_ARGUMENT,
         "description: must be at most 1024 bytes"},
        {{.description = d1024}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
        {{.description = "ab\xff"},
         GRPC_STATUS_INVALID_ARGUMENT,
         "description: must be valid UTF-8 (invalid sequence at byte 2)"},
        {{.description = "\xed\xa0\x80"},
         GRPC_STATUS_INVALID_ARGUMENT,
         "description: must be valid UTF-8 (invalid sequence at byte 0)"},
        {{.description = "a\0b", .description_len = 3},
         GRPC_STATUS_INVALID_ARGUMENT,
         "description: must not contain NUL characters"},
        {{.description = "caf\xc3\xa9 \xe2\x82\xac"}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
        /* first failure in field order only */
        {{.key = "", .payer = "bad id", .currency = "usd"}, GRPC_STATUS_INVALID_ARGUMENT, KEY_RULE},
        {{.payer = "x y", .payee = "x/y", .currency = "usd"},
         GRPC_STATUS_INVALID_ARGUMENT,
         "payer_account_id: " ACCOUNT_RULE " (got \"x y\")"},
        {{.currency = "usd", .description = "ab\xff"},
         GRPC_STATUS_INVALID_ARGUMENT,
         CURRENCY_RULE " (got \"usd\")"},
        /* amounts are business declines, decided by the ledger */
        {{.amount = -5}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
        {{.payer = "same", .payee = "same"}, GRPC_STATUS_UNAVAILABLE, NOT_IMPL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        wire_t w = authz_wire(&cases[i].req);
        call(f, AUTHORIZE, &w, cases[i].code, cases[i].details);
        free(w.p);
    }
    free(k256);
    free(k255);
    free(a65);
    free(a64);
    free(d1025);
    free(d1024);
    f->passed = true;
}

static void test_get_rules(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    const struct {
        const char *method;
        const char *id;
        size_t len;
        grpc_status_code code;
        const char *details;
    } cases[] = {
        {GET_PAYMENT, "", 0, GRPC_STATUS_INVALID_ARGUMENT, ULID_RULE},
        {GET_PAYMENT, "01arz3ndektsv4rrffq69g5fav", 0, GRPC_STATUS_INVALID_ARGUMENT,
         ULID_RULE " (got \"01arz3ndektsv4rrffq69g5fav\")"},
        {GET_PAYMENT, "01ARZ3NDEKTSV4RRFFQ69G5FAU", 0, GRPC_STATUS_INVALID_ARGUMENT,
         ULID_RULE " (got \"01ARZ3NDEKTSV4RRFFQ69G5FAU\")"},
        {GET_PAYMENT, "01ARZ3NDEKTSV4RRFFQ69G5FA", 0, GRPC_STATUS_INVALID_ARGUMENT,
         ULID_RULE " (got \"01ARZ3NDEKTSV4RRFFQ69G5FA\")"},
        {GET_PAYMENT, "01ARZ3NDEKTSV4RRFFQ69G5FAV\0", 27, GRPC_STATUS_INVALID_ARGUMENT, ULID_RULE},
        {GET_PAYMENT, "01ARZ3NDEKTSV4RRFFQ69G5FAV", 0, GRPC_STATUS_UNAVAILABLE, NO_DATABASE},
        {GET_BALANCE, "", 0, GRPC_STATUS_INVALID_ARGUMENT, "account_id: " ACCOUNT_RULE},
        {GET_BALANCE, "acct 1", 0, GRPC_STATUS_INVALID_ARGUMENT,
         "account_id: " ACCOUNT_RULE " (got \"acct 1\")"},
        {GET_BALANCE, "acct\0x", 6, GRPC_STATUS_INVALID_ARGUMENT, "account_id: " ACCOUNT_RULE},
        {GET_BALANCE, "acct_alice", 0, GRPC_STATUS_UNAVAILABLE, NO_DATABASE},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        wire_t w = {0};
        put_bytes(&w, 1, cases[i].id, cases[i].len ? cases[i].len : strlen(cases[i].id));
        call(f, cases[i].method, &w, cases[i].code, cases[i].details);
        free(w.p);
    }
    /* An empty body is the empty message: the id is missing. */
    wire_t empty = {0};
    call(f, GET_BALANCE, &empty, GRPC_STATUS_INVALID_ARGUMENT, "account_id: " ACCOUNT_RULE);
    f->passed = true;
}

static void test_undecodable(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff};
    wire_t w = {.p = (uint8_t *)junk, .len = sizeof(junk)};
    call(f, AUTHORIZE, &w, GRPC_STATUS_INVALID_ARGUMENT,
         "request: malformed payment.v1.AuthorizePaymentRequest message");
    call(f, GET_PAYMENT, &w, GRPC_STATUS_INVALID_ARGUMENT,
         "request: malformed payment.v1.GetPaymentRequest message");
    call(f, GET_BALANCE, &w, GRPC_STATUS_INVALID_ARGUMENT,
         "request: malformed payment.v1.GetAccountBalanceRequest message");
    /* A string field whose length runs past the end. */
    static const uint8_t truncated[] = {0x0a, 0x10, 'a', 'b'};
    wire_t t = {.p = (uint8_t *)truncated, .len = sizeof(truncated)};
    call(f, GET_BALANCE, &t, GRPC_STATUS_INVALID_ARGUMENT,
         "request: malformed payment.v1.GetAccountBalanceRequest message");
    /* A wire type that does not match the field (amount_cents as a string). */
    wire_t bad = {0};
    put_str(&bad, 4, "100");
    call(f, AUTHORIZE, &bad, GRPC_STATUS_INVALID_ARGUMENT,
         "request: malformed payment.v1.AuthorizePaymentRequest message");
    free(bad.p);
    f->passed = true;
}

/* A valid-looking AuthorizePaymentRequest of exactly total bytes (a long description). */
static wire_t sized_request(size_t total)
{
    authz_t a = {.description = ""};
    wire_t w = authz_wire(&a);
    w.len -= 2;                          /* drop the empty description (tag + zero length) */
    size_t dlen = total - w.len - 1 - 4; /* tag, 4-byte varint length */
    assert_true(dlen >= (1u << 21) && dlen < (1u << 28));
    char *d = repeat('d', dlen);
    put_bytes(&w, 6, d, dlen);
    free(d);
    assert_int_equal(w.len, total);
    return w;
}

static void test_size_limit(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    wire_t at = sized_request(4u * 1024 * 1024);
    call(f, AUTHORIZE, &at, GRPC_STATUS_INVALID_ARGUMENT,
         "description: must be at most 1024 bytes");
    free(at.p);

    wire_t over = sized_request(4u * 1024 * 1024 + 1);
    gc_result_t r;
    assert_int_equal(gc_unary(f->gc, AUTHORIZE, over.p, over.len, 20000, NULL, 0, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_RESOURCE_EXHAUSTED);
    assert_non_null(strstr(r.details, "4194305 vs. 4194304"));
    gc_result_free(&r);
    free(over.p);

    wire_t big = sized_request(5u * 1000 * 1000);
    assert_int_equal(gc_unary(f->gc, GET_BALANCE, big.p, big.len, 20000, NULL, 0, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_RESOURCE_EXHAUSTED);
    gc_result_free(&r);
    free(big.p);

    /* The server is unharmed. */
    wire_t ok = {0};
    put_str(&ok, 1, "acct_alice");
    call(f, GET_BALANCE, &ok, GRPC_STATUS_UNAVAILABLE, NO_DATABASE);
    free(ok.p);
    f->passed = true;
}

static void test_unknown_method(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    wire_t w = {0};
    put_str(&w, 1, "x");
    call(f, "/payment.v1.PaymentService/RefundPayment", &w, GRPC_STATUS_UNIMPLEMENTED,
         "unknown method /payment.v1.PaymentService/RefundPayment");
    call(f, "/no.such.Service/Method", &w, GRPC_STATUS_UNIMPLEMENTED,
         "unknown method /no.such.Service/Method");
    call(f, "/grpc.health.v1.Health/List", &w, GRPC_STATUS_UNIMPLEMENTED,
         "unknown method /grpc.health.v1.Health/List");
    free(w.p);
    f->passed = true;
}

static void test_valid_requests_reach_ledger(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    Payment__V1__AuthorizePaymentRequest a = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    a.idempotency_key = "key-1";
    a.payer_account_id = "acct_alice";
    a.payee_account_id = "acct_bob";
    a.amount_cents = 500;
    a.currency = "EUR";
    gc_result_t r;
    assert_int_equal(gc_unary_msg(f->gc, AUTHORIZE, &a.base, 10000, &r), 0);
    assert_int_equal(r.status, GRPC_STATUS_UNAVAILABLE);
    assert_string_equal(r.details, NO_DATABASE);
    assert_null(r.body);
    gc_result_free(&r);
    f->passed = true;
}

static void test_shutdown_clean(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    assert_int_equal(pd_signal(&f->pd, SIGTERM), 0);
    int status;
    assert_int_equal(pd_wait(&f->pd, 30000, &status), 0);
    char why[64];
    assert_string_equal(pd_status_str(status, why, sizeof(why)), "exit 0");
    f->passed = true;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_authorize_rules), cmocka_unit_test(test_get_rules),
        cmocka_unit_test(test_undecodable),     cmocka_unit_test(test_size_limit),
        cmocka_unit_test(test_unknown_method),  cmocka_unit_test(test_valid_requests_reach_ledger),
        cmocka_unit_test(test_shutdown_clean),
    };
    return cmocka_run_group_tests_name("e2e_bad_input", tests, setup_group, teardown_group);
}
