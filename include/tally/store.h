/*  store.h -- the ledger in LMDB: entries, the Merkle nodes, the
    deduplication index and the signed tree heads.

    Layout (one LMDB environment in <data dir>/ledger):
      entries  seq (u64, integer key)          -> leaf bytes (PROTOCOL.md s3)
      nodes    post-order number (u64 key)     -> 32-byte perfect-subtree hash
               (node (level, index) is the 2m - popcount(m) + level'th node
               completed, m = ((index + 1) << level) - 1: appends only).
               Levels >= 1 only: a leaf hash is SHA-256 of bytes already
               stored, so tly_reader_node (0, seq) computes it from the entry.
      run.0 .. run.255  one sorted run each (or empty, or a run being
               built or dead), as blocks (format 9): the last dedup
               (16-byte keyed BLAKE2b of (customer, key)) of the block ->
               1 to 80 records of dedup || seq (u64, host order), keys
               ascending and above the previous block's; runs built before
               format 9 have one record per key, dedup -> seq (u64)
      blooms   run id (u32 big-endian) -> count (u32) || nblocks (u32) ||
               tier (u32; bit 16 set: the run is stored as blocks) ||
               table (u32: the N of run.N) || nblocks * 64 B of blocked
               Bloom filter (host byte order): one record per visible run
      groups   group id (u32 big-endian) -> version 1 (u32) || tier (u32)
               || nblocks (u32) || members named (u32, at most 8) || their
               run ids (8 x u32) || keys in them (u64) || keys it was
               sized for (u64) || nblocks * 64 B of blocked Bloom filter
               (host byte order, as in blooms) holding every key of every
               member: up to 8 runs of one tier, the ones its next merge
               takes (an addition to format 9: a tallyd that does not know
               it ignores it, and its runs are asked one by one)
      sths     tree_size (u64 key)             -> ts (u64) || root || sig (104 B)
               || seal: BLAKE2b-128 of tree_size (u64, host order) || the
               104 bytes (format 8; heads of earlier formats have none)
      meta     "format" -> "9", "dedup_key" -> 32 random bytes,
               "dedup.state" -> version 3 (u32), 0 (u32), covered (u64):
               the runs hold the keys of the entries [0, covered);
               "dedup.build0" .. "dedup.build9" -> version 2 (u32),
               table (u32), total (u64), the ids (u32) of the 8 runs
               merged (0 for a flush), records per block (u32; 0: one
               record per key): a build of that tier under way (version
               1, format 8, has no block size: one record per key)

    The deduplication index is a small LSM tree, so that what a commit
    writes stays proportional to the commit, and sequential, at any index
    size (a single table keyed by random hashes dirties nearly every one of
    its pages per commit once it is large), and so that no commit does work
    proportional to the index (src/dedup.h):
      - appends put their key into L0, which is in memory only: the keys
        of the entries [covered, size) are a function of those entries, so
        the writer (and each reader that looks keys up) derives L0 from the
        log's tail when it starts, and adds each new entry's key after;
      - when L0 holds >= l0_max keys (131072; env TALLY_L0_MAX or
        tly_store_set_l0_max), all of them are sorted and copied, a slice
        per commit, into a new run of tier 0 with MDB_APPEND, in blocks of
        80 keys (one put per block: a fifth of the writer's time went to
        puts of single keys at 50M entries); its Bloom
        filter (16 bits per key; 12 in runs built by earlier versions,
        which its size records; one 64-byte block picked by range from dedup
        bytes 0..3, 7 bits in it from bytes 8..15: ~0.1% false positives)
        is stored, and `covered` moved past those entries, by
        the commit that copies the last key;
      - when 8 runs of tier t are visible, they are merged the same way,
        a slice per commit, into a run of tier t + 1; the commit that ends
        the merge makes the new run visible and the 8 old ones invisible
        ("dead"), and a later commit empties each dead run's table with one
        mdb_drop, which frees its pages without reading or writing them.
        So O(8 log8 (N / l0_max)) runs are visible at a time.
    Each slice moves about 2 records per event the commit appends, per job,
    which keeps every job ahead of the appends.  A run is built in a table
    of its own, in key order, so each table only receives appends.
    A key is visible in exactly one place (L0 or one visible run); a
    lookup asks L0, then each visible run newest first whose filter says
    "maybe", and whose group's filter said "maybe" first if it is in one:
    each group's block is read once per lookup, so a new key costs a cache
    line per group and per lone run, not per run (19 runs, 4 groups at
    50M entries).  A tier's runs fill a group as they are built (each key
    goes into both filters); the group is stored when its eighth member is
    published, and, still filling, when the writer checkpoints
    (tly_writer_checkpoint: tallyd when it stops; the next writer leaves
    it as it is, serving the runs it names, and starts a new group), and
    deleted when none of the runs it names is visible.  After a crash the
    runs published since the last checkpoint are in no group until
    merged: slower, never wrong.  All of it happens in the writer's txns, so a crash or an
    abort leaves a consistent layout; a run half built at a crash goes on
    from where it stopped, once its table's keys are checked against its
    sources (a merge of large runs spans millions of events: a writer
    restarted more often than that would never finish one otherwise).
    tly_store_open moves a format-5 ledger (L0 in two tables, "dedup" and
    "dedup.1") to format 9 in one txn: it records covered and drops those
    tables, nothing else changes; a format-6 to -8 ledger (no build
    records, no sealed heads, runs of one record per key, each of which
    stays readable as such) only gets its new number, so that an older
    tallyd refuses it.  Data dirs of formats 1 to 4, and of formats above
    9, are refused.
    A build's Bloom filter (and a group's filling) grows in memory that
    is not the map: for
    filters of 4 MiB and more, a shared mapping of an unnamed file in the
    ledger's directory (so anonymous memory stays bounded whatever the
    index's size) where the file system reserves its blocks (ext4, XFS,
    tmpfs) and the disk has room to spare, else the heap (a group's only
    below 4 MiB: else it is not made).

    Every appended entry, its nodes, its dedup record and the commit's signed
    head land in one LMDB transaction, fsync'd before the commit returns:
    after a crash the ledger is exactly some committed prefix.  Every stored
    byte is covered by a hash the scrubber can check: leaves by their
    level-1 parents (the last, odd one by the signed root), nodes by their
    children, the root by the signed head, each head record by its seal
    (its signature and root only for the newest), visible dedup records by
    re-hashing the entry they name (L0 is not stored: it is re-derived
    from the entries); each visible run's Bloom filter, and its group's,
    must say "maybe" for every key of its run (a flipped bit there would
    hide a key from lookups), and every group record must parse and name
    runs of its own tier, each in no other group (one that does not is
    ignored by lookups, reported by the scrubber and deleted by the next
    writer: a group is only ever a shortcut).  Records of runs being built or deleted are not
    visible, so not checked; a finished build is checked by the next pass.

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
/*  A position in tly_reader_dedup_scan: run id (u32 BE) || dedup; opaque
    to callers. */
#define TLY_DEDUP_POS_LEN (4 + TLY_DEDUP_LEN)

typedef struct tly_store tly_store;
typedef struct tly_reader tly_reader;
typedef struct tly_writer tly_writer;

/*  Opens (creating if needed) the ledger under dir/ledger with a map of
    map_size bytes.  TLY_OK, TLY_EIO (with errno-style detail in *why),
    TLY_EINVAL for a ledger of another format (see *why). */
int tly_store_open (const char *dir, size_t map_size, tly_store **out, const char **why);
void tly_store_close (tly_store **self_p);
/*  Path of the LMDB data file (for operators and corruption tests). */
const char *tly_store_data_path (tly_store *self);
/*  How many keys L0 of the dedup index may hold before a commit moves them
    into a sorted run (at least 16).  For tests and tuning; call before the
    writer's next commit.  Default 131072, or env TALLY_L0_MAX at open. */
void tly_store_set_l0_max (tly_store *self, size_t l0_max);

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
/*  The seq of the entry whose dedup key is `dedup`: TLY_OK, TLY_ENOTFOUND,
    TLY_ECORRUPT (the index disagrees with itself).  The reader keeps its
    own copy of L0 across snapshots: a lookup first reads the entries
    appended since this reader's last lookup, at most the ones not yet in
    a run (up to about twice l0_max, ~0.5 us each), so the first lookup
    after a start or a long pause is the slow one. */
int tly_reader_lookup (tly_reader *self, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq);
/*  A check of new events against the index's sorted runs on another
    thread than the writer's, so that the writer asks only what changed
    since (the ingest actor does it for each batch, the receipt actor
    then calls tly_writer_lookup_beyond):
      - tly_reader_dedup_runs: the ids of the runs in the snapshot,
        ascending, at most TLY_DEDUP_RUNS_MAX;
      - tly_reader_lookup_runs: tly_reader_lookup in those runs only, not
        in the newest entries (L0), so it never reads the log's tail. */
#define TLY_DEDUP_RUNS_MAX 256
int tly_reader_dedup_runs (tly_reader *self, uint32_t ids[TLY_DEDUP_RUNS_MAX], size_t *n);
int tly_reader_lookup_runs (tly_reader *self, const uint8_t dedup[TLY_DEDUP_LEN],
                            uint64_t *seq);
/*  The dedup index as the snapshot sees it, for status and tests. */
#define TLY_DEDUP_TIERS 10          /* tiers of runs */
typedef struct {
    size_t runs;                    /* live runs */
    uint32_t tiers[TLY_DEDUP_TIERS];    /* of them, in each tier */
    uint64_t in_runs;               /* entries [0, in_runs) whose keys they hold
                                       (the rest are in L0) */
    size_t groups;                  /* stored groups naming a live run */
    size_t lone;                    /* live runs in no group: a lookup of a new
                                       key reads one block of each group and
                                       lone run (see above) */
    uint64_t probes;                /* run reads (a Bloom filter said "maybe")
                                       by lookups since begin */
} tly_dedup_shape;

/*  TLY_OK, or an error reading the index (then *out is all zero). */
int tly_reader_dedup_shape (tly_reader *self, tly_dedup_shape *out);
/*  A tly_node_fn: ctx is the reader. */
int tly_reader_node (void *reader, unsigned level, uint64_t index, uint8_t out[32]);
/*  Signed head stored for exactly tree_size (TLY_ENOTFOUND if no commit
    ended there); tree_size UINT64_MAX means the latest. */
int tly_reader_sth (tly_reader *self, uint64_t tree_size, tly_sth *out);

/*  The log's tree in the order it grew, for the scrubber: the leaves from
    seq `from` (below `until`, at most `count` of them), each followed by
    the stored nodes it completed, lowest level first (node (level, index)
    is completed by leaf ((index + 1) << level) - 1).  Read with one cursor
    per table, not a lookup per item.  A leaf or node that is missing, or a
    node that is not 32 bytes, is passed as NULL.  A callback's non-zero
    return stops the walk and is returned; *next gets the seq after the
    last leaf whose nodes were all passed. */
typedef int (tly_walk_leaf_fn) (void *ctx, uint64_t seq, const uint8_t *leaf, size_t len);
typedef int (tly_walk_node_fn) (void *ctx, unsigned level, uint64_t index, const uint8_t *node);
int tly_reader_tree_walk (tly_reader *self, uint64_t from, uint64_t until, size_t count,
                          tly_walk_leaf_fn *leaf_fn, tly_walk_node_fn *node_fn, void *ctx,
                          uint64_t *next);

/*  Walks stored records for the scrubber.  Each calls fn for records with
    keys in [from, from + count) in order and stops at the first non-zero. */
typedef int (tly_dedup_fn) (void *ctx, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t seq);
/*  Dedup records (every visible run in id order) after the position
    `after` (TLY_DEDUP_POS_LEN bytes; NULL: from the start), at most
    `count`; *last gets the position of the last record seen, *done is set
    after the last record.  Positions stay meaningful across snapshots: a
    flush or merge between calls moves records into a run whose id is above
    every position, so a pass misses none of the records it started with
    (some may be visited twice).  L0 is not stored, so not scanned.  TLY_ECORRUPT if a record is malformed or its run's
    Bloom filter is missing, malformed or denies the record's key. */
int tly_reader_dedup_scan (tly_reader *self, const uint8_t *after, size_t count,
                           tly_dedup_fn *fn, void *ctx, uint8_t last[TLY_DEDUP_POS_LEN],
                           bool *done);
/*  Whether a stored head record matches its seal (format 8), or has none
    (written by an earlier format: its signature is the only check). */
typedef enum { TLY_SEAL_NONE, TLY_SEAL_OK, TLY_SEAL_BAD } tly_seal;
typedef int (tly_sth_fn) (void *ctx, const tly_sth *sth, tly_seal seal);
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
/*  tly_writer_lookup, but not in the runs named in `asked` (ids from
    tly_reader_dedup_runs of any snapshot, ascending), which the caller
    found without the key (tly_reader_lookup_runs) in that snapshot.  A
    run keeps its keys while it is visible and its id is never used again,
    so the answer is the full lookup's (src/dedup.h, dx_lookup_in). */
int tly_writer_lookup_beyond (tly_writer *self, const uint8_t dedup[TLY_DEDUP_LEN],
                              const uint32_t *asked, size_t nasked, uint64_t *seq);
/*  A hint that dedup will be looked up soon: starts fetching the part
    of L0 the lookup reads first, most likely a cache miss (L0's table is
    megabytes).  Results never depend on it. */
void tly_writer_prefetch (tly_writer *self, const uint8_t dedup[TLY_DEDUP_LEN]);
int tly_writer_leaf (tly_writer *self, uint64_t seq, const uint8_t **leaf, size_t *len);
int tly_writer_node (tly_writer *self, unsigned level, uint64_t index, uint8_t out[32]);
/*  Appends leaf bytes encoded for seq == tly_writer_next_seq(), with its
    dedup record; writes the leaf hash and the nodes it completes.  dedup
    must be tly_store_dedup_hash of the leaf's customer and key: L0 of the
    index is re-derived from the leaves after a restart.  After any error
    but TLY_EEXIST the txn can only be aborted: tly_writer_commit refuses
    it (TLY_EINVAL) and rolls it back.
    TLY_EEXIST if dedup is already in the index (L0 or any run). */
int tly_writer_append (tly_writer *self, const uint8_t *leaf, size_t len,
                       const uint8_t dedup[TLY_DEDUP_LEN], uint8_t leaf_hash[32]);
/*  The same, for a caller that has looked `dedup` up with
    tly_writer_lookup in this transaction (TLY_ENOTFOUND) and appended no
    entry with that key since: skips the second lookup.  Appending a key
    that exists breaks deduplication, so only the receipt actor's rounds,
    which guarantee this, use it. */
int tly_writer_append_new (tly_writer *self, const uint8_t *leaf, size_t len,
                           const uint8_t dedup[TLY_DEDUP_LEN], uint8_t leaf_hash[32]);
/*  Inside the open txn: all pending maintenance of the dedup index at
    once (flush a full L0, finish every merge, delete every dead run),
    whatever it costs.  Commits do it a slice at a time instead; this is
    for tests and tools (compact, then abort: nothing changed). */
int tly_writer_compact (tly_writer *self);
/*  Outside a txn: stores what the dedup index holds in memory between
    commits and a writer started later would otherwise do without (the
    groups of runs still filling, see src/dedup.h: without them their
    runs are asked one by one until merged), in a commit of its own that
    leaves the tree and its signed head as they are; no commit if there
    is nothing to store.  The receipt actor calls it when it stops. */
int tly_writer_checkpoint (tly_writer *self, const char **why);
/*  The dedup index's pending maintenance as of the last begin or commit:
    runs being built, and dead runs whose records are still to delete. */
void tly_writer_dedup_backlog (tly_writer *self, size_t *builds, size_t *dead);
/*  Does a slice of the dedup index's maintenance (about 2 records per
    appended event per job), signs the new head with sk, stores it, and
    commits durably (fsync).  On failure everything since begin is rolled
    back. */
int tly_writer_commit (tly_writer *self, const uint8_t sk[TLY_SK_LEN], tly_sth *sth,
                       const char **why);
/*  Drops everything since begin. */
void tly_writer_abort (tly_writer *self);
/*  The latest committed head. */
const tly_sth *tly_writer_sth (tly_writer *self);

#endif
