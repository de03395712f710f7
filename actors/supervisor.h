/*  supervisor.h -- an Erlang/OTP-style supervisor for actor threads.

    A supervisor owns a list of child specs, started in order and stopped in
    reverse.  Each child runs `fn` in its own thread and talks to the
    supervisor over a PAIR pipe (the child's only link to it):

      supervisor -> child   "$TERM"               stop now (return 0)
                            "PING"                answer "PONG" (heartbeat)
                            "CALL" frames...      an operator call: reply once
                            "PEER" name state     another child's new state
      child -> supervisor   "READY"               initialised (tly_child_ready)
                            "PONG"
                            "REPLY" frames...
                            "EXIT" rc             sent by the thread wrapper

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
    failed after 5 s of silence. */
extern const tly_sup_config tly_sup_default_config;

typedef struct {
    char name[32];
    tly_child_state state;
    uint64_t restarts;            /* times (re)started after the first start */
    uint64_t since;               /* ms when it entered `state`              */
} tly_child_info;

typedef struct tly_sup tly_sup;

/*  Creates the supervisor and starts children in order, waiting for each to
    be READY.  Specs (and their args) must outlive the supervisor. On
    failure to start, stops the started ones and returns NULL. */
tly_sup *tly_sup_new (const tly_sup_config *cfg, const tly_child_spec *specs, size_t n);
/*  Stops children in reverse order, each within its shutdown_ms, and frees. */
void tly_sup_destroy (tly_sup **self_p);

/*  Readable when the supervisor escalated: the message is "ESCALATE" reason. */
zsock_t *tly_sup_sock (tly_sup *self);

/*  Fills up to `max` infos; returns the number of children, or < 0. */
int tly_sup_which_children (tly_sup *self, tly_child_info *out, size_t max);
/*  Number of specs, and of children running (active). */
int tly_sup_count_children (tly_sup *self, size_t *specs, size_t *active);
/*  Stops a child (TLY_ENOTFOUND for an unknown name). */
int tly_sup_terminate_child (tly_sup *self, const char *name);
/*  Starts a terminated child, or stops then starts a running one. */
int tly_sup_restart_child (tly_sup *self, const char *name);
/*  Sends `*request` (consumed) to a running child as CALL and waits up to
    timeout_ms for its REPLY into *reply.  TLY_EUNAVAIL if the child is not
    running, TLY_ETIMEOUT if it did not reply in time. */
int tly_sup_call (tly_sup *self, const char *name, zmsg_t **request,
                  zmsg_t **reply, unsigned timeout_ms);
/*  Strategy name, intensity and period as configured. */
const tly_sup_config *tly_sup_config_of (tly_sup *self);
const char *tly_strategy_name (tly_strategy s);
const char *tly_child_state_name (tly_child_state s);

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
    tly_child_reply (exactly once, from its own thread). */
int tly_child_recv (tly_child_ctx *ctx, zmsg_t **call);
int tly_child_reply (tly_child_ctx *ctx, zmsg_t **reply);
/*  The last state this child was told for a peer (RUNNING if never told). */
tly_child_state tly_child_peer_state (tly_child_ctx *ctx, const char *peer);

#endif
