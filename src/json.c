/*  json.c -- a small strict in-place JSON reader and a msgpack-to-JSON
    writer (see json.h for the contract). */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "tally/json.h"

/* ---- UTF-8 ---- */

/*  Length of the valid UTF-8 sequence at s (1-4), or 0 when the bytes there
    are not one (overlong, surrogate, above U+10FFFF, truncated). */
static size_t
utf8_seq_len (const uint8_t *s, size_t avail)
{
    uint8_t c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    uint8_t lo = 0x80, hi = 0xbf;       /* range of the second byte */
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0) lo = 0xa0;       /* overlong */
        if (c == 0xed) hi = 0x9f;       /* surrogates */
    }
    else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0) lo = 0x90;       /* overlong */
        if (c == 0xf4) hi = 0x8f;       /* above U+10FFFF */
    }
    else
        return 0;
    if (avail < n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    return n;
}

static size_t
utf8_put (uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char) cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char) (0xc0 | (cp >> 6));
        out[1] = (char) (0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char) (0xe0 | (cp >> 12));
        out[1] = (char) (0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char) (0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char) (0xf0 | (cp >> 18));
    out[1] = (char) (0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char) (0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char) (0x80 | (cp & 0x3f));
    return 4;
}

/* ---- reader ---- */

typedef struct {
    char *text;
    size_t len;
    size_t pos;
    tly_json_node *nodes;
    size_t max_nodes;
    size_t max_depth;
    size_t n;
    const char *why;
} parser;

static int parse_value (parser *ps, size_t depth);

static int
fail (parser *ps, int rc, const char *why)
{
    ps->why = why;
    return rc;
}

static int
peek (const parser *ps)
{
    return ps->pos < ps->len ? (unsigned char) ps->text[ps->pos] : -1;
}

static void
skip_ws (parser *ps)
{
    while (ps->pos < ps->len) {
        char c = ps->text[ps->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        ps->pos++;
    }
}

static int
new_node (parser *ps, tly_json_type type, size_t *idx)
{
    if (ps->n >= ps->max_nodes)
        return fail (ps, TLY_ETOOLARGE, "too many values");
    *idx = ps->n++;
    memset (&ps->nodes[*idx], 0, sizeof ps->nodes[*idx]);
    ps->nodes[*idx].type = type;
    return TLY_OK;
}

static int
hex4 (parser *ps, uint32_t *out)
{
    if (ps->len - ps->pos < 4)
        return fail (ps, TLY_EINVAL, "truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = ps->text[ps->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9')      v |= (uint32_t) (c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t) (c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t) (c - 'A' + 10);
        else return fail (ps, TLY_EINVAL, "bad hex digit in \\u escape");
    }
    *out = v;
    return TLY_OK;
}

/*  Reads \uXXXX (the "\u" already consumed), joining a surrogate pair. */
static int
unicode_escape (parser *ps, uint32_t *cp)
{
    int rc = hex4 (ps, cp);
    if (rc)
        return rc;
    if (*cp >= 0xdc00 && *cp <= 0xdfff)
        return fail (ps, TLY_EINVAL, "unpaired low surrogate in \\u escape");
    if (*cp < 0xd800 || *cp > 0xdbff)
        return TLY_OK;
    if (ps->len - ps->pos < 2 || ps->text[ps->pos] != '\\'
    ||  ps->text[ps->pos + 1] != 'u')
        return fail (ps, TLY_EINVAL, "unpaired high surrogate in \\u escape");
    ps->pos += 2;
    uint32_t low;
    if ((rc = hex4 (ps, &low)))
        return rc;
    if (low < 0xdc00 || low > 0xdfff)
        return fail (ps, TLY_EINVAL, "unpaired high surrogate in \\u escape");
    *cp = 0x10000 + ((*cp - 0xd800) << 10) + (low - 0xdc00);
    return TLY_OK;
}

/*  Decodes one escape (the backslash consumed) into out; *n gets its size. */
static int
escape (parser *ps, char *out, size_t *n)
{
    if (ps->pos >= ps->len)
        return fail (ps, TLY_EINVAL, "unterminated string");
    char c = ps->text[ps->pos++];
    const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
    const char *hit = c ? strchr (from, c) : NULL;
    if (hit) {
        *out = to[hit - from];
        *n = 1;
        return TLY_OK;
    }
    if (c != 'u')
        return fail (ps, TLY_EINVAL, "unknown escape in string");
    uint32_t cp;
    int rc = unicode_escape (ps, &cp);
    if (rc == TLY_OK)
        *n = utf8_put (cp, out);
    return rc;
}

/*  Decodes the string at pos (on its opening quote) over its own text:
    every decoded form is no longer than its source. */
static int
parse_string (parser *ps, size_t idx)
{
    size_t start = ++ps->pos;
    size_t dst = start;
    while (true) {
        if (ps->pos >= ps->len)
            return fail (ps, TLY_EINVAL, "unterminated string");
        unsigned char c = (unsigned char) ps->text[ps->pos];
        if (c == '"')
            break;
        if (c < 0x20)
            return fail (ps, TLY_EINVAL, "raw control character in string");
        size_t n;
        if (c == '\\') {
            char tmp[4];
            ps->pos++;
            int rc = escape (ps, tmp, &n);
            if (rc)
                return rc;
            memcpy (ps->text + dst, tmp, n);
        }
        else {
            n = utf8_seq_len ((const uint8_t *) ps->text + ps->pos,
                              ps->len - ps->pos);
            if (n == 0)
                return fail (ps, TLY_EINVAL, "invalid UTF-8 in string");
            memmove (ps->text + dst, ps->text + ps->pos, n);
            ps->pos += n;
        }
        dst += n;
    }
    if (dst - start > UINT32_MAX)
        return fail (ps, TLY_ETOOLARGE, "string too long");
    ps->text[dst] = '\0';           /* dst <= the closing quote's index */
    ps->pos++;
    ps->nodes[idx].str = ps->text + start;
    ps->nodes[idx].len = (uint32_t) (dst - start);
    return TLY_OK;
}

static int
parse_number (parser *ps, size_t idx)
{
    tly_json_node *node = &ps->nodes[idx];
    if (peek (ps) == '-') {
        node->neg = true;
        ps->pos++;
    }
    int c = peek (ps);
    if (c < '0' || c > '9')
        return fail (ps, TLY_EINVAL, "expected a digit");
    if (c == '0' && ps->pos + 1 < ps->len
    &&  ps->text[ps->pos + 1] >= '0' && ps->text[ps->pos + 1] <= '9')
        return fail (ps, TLY_EINVAL, "leading zeros are not allowed");
    uint64_t v = 0;
    while ((c = peek (ps)) >= '0' && c <= '9') {
        unsigned d = (unsigned) (c - '0');
        if (v > (UINT64_MAX - d) / 10)
            return fail (ps, TLY_EINVAL, "integer out of range");
        v = v * 10 + d;
        ps->pos++;
    }
    if (c == '.' || c == 'e' || c == 'E')
        return fail (ps, TLY_EINVAL, "floats are not supported (integers only)");
    if (node->neg && v > (UINT64_C (1) << 63))
        return fail (ps, TLY_EINVAL, "integer out of range");
    if (v == 0)
        node->neg = false;          /* -0 is 0 */
    node->mag = v;
    return TLY_OK;
}

static int
parse_literal (parser *ps, size_t idx)
{
    static const struct { const char *word; tly_json_type type; } lits[] = {
        { "true", TLY_JSON_TRUE }, { "false", TLY_JSON_FALSE },
        { "null", TLY_JSON_NULL },
    };
    for (size_t i = 0; i < sizeof lits / sizeof lits[0]; i++) {
        size_t n = strlen (lits[i].word);
        if (ps->len - ps->pos >= n
        &&  memcmp (ps->text + ps->pos, lits[i].word, n) == 0) {
            ps->nodes[idx].type = lits[i].type;
            ps->pos += n;
            return TLY_OK;
        }
    }
    return fail (ps, TLY_EINVAL, "unexpected character");
}

/*  Parses the members or elements of the container at idx (pos on its
    opening bracket), up to the closing one. */
static int
parse_container (parser *ps, size_t idx, size_t depth)
{
    bool object = ps->nodes[idx].type == TLY_JSON_OBJECT;
    char close = object ? '}' : ']';
    ps->pos++;
    skip_ws (ps);
    if (peek (ps) == close) {
        ps->pos++;
        return TLY_OK;
    }
    while (true) {
        skip_ws (ps);
        int rc;
        if (object) {
            size_t key;
            if (peek (ps) != '"')
                return fail (ps, TLY_EINVAL, "expected a string key");
            if ((rc = new_node (ps, TLY_JSON_STRING, &key))
            ||  (rc = parse_string (ps, key)))
                return rc;
            ps->nodes[key].end = (uint32_t) ps->n;
            skip_ws (ps);
            if (peek (ps) != ':')
                return fail (ps, TLY_EINVAL, "expected ':' after an object key");
            ps->pos++;
        }
        if ((rc = parse_value (ps, depth + 1)))
            return rc;
        if (ps->nodes[idx].count == UINT32_MAX)
            return fail (ps, TLY_ETOOLARGE, "too many values");
        ps->nodes[idx].count++;
        skip_ws (ps);
        int c = peek (ps);
        if (c < 0)
            return fail (ps, TLY_EINVAL, "unexpected end of input");
        ps->pos++;
        if (c == close)
            return TLY_OK;
        if (c != ',')
            return fail (ps, TLY_EINVAL, object ? "expected ',' or '}'"
                                                : "expected ',' or ']'");
    }
}

static int
parse_value (parser *ps, size_t depth)
{
    skip_ws (ps);
    int c = peek (ps);
    if ((c == '{' || c == '[') && depth > ps->max_depth)
        return fail (ps, TLY_ETOOLARGE, "nesting too deep");
    if (c < 0)
        return fail (ps, TLY_EINVAL, "unexpected end of input");
    size_t idx;
    int rc = new_node (ps, TLY_JSON_NULL, &idx);
    if (rc)
        return rc;
    if (c == '{' || c == '[') {
        ps->nodes[idx].type = c == '{' ? TLY_JSON_OBJECT : TLY_JSON_ARRAY;
        rc = parse_container (ps, idx, depth);
    }
    else if (c == '"') {
        ps->nodes[idx].type = TLY_JSON_STRING;
        rc = parse_string (ps, idx);
    }
    else if (c == '-' || (c >= '0' && c <= '9')) {
        ps->nodes[idx].type = TLY_JSON_INT;
        rc = parse_number (ps, idx);
    }
    else
        rc = parse_literal (ps, idx);
    ps->nodes[idx].end = (uint32_t) ps->n;
    return rc;
}

int
tly_json_parse (char *text, size_t len, tly_json_node *nodes,
                size_t max_nodes, size_t max_depth, size_t *count,
                const char **why, size_t *at)
{
    parser ps = { .text = text, .len = len, .nodes = nodes,
                  .max_depth = max_depth,
                  .max_nodes = max_nodes < UINT32_MAX ? max_nodes : UINT32_MAX };
    int rc = parse_value (&ps, 1);
    if (rc == TLY_OK) {
        skip_ws (&ps);
        if (ps.pos != ps.len)
            rc = fail (&ps, TLY_EINVAL, "unexpected data after the JSON value");
    }
    if (why)
        *why = rc ? ps.why : NULL;
    if (at)
        *at = ps.pos;
    *count = rc ? 0 : ps.n;
    return rc;
}

long
tly_json_find (const tly_json_node *nodes, size_t obj, const char *key)
{
    if (nodes[obj].type != TLY_JSON_OBJECT)
        return -1;
    size_t i = obj + 1;
    for (uint32_t m = 0; m < nodes[obj].count; m++) {
        if (tly_json_streq (&nodes[i], key))
            return (long) i + 1;
        i = nodes[i + 1].end;
    }
    return -1;
}

bool
tly_json_streq (const tly_json_node *node, const char *s)
{
    size_t n = strlen (s);
    return node->type == TLY_JSON_STRING && node->len == n
        && memcmp (node->str, s, n) == 0;
}

/* ---- writer ---- */

static int
put (tly_buf *out, const char *s)
{
    return tly_buf_append (out, s, strlen (s));
}

int
tly_json_write_str (tly_buf *out, const char *s, size_t len)
{
    const uint8_t *p = (const uint8_t *) s;
    tly_buf_append (out, "\"", 1);
    size_t i = 0;
    while (i < len) {
        size_t run = i;             /* copy plain bytes in runs */
        size_t n;
        while (run < len && p[run] >= 0x20 && p[run] != '"' && p[run] != '\\'
           &&  (n = utf8_seq_len (p + run, len - run)) > 0)
            run += n;
        tly_buf_append (out, p + i, run - i);
        i = run;
        if (i == len)
            break;
        char esc[8];
        uint8_t c = p[i];
        if (c == '"')       put (out, "\\\"");
        else if (c == '\\') put (out, "\\\\");
        else if (c == '\n') put (out, "\\n");
        else if (c == '\r') put (out, "\\r");
        else if (c == '\t') put (out, "\\t");
        else if (c < 0x20) {
            snprintf (esc, sizeof esc, "\\u%04x", c);
            put (out, esc);
        }
        else
            put (out, "\\ufffd");   /* a byte that is not valid UTF-8 */
        i++;
    }
    tly_buf_append (out, "\"", 1);
    return out->oom ? TLY_ENOMEM : TLY_OK;
}

int
tly_json_write_hex (tly_buf *out, const uint8_t *p, size_t len)
{
    static const char digits[] = "0123456789abcdef";
    tly_buf_append (out, "\"", 1);
    if (tly_buf_reserve (out, 2 * len + 1) == TLY_OK) {
        for (size_t i = 0; i < len; i++) {
            out->data[out->len++] = (uint8_t) digits[p[i] >> 4];
            out->data[out->len++] = (uint8_t) digits[p[i] & 15];
        }
    }
    tly_buf_append (out, "\"", 1);
    return out->oom ? TLY_ENOMEM : TLY_OK;
}

static void
write_scalar (tly_buf *out, const msgpack_object *o)
{
    char num[40];
    switch (o->type) {
        case MSGPACK_OBJECT_NIL:
            put (out, "null");
            break;
        case MSGPACK_OBJECT_BOOLEAN:
            put (out, o->via.boolean ? "true" : "false");
            break;
        case MSGPACK_OBJECT_POSITIVE_INTEGER:
            snprintf (num, sizeof num, "%llu", (unsigned long long) o->via.u64);
            put (out, num);
            break;
        case MSGPACK_OBJECT_NEGATIVE_INTEGER:
            snprintf (num, sizeof num, "%lld", (long long) o->via.i64);
            put (out, num);
            break;
        case MSGPACK_OBJECT_FLOAT32:
        case MSGPACK_OBJECT_FLOAT64:
            if (isfinite (o->via.f64)) {
                snprintf (num, sizeof num, "%.17g", o->via.f64);
                put (out, num);
            }
            else
                put (out, "null");
            break;
        case MSGPACK_OBJECT_STR:
            tly_json_write_str (out, o->via.str.ptr, o->via.str.size);
            break;
        case MSGPACK_OBJECT_BIN:
            tly_json_write_hex (out, (const uint8_t *) o->via.bin.ptr,
                                o->via.bin.size);
            break;
        case MSGPACK_OBJECT_EXT:
            tly_json_write_hex (out, (const uint8_t *) o->via.ext.ptr,
                                o->via.ext.size);
            break;
        default:
            put (out, "null");
            break;
    }
}

/*  JSON keys must be strings: a str or bin key is written as one, any other
    key as the JSON string of its JSON rendering. */
static void
write_key (tly_buf *out, const msgpack_object *key)
{
    if (key->type == MSGPACK_OBJECT_STR || key->type == MSGPACK_OBJECT_BIN) {
        write_scalar (out, key);
        return;
    }
    tly_buf tmp;
    tly_buf_init (&tmp);
    if (tly_json_write_msgpack (&tmp, key) == TLY_OK)
        tly_json_write_str (out, (const char *) tmp.data, tmp.len);
    else
        out->oom = true;
    tly_buf_free (&tmp);
}

int
tly_json_write_msgpack (tly_buf *out, const msgpack_object *o)
{
    if (o->type == MSGPACK_OBJECT_ARRAY) {
        put (out, "[");
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i)
                put (out, ",");
            tly_json_write_msgpack (out, &o->via.array.ptr[i]);
        }
        put (out, "]");
    }
    else if (o->type == MSGPACK_OBJECT_MAP) {
        put (out, "{");
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            if (i)
                put (out, ",");
            write_key (out, &o->via.map.ptr[i].key);
            put (out, ":");
            tly_json_write_msgpack (out, &o->via.map.ptr[i].val);
        }
        put (out, "}");
    }
    else
        write_scalar (out, o);
    return out->oom ? TLY_ENOMEM : TLY_OK;
}
