/*
 * payment_bench_hist: an HDR-style latency histogram for build/payment-bench.
 *
 * DESIGN
 * Log-linear buckets over microseconds: values below 256 µs are counted exactly; above,
 * each power of two [2^k, 2^(k+1)) is split into 128 equal sub-buckets, so a bucket is at
 * most 1/128 (0.78 %) of its lower bound wide. The top bucket ends at 2^36 µs (~19 h);
 * larger values are clamped into it (and counted in `clamped`). Exact min, max and sum are
 * kept beside the buckets. Percentiles report the highest value equivalent to the bucket
 * holding the requested rank (as HdrHistogram does), capped at the exact max.
 *
 * Owner: one thread (the bench's completion-queue thread); no locking. hist_merge adds one
 * histogram into another.
 */
#ifndef PAY_APP_PAYMENT_BENCH_HIST_H
#define PAY_APP_PAYMENT_BENCH_HIST_H

#include <stdint.h>

#define HIST_SUB_BITS  7
#define HIST_SUB_COUNT (1u << HIST_SUB_BITS) /* 128 sub-buckets per octave */
#define HIST_MAX_BITS  36                    /* values up to 2^36 - 1 µs */
#define HIST_BUCKETS   ((HIST_MAX_BITS - HIST_SUB_BITS + 1) * HIST_SUB_COUNT)
#define HIST_MAX_VALUE ((UINT64_C(1) << HIST_MAX_BITS) - 1)

typedef struct hist {
    uint64_t counts[HIST_BUCKETS];
    uint64_t total;
    uint64_t clamped; /* values above HIST_MAX_VALUE, recorded as HIST_MAX_VALUE */
    uint64_t min;     /* exact; UINT64_MAX when empty */
    uint64_t max;     /* exact (before clamping) */
    long double sum;
} hist_t;

/** Empties h. */
void hist_reset(hist_t *h);
/** Records one value (µs). */
void hist_record(hist_t *h, uint64_t us);
/** Adds every value of src into dst. */
void hist_merge(hist_t *dst, const hist_t *src);
/** The value at percentile p (0 < p <= 100): the highest value equivalent to the bucket of
 *  rank ceil(p/100 * total), capped at max; 0 when empty. */
uint64_t hist_percentile(const hist_t *h, double p);
/** Mean of the recorded values (exact), 0 when empty. */
double hist_mean(const hist_t *h);
/** Bucket index of a value (exposed for tests). */
unsigned hist_index(uint64_t us);
/** Lowest and highest value that map to bucket idx. */
uint64_t hist_bucket_low(unsigned idx);
uint64_t hist_bucket_high(unsigned idx);

#endif
