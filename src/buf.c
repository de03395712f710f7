/*  buf.c -- a growable byte buffer, and a msgpack packer that writes into it.

    Packing code calls msgpack-c many times per message; checking each call's
    result would bury the encoders.  So the buffer latches the first
    allocation failure in `oom`, drops every later write, and the encoder
    checks `oom` once at the end.
*/
#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include "tally/buf.h"

/*  Small enough to be cheap for a reply, large enough that most leaves and
    event maps never grow twice. */
#define BUF_MIN_CAP 256

void
tly_buf_init (tly_buf *self)
{
    assert (self);
    self->data = NULL;
    self->len = 0;
    self->cap = 0;
    self->oom = false;
}

void
tly_buf_free (tly_buf *self)
{
    assert (self);
    free (self->data);
    tly_buf_init (self);
}

/*  Also clears `oom`: the buffer is reused for a new message, and the old
    message's failure says nothing about the new one. */
void
tly_buf_reset (tly_buf *self)
{
    assert (self);
    self->len = 0;
    self->oom = false;
}

int
tly_buf_reserve (tly_buf *self, size_t len)
{
    assert (self);
    if (self->oom)
        return TLY_ENOMEM;
    if (len <= self->cap - self->len)
        return TLY_OK;

    if (len > SIZE_MAX - self->len) {
        self->oom = true;
        return TLY_ENOMEM;
    }
    size_t need = self->len + len;
    size_t cap = self->cap ? self->cap : BUF_MIN_CAP;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;

    uint8_t *data = realloc (self->data, cap);
    if (!data) {
        self->oom = true;
        return TLY_ENOMEM;
    }
    self->data = data;
    self->cap = cap;
    return TLY_OK;
}

int
tly_buf_append (tly_buf *self, const void *data, size_t len)
{
    assert (self);
    assert (data || len == 0);
    int rc = tly_buf_reserve (self, len);
    if (rc != TLY_OK)
        return rc;
    if (len) {                  /* memcpy from NULL is undefined, even for 0 */
        memcpy (self->data + self->len, data, len);
        self->len += len;
    }
    return TLY_OK;
}

/*  msgpack-c's write callback: 0 on success, anything else on failure.
    Called for every field of every message, so the common case (room
    left) is handled here: tly_buf_append is not inlined into it in a
    position-independent build. */
static int
buf_write (void *data, const char *bytes, size_t len)
{
    tly_buf *self = data;
    if (len && len <= self->cap - self->len && !self->oom) {
        memcpy (self->data + self->len, bytes, len);
        self->len += len;
        return 0;
    }
    return tly_buf_append (self, bytes, len) == TLY_OK ? 0 : -1;
}

void
tly_buf_packer (tly_buf *buf, msgpack_packer *pk)
{
    assert (buf && pk);
    msgpack_packer_init (pk, buf, buf_write);
}

void
tly_pack_cstr (msgpack_packer *pk, const char *s)
{
    assert (s);
    tly_pack_str (pk, s, strlen (s));
}

/*  msgpack_pack_str picks fixstr / str8 / str16 / str32 by length (checked
    against msgpack-c 4.0's pack_template.h and by test_event's vectors). */
void
tly_pack_str (msgpack_packer *pk, const char *s, size_t len)
{
    assert (pk);
    assert (len <= UINT32_MAX);         /* msgpack's str32 length field */
    msgpack_pack_str (pk, len);
    if (len)
        msgpack_pack_str_body (pk, s, len);
}

void
tly_pack_bin (msgpack_packer *pk, const void *p, size_t len)
{
    assert (pk);
    assert (len <= UINT32_MAX);
    msgpack_pack_bin (pk, len);
    if (len)
        msgpack_pack_bin_body (pk, p, len);
}
