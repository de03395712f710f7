/*  l0.h -- L0 of the idempotency index: the dedup keys of the log's
    newest entries, held in memory only (private to src/dedup.c).

    The runs of the index cover the entries [0, covered); L0 holds the keys
    of [covered, size), one per entry, in seq order.  Those keys are a
    function of the stored entries (the keyed hash of each entry's
    customer and key), so L0 is never written to disk: a writer or reader
    derives it from the log's tail, and then keeps it up to date as the log
    grows.  An open-addressing table over the keys answers lookups.

    One owner per dx_l0 (a writer, or one reader's view); no locking. */
#ifndef TALLY_L0_H
#define TALLY_L0_H

#include <lmdb.h>
#include "tally/store.h"

/*  The dedup key of entry seq, as stored in txn.  TLY_OK, TLY_ENOTFOUND,
    TLY_ECORRUPT (an entry that does not decode). */
typedef int (dx_key_fn) (void *ctx, MDB_txn *txn, uint64_t seq, uint8_t key[TLY_DEDUP_LEN]);

typedef struct {
    uint64_t from;                  /* the seq of keys[0] */
    size_t n, cap;
    uint8_t (*keys)[TLY_DEDUP_LEN]; /* the key of seq from + i at i */
    uint64_t *slots;                /* key bytes 8..11 << 32 | i + 1; 0 = free */
    size_t nslots;                  /* a power of two > 2 n, or 0 */
} dx_l0;

/*  A key and its seq, as a flush writes them. */
typedef struct {
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
} dx_rec;

void l0_free (dx_l0 *self);
/*  The seq after the last key held. */
uint64_t l0_end (const dx_l0 *self);
/*  TLY_OK with *seq, or TLY_ENOTFOUND. */
int l0_find (const dx_l0 *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq);
/*  Starts fetching the table slot where l0_find (key) will begin: a
    hint, no effect on any result. */
void l0_prefetch (const dx_l0 *self, const uint8_t key[TLY_DEDUP_LEN]);
/*  Adds key as the key of seq l0_end (): TLY_OK or TLY_ENOMEM (then
    nothing changed). */
int l0_push (dx_l0 *self, const uint8_t key[TLY_DEDUP_LEN]);
/*  Makes self hold exactly the keys of [from, end), reading from txn
    only the entries it does not hold yet.  On error self is empty. */
int l0_sync (dx_l0 *self, MDB_txn *txn, uint64_t from, uint64_t end,
             dx_key_fn *key_of, void *ctx);
/*  The keys of [from, from + count) with their seqs in key order, in a
    new array (the caller frees it).  TLY_ENOMEM. */
int l0_sorted (const dx_l0 *self, size_t count, dx_rec **out);

#endif
