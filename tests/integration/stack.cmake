# The local dependency stack (scripts/stack.sh) and the development Kafka broker.
if(PAY_SCOPE STREQUAL "all")
  pay_add_script_test(NAME test_stack
                      SCRIPT ${CMAKE_SOURCE_DIR}/tests/integration/test_stack.sh ARGS stack
                      LABELS integration TIMEOUT 300)
  pay_add_script_test(NAME test_devbroker
                      SCRIPT ${CMAKE_SOURCE_DIR}/tests/integration/test_stack.sh ARGS devbroker
                      LABELS integration TIMEOUT 120)
endif()
