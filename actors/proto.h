/*  proto.h -- the messages actors exchange over their inproc links.

    Every message is one ZeroMQ frame holding one msgpack array whose first
    element is the type.  Links are PAIR sockets created by tallyd and
    handed to each actor generation, so messages queued for an actor that is
    restarting wait for it instead of being lost.

      ingest  -> receipt  APPEND  [1, ctx, [[idx, tail, customer, key, meter, qty, ts,
                                             dedup, seq?]...], asked?]   dedup: the
                                  16-byte keyed hash of (customer, key), computed by
                                  ingest so the single writer does not.  asked: the
                                  ids (u32 big-endian, ascending, in one bin) of the
                                  index's runs ingest looked each event up in
                                  (tly_reader_lookup_runs), and seq where it found
                                  one: receipt asks only the rest of the index
                                  (tly_writer_lookup_beyond), and reads entry seq
                                  instead of looking the key up.  Without asked,
                                  receipt asks the whole index
      receipt -> ingest   RESULTS [4, 0, sth | nil, [reply...]]   the replies of one group
                                  reply: [ctx, [[idx, status, seq, recv_ts, leaf]
                                                | [idx, 3, code, message]...]]
                                       | [ctx, code, message]   the whole request failed
      receipt -> quota    ADMIT   [10, ticket, [[customer, meter, ts, qty]...], first]
      quota   -> receipt  VERDICT [11, ticket, bin (one byte per item: 1 admitted)]
      receipt -> quota    COMMIT  [12, first, [[seq, customer, meter, ts, qty, ticket]...],
                                   [ticket...]]   one per committed group: its first
                                  seq, its accepted events in seq order (ticket 0: no
                                  limit applied, so never admitted) and the tickets it
                                  closes
                          ABORT   [13, ticket]
                          HELLO   [15, 0]   a new receipt generation: forget the
                                  tickets of earlier ones, send LIMITS in full
      quota   -> receipt  LIMITS  [14, 0, full, [[customer, meter, limit | nil]...] | nil]
                                  the keys of the limits (full: all of them; else
                                  changes), so events no limit applies to skip ADMIT;
                                  [14, 0, true, nil]: forget them, ask about every event
      ingest  -> quota    QUERY   [20, ctx, customer, period]
      quota   -> ingest   USAGE   [21, ctx, [[meter, limit, used]...]]  or [21, ctx, nil] (unavailable)

    Links carry only what their writer produced, but decoders still check
    every field: a bug must show up as an error, not as memory corruption.
*/
#ifndef TALLY_PROTO_H
#define TALLY_PROTO_H

#include <czmq.h>
#include <msgpack.h>
#include "tally/tally.h"
#include "tally/buf.h"
#include "tally/sth.h"
#include "tally/store.h"

enum {
    TLY_MSG_APPEND = 1, TLY_MSG_RESULTS = 4,
    TLY_MSG_ADMIT = 10, TLY_MSG_VERDICT = 11, TLY_MSG_COMMIT = 12, TLY_MSG_ABORT = 13,
    TLY_MSG_LIMITS = 14, TLY_MSG_HELLO = 15,
    TLY_MSG_QUERY = 20, TLY_MSG_USAGE = 21,
};

/*  Result statuses (also the order of the wire strings). */
enum { TLY_ST_ACCEPTED = 0, TLY_ST_DUPLICATE = 1, TLY_ST_CONFLICT = 2, TLY_ST_REJECTED = 3 };

typedef struct {
    uint32_t idx;
    tly_str tail;
    tly_str customer;
    tly_str key;
    tly_str meter;
    uint64_t qty;
    uint64_t ts;
    uint8_t dedup[TLY_DEDUP_LEN];   /* tly_store_dedup_hash (customer, key) */
    bool found;                     /* ingest found dedup in the runs it asked: */
    uint64_t seq;                   /* at this entry */
} tly_item;

typedef struct {
    uint32_t idx;
    uint8_t status;
    uint64_t seq;
    uint64_t recv_ts;
    uint8_t leaf[32];
    const char *code;          /* rejected: static strings */
    const char *message;
} tly_outcome;

/*  A received link message: the decoded array, its type, and its fields
    from index 1 on.  Holds the frame and the zone; free with _done. */
typedef struct {
    zmsg_t *msg;
    msgpack_zone zone;
    msgpack_object obj;
    int type;
    uint64_t ctx;              /* ctx or ticket */
} tly_link_msg;

/*  Receives one message from a link. TLY_OK, TLY_EPROTO (a bad message,
    discarded) or TLY_EIO (interrupted). */
int tly_link_recv (zsock_t *link, tly_link_msg *m);
void tly_link_done (tly_link_msg *m);
/*  Starts a link message in buf: resets it, points pk at it and packs the
    array of `fields` elements with its first two, type and ctx. */
void tly_link_begin (tly_buf *buf, msgpack_packer *pk, uint32_t fields, int type, uint64_t ctx);
/*  Sends buf as one frame; TLY_EUNAVAIL when the link is full (non-blocking). */
int tly_link_send (zsock_t *link, const tly_buf *buf, bool wait);

/*  Element i of the message's array (NULL when out of range). */
const msgpack_object *tly_link_field (const tly_link_msg *m, uint32_t i);

void tly_item_pack (msgpack_packer *pk, const tly_item *it);
int tly_item_decode (const msgpack_object *o, tly_item *it);
/*  An APPEND's asked runs: packs ids[n] (ascending); decodes field o
    into ids (room for TLY_DEDUP_RUNS_MAX), TLY_EINVAL unless a bin of
    at most that many ids, strictly ascending. */
void tly_asked_pack (msgpack_packer *pk, const uint32_t *ids, size_t n);
int tly_asked_decode (const msgpack_object *o, uint32_t *ids, size_t *n);
void tly_outcome_pack (msgpack_packer *pk, const tly_outcome *oc);
int tly_outcome_decode (const msgpack_object *o, tly_outcome *oc);

/*  Reads a str from an object (TLY_EINVAL if not a str). */
int tly_obj_str (const msgpack_object *o, tly_str *out);
int tly_obj_uint (const msgpack_object *o, uint64_t *out);

/*  Packs the head of a client reply: {"ok": ok, "id": id?, ...} with
    `extra` more pairs to follow.  id may be NULL (no id in the request). */
void tly_reply_head (msgpack_packer *pk, bool ok, const msgpack_object *id, uint32_t extra);
/*  A complete error reply body. */
void tly_reply_error (tly_buf *out, const msgpack_object *id, const char *code,
                      const char *message);

#endif
