/*  dedup.c -- the idempotency index: L0s, tiered sorted runs, Bloom
    filters, and the bounded builds that keep it small (see dedup.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "dedup.h"

#define MERGE_FANIN     8
#define RUN_KEY_LEN     (4 + TLY_DEDUP_LEN)
/*  Per commit, each job moves about DX_RATE records per event the commit
    appended, and at least DX_MIN.  A flush of L0 (l0_max keys) then ends
    before the next L0 fills, and a merge of tier t before tier t has 8
    new runs: the index keeps up with any append rate, and no commit does
    more than a few records of index work per event it carries. */
#define DX_RATE         2
#define DX_MIN          32
/*  Blocked Bloom filter: one 64-byte block per probe (one cache line),
    BLOOM_K bits in it.  12 bits per key gives about 0.5% false positives
    with blocking; a false positive costs one mdb_get. */
#define BLOOM_BLOCK     64
#define BLOOM_BITS_PER_KEY 12
#define BLOOM_K         7
#define BLOOM_HDR       12          /* count, nblocks, tier: u32 each */
#define STATE_VERSION   1
#define NTABLES         (2 + DX_TIERS)      /* the scan's order: L0s, tiers */

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
bloom_maybe (const dx_run *run, const uint8_t key[TLY_DEDUP_LEN])
{
    if (!run->bits)
        return true;
    const uint8_t *block = bloom_block (run->bits, run->nblocks, key);
    uint64_t h = le64_at (key + 8);
    for (int i = 0; i < BLOOM_K; i++, h >>= 9)
        if (!(block[(h & 511) >> 3] & (1u << (h & 7))))
            return false;
    return true;
}

/*  Every visible run's filter block for key, fetched ahead: a lookup of a
    new key reads one block per run, each most likely a cache miss in a
    different filter; issued together the misses overlap (and overlap the
    L0 lookups) instead of queueing one behind the other. */
static void
bloom_prefetch (const dx_view *view, const uint8_t key[TLY_DEDUP_LEN])
{
#if defined(__GNUC__)
    for (size_t i = 0; i < view->n; i++)
        if (view->runs[i].bits)
            __builtin_prefetch (bloom_block (view->runs[i].bits, view->runs[i].nblocks, key));
#else
    (void) view;
    (void) key;
#endif
}

/* ---- the tables ---- */

int
dx_open (MDB_txn *txn, dx_tables *t)
{
    char name[16];
    int rc = mdb_dbi_open (txn, "dedup", MDB_CREATE, &t->l0[0]);
    if (!rc) rc = mdb_dbi_open (txn, "dedup.1", MDB_CREATE, &t->l0[1]);
    if (!rc) rc = mdb_dbi_open (txn, "blooms", MDB_CREATE, &t->blooms);
    if (!rc) rc = mdb_dbi_open (txn, "meta", MDB_CREATE, &t->meta);
    for (unsigned i = 0; i < DX_TIERS && !rc; i++) {
        snprintf (name, sizeof name, "runs.%u", i);
        rc = mdb_dbi_open (txn, name, MDB_CREATE, &t->tier[i]);
    }
    return rc ? lmdb_err (rc) : TLY_OK;
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

static dx_run *
view_find (const dx_view *view, uint32_t id)
{
    size_t lo = 0, hi = view->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (view->runs[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < view->n && view->runs[lo].id == id ? &view->runs[lo] : NULL;
}

static void
view_remove (dx_view *view, uint32_t id)
{
    dx_run *run = view_find (view, id);
    if (run) {
        size_t i = (size_t) (run - view->runs);
        memmove (run, run + 1, (view->n - i - 1) * sizeof *run);
        view->n--;
    }
}

/*  One "blooms" record per visible run.  The filters are not copied: bits
    point into the map, valid for the txn. */
int
dx_view_load (const dx_tables *t, MDB_txn *txn, dx_view *view)
{
    view->n = 0;
    view->probes = 0;
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, t->blooms, &cur))
        return TLY_EIO;
    MDB_val k, v;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
    int err = TLY_OK;
    for (; rc == 0; rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 4 || v.mv_size < BLOOM_HDR) {
            err = TLY_ECORRUPT;
            break;
        }
        dx_run run = { .id = get_be32 (k.mv_data) };
        memcpy (&run.count, v.mv_data, 4);
        memcpy (&run.nblocks, (uint8_t *) v.mv_data + 4, 4);
        memcpy (&run.tier, (uint8_t *) v.mv_data + 8, 4);
        if (run.tier >= DX_TIERS) {
            err = TLY_ECORRUPT;     /* no table to look in: keys would vanish */
            break;
        }
        if (run.nblocks && v.mv_size == BLOOM_HDR + (size_t) run.nblocks * BLOOM_BLOCK)
            run.bits = (const uint8_t *) v.mv_data + BLOOM_HDR;
        if ((err = view_insert (view, run)))
            break;
    }
    if (!err && rc != MDB_NOTFOUND)
        err = TLY_EIO;
    mdb_cursor_close (cur);
    return err;
}

void
dx_view_free (dx_view *view)
{
    free (view->runs);
    memset (view, 0, sizeof *view);
}

/*  The L0s, then the runs newest first; each key is visible in exactly one
    place, so the order only matters for speed (recent keys are hot). */
int
dx_lookup (const dx_tables *t, MDB_txn *txn, dx_view *view,
           const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq)
{
    MDB_val k = { TLY_DEDUP_LEN, (void *) key }, v;
    bloom_prefetch (view, key);
    for (int i = 0; i < 2; i++) {
        int rc = mdb_get (txn, t->l0[i], &k, &v);
        if (rc == 0)
            return seq_from_val (&v, seq);
        if (rc != MDB_NOTFOUND)
            return TLY_EIO;
    }
    uint8_t rk[RUN_KEY_LEN];
    memcpy (rk + 4, key, TLY_DEDUP_LEN);
    k.mv_size = RUN_KEY_LEN;
    k.mv_data = rk;
    for (size_t i = view->n; i-- > 0;) {
        const dx_run *run = &view->runs[i];
        if (!bloom_maybe (run, key))
            continue;
        view->probes++;
        put_be32 (rk, run->id);
        int rc = mdb_get (txn, t->tier[run->tier], &k, &v);
        if (rc == 0)
            return seq_from_val (&v, seq);
        if (rc != MDB_NOTFOUND)
            return TLY_EIO;
    }
    return TLY_ENOTFOUND;
}

/* ---- the scrubber's scan ---- */

/*  A position is table (u8: 0, 1 the L0s, 2 + t tier t) || run id (u32 BE,
    0 in an L0) || dedup.  Records only ever move to a later table, or to a
    run with a higher id than any in its table, so a pass started before a
    flush or merge still visits every record it started with. */
static MDB_dbi
scan_dbi (const dx_tables *t, unsigned table)
{
    return table < 2 ? t->l0[table] : t->tier[table - 2];
}

static int
scan_seek (const dx_tables *t, MDB_txn *txn, const uint8_t *after, MDB_cursor **cur,
           unsigned *table, MDB_val *k, MDB_val *v)
{
    *table = after ? after[0] : 0;
    if (*table >= NTABLES)
        return TLY_EINVAL;
    if (mdb_cursor_open (txn, scan_dbi (t, *table), cur))
        return TLY_EIO;
    if (!after)
        return mdb_cursor_get (*cur, k, v, MDB_FIRST);
    size_t len = *table < 2 ? TLY_DEDUP_LEN : RUN_KEY_LEN;
    const uint8_t *key = *table < 2 ? after + 5 : after + 1;
    k->mv_size = len;
    k->mv_data = (void *) key;
    int rc = mdb_cursor_get (*cur, k, v, MDB_SET_RANGE);
    if (rc == 0 && k->mv_size == len && memcmp (k->mv_data, key, len) == 0)
        rc = mdb_cursor_get (*cur, k, v, MDB_NEXT);
    return rc;
}

int
dx_scan (const dx_tables *t, MDB_txn *txn, const dx_view *view, const uint8_t *after,
         size_t count, tly_dedup_fn *fn, void *ctx, uint8_t last[TLY_DEDUP_POS_LEN],
         bool *done)
{
    MDB_cursor *cur;
    MDB_val k, v;
    unsigned table;
    int rc = scan_seek (t, txn, after, &cur, &table, &k, &v);
    if (rc == TLY_EIO || rc == TLY_EINVAL)
        return rc;
    int err = TLY_OK;
    const dx_run *run = NULL;
    *done = false;
    for (size_t n = 0; n < count;) {
        if (rc == MDB_NOTFOUND) {
            mdb_cursor_close (cur);
            if (++table == NTABLES) {
                *done = true;
                return TLY_OK;
            }
            if (mdb_cursor_open (txn, scan_dbi (t, table), &cur))
                return TLY_EIO;
            rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
            continue;
        }
        if (rc) {
            err = TLY_EIO;
            break;
        }
        bool l0 = table < 2;
        if (k.mv_size != (l0 ? TLY_DEDUP_LEN : RUN_KEY_LEN) || v.mv_size != 8) {
            err = TLY_ECORRUPT;
            break;
        }
        const uint8_t *dedup = l0 ? k.mv_data : (uint8_t *) k.mv_data + 4;
        uint32_t id = l0 ? 0 : get_be32 (k.mv_data);
        if (!l0) {
            if (!run || run->id != id)
                run = view_find (view, id);
            if (!run) {
                /*  A run being built or being deleted: invisible to
                    lookups, so nothing to check.  Skip it whole (no
                    position is recorded inside it). */
                uint8_t next[RUN_KEY_LEN] = { 0 };
                if (id == UINT32_MAX) {
                    rc = MDB_NOTFOUND;
                    continue;
                }
                put_be32 (next, id + 1);
                k.mv_size = RUN_KEY_LEN;
                k.mv_data = next;
                rc = mdb_cursor_get (cur, &k, &v, MDB_SET_RANGE);
                continue;           /* not counted: at most one seek a run */
            }
            /*  A key its run's filter denies would be invisible to lookups:
                a silent hole in deduplication. */
            if (run->tier != table - 2 || !run->bits || !bloom_maybe (run, dedup)) {
                err = TLY_ECORRUPT;
                break;
            }
        }
        last[0] = (uint8_t) table;
        put_be32 (last + 1, id);
        memcpy (last + 5, dedup, TLY_DEDUP_LEN);
        uint64_t seq;
        memcpy (&seq, v.mv_data, 8);
        if ((err = fn (ctx, dedup, seq)))
            break;
        n++;
        rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close (cur);
    return err;
}

/* ---- the writer: builds and dead runs ---- */

/*  A run under construction in tier table `tier`: from the frozen L0
    (tier 0) or from MERGE_FANIN runs of tier - 1.  Its filter grows in
    the writer's heap and is stored when the build ends. */
typedef struct {
    bool on;
    uint32_t out;
    uint32_t in[MERGE_FANIN];       /* tier > 0: the runs merged */
    uint64_t total, done;
    uint8_t last[TLY_DEDUP_LEN];    /* the last key written (done > 0) */
    uint8_t *filter;                /* BLOOM_HDR + nblocks * BLOOM_BLOCK */
    uint32_t nblocks;
} dx_build;

/*  A run id whose records are not visible: being built, or dead. */
typedef struct {
    uint32_t id;
    uint32_t tier;
} dx_orphan;

struct dx_writer {
    const dx_tables *t;
    MDB_txn *txn;
    dx_view view;
    bool loaded;                    /* the state below matches meta + txn */
    bool dirty;                     /* this txn changed it */
    uint64_t changes;               /* counts changes, to know when to store */
    uint32_t active;                /* the L0 taking inserts */
    uint32_t next_id;
    dx_build build[DX_TIERS];       /* build[j] writes tier table j */
    dx_orphan *orphans;             /* persisted: builds' outputs + dead */
    size_t norphans, cap;
    uint8_t **fresh;                /* filters of runs finished in this txn */
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
        free (self->fresh[i]);
    self->nfresh = 0;
}

/*  Forgets the maintenance state: the next begin reads it from meta, and
    every run that was being built is treated as dead (started again). */
static void
forget_state (dx_writer *self)
{
    for (unsigned j = 0; j < DX_TIERS; j++) {
        free (self->build[j].filter);
        memset (&self->build[j], 0, sizeof self->build[j]);
    }
    self->norphans = 0;
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
        free (self->orphans);
        dx_view_free (&self->view);
        free (self);
        *self_p = NULL;
    }
}

static void
changed (dx_writer *self)
{
    self->dirty = true;
    self->changes++;
}

static int
orphan_add (dx_writer *self, uint32_t id, uint32_t tier)
{
    if (grow (&self->orphans, &self->cap, self->norphans, sizeof *self->orphans))
        return TLY_ENOMEM;
    self->orphans[self->norphans++] = (dx_orphan) { id, tier };
    changed (self);
    return TLY_OK;
}

static void
orphan_remove (dx_writer *self, uint32_t id)
{
    for (size_t i = 0; i < self->norphans; i++)
        if (self->orphans[i].id == id) {
            self->orphans[i] = self->orphans[--self->norphans];
            changed (self);
            return;
        }
}

static bool
is_building (const dx_writer *self, const dx_orphan *o)
{
    return self->build[o->tier].on && self->build[o->tier].out == o->id;
}

/*  meta "dedup.state": version, active L0, next run id, n, then n orphans
    (id, tier); u32 each, host order.  Absent in a new ledger. */
static int
state_load (dx_writer *self)
{
    MDB_val v;
    self->active = 0;
    self->next_id = 1;
    self->norphans = 0;
    int rc = mdb_get (self->txn, self->t->meta, (MDB_val *) &STATE_KEY, &v);
    if (rc && rc != MDB_NOTFOUND)
        return TLY_EIO;
    if (rc == 0) {
        uint32_t h[4];
        if (v.mv_size < sizeof h)
            return TLY_ECORRUPT;
        memcpy (h, v.mv_data, sizeof h);
        if (h[0] != STATE_VERSION || h[1] > 1 || v.mv_size != sizeof h + (size_t) h[3] * 8)
            return TLY_ECORRUPT;
        self->active = h[1];
        self->next_id = h[2];
        for (uint32_t i = 0; i < h[3]; i++) {
            dx_orphan o;
            memcpy (&o, (uint8_t *) v.mv_data + sizeof h + (size_t) i * 8, 8);
            if (o.tier >= DX_TIERS)
                return TLY_ECORRUPT;
            int err = orphan_add (self, o.id, o.tier);
            if (err)
                return err;
        }
    }
    /*  Ids only grow: above every visible run and every orphan. */
    if (self->view.n && self->view.runs[self->view.n - 1].id >= self->next_id)
        self->next_id = self->view.runs[self->view.n - 1].id + 1;
    for (size_t i = 0; i < self->norphans; i++)
        if (self->orphans[i].id >= self->next_id)
            self->next_id = self->orphans[i].id + 1;
    self->dirty = false;
    self->loaded = true;
    return TLY_OK;
}

static int
state_store (dx_writer *self)
{
    size_t len = 16 + self->norphans * 8;
    uint8_t *buf = malloc (len);
    if (!buf)
        return TLY_ENOMEM;
    uint32_t h[4] = { STATE_VERSION, self->active, self->next_id, (uint32_t) self->norphans };
    memcpy (buf, h, sizeof h);
    for (size_t i = 0; i < self->norphans; i++)
        memcpy (buf + 16 + i * 8, &self->orphans[i], 8);
    MDB_val v = { len, buf };
    int rc = mdb_put (self->txn, self->t->meta, (MDB_val *) &STATE_KEY, &v, 0);
    free (buf);
    return rc ? lmdb_err (rc) : TLY_OK;
}

int
dx_writer_begin (dx_writer *self, MDB_txn *txn)
{
    self->txn = txn;
    drop_fresh (self);
    int err = dx_view_load (self->t, txn, &self->view);
    if (!err && !self->loaded)
        err = state_load (self);
    return err;
}

int
dx_writer_lookup (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq)
{
    return dx_lookup (self->t, self->txn, &self->view, key, seq);
}

int
dx_writer_insert (dx_writer *self, const uint8_t key[TLY_DEDUP_LEN], uint64_t seq)
{
    MDB_val k = { TLY_DEDUP_LEN, (void *) key }, v = { 8, &seq };
    int rc = mdb_put (self->txn, self->t->l0[self->active], &k, &v, MDB_NOOVERWRITE);
    if (rc == MDB_KEYEXIST)
        return TLY_EEXIST;
    return rc ? lmdb_err (rc) : TLY_OK;
}

void
dx_writer_end (dx_writer *self, bool committed)
{
    if (!committed && self->dirty)
        forget_state (self);
    self->dirty = false;
    self->txn = NULL;
    drop_fresh (self);
}

void
dx_writer_backlog (dx_writer *self, size_t *builds, size_t *dead)
{
    *builds = 0;
    for (unsigned j = 0; j < DX_TIERS; j++)
        *builds += self->build[j].on;
    *dead = self->norphans - *builds;
}

/* ---- builds ---- */

static int
build_start (dx_writer *self, unsigned tier, uint64_t total, const uint32_t *in)
{
    dx_build *b = &self->build[tier];
    if (total > UINT32_MAX)
        return TLY_ETOOLARGE;
    memset (b, 0, sizeof *b);
    b->nblocks = bloom_nblocks (total);
    b->filter = calloc (1, BLOOM_HDR + (size_t) b->nblocks * BLOOM_BLOCK);
    if (!b->filter)
        return TLY_ENOMEM;
    uint32_t hdr[3] = { (uint32_t) total, b->nblocks, tier };
    memcpy (b->filter, hdr, sizeof hdr);
    b->out = self->next_id++;
    b->total = total;
    if (in)
        memcpy (b->in, in, sizeof b->in);
    b->on = true;
    return orphan_add (self, b->out, tier);
}

static int
build_put (dx_writer *self, dx_build *b, unsigned tier, const uint8_t key[TLY_DEDUP_LEN],
           const MDB_val *seq)
{
    uint8_t rk[RUN_KEY_LEN];
    put_be32 (rk, b->out);
    memcpy (rk + 4, key, TLY_DEDUP_LEN);
    MDB_val k = { RUN_KEY_LEN, rk }, v = *seq;
    /*  The build's run has the highest id in its table: appends only.  A
        key out of order (or twice) breaks the one-place rule. */
    int rc = mdb_put (self->txn, self->t->tier[tier], &k, &v, MDB_APPEND);
    if (rc)
        return rc == MDB_KEYEXIST ? TLY_ECORRUPT : lmdb_err (rc);
    bloom_add (b->filter + BLOOM_HDR, b->nblocks, key);
    memcpy (b->last, key, TLY_DEDUP_LEN);
    b->done++;
    return TLY_OK;
}

/*  The build's run becomes visible (its filter stored) in this txn. */
static int
build_publish (dx_writer *self, unsigned tier)
{
    dx_build *b = &self->build[tier];
    if (b->done != b->total)
        return TLY_ECORRUPT;        /* a source disagrees with its count */
    uint8_t key[4];
    put_be32 (key, b->out);
    MDB_val k = { 4, key }, v = { BLOOM_HDR + (size_t) b->nblocks * BLOOM_BLOCK, b->filter };
    int rc = mdb_put (self->txn, self->t->blooms, &k, &v, MDB_NOOVERWRITE);
    if (rc)
        return rc == MDB_KEYEXIST ? TLY_ECORRUPT : lmdb_err (rc);
    if (grow (&self->fresh, &self->fresh_cap, self->nfresh, sizeof *self->fresh))
        return TLY_ENOMEM;
    self->fresh[self->nfresh++] = b->filter;
    dx_run run = { .id = b->out, .tier = tier, .count = (uint32_t) b->total,
                   .nblocks = b->nblocks, .bits = b->filter + BLOOM_HDR };
    b->filter = NULL;
    b->on = false;
    orphan_remove (self, b->out);
    return view_insert (&self->view, run);
}

/*  Copies up to budget keys of the frozen L0, in order, into tier 0; the
    last slice publishes the run and empties the frozen L0. */
static int
flush_step (dx_writer *self, uint64_t budget)
{
    dx_build *b = &self->build[0];
    MDB_dbi frozen = self->t->l0[!self->active];
    MDB_cursor *cur;
    if (mdb_cursor_open (self->txn, frozen, &cur))
        return TLY_EIO;
    MDB_val k = { TLY_DEDUP_LEN, b->last }, v;
    int rc;
    if (b->done == 0)
        rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
    else {
        rc = mdb_cursor_get (cur, &k, &v, MDB_SET_RANGE);
        if (rc == 0 && memcmp (k.mv_data, b->last, TLY_DEDUP_LEN) == 0)
            rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
    }
    int err = TLY_OK;
    for (; rc == 0 && budget > 0 && !err; budget--) {
        if (k.mv_size != TLY_DEDUP_LEN || v.mv_size != 8)
            err = TLY_ECORRUPT;
        else
        if (!(err = build_put (self, b, 0, k.mv_data, &v)))
            rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close (cur);
    if (err)
        return err;
    if (rc && rc != MDB_NOTFOUND)
        return TLY_EIO;
    if (rc == MDB_NOTFOUND) {
        if ((err = build_publish (self, 0)))
            return err;
        if (mdb_drop (self->txn, frozen, 0))
            return TLY_EIO;
    }
    return TLY_OK;
}

typedef struct {
    MDB_cursor *cur;
    uint32_t id;
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
    bool live;
} merge_head;

static int
head_load (merge_head *h, int rc, const MDB_val *k, const MDB_val *v)
{
    h->live = false;
    if (rc == MDB_NOTFOUND)
        return TLY_OK;
    if (rc)
        return TLY_EIO;
    if (k->mv_size != RUN_KEY_LEN || get_be32 (k->mv_data) != h->id)
        return TLY_OK;
    if (v->mv_size != 8)
        return TLY_ECORRUPT;
    memcpy (h->key, (uint8_t *) k->mv_data + 4, TLY_DEDUP_LEN);
    memcpy (&h->seq, v->mv_data, 8);
    h->live = true;
    return TLY_OK;
}

/*  Positions h at its run's first key after the build's last one. */
static int
head_open (dx_writer *self, dx_build *b, unsigned from, merge_head *h, uint32_t id)
{
    h->id = id;
    h->live = false;
    if (mdb_cursor_open (self->txn, self->t->tier[from], &h->cur))
        return TLY_EIO;
    uint8_t rk[RUN_KEY_LEN] = { 0 };
    put_be32 (rk, id);
    if (b->done)
        memcpy (rk + 4, b->last, TLY_DEDUP_LEN);
    MDB_val k = { RUN_KEY_LEN, rk }, v;
    int rc = mdb_cursor_get (h->cur, &k, &v, MDB_SET_RANGE);
    int err = head_load (h, rc, &k, &v);
    if (!err && h->live && b->done && memcmp (h->key, b->last, TLY_DEDUP_LEN) == 0)
        err = head_load (h, mdb_cursor_get (h->cur, &k, &v, MDB_NEXT), &k, &v);
    return err;
}

/*  The runs merged have no filter any more (invisible) and become dead:
    their records are deleted by later slices. */
static int
retire_inputs (dx_writer *self, unsigned from, const uint32_t *in)
{
    for (size_t i = 0; i < MERGE_FANIN; i++) {
        uint8_t key[4];
        put_be32 (key, in[i]);
        MDB_val k = { 4, key };
        int rc = mdb_del (self->txn, self->t->blooms, &k, NULL);
        if (rc)
            return rc == MDB_NOTFOUND ? TLY_ECORRUPT : lmdb_err (rc);
        view_remove (&self->view, in[i]);
        int err = orphan_add (self, in[i], from);
        if (err)
            return err;
    }
    return TLY_OK;
}

/*  K-way merge of up to budget keys of the inputs (tier - 1) into tier. */
static int
merge_step (dx_writer *self, unsigned tier, uint64_t budget)
{
    dx_build *b = &self->build[tier];
    merge_head heads[MERGE_FANIN];
    memset (heads, 0, sizeof heads);
    size_t opened = 0;
    int err = TLY_OK;
    for (; opened < MERGE_FANIN && !err; opened++)
        err = head_open (self, b, tier - 1, &heads[opened], b->in[opened]);
    bool any = true;
    while (!err && budget > 0) {
        merge_head *min = NULL;
        for (size_t i = 0; i < MERGE_FANIN; i++)
            if (heads[i].live && (!min || memcmp (heads[i].key, min->key, TLY_DEDUP_LEN) < 0))
                min = &heads[i];
        if (!min) {
            any = false;
            break;
        }
        MDB_val seq = { 8, &min->seq };
        if ((err = build_put (self, b, tier, min->key, &seq)))
            break;
        budget--;
        MDB_val k, v;
        err = head_load (min, mdb_cursor_get (min->cur, &k, &v, MDB_NEXT), &k, &v);
    }
    if (!err && any) {
        any = false;
        for (size_t i = 0; i < MERGE_FANIN; i++)
            any |= heads[i].live;
    }
    for (size_t i = 0; i < opened; i++)
        if (heads[i].cur)
            mdb_cursor_close (heads[i].cur);
    if (err || any)
        return err;
    uint32_t in[MERGE_FANIN];
    memcpy (in, b->in, sizeof in);
    if ((err = build_publish (self, tier)))
        return err;
    return retire_inputs (self, tier - 1, in);
}

/*  Starts what can start: a flush when the active L0 is full (the other
    one becomes active) or a frozen L0 waits (after a restart); a merge of
    the oldest MERGE_FANIN visible runs of a tier whose next table is free. */
static int
start_builds (dx_writer *self)
{
    int err = TLY_OK;
    if (!self->build[0].on) {
        size_t frozen, active;
        if ((err = table_entries (self->txn, self->t->l0[!self->active], &frozen))
        ||  (err = table_entries (self->txn, self->t->l0[self->active], &active)))
            return err;
        if (!frozen && active >= self->t->l0_max) {
            self->active = !self->active;
            changed (self);
            frozen = active;
        }
        if (frozen && (err = build_start (self, 0, frozen, NULL)))
            return err;
    }
    for (unsigned tier = 1; tier < DX_TIERS && !err; tier++) {
        if (self->build[tier].on)
            continue;
        uint32_t in[MERGE_FANIN];
        uint64_t total = 0;
        size_t have = 0;
        for (size_t i = 0; i < self->view.n && have < MERGE_FANIN; i++)
            if (self->view.runs[i].tier == tier - 1) {
                in[have++] = self->view.runs[i].id;
                total += self->view.runs[i].count;
            }
        if (have == MERGE_FANIN)
            err = build_start (self, tier, total, in);
    }
    return err;
}

/*  Deletes up to budget records of dead runs. */
static int
reap_dead (dx_writer *self, uint64_t budget)
{
    for (size_t i = 0; i < self->norphans && budget > 0;) {
        dx_orphan o = self->orphans[i];
        if (is_building (self, &o)) {
            i++;
            continue;
        }
        MDB_cursor *cur;
        if (mdb_cursor_open (self->txn, self->t->tier[o.tier], &cur))
            return TLY_EIO;
        uint8_t rk[RUN_KEY_LEN] = { 0 };
        put_be32 (rk, o.id);
        MDB_val k = { RUN_KEY_LEN, rk }, v;
        int rc = mdb_cursor_get (cur, &k, &v, MDB_SET_RANGE);
        for (; rc == 0 && budget > 0; budget--) {
            if (k.mv_size != RUN_KEY_LEN || get_be32 (k.mv_data) != o.id) {
                rc = MDB_NOTFOUND;
                break;
            }
            if ((rc = mdb_cursor_del (cur, 0)))
                break;
            /*  After a delete the cursor already stands on the successor;
                MDB_NEXT returns it (LMDB's C_DEL rule). */
            rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
        }
        if (rc == 0 && k.mv_size == RUN_KEY_LEN && get_be32 (k.mv_data) != o.id)
            rc = MDB_NOTFOUND;
        mdb_cursor_close (cur);
        if (rc && rc != MDB_NOTFOUND)
            return lmdb_err (rc);
        if (rc == MDB_NOTFOUND)
            orphan_remove (self, o.id);     /* swaps the last one in: same i */
        else
            i++;
    }
    return TLY_OK;
}

static uint64_t
progress (const dx_writer *self)
{
    uint64_t done = 0;
    for (unsigned j = 0; j < DX_TIERS; j++)
        done += self->build[j].done;
    return done;
}

static int
maintain (dx_writer *self, uint64_t budget, bool *worked)
{
    size_t builds, dead;
    dx_writer_backlog (self, &builds, &dead);
    uint64_t changes = self->changes, done = progress (self);
    int err = start_builds (self);
    for (unsigned j = 0; j < DX_TIERS && !err; j++)
        if (self->build[j].on)
            err = j == 0 ? flush_step (self, budget) : merge_step (self, j, budget);
    /*  Dead records come from every tier's merges: scale with their count
        (saturating: finish passes a budget meant as "everything"). */
    uint64_t scale = 1 + dead / MERGE_FANIN;
    if (!err)
        err = reap_dead (self, budget > UINT64_MAX / scale ? UINT64_MAX : budget * scale);
    if (!err && self->changes != changes)
        err = state_store (self);
    if (err) {
        self->dirty = true;         /* the txn must not commit; forget at end */
        return err;
    }
    *worked = self->changes != changes || progress (self) != done;
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
    bool worked = true;
    int err = TLY_OK;
    while (!err && worked)
        err = maintain (self, UINT32_MAX, &worked);
    return err;
}
