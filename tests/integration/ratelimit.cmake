# The rate limiter (actors/ratelimit.c, io/redis.c) in real paymentd processes against the
# Redis of a stack the test starts itself (scripts/stack.sh up in a temporary directory).
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_ratelimit
               SOURCES ${CMAKE_SOURCE_DIR}/tests/integration/test_ratelimit.c
                       ${CMAKE_SOURCE_DIR}/tests/e2e/grpc_client.c
                       ${CMAKE_SOURCE_DIR}/tests/e2e/paymentd_proc.c
               LIBS pay_proto PkgConfig::GRPC PkgConfig::GPR Threads::Threads
               LABELS integration TIMEOUT 240)
  add_dependencies(test_ratelimit paymentd kafka-devbroker)
endif()
# The Redis client under it (io/redis.c) in a real actor: pipelining, AUTH/SELECT, timeouts
# against a silent server, reconnection with backoff.
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_ratelimit_redis
               SOURCES ${CMAKE_SOURCE_DIR}/tests/integration/test_ratelimit_redis.c
                       ${CMAKE_SOURCE_DIR}/tests/integration/redis_fixture.c
               LIBS pay_io LABELS integration TIMEOUT 120)
endif()
# The actor in-process between the gRPC layer and a stand-in next hop: exact counters,
# trailers appended to the next hop's answer, refusal by the next hop.
if(PAY_SCOPE STREQUAL "all")
  pay_add_test(NAME test_ratelimit_actor
               SOURCES ${CMAKE_SOURCE_DIR}/tests/integration/test_ratelimit_actor.c
                       ${CMAKE_SOURCE_DIR}/tests/integration/redis_fixture.c
                       ${CMAKE_SOURCE_DIR}/tests/e2e/grpc_client.c
               LIBS pay_actors LABELS integration TIMEOUT 120)
endif()
