/*  quota.c -- the quota actor: owns the limits and the monthly usage.

    Usage is exact under any concurrency because the receipt actor, the
    single writer, asks us about every new event a limit applies to (ADMIT)
    after deduplication and before it appends: duplicates and conflicts
    never reach us.  Admission counts the usage at once; an ABORT (failed
    commit) takes it back; a COMMIT forgets the ticket.  Events no limit
    applies to are admitted by receipt alone and counted here from the
    COMMIT.  For that, receipt keeps the keys of our limits: we send them
    in full (LIMITS) once we have counted the ledger and when receipt says
    HELLO, and each change as it happens: a new limit before it is stored,
    a removal after, so receipt's copy never lacks a limit we enforce.
    Before we are ready we tell receipt to forget its copy, so while we
    count, every new event waits for us as it did before.

    ADMIT and COMMIT carry their group's first seq.  If a COMMIT or ABORT
    before it never reached us (a gap after `counted`, or a ticket of
    another group still open), we make up for it before judging or
    counting: take back those tickets' usage and count the ledger up to
    that seq (resync).  A message we cannot read, or usage we cannot
    count, means usage would be inexact: we stop without a checkpoint,
    and the supervisor restarts us to recount from the last checkpoint,
    which only ever holds the exact usage of entries [0, counted).

    Durability: limits are written to our own LMDB environment
    (<data dir>/quota, one writer: us) before set_quota replies.  Usage is
    derived from the ledger: on start we load the last checkpoint (usage
    rows and `counted`, the number of ledger entries they include) and count
    the entries after it.  A COMMIT from a ticket we never admitted (we were
    restarted between the receipt actor's ADMIT and COMMIT) is counted only
    for seqs we have not counted yet, so nothing is counted twice or missed.
*/
#include <errno.h>
#include <lmdb.h>
#include <sys/stat.h>
#include "actors.h"
#include "proto.h"
#include "tally/event.h"
#include "tally/log.h"
#include "tally/msg.h"
#include "tally/quota.h"

#define WHO "quota"
#define CHECKPOINT_MS 1000
#define MAX_TICKETS 4096
#define MAX_LIMITS_SENT 1000000     /* more than this: receipt asks about every event */

typedef struct {
    uint64_t id;
    uint64_t first;                  /* the first seq of the group that asked */
    uint32_t n;
    struct {
        tly_str customer, meter;     /* borrowed from our own copy in `data` */
        uint64_t period, qty;
    } *items;
    char *data;
} ticket_t;

typedef struct {
    tly_child_ctx *ctx;
    tly_actor_env *env;
    tly_quota *q;
    MDB_env *mdb;
    MDB_dbi limits, usage, meta;
    uint64_t counted;                /* ledger entries [0, counted) are in usage */
    bool dirty;                      /* rows changed since the last snapshot */
    bool inexact;                    /* usage is wrong: never checkpoint it */
    bool limits_unsent;              /* receipt needs our limits in full */
    bool full_next;                  /* a write failed: snapshot every row */
    zactor_t *writer;                /* writes snapshots (see below) */
    bool writing;                    /* a snapshot is with the writer */
    unsigned failures;               /* writes failed in a row (0..6) */
    uint64_t fail_writes;            /* tests: the writer fails this many (its own) */
    uint64_t count_slice;            /* entries per read snapshot while recounting */
    tly_buf snap;
    ticket_t tickets[MAX_TICKETS];
    size_t ntickets;
    tly_buf buf;
} quota_t;

/* ---- our LMDB: limits and usage checkpoints ---- */

static size_t
row_key (uint8_t *out, const tly_str *c, const tly_str *m, const uint64_t *period)
{
    size_t n = 0;
    out[n++] = (uint8_t) c->len;
    memcpy (out + n, c->ptr, c->len);
    n += c->len;
    out[n++] = (uint8_t) m->len;
    memcpy (out + n, m->ptr, m->len);
    n += m->len;
    if (period) {
        memcpy (out + n, period, 8);
        n += 8;
    }
    return n;
}

static int
row_split (const MDB_val *k, tly_str *c, tly_str *m, uint64_t *period)
{
    const uint8_t *p = k->mv_data;
    size_t n = 0, len = k->mv_size;
    if (len < 1)
        return TLY_ECORRUPT;
    c->len = p[n++];
    if (c->len + n > len)
        return TLY_ECORRUPT;
    c->ptr = (const char *) p + n;
    n += c->len;
    if (n >= len)
        return TLY_ECORRUPT;
    m->len = p[n++];
    if (m->len + n > len)
        return TLY_ECORRUPT;
    m->ptr = (const char *) p + n;
    n += m->len;
    if (period) {
        if (n + 8 != len)
            return TLY_ECORRUPT;
        memcpy (period, p + n, 8);
    }
    else
    if (n != len)
        return TLY_ECORRUPT;
    return TLY_OK;
}

static int
db_open (quota_t *self)
{
    char path[4200];
    snprintf (path, sizeof path, "%s/quota", self->env->data_dir);
    if (mkdir (path, 0755) && errno != EEXIST)
        return TLY_EIO;
    MDB_txn *txn;
    int rc = mdb_env_create (&self->mdb);
    if (!rc) rc = mdb_env_set_maxdbs (self->mdb, 4);
    if (!rc) rc = mdb_env_set_mapsize (self->mdb, (size_t) 4 << 30);
    if (!rc) rc = mdb_env_open (self->mdb, path, MDB_NOTLS, 0644);
    if (!rc) rc = mdb_txn_begin (self->mdb, NULL, 0, &txn);
    if (rc)
        return TLY_EIO;
    if ((rc = mdb_dbi_open (txn, "limits", MDB_CREATE, &self->limits))
    ||  (rc = mdb_dbi_open (txn, "usage", MDB_CREATE, &self->usage))
    ||  (rc = mdb_dbi_open (txn, "meta", MDB_CREATE, &self->meta))) {
        mdb_txn_abort (txn);
        return TLY_EIO;
    }
    return mdb_txn_commit (txn) ? TLY_EIO : TLY_OK;
}

static int
db_load (quota_t *self)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    if (mdb_txn_begin (self->mdb, NULL, MDB_RDONLY, &txn))
        return TLY_EIO;
    int err = TLY_OK;
    MDB_dbi dbis[2] = { self->limits, self->usage };
    for (int d = 0; d < 2 && !err; d++) {
        if (mdb_cursor_open (txn, dbis[d], &cur)) {
            err = TLY_EIO;
            break;
        }
        for (int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST); rc == 0 && !err;
             rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
            tly_str c, m;
            uint64_t val, period;
            if (v.mv_size != 8 || row_split (&k, &c, &m, d ? &period : NULL)) {
                err = TLY_ECORRUPT;
                break;
            }
            memcpy (&val, v.mv_data, 8);
            err = d ? tly_quota_add (self->q, &c, &m, period, val)
                    : tly_quota_set_limit (self->q, &c, &m, true, val);
        }
        mdb_cursor_close (cur);
    }
    k.mv_size = 7;
    k.mv_data = "counted";
    if (!err && mdb_get (txn, self->meta, &k, &v) == 0 && v.mv_size == 8)
        memcpy (&self->counted, v.mv_data, 8);
    mdb_txn_abort (txn);
    return err;
}

/* ---- usage checkpoints, written by a thread of their own ----

    A checkpoint is a snapshot of the changed usage rows and `counted`,
    taken on our thread (a copy, microseconds) and written and fsync'd by
    the checkpoint writer, so admissions never wait for the disk: with
    10,000 changed rows the write and its fsync take milliseconds, every
    second.  One snapshot is in flight at a time.  A write that fails is
    redone in full (every row) at the next checkpoint; the ledger remains
    the truth either way, and a restart recounts what a checkpoint missed.

    Snapshot layout: counted (u64), then per row: key length (u16), the
    row key, used (u64); host byte order, never leaves the process. */

static void
snap_row (void *arg, const tly_str *c, const tly_str *m, uint64_t period, uint64_t used)
{
    tly_buf *snap = arg;
    uint8_t key[2 + TLY_CUSTOMER_MAX + TLY_METER_MAX + 8];
    uint16_t len = (uint16_t) row_key (key, c, m, &period);
    tly_buf_append (snap, &len, 2);
    tly_buf_append (snap, key, len);
    tly_buf_append (snap, &used, 8);
}

/*  Writes a snapshot in one transaction; safe on any thread (MDB_NOTLS). */
static int
snap_write (MDB_env *mdb, MDB_dbi usage, MDB_dbi meta, const uint8_t *p, size_t len)
{
    MDB_txn *txn;
    if (len < 8 || mdb_txn_begin (mdb, NULL, 0, &txn))
        return TLY_EIO;
    MDB_val k = { 7, "counted" }, v = { 8, (void *) p };
    int err = mdb_put (txn, meta, &k, &v, 0) ? TLY_EIO : TLY_OK;
    for (size_t at = 8; !err && at < len; ) {
        uint16_t klen;
        if (len - at < 2)
            err = TLY_ECORRUPT;
        else
            memcpy (&klen, p + at, 2);
        if (err || len - at - 2 < (size_t) klen + 8) {
            err = TLY_ECORRUPT;         /* our own format: a bug */
            break;
        }
        k = (MDB_val) { klen, (void *) (p + at + 2) };
        v = (MDB_val) { 8, (void *) (p + at + 2 + klen) };
        err = mdb_put (txn, usage, &k, &v, 0) ? TLY_EIO : TLY_OK;
        at += 2 + (size_t) klen + 8;
    }
    if (err) {
        mdb_txn_abort (txn);
        return err;
    }
    return mdb_txn_commit (txn) ? TLY_EIO : TLY_OK;
}

/*  The writer: a snapshot in, "0" (written) or "1" (failed) out. */
static void
writer_actor (zsock_t *pipe, void *args)
{
    quota_t *q = args;              /* mdb and the dbis (fixed), and fail_writes */
    zsock_signal (pipe, 0);
    while (true) {
        zframe_t *f = zframe_recv (pipe);
        if (!f || (zframe_size (f) == 5 && memcmp (zframe_data (f), "$TERM", 5) == 0)) {
            zframe_destroy (&f);
            break;
        }
        int rc = TLY_EIO;
        if (q->fail_writes)
            q->fail_writes--;       /* tests: this write fails */
        else
            rc = snap_write (q->mdb, q->usage, q->meta, zframe_data (f), zframe_size (f));
        zframe_destroy (&f);
        zstr_send (pipe, rc ? "1" : "0");
    }
}

/*  Takes a snapshot into self->snap, or returns false when there is
    nothing to take.  Only with no ticket outstanding, so the rows hold
    exactly the committed usage of entries [0, counted). */
static bool
snap_take (quota_t *self)
{
    if (!self->dirty || self->ntickets || self->inexact)
        return false;
    tly_buf_reset (&self->snap);
    tly_buf_reserve (&self->snap, 8 + tly_quota_dirty_count (self->q) * 48);
    tly_buf_append (&self->snap, &self->counted, 8);
    if (self->full_next)
        tly_quota_each_usage (self->q, snap_row, &self->snap);
    else
        tly_quota_each_dirty (self->q, snap_row, &self->snap);
    if (self->snap.oom) {
        self->full_next = true;
        return false;
    }
    tly_quota_clean (self->q);
    self->dirty = false;
    self->full_next = false;
    return true;
}

/*  A failed write is retried in full, after 2, 4, ... up to 64 seconds:
    a full snapshot copies every row on our thread, which admissions wait
    for, so a disk that keeps failing must not cost that every second. */
static void
snap_failed (quota_t *self)
{
    if (self->failures < 6)
        self->failures++;
    if (self->failures == 1 || self->failures == 6)
        tly_warn (WHO, "usage checkpoint failed; retrying in full %s; meanwhile a restart "
                       "recounts more of the ledger (check free space in <data dir>/quota)",
                  self->failures == 1 ? "shortly" : "every minute");
    self->full_next = true;
    self->dirty = true;
}

/*  Milliseconds to the next checkpoint. */
static int64_t
checkpoint_delay (const quota_t *self)
{
    return (int64_t) CHECKPOINT_MS << self->failures;
}

/*  Hands a snapshot to the writer, unless one is still being written. */
static void
checkpoint (quota_t *self)
{
    int64_t t0 = zclock_usecs ();
    if (!self->writing && snap_take (self)) {
        tly_debug (WHO, "checkpoint: %zu bytes of changed usage taken in %lld us",
                   self->snap.len, (long long) (zclock_usecs () - t0));
        zframe_t *f = zframe_new (self->snap.data, self->snap.len);
        if (f && zframe_send (&f, self->writer, ZFRAME_DONTWAIT) == 0)
            self->writing = true;
        else {
            zframe_destroy (&f);
            snap_failed (self);
        }
    }
}

static void
on_written (quota_t *self)
{
    char *rc = zstr_recv (self->writer);
    self->writing = false;
    if (!rc || strcmp (rc, "0"))
        snap_failed (self);
    else
        self->failures = 0;
    zstr_free (&rc);
}

/*  On the way out: waits for the writer, then writes the rest here. */
static void
checkpoint_final (quota_t *self)
{
    if (self->writer && self->writing)
        on_written (self);
    zactor_destroy (&self->writer);
    if (self->mdb && snap_take (self)
    &&  snap_write (self->mdb, self->usage, self->meta, self->snap.data, self->snap.len))
        tly_warn (WHO, "the last usage checkpoint failed; the next start recounts more "
                       "of the ledger");
}

/* ---- rebuilding usage from the ledger ---- */

#define COUNT_SLICE 100000         /* entries per read snapshot while rebuilding */

static void on_call (quota_t *self, zmsg_t **call);

/*  Answers the supervisor between slices of a long rebuild.  False when
    asked to stop. */
static bool
serve_pipe (quota_t *self)
{
    zsock_t *pipe = tly_child_pipe (self->ctx);
    while (zsock_events (pipe) & ZMQ_POLLIN) {
        zmsg_t *call = NULL;
        int r = tly_child_recv (self->ctx, &call);
        if (r == TLY_CHILD_TERM)
            return false;
        if (r == TLY_CHILD_CALL)
            on_call (self, &call);
    }
    return true;
}

/*  Counts the ledger's entries from `counted` up to `until` (or its end),
    in slices, answering
    heartbeats in between: a large ledger with an old (or no) checkpoint
    takes seconds.  Until it is done, admissions wait on the link (the
    receipt actor answers `unavailable` after its timeout).  TLY_EUNAVAIL
    when told to stop meanwhile. */
static int
count_ledger (quota_t *self, uint64_t until)
{
    tly_reader *r;
    int rc = tly_reader_new (self->env->store, &r);
    if (rc)
        return rc;
    uint64_t from = self->counted, seq = from, size = 0;
    int64_t started = zclock_mono (), next_note = started + 5000;
    do {
        if (!serve_pipe (self)) {
            rc = TLY_EUNAVAIL;
            break;
        }
        if ((rc = tly_reader_begin (r)))
            break;
        size = tly_reader_size (r);
        if (size > until)
            size = until;
        if (seq > size) {
            tly_reader_end (r);
            tly_error (WHO, "usage covers %llu entries but the ledger has %llu (was an older "
                            "ledger restored?); move <data dir>/quota away to recount it",
                       (unsigned long long) seq, (unsigned long long) size);
            rc = TLY_ECORRUPT;
            break;
        }
        uint64_t stop = size - seq > self->count_slice ? seq + self->count_slice : size;
        for (; !rc && seq < stop; seq++) {
            const uint8_t *leaf;
            size_t len;
            tly_entry e;
            if ((rc = tly_reader_leaf (r, seq, &leaf, &len))
            ||  (rc = tly_leaf_decode (leaf, len, &e, NULL)))
                break;
            if (e.kind.len == 5 && memcmp (e.kind.ptr, "usage", 5) == 0)
                rc = tly_quota_add (self->q, &e.ev.customer, &e.ev.meter,
                                    tly_period_of (e.ev.ts), e.ev.qty);
        }
        tly_reader_end (r);
        self->counted = seq;
        if (zclock_mono () > next_note) {
            tly_info (WHO, "rebuilding usage: %llu of %llu entries counted; writes get "
                           "`unavailable` until done", (unsigned long long) seq,
                      (unsigned long long) size);
            next_note = zclock_mono () + 5000;
        }
    } while (!rc && seq < size);
    tly_reader_destroy (&r);
    if (rc == TLY_EUNAVAIL) {
        /*  Stopped between slices: the rows hold the usage of exactly
            [0, counted), so the last checkpoint keeps it and the next
            start goes on from there instead of from the old checkpoint. */
        self->dirty |= seq > from;
        return rc;
    }
    if (rc) {
        tly_error (WHO, "cannot count ledger entry %llu: %s; run `tally ctl verify`",
                   (unsigned long long) seq, tly_strerror (rc));
        return rc;
    }
    self->dirty |= seq > from;
    tly_log (seq > from ? TLY_LOG_INFO : TLY_LOG_DEBUG, WHO, "usage rebuilt: %llu entries "
             "were counted already, %llu more counted from the ledger in %lld ms",
             (unsigned long long) from, (unsigned long long) (seq - from),
             (long long) (zclock_mono () - started));
    return TLY_OK;
}

/* ---- tickets ---- */

static void
ticket_free (ticket_t *t)
{
    free (t->items);
    free (t->data);
    memset (t, 0, sizeof *t);
}

static ticket_t *
ticket_find (quota_t *self, uint64_t id)
{
    for (size_t i = 0; i < self->ntickets; i++)
        if (self->tickets[i].id == id)
            return &self->tickets[i];
    return NULL;
}

static void
ticket_drop (quota_t *self, ticket_t *t)
{
    ticket_free (t);
    *t = self->tickets[--self->ntickets];
    memset (&self->tickets[self->ntickets], 0, sizeof *t);
}

/* ---- messages from the receipt actor ---- */

/*  Makes usage exact again before judging or counting for the group that
    starts at seq `first`, when a COMMIT or ABORT before it was lost: the
    usage of tickets from other groups is taken back (they committed or
    not, we cannot tell) and the ledger is counted from `counted` up to
    `until`, which covers every entry we were never told of.  Every
    message of the earlier groups precedes this group's on the link. */
static int
resync (quota_t *self, uint64_t first, uint64_t until)
{
    for (size_t i = 0; i < self->ntickets; ) {
        ticket_t *t = &self->tickets[i];
        if (t->first == first) {
            i++;
            continue;
        }
        for (uint32_t k = 0; k < t->n; k++)
            tly_quota_sub (self->q, &t->items[k].customer, &t->items[k].meter,
                           t->items[k].period, t->items[k].qty);
        ticket_drop (self, t);
    }
    return count_ledger (self, until);
}

/*  Whether a group starting at `first` finds us missing something. */
static bool
out_of_step (quota_t *self, uint64_t first)
{
    if (first > self->counted)
        return true;
    for (size_t i = 0; i < self->ntickets; i++)
        if (self->tickets[i].first != first)
            return true;
    return false;
}

static int
on_admit (quota_t *self, tly_link_msg *m)
{
    const msgpack_object *arr = tly_link_field (m, 2);
    uint64_t first;
    if (!arr || arr->type != MSGPACK_OBJECT_ARRAY || tly_obj_uint (tly_link_field (m, 3), &first))
        return TLY_OK;              /* no verdict: receipt times out and fails the group */
    if (out_of_step (self, first)) {
        tly_warn (WHO, "a commit or abort never reached us; counting the ledger up to "
                       "entry %llu before admitting more", (unsigned long long) first);
        int rc = resync (self, first, first);
        if (rc)
            return rc;
    }
    uint32_t n = arr->via.array.size;
    uint8_t *verdict = calloc (n + 1, 1);
    ticket_t t = { .id = m->ctx, .first = first, .n = 0 };
    size_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        const msgpack_object *f = arr->via.array.ptr[i].via.array.ptr;
        if (arr->via.array.ptr[i].type == MSGPACK_OBJECT_ARRAY
        &&  arr->via.array.ptr[i].via.array.size == 4)
            bytes += f[0].via.str.size + f[1].via.str.size;
    }
    t.items = calloc (n + 1, sizeof *t.items);
    t.data = malloc (bytes + 1);
    bool room = self->ntickets < MAX_TICKETS;
    size_t used = 0;                /* bytes of t.data holding copies so far */
    for (uint32_t i = 0; verdict && t.items && t.data && room && i < n; i++) {
        const msgpack_object *o = &arr->via.array.ptr[i];
        tly_str c, mt;
        uint64_t ts, qty;
        if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 4
        ||  tly_obj_str (&o->via.array.ptr[0], &c) || tly_obj_str (&o->via.array.ptr[1], &mt)
        ||  tly_obj_uint (&o->via.array.ptr[2], &ts) || tly_obj_uint (&o->via.array.ptr[3], &qty)
        ||  c.len > TLY_CUSTOMER_MAX || mt.len > TLY_METER_MAX)
            continue;               /* verdict 0: refuse what we cannot read */
        int err;
        verdict[i] = tly_quota_admit (self->q, &c, &mt, ts, qty, &err);
        if (!verdict[i])
            continue;
        /*  Keep a copy: an ABORT must find the counters again. */
        char *p = t.data + used;
        used += c.len + mt.len;
        memcpy (p, c.ptr, c.len);
        memcpy (p + c.len, mt.ptr, mt.len);
        t.items[t.n].customer = (tly_str) { p, c.len };
        t.items[t.n].meter = (tly_str) { p + c.len, mt.len };
        t.items[t.n].period = tly_period_of (ts);
        t.items[t.n].qty = qty;
        t.n++;
    }
    if (room && verdict && t.items && t.data)
        self->tickets[self->ntickets++] = t;
    else {
        /*  Out of memory or too many open tickets: refuse the whole round. */
        for (uint32_t k = 0; k < t.n; k++)
            tly_quota_sub (self->q, &t.items[k].customer, &t.items[k].meter,
                           t.items[k].period, t.items[k].qty);
        if (verdict)
            memset (verdict, 0, n);
        ticket_free (&t);
        tly_error (WHO, "cannot hold an admission (out of memory or %d open rounds)",
                   MAX_TICKETS);
    }
    msgpack_packer pk;
    tly_link_begin (&self->buf, &pk, 3, TLY_MSG_VERDICT, m->ctx);
    tly_pack_bin (&pk, verdict ? verdict : (uint8_t *) "", verdict ? n : 0);
    tly_link_send (self->env->receipt_quota[1], &self->buf, true);
    free (verdict);
    return TLY_OK;
}

/*  [12, first, [[seq, customer, meter, ts, qty, ticket]...], [ticket...]]:
    the accepted events of one group in seq order.  Those our admission
    counted are known by their ticket; the rest (no limit applied, or a
    ticket from before our restart) are counted unless the ledger count
    already included them.  A COMMIT or ABORT lost before it is made up
    for first (resync); what cannot be is TLY_ECORRUPT (see the top). */
static int
on_commit (quota_t *self, tly_link_msg *m)
{
    const msgpack_object *arr = tly_link_field (m, 2), *closes = tly_link_field (m, 3);
    const char *why = NULL;
    if (!arr || arr->type != MSGPACK_OBJECT_ARRAY
    ||  !closes || closes->type != MSGPACK_OBJECT_ARRAY)
        why = "a malformed commit (a bug)";
    else
    if (out_of_step (self, m->ctx)) {
        tly_warn (WHO, "a commit or abort never reached us; counting the ledger up to "
                       "entry %llu", (unsigned long long) m->ctx);
        int rc = resync (self, m->ctx, m->ctx);
        if (rc)
            return rc;
    }
    uint64_t top = self->counted, last = 0;
    ticket_t *t = NULL;
    for (uint32_t i = 0; !why && i < arr->via.array.size; i++) {
        const msgpack_object *o = &arr->via.array.ptr[i];
        tly_str c, mt;
        uint64_t seq, ts, qty, ticket;
        if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 6
        ||  tly_obj_uint (&o->via.array.ptr[0], &seq)
        ||  tly_obj_str (&o->via.array.ptr[1], &c) || tly_obj_str (&o->via.array.ptr[2], &mt)
        ||  tly_obj_uint (&o->via.array.ptr[3], &ts) || tly_obj_uint (&o->via.array.ptr[4], &qty)
        ||  tly_obj_uint (&o->via.array.ptr[5], &ticket)
        ||  c.len > TLY_CUSTOMER_MAX || mt.len > TLY_METER_MAX) {
            why = "a malformed commit entry (a bug)";
            break;
        }
        if (ticket != last) {
            last = ticket;
            t = ticket ? ticket_find (self, ticket) : NULL;
        }
        if (!t && seq >= self->counted
        &&  tly_quota_add (self->q, &c, &mt, tly_period_of (ts), qty)) {
            why = "out of memory counting usage";
            break;
        }
        if (seq + 1 > top)
            top = seq + 1;
    }
    for (uint32_t i = 0; !why && i < closes->via.array.size; i++) {
        uint64_t ticket;
        if (!tly_obj_uint (&closes->via.array.ptr[i], &ticket)
        &&  (t = ticket_find (self, ticket)))
            ticket_drop (self, t);
    }
    if (!why && self->ntickets)
        why = "a commit left its own admission open (a bug)";
    if (why) {
        tly_error (WHO, "%s: usage would be inexact, so quota stops without a checkpoint; "
                        "the supervisor restarts it to recount from the last one", why);
        self->inexact = true;
        return TLY_ECORRUPT;
    }
    self->counted = top;
    self->dirty = true;
    return TLY_OK;
}

static void
on_abort (quota_t *self, tly_link_msg *m)
{
    ticket_t *t = ticket_find (self, m->ctx);
    if (!t)
        return;
    for (uint32_t k = 0; k < t->n; k++)
        tly_quota_sub (self->q, &t->items[k].customer, &t->items[k].meter,
                       t->items[k].period, t->items[k].qty);
    ticket_drop (self, t);
}

/* ---- the quota op (from ingest) ---- */

/*  Rows of the quota op: one per meter that has a limit applying to the
    customer, or usage this period under a wildcard-meter limit; plus a "*"
    row for a wildcard-meter limit (the default for meters not listed; its
    `used` is 0, each meter's usage being on its own row). */
typedef struct {
    quota_t *self;
    tly_str customer;
    uint64_t period;
    zhashx_t *meters;                /* meter (C string) -> non-NULL */
    bool wildcard;
} query_ctx;

static bool
str_eq (const tly_str *a, const char *b)
{
    return a->len == strlen (b) && memcmp (a->ptr, b, a->len) == 0;
}

static bool
same (const tly_str *a, const tly_str *b)
{
    return a->len == b->len && memcmp (a->ptr, b->ptr, a->len) == 0;
}

static void
meter_add (query_ctx *qc, const tly_str *m)
{
    char name[TLY_METER_MAX + 1];
    memcpy (name, m->ptr, m->len);      /* meters are [A-Za-z0-9_.:-]: no NUL */
    name[m->len] = 0;
    zhashx_insert (qc->meters, name, (void *) 1);
}

static void
query_limit (void *arg, const tly_str *c, const tly_str *m, uint64_t limit)
{
    (void) limit;
    query_ctx *qc = arg;
    if (!same (c, &qc->customer) && !str_eq (c, "*"))
        return;
    if (str_eq (m, "*"))
        qc->wildcard = true;
    else
        meter_add (qc, m);
}

static void
query_usage (void *arg, const tly_str *c, const tly_str *m, uint64_t period, uint64_t used)
{
    query_ctx *qc = arg;
    if (period == qc->period && used && same (c, &qc->customer) && qc->wildcard)
        meter_add (qc, m);
}

static void
on_query (quota_t *self, tly_link_msg *m)
{
    tly_str customer;
    uint64_t period;
    if (tly_obj_str (tly_link_field (m, 2), &customer) || customer.len > TLY_CUSTOMER_MAX
    ||  tly_obj_uint (tly_link_field (m, 3), &period))
        return;
    query_ctx qc = { self, customer, period, zhashx_new (), false };
    if (!qc.meters)
        return;
    tly_quota_each_limit (self->q, query_limit, &qc);
    tly_quota_each_usage (self->q, query_usage, &qc);

    msgpack_packer pk;
    tly_link_begin (&self->buf, &pk, 3, TLY_MSG_USAGE, m->ctx);
    msgpack_pack_array (&pk, (uint32_t) zhashx_size (qc.meters) + qc.wildcard);
    for (void *v = zhashx_first (qc.meters); v; v = zhashx_next (qc.meters)) {
        const char *name = zhashx_cursor (qc.meters);
        tly_str meter = { name, (uint32_t) strlen (name) };
        uint64_t limit = 0;
        tly_quota_limit_for (self->q, &customer, &meter, &limit);
        msgpack_pack_array (&pk, 3);
        tly_pack_str (&pk, meter.ptr, meter.len);
        msgpack_pack_uint64 (&pk, limit);
        msgpack_pack_uint64 (&pk, tly_quota_used (self->q, &customer, &meter, period));
    }
    if (qc.wildcard) {
        static const tly_str star = { "*", 1 };
        uint64_t limit = 0;
        tly_quota_limit_for (self->q, &customer, &star, &limit);
        msgpack_pack_array (&pk, 3);
        tly_pack_cstr (&pk, "*");
        msgpack_pack_uint64 (&pk, limit);
        msgpack_pack_uint64 (&pk, 0);
    }
    zhashx_destroy (&qc.meters);
    tly_link_send (self->env->ingest_quota[1], &self->buf, true);
}

/* ---- the keys of our limits, for receipt ---- */

static void
pack_limit (void *arg, const tly_str *c, const tly_str *m, uint64_t limit)
{
    msgpack_packer *pk = arg;
    msgpack_pack_array (pk, 3);
    tly_pack_str (pk, c->ptr, c->len);
    tly_pack_str (pk, m->ptr, m->len);
    msgpack_pack_uint64 (pk, limit);
}

/*  Starts a LIMITS message in self->buf, up to its list. */
static void
limits_head (quota_t *self, msgpack_packer *pk, bool full)
{
    tly_link_begin (&self->buf, pk, 4, TLY_MSG_LIMITS, 0);
    if (full)
        msgpack_pack_true (pk);
    else
        msgpack_pack_false (pk);
}

/*  Sends receipt every limit (c NULL) or one change (set, or removed). */
static int
limits_send (quota_t *self, const tly_str *c, const tly_str *m, bool set, uint64_t limit)
{
    size_t n = c ? 1 : tly_quota_limit_count (self->q);
    if (n > MAX_LIMITS_SENT) {
        if (self->limits_unsent)
            tly_warn (WHO, "%zu limits are more than receipt keeps (%d): it asks about "
                           "every event, which is slower", n, MAX_LIMITS_SENT);
        self->limits_unsent = false;
        return TLY_ETOOLARGE;
    }
    msgpack_packer pk;
    limits_head (self, &pk, !c);
    if (c) {
        msgpack_pack_array (&pk, 1);
        msgpack_pack_array (&pk, 3);
        tly_pack_str (&pk, c->ptr, c->len);
        tly_pack_str (&pk, m->ptr, m->len);
        if (set)
            msgpack_pack_uint64 (&pk, limit);
        else
            msgpack_pack_nil (&pk);
    }
    else {
        msgpack_pack_array (&pk, (uint32_t) n);
        tly_quota_each_limit (self->q, pack_limit, &pk);
    }
    int rc = tly_link_send (self->env->receipt_quota[1], &self->buf, false);
    if (!c)
        self->limits_unsent = rc != TLY_OK;     /* tried again every second */
    return rc;
}

/*  Tells receipt to forget its copy of our limits: until we send them in
    full, it asks us about every event. */
static int
limits_forget (quota_t *self)
{
    msgpack_packer pk;
    limits_head (self, &pk, true);
    msgpack_pack_nil (&pk);
    return tly_link_send (self->env->receipt_quota[1], &self->buf, true);
}

/*  HELLO: a new receipt generation.  Tickets still open are from earlier
    ones: their groups may or may not have committed.  So take their
    usage back and count the ledger from `counted` on: every entry whose
    COMMIT we never got is past it.  Then send the limits in full. */
static int
on_hello (quota_t *self)
{
    if (self->ntickets)
        tly_warn (WHO, "a new receipt generation: %zu rounds of the last one never closed; "
                       "counting their entries from the ledger", self->ntickets);
    int rc = resync (self, UINT64_MAX, UINT64_MAX);
    self->limits_unsent = true;
    if (!rc)
        limits_send (self, NULL, NULL, false, 0);
    return rc;
}

/* ---- set_quota (a control call) ---- */

static bool
valid_side (const tly_str *s, bool meter)
{
    if (str_eq (s, "*"))
        return true;
    if (s->len == 0 || s->len > (meter ? TLY_METER_MAX : TLY_CUSTOMER_MAX))
        return false;
    if (!meter)
        return tly_utf8_valid (s->ptr, s->len);
    for (uint32_t i = 0; i < s->len; i++) {
        char ch = s->ptr[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')
           || ch == '_' || ch == '.' || ch == ':' || ch == '-'))
            return false;
    }
    return true;
}

/*  body: {"op":"set_quota","id"?,"customer","meter","limit": uint | nil} */
static void
set_quota (quota_t *self, const msgpack_object *body, tly_buf *reply)
{
    const msgpack_object *id = tly_msg_get (body, "id");
    const msgpack_object *lim = tly_msg_get (body, "limit");
    tly_str c, m;
    uint64_t limit = 0;
    bool remove = lim && lim->type == MSGPACK_OBJECT_NIL;
    if (tly_msg_get_str (body, "customer", &c) || !valid_side (&c, false)
    ||  tly_msg_get_str (body, "meter", &m) || !valid_side (&m, true)
    ||  !lim || (!remove && tly_obj_uint (lim, &limit))) {
        tly_reply_error (reply, id, "bad_request", "set_quota needs customer (1-128 bytes of "
                         "UTF-8, or \"*\"), meter ([A-Za-z0-9_.:-]{1,64}, or \"*\") and "
                         "limit (uint, or nil to remove)");
        return;
    }
    uint64_t old = 0;
    bool had = tly_quota_limit_exact (self->q, &c, &m, &old);
    /*  Receipt must know of a limit before we enforce it (see the top). */
    if (!remove && limits_send (self, &c, &m, true, limit)) {
        tly_error (WHO, "cannot tell receipt of a new limit (its link is full?); "
                        "the limit was not set");
        tly_reply_error (reply, id, "unavailable", "the limit could not be set now; retry");
        return;
    }
    uint8_t key[2 + TLY_CUSTOMER_MAX + TLY_METER_MAX];
    MDB_val k = { row_key (key, &c, &m, NULL), key }, v = { 8, &limit };
    MDB_txn *txn;
    int rc = mdb_txn_begin (self->mdb, NULL, 0, &txn);
    if (!rc) {
        rc = remove ? mdb_del (txn, self->limits, &k, NULL) : mdb_put (txn, self->limits, &k, &v, 0);
        if (rc == MDB_NOTFOUND)
            rc = 0;
        rc = rc ? (mdb_txn_abort (txn), rc) : mdb_txn_commit (txn);
    }
    if (rc || tly_quota_set_limit (self->q, &c, &m, !remove, limit)) {
        tly_error (WHO, "cannot store a limit: %s; check the data dir's disk",
                   mdb_strerror (rc));
        tly_reply_error (reply, id, "internal", "the limit could not be stored");
        return;
    }
    if (remove)
        limits_send (self, &c, &m, false, 0);  /* lost, it only costs receipt round trips */
    char was[32] = "none";
    if (had)
        snprintf (was, sizeof was, "%llu", (unsigned long long) old);
    if (remove)
        tly_info (WHO, "limit %.*s/%.*s removed (was %s)", (int) c.len, c.ptr,
                  (int) m.len, m.ptr, was);
    else
        tly_info (WHO, "limit %.*s/%.*s set to %llu (was %s)", (int) c.len, c.ptr,
                  (int) m.len, m.ptr, (unsigned long long) limit, was);
    msgpack_packer pk;
    tly_buf_packer (reply, &pk);
    tly_reply_head (&pk, true, id, 0);
}

static void
on_call (quota_t *self, zmsg_t **call)
{
    zframe_t *f = zmsg_first (*call);
    tly_buf reply;
    tly_buf_init (&reply);
    msgpack_zone zone;
    msgpack_zone_init (&zone, 2048);
    msgpack_object body;
    if (f && tly_msg_check (zframe_data (f), zframe_size (f), &tly_msg_request_limits, NULL) == 0
    &&  tly_msg_unpack (zframe_data (f), zframe_size (f), &zone, &body) == 0
    &&  body.type == MSGPACK_OBJECT_MAP)
        set_quota (self, &body, &reply);
    else
        tly_reply_error (&reply, NULL, "bad_request", "malformed call");
    zmsg_t *out = zmsg_new ();
    zmsg_addmem (out, reply.data, reply.len);
    tly_child_reply (self->ctx, &out);
    msgpack_zone_destroy (&zone);
    tly_buf_free (&reply);
    zmsg_destroy (call);
}

/* ---- life cycle ---- */

static void
quota_free (quota_t *self)
{
    checkpoint_final (self);
    while (self->ntickets)
        ticket_drop (self, &self->tickets[0]);
    tly_quota_destroy (&self->q);
    if (self->mdb)
        mdb_env_close (self->mdb);
    tly_buf_free (&self->buf);
    tly_buf_free (&self->snap);
}

int
tly_quota_actor (tly_child_ctx *ctx, void *args)
{
    tly_actor_env *env = args;
    quota_t self = { .ctx = ctx, .env = env };
    tly_buf_init (&self.buf);
    tly_buf_init (&self.snap);
    int rc = tly_quota_new (&self.q);
    if (!rc) rc = db_open (&self);
    if (!rc) rc = db_load (&self);
    self.fail_writes = tly_env_u64 (WHO, "TALLY_TEST_FAIL_CHECKPOINTS", 0, 0, 1000);
    self.count_slice = tly_env_u64 (WHO, "TALLY_TEST_COUNT_SLICE", COUNT_SLICE, 1000, 10000000);
    if (!rc && !(self.writer = zactor_new (writer_actor, &self)))
        rc = TLY_ENOMEM;
    if (!rc) tly_quota_clean (self.q);       /* loaded rows are on disk already */
    if (!rc && limits_forget (&self)) {     /* before READY: see the top */
        tly_error (WHO, "cannot reach the receipt actor; the supervisor will retry");
        quota_free (&self);
        return 1;
    }
    if (rc) {
        tly_error (WHO, "cannot start: %s; check <data dir>/quota", tly_strerror (rc));
        quota_free (&self);
        return 1;
    }
    /*  Ready before the recount: it may take long on a big ledger. */
    tly_child_ready (ctx);
    rc = count_ledger (&self, UINT64_MAX);
    if (rc) {
        quota_free (&self);
        return rc == TLY_EUNAVAIL ? 0 : 1;
    }
    self.limits_unsent = true;
    limits_send (&self, NULL, NULL, false, 0);
    zsock_t *from_receipt = env->receipt_quota[1], *from_ingest = env->ingest_quota[1];
    /*  The writer before the links: zpoller returns the first ready
        socket, and busy links must not keep its answer waiting. */
    zpoller_t *poller = zpoller_new (tly_child_pipe (ctx), self.writer, from_receipt,
                                     from_ingest, NULL);
    int64_t next_checkpoint = zclock_mono () + checkpoint_delay (&self);
    while (true) {
        void *which = zpoller_wait (poller, 500);
        if (which == tly_child_pipe (ctx)) {
            zmsg_t *call = NULL;
            int r = tly_child_recv (ctx, &call);
            if (r == TLY_CHILD_TERM)
                break;
            if (r == TLY_CHILD_CALL)
                on_call (&self, &call);
        }
        else
        if (which == from_receipt || which == from_ingest) {
            tly_link_msg m;
            int r = tly_link_recv (which, &m);
            if (r == TLY_EPROTO && which == from_receipt) {
                tly_error (WHO, "a message from receipt we cannot read (a bug): usage would "
                                "be inexact, so quota stops without a checkpoint and recounts");
                self.inexact = true;
                rc = TLY_ECORRUPT;
            }
            if (r == TLY_OK) {
                switch (m.type) {
                    case TLY_MSG_ADMIT:  rc = on_admit (&self, &m); break;
                    case TLY_MSG_COMMIT: rc = on_commit (&self, &m); break;
                    case TLY_MSG_ABORT:  on_abort (&self, &m); break;
                    case TLY_MSG_QUERY:  on_query (&self, &m); break;
                    case TLY_MSG_HELLO:  rc = on_hello (&self); break;
                    default: tly_error (WHO, "unexpected message type %d (a bug)", m.type);
                }
            }
            tly_link_done (&m);
            if (rc)
                break;          /* told to stop while counting, or the ledger is unreadable */
        }
        else
        if (which == self.writer)
            on_written (&self);
        if (zclock_mono () >= next_checkpoint) {
            if (self.limits_unsent)
                limits_send (&self, NULL, NULL, false, 0);
            checkpoint (&self);
            next_checkpoint = zclock_mono () + checkpoint_delay (&self);
        }
    }
    zpoller_destroy (&poller);
    quota_free (&self);
    return rc && rc != TLY_EUNAVAIL ? 1 : 0;
}
