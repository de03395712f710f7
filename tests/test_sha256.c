/*  test_sha256.c -- tly_sha256_prefixed: the FIPS 180-2 vectors, and the
    same bytes as libsodium for every length from 0 to 300 and around each
    block boundary up to 4 KiB, with random contents and prefixes.  On a
    CPU with SHA-NI this checks the SHA-NI code; elsewhere the portable one
    (which is libsodium's). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <sodium.h>
#include "tally/sha256.h"

static void
sodium_prefixed (uint8_t prefix, const uint8_t *msg, size_t len, uint8_t out[32])
{
    crypto_hash_sha256_state st;
    crypto_hash_sha256_init (&st);
    crypto_hash_sha256_update (&st, &prefix, 1);
    crypto_hash_sha256_update (&st, msg, len);
    crypto_hash_sha256_final (&st, out);
}

static void
hex (const char *h, uint8_t out[32])
{
    size_t n;
    assert_int_equal (sodium_hex2bin (out, 32, h, 64, NULL, &n, NULL), 0);
    assert_int_equal (n, 32);
}

/*  FIPS 180-2 B.1 and B.2, whose messages start with a byte that serves
    as the prefix. */
static void
test_vectors (void **state)
{
    (void) state;
    uint8_t got[32], want[32];
    tly_sha256_prefixed ('a', (const uint8_t *) "bc", 2, got);
    hex ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", want);
    assert_memory_equal (got, want, 32);
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    tly_sha256_prefixed ('a', (const uint8_t *) m + 1, strlen (m) - 1, got);
    hex ("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1", want);
    assert_memory_equal (got, want, 32);
    /*  RFC 9162's leaf hash of the empty leaf: SHA-256 of the byte 0x00. */
    tly_sha256_prefixed (0x00, NULL, 0, got);
    hex ("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d", want);
    assert_memory_equal (got, want, 32);
    print_message ("sha256: %s\n", tly_sha256_accelerated () ? "SHA-NI" : "portable");
}

static void
check_len (size_t len, uint8_t *buf)
{
    uint8_t got[32], want[32];
    randombytes_buf (buf, len);
    uint8_t prefix = (uint8_t) randombytes_uniform (256);
    tly_sha256_prefixed (prefix, buf, len, got);
    sodium_prefixed (prefix, buf, len, want);
    assert_memory_equal (got, want, 32);
}

static void
test_same_as_libsodium (void **state)
{
    (void) state;
    uint8_t *buf = malloc (4200);
    assert_non_null (buf);
    for (size_t len = 0; len <= 300; len++)
        check_len (len, buf);
    for (size_t b = 64; b <= 4096; b += 64)
        for (size_t len = b - 10; len <= b + 10; len++)
            check_len (len, buf);
    for (int i = 0; i < 2000; i++)
        check_len (randombytes_uniform (4200), buf);
    /*  out aliasing the message, as tly_merkle_node_hash allows. */
    uint8_t want[32];
    randombytes_buf (buf, 64);
    sodium_prefixed (1, buf, 64, want);
    tly_sha256_prefixed (1, buf, 64, buf);
    assert_memory_equal (buf, want, 32);
    free (buf);
}

int
main (void)
{
    if (sodium_init () < 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_vectors),
        cmocka_unit_test (test_same_as_libsodium),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
