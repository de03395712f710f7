/*  sort.h -- sorting records by a 64-bit number at their start.

    For batches that must be visited in seq order (the scrubber checks
    idempotency records, read in key order, by the entries they name).
    An LSD radix sort, 11 bits a digit and only as many digits as the
    largest number needs: linear, and stable. */
#ifndef TALLY_SORT_H
#define TALLY_SORT_H

#include <stddef.h>
#include <stdint.h>

/*  Sorts n records of `size` bytes (a multiple of 8, at least 8) in a by
    the uint64_t each begins with, ascending; equal numbers keep their
    order.  tmp has room for n records; its contents are lost. */
void tly_sort_u64 (void *a, void *tmp, size_t n, size_t size);

#endif
