/*  test_nodecache.c -- the node cache answers exactly what its source
    answers, keeps only the levels tly_nodecache_fit chose, never caches an
    error, and proofs through it equal proofs without it. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <string.h>
#include <cmocka.h>
#include "tally/nodecache.h"

/*  A synthetic source: node (level, index) of a tree of `size` leaves,
    with a hash made from its coordinates, and a hole to fail on. */
typedef struct {
    uint64_t size;
    uint64_t reads;
    unsigned hole_level;
    uint64_t hole_index;
} src_t;

static int
src_get (void *ctx, unsigned level, uint64_t index, uint8_t out[TLY_HASH_LEN])
{
    src_t *s = ctx;
    s->reads++;
    if (level >= 64 || ((index + 1) << level) > s->size)
        return TLY_ENOTFOUND;       /* not a perfect subtree of the tree */
    if (level == s->hole_level && index == s->hole_index)
        return TLY_EIO;
    memset (out, 0, TLY_HASH_LEN);
    memcpy (out, &index, 8);
    out[8] = (uint8_t) level;
    out[31] = (uint8_t) (index * 31 + level);
    return TLY_OK;
}

static void
test_new_rejects_bad_sizes (void **state)
{
    (void) state;
    tly_nodecache *c = NULL;
    assert_int_equal (tly_nodecache_new (3, &c), TLY_EINVAL);
    assert_int_equal (tly_nodecache_new (25, &c), TLY_EINVAL);
    assert_null (c);
    assert_int_equal (tly_nodecache_new (4, &c), TLY_OK);
    tly_nodecache_destroy (&c);
    assert_null (c);
    tly_nodecache_destroy (&c);     /* twice is harmless */
}

/*  256 slots over 2^20 leaves: the levels with at most 64 nodes, i.e.
    >= 14, are kept; a second pass over them is answered (mostly) from the
    cache, and every answer equals the source's. */
static void
test_keeps_upper_levels_only (void **state)
{
    (void) state;
    src_t src = { .size = UINT64_C (1) << 20, .hole_level = 99 };
    tly_nodecache *c;
    assert_int_equal (tly_nodecache_new (8, &c), TLY_OK);
    tly_nodecache_fit (c, src_get, &src, src.size);
    for (int pass = 0; pass < 2; pass++) {
        for (unsigned level = 0; level <= 20; level++)
            for (uint64_t i = 0; i < (src.size >> level) && i < 64; i++) {
                uint8_t got[TLY_HASH_LEN], want[TLY_HASH_LEN];
                assert_int_equal (tly_nodecache_node (c, level, i, got), TLY_OK);
                assert_int_equal (src_get (&src, level, i, want), TLY_OK);
                assert_memory_equal (got, want, TLY_HASH_LEN);
            }
    }
    uint64_t hits, misses, nodes_up = 0;
    for (unsigned level = 14; level <= 20; level++)
        nodes_up += src.size >> level;          /* 127, into 256 slots */
    tly_nodecache_stats (c, &hits, &misses);
    //  Lower levels always miss: 14 levels x 64 nodes x 2 passes.
    assert_true (misses >= 14 * 64 * 2);
    //  The second pass over the upper levels hits where no two of them
    //  share a slot: most of them.
    assert_true (hits > nodes_up / 2 && hits <= nodes_up);
    //  A bigger tree moves the line up: 2^22 leaves keep levels >= 16.
    uint64_t before = hits;
    src.size = UINT64_C (1) << 22;
    tly_nodecache_fit (c, src_get, &src, src.size);
    uint8_t h[TLY_HASH_LEN];
    assert_int_equal (tly_nodecache_node (c, 15, 0, h), TLY_OK);
    assert_int_equal (tly_nodecache_node (c, 15, 0, h), TLY_OK);
    tly_nodecache_stats (c, &hits, &misses);
    assert_true (hits == before);
    tly_nodecache_destroy (&c);
}

static void
test_errors_pass_through_uncached (void **state)
{
    (void) state;
    src_t src = { .size = 1000, .hole_level = 9, .hole_index = 0 };
    tly_nodecache *c;
    assert_int_equal (tly_nodecache_new (10, &c), TLY_OK);
    tly_nodecache_fit (c, src_get, &src, src.size);
    uint8_t h[TLY_HASH_LEN];
    for (int i = 0; i < 3; i++) {
        uint64_t reads = src.reads;
        assert_int_equal (tly_nodecache_node (c, 9, 0, h), TLY_EIO);
        assert_int_equal (src.reads, reads + 1);            /* asked again each time */
        assert_int_equal (tly_nodecache_node (c, 9, 1, h), TLY_ENOTFOUND);
        assert_int_equal (src.reads, reads + 2);
    }
    //  Once the source recovers, the node is read and then kept.
    src.hole_level = 99;
    assert_int_equal (tly_nodecache_node (c, 9, 0, h), TLY_OK);
    uint64_t reads = src.reads;
    assert_int_equal (tly_nodecache_node (c, 9, 0, h), TLY_OK);
    assert_int_equal (src.reads, reads);
    tly_nodecache_destroy (&c);
}

/*  Inclusion and consistency paths through a small cache (many slot
    collisions) equal the paths read straight from the source. */
static void
test_proofs_unchanged (void **state)
{
    (void) state;
    src_t src = { .hole_level = 99 }, direct = { .hole_level = 99 };
    tly_nodecache *c;
    assert_int_equal (tly_nodecache_new (4, &c), TLY_OK);
    uint8_t p1[TLY_PATH_MAX][TLY_HASH_LEN], p2[TLY_PATH_MAX][TLY_HASH_LEN];
    size_t n1, n2;
    uint64_t x = 12345;
    for (int t = 0; t < 2000; t++) {
        x = x * 6364136223846793005u + 1442695040888963407u;
        uint64_t n = 1 + (x >> 40) % 100000, m = (x >> 8) % n;
        src.size = direct.size = n;
        tly_nodecache_fit (c, src_get, &src, n);
        assert_int_equal (tly_merkle_inclusion (tly_nodecache_node, c, NULL, m, n, p1, &n1),
                          TLY_OK);
        assert_int_equal (tly_merkle_inclusion (src_get, &direct, NULL, m, n, p2, &n2), TLY_OK);
        assert_int_equal (n1, n2);
        assert_memory_equal (p1, p2, n1 * TLY_HASH_LEN);
        assert_int_equal (tly_merkle_consistency (tly_nodecache_node, c, NULL, m + 1, n, p1, &n1),
                          TLY_OK);
        assert_int_equal (tly_merkle_consistency (src_get, &direct, NULL, m + 1, n, p2, &n2),
                          TLY_OK);
        assert_int_equal (n1, n2);
        assert_memory_equal (p1, p2, n1 * TLY_HASH_LEN);
    }
    uint64_t hits, misses;
    tly_nodecache_stats (c, &hits, &misses);
    assert_true (hits > 0);
    tly_nodecache_destroy (&c);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_new_rejects_bad_sizes),
        cmocka_unit_test (test_keeps_upper_levels_only),
        cmocka_unit_test (test_errors_pass_through_uncached),
        cmocka_unit_test (test_proofs_unchanged),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
