# The ledger (issue 4) end to end: build/paymentd on the real PostgreSQL of
# scripts/stack.sh, through the gRPC client of src/io/grpc_client.c, plus build/paymentctl
# (ledger check) and build/payment-cli.
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_ledger
               SOURCES ${CMAKE_SOURCE_DIR}/tests/integration/test_ledger.c
                       ${CMAKE_SOURCE_DIR}/tests/e2e/paymentd_proc.c
                       ${CMAKE_SOURCE_DIR}/tests/integration/ledger_fixture.c
               LIBS pay_actors LABELS integration TIMEOUT 300)
  add_dependencies(test_ledger paymentd paymentctl payment-cli)
endif()
