/*  reconcile.c -- the reconcile actor: a scrubber for the stored ledger.

    A pass checks every stored byte against a hash:
      1-2. entries and nodes, in one walk in the order the tree grew (one
         cursor per table, no lookups): each stored interior node is the
         hash of its two children (at level 1 the children are hashes of
         the leaves' bytes, which is what covers the entries; the last
         leaves, under no node yet, are covered by step 4); and each leaf
         decodes as a canonical leaf carrying its own seq, checked once per
         start of the scrubber (every pass hashes the bytes again, so a
         leaf that decoded well still does);
      3. dedup: each idempotency record names an entry whose (customer, key)
         hashes to the record's key (the records of a slice are read in
         key order and checked in seq order), and each run's Bloom filter says
         "maybe" for every key of the run (the runs' counts must add up to
         the entries they cover; the newest keys, L0, are not stored but
         derived from the entries, which steps 1 and 2 cover);
      4. heads: each stored head record matches its seal (a BLAKE2b-128
         over the record, format 8); the newest head of the pass, each head
         stored before format 8 and one sealed head in 64 (another each
         pass, from a random start, so that restarts do not check the same
         heads over and over) verify with log.pub and their roots equal the
         roots recomputed from the stored nodes.  (Verifying every signature
         would cost about 50 us per commit ever made: with small commits,
         hours per pass.  TALLY_HEADS_FULL=N checks one in N instead.)
    Passes run in slices between heartbeats, paced so that a full pass takes
    about half of --verify-interval: a byte corrupted anywhere in those
    records is found within one interval.  The scrubber never takes more
    than --verify-cpu percent of a core, though: on a ledger too large for
    that, passes take longer than the interval and the log says so, with
    what to change.  The thread runs at a lower CPU priority
    (--verify-nice; by default the idle class: only on CPU time no other
    thread wants), so on busy cores it yields to the request path.
    `verify` runs a pass at full speed and replies when it ends; an
    operator waits for that pass, so it leaves the idle class for nice 19
    until it ends (verify_priority).  Results
    go to the log (ERROR on the first finding), to `status` and to
    `verify`.
*/
#include <assert.h>
#include <errno.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/resource.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "actors.h"
#include "tally/event.h"
#include "tally/log.h"
#include "tally/merkle.h"
#include "tally/msg.h"
#include "tally/sort.h"

#define WHO "reconcile"
#define TICK_MS 100
#define FAST_SLICE 100000
/*  Dedup records checked per batch, sorted by the entry they name: in key
    order they name entries all over the log, a B-tree descent into cold
    pages each (1.35 us a read at 21M entries); in seq order neighbours
    share the upper pages (0.67 us with batches of 64K, 0.54 with 256K).
    A batch is also at most one slice's budget (a `verify` slice: 100K).
    A `verify` pass over 21M entries: 38 s before, 27-28 s.  24 bytes a
    record, twice (the sort's second buffer): 6 MiB; without that memory,
    batches of DEDUP_SMALL in recon_t itself. */
#define DEDUP_BATCH 131072
#define DEDUP_SMALL 512
#define HEADS_FULL 64               /* check_sth_one; env TALLY_HEADS_FULL */
#define HEADS_FULL_MAX 1000000

typedef enum { PH_TREE, PH_DEDUP, PH_STHS, PH_DONE } phase_t;

typedef struct {
    bool ok;
    uint64_t at;
    uint64_t checked;
    uint64_t duration_ms;           /* how long the pass took */
    char error[256];
} result_t;

typedef struct {
    uint64_t seq;                   /* first: tly_sort_u64 sorts by it */
    uint8_t key[TLY_DEDUP_LEN];
} dedup_rec;

typedef struct {
    tly_child_ctx *ctx;
    tly_actor_env *env;
    tly_reader *reader;
    phase_t phase;
    uint64_t size;                  /* tree size when the pass began */
    uint64_t rotation;              /* heads phases completed, from a random start */
    uint64_t heads;                 /* heads seen in this pass */
    uint64_t heads_full;            /* one sealed head in this many in full */
    uint64_t pos;                   /* tree: the next leaf; heads: the next size */
    uint8_t stack[64][32];          /* tree: roots of the complete subtrees */
    uint8_t stack_level[64];        /*       below pos, their levels descending */
    unsigned depth;
    uint64_t decoded;               /* entries [0, decoded) decoded well once */
    uint8_t dedup_last[TLY_DEDUP_POS_LEN];
    bool dedup_started;
    dedup_rec *batch, *tmp;         /* batch_cap each, from the first dedup phase */
    size_t nbatch, batch_cap;
    dedup_rec small[2][DEDUP_SMALL];
    uint64_t checked;
    int64_t started;                /* when this pass began (mono ms) */
    bool slow_warned;
    char error[256];
    result_t last;
    zmsg_t *verify_call;            /* a pending `verify` */
    bool idle;                      /* in the idle CPU class between verifies */
    bool raised;                    /* out of it for the pending verify */
    int64_t last_logged;
    char logged[256];
} recon_t;

static void
fail (recon_t *self, const char *fmt, ...)
{
    if (self->error[0])
        return;
    va_list args;
    va_start (args, fmt);
    vsnprintf (self->error, sizeof self->error, fmt, args);
    va_end (args);
}

static void
pass_start (recon_t *self)
{
    self->phase = PH_TREE;
    self->pos = 0;
    self->depth = 0;
    self->dedup_started = false;
    self->checked = 0;
    self->error[0] = 0;
    self->size = 0;
    self->heads = 0;
    self->started = zclock_mono ();
    if (tly_reader_begin (self->reader) == 0) {
        self->size = tly_reader_size (self->reader);
        tly_reader_end (self->reader);
    }
}

/* ---- the four phases; each does up to `budget` checks ---- */

/*  Entries and nodes in one walk, in the order the tree grew: each leaf
    is hashed and pushed; each node completed by it must be the hash of the
    two subtrees on top, which it then replaces (so every stored node is
    checked against its children, and level-1 nodes against the leaves'
    bytes; the last leaves, not yet under a node, are covered by the heads'
    roots).  A leaf is also decoded, once per start of the scrubber: its
    bytes are hashed by every pass, so one that decoded well stays so. */
static int
tree_leaf (void *arg, uint64_t seq, const uint8_t *leaf, size_t len)
{
    recon_t *self = arg;
    tly_entry e;
    if (!leaf) {
        fail (self, "entry %llu is missing", (unsigned long long) seq);
        return TLY_ECORRUPT;
    }
    if (seq >= self->decoded) {
        if (tly_leaf_decode (leaf, len, &e, NULL) || e.seq != seq) {
            fail (self, "entry %llu is not a canonical leaf for its seq",
                  (unsigned long long) seq);
            return TLY_ECORRUPT;
        }
        if (seq == self->decoded)
            self->decoded++;
    }
    assert (self->depth < 64);
    tly_merkle_leaf_hash (leaf, len, self->stack[self->depth]);
    self->stack_level[self->depth++] = 0;
    self->checked++;
    return TLY_OK;
}

static int
tree_node (void *arg, unsigned level, uint64_t index, const uint8_t *node)
{
    recon_t *self = arg;
    if (!node) {
        fail (self, "Merkle node (%u, %llu) is missing or malformed", level,
              (unsigned long long) index);
        return TLY_ECORRUPT;
    }
    /*  The walk passes a node right after the two subtrees it joins. */
    assert (self->depth >= 2 && self->stack_level[self->depth - 1] == level - 1
            && self->stack_level[self->depth - 2] == level - 1);
    uint8_t h[32];
    tly_merkle_node_hash (self->stack[self->depth - 2], self->stack[self->depth - 1], h);
    if (memcmp (h, node, 32)) {
        if (level == 1)
            fail (self, "entry %llu or %llu does not hash to what Merkle node (1, %llu) "
                        "holds", (unsigned long long) (2 * index),
                  (unsigned long long) (2 * index + 1), (unsigned long long) index);
        else
            fail (self, "Merkle node (%u, %llu) is not the hash of its children", level,
                  (unsigned long long) index);
        return TLY_ECORRUPT;
    }
    self->depth--;
    memcpy (self->stack[self->depth - 1], node, 32);
    self->stack_level[self->depth - 1] = (uint8_t) level;
    return TLY_OK;
}

/*  Budget: two checks a leaf (the leaf, and about one node). */
static size_t
check_tree (recon_t *self, size_t budget)
{
    uint64_t next = self->pos;
    int rc = tly_reader_tree_walk (self->reader, self->pos, self->size, budget / 2 + 1,
                                   tree_leaf, tree_node, self, &next);
    if (rc && !self->error[0])
        fail (self, "the entries or Merkle nodes cannot be read after entry %llu (%s)",
              (unsigned long long) next, tly_strerror (rc));
    size_t done = 2 * (size_t) (next - self->pos);
    self->pos = next;
    if (self->pos >= self->size) {
        self->phase = PH_DEDUP;
        self->pos = 0;
    }
    return done ? done : 1;
}

static int
check_dedup_one (recon_t *self, const dedup_rec *r)
{
    const uint8_t *leaf;
    size_t len;
    tly_entry e;
    uint8_t h[TLY_DEDUP_LEN];
    if (tly_reader_leaf (self->reader, r->seq, &leaf, &len)
    ||  tly_leaf_decode (leaf, len, &e, NULL)) {
        fail (self, "idempotency record names entry %llu, which cannot be read",
              (unsigned long long) r->seq);
        return TLY_ECORRUPT;
    }
    tly_store_dedup_hash (self->env->store, &e.ev.customer, &e.ev.key, h);
    if (memcmp (h, r->key, TLY_DEDUP_LEN)) {
        fail (self, "idempotency record for entry %llu does not match its (customer, key)",
              (unsigned long long) r->seq);
        return TLY_ECORRUPT;
    }
    return TLY_OK;
}

static int
collect_one (void *arg, const uint8_t dedup[TLY_DEDUP_LEN], uint64_t seq)
{
    recon_t *self = arg;
    assert (self->nbatch < self->batch_cap);    /* the scan was asked for no more */
    dedup_rec *r = &self->batch[self->nbatch++];
    r->seq = seq;
    memcpy (r->key, dedup, TLY_DEDUP_LEN);
    return TLY_OK;
}

static size_t
check_dedup (recon_t *self, size_t budget)
{
    if (!self->batch) {
        self->batch = malloc (DEDUP_BATCH * sizeof *self->batch);
        self->tmp = malloc (DEDUP_BATCH * sizeof *self->tmp);
        self->batch_cap = DEDUP_BATCH;
        if (!self->batch || !self->tmp) {
            free (self->batch);
            free (self->tmp);
            tly_warn (WHO, "no memory for the idempotency index check's batches (%zu MiB): "
                           "it checks %d records at a time, more slowly",
                      2 * DEDUP_BATCH * sizeof (dedup_rec) >> 20, DEDUP_SMALL);
            self->batch = self->small[0];
            self->tmp = self->small[1];
            self->batch_cap = DEDUP_SMALL;
        }
    }
    if (budget > self->batch_cap)
        budget = self->batch_cap;
    bool done = false;
    self->nbatch = 0;
    int rc = tly_reader_dedup_scan (self->reader, self->dedup_started ? self->dedup_last : NULL,
                                    budget, collect_one, self, self->dedup_last, &done);
    self->dedup_started = true;
    if (rc == TLY_ECORRUPT && !self->error[0])
        fail (self, "the idempotency index is corrupt: a malformed record, or a run whose "
                    "Bloom filter is missing or denies one of the run's keys");
    else
    if (rc && !self->error[0])
        fail (self, "the idempotency index cannot be read (%s)", tly_strerror (rc));
    if (!self->error[0])
        tly_sort_u64 (self->batch, self->tmp, self->nbatch, sizeof *self->batch);
    for (size_t i = 0; i < self->nbatch && !self->error[0]; i++)
        check_dedup_one (self, &self->batch[i]);
    if (done) {
        self->phase = PH_STHS;
        self->pos = 0;
    }
    return budget;
}

static int
check_sth_one (void *arg, const tly_sth *sth, tly_seal seal)
{
    recon_t *self = arg;
    uint8_t root[32];
    if (seal == TLY_SEAL_BAD) {
        fail (self, "the stored signed tree head for size %llu does not match its seal: "
                    "the record is corrupt", (unsigned long long) sth->tree_size);
        return TLY_ECORRUPT;
    }
    /*  A sealed head's bytes are covered by its seal, which shows it has
        not changed since it was written.  That it was right when written
        is checked in full (its signature, and its root against the nodes)
        for the pass's newest head, which also covers the last leaf when
        the tree's size is odd; for every head of an earlier format; and
        for one head in heads_full, a different one each pass, so that over
        heads_full passes every head is.  The rotation moves on only when
        a pass has checked every head: passes cut short (a `verify` call
        starts one of its own) must not skip a share of the heads. */
    /*  A head is stored in the commit that appends its entries, so in one
        snapshot no head is larger than the log: one that is means entries
        at the end were removed. */
    if (sth->tree_size > tly_reader_size (self->reader)) {
        fail (self, "a signed tree head covers %llu entries but the log holds %llu: entries "
                    "at its end were removed", (unsigned long long) sth->tree_size,
              (unsigned long long) tly_reader_size (self->reader));
        return TLY_ECORRUPT;
    }
    bool turn = (self->heads++ + self->rotation) % self->heads_full == 0;
    if (seal == TLY_SEAL_OK && sth->tree_size != self->size && !turn)
        return TLY_OK;
    if (tly_sth_verify (sth, self->env->pk)) {
        fail (self, "the signed tree head for size %llu does not verify with log.pub",
              (unsigned long long) sth->tree_size);
        return TLY_ECRYPTO;
    }
    int rc = tly_merkle_root (tly_reader_node, self->reader, NULL, sth->tree_size, root);
    if (rc || memcmp (root, sth->root, 32)) {
        fail (self, "the tree of size %llu does not match its signed head",
              (unsigned long long) sth->tree_size);
        return TLY_ECORRUPT;
    }
    return TLY_OK;
}

static size_t
check_sths (recon_t *self, size_t budget)
{
    bool done = false;
    int rc = tly_reader_sth_scan (self->reader, self->pos, budget, check_sth_one, self,
                                  &self->pos, &done);
    if (rc && !self->error[0])
        fail (self, "the signed tree heads cannot be read (%s)", tly_strerror (rc));
    if (done) {
        tly_sth latest;
        if (tly_reader_sth (self->reader, UINT64_MAX, &latest) == 0
        &&  latest.tree_size < self->size)
            fail (self, "the latest signed head (size %llu) is older than the log (%llu)",
                  (unsigned long long) latest.tree_size, (unsigned long long) self->size);
        self->phase = PH_DONE;
        self->rotation++;
    }
    return budget;
}

/* ---- passes ---- */

static void
pass_finish (recon_t *self)
{
    self->last.ok = self->error[0] == 0;
    self->last.at = tly_now_ms ();
    self->last.checked = self->checked;
    self->last.duration_ms = (uint64_t) (zclock_mono () - self->started);
    if (self->last.duration_ms > (uint64_t) self->env->verify_interval_s * 1000
    &&  !self->verify_call && !self->slow_warned) {
        tly_warn (WHO, "a full verification pass took %llu s, longer than --verify-interval "
                       "(%u s), within --verify-cpu %u%%: corruption may be found later than "
                       "the interval promises. Raise --verify-cpu or --verify-interval%s",
                  (unsigned long long) self->last.duration_ms / 1000,
                  self->env->verify_interval_s, self->env->verify_cpu,
                  self->env->verify_nice >= 20
                  ? "; if the cores are busy, --verify-nice 19 gives the scrubber a share of "
                    "them (by default it only has their idle time)" : "");
        self->slow_warned = true;
    }
    snprintf (self->last.error, sizeof self->last.error, "%s", self->error);
    if (self->error[0]) {
        /*  Say it once, then at most every ten minutes while it persists. */
        if (strcmp (self->logged, self->error) || zclock_mono () - self->last_logged > 600000) {
            tly_error (WHO, "CORRUPTION in %s: %s. Stop writing to this ledger, keep a copy "
                            "of the data dir, and restore from a backup or replica",
                       tly_store_data_path (self->env->store), self->error);
            snprintf (self->logged, sizeof self->logged, "%s", self->error);
            self->last_logged = zclock_mono ();
        }
    }
    else {
        self->logged[0] = 0;
        tly_debug (WHO, "pass complete: %llu entries verified", (unsigned long long) self->checked);
    }
}

/*  One slice of the current pass; returns true when the pass ended. */
static bool
slice (recon_t *self, size_t budget)
{
    if (tly_reader_begin (self->reader)) {
        fail (self, "cannot open a read snapshot");
        pass_finish (self);
        return true;
    }
    size_t done = 0;
    while (done < budget && self->phase != PH_DONE && !self->error[0]) {
        size_t left = budget - done;
        switch (self->phase) {
            case PH_TREE:    done += check_tree (self, left); break;
            case PH_DEDUP:   done += check_dedup (self, left); break;
            case PH_STHS:    done += check_sths (self, left); break;
            case PH_DONE:    break;
        }
    }
    tly_reader_end (self->reader);
    if (self->phase == PH_DONE || self->error[0]) {
        pass_finish (self);
        return true;
    }
    return false;
}

/*  Checks per tick so that a pass (about 3 checks per entry, and the
    heads) takes half the interval. */
static size_t
paced_budget (recon_t *self)
{
    uint64_t ticks = (uint64_t) self->env->verify_interval_s * 1000 / TICK_MS / 2;
    uint64_t work = 3 * self->size + 1000;
    uint64_t b = ticks ? work / ticks + 1 : work;
    return b < 1000 ? 1000 : (size_t) b;
}

/* ---- CPU priority ---- */

/*  Moves this thread into the idle class or back to the normal one,
    keeping its nice; returns 0 or an errno. */
static int
set_idle (bool idle)
{
#if defined(__linux__)
    struct sched_param param = { 0 };
    return sched_setscheduler (0, idle ? SCHED_IDLE : SCHED_OTHER, &param) ? errno : 0;
#else
    (void) idle;
    return ENOSYS;
#endif
}

/*  Lowers this thread's CPU priority by `by` (Linux: nice is per thread,
    and each thread starts with tallyd's), at most to 19, so that on busy
    cores the actors serving requests run first.  `by` 20 (the default)
    also puts it in the idle class (SCHED_IDLE): it runs on CPU time that
    no other thread wants, and a waking actor takes its core at once.  At
    nice 19 it kept a share of busy cores: on S1 at 50-76M entries it used
    0.23-0.34 us of CPU per ingested event, against 0.13-0.20 idle, and
    the service ingested about 6% less (bench/RESULTS.md, eighteenth
    session).  Either way it gets --verify-cpu of a core while a core is
    idle.  Returns true when the thread is in the idle class. */
static bool
lower_priority (unsigned by)
{
#if defined(__linux__)
    id_t tid = (id_t) syscall (SYS_gettid);
    errno = 0;
    int now = getpriority (PRIO_PROCESS, tid);
    if (by == 0 || (now == -1 && errno))
        return false;
    int want = now + (int) by > 19 ? 19 : now + (int) by;
    if (want > now && setpriority (PRIO_PROCESS, tid, want))
        tly_warn (WHO, "cannot lower the scrubber's priority to nice %d (%s); it runs at "
                       "the actors' priority", want, strerror (errno));
    if (by < 20)
        return false;
    int err = set_idle (true);
    if (err)
        tly_warn (WHO, "cannot put the scrubber in the idle CPU class (%s); it runs at "
                       "nice %d", strerror (err), want);
    return err == 0;
#else
    (void) by;
    return false;
#endif
}

/*  An operator who calls `verify` waits for its pass, so the pass does not
    wait for idle CPU: the thread leaves the idle class for nice 19 (where
    the scrubber ran before it had the idle class) and goes back when the
    pass ends.  Linux counts the idle class as nice 20 and lets a thread
    leave it only within its RLIMIT_NICE (1 allows nice 19) or with
    CAP_SYS_NICE; without either, the pass stays idle and the log says
    how to allow it.  Going back to the idle class needs no privilege. */
static void
verify_priority (recon_t *self, bool starting)
{
    if (!self->idle || starting == self->raised)
        return;
    int err = set_idle (!starting);
    if (starting && err == 0)
        tly_info (WHO, "verify: a full pass at nice 19, out of the idle CPU class until it "
                       "ends");
    else if (starting)
        tly_warn (WHO, "verify: the pass stays in the idle CPU class (%s), so on busy cores "
                       "it waits for idle CPU. To let it run at nice 19, allow nice 19 to "
                       "tallyd: ulimit -e 1 before starting it, LimitNICE=+19 in a systemd "
                       "unit, or CAP_SYS_NICE", strerror (err));
    else if (err)
        tly_warn (WHO, "cannot return the scrubber to the idle CPU class after a verify "
                       "(%s); it runs at nice 19", strerror (err));
    self->raised = starting && err == 0;
}

/* ---- calls ---- */

static void
pack_result (const result_t *r, tly_buf *out)
{
    msgpack_packer pk;
    tly_buf_packer (out, &pk);
    msgpack_pack_map (&pk, 5);
    tly_pack_cstr (&pk, "ok");
    r->ok ? msgpack_pack_true (&pk) : msgpack_pack_false (&pk);
    tly_pack_cstr (&pk, "at");
    msgpack_pack_uint64 (&pk, r->at);
    tly_pack_cstr (&pk, "checked");
    msgpack_pack_uint64 (&pk, r->checked);
    tly_pack_cstr (&pk, "duration_ms");
    msgpack_pack_uint64 (&pk, r->duration_ms);
    tly_pack_cstr (&pk, "error");
    tly_pack_cstr (&pk, r->error);
}

static void
reply_result (recon_t *self)
{
    tly_buf b;
    tly_buf_init (&b);
    pack_result (&self->last, &b);
    zmsg_t *reply = zmsg_new ();
    zmsg_addmem (reply, b.data, b.len);
    tly_child_reply (self->ctx, &reply);
    tly_buf_free (&b);
}

static void
on_call (recon_t *self, zmsg_t **call)
{
    char *what = zmsg_popstr (*call);
    if (what && streq (what, "verify") && !self->verify_call) {
        self->verify_call = *call;      /* answered when the full pass ends */
        *call = NULL;
        verify_priority (self, true);
        pass_start (self);
    }
    else
        reply_result (self);
    free (what);
    zmsg_destroy (call);
}

int
tly_reconcile_actor (tly_child_ctx *ctx, void *args)
{
    tly_actor_env *env = args;
    recon_t self = { .ctx = ctx, .env = env, .last = { .ok = true } };
    self.heads_full = tly_env_u64 (WHO, "TALLY_HEADS_FULL", HEADS_FULL, 1, HEADS_FULL_MAX);
    /*  Counted from 0 at every start, the passes would check the same
        heads in full after each restart: a tallyd restarted more often
        than heads_full passes take would never check the others. */
    self.rotation = randombytes_uniform ((uint32_t) self.heads_full);
    self.idle = lower_priority (env->verify_nice);
    if (tly_reader_new (env->store, &self.reader)) {
        tly_error (WHO, "cannot start: out of memory");
        return 1;
    }
    pass_start (&self);
    tly_child_ready (ctx);
    zpoller_t *poller = zpoller_new (tly_child_pipe (ctx), NULL);
    /*  Slices run on a deadline, not on poll timeouts: callers asking for
        status often must not stall the scrub. */
    int64_t next_slice = zclock_mono ();
    while (true) {
        int64_t wait = self.verify_call ? 0 : next_slice - zclock_mono ();
        void *which = zpoller_wait (poller, wait > 0 ? (int) wait : 0);
        if (which == tly_child_pipe (ctx)) {
            zmsg_t *call = NULL;
            int r = tly_child_recv (ctx, &call);
            if (r == TLY_CHILD_TERM)
                break;
            if (r == TLY_CHILD_CALL)
                on_call (&self, &call);
        }
        if (!self.verify_call && zclock_mono () < next_slice)
            continue;
        int64_t t0 = zclock_mono ();
        bool ended = slice (&self, self.verify_call ? FAST_SLICE : paced_budget (&self));
        /*  Rest in proportion to the work, so that the scrub stays within
            --verify-cpu percent of a core. */
        int64_t spent = zclock_mono () - t0, rest = spent * (100 - (int64_t) env->verify_cpu)
                                                  / (int64_t) env->verify_cpu;
        next_slice = zclock_mono () + (rest > TICK_MS ? rest : TICK_MS);
        if (ended) {
            if (self.verify_call) {
                zmsg_destroy (&self.verify_call);
                reply_result (&self);
                verify_priority (&self, false);
            }
            pass_start (&self);
        }
    }
    zmsg_destroy (&self.verify_call);
    zpoller_destroy (&poller);
    tly_reader_destroy (&self.reader);
    if (self.batch != self.small[0]) {
        free (self.batch);
        free (self.tmp);
    }
    return 0;
}
