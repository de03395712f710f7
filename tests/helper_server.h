/*  helper_server.h -- end-to-end test support: run a real tallyd and talk
    to it over TCP exactly as a user's service would.

    A server lives in a fresh temp data dir (mkdtemp under /tmp) on random
    free loopback ports; its stderr goes to <dir>/tallyd.log, which is
    printed when a test fails.  The binary comes from $TALLYD (set by CMake
    for every test), else "tallyd" next to the test executable.

    Failure reporting with cmocka: register e2e_setup / e2e_teardown for
    every test and call e2e_pass() as a test's last statement.  When a test
    stops early (a failed assert), the teardown prints the log tail of every
    live server, then kills and removes the servers that test started.
    Servers started outside a test (group setup) are removed by
    e2e_group_teardown.  Environment: E2E_KEEP=1 keeps the data dirs,
    E2E_LOG_LEVEL sets the daemon's --log-level (default info).

    Threads: servers are started, stopped and destroyed from the main thread
    only (the daemon dies with it: PR_SET_PDEATHSIG).  An e2e_conn belongs to
    one thread at a time; replies and the JSON helpers are per object.
    Nothing here calls cmocka's assert macros except where stated, so pusher
    threads may use everything but the server functions.
*/
#ifndef TALLY_TESTS_HELPER_SERVER_H
#define TALLY_TESTS_HELPER_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <pthread.h>
#include <stdatomic.h>
#include <msgpack.h>
#include "tally/tally.h"
#include "tally/buf.h"
#include "tally/event.h"
#include "tally/sth.h"
#include "tally/client.h"

/* ---- time ---- */

uint64_t e2e_now_ms (void);           /* monotonic */
void e2e_sleep_ms (unsigned ms);

/*  Polls `cond` every `every` ms until it holds or `ms` pass; sets `ok`.
    E2E_POLL polls every 25 ms. */
#define E2E_POLL_EVERY(ok, ms, every, cond) do {                        \
        uint64_t e2e_dl_ = e2e_now_ms () + (ms);                        \
        (ok) = false;                                                   \
        for (;;) {                                                      \
            if (cond) { (ok) = true; break; }                           \
            if (e2e_now_ms () >= e2e_dl_) break;                        \
            e2e_sleep_ms (every);                                       \
        }                                                               \
    } while (0)
#define E2E_POLL(ok, ms, cond) E2E_POLL_EVERY (ok, ms, 25, cond)

/* ---- the daemon ---- */

typedef struct {
    char dir[128];             /* the data dir                              */
    char log_path[192];        /* the daemon's stderr (appended per start)  */
    char api[64];              /* "tcp://127.0.0.1:PORT"                    */
    char control[64];
    int api_port;
    int control_port;
    unsigned verify_interval;  /* --verify-interval, seconds                */
    pid_t pid;                 /* 0 when not running                        */
    unsigned starts;
    bool in_test;              /* started inside a test (see e2e_teardown)  */
    uint8_t pk[TLY_PK_LEN];    /* <dir>/log.pub, read after each start      */
    char extra_args[4][256];   /* more daemon arguments, "" when unused     */
    bool nice_denied;          /* start it with RLIMIT_NICE 0 and without
                                  CAP_SYS_NICE (where the test may drop it) */
} e2e_server;

/*  Creates a data dir and starts tallyd in it; waits (20 s at most) until
    it answers {"op":"sth"} and its `pubkey` equals <dir>/log.pub.  Retries
    with other ports when the daemon exits early.  NULL on failure (the log
    is printed). */
e2e_server *e2e_server_new (unsigned verify_interval);

/*  The same without starting: fill extra_args (or files in dir) first,
    then e2e_server_start. */
e2e_server *e2e_server_create (unsigned verify_interval);

/*  Starts the daemon again on the same data dir, on the same ports when it
    can (so connected clients reconnect by themselves).  TLY_OK or an error
    (the log is printed). */
int e2e_server_start (e2e_server *self);

/*  One start attempt on the current ports, for daemons that may refuse to
    start: 1 when ready, 0 when it exited first (*exit_code gets its exit
    code), -1 on another failure.  Does not print the log. */
int e2e_server_try_start (e2e_server *self, int *exit_code);

/*  SIGTERM, then waits up to 20 s.  Returns the exit code (0 for a clean
    stop), 128 + signal if it died of one, or -1 if it had to be killed. */
int e2e_server_stop (e2e_server *self);
/*  The same with another signal (SIGINT, ...). */
int e2e_server_stop_with (e2e_server *self, int sig);

/*  SIGKILL (a crash) and reaps the process. */
void e2e_server_kill (e2e_server *self);

/*  True while the process runs (reaps it, and remembers the status, when
    it has exited). */
bool e2e_server_alive (e2e_server *self);

/*  Stops the daemon (SIGTERM), removes the data dir and frees.  Returns
    what e2e_server_stop returned (0 when it was already stopped cleanly);
    prints the log tail when that is not 0. NULL-safe. */
int e2e_server_destroy (e2e_server **self_p);

/*  Prints the last `lines` lines of the daemon's log to stderr. */
void e2e_server_dump_log (e2e_server *self, unsigned lines);

/*  True when a line of the log contains `a` (exact) and `b` (ignoring
    case); b may be NULL. */
bool e2e_server_log_has (e2e_server *self, const char *a, const char *b);

/*  Path of <dir>/ledger/data.mdb (static storage per server). */
const char *e2e_server_data_file (e2e_server *self, char out[256]);

/* ---- cmocka glue ---- */

int e2e_setup (void **state);
int e2e_teardown (void **state);
int e2e_group_teardown (void **state);
void e2e_pass (void);

/* ---- replies ---- */

typedef struct {
    tly_buf raw;               /* the reply body (the last frame)           */
    msgpack_zone zone;
    msgpack_object body;       /* the unpacked body; NIL when unparsable    */
    bool parsed;               /* one well-formed msgpack map               */
    bool ok;                   /* "ok": true                                */
    char code[48];             /* error.code, "" when none                  */
    size_t nframes;            /* frames in the reply message               */
    uint8_t frame0[64];        /* the first frame (when nframes > 1)        */
    size_t frame0_len;
    tly_buf json;              /* scratch for e2e_reply_json                */
} e2e_reply;

void e2e_reply_init (e2e_reply *r);
void e2e_reply_free (e2e_reply *r);
/*  The reply as JSON (bins as hex), for messages; valid until next use. */
const char *e2e_reply_json (e2e_reply *r);
/*  Any msgpack object as JSON into `out` (reset first). */
const char *e2e_json_of (const msgpack_object *o, tly_buf *out);

/*  Fails the current test (cmocka) with the reply printed unless it is ok,
    or unless it is an error with `code`. Main thread only. */
#define E2E_OK(r) e2e_expect_ok_ (r, __FILE__, __LINE__)
#define E2E_ERR(r, c) e2e_expect_err_ (r, c, __FILE__, __LINE__)
void e2e_expect_ok_ (e2e_reply *r, const char *file, int line);
void e2e_expect_err_ (e2e_reply *r, const char *code, const char *file, int line);

/*  Path lookup in a reply: "sth.tree_size", "results.3.status" (numbers
    index arrays).  NULL when absent. */
const msgpack_object *e2e_at (const msgpack_object *o, const char *path);
bool e2e_uint (const msgpack_object *o, const char *path, uint64_t *out);
bool e2e_bool (const msgpack_object *o, const char *path, bool *out);
/*  True when the str at path equals s. */
bool e2e_str_is (const msgpack_object *o, const char *path, const char *s);
/*  Copies the str at path as a C string (truncated); false if not a str. */
bool e2e_str (const msgpack_object *o, const char *path, char *out, size_t size);
/*  True when the bin at path has exactly `len` bytes (copied to out). */
bool e2e_bin (const msgpack_object *o, const char *path, uint8_t *out, size_t len);
/*  Array or map size at path, or -1. */
long e2e_len (const msgpack_object *o, const char *path);

/*  Independent decoders (no library code): an STH map, and a proof reply
    body (`consistency`: from/to instead of seq/tree_size).  Each checks
    every field's type and size. */
bool e2e_sth_decode (const msgpack_object *o, tly_sth *out);
bool e2e_proof_decode (const msgpack_object *body, bool consistency, tly_proof *out);
/*  Ed25519 check of an STH, the 60-byte message built here by hand. */
bool e2e_sth_verify (const tly_sth *sth, const uint8_t pk[TLY_PK_LEN]);

/* ---- requests ---- */

/*  JSON to msgpack for readable requests: single quotes are read as double
    quotes ("{'op':'get','seq':3}"), null is nil, integers take the
    smallest msgpack format.  TLY_OK or TLY_EINVAL. */
int e2e_pack_json (const char *json, tly_buf *out);

/*  One DEALER connection.  Requests are sent one at a time; after a
    timeout the socket is replaced, so a late reply never answers the next
    request. */
typedef struct e2e_conn e2e_conn;
e2e_conn *e2e_conn_new (const char *endpoint);
void e2e_conn_destroy (e2e_conn **self_p);
/*  Sends `body` as one frame; waits up to timeout_ms.  TLY_OK (a reply,
    parsed or not: see r->parsed), TLY_ETIMEOUT or TLY_EIO. */
int e2e_conn_call (e2e_conn *self, const void *body, size_t len,
                   unsigned timeout_ms, e2e_reply *r);
/*  Sends frames[0..n) as one multi-frame message (the last is the body). */
int e2e_conn_call_frames (e2e_conn *self, const void *const *frames,
                          const size_t *lens, size_t n, unsigned timeout_ms,
                          e2e_reply *r);
/*  printf-style JSON request (see e2e_pack_json), 15 s timeout. */
int e2e_callf (e2e_conn *self, e2e_reply *r, const char *fmt, ...)
    __attribute__ ((format (printf, 3, 4)));
/*  Sends without waiting; receives any one reply (for pipelining). */
int e2e_conn_send (e2e_conn *self, const void *body, size_t len);
int e2e_conn_recv (e2e_conn *self, unsigned timeout_ms, e2e_reply *r);

/*  One request over a fresh REQ socket (REQ adds the empty delimiter). */
int e2e_call_req (const char *endpoint, const void *body, size_t len,
                  unsigned timeout_ms, e2e_reply *r);

/*  True when the server at `endpoint` answers {"op":"sth"} with ok. */
bool e2e_answers_sth (const char *endpoint, unsigned timeout_ms);

/* ---- events ---- */

/*  An event borrowing its strings (they must outlive it). */
tly_event e2e_event (const char *customer, const char *meter, const char *key,
                     uint64_t qty, uint64_t ts);
/*  {"op":"ingest","id":id,"events":[...]} into out (reset first). */
void e2e_pack_ingest (tly_buf *out, uint64_t id, const tly_event *evs, size_t n);

/*  A tly_client with the given timeout and retries (NULL on failure). */
tly_client *e2e_client (const char *endpoint, unsigned timeout_ms, unsigned retries);

/* ---- load: a pusher thread with its own tly_client ---- */

/*  Pushes events "<prefix>-<i>" (customer, meter, qty, ts fixed) in
    requests of `batch`, one request at a time, until `capacity` events
    are pushed or `finish` is set (then it completes the batch in hand).
    A request that fails (timeout, unavailable, a dead server) is sent
    again with the same keys until it gets results, or until `abandon` is
    set or `give_up_ms` pass since the pusher started.  Never calls cmocka
    (it runs in its own thread): problems go to `fail`. */
typedef struct {
    /* set by the caller */
    const char *endpoint;
    const uint8_t *pk;            /* every STH is checked against it        */
    char customer[64];
    char meter[32];
    char prefix[32];
    uint64_t qty;
    uint64_t ts;
    size_t capacity;
    size_t batch;
    unsigned timeout_ms;          /* client per-attempt timeout             */
    unsigned retries;             /* client retries                         */
    unsigned give_up_ms;
    _Atomic bool finish;
    _Atomic bool abandon;
    /* results, read after the join (or `done` while running) */
    _Atomic size_t done;          /* events[0 .. done) have results         */
    size_t attempted;             /* events[0 .. attempted) were sent       */
    tly_event *events;
    char (*keys)[64];
    tly_result *results;
    tly_sth newest;               /* newest STH seen (tree_size 0: none)    */
    unsigned failures;            /* requests that got no results           */
    char last_error[160];
    char fail[256];               /* a broken rule; "" when all went well   */
    pthread_t thread;
} e2e_pusher;

/*  Allocates events, keys and results; call before starting. */
int e2e_pusher_init (e2e_pusher *self, const char *endpoint, const uint8_t *pk,
                     const char *customer, const char *meter, const char *prefix,
                     size_t capacity, size_t batch);
int e2e_pusher_start (e2e_pusher *self);
void e2e_pusher_join (e2e_pusher *self);
void e2e_pusher_free (e2e_pusher *self);

/*  Pseudo-random numbers for test data (thread-safe, seeded per process;
    E2E_SEED fixes the seed, which is printed). */
uint64_t e2e_rand (void);

#endif
