# Server reflection and payment request validation: pure modules, unit tests.
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_validate
               SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_validate.c
               LIBS pay_actors LABELS unit TIMEOUT 60)
  # Needs protoc (package protobuf-compiler) at run time: it builds descriptor sets with
  # imports and extensions and decodes a served descriptor independently.
  pay_add_test(NAME test_reflection
               SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_reflection.c
               LIBS pay_actors LABELS unit TIMEOUT 120)
endif()
