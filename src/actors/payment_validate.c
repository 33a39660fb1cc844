/*
 * payment_validate: see payment_validate.h.
 *
 * DESIGN: every field is first reduced to (bytes, C length, has-hidden-NUL), the last
 * known only when the caller gave the wire bytes; then one checker per rule runs in
 * field-number order and the first failure writes the message. The UTF-8 check follows
 * RFC 3629 table 3-7 (Unicode §3.9): it rejects overlong forms, surrogates
 * (U+D800-U+DFFF) and anything above U+10FFFF.
 */
#include "actors/payment_validate.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* Longest value echoed back in a message; longer ones are not repeated. */
#define ECHO_MAX 40

typedef struct field {
    const char *s; /* never NULL */
    size_t len;    /* bytes before the first NUL */
    bool nul;      /* the wire value is longer: it contains a NUL */
} field_t;

static field_t field_of(const char *s, const size_t *wire_lens, unsigned number)
{
    field_t f = {.s = s ? s : "", .len = 0, .nul = false};
    f.len = strlen(f.s);
    if (wire_lens && wire_lens[number] != f.len)
        f.nul = true;
    return f;
}

static int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*pp == end)
            return -EINVAL;
        uint8_t b = *(*pp)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = x;
            return 0;
        }
    }
    return -EINVAL;
}

/* Walks a serialized message and records, for string fields 1..max_field, the length
 * of the last occurrence (protobuf's last-one-wins for singular fields); absent = 0. */
static int wire_string_lens(const uint8_t *p, size_t n, size_t *lens, unsigned max_field)
{
    for (unsigned i = 0; i <= max_field; i++)
        lens[i] = 0;
    if (!p)
        return n ? -EINVAL : 0;
    const uint8_t *end = p + n;
    while (p < end) {
        uint64_t key, v;
        if (read_varint(&p, end, &key) < 0 || key >> 3 == 0)
            return -EINVAL;
        switch (key & 7) {
        case 0:
            if (read_varint(&p, end, &v) < 0)
                return -EINVAL;
            break;
        case 1:
        case 5: {
            size_t skip = (key & 7) == 1 ? 8 : 4;
            if ((size_t)(end - p) < skip)
                return -EINVAL;
            p += skip;
            break;
        }
        case 2:
            if (read_varint(&p, end, &v) < 0 || v > (uint64_t)(end - p))
                return -EINVAL;
            if (key >> 3 <= max_field)
                lens[key >> 3] = (size_t)v;
            p += v;
            break;
        default: /* groups (3, 4) are not in our proto3 messages; 6, 7 do not exist */
            return -EINVAL;
        }
    }
    return 0;
}

static bool echo_safe(const field_t *f)
{
    if (f->nul || f->len == 0 || f->len > ECHO_MAX)
        return false;
    for (size_t i = 0; i < f->len; i++) {
        unsigned char c = (unsigned char)f->s[i];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
            return false;
    }
    return true;
}

/* Writes "<name>: <rule>" plus ` (got "value")` when the value is safe to repeat. */
static int fail(char *msg, size_t msglen, const char *name, const char *rule, const field_t *f)
{
    if (msg && msglen) {
        if (f && echo_safe(f))
            snprintf(msg, msglen, "%s: %s (got \"%.*s\")", name, rule, (int)f->len, f->s);
        else
            snprintf(msg, msglen, "%s: %s", name, rule);
    }
    return -EINVAL;
}

static bool is_account_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '.' || c == ':' || c == '-';
}

static bool account_id_ok(const field_t *f)
{
    if (f->nul || f->len < 1 || f->len > PAYMENT_ACCOUNT_ID_MAX)
        return false;
    for (size_t i = 0; i < f->len; i++)
        if (!is_account_char((unsigned char)f->s[i]))
            return false;
    return true;
}

static bool idempotency_key_ok(const field_t *f)
{
    if (f->nul || f->len < 1 || f->len > PAYMENT_IDEMPOTENCY_KEY_MAX)
        return false;
    for (size_t i = 0; i < f->len; i++) {
        unsigned char c = (unsigned char)f->s[i];
        if (c < 0x20 || c > 0x7e)
            return false;
    }
    return true;
}

static bool currency_ok(const field_t *f)
{
    if (f->nul || f->len != 3)
        return false;
    for (size_t i = 0; i < 3; i++)
        if (f->s[i] < 'A' || f->s[i] > 'Z')
            return false;
    return true;
}

/* Crockford base32 in upper case: digits and letters without I, L, O, U. */
static bool ulid_ok(const field_t *f)
{
    if (f->nul || f->len != PAYMENT_ULID_LEN)
        return false;
    for (size_t i = 0; i < f->len; i++) {
        char c = f->s[i];
        bool ok = (c >= '0' && c <= '9') ||
                  (c >= 'A' && c <= 'Z' && c != 'I' && c != 'L' && c != 'O' && c != 'U');
        if (!ok)
            return false;
    }
    return true;
}

/* Offset of the first byte of the first ill-formed UTF-8 sequence, or len if none. */
static size_t utf8_invalid_at(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned char lo = 0x80, hi = 0xbf; /* range of the second byte */
        if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0)
                lo = 0xa0; /* overlong below U+0800 */
            else if (c == 0xed)
                hi = 0x9f; /* surrogates U+D800-U+DFFF */
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0)
                lo = 0x90; /* overlong below U+10000 */
            else if (c == 0xf4)
                hi = 0x8f; /* above U+10FFFF */
        } else {
            return i; /* continuation byte, C0/C1 overlong lead, or F5-FF */
        }
        if (len - i - 1 < need)
            return i;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= need; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xbf)
                return i;
        i += need + 1;
    }
    return len;
}

static const char ACCOUNT_RULE[] = "must be 1-64 characters of [A-Za-z0-9_.:-]";

static int validate_authorize(const Payment__V1__AuthorizePaymentRequest *r,
                              const size_t *wire_lens, char *msg, size_t msglen)
{
    field_t key = field_of(r->idempotency_key, wire_lens, 1);
    if (!idempotency_key_ok(&key))
        return fail(msg, msglen, "idempotency_key", "must be 1-255 printable ASCII characters",
                    NULL);

    field_t payer = field_of(r->payer_account_id, wire_lens, 2);
    if (!account_id_ok(&payer))
        return fail(msg, msglen, "payer_account_id", ACCOUNT_RULE, &payer);

    field_t payee = field_of(r->payee_account_id, wire_lens, 3);
    if (!account_id_ok(&payee))
        return fail(msg, msglen, "payee_account_id", ACCOUNT_RULE, &payee);

    field_t cur = field_of(r->currency, wire_lens, 5);
    if (!currency_ok(&cur))
        return fail(msg, msglen, "currency", "must be a 3-letter ISO 4217 code in upper case",
                    &cur);

    field_t desc = field_of(r->description, wire_lens, 6);
    if (desc.nul)
        return fail(msg, msglen, "description", "must not contain NUL characters", NULL);
    if (desc.len > PAYMENT_DESCRIPTION_MAX)
        return fail(msg, msglen, "description", "must be at most 1024 bytes", NULL);
    size_t bad = utf8_invalid_at((const unsigned char *)desc.s, desc.len);
    if (bad != desc.len) {
        if (msg && msglen)
            snprintf(msg, msglen, "description: must be valid UTF-8 (invalid sequence at byte %zu)",
                     bad);
        return -EINVAL;
    }
    return 0;
}

static int validate_get_payment(const Payment__V1__GetPaymentRequest *r, const size_t *wire_lens,
                                char *msg, size_t msglen)
{
    field_t id = field_of(r->payment_id, wire_lens, 1);
    if (!ulid_ok(&id))
        return fail(msg, msglen, "payment_id",
                    "must be a 26-character ULID in upper-case Crockford base32", &id);
    return 0;
}

static int validate_get_balance(const Payment__V1__GetAccountBalanceRequest *r,
                                const size_t *wire_lens, char *msg, size_t msglen)
{
    field_t id = field_of(r->account_id, wire_lens, 1);
    if (!account_id_ok(&id))
        return fail(msg, msglen, "account_id", ACCOUNT_RULE, &id);
    return 0;
}

static int malformed(char *msg, size_t msglen)
{
    if (msg && msglen)
        snprintf(msg, msglen, "request: malformed protobuf");
    return -EINVAL;
}

int payment_validate_authorize(const Payment__V1__AuthorizePaymentRequest *r, char *msg,
                               size_t msglen)
{
    return validate_authorize(r, NULL, msg, msglen);
}

int payment_validate_get_payment(const Payment__V1__GetPaymentRequest *r, char *msg, size_t msglen)
{
    return validate_get_payment(r, NULL, msg, msglen);
}

int payment_validate_get_balance(const Payment__V1__GetAccountBalanceRequest *r, char *msg,
                                 size_t msglen)
{
    return validate_get_balance(r, NULL, msg, msglen);
}

int payment_validate_authorize_wire(const uint8_t *wire, size_t wire_len,
                                    const Payment__V1__AuthorizePaymentRequest *r, char *msg,
                                    size_t msglen)
{
    size_t lens[7];
    if (wire_string_lens(wire, wire_len, lens, 6) < 0)
        return malformed(msg, msglen);
    return validate_authorize(r, lens, msg, msglen);
}

int payment_validate_get_payment_wire(const uint8_t *wire, size_t wire_len,
                                      const Payment__V1__GetPaymentRequest *r, char *msg,
                                      size_t msglen)
{
    size_t lens[2];
    if (wire_string_lens(wire, wire_len, lens, 1) < 0)
        return malformed(msg, msglen);
    return validate_get_payment(r, lens, msg, msglen);
}

int payment_validate_get_balance_wire(const uint8_t *wire, size_t wire_len,
                                      const Payment__V1__GetAccountBalanceRequest *r, char *msg,
                                      size_t msglen)
{
    size_t lens[2];
    if (wire_string_lens(wire, wire_len, lens, 1) < 0)
        return malformed(msg, msglen);
    return validate_get_balance(r, lens, msg, msglen);
}
