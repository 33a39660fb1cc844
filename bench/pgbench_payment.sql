-- pgbench_payment.sql: ONE payment per transaction, the SQL a correct-first ledger runs for
-- an AuthorizePayment (the write protocol in db/migrations/001_ledger.sql's header), as
-- the pgbench baseline of bench/run.sh. Client-side statements, one round trip each, as a
-- classic service (the replaced Python one) issues them.
--
-- Variables (pgbench -D NAME=VALUE):
--   prefix     account id prefix: accounts are :prefix0 .. :prefix{naccounts-1}
--   naccounts  number of accounts (>= 2)
--   hot        1: always :prefix0 pays :prefix1 (one hot pair); 0: a random distinct pair
--   amount     cents per payment
-- The accounts must exist, be USD, and be funded (bench/setup_accounts.sql).
-- Ids: payment and event ids are 26 random upper-case hex digits (valid Crockford base32,
-- so they pass the ULID CHECK), the idempotency key is "pgbench-<payment id>".
--
-- pgbench -n -f bench/pgbench_payment.sql -c 32 -j 2 -T 10 \
--         -D prefix=acct- -D naccounts=10000 -D hot=0 -D amount=1 "$DATABASE_URL"
\set a random(0, :naccounts - 1)
\set b random(0, :naccounts - 2)
\set payer_n CASE WHEN :hot = 1 THEN 0 ELSE :a END
\set payee_n CASE WHEN :hot = 1 THEN 1 WHEN :b >= :a THEN :b + 1 ELSE :b END
BEGIN;
SELECT upper(substr(md5(random()::text || clock_timestamp()::text), 1, 26)) AS pid,
       upper(substr(md5(random()::text || clock_timestamp()::text || 'event'), 1, 26)) AS eid
\gset
-- 1. the idempotency key: lock it, look for a stored outcome (none: keys are fresh).
SELECT pg_advisory_xact_lock(hashtextextended('global' || chr(31) || 'pgbench-:pid', 0));
SELECT status FROM idempotency_keys WHERE scope = 'global' AND key = 'pgbench-:pid';
-- 2. lock payer and payee in id order and read their balances.
WITH l AS (SELECT id, balance_cents FROM accounts
           WHERE id IN (':prefix:payer_n', ':prefix:payee_n')
           ORDER BY id FOR NO KEY UPDATE)
SELECT (SELECT balance_cents FROM l WHERE id = ':prefix:payer_n') AS payer_bal,
       (SELECT balance_cents FROM l WHERE id = ':prefix:payee_n') AS payee_bal
\gset
-- 3. decide (funds; the accounts exist and are USD) and record.
\if :payer_bal >= :amount
INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status,
                      description, idempotency_scope, idempotency_key, idempotency_expires_at,
                      created_at, updated_at)
VALUES (':pid', ':prefix:payer_n', ':prefix:payee_n', :amount, 'USD', 'AUTHORIZED',
        'pgbench', 'global', 'pgbench-:pid', now() + interval '24 hours', now(), now());
INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency,
                            balance_after_cents, created_at)
VALUES (':pid', ':prefix:payer_n', 'DEBIT', :amount, 'USD', :payer_bal - :amount, now()),
       (':pid', ':prefix:payee_n', 'CREDIT', :amount, 'USD', :payee_bal + :amount, now());
UPDATE accounts SET balance_cents = CASE WHEN id = ':prefix:payer_n'
                                         THEN :payer_bal::bigint - :amount
                                         ELSE :payee_bal::bigint + :amount END,
                    updated_at = now()
WHERE id IN (':prefix:payer_n', ':prefix:payee_n');
INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, status, processed_at,
                              expires_at)
VALUES ('global', 'pgbench-:pid',
        sha256(convert_to(':prefix:payer_n' || chr(31) || ':prefix:payee_n' || chr(31)
                          || :amount || chr(31) || 'USD', 'UTF8')),
        ':pid', 'AUTHORIZED', now(), now() + interval '24 hours');
INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at,
                    next_attempt_at)
VALUES (':eid', 'Payment', ':pid', 'PaymentAuthorized',
        jsonb_build_object('payment_id', ':pid', 'payer_account_id', ':prefix:payer_n',
                           'payee_account_id', ':prefix:payee_n',
                           'amount_cents', :amount, 'currency', 'USD'),
        now(), now());
\else
INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status,
                      error_code, error_message, description, idempotency_scope,
                      idempotency_key, idempotency_expires_at, created_at, updated_at)
VALUES (':pid', ':prefix:payer_n', ':prefix:payee_n', :amount, 'USD', 'DECLINED',
        'INSUFFICIENT_FUNDS', 'insufficient funds', 'pgbench', 'global', 'pgbench-:pid',
        now() + interval '24 hours', now(), now());
INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, status, error_code,
                              error_message, processed_at, expires_at)
VALUES ('global', 'pgbench-:pid',
        sha256(convert_to(':prefix:payer_n' || chr(31) || ':prefix:payee_n' || chr(31)
                          || :amount || chr(31) || 'USD', 'UTF8')),
        ':pid', 'DECLINED', 'INSUFFICIENT_FUNDS', 'insufficient funds', now(),
        now() + interval '24 hours');
INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at,
                    next_attempt_at)
VALUES (':eid', 'Payment', ':pid', 'PaymentDeclined',
        jsonb_build_object('payment_id', ':pid', 'payer_account_id', ':prefix:payer_n',
                           'payee_account_id', ':prefix:payee_n',
                           'amount_cents', :amount, 'currency', 'USD',
                           'error_code', 'INSUFFICIENT_FUNDS',
                           'error_message', 'insufficient funds'),
        now(), now());
\endif
SELECT pg_notify('outbox_pending', '');
COMMIT;
