# payment-bench's latency histogram (src/app/payment_bench_hist.c), compiled into the test.
pay_add_test(NAME test_hdr
             SOURCES ${CMAKE_SOURCE_DIR}/tests/unit/test_hdr.c
                     ${CMAKE_SOURCE_DIR}/src/app/payment_bench_hist.c
             LIBS pay_runtime m LABELS unit TIMEOUT 60)
