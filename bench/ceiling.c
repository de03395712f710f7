/*  ceiling.c -- tally-ceiling: the physical limit of tallyd's design on this
    machine (issue 3's "LMDB ceiling").

    The same records as tally-bench (common.h's event stream), appended
    in-process through the store's own writer, doing the same durable work
    per event as the receipt actor: canonical tail and leaf encoding, the
    keyed dedup hash and its lookup (a duplicate reads and compares the
    original), the leaf hash, the Merkle nodes, the dedup record with its
    random key, and per commit one Ed25519 signed tree head and one synced
    LMDB commit.  No network, no protocol, no actors, no quota.

    Closed loop: commits of --batch events back to back; latency is per
    commit.  Open loop (--rate): requests of --request-size events fall due
    on a fixed schedule; each commit takes everything due (up to
    --group-max events), like group commit; a request's latency runs from
    the time it was due to the end of the commit that holds it.

    The data dir it writes is a valid tallyd data dir (log.key, log.pub,
    ledger/): this is also how the big logs of S4, S5 and S6 are built.
*/
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <sodium.h>
#include "tally/event.h"
#include "tally/store.h"
#include "tally/sth.h"
#include "common.h"

typedef struct {
    char data_dir[1024];
    bool data_dir_given, keep, json, quiet;
    uint64_t events;
    double duration;
    unsigned batch, request_size, group_max;
    uint32_t customers, meters;
    double dup_ratio, rate;
    const char *label;
} opts_t;

static opts_t O;

static void
usage (FILE *out)
{
    fprintf (out,
"Usage: tally-ceiling [OPTIONS]\n"
"Appends tally-bench's event stream in-process through the ledger's writer\n"
"(leaf encoding and hash, Merkle nodes, dedup index, one signature and one fsync\n"
"per commit): the ceiling of tallyd's design, without network or protocol.\n"
"\n"
"  --data-dir DIR     write into DIR (kept; a valid tallyd data dir) [a temp dir, removed]\n"
"  --keep             keep the temp dir\n"
"  --events N         events in all [100000], or --duration S\n"
"  --batch N          events per commit, closed loop [1000]\n"
"  --rate R           open loop: R events/s offered, in requests of --request-size [10]\n"
"                     events; each commit takes all that are due, up to --group-max [50000]\n"
"  --customers N      [1000]    --meters N  [10]\n"
"  --dup-ratio R      fraction of events re-sending a committed key [0]\n"
"  --json             one JSON result line     --label TEXT   copied into it\n"
"  --quiet            no progress line\n");
}

static void
die (const char *msg, const char *why)
{
    fprintf (stderr, "tally-ceiling: %s%s%s\n", msg, why ? ": " : "", why ? why : "");
    exit (2);
}

typedef struct {
    tly_store *store;
    tly_writer *writer;
    uint8_t pk[TLY_PK_LEN], sk[TLY_SK_LEN];
    bc_stream stream;
    bc_dups dups;
    uint64_t next_keyno;
    tly_buf tail, leaf;
    bc_result res;
    /* this commit's new keys, acknowledged after it */
    uint64_t *new_keys, *new_seqs;
    size_t nnew, new_cap;
} ceil_t;

/*  One event of the stream, judged and appended like the receipt actor does. */
static int
one_event (ceil_t *c, uint64_t recv_ts)
{
    uint64_t keyno, want_seq = 0;
    bool dup = bc_dups_next (&c->dups, &keyno, &want_seq);
    if (dup)
        c->res.dups_sent++;
    else
        keyno = c->next_keyno++;
    bc_event ev;
    bc_event_make (&c->stream, keyno, &ev);
    if (tly_event_validate (&ev.ev, NULL))
        return TLY_EINVAL;
    tly_buf_reset (&c->tail);
    if (tly_event_encode_tail (&ev.ev, &c->tail))
        return TLY_ENOMEM;
    uint8_t dedup[TLY_DEDUP_LEN];
    tly_store_dedup_hash (c->store, &ev.ev.customer, &ev.ev.key, dedup);
    uint64_t seq;
    int rc = tly_writer_lookup (c->writer, dedup, &seq);
    if (rc == TLY_OK) {
        const uint8_t *leaf;
        size_t len, off;
        tly_entry e;
        if ((rc = tly_writer_leaf (c->writer, seq, &leaf, &len))
        ||  (rc = tly_leaf_decode (leaf, len, &e, &off)))
            return rc;
        uint8_t hash[32];
        if ((rc = tly_writer_node (c->writer, 0, seq, hash)))
            return rc;
        if (len - off == c->tail.len && memcmp (leaf + off, c->tail.data, c->tail.len) == 0) {
            c->res.duplicate++;
            if (!dup || seq != want_seq)
                c->res.unexpected++;
        }
        else
            c->res.conflict++;
        return TLY_OK;
    }
    if (rc != TLY_ENOTFOUND)
        return rc;
    if (dup)
        c->res.unexpected++;
    seq = tly_writer_next_seq (c->writer);
    tly_buf_reset (&c->leaf);
    if ((rc = tly_leaf_encode (seq, recv_ts, "usage", c->tail.data, c->tail.len, &c->leaf)))
        return rc;
    uint8_t hash[32];
    if ((rc = tly_writer_append (c->writer, c->leaf.data, c->leaf.len, dedup, hash)))
        return rc;
    c->res.accepted++;
    if (c->nnew == c->new_cap) {
        c->new_cap = c->new_cap ? c->new_cap * 2 : 1024;
        c->new_keys = realloc (c->new_keys, c->new_cap * sizeof *c->new_keys);
        c->new_seqs = realloc (c->new_seqs, c->new_cap * sizeof *c->new_seqs);
        if (!c->new_keys || !c->new_seqs)
            return TLY_ENOMEM;
    }
    c->new_keys[c->nnew] = keyno;
    c->new_seqs[c->nnew++] = seq;
    return TLY_OK;
}

/*  One commit of n events. */
static void
commit_events (ceil_t *c, uint64_t n)
{
    int rc = tly_writer_begin (c->writer);
    if (rc)
        die ("begin failed", tly_strerror (rc));
    uint64_t recv_ts = tly_now_ms ();
    c->nnew = 0;
    for (uint64_t i = 0; i < n && !rc; i++)
        rc = one_event (c, recv_ts);
    if (rc) {
        tly_writer_abort (c->writer);
        die ("an append failed", tly_strerror (rc));
    }
    tly_sth sth;
    const char *why = "";
    if ((rc = tly_writer_commit (c->writer, c->sk, &sth, &why)))
        die ("commit failed", why);
    for (size_t i = 0; i < c->nnew; i++)
        bc_dups_ack (&c->dups, c->new_keys[i], c->new_seqs[i]);
    c->res.events += n;
    c->res.commits++;
}

static void
parse_args (int argc, char **argv)
{
    enum { A_DIR = 256, A_KEEP, A_EVENTS, A_DURATION, A_BATCH, A_RATE, A_REQ, A_GROUP, A_CUST,
           A_METERS, A_DUP, A_JSON, A_LABEL, A_QUIET, A_HELP };
    static const struct option lo[] = {
        { "data-dir", required_argument, 0, A_DIR }, { "keep", no_argument, 0, A_KEEP },
        { "events", required_argument, 0, A_EVENTS },
        { "duration", required_argument, 0, A_DURATION },
        { "batch", required_argument, 0, A_BATCH }, { "rate", required_argument, 0, A_RATE },
        { "request-size", required_argument, 0, A_REQ },
        { "group-max", required_argument, 0, A_GROUP },
        { "customers", required_argument, 0, A_CUST },
        { "meters", required_argument, 0, A_METERS },
        { "dup-ratio", required_argument, 0, A_DUP }, { "json", no_argument, 0, A_JSON },
        { "label", required_argument, 0, A_LABEL }, { "quiet", no_argument, 0, A_QUIET },
        { "help", no_argument, 0, A_HELP }, { 0, 0, 0, 0 },
    };
    O.batch = 1000;
    O.request_size = 10;
    O.group_max = 50000;
    O.customers = 1000;
    O.meters = 10;
    int ch;
    while ((ch = getopt_long (argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
            case A_DIR:
                snprintf (O.data_dir, sizeof O.data_dir, "%s", optarg);
                O.data_dir_given = true;
                break;
            case A_KEEP: O.keep = true; break;
            case A_EVENTS: O.events = strtoull (optarg, NULL, 10); break;
            case A_DURATION: O.duration = atof (optarg); break;
            case A_BATCH: O.batch = (unsigned) atoi (optarg); break;
            case A_RATE: O.rate = atof (optarg); break;
            case A_REQ: O.request_size = (unsigned) atoi (optarg); break;
            case A_GROUP: O.group_max = (unsigned) atoi (optarg); break;
            case A_CUST: O.customers = (uint32_t) atoi (optarg); break;
            case A_METERS: O.meters = (uint32_t) atoi (optarg); break;
            case A_DUP: O.dup_ratio = atof (optarg); break;
            case A_JSON: O.json = true; break;
            case A_LABEL: O.label = optarg; break;
            case A_QUIET: O.quiet = true; break;
            case A_HELP: usage (stdout); exit (0);
            default: usage (stderr); exit (2);
        }
    }
    if (optind < argc || O.batch < 1 || O.request_size < 1 || O.group_max < 1
    ||  O.dup_ratio < 0 || O.dup_ratio >= 1 || O.rate < 0
    ||  O.customers < 1 || O.meters < 1) {
        usage (stderr);
        exit (2);
    }
    if (!O.events && O.duration <= 0)
        O.events = 100000;
}

static bool
more (const ceil_t *c, uint64_t t0, uint64_t now)
{
    if (O.events)
        return c->res.events < O.events;
    return now < t0 + (uint64_t) (O.duration * 1e9);
}

int
main (int argc, char **argv)
{
    parse_args (argc, argv);
    bool temp = false;
    if (!O.data_dir_given) {
        snprintf (O.data_dir, sizeof O.data_dir, "/tmp/tally-ceiling.XXXXXX");
        if (!mkdtemp (O.data_dir))
            die ("mkdtemp", strerror (errno));
        temp = true;
    }
    else
        mkdir (O.data_dir, 0755);
    ceil_t c;
    memset (&c, 0, sizeof c);
    const char *why = NULL;
    int rc = tly_key_load_or_create (O.data_dir, c.pk, c.sk);
    if (rc)
        die ("cannot load or create the log key", tly_strerror (rc));
    if ((rc = tly_store_open (O.data_dir, (size_t) 256 << 30, &c.store, &why)))
        die ("cannot open the ledger", why);
    if ((rc = tly_writer_open (c.store, c.pk, &c.writer, &why)))
        die ("cannot open the writer", why);
    bc_stream_init (&c.stream, O.customers, O.meters);
    bc_dups_init (&c.dups, O.dup_ratio, 65536, c.stream.run_id);
    tly_buf_init (&c.tail);
    tly_buf_init (&c.leaf);
    bc_result_init (&c.res, "ceiling", "ingest");
    c.res.connections = 1;
    c.res.inflight = 1;
    c.res.batch = O.rate > 0 ? O.request_size : O.batch;
    c.res.offered_rate = O.rate;
    c.res.tree_before = tly_writer_next_seq (c.writer);

    double cpu0 = bc_cpu_self_s ();
    double mcpu0 = bc_cpu_machine_s ();
    uint64_t t0 = bc_now_ns (), next_print = t0 + 1000000000ull, last_ev = 0, last_t = t0;
    if (O.rate > 0) {
        double interval = 1e9 * O.request_size / O.rate;
        uint64_t k = 0;                 /* requests scheduled so far */
        uint64_t cap = O.events ? O.events : UINT64_MAX;
        uint64_t *due = malloc (sizeof *due * (O.group_max / O.request_size + 2));
        if (!due)
            die ("out of memory", NULL);
        for (;;) {
            uint64_t now = bc_now_ns ();
            size_t nreq = 0;
            uint64_t nev = 0;
            for (;;) {
                uint64_t d = t0 + (uint64_t) ((double) k * interval);
                uint64_t sent = c.res.events + nev;
                if (d > now || sent >= cap || !more (&c, t0, d)
                ||  nev + O.request_size > O.group_max)
                    break;
                uint64_t n = cap - sent < O.request_size ? cap - sent : O.request_size;
                due[nreq++] = d;
                nev += n;
                k++;
            }
            if (nreq == 0) {
                uint64_t d = t0 + (uint64_t) ((double) k * interval);
                if (c.res.events >= cap || !more (&c, t0, d))
                    break;
                bc_sleep_until_ns (d);
                continue;
            }
            commit_events (&c, nev);
            uint64_t end = bc_now_ns ();
            for (size_t i = 0; i < nreq; i++)
                bh_record (&c.res.hist, end - due[i]);
            c.res.requests += nreq;
            if (!O.quiet && end >= next_print) {
                bc_progress ("[%5.1fs] %llu events, %.0f/s now", (double) (end - t0) / 1e9,
                             (unsigned long long) c.res.events,
                             (double) (c.res.events - last_ev) * 1e9 / (double) (end - last_t));
                next_print += 1000000000ull;
                last_ev = c.res.events;
                last_t = end;
            }
        }
        free (due);
    }
    else
        while (more (&c, t0, bc_now_ns ())) {
            uint64_t n = O.batch;
            if (O.events && O.events - c.res.events < n)
                n = O.events - c.res.events;
            uint64_t s = bc_now_ns ();
            commit_events (&c, n);
            uint64_t end = bc_now_ns ();
            bh_record (&c.res.hist, end - s);
            c.res.requests++;
            if (!O.quiet && end >= next_print) {
                bc_progress ("[%5.1fs] %llu events, %.0f/s now", (double) (end - t0) / 1e9,
                             (unsigned long long) c.res.events,
                             (double) (c.res.events - last_ev) * 1e9 / (double) (end - last_t));
                next_print += 1000000000ull;
                last_ev = c.res.events;
                last_t = end;
            }
        }
    uint64_t t1 = bc_now_ns ();
    bc_progress_end ();
    c.res.elapsed_s = (double) (t1 - t0) / 1e9;
    c.res.client_cpu_s = bc_cpu_self_s () - cpu0;
    c.res.machine_cpu_s = bc_cpu_machine_s () - mcpu0;
    c.res.server_cpu_s = c.res.client_cpu_s;      /* it is the server */
    bc_proc p;
    if (bc_proc_read (getpid (), false, &p)) {
        c.res.server_hwm_kb = p.hwm_kb;
        c.res.server_rss_anon_peak_kb = p.rss_anon_kb;
    }
    c.res.tree_after = tly_writer_next_seq (c.writer);
    /*  As tallyd does when it stops: the data dir is a big log S4-S6 start on. */
    if (tly_writer_checkpoint (c.writer, &why))
        die ("checkpoint failed", why);
    c.res.data_bytes = bc_file_size (tly_store_data_path (c.store));
    bool clean = c.res.unexpected == 0 && c.res.conflict == 0
              && c.res.duplicate == c.res.dups_sent
              && c.res.accepted + c.res.duplicate == c.res.events;
    if (O.json) {
        char extra[300];
        snprintf (extra, sizeof extra, "\"clean\":%s,\"label\":\"%s\"", clean ? "true" : "false",
                  O.label ? O.label : "");
        bc_result_json (&c.res, stdout, extra);
    }
    else
        bc_result_print (&c.res, stdout);
    tly_writer_destroy (&c.writer);
    tly_store_close (&c.store);
    tly_buf_free (&c.tail);
    tly_buf_free (&c.leaf);
    bc_dups_free (&c.dups);
    free (c.new_keys);
    free (c.new_seqs);
    sodium_memzero (c.sk, sizeof c.sk);
    if (temp && !O.keep)
        bc_rmtree (O.data_dir);
    return clean ? 0 : 1;
}
