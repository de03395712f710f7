/*  test_event.c -- events, their validation (PROTOCOL.md section 2) and the
    canonical leaf bytes (section 3).

    The leaf vectors below are written out by hand from section 3 and the
    msgpack spec, not produced by the encoder: they pin the wire format, so a
    change in msgpack-c or in our code that moves one byte fails here.
    Reminders for reading them:
        9a        fixarray of 10          01      the version, positive fixint
        00..7f    positive fixint         cc/cd/ce/cf  uint 8/16/32/64
        a0..bf    fixstr (len in low 5)   d9/da   str8/str16 (len follows)
        80..8f    fixmap (count in low 4) de      map16 (count follows)
*/
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "tally/event.h"
#include "tally/msg.h"

/*  --- Helpers ---------------------------------------------------------- */

static int
hex_nibble (char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/*  Appends the bytes written as hex in `hex` (spaces ignored). */
static void
hex_append (tly_buf *b, const char *hex)
{
    while (*hex) {
        if (*hex == ' ') {
            hex++;
            continue;
        }
        int hi = hex_nibble (hex [0]);
        int lo = hex_nibble (hex [1]);
        assert_true (hi >= 0 && lo >= 0);
        uint8_t byte = (uint8_t) (hi << 4 | lo);
        assert_int_equal (tly_buf_append (b, &byte, 1), TLY_OK);
        hex += 2;
    }
}

static void
fill_append (tly_buf *b, char c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        assert_int_equal (tly_buf_append (b, &c, 1), TLY_OK);
}

static void
print_hex (const char *label, const uint8_t *p, size_t n)
{
    fprintf (stderr, "%s (%zu bytes):", label, n);
    for (size_t i = 0; i < n; i++)
        fprintf (stderr, " %02x", p [i]);
    fprintf (stderr, "\n");
}

static void
assert_bytes (const tly_buf *got, const tly_buf *want)
{
    if (got->len != want->len || memcmp (got->data, want->data, got->len)) {
        print_hex ("got ", got->data, got->len);
        print_hex ("want", want->data, want->len);
        fail_msg ("encodings differ");
    }
}

static tly_str
S (const char *s)
{
    return (tly_str) { s, (uint32_t) strlen (s) };
}

/*  A string of `n` copies of `c`, in static storage (one per slot). */
static const char *
rep (int slot, char c, size_t n)
{
    static char store [4][1024];
    assert_true (slot < 4 && n < sizeof store [0]);
    memset (store [slot], c, n);
    store [slot][n] = 0;
    return store [slot];
}

/*  The smallest valid event: customer "c", meter "m", key "k", 0, 0. */
static tly_event
tiny_event (void)
{
    tly_event ev;
    memset (&ev, 0, sizeof ev);
    ev.customer = S ("c");
    ev.meter = S ("m");
    ev.key = S ("k");
    return ev;
}

static tly_event
acme_event (void)
{
    tly_event ev = tiny_event ();
    ev.customer = S ("acme");
    ev.meter = S ("api.calls");
    ev.key = S ("k1");
    ev.qty = 1;
    ev.ts = UINT64_C (1700000000000);
    return ev;
}

/*  Validates `ev` and encodes its full leaf into `out`. */
static void
leaf_of (uint64_t seq, uint64_t recv_ts, const char *kind, tly_event ev,
         tly_buf *out)
{
    const char *why = NULL;
    assert_int_equal (tly_event_validate (&ev, &why), TLY_OK);
    tly_buf tail;
    tly_buf_init (&tail);
    assert_int_equal (tly_event_encode_tail (&ev, &tail), TLY_OK);
    assert_int_equal (tly_leaf_encode (seq, recv_ts, kind, tail.data, tail.len, out), TLY_OK);
    tly_buf_free (&tail);
}

static void
assert_leaf (uint64_t seq, uint64_t recv_ts, const char *kind, tly_event ev,
             const tly_buf *want)
{
    tly_buf got;
    tly_buf_init (&got);
    leaf_of (seq, recv_ts, kind, ev, &got);
    assert_bytes (&got, want);
    tly_buf_free (&got);
}

static void
assert_leaf_hex (uint64_t seq, uint64_t recv_ts, const char *kind,
                 tly_event ev, const char *hex)
{
    tly_buf want;
    tly_buf_init (&want);
    hex_append (&want, hex);
    assert_leaf (seq, recv_ts, kind, ev, &want);
    tly_buf_free (&want);
}

/*  check + unpack + decode, as the server does with a request's event. */
static int
decode_bytes (const uint8_t *p, size_t n, tly_event *ev, const char **why)
{
    int rc = tly_msg_check (p, n, NULL, why);
    if (rc != TLY_OK)
        return rc;
    msgpack_zone zone;
    assert_true (msgpack_zone_init (&zone, 1024));
    msgpack_object obj;
    rc = tly_msg_unpack (p, n, &zone, &obj);
    if (rc == TLY_OK)
        rc = tly_event_decode (&obj, ev, why);
    /*  The event's strings point into `p`, not the zone (zero copy). */
    msgpack_zone_destroy (&zone);
    return rc;
}

/*  Packs `ev` as a client would, then decodes it. */
static int
roundtrip (const tly_event *in, tly_event *out, const char **why)
{
    tly_buf b;
    tly_buf_init (&b);
    msgpack_packer pk;
    tly_buf_packer (&b, &pk);
    tly_event_pack (in, &pk);
    assert_false (b.oom);
    static uint8_t copy [8192];         /* outlives b: out borrows from it */
    assert_true (b.len <= sizeof copy);
    memcpy (copy, b.data, b.len);
    size_t n = b.len;
    tly_buf_free (&b);
    return decode_bytes (copy, n, out, why);
}

static void
assert_reason (const char *why, const char *prefix)
{
    assert_non_null (why);
    if (strncmp (why, prefix, strlen (prefix)) != 0)
        fail_msg ("reason \"%s\" does not start with \"%s\"", why, prefix);
}

/*  Expects `ev` to be invalid for a reason about `field`, both by
    tly_event_validate and after a trip over the wire. */
static void
assert_invalid (tly_event ev, const char *field)
{
    const char *why = NULL;
    tly_event copy = ev, out;
    assert_int_equal (tly_event_validate (&copy, &why), TLY_EINVAL);
    assert_reason (why, field);
    why = NULL;
    assert_int_equal (roundtrip (&ev, &out, &why), TLY_EINVAL);
    assert_reason (why, field);
}

static void
assert_valid (tly_event ev)
{
    const char *why = "unset";
    tly_event copy = ev, out;
    if (tly_event_validate (&copy, &why) != TLY_OK)
        fail_msg ("validate: %s", why);
    if (roundtrip (&ev, &out, &why) != TLY_OK)
        fail_msg ("decode: %s", why);
}

/*  --- Leaf vectors ----------------------------------------------------- */

static void
test_leaf_basic_vector (void **state)
{
    (void) state;
    assert_leaf_hex (0, UINT64_C (1700000000000), "usage", acme_event (),
        "9a"                            /* array of 10 */
        "01"                            /* version 1 */
        "00"                            /* seq 0 */
        "cf 00 00 01 8b cf e5 68 00"    /* recv_ts 1700000000000 = 0x18bcfe56800 */
        "a5 75 73 61 67 65"             /* kind "usage" */
        "a4 61 63 6d 65"                /* customer "acme" */
        "a9 61 70 69 2e 63 61 6c 6c 73" /* meter "api.calls" */
        "a2 6b 31"                      /* key "k1" */
        "01"                            /* qty 1 */
        "cf 00 00 01 8b cf e5 68 00"    /* ts 1700000000000 */
        "80");                          /* props {} */
}

static void
test_leaf_mixed_widths_vector (void **state)
{
    (void) state;
    tly_event ev = tiny_event ();
    ev.qty = 65535;
    ev.ts = UINT64_C (4294967295);
    assert_leaf_hex (255, 256, "void", ev,
        "9a 01"
        "cc ff"                         /* seq 255: uint8 */
        "cd 01 00"                      /* recv_ts 256: uint16 */
        "a4 76 6f 69 64"                /* kind "void" */
        "a1 63 a1 6d a1 6b"             /* "c" "m" "k" */
        "cd ff ff"                      /* qty 65535: uint16 */
        "ce ff ff ff ff"                /* ts 2^32-1: uint32 */
        "80");
}

/*  Every msgpack integer width boundary, in each of the four int fields. */
static const struct {
    uint64_t v;
    const char *hex;
} s_ints [] = {
    { 0,                        "00" },
    { 1,                        "01" },
    { 127,                      "7f" },                          /* last fixint */
    { 128,                      "cc 80" },
    { 255,                      "cc ff" },
    { 256,                      "cd 01 00" },
    { 65535,                    "cd ff ff" },
    { 65536,                    "ce 00 01 00 00" },
    { UINT64_C (4294967295),    "ce ff ff ff ff" },
    { UINT64_C (4294967296),    "cf 00 00 00 01 00 00 00 00" },
    { UINT64_C (1) << 62,       "cf 40 00 00 00 00 00 00 00" },  /* qty max */
    { UINT64_MAX,               "cf ff ff ff ff ff ff ff ff" },
};

enum { F_SEQ, F_RECV, F_QTY, F_TS };

static void
test_leaf_int_boundaries (void **state)
{
    (void) state;
    for (int f = F_SEQ; f <= F_TS; f++)
        for (size_t i = 0; i < sizeof s_ints / sizeof s_ints [0]; i++) {
            uint64_t v = s_ints [i].v;
            if (f == F_QTY && v > TLY_QTY_MAX)
                continue;
            tly_event ev = tiny_event ();
            if (f == F_QTY) ev.qty = v;
            if (f == F_TS)  ev.ts = v;
            tly_buf want;
            tly_buf_init (&want);
            hex_append (&want, "9a 01");
            hex_append (&want, f == F_SEQ ? s_ints [i].hex : "00");
            hex_append (&want, f == F_RECV ? s_ints [i].hex : "00");
            hex_append (&want, "a5 75 73 61 67 65 a1 63 a1 6d a1 6b");
            hex_append (&want, f == F_QTY ? s_ints [i].hex : "00");
            hex_append (&want, f == F_TS ? s_ints [i].hex : "00");
            hex_append (&want, "80");
            assert_leaf (f == F_SEQ ? v : 0, f == F_RECV ? v : 0, "usage", ev, &want);
            tly_buf_free (&want);
        }
}

static void
test_leaf_props_sorted (void **state)
{
    (void) state;
    tly_event ev = tiny_event ();
    const char *keys [] = { "b", "a", "ab", "B" };
    const char *vals [] = { "1", "2", "3", "4" };
    for (int i = 0; i < 4; i++) {
        ev.props [i].key = S (keys [i]);
        ev.props [i].val = S (vals [i]);
    }
    ev.nprops = 4;
    /*  Bytewise: "B" (0x42) < "a" (0x61) < "ab" (prefix "a" first) < "b". */
    assert_leaf_hex (0, 0, "usage", ev,
        "9a 01 00 00 a5 75 73 61 67 65 a1 63 a1 6d a1 6b 00 00"
        "84"                            /* fixmap of 4 */
        "a1 42 a1 34"                   /* "B": "4" */
        "a1 61 a1 32"                   /* "a": "2" */
        "a2 61 62 a1 33"                /* "ab": "3" */
        "a1 62 a1 31");                 /* "b": "1" */
}

static void
test_leaf_props_bytewise_not_unicode_aware (void **state)
{
    (void) state;
    tly_event ev = tiny_event ();
    ev.props [0].key = S ("\xc3\xa9");  /* "é" */
    ev.props [0].val = S ("");
    ev.props [1].key = S ("zz");
    ev.props [1].val = S ("");
    ev.props [2].key = S ("z");
    ev.props [2].val = S ("");
    ev.nprops = 3;
    assert_leaf_hex (0, 0, "usage", ev,
        "9a 01 00 00 a5 75 73 61 67 65 a1 63 a1 6d a1 6b 00 00"
        "83"
        "a1 7a a0"                      /* "z": "" */
        "a2 7a 7a a0"                   /* "zz": "" */
        "a2 c3 a9 a0");                 /* "é" (0xc3 > 0x7a): "" */
}

static void
test_leaf_utf8_vector (void **state)
{
    (void) state;
    tly_event ev = tiny_event ();
    ev.customer = S ("Z\xc3\xbcrich");                /* "Zürich" */
    ev.key = S ("\xe6\x97\xa5\xe6\x9c\xac");          /* "日本" */
    ev.props [0].key = S ("emoji");
    ev.props [0].val = S ("\xf0\x9f\x98\x80");        /* U+1F600 */
    ev.nprops = 1;
    assert_leaf_hex (0, 0, "usage", ev,
        "9a 01 00 00 a5 75 73 61 67 65"
        "a7 5a c3 bc 72 69 63 68"       /* 7 bytes, 6 characters */
        "a1 6d"
        "a6 e6 97 a5 e6 9c ac"          /* 6 bytes, 2 characters */
        "00 00"
        "81 a5 65 6d 6f 6a 69 a4 f0 9f 98 80");
}

/*  A leaf whose customer is `clen` 'x' and whose one prop value is `vlen`
    'v'; `chdr` and `vhdr` are the str headers we expect for them. */
static void
assert_str_leaf (size_t clen, const char *chdr, size_t vlen, const char *vhdr)
{
    tly_event ev = tiny_event ();
    ev.customer = S (rep (0, 'x', clen));
    ev.props [0].key = S ("p");
    ev.props [0].val = S (rep (1, 'v', vlen));
    ev.nprops = 1;
    tly_buf want;
    tly_buf_init (&want);
    hex_append (&want, "9a 01 00 00 a5 75 73 61 67 65");
    hex_append (&want, chdr);
    fill_append (&want, 'x', clen);
    hex_append (&want, "a1 6d a1 6b 00 00 81 a1 70");
    hex_append (&want, vhdr);
    fill_append (&want, 'v', vlen);
    assert_leaf (0, 0, "usage", ev, &want);
    tly_buf_free (&want);
}

static void
test_leaf_str_boundaries (void **state)
{
    (void) state;
    assert_str_leaf (1,   "a1",    0,   "a0");        /* empty value: fixstr 0 */
    assert_str_leaf (31,  "bf",    31,  "bf");        /* last fixstr */
    assert_str_leaf (32,  "d9 20", 32,  "d9 20");     /* first str8 */
    assert_str_leaf (128, "d9 80", 255, "d9 ff");     /* last str8 */
    assert_str_leaf (128, "d9 80", 256, "da 01 00");  /* first str16 */
}

static void
test_leaf_sixteen_props_uses_map16 (void **state)
{
    (void) state;
    for (uint32_t n = 15; n <= 16; n++) {
        tly_event ev = tiny_event ();
        static char names [16][4];
        for (uint32_t i = 0; i < n; i++) {
            /* Fill in reverse so that the encoder has to sort. */
            uint32_t k = n - 1 - i;
            snprintf (names [k], sizeof names [k], "p%02u", k);
            ev.props [i].key = S (names [k]);
            ev.props [i].val = S ("");
        }
        ev.nprops = n;
        tly_buf want;
        tly_buf_init (&want);
        hex_append (&want, "9a 01 00 00 a5 75 73 61 67 65 a1 63 a1 6d a1 6b 00 00");
        hex_append (&want, n == 15 ? "8f" : "de 00 10");  /* fixmap 15, map16 16 */
        for (uint32_t k = 0; k < n; k++) {
            hex_append (&want, "a3 70");                    /* "p" */
            char digits [8];
            snprintf (digits, sizeof digits, "3%u 3%u", k / 10, k % 10);
            hex_append (&want, digits);
            hex_append (&want, "a0");                       /* "" */
        }
        assert_leaf (0, 0, "usage", ev, &want);
        tly_buf_free (&want);
    }
}

static void
test_leaf_tail_is_encode_tail (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    tly_buf tail, leaf;
    tly_buf_init (&tail);
    tly_buf_init (&leaf);
    assert_int_equal (tly_event_encode_tail (&ev, &tail), TLY_OK);
    leaf_of (7, 8, "usage", ev, &leaf);
    tly_entry e;
    size_t off = 0;
    assert_int_equal (tly_leaf_decode (leaf.data, leaf.len, &e, &off), TLY_OK);
    assert_int_equal (leaf.len - off, tail.len);
    assert_memory_equal (leaf.data + off, tail.data, tail.len);
    /* 9a 01 07 08 a5 "usage" */
    assert_int_equal (off, 2 + 1 + 1 + 6);
    tly_buf_free (&tail);
    tly_buf_free (&leaf);
}

/*  --- Leaf decoding ---------------------------------------------------- */

static bool
str_eq (tly_str a, tly_str b)
{
    return a.len == b.len && (a.len == 0 || memcmp (a.ptr, b.ptr, a.len) == 0);
}

static void
assert_events_equal (const tly_event *a, const tly_event *b)
{
    assert_true (str_eq (a->customer, b->customer));
    assert_true (str_eq (a->meter, b->meter));
    assert_true (str_eq (a->key, b->key));
    assert_true (a->qty == b->qty);
    assert_true (a->ts == b->ts);
    assert_int_equal (a->nprops, b->nprops);
    for (uint32_t i = 0; i < a->nprops; i++) {
        assert_true (str_eq (a->props [i].key, b->props [i].key));
        assert_true (str_eq (a->props [i].val, b->props [i].val));
    }
}

static void
test_leaf_decode_roundtrip (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    ev.customer = S (rep (0, 'c', 128));
    ev.qty = TLY_QTY_MAX;
    ev.ts = UINT64_MAX;
    ev.props [0].key = S ("region");
    ev.props [0].val = S (rep (1, 'v', 256));
    ev.props [1].key = S ("plan");
    ev.props [1].val = S ("pro");
    ev.nprops = 2;
    assert_int_equal (tly_event_validate (&ev, NULL), TLY_OK);

    for (size_t i = 0; i < sizeof s_ints / sizeof s_ints [0]; i++) {
        tly_buf leaf;
        tly_buf_init (&leaf);
        leaf_of (s_ints [i].v, UINT64_MAX - s_ints [i].v, "usage", ev, &leaf);

        tly_entry e;
        assert_int_equal (tly_leaf_decode (leaf.data, leaf.len, &e, NULL), TLY_OK);
        assert_true (e.seq == s_ints [i].v);
        assert_true (e.recv_ts == UINT64_MAX - s_ints [i].v);
        assert_true (str_eq (e.kind, S ("usage")));
        assert_events_equal (&e.ev, &ev);

        /* Re-encoding what we decoded gives the same bytes. */
        tly_buf again;
        tly_buf_init (&again);
        leaf_of (e.seq, e.recv_ts, "usage", e.ev, &again);
        assert_bytes (&again, &leaf);
        tly_buf_free (&again);
        tly_buf_free (&leaf);
    }
}

static void
test_leaf_decode_every_truncation (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    ev.props [0].key = S ("a");
    ev.props [0].val = S (rep (0, 'v', 256));    /* str16 */
    ev.nprops = 1;
    tly_buf leaf;
    tly_buf_init (&leaf);
    leaf_of (UINT64_C (1) << 40, 300, "usage", ev, &leaf);
    tly_entry e;
    for (size_t n = 0; n < leaf.len; n++)
        assert_int_equal (tly_leaf_decode (leaf.data, n, &e, NULL), TLY_EINVAL);
    assert_int_equal (tly_leaf_decode (leaf.data, leaf.len, &e, NULL), TLY_OK);
    tly_buf_free (&leaf);
}

static int
decode_leaf_hex (const char *hex)
{
    tly_buf b;
    tly_buf_init (&b);
    hex_append (&b, hex);
    tly_entry e;
    int rc = tly_leaf_decode (b.data, b.len, &e, NULL);
    tly_buf_free (&b);
    return rc;
}

/*  The minimal leaf [1, 0, 0, "usage", "c", "m", "k", 0, 0, {}] in pieces,
    so that each case below changes exactly one of them. */
#define L_HEAD   "9a 01"
#define L_SEQ    "00"
#define L_RECV   "00"
#define L_KIND   "a5 75 73 61 67 65"
#define L_CMK    "a1 63 a1 6d a1 6b"
#define L_QTY    "00"
#define L_TS     "00"
#define L_PROPS  "80"

static void
test_leaf_decode_rejects_noncanonical (void **state)
{
    (void) state;
    /* The unchanged pieces decode. */
    assert_int_equal (decode_leaf_hex (L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS), TLY_OK);
    assert_int_equal (decode_leaf_hex (L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS
                                       "82 a1 61 a1 31 a1 62 a0"), TLY_OK);

    static const char *const bad [] = {
        /* array header: wrong length, or wider than fixarray */
        "99 01" L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS,
        "9b 01" L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS "c0",
        "dc 00 0a 01" L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        /* version: not 1, or 1 in a wide format */
        "9a 02" L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        "9a cc 01" L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        /* ints wider than needed, or signed formats */
        L_HEAD "cc 05" L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        L_HEAD "cc 7f" L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        L_HEAD "cd 00 ff" L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        L_HEAD "ce 00 00 ff ff" L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        L_HEAD "cf 00 00 00 00 ff ff ff ff" L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        L_HEAD "d0 05" L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ "cd 00 80" L_KIND L_CMK L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND L_CMK "cc 00" L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND L_CMK "d3 00 00 00 00 00 00 00 01" L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY "ce 00 00 00 01" L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND L_CMK "ff" L_TS L_PROPS,            /* -1 */
        L_HEAD L_SEQ L_RECV L_KIND L_CMK "cb 00 00 00 00 00 00 00 00" L_TS L_PROPS,
        /* strs wider than needed, or not strs */
        L_HEAD L_SEQ L_RECV "d9 05 75 73 61 67 65" L_CMK L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND "da 00 01 63 a1 6d a1 6b" L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND "d9 1f" "61616161616161616161616161616161616161616161616161616161616161"
            "a1 6d a1 6b" L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND "c4 01 63 a1 6d a1 6b" L_QTY L_TS L_PROPS,
        /* props: unsorted, duplicate, map16 under 16, more than 16, not a map */
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "82 a1 62 a1 31 a1 61 a1 32",
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "82 a1 61 a1 31 a1 61 a1 32",
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "82 a2 61 62 a0 a1 61 a0",
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "de 00 01 a1 61 a0",
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "de 00 00",
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "c0",
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "90",
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "81 01 a0",
        /* fields that break section 2 */
        L_HEAD L_SEQ L_RECV L_KIND L_CMK "cf 40 00 00 00 00 00 00 01" L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND "a0 a1 6d a1 6b" L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND "a1 63 a1 2f a1 6b" L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND "a3 ed a0 80 a1 6d a1 6b" L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS "81 a0 a0",
        /* kind empty or not UTF-8 */
        L_HEAD L_SEQ L_RECV "a0" L_CMK L_QTY L_TS L_PROPS,
        L_HEAD L_SEQ L_RECV "a1 ff" L_CMK L_QTY L_TS L_PROPS,
        /* trailing bytes */
        L_HEAD L_SEQ L_RECV L_KIND L_CMK L_QTY L_TS L_PROPS "00",
        /* nothing */
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad [0]; i++)
        if (decode_leaf_hex (bad [i]) != TLY_EINVAL)
            fail_msg ("case %zu accepted: %s", i, bad [i]);
}

/*  --- UTF-8 ------------------------------------------------------------ */

static void
test_utf8_valid (void **state)
{
    (void) state;
    static const char *const good [] = {
        "",
        "plain ascii",
        "\x7f",
        "\x00",                         /* NUL is a code point (tested with len 1) */
        "\xc2\x80",                     /* U+0080, first 2-byte */
        "\xc3\xa9",                     /* é */
        "\xdf\xbf",                     /* U+07FF */
        "\xe0\xa0\x80",                 /* U+0800, first 3-byte */
        "\xe2\x82\xac",                 /* € */
        "\xed\x9f\xbf",                 /* U+D7FF, just below the surrogates */
        "\xee\x80\x80",                 /* U+E000, just above them */
        "\xef\xbf\xbf",                 /* U+FFFF */
        "\xf0\x90\x80\x80",             /* U+10000, first 4-byte */
        "\xf0\x9f\x98\x80",             /* U+1F600 */
        "\xf4\x8f\xbf\xbf",             /* U+10FFFF, the last code point */
    };
    for (size_t i = 0; i < sizeof good / sizeof good [0]; i++) {
        size_t n = i == 3 ? 1 : strlen (good [i]);
        if (!tly_utf8_valid (good [i], n))
            fail_msg ("good case %zu rejected", i);
    }
    static const char *const bad [] = {
        "\xc0\x80",                     /* overlong NUL */
        "\xc1\xbf",                     /* overlong U+007F */
        "\xe0\x80\x80",                 /* overlong */
        "\xe0\x9f\xbf",                 /* overlong U+07FF */
        "\xf0\x80\x80\x80",             /* overlong */
        "\xf0\x8f\xbf\xbf",             /* overlong U+FFFF */
        "\xed\xa0\x80",                 /* U+D800, surrogate */
        "\xed\xbf\xbf",                 /* U+DFFF, surrogate */
        "\xf4\x90\x80\x80",             /* U+110000 */
        "\xf5\x80\x80\x80",
        "\xfe",
        "\xff",
        "\x80",                         /* lone continuation */
        "\xbf",
        "a\xc3",                        /* truncated */
        "\xe2\x82",
        "\xf0\x9f\x98",
        "\xc3\x41",                     /* bad continuation */
        "\xe2\x28\xa1",
        "\xe2\x82\x28",
        "\xf0\x9f\x28\x80",
        "\xf0\x9f\x98\x28",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad [0]; i++)
        if (tly_utf8_valid (bad [i], strlen (bad [i])))
            fail_msg ("bad case %zu accepted", i);
    assert_true (tly_utf8_valid (NULL, 0));
}

/*  --- Validation: each rule at its boundary and one past ------------- */

static void
test_customer_rules (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    ev.customer = S (rep (0, 'x', 128));
    assert_valid (ev);
    ev.customer = S (rep (0, 'x', 129));
    assert_invalid (ev, "customer:");
    ev.customer = S ("");
    assert_invalid (ev, "customer:");
    ev.customer = S ("\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
                     "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9");
    assert_valid (ev);                                  /* 16 chars, 32 bytes */
    char buf [200];
    for (int i = 0; i < 64; i++)
        memcpy (buf + 2 * i, "\xc3\xa9", 2);
    ev.customer = (tly_str) { buf, 128 };               /* 64 chars, 128 bytes */
    assert_valid (ev);
    buf [128] = 'x';
    ev.customer = (tly_str) { buf, 129 };               /* limit is bytes */
    assert_invalid (ev, "customer:");
    ev.customer = (tly_str) { buf, 127 };               /* splits a character */
    assert_invalid (ev, "customer:");
    ev.customer = S ("\xc0\x80");
    assert_invalid (ev, "customer:");
    ev.customer = S ("a\xed\xa0\x80");
    assert_invalid (ev, "customer:");
    ev.customer = S ("\xf4\x90\x80\x80");
    assert_invalid (ev, "customer:");
}

static void
test_meter_rules (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    ev.meter = S (rep (0, 'm', 64));
    assert_valid (ev);
    ev.meter = S (rep (0, 'm', 65));
    assert_invalid (ev, "meter:");
    ev.meter = S ("");
    assert_invalid (ev, "meter:");
    ev.meter = S ("ABCXYZabcxyz0189_.:-");
    assert_valid (ev);
    static const char *const bad [] = {
        " ", "api calls", "a/b", "a+b", "a*b", "a,b", "a@b", "a#b", "a;b",
        "a\\b", "a~b", "a=b", "a\tb", "\xc3\xa9", "\x7f", "a`b", "a[b",
        "a{b", "a@", "@",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad [0]; i++) {
        ev.meter = S (bad [i]);
        assert_invalid (ev, "meter:");
    }
    ev.meter = (tly_str) { "a\0b", 3 };
    assert_invalid (ev, "meter:");
}

static void
test_key_rules (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    ev.key = S (rep (0, 'k', 128));
    assert_valid (ev);
    ev.key = S (rep (0, 'k', 129));
    assert_invalid (ev, "key:");
    ev.key = S ("");
    assert_invalid (ev, "key:");
    ev.key = S ("\xe6\x97\xa5\xe6\x9c\xac");
    assert_valid (ev);
    ev.key = S ("\xc0\x80");
    assert_invalid (ev, "key:");
    ev.key = S ("\xed\xa0\x80");
    assert_invalid (ev, "key:");
    ev.key = S ("\xf4\x90\x80\x80");
    assert_invalid (ev, "key:");
}

static void
test_qty_rules (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    ev.qty = 0;
    assert_valid (ev);
    ev.qty = TLY_QTY_MAX;
    assert_valid (ev);
    ev.qty = TLY_QTY_MAX + 1;
    assert_invalid (ev, "qty:");
    ev.qty = UINT64_MAX;
    assert_invalid (ev, "qty:");
}

static void
test_ts_rules (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    ev.ts = 0;
    assert_valid (ev);
    ev.ts = UINT64_MAX;
    assert_valid (ev);
}

static void
set_props (tly_event *ev, uint32_t n)
{
    static char names [TLY_PROPS_MAX + 1][8];
    for (uint32_t i = 0; i < n && i < TLY_PROPS_MAX; i++) {
        snprintf (names [i], sizeof names [i], "k%u", i);
        ev->props [i].key = S (names [i]);
        ev->props [i].val = S ("v");
    }
    ev->nprops = n;
}

static void
test_props_rules (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    set_props (&ev, 0);
    assert_valid (ev);
    set_props (&ev, 16);
    assert_valid (ev);
    tly_event seventeen = ev;
    seventeen.nprops = 17;              /* can only be checked, not packed */
    const char *why = NULL;
    assert_int_equal (tly_event_validate (&seventeen, &why), TLY_EINVAL);
    assert_reason (why, "props:");

    set_props (&ev, 1);
    ev.props [0].key = S (rep (0, 'p', 64));
    assert_valid (ev);
    ev.props [0].key = S (rep (0, 'p', 65));
    assert_invalid (ev, "props:");
    ev.props [0].key = S ("");
    assert_invalid (ev, "props:");
    ev.props [0].key = S ("\xed\xa0\x80");
    assert_invalid (ev, "props:");

    set_props (&ev, 1);
    ev.props [0].val = S (rep (1, 'v', 256));
    assert_valid (ev);
    ev.props [0].val = S (rep (1, 'v', 257));
    assert_invalid (ev, "props:");
    ev.props [0].val = S ("");
    assert_valid (ev);
    ev.props [0].val = (tly_str) { NULL, 0 };
    assert_valid (ev);
    ev.props [0].val = S ("\xc0\x80");
    assert_invalid (ev, "props:");
    ev.props [0].val = S ("\xf4\x90\x80\x80");
    assert_invalid (ev, "props:");

    set_props (&ev, 3);
    ev.props [2].key = ev.props [0].key;
    assert_invalid (ev, "props:");
}

static void
test_validate_sorts_props (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    set_props (&ev, 12);                /* k0 k1 .. k11: not bytewise sorted */
    assert_int_equal (tly_event_validate (&ev, NULL), TLY_OK);
    static const char *const order [] = {
        "k0", "k1", "k10", "k11", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9",
    };
    for (int i = 0; i < 12; i++)
        assert_true (str_eq (ev.props [i].key, S (order [i])));
}

/*  --- Decoding event maps: types, presence, unknown fields ------------ */

static const char *const s_field_names [] = {
    "customer", "meter", "key", "qty", "ts", "props",
};
static const char *const s_field_hex [] = {
    "a4 61 63 6d 65",                   /* "acme" */
    "a9 61 70 69 2e 63 61 6c 6c 73",    /* "api.calls" */
    "a2 6b 31",                         /* "k1" */
    "01",                               /* 1 */
    "cf 00 00 01 8b cf e5 68 00",       /* 1700000000000 */
    "81 a6 72 65 67 69 6f 6e a2 65 75", /* {"region": "eu"} */
};

/*  A valid event map, except that field `skip` is left out, field `field`
    gets the value `hex`, and `extra_key` (raw hex of the key) is added with
    value `extra_hex`.  Each NULL means no change. */
typedef struct {
    const char *skip;
    const char *field;
    const char *hex;
    const char *extra_key;
    const char *extra_hex;
} event_mod;

static void
make_event (tly_buf *b, event_mod m)
{
    msgpack_packer pk;
    tly_buf_packer (b, &pk);
    msgpack_pack_map (&pk, 6 - (m.skip != NULL) + (m.extra_key != NULL));
    for (int i = 0; i < 6; i++) {
        const char *name = s_field_names [i];
        if (m.skip && strcmp (m.skip, name) == 0)
            continue;
        tly_pack_cstr (&pk, name);
        hex_append (b, m.field && strcmp (m.field, name) == 0 ? m.hex : s_field_hex [i]);
    }
    if (m.extra_key) {
        hex_append (b, m.extra_key);
        hex_append (b, m.extra_hex);
    }
    assert_false (b->oom);
}

static int
decode_mod (event_mod m, tly_event *ev, const char **why)
{
    tly_buf b;
    tly_buf_init (&b);
    make_event (&b, m);
    static uint8_t copy [4096];
    memcpy (copy, b.data, b.len);
    size_t n = b.len;
    tly_buf_free (&b);
    *why = NULL;
    return decode_bytes (copy, n, ev, why);
}

static void
assert_mod_invalid (event_mod m, const char *prefix)
{
    tly_event ev;
    const char *why;
    int rc = decode_mod (m, &ev, &why);
    if (rc != TLY_EINVAL)
        fail_msg ("accepted: field %s = %s", m.field ? m.field : "-", m.hex ? m.hex : "-");
    assert_reason (why, prefix);
}

static void
assert_mod_valid (event_mod m)
{
    tly_event ev;
    const char *why;
    if (decode_mod (m, &ev, &why) != TLY_OK)
        fail_msg ("rejected (%s): field %s = %s", why, m.field ? m.field : "-",
                  m.hex ? m.hex : "-");
}

static void
test_decode_valid_map (void **state)
{
    (void) state;
    tly_event ev;
    const char *why;
    assert_int_equal (decode_mod ((event_mod) { 0 }, &ev, &why), TLY_OK);
    tly_event want = acme_event ();
    want.props [0].key = S ("region");
    want.props [0].val = S ("eu");
    want.nprops = 1;
    assert_events_equal (&ev, &want);
    /* props is optional; nil means absent */
    assert_mod_valid ((event_mod) { .skip = "props" });
    assert_mod_valid ((event_mod) { .field = "props", .hex = "c0" });
    assert_mod_valid ((event_mod) { .field = "props", .hex = "80" });
    assert_int_equal (decode_mod ((event_mod) { .field = "props", .hex = "c0" }, &ev, &why), TLY_OK);
    assert_int_equal (ev.nprops, 0);
}

static void
test_decode_missing_fields (void **state)
{
    (void) state;
    for (int i = 0; i < 5; i++) {
        char prefix [16];
        snprintf (prefix, sizeof prefix, "%s:", s_field_names [i]);
        assert_mod_invalid ((event_mod) { .skip = s_field_names [i] }, prefix);
    }
    tly_event ev;
    const char *why = NULL;
    uint8_t empty_map [] = { 0x80 };
    assert_int_equal (decode_bytes (empty_map, 1, &ev, &why), TLY_EINVAL);
    assert_reason (why, "customer:");
}

static void
test_decode_wrong_types (void **state)
{
    (void) state;
    static const struct {
        const char *field;
        const char *hex;
    } bad [] = {
        { "customer", "05" },                       /* int */
        { "customer", "c0" },                       /* nil */
        { "customer", "c4 04 61 63 6d 65" },        /* bin "acme" */
        { "customer", "91 a1 61" },                 /* ["a"] */
        { "meter",    "c3" },                       /* true */
        { "meter",    "c4 01 6d" },
        { "key",      "ca 3f 80 00 00" },           /* 1.0f */
        { "key",      "80" },
        { "qty",      "ff" },                       /* -1 */
        { "qty",      "d0 ff" },                    /* -1 as int8 */
        { "qty",      "d3 ff ff ff ff ff ff ff ff" },  /* -1 as int64 */
        { "qty",      "d3 80 00 00 00 00 00 00 00" },  /* INT64_MIN */
        { "qty",      "cb 3f f0 00 00 00 00 00 00" },  /* 1.0 */
        { "qty",      "ca 3f 80 00 00" },              /* 1.0f */
        { "qty",      "a1 31" },                    /* "1" */
        { "qty",      "c0" },
        { "qty",      "c2" },
        { "qty",      "cf 40 00 00 00 00 00 00 01" },  /* 2^62 + 1 */
        { "qty",      "cf ff ff ff ff ff ff ff ff" },  /* 2^64 - 1 */
        { "ts",       "ff" },
        { "ts",       "cb 42 78 bc fe 56 80 00 00" },  /* 1.7e12 as double */
        { "ts",       "a1 31" },
        { "ts",       "c0" },
        { "ts",       "d7 ff 00 00 00 00 00 00 00 00" },  /* msgpack timestamp ext */
        { "props",    "90" },
        { "props",    "a0" },
        { "props",    "01" },
        { "props",    "81 01 a1 76" },              /* int key */
        { "props",    "81 a1 6b 01" },              /* int value */
        { "props",    "81 a1 6b c0" },              /* nil value */
        { "props",    "81 a1 6b 80" },              /* map value */
        { "props",    "81 c4 01 6b a1 76" },        /* bin key */
        { "props",    "82 a1 61 a1 31 a1 61 a1 32" },  /* duplicate key */
        { "props",    "81 a0 a1 76" },              /* empty key */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad [0]; i++) {
        char prefix [16];
        snprintf (prefix, sizeof prefix, "%s:", bad [i].field);
        assert_mod_invalid ((event_mod) { .field = bad [i].field, .hex = bad [i].hex }, prefix);
    }
}

/*  msgpack-c reads a non-negative value in a signed format as a positive
    integer, so a client that packs qty with an int packer is fine. */
static void
test_decode_signed_format_nonnegative (void **state)
{
    (void) state;
    tly_event ev;
    const char *why;
    assert_int_equal (decode_mod ((event_mod) { .field = "qty", .hex = "d0 05" }, &ev, &why), TLY_OK);
    assert_true (ev.qty == 5);
    assert_int_equal (decode_mod ((event_mod) { .field = "qty",
        .hex = "d3 40 00 00 00 00 00 00 00" }, &ev, &why), TLY_OK);
    assert_true (ev.qty == TLY_QTY_MAX);
    assert_int_equal (decode_mod ((event_mod) { .field = "ts", .hex = "d2 00 00 00 07" }, &ev, &why), TLY_OK);
    assert_true (ev.ts == 7);
    assert_mod_valid ((event_mod) { .field = "qty", .hex = "cf 40 00 00 00 00 00 00 00" });
}

static void
test_decode_props_limits (void **state)
{
    (void) state;
    /* 16 entries "a".."p" -> "" ok, 17 ("a".."q") not */
    char hex16 [256] = "de 00 10", hex17 [256] = "de 00 11";
    for (int i = 0; i < 17; i++) {
        char kv [16];
        snprintf (kv, sizeof kv, " a1 %02x a0", 'a' + i);
        if (i < 16)
            strcat (hex16, kv);
        strcat (hex17, kv);
    }
    assert_mod_valid ((event_mod) { .field = "props", .hex = hex16 });
    assert_mod_invalid ((event_mod) { .field = "props", .hex = hex17 }, "props:");
}

static void
test_decode_unknown_and_repeated_fields (void **state)
{
    (void) state;
    /* unknown fields, including near misses of real ones */
    assert_mod_invalid ((event_mod) { .extra_key = "a3 73 65 71", .extra_hex = "00" }, "event:");
    assert_mod_invalid ((event_mod) { .extra_key = "a3 51 54 59", .extra_hex = "00" }, "event:");
    assert_mod_invalid ((event_mod) { .extra_key = "a4 71 74 79 00", .extra_hex = "00" }, "event:");
    assert_mod_invalid ((event_mod) { .extra_key = "a0", .extra_hex = "00" }, "event:");
    assert_mod_invalid ((event_mod) { .extra_key = "a2 74 73", .extra_hex = "00" }, "event:");  /* ts twice */
    assert_mod_invalid ((event_mod) { .extra_key = "a8 63 75 73 74 6f 6d 65 72",
                                      .extra_hex = "a4 61 63 6d 65" }, "event:");
    assert_mod_invalid ((event_mod) { .extra_key = "01", .extra_hex = "00" }, "event:");
    assert_mod_invalid ((event_mod) { .extra_key = "c4 02 74 73", .extra_hex = "00" }, "event:");

    tly_event ev;
    const char *why = NULL;
    uint8_t array [] = { 0x91, 0x80 };
    assert_int_equal (decode_bytes (array, sizeof array, &ev, &why), TLY_EINVAL);
    assert_reason (why, "event:");
}

static void
test_decode_invalid_utf8_fields (void **state)
{
    (void) state;
    assert_mod_invalid ((event_mod) { .field = "customer", .hex = "a2 c0 80" }, "customer:");
    assert_mod_invalid ((event_mod) { .field = "customer", .hex = "a3 ed a0 80" }, "customer:");
    assert_mod_invalid ((event_mod) { .field = "key", .hex = "a4 f4 90 80 80" }, "key:");
    assert_mod_invalid ((event_mod) { .field = "meter", .hex = "a2 c3 a9" }, "meter:");
    assert_mod_invalid ((event_mod) { .field = "props", .hex = "81 a2 c0 80 a0" }, "props:");
    assert_mod_invalid ((event_mod) { .field = "props", .hex = "81 a1 6b a3 ed a0 80" }, "props:");
}

/*  --- Packing maps ----------------------------------------------------- */

static void
test_event_pack_roundtrip (void **state)
{
    (void) state;
    tly_event ev = acme_event ();
    tly_event out;
    const char *why;
    assert_int_equal (roundtrip (&ev, &out, &why), TLY_OK);
    assert_events_equal (&out, &ev);
    set_props (&ev, 16);
    assert_int_equal (tly_event_validate (&ev, NULL), TLY_OK);
    assert_int_equal (roundtrip (&ev, &out, &why), TLY_OK);
    assert_events_equal (&out, &ev);
}

static void
test_entry_pack (void **state)
{
    (void) state;
    tly_entry e;
    e.seq = 42;
    e.recv_ts = 1234;
    e.kind = S ("usage");
    e.ev = acme_event ();
    set_props (&e.ev, 2);
    tly_buf b;
    tly_buf_init (&b);
    msgpack_packer pk;
    tly_buf_packer (&b, &pk);
    tly_entry_pack (&e, &pk);
    assert_false (b.oom);
    assert_int_equal (tly_msg_check (b.data, b.len, NULL, NULL), TLY_OK);

    msgpack_zone zone;
    msgpack_zone_init (&zone, 1024);
    msgpack_object o;
    assert_int_equal (tly_msg_unpack (b.data, b.len, &zone, &o), TLY_OK);
    assert_int_equal (o.via.map.size, 9);
    uint64_t u;
    tly_str s;
    assert_int_equal (tly_msg_get_uint (&o, "seq", &u), TLY_OK);
    assert_true (u == 42);
    assert_int_equal (tly_msg_get_uint (&o, "recv_ts", &u), TLY_OK);
    assert_true (u == 1234);
    assert_int_equal (tly_msg_get_str (&o, "kind", &s), TLY_OK);
    assert_true (str_eq (s, S ("usage")));
    assert_int_equal (tly_msg_get_str (&o, "customer", &s), TLY_OK);
    assert_true (str_eq (s, S ("acme")));
    assert_int_equal (tly_msg_get_str (&o, "meter", &s), TLY_OK);
    assert_int_equal (tly_msg_get_str (&o, "key", &s), TLY_OK);
    assert_int_equal (tly_msg_get_uint (&o, "qty", &u), TLY_OK);
    assert_int_equal (tly_msg_get_uint (&o, "ts", &u), TLY_OK);
    assert_true (u == UINT64_C (1700000000000));
    const msgpack_object *props = tly_msg_get (&o, "props");
    assert_non_null (props);
    assert_int_equal (props->type, MSGPACK_OBJECT_MAP);
    assert_int_equal (props->via.map.size, 2);
    msgpack_zone_destroy (&zone);
    tly_buf_free (&b);
}

int
main (void)
{
    const struct CMUnitTest tests [] = {
        cmocka_unit_test (test_leaf_basic_vector),
        cmocka_unit_test (test_leaf_mixed_widths_vector),
        cmocka_unit_test (test_leaf_int_boundaries),
        cmocka_unit_test (test_leaf_props_sorted),
        cmocka_unit_test (test_leaf_props_bytewise_not_unicode_aware),
        cmocka_unit_test (test_leaf_utf8_vector),
        cmocka_unit_test (test_leaf_str_boundaries),
        cmocka_unit_test (test_leaf_sixteen_props_uses_map16),
        cmocka_unit_test (test_leaf_tail_is_encode_tail),
        cmocka_unit_test (test_leaf_decode_roundtrip),
        cmocka_unit_test (test_leaf_decode_every_truncation),
        cmocka_unit_test (test_leaf_decode_rejects_noncanonical),
        cmocka_unit_test (test_utf8_valid),
        cmocka_unit_test (test_customer_rules),
        cmocka_unit_test (test_meter_rules),
        cmocka_unit_test (test_key_rules),
        cmocka_unit_test (test_qty_rules),
        cmocka_unit_test (test_ts_rules),
        cmocka_unit_test (test_props_rules),
        cmocka_unit_test (test_validate_sorts_props),
        cmocka_unit_test (test_decode_valid_map),
        cmocka_unit_test (test_decode_missing_fields),
        cmocka_unit_test (test_decode_wrong_types),
        cmocka_unit_test (test_decode_signed_format_nonnegative),
        cmocka_unit_test (test_decode_props_limits),
        cmocka_unit_test (test_decode_unknown_and_repeated_fields),
        cmocka_unit_test (test_decode_invalid_utf8_fields),
        cmocka_unit_test (test_event_pack_roundtrip),
        cmocka_unit_test (test_entry_pack),
    };
    return cmocka_run_group_tests_name ("event", tests, NULL, NULL);
}
