/*  client.c -- the Tally client library (see client.h for the contract).

    One DEALER socket per client.  Every request carries a fresh numeric id
    (never reused in the client's life), so a late reply to a request we
    gave up on can never be mistaken for the answer to a newer one: it is
    simply ignored.  A retry resends the stored body byte for byte, id
    included, so whichever reply comes first answers it.

    Replies are untrusted bytes: each passes tly_msg_check before msgpack-c
    sees it, and every field is type-checked before use.
*/
#include <czmq.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <string.h>
#include "tally/client.h"
#include "tally/msg.h"

#define CLIENT_LINGER_MS   100
#define CLIENT_HWM         1000
#define CLIENT_MAX_REPLY   (64 * 1024 * 1024)  /* bigger replies drop the link */
#define BACKOFF_BASE_MS    50
#define BACKOFF_MAX_MS     2000
#define REQUEST_SLACK      64       /* room for the ingest header fields */

const tly_client_opts tly_client_default_opts = {
    .timeout_ms = 10000,
    .retries = 5,
    .max_inflight = 8,
};

/*  Replies nest shallowly (ingest: map, results, result) but an ingest
    reply for 10,000 events holds ~100k objects. */
static const tly_msg_limits reply_limits = {
    .max_depth = 16,
    .max_objects = 2000000,
};

struct tly_client {
    zsock_t *sock;
    void *handle;                 /* the libzmq socket inside sock */
    char *endpoint;
    tly_client_opts opts;
    uint64_t next_id;
    tly_buf req;                  /* body of the request being built */
    zmq_msg_t frame;              /* last reply's body: results borrow it */
    msgpack_zone zone;
    msgpack_object obj;           /* last reply, unpacked */
    char err_code[32];
    char err_msg[256];
};

/*  A request in flight (or waiting out its back-off before a resend). */
typedef struct {
    tly_buf body;
    uint64_t id;
    size_t first;                 /* push: events[first .. first + count) */
    size_t count;
    unsigned attempts;            /* sends so far */
    int64_t due;                  /* deadline, or resend time in back-off */
    bool backoff;
    bool busy;
} client_slot;

/* ---- errors ---- */

static int
client_fail (tly_client *self, int rc, const char *code, const char *fmt, ...)
{
    snprintf (self->err_code, sizeof self->err_code, "%s", code);
    va_list args;
    va_start (args, fmt);
    vsnprintf (self->err_msg, sizeof self->err_msg, fmt, args);
    va_end (args);
    return rc;
}

static void
client_clear_error (tly_client *self)
{
    self->err_code [0] = '\0';
    self->err_msg [0] = '\0';
}

const char *
tly_client_error_code (tly_client *self)
{
    return self->err_code;
}

const char *
tly_client_error_message (tly_client *self)
{
    return self->err_msg;
}

/* ---- lifecycle ---- */

static tly_client_opts
opts_resolve (const tly_client_opts *opts)
{
    tly_client_opts o = opts ? *opts : tly_client_default_opts;
    if (o.timeout_ms == 0)
        o.timeout_ms = tly_client_default_opts.timeout_ms;
    if (o.max_inflight == 0)
        o.max_inflight = tly_client_default_opts.max_inflight;
    if (o.timeout_ms > INT_MAX)
        o.timeout_ms = INT_MAX;
    return o;
}

int
tly_client_new (const char *endpoint, const tly_client_opts *opts,
                tly_client **out)
{
    assert (out);
    *out = NULL;
    if (!endpoint || !*endpoint)
        return TLY_EINVAL;
    tly_client *self = calloc (1, sizeof *self);
    if (!self)
        return TLY_ENOMEM;
    self->opts = opts_resolve (opts);
    self->next_id = 1;
    self->endpoint = strdup (endpoint);
    self->sock = zsock_new (ZMQ_DEALER);
    tly_buf_init (&self->req);
    zmq_msg_init (&self->frame);
    if (!self->endpoint || !self->sock
    ||  !msgpack_zone_init (&self->zone, 8192)) {
        zsock_destroy (&self->sock);
        zmq_msg_close (&self->frame);
        free (self->endpoint);
        free (self);
        return TLY_ENOMEM;
    }
    zsock_set_linger (self->sock, CLIENT_LINGER_MS);
    /*  Room for every request in flight and a backlog of stale replies. */
    int hwm = CLIENT_HWM + 2 * (int) (self->opts.max_inflight < 100000
                                      ? self->opts.max_inflight : 100000);
    zsock_set_sndhwm (self->sock, hwm);
    zsock_set_rcvhwm (self->sock, hwm);
    zsock_set_maxmsgsize (self->sock, CLIENT_MAX_REPLY);
    /*  DEALER blocks at the high-water mark: never longer than a timeout. */
    zsock_set_sndtimeo (self->sock, (int) self->opts.timeout_ms);
    self->handle = zsock_resolve (self->sock);
    *out = self;
    if (zsock_connect (self->sock, "%s", endpoint) != 0) {
        tly_client_destroy (out);
        return TLY_EINVAL;
    }
    return TLY_OK;
}

void
tly_client_destroy (tly_client **self_p)
{
    assert (self_p);
    tly_client *self = *self_p;
    if (!self)
        return;
    zsock_destroy (&self->sock);
    zmq_msg_close (&self->frame);
    msgpack_zone_destroy (&self->zone);
    tly_buf_free (&self->req);
    free (self->endpoint);
    free (self);
    *self_p = NULL;
}

int
tly_client_last_reply (tly_client *self, const uint8_t **data, size_t *len)
{
    *data = zmq_msg_data (&self->frame);
    *len = zmq_msg_size (&self->frame);
    return *len ? TLY_OK : TLY_ENOTFOUND;
}

/* ---- one exchange: send, wait, retry ---- */

static int
slot_send (tly_client *self, client_slot *slot)
{
    if (zmq_send (self->handle, slot->body.data, slot->body.len, 0) < 0) {
        if (errno == EAGAIN)
            return client_fail (self, TLY_ETIMEOUT, "timeout",
                "could not queue a request to %s within %u ms",
                self->endpoint, self->opts.timeout_ms);
        return client_fail (self, TLY_EIO, "socket",
            "sending to %s failed: %s", self->endpoint, zmq_strerror (errno));
    }
    slot->attempts++;
    slot->backoff = false;
    slot->due = zclock_mono () + self->opts.timeout_ms;
    return TLY_OK;
}

/*  Doubling back-off with a little per-request jitter, so that many
    clients turned away by a restarting server do not return in step. */
static void
slot_backoff (client_slot *slot, int64_t now)
{
    unsigned shift = slot->attempts > 6 ? 6 : slot->attempts - 1;
    int64_t delay = (int64_t) BACKOFF_BASE_MS << shift;
    if (delay > BACKOFF_MAX_MS)
        delay = BACKOFF_MAX_MS;
    delay += (int64_t) ((slot->id * 2654435761u) % (uint64_t) (delay / 4 + 1));
    slot->backoff = true;
    slot->due = now + delay;
}

static bool
may_retry (const tly_client *self, const client_slot *slot, bool retry)
{
    return retry && slot->attempts <= self->opts.retries;
}

/*  Receives one message and keeps its last frame (the body; a DEALER sees
    no envelope, but the protocol allows one) in self->frame. */
static int
recv_frame (tly_client *self)
{
    while (true) {
        if (zmq_msg_recv (&self->frame, self->handle, ZMQ_DONTWAIT) < 0)
            return errno == EAGAIN ? TLY_EUNAVAIL
                 : client_fail (self, TLY_EIO, "socket", "receiving from %s "
                                "failed: %s", self->endpoint, zmq_strerror (errno));
        if (!zmq_msg_more (&self->frame))
            return TLY_OK;
    }
}

/*  Checks and unpacks self->frame into self->obj; reads its id (0 when it
    has none: ids start at 1) and its ok flag. */
static int
parse_reply (tly_client *self, uint64_t *id, bool *ok)
{
    const uint8_t *data = zmq_msg_data (&self->frame);
    size_t len = zmq_msg_size (&self->frame);
    const char *why = "empty frame";
    if (len == 0 || tly_msg_check (data, len, &reply_limits, &why) != TLY_OK)
        return client_fail (self, TLY_EPROTO, "protocol",
            "%s sent a reply that is not one msgpack object (%s)",
            self->endpoint, why);
    msgpack_zone_clear (&self->zone);
    int rc = tly_msg_unpack (data, len, &self->zone, &self->obj);
    if (rc == TLY_ENOMEM)
        return client_fail (self, rc, "nomem", "out of memory unpacking a reply");
    if (rc != TLY_OK || self->obj.type != MSGPACK_OBJECT_MAP)
        return client_fail (self, TLY_EPROTO, "protocol",
            "%s sent a reply that is not a msgpack map", self->endpoint);
    if (tly_msg_get_bool (&self->obj, "ok", ok) != TLY_OK)
        return client_fail (self, TLY_EPROTO, "protocol",
            "%s sent a reply without a boolean \"ok\"", self->endpoint);
    rc = tly_msg_get_uint (&self->obj, "id", id);
    if (rc == TLY_ENOTFOUND)
        *id = 0;
    else if (rc != TLY_OK)
        return client_fail (self, TLY_EPROTO, "protocol",
            "%s sent a reply whose \"id\" is not an unsigned integer",
            self->endpoint);
    return TLY_OK;
}

/*  Reads {"error": {"code", "message"}} of a failed reply into the error
    fields.  Returns TLY_ESERVER, or TLY_EPROTO when it is malformed. */
static int
server_error (tly_client *self)
{
    const msgpack_object *err = tly_msg_get (&self->obj, "error");
    tly_str code, msg = { "", 0 };
    if (!err || tly_msg_get_str (err, "code", &code) != TLY_OK
    ||  tly_msg_get_str (err, "message", &msg) == TLY_EINVAL)
        return client_fail (self, TLY_EPROTO, "protocol",
            "%s sent an error reply without an error code", self->endpoint);
    client_fail (self, TLY_ESERVER, "", "%.*s", (int) msg.len, msg.ptr);
    size_t n = code.len < sizeof self->err_code - 1
             ? code.len : sizeof self->err_code - 1;
    memcpy (self->err_code, code.ptr, n);
    self->err_code [n] = '\0';
    return TLY_ESERVER;
}

static bool
is_unavailable (tly_client *self)
{
    const msgpack_object *err = tly_msg_get (&self->obj, "error");
    const msgpack_object *code = err ? tly_msg_get (err, "code") : NULL;
    return code && tly_msg_streq (code, "unavailable");
}

/*  Resends slots whose back-off is over, and schedules a retry for (or
    fails on) slots whose deadline passed.  *wake gets the next due time. */
static int
exchange_timers (tly_client *self, client_slot *slots, size_t nslots,
                 bool retry, int64_t *wake)
{
    int64_t now = zclock_mono ();
    *wake = INT64_MAX;
    for (size_t i = 0; i < nslots; i++) {
        client_slot *s = &slots [i];
        if (!s->busy)
            continue;
        if (s->due <= now && s->backoff) {
            int rc = slot_send (self, s);
            if (rc)
                return rc;
        }
        else
        if (s->due <= now) {
            if (!may_retry (self, s, retry))
                return client_fail (self, TLY_ETIMEOUT, "timeout",
                    "no reply from %s within %u ms (%u attempt%s); is tallyd "
                    "running there?", self->endpoint, self->opts.timeout_ms,
                    s->attempts, s->attempts == 1 ? "" : "s");
            slot_backoff (s, now);
        }
        if (s->due < *wake)
            *wake = s->due;
    }
    return TLY_OK;
}

/*  Waits for input until `wake`.  TLY_OK when a message is readable,
    TLY_EUNAVAIL when the time passed first. */
static int
exchange_poll (tly_client *self, int64_t wake)
{
    int64_t wait = wake - zclock_mono ();
    zmq_pollitem_t item = { self->handle, 0, ZMQ_POLLIN, 0 };
    int n = zmq_poll (&item, 1, wait < 0 ? 0 : (long) wait);
    if (n < 0 && errno == EINTR && zsys_interrupted)
        return client_fail (self, TLY_ETIMEOUT, "interrupted", "interrupted");
    if (n < 0 && errno != EINTR)
        return client_fail (self, TLY_EIO, "socket", "polling %s failed: %s",
                            self->endpoint, zmq_strerror (errno));
    return n > 0 ? TLY_OK : TLY_EUNAVAIL;
}

/*  Runs timers and receives until one busy slot has its final reply in
    self->obj: ok, or an error that is not retried.  Returns the slot's
    index, or a negative error.  Replies with unknown ids are ignored; a
    reply that is not a well-formed map fails the exchange (TLY_EPROTO): on
    a DEALER link it can only come from a broken server. */
static int
exchange_next (tly_client *self, client_slot *slots, size_t nslots, bool retry)
{
    while (true) {
        int64_t wake;
        int rc = exchange_timers (self, slots, nslots, retry, &wake);
        if (rc)
            return rc;
        assert (wake != INT64_MAX);     /* a caller waits on a busy slot */
        if (wake == INT64_MAX)
            return client_fail (self, TLY_EINVAL, "invalid", "nothing in flight");
        if ((rc = exchange_poll (self, wake)) == TLY_EUNAVAIL)
            continue;               /* a timer is due, or EINTR */
        if (rc == TLY_OK && (rc = recv_frame (self)) == TLY_EUNAVAIL)
            continue;
        uint64_t id;
        bool ok;
        if (rc || (rc = parse_reply (self, &id, &ok)))
            return rc;
        /*  A failure without an id answers a request the server could not
            read; ours are always readable, so it is about ours. */
        if (id == 0 && !ok)
            return server_error (self);
        for (size_t i = 0; i < nslots; i++) {
            client_slot *s = &slots [i];
            if (!s->busy || s->id != id)
                continue;
            if (!ok && is_unavailable (self) && may_retry (self, s, retry))
                slot_backoff (s, zclock_mono ());
            else
                return (int) i;
        }
    }
}

/*  Starts a request body {"op": op, "id": <new id>, ...} with nfields more
    fields to follow, in self->req. */
static uint64_t
request_begin (tly_client *self, msgpack_packer *pk, const char *op,
               size_t nfields)
{
    uint64_t id = self->next_id++;
    tly_buf_reset (&self->req);
    tly_buf_packer (&self->req, pk);
    msgpack_pack_map (pk, nfields + 2);
    tly_pack_cstr (pk, "op");
    tly_pack_cstr (pk, op);
    tly_pack_cstr (pk, "id");
    msgpack_pack_uint64 (pk, id);
    return id;
}

/*  Sends self->req as request `id` and waits for its reply in self->obj.
    Returns TLY_OK, TLY_ESERVER (error fields set) or another error. */
static int
request_run (tly_client *self, uint64_t id, bool retry)
{
    if (self->req.oom)
        return client_fail (self, TLY_ENOMEM, "nomem", "out of memory");
    client_slot slot = { .body = self->req, .id = id, .busy = true };
    int rc = slot_send (self, &slot);
    if (rc == TLY_OK)
        rc = exchange_next (self, &slot, 1, retry);
    if (rc < 0)
        return rc;
    bool ok = false;
    tly_msg_get_bool (&self->obj, "ok", &ok);
    return ok ? TLY_OK : server_error (self);
}

static int
bad_reply (tly_client *self, const char *op, const char *what)
{
    return client_fail (self, TLY_EPROTO, "protocol",
                        "%s sent a malformed %s reply: %s", self->endpoint,
                        op, what);
}

/* ---- push ---- */

typedef struct {
    const tly_event *events;
    size_t n;
    size_t batch;
    size_t next;                  /* first event not yet in a request */
    tly_result *results;
    tly_sth newest;
    bool have_sth;
    const uint8_t *pk;
    tly_buf evbuf;                /* packed events of the request in making */
} push_state;

/*  Copies s into a fixed field, cutting at a UTF-8 character boundary. */
static void
copy_text (char *dst, size_t cap, tly_str s)
{
    size_t n = s.len < cap - 1 ? s.len : cap - 1;
    if (n < s.len)
        while (n > 0 && ((uint8_t) s.ptr [n] & 0xc0) == 0x80)
            n--;
    memcpy (dst, s.ptr, n);
    dst [n] = '\0';
}

/*  Reads one ingest result strictly.  Returns NULL or what is wrong. */
static const char *
decode_result (const msgpack_object *o, const tly_sth *sth, tly_result *r)
{
    const msgpack_object *st = tly_msg_get (o, "status");
    memset (r, 0, sizeof *r);
    if (!st)
        return "a result has no status";
    if (tly_msg_streq (st, "rejected")) {
        tly_str code, msg;
        r->status = TLY_REJECTED;
        if (tly_msg_get_str (o, "code", &code) || code.len == 0
        ||  tly_msg_get_str (o, "message", &msg))
            return "a rejected result lacks its code or message";
        copy_text (r->code, sizeof r->code, code);
        copy_text (r->message, sizeof r->message, msg);
        return NULL;
    }
    if (tly_msg_get_uint (o, "seq", &r->seq))
        return "a result lacks its seq";
    if (tly_msg_streq (st, "conflict")) {
        r->status = TLY_CONFLICT;
        return NULL;
    }
    if (tly_msg_streq (st, "accepted"))
        r->status = TLY_ACCEPTED;
    else
    if (tly_msg_streq (st, "duplicate"))
        r->status = TLY_DUPLICATE;
    else
        return "a result has an unknown status";
    tly_str leaf;
    if (tly_msg_get_uint (o, "recv_ts", &r->recv_ts)
    ||  tly_msg_get_bin (o, "leaf", &leaf) || leaf.len != 32)
        return "a result lacks recv_ts or a 32-byte leaf";
    memcpy (r->leaf, leaf.ptr, 32);
    if (r->seq >= sth->tree_size)
        return "a result's seq is not covered by the reply's STH";
    return NULL;
}

static void
results_unanswered (tly_result *results, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        memset (&results [i], 0, sizeof results [i]);
        results [i].status = TLY_REJECTED;
        strcpy (results [i].code, "no_reply");
        strcpy (results [i].message, "the request carrying this event got no valid reply");
    }
}

static int
push_reply (tly_client *self, push_state *ps, const client_slot *slot)
{
    bool ok = false;
    tly_msg_get_bool (&self->obj, "ok", &ok);
    if (!ok)
        return server_error (self);
    tly_sth sth;
    const msgpack_object *res = tly_msg_get (&self->obj, "results");
    const msgpack_object *so = tly_msg_get (&self->obj, "sth");
    if (!so || tly_sth_decode (so, &sth) != TLY_OK)
        return bad_reply (self, "ingest", "no valid sth");
    if (!res || res->type != MSGPACK_OBJECT_ARRAY
    ||  res->via.array.size != slot->count)
        return bad_reply (self, "ingest", "results do not match the events sent");
    if (ps->pk && tly_sth_verify (&sth, ps->pk) != TLY_OK)
        return client_fail (self, TLY_ECRYPTO, "signature",
            "the STH from %s (tree_size %llu) does not verify with the given "
            "public key", self->endpoint, (unsigned long long) sth.tree_size);
    for (size_t i = 0; i < slot->count; i++) {
        const char *why = decode_result (&res->via.array.ptr [i], &sth,
                                         &ps->results [slot->first + i]);
        if (why) {
            results_unanswered (&ps->results [slot->first], slot->count);
            return bad_reply (self, "ingest", why);
        }
    }
    if (!ps->have_sth || sth.tree_size > ps->newest.tree_size
    ||  (sth.tree_size == ps->newest.tree_size && sth.ts > ps->newest.ts))
        ps->newest = sth;
    ps->have_sth = true;
    return TLY_OK;
}

/*  Fills slot with the next request: up to `batch` events, fewer when
    more would pass the server's request size limit. */
static int
push_build (tly_client *self, push_state *ps, client_slot *slot)
{
    msgpack_packer pk;
    tly_buf_reset (&ps->evbuf);
    tly_buf_packer (&ps->evbuf, &pk);
    size_t count = 0;
    while (ps->next + count < ps->n && count < ps->batch) {
        size_t before = ps->evbuf.len;
        tly_event_pack (&ps->events [ps->next + count], &pk);
        if (count > 0 && ps->evbuf.len + REQUEST_SLACK > TLY_REQUEST_MAX) {
            ps->evbuf.len = before;
            break;
        }
        count++;
    }
    slot->id = self->next_id++;
    slot->first = ps->next;
    slot->count = count;
    slot->attempts = 0;
    slot->busy = true;
    ps->next += count;

    tly_buf_reset (&slot->body);
    tly_buf_packer (&slot->body, &pk);
    msgpack_pack_map (&pk, 3);
    tly_pack_cstr (&pk, "op");
    tly_pack_cstr (&pk, "ingest");
    tly_pack_cstr (&pk, "id");
    msgpack_pack_uint64 (&pk, slot->id);
    tly_pack_cstr (&pk, "events");
    msgpack_pack_array (&pk, count);
    tly_buf_append (&slot->body, ps->evbuf.data, ps->evbuf.len);
    if (slot->body.oom || ps->evbuf.oom)
        return client_fail (self, TLY_ENOMEM, "nomem", "out of memory");
    return TLY_OK;
}

/*  Keeps every free slot busy while events remain. */
static int
push_fill (tly_client *self, push_state *ps, client_slot *slots, size_t nslots)
{
    for (size_t i = 0; i < nslots && ps->next < ps->n; i++) {
        if (slots [i].busy)
            continue;
        int rc = push_build (self, ps, &slots [i]);
        if (rc == TLY_OK)
            rc = slot_send (self, &slots [i]);
        if (rc)
            return rc;
    }
    return TLY_OK;
}

static bool
any_busy (const client_slot *slots, size_t nslots)
{
    for (size_t i = 0; i < nslots; i++)
        if (slots [i].busy)
            return true;
    return false;
}

int
tly_client_push (tly_client *self, const tly_event *events, size_t n,
                 size_t batch, tly_result *results, tly_sth *sth,
                 const uint8_t *pk)
{
    assert (self);
    client_clear_error (self);
    if (batch == 0 || batch > TLY_BATCH_MAX || (n && (!events || !results)))
        return client_fail (self, TLY_EINVAL, "invalid",
                            "batch must be 1..%d", TLY_BATCH_MAX);
    if (n == 0)
        return TLY_OK;
    results_unanswered (results, n);
    size_t nslots = self->opts.max_inflight;
    client_slot *slots = calloc (nslots, sizeof *slots);
    if (!slots)
        return client_fail (self, TLY_ENOMEM, "nomem", "out of memory");
    push_state ps = { .events = events, .n = n, .batch = batch,
                      .results = results, .pk = pk };
    tly_buf_init (&ps.evbuf);
    int rc = TLY_OK;
    while (rc == TLY_OK) {
        if ((rc = push_fill (self, &ps, slots, nslots)))
            break;
        if (!any_busy (slots, nslots))
            break;
        int idx = exchange_next (self, slots, nslots, true);
        if (idx < 0)
            rc = idx;
        else {
            rc = push_reply (self, &ps, &slots [idx]);
            slots [idx].busy = false;
        }
    }
    for (size_t i = 0; i < nslots; i++)
        tly_buf_free (&slots [i].body);
    free (slots);
    tly_buf_free (&ps.evbuf);
    if (rc == TLY_OK && sth && ps.have_sth)
        *sth = ps.newest;
    return rc;
}

/* ---- get ---- */

static int
str_cmp (tly_str a, tly_str b)
{
    size_t n = a.len < b.len ? a.len : b.len;
    int c = memcmp (a.ptr, b.ptr, n);
    return c ? c : (a.len > b.len) - (a.len < b.len);
}

static bool
str_eq (tly_str a, tly_str b)
{
    return a.len == b.len && memcmp (a.ptr, b.ptr, a.len) == 0;
}

/*  Reads props (a map of str to str) sorted ascending; NULL or what is
    wrong.  Absent props are no props. */
static const char *
decode_props (const msgpack_object *entry, tly_event *ev)
{
    const msgpack_object *props = tly_msg_get (entry, "props");
    ev->nprops = 0;
    if (!props || props->type == MSGPACK_OBJECT_NIL)
        return NULL;
    if (props->type != MSGPACK_OBJECT_MAP || props->via.map.size > TLY_PROPS_MAX)
        return "props is not a map of at most 16 entries";
    for (uint32_t i = 0; i < props->via.map.size; i++) {
        const msgpack_object_kv *kv = &props->via.map.ptr [i];
        if (kv->key.type != MSGPACK_OBJECT_STR || kv->val.type != MSGPACK_OBJECT_STR)
            return "props holds a key or value that is not a string";
        tly_prop p = { { kv->key.via.str.ptr, kv->key.via.str.size },
                       { kv->val.via.str.ptr, kv->val.via.str.size } };
        uint32_t j = ev->nprops++;         /* insertion sort: <= 16 items */
        while (j > 0 && str_cmp (ev->props [j - 1].key, p.key) > 0) {
            ev->props [j] = ev->props [j - 1];
            j--;
        }
        ev->props [j] = p;
    }
    for (uint32_t i = 1; i < ev->nprops; i++)
        if (str_eq (ev->props [i - 1].key, ev->props [i].key))
            return "props repeats a key";
    return NULL;
}

static const char *
decode_entry (const msgpack_object *o, tly_entry *e)
{
    memset (e, 0, sizeof *e);
    if (!o || o->type != MSGPACK_OBJECT_MAP)
        return "no entry map";
    if (tly_msg_get_uint (o, "seq", &e->seq)
    ||  tly_msg_get_uint (o, "recv_ts", &e->recv_ts)
    ||  tly_msg_get_str (o, "kind", &e->kind) || e->kind.len == 0
    ||  e->kind.len > 63
    ||  tly_msg_get_str (o, "customer", &e->ev.customer)
    ||  tly_msg_get_str (o, "meter", &e->ev.meter)
    ||  tly_msg_get_str (o, "key", &e->ev.key)
    ||  tly_msg_get_uint (o, "qty", &e->ev.qty)
    ||  tly_msg_get_uint (o, "ts", &e->ev.ts))
        return "an entry field is missing or has the wrong type";
    return decode_props (o, &e->ev);
}

/*  The leaf hash is a function of the entry (PROTOCOL.md s3): recompute it
    so that a reply whose entry and leaf disagree is caught here. */
static int
entry_leaf_hash (const tly_entry *e, uint8_t out[32])
{
    char kind [64];
    memcpy (kind, e->kind.ptr, e->kind.len);
    kind [e->kind.len] = '\0';
    tly_buf tail, leaf;
    tly_buf_init (&tail);
    tly_buf_init (&leaf);
    int rc = tly_event_encode_tail (&e->ev, &tail);
    if (rc == TLY_OK)
        rc = tly_leaf_encode (e->seq, e->recv_ts, kind, tail.data, tail.len, &leaf);
    if (rc == TLY_OK)
        tly_merkle_leaf_hash (leaf.data, leaf.len, out);
    tly_buf_free (&tail);
    tly_buf_free (&leaf);
    return rc;
}

int
tly_client_get (tly_client *self, uint64_t seq, const tly_str *customer,
                const tly_str *key, tly_entry *entry, uint8_t leaf[32])
{
    assert (self && entry);
    client_clear_error (self);
    if (customer && !key)
        return client_fail (self, TLY_EINVAL, "invalid",
                            "get by customer needs a key too");
    msgpack_packer pk;
    uint64_t id = request_begin (self, &pk, "get", customer ? 2 : 1);
    if (customer) {
        tly_pack_cstr (&pk, "customer");
        tly_pack_str (&pk, customer->ptr, customer->len);
        tly_pack_cstr (&pk, "key");
        tly_pack_str (&pk, key->ptr, key->len);
    }
    else {
        tly_pack_cstr (&pk, "seq");
        msgpack_pack_uint64 (&pk, seq);
    }
    int rc = request_run (self, id, true);
    if (rc)
        return rc;
    tly_str lf = { NULL, 0 };
    const char *why = decode_entry (tly_msg_get (&self->obj, "entry"), entry);
    if (!why && (tly_msg_get_bin (&self->obj, "leaf", &lf) || lf.len != 32))
        why = "no 32-byte leaf";
    if (!why && (customer ? !str_eq (entry->ev.customer, *customer)
                            || !str_eq (entry->ev.key, *key)
                          : entry->seq != seq))
        why = "the entry is not the one asked for";
    if (why)
        return bad_reply (self, "get", why);
    uint8_t mine [32];
    if ((rc = entry_leaf_hash (entry, mine)))
        return client_fail (self, rc, "nomem", "out of memory");
    if (memcmp (mine, lf.ptr, 32) != 0)
        return client_fail (self, TLY_ECRYPTO, "leaf",
            "the leaf hash from %s does not match the entry it sent",
            self->endpoint);
    if (leaf)
        memcpy (leaf, lf.ptr, 32);
    return TLY_OK;
}

/* ---- sth, pubkey, proofs ---- */

int
tly_client_sth (tly_client *self, tly_sth *sth)
{
    assert (self && sth);
    client_clear_error (self);
    msgpack_packer pk;
    uint64_t id = request_begin (self, &pk, "sth", 0);
    int rc = request_run (self, id, true);
    if (rc)
        return rc;
    const msgpack_object *so = tly_msg_get (&self->obj, "sth");
    if (!so || tly_sth_decode (so, sth) != TLY_OK)
        return bad_reply (self, "sth", "no valid sth");
    return TLY_OK;
}

int
tly_client_pubkey (tly_client *self, uint8_t pk_out[TLY_PK_LEN])
{
    assert (self && pk_out);
    client_clear_error (self);
    msgpack_packer pk;
    uint64_t id = request_begin (self, &pk, "pubkey", 0);
    int rc = request_run (self, id, true);
    if (rc)
        return rc;
    tly_str alg, key;
    if (tly_msg_get_str (&self->obj, "alg", &alg)
    ||  !str_eq (alg, (tly_str) { "ed25519", 7 }))
        return bad_reply (self, "pubkey", "alg is not \"ed25519\"");
    if (tly_msg_get_bin (&self->obj, "key", &key) || key.len != TLY_PK_LEN)
        return bad_reply (self, "pubkey", "no 32-byte key");
    memcpy (pk_out, key.ptr, TLY_PK_LEN);
    return TLY_OK;
}

int
tly_client_proof (tly_client *self, uint64_t seq, uint64_t tree_size,
                  tly_proof *out)
{
    assert (self && out);
    client_clear_error (self);
    msgpack_packer pk;
    uint64_t id = request_begin (self, &pk, "proof", tree_size ? 2 : 1);
    tly_pack_cstr (&pk, "seq");
    msgpack_pack_uint64 (&pk, seq);
    if (tree_size) {
        tly_pack_cstr (&pk, "tree_size");
        msgpack_pack_uint64 (&pk, tree_size);
    }
    int rc = request_run (self, id, true);
    if (rc)
        return rc;
    if (tly_proof_decode (&self->obj, false, out) != TLY_OK)
        return bad_reply (self, "proof", "fields missing or inconsistent");
    if (out->seq != seq || (tree_size && out->tree_size != tree_size))
        return bad_reply (self, "proof", "not the proof asked for");
    return TLY_OK;
}

int
tly_client_consistency (tly_client *self, uint64_t from, uint64_t to,
                        tly_proof *out)
{
    assert (self && out);
    client_clear_error (self);
    msgpack_packer pk;
    uint64_t id = request_begin (self, &pk, "consistency", 2);
    tly_pack_cstr (&pk, "from");
    msgpack_pack_uint64 (&pk, from);
    tly_pack_cstr (&pk, "to");
    msgpack_pack_uint64 (&pk, to);
    int rc = request_run (self, id, true);
    if (rc)
        return rc;
    if (tly_proof_decode (&self->obj, true, out) != TLY_OK)
        return bad_reply (self, "consistency", "fields missing or inconsistent");
    if (out->seq != from || out->tree_size != to)
        return bad_reply (self, "consistency", "not the proof asked for");
    return TLY_OK;
}

/* ---- raw calls ---- */

/*  Repacks the caller's body with our own id in place of any "id" it has,
    so that its reply is matched like any other. */
static int
call_repack (tly_client *self, const uint8_t *body, size_t len, uint64_t *id)
{
    const char *why = "empty";
    if (len == 0 || tly_msg_check (body, len, &tly_msg_request_limits, &why))
        return client_fail (self, TLY_EINVAL, "invalid",
                            "request body is not one msgpack object (%s)", why);
    msgpack_zone zone;
    msgpack_object obj;
    if (!msgpack_zone_init (&zone, 4096))
        return client_fail (self, TLY_ENOMEM, "nomem", "out of memory");
    int rc = tly_msg_unpack (body, len, &zone, &obj);
    const msgpack_object *op = rc ? NULL : tly_msg_get (&obj, "op");
    if (!op || op->type != MSGPACK_OBJECT_STR) {
        msgpack_zone_destroy (&zone);
        return client_fail (self, TLY_EINVAL, "invalid",
                            "request body is not a map with a string \"op\"");
    }
    size_t keep = 0;
    for (uint32_t i = 0; i < obj.via.map.size; i++)
        keep += !tly_msg_streq (&obj.via.map.ptr [i].key, "id");
    msgpack_packer pk;
    *id = self->next_id++;
    tly_buf_reset (&self->req);
    tly_buf_packer (&self->req, &pk);
    msgpack_pack_map (&pk, keep + 1);
    for (uint32_t i = 0; i < obj.via.map.size; i++) {
        const msgpack_object_kv *kv = &obj.via.map.ptr [i];
        if (tly_msg_streq (&kv->key, "id"))
            continue;
        msgpack_pack_object (&pk, kv->key);
        msgpack_pack_object (&pk, kv->val);
    }
    tly_pack_cstr (&pk, "id");
    msgpack_pack_uint64 (&pk, *id);
    msgpack_zone_destroy (&zone);
    return TLY_OK;
}

int
tly_client_call (tly_client *self, const uint8_t *body, size_t len,
                 tly_buf *reply)
{
    assert (self && (body || len == 0));
    client_clear_error (self);
    uint64_t id = 0;
    int rc = call_repack (self, body, len, &id);
    if (rc == TLY_OK)
        rc = request_run (self, id, false);
    if (rc == TLY_OK || rc == TLY_ESERVER) {
        if (reply) {
            tly_buf_reset (reply);
            if (tly_buf_append (reply, zmq_msg_data (&self->frame),
                                zmq_msg_size (&self->frame)) != TLY_OK)
                return client_fail (self, TLY_ENOMEM, "nomem", "out of memory");
        }
    }
    return rc;
}

/* ---- proofs on the wire and offline verification ---- */

void
tly_proof_pack (const tly_proof *p, bool consistency, msgpack_packer *pk)
{
    assert (p && pk && p->path_len <= TLY_PATH_MAX);
    msgpack_pack_map (pk, 5);
    tly_pack_cstr (pk, "ok");
    msgpack_pack_true (pk);
    tly_pack_cstr (pk, consistency ? "from" : "seq");
    msgpack_pack_uint64 (pk, p->seq);
    tly_pack_cstr (pk, consistency ? "to" : "tree_size");
    msgpack_pack_uint64 (pk, p->tree_size);
    tly_pack_cstr (pk, "path");
    msgpack_pack_array (pk, p->path_len);
    for (size_t i = 0; i < p->path_len; i++)
        tly_pack_bin (pk, p->path [i], TLY_HASH_LEN);
    tly_pack_cstr (pk, "sth");
    tly_sth_pack (&p->sth, pk);
}

static int
decode_path (const msgpack_object *path, tly_proof *out)
{
    if (!path || path->type != MSGPACK_OBJECT_ARRAY
    ||  path->via.array.size > TLY_PATH_MAX)
        return TLY_EINVAL;
    for (uint32_t i = 0; i < path->via.array.size; i++) {
        const msgpack_object *h = &path->via.array.ptr [i];
        if (h->type != MSGPACK_OBJECT_BIN || h->via.bin.size != TLY_HASH_LEN)
            return TLY_EINVAL;
        memcpy (out->path [i], h->via.bin.ptr, TLY_HASH_LEN);
    }
    out->path_len = path->via.array.size;
    return TLY_OK;
}

int
tly_proof_decode (const msgpack_object *obj, bool consistency, tly_proof *out)
{
    assert (obj && out);
    memset (out, 0, sizeof *out);
    bool ok = true;
    const msgpack_object *sth = tly_msg_get (obj, "sth");
    if (obj->type != MSGPACK_OBJECT_MAP
    ||  tly_msg_get_bool (obj, "ok", &ok) == TLY_EINVAL || !ok
    ||  tly_msg_get_uint (obj, consistency ? "from" : "seq", &out->seq)
    ||  tly_msg_get_uint (obj, consistency ? "to" : "tree_size", &out->tree_size)
    ||  decode_path (tly_msg_get (obj, "path"), out)
    ||  !sth || tly_sth_decode (sth, &out->sth))
        return TLY_EINVAL;
    if (out->sth.tree_size != out->tree_size)
        return TLY_EINVAL;
    if (consistency ? out->seq == 0 || out->seq > out->tree_size
                    : out->seq >= out->tree_size)
        return TLY_EINVAL;
    return TLY_OK;
}

int
tly_verify_inclusion (const uint8_t pk[TLY_PK_LEN],
                      const uint8_t leaf_hash[32], const tly_proof *proof)
{
    assert (pk && leaf_hash && proof);
    if (proof->sth.tree_size != proof->tree_size
    ||  proof->seq >= proof->tree_size || proof->path_len > TLY_PATH_MAX)
        return TLY_EINVAL;
    if (tly_sth_verify (&proof->sth, pk) != TLY_OK)
        return TLY_ECRYPTO;
    int rc = tly_merkle_verify_inclusion (leaf_hash, proof->seq,
                                          proof->tree_size, proof->path,
                                          proof->path_len, proof->sth.root);
    return rc == TLY_OK ? TLY_OK : TLY_ECRYPTO;
}

int
tly_verify_consistency (const uint8_t pk[TLY_PK_LEN], const tly_sth *old,
                        const tly_proof *proof)
{
    assert (pk && old && proof);
    if (old->tree_size != proof->seq
    ||  proof->sth.tree_size != proof->tree_size
    ||  proof->seq == 0 || proof->seq > proof->tree_size
    ||  proof->path_len > TLY_PATH_MAX)
        return TLY_EINVAL;
    if (tly_sth_verify (old, pk) != TLY_OK
    ||  tly_sth_verify (&proof->sth, pk) != TLY_OK)
        return TLY_ECRYPTO;
    int rc = tly_merkle_verify_consistency (old->tree_size, proof->tree_size,
                                            old->root, proof->sth.root,
                                            proof->path, proof->path_len);
    return rc == TLY_OK ? TLY_OK : TLY_ECRYPTO;
}
