/*  hist.h -- a small log-linear latency histogram (HDR-like).

    Values are nanoseconds.  Below 128 every value has its own bucket; above,
    each power of two is split into 64 linear sub-buckets, so a recorded
    value is known to within 1/64 (1.6 %) across the whole 64-bit range, in
    3,776 counters (30 KiB).  Percentiles report the upper edge of the bucket
    that holds them (never flattering); the exact maximum is kept apart.

    Not thread-safe: one histogram per thread, merged at the end.
*/
#ifndef TALLY_BENCH_HIST_H
#define TALLY_BENCH_HIST_H

#include <stdint.h>

#define BH_BUCKETS 3776

typedef struct {
    uint64_t counts[BH_BUCKETS];
    uint64_t total;
    uint64_t max;
    uint64_t min;
    double sum;
} bh_hist;

void bh_init (bh_hist *self);
void bh_record (bh_hist *self, uint64_t value_ns);
/*  Adds every count of `from` into self. */
void bh_merge (bh_hist *self, const bh_hist *from);
/*  The value at percentile p (0..100]: the upper edge of its bucket,
    clamped to the recorded maximum; 0 when empty. */
uint64_t bh_percentile (const bh_hist *self, double p);
double bh_mean (const bh_hist *self);

#endif
