-- setup_accounts.sql: opens accounts :prefix0 .. :prefix{n-1} (USD) and funds each with
-- :fund cents from sys:funding:USD, in ONE transaction, for bench/run.sh. It writes what
-- `paymentctl account fund` writes, once per account (an AUTHORIZED payment from the
-- funding account, a DEBIT and a CREDIT entry with balance_after_cents, both balances, a
-- PaymentAuthorized outbox row), so `paymentctl ledger check` holds afterwards; it exists
-- because 10,000 paymentctl runs take minutes. Accounts that already exist are funded too.
-- Payment and event ids are 26 random upper-case hex digits (valid Crockford base32).
--
-- psql -v ON_ERROR_STOP=1 -v prefix=acct- -v n=10000 -v fund=1000000000 \
--      -f bench/setup_accounts.sql "$DATABASE_URL"
BEGIN;
INSERT INTO accounts (id, currency, owner, kind)
VALUES ('sys:funding:USD', 'USD', 'system', 'system') ON CONFLICT (id) DO NOTHING;
INSERT INTO accounts (id, currency, owner)
SELECT :'prefix' || g, 'USD', 'payment-bench' FROM generate_series(0, :n - 1) g
ON CONFLICT (id) DO NOTHING;
-- The global lock order: accounts sorted by id.
CREATE TEMP TABLE bench_locked ON COMMIT DROP AS
SELECT id, balance_cents, kind FROM accounts
WHERE id = 'sys:funding:USD' OR id IN (SELECT :'prefix' || g FROM generate_series(0, :n - 1) g)
ORDER BY id FOR NO KEY UPDATE;
CREATE TEMP TABLE bench_fund ON COMMIT DROP AS
SELECT row_number() OVER (ORDER BY id) AS k, id, balance_cents,
       upper(substr(md5(random()::text || id || 'p'), 1, 26)) AS pid,
       upper(substr(md5(random()::text || id || 'e'), 1, 26)) AS eid
FROM bench_locked WHERE kind = 'customer';
INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status,
                      description, created_at, updated_at)
SELECT pid, 'sys:funding:USD', id, :fund, 'USD', 'AUTHORIZED',
       'funding (bench/setup_accounts.sql)', now(), now()
FROM bench_fund;
-- Entries in funding order, so the funding account's latest entry carries its final balance.
INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency,
                            balance_after_cents, created_at)
SELECT f.pid, CASE WHEN e.t = 'DEBIT' THEN 'sys:funding:USD' ELSE f.id END, e.t, :fund, 'USD',
       CASE WHEN e.t = 'DEBIT'
            THEN (SELECT balance_cents FROM bench_locked WHERE id = 'sys:funding:USD')
                 - f.k * :fund::bigint
            ELSE f.balance_cents + :fund END,
       now()
FROM bench_fund f CROSS JOIN (VALUES (1, 'DEBIT'), (2, 'CREDIT')) AS e (o, t)
ORDER BY f.k, e.o;
UPDATE accounts a SET balance_cents = a.balance_cents + :fund, updated_at = now()
FROM bench_fund f WHERE a.id = f.id;
UPDATE accounts SET balance_cents = balance_cents - :fund::bigint * (SELECT count(*) FROM bench_fund),
                    updated_at = now()
WHERE id = 'sys:funding:USD';
INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at,
                    next_attempt_at)
SELECT eid, 'Payment', pid, 'PaymentAuthorized',
       jsonb_build_object('payment_id', pid, 'payer_account_id', 'sys:funding:USD',
                          'payee_account_id', id, 'amount_cents', :fund::bigint,
                          'currency', 'USD'),
       now(), now()
FROM bench_fund;
SELECT pg_notify('outbox_pending', '');
COMMIT;
