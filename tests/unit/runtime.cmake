# Runtime tests (mailbox, actor, supervisor). Label `runtime`: they also run in the TSan tree
# (-DPAY_SANITIZE=thread -DPAY_SCOPE=runtime) with the suppressions limited to ck's internals.
set(PAY_RUNTIME_TEST_ENV
    "TSAN_OPTIONS=suppressions=${CMAKE_SOURCE_DIR}/tests/tsan-runtime.supp:halt_on_error=1:second_deadlock_stack=1")

pay_add_test(NAME test_mailbox SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_mailbox.c
             LIBS pay_runtime LABELS runtime unit TIMEOUT 240 ENV ${PAY_RUNTIME_TEST_ENV})
pay_add_test(NAME test_actor SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_actor.c
             LIBS pay_runtime LABELS runtime unit TIMEOUT 120 ENV ${PAY_RUNTIME_TEST_ENV})
pay_add_test(NAME test_supervisor SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_supervisor.c
             LIBS pay_runtime LABELS runtime unit TIMEOUT 120 ENV ${PAY_RUNTIME_TEST_ENV})

# Mailbox design measurement (mpsc ring vs one spsc ring per producer); not a test.
if(PAY_SANITIZE STREQUAL "")
  add_executable(mailbox-bench ${CMAKE_SOURCE_DIR}/bench/mailbox_bench.c)
  target_link_libraries(mailbox-bench PRIVATE pay_runtime)
endif()
