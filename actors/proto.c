/*  proto.c -- encoders and decoders of the actors' link messages. */
#include "proto.h"
#include "tally/msg.h"

static const tly_msg_limits s_link_limits = { 6, 8000000 };

int
tly_link_recv (zsock_t *link, tly_link_msg *m)
{
    memset (m, 0, sizeof *m);
    m->msg = zmsg_recv (link);
    if (!m->msg)
        return TLY_EIO;
    msgpack_zone_init (&m->zone, 8192);
    zframe_t *f = zmsg_first (m->msg);
    if (!f || zmsg_size (m->msg) != 1)
        return TLY_EPROTO;
    const uint8_t *data = zframe_data (f);
    size_t len = zframe_size (f);
    if (tly_msg_check (data, len, &s_link_limits, NULL)
    ||  tly_msg_unpack (data, len, &m->zone, &m->obj)
    ||  m->obj.type != MSGPACK_OBJECT_ARRAY || m->obj.via.array.size < 2)
        return TLY_EPROTO;
    uint64_t type;
    if (tly_obj_uint (&m->obj.via.array.ptr[0], &type) || type > 255
    ||  tly_obj_uint (&m->obj.via.array.ptr[1], &m->ctx))
        return TLY_EPROTO;
    m->type = (int) type;
    return TLY_OK;
}

void
tly_link_done (tly_link_msg *m)
{
    if (m->msg) {
        zmsg_destroy (&m->msg);
        msgpack_zone_destroy (&m->zone);
    }
}

void
tly_link_begin (tly_buf *buf, msgpack_packer *pk, uint32_t fields, int type, uint64_t ctx)
{
    tly_buf_reset (buf);
    tly_buf_packer (buf, pk);
    msgpack_pack_array (pk, fields);
    msgpack_pack_uint8 (pk, (uint8_t) type);
    msgpack_pack_uint64 (pk, ctx);
}

int
tly_link_send (zsock_t *link, const tly_buf *buf, bool wait)
{
    if (buf->oom)
        return TLY_ENOMEM;
    zmq_msg_t msg;
    if (zmq_msg_init_size (&msg, buf->len))
        return TLY_ENOMEM;
    memcpy (zmq_msg_data (&msg), buf->data, buf->len);
    if (zmq_msg_send (&msg, zsock_resolve (link), wait ? 0 : ZMQ_DONTWAIT) < 0) {
        zmq_msg_close (&msg);
        return TLY_EUNAVAIL;
    }
    return TLY_OK;
}

const msgpack_object *
tly_link_field (const tly_link_msg *m, uint32_t i)
{
    return i < m->obj.via.array.size ? &m->obj.via.array.ptr[i] : NULL;
}

int
tly_obj_str (const msgpack_object *o, tly_str *out)
{
    if (!o || o->type != MSGPACK_OBJECT_STR)
        return TLY_EINVAL;
    out->ptr = o->via.str.ptr;
    out->len = o->via.str.size;
    return TLY_OK;
}

int
tly_obj_uint (const msgpack_object *o, uint64_t *out)
{
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return TLY_EINVAL;
    *out = o->via.u64;
    return TLY_OK;
}

void
tly_item_pack (msgpack_packer *pk, const tly_item *it)
{
    msgpack_pack_array (pk, it->found ? 9 : 8);
    msgpack_pack_uint32 (pk, it->idx);
    tly_pack_bin (pk, it->tail.ptr, it->tail.len);
    tly_pack_str (pk, it->customer.ptr, it->customer.len);
    tly_pack_str (pk, it->key.ptr, it->key.len);
    tly_pack_str (pk, it->meter.ptr, it->meter.len);
    msgpack_pack_uint64 (pk, it->qty);
    msgpack_pack_uint64 (pk, it->ts);
    tly_pack_bin (pk, it->dedup, TLY_DEDUP_LEN);
    if (it->found)
        msgpack_pack_uint64 (pk, it->seq);
}

int
tly_item_decode (const msgpack_object *o, tly_item *it)
{
    if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 8 || o->via.array.size > 9)
        return TLY_EINVAL;
    const msgpack_object *f = o->via.array.ptr;
    it->found = o->via.array.size == 9;
    if (it->found && tly_obj_uint (&f[8], &it->seq))
        return TLY_EINVAL;
    uint64_t idx;
    if (tly_obj_uint (&f[0], &idx) || idx >= TLY_BATCH_MAX
    ||  f[1].type != MSGPACK_OBJECT_BIN
    ||  tly_obj_str (&f[2], &it->customer) || tly_obj_str (&f[3], &it->key)
    ||  tly_obj_str (&f[4], &it->meter)
    ||  tly_obj_uint (&f[5], &it->qty) || tly_obj_uint (&f[6], &it->ts)
    ||  f[7].type != MSGPACK_OBJECT_BIN || f[7].via.bin.size != TLY_DEDUP_LEN
    ||  it->customer.len > TLY_CUSTOMER_MAX || it->key.len > TLY_KEY_MAX
    ||  it->meter.len > TLY_METER_MAX)
        return TLY_EINVAL;
    memcpy (it->dedup, f[7].via.bin.ptr, TLY_DEDUP_LEN);
    it->idx = (uint32_t) idx;
    it->tail.ptr = f[1].via.bin.ptr;
    it->tail.len = f[1].via.bin.size;
    return TLY_OK;
}

void
tly_asked_pack (msgpack_packer *pk, const uint32_t *ids, size_t n)
{
    msgpack_pack_bin (pk, (uint32_t) (n * 4));
    for (size_t i = 0; i < n; i++) {
        uint8_t be[4] = { (uint8_t) (ids[i] >> 24), (uint8_t) (ids[i] >> 16),
                          (uint8_t) (ids[i] >> 8), (uint8_t) ids[i] };
        msgpack_pack_bin_body (pk, be, 4);
    }
}

int
tly_asked_decode (const msgpack_object *o, uint32_t *ids, size_t *n)
{
    *n = 0;
    if (!o || o->type != MSGPACK_OBJECT_BIN || o->via.bin.size % 4
    ||  o->via.bin.size / 4 > TLY_DEDUP_RUNS_MAX)
        return TLY_EINVAL;
    const uint8_t *p = (const uint8_t *) o->via.bin.ptr;
    for (size_t i = 0; i < o->via.bin.size / 4; i++, p += 4) {
        ids[i] = (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
        if (i > 0 && ids[i] <= ids[i - 1])
            return TLY_EINVAL;
    }
    *n = o->via.bin.size / 4;
    return TLY_OK;
}

void
tly_outcome_pack (msgpack_packer *pk, const tly_outcome *oc)
{
    if (oc->status == TLY_ST_REJECTED) {
        msgpack_pack_array (pk, 4);
        msgpack_pack_uint32 (pk, oc->idx);
        msgpack_pack_uint8 (pk, oc->status);
        tly_pack_cstr (pk, oc->code);
        tly_pack_cstr (pk, oc->message);
        return;
    }
    msgpack_pack_array (pk, 5);
    msgpack_pack_uint32 (pk, oc->idx);
    msgpack_pack_uint8 (pk, oc->status);
    msgpack_pack_uint64 (pk, oc->seq);
    msgpack_pack_uint64 (pk, oc->recv_ts);
    tly_pack_bin (pk, oc->leaf, 32);
}

/*  Codes and messages come back as pointers into the message; we copy them
    out through these static tables so outcomes never outlive their frame. */
static const char *s_codes[] = { "quota_exceeded", "invalid", "forbidden", "internal",
                                 "unavailable", NULL };

int
tly_outcome_decode (const msgpack_object *o, tly_outcome *oc)
{
    if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 4)
        return TLY_EINVAL;
    const msgpack_object *f = o->via.array.ptr;
    uint64_t idx, status;
    if (tly_obj_uint (&f[0], &idx) || idx >= TLY_BATCH_MAX
    ||  tly_obj_uint (&f[1], &status) || status > TLY_ST_REJECTED)
        return TLY_EINVAL;
    oc->idx = (uint32_t) idx;
    oc->status = (uint8_t) status;
    if (status == TLY_ST_REJECTED) {
        tly_str code, message;
        if (o->via.array.size != 4 || tly_obj_str (&f[2], &code) || tly_obj_str (&f[3], &message))
            return TLY_EINVAL;
        oc->code = "internal";
        for (int i = 0; s_codes[i]; i++)
            if (strlen (s_codes[i]) == code.len && memcmp (s_codes[i], code.ptr, code.len) == 0)
                oc->code = s_codes[i];
        oc->message = NULL;     /* caller reads f[3] itself if it wants it */
        return TLY_OK;
    }
    if (o->via.array.size != 5 || tly_obj_uint (&f[2], &oc->seq)
    ||  tly_obj_uint (&f[3], &oc->recv_ts)
    ||  f[4].type != MSGPACK_OBJECT_BIN || f[4].via.bin.size != 32)
        return TLY_EINVAL;
    memcpy (oc->leaf, f[4].via.bin.ptr, 32);
    return TLY_OK;
}

void
tly_reply_head (msgpack_packer *pk, bool ok, const msgpack_object *id, uint32_t extra)
{
    msgpack_pack_map (pk, 1 + (id ? 1 : 0) + extra);
    tly_pack_cstr (pk, "ok");
    if (ok)
        msgpack_pack_true (pk);
    else
        msgpack_pack_false (pk);
    if (id) {
        tly_pack_cstr (pk, "id");
        msgpack_pack_object (pk, *id);
    }
}

void
tly_reply_error (tly_buf *out, const msgpack_object *id, const char *code,
                 const char *message)
{
    msgpack_packer pk;
    tly_buf_packer (out, &pk);
    tly_reply_head (&pk, false, id, 1);
    tly_pack_cstr (&pk, "error");
    msgpack_pack_map (&pk, 2);
    tly_pack_cstr (&pk, "code");
    tly_pack_cstr (&pk, code);
    tly_pack_cstr (&pk, "message");
    tly_pack_cstr (&pk, message);
}
