/*
 * test_ulid: ULID encoding against known values, validation, monotonicity within one
 * millisecond and across threads (100k ids from 4 threads: all unique, each thread's
 * sequence strictly increasing), and the exact UTC timestamp format.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "runtime/ulid.h"

static const char alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static void assert_ulid_shape(const char *id)
{
    assert_int_equal(strlen(id), ULID_LEN);
    for (size_t i = 0; i < ULID_LEN; i++)
        assert_non_null(strchr(alphabet, id[i]));
    assert_true(id[0] <= '7');
}

static void test_encode_known_values(void **state)
{
    (void)state;
    char out[ULID_SIZE];
    uint8_t zero[10] = {0};
    uint8_t ones[10];
    memset(ones, 0xff, sizeof ones);
    uint8_t seq[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};

    /* The ULID specification's example timestamp. */
    ulid_encode(out, UINT64_C(1469918176385), zero);
    assert_string_equal(out, "01ARYZ6S410000000000000000");
    ulid_encode(out, UINT64_C(1469918176385), ones);
    assert_string_equal(out, "01ARYZ6S41ZZZZZZZZZZZZZZZZ");
    ulid_encode(out, (UINT64_C(1) << 48) - 1, ones);
    assert_string_equal(out, "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
    ulid_encode(out, UINT64_C(0x0123456789ab), seq);
    assert_string_equal(out, "014D2PF2DB041061050R3GG28A");
    ulid_encode(out, 0, zero);
    assert_string_equal(out, "00000000000000000000000000");
}

static void test_decode_roundtrip(void **state)
{
    (void)state;
    uint64_t ms = 0;
    uint8_t rnd[10];
    uint8_t seq[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    assert_int_equal(ulid_decode(&ms, rnd, "014D2PF2DB041061050R3GG28A"), 0);
    assert_true(ms == UINT64_C(0x0123456789ab));
    assert_memory_equal(rnd, seq, 10);
    assert_int_equal(ulid_decode(&ms, NULL, "01ARYZ6S41ZZZZZZZZZZZZZZZZ"), 0);
    assert_true(ms == UINT64_C(1469918176385));
}

static void test_validation(void **state)
{
    (void)state;
    uint64_t ms;
    assert_true(ulid_is_valid("01ARYZ6S41TSV4RRFFQ69G5FAV"));
    assert_true(ulid_is_valid("7ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
    assert_false(ulid_is_valid("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"));  /* > 128 bits */
    assert_false(ulid_is_valid("01ARYZ6S41TSV4RRFFQ69G5FA"));   /* 25 */
    assert_false(ulid_is_valid("01ARYZ6S41TSV4RRFFQ69G5FAVX")); /* 27 */
    assert_false(ulid_is_valid("01ARYZ6S41TSV4RRFFQ69G5FAI"));  /* I */
    assert_false(ulid_is_valid("01ARYZ6S41TSV4RRFFQ69G5FAL"));  /* L */
    assert_false(ulid_is_valid("01ARYZ6S41TSV4RRFFQ69G5FAO"));  /* O */
    assert_false(ulid_is_valid("01ARYZ6S41TSV4RRFFQ69G5FAU"));  /* U */
    assert_false(ulid_is_valid("01aryz6s41tsv4rrffq69g5fav"));  /* lower case */
    assert_false(ulid_is_valid(""));
    assert_false(ulid_is_valid(NULL));
    assert_int_equal(ulid_decode(&ms, NULL, "01ARYZ6S41TSV4RRFFQ69G5FAU"), -EINVAL);
}

static void test_new_uses_the_clock(void **state)
{
    (void)state;
    char id[ULID_SIZE];
    int64_t now_us = 0;
    uint64_t ms = 0;
    int64_t before = ulid_clock_us() / 1000;
    ulid_new_at(id, &now_us);
    int64_t after = ulid_clock_us() / 1000;
    assert_ulid_shape(id);
    assert_int_equal(ulid_decode(&ms, NULL, id), 0);
    /* The id's millisecond is never before the clock reading it reports... */
    assert_true((int64_t)ms >= now_us / 1000);
    assert_true(now_us / 1000 >= before && now_us / 1000 <= after);
    /* ...and not far after it (only a wall clock stepping back could move it ahead). */
    assert_true((int64_t)ms <= after + 1000);
}

/* Within one millisecond the random part grows by exactly one per id. */
static void test_monotonic_within_a_millisecond(void **state)
{
    (void)state;
    enum { N = 20000 };
    char(*ids)[ULID_SIZE] = malloc(sizeof(*ids) * N);
    assert_non_null(ids);
    for (int i = 0; i < N; i++)
        ulid_new(ids[i]);
    int same_ms = 0;
    for (int i = 1; i < N; i++) {
        assert_true(strcmp(ids[i - 1], ids[i]) < 0);
        uint64_t ms0, ms1;
        uint8_t r0[10], r1[10];
        assert_int_equal(ulid_decode(&ms0, r0, ids[i - 1]), 0);
        assert_int_equal(ulid_decode(&ms1, r1, ids[i]), 0);
        assert_true(ms1 >= ms0);
        if (ms1 == ms0) {
            same_ms++;
            /* r1 == r0 + 1 as 80-bit big-endian numbers */
            int carry = 1;
            for (int b = 9; b >= 0; b--) {
                int sum = r0[b] + carry;
                assert_int_equal(r1[b], sum & 0xff);
                carry = sum >> 8;
            }
        }
    }
    /* 20k ids take a few milliseconds at most: most share their millisecond. */
    assert_true(same_ms > N / 2);
    free(ids);
}

enum { THREADS = 4, PER_THREAD = 25000 };

typedef struct worker {
    pthread_t tid;
    char (*ids)[ULID_SIZE];
} worker_t;

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    for (int i = 0; i < PER_THREAD; i++)
        ulid_new(w->ids[i]);
    return NULL;
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp(a, b);
}

static void test_monotonic_across_threads(void **state)
{
    (void)state;
    worker_t w[THREADS];
    char(*all)[ULID_SIZE] = malloc(sizeof(*all) * THREADS * PER_THREAD);
    assert_non_null(all);
    for (int t = 0; t < THREADS; t++) {
        w[t].ids = all + (size_t)t * PER_THREAD;
        assert_int_equal(pthread_create(&w[t].tid, NULL, worker_main, &w[t]), 0);
    }
    for (int t = 0; t < THREADS; t++)
        assert_int_equal(pthread_join(w[t].tid, NULL), 0);

    for (int t = 0; t < THREADS; t++)
        for (int i = 0; i < PER_THREAD; i++) {
            assert_ulid_shape(w[t].ids[i]);
            if (i > 0)
                assert_true(strcmp(w[t].ids[i - 1], w[t].ids[i]) < 0);
        }
    qsort(all, (size_t)THREADS * PER_THREAD, ULID_SIZE, cmp_id);
    for (size_t i = 1; i < (size_t)THREADS * PER_THREAD; i++)
        assert_true(strcmp(all[i - 1], all[i]) < 0); /* sorted and no duplicate */
    free(all);
}

static void test_format_time(void **state)
{
    (void)state;
    char out[ULID_TIME_SIZE];
    assert_int_equal(ulid_format_time(out, INT64_C(1738324800123456)), 0);
    assert_string_equal(out, "2025-01-31T12:00:00.123456+00:00");
    assert_int_equal(strlen(out), ULID_TIME_LEN);
    assert_int_equal(ulid_format_time(out, 0), 0);
    assert_string_equal(out, "1970-01-01T00:00:00.000000+00:00");
    assert_int_equal(ulid_format_time(out, INT64_C(1738324800000001)), 0);
    assert_string_equal(out, "2025-01-31T12:00:00.000001+00:00");
    assert_int_equal(ulid_format_time(out, -1), 0);
    assert_string_equal(out, "1969-12-31T23:59:59.999999+00:00");
    assert_int_equal(ulid_format_time(out, INT64_C(253402300799999999)), 0);
    assert_string_equal(out, "9999-12-31T23:59:59.999999+00:00");
    assert_int_equal(ulid_format_time(out, INT64_C(253402300800000000)), -ERANGE);

    /* Now: the six fractional digits and the +00:00 offset are always there. */
    assert_int_equal(ulid_format_time(out, ulid_clock_us()), 0);
    assert_int_equal(strlen(out), ULID_TIME_LEN);
    assert_int_equal(out[19], '.');
    assert_string_equal(out + 26, "+00:00");
    for (int i = 20; i < 26; i++)
        assert_true(out[i] >= '0' && out[i] <= '9');
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_known_values),
        cmocka_unit_test(test_decode_roundtrip),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_new_uses_the_clock),
        cmocka_unit_test(test_monotonic_within_a_millisecond),
        cmocka_unit_test(test_monotonic_across_threads),
        cmocka_unit_test(test_format_time),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
