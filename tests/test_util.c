/*  test_util.c -- tly_env_u64: tuning numbers from the environment are
    taken only when they are whole decimal numbers in range; anything else
    keeps the default. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>
#include "tally/tally.h"

#define NAME "TALLY_TEST_UTIL_N"

static uint64_t
with (const char *value)
{
    if (value)
        setenv (NAME, value, 1);
    else
        unsetenv (NAME);
    return tly_env_u64 ("test", NAME, 64, 16, 1000);
}

static void
test_env_u64 (void **state)
{
    (void) state;
    assert_int_equal (with (NULL), 64);
    assert_int_equal (with (""), 64);
    assert_int_equal (with ("16"), 16);
    assert_int_equal (with ("1000"), 1000);
    assert_int_equal (with ("512"), 512);
    static const char *refused[] = {
        "15", "1001", "0", "-20", "+20", " 20", "20 ", "20x", "0x20", "abc",
        "18446744073709551616", "99999999999999999999999" };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        assert_int_equal (with (refused[i]), 64);
    /*  The full range of a 64-bit number, for a caller that allows it. */
    setenv (NAME, "18446744073709551615", 1);
    assert_true (tly_env_u64 ("test", NAME, 1, 0, UINT64_MAX) == UINT64_MAX);
    unsetenv (NAME);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_env_u64),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
