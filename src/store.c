/*  store.c -- the ledger in LMDB (see store.h for the layout). */
#include <errno.h>
#include <lmdb.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "tally/store.h"

#define STH_VAL_LEN (8 + 32 + TLY_SIG_LEN)
#define FORMAT "2"

/*  The dedup index is an LSM tree inside LMDB (see store.h): L0 takes
    random puts but stays small; full L0s become sorted runs written with
    MDB_APPEND; runs of one tier are merged MERGE_FANIN at a time.  L0's
    size trades its random page writes (about min(group, L0 pages) per
    commit) against one more merge level per factor 8: measured with
    1,000-event commits to 2M keys, 8K-32K beat 64K-128K by 1.3-1.5x. */
#define L0_MAX_DEFAULT  16384
#define L0_MAX_MIN      16
#define MERGE_FANIN     8
#define RUN_KEY_LEN     (4 + TLY_DEDUP_LEN)
/*  Blocked Bloom filter: one 64-byte block per probe (one cache line),
    BLOOM_K bits in it.  12 bits per key gives about 0.5% false positives
    with blocking; a false positive costs one mdb_get. */
#define BLOOM_BLOCK     64
#define BLOOM_BITS_PER_KEY 12
#define BLOOM_K         7
#define BLOOM_HDR       8

/*  One sorted run as seen by one snapshot.  bits points into the LMDB map
    (readers, and the writer for runs committed before its txn began) or
    into a writer-owned heap buffer (runs made in the open txn).  NULL bits
    (a malformed filter) means "maybe" for every key: never a false
    negative; the scrubber reports it. */
typedef struct {
    uint32_t id;
    uint32_t count;
    uint32_t nblocks;
    const uint8_t *bits;
} run_t;

typedef struct {
    run_t *runs;                    /* ascending id = oldest first */
    size_t n, cap;
    uint64_t probes;                /* run reads by lookups (statistics) */
} runs_t;

struct tly_store {
    MDB_env *env;
    MDB_dbi entries, nodes, dedup, runs, blooms, sths, meta;
    uint8_t dedup_key[crypto_generichash_KEYBYTES];
    size_t l0_max;
    char data_path[4200];
};

struct tly_reader {
    tly_store *store;
    MDB_txn *txn;
    uint64_t size;
    runs_t runs;
    bool active;
};

struct tly_writer {
    tly_store *store;
    MDB_txn *txn;
    tly_frontier frontier;          /* includes this txn's appends      */
    tly_frontier committed;         /* as of the last commit, for abort */
    tly_sth sth;                    /* the latest committed head        */
    runs_t runs;                    /* as of this txn                   */
    uint8_t **fresh;                /* filters of runs made in this txn */
    size_t nfresh;
};

/*  Nodes are keyed by the order in which appends complete them (post-order):
    appending leaf m completes levels 0..t, and 2m - popcount(m) nodes were
    completed before it.  So every node write is an append at the end of the
    table (MDB_APPEND: sequential pages, filled completely). */
static uint64_t
node_key (unsigned level, uint64_t index)
{
    uint64_t m = ((index + 1) << level) - 1;      /* the leaf that completes it */
    return 2 * m - (uint64_t) __builtin_popcountll (m) + level;
}

static int
mkdir_p (const char *path)
{
    char tmp[4096];
    if (snprintf (tmp, sizeof tmp, "%s", path) >= (int) sizeof tmp)
        return -1;
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir (tmp, 0755) && errno != EEXIST)
                return -1;
            *p = '/';
        }
    if (mkdir (tmp, 0755) && errno != EEXIST)
        return -1;
    return 0;
}

static bool
format_ok (MDB_txn *txn, MDB_dbi meta)
{
    MDB_val k = { 6, "format" }, v;
    return mdb_get (txn, meta, &k, &v) == 0
        && v.mv_size == strlen (FORMAT) && memcmp (v.mv_data, FORMAT, v.mv_size) == 0;
}

static int
open_dbis (tly_store *self, const char **why)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin (self->env, NULL, 0, &txn);
    if (rc)
        goto fail;
    if ((rc = mdb_dbi_open (txn, "entries", MDB_CREATE | MDB_INTEGERKEY, &self->entries))
    ||  (rc = mdb_dbi_open (txn, "nodes", MDB_CREATE | MDB_INTEGERKEY, &self->nodes))
    ||  (rc = mdb_dbi_open (txn, "dedup", MDB_CREATE, &self->dedup))
    ||  (rc = mdb_dbi_open (txn, "runs", MDB_CREATE, &self->runs))
    ||  (rc = mdb_dbi_open (txn, "blooms", MDB_CREATE, &self->blooms))
    ||  (rc = mdb_dbi_open (txn, "sths", MDB_CREATE | MDB_INTEGERKEY, &self->sths))
    ||  (rc = mdb_dbi_open (txn, "meta", MDB_CREATE, &self->meta)))
        goto abort;

    MDB_val k = { 9, "dedup_key" }, v;
    rc = mdb_get (txn, self->meta, &k, &v);
    if (rc == MDB_NOTFOUND) {
        randombytes_buf (self->dedup_key, sizeof self->dedup_key);
        v.mv_size = sizeof self->dedup_key;
        v.mv_data = self->dedup_key;
        MDB_val fk = { 6, "format" }, fv = { 1, FORMAT };
        if ((rc = mdb_put (txn, self->meta, &k, &v, 0))
        ||  (rc = mdb_put (txn, self->meta, &fk, &fv, 0)))
            goto abort;
    }
    else
    if (rc == 0 && !format_ok (txn, self->meta)) {
        mdb_txn_abort (txn);
        *why = "the ledger in this data dir is not format " FORMAT " (format 1 kept the "
               "idempotency index in one table): this tallyd reads format " FORMAT
               " only; start from a fresh data dir (there is no migration)";
        return TLY_EINVAL;
    }
    else
    if (rc)
        goto abort;
    else
    if (v.mv_size != sizeof self->dedup_key) {
        mdb_txn_abort (txn);
        *why = "meta/dedup_key has the wrong size: the ledger is corrupt";
        return TLY_ECORRUPT;
    }
    else
        memcpy (self->dedup_key, v.mv_data, sizeof self->dedup_key);
    if ((rc = mdb_txn_commit (txn)))
        goto fail;
    return TLY_OK;
abort:
    mdb_txn_abort (txn);
fail:
    *why = mdb_strerror (rc);
    return TLY_EIO;
}

int
tly_store_open (const char *dir, size_t map_size, tly_store **out, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    if (sodium_init () < 0) {
        *why = "libsodium failed to initialise";
        return TLY_EIO;
    }
    if (strlen (dir) > 3900) {
        *why = "data dir path is too long";
        return TLY_EINVAL;
    }
    tly_store *self = calloc (1, sizeof *self);
    if (!self)
        return TLY_ENOMEM;
    self->l0_max = L0_MAX_DEFAULT;
    /*  For tuning and tests; a value that does not parse keeps the default. */
    const char *env_l0 = getenv ("TALLY_L0_MAX");
    unsigned long long l0 = env_l0 ? strtoull (env_l0, NULL, 10) : 0;
    if (l0)
        tly_store_set_l0_max (self, (size_t) l0);
    char path[4096];
    snprintf (path, sizeof path, "%s/ledger", dir);
    snprintf (self->data_path, sizeof self->data_path, "%s/data.mdb", path);
    if (mkdir_p (path)) {
        *why = strerror (errno);
        free (self);
        return TLY_EIO;
    }
    int rc = mdb_env_create (&self->env);
    if (!rc) rc = mdb_env_set_maxdbs (self->env, 8);
    if (!rc) rc = mdb_env_set_mapsize (self->env, map_size);
    if (!rc) rc = mdb_env_set_maxreaders (self->env, 256);
    if (!rc) rc = mdb_env_open (self->env, path, MDB_NOTLS, 0644);
    if (rc) {
        *why = mdb_strerror (rc);
        if (self->env)
            mdb_env_close (self->env);
        free (self);
        return TLY_EIO;
    }
    int err = open_dbis (self, why);
    if (err) {
        mdb_env_close (self->env);
        free (self);
        return err;
    }
    *out = self;
    return TLY_OK;
}

void
tly_store_close (tly_store **self_p)
{
    if (*self_p) {
        mdb_env_close ((*self_p)->env);
        free (*self_p);
        *self_p = NULL;
    }
}

const char *
tly_store_data_path (tly_store *self)
{
    return self->data_path;
}

void
tly_store_set_l0_max (tly_store *self, size_t l0_max)
{
    self->l0_max = l0_max < L0_MAX_MIN ? L0_MAX_MIN : l0_max;
}

void
tly_store_dedup_hash (tly_store *self, const tly_str *customer, const tly_str *key,
                      uint8_t out[TLY_DEDUP_LEN])
{
    /*  The length prefix keeps ("ab","c") apart from ("a","bc"). */
    crypto_generichash_state st;
    uint8_t len[4] = { (uint8_t) (customer->len >> 24), (uint8_t) (customer->len >> 16),
                       (uint8_t) (customer->len >> 8), (uint8_t) customer->len };
    crypto_generichash_init (&st, self->dedup_key, sizeof self->dedup_key, TLY_DEDUP_LEN);
    crypto_generichash_update (&st, len, 4);
    crypto_generichash_update (&st, (const uint8_t *) customer->ptr, customer->len);
    crypto_generichash_update (&st, (const uint8_t *) key->ptr, key->len);
    crypto_generichash_final (&st, out, TLY_DEDUP_LEN);
}

/* ---- shared by readers and the writer: reads inside any txn ---- */

static int
get_u64key (MDB_txn *txn, MDB_dbi dbi, uint64_t key, MDB_val *v)
{
    MDB_val k = { sizeof key, &key };
    int rc = mdb_get (txn, dbi, &k, v);
    if (rc == MDB_NOTFOUND)
        return TLY_ENOTFOUND;
    return rc ? TLY_EIO : TLY_OK;
}

static int
txn_size (tly_store *store, MDB_txn *txn, uint64_t *size)
{
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, store->entries, &cur))
        return TLY_EIO;
    MDB_val k, v;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_LAST);
    mdb_cursor_close (cur);
    if (rc == MDB_NOTFOUND) {
        *size = 0;
        return TLY_OK;
    }
    if (rc || k.mv_size != 8)
        return rc ? TLY_EIO : TLY_ECORRUPT;
    uint64_t last;
    memcpy (&last, k.mv_data, 8);
    *size = last + 1;
    return TLY_OK;
}

static int
txn_leaf (tly_store *store, MDB_txn *txn, uint64_t seq, const uint8_t **leaf, size_t *len)
{
    MDB_val v;
    int rc = get_u64key (txn, store->entries, seq, &v);
    if (rc)
        return rc;
    *leaf = v.mv_data;
    *len = v.mv_size;
    return TLY_OK;
}

static int
txn_node (tly_store *store, MDB_txn *txn, unsigned level, uint64_t index, uint8_t out[32])
{
    MDB_val v;
    if (level == 0) {
        /*  Leaf hashes are not stored: they are the hash of stored bytes. */
        int rc = get_u64key (txn, store->entries, index, &v);
        if (rc)
            return rc;
        tly_merkle_leaf_hash (v.mv_data, v.mv_size, out);
        return TLY_OK;
    }
    int rc = get_u64key (txn, store->nodes, node_key (level, index), &v);
    if (rc)
        return rc;
    if (v.mv_size != 32)
        return TLY_ECORRUPT;
    memcpy (out, v.mv_data, 32);
    return TLY_OK;
}

/* ---- the dedup index: L0, sorted runs and their Bloom filters ---- */

static int
lmdb_err (int rc)
{
    return rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO;
}

static uint64_t
le64_at (const uint8_t *p)
{
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--)
        x = (x << 8) | p[i];
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

static uint32_t
bloom_nblocks (uint64_t count)
{
    uint64_t n = (count * BLOOM_BITS_PER_KEY + BLOOM_BLOCK * 8 - 1) / (BLOOM_BLOCK * 8);
    return n ? (uint32_t) n : 1;
}

/*  The dedup key is already a keyed hash: its first 8 bytes pick the
    block, the next 8 give BLOOM_K 9-bit positions inside it. */
static const uint8_t *
bloom_block (const uint8_t *bits, uint32_t nblocks, const uint8_t key[TLY_DEDUP_LEN])
{
    return bits + (le64_at (key) % nblocks) * BLOOM_BLOCK;
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
bloom_maybe (const run_t *run, const uint8_t key[TLY_DEDUP_LEN])
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

static int
runs_push (runs_t *runs, run_t run)
{
    if (runs->n == runs->cap) {
        size_t cap = runs->cap ? runs->cap * 2 : 16;
        run_t *grown = realloc (runs->runs, cap * sizeof *grown);
        if (!grown)
            return TLY_ENOMEM;
        runs->runs = grown;
        runs->cap = cap;
    }
    runs->runs[runs->n++] = run;
    return TLY_OK;
}

static run_t *
runs_find (runs_t *runs, uint32_t id)
{
    size_t lo = 0, hi = runs->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (runs->runs[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < runs->n && runs->runs[lo].id == id ? &runs->runs[lo] : NULL;
}

/*  Reads the list of live runs (one "blooms" record each) in txn.  The
    filters are not copied: bits point into the map, valid for the txn. */
static int
runs_load (tly_store *store, MDB_txn *txn, runs_t *runs)
{
    runs->n = 0;
    runs->probes = 0;
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, store->blooms, &cur))
        return TLY_EIO;
    MDB_val k, v;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
    int err = TLY_OK;
    for (; rc == 0; rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size != 4) {
            err = TLY_ECORRUPT;
            break;
        }
        run_t run = { .id = get_be32 (k.mv_data) };
        if (v.mv_size >= BLOOM_HDR) {
            memcpy (&run.count, v.mv_data, 4);
            memcpy (&run.nblocks, (uint8_t *) v.mv_data + 4, 4);
            if (run.nblocks && v.mv_size == BLOOM_HDR + (size_t) run.nblocks * BLOOM_BLOCK)
                run.bits = (const uint8_t *) v.mv_data + BLOOM_HDR;
        }
        if ((err = runs_push (runs, run)))
            break;
    }
    if (!err && rc != MDB_NOTFOUND)
        err = TLY_EIO;
    mdb_cursor_close (cur);
    return err;
}

static int
seq_from_val (const MDB_val *v, uint64_t *seq)
{
    if (v->mv_size != 8)
        return TLY_ECORRUPT;
    memcpy (seq, v->mv_data, 8);
    return TLY_OK;
}

/*  L0 first, then the runs newest first; each key lives in exactly one
    place, so the order only matters for speed (recent keys are hot). */
static int
txn_lookup (tly_store *store, MDB_txn *txn, runs_t *runs,
            const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq)
{
    MDB_val k = { TLY_DEDUP_LEN, (void *) dedup }, v;
    int rc = mdb_get (txn, store->dedup, &k, &v);
    if (rc == 0)
        return seq_from_val (&v, seq);
    if (rc != MDB_NOTFOUND)
        return TLY_EIO;
    uint8_t rk[RUN_KEY_LEN];
    memcpy (rk + 4, dedup, TLY_DEDUP_LEN);
    k.mv_size = RUN_KEY_LEN;
    k.mv_data = rk;
    for (size_t i = runs->n; i-- > 0;) {
        const run_t *run = &runs->runs[i];
        if (!bloom_maybe (run, dedup))
            continue;
        runs->probes++;
        put_be32 (rk, run->id);
        rc = mdb_get (txn, store->runs, &k, &v);
        if (rc == 0)
            return seq_from_val (&v, seq);
        if (rc != MDB_NOTFOUND)
            return TLY_EIO;
    }
    return TLY_ENOTFOUND;
}

static void
sth_from_val (uint64_t tree_size, const MDB_val *v, tly_sth *out)
{
    const uint8_t *p = v->mv_data;
    out->tree_size = tree_size;
    memcpy (&out->ts, p, 8);
    memcpy (out->root, p + 8, 32);
    memcpy (out->sig, p + 40, TLY_SIG_LEN);
}

static int
txn_sth (tly_store *store, MDB_txn *txn, uint64_t tree_size, tly_sth *out)
{
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, store->sths, &cur))
        return TLY_EIO;
    MDB_val k = { 8, &tree_size }, v;
    int rc = tree_size == UINT64_MAX
           ? mdb_cursor_get (cur, &k, &v, MDB_LAST)
           : mdb_cursor_get (cur, &k, &v, MDB_SET_KEY);
    mdb_cursor_close (cur);
    if (rc == MDB_NOTFOUND)
        return TLY_ENOTFOUND;
    if (rc)
        return TLY_EIO;
    if (k.mv_size != 8 || v.mv_size != STH_VAL_LEN)
        return TLY_ECORRUPT;
    uint64_t size;
    memcpy (&size, k.mv_data, 8);
    sth_from_val (size, &v, out);
    return TLY_OK;
}

/* ---- readers ---- */

int
tly_reader_new (tly_store *store, tly_reader **out)
{
    tly_reader *self = calloc (1, sizeof *self);
    if (!self)
        return TLY_ENOMEM;
    self->store = store;
    *out = self;
    return TLY_OK;
}

void
tly_reader_destroy (tly_reader **self_p)
{
    tly_reader *self = *self_p;
    if (self) {
        if (self->txn)
            mdb_txn_abort (self->txn);
        free (self->runs.runs);
        free (self);
        *self_p = NULL;
    }
}

int
tly_reader_begin (tly_reader *self)
{
    int rc = self->txn ? mdb_txn_renew (self->txn)
                       : mdb_txn_begin (self->store->env, NULL, MDB_RDONLY, &self->txn);
    if (rc)
        return TLY_EIO;
    self->active = true;
    rc = txn_size (self->store, self->txn, &self->size);
    if (!rc)
        rc = runs_load (self->store, self->txn, &self->runs);
    if (rc)
        tly_reader_end (self);
    return rc;
}

void
tly_reader_end (tly_reader *self)
{
    if (self->active) {
        mdb_txn_reset (self->txn);
        self->active = false;
    }
}

uint64_t
tly_reader_size (tly_reader *self)
{
    return self->size;
}

int
tly_reader_leaf (tly_reader *self, uint64_t seq, const uint8_t **leaf, size_t *len)
{
    return txn_leaf (self->store, self->txn, seq, leaf, len);
}

int
tly_reader_lookup (tly_reader *self, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq)
{
    return txn_lookup (self->store, self->txn, &self->runs, dedup, seq);
}

void
tly_reader_dedup_stats (tly_reader *self, size_t *runs, uint64_t *probes)
{
    *runs = self->runs.n;
    *probes = self->runs.probes;
}

int
tly_reader_node (void *reader, unsigned level, uint64_t index, uint8_t out[32])
{
    tly_reader *self = reader;
    return txn_node (self->store, self->txn, level, index, out);
}

int
tly_reader_sth (tly_reader *self, uint64_t tree_size, tly_sth *out)
{
    return txn_sth (self->store, self->txn, tree_size, out);
}

/*  Positions the scan at the first record after `after`: *in_l0 tells
    which table the cursor belongs to. */
static int
scan_seek (tly_reader *self, const uint8_t *after, MDB_cursor **cur, bool *in_l0,
           MDB_val *k, MDB_val *v)
{
    *in_l0 = !after || get_be32 (after) == 0;
    if (mdb_cursor_open (self->txn, *in_l0 ? self->store->dedup : self->store->runs, cur))
        return TLY_EIO;
    if (!after)
        return mdb_cursor_get (*cur, k, v, MDB_FIRST);
    size_t len = *in_l0 ? TLY_DEDUP_LEN : RUN_KEY_LEN;
    const uint8_t *key = *in_l0 ? after + 4 : after;
    k->mv_size = len;
    k->mv_data = (void *) key;
    int rc = mdb_cursor_get (*cur, k, v, MDB_SET_RANGE);
    if (rc == 0 && k->mv_size == len && memcmp (k->mv_data, key, len) == 0)
        rc = mdb_cursor_get (*cur, k, v, MDB_NEXT);
    return rc;
}

int
tly_reader_dedup_scan (tly_reader *self, const uint8_t *after, size_t count,
                       tly_dedup_fn *fn, void *ctx, uint8_t last[TLY_DEDUP_POS_LEN], bool *done)
{
    MDB_cursor *cur;
    MDB_val k, v;
    bool in_l0;
    int rc = scan_seek (self, after, &cur, &in_l0, &k, &v);
    if (rc == TLY_EIO)
        return rc;
    int err = TLY_OK;
    const run_t *run = NULL;
    *done = false;
    for (size_t n = 0; n < count; n++) {
        if (rc == MDB_NOTFOUND && in_l0) {
            /*  L0 is done: the runs follow, in id order. */
            mdb_cursor_close (cur);
            in_l0 = false;
            if (mdb_cursor_open (self->txn, self->store->runs, &cur))
                return TLY_EIO;
            rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
        }
        if (rc == MDB_NOTFOUND) {
            *done = true;
            break;
        }
        if (rc) {
            err = TLY_EIO;
            break;
        }
        if (k.mv_size != (in_l0 ? TLY_DEDUP_LEN : RUN_KEY_LEN) || v.mv_size != 8) {
            err = TLY_ECORRUPT;
            break;
        }
        const uint8_t *dedup = in_l0 ? k.mv_data : (uint8_t *) k.mv_data + 4;
        if (in_l0)
            memset (last, 0, 4);
        else {
            /*  A key its run's filter denies would be invisible to lookups:
                a silent hole in deduplication. */
            uint32_t id = get_be32 (k.mv_data);
            if (!run || run->id != id)
                run = runs_find (&self->runs, id);
            if (!run || !run->bits || !bloom_maybe (run, dedup)) {
                err = TLY_ECORRUPT;
                break;
            }
            put_be32 (last, id);
        }
        memcpy (last + 4, dedup, TLY_DEDUP_LEN);
        uint64_t seq;
        memcpy (&seq, v.mv_data, 8);
        if ((err = fn (ctx, dedup, seq)))
            break;
        rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
    }
    if (!err && rc == MDB_NOTFOUND && !in_l0)
        *done = true;
    mdb_cursor_close (cur);
    return err;
}

int
tly_reader_sth_scan (tly_reader *self, uint64_t from, size_t count,
                     tly_sth_fn *fn, void *ctx, uint64_t *next, bool *done)
{
    MDB_cursor *cur;
    if (mdb_cursor_open (self->txn, self->store->sths, &cur))
        return TLY_EIO;
    MDB_val k = { 8, &from }, v;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_SET_RANGE);
    int err = TLY_OK;
    *done = false;
    *next = from;
    for (size_t n = 0; n < count && !err; n++) {
        if (rc == MDB_NOTFOUND)
            break;
        if (rc) {
            err = TLY_EIO;
            break;
        }
        if (k.mv_size != 8 || v.mv_size != STH_VAL_LEN) {
            err = TLY_ECORRUPT;
            break;
        }
        tly_sth sth;
        uint64_t size;
        memcpy (&size, k.mv_data, 8);
        sth_from_val (size, &v, &sth);
        *next = size + 1;
        err = fn (ctx, &sth);
        rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
    }
    if (!err && rc == MDB_NOTFOUND)
        *done = true;
    mdb_cursor_close (cur);
    return err;
}

/* ---- the writer's side of the dedup index: flush and merge ---- */

static void
writer_drop_fresh (tly_writer *self)
{
    for (size_t i = 0; i < self->nfresh; i++)
        free (self->fresh[i]);
    free (self->fresh);
    self->fresh = NULL;
    self->nfresh = 0;
}

/*  A filter for a run of count keys: header then bits, zeroed.  The buffer
    belongs to the writer until its txn ends, so lookups later in the same
    txn can use it (the LMDB copy may sit in pages the txn spills). */
static uint8_t *
writer_new_filter (tly_writer *self, uint32_t count, uint32_t *nblocks)
{
    *nblocks = bloom_nblocks (count);
    uint8_t **grown = realloc (self->fresh, (self->nfresh + 1) * sizeof *grown);
    if (!grown)
        return NULL;
    self->fresh = grown;
    uint8_t *buf = calloc (1, BLOOM_HDR + (size_t) *nblocks * BLOOM_BLOCK);
    if (!buf)
        return NULL;
    memcpy (buf, &count, 4);
    memcpy (buf + 4, nblocks, 4);
    self->fresh[self->nfresh++] = buf;
    return buf;
}

static int
writer_store_filter (tly_writer *self, uint32_t id, uint32_t count, uint32_t nblocks,
                     uint8_t *buf)
{
    uint8_t key[4];
    put_be32 (key, id);
    MDB_val k = { 4, key }, v = { BLOOM_HDR + (size_t) nblocks * BLOOM_BLOCK, buf };
    int rc = mdb_put (self->txn, self->store->blooms, &k, &v, MDB_APPEND);
    if (rc)
        return rc == MDB_KEYEXIST ? TLY_ECORRUPT : lmdb_err (rc);
    run_t run = { .id = id, .count = count, .nblocks = nblocks, .bits = buf + BLOOM_HDR };
    return runs_push (&self->runs, run);
}

/*  Run ids only grow: a new run (flushed or merged) gets one above every
    live run, so "runs" and "blooms" are written by appends only. */
static uint32_t
writer_next_run_id (tly_writer *self)
{
    return self->runs.n ? self->runs.runs[self->runs.n - 1].id + 1 : 1;
}

static int
append_run_record (tly_writer *self, uint32_t id, const uint8_t dedup[TLY_DEDUP_LEN],
                   const MDB_val *seq)
{
    uint8_t rk[RUN_KEY_LEN];
    put_be32 (rk, id);
    memcpy (rk + 4, dedup, TLY_DEDUP_LEN);
    MDB_val k = { RUN_KEY_LEN, rk }, v = *seq;
    int rc = mdb_put (self->txn, self->store->runs, &k, &v, MDB_APPEND);
    /*  Equal keys in two places (or out of order) break the one-place rule. */
    return rc ? (rc == MDB_KEYEXIST ? TLY_ECORRUPT : lmdb_err (rc)) : TLY_OK;
}

/*  L0 is sorted by key: walking it yields the new run in order. */
static int
flush_l0 (tly_writer *self, bool *flushed)
{
    MDB_txn *txn = self->txn;
    MDB_stat st;
    *flushed = false;
    if (mdb_stat (txn, self->store->dedup, &st))
        return TLY_EIO;
    if (st.ms_entries < self->store->l0_max)
        return TLY_OK;
    if (st.ms_entries > UINT32_MAX)
        return TLY_ETOOLARGE;
    uint32_t id = writer_next_run_id (self), count = (uint32_t) st.ms_entries, nblocks;
    uint8_t *buf = writer_new_filter (self, count, &nblocks);
    if (!buf)
        return TLY_ENOMEM;
    MDB_cursor *cur;
    if (mdb_cursor_open (txn, self->store->dedup, &cur))
        return TLY_EIO;
    MDB_val k, v;
    int err = TLY_OK;
    uint32_t n = 0;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST);
    for (; rc == 0 && !err; rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT), n++) {
        if (k.mv_size != TLY_DEDUP_LEN || v.mv_size != 8)
            err = TLY_ECORRUPT;
        else
        if (!(err = append_run_record (self, id, k.mv_data, &v)))
            bloom_add (buf + BLOOM_HDR, nblocks, k.mv_data);
    }
    mdb_cursor_close (cur);
    if (!err && rc != MDB_NOTFOUND)
        err = TLY_EIO;
    if (!err && n != count)
        err = TLY_ECORRUPT;
    if (!err)
        err = writer_store_filter (self, id, count, nblocks, buf);
    if (!err && mdb_drop (txn, self->store->dedup, 0))
        err = TLY_EIO;
    *flushed = !err;
    return err;
}

/*  Tier t holds runs of about l0_max * MERGE_FANIN^t keys. */
static unsigned
run_tier (const tly_store *store, uint32_t count)
{
    uint64_t c = count / store->l0_max;
    unsigned t = 0;
    for (; c >= MERGE_FANIN; c /= MERGE_FANIN)
        t++;
    return t;
}

typedef struct {
    MDB_cursor *cur;
    uint32_t id;
    uint8_t key[TLY_DEDUP_LEN];
    MDB_val seq;
    uint64_t seq_copy;
    bool live;
} merge_head;

/*  Reads the cursor's current record into the head if it still belongs to
    the head's run.  Copies: the pages under a cursor may move as we append. */
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
    memcpy (&h->seq_copy, v->mv_data, 8);
    h->seq.mv_size = 8;
    h->seq.mv_data = &h->seq_copy;
    h->live = true;
    return TLY_OK;
}

static int
delete_run (tly_writer *self, uint32_t id)
{
    uint8_t rk[RUN_KEY_LEN] = { 0 };
    put_be32 (rk, id);
    MDB_cursor *cur;
    if (mdb_cursor_open (self->txn, self->store->runs, &cur))
        return TLY_EIO;
    MDB_val k = { RUN_KEY_LEN, rk }, v;
    int rc = mdb_cursor_get (cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && k.mv_size == RUN_KEY_LEN && get_be32 (k.mv_data) == id) {
        if ((rc = mdb_cursor_del (cur, 0)))
            break;
        /*  After a delete the cursor already stands on the successor;
            MDB_NEXT returns it (LMDB's C_DEL rule). */
        rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close (cur);
    if (rc && rc != MDB_NOTFOUND)
        return lmdb_err (rc);
    MDB_val bk = { 4, rk };
    rc = mdb_del (self->txn, self->store->blooms, &bk, NULL);
    return rc ? (rc == MDB_NOTFOUND ? TLY_ECORRUPT : lmdb_err (rc)) : TLY_OK;
}

/*  K-way merge of the runs at idx[0..n) (all in self->runs) into a new
    run appended after every live one, then deletes them. */
static int
merge_runs (tly_writer *self, const size_t *idx, size_t n)
{
    merge_head heads[MERGE_FANIN];
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += self->runs.runs[idx[i]].count;
    if (total > UINT32_MAX)
        return TLY_ETOOLARGE;
    uint32_t id = writer_next_run_id (self), nblocks;
    uint8_t *buf = writer_new_filter (self, (uint32_t) total, &nblocks);
    if (!buf)
        return TLY_ENOMEM;
    int err = TLY_OK;
    size_t opened = 0;
    for (; opened < n && !err; opened++) {
        merge_head *h = &heads[opened];
        h->id = self->runs.runs[idx[opened]].id;
        if (mdb_cursor_open (self->txn, self->store->runs, &h->cur)) {
            err = TLY_EIO;
            break;
        }
        uint8_t rk[RUN_KEY_LEN] = { 0 };
        put_be32 (rk, h->id);
        MDB_val k = { RUN_KEY_LEN, rk }, v;
        err = head_load (h, mdb_cursor_get (h->cur, &k, &v, MDB_SET_RANGE), &k, &v);
    }
    uint64_t written = 0;
    while (!err) {
        merge_head *min = NULL;
        for (size_t i = 0; i < n; i++)
            if (heads[i].live && (!min || memcmp (heads[i].key, min->key, TLY_DEDUP_LEN) < 0))
                min = &heads[i];
        if (!min)
            break;
        if ((err = append_run_record (self, id, min->key, &min->seq)))
            break;
        bloom_add (buf + BLOOM_HDR, nblocks, min->key);
        written++;
        MDB_val k, v;
        err = head_load (min, mdb_cursor_get (min->cur, &k, &v, MDB_NEXT), &k, &v);
    }
    for (size_t i = 0; i < opened; i++)
        mdb_cursor_close (heads[i].cur);
    if (!err && written != total)
        err = TLY_ECORRUPT;         /* a filter header disagrees with its run */
    for (size_t i = 0; i < n && !err; i++)
        err = delete_run (self, self->runs.runs[idx[i]].id);
    if (err)
        return err;
    /*  Drop the merged runs from the list (idx is ascending), then add the
        new one, which has the highest id. */
    size_t out = 0, j = 0;
    for (size_t i = 0; i < self->runs.n; i++)
        if (j < n && idx[j] == i)
            j++;
        else
            self->runs.runs[out++] = self->runs.runs[i];
    self->runs.n = out;
    return writer_store_filter (self, id, (uint32_t) total, nblocks, buf);
}

/*  Merges the oldest MERGE_FANIN runs of the lowest tier that has that
    many; *merged tells whether it did. */
static int
merge_one_tier (tly_writer *self, bool *merged)
{
    enum { TIERS = 16 };
    size_t idx[TIERS][MERGE_FANIN], have[TIERS] = { 0 };
    *merged = false;
    for (size_t i = 0; i < self->runs.n; i++) {
        unsigned t = run_tier (self->store, self->runs.runs[i].count);
        if (t >= TIERS)
            t = TIERS - 1;
        if (have[t] < MERGE_FANIN)
            idx[t][have[t]++] = i;
    }
    for (unsigned t = 0; t < TIERS; t++)
        if (have[t] == MERGE_FANIN) {
            *merged = true;
            return merge_runs (self, idx[t], MERGE_FANIN);
        }
    return TLY_OK;
}

int
tly_writer_compact (tly_writer *self)
{
    bool changed;
    int err = flush_l0 (self, &changed);
    while (!err && changed)
        err = merge_one_tier (self, &changed);
    return err;
}

/* ---- the writer ---- */

static int
writer_node_fn (void *ctx, unsigned level, uint64_t index, uint8_t out[32])
{
    tly_writer *self = ctx;
    return txn_node (self->store, self->txn, level, index, out);
}

int
tly_writer_open (tly_store *store, const uint8_t pk[TLY_PK_LEN], tly_writer **out,
                 const char **why)
{
    tly_writer *self = calloc (1, sizeof *self);
    if (!self)
        return TLY_ENOMEM;
    self->store = store;
    int rc = mdb_txn_begin (store->env, NULL, MDB_RDONLY, &self->txn);
    if (rc) {
        free (self);
        *why = mdb_strerror (rc);
        return TLY_EIO;
    }
    uint64_t size;
    int err = txn_size (store, self->txn, &size);
    if (!err)
        err = tly_frontier_load (&self->frontier, writer_node_fn, self, size);
    if (!err) {
        err = txn_sth (store, self->txn, UINT64_MAX, &self->sth);
        if (err == TLY_ENOTFOUND && size == 0) {
            memset (&self->sth, 0, sizeof self->sth);
            tly_merkle_empty_root (self->sth.root);
            err = TLY_OK;
        }
        else
        if (!err) {
            uint8_t root[32];
            tly_frontier_root (&self->frontier, root);
            if (self->sth.tree_size != size || memcmp (root, self->sth.root, 32)
            ||  tly_sth_verify (&self->sth, pk)) {
                *why = "the latest signed tree head does not match the stored tree "
                       "(or was not signed by log.key): the ledger is corrupt; "
                       "run `tally ctl verify` and restore from a backup";
                err = TLY_ECORRUPT;
            }
        }
        else
            *why = "no signed tree head for a non-empty ledger: the ledger is corrupt";
    }
    else
        *why = "cannot load the tree's right edge: the ledger is corrupt";
    mdb_txn_abort (self->txn);
    self->txn = NULL;
    if (err) {
        free (self);
        return err;
    }
    self->committed = self->frontier;
    *out = self;
    return TLY_OK;
}

void
tly_writer_destroy (tly_writer **self_p)
{
    tly_writer *self = *self_p;
    if (self) {
        if (self->txn)
            mdb_txn_abort (self->txn);
        writer_drop_fresh (self);
        free (self->runs.runs);
        free (self);
        *self_p = NULL;
    }
}

int
tly_writer_begin (tly_writer *self)
{
    if (self->txn)
        tly_writer_abort (self);
    writer_drop_fresh (self);
    if (mdb_txn_begin (self->store->env, NULL, 0, &self->txn))
        return TLY_EIO;
    int err = runs_load (self->store, self->txn, &self->runs);
    if (err)
        tly_writer_abort (self);
    return err;
}

uint64_t
tly_writer_next_seq (tly_writer *self)
{
    return self->frontier.size;
}

int
tly_writer_lookup (tly_writer *self, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq)
{
    return txn_lookup (self->store, self->txn, &self->runs, dedup, seq);
}

int
tly_writer_leaf (tly_writer *self, uint64_t seq, const uint8_t **leaf, size_t *len)
{
    return txn_leaf (self->store, self->txn, seq, leaf, len);
}

int
tly_writer_node (tly_writer *self, unsigned level, uint64_t index, uint8_t out[32])
{
    return txn_node (self->store, self->txn, level, index, out);
}

static int
emit_node (void *ctx, unsigned level, uint64_t index, const uint8_t hash[32])
{
    tly_writer *self = ctx;
    if (level == 0)
        return TLY_OK;              /* recomputed from the entry when needed */
    uint64_t key = node_key (level, index);
    MDB_val k = { 8, &key }, v = { 32, (void *) hash };
    int rc = mdb_put (self->txn, self->store->nodes, &k, &v, MDB_APPEND);
    return rc ? (rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO) : TLY_OK;
}

static int
writer_append (tly_writer *self, const uint8_t *leaf, size_t len,
               const uint8_t dedup[TLY_DEDUP_LEN], uint8_t leaf_hash[32], bool checked)
{
    /*  The index first: a key already there is refused before anything
        else of this entry is written.  MDB_NOOVERWRITE below only sees L0,
        so the runs are asked first, unless the caller just did. */
    uint64_t seq = self->frontier.size, old;
    int err = checked ? TLY_ENOTFOUND
                      : txn_lookup (self->store, self->txn, &self->runs, dedup, &old);
    if (err == TLY_OK)
        return TLY_EEXIST;
    if (err != TLY_ENOTFOUND)
        return err;
    MDB_val dk = { TLY_DEDUP_LEN, (void *) dedup }, dv = { 8, &seq };
    int rc = mdb_put (self->txn, self->store->dedup, &dk, &dv, MDB_NOOVERWRITE);
    if (rc == MDB_KEYEXIST)
        return TLY_EEXIST;
    if (rc)
        return rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO;
    MDB_val k = { 8, &seq }, v = { len, (void *) leaf };
    rc = mdb_put (self->txn, self->store->entries, &k, &v, MDB_APPEND);
    if (rc)
        return rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO;
    tly_merkle_leaf_hash (leaf, len, leaf_hash);
    return tly_frontier_push (&self->frontier, leaf_hash, emit_node, self);
}

int
tly_writer_append (tly_writer *self, const uint8_t *leaf, size_t len,
                   const uint8_t dedup[TLY_DEDUP_LEN], uint8_t leaf_hash[32])
{
    return writer_append (self, leaf, len, dedup, leaf_hash, false);
}

int
tly_writer_append_new (tly_writer *self, const uint8_t *leaf, size_t len,
                       const uint8_t dedup[TLY_DEDUP_LEN], uint8_t leaf_hash[32])
{
    return writer_append (self, leaf, len, dedup, leaf_hash, true);
}

int
tly_writer_commit (tly_writer *self, const uint8_t sk[TLY_SK_LEN], tly_sth *sth,
                   const char **why)
{
    /*  Compaction rides in the commit's txn: a crash leaves either the old
        or the new layout, never half of one. */
    int err = tly_writer_compact (self);
    if (err) {
        *why = "moving the idempotency index's recent keys into a sorted run failed";
        tly_writer_abort (self);
        return err;
    }
    tly_sth head = { .tree_size = self->frontier.size, .ts = tly_now_ms () };
    if (head.ts < self->sth.ts)
        head.ts = self->sth.ts;     /* heads never go back in time */
    tly_frontier_root (&self->frontier, head.root);
    err = tly_sth_sign (&head, sk);
    if (err) {
        *why = "signing the tree head failed";
        tly_writer_abort (self);
        return err;
    }
    uint8_t val[STH_VAL_LEN];
    memcpy (val, &head.ts, 8);
    memcpy (val + 8, head.root, 32);
    memcpy (val + 40, head.sig, TLY_SIG_LEN);
    MDB_val k = { 8, &head.tree_size }, v = { sizeof val, val };
    /*  A commit with no appends re-signs the same size: overwrite. */
    int rc = mdb_put (self->txn, self->store->sths, &k, &v, 0);
    if (!rc)
        rc = mdb_txn_commit (self->txn);
    else
        mdb_txn_abort (self->txn);
    self->txn = NULL;
    writer_drop_fresh (self);
    self->runs.n = 0;               /* reloaded by the next begin */
    if (rc) {
        *why = mdb_strerror (rc);
        self->frontier = self->committed;
        return rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO;
    }
    self->committed = self->frontier;
    self->sth = head;
    if (sth)
        *sth = head;
    return TLY_OK;
}

void
tly_writer_abort (tly_writer *self)
{
    if (self->txn) {
        mdb_txn_abort (self->txn);
        self->txn = NULL;
    }
    writer_drop_fresh (self);
    self->runs.n = 0;               /* reloaded by the next begin */
    self->frontier = self->committed;
}

const tly_sth *
tly_writer_sth (tly_writer *self)
{
    return &self->sth;
}
