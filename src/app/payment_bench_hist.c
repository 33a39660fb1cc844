/*
 * payment_bench_hist: see payment_bench_hist.h.
 */
#include "app/payment_bench_hist.h"

#include <math.h>
#include <string.h>

void hist_reset(hist_t *h)
{
    memset(h, 0, sizeof(*h));
    h->min = UINT64_MAX;
}

unsigned hist_index(uint64_t us)
{
    if (us > HIST_MAX_VALUE)
        us = HIST_MAX_VALUE;
    if (us < 2 * HIST_SUB_COUNT)
        return (unsigned)us;
    /* e >= 1: the value's octave above the linear range; (us >> e) is in [128, 256). */
    unsigned e = (unsigned)(63 - __builtin_clzll(us)) - HIST_SUB_BITS;
    return HIST_SUB_COUNT * (e + 1) + (unsigned)((us >> e) - HIST_SUB_COUNT);
}

uint64_t hist_bucket_low(unsigned idx)
{
    if (idx < 2 * HIST_SUB_COUNT)
        return idx;
    unsigned e = idx / HIST_SUB_COUNT - 1;
    return (uint64_t)(idx % HIST_SUB_COUNT + HIST_SUB_COUNT) << e;
}

uint64_t hist_bucket_high(unsigned idx)
{
    if (idx < 2 * HIST_SUB_COUNT)
        return idx;
    unsigned e = idx / HIST_SUB_COUNT - 1;
    return hist_bucket_low(idx) + (UINT64_C(1) << e) - 1;
}

void hist_record(hist_t *h, uint64_t us)
{
    if (us > HIST_MAX_VALUE)
        h->clamped++;
    h->counts[hist_index(us)]++;
    h->total++;
    h->sum += (long double)us;
    if (us < h->min)
        h->min = us;
    if (us > h->max)
        h->max = us;
}

void hist_merge(hist_t *dst, const hist_t *src)
{
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        dst->counts[i] += src->counts[i];
    dst->total += src->total;
    dst->clamped += src->clamped;
    dst->sum += src->sum;
    if (src->min < dst->min)
        dst->min = src->min;
    if (src->max > dst->max)
        dst->max = src->max;
}

uint64_t hist_percentile(const hist_t *h, double p)
{
    if (h->total == 0)
        return 0;
    if (p > 100.0)
        p = 100.0;
    uint64_t rank = (uint64_t)ceil(p / 100.0 * (double)h->total);
    if (rank < 1)
        rank = 1;
    if (rank > h->total)
        rank = h->total;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t v = hist_bucket_high(i);
            return v > h->max ? h->max : v;
        }
    }
    return h->max;
}

double hist_mean(const hist_t *h)
{
    return h->total ? (double)(h->sum / (long double)h->total) : 0.0;
}
