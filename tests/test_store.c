/*  test_store.c -- the LMDB ledger: append, commit, abort, reopen, reads at
    any historical size, and refusing a ledger whose head does not match. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
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
        assert_int_equal (tly_merkle_root (tly_reader_node, r, heads[i].tree_size, root), TLY_OK);
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

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown (test_append_commit_read, setup, teardown),
        cmocka_unit_test_setup_teardown (test_empty_store, setup, teardown),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
