/*  test_blake2b.c -- tly_blake2b_keyed gives libsodium's crypto_generichash
    bytes, for messages whole or in parts, of every length from 0 to 400
    (0, 1, 128 and 256 are the edges: the key's block as the last, a
    block exactly full), every key size and output size that the hash
    allows at its ends and in between, and keys and messages of random
    bytes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include <sodium.h>
#include "tally/blake2b.h"

static void
test_blake2b_matches_libsodium (void **state)
{
    (void) state;
    assert_true (sodium_init () >= 0);
    static const size_t keylens[] = { 1, 16, 32, 63, 64 };
    static const size_t outlens[] = { 1, 8, 16, 32, 64 };
    uint8_t key[64], msg[400];
    randombytes_buf (key, sizeof key);
    randombytes_buf (msg, sizeof msg);
    for (size_t a = 0; a < sizeof keylens / sizeof *keylens; a++)
        for (size_t b = 0; b < sizeof outlens / sizeof *outlens; b++) {
            tly_blake2b_key k;
            tly_blake2b_key_init (&k, key, keylens[a], outlens[b]);
            for (size_t len = 0; len <= sizeof msg; len++) {
                uint8_t want[64], got[64];
                assert_int_equal (crypto_generichash (want, outlens[b], msg, len, key,
                                                      keylens[a]), 0);
                memset (got, 0xee, sizeof got);
                tly_blake2b_keyed (&k, &(tly_blake2b_part) { msg, len }, 1, got);
                assert_memory_equal (got, want, outlens[b]);
                assert_int_equal (got[outlens[b] < 64 ? outlens[b] : 63],
                                  outlens[b] < 64 ? 0xee : want[63]);   /* no more written */
            }
        }
}

/*  One key, many messages: the key's state is not changed by use. */
static void
test_blake2b_key_reused (void **state)
{
    (void) state;
    uint8_t key[32], msg[100], first[16], again[16], want[16];
    randombytes_buf (key, sizeof key);
    randombytes_buf (msg, sizeof msg);
    tly_blake2b_key k;
    tly_blake2b_key_init (&k, key, sizeof key, 16);
    tly_blake2b_part whole = { msg, sizeof msg };
    tly_blake2b_keyed (&k, &whole, 1, first);
    for (int i = 0; i < 100; i++) {
        uint8_t other[16];
        tly_blake2b_keyed (&k, &(tly_blake2b_part) { msg, (size_t) i }, 1, other);
    }
    tly_blake2b_keyed (&k, &whole, 1, again);
    assert_memory_equal (first, again, 16);
    assert_int_equal (crypto_generichash (want, 16, msg, sizeof msg, key, sizeof key), 0);
    assert_memory_equal (first, want, 16);
}

/*  A message in parts hashes as the whole: split in three at every pair
    of points (empty parts included) of messages around the block edges. */
static void
test_blake2b_parts (void **state)
{
    (void) state;
    uint8_t key[32], msg[300];
    randombytes_buf (key, sizeof key);
    randombytes_buf (msg, sizeof msg);
    tly_blake2b_key k;
    tly_blake2b_key_init (&k, key, sizeof key, 16);
    static const size_t lens[] = { 0, 1, 127, 128, 129, 256, 257, 300 };
    for (size_t l = 0; l < sizeof lens / sizeof *lens; l++) {
        size_t len = lens[l];
        uint8_t want[16], got[16];
        assert_int_equal (crypto_generichash (want, 16, msg, len, key, sizeof key), 0);
        for (size_t a = 0; a <= len; a++)
            for (size_t b = a; b <= len; b += 7) {
                tly_blake2b_part parts[3] = { { msg, a }, { msg + a, b - a },
                                              { msg + b, len - b } };
                tly_blake2b_keyed (&k, parts, 3, got);
                assert_memory_equal (got, want, 16);
            }
        tly_blake2b_keyed (&k, NULL, 0, got);       /* no parts: the empty message */
        assert_int_equal (crypto_generichash (want, 16, msg, 0, key, sizeof key), 0);
        assert_memory_equal (got, want, 16);
    }
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_blake2b_matches_libsodium),
        cmocka_unit_test (test_blake2b_key_reused),
        cmocka_unit_test (test_blake2b_parts),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
