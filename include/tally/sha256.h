/*  sha256.h -- SHA-256 of a one-byte prefix and a message, the shape of
    every RFC 9162 leaf and node hash.

    On x86-64 CPUs with the SHA extensions (SHA-NI) the compression runs on
    them, 4 to 6 times faster than libsodium's portable code, which is used
    everywhere else (libsodium 1.0.18 has no SHA-NI path).  The choice is
    made once per process from CPUID; env TALLY_SHA256=portable forces the
    portable code (to compare the two).  Both give the same bytes: the test
    suite checks the standard vectors and differs them over every length
    around the block boundaries.  Any thread; never fails. */
#ifndef TALLY_SHA256_H
#define TALLY_SHA256_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

/*  out = SHA-256(prefix || msg[0 .. len)).  out may alias msg. */
void tly_sha256_prefixed (uint8_t prefix, const uint8_t *msg, size_t len, uint8_t out[32]);

/*  True when the SHA-NI code is in use. */
bool tly_sha256_accelerated (void);

#endif
