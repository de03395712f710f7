/*  tally.c -- the `tally` command-line client.

    A thin layer over the client library: parse arguments, make one request
    (or stream many, for `push` from stdin), print the answer for people or,
    with --json, for programs.  `tally verify` works offline: it never opens
    a socket.  Errors go to stderr and the exit code says what kind of
    failure it was (see usage_text).
*/
#include <czmq.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "tally/client.h"
#include "tally/json.h"
#include "tally/msg.h"

enum {
    EXIT_SUCCESS_ = 0,
    EXIT_USAGE    = 1,      /* bad arguments, unreadable input or files      */
    EXIT_SERVER   = 2,      /* no answer, an error reply, a malformed reply   */
    EXIT_VERIFY   = 3,      /* a signature or proof does not verify           */
    EXIT_REJECTED = 4,      /* all answered, some events rejected/conflicting */
};

#define DEFAULT_API      "tcp://127.0.0.1:7400"
#define DEFAULT_CONTROL  "tcp://127.0.0.1:7401"
#define CTL_VERIFY_TIMEOUT_MS 3600000u
#define MAX_OPTS         64
#define MAX_POS          8
#define LINE_MAX_BYTES   (1024 * 1024)
#define CHUNK_MAX        100000
#define ARENA_BLOCK      (1024 * 1024)

static const char usage_text[] =
"usage: tally [global flags] COMMAND [args]\n"
"\n"
"global flags:\n"
"  --api ENDPOINT       API endpoint (env TALLY_API; default " DEFAULT_API ")\n"
"  --control ENDPOINT   control endpoint (env TALLY_CONTROL; default " DEFAULT_CONTROL ")\n"
"  --json               machine output, one JSON object per line: the reply\n"
"                       (bin fields as lowercase hex); push prints per event\n"
"                       {\"index\",\"status\",\"seq\",\"recv_ts\",\"leaf\"|\"code\",\n"
"                       \"message\"} then {\"sth\":{...}}\n"
"  --timeout MS         wait this long per attempt (default 10000; for\n"
"                       ctl verify, which answers after a full pass, 3600000)\n"
"  --retries N          resend on timeout/unavailable up to N times (default 5)\n"
"  --help, --version\n"
"\n"
"commands:\n"
"  push --customer C --meter M --key K --qty N [--ts MS] [--prop k=v]...\n"
"                       push one event (ts defaults to now)\n"
"  push [--batch N] [--inflight N]\n"
"                       push NDJSON events from stdin, one JSON object per line:\n"
"                       {\"customer\":..,\"meter\":..,\"key\":..,\"qty\":N,\"ts\":MS,\n"
"                        \"props\":{\"k\":\"v\"}}  (batch default 1000, inflight 8)\n"
"                       Give ts explicitly: a rerun then yields duplicates, not\n"
"                       conflicts.  push also takes --pubkey FILE to check STHs.\n"
"  get SEQ | get --customer C --key K\n"
"  sth [--out FILE] [--pubkey FILE]     current signed tree head (FILE: msgpack)\n"
"  pubkey [--out FILE]                  the log's key (FILE: 32 raw bytes)\n"
"  proof SEQ [--tree-size M] [--out FILE] [--pubkey FILE]\n"
"                       inclusion proof (FILE: the raw msgpack reply)\n"
"  consistency FROM TO [--out FILE] [--pubkey FILE]\n"
"  verify [--pubkey FILE] --proof FILE --leaf HEX\n"
"  verify [--pubkey FILE] --consistency FILE --old-sth FILE\n"
"  verify [--pubkey FILE] --sth FILE\n"
"                       offline checks, no server (pubkey default ./log.pub)\n"
"  quota get CUSTOMER\n"
"  quota set CUSTOMER|'*' METER|'*' LIMIT|none      (control endpoint)\n"
"  ctl OP [NAME]        control op: which_children, count_children, status,\n"
"                       verify, terminate_child NAME, restart_child NAME\n"
"\n"
"exit codes:\n"
"  0  success\n"
"  1  usage error (bad arguments, malformed input line, unreadable file)\n"
"  2  server or connection error (timeout, error reply, malformed reply)\n"
"  3  verification failed (bad signature or proof)\n"
"  4  every request was answered but some events were rejected or conflicted\n";

/* ---- arguments ---- */

typedef struct {
    const char *name;
    bool has_arg;
    bool global;
} opt_spec;

static const opt_spec opt_specs[] = {
    { "api", true, true }, { "control", true, true }, { "json", false, true },
    { "timeout", true, true }, { "retries", true, true },
    { "help", false, true }, { "version", false, true },
    { "customer", true, false }, { "meter", true, false },
    { "key", true, false }, { "qty", true, false }, { "ts", true, false },
    { "prop", true, false }, { "batch", true, false },
    { "inflight", true, false }, { "pubkey", true, false },
    { "out", true, false }, { "tree-size", true, false },
    { "proof", true, false }, { "leaf", true, false },
    { "consistency", true, false }, { "old-sth", true, false },
    { "sth", true, false },
};

typedef struct {
    const char *api;
    const char *control;
    bool json;
    bool help;
    bool version;
    tly_client_opts copts;
    bool timeout_set;             /* --timeout given */
    const char *opt_name [MAX_OPTS];
    const char *opt_val [MAX_OPTS];
    size_t nopts;
    const char *pos [MAX_POS];      /* pos[0] is the command */
    size_t npos;
} cli;

static int
usage_error (const char *fmt, ...)
{
    va_list args;
    va_start (args, fmt);
    fflush (stdout);                /* keep stdout and stderr in order */
    fputs ("tally: ", stderr);
    vfprintf (stderr, fmt, args);
    fputs ("\n(see tally --help)\n", stderr);
    va_end (args);
    return EXIT_USAGE;
}

static bool
parse_u64 (const char *s, uint64_t *out)
{
    if (!s || *s < '0' || *s > '9')
        return false;
    uint64_t v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        unsigned d = (unsigned) (*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

static bool
parse_uint (const char *s, unsigned max, unsigned *out)
{
    uint64_t v;
    if (!parse_u64 (s, &v) || v > max)
        return false;
    *out = (unsigned) v;
    return true;
}

static const opt_spec *
find_spec (const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof opt_specs / sizeof opt_specs [0]; i++)
        if (strlen (opt_specs [i].name) == len
        &&  memcmp (opt_specs [i].name, name, len) == 0)
            return &opt_specs [i];
    return NULL;
}

static int
set_global (cli *c, const char *name, const char *val)
{
    if (!strcmp (name, "api"))          c->api = val;
    else if (!strcmp (name, "control")) c->control = val;
    else if (!strcmp (name, "json"))    c->json = true;
    else if (!strcmp (name, "help"))    c->help = true;
    else if (!strcmp (name, "version")) c->version = true;
    else if (!strcmp (name, "timeout")) {
        if (!parse_uint (val, 86400000, &c->copts.timeout_ms) || !c->copts.timeout_ms)
            return usage_error ("--timeout wants milliseconds (1..86400000), not '%s'", val);
        c->timeout_set = true;
    }
    else if (!strcmp (name, "retries")) {
        if (!parse_uint (val, 1000, &c->copts.retries))
            return usage_error ("--retries wants a count (0..1000), not '%s'", val);
    }
    return 0;
}

/*  Reads one --name[=value] at argv[*i]; global flags are allowed anywhere. */
static int
parse_option (cli *c, int argc, char **argv, int *i)
{
    const char *arg = argv [*i] + 2;
    const char *eq = strchr (arg, '=');
    size_t len = eq ? (size_t) (eq - arg) : strlen (arg);
    const opt_spec *spec = find_spec (arg, len);
    if (!spec)
        return usage_error ("unknown option '%s'", argv [*i]);
    const char *val = eq ? eq + 1 : NULL;
    if (spec->has_arg && !val) {
        if (*i + 1 >= argc)
            return usage_error ("option --%s needs a value", spec->name);
        val = argv [++*i];
    }
    if (!spec->has_arg && val)
        return usage_error ("option --%s takes no value", spec->name);
    if (spec->global)
        return set_global (c, spec->name, val);
    if (c->nopts == MAX_OPTS)
        return usage_error ("too many options");
    c->opt_name [c->nopts] = spec->name;
    c->opt_val [c->nopts++] = val;
    return 0;
}

static int
parse_args (cli *c, int argc, char **argv)
{
    bool options = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv [i];
        int rc = 0;
        if (options && !strcmp (a, "--"))
            options = false;
        else if (options && !strncmp (a, "--", 2))
            rc = parse_option (c, argc, argv, &i);
        else if (options && (!strcmp (a, "-h")))
            c->help = true;
        else if (options && a [0] == '-' && a [1])
            rc = usage_error ("unknown option '%s'", a);
        else if (c->npos == MAX_POS)
            rc = usage_error ("too many arguments");
        else
            c->pos [c->npos++] = a;
        if (rc)
            return rc;
    }
    return 0;
}

/*  The last value given for --name, or NULL. */
static const char *
opt (const cli *c, const char *name)
{
    const char *val = NULL;
    for (size_t i = 0; i < c->nopts; i++)
        if (!strcmp (c->opt_name [i], name))
            val = c->opt_val [i];
    return val;
}

static bool
word_in (const char *word, const char *list)
{
    size_t n = strlen (word);
    for (const char *p = list; (p = strstr (p, word)); p += n)
        if ((p == list || p [-1] == ' ') && (p [n] == ' ' || p [n] == '\0'))
            return true;
    return false;
}

/* ---- output helpers ---- */

static void
hex (const uint8_t *p, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out [2 * i] = digits [p [i] >> 4];
        out [2 * i + 1] = digits [p [i] & 15];
    }
    out [2 * n] = '\0';
}

static bool
unhex (const char *s, uint8_t *out, size_t n)
{
    if (strlen (s) != 2 * n)
        return false;
    for (size_t i = 0; i < 2 * n; i++) {
        char ch = s [i];
        int v = ch >= '0' && ch <= '9' ? ch - '0'
              : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
              : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
        if (v < 0)
            return false;
        if (i % 2 == 0)
            out [i / 2] = (uint8_t) (v << 4);
        else
            out [i / 2] |= (uint8_t) v;
    }
    return true;
}

/*  Prints server-supplied text without letting control bytes reach the
    terminal. */
static void
put_text (const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char) p [i];
        putchar (ch < 0x20 || ch == 0x7f ? '?' : ch);
    }
}

static void
put_tstr (tly_str s)
{
    put_text (s.ptr, s.len);
}

static void
put_time (uint64_t ms)
{
    time_t secs = (time_t) (ms / 1000);
    struct tm tm;
    char buf [32];
    if (gmtime_r (&secs, &tm) && strftime (buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm))
        printf ("%s.%03uZ", buf, (unsigned) (ms % 1000));
    else
        printf ("%" PRIu64, ms);
}

static int
emit_json (tly_buf *out)
{
    tly_buf_append (out, "\n", 1);
    if (out->oom) {
        fprintf (stderr, "tally: out of memory\n");
        return EXIT_SERVER;
    }
    fwrite (out->data, 1, out->len, stdout);
    return 0;
}

/*  Prints a msgpack body as one line of JSON. */
static int
print_body_json (const uint8_t *data, size_t len)
{
    msgpack_zone zone;
    msgpack_object obj;
    if (len == 0 || tly_msg_check (data, len, &tly_msg_request_limits, NULL)
    ||  !msgpack_zone_init (&zone, 4096))
        return EXIT_SERVER;
    int rc = tly_msg_unpack (data, len, &zone, &obj);
    tly_buf out;
    tly_buf_init (&out);
    if (rc == TLY_OK)
        tly_json_write_msgpack (&out, &obj);
    msgpack_zone_destroy (&zone);
    rc = rc ? EXIT_SERVER : emit_json (&out);
    tly_buf_free (&out);
    return rc;
}

static int
print_reply_json (tly_client *client)
{
    const uint8_t *data;
    size_t len;
    if (tly_client_last_reply (client, &data, &len))
        return EXIT_SERVER;
    return print_body_json (data, len);
}

/*  Explains a failed call on stderr and picks the exit code.  With --json,
    a server error reply is also printed to stdout as JSON. */
static int
client_error (const cli *c, tly_client *client, int rc, const char *what)
{
    const char *code = tly_client_error_code (client);
    const char *msg = tly_client_error_message (client);
    fflush (stdout);
    if (rc == TLY_ESERVER) {
        fprintf (stderr, "tally: %s: the server refused: %s: %s\n", what, code, msg);
        if (!strcmp (code, "unavailable"))
            fprintf (stderr, "  the server is overloaded or restarting: try again "
                             "(pushing the same events again is safe)\n");
        else if (!strcmp (code, "unknown_op"))
            fprintf (stderr, "  this server does not know the op: check the "
                             "endpoint (--api vs --control) and its version\n");
        if (c->json)
            print_reply_json (client);
        return EXIT_SERVER;
    }
    fprintf (stderr, "tally: %s: %s\n", what, *msg ? msg : tly_strerror (rc));
    if (rc == TLY_ETIMEOUT)
        fprintf (stderr, "  check the endpoint (--api/--control, TALLY_API/"
                         "TALLY_CONTROL) or raise --timeout\n");
    return rc == TLY_ECRYPTO ? EXIT_VERIFY : EXIT_SERVER;
}

static int
connect_to (const cli *c, const char *endpoint, tly_client **client)
{
    int rc = tly_client_new (endpoint, &c->copts, client);
    if (rc == TLY_EINVAL)
        return usage_error ("bad endpoint '%s' (expected e.g. tcp://127.0.0.1:7400)",
                            endpoint);
    if (rc) {
        fprintf (stderr, "tally: cannot create a socket for %s: %s\n",
                 endpoint, tly_strerror (rc));
        return EXIT_SERVER;
    }
    return 0;
}

/* ---- files ---- */

static int
read_file (const char *path, tly_buf *out, size_t max)
{
    FILE *f = fopen (path, "rb");
    if (!f) {
        fprintf (stderr, "tally: cannot open %s: %s\n", path, strerror (errno));
        return EXIT_USAGE;
    }
    char chunk [8192];
    size_t n;
    while ((n = fread (chunk, 1, sizeof chunk, f)) > 0 && out->len <= max)
        tly_buf_append (out, chunk, n);
    bool bad = ferror (f);
    fclose (f);
    if (bad || out->oom || out->len > max) {
        fprintf (stderr, "tally: cannot read %s: %s\n", path,
                 bad ? strerror (errno) : "file too large");
        return EXIT_USAGE;
    }
    return 0;
}

static int
write_file (const char *path, const void *data, size_t len)
{
    FILE *f = fopen (path, "wb");
    bool ok = f && fwrite (data, 1, len, f) == len;
    if (f && fclose (f) != 0)
        ok = false;
    if (!ok) {
        fprintf (stderr, "tally: cannot write %s: %s\n", path, strerror (errno));
        return EXIT_USAGE;
    }
    return 0;
}

static int
save_last_reply (tly_client *client, const char *path)
{
    const uint8_t *data;
    size_t len;
    if (tly_client_last_reply (client, &data, &len))
        return EXIT_SERVER;
    return write_file (path, data, len);
}

static int
load_pubkey (const char *path, uint8_t pk [TLY_PK_LEN])
{
    tly_buf b;
    tly_buf_init (&b);
    int rc = read_file (path, &b, 1024);
    if (rc == 0 && b.len != TLY_PK_LEN)
        rc = usage_error ("%s is not a public key (want 32 raw bytes, as "
                          "`tally pubkey --out FILE` writes)", path);
    if (rc == 0)
        memcpy (pk, b.data, TLY_PK_LEN);
    tly_buf_free (&b);
    return rc;
}

/*  A loaded msgpack file: the bytes, their zone and the top object. */
typedef struct {
    tly_buf bytes;
    msgpack_zone zone;
    msgpack_object obj;
} mp_file;

static int
mp_file_load (mp_file *f, const char *path, const char *what)
{
    tly_buf_init (&f->bytes);
    msgpack_zone_init (&f->zone, 4096);
    int rc = read_file (path, &f->bytes, TLY_REQUEST_MAX);
    if (rc)
        return rc;
    const char *why = "empty file";
    if (f->bytes.len == 0
    ||  tly_msg_check (f->bytes.data, f->bytes.len, &tly_msg_request_limits, &why)
    ||  tly_msg_unpack (f->bytes.data, f->bytes.len, &f->zone, &f->obj)) {
        fprintf (stderr, "tally: %s is not %s: %s\n", path, what, why);
        return EXIT_VERIFY;
    }
    return 0;
}

static void
mp_file_free (mp_file *f)
{
    tly_buf_free (&f->bytes);
    msgpack_zone_destroy (&f->zone);
}

/* ---- push ---- */

typedef struct {
    size_t rejected;
    size_t conflicts;
    size_t index;                 /* results printed so far */
    tly_sth sth;
    bool have_sth;
} push_summary;

static void
result_json (const tly_result *r, size_t index, tly_buf *out)
{
    static const char *names [] = { "accepted", "duplicate", "conflict", "rejected" };
    char num [64];
    snprintf (num, sizeof num, "{\"index\":%zu,\"status\":", index);
    tly_buf_append (out, num, strlen (num));
    tly_json_write_str (out, names [r->status], strlen (names [r->status]));
    if (r->status == TLY_REJECTED) {
        tly_buf_append (out, ",\"code\":", 8);
        tly_json_write_str (out, r->code, strlen (r->code));
        tly_buf_append (out, ",\"message\":", 11);
        tly_json_write_str (out, r->message, strlen (r->message));
    }
    else {
        snprintf (num, sizeof num, ",\"seq\":%" PRIu64, r->seq);
        tly_buf_append (out, num, strlen (num));
    }
    if (r->status == TLY_ACCEPTED || r->status == TLY_DUPLICATE) {
        snprintf (num, sizeof num, ",\"recv_ts\":%" PRIu64 ",\"leaf\":", r->recv_ts);
        tly_buf_append (out, num, strlen (num));
        tly_json_write_hex (out, r->leaf, 32);
    }
    tly_buf_append (out, "}", 1);
}

static void
result_print (const cli *c, const tly_result *r, size_t index)
{
    char lh [65];
    if (c->json) {
        tly_buf out;
        tly_buf_init (&out);
        result_json (r, index, &out);
        emit_json (&out);
        tly_buf_free (&out);
        return;
    }
    switch (r->status) {
        case TLY_ACCEPTED:
            hex (r->leaf, 32, lh);
            printf ("accepted seq=%" PRIu64 " leaf=%s\n", r->seq, lh);
            break;
        case TLY_DUPLICATE:
            printf ("duplicate seq=%" PRIu64 "\n", r->seq);
            break;
        case TLY_CONFLICT:
            printf ("conflict seq=%" PRIu64 "\n", r->seq);
            break;
        default:
            printf ("rejected ");
            put_text (r->code, strlen (r->code));
            printf (": ");
            put_text (r->message, strlen (r->message));
            printf ("\n");
    }
}

static void
sth_print (const cli *c, const tly_sth *sth)
{
    char root [65], sig [129];
    hex (sth->root, 32, root);
    hex (sth->sig, 64, sig);
    if (c->json)
        printf ("{\"sth\":{\"tree_size\":%" PRIu64 ",\"ts\":%" PRIu64
                ",\"root\":\"%s\",\"sig\":\"%s\"}}\n",
                sth->tree_size, sth->ts, root, sig);
    else
        printf ("sth tree_size=%" PRIu64 " root=%s\n", sth->tree_size, root);
}

/*  Pushes one chunk of events and prints a result per event.  On a failed
    push, events without a reply print as "rejected no_reply". */
static int
push_chunk (const cli *c, tly_client *client, const tly_event *events,
            size_t n, tly_result *results, size_t batch, const uint8_t *pk,
            push_summary *sum)
{
    tly_sth sth;
    int rc = tly_client_push (client, events, n, batch, results, &sth, pk);
    for (size_t i = 0; i < n; i++) {
        result_print (c, &results [i], sum->index++);
        sum->rejected += results [i].status == TLY_REJECTED;
        sum->conflicts += results [i].status == TLY_CONFLICT;
    }
    if (rc)
        return client_error (c, client, rc, "push");
    if (!sum->have_sth || sth.tree_size >= sum->sth.tree_size)
        sum->sth = sth;
    sum->have_sth = true;
    return 0;
}

static int
push_finish (const cli *c, const push_summary *sum, int rc)
{
    if (sum->have_sth)
        sth_print (c, &sum->sth);
    if (rc == 0 && (sum->rejected || sum->conflicts)) {
        fprintf (stderr, "tally: %zu event(s) rejected, %zu in conflict with "
                 "earlier events of the same key\n", sum->rejected, sum->conflicts);
        return EXIT_REJECTED;
    }
    return rc;
}

static int
push_one (const cli *c, tly_client *client, const uint8_t *pk)
{
    tly_event ev;
    memset (&ev, 0, sizeof ev);
    const char *cust = opt (c, "customer"), *meter = opt (c, "meter");
    const char *key = opt (c, "key"), *ts = opt (c, "ts");
    if (!cust || !meter || !key || !opt (c, "qty"))
        return usage_error ("push needs --customer, --meter, --key and --qty "
                            "(or none of them, to read NDJSON from stdin)");
    if (!parse_u64 (opt (c, "qty"), &ev.qty))
        return usage_error ("--qty wants a non-negative integer");
    ev.ts = tly_now_ms ();
    if (ts && !parse_u64 (ts, &ev.ts))
        return usage_error ("--ts wants milliseconds since the epoch");
    ev.customer = (tly_str) { cust, (uint32_t) strlen (cust) };
    ev.meter = (tly_str) { meter, (uint32_t) strlen (meter) };
    ev.key = (tly_str) { key, (uint32_t) strlen (key) };
    for (size_t i = 0; i < c->nopts; i++) {
        if (strcmp (c->opt_name [i], "prop"))
            continue;
        const char *kv = c->opt_val [i], *eq = strchr (kv, '=');
        if (!eq)
            return usage_error ("--prop wants k=v, not '%s'", kv);
        if (ev.nprops == TLY_PROPS_MAX)
            return usage_error ("at most %d --prop", TLY_PROPS_MAX);
        ev.props [ev.nprops].key = (tly_str) { kv, (uint32_t) (eq - kv) };
        ev.props [ev.nprops++].val = (tly_str) { eq + 1, (uint32_t) strlen (eq + 1) };
    }
    tly_result r;
    push_summary sum = { 0 };
    int rc = push_chunk (c, client, &ev, 1, &r, 1, pk, &sum);
    return push_finish (c, &sum, rc);
}

/* -- NDJSON events -- */

typedef struct arena_block {
    struct arena_block *next;
    size_t used;
    size_t cap;
    char data [];
} arena_block;

/*  Keeps the text of a chunk's lines: events borrow their strings from it. */
static char *
arena_copy (arena_block **head, const char *p, size_t n)
{
    arena_block *b = *head;
    if (!b || b->cap - b->used < n + 1) {
        size_t cap = n + 1 > ARENA_BLOCK ? n + 1 : ARENA_BLOCK;
        b = malloc (sizeof *b + cap);
        if (!b)
            return NULL;
        b->next = *head;
        b->used = 0;
        b->cap = cap;
        *head = b;
    }
    char *dst = b->data + b->used;
    memcpy (dst, p, n);
    dst [n] = '\0';
    b->used += n + 1;
    return dst;
}

static void
arena_free (arena_block **head)
{
    while (*head) {
        arena_block *next = (*head)->next;
        free (*head);
        *head = next;
    }
}

static const char *const event_fields [] = {
    "customer", "meter", "key", "qty", "ts", "props"
};

static bool
json_tstr (const tly_json_node *n, tly_str *out)
{
    if (n->type != TLY_JSON_STRING)
        return false;
    *out = (tly_str) { n->str, n->len };
    return true;
}

static const char *
json_props (const tly_json_node *nodes, size_t obj, tly_event *ev)
{
    if (nodes [obj].type != TLY_JSON_OBJECT)
        return "props must be an object of strings";
    if (nodes [obj].count > TLY_PROPS_MAX)
        return "props has more than 16 entries";
    size_t i = obj + 1;
    for (uint32_t m = 0; m < nodes [obj].count; m++, i += 2) {
        tly_prop *p = &ev->props [ev->nprops++];
        if (!json_tstr (&nodes [i], &p->key) || !json_tstr (&nodes [i + 1], &p->val))
            return "props values must be strings";
    }
    return NULL;
}

/*  Sets field f of ev from the JSON value at nodes[v]. */
static const char *
json_field (const tly_json_node *nodes, size_t v, int f, tly_event *ev)
{
    const tly_json_node *n = &nodes [v];
    switch (f) {
        case 0: return json_tstr (n, &ev->customer) ? NULL : "customer must be a string";
        case 1: return json_tstr (n, &ev->meter) ? NULL : "meter must be a string";
        case 2: return json_tstr (n, &ev->key) ? NULL : "key must be a string";
        case 3:
        case 4:
            if (n->type != TLY_JSON_INT || n->neg)
                return f == 3 ? "qty must be a non-negative integer"
                              : "ts must be a non-negative integer (ms since the epoch)";
            *(f == 3 ? &ev->qty : &ev->ts) = n->mag;
            return NULL;
        default:
            return json_props (nodes, v, ev);
    }
}

/*  Reads one NDJSON line (parsed in place) into ev; NULL or what is wrong,
    written to err. */
static const char *
event_from_json (char *text, size_t len, tly_event *ev, char *err, size_t errlen)
{
    tly_json_node nodes [64];
    size_t count, at;
    const char *why;
    if (tly_json_parse (text, len, nodes, 64, 2, &count, &why, &at)) {
        snprintf (err, errlen, "%s (at byte %zu)", why, at + 1);
        return err;
    }
    if (nodes [0].type != TLY_JSON_OBJECT)
        return "not a JSON object";
    memset (ev, 0, sizeof *ev);
    ev->ts = tly_now_ms ();
    unsigned seen = 0;
    size_t i = 1;
    for (uint32_t m = 0; m < nodes [0].count; m++, i = nodes [i + 1].end) {
        int f = 0;
        while (f < 6 && !tly_json_streq (&nodes [i], event_fields [f]))
            f++;
        if (f == 6) {
            char name [41];
            size_t n = nodes [i].len < 40 ? nodes [i].len : 40;
            for (size_t j = 0; j < n; j++)
                name [j] = (unsigned char) nodes [i].str [j] < 0x20 ? '?' : nodes [i].str [j];
            name [n] = '\0';
            snprintf (err, errlen, "unknown field \"%s\" (want customer, meter, "
                      "key, qty, ts, props)", name);
            return err;
        }
        if (seen & (1u << f)) {
            snprintf (err, errlen, "field \"%s\" appears twice", event_fields [f]);
            return err;
        }
        seen |= 1u << f;
        if ((why = json_field (nodes, i + 1, f, ev)))
            return why;
    }
    if ((seen & 15) != 15)
        return "an event needs customer, meter, key and qty";
    return NULL;
}

typedef struct {
    tly_event *events;
    tly_result *results;
    size_t cap;
    arena_block *arena;
    char *line;
    size_t linecap;
    size_t lineno;
    char why [160];               /* what is wrong with line `lineno` */
} ndjson;

/*  Reads up to r->cap events from stdin.  Returns 0 (with *n events and
    *eof), or EXIT_USAGE after a bad line (having read the events before it;
    r->why says what is wrong). */
static int
ndjson_read (ndjson *r, size_t *n, bool *eof)
{
    *n = 0;
    while (*n < r->cap) {
        ssize_t got = getline (&r->line, &r->linecap, stdin);
        if (got < 0) {
            *eof = true;
            if (!ferror (stdin))
                return 0;
            snprintf (r->why, sizeof r->why, "cannot read: %s", strerror (errno));
            return EXIT_USAGE;
        }
        r->lineno++;
        size_t len = (size_t) got;
        while (len && (r->line [len - 1] == '\n' || r->line [len - 1] == '\r'))
            len--;
        size_t sp = strspn (r->line, " \t");
        if (sp >= len)
            continue;                       /* blank line */
        char err [160];
        const char *why = len > LINE_MAX_BYTES ? "line longer than 1 MiB" : NULL;
        char *text = why ? NULL : arena_copy (&r->arena, r->line, len);
        if (!why && !text)
            why = "out of memory";
        if (!why)
            why = event_from_json (text, len, &r->events [*n], err, sizeof err);
        if (why) {
            snprintf (r->why, sizeof r->why, "%s", why);
            return EXIT_USAGE;
        }
        (*n)++;
    }
    return 0;
}

static int
push_stream (const cli *c, tly_client *client, const uint8_t *pk, size_t batch)
{
    size_t cap = batch * c->copts.max_inflight * 4;
    ndjson r = { .cap = cap > CHUNK_MAX ? CHUNK_MAX : cap };
    r.events = calloc (r.cap, sizeof *r.events);
    r.results = calloc (r.cap, sizeof *r.results);
    push_summary sum = { 0 };
    int rc = 0;
    if (!r.events || !r.results)
        rc = usage_error ("out of memory for %zu events (lower --batch)", r.cap);
    if (rc == 0 && isatty (STDIN_FILENO))
        fprintf (stderr, "tally: reading NDJSON events from stdin (end with Ctrl-D)\n");
    bool eof = false;
    while (rc == 0 && !eof) {
        size_t n;
        int read_rc = ndjson_read (&r, &n, &eof);
        if (n)
            rc = push_chunk (c, client, r.events, n, r.results, batch, pk, &sum);
        if (rc == 0 && read_rc) {
            fflush (stdout);
            fprintf (stderr, "tally: stdin line %zu: %s\n", r.lineno, r.why);
            if (sum.index)
                fprintf (stderr, "  the %zu events before this line were pushed; "
                         "fix the line and push again (events already recorded "
                         "come back as duplicates)\n", sum.index);
            else
                fprintf (stderr, "  nothing was pushed\n");
            rc = read_rc;
        }
        arena_free (&r.arena);
        if (read_rc)
            break;
    }
    arena_free (&r.arena);
    free (r.line);
    free (r.events);
    free (r.results);
    return push_finish (c, &sum, rc);
}

static bool
push_has_event_flags (const cli *c)
{
    static const char *flags [] = { "customer", "meter", "key", "qty", "ts", "prop" };
    for (size_t i = 0; i < sizeof flags / sizeof flags [0]; i++)
        if (opt (c, flags [i]))
            return true;
    return false;
}

static int
cmd_push (cli *c)
{
    unsigned batch = 1000, inflight = c->copts.max_inflight;
    if (opt (c, "batch") && (!parse_uint (opt (c, "batch"), TLY_BATCH_MAX, &batch) || !batch))
        return usage_error ("--batch wants 1..%d", TLY_BATCH_MAX);
    if (opt (c, "inflight") && (!parse_uint (opt (c, "inflight"), 1024, &inflight) || !inflight))
        return usage_error ("--inflight wants 1..1024");
    c->copts.max_inflight = inflight;
    uint8_t pk [TLY_PK_LEN];
    int rc = opt (c, "pubkey") ? load_pubkey (opt (c, "pubkey"), pk) : 0;
    tly_client *client = NULL;
    if (rc == 0)
        rc = connect_to (c, c->api, &client);
    if (rc)
        return rc;
    const uint8_t *pkp = opt (c, "pubkey") ? pk : NULL;
    rc = push_has_event_flags (c) ? push_one (c, client, pkp)
                                  : push_stream (c, client, pkp, batch);
    tly_client_destroy (&client);
    return rc;
}

/* ---- get, sth, pubkey, proof, consistency ---- */

static void
entry_print (const tly_entry *e, const uint8_t leaf [32])
{
    char lh [65];
    hex (leaf, 32, lh);
    printf ("seq: %" PRIu64 "\nrecv_ts: %" PRIu64 " (", e->seq, e->recv_ts);
    put_time (e->recv_ts);
    printf (")\nkind: ");
    put_tstr (e->kind);
    printf ("\ncustomer: ");
    put_tstr (e->ev.customer);
    printf ("\nmeter: ");
    put_tstr (e->ev.meter);
    printf ("\nkey: ");
    put_tstr (e->ev.key);
    printf ("\nqty: %" PRIu64 "\nts: %" PRIu64 " (", e->ev.qty, e->ev.ts);
    put_time (e->ev.ts);
    printf (")\n");
    for (uint32_t i = 0; i < e->ev.nprops; i++) {
        printf ("prop ");
        put_tstr (e->ev.props [i].key);
        printf (": ");
        put_tstr (e->ev.props [i].val);
        printf ("\n");
    }
    printf ("leaf: %s\n", lh);
}

static int
cmd_get (cli *c)
{
    const char *cust = opt (c, "customer"), *key = opt (c, "key");
    uint64_t seq = 0;
    if (c->npos == 2 ? cust || key || !parse_u64 (c->pos [1], &seq)
                     : !cust || !key)
        return usage_error ("get wants SEQ, or --customer C --key K");
    tly_str cs = { cust, cust ? (uint32_t) strlen (cust) : 0 };
    tly_str ks = { key, key ? (uint32_t) strlen (key) : 0 };
    tly_client *client;
    int rc = connect_to (c, c->api, &client);
    if (rc)
        return rc;
    tly_entry e;
    uint8_t leaf [32];
    rc = tly_client_get (client, seq, cust ? &cs : NULL, &ks, &e, leaf);
    if (rc)
        rc = client_error (c, client, rc, "get");
    else if (c->json)
        rc = print_reply_json (client);
    else
        entry_print (&e, leaf);
    tly_client_destroy (&client);
    return rc;
}

static void
sth_print_long (const char *prefix, const tly_sth *sth)
{
    char root [65], sig [129];
    hex (sth->root, 32, root);
    hex (sth->sig, 64, sig);
    printf ("%stree_size: %" PRIu64 "\n%sts: %" PRIu64 " (",
            prefix, sth->tree_size, prefix, sth->ts);
    put_time (sth->ts);
    printf (")\n%sroot: %s\n%ssig: %s\n", prefix, root, prefix, sig);
}

/*  With --pubkey, checks an STH fetched from the server. */
static int
check_sth_opt (const cli *c, const tly_sth *sth)
{
    const char *path = opt (c, "pubkey");
    uint8_t pk [TLY_PK_LEN];
    if (!path)
        return 0;
    int rc = load_pubkey (path, pk);
    if (rc == 0 && tly_sth_verify (sth, pk) != TLY_OK) {
        fprintf (stderr, "tally: the STH's signature does NOT verify with %s: "
                 "the server's log key differs, or the STH was tampered with\n", path);
        rc = EXIT_VERIFY;
    }
    return rc;
}

static int
cmd_sth (cli *c)
{
    tly_client *client;
    int rc = connect_to (c, c->api, &client);
    if (rc)
        return rc;
    tly_sth sth;
    rc = tly_client_sth (client, &sth);
    if (rc)
        rc = client_error (c, client, rc, "sth");
    if (rc == 0 && opt (c, "out")) {
        tly_buf b;
        msgpack_packer pk;
        tly_buf_init (&b);
        tly_buf_packer (&b, &pk);
        tly_sth_pack (&sth, &pk);
        rc = write_file (opt (c, "out"), b.data, b.len);
        tly_buf_free (&b);
    }
    if (rc == 0)
        rc = c->json ? print_reply_json (client) : (sth_print_long ("", &sth), 0);
    if (rc == 0)
        rc = check_sth_opt (c, &sth);
    tly_client_destroy (&client);
    return rc;
}

static int
cmd_pubkey (cli *c)
{
    tly_client *client;
    int rc = connect_to (c, c->api, &client);
    if (rc)
        return rc;
    uint8_t pk [TLY_PK_LEN];
    char h [65];
    rc = tly_client_pubkey (client, pk);
    if (rc)
        rc = client_error (c, client, rc, "pubkey");
    if (rc == 0 && opt (c, "out"))
        rc = write_file (opt (c, "out"), pk, sizeof pk);
    if (rc == 0 && c->json)
        rc = print_reply_json (client);
    else if (rc == 0) {
        hex (pk, sizeof pk, h);
        printf ("%s\n", h);
    }
    tly_client_destroy (&client);
    return rc;
}

static void
proof_print (const tly_proof *p, bool consistency)
{
    char h [65];
    printf ("%s: %" PRIu64 "\n%s: %" PRIu64 "\n", consistency ? "from" : "seq",
            p->seq, consistency ? "to" : "tree_size", p->tree_size);
    for (size_t i = 0; i < p->path_len; i++) {
        hex (p->path [i], 32, h);
        printf ("path[%zu]: %s\n", i, h);
    }
    sth_print_long ("sth.", &p->sth);
}

static int
proof_finish (cli *c, tly_client *client, int rc, const char *what,
              const tly_proof *p, bool consistency)
{
    if (rc)
        return client_error (c, client, rc, what);
    if (opt (c, "out"))
        rc = save_last_reply (client, opt (c, "out"));
    if (rc == 0)
        rc = c->json ? print_reply_json (client) : (proof_print (p, consistency), 0);
    if (rc == 0)
        rc = check_sth_opt (c, &p->sth);
    return rc;
}

static int
cmd_proof (cli *c)
{
    uint64_t seq, size = 0;
    if (!parse_u64 (c->pos [1], &seq))
        return usage_error ("proof wants SEQ, a non-negative integer");
    if (opt (c, "tree-size") && (!parse_u64 (opt (c, "tree-size"), &size) || !size))
        return usage_error ("--tree-size wants a positive integer");
    tly_client *client;
    int rc = connect_to (c, c->api, &client);
    if (rc)
        return rc;
    tly_proof *p = malloc (sizeof *p);
    rc = p ? tly_client_proof (client, seq, size, p) : TLY_ENOMEM;
    rc = proof_finish (c, client, rc, "proof", p, false);
    free (p);
    tly_client_destroy (&client);
    return rc;
}

static int
cmd_consistency (cli *c)
{
    uint64_t from, to;
    if (!parse_u64 (c->pos [1], &from) || !parse_u64 (c->pos [2], &to)
    ||  from == 0 || from > to)
        return usage_error ("consistency wants FROM TO with 0 < FROM <= TO");
    tly_client *client;
    int rc = connect_to (c, c->api, &client);
    if (rc)
        return rc;
    tly_proof *p = malloc (sizeof *p);
    rc = p ? tly_client_consistency (client, from, to, p) : TLY_ENOMEM;
    rc = proof_finish (c, client, rc, "consistency", p, true);
    free (p);
    tly_client_destroy (&client);
    return rc;
}

/* ---- verify (offline) ---- */

static int
verify_report (const cli *c, const char *check, int rc, const char *detail)
{
    if (c->json) {
        tly_buf out;
        tly_buf_init (&out);
        tly_buf_append (&out, "{\"check\":", 9);
        tly_json_write_str (&out, check, strlen (check));
        const char *mid = rc ? ",\"ok\":false,\"error\":" : ",\"ok\":true,\"detail\":";
        tly_buf_append (&out, mid, strlen (mid));
        tly_json_write_str (&out, detail, strlen (detail));
        tly_buf_append (&out, "}", 1);
        emit_json (&out);
        tly_buf_free (&out);
    }
    else if (rc == 0)
        printf ("OK: %s\n", detail);
    if (rc)
        fprintf (stderr, "tally: verification FAILED: %s\n", detail);
    return rc ? EXIT_VERIFY : 0;
}

/*  An STH file holds the STH map itself (tally sth --out), or any reply
    that carries one under "sth" (a proof file). */
static int
sth_from_file (const char *path, tly_sth *sth)
{
    mp_file f;
    int rc = mp_file_load (&f, path, "an STH");
    if (rc == 0) {
        const msgpack_object *inner = tly_msg_get (&f.obj, "sth");
        if (tly_sth_decode (inner ? inner : &f.obj, sth) != TLY_OK) {
            fprintf (stderr, "tally: %s is not an STH (want a msgpack map with "
                     "tree_size, ts, root, sig)\n", path);
            rc = EXIT_VERIFY;
        }
    }
    mp_file_free (&f);
    return rc;
}

static int
proof_from_file (const char *path, bool consistency, tly_proof *p)
{
    mp_file f;
    const char *what = consistency ? "a consistency proof" : "an inclusion proof";
    int rc = mp_file_load (&f, path, what);
    if (rc == 0 && tly_proof_decode (&f.obj, consistency, p) != TLY_OK) {
        fprintf (stderr, "tally: %s is not %s (want the raw reply of `tally %s "
                 "--out FILE`)\n", path, what, consistency ? "consistency" : "proof");
        rc = EXIT_VERIFY;
    }
    mp_file_free (&f);
    return rc;
}

static int
verify_inclusion (const cli *c, const uint8_t pk [TLY_PK_LEN])
{
    uint8_t leaf [32];
    char detail [256], root [65];
    if (!opt (c, "leaf") || !unhex (opt (c, "leaf"), leaf, 32))
        return usage_error ("verify --proof wants --leaf HEX (64 hex digits)");
    tly_proof *p = malloc (sizeof *p);
    if (!p)
        return usage_error ("out of memory");
    int rc = proof_from_file (opt (c, "proof"), false, p);
    if (rc == 0) {
        int v = tly_verify_inclusion (pk, leaf, p);
        hex (p->sth.root, 32, root);
        snprintf (detail, sizeof detail, v == TLY_OK
            ? "leaf %.16s... is entry %" PRIu64 " of the signed tree of size %" PRIu64 " (root %s)"
            : "leaf %.16s... is NOT proven to be entry %" PRIu64 " of the signed tree of size %" PRIu64 " (root %s)",
            opt (c, "leaf"), p->seq, p->tree_size, root);
        if (v == TLY_OK || tly_sth_verify (&p->sth, pk) == TLY_OK)
            rc = verify_report (c, "inclusion", v, detail);
        else
            rc = verify_report (c, "inclusion", v, "the proof's STH signature does "
                                "not verify with this public key");
    }
    free (p);
    return rc;
}

static int
verify_consistency (const cli *c, const uint8_t pk [TLY_PK_LEN])
{
    tly_sth old;
    char detail [160];
    if (!opt (c, "old-sth"))
        return usage_error ("verify --consistency wants --old-sth FILE");
    tly_proof *p = malloc (sizeof *p);
    if (!p)
        return usage_error ("out of memory");
    int rc = sth_from_file (opt (c, "old-sth"), &old);
    if (rc == 0)
        rc = proof_from_file (opt (c, "consistency"), true, p);
    if (rc == 0) {
        int v = tly_verify_consistency (pk, &old, p);
        if (v == TLY_EINVAL)
            snprintf (detail, sizeof detail, "the proof is from tree size %" PRIu64
                      " but the old STH has tree size %" PRIu64, p->seq, old.tree_size);
        else
            snprintf (detail, sizeof detail, v == TLY_OK
                ? "the tree of size %" PRIu64 " is a prefix of the signed tree of size %" PRIu64
                : "the tree of size %" PRIu64 " is NOT proven a prefix of the tree of size %"
                  PRIu64 " (bad signature or path)", old.tree_size, p->tree_size);
        rc = verify_report (c, "consistency", v, detail);
    }
    free (p);
    return rc;
}

static int
verify_sth (const cli *c, const uint8_t pk [TLY_PK_LEN])
{
    tly_sth sth;
    char detail [160];
    int rc = sth_from_file (opt (c, "sth"), &sth);
    if (rc)
        return rc;
    int v = tly_sth_verify (&sth, pk);
    snprintf (detail, sizeof detail, "STH of tree size %" PRIu64 " is %ssigned by this key",
              sth.tree_size, v == TLY_OK ? "" : "NOT ");
    return verify_report (c, "sth", v, detail);
}

static int
cmd_verify (cli *c)
{
    int modes = !!opt (c, "proof") + !!opt (c, "consistency") + !!opt (c, "sth");
    if (modes != 1)
        return usage_error ("verify wants exactly one of --proof, --consistency, --sth");
    if (opt (c, "leaf") && !opt (c, "proof"))
        return usage_error ("--leaf goes with --proof");
    if (opt (c, "old-sth") && !opt (c, "consistency"))
        return usage_error ("--old-sth goes with --consistency");
    const char *path = opt (c, "pubkey") ? opt (c, "pubkey") : "./log.pub";
    uint8_t pk [TLY_PK_LEN];
    int rc = load_pubkey (path, pk);
    if (rc)
        return rc;
    if (opt (c, "proof"))
        return verify_inclusion (c, pk);
    if (opt (c, "consistency"))
        return verify_consistency (c, pk);
    return verify_sth (c, pk);
}

/* ---- quota and control ops ---- */

/*  Sends a body built in `req` to endpoint; prints JSON or leaves the reply
    in `reply` for a human printer.  Returns an exit code. */
static int
raw_call (const cli *c, const char *endpoint, const char *what, tly_buf *req,
          tly_buf *reply)
{
    tly_client *client;
    int rc = connect_to (c, endpoint, &client);
    if (rc)
        return rc;
    rc = req->oom ? TLY_ENOMEM : tly_client_call (client, req->data, req->len, reply);
    rc = rc ? client_error (c, client, rc, what) : 0;
    if (rc == 0 && c->json)
        rc = print_body_json (reply->data, reply->len);
    tly_client_destroy (&client);
    return rc;
}

static void put_value (const msgpack_object *o);

static void
put_scalar (const msgpack_object *o)
{
    char h [65];
    switch (o->type) {
        case MSGPACK_OBJECT_NIL:     printf ("-"); break;
        case MSGPACK_OBJECT_BOOLEAN: printf ("%s", o->via.boolean ? "true" : "false"); break;
        case MSGPACK_OBJECT_POSITIVE_INTEGER: printf ("%" PRIu64, o->via.u64); break;
        case MSGPACK_OBJECT_NEGATIVE_INTEGER: printf ("%" PRId64, o->via.i64); break;
        case MSGPACK_OBJECT_FLOAT32:
        case MSGPACK_OBJECT_FLOAT64: printf ("%g", o->via.f64); break;
        case MSGPACK_OBJECT_STR:     put_text (o->via.str.ptr, o->via.str.size); break;
        case MSGPACK_OBJECT_BIN:
            for (uint32_t i = 0; i < o->via.bin.size; i += 32) {
                uint32_t n = o->via.bin.size - i < 32 ? o->via.bin.size - i : 32;
                hex ((const uint8_t *) o->via.bin.ptr + i, n, h);
                printf ("%s", h);
            }
            break;
        default:                     put_value (o); break;
    }
}

/*  Arrays and maps nested in a value print inline, JSON-like. */
static void
put_value (const msgpack_object *o)
{
    if (o->type == MSGPACK_OBJECT_ARRAY) {
        printf ("[");
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            fputs (i ? ", " : "", stdout);
            put_value (&o->via.array.ptr [i]);
        }
        printf ("]");
    }
    else if (o->type == MSGPACK_OBJECT_MAP) {
        printf ("{");
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            fputs (i ? ", " : "", stdout);
            put_scalar (&o->via.map.ptr [i].key);
            printf (": ");
            put_value (&o->via.map.ptr [i].val);
        }
        printf ("}");
    }
    else
        put_scalar (o);
}

/*  Prints a reply map as "key: value" lines, nested maps as "a.b: v" and
    arrays of maps as "a[i].b: v"; skips the envelope fields id and ok. */
static void
put_lines (const char *prefix, const msgpack_object *map, bool top)
{
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr [i].key;
        const msgpack_object *v = &map->via.map.ptr [i].val;
        if (top && (tly_msg_streq (k, "id") || tly_msg_streq (k, "ok")))
            continue;
        char name [256];
        int n = snprintf (name, sizeof name, "%s", prefix);
        if (k->type == MSGPACK_OBJECT_STR)
            snprintf (name + n, sizeof name - (size_t) n, "%.*s",
                      (int) k->via.str.size, k->via.str.ptr);
        bool maps = v->type == MSGPACK_OBJECT_ARRAY && v->via.array.size
                 && v->via.array.ptr [0].type == MSGPACK_OBJECT_MAP;
        if (v->type == MSGPACK_OBJECT_MAP && strlen (name) < 200) {
            strcat (name, ".");
            put_lines (name, v, false);
        }
        else if (maps && strlen (name) < 200) {
            size_t len = strlen (name);
            for (uint32_t j = 0; j < v->via.array.size; j++) {
                snprintf (name + len, sizeof name - len, "[%u].", j);
                if (v->via.array.ptr [j].type == MSGPACK_OBJECT_MAP)
                    put_lines (name, &v->via.array.ptr [j], false);
            }
        }
        else {
            put_text (name, strlen (name));
            printf (": ");
            put_value (v);
            printf ("\n");
        }
    }
}

/*  Unpacks a reply body (already checked by the client) for printing. */
static bool
reply_unpack (const tly_buf *reply, msgpack_zone *zone, msgpack_object *obj)
{
    return msgpack_zone_init (zone, 4096)
        && tly_msg_unpack (reply->data, reply->len, zone, obj) == TLY_OK
        && obj->type == MSGPACK_OBJECT_MAP;
}

static void
print_children (const msgpack_object *reply)
{
    const msgpack_object *kids = tly_msg_get (reply, "children");
    if (!kids || kids->type != MSGPACK_OBJECT_ARRAY) {
        put_lines ("", reply, true);
        return;
    }
    printf ("%-20s %-12s %8s  %s\n", "NAME", "STATE", "RESTARTS", "SINCE");
    for (uint32_t i = 0; i < kids->via.array.size; i++) {
        const msgpack_object *k = &kids->via.array.ptr [i];
        tly_str name = { "?", 1 }, state = { "?", 1 };
        uint64_t restarts = 0, since = 0;
        tly_msg_get_str (k, "name", &name);
        tly_msg_get_str (k, "state", &state);
        tly_msg_get_uint (k, "restarts", &restarts);
        tly_msg_get_uint (k, "since", &since);
        put_tstr (name);
        printf ("%*s ", name.len < 20 ? (int) (20 - name.len) : 0, "");
        put_tstr (state);
        printf ("%*s %8" PRIu64 "  ", state.len < 12 ? (int) (12 - state.len) : 0,
                "", restarts);
        put_time (since);
        printf ("\n");
    }
}

static void
print_quota (const msgpack_object *reply)
{
    const msgpack_object *limits = tly_msg_get (reply, "limits");
    tly_str cust = { "", 0 }, period = { "", 0 };
    tly_msg_get_str (reply, "customer", &cust);
    tly_msg_get_str (reply, "period", &period);
    printf ("customer: ");
    put_tstr (cust);
    printf ("\nperiod: ");
    put_tstr (period);
    printf ("\n");
    if (!limits || limits->type != MSGPACK_OBJECT_ARRAY || !limits->via.array.size) {
        printf ("no limits apply\n");
        return;
    }
    printf ("%-24s %20s %20s\n", "METER", "LIMIT", "USED");
    for (uint32_t i = 0; i < limits->via.array.size; i++) {
        const msgpack_object *l = &limits->via.array.ptr [i];
        tly_str meter = { "?", 1 };
        uint64_t lim = 0, used = 0;
        tly_msg_get_str (l, "meter", &meter);
        tly_msg_get_uint (l, "limit", &lim);
        tly_msg_get_uint (l, "used", &used);
        put_tstr (meter);
        printf ("%*s %20" PRIu64 " %20" PRIu64 "\n",
                meter.len < 24 ? (int) (24 - meter.len) : 0, "", lim, used);
    }
}

/*  `ctl verify` and `ctl status` carry a verification result: a map with
    "checked" and a boolean "ok".  False there means the log is damaged. */
static bool
reply_says_unverified (const msgpack_object *reply)
{
    for (uint32_t i = 0; i < reply->via.map.size; i++) {
        const msgpack_object *v = &reply->via.map.ptr [i].val;
        bool ok = true;
        if (v->type == MSGPACK_OBJECT_MAP && tly_msg_get (v, "checked")
        &&  tly_msg_get_bool (v, "ok", &ok) == TLY_OK && !ok)
            return true;
    }
    return false;
}

static int
print_raw_reply (const cli *c, const tly_buf *reply, const char *op)
{
    msgpack_zone zone;
    msgpack_object obj;
    int rc = 0;
    if (!reply_unpack (reply, &zone, &obj))
        rc = EXIT_SERVER;
    else {
        if (!c->json && !strcmp (op, "which_children"))
            print_children (&obj);
        else if (!c->json && !strcmp (op, "quota"))
            print_quota (&obj);
        else if (!c->json && obj.via.map.size <= 2)
            printf ("ok\n");
        else if (!c->json)
            put_lines ("", &obj, true);
        if (!strcmp (op, "verify") && reply_says_unverified (&obj)) {
            fprintf (stderr, "tally: the server's log verification FAILED\n");
            rc = EXIT_VERIFY;
        }
    }
    msgpack_zone_destroy (&zone);
    return rc;
}

static int
cmd_quota (cli *c)
{
    const char *sub = c->pos [1];
    bool get = !strcmp (sub, "get"), set = !strcmp (sub, "set");
    if (!(get && c->npos == 3) && !(set && c->npos == 5))
        return usage_error ("quota wants: get CUSTOMER | set CUSTOMER METER LIMIT|none");
    uint64_t limit = 0;
    bool none = set && !strcmp (c->pos [4], "none");
    if (set && !none && !parse_u64 (c->pos [4], &limit))
        return usage_error ("quota set wants LIMIT as a non-negative integer or 'none'");
    tly_buf req, reply;
    msgpack_packer pk;
    tly_buf_init (&req);
    tly_buf_init (&reply);
    tly_buf_packer (&req, &pk);
    msgpack_pack_map (&pk, set ? 4 : 2);
    tly_pack_cstr (&pk, "op");
    tly_pack_cstr (&pk, set ? "set_quota" : "quota");
    tly_pack_cstr (&pk, "customer");
    tly_pack_cstr (&pk, c->pos [2]);
    if (set) {
        tly_pack_cstr (&pk, "meter");
        tly_pack_cstr (&pk, c->pos [3]);
        tly_pack_cstr (&pk, "limit");
        if (none)
            msgpack_pack_nil (&pk);
        else
            msgpack_pack_uint64 (&pk, limit);
    }
    int rc = raw_call (c, set ? c->control : c->api, set ? "quota set" : "quota",
                       &req, &reply);
    if (rc == 0)
        rc = print_raw_reply (c, &reply, set ? "set_quota" : "quota");
    tly_buf_free (&req);
    tly_buf_free (&reply);
    return rc;
}

static bool
op_name_ok (const char *op)
{
    if (!*op)
        return false;
    for (const char *p = op; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || *p == '_' || (*p >= '0' && *p <= '9')))
            return false;
    return true;
}

static int
cmd_ctl (cli *c)
{
    const char *op = c->pos [1];
    if (!op_name_ok (op))
        return usage_error ("ctl wants an op name such as which_children, not '%s'", op);
    bool needs_name = !strcmp (op, "terminate_child") || !strcmp (op, "restart_child");
    if (needs_name && c->npos != 3)
        return usage_error ("ctl %s wants a child NAME (see tally ctl which_children)", op);
    /*  `verify` answers when a full pass over the ledger ends: 18 s at
        19.4M entries on the benchmark machine, and longer on busy cores.
        Wait up to an hour for it unless --timeout says. */
    if (!strcmp (op, "verify") && !c->timeout_set)
        c->copts.timeout_ms = CTL_VERIFY_TIMEOUT_MS;
    tly_buf req, reply;
    msgpack_packer pk;
    tly_buf_init (&req);
    tly_buf_init (&reply);
    tly_buf_packer (&req, &pk);
    msgpack_pack_map (&pk, c->npos == 3 ? 2 : 1);
    tly_pack_cstr (&pk, "op");
    tly_pack_cstr (&pk, op);
    if (c->npos == 3) {
        tly_pack_cstr (&pk, "name");
        tly_pack_cstr (&pk, c->pos [2]);
    }
    int rc = raw_call (c, c->control, op, &req, &reply);
    if (rc == 0)
        rc = print_raw_reply (c, &reply, op);
    tly_buf_free (&req);
    tly_buf_free (&reply);
    return rc;
}

/* ---- main ---- */

typedef struct {
    const char *name;
    int (*fn) (cli *c);
    const char *options;          /* command options it accepts */
    size_t min_args;
    size_t max_args;
} command;

static const command commands [] = {
    { "push", cmd_push, "customer meter key qty ts prop batch inflight pubkey", 0, 0 },
    { "get", cmd_get, "customer key", 0, 1 },
    { "sth", cmd_sth, "out pubkey", 0, 0 },
    { "pubkey", cmd_pubkey, "out", 0, 0 },
    { "proof", cmd_proof, "tree-size out pubkey", 1, 1 },
    { "consistency", cmd_consistency, "out pubkey", 2, 2 },
    { "verify", cmd_verify, "pubkey proof leaf consistency old-sth sth", 0, 0 },
    { "quota", cmd_quota, "", 2, 4 },
    { "ctl", cmd_ctl, "", 1, 2 },
};

static int
dispatch (cli *c)
{
    const char *name = c->pos [0];
    for (size_t i = 0; i < sizeof commands / sizeof commands [0]; i++) {
        const command *cmd = &commands [i];
        if (strcmp (cmd->name, name))
            continue;
        for (size_t j = 0; j < c->nopts; j++)
            if (!word_in (c->opt_name [j], cmd->options))
                return usage_error ("tally %s does not take --%s", name, c->opt_name [j]);
        if (c->npos - 1 < cmd->min_args || c->npos - 1 > cmd->max_args)
            return usage_error ("wrong number of arguments for tally %s", name);
        return cmd->fn (c);
    }
    return usage_error ("unknown command '%s'", name);
}

static const char *
env_or (const char *name, const char *fallback)
{
    const char *v = getenv (name);
    return v && *v ? v : fallback;
}

int
main (int argc, char **argv)
{
    cli c = { .copts = tly_client_default_opts };
    c.api = env_or ("TALLY_API", DEFAULT_API);
    c.control = env_or ("TALLY_CONTROL", DEFAULT_CONTROL);
    int rc = parse_args (&c, argc, argv);
    if (rc)
        return rc;
    if (c.help) {
        fputs (usage_text, stdout);
        return 0;
    }
    if (c.version) {
        printf ("tally %s\n", TLY_VERSION);
        return 0;
    }
    if (c.npos == 0) {
        fputs (usage_text, stderr);
        return EXIT_USAGE;
    }
    /*  Let Ctrl-C end the process as usual: CZMQ would otherwise catch it. */
    zsys_handler_set (NULL);
    rc = dispatch (&c);
    fflush (stdout);
    return rc;
}
