/*
 * Unit tests of actors/payment_validate: every rule of DESIGN.md §3 at its boundaries,
 * the exact messages, field-order precedence, and the wire variants that see embedded NULs.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "actors/payment_validate.h"

#define ACCT_MSG " must be 1-64 characters of [A-Za-z0-9_.:-]"
#define KEY_MSG  "idempotency_key: must be 1-255 printable ASCII characters"
#define CUR_MSG  "currency: must be a 3-letter ISO 4217 code in upper case"
#define ULID_MSG "payment_id: must be a 26-character ULID in upper-case Crockford base32"
#define UTF8_MSG "description: must be valid UTF-8 (invalid sequence at byte "

/* Test strings live until the group teardown frees them all. */
static void *kept[256];
static size_t nkept;

static void *keep(void *p)
{
    assert_non_null(p);
    assert_true(nkept < sizeof(kept) / sizeof(kept[0]));
    return kept[nkept++] = p;
}

static int free_kept(void **state)
{
    while (nkept)
        free(kept[--nkept]);
    return 0;
}

/* n copies of c */
static char *rep(char c, size_t n)
{
    char *s = keep(malloc(n + 1));
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static char *cat(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *s = keep(malloc(la + lb + 1));
    memcpy(s, a, la);
    memcpy(s + la, b, lb + 1);
    return s;
}

typedef struct auth_case {
    const char *key, *payer, *payee, *currency, *description;
    const char *want; /* NULL = valid */
} auth_case_t;

static void check_authorize(const auth_case_t *c, size_t i)
{
    Payment__V1__AuthorizePaymentRequest r = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    r.idempotency_key = (char *)c->key;
    r.payer_account_id = (char *)c->payer;
    r.payee_account_id = (char *)c->payee;
    r.amount_cents = 100;
    r.currency = (char *)c->currency;
    r.description = (char *)c->description;
    char msg[PAYMENT_VALIDATE_MSG_MAX];
    memset(msg, 'Z', sizeof(msg));
    msg[sizeof(msg) - 1] = '\0';
    int rc = payment_validate_authorize(&r, msg, sizeof(msg));
    if (c->want == NULL) {
        if (rc != 0)
            fail_msg("case %zu: expected valid, got %d \"%s\"", i, rc, msg);
    } else {
        if (rc != -EINVAL)
            fail_msg("case %zu: expected -EINVAL \"%s\", got %d", i, c->want, rc);
        if (strcmp(msg, c->want) != 0)
            fail_msg("case %zu: expected \"%s\", got \"%s\"", i, c->want, msg);
    }
}

static void test_authorize_idempotency_key(void **state)
{
    const char *k255 = rep('k', 255), *k256 = rep('k', 256);
    char all_printable[96];
    for (int c = 0x20; c <= 0x7e; c++)
        all_printable[c - 0x20] = (char)c;
    all_printable[95] = '\0';
    const auth_case_t cases[] = {
        {"k", "a", "b", "USD", "", NULL},           {k255, "a", "b", "USD", "", NULL},
        {all_printable, "a", "b", "USD", "", NULL}, {" ", "a", "b", "USD", "", NULL},
        {"~", "a", "b", "USD", "", NULL},           {"", "a", "b", "USD", "", KEY_MSG},
        {NULL, "a", "b", "USD", "", KEY_MSG},       {k256, "a", "b", "USD", "", KEY_MSG},
        {"key\x1f", "a", "b", "USD", "", KEY_MSG},  {"key\t1", "a", "b", "USD", "", KEY_MSG},
        {"key\n", "a", "b", "USD", "", KEY_MSG},    {"key\x7f", "a", "b", "USD", "", KEY_MSG},
        {"key\x80", "a", "b", "USD", "", KEY_MSG},  {"cl\xc3\xa9", "a", "b", "USD", "", KEY_MSG},
        {"\x01", "a", "b", "USD", "", KEY_MSG},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_authorize(&cases[i], i);
}

static void test_authorize_account_ids(void **state)
{
    const char *a64 = rep('a', 64), *a65 = rep('a', 65);
    const auth_case_t cases[] = {
        {"k", "a", "b", "USD", "", NULL},
        {"k", a64, a64, "USD", "", NULL},
        {"k", "AZaz09_.:-", "acct:eu-1.main_2", "USD", "", NULL},
        {"k", "0", "Z", "USD", "", NULL},
        {"k", "", "b", "USD", "", "payer_account_id:" ACCT_MSG},
        {"k", NULL, "b", "USD", "", "payer_account_id:" ACCT_MSG},
        {"k", a65, "b", "USD", "", "payer_account_id:" ACCT_MSG},
        {"k", "a b", "b", "USD", "", "payer_account_id:" ACCT_MSG " (got \"a b\")"},
        {"k", "a/b", "b", "USD", "", "payer_account_id:" ACCT_MSG " (got \"a/b\")"},
        {"k", "a@b", "b", "USD", "", "payer_account_id:" ACCT_MSG " (got \"a@b\")"},
        {"k", "a+b", "b", "USD", "", "payer_account_id:" ACCT_MSG " (got \"a+b\")"},
        {"k", "a,b", "b", "USD", "", "payer_account_id:" ACCT_MSG " (got \"a,b\")"},
        {"k", "a~", "b", "USD", "", "payer_account_id:" ACCT_MSG " (got \"a~\")"},
        /* not echoed: a quote, a backslash, a control character, non-ASCII */
        {"k", "a\"b", "b", "USD", "", "payer_account_id:" ACCT_MSG},
        {"k", "a\\b", "b", "USD", "", "payer_account_id:" ACCT_MSG},
        {"k", "a\tb", "b", "USD", "", "payer_account_id:" ACCT_MSG},
        {"k", "caf\xc3\xa9", "b", "USD", "", "payer_account_id:" ACCT_MSG},
        {"k", "a", "", "USD", "", "payee_account_id:" ACCT_MSG},
        {"k", "a", NULL, "USD", "", "payee_account_id:" ACCT_MSG},
        {"k", "a", a65, "USD", "", "payee_account_id:" ACCT_MSG},
        {"k", "a", "b!", "USD", "", "payee_account_id:" ACCT_MSG " (got \"b!\")"},
        {"k", "a", "b\x7f", "USD", "", "payee_account_id:" ACCT_MSG},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_authorize(&cases[i], i);
}

static void test_authorize_account_id_echo_length(void **state)
{
    /* 40 characters are echoed, 41 are not. */
    char *bad40 = cat(rep('a', 39), "!");
    char *bad41 = cat(rep('a', 40), "!");
    char want40[PAYMENT_VALIDATE_MSG_MAX];
    snprintf(want40, sizeof(want40), "payer_account_id:" ACCT_MSG " (got \"%s\")", bad40);
    const auth_case_t cases[] = {
        {"k", bad40, "b", "USD", "", want40},
        {"k", bad41, "b", "USD", "", "payer_account_id:" ACCT_MSG},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_authorize(&cases[i], i);
    assert_true(strlen(want40) < PAYMENT_VALIDATE_MSG_MAX - 1);
}

static void test_authorize_currency(void **state)
{
    const auth_case_t cases[] = {
        {"k", "a", "b", "USD", "", NULL},
        {"k", "a", "b", "EUR", "", NULL},
        {"k", "a", "b", "AAA", "", NULL},
        {"k", "a", "b", "ZZZ", "", NULL},
        {"k", "a", "b", "", "", CUR_MSG},
        {"k", "a", "b", NULL, "", CUR_MSG},
        {"k", "a", "b", "usd", "", CUR_MSG " (got \"usd\")"},
        {"k", "a", "b", "Usd", "", CUR_MSG " (got \"Usd\")"},
        {"k", "a", "b", "US", "", CUR_MSG " (got \"US\")"},
        {"k", "a", "b", "USDD", "", CUR_MSG " (got \"USDD\")"},
        {"k", "a", "b", "U1D", "", CUR_MSG " (got \"U1D\")"},
        {"k", "a", "b", "US ", "", CUR_MSG " (got \"US \")"},
        {"k", "a", "b", "@SD", "", CUR_MSG " (got \"@SD\")"},
        {"k", "a", "b", "[SD", "", CUR_MSG " (got \"[SD\")"},
        {"k", "a", "b", "\xc3\x9cSD", "", CUR_MSG},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_authorize(&cases[i], i);
}

static void test_authorize_description_length(void **state)
{
    /* 341 euro signs (3 bytes each) = 1023 bytes */
    char *euros = keep(malloc(341 * 3 + 1));
    for (int i = 0; i < 341; i++)
        memcpy(euros + 3 * i, "\xe2\x82\xac", 3);
    euros[341 * 3] = '\0';
    const auth_case_t cases[] = {
        {"k", "a", "b", "USD", "", NULL},
        {"k", "a", "b", "USD", NULL, NULL},
        {"k", "a", "b", "USD", "x", NULL},
        {"k", "a", "b", "USD", rep('x', 1024), NULL},
        {"k", "a", "b", "USD", cat(euros, "x"), NULL}, /* 1024 bytes */
        {"k", "a", "b", "USD", rep('x', 1025), "description: must be at most 1024 bytes"},
        {"k", "a", "b", "USD", cat(euros, "\xc3\xa9"), "description: must be at most 1024 bytes"},
        {"k", "a", "b", "USD", rep('x', 100000), "description: must be at most 1024 bytes"},
        /* length is checked before encoding */
        {"k", "a", "b", "USD", cat(rep('x', 1025), "\xff"),
         "description: must be at most 1024 bytes"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_authorize(&cases[i], i);
}

typedef struct utf8_case {
    const char *s;
    long bad_at; /* -1 = valid */
} utf8_case_t;

static void test_authorize_description_utf8(void **state)
{
    const utf8_case_t cases[] = {
        {"plain ASCII, punctuation !\"#$%&'()*+,-./ and\ttab\nnewline\x7f", -1},
        {"h\xc3\xa9llo", -1},            /* é */
        {"\xc2\x80", -1},                /* U+0080, smallest 2-byte */
        {"\xdf\xbf", -1},                /* U+07FF */
        {"\xe0\xa0\x80", -1},            /* U+0800, smallest 3-byte */
        {"\xe2\x82\xac", -1},            /* € */
        {"\xed\x9f\xbf", -1},            /* U+D7FF, below surrogates */
        {"\xee\x80\x80", -1},            /* U+E000, above surrogates */
        {"\xef\xbf\xbf", -1},            /* U+FFFF */
        {"\xf0\x90\x80\x80", -1},        /* U+10000, smallest 4-byte */
        {"\xf0\x9d\x84\x9e", -1},        /* 𝄞 */
        {"\xf4\x8f\xbf\xbf", -1},        /* U+10FFFF, the last code point */
        {"\xc0\x80", 0},                 /* overlong NUL */
        {"\xc0\xaf", 0},                 /* overlong '/' */
        {"\xc1\xbf", 0},                 /* overlong U+007F */
        {"\xe0\x80\x80", 0},             /* overlong 3-byte */
        {"\xe0\x9f\xbf", 0},             /* overlong U+07FF */
        {"\xf0\x80\x80\x80", 0},         /* overlong 4-byte */
        {"\xf0\x8f\xbf\xbf", 0},         /* overlong U+FFFF */
        {"\xed\xa0\x80", 0},             /* U+D800, first high surrogate */
        {"\xed\xbf\xbf", 0},             /* U+DFFF, last low surrogate */
        {"\xed\xa0\xbd\xed\xb2\xa9", 0}, /* CESU-8 surrogate pair */
        {"\xf4\x90\x80\x80", 0},         /* U+110000 */
        {"\xf5\x80\x80\x80", 0},         /* lead byte F5 */
        {"\xf8\x88\x80\x80\x80", 0},     /* 5-byte form */
        {"\xfe", 0},
        {"\xff", 0},
        {"\x80", 0}, /* lone continuation */
        {"\xbf", 0},
        {"ab\xc3", 2},         /* truncated 2-byte at the end */
        {"ab\xe2\x82", 2},     /* truncated 3-byte at the end */
        {"ab\xf0\x9d\x84", 2}, /* truncated 4-byte at the end */
        {"abc\xc3(", 3},       /* bad continuation */
        {"\xe2\x28\xa1", 0},
        {"\xe2\x82\x28", 0},     /* bad third byte */
        {"\xf0\x9d\x84\x28", 0}, /* bad fourth byte */
        {"ok \xc3\xa9 then \xed\xa0\x80", 11},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char want[PAYMENT_VALIDATE_MSG_MAX];
        snprintf(want, sizeof(want), UTF8_MSG "%ld)", cases[i].bad_at);
        auth_case_t c = {"k", "a", "b", "USD", cases[i].s, cases[i].bad_at < 0 ? NULL : want};
        check_authorize(&c, i);
    }
}

static void test_authorize_precedence(void **state)
{
    const auth_case_t cases[] = {
        {"", "", "", "usd", "\xff", KEY_MSG},
        {"k", "", "", "usd", "\xff", "payer_account_id:" ACCT_MSG},
        {"k", "a", "b b", "usd", "\xff", "payee_account_id:" ACCT_MSG " (got \"b b\")"},
        {"k", "a", "b", "usd", "\xff", CUR_MSG " (got \"usd\")"},
        {"k", "a", "b", "USD", "\xff", UTF8_MSG "0)"},
        {"k\x01", "a!", "b", "USD", "", KEY_MSG},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_authorize(&cases[i], i);
}

/* amount and payer == payee are business declines of the ledger, not validation errors */
static void test_authorize_business_rules_not_checked(void **state)
{
    const int64_t amounts[] = {0, -1, INT64_MIN, INT64_MAX};
    for (size_t i = 0; i < sizeof(amounts) / sizeof(amounts[0]); i++) {
        Payment__V1__AuthorizePaymentRequest r = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
        r.idempotency_key = "k";
        r.payer_account_id = "same";
        r.payee_account_id = "same";
        r.amount_cents = amounts[i];
        r.currency = "USD";
        char msg[PAYMENT_VALIDATE_MSG_MAX] = "";
        assert_int_equal(payment_validate_authorize(&r, msg, sizeof(msg)), 0);
        assert_string_equal(msg, "");
    }
}

static void test_message_buffer(void **state)
{
    Payment__V1__AuthorizePaymentRequest r = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    r.idempotency_key = "";
    char small[16];
    assert_int_equal(payment_validate_authorize(&r, small, sizeof(small)), -EINVAL);
    assert_string_equal(small, "idempotency_key"); /* truncated, terminated */
    assert_int_equal(payment_validate_authorize(&r, NULL, 0), -EINVAL);
    char one[1] = {'x'};
    assert_int_equal(payment_validate_authorize(&r, one, sizeof(one)), -EINVAL);
    assert_int_equal(one[0], '\0');
}

static void check_get_payment(const char *id, const char *want)
{
    Payment__V1__GetPaymentRequest r = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
    r.payment_id = (char *)id;
    char msg[PAYMENT_VALIDATE_MSG_MAX] = "";
    int rc = payment_validate_get_payment(&r, msg, sizeof(msg));
    if (!want) {
        if (rc != 0)
            fail_msg("payment_id \"%s\": expected valid, got %d \"%s\"", id, rc, msg);
    } else {
        if (rc != -EINVAL || strcmp(msg, want) != 0)
            fail_msg("payment_id \"%s\": expected \"%s\", got %d \"%s\"", id ? id : "(null)", want,
                     rc, msg);
    }
}

static void test_get_payment(void **state)
{
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FAV", NULL);
    check_get_payment("0123456789ABCDEFGHJKMNPQRS", NULL);
    check_get_payment("TVWXYZ00000000000000000000", NULL);
    check_get_payment("00000000000000000000000000", NULL);
    check_get_payment("ZZZZZZZZZZZZZZZZZZZZZZZZZZ", NULL);
    check_get_payment("", ULID_MSG);
    check_get_payment(NULL, ULID_MSG);
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FA", ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FA\")");
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FAVX",
                      ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FAVX\")");
    check_get_payment("01arz3ndektsv4rrffq69g5fav",
                      ULID_MSG " (got \"01arz3ndektsv4rrffq69g5fav\")");
    /* the four letters Crockford excludes, and non-alphanumerics */
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FAI",
                      ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FAI\")");
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FAL",
                      ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FAL\")");
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FAO",
                      ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FAO\")");
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FAU",
                      ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FAU\")");
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FA-",
                      ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FA-\")");
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FA ",
                      ULID_MSG " (got \"01ARZ3NDEKTSV4RRFFQ69G5FA \")");
    check_get_payment("01ARZ3NDEKTSV4RRFFQ69G5FA\xc3\x89", ULID_MSG);
    check_get_payment(rep('0', 41), ULID_MSG);
}

static void check_get_balance(const char *id, const char *want)
{
    Payment__V1__GetAccountBalanceRequest r = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    r.account_id = (char *)id;
    char msg[PAYMENT_VALIDATE_MSG_MAX] = "";
    int rc = payment_validate_get_balance(&r, msg, sizeof(msg));
    if (!want) {
        if (rc != 0)
            fail_msg("account_id \"%s\": expected valid, got %d \"%s\"", id, rc, msg);
    } else {
        if (rc != -EINVAL || strcmp(msg, want) != 0)
            fail_msg("account_id \"%s\": expected \"%s\", got %d \"%s\"", id ? id : "(null)", want,
                     rc, msg);
    }
}

static void test_get_balance(void **state)
{
    check_get_balance("a", NULL);
    check_get_balance("acct-1", NULL);
    check_get_balance("AZaz09_.:-", NULL);
    check_get_balance(rep('x', 64), NULL);
    check_get_balance("", "account_id:" ACCT_MSG);
    check_get_balance(NULL, "account_id:" ACCT_MSG);
    check_get_balance(rep('x', 65), "account_id:" ACCT_MSG);
    check_get_balance("a b", "account_id:" ACCT_MSG " (got \"a b\")");
    check_get_balance("a#1", "account_id:" ACCT_MSG " (got \"a#1\")");
    check_get_balance("\xc3\xa9", "account_id:" ACCT_MSG);
}

/* ---- wire variants ---- */

typedef struct wire {
    uint8_t b[4096];
    size_t n;
} wire_t;

static void put_varint(wire_t *w, uint64_t v)
{
    do {
        assert_true(w->n < sizeof(w->b));
        w->b[w->n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
}

static void put_bytes(wire_t *w, unsigned field, const char *s, size_t len)
{
    put_varint(w, (uint64_t)field << 3 | 2);
    put_varint(w, len);
    assert_true(w->n + len <= sizeof(w->b));
    memcpy(w->b + w->n, s, len);
    w->n += len;
}

#define PUT(w, field, lit) put_bytes((w), (field), (lit), sizeof(lit) - 1)

static void auth_wire(wire_t *w, const char *key, size_t klen, const char *cur, size_t clen,
                      const char *desc, size_t dlen)
{
    w->n = 0;
    put_bytes(w, 1, key, klen);
    PUT(w, 2, "payer-1");
    PUT(w, 3, "payee-1");
    put_varint(w, 4 << 3 | 0);
    put_varint(w, 1500);
    put_bytes(w, 5, cur, clen);
    put_bytes(w, 6, desc, dlen);
}

static int run_auth_wire(const wire_t *w, char *msg, size_t msglen, int *plain_rc)
{
    Payment__V1__AuthorizePaymentRequest *r =
        payment__v1__authorize_payment_request__unpack(NULL, w->n, w->b);
    assert_non_null(r);
    char plain[PAYMENT_VALIDATE_MSG_MAX];
    *plain_rc = payment_validate_authorize(r, plain, sizeof(plain));
    int rc = payment_validate_authorize_wire(w->b, w->n, r, msg, msglen);
    payment__v1__authorize_payment_request__free_unpacked(r, NULL);
    return rc;
}

static void test_wire_authorize_nul(void **state)
{
    wire_t w;
    char msg[PAYMENT_VALIDATE_MSG_MAX] = "";
    int plain;

    auth_wire(&w, "key-1", 5, "USD", 3, "rent", 4);
    Payment__V1__AuthorizePaymentRequest *r =
        payment__v1__authorize_payment_request__unpack(NULL, w.n, w.b);
    assert_non_null(r);
    assert_int_equal(r->amount_cents, 1500);
    assert_string_equal(r->description, "rent");
    payment__v1__authorize_payment_request__free_unpacked(r, NULL);
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), 0);
    assert_int_equal(plain, 0);

    /* "key\0x": protobuf-c shows "key", which alone is valid: only the wire variant sees it */
    auth_wire(&w, "key\0x", 5, "USD", 3, "rent", 4);
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), -EINVAL);
    assert_string_equal(msg, KEY_MSG);
    assert_int_equal(plain, 0);

    auth_wire(&w, "key", 3, "US\0", 3, "rent", 4);
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), -EINVAL);
    assert_string_equal(msg, CUR_MSG); /* not echoed: the value holds a NUL */
    assert_int_equal(plain, -EINVAL);

    auth_wire(&w, "key", 3, "USD", 3, "rent\0more", 9);
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), -EINVAL);
    assert_string_equal(msg, "description: must not contain NUL characters");
    assert_int_equal(plain, 0);

    auth_wire(&w, "key", 3, "USD", 3, "\0", 1);
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), -EINVAL);
    assert_string_equal(msg, "description: must not contain NUL characters");

    /* field order still rules: a bad currency comes before a NUL in the description */
    auth_wire(&w, "key", 3, "usd", 3, "a\0b", 3);
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), -EINVAL);
    assert_string_equal(msg, CUR_MSG " (got \"usd\")");

    /* NUL in an account id */
    w.n = 0;
    PUT(&w, 1, "k");
    PUT(&w, 2, "payer\0evil");
    PUT(&w, 3, "payee");
    PUT(&w, 5, "USD");
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), -EINVAL);
    assert_string_equal(msg, "payer_account_id:" ACCT_MSG);
    assert_int_equal(plain, 0);

    w.n = 0;
    PUT(&w, 1, "k");
    PUT(&w, 2, "payer");
    PUT(&w, 3, "\0payee");
    PUT(&w, 5, "USD");
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), -EINVAL);
    assert_string_equal(msg, "payee_account_id:" ACCT_MSG);

    /* a repeated field: the last occurrence wins, as in protobuf-c */
    w.n = 0;
    PUT(&w, 1, "bad\0key");
    PUT(&w, 1, "good-key");
    PUT(&w, 2, "payer");
    PUT(&w, 3, "payee");
    PUT(&w, 5, "USD");
    PUT(&w, 6, "x\0");
    PUT(&w, 6, "fine");
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), 0);

    /* unknown fields of every wire type are skipped */
    w.n = 0;
    PUT(&w, 1, "k");
    PUT(&w, 2, "payer");
    PUT(&w, 3, "payee");
    PUT(&w, 5, "USD");
    put_varint(&w, 99 << 3 | 0);
    put_varint(&w, 123456789);
    put_varint(&w, 100 << 3 | 1);
    memcpy(w.b + w.n, "12345678", 8);
    w.n += 8;
    put_varint(&w, 101 << 3 | 5);
    memcpy(w.b + w.n, "1234", 4);
    w.n += 4;
    PUT(&w, 102, "a\0b");
    assert_int_equal(run_auth_wire(&w, msg, sizeof(msg), &plain), 0);
}

static void test_wire_malformed(void **state)
{
    Payment__V1__AuthorizePaymentRequest r = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    r.idempotency_key = "k";
    r.payer_account_id = "a";
    r.payee_account_id = "b";
    r.currency = "USD";
    char msg[PAYMENT_VALIDATE_MSG_MAX];
    const struct {
        const char *b;
        size_t n;
    } bad[] = {
        {"\x0a\x05"
         "ab",
         4},                 /* length beyond the end */
        {"\x0a", 1},         /* missing length */
        {"\x80", 1},         /* unterminated key varint */
        {"\x00\x01", 2},     /* field number 0 */
        {"\x0b\x0c", 2},     /* group start */
        {"\x0e\x00", 2},     /* wire type 6 */
        {"\x21\x01\x02", 3}, /* fixed64 cut short */
        {"\x20\xff\xff", 3}, /* varint cut short */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        strcpy(msg, "unchanged");
        if (payment_validate_authorize_wire((const uint8_t *)bad[i].b, bad[i].n, &r, msg,
                                            sizeof(msg)) != -EINVAL)
            fail_msg("malformed case %zu accepted", i);
        assert_string_equal(msg, "request: malformed protobuf");
    }
    /* empty wire with empty fields: the key is missing */
    Payment__V1__AuthorizePaymentRequest e = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    assert_int_equal(payment_validate_authorize_wire(NULL, 0, &e, msg, sizeof(msg)), -EINVAL);
    assert_string_equal(msg, KEY_MSG);
}

static void test_wire_get_payment_and_balance(void **state)
{
    wire_t w;
    char msg[PAYMENT_VALIDATE_MSG_MAX];

    w.n = 0;
    PUT(&w, 1, "01ARZ3NDEKTSV4RRFFQ69G5FAV");
    Payment__V1__GetPaymentRequest *p = payment__v1__get_payment_request__unpack(NULL, w.n, w.b);
    assert_non_null(p);
    assert_int_equal(payment_validate_get_payment_wire(w.b, w.n, p, msg, sizeof(msg)), 0);
    payment__v1__get_payment_request__free_unpacked(p, NULL);

    w.n = 0;
    PUT(&w, 1, "01ARZ3NDEKTSV4RRFFQ69G5FAV\0X");
    p = payment__v1__get_payment_request__unpack(NULL, w.n, w.b);
    assert_non_null(p);
    assert_int_equal(payment_validate_get_payment(p, msg, sizeof(msg)), 0);
    assert_int_equal(payment_validate_get_payment_wire(w.b, w.n, p, msg, sizeof(msg)), -EINVAL);
    assert_string_equal(msg, ULID_MSG);
    payment__v1__get_payment_request__free_unpacked(p, NULL);

    w.n = 0;
    PUT(&w, 1, "acct-1");
    Payment__V1__GetAccountBalanceRequest *b =
        payment__v1__get_account_balance_request__unpack(NULL, w.n, w.b);
    assert_non_null(b);
    assert_int_equal(payment_validate_get_balance_wire(w.b, w.n, b, msg, sizeof(msg)), 0);
    payment__v1__get_account_balance_request__free_unpacked(b, NULL);

    w.n = 0;
    PUT(&w, 1, "acct-1\0");
    b = payment__v1__get_account_balance_request__unpack(NULL, w.n, w.b);
    assert_non_null(b);
    assert_int_equal(payment_validate_get_balance(b, msg, sizeof(msg)), 0);
    assert_int_equal(payment_validate_get_balance_wire(w.b, w.n, b, msg, sizeof(msg)), -EINVAL);
    assert_string_equal(msg, "account_id:" ACCT_MSG);
    payment__v1__get_account_balance_request__free_unpacked(b, NULL);

    /* an empty request */
    b = payment__v1__get_account_balance_request__unpack(NULL, 0, (const uint8_t *)"");
    assert_non_null(b);
    assert_int_equal(payment_validate_get_balance_wire((const uint8_t *)"", 0, b, msg, sizeof(msg)),
                     -EINVAL);
    assert_string_equal(msg, "account_id:" ACCT_MSG);
    payment__v1__get_account_balance_request__free_unpacked(b, NULL);

    Payment__V1__GetPaymentRequest valid = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
    valid.payment_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    assert_int_equal(
        payment_validate_get_payment_wire((const uint8_t *)"\x0a\x09", 2, &valid, msg, sizeof(msg)),
        -EINVAL);
    assert_string_equal(msg, "request: malformed protobuf");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_authorize_idempotency_key),
        cmocka_unit_test(test_authorize_account_ids),
        cmocka_unit_test(test_authorize_account_id_echo_length),
        cmocka_unit_test(test_authorize_currency),
        cmocka_unit_test(test_authorize_description_length),
        cmocka_unit_test(test_authorize_description_utf8),
        cmocka_unit_test(test_authorize_precedence),
        cmocka_unit_test(test_authorize_business_rules_not_checked),
        cmocka_unit_test(test_message_buffer),
        cmocka_unit_test(test_get_payment),
        cmocka_unit_test(test_get_balance),
        cmocka_unit_test(test_wire_authorize_nul),
        cmocka_unit_test(test_wire_malformed),
        cmocka_unit_test(test_wire_get_payment_and_balance),
    };
    return cmocka_run_group_tests(tests, NULL, free_kept);
}
