/*  test_store.c -- the LMDB ledger: append, commit, abort, reopen, reads at
    any historical size, and refusing a ledger whose head does not match;
    the LSM dedup index (L0, runs, Bloom filters, merges) with a tiny L0. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <lmdb.h>
#include <sodium.h>
#include "tally/event.h"
#include "tally/store.h"

typedef struct {
    char dir[64];
    uint8_t pk[TLY_PK_LEN], sk[TLY_SK_LEN];
} fixture;

static int
setup (void **state)
{
    fixture *f = calloc (1, sizeof *f);
    strcpy (f->dir, "/tmp/tally-test-store-XXXXXX");
    if (!mkdtemp (f->dir))
        return -1;
    if (sodium_init () < 0)
        return -1;
    crypto_sign_keypair (f->pk, f->sk);
    *state = f;
    return 0;
}

static int
teardown (void **state)
{
    fixture *f = *state;
    char cmd[128];
    snprintf (cmd, sizeof cmd, "rm -rf %s", f->dir);
    if (system (cmd)) { /* best effort */ }
    free (f);
    return 0;
}

/*  Appends n events keyed "k<i>" for customer c, committing once. */
static void
append_n (tly_writer *w, tly_store *s, const fixture *f, int from, int n, tly_sth *sth)
{
    assert_int_equal (tly_writer_begin (w), TLY_OK);
    for (int i = from; i < from + n; i++) {
        char key[16];
        snprintf (key, sizeof key, "k%d", i);
        tly_event ev = { .customer = { "c", 1 }, .meter = { "m", 1 },
                         .key = { key, (uint32_t) strlen (key) }, .qty = (uint64_t) i, .ts = 1 };
        tly_buf tail, leaf;
        tly_buf_init (&tail);
        tly_buf_init (&leaf);
        assert_int_equal (tly_event_encode_tail (&ev, &tail), TLY_OK);
        uint64_t seq = tly_writer_next_seq (w);
        assert_int_equal (tly_leaf_encode (seq, 5, "usage", tail.data, tail.len, &leaf), TLY_OK);
        uint8_t dedup[TLY_DEDUP_LEN], hash[32], want[32];
        tly_store_dedup_hash (s, &ev.customer, &ev.key, dedup);
        assert_int_equal (tly_writer_append (w, leaf.data, leaf.len, dedup, hash), TLY_OK);
        tly_merkle_leaf_hash (leaf.data, leaf.len, want);
        assert_memory_equal (hash, want, 32);
        /*  Appending the same key again is refused by the index. */
        assert_int_equal (tly_writer_append (w, leaf.data, leaf.len, dedup, hash), TLY_EEXIST);
        tly_buf_free (&tail);
        tly_buf_free (&leaf);
    }
    const char *why = NULL;
    assert_int_equal (tly_writer_commit (w, f->sk, sth, &why), TLY_OK);
}

static void
test_append_commit_read (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    assert_int_equal (tly_writer_open (s, f->pk, &w, &why), TLY_OK);
    tly_sth heads[4];
    append_n (w, s, f, 0, 1, &heads[0]);
    append_n (w, s, f, 1, 6, &heads[1]);
    append_n (w, s, f, 7, 33, &heads[2]);
    assert_int_equal (heads[2].tree_size, 40);
    assert_int_equal (tly_sth_verify (&heads[2], f->pk), TLY_OK);

    tly_reader *r;
    assert_int_equal (tly_reader_new (s, &r), TLY_OK);
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_reader_size (r), 40);
    for (int i = 0; i < 3; i++) {
        tly_sth got;
        uint8_t root[32];
        assert_int_equal (tly_reader_sth (r, heads[i].tree_size, &got), TLY_OK);
        assert_memory_equal (&got, &heads[i], sizeof got);
        /*  The stored nodes rebuild every historical root. */
        assert_int_equal (tly_merkle_root (tly_reader_node, r, NULL, heads[i].tree_size, root),
                          TLY_OK);
        assert_memory_equal (root, heads[i].root, 32);
    }
    tly_sth latest;
    assert_int_equal (tly_reader_sth (r, UINT64_MAX, &latest), TLY_OK);
    assert_int_equal (latest.tree_size, 40);
    assert_int_equal (tly_reader_sth (r, 39, &latest), TLY_ENOTFOUND);

    uint8_t dedup[TLY_DEDUP_LEN];
    uint64_t seq;
    tly_store_dedup_hash (s, &(tly_str) { "c", 1 }, &(tly_str) { "k17", 3 }, dedup);
    assert_int_equal (tly_reader_lookup (r, dedup, &seq), TLY_OK);
    assert_int_equal (seq, 17);
    const uint8_t *leaf;
    size_t len;
    tly_entry e;
    assert_int_equal (tly_reader_leaf (r, 17, &leaf, &len), TLY_OK);
    assert_int_equal (tly_leaf_decode (leaf, len, &e, NULL), TLY_OK);
    assert_int_equal (e.seq, 17);
    assert_int_equal (e.ev.qty, 17);
    assert_int_equal (tly_reader_leaf (r, 40, &leaf, &len), TLY_ENOTFOUND);
    /*  ("c","k17") and ("ck","17") must not share a dedup key. */
    uint8_t other[TLY_DEDUP_LEN];
    tly_store_dedup_hash (s, &(tly_str) { "ck", 2 }, &(tly_str) { "17", 2 }, other);
    assert_memory_not_equal (dedup, other, TLY_DEDUP_LEN);
    tly_reader_end (r);

    /*  Abort drops a whole group, including its Merkle state. */
    assert_int_equal (tly_writer_begin (w), TLY_OK);
    tly_buf leafb;
    tly_buf_init (&leafb);
    tly_leaf_encode (40, 5, "usage", (const uint8_t *) "\xa1x\xa1m\xa1k\x01\x01\x80", 10, &leafb);
    uint8_t d2[TLY_DEDUP_LEN] = { 1 }, h[32];
    assert_int_equal (tly_writer_append (w, leafb.data, leafb.len, d2, h), TLY_OK);
    assert_int_equal (tly_writer_next_seq (w), 41);
    tly_writer_abort (w);
    assert_int_equal (tly_writer_next_seq (w), 40);
    tly_buf_free (&leafb);
    append_n (w, s, f, 40, 2, &heads[3]);
    assert_int_equal (heads[3].tree_size, 42);

    tly_reader_destroy (&r);
    tly_writer_destroy (&w);
    tly_store_close (&s);

    /*  Reopen: same head, same dedup key, appends continue. */
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    assert_int_equal (tly_writer_open (s, f->pk, &w, &why), TLY_OK);
    assert_int_equal (tly_writer_next_seq (w), 42);
    assert_memory_equal (tly_writer_sth (w), &heads[3], sizeof heads[3]);
    uint8_t again[TLY_DEDUP_LEN];
    tly_store_dedup_hash (s, &(tly_str) { "c", 1 }, &(tly_str) { "k17", 3 }, again);
    assert_memory_equal (dedup, again, TLY_DEDUP_LEN);
    tly_writer_destroy (&w);

    /*  Another key cannot open the ledger: the head does not verify. */
    uint8_t pk2[TLY_PK_LEN], sk2[TLY_SK_LEN];
    crypto_sign_keypair (pk2, sk2);
    assert_int_equal (tly_writer_open (s, pk2, &w, &why), TLY_ECORRUPT);
    assert_non_null (why);
    tly_store_close (&s);
}

static void
test_empty_store (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    assert_int_equal (tly_writer_open (s, f->pk, &w, &why), TLY_OK);
    assert_int_equal (tly_writer_next_seq (w), 0);
    tly_sth sth;
    assert_int_equal (tly_writer_begin (w), TLY_OK);
    assert_int_equal (tly_writer_commit (w, f->sk, &sth, &why), TLY_OK);
    uint8_t empty[32];
    tly_merkle_empty_root (empty);
    assert_int_equal (sth.tree_size, 0);
    assert_memory_equal (sth.root, empty, 32);
    assert_int_equal (tly_sth_verify (&sth, f->pk), TLY_OK);
    tly_writer_destroy (&w);
    tly_store_close (&s);
    assert_int_equal (tly_store_open ("/proc/no/such/dir", 1 << 26, &s, &why), TLY_EIO);
}

/* ---- the dedup index as an LSM tree, with a tiny L0 ---- */

#define LSM_L0    512
#define LSM_KEYS  50000

static void
dedup_of (tly_store *s, char prefix, int i, uint8_t out[TLY_DEDUP_LEN])
{
    char key[16];
    snprintf (key, sizeof key, "%c%d", prefix, i);
    tly_store_dedup_hash (s, &(tly_str) { "c", 1 }, &(tly_str) { key, (uint32_t) strlen (key) },
                          out);
}

/*  Appends key "k<i>" as the next entry (seq == i when keys go in order). */
static int
append_key (tly_writer *w, tly_store *s, int i)
{
    char key[16];
    snprintf (key, sizeof key, "k%d", i);
    tly_event ev = { .customer = { "c", 1 }, .meter = { "m", 1 },
                     .key = { key, (uint32_t) strlen (key) }, .qty = 1, .ts = 1 };
    tly_buf tail, leaf;
    tly_buf_init (&tail);
    tly_buf_init (&leaf);
    assert_int_equal (tly_event_encode_tail (&ev, &tail), TLY_OK);
    assert_int_equal (tly_leaf_encode (tly_writer_next_seq (w), 5, "usage", tail.data, tail.len,
                                       &leaf), TLY_OK);
    uint8_t dedup[TLY_DEDUP_LEN], hash[32];
    dedup_of (s, 'k', i, dedup);
    int rc = tly_writer_append (w, leaf.data, leaf.len, dedup, hash);
    tly_buf_free (&tail);
    tly_buf_free (&leaf);
    return rc;
}

/*  Every key k0..k<n-1> is found at its seq by the reader (fresh snapshot)
    and by the writer (inside a txn that is then aborted). */
static void
check_all_found (tly_store *s, tly_writer *w, tly_reader *r, int n)
{
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_writer_begin (w), TLY_OK);
    for (int i = 0; i < n; i++) {
        uint8_t d[TLY_DEDUP_LEN];
        uint64_t seq = UINT64_MAX;
        dedup_of (s, 'k', i, d);
        assert_int_equal (tly_reader_lookup (r, d, &seq), TLY_OK);
        assert_int_equal (seq, (uint64_t) i);
        seq = UINT64_MAX;
        assert_int_equal (tly_writer_lookup (w, d, &seq), TLY_OK);
        assert_int_equal (seq, (uint64_t) i);
    }
    tly_writer_abort (w);
    tly_reader_end (r);
}

typedef struct {
    uint8_t *seen;
    tly_store *store;
    uint64_t n, visits;
} scan_ctx;

static int
scan_one (void *arg, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t seq)
{
    scan_ctx *c = arg;
    uint8_t want[TLY_DEDUP_LEN];
    assert_true (seq < c->n);
    dedup_of (c->store, 'k', (int) seq, want);
    assert_memory_equal (dedup, want, TLY_DEDUP_LEN);
    c->seen[seq]++;
    c->visits++;
    return TLY_OK;
}

/*  Scans the whole index in slices; returns the scan's status.  Every
    entry whose key is in a run (not in L0, which is not stored) is
    visited, once; *visits is how many there are. */
static int
scan_all (tly_store *s, tly_reader *r, uint64_t n, size_t slice, uint64_t *visits)
{
    scan_ctx c = { .seen = calloc (n ? n : 1, 1), .store = s, .n = n };
    uint8_t pos[TLY_DEDUP_POS_LEN];
    bool started = false, done = false;
    int rc = TLY_OK;
    tly_dedup_shape shape;
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_reader_dedup_shape (r, &shape), TLY_OK);
    uint64_t in_runs = shape.in_runs;
    assert_true (in_runs <= n);
    while (!done && !rc) {
        rc = tly_reader_dedup_scan (r, started ? pos : NULL, slice, scan_one, &c, pos, &done);
        started = true;
    }
    tly_reader_end (r);
    if (!rc) {
        for (uint64_t i = 0; i < n; i++)
            assert_int_equal (c.seen[i], i < in_runs);
        assert_int_equal (c.visits, in_runs);
    }
    *visits = c.visits;
    free (c.seen);
    return rc;
}

static size_t
live_runs (tly_reader *r)
{
    tly_dedup_shape shape;
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_reader_dedup_shape (r, &shape), TLY_OK);
    tly_reader_end (r);
    return shape.runs;
}

/*  The ledger's LMDB env opened directly (to damage it on purpose), with a
    write txn begun. */
static void
raw_ledger_begin (fixture *f, size_t map_size, MDB_env **env, MDB_txn **txn)
{
    char path[128];
    snprintf (path, sizeof path, "%s/ledger", f->dir);
    assert_int_equal (mdb_env_create (env), 0);
    assert_int_equal (mdb_env_set_maxdbs (*env, 8), 0);
    assert_int_equal (mdb_env_set_mapsize (*env, map_size), 0);
    assert_int_equal (mdb_env_open (*env, path, MDB_NOTLS, 0644), 0);
    assert_int_equal (mdb_txn_begin (*env, NULL, 0, txn), 0);
}

/*  A store with a tiny L0, its writer and a reader. */
static void
open_lsm (fixture *f, size_t l0, tly_store **s, tly_writer **w, tly_reader **r)
{
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, s, &why), TLY_OK);
    tly_store_set_l0_max (*s, l0);
    assert_int_equal (tly_writer_open (*s, f->pk, w, &why), TLY_OK);
    assert_int_equal (tly_reader_new (*s, r), TLY_OK);
}

static void
close_lsm (tly_store **s, tly_writer **w, tly_reader **r)
{
    tly_reader_destroy (r);
    tly_writer_destroy (w);
    tly_store_close (s);
}

static void
test_dedup_lsm (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 28, &s, &why), TLY_OK);
    tly_store_set_l0_max (s, LSM_L0);
    assert_int_equal (tly_writer_open (s, f->pk, &w, &why), TLY_OK);
    assert_int_equal (tly_reader_new (s, &r), TLY_OK);

    /*  Commits of varying size: L0 fills over several commits, flushes,
        and runs merge through several tiers (8 * 8 flushes of ~512). */
    int n = 0;
    size_t max_runs = 0;
    for (int c = 0; n < LSM_KEYS; c++) {
        int group = 50 + (c * 137) % 700;
        if (n + group > LSM_KEYS)
            group = LSM_KEYS - n;
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        for (int i = 0; i < group; i++, n++) {
            assert_int_equal (append_key (w, s, n), TLY_OK);
            /*  In L0, in this txn: refused. */
            assert_int_equal (append_key (w, s, n), TLY_EEXIST);
        }
        /*  Keys in older runs: refused too (not only L0's NOOVERWRITE). */
        assert_int_equal (append_key (w, s, (c * 7919) % n), TLY_EEXIST);
        assert_int_equal (append_key (w, s, 0), TLY_EEXIST);
        assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
        size_t runs = live_runs (r);
        if (runs > max_runs)
            max_runs = runs;
    }
    /*  50000 / 512 ~ 97 flushes: tiers 0, 1 and 2 merged; a bounded list. */
    size_t runs_now = live_runs (r);
    assert_true (runs_now >= 2);
    assert_true (max_runs <= 3 * 8);
    check_all_found (s, w, r, n);

    /*  Every key in every run is refused, wherever it lives now. */
    assert_int_equal (tly_writer_begin (w), TLY_OK);
    for (int i = 0; i < n; i += 97)
        assert_int_equal (append_key (w, s, i), TLY_EEXIST);
    tly_writer_abort (w);

    /*  Absent keys are not found, and the filters keep probes rare. */
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    int absent = 20000;
    for (int i = 0; i < absent; i++) {
        uint8_t d[TLY_DEDUP_LEN];
        uint64_t seq;
        dedup_of (s, 'x', i, d);
        assert_int_equal (tly_reader_lookup (r, d, &seq), TLY_ENOTFOUND);
    }
    tly_dedup_shape shape;
    assert_int_equal (tly_reader_dedup_shape (r, &shape), TLY_OK);
    size_t runs = shape.runs;
    uint64_t probes = shape.probes;
    double fp = (double) probes / ((double) absent * (double) runs);
    print_message ("dedup LSM: %zu runs (max %zu), false-positive rate per run %.4f\n",
                   runs, max_runs, fp);
    assert_true (fp < 0.02);
    tly_reader_end (r);

    /*  The scrubber's scan visits every stored record exactly once. */
    uint64_t visits;
    assert_int_equal (scan_all (s, r, (uint64_t) n, 777, &visits), TLY_OK);
    assert_true (visits > 0 && visits <= (uint64_t) n);
    assert_int_equal (scan_all (s, r, (uint64_t) n, 1, &visits), TLY_OK);

    /*  Abort after a flush (and whatever merge it triggers): nothing
        changed. */
    assert_int_equal (tly_writer_begin (w), TLY_OK);
    for (int i = 0; i < 8 * LSM_L0; i++)
        assert_int_equal (append_key (w, s, n + i), TLY_OK);
    assert_int_equal (tly_writer_compact (w), TLY_OK);
    /*  Inside the txn, the new layout answers. */
    for (int i = 0; i < n + 8 * LSM_L0; i += 13) {
        uint8_t d[TLY_DEDUP_LEN];
        uint64_t seq;
        dedup_of (s, 'k', i, d);
        assert_int_equal (tly_writer_lookup (w, d, &seq), TLY_OK);
        assert_int_equal (seq, (uint64_t) i);
    }
    assert_int_equal (append_key (w, s, n + 5), TLY_EEXIST);
    tly_writer_abort (w);
    assert_int_equal (tly_writer_next_seq (w), (uint64_t) n);
    assert_int_equal (live_runs (r), runs_now);
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    for (int i = 0; i < 8 * LSM_L0; i++) {
        uint8_t d[TLY_DEDUP_LEN];
        uint64_t seq;
        dedup_of (s, 'k', n + i, d);
        assert_int_equal (tly_reader_lookup (r, d, &seq), TLY_ENOTFOUND);
    }
    tly_reader_end (r);
    assert_int_equal (scan_all (s, r, (uint64_t) n, 5000, &visits), TLY_OK);
    assert_true (visits > 0 && visits <= (uint64_t) n);
    check_all_found (s, w, r, n);

    /*  Reopen: everything is found, and appends (and merges) go on. */
    tly_reader_destroy (&r);
    tly_writer_destroy (&w);
    tly_store_close (&s);
    assert_int_equal (tly_store_open (f->dir, 1 << 28, &s, &why), TLY_OK);
    tly_store_set_l0_max (s, LSM_L0);
    assert_int_equal (tly_writer_open (s, f->pk, &w, &why), TLY_OK);
    assert_int_equal (tly_reader_new (s, &r), TLY_OK);
    check_all_found (s, w, r, n);
    for (int c = 0; c < 10; c++) {
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        for (int i = 0; i < 600; i++, n++)
            assert_int_equal (append_key (w, s, n), TLY_OK);
        assert_int_equal (append_key (w, s, 3), TLY_EEXIST);
        assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
    }
    check_all_found (s, w, r, n);
    assert_int_equal (scan_all (s, r, (uint64_t) n, 4096, &visits), TLY_OK);
    assert_true (visits > 0 && visits <= (uint64_t) n);
    tly_reader_destroy (&r);
    tly_writer_destroy (&w);
    tly_store_close (&s);

    /*  A flipped-off Bloom filter would hide its run's keys from lookups:
        the scrubber's scan must report it. */
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi blooms;
    raw_ledger_begin (f, 1 << 28, &env, &txn);
    assert_int_equal (mdb_dbi_open (txn, "blooms", 0, &blooms), 0);
    MDB_cursor *cur;
    MDB_val k, v;
    assert_int_equal (mdb_cursor_open (txn, blooms, &cur), 0);
    assert_int_equal (mdb_cursor_get (cur, &k, &v, MDB_FIRST), 0);
    uint8_t *zeroed = calloc (1, v.mv_size);
    memcpy (zeroed, v.mv_data, 16);             /* keep the header */
    uint8_t key[4];
    memcpy (key, k.mv_data, 4);
    MDB_val k2 = { 4, key }, v2 = { v.mv_size, zeroed };
    mdb_cursor_close (cur);
    assert_int_equal (mdb_put (txn, blooms, &k2, &v2, 0), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);
    free (zeroed);
    assert_int_equal (tly_store_open (f->dir, 1 << 28, &s, &why), TLY_OK);
    assert_int_equal (tly_reader_new (s, &r), TLY_OK);
    assert_int_equal (scan_all (s, r, (uint64_t) n, 1000, &visits), TLY_ECORRUPT);
    tly_reader_destroy (&r);
    tly_store_close (&s);
}

/*  `commits` commits of `per` new keys each, from key *n on. */
static void
commit_keys (fixture *f, tly_store *s, tly_writer *w, int *n, int commits, int per)
{
    const char *why = NULL;
    for (int c = 0; c < commits; c++) {
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        for (int i = 0; i < per; i++, (*n)++)
            assert_int_equal (append_key (w, s, *n), TLY_OK);
        assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
    }
}

/*  With the smallest L0: 7 runs of tier 0, then a txn that flushes an
    eighth and merges all 8 is aborted: the 7 runs are still there, and
    inside the txn the merged run already answers. */
static void
test_dedup_abort_merge (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    const char *why = NULL;
    open_lsm (f, 16, &s, &w, &r);
    int n = 0;
    commit_keys (f, s, w, &n, 7, 16);
    assert_int_equal (live_runs (r), 7);
    check_all_found (s, w, r, n);

    assert_int_equal (tly_writer_begin (w), TLY_OK);
    for (int i = 0; i < 16; i++)
        assert_int_equal (append_key (w, s, n + i), TLY_OK);
    assert_int_equal (tly_writer_compact (w), TLY_OK);
    for (int i = 0; i < n + 16; i++) {
        uint8_t d[TLY_DEDUP_LEN];
        uint64_t seq;
        dedup_of (s, 'k', i, d);
        assert_int_equal (tly_writer_lookup (w, d, &seq), TLY_OK);
        assert_int_equal (seq, (uint64_t) i);
        assert_int_equal (append_key (w, s, i), TLY_EEXIST);
    }
    /*  A reader in the meantime still sees the old layout. */
    assert_int_equal (live_runs (r), 7);
    tly_writer_abort (w);

    assert_int_equal (live_runs (r), 7);
    check_all_found (s, w, r, n);
    uint64_t visits;
    assert_int_equal (scan_all (s, r, (uint64_t) n, 10, &visits), TLY_OK);
    assert_true (visits > 0 && visits <= (uint64_t) n);

    /*  The same work committed: the merge of the 8 runs takes a slice of
        each later commit; at every commit every key is found in exactly
        one visible place; in the end one run of 128 keys. */
    assert_int_equal (tly_writer_begin (w), TLY_OK);
    for (int i = 0; i < 16; i++, n++)
        assert_int_equal (append_key (w, s, n), TLY_OK);
    assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
    assert_int_equal (live_runs (r), 8);
    bool saw_build = false;
    for (int c = 0; c < 100; c++) {
        size_t builds, dead;
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        assert_int_equal (append_key (w, s, n++), TLY_OK);
        assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
        check_all_found (s, w, r, n);
        assert_int_equal (scan_all (s, r, (uint64_t) n, 10, &visits), TLY_OK);
        assert_true (visits > 0 && visits <= (uint64_t) n);
        tly_writer_dedup_backlog (w, &builds, &dead);
        saw_build |= builds > 0;
        if (!builds && !dead)
            break;
    }
    assert_true (saw_build);
    assert_int_equal (live_runs (r), 1);
    tly_reader_destroy (&r);
    tly_writer_destroy (&w);
    tly_store_close (&s);
}

/*  Commits of 16 keys (budget 2 * 16 + 32 per job: a 512-key merge takes
    several commits) until a merge is under way; n: keys appended. */
static void
commit_until_merging (fixture *f, tly_store *s, tly_writer *w, tly_reader *r, int *n,
                      size_t *builds, size_t *dead)
{
    const char *why = NULL;
    *builds = *dead = 0;
    for (int c = 0; c < 200; c++) {
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        for (int i = 0; i < 16; i++, (*n)++)
            assert_int_equal (append_key (w, s, *n), TLY_OK);
        assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
        tly_writer_dedup_backlog (w, builds, dead);
        if (live_runs (r) >= 8 && *builds > 0)
            break;
    }
    assert_true (*builds > 0);
}

/*  Checkpoints alone, with no appends between them (tallyd at rest, and
    at its stop), keep the slice of maintenance each one does: a merge
    under way ends, and every key is still found. */
static void
test_dedup_checkpoints_keep_maintenance (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    const char *why = NULL;
    open_lsm (f, 64, &s, &w, &r);
    int n = 0;
    size_t builds, dead;
    commit_until_merging (f, s, w, r, &n, &builds, &dead);
    /*  The backlog as a new txn sees it: an aborted txn's writer has
        forgotten its builds until the next begin loads them again. */
    for (int c = 0; c < 1000 && (builds || dead); c++) {
        assert_int_equal (tly_writer_checkpoint (w, &why), TLY_OK);
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        tly_writer_dedup_backlog (w, &builds, &dead);
        tly_writer_abort (w);
    }
    assert_int_equal (builds, 0);
    assert_int_equal (dead, 0);
    check_all_found (s, w, r, n);
    tly_reader_destroy (&r);
    tly_writer_destroy (&w);
    tly_store_close (&s);
}

/*  Commits until a merge is half done, then the writer goes away (as in
    a crash: the state is what the last commit left).  Reopened, every key
    is found, the half-built run goes on from where it stopped (its build
    resumed, its table kept, not emptied as dead) and ends. */
static void
test_dedup_restart_mid_merge (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    const char *why = NULL;
    open_lsm (f, 64, &s, &w, &r);
    int n = 0;
    size_t builds, dead;
    commit_until_merging (f, s, w, r, &n, &builds, &dead);
    close_lsm (&s, &w, &r);
    open_lsm (f, 64, &s, &w, &r);
    check_all_found (s, w, r, n);
    uint64_t visits;
    assert_int_equal (scan_all (s, r, (uint64_t) n, 7, &visits), TLY_OK);
    assert_true (visits > 0 && visits <= (uint64_t) n);
    /*  The begin in check_all_found loaded the state: the builds that
        were under way still are, and none of their tables is dead. */
    size_t builds_before = builds, dead_before = dead;
    tly_writer_dedup_backlog (w, &builds, &dead);
    assert_int_equal (builds, builds_before);
    assert_true (dead <= dead_before);
    for (int c = 0; c < 200; c++) {
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        assert_int_equal (append_key (w, s, n++), TLY_OK);
        assert_int_equal (append_key (w, s, 1), TLY_EEXIST);
        assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
        tly_writer_dedup_backlog (w, &builds, &dead);
        if (!builds && !dead)
            break;
    }
    assert_int_equal (builds, 0);
    assert_int_equal (dead, 0);
    check_all_found (s, w, r, n);
    assert_int_equal (scan_all (s, r, (uint64_t) n, 100, &visits), TLY_OK);
    assert_true (visits > 0 && visits <= (uint64_t) n);
    tly_reader_destroy (&r);
    tly_writer_destroy (&w);
    tly_store_close (&s);
}

/*  A format-5 ledger kept L0 in two tables, "dedup" and "dedup.1", and
    "dedup.state" said which took inserts.  Such a ledger, made here by
    hand from a format-6 one (its L0 keys split across both tables, as
    after a switch), opens: it becomes format 9, the two tables are gone,
    every key is found where it was, and appends and merges go on. */
static void
test_migrate_format_5 (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    const char *why = NULL;
    open_lsm (f, 64, &s, &w, &r);
    int n = 0;
    commit_keys (f, s, w, &n, 31, 20);      /* 4 commits a flush: 60 keys stay in L0 */
    tly_dedup_shape shape;
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_reader_dedup_shape (r, &shape), TLY_OK);
    tly_reader_end (r);
    size_t runs = shape.runs;
    uint64_t in_runs = shape.in_runs;
    assert_true (runs > 0 && in_runs > 0 && in_runs + 10 < (uint64_t) n);
    uint8_t (*keys)[TLY_DEDUP_LEN] = calloc ((size_t) n, TLY_DEDUP_LEN);
    for (int i = 0; i < n; i++)
        dedup_of (s, 'k', i, keys[i]);
    close_lsm (&s, &w, &r);

    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi meta, l0[2];
    raw_ledger_begin (f, 1 << 26, &env, &txn);
    assert_int_equal (mdb_dbi_open (txn, "meta", 0, &meta), 0);
    assert_int_equal (mdb_dbi_open (txn, "dedup", MDB_CREATE, &l0[0]), 0);
    assert_int_equal (mdb_dbi_open (txn, "dedup.1", MDB_CREATE, &l0[1]), 0);
    uint64_t half = in_runs + ((uint64_t) n - in_runs) / 2;
    for (uint64_t seq = in_runs; seq < (uint64_t) n; seq++) {
        MDB_val k = { TLY_DEDUP_LEN, keys[seq] }, v = { 8, &seq };
        assert_int_equal (mdb_put (txn, l0[seq >= half], &k, &v, 0), 0);
    }
    uint32_t old_state[2] = { 2, 1 };
    MDB_val sk = { 11, "dedup.state" }, sv = { sizeof old_state, old_state };
    MDB_val fk = { 6, "format" }, fv = { 1, "5" };
    assert_int_equal (mdb_put (txn, meta, &sk, &sv, 0), 0);
    assert_int_equal (mdb_put (txn, meta, &fk, &fv, 0), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);
    free (keys);

    open_lsm (f, 64, &s, &w, &r);
    check_all_found (s, w, r, n);
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_reader_dedup_shape (r, &shape), TLY_OK);
    tly_reader_end (r);
    assert_int_equal (shape.in_runs, in_runs);
    for (int c = 0; c < 20; c++) {
        assert_int_equal (tly_writer_begin (w), TLY_OK);
        for (int i = 0; i < 23; i++, n++)
            assert_int_equal (append_key (w, s, n), TLY_OK);
        assert_int_equal (append_key (w, s, (int) in_runs + 3), TLY_EEXIST);
        assert_int_equal (tly_writer_commit (w, f->sk, NULL, &why), TLY_OK);
    }
    check_all_found (s, w, r, n);
    uint64_t visits;
    assert_int_equal (scan_all (s, r, (uint64_t) n, 50, &visits), TLY_OK);
    assert_true (visits > in_runs);
    close_lsm (&s, &w, &r);

    raw_ledger_begin (f, 1 << 26, &env, &txn);
    MDB_dbi gone;
    assert_int_equal (mdb_dbi_open (txn, "meta", 0, &meta), 0);
    assert_int_equal (mdb_get (txn, meta, &fk, &fv), 0);
    assert_int_equal (fv.mv_size, 1);
    assert_memory_equal (fv.mv_data, "9", 1);
    assert_int_equal (mdb_dbi_open (txn, "dedup", 0, &gone), MDB_NOTFOUND);
    assert_int_equal (mdb_dbi_open (txn, "dedup.1", 0, &gone), MDB_NOTFOUND);
    mdb_txn_abort (txn);
    mdb_env_close (env);
}

/*  meta "dedup.state" says which entries the runs hold; a flipped bit
    there would take keys out of the index (duplicates accepted) or put
    them in two places.  It must agree with the runs' counts: readers (so
    the scrubber's scan) and the writer refuse it. */
static void
test_covered_checked (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    open_lsm (f, 64, &s, &w, &r);
    int n = 0;
    commit_keys (f, s, w, &n, 10, 30);
    uint64_t visits;
    assert_int_equal (scan_all (s, r, (uint64_t) n, 50, &visits), TLY_OK);
    close_lsm (&s, &w, &r);

    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi meta;
    raw_ledger_begin (f, 1 << 26, &env, &txn);
    assert_int_equal (mdb_dbi_open (txn, "meta", 0, &meta), 0);
    MDB_val k = { 11, "dedup.state" }, v;
    assert_int_equal (mdb_get (txn, meta, &k, &v), 0);
    assert_int_equal (v.mv_size, 16);
    uint8_t state16[16];
    memcpy (state16, v.mv_data, 16);
    state16[8] ^= 0x04;             /* covered +- 4 */
    v.mv_data = state16;
    assert_int_equal (mdb_put (txn, meta, &k, &v, 0), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);

    open_lsm (f, 64, &s, &w, &r);
    uint8_t pos[TLY_DEDUP_POS_LEN], d[TLY_DEDUP_LEN];
    bool done = false;
    uint64_t seq;
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_reader_dedup_scan (r, NULL, 100, scan_one, NULL, pos, &done),
                      TLY_ECORRUPT);
    dedup_of (s, 'k', 3, d);
    assert_int_equal (tly_reader_lookup (r, d, &seq), TLY_ECORRUPT);
    tly_reader_end (r);
    assert_int_equal (tly_writer_begin (w), TLY_ECORRUPT);
    close_lsm (&s, &w, &r);
}

/*  Sets meta's entry name in the ledger in f->dir to value, or deletes
    it (value NULL). */
static void
set_meta (fixture *f, const char *name, const char *value)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi meta;
    raw_ledger_begin (f, 1 << 26, &env, &txn);
    assert_int_equal (mdb_dbi_open (txn, "meta", 0, &meta), 0);
    MDB_val k = { strlen (name), (void *) name };
    MDB_val v = { value ? strlen (value) : 0, (void *) value };
    assert_int_equal (value ? mdb_put (txn, meta, &k, &v, 0) : mdb_del (txn, meta, &k, NULL), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);
}

/*  Meta's entry name in the ledger in f->dir, which must be size bytes. */
static void
get_meta (fixture *f, const char *name, void *out, size_t size)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi meta;
    MDB_val k = { strlen (name), (void *) name }, v;
    raw_ledger_begin (f, 1 << 26, &env, &txn);
    assert_int_equal (mdb_dbi_open (txn, "meta", 0, &meta), 0);
    assert_int_equal (mdb_get (txn, meta, &k, &v), 0);
    assert_int_equal (v.mv_size, size);
    memcpy (out, v.mv_data, size);
    mdb_txn_abort (txn);
    mdb_env_close (env);
}

/*  The dedup key of a pair is BLAKE2b-128 keyed with meta/dedup_key of
    (customer length, 4 bytes big-endian) || customer || key: the index
    of every ledger already written holds these bytes, so the formula must
    never change.  Pairs at the protocol's limits and beyond them. */
static void
test_dedup_hash_formula (void **state)
{
    fixture *f = *state;
    const char *why = NULL;
    tly_store *s;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    tly_store_close (&s);
    uint8_t key[32];
    get_meta (f, "dedup_key", key, sizeof key);

    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    static const uint32_t lens[][2] = { { 0, 0 }, { 1, 3 }, { 8, 36 }, { 60, 60 },
                                        { TLY_CUSTOMER_MAX, TLY_KEY_MAX },
                                        { TLY_CUSTOMER_MAX + 1, 2 }, { 5, TLY_KEY_MAX + 1 },
                                        { 300, 700 } };
    char text[1000];
    for (size_t i = 0; i < sizeof text; i++)
        text[i] = (char) ('a' + i % 26);
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
        tly_str c = { text, lens[i][0] }, kk = { text + 1, lens[i][1] };
        uint8_t msg[4 + 1000], want[TLY_DEDUP_LEN], got[TLY_DEDUP_LEN];
        msg[0] = (uint8_t) (c.len >> 24);
        msg[1] = (uint8_t) (c.len >> 16);
        msg[2] = (uint8_t) (c.len >> 8);
        msg[3] = (uint8_t) c.len;
        memcpy (msg + 4, c.ptr, c.len);
        memcpy (msg + 4 + c.len, kk.ptr, kk.len);
        assert_int_equal (crypto_generichash (want, sizeof want, msg, 4 + c.len + kk.len,
                                              key, sizeof key), 0);
        tly_store_dedup_hash (s, &c, &kk, got);
        assert_memory_equal (got, want, sizeof want);
    }
    tly_store_close (&s);
}

/*  The ledger's format digit. */
static char
format_now (fixture *f)
{
    char digit;
    get_meta (f, "format", &digit, 1);
    return digit;
}

/*  Opening the store in f->dir fails with err, and why names `needle`. */
static void
expect_refused (fixture *f, int err, const char *needle)
{
    tly_store *s = NULL;
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), err);
    assert_null (s);
    assert_non_null (why);
    if (!strstr (why, needle))
        fprintf (stderr, "refused, but why does not name \"%s\": %s\n", needle, why);
    assert_non_null (strstr (why, needle));
}

/*  Format-6 to -8 ledgers open as format 9 (they only lack build records,
    sealed heads and runs in blocks); a format-1 ledger (single-table dedup
    index) and one of a format from a newer tallyd are refused, clearly. */
static void
test_format_6_to_8_and_10 (void **state)
{
    fixture *f = *state;
    tly_store *s;
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    tly_store_close (&s);
    assert_int_equal (format_now (f), '9');
    for (const char *old = "678"; *old; old++) {
        char digit[2] = { *old, 0 };
        set_meta (f, "format", digit);
        assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
        tly_store_close (&s);
        assert_int_equal (format_now (f), '9');
    }
    /*  Formats it does not read, then format numbers that are malformed. */
    static const struct { const char *format; int err; } refused[] = {
        { "1", TLY_EINVAL }, { "10", TLY_EINVAL }, { "999", TLY_EINVAL },
        { ":", TLY_ECORRUPT }, { "09", TLY_ECORRUPT }, { "", TLY_ECORRUPT },
        { "1000", TLY_ECORRUPT } };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        set_meta (f, "format", refused[i].format);
        expect_refused (f, refused[i].err, "format");
    }
    /*  A ledger with a format but no dedup key is not a new one, and the
        message names what is wrong: the key, or the format when that is
        malformed too. */
    set_meta (f, "format", "9");
    set_meta (f, "dedup_key", NULL);
    expect_refused (f, TLY_ECORRUPT, "meta/dedup_key is missing");
    assert_int_equal (format_now (f), '9');         /* left as it was */
    set_meta (f, "format", "x");
    expect_refused (f, TLY_ECORRUPT, "meta/format is malformed");
    /*  A newer tallyd's format without the key: newer, not corrupt. */
    set_meta (f, "format", "10");
    expect_refused (f, TLY_EINVAL, "newer");
}

/*  A dedup key without a format is refused too, not taken as new. */
static void
test_format_missing (void **state)
{
    fixture *f = *state;
    tly_store *s;
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    tly_store_close (&s);
    set_meta (f, "format", NULL);
    expect_refused (f, TLY_ECORRUPT, "meta/format is missing");
}

/*  A ledger without format and dedup key is a new one only while it has
    no entries: with entries, a fresh key would file every (customer, key)
    elsewhere and take their retries as new events. */
static void
test_meta_lost_with_entries (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    const char *why = NULL;
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    tly_store_close (&s);
    set_meta (f, "format", NULL);           /* empty: still a new ledger */
    set_meta (f, "dedup_key", NULL);
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    assert_int_equal (tly_writer_open (s, f->pk, &w, &why), TLY_OK);
    tly_sth sth;
    append_n (w, s, f, 0, 5, &sth);
    tly_writer_destroy (&w);
    tly_store_close (&s);
    assert_int_equal (format_now (f), '9');
    set_meta (f, "format", NULL);
    set_meta (f, "dedup_key", NULL);
    expect_refused (f, TLY_ECORRUPT, "entries");
}

/*  What a tree walk passed: leaves as (0, seq), nodes as (level, index),
    in order, each with its bytes' hash or node; a NULL as all-zero. */
typedef struct {
    tly_reader *r;
    size_t n, cap;
    struct { unsigned level; uint64_t index; uint8_t v[32]; bool null; } *item;
    size_t stop_at;             /* return TLY_EINVAL at this item (0: never) */
} walk_log;

static int
walk_add (walk_log *w, unsigned level, uint64_t index, const uint8_t *v, size_t len)
{
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 256;
        w->item = realloc (w->item, w->cap * sizeof *w->item);
        assert_non_null (w->item);
    }
    memset (&w->item[w->n], 0, sizeof *w->item);      /* padding too: compared whole */
    w->item[w->n].level = level;
    w->item[w->n].index = index;
    w->item[w->n].null = v == NULL;
    if (v && level == 0)
        tly_merkle_leaf_hash (v, len, w->item[w->n].v);
    else
    if (v)
        memcpy (w->item[w->n].v, v, 32);
    return ++w->n == w->stop_at ? TLY_EINVAL : TLY_OK;
}

static int
walk_leaf (void *ctx, uint64_t seq, const uint8_t *leaf, size_t len)
{
    return walk_add (ctx, 0, seq, leaf, len);
}

static int
walk_node (void *ctx, unsigned level, uint64_t index, const uint8_t *node)
{
    return walk_add (ctx, level, index, node, 32);
}

/*  The walk passes every leaf in order, each followed by exactly the nodes
    it completed (node (l, i) right after leaf ((i + 1) << l) - 1), with
    the values tly_reader_node reads; in slices from any leaf it passes the
    same; a missing node comes as NULL at its place; a callback's error
    stops it. */
static void
test_tree_walk (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    const char *why = NULL;
    enum { N = 1000 };
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    assert_int_equal (tly_writer_open (s, f->pk, &w, &why), TLY_OK);
    tly_sth sth;
    append_n (w, s, f, 0, 1, &sth);
    append_n (w, s, f, 1, 300, &sth);
    append_n (w, s, f, 301, N - 301, &sth);
    assert_int_equal (tly_reader_new (s, &r), TLY_OK);
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    walk_log all = { .r = r };
    uint64_t next = 0;
    assert_int_equal (tly_reader_tree_walk (r, 0, N, SIZE_MAX, walk_leaf, walk_node, &all, &next),
                      TLY_OK);
    assert_int_equal (next, N);
    size_t at = 0;
    for (uint64_t m = 0; m < N; m++) {
        uint8_t h[32];
        assert_int_equal (all.item[at].level, 0);
        assert_int_equal (all.item[at].index, m);
        assert_int_equal (tly_reader_node (r, 0, m, h), TLY_OK);
        assert_memory_equal (all.item[at].v, h, 32);
        at++;
        for (unsigned l = 1; (m >> (l - 1)) & 1; l++, at++) {
            assert_int_equal (all.item[at].level, l);
            assert_int_equal (all.item[at].index, m >> l);
            assert_false (all.item[at].null);
            assert_int_equal (tly_reader_node (r, l, m >> l, h), TLY_OK);
            assert_memory_equal (all.item[at].v, h, 32);
        }
    }
    assert_int_equal (at, all.n);
    /*  In slices of 1 to 37 leaves, from wherever the last one stopped. */
    walk_log sl = { .r = r };
    for (uint64_t from = 0, k = 1; from < N; from = next, k = k % 37 + 1) {
        assert_int_equal (tly_reader_tree_walk (r, from, N, k, walk_leaf, walk_node, &sl, &next),
                          TLY_OK);
        assert_int_equal (next, from + k < N ? from + k : N);
    }
    assert_int_equal (sl.n, all.n);
    for (size_t i = 0; i < all.n; i++)
        assert_memory_equal (&sl.item[i], &all.item[i], sizeof all.item[i]);
    /*  Stopped by the callback at its 11th item, leaf 6 (the first ten
        are leaves 0-5 and nodes (1,0), (1,1), (2,0), (1,2)): next is the
        leaf after the last one whose nodes all came. */
    walk_log stop = { .r = r, .stop_at = 11 };
    assert_int_equal (tly_reader_tree_walk (r, 0, N, SIZE_MAX, walk_leaf, walk_node, &stop, &next),
                      TLY_EINVAL);
    assert_int_equal (stop.n, 11);
    assert_int_equal (next, 6);
    tly_reader_end (r);
    tly_reader_destroy (&r);
    tly_writer_destroy (&w);
    tly_store_close (&s);

    /*  Node (2, 5) deleted behind the store's back: NULL in its place,
        the walk goes on. */
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi nodes;
    raw_ledger_begin (f, 1 << 26, &env, &txn);
    assert_int_equal (mdb_dbi_open (txn, "nodes", MDB_INTEGERKEY, &nodes), 0);
    uint64_t m = ((5 + 1) << 2) - 1, key = 2 * m - (uint64_t) __builtin_popcountll (m) + 2;
    MDB_val k = { 8, &key };
    assert_int_equal (mdb_del (txn, nodes, &k, NULL), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);
    assert_int_equal (tly_store_open (f->dir, 1 << 26, &s, &why), TLY_OK);
    assert_int_equal (tly_reader_new (s, &r), TLY_OK);
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    walk_log gap = { .r = r };
    assert_int_equal (tly_reader_tree_walk (r, 0, N, SIZE_MAX, walk_leaf, walk_node, &gap, &next),
                      TLY_OK);
    assert_int_equal (gap.n, all.n);
    for (size_t i = 0; i < all.n; i++) {
        bool hole = all.item[i].level == 2 && all.item[i].index == 5;
        assert_int_equal (gap.item[i].null, hole);
        if (!hole)
            assert_memory_equal (&gap.item[i], &all.item[i], sizeof all.item[i]);
    }
    tly_reader_end (r);
    tly_reader_destroy (&r);
    tly_store_close (&s);
    free (all.item);
    free (sl.item);
    free (stop.item);
    free (gap.item);
}

typedef struct {
    size_t n;
    tly_seal seal[8];
    uint64_t size[8];
} seals_seen;

static int
seal_one (void *ctx, const tly_sth *sth, tly_seal seal)
{
    seals_seen *c = ctx;
    if (c->n < 8) {
        c->seal[c->n] = seal;
        c->size[c->n++] = sth->tree_size;
    }
    return TLY_OK;
}

/*  Head records are sealed (format 8): the scan reports a matching seal,
    a flipped bit anywhere in the record as a bad seal (and such a head is
    never handed out), and a record from an earlier format (104 bytes) as
    unsealed, still readable. */
static void
test_sth_sealed (void **state)
{
    fixture *f = *state;
    tly_store *s;
    tly_writer *w;
    tly_reader *r;
    open_lsm (f, 64, &s, &w, &r);
    int n = 0;
    commit_keys (f, s, w, &n, 3, 5);            /* heads for sizes 5, 10, 15 */
    close_lsm (&s, &w, &r);

    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi sths;
    raw_ledger_begin (f, 1 << 26, &env, &txn);
    assert_int_equal (mdb_dbi_open (txn, "sths", MDB_INTEGERKEY, &sths), 0);
    uint64_t size = 5;
    MDB_val k = { 8, &size }, v;
    assert_int_equal (mdb_get (txn, sths, &k, &v), 0);
    assert_int_equal (v.mv_size, 120);
    uint8_t rec[120];
    memcpy (rec, v.mv_data, 120);
    MDB_val old = { 104, rec };                 /* as format 7 stored it */
    assert_int_equal (mdb_put (txn, sths, &k, &old, 0), 0);
    size = 10;
    assert_int_equal (mdb_get (txn, sths, &k, &v), 0);
    memcpy (rec, v.mv_data, 120);
    rec[50] ^= 0x10;                            /* a bit of the signature */
    MDB_val bad = { 120, rec };
    assert_int_equal (mdb_put (txn, sths, &k, &bad, 0), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);

    open_lsm (f, 64, &s, &w, &r);
    seals_seen c = { 0 };
    uint64_t next;
    bool done;
    assert_int_equal (tly_reader_begin (r), TLY_OK);
    assert_int_equal (tly_reader_sth_scan (r, 0, 8, seal_one, &c, &next, &done), TLY_OK);
    tly_sth old_head, bad_head;
    assert_int_equal (tly_reader_sth (r, 5, &old_head), TLY_OK);
    assert_int_equal (tly_sth_verify (&old_head, f->pk), TLY_OK);
    assert_int_equal (tly_reader_sth (r, 10, &bad_head), TLY_ECORRUPT);     /* never served */
    tly_reader_end (r);
    assert_true (done);
    assert_int_equal (c.n, 3);
    assert_int_equal (c.size[0], 5);
    assert_int_equal (c.seal[0], TLY_SEAL_NONE);
    assert_int_equal (c.seal[1], TLY_SEAL_BAD);
    assert_int_equal (c.seal[2], TLY_SEAL_OK);
    close_lsm (&s, &w, &r);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown (test_append_commit_read, setup, teardown),
        cmocka_unit_test_setup_teardown (test_empty_store, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_lsm, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_hash_formula, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_abort_merge, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_checkpoints_keep_maintenance, setup, teardown),
        cmocka_unit_test_setup_teardown (test_dedup_restart_mid_merge, setup, teardown),
        cmocka_unit_test_setup_teardown (test_migrate_format_5, setup, teardown),
        cmocka_unit_test_setup_teardown (test_covered_checked, setup, teardown),
        cmocka_unit_test_setup_teardown (test_format_6_to_8_and_10, setup, teardown),
        cmocka_unit_test_setup_teardown (test_format_missing, setup, teardown),
        cmocka_unit_test_setup_teardown (test_tree_walk, setup, teardown),
        cmocka_unit_test_setup_teardown (test_meta_lost_with_entries, setup, teardown),
        cmocka_unit_test_setup_teardown (test_sth_sealed, setup, teardown),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
