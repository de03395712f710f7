/*  merkle.h -- the RFC 9162 section 2.1 Merkle tree over SHA-256.

    leaf_hash = SHA-256(0x00 || leaf bytes), node = SHA-256(0x01 || l || r),
    MTH of the empty tree = SHA-256("").

    The store keeps the hash of every *perfect* subtree: node (level, index)
    covers leaves [index * 2^level, (index + 1) * 2^level).  Level 0 holds the
    leaf hashes.  From these any historical root, inclusion path or
    consistency path is computed with O(log n) node reads, through a
    caller-supplied tly_node_fn.  Pure functions, no state, any thread.
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

void tly_merkle_leaf_hash (const uint8_t *leaf, size_t len, uint8_t out[TLY_HASH_LEN]);
void tly_merkle_node_hash (const uint8_t left[TLY_HASH_LEN],
                           const uint8_t right[TLY_HASH_LEN],
                           uint8_t out[TLY_HASH_LEN]);
void tly_merkle_empty_root (uint8_t out[TLY_HASH_LEN]);

/*  MTH(D[0:n]); n == 0 gives the empty root. */
int tly_merkle_root (tly_node_fn *get, void *ctx, uint64_t n, uint8_t out[TLY_HASH_LEN]);

/*  PATH(m, D[0:n]) of RFC 9162 2.1.3.1, for m < n. *path_len gets the count. */
int tly_merkle_inclusion (tly_node_fn *get, void *ctx, uint64_t m, uint64_t n,
                          uint8_t path[][TLY_HASH_LEN], size_t *path_len);

/*  PROOF(m, D[0:n]) of RFC 9162 2.1.4.1, for 0 < m <= n. */
int tly_merkle_consistency (tly_node_fn *get, void *ctx, uint64_t m, uint64_t n,
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
    (TLY_EINVAL unless 0 < m <= n). */
int tly_merkle_verify_consistency (uint64_t m, uint64_t n,
                                   const uint8_t root1[TLY_HASH_LEN],
                                   const uint8_t root2[TLY_HASH_LEN],
                                   const uint8_t path[][TLY_HASH_LEN], size_t path_len);

/*  The right edge of the tree while appending: frontier[l] is the perfect
    subtree of 2^l leaves ending the tree, valid when bit l of size is set. */
typedef struct {
    uint64_t size;
    uint8_t frontier[64][TLY_HASH_LEN];
} tly_frontier;

/*  Called for every perfect subtree an append completes, level 0 first. */
typedef int (tly_emit_fn) (void *ctx, unsigned level, uint64_t index,
                           const uint8_t hash[TLY_HASH_LEN]);

/*  Rebuilds the frontier for a tree of size n from stored nodes. */
int tly_frontier_load (tly_frontier *self, tly_node_fn *get, void *ctx, uint64_t n);
/*  Appends one leaf hash; emit (may be NULL) sees each completed node. */
int tly_frontier_push (tly_frontier *self, const uint8_t leaf_hash[TLY_HASH_LEN],
                       tly_emit_fn *emit, void *ctx);
/*  MTH of the current tree. */
void tly_frontier_root (const tly_frontier *self, uint8_t out[TLY_HASH_LEN]);

#endif
