# End-to-end tests of the gRPC face: each test starts its own build/paymentd on a free
# port (tests/e2e/paymentd_proc.c) and talks to it with a gRPC C-core client
# (tests/e2e/grpc_client.c). Label e2e: they also run in the ASan+UBSan tree, where the
# server's exit code carries LeakSanitizer's verdict (suppressions: tests/lsan.supp).
if(PAY_SCOPE STREQUAL "all")
  set(PAY_E2E_HELPERS ${CMAKE_SOURCE_DIR}/tests/e2e/grpc_client.c
                      ${CMAKE_SOURCE_DIR}/tests/e2e/paymentd_proc.c)
  set(PAY_E2E_ENV "LSAN_OPTIONS=suppressions=${CMAKE_SOURCE_DIR}/tests/lsan.supp:print_suppressions=0")
  foreach(t cli health reflection bad_input shutdown)
    pay_add_test(NAME test_e2e_${t}
                 SOURCES ${CMAKE_SOURCE_DIR}/tests/e2e/test_e2e_${t}.c ${PAY_E2E_HELPERS}
                 LIBS pay_proto PkgConfig::GRPC PkgConfig::GPR
                 LABELS e2e TIMEOUT 300 ENV ${PAY_E2E_ENV})
    add_dependencies(test_e2e_${t} paymentd)
  endforeach()
  # The gRPC layer in-process, around actors made to fail, stall or be slow.
  pay_add_test(NAME test_e2e_rpc_actors
               SOURCES ${CMAKE_SOURCE_DIR}/tests/e2e/test_e2e_rpc_actors.c
                       ${CMAKE_SOURCE_DIR}/tests/e2e/grpc_client.c
               LIBS pay_actors LABELS e2e TIMEOUT 300 ENV ${PAY_E2E_ENV})
endif()
