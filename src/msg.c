/*  msg.c -- reading untrusted msgpack safely (see msg.h for why).

    tly_msg_check is a single forward pass with no recursion and no heap.  It
    keeps one number that makes allocation bombs impossible: `pending`, the
    objects still owed by the headers read so far.  Every object takes at
    least one byte, so a well-formed message always has pending <= bytes
    left; a header that breaks this is lying about its count and is refused
    before msgpack-c ever sees it.  A small fixed stack of per-container
    counts tracks depth.
*/
#include <assert.h>
#include <string.h>
#include "tally/msg.h"

const tly_msg_limits tly_msg_request_limits = {
    .max_depth = 8,
    .max_objects = 2000000,
};

static const char *const WHY_TRUNCATED = "msgpack: truncated";
static const char *const WHY_RESERVED  = "msgpack: reserved byte 0xc1";
static const char *const WHY_DEEP      = "msgpack: nested too deep";
static const char *const WHY_MANY      = "msgpack: too many objects";
static const char *const WHY_COUNT     = "msgpack: count exceeds the bytes that remain";
static const char *const WHY_TRAILING  = "msgpack: trailing bytes after the object";

/*  What one header says: how many bytes the object itself occupies (for a
    container: just its header) and how many child objects follow it. */
typedef struct {
    uint64_t size;
    uint64_t children;
    bool container;
} mp_head;

static uint32_t
load_be (const uint8_t *p, unsigned n)
{
    uint32_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v = (v << 8) | p [i];
    return v;
}

/*  A str, bin or ext with an `n`-byte length field and `extra` bytes (the
    ext type) between that field and the payload. */
static int
head_var (const uint8_t *p, size_t avail, unsigned n, unsigned extra,
          mp_head *h)
{
    if (avail < 1 + n)
        return TLY_EINVAL;
    h->size = 1 + n + extra + (uint64_t) load_be (p + 1, n);
    return TLY_OK;
}

/*  An array (`per_item` 1) or map (2) with an `n`-byte count field. */
static int
head_container (const uint8_t *p, size_t avail, unsigned n, unsigned per_item,
                mp_head *h)
{
    if (avail < 1 + n)
        return TLY_EINVAL;
    h->size = 1 + n;
    h->children = (uint64_t) per_item * load_be (p + 1, n);
    h->container = true;
    return TLY_OK;
}

/*  Decodes the header at p [0] (avail >= 1).  Returns TLY_OK, or TLY_EINVAL
    with *why set for a truncated header or the reserved byte. */
static int
read_head (const uint8_t *p, size_t avail, mp_head *h, const char **why)
{
    uint8_t b = p [0];
    h->size = 1;
    h->children = 0;
    h->container = false;
    *why = WHY_TRUNCATED;

    if (b <= 0x7f || b >= 0xe0)             /* positive, negative fixint */
        return TLY_OK;
    if (b <= 0x8f) {                        /* fixmap */
        h->children = 2u * (b & 0x0f);
        h->container = true;
        return TLY_OK;
    }
    if (b <= 0x9f) {                        /* fixarray */
        h->children = b & 0x0f;
        h->container = true;
        return TLY_OK;
    }
    if (b <= 0xbf) {                        /* fixstr */
        h->size = 1 + (b & 0x1f);
        return TLY_OK;
    }
    switch (b) {
        case 0xc0: case 0xc2: case 0xc3:    /* nil, false, true */
            return TLY_OK;
        case 0xc1:
            *why = WHY_RESERVED;
            return TLY_EINVAL;
        case 0xc4: return head_var (p, avail, 1, 0, h);    /* bin 8/16/32 */
        case 0xc5: return head_var (p, avail, 2, 0, h);
        case 0xc6: return head_var (p, avail, 4, 0, h);
        case 0xc7: return head_var (p, avail, 1, 1, h);    /* ext 8/16/32 */
        case 0xc8: return head_var (p, avail, 2, 1, h);
        case 0xc9: return head_var (p, avail, 4, 1, h);
        case 0xca: h->size = 5; return TLY_OK;             /* float 32 */
        case 0xcb: h->size = 9; return TLY_OK;             /* float 64 */
        case 0xcc: case 0xd0: h->size = 2; return TLY_OK;  /* (u)int 8 */
        case 0xcd: case 0xd1: h->size = 3; return TLY_OK;  /* (u)int 16 */
        case 0xce: case 0xd2: h->size = 5; return TLY_OK;  /* (u)int 32 */
        case 0xcf: case 0xd3: h->size = 9; return TLY_OK;  /* (u)int 64 */
        case 0xd4: h->size = 3;  return TLY_OK;            /* fixext 1..16 */
        case 0xd5: h->size = 4;  return TLY_OK;
        case 0xd6: h->size = 6;  return TLY_OK;
        case 0xd7: h->size = 10; return TLY_OK;
        case 0xd8: h->size = 18; return TLY_OK;
        case 0xd9: return head_var (p, avail, 1, 0, h);    /* str 8/16/32 */
        case 0xda: return head_var (p, avail, 2, 0, h);
        case 0xdb: return head_var (p, avail, 4, 0, h);
        case 0xdc: return head_container (p, avail, 2, 1, h);
        case 0xdd: return head_container (p, avail, 4, 1, h);
        case 0xde: return head_container (p, avail, 2, 2, h);
        default:   return head_container (p, avail, 4, 2, h);  /* 0xdf */
    }
}

static int
fail (int rc, const char *reason, const char **why)
{
    if (why)
        *why = reason;
    return rc;
}

int
tly_msg_check (const uint8_t *buf, size_t len, const tly_msg_limits *lim,
               const char **why)
{
    assert (buf || len == 0);
    if (!lim)
        lim = &tly_msg_request_limits;
    size_t max_depth = lim->max_depth < TLY_MSG_DEPTH_MAX
                     ? lim->max_depth : TLY_MSG_DEPTH_MAX;

    uint64_t left [TLY_MSG_DEPTH_MAX];  /* children still owed per open container */
    size_t depth = 0;
    uint64_t pending = 1;               /* objects still owed: the top one */
    uint64_t total = 1;                 /* objects announced so far */
    size_t pos = 0;
    const char *reason;

    if (total > lim->max_objects)
        return fail (TLY_ETOOLARGE, WHY_MANY, why);

    while (pending > 0) {
        if (pos >= len)
            return fail (TLY_EINVAL, WHY_TRUNCATED, why);
        mp_head h;
        if (read_head (buf + pos, len - pos, &h, &reason) != TLY_OK)
            return fail (TLY_EINVAL, reason, why);
        if (h.size > len - pos)
            return fail (TLY_EINVAL, WHY_TRUNCATED, why);
        pos += (size_t) h.size;
        pending--;
        if (depth > 0)
            left [depth - 1]--;

        if (h.container) {
            if (depth + 1 > max_depth)
                return fail (TLY_EINVAL, WHY_DEEP, why);
            /* pending <= len and children < 2^33: no overflow here. */
            pending += h.children;
            if (pending > len - pos)
                return fail (TLY_EINVAL, WHY_COUNT, why);
            total += h.children;
            if (total > lim->max_objects)
                return fail (TLY_ETOOLARGE, WHY_MANY, why);
            if (h.children > 0)
                left [depth++] = h.children;
        }
        while (depth > 0 && left [depth - 1] == 0)
            depth--;
    }
    if (pos != len)
        return fail (TLY_EINVAL, WHY_TRAILING, why);
    return TLY_OK;
}

int
tly_msg_unpack (const uint8_t *buf, size_t len, msgpack_zone *zone,
                msgpack_object *out)
{
    assert (zone && out);
    if (len == 0)
        return TLY_EINVAL;
    /*  msgpack_unpack (unlike msgpack_unpack_next) takes the caller's zone,
        and points str/bin/ext objects into `buf` rather than copying. */
    size_t off = 0;
    switch (msgpack_unpack ((const char *) buf, len, &off, zone, out)) {
        case MSGPACK_UNPACK_SUCCESS:     return TLY_OK;
        case MSGPACK_UNPACK_NOMEM_ERROR: return TLY_ENOMEM;
        default:                         return TLY_EINVAL;
    }
}

const msgpack_object *
tly_msg_get (const msgpack_object *map, const char *key)
{
    assert (key);
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    size_t klen = strlen (key);
    const msgpack_object_kv *kv = map->via.map.ptr;
    for (uint32_t i = 0; i < map->via.map.size; i++)
        if (kv [i].key.type == MSGPACK_OBJECT_STR
        &&  kv [i].key.via.str.size == klen
        &&  (klen == 0 || memcmp (kv [i].key.via.str.ptr, key, klen) == 0))
            return &kv [i].val;
    return NULL;
}

/*  The field, or NULL when it is absent or nil. */
static const msgpack_object *
get_present (const msgpack_object *map, const char *key)
{
    const msgpack_object *o = tly_msg_get (map, key);
    return o && o->type != MSGPACK_OBJECT_NIL ? o : NULL;
}

int
tly_msg_get_uint (const msgpack_object *map, const char *key, uint64_t *out)
{
    const msgpack_object *o = get_present (map, key);
    if (!o)
        return TLY_ENOTFOUND;
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return TLY_EINVAL;
    *out = o->via.u64;
    return TLY_OK;
}

int
tly_msg_get_str (const msgpack_object *map, const char *key, tly_str *out)
{
    const msgpack_object *o = get_present (map, key);
    if (!o)
        return TLY_ENOTFOUND;
    if (o->type != MSGPACK_OBJECT_STR)
        return TLY_EINVAL;
    out->ptr = o->via.str.ptr;
    out->len = o->via.str.size;
    return TLY_OK;
}

int
tly_msg_get_bin (const msgpack_object *map, const char *key, tly_str *out)
{
    const msgpack_object *o = get_present (map, key);
    if (!o)
        return TLY_ENOTFOUND;
    if (o->type != MSGPACK_OBJECT_BIN)
        return TLY_EINVAL;
    out->ptr = o->via.bin.ptr;
    out->len = o->via.bin.size;
    return TLY_OK;
}

int
tly_msg_get_bool (const msgpack_object *map, const char *key, bool *out)
{
    const msgpack_object *o = get_present (map, key);
    if (!o)
        return TLY_ENOTFOUND;
    if (o->type != MSGPACK_OBJECT_BOOLEAN)
        return TLY_EINVAL;
    *out = o->via.boolean;
    return TLY_OK;
}

bool
tly_msg_streq (const msgpack_object *o, const char *s)
{
    assert (s);
    if (!o || o->type != MSGPACK_OBJECT_STR)
        return false;
    size_t n = strlen (s);
    return o->via.str.size == n
        && (n == 0 || memcmp (o->via.str.ptr, s, n) == 0);
}
