/*  nodecache.c -- a direct-mapped cache of immutable Merkle tree nodes. */
#include "tally/nodecache.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t key;                   /* level << 58 | index, plus 1; 0: empty */
    uint8_t hash[TLY_HASH_LEN];
} slot_t;

struct tly_nodecache {
    slot_t *slots;
    unsigned bits;
    unsigned min_level;             /* levels below are not kept */
    tly_node_fn *get;
    void *ctx;
    uint64_t hits, misses;
};

int
tly_nodecache_new (unsigned slots_log2, tly_nodecache **out)
{
    if (slots_log2 < 4 || slots_log2 > 24)
        return TLY_EINVAL;
    tly_nodecache *self = calloc (1, sizeof *self);
    if (self)
        self->slots = calloc ((size_t) 1 << slots_log2, sizeof *self->slots);
    if (!self || !self->slots) {
        free (self);
        return TLY_ENOMEM;
    }
    self->bits = slots_log2;
    self->min_level = 64;
    *out = self;
    return TLY_OK;
}

void
tly_nodecache_destroy (tly_nodecache **self_p)
{
    tly_nodecache *self = *self_p;
    if (self) {
        free (self->slots);
        free (self);
        *self_p = NULL;
    }
}

/*  A tree of n leaves has fewer than 2n / 2^L nodes at levels >= L: keep
    the lowest L for which that is at most half the slots. */
void
tly_nodecache_fit (tly_nodecache *self, tly_node_fn *get, void *ctx, uint64_t tree_size)
{
    self->get = get;
    self->ctx = ctx;
    unsigned level = 1;
    while (level < 63 && (tree_size >> level) * 2 > ((uint64_t) 1 << self->bits) / 2)
        level++;
    self->min_level = level;
}

int
tly_nodecache_node (void *cache, unsigned level, uint64_t index, uint8_t out[TLY_HASH_LEN])
{
    tly_nodecache *self = cache;
    assert (self->get);             /* tly_nodecache_fit comes first */
    if (level < self->min_level || level >= 63 || index >> 58) {
        self->misses++;
        return self->get (self->ctx, level, index, out);
    }
    uint64_t key = ((uint64_t) level << 58 | index) + 1;
    slot_t *slot = &self->slots[(key * UINT64_C (0x9E3779B97F4A7C15)) >> (64 - self->bits)];
    if (slot->key == key) {
        self->hits++;
        memcpy (out, slot->hash, TLY_HASH_LEN);
        return TLY_OK;
    }
    self->misses++;
    int rc = self->get (self->ctx, level, index, out);
    if (rc == TLY_OK) {
        slot->key = key;
        memcpy (slot->hash, out, TLY_HASH_LEN);
    }
    return rc;
}

void
tly_nodecache_stats (const tly_nodecache *self, uint64_t *hits, uint64_t *misses)
{
    *hits = self->hits;
    *misses = self->misses;
}
