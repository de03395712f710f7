/*  hist.c -- the log-linear latency histogram (see hist.h). */
#include <string.h>
#include "hist.h"

static unsigned
bucket_of (uint64_t v)
{
    if (v < 128)
        return (unsigned) v;
    unsigned e = 63u - (unsigned) __builtin_clzll (v);     /* e >= 7 */
    unsigned m = (unsigned) (v >> (e - 6));                 /* 64..127 */
    return (e - 6) * 64 + m;
}

static uint64_t
bucket_high (unsigned i)
{
    if (i < 128)
        return i;
    unsigned e = i / 64 + 5;
    uint64_t m = i % 64 + 64;
    return ((m + 1) << (e - 6)) - 1;
}

void
bh_init (bh_hist *self)
{
    memset (self, 0, sizeof *self);
    self->min = UINT64_MAX;
}

void
bh_record (bh_hist *self, uint64_t v)
{
    self->counts[bucket_of (v)]++;
    self->total++;
    self->sum += (double) v;
    if (v > self->max)
        self->max = v;
    if (v < self->min)
        self->min = v;
}

void
bh_merge (bh_hist *self, const bh_hist *from)
{
    for (unsigned i = 0; i < BH_BUCKETS; i++)
        self->counts[i] += from->counts[i];
    self->total += from->total;
    self->sum += from->sum;
    if (from->max > self->max)
        self->max = from->max;
    if (from->min < self->min)
        self->min = from->min;
}

uint64_t
bh_percentile (const bh_hist *self, double p)
{
    if (self->total == 0)
        return 0;
    double want = p / 100.0 * (double) self->total;
    uint64_t rank = (uint64_t) want;
    if ((double) rank < want)
        rank++;
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < BH_BUCKETS; i++) {
        seen += self->counts[i];
        if (seen >= rank) {
            uint64_t v = bucket_high (i);
            return v > self->max ? self->max : v;
        }
    }
    return self->max;
}

double
bh_mean (const bh_hist *self)
{
    return self->total ? self->sum / (double) self->total : 0.0;
}
