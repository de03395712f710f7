/*  tally_bench.c -- tally-bench, the load generator for tallyd (issue 3).

    It speaks PROTOCOL.md as a DEALER peer with msgpack-c, like any
    client, and keeps its own CPU cost low: each load thread runs one event
    loop over its connections (ppoll, so open-loop send times are kept to
    the microsecond), events are packed straight into one reusable buffer,
    replies are unpacked into one reused zone.  The load's connections
    speak ZMTP on their TCP sockets in the load thread itself (zmtp.h), as
    libpq does for PostgreSQL's client, so no I/O thread stands between
    the load and the wire; `--transport zmq` uses libzmq's DEALER sockets
    instead.  Set-up, checks and recovery's probes of the restarted server
    always use libzmq.

    Modes:
      ingest (default)  closed loop: every connection keeps --inflight
                        requests of --batch events outstanding; or open loop
                        (--rate EVENTS/S): requests are due on a fixed
                        schedule and latency is measured from the time each
                        was due, so a stalled server cannot hide its stalls
                        (coordinated omission).
      --proofs          inclusion proofs for random seqs of the existing log.
      --recovery        load for --duration, kill -9 the spawned tallyd,
                        restart it, time until the first request is answered.

    Every reply is checked: each new event must come back `accepted` with a
    seq below the reply's tree size, each re-sent key `duplicate` naming the
    original seq; anything else is counted and makes the exit status 1.  A
    sample of signed tree heads is verified with the key from `pubkey`.
*/
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>
#include <zmq.h>
#include <msgpack.h>
#include <sodium.h>
#include "tally/buf.h"
#include "tally/event.h"
#include "tally/merkle.h"
#include "tally/msg.h"
#include "tally/sth.h"
#include "common.h"
#include "zmtp.h"

#define MAX_THREADS 16
#define MAX_TALLYD_ARGS 16

/* ---- options ---- */

typedef struct {
    bool spawn;
    const char *tallyd;
    const char *tallyd_args[MAX_TALLYD_ARGS];
    int ntallyd_args;
    char data_dir[1024];
    bool data_dir_given;
    bool keep;
    char api[256];
    char control[256];
    pid_t server_pid;
    unsigned connections, inflight, batch, threads;
    uint64_t events;
    double duration;
    uint32_t customers, meters;
    double dup_ratio;
    double rate;
    unsigned verify_every;
    bool proofs, recovery;
    bool json, quiet;
    double timeout_s;
    const char *label;
    bool inflight_given;
    bool zmq;                       /* --transport zmq: the load through libzmq */
} opts_t;

static opts_t O;

static void
usage (FILE *out)
{
    fprintf (out,
"Usage: tally-bench [OPTIONS]\n"
"Load generator for tallyd: drives the API endpoint over TCP and checks every reply.\n"
"\n"
"Server:\n"
"  --spawn               start tallyd (from --tallyd PATH or $TALLYD) in a temp data dir\n"
"                        (or --data-dir DIR, kept) on free loopback ports; stop it at the end\n"
"  --tallyd PATH         the tallyd binary for --spawn\n"
"  --tallyd-arg ARG      pass ARG to the spawned tallyd (repeat: --tallyd-arg=--group-max=8000)\n"
"  --data-dir DIR        the server's data dir (spawn: use it and keep it; else: for bytes/entry)\n"
"  --keep                keep the temp data dir of --spawn\n"
"  --api ENDPOINT        a running tallyd's API endpoint [tcp://127.0.0.1:7400]\n"
"  --server-pid PID      a running tallyd's pid, for its CPU time and memory\n"
"Load:\n"
"  --connections N       DEALER connections [4]\n"
"  --inflight N          requests in flight per connection [1; open loop: 1024]\n"
"  --batch N             events per ingest request, 1..10000 [100]\n"
"  --events N            events to send in all [100000], or\n"
"  --duration S          send for S seconds\n"
"  --customers N         distinct customers [1000]\n"
"  --meters N            distinct meters [10]\n"
"  --dup-ratio R         fraction of events that re-send an acknowledged key [0]\n"
"  --rate R              open loop: R events/s offered; latency from the intended send time\n"
"  --threads N           load threads, connections split among them [1]\n"
"  --transport T         zmtp: the load thread speaks ZMTP on its TCP sockets itself;\n"
"                        zmq: libzmq DEALER sockets (an I/O thread per process) [zmtp]\n"
"  --verify-every N      verify the signature of every Nth reply's tree head [100]\n"
"  --timeout S           a request unanswered this long is an error [30]\n"
"Modes:\n"
"  --proofs              inclusion proofs for random seqs of the existing log (S4)\n"
"  --recovery            with --spawn: load for --duration [3] s, kill -9, restart,\n"
"                        time until the first request is answered (S5)\n"
"Output:\n"
"  --json                one JSON result line on stdout (else a readable summary)\n"
"  --label TEXT          a label copied into the JSON result\n"
"  --quiet               no progress line on stderr\n"
"Exit status: 0 when every reply was as expected, 1 otherwise, 2 on a usage or set-up error.\n");
}

static void
die (const char *fmt, ...) __attribute__ ((format (printf, 1, 2), noreturn));

/* ---- the spawned server ---- */

typedef struct {
    pid_t pid;
    char dir[1024];
    char log[1100];
    bool temp;
    int api_port, control_port;
} server_t;

static server_t S;

static void
server_log_tail (void)
{
    if (!S.log[0])
        return;
    FILE *f = fopen (S.log, "r");
    if (!f)
        return;
    fseek (f, 0, SEEK_END);
    long size = ftell (f);
    fseek (f, size > 4000 ? size - 4000 : 0, SEEK_SET);
    char buf[4001];
    size_t n = fread (buf, 1, 4000, f);
    buf[n] = 0;
    fclose (f);
    fprintf (stderr, "---- tail of %s ----\n%s\n----\n", S.log, buf);
}

static void
server_stop (bool hard)
{
    if (S.pid <= 0)
        return;
    kill (S.pid, hard ? SIGKILL : SIGTERM);
    uint64_t deadline = bc_now_ns () + 30ull * 1000000000ull;
    for (;;) {
        pid_t r = waitpid (S.pid, NULL, WNOHANG);
        if (r == S.pid || (r < 0 && errno == ECHILD))
            break;
        if (bc_now_ns () > deadline) {
            kill (S.pid, SIGKILL);
            waitpid (S.pid, NULL, 0);
            break;
        }
        usleep (2000);
    }
    S.pid = 0;
}

static void
cleanup (void)
{
    server_stop (false);
    if (S.temp && !O.keep) {
        bc_rmtree (S.dir);
        S.temp = false;
    }
}

static void
die (const char *fmt, ...)
{
    va_list ap;
    va_start (ap, fmt);
    fprintf (stderr, "tally-bench: ");
    vfprintf (stderr, fmt, ap);
    fprintf (stderr, "\n");
    va_end (ap);
    if (S.pid > 0)
        server_log_tail ();
    cleanup ();
    exit (2);
}

/*  Forks and execs tallyd; returns at once (see wait_ready). */
static void
server_exec (void)
{
    char api[64], control[64], verify[32];
    snprintf (api, sizeof api, "tcp://127.0.0.1:%d", S.api_port);
    snprintf (control, sizeof control, "tcp://127.0.0.1:%d", S.control_port);
    (void) verify;
    const char *argv[8 + MAX_TALLYD_ARGS + 1];
    int n = 0;
    argv[n++] = O.tallyd;
    argv[n++] = "--data-dir";
    argv[n++] = S.dir;
    argv[n++] = "--api";
    argv[n++] = api;
    argv[n++] = "--control";
    argv[n++] = control;
    for (int i = 0; i < O.ntallyd_args; i++)
        argv[n++] = O.tallyd_args[i];
    argv[n] = NULL;
    fflush (NULL);
    pid_t pid = fork ();
    if (pid < 0)
        die ("fork: %s", strerror (errno));
    if (pid == 0) {
        prctl (PR_SET_PDEATHSIG, SIGKILL);
        int fd = open (S.log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2 (fd, 1);
            dup2 (fd, 2);
            close (fd);
        }
        execv (O.tallyd, (char *const *) argv);
        fprintf (stderr, "exec %s: %s\n", O.tallyd, strerror (errno));
        _exit (127);
    }
    S.pid = pid;
    snprintf (O.api, sizeof O.api, "%s", api);
    snprintf (O.control, sizeof O.control, "%s", control);
}

/* ---- synchronous requests (set-up, checks, recovery) ---- */

typedef struct {
    void *sock;
    zmq_msg_t msg;
    bool has_msg;
    msgpack_zone zone;
    msgpack_object body;
} rpc_t;

static void *s_ctx;

static void
rpc_open (rpc_t *r, const char *endpoint, int reconnect_ms)
{
    memset (r, 0, sizeof *r);
    r->sock = zmq_socket (s_ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt (r->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (reconnect_ms > 0)
        zmq_setsockopt (r->sock, ZMQ_RECONNECT_IVL, &reconnect_ms, sizeof reconnect_ms);
    if (zmq_connect (r->sock, endpoint))
        die ("cannot connect to %s: %s", endpoint, zmq_strerror (zmq_errno ()));
    msgpack_zone_init (&r->zone, 4096);
}

static void
rpc_close (rpc_t *r)
{
    if (r->has_msg)
        zmq_msg_close (&r->msg);
    zmq_close (r->sock);
    msgpack_zone_destroy (&r->zone);
}

static void
rpc_send (rpc_t *r, const tly_buf *req)
{
    zmq_send (r->sock, req->data, req->len, 0);
}

/*  Waits for one reply (timeout in ms); true with r->body set. */
static bool
rpc_recv (rpc_t *r, int timeout_ms)
{
    zmq_pollitem_t it = { r->sock, 0, ZMQ_POLLIN, 0 };
    if (zmq_poll (&it, 1, timeout_ms) <= 0)
        return false;
    if (r->has_msg)
        zmq_msg_close (&r->msg);
    zmq_msg_init (&r->msg);
    r->has_msg = true;
    if (zmq_msg_recv (&r->msg, r->sock, 0) < 0)
        return false;
    msgpack_zone_clear (&r->zone);
    size_t off = 0;
    return msgpack_unpack (zmq_msg_data (&r->msg), zmq_msg_size (&r->msg), &off, &r->zone,
                           &r->body) == MSGPACK_UNPACK_SUCCESS
        && r->body.type == MSGPACK_OBJECT_MAP;
}

static void
pack_simple (tly_buf *b, const char *op, uint64_t id)
{
    msgpack_packer pk;
    tly_buf_reset (b);
    tly_buf_packer (b, &pk);
    msgpack_pack_map (&pk, 2);
    tly_pack_cstr (&pk, "op");
    tly_pack_cstr (&pk, op);
    tly_pack_cstr (&pk, "id");
    msgpack_pack_uint64 (&pk, id);
}

static bool
reply_ok (const msgpack_object *body)
{
    bool ok = false;
    return tly_msg_get_bool (body, "ok", &ok) == TLY_OK && ok;
}

static uint8_t s_pk[TLY_PK_LEN];

/*  Asks for the log's key and its current head (verifying it). */
static bool
fetch_key_and_sth (int timeout_ms, tly_sth *sth)
{
    rpc_t r;
    rpc_open (&r, O.api, 10);
    tly_buf b;
    tly_buf_init (&b);
    bool ok = false;
    pack_simple (&b, "pubkey", 1);
    rpc_send (&r, &b);
    tly_str key;
    if (rpc_recv (&r, timeout_ms) && reply_ok (&r.body)
    &&  tly_msg_get_bin (&r.body, "key", &key) == TLY_OK && key.len == TLY_PK_LEN) {
        memcpy (s_pk, key.ptr, TLY_PK_LEN);
        pack_simple (&b, "sth", 2);
        rpc_send (&r, &b);
        const msgpack_object *o;
        ok = rpc_recv (&r, timeout_ms) && reply_ok (&r.body)
          && (o = tly_msg_get (&r.body, "sth")) && tly_sth_decode (o, sth) == TLY_OK
          && tly_sth_verify (sth, s_pk) == TLY_OK;
    }
    tly_buf_free (&b);
    rpc_close (&r);
    return ok;
}

/*  Waits until the spawned server answers; seconds it took. */
static double
server_wait_ready (uint64_t t0, double max_s, tly_sth *sth)
{
    uint64_t deadline = t0 + (uint64_t) (max_s * 1e9);
    while (bc_now_ns () < deadline) {
        if (waitpid (S.pid, NULL, WNOHANG) == S.pid) {
            S.pid = 0;
            server_log_tail ();
            die ("tallyd exited during start-up");
        }
        if (fetch_key_and_sth (250, sth))
            return (double) (bc_now_ns () - t0) / 1e9;
    }
    die ("tallyd did not answer within %.0f s", max_s);
}

static void
server_start (tly_sth *sth)
{
    if (!O.tallyd || !*O.tallyd)
        die ("--spawn needs --tallyd PATH or $TALLYD");
    if (access (O.tallyd, X_OK))
        die ("%s is not executable", O.tallyd);
    if (O.data_dir_given) {
        snprintf (S.dir, sizeof S.dir, "%s", O.data_dir);
        mkdir (S.dir, 0755);
    }
    else {
        snprintf (S.dir, sizeof S.dir, "/tmp/tally-bench.XXXXXX");
        if (!mkdtemp (S.dir))
            die ("mkdtemp: %s", strerror (errno));
        S.temp = true;
        snprintf (O.data_dir, sizeof O.data_dir, "%s", S.dir);
    }
    snprintf (S.log, sizeof S.log, "%s/tallyd.log", S.dir);
    S.api_port = bc_free_port ();
    S.control_port = bc_free_port ();
    while (S.control_port == S.api_port)
        S.control_port = bc_free_port ();
    if (!S.api_port || !S.control_port)
        die ("no free loopback port");
    uint64_t t0 = bc_now_ns ();
    server_exec ();
    double s = server_wait_ready (t0, 600, sth);
    if (!O.quiet)
        fprintf (stderr, "tally-bench: tallyd pid %d ready in %.2f s (tree size %llu), "
                         "api %s, data %s\n", (int) S.pid, s,
                 (unsigned long long) sth->tree_size, O.api, S.dir);
    O.server_pid = S.pid;
}

/* ---- the load threads ---- */

typedef struct {
    uint64_t keyno;
    uint64_t seq;                   /* duplicates: the original's seq (0 unknown) */
    bool dup;
} ev_slot;

typedef struct {
    bool used;
    uint32_t gen;
    int conn;
    uint64_t intended, sent;
    uint32_t n;
    ev_slot *evs;
    uint64_t seq;                   /* proofs: the seq asked for */
} req_t;

typedef struct {
    int tid;
    pthread_t thread;
    int nconns;
    void **socks;                   /* --transport zmq */
    bz_conn *conns;                 /* --transport zmtp */
    struct pollfd *pfds;
    uint32_t *inflight;
    bool *dirty;                    /* operated on since its ZMQ_EVENTS was read */
    bool *ready;                    /* may have replies to read */
    uint32_t inflight_total;
    uint32_t cap;                   /* per connection */
    req_t *reqs;
    uint32_t nreqs;
    uint32_t *free_list;
    uint32_t nfree;
    int rr;
    const bc_stream *stream;
    bc_dups dups;
    uint64_t next_keyno;
    uint64_t budget;                /* events (or proofs) to send; UINT64_MAX: duration */
    uint64_t sent;
    double rate;                    /* events/s for this thread; 0 closed loop */
    uint64_t t_start, deadline;
    uint64_t proof_size;            /* proofs: tree size */
    uint64_t rng;
    tly_buf buf;
    msgpack_zone zone;
    uint64_t replies;
    /* results */
    bc_result res;
    _Atomic uint64_t done_events, done_requests, bad;
    uint64_t last_reply_ns;
    bool *dead;                     /* zmtp: the connection failed */
    int live;                       /* connections not dead; 0: stop */
    char first_error[256];
} worker_t;

static bc_stream s_stream;
static uint64_t s_proof_size;
static atomic_bool s_abandon;       /* recovery: stop without draining */
static atomic_bool s_killing;       /* recovery: the server is being killed */
static worker_t s_workers[MAX_THREADS];

static void
note_error (worker_t *w, const char *fmt, ...) __attribute__ ((format (printf, 2, 3)));

static void
note_error (worker_t *w, const char *fmt, ...)
{
    if (w->first_error[0])
        return;
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (w->first_error, sizeof w->first_error, fmt, ap);
    va_end (ap);
}

static req_t *
req_alloc (worker_t *w, uint64_t *id)
{
    if (!w->nfree)
        return NULL;
    uint32_t i = w->free_list[--w->nfree];
    req_t *r = &w->reqs[i];
    r->used = true;
    r->gen++;
    *id = (uint64_t) r->gen << 32 | i;
    return r;
}

static req_t *
req_find (worker_t *w, uint64_t id)
{
    uint32_t i = (uint32_t) id;
    if (i >= w->nreqs || !w->reqs[i].used || w->reqs[i].gen != (uint32_t) (id >> 32))
        return NULL;
    return &w->reqs[i];
}

static void
req_release (worker_t *w, req_t *r)
{
    r->used = false;
    w->free_list[w->nfree++] = (uint32_t) (r - w->reqs);
}

static bool
more_to_send (worker_t *w, uint64_t now)
{
    if (atomic_load_explicit (&s_abandon, memory_order_relaxed))
        return false;
    if (w->budget != UINT64_MAX)
        return w->sent < w->budget;
    return now < w->deadline;
}

static int
pick_conn (worker_t *w)
{
    for (int k = 0; k < w->nconns; k++) {
        int c = (w->rr + k) % w->nconns;
        if (w->inflight[c] < w->cap && !w->dead[c]) {
            w->rr = c + 1;
            return c;
        }
    }
    return -1;
}

/*  Events in the requests unanswered on connection c (-1: on any). */
static uint64_t
unanswered (const worker_t *w, int c)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < w->nreqs; i++)
        if (w->reqs[i].used && (c < 0 || w->reqs[i].conn == c))
            n += w->reqs[i].n;
    return n;
}

/*  A zmtp connection failed: its requests will never be answered.  It is
    closed and the others go on; unless recovery is killing the server on
    purpose, each unanswered request is an error.  With none left the load
    thread stops. */
static void
conn_lost (worker_t *w, int c)
{
    if (w->dead[c])
        return;
    bool killing = atomic_load (&s_killing);
    if (!killing) {
        note_error (w, "connection %d: %s", c, bz_error (&w->conns[c]));
        atomic_fetch_add_explicit (&w->bad, 1, memory_order_relaxed);
        w->res.errors += unanswered (w, c);
    }
    for (uint32_t i = 0; i < w->nreqs; i++)
        if (w->reqs[i].used && w->reqs[i].conn == c)
            req_release (w, &w->reqs[i]);
    w->inflight_total -= w->inflight[c];
    w->inflight[c] = 0;
    w->dead[c] = true;
    w->ready[c] = false;
    w->pfds[c].fd = -1;             /* ppoll skips it */
    bz_close (&w->conns[c]);
    w->live--;
}

static bool
conn_send (worker_t *w, int c)
{
    if (O.zmq)
        return zmq_send (w->socks[c], w->buf.data, w->buf.len, ZMQ_DONTWAIT) >= 0;
    if (bz_send (&w->conns[c], w->buf.data, w->buf.len) == 0)
        return true;
    conn_lost (w, c);
    return false;
}

static bool
send_request (worker_t *w, int c, uint64_t intended)
{
    uint64_t id;
    req_t *r = req_alloc (w, &id);
    if (!r)
        return false;
    msgpack_packer pk;
    tly_buf_reset (&w->buf);
    tly_buf_packer (&w->buf, &pk);
    if (O.proofs) {
        r->n = 1;
        r->seq = bc_rand (&w->rng) % w->proof_size;
        msgpack_pack_map (&pk, 3);
        tly_pack_cstr (&pk, "op");
        tly_pack_cstr (&pk, "proof");
        tly_pack_cstr (&pk, "id");
        msgpack_pack_uint64 (&pk, id);
        tly_pack_cstr (&pk, "seq");
        msgpack_pack_uint64 (&pk, r->seq);
    }
    else {
        uint64_t left = w->budget == UINT64_MAX ? O.batch : w->budget - w->sent;
        r->n = (uint32_t) (left < O.batch ? left : O.batch);
        msgpack_pack_map (&pk, 3);
        tly_pack_cstr (&pk, "op");
        tly_pack_cstr (&pk, "ingest");
        tly_pack_cstr (&pk, "id");
        msgpack_pack_uint64 (&pk, id);
        tly_pack_cstr (&pk, "events");
        msgpack_pack_array (&pk, r->n);
        for (uint32_t i = 0; i < r->n; i++) {
            ev_slot *e = &r->evs[i];
            e->dup = bc_dups_next (&w->dups, &e->keyno, &e->seq);
            if (e->dup)
                w->res.dups_sent++;
            else {
                e->keyno = w->next_keyno;
                w->next_keyno += O.threads;
            }
            bc_event ev;
            bc_event_make (w->stream, e->keyno, &ev);
            tly_event_pack (&ev.ev, &pk);
        }
    }
    if (w->buf.oom)
        die ("out of memory packing a request");
    r->conn = c;
    r->intended = intended;
    r->sent = bc_now_ns ();
    if (!conn_send (w, c)) {
        req_release (w, r);
        return false;
    }
    w->inflight[c]++;
    w->inflight_total++;
    w->dirty[c] = true;
    w->sent += r->n;
    w->res.events += O.proofs ? 0 : r->n;
    return true;
}

static bool
obj_str_eq (const msgpack_object *o, const char *s)
{
    size_t n = strlen (s);
    return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n
        && memcmp (o->via.str.ptr, s, n) == 0;
}

/*  Checks the reply's head and counts a sample of signatures. */
static bool
check_sth (worker_t *w, const msgpack_object *body, tly_sth *sth)
{
    const msgpack_object *o = tly_msg_get (body, "sth");
    if (!o || tly_sth_decode (o, sth)) {
        w->res.unexpected++;
        note_error (w, "a reply without a valid sth");
        return false;
    }
    if (O.verify_every && w->replies % O.verify_every == 0) {
        if (tly_sth_verify (sth, s_pk)) {
            w->res.unexpected++;
            note_error (w, "a signed tree head (size %llu) does not verify",
                        (unsigned long long) sth->tree_size);
            return false;
        }
        w->res.sth_verified++;
    }
    return true;
}

static void
on_ingest_reply (worker_t *w, req_t *r, const msgpack_object *body)
{
    const msgpack_object *results = tly_msg_get (body, "results");
    tly_sth sth;
    if (!results || results->type != MSGPACK_OBJECT_ARRAY || results->via.array.size != r->n) {
        w->res.unexpected += r->n;
        note_error (w, "an ingest reply without %u results", r->n);
        return;
    }
    if (!check_sth (w, body, &sth))
        return;
    for (uint32_t i = 0; i < r->n; i++) {
        const msgpack_object *res = &results->via.array.ptr[i];
        const msgpack_object *st = tly_msg_get (res, "status");
        uint64_t seq = UINT64_MAX;
        tly_msg_get_uint (res, "seq", &seq);
        ev_slot *e = &r->evs[i];
        if (obj_str_eq (st, "accepted")) {
            w->res.accepted++;
            if (e->dup || seq >= sth.tree_size) {
                w->res.unexpected++;
                note_error (w, "key %llu: accepted with seq %llu (tree size %llu)%s",
                            (unsigned long long) e->keyno, (unsigned long long) seq,
                            (unsigned long long) sth.tree_size,
                            e->dup ? " although it re-sends a recorded key" : "");
            }
            else
                bc_dups_ack (&w->dups, e->keyno, seq);
        }
        else
        if (obj_str_eq (st, "duplicate")) {
            w->res.duplicate++;
            if (!e->dup || seq != e->seq) {
                w->res.unexpected++;
                note_error (w, "key %llu: duplicate of seq %llu, expected %s %llu",
                            (unsigned long long) e->keyno, (unsigned long long) seq,
                            e->dup ? "seq" : "a new key, not seq", (unsigned long long) e->seq);
            }
        }
        else
        if (obj_str_eq (st, "conflict")) {
            w->res.conflict++;
            note_error (w, "key %llu: conflict with seq %llu", (unsigned long long) e->keyno,
                        (unsigned long long) seq);
        }
        else
        if (obj_str_eq (st, "rejected")) {
            w->res.rejected++;
            tly_str code = { "", 0 }, msg = { "", 0 };
            tly_msg_get_str (res, "code", &code);
            tly_msg_get_str (res, "message", &msg);
            note_error (w, "key %llu: rejected: %.*s: %.*s", (unsigned long long) e->keyno,
                        (int) code.len, code.ptr, (int) msg.len, msg.ptr);
        }
        else {
            w->res.unexpected++;
            note_error (w, "a result without a known status");
        }
    }
    atomic_fetch_add_explicit (&w->done_events, r->n, memory_order_relaxed);
}

static void
on_proof_reply (worker_t *w, req_t *r, const msgpack_object *body)
{
    tly_sth sth;
    uint64_t seq = UINT64_MAX, size = 0;
    const msgpack_object *path = tly_msg_get (body, "path");
    if (tly_msg_get_uint (body, "seq", &seq) || seq != r->seq
    ||  tly_msg_get_uint (body, "tree_size", &size) || size != w->proof_size
    ||  !path || path->type != MSGPACK_OBJECT_ARRAY || path->via.array.size > TLY_PATH_MAX
    ||  (size > 1 && path->via.array.size == 0)) {
        w->res.unexpected++;
        note_error (w, "a malformed proof reply for seq %llu", (unsigned long long) r->seq);
        return;
    }
    if (!check_sth (w, body, &sth))
        return;
    if (sth.tree_size != size) {
        w->res.unexpected++;
        note_error (w, "a proof's sth has tree size %llu, not %llu",
                    (unsigned long long) sth.tree_size, (unsigned long long) size);
        return;
    }
    w->res.accepted++;
    atomic_fetch_add_explicit (&w->done_events, 1, memory_order_relaxed);
}

static void
on_reply (worker_t *w, const uint8_t *data, size_t len, uint64_t now)
{
    msgpack_object body;
    size_t off = 0;
    msgpack_zone_clear (&w->zone);
    w->last_reply_ns = now;
    if (msgpack_unpack ((const char *) data, len, &off, &w->zone, &body) != MSGPACK_UNPACK_SUCCESS
    ||  body.type != MSGPACK_OBJECT_MAP) {
        w->res.unexpected++;
        note_error (w, "a reply that is not a msgpack map");
        return;
    }
    uint64_t id;
    req_t *r = tly_msg_get_uint (&body, "id", &id) ? NULL : req_find (w, id);
    if (!r) {
        w->res.unexpected++;
        note_error (w, "a reply with an unknown id");
        return;
    }
    bh_record (&w->res.hist, now - r->intended);
    w->inflight[r->conn]--;
    w->inflight_total--;
    w->res.requests++;
    w->replies++;
    atomic_fetch_add_explicit (&w->done_requests, 1, memory_order_relaxed);
    if (!reply_ok (&body)) {
        const msgpack_object *err = tly_msg_get (&body, "error");
        tly_str code = { "?", 1 }, msg = { "", 0 };
        if (err) {
            tly_msg_get_str (err, "code", &code);
            tly_msg_get_str (err, "message", &msg);
        }
        w->res.errors += r->n;
        note_error (w, "error reply: %.*s: %.*s", (int) code.len, code.ptr, (int) msg.len,
                    msg.ptr);
    }
    else
    if (O.proofs)
        on_proof_reply (w, r, &body);
    else
        on_ingest_reply (w, r, &body);
    req_release (w, r);
}

/*  Reads every reply waiting on the connections marked ready; how many.
    What a failing connection had received is read before it is closed. */
static unsigned
drain_zmtp (worker_t *w)
{
    unsigned got = 0;
    for (int c = 0; c < w->nconns; c++) {
        if (!w->ready[c])
            continue;
        w->ready[c] = false;
        bz_conn *k = &w->conns[c];
        int filled = bz_fill (k), rc;
        const uint8_t *data;
        size_t len;
        while ((rc = bz_next (k, &data, &len)) == 1) {
            on_reply (w, data, len, bc_now_ns ());
            got++;
        }
        if (filled || rc < 0)
            conn_lost (w, c);
    }
    return got;
}

/*  zmq: a receive that ends in EAGAIN has processed the socket's
    commands, so its ZMQ_FD is armed again: the socket is neither ready
    nor dirty. */
static unsigned
drain (worker_t *w)
{
    if (!O.zmq)
        return drain_zmtp (w);
    unsigned got = 0;
    for (int c = 0; c < w->nconns; c++) {
        if (!w->ready[c])
            continue;
        w->ready[c] = false;
        w->dirty[c] = false;
        for (;;) {
            zmq_msg_t m;
            zmq_msg_init (&m);
            if (zmq_msg_recv (&m, w->socks[c], ZMQ_DONTWAIT) < 0) {
                zmq_msg_close (&m);
                break;
            }
            on_reply (w, zmq_msg_data (&m), zmq_msg_size (&m), bc_now_ns ());
            zmq_msg_close (&m);
            got++;
        }
    }
    return got;
}

/*  How long to wait: until `until` (monotonic ns, 0 = 100 ms), at most
    100 ms; not at all when something is ready already. */
static struct timespec
wait_for (uint64_t until, bool any)
{
    uint64_t now = bc_now_ns ();
    uint64_t wait = 100000000ull;
    if (until)
        wait = until <= now ? 0 : (until - now < wait ? until - now : wait);
    if (any)
        wait = 0;
    return (struct timespec) { (time_t) (wait / 1000000000u), (long) (wait % 1000000000u) };
}

/*  zmtp: the sockets' own readiness, and writes the kernel could not take
    at once go out when it can. */
static void
wait_zmtp (worker_t *w, uint64_t until)
{
    for (int c = 0; c < w->nconns; c++)
        w->pfds[c].events = POLLIN | (bz_pending (&w->conns[c]) ? POLLOUT : 0);
    struct timespec ts = wait_for (until, false);
    if (ppoll (w->pfds, (nfds_t) w->nconns, &ts, NULL) <= 0)
        return;
    for (int c = 0; c < w->nconns; c++) {
        short ev = w->pfds[c].revents;
        if ((ev & POLLOUT) && bz_flush (&w->conns[c]))
            conn_lost (w, c);
        if (ev & (POLLIN | POLLERR | POLLHUP))
            w->ready[c] = true;
    }
}

/*  Marks the connections that may have replies, blocking until one may or
    `until` passes.  zmq: ZMQ_FD only signals changes, so a socket we sent
    on since we last looked must be asked for ZMQ_EVENTS before we sleep on
    its fd. */
static void
wait_sockets (worker_t *w, uint64_t until)
{
    if (!O.zmq) {
        wait_zmtp (w, until);
        return;
    }
    bool any = false;
    for (int c = 0; c < w->nconns; c++) {
        if (!w->dirty[c])
            continue;
        int ev = 0;
        size_t sz = sizeof ev;
        zmq_getsockopt (w->socks[c], ZMQ_EVENTS, &ev, &sz);
        w->dirty[c] = false;
        if (ev & ZMQ_POLLIN)
            any = w->ready[c] = true;
    }
    struct timespec ts = wait_for (until, any);
    if (ppoll (w->pfds, (nfds_t) w->nconns, &ts, NULL) > 0)
        for (int c = 0; c < w->nconns; c++)
            if (w->pfds[c].revents) {
                /*  The fd only says "something changed": read ZMQ_EVENTS
                    to re-arm it, and drain when a reply is there. */
                int ev = 0;
                size_t sz = sizeof ev;
                zmq_getsockopt (w->socks[c], ZMQ_EVENTS, &ev, &sz);
                if (ev & ZMQ_POLLIN)
                    w->ready[c] = true;
            }
}

static void *
worker_run (void *arg)
{
    worker_t *w = arg;
    double interval_ns = w->rate > 0 ? (O.proofs ? 1e9 / w->rate : 1e9 * O.batch / w->rate) : 0;
    uint64_t k = 0;                 /* open loop: requests scheduled */
    double cpu0 = 0;
    (void) cpu0;
    w->last_reply_ns = bc_now_ns ();
    uint64_t timeout_ns = (uint64_t) (O.timeout_s * 1e9);
    for (;;) {
        uint64_t now = bc_now_ns ();
        if (atomic_load_explicit (&s_abandon, memory_order_relaxed) || !w->live)
            break;
        uint64_t next_due = 0;
        if (interval_ns > 0) {
            for (;;) {
                uint64_t due = w->t_start + (uint64_t) ((double) k * interval_ns);
                if (!more_to_send (w, due > now ? due : now)) {
                    next_due = 0;
                    break;
                }
                if (due > now) {
                    next_due = due;
                    break;
                }
                int c = pick_conn (w);
                if (c < 0 || !send_request (w, c, due))
                    break;          /* all connections full: it stays due, latency grows */
                k++;
            }
        }
        else
            for (int c = 0; c < w->nconns; c++)
                while (!w->dead[c] && w->inflight[c] < w->cap && more_to_send (w, now)
                       && send_request (w, c, now))
                    now = bc_now_ns ();
        unsigned got = drain (w);
        if (!w->live)
            break;
        now = bc_now_ns ();
        if (w->inflight_total == 0 && !more_to_send (w, now))
            break;
        if (w->inflight_total > 0 && now - w->last_reply_ns > timeout_ns) {
            w->res.errors += unanswered (w, -1);
            note_error (w, "%u requests unanswered for %.0f s", w->inflight_total, O.timeout_s);
            atomic_fetch_add_explicit (&w->bad, 1, memory_order_relaxed);
            break;
        }
        /*  Replies free request slots: send again before sleeping, or a
            connection waits for the next reply on another one (with a
            single connection, for the 100 ms poll timeout). */
        if (got == 0)
            wait_sockets (w, next_due);
    }
    return NULL;
}

static void
worker_setup (worker_t *w, int tid, uint64_t budget, double rate, uint64_t t_start)
{
    memset (w, 0, sizeof *w);
    w->tid = tid;
    bc_result_init (&w->res, "tallyd", O.proofs ? "proofs" : "ingest");
    w->nconns = 0;
    for (unsigned c = (unsigned) tid; c < O.connections; c += O.threads)
        w->nconns++;
    w->socks = calloc ((size_t) w->nconns, sizeof *w->socks);
    w->conns = calloc ((size_t) w->nconns, sizeof *w->conns);
    w->dead = calloc ((size_t) w->nconns, sizeof *w->dead);
    w->live = w->nconns;
    w->pfds = calloc ((size_t) w->nconns, sizeof *w->pfds);
    w->inflight = calloc ((size_t) w->nconns, sizeof *w->inflight);
    w->dirty = calloc ((size_t) w->nconns, sizeof *w->dirty);
    w->ready = calloc ((size_t) w->nconns, sizeof *w->ready);
    w->cap = O.inflight;
    w->nreqs = (uint32_t) w->nconns * w->cap;
    w->reqs = calloc (w->nreqs, sizeof *w->reqs);
    w->free_list = calloc (w->nreqs, sizeof *w->free_list);
    if (!w->socks || !w->conns || !w->dead || !w->pfds || !w->inflight || !w->dirty
    ||  !w->ready || !w->reqs || !w->free_list)
        die ("out of memory");
    for (uint32_t i = 0; i < w->nreqs; i++) {
        w->free_list[w->nreqs - 1 - i] = i;
        if (!O.proofs && !(w->reqs[i].evs = calloc (O.batch, sizeof (ev_slot))))
            die ("out of memory");
    }
    w->nfree = w->nreqs;
    for (int c = 0; c < w->nconns && !O.zmq; c++) {
        if (bz_connect (&w->conns[c], O.api, 10000))
            die ("connection %d: %s", c, bz_error (&w->conns[c]));
        w->pfds[c] = (struct pollfd) { .fd = w->conns[c].fd, .events = POLLIN };
    }
    for (int c = 0; c < w->nconns && O.zmq; c++) {
        void *s = zmq_socket (s_ctx, ZMQ_DEALER);
        int zero = 0;
        zmq_setsockopt (s, ZMQ_SNDHWM, &zero, sizeof zero);
        zmq_setsockopt (s, ZMQ_RCVHWM, &zero, sizeof zero);
        zmq_setsockopt (s, ZMQ_LINGER, &zero, sizeof zero);
        if (zmq_connect (s, O.api))
            die ("cannot connect to %s: %s", O.api, zmq_strerror (zmq_errno ()));
        int fd;
        size_t sz = sizeof fd;
        zmq_getsockopt (s, ZMQ_FD, &fd, &sz);
        w->socks[c] = s;
        w->pfds[c] = (struct pollfd) { .fd = fd, .events = POLLIN };
    }
    w->stream = &s_stream;
    uint64_t seed = s_stream.run_id * 1000003u + (uint64_t) tid;
    bc_dups_init (&w->dups, O.dup_ratio, 65536, seed);
    w->rng = seed ^ 0x5555;
    w->next_keyno = (uint64_t) tid;
    w->budget = budget;
    w->rate = rate;
    w->t_start = t_start;
    w->proof_size = s_proof_size;
    w->deadline = O.duration > 0 ? t_start + (uint64_t) (O.duration * 1e9) : UINT64_MAX;
    tly_buf_init (&w->buf);
    msgpack_zone_init (&w->zone, 1 << 16);
}

static void
worker_free (worker_t *w)
{
    for (int c = 0; c < w->nconns; c++)
        if (O.zmq)
            zmq_close (w->socks[c]);
        else
            bz_close (&w->conns[c]);
    free (w->conns);
    free (w->dead);
    for (uint32_t i = 0; i < w->nreqs; i++)
        free (w->reqs[i].evs);
    free (w->reqs);
    free (w->free_list);
    free (w->socks);
    free (w->pfds);
    free (w->inflight);
    free (w->dirty);
    free (w->ready);
    bc_dups_free (&w->dups);
    tly_buf_free (&w->buf);
    msgpack_zone_destroy (&w->zone);
}

/* ---- monitoring: server memory, progress ---- */

typedef struct {
    pthread_t thread;
    atomic_bool stop;
    uint64_t t0;
    uint64_t hwm_kb, rss_anon_peak_kb;
} monitor_t;

static monitor_t s_mon;

static void
sample_server (void)
{
    bc_proc p;
    if (O.server_pid > 0 && bc_proc_read (O.server_pid, false, &p)) {
        if (p.hwm_kb > s_mon.hwm_kb)
            s_mon.hwm_kb = p.hwm_kb;
        if (p.rss_anon_kb > s_mon.rss_anon_peak_kb)
            s_mon.rss_anon_peak_kb = p.rss_anon_kb;
    }
}

static void *
monitor_run (void *arg)
{
    (void) arg;
    uint64_t last_t = s_mon.t0, last_n = 0, next_print = s_mon.t0 + 1000000000ull;
    while (!atomic_load (&s_mon.stop)) {
        usleep (100000);
        sample_server ();
        uint64_t now = bc_now_ns ();
        if (O.quiet || now < next_print)
            continue;
        next_print += 1000000000ull;
        uint64_t n = 0, reqs = 0;
        for (unsigned t = 0; t < O.threads; t++) {
            n += atomic_load_explicit (&s_workers[t].done_events, memory_order_relaxed);
            reqs += atomic_load_explicit (&s_workers[t].done_requests, memory_order_relaxed);
        }
        double dt = (double) (now - last_t) / 1e9;
        bc_progress ("[%5.1fs] %llu %s done, %.0f/s now, %llu requests, server RssAnon %.1f MiB",
                     (double) (now - s_mon.t0) / 1e9, (unsigned long long) n,
                     O.proofs ? "proofs" : "events", (double) (n - last_n) / dt,
                     (unsigned long long) reqs, (double) s_mon.rss_anon_peak_kb / 1024.0);
        last_t = now;
        last_n = n;
    }
    return NULL;
}

/* ---- proofs: a full check of a few, before the timed run ---- */

static bool
proof_check_one (rpc_t *r, uint64_t seq, uint64_t size)
{
    tly_buf b;
    tly_buf_init (&b);
    msgpack_packer pk;
    tly_buf_packer (&b, &pk);
    msgpack_pack_map (&pk, 3);
    tly_pack_cstr (&pk, "op");
    tly_pack_cstr (&pk, "get");
    tly_pack_cstr (&pk, "id");
    msgpack_pack_uint64 (&pk, 1);
    tly_pack_cstr (&pk, "seq");
    msgpack_pack_uint64 (&pk, seq);
    rpc_send (r, &b);
    uint8_t leaf[32];
    tly_str bin;
    bool ok = rpc_recv (r, 10000) && reply_ok (&r->body)
           && tly_msg_get_bin (&r->body, "leaf", &bin) == TLY_OK && bin.len == 32;
    if (ok) {
        memcpy (leaf, bin.ptr, 32);
        tly_buf_reset (&b);
        tly_buf_packer (&b, &pk);
        msgpack_pack_map (&pk, 4);
        tly_pack_cstr (&pk, "op");
        tly_pack_cstr (&pk, "proof");
        tly_pack_cstr (&pk, "id");
        msgpack_pack_uint64 (&pk, 2);
        tly_pack_cstr (&pk, "seq");
        msgpack_pack_uint64 (&pk, seq);
        tly_pack_cstr (&pk, "tree_size");
        msgpack_pack_uint64 (&pk, size);
        rpc_send (r, &b);
        ok = rpc_recv (r, 10000) && reply_ok (&r->body);
    }
    if (ok) {
        const msgpack_object *path = tly_msg_get (&r->body, "path"), *so = tly_msg_get (&r->body, "sth");
        tly_sth sth;
        static uint8_t p[TLY_PATH_MAX][TLY_HASH_LEN];
        ok = path && path->type == MSGPACK_OBJECT_ARRAY && path->via.array.size <= TLY_PATH_MAX
          && so && tly_sth_decode (so, &sth) == TLY_OK && sth.tree_size == size
          && tly_sth_verify (&sth, s_pk) == TLY_OK;
        for (uint32_t i = 0; ok && i < path->via.array.size; i++) {
            const msgpack_object *h = &path->via.array.ptr[i];
            ok = h->type == MSGPACK_OBJECT_BIN && h->via.bin.size == 32;
            if (ok)
                memcpy (p[i], h->via.bin.ptr, 32);
        }
        ok = ok && tly_merkle_verify_inclusion (leaf, seq, size, (const uint8_t (*)[32]) p,
                                                path->via.array.size, sth.root) == TLY_OK;
    }
    tly_buf_free (&b);
    return ok;
}

/* ---- main ---- */

static void
parse_args (int argc, char **argv)
{
    enum { O_SPAWN = 256, O_TALLYD, O_TALLYD_ARG, O_DATA_DIR, O_KEEP, O_API, O_PID, O_CONN,
           O_INFL, O_BATCH, O_EVENTS, O_DURATION, O_CUST, O_METERS, O_DUP, O_RATE, O_THREADS,
           O_VERIFY, O_TIMEOUT, O_PROOFS, O_RECOVERY, O_JSON, O_LABEL, O_QUIET, O_HELP,
           O_TRANSPORT };
    static const struct option lo[] = {
        { "spawn", no_argument, 0, O_SPAWN }, { "tallyd", required_argument, 0, O_TALLYD },
        { "tallyd-arg", required_argument, 0, O_TALLYD_ARG },
        { "data-dir", required_argument, 0, O_DATA_DIR }, { "keep", no_argument, 0, O_KEEP },
        { "api", required_argument, 0, O_API }, { "server-pid", required_argument, 0, O_PID },
        { "connections", required_argument, 0, O_CONN },
        { "inflight", required_argument, 0, O_INFL }, { "batch", required_argument, 0, O_BATCH },
        { "events", required_argument, 0, O_EVENTS },
        { "duration", required_argument, 0, O_DURATION },
        { "customers", required_argument, 0, O_CUST }, { "meters", required_argument, 0, O_METERS },
        { "dup-ratio", required_argument, 0, O_DUP }, { "rate", required_argument, 0, O_RATE },
        { "threads", required_argument, 0, O_THREADS },
        { "transport", required_argument, 0, O_TRANSPORT },
        { "verify-every", required_argument, 0, O_VERIFY },
        { "timeout", required_argument, 0, O_TIMEOUT }, { "proofs", no_argument, 0, O_PROOFS },
        { "recovery", no_argument, 0, O_RECOVERY }, { "json", no_argument, 0, O_JSON },
        { "label", required_argument, 0, O_LABEL }, { "quiet", no_argument, 0, O_QUIET },
        { "help", no_argument, 0, O_HELP }, { 0, 0, 0, 0 },
    };
    O.tallyd = getenv ("TALLYD");
    snprintf (O.api, sizeof O.api, "tcp://127.0.0.1:7400");
    O.connections = 4;
    O.inflight = 1;
    O.batch = 100;
    O.threads = 1;
    O.customers = 1000;
    O.meters = 10;
    O.verify_every = 100;
    O.timeout_s = 30;
    int c;
    while ((c = getopt_long (argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
            case O_SPAWN: O.spawn = true; break;
            case O_TALLYD: O.tallyd = optarg; break;
            case O_TALLYD_ARG:
                if (O.ntallyd_args == MAX_TALLYD_ARGS)
                    die ("too many --tallyd-arg");
                O.tallyd_args[O.ntallyd_args++] = optarg;
                break;
            case O_DATA_DIR:
                snprintf (O.data_dir, sizeof O.data_dir, "%s", optarg);
                O.data_dir_given = true;
                break;
            case O_KEEP: O.keep = true; break;
            case O_API: snprintf (O.api, sizeof O.api, "%s", optarg); break;
            case O_PID: O.server_pid = (pid_t) atoi (optarg); break;
            case O_CONN: O.connections = (unsigned) atoi (optarg); break;
            case O_INFL: O.inflight = (unsigned) atoi (optarg); O.inflight_given = true; break;
            case O_BATCH: O.batch = (unsigned) atoi (optarg); break;
            case O_EVENTS: O.events = strtoull (optarg, NULL, 10); break;
            case O_DURATION: O.duration = atof (optarg); break;
            case O_CUST: O.customers = (uint32_t) atoi (optarg); break;
            case O_METERS: O.meters = (uint32_t) atoi (optarg); break;
            case O_DUP: O.dup_ratio = atof (optarg); break;
            case O_RATE: O.rate = atof (optarg); break;
            case O_THREADS: O.threads = (unsigned) atoi (optarg); break;
            case O_TRANSPORT:
                if (strcmp (optarg, "zmq") && strcmp (optarg, "zmtp"))
                    die ("--transport is zmtp or zmq");
                O.zmq = strcmp (optarg, "zmq") == 0;
                break;
            case O_VERIFY: O.verify_every = (unsigned) atoi (optarg); break;
            case O_TIMEOUT: O.timeout_s = atof (optarg); break;
            case O_PROOFS: O.proofs = true; break;
            case O_RECOVERY: O.recovery = true; break;
            case O_JSON: O.json = true; break;
            case O_LABEL: O.label = optarg; break;
            case O_QUIET: O.quiet = true; break;
            case O_HELP: usage (stdout); exit (0);
            default: usage (stderr); exit (2);
        }
    }
    if (optind < argc) {
        usage (stderr);
        exit (2);
    }
    if (O.connections < 1 || O.connections > 4096 || O.inflight < 1 || O.inflight > 100000
    ||  O.batch < 1 || O.batch > TLY_BATCH_MAX || O.threads < 1 || O.threads > MAX_THREADS
    ||  O.threads > O.connections || O.dup_ratio < 0 || O.dup_ratio >= 1 || O.rate < 0
    ||  O.customers < 1 || O.meters < 1 || O.timeout_s <= 0)
        die ("an option is out of range (see --help)");
    if (O.rate > 0 && !O.inflight_given)
        O.inflight = 1024;
    if (O.recovery && !O.spawn)
        die ("--recovery needs --spawn");
    if (O.recovery && O.duration <= 0)
        O.duration = 3;
    if (!O.events && O.duration <= 0)
        O.events = 100000;
    if (O.proofs)
        O.dup_ratio = 0;
}

static void
on_signal (int sig)
{
    (void) sig;
    atomic_store (&s_abandon, true);
}

/*  Runs the load threads; fills *total. */
static void
run_load (uint64_t t_start)
{
    for (unsigned t = 0; t < O.threads; t++) {
        uint64_t budget = UINT64_MAX;
        if (O.events && !(O.recovery)) {
            budget = O.events / O.threads + (t < O.events % O.threads ? 1 : 0);
        }
        worker_setup (&s_workers[t], (int) t, budget, O.rate / O.threads, t_start);
    }
    for (unsigned t = 0; t < O.threads; t++)
        if (pthread_create (&s_workers[t].thread, NULL, worker_run, &s_workers[t]))
            die ("pthread_create failed");
}

static void
join_load (bc_result *total)
{
    for (unsigned t = 0; t < O.threads; t++) {
        worker_t *w = &s_workers[t];
        pthread_join (w->thread, NULL);
        total->events += w->res.events;
        total->requests += w->res.requests;
        total->accepted += w->res.accepted;
        total->duplicate += w->res.duplicate;
        total->conflict += w->res.conflict;
        total->rejected += w->res.rejected;
        total->errors += w->res.errors;
        total->unexpected += w->res.unexpected;
        total->dups_sent += w->res.dups_sent;
        total->sth_verified += w->res.sth_verified;
        bh_merge (&total->hist, &w->res.hist);
        if (w->first_error[0])
            fprintf (stderr, "tally-bench: thread %u: first problem: %s\n", t, w->first_error);
    }
}

static int
run_recovery (void)
{
    /*  Phase 1: load, then kill -9 in the middle of it. */
    tly_sth sth0;
    server_start (&sth0);
    bc_result load;
    bc_result_init (&load, "tallyd", "recovery");
    uint64_t t0 = bc_now_ns ();
    s_mon.t0 = t0;
    run_load (t0);
    bc_sleep_until_ns (t0 + (uint64_t) (O.duration * 1e9));
    pid_t victim = S.pid;
    atomic_store (&s_killing, true);
    kill (victim, SIGKILL);
    waitpid (victim, NULL, 0);
    S.pid = 0;
    atomic_store (&s_abandon, true);
    join_load (&load);
    uint64_t acked = load.accepted;
    /*  Phase 2: restart, then ask until answered. */
    uint64_t t_start = bc_now_ns ();
    server_exec ();
    rpc_t r;
    rpc_open (&r, O.api, 1);
    tly_buf b;
    tly_buf_init (&b);
    pack_simple (&b, "sth", 7);
    rpc_send (&r, &b);
    double first_s = -1, ingest_s = -1;
    tly_sth sth1 = { 0 };
    while (bc_now_ns () - t_start < 600ull * 1000000000ull) {
        if (waitpid (S.pid, NULL, WNOHANG) == S.pid) {
            S.pid = 0;
            die ("tallyd exited while recovering");
        }
        if (rpc_recv (&r, 100)) {
            const msgpack_object *so = tly_msg_get (&r.body, "sth");
            if (!reply_ok (&r.body) || !so || tly_sth_decode (so, &sth1))
                die ("the first answer after the restart is not a signed head");
            first_s = (double) (bc_now_ns () - t_start) / 1e9;
            break;
        }
    }
    /*  And the first durable write. */
    msgpack_packer pk;
    tly_buf_reset (&b);
    tly_buf_packer (&b, &pk);
    msgpack_pack_map (&pk, 3);
    tly_pack_cstr (&pk, "op");
    tly_pack_cstr (&pk, "ingest");
    tly_pack_cstr (&pk, "id");
    msgpack_pack_uint64 (&pk, 8);
    tly_pack_cstr (&pk, "events");
    msgpack_pack_array (&pk, 1);
    bc_event ev;
    bc_event_make (&s_stream, UINT64_C (1) << 50, &ev);
    tly_event_pack (&ev.ev, &pk);
    rpc_send (&r, &b);
    bool ingest_ok = false;
    if (rpc_recv (&r, 60000)) {
        const msgpack_object *res = tly_msg_get (&r.body, "results");
        ingest_ok = reply_ok (&r.body) && res && res->type == MSGPACK_OBJECT_ARRAY
                 && res->via.array.size == 1
                 && obj_str_eq (tly_msg_get (&res->via.array.ptr[0], "status"), "accepted");
        ingest_s = (double) (bc_now_ns () - t_start) / 1e9;
    }
    tly_buf_free (&b);
    rpc_close (&r);
    O.server_pid = S.pid;
    bool durable = sth1.tree_size >= sth0.tree_size + acked;
    bool sig_ok = tly_sth_verify (&sth1, s_pk) == TLY_OK;
    int status = (first_s >= 0 && ingest_ok && durable && sig_ok) ? 0 : 1;
    if (O.json) {
        printf ("{\"system\":\"tallyd\",\"mode\":\"recovery\",\"tree_before_load\":%llu,"
                "\"acked_during_load\":%llu,\"tree_after_restart\":%llu,\"durable\":%s,"
                "\"sth_verified\":%s,\"first_answer_s\":%.4f,\"first_ingest_s\":%.4f,"
                "\"ingest_ok\":%s%s%s%s}\n",
                (unsigned long long) sth0.tree_size, (unsigned long long) acked,
                (unsigned long long) sth1.tree_size, durable ? "true" : "false",
                sig_ok ? "true" : "false", first_s, ingest_s, ingest_ok ? "true" : "false",
                O.label ? ",\"label\":\"" : "", O.label ? O.label : "", O.label ? "\"" : "");
    }
    else {
        printf ("tallyd recovery: log of %llu entries, %llu more acknowledged during %.1f s of "
                "load, then kill -9\n", (unsigned long long) sth0.tree_size,
                (unsigned long long) acked, O.duration);
        printf ("  restart -> first answer (sth)     %.3f s\n", first_s);
        printf ("  restart -> first accepted ingest  %.3f s\n", ingest_s);
        printf ("  tree size after restart           %llu (%s every acknowledged event; head "
                "signature %s)\n", (unsigned long long) sth1.tree_size,
                durable ? "holds" : "LOST some", sig_ok ? "verifies" : "DOES NOT VERIFY");
    }
    for (unsigned t = 0; t < O.threads; t++)
        worker_free (&s_workers[t]);
    return status;
}

int
main (int argc, char **argv)
{
    parse_args (argc, argv);
    if (sodium_init () < 0)
        die ("libsodium failed to initialise");
    signal (SIGPIPE, SIG_IGN);
    s_ctx = zmq_ctx_new ();
    bc_stream_init (&s_stream, O.customers, O.meters);
    if (O.recovery) {
        int st = run_recovery ();
        cleanup ();
        zmq_ctx_term (s_ctx);
        return st;
    }
    tly_sth sth0;
    if (O.spawn)
        server_start (&sth0);
    else
    if (!fetch_key_and_sth (5000, &sth0))
        die ("no valid answer to pubkey and sth from %s", O.api);
    struct sigaction sa;
    memset (&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction (SIGINT, &sa, NULL);
    sigaction (SIGTERM, &sa, NULL);

    if (O.proofs) {
        if (sth0.tree_size == 0)
            die ("--proofs needs a non-empty log");
        rpc_t r;
        rpc_open (&r, O.api, 10);
        uint64_t rng = s_stream.run_id;
        for (int i = 0; i < 20; i++) {
            uint64_t seq = bc_rand (&rng) % sth0.tree_size;
            if (!proof_check_one (&r, seq, sth0.tree_size))
                die ("the inclusion proof of seq %llu in %llu does not verify",
                     (unsigned long long) seq, (unsigned long long) sth0.tree_size);
        }
        rpc_close (&r);
    }

    bc_result total;
    bc_result_init (&total, "tallyd", O.proofs ? "proofs" : "ingest");
    total.connections = O.connections;
    total.inflight = O.inflight;
    total.batch = O.proofs ? 1 : O.batch;
    total.offered_rate = O.rate;
    total.tree_before = sth0.tree_size;
    bc_proc p0 = { 0 };
    bool have_proc = O.server_pid > 0 && bc_proc_read (O.server_pid, false, &p0);
    double cpu0 = bc_cpu_self_s ();
    double mcpu0 = bc_cpu_machine_s ();
    uint64_t t0 = bc_now_ns () + 2000000;   /* sockets connect meanwhile */
    s_mon.t0 = t0;
    s_proof_size = sth0.tree_size;
    run_load (t0);
    pthread_create (&s_mon.thread, NULL, monitor_run, NULL);
    join_load (&total);
    uint64_t t1 = bc_now_ns ();
    atomic_store (&s_mon.stop, true);
    pthread_join (s_mon.thread, NULL);
    bc_progress_end ();
    total.elapsed_s = (double) (t1 - t0) / 1e9;
    total.client_cpu_s = bc_cpu_self_s () - cpu0;
    total.machine_cpu_s = bc_cpu_machine_s () - mcpu0;
    if (O.proofs)
        total.events = total.accepted;
    sample_server ();
    bc_proc p1;
    if (have_proc && bc_proc_read (O.server_pid, false, &p1)) {
        total.server_cpu_s = p1.cpu_s - p0.cpu_s;
        total.server_hwm_kb = p1.hwm_kb;
        total.server_rss_anon_peak_kb = s_mon.rss_anon_peak_kb;
    }
    tly_sth sth1 = sth0;
    bool tree_ok = true;
    if (!O.proofs && !atomic_load (&s_abandon)) {
        if (!fetch_key_and_sth (10000, &sth1)) {
            fprintf (stderr, "tally-bench: no valid signed head after the run\n");
            total.unexpected++;
        }
        total.tree_after = sth1.tree_size;
        /*  With a spawned server nobody else writes: the log grew by exactly
            the accepted events. */
        tree_ok = !O.spawn || sth1.tree_size - sth0.tree_size == total.accepted;
    }
    else
        total.tree_after = sth0.tree_size;
    if (O.data_dir[0]) {
        char path[1200];
        snprintf (path, sizeof path, "%s/ledger/data.mdb", O.data_dir);
        total.data_bytes = bc_file_size (path);
    }
    if (S.pid > 0) {
        int st;
        if (waitpid (S.pid, &st, WNOHANG) == S.pid) {
            S.pid = 0;
            fprintf (stderr, "tally-bench: tallyd died during the run: %s %d\n",
                     WIFSIGNALED (st) ? "signal" : "exit status",
                     WIFSIGNALED (st) ? WTERMSIG (st) : WEXITSTATUS (st));
            total.unexpected++;
        }
    }
    bool clean = total.errors == 0 && total.unexpected == 0 && total.conflict == 0
              && total.rejected == 0 && tree_ok && !atomic_load (&s_abandon);
    if (!O.proofs)
        clean = clean && total.duplicate == total.dups_sent
             && total.accepted + total.duplicate == total.events;
    if (!tree_ok)
        fprintf (stderr, "tally-bench: the log grew by %llu entries but %llu were accepted\n",
                 (unsigned long long) (sth1.tree_size - sth0.tree_size),
                 (unsigned long long) total.accepted);
    if (O.json) {
        char extra[600];
        snprintf (extra, sizeof extra, "\"clean\":%s,\"label\":\"%s\"", clean ? "true" : "false",
                  O.label ? O.label : "");
        bc_result_json (&total, stdout, extra);
    }
    else {
        bc_result_print (&total, stdout);
        printf ("  verdict          %s\n", clean ? "every reply as expected"
                                              : "UNEXPECTED REPLIES (see stderr)");
    }
    for (unsigned t = 0; t < O.threads; t++)
        worker_free (&s_workers[t]);
    if (!clean)
        server_log_tail ();
    cleanup ();
    zmq_ctx_term (s_ctx);
    return clean ? 0 : 1;
}
