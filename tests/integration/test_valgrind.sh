#!/usr/bin/env bash
# paymentd's whole start → serve → stop cycle under valgrind (memcheck), against a stack of
# its own: migrations, payments (authorized, declined, duplicate), reads, an invalid request,
# then SIGTERM. Passes when paymentd exits 0 and valgrind reports no memory error and no
# definitely or indirectly lost block.
#
# Env: PAY_SOURCE_DIR, PAY_BUILD_DIR (CTest sets both). Everything it starts lives in a
# temporary directory and is stopped on exit, pass or fail.
set -uo pipefail

SRC=${PAY_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
BUILD=${PAY_BUILD_DIR:-$SRC/build}
export PAY_BUILD_DIR=$BUILD
STACK=$SRC/scripts/stack.sh
DIR=$(mktemp -d /tmp/pay-test-valgrind.XXXXXX)
VG_PID=

fail() {
  echo "FAIL: $*" >&2
  [[ -f $DIR/paymentd.log ]] && { echo "---- paymentd/valgrind log ----" >&2; tail -60 "$DIR/paymentd.log" >&2; }
  exit 1
}
cleanup() {
  [[ -n $VG_PID ]] && kill -KILL "$VG_PID" 2>/dev/null
  "$STACK" down "$DIR/stack" >/dev/null 2>&1
  rm -rf "$DIR"
}
trap cleanup EXIT

command -v valgrind >/dev/null || fail "valgrind is not installed (Debian package valgrind)"
for b in paymentd paymentctl payment-cli; do
  [[ -x $BUILD/$b ]] || fail "$BUILD/$b is not built"
done

"$STACK" up "$DIR/stack" >"$DIR/stack.log" 2>&1 || fail "stack.sh up failed: $(tail -5 "$DIR/stack.log")"
eval "$("$STACK" env "$DIR/stack")"
ctl() { "$BUILD/paymentctl" "$@" >>"$DIR/ctl.log" 2>&1 || fail "paymentctl $* failed: $(tail -3 "$DIR/ctl.log")"; }
ctl migrate
ctl account open vg-payer --currency USD
ctl account open vg-payee --currency USD
ctl account fund vg-payer 1000

GRPC_HOST=127.0.0.1 GRPC_PORT=0 METRICS_PORT=0 LOG_LEVEL=INFO \
  valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=9 \
  "$BUILD/paymentd" --port-file "$DIR/port" >"$DIR/paymentd.log" 2>&1 &
VG_PID=$!
for _ in $(seq 1 1200); do
  [[ -s $DIR/port ]] && break
  kill -0 "$VG_PID" 2>/dev/null || fail "paymentd under valgrind exited before listening"
  sleep 0.1
done
[[ -s $DIR/port ]] || fail "paymentd under valgrind did not listen within 120 s"
ADDR=127.0.0.1:$(cat "$DIR/port")

cli() { "$BUILD/payment-cli" --addr "$ADDR" --timeout 30 "$@"; }
out=$(cli authorize --key vg-1 --payer vg-payer --payee vg-payee --amount 300 --currency USD) ||
  fail "authorize failed: $out"
[[ $out == *PAYMENT_STATUS_AUTHORIZED* ]] || fail "expected AUTHORIZED, got: $out"
out=$(cli authorize --key vg-1 --payer vg-payer --payee vg-payee --amount 300 --currency USD)
[[ $out == *PAYMENT_STATUS_DUPLICATE* ]] || fail "expected DUPLICATE, got: $out"
out=$(cli authorize --key vg-2 --payer vg-payer --payee vg-payee --amount 5000 --currency USD)
[[ $out == *INSUFFICIENT_FUNDS* ]] || fail "expected INSUFFICIENT_FUNDS, got: $out"
out=$(cli authorize --key vg-3 --payer vg-payer --payee vg-payee --amount 1 --currency usd 2>&1) &&
  fail "a lower-case currency was accepted: $out"
[[ $out == *"INVALID_ARGUMENT: currency:"* ]] || fail "expected INVALID_ARGUMENT on currency, got: $out"
out=$(cli balance vg-payer) || fail "balance failed: $out"
[[ $out == *'"available_balance_cents": 700'* ]] || fail "expected balance 700, got: $out"

kill -TERM "$VG_PID"
rc=0
wait "$VG_PID" || rc=$?
VG_PID=
grep -q "ERROR SUMMARY: 0 errors" "$DIR/paymentd.log" || fail "valgrind reported errors"
grep -q "definitely lost: 0 bytes" "$DIR/paymentd.log" ||
  grep -q "All heap blocks were freed" "$DIR/paymentd.log" || fail "valgrind reported lost memory"
[[ $rc -eq 0 ]] || fail "paymentd under valgrind exited $rc (9 = valgrind found errors or leaks)"
echo "test_valgrind: OK (paymentd exit 0, no memory errors, nothing lost)"
