/*  test_proto.c -- the actors' link messages (actors/proto.h): an APPEND
    item with and without the seq ingest found, and the runs it asked.
    Links carry only what tallyd's own actors wrote, but the receipt
    actor trusts the asked runs to skip part of the index, so anything
    that is not exactly a strictly ascending list must be refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include "proto.h"

/*  Unpacks what buf holds into obj (zone owns it). */
static void
roundtrip (tly_buf *buf, msgpack_zone *zone, msgpack_object *obj)
{
    assert_false (buf->oom);
    size_t off = 0;
    msgpack_zone_init (zone, 1024);
    assert_int_equal (msgpack_unpack ((const char *) buf->data, buf->len, &off, zone, obj),
                      MSGPACK_UNPACK_SUCCESS);
    assert_int_equal (off, buf->len);
}

static void
test_item_seq (void **state)
{
    (void) state;
    tly_item it = { .idx = 7, .tail = { "\x01\x02", 2 }, .customer = { "acme", 4 },
                    .key = { "k-1", 3 }, .meter = { "api.calls", 9 }, .qty = 5, .ts = 99 };
    memset (it.dedup, 0xab, sizeof it.dedup);
    for (int found = 0; found < 2; found++) {
        it.found = found;
        it.seq = found ? 0 : 12345;         /* seq 0 is an entry like any other */
        tly_buf buf;
        tly_buf_init (&buf);
        msgpack_packer pk;
        tly_buf_packer (&buf, &pk);
        tly_item_pack (&pk, &it);
        msgpack_zone zone;
        msgpack_object obj;
        roundtrip (&buf, &zone, &obj);
        assert_int_equal (obj.via.array.size, found ? 9 : 8);
        tly_item back;
        memset (&back, 0x55, sizeof back);
        assert_int_equal (tly_item_decode (&obj, &back), TLY_OK);
        assert_int_equal (back.found, found);
        if (found)
            assert_int_equal (back.seq, 0);
        assert_int_equal (back.idx, 7);
        assert_int_equal (back.qty, 5);
        assert_memory_equal (back.dedup, it.dedup, TLY_DEDUP_LEN);
        /*  A seq that is not a uint is refused. */
        if (found) {
            obj.via.array.ptr[8].type = MSGPACK_OBJECT_NEGATIVE_INTEGER;
            assert_int_equal (tly_item_decode (&obj, &back), TLY_EINVAL);
        }
        msgpack_zone_destroy (&zone);
        tly_buf_free (&buf);
    }
}

/*  Decodes the bin of `n` big-endian ids in `ids`. */
static int
asked_of (const uint32_t *ids, size_t n, uint32_t *out, size_t *nout)
{
    uint8_t raw[4 * (TLY_DEDUP_RUNS_MAX + 1)];
    for (size_t i = 0; i < n; i++) {
        raw[4 * i] = (uint8_t) (ids[i] >> 24);
        raw[4 * i + 1] = (uint8_t) (ids[i] >> 16);
        raw[4 * i + 2] = (uint8_t) (ids[i] >> 8);
        raw[4 * i + 3] = (uint8_t) ids[i];
    }
    msgpack_object o = { .type = MSGPACK_OBJECT_BIN };
    o.via.bin.ptr = (const char *) raw;
    o.via.bin.size = (uint32_t) (4 * n);
    return tly_asked_decode (&o, out, nout);
}

static void
test_asked (void **state)
{
    (void) state;
    uint32_t ids[TLY_DEDUP_RUNS_MAX + 1], out[TLY_DEDUP_RUNS_MAX];
    size_t n = 99;
    for (uint32_t i = 0; i <= TLY_DEDUP_RUNS_MAX; i++)
        ids[i] = 3 + i * 0x00fefefeu;       /* every byte of the id matters */

    /*  Round trip through the packer, empty and full. */
    size_t sizes[] = { 0, 1, TLY_DEDUP_RUNS_MAX };
    for (size_t s = 0; s < 3; s++) {
        tly_buf buf;
        tly_buf_init (&buf);
        msgpack_packer pk;
        tly_buf_packer (&buf, &pk);
        tly_asked_pack (&pk, ids, sizes[s]);
        msgpack_zone zone;
        msgpack_object obj;
        roundtrip (&buf, &zone, &obj);
        assert_int_equal (tly_asked_decode (&obj, out, &n), TLY_OK);
        assert_int_equal (n, sizes[s]);
        assert_memory_equal (out, ids, sizes[s] * sizeof *ids);
        msgpack_zone_destroy (&zone);
        tly_buf_free (&buf);
    }

    /*  Too many, out of order, repeated: refused, and nothing named. */
    assert_int_equal (asked_of (ids, TLY_DEDUP_RUNS_MAX + 1, out, &n), TLY_EINVAL);
    assert_int_equal (n, 0);
    uint32_t down[] = { 5, 9, 7 }, twice[] = { 5, 9, 9 };
    assert_int_equal (asked_of (down, 3, out, &n), TLY_EINVAL);
    assert_int_equal (n, 0);
    assert_int_equal (asked_of (twice, 3, out, &n), TLY_EINVAL);
    assert_int_equal (n, 0);

    /*  Not a whole number of ids, or not a bin at all. */
    msgpack_object o = { .type = MSGPACK_OBJECT_BIN };
    o.via.bin.ptr = "\0\0\0\1\0";
    o.via.bin.size = 5;
    assert_int_equal (tly_asked_decode (&o, out, &n), TLY_EINVAL);
    o.type = MSGPACK_OBJECT_STR;
    o.via.str.ptr = "\0\0\0\1";
    o.via.str.size = 4;
    assert_int_equal (tly_asked_decode (&o, out, &n), TLY_EINVAL);
    o.type = MSGPACK_OBJECT_NIL;
    assert_int_equal (tly_asked_decode (&o, out, &n), TLY_EINVAL);
    assert_int_equal (tly_asked_decode (NULL, out, &n), TLY_EINVAL);
    assert_int_equal (n, 0);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_item_seq),
        cmocka_unit_test (test_asked),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
