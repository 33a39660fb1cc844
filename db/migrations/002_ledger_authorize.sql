-- 002_ledger_authorize: AuthorizePayment as one server-side function, so one payment is one
-- statement in autocommit (one transaction, one round trip) following the write protocol of
-- 001_ledger.sql, and the idempotency purge of the ledger's maintenance duty.
--
-- ledger_authorize(...) decides and records the outcome of one AuthorizePayment request
-- (DESIGN.md §3) and returns one row:
--   outcome       NEW (recorded now) | DUPLICATE (the key's stored outcome, replayed)
--                 | CONFLICT (the key is taken by a request with another fingerprint:
--                   nothing is written, the caller answers ALREADY_EXISTS)
--   payment_id, status (AUTHORIZED | DECLINED), error_code, error_message (NULL unless
--   declined), processed_at (pay_format_ts of the payment's created_at).
-- The caller (the ledger actor) makes the ids (ULIDs, monotonic per process) and the time,
-- so the reply, the rows and the event agree. Every expected outcome raises no error: an
-- SQL error is a bug or an infrastructure failure, never a business decline.
-- Declines, in order: amount <= 0 or > p_max_amount → INVALID_AMOUNT; payer = payee →
-- SAME_ACCOUNT; unknown (or closed, or system) payer, then payee → ACCOUNT_NOT_FOUND;
-- currency differs from the payer's, then the payee's → CURRENCY_MISMATCH; payer balance
-- below the amount → INSUFFICIENT_FUNDS.
-- A key whose expires_at has passed but which is not purged yet is treated as absent (its
-- row is replaced), so behaviour does not depend on when the purge last ran.
CREATE FUNCTION ledger_authorize(
    p_scope text, p_key text, p_fingerprint bytea, p_payment_id text, p_event_id text,
    p_payer text, p_payee text, p_amount bigint, p_currency text, p_description text,
    p_now timestamptz, p_ttl interval, p_max_amount bigint)
RETURNS TABLE (outcome text, payment_id text, status text, error_code text,
               error_message text, processed_at text)
LANGUAGE plpgsql VOLATILE
AS $fn$
DECLARE
    k          idempotency_keys%ROWTYPE;
    r          accounts%ROWTYPE;
    payer      accounts%ROWTYPE;
    payee      accounts%ROWTYPE;
    has_payer  boolean := false;
    has_payee  boolean := false;
    v_code     text;
    v_msg      text;
    v_status   text;
    v_payload  jsonb;
BEGIN
    -- 1. the idempotency key: lock it, replay a stored outcome.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || chr(31) || p_key, 0));
    SELECT * INTO k FROM idempotency_keys i WHERE i.scope = p_scope AND i.key = p_key;
    IF FOUND THEN
        IF k.expires_at > now() THEN
            RETURN QUERY SELECT CASE WHEN k.fingerprint = p_fingerprint THEN 'DUPLICATE'
                                     ELSE 'CONFLICT' END,
                                k.payment_id::text, k.status, k.error_code, k.error_message,
                                pay_format_ts(k.processed_at);
            RETURN;
        END IF;
        DELETE FROM idempotency_keys i WHERE i.scope = p_scope AND i.key = p_key;
    END IF;

    -- 2. decide, locking the accounts (sorted by id) when the request names two.
    IF p_amount <= 0 OR p_amount > p_max_amount THEN
        v_code := 'INVALID_AMOUNT';
        v_msg := format('amount_cents must be between 1 and %s, got %s', p_max_amount, p_amount);
    ELSIF p_payer = p_payee THEN
        v_code := 'SAME_ACCOUNT';
        v_msg := format('payer and payee are the same account %s', p_payer);
    ELSE
        FOR r IN SELECT * FROM accounts a WHERE a.id IN (p_payer, p_payee)
                 ORDER BY a.id FOR NO KEY UPDATE LOOP
            IF r.id = p_payer THEN
                payer := r;
                has_payer := r.status = 'active' AND r.kind = 'customer';
            ELSE
                payee := r;
                has_payee := r.status = 'active' AND r.kind = 'customer';
            END IF;
        END LOOP;
        IF NOT has_payer THEN
            v_code := 'ACCOUNT_NOT_FOUND';
            v_msg := format('payer account %s not found', p_payer);
        ELSIF NOT has_payee THEN
            v_code := 'ACCOUNT_NOT_FOUND';
            v_msg := format('payee account %s not found', p_payee);
        ELSIF payer.currency <> p_currency THEN
            v_code := 'CURRENCY_MISMATCH';
            v_msg := format('currency %s does not match payer account %s (%s)', p_currency,
                            p_payer, payer.currency);
        ELSIF payee.currency <> p_currency THEN
            v_code := 'CURRENCY_MISMATCH';
            v_msg := format('currency %s does not match payee account %s (%s)', p_currency,
                            p_payee, payee.currency);
        ELSIF payer.balance_cents < p_amount THEN
            v_code := 'INSUFFICIENT_FUNDS';
            v_msg := format('insufficient funds in payer account %s', p_payer);
        END IF;
    END IF;
    v_status := CASE WHEN v_code IS NULL THEN 'AUTHORIZED' ELSE 'DECLINED' END;

    -- 3. record: payment, entries and balances (authorized only), key, event.
    INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency,
                          status, error_code, error_message, description, idempotency_scope,
                          idempotency_key, idempotency_expires_at, created_at, updated_at)
    VALUES (p_payment_id, p_payer, p_payee, p_amount, p_currency, v_status, v_code, v_msg,
            p_description, p_scope, p_key, p_now + p_ttl, p_now, p_now);
    IF v_code IS NULL THEN
        INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency,
                                    balance_after_cents, created_at)
        VALUES (p_payment_id, p_payer, 'DEBIT', p_amount, p_currency,
                payer.balance_cents - p_amount, p_now),
               (p_payment_id, p_payee, 'CREDIT', p_amount, p_currency,
                payee.balance_cents + p_amount, p_now);
        UPDATE accounts a SET balance_cents = CASE WHEN a.id = p_payer
                                                   THEN payer.balance_cents - p_amount
                                                   ELSE payee.balance_cents + p_amount END,
                              updated_at = p_now
        WHERE a.id IN (p_payer, p_payee);
    END IF;
    INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, status, error_code,
                                  error_message, processed_at, expires_at)
    VALUES (p_scope, p_key, p_fingerprint, p_payment_id, v_status, v_code, v_msg, p_now,
            p_now + p_ttl);
    v_payload := jsonb_build_object('payment_id', p_payment_id, 'payer_account_id', p_payer,
                                    'payee_account_id', p_payee, 'amount_cents', p_amount,
                                    'currency', p_currency);
    IF v_code IS NOT NULL THEN
        v_payload := v_payload || jsonb_build_object('error_code', v_code,
                                                     'error_message', v_msg);
    END IF;
    INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at,
                        next_attempt_at)
    VALUES (p_event_id, 'Payment', p_payment_id,
            CASE WHEN v_code IS NULL THEN 'PaymentAuthorized' ELSE 'PaymentDeclined' END,
            v_payload, p_now, p_now);
    PERFORM pg_notify('outbox_pending', '');

    RETURN QUERY SELECT 'NEW'::text, p_payment_id, v_status, v_code, v_msg, pay_format_ts(p_now);
END
$fn$;

-- The maintenance duty: delete up to p_limit idempotency keys whose expires_at has passed
-- (oldest first; the index idempotency_keys_expires_at finds them). Returns how many.
-- Keys are locked by the writer that replays them only through the advisory lock, so a
-- purge never waits on a payment for long and never deletes a key a payment still needs:
-- an expired key is treated as absent by ledger_authorize anyway.
CREATE FUNCTION ledger_purge_idempotency(p_limit integer)
RETURNS bigint
LANGUAGE sql VOLATILE
BEGIN ATOMIC
    WITH gone AS (
        DELETE FROM idempotency_keys i
        WHERE (i.scope, i.key) IN (SELECT e.scope, e.key FROM idempotency_keys e
                                   WHERE e.expires_at <= now()
                                   ORDER BY e.expires_at LIMIT p_limit)
        RETURNING 1)
    SELECT count(*) FROM gone;
END;
