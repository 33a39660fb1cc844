# The pure parts of the rate limiter (identity, key names, Lua arguments, reply reading).
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_ratelimit_key
               SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_ratelimit_key.c
               LIBS pay_actors LABELS unit TIMEOUT 60)
endif()
