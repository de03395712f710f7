/*  buf.h -- a growable byte buffer, and a msgpack packer that writes into it.

    tly_buf never fails loudly: after an allocation failure it sets `oom`,
    drops further writes, and every later check of `oom` tells the caller.
*/
#ifndef TALLY_BUF_H
#define TALLY_BUF_H

#include <msgpack.h>
#include "tally.h"

typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
    bool oom;
} tly_buf;

void tly_buf_init (tly_buf *self);
void tly_buf_free (tly_buf *self);
/*  Empties the buffer, keeping its memory. */
void tly_buf_reset (tly_buf *self);
/*  Appends bytes; returns TLY_OK or TLY_ENOMEM (and sets oom). */
int tly_buf_append (tly_buf *self, const void *data, size_t len);
/*  Makes room for `len` more bytes; returns TLY_OK or TLY_ENOMEM. */
int tly_buf_reserve (tly_buf *self, size_t len);

/*  Initialises a msgpack packer that appends to `buf`. */
void tly_buf_packer (tly_buf *buf, msgpack_packer *pk);

/*  Packing helpers (msgpack-c's own calls pick the smallest format). */
void tly_pack_cstr (msgpack_packer *pk, const char *s);
void tly_pack_str (msgpack_packer *pk, const char *s, size_t len);
void tly_pack_bin (msgpack_packer *pk, const void *p, size_t len);

#endif
