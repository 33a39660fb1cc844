#!/usr/bin/env bash
# Integration test of build/payment-bench against a real paymentd on a stack of its own.
#
# Usage: test_bench.sh harness | smoke
#   harness  flag errors (exit 2, precise messages); health mode (ok > 0, no errors, the
#            JSON parses and holds every field, counters consistent); authorize mode with
#            one pair (counters consistent, AUTHORIZED > 0, the verification line holds);
#            open loop (sent +
#            unsent == rate x duration, exactly); calls cut off by a 1 ms deadline resolved
#            by retrying their keys, so the verification stays exact; --accounts over accounts made by
#            bench/setup_accounts.sql (per-account verification) then `paymentctl ledger
#            check`; get and balance modes; a verification that must fail (exit 1) when
#            another client moves the payer's balance during the run.
#   smoke    issue 5's `make test` smoke: 5 s of AuthorizePayment, AUTHORIZED > 0, RPC errors
#            == 0 (--strict), the verification line holds (exit 0).
#
# Env: PAY_SOURCE_DIR, PAY_BUILD_DIR (CTest sets both). Everything it starts (stack,
# paymentd) lives in a temporary directory and is stopped on exit, pass or fail.
set -uo pipefail

SRC=${PAY_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
BUILD=${PAY_BUILD_DIR:-$SRC/build}
export PAY_BUILD_DIR=$BUILD
STACK=$SRC/scripts/stack.sh
CTL=$BUILD/paymentctl
BENCH=$BUILD/payment-bench
PY=/usr/bin/python3
WHAT=${1:-harness}
DIR=
PD_PID=
CHECKS=0
OUT='' RC=''

fail() {
  echo "FAIL: $*" >&2
  [[ -n $DIR && -f $DIR/paymentd.log ]] && { echo "---- paymentd log ----" >&2; tail -50 "$DIR/paymentd.log" >&2; }
  exit 1
}
ok() {
  CHECKS=$((CHECKS + 1))
  echo "ok $CHECKS - $*"
}
cleanup() {
  local rc=$?
  trap - EXIT
  if [[ -n $PD_PID ]]; then
    kill -KILL "$PD_PID" 2>/dev/null
    wait "$PD_PID" 2>/dev/null
  fi
  if [[ -n $DIR ]]; then
    "$STACK" down "$DIR" >/dev/null 2>&1 || echo "warning: stack.sh down $DIR failed" >&2
    rm -rf "$DIR"
  fi
  if ((rc == 0)); then echo "PASS: $CHECKS checks"; else echo "FAILED after $CHECKS checks" >&2; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for f in "$BENCH" "$BUILD/paymentd" "$CTL" "$BUILD/kafka-devbroker"; do
  [[ -x $f ]] || fail "$f is missing (build the project first)"
done
[[ -x $PY ]] || fail "$PY is missing (Debian package python3): needed to parse payment-bench's JSON"
command -v psql >/dev/null || fail "psql is missing (Debian package postgresql-client-15)"

# bench RC ARGS...: runs payment-bench, output in OUT, requires exit status RC.
bench() {
  local want=$1
  shift
  OUT=$("$BENCH" "$@" 2>&1)
  RC=$?
  [[ $RC == "$want" ]] || fail "payment-bench $* exited $RC, expected $want; output:"$'\n'"$OUT"
}
has() { grep -qF -- "$1" <<<"$OUT" || fail "output lacks \"$1\":"$'\n'"$OUT"; }

# json_check FILE MODE PY-EXPR...: the JSON parses, holds every field, its counters agree
# with each other, and each extra Python expression over `j` is true.
json_check() {
  local file=$1 mode=$2
  shift 2
  "$PY" - "$file" "$mode" "$@" <<'EOF' || fail "JSON check of $file failed"
import json, sys
path, mode, exprs = sys.argv[1], sys.argv[2], sys.argv[3:]
j = json.load(open(path))
fields = ["mode", "addr", "run_id", "concurrency", "connections", "open_loop", "rate", "unsent",
          "duration_s", "warmup_s", "deadline_ms", "amount_cents", "accounts", "requests", "ok",
          "errors", "bad_responses", "ok_per_s", "requests_per_s", "authorized_per_s",
          "grpc_status", "payment_status", "decline_code", "health_status", "latency_us",
          "warmup_requests", "unknown_outcomes", "verify", "exit_code"]
missing = [f for f in fields if f not in j]
assert not missing, f"missing fields {missing}"
for f in ["count", "min", "mean", "p50", "p90", "p99", "p99_9", "max"]:
    assert f in j["latency_us"], f"latency_us.{f} missing"
for f in ["performed", "ok", "authorized_total", "line"]:
    assert f in j["verify"], f"verify.{f} missing"
assert j["mode"] == mode, j["mode"]
assert sum(j["grpc_status"].values()) == j["requests"], "grpc_status does not sum to requests"
assert j["grpc_status"].get("OK", 0) == j["ok"], "ok != grpc_status.OK"
assert j["ok"] + j["errors"] == j["requests"], "ok + errors != requests"
assert j["latency_us"]["count"] == j["requests"], "latency count != requests"
lat = j["latency_us"]
if j["requests"]:
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"], lat
if mode == "authorize":
    ps = j["payment_status"]
    assert sum(ps.values()) + j["bad_responses"] == j["ok"], "payment statuses do not sum to ok"
    assert sum(j["decline_code"].values()) == ps["DECLINED"], "decline codes do not sum to DECLINED"
if mode == "health":
    assert sum(j["health_status"].values()) + j["bad_responses"] == j["ok"], "health statuses != ok"
for e in exprs:
    assert eval(e), f"failed: {e}  (json: {json.dumps(j)})"
EOF
}

start_paymentd() {
  rm -f "$DIR/port"
  env GRPC_HOST=127.0.0.1 GRPC_PORT=0 METRICS_HOST=127.0.0.1 METRICS_PORT=0 \
    RATE_LIMIT_MAX_REQUESTS=1000000000 "$BUILD/paymentd" --port-file "$DIR/port" \
    >"$DIR/paymentd.log" 2>&1 &
  PD_PID=$!
  for _ in $(seq 1 300); do
    [[ -s $DIR/port ]] && break
    kill -0 "$PD_PID" 2>/dev/null || fail "paymentd exited before listening"
    sleep 0.1
  done
  [[ -s $DIR/port ]] || fail "paymentd wrote no port within 30 s"
  ADDR=127.0.0.1:$(cat "$DIR/port")
}

DIR=$(mktemp -d /tmp/pay-test-bench.XXXXXX)
"$STACK" up "$DIR" >/dev/null 2>&1 || fail "stack.sh up failed"
eval "$("$STACK" env "$DIR")"
"$CTL" migrate >/dev/null || fail "paymentctl migrate failed"
"$CTL" account open b-payer --currency USD >/dev/null || fail "account open b-payer"
"$CTL" account open b-payee --currency USD >/dev/null || fail "account open b-payee"
"$CTL" account fund b-payer 100000000000 >/dev/null || fail "account fund b-payer"
start_paymentd
ok "stack, accounts and paymentd at $ADDR"

if [[ $WHAT == smoke ]]; then
  bench 0 --addr "$ADDR" --payer b-payer --payee b-payee --amount 100 --concurrency 16 \
    --duration 5 --strict --json "$DIR/smoke.json"
  echo "$OUT"
  json_check "$DIR/smoke.json" authorize 'j["payment_status"]["AUTHORIZED"] > 0' \
    'j["errors"] == 0' 'j["bad_responses"] == 0' 'j["verify"]["performed"] and j["verify"]["ok"]' \
    'j["exit_code"] == 0'
  grep -Eq '^verify: payer balance delta -[0-9]+ == -[0-9]+ AUTHORIZED x 100; payee delta \+[0-9]+: OK$' <<<"$OUT" ||
    fail "no holding verification line"
  n=$(sed -n 's/^verify: payer balance delta -\([0-9]*\)00 == -\([0-9]*\) AUTHORIZED.*/\1 \2/p' <<<"$OUT")
  read -r cents count <<<"$n"
  [[ -n $cents && $cents == "$count" ]] || fail "verify line arithmetic: $n"
  # The server's own ledger agrees: exactly the AUTHORIZED count moved out of the payer.
  bal=$("$CTL" account show b-payer | sed -n 's/^balance_cents: //p')
  [[ $bal == $((100000000000 - count * 100)) ]] || fail "payer balance $bal after $count payments of 100"
  "$CTL" ledger check >/dev/null || fail "ledger check failed after the smoke"
  ok "5 s smoke: $count AUTHORIZED, no RPC error, verification holds, ledger check OK"
  exit 0
fi
[[ $WHAT == harness ]] || fail "unknown scenario \"$WHAT\" (harness or smoke)"

# ---- flags ---------------------------------------------------------------------------
bench 2 --mode nope
has 'payment-bench: --mode: "nope" is not authorize, balance, get or health'
bench 2 --payer a
has "payment-bench: --mode authorize needs --payer and --payee, or --accounts N"
bench 2 --payer a --payee a
has 'payment-bench: --payer and --payee are the same account "a"'
bench 2 --mode health --concurrency 0
has "payment-bench: --concurrency: 0 is not in 1..100000"
bench 2 --mode health --duration abc
has 'payment-bench: --duration: "abc" is not a number'
bench 2 --accounts 1
has "payment-bench: --accounts: 1 is not in 2..10000000"
bench 2 --payer 'bad id' --payee b
has 'payment-bench: --payer: "bad id" is not an account id'
bench 2 --payer a --payee b --currency usd
has 'payment-bench: --currency: "usd" is not three capital letters'
bench 2 --mode health --bogus
has 'payment-bench: unknown flag "--bogus"'
bench 2 --mode get
has "payment-bench: --mode get needs --payment-id"
bench 0 --help
has "--rate R"
ok "bad flags exit 2 with precise messages"

# ---- health --------------------------------------------------------------------------
bench 0 --addr "$ADDR" --mode health --concurrency 8 --duration 2 --json "$DIR/health.json"
has "health status: UNKNOWN=0 SERVING="
json_check "$DIR/health.json" health 'j["ok"] > 0' 'j["errors"] == 0' \
  'j["health_status"]["SERVING"] == j["ok"]' 'j["exit_code"] == 0' 'not j["verify"]["performed"]'
ok "health: $(sed -n 's/^requests: \([0-9]*\).*/\1/p' <<<"$OUT") checks, no errors, JSON complete and consistent"

# ---- authorize, one pair -------------------------------------------------------------
bench 0 --addr "$ADDR" --payer b-payer --payee b-payee --amount 7 --concurrency 16 --duration 2 \
  --warmup 0.5 --json "$DIR/auth.json"
json_check "$DIR/auth.json" authorize 'j["exit_code"] == 0' 'j["requests"] > 0' \
  'j["payment_status"]["AUTHORIZED"] > 0' 'j["verify"]["performed"] and j["verify"]["ok"]' \
  'j["warmup_requests"] > 0' 'j["verify"]["authorized_total"] >= j["payment_status"]["AUTHORIZED"]'
grep -Eq '^verify: payer balance delta -[0-9]+ == -[0-9]+ AUTHORIZED x 7; payee delta \+[0-9]+: OK$' <<<"$OUT" ||
  fail "no holding verification line:"$'\n'"$OUT"
ok "authorize: AUTHORIZED > 0, counters consistent, verification holds"

# ---- unknown outcomes: calls cut off by a 1 ms deadline are resolved by retrying their keys
bench 0 --addr "$ADDR" --payer b-payer --payee b-payee --amount 5 --concurrency 32 --duration 0.3 \
  --deadline-ms 1 --json "$DIR/deadline.json"
json_check "$DIR/deadline.json" authorize 'j["grpc_status"].get("DEADLINE_EXCEEDED", 0) > 0' \
  'j["unknown_outcomes"]["unresolved"] == 0' \
  'j["unknown_outcomes"]["resolved_authorized"] + j["unknown_outcomes"]["resolved_not_authorized"] == j["grpc_status"]["DEADLINE_EXCEEDED"]' \
  'j["verify"]["authorized_total"] == j["payment_status"]["AUTHORIZED"] + j["unknown_outcomes"]["resolved_authorized"]' \
  'j["verify"]["ok"]'
has "AUTHORIZED x 5; payee delta +"
ok "calls cut off by their deadline are resolved by key; the verification stays exact"

# ---- open loop: every due request is sent or reported unsent ----------------------------
bench 0 --addr "$ADDR" --mode health --rate 200 --duration 2 --concurrency 4 --json "$DIR/rate.json"
has "(from intended send time)"
json_check "$DIR/rate.json" health 'j["open_loop"]' 'j["requests"] + j["unsent"] == 400' \
  'j["errors"] == 0'
ok "open loop at 200/s for 2 s: sent + unsent == 400"

# ---- spread, get, balance, a failing verification --------------------------------------
psql -q -X -v ON_ERROR_STOP=1 -v prefix=s- -v n=50 -v fund=1000000 \
  -f "$SRC/bench/setup_accounts.sql" "$DATABASE_URL" >/dev/null || fail "setup_accounts.sql failed"
bal=$("$CTL" account show s-49 | sed -n 's/^balance_cents: //p')
[[ $bal == 1000000 ]] || fail "s-49 balance after setup_accounts.sql: $bal"
bench 0 --addr "$ADDR" --accounts 50 --account-prefix s- --amount 3 --concurrency 16 --duration 2 \
  --strict --json "$DIR/spread.json"
grep -Eq '^verify: 50 account balance deltas == the [0-9]+ AUTHORIZED x 3 replies \(moved [0-9]+, .* sum 0\): OK$' <<<"$OUT" ||
  fail "no holding spread verification line:"$'\n'"$OUT"
json_check "$DIR/spread.json" authorize 'j["accounts"] == 50' 'j["payment_status"]["AUTHORIZED"] > 0' \
  'j["errors"] == 0' 'j["verify"]["ok"]'
"$CTL" ledger check >/dev/null || fail "ledger check after the spread run"
ok "spread over 50 accounts from setup_accounts.sql: per-account verification holds, ledger check OK"

bench 0 --addr "$ADDR" --mode get --payer b-payer --payee b-payee --seed-payments 4 --duration 1 \
  --strict --json "$DIR/get.json"
has "get: reading 4 payment ids"
json_check "$DIR/get.json" get 'j["ok"] > 0' 'j["errors"] == 0'
bench 0 --addr "$ADDR" --mode balance --payer b-payer --duration 1 --strict --json "$DIR/bal.json"
json_check "$DIR/bal.json" balance 'j["ok"] > 0' 'j["errors"] == 0'
bench 3 --addr "$ADDR" --mode get --payment-id 00000000000000000000000000 --duration 0.3 --strict
has "grpc status: NOT_FOUND="
ok "get and balance modes; --strict turns NOT_FOUND replies into exit 3"

# A verification that must fail: another client (a funding) moves the payer during the run.
( sleep 0.5; "$CTL" account fund b-payer 12345 >/dev/null ) &
FUND_PID=$!
bench 1 --addr "$ADDR" --payer b-payer --payee b-payee --amount 1 --concurrency 4 --duration 1.5
wait "$FUND_PID" || fail "paymentctl account fund during the run failed"
grep -Eq '^verify: payer balance delta -?[0-9]+ != -[0-9]+ AUTHORIZED x 1; payee delta .*: FAILED$' <<<"$OUT" ||
  fail "the verification did not catch a foreign balance change:"$'\n'"$OUT"
ok "a foreign balance change fails the verification (exit 1)"
