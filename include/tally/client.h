/*  client.h -- the Tally client library (PROTOCOL.md sections 1-5).

    A tly_client holds one DEALER connection to a tallyd endpoint.  It is not
    thread-safe: use one client per thread.  Strings and bytes returned
    through tly_entry borrow from the client's last reply and stay valid until
    the next call on the same client.

    Retries: a request that times out or gets `unavailable` is sent again,
    unchanged (same idempotency keys, so a retry can only be a duplicate),
    up to opts.retries times with a growing back-off (50 ms doubling, at
    most 2 s, plus jitter).  tly_client_call never retries.

    Matching: every request carries a numeric "id" the client assigns (never
    reused while the client lives); a retry resends the same bytes, id
    included.  Replies may arrive in any order; replies with ids the call is
    not waiting for (late answers to abandoned requests) are ignored.  A
    reply that is not a well-formed msgpack map with a boolean "ok" fails
    the call with TLY_EPROTO.  A failed reply without an id (the server could
    not read the request) fails the call with TLY_ESERVER.

    Every reply is checked with tly_msg_check before it is unpacked, and
    every field is type-checked: a malformed reply is TLY_EPROTO, never a
    crash.

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

/*  The defaults.  Copy and change these: in an opts you pass, timeout_ms
    0 and max_inflight 0 mean the default, but retries 0 means no retries. */
extern const tly_client_opts tly_client_default_opts;

typedef struct tly_client tly_client;

/*  Connects to `endpoint` (e.g. "tcp://127.0.0.1:7400"). opts may be NULL.
    Returns TLY_OK, TLY_EINVAL (bad endpoint) or TLY_ENOMEM. */
int tly_client_new (const char *endpoint, const tly_client_opts *opts,
                    tly_client **out);
void tly_client_destroy (tly_client **self_p);

/*  After TLY_ESERVER: the server's error code ("not_found", ...) and
    message.  After other errors: a client-side code ("timeout", "protocol",
    "signature", "leaf", "invalid", "socket", "nomem", "interrupted") and a
    description naming the endpoint.  Empty after success.  Valid until the
    next call. */
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

/*  Pushes n events in requests of up to `batch` events (1..10000; fewer
    when a request would pass TLY_REQUEST_MAX bytes), keeping up to
    max_inflight requests in flight.  Events are sent as given: the server
    judges them (an invalid event comes back rejected with code "invalid").
    results[i] answers events[i].  *sth (may be NULL) gets the newest STH
    (largest tree_size) among the replies; every STH is checked against `pk`
    when pk is not NULL (TLY_ECRYPTO if one fails).  Each result is decoded
    strictly, and an accepted or duplicate seq must lie inside its reply's
    STH (else TLY_EPROTO).
    Returns TLY_OK when every request got a reply (events may still be
    rejected: look at results), else the first error; then the events of
    requests that got no reply have status TLY_REJECTED and code "no_reply"
    (they may or may not be recorded: pushing them again is safe). */
int tly_client_push (tly_client *self, const tly_event *events, size_t n,
                     size_t batch, tly_result *results, tly_sth *sth,
                     const uint8_t *pk);

/*  Fetches an entry by seq, or by (customer, key) when customer != NULL
    (then key must not be NULL).  The entry's strings borrow from the reply
    (valid until the next call); props come sorted.  The client recomputes
    the leaf hash from the entry: TLY_ECRYPTO when it differs from the
    server's `leaf`; TLY_EPROTO when the entry is not the one asked for.
    TLY_ESERVER with code "not_found" when there is no such entry. */
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

/*  Inclusion proof of leaf seq in the tree of tree_size (0: current).
    The proof is not verified here: use tly_verify_inclusion. */
int tly_client_proof (tly_client *self, uint64_t seq, uint64_t tree_size,
                      tly_proof *out);
/*  Consistency proof between tree sizes from and to. */
int tly_client_consistency (tly_client *self, uint64_t from, uint64_t to,
                            tly_proof *out);

/*  Sends a raw msgpack request body and receives the raw reply body (no
    retries).  For ops without a typed call (quota, control ops). Returns
    TLY_OK when the reply has "ok": true, TLY_ESERVER with the error code
    and message when it has "ok": false (the reply body is copied to `reply`
    in both cases; reply may be NULL).  `body` must be a msgpack map with a
    str "op"; any "id" in it is replaced by the client's own. */
int tly_client_call (tly_client *self, const uint8_t *body, size_t len,
                     tly_buf *reply);

/*  The raw body of the last reply received (e.g. to save a proof exactly
    as the server sent it).  Valid until the next call; TLY_ENOTFOUND if
    there is none. */
int tly_client_last_reply (tly_client *self, const uint8_t **data, size_t *len);

/* ---- offline verification ---- */

/*  Checks the STH signature, then that leaf_hash is leaf proof->seq of the
    tree proof->sth commits to.  TLY_OK, TLY_ECRYPTO (bad signature or
    path), or TLY_EINVAL when the proof contradicts itself (seq >=
    tree_size, or sth.tree_size != tree_size). */
int tly_verify_inclusion (const uint8_t pk[TLY_PK_LEN],
                          const uint8_t leaf_hash[32], const tly_proof *proof);
/*  Checks both heads' signatures and the consistency path from `old` to
    proof->sth. TLY_OK, TLY_EINVAL (sizes don't match) or TLY_ECRYPTO. */
int tly_verify_consistency (const uint8_t pk[TLY_PK_LEN], const tly_sth *old,
                            const tly_proof *proof);

/*  Packs a proof reply body as the server sends it, and reads one back (the
    CLI stores proofs in files in exactly the wire format).  Inclusion:
    {"ok":true,"seq","tree_size","path":[bin32...],"sth"}; consistency:
    {"ok":true,"from","to","path","sth"}.  Decode ignores other fields (such
    as "id"), accepts a missing "ok" but not "ok": false, and returns
    TLY_EINVAL for a missing or mistyped field, a path longer than
    TLY_PATH_MAX, sth.tree_size != tree_size, seq >= tree_size (inclusion)
    or not 0 < from <= to (consistency). */
void tly_proof_pack (const tly_proof *p, bool consistency, msgpack_packer *pk);
int tly_proof_decode (const msgpack_object *obj, bool consistency, tly_proof *out);

#endif
