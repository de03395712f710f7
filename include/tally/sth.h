/*  sth.h -- signed tree heads and the log's Ed25519 key (PROTOCOL.md s3).

    sig = Ed25519 over "TALLY-STH-V1" || u64be(tree_size) || u64be(ts) || root
    (60 bytes).  The key pair lives in the data dir: log.key (the 64-byte
    libsodium secret key, mode 0600) and log.pub (32 raw bytes).
*/
#ifndef TALLY_STH_H
#define TALLY_STH_H

#include <msgpack.h>
#include "tally.h"

#define TLY_STH_MSG_LEN 60
#define TLY_PK_LEN 32
#define TLY_SK_LEN 64
#define TLY_SIG_LEN 64

typedef struct {
    uint64_t tree_size;
    uint64_t ts;
    uint8_t root[32];
    uint8_t sig[TLY_SIG_LEN];
} tly_sth;

/*  The 60 signed bytes: "TALLY-STH-V1" || u64be(tree_size) || u64be(ts)
    || root.  Never fails. */
void tly_sth_message (const tly_sth *sth, uint8_t msg[TLY_STH_MSG_LEN]);
/*  Fills sth->sig. Returns TLY_OK or TLY_ECRYPTO (libsodium unusable). */
int tly_sth_sign (tly_sth *sth, const uint8_t sk[TLY_SK_LEN]);
/*  TLY_OK when the signature is valid for pk, else TLY_ECRYPTO. */
int tly_sth_verify (const tly_sth *sth, const uint8_t pk[TLY_PK_LEN]);

/*  Packs {"tree_size": uint, "ts": uint, "root": bin 32, "sig": bin 64},
    exactly these four keys, in this order.  Write errors show in the
    packer's buffer (tly_buf's oom). */
void tly_sth_pack (const tly_sth *sth, msgpack_packer *pk);
/*  Reads an STH map; TLY_EINVAL when obj is not a map, a field is missing,
    nil, repeated, of the wrong type (tree_size and ts must be non-negative
    integers) or length (root 32, sig 64 bytes).  Other keys are ignored.
    Does not check the signature: call tly_sth_verify.  On error *sth is
    unchanged. */
int tly_sth_decode (const msgpack_object *obj, tly_sth *sth);

/*  Loads <dir>/log.key and <dir>/log.pub, creating both on first start
    (each written to a temp file, fsync'd, renamed, then the directory
    fsync'd; log.key with mode 0600).  A missing log.pub is rewritten from
    log.key.  Returns TLY_OK; TLY_EIO when the file system fails;
    TLY_ECORRUPT when a file has the wrong size, the secret key is not a
    whole libsodium key, log.pub is not its public half, or log.pub exists
    without log.key (a new key would silently change the log's identity);
    TLY_EINVAL when dir is too long for a path.  On error pk and sk are
    zeroed.  Not safe against two processes creating keys in one dir at
    once: the data dir belongs to one tallyd. */
int tly_key_load_or_create (const char *dir, uint8_t pk[TLY_PK_LEN],
                            uint8_t sk[TLY_SK_LEN]);
/*  Reads a 32-byte raw public key file: TLY_OK, TLY_ENOTFOUND (no such
    file), TLY_EIO, or TLY_EINVAL (not a regular file of exactly 32 bytes). */
int tly_key_load_pub (const char *path, uint8_t pk[TLY_PK_LEN]);

#endif
