/*  test_dedup.c -- the idempotency index's LSM tree (src/dedup.h) driven
    directly against a model: random commits, aborted txns (after the
    maintenance in them made progress), writer restarts (which rebuild L0
    from "the log": key_of) and scrubber scans that span commits.  At every
    check each committed key is found at its seq, nothing else is, and the
    scan visits every stored record; at the end no run table is left
    holding records no visible run owns. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <lmdb.h>
#include "dedup.h"

#define KEYS_MAX 60000             /* test_dedup_model */

typedef struct {
    char dir[64];
    MDB_env *env;
    dx_tables t;
    dx_writer *w;
    uint64_t n;                     /* committed keys: seq 0 .. n - 1 */
    uint64_t rng;
    size_t max_l0;                  /* keys in L0 before a commit's maintenance */
    /*  A snapshot taken some commits ago, as the ingest actor's: lookups
        ask its runs first and the writer only the rest (lookup_split). */
    MDB_txn *early;
    dx_view early_view;
    uint32_t early_ids[DX_SLOTS];
    size_t early_n;
    uint64_t found_early, found_after;  /* keys found in its runs / by the writer */
} fixture;

static uint64_t
splitmix (uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/*  The key of seq (tag 0), or a key never inserted (tag 1). */
static void
key_of (uint64_t seq, int tag, uint8_t key[TLY_DEDUP_LEN])
{
    uint64_t x = seq * 2 + (uint64_t) tag, a = splitmix (&x), b = splitmix (&x);
    memcpy (key, &a, 8);
    memcpy (key + 8, &b, 8);
}

/*  The index's view of the log: only committed entries can be read. */
static int
log_key (void *ctx, MDB_txn *txn, uint64_t seq, uint8_t key[TLY_DEDUP_LEN])
{
    fixture *f = ctx;
    (void) txn;
    if (seq >= f->n)
        return TLY_ENOTFOUND;
    key_of (seq, 0, key);
    return TLY_OK;
}

static uint64_t
below (fixture *f, uint64_t n)
{
    return splitmix (&f->rng) % n;
}

static int
setup (void **state)
{
    fixture *f = calloc (1, sizeof *f);
    strcpy (f->dir, "/tmp/tally-test-dedup-XXXXXX");
    if (!f || !mkdtemp (f->dir))
        return -1;
    MDB_txn *txn;
    if (mdb_env_create (&f->env)
    ||  mdb_env_set_maxdbs (f->env, 8 + DX_SLOTS)
    ||  mdb_env_set_mapsize (f->env, (size_t) 1 << 28)
    ||  mdb_env_open (f->env, f->dir, MDB_NOTLS | MDB_NOSYNC, 0644)
    ||  mdb_txn_begin (f->env, NULL, 0, &txn))
        return -1;
    if (dx_open (txn, &f->t) || mdb_txn_commit (txn))
        return -1;
    f->t.l0_max = 64;
    f->t.scratch_dir = f->dir;      /* every build's filter in a file mapping */
    f->t.filter_map_min = 1;
    f->t.key_of = log_key;
    f->t.key_ctx = f;
    f->rng = 42;
    if (dx_writer_new (&f->t, &f->w))
        return -1;
    *state = f;
    return 0;
}

static void early_end (fixture *f);

static int
teardown (void **state)
{
    fixture *f = *state;
    early_end (f);
    dx_writer_destroy (&f->w);
    mdb_env_close (f->env);
    char cmd[128];
    snprintf (cmd, sizeof cmd, "rm -rf %s", f->dir);
    if (system (cmd)) { /* best effort */ }
    free (f);
    return 0;
}

/*  The earlier snapshot, taken now (its runs' ids too), or let go. */
static void
early_begin (fixture *f)
{
    assert_int_equal (mdb_txn_begin (f->env, NULL, MDB_RDONLY, &f->early), 0);
    assert_int_equal (dx_view_load (&f->t, f->early, &f->early_view), TLY_OK);
    assert_int_equal (dx_view_ids (&f->early_view, f->early_ids, &f->early_n), TLY_OK);
    for (size_t i = 1; i < f->early_n; i++)
        assert_true (f->early_ids[i - 1] < f->early_ids[i]);
}

static void
early_end (fixture *f)
{
    if (f->early) {
        dx_view_free (&f->early_view);
        mdb_txn_abort (f->early);
        f->early = NULL;
    }
}

/*  A lookup in the writer's txn as the receipt actor makes it: when there
    is an earlier snapshot, its runs (never its L0) are asked first, and
    the writer then skips them.  Between the two, flushes and merges may
    have moved the key out of L0 or into a merged run, and the writer may
    have restarted or lost a txn: the answer must be the full lookup's. */
static int
lookup_split (fixture *f, const uint8_t key[TLY_DEDUP_LEN], uint64_t *seq)
{
    if (!f->early)
        return dx_writer_lookup (f->w, key, seq);
    int rc = dx_lookup_in (&f->t, f->early, &f->early_view, key, false, NULL, 0, seq);
    if (rc == TLY_OK)
        f->found_early++;
    if (rc != TLY_ENOTFOUND)
        return rc;
    rc = dx_writer_lookup_in (f->w, key, f->early_ids, f->early_n, seq);
    f->found_after += rc == TLY_OK;
    return rc;
}

/*  One txn of `count` new keys with some lookups of old ones, the slice
    of maintenance a commit does, then a commit or an abort.  A txn that
    will abort appends keys never committed (tag 1), which must vanish
    with it: the next txn appends other keys at the same seqs. */
static void
txn_round (fixture *f, uint64_t count, bool commit)
{
    MDB_txn *txn;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (dx_writer_begin (f->w, txn, f->n), TLY_OK);
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t s = f->n + i;
        key_of (s, commit ? 0 : 1, key);
        assert_int_equal (lookup_split (f, key, &seq), TLY_ENOTFOUND);
        assert_int_equal (dx_writer_insert (f->w, key, s), TLY_OK);
        assert_int_equal (dx_writer_insert (f->w, key, s), TLY_EEXIST);
        if (f->n) {
            uint64_t old = below (f, f->n);
            key_of (old, 0, key);
            assert_int_equal (lookup_split (f, key, &seq), TLY_OK);
            assert_int_equal (seq, old);
        }
    }
    if (dx_writer_l0_keys (f->w) > f->max_l0)
        f->max_l0 = dx_writer_l0_keys (f->w);
    assert_int_equal (dx_writer_maintain (f->w, count), TLY_OK);
    if (commit) {
        assert_int_equal (mdb_txn_commit (txn), 0);
        f->n += count;
    }
    else
        mdb_txn_abort (txn);
    dx_writer_end (f->w, commit);
}

/*  A read snapshot and the index's view of it. */
static void
view_begin (fixture *f, MDB_txn **txn, dx_view *view)
{
    assert_int_equal (mdb_txn_begin (f->env, NULL, MDB_RDONLY, txn), 0);
    assert_int_equal (dx_view_load (&f->t, *txn, view), TLY_OK);
}

static void
view_end (MDB_txn *txn, dx_view *view)
{
    dx_view_free (view);
    mdb_txn_abort (txn);
}

/*  Every committed key found at its seq, keys never inserted (and the
    ones of aborted txns) not found, in a fresh read snapshot. */
static void
check_lookups (fixture *f)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    view_begin (f, &txn, &view);
    assert_int_equal (dx_view_sync (&f->t, txn, &view, f->n), TLY_OK);
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
    for (uint64_t s = 0; s < f->n; s++) {
        key_of (s, 0, key);
        assert_int_equal (dx_lookup (&f->t, txn, &view, key, &seq), TLY_OK);
        assert_int_equal (seq, s);
    }
    for (uint64_t s = f->n; s < f->n + 300; s++) {
        key_of (s, 0, key);
        assert_int_equal (dx_lookup (&f->t, txn, &view, key, &seq), TLY_ENOTFOUND);
        key_of (s, 1, key);
        assert_int_equal (dx_lookup (&f->t, txn, &view, key, &seq), TLY_ENOTFOUND);
    }
    view_end (txn, &view);
}

/*  All pending maintenance in one commit: then nothing is being built,
    no table is dead, and every key is found. */
static void
finish_all (fixture *f)
{
    MDB_txn *txn;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (dx_writer_begin (f->w, txn, f->n), TLY_OK);
    assert_int_equal (dx_writer_finish (f->w), TLY_OK);
    assert_int_equal (mdb_txn_commit (txn), 0);
    dx_writer_end (f->w, true);
    size_t builds, dead;
    dx_writer_backlog (f->w, &builds, &dead);
    assert_int_equal (builds, 0);
    assert_int_equal (dead, 0);
    check_lookups (f);
}

typedef struct {
    uint8_t *seen;
    uint64_t n;
} seen_ctx;

static int
seen_one (void *arg, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t seq)
{
    seen_ctx *c = arg;
    uint8_t want[TLY_DEDUP_LEN];
    assert_true (seq < c->n);
    key_of (seq, 0, want);
    assert_memory_equal (dedup, want, TLY_DEDUP_LEN);
    if (c->seen[seq] < 255)
        c->seen[seq]++;
    return TLY_OK;
}

/*  The entries whose keys are in runs (the rest are in L0). */
static uint64_t
covered (fixture *f)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    view_begin (f, &txn, &view);
    uint64_t c = view.covered;
    assert_true (c <= f->n);
    view_end (txn, &view);
    return c;
}

/*  One slice of a scan from pos (NULL: the start), in its own snapshot. */
static bool
scan_slice (fixture *f, seen_ctx *c, uint8_t pos[TLY_DEDUP_POS_LEN], bool started, size_t slice)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    bool done = false;
    view_begin (f, &txn, &view);
    assert_int_equal (dx_scan (&f->t, txn, &view, started ? pos : NULL, slice, seen_one, c,
                               pos, &done), TLY_OK);
    view_end (txn, &view);
    return done;
}

/*  A txn that only checkpoints, as tallyd's receipt actor does when it
    stops: the groups still filling are stored. */
static void
checkpoint (fixture *f)
{
    MDB_txn *txn;
    bool changed;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (dx_writer_begin (f->w, txn, f->n), TLY_OK);
    assert_int_equal (dx_writer_checkpoint (f->w, &changed), TLY_OK);
    assert_int_equal (mdb_txn_commit (txn), 0);
    dx_writer_end (f->w, true);
}

/*  What a snapshot's groups are: each names at most DX_GROUP_MAX runs of
    its tier, at least one of them visible (the writer deletes the rest);
    *grouped: visible runs in a group; *partial: groups not full. */
static size_t
groups_check (fixture *f, size_t *grouped, size_t *partial)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    view_begin (f, &txn, &view);
    assert_int_equal (view.malformed, 0);
    *grouped = *partial = 0;
    for (size_t g = 0; g < view.ng; g++) {
        assert_false (view.groups[g].bad);
        assert_true (view.groups[g].n <= DX_GROUP_MAX);
        *partial += view.groups[g].n < DX_GROUP_MAX;
    }
    for (size_t i = 0; i < view.n; i++)
        if (view.runs[i].group >= 0) {
            assert_int_equal (view.groups[view.runs[i].group].tier, view.runs[i].tier);
            (*grouped)++;
        }
    size_t ng = view.ng;
    view_end (txn, &view);
    return ng;
}

/*  Random commits and aborts, with a writer restart now and then and a
    scrubber scan running across them: a scan visits at least every record
    that was in a run when it started (a record a merge moved may be
    visited twice).  In the end, all maintenance done, one scan visits
    every record in a run exactly once, and only visible runs' tables hold
    records. */
/*  The size of the record of tier's build under way (0: none), and its
    table. */
static size_t
build_record (fixture *f, unsigned tier, uint32_t *slot)
{
    MDB_txn *txn;
    char key[12] = "dedup.build";
    key[11] = (char) ('0' + tier);
    MDB_val k = { sizeof key, key }, v;
    size_t size = 0;
    assert_int_equal (mdb_txn_begin (f->env, NULL, MDB_RDONLY, &txn), 0);
    if (mdb_get (txn, f->t.meta, &k, &v) == 0) {
        size = v.mv_size;
        memcpy (slot, (const uint8_t *) v.mv_data + 4, 4);
    }
    mdb_txn_abort (txn);
    return size;
}

/*  Whether a merge (a build of tier 1 or above) is under way. */
static bool
merge_under_way_now (fixture *f)
{
    uint32_t slot;
    for (unsigned j = 1; j < DX_TIERS; j++)
        if (build_record (f, j, &slot))
            return true;
    return false;
}

/*  Rewrites the records of builds under way as format 8 wrote them
    (version 1, no block size: one record per key); how many. */
static int
records_to_v1 (fixture *f)
{
    MDB_txn *txn;
    int n = 0;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    for (unsigned j = 0; j < DX_TIERS; j++) {
        char key[12] = "dedup.build";
        key[11] = (char) ('0' + j);
        MDB_val k = { sizeof key, key }, v;
        if (mdb_get (txn, f->t.meta, &k, &v))
            continue;
        uint8_t rec[48];
        uint32_t version = 1, block;
        assert_int_equal (v.mv_size, 52);
        memcpy (&block, (const uint8_t *) v.mv_data + 48, 4);
        assert_int_equal (block, 0);
        memcpy (rec, v.mv_data, sizeof rec);
        memcpy (rec, &version, 4);
        MDB_val nv = { sizeof rec, rec };
        assert_int_equal (mdb_put (txn, f->t.meta, &k, &nv, 0), 0);
        n++;
    }
    assert_int_equal (mdb_txn_commit (txn), 0);
    return n;
}

static void
model (fixture *f, uint64_t legacy_until)
{
    seen_ctx c = { .seen = calloc (KEYS_MAX, 1), .n = KEYS_MAX };
    uint8_t pos[TLY_DEDUP_POS_LEN];
    bool started = false;
    uint64_t scan_from = 0;         /* keys committed when the scan began */
    int aborts = 0, restarts = 0, scans = 0, mixed = 0, builds_v1 = 0, resumed_v1 = 0;
    int checkpoints = 0;
    uint32_t v1_slot[DX_TIERS];     /* tables of format-8 builds at the upgrade */
    bool check_v1 = false;
    f->t.legacy_layout = legacy_until > 0;
    for (int round = 1; f->n < KEYS_MAX - 200; round++) {
        uint64_t count = 1 + below (f, below (f, 4) ? 24 : 180);
        bool commit = below (f, 5) != 0;
        if (f->early && below (f, 8) == 0)
            early_end (f);
        if (!f->early && below (f, 3) == 0)
            early_begin (f);
        txn_round (f, count, commit);
        aborts += !commit;
        for (unsigned j = 0; j < DX_TIERS && check_v1; j++) {
            /*  The round after the upgrade: each format-8 build went on in
                its own table (its record unchanged), or ended in it. */
            uint32_t slot = DX_SLOTS;
            size_t size = build_record (f, j, &slot);
            if (v1_slot[j] < DX_SLOTS && !(size == 48 && slot == v1_slot[j])) {
                MDB_txn *txn;
                dx_view view = { 0 };
                bool published = false;
                view_begin (f, &txn, &view);
                for (size_t i = 0; i < view.n; i++)
                    published |= view.runs[i].slot == v1_slot[j] && !view.runs[i].packed;
                view_end (txn, &view);
                assert_true (published);
            }
            resumed_v1 += v1_slot[j] < DX_SLOTS && size == 48 && slot == v1_slot[j];
        }
        check_v1 = false;
        /*  At a moment a merge is under way, for it to go on in its own
            layout (a fixed count of keys found one only as long as the
            merges' pacing stayed as it was). */
        bool upgrade = f->t.legacy_layout && f->n >= legacy_until && merge_under_way_now (f);
        if (upgrade) {              /* as a format-8 ledger opened by this tallyd */
            f->t.legacy_layout = false;
            builds_v1 += records_to_v1 (f);
            for (unsigned j = 0; j < DX_TIERS; j++)
                if (build_record (f, j, &v1_slot[j]) != 48)
                    v1_slot[j] = DX_SLOTS;
            check_v1 = true;
        }
        if (upgrade || below (f, 60) == 0) {   /* a restart: the state is what is on disk */
            if (below (f, 2)) {     /* a clean stop: the groups filling are stored */
                checkpoint (f);
                checkpoints++;
            }
            dx_writer_destroy (&f->w);
            assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
            restarts++;
        }
        if (!started) {
            memset (c.seen, 0, KEYS_MAX);
            scan_from = covered (f);
        }
        bool done = scan_slice (f, &c, pos, started, 1 + (size_t) below (f, 300));
        started = !done;
        if (done) {
            for (uint64_t s = 0; s < scan_from; s++)
                assert_true (c.seen[s] >= 1);
            scans++;
        }
        if (round % 97 == 0) {
            check_lookups (f);
            MDB_txn *txn;
            dx_view view = { 0 };
            size_t packed = 0;
            view_begin (f, &txn, &view);
            for (size_t i = 0; i < view.n; i++)
                packed += view.runs[i].packed;
            mixed += packed > 0 && packed < view.n;
            assert_true (packed == 0 || !f->t.legacy_layout);
            view_end (txn, &view);
        }
    }
    assert_true (aborts > 0 && restarts > 0 && scans > 0 && checkpoints > 0);
    assert_true (f->found_early > 0 && f->found_after > 0);
    early_end (f);
    assert_true (legacy_until == 0 || mixed > 0);   /* both layouts read in one view */
    assert_true (legacy_until == 0 || (builds_v1 > 0 && resumed_v1 > 0));

    MDB_txn *txn;
    finish_all (f);
    memset (c.seen, 0, KEYS_MAX);
    assert_true (scan_slice (f, &c, pos, false, KEYS_MAX));
    uint64_t in_runs = covered (f);
    assert_true (f->n - in_runs < f->t.l0_max);
    assert_int_equal (dx_writer_l0_keys (f->w), f->n - in_runs);
    for (uint64_t s = 0; s < KEYS_MAX; s++)
        assert_int_equal (c.seen[s], s < in_runs);
    /*  finish_all checkpointed: every run of a tier that merges is in a
        stored group (each a merge's worth, or the one still filling). */
    size_t grouped, partial, ngroups = groups_check (f, &grouped, &partial);
    assert_true (ngroups > 0 && grouped > 0);

    dx_view view = { 0 };
    size_t used = 0;
    view_begin (f, &txn, &view);
    for (unsigned s = 0; s < DX_SLOTS; s++) {
        MDB_stat st;
        assert_int_equal (mdb_stat (txn, f->t.slot[s], &st), 0);
        used += st.ms_entries > 0;
    }
    assert_int_equal (used, view.n);
    print_message ("dedup model: %llu keys, %d aborted txns, %d restarts (%d after a "
                   "checkpoint), %d scans, %zu runs (%zu in %zu groups, %zu filling), "
                   "%d checks with both layouts; split lookups found %llu keys in an "
                   "earlier snapshot's runs, %llu after it\n", (unsigned long long) f->n, aborts,
                   restarts, checkpoints, scans, view.n, grouped, ngroups, partial, mixed,
                   (unsigned long long) f->found_early, (unsigned long long) f->found_after);
    view_end (txn, &view);
    free (c.seen);
}

/*  The split lookup step by step: a snapshot's runs are asked, then the
    writer skips exactly those.  Keys that were in L0 at the snapshot and
    are in a run now, and keys whose run was merged into a new one, are
    found by the writer; a key in a run the caller names is left to the
    caller. */
static void
test_dedup_lookup_split (void **state)
{
    fixture *f = *state;
    for (int i = 0; i < 3; i++) {           /* three runs of tier 0 */
        txn_round (f, 64, true);
        finish_all (f);
    }
    txn_round (f, 30, true);                /* in L0 */
    early_begin (f);
    assert_int_equal (f->early_n, 3);
    assert_int_equal (f->early_view.covered, 192);
    for (int i = 0; i < 6; i++) {           /* 9 runs: 8 merge into tier 1 */
        txn_round (f, 64, true);
        finish_all (f);
    }
    MDB_txn *txn, *now;
    dx_view view = { 0 };
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (dx_writer_begin (f->w, txn, f->n), TLY_OK);
    view_begin (f, &now, &view);
    uint32_t ids[DX_SLOTS];
    size_t n;
    assert_int_equal (dx_view_ids (&view, ids, &n), TLY_OK);
    for (size_t i = 0; i < f->early_n; i++)
        for (size_t j = 0; j < n; j++)
            assert_int_not_equal (f->early_ids[i], ids[j]);     /* all merged away */
    key_of (5, 0, key);                     /* in a run of the snapshot, merged since */
    assert_int_equal (dx_lookup_in (&f->t, f->early, &f->early_view, key, false, NULL, 0, &seq),
                      TLY_OK);
    assert_int_equal (seq, 5);
    assert_int_equal (dx_writer_lookup_in (f->w, key, f->early_ids, f->early_n, &seq), TLY_OK);
    assert_int_equal (seq, 5);
    assert_int_equal (dx_writer_lookup_in (f->w, key, ids, n, &seq), TLY_ENOTFOUND);
    key_of (200, 0, key);                   /* in L0 at the snapshot, in a run now */
    assert_int_equal (dx_lookup_in (&f->t, f->early, &f->early_view, key, false, NULL, 0, &seq),
                      TLY_ENOTFOUND);
    assert_int_equal (dx_lookup (&f->t, f->early, &f->early_view, key, &seq), TLY_ENOTFOUND);
    assert_int_equal (dx_writer_lookup_in (f->w, key, f->early_ids, f->early_n, &seq), TLY_OK);
    assert_int_equal (seq, 200);
    key_of (f->n, 0, key);                  /* in L0: appended in this txn */
    assert_int_equal (dx_writer_insert (f->w, key, f->n), TLY_OK);
    assert_int_equal (dx_writer_lookup_in (f->w, key, ids, n, &seq), TLY_OK);
    assert_int_equal (seq, f->n);
    key_of (3, 1, key);                     /* never inserted */
    assert_int_equal (dx_writer_lookup_in (f->w, key, f->early_ids, f->early_n, &seq),
                      TLY_ENOTFOUND);
    view_end (now, &view);
    mdb_txn_abort (txn);
    dx_writer_end (f->w, false);
    early_end (f);
}

static void
test_dedup_model (void **state)
{
    model (*state, 0);
}

/*  A ledger whose runs were written before format 9 (one record per key),
    opened by this version: its runs are read as they are, lookups, scans
    and merges take both layouts (a build under way at the upgrade goes on
    in its own), and the runs merged from then on are blocks. */
static void
test_dedup_model_from_legacy (void **state)
{
    model (*state, KEYS_MAX / 2);
}

/*  Commits as large as L0 or larger (a bulk import, tallyd's default
    group of up to 50,000 events): a flush ends in every commit, merges
    retire 8 tables at a time, and the pool of run tables must not fill
    up.  Visible runs, dead tables and L0 stay bounded throughout. */
static void
test_dedup_large_commits (void **state)
{
    fixture *f = *state;
    size_t max_runs = 0, max_dead = 0;
    for (int c = 0; c < 2500; c++) {
        txn_round (f, 64 + below (f, 137), true);
        size_t builds, dead;
        dx_writer_backlog (f->w, &builds, &dead);
        MDB_txn *txn;
        dx_view view = { 0 };
        view_begin (f, &txn, &view);
        max_runs = view.n > max_runs ? view.n : max_runs;
        max_dead = dead > max_dead ? dead : max_dead;
        view_end (txn, &view);
    }
    print_message ("large commits: %llu keys, at most %zu runs, %zu dead tables, %zu keys in L0\n",
                   (unsigned long long) f->n, max_runs, max_dead, f->max_l0);
    /*  Tiers 0 to 4 at 330k keys: at most 16 visible runs each. */
    assert_true (max_runs <= 5 * 16);
    assert_true (max_dead <= 3 * 8);
    /*  Each commit's maintenance flushes all of L0 (its l0_max - 1 keys
        from before and its own, up to 200). */
    assert_true (f->max_l0 < 64 + 200);
    check_lookups (f);
}

/*  The tier and table of the build that meta records for tier, or false. */
static bool
build_in_progress (fixture *f, unsigned tier, uint32_t *slot, uint64_t *total)
{
    MDB_txn *txn;
    char key[12] = "dedup.build";
    key[11] = (char) ('0' + tier);
    MDB_val k = { sizeof key, key }, v;
    assert_int_equal (mdb_txn_begin (f->env, NULL, MDB_RDONLY, &txn), 0);
    bool on = mdb_get (txn, f->t.meta, &k, &v) == 0;
    if (on) {
        assert_int_equal (v.mv_size, 16 + 4 * 8 + 4);
        memcpy (slot, (const uint8_t *) v.mv_data + 4, 4);
        memcpy (total, (const uint8_t *) v.mv_data + 8, 8);
    }
    mdb_txn_abort (txn);
    return on;
}

/*  A run table's records, in order, either layout: one per key (an
    8-byte seq) or blocks of 24-byte records (*block: records in the
    first; 0 for one per key). */
typedef struct {
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
} rec;

static size_t
table_read (fixture *f, uint32_t slot, rec **out, size_t *block)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    size_t n = 0, cap = 0;
    *out = NULL;
    *block = 0;
    assert_int_equal (mdb_txn_begin (f->env, NULL, MDB_RDONLY, &txn), 0);
    assert_int_equal (mdb_cursor_open (txn, f->t.slot[slot], &cur), 0);
    for (int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
        bool packed = v.mv_size != 8;
        size_t m = packed ? v.mv_size / 24 : 1;
        if (n == 0)
            *block = packed ? m : 0;
        for (size_t i = 0; i < m; i++) {
            if (n == cap)
                assert_non_null (*out = realloc (*out, (cap = cap * 2 + 64) * sizeof **out));
            const uint8_t *r = (const uint8_t *) v.mv_data + (packed ? i * 24 : 0);
            memcpy ((*out)[n].key, packed ? r : k.mv_data, TLY_DEDUP_LEN);
            memcpy (&(*out)[n++].seq, packed ? r + TLY_DEDUP_LEN : r, 8);
        }
    }
    mdb_cursor_close (cur);
    mdb_txn_abort (txn);
    return n;
}

/*  Replaces table slot's content by recs[0..n), in blocks of `block`
    records keyed by their last (0: one record per key), the first block
    of `first` records (0: block). */
static void
table_write_from (fixture *f, uint32_t slot, const rec *recs, size_t n, size_t block,
                  size_t first)
{
    MDB_txn *txn;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (mdb_drop (txn, f->t.slot[slot], 0), 0);
    for (size_t i = 0; i < n;) {
        size_t want = i == 0 && first ? first : block;
        size_t m = block ? (n - i < want ? n - i : want) : 1;
        uint8_t buf[80 * 24];
        MDB_val k = { TLY_DEDUP_LEN, (void *) recs[i + m - 1].key }, v = { 8, (void *) &recs[i].seq };
        if (block) {
            for (size_t j = 0; j < m; j++) {
                memcpy (buf + j * 24, recs[i + j].key, TLY_DEDUP_LEN);
                memcpy (buf + j * 24 + TLY_DEDUP_LEN, &recs[i + j].seq, 8);
            }
            v.mv_size = m * 24;
            v.mv_data = buf;
        }
        assert_int_equal (mdb_put (txn, f->t.slot[slot], &k, &v, 0), 0);
        i += m;
    }
    assert_int_equal (mdb_txn_commit (txn), 0);
}

static void
table_write (fixture *f, uint32_t slot, const rec *recs, size_t n, size_t block)
{
    table_write_from (f, slot, recs, n, block, 0);
}

static size_t
table_count (fixture *f, uint32_t slot)
{
    rec *recs;
    size_t block, n = table_read (f, slot, &recs, &block);
    free (recs);
    return n;
}

/*  Replaces the record at position `at` (from the first; SIZE_MAX: the
    last) of table slot with key/seq, keeping its layout. */
static void
tamper (fixture *f, uint32_t slot, size_t at, const uint8_t key[TLY_DEDUP_LEN], uint64_t seq)
{
    rec *recs;
    size_t block, n = table_read (f, slot, &recs, &block);
    assert_true (n > 0);
    at = at < n ? at : n - 1;
    memcpy (recs[at].key, key, TLY_DEDUP_LEN);
    recs[at].seq = seq;
    table_write (f, slot, recs, n, block);
    free (recs);
}

/*  Whether table slot holds a visible run. */
static bool
run_in (fixture *f, uint32_t slot)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    bool found = false;
    view_begin (f, &txn, &view);
    for (size_t i = 0; i < view.n; i++)
        found |= view.runs[i].slot == slot;
    view_end (txn, &view);
    return found;
}

/*  A writer restarted every 10 commits, as a tallyd restarted more often
    than a large merge takes (a tier-2 merge here takes about 90 commits):
    each build goes on from where the last writer left it (its table keeps
    growing across restarts), so merges finish and the runs stay bounded.
    Were builds started over at each restart, no merge here would ever
    finish and tier 0 would pile up until the pool of tables ran out.  (A
    resumed build refilters the keys it holds at 16 times its budget: a
    writer restarted after every commit would get nowhere either.) */
static void
test_dedup_resume_builds (void **state)
{
    fixture *f = *state;
    size_t max_runs = 0, resumed[2] = { 0 }, before[2] = { 0 };
    uint32_t top = 0, slot[2] = { 0 };
    bool was[2] = { false };        /* a build of tier j in slot[j] at the last restart */
    f->t.block_max = 4;             /* tables grow in blocks: see them grow */
    for (int c = 0; c < 1500; c++) {
        txn_round (f, 1 + below (f, 20), true);
        for (unsigned j = 0; j < 2; j++) {
            uint32_t now = 0;
            uint64_t total = 0;
            if (was[j] && build_in_progress (f, j, &now, &total) && now == slot[j]) {
                assert_true (table_count (f, slot[j]) > before[j]);     /* it went on */
                resumed[j]++;
            }
            else
            if (was[j] && run_in (f, slot[j]))
                resumed[j]++;       /* it went on and ended in this commit */
            was[j] = false;
        }
        if (c % 10 != 9)
            continue;
        for (unsigned j = 0; j < 2; j++) {
            uint64_t total = 0;
            if ((was[j] = build_in_progress (f, j, &slot[j], &total)))
                before[j] = table_count (f, slot[j]);
            was[j] = was[j] && before[j] > 0;
        }
        dx_writer_destroy (&f->w);
        assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
        MDB_txn *txn;
        dx_view view = { 0 };
        view_begin (f, &txn, &view);
        max_runs = view.n > max_runs ? view.n : max_runs;
        for (size_t i = 0; i < view.n; i++)
            top = view.runs[i].tier > top ? view.runs[i].tier : top;
        view_end (txn, &view);
    }
    print_message ("restart every 10 commits: %llu keys, %zu flushes and %zu merges resumed, "
                   "at most %zu runs, top tier %u\n", (unsigned long long) f->n, resumed[0],
                   resumed[1], max_runs, top);
    assert_true (resumed[0] > 5 && resumed[1] > 10);
    assert_true (top >= 2);         /* 15,000 keys / 64 per flush: tiers 0-2 */
    assert_true (max_runs <= 3 * 16);
    check_lookups (f);
}

/*  Small commits until a tier-1 merge has written more than `least`
    keys; its table. */
static uint32_t
merge_under_way (fixture *f, size_t least)
{
    uint32_t slot = 0;
    uint64_t total = 0;
    int c = 0;
    for (; c < 3000 && !(build_in_progress (f, 1, &slot, &total) && table_count (f, slot) > least); c++)
        txn_round (f, 1 + below (f, 8), true);
    assert_true (c < 3000);
    return slot;
}

/*  A build's table that does not hold what its record says (here: its
    first key replaced behind the writer's back) is not resumed: the
    build is dropped, its table emptied, and a new build of the same runs
    makes the index whole again.  The first txns that drop it abort: the
    record is back, so the next one must load the state again and drop it
    again, not go on as if it were gone. */
static void
test_dedup_resume_refuses_foreign (void **state)
{
    fixture *f = *state;
    uint32_t slot = merge_under_way (f, 2);
    dx_writer_destroy (&f->w);
    MDB_txn *txn;
    uint8_t key[TLY_DEDUP_LEN] = { 0 };     /* the lowest key: below every key there */
    tamper (f, slot, 0, key, 0);
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    for (int i = 0; i < 2; i++)
        txn_round (f, 1 + below (f, 20), false);
    for (int i = 0; i < 200; i++)
        txn_round (f, 1 + below (f, 20), true);
    finish_all (f);
    uint64_t found;
    dx_view view = { 0 };
    view_begin (f, &txn, &view);
    assert_int_equal (dx_view_sync (&f->t, txn, &view, f->n), TLY_OK);
    assert_int_equal (dx_lookup (&f->t, txn, &view, key, &found), TLY_ENOTFOUND);
    view_end (txn, &view);
}

/*  Commits of 50 keys until a flush of L0 (l0_max 4096, 31 commits a
    flush) is under way with more than `least` keys in its table, then the
    writer goes away; returns the table. */
static uint32_t
flush_under_way (fixture *f, size_t least)
{
    uint32_t slot = 0;
    uint64_t total = 0;
    f->t.l0_max = 4096;
    dx_writer_destroy (&f->w);
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    int c = 0;
    for (; c < 400 && !(build_in_progress (f, 0, &slot, &total) && table_count (f, slot) > least);
         c++)
        txn_round (f, 50, true);
    assert_true (c < 400);
    dx_writer_destroy (&f->w);
    return slot;
}

/*  A flush's table that ends in a key of its own (the writer would append
    L0's next keys behind it), holds a wrong record deeper than one
    commit's refill reaches: the build is not resumed, or dropped when the
    refill gets there; commits go on without an error, and all maintenance
    done, the index holds every key once and none of the foreign ones. */
static void
test_dedup_resume_checks_flush (void **state)
{
    fixture *f = *state;
    uint8_t high[TLY_DEDUP_LEN];
    memset (high, 0xff, sizeof high);
    uint32_t slot = flush_under_way (f, 2600);       /* more than a commit refills */
    tamper (f, slot, SIZE_MAX, high, 7);            /* its last key after all of L0's */
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    for (int i = 0; i < 40; i++)
        txn_round (f, 50, true);

    slot = flush_under_way (f, 2600);
    uint8_t key[TLY_DEDUP_LEN];
    uint64_t seq;
    {
        /*  Record 2400 keeps its key but names another entry. */
        rec *recs;
        size_t block;
        assert_true (table_read (f, slot, &recs, &block) > 2400);
        memcpy (key, recs[2400].key, TLY_DEDUP_LEN);
        seq = recs[2400].seq;
        free (recs);
    }
    tamper (f, slot, 2400, key, seq + 1);
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    for (int i = 0; i < 40; i++)
        txn_round (f, 50, true);
    finish_all (f);
    MDB_txn *txn;
    dx_view view = { 0 };
    uint64_t found;
    view_begin (f, &txn, &view);
    assert_int_equal (dx_view_sync (&f->t, txn, &view, f->n), TLY_OK);
    assert_int_equal (dx_lookup (&f->t, txn, &view, high, &found), TLY_ENOTFOUND);
    assert_int_equal (dx_lookup (&f->t, txn, &view, key, &found), TLY_OK);
    assert_int_equal (found, seq);
    view_end (txn, &view);
}

/*  A merge's table whose records are right as far as they go, but fewer
    than its blocks promise (the first block one short, the record its
    count says is last missing), or more (the first block twice the
    build's block size): the refill runs out of records, or ends before
    the table's last key, and the build is dropped and made again, instead
    of waiting forever for records or publishing a count it never had. */
static void
test_dedup_resume_checks_count (void **state)
{
    fixture *f = *state;
    for (int more = 0; more < 2; more++) {
        size_t size = more ? 4 : 80;
        f->t.block_max = size;
        dx_writer_destroy (&f->w);
        assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
        uint32_t slot = merge_under_way (f, 160);
        dx_writer_destroy (&f->w);
        rec *recs;
        size_t block, n = table_read (f, slot, &recs, &block);
        assert_int_equal (block, size);
        if (more)
            table_write_from (f, slot, recs, n, size, 2 * size);
        else
            table_write_from (f, slot, recs, n - 1, size, size - 1);
        free (recs);
        assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
        for (int i = 0; i < 20; i++)
            txn_round (f, 1 + below (f, 8), true);
        finish_all (f);
    }
}

/*  The map fills while a flush writes a block: that maintenance fails,
    and so does any more asked for in the same txn (it must not add to the
    block whose put failed: it has no room); after the abort, with room
    again, the writer takes the flush up from what was committed. */
static void
test_dedup_map_full (void **state)
{
    fixture *f = *state;
    f->t.l0_max = 4096;
    dx_writer_destroy (&f->w);
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    uint32_t slot;
    uint64_t total;
    for (int c = 0; c < 100 && !build_in_progress (f, 0, &slot, &total); c++)
        txn_round (f, 50, true);
    assert_true (build_in_progress (f, 0, &slot, &total));
    assert_int_equal (mdb_env_set_mapsize (f->env, 1), 0);     /* as small as it can be */
    MDB_txn *txn;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (dx_writer_begin (f->w, txn, f->n), TLY_OK);
    assert_int_equal (dx_writer_finish (f->w), TLY_ETOOLARGE);
    /*  LMDB refuses every write of this txn now; these used to add a
        record to the full block first, past its end. */
    assert_int_not_equal (dx_writer_maintain (f->w, 100), TLY_OK);
    assert_int_not_equal (dx_writer_finish (f->w), TLY_OK);
    mdb_txn_abort (txn);
    dx_writer_end (f->w, false);
    assert_int_equal (mdb_env_set_mapsize (f->env, (size_t) 1 << 28), 0);
    finish_all (f);
}

/*  A merge whose input holds a malformed record fails its commit with
    TLY_ECORRUPT (and only fails it: no cursor closed twice). */
static void
test_dedup_merge_bad_input (void **state)
{
    fixture *f = *state;
    merge_under_way (f, 2);
    MDB_txn *txn;
    dx_view view = { 0 };
    view_begin (f, &txn, &view);
    uint32_t in = DX_SLOTS;
    for (size_t i = 0; i < view.n && in == DX_SLOTS; i++)
        if (view.runs[i].tier == 0)
            in = view.runs[i].slot;     /* the oldest tier-0 run: an input */
    view_end (txn, &view);
    assert_true (in < DX_SLOTS);
    MDB_cursor *cur;
    MDB_val k, v;
    uint32_t short_seq = 1;
    /*  Every record of it: whichever the merge reads next is bad. */
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (mdb_cursor_open (txn, f->t.slot[in], &cur), 0);
    for (int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
        MDB_val sv = { sizeof short_seq, &short_seq };
        assert_int_equal (mdb_cursor_put (cur, &k, &sv, MDB_CURRENT), 0);
    }
    mdb_cursor_close (cur);
    assert_int_equal (mdb_txn_commit (txn), 0);
    int failed = 0;
    for (int i = 0; i < 50; i++) {
        assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
        assert_int_equal (dx_writer_begin (f->w, txn, f->n), TLY_OK);
        int err = dx_writer_maintain (f->w, 100);
        failed += err == TLY_ECORRUPT;
        mdb_txn_abort (txn);
        dx_writer_end (f->w, false);
    }
    assert_true (failed > 0);
}

/*  Rewrites table slot as recs[4..n) in blocks of 80, then two blocks
    of two records each, a[] and b[], keyed by ka and kb: the lookups'
    invariants broken on purpose. */
static void
blocks_put (fixture *f, uint32_t slot, const rec *recs, size_t n, const rec a[2],
            const uint8_t *ka, const rec b[2], const uint8_t *kb)
{
    table_write (f, slot, recs + 4, n - 4, 80);
    MDB_txn *txn;
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    for (int i = 0; i < 2; i++) {
        const rec *r = i ? b : a;
        uint8_t buf[2 * 24];
        for (int j = 0; j < 2; j++) {
            memcpy (buf + j * 24, r[j].key, TLY_DEDUP_LEN);
            memcpy (buf + j * 24 + TLY_DEDUP_LEN, &r[j].seq, 8);
        }
        MDB_val k = { TLY_DEDUP_LEN, (void *) (i ? kb : ka) }, v = { sizeof buf, buf };
        assert_int_equal (mdb_put (txn, f->t.slot[slot], &k, &v, 0), 0);
    }
    assert_int_equal (mdb_txn_commit (txn), 0);
}

static int
count_one (void *arg, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t seq)
{
    (void) dedup;
    (void) seq;
    ++*(size_t *) arg;
    return TLY_OK;
}

static int
scan_all (fixture *f, size_t *visited)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    uint8_t pos[TLY_DEDUP_POS_LEN];
    bool done;
    *visited = 0;
    view_begin (f, &txn, &view);
    int err = dx_scan (&f->t, txn, &view, NULL, SIZE_MAX, count_one, visited, pos, &done);
    view_end (txn, &view);
    return err;
}

/*  The scrubber's way: `slice` records a call, each resumed from the
    position the call before it left. */
static int
scan_sliced (fixture *f, size_t slice, size_t *visited)
{
    uint8_t pos[TLY_DEDUP_POS_LEN];
    bool started = false, done = false;
    int err = TLY_OK;
    *visited = 0;
    while (!err && !done) {
        MDB_txn *txn;
        dx_view view = { 0 };
        view_begin (f, &txn, &view);
        err = dx_scan (&f->t, txn, &view, started ? pos : NULL, slice, count_one, visited,
                       pos, &done);
        view_end (txn, &view);
        started = true;
    }
    return err;
}

/*  A lookup finds a key in the first block whose last key is not below
    it, so the scrubber's scan must report what would hide keys: a block
    not keyed by its last record, or one whose keys are not above those of
    the block before.  An intact table scans clean, records and all. */
static void
test_dedup_scan_checks_blocks (void **state)
{
    fixture *f = *state;
    for (int i = 0; i < 300; i++)
        txn_round (f, 20, true);
    finish_all (f);
    MDB_txn *txn;
    dx_view view = { 0 };
    view_begin (f, &txn, &view);
    dx_run run = view.runs[0];
    for (size_t i = 1; i < view.n; i++)
        run = view.runs[i].count > run.count ? view.runs[i] : run;
    view_end (txn, &view);
    assert_true (run.packed && run.count > 200);
    MDB_stat st;
    assert_int_equal (mdb_txn_begin (f->env, NULL, MDB_RDONLY, &txn), 0);
    assert_int_equal (mdb_stat (txn, f->t.slot[run.slot], &st), 0);
    mdb_txn_abort (txn);
    assert_int_equal (st.ms_overflow_pages, 0);     /* two blocks a page, none beside */
    if (st.ms_psize == 4096)                        /* two blocks of 80 a page */
        assert_int_equal (st.ms_leaf_pages, (run.count + 159) / 160);
    else
        assert_true (st.ms_leaf_pages <= (run.count + 159) / 160);
    rec *recs;
    size_t block, n = table_read (f, run.slot, &recs, &block), visited;
    assert_int_equal (n, run.count);
    assert_int_equal (block, 80);
    assert_int_equal (scan_all (f, &visited), TLY_OK);
    size_t all = visited;

    /*  The first 4 records as two blocks of two: well formed. */
    rec a[2] = { recs[0], recs[1] }, b[2] = { recs[2], recs[3] };
    blocks_put (f, run.slot, recs, n, a, recs[1].key, b, recs[3].key);
    assert_int_equal (scan_all (f, &visited), TLY_OK);
    assert_int_equal (visited, all);
    assert_int_equal (scan_sliced (f, 1, &visited), TLY_OK);
    assert_int_equal (visited, all);

    /*  The first block keyed by a key that is not its last record. */
    uint8_t off[TLY_DEDUP_LEN];
    memcpy (off, recs[1].key, sizeof off);
    off[TLY_DEDUP_LEN - 1] ^= 1;
    blocks_put (f, run.slot, recs, n, a, off, b, recs[3].key);
    assert_int_equal (scan_all (f, &visited), TLY_ECORRUPT);

    /*  Each block sorted and keyed by its last, but the second's first
        key below the first's last: a lookup of recs[1] would look in the
        first block only, and miss it. */
    rec a2[2] = { recs[0], recs[2] }, b2[2] = { recs[1], recs[3] };
    blocks_put (f, run.slot, recs, n, a2, recs[2].key, b2, recs[3].key);
    assert_int_equal (scan_all (f, &visited), TLY_ECORRUPT);
    assert_int_equal (scan_sliced (f, 1, &visited), TLY_ECORRUPT);
    /*  Also when a pass resumes at the first block's last key (the table
        changed since the slice before): the next record, the second
        block's first, is below where it resumed. */
    uint8_t pos[TLY_DEDUP_POS_LEN], last[TLY_DEDUP_POS_LEN];
    pos[0] = (uint8_t) (run.id >> 24), pos[1] = (uint8_t) (run.id >> 16);
    pos[2] = (uint8_t) (run.id >> 8), pos[3] = (uint8_t) run.id;
    memcpy (pos + 4, recs[2].key, TLY_DEDUP_LEN);
    bool done;
    view_begin (f, &txn, &view);
    assert_int_equal (dx_scan (&f->t, txn, &view, pos, SIZE_MAX, count_one, &visited, last,
                               &done), TLY_ECORRUPT);
    view_end (txn, &view);

    /*  A block whose records are out of order. */
    rec a3[2] = { recs[1], recs[0] };
    blocks_put (f, run.slot, recs, n, a3, recs[0].key, b, recs[3].key);
    assert_int_equal (scan_all (f, &visited), TLY_ECORRUPT);
    free (recs);
}

/*  The stored group with the lowest id: its record copied into *rec
    (malloc'd), and its id. */
static uint32_t
first_group (fixture *f, uint8_t **rec, size_t *size)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    assert_int_equal (mdb_txn_begin (f->env, NULL, MDB_RDONLY, &txn), 0);
    assert_int_equal (mdb_cursor_open (txn, f->t.groups, &cur), 0);
    assert_int_equal (mdb_cursor_get (cur, &k, &v, MDB_FIRST), 0);
    assert_int_equal (k.mv_size, 4);
    const uint8_t *p = k.mv_data;
    uint32_t id = (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
    *size = v.mv_size;
    *rec = malloc (v.mv_size);
    memcpy (*rec, v.mv_data, v.mv_size);
    mdb_cursor_close (cur);
    mdb_txn_abort (txn);
    return id;
}

static void
group_put (fixture *f, const void *key, size_t klen, const void *rec, size_t size)
{
    MDB_txn *txn;
    MDB_val k = { klen, (void *) key }, v = { size, (void *) rec };
    assert_int_equal (mdb_txn_begin (f->env, NULL, 0, &txn), 0);
    assert_int_equal (mdb_put (txn, f->t.groups, &k, &v, 0), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
}

/*  One scrubber pass over the runs in one snapshot: its verdict. */
static int
scan_verdict (fixture *f, size_t *malformed)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    seen_ctx c = { .seen = calloc (f->n + 1, 1), .n = f->n + 1 };
    uint8_t pos[TLY_DEDUP_POS_LEN];
    bool done;
    view_begin (f, &txn, &view);
    *malformed = view.malformed;
    int err = dx_scan (&f->t, txn, &view, NULL, f->n + 1, seen_one, &c, pos, &done);
    view_end (txn, &view);
    free (c.seen);
    return err;
}

/*  The stored group of tier 0 with the highest id, if it is not full:
    its id and members. */
static uint32_t partial_nblocks, full_nblocks;     /* of the last partial_group seen */

static bool
partial_group (fixture *f, uint32_t *id, uint32_t *n)
{
    MDB_txn *txn;
    dx_view view = { 0 };
    bool found = false;
    view_begin (f, &txn, &view);
    for (size_t g = view.ng; g-- > 0 && !found;)
        if (view.groups[g].tier == 0) {
            found = view.groups[g].n < DX_GROUP_MAX;
            *id = view.groups[g].id;
            *n = view.groups[g].n;
            partial_nblocks = view.groups[g].nblocks;
            break;
        }
    for (size_t g = 0; g < view.ng; g++)
        if (view.groups[g].tier == 0 && view.groups[g].n == DX_GROUP_MAX)
            full_nblocks = view.groups[g].nblocks;
    view_end (txn, &view);
    return found;
}

/*  Runs in no group, in a snapshot. */
static size_t
lone_runs (fixture *f)
{
    size_t grouped, partial, n;
    MDB_txn *txn;
    dx_view view = { 0 };
    groups_check (f, &grouped, &partial);
    view_begin (f, &txn, &view);
    n = view.n;
    view_end (txn, &view);
    return n - grouped;
}

/*  Groups: eight tier-0 runs make a full group, stored; a group still
    filling is stored by a checkpoint and goes on serving the runs it
    names after a restart, while the next writer starts a new group; a
    restart without a checkpoint leaves the runs since the last one in no
    group.  A group filter that lost bits, or a record that does not
    parse, fails the scrubber's pass; the next writer deletes the latter.
    Commits of l0_max keys: each flushes one run of exactly l0_max. */
static void
test_dedup_groups (void **state)
{
    fixture *f = *state;
    size_t grouped, partial, malformed;
    uint32_t id0, n0, id1, n1;
    while (groups_check (f, &grouped, &partial) == 0)
        txn_round (f, f->t.l0_max, true);
    assert_int_equal (partial, 0);
    assert_int_equal (grouped, DX_GROUP_MAX);
    assert_int_equal (lone_runs (f), 0);
    check_lookups (f);
    assert_int_equal (scan_verdict (f, &malformed), TLY_OK);

    /*  Two runs into a new group: filling in the writer's memory only
        (a reader sees them in none), until a checkpoint stores it. */
    txn_round (f, f->t.l0_max, true);
    txn_round (f, f->t.l0_max, true);
    assert_false (partial_group (f, &id0, &n0));
    assert_true (lone_runs (f) >= 2);
    checkpoint (f);
    assert_true (partial_group (f, &id0, &n0));
    assert_int_equal (n0, 2);
    /*  Stored folded to what its 2 runs need: a quarter of a full one. */
    assert_int_equal (partial_nblocks * 4, full_nblocks);
    dx_writer_destroy (&f->w);
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    txn_round (f, f->t.l0_max, true);
    checkpoint (f);                 /* a new group: the stored one stays as it was */
    assert_true (partial_group (f, &id1, &n1));
    assert_true (id1 > id0);
    assert_int_equal (n1, 1);
    assert_int_equal (lone_runs (f), 0);
    check_lookups (f);

    /*  A restart without a checkpoint: the run since is in no group
        (asked on its own); every key is still found. */
    txn_round (f, f->t.l0_max, true);
    dx_writer_destroy (&f->w);
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    for (int i = 0; i < 4; i++)
        txn_round (f, 16, true);
    assert_true (lone_runs (f) >= 2);       /* that run, the one since (and a merge's) */
    check_lookups (f);
    assert_int_equal (scan_verdict (f, &malformed), TLY_OK);

    /*  A group's filter loses its bits: the scrubber says so. */
    uint8_t *rec;
    size_t size;
    uint32_t id = first_group (f, &rec, &size);
    uint8_t key[4] = { (uint8_t) (id >> 24), (uint8_t) (id >> 16), (uint8_t) (id >> 8),
                       (uint8_t) id };
    uint8_t *zeroed = calloc (1, size);
    memcpy (zeroed, rec, 64);
    group_put (f, key, 4, zeroed, size);
    assert_int_equal (scan_verdict (f, &malformed), TLY_ECORRUPT);
    group_put (f, key, 4, rec, size);
    assert_int_equal (scan_verdict (f, &malformed), TLY_OK);
    /*  A record that does not parse: ignored by lookups, reported by the
        scrubber, deleted by the next writer. */
    group_put (f, "zz", 2, rec, size);
    assert_int_equal (scan_verdict (f, &malformed), TLY_ECORRUPT);
    assert_int_equal (malformed, 1);
    check_lookups (f);
    dx_writer_destroy (&f->w);
    assert_int_equal (dx_writer_new (&f->t, &f->w), TLY_OK);
    txn_round (f, 16, true);
    assert_int_equal (scan_verdict (f, &malformed), TLY_OK);
    assert_int_equal (malformed, 0);
    free (zeroed);
    free (rec);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown (test_dedup_model, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_lookup_split, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_model_from_legacy, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_scan_checks_blocks, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_large_commits, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_resume_builds, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_resume_refuses_foreign, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_resume_checks_flush, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_resume_checks_count, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_merge_bad_input, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_map_full, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_groups, setup, teardown),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
