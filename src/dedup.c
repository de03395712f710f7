/*  dedup.c -- the idempotency index: tiered sorted runs over an
    in-memory L0, Bloom filters, and the bounded builds that keep it small
    (see dedup.h). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include "dedup.h"

#define MERGE_FANIN     8
/*  Per commit, each job moves about DX_RATE records per event the commit
    appended, and at least DX_MIN.  A flush of L0 (l0_max keys) then ends
    before the next L0 fills, and a merge of tier t before tier t has 8
    new runs: the index keeps up with any append rate, and no commit does
    more than a few records of index work per event it carries. */
#define DX_RATE         2
#define DX_MIN          32
/*  Blocked Bloom filter: one 64-byte block per probe (one cache line),
    BLOOM_K bits in it.  16 bits per key gives about 0.1% false positives
    with blocking (12 gave 0.4-0.5%); a false positive costs a B-tree
    descent into a large run whose pages are rarely cached (and, in a run
    stored as blocks, a binary search in one block): at
    70M entries those were a quarter of the lookups' time.  Only builds use
    the ratio (a filter's size is in its header), so runs built with 12
    bits per key stay valid; BLOOM_K must never change. */
#define BLOOM_BLOCK     64
#define BLOOM_BITS_PER_KEY 16
#define BLOOM_K         7
#define BLOOM_HDR       16          /* count, nblocks, tier, slot: u32 each */
/*  The header's tier word also says how the run's table is laid out. */
#define RUN_TIER_MASK   0xffffu
#define RUN_PACKED      (1u << 16)  /* blocks of records; else one record per key */
#define STATE_VERSION   3
/*  A group record: version, tier, nblocks, members named (u32 each), the
    member ids (u32 * DX_GROUP_MAX), keys in its members and the keys it
    was sized for (u64 each), host order; then the filter's blocks. */
#define GROUP_HDR       64
#define GROUP_VERSION   1
_Static_assert (GROUP_HDR == 16 + 4 * DX_GROUP_MAX + 16, "group header layout");
_Static_assert (DX_GROUP_MAX == 8, "a group is what one merge takes (MERGE_FANIN)");

static const MDB_val STATE_KEY = { 11, "dedup.state" };

/* ---- small helpers ---- */

static int
lmdb_err (int rc)
{
    return rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO;
}

static uint64_t
le64_at (const uint8_t *p)
{
    uint64_t x;
    memcpy (&x, p, 8);
    return x;
}

/*  Dedup keys in LMDB's order (memcmp's) as two big-endian words: a call
    to memcmp for each comparison was 8% of the receipt thread at 50M
    entries, where merges compare every key with each input's head. */
_Static_assert (TLY_DEDUP_LEN == 16, "key_cmp compares two 64-bit words");

static inline uint64_t
be64_at (const uint8_t *p)
{
    uint64_t x;
    memcpy (&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    x = __builtin_bswap64 (x);
#elif !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_BIG_ENDIAN__
    x = 0;
    for (int i = 0; i < 8; i++)
        x = x << 8 | p[i];
#endif
    return x;
}

static inline int
key_cmp (const uint8_t *a, const uint8_t *b)
{
    uint64_t x = be64_at (a), y = be64_at (b);
    if (x == y) {
        x = be64_at (a + 8);
        y = be64_at (b + 8);
    }
    return (x > y) - (x < y);
}

static void
put_be32 (uint8_t *p, uint32_t x)
{
    p[0] = (uint8_t) (x >> 24);
    p[1] = (uint8_t) (x >> 16);
    p[2] = (uint8_t) (x >> 8);
    p[3] = (uint8_t) x;
}

static uint32_t
get_be32 (const uint8_t *p)
{
    return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
}

static int
seq_from_val (const MDB_val *v, uint64_t *seq)
{
    if (v->mv_size != 8)
        return TLY_ECORRUPT;
    memcpy (seq, v->mv_data, 8);
    return TLY_OK;
}

static int
table_entries (MDB_txn *txn, MDB_dbi dbi, size_t *n)
{
    MDB_stat st;
    if (mdb_stat (txn, dbi, &st))
        return TLY_EIO;
    *n = st.ms_entries;
    return TLY_OK;
}

/*  Makes room for one more element in *items (n used, *cap allocated). */
static int
grow (void *items, size_t *cap, size_t n, size_t size)
{
    void **p = items;
    if (n < *cap)
        return TLY_OK;
    size_t more = *cap ? *cap * 2 : 16;
    void *grown = realloc (*p, more * size);
    if (!grown)
        return TLY_ENOMEM;
    *p = grown;
    *cap = more;
    return TLY_OK;
}

/* ---- Bloom filters ---- */

static uint32_t
bloom_nblocks (uint64_t count)
{
    uint64_t n = (count * BLOOM_BITS_PER_KEY + BLOOM_BLOCK * 8 - 1) / (BLOOM_BLOCK * 8);
    return n ? (uint32_t) n : 1;
}

/*  The dedup key is already a keyed hash.  Its first 4 bytes pick the
    block by range (multiply-shift, no division): keys in sorted order,
    as builds add them, fill the filter front to back instead of missing
    the cache once per key.  Bytes 8..15 give BLOOM_K 9-bit positions
    inside the block. */
static const uint8_t *
bloom_block (const uint8_t *bits, uint32_t nblocks, const uint8_t key[TLY_DEDUP_LEN])
{
    uint64_t top = get_be32 (key);
    return bits + ((top * nblocks) >> 32) * BLOOM_BLOCK;
}

static void
bloom_add (uint8_t *bits, uint32_t nblocks, const uint8_t key[TLY_DEDUP_LEN])
{
    uint8_t *block = (uint8_t *) bloom_block (bits, nblocks, key);
    uint64_t h = le64_at (key + 8);
    for (int i = 0; i < BLOOM_K; i++, h >>= 9)
        block[(h & 511) >> 3] |= (uint8_t) (1u << (h & 7));
}

static bool
bloom_test (const uint8_t *bits, uint32_t nblocks, const uint8_t key[TLY_DEDUP_LEN])
{
    const uint8_t *block = bloom_block (bits, nblocks, key);
    uint64_t h = le64_at (key + 8);
    for (int i = 0; i < BLOOM_K; i++, h >>= 9)
        if (!(block[(h & 511) >> 3] & (1u << (h & 7))))
            return false;
    return true;
}

static bool
bloom_maybe (const dx_run *run, const uint8_t key[TLY_DEDUP_LEN])
{
    return !run->bits || bloom_test (run->bits, run->nblocks, key);
}

/*  A build's filter (BLOOM_HDR + nblocks * BLOOM_BLOCK bytes, header
    first) is 2 bytes per key: 134 MB for a merge into tier 3, 1 GB into
    tier 4, written front to back over millions of commits and copied into
    "blooms" by the commit that publishes the run.  Held in the heap, that
    would be anonymous memory growing with the index.  So a large one lives
    in a shared mapping of an unnamed file (O_TMPFILE) in the ledger's
    directory: the kernel writes its pages out under memory pressure
    instead of holding them, and nothing is left behind after a crash.
    Only where that is safe and cheap, else in the heap as before:
      - on ext4, XFS or tmpfs, whose fallocate reserves the blocks (a
        copy-on-write file system would reserve them again at the first
        write of a page, and a full disk there is a SIGBUS);
      - with room to spare: the file must not take the space that LMDB
        needs for the commits to come (free space at least 4 times the
        filter, plus 1 GiB).
    An I/O error on one of its pages is what it would be on the LMDB map
    (which tallyd reads through a mapping too); a filter bit lost that way
    is reported by the scrubber, which checks every key of every run
    against its filter.  The publishing commit reads the whole filter,
    from disk if its pages were written out. */
#define FILTER_MAP_MIN_DEFAULT ((size_t) 4 << 20)
#define FILTER_DISK_SPARE ((uint64_t) 1 << 30)

static size_t
filter_map_min_of (const dx_tables *t)
{
    return t->filter_map_min ? t->filter_map_min : FILTER_MAP_MIN_DEFAULT;
}

/*  Whether the file system of fd reserves fallocate'd blocks for good and
    has room for size bytes besides what the ledger may still need. */
static bool
filter_file_ok (int fd, size_t size)
{
    struct statfs fs;
    struct statvfs vfs;
    if (fstatfs (fd, &fs) || fstatvfs (fd, &vfs))
        return false;
    if (fs.f_type != EXT4_SUPER_MAGIC && fs.f_type != XFS_SUPER_MAGIC
    &&  fs.f_type != TMPFS_MAGIC)
        return false;
    uint64_t avail = (uint64_t) vfs.f_bavail * vfs.f_frsize;
    return avail / 4 > (uint64_t) size && avail - (uint64_t) size * 4 > FILTER_DISK_SPARE;
}

/*  size zeroed bytes for a filter and its header; *map_len is the length
    of their mapping (0: they are in the heap), for filter_free.  Where
    a mapping is not to be had, a filter of 4 MiB or more goes to the heap
    only if heap_ok (a run's must exist; a group's may not). */
static uint8_t *
filter_alloc (const dx_tables *t, size_t size, bool heap_ok, size_t *map_len)
{
    uint8_t *filter = NULL;
    *map_len = 0;
    if (t->scratch_dir && size >= filter_map_min_of (t)) {
        int fd = open (t->scratch_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        /*  fallocate, not posix_fallocate: no emulation that writes
            the whole file in this commit where the file system cannot. */
        if (fd >= 0 && filter_file_ok (fd, size) && fallocate (fd, 0, 0, (off_t) size) == 0) {
            void *p = mmap (NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            filter = p == MAP_FAILED ? NULL : p;
            *map_len = filter ? size : 0;
        }
        if (fd >= 0)
            close (fd);             /* the mapping keeps the file */
    }
    return filter ? filter : heap_ok || size < FILTER_MAP_MIN_DEFAULT ? calloc (1, size) : NULL;
}

/*  A zeroed filter of nblocks for a run of count keys in tier / slot. */
static uint8_t *
filter_new (const dx_tables *t, uint64_t count, uint32_t nblocks, uint32_t tier, uint32_t slot,
            size_t *map_len)
{
    uint8_t *filter = filter_alloc (t, BLOOM_HDR + (size_t) nblocks * BLOOM_BLOCK, true, map_len);
    if (filter) {
        uint32_t hdr[4] = { (uint32_t) count, nblocks, tier, slot };
        memcpy (filter, hdr, sizeof hdr);
    }
    return filter;
}

static void
filter_free (uint8_t *filter, size_t map_len)
{
    if (filter && map_len)
        munmap (filter, map_len);
    else
        free (filter);
}

/* ---- blocks: how a run's table holds its records ----

    Since format 9 a run's table holds blocks: the key of each is the last
    dedup key in it, its value 1 to BLOCK_MAX records of dedup (16 B) ||
    seq (u64, host order), in ascending key order, every key above those of
    the block before.  A lookup is one MDB_SET_RANGE (the first block whose
    last key is >= the key) and a binary search in it.  Against one LMDB
    node per key (34 bytes of page with its header and pointer, and one
    mdb_put per key in every build) that writes 30% fewer bytes and one
    put per 80 keys: builds (a flush, then one merge per tier) were a
    fifth of the writer's time at 50M entries, most of it in puts.  Two
    blocks of 80 fill a 4 KiB page; a larger one would go to an overflow
    page, which mdb_drop must read to free.
    A build writes full blocks only, holding the rest in memory, and the
    last one when it publishes the run: a table under construction holds
    whole blocks, so its record count is its block count times the
    build's block size (build_resume).
    Runs of earlier formats (no RUN_PACKED) keep one record per key,
    dedup -> seq, and are read that way until a merge replaces them. */
#define REC_LEN         (TLY_DEDUP_LEN + 8)
#define BLOCK_MAX       80
#define BLOCK_BYTES     (REC_LEN * BLOCK_MAX)

/*  Reads a run's records in key order, either layout.  Checks what a
    lookup relies on: keys ascending, each block keyed by its last. */
typedef struct {
    MDB_cursor *cur;
    bool packed;
    bool live;                      /* key and seq hold the current record */
    bool above;                     /* the next record must be above key */
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
    size_t n, i;                    /* packed: records in blk, the next one */
    uint8_t blk[BLOCK_BYTES];       /* a copy: no pointer into the map kept */
} run_cursor;

/*  Takes the block k/v into c, checked whole: keyed by its last record,
    ascending, and above the record before it (c->key, when c->above).
    The first block of a resumed read holds `after` or less at its start,
    and those records are skipped instead. */
static int
block_load (run_cursor *c, const MDB_val *k, const MDB_val *v, const uint8_t *after)
{
    size_t n = v->mv_size / REC_LEN;
    if (k->mv_size != TLY_DEDUP_LEN || v->mv_size % REC_LEN || n == 0 || n > BLOCK_MAX
    ||  memcmp ((const uint8_t *) v->mv_data + (n - 1) * REC_LEN, k->mv_data, TLY_DEDUP_LEN))
        return TLY_ECORRUPT;
    memcpy (c->blk, v->mv_data, v->mv_size);
    if (!after && c->above && key_cmp (c->blk, c->key) <= 0)
        return TLY_ECORRUPT;
    for (size_t i = 1; i < n; i++)
        if (key_cmp (c->blk + (i - 1) * REC_LEN, c->blk + i * REC_LEN) >= 0)
            return TLY_ECORRUPT;
    c->n = n;
    c->i = 0;
    while (after && c->i < n && key_cmp (c->blk + c->i * REC_LEN, after) <= 0)
        c->i++;
    return TLY_OK;
}

/*  Makes the next record current (or !live at the end), reading the table
    with op (then MDB_NEXT) when the block in hand is used up. */
static int
rcur_step (run_cursor *c, MDB_cursor_op op, const uint8_t *after)
{
    for (;;) {
        if (c->packed && c->i < c->n) {     /* in order: block_load checked */
            const uint8_t *r = c->blk + c->i++ * REC_LEN;
            memcpy (c->key, r, TLY_DEDUP_LEN);
            memcpy (&c->seq, r + TLY_DEDUP_LEN, 8);
            c->live = c->above = true;
            return TLY_OK;
        }
        MDB_val k = { TLY_DEDUP_LEN, (void *) after }, v;
        int rc = mdb_cursor_get (c->cur, &k, &v, op);
        const uint8_t *skip = op == MDB_SET_RANGE ? after : NULL;   /* the first block only */
        op = MDB_NEXT;
        if (rc == MDB_NOTFOUND) {
            c->live = false;
            return TLY_OK;
        }
        if (rc) {
            c->live = false;
            return TLY_EIO;
        }
        if (c->packed) {
            if (block_load (c, &k, &v, skip))
                break;
            continue;
        }
        if (k.mv_size != TLY_DEDUP_LEN || v.mv_size != 8)
            break;
        if (skip && memcmp (k.mv_data, skip, TLY_DEDUP_LEN) == 0)
            continue;               /* MDB_SET_RANGE found `after` itself */
        memcpy (c->key, k.mv_data, TLY_DEDUP_LEN);
        memcpy (&c->seq, v.mv_data, 8);
        c->live = true;
        return TLY_OK;
    }
    c->live = false;
    return TLY_ECORRUPT;
}

/*  Opens c on table dbi at its first record after `after` (NULL: its
    first record). */
static int
rcur_open (MDB_txn *txn, MDB_dbi dbi, bool packed, const uint8_t *after, run_cursor *c)
{
    c->packed = packed;
    c->live = false;
    c->above = after != NULL;       /* a resumed read goes on above `after` */
    if (after)
        memcpy (c->key, after, TLY_DEDUP_LEN);
    c->n = c->i = 0;
    if (mdb_cursor_open (txn, dbi, &c->cur)) {
        c->cur = NULL;
        return TLY_EIO;
    }
    return rcur_step (c, after ? MDB_SET_RANGE : MDB_FIRST, after);
}

static int
rcur_next (run_cursor *c)
{
    return rcur_step (c, MDB_NEXT, NULL);
}

static void
rcur_close (run_cursor *c)
{
    if (c->cur)
        mdb_cursor_close (c->cur);
    c->cur = NULL;
    c->live = false;
}

/*  The seq of key in a packed run's table: the block that would hold it,
    then a binary search in it. */
static int
block_find (MDB_txn *txn, MDB_dbi dbi, const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq)
{
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, dbi, &cur))
        return TLY_EIO;
    MDB_val k = { TLY_DEDUP_LEN, (void *) key }, v = { 0, NULL };
    int rc = mdb_cursor_get (cur, &k, &v, MDB_SET_RANGE);
    int err = rc == MDB_NOTFOUND ? TLY_ENOTFOUND : rc ? TLY_EIO : TLY_OK;
    size_t lo = 0, hi = v.mv_size / REC_LEN;
    if (!err && (v.mv_size % REC_LEN || hi == 0 || hi > BLOCK_MAX))
        err = TLY_ECORRUPT;
    while (!err && lo < hi) {
        size_t mid = (lo + hi) / 2;
        const uint8_t *r = (const uint8_t *) v.mv_data + mid * REC_LEN;
        int d = key_cmp (r, key);
        if (d == 0) {
            memcpy (seq, r + TLY_DEDUP_LEN, 8);
            break;
        }
        if (d < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (!err && lo >= hi)
        err = TLY_ENOTFOUND;
    mdb_cursor_close (cur);
    return err;
}

/* ---- the tables ---- */

int
dx_open (MDB_txn *txn, dx_tables *t)
{
    char name[16];
    int rc = mdb_dbi_open (txn, "blooms", MDB_CREATE, &t->blooms);
    if (!rc) rc = mdb_dbi_open (txn, "groups", MDB_CREATE, &t->groups);
    if (!rc) rc = mdb_dbi_open (txn, "meta", MDB_CREATE, &t->meta);
    for (unsigned i = 0; i < DX_SLOTS && !rc; i++) {
        snprintf (name, sizeof name, "run.%u", i);
        rc = mdb_dbi_open (txn, name, MDB_CREATE, &t->slot[i]);
    }
    return rc ? lmdb_err (rc) : TLY_OK;
}

/*  meta "dedup.state": version (u32), 0 (u32), covered (u64), host order;
    absent in a new ledger (nothing covered). */
static int
covered_load (const dx_tables *t, MDB_txn *txn, uint64_t *covered)
{
    MDB_val v;
    *covered = 0;
    int rc = mdb_get (txn, t->meta, (MDB_val *) &STATE_KEY, &v);
    if (rc == MDB_NOTFOUND)
        return TLY_OK;
    if (rc)
        return TLY_EIO;
    uint32_t version;
    if (v.mv_size != 16)
        return TLY_ECORRUPT;
    memcpy (&version, v.mv_data, 4);
    memcpy (covered, (const uint8_t *) v.mv_data + 8, 8);
    return version == STATE_VERSION ? TLY_OK : TLY_ECORRUPT;
}

static int
covered_store (const dx_tables *t, MDB_txn *txn, uint64_t covered)
{
    uint8_t h[16] = { 0 };
    uint32_t version = STATE_VERSION;
    memcpy (h, &version, 4);
    memcpy (h + 8, &covered, 8);
    MDB_val v = { sizeof h, h };
    int rc = mdb_put (txn, t->meta, (MDB_val *) &STATE_KEY, &v, 0);
    return rc ? lmdb_err (rc) : TLY_OK;
}

/*  Format 5 kept L0 on disk in "dedup" and "dedup.1", which held exactly
    the keys of the entries [covered, size): the smallest seq in them is
    covered (size when both are empty).  Record it and delete them.
    TLY_ECORRUPT unless the tables hold one record per entry of
    [covered, size) and the runs the rest. */
int
dx_migrate_5 (const dx_tables *t, MDB_txn *txn, uint64_t size)
{
    static const char *names[2] = { "dedup", "dedup.1" };
    uint64_t covered = size, records = 0;
    for (int i = 0; i < 2; i++) {
        MDB_dbi dbi;
        MDB_cursor *cur;
        int rc = mdb_dbi_open (txn, names[i], 0, &dbi);
        if (rc == MDB_NOTFOUND)
            continue;
        if (rc || mdb_cursor_open (txn, dbi, &cur))
            return TLY_EIO;
        MDB_val k, v;
        int err = TLY_OK;
        uint64_t seq;
        for (rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST); rc == 0 && !err;
             rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT))
            if (!(err = seq_from_val (&v, &seq))) {
                covered = seq < covered ? seq : covered;
                records++;
                err = seq < size ? TLY_OK : TLY_ECORRUPT;
            }
        mdb_cursor_close (cur);
        if (err)
            return err;
        if (rc != MDB_NOTFOUND || mdb_drop (txn, dbi, 1))
            return TLY_EIO;
    }
    if (records != size - covered)
        return TLY_ECORRUPT;
    dx_view view = { 0 };
    int err = covered_store (t, txn, covered);
    if (!err)
        err = dx_view_load (t, txn, &view);     /* the runs hold [0, covered) */
    dx_view_free (&view);
    return err;
}

/* ---- views: the visible runs ---- */

static int
view_insert (dx_view *view, dx_run run)
{
    if (grow (&view->runs, &view->cap, view->n, sizeof *view->runs))
        return TLY_ENOMEM;
    size_t i = view->n;
    for (; i > 0 && view->runs[i - 1].id > run.id; i--)
        view->runs[i] = view->runs[i - 1];
    view->runs[i] = run;
    view->n++;
    return TLY_OK;
}

/*  The index of the first run whose id is >= id (view->n: none). */
static size_t
view_lower (const dx_view *view, uint32_t id)
{
    size_t lo = 0, hi = view->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (view->runs[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/*  The visible run with this id, or NULL. */
static dx_run *
view_find (const dx_view *view, uint32_t id)
{
    size_t i = view_lower (view, id);
    return i < view->n && view->runs[i].id == id ? (dx_run *) &view->runs[i] : NULL;
}

static void
view_remove (dx_view *view, uint32_t id)
{
    size_t i = view_lower (view, id);
    if (i < view->n && view->runs[i].id == id) {
        memmove (&view->runs[i], &view->runs[i + 1], (view->n - i - 1) * sizeof *view->runs);
        view->n--;
    }
}

/*  Names each visible run's group.  A group whose visible members are
    not all of its tier and in no other group is malformed (bad): it
    links no run, so they are asked one by one. */
static void
view_link (dx_view *view)
{
    for (size_t i = 0; i < view->n; i++)
        view->runs[i].group = -1;
    for (size_t g = 0; g < view->ng; g++) {
        dx_group *grp = &view->groups[g];
        bool ok = g <= INT32_MAX;
        grp->live = 0;
        grp->bad = false;
        for (uint32_t m = 0; m < grp->n && ok; m++) {
            const dx_run *run = view_find (view, grp->members[m]);
            ok = !run || (run->tier == grp->tier && run->group < 0);
            for (uint32_t j = 0; j < m && ok; j++)
                ok = grp->members[j] != grp->members[m];
        }
        if (!ok) {
            grp->bad = true;
            continue;
        }
        for (uint32_t m = 0; m < grp->n; m++) {
            dx_run *run = view_find (view, grp->members[m]);
            if (run) {
                run->group = (int32_t) g;
                grp->live++;
            }
        }
    }
}

/*  A "groups" record, or false if it does not parse. */
static bool
group_parse (const MDB_val *k, const MDB_val *v, dx_group *grp)
{
    uint32_t hdr[4];
    if (k->mv_size != 4 || v->mv_size < GROUP_HDR)
        return false;
    memcpy (hdr, v->mv_data, sizeof hdr);
    *grp = (dx_group) { .id = get_be32 (k->mv_data), .tier = hdr[1], .nblocks = hdr[2],
                        .n = hdr[3], .bits = (const uint8_t *) v->mv_data + GROUP_HDR };
    memcpy (grp->members, (const uint8_t *) v->mv_data + 16, sizeof grp->members);
    return hdr[0] == GROUP_VERSION && grp->tier < DX_TIERS && grp->n <= DX_GROUP_MAX
        && grp->nblocks > 0 && v->mv_size == GROUP_HDR + (size_t) grp->nblocks * BLOOM_BLOCK;
}

/*  The "groups" records, ascending id.  A record that does not parse is
    left out (counted in malformed): its members are asked one by one. */
static int
groups_load (const dx_tables *t, MDB_txn *txn, dx_view *view)
{
    view->ng = 0;
    view->malformed = 0;
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, t->groups, &cur))
        return TLY_EIO;
    int err = TLY_OK;
    MDB_val k, v;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
    for (; rc == 0 && !err; rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
        dx_group grp;
        if (!group_parse (&k, &v, &grp))
            view->malformed++;
        else
        if (!(err = grow (&view->groups, &view->gcap, view->ng, sizeof *view->groups)))
            view->groups[view->ng++] = grp;
    }
    if (!err && rc != MDB_NOTFOUND)
        err = TLY_EIO;
    mdb_cursor_close (cur);
    if (!err)
        view_link (view);
    return err;
}

/*  One "blooms" record per visible run, and the groups.  The filters are
    not copied: bits point into the map, valid for the txn. */
int
dx_view_load (const dx_tables *t, MDB_txn *txn, dx_view *view)
{
    view->n = 0;
    view->ng = 0;
    view->probes = 0;
    int err = covered_load (t, txn, &view->covered);
    if (err)
        return err;
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, t->blooms, &cur))
        return TLY_EIO;
    bool taken[DX_SLOTS] = { false };
    MDB_val k, v;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
    for (; rc == 0; rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 4 || v.mv_size < BLOOM_HDR) {
            err = TLY_ECORRUPT;
            break;
        }
        uint32_t hdr[4];
        memcpy (hdr, v.mv_data, sizeof hdr);
        dx_run run = { .id = get_be32 (k.mv_data), .count = hdr[0], .nblocks = hdr[1],
                       .tier = hdr[2] & RUN_TIER_MASK, .slot = hdr[3],
                       .packed = (hdr[2] & RUN_PACKED) != 0, .group = -1 };
        /*  No table to look in, or two runs in one: keys would vanish. */
        if (run.tier >= DX_TIERS || run.slot >= DX_SLOTS || taken[run.slot]
        ||  (hdr[2] & ~(RUN_TIER_MASK | RUN_PACKED))) {
            err = TLY_ECORRUPT;
            break;
        }
        taken[run.slot] = true;
        if (run.nblocks && v.mv_size == BLOOM_HDR + (size_t) run.nblocks * BLOOM_BLOCK)
            run.bits = (const uint8_t *) v.mv_data + BLOOM_HDR;
        if ((err = view_insert (view, run)))
            break;
    }
    if (!err && rc != MDB_NOTFOUND)
        err = TLY_EIO;
    mdb_cursor_close (cur);
    /*  Every flush adds its run's count to covered and every merge keeps
        the sum: a covered that disagrees (a flipped bit in meta) would
        drop keys from the index or put them in two places. */
    uint64_t sum = 0;
    for (size_t i = 0; i < view->n && !err; i++)
        sum += view->runs[i].count;
    if (!err && sum != view->covered)
        err = TLY_ECORRUPT;
    return err ? err : groups_load (t, txn, view);
}

int
dx_view_sync (const dx_tables *t, MDB_txn *txn, dx_view *view, uint64_t size)
{
    return l0_sync (&view->l0, txn, view->covered, size, t->key_of, t->key_ctx);
}

void
dx_view_free (dx_view *view)
{
    free (view->runs);
    free (view->groups);
    l0_free (&view->l0);
    memset (view, 0, sizeof *view);
}

/*  Which runs a lookup asks: ask[i] for run i of the view, unless its
    id is in skip (ascending).  Both lists ascend, so one pass. */
static void
lookup_mark (const dx_view *view, const uint32_t *skip, size_t nskip, uint8_t *ask)
{
    size_t j = 0;
    for (size_t i = 0; i < view->n; i++) {
        uint32_t id = view->runs[i].id;
        while (j < nskip && skip[j] < id)
            j++;
        ask[i] = !(j < nskip && skip[j] == id);
    }
}

/*  The filter blocks a lookup of key reads first (the group's of each run
    asked, or the run's own if it is in no group), fetched ahead: each is
    most likely a cache miss in a different filter; issued together the
    misses overlap (and overlap the L0 lookup) instead of queueing one
    behind the other.  A group prefetched is marked 3 in said (not read
    yet, like 2), so it is fetched once. */
static void
lookup_prefetch (const dx_view *view, const uint8_t *ask, uint8_t *said, size_t nsaid,
                 const uint8_t key[TLY_DEDUP_LEN])
{
#if defined(__GNUC__)
    for (size_t i = 0; i < view->n; i++) {
        const dx_run *run = &view->runs[i];
        if (!ask[i])
            continue;
        if (run->group < 0) {
            if (run->bits)
                __builtin_prefetch (bloom_block (run->bits, run->nblocks, key));
            continue;
        }
        size_t g = (size_t) run->group;
        if (g < nsaid && said[g] == 3)
            continue;
        if (g < nsaid)
            said[g] = 3;
        __builtin_prefetch (bloom_block (view->groups[g].bits, view->groups[g].nblocks, key));
    }
#else
    (void) view;
    (void) ask;
    (void) said;
    (void) nsaid;
    (void) key;
#endif
}

/*  L0, then the runs newest first; each key is visible in exactly one
    place, so the order only matters for speed (recent keys are hot).  A
    run in a group is asked only if its group may hold the key; each
    group's filter is read once (said: 0 no, 1 maybe, 2 or 3 not read
    yet). */
int
dx_lookup_in (const dx_tables *t, MDB_txn *txn, dx_view *view,
              const uint8_t key[TLY_DEDUP_LEN], bool with_l0, const uint32_t *skip,
              size_t nskip, uint64_t *seq)
{
    MDB_val k = { TLY_DEDUP_LEN, (void *) key }, v;
    uint8_t ask[DX_SLOTS], said[DX_SLOTS];
    size_t nsaid = view->ng < DX_SLOTS ? view->ng : DX_SLOTS;
    /*  Each visible run has a table of its own (dx_view_load refuses two
        in one, builds take a free one): more runs is a bug. */
    if (view->n > DX_SLOTS)
        return TLY_ECORRUPT;
    lookup_mark (view, skip, nskip, ask);
    memset (said, 2, nsaid);
    lookup_prefetch (view, ask, said, nsaid, key);
    if (with_l0 && l0_find (&view->l0, key, seq) == TLY_OK)
        return TLY_OK;
    for (size_t i = view->n; i-- > 0;) {
        const dx_run *run = &view->runs[i];
        if (!ask[i])
            continue;
        if (run->group >= 0) {
            size_t g = (size_t) run->group;
            const dx_group *grp = &view->groups[g];
            if (g >= nsaid) {
                if (!bloom_test (grp->bits, grp->nblocks, key))
                    continue;
            }
            else {
                if (said[g] >= 2)
                    said[g] = bloom_test (grp->bits, grp->nblocks, key);
                if (!said[g])
                    continue;
            }
        }
        if (!bloom_maybe (run, key))
            continue;
        view->probes++;
        if (run->packed) {
            int err = block_find (txn, t->slot[run->slot], key, seq);
            if (err != TLY_ENOTFOUND)
                return err;
            continue;
        }
        int rc = mdb_get (txn, t->slot[run->slot], &k, &v);
        if (rc == 0)
            return seq_from_val (&v, seq);
        if (rc != MDB_NOTFOUND)
            return TLY_EIO;
    }
    return TLY_ENOTFOUND;
}

int
dx_lookup (const dx_tables *t, MDB_txn *txn, dx_view *view,
           const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq)
{
    return dx_lookup_in (t, txn, view, key, true, NULL, 0, seq);
}

int
dx_view_ids (const dx_view *view, uint32_t ids[DX_SLOTS], size_t *n)
{
    *n = 0;
    if (view->n > DX_SLOTS)
        return TLY_ECORRUPT;        /* as in dx_lookup_in */
    for (size_t i = 0; i < view->n; i++)
        ids[i] = view->runs[i].id;
    *n = view->n;
    return TLY_OK;
}

/* ---- the scrubber's scan ---- */

typedef struct {
    tly_dedup_fn *fn;
    void *ctx;
    uint8_t *last;                  /* the position of the last record visited */
    size_t left;                    /* records still to visit in this call */
} scan_ctx;

/*  Visits the records of one visible run's table after `resume` (NULL:
    from its first) until it ends (*ended) or sc->left runs out.  The
    run's filter must say "maybe" for each of its keys, or lookups would
    not see them: a silent hole in deduplication. */
static int
scan_table (MDB_txn *txn, MDB_dbi dbi, const dx_run *run, const dx_group *grp,
            const uint8_t *resume, scan_ctx *sc, bool *ended)
{
    run_cursor c;
    int err = rcur_open (txn, dbi, run->packed, resume, &c);
    for (; !err && c.live && sc->left > 0; sc->left--) {
        if (!run->bits || !bloom_maybe (run, c.key)
        ||  (grp && !bloom_test (grp->bits, grp->nblocks, c.key))) {
            err = TLY_ECORRUPT;
            break;
        }
        put_be32 (sc->last, run->id);
        memcpy (sc->last + 4, c.key, TLY_DEDUP_LEN);
        if ((err = sc->fn (sc->ctx, c.key, c.seq)))
            break;
        err = rcur_next (&c);
    }
    *ended = !err && !c.live;
    rcur_close (&c);
    return err;
}

/*  A position is run id (u32 BE) || dedup; the runs are visited by
    ascending id.  Records only ever move to a run with a higher id than
    any before it, so a pass started before a flush or merge still visits
    every record it started with.  Runs being built or dead are not
    visible: nothing looks in them, so nothing to check.  L0 is not
    stored: the entries it is derived from are checked as entries.  Each
    key is checked against its group's filter too; a group record that
    is malformed fails the pass at once. */
int
dx_scan (const dx_tables *t, MDB_txn *txn, const dx_view *view, const uint8_t *after,
         size_t count, tly_dedup_fn *fn, void *ctx, uint8_t last[TLY_DEDUP_POS_LEN],
         bool *done)
{
    scan_ctx sc = { fn, ctx, last, count };
    const uint8_t *resume = after ? after + 4 : NULL;
    uint32_t from = after ? get_be32 (after) : 0;
    bool ended = true;
    int err = view->malformed ? TLY_ECORRUPT : TLY_OK;
    for (size_t g = 0; g < view->ng && !err; g++)
        err = view->groups[g].bad ? TLY_ECORRUPT : TLY_OK;
    *done = false;
    for (size_t i = view_lower (view, from); i < view->n && !err && ended; i++) {
        const dx_run *run = &view->runs[i];
        const dx_group *grp = run->group >= 0 ? &view->groups[run->group] : NULL;
        err = scan_table (txn, t->slot[run->slot], run, grp, run->id == from ? resume : NULL,
                          &sc, &ended);
    }
    *done = !err && ended;
    return err;
}

/* ---- the writer: builds and dead runs ---- */

/*  A run under construction in table slot: from L0's oldest keys (tier 0)
    or from MERGE_FANIN runs of tier - 1.  Its filter grows in the
    writer's heap and is stored when the build ends. */
typedef struct {
    bool on;
    uint32_t out;                   /* the run's id */
    uint32_t slot;                  /* its table */
    dx_run in[MERGE_FANIN];         /* tier > 0: the runs merged */
    uint64_t total, done;
    uint8_t last[TLY_DEDUP_LEN];    /* the last key written (done > 0) */
    uint32_t block;                 /* records per block (0: one record per key) */
    uint32_t nblk;                  /* records in blk, not yet in the table */
    uint8_t blk[BLOCK_BYTES];
    uint8_t *filter;                /* BLOOM_HDR + nblocks * BLOOM_BLOCK */
    size_t map_len;                 /* filter's mapping (filter_new); 0: heap */
    uint32_t nblocks;
    uint64_t refill;                /* resumed: keys its table held, to refilter */
    uint64_t refilled;              /* of those, back in the filter */
    uint8_t refill_last[TLY_DEDUP_LEN];    /* the last of those (refilled > 0) */
    uint8_t refill_end[TLY_DEDUP_LEN];     /* the table's last key at the resume */
    struct dx_fill *fill;           /* the group its keys go into too (NULL: none) */
} dx_build;

/*  The group a tier's runs join as they are built: its filter (the
    record's header, then the blocks) and the members published so far.
    Only build[tier] fills it, one build at a time. */
typedef struct dx_fill {
    bool on;
    uint32_t id, tier, nblocks, n;
    uint32_t members[DX_GROUP_MAX];
    uint32_t stored;                /* members in its stored record (0: none) */
    uint64_t keys;                  /* in its published members */
    uint64_t planned;               /* those, and the build filling it now */
    uint64_t capacity;              /* keys it was sized for */
    uint8_t *filter;                /* nblocks * BLOOM_BLOCK (the record adds its header) */
    size_t map_len;
} dx_fill;

typedef struct {
    uint8_t *filter;
    size_t map_len;
} dx_fresh;

struct dx_writer {
    const dx_tables *t;
    MDB_txn *txn;
    dx_view view;
    bool loaded;                    /* the state below matches meta + txn */
    bool dirty;                     /* this txn changed it */
    int failed;                     /* maintenance failed in this txn: its error */
    uint64_t work;                  /* counts changes, to know when to stop */
    dx_rec *frozen;                 /* build[0]: L0's keys [covered, covered + total), sorted */
    uint32_t next_id;
    dx_build build[DX_TIERS];       /* build[j] makes a run of tier j */
    dx_fill fill[DX_TIERS];         /* fill[j]: the group tier j's runs join */
    bool dead[DX_SLOTS];            /* holds records no visible run owns */
    dx_fresh *fresh;                /* filters of runs finished in this txn */
    size_t nfresh, fresh_cap;
};

int
dx_writer_new (const dx_tables *t, dx_writer **out)
{
    dx_writer *self = calloc (1, sizeof *self);
    if (!self)
        return TLY_ENOMEM;
    self->t = t;
    *out = self;
    return TLY_OK;
}

static void
drop_fresh (dx_writer *self)
{
    for (size_t i = 0; i < self->nfresh; i++)
        filter_free (self->fresh[i].filter, self->fresh[i].map_len);
    self->nfresh = 0;
}

/*  Forgets the maintenance state: the next begin derives it from meta and
    the tables, where each build under way at the last commit is resumed
    (build_resume).  A group filling is lost, unless a checkpoint stored
    it: its runs are then asked one by one until merged. */
static void
forget_state (dx_writer *self)
{
    for (unsigned j = 0; j < DX_TIERS; j++) {
        filter_free (self->build[j].filter, self->build[j].map_len);
        memset (&self->build[j], 0, sizeof self->build[j]);
        filter_free (self->fill[j].filter, self->fill[j].map_len);
        memset (&self->fill[j], 0, sizeof self->fill[j]);
    }
    free (self->frozen);
    self->frozen = NULL;
    self->loaded = false;
}

void
dx_writer_destroy (dx_writer **self_p)
{
    dx_writer *self = *self_p;
    if (self) {
        forget_state (self);
        drop_fresh (self);
        free (self->fresh);
        dx_view_free (&self->view);
        free (self);
        *self_p = NULL;
    }
}

static void
changed (dx_writer *self)
{
    self->dirty = true;
    self->work++;
}

/*  Whether table slot holds a visible run or a build's output. */
static bool
slot_owned (const dx_writer *self, uint32_t slot)
{
    for (size_t i = 0; i < self->view.n; i++)
        if (self->view.runs[i].slot == slot)
            return true;
    for (unsigned j = 0; j < DX_TIERS; j++)
        if (self->build[j].on && self->build[j].slot == slot)
            return true;
    return false;
}

/* ---- groups being filled ----

    The view's groups come from "groups" as the txn began (clean pages,
    which no write in the txn moves) and from the writer's own memory:
    the groups filling, and those stored in this txn (kept in `fresh`).
    So nothing here reads a group record back after writing one. */

/*  Points the view at each filling group with members (in place of the
    record a checkpoint stored of it, if any), and links the runs again. */
static int
view_attach (dx_writer *self)
{
    dx_view *view = &self->view;
    for (unsigned j = 0; j < DX_TIERS; j++) {
        const dx_fill *f = &self->fill[j];
        if (!f->on || f->n == 0)
            continue;
        size_t g = 0;
        while (g < view->ng && view->groups[g].id != f->id)
            g++;
        if (g == view->ng) {
            if (grow (&view->groups, &view->gcap, view->ng, sizeof *view->groups))
                return TLY_ENOMEM;
            view->ng++;
        }
        dx_group *grp = &view->groups[g];
        *grp = (dx_group) { .id = f->id, .tier = f->tier, .nblocks = f->nblocks, .n = f->n,
                            .bits = f->filter };
        memcpy (grp->members, f->members, sizeof grp->members);
    }
    view_link (view);
    return TLY_OK;
}

/*  Stores f's record.  A group still filling is stored folded to the
    size its members need: blocks are picked by range, so in a filter of
    half the blocks a key's block is (its block) / 2, and OR-ing block
    pairs gives exactly the filter those keys would have made in it
    (16 bits per key again).  A tier left with one such record per
    restart then takes no more room than its runs' own filters. */
static int
fill_put (dx_writer *self, dx_fill *f)
{
    uint32_t nblocks = f->nblocks, fold = 1;
    while (f->n < DX_GROUP_MAX && nblocks % 2 == 0 && bloom_nblocks (f->keys) <= nblocks / 2) {
        nblocks /= 2;
        fold *= 2;
    }
    uint8_t key[4];
    put_be32 (key, f->id);
    MDB_val k = { 4, key }, v = { GROUP_HDR + (size_t) nblocks * BLOOM_BLOCK, NULL };
    int rc = mdb_put (self->txn, self->t->groups, &k, &v, MDB_RESERVE);
    if (rc)
        return lmdb_err (rc);
    uint8_t *out = v.mv_data;
    uint32_t hdr[4] = { GROUP_VERSION, f->tier, nblocks, f->n };
    uint64_t capacity = f->capacity / fold;
    memcpy (out, hdr, sizeof hdr);
    memcpy (out + 16, f->members, sizeof f->members);
    memcpy (out + 48, &f->keys, 8);
    memcpy (out + 56, &capacity, 8);
    const uint8_t *in = f->filter;
    for (uint32_t j = 0; j < nblocks; j++) {
        uint8_t *block = out + GROUP_HDR + (size_t) j * BLOOM_BLOCK;
        memcpy (block, in + (size_t) j * fold * BLOOM_BLOCK, BLOOM_BLOCK);
        for (uint32_t i = 1; i < fold; i++)
            for (int b = 0; b < BLOOM_BLOCK; b++)
                block[b] |= in[((size_t) j * fold + i) * BLOOM_BLOCK + b];
    }
    f->stored = f->n;
    changed (self);
    return TLY_OK;
}

/*  A group with all its members, or no room for the next: stored for
    good.  Its filter stays the view's until the txn ends. */
static int
fill_close (dx_writer *self, dx_fill *f)
{
    if (grow (&self->fresh, &self->fresh_cap, self->nfresh, sizeof *self->fresh))
        return TLY_ENOMEM;
    int err = f->n ? fill_put (self, f) : TLY_OK;
    if (err)
        return err;
    self->fresh[self->nfresh++] = (dx_fresh) { f->filter, f->map_len };
    memset (f, 0, sizeof *f);
    changed (self);
    return TLY_OK;
}

/*  build[tier], about to make run `id` of total keys, joins its tier's
    group: the one filling if it has room, else a new one sized for
    DX_GROUP_MAX runs like this one (up to a quarter more keys only
    raises its false positives).  A group too large to map (O_TMPFILE,
    see filter_alloc) is not made: its runs are asked one by one. */
static int
fill_join (dx_writer *self, unsigned tier, uint64_t total, uint32_t id)
{
    dx_fill *f = &self->fill[tier];
    dx_build *b = &self->build[tier];
    b->fill = NULL;
    if (f->on && f->planned + total > f->capacity + f->capacity / 4) {
        int err = fill_close (self, f);
        if (err)
            return err;
    }
    if (!f->on) {
        uint64_t capacity = total * DX_GROUP_MAX;
        /*  A multiple of 8 blocks: fill_put can fold it down to one run's. */
        uint32_t nblocks = (bloom_nblocks (capacity) + DX_GROUP_MAX - 1) / DX_GROUP_MAX
                         * DX_GROUP_MAX;
        size_t map_len;
        uint8_t *filter = filter_alloc (self->t, (size_t) nblocks * BLOOM_BLOCK,
                                        false, &map_len);
        if (!filter)
            return TLY_OK;
        *f = (dx_fill) { .on = true, .id = id, .tier = tier, .nblocks = nblocks,
                         .capacity = capacity, .filter = filter, .map_len = map_len };
    }
    f->planned += total;
    b->fill = f;                    /* no change to the txn yet: its keys will be */
    return TLY_OK;
}

/*  Run `id` of total keys, made by a build that filled f, is published. */
static int
fill_publish (dx_writer *self, dx_fill *f, uint32_t id, uint64_t total)
{
    if (f->n >= DX_GROUP_MAX)
        return TLY_ECORRUPT;        /* a full group is closed: a bug */
    f->members[f->n++] = id;
    f->keys += total;
    int err = view_attach (self);
    if (!err && f->n == DX_GROUP_MAX)
        err = fill_close (self, f);
    return err;
}

/*  Deletes the group records that name no visible run any more (or
    that are malformed: a group is only a shortcut), but not a group
    still filling. */
static int
groups_gc (dx_writer *self)
{
    dx_view *view = &self->view;
    for (size_t g = 0; g < view->ng;) {
        const dx_group *grp = &view->groups[g];
        bool filling = false;
        for (unsigned j = 0; j < DX_TIERS; j++)
            filling |= self->fill[j].on && self->fill[j].id == grp->id;
        if (filling || (grp->live > 0 && !grp->bad)) {
            g++;
            continue;
        }
        uint8_t key[4];
        put_be32 (key, grp->id);
        MDB_val k = { 4, key };
        int rc = mdb_del (self->txn, self->t->groups, &k, NULL);
        if (rc && rc != MDB_NOTFOUND) {
            view_link (view);       /* runs must not name a group moved away */
            return lmdb_err (rc);
        }
        memmove (&view->groups[g], &view->groups[g + 1], (view->ng - g - 1) * sizeof *view->groups);
        view->ng--;
        changed (self);
    }
    view_link (view);
    return TLY_OK;
}

/*  Records of "groups" that do not parse are deleted (their runs are
    asked one by one meanwhile). */
static int
groups_purge (dx_writer *self)
{
    int rc = MDB_NOTFOUND;
    for (size_t left = self->view.malformed; left > 0; left--) {
        MDB_cursor *cur;
        if (mdb_cursor_open (self->txn, self->t->groups, &cur))
            return TLY_EIO;
        MDB_val k, v;
        dx_group grp;
        rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
        while (rc == 0 && group_parse (&k, &v, &grp))
            rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
        if (rc == 0)
            rc = mdb_cursor_del (cur, 0);
        mdb_cursor_close (cur);
        if (rc)
            break;
        changed (self);
    }
    if (rc && rc != MDB_NOTFOUND)
        return lmdb_err (rc);
    self->view.malformed = 0;
    return TLY_OK;
}

int
dx_writer_checkpoint (dx_writer *self, bool *changed)
{
    for (unsigned j = 0; j < DX_TIERS; j++) {
        dx_fill *f = &self->fill[j];
        if (f->on && f->n > f->stored) {
            int err = fill_put (self, f);
            if (err)
                return err;
        }
    }
    *changed = self->dirty;
    return TLY_OK;
}

/*  Sets build[tier] up to write total keys into table slot in blocks of
    `block` records (0: one record per key): its id, and an empty filter
    whose header names them. */
static int
build_init (dx_writer *self, unsigned tier, uint32_t slot, uint64_t total, uint32_t block)
{
    dx_build *b = &self->build[tier];
    b->nblocks = bloom_nblocks (total);
    b->filter = filter_new (self->t, total, b->nblocks, tier | (block ? RUN_PACKED : 0), slot,
                            &b->map_len);
    if (!b->filter)
        return TLY_ENOMEM;
    b->out = self->next_id++;
    b->slot = slot;
    b->total = total;
    b->block = block;
    b->nblk = 0;
    return fill_join (self, tier, total, b->out);
}

/*  meta "dedup.build<tier>": a build in progress, written in the txn
    that starts it and deleted in the one that publishes it, so that a
    restart (or an aborted txn) resumes the build instead of emptying its
    table and starting over: a merge of large runs spans millions of
    events, and a writer restarted more often than that would otherwise
    never finish it.  version (u32), table (u32), total (u64), the ids
    (u32) of the MERGE_FANIN runs merged (0 for a flush), then records per
    block (u32; 0: one record per key), host order.  Version 1 (format 8)
    has no block size: one record per key.  What the table holds so far is
    its own record of progress: `done` is its record count (whole blocks:
    blocks times the block size), `last` its last key. */
#define BUILD_VERSION   2
#define BUILD_REC_1     (16 + 4 * MERGE_FANIN)
#define BUILD_REC       (BUILD_REC_1 + 4)

static void
build_key (unsigned tier, char key[12])
{
    memcpy (key, "dedup.build", 11);
    key[11] = (char) ('0' + tier);
}

static int
build_record_put (dx_writer *self, unsigned tier)
{
    const dx_build *b = &self->build[tier];
    uint8_t v[BUILD_REC] = { 0 };
    uint32_t version = BUILD_VERSION;
    memcpy (v, &version, 4);
    memcpy (v + 4, &b->slot, 4);
    memcpy (v + 8, &b->total, 8);
    for (size_t i = 0; tier > 0 && i < MERGE_FANIN; i++)
        memcpy (v + 16 + 4 * i, &b->in[i].id, 4);
    memcpy (v + BUILD_REC_1, &b->block, 4);
    char key[12];
    build_key (tier, key);
    MDB_val k = { sizeof key, key }, val = { sizeof v, v };
    int rc = mdb_put (self->txn, self->t->meta, &k, &val, 0);
    return rc ? lmdb_err (rc) : TLY_OK;
}

static int
build_record_del (dx_writer *self, unsigned tier)
{
    char key[12];
    build_key (tier, key);
    MDB_val k = { sizeof key, key };
    int rc = mdb_del (self->txn, self->t->meta, &k, NULL);
    return rc == 0 || rc == MDB_NOTFOUND ? TLY_OK : TLY_EIO;
}

/*  Gives up build[tier] (its filter, its frozen keys, its record); its
    table, no longer owned, is emptied as dead once marked so (state_load
    marks every unowned table holding records). */
static int
build_drop (dx_writer *self, unsigned tier)
{
    dx_build *b = &self->build[tier];
    filter_free (b->filter, b->map_len);
    memset (b, 0, sizeof *b);
    if (tier == 0) {
        free (self->frozen);
        self->frozen = NULL;
    }
    changed (self);
    return build_record_del (self, tier);   /* a later start writes a new one */
}

/*  Takes up the build of tier that meta records, if its record still
    matches the index: its inputs visible (a flush: L0 holds its keys),
    its table not another run's, holding no more than total keys.  Then
    the build first puts its table's keys back into a new filter
    (refill_step), and goes on where it stopped.  Anything else is a build
    this writer cannot continue: its record goes, and its table, not
    owned, is emptied as dead. */
static int
build_resume (dx_writer *self, unsigned tier)
{
    char key[12];
    build_key (tier, key);
    MDB_val k = { sizeof key, key }, v;
    int rc = mdb_get (self->txn, self->t->meta, &k, &v);
    if (rc == MDB_NOTFOUND)
        return TLY_OK;
    if (rc)
        return TLY_EIO;
    const uint8_t *rec = v.mv_data;
    uint32_t version = 0, slot = DX_SLOTS, ids[MERGE_FANIN] = { 0 }, block = 0;
    uint64_t total = 0, sum = 0;
    if (v.mv_size == BUILD_REC || v.mv_size == BUILD_REC_1) {
        memcpy (&version, rec, 4);
        memcpy (&slot, rec + 4, 4);
        memcpy (&total, rec + 8, 8);
        memcpy (ids, rec + 16, sizeof ids);
    }
    if (v.mv_size == BUILD_REC)
        memcpy (&block, rec + BUILD_REC_1, 4);
    dx_build *b = &self->build[tier];
    bool ok = ((version == 1 && v.mv_size == BUILD_REC_1)
               || (version == BUILD_VERSION && v.mv_size == BUILD_REC && block <= BLOCK_MAX))
           && slot < DX_SLOTS && !slot_owned (self, slot) && total > 0 && total <= UINT32_MAX;
    for (size_t i = 0; ok && tier > 0 && i < MERGE_FANIN; i++) {
        const dx_run *run = view_find (&self->view, ids[i]);
        for (size_t j = 0; j < i; j++)
            ok &= ids[j] != ids[i];
        ok = ok && run && run->tier == tier - 1;
        if (ok) {
            b->in[i] = *run;
            b->in[i].bits = NULL;
            sum += run->count;
        }
    }
    if (ok && tier > 0)
        ok = sum == total;
    if (ok && tier == 0)
        ok = self->view.l0.from == self->view.covered && self->view.l0.n >= total;
    size_t entries = 0;
    if (ok && (rc = table_entries (self->txn, self->t->slot[slot], &entries)))
        return rc;
    uint64_t done = block ? (uint64_t) entries * block : entries;
    ok = ok && done <= total;
    uint64_t last_seq = 0;
    if (ok && done > 0) {           /* where the build goes on: after its last key */
        MDB_cursor *cur;
        MDB_val lk, lv;
        if (mdb_cursor_open (self->txn, self->t->slot[slot], &cur))
            return TLY_EIO;
        rc = mdb_cursor_get (cur, &lk, &lv, MDB_LAST);
        /*  A whole block (builds write no other until the last), keyed by
            its last record; or one record. */
        size_t len = block ? (size_t) block * REC_LEN : 8;
        const uint8_t *r = rc == 0 && lv.mv_size == len ? lv.mv_data : NULL;
        if (r && block)
            r += len - REC_LEN;
        ok = r && lk.mv_size == TLY_DEDUP_LEN
          && (!block || memcmp (r, lk.mv_data, TLY_DEDUP_LEN) == 0);
        if (ok) {
            memcpy (b->last, lk.mv_data, TLY_DEDUP_LEN);
            memcpy (&last_seq, block ? r + TLY_DEDUP_LEN : r, 8);
        }
        mdb_cursor_close (cur);
        if (rc && rc != MDB_NOTFOUND)
            return TLY_EIO;
    }
    if (!ok)
        return build_drop (self, tier);
    if (tier == 0 && (rc = l0_sorted (&self->view.l0, (size_t) total, &self->frozen)))
        return rc;
    /*  A flush goes on appending frozen[done..]: its table must end where
        those begin, or the appends would fail every commit before the
        refill reaches the difference.  (A merge goes on after its table's
        last key, whatever that is; the refill checks the rest.) */
    if (tier == 0 && done > 0
    &&  (memcmp (b->last, self->frozen[done - 1].key, TLY_DEDUP_LEN)
         || memcmp (&last_seq, &self->frozen[done - 1].seq, 8)))
        return build_drop (self, tier);
    if ((rc = build_init (self, tier, slot, total, block)))
        return rc;
    b->done = done;
    b->refill = done;
    memcpy (b->refill_end, b->last, TLY_DEDUP_LEN);
    b->on = true;
    return TLY_OK;
}

/*  The stored state is `covered` (dx_view_load) and the records of the
    builds in progress (build_resume).  The rest is derived: ids grow from
    the highest visible one, and a table with records that neither a
    visible run nor a build owns holds a dead run or a build that could
    not be resumed, to be emptied. */
static int
state_load (dx_writer *self)
{
    /*  Above any id a group names too (never a run's id again). */
    uint32_t top = self->view.n ? self->view.runs[self->view.n - 1].id : 0;
    for (size_t g = 0; g < self->view.ng; g++) {
        const dx_group *grp = &self->view.groups[g];
        top = grp->id > top ? grp->id : top;
        for (uint32_t m = 0; m < grp->n; m++)
            top = grp->members[m] > top ? grp->members[m] : top;
    }
    self->next_id = top + 1;
    /*  A group stored still filling is not taken up: copying its filter
        (154 MB for tier 2 at 50M entries) would stall the first commit
        for a third of a second.  It goes on serving lookups for the runs
        it names; the tier's next run starts a new group. */
    int err = groups_purge (self);
    if (!err)
        err = groups_gc (self);
    for (unsigned j = 0; j < DX_TIERS && !err; j++)
        err = build_resume (self, j);
    for (uint32_t s = 0; s < DX_SLOTS && !err; s++) {
        size_t n = 0;
        if (!slot_owned (self, s))
            err = table_entries (self->txn, self->t->slot[s], &n);
        self->dead[s] = n > 0;
    }
    if (err) {
        forget_state (self);        /* half a state would disown resumed builds */
        return err;
    }
    /*  Not `dirty`, unless a record was deleted (build_resume): an abort
        of this txn must then load the state again. */
    self->loaded = true;
    return TLY_OK;
}

/*  L0 carries over from the last txn: only after a restart or a failed
    txn does the sync read entries (the log's tail since `covered`). */
int
dx_writer_begin (dx_writer *self, MDB_txn *txn, uint64_t size)
{
    self->txn = txn;
    drop_fresh (self);
    int err = dx_view_load (self->t, txn, &self->view);
    if (!err)
        err = dx_view_sync (self->t, txn, &self->view, size);
    if (!err && !self->loaded)
        err = state_load (self);    /* after the sync: a flush resumes from L0 */
    else
    if (!err)
        err = view_attach (self);
    return err;
}

int
dx_writer_lookup (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq)
{
    return dx_lookup (self->t, self->txn, &self->view, key, seq);
}

int
dx_writer_lookup_in (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], const uint32_t *skip,
                     size_t nskip, uint64_t *seq)
{
    return dx_lookup_in (self->t, self->txn, &self->view, key, true, skip, nskip, seq);
}

void
dx_writer_prefetch (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN])
{
    l0_prefetch (&self->view.l0, key);
}

int
dx_writer_insert (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t seq)
{
    uint64_t old;
    if (l0_find (&self->view.l0, key, &old) == TLY_OK)
        return TLY_EEXIST;
    if (seq != l0_end (&self->view.l0))
        return TLY_EINVAL;
    return l0_push (&self->view.l0, key);
}

/*  After an abort, L0 may hold keys of entries that were never stored:
    the next begin's sync drops them. */
void
dx_writer_end (dx_writer *self, bool committed)
{
    if (!committed && self->dirty)
        forget_state (self);
    self->dirty = false;
    self->failed = 0;
    self->txn = NULL;
    drop_fresh (self);
}

void
dx_writer_backlog (dx_writer *self, size_t *builds, size_t *dead)
{
    *builds = 0;
    for (unsigned j = 0; j < DX_TIERS; j++)
        *builds += self->build[j].on;
    *dead = 0;
    for (uint32_t s = 0; s < DX_SLOTS; s++)
        *dead += self->dead[s];
}

size_t
dx_writer_l0_keys (dx_writer *self)
{
    return self->view.l0.n;
}

/* ---- builds ---- */

/*  Starts a run of tier in a free table, if there is one; else it waits
    for a dead one to be emptied (the index only grows slower meanwhile).
    A flush leaves DX_TIERS tables free: only merges, which free 7 tables
    net, may take the last ones, so flushes can never fill the pool with
    runs that no merge has a table left to combine. */
static int
build_start (dx_writer *self, unsigned tier, uint64_t total, const dx_run *in)
{
    dx_build *b = &self->build[tier];
    if (total > UINT32_MAX)
        return TLY_OK;              /* a run counts its keys in a u32: the inputs stay */
    uint32_t slot = DX_SLOTS, nfree = 0;
    for (uint32_t s = 0; s < DX_SLOTS; s++)
        if (!self->dead[s] && !slot_owned (self, s) && nfree++ == 0)
            slot = s;
    if (nfree == 0 || (tier == 0 && nfree <= DX_TIERS))
        return TLY_OK;
    memset (b, 0, sizeof *b);
    const dx_tables *t = self->t;
    uint32_t block = t->legacy_layout ? 0
                   : t->block_max && t->block_max < BLOCK_MAX ? (uint32_t) t->block_max : BLOCK_MAX;
    int err = build_init (self, tier, slot, total, block);
    if (err)
        return err;
    for (size_t i = 0; in && i < MERGE_FANIN; i++) {
        b->in[i] = in[i];
        b->in[i].bits = NULL;       /* valid for this txn only; not needed */
    }
    b->on = true;
    changed (self);
    return build_record_put (self, tier);
}

/*  Writes the records held in b->blk as one block. */
static int
block_put (dx_writer *self, dx_build *b)
{
    MDB_val k = { TLY_DEDUP_LEN, b->last }, v = { (size_t) b->nblk * REC_LEN, b->blk };
    int rc = mdb_put (self->txn, self->t->slot[b->slot], &k, &v, MDB_APPEND);
    if (rc)
        return rc == MDB_KEYEXIST ? TLY_ECORRUPT : lmdb_err (rc);
    b->nblk = 0;
    return TLY_OK;
}

static int
build_put (dx_writer *self, dx_build *b, const uint8_t key[TLY_DEDUP_LEN], uint64_t seq)
{
    /*  Keys come in order into a table of their own: appends only.  A
        key out of order (or twice) breaks the one-place rule. */
    if (b->done > 0 && key_cmp (key, b->last) <= 0)
        return TLY_ECORRUPT;
    if (b->block) {
        uint8_t *r = b->blk + (size_t) b->nblk++ * REC_LEN;
        memcpy (r, key, TLY_DEDUP_LEN);
        memcpy (r + TLY_DEDUP_LEN, &seq, 8);
    }
    else {
        MDB_val k = { TLY_DEDUP_LEN, (void *) key }, v = { 8, &seq };
        int rc = mdb_put (self->txn, self->t->slot[b->slot], &k, &v, MDB_APPEND);
        if (rc)
            return rc == MDB_KEYEXIST ? TLY_ECORRUPT : lmdb_err (rc);
    }
    bloom_add (b->filter + BLOOM_HDR, b->nblocks, key);
    if (b->fill)
        bloom_add (b->fill->filter, b->fill->nblocks, key);
    memcpy (b->last, key, TLY_DEDUP_LEN);
    b->done++;
    changed (self);
    return b->block && b->nblk == b->block ? block_put (self, b) : TLY_OK;
}

/*  The build's run becomes visible (its filter stored) in this txn. */
static int
build_publish (dx_writer *self, unsigned tier)
{
    dx_build *b = &self->build[tier];
    if (b->done != b->total)
        return TLY_ECORRUPT;        /* a source disagrees with its count */
    int err = b->nblk ? block_put (self, b) : TLY_OK;
    if (err)
        return err;
    uint8_t key[4];
    put_be32 (key, b->out);
    MDB_val k = { 4, key }, v = { BLOOM_HDR + (size_t) b->nblocks * BLOOM_BLOCK, b->filter };
    int rc = mdb_put (self->txn, self->t->blooms, &k, &v, MDB_NOOVERWRITE);
    if (rc)
        return rc == MDB_KEYEXIST ? TLY_ECORRUPT : lmdb_err (rc);
    if ((err = build_record_del (self, tier)))
        return err;
    if (grow (&self->fresh, &self->fresh_cap, self->nfresh, sizeof *self->fresh))
        return TLY_ENOMEM;
    self->fresh[self->nfresh++] = (dx_fresh) { b->filter, b->map_len };
    dx_run run = { .id = b->out, .tier = tier, .slot = b->slot, .count = (uint32_t) b->total,
                   .nblocks = b->nblocks, .packed = b->block != 0, .group = -1,
                   .bits = b->filter + BLOOM_HDR };
    dx_fill *fill = b->fill;
    b->filter = NULL;
    b->fill = NULL;
    b->on = false;
    changed (self);
    if ((err = view_insert (&self->view, run)))
        return err;
    return fill ? fill_publish (self, fill, run.id, run.count) : TLY_OK;
}

/*  Copies up to budget of L0's frozen keys, in order, into tier 0; the
    last slice publishes the run and moves `covered` past them. */
static int
flush_step (dx_writer *self, uint64_t budget)
{
    dx_build *b = &self->build[0];
    int err = TLY_OK;
    for (; b->done < b->total && budget > 0 && !err; budget--) {
        const dx_rec *r = &self->frozen[b->done];
        err = build_put (self, b, r->key, r->seq);
    }
    if (err || b->done < b->total || b->refilled < b->refill)
        return err;
    uint64_t end = self->view.covered + b->total;   /* the frozen keys were L0's first */
    if ((err = build_publish (self, 0))
    ||  (err = covered_store (self->t, self->txn, end)))
        return err;
    self->view.covered = end;
    free (self->frozen);
    self->frozen = NULL;
    /*  L0 drops the keys now in the run; it only shrinks: no error. */
    return l0_sync (&self->view.l0, self->txn, end, l0_end (&self->view.l0),
                    self->t->key_of, self->t->key_ctx);
}

typedef run_cursor merge_head;

static void
heads_close (merge_head heads[MERGE_FANIN])
{
    for (size_t i = 0; i < MERGE_FANIN; i++)
        rcur_close (&heads[i]);
}

/*  Opens one head per input of merge b, each at its run's first key after
    `after` (NULL: at its first key). */
static int
heads_open (dx_writer *self, const dx_build *b, const uint8_t *after,
            merge_head heads[MERGE_FANIN])
{
    for (size_t i = 0; i < MERGE_FANIN; i++)
        heads[i].cur = NULL;
    int err = TLY_OK;
    for (size_t i = 0; i < MERGE_FANIN && !err; i++)
        err = rcur_open (self->txn, self->t->slot[b->in[i].slot], b->in[i].packed, after,
                         &heads[i]);
    if (err)
        heads_close (heads);
    return err;
}

/*  The head with the smallest key, or NULL when all inputs are done. */
static merge_head *
heads_min (merge_head heads[MERGE_FANIN])
{
    merge_head *min = NULL;
    for (size_t i = 0; i < MERGE_FANIN; i++)
        if (heads[i].live && (!min || key_cmp (heads[i].key, min->key) < 0))
            min = &heads[i];
    return min;
}

/*  A resumed build puts the keys its table held back into its filter
    (which died with the writer that built it), up to `budget` of them per
    commit, while it goes on appending; it is published once both are
    done.  Reading a key back costs a fraction of writing one, so the
    refill runs at REFILL_RATE times the build's budget.  Each record is
    checked against what the build must have written there: the next of
    L0's sorted keys (a flush), or the next key of the merged inputs (a
    merge), with its seq.  A table that disagrees was not this build's:
    the build is dropped and the table emptied as dead; a new build starts
    in a later commit. */
#define REFILL_RATE 16

static int
refill_step (dx_writer *self, unsigned tier, uint64_t budget)
{
    dx_build *b = &self->build[tier];
    const uint8_t *after = b->refilled ? b->refill_last : NULL;
    merge_head heads[MERGE_FANIN];
    run_cursor own;
    for (size_t i = 0; i < MERGE_FANIN; i++)
        heads[i].cur = NULL;
    int err = tier > 0 ? heads_open (self, b, after, heads) : TLY_OK;
    if (err)
        return err;
    /*  A record of its own table that is malformed is as foreign as one
        that differs: the build goes; only a bad input fails the commit. */
    int own_err = rcur_open (self->txn, self->t->slot[b->slot], b->block != 0, after, &own);
    bool bad = own_err == TLY_ECORRUPT;
    if (own_err && !bad)
        err = own_err;
    for (; !err && !bad && own.live && b->refilled < b->refill && budget > 0; budget--) {
        const uint8_t *want_key;
        const uint64_t *want_seq;
        merge_head *min = NULL;
        if (tier == 0) {
            want_key = self->frozen[b->refilled].key;
            want_seq = &self->frozen[b->refilled].seq;
        }
        else
        if ((min = heads_min (heads))) {
            want_key = min->key;
            want_seq = &min->seq;
        }
        else {
            bad = true;             /* more records than the inputs have keys */
            break;
        }
        if (memcmp (own.key, want_key, TLY_DEDUP_LEN) || own.seq != *want_seq) {
            bad = true;
            break;
        }
        bloom_add (b->filter + BLOOM_HDR, b->nblocks, own.key);
        if (b->fill)
            bloom_add (b->fill->filter, b->fill->nblocks, own.key);
        memcpy (b->refill_last, own.key, TLY_DEDUP_LEN);
        b->refilled++;
        changed (self);
        if (min)
            err = rcur_next (min);
        if (!err && b->refilled < b->refill) {
            own_err = rcur_next (&own);
            bad = own_err == TLY_ECORRUPT;
            if (own_err && !bad)
                err = own_err;
        }
    }
    /*  Too few records, or more than its blocks should hold (the refill
        would end before the table's last key: the build would then append
        behind keys it never counted). */
    bool short_table = !own.live && b->refilled < b->refill;
    if (!bad && b->refilled == b->refill && b->refill > 0)
        bad = memcmp (b->refill_last, b->refill_end, TLY_DEDUP_LEN) != 0;
    rcur_close (&own);
    heads_close (heads);
    if (err)
        return err;
    if (!bad && !short_table)
        return TLY_OK;
    /*  Not what this build wrote: its table is emptied as dead. */
    self->dead[b->slot] = true;
    return build_drop (self, tier);
}

/*  The runs merged lose their filter (invisible) and become dead: their
    tables are emptied by later commits. */
static int
retire_inputs (dx_writer *self, const dx_run *in)
{
    for (size_t i = 0; i < MERGE_FANIN; i++) {
        uint8_t key[4];
        put_be32 (key, in[i].id);
        MDB_val k = { 4, key };
        int rc = mdb_del (self->txn, self->t->blooms, &k, NULL);
        if (rc)
            return rc == MDB_NOTFOUND ? TLY_ECORRUPT : lmdb_err (rc);
        view_remove (&self->view, in[i].id);
        self->dead[in[i].slot] = true;
        changed (self);
    }
    view_link (&self->view);
    return groups_gc (self);
}

/*  K-way merge of up to budget keys of the inputs (tier - 1) into tier,
    after the last key the build wrote. */
static int
merge_step (dx_writer *self, unsigned tier, uint64_t budget)
{
    dx_build *b = &self->build[tier];
    merge_head heads[MERGE_FANIN], *min = NULL;
    int err = heads_open (self, b, b->done ? b->last : NULL, heads);
    if (err)
        return err;                 /* heads_open closed what it opened */
    for (; !err && budget > 0 && (min = heads_min (heads)); budget--) {
        if (!(err = build_put (self, b, min->key, min->seq)))
            err = rcur_next (min);
    }
    if (!err && budget == 0)
        min = heads_min (heads);
    heads_close (heads);
    if (err || min || b->refilled < b->refill)
        return err;
    dx_run in[MERGE_FANIN];
    memcpy (in, b->in, sizeof in);
    if ((err = build_publish (self, tier)))
        return err;
    return retire_inputs (self, in);
}

/*  Starts what can start: a flush of every key in L0 once it holds
    l0_max (keys appended meanwhile wait for the next flush); a merge of
    the oldest MERGE_FANIN visible runs of a tier whose next build is free. */
static int
start_builds (dx_writer *self)
{
    int err = TLY_OK;
    const dx_l0 *l0 = &self->view.l0;
    if (!self->build[0].on && l0->n >= self->t->l0_max) {
        if ((err = build_start (self, 0, l0->n, NULL)))
            return err;
        if (self->build[0].on) {
            if ((err = l0_sorted (l0, l0->n, &self->frozen)))
                return err;
        }
    }
    for (unsigned tier = 1; tier < DX_TIERS && !err; tier++) {
        if (self->build[tier].on)
            continue;
        dx_run in[MERGE_FANIN];
        uint64_t total = 0;
        size_t have = 0;
        for (size_t i = 0; i < self->view.n && have < MERGE_FANIN; i++)
            if (self->view.runs[i].tier == tier - 1) {
                in[have++] = self->view.runs[i];
                total += self->view.runs[i].count;
            }
        if (have == MERGE_FANIN)
            err = build_start (self, tier, total, in);
    }
    return err;
}

/*  Empties dead tables: at least one a commit, and more while the
    records emptied stay within DX_TIERS times the commit's budget.  A key
    dies at most once per tier it passes through, so this keeps up with
    whatever the merges retire, however large the commits.  mdb_drop frees
    a table's pages without reading its leaves or writing any page: the
    cost is its branch pages and its page numbers on the free list, so a
    table counts as DROP_RECS_PER_PAGE records per page (fewer than a page
    holds in either layout: 160 in blocks, about 113 one per key). */
#define DROP_RECS_PER_PAGE 64

static int
drop_dead (dx_writer *self, uint64_t budget)
{
    uint64_t allowed = budget > UINT64_MAX / DX_TIERS ? UINT64_MAX : budget * DX_TIERS;
    uint64_t dropped = 0;
    for (uint32_t s = 0; s < DX_SLOTS && (dropped == 0 || dropped < allowed); s++) {
        if (!self->dead[s])
            continue;
        MDB_stat st;
        if (mdb_stat (self->txn, self->t->slot[s], &st))
            return TLY_EIO;
        uint64_t n = (uint64_t) (st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages)
                   * DROP_RECS_PER_PAGE;
        if (dropped > 0 && dropped + n > allowed)
            break;
        if (mdb_drop (self->txn, self->t->slot[s], 0))
            return TLY_EIO;
        self->dead[s] = false;
        dropped += n + 1;           /* an empty table counts too */
        changed (self);
    }
    return TLY_OK;
}

static int
maintain (dx_writer *self, uint64_t budget, bool *worked)
{
    /*  After a failure the txn is lost (and the state half way): no more
        maintenance in it, whoever asks. */
    if (self->failed)
        return self->failed;
    uint64_t work = self->work;
    int err = drop_dead (self, budget);
    if (!err)
        err = start_builds (self);
    for (unsigned j = 0; j < DX_TIERS && !err; j++) {
        const dx_build *b = &self->build[j];
        if (b->on && b->refilled < b->refill)
            err = refill_step (self, j, budget > UINT64_MAX / REFILL_RATE ? UINT64_MAX
                                                                          : budget * REFILL_RATE);
        if (!err && b->on)
            err = j == 0 ? flush_step (self, budget) : merge_step (self, j, budget);
    }
    if (err) {
        self->dirty = true;         /* the txn must not commit; forget at end */
        self->failed = err;
        return err;
    }
    *worked = self->work != work;
    return TLY_OK;
}

int
dx_writer_maintain (dx_writer *self, uint64_t appended)
{
    bool worked;
    uint64_t budget = appended > UINT64_MAX / DX_RATE - DX_MIN ? UINT64_MAX
                    : appended * DX_RATE + DX_MIN;
    return maintain (self, budget, &worked);
}

int
dx_writer_finish (dx_writer *self)
{
    bool worked = true, changed;
    int err = TLY_OK;
    while (!err && worked)
        err = maintain (self, UINT32_MAX, &worked);
    return err ? err : dx_writer_checkpoint (self, &changed);
}
