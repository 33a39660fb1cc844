/*
 * payment_validate: the request validation rules of DESIGN.md §3 for the payment API.
 *
 * Pure functions over decoded protobuf-c requests: no I/O, no allocation, no shared
 * state, so any thread may call them (the gRPC CQ threads do, before posting a message).
 * Rules are checked in field-number order and only the first failure is reported, as
 * "<field>: <reason>", which the caller sends as gRPC INVALID_ARGUMENT. Messages are
 * stable (clients and tests match them); a bad value is echoed only when it is short
 * printable ASCII without quotes or backslashes.
 *
 * Business rules are not checked here: amount_cents (<= 0 or > MAX_AMOUNT_CENTS) and
 * payer == payee are declines decided by the ledger.
 *
 * Embedded NUL: protobuf-c gives `string` fields as NUL-terminated C strings with no
 * length, so "ab\0cd" on the wire decodes as "ab" and the plain functions cannot see
 * the NUL. The *_wire variants take the serialized request the message was unpacked
 * from as well, compare each string field's wire length with its C length, and reject
 * a field that contains a NUL in its place in the field order. The gRPC layer, which
 * has the raw bytes, should call those.
 */
#ifndef PAY_ACTORS_PAYMENT_VALIDATE_H
#define PAY_ACTORS_PAYMENT_VALIDATE_H

#include <stddef.h>
#include <stdint.h>

#include "payment/v1/payment.pb-c.h"

/* Limits of §3, exported for tests and for callers that size buffers. */
#define PAYMENT_IDEMPOTENCY_KEY_MAX 255
#define PAYMENT_ACCOUNT_ID_MAX      64
#define PAYMENT_DESCRIPTION_MAX     1024
#define PAYMENT_ULID_LEN            26

/** A message buffer of this size always holds the whole message. */
#define PAYMENT_VALIDATE_MSG_MAX 160

/** 0 if r is a valid AuthorizePaymentRequest, else -EINVAL and "<field>: <reason>" in msg. */
int payment_validate_authorize(const Payment__V1__AuthorizePaymentRequest *r, char *msg,
                               size_t msglen);

/** 0 if r->payment_id is a ULID (^[0-9A-HJKMNP-TV-Z]{26}$), else -EINVAL and msg. */
int payment_validate_get_payment(const Payment__V1__GetPaymentRequest *r, char *msg, size_t msglen);

/** 0 if r->account_id is 1-64 characters of [A-Za-z0-9_.:-], else -EINVAL and msg. */
int payment_validate_get_balance(const Payment__V1__GetAccountBalanceRequest *r, char *msg,
                                 size_t msglen);

/** As payment_validate_authorize, also rejecting embedded NULs; wire = the bytes r was
 *  unpacked from. -EINVAL with msg "request: malformed protobuf" if wire does not parse. */
int payment_validate_authorize_wire(const uint8_t *wire, size_t wire_len,
                                    const Payment__V1__AuthorizePaymentRequest *r, char *msg,
                                    size_t msglen);

/** As payment_validate_get_payment, also rejecting embedded NULs (see above). */
int payment_validate_get_payment_wire(const uint8_t *wire, size_t wire_len,
                                      const Payment__V1__GetPaymentRequest *r, char *msg,
                                      size_t msglen);

/** As payment_validate_get_balance, also rejecting embedded NULs (see above). */
int payment_validate_get_balance_wire(const uint8_t *wire, size_t wire_len,
                                      const Payment__V1__GetAccountBalanceRequest *r, char *msg,
                                      size_t msglen);

#endif
