/*  pg_bench.c -- tally-pg-bench: the PostgreSQL baseline of issue 3.

    The way most teams would build a usage ledger: one table

        tally_events (seq bigserial primary key, customer text, meter text,
                      key text, qty bigint, ts bigint, props jsonb,
                      unique (customer, key))

    and, per request, one multi-row `INSERT ... ON CONFLICT (customer, key)
    DO NOTHING RETURNING key` of --batch rows, in its own transaction with
    synchronous_commit=on (the commit is fsync'd before it returns: the same
    durability as tallyd's `accepted`).  One libpq connection per thread,
    one request in flight on each (libpq is synchronous).  The rows are
    tally-bench's event stream (common.h), duplicates included: a re-sent
    key must insert nothing.
*/
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <libpq-fe.h>
#include "common.h"

#define MAX_CONN 512

typedef struct {
    const char *conninfo;
    unsigned connections, batch;
    uint64_t events;
    double duration, rate;
    uint32_t customers, meters;
    double dup_ratio;
    pid_t server_pid;
    bool setup, json, quiet;
    const char *label;
} opts_t;

static opts_t O;

static void
usage (FILE *out)
{
    fprintf (out,
"Usage: tally-pg-bench [OPTIONS]\n"
"Drives PostgreSQL with tally-bench's event stream: multi-row INSERT ... ON CONFLICT\n"
"(customer, key) DO NOTHING per request, synchronous_commit=on, one connection per thread.\n"
"\n"
"  --conninfo STR     libpq connection string [host=127.0.0.1 port=5432 dbname=postgres]\n"
"  --setup            drop and create the table first\n"
"  --connections N    [4]   --batch N  rows per INSERT [100]\n"
"  --events N         [100000], or --duration S\n"
"  --rate R           open loop: R events/s offered; latency from the intended send time\n"
"  --customers N      [1000]  --meters N [10]  --dup-ratio R [0]\n"
"  --server-pid PID   the postmaster, for CPU and memory (its backends included)\n"
"  --json             one JSON result line  --label TEXT  --quiet\n");
}

static void
die (const char *msg, const char *why)
{
    fprintf (stderr, "tally-pg-bench: %s%s%s\n", msg, why ? ": " : "", why ? why : "");
    exit (2);
}

static bc_stream s_stream;
static atomic_bool s_stop;

typedef struct {
    int tid;
    pthread_t thread;
    PGconn *conn;
    bc_dups dups;
    uint64_t next_keyno, budget, sent;
    double rate;
    uint64_t t0, deadline;
    unsigned prepared[2];           /* batch sizes with a prepared statement */
    bc_result res;
    _Atomic uint64_t done;
    char first_error[256];
} worker_t;

static worker_t s_w[MAX_CONN];

static void
quiet_notice (void *arg, const char *message)
{
    (void) arg;
    (void) message;
}

static PGconn *
connect_db (void)
{
    PGconn *c = PQconnectdb (O.conninfo);
    if (PQstatus (c) != CONNECTION_OK)
        die ("cannot connect", PQerrorMessage (c));
    PQsetNoticeProcessor (c, quiet_notice, NULL);
    PGresult *r = PQexec (c, "SET synchronous_commit = on");
    if (PQresultStatus (r) != PGRES_COMMAND_OK)
        die ("SET synchronous_commit", PQerrorMessage (c));
    PQclear (r);
    return c;
}

static void
exec_ok (PGconn *c, const char *sql)
{
    PGresult *r = PQexec (c, sql);
    if (PQresultStatus (r) != PGRES_COMMAND_OK && PQresultStatus (r) != PGRES_TUPLES_OK)
        die (sql, PQerrorMessage (c));
    PQclear (r);
}

static void
prepare (worker_t *w, unsigned n)
{
    if (w->prepared[0] == n || w->prepared[1] == n)
        return;
    size_t cap = 200 + (size_t) n * 64;
    char *sql = malloc (cap);
    if (!sql)
        die ("out of memory", NULL);
    size_t len = (size_t) snprintf (sql, cap, "INSERT INTO tally_events "
                                    "(customer, meter, key, qty, ts, props) VALUES ");
    for (unsigned i = 0; i < n; i++) {
        unsigned p = i * 6;
        len += (size_t) snprintf (sql + len, cap - len, "%s($%u,$%u,$%u,$%u,$%u,$%u::jsonb)",
                                  i ? "," : "", p + 1, p + 2, p + 3, p + 4, p + 5, p + 6);
    }
    snprintf (sql + len, cap - len, " ON CONFLICT (customer, key) DO NOTHING RETURNING key");
    char name[32];
    snprintf (name, sizeof name, "ins%u", n);
    PGresult *r = PQprepare (w->conn, name, sql, (int) n * 6, NULL);
    if (PQresultStatus (r) != PGRES_COMMAND_OK)
        die ("PREPARE", PQerrorMessage (w->conn));
    PQclear (r);
    free (sql);
    w->prepared[w->prepared[0] ? 1 : 0] = n;
}

typedef struct {
    char qty[24], ts[24], props[48];
    bc_event ev;
} row_t;

static bool
more (worker_t *w, uint64_t now)
{
    if (atomic_load_explicit (&s_stop, memory_order_relaxed))
        return false;
    if (w->budget != UINT64_MAX)
        return w->sent < w->budget;
    return now < w->deadline;
}

static void *
worker_run (void *arg)
{
    worker_t *w = arg;
    row_t *rows = calloc (O.batch, sizeof *rows);
    const char **vals = calloc ((size_t) O.batch * 6, sizeof *vals);
    uint64_t *keys = calloc (O.batch, sizeof *keys);
    bool *dup = calloc (O.batch, sizeof *dup);
    if (!rows || !vals || !keys || !dup)
        die ("out of memory", NULL);
    double interval = w->rate > 0 ? 1e9 * O.batch / w->rate : 0;
    uint64_t k = 0;
    for (;;) {
        uint64_t intended = bc_now_ns ();
        if (interval > 0) {
            intended = w->t0 + (uint64_t) ((double) k++ * interval);
            if (!more (w, intended))
                break;
            bc_sleep_until_ns (intended);
        }
        else
        if (!more (w, intended))
            break;
        uint64_t left = w->budget == UINT64_MAX ? O.batch : w->budget - w->sent;
        unsigned n = (unsigned) (left < O.batch ? left : O.batch);
        unsigned nnew = 0;
        for (unsigned i = 0; i < n; i++) {
            uint64_t seq;
            dup[i] = bc_dups_next (&w->dups, &keys[i], &seq);
            if (dup[i])
                w->res.dups_sent++;
            else {
                keys[i] = w->next_keyno;
                w->next_keyno += O.connections;
                nnew++;
            }
            row_t *r = &rows[i];
            bc_event_make (&s_stream, keys[i], &r->ev);
            snprintf (r->qty, sizeof r->qty, "%llu", (unsigned long long) r->ev.ev.qty);
            snprintf (r->ts, sizeof r->ts, "%llu", (unsigned long long) r->ev.ev.ts);
            snprintf (r->props, sizeof r->props, "{\"region\": \"%s\"}", r->ev.region);
            const char **v = &vals[i * 6];
            v[0] = r->ev.customer;
            v[1] = r->ev.meter;
            v[2] = r->ev.key;
            v[3] = r->qty;
            v[4] = r->ts;
            v[5] = r->props;
        }
        prepare (w, n);
        char name[32];
        snprintf (name, sizeof name, "ins%u", n);
        PGresult *res = PQexecPrepared (w->conn, name, (int) n * 6, vals, NULL, NULL, 0);
        uint64_t end = bc_now_ns ();
        w->sent += n;
        w->res.events += n;
        w->res.requests++;
        bh_record (&w->res.hist, end - intended);
        if (PQresultStatus (res) != PGRES_TUPLES_OK) {
            w->res.errors += n;
            if (!w->first_error[0])
                snprintf (w->first_error, sizeof w->first_error, "%s",
                          PQerrorMessage (w->conn));
        }
        else {
            unsigned got = (unsigned) PQntuples (res);
            w->res.accepted += got;
            w->res.duplicate += n - got;
            if (got != nnew) {
                w->res.unexpected++;
                if (!w->first_error[0])
                    snprintf (w->first_error, sizeof w->first_error,
                              "%u rows inserted, %u new keys sent", got, nnew);
            }
            for (unsigned i = 0; i < n; i++)
                if (!dup[i])
                    bc_dups_ack (&w->dups, keys[i], 0);
        }
        PQclear (res);
        atomic_fetch_add_explicit (&w->done, n, memory_order_relaxed);
    }
    free (rows);
    free (vals);
    free (keys);
    free (dup);
    return NULL;
}

static void
parse_args (int argc, char **argv)
{
    enum { A_CI = 256, A_SETUP, A_CONN, A_BATCH, A_EVENTS, A_DURATION, A_RATE, A_CUST, A_METERS,
           A_DUP, A_PID, A_JSON, A_LABEL, A_QUIET, A_HELP, A_INFL };
    static const struct option lo[] = {
        { "conninfo", required_argument, 0, A_CI }, { "setup", no_argument, 0, A_SETUP },
        { "connections", required_argument, 0, A_CONN },
        { "batch", required_argument, 0, A_BATCH }, { "events", required_argument, 0, A_EVENTS },
        { "duration", required_argument, 0, A_DURATION },
        { "rate", required_argument, 0, A_RATE }, { "customers", required_argument, 0, A_CUST },
        { "meters", required_argument, 0, A_METERS },
        { "dup-ratio", required_argument, 0, A_DUP },
        { "server-pid", required_argument, 0, A_PID }, { "json", no_argument, 0, A_JSON },
        { "label", required_argument, 0, A_LABEL }, { "quiet", no_argument, 0, A_QUIET },
        { "inflight", required_argument, 0, A_INFL },
        { "help", no_argument, 0, A_HELP }, { 0, 0, 0, 0 },
    };
    O.conninfo = "host=127.0.0.1 port=5432 dbname=postgres";
    O.connections = 4;
    O.batch = 100;
    O.customers = 1000;
    O.meters = 10;
    int ch;
    while ((ch = getopt_long (argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
            case A_CI: O.conninfo = optarg; break;
            case A_SETUP: O.setup = true; break;
            case A_CONN: O.connections = (unsigned) atoi (optarg); break;
            case A_BATCH: O.batch = (unsigned) atoi (optarg); break;
            case A_EVENTS: O.events = strtoull (optarg, NULL, 10); break;
            case A_DURATION: O.duration = atof (optarg); break;
            case A_RATE: O.rate = atof (optarg); break;
            case A_CUST: O.customers = (uint32_t) atoi (optarg); break;
            case A_METERS: O.meters = (uint32_t) atoi (optarg); break;
            case A_DUP: O.dup_ratio = atof (optarg); break;
            case A_PID: O.server_pid = (pid_t) atoi (optarg); break;
            case A_JSON: O.json = true; break;
            case A_LABEL: O.label = optarg; break;
            case A_QUIET: O.quiet = true; break;
            case A_INFL: break;     /* accepted for symmetry: libpq has 1 in flight */
            case A_HELP: usage (stdout); exit (0);
            default: usage (stderr); exit (2);
        }
    }
    if (optind < argc || O.connections < 1 || O.connections > MAX_CONN || O.batch < 1
    ||  O.batch > 10000 || O.dup_ratio < 0 || O.dup_ratio >= 1 || O.rate < 0) {
        usage (stderr);
        exit (2);
    }
    if (!O.events && O.duration <= 0)
        O.events = 100000;
}

static uint64_t
wal_lsn (PGconn *c)
{
    PGresult *r = PQexec (c, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint");
    uint64_t v = PQresultStatus (r) == PGRES_TUPLES_OK ? strtoull (PQgetvalue (r, 0, 0), NULL, 10)
                                                        : 0;
    PQclear (r);
    return v;
}

static uint64_t
query_u64 (PGconn *c, const char *sql)
{
    PGresult *r = PQexec (c, sql);
    uint64_t v = PQresultStatus (r) == PGRES_TUPLES_OK && PQntuples (r)
               ? strtoull (PQgetvalue (r, 0, 0), NULL, 10) : 0;
    PQclear (r);
    return v;
}

int
main (int argc, char **argv)
{
    parse_args (argc, argv);
    bc_stream_init (&s_stream, O.customers, O.meters);
    PGconn *admin = connect_db ();
    if (O.setup) {
        exec_ok (admin, "DROP TABLE IF EXISTS tally_events");
        exec_ok (admin, "CREATE TABLE tally_events (seq bigserial PRIMARY KEY, "
                        "customer text NOT NULL, meter text NOT NULL, key text NOT NULL, "
                        "qty bigint NOT NULL, ts bigint NOT NULL, props jsonb NOT NULL, "
                        "UNIQUE (customer, key))");
        exec_ok (admin, "CHECKPOINT");
    }
    uint64_t rows0 = query_u64 (admin, "SELECT count(*) FROM tally_events");
    for (unsigned t = 0; t < O.connections; t++) {
        worker_t *w = &s_w[t];
        w->tid = (int) t;
        w->conn = connect_db ();
        bc_result_init (&w->res, "postgresql", "ingest");
        bc_dups_init (&w->dups, O.dup_ratio, 65536, s_stream.run_id + t);
        w->next_keyno = t;
        w->budget = O.events ? O.events / O.connections + (t < O.events % O.connections) : UINT64_MAX;
        w->rate = O.rate / O.connections;
    }
    uint64_t wal0 = wal_lsn (admin);
    bc_proc p0 = { 0 };
    bool have_proc = O.server_pid > 0 && bc_proc_read (O.server_pid, true, &p0);
    double cpu0 = bc_cpu_self_s ();
    double mcpu0 = bc_cpu_machine_s ();
    uint64_t t0 = bc_now_ns () + 1000000;
    for (unsigned t = 0; t < O.connections; t++) {
        s_w[t].t0 = t0;
        s_w[t].deadline = O.duration > 0 ? t0 + (uint64_t) (O.duration * 1e9) : UINT64_MAX;
        if (pthread_create (&s_w[t].thread, NULL, worker_run, &s_w[t]))
            die ("pthread_create", strerror (errno));
    }
    /*  Monitor: memory peaks and progress, until every worker is done. */
    uint64_t rss_anon_peak = 0, last_n = 0, last_t = t0, next_print = t0 + 1000000000ull;
    for (;;) {
        usleep (100000);
        bool running = false;
        uint64_t n = 0;
        for (unsigned t = 0; t < O.connections; t++) {
            n += atomic_load_explicit (&s_w[t].done, memory_order_relaxed);
            running |= s_w[t].budget == UINT64_MAX
                     ? bc_now_ns () < s_w[t].deadline : s_w[t].done < s_w[t].budget;
        }
        bc_proc p;
        if (have_proc && bc_proc_read (O.server_pid, true, &p) && p.rss_anon_kb > rss_anon_peak)
            rss_anon_peak = p.rss_anon_kb;
        uint64_t now = bc_now_ns ();
        if (!O.quiet && now >= next_print) {
            bc_progress ("[%5.1fs] %llu events, %.0f/s now", (double) (now - t0) / 1e9,
                         (unsigned long long) n, (double) (n - last_n) * 1e9 / (double) (now - last_t));
            next_print += 1000000000ull;
            last_n = n;
            last_t = now;
        }
        if (!running)
            break;
    }
    bc_result total;
    bc_result_init (&total, "postgresql", "ingest");
    for (unsigned t = 0; t < O.connections; t++) {
        worker_t *w = &s_w[t];
        pthread_join (w->thread, NULL);
        total.events += w->res.events;
        total.requests += w->res.requests;
        total.accepted += w->res.accepted;
        total.duplicate += w->res.duplicate;
        total.errors += w->res.errors;
        total.unexpected += w->res.unexpected;
        total.dups_sent += w->res.dups_sent;
        bh_merge (&total.hist, &w->res.hist);
        if (w->first_error[0])
            fprintf (stderr, "tally-pg-bench: connection %u: first problem: %s\n", t,
                     w->first_error);
    }
    uint64_t t1 = bc_now_ns ();
    bc_progress_end ();
    total.elapsed_s = (double) (t1 - t0) / 1e9;
    total.client_cpu_s = bc_cpu_self_s () - cpu0;
    total.machine_cpu_s = bc_cpu_machine_s () - mcpu0;
    total.connections = O.connections;
    total.inflight = 1;
    total.batch = O.batch;
    total.offered_rate = O.rate;
    bc_proc p1;
    if (have_proc && bc_proc_read (O.server_pid, true, &p1)) {
        total.server_cpu_s = p1.cpu_s - p0.cpu_s;
        total.server_hwm_kb = p1.hwm_kb;
        total.server_rss_anon_peak_kb = rss_anon_peak;
    }
    total.wal_bytes = wal_lsn (admin) - wal0;
    total.tree_before = rows0;
    total.tree_after = query_u64 (admin, "SELECT count(*) FROM tally_events");
    total.data_bytes = query_u64 (admin, "SELECT pg_total_relation_size('tally_events')");
    bool clean = total.errors == 0 && total.unexpected == 0
              && total.duplicate == total.dups_sent
              && total.tree_after - total.tree_before == total.accepted;
    if (O.json) {
        char extra[300];
        snprintf (extra, sizeof extra, "\"clean\":%s,\"label\":\"%s\"", clean ? "true" : "false",
                  O.label ? O.label : "");
        bc_result_json (&total, stdout, extra);
    }
    else
        bc_result_print (&total, stdout);
    for (unsigned t = 0; t < O.connections; t++) {
        PQfinish (s_w[t].conn);
        bc_dups_free (&s_w[t].dups);
    }
    PQfinish (admin);
    return clean ? 0 : 1;
}
