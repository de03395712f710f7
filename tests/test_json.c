/*  test_json.c -- the strict JSON reader and the msgpack-to-JSON writer. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "tally/json.h"
#include "tally/msg.h"

#define NODES 64

/*  Parses a copy of `text` (the reader writes into its input). */
static int
parse (const char *text, size_t len, tly_json_node *nodes, size_t *count,
       char **copy)
{
    *copy = malloc (len + 1);
    memcpy (*copy, text, len);
    (*copy) [len] = '\0';
    return tly_json_parse (*copy, len, nodes, NODES, 4, count, NULL, NULL);
}

static int
parse_rc (const char *text)
{
    tly_json_node nodes [NODES];
    size_t count;
    char *copy;
    int rc = parse (text, strlen (text), nodes, &count, &copy);
    free (copy);
    return rc;
}

static void
test_event_object (void **state)
{
    (void) state;
    const char *text = " {\"customer\":\"acme\", \"qty\": 42, \"neg\": -7,"
                       " \"props\": {\"a\": \"b\"}, \"t\": true, \"n\": null,"
                       " \"arr\": [1, 2, []]}\r\n";
    tly_json_node nodes [NODES];
    size_t count;
    char *copy;
    assert_int_equal (parse (text, strlen (text), nodes, &count, &copy), TLY_OK);
    assert_int_equal (nodes [0].type, TLY_JSON_OBJECT);
    assert_int_equal (nodes [0].count, 7);
    assert_int_equal (nodes [0].end, count);
    long v = tly_json_find (nodes, 0, "customer");
    assert_true (v > 0);
    assert_true (tly_json_streq (&nodes [v], "acme"));
    v = tly_json_find (nodes, 0, "qty");
    assert_int_equal (nodes [v].type, TLY_JSON_INT);
    assert_int_equal (nodes [v].mag, 42);
    assert_false (nodes [v].neg);
    v = tly_json_find (nodes, 0, "neg");
    assert_true (nodes [v].neg);
    assert_int_equal (nodes [v].mag, 7);
    v = tly_json_find (nodes, 0, "props");
    assert_int_equal (nodes [v].type, TLY_JSON_OBJECT);
    long a = tly_json_find (nodes, (size_t) v, "a");
    assert_true (tly_json_streq (&nodes [a], "b"));
    assert_int_equal (nodes [tly_json_find (nodes, 0, "t")].type, TLY_JSON_TRUE);
    assert_int_equal (nodes [tly_json_find (nodes, 0, "n")].type, TLY_JSON_NULL);
    v = tly_json_find (nodes, 0, "arr");
    assert_int_equal (nodes [v].type, TLY_JSON_ARRAY);
    assert_int_equal (nodes [v].count, 3);
    assert_int_equal (tly_json_find (nodes, 0, "missing"), -1);
    assert_int_equal (tly_json_find (nodes, 1, "x"), -1);   /* not an object */
    free (copy);
}

static void
want_string (const char *json, const char *want, size_t want_len)
{
    tly_json_node nodes [NODES];
    size_t count;
    char *copy;
    assert_int_equal (parse (json, strlen (json), nodes, &count, &copy), TLY_OK);
    assert_int_equal (nodes [0].type, TLY_JSON_STRING);
    assert_int_equal (nodes [0].len, want_len);
    assert_memory_equal (nodes [0].str, want, want_len);
    assert_int_equal (nodes [0].str [want_len], '\0');
    free (copy);
}

static void
test_string_escapes (void **state)
{
    (void) state;
    want_string ("\"a\\\"b\\\\c\\/d\"", "a\"b\\c/d", 7);
    want_string ("\"\\b\\f\\n\\r\\t\"", "\b\f\n\r\t", 5);
    want_string ("\"\\u0041\\u00e9\\u20AC\"", "A\xc3\xa9\xe2\x82\xac", 6);
    want_string ("\"\\ud83d\\ude00\"", "\xf0\x9f\x98\x80", 4);    /* U+1F600 */
    want_string ("\"\\udbff\\udfff\"", "\xf4\x8f\xbf\xbf", 4);    /* U+10FFFF */
    want_string ("\"x\\u0000y\"", "x\0y", 3);
    want_string ("\"h\xc3\xa9llo \xf0\x9f\x98\x80\"", "h\xc3\xa9llo \xf0\x9f\x98\x80", 11);
    want_string ("\"\"", "", 0);
}

static void
test_integers (void **state)
{
    (void) state;
    tly_json_node nodes [NODES];
    size_t count;
    char *copy;
    assert_int_equal (parse ("18446744073709551615", 20, nodes, &count, &copy), TLY_OK);
    assert_true (nodes [0].mag == UINT64_MAX);
    free (copy);
    assert_int_equal (parse ("-9223372036854775808", 20, nodes, &count, &copy), TLY_OK);
    assert_true (nodes [0].neg && nodes [0].mag == (UINT64_C (1) << 63));
    free (copy);
    assert_int_equal (parse ("-0", 2, nodes, &count, &copy), TLY_OK);
    assert_false (nodes [0].neg);
    free (copy);
    assert_int_equal (parse_rc ("18446744073709551616"), TLY_EINVAL);
    assert_int_equal (parse_rc ("-9223372036854775809"), TLY_EINVAL);
    assert_int_equal (parse_rc ("1.5"), TLY_EINVAL);
    assert_int_equal (parse_rc ("1e3"), TLY_EINVAL);
    assert_int_equal (parse_rc ("01"), TLY_EINVAL);
    assert_int_equal (parse_rc ("-"), TLY_EINVAL);
    assert_int_equal (parse_rc ("+1"), TLY_EINVAL);
    assert_int_equal (parse_rc ("0x10"), TLY_EINVAL);
}

static void
test_malformed (void **state)
{
    (void) state;
    static const char *bad [] = {
        "", "   ", "{", "}", "{\"a\"}", "{\"a\":}", "{\"a\":1,}", "{,}",
        "{\"a\":1 \"b\":2}", "{a:1}", "{'a':1}", "[1,]", "[1 2]", "[",
        "\"unterminated", "\"bad \\x escape\"", "\"\\u12\"", "\"\\u12g4\"",
        "\"\\ud83d\"", "\"\\ud83d\\u0041\"", "\"\\ude00\"", "\"\\ud83dx\"",
        "\"tab\there\"", "\"nl\nhere\"",
        "\"\xc0\xaf\"",                 /* overlong '/' */
        "\"\xed\xa0\x80\"",             /* UTF-8 surrogate */
        "\"\xf4\x90\x80\x80\"",         /* above U+10FFFF */
        "\"\xe2\x82\"",                 /* truncated sequence */
        "\"\x80\"",                     /* lone continuation */
        "\"\xff\"",
        "tru", "nul", "True", "{} {}", "{}x", "1 2", "NaN", "Infinity",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad [0]; i++) {
        int rc = parse_rc (bad [i]);
        if (rc != TLY_EINVAL)
            fail_msg ("accepted or misjudged #%zu: '%s' (rc %d)", i, bad [i], rc);
    }
    /*  An embedded NUL byte is not JSON whitespace. */
    tly_json_node nodes [NODES];
    size_t count;
    char *copy;
    assert_int_equal (parse ("{}\0", 3, nodes, &count, &copy), TLY_EINVAL);
    free (copy);
}

static void
test_bounds (void **state)
{
    (void) state;
    tly_json_node nodes [4];
    size_t count;
    const char *why = NULL;
    size_t at = 0;
    char deep [] = "[[[[[1]]]]]";
    assert_int_equal (tly_json_parse (deep, strlen (deep), nodes, 4, 8, &count,
                                      &why, &at), TLY_ETOOLARGE);
    assert_non_null (why);
    char wide [] = "[1,2,3,4]";
    assert_int_equal (tly_json_parse (wide, strlen (wide), nodes, 4, 8, &count,
                                      &why, &at), TLY_ETOOLARGE);
    char ok [] = "[1,2,3]";
    assert_int_equal (tly_json_parse (ok, strlen (ok), nodes, 4, 8, &count,
                                      &why, &at), TLY_OK);
    assert_int_equal (count, 4);
    assert_null (why);
    char nested [] = "{\"a\":{\"b\":1}}";          /* depth 2 */
    tly_json_node more [8];
    assert_int_equal (tly_json_parse (nested, strlen (nested), more, 8, 1, &count,
                                      NULL, NULL), TLY_ETOOLARGE);
    char nested2 [] = "{\"a\":{\"b\":1}}";
    assert_int_equal (tly_json_parse (nested2, strlen (nested2), more, 8, 2, &count,
                                      NULL, NULL), TLY_OK);
    char bad [] = "{\"a\": 1.5}";
    assert_int_equal (tly_json_parse (bad, strlen (bad), more, 8, 2, &count,
                                      &why, &at), TLY_EINVAL);
    assert_int_equal (at, 7);                      /* points at the '.' */
    assert_int_equal (count, 0);
}

/* ---- writer ---- */

static void
expect_json (void (*fill) (msgpack_packer *), const char *want)
{
    tly_buf in, out;
    msgpack_packer pk;
    msgpack_zone zone;
    msgpack_object obj;
    tly_buf_init (&in);
    tly_buf_init (&out);
    tly_buf_packer (&in, &pk);
    fill (&pk);
    msgpack_zone_init (&zone, 1024);
    assert_int_equal (tly_msg_unpack (in.data, in.len, &zone, &obj), TLY_OK);
    assert_int_equal (tly_json_write_msgpack (&out, &obj), TLY_OK);
    tly_buf_append (&out, "", 1);
    assert_string_equal ((const char *) out.data, want);
    msgpack_zone_destroy (&zone);
    tly_buf_free (&in);
    tly_buf_free (&out);
}

static void
fill_reply (msgpack_packer *pk)
{
    static const uint8_t bin [3] = { 0x00, 0xab, 0xff };
    msgpack_pack_map (pk, 7);
    tly_pack_cstr (pk, "ok"); msgpack_pack_true (pk);
    tly_pack_cstr (pk, "n"); msgpack_pack_int64 (pk, -5);
    tly_pack_cstr (pk, "big"); msgpack_pack_uint64 (pk, UINT64_MAX);
    tly_pack_cstr (pk, "leaf"); tly_pack_bin (pk, bin, 3);
    tly_pack_cstr (pk, "list"); msgpack_pack_array (pk, 2);
    msgpack_pack_nil (pk); msgpack_pack_false (pk);
    msgpack_pack_uint64 (pk, 7); tly_pack_cstr (pk, "int key");
    tly_pack_cstr (pk, "f"); msgpack_pack_double (pk, 0.5);
}

static void
fill_strings (msgpack_packer *pk)
{
    msgpack_pack_array (pk, 3);
    tly_pack_str (pk, "q\"b\\n\n\x01\x7f", 8);
    tly_pack_str (pk, "bad \xff utf8 \xc3\xa9", 13);
    tly_pack_str (pk, "nul\0", 4);
}

static void
test_writer (void **state)
{
    (void) state;
    expect_json (fill_reply, "{\"ok\":true,\"n\":-5,\"big\":18446744073709551615,"
                 "\"leaf\":\"00abff\",\"list\":[null,false],\"7\":\"int key\","
                 "\"f\":0.5}");
    expect_json (fill_strings, "[\"q\\\"b\\\\n\\n\\u0001\x7f\","
                 "\"bad \\ufffd utf8 \xc3\xa9\",\"nul\\u0000\"]");
}

/*  Whatever the writer emits, the reader reads back. */
static void
test_writer_reader_roundtrip (void **state)
{
    (void) state;
    tly_buf out;
    tly_buf_init (&out);
    const char src [] = "esc \" \\ / \b \f \n \r \t \x01 \xe2\x82\xac \xf0\x9f\x98\x80";
    assert_int_equal (tly_json_write_str (&out, src, sizeof src - 1), TLY_OK);
    tly_json_node nodes [2];
    size_t count;
    assert_int_equal (tly_json_parse ((char *) out.data, out.len, nodes, 2, 1,
                                      &count, NULL, NULL), TLY_OK);
    assert_int_equal (nodes [0].len, sizeof src - 1);
    assert_memory_equal (nodes [0].str, src, sizeof src - 1);
    tly_buf_free (&out);
}

int
main (void)
{
    const struct CMUnitTest tests [] = {
        cmocka_unit_test (test_event_object),
        cmocka_unit_test (test_string_escapes),
        cmocka_unit_test (test_integers),
        cmocka_unit_test (test_malformed),
        cmocka_unit_test (test_bounds),
        cmocka_unit_test (test_writer),
        cmocka_unit_test (test_writer_reader_roundtrip),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
