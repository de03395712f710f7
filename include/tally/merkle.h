/*  merkle.h -- the RFC 9162 section 2.1 Merkle tree over SHA-256.

    leaf_hash = SHA-256(0x00 || leaf bytes), node = SHA-256(0x01 || l || r),
    MTH of the empty tree = SHA-256("").

    The store keeps the hash of every *perfect* subtree: node (level, index)
    covers leaves [index * 2^level, (index + 1) * 2^level).  Level 0 holds the
    leaf hashes.  From these any historical root, inclusion path or
    consistency path is computed with O(log n) node reads, through a
    caller-supplied tly_node_fn.  No state of their own, any thread (a
    tly_merkle_edge a caller lends them is that caller's: one per thread).
*/
#ifndef TALLY_MERKLE_H
#define TALLY_MERKLE_H

#include "tally.h"

#define TLY_HASH_LEN 32
#define TLY_PATH_MAX 64        /* max hashes in an inclusion/consistency path */

/*  Reads the perfect-subtree hash at (level, index) into out; returns TLY_OK,
    TLY_ENOTFOUND or another error, which the caller's function propagates. */
typedef int (tly_node_fn) (void *ctx, unsigned level, uint64_t index,
                           uint8_t out[TLY_HASH_LEN]);

/*  leaf_hash / node_hash / empty root of RFC 9162 2.1.1.  Never fail, need
    no sodium_init(), and `out` may alias an input. */
void tly_merkle_leaf_hash (const uint8_t *leaf, size_t len, uint8_t out[TLY_HASH_LEN]);
void tly_merkle_node_hash (const uint8_t left[TLY_HASH_LEN],
                           const uint8_t right[TLY_HASH_LEN],
                           uint8_t out[TLY_HASH_LEN]);
void tly_merkle_empty_root (uint8_t out[TLY_HASH_LEN]);

/*  Hashes of the right edge of one tree, kept between calls.  A range
    that RFC 9162's recursions over a tree of size n produce and that is not
    a perfect subtree always ends at n, and there are at most 62 of them
    (one per set bit of n but the highest); each costs up to 63 node reads
    and 62 node hashes to fold.  Lend the same tly_merkle_edge to every call
    over one log's trees (it does not record which node function filled
    it) and each range of a size is folded once; folding a range of another
    size starts it over.  Zero it before its first use.  It is trusted like
    any cache of the node function's answers: never put one in front of a
    reader whose job is to re-read stored bytes (the scrubber).  The
    functions below take NULL to fold every time. */
typedef struct {
    uint64_t n;                     /* the tree's size; 0: holds nothing */
    uint64_t have;                  /* bit j: fold[j] is valid */
    uint64_t start[64];             /* fold[j] is MTH(D[start[j]:n]) ... */
    uint8_t fold[64][TLY_HASH_LEN]; /* ... with popcount (n - start[j]) == j */
} tly_merkle_edge;

/*  MTH(D[0:n]); n == 0 gives the empty root.  At most 64 node reads.
    Errors from `get` are returned unchanged. */
int tly_merkle_root (tly_node_fn *get, void *ctx, tly_merkle_edge *edge, uint64_t n,
                     uint8_t out[TLY_HASH_LEN]);

/*  PATH(m, D[0:n]) of RFC 9162 2.1.3.1, for m < n (else TLY_EINVAL),
    leaf's sibling first.  `path` must have room for TLY_PATH_MAX hashes;
    *path_len gets the count.  At most 128 node reads.  On error `path` and
    *path_len are unspecified; errors from `get` are returned unchanged. */
int tly_merkle_inclusion (tly_node_fn *get, void *ctx, tly_merkle_edge *edge,
                          uint64_t m, uint64_t n,
                          uint8_t path[][TLY_HASH_LEN], size_t *path_len);

/*  PROOF(m, D[0:n]) of RFC 9162 2.1.4.1, for 0 < m <= n (else TLY_EINVAL);
    m == n gives the empty path.  Same rules for `path` as above;
    TLY_ETOOLARGE if the proof would exceed TLY_PATH_MAX hashes (only for
    n > 2^63).  At most 129 node reads. */
int tly_merkle_consistency (tly_node_fn *get, void *ctx, tly_merkle_edge *edge,
                            uint64_t m, uint64_t n,
                            uint8_t path[][TLY_HASH_LEN], size_t *path_len);

/*  RFC 9162 2.1.3.2: TLY_OK when the path proves `leaf_hash` is leaf m of
    the tree of size n with root `root`, else TLY_ECRYPTO (or TLY_EINVAL for
    m >= n). */
int tly_merkle_verify_inclusion (const uint8_t leaf_hash[TLY_HASH_LEN],
                                 uint64_t m, uint64_t n,
                                 const uint8_t path[][TLY_HASH_LEN], size_t path_len,
                                 const uint8_t root[TLY_HASH_LEN]);

/*  RFC 9162 2.1.4.2: TLY_OK when the path proves the tree of size m with
    root1 is a prefix of the tree of size n with root2, else TLY_ECRYPTO
    (TLY_EINVAL unless 0 < m <= n).  For m == n the RFC's algorithm would
    reject every path; here the empty path with root1 == root2 is valid,
    matching PROOF(n, D[n]) = {}. */
int tly_merkle_verify_consistency (uint64_t m, uint64_t n,
                                   const uint8_t root1[TLY_HASH_LEN],
                                   const uint8_t root2[TLY_HASH_LEN],
                                   const uint8_t path[][TLY_HASH_LEN], size_t path_len);

/*  The right edge of the tree while appending: frontier[l] is the perfect
    subtree of 2^l leaves ending the tree, valid when bit l of size is set.
    A zeroed struct is the empty tree. */
typedef struct {
    uint64_t size;
    uint8_t frontier[64][TLY_HASH_LEN];
} tly_frontier;

/*  Called for every perfect subtree an append completes, level 0 first. */
typedef int (tly_emit_fn) (void *ctx, unsigned level, uint64_t index,
                           const uint8_t hash[TLY_HASH_LEN]);

/*  Rebuilds the frontier for a tree of size n from stored nodes
    (popcount(n) reads).  On error the frontier is left empty. */
int tly_frontier_load (tly_frontier *self, tly_node_fn *get, void *ctx, uint64_t n);
/*  Appends one leaf hash; emit (may be NULL) sees the new leaf at level 0,
    then each node it completes, level by level.  If emit fails, its error
    is returned and the frontier is unchanged (the caller rolls back what
    was emitted).  TLY_ETOOLARGE at 2^64 - 1 leaves.  No allocation. */
int tly_frontier_push (tly_frontier *self, const uint8_t leaf_hash[TLY_HASH_LEN],
                       tly_emit_fn *emit, void *ctx);
/*  MTH of the current tree. */
void tly_frontier_root (const tly_frontier *self, uint8_t out[TLY_HASH_LEN]);

#endif
