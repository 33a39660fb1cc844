#!/usr/bin/env bash
# Integration test of paymentctl and the schema against a real PostgreSQL from
# scripts/stack.sh: usage and configuration errors, migrate (twice is a no-op; four
# processes at once apply each migration exactly once; an edited migration is refused),
# accounts (open / fund / show with exact balances, concurrent funding), outbox status,
# and `ledger check` on a healthy ledger and on corrupted copies, one per invariant.
#
# Each scenario runs in its own fresh "database": a schema of its own in the stack's
# payment_db, selected through the URL (options=-csearch_path=NAME), so the migrations,
# accounts and corruptions of one never meet another's.
#
# Env: PAY_SOURCE_DIR, PAY_BUILD_DIR (CTest sets both). The stack is started in a temporary
# directory and stopped on exit, whether the test passes or fails.
set -uo pipefail

SRC=${PAY_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
BUILD=${PAY_BUILD_DIR:-$SRC/build}
export PAY_BUILD_DIR=$BUILD
STACK=$SRC/scripts/stack.sh
CTL=$BUILD/paymentctl
STACK_DIR=
CHILD_PIDS=()
CHECKS=0
OUT= ERR= RC=

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

ok() {
  CHECKS=$((CHECKS + 1))
  echo "ok $CHECKS - $*"
}

cleanup() {
  local rc=$? p
  trap - EXIT
  for p in "${CHILD_PIDS[@]}"; do
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  if [[ -n $STACK_DIR ]]; then
    "$STACK" down "$STACK_DIR" >/dev/null 2>&1 || echo "warning: stack.sh down $STACK_DIR failed" >&2
    rm -rf "$STACK_DIR"
  fi
  if ((rc == 0)); then
    echo "PASS: $CHECKS checks"
  else
    echo "FAILED after $CHECKS checks" >&2
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run RC CMD...: run, keep stdout/stderr in OUT/ERR, and require exit status RC.
run() {
  local want=$1
  shift
  local o e
  o=$(mktemp) e=$(mktemp)
  "$@" >"$o" 2>"$e"
  RC=$?
  OUT=$(cat "$o") ERR=$(cat "$e")
  rm -f "$o" "$e"
  if [[ $RC != "$want" ]]; then
    fail "$* exited $RC, expected $want; stdout: [$OUT] stderr: [$ERR]"
  fi
}

expect_eq() {
  [[ $1 == "$2" ]] || fail "$3: expected [$2], got [$1]"
  ok "$3"
}

# expect_line TEXT LINE WHAT: TEXT has LINE as one of its lines, exactly.
expect_line() {
  grep -qxF -- "$2" <<<"$1" || fail "$3: no line [$2] in: [$1]"
  ok "$3"
}

# sql [-d DB_URL] STATEMENT...: psql as the payment role against the current DATABASE_URL.
sql() {
  psql -XAtq -v ON_ERROR_STOP=1 "$DATABASE_URL" "${@/#/-c}" 2>&1 || fail "psql failed: $*"
}

url_for() {
  local base=$BASE_URL sep='?'
  [[ $base == *\?* ]] && sep='&'
  echo "${base}${sep}options=-csearch_path%3D$1"
}

# use_db NAME: a fresh schema NAME; DATABASE_URL points at it.
use_db() {
  DATABASE_URL=$BASE_URL sql "DROP SCHEMA IF EXISTS $1 CASCADE" "CREATE SCHEMA $1" >/dev/null
  export DATABASE_URL
  DATABASE_URL=$(url_for "$1")
}

# ---- prerequisites ------------------------------------------------------------------------
[[ -x $CTL ]] || fail "paymentctl not built at $CTL (cmake --build the build dir first)"
[[ -x $BUILD/kafka-devbroker ]] || fail "kafka-devbroker not built at $BUILD/kafka-devbroker (stack.sh needs it)"
command -v psql >/dev/null || fail "psql not found (Debian package postgresql-client)"
[[ -x $STACK ]] || fail "scripts/stack.sh missing at $STACK"

MIGRATIONS=()
for f in "$SRC"/db/migrations/*.sql; do MIGRATIONS+=("$(basename "$f")"); done
((${#MIGRATIONS[@]} > 0)) || fail "no migrations in $SRC/db/migrations"
NMIG=${#MIGRATIONS[@]}
LAST=${MIGRATIONS[-1]}
LASTV=$((10#${LAST%%_*}))

# ---- usage errors need no database ----------------------------------------------------------
unset DATABASE_URL
run 0 "$CTL" --help
expect_line "$OUT" "  ledger check                         verify every ledger invariant; one line per fault," "--help lists ledger check"
run 2 "$CTL"
expect_line "$ERR" "paymentctl: missing command (migrate, account, outbox or ledger)" "no command is a usage error"
run 2 "$CTL" frobnicate
expect_line "$ERR" 'paymentctl: unknown command "frobnicate" (expected migrate, account, outbox or ledger)' "unknown command"
run 2 "$CTL" account open alice
expect_line "$ERR" "paymentctl: account open: --currency is required (e.g. --currency USD)" "open without currency"
run 2 "$CTL" account open alice --currency usd
expect_line "$ERR" 'paymentctl: --currency: "usd" is not three upper-case letters (e.g. USD)' "lower-case currency"
run 2 "$CTL" account open 'bad id' --currency USD
expect_line "$ERR" 'paymentctl: account id "bad id" is not 1-64 characters of [A-Za-z0-9_.:-]' "bad account id"
run 2 "$CTL" account fund alice 12.5
expect_line "$ERR" 'paymentctl: account fund: CENTS "12.5" is not a whole number of cents' "fractional cents"
run 2 "$CTL" account fund alice 0
expect_line "$ERR" "paymentctl: account fund: CENTS 0 is not in 1..1000000000000000" "zero cents"
run 2 "$CTL" account fund alice -5
expect_line "$ERR" "paymentctl: account fund: CENTS -5 is not in 1..1000000000000000" "negative cents"
MAX_AMOUNT_CENTS=100 run 2 "$CTL" account fund alice 101
expect_line "$ERR" "paymentctl: account fund: CENTS 101 is not in 1..100" "MAX_AMOUNT_CENTS bounds funding"
run 2 "$CTL" ledger check --currency USD
expect_line "$ERR" "paymentctl: --currency is only valid with account open" "option of another command"
DATABASE_URL='mysql://u:hunter2@db/x' run 2 "$CTL" ledger check
expect_line "$ERR" 'paymentctl: error: DATABASE_URL: "mysql://u:***@db/x" is not a PostgreSQL URL (expected postgresql://, postgres:// or postgresql+asyncpg://)' "non-PostgreSQL URL, password masked"
DATABASE_URL='postgresql://u:hunter2@127.0.0.1:5/x?sslmod=1' run 2 "$CTL" ledger check
expect_line "$ERR" 'paymentctl: error: DATABASE_URL: "postgresql://u:***@127.0.0.1:5/x?sslmod=1": invalid URI query parameter: "sslmod"' "libpq's own URL error"
ENVIRONMENT=production run 2 "$CTL" ledger check
expect_line "$ERR" "paymentctl: error: DATABASE_URL: ENVIRONMENT=production refuses the default database URL and URLs without a password" "production refuses the default URL"

# ---- the stack ----------------------------------------------------------------------------
STACK_DIR=$(mktemp -d /tmp/pay-ctl-test.XXXXXX) || fail "mktemp"
"$STACK" up "$STACK_DIR" >"$STACK_DIR/up.log" 2>&1 || { cat "$STACK_DIR/up.log" >&2; fail "scripts/stack.sh up failed"; }
eval "$("$STACK" env "$STACK_DIR")" || fail "scripts/stack.sh env failed"
[[ -n ${DATABASE_URL:-} ]] || fail "stack.sh env gave no DATABASE_URL"
BASE_URL=$DATABASE_URL
ok "stack up: $BASE_URL"

# Unreachable server: a port nobody listens on (the stack's port + 1 is probed free).
PG_PORT=$(cat "$STACK_DIR/pg.port")
DEAD_PORT=$((PG_PORT + 1))
while (exec 3<>"/dev/tcp/127.0.0.1/$DEAD_PORT") 2>/dev/null; do DEAD_PORT=$((DEAD_PORT + 1)); done
DATABASE_URL="postgresql://payment:hunter2@127.0.0.1:$DEAD_PORT/payment_db" run 1 "$CTL" ledger check
expect_line "$ERR" "paymentctl: error: cannot connect to PostgreSQL: connection to server at \"127.0.0.1\", port $DEAD_PORT failed: Connection refused Is the server running on that host and accepting TCP/IP connections? (DATABASE_URL postgresql://payment:***@127.0.0.1:$DEAD_PORT/payment_db)" "connection refused, password masked"
DATABASE_URL="${BASE_URL/payment:payment@/payment:wrong@}" run 1 "$CTL" ledger check
expect_line "$ERR" "paymentctl: error: cannot connect to PostgreSQL: connection to server at \"127.0.0.1\", port $PG_PORT failed: FATAL:  password authentication failed for user \"payment\" (DATABASE_URL postgresql://payment:***@127.0.0.1:$PG_PORT/payment_db)" "wrong password"

# ---- migrate ------------------------------------------------------------------------------
use_db m1
run 0 "$CTL" migrate
for m in "${MIGRATIONS[@]}"; do
  grep -qE "^migrate: applied $m \([0-9]+\.[0-9] ms\)$" <<<"$OUT" || fail "migrate did not report $m: [$OUT]"
done
expect_line "$OUT" "migrate: $NMIG applied, 0 already applied; schema version $LASTV" "first migrate applies every migration"
expect_eq "$ERR" "" "migrate writes nothing to stderr"
expect_eq "$(sql "SELECT string_agg(name, ',' ORDER BY version) FROM schema_migrations")" "$(IFS=,; echo "${MIGRATIONS[*]}")" "schema_migrations lists the migrations"
run 0 "$CTL" migrate
expect_eq "$OUT" "migrate: 0 applied, $NMIG already applied; schema version $LASTV" "second migrate is a no-op"
expect_eq "$(sql "SELECT count(*) FROM schema_migrations")" "$NMIG" "no row added by the second migrate"
# the asyncpg spelling of the URL works too
DATABASE_URL=${DATABASE_URL/postgresql:/postgresql+asyncpg:} run 0 "$CTL" migrate
expect_eq "$OUT" "migrate: 0 applied, $NMIG already applied; schema version $LASTV" "postgresql+asyncpg:// URL"
# a migration edited after it was applied is refused
sql "UPDATE schema_migrations SET checksum = sha256('edited') WHERE name = '${MIGRATIONS[0]}'" >/dev/null
run 1 "$CTL" migrate
[[ $ERR == "paymentctl: error: migration ${MIGRATIONS[0]} was changed after it was applied (recorded SHA-256 "*"add a new migration instead" ]] ||
  fail "edited migration: unexpected error [$ERR]"
ok "an edited migration is refused"

# Four migrators at once: they all queue on the advisory lock (held here until all four
# wait), then each migration is applied exactly once.
use_db m4
HOLDER_URL="$DATABASE_URL&application_name=pay-lock-holder"
psql -XAtq "$HOLDER_URL" -c "SELECT pg_advisory_lock(1885436160, 1)" -c "SELECT pg_sleep(120)" >/dev/null 2>&1 &
CHILD_PIDS+=($!)
for ((i = 0; i < 100; i++)); do
  [[ $(sql "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1885436160 AND objid = 1 AND objsubid = 2 AND granted") == 1 ]] && break
  sleep 0.1
done
((i < 100)) || fail "the test's lock holder did not get the migration lock"
MPIDS=()
for k in 1 2 3 4; do
  "$CTL" migrate >"$STACK_DIR/migrate.$k.out" 2>"$STACK_DIR/migrate.$k.err" &
  MPIDS+=($!)
  CHILD_PIDS+=($!)
done
for ((i = 0; i < 300; i++)); do
  [[ $(sql "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1885436160 AND objid = 1 AND objsubid = 2 AND NOT granted") == 4 ]] && break
  sleep 0.1
done
((i < 300)) || fail "four migrators were not all waiting for the migration lock within 30 s"
ok "four migrators wait on the migration lock"
sql "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'pay-lock-holder'" >/dev/null
for k in 1 2 3 4; do
  wait "${MPIDS[$((k - 1))]}" || fail "concurrent migrate $k failed: $(cat "$STACK_DIR/migrate.$k.err")"
done
for m in "${MIGRATIONS[@]}"; do
  n=$(cat "$STACK_DIR"/migrate.*.out | grep -cE "^migrate: applied $m ")
  expect_eq "$n" 1 "$m applied by exactly one of four concurrent migrators"
done
n=$(cat "$STACK_DIR"/migrate.*.out | grep -cxF "migrate: 0 applied, $NMIG already applied; schema version $LASTV")
expect_eq "$n" 3 "the three others found everything applied"
expect_eq "$(sql "SELECT count(*) FROM schema_migrations")" "$NMIG" "schema_migrations has one row per migration"

# ---- accounts -----------------------------------------------------------------------------
use_db acct
run 0 "$CTL" migrate
run 0 "$CTL" account open alice --currency USD --owner "Alice Liddell"
expect_eq "$OUT" "account alice opened (USD)" "open alice"
run 0 "$CTL" account open alice --currency USD --owner "Alice Liddell"
expect_eq "$OUT" "account alice already exists (USD); nothing to do" "opening an identical account is a no-op"
run 1 "$CTL" account open alice --currency EUR
expect_eq "$ERR" "paymentctl: error: account alice already exists with currency USD (not EUR)" "other currency is refused"
run 1 "$CTL" account open alice --currency USD --owner Bob
expect_eq "$ERR" 'paymentctl: error: account alice already exists with owner "Alice Liddell"' "other owner is refused"
run 2 "$CTL" account open sys:funding:USD --currency USD
expect_eq "$ERR" 'paymentctl: error: account id sys:funding:USD: ids starting with "sys:" are reserved for system accounts' "sys: ids are reserved"
run 0 "$CTL" account open bob --currency USD
run 0 "$CTL" account open carol --currency EUR
run 0 "$CTL" account show alice
expect_eq "$(grep -v '_at: ' <<<"$OUT")" "id: alice
currency: USD
owner: Alice Liddell
kind: customer
status: active
balance_cents: 0
entries: 0" "a new account has a zero balance"
grep -qE '^created_at: [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}\+00:00$' <<<"$OUT" || fail "created_at format: [$OUT]"
ok "timestamps in the API format"

run 0 "$CTL" account fund alice 1500
[[ $OUT =~ ^account\ alice\ funded\ with\ 1500\ cents\ by\ payment\ ([0-9A-HJKMNP-TV-Z]{26})\ from\ sys:funding:USD\;\ balance\ 1500\ cents$ ]] ||
  fail "fund output: [$OUT]"
P_ALICE=${BASH_REMATCH[1]}
ok "fund alice 1500"
run 0 "$CTL" account fund alice 250
run 0 "$CTL" account fund bob 70
run 0 "$CTL" account fund carol 999
run 0 "$CTL" account show alice
expect_line "$OUT" "balance_cents: 1750" "alice's balance"
expect_line "$OUT" "entries: 2" "alice's entries"
run 0 "$CTL" account show sys:funding:USD
expect_eq "$(grep -v '_at: ' <<<"$OUT")" "id: sys:funding:USD
currency: USD
owner: system
kind: system
status: active
balance_cents: -1820
entries: 3" "the USD funding account went negative by what it funded"
run 0 "$CTL" account show sys:funding:EUR
expect_line "$OUT" "balance_cents: -999" "one funding account per currency"
expect_eq "$(sql "SELECT status || ' ' || payer_account_id || ' ' || payee_account_id || ' ' || amount_cents || ' ' || currency FROM payments WHERE id = '$P_ALICE'")" \
  "AUTHORIZED sys:funding:USD alice 1500 USD" "the funding payment row"
expect_eq "$(sql "SELECT string_agg(entry_type || ' ' || account_id || ' ' || amount_cents || ' ' || balance_after_cents, ', ' ORDER BY id) FROM ledger_entries WHERE payment_id = '$P_ALICE'")" \
  "DEBIT sys:funding:USD 1500 -1500, CREDIT alice 1500 1500" "the funding payment's entries"
expect_eq "$(sql "SELECT event_type || ' ' || aggregate_type || ' ' || aggregate_id || ' ' || (outbox_envelope(o) - 'timestamp' - 'event_id')::text FROM outbox o WHERE aggregate_id = '$P_ALICE'")" \
  "PaymentAuthorized Payment $P_ALICE {\"payload\": {\"currency\": \"USD\", \"payment_id\": \"$P_ALICE\", \"amount_cents\": 1500, \"payee_account_id\": \"alice\", \"payer_account_id\": \"sys:funding:USD\"}, \"event_type\": \"PaymentAuthorized\", \"aggregate_id\": \"$P_ALICE\", \"aggregate_type\": \"Payment\"}" \
  "the PaymentAuthorized outbox row and its envelope"
[[ $(sql "SELECT outbox_envelope(o)->>'timestamp' = pay_format_ts(p.created_at) AND outbox_envelope(o)->>'event_id' = o.id FROM outbox o JOIN payments p ON p.id = o.aggregate_id WHERE p.id = '$P_ALICE'") == t ]] ||
  fail "envelope timestamp/event_id"
ok "envelope timestamp and event_id"

run 1 "$CTL" account fund nobody 5
expect_eq "$ERR" "paymentctl: error: account nobody does not exist" "funding an unknown account fails clearly"
run 1 "$CTL" account show nobody
expect_eq "$ERR" "paymentctl: error: account nobody does not exist" "showing an unknown account fails clearly"
run 1 "$CTL" account fund sys:funding:USD 5
expect_eq "$ERR" "paymentctl: error: account sys:funding:USD is a system account and cannot be funded" "a system account cannot be funded"
sql "UPDATE accounts SET status = 'closed' WHERE id = 'carol'" >/dev/null
run 1 "$CTL" account fund carol 5
expect_eq "$ERR" "paymentctl: error: account carol is closed and cannot be funded" "a closed account cannot be funded"
sql "UPDATE accounts SET status = 'active' WHERE id = 'carol'" >/dev/null
sql "UPDATE accounts SET balance_cents = 9223372036854775000 WHERE id = 'bob'" >/dev/null
run 1 "$CTL" account fund bob 1000
expect_eq "$ERR" "paymentctl: error: account bob: balance 9223372036854775000 + 1000 would overflow" "overflow is refused"
sql "UPDATE accounts SET balance_cents = 70 WHERE id = 'bob'" >/dev/null

run 0 "$CTL" outbox status
expect_eq "$(grep -v '^oldest' <<<"$OUT")" "pending: 4
published: 0
failed: 0
dead_lettered: 0
claimed: 0" "outbox status counts"
grep -qE '^oldest_pending_age_seconds: [0-9]+\.[0-9]{3}$' <<<"$OUT" || fail "oldest pending age: [$OUT]"
ok "oldest pending age"
sql "UPDATE outbox SET published_at = now() WHERE aggregate_id = '$P_ALICE'" \
  "UPDATE outbox SET attempts = 2, last_error = 'x', claimed_until = now() + interval '1 minute' WHERE aggregate_id IN (SELECT id FROM payments WHERE payee_account_id = 'bob')" >/dev/null
run 0 "$CTL" outbox status
expect_eq "$(grep -v '^oldest' <<<"$OUT")" "pending: 3
published: 1
failed: 1
dead_lettered: 0
claimed: 1" "outbox status after a publish and a failure"

run 0 "$CTL" ledger check
expect_eq "$OUT" "ledger check: OK (5 accounts, 4 payments, 8 entries)" "ledger check passes on a healthy ledger"

# Concurrent funding: 4 processes x 10 fundings on two accounts, plus two accounts of a new
# currency whose funding account both create on demand at once. Nothing lost, no deadlock.
run 0 "$CTL" account open dave --currency GBP
run 0 "$CTL" account open erin --currency GBP
FPIDS=()
for k in 1 2 3 4; do
  (
    for j in $(seq 10); do
      "$CTL" account fund alice "$k" >/dev/null || exit 1
      "$CTL" account fund bob 1 >/dev/null || exit 1
    done
    [[ $k == 1 ]] && { "$CTL" account fund dave 5 >/dev/null || exit 1; }
    [[ $k == 2 ]] && { "$CTL" account fund erin 7 >/dev/null || exit 1; }
    exit 0
  ) &
  FPIDS+=($!)
  CHILD_PIDS+=($!)
done
for p in "${FPIDS[@]}"; do wait "$p" || fail "a concurrent funder failed"; done
run 0 "$CTL" account show alice
expect_line "$OUT" "balance_cents: 1850" "alice after concurrent funding (1750 + 10*(1+2+3+4))"
run 0 "$CTL" account show bob
expect_line "$OUT" "balance_cents: 110" "bob after concurrent funding (70 + 40)"
run 0 "$CTL" account show sys:funding:GBP
expect_line "$OUT" "balance_cents: -12" "GBP funding account created once, on demand"
run 0 "$CTL" ledger check
expect_eq "$OUT" "ledger check: OK (8 accounts, 86 payments, 172 entries)" "ledger check after concurrent funding"

# ---- ledger check on corrupted ledgers: one fresh database per case --------------------------

# seed: a small healthy ledger; sets P_A (alice's funding), P_B (bob's), P_C (carol's).
seed() {
  use_db "$1"
  run 0 "$CTL" migrate
  run 0 "$CTL" account open alice --currency USD
  run 0 "$CTL" account open bob --currency USD
  run 0 "$CTL" account open carol --currency EUR
  run 0 "$CTL" account fund alice 1500
  P_A=${OUT#*by payment } P_A=${P_A%% *}
  run 0 "$CTL" account fund bob 250
  P_B=${OUT#*by payment } P_B=${P_B%% *}
  run 0 "$CTL" account fund carol 999
  P_C=${OUT#*by payment } P_C=${P_C%% *}
  run 0 "$CTL" ledger check
  expect_eq "$OUT" "ledger check: OK (5 accounts, 3 payments, 6 entries)" "$1: healthy before corruption"
}

entry_id() { # entry_id PAYMENT TYPE
  sql "SELECT id FROM ledger_entries WHERE payment_id = '$1' AND entry_type = '$2'"
}

# (a) a balance changed behind the ledger's back
seed bad_balance
sql "UPDATE accounts SET balance_cents = balance_cents + 7 WHERE id = 'alice'" >/dev/null
run 1 "$CTL" ledger check
expect_eq "$OUT" "account alice: balance_cents 1507 != credits - debits 1500
account alice: balance_cents 1507 != balance_after_cents 1500 of its latest entry #$(entry_id "$P_A" CREDIT) (payment $P_A)
ledger check: FAILED (2 faults; 5 accounts, 3 payments, 6 entries)" "(a) updated balance is reported"

# (b) an entry deleted
seed lost_entry
run 0 "$CTL" account fund bob 30
P_B2=${OUT#*by payment } P_B2=${P_B2%% *}
E=$(entry_id "$P_B" CREDIT)
E2=$(entry_id "$P_B2" CREDIT)
sql "DELETE FROM ledger_entries WHERE id = $E" >/dev/null
run 1 "$CTL" ledger check
expect_eq "$OUT" "currency USD: sum of DEBIT entries 1780 != sum of CREDIT entries 1530 (difference 250)
account bob: balance_cents 280 != credits - debits 30
account bob: entry #$E2 (payment $P_B2, CREDIT 30) has balance_after_cents 280, expected 30
payment $P_B: AUTHORIZED 250 USD from sys:funding:USD to bob, but its 1 ledger entries are DEBIT sys:funding:USD 250 USD (expected DEBIT sys:funding:USD and CREDIT bob of that amount)
ledger check: FAILED (4 faults; 5 accounts, 4 payments, 7 entries)" "(b) deleted entry is reported"

# (c) debits and credits no longer balance
seed imbalance
sql "UPDATE ledger_entries SET amount_cents = 999 WHERE payment_id = '$P_C' AND entry_type = 'DEBIT'" \
  "UPDATE ledger_entries SET amount_cents = 1001, balance_after_cents = 1001 WHERE payment_id = '$P_C' AND entry_type = 'CREDIT'" \
  "UPDATE accounts SET balance_cents = 1001 WHERE id = 'carol'" >/dev/null
run 1 "$CTL" ledger check
expect_line "$OUT" "currency EUR: sum of DEBIT entries 999 != sum of CREDIT entries 1001 (difference -2)" "(c) imbalance named by currency"
expect_line "$OUT" "payment $P_C: AUTHORIZED 999 EUR from sys:funding:EUR to carol, but its 2 ledger entries are DEBIT sys:funding:EUR 999 EUR, CREDIT carol 1001 EUR (expected DEBIT sys:funding:EUR and CREDIT carol of that amount)" "(c) and the payment at fault"
expect_line "$OUT" "ledger check: FAILED (2 faults; 5 accounts, 3 payments, 6 entries)" "(c) exactly these two faults"

# (d) a negative customer balance (the constraint dropped first, as only corruption can)
seed negative
sql "ALTER TABLE accounts DROP CONSTRAINT accounts_customer_balance_nonnegative" \
  "UPDATE accounts SET balance_cents = -5 WHERE id = 'bob'" \
  "UPDATE ledger_entries SET balance_after_cents = -5 WHERE payment_id = '$P_B' AND entry_type = 'CREDIT'" >/dev/null
run 1 "$CTL" ledger check
expect_line "$OUT" "account bob: customer balance is negative (-5 cents)" "(d) negative balance named"
expect_line "$OUT" "account bob: entry #$(entry_id "$P_B" CREDIT) (payment $P_B) left the customer balance negative (-5 cents)" "(d) and the entry that did it"
expect_line "$OUT" "ledger check: FAILED (4 faults; 5 accounts, 3 payments, 6 entries)" "(d) fault count (also balance and chain)"

# (e) an AUTHORIZED payment without entries
seed no_entries
PX=01ARYZ6S41TSV4RRFFQ69G5FAV
sql "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status, created_at, updated_at) VALUES ('$PX', 'alice', 'bob', 100, 'USD', 'AUTHORIZED', now(), now())" \
  "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAW', 'Payment', '$PX', 'PaymentAuthorized', jsonb_build_object('payment_id', '$PX', 'payer_account_id', 'alice', 'payee_account_id', 'bob', 'amount_cents', 100, 'currency', 'USD'))" >/dev/null
run 1 "$CTL" ledger check
expect_eq "$OUT" "payment $PX: AUTHORIZED but has no ledger entries (expected DEBIT alice and CREDIT bob of 100 USD)
ledger check: FAILED (1 fault; 5 accounts, 4 payments, 6 entries)" "(e) payment without entries"

# (f) a payment without its outbox row; then the same row counted as purged is fine
seed no_event
sql "DELETE FROM outbox WHERE aggregate_id = '$P_B'" >/dev/null
run 1 "$CTL" ledger check
expect_eq "$OUT" "payment $P_B: AUTHORIZED but has no outbox event (expected one PaymentAuthorized)
ledger check: FAILED (1 fault; 5 accounts, 3 payments, 6 entries)" "(f) payment without outbox event"
sql "INSERT INTO outbox_retention (purged_before) VALUES (now() + interval '1 second')" >/dev/null
run 0 "$CTL" ledger check
expect_eq "$OUT" "ledger check: OK (5 accounts, 3 payments, 6 entries)" "(f) a purged event is not a fault"

# (g) a DECLINED payment with entries, and an event of the wrong type
seed declined
PD=01ARYZ6S41TSV4RRFFQ69G5FAX
sql "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status, error_code, error_message, created_at, updated_at) VALUES ('$PD', 'alice', 'bob', 5000, 'USD', 'DECLINED', 'INSUFFICIENT_FUNDS', 'insufficient funds', now(), now())" \
  "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAY', 'Payment', '$PD', 'PaymentAuthorized', jsonb_build_object('payment_id', '$PD'))" \
  "INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency, balance_after_cents, created_at) VALUES ('$PD', 'alice', 'DEBIT', 5000, 'USD', -3500, now())" >/dev/null
run 1 "$CTL" ledger check
expect_line "$OUT" "payment $PD: DECLINED but has 1 ledger entries (expected none): DEBIT alice 5000 USD" "(g) declined payment with an entry"
expect_line "$OUT" "payment $PD: DECLINED but its outbox event 01ARYZ6S41TSV4RRFFQ69G5FAY is PaymentAuthorized (expected PaymentDeclined)" "(g) event of the wrong type"

# (h) invariant 5: two payments holding one idempotency key while it was retained, and a
# stored outcome that disagrees with its payment
seed idem
P1=01ARYZ6S41TSV4RRFFQ69G5FB0 P2=01ARYZ6S41TSV4RRFFQ69G5FB1 P3=01ARYZ6S41TSV4RRFFQ69G5FB2
for p in "$P1:2025-01-31 12:00:00+00" "$P2:2025-01-31 13:00:00+00" "$P3:2025-03-01 12:00:00+00"; do
  id=${p%%:*} ts=${p#*:}
  sql "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status, error_code, error_message, idempotency_scope, idempotency_key, idempotency_expires_at, created_at, updated_at) VALUES ('$id', 'alice', 'nobody', 5, 'USD', 'DECLINED', 'ACCOUNT_NOT_FOUND', 'payee not found', 'global', 'key-1', timestamptz '$ts' + interval '24 hours', '$ts', '$ts')" \
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ('7${id:1}', 'Payment', '$id', 'PaymentDeclined', jsonb_build_object('payment_id', '$id', 'payer_account_id', 'alice', 'payee_account_id', 'nobody', 'amount_cents', 5, 'currency', 'USD', 'error_code', 'ACCOUNT_NOT_FOUND'))" >/dev/null
done
sql "INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, status, error_code, error_message, processed_at, expires_at) VALUES ('global', 'key-1', sha256('x'), '$P3', 'AUTHORIZED', NULL, NULL, '2025-03-01 12:00:00+00', '2025-03-02 12:00:00+00')" >/dev/null
run 1 "$CTL" ledger check
expect_eq "$OUT" "idempotency key \"key-1\" in scope \"global\": stored outcome AUTHORIZED/NONE differs from payment $P3, which is DECLINED/ACCOUNT_NOT_FOUND
idempotency key \"key-1\" in scope \"global\": payments $P1 and $P2 both hold it ($P2 was created at 2025-01-31T13:00:00.000000+00:00, before the key of $P1 expired at 2025-02-01T12:00:00.000000+00:00)
ledger check: FAILED (2 faults; 5 accounts, 6 payments, 6 entries)" "(h) idempotency faults (a key reused after its expiry is not one)"

# ---- constraints guard what ledger check would otherwise find ----------------------------------
use_db guards
run 0 "$CTL" migrate
run 0 "$CTL" account open zed --currency USD
guard() { # guard WHAT SQL: the statement must fail with a constraint violation
  local out
  out=$(psql -XAtq -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "$2" 2>&1) && fail "constraint missing: $1 ($2 succeeded)"
  [[ $out == *"violates"* ]] || fail "$1: unexpected error [$out]"
  ok "constraint: $1"
}
guard "customer balance >= 0" "UPDATE accounts SET balance_cents = -1 WHERE id = 'zed'"
guard "system ids start with sys:" "INSERT INTO accounts (id, currency, kind) VALUES ('house', 'USD', 'system')"
guard "account id format" "INSERT INTO accounts (id, currency) VALUES ('a b', 'USD')"
guard "currency format" "INSERT INTO accounts (id, currency) VALUES ('y', 'usd')"
guard "authorized amount > 0" "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status, created_at, updated_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'a', 'b', 0, 'USD', 'AUTHORIZED', now(), now())"
guard "declined needs an error code" "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status, created_at, updated_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'a', 'b', 1, 'USD', 'DECLINED', now(), now())"
guard "payment id is a ULID" "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status, created_at, updated_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAU', 'a', 'b', 1, 'USD', 'AUTHORIZED', now(), now())"
sql "INSERT INTO payments (id, payer_account_id, payee_account_id, amount_cents, currency, status, created_at, updated_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'sys:funding:USD', 'zed', 1, 'USD', 'AUTHORIZED', now(), now())" >/dev/null
guard "entry type" "INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency, balance_after_cents, created_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'zed', 'HOLD', 1, 'USD', 1, now())"
guard "entry amount > 0" "INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency, balance_after_cents, created_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'zed', 'CREDIT', 0, 'USD', 1, now())"
guard "entry in its account's currency" "INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency, balance_after_cents, created_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'zed', 'CREDIT', 1, 'EUR', 1, now())"
guard "one CREDIT per payment" "INSERT INTO ledger_entries (payment_id, account_id, entry_type, amount_cents, currency, balance_after_cents, created_at) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'zed', 'CREDIT', 1, 'USD', 1, now()), ('01ARYZ6S41TSV4RRFFQ69G5FAV', 'zed', 'CREDIT', 1, 'USD', 2, now())"
guard "one event per payment" "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FB0', 'Payment', '01ARYZ6S41TSV4RRFFQ69G5FAV', 'PaymentAuthorized', '{\"payment_id\": \"01ARYZ6S41TSV4RRFFQ69G5FAV\"}'), ('01ARYZ6S41TSV4RRFFQ69G5FB1', 'Payment', '01ARYZ6S41TSV4RRFFQ69G5FAV', 'PaymentAuthorized', '{\"payment_id\": \"01ARYZ6S41TSV4RRFFQ69G5FAV\"}')"
guard "event payload names its payment" "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ('01ARYZ6S41TSV4RRFFQ69G5FB0', 'Payment', '01ARYZ6S41TSV4RRFFQ69G5FAV', 'PaymentAuthorized', '{\"payment_id\": \"x\"}')"
guard "idempotency fingerprint is SHA-256" "INSERT INTO idempotency_keys (scope, key, fingerprint, payment_id, status, processed_at, expires_at) VALUES ('global', 'k', 'abc', '01ARYZ6S41TSV4RRFFQ69G5FAV', 'AUTHORIZED', now(), now() + interval '1 day')"

echo "all paymentctl checks passed"
