/*  test_e2e_control.c -- the control endpoint (PROTOCOL.md section 5)
    against a real tallyd: the supervisor's view of its children, stopping
    and restarting them with and without load (nothing lost, nothing
    twice), and hard quotas under concurrency and across restarts.

    Every test starts its own daemon, with the scrubber running every 2 s
    so that it works alongside the load (and must never see corruption).
*/
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>
#include <dirent.h>
#include <lmdb.h>
#include <sched.h>
#include <linux/capability.h>
#include "tally/tally.h"
#include "tally/client.h"
#include "helper_server.h"

#define VERIFY_S    2
#define STATE_MS    15000

static const char *const s_children[4] = { "receipt", "quota", "reconcile", "ingest" };

typedef struct {
    e2e_server *srv;
    e2e_conn *api;
    e2e_conn *ctl;
    e2e_reply r;
} fixture;

//  The running test's fixture, freed by fx_teardown if the test fails.
static fixture *s_fx;

static void
fx_release (fixture *fx)
{
    e2e_conn_destroy (&fx->api);
    e2e_conn_destroy (&fx->ctl);
    e2e_reply_free (&fx->r);
    s_fx = NULL;
}

//  Pushers still running when a test fails: stopped before its stack goes.
static e2e_pusher *s_running;
static int s_nrunning;

static void
pushers_stop (void)
{
    for (int i = 0; i < s_nrunning; i++)
        atomic_store (&s_running[i].abandon, true);
    for (int i = 0; i < s_nrunning; i++)
        e2e_pusher_join (&s_running[i]);
    for (int i = 0; i < s_nrunning; i++)
        e2e_pusher_free (&s_running[i]);
    s_nrunning = 0;
}

static int
fx_teardown (void **state)
{
    /*  A test that failed before it unset its hooks must not pass them on. */
    unsetenv ("TALLY_TEST_COUNT_SLICE");
    unsetenv ("TALLY_TEST_FAIL_CHECKPOINTS");
    unsetenv ("TALLY_TEST_LOSE_COMMIT");
    pushers_stop ();
    if (s_fx)
        fx_release (s_fx);
    return e2e_teardown (state);
}

/*  Tests keep their fixture in static storage: after a failed assert
    cmocka leaves the test by longjmp and runs fx_teardown, which must
    not follow s_fx into a dead stack frame. */
static void
fx_start (fixture *fx)
{
    memset (fx, 0, sizeof *fx);
    e2e_reply_init (&fx->r);
    s_fx = fx;
    fx->srv = e2e_server_new (VERIFY_S);
    assert_non_null (fx->srv);
    fx->api = e2e_conn_new (fx->srv->api);
    fx->ctl = e2e_conn_new (fx->srv->control);
    assert_non_null (fx->api);
    assert_non_null (fx->ctl);
}

//  The nice value and scheduling policy of tallyd's thread named `comm`:
//  0, or -1 when there is no such thread.
static int
thread_sched (pid_t pid, const char *comm, int *nice, int *policy)
{
    char path[96], name[32], stat[1024];
    snprintf (path, sizeof path, "/proc/%d/task", (int) pid);
    DIR *d = opendir (path);
    int rc = -1;
    for (struct dirent *e; d && rc && (e = readdir (d));) {
        if (e->d_name[0] == '.')
            continue;
        snprintf (path, sizeof path, "/proc/%d/task/%.16s/comm", (int) pid, e->d_name);
        FILE *f = fopen (path, "r");
        bool match = f && fgets (name, sizeof name, f) && strncmp (name, comm, strlen (comm)) == 0
                  && (name[strlen (comm)] == '\n' || name[strlen (comm)] == 0);
        if (f)
            fclose (f);
        if (!match)
            continue;
        snprintf (path, sizeof path, "/proc/%d/task/%.16s/stat", (int) pid, e->d_name);
        f = fopen (path, "r");
        size_t n = f ? fread (stat, 1, sizeof stat - 1, f) : 0;
        if (f)
            fclose (f);
        stat[n] = 0;
        /*  Fields after the ")" that ends comm: state is field 3, nice 19,
            policy 41. */
        char *p = strrchr (stat, ')');
        for (int field = 2; p && field < 41; field++) {
            p = strchr (p + 1, ' ');
            if (p && field + 1 == 19)
                *nice = atoi (p + 1);
        }
        if (p) {
            *policy = atoi (p + 1);
            rc = 0;
        }
    }
    if (d)
        closedir (d);
    return rc;
}

//  The nice value of tallyd's thread named `comm` (-100: no such thread).
static int
thread_nice (pid_t pid, const char *comm)
{
    int nice = -100, policy;
    return thread_sched (pid, comm, &nice, &policy) ? -100 : nice;
}

//  A `verify` call on the control connection `ctl` finds the ledger whole.
static void
expect_verified (e2e_conn *ctl, e2e_reply *r)
{
    assert_int_equal (e2e_callf (ctl, r, "{'op':'verify'}"), TLY_OK);
    E2E_OK (r);
    bool ok = false;
    assert_true (e2e_bool (&r->body, "verification.ok", &ok));
    if (!ok)
        fprintf (stderr, "verify failed on a healthy ledger: %s\n", e2e_reply_json (r));
    assert_true (ok);
}

//  A clean stop: the scrubber never complained, SIGTERM exits 0.
static void
fx_finish (fixture *fx)
{
    expect_verified (fx->ctl, &fx->r);
    assert_false (e2e_server_log_has (fx->srv, " ERROR ", NULL));
    fx_release (fx);
    assert_int_equal (e2e_server_destroy (&fx->srv), 0);
}

static uint64_t
tree_size (fixture *fx)
{
    assert_int_equal (e2e_callf (fx->api, &fx->r, "{'op':'sth'}"), TLY_OK);
    E2E_OK (&fx->r);
    uint64_t n = 0;
    assert_true (e2e_uint (&fx->r.body, "sth.tree_size", &n));
    return n;
}

//  The child's entry in which_children, or NULL.
static const msgpack_object *
child (e2e_reply *r, const char *name)
{
    long n = e2e_len (&r->body, "children");
    for (long i = 0; i < n; i++) {
        char path[32];
        snprintf (path, sizeof path, "children.%ld", i);
        const msgpack_object *c = e2e_at (&r->body, path);
        if (e2e_str_is (c, "name", name))
            return c;
    }
    return NULL;
}

static bool
child_is (fixture *fx, const char *name, const char *state, uint64_t *restarts)
{
    if (e2e_callf (fx->ctl, &fx->r, "{'op':'which_children'}") != TLY_OK || !fx->r.ok)
        return false;
    const msgpack_object *c = child (&fx->r, name);
    if (restarts && c)
        e2e_uint (c, "restarts", restarts);
    return c && e2e_str_is (c, "state", state);
}

static uint64_t
restarts_of (fixture *fx, const char *name)
{
    assert_int_equal (e2e_callf (fx->ctl, &fx->r, "{'op':'which_children'}"), TLY_OK);
    E2E_OK (&fx->r);
    const msgpack_object *c = child (&fx->r, name);
    assert_non_null (c);
    uint64_t n = 0;
    assert_true (e2e_uint (c, "restarts", &n));
    return n;
}

static void
control_op (fixture *fx, const char *op, const char *name)
{
    assert_int_equal (e2e_callf (fx->ctl, &fx->r, "{'op':'%s','name':'%s'}", op, name), TLY_OK);
    E2E_OK (&fx->r);
}

static void
wait_state (fixture *fx, const char *name, const char *state)
{
    bool ok;
    E2E_POLL (ok, STATE_MS, child_is (fx, name, state, NULL));
    if (!ok)
        fprintf (stderr, "%s did not become %s: %s\n", name, state, e2e_reply_json (&fx->r));
    assert_true (ok);
}

static void
set_quota (fixture *fx, const char *customer, const char *meter, const char *limit)
{
    assert_int_equal (e2e_callf (fx->ctl, &fx->r,
                                 "{'op':'set_quota','customer':'%s','meter':'%s','limit':%s}",
                                 customer, meter, limit), TLY_OK);
    E2E_OK (&fx->r);
}

//  limit and used of `meter` in the quota op's reply for `customer`.
static bool
quota_of (fixture *fx, const char *customer, const char *meter, uint64_t *limit, uint64_t *used)
{
    assert_int_equal (e2e_callf (fx->api, &fx->r, "{'op':'quota','customer':'%s'}", customer), TLY_OK);
    E2E_OK (&fx->r);
    long n = e2e_len (&fx->r.body, "limits");
    for (long i = 0; i < n; i++) {
        char path[32];
        snprintf (path, sizeof path, "limits.%ld", i);
        const msgpack_object *l = e2e_at (&fx->r.body, path);
        if (e2e_str_is (l, "meter", meter))
            return e2e_uint (l, "limit", limit) && e2e_uint (l, "used", used);
    }
    return false;
}

static void
expect_quota (fixture *fx, const char *customer, const char *meter, uint64_t limit, uint64_t used)
{
    uint64_t l = 0, u = 0;
    if (!quota_of (fx, customer, meter, &l, &u) || l != limit || u != used) {
        fprintf (stderr, "%s/%s: expected limit %llu used %llu, got %s\n", customer, meter,
                 (unsigned long long) limit, (unsigned long long) used,
                 e2e_reply_json (&fx->r));
        fail ();
    }
}

//  One raw ingest request of events (customer, meter, key-i, qty, now).
static void
ingest_raw (fixture *fx, const tly_event *evs, size_t n)
{
    tly_buf body;
    tly_buf_init (&body);
    e2e_pack_ingest (&body, 1, evs, n);
    assert_int_equal (e2e_conn_call (fx->api, body.data, body.len, 15000, &fx->r), TLY_OK);
    tly_buf_free (&body);
}

//  Retries while unavailable (a child coming back), then expects ok.
static void
ingest_until_served (fixture *fx, const tly_event *evs, size_t n)
{
    bool ok;
    E2E_POLL (ok, STATE_MS, (ingest_raw (fx, evs, n), strcmp (fx->r.code, "unavailable") != 0));
    assert_true (ok);
    E2E_OK (&fx->r);
    assert_int_equal (e2e_len (&fx->r.body, "results"), (long) n);
}

static const char *
status_at (e2e_reply *r, size_t i)
{
    static char st[32];
    char path[32];
    snprintf (path, sizeof path, "results.%zu.status", i);
    if (!e2e_str (&r->body, path, st, sizeof st))
        strcpy (st, "(none)");
    return st;
}

static void
expect_all (e2e_reply *r, size_t n, const char *status)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp (status_at (r, i), status) != 0) {
            fprintf (stderr, "result %zu: expected %s in %s\n", i, status, e2e_reply_json (r));
            fail ();
        }
}

static void
expect_present (fixture *fx, const char *customer, const char *key)
{
    assert_int_equal (e2e_callf (fx->api, &fx->r, "{'op':'get','customer':'%s','key':'%s'}",
                                 customer, key), TLY_OK);
    if (!fx->r.ok)
        fprintf (stderr, "%s/%s is missing: %s\n", customer, key, e2e_reply_json (&fx->r));
    E2E_OK (&fx->r);
}

//  Stops tallyd cleanly (or kills it: crash) and starts it again on the
//  same data dir.
static void
fx_restart_server (fixture *fx, bool crash)
{
    e2e_conn_destroy (&fx->api);
    e2e_conn_destroy (&fx->ctl);
    if (crash)
        e2e_server_kill (fx->srv);
    else
        assert_int_equal (e2e_server_stop (fx->srv), 0);
    assert_int_equal (e2e_server_start (fx->srv), TLY_OK);
    fx->api = e2e_conn_new (fx->srv->api);
    fx->ctl = e2e_conn_new (fx->srv->control);
}

//  The outcomes of n finished pushers racing for a limit: each event was
//  accepted, a duplicate (a retry of an accepted one) or quota_exceeded;
//  anything else fails the test.
static void
limit_outcomes (e2e_pusher *p, int n, size_t *accepted, size_t *duplicate, size_t *exceeded)
{
    *accepted = *duplicate = *exceeded = 0;
    for (int i = 0; i < n; i++) {
        assert_string_equal (p[i].fail, "");
        assert_int_equal (atomic_load (&p[i].done), p[i].capacity);
        for (size_t k = 0; k < p[i].capacity; k++) {
            tly_result *res = &p[i].results[k];
            if (res->status == TLY_ACCEPTED)
                (*accepted)++;
            else
            if (res->status == TLY_DUPLICATE)
                (*duplicate)++;
            else
            if (res->status == TLY_REJECTED && strcmp (res->code, "quota_exceeded") == 0)
                (*exceeded)++;
            else {
                fprintf (stderr, "event %s: status %d code %s %s\n", p[i].keys[k],
                         (int) res->status, res->code, res->message);
                fail ();
            }
        }
    }
}

//  Starts n pushers of `each` events for (customer, meter), keys prefixed
//  <tag><i>, batches of base + step * (i % 4); the teardown stops them if
//  the test fails first.
static void
pushers_start (fixture *fx, e2e_pusher *p, int n, const char *customer, const char *meter,
               const char *tag, size_t each, size_t base, size_t step, int timeout_ms)
{
    for (int i = 0; i < n; i++) {
        char prefix[16];
        snprintf (prefix, sizeof prefix, "%s%d", tag, i);
        assert_int_equal (e2e_pusher_init (&p[i], fx->srv->api, fx->srv->pk, customer, meter,
                                           prefix, each, base + step * (size_t) (i % 4)),
                          TLY_OK);
        p[i].timeout_ms = timeout_ms;
    }
    for (int i = 0; i < n; i++) {
        assert_int_equal (e2e_pusher_start (&p[i]), TLY_OK);
        s_running = p;
        s_nrunning = i + 1;
    }
}

/* ---- tests ---- */

static void
test_children_and_status (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    uint64_t now = tly_now_ms ();

    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'which_children','id':5}"), TLY_OK);
    E2E_OK (&fx.r);
    uint64_t v;
    assert_true (e2e_uint (&fx.r.body, "id", &v) && v == 5);
    assert_int_equal (e2e_len (&fx.r.body, "children"), 4);
    for (size_t i = 0; i < 4; i++) {
        const msgpack_object *c = child (&fx.r, s_children[i]);
        if (!c) {
            fprintf (stderr, "no child %s in %s\n", s_children[i], e2e_reply_json (&fx.r));
            fail ();
        }
        assert_true (e2e_str_is (c, "state", "running"));
        assert_true (e2e_uint (c, "restarts", &v) && v == 0);
        assert_true (e2e_uint (c, "since", &v));
        assert_true (v + 600000 > now && v < now + 600000);
    }

    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'count_children'}"), TLY_OK);
    E2E_OK (&fx.r);
    assert_true (e2e_uint (&fx.r.body, "specs", &v) && v == 4);
    assert_true (e2e_uint (&fx.r.body, "active", &v) && v == 4);

    //  some entries for the status and the scrubber
    tly_event evs[10];
    char keys[10][32];
    for (size_t i = 0; i < 10; i++) {
        snprintf (keys[i], sizeof keys[i], "st%zu", i);
        evs[i] = e2e_event ("status-cust", "m", keys[i], 1, now);
    }
    ingest_raw (&fx, evs, 10);
    E2E_OK (&fx.r);
    expect_all (&fx.r, 10, "accepted");

    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'verify','id':6}"), TLY_OK);
    E2E_OK (&fx.r);
    assert_true (e2e_uint (&fx.r.body, "id", &v) && v == 6);
    bool ok = false;
    assert_true (e2e_bool (&fx.r.body, "verification.ok", &ok));
    assert_true (ok);
    uint64_t at = 0;
    assert_true (e2e_uint (&fx.r.body, "verification.at", &at));
    assert_true (at + 600000 > now && at < now + 600000);
    assert_true (e2e_uint (&fx.r.body, "verification.checked", &v));
    assert_true (v >= 10);
    assert_non_null (e2e_at (&fx.r.body, "verification.error"));

    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'status'}"), TLY_OK);
    E2E_OK (&fx.r);
    char strategy[32];
    assert_true (e2e_str (&fx.r.body, "strategy", strategy, sizeof strategy));
    assert_true (strcmp (strategy, "one_for_one") == 0 || strcmp (strategy, "one_for_all") == 0
                 || strcmp (strategy, "rest_for_one") == 0);
    assert_true (e2e_uint (&fx.r.body, "intensity", &v));
    assert_true (e2e_uint (&fx.r.body, "period", &v));
    assert_int_equal (e2e_len (&fx.r.body, "children"), 4);
    assert_true (e2e_uint (&fx.r.body, "tree_size", &v) && v == 10);
    //  10 keys, fewer than L0 holds: no run yet, every key in L0.
    uint64_t in_runs = 1, in_l0 = 0;
    assert_true (e2e_uint (&fx.r.body, "index.runs", &v) && v == 0);
    assert_int_equal (e2e_len (&fx.r.body, "index.tiers"), 0);
    assert_true (e2e_uint (&fx.r.body, "index.in_runs", &in_runs) && in_runs == 0);
    assert_true (e2e_uint (&fx.r.body, "index.in_l0", &in_l0) && in_l0 == 10);
    assert_true (e2e_uint (&fx.r.body, "index.groups", &v) && v == 0);
    assert_true (e2e_uint (&fx.r.body, "index.lone", &v) && v == 0);
    //  No run to look in: ingest left every lookup to the writer.
    assert_true (e2e_uint (&fx.r.body, "index.ingest_asked", &v) && v == 0);
    assert_true (e2e_uint (&fx.r.body, "index.ingest_found", &v) && v == 0);
    assert_true (e2e_uint (&fx.r.body, "uptime", &v));
    assert_true (e2e_bool (&fx.r.body, "verification.ok", &ok) && ok);
    uint64_t at2 = 0;
    assert_true (e2e_uint (&fx.r.body, "verification.at", &at2));
    assert_true (at2 >= at);
    assert_true (e2e_uint (&fx.r.body, "verification.checked", &v));
    assert_non_null (e2e_at (&fx.r.body, "verification.error"));

    //  errors
    static const struct { const char *json; const char *code; } bad[] = {
        { "{'op':'terminate_child','name':'nope'}", "not_found" },
        { "{'op':'restart_child','name':'nope'}", "not_found" },
        { "{'op':'terminate_child'}", "bad_request" },
        { "{'op':'terminate_child','name':5}", "bad_request" },
        { "{'op':'restart_child','name':''}", "bad_request" },
        { "{'op':'set_quota','customer':'c','limit':5}", "bad_request" },
        { "{'op':'set_quota','meter':'m','limit':5}", "bad_request" },
        { "{'op':'set_quota','customer':'c','meter':'m','limit':'5'}", "bad_request" },
        { "{'op':'set_quota','customer':'c','meter':'m','limit':-5}", "bad_request" },
        { "{'op':'set_quota','customer':'','meter':'m','limit':5}", "bad_request" },
        { "{'op':'set_quota','customer':'c','meter':'bad meter','limit':5}", "bad_request" },
        { "{'op':'launch_missiles'}", "unknown_op" },
        { "{'op':'sth'}", "unknown_op" },
        { "{'op':5}", "bad_request" },
        { "{}", "bad_request" },
        { "[1]", "bad_request" },
        { "{'op':'status','id':'x'}", "bad_request" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal (e2e_callf (fx.ctl, &fx.r, "%s", bad[i].json), TLY_OK);
        if (fx.r.ok || strcmp (fx.r.code, bad[i].code) != 0) {
            fprintf (stderr, "control %s: expected %s, got %s\n", bad[i].json, bad[i].code,
                     e2e_reply_json (&fx.r));
            fail ();
        }
    }
    static const uint8_t garbage[] = { 0xdf, 0xff, 0xff, 0xff, 0xff };
    assert_int_equal (e2e_conn_call (fx.ctl, garbage, sizeof garbage, 15000, &fx.r), TLY_OK);
    E2E_ERR (&fx.r, "bad_request");
    //  nothing above stopped a child
    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'count_children'}"), TLY_OK);
    assert_true (e2e_uint (&fx.r.body, "active", &v) && v == 4);
    fx_finish (&fx);
    e2e_pass ();
}

//  A terminated child's work is refused with unavailable and never lost;
//  after restart_child the same events are accepted.
static void
test_terminate_and_restart (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    uint64_t now = tly_now_ms ();
    tly_event evs[20];
    char keys[20][32];
    for (size_t i = 0; i < 20; i++) {
        snprintf (keys[i], sizeof keys[i], "t%zu", i);
        evs[i] = e2e_event ("term-cust", "m", keys[i], 1, now);
    }
    ingest_raw (&fx, evs, 5);
    E2E_OK (&fx.r);
    expect_all (&fx.r, 5, "accepted");

    //  quota: ingest and the quota op are unavailable, reads still served
    control_op (&fx, "terminate_child", "quota");
    wait_state (&fx, "quota", "terminated");
    uint64_t v;
    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'count_children'}"), TLY_OK);
    assert_true (e2e_uint (&fx.r.body, "active", &v) && v == 3);
    for (int i = 0; i < 3; i++) {
        ingest_raw (&fx, evs + 5, 5);
        E2E_ERR (&fx.r, "unavailable");
    }
    assert_int_equal (e2e_callf (fx.api, &fx.r, "{'op':'quota','customer':'term-cust'}"), TLY_OK);
    E2E_ERR (&fx.r, "unavailable");
    assert_int_equal (e2e_callf (fx.ctl, &fx.r,
                                 "{'op':'set_quota','customer':'c','meter':'m','limit':5}"), TLY_OK);
    E2E_ERR (&fx.r, "unavailable");
    assert_int_equal (tree_size (&fx), 5);
    expect_present (&fx, "term-cust", "t0");

    uint64_t before = restarts_of (&fx, "quota");
    control_op (&fx, "restart_child", "quota");
    wait_state (&fx, "quota", "running");
    assert_int_equal (restarts_of (&fx, "quota"), before + 1);
    ingest_until_served (&fx, evs + 5, 5);
    expect_all (&fx.r, 5, "accepted");
    ingest_raw (&fx, evs + 5, 5);
    expect_all (&fx.r, 5, "duplicate");

    //  receipt: the same
    control_op (&fx, "terminate_child", "receipt");
    wait_state (&fx, "receipt", "terminated");
    ingest_raw (&fx, evs + 10, 5);
    E2E_ERR (&fx.r, "unavailable");
    before = restarts_of (&fx, "receipt");
    control_op (&fx, "restart_child", "receipt");
    wait_state (&fx, "receipt", "running");
    assert_int_equal (restarts_of (&fx, "receipt"), before + 1);
    ingest_until_served (&fx, evs + 10, 5);
    expect_all (&fx.r, 5, "accepted");

    //  reconcile: verify is unavailable while it is down
    control_op (&fx, "terminate_child", "reconcile");
    wait_state (&fx, "reconcile", "terminated");
    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'verify'}"), TLY_OK);
    E2E_ERR (&fx.r, "unavailable");
    ingest_raw (&fx, evs + 15, 2);          //  ingest does not need it
    E2E_OK (&fx.r);
    expect_all (&fx.r, 2, "accepted");
    control_op (&fx, "restart_child", "reconcile");
    wait_state (&fx, "reconcile", "running");
    //  the restarted scrubber runs below the request path again: 19 above
    //  the actors' nice (the runner's, inherited), at most 19
    int base = thread_nice (fx.srv->pid, "tly-receipt");
    assert_true (base > -100);
    assert_int_equal (thread_nice (fx.srv->pid, "tly-ingest"), base);
    assert_int_equal (thread_nice (fx.srv->pid, "tly-reconcile"), base + 19 > 19 ? 19 : base + 19);

    //  ingest: API requests are refused with unavailable until it is back
    control_op (&fx, "terminate_child", "ingest");
    wait_state (&fx, "ingest", "terminated");
    ingest_raw (&fx, evs + 17, 3);
    E2E_ERR (&fx.r, "unavailable");
    assert_int_equal (e2e_callf (fx.api, &fx.r, "{'op':'sth','id':4}"), TLY_OK);
    E2E_ERR (&fx.r, "unavailable");
    assert_true (e2e_uint (&fx.r.body, "id", &v) && v == 4);
    control_op (&fx, "restart_child", "ingest");
    wait_state (&fx, "ingest", "running");
    ingest_until_served (&fx, evs + 17, 3);
    expect_all (&fx.r, 3, "accepted");

    //  nothing lost, nothing twice
    assert_int_equal (tree_size (&fx), 20);
    for (size_t i = 0; i < 20; i++)
        expect_present (&fx, "term-cust", keys[i]);
    assert_int_equal (e2e_callf (fx.ctl, &fx.r, "{'op':'count_children'}"), TLY_OK);
    assert_true (e2e_uint (&fx.r.body, "active", &v) && v == 4);
    fx_finish (&fx);
    e2e_pass ();
}

//  Restarts each child while two pushers keep ingesting: every event ends
//  up in the log exactly once, and the quota actor's rebuilt usage is exact.
static void
test_restart_under_load (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    set_quota (&fx, "load-cust", "req", "1000000000");
    enum { PUSHERS = 2, CAPACITY = 20000 };
    e2e_pusher p[PUSHERS];
    pushers_start (&fx, p, PUSHERS, "load-cust", "req", "p", CAPACITY, 10, 7, 2000);
    uint64_t restarts[4];
    for (size_t c = 0; c < 4; c++)
        restarts[c] = restarts_of (&fx, s_children[c]);

    for (size_t round = 0; round < 8; round++) {
        size_t c = round % 4;
        //  let the load run a little before each restart
        size_t base = atomic_load (&p[0].done) + atomic_load (&p[1].done);
        bool ok;
        E2E_POLL (ok, 30000, atomic_load (&p[0].done) + atomic_load (&p[1].done) >= base + 200
                             || p[0].fail[0] || p[1].fail[0]);
        assert_true (ok);
        assert_true (e2e_server_alive (fx.srv));
        assert_string_equal (p[0].fail, "");
        assert_string_equal (p[1].fail, "");
        control_op (&fx, "restart_child", s_children[c]);
        wait_state (&fx, s_children[c], "running");
        restarts[c]++;
        assert_int_equal (restarts_of (&fx, s_children[c]), restarts[c]);
    }
    //  and some load after the last restart
    size_t base = atomic_load (&p[0].done) + atomic_load (&p[1].done);
    bool ok;
    E2E_POLL (ok, 30000, atomic_load (&p[0].done) + atomic_load (&p[1].done) >= base + 200
                         || p[0].fail[0] || p[1].fail[0]);
    assert_true (ok);
    assert_true (e2e_server_alive (fx.srv));
    for (int i = 0; i < PUSHERS; i++)
        atomic_store (&p[i].finish, true);
    for (int i = 0; i < PUSHERS; i++)
        e2e_pusher_join (&p[i]);
    s_nrunning = 0;

    size_t total = 0;
    for (int i = 0; i < PUSHERS; i++) {
        if (p[i].fail[0])
            fprintf (stderr, "pusher %d: %s\n", i, p[i].fail);
        assert_string_equal (p[i].fail, "");
        fprintf (stderr, "pusher %d: %zu events, %u failed requests (last: %s)\n", i,
                 atomic_load (&p[i].done), p[i].failures, p[i].last_error);
        size_t done = atomic_load (&p[i].done);
        for (size_t k = 0; k < done; k++) {
            tly_result *res = &p[i].results[k];
            if (res->status != TLY_ACCEPTED && res->status != TLY_DUPLICATE) {
                fprintf (stderr, "pusher %d event %zu (%s): status %d code %s %s\n", i, k,
                         p[i].keys[k], (int) res->status, res->code, res->message);
                fail ();
            }
        }
        total += done;
    }
    //  exactly once: the log holds every key, and nothing more
    assert_int_equal (tree_size (&fx), total);
    e2e_conn *c = fx.api;
    for (int i = 0; i < PUSHERS; i++) {
        size_t done = atomic_load (&p[i].done);
        for (size_t k = 0; k < done; k++) {
            assert_int_equal (e2e_callf (c, &fx.r, "{'op':'get','customer':'load-cust','key':'%s'}",
                                         p[i].keys[k]), TLY_OK);
            if (!fx.r.ok)
                fprintf (stderr, "%s missing: %s\n", p[i].keys[k], e2e_reply_json (&fx.r));
            E2E_OK (&fx.r);
            uint64_t seq = 0;
            assert_true (e2e_uint (&fx.r.body, "entry.seq", &seq));
            assert_int_equal (seq, p[i].results[k].seq);
            uint8_t leaf[32];
            assert_true (e2e_bin (&fx.r.body, "leaf", leaf, 32));
            assert_memory_equal (leaf, p[i].results[k].leaf, 32);
        }
    }
    expect_quota (&fx, "load-cust", "req", 1000000000, total);
    for (int i = 0; i < PUSHERS; i++)
        e2e_pusher_free (&p[i]);
    fx_finish (&fx);
    e2e_pass ();
}

//  8 clients race for a limit of 1000 with 2400 events: exactly 1000 win.
//  Limits and usage survive a restart.
static void
test_quota_race_and_restart (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    enum { THREADS = 8, EACH = 300, LIMIT = 1000 };
    set_quota (&fx, "race-cust", "calls", "1000");
    e2e_pusher p[THREADS];
    pushers_start (&fx, p, THREADS, "race-cust", "calls", "r", EACH, 5, 5, 20000);
    for (int i = 0; i < THREADS; i++)
        e2e_pusher_join (&p[i]);
    s_nrunning = 0;
    size_t accepted, duplicate, exceeded;
    limit_outcomes (p, THREADS, &accepted, &duplicate, &exceeded);
    fprintf (stderr, "accepted %zu, quota_exceeded %zu\n", accepted, exceeded);
    assert_int_equal (duplicate, 0);        /* no request was sent twice */
    assert_int_equal (accepted, LIMIT);
    assert_int_equal (exceeded, THREADS * EACH - LIMIT);
    expect_quota (&fx, "race-cust", "calls", LIMIT, LIMIT);
    assert_int_equal (tree_size (&fx), LIMIT);

    //  a clean restart: the limit is durable and usage is rebuilt
    fx_restart_server (&fx, false);
    expect_quota (&fx, "race-cust", "calls", LIMIT, LIMIT);
    uint64_t now = tly_now_ms ();
    tly_event more[3] = {
        e2e_event ("race-cust", "calls", "after-0", 1, now),
        e2e_event ("race-cust", "calls", "after-1", 1, now),
        e2e_event ("race-cust", "calls", "after-2", 0, now),
    };
    ingest_raw (&fx, more, 2);
    E2E_OK (&fx.r);
    for (size_t i = 0; i < 2; i++) {
        char path[32];
        snprintf (path, sizeof path, "results.%zu.code", i);
        if (!e2e_str_is (&fx.r.body, path, "quota_exceeded")) {
            fprintf (stderr, "after restart: expected quota_exceeded in %s\n", e2e_reply_json (&fx.r));
            fail ();
        }
    }
    //  qty 0 never takes the sum past the limit
    ingest_raw (&fx, more + 2, 1);
    expect_all (&fx.r, 1, "accepted");
    //  an accepted event again is a duplicate, and does not count
    for (int i = 0; i < THREADS; i++)
        for (size_t k = 0; k < EACH; k++)
            if (p[i].results[k].status == TLY_ACCEPTED) {
                ingest_raw (&fx, &p[i].events[k], 1);
                expect_all (&fx.r, 1, "duplicate");
                i = THREADS;
                break;
            }
    expect_quota (&fx, "race-cust", "calls", LIMIT, LIMIT);

    //  raising the limit by 2 lets exactly 2 more in
    set_quota (&fx, "race-cust", "calls", "1002");
    tly_event three[3] = {
        e2e_event ("race-cust", "calls", "raise-0", 1, now),
        e2e_event ("race-cust", "calls", "raise-1", 1, now),
        e2e_event ("race-cust", "calls", "raise-2", 1, now),
    };
    ingest_raw (&fx, three, 3);
    E2E_OK (&fx.r);
    assert_string_equal (status_at (&fx.r, 0), "accepted");
    assert_string_equal (status_at (&fx.r, 1), "accepted");
    assert_string_equal (status_at (&fx.r, 2), "rejected");
    expect_quota (&fx, "race-cust", "calls", 1002, 1002);

    //  a removed limit stays removed across a restart
    set_quota (&fx, "race-cust", "calls", "null");
    fx_restart_server (&fx, false);
    uint64_t l, u;
    assert_false (quota_of (&fx, "race-cust", "calls", &l, &u));
    ingest_raw (&fx, three + 2, 1);
    expect_all (&fx.r, 1, "accepted");
    for (int i = 0; i < THREADS; i++)
        e2e_pusher_free (&p[i]);
    fx_finish (&fx);
    e2e_pass ();
}

static size_t
pushed (e2e_pusher *p, int n)
{
    size_t done = 0;
    for (int i = 0; i < n; i++)
        done += atomic_load (&p[i].done);
    return done;
}

//  Clients race for a limit while the operator restarts the quota actor
//  (and receipt) under them: admissions in flight when quota dies, and
//  the recount after each start, must leave exactly `LIMIT` events in the
//  log, none of the refused ones, and usage equal to it, also after a
//  restart of tallyd.
static void
test_quota_limit_under_restarts (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    enum { PUSHERS = 4, EACH = 1500, LIMIT = 1500 };
    set_quota (&fx, "lim-cust", "calls", "1500");
    e2e_pusher p[PUSHERS];
    pushers_start (&fx, p, PUSHERS, "lim-cust", "calls", "lr", EACH, 1, 2, 2000);
    //  one after the other with some load between: on the reference
    //  machine about half come before the limit is reached, half after
    static const char *const order[] = { "quota", "quota", "receipt", "quota",
                                         "quota", "receipt", "quota", "quota",
                                         "quota", "receipt", "quota", "quota" };
    for (size_t round = 0; round < sizeof order / sizeof *order; round++) {
        size_t base = pushed (p, PUSHERS);
        bool ok;
        E2E_POLL (ok, 30000, pushed (p, PUSHERS) >= base + 50
                             || pushed (p, PUSHERS) == (size_t) PUSHERS * EACH);
        assert_true (ok);
        control_op (&fx, "restart_child", order[round]);
        wait_state (&fx, order[round], "running");
    }
    fprintf (stderr, "%zu of %d events pushed when the last restart was done\n",
             pushed (p, PUSHERS), PUSHERS * EACH);
    for (int i = 0; i < PUSHERS; i++)
        e2e_pusher_join (&p[i]);
    s_nrunning = 0;

    size_t accepted, duplicate, exceeded;
    limit_outcomes (p, PUSHERS, &accepted, &duplicate, &exceeded);
    size_t in_log = accepted + duplicate;
    unsigned failures = 0;
    for (int i = 0; i < PUSHERS; i++) {
        failures += p[i].failures;
        for (size_t k = 0; k < EACH; k++) {
            if (p[i].results[k].status != TLY_REJECTED) {
                expect_present (&fx, "lim-cust", p[i].keys[k]);
                continue;
            }
            assert_int_equal (e2e_callf (fx.api, &fx.r,
                                         "{'op':'get','customer':'lim-cust','key':'%s'}",
                                         p[i].keys[k]), TLY_OK);
            if (fx.r.ok)
                fprintf (stderr, "%s was refused but is in the log: %s\n", p[i].keys[k],
                         e2e_reply_json (&fx.r));
            assert_false (fx.r.ok);
        }
    }
    fprintf (stderr, "in the log %zu, quota_exceeded %zu, failed requests retried %u\n",
             in_log, exceeded, failures);
    assert_int_equal (in_log, LIMIT);
    assert_int_equal (exceeded, PUSHERS * EACH - LIMIT);
    assert_int_equal (tree_size (&fx), LIMIT);
    expect_quota (&fx, "lim-cust", "calls", LIMIT, LIMIT);

    fx_restart_server (&fx, false);
    expect_quota (&fx, "lim-cust", "calls", LIMIT, LIMIT);
    tly_event one = e2e_event ("lim-cust", "calls", "after-restart", 1, tly_now_ms ());
    ingest_until_served (&fx, &one, 1);
    if (!e2e_str_is (&fx.r.body, "results.0.code", "quota_exceeded")) {
        fprintf (stderr, "after restart: %s\n", e2e_reply_json (&fx.r));
        fail ();
    }
    for (int i = 0; i < PUSHERS; i++)
        e2e_pusher_free (&p[i]);
    fx_finish (&fx);
    e2e_pass ();
}

//  One request of `n` events of qty 1 under fresh keys; returns how many
//  were accepted and checks that the rest exceeded the quota.
static size_t
push_ones (fixture *fx, const char *customer, const char *meter, const char *tag, size_t n)
{
    tly_event ev[8];
    char keys[8][32];
    assert_true (n <= 8);
    for (size_t i = 0; i < n; i++) {
        snprintf (keys[i], sizeof keys[i], "%s-%zu", tag, i);
        ev[i] = e2e_event (customer, meter, keys[i], 1, tly_now_ms ());
    }
    ingest_until_served (fx, ev, n);
    size_t accepted = 0;
    for (size_t i = 0; i < n; i++) {
        char path[48];           /* "results." + 20 digits + ".code" */
        snprintf (path, sizeof path, "results.%zu.code", i);
        if (strcmp (status_at (&fx->r, i), "accepted") == 0)
            accepted++;
        else
        if (!e2e_str_is (&fx->r.body, path, "quota_exceeded")) {
            fprintf (stderr, "%s: %s\n", tag, e2e_reply_json (&fx->r));
            fail ();
        }
    }
    return accepted;
}

//  The quota actor's last checkpoint in <data dir>/quota: `counted` (the
//  ledger entries its usage includes) and the sum of its usage rows, read
//  beside a running tallyd.  With `rewind` (quota terminated, so nothing
//  else writes there), first sets it back to nothing counted, as if no
//  checkpoint had been written since the limits were set.
static void
quota_checkpoint (fixture *fx, bool rewind, uint64_t *counted, uint64_t *used)
{
    char path[200];
    snprintf (path, sizeof path, "%s/quota", fx->srv->dir);
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi usage, meta;
    MDB_cursor *cur;
    assert_int_equal (mdb_env_create (&env), 0);
    assert_int_equal (mdb_env_set_maxdbs (env, 4), 0);
    assert_int_equal (mdb_env_set_mapsize (env, (size_t) 4 << 30), 0);
    assert_int_equal (mdb_env_open (env, path, rewind ? 0 : MDB_RDONLY, 0644), 0);
    assert_int_equal (mdb_txn_begin (env, NULL, rewind ? 0 : MDB_RDONLY, &txn), 0);
    assert_int_equal (mdb_dbi_open (txn, "usage", 0, &usage), 0);
    assert_int_equal (mdb_dbi_open (txn, "meta", 0, &meta), 0);
    MDB_val k = { 7, "counted" }, v;
    if (rewind) {
        uint64_t zero = 0;
        v = (MDB_val) { 8, &zero };
        assert_int_equal (mdb_drop (txn, usage, 0), 0);
        assert_int_equal (mdb_put (txn, meta, &k, &v, 0), 0);
        assert_int_equal (mdb_txn_commit (txn), 0);
        assert_int_equal (mdb_txn_begin (env, NULL, MDB_RDONLY, &txn), 0);
    }
    *counted = 0;
    if (mdb_get (txn, meta, &k, &v) == 0) {
        assert_int_equal (v.mv_size, 8);
        memcpy (counted, v.mv_data, 8);
    }
    *used = 0;
    assert_int_equal (mdb_cursor_open (txn, usage, &cur), 0);
    for (int op = MDB_FIRST; mdb_cursor_get (cur, &k, &v, op) == 0; op = MDB_NEXT) {
        uint64_t u;
        assert_int_equal (v.mv_size, 8);
        memcpy (&u, v.mv_data, 8);
        *used += u;
    }
    mdb_cursor_close (cur);
    mdb_txn_abort (txn);
    mdb_env_close (env);
}

//  A recount of usage (a start with an old checkpoint) stopped by the
//  operator keeps what it counted: the checkpoint written on the way out
//  holds the exact usage of the entries it says, and the next start goes
//  on from there, never counting an entry twice.  Then tallyd is killed
//  mid recount: the next start goes on from the last checkpoint.  Every
//  event has qty 1, so usage must equal `counted` at every step.
static void
test_quota_recount_interrupted (void **state)
{
    (void) state;
    static fixture fx;
    setenv ("TALLY_TEST_COUNT_SLICE", "20000", 1);     /* 20 slices a recount */
    fx_start (&fx);
    unsetenv ("TALLY_TEST_COUNT_SLICE");
    enum { N = 400000, MORE = 5 };
    set_quota (&fx, "rc-cust", "calls", "400005");
    tly_event *ev = calloc (N, sizeof *ev);
    char (*keys)[16] = calloc (N, sizeof *keys);
    tly_result *res = calloc (N, sizeof *res);
    assert_true (ev && keys && res);
    uint64_t now = tly_now_ms ();
    for (size_t i = 0; i < N; i++) {
        snprintf (keys[i], sizeof keys[i], "rc-%zu", i);
        ev[i] = e2e_event ("rc-cust", "calls", keys[i], 1, now);
    }
    tly_client *client = e2e_client (fx.srv->api, 30000, 2);
    assert_non_null (client);
    assert_int_equal (tly_client_push (client, ev, N, 1000, res, NULL, fx.srv->pk), TLY_OK);
    for (size_t i = 0; i < N; i++)
        assert_int_equal (res[i].status, TLY_ACCEPTED);
    tly_client_destroy (&client);
    free (res);
    free (keys);
    free (ev);

    //  quota writes all it counted when it stops; with quota stopped, its
    //  checkpoint is set back to nothing counted.
    uint64_t counted, used;
    control_op (&fx, "terminate_child", "quota");
    wait_state (&fx, "quota", "terminated");
    quota_checkpoint (&fx, false, &counted, &used);
    assert_int_equal (counted, N);
    assert_int_equal (used, N);
    quota_checkpoint (&fx, true, &counted, &used);
    assert_int_equal (counted, 0);
    assert_int_equal (used, 0);
    control_op (&fx, "restart_child", "quota");

    //  Stop quota as soon as it runs (it counts after it says it is
    //  ready, a slice of 20,000 entries between looks at its pipe), look
    //  at what it left, start it again.  After tallyd is killed, the
    //  recount must go on from the last checkpoint: the next stop finds
    //  more counted, or the log says it began there.
    uint64_t last = 0, at_kill = 0;
    unsigned cycles = 0, partial = 0;
    bool killed = false, resumed = false;
    for (; last < N && cycles < 100; cycles++) {
        control_op (&fx, "terminate_child", "quota");
        wait_state (&fx, "quota", "terminated");
        quota_checkpoint (&fx, false, &counted, &used);
        if (counted < last || used != counted) {
            fprintf (stderr, "cycle %u: checkpoint counted %llu with usage %llu (before: "
                     "%llu)\n", cycles, (unsigned long long) counted,
                     (unsigned long long) used, (unsigned long long) last);
            fail ();
        }
        partial += counted > last && counted < N;
        if (killed && !resumed) {
            char said[64];
            snprintf (said, sizeof said, "usage rebuilt: %llu entries were counted already",
                      (unsigned long long) at_kill);
            resumed = counted > at_kill || e2e_server_log_has (fx.srv, said, NULL);
        }
        last = counted;
        control_op (&fx, "restart_child", "quota");     /* replies when it runs */
        if (partial == 2 && !killed) {
            fx_restart_server (&fx, true);
            killed = true;
            at_kill = last;
        }
    }
    fprintf (stderr, "%u stops of quota, %u of them mid recount; tallyd killed after "
             "the second\n", cycles, partial);
    assert_int_equal (last, N);
    assert_true (partial >= 2 && killed && resumed);

    bool ok;
    uint64_t limit = 0;
    E2E_POLL (ok, STATE_MS, quota_of (&fx, "rc-cust", "calls", &limit, &used) && used == N);
    if (!ok)
        fprintf (stderr, "usage after the recounts: %s\n", e2e_reply_json (&fx.r));
    assert_true (ok);
    assert_int_equal (push_ones (&fx, "rc-cust", "calls", "rc-more", MORE + 3), MORE);
    expect_quota (&fx, "rc-cust", "calls", N + MORE, N + MORE);
    fx_finish (&fx);
    e2e_pass ();
}


//  Events no limit applies to are admitted by receipt alone (quota counts
//  them from the commit), so a limit set later sees all of them, takes
//  effect with the next request, and stays in force when receipt or quota
//  restarts (each restart re-sends receipt the limits' keys).
static void
test_quota_counts_unlimited (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    enum { THREADS = 4, EACH = 250 };
    e2e_pusher p[THREADS];
    pushers_start (&fx, p, THREADS, "free-cust", "calls", "u", EACH, 3, 7, 2000);
    for (int i = 0; i < THREADS; i++)
        e2e_pusher_join (&p[i]);
    s_nrunning = 0;
    uint64_t total = 0;
    for (int i = 0; i < THREADS; i++) {
        assert_string_equal (p[i].fail, "");
        for (size_t k = 0; k < EACH; k++) {
            assert_int_equal (p[i].results[k].status, TLY_ACCEPTED);
            total += p[i].events[k].qty;
        }
        e2e_pusher_free (&p[i]);
    }
    //  the next request after set_quota replies is held to the new limit
    char limit[32];
    snprintf (limit, sizeof limit, "%llu", (unsigned long long) total + 3);
    set_quota (&fx, "free-cust", "calls", limit);
    expect_quota (&fx, "free-cust", "calls", total + 3, total);
    assert_int_equal (push_ones (&fx, "free-cust", "calls", "fill", 5), 3);
    expect_quota (&fx, "free-cust", "calls", total + 3, total + 3);

    //  a new receipt asks quota for the limits again
    control_op (&fx, "restart_child", "receipt");
    wait_state (&fx, "receipt", "running");
    assert_int_equal (push_ones (&fx, "free-cust", "calls", "after-receipt", 2), 0);
    //  a new quota sends them before it is ready
    control_op (&fx, "restart_child", "quota");
    wait_state (&fx, "quota", "running");
    assert_int_equal (push_ones (&fx, "free-cust", "calls", "after-quota", 2), 0);
    expect_quota (&fx, "free-cust", "calls", total + 3, total + 3);

    //  a wildcard limit reaches customers that never had one
    assert_int_equal (push_ones (&fx, "other-cust", "calls", "other-0", 2), 2);
    set_quota (&fx, "*", "*", "0");
    assert_int_equal (push_ones (&fx, "other-cust", "calls", "other-1", 2), 0);
    assert_int_equal (push_ones (&fx, "new-cust", "disk", "new-0", 1), 0);
    set_quota (&fx, "*", "*", "null");
    assert_int_equal (push_ones (&fx, "new-cust", "disk", "new-1", 1), 1);

    //  removed: free again, and still counted
    set_quota (&fx, "free-cust", "calls", "null");
    assert_int_equal (push_ones (&fx, "free-cust", "calls", "free-again", 4), 4);
    set_quota (&fx, "free-cust", "calls", "1000000");
    expect_quota (&fx, "free-cust", "calls", 1000000, total + 7);
    fx_finish (&fx);
    e2e_pass ();
}

//  A COMMIT that never reaches quota (injected) is made up for at the
//  next message of the next group: before judging an ADMIT, quota counts
//  the entries it was never told of, so a limit set meanwhile still holds
//  exactly.
static void
test_quota_lost_commit (void **state)
{
    (void) state;
    setenv ("TALLY_TEST_LOSE_COMMIT", "3", 1);
    static fixture fx;
    fx_start (&fx);
    unsetenv ("TALLY_TEST_LOSE_COMMIT");
    uint64_t before = restarts_of (&fx, "quota");
    size_t accepted = 0;
    for (int r = 0; r < 3; r++) {           //  the third group's COMMIT is lost
        char tag[16];
        snprintf (tag, sizeof tag, "lost-%d", r);
        accepted += push_ones (&fx, "lost-cust", "calls", tag, 8);
    }
    assert_int_equal (accepted, 24);
    //  quota has counted 16 of the 24: without making up for the lost
    //  COMMIT it would admit all 8 of the next request
    set_quota (&fx, "lost-cust", "calls", "26");
    assert_int_equal (push_ones (&fx, "lost-cust", "calls", "over", 8), 2);
    expect_quota (&fx, "lost-cust", "calls", 26, 26);
    assert_int_equal (restarts_of (&fx, "quota"), before);
    assert_true (e2e_server_log_has (fx.srv, " WARN ", "never reached us"));
    fx_finish (&fx);
    e2e_pass ();
}

//  A usage checkpoint that fails (injected) is redone in full: the rows
//  it held are not changed again before the next one, which must still
//  write them, or a later crash would restart from a checkpoint whose
//  `counted` includes those events and whose rows do not.
static void
test_quota_checkpoint_fails (void **state)
{
    (void) state;
    setenv ("TALLY_TEST_FAIL_CHECKPOINTS", "1", 1);
    static fixture fx;
    fx_start (&fx);
    unsetenv ("TALLY_TEST_FAIL_CHECKPOINTS");
    set_quota (&fx, "cf-a", "calls", "100");
    set_quota (&fx, "cf-b", "calls", "100");
    assert_int_equal (push_ones (&fx, "cf-a", "calls", "cf-a1", 8), 8);
    bool ok;
    E2E_POLL (ok, STATE_MS, e2e_server_log_has (fx.srv, " WARN ", "usage checkpoint failed"));
    assert_true (ok);
    //  only b changes now; the next checkpoint (2 s later) must hold a too
    assert_int_equal (push_ones (&fx, "cf-b", "calls", "cf-b1", 5), 5);
    uint64_t counted = 0, used = 0;
    E2E_POLL (ok, STATE_MS, (quota_checkpoint (&fx, false, &counted, &used), counted == 13));
    assert_true (ok);
    assert_int_equal (used, 13);
    fx_restart_server (&fx, true);
    expect_quota (&fx, "cf-a", "calls", 100, 8);
    expect_quota (&fx, "cf-b", "calls", 100, 5);
    fx_finish (&fx);
    e2e_pass ();
}

//  Fills (customer, meter) exactly to `limit`, then one more unit fails.
static void
fill_to (fixture *fx, const char *customer, const char *meter, uint64_t limit, const char *tag)
{
    uint64_t now = tly_now_ms ();
    char k1[32], k2[32];
    snprintf (k1, sizeof k1, "%s-fill", tag);
    snprintf (k2, sizeof k2, "%s-over", tag);
    tly_event ev[2] = {
        e2e_event (customer, meter, k1, limit, now),
        e2e_event (customer, meter, k2, 1, now),
    };
    ingest_raw (fx, ev, 2);
    E2E_OK (&fx->r);
    if (strcmp (status_at (&fx->r, 0), "accepted") != 0
        || !e2e_str_is (&fx->r.body, "results.1.code", "quota_exceeded")) {
        fprintf (stderr, "%s/%s with limit %llu: %s\n", customer, meter,
                 (unsigned long long) limit, e2e_reply_json (&fx->r));
        fail ();
    }
}

//  The most specific limit applies: exact customer over "*", then exact
//  meter over "*".
static void
test_quota_precedence (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    set_quota (&fx, "*", "*", "2");
    set_quota (&fx, "*", "disk", "5");
    set_quota (&fx, "acme", "*", "10");
    set_quota (&fx, "acme", "disk", "20");

    fill_to (&fx, "acme", "disk", 20, "a1");     //  (acme, disk)
    fill_to (&fx, "acme", "cpu", 10, "a2");      //  (acme, *)
    fill_to (&fx, "bolt", "disk", 5, "b1");      //  (*, disk)
    fill_to (&fx, "bolt", "cpu", 2, "b2");       //  (*, *)
    fill_to (&fx, "cole", "net", 2, "c1");       //  (*, *), per customer
    fill_to (&fx, "bolt", "net", 2, "b3");       //  (*, *), per meter

    //  an event over the limit on its own is rejected whole
    uint64_t now = tly_now_ms ();
    tly_event big = e2e_event ("dyne", "disk", "big", 6, now);
    ingest_raw (&fx, &big, 1);
    assert_true (e2e_str_is (&fx.r.body, "results.0.code", "quota_exceeded"));
    //  another month is another period
    tly_event past = e2e_event ("acme", "disk", "past", 20, 1577836800000u);
    ingest_raw (&fx, &past, 1);
    expect_all (&fx.r, 1, "accepted");

    expect_quota (&fx, "acme", "disk", 20, 20);
    expect_quota (&fx, "bolt", "disk", 5, 5);

    //  removing the exact limit falls back to the next most specific
    set_quota (&fx, "acme", "disk", "null");
    tly_event more = e2e_event ("acme", "disk", "after-removal", 1, now);
    ingest_raw (&fx, &more, 1);
    assert_true (e2e_str_is (&fx.r.body, "results.0.code", "quota_exceeded"));   //  20 > 10

    //  all of it survives a restart
    fx_restart_server (&fx, false);
    tly_event again[3] = {
        e2e_event ("bolt", "cpu", "restart-1", 1, now),
        e2e_event ("bolt", "disk", "restart-2", 1, now),
        e2e_event ("acme", "cpu", "restart-3", 1, now),
    };
    ingest_raw (&fx, again, 3);
    E2E_OK (&fx.r);
    for (size_t i = 0; i < 3; i++) {
        char path[32];
        snprintf (path, sizeof path, "results.%zu.code", i);
        if (!e2e_str_is (&fx.r.body, path, "quota_exceeded")) {
            fprintf (stderr, "after restart: expected quota_exceeded in %s\n", e2e_reply_json (&fx.r));
            fail ();
        }
    }
    set_quota (&fx, "*", "*", "100");
    tly_event one = e2e_event ("bolt", "cpu", "restart-4", 1, now);
    ingest_raw (&fx, &one, 1);
    expect_all (&fx.r, 1, "accepted");
    fx_finish (&fx);
    e2e_pass ();
}

//  Clients racing with the same keys: each key is recorded once; the
//  others get duplicate (same event) or conflict (different qty), naming
//  the one seq that won.
static void
test_same_keys_race (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    enum { RACERS = 6, KEYS = 600 };
    e2e_pusher p[RACERS];
    uint64_t ts = tly_now_ms ();
    for (int i = 0; i < RACERS; i++) {
        assert_int_equal (e2e_pusher_init (&p[i], fx.srv->api, fx.srv->pk, "same-cust", "m",
                                           "same", KEYS, 3 + 4 * (size_t) i), TLY_OK);
        p[i].ts = ts;
        p[i].qty = i < 4 ? 1 : 2;         //  racers 4 and 5 conflict with 0..3
        p[i].timeout_ms = 20000;
    }
    for (int i = 0; i < RACERS; i++) {
        assert_int_equal (e2e_pusher_start (&p[i]), TLY_OK);
        s_running = p;
        s_nrunning = i + 1;
    }
    for (int i = 0; i < RACERS; i++)
        e2e_pusher_join (&p[i]);
    s_nrunning = 0;
    for (int i = 0; i < RACERS; i++) {
        assert_string_equal (p[i].fail, "");
        assert_int_equal (atomic_load (&p[i].done), KEYS);
    }
    size_t wins[RACERS] = { 0 };
    for (size_t k = 0; k < KEYS; k++) {
        int winner = -1;
        for (int i = 0; i < RACERS; i++)
            if (p[i].results[k].status == TLY_ACCEPTED) {
                if (winner >= 0) {
                    fprintf (stderr, "key %s accepted twice (seq %llu and %llu)\n", p[i].keys[k],
                             (unsigned long long) p[winner].results[k].seq,
                             (unsigned long long) p[i].results[k].seq);
                    fail ();
                }
                winner = i;
            }
        assert_true (winner >= 0);
        wins[winner]++;
        uint64_t seq = p[winner].results[k].seq;
        uint64_t wqty = p[winner].qty;
        for (int i = 0; i < RACERS; i++) {
            if (i == winner)
                continue;
            tly_result *res = &p[i].results[k];
            tly_status want = p[i].qty == wqty ? TLY_DUPLICATE : TLY_CONFLICT;
            if (res->status != want || res->seq != seq) {
                fprintf (stderr, "key %s: racer %d got status %d seq %llu, expected %d seq %llu\n",
                         p[i].keys[k], i, (int) res->status, (unsigned long long) res->seq,
                         (int) want, (unsigned long long) seq);
                fail ();
            }
            if (want == TLY_DUPLICATE)
                assert_memory_equal (res->leaf, p[winner].results[k].leaf, 32);
        }
    }
    fprintf (stderr, "keys won per racer:");
    for (int i = 0; i < RACERS; i++)
        fprintf (stderr, " %zu", wins[i]);
    fprintf (stderr, "\n");
    assert_int_equal (tree_size (&fx), KEYS);
    for (int i = 0; i < RACERS; i++)
        e2e_pusher_free (&p[i]);
    fx_finish (&fx);
    e2e_pass ();
}

//  Within one request quota is judged event by event, in order;
//  duplicates and conflicts never count.
static void
test_quota_in_batch (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);
    set_quota (&fx, "batch-cust", "m", "10");
    uint64_t now = tly_now_ms ();
    tly_event evs[7] = {
        e2e_event ("batch-cust", "m", "a", 3, now),
        e2e_event ("batch-cust", "m", "a", 3, now),     //  duplicate
        e2e_event ("batch-cust", "m", "b", 2, now),
        e2e_event ("batch-cust", "m", "b", 9, now),     //  conflict
        e2e_event ("batch-cust", "m", "c", 8, now),     //  3 + 2 + 8 > 10
        e2e_event ("batch-cust", "m", "d", 5, now),     //  3 + 2 + 5 = 10
        e2e_event ("batch-cust", "m", "e", 1, now),     //  11 > 10
    };
    ingest_raw (&fx, evs, 7);
    E2E_OK (&fx.r);
    static const char *const want[7] = { "accepted", "duplicate", "accepted", "conflict",
                                         "rejected", "accepted", "rejected" };
    for (size_t i = 0; i < 7; i++)
        if (strcmp (status_at (&fx.r, i), want[i]) != 0) {
            fprintf (stderr, "result %zu: expected %s in %s\n", i, want[i], e2e_reply_json (&fx.r));
            fail ();
        }
    assert_true (e2e_str_is (&fx.r.body, "results.4.code", "quota_exceeded"));
    assert_true (e2e_str_is (&fx.r.body, "results.6.code", "quota_exceeded"));
    expect_quota (&fx, "batch-cust", "m", 10, 10);
    //  the rejected events may come back once there is room
    set_quota (&fx, "batch-cust", "m", "19");
    ingest_raw (&fx, evs + 4, 3);
    E2E_OK (&fx.r);
    assert_string_equal (status_at (&fx.r, 0), "accepted");
    assert_string_equal (status_at (&fx.r, 1), "duplicate");
    assert_string_equal (status_at (&fx.r, 2), "accepted");
    expect_quota (&fx, "batch-cust", "m", 19, 19);
    fx_finish (&fx);
    e2e_pass ();
}

static bool
verified_since (fixture *fx, uint64_t since)
{
    uint64_t at = 0;
    return e2e_callf (fx->ctl, &fx->r, "{'op':'status'}") == TLY_OK && fx->r.ok
           && e2e_uint (&fx->r.body, "verification.at", &at) && at > since;
}

//  --verify-interval is a promise: the scrubber completes passes however
//  often an operator (or a monitoring system) asks for status.
static void
test_status_polling_does_not_starve_scrubber (void **state)
{
    (void) state;
    static fixture fx;
    fx_start (&fx);          //  --verify-interval 2
    tly_event ev = e2e_event ("poll-cust", "m", "p0", 1, tly_now_ms ());
    ingest_raw (&fx, &ev, 1);
    E2E_OK (&fx.r);
    uint64_t since = tly_now_ms ();
    bool ok;
    E2E_POLL_EVERY (ok, 3 * 1000 * VERIFY_S + 2000, 20, verified_since (&fx, since));
    if (!ok)
        fprintf (stderr, "no verification pass completed in %d s while status was polled "
                 "every 20 ms: %s\n", 3 * VERIFY_S + 2, e2e_reply_json (&fx.r));
    assert_true (ok);
    fx_finish (&fx);
    e2e_pass ();
}

//  {"op": op, "pad": <bin>}, `total` bytes in all.
static void
padded_request (tly_buf *body, const char *op, size_t total)
{
    size_t oplen = strlen (op);
    assert_true (oplen < 32);
    uint8_t head[64];
    size_t n = 0;
    head[n++] = 0x82;
    head[n++] = 0xa2;
    head[n++] = 'o';
    head[n++] = 'p';
    head[n++] = (uint8_t) (0xa0 | oplen);
    memcpy (head + n, op, oplen);
    n += oplen;
    memcpy (head + n, "\xa3pad\xc6", 5);
    n += 5;
    assert_true (total >= n + 4);
    size_t bin = total - n - 4;
    head[n++] = (uint8_t) (bin >> 24);
    head[n++] = (uint8_t) (bin >> 16);
    head[n++] = (uint8_t) (bin >> 8);
    head[n++] = (uint8_t) bin;
    tly_buf_reset (body);
    tly_buf_append (body, head, n);
    assert_int_equal (tly_buf_reserve (body, bin), TLY_OK);
    memset (body->data + body->len, 0, bin);
    body->len += bin;
    assert_int_equal (body->len, total);
}

//  A --config file is read (flags still win), and SIGINT stops cleanly;
//  the request limit holds on both endpoints.
static void
test_config_file (void **state)
{
    (void) state;
    e2e_server *srv = e2e_server_create (VERIFY_S);
    assert_non_null (srv);
    char path[256];
    snprintf (path, sizeof path, "%s/tallyd.cfg", srv->dir);
    FILE *f = fopen (path, "w");
    assert_non_null (f);
    //  api and control here are overridden by the helper's flags
    fprintf (f, "tallyd\n"
                "    api = \"tcp://127.0.0.1:1\"\n"
                "    control = \"tcp://127.0.0.1:2\"\n"
                "    request_max_mb = 1\n"
                "supervisor\n"
                "    strategy = \"rest_for_one\"\n"
                "    intensity = 7\n"
                "    period = 40\n");
    fclose (f);
    snprintf (srv->extra_args[0], sizeof srv->extra_args[0], "--config");
    snprintf (srv->extra_args[1], sizeof srv->extra_args[1], "%s", path);
    assert_int_equal (e2e_server_start (srv), TLY_OK);

    e2e_conn *ctl = e2e_conn_new (srv->control);
    e2e_conn *api = e2e_conn_new (srv->api);
    e2e_reply r;
    e2e_reply_init (&r);
    assert_int_equal (e2e_callf (ctl, &r, "{'op':'status'}"), TLY_OK);
    E2E_OK (&r);
    uint64_t v;
    assert_true (e2e_str_is (&r.body, "strategy", "rest_for_one"));
    assert_true (e2e_uint (&r.body, "intensity", &v) && v == 7);
    assert_true (e2e_uint (&r.body, "period", &v) && v == 40);

    //  request_max_mb = 1: 1 MiB + 1 byte is too_large on both endpoints,
    //  and the connection still answers; 1 MiB is served
    size_t max = 1024 * 1024;
    tly_buf body;
    tly_buf_init (&body);
    padded_request (&body, "sth", max + 1);
    assert_int_equal (e2e_conn_call (api, body.data, body.len, 15000, &r), TLY_OK);
    E2E_ERR (&r, "too_large");
    assert_true (e2e_answers_sth (srv->api, 5000));
    padded_request (&body, "status", max + 1);
    assert_int_equal (e2e_conn_call (ctl, body.data, body.len, 15000, &r), TLY_OK);
    E2E_ERR (&r, "too_large");
    padded_request (&body, "status", max);
    assert_int_equal (e2e_conn_call (ctl, body.data, body.len, 15000, &r), TLY_OK);
    E2E_OK (&r);
    //  up to 4 times the limit ZeroMQ passes it on: still too_large
    padded_request (&body, "status", 4 * max);
    assert_int_equal (e2e_conn_call (ctl, body.data, body.len, 15000, &r), TLY_OK);
    E2E_ERR (&r, "too_large");
    tly_buf_free (&body);
    e2e_reply_free (&r);
    e2e_conn_destroy (&ctl);
    e2e_conn_destroy (&api);
    assert_int_equal (e2e_server_stop_with (srv, SIGINT), 0);
    //  the log names who stopped it (E2E_FINDINGS.md)
    char sender[64];
    snprintf (sender, sizeof sender, "got Interrupt from pid %d:", (int) getpid ());
    assert_true (e2e_server_log_has (srv, sender, NULL));
    assert_int_equal (e2e_server_destroy (&srv), 0);
    e2e_pass ();
}

//  The scrubber runs in the idle CPU class by default (--verify-nice 20),
//  at plain nice 19 with --verify-nice 19; 21 is refused.
static void
test_scrubber_priority (void **state)
{
    (void) state;
    const char *nices[] = { NULL, "19", "21" };
    for (int i = 0; i < 3; i++) {
        e2e_server *srv = e2e_server_create (VERIFY_S);
        assert_non_null (srv);
        if (nices[i]) {
            snprintf (srv->extra_args[0], sizeof srv->extra_args[0], "--verify-nice");
            snprintf (srv->extra_args[1], sizeof srv->extra_args[1], "%s", nices[i]);
        }
        if (i == 2) {
            int code = 0;
            assert_int_equal (e2e_server_try_start (srv, &code), 0);
            assert_int_equal (code, 1);
            assert_true (e2e_server_log_has (srv, "verify-nice", "idle class"));
            assert_int_equal (e2e_server_destroy (&srv), 0);
            continue;
        }
        assert_int_equal (e2e_server_start (srv), TLY_OK);
        int nice = -100, policy = -1;
        bool ok;
        //  until the thread has lowered itself (it may be named first)
        E2E_POLL (ok, 5000, thread_sched (srv->pid, "tly-reconcile", &nice, &policy) == 0 && nice == 19
                            && (i == 1 || policy == SCHED_IDLE));
        assert_true (ok);
        assert_int_equal (nice, 19);
        assert_int_equal (policy, i == 0 ? SCHED_IDLE : SCHED_OTHER);
        assert_int_equal (e2e_server_destroy (&srv), 0);
    }
    e2e_pass ();
}

//  Whether Linux lets process `pid`'s threads leave the idle class at nice
//  19: with CAP_SYS_NICE (bit 23 of CapEff) or an RLIMIT_NICE of 1 or more.
static bool
may_leave_idle (pid_t pid)
{
    char path[64], line[256];
    bool may = false;
    snprintf (path, sizeof path, "/proc/%d/status", (int) pid);
    FILE *f = fopen (path, "r");
    while (f && fgets (line, sizeof line, f))
        if (strncmp (line, "CapEff:", 7) == 0)
            may = (strtoull (line + 7, NULL, 16) >> CAP_SYS_NICE) & 1;
    if (f)
        fclose (f);
    snprintf (path, sizeof path, "/proc/%d/limits", (int) pid);
    f = fopen (path, "r");
    while (f && fgets (line, sizeof line, f))
        if (strncmp (line, "Max nice priority", 17) == 0)
            may = may || strtoul (line + 17, NULL, 10) >= 1;
    if (f)
        fclose (f);
    return may;
}

//  An operator's `verify` is waited for: its pass leaves the idle class
//  for nice 19 where Linux allows it, else it stays idle and the log says
//  how to allow it.  Either way the scrubber is idle again afterwards.
//  The second server starts with RLIMIT_NICE 0 and, where the test may
//  drop it, without CAP_SYS_NICE.
static void
test_verify_leaves_idle_class (void **state)
{
    (void) state;
    for (int denied = 0; denied < 2; denied++) {
        e2e_server *srv = e2e_server_create (VERIFY_S);
        assert_non_null (srv);
        srv->nice_denied = denied;
        assert_int_equal (e2e_server_start (srv), TLY_OK);
        int nice = -100, policy = -1;
        bool ok;
        E2E_POLL (ok, 5000, thread_sched (srv->pid, "tly-reconcile", &nice, &policy) == 0
                            && nice == 19 && policy == SCHED_IDLE);
        assert_true (ok);
        bool may = may_leave_idle (srv->pid);
        e2e_conn *ctl = e2e_conn_new (srv->control);
        assert_non_null (ctl);
        e2e_reply r;
        e2e_reply_init (&r);
        expect_verified (ctl, &r);
        bool raised = e2e_server_log_has (srv, "verify: a full pass at nice 19", NULL);
        bool stayed = e2e_server_log_has (srv, "stays in the idle CPU class", "ulimit -e 1");
        if (raised == stayed || raised != may)
            e2e_server_dump_log (srv, 20);
        assert_int_equal (raised, may);
        assert_int_equal (stayed, !may);
        //  back in the idle class once the pass has ended
        E2E_POLL (ok, 5000, thread_sched (srv->pid, "tly-reconcile", &nice, &policy) == 0
                            && policy == SCHED_IDLE);
        assert_true (ok);
        assert_int_equal (nice, 19);
        assert_false (e2e_server_log_has (srv, "cannot return the scrubber", NULL));
        e2e_reply_free (&r);
        e2e_conn_destroy (&ctl);
        assert_int_equal (e2e_server_destroy (&srv), 0);
    }
    e2e_pass ();
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown (test_children_and_status, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_terminate_and_restart, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_restart_under_load, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_race_and_restart, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_limit_under_restarts, e2e_setup,
                                         fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_recount_interrupted, e2e_setup,
                                         fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_precedence, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_counts_unlimited, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_lost_commit, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_checkpoint_fails, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_same_keys_race, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_quota_in_batch, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_config_file, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_scrubber_priority, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_verify_leaves_idle_class, e2e_setup, fx_teardown),
        cmocka_unit_test_setup_teardown (test_status_polling_does_not_starve_scrubber,
                                         e2e_setup, fx_teardown),
    };
    return cmocka_run_group_tests_name ("e2e_control", tests, NULL, e2e_group_teardown);
}
