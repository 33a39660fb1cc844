-- 003_ledger_authorize_batch: many AuthorizePayment requests in ONE transaction (one
-- statement in autocommit: one round trip, one commit flush for the whole batch), each
-- getting exactly the outcome ledger_authorize() (002) would give it alone, applied in
-- arrival order (array order).
--
-- ledger_authorize_batch(...) takes one array element per request (all arrays the same
-- length n >= 1; p_fingerprint_hex is the SHA-256 fingerprint as 64 hex digits, p_now the
-- time of each request) and returns n rows, ord 1..n in input order, with the columns of
-- ledger_authorize().
--
-- The write protocol of 001_ledger.sql, for the whole batch:
--   1. lock every distinct idempotency key of the batch (pg_advisory_xact_lock on the
--      same hash as 002), in ascending order of the lock value itself, so two batches
--      (or a batch and a single payment) can never wait on each other in a cycle even when
--      two keys share a hash; then read the stored keys (an expired one counts as absent
--      and is deleted, as in 002);
--   2. lock every account the batch needs, sorted by id (FOR NO KEY UPDATE), ONCE;
--   3. decide in arrival order with the balances held in PL/pgSQL arrays, so a hot
--      account is read once and written once per batch. A key repeated inside the batch:
--      the first request executes, the later ones replay it (DUPLICATE, or CONFLICT for
--      another fingerprint), exactly what they would get arriving one after another;
--   4. multi-row INSERT ... SELECT FROM unnest(...) for payments, ledger entries (in
--      arrival order, DEBIT then CREDIT, so entry ids follow the order applied),
--      idempotency keys and outbox rows; one UPDATE of the touched balances; one NOTIFY.
-- Every expected outcome raises no error; an SQL error aborts the whole batch (nothing is
-- half-applied) and the ledger actor retries it split (src/actors/ledger.c).
CREATE FUNCTION ledger_authorize_batch(
    p_scope text[], p_key text[], p_fingerprint_hex text[], p_payment_id text[],
    p_event_id text[], p_payer text[], p_payee text[], p_amount bigint[], p_currency text[],
    p_description text[], p_now timestamptz[], p_ttl interval, p_max_amount bigint)
RETURNS TABLE (ord integer, outcome text, payment_id text, status text, error_code text,
               error_message text, processed_at text)
LANGUAGE plpgsql VOLATILE
AS $fn$
DECLARE
    n          integer := coalesce(array_length(p_key, 1), 0);
    lock_id    bigint;
    r          record;
    a          accounts%ROWTYPE;
    -- per request
    kid        text[];        -- scope || chr(31) || key
    fp         bytea[];
    st_found   boolean[];     -- a stored (unexpired) key exists
    st_fp      bytea[];
    st_pid     text[];
    st_status  text[];
    st_code    text[];
    st_msg     text[];
    st_at      timestamptz[];
    res_out    text[];
    res_pid    text[];
    res_status text[];
    res_code   text[];
    res_msg    text[];
    res_at     timestamptz[];
    deb_after  bigint[];
    cred_after bigint[];
    new_idx    integer[] := '{}';
    auth_idx   integer[] := '{}';
    -- accounts locked by this batch
    want       text[] := '{}';
    acc_id     text[] := '{}';
    acc_ok     boolean[] := '{}';
    acc_cur    text[] := '{}';
    acc_bal    bigint[] := '{}';
    acc_upd    timestamptz[] := '{}';
    acc_dirty  boolean[] := '{}';
    i          integer;
    j          integer;
    pi         integer;
    ei         integer;
    v_code     text;
    v_msg      text;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    IF array_length(p_scope, 1) IS DISTINCT FROM n OR array_length(p_fingerprint_hex, 1) IS DISTINCT FROM n
       OR array_length(p_payment_id, 1) IS DISTINCT FROM n OR array_length(p_event_id, 1) IS DISTINCT FROM n
       OR array_length(p_payer, 1) IS DISTINCT FROM n OR array_length(p_payee, 1) IS DISTINCT FROM n
       OR array_length(p_amount, 1) IS DISTINCT FROM n OR array_length(p_currency, 1) IS DISTINCT FROM n
       OR array_length(p_description, 1) IS DISTINCT FROM n OR array_length(p_now, 1) IS DISTINCT FROM n THEN
        RAISE EXCEPTION 'ledger_authorize_batch: arrays of different lengths (% keys)', n;
    END IF;
    FOR i IN 1 .. n LOOP
        kid[i] := p_scope[i] || chr(31) || p_key[i];
        fp[i] := decode(p_fingerprint_hex[i], 'hex');
        st_found[i] := false;
    END LOOP;

    -- 1. idempotency keys: lock (ascending lock value), drop expired, read stored.
    FOR lock_id IN SELECT DISTINCT hashtextextended(x, 0) AS h FROM unnest(kid) AS t(x)
                   ORDER BY h LOOP
        PERFORM pg_advisory_xact_lock(lock_id);
    END LOOP;
    DELETE FROM idempotency_keys ik
    WHERE (ik.scope, ik.key) IN (SELECT s, k FROM unnest(p_scope, p_key) AS t(s, k))
      AND ik.expires_at <= now();
    FOR r IN SELECT ik.* FROM idempotency_keys ik
             WHERE (ik.scope, ik.key) IN (SELECT s, k FROM unnest(p_scope, p_key) AS t(s, k)) LOOP
        FOR i IN 1 .. n LOOP
            IF p_scope[i] = r.scope AND p_key[i] = r.key THEN
                st_found[i] := true;
                st_fp[i] := r.fingerprint;
                st_pid[i] := r.payment_id::text;
                st_status[i] := r.status;
                st_code[i] := r.error_code;
                st_msg[i] := r.error_message;
                st_at[i] := r.processed_at;
            END IF;
        END LOOP;
    END LOOP;

    -- 2. the accounts of every request that will execute and names two accounts.
    FOR i IN 1 .. n LOOP
        IF NOT st_found[i] AND array_position(kid, kid[i]) = i
           AND p_amount[i] > 0 AND p_amount[i] <= p_max_amount AND p_payer[i] <> p_payee[i] THEN
            want := want || p_payer[i] || p_payee[i];
        END IF;
    END LOOP;
    IF array_length(want, 1) > 0 THEN
        FOR a IN SELECT * FROM accounts x WHERE x.id = ANY (want)
                 ORDER BY x.id FOR NO KEY UPDATE LOOP
            acc_id := acc_id || a.id;
            acc_ok := acc_ok || (a.status = 'active' AND a.kind = 'customer');
            acc_cur := acc_cur || a.currency::text;
            acc_bal := acc_bal || a.balance_cents;
            acc_upd := acc_upd || a.updated_at;
            acc_dirty := acc_dirty || false;
        END LOOP;
    END IF;

    -- 3. decide in arrival order.
    FOR i IN 1 .. n LOOP
        IF st_found[i] THEN
            res_out[i] := CASE WHEN st_fp[i] = fp[i] THEN 'DUPLICATE' ELSE 'CONFLICT' END;
            res_pid[i] := st_pid[i];
            res_status[i] := st_status[i];
            res_code[i] := st_code[i];
            res_msg[i] := st_msg[i];
            res_at[i] := st_at[i];
            CONTINUE;
        END IF;
        j := array_position(kid, kid[i]);
        IF j < i THEN -- the first request with this key executed (NEW): replay it
            res_out[i] := CASE WHEN fp[j] = fp[i] THEN 'DUPLICATE' ELSE 'CONFLICT' END;
            res_pid[i] := res_pid[j];
            res_status[i] := res_status[j];
            res_code[i] := res_code[j];
            res_msg[i] := res_msg[j];
            res_at[i] := res_at[j];
            CONTINUE;
        END IF;
        v_code := NULL;
        v_msg := NULL;
        pi := NULL;
        ei := NULL;
        IF p_amount[i] <= 0 OR p_amount[i] > p_max_amount THEN
            v_code := 'INVALID_AMOUNT';
            v_msg := format('amount_cents must be between 1 and %s, got %s', p_max_amount,
                            p_amount[i]);
        ELSIF p_payer[i] = p_payee[i] THEN
            v_code := 'SAME_ACCOUNT';
            v_msg := format('payer and payee are the same account %s', p_payer[i]);
        ELSE
            pi := array_position(acc_id, p_payer[i]);
            ei := array_position(acc_id, p_payee[i]);
            IF pi IS NULL OR NOT acc_ok[pi] THEN
                v_code := 'ACCOUNT_NOT_FOUND';
                v_msg := format('payer account %s not found', p_payer[i]);
            ELSIF ei IS NULL OR NOT acc_ok[ei] THEN
                v_code := 'ACCOUNT_NOT_FOUND';
                v_msg := format('payee account %s not found', p_payee[i]);
            ELSIF acc_cur[pi] <> p_currency[i] THEN
                v_code := 'CURRENCY_MISMATCH';
                v_msg := format('currency %s does not match payer account %s (%s)',
                                p_currency[i], p_payer[i], acc_cur[pi]);
            ELSIF acc_cur[ei] <> p_currency[i] THEN
                v_code := 'CURRENCY_MISMATCH';
                v_msg := format('currency %s does not match payee account %s (%s)',
                                p_currency[i], p_payee[i], acc_cur[ei]);
            ELSIF acc_bal[pi] < p_amount[i] THEN
                v_code := 'INSUFFICIENT_FUNDS';
                v_msg := format('insufficient funds in payer account %s', p_payer[i]);
            END IF;
        END IF;
        res_out[i] := 'NEW';
        res_pid[i] := p_payment_id[i];
        res_status[i] := CASE WHEN v_code IS NULL THEN 'AUTHORIZED' ELSE 'DECLINED' END;
        res_code[i] := v_code;
        res_msg[i] := v_msg;
        res_at[i] := p_now[i];
        new_idx := new_idx || i;
        IF v_code IS NULL THEN
            acc_bal[pi] := acc_bal[pi] - p_amount[i];
            acc_bal[ei] := acc_bal[ei] + p_amount[i];
            deb_after[i] := acc_bal[pi];
            cred_after[i] := acc_bal[ei];
            acc_upd[pi] := p_now[i];
            acc_upd[ei] := p_now[i];
            acc_dirty[pi] := true;
            acc_dirty[ei] := true;
            auth_idx := auth_idx || i;
        END IF;
    END LOOP;

    -- 4. record, multi-row.
    IF array_length(new_idx, 1) > 0 THEN
        INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency,
                              status, error_code, error_message, description,
                              idempotency_scope, idempotency_key, idempotency_expires_at,
                              created_at, updated_at)
        SELECT p_payment_id[x], p_payer[x], p_payee[x], p_amount[x], p_currency[x],
               res_status[x], res_code[x], res_msg[x], p_description[x], p_scope[x],
               p_key[x], p_now[x] + p_ttl, p_now[x], p_now[x]
        FROM unnest(new_idx) AS t(x) ORDER BY x;
    END IF;
    IF array_length(auth_idx, 1) > 0 THEN
        INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents,
                                    currency, balance_after_cents, created_at)
        SELECT p_payment_id[x],
               CASE WHEN e.side = 1 THEN p_payer[x] ELSE p_payee[x] END,
               CASE WHEN e.side = 1 THEN 'DEBIT' ELSE 'CREDIT' END, p_amount[x], p_currency[x],
               CASE WHEN e.side = 1 THEN deb_after[x] ELSE cred_after[x] END, p_now[x]
        FROM unnest(auth_idx) AS t(x) CROSS JOIN (VALUES (1), (2)) AS e(side)
        ORDER BY x, e.side;
        UPDATE accounts ac SET balance_cents = v.bal, updated_at = v.upd
        FROM unnest(acc_id, acc_bal, acc_upd, acc_dirty) AS v(id, bal, upd, dirty)
        WHERE ac.id = v.id AND v.dirty;
    END IF;
    IF array_length(new_idx, 1) > 0 THEN
        INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, status, error_code,
                                      error_message, processed_at, expires_at)
        SELECT p_scope[x], p_key[x], fp[x], p_payment_id[x], res_status[x], res_code[x],
               res_msg[x], p_now[x], p_now[x] + p_ttl
        FROM unnest(new_idx) AS t(x) ORDER BY x;
        INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at,
                            next_attempt_at)
        SELECT p_event_id[x], 'Payment', p_payment_id[x],
               CASE WHEN res_code[x] IS NULL THEN 'PaymentAuthorized' ELSE 'PaymentDeclined' END,
               jsonb_build_object('payment_id', p_payment_id[x], 'payer_account_id', p_payer[x],
                                  'payee_account_id', p_payee[x], 'amount_cents', p_amount[x],
                                  'currency', p_currency[x])
                   || CASE WHEN res_code[x] IS NULL THEN '{}'::jsonb
                           ELSE jsonb_build_object('error_code', res_code[x],
                                                   'error_message', res_msg[x]) END,
               p_now[x], p_now[x]
        FROM unnest(new_idx) AS t(x) ORDER BY x;
        PERFORM pg_notify('outbox_pending', '');
    END IF;

    RETURN QUERY SELECT x, res_out[x], res_pid[x], res_status[x], res_code[x], res_msg[x],
                        pay_format_ts(res_at[x])
                 FROM generate_series(1, n) AS t(x) ORDER BY x;
END
$fn$;
