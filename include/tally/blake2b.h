/*  blake2b.h -- keyed BLAKE2b (RFC 7693) for many short messages under
    one key: the idempotency index's key of every event.

    A keyed BLAKE2b hashes the key, padded to a block, before the message,
    so libsodium's crypto_generichash runs two compressions on a 40-byte
    message (370 ns here).  The key's block is the same for every message:
    tly_blake2b_key_init compresses it once, and each message then costs
    one compression per 128 bytes.  The bytes are libsodium's: the test
    suite compares the two over every length from 0 to 400, whole and in
    parts, with key and output sizes from 1 to 64.  Any thread; never
    fails. */
#ifndef TALLY_BLAKE2B_H
#define TALLY_BLAKE2B_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t h[8];                  /* the state after the key's block */
    uint64_t h0[8];                 /* before it (an empty message ends there) */
    uint8_t block[128];             /* the key, zero-padded */
    uint8_t outlen;
} tly_blake2b_key;

/*  keylen 1 to 64, outlen 1 to 64 (asserted). */
void tly_blake2b_key_init (tly_blake2b_key *k, const uint8_t *key, size_t keylen,
                           size_t outlen);
/*  A piece of a message. */
typedef struct {
    const void *ptr;
    size_t len;
} tly_blake2b_part;

/*  out (k->outlen bytes) = BLAKE2b-k->outlen keyed with k's key, of the
    concatenation of the nparts parts (any lengths, 0 included). */
void tly_blake2b_keyed (const tly_blake2b_key *k, const tly_blake2b_part *parts, size_t nparts,
                        uint8_t *out);

#endif
