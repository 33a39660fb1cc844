#!/usr/bin/env bash
# ratelimit_bench: rate-limit checks per second through paymentd's ratelimit actor, against
# redis-benchmark running the very same Lua script (EVALSHA, same key, limit, window and
# unique members) on the same machine and the same Redis. Prints both and their ratio.
#
# Usage: bench/ratelimit_bench.sh [BUILD_DIR]      (default: <repo>/build)
# Environment: REQUESTS (default 200000), H2LOAD_ARGS (default "-c 8 -m 32 -t 1"),
#              BENCH_CLIENTS (redis-benchmark -c, default 50).
#
# Through the actor: h2load drives GetAccountBalance (one peer = one bucket, the hot-key
# case) at paymentd with RATE_LIMIT_MAX_REQUESTS=1000000000 and a 1 s window, so every
# request is one allowed check (a ZADD into a set of ~one window of members). Checks are
# counted by Redis itself (INFO commandstats, cmdstat_evalsha). paymentd runs without a
# database (DATABASE_URL points at a closed port), so the ledger answers UNAVAILABLE at once:
# what is measured is gRPC + the limiter. A run with the limiter off gives the gRPC ceiling.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
BUILD=${1:-$REPO/build}
REQUESTS=${REQUESTS:-200000}
H2LOAD_ARGS=${H2LOAD_ARGS:--c 8 -m 32 -t 1}
BENCH_CLIENTS=${BENCH_CLIENTS:-50}

for t in redis-server redis-cli redis-benchmark h2load "$BUILD/paymentd"; do
  command -v "$t" >/dev/null || [[ -x $t ]] || {
    echo "ratelimit_bench: missing $t" >&2
    exit 1
  }
done

TMP=$(mktemp -d /tmp/pay-rl-bench.XXXXXX)
REDIS_PID='' PD_PID=''
cleanup() {
  [[ -n $PD_PID ]] && kill "$PD_PID" 2>/dev/null && wait "$PD_PID" 2>/dev/null
  [[ -n $REDIS_PID ]] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || {
      echo "$p"
      return
    }
  done
  echo "ratelimit_bench: no free port" >&2
  exit 1
}

RPORT=$(free_port)
mkdir -p "$TMP/redis"
redis-server --bind 127.0.0.1 --port "$RPORT" --save '' --appendonly no --dir "$TMP/redis" \
  >"$TMP/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 100); do
  [[ $(redis-cli -p "$RPORT" ping 2>/dev/null) == PONG ]] && break
  sleep 0.05
done
rcli() { redis-cli -p "$RPORT" "$@"; }

# start_paymentd ENABLED: paymentd on a free port, without a database.
start_paymentd() {
  rm -f "$TMP/port"
  RATE_LIMIT_ENABLED=$1 RATE_LIMIT_MAX_REQUESTS=1000000000 RATE_LIMIT_WINDOW_SECONDS=1 \
    RATE_LIMIT_TIMEOUT_MS=1000 REDIS_URL="redis://127.0.0.1:$RPORT/0" \
    DATABASE_URL="postgresql://payment:payment@127.0.0.1:1/payment_db" \
    GRPC_HOST=127.0.0.1 GRPC_PORT=0 METRICS_ENABLED=false LOG_LEVEL=INFO \
    "$BUILD/paymentd" --port-file "$TMP/port" >"$TMP/paymentd-$1.log" 2>&1 &
  PD_PID=$!
  for _ in $(seq 600); do
    [[ -s $TMP/port ]] && break
    sleep 0.05
  done
  [[ -s $TMP/port ]] || {
    cat "$TMP/paymentd-$1.log" >&2
    echo "ratelimit_bench: paymentd did not start" >&2
    exit 1
  }
  PPORT=$(cat "$TMP/port")
}

stop_paymentd() {
  kill "$PD_PID" && wait "$PD_PID" 2>/dev/null || true
  PD_PID=''
}

# gRPC frame of GetAccountBalanceRequest{account_id: "bench-account"}.
printf '\x00\x00\x00\x00\x0f\x0a\x0dbench-account' >"$TMP/body"

# h2load_rps: requests/s of a GetAccountBalance run.
h2load_rps() {
  # shellcheck disable=SC2086
  h2load -n "$REQUESTS" $H2LOAD_ARGS -d "$TMP/body" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$PPORT/payment.v1.PaymentService/GetAccountBalance" >"$TMP/h2load.out"
  grep -q " succeeded, 0 failed, 0 errored" "$TMP/h2load.out" || {
    cat "$TMP/h2load.out" >&2
    echo "ratelimit_bench: h2load reported errors" >&2
    exit 1
  }
  awk '/^finished in/ {gsub(",", "", $4); print $4}' "$TMP/h2load.out"
}

evalsha_calls() {
  rcli INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\).*/\1/p'
}

echo "== gRPC ceiling: limiter off"
start_paymentd false
off_rps=$(h2load_rps)
stop_paymentd
echo "   $off_rps req/s"

echo "== through the ratelimit actor"
start_paymentd true
h2load -n 1000 -c 1 -d "$TMP/body" -H 'content-type: application/grpc' -H 'te: trailers' \
  "http://127.0.0.1:$PPORT/payment.v1.PaymentService/GetAccountBalance" >/dev/null # warm-up
rcli CONFIG RESETSTAT >/dev/null
on_rps=$(h2load_rps)
checks=$(evalsha_calls)
SHA=$(grep -o 'script sha1 [0-9a-f]*' "$TMP/paymentd-true.log" | awk '{print $3}' || true)
stop_paymentd
echo "   $on_rps req/s; Redis counted $checks EVALSHA for $REQUESTS requests"
[[ $checks -eq $REQUESTS ]] || {
  echo "ratelimit_bench: expected $REQUESTS checks in Redis, got $checks" >&2
  exit 1
}
[[ -n $SHA ]] || {
  echo "ratelimit_bench: no script sha1 in the paymentd log (LOG_LEVEL must show INFO of ratelimit)" >&2
  exit 1
}
KEY="ratelimit:all:peer:127.0.0.1"

# rb PIPELINE: EVALSHA/s from redis-benchmark, same script, key, limit, window; unique members.
rb() {
  rcli DEL "$KEY" >/dev/null
  redis-benchmark -p "$RPORT" -c "$BENCH_CLIENTS" -n "$REQUESTS" -P "$1" -r 1000000000000 --csv \
    EVALSHA "$SHA" 1 "$KEY" 1000000000 1000000 "bench:__rand_int__" |
    tail -n 1 | awk -F'","' '{print $2}' | tr -d '"'
}

echo "== redis-benchmark, the same script (EVALSHA $SHA)"
rb1=$(rb 1)
rb16=$(rb 16)
echo "   -P 1: $rb1 req/s   -P 16: $rb16 req/s"

awk -v off="$off_rps" -v on="$on_rps" -v a="$rb1" -v b="$rb16" 'BEGIN {
  printf "\nresult: %.0f checks/s through the actor (gRPC ceiling without limiter %.0f req/s)\n", on, off
  printf "        redis-benchmark EVALSHA: %.0f/s unpipelined, %.0f/s with -P 16\n", a, b
  printf "        ratio actor/redis-benchmark: %.2f (vs -P 1), %.2f (vs -P 16)\n", on / a, on / b
}'
