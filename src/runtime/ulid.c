/*
 * ulid: see ulid.h.
 *
 * DESIGN
 * The generator state (last millisecond, last 80-bit random part) is process-wide and
 * guarded by one mutex: monotonicity is a property of the whole process, and a lock-free
 * 128-bit compare-and-swap would buy nothing at our id rates. Fresh randomness comes from
 * getrandom(2) once per new millisecond; within a millisecond the random part is
 * incremented, so ids stay unpredictable across milliseconds and ordered within one.
 */
#include "runtime/ulid.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

static const char alphabet[32] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/* Owned by the mutex. rnd_hi holds the top 16 of the 80 random bits, rnd_lo the rest. */
static pthread_mutex_t gen_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t gen_ms;
static uint16_t gen_rnd_hi;
static uint64_t gen_rnd_lo;

int64_t ulid_clock_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void fill_random(uint8_t *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom(buf + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            /* Without randomness ids could collide across processes: refuse loudly. */
            fprintf(stderr, "ulid: getrandom failed: %s\n", strerror(errno));
            abort();
        }
        got += (size_t)r;
    }
}

void ulid_encode(char out[ULID_SIZE], uint64_t ms, const uint8_t rnd[10])
{
    uint8_t b[16];
    ms &= (UINT64_C(1) << 48) - 1;
    for (int i = 0; i < 6; i++)
        b[i] = (uint8_t)(ms >> (8 * (5 - i)));
    memcpy(b + 6, rnd, 10);
    /* 128 bits as 26 base32 digits (130 bits): the leading digit carries only the top 3
     * bits, hence first ≤ '7'. */
    unsigned __int128 v = 0;
    for (int i = 0; i < 16; i++)
        v = (v << 8) | b[i];
    for (int i = ULID_LEN - 1; i >= 0; i--) {
        out[i] = alphabet[(unsigned)(v & 31)];
        v >>= 5;
    }
    out[ULID_LEN] = '\0';
}

static int digit_value(char c)
{
    const char *p = c ? memchr(alphabet, c, sizeof alphabet) : NULL;
    return p ? (int)(p - alphabet) : -1;
}

bool ulid_is_valid(const char *s)
{
    if (!s)
        return false;
    for (int i = 0; i < ULID_LEN; i++)
        if (digit_value(s[i]) < 0)
            return false;
    return s[ULID_LEN] == '\0' && s[0] <= '7';
}

int ulid_decode(uint64_t *ms, uint8_t rnd[10], const char *s)
{
    if (!ulid_is_valid(s))
        return -EINVAL;
    unsigned __int128 v = 0;
    for (int i = 0; i < ULID_LEN; i++)
        v = (v << 5) | (unsigned)digit_value(s[i]);
    if (ms)
        *ms = (uint64_t)(v >> 80);
    if (rnd)
        for (int i = 0; i < 10; i++)
            rnd[i] = (uint8_t)(v >> (8 * (9 - i)));
    return 0;
}

void ulid_new_at(char out[ULID_SIZE], int64_t *now_us)
{
    int64_t us = ulid_clock_us();
    uint64_t now_ms = us > 0 ? (uint64_t)us / 1000 : 0;
    uint8_t fresh[10];
    uint8_t rnd[10];
    uint64_t ms;

    pthread_mutex_lock(&gen_lock);
    if (now_ms > gen_ms) {
        fill_random(fresh, sizeof fresh);
        gen_ms = now_ms;
        gen_rnd_hi = (uint16_t)(fresh[0] << 8 | fresh[1]);
        gen_rnd_lo = 0;
        for (int i = 2; i < 10; i++)
            gen_rnd_lo = gen_rnd_lo << 8 | fresh[i];
    } else if (++gen_rnd_lo == 0 && ++gen_rnd_hi == 0) {
        /* 2^80 ids in one millisecond: borrow the next millisecond. */
        gen_ms++;
        fill_random(fresh, sizeof fresh);
        gen_rnd_hi = (uint16_t)(fresh[0] << 8 | fresh[1]);
        gen_rnd_lo = 0;
        for (int i = 2; i < 10; i++)
            gen_rnd_lo = gen_rnd_lo << 8 | fresh[i];
    }
    ms = gen_ms;
    rnd[0] = (uint8_t)(gen_rnd_hi >> 8);
    rnd[1] = (uint8_t)gen_rnd_hi;
    for (int i = 0; i < 8; i++)
        rnd[2 + i] = (uint8_t)(gen_rnd_lo >> (8 * (7 - i)));
    pthread_mutex_unlock(&gen_lock);

    ulid_encode(out, ms, rnd);
    if (now_us)
        *now_us = us;
}

void ulid_new(char out[ULID_SIZE])
{
    ulid_new_at(out, NULL);
}

/* v (0 ≤ v < 10^width) as exactly width decimal digits; returns the end. */
static char *put_digits(char *p, int v, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return p + width;
}

int ulid_format_time(char out[ULID_TIME_SIZE], int64_t unix_us)
{
    /* Floor division, so instants before 1970 keep a non-negative fraction. */
    int64_t sec = unix_us / 1000000;
    int64_t frac = unix_us % 1000000;
    if (frac < 0) {
        frac += 1000000;
        sec -= 1;
    }
    time_t t = (time_t)sec;
    struct tm tm;
    if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 < 0 || tm.tm_year + 1900 > 9999) {
        out[0] = '\0';
        return -ERANGE;
    }
    /* Written digit by digit: every field is range-checked, and printf's width rules
     * would not bound the output for the compiler. */
    char *p = out;
    p = put_digits(p, tm.tm_year + 1900, 4);
    *p++ = '-';
    p = put_digits(p, tm.tm_mon + 1, 2);
    *p++ = '-';
    p = put_digits(p, tm.tm_mday, 2);
    *p++ = 'T';
    p = put_digits(p, tm.tm_hour, 2);
    *p++ = ':';
    p = put_digits(p, tm.tm_min, 2);
    *p++ = ':';
    p = put_digits(p, tm.tm_sec, 2);
    *p++ = '.';
    p = put_digits(p, (int)frac, 6);
    memcpy(p, "+00:00", 7);
    return 0;
}
