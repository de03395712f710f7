/*  receipt.c -- the receipt actor: the ledger's single writer.

    It takes APPEND messages from ingest and turns them into durable,
    signed receipts with group commit: everything waiting on the link when
    a commit starts (up to group_max events) goes into one LMDB transaction,
    one fsync and one signed tree head.  While that fsync runs, new requests
    queue on the link and form the next group, so the batch grows with load.

    Per event, in order:
      1. dedup: (customer, key) already in the ledger -> duplicate when the
         canonical tails are byte-equal, else conflict (ingest has looked
         the key up in the index's runs of its snapshot: we read the entry
         it found, or ask only L0 and the runs published since);
      2. admission: the new events of a *round* that a limit applies to go
         to the quota actor in one ADMIT; a round ends early when a key
         repeats inside it, so the repeat is judged against the first once
         that one is settled.  An event no limit applies to is admitted
         here, with no round trip, and quota counts it from the COMMIT;
      3. append: seq, leaf bytes, leaf hash, Merkle nodes, dedup record.
    Then commit, COMMIT to quota, and one RESULTS to ingest with every
    request's replies.  A reply never precedes the fsync.  Any failure
    aborts the whole group: nothing is half-written and every request in
    it gets a failure its client can retry.

    Which events need quota: we keep the keys of the limits, sent by quota
    (LIMITS: in full once it has counted the ledger, after our HELLO, then
    each change; a new quota first tells us to forget them).  Quota
    announces a new limit before it stores it and a removal after, so our
    copy holds at least every limit quota enforces; an extra key only costs
    a round trip.  The copy changes only between groups, so every event of
    a group sees the same limits: a limit set meanwhile takes effect with
    the next group, and by then quota has counted this one (the COMMIT
    precedes the next ADMIT on the link).  Until the first full LIMITS
    every event goes to quota.
*/
#include "actors.h"
#include "proto.h"
#include "tally/event.h"
#include "tally/log.h"
#include "tally/quota.h"

#define WHO "receipt"
#define ADMIT_TIMEOUT_MS 5000
#define REPLY_SPLIT 16384           /* outcomes per RESULTS message, about */
/*  group_judge starts fetching the L0 slot of the event this many places
    ahead: each is most likely a cache miss, and an event's judging takes
    longer than a miss. */
#define PREFETCH_AHEAD 4

typedef struct {
    tly_item item;                  /* item.dedup: ingest hashed (customer, key) */
    uint32_t msg;                   /* index in self->msgs */
    uint64_t ticket;                /* the round that admitted it; 0: no limit applied */
    bool admit;                     /* a limit may apply: ask quota */
    tly_outcome out;
} work_t;

/*  What group_decode found in one message of the group. */
typedef struct {
    bool bad;                       /* not an APPEND we can read: failed whole */
    size_t asked_at, nasked;        /* its asked runs, in self->asked */
} msg_info;

typedef struct {
    tly_child_ctx *ctx;
    tly_actor_env *env;
    tly_writer *writer;
    zsock_t *in;                    /* from ingest */
    zsock_t *quota;
    zpoller_t *wait_poller;         /* quota link + pipe, while admitting */

    tly_link_msg *msgs;
    msg_info *info;                 /* per message, as msgs */
    size_t nmsgs, msgs_cap, info_cap;
    uint32_t *asked;                /* the messages' asked runs, one after another */
    size_t nasked, asked_cap;
    work_t *work;
    size_t nwork, work_cap;
    uint32_t *pending;              /* indices into work: this round's new events */
    size_t npending;
    uint32_t *set;                  /* open addressing: work index + 1, 0 = free */
    size_t set_cap;
    uint64_t *tickets;              /* rounds admitted in this group */
    size_t ntickets;
    tly_quota *limits;              /* the keys of quota's limits (values unused) */
    bool limits_known;              /* a full LIMITS arrived: limits is usable */
    bool limits_lost;               /* a LIMITS was dropped: ask for them again */
    tly_link_msg *deferred;         /* LIMITS that arrived inside a group */
    size_t ndeferred, deferred_cap;
    uint64_t recv_ts;
    int64_t admit_us;               /* time spent waiting for quota, this group */
    uint64_t first;                 /* the group's first seq, in ADMIT and COMMIT */
    tly_buf buf;
    tly_buf leaf;
    bool term;
    long lose_commit;               /* tests: drop the COMMIT of this group (1 = next) */
} receipt_t;

/* ---- the round set: which keys are new in this round ---- */

static size_t
set_slot (const uint8_t dedup[TLY_DEDUP_LEN], size_t cap)
{
    uint64_t h;
    memcpy (&h, dedup, 8);          /* dedup is already a keyed hash */
    return (size_t) h & (cap - 1);
}

static bool
set_contains (receipt_t *self, const uint8_t dedup[TLY_DEDUP_LEN])
{
    for (size_t i = set_slot (dedup, self->set_cap); self->set[i];
         i = (i + 1) & (self->set_cap - 1))
        if (memcmp (self->work[self->set[i] - 1].item.dedup, dedup, TLY_DEDUP_LEN) == 0)
            return true;
    return false;
}

static void
set_add (receipt_t *self, uint32_t w)
{
    size_t i = set_slot (self->work[w].item.dedup, self->set_cap);
    while (self->set[i])
        i = (i + 1) & (self->set_cap - 1);
    self->set[i] = w + 1;
}

static void
set_clear (receipt_t *self)
{
    memset (self->set, 0, self->set_cap * sizeof *self->set);
}

/* ---- replies ---- */

/*  The group's replies go to ingest in one RESULTS message (split past
    REPLY_SPLIT outcomes, far below the link's limits): one wake-up of
    ingest per group, not one per request.  `code` NULL: each request's
    outcomes; else every request failed with code and message. */
static void
send_replies (receipt_t *self, const tly_sth *sth, const char *code, const char *message)
{
    size_t i = 0, w = 0;
    while (i < self->nmsgs) {
        size_t end = i, outs = 0;
        for (size_t x = w; end < self->nmsgs && (end == i || outs < REPLY_SPLIT); end++)
            for (; !code && x < self->nwork && self->work[x].msg == end; x++)
                outs++;
        msgpack_packer pk;
        tly_link_begin (&self->buf, &pk, 4, TLY_MSG_RESULTS, 0);
        if (code)
            msgpack_pack_nil (&pk);
        else
            tly_sth_pack (sth, &pk);
        msgpack_pack_array (&pk, (uint32_t) (end - i));
        for (; i < end; i++) {
            size_t first = w;
            while (!code && w < self->nwork && self->work[w].msg == i)
                w++;
            if (code || self->info[i].bad) {
                msgpack_pack_array (&pk, 3);
                msgpack_pack_uint64 (&pk, self->msgs[i].ctx);
                tly_pack_cstr (&pk, code ? code : "internal");
                tly_pack_cstr (&pk, code ? message : "malformed internal message");
                continue;
            }
            msgpack_pack_array (&pk, 2);
            msgpack_pack_uint64 (&pk, self->msgs[i].ctx);
            msgpack_pack_array (&pk, (uint32_t) (w - first));
            for (size_t k = first; k < w; k++)
                tly_outcome_pack (&pk, &self->work[k].out);
        }
        if (tly_link_send (self->in, &self->buf, true))
            tly_error (WHO, "cannot hand replies to ingest (out of memory?); their clients "
                            "will time out and retry");
    }
}

static void
fail_group (receipt_t *self, const char *code, const char *message)
{
    send_replies (self, NULL, code, message);
}

/*  One COMMIT for the group: its first seq, its accepted events in seq
    order (work order: rounds append in turn), each with the ticket that
    admitted it, and the tickets it closes. */
static void
send_commits (receipt_t *self, uint64_t first)
{
    uint32_t n = 0;
    for (size_t w = 0; w < self->nwork; w++)
        n += self->work[w].out.status == TLY_ST_ACCEPTED;
    if (n == 0 && self->ntickets == 0)
        return;
    if (self->lose_commit && --self->lose_commit == 0) {
        tly_warn (WHO, "TALLY_TEST_LOSE_COMMIT: not telling quota of %u events", n);
        return;
    }
    msgpack_packer pk;
    tly_link_begin (&self->buf, &pk, 4, TLY_MSG_COMMIT, first);
    msgpack_pack_array (&pk, n);
    for (size_t w = 0; w < self->nwork; w++) {
        work_t *x = &self->work[w];
        if (x->out.status != TLY_ST_ACCEPTED)
            continue;
        msgpack_pack_array (&pk, 6);
        msgpack_pack_uint64 (&pk, x->out.seq);
        tly_pack_str (&pk, x->item.customer.ptr, x->item.customer.len);
        tly_pack_str (&pk, x->item.meter.ptr, x->item.meter.len);
        msgpack_pack_uint64 (&pk, x->item.ts);
        msgpack_pack_uint64 (&pk, x->item.qty);
        msgpack_pack_uint64 (&pk, x->ticket);
    }
    msgpack_pack_array (&pk, (uint32_t) self->ntickets);
    for (size_t t = 0; t < self->ntickets; t++)
        msgpack_pack_uint64 (&pk, self->tickets[t]);
    if (tly_link_send (self->quota, &self->buf, true))
        tly_error (WHO, "cannot hand a commit to quota; it will see the gap at the next "
                        "one and restart to recount usage from the ledger");
}

static void
send_aborts (receipt_t *self)
{
    for (size_t t = 0; t < self->ntickets; t++) {
        msgpack_packer pk;
        tly_link_begin (&self->buf, &pk, 2, TLY_MSG_ABORT, self->tickets[t]);
        tly_link_send (self->quota, &self->buf, true);
    }
}

/* ---- the keys of quota's limits ---- */

/*  Asks quota for its limits in full; from a new generation, this also
    tells quota to forget the tickets of earlier ones. */
static void
send_hello (receipt_t *self)
{
    msgpack_packer pk;
    tly_link_begin (&self->buf, &pk, 2, TLY_MSG_HELLO, 0);
    if (tly_link_send (self->quota, &self->buf, true)) {
        tly_warn (WHO, "cannot ask quota for its limits; every event goes to quota "
                       "until it can");
        self->limits_lost = true;           /* quota_inbox asks again */
    }
}

/*  Applies a LIMITS message to our copy.  What we cannot read or hold
    leaves the copy unknown (every event goes to quota) until quota sends
    it in full again, which we ask for. */
static void
limits_apply (receipt_t *self, const tly_link_msg *m)
{
    const msgpack_object *full = tly_link_field (m, 2), *arr = tly_link_field (m, 3);
    if (full && full->type == MSGPACK_OBJECT_BOOLEAN && full->via.boolean
    &&  arr && arr->type == MSGPACK_OBJECT_NIL) {
        self->limits_known = false;         /* a new quota, counting: ask it everything */
        return;
    }
    bool ok = full && full->type == MSGPACK_OBJECT_BOOLEAN
           && arr && arr->type == MSGPACK_OBJECT_ARRAY;
    bool is_full = ok && full->via.boolean;
    if (ok && !is_full && !self->limits_known)
        return;                         /* a change to a copy we do not have */
    tly_quota *q = self->limits;
    if (ok && is_full)
        ok = tly_quota_new (&q) == TLY_OK;
    for (uint32_t i = 0; ok && i < arr->via.array.size; i++) {
        const msgpack_object *o = &arr->via.array.ptr[i];
        const msgpack_object *f = o->via.array.ptr;
        tly_str c, mt;
        uint64_t limit = 0;
        ok = o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size == 3
          && !tly_obj_str (&f[0], &c) && !tly_obj_str (&f[1], &mt)
          && (f[2].type == MSGPACK_OBJECT_NIL || !tly_obj_uint (&f[2], &limit))
          && !tly_quota_set_limit (q, &c, &mt, f[2].type != MSGPACK_OBJECT_NIL, limit);
    }
    if (ok) {
        if (is_full) {
            tly_quota_destroy (&self->limits);
            self->limits = q;
            self->limits_known = true;
        }
        return;
    }
    if (is_full && q != self->limits)
        tly_quota_destroy (&q);
    self->limits_lost = true;
}

/*  Keeps a LIMITS that arrived inside a group for quota_inbox. */
static bool
limits_defer (receipt_t *self, tly_link_msg *m)
{
    if (self->ndeferred == self->deferred_cap) {
        size_t cap = self->deferred_cap ? 2 * self->deferred_cap : 4;
        tly_link_msg *d = realloc (self->deferred, cap * sizeof *d);
        if (!d)
            return false;
        self->deferred = d;
        self->deferred_cap = cap;
    }
    self->deferred[self->ndeferred++] = *m;
    return true;
}

/*  Between groups: applies the LIMITS quota sent (those kept during the
    last group first) and drops stale verdicts, so the link never fills. */
static void
quota_inbox (receipt_t *self)
{
    for (size_t i = 0; i < self->ndeferred; i++) {
        limits_apply (self, &self->deferred[i]);
        tly_link_done (&self->deferred[i]);
    }
    self->ndeferred = 0;
    while (zsock_events (self->quota) & ZMQ_POLLIN) {
        tly_link_msg m;
        int rc = tly_link_recv (self->quota, &m);
        if (rc == TLY_OK && m.type == TLY_MSG_LIMITS)
            limits_apply (self, &m);
        self->limits_lost |= rc == TLY_EPROTO;  /* perhaps LIMITS too large for a link */
        tly_link_done (&m);
        if (rc == TLY_EIO)
            break;
    }
    if (self->limits_lost) {
        tly_error (WHO, "cannot read or hold the limits quota sent (out of memory?); every "
                        "event goes to quota until it sends them again");
        self->limits_lost = false;
        self->limits_known = false;
        send_hello (self);
    }
}

/* ---- judging ---- */

static void
reject (work_t *w, const char *code, const char *message)
{
    w->out.status = TLY_ST_REJECTED;
    w->out.code = code;
    w->out.message = message;
}

/*  Entry seq, read for w: 1 with w's outcome set (duplicate or conflict)
    when it holds w's customer and key; TLY_EINVAL when it holds others;
    TLY_ENOTFOUND when there is no such entry; TLY_ECORRUPT when it does
    not decode. */
static int
judge_entry (receipt_t *self, work_t *w, uint64_t seq)
{
    const uint8_t *leaf;
    size_t len, tail_off;
    tly_entry e;
    int rc;
    if (seq >= tly_writer_next_seq (self->writer))
        return TLY_ENOTFOUND;
    if ((rc = tly_writer_leaf (self->writer, seq, &leaf, &len))
    ||  (rc = tly_leaf_decode (leaf, len, &e, &tail_off)))
        return rc == TLY_ENOTFOUND ? rc : TLY_ECORRUPT;
    if (e.ev.customer.len != w->item.customer.len || e.ev.key.len != w->item.key.len
    ||  memcmp (e.ev.customer.ptr, w->item.customer.ptr, e.ev.customer.len)
    ||  memcmp (e.ev.key.ptr, w->item.key.ptr, e.ev.key.len))
        return TLY_EINVAL;
    w->out.seq = seq;
    if (len - tail_off == w->item.tail.len
    &&  memcmp (leaf + tail_off, w->item.tail.ptr, w->item.tail.len) == 0) {
        w->out.status = TLY_ST_DUPLICATE;
        w->out.recv_ts = e.recv_ts;
        rc = tly_writer_node (self->writer, 0, seq, w->out.leaf);
        return rc ? rc : 1;
    }
    w->out.status = TLY_ST_CONFLICT;
    return 1;
}

/*  1 when the key is already in the ledger (outcome set), 0 when new.
    Ingest has looked it up in the runs its message names (proto.h): it
    is either found there (item.seq, checked against the entry) or, if
    anywhere, in L0 or a run published since. */
static int
judge_existing (receipt_t *self, work_t *w)
{
    const msg_info *info = &self->info[w->msg];
    uint64_t seq = w->item.seq;
    int rc = TLY_OK;
    if (!w->item.found)
        rc = tly_writer_lookup_beyond (self->writer, w->item.dedup,
                                       self->asked + info->asked_at, info->nasked, &seq);
    if (rc)
        return rc == TLY_ENOTFOUND ? 0 : rc;
    rc = judge_entry (self, w, seq);
    if ((rc == TLY_ENOTFOUND || rc == TLY_ECORRUPT) && w->item.found) {
        /*  Ingest read something that is not an entry (a bug, or a bad
            page in its snapshot): the whole index, asked here, decides. */
        tly_error (WHO, "ingest named entry %llu for an event, and it cannot be read (%s): "
                        "asking the whole index instead; run `tally ctl verify`",
                   (unsigned long long) seq, tly_strerror (rc));
        if ((rc = tly_writer_lookup (self->writer, w->item.dedup, &seq)))
            return rc == TLY_ENOTFOUND ? 0 : rc;
        rc = judge_entry (self, w, seq);
    }
    if (rc == TLY_EINVAL) {
        /*  A 128-bit keyed-hash collision: astronomically unlikely. */
        tly_error (WHO, "idempotency index collision at entry %llu", (unsigned long long) seq);
        reject (w, "internal", "idempotency index collision; contact the operator");
        return 1;
    }
    if (rc == TLY_ENOTFOUND || rc == TLY_ECORRUPT) {
        tly_error (WHO, "entry %llu named by the idempotency index is unreadable (%s): "
                        "the ledger is corrupt; run `tally ctl verify`",
                   (unsigned long long) seq, tly_strerror (rc));
        return TLY_ECORRUPT;
    }
    return rc;
}

static int
send_admit (receipt_t *self, uint64_t ticket, size_t nadmit)
{
    msgpack_packer pk;
    tly_link_begin (&self->buf, &pk, 4, TLY_MSG_ADMIT, ticket);
    msgpack_pack_array (&pk, (uint32_t) nadmit);
    for (size_t k = 0; k < self->npending; k++) {
        if (!self->work[self->pending[k]].admit)
            continue;
        tly_item *it = &self->work[self->pending[k]].item;
        msgpack_pack_array (&pk, 4);
        tly_pack_str (&pk, it->customer.ptr, it->customer.len);
        tly_pack_str (&pk, it->meter.ptr, it->meter.len);
        msgpack_pack_uint64 (&pk, it->ts);
        msgpack_pack_uint64 (&pk, it->qty);
    }
    msgpack_pack_uint64 (&pk, self->first);
    return tly_link_send (self->quota, &self->buf, true);
}

/*  Waits for the verdict on `ticket`, answering heartbeats meanwhile.
    Fills verdict[] (one byte per event asked about). */
static int
await_verdict (receipt_t *self, uint64_t ticket, uint8_t *verdict, size_t nadmit)
{
    int64_t deadline = zclock_mono () + ADMIT_TIMEOUT_MS;
    while (zclock_mono () < deadline) {
        if (tly_child_peer_state (self->ctx, "quota") != TLY_CHILD_RUNNING)
            return TLY_EUNAVAIL;
        void *which = zpoller_wait (self->wait_poller, 100);
        if (which == tly_child_pipe (self->ctx)) {
            zmsg_t *call = NULL;
            int r = tly_child_recv (self->ctx, &call);
            if (r == TLY_CHILD_TERM)
                self->term = true;      /* finish this group first */
            else
            if (r == TLY_CHILD_CALL) {
                zmsg_t *reply = zmsg_new ();
                tly_child_reply (self->ctx, &reply);
                zmsg_destroy (&call);
            }
        }
        else
        if (which == self->quota) {
            tly_link_msg m;
            int rc = tly_link_recv (self->quota, &m);
            if (rc == TLY_OK && m.type == TLY_MSG_LIMITS && limits_defer (self, &m))
                continue;               /* for the next group: see the top */
            if (rc == TLY_EPROTO || (rc == TLY_OK && m.type == TLY_MSG_LIMITS))
                self->limits_lost = true;       /* a change we could not keep */
            const msgpack_object *bin = rc ? NULL : tly_link_field (&m, 2);
            bool ours = !rc && m.type == TLY_MSG_VERDICT && m.ctx == ticket && bin
                     && bin->type == MSGPACK_OBJECT_BIN && bin->via.bin.size == nadmit;
            if (ours)
                memcpy (verdict, bin->via.bin.ptr, nadmit);
            tly_link_done (&m);
            if (ours)
                return TLY_OK;          /* anything else is a stale verdict */
        }
    }
    return TLY_ETIMEOUT;
}

static int
round_flush (receipt_t *self)
{
    if (self->npending == 0)
        return TLY_OK;
    size_t nadmit = 0;
    for (size_t k = 0; k < self->npending; k++)
        nadmit += self->work[self->pending[k]].admit;
    uint8_t *verdict = nadmit ? malloc (nadmit) : NULL;    /* none without a limit */
    if (nadmit && !verdict)
        return TLY_ENOMEM;
    uint64_t ticket = 0;
    int rc = TLY_OK;
    if (nadmit) {
        ticket = ++self->env->receipt_ticket;
        int64_t t0 = zclock_usecs ();
        rc = send_admit (self, ticket, nadmit);
        if (!rc) {
            self->tickets[self->ntickets++] = ticket;   /* from now on it may need an ABORT */
            rc = await_verdict (self, ticket, verdict, nadmit);
        }
        self->admit_us += zclock_usecs () - t0;
    }
    for (size_t k = 0, a = 0; k < self->npending && !rc; k++) {
        work_t *w = &self->work[self->pending[k]];
        if (w->admit && !verdict[a++]) {
            reject (w, "quota_exceeded", "the monthly limit for this customer and meter "
                                         "would be exceeded");
            continue;
        }
        uint64_t seq = tly_writer_next_seq (self->writer);
        tly_buf_reset (&self->leaf);
        rc = tly_leaf_encode (seq, self->recv_ts, "usage", (const uint8_t *) w->item.tail.ptr,
                              w->item.tail.len, &self->leaf);
        if (!rc)
            /*  judge_existing found the key absent in this txn, and the
                round set keeps a second copy of it out of this round. */
            rc = tly_writer_append_new (self->writer, self->leaf.data, self->leaf.len,
                                        w->item.dedup, w->out.leaf);
        w->out.status = TLY_ST_ACCEPTED;
        w->out.seq = seq;
        w->out.recv_ts = self->recv_ts;
        w->ticket = w->admit ? ticket : 0;
    }
    free (verdict);
    self->npending = 0;
    set_clear (self);
    return rc;
}

/* ---- the group ---- */

static int
grow (void **p, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return TLY_OK;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *q = realloc (*p, n * size);
    if (!q)
        return TLY_ENOMEM;
    *p = q;
    *cap = n;
    return TLY_OK;
}

/*  Message i's asked runs (proto.h, APPEND) into self->asked: none when
    it names none (nil or absent: ingest could not ask), and none, with a
    complaint, when they do not decode (a bug in ingest; asking the whole
    index is always right). */
static void
group_asked (receipt_t *self, size_t i)
{
    msg_info *info = &self->info[i];
    const msgpack_object *o = tly_link_field (&self->msgs[i], 3);
    info->asked_at = self->nasked;
    info->nasked = 0;
    if (!o || o->type == MSGPACK_OBJECT_NIL)
        return;
    if (grow ((void **) &self->asked, &self->asked_cap, self->nasked + TLY_DEDUP_RUNS_MAX,
              sizeof *self->asked))
        return;                     /* no room: ask the whole index, always right */
    if (tly_asked_decode (o, self->asked + self->nasked, &info->nasked)) {
        tly_error (WHO, "a message from ingest names its runs wrongly (a bug): asking the "
                        "whole index for its events");
        info->nasked = 0;
    }
    self->nasked += info->nasked;
}

/*  Decodes the group's items into self->work. */
static int
group_decode (receipt_t *self)
{
    self->nwork = 0;
    self->nasked = 0;
    for (size_t i = 0; i < self->nmsgs; i++) {
        const msgpack_object *arr = tly_link_field (&self->msgs[i], 2);
        msg_info *info = &self->info[i];
        info->bad = self->msgs[i].type != TLY_MSG_APPEND || !arr
                 || arr->type != MSGPACK_OBJECT_ARRAY;
        if (info->bad)
            continue;
        group_asked (self, i);
        size_t before = self->nwork;
        if (grow ((void **) &self->work, &self->work_cap, self->nwork + arr->via.array.size,
                  sizeof *self->work))
            return TLY_ENOMEM;
        for (uint32_t k = 0; k < arr->via.array.size; k++) {
            work_t *w = &self->work[self->nwork++];
            memset (w, 0, sizeof *w);
            w->msg = (uint32_t) i;
            if (tly_item_decode (&arr->via.array.ptr[k], &w->item)) {
                info->bad = true;
                self->nwork = before;
                break;
            }
            w->out.idx = w->item.idx;
        }
    }
    size_t cap = 16;
    while (cap < 2 * self->nwork)
        cap *= 2;
    if (cap > self->set_cap) {
        free (self->set);
        self->set = calloc (cap, sizeof *self->set);
        self->set_cap = self->set ? cap : 0;
    }
    free (self->pending);
    free (self->tickets);
    self->pending = malloc ((self->nwork + 1) * sizeof *self->pending);
    self->tickets = malloc ((self->nwork + 1) * sizeof *self->tickets);
    if (!self->set || !self->pending || !self->tickets)
        return TLY_ENOMEM;
    set_clear (self);
    return TLY_OK;
}

static int
group_judge (receipt_t *self)
{
    int rc = tly_writer_begin (self->writer);
    self->recv_ts = tly_now_ms ();
    for (size_t i = 0; i < PREFETCH_AHEAD && i < self->nwork && !rc; i++)
        tly_writer_prefetch (self->writer, self->work[i].item.dedup);
    for (size_t i = 0; i < self->nwork && !rc; i++) {
        work_t *w = &self->work[i];
        if (i + PREFETCH_AHEAD < self->nwork)
            tly_writer_prefetch (self->writer, self->work[i + PREFETCH_AHEAD].item.dedup);
        if (set_contains (self, w->item.dedup) && (rc = round_flush (self)))
            break;
        rc = judge_existing (self, w);
        if (rc == 0) {
            uint64_t limit;
            w->admit = !self->limits_known
                    || tly_quota_limit_for (self->limits, &w->item.customer, &w->item.meter,
                                            &limit);
            self->pending[self->npending++] = (uint32_t) i;
            set_add (self, (uint32_t) i);
        }
        else
        if (rc == 1)
            rc = TLY_OK;
    }
    if (!rc)
        rc = round_flush (self);
    return rc;
}

static void
group_run (receipt_t *self)
{
    self->ntickets = 0;
    self->npending = 0;
    int rc = group_decode (self);
    if (rc) {
        fail_group (self, "internal", "out of memory in the receipt actor");
        return;
    }
    if (tly_child_peer_state (self->ctx, "quota") != TLY_CHILD_RUNNING) {
        fail_group (self, "unavailable", "the quota actor is not running; "
                                         "retry with the same idempotency keys");
        return;
    }
    quota_inbox (self);         /* after seeing it run: its LIMITS precede its READY */
    uint64_t before = self->first = tly_writer_next_seq (self->writer);
    self->admit_us = 0;
    int64_t t0 = zclock_usecs ();
    rc = group_judge (self);
    int64_t t1 = zclock_usecs ();
    tly_sth sth = *tly_writer_sth (self->writer);
    const char *why = "";
    if (!rc && tly_writer_next_seq (self->writer) > before)
        rc = tly_writer_commit (self->writer, self->env->sk, &sth, &why);
    else
        tly_writer_abort (self->writer);    /* nothing new: no fsync, same head */
    tly_debug (WHO, "group: %zu requests, %zu events, %llu appended; judge+append %lld us "
                    "(quota %lld us), commit %lld us", self->nmsgs, self->nwork,
               (unsigned long long) (tly_writer_next_seq (self->writer) - before),
               (long long) (t1 - t0), (long long) self->admit_us,
               (long long) (zclock_usecs () - t1));
    if (rc) {
        send_aborts (self);
        if (rc == TLY_EUNAVAIL || rc == TLY_ETIMEOUT)
            fail_group (self, "unavailable", "the quota actor did not answer; "
                                             "retry with the same idempotency keys");
        else
        if (rc == TLY_ECORRUPT) {
            tly_error (WHO, "the ledger is corrupt (%s%s%s): nothing was written, and no "
                            "write can succeed until it is repaired. Run `tally ctl verify`, "
                            "keep a copy of the data dir and restore from a backup",
                       tly_strerror (rc), why[0] ? "; " : "", why);
            fail_group (self, "internal", "the ledger could not commit; nothing was recorded");
        }
        else {
            tly_error (WHO, "commit of %zu events failed: %s (%s); nothing was written. "
                            "Check disk space and the data dir (map full: raise map_size_gb)",
                       self->nwork, tly_strerror (rc), why);
            fail_group (self, "internal", "the ledger could not commit; nothing was recorded");
        }
        return;
    }
    send_commits (self, before);
    send_replies (self, &sth, NULL, NULL);
}

/*  Takes everything waiting on the link, up to group_max events. */
static int
group_collect (receipt_t *self)
{
    size_t events = 0;
    self->nmsgs = 0;
    do {
        if (grow ((void **) &self->msgs, &self->msgs_cap, self->nmsgs + 1, sizeof *self->msgs)
        ||  grow ((void **) &self->info, &self->info_cap, self->nmsgs + 1, sizeof *self->info))
            return TLY_ENOMEM;
        self->info[self->nmsgs] = (msg_info) { .bad = true };     /* until decoded */
        tly_link_msg *m = &self->msgs[self->nmsgs];
        int rc = tly_link_recv (self->in, m);
        if (rc == TLY_EIO) {
            tly_link_done (m);
            break;
        }
        if (rc) {
            tly_error (WHO, "dropping a malformed message from ingest (a bug)");
            tly_link_done (m);
            continue;
        }
        const msgpack_object *arr = tly_link_field (m, 2);
        events += arr && arr->type == MSGPACK_OBJECT_ARRAY ? arr->via.array.size : 0;
        self->nmsgs++;
    } while (events < self->env->group_max && (zsock_events (self->in) & ZMQ_POLLIN));
    return TLY_OK;
}

static void
group_release (receipt_t *self)
{
    for (size_t i = 0; i < self->nmsgs; i++)
        tly_link_done (&self->msgs[i]);
    self->nmsgs = 0;
}

/* ---- life cycle ---- */

static int
sign_empty_tree (receipt_t *self)
{
    tly_reader *r;
    int rc = tly_reader_new (self->env->store, &r);
    if (rc)
        return rc;
    tly_sth sth;
    rc = tly_reader_begin (r);
    if (!rc) {
        rc = tly_reader_sth (r, UINT64_MAX, &sth);
        tly_reader_end (r);
    }
    tly_reader_destroy (&r);
    if (rc != TLY_ENOTFOUND)
        return rc;
    const char *why = "";
    rc = tly_writer_begin (self->writer);
    if (!rc)
        rc = tly_writer_commit (self->writer, self->env->sk, &sth, &why);
    return rc;
}

static void
receipt_free (receipt_t *self)
{
    group_release (self);
    tly_writer_destroy (&self->writer);
    zpoller_destroy (&self->wait_poller);
    free (self->msgs);
    free (self->info);
    free (self->asked);
    free (self->work);
    free (self->pending);
    free (self->set);
    free (self->tickets);
    for (size_t i = 0; i < self->ndeferred; i++)
        tly_link_done (&self->deferred[i]);
    free (self->deferred);
    tly_quota_destroy (&self->limits);
    tly_buf_free (&self->buf);
    tly_buf_free (&self->leaf);
}

int
tly_receipt_actor (tly_child_ctx *ctx, void *args)
{
    tly_actor_env *env = args;
    receipt_t self = { .ctx = ctx, .env = env, .in = env->ingest_receipt[1],
                       .quota = env->receipt_quota[0] };
    tly_buf_init (&self.buf);
    tly_buf_init (&self.leaf);
    const char *why = "";
    int rc = tly_writer_open (env->store, env->pk, &self.writer, &why);
    if (!rc)
        rc = sign_empty_tree (&self);
    if (!rc)
        rc = tly_quota_new (&self.limits);
    if (rc) {
        tly_error (WHO, "cannot open the ledger for writing: %s (%s)", tly_strerror (rc), why);
        receipt_free (&self);
        return 1;
    }
    /*  A fault for tests to inject: quota must notice the lost COMMIT. */
    self.lose_commit = (long) tly_env_u64 (WHO, "TALLY_TEST_LOSE_COMMIT", 0, 0, 1u << 30);
    send_hello (&self);
    self.wait_poller = zpoller_new (tly_child_pipe (ctx), self.quota, NULL);
    zpoller_t *poller = zpoller_new (tly_child_pipe (ctx), self.in, NULL);
    tly_info (WHO, "ready: tree size %llu",
              (unsigned long long) tly_writer_next_seq (self.writer));
    tly_child_ready (ctx);

    int status = 0;
    while (!self.term) {
        void *which = zpoller_wait (poller, 500);
        if (which == tly_child_pipe (ctx)) {
            zmsg_t *call = NULL;
            int r = tly_child_recv (ctx, &call);
            if (r == TLY_CHILD_TERM)
                break;
            if (r == TLY_CHILD_CALL) {
                zmsg_t *reply = zmsg_new ();
                tly_child_reply (ctx, &reply);
                zmsg_destroy (&call);
            }
        }
        else
        if (which == self.in) {
            if (group_collect (&self)) {
                tly_error (WHO, "out of memory collecting a group");
                status = 1;
                break;
            }
            group_run (&self);
            group_release (&self);
        }
        quota_inbox (&self);
    }
    /*  What the index holds only in memory, stored for the next start
        (a crash loses it: lookups are slower until merges catch up). */
    if (status == 0 && (rc = tly_writer_checkpoint (self.writer, &why)))
        tly_warn (WHO, "checkpoint at stop failed: %s (%s); nothing acknowledged is lost, "
                       "lookups are slower after the next start until merges catch up",
                  tly_strerror (rc), why);
    zpoller_destroy (&poller);
    receipt_free (&self);
    return status;
}
