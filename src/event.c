/*  event.c -- events, entries and their canonical leaf bytes
    (PROTOCOL.md sections 2 and 3).

    The leaf encoding is what gets hashed into the Merkle log and what
    deduplication compares, so it must be a function of the entry alone:
    smallest int and str formats, props sorted bytewise.  The encoder gets
    that from msgpack-c (whose packers choose the smallest formats); the
    decoder is hand-written so that it can refuse anything the encoder would
    not have produced.
*/
#include <assert.h>
#include <string.h>
#include "tally/event.h"

/*  Reasons: static strings, each naming the field it is about. */
static const char *const WHY_NOT_MAP    = "event: must be a map";
static const char *const WHY_FIELD_NAME = "event: field names must be strings";
static const char *const WHY_UNKNOWN    = "event: unknown field";
static const char *const WHY_REPEATED   = "event: field given twice";
static const char *const WHY_CUSTOMER   = "customer: must be a str of 1-128 bytes of valid UTF-8";
static const char *const WHY_METER      = "meter: must be a str of 1-64 bytes of [A-Za-z0-9_.:-]";
static const char *const WHY_KEY        = "key: must be a str of 1-128 bytes of valid UTF-8";
static const char *const WHY_QTY        = "qty: must be an integer from 0 to 2^62";
static const char *const WHY_TS         = "ts: must be an unsigned integer (ms since the epoch)";
static const char *const WHY_PROPS      = "props: must be a map of str to str";
static const char *const WHY_PROPS_MANY = "props: at most 16 entries";
static const char *const WHY_PROP_KEY   = "props: keys must be 1-64 bytes of valid UTF-8";
static const char *const WHY_PROP_VAL   = "props: values must be 0-256 bytes of valid UTF-8";
static const char *const WHY_PROP_DUP   = "props: duplicate key";
static const char *const WHY_NO_CUST    = "customer: missing";
static const char *const WHY_NO_METER   = "meter: missing";
static const char *const WHY_NO_KEY     = "key: missing";
static const char *const WHY_NO_QTY     = "qty: missing";
static const char *const WHY_NO_TS      = "ts: missing";

static int
invalid (const char *reason, const char **why)
{
    if (why)
        *why = reason;
    return TLY_EINVAL;
}

/*  --- Rules of section 2 ------------------------------------------------ */

bool
tly_utf8_valid (const char *s, size_t len)
{
    if (len == 0)
        return true;                /* and s may be NULL */
    const uint8_t *p = (const uint8_t *) s;
    const uint8_t *end = p + len;
    while (p < end) {
        uint8_t c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        /*  Lead byte: how many continuation bytes, and the range allowed
            for the first one (which is what excludes overlongs, UTF-16
            surrogates and code points past U+10FFFF; RFC 3629 section 4). */
        size_t n;
        uint8_t lo = 0x80, hi = 0xbf;
        if (c < 0xc2 || c > 0xf4)
            return false;           /* continuation, overlong C0/C1, F5..FF */
        if (c <= 0xdf)                   n = 1;
        else if (c == 0xe0)            { n = 2; lo = 0xa0; }
        else if (c <= 0xec)              n = 2;      /* e1..ec */
        else if (c == 0xed)            { n = 2; hi = 0x9f; }
        else if (c <= 0xef)              n = 2;      /* ee..ef */
        else if (c == 0xf0)            { n = 3; lo = 0x90; }
        else if (c <= 0xf3)              n = 3;      /* f1..f3 */
        else                           { n = 3; hi = 0x8f; }  /* f4 */
        if ((size_t) (end - p) <= n)
            return false;
        if (p [1] < lo || p [1] > hi)
            return false;
        for (size_t i = 2; i <= n; i++)
            if ((p [i] & 0xc0) != 0x80)
                return false;
        p += n + 1;
    }
    return true;
}

static bool
utf8_len_ok (tly_str s, uint32_t min, uint32_t max)
{
    return s.len >= min && s.len <= max && tly_utf8_valid (s.ptr, s.len);
}

static bool
meter_ok (tly_str s)
{
    if (s.len < 1 || s.len > TLY_METER_MAX)
        return false;
    for (uint32_t i = 0; i < s.len; i++) {
        unsigned char c = (unsigned char) s.ptr [i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
               || (c >= '0' && c <= '9')
               || c == '_' || c == '.' || c == ':' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

/*  Bytewise order, a proper prefix first (memcmp on the common length,
    then the shorter wins). */
static int
str_cmp (tly_str a, tly_str b)
{
    uint32_t n = a.len < b.len ? a.len : b.len;
    int c = n ? memcmp (a.ptr, b.ptr, n) : 0;
    if (c)
        return c;
    return (a.len > b.len) - (a.len < b.len);
}

/*  Every rule of section 2 except the order and uniqueness of props keys. */
static int
check_fields (const tly_event *ev, const char **why)
{
    if (!utf8_len_ok (ev->customer, 1, TLY_CUSTOMER_MAX))
        return invalid (WHY_CUSTOMER, why);
    if (!meter_ok (ev->meter))
        return invalid (WHY_METER, why);
    if (!utf8_len_ok (ev->key, 1, TLY_KEY_MAX))
        return invalid (WHY_KEY, why);
    if (ev->qty > TLY_QTY_MAX)
        return invalid (WHY_QTY, why);
    if (ev->nprops > TLY_PROPS_MAX)
        return invalid (WHY_PROPS_MANY, why);
    for (uint32_t i = 0; i < ev->nprops; i++) {
        if (!utf8_len_ok (ev->props [i].key, 1, TLY_PROP_KEY_MAX))
            return invalid (WHY_PROP_KEY, why);
        if (!utf8_len_ok (ev->props [i].val, 0, TLY_PROP_VAL_MAX))
            return invalid (WHY_PROP_VAL, why);
    }
    return TLY_OK;
}

/*  Insertion sort: at most 16 entries, usually already sorted. */
static void
sort_props (tly_prop *props, uint32_t n)
{
    for (uint32_t i = 1; i < n; i++) {
        tly_prop p = props [i];
        uint32_t j = i;
        while (j > 0 && str_cmp (props [j - 1].key, p.key) > 0) {
            props [j] = props [j - 1];
            j--;
        }
        props [j] = p;
    }
}

/*  True when keys are strictly ascending: sorted and free of duplicates. */
static bool
props_ascending (const tly_prop *props, uint32_t n)
{
    for (uint32_t i = 1; i < n; i++)
        if (str_cmp (props [i - 1].key, props [i].key) >= 0)
            return false;
    return true;
}

int
tly_event_validate (tly_event *ev, const char **why)
{
    assert (ev);
    int rc = check_fields (ev, why);
    if (rc != TLY_OK)
        return rc;
    sort_props (ev->props, ev->nprops);
    if (!props_ascending (ev->props, ev->nprops))
        return invalid (WHY_PROP_DUP, why);
    return TLY_OK;
}

/*  --- Decoding an event map -------------------------------------------- */

enum {
    F_CUSTOMER = 1u << 0,
    F_METER    = 1u << 1,
    F_KEY      = 1u << 2,
    F_QTY      = 1u << 3,
    F_TS       = 1u << 4,
    F_PROPS    = 1u << 5,
};

static const struct {
    const char *name;
    uint32_t len;
    unsigned bit;
} s_fields [] = {
    { "customer", 8, F_CUSTOMER },
    { "meter",    5, F_METER    },
    { "key",      3, F_KEY      },
    { "qty",      3, F_QTY      },
    { "ts",       2, F_TS       },
    { "props",    5, F_PROPS    },
};

/*  The field's bit, or 0 for a name we do not know. */
static unsigned
field_bit (const msgpack_object_str *name)
{
    for (size_t i = 0; i < sizeof s_fields / sizeof s_fields [0]; i++)
        if (name->size == s_fields [i].len
        &&  memcmp (name->ptr, s_fields [i].name, name->size) == 0)
            return s_fields [i].bit;
    return 0;
}

static bool
read_str (const msgpack_object *o, tly_str *out)
{
    if (o->type != MSGPACK_OBJECT_STR)
        return false;
    out->ptr = o->via.str.ptr;
    out->len = o->via.str.size;
    return true;
}

static int
read_props (const msgpack_object *o, tly_event *ev, const char **why)
{
    if (o->type == MSGPACK_OBJECT_NIL)
        return TLY_OK;
    if (o->type != MSGPACK_OBJECT_MAP)
        return invalid (WHY_PROPS, why);
    if (o->via.map.size > TLY_PROPS_MAX)
        return invalid (WHY_PROPS_MANY, why);
    for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object_kv *kv = &o->via.map.ptr [i];
        if (!read_str (&kv->key, &ev->props [i].key)
        ||  !read_str (&kv->val, &ev->props [i].val))
            return invalid (WHY_PROPS, why);
    }
    ev->nprops = o->via.map.size;
    return TLY_OK;
}

/*  Stores one field's value with its type checked; ranges come later. */
static int
read_field (unsigned bit, const msgpack_object *v, tly_event *ev,
            const char **why)
{
    switch (bit) {
        case F_CUSTOMER:
            return read_str (v, &ev->customer) ? TLY_OK : invalid (WHY_CUSTOMER, why);
        case F_METER:
            return read_str (v, &ev->meter) ? TLY_OK : invalid (WHY_METER, why);
        case F_KEY:
            return read_str (v, &ev->key) ? TLY_OK : invalid (WHY_KEY, why);
        case F_QTY:
            if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                return invalid (WHY_QTY, why);
            ev->qty = v->via.u64;
            return TLY_OK;
        case F_TS:
            if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                return invalid (WHY_TS, why);
            ev->ts = v->via.u64;
            return TLY_OK;
        default:
            assert (bit == F_PROPS);
            return read_props (v, ev, why);
    }
}

static int
require_all (unsigned seen, const char **why)
{
    if (!(seen & F_CUSTOMER)) return invalid (WHY_NO_CUST, why);
    if (!(seen & F_METER))    return invalid (WHY_NO_METER, why);
    if (!(seen & F_KEY))      return invalid (WHY_NO_KEY, why);
    if (!(seen & F_QTY))      return invalid (WHY_NO_QTY, why);
    if (!(seen & F_TS))       return invalid (WHY_NO_TS, why);
    return TLY_OK;
}

int
tly_event_decode (const msgpack_object *obj, tly_event *ev, const char **why)
{
    assert (obj && ev);
    memset (ev, 0, sizeof *ev);
    if (obj->type != MSGPACK_OBJECT_MAP)
        return invalid (WHY_NOT_MAP, why);

    unsigned seen = 0;
    for (uint32_t i = 0; i < obj->via.map.size; i++) {
        const msgpack_object_kv *kv = &obj->via.map.ptr [i];
        if (kv->key.type != MSGPACK_OBJECT_STR)
            return invalid (WHY_FIELD_NAME, why);
        unsigned bit = field_bit (&kv->key.via.str);
        if (bit == 0)
            return invalid (WHY_UNKNOWN, why);
        if (seen & bit)
            return invalid (WHY_REPEATED, why);
        seen |= bit;
        int rc = read_field (bit, &kv->val, ev, why);
        if (rc != TLY_OK)
            return rc;
    }
    int rc = require_all (seen, why);
    if (rc != TLY_OK)
        return rc;
    return tly_event_validate (ev, why);
}

/*  --- Encoding ---------------------------------------------------------- */

static void
pack_tstr (msgpack_packer *pk, tly_str s)
{
    tly_pack_str (pk, s.ptr, s.len);
}

static void
pack_props (msgpack_packer *pk, const tly_event *ev)
{
    msgpack_pack_map (pk, ev->nprops);
    for (uint32_t i = 0; i < ev->nprops; i++) {
        pack_tstr (pk, ev->props [i].key);
        pack_tstr (pk, ev->props [i].val);
    }
}

/*  Upper bound of the tail's size, so that it grows the buffer at most once. */
static size_t
tail_size_max (const tly_event *ev)
{
    size_t n = 3 * 5 + 2 * 9 + 3;   /* three str headers, two uint64, map16 */
    n += (size_t) ev->customer.len + ev->meter.len + ev->key.len;
    for (uint32_t i = 0; i < ev->nprops; i++)
        n += 2 * 5 + (size_t) ev->props [i].key.len + ev->props [i].val.len;
    return n;
}

int
tly_event_encode_tail (const tly_event *ev, tly_buf *out)
{
    assert (ev && out);
    assert (ev->nprops <= TLY_PROPS_MAX);
    assert (props_ascending (ev->props, ev->nprops));
    if (tly_buf_reserve (out, tail_size_max (ev)) != TLY_OK)
        return TLY_ENOMEM;

    msgpack_packer pk;
    tly_buf_packer (out, &pk);
    pack_tstr (&pk, ev->customer);
    pack_tstr (&pk, ev->meter);
    pack_tstr (&pk, ev->key);
    msgpack_pack_uint64 (&pk, ev->qty);
    msgpack_pack_uint64 (&pk, ev->ts);
    pack_props (&pk, ev);
    return out->oom ? TLY_ENOMEM : TLY_OK;
}

/*  The leaf is a 10-element array (fixarray 0x9a), version 1 first. */
#define LEAF_ARRAY   0x9a
#define LEAF_VERSION 0x01

int
tly_leaf_encode (uint64_t seq, uint64_t recv_ts, const char *kind,
                 const uint8_t *tail, size_t tail_len, tly_buf *out)
{
    assert (kind && *kind && out);
    assert (tail || tail_len == 0);
    static const uint8_t head [2] = { LEAF_ARRAY, LEAF_VERSION };
    if (tly_buf_reserve (out, 2 + 2 * 9 + 5 + strlen (kind) + tail_len) != TLY_OK)
        return TLY_ENOMEM;

    msgpack_packer pk;
    tly_buf_packer (out, &pk);
    tly_buf_append (out, head, sizeof head);
    msgpack_pack_uint64 (&pk, seq);
    msgpack_pack_uint64 (&pk, recv_ts);
    tly_pack_cstr (&pk, kind);
    tly_buf_append (out, tail, tail_len);
    return out->oom ? TLY_ENOMEM : TLY_OK;
}

/*  --- Strict decoding of leaf bytes ------------------------------------ */

/*  A cursor over leaf bytes.  Every reader returns false, without moving,
    on truncation or on any format the encoder would not have chosen. */
typedef struct {
    const uint8_t *p;
    size_t len;
    size_t pos;
} leaf_rd;

static bool
rd_be (leaf_rd *r, unsigned n, uint64_t *v)
{
    if (r->len - r->pos < 1 + (size_t) n)
        return false;
    uint64_t x = 0;
    for (unsigned i = 1; i <= n; i++)
        x = (x << 8) | r->p [r->pos + i];
    *v = x;
    return true;
}

/*  A non-negative int in its smallest format: each width must hold a value
    that the next smaller one could not. */
static bool
rd_uint (leaf_rd *r, uint64_t *out)
{
    if (r->pos >= r->len)
        return false;
    uint8_t b = r->p [r->pos];
    if (b <= 0x7f) {
        *out = b;
        r->pos++;
        return true;
    }
    unsigned n;
    uint64_t min;
    switch (b) {
        case 0xcc: n = 1; min = UINT64_C (1) << 7;  break;
        case 0xcd: n = 2; min = UINT64_C (1) << 8;  break;
        case 0xce: n = 4; min = UINT64_C (1) << 16; break;
        case 0xcf: n = 8; min = UINT64_C (1) << 32; break;
        default:   return false;
    }
    uint64_t v;
    if (!rd_be (r, n, &v) || v < min)
        return false;
    *out = v;
    r->pos += 1 + n;
    return true;
}

/*  A str in its smallest format, with its bytes present. */
static bool
rd_str (leaf_rd *r, tly_str *out)
{
    if (r->pos >= r->len)
        return false;
    uint8_t b = r->p [r->pos];
    unsigned n = 0;
    uint64_t len, min = 0;
    if (b >= 0xa0 && b <= 0xbf)
        len = b & 0x1f;
    else {
        switch (b) {
            case 0xd9: n = 1; min = 32;                  break;
            case 0xda: n = 2; min = 256;                 break;
            case 0xdb: n = 4; min = UINT64_C (1) << 16;  break;
            default:   return false;
        }
        if (!rd_be (r, n, &len) || len < min)
            return false;
    }
    size_t head = 1 + n;
    if (len > r->len - r->pos - head)
        return false;
    out->ptr = (const char *) r->p + r->pos + head;
    out->len = (uint32_t) len;
    r->pos += head + (size_t) len;
    return true;
}

/*  The props map header: fixmap below 16 entries, map16 for exactly 16. */
static bool
rd_props_head (leaf_rd *r, uint32_t *n)
{
    if (r->pos >= r->len)
        return false;
    uint8_t b = r->p [r->pos];
    if (b >= 0x80 && b <= 0x8f) {
        *n = b & 0x0f;
        r->pos++;
        return true;
    }
    uint64_t v;
    if (b != 0xde || !rd_be (r, 2, &v) || v != TLY_PROPS_MAX)
        return false;
    *n = (uint32_t) v;
    r->pos += 3;
    return true;
}

static bool
rd_event (leaf_rd *r, tly_event *ev)
{
    if (!rd_str (r, &ev->customer) || !rd_str (r, &ev->meter)
    ||  !rd_str (r, &ev->key) || !rd_uint (r, &ev->qty) || !rd_uint (r, &ev->ts)
    ||  !rd_props_head (r, &ev->nprops))
        return false;
    for (uint32_t i = 0; i < ev->nprops; i++)
        if (!rd_str (r, &ev->props [i].key) || !rd_str (r, &ev->props [i].val))
            return false;
    return true;
}

int
tly_leaf_decode (const uint8_t *leaf, size_t len, tly_entry *out,
                 size_t *tail_off)
{
    assert (leaf || len == 0);
    assert (out);
    memset (out, 0, sizeof *out);
    if (len < 2 || leaf [0] != LEAF_ARRAY || leaf [1] != LEAF_VERSION)
        return TLY_EINVAL;

    leaf_rd r = { leaf, len, 2 };
    if (!rd_uint (&r, &out->seq) || !rd_uint (&r, &out->recv_ts)
    ||  !rd_str (&r, &out->kind))
        return TLY_EINVAL;
    if (out->kind.len == 0 || !tly_utf8_valid (out->kind.ptr, out->kind.len))
        return TLY_EINVAL;
    size_t tail = r.pos;

    if (!rd_event (&r, &out->ev) || r.pos != len)
        return TLY_EINVAL;
    if (!props_ascending (out->ev.props, out->ev.nprops)
    ||  check_fields (&out->ev, NULL) != TLY_OK)
        return TLY_EINVAL;
    if (tail_off)
        *tail_off = tail;
    return TLY_OK;
}

/*  --- Maps for the wire ------------------------------------------------ */

void
tly_entry_pack (const tly_entry *e, msgpack_packer *pk)
{
    assert (e && pk);
    msgpack_pack_map (pk, 9);
    tly_pack_cstr (pk, "seq");      msgpack_pack_uint64 (pk, e->seq);
    tly_pack_cstr (pk, "recv_ts");  msgpack_pack_uint64 (pk, e->recv_ts);
    tly_pack_cstr (pk, "kind");     pack_tstr (pk, e->kind);
    tly_pack_cstr (pk, "customer"); pack_tstr (pk, e->ev.customer);
    tly_pack_cstr (pk, "meter");    pack_tstr (pk, e->ev.meter);
    tly_pack_cstr (pk, "key");      pack_tstr (pk, e->ev.key);
    tly_pack_cstr (pk, "qty");      msgpack_pack_uint64 (pk, e->ev.qty);
    tly_pack_cstr (pk, "ts");       msgpack_pack_uint64 (pk, e->ev.ts);
    tly_pack_cstr (pk, "props");    pack_props (pk, &e->ev);
}

void
tly_event_pack (const tly_event *ev, msgpack_packer *pk)
{
    assert (ev && pk);
    msgpack_pack_map (pk, ev->nprops ? 6 : 5);
    tly_pack_cstr (pk, "customer"); pack_tstr (pk, ev->customer);
    tly_pack_cstr (pk, "meter");    pack_tstr (pk, ev->meter);
    tly_pack_cstr (pk, "key");      pack_tstr (pk, ev->key);
    tly_pack_cstr (pk, "qty");      msgpack_pack_uint64 (pk, ev->qty);
    tly_pack_cstr (pk, "ts");       msgpack_pack_uint64 (pk, ev->ts);
    if (ev->nprops) {
        tly_pack_cstr (pk, "props");
        pack_props (pk, ev);
    }
}
