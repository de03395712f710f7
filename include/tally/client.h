/*  client.h -- the Tally client library (PROTOCOL.md sections 1-5).

    A tly_client holds one DEALER connection to a tallyd endpoint.  It is not
    thread-safe: use one client per thread.  Strings and bytes returned
    through tly_entry borrow from the client's last reply and stay valid until
    the next call on the same client.

    Retries: a request that times out or gets `unavailable` is sent again,
    unchanged (same idempotency keys, so a retry can only be a duplicate),
    up to opts.retries times with a growing back-off.

    Offline verification needs no server: tly_verify_* check STH signatures
    and RFC 9162 proofs with the log's public key alone.
*/
#ifndef TALLY_CLIENT_H
#define TALLY_CLIENT_H

#include <msgpack.h>
#include "tally.h"
#include "event.h"
#include "merkle.h"
#include "sth.h"
#include "buf.h"

typedef struct {
    unsigned timeout_ms;      /* per attempt; default 10000                    */
    unsigned retries;         /* extra attempts on unavailable/timeout; def. 5 */
    unsigned max_inflight;    /* push: requests in flight at once; default 8   */
} tly_client_opts;

typedef struct tly_client tly_client;

/*  Connects to `endpoint` (e.g. "tcp://127.0.0.1:7400"). opts may be NULL.
    Returns TLY_OK, TLY_EINVAL (bad endpoint) or TLY_ENOMEM. */
int tly_client_new (const char *endpoint, const tly_client_opts *opts,
                    tly_client **out);
void tly_client_destroy (tly_client **self_p);

/*  After TLY_ESERVER: the server's error code ("not_found", ...) and
    message; after other errors, a description. Valid until the next call. */
const char *tly_client_error_code (tly_client *self);
const char *tly_client_error_message (tly_client *self);

typedef enum {
    TLY_ACCEPTED, TLY_DUPLICATE, TLY_CONFLICT, TLY_REJECTED
} tly_status;

typedef struct {
    tly_status status;
    uint64_t seq;             /* accepted, duplicate, conflict                */
    uint64_t recv_ts;         /* accepted, duplicate                          */
    uint8_t leaf[32];         /* accepted, duplicate: the leaf hash           */
    char code[32];            /* rejected: "invalid", "quota_exceeded", ...   */
    char message[160];        /* rejected                                     */
} tly_result;

/*  Pushes n events in requests of up to `batch` events (1..10000), keeping
    up to max_inflight requests in flight.  results[i] answers events[i].
    *sth (may be NULL) gets the newest STH among the replies; every STH is
    checked against `pk` when pk is not NULL (TLY_ECRYPTO if one fails).
    Returns TLY_OK when every request got a reply (events may still be
    rejected: look at results), else the first error. */
int tly_client_push (tly_client *self, const tly_event *events, size_t n,
                     size_t batch, tly_result *results, tly_sth *sth,
                     const uint8_t *pk);

/*  Fetches an entry by seq, or by (customer, key) when customer != NULL. */
int tly_client_get (tly_client *self, uint64_t seq, const tly_str *customer,
                    const tly_str *key, tly_entry *entry, uint8_t leaf[32]);

int tly_client_sth (tly_client *self, tly_sth *sth);
int tly_client_pubkey (tly_client *self, uint8_t pk[TLY_PK_LEN]);

typedef struct {
    uint64_t seq;             /* inclusion: the leaf index; consistency: from */
    uint64_t tree_size;       /* the tree the proof is for (to)               */
    size_t path_len;
    uint8_t path[TLY_PATH_MAX][TLY_HASH_LEN];
    tly_sth sth;              /* signed head with sth.tree_size == tree_size  */
} tly_proof;

/*  Inclusion proof of leaf seq in the tree of tree_size (0: current). */
int tly_client_proof (tly_client *self, uint64_t seq, uint64_t tree_size,
                      tly_proof *out);
/*  Consistency proof between tree sizes from and to. */
int tly_client_consistency (tly_client *self, uint64_t from, uint64_t to,
                            tly_proof *out);

/*  Sends a raw msgpack request body and receives the raw reply body (no
    retries).  For ops without a typed call (quota, control ops). Returns
    TLY_OK when the reply has "ok": true, TLY_ESERVER with the error code
    and message when it has "ok": false. */
int tly_client_call (tly_client *self, const uint8_t *body, size_t len,
                     tly_buf *reply);

/* ---- offline verification ---- */

/*  Checks the STH signature, then that leaf_hash is leaf proof->seq of the
    tree proof->sth commits to.  TLY_OK or TLY_ECRYPTO. */
int tly_verify_inclusion (const uint8_t pk[TLY_PK_LEN],
                          const uint8_t leaf_hash[32], const tly_proof *proof);
/*  Checks both heads' signatures and the consistency path from `old` to
    proof->sth. TLY_OK, TLY_EINVAL (sizes don't match) or TLY_ECRYPTO. */
int tly_verify_consistency (const uint8_t pk[TLY_PK_LEN], const tly_sth *old,
                            const tly_proof *proof);

/*  Packs a proof reply body as the server sends it, and reads one back (the
    CLI stores proofs in files in exactly the wire format). */
void tly_proof_pack (const tly_proof *p, bool consistency, msgpack_packer *pk);
int tly_proof_decode (const msgpack_object *obj, bool consistency, tly_proof *out);

#endif
