/*  common.c -- shared pieces of the load generators (see common.h). */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "common.h"

/* ---- time ---- */

uint64_t
bc_now_ns (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

void
bc_sleep_until_ns (uint64_t t)
{
    struct timespec ts = { (time_t) (t / 1000000000u), (long) (t % 1000000000u) };
    while (clock_nanosleep (CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

double
bc_cpu_self_s (void)
{
    struct rusage ru;
    getrusage (RUSAGE_SELF, &ru);
    return (double) ru.ru_utime.tv_sec + (double) ru.ru_utime.tv_usec / 1e6
         + (double) ru.ru_stime.tv_sec + (double) ru.ru_stime.tv_usec / 1e6;
}

double
bc_cpu_machine_s (void)
{
    FILE *f = fopen ("/proc/stat", "r");
    if (!f)
        return 0;
    unsigned long long v[8] = { 0 };
    int n = fscanf (f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                    &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose (f);
    if (n < 8)
        return 0;
    /*  user nice system idle iowait irq softirq steal */
    unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    return (double) busy / (double) sysconf (_SC_CLK_TCK);
}

/* ---- the event stream ---- */

uint64_t
bc_rand (uint64_t *state)
{
    uint64_t z = (*state += UINT64_C (0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C (0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C (0x94D049BB133111EB);
    return z ^ (z >> 31);
}

void
bc_stream_init (bc_stream *self, uint32_t customers, uint32_t meters)
{
    uint64_t seed = bc_now_ns () ^ ((uint64_t) getpid () << 40);
    self->run_id = bc_rand (&seed) & UINT64_C (0xffffffffff);     /* 10 hex digits */
    self->customers = customers ? customers : 1;
    self->meters = meters ? meters : 1;
    self->ts0 = tly_now_ms ();
}

/*  snprintf was a third of the load generator's CPU (S1); these write the
    same bytes ("%u", "%010llx"), NUL included. */
static int
put_dec (char *p, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do
        tmp[n++] = (char) ('0' + v % 10);
    while ((v /= 10));
    for (int i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    p[n] = 0;
    return n;
}

static int
put_hex10 (char *p, uint64_t v)
{
    char tmp[16];
    int n = 0;
    do
        tmp[n++] = "0123456789abcdef"[v & 15];
    while ((v >>= 4));
    int pad = n < 10 ? 10 - n : 0;
    memset (p, '0', (size_t) pad);
    for (int i = 0; i < n; i++)
        p[pad + i] = tmp[n - 1 - i];
    p[pad + n] = 0;
    return pad + n;
}

void
bc_event_make (const bc_stream *self, uint64_t keyno, bc_event *out)
{
    uint64_t s = keyno ^ (self->run_id << 20);
    uint64_t h = bc_rand (&s);
    out->customer[0] = 'c';
    int n = 1 + put_dec (out->customer + 1, (unsigned) (h % self->customers));
    out->ev.customer = (tly_str) { out->customer, (uint32_t) n };
    out->meter[0] = 'm';
    n = 1 + put_dec (out->meter + 1, (unsigned) ((h >> 24) % self->meters));
    out->ev.meter = (tly_str) { out->meter, (uint32_t) n };
    n = put_hex10 (out->key, self->run_id);
    out->key[n++] = '-';
    n += put_dec (out->key + n, keyno);
    out->ev.key = (tly_str) { out->key, (uint32_t) n };
    out->region[0] = 'r';
    n = 1 + put_dec (out->region + 1, (unsigned) ((h >> 48) % 4));
    out->ev.qty = 1 + (h >> 32) % 1000;
    out->ev.ts = self->ts0 + keyno % 1000;
    out->ev.nprops = 1;
    out->ev.props[0].key = (tly_str) { "region", 6 };
    out->ev.props[0].val = (tly_str) { out->region, (uint32_t) n };
}

/* ---- duplicates ---- */

void
bc_dups_init (bc_dups *self, double ratio, uint32_t cap, uint64_t seed)
{
    memset (self, 0, sizeof *self);
    self->ratio = ratio;
    self->cap = cap ? cap : 1;
    self->rng = seed;
    if (ratio > 0) {
        self->ring = calloc (self->cap, sizeof *self->ring);
        self->seqs = calloc (self->cap, sizeof *self->seqs);
        if (!self->ring || !self->seqs) {
            fprintf (stderr, "out of memory\n");
            exit (2);
        }
    }
}

void
bc_dups_free (bc_dups *self)
{
    free (self->ring);
    free (self->seqs);
    self->ring = self->seqs = NULL;
}

void
bc_dups_ack (bc_dups *self, uint64_t keyno, uint64_t seq)
{
    if (!self->ring)
        return;
    self->ring[self->pos] = keyno;
    self->seqs[self->pos] = seq;
    self->pos = (self->pos + 1) % self->cap;
    if (self->n < self->cap)
        self->n++;
}

bool
bc_dups_next (bc_dups *self, uint64_t *keyno, uint64_t *seq)
{
    if (self->ratio <= 0)
        return false;
    self->acc += self->ratio;
    if (self->acc < 1.0 - 1e-9 || self->n == 0)
        return false;
    self->acc -= 1.0;
    uint32_t i = (uint32_t) (bc_rand (&self->rng) % self->n);
    *keyno = self->ring[i];
    *seq = self->seqs[i];
    return true;
}

/* ---- /proc ---- */

static bool
read_stat_cpu (pid_t pid, double *cpu_s, pid_t *ppid)
{
    char path[64], buf[1024];
    snprintf (path, sizeof path, "/proc/%d/stat", (int) pid);
    FILE *f = fopen (path, "r");
    if (!f)
        return false;
    size_t n = fread (buf, 1, sizeof buf - 1, f);
    fclose (f);
    buf[n] = 0;
    char *p = strrchr (buf, ')');           /* comm may hold spaces */
    if (!p)
        return false;
    /*  Fields after comm: 3 state, 4 ppid, ... 14 utime, 15 stime. */
    unsigned long long utime = 0, stime = 0;
    int pp = 0;
    char state;
    if (sscanf (p + 2, "%c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                &state, &pp, &utime, &stime) != 4)
        return false;
    double hz = (double) sysconf (_SC_CLK_TCK);
    *cpu_s = (double) (utime + stime) / hz;
    if (ppid)
        *ppid = pp;
    return true;
}

static void
read_status_mem (pid_t pid, bc_proc *out)
{
    char path[64], line[256];
    snprintf (path, sizeof path, "/proc/%d/status", (int) pid);
    FILE *f = fopen (path, "r");
    if (!f)
        return;
    while (fgets (line, sizeof line, f)) {
        unsigned long long v;
        if (sscanf (line, "VmHWM: %llu", &v) == 1)
            out->hwm_kb += v;
        else
        if (sscanf (line, "VmRSS: %llu", &v) == 1)
            out->rss_kb += v;
        else
        if (sscanf (line, "RssAnon: %llu", &v) == 1)
            out->rss_anon_kb += v;
    }
    fclose (f);
}

bool
bc_proc_read (pid_t pid, bool children, bc_proc *out)
{
    memset (out, 0, sizeof *out);
    if (!read_stat_cpu (pid, &out->cpu_s, NULL))
        return false;
    read_status_mem (pid, out);
    if (!children)
        return true;
    DIR *d = opendir ("/proc");
    if (!d)
        return true;
    struct dirent *de;
    while ((de = readdir (d))) {
        char *end;
        long p = strtol (de->d_name, &end, 10);
        if (*end || p <= 0 || p == pid)
            continue;
        double cpu;
        pid_t ppid;
        if (read_stat_cpu ((pid_t) p, &cpu, &ppid) && ppid == pid) {
            out->cpu_s += cpu;
            read_status_mem ((pid_t) p, out);
        }
    }
    closedir (d);
    return true;
}

uint64_t
bc_file_size (const char *path)
{
    struct stat st;
    return stat (path, &st) == 0 ? (uint64_t) st.st_size : 0;
}

static int
rm_one (const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void) st;
    (void) flag;
    (void) ftw;
    remove (path);
    return 0;
}

void
bc_rmtree (const char *path)
{
    if (path && *path && strcmp (path, "/") != 0)
        nftw (path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int
bc_free_port (void)
{
    int fd = socket (AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_in sa;
    memset (&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
    sa.sin_port = 0;
    socklen_t len = sizeof sa;
    int port = 0;
    if (bind (fd, (struct sockaddr *) &sa, sizeof sa) == 0
    &&  getsockname (fd, (struct sockaddr *) &sa, &len) == 0)
        port = ntohs (sa.sin_port);
    close (fd);
    return port;
}

/* ---- results ---- */

void
bc_result_init (bc_result *self, const char *system, const char *mode)
{
    memset (self, 0, sizeof *self);
    self->system = system;
    self->mode = mode;
    self->server_cpu_s = -1;
    bh_init (&self->hist);
}

static double
us (uint64_t ns)
{
    return (double) ns / 1000.0;
}

void
bc_result_print (const bc_result *r, FILE *out)
{
    double el = r->elapsed_s > 0 ? r->elapsed_s : 1e-9;
    fprintf (out, "%s %s: %u connections x %u in flight, batch %u%s\n", r->system, r->mode,
             r->connections, r->inflight, r->batch, r->offered_rate > 0 ? ", open loop" : "");
    if (r->offered_rate > 0)
        fprintf (out, "  offered          %.0f events/s\n", r->offered_rate);
    fprintf (out, "  events           %llu in %.3f s = %.0f events/s\n",
             (unsigned long long) r->events, r->elapsed_s, (double) r->events / el);
    fprintf (out, "  requests         %llu = %.0f requests/s\n",
             (unsigned long long) r->requests, (double) r->requests / el);
    fprintf (out, "  results          accepted %llu, duplicate %llu (sent %llu), conflict %llu, "
                  "rejected %llu, errors %llu, unexpected %llu\n",
             (unsigned long long) r->accepted, (unsigned long long) r->duplicate,
             (unsigned long long) r->dups_sent, (unsigned long long) r->conflict,
             (unsigned long long) r->rejected, (unsigned long long) r->errors,
             (unsigned long long) r->unexpected);
    fprintf (out, "  latency (us)     p50 %.0f  p90 %.0f  p99 %.0f  p99.9 %.0f  max %.0f  "
                  "(mean %.0f, %llu samples)\n",
             us (bh_percentile (&r->hist, 50)), us (bh_percentile (&r->hist, 90)),
             us (bh_percentile (&r->hist, 99)), us (bh_percentile (&r->hist, 99.9)),
             us (r->hist.max), bh_mean (&r->hist) / 1000.0,
             (unsigned long long) r->hist.total);
    if (r->commits)
        fprintf (out, "  commits          %llu (%.1f events per commit)\n",
                 (unsigned long long) r->commits, (double) r->events / (double) r->commits);
    if (r->server_cpu_s >= 0)
        fprintf (out, "  server           CPU %.2f s (%.2f us per event, %.0f%% of one core), "
                      "peak RSS %.1f MiB, peak RssAnon %.1f MiB\n",
                 r->server_cpu_s, r->events ? r->server_cpu_s * 1e6 / (double) r->events : 0,
                 100.0 * r->server_cpu_s / el, (double) r->server_hwm_kb / 1024.0,
                 (double) r->server_rss_anon_peak_kb / 1024.0);
    if (r->data_bytes)
        fprintf (out, "  data file        %.1f MiB = %.1f bytes per entry\n",
                 (double) r->data_bytes / 1048576.0,
                 r->tree_after ? (double) r->data_bytes / (double) r->tree_after : 0);
    if (r->wal_bytes)
        fprintf (out, "  WAL written      %.1f MiB = %.1f bytes per event\n",
                 (double) r->wal_bytes / 1048576.0,
                 r->events ? (double) r->wal_bytes / (double) r->events : 0);
    fprintf (out, "  load generator   CPU %.2f s = %.1f us per request (%.0f%% of one core)\n",
             r->client_cpu_s, r->requests ? r->client_cpu_s * 1e6 / (double) r->requests : 0,
             100.0 * r->client_cpu_s / el);
    if (r->machine_cpu_s > 0) {
        double other = r->machine_cpu_s - r->client_cpu_s
                     - (r->server_cpu_s > 0 && strcmp (r->system, "ceiling") ? r->server_cpu_s : 0);
        fprintf (out, "  machine          CPU %.2f s in all; other processes %.2f s "
                      "(%.0f%% of one core)\n", r->machine_cpu_s, other > 0 ? other : 0,
                 other > 0 ? 100.0 * other / el : 0);
    }
    if (r->sth_verified)
        fprintf (out, "  signatures       %llu signed tree heads verified\n",
                 (unsigned long long) r->sth_verified);
    if (r->tree_after)
        fprintf (out, "  tree size        %llu -> %llu\n", (unsigned long long) r->tree_before,
                 (unsigned long long) r->tree_after);
}

void
bc_result_json (const bc_result *r, FILE *out, const char *extra)
{
    double el = r->elapsed_s > 0 ? r->elapsed_s : 1e-9;
    fprintf (out, "{\"system\":\"%s\",\"mode\":\"%s\",\"connections\":%u,\"inflight\":%u,"
                  "\"batch\":%u,\"offered_rate\":%.0f,\"events\":%llu,\"requests\":%llu,"
                  "\"elapsed_s\":%.4f,\"events_per_s\":%.1f,\"requests_per_s\":%.1f,",
             r->system, r->mode, r->connections, r->inflight, r->batch, r->offered_rate,
             (unsigned long long) r->events, (unsigned long long) r->requests, r->elapsed_s,
             (double) r->events / el, (double) r->requests / el);
    fprintf (out, "\"accepted\":%llu,\"duplicate\":%llu,\"dups_sent\":%llu,\"conflict\":%llu,"
                  "\"rejected\":%llu,\"errors\":%llu,\"unexpected\":%llu,",
             (unsigned long long) r->accepted, (unsigned long long) r->duplicate,
             (unsigned long long) r->dups_sent, (unsigned long long) r->conflict,
             (unsigned long long) r->rejected, (unsigned long long) r->errors,
             (unsigned long long) r->unexpected);
    fprintf (out, "\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
                  "\"max_us\":%.1f,\"mean_us\":%.1f,",
             us (bh_percentile (&r->hist, 50)), us (bh_percentile (&r->hist, 90)),
             us (bh_percentile (&r->hist, 99)), us (bh_percentile (&r->hist, 99.9)),
             us (r->hist.max), bh_mean (&r->hist) / 1000.0);
    fprintf (out, "\"server_cpu_s\":%.3f,\"server_peak_rss_kb\":%llu,"
                  "\"server_peak_rss_anon_kb\":%llu,\"data_bytes\":%llu,"
                  "\"bytes_per_entry\":%.1f,\"wal_bytes\":%llu,\"client_cpu_s\":%.3f,"
                  "\"client_cpu_per_request_us\":%.2f,\"sth_verified\":%llu,\"commits\":%llu,"
                  "\"tree_before\":%llu,\"tree_after\":%llu",
             r->server_cpu_s, (unsigned long long) r->server_hwm_kb,
             (unsigned long long) r->server_rss_anon_peak_kb,
             (unsigned long long) r->data_bytes,
             r->tree_after && r->data_bytes ? (double) r->data_bytes / (double) r->tree_after : 0,
             (unsigned long long) r->wal_bytes, r->client_cpu_s,
             r->requests ? r->client_cpu_s * 1e6 / (double) r->requests : 0,
             (unsigned long long) r->sth_verified, (unsigned long long) r->commits,
             (unsigned long long) r->tree_before, (unsigned long long) r->tree_after);
    double other = r->machine_cpu_s - r->client_cpu_s
                 - (r->server_cpu_s > 0 && strcmp (r->system, "ceiling") ? r->server_cpu_s : 0);
    fprintf (out, ",\"machine_cpu_s\":%.3f,\"other_cpu_s\":%.3f", r->machine_cpu_s,
             other > 0 ? other : 0);
    if (extra && *extra)
        fprintf (out, ",%s", extra);
    fprintf (out, "}\n");
    fflush (out);
}

static bool s_progress_tty = false, s_progress_checked = false, s_progress_open = false;

void
bc_progress (const char *fmt, ...)
{
    if (!s_progress_checked) {
        s_progress_tty = isatty (2);
        s_progress_checked = true;
    }
    char line[256];
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (line, sizeof line, fmt, ap);
    va_end (ap);
    if (s_progress_tty) {
        fprintf (stderr, "\r%-100s", line);
        s_progress_open = true;
    }
    else
        fprintf (stderr, "%s\n", line);
    fflush (stderr);
}

void
bc_progress_end (void)
{
    if (s_progress_open)
        fprintf (stderr, "\n");
    s_progress_open = false;
}
