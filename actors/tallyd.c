/*  tallyd.c -- the Tally daemon: the root of the supervision tree.

    It reads the configuration, opens the ledger and the log key, creates
    the sockets that outlive any one actor (the API endpoint and the inproc
    links), starts the supervisor with the four actors in order
        receipt, quota, reconcile, ingest
    (writer first, API last, so nothing is accepted before it can be
    recorded), and then serves the control endpoint until SIGTERM/SIGINT or
    until the supervisor escalates.
*/
#include <getopt.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sodium.h>
#include "actors.h"
#include "tally/log.h"
#include "tally/msg.h"
#include "tally/sha256.h"
#include "proto.h"

#define WHO "tallyd"
#define GROUP_MAX_MAX 1000000
#define REQUEST_MAX_MB_MAX 256
#define EXIT_ESCALATED 70

typedef struct {
    char data_dir[1024];
    char api[256];
    char control[256];
    char config[1024];
    unsigned verify_interval;
    unsigned verify_cpu;
    unsigned verify_nice;
    char log_level[16];
    unsigned map_size_gb;
    unsigned request_max_mb;
    unsigned group_max;
    char strategy[32];
    unsigned intensity;
    unsigned period_s;
    unsigned heartbeat_ms;
    unsigned heartbeat_timeout_ms;
    unsigned shutdown_ms;
} options_t;

static void
usage (FILE *out)
{
    fprintf (out,
"Usage: tallyd [OPTIONS]\n"
"The Tally usage-metering ledger daemon (version " TLY_VERSION ").\n"
"\n"
"Options (flags override the config file; defaults in brackets):\n"
"  --data-dir DIR          ledger, keys and limits live here [./data]\n"
"  --api ENDPOINT          API endpoint for services [tcp://127.0.0.1:7400]\n"
"  --control ENDPOINT      control endpoint for operators [tcp://127.0.0.1:7401]\n"
"  --config FILE           ZPL config file (see config/tallyd.cfg)\n"
"  --verify-interval SECS  the scrubber checks every stored byte at least\n"
"                          this often [60]\n"
"  --verify-cpu PERCENT    ... using at most this much of one core [25]; a\n"
"                          ledger too big for both gets a warning in the log\n"
"  --verify-nice N         the scrubber's CPU priority below the other actors,\n"
"                          0 (same) to 19 (nice 19), or 20: idle, only CPU\n"
"                          time no actor wants [20]: when the cores are\n"
"                          busy, requests go first and passes take longer;\n"
"                          a `ctl verify` pass runs at nice 19 where\n"
"                          RLIMIT_NICE (ulimit -e 1) or CAP_SYS_NICE allow it\n"
"  --log-level LEVEL       debug, info, warn or error [info]\n"
"  --map-size-gb N         LMDB map size: the ledger's maximum size [256]\n"
"  --request-max-mb N      larger requests get too_large, 1 to 256 [16]\n"
"  --group-max N           most events in one commit, up to 1000000 [50000]\n"
"  --strategy S            one_for_one, one_for_all or rest_for_one [one_for_one]\n"
"  --intensity N           restarts allowed ... [5]\n"
"  --period SECS           ... within this many seconds, else exit 70 [30]\n"
"  --heartbeat-ms MS       supervisor pings each actor this often [1000]\n"
"  --heartbeat-timeout-ms MS  an actor silent this long has failed [5000]\n"
"  --shutdown-ms MS        time an actor gets to stop [10000]\n"
"  --help                  this text\n"
"  --version               the version\n"
"\n"
"Environment (tuning and diagnosis; leave unset in production):\n"
"  TALLY_L0_MAX=N          keys in the dedup index's L0 before a flush,\n"
"                          16 to 16777216 [131072]\n"
"  TALLY_SHA256=portable   hash with libsodium even where the CPU has SHA-NI\n"
"  TALLY_HEADS_FULL=N      the scrubber checks one signed head in N in full\n"
"                          (signature and root), the others by their seal [64]\n"
"\n"
"Signals: SIGTERM or SIGINT stops taking requests, answers those in flight,\n"
"and exits 0.  Exit status 70: the supervisor gave up (restart intensity\n"
"exceeded); the service manager should restart tallyd.  Status 1: bad\n"
"options or a start-up failure (the log says which).\n");
}

static void
options_defaults (options_t *o)
{
    memset (o, 0, sizeof *o);
    strcpy (o->data_dir, "./data");
    strcpy (o->api, "tcp://127.0.0.1:7400");
    strcpy (o->control, "tcp://127.0.0.1:7401");
    o->verify_interval = 60;
    o->verify_cpu = 25;
    o->verify_nice = 20;
    strcpy (o->log_level, "info");
    o->map_size_gb = 256;
    o->request_max_mb = 16;
    o->group_max = 50000;
    strcpy (o->strategy, "one_for_one");
    o->intensity = 5;
    o->period_s = 30;
    o->heartbeat_ms = 1000;
    o->heartbeat_timeout_ms = 5000;
    o->shutdown_ms = 10000;
}

/*  Every option, once: its flag, its config key, and where it goes. */
typedef struct {
    const char *flag;
    const char *key;
    char *str;
    size_t str_size;
    unsigned *num;
} option_t;

static int
option_set (const option_t *opt, const char *value)
{
    if (opt->str) {
        if (strlen (value) >= opt->str_size)
            return -1;
        strcpy (opt->str, value);
        return 0;
    }
    char *end;
    unsigned long v = strtoul (value, &end, 10);
    if (!*value || *end || v > 100000000ul)
        return -1;
    *opt->num = (unsigned) v;
    return 0;
}

static int
options_parse (options_t *o, int argc, char **argv)
{
#define S(field) o->field, sizeof o->field, NULL
#define N(field) NULL, 0, &o->field
    const option_t table[] = {
        { "data-dir", "tallyd/data_dir", S (data_dir) },
        { "api", "tallyd/api", S (api) },
        { "control", "tallyd/control", S (control) },
        { "config", NULL, S (config) },
        { "verify-interval", "tallyd/verify_interval", N (verify_interval) },
        { "verify-cpu", "tallyd/verify_cpu", N (verify_cpu) },
        { "verify-nice", "tallyd/verify_nice", N (verify_nice) },
        { "log-level", "tallyd/log_level", S (log_level) },
        { "map-size-gb", "tallyd/map_size_gb", N (map_size_gb) },
        { "request-max-mb", "tallyd/request_max_mb", N (request_max_mb) },
        { "group-max", "tallyd/group_max", N (group_max) },
        { "strategy", "supervisor/strategy", S (strategy) },
        { "intensity", "supervisor/intensity", N (intensity) },
        { "period", "supervisor/period", N (period_s) },
        { "heartbeat-ms", "supervisor/heartbeat_ms", N (heartbeat_ms) },
        { "heartbeat-timeout-ms", "supervisor/heartbeat_timeout_ms", N (heartbeat_timeout_ms) },
        { "shutdown-ms", "supervisor/shutdown_ms", N (shutdown_ms) },
    };
#undef S
#undef N
    const size_t n = sizeof table / sizeof table[0];
    struct option longopts[n + 3];
    for (size_t i = 0; i < n; i++)
        longopts[i] = (struct option) { table[i].flag, required_argument, NULL, (int) i };
    longopts[n] = (struct option) { "help", no_argument, NULL, 'h' };
    longopts[n + 1] = (struct option) { "version", no_argument, NULL, 'V' };
    longopts[n + 2] = (struct option) { NULL, 0, NULL, 0 };

    /*  Pass 1 finds --config; pass 2 applies flags over the file. */
    for (int pass = 0; pass < 2; pass++) {
        optind = 1;
        int c;
        while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
            if (c == 'h') { usage (stdout); exit (0); }
            if (c == 'V') { printf ("tallyd %s\n", TLY_VERSION); exit (0); }
            if (c < 0 || (size_t) c >= n) { usage (stderr); return -1; }
            if ((pass == 0) != (table[c].key == NULL))
                continue;
            if (option_set (&table[c], optarg)) {
                fprintf (stderr, "tallyd: bad value for --%s: '%s'\n", table[c].flag, optarg);
                return -1;
            }
        }
        if (optind < argc) {
            fprintf (stderr, "tallyd: unexpected argument '%s' (see --help)\n", argv[optind]);
            return -1;
        }
        if (pass == 0 && o->config[0]) {
            zconfig_t *root = zconfig_load (o->config);
            if (!root) {
                fprintf (stderr, "tallyd: cannot read config file %s (ZPL format, see "
                                 "config/tallyd.cfg)\n", o->config);
                return -1;
            }
            for (size_t i = 0; i < n; i++) {
                if (!table[i].key)
                    continue;
                char *v = zconfig_get (root, table[i].key, NULL);
                if (v && option_set (&table[i], v)) {
                    fprintf (stderr, "tallyd: %s: bad value for %s: '%s'\n",
                             o->config, table[i].key, v);
                    zconfig_destroy (&root);
                    return -1;
                }
            }
            zconfig_destroy (&root);
        }
    }
    return 0;
}

/* ---- sockets ---- */

static int
link_pair (zsock_t *ends[2], const char *name)
{
    char endpoint[64];
    snprintf (endpoint, sizeof endpoint, "inproc://tally-%s", name);
    ends[0] = zsock_new (ZMQ_PAIR);
    ends[1] = zsock_new (ZMQ_PAIR);
    if (!ends[0] || !ends[1])
        return -1;
    for (int i = 0; i < 2; i++) {
        zsock_set_sndhwm (ends[i], 100000);
        zsock_set_rcvhwm (ends[i], 100000);
        zsock_set_sndtimeo (ends[i], 2000);
    }
    if (zsock_bind (ends[0], "%s", endpoint) < 0 || zsock_connect (ends[1], "%s", endpoint) < 0)
        return -1;
    return 0;
}

/*  A message over max_msg never reaches us: ZeroMQ drops it, and the
    peer's connection with it, unanswered.  Both endpoints take four times
    the request limit, so that a request up to that gets `too_large`. */
static zsock_t *
router_bind (const char *endpoint, const char *what, size_t max_msg)
{
    zsock_t *s = zsock_new (ZMQ_ROUTER);
    if (!s)
        return NULL;
    zsock_set_sndhwm (s, 100000);
    zsock_set_rcvhwm (s, 100000);
    zsock_set_linger (s, 1000);
    if (max_msg)
        zsock_set_maxmsgsize (s, (int) max_msg);
    if (zsock_bind (s, "%s", endpoint) < 0) {
        tly_error (WHO, "cannot bind the %s endpoint %s: %s. Is another tallyd running? "
                        "Choose another address with --%s", what, endpoint,
                   zmq_strerror (zmq_errno ()), what);
        zsock_destroy (&s);
    }
    return s;
}

/* ---- the control endpoint ---- */

typedef struct {
    tly_sup *sup;
    tly_actor_env *env;
    tly_reader *reader;
    int64_t started;
    const options_t *opt;
    tly_buf out;
    tly_buf verification;           /* the last result map from reconcile */
} control_t;

static void
pack_children (control_t *c, msgpack_packer *pk)
{
    tly_child_info info[8];
    int n = tly_sup_which_children (c->sup, info, 8);
    if (n < 0)
        n = 0;
    msgpack_pack_array (pk, (uint32_t) n);
    for (int i = 0; i < n; i++) {
        msgpack_pack_map (pk, 4);
        tly_pack_cstr (pk, "name");
        tly_pack_cstr (pk, info[i].name);
        tly_pack_cstr (pk, "state");
        tly_pack_cstr (pk, tly_child_state_name (info[i].state));
        tly_pack_cstr (pk, "restarts");
        msgpack_pack_uint64 (pk, info[i].restarts);
        tly_pack_cstr (pk, "since");
        msgpack_pack_uint64 (pk, info[i].since);
    }
}

/*  Asks reconcile for its last result ("status") or a full pass ("verify"). */
static int
ask_reconcile (control_t *c, const char *what, unsigned timeout_ms)
{
    zmsg_t *req = zmsg_new (), *reply = NULL;
    zmsg_addstr (req, what);
    int rc = tly_sup_call (c->sup, "reconcile", &req, &reply, timeout_ms);
    zframe_t *f = reply ? zmsg_first (reply) : NULL;
    if (!rc && f) {
        tly_buf_reset (&c->verification);
        tly_buf_append (&c->verification, zframe_data (f), zframe_size (f));
    }
    zmsg_destroy (&reply);
    return rc;
}

static void
pack_verification (control_t *c, msgpack_packer *pk)
{
    if (c->verification.len) {
        tly_buf_append (&c->out, c->verification.data, c->verification.len);
        return;
    }
    msgpack_pack_map (pk, 4);
    tly_pack_cstr (pk, "ok");
    msgpack_pack_false (pk);
    tly_pack_cstr (pk, "at");
    msgpack_pack_uint64 (pk, 0);
    tly_pack_cstr (pk, "checked");
    msgpack_pack_uint64 (pk, 0);
    tly_pack_cstr (pk, "error");
    tly_pack_cstr (pk, "the reconcile actor has not reported yet");
}

/*  The idempotency index's shape: runs per tier (up to the highest in
    use), the entries whose keys they hold, and those in L0 (memory); nil
    if it could not be read (the scrubber's verification says why).  And
    how many events ingest looked up in its runs since the start. */
static void
pack_index (control_t *c, msgpack_packer *pk, bool ok, uint64_t size,
            const tly_dedup_shape *shape)
{
    if (!ok) {
        msgpack_pack_nil (pk);
        return;
    }
    size_t used = TLY_DEDUP_TIERS;
    while (used > 0 && shape->tiers[used - 1] == 0)
        used--;
    msgpack_pack_map (pk, 8);
    tly_pack_cstr (pk, "runs");
    msgpack_pack_uint64 (pk, shape->runs);
    tly_pack_cstr (pk, "tiers");
    msgpack_pack_array (pk, (uint32_t) used);
    for (size_t i = 0; i < used; i++)
        msgpack_pack_uint32 (pk, shape->tiers[i]);
    tly_pack_cstr (pk, "in_runs");
    msgpack_pack_uint64 (pk, shape->in_runs);
    tly_pack_cstr (pk, "in_l0");
    msgpack_pack_uint64 (pk, size >= shape->in_runs ? size - shape->in_runs : 0);
    tly_pack_cstr (pk, "groups");
    msgpack_pack_uint64 (pk, shape->groups);
    tly_pack_cstr (pk, "lone");
    msgpack_pack_uint64 (pk, shape->lone);
    tly_pack_cstr (pk, "ingest_asked");
    msgpack_pack_uint64 (pk, atomic_load_explicit (&c->env->ingest_asked, memory_order_relaxed));
    tly_pack_cstr (pk, "ingest_found");
    msgpack_pack_uint64 (pk, atomic_load_explicit (&c->env->ingest_found, memory_order_relaxed));
}

static void
op_status (control_t *c, const msgpack_object *id)
{
    ask_reconcile (c, "status", 2000);
    uint64_t size = 0;
    tly_dedup_shape shape;
    bool index = false;
    if (tly_reader_begin (c->reader) == 0) {
        size = tly_reader_size (c->reader);
        index = tly_reader_dedup_shape (c->reader, &shape) == TLY_OK;
        tly_reader_end (c->reader);
    }
    const tly_sup_config *cfg = tly_sup_config_of (c->sup);
    msgpack_packer pk;
    tly_buf_packer (&c->out, &pk);
    tly_reply_head (&pk, true, id, 9);
    tly_pack_cstr (&pk, "strategy");
    tly_pack_cstr (&pk, tly_strategy_name (cfg->strategy));
    tly_pack_cstr (&pk, "intensity");
    msgpack_pack_uint32 (&pk, cfg->intensity);
    tly_pack_cstr (&pk, "period");
    msgpack_pack_uint32 (&pk, cfg->period_ms / 1000);
    tly_pack_cstr (&pk, "children");
    pack_children (c, &pk);
    tly_pack_cstr (&pk, "tree_size");
    msgpack_pack_uint64 (&pk, size);
    tly_pack_cstr (&pk, "uptime");
    msgpack_pack_uint64 (&pk, (uint64_t) (zclock_mono () - c->started));
    tly_pack_cstr (&pk, "version");
    tly_pack_cstr (&pk, TLY_VERSION);
    tly_pack_cstr (&pk, "verification");
    pack_verification (c, &pk);
    tly_pack_cstr (&pk, "index");
    pack_index (c, &pk, index, size, &shape);
}

static void
op_child (control_t *c, const msgpack_object *body, const msgpack_object *id, bool restart)
{
    tly_str name;
    char cname[32];
    if (tly_msg_get_str (body, "name", &name) || name.len == 0 || name.len >= sizeof cname) {
        tly_reply_error (&c->out, id, "bad_request", "\"name\" (str) names a child: "
                         "receipt, quota, reconcile or ingest");
        return;
    }
    memcpy (cname, name.ptr, name.len);
    cname[name.len] = 0;
    int rc = restart ? tly_sup_restart_child (c->sup, cname)
                     : tly_sup_terminate_child (c->sup, cname);
    if (rc == TLY_ENOTFOUND)
        tly_reply_error (&c->out, id, "not_found", "no child of that name");
    else
    if (rc)
        tly_reply_error (&c->out, id, "internal", tly_strerror (rc));
    else {
        tly_info (WHO, "operator %s child %s", restart ? "restarted" : "terminated", cname);
        msgpack_packer pk;
        tly_buf_packer (&c->out, &pk);
        tly_reply_head (&pk, true, id, 0);
    }
}

static void
op_set_quota (control_t *c, const uint8_t *data, size_t len, const msgpack_object *id)
{
    zmsg_t *req = zmsg_new (), *reply = NULL;
    zmsg_addmem (req, data, len);
    int rc = tly_sup_call (c->sup, "quota", &req, &reply, 10000);
    zframe_t *f = reply ? zmsg_first (reply) : NULL;
    if (!rc && f)
        tly_buf_append (&c->out, zframe_data (f), zframe_size (f));
    else
        tly_reply_error (&c->out, id, "unavailable", "the quota actor is not running; retry");
    zmsg_destroy (&reply);
}

static void
op_verify (control_t *c, const msgpack_object *id)
{
    int rc = ask_reconcile (c, "verify", 3600 * 1000);
    if (rc) {
        tly_reply_error (&c->out, id, "unavailable", "the reconcile actor is not running");
        return;
    }
    msgpack_packer pk;
    tly_buf_packer (&c->out, &pk);
    tly_reply_head (&pk, true, id, 1);
    tly_pack_cstr (&pk, "verification");
    pack_verification (c, &pk);
}

static void
on_control (control_t *c, zsock_t *sock)
{
    zmsg_t *msg = zmsg_recv (sock);
    zframe_t *frame = msg ? zmsg_last (msg) : NULL;
    if (!frame) {
        zmsg_destroy (&msg);
        return;
    }
    zmsg_remove (msg, frame);
    tly_buf_reset (&c->out);
    msgpack_zone zone;
    msgpack_zone_init (&zone, 4096);
    msgpack_object body;
    const char *why = "not msgpack";
    const uint8_t *data = zframe_data (frame);
    size_t len = zframe_size (frame);
    if (len > c->env->request_max)
        tly_reply_error (&c->out, NULL, "too_large", TLY_TOO_LARGE_MESSAGE);
    else
    if (tly_msg_check (data, len, &tly_msg_request_limits, &why)
    ||  tly_msg_unpack (data, len, &zone, &body) || body.type != MSGPACK_OBJECT_MAP)
        tly_reply_error (&c->out, NULL, "bad_request", why);
    else {
        const msgpack_object *id = tly_msg_get (&body, "id");
        const msgpack_object *op = tly_msg_get (&body, "op");
        if (id && id->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            tly_reply_error (&c->out, NULL, "bad_request", "\"id\" must be a uint");
        else
        if (!op || op->type != MSGPACK_OBJECT_STR)
            tly_reply_error (&c->out, id, "bad_request", "\"op\" (str) is missing");
        else
        if (tly_msg_streq (op, "which_children")) {
            msgpack_packer pk;
            tly_buf_packer (&c->out, &pk);
            tly_reply_head (&pk, true, id, 1);
            tly_pack_cstr (&pk, "children");
            pack_children (c, &pk);
        }
        else
        if (tly_msg_streq (op, "count_children")) {
            size_t specs = 0, active = 0;
            tly_sup_count_children (c->sup, &specs, &active);
            msgpack_packer pk;
            tly_buf_packer (&c->out, &pk);
            tly_reply_head (&pk, true, id, 2);
            tly_pack_cstr (&pk, "specs");
            msgpack_pack_uint64 (&pk, specs);
            tly_pack_cstr (&pk, "active");
            msgpack_pack_uint64 (&pk, active);
        }
        else
        if (tly_msg_streq (op, "terminate_child"))
            op_child (c, &body, id, false);
        else
        if (tly_msg_streq (op, "restart_child"))
            op_child (c, &body, id, true);
        else
        if (tly_msg_streq (op, "status"))
            op_status (c, id);
        else
        if (tly_msg_streq (op, "set_quota"))
            op_set_quota (c, data, len, id);
        else
        if (tly_msg_streq (op, "verify"))
            op_verify (c, id);
        else
            tly_reply_error (&c->out, id, "unknown_op", "unknown control op");
    }
    msgpack_zone_destroy (&zone);
    zframe_destroy (&frame);
    zmsg_addmem (msg, c->out.data, c->out.len);
    zmsg_send (&msg, sock);
    zmsg_destroy (&msg);
}

/*  While ingest is down: answer every API request `unavailable`. */
static void
refuse_api (zsock_t *api)
{
    for (int i = 0; i < 256 && (zsock_events (api) & ZMQ_POLLIN); i++) {
        zmsg_t *msg = zmsg_recv (api);
        zframe_t *frame = msg ? zmsg_last (msg) : NULL;
        if (!frame) {
            zmsg_destroy (&msg);
            continue;
        }
        zmsg_remove (msg, frame);
        msgpack_zone zone;
        msgpack_zone_init (&zone, 1024);
        msgpack_object body;
        const msgpack_object *id = NULL;
        if (zframe_size (frame) <= (1u << 20)
        &&  tly_msg_check (zframe_data (frame), zframe_size (frame), &tly_msg_request_limits, NULL) == 0
        &&  tly_msg_unpack (zframe_data (frame), zframe_size (frame), &zone, &body) == 0) {
            id = tly_msg_get (&body, "id");
            if (id && id->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                id = NULL;
        }
        tly_buf out;
        tly_buf_init (&out);
        tly_reply_error (&out, id, "unavailable", "the ingest actor is not running "
                         "(terminated by an operator, or restarting); retry");
        zmsg_addmem (msg, out.data, out.len);
        zmsg_send (&msg, api);
        zmsg_destroy (&msg);
        tly_buf_free (&out);
        msgpack_zone_destroy (&zone);
        zframe_destroy (&frame);
    }
}

/*  Closes what main opened, whichever part of it exists. */
static void
env_close (tly_actor_env *env, zsock_t **control)
{
    zsock_destroy (control);
    zsock_destroy (&env->api);
    for (int i = 0; i < 2; i++) {
        zsock_destroy (&env->ingest_receipt[i]);
        zsock_destroy (&env->ingest_quota[i]);
        zsock_destroy (&env->receipt_quota[i]);
        zsock_destroy (&env->api_token[i]);
    }
    tly_store_close (&env->store);
    sodium_memzero (env->sk, sizeof env->sk);
    zsys_shutdown ();
}

/* ---- main ---- */

static int
strategy_parse (const char *s, tly_strategy *out)
{
    if (streq (s, "one_for_one"))  { *out = TLY_ONE_FOR_ONE; return 0; }
    if (streq (s, "one_for_all"))  { *out = TLY_ONE_FOR_ALL; return 0; }
    if (streq (s, "rest_for_one")) { *out = TLY_REST_FOR_ONE; return 0; }
    return -1;
}

static int
serve (const options_t *opt, tly_sup *sup, tly_actor_env *env, zsock_t *control, int sigfd)
{
    control_t c = { .sup = sup, .env = env, .started = zclock_mono (), .opt = opt };
    tly_buf_init (&c.out);
    tly_buf_init (&c.verification);
    if (tly_reader_new (env->store, &c.reader))
        return 1;
    zmq_pollitem_t items[] = {
        { zsock_resolve (control), 0, ZMQ_POLLIN, 0 },
        { zsock_resolve (tly_sup_sock (sup)), 0, ZMQ_POLLIN, 0 },
        { NULL, sigfd, ZMQ_POLLIN, 0 },
        { zsock_resolve (env->api_token[0]), 0, ZMQ_POLLIN, 0 },
        { zsock_resolve (env->api), 0, ZMQ_POLLIN, 0 },
    };
    bool api_held = false;          /* ingest is down: we answer the API */
    int status = 0;
    while (true) {
        if (zmq_poll (items, api_held ? 5 : 4, 1000) < 0 && zmq_errno () != EINTR)
            break;
        if (items[3].revents & ZMQ_POLLIN) {
            char *what = zstr_recv (env->api_token[0]);
            if (what && streq (what, "RETURN"))
                api_held = true;
            else
            if (what && streq (what, "TAKE")) {
                api_held = false;
                zstr_send (env->api_token[0], "GIVEN");
            }
            zstr_free (&what);
        }
        if (api_held && (items[4].revents & ZMQ_POLLIN))
            refuse_api (env->api);
        if (items[2].revents & ZMQ_POLLIN) {
            struct signalfd_siginfo si;
            if (read (sigfd, &si, sizeof si) == sizeof si)
                tly_info (WHO, "got %s from pid %u: finishing in-flight requests, then exiting",
                          strsignal ((int) si.ssi_signo), si.ssi_pid);
            break;
        }
        if (items[1].revents & ZMQ_POLLIN) {
            char *why = NULL;
            zsock_recv (tly_sup_sock (sup), "ss", NULL, &why);
            tly_error (WHO, "the supervisor gave up (%s): all actors are stopped; exiting "
                            "with status %d so that the service manager restarts tallyd. "
                            "Read the errors above to find the failing actor",
                       why ? why : "restart intensity exceeded", EXIT_ESCALATED);
            free (why);
            status = EXIT_ESCALATED;
            break;
        }
        if (items[0].revents & ZMQ_POLLIN)
            on_control (&c, control);
    }
    tly_reader_destroy (&c.reader);
    tly_buf_free (&c.out);
    tly_buf_free (&c.verification);
    return status;
}

int
main (int argc, char **argv)
{
    options_t opt;
    options_defaults (&opt);
    if (options_parse (&opt, argc, argv))
        return 1;
    tly_log_level level;
    if (tly_log_parse_level (opt.log_level, &level)) {
        fprintf (stderr, "tallyd: unknown log level '%s'\n", opt.log_level);
        return 1;
    }
    tly_log_set_level (level);
    tly_sup_config sup_cfg = tly_sup_default_config;
    if (strategy_parse (opt.strategy, &sup_cfg.strategy)) {
        fprintf (stderr, "tallyd: unknown strategy '%s'\n", opt.strategy);
        return 1;
    }
    if (opt.verify_interval == 0 || opt.group_max == 0 || opt.request_max_mb == 0
    ||  opt.map_size_gb == 0 || opt.heartbeat_ms == 0) {
        fprintf (stderr, "tallyd: verify-interval, group-max, request-max-mb, map-size-gb "
                         "and heartbeat-ms must be at least 1\n");
        return 1;
    }
    if (opt.group_max > GROUP_MAX_MAX) {
        /*  A group's messages between actors must stay far below a link
            message's limit (8M objects; a COMMIT entry is 7). */
        fprintf (stderr, "tallyd: group-max must be at most %d\n", GROUP_MAX_MAX);
        return 1;
    }
    if (opt.request_max_mb > REQUEST_MAX_MB_MAX) {
        /*  ZeroMQ's limit on both endpoints is 4 times it, an int. */
        fprintf (stderr, "tallyd: request-max-mb must be at most %d\n", REQUEST_MAX_MB_MAX);
        return 1;
    }
    if (opt.verify_cpu == 0 || opt.verify_cpu > 100) {
        fprintf (stderr, "tallyd: verify-cpu is a percentage of one core, 1 to 100\n");
        return 1;
    }
    if (opt.verify_nice > 20) {
        fprintf (stderr, "tallyd: verify-nice is 0 (the actors' priority) to 19 (nice 19), "
                         "or 20 (the idle class)\n");
        return 1;
    }
    sup_cfg.intensity = opt.intensity;
    sup_cfg.period_ms = opt.period_s * 1000;
    sup_cfg.heartbeat_ms = opt.heartbeat_ms;
    sup_cfg.heartbeat_timeout_ms = opt.heartbeat_timeout_ms;

    /*  Signals arrive through a signalfd in this thread only: the actors'
        threads inherit the blocked mask, and CZMQ's own handler is off. */
    zsys_handler_set (NULL);
    sigset_t mask;
    sigemptyset (&mask);
    sigaddset (&mask, SIGTERM);
    sigaddset (&mask, SIGINT);
    pthread_sigmask (SIG_BLOCK, &mask, NULL);
    int sigfd = signalfd (-1, &mask, SFD_CLOEXEC);
    signal (SIGPIPE, SIG_IGN);

    tly_actor_env env = { .data_dir = opt.data_dir,
                          .request_max = (size_t) opt.request_max_mb << 20,
                          .group_max = opt.group_max,
                          .verify_interval_s = opt.verify_interval,
                          .verify_cpu = opt.verify_cpu,
                          .verify_nice = opt.verify_nice };
    const char *why = "";
    int rc = tly_store_open (opt.data_dir, (size_t) opt.map_size_gb << 30, &env.store, &why);
    if (rc) {
        tly_error (WHO, "cannot open the ledger in %s/ledger: %s (%s). Check that the data "
                        "dir exists and is writable", opt.data_dir, tly_strerror (rc), why);
        return 1;
    }
    rc = tly_key_load_or_create (opt.data_dir, env.pk, env.sk);
    if (rc) {
        tly_error (WHO, "cannot load or create the log key in %s (log.key, log.pub): %s. "
                        "If log.pub was replaced, restore the original", opt.data_dir,
                   tly_strerror (rc));
        tly_store_close (&env.store);
        return 1;
    }
    zsock_t *control = NULL;
    if (link_pair (env.ingest_receipt, "ingest-receipt")
    ||  link_pair (env.ingest_quota, "ingest-quota")
    ||  link_pair (env.receipt_quota, "receipt-quota")
    ||  link_pair (env.api_token, "api-token")
    ||  !(env.api = router_bind (opt.api, "api", 4 * env.request_max + 4096))
    ||  !(control = router_bind (opt.control, "control", 4 * env.request_max + 4096))) {
        tly_error (WHO, "cannot set up sockets; exiting");
        env_close (&env, &control);
        return 1;
    }
    tly_child_spec specs[] = {
        { "receipt",   tly_receipt_actor,   &env, TLY_PERMANENT, opt.shutdown_ms },
        { "quota",     tly_quota_actor,     &env, TLY_PERMANENT, opt.shutdown_ms },
        { "reconcile", tly_reconcile_actor, &env, TLY_PERMANENT, opt.shutdown_ms },
        { "ingest",    tly_ingest_actor,    &env, TLY_PERMANENT, opt.shutdown_ms },
    };
    tly_sup *sup = tly_sup_new (&sup_cfg, specs, sizeof specs / sizeof specs[0]);
    if (!sup) {
        tly_error (WHO, "the actors could not start; see the errors above");
        env_close (&env, &control);
        return 1;
    }
    tly_info (WHO, "tallyd %s serving: api %s, control %s, data %s (%s, %u restarts in %us; "
                   "SHA-256 %s)", TLY_VERSION, opt.api, opt.control, opt.data_dir,
              tly_strategy_name (sup_cfg.strategy), sup_cfg.intensity, opt.period_s,
              tly_sha256_accelerated () ? "on SHA-NI" : "portable");
    int status = serve (&opt, sup, &env, control, sigfd);
    tly_sup_destroy (&sup);
    env_close (&env, &control);
    tly_info (WHO, "stopped");
    return status;
}
