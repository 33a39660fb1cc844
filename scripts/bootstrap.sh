#!/usr/bin/env bash
# Installs the Debian packages the project builds, tests and runs with (DESIGN.md §7).
# Idempotent: when every package is present it does no network work and prints nothing.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libgrpc-dev protobuf-compiler libprotobuf-dev protobuf-c-compiler libprotobuf-c-dev grpc-proto
  libck-dev libpq-dev libhiredis-dev librdkafka-dev libjemalloc-dev libcmocka-dev libssl-dev
  postgresql postgresql-contrib redis-server redis-tools kcat nghttp2-client prometheus valgrind
  procps iproute2 util-linux python3
)

missing=()
for p in "${PACKAGES[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "bootstrap: missing packages: ${missing[*]} (run as root to install them)" >&2
  exit 1
fi

echo "bootstrap: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Never let package installation start system services (a system PostgreSQL or Redis on
# the default ports); the project runs its own on free ports.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[[ $created_policy -eq 1 ]] && rm -f "$policy"' EXIT
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
