# The schema, the PostgreSQL adapter (io/pg.c), the ledger's business SQL and paymentctl,
# against a real PostgreSQL started by scripts/stack.sh (which needs kafka-devbroker).
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_pg SOURCES ${CMAKE_SOURCE_DIR}/tests/integration/test_pg.c
               LIBS pay_io LABELS integration TIMEOUT 300)
  pay_add_script_test(NAME test_paymentctl
                      SCRIPT ${CMAKE_SOURCE_DIR}/tests/integration/test_paymentctl.sh
                      LABELS integration TIMEOUT 300)
endif()
