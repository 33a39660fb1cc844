# ULIDs and the API's UTC timestamp format (runtime/ulid.c): a pure module, unit test.
pay_add_test(NAME test_ulid SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_ulid.c
             LIBS pay_runtime LABELS unit TIMEOUT 60)
