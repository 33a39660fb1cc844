#!/usr/bin/env bash
# Runs every test suite (what `make test` and CI run). Each tree builds only what it needs:
#   build       normal build (jemalloc): every test
#   build-tsan  ThreadSanitizer: the runtime and its tests (label runtime)
#   build-asan  ASan+UBSan: unit and e2e tests
# All three run even when one fails; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
jobs=$(nproc)
failed=()

step() { printf '\n==== %s ====\n' "$*"; }

step "normal build"
if cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null && cmake --build build -j"$jobs"; then
  step "tests (normal build)"
  ctest --test-dir build --output-on-failure --timeout 900 || failed+=("normal")
else
  failed+=("normal build")
fi

step "ThreadSanitizer build (runtime)"
if cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPAY_SANITIZE=thread -DPAY_SCOPE=runtime >/dev/null &&
   cmake --build build-tsan -j"$jobs"; then
  step "runtime tests under TSan"
  TSAN_OPTIONS="suppressions=$root/tests/tsan-runtime.supp halt_on_error=1 second_deadlock_stack=1" \
    ctest --test-dir build-tsan -L runtime --output-on-failure --timeout 900 || failed+=("tsan")
else
  failed+=("tsan build")
fi

step "ASan+UBSan build"
if cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DPAY_SANITIZE=address >/dev/null &&
   cmake --build build-asan -j"$jobs"; then
  step "unit and e2e tests under ASan+UBSan"
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  LSAN_OPTIONS="suppressions=$root/tests/lsan.supp:print_suppressions=0" \
    ctest --test-dir build-asan -L 'unit|e2e' --output-on-failure --timeout 900 || failed+=("asan")
else
  failed+=("asan build")
fi

if ((${#failed[@]})); then
  printf '\nFAILED: %s\n' "${failed[*]}"
  exit 1
fi
printf '\nALL TEST SUITES PASSED\n'
