/*
 * ulid: Universally Unique Lexicographically Sortable Identifiers, and the UTC timestamp
 * format of our API.
 *
 * A ULID is 128 bits: a 48-bit Unix time in milliseconds, then 80 random bits, written as
 * 26 characters of Crockford's base32 (0-9 A-Z without I, L, O, U), most significant first,
 * so the text sorts like the value. Payment and event ids are ULIDs (DESIGN.md §3).
 *
 * Monotonic per process: ids from ulid_new() strictly increase in generation order, also
 * within one millisecond (the random part of the previous id plus one, as the ULID spec's
 * monotonic mode) and when the wall clock steps back (the last millisecond is reused until
 * the clock catches up). Only 2^80 ids fit in one millisecond; past that the timestamp moves
 * one millisecond ahead, which keeps ids unique and sorted.
 *
 * Timestamps: ulid_format_time gives `2025-01-31T12:00:00.123456+00:00` (UTC, six
 * fractional digits), what the Python service emits for processed_at/created_at.
 *
 * Thread-safety: every function may be called from any thread; ulid_new serialises on
 * one process-wide mutex (a few hundred nanoseconds per id, far below a payment's cost).
 */
#ifndef PAY_RUNTIME_ULID_H
#define PAY_RUNTIME_ULID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ULID_LEN       26 /* characters */
#define ULID_SIZE      27 /* buffer size with the NUL */
#define ULID_TIME_LEN  32 /* "2025-01-31T12:00:00.123456+00:00" */
#define ULID_TIME_SIZE 33

/** A new ULID into out (NUL-terminated), monotonic within the process. */
void ulid_new(char out[ULID_SIZE]);
/** As ulid_new, also giving the wall-clock reading (µs since the epoch) the id was made
 *  at, so a row's id and its created_at agree. *now_us may be NULL. */
void ulid_new_at(char out[ULID_SIZE], int64_t *now_us);

/** Encode a ULID from its parts: ms is truncated to 48 bits, rnd is 10 bytes, big-endian. */
void ulid_encode(char out[ULID_SIZE], uint64_t ms, const uint8_t rnd[10]);
/** True when s is exactly 26 characters of the alphabet and fits 128 bits (first ≤ '7'). */
bool ulid_is_valid(const char *s);
/** Decode s into its parts (either out may be NULL): 0, or -EINVAL when !ulid_is_valid. */
int ulid_decode(uint64_t *ms, uint8_t rnd[10], const char *s);

/** Wall clock (CLOCK_REALTIME) in microseconds since the Unix epoch. */
int64_t ulid_clock_us(void);
/** Format unix_us (µs since the epoch, may be negative) as UTC with six fractional
 *  digits: 2025-01-31T12:00:00.123456+00:00. Years outside 0000..9999 give -ERANGE. */
int ulid_format_time(char out[ULID_TIME_SIZE], int64_t unix_us);

#endif
