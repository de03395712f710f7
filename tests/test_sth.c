/*  test_sth.c -- signed tree heads, their msgpack form, and the key files. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#include <cmocka.h>
#include <sodium.h>
#include "tally/sth.h"

static void
hex_to (const char *hex, uint8_t *out, size_t len)
{
    size_t bin_len;
    assert_int_equal (sodium_hex2bin (out, len, hex, strlen (hex), NULL, &bin_len, NULL), 0);
    assert_int_equal (bin_len, len);
}

static void
sample (tly_sth *sth)
{
    memset (sth, 0, sizeof *sth);
    sth->tree_size = UINT64_C (0x0102030405060708);
    sth->ts = UINT64_C (1767225600123);              //  2026-01-01T00:00:00.123Z
    for (int i = 0; i < 32; i++)
        sth->root[i] = (uint8_t) (0xa0 + i);
}

static void
test_message_layout (void **state)
{
    (void) state;
    tly_sth sth;
    sample (&sth);
    uint8_t msg[TLY_STH_MSG_LEN], want[60];
    tly_sth_message (&sth, msg);
    hex_to ("54414c4c592d5354482d5631"                   //  "TALLY-STH-V1"
            "0102030405060708"                           //  tree_size
            "0000019b76daa87b"                           //  ts = 1767225600123
            "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
            "b0b1b2b3b4b5b6b7b8b9babbbcbdbebf", want, 60);
    assert_int_equal (TLY_STH_MSG_LEN, 60);
    assert_memory_equal (msg, want, 60);
    //  The signature does not enter the message.
    memset (sth.sig, 0xff, sizeof sth.sig);
    tly_sth_message (&sth, msg);
    assert_memory_equal (msg, want, 60);
}

static void
test_sign_verify (void **state)
{
    (void) state;
    assert_true (sodium_init () >= 0);
    uint8_t pk[TLY_PK_LEN], sk[TLY_SK_LEN], pk2[TLY_PK_LEN], sk2[TLY_SK_LEN];
    crypto_sign_keypair (pk, sk);
    crypto_sign_keypair (pk2, sk2);

    tly_sth sth;
    sample (&sth);
    assert_int_equal (tly_sth_sign (&sth, sk), TLY_OK);
    assert_int_equal (tly_sth_verify (&sth, pk), TLY_OK);
    assert_int_equal (tly_sth_verify (&sth, pk2), TLY_ECRYPTO);

    //  It is a plain Ed25519 signature over the 60 bytes: anyone can check it.
    uint8_t msg[TLY_STH_MSG_LEN];
    tly_sth_message (&sth, msg);
    assert_int_equal (crypto_sign_verify_detached (sth.sig, msg, sizeof msg, pk), 0);

    //  Any flipped bit anywhere fails.
    for (int bit = 0; bit < 64 * 8; bit++) {
        tly_sth bad = sth;
        bad.sig[bit / 8] ^= (uint8_t) (1u << (bit % 8));
        assert_int_equal (tly_sth_verify (&bad, pk), TLY_ECRYPTO);
    }
    for (int bit = 0; bit < 32 * 8; bit++) {
        tly_sth bad = sth;
        bad.root[bit / 8] ^= (uint8_t) (1u << (bit % 8));
        assert_int_equal (tly_sth_verify (&bad, pk), TLY_ECRYPTO);
    }
    for (int bit = 0; bit < 64; bit++) {
        tly_sth bad = sth;
        bad.tree_size ^= UINT64_C (1) << bit;
        assert_int_equal (tly_sth_verify (&bad, pk), TLY_ECRYPTO);
        bad = sth;
        bad.ts ^= UINT64_C (1) << bit;
        assert_int_equal (tly_sth_verify (&bad, pk), TLY_ECRYPTO);
    }
    //  Swapping tree_size and ts changes the message.
    tly_sth swapped = sth;
    swapped.tree_size = sth.ts;
    swapped.ts = sth.tree_size;
    assert_int_equal (tly_sth_verify (&swapped, pk), TLY_ECRYPTO);

    //  Ed25519 is deterministic: same head, same key, same signature.
    tly_sth again = sth;
    memset (again.sig, 0, sizeof again.sig);
    assert_int_equal (tly_sth_sign (&again, sk), TLY_OK);
    assert_memory_equal (again.sig, sth.sig, 64);
}

/* ---- msgpack ---- */

static void
pack (const tly_sth *sth, msgpack_sbuffer *sb)
{
    msgpack_sbuffer_init (sb);
    msgpack_packer pk;
    msgpack_packer_init (&pk, sb, msgpack_sbuffer_write);
    tly_sth_pack (sth, &pk);
}

static int
decode_bytes (const char *data, size_t len, tly_sth *out)
{
    msgpack_unpacked u;
    msgpack_unpacked_init (&u);
    size_t off = 0;
    assert_int_equal (msgpack_unpack_next (&u, data, len, &off), MSGPACK_UNPACK_SUCCESS);
    assert_int_equal (off, len);
    int rc = tly_sth_decode (&u.data, out);
    msgpack_unpacked_destroy (&u);
    return rc;
}

static void
test_pack_decode (void **state)
{
    (void) state;
    tly_sth sth, back;
    sample (&sth);
    for (int i = 0; i < 64; i++)
        sth.sig[i] = (uint8_t) (i * 3);
    msgpack_sbuffer sb;
    pack (&sth, &sb);

    //  The exact bytes: a fixmap of 4, uint64 fields, bin8 fields.
    const uint8_t *b = (const uint8_t *) sb.data;
    assert_int_equal (sb.size, 1 + 10 + 9 + 3 + 9 + 5 + 2 + 32 + 4 + 2 + 64);
    assert_int_equal (b[0], 0x84);
    assert_memory_equal (b + 1, "\xa9" "tree_size" "\xcf\x01\x02\x03\x04\x05\x06\x07\x08", 19);
    assert_memory_equal (b + 20, "\xa2" "ts" "\xcf\x00\x00\x01\x9b\x76\xda\xa8\x7b", 12);
    assert_memory_equal (b + 32, "\xa4" "root" "\xc4\x20", 7);
    assert_memory_equal (b + 39, sth.root, 32);
    assert_memory_equal (b + 71, "\xa3" "sig" "\xc4\x40", 6);
    assert_memory_equal (b + 77, sth.sig, 64);

    memset (&back, 0x55, sizeof back);
    assert_int_equal (decode_bytes (sb.data, sb.size, &back), TLY_OK);
    assert_memory_equal (&back, &sth, sizeof sth);
    msgpack_sbuffer_destroy (&sb);

    //  Small values pack in the smallest formats and still round-trip.
    sth.tree_size = 0;
    sth.ts = 5;
    pack (&sth, &sb);
    assert_int_equal (decode_bytes (sb.data, sb.size, &back), TLY_OK);
    assert_memory_equal (&back, &sth, sizeof sth);
    msgpack_sbuffer_destroy (&sb);
}

/*  Packs an STH map with one field changed. */
typedef enum { FIELD_OK, ROOT_31, ROOT_33, SIG_63, ROOT_STR, SIZE_NEG, TS_STR,
               NO_TS, NO_SIG, DUP_ROOT, EXTRA_KEY, SIZE_NIL } variant;

static int
decode_variant (variant v, tly_sth *out)
{
    uint8_t bytes[64] = { 0 };
    msgpack_sbuffer sb;
    msgpack_sbuffer_init (&sb);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sb, msgpack_sbuffer_write);
    size_t fields = 4 - (v == NO_TS) - (v == NO_SIG) + (v == DUP_ROOT) + (v == EXTRA_KEY);
    msgpack_pack_map (&pk, fields);
    msgpack_pack_str (&pk, 9);
    msgpack_pack_str_body (&pk, "tree_size", 9);
    if (v == SIZE_NEG)
        msgpack_pack_int64 (&pk, -1);
    else
    if (v == SIZE_NIL)
        msgpack_pack_nil (&pk);
    else
        msgpack_pack_uint64 (&pk, 7);
    if (v != NO_TS) {
        msgpack_pack_str (&pk, 2);
        msgpack_pack_str_body (&pk, "ts", 2);
        if (v == TS_STR) {
            msgpack_pack_str (&pk, 1);
            msgpack_pack_str_body (&pk, "1", 1);
        }
        else
            msgpack_pack_uint64 (&pk, 1000);
    }
    size_t root_len = v == ROOT_31? 31: v == ROOT_33? 33: 32;
    for (int copy = 0; copy < (v == DUP_ROOT? 2: 1); copy++) {
        msgpack_pack_str (&pk, 4);
        msgpack_pack_str_body (&pk, "root", 4);
        if (v == ROOT_STR) {
            msgpack_pack_str (&pk, 32);
            msgpack_pack_str_body (&pk, bytes, 32);
        }
        else {
            bytes[0] = (uint8_t) copy;
            msgpack_pack_bin (&pk, root_len);
            msgpack_pack_bin_body (&pk, bytes, root_len);
        }
    }
    if (v != NO_SIG) {
        msgpack_pack_str (&pk, 3);
        msgpack_pack_str_body (&pk, "sig", 3);
        msgpack_pack_bin (&pk, v == SIG_63? 63: 64);
        msgpack_pack_bin_body (&pk, bytes, v == SIG_63? 63: 64);
    }
    if (v == EXTRA_KEY) {
        msgpack_pack_str (&pk, 5);
        msgpack_pack_str_body (&pk, "extra", 5);
        msgpack_pack_true (&pk);
    }
    int rc = decode_bytes (sb.data, sb.size, out);
    msgpack_sbuffer_destroy (&sb);
    return rc;
}

static void
test_decode_rejects (void **state)
{
    (void) state;
    tly_sth out;
    assert_int_equal (decode_variant (FIELD_OK, &out), TLY_OK);
    assert_int_equal (out.tree_size, 7);
    assert_int_equal (out.ts, 1000);
    assert_int_equal (decode_variant (EXTRA_KEY, &out), TLY_OK);

    variant bad[] = { ROOT_31, ROOT_33, SIG_63, ROOT_STR, SIZE_NEG, TS_STR,
                      NO_TS, NO_SIG, DUP_ROOT, SIZE_NIL };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tly_sth before, got;
        memset (&before, 0x77, sizeof before);
        got = before;
        assert_int_equal (decode_variant (bad[i], &got), TLY_EINVAL);
        assert_memory_equal (&got, &before, sizeof got);      //  untouched
    }

    //  Not a map at all.
    msgpack_object o;
    memset (&o, 0, sizeof o);
    o.type = MSGPACK_OBJECT_ARRAY;
    assert_int_equal (tly_sth_decode (&o, &out), TLY_EINVAL);
    o.type = MSGPACK_OBJECT_NIL;
    assert_int_equal (tly_sth_decode (&o, &out), TLY_EINVAL);
    assert_int_equal (tly_sth_decode (NULL, &out), TLY_EINVAL);
}

/* ---- key files ---- */

static char *
make_dir (void)
{
    char *dir = strdup ("/tmp/test_sth.XXXXXX");
    assert_non_null (dir);
    assert_non_null (mkdtemp (dir));
    return dir;
}

static void
remove_dir (char *dir)
{
    const char *names[] = { "log.key", "log.pub", "log.key.tmp", "log.pub.tmp" };
    char path[512];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf (path, sizeof path, "%s/%s", dir, names[i]);
        unlink (path);
    }
    assert_int_equal (rmdir (dir), 0);
    free (dir);
}

static void
path_in (char *out, size_t size, const char *dir, const char *name)
{
    int n = snprintf (out, size, "%s/%s", dir, name);
    assert_true (n > 0 && (size_t) n < size);
}

static void
write_bytes (const char *path, const void *data, size_t len)
{
    FILE *f = fopen (path, "wb");
    assert_non_null (f);
    assert_int_equal (fwrite (data, 1, len, f), len);
    assert_int_equal (fclose (f), 0);
}

static void
test_key_create_reload (void **state)
{
    (void) state;
    char *dir = make_dir ();
    char key_path[512], pub_path[512];
    path_in (key_path, sizeof key_path, dir, "log.key");
    path_in (pub_path, sizeof pub_path, dir, "log.pub");

    uint8_t pk[TLY_PK_LEN], sk[TLY_SK_LEN], pk2[TLY_PK_LEN], sk2[TLY_SK_LEN];
    assert_int_equal (tly_key_load_or_create (dir, pk, sk), TLY_OK);

    struct stat st;
    assert_int_equal (stat (key_path, &st), 0);
    assert_int_equal (st.st_mode & 07777, 0600);
    assert_int_equal (st.st_size, 64);
    assert_int_equal (stat (pub_path, &st), 0);
    assert_int_equal (st.st_size, 32);
    //  No temp files left behind.
    char tmp[512];
    path_in (tmp, sizeof tmp, dir, "log.key.tmp");
    assert_int_not_equal (access (tmp, F_OK), 0);

    //  The files hold the key: sk raw, pk raw, and pk is sk's public half.
    uint8_t half[TLY_PK_LEN];
    crypto_sign_ed25519_sk_to_pk (half, sk);
    assert_memory_equal (half, pk, 32);
    assert_int_equal (tly_key_load_pub (pub_path, pk2), TLY_OK);
    assert_memory_equal (pk2, pk, 32);

    //  Reload: the same key, and a head signed before verifies after.
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_OK);
    assert_memory_equal (pk2, pk, 32);
    assert_memory_equal (sk2, sk, 64);
    tly_sth sth;
    sample (&sth);
    assert_int_equal (tly_sth_sign (&sth, sk), TLY_OK);
    assert_int_equal (tly_sth_verify (&sth, pk2), TLY_OK);

    //  A second data dir gets a different key.
    char *other = make_dir ();
    assert_int_equal (tly_key_load_or_create (other, pk2, sk2), TLY_OK);
    assert_memory_not_equal (pk2, pk, 32);
    remove_dir (other);

    //  A lost log.pub is rewritten from log.key.
    assert_int_equal (unlink (pub_path), 0);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_OK);
    assert_memory_equal (pk2, pk, 32);
    assert_int_equal (tly_key_load_pub (pub_path, pk2), TLY_OK);
    assert_memory_equal (pk2, pk, 32);

    //  A stale temp file from a crash does not get in the way.
    write_bytes (tmp, "junk", 4);
    chmod (tmp, 0666);
    char *fresh = make_dir ();
    char fresh_tmp[512];
    path_in (fresh_tmp, sizeof fresh_tmp, fresh, "log.key.tmp");
    write_bytes (fresh_tmp, "junk", 4);
    chmod (fresh_tmp, 0666);
    assert_int_equal (tly_key_load_or_create (fresh, pk2, sk2), TLY_OK);
    char fresh_key[512];
    path_in (fresh_key, sizeof fresh_key, fresh, "log.key");
    assert_int_equal (stat (fresh_key, &st), 0);
    assert_int_equal (st.st_mode & 07777, 0600);
    remove_dir (fresh);

    remove_dir (dir);
}

static void
test_key_mismatch (void **state)
{
    (void) state;
    char *dir = make_dir ();
    char key_path[512], pub_path[512];
    path_in (key_path, sizeof key_path, dir, "log.key");
    path_in (pub_path, sizeof pub_path, dir, "log.pub");
    uint8_t pk[TLY_PK_LEN], sk[TLY_SK_LEN], pk2[TLY_PK_LEN], sk2[TLY_SK_LEN];
    assert_int_equal (tly_key_load_or_create (dir, pk, sk), TLY_OK);

    //  log.pub of another key.
    crypto_sign_keypair (pk2, sk2);
    write_bytes (pub_path, pk2, 32);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_ECORRUPT);
    uint8_t zero[64] = { 0 };
    assert_memory_equal (sk2, zero, 64);                //  no half key out
    //  A flipped bit in log.pub.
    uint8_t bad[64];
    memcpy (bad, pk, 32);
    bad[31] ^= 1;
    write_bytes (pub_path, bad, 32);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_ECORRUPT);
    //  log.pub of the wrong size.
    write_bytes (pub_path, pk, 31);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_ECORRUPT);
    assert_int_equal (tly_key_load_pub (pub_path, pk2), TLY_EINVAL);
    write_bytes (pub_path, pk, 32);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_OK);

    //  log.key whose public half was altered, or whose seed was.
    memcpy (bad, sk, 64);
    bad[40] ^= 2;
    write_bytes (key_path, bad, 64);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_ECORRUPT);
    memcpy (bad, sk, 64);
    bad[3] ^= 2;
    write_bytes (key_path, bad, 64);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_ECORRUPT);
    //  log.key of the wrong size.
    write_bytes (key_path, sk, 63);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_ECORRUPT);
    //  log.key gone while log.pub stays: refused, not replaced.
    assert_int_equal (unlink (key_path), 0);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_ECORRUPT);
    assert_int_not_equal (access (key_path, F_OK), 0);
    assert_int_equal (tly_key_load_pub (pub_path, pk2), TLY_OK);
    assert_memory_equal (pk2, pk, 32);

    //  Restoring the real key brings the log back.
    write_bytes (key_path, sk, 64);
    assert_int_equal (tly_key_load_or_create (dir, pk2, sk2), TLY_OK);
    assert_memory_equal (sk2, sk, 64);
    remove_dir (dir);
}

static void
test_key_errors (void **state)
{
    (void) state;
    uint8_t pk[TLY_PK_LEN], sk[TLY_SK_LEN];
    assert_int_equal (tly_key_load_pub ("/nonexistent/dir/log.pub", pk), TLY_ENOTFOUND);
    assert_int_equal (tly_key_load_pub ("/tmp", pk), TLY_EINVAL);
    //  A data dir that does not exist cannot be written into.
    assert_int_equal (tly_key_load_or_create ("/nonexistent/tally-dir", pk, sk), TLY_EIO);
    //  A path that cannot fit.
    static char long_dir[5000];
    memset (long_dir, 'a', sizeof long_dir - 1);
    long_dir[0] = '/';
    assert_int_equal (tly_key_load_or_create (long_dir, pk, sk), TLY_EINVAL);
    //  A read-only dir (unless we are root, who may write anyway).
    if (geteuid () != 0) {
        char *dir = make_dir ();
        chmod (dir, 0500);
        assert_int_equal (tly_key_load_or_create (dir, pk, sk), TLY_EIO);
        chmod (dir, 0700);
        remove_dir (dir);
    }
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_message_layout),
        cmocka_unit_test (test_sign_verify),
        cmocka_unit_test (test_pack_decode),
        cmocka_unit_test (test_decode_rejects),
        cmocka_unit_test (test_key_create_reload),
        cmocka_unit_test (test_key_mismatch),
        cmocka_unit_test (test_key_errors),
    };
    return cmocka_run_group_tests (tests, NULL, NULL);
}
