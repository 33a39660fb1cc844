-- 001_ledger: accounts and balances, payments, double-entry ledger, idempotency keys and
-- the transactional outbox (DESIGN.md §2-§4).
--
-- Applied by pg_migrate (src/io/pg.c) inside one transaction, under an advisory lock, and
-- recorded in schema_migrations. Migrations must not contain BEGIN/COMMIT, nor statements
-- that cannot run in a transaction (CREATE INDEX CONCURRENTLY). Objects are created
-- unqualified, in the first schema of the connection's search_path.
--
-- Conventions
-- * Identifiers compare bytewise (COLLATE "C"): the global lock order "idempotency keys
--   sorted, then accounts sorted" is the same in SQL (ORDER BY id) and in C (strcmp), and
--   does not depend on the database's locale.
-- * Timestamps are timestamptz (microseconds). The API's text form is pay_format_ts().
-- * Money is bigint cents. Codes are the API's enum suffixes (AUTHORIZED, INSUFFICIENT_FUNDS).
-- * Every expected business outcome must be expressible without raising an SQL error, so a
--   batch of payments can run in one pipelined transaction: claim with
--   INSERT ... ON CONFLICT DO NOTHING RETURNING, lock accounts with
--   SELECT ... ORDER BY id FOR NO KEY UPDATE, decide declines in memory. A constraint
--   violation therefore always means a bug, and aborts the transaction that has it.
--
-- Writing one payment (the protocol the ledger follows; paymentctl's funding does the same
-- without an idempotency key):
--   1. lock the idempotency key and read idempotency_keys: a stored outcome is replayed.
--      The lock is pg_advisory_xact_lock(hashtextextended(scope || chr(31) || key, 0)),
--      keys in sorted order (the one-bigint lock space; pg_migrate's lock uses the
--      two-integer space, so they never collide). A hash collision only serialises two
--      keys. INSERT ... ON CONFLICT (scope, key) DO NOTHING stays the last guard;
--   2. lock payer and payee: SELECT ... FROM accounts WHERE id = ANY(..) ORDER BY id
--      FOR NO KEY UPDATE (NO KEY: the ledger_entries foreign keys only need KEY SHARE);
--   3. decide in memory; insert the payment, its two ledger entries (DEBIT then CREDIT,
--      each with balance_after_cents), update both balances, insert the idempotency key
--      (processed_at = the payment's created_at) and one outbox row, NOTIFY outbox_pending;
--   4. COMMIT, then reply.

-- The API's timestamp text: 2025-01-31T12:00:00.123456+00:00 (UTC, six fractional digits).
CREATE FUNCTION pay_format_ts(t timestamptz) RETURNS text
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
    RETURN to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"');

-- ---------------------------------------------------------------------------------------
-- accounts: one row per account, WITH its balance. The balance lives on the account row so
-- that "customer balances are never negative" is a plain CHECK over kind and balance, and
-- so that locking the account (FOR NO KEY UPDATE) reads currency, status, kind and balance
-- in one index probe. The view `balances` below shows the balance part on its own.
CREATE TABLE accounts (
    id            text COLLATE "C" PRIMARY KEY
                  CONSTRAINT accounts_id_format CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    currency      char(3) COLLATE "C" NOT NULL
                  CONSTRAINT accounts_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    owner         text
                  CONSTRAINT accounts_owner_length CHECK (char_length(owner) BETWEEN 1 AND 255),
    status        text NOT NULL DEFAULT 'active'
                  CONSTRAINT accounts_status_valid CHECK (status IN ('active', 'closed')),
    kind          text NOT NULL DEFAULT 'customer'
                  CONSTRAINT accounts_kind_valid CHECK (kind IN ('customer', 'system')),
    balance_cents bigint NOT NULL DEFAULT 0,
    -- created_at is the database's clock, updated_at the writer's (the payment's time): no
    -- ordering constraint between them, application and database hosts' clocks differ.
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Only system accounts (the funding accounts) may go negative.
    CONSTRAINT accounts_customer_balance_nonnegative CHECK (kind = 'system' OR balance_cents >= 0),
    -- System accounts live in their own id space: sys:funding:USD, ...
    CONSTRAINT accounts_system_id_prefix CHECK ((kind = 'system') = (id LIKE 'sys:%')),
    -- Target of ledger_entries' (account_id, currency) foreign key: an entry is always in
    -- its account's currency.
    CONSTRAINT accounts_id_currency_key UNIQUE (id, currency)
);

CREATE VIEW balances AS
    SELECT id AS account_id, currency, kind, balance_cents, updated_at
    FROM accounts;

-- ---------------------------------------------------------------------------------------
-- payments: every recorded outcome, AUTHORIZED or DECLINED (a request that ends in a gRPC
-- error is not a payment). Declines keep what the client asked for, so payer/payee may name
-- unknown accounts and the amount may be invalid; authorized payments are well-formed.
-- The idempotency columns are all set or all NULL (funding has no key); expires_at is
-- when the key may be purged, so duplicates can be told from a key legitimately reused
-- after its purge (ledger check, invariant 5).
CREATE TABLE payments (
    id                     char(26) COLLATE "C" PRIMARY KEY
                           CONSTRAINT payments_id_ulid CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$'),
    payer_account_id       text COLLATE "C" NOT NULL
                           CONSTRAINT payments_payer_format CHECK (payer_account_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    payee_account_id       text COLLATE "C" NOT NULL
                           CONSTRAINT payments_payee_format CHECK (payee_account_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    amount_cents           bigint NOT NULL,
    currency               char(3) COLLATE "C" NOT NULL
                           CONSTRAINT payments_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    status                 text NOT NULL
                           CONSTRAINT payments_status_valid CHECK (status IN ('AUTHORIZED', 'DECLINED')),
    error_code             text
                           CONSTRAINT payments_error_code_valid CHECK (error_code IN
                               ('INSUFFICIENT_FUNDS', 'ACCOUNT_NOT_FOUND', 'INVALID_AMOUNT',
                                'SAME_ACCOUNT', 'CURRENCY_MISMATCH')),
    error_message          text,
    description            text NOT NULL DEFAULT ''
                           CONSTRAINT payments_description_length CHECK (octet_length(description) <= 1024),
    idempotency_scope      text COLLATE "C",
    idempotency_key        text COLLATE "C",
    idempotency_expires_at timestamptz,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    CONSTRAINT payments_outcome CHECK (
        (status = 'AUTHORIZED' AND error_code IS NULL AND error_message IS NULL
             AND amount_cents > 0 AND payer_account_id <> payee_account_id)
        OR (status = 'DECLINED' AND error_code IS NOT NULL AND error_message IS NOT NULL)),
    CONSTRAINT payments_idempotency_all_or_none CHECK (
        (idempotency_scope IS NULL) = (idempotency_key IS NULL)
        AND (idempotency_key IS NULL) = (idempotency_expires_at IS NULL)),
    CONSTRAINT payments_idempotency_expiry CHECK (idempotency_expires_at > created_at),
    CONSTRAINT payments_updated_after_created CHECK (updated_at >= created_at)
);

-- ---------------------------------------------------------------------------------------
-- ledger_entries: append-only double entry. The identity column orders entries: an
-- account's entries are written while its row is locked, so their ids increase in the
-- order they were applied, and the highest id is the latest (balance_after_cents of the
-- latest entry == the account's balance). One DEBIT and one CREDIT per payment at most.
CREATE TABLE ledger_entries (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id          char(26) COLLATE "C" NOT NULL REFERENCES payments (id),
    account_id          text COLLATE "C" NOT NULL,
    entry_type          text NOT NULL
                        CONSTRAINT ledger_entries_type_valid CHECK (entry_type IN ('DEBIT', 'CREDIT')),
    amount_cents        bigint NOT NULL
                        CONSTRAINT ledger_entries_amount_positive CHECK (amount_cents > 0),
    currency            char(3) COLLATE "C" NOT NULL,
    balance_after_cents bigint NOT NULL,
    created_at          timestamptz NOT NULL,
    CONSTRAINT ledger_entries_account_fkey FOREIGN KEY (account_id, currency)
        REFERENCES accounts (id, currency),
    -- Also the per-payment lookup index.
    CONSTRAINT ledger_entries_payment_type_key UNIQUE (payment_id, entry_type)
);
-- Latest entry of an account (ORDER BY id DESC LIMIT 1), an account's history.
CREATE INDEX ledger_entries_account_latest ON ledger_entries (account_id, id DESC);

-- ---------------------------------------------------------------------------------------
-- idempotency_keys: the stored outcome of a key, replayed as DUPLICATE while retained.
-- fingerprint = SHA-256 over payer, payee, amount_cents, currency (each length-prefixed).
-- processed_at is the payment's created_at (what the original reply said). Purged when
-- expires_at has passed (index below). The payment foreign key is deferred so a key may be
-- claimed before its payment row is written in the same transaction.
CREATE TABLE idempotency_keys (
    scope         text COLLATE "C" NOT NULL
                  CONSTRAINT idempotency_keys_scope_length CHECK (char_length(scope) BETWEEN 1 AND 255),
    key           text COLLATE "C" NOT NULL
                  CONSTRAINT idempotency_keys_key_format CHECK (key ~ '^[\x20-\x7e]{1,255}$'),
    fingerprint   bytea NOT NULL
                  CONSTRAINT idempotency_keys_fingerprint_sha256 CHECK (octet_length(fingerprint) = 32),
    payment_id    char(26) COLLATE "C" NOT NULL
                  REFERENCES payments (id) DEFERRABLE INITIALLY DEFERRED,
    status        text NOT NULL
                  CONSTRAINT idempotency_keys_status_valid CHECK (status IN ('AUTHORIZED', 'DECLINED')),
    error_code    text,
    error_message text,
    processed_at  timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (scope, key),
    CONSTRAINT idempotency_keys_outcome CHECK (
        (status = 'AUTHORIZED' AND error_code IS NULL AND error_message IS NULL)
        OR (status = 'DECLINED' AND error_code IS NOT NULL AND error_message IS NOT NULL)),
    CONSTRAINT idempotency_keys_expiry CHECK (expires_at > processed_at)
);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);

-- ---------------------------------------------------------------------------------------
-- outbox: events to publish to Kafka, written in the payment's transaction.
-- id is the event id (a ULID; the Kafka header event_id). payload is the envelope's
-- `payload` object (payment_id, payer_account_id, payee_account_id, amount_cents, currency,
-- plus error_code/error_message for declines); outbox_envelope() builds the whole value
-- {event_id, aggregate_type, aggregate_id, event_type, payload, timestamp}.
-- Relays claim due rows with FOR UPDATE SKIP LOCKED and set claimed_until (a lease longer
-- than the producer's message timeout), publish without holding row locks, then set
-- published_at (or count an attempt: attempts, last_error, next_attempt_at). A row sent to
-- the DLQ also gets dead_lettered_at. Writers NOTIFY outbox_pending after inserting.
-- One event per payment: UNIQUE (aggregate_type, aggregate_id).
CREATE TABLE outbox (
    id               char(26) COLLATE "C" PRIMARY KEY
                     CONSTRAINT outbox_id_ulid CHECK (id ~ '^[0-9A-HJKMNP-TV-Z]{26}$'),
    aggregate_type   text NOT NULL
                     CONSTRAINT outbox_aggregate_type_nonempty CHECK (aggregate_type <> ''),
    aggregate_id     text COLLATE "C" NOT NULL,
    event_type       text NOT NULL
                     CONSTRAINT outbox_event_type_nonempty CHECK (event_type <> ''),
    payload          jsonb NOT NULL
                     CONSTRAINT outbox_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0
                     CONSTRAINT outbox_attempts_nonnegative CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_until    timestamptz,
    last_error       text,
    published_at     timestamptz,
    dead_lettered_at timestamptz,
    CONSTRAINT outbox_payment_event CHECK (
        aggregate_type <> 'Payment'
        OR (event_type IN ('PaymentAuthorized', 'PaymentDeclined')
            AND payload ->> 'payment_id' = aggregate_id)),
    CONSTRAINT outbox_dead_letter_is_published CHECK (dead_lettered_at IS NULL OR published_at IS NOT NULL),
    CONSTRAINT outbox_one_event_per_aggregate UNIQUE (aggregate_type, aggregate_id)
);
-- The relay's work queue: unpublished rows by due time.
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE published_at IS NULL;

-- A purge of published outbox rows records the created_at horizon it deleted below, so
-- `ledger check` knows which payments must still have their event row (invariant 4).
-- Purge: DELETE FROM outbox WHERE published_at IS NOT NULL AND created_at < $cut, then
-- upsert purged_before = greatest(purged_before, $cut).
CREATE TABLE outbox_retention (
    singleton     boolean PRIMARY KEY DEFAULT true CONSTRAINT outbox_retention_singleton CHECK (singleton),
    purged_before timestamptz NOT NULL
);

CREATE FUNCTION outbox_envelope(o outbox) RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN jsonb_build_object('event_id', o.id, 'aggregate_type', o.aggregate_type,
                              'aggregate_id', o.aggregate_id, 'event_type', o.event_type,
                              'payload', o.payload, 'timestamp', pay_format_ts(o.created_at));
