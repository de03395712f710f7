/*  dedup.h -- the idempotency index, private to the store (store.c is its
    only user; store.h documents the layout and the guarantees).

    An LSM tree inside the ledger's LMDB environment:
      - L0, in memory only (src/l0.h): the keys of the newest entries,
        [covered, size).  They are derived from the entries themselves, so
        a writer or reader rebuilds L0 from the log's tail and nothing of
        it is written (no random page writes per commit);
      - sorted runs, each in a table of its own from a pool of DX_SLOTS
        ("run.0" .. "run.255"), stored as blocks of up to 80 (key, seq)
        records keyed by their last key (format 9; runs of earlier formats
        have one record per key, and are read as such until merged into
        a new run); a run becomes visible when its
        Bloom filter (which names its tier and table) is stored in "blooms",
        and invisible when that record is deleted;
      - builds (a flush of L0's oldest l0_max or more keys into tier 0, or a
        merge of 8 runs of tier t into tier t + 1) advance a bounded slice
        per commit, invisible until the commit that finishes them; a flush's
        last commit also moves `covered` (meta "dedup.state") past the keys
        it wrote; the runs a merge replaces become "dead", and a later
        commit empties each one's table with one mdb_drop (which frees its
        pages without touching them).  Each build under way has a record
        in meta ("dedup.build<tier>"), so a writer that starts after a
        crash or an aborted txn goes on with it: the table holds what the
        build wrote, and its keys are checked against the build's sources
        as they go back into the Bloom filter, which only lived in memory;
      - groups: one more Bloom filter over the keys of up to 8 runs of a
        tier (the ones its next merge takes), in "groups".  A lookup asks
        a group's one block before its members' blocks, so a new key costs
        a cache line per group instead of one per run (19 runs at 50M
        entries, 4 to 6 groups and lone runs).  A group fills as its
        members are built (each key goes into the run's filter and the
        group's), is stored when its last member is published and when
        the writer checkpoints (dx_writer_checkpoint), and is deleted with
        its last member.  It is only ever a shortcut: a run no group names
        is asked itself, so a group lost in a crash costs speed, never a
        key.
    So a commit's index work is proportional to the events it appends,
    never to the size of the index.

    Threads: the writer functions run on the writer's thread inside its
    write txn; dx_view_load / dx_lookup / dx_scan run in any txn. */
#ifndef TALLY_DEDUP_H
#define TALLY_DEDUP_H

#include <lmdb.h>
#include "tally/store.h"
#include "l0.h"

#define DX_TIERS 10                 /* tiers of runs; tier 9 runs never merge */
/*  Run tables.  Each tier that still merges holds at most 16 visible
    runs (8 waiting for a merge, 8 made while it goes on) and 1 being
    built; dead ones are emptied as fast as merges retire them.  With the
    default l0_max, tiers 0 to 4 cover 4.8 billion events (a tier-4 run
    holds 131072 * 8^4 = 537M keys); a merge whose output would pass
    2^32 - 1 keys never starts, so beyond that tier-4 runs only
    accumulate: one more filter to ask per 537M events, and the pool lasts
    to about 100 billion.  A flush never takes the last DX_TIERS free
    tables, so merges can always start; were the pool ever full, builds
    would wait and the index only grow slower. */
#define DX_SLOTS 256

/*  The tables, opened once by the store, and how to read an entry's key. */
typedef struct {
    MDB_dbi slot[DX_SLOTS];
    MDB_dbi blooms;
    MDB_dbi groups;
    MDB_dbi meta;
    size_t l0_max;
    dx_key_fn *key_of;              /* the dedup key of a stored entry */
    void *key_ctx;
    /*  Where the filters of large builds live while they are built: an
        unnamed file in this directory (NULL: in the heap), for filters of
        at least filter_map_min bytes (0: 4 MiB). */
    const char *scratch_dir;
    size_t filter_map_min;
    /*  Tests only: records per block of new runs (0: 80, the most), and
        new runs laid out as before format 9 (one record per key), to make
        the ledgers older tallyds left. */
    size_t block_max;
    bool legacy_layout;
} dx_tables;

/*  One visible run as seen by one snapshot.  bits point into the LMDB map
    or, for a run finished in the writer's open txn, into the writer's heap.
    NULL bits (a malformed filter) mean "maybe" for every key: no false
    negative; the scrubber reports it. */
typedef struct {
    uint32_t id;
    uint32_t tier;
    uint32_t slot;                  /* its table */
    uint32_t count;
    uint32_t nblocks;
    bool packed;                    /* blocks of records (else one record per key) */
    int32_t group;                  /* its group in the view's groups (-1: none) */
    const uint8_t *bits;
} dx_run;

#define DX_GROUP_MAX 8              /* runs per group: a merge's inputs */

/*  One group as seen by one snapshot: a filter holding every key of each
    visible run it names.  bits point into the LMDB map or the writer's
    memory (the group it is filling). */
typedef struct {
    uint32_t id;
    uint32_t tier;
    uint32_t nblocks;
    uint32_t n;                     /* members named */
    uint32_t members[DX_GROUP_MAX]; /* run ids, some perhaps merged away */
    uint32_t live;                  /* of them, visible runs (linked) */
    bool bad;                       /* names a run of another tier or group */
    const uint8_t *bits;
} dx_group;

/*  What one snapshot sees: the visible runs, ascending id, which cover
    the entries [0, covered), and L0 for [covered, size).  L0 is kept
    from one snapshot to the next (only new entries are read into it). */
typedef struct {
    dx_run *runs;
    size_t n, cap;
    dx_group *groups;
    size_t ng, gcap;
    size_t malformed;               /* group records that do not parse (ignored) */
    uint64_t covered;
    dx_l0 l0;
    uint64_t probes;                /* run reads by lookups (statistics) */
} dx_view;

typedef struct dx_writer dx_writer;

/*  Opens (creating) every table of the index in txn. */
int dx_open (MDB_txn *txn, dx_tables *t);
/*  In a ledger of format 5 with `size` entries, inside its write txn:
    turns its index into this format (L0 leaves the disk). */
int dx_migrate_5 (const dx_tables *t, MDB_txn *txn, uint64_t size);

/*  The runs and `covered` of the snapshot txn (L0 is left as it was). */
int dx_view_load (const dx_tables *t, MDB_txn *txn, dx_view *view);
/*  After dx_view_load: brings L0 to the entries [covered, size) of txn,
    reading the ones it does not hold yet. */
int dx_view_sync (const dx_tables *t, MDB_txn *txn, dx_view *view, uint64_t size);
void dx_view_free (dx_view *view);
/*  In a view loaded and synced: TLY_OK with *seq, or TLY_ENOTFOUND. */
int dx_lookup (const dx_tables *t, MDB_txn *txn, dx_view *view,
               const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq);
/*  Part of dx_lookup: L0 only if with_l0, and only the runs whose ids are
    not in skip (ascending; ids of runs no longer visible are ignored).
    Safe for the caller who looked the key up in the runs of an earlier
    snapshot and skips exactly those, because a key in one of the skipped
    runs was there when the caller looked:
      - a visible run's keys never change: its table is written only
        while it is built, and emptied only once it is dead;
      - a run id never names another run later.  A build takes the next
        id when it starts (so a flush may publish after a merge that took
        a higher one), and the writer's first id after a restart or a
        failed txn is above every visible run's and every group's id and
        member.  Only a merge retires runs, in the txn that publishes its
        output, whose id is above its inputs': so the highest id ever
        published is always visible, and no published id is handed out
        again. */
int dx_lookup_in (const dx_tables *t, MDB_txn *txn, dx_view *view,
                  const uint8_t key[TLY_DEDUP_LEN], bool with_l0, const uint32_t *skip,
                  size_t nskip, uint64_t *seq);
/*  The ids of the view's runs, ascending (at most DX_SLOTS). */
int dx_view_ids (const dx_view *view, uint32_t ids[DX_SLOTS], size_t *n);
/*  tly_reader_dedup_scan (store.h). */
int dx_scan (const dx_tables *t, MDB_txn *txn, const dx_view *view, const uint8_t *after,
             size_t count, tly_dedup_fn *fn, void *ctx, uint8_t last[TLY_DEDUP_POS_LEN],
             bool *done);

/* ---- the writer's side ---- */

int dx_writer_new (const dx_tables *t, dx_writer **out);
void dx_writer_destroy (dx_writer **self_p);
/*  A write txn began on a log of `size` entries: loads the visible runs
    (and, the first time or after a failed txn, the maintenance state, and
    L0 from the log's tail). */
int dx_writer_begin (dx_writer *self, MDB_txn *txn, uint64_t size);
int dx_writer_lookup (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq);
/*  dx_lookup_in L0 and the runs not in skip, in the writer's txn. */
int dx_writer_lookup_in (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], const uint32_t *skip,
                         size_t nskip, uint64_t *seq);
/*  Starts fetching what a lookup of key reads first in L0 (a hint). */
void dx_writer_prefetch (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN]);
/*  Puts key into L0 as the key of entry seq, which must be the entry
    appended next (TLY_EINVAL otherwise): TLY_EEXIST if L0 has it already
    (the caller has asked dx_writer_lookup about the rest of the index). */
int dx_writer_insert (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t seq);
/*  Before the commit of a txn that appended `appended` events: a slice of
    maintenance (starting builds, advancing each, deleting dead runs),
    about DX_RATE records per appended event per job. */
int dx_writer_maintain (dx_writer *self, uint64_t appended);
/*  All pending maintenance now, whatever it costs (tests, tools); then
    a checkpoint. */
int dx_writer_finish (dx_writer *self);
/*  Stores the groups still filling, so that after this txn's commit a
    writer started later (or a reader) finds their members in a group
    instead of asking each one until merged (a clean shutdown does this;
    the next writer starts new groups and leaves these as they are).
    *changed: whether this txn changed the index at all (groups stored,
    or maintenance done in it), so that committing it keeps some work. */
int dx_writer_checkpoint (dx_writer *self, bool *changed);
/*  The txn ended: committed, or aborted (then any maintenance done in it is
    forgotten; unfinished builds are started again later). */
void dx_writer_end (dx_writer *self, bool committed);
/*  Builds in progress and dead runs awaiting deletion (tests, status). */
void dx_writer_backlog (dx_writer *self, size_t *builds, size_t *dead);
/*  Keys in L0 (tests, status). */
size_t dx_writer_l0_keys (dx_writer *self);

#endif
