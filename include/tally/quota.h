/*  quota.h -- hard limits and monthly usage (PROTOCOL.md s4, "Quota rule").

    A limit (customer or "*", meter or "*", limit) caps, for each calendar
    month (UTC) of the events' `ts`, the sum of qty of accepted usage of one
    customer and one meter.  The most specific limit applies: an exact
    customer beats "*", then an exact meter beats "*", so the order is
    (c, m), (c, *), (*, m), (*, *).

    Admission is exact: tly_quota_admit counts qty only when the new sum
    stays within the limit, so accepted usage never exceeds it.  Sums
    saturate at UINT64_MAX instead of wrapping.  Pure data structure: one
    thread (the quota actor) owns it.
*/
#ifndef TALLY_QUOTA_H
#define TALLY_QUOTA_H

#include "tally.h"

typedef struct tly_quota tly_quota;

/*  A period is a calendar month: year * 12 + (month - 1). */
uint64_t tly_period_of (uint64_t ts_ms);
/*  Writes "YYYY-MM" (NUL-terminated) into out[24]. */
void tly_period_name (uint64_t period, char out[24]);

int tly_quota_new (tly_quota **out);
void tly_quota_destroy (tly_quota **self_p);

/*  Sets or (limit_set false) removes a limit; customer/meter may be "*". */
int tly_quota_set_limit (tly_quota *self, const tly_str *customer, const tly_str *meter,
                         bool limit_set, uint64_t limit);
/*  The limit set for exactly (customer, meter), "*" taken literally. */
bool tly_quota_limit_exact (tly_quota *self, const tly_str *customer, const tly_str *meter,
                            uint64_t *limit);
/*  The limit that applies to (customer, meter), if any. */
bool tly_quota_limit_for (tly_quota *self, const tly_str *customer, const tly_str *meter,
                          uint64_t *limit);

uint64_t tly_quota_used (tly_quota *self, const tly_str *customer, const tly_str *meter,
                         uint64_t period);
/*  Counts qty and returns true when used + qty stays within the applicable
    limit (or there is none); else counts nothing and returns false.
    TLY_ENOMEM is reported as a refusal through *err (may be NULL). */
bool tly_quota_admit (tly_quota *self, const tly_str *customer, const tly_str *meter,
                      uint64_t ts, uint64_t qty, int *err);
/*  Counts usage without a check (rebuilding from the ledger). */
int tly_quota_add (tly_quota *self, const tly_str *customer, const tly_str *meter,
                   uint64_t period, uint64_t qty);
/*  Takes back usage counted by an admission whose commit failed. */
void tly_quota_sub (tly_quota *self, const tly_str *customer, const tly_str *meter,
                    uint64_t period, uint64_t qty);

typedef void (tly_limit_fn) (void *ctx, const tly_str *customer, const tly_str *meter,
                             uint64_t limit);
void tly_quota_each_limit (tly_quota *self, tly_limit_fn *fn, void *ctx);
size_t tly_quota_limit_count (tly_quota *self);
typedef void (tly_usage_fn) (void *ctx, const tly_str *customer, const tly_str *meter,
                             uint64_t period, uint64_t used);
void tly_quota_each_usage (tly_quota *self, tly_usage_fn *fn, void *ctx);
/*  The rows changed (admit, add, sub) since the last tly_quota_clean: what
    a checkpoint must write.  Clean only once they are durably written. */
void tly_quota_each_dirty (tly_quota *self, tly_usage_fn *fn, void *ctx);
size_t tly_quota_dirty_count (tly_quota *self);
void tly_quota_clean (tly_quota *self);

#endif
