/*  store.h -- the ledger in LMDB: entries, the Merkle nodes, the
    deduplication index and the signed tree heads.

    Layout (one LMDB environment in <data dir>/ledger):
      entries  seq (u64, integer key)          -> leaf bytes (PROTOCOL.md s3)
      nodes    post-order number (u64 key)     -> 32-byte perfect-subtree hash
               (node (level, index) is the 2m - popcount(m) + level'th node
               completed, m = ((index + 1) << level) - 1: appends only)
      dedup    16-byte keyed BLAKE2b of (customer, key) -> seq (u64)
      sths     tree_size (u64 key)             -> ts (u64) || root || sig (104 B)
      meta     "format" -> "1", "dedup_key" -> 32 random bytes

    Every appended entry, its nodes, its dedup record and the commit's signed
    head land in one LMDB transaction, fsync'd before the commit returns:
    after a crash the ledger is exactly some committed prefix.  Every stored
    byte is covered by a hash the scrubber can check: leaves by level-0
    nodes, nodes by their children, the root by the signed head, dedup
    records by re-hashing the entry they name.

    Threads: one writer (the receipt actor) at a time; any number of
    readers, one tly_reader per thread (the env uses MDB_NOTLS, so a reader
    may move between threads between begin/end).
*/
#ifndef TALLY_STORE_H
#define TALLY_STORE_H

#include "tally.h"
#include "merkle.h"
#include "sth.h"

#define TLY_DEDUP_LEN 16

typedef struct tly_store tly_store;
typedef struct tly_reader tly_reader;
typedef struct tly_writer tly_writer;

/*  Opens (creating if needed) the ledger under dir/ledger with a map of
    map_size bytes.  TLY_OK, TLY_EIO (with errno-style detail in *why). */
int tly_store_open (const char *dir, size_t map_size, tly_store **out, const char **why);
void tly_store_close (tly_store **self_p);
/*  Path of the LMDB data file (for operators and corruption tests). */
const char *tly_store_data_path (tly_store *self);

/*  The deduplication key of (customer, key): keyed BLAKE2b-128, so nobody
    without the data dir can craft colliding pairs. */
void tly_store_dedup_hash (tly_store *self, const tly_str *customer,
                           const tly_str *key, uint8_t out[TLY_DEDUP_LEN]);

/* ---- reading: a snapshot at begin, released at end ---- */

int tly_reader_new (tly_store *store, tly_reader **out);
void tly_reader_destroy (tly_reader **self_p);
int tly_reader_begin (tly_reader *self);
void tly_reader_end (tly_reader *self);
/*  Entries in the snapshot (= tree size of the latest signed head). */
uint64_t tly_reader_size (tly_reader *self);
/*  Leaf bytes of seq; valid until end. TLY_ENOTFOUND past the end. */
int tly_reader_leaf (tly_reader *self, uint64_t seq, const uint8_t **leaf, size_t *len);
int tly_reader_lookup (tly_reader *self, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq);
/*  A tly_node_fn: ctx is the reader. */
int tly_reader_node (void *reader, unsigned level, uint64_t index, uint8_t out[32]);
/*  Signed head stored for exactly tree_size (TLY_ENOTFOUND if no commit
    ended there); tree_size UINT64_MAX means the latest. */
int tly_reader_sth (tly_reader *self, uint64_t tree_size, tly_sth *out);

/*  Walks stored records for the scrubber.  Each calls fn for records with
    keys in [from, from + count) in order and stops at the first non-zero. */
typedef int (tly_dedup_fn) (void *ctx, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t seq);
/*  Dedup records after `after` (NULL: from the start), at most `count`;
    *last gets the last key seen, *done is set at the end of the table. */
int tly_reader_dedup_scan (tly_reader *self, const uint8_t *after, size_t count,
                           tly_dedup_fn *fn, void *ctx, uint8_t last[TLY_DEDUP_LEN],
                           bool *done);
typedef int (tly_sth_fn) (void *ctx, const tly_sth *sth);
int tly_reader_sth_scan (tly_reader *self, uint64_t from, size_t count,
                         tly_sth_fn *fn, void *ctx, uint64_t *next, bool *done);

/* ---- writing: the receipt actor's thread only ---- */

/*  Loads the tree's right edge and checks it against the latest signed head
    with pk: TLY_ECORRUPT if they disagree. */
int tly_writer_open (tly_store *store, const uint8_t pk[TLY_PK_LEN], tly_writer **out,
                     const char **why);
void tly_writer_destroy (tly_writer **self_p);
int tly_writer_begin (tly_writer *self);
/*  Next seq to be assigned (= tree size including this txn's appends). */
uint64_t tly_writer_next_seq (tly_writer *self);
int tly_writer_lookup (tly_writer *self, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq);
int tly_writer_leaf (tly_writer *self, uint64_t seq, const uint8_t **leaf, size_t *len);
int tly_writer_node (tly_writer *self, unsigned level, uint64_t index, uint8_t out[32]);
/*  Appends leaf bytes encoded for seq == tly_writer_next_seq(), with its
    dedup record; writes the leaf hash and the nodes it completes. */
int tly_writer_append (tly_writer *self, const uint8_t *leaf, size_t len,
                       const uint8_t dedup[TLY_DEDUP_LEN], uint8_t leaf_hash[32]);
/*  Signs the new head with sk, stores it, and commits durably (fsync).
    On failure everything since begin is rolled back. */
int tly_writer_commit (tly_writer *self, const uint8_t sk[TLY_SK_LEN], tly_sth *sth,
                       const char **why);
/*  Drops everything since begin. */
void tly_writer_abort (tly_writer *self);
/*  The latest committed head. */
const tly_sth *tly_writer_sth (tly_writer *self);

#endif
