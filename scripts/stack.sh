#!/usr/bin/env bash
# The local dependency stack: PostgreSQL 15, Redis and the development Kafka broker, each on
# a free 127.0.0.1 port, with their state under DIR (default: <repo>/.run).
#
# Usage: scripts/stack.sh COMMAND [DIR]
#   up           start whatever is not running (no-op when all three are up); write DIR/env
#   down         stop exactly what `up` started in DIR, wait for it to exit and remove the
#                PostgreSQL data directory it created; safe when nothing is up
#   env          print the export lines: eval "$(scripts/stack.sh env DIR)"
#   status       one line per component; exit 0 when all three run, 3 otherwise
#   Drills (for tests and chaos; DIR/env is rewritten if a port has to change):
#   pg-stop      stop PostgreSQL (fast shutdown), keep its data
#   pg-start     start it again, on its old port when that is still free
#   redis-stop   stop Redis (its data is lost: the stack's Redis keeps nothing on disk)
#   redis-start  start it again, on its old port when that is still free
#   kafka-down   SIGUSR1 to the devbroker: every broker down (connections refused)
#   kafka-up     SIGUSR2 to the devbroker: every broker up again (in-memory data kept)
#   Benchmarks:
#   pg-prewarm-wal  fill and recycle PAY_PREWARM_WAL_SEGMENTS (default 64: 1 GiB) WAL
#                segments, so a measurement sees the steady state of a server that has run
#                a while, not a fresh cluster creating (zero-filling) a 16 MiB segment every
#                few seconds while every committer waits (measured: 30-70 ms stalls)
#
# Environment: PAY_BUILD_DIR (where kafka-devbroker is; default <repo>/build),
# PAY_STACK_PG_ROOT (parent of PostgreSQL's own directory; default /var/tmp).
#
# DESIGN
# Ports: random in 20000..31999 (below Linux's ephemeral range, so never one the kernel
# hands out, nor the default 5432/6379/9092), probed first, and a server that still loses
# the race at bind time is restarted on another port (two stacks may start at once).
# PostgreSQL refuses to run as root and needs execute permission on every parent of its
# data, which a checkout under /root or a mktemp -d folder does not give: so its data,
# socket and log live in a directory of its own, $PAY_STACK_PG_ROOT/pay-pg.XXXXXXXX, owned
# by the `postgres` user when we are root; its path is recorded in DIR/pg.base and the
# directory holds a marker naming DIR, checked before anything there is stopped or removed.
# The durable defaults (fsync, synchronous_commit, full_page_writes) are never changed.
# Processes are identified before being signalled: Redis by its working directory
# (DIR/redis), the devbroker by its --bootstrap-file argument (DIR/kafka.bootstrap),
# PostgreSQL through pg_ctl on the recorded data directory. Nothing else is ever touched.
# A flock on DIR/.lock serialises commands on one DIR; servers are started with that fd
# closed so they do not inherit the lock.
#
# Files in DIR: env, .lock, pg.base, pg.port, redis.port, redis.pid, redis.log, redis/,
# kafka.pid, kafka.bootstrap, kafka.log.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PG_BIN=/usr/lib/postgresql/15/bin
PG_ROOT=${PAY_STACK_PG_ROOT:-/var/tmp}
KAFKA_BIN=${PAY_BUILD_DIR:-$REPO/build}/kafka-devbroker
PORT_LO=20000
PORT_SPAN=12000
IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

log() { echo "stack: $*" >&2; }
die() {
  echo "stack: error: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' | sed '/^DESIGN$/,$d'
}

# ---- small helpers ------------------------------------------------------------------------

# put FILE VALUE: write atomically (readers see the old or the new content).
put() {
  printf '%s\n' "$2" >"$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"
}

# get FILE: the file's first line, or nothing.
get() {
  [[ -f $1 ]] || return 1
  local v
  IFS= read -r v <"$1" || [[ -n $v ]] || return 1
  printf '%s' "$v"
}

# alive PID: the process exists and is not a zombie.
alive() {
  [[ $1 =~ ^[0-9]+$ ]] || return 1
  local st
  st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $st && ${st%% *} != Z ]]
}

# wait_gone PID SECONDS: 0 once the process is gone, 1 on timeout.
wait_gone() {
  local i
  for ((i = 0; i < $2 * 20; i++)); do
    alive "$1" || return 0
    sleep 0.05
  done
  return 1
}

# stop_pid PID NAME: SIGTERM, wait up to 15 s, then SIGKILL. The caller verified the pid.
stop_pid() {
  kill -TERM "$1" 2>/dev/null || return 0
  wait_gone "$1" 15 && return 0
  log "$2 (pid $1) ignored SIGTERM for 15 s; sending SIGKILL"
  kill -KILL "$1" 2>/dev/null
  wait_gone "$1" 5 || die "$2 (pid $1) does not exit"
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() {
  local p i
  for ((i = 0; i < 500; i++)); do
    p=$((PORT_LO + (RANDOM * 32768 + RANDOM) % PORT_SPAN))
    port_in_use "$p" || {
      echo "$p"
      return 0
    }
  done
  die "no free port found in $PORT_LO..$((PORT_LO + PORT_SPAN - 1))"
}

# as_pg OUT CMD...: run CMD as the PostgreSQL server's user (postgres when we are root), from
# /, without our lock fd, its stdout and stderr going to OUT (a file, /dev/null, or - for
# ours). The redirection happens inside the child on purpose: redirections on a function call
# are applied in this shell, and a signal trap firing meanwhile would log into that file.
as_pg() {
  local out=$1 pre=()
  shift
  ((IS_ROOT)) && pre=(runuser -u postgres --)
  if [[ $out == - ]]; then
    (cd / && exec "${pre[@]}" "$@" 9>&-)
  else
    (cd / && exec "${pre[@]}" "$@" >"$out" 2>&1 9>&-)
  fi
}

need_tools() {
  local t missing=()
  for t in "$@"; do
    if [[ $t == */* ]]; then
      [[ -x $t ]] || missing+=("$t")
    else
      command -v "$t" >/dev/null || missing+=("$t")
    fi
  done
  ((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (run scripts/bootstrap.sh as root)"
}

lock_dir() {
  exec 9>"$DIR/.lock" || die "cannot open $DIR/.lock"
  flock -w 300 9 || die "another stack.sh command holds $DIR/.lock for over 300 s"
}

# new_log_has FILE FROM_LINE PATTERN: PATTERN occurs in FILE after line FROM_LINE.
new_log_has() {
  [[ -f $1 ]] && tail -n "+$(($2 + 1))" "$1" | grep -q -- "$3"
}

lines_of() {
  if [[ -f $1 ]]; then wc -l <"$1"; else echo 0; fi
}

# ---- PostgreSQL ---------------------------------------------------------------------------

PG_BASE='' PG_DATA='' PG_SOCK='' PG_LOG=''

# pg_load: 0 when DIR records a PostgreSQL directory that is really ours (marker names DIR).
pg_load() {
  local base
  base=$(get "$DIR/pg.base") || return 1
  [[ $base == /*/pay-pg.* && $base != *..* && -d $base ]] || return 1
  [[ $(get "$base/.pay-stack-dir" 2>/dev/null) == "$DIR" ]] || return 1
  PG_BASE=$base PG_DATA=$base/data PG_SOCK=$base/sock PG_LOG=$base/postgres.log
}

pg_running() {
  [[ -f $PG_DATA/postmaster.pid ]] && as_pg /dev/null "$PG_BIN/pg_ctl" status -D "$PG_DATA"
}

pg_postmaster_pid() {
  get "$PG_DATA/postmaster.pid" 2>/dev/null
}

# pg_ready PORT: the payment role reaches payment_db over TCP on our server (data directory).
pg_ready() {
  local dd
  dd=$(PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -XAtq \
    "host=127.0.0.1 port=$1 user=payment password=payment dbname=payment_db sslmode=disable" \
    -c 'SHOW data_directory' 2>/dev/null) || return 1
  [[ $dd == "$PG_DATA" ]]
}

pg_write_conf() {
  as_pg /dev/null tee "$PG_DATA/pay_stack.conf" <<EOF || die "cannot write $PG_DATA/pay_stack.conf"
# Written by scripts/stack.sh. Loopback only; the durable defaults (fsync,
# synchronous_commit, full_page_writes) are deliberately left on.
listen_addresses = '127.0.0.1'
port = $1
unix_socket_directories = '$PG_SOCK'
# WAL sizes (not durability settings): keep up to 1 GiB of used segments for reuse at each
# checkpoint (a recycled segment is ready, a new one is zero-filled first while committers
# wait), and let ~2 GiB of WAL pass between checkpoints instead of ~0.5 GiB (each one starts
# a burst of full-page images).
min_wal_size = 1GB
max_wal_size = 4GB
# Log every autovacuum run (checkpoints are logged by default): benchmarks and drills read
# them to tell a latency tail from the database's own maintenance.
log_autovacuum_min_duration = 0
EOF
}

pg_init() {
  [[ -d $PG_ROOT ]] || die "PAY_STACK_PG_ROOT $PG_ROOT is not a directory"
  PG_ROOT=$(cd "$PG_ROOT" && pwd -P)
  local base
  base=$(mktemp -d "$PG_ROOT/pay-pg.XXXXXXXX") || die "cannot create a directory in $PG_ROOT"
  put "$base/.pay-stack-dir" "$DIR" || die "cannot write $base/.pay-stack-dir"
  if ((IS_ROOT)); then
    chown postgres:postgres "$base" || die "cannot chown $base to postgres"
  fi
  put "$DIR/pg.base" "$base"
  CREATED_PG_BASE=$base
  pg_load || die "internal: $base not recognised after creating it"
  as_pg - mkdir -m 0700 "$PG_SOCK" || die "cannot create $PG_SOCK"
  as_pg - touch "$PG_LOG" || die "cannot create $PG_LOG"
  if ! as_pg "$DIR/initdb.log" "$PG_BIN/initdb" -D "$PG_DATA" --auth-local=peer \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8; then
    cat "$DIR/initdb.log" >&2
    die "initdb failed in $PG_DATA (log above)"
  fi
  echo "include_if_exists = 'pay_stack.conf'" | as_pg /dev/null tee -a "$PG_DATA/postgresql.conf" ||
    die "cannot edit $PG_DATA/postgresql.conf"
}

# pg_start [PORT]: start on PORT (or a free one), moving to another port while bind loses a
# race. Records DIR/pg.port.
pg_start() {
  local port=${1:-} tries mark rc
  for ((tries = 0; tries < 10; tries++)); do
    [[ -n $port ]] && port_in_use "$port" && port=
    [[ -n $port ]] || port=$(pick_port) || exit 1 # pick_port reported why
    pg_write_conf "$port"
    mark=$(lines_of "$PG_LOG")
    as_pg /dev/null "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -s
    rc=$?
    if ((rc == 0)); then
      put "$DIR/pg.port" "$port"
      return 0
    fi
    if ! pg_running && new_log_has "$PG_LOG" "$mark" "Address already in use"; then
      log "PostgreSQL: port $port taken meanwhile; trying another"
      port=
      continue
    fi
    tail -n 20 "$PG_LOG" >&2
    die "PostgreSQL did not start (pg_ctl exit $rc; log $PG_LOG above)"
  done
  die "PostgreSQL: lost the race for a free port 10 times"
}

# The role may read settings (no secrets there) so that the scripts and tests can prove over
# DATABASE_URL which server they reach: SHOW data_directory.
pg_create_db() {
  local port=$1
  if ! as_pg "$DIR/psql.log" "$PG_BIN/psql" -XqA -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$port" \
    -d postgres <<'EOF'; then
CREATE ROLE payment LOGIN PASSWORD 'payment';
CREATE DATABASE payment_db OWNER payment;
GRANT pg_read_all_settings TO payment;
EOF
    cat "$DIR/psql.log" >&2
    die "creating role payment and database payment_db failed (psql output above)"
  fi
  rm -f "$DIR/psql.log"
}

pg_ensure() {
  local port
  if pg_load; then
    port=$(get "$DIR/pg.port") || port=
    if pg_running; then
      if [[ -z $port ]] || ! pg_ready "$port"; then
        die "PostgreSQL runs on $PG_DATA but does not answer as payment on 127.0.0.1:${port:-?}"
      fi
      return 0
    fi
    pg_start "$port"
    STARTED+=(pg)
  else
    if [[ -f $DIR/pg.base ]]; then
      log "forgetting stale PostgreSQL record $(get "$DIR/pg.base") (missing or not ours)"
      rm -f "$DIR/pg.base" "$DIR/pg.port"
    fi
    pg_init
    pg_start ""
    STARTED+=(pg)
    port=$(get "$DIR/pg.port")
    pg_create_db "$port"
  fi
  port=$(get "$DIR/pg.port")
  pg_ready "$port" || die "PostgreSQL started but payment@127.0.0.1:$port/payment_db does not answer"
}

# pg_stop [MODE]: shut our server down (pg_ctl mode, default fast), waiting until every
# backend is gone.
pg_stop() {
  pg_load || return 0
  local pm mode=${1:-fast}
  pm=$(pg_postmaster_pid) || pm=
  if pg_running; then
    if ! as_pg /dev/null "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m "$mode" -w -t 30 -s; then
      log "PostgreSQL $mode shutdown timed out; immediate shutdown"
      as_pg /dev/null "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 30 -s
    fi
  fi
  # Should pg_ctl have failed, stop the postmaster itself (recognised by its -D argument);
  # its backends notice and exit on their own, which the loop below waits for.
  if [[ -n $pm ]] && alive "$pm" && tr '\0' '\n' 2>/dev/null <"/proc/$pm/cmdline" | grep -qxF "$PG_DATA"; then
    stop_pid "$pm" "PostgreSQL postmaster"
  fi
  local i
  for ((i = 0; i < 200; i++)); do
    pg_has_procs || return 0
    sleep 0.05
  done
  die "processes still use $PG_BASE after PostgreSQL stopped"
}

# pg_has_procs: some process has its working directory inside PG_BASE.
pg_has_procs() {
  find /proc/[0-9]*/cwd -maxdepth 0 \( -lname "$PG_BASE" -o -lname "$PG_BASE/*" \) \
    -print -quit 2>/dev/null | grep -q .
}

pg_remove() {
  pg_load || {
    rm -f "$DIR/pg.base" "$DIR/pg.port"
    return 0
  }
  # The data is deleted next: skip the shutdown checkpoint.
  pg_stop immediate
  rm -rf -- "$PG_BASE" || die "cannot remove $PG_BASE"
  rm -f "$DIR/pg.base" "$DIR/pg.port" "$DIR/initdb.log"
}

# ---- Redis --------------------------------------------------------------------------------

# redis_pid: prints the pid of the Redis started for DIR (verified by its working dir).
redis_pid() {
  local pid
  pid=$(get "$DIR/redis.pid") || return 1
  alive "$pid" || return 1
  [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$DIR/redis" ]] || return 1
  echo "$pid"
}

# redis_ready PORT PID: answers PING and is that very process.
redis_ready() {
  [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]] || return 1
  redis-cli -h 127.0.0.1 -p "$1" info server 2>/dev/null | tr -d '\r' | grep -qx "process_id:$2"
}

redis_start() {
  local port=${1:-} tries mark pid i
  mkdir -p "$DIR/redis" || die "cannot create $DIR/redis"
  for ((tries = 0; tries < 10; tries++)); do
    [[ -n $port ]] && port_in_use "$port" && port=
    [[ -n $port ]] || port=$(pick_port) || exit 1 # pick_port reported why
    rm -f "$DIR/redis.pid"
    mark=$(lines_of "$DIR/redis.log")
    # Redis appends its log itself; its early errors (bad option) arrive on stderr, appended too.
    # shellcheck disable=SC2094
    setsid redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
      --save '' --appendonly no --daemonize no --dir "$DIR/redis" \
      --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
      </dev/null >>"$DIR/redis.log" 2>&1 9>&- &
    pid=$!
    for ((i = 0; i < 200; i++)); do
      alive "$pid" || break
      if redis_ready "$port" "$pid"; then
        put "$DIR/redis.pid" "$pid"
        put "$DIR/redis.port" "$port"
        return 0
      fi
      sleep 0.05
    done
    if alive "$pid"; then
      kill -KILL "$pid" 2>/dev/null
      die "Redis (pid $pid) did not answer on 127.0.0.1:$port within 10 s (log $DIR/redis.log)"
    fi
    wait "$pid" 2>/dev/null
    if new_log_has "$DIR/redis.log" "$mark" "Address already in use"; then
      log "Redis: port $port taken meanwhile; trying another"
      port=
      continue
    fi
    tail -n 20 "$DIR/redis.log" >&2
    die "Redis exited at start (log $DIR/redis.log above)"
  done
  die "Redis: lost the race for a free port 10 times"
}

redis_ensure() {
  local pid port
  if pid=$(redis_pid); then
    port=$(get "$DIR/redis.port") || port=
    if [[ -z $port ]] || ! redis_ready "$port" "$pid"; then
      die "Redis (pid $pid) runs for $DIR but does not answer on 127.0.0.1:${port:-?}"
    fi
    return 0
  fi
  port=$(get "$DIR/redis.port") || port=
  redis_start "$port"
  STARTED+=(redis)
}

redis_stop() {
  local pid
  if pid=$(redis_pid); then
    stop_pid "$pid" Redis
  fi
  rm -f "$DIR/redis.pid"
}

# ---- Kafka development broker ------------------------------------------------------------

# kafka_pid: prints the pid of the devbroker started for DIR (verified by its arguments).
kafka_pid() {
  local pid
  pid=$(get "$DIR/kafka.pid") || return 1
  alive "$pid" || return 1
  tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | grep -qxF "$DIR/kafka.bootstrap" || return 1
  echo "$pid"
}

kafka_ready() {
  local out
  out=$(kcat -L -b "$1" -m 5 2>&1) || return 1
  grep -q "broker 1 at " <<<"$out"
}

kafka_start() {
  [[ -x $KAFKA_BIN ]] || die "kafka-devbroker not found at $KAFKA_BIN (build it with" \
    "cmake --build build --target kafka-devbroker, or set PAY_BUILD_DIR)"
  local pid i bs
  rm -f "$DIR/kafka.bootstrap"
  setsid "$KAFKA_BIN" --bootstrap-file "$DIR/kafka.bootstrap" \
    </dev/null >>"$DIR/kafka.log" 2>&1 9>&- &
  pid=$!
  put "$DIR/kafka.pid" "$pid"
  STARTED+=(kafka)
  for ((i = 0; i < 300; i++)); do
    [[ -s $DIR/kafka.bootstrap ]] && break
    if ! alive "$pid"; then
      wait "$pid" 2>/dev/null
      tail -n 20 "$DIR/kafka.log" >&2
      die "kafka-devbroker exited at start (log $DIR/kafka.log above)"
    fi
    sleep 0.05
  done
  bs=$(get "$DIR/kafka.bootstrap") || die "kafka-devbroker wrote no $DIR/kafka.bootstrap within 15 s"
  kafka_ready "$bs" || die "kcat -L cannot reach the devbroker at $bs"
}

kafka_ensure() {
  if kafka_pid >/dev/null && [[ -s $DIR/kafka.bootstrap ]]; then
    return 0 # running; a drill may have set its brokers down, which `up` leaves alone
  fi
  kafka_start
}

kafka_stop() {
  local pid
  if pid=$(kafka_pid); then
    stop_pid "$pid" kafka-devbroker
  fi
  rm -f "$DIR/kafka.pid" "$DIR/kafka.bootstrap"
}

# kafka_signal SIG WORD: send a drill signal and wait until the devbroker logs it done.
kafka_signal() {
  local pid before i
  pid=$(kafka_pid) || die "no kafka-devbroker runs for $DIR"
  before=$(grep -c "broker(s) $2\$" "$DIR/kafka.log")
  kill "-$1" "$pid" || die "cannot signal kafka-devbroker (pid $pid)"
  for ((i = 0; i < 200; i++)); do
    (($(grep -c "broker(s) $2\$" "$DIR/kafka.log") > before)) && {
      log "kafka-devbroker (pid $pid): brokers $2"
      return 0
    }
    sleep 0.05
  done
  die "kafka-devbroker (pid $pid) did not report its brokers $2 within 10 s"
}

# ---- env ----------------------------------------------------------------------------------

write_env() {
  local pgp rp kb
  pgp=$(get "$DIR/pg.port") && rp=$(get "$DIR/redis.port") && kb=$(get "$DIR/kafka.bootstrap") ||
    return 0
  {
    echo "export DATABASE_URL=postgresql://payment:payment@127.0.0.1:$pgp/payment_db"
    echo "export REDIS_URL=redis://127.0.0.1:$rp/0"
    echo "export KAFKA_BROKERS=$kb"
    printf 'export PAY_STACK_DIR=%q\n' "$DIR"
  } >"$DIR/env.tmp.$$" && mv -f "$DIR/env.tmp.$$" "$DIR/env"
}

# ---- commands -----------------------------------------------------------------------------

STARTED=()
CREATED_PG_BASE=
UP_DONE=0

# On a failed `up`, stop what this run started and remove what it created.
up_cleanup() {
  ((UP_DONE)) && return
  trap - EXIT INT TERM
  local c j
  # Servers this run launched are our children until we exit: stop any still running, also
  # one interrupted before it was ready (its pidfile or command line may not be there yet).
  # An unreaped child's pid cannot have been reused, so it needs no other identification.
  for j in $(jobs -p); do
    alive "$j" && stop_pid "$j" "process $j started by this run"
  done
  for c in "${STARTED[@]}"; do
    case $c in
      kafka) kafka_stop ;;
      redis) redis_stop ;;
      pg) if [[ -n $CREATED_PG_BASE ]]; then pg_remove; else pg_stop; fi ;;
    esac
  done
  [[ -n $CREATED_PG_BASE && -d $CREATED_PG_BASE ]] && pg_load && pg_remove
  rm -f "$DIR/env"
  log "up failed in $DIR; stopped what this run had started"
}

cmd_up() {
  need_tools "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/psql" redis-server redis-cli kcat setsid flock
  if ((IS_ROOT)); then
    need_tools runuser
    id postgres >/dev/null 2>&1 || die "running as root needs the postgres user (install postgresql)"
  fi
  [[ -x $KAFKA_BIN ]] || die "kafka-devbroker not found at $KAFKA_BIN (build it with" \
    "cmake --build build --target kafka-devbroker, or set PAY_BUILD_DIR)"
  mkdir -p "$DIR" || die "cannot create $DIR"
  DIR=$(cd "$DIR" && pwd -P)
  lock_dir
  trap up_cleanup EXIT
  trap 'exit 130' INT TERM
  pg_ensure
  redis_ensure
  kafka_ensure
  write_env
  UP_DONE=1
  trap - EXIT INT TERM
  if ((${#STARTED[@]} == 0)); then
    log "already up in $DIR"
  else
    log "up in $DIR (started: ${STARTED[*]}): postgres 127.0.0.1:$(get "$DIR/pg.port")," \
      "redis 127.0.0.1:$(get "$DIR/redis.port"), kafka $(get "$DIR/kafka.bootstrap")"
  fi
}

cmd_down() {
  if [[ ! -d $DIR ]]; then
    log "nothing to stop in $DIR"
    return 0
  fi
  DIR=$(cd "$DIR" && pwd -P)
  lock_dir
  rm -f "$DIR/env"
  kafka_stop
  redis_stop
  pg_remove
  rm -f "$DIR/redis.port"
  log "down in $DIR"
}

cmd_env() {
  [[ -f $DIR/env ]] || die "no stack is up in $DIR (run: scripts/stack.sh up $DIR)"
  cat "$DIR/env"
}

cmd_status() {
  local all=0 pid port
  if [[ -d $DIR ]]; then DIR=$(cd "$DIR" && pwd -P); fi
  if pg_load && pg_running; then
    echo "postgres: up 127.0.0.1:$(get "$DIR/pg.port") pid $(pg_postmaster_pid) data $PG_DATA"
  else
    echo "postgres: down"
    all=3
  fi
  if pid=$(redis_pid); then
    echo "redis: up 127.0.0.1:$(get "$DIR/redis.port") pid $pid"
  else
    echo "redis: down"
    all=3
  fi
  if pid=$(kafka_pid); then
    port=$(get "$DIR/kafka.bootstrap") || port='?'
    echo "kafka: up $port pid $pid"
  else
    echo "kafka: down"
    all=3
  fi
  return $all
}

# Drill commands need an existing stack directory.
drill_dir() {
  [[ -d $DIR ]] || die "no stack in $DIR"
  DIR=$(cd "$DIR" && pwd -P)
  lock_dir
}

main() {
  local cmd=${1:-}
  case $cmd in
    -h | --help | help)
      usage
      return 0
      ;;
    "")
      usage >&2
      return 2
      ;;
  esac
  (($# <= 2)) || die "too many arguments (usage: scripts/stack.sh COMMAND [DIR])"
  DIR=${2:-$REPO/.run}
  [[ -n $DIR ]] || die "DIR must not be empty"
  case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    pg-stop)
      drill_dir
      pg_load || die "no PostgreSQL recorded in $DIR"
      pg_stop
      log "PostgreSQL stopped (data kept in $PG_DATA)"
      ;;
    pg-start)
      drill_dir
      pg_load || die "no PostgreSQL recorded in $DIR"
      if pg_running; then
        log "PostgreSQL already running"
      else
        pg_start "$(get "$DIR/pg.port")"
        pg_ready "$(get "$DIR/pg.port")" || die "PostgreSQL started but does not answer"
        write_env
        log "PostgreSQL up on 127.0.0.1:$(get "$DIR/pg.port")"
      fi
      ;;
    redis-stop)
      drill_dir
      redis_stop
      log "Redis stopped"
      ;;
    redis-start)
      drill_dir
      if redis_pid >/dev/null; then
        log "Redis already running"
      else
        redis_start "$(get "$DIR/redis.port")"
        write_env
        log "Redis up on 127.0.0.1:$(get "$DIR/redis.port")"
      fi
      ;;
    pg-prewarm-wal)
      drill_dir
      pg_load || die "no PostgreSQL recorded in $DIR"
      pg_running || die "PostgreSQL is not running"
      local segs=${PAY_PREWARM_WAL_SEGMENTS:-64}
      [[ $segs =~ ^[0-9]+$ ]] || die "PAY_PREWARM_WAL_SEGMENTS: \"$segs\" is not a whole number"
      # Each switch needs a WAL record since the last one; the checkpoint then recycles the
      # filled segments (kept up to min_wal_size) as future ones.
      as_pg "$DIR/psql.log" "$PG_BIN/psql" -XqA -v ON_ERROR_STOP=1 -h "$PG_SOCK" \
        -p "$(get "$DIR/pg.port")" -d postgres -c "DO \$\$ BEGIN FOR i IN 1..$segs LOOP
          PERFORM pg_logical_emit_message(false, 'pay-stack-prewarm', '');
          PERFORM pg_switch_wal(); END LOOP; END \$\$" -c "CHECKPOINT" ||
        { cat "$DIR/psql.log" >&2; die "prewarming the WAL failed"; }
      log "PostgreSQL: $segs WAL segments filled and recycled"
      ;;
    kafka-down)
      drill_dir
      kafka_signal USR1 down
      ;;
    kafka-up)
      drill_dir
      kafka_signal USR2 up
      ;;
    *) die "unknown command \"$cmd\" (expected up, down, env, status, pg-stop, pg-start," \
      "pg-prewarm-wal, redis-stop, redis-start, kafka-down or kafka-up)" ;;
  esac
}

main "$@"
