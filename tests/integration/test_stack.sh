#!/usr/bin/env bash
# Integration tests of the local dependency stack (scripts/stack.sh) and of kafka-devbroker.
#
# Usage: test_stack.sh stack|devbroker   (env: PAY_SOURCE_DIR, PAY_BUILD_DIR)
#   stack      two stacks side by side, started at the same time: each PostgreSQL, Redis and
#              devbroker is its own; durable settings; drills; `up` twice is a no-op; `down`
#              of one leaves the other working and none of its own processes; a failed `up`
#              stops what it started.
#   devbroker  kafka-devbroker's flags, bootstrap file, topics, signals, idle CPU, exit.
# Everything runs in a temporary directory, removed (and every server stopped) on exit,
# whether the test passes or fails.
set -uo pipefail

SRC=${PAY_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
BUILD=${PAY_BUILD_DIR:-$SRC/build}
STACK=$SRC/scripts/stack.sh
DEVBROKER=$BUILD/kafka-devbroker
MODE=${1:-stack}

T=
STACK_DIRS=()
CHILD_PIDS=()
CHECKS=0

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

ok() {
  CHECKS=$((CHECKS + 1))
  echo "ok $CHECKS - $*"
}

# expect_eq ACTUAL EXPECTED WHAT
expect_eq() {
  [[ $1 == "$2" ]] || fail "$3: expected \"$2\", got \"$1\""
  ok "$3"
}

# expect_match ACTUAL REGEX WHAT
expect_match() {
  [[ $1 =~ $2 ]] || fail "$3: \"$1\" does not match /$2/"
  ok "$3"
}

cleanup() {
  local rc=$? d p
  trap - EXIT
  for p in "${CHILD_PIDS[@]}"; do
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  for d in "${STACK_DIRS[@]}"; do
    if ((rc != 0)) && [[ -d $d ]]; then
      echo "---- $d (after failure)" >&2
      for f in "$d"/*.log; do
        [[ -f $f ]] && { echo "-- $f" >&2; tail -n 15 "$f" >&2; }
      done
    fi
    [[ -d $d ]] && "$STACK" down "$d" >/dev/null 2>&1
  done
  [[ -n $T && -d $T ]] && rm -rf -- "$T"
  if ((rc == 0)); then echo "PASS: $CHECKS checks"; else echo "FAIL (exit $rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || fail "required tool \"$t\" is not installed (scripts/bootstrap.sh)"
  done
  [[ -x $DEVBROKER ]] || fail "kafka-devbroker is not built at $DEVBROKER"
}

# gone PID: the process no longer exists (a zombie awaiting its reaper counts as gone).
gone() {
  local st
  st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 0
  [[ ${st%% *} == Z ]]
}

# wait_for SECONDS CMD...: poll CMD every 50 ms until it succeeds; 1 on timeout.
wait_for() {
  local _wf_n=$(($1 * 20)) _wf_i
  shift
  for ((_wf_i = 0; _wf_i < _wf_n; _wf_i++)); do
    "$@" && return 0
    sleep 0.05
  done
  return 1
}

# procs_referencing PATH...: pids (other than this script's) whose command line, working
# directory or an open file mentions one of the paths. One grep and one find, no fork per pid.
procs_referencing() {
  local p pats=() lnames=()
  for p in "$@"; do
    pats+=(-e "$p")
    ((${#lnames[@]})) && lnames+=(-o)
    lnames+=(-lname "$p" -o -lname "$p/*")
  done
  {
    grep -alF "${pats[@]}" /proc/[0-9]*/cmdline 2>/dev/null
    find /proc/[0-9]*/cwd /proc/[0-9]*/fd -maxdepth 1 \( "${lnames[@]}" \) -print 2>/dev/null
  } | cut -d/ -f3 | sort -un | grep -vx -e "$$" || true
}

# ---------------------------------------------------------------------------------------------
# stack
# ---------------------------------------------------------------------------------------------

# load_env DIR: sets DB_URL, REDIS_URL_, KAFKA_ (the stack's env file, evaluated in a subshell).
load_env() {
  local out
  out=$("$STACK" env "$1") || fail "stack.sh env $1 failed"
  DB_URL=$(eval "$out"; echo "$DATABASE_URL")
  # shellcheck disable=SC2153 # REDIS_URL comes from the evaluated env lines
  REDIS_URL_=$(eval "$out"; echo "$REDIS_URL")
  KAFKA_=$(eval "$out"; echo "$KAFKA_BROKERS")
  STACKDIR_=$(eval "$out"; echo "$PAY_STACK_DIR")
}

q() { # q URL SQL: one value
  PGCONNECT_TIMEOUT=5 psql "$1" -XAtq -v ON_ERROR_STOP=1 -c "$2"
}

port_of() { # port_of URL-WITHOUT-PATH
  echo "${1##*:}"
}

kafka_log_count() { # kafka_log_count DIR WORD: how many "broker(s) WORD" lines it logged
  grep -c "broker(s) $2\$" "$1/kafka.log"
}

log_count_above() { # log_count_above DIR WORD N
  (($(kafka_log_count "$1" "$2") > $3))
}

check_stack_alive() { # check_stack_alive NAME DIR: all three servers of the stack answer
  local name=$1 dir=$2
  load_env "$dir"
  expect_eq "$(q "$DB_URL" 'SELECT 1')" 1 "$name: PostgreSQL answers"
  expect_eq "$(redis-cli -u "$REDIS_URL_" ping)" PONG "$name: Redis answers"
  kcat -L -b "$KAFKA_" -m 5 >"$T/kcat.out" 2>&1 || fail "$name: kcat -L -b $KAFKA_ failed: $(cat "$T/kcat.out")"
  grep -qx "  broker 1 at $KAFKA_" "$T/kcat.out" || fail "$name: kcat -L output lacks broker 1 at $KAFKA_"
  ok "$name: kcat -L reaches the devbroker at $KAFKA_"
}

# check_down NAME DIR PGBASE PIDS...: after `down`, nothing of that stack is left.
check_down() {
  local name=$1 dir=$2 pgbase=$3 pid left
  shift 3
  for pid in "$@"; do
    wait_for 5 gone "$pid" || fail "$name: pid $pid still runs after down"
  done
  ok "$name: its PostgreSQL, Redis and devbroker pids ($*) are gone"
  left=$(procs_referencing "$dir" "$pgbase" | tr '\n' ' ')
  [[ -z $left ]] || fail "$name: processes still reference $dir or $pgbase: $left"
  ok "$name: no process references $dir or $pgbase"
  [[ ! -e $pgbase ]] || fail "$name: PostgreSQL directory $pgbase was not removed"
  ok "$name: PostgreSQL directory removed"
  "$STACK" env "$dir" >/dev/null 2>&1 && fail "$name: stack.sh env still succeeds after down"
  ok "$name: env fails after down"
  "$STACK" status "$dir" >/dev/null 2>&1
  expect_eq "$?" 3 "$name: status exits 3 after down"
}

test_stack() {
  need psql redis-cli kcat
  T=$(mktemp -d) # mode 0700: PostgreSQL (running as postgres) cannot reach anything in it
  local A=$T/a B=$T/b
  STACK_DIRS=("$A" "$B")

  # --- two stacks started at the same time ---
  local t0=$SECONDS pa pb
  "$STACK" up "$A" >"$T/up-a.log" 2>&1 &
  pa=$!
  "$STACK" up "$B" >"$T/up-b.log" 2>&1 &
  pb=$!
  wait "$pa" || fail "stack.sh up A failed: $(cat "$T/up-a.log")"
  wait "$pb" || fail "stack.sh up B failed: $(cat "$T/up-b.log")"
  ok "two stacks came up concurrently in $((SECONDS - t0)) s"

  local dbA dbB rA rB kA kB
  load_env "$A"
  dbA=$DB_URL rA=$REDIS_URL_ kA=$KAFKA_
  expect_match "$dbA" '^postgresql://payment:payment@127\.0\.0\.1:[0-9]+/payment_db$' "A: DATABASE_URL"
  expect_match "$rA" '^redis://127\.0\.0\.1:[0-9]+/0$' "A: REDIS_URL"
  expect_match "$kA" '^127\.0\.0\.1:[0-9]+$' "A: KAFKA_BROKERS"
  expect_eq "$STACKDIR_" "$(cd "$A" && pwd -P)" "A: PAY_STACK_DIR"
  load_env "$B"
  dbB=$DB_URL rB=$REDIS_URL_ kB=$KAFKA_
  expect_match "$dbB" '^postgresql://payment:payment@127\.0\.0\.1:[0-9]+/payment_db$' "B: DATABASE_URL"
  expect_match "$rB" '^redis://127\.0\.0\.1:[0-9]+/0$' "B: REDIS_URL"
  expect_match "$kB" '^127\.0\.0\.1:[0-9]+$' "B: KAFKA_BROKERS"

  local ports
  ports=$(printf '%s\n' "$(port_of "${dbA%/payment_db}")" "$(port_of "${dbB%/payment_db}")" \
    "$(port_of "${rA%/0}")" "$(port_of "${rB%/0}")" "${kA##*:}" "${kB##*:}")
  expect_eq "$(sort -u <<<"$ports" | wc -l)" 6 "six distinct ports ($(tr '\n' ' ' <<<"$ports"))"
  grep -qxE '5432|6379|9092' <<<"$ports" && fail "a default port is used: $ports"
  ok "no default port (5432/6379/9092)"

  # --- PostgreSQL: each its own, durable, loopback only ---
  local baseA baseB
  baseA=$(cat "$A/pg.base") baseB=$(cat "$B/pg.base")
  expect_eq "$(q "$dbA" 'SHOW data_directory')" "$baseA/data" "A: SHOW data_directory is A's own"
  expect_eq "$(q "$dbB" 'SHOW data_directory')" "$baseB/data" "B: SHOW data_directory is B's own"
  [[ $baseA != "$baseB" ]] || fail "both stacks share $baseA"
  ok "the two data directories differ"
  [[ $baseA != "$T"/* ]] || fail "A's PostgreSQL data is inside DIR's unreachable parent: $baseA"
  ok "PostgreSQL data lives outside DIR ($baseA)"
  if [[ $(id -u) -eq 0 ]]; then
    expect_eq "$(stat -c %U "$baseA/data")" postgres "A: data directory owned by postgres"
  fi
  local s
  for s in fsync synchronous_commit full_page_writes; do
    expect_eq "$(q "$dbA" "SHOW $s")" on "A: $s"
    expect_eq "$(q "$dbB" "SHOW $s")" on "B: $s"
  done
  expect_eq "$(q "$dbA" 'SHOW listen_addresses')" 127.0.0.1 "A: listen_addresses"
  expect_eq "$(q "$dbA" 'SHOW min_wal_size')" 1GB "A: min_wal_size (used segments kept for reuse)"
  expect_eq "$(q "$dbA" 'SHOW max_wal_size')" 4GB "A: max_wal_size"
  # pg-prewarm-wal: the WAL moves on by at least that many segments, the server stays up
  local lsn0 lsn1
  lsn0=$(q "$dbA" 'SELECT pg_current_wal_lsn()')
  PAY_PREWARM_WAL_SEGMENTS=3 "$STACK" pg-prewarm-wal "$A" 2>/dev/null || fail "pg-prewarm-wal A failed"
  lsn1=$(q "$dbA" 'SELECT pg_current_wal_lsn()')
  expect_eq "$(q "$dbA" "SELECT floor(pg_wal_lsn_diff('$lsn1', '0/0') / 16777216)
    - floor(pg_wal_lsn_diff('$lsn0', '0/0') / 16777216) >= 3")" t \
    "pg-prewarm-wal: A's WAL moved on by 3 segments ($lsn0 -> $lsn1)"
  PAY_PREWARM_WAL_SEGMENTS=x "$STACK" pg-prewarm-wal "$A" 2>/dev/null &&
    fail "pg-prewarm-wal accepted a segment count of x"
  ok "pg-prewarm-wal refuses a segment count that is not a number"
  expect_eq "$(q "$dbA" 'SELECT current_user || current_database()')" paymentpayment_db \
    "A: connected as payment to payment_db"
  # shellcheck disable=SC2016 # $$...$$ is SQL dollar quoting
  q "$dbA" 'CREATE TABLE stack_probe (v text); INSERT INTO stack_probe VALUES ($$from-a$$)' ||
    fail "A: cannot create a table as payment"
  expect_eq "$(q "$dbA" 'SELECT v FROM stack_probe')" from-a "A: row written"
  expect_eq "$(q "$dbB" "SELECT to_regclass('stack_probe') IS NULL")" t "B does not see A's table"

  # --- Redis: each its own ---
  expect_eq "$(redis-cli -u "$rA" set stack:probe value-a)" OK "A: Redis SET"
  expect_eq "$(redis-cli -u "$rA" get stack:probe)" value-a "A: Redis GET"
  expect_eq "$(redis-cli -u "$rB" get stack:probe)" "" "B: Redis does not see A's key"
  expect_eq "$(redis-cli -u "$rB" set stack:probe value-b)" OK "B: Redis SET"
  expect_eq "$(redis-cli -u "$rA" get stack:probe)" value-a "A: keeps its own value"
  expect_eq "$(redis-cli -u "$rA" info server | tr -d '\r' | sed -n 's/^process_id://p')" \
    "$(cat "$A/redis.pid")" "A: REDIS_URL reaches A's recorded Redis process"
  expect_eq "$(redis-cli -u "$rA" config get bind | tail -n 1)" 127.0.0.1 "A: Redis bound to loopback"
  expect_eq "$(redis-cli -u "$rA" config get save | tail -n 1)" "" "A: Redis keeps no snapshots"

  # --- Kafka: each devbroker reachable ---
  check_stack_alive A "$A"
  check_stack_alive B "$B"

  # --- up twice is a no-op ---
  local snap_before snap_after out
  snap_before="$(cat "$B/env") $(head -n 1 "$(cat "$B/pg.base")/data/postmaster.pid") $(cat "$B/redis.pid") $(cat "$B/kafka.pid")"
  out=$("$STACK" up "$B" 2>&1) || fail "second up of B failed: $out"
  snap_after="$(cat "$B/env") $(head -n 1 "$(cat "$B/pg.base")/data/postmaster.pid") $(cat "$B/redis.pid") $(cat "$B/kafka.pid")"
  expect_eq "$snap_after" "$snap_before" "second up keeps env and every pid"
  expect_match "$out" "already up" "second up says so"
  expect_eq "$(redis-cli -u "$rB" get stack:probe)" value-b "B: Redis data survives a second up"

  # --- Kafka drill on A: SIGUSR1 refuses produces, SIGUSR2 lets them through ---
  local kpidA n payload t1
  kpidA=$(cat "$A/kafka.pid")
  n=$(kafka_log_count "$A" down)
  kill -USR1 "$kpidA" || fail "cannot signal A's devbroker"
  wait_for 10 log_count_above "$A" down "$n" || fail "A's devbroker did not log its brokers down"
  t1=$SECONDS
  if echo "lost-while-down" | kcat -P -b "$kA" -t stack.drill -X message.timeout.ms=3000 >"$T/kcat.out" 2>&1; then
    fail "a produce succeeded while A's brokers were down"
  fi
  ok "produce fails while A's brokers are down (in $((SECONDS - t1)) s)"
  check_stack_alive "B (while A's Kafka is down)" "$B"
  n=$(kafka_log_count "$A" up)
  kill -USR2 "$kpidA" || fail "cannot signal A's devbroker"
  wait_for 10 log_count_above "$A" up "$n" || fail "A's devbroker did not log its brokers up"
  payload="payment-$RANDOM-$$"
  echo "$payload" | kcat -P -b "$kA" -t stack.drill -X message.timeout.ms=10000 >"$T/kcat.out" 2>&1 ||
    fail "produce after SIGUSR2 failed: $(cat "$T/kcat.out")"
  ok "produce succeeds after SIGUSR2"
  expect_eq "$(kcat -C -b "$kA" -t stack.drill -o beginning -c 1 -e -q 2>/dev/null)" "$payload" \
    "the exact payload is consumed back"
  expect_eq "$(kcat -C -b "$kA" -t stack.drill -o beginning -e -q 2>/dev/null)" "$payload" \
    "the topic holds exactly that one message"

  # --- drill subcommands on B ---
  "$STACK" kafka-down "$B" 2>/dev/null || fail "stack.sh kafka-down B failed"
  kcat -L -b "$kB" -m 2 >/dev/null 2>&1 && fail "kcat -L reached B's devbroker after kafka-down"
  ok "kafka-down: B's devbroker refuses clients"
  "$STACK" kafka-up "$B" 2>/dev/null || fail "stack.sh kafka-up B failed"
  check_stack_alive "B (after kafka-up)" "$B"
  "$STACK" pg-stop "$A" 2>/dev/null || fail "stack.sh pg-stop A failed"
  q "$dbA" 'SELECT 1' >/dev/null 2>&1 && fail "A's PostgreSQL still answers after pg-stop"
  ok "pg-stop: A's PostgreSQL is down"
  expect_eq "$(q "$dbB" 'SELECT 1')" 1 "B's PostgreSQL unaffected by A's pg-stop"
  "$STACK" pg-start "$A" 2>/dev/null || fail "stack.sh pg-start A failed"
  load_env "$A"
  expect_eq "$DB_URL" "$dbA" "pg-start: same port again"
  expect_eq "$(q "$dbA" 'SELECT v FROM stack_probe')" from-a "pg-start: data kept"
  "$STACK" redis-stop "$A" 2>/dev/null || fail "stack.sh redis-stop A failed"
  redis-cli -u "$rA" ping >/dev/null 2>&1 && [[ $(redis-cli -u "$rA" ping 2>/dev/null) == PONG ]] &&
    fail "A's Redis still answers after redis-stop"
  ok "redis-stop: A's Redis is down"
  "$STACK" redis-start "$A" 2>/dev/null || fail "stack.sh redis-start A failed"
  load_env "$A"
  expect_eq "$REDIS_URL_" "$rA" "redis-start: same port again"
  expect_eq "$(redis-cli -u "$rA" ping)" PONG "redis-start: A's Redis answers"

  # --- down A leaves B working and nothing of A behind ---
  local pmA rpA
  pmA=$(head -n 1 "$baseA/data/postmaster.pid") rpA=$(cat "$A/redis.pid") kpidA=$(cat "$A/kafka.pid")
  out=$("$STACK" down "$A" 2>&1) || fail "stack.sh down A failed: $out"
  ok "down A"
  check_down A "$A" "$baseA" "$pmA" "$rpA" "$kpidA"
  check_stack_alive "B (after A is down)" "$B"
  expect_eq "$(redis-cli -u "$rB" get stack:probe)" value-b "B: Redis data intact after A's down"
  out=$("$STACK" down "$A" 2>&1) || fail "second down of A failed: $out"
  ok "down A again is safe"

  local pmB rpB kpB
  pmB=$(head -n 1 "$baseB/data/postmaster.pid") rpB=$(cat "$B/redis.pid") kpB=$(cat "$B/kafka.pid")
  out=$("$STACK" down "$B" 2>&1) || fail "stack.sh down B failed: $out"
  check_down B "$B" "$baseB" "$pmB" "$rpB" "$kpB"

  # --- a failed up stops what it started ---
  local C=$T/c fake=$T/fakebuild
  STACK_DIRS+=("$C")
  mkdir -p "$fake"
  printf '#!/bin/sh\necho "fake devbroker: refusing to start" >&2\nexit 3\n' >"$fake/kafka-devbroker"
  chmod +x "$fake/kafka-devbroker"
  out=$(PAY_BUILD_DIR=$fake "$STACK" up "$C" 2>&1) && fail "up with a failing devbroker succeeded"
  expect_match "$out" "kafka-devbroker exited at start" "failed up names the devbroker"
  expect_match "$out" "fake devbroker: refusing to start" "failed up shows the devbroker's log"
  local left stale
  left=$(procs_referencing "$C" | tr '\n' ' ')
  [[ -z $left ]] || fail "failed up left processes referencing $C: $left"
  ok "failed up left no process behind"
  stale=$(grep -lxF "$(cd "$C" && pwd -P)" "${PAY_STACK_PG_ROOT:-/var/tmp}"/pay-pg.*/.pay-stack-dir 2>/dev/null)
  [[ -z $stale ]] || fail "failed up left a PostgreSQL directory: $stale"
  [[ ! -e $C/pg.base && ! -e $C/env ]] || fail "failed up left state in $C: $(ls -A "$C")"
  ok "failed up removed its PostgreSQL directory and state"

  # --- an up interrupted while Redis starts stops what it had started ---
  local E=$T/e pe rc
  STACK_DIRS+=("$E")
  "$STACK" up "$E" >"$T/up-e.log" 2>&1 &
  pe=$!
  wait_for 60 test -e "$E/redis.log" || fail "interrupted up never reached Redis: $(cat "$T/up-e.log")"
  kill -TERM "$pe"
  wait "$pe"
  rc=$?
  expect_eq "$rc" 130 "SIGTERM during up: exit status 130"
  expect_match "$(cat "$T/up-e.log")" "up failed in $E; stopped what this run had started" \
    "SIGTERM during up: says what it did"
  left=$(procs_referencing "$E" | tr '\n' ' ')
  [[ -z $left ]] || fail "interrupted up left processes referencing $E: $left"
  stale=$(grep -lxF "$(cd "$E" && pwd -P)" "${PAY_STACK_PG_ROOT:-/var/tmp}"/pay-pg.*/.pay-stack-dir 2>/dev/null)
  [[ -z $stale ]] || fail "interrupted up left a PostgreSQL directory: $stale"
  ok "SIGTERM during up: no process and no PostgreSQL directory left"

  out=$(PAY_BUILD_DIR=$T/nobuild "$STACK" up "$T/d" 2>&1) && fail "up without a devbroker succeeded"
  expect_match "$out" "kafka-devbroker not found at $T/nobuild/kafka-devbroker" "missing devbroker is named"
  [[ ! -e $T/d/pg.base ]] || fail "up without a devbroker started PostgreSQL anyway"
  ok "missing devbroker: nothing started"

  # --- usage errors ---
  out=$("$STACK" frobnicate "$T/x" 2>&1) && fail "unknown command accepted"
  expect_match "$out" 'unknown command "frobnicate"' "unknown command is an error"
  out=$("$STACK" env "$T/never" 2>&1) && fail "env of a stack never up succeeded"
  expect_match "$out" "no stack is up in $T/never" "env without a stack is an error"
  out=$("$STACK" down "$T/never" 2>&1) || fail "down of a stack never up failed: $out"
  ok "down without a stack is a no-op"
  out=$("$STACK" kafka-down "$T/never" 2>&1) && fail "kafka-down without a stack succeeded"
  ok "kafka-down without a stack is an error"
}

# ---------------------------------------------------------------------------------------------
# devbroker
# ---------------------------------------------------------------------------------------------

# expect_usage_error EXPECTED_MESSAGE ARGS...: exit 2 with exactly that message.
expect_usage_error() {
  local want=$1 out rc
  shift
  out=$("$DEVBROKER" "$@" 2>&1)
  rc=$?
  expect_eq "$rc:$out" "2:$want" "kafka-devbroker $* is refused"
}

# start_devbroker NAME ARGS...: starts it with --bootstrap-file $T/NAME.bs; sets DB_PID, DB_BS.
start_devbroker() {
  local name=$1
  shift
  "$DEVBROKER" --bootstrap-file "$T/$name.bs" "$@" 2>"$T/$name.log" &
  DB_PID=$!
  CHILD_PIDS+=("$DB_PID")
  wait_for 10 test -s "$T/$name.bs" || fail "$name: no bootstrap file after 10 s: $(cat "$T/$name.log")"
  DB_BS=$(cat "$T/$name.bs")
}

test_devbroker() {
  need kcat
  T=$(mktemp -d)
  local out rc

  out=$("$DEVBROKER" --help) || fail "--help failed"
  expect_match "$out" "--bootstrap-file FILE" "--help lists --bootstrap-file"
  expect_match "$out" "SIGUSR1" "--help documents the signals"
  expect_usage_error 'kafka-devbroker: --brokers: "0" is not an integer in 1..16' --brokers 0
  expect_usage_error 'kafka-devbroker: --brokers: "2x" is not an integer in 1..16' --brokers 2x
  expect_usage_error 'kafka-devbroker: unknown option "--bogus" (see --help)' --bogus
  expect_usage_error 'kafka-devbroker: option --brokers needs a value (see --help)' --brokers
  expect_usage_error 'kafka-devbroker: option --help takes no value (see --help)' --help=1
  expect_usage_error 'kafka-devbroker: unexpected argument "extra" (see --help)' extra
  expect_usage_error 'kafka-devbroker: --topic: "a b" is not a Kafka topic name (1..249 of [A-Za-z0-9._-])' --topic 'a b'
  expect_usage_error "kafka-devbroker: --partitions applies to topics named with --topic; librdkafka 2.0.2's mock gives auto-created topics 4 partitions and cannot be told otherwise" --partitions 3
  out=$("$DEVBROKER" --bootstrap-file "$T/no/such/dir/bs" 2>&1)
  rc=$?
  expect_eq "$rc" 1 "unwritable bootstrap file: exit 1"
  expect_match "$out" "writing bootstrap file $T/no/such/dir/bs: No such file or directory" \
    "unwritable bootstrap file is named"

  # --- three brokers, one pre-created topic ---
  start_devbroker multi --brokers 3 --topic orders.v1 --partitions 7
  local pid=$DB_PID bs=$DB_BS
  expect_match "$bs" '^127\.0\.0\.1:[0-9]+,127\.0\.0\.1:[0-9]+,127\.0\.0\.1:[0-9]+$' "bootstrap file lists 3 loopback brokers"
  expect_eq "$(wc -c <"$T/multi.bs")" "${#bs}" "bootstrap file has no trailing newline"
  expect_eq "$(find "$T" -name '*.tmp.*' | wc -l)" 0 "no temporary bootstrap file left"
  expect_eq "$(head -n 1 "$T/multi.log")" "kafka-devbroker: listening on $bs (brokers=3, pid=$pid)" \
    "start line on stderr"
  kcat -L -b "$bs" -m 5 >"$T/kcat.out" 2>&1 || fail "kcat -L failed: $(cat "$T/kcat.out")"
  expect_eq "$(grep -c '^  broker [0-9] at 127\.0\.0\.1:' "$T/kcat.out")" 3 "kcat -L sees 3 brokers"
  kcat -L -b "$bs" -m 5 -t orders.v1 >"$T/kcat.out" 2>&1 || fail "kcat -L -t failed"
  expect_eq "$(grep -c '^  topic "orders.v1" with 7 partitions:' "$T/kcat.out")" 1 "--topic created with 7 partitions"
  echo first | kcat -P -b "$bs" -t auto.topic >"$T/kcat.out" 2>&1 || fail "produce to an auto-created topic failed: $(cat "$T/kcat.out")"
  kcat -L -b "$bs" -m 5 -t auto.topic >"$T/kcat.out" 2>&1 || fail "kcat -L -t auto.topic failed"
  expect_eq "$(grep -c '^  topic "auto.topic" with 4 partitions:' "$T/kcat.out")" 1 "auto-created topic has 4 partitions"

  # --- idle: ~0 CPU ---
  local t0 t1
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  sleep 3
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  ((t1 - t0 < 15)) || fail "idle devbroker used $((t1 - t0)) clock ticks in 3 s (bound: < 15, i.e. 5% of a core)"
  ok "idle devbroker used $((t1 - t0)) clock ticks in 3 s"

  # --- SIGUSR1 / SIGUSR2 ---
  kill -USR1 "$pid"
  wait_for 10 grep -qx 'kafka-devbroker: 3 broker(s) down' "$T/multi.log" || fail "no 'down' line after SIGUSR1"
  ok "SIGUSR1 logged"
  kcat -L -b "$bs" -m 2 >/dev/null 2>&1 && fail "kcat -L succeeded while every broker is down"
  ok "brokers refuse clients after SIGUSR1"
  kill -USR2 "$pid"
  wait_for 10 grep -qx 'kafka-devbroker: 3 broker(s) up' "$T/multi.log" || fail "no 'up' line after SIGUSR2"
  expect_eq "$(kcat -C -b "$bs" -t auto.topic -o beginning -e -q 2>/dev/null)" first \
    "after SIGUSR2 the earlier message is still there"

  # --- SIGTERM: exit 0, bootstrap file removed ---
  kill -TERM "$pid"
  wait "$pid"
  expect_eq "$?" 0 "SIGTERM: exit status 0"
  [[ ! -e $T/multi.bs ]] || fail "bootstrap file left after SIGTERM"
  ok "SIGTERM: bootstrap file removed"
  expect_eq "$(tail -n 1 "$T/multi.log")" "kafka-devbroker: Terminated, exiting" "SIGTERM logged"

  # --- SIGINT: exit 0 ---
  start_devbroker single
  pid=$DB_PID
  expect_match "$DB_BS" '^127\.0\.0\.1:[0-9]+$' "default: one broker"
  kill -INT "$pid"
  wait "$pid"
  expect_eq "$?" 0 "SIGINT: exit status 0"
  [[ ! -e $T/single.bs ]] || fail "bootstrap file left after SIGINT"
  ok "SIGINT: bootstrap file removed"
}

case $MODE in
  stack) test_stack ;;
  devbroker) test_devbroker ;;
  *) fail "unknown mode \"$MODE\" (stack or devbroker)" ;;
esac
