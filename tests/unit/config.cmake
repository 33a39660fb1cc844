# Configuration engine, structured logging and paymentd's settings table.
pay_add_test(NAME test_config SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_config.c
             LIBS pay_runtime LABELS unit TIMEOUT 60)
pay_add_test(NAME test_log SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_log.c
             LIBS pay_runtime LABELS unit TIMEOUT 60)
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_settings
               SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_settings.c
                       ${CMAKE_SOURCE_DIR}/src/app/paymentd_settings.c
               LIBS pay_runtime PkgConfig::PQ LABELS unit TIMEOUT 60)
endif()
