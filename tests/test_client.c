/*  test_client.c -- the client library without a real server.

    Offline: proof wire format round trips, and tly_verify_* against proofs
    built from a small in-memory tree and a fresh Ed25519 key, including
    tampered paths, leaves, signatures and mismatched sizes.

    Online: a fake tallyd (a ROUTER socket in a zactor) that answers out of
    order, refuses a request once with "unavailable" (the resend must be
    byte-identical), sends replies with unknown ids, stays silent, and sends
    garbage.  The client must match, retry, and fail cleanly.
*/
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include <czmq.h>
#include <sodium.h>
#include "tally/client.h"
#include "tally/msg.h"

/* ---- an in-memory tree and a key ---- */

#define TREE_MAX 40

typedef struct {
    uint8_t leaves [TREE_MAX][32];
    uint64_t n;
} mem_tree;

static int
mem_node (void *ctx, unsigned level, uint64_t index, uint8_t out [TLY_HASH_LEN])
{
    mem_tree *t = ctx;
    uint64_t span = UINT64_C (1) << level;
    if ((index + 1) * span > t->n)
        return TLY_ENOTFOUND;
    if (level == 0) {
        memcpy (out, t->leaves [index], 32);
        return TLY_OK;
    }
    uint8_t l [32], r [32];
    mem_node (ctx, level - 1, 2 * index, l);
    mem_node (ctx, level - 1, 2 * index + 1, r);
    tly_merkle_node_hash (l, r, out);
    return TLY_OK;
}

static uint8_t test_pk [crypto_sign_PUBLICKEYBYTES];
static uint8_t test_sk [crypto_sign_SECRETKEYBYTES];

static void
tree_build (mem_tree *t, uint64_t n)
{
    t->n = n;
    for (uint64_t i = 0; i < n; i++) {
        char leaf [32];
        int len = snprintf (leaf, sizeof leaf, "leaf %llu", (unsigned long long) i);
        tly_merkle_leaf_hash ((const uint8_t *) leaf, (size_t) len, t->leaves [i]);
    }
}

static void
sth_make (mem_tree *t, uint64_t size, tly_sth *sth)
{
    uint64_t saved = t->n;
    t->n = size;
    memset (sth, 0, sizeof *sth);
    sth->tree_size = size;
    sth->ts = 1700000000000 + size;
    assert_int_equal (tly_merkle_root (mem_node, t, NULL, size, sth->root), TLY_OK);
    assert_int_equal (tly_sth_sign (sth, test_sk), TLY_OK);
    t->n = saved;
}

static void
inclusion_make (mem_tree *t, uint64_t m, uint64_t n, tly_proof *p)
{
    memset (p, 0, sizeof *p);
    p->seq = m;
    p->tree_size = n;
    uint64_t saved = t->n;
    t->n = n;
    assert_int_equal (tly_merkle_inclusion (mem_node, t, NULL, m, n, p->path, &p->path_len),
                      TLY_OK);
    t->n = saved;
    sth_make (t, n, &p->sth);
}

static void
consistency_make (mem_tree *t, uint64_t m, uint64_t n, tly_proof *p)
{
    memset (p, 0, sizeof *p);
    p->seq = m;
    p->tree_size = n;
    uint64_t saved = t->n;
    t->n = n;
    assert_int_equal (tly_merkle_consistency (mem_node, t, NULL, m, n, p->path, &p->path_len),
                      TLY_OK);
    t->n = saved;
    sth_make (t, n, &p->sth);
}

static int
setup_key (void **state)
{
    (void) state;
    if (sodium_init () < 0)
        return -1;
    crypto_sign_keypair (test_pk, test_sk);
    return 0;
}

/* ---- offline ---- */

static void
roundtrip (const tly_proof *p, bool consistency)
{
    tly_buf buf;
    msgpack_packer pk;
    msgpack_zone zone;
    msgpack_object obj;
    tly_buf_init (&buf);
    tly_buf_packer (&buf, &pk);
    tly_proof_pack (p, consistency, &pk);
    assert_false (buf.oom);
    assert_int_equal (tly_msg_check (buf.data, buf.len, &tly_msg_request_limits, NULL),
                      TLY_OK);
    msgpack_zone_init (&zone, 1024);
    assert_int_equal (tly_msg_unpack (buf.data, buf.len, &zone, &obj), TLY_OK);
    /*  The exact wire keys of PROTOCOL.md s4. */
    assert_non_null (tly_msg_get (&obj, consistency ? "from" : "seq"));
    assert_non_null (tly_msg_get (&obj, consistency ? "to" : "tree_size"));
    assert_true (tly_msg_streq (&obj.via.map.ptr [0].key, "ok"));
    tly_proof back;
    assert_int_equal (tly_proof_decode (&obj, consistency, &back), TLY_OK);
    assert_int_equal (back.seq, p->seq);
    assert_int_equal (back.tree_size, p->tree_size);
    assert_int_equal (back.path_len, p->path_len);
    assert_memory_equal (back.path, p->path, p->path_len * 32);
    assert_memory_equal (&back.sth, &p->sth, sizeof p->sth);
    /*  A proof of one kind is not read as the other. */
    assert_int_equal (tly_proof_decode (&obj, !consistency, &back), TLY_EINVAL);
    msgpack_zone_destroy (&zone);
    tly_buf_free (&buf);
}

static void
test_proof_roundtrip (void **state)
{
    (void) state;
    mem_tree t;
    tree_build (&t, 13);
    tly_proof p;
    inclusion_make (&t, 5, 13, &p);
    roundtrip (&p, false);
    consistency_make (&t, 6, 13, &p);
    roundtrip (&p, true);
    consistency_make (&t, 13, 13, &p);     /* empty path */
    roundtrip (&p, true);
}

/*  Decodes a hand-packed map; returns tly_proof_decode's answer. */
static int
decode_packed (void (*fill) (msgpack_packer *), bool consistency)
{
    tly_buf buf;
    msgpack_packer pk;
    msgpack_zone zone;
    msgpack_object obj;
    tly_proof out;
    tly_buf_init (&buf);
    tly_buf_packer (&buf, &pk);
    fill (&pk);
    msgpack_zone_init (&zone, 1024);
    assert_int_equal (tly_msg_unpack (buf.data, buf.len, &zone, &obj), TLY_OK);
    int rc = tly_proof_decode (&obj, consistency, &out);
    msgpack_zone_destroy (&zone);
    tly_buf_free (&buf);
    return rc;
}

static void
pack_good_sth (msgpack_packer *pk, uint64_t size)
{
    tly_sth sth = { .tree_size = size, .ts = 1 };
    tly_sth_pack (&sth, pk);
}

static void fill_ok_false (msgpack_packer *pk)
{
    msgpack_pack_map (pk, 5);
    tly_pack_cstr (pk, "ok"); msgpack_pack_false (pk);
    tly_pack_cstr (pk, "seq"); msgpack_pack_uint64 (pk, 0);
    tly_pack_cstr (pk, "tree_size"); msgpack_pack_uint64 (pk, 1);
    tly_pack_cstr (pk, "path"); msgpack_pack_array (pk, 0);
    tly_pack_cstr (pk, "sth"); pack_good_sth (pk, 1);
}

static void fill_short_hash (msgpack_packer *pk)
{
    msgpack_pack_map (pk, 4);
    tly_pack_cstr (pk, "seq"); msgpack_pack_uint64 (pk, 0);
    tly_pack_cstr (pk, "tree_size"); msgpack_pack_uint64 (pk, 2);
    tly_pack_cstr (pk, "path"); msgpack_pack_array (pk, 1);
    tly_pack_bin (pk, "0123456789012345678901234567890", 31);
    tly_pack_cstr (pk, "sth"); pack_good_sth (pk, 2);
}

static void fill_size_mismatch (msgpack_packer *pk)
{
    msgpack_pack_map (pk, 4);
    tly_pack_cstr (pk, "seq"); msgpack_pack_uint64 (pk, 0);
    tly_pack_cstr (pk, "tree_size"); msgpack_pack_uint64 (pk, 2);
    tly_pack_cstr (pk, "path"); msgpack_pack_array (pk, 0);
    tly_pack_cstr (pk, "sth"); pack_good_sth (pk, 3);
}

static void fill_seq_outside (msgpack_packer *pk)
{
    msgpack_pack_map (pk, 4);
    tly_pack_cstr (pk, "seq"); msgpack_pack_uint64 (pk, 2);
    tly_pack_cstr (pk, "tree_size"); msgpack_pack_uint64 (pk, 2);
    tly_pack_cstr (pk, "path"); msgpack_pack_array (pk, 0);
    tly_pack_cstr (pk, "sth"); pack_good_sth (pk, 2);
}

static void fill_long_path (msgpack_packer *pk)
{
    static const uint8_t zero [32];
    msgpack_pack_map (pk, 4);
    tly_pack_cstr (pk, "seq"); msgpack_pack_uint64 (pk, 0);
    tly_pack_cstr (pk, "tree_size"); msgpack_pack_uint64 (pk, 2);
    tly_pack_cstr (pk, "path"); msgpack_pack_array (pk, TLY_PATH_MAX + 1);
    for (int i = 0; i <= TLY_PATH_MAX; i++)
        tly_pack_bin (pk, zero, 32);
    tly_pack_cstr (pk, "sth"); pack_good_sth (pk, 2);
}

static void fill_from_zero (msgpack_packer *pk)
{
    msgpack_pack_map (pk, 4);
    tly_pack_cstr (pk, "from"); msgpack_pack_uint64 (pk, 0);
    tly_pack_cstr (pk, "to"); msgpack_pack_uint64 (pk, 2);
    tly_pack_cstr (pk, "path"); msgpack_pack_array (pk, 0);
    tly_pack_cstr (pk, "sth"); pack_good_sth (pk, 2);
}

static void fill_not_map (msgpack_packer *pk)
{
    msgpack_pack_array (pk, 0);
}

static void
test_proof_decode_rejects (void **state)
{
    (void) state;
    assert_int_equal (decode_packed (fill_ok_false, false), TLY_EINVAL);
    assert_int_equal (decode_packed (fill_short_hash, false), TLY_EINVAL);
    assert_int_equal (decode_packed (fill_size_mismatch, false), TLY_EINVAL);
    assert_int_equal (decode_packed (fill_seq_outside, false), TLY_EINVAL);
    assert_int_equal (decode_packed (fill_long_path, false), TLY_EINVAL);
    assert_int_equal (decode_packed (fill_from_zero, true), TLY_EINVAL);
    assert_int_equal (decode_packed (fill_not_map, false), TLY_EINVAL);
}

static void
test_verify_inclusion (void **state)
{
    (void) state;
    mem_tree t;
    tree_build (&t, TREE_MAX);
    tly_proof p;
    for (uint64_t n = 1; n <= 17; n++)
        for (uint64_t m = 0; m < n; m++) {
            inclusion_make (&t, m, n, &p);
            assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [m], &p), TLY_OK);
            /*  Another leaf at the same position does not verify. */
            assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [(m + 1) % TREE_MAX], &p),
                              TLY_ECRYPTO);
        }

    inclusion_make (&t, 5, 13, &p);
    tly_proof bad = p;
    bad.path [1][7] ^= 1;                       /* tampered path */
    assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [5], &bad), TLY_ECRYPTO);
    bad = p;
    bad.path_len--;                             /* truncated path */
    assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [5], &bad), TLY_ECRYPTO);
    uint8_t leaf [32];
    memcpy (leaf, t.leaves [5], 32);
    leaf [0] ^= 0x80;                           /* tampered leaf */
    assert_int_equal (tly_verify_inclusion (test_pk, leaf, &p), TLY_ECRYPTO);
    bad = p;
    bad.sth.sig [10] ^= 1;                      /* tampered signature */
    assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [5], &bad), TLY_ECRYPTO);
    bad = p;
    bad.sth.root [0] ^= 1;                      /* root not what was signed */
    assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [5], &bad), TLY_ECRYPTO);
    bad = p;
    bad.seq = 4;                                /* right leaf, wrong index */
    assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [5], &bad), TLY_ECRYPTO);
    bad = p;
    bad.tree_size = 14;                         /* sth is for 13 */
    assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [5], &bad), TLY_EINVAL);
    bad = p;
    bad.seq = 13;                               /* outside the tree */
    assert_int_equal (tly_verify_inclusion (test_pk, t.leaves [5], &bad), TLY_EINVAL);

    uint8_t other_pk [32], other_sk [64];
    crypto_sign_keypair (other_pk, other_sk);
    assert_int_equal (tly_verify_inclusion (other_pk, t.leaves [5], &p), TLY_ECRYPTO);
}

static void
test_verify_consistency (void **state)
{
    (void) state;
    mem_tree t;
    tree_build (&t, TREE_MAX);
    tly_proof p;
    tly_sth old;
    for (uint64_t n = 1; n <= 17; n++)
        for (uint64_t m = 1; m <= n; m++) {
            consistency_make (&t, m, n, &p);
            sth_make (&t, m, &old);
            assert_int_equal (tly_verify_consistency (test_pk, &old, &p), TLY_OK);
        }

    consistency_make (&t, 6, 13, &p);
    sth_make (&t, 6, &old);
    tly_proof bad = p;
    bad.path [0][0] ^= 1;                       /* tampered path */
    assert_int_equal (tly_verify_consistency (test_pk, &old, &bad), TLY_ECRYPTO);
    tly_sth bad_old = old;
    bad_old.sig [0] ^= 1;                       /* old head's signature */
    assert_int_equal (tly_verify_consistency (test_pk, &bad_old, &p), TLY_ECRYPTO);
    bad = p;
    bad.sth.sig [63] ^= 1;                      /* new head's signature */
    assert_int_equal (tly_verify_consistency (test_pk, &old, &bad), TLY_ECRYPTO);

    /*  A different history of the same size, honestly signed: a fork. */
    mem_tree fork = t;
    fork.leaves [2][0] ^= 1;
    sth_make (&fork, 6, &bad_old);
    assert_int_equal (tly_verify_consistency (test_pk, &bad_old, &p), TLY_ECRYPTO);

    sth_make (&t, 7, &bad_old);                 /* sizes do not match */
    assert_int_equal (tly_verify_consistency (test_pk, &bad_old, &p), TLY_EINVAL);
    bad = p;
    bad.tree_size = 12;
    assert_int_equal (tly_verify_consistency (test_pk, &old, &bad), TLY_EINVAL);
}

/* ---- a fake tallyd ---- */

/*  cmocka's asserts must stay in the test's thread: the fake server, in
    its actor thread, aborts instead. */
static void
must (bool ok, const char *what)
{
    if (!ok) {
        fprintf (stderr, "fake tallyd: %s\n", what);
        abort ();
    }
}

typedef enum { FAKE_SHUFFLE, FAKE_GARBAGE, FAKE_SILENT, FAKE_GET } fake_kind;

typedef struct {
    fake_kind kind;
    char endpoint [64];
} fake_args;

typedef struct {
    zsock_t *router;
    zsock_t *pipe;
    fake_kind kind;
    size_t requests;
    zframe_t *first_body;         /* the body of the first request seen */
    bool all_identical;           /* every later body equals first_body */
    uint64_t refused_id;
    bool refused;
    zmsg_t *held [8];             /* shuffle: requests waiting for a reply */
    size_t nheld;
} fake_state;

static void
fake_send (fake_state *self, zframe_t *identity, const tly_buf *body)
{
    zmsg_t *msg = zmsg_new ();
    zmsg_append (msg, &identity);
    zmsg_addmem (msg, body->data, body->len);
    zmsg_send (&msg, self->router);
}

static void
fake_send_raw (fake_state *self, zframe_t *identity, const void *p, size_t n)
{
    tly_buf b = { .data = (uint8_t *) p, .len = n };
    fake_send (self, identity, &b);
}

static void
pack_sth (msgpack_packer *pk, uint64_t size, uint64_t ts)
{
    tly_sth sth = { .tree_size = size, .ts = ts };
    memset (sth.root, 0xab, 32);
    tly_sth_sign (&sth, test_sk);
    tly_sth_pack (&sth, pk);
}

static void
pack_result (msgpack_packer *pk, const msgpack_object *event)
{
    tly_str key = { "", 0 };
    tly_msg_get_str (event, "key", &key);
    unsigned n = key.len == 2 ? (unsigned) (key.ptr [1] - '0') : 0;
    uint8_t leaf [32];
    memset (leaf, (int) n, sizeof leaf);
    if (n == 4) {
        msgpack_pack_map (pk, 2);
        tly_pack_cstr (pk, "status"); tly_pack_cstr (pk, "conflict");
        tly_pack_cstr (pk, "seq"); msgpack_pack_uint64 (pk, 1);
    }
    else if (n == 5) {
        msgpack_pack_map (pk, 3);
        tly_pack_cstr (pk, "status"); tly_pack_cstr (pk, "rejected");
        tly_pack_cstr (pk, "code"); tly_pack_cstr (pk, "quota_exceeded");
        tly_pack_cstr (pk, "message"); tly_pack_cstr (pk, "over the limit");
    }
    else {
        msgpack_pack_map (pk, 4);
        tly_pack_cstr (pk, "status"); tly_pack_cstr (pk, "accepted");
        tly_pack_cstr (pk, "seq"); msgpack_pack_uint64 (pk, n);
        tly_pack_cstr (pk, "recv_ts"); msgpack_pack_uint64 (pk, 1000 + n);
        tly_pack_cstr (pk, "leaf"); tly_pack_bin (pk, leaf, 32);
    }
}

/*  Answers an ingest request properly: results by key, a signed STH. */
static void
reply_ingest (fake_state *self, zmsg_t **msg_p)
{
    zframe_t *identity = zmsg_pop (*msg_p);
    zframe_t *body = zmsg_last (*msg_p);
    msgpack_zone zone;
    msgpack_object obj;
    msgpack_zone_init (&zone, 4096);
    must (tly_msg_unpack (zframe_data (body), zframe_size (body), &zone, &obj)
          == TLY_OK, "unpack ingest");
    uint64_t id = 0;
    must (tly_msg_get_uint (&obj, "id", &id) == TLY_OK, "ingest id");
    const msgpack_object *events = tly_msg_get (&obj, "events");
    tly_buf out;
    msgpack_packer pk;
    tly_buf_init (&out);
    tly_buf_packer (&out, &pk);
    msgpack_pack_map (&pk, 4);
    tly_pack_cstr (&pk, "ok"); msgpack_pack_true (&pk);
    tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
    tly_pack_cstr (&pk, "results");
    msgpack_pack_array (&pk, events->via.array.size);
    for (uint32_t i = 0; i < events->via.array.size; i++)
        pack_result (&pk, &events->via.array.ptr [i]);
    tly_pack_cstr (&pk, "sth");
    pack_sth (&pk, 100, 5000 + id);
    fake_send (self, identity, &out);
    tly_buf_free (&out);
    msgpack_zone_destroy (&zone);
    zmsg_destroy (msg_p);
}

static void
reply_error (fake_state *self, zframe_t *identity, uint64_t id, const char *code)
{
    tly_buf out;
    msgpack_packer pk;
    tly_buf_init (&out);
    tly_buf_packer (&out, &pk);
    msgpack_pack_map (&pk, 3);
    tly_pack_cstr (&pk, "ok"); msgpack_pack_false (&pk);
    tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
    tly_pack_cstr (&pk, "error");
    msgpack_pack_map (&pk, 2);
    tly_pack_cstr (&pk, "code"); tly_pack_cstr (&pk, code);
    tly_pack_cstr (&pk, "message"); tly_pack_cstr (&pk, "try later");
    fake_send (self, identity, &out);
    tly_buf_free (&out);
}

/*  Shuffle: refuse the first request once with "unavailable"; hold the
    others until three are waiting, then answer an unknown id and the three
    in reverse order of arrival. */
static void
on_shuffle (fake_state *self, zmsg_t *msg, uint64_t id)
{
    if (!self->refused) {
        self->refused = true;
        self->refused_id = id;
        reply_error (self, zmsg_pop (msg), id, "unavailable");
        zmsg_destroy (&msg);
        return;
    }
    if (id == self->refused_id)
        self->all_identical = zframe_eq (self->first_body, zmsg_last (msg));
    self->held [self->nheld++] = msg;
    if (self->nheld < 3)
        return;
    zframe_t *identity = zframe_dup (zmsg_first (self->held [0]));
    reply_error (self, identity, 999999, "not_found");     /* nobody asked */
    while (self->nheld)
        reply_ingest (self, &self->held [--self->nheld]);
    zstr_send (self->pipe, self->all_identical ? "IDENTICAL" : "DIFFERENT");
}

/*  Garbage: the n-th request gets the n-th broken reply (the last is good). */
static void
on_garbage (fake_state *self, zmsg_t *msg, uint64_t id, const char *op)
{
    static const char *raw [] = {
        "\xc1", "\xdd\xff\xff\xff\xff", "\x81\xa2ok", "\xa5hello", "", "\x80\x00",
    };
    size_t nraw = sizeof raw / sizeof raw [0];
    size_t k = self->requests - 1;
    zframe_t *identity = zmsg_pop (msg);
    zmsg_destroy (&msg);
    if (strcmp (op, "ingest") && k < nraw) {
        fake_send_raw (self, identity, raw [k], k == 4 ? 0 : strlen (raw [k]) + (k == 5));
        return;
    }
    tly_buf out;
    msgpack_packer pk;
    tly_buf_init (&out);
    tly_buf_packer (&out, &pk);
    if (!strcmp (op, "ingest")) {
        /*  Results that break the rules in turn by k. */
        uint8_t leaf [32] = { 0 };
        msgpack_pack_map (&pk, 4);
        tly_pack_cstr (&pk, "ok"); msgpack_pack_true (&pk);
        tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
        tly_pack_cstr (&pk, "results");
        msgpack_pack_array (&pk, k % 4 == 0 ? 2 : 1);   /* 0: wrong count */
        for (size_t i = 0; i < (k % 4 == 0 ? 2u : 1u); i++) {
            msgpack_pack_map (&pk, 4);
            tly_pack_cstr (&pk, "status");
            tly_pack_cstr (&pk, k % 4 == 3 ? "maybe" : "accepted");
            tly_pack_cstr (&pk, "seq"); msgpack_pack_uint64 (&pk, k % 4 == 2 ? 100 : 1);
            tly_pack_cstr (&pk, "recv_ts"); msgpack_pack_uint64 (&pk, 1);
            tly_pack_cstr (&pk, "leaf"); tly_pack_bin (&pk, leaf, k % 4 == 1 ? 31 : 32);
        }
        tly_pack_cstr (&pk, "sth"); pack_sth (&pk, 100, 1);
    }
    else if (k == nraw) {               /* "ok" is not a bool */
        msgpack_pack_map (&pk, 2);
        tly_pack_cstr (&pk, "ok"); tly_pack_cstr (&pk, "yes");
        tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
    }
    else if (k == nraw + 1) {           /* no sth */
        msgpack_pack_map (&pk, 2);
        tly_pack_cstr (&pk, "ok"); msgpack_pack_true (&pk);
        tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
    }
    else if (k == nraw + 2) {           /* error is not a map */
        msgpack_pack_map (&pk, 3);
        tly_pack_cstr (&pk, "ok"); msgpack_pack_false (&pk);
        tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
        tly_pack_cstr (&pk, "error"); tly_pack_cstr (&pk, "boom");
    }
    else {                              /* finally a good one */
        msgpack_pack_map (&pk, 3);
        tly_pack_cstr (&pk, "ok"); msgpack_pack_true (&pk);
        tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
        tly_pack_cstr (&pk, "sth"); pack_sth (&pk, 7, 1);
    }
    fake_send (self, identity, &out);
    tly_buf_free (&out);
}

/*  Leaf bytes packed by hand, independently of event.c (PROTOCOL.md s3). */
static void
leaf_of (uint64_t seq, uint8_t out [32])
{
    tly_buf b;
    msgpack_packer pk;
    tly_buf_init (&b);
    tly_buf_packer (&b, &pk);
    msgpack_pack_array (&pk, 10);
    msgpack_pack_uint64 (&pk, 1);
    msgpack_pack_uint64 (&pk, seq);
    msgpack_pack_uint64 (&pk, 1700000000123);
    tly_pack_cstr (&pk, "usage");
    tly_pack_cstr (&pk, "acme");
    tly_pack_cstr (&pk, "api.calls");
    tly_pack_cstr (&pk, "k1");
    msgpack_pack_uint64 (&pk, 300);
    msgpack_pack_uint64 (&pk, 1700000000000);
    msgpack_pack_map (&pk, 2);                  /* keys ascending */
    tly_pack_cstr (&pk, "a"); tly_pack_cstr (&pk, "2");
    tly_pack_cstr (&pk, "z"); tly_pack_cstr (&pk, "1");
    tly_merkle_leaf_hash (b.data, b.len, out);
    tly_buf_free (&b);
}

/*  Get: seq 1 is right, seq 2 carries a leaf that does not match, seq 3
    is the wrong entry, anything else is not_found. */
static void
on_get (fake_state *self, zmsg_t *msg, uint64_t id, const msgpack_object *req)
{
    uint64_t seq = 1;
    tly_msg_get_uint (req, "seq", &seq);
    zframe_t *identity = zmsg_pop (msg);
    zmsg_destroy (&msg);
    if (seq > 3) {
        reply_error (self, identity, id, "not_found");
        return;
    }
    uint8_t leaf [32];
    leaf_of (seq == 3 ? 1 : seq, leaf);
    if (seq == 2)
        leaf [31] ^= 1;
    tly_buf out;
    msgpack_packer pk;
    tly_buf_init (&out);
    tly_buf_packer (&out, &pk);
    msgpack_pack_map (&pk, 4);
    tly_pack_cstr (&pk, "ok"); msgpack_pack_true (&pk);
    tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, id);
    tly_pack_cstr (&pk, "entry");
    msgpack_pack_map (&pk, 9);
    tly_pack_cstr (&pk, "seq"); msgpack_pack_uint64 (&pk, seq == 3 ? 1 : seq);
    tly_pack_cstr (&pk, "recv_ts"); msgpack_pack_uint64 (&pk, 1700000000123);
    tly_pack_cstr (&pk, "kind"); tly_pack_cstr (&pk, "usage");
    tly_pack_cstr (&pk, "customer"); tly_pack_cstr (&pk, "acme");
    tly_pack_cstr (&pk, "meter"); tly_pack_cstr (&pk, "api.calls");
    tly_pack_cstr (&pk, "key"); tly_pack_cstr (&pk, "k1");
    tly_pack_cstr (&pk, "qty"); msgpack_pack_uint64 (&pk, 300);
    tly_pack_cstr (&pk, "ts"); msgpack_pack_uint64 (&pk, 1700000000000);
    tly_pack_cstr (&pk, "props");
    msgpack_pack_map (&pk, 2);                  /* unsorted on the wire */
    tly_pack_cstr (&pk, "z"); tly_pack_cstr (&pk, "1");
    tly_pack_cstr (&pk, "a"); tly_pack_cstr (&pk, "2");
    tly_pack_cstr (&pk, "leaf"); tly_pack_bin (&pk, leaf, 32);
    fake_send (self, identity, &out);
    tly_buf_free (&out);
}

static void
fake_on_request (fake_state *self, zmsg_t *msg)
{
    zframe_t *body = zmsg_last (msg);
    self->requests++;
    if (!self->first_body)
        self->first_body = zframe_dup (body);
    else if (self->kind == FAKE_SILENT && !zframe_eq (self->first_body, body))
        self->all_identical = false;
    msgpack_zone zone;
    msgpack_object obj;
    msgpack_zone_init (&zone, 4096);
    must (tly_msg_check (zframe_data (body), zframe_size (body),
                         &tly_msg_request_limits, NULL) == TLY_OK, "check");
    must (tly_msg_unpack (zframe_data (body), zframe_size (body), &zone, &obj)
          == TLY_OK, "unpack");
    uint64_t id = 0;
    tly_str op = { "", 0 };
    must (tly_msg_get_uint (&obj, "id", &id) == TLY_OK, "request id");
    must (tly_msg_get_str (&obj, "op", &op) == TLY_OK, "request op");
    char opname [32];
    snprintf (opname, sizeof opname, "%.*s", (int) op.len, op.ptr);
    switch (self->kind) {
        case FAKE_SHUFFLE: on_shuffle (self, msg, id); break;
        case FAKE_GARBAGE: on_garbage (self, msg, id, opname); break;
        case FAKE_GET:     on_get (self, msg, id, &obj); break;
        case FAKE_SILENT:  zmsg_destroy (&msg); break;
    }
    msgpack_zone_destroy (&zone);
}

static void
fake_server (zsock_t *pipe, void *args)
{
    fake_args *a = args;
    fake_state self = { .pipe = pipe, .kind = a->kind, .all_identical = true };
    self.router = zsock_new_router (a->endpoint);
    must (self.router != NULL, "bind");
    zsock_signal (pipe, 0);
    zpoller_t *poller = zpoller_new (pipe, self.router, NULL);
    while (true) {
        void *which = zpoller_wait (poller, -1);
        if (which == self.router)
            fake_on_request (&self, zmsg_recv (self.router));
        else {
            char *cmd = which ? zstr_recv (pipe) : NULL;
            bool term = !cmd || !strcmp (cmd, "$TERM");
            if (cmd && !strcmp (cmd, "COUNT"))
                zstr_sendf (pipe, "%zu %s", self.requests,
                            self.all_identical ? "identical" : "different");
            zstr_free (&cmd);
            if (term)
                break;
        }
    }
    while (self.nheld)
        zmsg_destroy (&self.held [--self.nheld]);
    zframe_destroy (&self.first_body);
    zpoller_destroy (&poller);
    zsock_destroy (&self.router);
}

static zactor_t *
fake_start (fake_args *a, fake_kind kind)
{
    static int counter;
    a->kind = kind;
    snprintf (a->endpoint, sizeof a->endpoint, "inproc://fake-tallyd-%d", ++counter);
    zactor_t *actor = zactor_new (fake_server, a);
    assert_non_null (actor);
    return actor;
}

static tly_client *
client_for (const fake_args *a, unsigned timeout_ms, unsigned retries)
{
    tly_client_opts o = tly_client_default_opts;
    o.timeout_ms = timeout_ms;
    o.retries = retries;
    o.max_inflight = 3;
    tly_client *c = NULL;
    assert_int_equal (tly_client_new (a->endpoint, &o, &c), TLY_OK);
    return c;
}

static void
test_push_out_of_order_and_retry (void **state)
{
    (void) state;
    fake_args a;
    zactor_t *fake = fake_start (&a, FAKE_SHUFFLE);
    tly_client *c = client_for (&a, 5000, 3);

    tly_event ev [6];
    char keys [6][4];
    memset (ev, 0, sizeof ev);
    for (int i = 0; i < 6; i++) {
        snprintf (keys [i], sizeof keys [i], "k%d", i);
        ev [i].customer = (tly_str) { "acme", 4 };
        ev [i].meter = (tly_str) { "api.calls", 9 };
        ev [i].key = (tly_str) { keys [i], 2 };
        ev [i].qty = 1;
        ev [i].ts = 1700000000000;
    }
    tly_result res [6];
    tly_sth sth;
    int64_t start = zclock_mono ();
    assert_int_equal (tly_client_push (c, ev, 6, 2, res, &sth, test_pk), TLY_OK);
    assert_true (zclock_mono () - start < 4000);    /* a retry, not a timeout */
    char *verdict = zstr_recv (fake);
    assert_string_equal (verdict, "IDENTICAL");
    zstr_free (&verdict);

    for (int i = 0; i < 4; i++) {
        assert_int_equal (res [i].status, TLY_ACCEPTED);
        assert_int_equal (res [i].seq, i);
        assert_int_equal (res [i].recv_ts, 1000 + i);
        assert_int_equal (res [i].leaf [0], i);
    }
    assert_int_equal (res [4].status, TLY_CONFLICT);
    assert_int_equal (res [4].seq, 1);
    assert_int_equal (res [5].status, TLY_REJECTED);
    assert_string_equal (res [5].code, "quota_exceeded");
    assert_string_equal (res [5].message, "over the limit");
    assert_int_equal (sth.tree_size, 100);
    assert_int_equal (tly_sth_verify (&sth, test_pk), TLY_OK);

    tly_client_destroy (&c);
    zactor_destroy (&fake);
}

static void
test_push_wrong_key (void **state)
{
    (void) state;
    fake_args a;
    zactor_t *fake = fake_start (&a, FAKE_SHUFFLE);
    tly_client *c = client_for (&a, 5000, 3);
    tly_event ev [6];
    char keys [6][4];
    memset (ev, 0, sizeof ev);
    for (int i = 0; i < 6; i++) {
        snprintf (keys [i], sizeof keys [i], "k%d", i);
        ev [i].customer = (tly_str) { "acme", 4 };
        ev [i].meter = (tly_str) { "m", 1 };
        ev [i].key = (tly_str) { keys [i], 2 };
    }
    uint8_t other_pk [32], other_sk [64];
    crypto_sign_keypair (other_pk, other_sk);
    tly_result res [6];
    assert_int_equal (tly_client_push (c, ev, 6, 2, res, NULL, other_pk), TLY_ECRYPTO);
    assert_string_equal (tly_client_error_code (c), "signature");
    char *verdict = zstr_recv (fake);
    zstr_free (&verdict);
    tly_client_destroy (&c);
    zactor_destroy (&fake);
}

static void
test_garbage_replies (void **state)
{
    (void) state;
    fake_args a;
    zactor_t *fake = fake_start (&a, FAKE_GARBAGE);
    tly_client *c = client_for (&a, 2000, 0);
    tly_sth sth;
    /*  Six undecodable bodies, then "ok" not a bool, no sth, a bad error. */
    for (int i = 0; i < 9; i++) {
        int rc = tly_client_sth (c, &sth);
        assert_int_equal (rc, TLY_EPROTO);
        assert_string_equal (tly_client_error_code (c), "protocol");
    }
    assert_int_equal (tly_client_sth (c, &sth), TLY_OK);  /* still usable */
    assert_int_equal (sth.tree_size, 7);

    tly_event ev [2];
    memset (ev, 0, sizeof ev);
    for (int i = 0; i < 2; i++) {
        ev [i].customer = (tly_str) { "acme", 4 };
        ev [i].meter = (tly_str) { "m", 1 };
        ev [i].key = (tly_str) { "k", 1 };
    }
    tly_result res [2];
    /*  Wrong result count, 31-byte leaf, seq outside the STH, bad status. */
    for (int i = 0; i < 4; i++) {
        assert_int_equal (tly_client_push (c, ev, 1, 1, res, NULL, NULL),
                          TLY_EPROTO);
        assert_int_equal (res [0].status, TLY_REJECTED);
    }
    tly_client_destroy (&c);
    zactor_destroy (&fake);
}

static void
test_timeout_resends_same_bytes (void **state)
{
    (void) state;
    fake_args a;
    zactor_t *fake = fake_start (&a, FAKE_SILENT);
    tly_client *c = client_for (&a, 150, 2);
    tly_sth sth;
    assert_int_equal (tly_client_sth (c, &sth), TLY_ETIMEOUT);
    assert_string_equal (tly_client_error_code (c), "timeout");
    zstr_send (fake, "COUNT");
    char *count = zstr_recv (fake);
    assert_string_equal (count, "3 identical");
    zstr_free (&count);

    /*  tly_client_call never retries. */
    tly_buf body, reply;
    msgpack_packer pk;
    tly_buf_init (&body);
    tly_buf_init (&reply);
    tly_buf_packer (&body, &pk);
    msgpack_pack_map (&pk, 2);
    tly_pack_cstr (&pk, "op"); tly_pack_cstr (&pk, "status");
    tly_pack_cstr (&pk, "id"); msgpack_pack_uint64 (&pk, 7);
    assert_int_equal (tly_client_call (c, body.data, body.len, &reply), TLY_ETIMEOUT);
    zstr_send (fake, "COUNT");
    count = zstr_recv (fake);
    assert_string_equal (count, "4 different");
    zstr_free (&count);
    /*  A body that is not a map with an op is refused before sending. */
    assert_int_equal (tly_client_call (c, (const uint8_t *) "\x91\x01", 2, &reply),
                      TLY_EINVAL);
    tly_buf_free (&body);
    tly_buf_free (&reply);
    tly_client_destroy (&c);
    zactor_destroy (&fake);
}

static void
test_get (void **state)
{
    (void) state;
    fake_args a;
    zactor_t *fake = fake_start (&a, FAKE_GET);
    tly_client *c = client_for (&a, 2000, 0);
    tly_entry e;
    uint8_t leaf [32], want [32];
    assert_int_equal (tly_client_get (c, 1, NULL, NULL, &e, leaf), TLY_OK);
    leaf_of (1, want);
    assert_memory_equal (leaf, want, 32);
    assert_int_equal (e.seq, 1);
    assert_int_equal (e.ev.qty, 300);
    assert_int_equal (e.ev.nprops, 2);
    assert_memory_equal (e.ev.props [0].key.ptr, "a", 1);   /* sorted */
    assert_memory_equal (e.ev.customer.ptr, "acme", 4);

    assert_int_equal (tly_client_get (c, 2, NULL, NULL, &e, leaf), TLY_ECRYPTO);
    assert_int_equal (tly_client_get (c, 3, NULL, NULL, &e, leaf), TLY_EPROTO);
    assert_int_equal (tly_client_get (c, 9, NULL, NULL, &e, leaf), TLY_ESERVER);
    assert_string_equal (tly_client_error_code (c), "not_found");
    tly_str cust = { "acme", 4 }, key = { "k1", 2 };
    assert_int_equal (tly_client_get (c, 0, &cust, &key, &e, NULL), TLY_OK);
    tly_client_destroy (&c);
    zactor_destroy (&fake);
}

static void
test_bad_endpoint (void **state)
{
    (void) state;
    tly_client *c = (tly_client *) 1;
    assert_int_equal (tly_client_new ("not an endpoint", NULL, &c), TLY_EINVAL);
    assert_null (c);
    assert_int_equal (tly_client_new ("", NULL, &c), TLY_EINVAL);
}

int
main (void)
{
    const struct CMUnitTest tests [] = {
        cmocka_unit_test (test_proof_roundtrip),
        cmocka_unit_test (test_proof_decode_rejects),
        cmocka_unit_test (test_verify_inclusion),
        cmocka_unit_test (test_verify_consistency),
        cmocka_unit_test (test_push_out_of_order_and_retry),
        cmocka_unit_test (test_push_wrong_key),
        cmocka_unit_test (test_garbage_replies),
        cmocka_unit_test (test_timeout_resends_same_bytes),
        cmocka_unit_test (test_get),
        cmocka_unit_test (test_bad_endpoint),
    };
    return cmocka_run_group_tests (tests, setup_key, NULL);
}
