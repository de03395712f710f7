/*  nodecache.h -- a cache of Merkle tree nodes in front of a tly_node_fn.

    A stored node covers a perfect subtree, so once written it never
    changes: a node read once stays right for the life of the log.  Every
    inclusion proof of a tree of size n reads one node per level, and the
    upper levels are shared by all of them, so caching those levels saves
    most reads of a proof.  Direct-mapped slots; only levels at or above
    the level set by tly_nodecache_fit are kept, so the random lower levels
    cannot evict the shared upper ones.

    Never put one in front of a reader whose job is to re-read stored bytes
    (the scrubber): it serves what it read before.  Not thread-safe: one
    per thread.
*/
#ifndef TALLY_NODECACHE_H
#define TALLY_NODECACHE_H

#include "merkle.h"

typedef struct tly_nodecache tly_nodecache;

/*  A cache of 2^slots_log2 nodes (40 bytes each), slots_log2 in 4..24
    (else TLY_EINVAL).  Caches nothing until tly_nodecache_fit. */
int tly_nodecache_new (unsigned slots_log2, tly_nodecache **out);
void tly_nodecache_destroy (tly_nodecache **self_p);

/*  Sets what the next reads miss to (get, ctx), and keeps the levels whose
    nodes in a tree of tree_size leaves fit in half the slots. */
void tly_nodecache_fit (tly_nodecache *self, tly_node_fn *get, void *ctx,
                        uint64_t tree_size);

/*  A tly_node_fn (ctx is the cache): the cached node, or the source's.
    Errors from the source are returned unchanged and not cached.  Only
    after a tly_nodecache_fit. */
int tly_nodecache_node (void *cache, unsigned level, uint64_t index,
                        uint8_t out[TLY_HASH_LEN]);

/*  Reads answered from the cache and reads passed to the source. */
void tly_nodecache_stats (const tly_nodecache *self, uint64_t *hits, uint64_t *misses);

#endif
