/*  json.h -- a small strict JSON reader, and a msgpack-to-JSON writer.

    The CLI reads events as NDJSON and prints replies as JSON; nothing in
    the server speaks JSON.  The reader is deliberately narrow:

    - one JSON text (RFC 8259) per call: objects, arrays, strings, integers,
      true, false, null.  Numbers with a fraction or exponent are refused
      ("floats are not supported"): every number in Tally is an integer.
    - strings must be valid UTF-8 without raw control characters; escapes,
      including \uXXXX and surrogate pairs, are decoded to UTF-8.
    - it parses in place: decoded strings are written over the input text
      (a decoded string is never longer than its source) and NUL-terminated
      there, so the input buffer must stay alive while the nodes are used.
      Strings may contain U+0000, so `len` is authoritative.
    - bounded: at most max_nodes nodes, at most max_depth nesting; never
      allocates.  Duplicate object keys are kept; callers that care (the
      event reader does) refuse them.

    Nodes form a flat array in document order.  An object's members follow
    it as (key string, value subtree) pairs; node.end is the index just past
    a node's subtree, so siblings are reached by jumping to `end`.

    The writer appends JSON to a tly_buf: str as a JSON string (bytes that
    are not valid UTF-8 become U+FFFD), bin and ext as lowercase hex
    strings, map keys that are not strings as the JSON string of their JSON
    rendering, non-finite floats as null.
*/
#ifndef TALLY_JSON_H
#define TALLY_JSON_H

#include <msgpack.h>
#include "tally.h"
#include "buf.h"

typedef enum {
    TLY_JSON_NULL, TLY_JSON_FALSE, TLY_JSON_TRUE, TLY_JSON_INT,
    TLY_JSON_STRING, TLY_JSON_ARRAY, TLY_JSON_OBJECT
} tly_json_type;

typedef struct {
    tly_json_type type;
    uint32_t count;        /* array: elements; object: members              */
    uint32_t end;          /* index one past this node's subtree            */
    uint32_t len;          /* string: decoded length in bytes               */
    const char *str;       /* string: decoded UTF-8, NUL-terminated         */
    bool neg;              /* integer: true when negative                   */
    uint64_t mag;          /* integer: magnitude (|value|; <= 2^63 if neg)  */
} tly_json_node;

/*  Parses text[0..len) in place into nodes[0..*count).  Returns TLY_OK,
    TLY_EINVAL (malformed, with a static reason and the byte offset of the
    problem in *at) or TLY_ETOOLARGE (more than max_nodes nodes or deeper
    than max_depth).  why and at may be NULL. */
int tly_json_parse (char *text, size_t len, tly_json_node *nodes,
                    size_t max_nodes, size_t max_depth, size_t *count,
                    const char **why, size_t *at);

/*  Index of the value of member `key` of the object at nodes[obj], or -1
    when absent (or nodes[obj] is not an object).  The first match wins. */
long tly_json_find (const tly_json_node *nodes, size_t obj, const char *key);

/*  True when nodes[i] is a string equal to the C string s. */
bool tly_json_streq (const tly_json_node *node, const char *s);

/*  Writer.  Each returns TLY_OK or TLY_ENOMEM. */
int tly_json_write_str (tly_buf *out, const char *s, size_t len);
int tly_json_write_hex (tly_buf *out, const uint8_t *p, size_t len);
int tly_json_write_msgpack (tly_buf *out, const msgpack_object *obj);

#endif
