/*  sort.c -- an LSD radix sort of records by their leading uint64_t (see
    sort.h). */
#include <assert.h>
#include <string.h>
#include "tally/sort.h"

#define DIGIT_BITS 11
#define DIGITS     (1u << DIGIT_BITS)

static uint64_t
number_at (const uint8_t *p)
{
    uint64_t x;
    memcpy (&x, p, 8);
    return x;
}

void
tly_sort_u64 (void *a, void *tmp, size_t n, size_t size)
{
    assert (size >= 8 && size % 8 == 0);
    uint64_t max = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t x = number_at ((uint8_t *) a + i * size);
        max = x > max ? x : max;
    }
    uint8_t *from = a, *to = tmp;
    for (unsigned shift = 0; shift < 64 && (shift == 0 || max >> shift); shift += DIGIT_BITS) {
        size_t at[DIGITS + 1] = { 0 };
        for (size_t i = 0; i < n; i++)
            at[((number_at (from + i * size) >> shift) & (DIGITS - 1)) + 1]++;
        for (size_t d = 0; d < DIGITS; d++)
            at[d + 1] += at[d];
        for (size_t i = 0; i < n; i++) {
            size_t j = at[(number_at (from + i * size) >> shift) & (DIGITS - 1)]++;
            memcpy (to + j * size, from + i * size, size);
        }
        uint8_t *t = from;
        from = to;
        to = t;
    }
    if (from != a)
        memcpy (a, from, n * size);
}
