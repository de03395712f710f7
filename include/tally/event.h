/*  event.h -- events, ledger entries and their canonical leaf encoding
    (PROTOCOL.md sections 2 and 3).

    Leaf bytes of an entry are the msgpack array
        [1, seq, recv_ts, kind, customer, meter, key, qty, ts, props]
    with integers in their smallest format, strings in str formats and props
    keys in ascending bytewise order.  We split it in two: the *head*
    (array header, 1, seq, recv_ts, kind) that the receipt actor assigns, and
    the *tail* (customer .. props) that depends only on the event.  Two events
    with the same (customer, key) are duplicates exactly when their tails are
    byte-equal, since the encoding is canonical.
*/
#ifndef TALLY_EVENT_H
#define TALLY_EVENT_H

#include <msgpack.h>
#include "tally.h"
#include "buf.h"

typedef struct {
    tly_str key;
    tly_str val;
} tly_prop;

typedef struct {
    tly_str customer;
    tly_str meter;
    tly_str key;
    uint64_t qty;
    uint64_t ts;
    uint32_t nprops;
    tly_prop props[TLY_PROPS_MAX];    /* sorted ascending once validated */
} tly_event;

typedef struct {
    uint64_t seq;
    uint64_t recv_ts;
    tly_str kind;                      /* "usage", ... */
    tly_event ev;
} tly_entry;

/*  Decodes an event map and checks every rule of PROTOCOL.md section 2.
    Unknown fields are rejected.  On success the props are sorted and the
    strings borrow from `obj`'s buffer.  Returns TLY_OK or TLY_EINVAL with a
    static reason in *why ("customer: must be 1-128 bytes of UTF-8", ...).
    Every reason starts with the field it is about ("event:" for the map as
    a whole: not a map, unknown or repeated field).  Also rejected: a field
    given twice, a negative or float qty/ts, duplicate props keys.  "props":
    nil is read as no props (nil means absent throughout the protocol), so it
    encodes, and dedups, exactly like {}.  qty and ts may arrive in a signed
    msgpack format when non-negative (msgpack-c reads those as positive).
    `why` may be NULL.  Does not allocate. */
int tly_event_decode (const msgpack_object *obj, tly_event *ev, const char **why);

/*  Checks an event built by hand (e.g. by the client) against the same rules
    and sorts its props. Returns TLY_OK or TLY_EINVAL with *why (may be
    NULL).  A tly_str with len 0 may have a NULL ptr. */
int tly_event_validate (tly_event *ev, const char **why);

/*  True when `s` is valid UTF-8 (no overlongs, surrogates, or > U+10FFFF). */
bool tly_utf8_valid (const char *s, size_t len);

/*  Appends the canonical tail (6 msgpack objects, no array header) of a
    validated event to `out`. Returns TLY_OK or TLY_ENOMEM. */
int tly_event_encode_tail (const tly_event *ev, tly_buf *out);

/*  Appends complete leaf bytes: head for (seq, recv_ts, kind) then `tail`
    (as made by tly_event_encode_tail).  `kind` is a non-empty C string.
    Returns TLY_OK or TLY_ENOMEM. */
int tly_leaf_encode (uint64_t seq, uint64_t recv_ts, const char *kind,
                     const uint8_t *tail, size_t tail_len, tly_buf *out);

/*  Parses leaf bytes back into an entry (strings borrow from `leaf`), and
    reports where the tail starts.  Strict: rejects any non-canonical or
    malformed encoding with TLY_EINVAL -- wrong array length or version, an
    int or str or map header wider than needed, a signed int format, props
    not strictly ascending, trailing bytes, an empty or non-UTF-8 kind, or
    fields that break a rule of section 2.  So decode(encode(x)) == x and
    every accepted leaf re-encodes to the same bytes.  `tail_off` may be
    NULL.  Does not allocate. */
int tly_leaf_decode (const uint8_t *leaf, size_t len, tly_entry *out,
                     size_t *tail_off);

/*  Packs an entry as the map PROTOCOL.md's `get` returns:
    {seq, recv_ts, kind, customer, meter, key, qty, ts, props}. */
void tly_entry_pack (const tly_entry *e, msgpack_packer *pk);

/*  Packs an event as the map a client sends in `ingest` (props omitted
    when there are none).  Both pack functions leave write errors to the
    packer's writer: with tly_buf_packer, check the buffer's `oom`. */
void tly_event_pack (const tly_event *ev, msgpack_packer *pk);

#endif
