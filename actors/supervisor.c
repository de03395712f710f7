/*  supervisor.c -- an Erlang/OTP-style supervisor for actor threads.

    Three kinds of thread meet here:
    - the owner calls tly_sup_*: each call is one request on the zactor pipe
      and gets one reply echoing the request's sequence number, so a reply
      the owner stopped waiting for (a call that timed out) is recognised
      and dropped instead of answering the next request;
    - the supervisor thread (the zactor) alone touches s_sup and s_child;
    - each child thread runs spec->fn through s_child_main and shares its
      tly_child_ctx with the supervisor only at start, exit and abandonment
      (the `fate` flag decides who frees it).

    Owner <-> supervisor (zactor pipe), string frames:
      owner -> sup   cmd seq args...   WHICH | COUNT | TERMINATE name |
                                       RESTART name | CALL name timeout frames...
                     "$TERM"           from zactor_destroy
      sup -> owner   seq status payload...   (seq 0: the start-up result)
    Supervisor <-> child: as in supervisor.h, with a call id frame after
    CALL and after REPLY.  Each child generation gets a fresh pipe with its
    own inproc endpoint, so nothing an old generation sent can reach the
    supervisor as if from the new one.
*/
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif
#include "supervisor.h"
#include "tally/log.h"

#define S_NAME_MAX 31
/*  How long a child thread may block handing a message to its supervisor.
    The supervisor drains pipes promptly; this only bites a child whose
    supervisor gave up on it and closed its end: it must not block forever. */
#define S_CHILD_SNDTIMEO 1000
#define S_NONE ((size_t) -1)

const tly_sup_config tly_sup_default_config = {
    .strategy = TLY_ONE_FOR_ONE,
    .intensity = 5,
    .period_ms = 30000,
    .heartbeat_ms = 1000,
    .heartbeat_timeout_ms = 5000,
};

static atomic_size_t s_orphans;

static const char *s_state_names [] = { "running", "restarting", "terminated" };
static const char *s_restart_names [] = { "permanent", "transient", "temporary" };

const char *
tly_strategy_name (tly_strategy s)
{
    switch (s) {
        case TLY_ONE_FOR_ONE:  return "one_for_one";
        case TLY_ONE_FOR_ALL:  return "one_for_all";
        case TLY_REST_FOR_ONE: return "rest_for_one";
        default:               return "unknown";
    }
}

const char *
tly_child_state_name (tly_child_state s)
{
    if ((unsigned) s < sizeof s_state_names / sizeof s_state_names [0])
        return s_state_names [s];
    return "unknown";
}

size_t
tly_sup_orphans (void)
{
    return atomic_load (&s_orphans);
}

/*  One line on stderr through the project's logger, so operators read one
    format from every part of tallyd. */
static void
s_log (char level, const char *format, ...)
{
    char text [512];
    va_list args;
    va_start (args, format);
    vsnprintf (text, sizeof text, format, args);
    va_end (args);
    tly_log (level == 'E' ? TLY_LOG_ERROR : level == 'W' ? TLY_LOG_WARN : TLY_LOG_INFO,
             "supervisor", "%s", text);
}

/*  "30s" or "1500ms", for operators. */
static const char *
s_span (unsigned ms, char *buf, size_t size)
{
    if (ms % 1000 == 0)
        snprintf (buf, size, "%us", ms / 1000);
    else
        snprintf (buf, size, "%ums", ms);
    return buf;
}

/* ======================================================================
   The child's side: its context and the calls a child function makes.
   ====================================================================== */

/*  Who frees a child's context: the supervisor after joining the thread
    (LIVE -> RETURNED, then EXIT), or the thread itself if the supervisor
    abandoned it first (LIVE -> ORPHANED).  One atomic exchange on each
    side decides, so exactly one of them does. */
enum { FATE_LIVE, FATE_RETURNED, FATE_ORPHANED };

typedef struct {
    char name [S_NAME_MAX + 1];
    tly_child_state state;
} s_peer;

struct tly_child_ctx {
    const tly_child_spec *spec;
    zsock_t *pipe;              /*  the child's end                          */
    atomic_int fate;
    bool ready;
    bool in_call;               /*  a CALL waits for tly_child_reply         */
    char call_id [16];
    s_peer *peers;              /*  last state told for each peer            */
    size_t npeers, maxpeers;
};

static tly_child_ctx *
s_ctx_new (const tly_child_spec *spec, zsock_t *pipe, size_t maxpeers)
{
    tly_child_ctx *ctx = calloc (1, sizeof *ctx);
    if (!ctx)
        return NULL;
    ctx->peers = calloc (maxpeers ? maxpeers : 1, sizeof (s_peer));
    if (!ctx->peers) {
        free (ctx);
        return NULL;
    }
    ctx->spec = spec;
    ctx->pipe = pipe;
    ctx->maxpeers = maxpeers;
    atomic_init (&ctx->fate, FATE_LIVE);
    return ctx;
}

static void
s_ctx_destroy (tly_child_ctx **ctx_p)
{
    tly_child_ctx *ctx = *ctx_p;
    if (!ctx)
        return;
    zsock_destroy (&ctx->pipe);
    free (ctx->peers);
    free (ctx);
    *ctx_p = NULL;
}

/*  "tly-<child>" in top -H, perf and /proc/<pid>/task/<tid>/comm. */
static void
s_name_thread (const char *child)
{
#if defined(__linux__)
    char name[16];
    snprintf (name, sizeof name, "tly-%s", child);
    prctl (PR_SET_NAME, name, 0, 0, 0);
#else
    (void) child;
#endif
}

static void *
s_child_main (void *arg)
{
    tly_child_ctx *ctx = arg;
    s_name_thread (ctx->spec->name);
    int rc = ctx->spec->fn (ctx, ctx->spec->args);
    if (atomic_exchange (&ctx->fate, FATE_RETURNED) == FATE_ORPHANED) {
        s_ctx_destroy (&ctx);
        atomic_fetch_sub (&s_orphans, 1);
        return NULL;
    }
    zsock_send (ctx->pipe, "si", "EXIT", rc);
    return NULL;
}

zsock_t *
tly_child_pipe (tly_child_ctx *ctx)
{
    assert (ctx);
    return ctx->pipe;
}

const char *
tly_child_name (tly_child_ctx *ctx)
{
    assert (ctx);
    return ctx->spec->name;
}

void
tly_child_ready (tly_child_ctx *ctx)
{
    assert (ctx);
    if (ctx->ready)
        return;
    ctx->ready = true;
    zstr_send (ctx->pipe, "READY");
}

static s_peer *
s_ctx_peer (tly_child_ctx *ctx, const char *name)
{
    for (size_t k = 0; k < ctx->npeers; k++)
        if (streq (ctx->peers [k].name, name))
            return &ctx->peers [k];
    return NULL;
}

static void
s_ctx_note_peer (tly_child_ctx *ctx, zmsg_t *msg)
{
    char *name = zmsg_popstr (msg);
    char *state = zmsg_popstr (msg);
    if (name && state && strlen (name) <= S_NAME_MAX) {
        s_peer *peer = s_ctx_peer (ctx, name);
        if (!peer && ctx->npeers < ctx->maxpeers) {
            peer = &ctx->peers [ctx->npeers++];
            strcpy (peer->name, name);
        }
        for (size_t s = 0; peer && s < 3; s++)
            if (streq (state, s_state_names [s]))
                peer->state = (tly_child_state) s;
    }
    free (name);
    free (state);
}

static int
s_ctx_take_call (tly_child_ctx *ctx, zmsg_t **msg_p, zmsg_t **call)
{
    char *id = zmsg_popstr (*msg_p);
    if (!id)
        return TLY_CHILD_NONE;
    snprintf (ctx->call_id, sizeof ctx->call_id, "%s", id);
    free (id);
    ctx->in_call = true;        /*  a newer call replaces an unanswered one */
    if (!call) {
        tly_child_reply (ctx, NULL);
        return TLY_CHILD_NONE;
    }
    *call = *msg_p;
    *msg_p = NULL;
    return TLY_CHILD_CALL;
}

int
tly_child_recv (tly_child_ctx *ctx, zmsg_t **call)
{
    assert (ctx);
    if (call)
        *call = NULL;
    zmsg_t *msg = zmsg_recv (ctx->pipe);
    if (!msg)
        return TLY_CHILD_TERM;
    char *cmd = zmsg_popstr (msg);
    int rc = TLY_CHILD_NONE;
    if (!cmd)
        ;
    else if (streq (cmd, "$TERM"))
        rc = TLY_CHILD_TERM;
    else if (streq (cmd, "PING"))
        zstr_send (ctx->pipe, "PONG");
    else if (streq (cmd, "PEER"))
        s_ctx_note_peer (ctx, msg);
    else if (streq (cmd, "CALL"))
        rc = s_ctx_take_call (ctx, &msg, call);
    free (cmd);
    zmsg_destroy (&msg);
    return rc;
}

int
tly_child_reply (tly_child_ctx *ctx, zmsg_t **reply)
{
    assert (ctx);
    zmsg_t *msg = reply && *reply ? *reply : zmsg_new ();
    if (reply)
        *reply = NULL;
    if (!msg)
        return TLY_ENOMEM;
    if (!ctx->in_call) {
        zmsg_destroy (&msg);
        return TLY_EINVAL;
    }
    ctx->in_call = false;
    zmsg_pushstr (msg, ctx->call_id);
    zmsg_pushstr (msg, "REPLY");
    return zmsg_send (&msg, ctx->pipe) == 0 ? TLY_OK : TLY_EUNAVAIL;
}

tly_child_state
tly_child_peer_state (tly_child_ctx *ctx, const char *peer)
{
    assert (ctx);
    s_peer *found = peer ? s_ctx_peer (ctx, peer) : NULL;
    return found ? found->state : TLY_CHILD_RUNNING;
}

/* ======================================================================
   The supervisor thread.
   ====================================================================== */

typedef struct {
    const tly_child_spec *spec;
    tly_child_state state;      /*  public state                             */
    uint64_t since;
    uint64_t restarts;
    bool started;               /*  started once: later starts are restarts  */
    bool awaiting;              /*  "restarting" without a thread yet        */
    tly_child_ctx *ctx;         /*  non-NULL while its thread exists         */
    pthread_t thread;
    zsock_t *pipe;              /*  supervisor's end, this generation        */
    unsigned gen;               /*  bumped at each launch                    */
    bool ping_out;              /*  a PING is unanswered since ping_at       */
    int64_t ping_at;
} s_child;

typedef struct {
    tly_sup_config cfg;
    const tly_child_spec *specs;
    size_t n;
    zsock_t *events;            /*  handed to the supervisor thread          */
} s_args;

typedef struct {
    zsock_t *pipe;              /*  to the owner                             */
    zsock_t *events;            /*  ESCALATE goes out here                   */
    tly_sup_config cfg;
    s_child *children;
    size_t n;
    int64_t *window;            /*  mono ms of recent automatic restarts     */
    size_t nwindow, capwindow;
    bool failed;                /*  escalated or never started: refuse all   */
    bool terminated;            /*  $TERM from the owner                     */
    int64_t next_ping;
    unsigned next_call_id;
    struct {
        bool active;
        uint32_t seq;           /*  the owner's request to answer            */
        size_t child;
        unsigned id;
        int64_t deadline;
    } call;
    zmq_pollitem_t *items;      /*  poll set: owner pipe, then child pipes   */
    size_t *item_child;
    unsigned *item_gen;
} s_sup;

static bool
s_is_running (const s_child *c)
{
    return c->ctx && c->state == TLY_CHILD_RUNNING;
}

static size_t
s_find (s_sup *self, const char *name)
{
    for (size_t k = 0; name && k < self->n; k++)
        if (streq (self->children [k].spec->name, name))
            return k;
    return S_NONE;
}

/*  Answers the owner's request `seq`; takes the payload if any. */
static void
s_answer (s_sup *self, uint32_t seq, int status, zmsg_t **payload_p)
{
    zmsg_t *msg = payload_p && *payload_p ? *payload_p : zmsg_new ();
    if (payload_p)
        *payload_p = NULL;
    zmsg_pushstrf (msg, "%d", status);
    zmsg_pushstrf (msg, "%u", (unsigned) seq);
    zmsg_send (&msg, self->pipe);
}

/*  The pending call can no longer be answered by its child (k, or any
    child for S_NONE): tell the owner now rather than at its deadline. */
static void
s_fail_call (s_sup *self, size_t k)
{
    if (self->call.active && (k == S_NONE || self->call.child == k)) {
        self->call.active = false;
        s_answer (self, self->call.seq, TLY_EUNAVAIL, NULL);
    }
}

/*  The child's state changes: every other running child hears of it. */
static void
s_set_state (s_sup *self, size_t k, tly_child_state state)
{
    s_child *c = &self->children [k];
    if (c->state == state)
        return;
    c->state = state;
    c->since = tly_now_ms ();
    for (size_t j = 0; j < self->n; j++)
        if (j != k && s_is_running (&self->children [j]))
            zstr_sendx (self->children [j].pipe, "PEER", c->spec->name,
                        tly_child_state_name (state), NULL);
}

/*  A child that just became READY learns where every other child stands
    (children never started yet are left out: they announce themselves). */
static void
s_tell_peers (s_sup *self, size_t k)
{
    s_child *c = &self->children [k];
    for (size_t j = 0; j < self->n; j++) {
        s_child *peer = &self->children [j];
        if (j != k && peer->started)
            zstr_sendx (c->pipe, "PEER", peer->spec->name,
                        tly_child_state_name (peer->state), NULL);
    }
}

/* ---- threads: launch, join, abandon ---------------------------------- */

static int
s_launch (s_sup *self, size_t k)
{
    s_child *c = &self->children [k];
    zsock_t *back = NULL;
    zsock_t *front = zsys_create_pipe (&back);
    if (!front)
        return TLY_ENOMEM;
    zsock_set_sndtimeo (front, 0);      /*  never block on a stuck child */
    zsock_set_sndtimeo (back, S_CHILD_SNDTIMEO);
    tly_child_ctx *ctx = s_ctx_new (c->spec, back, self->n);
    if (!ctx) {
        zsock_destroy (&back);
        zsock_destroy (&front);
        return TLY_ENOMEM;
    }
    if (pthread_create (&c->thread, NULL, s_child_main, ctx) != 0) {
        s_ctx_destroy (&ctx);
        zsock_destroy (&front);
        return TLY_ENOMEM;
    }
    c->ctx = ctx;
    c->pipe = front;
    c->gen++;
    c->ping_out = false;
    if (c->started)
        c->restarts++;
    c->started = true;
    return TLY_OK;
}

/*  The thread has returned (EXIT seen, or fate RETURNED): join and free. */
static void
s_reap (s_child *c)
{
    pthread_join (c->thread, NULL);
    s_ctx_destroy (&c->ctx);
    zsock_destroy (&c->pipe);
    c->ping_out = false;
}

/*  Gives up on a thread that will not exit: it frees its own context if it
    ever returns.  False if it had in fact just returned (then reaped). */
static bool
s_abandon (s_child *c)
{
    atomic_fetch_add (&s_orphans, 1);
    if (atomic_exchange (&c->ctx->fate, FATE_ORPHANED) == FATE_RETURNED) {
        atomic_fetch_sub (&s_orphans, 1);
        s_reap (c);
        return false;
    }
    pthread_detach (c->thread);
    c->ctx = NULL;
    zsock_destroy (&c->pipe);
    c->ping_out = false;
    return true;
}

/*  Next message from child c before `deadline` (mono ms), or NULL. */
static zmsg_t *
s_recv_until (s_child *c, int64_t deadline)
{
    while (true) {
        int64_t wait = deadline - zclock_mono ();
        if (wait < 0)
            wait = 0;
        zmq_pollitem_t item = { zsock_resolve (c->pipe), 0, ZMQ_POLLIN, 0 };
        int rc = zmq_poll (&item, 1, (long) wait);
        if (rc > 0) {
            zmsg_t *msg = zmsg_recv (c->pipe);
            if (msg)
                return msg;
        }
        else
        if (rc == 0 || errno != EINTR)
            return NULL;
        if (wait == 0)
            return NULL;
    }
}

/* ---- messages from children ------------------------------------------ */

static void
s_on_reply (s_sup *self, size_t k, zmsg_t **msg_p)
{
    char *id = zmsg_popstr (*msg_p);
    bool current = id && self->call.active && self->call.child == k
                && strtoul (id, NULL, 10) == self->call.id;
    free (id);
    if (!current)
        return;                 /*  late: its caller has gone */
    self->call.active = false;
    s_answer (self, self->call.seq, TLY_OK, msg_p);
}

/*  Anything but EXIT and READY. */
static void
s_on_chatter (s_sup *self, size_t k, const char *cmd, zmsg_t **msg_p)
{
    if (!cmd)
        return;
    if (streq (cmd, "PONG"))
        self->children [k].ping_out = false;
    else
    if (streq (cmd, "REPLY"))
        s_on_reply (self, k, msg_p);
}

/*  Sends $TERM and waits shutdown_ms for EXIT.  False if the thread had
    to be abandoned. */
static bool
s_stop_thread (s_sup *self, size_t k)
{
    s_child *c = &self->children [k];
    zstr_send (c->pipe, "$TERM");
    int64_t deadline = zclock_mono () + c->spec->shutdown_ms;
    zmsg_t *msg;
    while ((msg = s_recv_until (c, deadline))) {
        char *cmd = zmsg_popstr (msg);
        bool exited = cmd && streq (cmd, "EXIT");
        if (!exited)
            s_on_chatter (self, k, cmd, &msg);
        free (cmd);
        zmsg_destroy (&msg);
        if (exited) {
            s_reap (c);
            return true;
        }
    }
    if (!s_abandon (c))
        return true;
    s_log ('E', "child %s did not exit within %u ms of $TERM; "
           "abandoning its thread", c->spec->name, c->spec->shutdown_ms);
    return false;
}

/*  Stops child k if it runs and gives it `state`.  TLY_ETIMEOUT if it had
    to be abandoned: the caller escalates. */
static int
s_stop_child (s_sup *self, size_t k, tly_child_state state)
{
    s_child *c = &self->children [k];
    bool exited = c->ctx ? s_stop_thread (self, k) : true;
    c->awaiting = false;
    s_fail_call (self, k);
    s_set_state (self, k, state);
    return exited ? TLY_OK : TLY_ETIMEOUT;
}

/*  Launches child k and waits shutdown_ms for READY.  TLY_OK: running;
    TLY_EUNAVAIL: it failed to start and is gone; TLY_ETIMEOUT: it failed
    and its thread had to be abandoned.  The state is left as it was on
    failure: the caller decides. */
static int
s_start_child (s_sup *self, size_t k)
{
    s_child *c = &self->children [k];
    int rc = s_launch (self, k);
    if (rc != TLY_OK) {
        s_log ('E', "cannot start child %s: %s", c->spec->name, tly_strerror (rc));
        return TLY_EUNAVAIL;
    }
    int64_t deadline = zclock_mono () + c->spec->shutdown_ms;
    zmsg_t *msg;
    while ((msg = s_recv_until (c, deadline))) {
        char *cmd = zmsg_popstr (msg);
        char *status = zmsg_popstr (msg);
        bool ready = cmd && streq (cmd, "READY");
        bool exited = cmd && streq (cmd, "EXIT");
        int code = status ? atoi (status) : -1;
        free (cmd);
        free (status);
        zmsg_destroy (&msg);
        if (ready) {
            s_set_state (self, k, TLY_CHILD_RUNNING);
            s_tell_peers (self, k);
            return TLY_OK;
        }
        if (exited) {
            s_reap (c);
            s_log ('W', "child %s exited with status %d before it was ready",
                   c->spec->name, code);
            return TLY_EUNAVAIL;
        }
    }
    s_log ('W', "child %s was not ready within %u ms; stopping it",
           c->spec->name, c->spec->shutdown_ms);
    return s_stop_thread (self, k) ? TLY_EUNAVAIL : TLY_ETIMEOUT;
}

/* ---- failures, strategies, intensity, escalation --------------------- */

static void
s_escalate (s_sup *self, const char *reason)
{
    if (self->failed)
        return;
    self->failed = true;
    s_log ('E', "escalating: %s; stopping all children", reason);
    for (size_t k = self->n; k-- > 0; )
        s_stop_child (self, k, TLY_CHILD_TERMINATED);
    s_fail_call (self, S_NONE);
    zstr_sendx (self->events, "ESCALATE", reason, NULL);
}

static void
s_escalate_stuck (s_sup *self, size_t k)
{
    char reason [160];
    snprintf (reason, sizeof reason, "child %s did not exit within %u ms of $TERM",
              self->children [k].spec->name, self->children [k].spec->shutdown_ms);
    s_escalate (self, reason);
}

/*  Records one automatic restart; returns how many fall within period_ms,
    this one included. */
static size_t
s_note_restart (s_sup *self)
{
    int64_t now = zclock_mono ();
    size_t keep = 0;
    for (size_t k = 0; k < self->nwindow; k++)
        if (now - self->window [k] < (int64_t) self->cfg.period_ms)
            self->window [keep++] = self->window [k];
    self->nwindow = keep;
    if (self->nwindow == self->capwindow) {
        size_t cap = self->capwindow ? self->capwindow * 2 : 8;
        int64_t *grown = realloc (self->window, cap * sizeof *grown);
        if (!grown)
            return self->nwindow + 1;   /*  still counted, just not kept */
        self->window = grown;
        self->capwindow = cap;
    }
    self->window [self->nwindow++] = now;
    return self->nwindow;
}

/*  Counts an automatic restart of child k; escalates (and returns false)
    when that is one more than intensity allows. */
static bool
s_may_restart (s_sup *self, size_t k, const char *why)
{
    const char *name = self->children [k].spec->name;
    size_t count = s_note_restart (self);
    char span [24];
    s_span (self->cfg.period_ms, span, sizeof span);
    if (count > self->cfg.intensity) {
        char reason [200];
        snprintf (reason, sizeof reason, "more than %u restarts within %s "
                  "(last: child %s %s)", self->cfg.intensity, span, name, why);
        s_escalate (self, reason);
        return false;
    }
    s_log ('W', "child %s %s; restarting (%zu of %u in %s)",
           name, why, count, self->cfg.intensity, span);
    return true;
}

/*  Starts, in order, every child waiting to restart.  Stops at the first
    that fails to start: later children may depend on it, and it stays
    "restarting" for s_on_timers to retry. */
static void
s_start_awaiting (s_sup *self)
{
    for (size_t k = 0; k < self->n && !self->failed; k++) {
        s_child *c = &self->children [k];
        if (!c->awaiting)
            continue;
        int rc = s_start_child (self, k);
        if (rc == TLY_OK)
            c->awaiting = false;
        else {
            if (rc == TLY_ETIMEOUT)
                s_escalate_stuck (self, k);
            return;
        }
    }
}

/*  one_for_all / rest_for_one: stops the running siblings of the failed
    child k in reverse order.  Temporary ones end there; the others wait to
    restart with k. */
static void
s_stop_siblings (s_sup *self, size_t k)
{
    if (self->cfg.strategy == TLY_ONE_FOR_ONE)
        return;
    size_t first = self->cfg.strategy == TLY_ONE_FOR_ALL ? 0 : k + 1;
    for (size_t j = self->n; j-- > first; ) {
        s_child *sib = &self->children [j];
        if (j == k || !sib->ctx)
            continue;
        bool temporary = sib->spec->restart == TLY_TEMPORARY;
        if (s_stop_child (self, j, temporary ? TLY_CHILD_TERMINATED
                                             : TLY_CHILD_RESTARTING) != TLY_OK) {
            s_escalate_stuck (self, j);
            return;
        }
        sib->awaiting = !temporary;
    }
}

static bool
s_wants_restart (tly_restart_type type, bool abnormal)
{
    return type == TLY_PERMANENT || (type == TLY_TRANSIENT && abnormal);
}

/*  Child k's thread is gone on its own (or after missing heartbeats). */
static void
s_on_exit (s_sup *self, size_t k, bool abnormal, const char *why)
{
    s_child *c = &self->children [k];
    s_fail_call (self, k);
    if (!s_wants_restart (c->spec->restart, abnormal)) {
        s_log ('I', "child %s %s; not restarted (%s)", c->spec->name, why,
               s_restart_names [c->spec->restart]);
        s_set_state (self, k, TLY_CHILD_TERMINATED);
        return;
    }
    s_set_state (self, k, TLY_CHILD_RESTARTING);
    c->awaiting = true;
    if (!s_may_restart (self, k, why))
        return;
    s_stop_siblings (self, k);
    s_start_awaiting (self);
}

static void
s_on_hung (s_sup *self, size_t k)
{
    s_child *c = &self->children [k];
    s_log ('W', "child %s missed its heartbeat for %u ms; stopping it",
           c->spec->name, self->cfg.heartbeat_timeout_ms);
    if (!s_stop_thread (self, k)) {
        s_fail_call (self, k);
        s_set_state (self, k, TLY_CHILD_TERMINATED);
        s_escalate_stuck (self, k);
        return;
    }
    s_on_exit (self, k, true, "missed its heartbeat");
}

static void
s_on_child_msg (s_sup *self, size_t k, zmsg_t **msg_p)
{
    char *cmd = zmsg_popstr (*msg_p);
    if (cmd && streq (cmd, "EXIT")) {
        char *status = zmsg_popstr (*msg_p);
        int code = status ? atoi (status) : -1;
        free (status);
        s_reap (&self->children [k]);
        char why [48];
        if (code == 0)
            snprintf (why, sizeof why, "exited normally");
        else
            snprintf (why, sizeof why, "exited with status %d", code);
        s_on_exit (self, k, code != 0, why);
    }
    else
        s_on_chatter (self, k, cmd, msg_p);
    free (cmd);
}

/*  Handles whatever child k's current generation has sent. */
static void
s_drain (s_sup *self, size_t k)
{
    s_child *c = &self->children [k];
    unsigned gen = c->gen;
    while (c->ctx && c->gen == gen && (zsock_events (c->pipe) & ZMQ_POLLIN)) {
        zmsg_t *msg = zmsg_recv (c->pipe);
        if (!msg)
            break;
        s_on_child_msg (self, k, &msg);
        zmsg_destroy (&msg);
    }
}

/* ---- heartbeats and timers ------------------------------------------- */

static void
s_check_heartbeats (s_sup *self)
{
    int64_t timeout = self->cfg.heartbeat_timeout_ms;
    for (size_t k = 0; k < self->n && !self->failed; k++) {
        s_child *c = &self->children [k];
        if (!s_is_running (c) || !c->ping_out
        ||  zclock_mono () - c->ping_at < timeout)
            continue;
        /*  Its PONG may be queued while this thread was busy restarting
            another child: that must not count against it. */
        s_drain (self, k);
        if (s_is_running (c) && c->ping_out && zclock_mono () - c->ping_at >= timeout)
            s_on_hung (self, k);
    }
    int64_t now = zclock_mono ();
    if (self->failed || now < self->next_ping)
        return;
    for (size_t k = 0; k < self->n; k++) {
        s_child *c = &self->children [k];
        if (s_is_running (c) && !c->ping_out) {
            zstr_send (c->pipe, "PING");
            c->ping_out = true;
            c->ping_at = now;
        }
    }
    self->next_ping = now + self->cfg.heartbeat_ms;
}

static size_t
s_first_awaiting (s_sup *self)
{
    for (size_t k = 0; k < self->n; k++)
        if (self->children [k].awaiting)
            return k;
    return S_NONE;
}

static void
s_on_timers (s_sup *self)
{
    if (self->call.active && zclock_mono () >= self->call.deadline) {
        self->call.active = false;
        s_answer (self, self->call.seq, TLY_ETIMEOUT, NULL);
    }
    if (self->failed)
        return;
    s_check_heartbeats (self);
    size_t k = s_first_awaiting (self);
    if (!self->failed && k != S_NONE && s_may_restart (self, k, "failed to start"))
        s_start_awaiting (self);
}

/*  Milliseconds until s_on_timers has work, -1 for none. */
static long
s_wait_ms (s_sup *self)
{
    int64_t next = INT64_MAX;
    if (self->call.active)
        next = self->call.deadline;
    if (!self->failed) {
        if (s_first_awaiting (self) != S_NONE)
            return 0;
        for (size_t k = 0; k < self->n; k++) {
            s_child *c = &self->children [k];
            if (!s_is_running (c))
                continue;
            int64_t due = c->ping_out
                        ? c->ping_at + self->cfg.heartbeat_timeout_ms
                        : self->next_ping;
            if (due < next)
                next = due;
        }
    }
    if (next == INT64_MAX)
        return -1;
    int64_t wait = next - zclock_mono ();
    return wait > 0 ? (long) wait : 0;
}

/* ---- owner requests -------------------------------------------------- */

static void
s_on_which (s_sup *self, uint32_t seq)
{
    tly_child_info *infos = calloc (self->n ? self->n : 1, sizeof *infos);
    if (!infos) {
        s_answer (self, seq, TLY_ENOMEM, NULL);
        return;
    }
    for (size_t k = 0; k < self->n; k++) {
        s_child *c = &self->children [k];
        snprintf (infos [k].name, sizeof infos [k].name, "%s", c->spec->name);
        infos [k].state = c->state;
        infos [k].restarts = c->restarts;
        infos [k].since = c->since;
    }
    zmsg_t *payload = zmsg_new ();
    zmsg_addmem (payload, infos, self->n * sizeof *infos);
    free (infos);
    s_answer (self, seq, TLY_OK, &payload);
}

static void
s_on_count (s_sup *self, uint32_t seq)
{
    size_t active = 0;
    for (size_t k = 0; k < self->n; k++)
        if (s_is_running (&self->children [k]))
            active++;
    zmsg_t *payload = zmsg_new ();
    zmsg_addstrf (payload, "%zu", self->n);
    zmsg_addstrf (payload, "%zu", active);
    s_answer (self, seq, TLY_OK, &payload);
}

static int
s_on_terminate (s_sup *self, size_t k)
{
    if (s_stop_child (self, k, TLY_CHILD_TERMINATED) == TLY_OK) {
        s_log ('I', "child %s terminated by the operator", self->children [k].spec->name);
        return TLY_OK;
    }
    s_escalate_stuck (self, k);
    return TLY_EUNAVAIL;
}

static int
s_on_restart (s_sup *self, size_t k)
{
    s_child *c = &self->children [k];
    if (c->ctx && s_stop_child (self, k, TLY_CHILD_RESTARTING) != TLY_OK) {
        s_escalate_stuck (self, k);
        return TLY_EUNAVAIL;
    }
    c->awaiting = false;
    int rc = s_start_child (self, k);
    if (rc == TLY_OK) {
        s_log ('I', "child %s restarted by the operator", c->spec->name);
        return TLY_OK;
    }
    s_set_state (self, k, TLY_CHILD_TERMINATED);
    if (rc == TLY_ETIMEOUT)
        s_escalate_stuck (self, k);
    return TLY_EUNAVAIL;
}

/*  Forwards the call and leaves it pending: the REPLY, the deadline or
    the child's end answers it. */
static void
s_on_call (s_sup *self, uint32_t seq, size_t k, zmsg_t **msg_p)
{
    char *timeout = zmsg_popstr (*msg_p);
    unsigned long timeout_ms = timeout ? strtoul (timeout, NULL, 10) : 0;
    free (timeout);
    s_child *c = &self->children [k];
    if (!s_is_running (c)) {
        s_answer (self, seq, TLY_EUNAVAIL, NULL);
        return;
    }
    unsigned id = ++self->next_call_id;
    zmsg_pushstrf (*msg_p, "%u", id);
    zmsg_pushstr (*msg_p, "CALL");
    if (zmsg_send (msg_p, c->pipe) != 0) {
        s_answer (self, seq, TLY_EUNAVAIL, NULL);
        return;
    }
    self->call.active = true;
    self->call.seq = seq;
    self->call.child = k;
    self->call.id = id;
    self->call.deadline = zclock_mono () + (int64_t) timeout_ms;
}

static void
s_on_named (s_sup *self, const char *cmd, uint32_t seq, zmsg_t **msg_p)
{
    char *name = zmsg_popstr (*msg_p);
    size_t k = s_find (self, name);
    free (name);
    if (k == S_NONE)
        s_answer (self, seq, TLY_ENOTFOUND, NULL);
    else
    if (streq (cmd, "TERMINATE"))
        s_answer (self, seq, s_on_terminate (self, k), NULL);
    else
    if (streq (cmd, "RESTART"))
        s_answer (self, seq, s_on_restart (self, k), NULL);
    else
        s_on_call (self, seq, k, msg_p);
}

static void
s_on_request (s_sup *self, zmsg_t **msg_p)
{
    char *cmd = zmsg_popstr (*msg_p);
    char *seqstr = zmsg_popstr (*msg_p);
    uint32_t seq = seqstr ? (uint32_t) strtoul (seqstr, NULL, 10) : 0;
    free (seqstr);
    /*  The owner waits for one reply at a time, so a new request means it
        gave up on any call still pending: forget that call. */
    if (cmd && !streq (cmd, "$TERM"))
        self->call.active = false;
    if (!cmd)
        ;
    else if (streq (cmd, "$TERM"))
        self->terminated = true;
    else if (self->failed)
        s_answer (self, seq, TLY_EUNAVAIL, NULL);
    else if (streq (cmd, "WHICH"))
        s_on_which (self, seq);
    else if (streq (cmd, "COUNT"))
        s_on_count (self, seq);
    else if (streq (cmd, "TERMINATE") || streq (cmd, "RESTART") || streq (cmd, "CALL"))
        s_on_named (self, cmd, seq, msg_p);
    else
        s_answer (self, seq, TLY_EINVAL, NULL);
    free (cmd);
}

/* ---- life cycle ------------------------------------------------------ */

static void
s_sup_destroy (s_sup **self_p)
{
    s_sup *self = *self_p;
    if (!self)
        return;
    zsock_destroy (&self->events);
    free (self->children);
    free (self->window);
    free (self->items);
    free (self->item_child);
    free (self->item_gen);
    free (self);
    *self_p = NULL;
}

static s_sup *
s_sup_new (zsock_t *pipe, s_args *args)
{
    s_sup *self = calloc (1, sizeof *self);
    if (!self)
        return NULL;
    self->pipe = pipe;
    self->events = args->events;
    args->events = NULL;
    self->cfg = args->cfg;
    self->n = args->n;
    self->children = calloc (args->n ? args->n : 1, sizeof (s_child));
    self->items = calloc (args->n + 1, sizeof (zmq_pollitem_t));
    self->item_child = calloc (args->n + 1, sizeof (size_t));
    self->item_gen = calloc (args->n + 1, sizeof (unsigned));
    if (!self->children || !self->items || !self->item_child || !self->item_gen) {
        s_sup_destroy (&self);
        return NULL;
    }
    uint64_t now = tly_now_ms ();
    for (size_t k = 0; k < self->n; k++) {
        self->children [k].spec = &args->specs [k];
        self->children [k].state = TLY_CHILD_TERMINATED;
        self->children [k].since = now;
    }
    return self;
}

/*  Starts every child in order; on a failure stops those started, in
    reverse order. */
static int
s_start_all (s_sup *self)
{
    for (size_t k = 0; k < self->n; k++) {
        if (s_start_child (self, k) == TLY_OK)
            continue;
        s_log ('E', "child %s failed to start; stopping the %zu started before it",
               self->children [k].spec->name, k);
        for (size_t j = k; j-- > 0; )
            s_stop_child (self, j, TLY_CHILD_TERMINATED);
        return TLY_EUNAVAIL;
    }
    self->next_ping = zclock_mono () + self->cfg.heartbeat_ms;
    return TLY_OK;
}

static size_t
s_poll_set (s_sup *self)
{
    self->items [0] = (zmq_pollitem_t) { zsock_resolve (self->pipe), 0, ZMQ_POLLIN, 0 };
    size_t count = 1;
    for (size_t k = 0; k < self->n; k++) {
        s_child *c = &self->children [k];
        if (!c->ctx)
            continue;
        self->items [count] = (zmq_pollitem_t) { zsock_resolve (c->pipe), 0, ZMQ_POLLIN, 0 };
        self->item_child [count] = k;
        self->item_gen [count] = c->gen;
        count++;
    }
    return count;
}

/*  Children first, so a request sees states as fresh as possible.  A
    child restarted while handling an earlier item has a new pipe: its
    stale poll result is skipped (gen). */
static void
s_on_readable (s_sup *self, size_t count)
{
    for (size_t i = 1; i < count; i++) {
        s_child *c = &self->children [self->item_child [i]];
        if ((self->items [i].revents & ZMQ_POLLIN) && c->ctx && c->gen == self->item_gen [i])
            s_drain (self, self->item_child [i]);
    }
    while (!self->terminated && (zsock_events (self->pipe) & ZMQ_POLLIN)) {
        zmsg_t *msg = zmsg_recv (self->pipe);
        if (!msg)
            break;
        s_on_request (self, &msg);
        zmsg_destroy (&msg);
    }
}

static void
s_run (s_sup *self)
{
    while (!self->terminated) {
        size_t count = s_poll_set (self);
        int rc = zmq_poll (self->items, (int) count, s_wait_ms (self));
        if (rc < 0 && errno != EINTR)
            break;              /*  the context is being terminated */
        if (rc > 0)
            s_on_readable (self, count);
        if (!self->terminated)
            s_on_timers (self);
    }
}

static void
s_actor (zsock_t *pipe, void *arg)
{
    s_args *args = arg;
    zsock_signal (pipe, 0);
    zsock_set_sndtimeo (pipe, 0);   /*  the owner may have stopped listening */
    s_sup *self = s_sup_new (pipe, args);
    if (!self) {
        zsock_destroy (&args->events);
        zmsg_t *msg = zmsg_new ();
        zmsg_addstr (msg, "0");                 /*  seq 0: start-up */
        zmsg_addstrf (msg, "%d", TLY_ENOMEM);
        zmsg_send (&msg, pipe);
        char *cmd;
        while ((cmd = zstr_recv (pipe))) {      /*  until $TERM */
            bool term = streq (cmd, "$TERM");
            free (cmd);
            if (term)
                break;
        }
        return;
    }
    int status = s_start_all (self);
    s_answer (self, 0, status, NULL);
    self->failed = status != TLY_OK;
    s_run (self);
    for (size_t k = self->n; k-- > 0; )
        s_stop_child (self, k, TLY_CHILD_TERMINATED);
    s_sup_destroy (&self);
}

/* ======================================================================
   The owner's side.
   ====================================================================== */

struct tly_sup {
    zactor_t *actor;
    zsock_t *events;            /*  owner's end of tly_sup_sock              */
    tly_sup_config cfg;
    s_args args;
    uint32_t seq;               /*  last request sent                        */
};

static bool
s_valid (const tly_sup_config *cfg, const tly_child_spec *specs, size_t n)
{
    if (cfg->period_ms == 0 || cfg->heartbeat_ms == 0 || cfg->heartbeat_timeout_ms == 0
    ||  (unsigned) cfg->strategy > TLY_REST_FOR_ONE || (n && !specs))
        return false;
    for (size_t k = 0; k < n; k++) {
        const tly_child_spec *s = &specs [k];
        if (!s->fn || !s->name || !*s->name || strlen (s->name) > S_NAME_MAX
        ||  (unsigned) s->restart > TLY_TEMPORARY)
            return false;
        for (size_t j = 0; j < k; j++)
            if (streq (specs [j].name, s->name))
                return false;
    }
    return true;
}

/*  Waits for the reply to request `seq` (timeout_ms < 0: as long as it
    takes); replies to older requests are dropped. */
static int
s_await (tly_sup *self, uint32_t seq, int64_t timeout_ms, zmsg_t **payload)
{
    int64_t deadline = timeout_ms < 0 ? -1 : zclock_mono () + timeout_ms;
    while (true) {
        long wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - zclock_mono ();
            wait = left > 0 ? (long) left : 0;
        }
        zmq_pollitem_t item = { zsock_resolve (self->actor), 0, ZMQ_POLLIN, 0 };
        int rc = zmq_poll (&item, 1, wait);
        if (rc == 0)
            return TLY_ETIMEOUT;
        zmsg_t *msg = rc > 0 ? zmsg_recv (self->actor) : NULL;
        if (!msg)
            return TLY_EUNAVAIL;        /*  interrupted */
        char *seqstr = zmsg_popstr (msg);
        char *status = zmsg_popstr (msg);
        bool mine = seqstr && status && strtoul (seqstr, NULL, 10) == seq;
        int code = status ? atoi (status) : TLY_EPROTO;
        free (seqstr);
        free (status);
        if (mine) {
            if (payload)
                *payload = msg;
            else
                zmsg_destroy (&msg);
            return code;
        }
        zmsg_destroy (&msg);
    }
}

/*  Sends cmd [name] [frames of *extra, consumed] and waits for the reply. */
static int
s_request (tly_sup *self, const char *cmd, const char *name, zmsg_t **extra,
           int64_t timeout_ms, zmsg_t **payload)
{
    zmsg_t *msg = extra && *extra ? *extra : zmsg_new ();
    if (extra)
        *extra = NULL;
    if (!msg)
        return TLY_ENOMEM;
    uint32_t seq = ++self->seq ? self->seq : ++self->seq;      /*  0 is start-up's */
    if (name)
        zmsg_pushstr (msg, name);
    zmsg_pushstrf (msg, "%u", (unsigned) seq);
    zmsg_pushstr (msg, cmd);
    if (zmsg_send (&msg, self->actor) != 0)
        return TLY_EUNAVAIL;
    int rc = s_await (self, seq, timeout_ms, payload);
    if (rc != TLY_OK && payload)
        zmsg_destroy (payload);
    return rc;
}

tly_sup *
tly_sup_new (const tly_sup_config *cfg, const tly_child_spec *specs, size_t n)
{
    if (!cfg)
        cfg = &tly_sup_default_config;
    if (!s_valid (cfg, specs, n))
        return NULL;
    tly_sup *self = calloc (1, sizeof *self);
    if (!self)
        return NULL;
    self->cfg = *cfg;
    self->args = (s_args) { .cfg = *cfg, .specs = specs, .n = n };
    self->events = zsys_create_pipe (&self->args.events);
    if (!self->events) {
        free (self);
        return NULL;
    }
    zsock_set_sndtimeo (self->args.events, 0);
    self->actor = zactor_new (s_actor, &self->args);
    if (!self->actor) {
        zsock_destroy (&self->args.events);
        zsock_destroy (&self->events);
        free (self);
        return NULL;
    }
    if (s_await (self, 0, -1, NULL) != TLY_OK)
        tly_sup_destroy (&self);
    return self;
}

void
tly_sup_destroy (tly_sup **self_p)
{
    assert (self_p);
    tly_sup *self = *self_p;
    if (!self)
        return;
    zactor_destroy (&self->actor);
    zsock_destroy (&self->events);
    free (self);
    *self_p = NULL;
}

zsock_t *
tly_sup_sock (tly_sup *self)
{
    assert (self);
    return self->events;
}

const tly_sup_config *
tly_sup_config_of (tly_sup *self)
{
    assert (self);
    return &self->cfg;
}

int
tly_sup_which_children (tly_sup *self, tly_child_info *out, size_t max)
{
    if (!self || (max && !out))
        return TLY_EINVAL;
    zmsg_t *payload = NULL;
    int rc = s_request (self, "WHICH", NULL, NULL, -1, &payload);
    if (rc != TLY_OK)
        return rc;
    zframe_t *frame = zmsg_first (payload);
    size_t n = frame ? zframe_size (frame) / sizeof (tly_child_info) : 0;
    size_t fill = n < max ? n : max;
    if (fill)
        memcpy (out, zframe_data (frame), fill * sizeof (tly_child_info));
    zmsg_destroy (&payload);
    return (int) n;
}

int
tly_sup_count_children (tly_sup *self, size_t *specs, size_t *active)
{
    if (!self)
        return TLY_EINVAL;
    zmsg_t *payload = NULL;
    int rc = s_request (self, "COUNT", NULL, NULL, -1, &payload);
    if (rc != TLY_OK)
        return rc;
    char *nspecs = zmsg_popstr (payload);
    char *nactive = zmsg_popstr (payload);
    if (specs)
        *specs = nspecs ? strtoul (nspecs, NULL, 10) : 0;
    if (active)
        *active = nactive ? strtoul (nactive, NULL, 10) : 0;
    free (nspecs);
    free (nactive);
    zmsg_destroy (&payload);
    return TLY_OK;
}

int
tly_sup_terminate_child (tly_sup *self, const char *name)
{
    if (!self || !name)
        return TLY_EINVAL;
    return s_request (self, "TERMINATE", name, NULL, -1, NULL);
}

int
tly_sup_restart_child (tly_sup *self, const char *name)
{
    if (!self || !name)
        return TLY_EINVAL;
    return s_request (self, "RESTART", name, NULL, -1, NULL);
}

int
tly_sup_call (tly_sup *self, const char *name, zmsg_t **request,
              zmsg_t **reply, unsigned timeout_ms)
{
    zmsg_t *msg = request && *request ? *request : zmsg_new ();
    if (request)
        *request = NULL;
    if (reply)
        *reply = NULL;
    if (!msg)
        return TLY_ENOMEM;
    if (!self || !name || !reply) {
        zmsg_destroy (&msg);
        return TLY_EINVAL;
    }
    zmsg_pushstrf (msg, "%u", timeout_ms);
    return s_request (self, "CALL", name, &msg, (int64_t) timeout_ms, reply);
}
