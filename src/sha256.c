/*  sha256.c -- SHA-256 of prefix || message, on SHA-NI where the CPU has
    it (see sha256.h).

    The SHA-NI compression follows Intel's description of the extensions
    (and the public-domain code derived from it): the state lives in two
    registers as ABEF and CDGH, each sha256rnds2 does two rounds, and
    sha256msg1 / sha256msg2 extend the message schedule four words at a
    time.  The 16 groups of 4 rounds are written as one loop over a
    rotating window of four schedule registers, unrolled by the compiler. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>
#include "tally/sha256.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_SHANI_CODE 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static void
portable (uint8_t prefix, const uint8_t *msg, size_t len, uint8_t out[32])
{
    crypto_hash_sha256_state st;
    crypto_hash_sha256_init (&st);
    crypto_hash_sha256_update (&st, &prefix, 1);
    if (len > 0)
        crypto_hash_sha256_update (&st, msg, len);
    crypto_hash_sha256_final (&st, out);
}

#ifdef HAVE_SHANI_CODE

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t H0[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

/*  Compresses nblocks 64-byte blocks of data into state (a .. h). */
__attribute__ ((target ("sha,sse4.1,ssse3")))
static void
compress_ni (uint32_t state[8], const uint8_t *data, size_t nblocks)
{
    const __m128i bswap = _mm_set_epi64x (0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_loadu_si128 ((const __m128i *) &state[0]);
    __m128i st1 = _mm_loadu_si128 ((const __m128i *) &state[4]);
    tmp = _mm_shuffle_epi32 (tmp, 0xB1);            /* CDAB */
    st1 = _mm_shuffle_epi32 (st1, 0x1B);            /* EFGH */
    __m128i st0 = _mm_alignr_epi8 (tmp, st1, 8);    /* ABEF */
    st1 = _mm_blend_epi16 (st1, tmp, 0xF0);         /* CDGH */

    for (; nblocks > 0; nblocks--, data += 64) {
        __m128i abef = st0, cdgh = st1, w[4];
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            if (g < 4)
                w[g] = _mm_shuffle_epi8 (_mm_loadu_si128 ((const __m128i *) (data + 16 * g)),
                                         bswap);
            __m128i m = _mm_add_epi32 (w[g & 3], _mm_loadu_si128 ((const __m128i *) &K[4 * g]));
            st1 = _mm_sha256rnds2_epu32 (st1, st0, m);
            if (g >= 3 && g <= 14) {    /* words 4(g+1) .. 4(g+1)+3 of the schedule */
                __m128i t = _mm_alignr_epi8 (w[g & 3], w[(g - 1) & 3], 4);
                w[(g + 1) & 3] = _mm_sha256msg2_epu32 (_mm_add_epi32 (w[(g + 1) & 3], t),
                                                       w[g & 3]);
            }
            st0 = _mm_sha256rnds2_epu32 (st0, st1, _mm_shuffle_epi32 (m, 0x0E));
            if (g >= 1 && g <= 12)
                w[(g - 1) & 3] = _mm_sha256msg1_epu32 (w[(g - 1) & 3], w[g & 3]);
        }
        st0 = _mm_add_epi32 (st0, abef);
        st1 = _mm_add_epi32 (st1, cdgh);
    }

    tmp = _mm_shuffle_epi32 (st0, 0x1B);            /* FEBA */
    st1 = _mm_shuffle_epi32 (st1, 0xB1);            /* DCHG */
    st0 = _mm_blend_epi16 (tmp, st1, 0xF0);         /* DCBA */
    st1 = _mm_alignr_epi8 (st1, tmp, 8);            /* HGFE */
    _mm_storeu_si128 ((__m128i *) &state[0], st0);
    _mm_storeu_si128 ((__m128i *) &state[4], st1);
}

static void
with_ni (uint8_t prefix, const uint8_t *msg, size_t len, uint8_t out[32])
{
    uint32_t st[8];
    uint8_t block[128];
    memcpy (st, H0, sizeof st);
    /*  The first block starts with the prefix; whole blocks after it are
        read in place; the tail is padded in block. */
    size_t head = len < 63 ? len : 63, used = 1 + head;
    block[0] = prefix;
    if (head)
        memcpy (block + 1, msg, head);
    if (used == 64) {
        compress_ni (st, block, 1);
        const uint8_t *p = msg + head;
        size_t rest = len - head;
        compress_ni (st, p, rest / 64);
        used = rest % 64;
        memcpy (block, p + rest - used, used);
    }
    block[used++] = 0x80;
    size_t padded = used <= 56 ? 64 : 128;
    memset (block + used, 0, padded - used);
    uint64_t bits = ((uint64_t) len + 1) * 8;
    for (int i = 0; i < 8; i++)
        block[padded - 1 - i] = (uint8_t) (bits >> (8 * i));
    compress_ni (st, block, padded / 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t) (st[i] >> 24);
        out[4 * i + 1] = (uint8_t) (st[i] >> 16);
        out[4 * i + 2] = (uint8_t) (st[i] >> 8);
        out[4 * i + 3] = (uint8_t) st[i];
    }
}

/*  CPUID: leaf 7 EBX bit 29 (SHA), leaf 1 ECX bits 9 (SSSE3), 19 (SSE4.1). */
static bool
cpu_has_shani (void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid (1, &a, &b, &c, &d) || !(c & (1u << 9)) || !(c & (1u << 19)))
        return false;
    if (!__get_cpuid_count (7, 0, &a, &b, &c, &d))
        return false;
    return (b & (1u << 29)) != 0;
}

#endif

/*  -1 until the first call decides: 0 portable, 1 SHA-NI.  Racing first
    calls decide the same. */
static atomic_int s_impl = -1;

static int
impl (void)
{
    int v = atomic_load_explicit (&s_impl, memory_order_relaxed);
    if (v < 0) {
        const char *force = getenv ("TALLY_SHA256");
        v = 0;
#ifdef HAVE_SHANI_CODE
        v = !(force && strcmp (force, "portable") == 0) && cpu_has_shani ();
#else
        (void) force;
#endif
        atomic_store_explicit (&s_impl, v, memory_order_relaxed);
    }
    return v;
}

void
tly_sha256_prefixed (uint8_t prefix, const uint8_t *msg, size_t len, uint8_t out[32])
{
#ifdef HAVE_SHANI_CODE
    if (impl ()) {
        with_ni (prefix, msg, len, out);
        return;
    }
#endif
    portable (prefix, msg, len, out);
}

bool
tly_sha256_accelerated (void)
{
    return impl () == 1;
}
