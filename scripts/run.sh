#!/usr/bin/env bash
# `make run`: the local stack (PostgreSQL, Redis, Kafka development broker) under .run/,
# then paymentd in the foreground on 127.0.0.1:50051 (gRPC) and 127.0.0.1:9090 (metrics).
# Ctrl-C stops paymentd and then the stack; nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-.run}
BUILD=${BUILD:-build}
export PAY_BUILD_DIR=$PWD/$BUILD

stack_down() {
  trap - EXIT INT TERM
  echo "run: stopping the local stack" >&2
  scripts/stack.sh down "$RUN_DIR" || true
}
trap stack_down EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/stack.sh up "$RUN_DIR"
eval "$(scripts/stack.sh env "$RUN_DIR")"

export GRPC_HOST=${GRPC_HOST:-127.0.0.1}
export GRPC_PORT=${GRPC_PORT:-50051}
export METRICS_HOST=${METRICS_HOST:-127.0.0.1}
export METRICS_PORT=${METRICS_PORT:-9090}
export LOG_FORMAT=${LOG_FORMAT:-console}

# Demo accounts, idempotently: opened when missing, funded only while they have no ledger
# entry at all (never funded, never used), so a second `make run` never funds them twice.
demo_accounts() {
  local ctl=$BUILD/paymentctl spec id cents entries
  [[ -x $ctl ]] || { echo "run: $ctl is missing (build it first)" >&2; return 1; }
  "$ctl" migrate >&2
  for spec in acc-payer-001:100000 acc-payee-002:50000; do
    id=${spec%%:*} cents=${spec#*:}
    "$ctl" account open "$id" --currency USD >&2
    entries=$("$ctl" account show "$id" | sed -n 's/^entries: //p')
    if [[ $entries == 0 ]]; then
      "$ctl" account fund "$id" "$cents" >/dev/null
      echo "run: funded $id with $cents cents" >&2
    else
      echo "run: $id already funded ($entries ledger entries); not funding again" >&2
    fi
  done
  cat >&2 <<EOF
run: demo accounts acc-payer-001 and acc-payee-002 (USD) are ready. Try, in another terminal:
  $BUILD/payment-cli --addr $GRPC_HOST:$GRPC_PORT authorize --key demo-\$(date +%s) --payer acc-payer-001 --payee acc-payee-002 --amount 1250 --currency USD --description "demo payment"
  $BUILD/payment-cli --addr $GRPC_HOST:$GRPC_PORT balance acc-payer-001
  $BUILD/payment-cli --addr $GRPC_HOST:$GRPC_PORT get-payment PAYMENT_ID
EOF
}

if [[ -x $BUILD/paymentd ]]; then
  demo_accounts
  echo "run: paymentd on $GRPC_HOST:$GRPC_PORT (Ctrl-C stops everything)" >&2
  # Not exec: this shell must outlive paymentd to stop the stack. A background job of a
  # non-interactive shell starts with SIGINT ignored, so the trap below turns this shell's
  # SIGINT/SIGTERM into a SIGTERM for the child.
  "$BUILD/paymentd" &
else
  echo "run: paymentd is not built yet; running the actor demo (Ctrl-C stops everything)" >&2
  "$BUILD/actor-demo" &
fi
child=$!
trap 'kill -TERM $child 2>/dev/null' INT TERM
status=0
wait $child || status=$?
# A signal interrupts the first wait; wait again for the child's own exit.
while kill -0 $child 2>/dev/null; do wait $child || status=$?; done
exit $status
