/*  test_merkle.c -- the Merkle tree against an independent brute-force
    implementation of RFC 9162 2.1's recursive definitions (MTH, PATH,
    PROOF/SUBPROOF), known answers from the RFC 6962 reference test
    vectors, and node-read counts. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>
#include <sodium.h>
#include "tally/merkle.h"

#define N_MAX   130                 //  every tree size 0..N_MAX is checked
#define LEAVES  (N_MAX + 1)         //  one more, for "wrong size" roots
#define LEVELS  8                   //  2^7 <= LEAVES < 2^8

typedef uint8_t hash_t[TLY_HASH_LEN];

/* ---- the brute-force reference: RFC 9162 2.1 read literally ---- */

static uint8_t s_leaf[LEAVES][16];
static size_t s_leaf_len[LEAVES];

static void
bf_leaf (const uint8_t *d, size_t len, hash_t out)
{
    uint8_t buf[1 + 16];
    buf[0] = 0x00;
    memcpy (buf + 1, d, len);
    crypto_hash_sha256 (out, buf, 1 + len);
}

static void
bf_node (const hash_t l, const hash_t r, hash_t out)
{
    uint8_t buf[65];
    buf[0] = 0x01;
    memcpy (buf + 1, l, 32);
    memcpy (buf + 33, r, 32);
    crypto_hash_sha256 (out, buf, sizeof buf);
}

//  "the largest power of two smaller than n"
static size_t
bf_k (size_t n)
{
    size_t k = 1;
    while (k * 2 < n)
        k *= 2;
    return k;
}

//  MTH(D[a:b])
static void
bf_mth (size_t a, size_t b, hash_t out)
{
    size_t n = b - a;
    if (n == 0)
        crypto_hash_sha256 (out, (const uint8_t *) "", 0);
    else
    if (n == 1)
        bf_leaf (s_leaf[a], s_leaf_len[a], out);
    else {
        size_t k = bf_k (n);
        hash_t l, r;
        bf_mth (a, a + k, l);
        bf_mth (a + k, b, r);
        bf_node (l, r, out);
    }
}

//  PATH(m, D[a:b]), m relative to a
static void
bf_path (size_t m, size_t a, size_t b, hash_t *out, size_t *len)
{
    size_t n = b - a;
    if (n == 1) {
        *len = 0;
        return;
    }
    size_t k = bf_k (n);
    if (m < k) {
        bf_path (m, a, a + k, out, len);
        bf_mth (a + k, b, out[(*len)++]);
    }
    else {
        bf_path (m - k, a + k, b, out, len);
        bf_mth (a, a + k, out[(*len)++]);
    }
}

//  SUBPROOF(m, D[a:b], flag), m relative to a
static void
bf_subproof (size_t m, size_t a, size_t b, bool flag, hash_t *out, size_t *len)
{
    size_t n = b - a;
    if (m == n) {
        *len = 0;
        if (!flag)
            bf_mth (a, b, out[(*len)++]);
        return;
    }
    size_t k = bf_k (n);
    if (m <= k) {
        bf_subproof (m, a, a + k, flag, out, len);
        bf_mth (a + k, b, out[(*len)++]);
    }
    else {
        bf_subproof (m - k, a + k, b, false, out, len);
        bf_mth (a, a + k, out[(*len)++]);
    }
}

/* ---- the stored node table, filled through the frontier's emit ---- */

static hash_t s_node[LEVELS][LEAVES];
static bool s_have[LEVELS][LEAVES];
static hash_t s_leaf_hash[LEAVES];
static hash_t s_root[LEAVES + 1];          //  brute-force MTH of each size
static size_t s_emits;

typedef struct {
    uint64_t size;          //  reads beyond this tree size are a bug
    size_t reads;
    size_t fail_at;         //  if not 0: that read fails with TLY_EIO
} table_ctx;

static int
table_emit (void *ctx, unsigned level, uint64_t index, const uint8_t hash[32])
{
    (void) ctx;
    assert_true (level < LEVELS);
    assert_true (index < LEAVES);
    assert_false (s_have[level][index]);        //  each node exactly once
    memcpy (s_node[level][index], hash, 32);
    s_have[level][index] = true;
    s_emits++;
    return TLY_OK;
}

static int
table_get (void *ctx, unsigned level, uint64_t index, uint8_t out[32])
{
    table_ctx *t = ctx;
    if (++t->reads == t->fail_at)
        return TLY_EIO;
    if (level >= LEVELS || index >= LEAVES || !s_have[level][index]
    ||  index >= (t->size >> level))
        return TLY_ENOTFOUND;
    memcpy (out, s_node[level][index], 32);
    return TLY_OK;
}

static tly_frontier s_frontier_at[LEAVES + 1];

static int
setup (void **state)
{
    (void) state;
    assert_true (sodium_init () >= 0);
    //  Distinct leaves of varied lengths, including an empty one.
    for (size_t i = 0; i < LEAVES; i++) {
        s_leaf_len[i] = i == 0? 0: 2 + i % 9;
        for (size_t j = 0; j < s_leaf_len[i]; j++)
            s_leaf[i][j] = (uint8_t) (j == 0? i: i * 7 + j * 13);
        tly_merkle_leaf_hash (s_leaf[i], s_leaf_len[i], s_leaf_hash[i]);
    }
    for (size_t n = 0; n <= LEAVES; n++)
        bf_mth (0, n, s_root[n]);

    tly_frontier f;
    memset (&f, 0, sizeof f);
    memset (s_have, 0, sizeof s_have);
    for (size_t i = 0; i < LEAVES; i++) {
        s_frontier_at[i] = f;
        assert_int_equal (tly_frontier_push (&f, s_leaf_hash[i], table_emit, NULL), TLY_OK);
    }
    s_frontier_at[LEAVES] = f;
    return 0;
}

/* ---- helpers ---- */

static void
hex_to (const char *hex, uint8_t *out, size_t len)
{
    size_t bin_len;
    assert_int_equal (sodium_hex2bin (out, len, hex, strlen (hex), NULL, &bin_len, NULL), 0);
    assert_int_equal (bin_len, len);
}

static void
assert_hex (const uint8_t *got, const char *hex)
{
    uint8_t want[32];
    hex_to (hex, want, 32);
    assert_memory_equal (got, want, 32);
}

/* ---- known answers ---- */

//  The RFC 6962 reference test vectors (certificate-transparency's
//  merkle_tree_test), cross-checked with a separate Python implementation.
static const char *kat_leaf[8] = {
    "", "00", "10", "2021", "3031", "40414243",
    "5051525354555657", "606162636465666768696a6b6c6d6e6f"
};
static const char *kat_root[8] = {
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
};

typedef struct {
    hash_t node[4][8];
    uint64_t size;
} kat_table;

static int
kat_emit (void *ctx, unsigned level, uint64_t index, const uint8_t hash[32])
{
    kat_table *t = ctx;
    assert_true (level < 4 && index < 8);
    memcpy (t->node[level][index], hash, 32);
    return TLY_OK;
}

static int
kat_get (void *ctx, unsigned level, uint64_t index, uint8_t out[32])
{
    kat_table *t = ctx;
    if (level >= 4 || ((index + 1) << level) > t->size)
        return TLY_ENOTFOUND;
    memcpy (out, t->node[level][index], 32);
    return TLY_OK;
}

static void
test_known_answers (void **state)
{
    (void) state;
    hash_t h;
    tly_merkle_empty_root (h);
    assert_hex (h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    tly_merkle_leaf_hash (NULL, 0, h);
    assert_hex (h, "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");

    kat_table t;
    memset (&t, 0, sizeof t);
    tly_frontier f;
    memset (&f, 0, sizeof f);
    tly_frontier_root (&f, h);
    assert_hex (h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    for (int i = 0; i < 8; i++) {
        uint8_t leaf[16];
        size_t len = strlen (kat_leaf[i]) / 2;
        if (len)
            hex_to (kat_leaf[i], leaf, len);
        tly_merkle_leaf_hash (leaf, len, h);
        assert_int_equal (tly_frontier_push (&f, h, kat_emit, &t), TLY_OK);
        tly_frontier_root (&f, h);
        assert_hex (h, kat_root[i]);
        t.size = (uint64_t) i + 1;
        assert_int_equal (tly_merkle_root (kat_get, &t, NULL, t.size, h), TLY_OK);
        assert_hex (h, kat_root[i]);
    }

    //  Inclusion paths: (leaf, size) -> path.
    static const struct { uint64_t m, n; size_t len; const char *p[3]; } inc[] = {
        { 0, 8, 3, { "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                     "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                     "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4" } },
        { 5, 8, 3, { "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                     "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                     "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7" } },
        { 2, 3, 1, { "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125" } },
        { 0, 1, 0, { NULL } },
    };
    for (size_t v = 0; v < sizeof inc / sizeof inc[0]; v++) {
        hash_t path[TLY_PATH_MAX], root;
        size_t len = 99;
        t.size = inc[v].n;
        assert_int_equal (tly_merkle_inclusion (kat_get, &t, NULL, inc[v].m, inc[v].n, path, &len),
                          TLY_OK);
        assert_int_equal (len, inc[v].len);
        for (size_t i = 0; i < len; i++)
            assert_hex (path[i], inc[v].p[i]);
        hex_to (kat_root[inc[v].n - 1], root, 32);
        assert_int_equal (kat_get (&t, 0, inc[v].m, h), TLY_OK);
        assert_int_equal (tly_merkle_verify_inclusion (h, inc[v].m, inc[v].n,
                                                       (const uint8_t (*)[32]) path, len, root), TLY_OK);
    }

    //  Consistency proofs: (from, to) -> path.
    static const struct { uint64_t m, n; size_t len; const char *p[3]; } con[] = {
        { 1, 1, 0, { NULL } },
        { 1, 8, 3, { "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                     "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                     "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4" } },
        { 6, 8, 3, { "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                     "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                     "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7" } },
        { 2, 5, 2, { "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                     "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b" } },
    };
    t.size = 8;
    for (size_t v = 0; v < sizeof con / sizeof con[0]; v++) {
        hash_t path[TLY_PATH_MAX], r1, r2;
        size_t len = 99;
        assert_int_equal (tly_merkle_consistency (kat_get, &t, NULL, con[v].m, con[v].n, path,
                                                  &len), TLY_OK);
        assert_int_equal (len, con[v].len);
        for (size_t i = 0; i < len; i++)
            assert_hex (path[i], con[v].p[i]);
        hex_to (kat_root[con[v].m - 1], r1, 32);
        hex_to (kat_root[con[v].n - 1], r2, 32);
        assert_int_equal (tly_merkle_verify_consistency (con[v].m, con[v].n, r1, r2,
                                                         (const uint8_t (*)[32]) path, len), TLY_OK);
    }
}

/* ---- roots and the frontier, every size ---- */

static void
test_roots_and_frontier (void **state)
{
    (void) state;
    //  Every stored node is the MTH of the leaves it covers.
    size_t nodes = 0;
    for (unsigned l = 0; l < LEVELS; l++)
        for (size_t i = 0; i < LEAVES; i++) {
            bool whole = ((i + 1) << l) <= LEAVES;
            assert_int_equal (s_have[l][i], whole);
            if (whole) {
                hash_t h;
                bf_mth (i << l, (i + 1) << l, h);
                assert_memory_equal (s_node[l][i], h, 32);
                nodes++;
            }
        }
    assert_int_equal (s_emits, nodes);          //  2n - popcount(n) of them

    for (uint64_t n = 0; n <= LEAVES; n++) {
        hash_t h;
        tly_frontier_root (&s_frontier_at[n], h);
        assert_memory_equal (h, s_root[n], 32);

        table_ctx t = { .size = n };
        assert_int_equal (tly_merkle_root (table_get, &t, NULL, n, h), TLY_OK);
        assert_memory_equal (h, s_root[n], 32);
        assert_true (t.reads == (size_t) __builtin_popcountll (n));

        tly_frontier f;
        memset (&f, 0xa5, sizeof f);
        t.reads = 0;
        assert_int_equal (tly_frontier_load (&f, table_get, &t, n), TLY_OK);
        assert_int_equal (f.size, n);
        assert_true (t.reads == (size_t) __builtin_popcountll (n));
        for (unsigned l = 0; l < 64; l++)
            if ((n >> l) & 1)
                assert_memory_equal (f.frontier[l], s_frontier_at[n].frontier[l], 32);
        tly_frontier_root (&f, h);
        assert_memory_equal (h, s_root[n], 32);
    }
}

static int
failing_emit (void *ctx, unsigned level, uint64_t index, const uint8_t hash[32])
{
    (void) index; (void) hash;
    unsigned *fail_at = ctx;
    return level == *fail_at? TLY_EIO: TLY_OK;
}

static int
failing_get (void *ctx, unsigned level, uint64_t index, uint8_t out[32])
{
    (void) level; (void) index;
    size_t *left = ctx;
    if (*left == 0)
        return TLY_EIO;
    (*left)--;
    memset (out, 0x11, 32);
    return TLY_OK;
}

static void
test_frontier_errors (void **state)
{
    (void) state;
    //  A failed emit leaves the frontier as it was, at every level.
    tly_frontier f = s_frontier_at[127];
    for (unsigned fail_at = 0; fail_at <= 7; fail_at++) {
        tly_frontier g = f;
        assert_int_equal (tly_frontier_push (&g, s_leaf_hash[127], failing_emit, &fail_at), TLY_EIO);
        assert_memory_equal (&g, &f, sizeof f);
    }
    unsigned never = 99;
    assert_int_equal (tly_frontier_push (&f, s_leaf_hash[127], failing_emit, &never), TLY_OK);
    assert_memory_equal (&f, &s_frontier_at[128], sizeof f);

    //  No emit at all is allowed.
    f = s_frontier_at[5];
    assert_int_equal (tly_frontier_push (&f, s_leaf_hash[5], NULL, NULL), TLY_OK);
    hash_t h;
    tly_frontier_root (&f, h);
    assert_memory_equal (h, s_root[6], 32);

    //  A full tree cannot grow.
    memset (&f, 0, sizeof f);
    f.size = UINT64_MAX;
    assert_int_equal (tly_frontier_push (&f, h, NULL, NULL), TLY_ETOOLARGE);

    //  Read errors propagate unchanged; a failed load leaves it empty.
    for (size_t ok = 0; ok < 3; ok++) {
        size_t left = ok;
        assert_int_equal (tly_frontier_load (&f, failing_get, &left, 7), TLY_EIO);
        assert_int_equal (f.size, 0);
        left = ok;
        assert_int_equal (tly_merkle_root (failing_get, &left, NULL, 7, h), TLY_EIO);
        hash_t path[TLY_PATH_MAX];
        size_t len;
        left = ok;
        assert_int_equal (tly_merkle_inclusion (failing_get, &left, NULL, 2, 7, path, &len),
                          TLY_EIO);
        left = ok;
        assert_int_equal (tly_merkle_consistency (failing_get, &left, NULL, 3, 7, path, &len),
                          TLY_EIO);
    }
    table_ctx t = { .size = 5 };
    assert_int_equal (tly_merkle_root (table_get, &t, NULL, 9, h), TLY_ENOTFOUND);
}

/* ---- inclusion, every (m, n) ---- */

static int
verify_inc (const hash_t leaf, uint64_t m, uint64_t n, hash_t *path, size_t len,
            const hash_t root)
{
    return tly_merkle_verify_inclusion (leaf, m, n, (const uint8_t (*)[32]) path, len, root);
}

static void
test_inclusion_all (void **state)
{
    (void) state;
    size_t checked = 0;
    for (uint64_t n = 1; n <= N_MAX; n++)
        for (uint64_t m = 0; m < n; m++) {
            hash_t want[TLY_PATH_MAX], path[TLY_PATH_MAX + 1];
            size_t want_len, len;
            bf_path (m, 0, n, want, &want_len);
            table_ctx t = { .size = n };
            assert_int_equal (tly_merkle_inclusion (table_get, &t, NULL, m, n, path, &len), TLY_OK);
            assert_int_equal (len, want_len);
            assert_memory_equal (path, want, len * 32);
            assert_true (t.reads <= 2 * 8);

            const uint8_t *leaf = s_leaf_hash[m];
            const uint8_t *root = s_root[n];
            assert_int_equal (verify_inc (leaf, m, n, path, len, root), TLY_OK);

            //  A flipped bit anywhere in the path.
            for (size_t i = 0; i < len; i++) {
                unsigned bit = (unsigned) ((i * 37 + m) % 256);
                path[i][bit / 8] ^= (uint8_t) (1u << (bit % 8));
                assert_int_equal (verify_inc (leaf, m, n, path, len, root), TLY_ECRYPTO);
                path[i][bit / 8] ^= (uint8_t) (1u << (bit % 8));
            }
            //  The wrong leaf, a flipped leaf, a flipped root.
            hash_t bad;
            if (n > 1)
                assert_int_equal (verify_inc (s_leaf_hash[(m + 1) % n], m, n, path, len, root),
                                  TLY_ECRYPTO);
            memcpy (bad, leaf, 32);
            bad[31] ^= 1;
            assert_int_equal (verify_inc (bad, m, n, path, len, root), TLY_ECRYPTO);
            memcpy (bad, root, 32);
            bad[0] ^= 0x80;
            assert_int_equal (verify_inc (leaf, m, n, path, len, bad), TLY_ECRYPTO);
            //  The wrong index.
            for (uint64_t m2 = (m >= 2? m - 2: 0); m2 < n && m2 <= m + 2; m2++)
                if (m2 != m)
                    assert_int_equal (verify_inc (leaf, m2, n, path, len, root), TLY_ECRYPTO);
            assert_int_equal (verify_inc (leaf, m ^ 1, n, path, len, root),
                              (m ^ 1) < n? TLY_ECRYPTO: TLY_EINVAL);
            assert_int_equal (verify_inc (leaf, n, n, path, len, root), TLY_EINVAL);
            //  The wrong size, with that size's true root (the size itself
            //  is bound by the signed head, not by the path).
            if (m < n - 1)
                assert_int_equal (verify_inc (leaf, m, n - 1, path, len, s_root[n - 1]), TLY_ECRYPTO);
            assert_int_equal (verify_inc (leaf, m, n + 1, path, len, s_root[n + 1]), TLY_ECRYPTO);
            //  Truncated and extended paths.
            if (len > 0) {
                assert_int_equal (verify_inc (leaf, m, n, path, len - 1, root), TLY_ECRYPTO);
                assert_int_equal (verify_inc (leaf, m, n, path + 1, len - 1, root), TLY_ECRYPTO);
                assert_int_equal (verify_inc (leaf, m, n, path, 0, root), TLY_ECRYPTO);
            }
            memcpy (path[len], len? path[len - 1]: leaf, 32);
            assert_int_equal (verify_inc (leaf, m, n, path, len + 1, root), TLY_ECRYPTO);
            memset (path[len], 0, 32);
            assert_int_equal (verify_inc (leaf, m, n, path, len + 1, root), TLY_ECRYPTO);
            checked++;
        }
    assert_int_equal (checked, N_MAX * (N_MAX + 1) / 2);

    hash_t path[TLY_PATH_MAX];
    size_t len;
    table_ctx t = { .size = 4 };
    assert_int_equal (tly_merkle_inclusion (table_get, &t, NULL, 4, 4, path, &len), TLY_EINVAL);
    assert_int_equal (tly_merkle_inclusion (table_get, &t, NULL, 0, 0, path, &len), TLY_EINVAL);
    assert_int_equal (verify_inc (s_leaf_hash[0], 0, 0, path, 0, s_root[0]), TLY_EINVAL);
}

/* ---- consistency, every 0 < m <= n ---- */

static int
verify_con (uint64_t m, uint64_t n, const hash_t r1, const hash_t r2,
            hash_t *path, size_t len)
{
    return tly_merkle_verify_consistency (m, n, r1, r2, (const uint8_t (*)[32]) path, len);
}

static void
test_consistency_all (void **state)
{
    (void) state;
    size_t checked = 0;
    for (uint64_t n = 1; n <= N_MAX; n++)
        for (uint64_t m = 1; m <= n; m++) {
            hash_t want[TLY_PATH_MAX], path[TLY_PATH_MAX + 1];
            size_t want_len, len;
            bf_subproof (m, 0, n, true, want, &want_len);
            table_ctx t = { .size = n };
            assert_int_equal (tly_merkle_consistency (table_get, &t, NULL, m, n, path, &len),
                              TLY_OK);
            assert_int_equal (len, want_len);
            assert_memory_equal (path, want, len * 32);
            assert_true (t.reads <= 2 * 8 + 1);

            const uint8_t *r1 = s_root[m], *r2 = s_root[n];
            assert_int_equal (verify_con (m, n, r1, r2, path, len), TLY_OK);
            if (m == n) {
                assert_int_equal (len, 0);
                hash_t bad;
                memcpy (bad, r2, 32);
                bad[5] ^= 4;
                assert_int_equal (verify_con (m, n, r1, bad, path, 0), TLY_ECRYPTO);
                memcpy (path[0], r1, 32);
                assert_int_equal (verify_con (m, n, r1, r2, path, 1), TLY_ECRYPTO);
                checked++;
                continue;
            }
            assert_true (len > 0);
            for (size_t i = 0; i < len; i++) {
                unsigned bit = (unsigned) ((i * 41 + m + n) % 256);
                path[i][bit / 8] ^= (uint8_t) (1u << (bit % 8));
                assert_int_equal (verify_con (m, n, r1, r2, path, len), TLY_ECRYPTO);
                path[i][bit / 8] ^= (uint8_t) (1u << (bit % 8));
            }
            hash_t bad;
            memcpy (bad, r1, 32);
            bad[7] ^= 0x10;
            assert_int_equal (verify_con (m, n, bad, r2, path, len), TLY_ECRYPTO);
            memcpy (bad, r2, 32);
            bad[8] ^= 0x10;
            assert_int_equal (verify_con (m, n, r1, bad, path, len), TLY_ECRYPTO);
            assert_int_equal (verify_con (m, n, r2, r1, path, len), TLY_ECRYPTO);
            //  Other sizes, each with its own true root.
            for (uint64_t m2 = (m > 2? m - 2: 1); m2 <= n && m2 <= m + 2; m2++)
                if (m2 != m)
                    assert_int_equal (verify_con (m2, n, s_root[m2], r2, path, len), TLY_ECRYPTO);
            for (uint64_t n2 = (n - 2 > m? n - 2: m); n2 <= n + 1; n2++)
                if (n2 != n)
                    assert_int_equal (verify_con (m, n2, r1, s_root[n2], path, len), TLY_ECRYPTO);
            //  Truncated and extended.
            assert_int_equal (verify_con (m, n, r1, r2, path, len - 1), TLY_ECRYPTO);
            assert_int_equal (verify_con (m, n, r1, r2, path + 1, len - 1), TLY_ECRYPTO);
            assert_int_equal (verify_con (m, n, r1, r2, path, 0), TLY_ECRYPTO);
            memcpy (path[len], path[len - 1], 32);
            assert_int_equal (verify_con (m, n, r1, r2, path, len + 1), TLY_ECRYPTO);
            memcpy (path[len], r1, 32);
            assert_int_equal (verify_con (m, n, r1, r2, path, len + 1), TLY_ECRYPTO);
            //  Prepending root1 ourselves must not help either.
            if ((m & (m - 1)) == 0) {
                memmove (path[1], path[0], len * 32);
                memcpy (path[0], r1, 32);
                assert_int_equal (verify_con (m, n, r1, r2, path, len + 1), TLY_ECRYPTO);
            }
            checked++;
        }
    assert_int_equal (checked, N_MAX * (N_MAX + 1) / 2);

    hash_t path[TLY_PATH_MAX];
    size_t len;
    table_ctx t = { .size = 4 };
    assert_int_equal (tly_merkle_consistency (table_get, &t, NULL, 0, 4, path, &len), TLY_EINVAL);
    assert_int_equal (tly_merkle_consistency (table_get, &t, NULL, 5, 4, path, &len), TLY_EINVAL);
    assert_int_equal (verify_con (0, 4, s_root[0], s_root[4], path, 0), TLY_EINVAL);
    assert_int_equal (verify_con (5, 4, s_root[5], s_root[4], path, 0), TLY_EINVAL);
}

/* ---- the right edge, kept between calls ---- */

//  One tly_merkle_edge lent to every call while the tree size changes from
//  call to call: every answer is the brute force's, and once a size's edge
//  is folded its ranges cost no reads (a root, then each path element at
//  most one read).
static void
test_edge_kept (void **state)
{
    (void) state;
    tly_merkle_edge edge;
    memset (&edge, 0, sizeof edge);
    size_t saved = 0;
    for (uint64_t m = 0; m < N_MAX; m++)
        for (uint64_t n = m + 1; n <= N_MAX; n++) {
            hash_t want[TLY_PATH_MAX], path[TLY_PATH_MAX + 1], h;
            size_t want_len, len;
            table_ctx t = { .size = n };
            bf_path (m, 0, n, want, &want_len);
            assert_int_equal (tly_merkle_inclusion (table_get, &t, &edge, m, n, path, &len),
                              TLY_OK);
            assert_int_equal (len, want_len);
            assert_memory_equal (path, want, len * 32);

            assert_int_equal (tly_merkle_root (table_get, &t, &edge, n, h), TLY_OK);
            assert_memory_equal (h, s_root[n], 32);
            t.reads = 0;
            assert_int_equal (tly_merkle_root (table_get, &t, &edge, n, h), TLY_OK);
            assert_memory_equal (h, s_root[n], 32);
            assert_true (t.reads == (__builtin_popcountll (n) == 1));

            t.reads = 0;
            assert_int_equal (tly_merkle_inclusion (table_get, &t, &edge, m, n, path, &len),
                              TLY_OK);
            assert_memory_equal (path, want, len * 32);
            assert_true (t.reads <= len);
            table_ctx plain = { .size = n };
            assert_int_equal (tly_merkle_inclusion (table_get, &plain, NULL, m, n, path, &len),
                              TLY_OK);
            saved += plain.reads - t.reads;

            uint64_t old = m + 1;
            bf_subproof (old, 0, n, true, want, &want_len);
            t.reads = 0;
            assert_int_equal (tly_merkle_consistency (table_get, &t, &edge, old, n, path, &len),
                              TLY_OK);
            assert_int_equal (len, want_len);
            assert_memory_equal (path, want, len * 32);
            assert_true (t.reads <= len);
        }
    assert_true (saved > 0);

    //  A read that fails half way through a fold leaves only folds that
    //  were made of what was read: the proofs that use the shorter folds
    //  (every leaf's sibling on the edge) and then the root are right.
    for (size_t ok = 0; ok < 5; ok++) {          //  103 = 64 + 32 + 4 + 2 + 1
        memset (&edge, 0, sizeof edge);
        hash_t h;
        table_ctx t = { .size = 103, .fail_at = ok + 1 };
        assert_int_equal (tly_merkle_root (table_get, &t, &edge, 103, h), TLY_EIO);
        t.fail_at = 0;
        for (uint64_t m = 0; m < 103; m++) {
            hash_t want[TLY_PATH_MAX], path[TLY_PATH_MAX + 1];
            size_t want_len, len;
            bf_path (m, 0, 103, want, &want_len);
            assert_int_equal (tly_merkle_inclusion (table_get, &t, &edge, m, 103, path, &len),
                              TLY_OK);
            assert_int_equal (len, want_len);
            assert_memory_equal (path, want, len * 32);
        }
        assert_int_equal (tly_merkle_root (table_get, &t, &edge, 103, h), TLY_OK);
        assert_memory_equal (h, s_root[103], 32);
        assert_int_equal (tly_merkle_root (table_get, &t, &edge, 103, h), TLY_OK);
        assert_memory_equal (h, s_root[103], 32);
    }
}

/* ---- huge trees: read counts, and 64-bit edges ---- */

//  A tree whose leaves are all the same: node (l, i) is u[l] for every i,
//  so proofs of any size can be generated and verified for real.
static hash_t s_uniform[65];

typedef struct {
    size_t reads;
    uint64_t size;
} uniform_ctx;

static int
uniform_get (void *ctx, unsigned level, uint64_t index, uint8_t out[32])
{
    uniform_ctx *u = ctx;
    u->reads++;
    assert_true (level < 64);
    assert_true (index < (u->size >> level));       //  inside the tree
    memcpy (out, s_uniform[level], 32);
    return TLY_OK;
}

static uint64_t
rng (uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static tly_merkle_edge s_edge;       //  lent to every size in turn

static void
check_big (uint64_t m, uint64_t n, size_t *max_reads)
{
    hash_t root, r1, path[TLY_PATH_MAX];
    size_t len;
    uniform_ctx u = { .size = n };
    assert_int_equal (tly_merkle_root (uniform_get, &u, NULL, n, root), TLY_OK);
    assert_true (u.reads <= 64);
    assert_int_equal (tly_merkle_root (uniform_get, &u, &s_edge, n, r1), TLY_OK);
    assert_memory_equal (r1, root, 32);
    if (m < n) {
        u.reads = 0;
        assert_int_equal (tly_merkle_inclusion (uniform_get, &u, NULL, m, n, path, &len), TLY_OK);
        assert_true (u.reads <= 3 * 64);
        if (u.reads > *max_reads)
            *max_reads = u.reads;
        assert_int_equal (tly_merkle_verify_inclusion (s_uniform[0], m, n,
                                                       (const uint8_t (*)[32]) path, len, root), TLY_OK);
        hash_t kept[TLY_PATH_MAX];
        size_t kept_len;
        assert_int_equal (tly_merkle_inclusion (uniform_get, &u, &s_edge, m, n, kept, &kept_len),
                          TLY_OK);
        assert_int_equal (kept_len, len);
        assert_memory_equal (kept, path, len * 32);
        if (len) {
            path[len / 2][3] ^= 8;
            assert_int_equal (tly_merkle_verify_inclusion (s_uniform[0], m, n,
                                                           (const uint8_t (*)[32]) path, len, root),
                              TLY_ECRYPTO);
        }
    }
    if (m > 0 && n <= (UINT64_C (1) << 63)) {
        u.size = m;
        assert_int_equal (tly_merkle_root (uniform_get, &u, NULL, m, r1), TLY_OK);
        u.size = n;
        u.reads = 0;
        assert_int_equal (tly_merkle_consistency (uniform_get, &u, NULL, m, n, path, &len), TLY_OK);
        assert_true (u.reads <= 3 * 64);
        if (u.reads > *max_reads)
            *max_reads = u.reads;
        assert_int_equal (tly_merkle_verify_consistency (m, n, r1, root,
                                                         (const uint8_t (*)[32]) path, len), TLY_OK);
    }
}

static void
test_big_trees (void **state)
{
    (void) state;
    tly_merkle_leaf_hash ((const uint8_t *) "x", 1, s_uniform[0]);
    for (int l = 1; l <= 64; l++)
        tly_merkle_node_hash (s_uniform[l - 1], s_uniform[l - 1], s_uniform[l]);

    size_t max_reads = 0;
    uint64_t seed = 0x9e3779b97f4a7c15u;
    //  Every n up to 2^12 and random n up to 2^20, several m each.
    for (uint64_t n = 1; n <= (1u << 20); n = n < 4096? n + 1: n + 1 + rng (&seed) % 4000) {
        uint64_t ms[] = { 0, 1, n / 2, n - 1, n, rng (&seed) % n, rng (&seed) % n };
        for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++)
            if (ms[i] <= n)
                check_big (ms[i], n, &max_reads);
    }
    check_big (1u << 20, 1u << 20, &max_reads);
    check_big ((1u << 20) - 1, 1u << 20, &max_reads);
    //  And the 64-bit edges.
    for (int i = 0; i < 2000; i++) {
        uint64_t n = rng (&seed) >> (rng (&seed) % 64);
        if (n == 0)
            continue;
        check_big (rng (&seed) % n, n, &max_reads);
    }
    uint64_t edges[][2] = {
        { 0, UINT64_MAX }, { UINT64_MAX - 1, UINT64_MAX }, { UINT64_C (1) << 62, UINT64_MAX },
        { 1, UINT64_C (1) << 63 }, { (UINT64_C (1) << 63) - 1, UINT64_C (1) << 63 },
        { UINT64_C (1) << 62, (UINT64_C (1) << 63) + 1 }, { 3, UINT64_MAX - 1 },
    };
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++)
        check_big (edges[i][0], edges[i][1], &max_reads);
    print_message ("max node reads per proof: %zu\n", max_reads);

    //  A 2^64 - 1 tree can have a 65-hash consistency proof.
    hash_t path[TLY_PATH_MAX];
    size_t len;
    uniform_ctx u = { .size = UINT64_MAX };
    assert_int_equal (tly_merkle_consistency (uniform_get, &u, NULL, 3, UINT64_MAX, path, &len),
                      TLY_ETOOLARGE);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_known_answers),
        cmocka_unit_test (test_roots_and_frontier),
        cmocka_unit_test (test_frontier_errors),
        cmocka_unit_test (test_inclusion_all),
        cmocka_unit_test (test_consistency_all),
        cmocka_unit_test (test_edge_kept),
        cmocka_unit_test (test_big_trees),
    };
    return cmocka_run_group_tests (tests, setup, NULL);
}
