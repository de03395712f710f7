/*  msg.h -- reading untrusted msgpack safely.

    The msgpack-c unpacker allocates from the counts in headers before it has
    seen the data they announce (`dd ff 00 00 00` asks for gigabytes).  So
    bytes from the network go through tly_msg_check first, which walks the
    encoding without allocating and proves that every announced length and
    count fits in the bytes that remain, that nesting and the total number of
    objects stay within bounds, and that exactly one object fills the buffer.
    Only then does tly_msg_unpack hand the bytes to msgpack-c.  Unpacked
    strings and bins point into the caller's buffer (zero copy): keep the
    buffer alive while the objects are used.
*/
#ifndef TALLY_MSG_H
#define TALLY_MSG_H

#include <msgpack.h>
#include "tally.h"

typedef struct {
    size_t max_depth;      /* nesting of arrays/maps; the top object is depth 1 */
    size_t max_objects;    /* total objects, counting map keys and values       */
} tly_msg_limits;

/*  Depth counts containers only: a scalar adds none, `[]` or `{}` at the top
    is depth 1, `{"a":[1]}` is depth 2.  msgpack-c's unpacker keeps a fixed
    stack of 32 open containers, so larger max_depth values are clamped to
    TLY_MSG_DEPTH_MAX: tly_msg_check never passes what tly_msg_unpack cannot
    unpack.  An object is an array, a map, or any scalar: `[1,2]` is 3 objects
    and `{"a":1}` is 3. */
#define TLY_MSG_DEPTH_MAX 32

/*  Limits for API requests: depth 8, 2,000,000 objects. */
extern const tly_msg_limits tly_msg_request_limits;

/*  Returns TLY_OK when `buf` holds exactly one well-formed msgpack object
    within `lim`; else TLY_EINVAL (truncated, trailing bytes, reserved byte
    0xc1, too deep) or TLY_ETOOLARGE (too many objects), with a static
    explanation in *why (may be NULL). Never allocates, never recurses:
    runs in constant stack and time linear in `len`. `lim` NULL means
    tly_msg_request_limits. Thread-safe. */
int tly_msg_check (const uint8_t *buf, size_t len, const tly_msg_limits *lim,
                   const char **why);

/*  Unpacks a buffer that passed tly_msg_check into `zone`'s memory.
    Returns TLY_OK, TLY_EINVAL or TLY_ENOMEM.  Never give it bytes that have
    not passed tly_msg_check: msgpack-c would trust their counts.  The zone
    then holds at most about 24 bytes per object (48 per map pair). */
int tly_msg_unpack (const uint8_t *buf, size_t len, msgpack_zone *zone,
                    msgpack_object *out);

/*  Map lookup by string key; NULL if `map` is not a map or has no such key.
    With duplicate keys, the first wins.  Linear in the map's size. */
const msgpack_object *tly_msg_get (const msgpack_object *map, const char *key);

/*  Typed reads of a field of a map. Each returns TLY_OK, TLY_ENOTFOUND
    (absent, or nil, or `map` is not a map) or TLY_EINVAL (present with the
    wrong type or range; a negative integer is not a uint).  `out` is left
    untouched unless TLY_OK. */
int tly_msg_get_uint (const msgpack_object *map, const char *key, uint64_t *out);
int tly_msg_get_str (const msgpack_object *map, const char *key, tly_str *out);
int tly_msg_get_bin (const msgpack_object *map, const char *key, tly_str *out);
int tly_msg_get_bool (const msgpack_object *map, const char *key, bool *out);

/*  True when `o` is a str equal to the C string `s`. */
bool tly_msg_streq (const msgpack_object *o, const char *s);

#endif
