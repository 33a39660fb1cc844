#!/usr/bin/env bash
# bench/run.sh: paymentd against the SQL of one payment per transaction (issue 5).
#
# Usage: bench/run.sh hot|spread [--duration S] [--concurrency K] [--warmup S]
#                                [--accounts N] [--amount C]
#   hot     one payer -> payee pair (the replaced service's own load test)
#   spread  random distinct pairs over --accounts accounts (default 10000)
#   --duration S     measured seconds of each run (default 10)
#   --concurrency K  pgbench clients and payment-bench calls in flight (default 32)
#   --warmup S       payment-bench warm-up before each paymentd run (default 2)
#   --amount C       cents per payment (default 1)
# Environment: BUILD (build directory, default build; built with `make build` when a binary
# is missing), BENCH_KEEP=1 keeps the temporary directory (logs, JSON) for inspection.
#
# What it does, from a fresh clone: builds if needed; brings up its own stack in a temporary
# directory (scripts/stack.sh, torn down on exit, also on Ctrl-C or failure); migrates;
# opens and funds the accounts for the whole run, so the measurement is of authorizations,
# not declines (hot: paymentctl; spread: bench/setup_accounts.sql, one transaction, because
# 10,000 paymentctl runs take minutes); then, at the same concurrency on the same
# PostgreSQL:
#   0. prewarms PostgreSQL's WAL (scripts/stack.sh pg-prewarm-wal): segments recycled, as
#      on a server that has run a while, instead of created during the measurement;
#   1. pgbench running bench/pgbench_payment.sql (one payment per transaction);
#   2. paymentd (default LEDGER_BATCH_MAX) + payment-bench, closed loop: the peak;
#   3. the same paymentd, open loop at half that peak (--rate): the p99 <= 3 x p50 target;
#   4. paymentd with LEDGER_BATCH_MAX=1 (the correct-first path) + payment-bench.
# Every payment-bench run verifies the balances against its AUTHORIZED replies, and
# `paymentctl ledger check` runs at the end. Prints a table with the ratios to pgbench.
# paymentd runs with the rate limiter on (its real cost is part of the path) but with a
# limit no benchmark reaches (RATE_LIMIT_MAX_REQUESTS=1000000000).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"

die() {
  echo "bench: error: $*" >&2
  exit 1
}
log() { echo "bench: $*" >&2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

MODE=${1:-}
case $MODE in
  hot | spread) shift ;;
  -h | --help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  *) echo "bench: unknown mode \"$MODE\" (expected hot or spread)" >&2; exit 2 ;;
esac
DURATION=10 CONC=32 WARMUP=2 ACCOUNTS=10000 AMOUNT=1
num() { [[ $2 =~ ^[0-9]+$ && $2 -ge $3 ]] || { echo "bench: $1: \"$2\" is not a whole number >= $3" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || { echo "bench: $1 needs a value" >&2; exit 2; }
  case $1 in
    --duration) num "$1" "$2" 1; DURATION=$2 ;;
    --concurrency) num "$1" "$2" 1; CONC=$2 ;;
    --warmup) num "$1" "$2" 0; WARMUP=$2 ;;
    --accounts) num "$1" "$2" 2; ACCOUNTS=$2 ;;
    --amount) num "$1" "$2" 1; AMOUNT=$2 ;;
    *) echo "bench: unknown flag \"$1\" (see bench/run.sh --help)" >&2; exit 2 ;;
  esac
  shift 2
done

BUILD=${BUILD:-build}
[[ $BUILD = /* ]] || BUILD=$REPO/$BUILD
export PAY_BUILD_DIR=$BUILD
command -v pgbench >/dev/null || die "pgbench is missing (Debian package postgresql-15; run scripts/bootstrap.sh)"
command -v psql >/dev/null || die "psql is missing (Debian package postgresql-client-15; run scripts/bootstrap.sh)"
need_build=0
for b in paymentd paymentctl payment-bench kafka-devbroker; do
  [[ -x $BUILD/$b ]] || need_build=1
done
if [[ $need_build == 1 ]]; then
  log "building into $BUILD"
  make -C "$REPO" build BUILD="$BUILD" >&2
fi
for b in paymentd paymentctl payment-bench kafka-devbroker; do
  [[ -x $BUILD/$b ]] || die "$BUILD/$b is missing after the build"
done

DIR=$(mktemp -d /tmp/pay-bench.XXXXXX)
PD_PID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $PD_PID ]] && kill -0 "$PD_PID" 2>/dev/null; then
    kill -TERM "$PD_PID" 2>/dev/null || true
    wait "$PD_PID" 2>/dev/null || true
  fi
  "$REPO/scripts/stack.sh" down "$DIR" >/dev/null 2>&1 || log "stack down in $DIR failed"
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then
    log "kept $DIR"
  else
    rm -rf "$DIR"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "stack in $DIR"
"$REPO/scripts/stack.sh" up "$DIR" >&2
eval "$("$REPO/scripts/stack.sh" env "$DIR")"
CTL=$BUILD/paymentctl
"$CTL" migrate >/dev/null

# Funds: every payment-bench and pgbench payment moves AMOUNT cents; 10^12 cents on the hot
# payer (10^9 on each spread account) outlast any run this machine can do.
if [[ $MODE == hot ]]; then
  PREFIX=hot-
  NACC=2
  "$CTL" account open hot-0 --currency USD >/dev/null
  "$CTL" account open hot-1 --currency USD >/dev/null
  "$CTL" account fund hot-0 1000000000000 >/dev/null
  BENCH_ACCTS=(--payer hot-0 --payee hot-1)
  HOT=1
else
  PREFIX=acct-
  NACC=$ACCOUNTS
  psql -q -X -v ON_ERROR_STOP=1 -v prefix=$PREFIX -v n="$NACC" -v fund=1000000000 \
    -f "$REPO/bench/setup_accounts.sql" "$DATABASE_URL" >/dev/null
  BENCH_ACCTS=(--accounts "$NACC" --account-prefix "$PREFIX")
  HOT=0
fi
log "$MODE: $NACC accounts opened and funded; concurrency $CONC, $DURATION s per run"
# A fresh cluster creates (zero-fills) a new 16 MiB WAL segment every few seconds under this
# load, and every committer waits for it: 30-70 ms stalls that a server which has run a
# while (recycling its segments) does not have. Measure that steady state.
"$REPO/scripts/stack.sh" pg-prewarm-wal "$DIR" >/dev/null 2>&1 || die "prewarming PostgreSQL's WAL failed"

# percentiles FILE...: "p50 p99" (µs) of pgbench's per-transaction log (3rd field, µs).
percentiles() {
  cat "$@" | awk '{print $3}' | sort -n | awk '{v[NR]=$1} END {
    if (NR == 0) { print "0 0"; exit }
    i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999);
    print v[i50], v[i99] }'
}

log "1/4 pgbench ($DURATION s, $CONC clients)"
pgbench -n -f "$REPO/bench/pgbench_payment.sql" -c "$CONC" -j 2 -T "$DURATION" \
  -D prefix=$PREFIX -D naccounts="$NACC" -D hot=$HOT -D amount="$AMOUNT" \
  -l --log-prefix="$DIR/pgblog" "$DATABASE_URL" >"$DIR/pgbench.out" 2>&1 ||
  { cat "$DIR/pgbench.out" >&2; die "pgbench failed"; }
PG_TPS=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$DIR/pgbench.out" | head -1)
PG_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$DIR/pgbench.out")
[[ -n $PG_TPS ]] || { cat "$DIR/pgbench.out" >&2; die "no tps in pgbench's output"; }
read -r PG_P50 PG_P99 < <(percentiles "$DIR"/pgblog.*)

# start_paymentd NAME [ENV=V...]: paymentd on a free port, its port in $PORT.
start_paymentd() {
  local name=$1
  shift
  rm -f "$DIR/$name.port"
  env GRPC_HOST=127.0.0.1 GRPC_PORT=0 METRICS_HOST=127.0.0.1 METRICS_PORT=0 LOG_LEVEL=WARNING \
    RATE_LIMIT_MAX_REQUESTS=1000000000 "$@" \
    "$BUILD/paymentd" --port-file "$DIR/$name.port" >"$DIR/$name.log" 2>&1 &
  PD_PID=$!
  for _ in $(seq 1 300); do
    [[ -s $DIR/$name.port ]] && break
    kill -0 "$PD_PID" 2>/dev/null || { cat "$DIR/$name.log" >&2; die "paymentd ($name) exited"; }
    sleep 0.1
  done
  [[ -s $DIR/$name.port ]] || { cat "$DIR/$name.log" >&2; die "paymentd ($name) wrote no port in 30 s"; }
  PORT=$(cat "$DIR/$name.port")
}
stop_paymentd() {
  kill -TERM "$PD_PID"
  local rc=0
  wait "$PD_PID" || rc=$?
  PD_PID=
  [[ $rc == 0 ]] || log "paymentd exited with status $rc (log: $DIR)"
}
# bench NAME ARGS...: one payment-bench run; its JSON in $DIR/NAME.json; fails on a failed
# verification or RPC errors (--strict).
bench() {
  local name=$1
  shift
  if ! "$BUILD/payment-bench" --addr "127.0.0.1:$PORT" --mode authorize "${BENCH_ACCTS[@]}" \
    --amount "$AMOUNT" --concurrency "$CONC" --duration "$DURATION" --warmup "$WARMUP" \
    --strict --json "$DIR/$name.json" "$@" >"$DIR/$name.out" 2>&1; then
    cat "$DIR/$name.out" >&2
    die "payment-bench ($name) failed"
  fi
  grep '^verify:' "$DIR/$name.out" >&2
}
# field NAME KEY: a number from NAME.json (one key per line, as payment-bench writes it).
field() { sed -n "s/^  \"$2\": \([0-9.]*\),\$/\1/p" "$DIR/$1.json"; }
lat() { sed -n "s/.*\"$2\": \([0-9]*\)[,}].*/\1/p" "$DIR/$1.json" | head -1; }

# PostgreSQL's own maintenance during a run (its log: autovacuum runs, checkpoints), so a
# latency tail can be told from what the database did meanwhile.
PGLOG="$(cat "$DIR/pg.base")/postgres.log"
log_mark() { wc -l <"$PGLOG" 2>/dev/null || echo 0; }
# maintenance FROM_LINE: "N autovacuum, M checkpoint" for the log lines after FROM_LINE.
maintenance() {
  local lines av cp
  lines=$(tail -n +"$(($1 + 1))" "$PGLOG" 2>/dev/null)
  av=$(grep -cE 'automatic (aggressive )?(vacuum|analyze) of table' <<<"$lines")
  cp=$(grep -c 'checkpoint starting' <<<"$lines")
  echo "$av autovacuum, $cp checkpoint"
}

log "2/4 paymentd (LEDGER_BATCH_MAX default) + payment-bench, closed loop"
start_paymentd batch
bench batch
PEAK=$(field batch authorized_per_s)
HALF=$(awk -v p="$PEAK" 'BEGIN { r = p / 2; if (r < 1) r = 1; printf "%.0f", r }')
log "3/4 same paymentd, open loop at half the peak: --rate $HALF"
HALF_MARK=$(log_mark)
bench half --rate "$HALF" --concurrency $((CONC * 4))
HALF_MAINT=$(maintenance "$HALF_MARK")
stop_paymentd

log "4/4 paymentd LEDGER_BATCH_MAX=1 + payment-bench, closed loop"
start_paymentd single LEDGER_BATCH_MAX=1
bench single
stop_paymentd

"$CTL" ledger check >"$DIR/check.out" 2>&1 || { cat "$DIR/check.out" >&2; die "ledger check failed"; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'; }
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=
if git -C "$REPO" status --porcelain 2>/dev/null | grep -q .; then DIRTY=+dirty; fi
echo
echo "bench/run.sh $MODE: $NACC accounts, concurrency $CONC, $DURATION s per run, amount $AMOUNT, commit $COMMIT$DIRTY, $(nproc) cores"
printf '%-34s %12s %10s %10s %9s\n' "" "payments/s" "p50 ms" "p99 ms" "vs pgbench"
printf '%-34s %12.0f %10s %10s %9s\n' "pgbench, 1 payment/transaction" "$PG_TPS" \
  "$(ms "$PG_P50")" "$(ms "$PG_P99")" "1.0x"
for run in batch single; do
  label="paymentd, batched (default)"
  [[ $run == single ]] && label="paymentd, LEDGER_BATCH_MAX=1"
  printf '%-34s %12.0f %10s %10s %9s\n' "$label" "$(field $run authorized_per_s)" \
    "$(ms "$(lat $run p50)")" "$(ms "$(lat $run p99)")" "$(ratio "$(field $run authorized_per_s)" "$PG_TPS")"
done
H50=$(lat half p50) H99=$(lat half p99)
printf '%-34s %12.0f %10s %10s %9s\n' "paymentd, batched, open loop @ $HALF/s" "$(field half authorized_per_s)" \
  "$(ms "$H50")" "$(ms "$H99")" "-"
echo
echo "pgbench: $PG_FAILED failed transactions; p50/p99 from its per-transaction log."
echo "half-peak open loop (latency from the intended send time): p99/p50 = $(ratio "$H99" "$H50") (target <= 3x); $(field half unsent) due requests unsent"
echo "PostgreSQL maintenance during the half-peak run (its log): $HALF_MAINT"
echo "targets: $MODE >= $([[ $MODE == hot ]] && echo 30 || echo 5)x pgbench (batched column)"
cat "$DIR/check.out"
