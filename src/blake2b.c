/*  blake2b.c -- keyed BLAKE2b with the key's block compressed once (see
    blake2b.h).  The compression follows RFC 7693 section 3.2, portable C:
    12 rounds of G over the 16-word state, message words picked by SIGMA. */
#include <assert.h>
#include <string.h>
#include "tally/blake2b.h"

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ull, 0xbb67ae8584caa73bull, 0x3c6ef372fe94f82bull, 0xa54ff53a5f1d36f1ull,
    0x510e527fade682d1ull, 0x9b05688c2b3e6c1full, 0x1f83d9abfb41bd6bull, 0x5be0cd19137e2179ull,
};

/*  RFC 7693's table: round r uses row r mod 10. */
static const uint8_t SIGMA[10][16] = {
    {  0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14, 15 },
    { 14, 10,  4,  8,  9, 15, 13,  6,  1, 12,  0,  2, 11,  7,  5,  3 },
    { 11,  8, 12,  0,  5,  2, 15, 13, 10, 14,  3,  6,  7,  1,  9,  4 },
    {  7,  9,  3,  1, 13, 12, 11, 14,  2,  6,  5, 10,  4,  0, 15,  8 },
    {  9,  0,  5,  7,  2,  4, 10, 15, 14,  1, 11, 12,  6,  8,  3, 13 },
    {  2, 12,  6, 10,  0, 11,  8,  3,  4, 13,  7,  5, 15, 14,  1,  9 },
    { 12,  5,  1, 15, 14, 13,  4, 10,  0,  7,  6,  3,  9,  2,  8, 11 },
    { 13, 11,  7, 14, 12,  1,  3,  9,  5,  0, 15,  4,  8,  6,  2, 10 },
    {  6, 15, 14,  9, 11,  3,  0,  8, 12,  2, 13,  7,  1,  4, 10,  5 },
    { 10,  2,  8,  4,  7,  6,  1,  5, 15, 11,  9, 14,  3, 12, 13,  0 },
};

static uint64_t
load64 (const uint8_t *p)
{
    return (uint64_t) p[0] | (uint64_t) p[1] << 8 | (uint64_t) p[2] << 16
         | (uint64_t) p[3] << 24 | (uint64_t) p[4] << 32 | (uint64_t) p[5] << 40
         | (uint64_t) p[6] << 48 | (uint64_t) p[7] << 56;
}

static uint64_t
rotr64 (uint64_t x, unsigned n)
{
    return x >> n | x << (64 - n);
}

#define G(a, b, c, d, x, y) do {                                    \
        v[a] = v[a] + v[b] + (x); v[d] = rotr64 (v[d] ^ v[a], 32);  \
        v[c] = v[c] + v[d];       v[b] = rotr64 (v[b] ^ v[c], 24);  \
        v[a] = v[a] + v[b] + (y); v[d] = rotr64 (v[d] ^ v[a], 16);  \
        v[c] = v[c] + v[d];       v[b] = rotr64 (v[b] ^ v[c], 63);  \
    } while (0)

/*  h = F(h, block, t, last): t is the count of message bytes (with the
    key's block) up to the end of this block; t < 2^64 always here. */
static void
compress (uint64_t h[8], const uint8_t block[128], uint64_t t, int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load64 (block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t;
    if (last)
        v[14] = ~v[14];
    /*  Rounds written out, so that SIGMA's indices are constants and m[]
        stays in registers (a loop over r took 10-50% longer). */
#define ROUND(r) do {                                               \
        const uint8_t *S = SIGMA[(r) % 10];                         \
        G (0, 4,  8, 12, m[S[ 0]], m[S[ 1]]);                       \
        G (1, 5,  9, 13, m[S[ 2]], m[S[ 3]]);                       \
        G (2, 6, 10, 14, m[S[ 4]], m[S[ 5]]);                       \
        G (3, 7, 11, 15, m[S[ 6]], m[S[ 7]]);                       \
        G (0, 5, 10, 15, m[S[ 8]], m[S[ 9]]);                       \
        G (1, 6, 11, 12, m[S[10]], m[S[11]]);                       \
        G (2, 7,  8, 13, m[S[12]], m[S[13]]);                       \
        G (3, 4,  9, 14, m[S[14]], m[S[15]]);                       \
    } while (0)
    ROUND (0); ROUND (1); ROUND (2); ROUND (3); ROUND (4); ROUND (5);
    ROUND (6); ROUND (7); ROUND (8); ROUND (9); ROUND (10); ROUND (11);
#undef ROUND
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

void
tly_blake2b_key_init (tly_blake2b_key *k, const uint8_t *key, size_t keylen, size_t outlen)
{
    assert (keylen >= 1 && keylen <= 64 && outlen >= 1 && outlen <= 64);
    memset (k, 0, sizeof *k);
    memcpy (k->h0, IV, sizeof IV);
    k->h0[0] ^= 0x01010000u ^ (uint64_t) keylen << 8 ^ outlen;     /* depth 1, fanout 1 */
    memcpy (k->block, key, keylen);
    memcpy (k->h, k->h0, sizeof k->h);
    compress (k->h, k->block, 128, 0);
    k->outlen = (uint8_t) outlen;
}

void
tly_blake2b_keyed (const tly_blake2b_key *k, const tly_blake2b_part *parts, size_t nparts,
                   uint8_t *out)
{
    uint64_t h[8], t = 128;
    uint8_t block[128];
    size_t fill = 0;
    memcpy (h, k->h, sizeof h);
    for (size_t i = 0; i < nparts; i++) {
        const uint8_t *p = parts[i].ptr;
        for (size_t len = parts[i].len; len > 0;) {
            /*  A full block is compressed only once more bytes follow:
                the last one is compressed as the last. */
            if (fill == 128) {
                compress (h, block, t += 128, 0);
                fill = 0;
            }
            size_t take = len < 128 - fill ? len : 128 - fill;
            memcpy (block + fill, p, take);
            fill += take;
            p += take;
            len -= take;
        }
    }
    if (t == 128 && fill == 0) {    /* an empty message: the key's block is the last */
        memcpy (h, k->h0, sizeof h);
        compress (h, k->block, 128, 1);
    }
    else {
        memset (block + fill, 0, 128 - fill);
        compress (h, block, t + fill, 1);
    }
    uint8_t bytes[64];
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++)
            bytes[8 * i + j] = (uint8_t) (h[i] >> 8 * j);
    memcpy (out, bytes, k->outlen);
}
