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

void tly_sth_message (const tly_sth *sth, uint8_t msg[TLY_STH_MSG_LEN]);
/*  Fills sth->sig. Returns TLY_OK or TLY_ECRYPTO. */
int tly_sth_sign (tly_sth *sth, const uint8_t sk[TLY_SK_LEN]);
/*  TLY_OK when the signature is valid for pk, else TLY_ECRYPTO. */
int tly_sth_verify (const tly_sth *sth, const uint8_t pk[TLY_PK_LEN]);

/*  Packs {"tree_size","ts","root","sig"}. */
void tly_sth_pack (const tly_sth *sth, msgpack_packer *pk);
/*  Reads an STH map; TLY_EINVAL when a field is missing or malformed. */
int tly_sth_decode (const msgpack_object *obj, tly_sth *sth);

/*  Loads <dir>/log.key and <dir>/log.pub, creating both on first start.
    Returns TLY_OK, TLY_EIO, or TLY_ECORRUPT if the files disagree. */
int tly_key_load_or_create (const char *dir, uint8_t pk[TLY_PK_LEN],
                            uint8_t sk[TLY_SK_LEN]);
/*  Reads a 32-byte raw public key file. TLY_OK, TLY_EIO or TLY_EINVAL. */
int tly_key_load_pub (const char *path, uint8_t pk[TLY_PK_LEN]);

#endif
