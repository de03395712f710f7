/*  supervisor.h -- an Erlang/OTP-style supervisor for actor threads.

    A supervisor owns a list of child specs, started in order and stopped in
    reverse.  Each child runs `fn` in its own thread and talks to the
    supervisor over a PAIR pipe (the child's only link to it):

      supervisor -> child   "$TERM"               stop now (return 0)
                            "PING"                answer "PONG" (heartbeat)
                            "CALL" id frames...   an operator call: reply once
                            "PEER" name state     another child's new state
      child -> supervisor   "READY"               initialised (tly_child_ready)
                            "PONG"
                            "REPLY" id frames...  id echoes the CALL's
                            "EXIT" rc             sent by the thread wrapper

    All frames but the call's are strings (rc and id in decimal, state as
    tly_child_state_name).  tly_child_recv and tly_child_reply hide the id.

    Restart strategies: one_for_one restarts the failed child alone;
    one_for_all stops all others (reverse order) and restarts all (in order);
    rest_for_one stops and restarts the failed child and every child after it.
    Restart types: permanent children are always restarted, transient ones
    only after an abnormal exit (fn returned non-zero, or missed heartbeats),
    temporary ones never.  A child that does not answer PING within
    heartbeat_timeout_ms has failed: it is sent $TERM and given shutdown_ms to
    exit.  C cannot kill a thread safely, so a child that still has not
    exited then is beyond recovery here and the supervisor escalates.
    Intensity: more than `intensity` automatic restarts within `period_ms`
    makes the supervisor stop every child in reverse order and escalate: the
    owner sees "ESCALATE" on tly_sup_sock() and should exit non-zero, leaving
    the process-level supervisor (systemd) to restart the service.

    Operator calls (terminate, restart) do not count towards intensity but
    do count in a child's `restarts`.  A terminated child stays listed with
    state "terminated" until it is restarted.

    Threading: every tly_sup_* call is made from one owner thread.  The
    supervisor itself runs in a thread of its own.  Child functions run in
    their own threads and touch only their own state, their pipe, and the
    sockets handed to them in `args` (sockets may move between threads with
    each restart: thread start and join are full memory barriers).

    Details an implementation had to choose (all in supervisor.c):
    - The supervisor restarts synchronously: while it stops and starts
      children (each stop bounded by shutdown_ms, each start by shutdown_ms
      to READY) it answers no tly_sup_* request; those wait, and so does
      tly_sup_destroy.  An operator call never interrupts a restart.
    - one_for_all and rest_for_one stop and restart only the siblings that
      are running (or already waiting to restart).  A sibling that an
      operator terminated, or that ended for good, stays terminated (OTP
      would start it again; here terminate_child holds until restart_child,
      as PROTOCOL.md section 5 promises).  A temporary sibling stopped
      because of another's failure is not restarted (as in OTP).
    - One failure is one restart for intensity, whatever the strategy.  If
      a restart fails (the child returns before READY or is not READY in
      time), the child stays "restarting" and the supervisor tries again
      straight away; every retry is one more restart for intensity, so a
      child that cannot start leads to escalation.
    - PEER notices: a child is told the state of every other child that has
      been started at least once, right after its READY arrives (queued on
      its pipe before any PING or CALL), and then each change as it happens.
    - Heartbeats: every heartbeat_ms each running child with no PING
      outstanding gets one; it has failed when that PING stays unanswered
      for heartbeat_timeout_ms.  A PONG that waited on the pipe while the
      supervisor was busy elsewhere still counts.  A child that missed its
      heartbeat is expected to exit when it finally reads $TERM: that exit
      counts as abnormal whatever its status.
    - Log lines (restarts, failures, escalation) go to stderr, one line
      each, never stdout.  (CZMQ 4.2's zsys_* log to stdout by default, so
      they are not used here.)
*/
#ifndef TALLY_SUPERVISOR_H
#define TALLY_SUPERVISOR_H

#include <czmq.h>
#include "tally/tally.h"

typedef enum { TLY_ONE_FOR_ONE, TLY_ONE_FOR_ALL, TLY_REST_FOR_ONE } tly_strategy;
typedef enum { TLY_PERMANENT, TLY_TRANSIENT, TLY_TEMPORARY } tly_restart_type;
typedef enum { TLY_CHILD_RUNNING, TLY_CHILD_RESTARTING, TLY_CHILD_TERMINATED } tly_child_state;

typedef struct tly_child_ctx tly_child_ctx;

/*  A child's body.  Call tly_child_ready() once initialised (before that the
    supervisor waits up to shutdown_ms, then counts a failure).  Then poll
    tly_child_pipe() with your own sockets, at least every heartbeat_ms, and
    pass what arrives to tly_child_recv().  Return 0 on a normal exit (after
    $TERM), non-zero on failure. */
typedef int (tly_child_fn) (tly_child_ctx *ctx, void *args);

typedef struct {
    const char *name;             /* unique, <= 31 chars                       */
    tly_child_fn *fn;
    void *args;
    tly_restart_type restart;
    unsigned shutdown_ms;         /* time to exit after $TERM, or to get READY */
} tly_child_spec;

typedef struct {
    tly_strategy strategy;
    unsigned intensity;           /* max automatic restarts ...                */
    unsigned period_ms;           /* ... within this window                    */
    unsigned heartbeat_ms;        /* PING interval                             */
    unsigned heartbeat_timeout_ms;/* no PONG within this: the child has failed */
} tly_sup_config;

/*  Defaults: one_for_one, 5 restarts in 30 s, heartbeat every 1 s,
    failed after 5 s of silence.  period_ms, heartbeat_ms and
    heartbeat_timeout_ms must be > 0; intensity may be 0 (any automatic
    restart escalates). */
extern const tly_sup_config tly_sup_default_config;

typedef struct {
    char name[32];
    tly_child_state state;
    uint64_t restarts;            /* times (re)started after the first start,
                                     automatic or operator, counting attempts
                                     that failed before READY               */
    uint64_t since;               /* ms since the epoch (tly_now_ms) when it
                                     entered `state`                        */
} tly_child_info;

typedef struct tly_sup tly_sup;

/*  Creates the supervisor and starts children in order, waiting for each to
    be READY.  Specs (and their args) must outlive the supervisor. On
    failure to start, stops the started ones and returns NULL.  Also NULL
    for a bad config or spec (NULL fn, missing, long or duplicate name).
    cfg may be NULL for tly_sup_default_config. */
tly_sup *tly_sup_new (const tly_sup_config *cfg, const tly_child_spec *specs, size_t n);
/*  Stops children in reverse order, each within its shutdown_ms, and frees.
    If a restart is under way it is finished first.  A child that does not
    exit within its shutdown_ms is abandoned (see tly_sup_orphans). */
void tly_sup_destroy (tly_sup **self_p);

/*  Readable when the supervisor escalated: the message is "ESCALATE" reason
    (two string frames; reason is one line for an operator).  This is a PAIR
    of its own, separate from the request pipe, so the owner can poll it
    next to its other sockets; nothing else is ever sent on it.  Owned by the
    supervisor: do not destroy it.  After escalation every call below (but
    tly_sup_config_of) returns TLY_EUNAVAIL. */
zsock_t *tly_sup_sock (tly_sup *self);

/*  Fills up to `max` infos; returns the number of children, or < 0. */
int tly_sup_which_children (tly_sup *self, tly_child_info *out, size_t max);
/*  Number of specs, and of children running (active). */
int tly_sup_count_children (tly_sup *self, size_t *specs, size_t *active);
/*  Stops a child (TLY_ENOTFOUND for an unknown name).  Terminating a
    terminated child is TLY_OK; a child waiting to restart is terminated
    without a restart.  TLY_EUNAVAIL if it did not exit within shutdown_ms
    (the supervisor then escalates). */
int tly_sup_terminate_child (tly_sup *self, const char *name);
/*  Starts a terminated (or restarting) child, or stops then starts a
    running one.  TLY_EUNAVAIL if it fails to start: it is then left
    terminated. */
int tly_sup_restart_child (tly_sup *self, const char *name);
/*  Sends `*request` (consumed) to a running child as CALL and waits up to
    timeout_ms for its REPLY into *reply.  TLY_EUNAVAIL if the child is not
    running (or stops before it replies), TLY_ETIMEOUT if it did not reply
    in time.  Each call carries an id the child echoes, so a reply that
    comes too late, or from a stopped generation, is dropped rather than
    handed to a later call. */
int tly_sup_call (tly_sup *self, const char *name, zmsg_t **request,
                  zmsg_t **reply, unsigned timeout_ms);
/*  Strategy name, intensity and period as configured. */
const tly_sup_config *tly_sup_config_of (tly_sup *self);
const char *tly_strategy_name (tly_strategy s);
const char *tly_child_state_name (tly_child_state s);

/*  Child threads that a supervisor gave up on (they did not exit within
    shutdown_ms of $TERM) and that are still running, process-wide.  Each
    frees its own context and pipe when its function finally returns; do
    not call zsys_shutdown while this is non-zero.  Any thread may call. */
size_t tly_sup_orphans (void);

/* ---- used by child functions ---- */

zsock_t *tly_child_pipe (tly_child_ctx *ctx);
const char *tly_child_name (tly_child_ctx *ctx);
void tly_child_ready (tly_child_ctx *ctx);

enum {
    TLY_CHILD_NONE = 0,           /* handled internally (PING, PEER)          */
    TLY_CHILD_TERM = 1,           /* $TERM: clean up and return 0             */
    TLY_CHILD_CALL = 2,           /* *call holds the request frames           */
};
/*  Receives one message from the pipe and handles heartbeats and peer
    notices itself.  For TLY_CHILD_CALL the child must answer with
    tly_child_reply (exactly once, from its own thread).  Blocks: call it
    when the pipe is readable.  Returns TLY_CHILD_TERM too if the receive
    was interrupted (a signal), as CZMQ actors do.  `call` may be NULL for
    a child that takes no calls: each call is then answered empty. */
int tly_child_recv (tly_child_ctx *ctx, zmsg_t **call);
/*  Sends *reply (consumed; NULL or empty for an empty reply).  TLY_EINVAL
    if no call is waiting, TLY_EUNAVAIL if the supervisor is gone. */
int tly_child_reply (tly_child_ctx *ctx, zmsg_t **reply);
/*  The last state this child was told for a peer (RUNNING if never told). */
tly_child_state tly_child_peer_state (tly_child_ctx *ctx, const char *peer);

#endif
