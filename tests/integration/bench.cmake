# build/payment-bench against a real paymentd on a stack of its own (tests/integration/
# test_bench.sh): the harness (flags, modes, JSON, counters, verification) and issue 5's
# `make test` smoke (5 s of AuthorizePayment: AUTHORIZED > 0, no RPC error, verification OK).
if(PAY_SCOPE STREQUAL "all")
  pay_add_script_test(NAME test_bench
                      SCRIPT ${CMAKE_SOURCE_DIR}/tests/integration/test_bench.sh ARGS harness
                      LABELS integration TIMEOUT 120)
  pay_add_script_test(NAME test_bench_smoke
                      SCRIPT ${CMAKE_SOURCE_DIR}/tests/integration/test_bench.sh ARGS smoke
                      LABELS integration TIMEOUT 120)
endif()
