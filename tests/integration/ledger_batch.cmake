# The batched ledger engine (issue 5): build/paymentd applying many payments per
# transaction, on the real PostgreSQL of scripts/stack.sh; the batch-size histogram from
# paymentd's shutdown log; build/paymentctl ledger check.
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_ledger_batch
               SOURCES ${CMAKE_SOURCE_DIR}/tests/integration/test_ledger_batch.c
                       ${CMAKE_SOURCE_DIR}/tests/e2e/paymentd_proc.c
                       ${CMAKE_SOURCE_DIR}/tests/integration/ledger_fixture.c
               LIBS pay_actors LABELS integration TIMEOUT 180)
  add_dependencies(test_ledger_batch paymentd paymentctl)
endif()
