/*  sth.c -- signed tree heads and the log's Ed25519 key (PROTOCOL.md s3). */
#ifndef _GNU_SOURCE
#   define _GNU_SOURCE          //  O_CLOEXEC, O_DIRECTORY, PATH_MAX (the build sets it too)
#endif
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <sodium.h>
#include "tally/sth.h"
#include "tally/buf.h"
#include "tally/msg.h"

#define STH_TAG "TALLY-STH-V1"
#define STH_TAG_LEN 12

static void
store_be64 (uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t) v;
        v >>= 8;
    }
}

void
tly_sth_message (const tly_sth *sth, uint8_t msg[TLY_STH_MSG_LEN])
{
    memcpy (msg, STH_TAG, STH_TAG_LEN);
    store_be64 (msg + STH_TAG_LEN, sth->tree_size);
    store_be64 (msg + STH_TAG_LEN + 8, sth->ts);
    memcpy (msg + STH_TAG_LEN + 16, sth->root, 32);
}

int
tly_sth_sign (tly_sth *sth, const uint8_t sk[TLY_SK_LEN])
{
    if (sodium_init () < 0)
        return TLY_ECRYPTO;
    uint8_t msg[TLY_STH_MSG_LEN];
    tly_sth_message (sth, msg);
    if (crypto_sign_detached (sth->sig, NULL, msg, sizeof msg, sk) != 0)
        return TLY_ECRYPTO;
    return TLY_OK;
}

int
tly_sth_verify (const tly_sth *sth, const uint8_t pk[TLY_PK_LEN])
{
    if (sodium_init () < 0)
        return TLY_ECRYPTO;
    uint8_t msg[TLY_STH_MSG_LEN];
    tly_sth_message (sth, msg);
    if (crypto_sign_verify_detached (sth->sig, msg, sizeof msg, pk) != 0)
        return TLY_ECRYPTO;
    return TLY_OK;
}

void
tly_sth_pack (const tly_sth *sth, msgpack_packer *pk)
{
    msgpack_pack_map (pk, 4);
    tly_pack_cstr (pk, "tree_size");
    msgpack_pack_uint64 (pk, sth->tree_size);
    tly_pack_cstr (pk, "ts");
    msgpack_pack_uint64 (pk, sth->ts);
    tly_pack_cstr (pk, "root");
    tly_pack_bin (pk, sth->root, sizeof sth->root);
    tly_pack_cstr (pk, "sig");
    tly_pack_bin (pk, sth->sig, sizeof sth->sig);
}

int
tly_sth_decode (const msgpack_object *obj, tly_sth *sth)
{
    if (!obj || obj->type != MSGPACK_OBJECT_MAP)
        return TLY_EINVAL;
    //  One pass, so that a repeated field is refused rather than silently
    //  read as whichever copy a lookup meets first: two readers of the same
    //  bytes must never see two different heads.  Unknown keys are allowed
    //  (the protocol may add optional fields).
    const msgpack_object *tree_size = NULL, *ts = NULL, *root = NULL, *sig = NULL;
    const msgpack_object_kv *kv = obj->via.map.ptr;
    for (uint32_t i = 0; i < obj->via.map.size; i++) {
        const msgpack_object **slot = NULL;
        if (tly_msg_streq (&kv[i].key, "tree_size"))
            slot = &tree_size;
        else
        if (tly_msg_streq (&kv[i].key, "ts"))
            slot = &ts;
        else
        if (tly_msg_streq (&kv[i].key, "root"))
            slot = &root;
        else
        if (tly_msg_streq (&kv[i].key, "sig"))
            slot = &sig;
        if (!slot)
            continue;
        if (*slot)
            return TLY_EINVAL;
        *slot = &kv[i].val;
    }
    if (!tree_size || tree_size->type != MSGPACK_OBJECT_POSITIVE_INTEGER
    ||  !ts || ts->type != MSGPACK_OBJECT_POSITIVE_INTEGER
    ||  !root || root->type != MSGPACK_OBJECT_BIN || root->via.bin.size != sizeof sth->root
    ||  !sig || sig->type != MSGPACK_OBJECT_BIN || sig->via.bin.size != sizeof sth->sig)
        return TLY_EINVAL;
    sth->tree_size = tree_size->via.u64;
    sth->ts = ts->via.u64;
    memcpy (sth->root, root->via.bin.ptr, sizeof sth->root);
    memcpy (sth->sig, sig->via.bin.ptr, sizeof sth->sig);
    return TLY_OK;
}

/* ---- key files ---- */

/*  Reads a file that must hold exactly len bytes.  TLY_OK, TLY_ENOTFOUND
    (no such file), TLY_EINVAL (another size) or TLY_EIO. */
static int
read_exact (const char *path, uint8_t *out, size_t len)
{
    int fd = open (path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT? TLY_ENOTFOUND: TLY_EIO;
    int rc = TLY_OK;
    struct stat st;
    if (fstat (fd, &st) != 0)
        rc = TLY_EIO;
    else
    if (!S_ISREG (st.st_mode) || st.st_size != (off_t) len)
        rc = TLY_EINVAL;
    size_t got = 0;
    while (rc == TLY_OK && got < len) {
        ssize_t n = read (fd, out + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            rc = TLY_EIO;
        else
        if (n == 0)
            rc = TLY_EINVAL;            //  shrank under us
        else
            got += (size_t) n;
    }
    close (fd);
    return rc;
}

static int
fsync_dir (const char *dir)
{
    int fd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return TLY_EIO;
    int rc = fsync (fd) == 0? TLY_OK: TLY_EIO;
    close (fd);
    return rc;
}

/*  Writes <dir>/<name> so that after a crash it is either absent or whole:
    temp file, fsync, rename, fsync of the directory. */
static int
write_atomic (const char *dir, const char *name, const uint8_t *data, size_t len,
              mode_t mode)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    int n1 = snprintf (path, sizeof path, "%s/%s", dir, name);
    int n2 = snprintf (tmp, sizeof tmp, "%s/%s.tmp", dir, name);
    if (n1 < 0 || n2 < 0 || (size_t) n2 >= sizeof tmp)
        return TLY_EINVAL;
    //  A temp file left by a crash may have any mode: start afresh, and
    //  O_EXCL so the secret is never written into someone else's file.
    if (unlink (tmp) != 0 && errno != ENOENT)
        return TLY_EIO;
    int fd = open (tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0)
        return TLY_EIO;
    int rc = TLY_OK;
    size_t done = 0;
    while (rc == TLY_OK && done < len) {
        ssize_t n = write (fd, data + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            rc = TLY_EIO;
        else
            done += (size_t) n;
    }
    if (rc == TLY_OK && fsync (fd) != 0)
        rc = TLY_EIO;
    if (close (fd) != 0 && rc == TLY_OK)
        rc = TLY_EIO;
    if (rc == TLY_OK && rename (tmp, path) != 0)
        rc = TLY_EIO;
    if (rc != TLY_OK) {
        unlink (tmp);
        return rc;
    }
    return fsync_dir (dir);
}

/*  A libsodium secret key is seed || public key; both halves must be what
    the seed derives, or signatures would not verify under log.pub. */
static bool
secret_key_is_whole (const uint8_t sk[TLY_SK_LEN])
{
    uint8_t seed[crypto_sign_SEEDBYTES];
    uint8_t pk[TLY_PK_LEN], sk2[TLY_SK_LEN];
    crypto_sign_ed25519_sk_to_seed (seed, sk);
    crypto_sign_seed_keypair (pk, sk2, seed);
    bool whole = sodium_memcmp (sk, sk2, TLY_SK_LEN) == 0;
    sodium_memzero (seed, sizeof seed);
    sodium_memzero (sk2, sizeof sk2);
    return whole;
}

static int
load_or_create (const char *dir, uint8_t pk[TLY_PK_LEN], uint8_t sk[TLY_SK_LEN])
{
    char key_path[PATH_MAX], pub_path[PATH_MAX];
    int n1 = snprintf (key_path, sizeof key_path, "%s/log.key", dir);
    int n2 = snprintf (pub_path, sizeof pub_path, "%s/log.pub", dir);
    if (n1 < 0 || n2 < 0 || (size_t) n1 >= sizeof key_path || (size_t) n2 >= sizeof pub_path)
        return TLY_EINVAL;

    uint8_t pub[TLY_PK_LEN];
    int pub_rc = read_exact (pub_path, pub, sizeof pub);
    if (pub_rc == TLY_EIO)
        return TLY_EIO;
    if (pub_rc == TLY_EINVAL)
        return TLY_ECORRUPT;

    int rc = read_exact (key_path, sk, TLY_SK_LEN);
    if (rc == TLY_ENOTFOUND) {
        //  A published key without its secret half means the log's identity
        //  is lost; making a new one silently would fork it for auditors.
        if (pub_rc == TLY_OK)
            return TLY_ECORRUPT;
        crypto_sign_keypair (pk, sk);
        //  Secret first: a crash before log.pub is written is repaired
        //  below on the next start, never the other way round.
        rc = write_atomic (dir, "log.key", sk, TLY_SK_LEN, 0600);
        if (rc == TLY_OK)
            rc = write_atomic (dir, "log.pub", pk, TLY_PK_LEN, 0644);
        return rc;
    }
    if (rc == TLY_EINVAL)
        return TLY_ECORRUPT;
    if (rc != TLY_OK)
        return rc;
    if (!secret_key_is_whole (sk))
        return TLY_ECORRUPT;
    crypto_sign_ed25519_sk_to_pk (pk, sk);
    if (pub_rc == TLY_ENOTFOUND)
        return write_atomic (dir, "log.pub", pk, TLY_PK_LEN, 0644);
    if (sodium_memcmp (pub, pk, TLY_PK_LEN) != 0)
        return TLY_ECORRUPT;
    return TLY_OK;
}

int
tly_key_load_or_create (const char *dir, uint8_t pk[TLY_PK_LEN], uint8_t sk[TLY_SK_LEN])
{
    assert (dir && pk && sk);
    if (sodium_init () < 0)
        return TLY_EIO;
    int rc = load_or_create (dir, pk, sk);
    if (rc != TLY_OK) {
        //  Never hand back half a key.
        sodium_memzero (sk, TLY_SK_LEN);
        memset (pk, 0, TLY_PK_LEN);
    }
    return rc;
}

int
tly_key_load_pub (const char *path, uint8_t pk[TLY_PK_LEN])
{
    assert (path && pk);
    return read_exact (path, pk, TLY_PK_LEN);
}
