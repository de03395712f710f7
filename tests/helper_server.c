/*  helper_server.c -- run a real tallyd for end-to-end suites, and talk to
    it over ZeroMQ with raw msgpack bodies (see helper_server.h). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>
#include <czmq.h>
#include <sodium.h>
#include "tally/json.h"
#include "tally/msg.h"
#include "helper_server.h"

#define READY_MS        20000
#define STOP_MS         20000
#define START_ATTEMPTS  5
#define MAX_LIVE        16

/* ---- time ---- */

uint64_t
e2e_now_ms (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000u + (uint64_t) ts.tv_nsec / 1000000u;
}

void
e2e_sleep_ms (unsigned ms)
{
    struct timespec ts = { ms / 1000, (long) (ms % 1000) * 1000000L };
    while (nanosleep (&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* ---- random ---- */

static pthread_mutex_t s_rand_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t s_rand_state;
static bool s_rand_seeded;

uint64_t
e2e_rand (void)
{
    pthread_mutex_lock (&s_rand_lock);
    if (!s_rand_seeded) {
        const char *env = getenv ("E2E_SEED");
        s_rand_state = env ? strtoull (env, NULL, 0)
                           : (uint64_t) time (NULL) ^ ((uint64_t) getpid () << 32);
        fprintf (stderr, "e2e: seed %llu (set E2E_SEED to repeat)\n",
                 (unsigned long long) s_rand_state);
        s_rand_seeded = true;
    }
    //  splitmix64
    uint64_t z = (s_rand_state += UINT64_C (0x9E3779B97F4A7C15));
    pthread_mutex_unlock (&s_rand_lock);
    z = (z ^ (z >> 30)) * UINT64_C (0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C (0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* ---- live servers, for failure reports and cleanup ---- */

static e2e_server *s_live[MAX_LIVE];
static bool s_in_test;
static bool s_test_passed;
static bool s_atexit_set;

static void
live_add (e2e_server *self)
{
    for (size_t i = 0; i < MAX_LIVE; i++)
        if (!s_live[i]) {
            s_live[i] = self;
            return;
        }
    fprintf (stderr, "e2e: more than %d live servers\n", MAX_LIVE);
    abort ();
}

static void
live_remove (e2e_server *self)
{
    for (size_t i = 0; i < MAX_LIVE; i++)
        if (s_live[i] == self)
            s_live[i] = NULL;
}

//  At exit (or abort through cmocka), no daemon may outlive the suite.
static void
kill_all_at_exit (void)
{
    for (size_t i = 0; i < MAX_LIVE; i++)
        if (s_live[i] && s_live[i]->pid > 0) {
            kill (s_live[i]->pid, SIGKILL);
            waitpid (s_live[i]->pid, NULL, 0);
            s_live[i]->pid = 0;
        }
}

/* ---- the daemon ---- */

static const char *
tallyd_path (void)
{
    static char path[PATH_MAX];
    const char *env = getenv ("TALLYD");
    if (env && *env)
        return env;
    ssize_t n = readlink ("/proc/self/exe", path, sizeof path - 16);
    if (n <= 0)
        return "tallyd";
    path[n] = 0;
    char *slash = strrchr (path, '/');
    strcpy (slash ? slash + 1 : path, "tallyd");
    return path;
}

//  A port in 20000..32767 (below Linux's ephemeral range) that is free now.
static int
free_port (int avoid)
{
    for (int attempt = 0; attempt < 200; attempt++) {
        int port = 20000 + (int) (e2e_rand () % 12768);
        if (port == avoid)
            continue;
        int fd = socket (AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return -1;
        struct sockaddr_in sa;
        memset (&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_port = htons ((uint16_t) port);
        sa.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
        int rc = bind (fd, (struct sockaddr *) &sa, sizeof sa);
        close (fd);
        if (rc == 0)
            return port;
    }
    return -1;
}

static void
set_ports (e2e_server *self, int api, int control)
{
    self->api_port = api;
    self->control_port = control;
    snprintf (self->api, sizeof self->api, "tcp://127.0.0.1:%d", api);
    snprintf (self->control, sizeof self->control, "tcp://127.0.0.1:%d", control);
}

static void
log_note (e2e_server *self, const char *fmt, ...)
{
    FILE *f = fopen (self->log_path, "a");
    if (!f)
        return;
    va_list ap;
    va_start (ap, fmt);
    vfprintf (f, fmt, ap);
    va_end (ap);
    fclose (f);
}

//  fork + exec with stdout/stderr appended to the log; the child dies with
//  the thread that forked it.
static pid_t
spawn (e2e_server *self)
{
    char interval[24];
    snprintf (interval, sizeof interval, "%u", self->verify_interval);
    const char *level = getenv ("E2E_LOG_LEVEL");
    const char *argv[32];
    size_t n = 0;
    argv[n++] = tallyd_path ();
    argv[n++] = "--data-dir";        argv[n++] = self->dir;
    argv[n++] = "--api";             argv[n++] = self->api;
    argv[n++] = "--control";         argv[n++] = self->control;
    argv[n++] = "--verify-interval"; argv[n++] = interval;
    argv[n++] = "--log-level";       argv[n++] = level && *level ? level : "info";
    for (size_t i = 0; i < 4; i++)
        if (self->extra_args[i][0])
            argv[n++] = self->extra_args[i];
    argv[n] = NULL;

    log_note (self, "=== e2e: start #%u:", self->starts + 1);
    for (size_t i = 0; i < n; i++)
        log_note (self, " %s", argv[i]);
    log_note (self, "\n");

    int logfd = open (self->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int nullfd = open ("/dev/null", O_RDONLY | O_CLOEXEC);
    if (logfd < 0 || nullfd < 0) {
        if (logfd >= 0) close (logfd);
        if (nullfd >= 0) close (nullfd);
        return -1;
    }
    pid_t parent = getpid ();
    pid_t pid = fork ();
    if (pid == 0) {
        //  Only async-signal-safe calls from here on.
        prctl (PR_SET_PDEATHSIG, SIGKILL);
        if (getppid () != parent)
            _exit (127);
        dup2 (nullfd, 0);
        dup2 (logfd, 1);
        dup2 (logfd, 2);
        for (int fd = 3; fd < 4096; fd++)
            close (fd);
        if (self->nice_denied) {
            struct rlimit none = { 0, 0 };
            setrlimit (RLIMIT_NICE, &none);
            prctl (PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0);
        }
        execv (argv[0], (char *const *) argv);
        static const char msg[] = "e2e: exec of tallyd failed\n";
        ssize_t w = write (2, msg, sizeof msg - 1);
        (void) w;
        _exit (127);
    }
    close (logfd);
    close (nullfd);
    return pid;
}

//  Reaps the child if it exited; *status gets the wait status.
static int
exit_code (int status)
{
    if (WIFEXITED (status))
        return WEXITSTATUS (status);
    if (WIFSIGNALED (status))
        return 128 + WTERMSIG (status);
    return -1;
}

static bool
exited (e2e_server *self, int *status)
{
    if (self->pid <= 0)
        return true;
    int st = 0;
    pid_t r = waitpid (self->pid, &st, WNOHANG);
    if (r == self->pid || (r < 0 && errno == ECHILD)) {
        if (status)
            *status = st;
        log_note (self, "=== e2e: tallyd (pid %d) has exited: status %d\n",
                  (int) self->pid, r == self->pid ? exit_code (st) : -1);
        self->pid = 0;
        return true;
    }
    return false;
}

static bool
read_pub (e2e_server *self)
{
    char path[256];
    snprintf (path, sizeof path, "%s/log.pub", self->dir);
    int fd = open (path, O_RDONLY);
    if (fd < 0)
        return false;
    uint8_t buf[TLY_PK_LEN + 1];
    ssize_t n = read (fd, buf, sizeof buf);
    close (fd);
    if (n != TLY_PK_LEN)
        return false;
    memcpy (self->pk, buf, TLY_PK_LEN);
    return true;
}

//  Ready: answers sth, and its pubkey is this data dir's log.pub (so we
//  never talk to some other daemon that holds the port).
static bool
is_ours (e2e_server *self)
{
    if (!read_pub (self))
        return false;
    e2e_conn *c = e2e_conn_new (self->api);
    if (!c)
        return false;
    e2e_reply r;
    e2e_reply_init (&r);
    uint8_t key[TLY_PK_LEN];
    bool ok = e2e_callf (c, &r, "{'op':'pubkey'}") == TLY_OK && r.ok
              && e2e_bin (&r.body, "key", key, sizeof key)
              && memcmp (key, self->pk, sizeof key) == 0;
    e2e_reply_free (&r);
    e2e_conn_destroy (&c);
    return ok;
}

//  One start attempt on the current ports: 1 ready, 0 exited early, -1
//  failed otherwise.
static int
start_once (e2e_server *self, int *exit_code_out)
{
    pid_t pid = spawn (self);
    if (pid < 0)
        return -1;
    self->pid = pid;
    self->starts++;
    uint64_t deadline = e2e_now_ms () + READY_MS;
    while (e2e_now_ms () < deadline) {
        int st;
        if (exited (self, &st)) {
            log_note (self, "=== e2e: tallyd exited before ready (status %d)\n",
                      exit_code (st));
            if (exit_code_out)
                *exit_code_out = exit_code (st);
            return 0;
        }
        if (e2e_answers_sth (self->api, 250)) {
            if (is_ours (self))
                return 1;
            //  Someone else answers on this port: try others.
            log_note (self, "=== e2e: the port answers but not with this log's key\n");
            e2e_server_kill (self);
            return 0;
        }
        e2e_sleep_ms (20);
    }
    log_note (self, "=== e2e: not ready after %d ms\n", READY_MS);
    return -1;
}

int
e2e_server_start (e2e_server *self)
{
    if (self->pid > 0)
        return TLY_EEXIST;
    for (int attempt = 0; attempt < START_ATTEMPTS; attempt++) {
        if (attempt > 0 || self->api_port == 0) {
            int a = free_port (-1);
            int c = free_port (a);
            if (a < 0 || c < 0)
                break;
            set_ports (self, a, c);
        }
        int rc = start_once (self, NULL);
        if (rc == 1)
            return TLY_OK;
        if (self->pid > 0)
            e2e_server_kill (self);
        if (rc < 0)
            break;
    }
    fprintf (stderr, "e2e: tallyd did not start in %s\n", self->dir);
    e2e_server_dump_log (self, 80);
    return TLY_EIO;
}

int
e2e_server_try_start (e2e_server *self, int *exit_code_out)
{
    if (self->pid > 0)
        return -1;
    if (self->api_port == 0) {
        int a = free_port (-1);
        int c = free_port (a);
        if (a < 0 || c < 0)
            return -1;
        set_ports (self, a, c);
    }
    int rc = start_once (self, exit_code_out);
    if (rc < 0 && self->pid > 0)
        e2e_server_kill (self);
    return rc;
}

e2e_server *
e2e_server_new (unsigned verify_interval)
{
    e2e_server *self = e2e_server_create (verify_interval);
    if (self && e2e_server_start (self) != TLY_OK)
        e2e_server_destroy (&self);
    return self;
}

e2e_server *
e2e_server_create (unsigned verify_interval)
{
    if (!s_atexit_set) {
        atexit (kill_all_at_exit);
        s_atexit_set = true;
        //  A test process writing to a dead peer must not die of it.
        signal (SIGPIPE, SIG_IGN);
    }
    e2e_server *self = calloc (1, sizeof *self);
    if (!self)
        return NULL;
    strcpy (self->dir, "/tmp/tally-e2e-XXXXXX");
    if (!mkdtemp (self->dir)) {
        free (self);
        return NULL;
    }
    snprintf (self->log_path, sizeof self->log_path, "%s/tallyd.log", self->dir);
    self->verify_interval = verify_interval;
    self->in_test = s_in_test;
    live_add (self);
    return self;
}

bool
e2e_server_alive (e2e_server *self)
{
    return !exited (self, NULL);
}

int
e2e_server_stop (e2e_server *self)
{
    return e2e_server_stop_with (self, SIGTERM);
}

int
e2e_server_stop_with (e2e_server *self, int sig)
{
    if (self->pid <= 0)
        return 0;
    log_note (self, "=== e2e: sending signal %d to pid %d\n", sig, (int) self->pid);
    kill (self->pid, sig);
    uint64_t deadline = e2e_now_ms () + STOP_MS;
    int st = 0;
    while (e2e_now_ms () < deadline) {
        if (exited (self, &st)) {
            int code = exit_code (st);
            log_note (self, "=== e2e: stopped with signal %d: exit %d\n", sig, code);
            return code;
        }
        e2e_sleep_ms (10);
    }
    log_note (self, "=== e2e: no exit %d ms after signal %d: SIGKILL\n", STOP_MS, sig);
    e2e_server_kill (self);
    return -1;
}

void
e2e_server_kill (e2e_server *self)
{
    if (self->pid <= 0)
        return;
    log_note (self, "=== e2e: sending SIGKILL to pid %d\n", (int) self->pid);
    kill (self->pid, SIGKILL);
    waitpid (self->pid, NULL, 0);
    self->pid = 0;
}

static int
rm_entry (const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void) sb; (void) ftw;
    if (flag == FTW_DP)
        rmdir (path);
    else
        unlink (path);
    return 0;
}

int
e2e_server_destroy (e2e_server **self_p)
{
    if (!self_p || !*self_p)
        return 0;
    e2e_server *self = *self_p;
    int rc = e2e_server_stop (self);
    if (rc != 0) {
        fprintf (stderr, "e2e: tallyd stopped with %d\n", rc);
        e2e_server_dump_log (self, 80);
    }
    const char *keep = getenv ("E2E_KEEP");
    if (keep && *keep && *keep != '0')
        fprintf (stderr, "e2e: kept %s\n", self->dir);
    else
        nftw (self->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    live_remove (self);
    free (self);
    *self_p = NULL;
    return rc;
}

void
e2e_server_dump_log (e2e_server *self, unsigned lines)
{
    FILE *f = fopen (self->log_path, "r");
    if (!f) {
        fprintf (stderr, "e2e: no log at %s\n", self->log_path);
        return;
    }
    //  Count lines, then print the last `lines`.
    size_t total = 0;
    int ch;
    while ((ch = fgetc (f)) != EOF)
        if (ch == '\n')
            total++;
    size_t skip = total > lines ? total - lines : 0;
    rewind (f);
    fprintf (stderr, "---- %s (last %u of %zu lines) ----\n", self->log_path,
             lines, total);
    size_t line = 0;
    while ((ch = fgetc (f)) != EOF) {
        if (line >= skip)
            fputc (ch, stderr);
        if (ch == '\n')
            line++;
    }
    fprintf (stderr, "---- end of log ----\n");
    fclose (f);
}

bool
e2e_server_log_has (e2e_server *self, const char *a, const char *b)
{
    FILE *f = fopen (self->log_path, "r");
    if (!f)
        return false;
    char *line = NULL;
    size_t cap = 0;
    bool found = false;
    while (!found && getline (&line, &cap, f) > 0)
        found = strstr (line, a) && (!b || strcasestr (line, b));
    free (line);
    fclose (f);
    return found;
}

const char *
e2e_server_data_file (e2e_server *self, char out[256])
{
    snprintf (out, 256, "%s/ledger/data.mdb", self->dir);
    return out;
}

/* ---- cmocka glue ---- */

int
e2e_setup (void **state)
{
    (void) state;
    s_in_test = true;
    s_test_passed = false;
    return 0;
}

void
e2e_pass (void)
{
    s_test_passed = true;
}

int
e2e_teardown (void **state)
{
    (void) state;
    if (!s_test_passed) {
        fprintf (stderr, "e2e: the test failed; daemon logs follow\n");
        for (size_t i = 0; i < MAX_LIVE; i++)
            if (s_live[i]) {
                pid_t pid = s_live[i]->pid;
                fprintf (stderr, "e2e: data dir %s, api %s, control %s, %s\n",
                         s_live[i]->dir, s_live[i]->api, s_live[i]->control,
                         e2e_server_alive (s_live[i]) ? "running"
                         : pid > 0 ? "EXITED ON ITS OWN (see the log's end)" : "stopped");
                e2e_server_dump_log (s_live[i], 120);
            }
    }
    for (size_t i = 0; i < MAX_LIVE; i++)
        if (s_live[i] && s_live[i]->in_test) {
            e2e_server *srv = s_live[i];
            e2e_server_kill (srv);
            e2e_server_destroy (&srv);
        }
    s_in_test = false;
    return 0;
}

int
e2e_group_teardown (void **state)
{
    (void) state;
    for (size_t i = 0; i < MAX_LIVE; i++)
        if (s_live[i]) {
            e2e_server *srv = s_live[i];
            int rc = e2e_server_destroy (&srv);
            if (rc != 0)
                return -1;
        }
    return 0;
}

/* ---- replies ---- */

static const tly_msg_limits s_reply_limits = { 32, 50000000 };

void
e2e_reply_init (e2e_reply *r)
{
    memset (r, 0, sizeof *r);
    tly_buf_init (&r->raw);
    tly_buf_init (&r->json);
    msgpack_zone_init (&r->zone, 4096);
}

void
e2e_reply_free (e2e_reply *r)
{
    tly_buf_free (&r->raw);
    tly_buf_free (&r->json);
    msgpack_zone_destroy (&r->zone);
}

static void
reply_reset (e2e_reply *r)
{
    tly_buf_reset (&r->raw);
    msgpack_zone_destroy (&r->zone);
    msgpack_zone_init (&r->zone, 4096);
    r->body.type = MSGPACK_OBJECT_NIL;
    r->parsed = false;
    r->ok = false;
    r->code[0] = 0;
    r->nframes = 0;
    r->frame0_len = 0;
}

//  Checks and unpacks r->raw: it must be exactly one msgpack map.
static void
reply_parse (e2e_reply *r)
{
    const char *why = NULL;
    if (tly_msg_check (r->raw.data, r->raw.len, &s_reply_limits, &why) != TLY_OK) {
        fprintf (stderr, "e2e: reply is not one msgpack object: %s\n", why ? why : "?");
        return;
    }
    if (tly_msg_unpack (r->raw.data, r->raw.len, &r->zone, &r->body) != TLY_OK)
        return;
    if (r->body.type != MSGPACK_OBJECT_MAP)
        return;
    r->parsed = true;
    e2e_bool (&r->body, "ok", &r->ok);
    e2e_str (&r->body, "error.code", r->code, sizeof r->code);
}

const char *
e2e_json_of (const msgpack_object *o, tly_buf *out)
{
    tly_buf_reset (out);
    tly_json_write_msgpack (out, o);
    if (out->len > 4000) {
        out->len = 4000;
        tly_buf_append (out, "...", 3);
    }
    tly_buf_append (out, "", 1);
    return out->oom ? "(oom)" : (const char *) out->data;
}

const char *
e2e_reply_json (e2e_reply *r)
{
    if (!r->parsed) {
        tly_buf_reset (&r->json);
        char head[96];
        snprintf (head, sizeof head, "(unparsable reply of %zu bytes:", r->raw.len);
        tly_buf_append (&r->json, head, strlen (head));
        for (size_t i = 0; i < r->raw.len && i < 64; i++) {
            char hx[4];
            snprintf (hx, sizeof hx, " %02x", r->raw.data[i]);
            tly_buf_append (&r->json, hx, 3);
        }
        tly_buf_append (&r->json, ")", 2);
        return (const char *) r->json.data;
    }
    return e2e_json_of (&r->body, &r->json);
}

void
e2e_expect_ok_ (e2e_reply *r, const char *file, int line)
{
    if (!r->parsed || !r->ok) {
        fprintf (stderr, "%s:%d: expected an ok reply, got %s\n", file, line,
                 e2e_reply_json (r));
        _fail (file, line);
    }
}

void
e2e_expect_err_ (e2e_reply *r, const char *code, const char *file, int line)
{
    bool has_msg = e2e_at (&r->body, "error.message")
                   && e2e_at (&r->body, "error.message")->type == MSGPACK_OBJECT_STR;
    if (!r->parsed || r->ok || strcmp (r->code, code) != 0 || !has_msg) {
        fprintf (stderr, "%s:%d: expected error \"%s\" (with a message), got %s\n",
                 file, line, code, e2e_reply_json (r));
        _fail (file, line);
    }
}

static const msgpack_object *
map_get (const msgpack_object *o, const char *key, size_t len)
{
    if (!o || o->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object *k = &o->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == len
            && memcmp (k->via.str.ptr, key, len) == 0)
            return &o->via.map.ptr[i].val;
    }
    return NULL;
}

const msgpack_object *
e2e_at (const msgpack_object *o, const char *path)
{
    const char *p = path;
    while (o && *p) {
        const char *dot = strchr (p, '.');
        size_t len = dot ? (size_t) (dot - p) : strlen (p);
        if (o->type == MSGPACK_OBJECT_ARRAY && len > 0 && isdigit ((unsigned char) *p)) {
            unsigned long idx = strtoul (p, NULL, 10);
            o = idx < o->via.array.size ? &o->via.array.ptr[idx] : NULL;
        }
        else
            o = map_get (o, p, len);
        p += len;
        if (*p == '.')
            p++;
    }
    return o;
}

bool
e2e_uint (const msgpack_object *o, const char *path, uint64_t *out)
{
    o = e2e_at (o, path);
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return false;
    *out = o->via.u64;
    return true;
}

bool
e2e_bool (const msgpack_object *o, const char *path, bool *out)
{
    o = e2e_at (o, path);
    if (!o || o->type != MSGPACK_OBJECT_BOOLEAN)
        return false;
    *out = o->via.boolean;
    return true;
}

bool
e2e_str_is (const msgpack_object *o, const char *path, const char *s)
{
    o = e2e_at (o, path);
    return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen (s)
           && memcmp (o->via.str.ptr, s, o->via.str.size) == 0;
}

bool
e2e_str (const msgpack_object *o, const char *path, char *out, size_t size)
{
    o = e2e_at (o, path);
    if (!o || o->type != MSGPACK_OBJECT_STR || size == 0)
        return false;
    size_t n = o->via.str.size < size - 1 ? o->via.str.size : size - 1;
    memcpy (out, o->via.str.ptr, n);
    out[n] = 0;
    return true;
}

bool
e2e_bin (const msgpack_object *o, const char *path, uint8_t *out, size_t len)
{
    o = e2e_at (o, path);
    if (!o || o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != len)
        return false;
    if (out)
        memcpy (out, o->via.bin.ptr, len);
    return true;
}

long
e2e_len (const msgpack_object *o, const char *path)
{
    o = e2e_at (o, path);
    if (o && o->type == MSGPACK_OBJECT_ARRAY)
        return (long) o->via.array.size;
    if (o && o->type == MSGPACK_OBJECT_MAP)
        return (long) o->via.map.size;
    return -1;
}

bool
e2e_sth_decode (const msgpack_object *o, tly_sth *out)
{
    memset (out, 0, sizeof *out);
    return o && o->type == MSGPACK_OBJECT_MAP && o->via.map.size == 4
           && e2e_uint (o, "tree_size", &out->tree_size)
           && e2e_uint (o, "ts", &out->ts)
           && e2e_bin (o, "root", out->root, sizeof out->root)
           && e2e_bin (o, "sig", out->sig, sizeof out->sig);
}

bool
e2e_proof_decode (const msgpack_object *body, bool consistency, tly_proof *out)
{
    memset (out, 0, sizeof *out);
    if (!e2e_uint (body, consistency ? "from" : "seq", &out->seq)
        || !e2e_uint (body, consistency ? "to" : "tree_size", &out->tree_size)
        || !e2e_sth_decode (e2e_at (body, "sth"), &out->sth))
        return false;
    const msgpack_object *path = e2e_at (body, "path");
    if (!path || path->type != MSGPACK_OBJECT_ARRAY
        || path->via.array.size > TLY_PATH_MAX)
        return false;
    for (uint32_t i = 0; i < path->via.array.size; i++) {
        const msgpack_object *h = &path->via.array.ptr[i];
        if (h->type != MSGPACK_OBJECT_BIN || h->via.bin.size != TLY_HASH_LEN)
            return false;
        memcpy (out->path[i], h->via.bin.ptr, TLY_HASH_LEN);
    }
    out->path_len = path->via.array.size;
    return true;
}

bool
e2e_sth_verify (const tly_sth *sth, const uint8_t pk[TLY_PK_LEN])
{
    uint8_t msg[60];
    memcpy (msg, "TALLY-STH-V1", 12);
    for (int i = 0; i < 8; i++) {
        msg[12 + i] = (uint8_t) (sth->tree_size >> (56 - 8 * i));
        msg[20 + i] = (uint8_t) (sth->ts >> (56 - 8 * i));
    }
    memcpy (msg + 28, sth->root, 32);
    return crypto_sign_verify_detached (sth->sig, msg, sizeof msg, pk) == 0;
}

/* ---- JSON to msgpack ---- */

static uint32_t
pack_node (const tly_json_node *nodes, uint32_t i, msgpack_packer *pk)
{
    const tly_json_node *n = &nodes[i];
    switch (n->type) {
        case TLY_JSON_NULL:  msgpack_pack_nil (pk); break;
        case TLY_JSON_FALSE: msgpack_pack_false (pk); break;
        case TLY_JSON_TRUE:  msgpack_pack_true (pk); break;
        case TLY_JSON_INT:
            if (!n->neg)
                msgpack_pack_uint64 (pk, n->mag);
            else
            if (n->mag == (UINT64_C (1) << 63))
                msgpack_pack_int64 (pk, INT64_MIN);
            else
                msgpack_pack_int64 (pk, -(int64_t) n->mag);
            break;
        case TLY_JSON_STRING: tly_pack_str (pk, n->str, n->len); break;
        case TLY_JSON_ARRAY: {
            msgpack_pack_array (pk, n->count);
            uint32_t j = i + 1;
            for (uint32_t k = 0; k < n->count; k++)
                j = pack_node (nodes, j, pk);
            break;
        }
        case TLY_JSON_OBJECT: {
            msgpack_pack_map (pk, n->count);
            uint32_t j = i + 1;
            for (uint32_t k = 0; k < n->count; k++) {
                j = pack_node (nodes, j, pk);     //  the key
                j = pack_node (nodes, j, pk);     //  the value
            }
            break;
        }
    }
    return n->end;
}

int
e2e_pack_json (const char *json, tly_buf *out)
{
    size_t len = strlen (json);
    char *text = strdup (json);
    tly_json_node *nodes = calloc (len + 2, sizeof *nodes);
    if (!text || !nodes) {
        free (text);
        free (nodes);
        return TLY_ENOMEM;
    }
    for (char *p = text; *p; p++)
        if (*p == '\'')
            *p = '"';
    size_t count = 0;
    const char *why = NULL;
    size_t at = 0;
    int rc = tly_json_parse (text, len, nodes, len + 2, 64, &count, &why, &at);
    if (rc == TLY_OK) {
        msgpack_packer pk;
        tly_buf_packer (out, &pk);
        pack_node (nodes, 0, &pk);
        if (out->oom)
            rc = TLY_ENOMEM;
    }
    else
        fprintf (stderr, "e2e: bad test JSON at %zu (%s): %s\n", at, why ? why : "?", json);
    free (text);
    free (nodes);
    return rc;
}

/* ---- connections ---- */

struct e2e_conn {
    char endpoint[64];
    zsock_t *sock;
    tly_buf body;
};

static zsock_t *
dealer_to (const char *endpoint)
{
    zsock_t *s = zsock_new (ZMQ_DEALER);
    if (!s)
        return NULL;
    zsock_set_linger (s, 0);
    zsock_set_sndhwm (s, 0);
    zsock_set_rcvhwm (s, 0);
    if (zsock_connect (s, "%s", endpoint) != 0) {
        zsock_destroy (&s);
        return NULL;
    }
    return s;
}

e2e_conn *
e2e_conn_new (const char *endpoint)
{
    e2e_conn *self = calloc (1, sizeof *self);
    if (!self)
        return NULL;
    snprintf (self->endpoint, sizeof self->endpoint, "%s", endpoint);
    tly_buf_init (&self->body);
    self->sock = dealer_to (endpoint);
    if (!self->sock) {
        free (self);
        return NULL;
    }
    return self;
}

void
e2e_conn_destroy (e2e_conn **self_p)
{
    if (!self_p || !*self_p)
        return;
    zsock_destroy (&(*self_p)->sock);
    tly_buf_free (&(*self_p)->body);
    free (*self_p);
    *self_p = NULL;
}

static int
send_frames (zsock_t *sock, const void *const *frames, const size_t *lens, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        zmq_msg_t m;
        if (zmq_msg_init_size (&m, lens[i]) != 0)
            return TLY_ENOMEM;
        if (lens[i])
            memcpy (zmq_msg_data (&m), frames[i], lens[i]);
        int flags = i + 1 < n ? ZMQ_SNDMORE : 0;
        if (zmq_msg_send (&m, zsock_resolve (sock), flags) < 0) {
            zmq_msg_close (&m);
            return TLY_EIO;
        }
    }
    return TLY_OK;
}

//  Receives one whole message; the last frame is the body.
static int
recv_reply (zsock_t *sock, unsigned timeout_ms, e2e_reply *r)
{
    reply_reset (r);
    zmq_pollitem_t item = { zsock_resolve (sock), 0, ZMQ_POLLIN, 0 };
    uint64_t deadline = e2e_now_ms () + timeout_ms;
    for (;;) {
        uint64_t now = e2e_now_ms ();
        if (now >= deadline)
            return TLY_ETIMEOUT;
        int rc = zmq_poll (&item, 1, (long) (deadline - now));
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0)
            return TLY_EIO;
        if (rc > 0)
            break;
    }
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init (&m);
        if (zmq_msg_recv (&m, zsock_resolve (sock), 0) < 0) {
            zmq_msg_close (&m);
            return TLY_EIO;
        }
        bool more = zmq_msg_more (&m);
        if (r->nframes == 0) {
            r->frame0_len = zmq_msg_size (&m) < sizeof r->frame0
                            ? zmq_msg_size (&m) : sizeof r->frame0;
            memcpy (r->frame0, zmq_msg_data (&m), r->frame0_len);
        }
        r->nframes++;
        if (!more) {
            tly_buf_append (&r->raw, zmq_msg_data (&m), zmq_msg_size (&m));
            zmq_msg_close (&m);
            break;
        }
        zmq_msg_close (&m);
    }
    reply_parse (r);
    return TLY_OK;
}

int
e2e_conn_send (e2e_conn *self, const void *body, size_t len)
{
    const void *frames[1] = { body };
    size_t lens[1] = { len };
    return send_frames (self->sock, frames, lens, 1);
}

int
e2e_conn_recv (e2e_conn *self, unsigned timeout_ms, e2e_reply *r)
{
    return recv_reply (self->sock, timeout_ms, r);
}

int
e2e_conn_call_frames (e2e_conn *self, const void *const *frames,
                      const size_t *lens, size_t n, unsigned timeout_ms,
                      e2e_reply *r)
{
    int rc = send_frames (self->sock, frames, lens, n);
    if (rc == TLY_OK)
        rc = recv_reply (self->sock, timeout_ms, r);
    if (rc == TLY_ETIMEOUT || rc == TLY_EIO) {
        //  A late reply must not answer the next request.
        zsock_destroy (&self->sock);
        self->sock = dealer_to (self->endpoint);
        if (!self->sock)
            return TLY_EIO;
    }
    return rc;
}

int
e2e_conn_call (e2e_conn *self, const void *body, size_t len,
               unsigned timeout_ms, e2e_reply *r)
{
    const void *frames[1] = { body };
    size_t lens[1] = { len };
    return e2e_conn_call_frames (self, frames, lens, 1, timeout_ms, r);
}

int
e2e_callf (e2e_conn *self, e2e_reply *r, const char *fmt, ...)
{
    va_list ap;
    va_start (ap, fmt);
    char *json = NULL;
    int n = vasprintf (&json, fmt, ap);
    va_end (ap);
    if (n < 0)
        return TLY_ENOMEM;
    tly_buf_reset (&self->body);
    int rc = e2e_pack_json (json, &self->body);
    free (json);
    if (rc != TLY_OK) {
        reply_reset (r);
        return rc;
    }
    return e2e_conn_call (self, self->body.data, self->body.len, 15000, r);
}

int
e2e_call_req (const char *endpoint, const void *body, size_t len,
              unsigned timeout_ms, e2e_reply *r)
{
    zsock_t *s = zsock_new (ZMQ_REQ);
    if (!s)
        return TLY_ENOMEM;
    zsock_set_linger (s, 0);
    int rc = TLY_EIO;
    if (zsock_connect (s, "%s", endpoint) == 0) {
        const void *frames[1] = { body };
        size_t lens[1] = { len };
        rc = send_frames (s, frames, lens, 1);
        if (rc == TLY_OK)
            rc = recv_reply (s, timeout_ms, r);
    }
    zsock_destroy (&s);
    return rc;
}

bool
e2e_answers_sth (const char *endpoint, unsigned timeout_ms)
{
    e2e_conn *c = e2e_conn_new (endpoint);
    if (!c)
        return false;
    static const uint8_t body[] = { 0x81, 0xa2, 'o', 'p', 0xa3, 's', 't', 'h' };
    e2e_reply r;
    e2e_reply_init (&r);
    bool ok = e2e_conn_call (c, body, sizeof body, timeout_ms, &r) == TLY_OK && r.ok;
    e2e_reply_free (&r);
    e2e_conn_destroy (&c);
    return ok;
}

/* ---- events ---- */

tly_event
e2e_event (const char *customer, const char *meter, const char *key,
           uint64_t qty, uint64_t ts)
{
    tly_event ev;
    memset (&ev, 0, sizeof ev);
    ev.customer = (tly_str) { customer, (uint32_t) strlen (customer) };
    ev.meter = (tly_str) { meter, (uint32_t) strlen (meter) };
    ev.key = (tly_str) { key, (uint32_t) strlen (key) };
    ev.qty = qty;
    ev.ts = ts;
    return ev;
}

void
e2e_pack_ingest (tly_buf *out, uint64_t id, const tly_event *evs, size_t n)
{
    tly_buf_reset (out);
    msgpack_packer pk;
    tly_buf_packer (out, &pk);
    msgpack_pack_map (&pk, 3);
    tly_pack_cstr (&pk, "op");
    tly_pack_cstr (&pk, "ingest");
    tly_pack_cstr (&pk, "id");
    msgpack_pack_uint64 (&pk, id);
    tly_pack_cstr (&pk, "events");
    msgpack_pack_array (&pk, (uint32_t) n);
    for (size_t i = 0; i < n; i++)
        tly_event_pack (&evs[i], &pk);
}

tly_client *
e2e_client (const char *endpoint, unsigned timeout_ms, unsigned retries)
{
    tly_client_opts opts = { timeout_ms, retries, 4 };
    tly_client *c = NULL;
    if (tly_client_new (endpoint, &opts, &c) != TLY_OK)
        return NULL;
    return c;
}

/* ---- pushers ---- */

int
e2e_pusher_init (e2e_pusher *self, const char *endpoint, const uint8_t *pk,
                 const char *customer, const char *meter, const char *prefix,
                 size_t capacity, size_t batch)
{
    memset (self, 0, sizeof *self);
    self->endpoint = endpoint;
    self->pk = pk;
    snprintf (self->customer, sizeof self->customer, "%s", customer);
    snprintf (self->meter, sizeof self->meter, "%s", meter);
    snprintf (self->prefix, sizeof self->prefix, "%s", prefix);
    self->qty = 1;
    self->ts = tly_now_ms ();
    self->capacity = capacity;
    self->batch = batch;
    self->timeout_ms = 2000;
    self->retries = 2;
    self->give_up_ms = 120000;
    self->events = calloc (capacity, sizeof *self->events);
    self->keys = calloc (capacity, sizeof *self->keys);
    self->results = calloc (capacity, sizeof *self->results);
    if (!self->events || !self->keys || !self->results) {
        e2e_pusher_free (self);
        return TLY_ENOMEM;
    }
    return TLY_OK;
}

void
e2e_pusher_free (e2e_pusher *self)
{
    free (self->events);
    free (self->keys);
    free (self->results);
    self->events = NULL;
    self->keys = NULL;
    self->results = NULL;
}

static void *
pusher_main (void *arg)
{
    e2e_pusher *self = arg;
    for (size_t i = 0; i < self->capacity; i++) {
        snprintf (self->keys[i], sizeof self->keys[i], "%.24s-%zu", self->prefix, i);
        self->events[i] = e2e_event (self->customer, self->meter, self->keys[i],
                                     self->qty, self->ts);
    }
    tly_client *client = e2e_client (self->endpoint, self->timeout_ms, self->retries);
    if (!client) {
        snprintf (self->fail, sizeof self->fail, "no client for %s", self->endpoint);
        return NULL;
    }
    uint64_t give_up = e2e_now_ms () + self->give_up_ms;
    size_t start = 0;
    while (start < self->capacity && !atomic_load (&self->finish)) {
        size_t n = self->capacity - start < self->batch ? self->capacity - start : self->batch;
        self->attempted = start + n;
        for (;;) {
            if (atomic_load (&self->abandon))
                goto out;
            tly_sth sth;
            memset (&sth, 0, sizeof sth);
            int rc = tly_client_push (client, self->events + start, n, n,
                                      self->results + start, &sth, self->pk);
            if (rc == TLY_OK) {
                if (sth.tree_size >= self->newest.tree_size)
                    self->newest = sth;
                break;
            }
            self->failures++;
            snprintf (self->last_error, sizeof self->last_error, "%s: %s %s",
                      tly_strerror (rc), tly_client_error_code (client),
                      tly_client_error_message (client));
            if (rc == TLY_ECRYPTO) {
                snprintf (self->fail, sizeof self->fail, "an STH did not verify: %s",
                          self->last_error);
                goto out;
            }
            if (e2e_now_ms () > give_up) {
                snprintf (self->fail, sizeof self->fail,
                          "gave up on events %zu.. after %u failures: %s",
                          start, self->failures, self->last_error);
                goto out;
            }
            e2e_sleep_ms (20);
        }
        start += n;
        atomic_store (&self->done, start);
    }
out:
    tly_client_destroy (&client);
    return NULL;
}

int
e2e_pusher_start (e2e_pusher *self)
{
    return pthread_create (&self->thread, NULL, pusher_main, self) == 0
           ? TLY_OK : TLY_ENOMEM;
}

void
e2e_pusher_join (e2e_pusher *self)
{
    pthread_join (self->thread, NULL);
}
