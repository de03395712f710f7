/*  ingest.c -- the ingest actor: the API endpoint.

    It reads every request from the API ROUTER socket, bounds and validates
    it before msgpack-c allocates anything, and then:
      - ingest: decodes and checks each event (PROTOCOL.md s2), encodes the
        valid ones' canonical tails, looks their idempotency keys up in the
        index's sorted runs (a read snapshot: the part of deduplication
        that need not wait for the writer), and sends them to the receipt
        actor in one APPEND; invalid events are answered `rejected/invalid`
        in place;
      - get, sth, proof, consistency, pubkey: answers from an LMDB read
        snapshot, which never waits for the writer;
      - quota: asks the quota actor.
    Requests waiting for another actor live in a context table (slot and
    generation, so a late answer to an expired slot is recognised and
    dropped).  On $TERM it stops reading requests, waits for the answers to
    those in flight, sends them, and exits.
*/
#include "actors.h"
#include "proto.h"
#include "tally/event.h"
#include "tally/log.h"
#include "tally/merkle.h"
#include "tally/msg.h"
#include "tally/nodecache.h"
#include "tally/quota.h"

#define WHO "ingest"
#define SLOTS 16384
#define SLOT_TTL_MS 120000          /* a client has long given up by then */
#define DRAIN_MS 5000
#define BURST 256                   /* requests read per wake-up at most */
#define NODE_CACHE_LOG2 20          /* 1M nodes, 40 MiB: levels >= 6 of 10M leaves, >= 8 of 50M */

typedef enum { SLOT_FREE, SLOT_INGEST, SLOT_QUOTA } slot_kind;

typedef struct {
    slot_kind kind;
    uint32_t gen;
    int64_t born;
    zmsg_t *envelope;
    uint8_t *id;                    /* the request's "id", msgpack-encoded, or NULL */
    size_t id_len;
    uint32_t n;                     /* events in the request */
    const char **why;               /* per event: NULL (sent on) or the reason it is invalid */
    char *customer;                 /* quota op */
    uint32_t customer_len;
    uint64_t period;
} slot_t;

typedef struct {
    tly_child_ctx *ctx;
    tly_actor_env *env;
    zsock_t *api, *receipt, *quota;
    tly_reader *reader;
    bool snapshot;                  /* reader begun for this burst */
    tly_nodecache *nodes;           /* proofs' reads of the upper levels */
    tly_merkle_edge edge;           /* proofs' folds of the tree's right edge */
    slot_t *slots;
    uint32_t free_hint;
    uint32_t busy;
    msgpack_zone zone;
    tly_buf out;                    /* reply bodies */
    tly_buf msg;                    /* link messages */
    tly_buf tails;
    uint32_t asked[TLY_DEDUP_RUNS_MAX];     /* the runs of the snapshot's index */
    bool index_warned;              /* that it could not read them */
} ingest_t;

/* ---- the read snapshot ---- */

/*  Reads share one snapshot per burst of requests.  Acknowledgements go
    out only between bursts (on_link), after their commit, so a request
    sent after its client saw an acknowledgement is read in a snapshot
    begun after that commit: reads still see every acknowledged write. */
static int
snapshot (ingest_t *self)
{
    if (self->snapshot)
        return TLY_OK;
    int rc = tly_reader_begin (self->reader);
    self->snapshot = rc == TLY_OK;
    if (self->snapshot)
        tly_nodecache_fit (self->nodes, tly_reader_node, self->reader,
                           tly_reader_size (self->reader));
    return rc;
}

static void
snapshot_end (ingest_t *self)
{
    if (self->snapshot) {
        tly_reader_end (self->reader);
        self->snapshot = false;
    }
}

/* ---- replies ---- */

static void
reply_send (ingest_t *self, zmsg_t **envelope, const tly_buf *body)
{
    if (body->oom) {
        tly_buf err;
        tly_buf_init (&err);
        tly_reply_error (&err, NULL, "internal", "out of memory building the reply");
        zmsg_addmem (*envelope, err.data, err.len);
        tly_buf_free (&err);
    }
    else
        zmsg_addmem (*envelope, body->data, body->len);
    zmsg_send (envelope, self->api);        /* dropped if the client has gone */
    zmsg_destroy (envelope);
}

/*  Starts an ok reply in self->out: the head, then `fields` more fields. */
static void
reply_begin (ingest_t *self, msgpack_packer *pk, const msgpack_object *id, uint32_t fields)
{
    tly_buf_reset (&self->out);
    tly_buf_packer (&self->out, pk);
    tly_reply_head (pk, true, id, fields);
}

static void
reply_error (ingest_t *self, zmsg_t **envelope, const msgpack_object *id,
             const char *code, const char *message)
{
    tly_buf_reset (&self->out);
    tly_reply_error (&self->out, id, code, message);
    reply_send (self, envelope, &self->out);
}

/* ---- the context table ---- */

static uint64_t
slot_ctx (ingest_t *self, slot_t *s)
{
    return (uint64_t) s->gen << 32 | (uint64_t) (s - self->slots);
}

static slot_t *
slot_find (ingest_t *self, uint64_t ctx)
{
    uint32_t i = (uint32_t) ctx;
    if (i >= SLOTS || self->slots[i].kind == SLOT_FREE || self->slots[i].gen != ctx >> 32)
        return NULL;
    return &self->slots[i];
}

static slot_t *
slot_new (ingest_t *self, slot_kind kind, zmsg_t **envelope, const msgpack_object *id)
{
    for (uint32_t k = 0; k < SLOTS; k++) {
        uint32_t i = (self->free_hint + k) % SLOTS;
        slot_t *s = &self->slots[i];
        if (s->kind != SLOT_FREE)
            continue;
        s->kind = kind;
        s->gen++;
        s->born = zclock_mono ();
        s->envelope = *envelope;
        *envelope = NULL;
        if (id) {
            tly_buf b;
            tly_buf_init (&b);
            msgpack_packer pk;
            tly_buf_packer (&b, &pk);
            msgpack_pack_object (&pk, *id);
            s->id = b.data;
            s->id_len = b.len;
        }
        self->free_hint = i + 1;
        self->busy++;
        return s;
    }
    return NULL;
}

static void
slot_free (ingest_t *self, slot_t *s)
{
    zmsg_destroy (&s->envelope);
    free (s->id);
    free (s->why);
    free (s->customer);
    uint32_t gen = s->gen;
    memset (s, 0, sizeof *s);
    s->gen = gen;
    self->busy--;
}

/*  The id stored in a slot, unpacked for tly_reply_head. */
static const msgpack_object *
slot_id (ingest_t *self, slot_t *s, msgpack_object *tmp)
{
    if (!s->id)
        return NULL;
    size_t off = 0;
    msgpack_zone_clear (&self->zone);
    if (msgpack_unpack ((const char *) s->id, s->id_len, &off, &self->zone, tmp)
        != MSGPACK_UNPACK_SUCCESS)
        return NULL;
    return tmp;
}

static void
slots_expire (ingest_t *self)
{
    int64_t now = zclock_mono ();
    for (uint32_t i = 0; i < SLOTS && self->busy; i++)
        if (self->slots[i].kind != SLOT_FREE && now - self->slots[i].born > SLOT_TTL_MS)
            slot_free (self, &self->slots[i]);
}

/* ---- reads ---- */

static void
pack_sth_reply (ingest_t *self, const msgpack_object *id, const tly_sth *sth)
{
    msgpack_packer pk;
    reply_begin (self, &pk, id, 1);
    tly_pack_cstr (&pk, "sth");
    tly_sth_pack (sth, &pk);
}

/*  The signed head for exactly `size`: the one stored at that commit, or a
    fresh signature over the root recomputed from stored nodes. */
static int
sth_for (ingest_t *self, uint64_t size, tly_sth *sth)
{
    int rc = tly_reader_sth (self->reader, size, sth);
    if (rc != TLY_ENOTFOUND)
        return rc;
    memset (sth, 0, sizeof *sth);
    sth->tree_size = size;
    sth->ts = tly_now_ms ();
    rc = tly_merkle_root (tly_nodecache_node, self->nodes, &self->edge, size, sth->root);
    return rc ? rc : tly_sth_sign (sth, self->env->sk);
}

static void
op_sth (ingest_t *self, zmsg_t **env, const msgpack_object *id)
{
    tly_sth sth;
    int rc = tly_reader_sth (self->reader, UINT64_MAX, &sth);
    if (rc) {
        reply_error (self, env, id, "internal", "no signed tree head is stored yet");
        return;
    }
    pack_sth_reply (self, id, &sth);
    reply_send (self, env, &self->out);
}

static void
op_pubkey (ingest_t *self, zmsg_t **env, const msgpack_object *id)
{
    msgpack_packer pk;
    reply_begin (self, &pk, id, 2);
    tly_pack_cstr (&pk, "alg");
    tly_pack_cstr (&pk, "ed25519");
    tly_pack_cstr (&pk, "key");
    tly_pack_bin (&pk, self->env->pk, TLY_PK_LEN);
    reply_send (self, env, &self->out);
}

static void
op_get (ingest_t *self, zmsg_t **env, const msgpack_object *body, const msgpack_object *id)
{
    uint64_t seq;
    tly_str customer, key;
    int rc = tly_msg_get_uint (body, "seq", &seq);
    if (rc == TLY_ENOTFOUND) {
        if (tly_msg_get_str (body, "customer", &customer) || tly_msg_get_str (body, "key", &key)
        ||  customer.len == 0 || customer.len > TLY_CUSTOMER_MAX
        ||  key.len == 0 || key.len > TLY_KEY_MAX) {
            reply_error (self, env, id, "bad_request",
                         "get needs \"seq\" (uint) or \"customer\" and \"key\" (str)");
            return;
        }
        uint8_t dedup[TLY_DEDUP_LEN];
        tly_store_dedup_hash (self->env->store, &customer, &key, dedup);
        rc = tly_reader_lookup (self->reader, dedup, &seq);
    }
    else
    if (rc) {
        reply_error (self, env, id, "bad_request", "seq must be a uint");
        return;
    }
    const uint8_t *leaf = NULL;
    size_t len = 0;
    tly_entry e;
    uint8_t hash[32];
    if (!rc)
        rc = seq < tly_reader_size (self->reader)
           ? tly_reader_leaf (self->reader, seq, &leaf, &len) : TLY_ENOTFOUND;
    if (!rc && (tly_leaf_decode (leaf, len, &e, NULL) || tly_reader_node (self->reader, 0, seq, hash)))
        rc = TLY_ECORRUPT;
    if (rc == TLY_ENOTFOUND) {
        reply_error (self, env, id, "not_found", "no such entry");
        return;
    }
    if (rc) {
        tly_error (WHO, "entry %llu cannot be read: %s; run `tally ctl verify`",
                   (unsigned long long) seq, tly_strerror (rc));
        reply_error (self, env, id, "internal", "the entry cannot be read");
        return;
    }
    msgpack_packer pk;
    reply_begin (self, &pk, id, 2);
    tly_pack_cstr (&pk, "entry");
    tly_entry_pack (&e, &pk);
    tly_pack_cstr (&pk, "leaf");
    tly_pack_bin (&pk, hash, 32);
    reply_send (self, env, &self->out);
}

/*  Computes and sends an inclusion proof of leaf a in the tree of size b,
    or a consistency proof between sizes a and b, with the head for b. */
static void
reply_proof (ingest_t *self, zmsg_t **env, const msgpack_object *id, bool consistency,
             uint64_t a, uint64_t b)
{
    uint8_t path[TLY_PATH_MAX][TLY_HASH_LEN];
    size_t n;
    tly_sth sth;
    int rc = consistency
           ? tly_merkle_consistency (tly_nodecache_node, self->nodes, &self->edge, a, b, path, &n)
           : tly_merkle_inclusion (tly_nodecache_node, self->nodes, &self->edge, a, b, path, &n);
    if (!rc)
        rc = sth_for (self, b, &sth);
    if (rc) {
        tly_error (WHO, "%s proof %llu/%llu failed: %s; run `tally ctl verify`",
                   consistency ? "consistency" : "inclusion", (unsigned long long) a,
                   (unsigned long long) b, tly_strerror (rc));
        reply_error (self, env, id, "internal", "the proof could not be computed");
        return;
    }
    msgpack_packer pk;
    reply_begin (self, &pk, id, 4);
    tly_pack_cstr (&pk, consistency ? "from" : "seq");
    msgpack_pack_uint64 (&pk, a);
    tly_pack_cstr (&pk, consistency ? "to" : "tree_size");
    msgpack_pack_uint64 (&pk, b);
    tly_pack_cstr (&pk, "path");
    msgpack_pack_array (&pk, (uint32_t) n);
    for (size_t i = 0; i < n; i++)
        tly_pack_bin (&pk, path[i], TLY_HASH_LEN);
    tly_pack_cstr (&pk, "sth");
    tly_sth_pack (&sth, &pk);
    reply_send (self, env, &self->out);
}

static void
op_proof (ingest_t *self, zmsg_t **env, const msgpack_object *body, const msgpack_object *id)
{
    uint64_t seq, size = tly_reader_size (self->reader);
    int rc = tly_msg_get_uint (body, "tree_size", &size);
    if ((rc && rc != TLY_ENOTFOUND) || tly_msg_get_uint (body, "seq", &seq)) {
        reply_error (self, env, id, "bad_request", "proof needs \"seq\" and optional "
                                                   "\"tree_size\" (uints)");
        return;
    }
    if (seq >= size || size > tly_reader_size (self->reader)) {
        reply_error (self, env, id, "not_found", "seq must be below tree_size, and "
                                                 "tree_size at most the log's size");
        return;
    }
    reply_proof (self, env, id, false, seq, size);
}

static void
op_consistency (ingest_t *self, zmsg_t **env, const msgpack_object *body,
                const msgpack_object *id)
{
    uint64_t from, to;
    if (tly_msg_get_uint (body, "from", &from) || tly_msg_get_uint (body, "to", &to)
    ||  from == 0 || from > to || to > tly_reader_size (self->reader)) {
        reply_error (self, env, id, "bad_request", "consistency needs uints "
                     "0 < from <= to <= the log's size");
        return;
    }
    reply_proof (self, env, id, true, from, to);
}

/* ---- ingest ---- */

static void
pack_result_rejected (msgpack_packer *pk, const char *code, size_t code_len,
                      const char *message, size_t message_len)
{
    msgpack_pack_map (pk, 3);
    tly_pack_cstr (pk, "status");
    tly_pack_cstr (pk, "rejected");
    tly_pack_cstr (pk, "code");
    tly_pack_str (pk, code, code_len);
    tly_pack_cstr (pk, "message");
    tly_pack_str (pk, message, message_len);
}

/*  Replies to an ingest whose events were all invalid: nothing to append. */
static void
reply_all_invalid (ingest_t *self, zmsg_t **env, const msgpack_object *id,
                   const char **why, uint32_t n)
{
    tly_sth sth;
    int rc = snapshot (self);
    if (!rc)
        rc = tly_reader_sth (self->reader, UINT64_MAX, &sth);
    if (rc) {
        reply_error (self, env, id, "internal", "the signed tree head cannot be read");
        return;
    }
    msgpack_packer pk;
    reply_begin (self, &pk, id, 2);
    tly_pack_cstr (&pk, "results");
    msgpack_pack_array (&pk, n);
    for (uint32_t i = 0; i < n; i++)
        pack_result_rejected (&pk, "invalid", 7, why[i], strlen (why[i]));
    tly_pack_cstr (&pk, "sth");
    tly_sth_pack (&sth, &pk);
    reply_send (self, env, &self->out);
}

static void
op_ingest (ingest_t *self, zmsg_t **env, const msgpack_object *body, const msgpack_object *id)
{
    const msgpack_object *events = tly_msg_get (body, "events");
    if (!events || events->type != MSGPACK_OBJECT_ARRAY
    ||  events->via.array.size == 0 || events->via.array.size > TLY_BATCH_MAX) {
        reply_error (self, env, id, "bad_request", "ingest needs \"events\": an array of "
                                                   "1 to 10000 events");
        return;
    }
    uint32_t n = events->via.array.size;
    const char **why = calloc (n, sizeof *why);
    uint32_t *tail_end = malloc (n * sizeof *tail_end);
    if (!why || !tail_end) {
        free (why);
        free (tail_end);
        reply_error (self, env, id, "internal", "out of memory");
        return;
    }
    /*  Pass 1: validate, and encode the canonical tails. */
    uint32_t valid = 0;
    tly_buf_reset (&self->tails);
    for (uint32_t i = 0; i < n; i++) {
        tly_event ev;
        if (tly_event_decode (&events->via.array.ptr[i], &ev, &why[i]) == TLY_OK) {
            tly_event_encode_tail (&ev, &self->tails);
            valid++;
        }
        tail_end[i] = (uint32_t) self->tails.len;
    }
    if (valid == 0) {
        reply_all_invalid (self, env, id, why, n);
        free (why);
        free (tail_end);
        return;
    }
    if (tly_child_peer_state (self->ctx, "receipt") != TLY_CHILD_RUNNING) {
        free (why);
        free (tail_end);
        reply_error (self, env, id, "unavailable", "the receipt actor is not running; "
                     "retry with the same idempotency keys");
        return;
    }
    slot_t *s = slot_new (self, SLOT_INGEST, env, id);
    if (!s) {
        free (why);
        free (tail_end);
        reply_error (self, env, id, "unavailable", "too many requests in flight; retry");
        return;
    }
    s->n = n;
    s->why = why;
    /*  Pass 2: the APPEND message, valid events only, in order, each
        looked up in the index's runs as this burst's snapshot has them
        (proto.h): the single writer then asks only L0 and any run
        published since, and this thread's core takes the rest. */
    size_t nasked = 0;
    uint64_t looked = 0, found = 0;
    int unread = snapshot (self);
    if (!unread)
        unread = tly_reader_dedup_runs (self->reader, self->asked, &nasked);
    bool asked = !unread && nasked > 0;
    msgpack_packer pk;
    tly_link_begin (&self->msg, &pk, 4, TLY_MSG_APPEND, slot_ctx (self, s));
    msgpack_pack_array (&pk, valid);
    for (uint32_t i = 0; i < n; i++) {
        if (why[i])
            continue;
        tly_event ev;
        tly_event_decode (&events->via.array.ptr[i], &ev, &why[i]);
        uint32_t start = i ? tail_end[i - 1] : 0;
        tly_item it = { .idx = i, .customer = ev.customer, .key = ev.key, .meter = ev.meter,
                        .qty = ev.qty, .ts = ev.ts,
                        .tail = { (const char *) self->tails.data + start, tail_end[i] - start } };
        /*  Here rather than in receipt: the single writer is the bottleneck. */
        tly_store_dedup_hash (self->env->store, &ev.customer, &ev.key, it.dedup);
        if (asked) {
            int rc = tly_reader_lookup_runs (self->reader, it.dedup, &it.seq);
            it.found = rc == TLY_OK;
            looked++;
            found += it.found;
            if (rc != TLY_OK && rc != TLY_ENOTFOUND) {
                asked = false;      /* receipt asks the whole index */
                unread = rc;
            }
        }
        tly_item_pack (&pk, &it);
    }
    if (asked)
        tly_asked_pack (&pk, self->asked, nasked);
    else
        msgpack_pack_nil (&pk);
    atomic_fetch_add_explicit (&self->env->ingest_asked, looked, memory_order_relaxed);
    atomic_fetch_add_explicit (&self->env->ingest_found, found, memory_order_relaxed);
    if (unread && !self->index_warned) {
        tly_warn (WHO, "cannot read the idempotency index's runs (%s): the receipt actor "
                       "looks every event up alone, which is slower; run `tally ctl verify` "
                       "(said once per start of this actor)", tly_strerror (unread));
        self->index_warned = true;
    }
    free (tail_end);
    int rc = self->tails.oom ? TLY_ENOMEM : tly_link_send (self->receipt, &self->msg, false);
    if (rc) {
        zmsg_t *e = s->envelope;
        s->envelope = NULL;
        msgpack_object tmp;
        const msgpack_object *sid = slot_id (self, s, &tmp);
        reply_error (self, &e, sid, rc == TLY_EUNAVAIL ? "unavailable" : "internal",
                     rc == TLY_EUNAVAIL ? "the ledger is overloaded; retry with the same "
                                          "idempotency keys" : "out of memory");
        slot_free (self, s);
    }
}

/*  One reply of a RESULTS message: [ctx, outcomes] or [ctx, code, message]. */
static void
on_reply (ingest_t *self, const msgpack_object *sth, const msgpack_object *reply)
{
    uint64_t ctx;
    if (reply->type != MSGPACK_OBJECT_ARRAY || reply->via.array.size < 2
    ||  tly_obj_uint (&reply->via.array.ptr[0], &ctx)) {
        tly_error (WHO, "dropping a malformed reply from receipt (a bug)");
        return;
    }
    slot_t *s = slot_find (self, ctx);
    if (!s || s->kind != SLOT_INGEST)
        return;                     /* expired, or answered by an earlier generation */
    msgpack_object tmp;
    const msgpack_object *id = slot_id (self, s, &tmp);
    zmsg_t *env = s->envelope;
    s->envelope = NULL;
    const msgpack_object *f = reply->via.array.ptr;
    if (reply->via.array.size == 3) {
        tly_str code = { "internal", 8 }, message = { "", 0 };
        tly_obj_str (&f[1], &code);
        tly_obj_str (&f[2], &message);
        char c[32], msg[256];
        snprintf (c, sizeof c, "%.*s", (int) code.len, code.ptr);
        snprintf (msg, sizeof msg, "%.*s", (int) message.len, message.ptr);
        reply_error (self, &env, id, c, msg);
        slot_free (self, s);
        return;
    }
    const msgpack_object *outs = &f[1];
    if (reply->via.array.size != 2 || sth->type == MSGPACK_OBJECT_NIL
    ||  outs->type != MSGPACK_OBJECT_ARRAY) {
        reply_error (self, &env, id, "internal", "malformed internal result (a bug)");
        slot_free (self, s);
        return;
    }
    msgpack_packer pk;
    reply_begin (self, &pk, id, 2);
    tly_pack_cstr (&pk, "results");
    msgpack_pack_array (&pk, s->n);
    uint32_t k = 0;
    bool broken = false;
    static const char *names[] = { "accepted", "duplicate", "conflict" };
    for (uint32_t i = 0; i < s->n && !broken; i++) {
        if (s->why[i]) {
            pack_result_rejected (&pk, "invalid", 7, s->why[i], strlen (s->why[i]));
            continue;
        }
        tly_outcome oc;
        const msgpack_object *o = k < outs->via.array.size ? &outs->via.array.ptr[k++] : NULL;
        if (!o || tly_outcome_decode (o, &oc) || oc.idx != i) {
            broken = true;
            break;
        }
        if (oc.status == TLY_ST_REJECTED) {
            tly_str code, message;
            tly_obj_str (&o->via.array.ptr[2], &code);
            tly_obj_str (&o->via.array.ptr[3], &message);
            pack_result_rejected (&pk, code.ptr, code.len, message.ptr, message.len);
            continue;
        }
        bool conflict = oc.status == TLY_ST_CONFLICT;
        msgpack_pack_map (&pk, conflict ? 2 : 4);
        tly_pack_cstr (&pk, "status");
        tly_pack_cstr (&pk, names[oc.status]);
        tly_pack_cstr (&pk, "seq");
        msgpack_pack_uint64 (&pk, oc.seq);
        if (!conflict) {
            tly_pack_cstr (&pk, "recv_ts");
            msgpack_pack_uint64 (&pk, oc.recv_ts);
            tly_pack_cstr (&pk, "leaf");
            tly_pack_bin (&pk, oc.leaf, 32);
        }
    }
    if (broken) {
        tly_error (WHO, "the receipt actor's result does not match the request (a bug)");
        reply_error (self, &env, id, "internal", "malformed internal result (a bug)");
    }
    else {
        tly_pack_cstr (&pk, "sth");
        msgpack_pack_object (&pk, *sth);
        reply_send (self, &env, &self->out);
    }
    slot_free (self, s);
}

/* ---- quota ---- */

static void
op_quota (ingest_t *self, zmsg_t **env, const msgpack_object *body, const msgpack_object *id)
{
    tly_str customer;
    if (tly_msg_get_str (body, "customer", &customer) || customer.len == 0
    ||  customer.len > TLY_CUSTOMER_MAX || !tly_utf8_valid (customer.ptr, customer.len)) {
        reply_error (self, env, id, "bad_request", "quota needs \"customer\": 1-128 bytes "
                                                   "of UTF-8");
        return;
    }
    if (tly_child_peer_state (self->ctx, "quota") != TLY_CHILD_RUNNING) {
        reply_error (self, env, id, "unavailable", "the quota actor is not running; retry");
        return;
    }
    slot_t *s = slot_new (self, SLOT_QUOTA, env, id);
    if (!s) {
        reply_error (self, env, id, "unavailable", "too many requests in flight; retry");
        return;
    }
    s->customer = malloc (customer.len + 1);
    if (s->customer)
        memcpy (s->customer, customer.ptr, customer.len);
    s->customer_len = customer.len;
    s->period = tly_period_of (tly_now_ms ());
    msgpack_packer pk;
    tly_link_begin (&self->msg, &pk, 4, TLY_MSG_QUERY, slot_ctx (self, s));
    tly_pack_str (&pk, customer.ptr, customer.len);
    msgpack_pack_uint64 (&pk, s->period);
    if (!s->customer || tly_link_send (self->quota, &self->msg, false)) {
        zmsg_t *e = s->envelope;
        s->envelope = NULL;
        reply_error (self, &e, id, "unavailable", "the quota actor is overloaded; retry");
        slot_free (self, s);
    }
}

static void
on_quota (ingest_t *self, tly_link_msg *m)
{
    slot_t *s = slot_find (self, m->ctx);
    if (!s || s->kind != SLOT_QUOTA)
        return;
    msgpack_object tmp;
    const msgpack_object *id = slot_id (self, s, &tmp);
    zmsg_t *env = s->envelope;
    s->envelope = NULL;
    const msgpack_object *rows = tly_link_field (m, 2);
    if (m->type != TLY_MSG_USAGE || !rows || rows->type != MSGPACK_OBJECT_ARRAY) {
        reply_error (self, &env, id, "internal", "malformed internal quota answer (a bug)");
        slot_free (self, s);
        return;
    }
    char period[24];
    tly_period_name (s->period, period);
    msgpack_packer pk;
    reply_begin (self, &pk, id, 3);
    tly_pack_cstr (&pk, "customer");
    tly_pack_str (&pk, s->customer, s->customer_len);
    tly_pack_cstr (&pk, "period");
    tly_pack_cstr (&pk, period);
    tly_pack_cstr (&pk, "limits");
    msgpack_pack_array (&pk, rows->via.array.size);
    for (uint32_t i = 0; i < rows->via.array.size; i++) {
        const msgpack_object *r = &rows->via.array.ptr[i];
        tly_str meter = { "", 0 };
        uint64_t limit = 0, used = 0;
        if (r->type == MSGPACK_OBJECT_ARRAY && r->via.array.size == 3) {
            tly_obj_str (&r->via.array.ptr[0], &meter);
            tly_obj_uint (&r->via.array.ptr[1], &limit);
            tly_obj_uint (&r->via.array.ptr[2], &used);
        }
        msgpack_pack_map (&pk, 3);
        tly_pack_cstr (&pk, "meter");
        tly_pack_str (&pk, meter.ptr, meter.len);
        tly_pack_cstr (&pk, "limit");
        msgpack_pack_uint64 (&pk, limit);
        tly_pack_cstr (&pk, "used");
        msgpack_pack_uint64 (&pk, used);
    }
    reply_send (self, &env, &self->out);
    slot_free (self, s);
}

/* ---- dispatch ---- */

static void
on_request (ingest_t *self, zmsg_t *msg)
{
    zframe_t *frame = zmsg_last (msg);
    if (!frame) {
        zmsg_destroy (&msg);
        return;
    }
    zmsg_remove (msg, frame);           /* msg is now the envelope */
    const uint8_t *data = zframe_data (frame);
    size_t len = zframe_size (frame);
    const char *why = "not msgpack";
    msgpack_object body;
    msgpack_zone_clear (&self->zone);
    int rc = len > self->env->request_max
           ? TLY_ETOOLARGE : tly_msg_check (data, len, &tly_msg_request_limits, &why);
    if (len > self->env->request_max)
        why = TLY_TOO_LARGE_MESSAGE;
    if (rc == TLY_ETOOLARGE)
        reply_error (self, &msg, NULL, "too_large", why);
    else
    if (rc || tly_msg_unpack (data, len, &self->zone, &body))
        reply_error (self, &msg, NULL, "bad_request", why);
    else
    if (body.type != MSGPACK_OBJECT_MAP)
        reply_error (self, &msg, NULL, "bad_request", "the request body must be a map");
    else {
        const msgpack_object *id = tly_msg_get (&body, "id");
        const msgpack_object *op = tly_msg_get (&body, "op");
        if (id && id->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            reply_error (self, &msg, NULL, "bad_request", "\"id\" must be a uint");
        else
        if (!op || op->type != MSGPACK_OBJECT_STR)
            reply_error (self, &msg, id, "bad_request", "\"op\" (str) is missing");
        else
        if (tly_msg_streq (op, "ingest"))
            op_ingest (self, &msg, &body, id);
        else
        if (tly_msg_streq (op, "quota"))
            op_quota (self, &msg, &body, id);
        else
        if (tly_msg_streq (op, "pubkey"))
            op_pubkey (self, &msg, id);
        else
        if (snapshot (self))
            reply_error (self, &msg, id, "internal", "cannot open a read snapshot");
        else {
            if (tly_msg_streq (op, "get"))
                op_get (self, &msg, &body, id);
            else
            if (tly_msg_streq (op, "sth"))
                op_sth (self, &msg, id);
            else
            if (tly_msg_streq (op, "proof"))
                op_proof (self, &msg, &body, id);
            else
            if (tly_msg_streq (op, "consistency"))
                op_consistency (self, &msg, &body, id);
            else
                reply_error (self, &msg, id, "unknown_op", "unknown op");
        }
    }
    zmsg_destroy (&msg);
    zframe_destroy (&frame);
}

static void
on_receipt (ingest_t *self, tly_link_msg *m)
{
    const msgpack_object *sth = tly_link_field (m, 2), *replies = tly_link_field (m, 3);
    if (m->type != TLY_MSG_RESULTS || !sth || !replies
    ||  replies->type != MSGPACK_OBJECT_ARRAY) {
        tly_error (WHO, "dropping a malformed message from receipt (a bug)");
        return;
    }
    for (uint32_t i = 0; i < replies->via.array.size; i++)
        on_reply (self, sth, &replies->via.array.ptr[i]);
}

/*  Everything waiting on the link, up to BURST messages: one poll per
    message would cost a syscall each. */
static void
on_link (ingest_t *self, zsock_t *link)
{
    for (int i = 0; i < BURST && (i == 0 || (zsock_events (link) & ZMQ_POLLIN)); i++) {
        tly_link_msg m;
        if (tly_link_recv (link, &m) == TLY_OK) {
            if (link == self->receipt)
                on_receipt (self, &m);
            else
                on_quota (self, &m);
        }
        else
            tly_error (WHO, "dropping a malformed internal message (a bug)");
        tly_link_done (&m);
    }
}

static void
ingest_free (ingest_t *self)
{
    if (self->slots) {
        for (uint32_t i = 0; i < SLOTS; i++)
            if (self->slots[i].kind != SLOT_FREE)
                slot_free (self, &self->slots[i]);
        free (self->slots);
    }
    tly_reader_destroy (&self->reader);
    tly_nodecache_destroy (&self->nodes);
    msgpack_zone_destroy (&self->zone);
    tly_buf_free (&self->out);
    tly_buf_free (&self->msg);
    tly_buf_free (&self->tails);
}

/*  Hands the API socket back to tallyd's main thread on every exit, so
    requests are refused with `unavailable` until the next generation. */
static void
api_return (tly_actor_env *env)
{
    if (!env->api_returned) {
        env->api_returned = true;
        zstr_send (env->api_token[1], "RETURN");
    }
}

int
tly_ingest_actor (tly_child_ctx *ctx, void *args)
{
    tly_actor_env *env = args;
    ingest_t self = { .ctx = ctx, .env = env, .api = env->api,
                      .receipt = env->ingest_receipt[0], .quota = env->ingest_quota[0] };
    msgpack_zone_init (&self.zone, 65536);
    tly_buf_init (&self.out);
    tly_buf_init (&self.msg);
    tly_buf_init (&self.tails);
    self.slots = calloc (SLOTS, sizeof *self.slots);
    if (!self.slots || tly_reader_new (env->store, &self.reader)
    ||  tly_nodecache_new (NODE_CACHE_LOG2, &self.nodes)) {
        tly_error (WHO, "cannot start: out of memory");
        ingest_free (&self);
        api_return (env);
        return 1;
    }
    /*  The API socket is ours unless an earlier generation handed it back
        to tallyd's main thread (which answers `unavailable` meanwhile):
        then ask for it, and serve it once it is given. */
    zpoller_t *poller = zpoller_new (tly_child_pipe (ctx), self.receipt, self.quota,
                                     env->api_token[1], NULL);
    if (env->api_returned)
        zstr_send (env->api_token[1], "TAKE");
    else
        zpoller_add (poller, self.api);
    tly_child_ready (ctx);
    int64_t drain_until = 0, next_expiry = zclock_mono () + 1000;
    while (!drain_until || (self.busy && zclock_mono () < drain_until)) {
        void *which = zpoller_wait (poller, drain_until ? 50 : 500);
        if (which == tly_child_pipe (ctx)) {
            zmsg_t *call = NULL;
            int r = tly_child_recv (ctx, &call);
            if (r == TLY_CHILD_TERM && !drain_until) {
                /*  Stop taking requests; answer those in flight. */
                zpoller_remove (poller, self.api);
                drain_until = zclock_mono () + DRAIN_MS;
            }
            else
            if (r == TLY_CHILD_CALL) {
                zmsg_t *reply = zmsg_new ();
                tly_child_reply (ctx, &reply);
                zmsg_destroy (&call);
            }
        }
        else
        if (which == self.api) {
            for (int i = 0; i < BURST && (zsock_events (self.api) & ZMQ_POLLIN); i++) {
                zmsg_t *msg = zmsg_recv (self.api);
                if (msg)
                    on_request (&self, msg);
            }
            snapshot_end (&self);
        }
        else
        if (which == self.receipt || which == self.quota)
            on_link (&self, which);
        else
        if (which == env->api_token[1]) {
            char *given = zstr_recv (env->api_token[1]);
            if (given && streq (given, "GIVEN") && !drain_until) {
                env->api_returned = false;
                zpoller_add (poller, self.api);
            }
            zstr_free (&given);
        }
        if (zclock_mono () > next_expiry) {
            slots_expire (&self);
            next_expiry = zclock_mono () + 1000;
        }
    }
    if (self.busy)
        tly_warn (WHO, "%u requests were still in flight at shutdown; their clients "
                       "will retry", self.busy);
    zpoller_destroy (&poller);
    ingest_free (&self);
    api_return (env);
    return 0;
}
