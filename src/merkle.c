/*  merkle.c -- the RFC 9162 section 2.1 Merkle tree over SHA-256.

    Proof generation never walks the tree recursively.  RFC 9162's
    recursions split a range D[a:b] at the largest power of two k < b - a,
    and every range they visit starts at a multiple of the next power of two
    at or above its size.  So the MTH of any such range is the fold of at
    most 64 stored perfect subtrees (one per set bit of b - a), and once a
    descent enters a left half it stays inside perfect subtrees.  Each
    function below first plans its ranges without any reads, then reads
    each range once: O(log n) calls of the node function in all.
*/
#include <assert.h>
#include <string.h>
#include <sodium.h>
#include "tally/merkle.h"
#include "tally/sha256.h"

/*  The largest power of two strictly less than n, for n >= 2. */
static uint64_t
split_point (uint64_t n)
{
    assert (n >= 2);
    uint64_t k = UINT64_C (1) << (63 - __builtin_clzll (n - 1));
    return k;
}

static unsigned
lowest_bit (uint64_t x)
{
    assert (x != 0);
    return (unsigned) __builtin_ctzll (x);
}

void
tly_merkle_leaf_hash (const uint8_t *leaf, size_t len, uint8_t out[TLY_HASH_LEN])
{
    tly_sha256_prefixed (0x00, leaf, len, out);
}

void
tly_merkle_node_hash (const uint8_t left[TLY_HASH_LEN],
                      const uint8_t right[TLY_HASH_LEN],
                      uint8_t out[TLY_HASH_LEN])
{
    //  One contiguous message, which also lets `out` alias `left` or `right`.
    uint8_t msg[2 * TLY_HASH_LEN];
    memcpy (msg, left, TLY_HASH_LEN);
    memcpy (msg + TLY_HASH_LEN, right, TLY_HASH_LEN);
    tly_sha256_prefixed (0x01, msg, sizeof msg, out);
}

void
tly_merkle_empty_root (uint8_t out[TLY_HASH_LEN])
{
    crypto_hash_sha256 (out, NULL, 0);
}

/*  MTH(D[a:b]) for a range that RFC 9162's recursion can produce: a is a
    multiple of the largest power of two <= b - a.  Folds the perfect
    subtrees of the range from the right, as the recursion would.
    Reads popcount(b - a) nodes, or none when edge holds the range: a
    range that is not a perfect subtree ends the tree (b == n), and the
    folds of its lower parts, met on the way, are the shorter ranges ending
    at b, so each fold is kept in edge (if not NULL) as it is made. */
static int
range_hash (tly_node_fn *get, void *ctx, tly_merkle_edge *edge, uint64_t a, uint64_t b,
            uint8_t out[TLY_HASH_LEN])
{
    assert (a < b);
    uint64_t rest = b - a;
    unsigned parts = (unsigned) __builtin_popcountll (rest);
    if (parts == 1 || parts > 63)
        edge = NULL;                        //  a stored node, or a range of 2^64 - 1
    if (edge && edge->n != b) {
        edge->n = b;
        edge->have = 0;
    }
    if (edge && (edge->have >> parts & 1) && edge->start[parts] == a) {
        memcpy (out, edge->fold[parts], TLY_HASH_LEN);
        return TLY_OK;
    }
    uint64_t end = b;
    unsigned folded = 0;
    while (rest) {
        unsigned level = lowest_bit (rest);
        uint64_t width = UINT64_C (1) << level;
        end -= width;
        assert (end % width == 0);
        uint8_t h[TLY_HASH_LEN];
        int rc = get (ctx, level, end >> level, h);
        if (rc != TLY_OK)
            return rc;
        if (folded++ == 0)
            memcpy (out, h, TLY_HASH_LEN);
        else
            tly_merkle_node_hash (h, out, out);
        if (edge && folded >= 2) {
            memcpy (edge->fold[folded], out, TLY_HASH_LEN);
            edge->start[folded] = end;
            edge->have |= UINT64_C (1) << folded;
        }
        rest &= rest - 1;
    }
    return TLY_OK;
}

int
tly_merkle_root (tly_node_fn *get, void *ctx, tly_merkle_edge *edge, uint64_t n,
                 uint8_t out[TLY_HASH_LEN])
{
    if (n == 0) {
        tly_merkle_empty_root (out);
        return TLY_OK;
    }
    return range_hash (get, ctx, edge, 0, n, out);
}

/*  A planned path: the ranges whose MTHs make the path, in path order. */
typedef struct {
    uint64_t a[TLY_PATH_MAX + 1];
    uint64_t b[TLY_PATH_MAX + 1];
    size_t len;
} plan;

static int
plan_fill (const plan *p, tly_node_fn *get, void *ctx, tly_merkle_edge *edge,
           uint8_t path[][TLY_HASH_LEN], size_t *path_len)
{
    if (p->len > TLY_PATH_MAX)
        return TLY_ETOOLARGE;
    for (size_t i = 0; i < p->len; i++) {
        int rc = range_hash (get, ctx, edge, p->a[i], p->b[i], path[i]);
        if (rc != TLY_OK)
            return rc;
    }
    *path_len = p->len;
    return TLY_OK;
}

int
tly_merkle_inclusion (tly_node_fn *get, void *ctx, tly_merkle_edge *edge,
                      uint64_t m, uint64_t n, uint8_t path[][TLY_HASH_LEN], size_t *path_len)
{
    if (m >= n)
        return TLY_EINVAL;
    //  PATH(m, D[a:b]) = PATH(m, child holding m) : MTH(other child).
    //  Descending from the root meets the siblings root-first; the path
    //  lists them leaf-first, so store them from the back.
    uint64_t sib_a[64], sib_b[64];
    size_t depth = 0;
    uint64_t a = 0, b = n;
    while (b - a > 1) {
        assert (depth < 64);
        uint64_t k = split_point (b - a);
        if (m < a + k) {
            sib_a[depth] = a + k;
            sib_b[depth] = b;
            b = a + k;
        }
        else {
            sib_a[depth] = a;
            sib_b[depth] = a + k;
            a = a + k;
        }
        depth++;
    }
    plan p;
    p.len = depth;
    for (size_t i = 0; i < depth; i++) {
        p.a[i] = sib_a[depth - 1 - i];
        p.b[i] = sib_b[depth - 1 - i];
    }
    return plan_fill (&p, get, ctx, edge, path, path_len);
}

int
tly_merkle_consistency (tly_node_fn *get, void *ctx, tly_merkle_edge *edge,
                        uint64_t m, uint64_t n, uint8_t path[][TLY_HASH_LEN], size_t *path_len)
{
    if (m == 0 || m > n)
        return TLY_EINVAL;
    //  SUBPROOF(m, D[a:b], whole):
    //    m == b - a: {} if whole, else {MTH(D[a:b])};
    //    m <= k:     SUBPROOF(m, D[a:a+k], whole) : MTH(D[a+k:b]);
    //    m >  k:     SUBPROOF(m - k, D[a+k:b], false) : MTH(D[a:a+k]).
    //  Here m stays absolute (a + relative m).  Appended hashes are met
    //  outermost first but listed innermost first.
    uint64_t sib_a[64], sib_b[64];
    size_t depth = 0;
    uint64_t a = 0, b = n;
    bool whole = true;
    while (m != b) {
        assert (depth < 64 && b - a >= 2);
        uint64_t k = split_point (b - a);
        if (m <= a + k) {
            sib_a[depth] = a + k;
            sib_b[depth] = b;
            b = a + k;
        }
        else {
            sib_a[depth] = a;
            sib_b[depth] = a + k;
            a = a + k;
            whole = false;
        }
        depth++;
    }
    plan p;
    p.len = 0;
    if (!whole) {
        p.a[0] = a;
        p.b[0] = b;
        p.len = 1;
    }
    for (size_t i = 0; i < depth; i++) {
        p.a[p.len] = sib_a[depth - 1 - i];
        p.b[p.len] = sib_b[depth - 1 - i];
        p.len++;
    }
    return plan_fill (&p, get, ctx, edge, path, path_len);
}

int
tly_merkle_verify_inclusion (const uint8_t leaf_hash[TLY_HASH_LEN],
                             uint64_t m, uint64_t n,
                             const uint8_t path[][TLY_HASH_LEN], size_t path_len,
                             const uint8_t root[TLY_HASH_LEN])
{
    //  RFC 9162 2.1.3.2, step by step.
    if (m >= n)
        return TLY_EINVAL;
    uint64_t fn = m;
    uint64_t sn = n - 1;
    uint8_t r[TLY_HASH_LEN];
    memcpy (r, leaf_hash, TLY_HASH_LEN);
    for (size_t i = 0; i < path_len; i++) {
        if (sn == 0)
            return TLY_ECRYPTO;            //  path too long
        if ((fn & 1) || fn == sn) {
            tly_merkle_node_hash (path[i], r, r);
            while (!(fn & 1) && fn != 0) {
                fn >>= 1;
                sn >>= 1;
            }
        }
        else
            tly_merkle_node_hash (r, path[i], r);
        fn >>= 1;
        sn >>= 1;
    }
    if (sn != 0)
        return TLY_ECRYPTO;                //  path too short
    return sodium_memcmp (r, root, TLY_HASH_LEN) == 0? TLY_OK: TLY_ECRYPTO;
}

int
tly_merkle_verify_consistency (uint64_t m, uint64_t n,
                               const uint8_t root1[TLY_HASH_LEN],
                               const uint8_t root2[TLY_HASH_LEN],
                               const uint8_t path[][TLY_HASH_LEN], size_t path_len)
{
    if (m == 0 || m > n)
        return TLY_EINVAL;
    //  RFC 9162 2.1.4.1 defines PROOF(n, D[n]) as the empty list, but the
    //  2.1.4.2 algorithm fails every empty path; a tree is consistent with
    //  itself exactly when the roots match and nothing else is claimed.
    if (m == n) {
        if (path_len != 0)
            return TLY_ECRYPTO;
        return sodium_memcmp (root1, root2, TLY_HASH_LEN) == 0? TLY_OK: TLY_ECRYPTO;
    }
    //  RFC 9162 2.1.4.2, step by step.  Step 2 prepends root1 when m is a
    //  power of two: then root1 is the first value and the whole path the
    //  rest, else path[0] is the first value and path[1..] the rest.
    if (path_len == 0)
        return TLY_ECRYPTO;
    bool prepend = (m & (m - 1)) == 0;
    const uint8_t *first = prepend? root1: path[0];
    const uint8_t (*rest)[TLY_HASH_LEN] = prepend? path: path + 1;
    size_t rest_len = prepend? path_len: path_len - 1;

    uint64_t fn = m - 1;
    uint64_t sn = n - 1;
    while (fn & 1) {
        fn >>= 1;
        sn >>= 1;
    }
    uint8_t fr[TLY_HASH_LEN], sr[TLY_HASH_LEN];
    memcpy (fr, first, TLY_HASH_LEN);
    memcpy (sr, first, TLY_HASH_LEN);
    for (size_t i = 0; i < rest_len; i++) {
        const uint8_t *c = rest[i];
        if (sn == 0)
            return TLY_ECRYPTO;            //  path too long
        if ((fn & 1) || fn == sn) {
            tly_merkle_node_hash (c, fr, fr);
            tly_merkle_node_hash (c, sr, sr);
            while (!(fn & 1) && fn != 0) {
                fn >>= 1;
                sn >>= 1;
            }
        }
        else
            tly_merkle_node_hash (sr, c, sr);
        fn >>= 1;
        sn >>= 1;
    }
    if (sn != 0)
        return TLY_ECRYPTO;                //  path too short
    if (sodium_memcmp (fr, root1, TLY_HASH_LEN) != 0
    ||  sodium_memcmp (sr, root2, TLY_HASH_LEN) != 0)
        return TLY_ECRYPTO;
    return TLY_OK;
}

int
tly_frontier_load (tly_frontier *self, tly_node_fn *get, void *ctx, uint64_t n)
{
    memset (self, 0, sizeof *self);
    //  Bit l of n set: the subtree of 2^l leaves that ends where the
    //  higher set bits' subtrees stop, i.e. index (n >> l) - 1 at level l.
    for (uint64_t rest = n; rest; rest &= rest - 1) {
        unsigned l = lowest_bit (rest);
        int rc = get (ctx, l, (n >> l) - 1, self->frontier[l]);
        if (rc != TLY_OK) {
            memset (self, 0, sizeof *self);
            return rc;
        }
    }
    self->size = n;
    return TLY_OK;
}

int
tly_frontier_push (tly_frontier *self, const uint8_t leaf_hash[TLY_HASH_LEN],
                   tly_emit_fn *emit, void *ctx)
{
    uint64_t size = self->size;
    if (size == UINT64_MAX)
        return TLY_ETOOLARGE;
    //  Each trailing 1 bit of size is a subtree the new leaf completes into
    //  one twice as large.  Nothing in self changes until every emit has
    //  succeeded, so a failed emit leaves the frontier as it was.
    uint8_t h[TLY_HASH_LEN];
    memcpy (h, leaf_hash, TLY_HASH_LEN);
    unsigned l = 0;
    for (;;) {
        if (emit) {
            int rc = emit (ctx, l, size >> l, h);
            if (rc != TLY_OK)
                return rc;
        }
        if (!((size >> l) & 1))
            break;
        tly_merkle_node_hash (self->frontier[l], h, h);
        l++;
    }
    memcpy (self->frontier[l], h, TLY_HASH_LEN);
    self->size = size + 1;
    return TLY_OK;
}

void
tly_frontier_root (const tly_frontier *self, uint8_t out[TLY_HASH_LEN])
{
    uint64_t rest = self->size;
    if (rest == 0) {
        tly_merkle_empty_root (out);
        return;
    }
    unsigned low = lowest_bit (rest);
    memcpy (out, self->frontier[low], TLY_HASH_LEN);
    for (rest &= rest - 1; rest; rest &= rest - 1) {
        unsigned l = lowest_bit (rest);
        tly_merkle_node_hash (self->frontier[l], out, out);
    }
}
