/*  test_quota.c -- the quota rule of PROTOCOL.md s4: limits, "*"
    precedence, calendar months (UTC), exact admission. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include "tally/quota.h"

#define S(lit) (&(tly_str) { lit, sizeof lit - 1 })

/*  2026-11-01T00:00:00Z and neighbours, in ms. */
#define NOV_1_2026   UINT64_C (1793491200000)
#define DAY          UINT64_C (86400000)

static void
test_periods (void **state)
{
    (void) state;
    char name[24];
    tly_period_name (tly_period_of (0), name);
    assert_string_equal (name, "1970-01");
    tly_period_name (tly_period_of (NOV_1_2026), name);
    assert_string_equal (name, "2026-11");
    tly_period_name (tly_period_of (NOV_1_2026 - 1), name);
    assert_string_equal (name, "2026-10");
    /*  Leap day 2024-02-29T23:59:59.999Z, then March. */
    uint64_t mar_1_2024 = UINT64_C (1709251200000);
    tly_period_name (tly_period_of (mar_1_2024 - 1), name);
    assert_string_equal (name, "2024-02");
    tly_period_name (tly_period_of (mar_1_2024), name);
    assert_string_equal (name, "2024-03");
    /*  2000-12-31 and 2001-01-01. */
    uint64_t jan_1_2001 = UINT64_C (978307200000);
    tly_period_name (tly_period_of (jan_1_2001 - 1), name);
    assert_string_equal (name, "2000-12");
    tly_period_name (tly_period_of (jan_1_2001), name);
    assert_string_equal (name, "2001-01");
    /*  Every day of 1970-2100 maps to a month that never goes backwards. */
    uint64_t prev = tly_period_of (0);
    for (uint64_t d = 0; d < 365 * 130; d++) {
        uint64_t p = tly_period_of (d * DAY);
        assert_true (p >= prev && p - prev <= 1);
        prev = p;
    }
    /*  The largest ts does not crash. */
    tly_period_name (tly_period_of (UINT64_MAX), name);
}

static void
test_no_limit_admits_everything (void **state)
{
    (void) state;
    tly_quota *q;
    assert_int_equal (tly_quota_new (&q), TLY_OK);
    uint64_t limit;
    assert_false (tly_quota_limit_for (q, S ("acme"), S ("api"), &limit));
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, UINT64_C (1) << 62, NULL));
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, UINT64_C (1) << 62, NULL));
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, UINT64_C (1) << 62, NULL));
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, UINT64_C (1) << 62, NULL));
    /*  Four times 2^62 saturates instead of wrapping to 0. */
    assert_true (tly_quota_used (q, S ("acme"), S ("api"), tly_period_of (NOV_1_2026)) == UINT64_MAX);
    tly_quota_destroy (&q);
    assert_null (q);
}

static void
test_exact_admission (void **state)
{
    (void) state;
    tly_quota *q;
    tly_quota_new (&q);
    assert_int_equal (tly_quota_set_limit (q, S ("acme"), S ("api"), true, 10), TLY_OK);
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, 4, NULL));
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, 6, NULL));   /* = 10 */
    assert_false (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, 1, NULL));  /* 11 */
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, 0, NULL));   /* qty 0 fits */
    assert_int_equal (tly_quota_used (q, S ("acme"), S ("api"), tly_period_of (NOV_1_2026)), 10);
    /*  A rejected event counts nothing, and a new month starts from zero. */
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026 + 30 * DAY, 10, NULL));
    assert_false (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026 - 1, 11, NULL));
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026 - 1, 10, NULL));
    /*  An event larger than the limit on its own; a huge qty cannot wrap. */
    assert_false (tly_quota_admit (q, S ("acme"), S ("api"), 0, 11, NULL));
    assert_false (tly_quota_admit (q, S ("acme"), S ("api"), 0, UINT64_MAX, NULL));
    /*  sub takes back an admission (a failed commit). */
    tly_quota_sub (q, S ("acme"), S ("api"), tly_period_of (NOV_1_2026), 6);
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, 6, NULL));
    /*  A limit of 0 refuses everything but qty 0. */
    tly_quota_set_limit (q, S ("zero"), S ("api"), true, 0);
    assert_true (tly_quota_admit (q, S ("zero"), S ("api"), 0, 0, NULL));
    assert_false (tly_quota_admit (q, S ("zero"), S ("api"), 0, 1, NULL));
    /*  Removing the limit lifts it. */
    tly_quota_set_limit (q, S ("acme"), S ("api"), false, 0);
    assert_true (tly_quota_admit (q, S ("acme"), S ("api"), NOV_1_2026, 1000, NULL));
    tly_quota_destroy (&q);
}

static void
test_star_precedence (void **state)
{
    (void) state;
    tly_quota *q;
    tly_quota_new (&q);
    uint64_t l;
    assert_int_equal (tly_quota_limit_count (q), 0);
    tly_quota_set_limit (q, S ("*"), S ("*"), true, 1);
    assert_int_equal (tly_quota_limit_count (q), 1);
    assert_true (tly_quota_limit_for (q, S ("acme"), S ("api"), &l) && l == 1);
    tly_quota_set_limit (q, S ("*"), S ("api"), true, 2);
    assert_true (tly_quota_limit_for (q, S ("acme"), S ("api"), &l) && l == 2);
    assert_true (tly_quota_limit_for (q, S ("acme"), S ("gb"), &l) && l == 1);
    /*  An exact customer beats "*" even when the meter is "*". */
    tly_quota_set_limit (q, S ("acme"), S ("*"), true, 3);
    assert_true (tly_quota_limit_for (q, S ("acme"), S ("api"), &l) && l == 3);
    assert_true (tly_quota_limit_for (q, S ("acme"), S ("gb"), &l) && l == 3);
    assert_true (tly_quota_limit_for (q, S ("other"), S ("api"), &l) && l == 2);
    tly_quota_set_limit (q, S ("acme"), S ("api"), true, 4);
    assert_int_equal (tly_quota_limit_count (q), 4);
    assert_true (tly_quota_limit_for (q, S ("acme"), S ("api"), &l) && l == 4);
    assert_true (tly_quota_limit_for (q, S ("acme"), S ("gb"), &l) && l == 3);
    assert_true (tly_quota_limit_for (q, S ("other"), S ("gb"), &l) && l == 1);
    /*  A wildcard caps each meter separately, not their sum. */
    assert_true (tly_quota_admit (q, S ("acme"), S ("gb"), 0, 3, NULL));
    assert_true (tly_quota_admit (q, S ("acme"), S ("tokens"), 0, 3, NULL));
    assert_false (tly_quota_admit (q, S ("acme"), S ("tokens"), 0, 1, NULL));
    /*  Customers and meters that merely share bytes stay apart. */
    tly_quota_set_limit (q, S ("ab"), S ("c"), true, 7);
    assert_true (tly_quota_limit_for (q, S ("a"), S ("bc"), &l) && l == 1);
    tly_quota_destroy (&q);
}

static void
test_set_limit_rejects_bad_names (void **state)
{
    (void) state;
    tly_quota *q;
    tly_quota_new (&q);
    char big[TLY_CUSTOMER_MAX + 2];
    memset (big, 'x', sizeof big);
    assert_int_equal (tly_quota_set_limit (q, &(tly_str) { big, TLY_CUSTOMER_MAX }, S ("m"),
                                           true, 1), TLY_OK);
    assert_int_equal (tly_quota_set_limit (q, &(tly_str) { big, TLY_CUSTOMER_MAX + 1 }, S ("m"),
                                           true, 1), TLY_EINVAL);
    assert_int_equal (tly_quota_set_limit (q, S (""), S ("m"), true, 1), TLY_EINVAL);
    assert_int_equal (tly_quota_set_limit (q, S ("c"), S (""), true, 1), TLY_EINVAL);
    tly_quota_destroy (&q);
}

typedef struct { int limits, usage; uint64_t sum; } counts;

static void
count_limit (void *ctx, const tly_str *c, const tly_str *m, uint64_t limit)
{
    (void) c; (void) m; (void) limit;
    ((counts *) ctx)->limits++;
}

static void
count_usage (void *ctx, const tly_str *c, const tly_str *m, uint64_t period, uint64_t used)
{
    (void) c; (void) m; (void) period;
    ((counts *) ctx)->usage++;
    ((counts *) ctx)->sum += used;
}

static void
test_iteration_and_rebuild (void **state)
{
    (void) state;
    tly_quota *q;
    tly_quota_new (&q);
    tly_quota_set_limit (q, S ("*"), S ("*"), true, 100);
    tly_quota_set_limit (q, S ("acme"), S ("api"), true, 100);
    for (int i = 0; i < 1000; i++) {
        char c[16];
        snprintf (c, sizeof c, "c%d", i % 50);
        tly_quota_add (q, &(tly_str) { c, (uint32_t) strlen (c) }, S ("api"),
                       tly_period_of (NOV_1_2026 + (uint64_t) (i % 3) * 31 * DAY), 2);
    }
    counts n = { 0 };
    tly_quota_each_limit (q, count_limit, &n);
    tly_quota_each_usage (q, count_usage, &n);
    assert_int_equal (n.limits, 2);
    assert_int_equal (n.usage, 150);
    assert_int_equal (n.sum, 2000);
    /*  Every row is dirty until cleaned; then only what changes again. */
    counts d = { 0 };
    tly_quota_each_dirty (q, count_usage, &d);
    assert_int_equal (d.usage, 150);
    assert_int_equal (d.sum, 2000);
    tly_quota_clean (q);
    assert_int_equal (tly_quota_dirty_count (q), 0);
    assert_true (tly_quota_admit (q, S ("c7"), S ("api"), NOV_1_2026, 1, NULL));
    assert_false (tly_quota_admit (q, S ("c7"), S ("api"), NOV_1_2026, 1000, NULL));
    tly_quota_add (q, S ("c8"), S ("api"), tly_period_of (NOV_1_2026), 1);
    tly_quota_add (q, S ("c8"), S ("api"), tly_period_of (NOV_1_2026), 1);
    memset (&d, 0, sizeof d);
    tly_quota_each_dirty (q, count_usage, &d);
    assert_int_equal (d.usage, 2);
    tly_quota_sub (q, S ("c7"), S ("api"), tly_period_of (NOV_1_2026), 1);
    assert_int_equal (tly_quota_dirty_count (q), 2);
    tly_quota_destroy (&q);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_periods),
        cmocka_unit_test (test_no_limit_admits_everything),
        cmocka_unit_test (test_exact_admission),
        cmocka_unit_test (test_star_precedence),
        cmocka_unit_test (test_set_limit_rejects_bad_names),
        cmocka_unit_test (test_iteration_and_rebuild),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
