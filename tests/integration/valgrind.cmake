# paymentd's start → serve → stop cycle under valgrind memcheck (no errors, no leaks).
if(PAY_SCOPE STREQUAL "all")
  pay_add_script_test(NAME test_valgrind
                      SCRIPT ${CMAKE_SOURCE_DIR}/tests/integration/test_valgrind.sh
                      LABELS integration TIMEOUT 300)
endif()
