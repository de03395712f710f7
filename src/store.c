/*  store.c -- the ledger in LMDB (see store.h for the layout). */
#include <errno.h>
#include <lmdb.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "tally/blake2b.h"
#include "tally/event.h"
#include "tally/log.h"
#include "tally/store.h"
#include "dedup.h"

#define STH_VAL_LEN (8 + 32 + TLY_SIG_LEN)
/*  Format 8 seals each head record: ts || root || sig || BLAKE2b-128 of
    tree_size (u64, host order) || ts || root || sig.  The scrubber checks
    the seal (a fraction of a microsecond) instead of the signature (about
    50 us): a ledger keeps one head per commit, millions a day. */
#define STH_SEAL_LEN 16
#define STH_SEALED_LEN (STH_VAL_LEN + STH_SEAL_LEN)
#define FORMAT_NUM 9
#define STR_(x) #x
#define STR(x) STR_(x)
#define FORMAT STR (FORMAT_NUM)     /* as stored in meta/format, without a NUL */
/*  L0 lives in memory: a larger one means fewer merge levels (each key is
    rewritten once per level) and fewer runs to ask, for more memory
    (about 60 bytes a key, in the writer and in each reader that looks
    keys up) and more entries to re-read at start (up to twice l0_max,
    about 0.5 us each).  tally-ceiling, 2M events at 1,000 per commit:
    16K 238-251k events/s, 128K 261-275k. */
#define L0_MAX_DEFAULT  131072
#define L0_MAX_MIN      16
#define L0_MAX_LIMIT    (1u << 24)  /* 1 GB of L0 in each of the writer and the readers */

struct tly_store {
    MDB_env *env;
    MDB_dbi entries, nodes, sths, meta;
    dx_tables dx;                   /* the idempotency index's tables */
    uint8_t dedup_key[crypto_generichash_KEYBYTES];
    tly_blake2b_key dedup_b2;       /* dedup_key, its block compressed */
    char data_path[4200];
    char ledger_dir[4100];          /* scratch space of the index's builds */
};

struct tly_reader {
    tly_store *store;
    MDB_txn *txn;
    uint64_t size;
    dx_view view;                   /* loaded on first use in a snapshot */
    bool view_loaded;
    bool l0_synced;                 /* view's L0 matches the snapshot */
    bool active;
};

struct tly_writer {
    tly_store *store;
    MDB_txn *txn;
    tly_frontier frontier;          /* includes this txn's appends      */
    tly_frontier committed;         /* as of the last commit, for abort */
    tly_sth sth;                    /* the latest committed head        */
    dx_writer *dx;                  /* the idempotency index's writer   */
    bool broken;                    /* an append failed half way: no commit */
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

static int txn_size (tly_store *store, MDB_txn *txn, uint64_t *size);

/*  A ledger's format number as stored in meta/format: decimal, 1 to 3
    digits without a leading zero (so that a newer tallyd's format 10 reads
    as 10); -1 when malformed. */
static int
format_parse (const MDB_val *v)
{
    const char *d = v->mv_data;
    if (v->mv_size < 1 || v->mv_size > 3 || d[0] == '0')
        return -1;
    int f = 0;
    for (size_t i = 0; i < v->mv_size; i++) {
        if (d[i] < '0' || d[i] > '9')
            return -1;
        f = f * 10 + (d[i] - '0');
    }
    return f;
}

/*  Writes this tallyd's format number into meta. */
static int
put_format (tly_store *self, MDB_txn *txn)
{
    MDB_val k = { 6, "format" }, v = { sizeof FORMAT - 1, FORMAT };
    return mdb_put (txn, self->meta, &k, &v, 0);
}

#define CORRUPT_RESTORE ": the ledger is corrupt; restore this data dir from a backup"

/*  What meta says of the ledger: *format is 0 for a new one (no format, no
    dedup key, no entries), else its format, and the dedup key is loaded.
    A ledger with one of the two and not the other, or with entries and
    neither, was not left so by a tallyd and is refused as corrupt, never
    taken as new: a new dedup key would file the same (customer, key)
    elsewhere, and every retry of an event already recorded would be taken
    again. */
static int
meta_check (tly_store *self, MDB_txn *txn, int *format, const char **why)
{
    MDB_val fk = { 6, "format" }, fv, dk = { 9, "dedup_key" }, dv;
    int frc = mdb_get (txn, self->meta, &fk, &fv);
    int drc = mdb_get (txn, self->meta, &dk, &dv);
    int rc = frc && frc != MDB_NOTFOUND ? frc : drc && drc != MDB_NOTFOUND ? drc : 0;
    if (rc) {
        *why = mdb_strerror (rc);
        return TLY_EIO;
    }
    *format = 0;
    if (frc && drc) {
        MDB_stat est;
        if ((rc = mdb_stat (txn, self->entries, &est))) {
            *why = mdb_strerror (rc);
            return TLY_EIO;
        }
        if (est.ms_entries == 0)
            return TLY_OK;
        *why = "meta/format and meta/dedup_key are missing from a ledger that has "
               "entries" CORRUPT_RESTORE;
        return TLY_ECORRUPT;
    }
    int f = frc ? 0 : format_parse (&fv);
    if (frc || f < 0) {
        *why = frc ? "meta/format is missing from a ledger that has a dedup key" CORRUPT_RESTORE
                   : "meta/format is malformed" CORRUPT_RESTORE;
        return TLY_ECORRUPT;
    }
    /*  A newer tallyd's format first: it may keep its key elsewhere. */
    if (drc && f <= FORMAT_NUM) {
        *why = "meta/dedup_key is missing from a ledger that has a format" CORRUPT_RESTORE;
        return TLY_ECORRUPT;
    }
    if (f < 5 || f > FORMAT_NUM) {
        *why = "the ledger in this data dir is not format 5 to " FORMAT " (formats 1 to 4 "
               "laid out the idempotency index differently, and later ones are a newer "
               "tallyd's): this tallyd reads formats 5 to " FORMAT " only; start from a fresh "
               "data dir (there is no migration from formats 1 to 4)";
        return TLY_EINVAL;
    }
    if (dv.mv_size != sizeof self->dedup_key) {
        *why = "meta/dedup_key has the wrong size" CORRUPT_RESTORE;
        return TLY_ECORRUPT;
    }
    memcpy (self->dedup_key, dv.mv_data, sizeof self->dedup_key);
    *format = f;
    return TLY_OK;
}

/*  Format 5 differs only in where L0 of the idempotency index lives. */
static int
migrate_5 (tly_store *self, MDB_txn *txn)
{
    uint64_t size;
    int err = txn_size (self, txn, &size);
    if (!err)
        err = dx_migrate_5 (&self->dx, txn, size);
    if (!err && put_format (self, txn))
        err = TLY_EIO;
    if (!err)
        tly_info ("store", "ledger format 5 moved to format " FORMAT
                           " (L0 of the idempotency index is now kept in memory); "
                           "%llu entries, none rewritten", (unsigned long long) size);
    return err;
}

/*  The dedup key of a stored entry: L0 is derived from these. */
static int
entry_dedup_key (void *ctx, MDB_txn *txn, uint64_t seq, uint8_t key[TLY_DEDUP_LEN])
{
    tly_store *self = ctx;
    MDB_val k = { 8, &seq }, v;
    int rc = mdb_get (txn, self->entries, &k, &v);
    if (rc)
        return rc == MDB_NOTFOUND ? TLY_ENOTFOUND : TLY_EIO;
    tly_entry e;
    if (tly_leaf_decode (v.mv_data, v.mv_size, &e, NULL))
        return TLY_ECORRUPT;
    tly_store_dedup_hash (self, &e.ev.customer, &e.ev.key, key);
    return TLY_OK;
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
    ||  (rc = mdb_dbi_open (txn, "sths", MDB_CREATE | MDB_INTEGERKEY, &self->sths))
    ||  (rc = mdb_dbi_open (txn, "meta", MDB_CREATE, &self->meta)))
        goto abort;
    if (dx_open (txn, &self->dx)) {
        rc = EIO;
        goto abort;
    }

    int format, err = meta_check (self, txn, &format, why);
    if (err) {
        mdb_txn_abort (txn);
        return err;
    }
    if (format == 0) {                  /* a new ledger */
        randombytes_buf (self->dedup_key, sizeof self->dedup_key);
        MDB_val dk = { 9, "dedup_key" }, dv = { sizeof self->dedup_key, self->dedup_key };
        if ((rc = mdb_put (txn, self->meta, &dk, &dv, 0))
        ||  (rc = put_format (self, txn)))
            goto abort;
    }
    tly_blake2b_key_init (&self->dedup_b2, self->dedup_key, sizeof self->dedup_key,
                          TLY_DEDUP_LEN);
    /*  Format 7 added the records of builds in progress ("dedup.build<t>",
        src/dedup.c), which a format-6 tallyd would not keep up to date;
        format 8 seals new head records (16 bytes longer), which a format-7
        tallyd cannot read; format 9 stores new runs of the index as blocks
        of records (a run's filter header says which), which a format-8
        tallyd would read as one record per key.  The number moves so that
        an older tallyd refuses the ledger.  A format-6 to -8 ledger has
        none of these yet (its heads stay unsealed and are checked by their
        signature, its runs are read one record per key until merged), so
        moving it on is writing the number. */
    if (format >= 6 && format <= 8) {
        if ((rc = put_format (self, txn)))
            goto abort;
        tly_info ("store", "ledger format %d moved to format " FORMAT " (builds of the "
                           "idempotency index resume after a restart; new signed heads are "
                           "sealed for the scrubber; new index runs are stored in blocks); "
                           "nothing rewritten", format);
    }
    if (format == 5 && (err = migrate_5 (self, txn))) {
        mdb_txn_abort (txn);
        *why = err == TLY_ECORRUPT
             ? "moving the ledger from format 5 to " FORMAT " failed (nothing was "
               "changed): its idempotency index does not match its entries; run "
               "`tally ctl verify` with the previous tallyd and restore from a backup"
             : "moving the ledger from format 5 to " FORMAT " failed (nothing was "
               "changed): check the disk (map full: raise map_size_gb)";
        return err;
    }
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
    self->dx.key_of = entry_dedup_key;
    self->dx.key_ctx = self;
    self->dx.l0_max = tly_env_u64 ("store", "TALLY_L0_MAX", L0_MAX_DEFAULT, L0_MAX_MIN,
                                   L0_MAX_LIMIT);
    char path[4096];
    snprintf (path, sizeof path, "%s/ledger", dir);
    snprintf (self->data_path, sizeof self->data_path, "%s/data.mdb", path);
    snprintf (self->ledger_dir, sizeof self->ledger_dir, "%s", path);
    self->dx.scratch_dir = self->ledger_dir;
    if (mkdir_p (path)) {
        *why = strerror (errno);
        free (self);
        return TLY_EIO;
    }
    int rc = mdb_env_create (&self->env);
    if (!rc) rc = mdb_env_set_maxdbs (self->env, 4 + 4 + DX_SLOTS);
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
    self->dx.l0_max = l0_max < L0_MAX_MIN ? L0_MAX_MIN : l0_max;
}

void
tly_store_dedup_hash (tly_store *self, const tly_str *customer, const tly_str *key,
                      uint8_t out[TLY_DEDUP_LEN])
{
    /*  The length prefix keeps ("ab","c") apart from ("a","bc"). */
    uint8_t len[4] = { (uint8_t) (customer->len >> 24), (uint8_t) (customer->len >> 16),
                       (uint8_t) (customer->len >> 8), (uint8_t) customer->len };
    tly_blake2b_part parts[3] = { { len, 4 }, { customer->ptr, customer->len },
                                  { key->ptr, key->len } };
    tly_blake2b_keyed (&self->dedup_b2, parts, 3, out);
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

static void
sth_seal (uint64_t tree_size, const uint8_t val[STH_VAL_LEN], uint8_t seal[STH_SEAL_LEN])
{
    crypto_generichash_state st;
    crypto_generichash_init (&st, NULL, 0, STH_SEAL_LEN);
    crypto_generichash_update (&st, (const uint8_t *) &tree_size, 8);
    crypto_generichash_update (&st, val, STH_VAL_LEN);
    crypto_generichash_final (&st, seal, STH_SEAL_LEN);
}

static bool
sth_val_ok (const MDB_val *k, const MDB_val *v)
{
    return k->mv_size == 8 && (v->mv_size == STH_VAL_LEN || v->mv_size == STH_SEALED_LEN);
}

/*  TLY_SEAL_NONE for a record written before format 8. */
static tly_seal
sth_seal_of (uint64_t tree_size, const MDB_val *v)
{
    if (v->mv_size != STH_SEALED_LEN)
        return TLY_SEAL_NONE;
    uint8_t seal[STH_SEAL_LEN];
    sth_seal (tree_size, v->mv_data, seal);
    return sodium_memcmp (seal, (const uint8_t *) v->mv_data + STH_VAL_LEN, STH_SEAL_LEN) == 0
         ? TLY_SEAL_OK : TLY_SEAL_BAD;
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
    uint64_t size;
    if (!sth_val_ok (&k, &v))
        return TLY_ECORRUPT;
    memcpy (&size, k.mv_data, 8);
    if (sth_seal_of (size, &v) == TLY_SEAL_BAD)
        return TLY_ECORRUPT;        /* never serve a head that changed on disk */
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
        dx_view_free (&self->view);
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
    self->view_loaded = false;
    self->l0_synced = false;
    rc = txn_size (self->store, self->txn, &self->size);
    if (rc)
        tly_reader_end (self);
    return rc;
}

/*  The dedup view (one record per run) costs a cursor walk: only
    lookups and scans need it, so proofs and gets never pay for it. */
static int
reader_view (tly_reader *self)
{
    if (self->view_loaded)
        return TLY_OK;
    int rc = dx_view_load (&self->store->dx, self->txn, &self->view);
    self->view_loaded = rc == TLY_OK;
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

/*  L0 is kept across snapshots: a lookup reads only the entries
    appended since the reader's last one (and none after a restart
    that it has not read yet, up to twice l0_max). */
int
tly_reader_lookup (tly_reader *self, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq)
{
    int rc = reader_view (self);
    if (!rc && !self->l0_synced) {
        rc = dx_view_sync (&self->store->dx, self->txn, &self->view, self->size);
        self->l0_synced = rc == TLY_OK;
    }
    return rc ? rc : dx_lookup (&self->store->dx, self->txn, &self->view, dedup, seq);
}

_Static_assert (TLY_DEDUP_RUNS_MAX == DX_SLOTS, "a run per table at most");

int
tly_reader_dedup_runs (tly_reader *self, uint32_t ids[TLY_DEDUP_RUNS_MAX], size_t *n)
{
    *n = 0;
    int rc = reader_view (self);
    return rc ? rc : dx_view_ids (&self->view, ids, n);
}

int
tly_reader_lookup_runs (tly_reader *self, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t *seq)
{
    int rc = reader_view (self);
    return rc ? rc : dx_lookup_in (&self->store->dx, self->txn, &self->view, dedup, false,
                                   NULL, 0, seq);
}

_Static_assert (TLY_DEDUP_TIERS == DX_TIERS, "store.h names the dedup index's tiers");

int
tly_reader_dedup_shape (tly_reader *self, tly_dedup_shape *out)
{
    memset (out, 0, sizeof *out);
    int rc = reader_view (self);
    if (rc)
        return rc;
    const dx_view *view = &self->view;
    out->runs = view->n;
    out->in_runs = view->covered;
    out->probes = view->probes;
    for (size_t i = 0; i < view->n; i++) {
        out->tiers[view->runs[i].tier]++;       /* < DX_TIERS: dx_view_load checks */
        out->lone += view->runs[i].group < 0;
    }
    for (size_t g = 0; g < view->ng; g++)
        out->groups += view->groups[g].live > 0;
    return TLY_OK;
}

int
tly_reader_node (void *reader, unsigned level, uint64_t index, uint8_t out[32])
{
    tly_reader *self = reader;
    return txn_node (self->store, self->txn, level, index, out);
}

/*  The u64 key a cursor stands on after a get that returned rc; UINT64_MAX
    at the end (or on a key of another size, which no walk can match). */
static uint64_t
at_key (int rc, const MDB_val *k)
{
    uint64_t key = UINT64_MAX;
    if (rc == 0 && k->mv_size == 8)
        memcpy (&key, k->mv_data, 8);
    return key;
}

/*  Nodes are keyed in the order they were completed (node_key), so one
    cursor walks them along with the leaves: leaf m completes the nodes of
    levels 1 up to its count of trailing one bits, keys 2m - popcount (m)
    + level; the key 2m - popcount (m) (level 0, never stored) lies between
    the nodes of leaf m - 1 and those of leaf m. */
int
tly_reader_tree_walk (tly_reader *self, uint64_t from, uint64_t until, size_t count,
                      tly_walk_leaf_fn *leaf_fn, tly_walk_node_fn *node_fn, void *ctx,
                      uint64_t *next)
{
    MDB_cursor *ec, *nc;
    *next = from;
    if (mdb_cursor_open (self->txn, self->store->entries, &ec))
        return TLY_EIO;
    if (mdb_cursor_open (self->txn, self->store->nodes, &nc)) {
        mdb_cursor_close (ec);
        return TLY_EIO;
    }
    uint64_t ekey = from, nkey = node_key (0, from);
    MDB_val k = { 8, &ekey }, v, nk = { 8, &nkey }, nv;
    int erc = mdb_cursor_get (ec, &k, &v, MDB_SET_RANGE);
    int nrc = mdb_cursor_get (nc, &nk, &nv, MDB_SET_RANGE);
    int err = TLY_OK;
#define LMDB_FAILED(rc) ((rc) && (rc) != MDB_NOTFOUND)
    for (uint64_t m = from; !err && m < until && m - from < count; m++) {
        if (LMDB_FAILED (erc) || LMDB_FAILED (nrc)) {
            err = TLY_EIO;
            break;
        }
        bool have = at_key (erc, &k) == m;
        if ((err = leaf_fn (ctx, m, have ? v.mv_data : NULL, have ? v.mv_size : 0)))
            break;
        if (have)
            erc = mdb_cursor_get (ec, &k, &v, MDB_NEXT);
        for (unsigned level = 1; !err && level < 64 && (m >> (level - 1)) & 1; level++) {
            uint64_t want = node_key (level, m >> level);
            while (at_key (nrc, &nk) < want)            /* a key no node has */
                nrc = mdb_cursor_get (nc, &nk, &nv, MDB_NEXT);
            bool there = at_key (nrc, &nk) == want;
            err = LMDB_FAILED (nrc) ? TLY_EIO
                : node_fn (ctx, level, m >> level, there && nv.mv_size == 32 ? nv.mv_data : NULL);
            if (!err && there)
                nrc = mdb_cursor_get (nc, &nk, &nv, MDB_NEXT);
        }
        if (!err)
            *next = m + 1;
    }
#undef LMDB_FAILED
    mdb_cursor_close (nc);
    mdb_cursor_close (ec);
    return err;
}

int
tly_reader_sth (tly_reader *self, uint64_t tree_size, tly_sth *out)
{
    return txn_sth (self->store, self->txn, tree_size, out);
}

int
tly_reader_dedup_scan (tly_reader *self, const uint8_t *after, size_t count,
                       tly_dedup_fn *fn, void *ctx, uint8_t last[TLY_DEDUP_POS_LEN], bool *done)
{
    int rc = reader_view (self);
    return rc ? rc : dx_scan (&self->store->dx, self->txn, &self->view, after, count, fn, ctx,
                              last, done);
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
        if (!sth_val_ok (&k, &v)) {
            err = TLY_ECORRUPT;
            break;
        }
        tly_sth sth;
        uint64_t size;
        memcpy (&size, k.mv_data, 8);
        sth_from_val (size, &v, &sth);
        *next = size + 1;
        err = fn (ctx, &sth, sth_seal_of (size, &v));
        rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT);
    }
    if (!err && rc == MDB_NOTFOUND)
        *done = true;
    mdb_cursor_close (cur);
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
    if (dx_writer_new (&store->dx, &self->dx)) {
        free (self);
        return TLY_ENOMEM;
    }
    int rc = mdb_txn_begin (store->env, NULL, MDB_RDONLY, &self->txn);
    if (rc) {
        dx_writer_destroy (&self->dx);
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
        dx_writer_destroy (&self->dx);
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
        dx_writer_destroy (&self->dx);
        free (self);
        *self_p = NULL;
    }
}

int
tly_writer_begin (tly_writer *self)
{
    if (self->txn)
        tly_writer_abort (self);
    self->broken = false;
    if (mdb_txn_begin (self->store->env, NULL, 0, &self->txn))
        return TLY_EIO;
    int err = dx_writer_begin (self->dx, self->txn, self->frontier.size);
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
    return dx_writer_lookup (self->dx, dedup, seq);
}

int
tly_writer_lookup_beyond (tly_writer *self, const uint8_t dedup[TLY_DEDUP_LEN],
                          const uint32_t *asked, size_t nasked, uint64_t *seq)
{
    return dx_writer_lookup_in (self->dx, dedup, asked, nasked, seq);
}

void
tly_writer_prefetch (tly_writer *self, const uint8_t dedup[TLY_DEDUP_LEN])
{
    dx_writer_prefetch (self->dx, dedup);
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
        else of this entry is written.  dx_writer_insert only sees L0, so
        the runs are asked first, unless the caller just did. */
    uint64_t seq = self->frontier.size, old;
    int err = checked ? TLY_ENOTFOUND
                      : dx_writer_lookup (self->dx, dedup, &old);
    if (err == TLY_OK)
        return TLY_EEXIST;
    if (err != TLY_ENOTFOUND)
        return err;
    if ((err = dx_writer_insert (self->dx, dedup, seq)))
        return err;
    /*  From here a failure leaves the key in L0 without its entry, or an
        entry without its nodes: the txn can only be aborted. */
    MDB_val k = { 8, &seq }, v = { len, (void *) leaf };
    int rc = mdb_put (self->txn, self->store->entries, &k, &v, MDB_APPEND);
    if (rc) {
        self->broken = true;
        return rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO;
    }
    tly_merkle_leaf_hash (leaf, len, leaf_hash);
    err = tly_frontier_push (&self->frontier, leaf_hash, emit_node, self);
    self->broken |= err != TLY_OK;
    return err;
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
tly_writer_compact (tly_writer *self)
{
    return dx_writer_finish (self->dx);
}

static int writer_finish (tly_writer *self, int rc, const char **why);

int
tly_writer_checkpoint (tly_writer *self, const char **why)
{
    bool changed = false;
    int err = tly_writer_begin (self);
    if (err) {
        *why = "starting the checkpoint's transaction failed";
        return err;
    }
    /*  The commit's slice of maintenance first (a run it publishes joins
        its group), then the groups as they are after it.  The tree is
        unchanged: its head stands, nothing is signed. */
    if ((err = dx_writer_maintain (self->dx, 0)))
        *why = "the dedup index's maintenance failed";
    else
    if ((err = dx_writer_checkpoint (self->dx, &changed)))
        *why = "storing the dedup index's groups failed";
    /*  Nothing to keep: abort (a commit would only write a meta page).
        Maintenance done here is kept, else an abort would drop the
        builds under way and the next writer would refill them. */
    if (err || !changed) {
        tly_writer_abort (self);
        return err;
    }
    return writer_finish (self, 0, why);
}

void
tly_writer_dedup_backlog (tly_writer *self, size_t *builds, size_t *dead)
{
    dx_writer_backlog (self->dx, builds, dead);
}

int
tly_writer_commit (tly_writer *self, const uint8_t sk[TLY_SK_LEN], tly_sth *sth,
                   const char **why)
{
    if (self->broken) {
        *why = "an append in this transaction failed half way; it was rolled back";
        tly_writer_abort (self);
        return TLY_EINVAL;
    }
    /*  The index's maintenance rides in the commit's txn, a slice at a
        time: a crash leaves either the old or the new layout. */
    int err = dx_writer_maintain (self->dx, self->frontier.size - self->committed.size);
    if (err) {
        *why = "maintaining the idempotency index (merging its sorted runs) failed";
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
    uint8_t val[STH_SEALED_LEN];
    memcpy (val, &head.ts, 8);
    memcpy (val + 8, head.root, 32);
    memcpy (val + 40, head.sig, TLY_SIG_LEN);
    sth_seal (head.tree_size, val, val + STH_VAL_LEN);
    MDB_val k = { 8, &head.tree_size }, v = { sizeof val, val };
    /*  A commit with no appends re-signs the same size: overwrite. */
    if ((err = writer_finish (self, mdb_put (self->txn, self->store->sths, &k, &v, 0), why)))
        return err;
    self->sth = head;
    if (sth)
        *sth = head;
    return TLY_OK;
}

/*  Commits the txn if rc (of its last put) is 0, else aborts it. */
static int
writer_finish (tly_writer *self, int rc, const char **why)
{
    if (!rc)
        rc = mdb_txn_commit (self->txn);
    else
        mdb_txn_abort (self->txn);
    self->txn = NULL;
    dx_writer_end (self->dx, rc == 0);
    if (rc) {
        *why = mdb_strerror (rc);
        self->frontier = self->committed;
        return rc == MDB_MAP_FULL ? TLY_ETOOLARGE : TLY_EIO;
    }
    self->committed = self->frontier;
    return TLY_OK;
}

void
tly_writer_abort (tly_writer *self)
{
    if (self->txn) {
        mdb_txn_abort (self->txn);
        self->txn = NULL;
    }
    dx_writer_end (self->dx, false);
    self->frontier = self->committed;
}

const tly_sth *
tly_writer_sth (tly_writer *self)
{
    return &self->sth;
}
