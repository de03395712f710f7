/*  test_msg.c -- the untrusted-msgpack gate (msg.h) and the buffer and
    packer it sits next to (buf.h).

    tly_msg_check stands between the network and msgpack-c's allocating
    unpacker, so most cases here are hostile: lying counts, truncations at
    every byte, nesting that would overflow a recursive parser, and a
    differential run against msgpack-c itself.
*/
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "tally/buf.h"
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
assert_hex (const tly_buf *b, const char *hex)
{
    tly_buf want;
    tly_buf_init (&want);
    hex_append (&want, hex);
    if (b->len != want.len || (b->len && memcmp (b->data, want.data, b->len)))
        fail_msg ("bytes differ from %s", hex);
    tly_buf_free (&want);
}

static const tly_msg_limits s_wide = { TLY_MSG_DEPTH_MAX, SIZE_MAX };

static int
check_hex_lim (const char *hex, const tly_msg_limits *lim, const char **why)
{
    tly_buf b;
    tly_buf_init (&b);
    hex_append (&b, hex);
    int rc = tly_msg_check (b.data, b.len, lim, why);
    tly_buf_free (&b);
    return rc;
}

static int
check_hex (const char *hex)
{
    const char *why = NULL;
    int rc = check_hex_lim (hex, NULL, &why);
    /* Every refusal explains itself; success leaves *why alone. */
    if (rc != TLY_OK)
        assert_non_null (why);
    else
        assert_null (why);
    return rc;
}

/*  `n` copies of `byte` followed by `last`. */
static void
repeat (tly_buf *b, uint8_t byte, size_t n, uint8_t last)
{
    assert_int_equal (tly_buf_reserve (b, n + 1), TLY_OK);
    memset (b->data + b->len, byte, n);
    b->len += n;
    tly_buf_append (b, &last, 1);
}

/*  What msgpack-c makes of the bytes, unpacking the whole buffer. */
static msgpack_unpack_return
mp_unpack (const uint8_t *p, size_t n)
{
    msgpack_zone zone;
    msgpack_zone_init (&zone, 256);
    msgpack_object o;
    size_t off = 0;
    msgpack_unpack_return r = msgpack_unpack ((const char *) p, n, &off, &zone, &o);
    msgpack_zone_destroy (&zone);
    return r;
}

/*  --- tly_msg_check: what it accepts ---------------------------------- */

static void
test_check_accepts_every_format (void **state)
{
    (void) state;
    static const char *const good [] = {
        "00", "7f", "e0", "ff",                         /* fixints */
        "c0", "c2", "c3",                               /* nil, false, true */
        "cc ff", "cd ff ff", "ce ff ff ff ff", "cf ff ff ff ff ff ff ff ff",
        "d0 80", "d1 80 00", "d2 80 00 00 00", "d3 80 00 00 00 00 00 00 00",
        "ca 3f c0 00 00", "cb 3f f8 00 00 00 00 00 00",
        "a0", "a3 61 62 63", "d9 00", "d9 02 61 62", "da 00 01 61",
        "db 00 00 00 01 61",
        "c4 00", "c4 02 01 02", "c5 00 01 01", "c6 00 00 00 01 01",
        "c7 00 05", "c7 01 05 aa", "c8 00 01 05 aa", "c9 00 00 00 01 05 aa",
        "d4 05 aa", "d5 05 aa bb", "d6 05 00 00 00 00",
        "d7 ff 00 00 00 00 00 00 00 00",
        "d8 05 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00",
        "90", "80", "dc 00 00", "dd 00 00 00 00", "de 00 00", "df 00 00 00 00",
        "92 01 02", "dc 00 02 01 02", "dd 00 00 00 02 01 02",
        "82 a1 61 01 a1 62 02", "de 00 01 c0 c0", "df 00 00 00 01 c0 c0",
        "81 a1 61 91 80",                               /* {"a": [{}]} */
        "93 90 91 90 92 90 90",                         /* [[], [[]], [[], []]] */
        "81 91 c0 81 c0 c0",                            /* {[nil]: {nil: nil}} */
    };
    for (size_t i = 0; i < sizeof good / sizeof good [0]; i++) {
        if (check_hex (good [i]) != TLY_OK)
            fail_msg ("rejected: %s", good [i]);
        tly_buf b;
        tly_buf_init (&b);
        hex_append (&b, good [i]);
        assert_int_equal (mp_unpack (b.data, b.len), MSGPACK_UNPACK_SUCCESS);
        tly_buf_free (&b);
    }
}

/*  --- tly_msg_check: what it refuses ---------------------------------- */

static void
test_check_garbage (void **state)
{
    (void) state;
    assert_int_equal (check_hex (""), TLY_EINVAL);
    assert_int_equal (check_hex ("c1"), TLY_EINVAL);
    assert_int_equal (check_hex ("91 c1"), TLY_EINVAL);
    assert_int_equal (check_hex ("81 c1 c0"), TLY_EINVAL);
    assert_int_equal (check_hex ("81 c0 c1"), TLY_EINVAL);
    assert_int_equal (check_hex ("68 65 6c 6c 6f"), TLY_EINVAL);   /* "hello" */
    assert_int_equal (check_hex ("7b 22 6f 70 22 3a 31 7d"), TLY_EINVAL);  /* JSON */
    assert_int_equal (check_hex ("a5 68 65"), TLY_EINVAL);
    const char *why = NULL;
    assert_int_equal (check_hex_lim ("c1", NULL, &why), TLY_EINVAL);
    assert_string_equal (why, "msgpack: reserved byte 0xc1");
    /* A NULL why is allowed. */
    assert_int_equal (check_hex_lim ("c1", NULL, NULL), TLY_EINVAL);
}

/*  Headers whose counts no remaining bytes could fill: refused before any
    allocation (msgpack-c would reserve count * 24 bytes up front). */
static void
test_check_lying_counts (void **state)
{
    (void) state;
    const char *why = NULL;
    assert_int_equal (check_hex_lim ("dd ff 00 00 00", NULL, &why), TLY_EINVAL);
    assert_string_equal (why, "msgpack: count exceeds the bytes that remain");
    assert_int_equal (check_hex ("df ff ff ff ff"), TLY_EINVAL);
    assert_int_equal (check_hex ("df ff ff ff ff c0 c0 c0 c0"), TLY_EINVAL);
    assert_int_equal (check_hex ("dd ff ff ff ff c0"), TLY_EINVAL);
    assert_int_equal (check_hex ("dc ff ff"), TLY_EINVAL);
    assert_int_equal (check_hex ("de ff ff c0 c0"), TLY_EINVAL);
    /* a count N needs N bytes, a map of N needs 2N */
    assert_int_equal (check_hex ("dc 00 03 c0 c0"), TLY_EINVAL);
    assert_int_equal (check_hex ("dc 00 03 c0 c0 c0"), TLY_OK);
    assert_int_equal (check_hex ("de 00 02 c0 c0 c0"), TLY_EINVAL);
    assert_int_equal (check_hex ("de 00 02 c0 c0 c0 c0"), TLY_OK);
    assert_int_equal (check_hex ("93 c0 c0"), TLY_EINVAL);
    /* the outer array's last element is owed too */
    assert_int_equal (check_hex ("92 dd 00 00 00 05 c0 c0 c0 c0 c0"), TLY_EINVAL);
    assert_int_equal (check_hex ("92 dd 00 00 00 05 c0 c0 c0 c0 c0 c0"), TLY_OK);
    /* and with the wide limits too */
    assert_int_equal (check_hex_lim ("dd ff 00 00 00", &s_wide, NULL), TLY_EINVAL);
    assert_int_equal (check_hex_lim ("df ff ff ff ff", &s_wide, NULL), TLY_EINVAL);
}

static void
test_check_truncated_lengths (void **state)
{
    (void) state;
    static const char *const bad [] = {
        "db 00 00 00 10 61 62",                         /* str32 of 16, 2 present */
        "db ff ff ff ff",                               /* str32 of 4 GiB */
        "db 00 00",                                     /* header itself cut */
        "da 00 02 61", "d9 03 61 62", "a2 61",
        "c6 ff ff ff ff", "c5 00 02 01", "c4 01",
        "c9 ff ff ff ff 01", "c9 00 00 00 00", "c7 05 01 00", "c7 00",
        "d8 01 00", "d4 01", "d4",
        "cf 00", "cb 00 00", "ca", "cc", "d3 00 00 00 00 00 00 00",
        "dc 00", "dd 00 00 00", "de 00", "df 00 00 00",
        "91", "81 c0", "92 c0",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad [0]; i++)
        if (check_hex (bad [i]) != TLY_EINVAL)
            fail_msg ("accepted: %s", bad [i]);
}

static void
test_check_trailing_bytes (void **state)
{
    (void) state;
    const char *why = NULL;
    assert_int_equal (check_hex_lim ("c0 c0", NULL, &why), TLY_EINVAL);
    assert_string_equal (why, "msgpack: trailing bytes after the object");
    assert_int_equal (check_hex ("80 00"), TLY_EINVAL);
    assert_int_equal (check_hex ("90 90"), TLY_EINVAL);
    assert_int_equal (check_hex ("81 a1 61 01 00"), TLY_EINVAL);
    assert_int_equal (check_hex ("a1 61 a1"), TLY_EINVAL);
}

/*  A parser that recursed per level would overflow its stack here; the
    check keeps constant stack and refuses at the limit. */
static void
test_check_deep_nesting (void **state)
{
    (void) state;
    static const uint8_t containers [] = { 0x91, 0xdc, 0xdd, 0x81 };
    for (size_t k = 0; k < sizeof containers; k++) {
        tly_buf b;
        tly_buf_init (&b);
        for (size_t i = 0; i < 100000; i++) {
            switch (containers [k]) {
                case 0x91: hex_append (&b, "91"); break;
                case 0xdc: hex_append (&b, "dc 00 01"); break;
                case 0xdd: hex_append (&b, "dd 00 00 00 01"); break;
                default:   hex_append (&b, "81 c0"); break;         /* {nil: ...} */
            }
        }
        hex_append (&b, "c0");
        const char *why = NULL;
        assert_int_equal (tly_msg_check (b.data, b.len, NULL, &why), TLY_EINVAL);
        assert_string_equal (why, "msgpack: nested too deep");
        /* Asking for more depth than msgpack-c can unpack is clamped. */
        tly_msg_limits huge = { SIZE_MAX, SIZE_MAX };
        assert_int_equal (tly_msg_check (b.data, b.len, &huge, NULL), TLY_EINVAL);
        tly_buf_free (&b);
    }
}

static int
check_nested (size_t n, uint8_t last, const tly_msg_limits *lim)
{
    tly_buf b;
    tly_buf_init (&b);
    repeat (&b, 0x91, n, last);
    int rc = tly_msg_check (b.data, b.len, lim, NULL);
    if (rc == TLY_OK)       /* whatever we pass, msgpack-c can unpack */
        assert_int_equal (mp_unpack (b.data, b.len), MSGPACK_UNPACK_SUCCESS);
    tly_buf_free (&b);
    return rc;
}

static void
test_check_depth_boundary (void **state)
{
    (void) state;
    /* Request limits: 8 nested containers. */
    assert_int_equal (tly_msg_request_limits.max_depth, 8);
    assert_int_equal (check_nested (8, 0xc0, NULL), TLY_OK);     /* [[[[[[[[nil]]]]]]]] */
    assert_int_equal (check_nested (9, 0xc0, NULL), TLY_EINVAL);
    assert_int_equal (check_nested (7, 0x90, NULL), TLY_OK);     /* empty array is 8th */
    assert_int_equal (check_nested (8, 0x90, NULL), TLY_EINVAL); /* ... or 9th */
    assert_int_equal (check_nested (7, 0x80, NULL), TLY_OK);
    assert_int_equal (check_nested (8, 0x80, NULL), TLY_EINVAL);
    /* Scalars add no depth. */
    tly_msg_limits flat = { 0, 100 };
    assert_int_equal (check_hex_lim ("c0", &flat, NULL), TLY_OK);
    assert_int_equal (check_hex_lim ("90", &flat, NULL), TLY_EINVAL);
    tly_msg_limits two = { 2, 100 };
    assert_int_equal (check_hex_lim ("81 a1 61 91 01", &two, NULL), TLY_OK);
    assert_int_equal (check_hex_lim ("81 a1 61 91 91 01", &two, NULL), TLY_EINVAL);
    /* Depth is nesting, not the number of containers seen. */
    assert_int_equal (check_hex_lim ("94 91 c0 91 c0 91 91 c0 90", &two, NULL), TLY_EINVAL);
    assert_int_equal (check_hex_lim ("94 91 c0 91 c0 91 c0 90", &two, NULL), TLY_OK);
    /* The most msgpack-c can unpack (its stack holds 32 open containers). */
    assert_int_equal (check_nested (TLY_MSG_DEPTH_MAX, 0xc0, &s_wide), TLY_OK);
    assert_int_equal (check_nested (TLY_MSG_DEPTH_MAX + 1, 0xc0, &s_wide), TLY_EINVAL);
}

static void
test_check_object_limits (void **state)
{
    (void) state;
    const char *why = NULL;
    tly_msg_limits ten = { 8, 10 };
    assert_int_equal (check_hex_lim ("99 c0 c0 c0 c0 c0 c0 c0 c0 c0", &ten, NULL), TLY_OK);
    assert_int_equal (check_hex_lim ("9a c0 c0 c0 c0 c0 c0 c0 c0 c0 c0", &ten, &why), TLY_ETOOLARGE);
    assert_string_equal (why, "msgpack: too many objects");
    /* nested containers count once each, map keys and values each count */
    assert_int_equal (check_hex_lim ("93 91 c0 91 c0 92 c0 c0", &ten, NULL), TLY_OK);
    assert_int_equal (check_hex_lim ("93 93 c0 c0 c0 91 c0 93 c0 c0 c0", &ten, NULL), TLY_ETOOLARGE);
    tly_msg_limits three = { 8, 3 }, two = { 8, 2 }, none = { 8, 0 };
    assert_int_equal (check_hex_lim ("81 c0 c0", &three, NULL), TLY_OK);
    assert_int_equal (check_hex_lim ("81 c0 c0", &two, NULL), TLY_ETOOLARGE);
    assert_int_equal (check_hex_lim ("c0", &none, NULL), TLY_ETOOLARGE);

    /* Request limits: 2,000,000 objects, counting the array itself. */
    assert_int_equal (tly_msg_request_limits.max_objects, 2000000);
    tly_buf b;
    tly_buf_init (&b);
    hex_append (&b, "dd 00 1e 84 7f");                 /* 1,999,999 nils */
    repeat (&b, 0xc0, 1999998, 0xc0);
    assert_int_equal (tly_msg_check (b.data, b.len, NULL, NULL), TLY_OK);
    tly_buf_reset (&b);
    hex_append (&b, "dd 00 1e 84 80");                 /* 2,000,000 nils */
    repeat (&b, 0xc0, 1999999, 0xc0);
    assert_int_equal (tly_msg_check (b.data, b.len, NULL, &why), TLY_ETOOLARGE);
    tly_buf_free (&b);
}

/*  A message with every kind of object, cut at every length. */
static void
test_check_every_truncation (void **state)
{
    (void) state;
    tly_buf b;
    tly_buf_init (&b);
    msgpack_packer pk;
    tly_buf_packer (&b, &pk);
    msgpack_pack_map (&pk, 7);
    tly_pack_cstr (&pk, "op");      tly_pack_cstr (&pk, "ingest");
    tly_pack_cstr (&pk, "id");      msgpack_pack_uint64 (&pk, UINT64_C (1) << 40);
    tly_pack_cstr (&pk, "neg");     msgpack_pack_int64 (&pk, -100000);
    tly_pack_cstr (&pk, "f");       msgpack_pack_double (&pk, 1.5);
    tly_pack_cstr (&pk, "bin");
    uint8_t blob [300] = { 0 };
    tly_pack_bin (&pk, blob, sizeof blob);
    tly_pack_cstr (&pk, "ext");     msgpack_pack_ext (&pk, 3, 7);
    msgpack_pack_ext_body (&pk, "abc", 3);
    tly_pack_cstr (&pk, "events");
    msgpack_pack_array (&pk, 2);
    for (int i = 0; i < 2; i++) {
        msgpack_pack_map (&pk, 3);
        tly_pack_cstr (&pk, "customer"); tly_pack_str (&pk, (const char *) blob, 40);
        tly_pack_cstr (&pk, "ok");       msgpack_pack_true (&pk);
        tly_pack_cstr (&pk, "props");
        msgpack_pack_map (&pk, 1);
        tly_pack_cstr (&pk, "k");        msgpack_pack_nil (&pk);
    }
    assert_false (b.oom);
    assert_int_equal (tly_msg_check (b.data, b.len, NULL, NULL), TLY_OK);
    for (size_t n = 0; n < b.len; n++) {
        const char *why = NULL;
        if (tly_msg_check (b.data, n, NULL, &why) != TLY_EINVAL)
            fail_msg ("prefix of %zu bytes not refused", n);
        assert_non_null (why);
    }
    tly_buf_free (&b);
}

/*  Differential: on every 1- and 2-byte input, and on many random short
    ones, the check and msgpack-c agree on what is one complete object. */
static void
assert_agrees (const uint8_t *p, size_t n, bool may_unpack_anything)
{
    int rc = tly_msg_check (p, n, &s_wide, NULL);
    if (rc == TLY_OK) {
        if (mp_unpack (p, n) != MSGPACK_UNPACK_SUCCESS) {
            fprintf (stderr, "input:");
            for (size_t i = 0; i < n; i++)
                fprintf (stderr, " %02x", p [i]);
            fail_msg ("check passed what msgpack-c refuses");
        }
    }
    else if (may_unpack_anything && mp_unpack (p, n) == MSGPACK_UNPACK_SUCCESS) {
        fprintf (stderr, "input:");
        for (size_t i = 0; i < n; i++)
            fprintf (stderr, " %02x", p [i]);
        fail_msg ("check refused what msgpack-c reads");
    }
}

static void
test_check_agrees_with_msgpack_c (void **state)
{
    (void) state;
    uint8_t p [16];
    /* Too short for any count over 15: msgpack-c may run on all of them. */
    for (unsigned a = 0; a < 256; a++) {
        p [0] = (uint8_t) a;
        assert_agrees (p, 1, true);
        for (unsigned b = 0; b < 256; b++) {
            p [1] = (uint8_t) b;
            assert_agrees (p, 2, true);
        }
    }
    /* Random inputs built mostly from headers and small lengths. */
    static const uint8_t alphabet [] = {
        0x00, 0x01, 0x02, 0x03, 0x7f, 0x80, 0x81, 0x82, 0x90, 0x91, 0x92, 0x93,
        0xa0, 0xa1, 0xa2, 0xc0, 0xc1, 0xc2, 0xc4, 0xc7, 0xca, 0xcc, 0xcd, 0xd0,
        0xd4, 0xd5, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff,
    };
    uint32_t seed = 12345;
    for (int iter = 0; iter < 300000; iter++) {
        seed = seed * 1103515245u + 12345u;
        size_t n = 1 + (seed >> 16) % sizeof p;
        bool wide_count = false;
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            p [i] = alphabet [(seed >> 16) % sizeof alphabet];
            wide_count |= p [i] == 0xdd || p [i] == 0xdf || p [i] == 0xdc || p [i] == 0xde;
        }
        /* Unchecked 32-bit counts would make msgpack-c allocate gigabytes. */
        assert_agrees (p, n, !wide_count);
    }
}

/*  --- tly_msg_unpack and the getters ---------------------------------- */

static void
test_unpack_is_zero_copy (void **state)
{
    (void) state;
    /* {"a": "xyz", "b": bin [1, 2]} */
    static const uint8_t buf [] = {
        0x82, 0xa1, 0x61, 0xa3, 0x78, 0x79, 0x7a, 0xa1, 0x62, 0xc4, 0x02, 0x01, 0x02,
    };
    assert_int_equal (tly_msg_check (buf, sizeof buf, NULL, NULL), TLY_OK);
    msgpack_zone zone;
    msgpack_zone_init (&zone, 256);
    msgpack_object o;
    assert_int_equal (tly_msg_unpack (buf, sizeof buf, &zone, &o), TLY_OK);
    tly_str s, bin;
    assert_int_equal (tly_msg_get_str (&o, "a", &s), TLY_OK);
    assert_ptr_equal (s.ptr, (const char *) buf + 4);
    assert_int_equal (s.len, 3);
    assert_int_equal (tly_msg_get_bin (&o, "b", &bin), TLY_OK);
    assert_ptr_equal (bin.ptr, (const char *) buf + 11);
    assert_int_equal (bin.len, 2);
    msgpack_zone_destroy (&zone);
}

static void
test_unpack_errors (void **state)
{
    (void) state;
    msgpack_zone zone;
    msgpack_zone_init (&zone, 256);
    msgpack_object o;
    static const uint8_t cut [] = { 0x92, 0x01 }, reserved [] = { 0xc1 };
    assert_int_equal (tly_msg_unpack (cut, sizeof cut, &zone, &o), TLY_EINVAL);
    assert_int_equal (tly_msg_unpack (reserved, 1, &zone, &o), TLY_EINVAL);
    assert_int_equal (tly_msg_unpack (cut, 0, &zone, &o), TLY_EINVAL);
    msgpack_zone_destroy (&zone);
}

/*  msgpack-c 4.0 reads int8..int64 holding a non-negative value as a
    POSITIVE_INTEGER; our uint getters rely on that. */
static void
test_unpack_signed_formats (void **state)
{
    (void) state;
    msgpack_zone zone;
    msgpack_zone_init (&zone, 256);
    msgpack_object o;
    static const uint8_t five [] = { 0xd0, 0x05 }, minus [] = { 0xd0, 0xff };
    assert_int_equal (tly_msg_unpack (five, 2, &zone, &o), TLY_OK);
    assert_int_equal (o.type, MSGPACK_OBJECT_POSITIVE_INTEGER);
    assert_int_equal (o.via.u64, 5);
    assert_int_equal (tly_msg_unpack (minus, 2, &zone, &o), TLY_OK);
    assert_int_equal (o.type, MSGPACK_OBJECT_NEGATIVE_INTEGER);
    assert_true (o.via.i64 == -1);
    msgpack_zone_destroy (&zone);
}

static void
test_getters (void **state)
{
    (void) state;
    /* {"u":5, "n":-1, "s":"x", "b":bin"\x01", "t":true, "z":nil, "f":1.5,
        1:"int key", "u":6, "":"empty"} */
    tly_buf b;
    tly_buf_init (&b);
    hex_append (&b,
        "8a"
        "a1 75 05"
        "a1 6e ff"
        "a1 73 a1 78"
        "a1 62 c4 01 01"
        "a1 74 c3"
        "a1 7a c0"
        "a1 66 cb 3f f8 00 00 00 00 00 00"
        "01 a7 69 6e 74 20 6b 65 79"
        "a1 75 06"
        "a0 a5 65 6d 70 74 79");
    assert_int_equal (tly_msg_check (b.data, b.len, NULL, NULL), TLY_OK);
    msgpack_zone zone;
    msgpack_zone_init (&zone, 256);
    msgpack_object o;
    assert_int_equal (tly_msg_unpack (b.data, b.len, &zone, &o), TLY_OK);

    uint64_t u = 99;
    tly_str s = { NULL, 0 };
    bool t = false;
    assert_int_equal (tly_msg_get_uint (&o, "u", &u), TLY_OK);
    assert_int_equal (u, 5);                        /* the first "u" wins */
    assert_int_equal (tly_msg_get_uint (&o, "n", &u), TLY_EINVAL);
    assert_int_equal (tly_msg_get_uint (&o, "s", &u), TLY_EINVAL);
    assert_int_equal (tly_msg_get_uint (&o, "f", &u), TLY_EINVAL);
    assert_int_equal (tly_msg_get_uint (&o, "z", &u), TLY_ENOTFOUND);
    assert_int_equal (tly_msg_get_uint (&o, "missing", &u), TLY_ENOTFOUND);
    assert_int_equal (u, 5);                        /* untouched on failure */

    assert_int_equal (tly_msg_get_str (&o, "s", &s), TLY_OK);
    assert_int_equal (s.len, 1);
    assert_memory_equal (s.ptr, "x", 1);
    assert_int_equal (tly_msg_get_str (&o, "b", &s), TLY_EINVAL);
    assert_int_equal (tly_msg_get_str (&o, "z", &s), TLY_ENOTFOUND);
    assert_int_equal (tly_msg_get_str (&o, "", &s), TLY_OK);
    assert_int_equal (s.len, 5);

    assert_int_equal (tly_msg_get_bin (&o, "b", &s), TLY_OK);
    assert_int_equal (s.len, 1);
    assert_int_equal (tly_msg_get_bin (&o, "s", &s), TLY_EINVAL);
    assert_int_equal (tly_msg_get_bin (&o, "nope", &s), TLY_ENOTFOUND);

    assert_int_equal (tly_msg_get_bool (&o, "t", &t), TLY_OK);
    assert_true (t);
    assert_int_equal (tly_msg_get_bool (&o, "u", &t), TLY_EINVAL);
    assert_int_equal (tly_msg_get_bool (&o, "z", &t), TLY_ENOTFOUND);

    assert_non_null (tly_msg_get (&o, "z"));        /* nil is present to get */
    assert_null (tly_msg_get (&o, "int key"));      /* non-str keys never match */
    assert_null (tly_msg_get (NULL, "u"));
    const msgpack_object *str = tly_msg_get (&o, "s");
    assert_null (tly_msg_get (str, "s"));           /* not a map */
    assert_int_equal (tly_msg_get_uint (str, "s", &u), TLY_ENOTFOUND);

    assert_true (tly_msg_streq (str, "x"));
    assert_false (tly_msg_streq (str, "xy"));
    assert_false (tly_msg_streq (str, ""));
    assert_false (tly_msg_streq (tly_msg_get (&o, "u"), "5"));
    assert_false (tly_msg_streq (NULL, "x"));
    msgpack_zone_destroy (&zone);
    tly_buf_free (&b);
}

/*  --- tly_buf and the packer ------------------------------------------ */

static void
test_buf_grows_and_resets (void **state)
{
    (void) state;
    tly_buf b;
    tly_buf_init (&b);
    assert_null (b.data);
    for (unsigned i = 0; i < 100000; i++) {
        uint8_t c = (uint8_t) i;
        assert_int_equal (tly_buf_append (&b, &c, 1), TLY_OK);
    }
    assert_int_equal (b.len, 100000);
    for (unsigned i = 0; i < 100000; i++)
        assert_int_equal (b.data [i], (uint8_t) i);
    size_t cap = b.cap;
    tly_buf_reset (&b);
    assert_int_equal (b.len, 0);
    assert_int_equal (b.cap, cap);              /* memory kept */
    assert_int_equal (tly_buf_append (&b, NULL, 0), TLY_OK);
    assert_int_equal (b.len, 0);
    tly_buf_free (&b);
    assert_null (b.data);
    assert_int_equal (b.cap, 0);
    tly_buf_free (&b);                          /* twice is harmless */
}

static void
test_buf_oom_latches (void **state)
{
    (void) state;
    tly_buf b;
    tly_buf_init (&b);
    assert_int_equal (tly_buf_append (&b, "a", 1), TLY_OK);
    /* len + SIZE_MAX overflows: refused without asking malloc */
    assert_int_equal (tly_buf_reserve (&b, SIZE_MAX), TLY_ENOMEM);
    assert_true (b.oom);
    assert_int_equal (tly_buf_append (&b, "b", 1), TLY_ENOMEM);
    assert_int_equal (b.len, 1);                /* later writes dropped */
    msgpack_packer pk;
    tly_buf_packer (&b, &pk);
    msgpack_pack_nil (&pk);
    assert_int_equal (b.len, 1);
    tly_buf_reset (&b);                         /* a new message, a clean slate */
    assert_false (b.oom);
    assert_int_equal (tly_buf_append (&b, "c", 1), TLY_OK);
    tly_buf_free (&b);
}

static void
assert_packed (void (*pack) (msgpack_packer *, size_t), size_t n,
               const char *head_hex, size_t body)
{
    tly_buf b, want;
    tly_buf_init (&b);
    tly_buf_init (&want);
    msgpack_packer pk;
    tly_buf_packer (&b, &pk);
    pack (&pk, n);
    hex_append (&want, head_hex);
    assert_true (b.len == want.len + body);
    assert_memory_equal (b.data, want.data, want.len);
    tly_buf_free (&b);
    tly_buf_free (&want);
}

static char s_body [70000];

static void pack_str (msgpack_packer *pk, size_t n) { tly_pack_str (pk, s_body, n); }
static void pack_bin (msgpack_packer *pk, size_t n) { tly_pack_bin (pk, s_body, n); }
static void pack_uint (msgpack_packer *pk, size_t n) { msgpack_pack_uint64 (pk, n); }
static void pack_map (msgpack_packer *pk, size_t n) { msgpack_pack_map (pk, n); }
static void pack_array (msgpack_packer *pk, size_t n) { msgpack_pack_array (pk, n); }

/*  The formats PROTOCOL.md section 3 relies on, as msgpack-c 4.0 picks them. */
static void
test_packer_picks_smallest_formats (void **state)
{
    (void) state;
    memset (s_body, 'x', sizeof s_body);
    assert_packed (pack_str, 0,     "a0", 0);
    assert_packed (pack_str, 31,    "bf", 31);
    assert_packed (pack_str, 32,    "d9 20", 32);
    assert_packed (pack_str, 255,   "d9 ff", 255);
    assert_packed (pack_str, 256,   "da 01 00", 256);
    assert_packed (pack_str, 65535, "da ff ff", 65535);
    assert_packed (pack_str, 65536, "db 00 01 00 00", 65536);
    assert_packed (pack_bin, 0,     "c4 00", 0);
    assert_packed (pack_bin, 255,   "c4 ff", 255);
    assert_packed (pack_bin, 256,   "c5 01 00", 256);
    assert_packed (pack_bin, 65536, "c6 00 01 00 00", 65536);
    assert_packed (pack_uint, 127,   "7f", 0);
    assert_packed (pack_uint, 128,   "cc 80", 0);
    assert_packed (pack_uint, 255,   "cc ff", 0);
    assert_packed (pack_uint, 256,   "cd 01 00", 0);
    assert_packed (pack_uint, 65535, "cd ff ff", 0);
    assert_packed (pack_uint, 65536, "ce 00 01 00 00", 0);
    assert_packed (pack_map, 15,    "8f", 0);
    assert_packed (pack_map, 16,    "de 00 10", 0);
    assert_packed (pack_array, 15,  "9f", 0);
    assert_packed (pack_array, 16,  "dc 00 10", 0);
    assert_packed (pack_array, 65536, "dd 00 01 00 00", 0);

    tly_buf b;
    tly_buf_init (&b);
    msgpack_packer pk;
    tly_buf_packer (&b, &pk);
    tly_pack_cstr (&pk, "op");
    msgpack_pack_uint64 (&pk, UINT64_C (4294967296));
    msgpack_pack_uint64 (&pk, UINT64_MAX);
    assert_hex (&b, "a2 6f 70 cf 00 00 00 01 00 00 00 00 cf ff ff ff ff ff ff ff ff");
    tly_buf_free (&b);
}

int
main (void)
{
    const struct CMUnitTest tests [] = {
        cmocka_unit_test (test_check_accepts_every_format),
        cmocka_unit_test (test_check_garbage),
        cmocka_unit_test (test_check_lying_counts),
        cmocka_unit_test (test_check_truncated_lengths),
        cmocka_unit_test (test_check_trailing_bytes),
        cmocka_unit_test (test_check_deep_nesting),
        cmocka_unit_test (test_check_depth_boundary),
        cmocka_unit_test (test_check_object_limits),
        cmocka_unit_test (test_check_every_truncation),
        cmocka_unit_test (test_check_agrees_with_msgpack_c),
        cmocka_unit_test (test_unpack_is_zero_copy),
        cmocka_unit_test (test_unpack_errors),
        cmocka_unit_test (test_unpack_signed_formats),
        cmocka_unit_test (test_getters),
        cmocka_unit_test (test_buf_grows_and_resets),
        cmocka_unit_test (test_buf_oom_latches),
        cmocka_unit_test (test_packer_picks_smallest_formats),
    };
    return cmocka_run_group_tests_name ("msg", tests, NULL, NULL);
}
