/*
 * test_hdr: the latency histogram of build/payment-bench (src/app/payment_bench_hist.c):
 * bucket layout (contiguous, <= 1/128 wide), exact percentiles of known data, clamping,
 * merging.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "app/payment_bench_hist.h"

static hist_t *new_hist(void)
{
    hist_t *h = malloc(sizeof *h);
    assert_non_null(h);
    hist_reset(h);
    return h;
}

static void test_layout(void **state)
{
    (void)state;
    for (unsigned v = 0; v < 256; v++) {
        assert_int_equal(hist_index(v), v);
        assert_int_equal(hist_bucket_low(v), v);
        assert_int_equal(hist_bucket_high(v), v);
    }
    for (unsigned i = 0; i + 1 < HIST_BUCKETS; i++) {
        uint64_t lo = hist_bucket_low(i), hi = hist_bucket_high(i);
        assert_true(lo <= hi);
        assert_int_equal(hist_bucket_low(i + 1), hi + 1); /* contiguous, no gap or overlap */
        assert_int_equal(hist_index(lo), i);
        assert_int_equal(hist_index(hi), i);
        /* width <= 1/128 of the lower bound: ~0.78 % precision */
        assert_true((hi - lo + 1) * 128 <= (lo > 0 ? lo : 1) || i < 256);
    }
    assert_int_equal(hist_bucket_high(HIST_BUCKETS - 1), HIST_MAX_VALUE);
    assert_int_equal(hist_index(HIST_MAX_VALUE), HIST_BUCKETS - 1);
    assert_int_equal(hist_index(UINT64_MAX), HIST_BUCKETS - 1);
    /* Known buckets: 5000 us is in [4992, 5023] (width 32). */
    assert_int_equal(hist_bucket_low(hist_index(5000)), 4992);
    assert_int_equal(hist_bucket_high(hist_index(5000)), 5023);
    /* One minute (60e6 us) is counted within 1/128. */
    unsigned m = hist_index(60000000);
    assert_true(hist_bucket_low(m) <= 60000000 && hist_bucket_high(m) >= 60000000);
    assert_true((hist_bucket_high(m) - hist_bucket_low(m) + 1) * 128 <= hist_bucket_low(m));
}

static void test_percentiles_uniform(void **state)
{
    (void)state;
    hist_t *h = new_hist();
    for (uint64_t v = 1; v <= 10000; v++)
        hist_record(h, v);
    assert_int_equal(h->total, 10000);
    assert_int_equal(h->min, 1);
    assert_int_equal(h->max, 10000);
    assert_true(hist_mean(h) == 5000.5);
    /* The highest value equivalent to the bucket of the rank, capped at max. */
    assert_int_equal(hist_percentile(h, 50), 5023);    /* rank 5000 in [4992, 5023] */
    assert_int_equal(hist_percentile(h, 90), 9023);    /* rank 9000 in [8960, 9023] */
    assert_int_equal(hist_percentile(h, 99), 9919);    /* rank 9900 in [9856, 9919] */
    assert_int_equal(hist_percentile(h, 99.9), 10000); /* [9984, 10047], capped at max */
    assert_int_equal(hist_percentile(h, 100), 10000);
    assert_int_equal(hist_percentile(h, 1), 100); /* rank 100: exact below 256 */
    /* Within 1/128 of the true value everywhere. */
    for (int p = 1; p <= 100; p++) {
        double truth = p * 100.0;
        double got = (double)hist_percentile(h, p);
        assert_true(got >= truth && got <= truth * (1 + 1.0 / 128));
    }
    free(h);
}

static void test_small_and_empty(void **state)
{
    (void)state;
    hist_t *h = new_hist();
    assert_int_equal(hist_percentile(h, 50), 0);
    assert_true(hist_mean(h) == 0.0);
    for (int i = 0; i < 100; i++)
        hist_record(h, 7);
    hist_record(h, 200);
    assert_int_equal(hist_percentile(h, 50), 7);
    assert_int_equal(hist_percentile(h, 99), 7);     /* rank 100 of 101 */
    assert_int_equal(hist_percentile(h, 99.5), 200); /* rank 101 */
    assert_int_equal(hist_percentile(h, 100), 200);
    hist_reset(h);
    hist_record(h, 1234567);
    assert_int_equal(hist_percentile(h, 50), 1234567); /* capped at the exact max */
    assert_int_equal(hist_percentile(h, 0.0001), 1234567);
    free(h);
}

static void test_clamp_and_merge(void **state)
{
    (void)state;
    hist_t *a = new_hist(), *b = new_hist();
    hist_record(a, UINT64_C(1) << 40);
    assert_int_equal(a->clamped, 1);
    assert_int_equal(a->counts[HIST_BUCKETS - 1], 1);
    assert_int_equal(a->max, UINT64_C(1) << 40);
    hist_record(b, 10);
    hist_record(b, 20);
    hist_record(b, 30);
    hist_merge(a, b);
    assert_int_equal(a->total, 4);
    assert_int_equal(a->clamped, 1);
    assert_int_equal(a->min, 10);
    assert_int_equal(a->max, UINT64_C(1) << 40);
    assert_int_equal(hist_percentile(a, 50), 20);
    assert_int_equal(hist_percentile(a, 75), 30);
    assert_int_equal(hist_percentile(a, 100), HIST_MAX_VALUE);
    free(a);
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_percentiles_uniform),
        cmocka_unit_test(test_small_and_empty),
        cmocka_unit_test(test_clamp_and_merge),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
