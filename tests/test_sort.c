/*  test_sort.c -- tly_sort_u64: records come out ascending by their
    number, every one of them, equal numbers in their first order, whatever
    the numbers' width (one digit of 11 bits to all six). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "tally/sort.h"

typedef struct {
    uint64_t n;
    uint64_t index;                 /* where it was before the sort */
    uint8_t pad[8];
} rec;

static uint64_t
rnd (uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/*  n records with numbers below 2^bits (64: any), sorted and checked. */
static void
sort_check (size_t n, unsigned bits, uint64_t seed)
{
    rec *a = malloc ((n ? n : 1) * sizeof *a), *tmp = malloc ((n ? n : 1) * sizeof *tmp);
    uint8_t *seen = calloc (n ? n : 1, 1);
    assert_non_null (a);
    assert_non_null (tmp);
    assert_non_null (seen);
    for (size_t i = 0; i < n; i++) {
        uint64_t x = rnd (&seed);
        a[i].n = bits < 64 ? x & ((UINT64_C (1) << bits) - 1) : x;
        a[i].index = i;
        memset (a[i].pad, (int) (i & 0xff), sizeof a[i].pad);
    }
    rec *orig = malloc ((n ? n : 1) * sizeof *orig);
    assert_non_null (orig);
    memcpy (orig, a, n * sizeof *a);
    tly_sort_u64 (a, tmp, n, sizeof *a);
    for (size_t i = 0; i < n; i++) {
        assert_true (a[i].index < n);
        assert_false (seen[a[i].index]);            /* none twice, so none lost */
        seen[a[i].index] = 1;
        assert_memory_equal (&a[i], &orig[a[i].index], sizeof a[i]);
        if (i > 0) {
            assert_true (a[i - 1].n <= a[i].n);
            if (a[i - 1].n == a[i].n)
                assert_true (a[i - 1].index < a[i].index);  /* stable */
        }
    }
    free (orig);
    free (seen);
    free (tmp);
    free (a);
}

static void
test_sort_sizes (void **state)
{
    (void) state;
    sort_check (0, 64, 1);
    sort_check (1, 64, 2);
    sort_check (2, 1, 3);
    for (unsigned bits = 1; bits <= 64; bits += 7)
        sort_check (5000, bits, bits + 10);
    sort_check (100000, 26, 99);        /* a scrubber's batch over 64M entries */
}

static void
test_sort_edges (void **state)
{
    (void) state;
    /*  Already sorted, reversed, all equal, the extremes of the range. */
    uint64_t ns[6][4] = { { 0, 1, 2, 3 }, { 3, 2, 1, 0 }, { 7, 7, 7, 7 },
                          { UINT64_MAX, 0, UINT64_MAX - 1, 1 },
                          { UINT64_C (1) << 63, UINT64_C (1) << 11, 2047, 2048 },
                          { 0, 0, 0, 0 } };
    uint64_t want[6][4] = { { 0, 1, 2, 3 }, { 0, 1, 2, 3 }, { 7, 7, 7, 7 },
                            { 0, 1, UINT64_MAX - 1, UINT64_MAX },
                            { 2047, 2048, UINT64_C (1) << 11, UINT64_C (1) << 63 },
                            { 0, 0, 0, 0 } };
    for (int c = 0; c < 6; c++) {
        uint64_t tmp[4];
        tly_sort_u64 (ns[c], tmp, 4, 8);
        assert_memory_equal (ns[c], want[c], sizeof ns[c]);
    }
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_sort_sizes),
        cmocka_unit_test (test_sort_edges),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
