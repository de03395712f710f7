/*  common.h -- what the three load generators share: the event stream,
    the clock, the duplicate schedule, process statistics from /proc, and
    the result record they all print in the same shape.

    The event stream is a pure function of (run id, key number): event k of
    a run has customer "c<h % customers>", meter "m<h % meters>", key
    "<run id>-<k>", qty 1..1000, ts = the run's start + k % 1000 ms and one
    prop {"region": "r<0..3>"}.  A duplicate re-sends an earlier key number
    of the same run, so it is byte-identical to the original (`duplicate`,
    never `conflict`).  tally-bench, tally-ceiling and tally-pg-bench all
    draw from this function, so the three systems see the same records.
*/
#ifndef TALLY_BENCH_COMMON_H
#define TALLY_BENCH_COMMON_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include "tally/event.h"
#include "hist.h"

/* ---- time ---- */

uint64_t bc_now_ns (void);              /* CLOCK_MONOTONIC */
void bc_sleep_until_ns (uint64_t t);    /* absolute, monotonic */
double bc_cpu_self_s (void);            /* getrusage(RUSAGE_SELF) user + sys */
/*  CPU time all processes of the machine have used since boot (/proc/stat,
    every state but idle and iowait): the difference over a run, less the
    server's and the load generator's, is what other work took from us. */
double bc_cpu_machine_s (void);

/* ---- the event stream ---- */

typedef struct {
    uint64_t run_id;
    uint32_t customers;
    uint32_t meters;
    uint64_t ts0;                       /* ms since the epoch */
} bc_stream;

typedef struct {
    char customer[24];
    char meter[24];
    char key[48];
    char region[8];
    tly_event ev;                       /* points into the arrays above */
} bc_event;

void bc_stream_init (bc_stream *self, uint32_t customers, uint32_t meters);
void bc_event_make (const bc_stream *self, uint64_t keyno, bc_event *out);
/*  A cheap per-thread PRNG (splitmix64). */
uint64_t bc_rand (uint64_t *state);

/*  The duplicate schedule: whether the next event re-sends an earlier,
    already acknowledged key.  Exactly round(ratio * events) duplicates
    over a run as long as earlier keys are available; a duplicate that is
    due while none is acknowledged yet is carried to the next event. */
typedef struct {
    double ratio;
    double acc;
    uint64_t *ring;                     /* acknowledged key numbers */
    uint64_t *seqs;                     /* ... and their seqs (0 if unknown) */
    uint32_t cap, n, pos;
    uint64_t rng;
} bc_dups;

void bc_dups_init (bc_dups *self, double ratio, uint32_t cap, uint64_t seed);
void bc_dups_free (bc_dups *self);
/*  Records an acknowledged new key and its seq. */
void bc_dups_ack (bc_dups *self, uint64_t keyno, uint64_t seq);
/*  True when the next event must be a duplicate; then *keyno and *seq
    name the original. */
bool bc_dups_next (bc_dups *self, uint64_t *keyno, uint64_t *seq);

/* ---- /proc ---- */

typedef struct {
    double cpu_s;                       /* utime + stime */
    uint64_t rss_kb, hwm_kb, rss_anon_kb;
} bc_proc;

/*  Reads one process (and, with children, every process whose parent is
    pid: PostgreSQL's backends), summing CPU and RSS.  false if gone. */
bool bc_proc_read (pid_t pid, bool children, bc_proc *out);
/*  Size in bytes of a file (0 when missing). */
uint64_t bc_file_size (const char *path);
/*  rm -rf. */
void bc_rmtree (const char *path);
/*  A TCP port on 127.0.0.1 that is free right now (0 on failure). */
int bc_free_port (void);

/* ---- results ---- */

typedef struct {
    const char *system;                 /* "tallyd", "ceiling", "postgresql" */
    const char *mode;                   /* "ingest", "proofs", "recovery" */
    uint64_t events, requests;
    uint64_t accepted, duplicate, conflict, rejected, errors, unexpected;
    uint64_t dups_sent;
    double elapsed_s;
    bh_hist hist;                       /* per request, ns */
    double offered_rate;                /* events/s, 0 = closed loop */
    double server_cpu_s;                /* -1 unknown */
    uint64_t server_hwm_kb, server_rss_anon_peak_kb;
    uint64_t data_bytes;                /* 0 unknown */
    uint64_t wal_bytes;                 /* postgresql only */
    double client_cpu_s;
    double machine_cpu_s;               /* every process, during the run */
    uint64_t sth_verified;
    uint64_t commits;                   /* ceiling */
    uint64_t tree_before, tree_after;
    unsigned connections, inflight, batch;
} bc_result;

void bc_result_init (bc_result *self, const char *system, const char *mode);
/*  Human-readable block on `out`. */
void bc_result_print (const bc_result *self, FILE *out);
/*  One JSON object on one line. */
void bc_result_json (const bc_result *self, FILE *out, const char *extra);

/*  A progress line on stderr ("\r" on a terminal, a line per call otherwise). */
void bc_progress (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
void bc_progress_end (void);

#endif
