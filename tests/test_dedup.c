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
    f->t.key_of = log_key;
    f->t.key_ctx = f;
    f->rng = 42;
    if (dx_writer_new (&f->t, &f->w))
        return -1;
    *state = f;
    return 0;
}

static int
teardown (void **state)
{
    fixture *f = *state;
    dx_writer_destroy (&f->w);
    mdb_env_close (f->env);
    char cmd[128];
    snprintf (cmd, sizeof cmd, "rm -rf %s", f->dir);
    if (system (cmd)) { /* best effort */ }
    free (f);
    return 0;
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
        assert_int_equal (dx_writer_lookup (f->w, key, &seq), TLY_ENOTFOUND);
        assert_int_equal (dx_writer_insert (f->w, key, s), TLY_OK);
        assert_int_equal (dx_writer_insert (f->w, key, s), TLY_EEXIST);
        if (f->n) {
            uint64_t old = below (f, f->n);
            key_of (old, 0, key);
            assert_int_equal (dx_writer_lookup (f->w, key, &seq), TLY_OK);
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

/*  Random commits and aborts, with a writer restart now and then and a
    scrubber scan running across them: a scan visits at least every record
    that was in a run when it started (a record a merge moved may be
    visited twice).  In the end, all maintenance done, one scan visits
    every record in a run exactly once, and only visible runs' tables hold
    records. */
static void
test_dedup_model (void **state)
{
    fixture *f = *state;
    seen_ctx c = { .seen = calloc (KEYS_MAX, 1), .n = KEYS_MAX };
    uint8_t pos[TLY_DEDUP_POS_LEN];
    bool started = false;
    uint64_t scan_from = 0;         /* keys committed when the scan began */
    int aborts = 0, restarts = 0, scans = 0;
    for (int round = 1; f->n < KEYS_MAX - 200; round++) {
        uint64_t count = 1 + below (f, below (f, 4) ? 24 : 180);
        bool commit = below (f, 5) != 0;
        txn_round (f, count, commit);
        aborts += !commit;
        if (below (f, 60) == 0) {   /* a restart: the state is what is on disk */
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
        if (round % 97 == 0)
            check_lookups (f);
    }
    assert_true (aborts > 0 && restarts > 0 && scans > 0);

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
    memset (c.seen, 0, KEYS_MAX);
    assert_true (scan_slice (f, &c, pos, false, KEYS_MAX));
    uint64_t in_runs = covered (f);
    assert_true (f->n - in_runs < f->t.l0_max);
    assert_int_equal (dx_writer_l0_keys (f->w), f->n - in_runs);
    for (uint64_t s = 0; s < KEYS_MAX; s++)
        assert_int_equal (c.seen[s], s < in_runs);

    dx_view view = { 0 };
    size_t used = 0;
    view_begin (f, &txn, &view);
    for (unsigned s = 0; s < DX_SLOTS; s++) {
        MDB_stat st;
        assert_int_equal (mdb_stat (txn, f->t.slot[s], &st), 0);
        used += st.ms_entries > 0;
    }
    assert_int_equal (used, view.n);
    print_message ("dedup model: %llu keys, %d aborted txns, %d restarts, %d scans, %zu runs\n",
                   (unsigned long long) f->n, aborts, restarts, scans, view.n);
    view_end (txn, &view);
    free (c.seen);
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

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown (test_dedup_model, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_large_commits, setup, teardown),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
