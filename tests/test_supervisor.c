/*  test_supervisor.c -- the supervisor's contract, driven through test
    children that crash, exit, hang or fail to start on command.

    Timings are small (heartbeat 50 ms, silence 200 ms, shutdown 500 ms) and
    every wait for a state change polls with a deadline instead of assuming
    how long anything takes.  What children did, and in which order, goes
    into a journal shared by all threads.
*/
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <cmocka.h>
#include "supervisor.h"

#define DEADLINE_MS 3000        /*  generous bound on any awaited change */

/* ---- the journal ----------------------------------------------------- */

static struct {
    pthread_mutex_t lock;
    char entry [512][48];
    size_t n;
} s_journal = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void
journal (const char *format, ...)
{
    char text [48];
    va_list args;
    va_start (args, format);
    vsnprintf (text, sizeof text, format, args);
    va_end (args);
    pthread_mutex_lock (&s_journal.lock);
    if (s_journal.n < 512)
        strcpy (s_journal.entry [s_journal.n++], text);
    pthread_mutex_unlock (&s_journal.lock);
}

static void
journal_reset (void)
{
    pthread_mutex_lock (&s_journal.lock);
    s_journal.n = 0;
    pthread_mutex_unlock (&s_journal.lock);
}

/*  Index of the first `text` at or after `from`, or -1. */
static int
journal_find (const char *text, int from)
{
    int found = -1;
    pthread_mutex_lock (&s_journal.lock);
    for (size_t k = from < 0 ? 0 : (size_t) from; k < s_journal.n && found < 0; k++)
        if (streq (s_journal.entry [k], text))
            found = (int) k;
    pthread_mutex_unlock (&s_journal.lock);
    return found;
}

static int
journal_count (const char *text)
{
    int count = 0;
    for (int at = journal_find (text, 0); at >= 0; at = journal_find (text, at + 1))
        count++;
    return count;
}

/*  Asserts the entries appear in this order (NULL-terminated list),
    starting at `from`; returns the index of the last. */
static int
assert_order (int from, ...)
{
    va_list args;
    va_start (args, from);
    int at = from - 1;
    const char *text;
    while ((text = va_arg (args, const char *))) {
        int next = journal_find (text, at + 1);
        if (next < 0)
            fail_msg ("journal: \"%s\" missing after entry %d", text, at);
        at = next;
    }
    va_end (args);
    return at;
}

static void
s_await_journal (const char *text, int count)
{
    int64_t deadline = zclock_mono () + DEADLINE_MS;
    while (journal_count (text) < count) {
        if (zclock_mono () > deadline)
            fail_msg ("journal: fewer than %d \"%s\"", count, text);
        zclock_sleep (2);
    }
}

/* ---- the test child -------------------------------------------------- */

typedef struct {
    atomic_int fail_start;      /*  non-zero: return this before READY       */
    atomic_int ready_delay_ms;  /*  sleep this long before READY             */
} s_opts;

static atomic_bool s_release;   /*  lets a "hangforever" child return        */

static void
s_reply_str (tly_child_ctx *ctx, const char *text)
{
    zmsg_t *reply = zmsg_new ();
    zmsg_addstr (reply, text);
    tly_child_reply (ctx, &reply);
}

/*  Serves one call; returns the status to exit with, or -1 to go on. */
static int
s_serve (tly_child_ctx *ctx, zmsg_t *call)
{
    char *cmd = zmsg_popstr (call);
    char *arg = zmsg_popstr (call);
    char *tag = zmsg_popstr (call);
    int status = -1;
    if (streq (cmd, "ping"))
        s_reply_str (ctx, "pong");
    else if (streq (cmd, "crash") || streq (cmd, "exit")) {
        s_reply_str (ctx, "ok");
        status = streq (cmd, "crash") ? 3 : 0;
    }
    else if (streq (cmd, "die"))            /*  exits without replying */
        status = 5;
    else if (streq (cmd, "hang")) {         /*  deaf to PING for a while */
        s_reply_str (ctx, "ok");
        zclock_sleep (atoi (arg));
    }
    else if (streq (cmd, "hangforever")) {
        s_reply_str (ctx, "ok");
        while (!atomic_load (&s_release))
            zclock_sleep (10);
        journal ("released:%s", tly_child_name (ctx));
        status = 0;
    }
    else if (streq (cmd, "slow")) {         /*  replies `tag` after arg ms */
        zclock_sleep (atoi (arg));
        s_reply_str (ctx, tag);
    }
    else if (streq (cmd, "peer"))
        s_reply_str (ctx, tly_child_state_name (tly_child_peer_state (ctx, arg)));
    else
        s_reply_str (ctx, "unknown");
    free (cmd);
    free (arg);
    free (tag);
    return status;
}

static int
s_worker (tly_child_ctx *ctx, void *args)
{
    s_opts *opts = args;
    const char *name = tly_child_name (ctx);
    journal ("start:%s", name);
    int fail = opts ? atomic_load (&opts->fail_start) : 0;
    if (fail) {
        journal ("fail:%s", name);
        return fail;
    }
    if (opts && atomic_load (&opts->ready_delay_ms))
        zclock_sleep (atomic_load (&opts->ready_delay_ms));
    tly_child_ready (ctx);
    while (true) {
        zmsg_t *call = NULL;
        int rc = tly_child_recv (ctx, &call);
        if (rc == TLY_CHILD_TERM) {
            journal ("stop:%s", name);
            return 0;
        }
        if (rc != TLY_CHILD_CALL)
            continue;
        int status = s_serve (ctx, call);
        zmsg_destroy (&call);
        if (status >= 0) {
            journal ("exit:%s:%d", name, status);
            return status;
        }
    }
}

/* ---- helpers --------------------------------------------------------- */

static tly_sup_config
s_cfg (tly_strategy strategy)
{
    return (tly_sup_config) {
        .strategy = strategy, .intensity = 10, .period_ms = 2000,
        .heartbeat_ms = 50, .heartbeat_timeout_ms = 200,
    };
}

static tly_child_spec
s_spec (const char *name, tly_restart_type restart, s_opts *opts)
{
    return (tly_child_spec) {
        .name = name, .fn = s_worker, .args = opts,
        .restart = restart, .shutdown_ms = 500,
    };
}

/*  Three permanent children a, b, c. */
static tly_sup *
s_abc (tly_strategy strategy, tly_child_spec specs [3])
{
    specs [0] = s_spec ("a", TLY_PERMANENT, NULL);
    specs [1] = s_spec ("b", TLY_PERMANENT, NULL);
    specs [2] = s_spec ("c", TLY_PERMANENT, NULL);
    tly_sup_config cfg = s_cfg (strategy);
    tly_sup *sup = tly_sup_new (&cfg, specs, 3);
    assert_non_null (sup);
    return sup;
}

/*  Calls `name` with up to two argument frames; the reply's first frame
    goes to `out` (if given). */
static int
s_call (tly_sup *sup, const char *name, char *out, size_t size, unsigned timeout_ms,
        const char *cmd, const char *arg, const char *tag)
{
    zmsg_t *request = zmsg_new ();
    zmsg_addstr (request, cmd);
    if (arg)
        zmsg_addstr (request, arg);
    if (tag)
        zmsg_addstr (request, tag);
    zmsg_t *reply = NULL;
    int rc = tly_sup_call (sup, name, &request, &reply, timeout_ms);
    assert_null (request);
    if (rc == TLY_OK) {
        char *text = zmsg_popstr (reply);
        if (out)
            snprintf (out, size, "%s", text ? text : "");
        free (text);
        zmsg_destroy (&reply);
    }
    else
        assert_null (reply);
    return rc;
}

static void
s_command (tly_sup *sup, const char *name, const char *cmd, const char *arg)
{
    char reply [32];
    assert_int_equal (s_call (sup, name, reply, sizeof reply, 1000, cmd, arg, NULL), TLY_OK);
    assert_string_equal (reply, "ok");
}

static bool
s_info (tly_sup *sup, const char *name, tly_child_info *info)
{
    tly_child_info infos [8];
    int n = tly_sup_which_children (sup, infos, 8);
    assert_true (n >= 0);
    for (int k = 0; k < n && k < 8; k++)
        if (streq (infos [k].name, name)) {
            *info = infos [k];
            return true;
        }
    return false;
}

/*  Polls until child `name` is in `state` with `restarts` restarts. */
static void
s_await_child (tly_sup *sup, const char *name, tly_child_state state, uint64_t restarts)
{
    int64_t deadline = zclock_mono () + DEADLINE_MS;
    tly_child_info info = { 0 };
    while (true) {
        assert_true (s_info (sup, name, &info));
        if (info.state == state && info.restarts == restarts)
            return;
        if (zclock_mono () > deadline)
            fail_msg ("child %s: %s after %lu restarts, wanted %s after %lu", name,
                      tly_child_state_name (info.state), (unsigned long) info.restarts,
                      tly_child_state_name (state), (unsigned long) restarts);
        zclock_sleep (5);
    }
}

static uint64_t
s_restarts (tly_sup *sup, const char *name)
{
    tly_child_info info = { 0 };
    assert_true (s_info (sup, name, &info));
    return info.restarts;
}

/*  Waits up to timeout_ms for ESCALATE; copies its reason. */
static bool
s_escalated (tly_sup *sup, int timeout_ms, char *reason, size_t size)
{
    zsock_t *sock = tly_sup_sock (sup);
    zmq_pollitem_t item = { zsock_resolve (sock), 0, ZMQ_POLLIN, 0 };
    if (zmq_poll (&item, 1, timeout_ms) <= 0)
        return false;
    char *what = NULL, *why = NULL;
    assert_int_equal (zsock_recv (sock, "ss", &what, &why), 0);
    assert_string_equal (what, "ESCALATE");
    if (reason)
        snprintf (reason, size, "%s", why);
    free (what);
    free (why);
    return true;
}

static void
s_assert_unavailable (tly_sup *sup)
{
    tly_child_info info = { 0 };
    size_t specs, active;
    assert_int_equal (tly_sup_which_children (sup, &info, 1), TLY_EUNAVAIL);
    assert_int_equal (tly_sup_count_children (sup, &specs, &active), TLY_EUNAVAIL);
    assert_int_equal (tly_sup_terminate_child (sup, "a"), TLY_EUNAVAIL);
    assert_int_equal (tly_sup_restart_child (sup, "a"), TLY_EUNAVAIL);
    assert_int_equal (s_call (sup, "a", NULL, 0, 500, "ping", NULL, NULL), TLY_EUNAVAIL);
}

/*  Every child thread that started has ended (journal balance). */
static void
s_assert_all_ended (void)
{
    const char *names [] = { "a", "b", "c" };
    for (size_t k = 0; k < 3; k++) {
        char text [16];
        int started, ended = 0;
        snprintf (text, sizeof text, "start:%s", names [k]);
        started = journal_count (text);
        const char *ends [] = { "stop:%s", "fail:%s", "exit:%s:0", "exit:%s:3", "exit:%s:5" };
        for (size_t e = 0; e < 5; e++) {
            snprintf (text, sizeof text, ends [e], names [k]);
            ended += journal_count (text);
        }
        assert_int_equal (started, ended);
    }
}

static int
s_setup (void **state)
{
    (void) state;
    journal_reset ();
    atomic_store (&s_release, false);
    return 0;
}

/* ---- tests ----------------------------------------------------------- */

static void
test_names_and_defaults (void **state)
{
    (void) state;
    assert_int_equal (tly_sup_default_config.strategy, TLY_ONE_FOR_ONE);
    assert_int_equal (tly_sup_default_config.intensity, 5);
    assert_int_equal (tly_sup_default_config.period_ms, 30000);
    assert_int_equal (tly_sup_default_config.heartbeat_ms, 1000);
    assert_int_equal (tly_sup_default_config.heartbeat_timeout_ms, 5000);
    assert_string_equal (tly_strategy_name (TLY_ONE_FOR_ONE), "one_for_one");
    assert_string_equal (tly_strategy_name (TLY_ONE_FOR_ALL), "one_for_all");
    assert_string_equal (tly_strategy_name (TLY_REST_FOR_ONE), "rest_for_one");
    assert_string_equal (tly_child_state_name (TLY_CHILD_RUNNING), "running");
    assert_string_equal (tly_child_state_name (TLY_CHILD_RESTARTING), "restarting");
    assert_string_equal (tly_child_state_name (TLY_CHILD_TERMINATED), "terminated");

    tly_child_spec specs [2] = { s_spec ("a", TLY_PERMANENT, NULL),
                                 s_spec ("a", TLY_PERMANENT, NULL) };
    assert_null (tly_sup_new (NULL, specs, 2));           /*  duplicate name */
    specs [1].name = "a-name-that-is-longer-than-31-chars";
    assert_null (tly_sup_new (NULL, specs, 2));
    specs [1].name = "b";
    specs [1].fn = NULL;
    assert_null (tly_sup_new (NULL, specs, 2));
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    cfg.heartbeat_ms = 0;
    assert_null (tly_sup_new (&cfg, specs, 1));

    tly_sup *sup = tly_sup_new (NULL, specs, 1);            /*  defaults */
    assert_non_null (sup);
    assert_int_equal (tly_sup_config_of (sup)->period_ms, 30000);
    tly_sup_destroy (&sup);
    assert_null (sup);
    tly_sup_destroy (&sup);                                 /*  harmless */
}

static void
test_start_order_and_reverse_stop (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ONE, specs);
    assert_order (0, "start:a", "start:b", "start:c", NULL);
    assert_int_equal (journal_count ("stop:a"), 0);
    tly_sup_destroy (&sup);
    int at = assert_order (0, "start:c", "stop:c", "stop:b", "stop:a", NULL);
    assert_int_equal (at, 5);
}

static void
test_one_for_one (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ONE, specs);
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 1);
    assert_int_equal (s_restarts (sup, "a"), 0);
    assert_int_equal (s_restarts (sup, "c"), 0);
    assert_int_equal (journal_count ("stop:a") + journal_count ("stop:c"), 0);
    tly_sup_destroy (&sup);
}

static void
test_one_for_all (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ALL, specs);
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "c", TLY_CHILD_RUNNING, 1);
    assert_int_equal (s_restarts (sup, "a"), 1);
    assert_int_equal (s_restarts (sup, "b"), 1);
    /*  others stopped in reverse order, then all started in order */
    assert_order (0, "exit:b:3", "stop:c", "stop:a", "start:a", "start:b", "start:c", NULL);
    tly_sup_destroy (&sup);
}

static void
test_rest_for_one (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_REST_FOR_ONE, specs);
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "c", TLY_CHILD_RUNNING, 1);
    assert_int_equal (s_restarts (sup, "b"), 1);
    assert_int_equal (s_restarts (sup, "a"), 0);
    assert_order (0, "exit:b:3", "stop:c", "start:b", "start:c", NULL);
    assert_int_equal (journal_count ("stop:a"), 0);

    /*  the last child fails: nobody after it to restart */
    s_command (sup, "c", "crash", NULL);
    s_await_child (sup, "c", TLY_CHILD_RUNNING, 2);
    assert_int_equal (s_restarts (sup, "b"), 1);
    tly_sup_destroy (&sup);
}

/*  Runs `cmd` on a lone child of type `type`, then checks the outcome. */
static void
s_check_type (tly_restart_type type, const char *cmd, bool restarted)
{
    journal_reset ();
    tly_child_spec spec = s_spec ("a", type, NULL);
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    tly_sup *sup = tly_sup_new (&cfg, &spec, 1);
    assert_non_null (sup);
    s_command (sup, "a", cmd, NULL);
    if (restarted)
        s_await_child (sup, "a", TLY_CHILD_RUNNING, 1);
    else {
        s_await_child (sup, "a", TLY_CHILD_TERMINATED, 0);
        zclock_sleep (100);     /*  and it stays so */
        s_await_child (sup, "a", TLY_CHILD_TERMINATED, 0);
        assert_int_equal (journal_count ("start:a"), 1);
    }
    tly_sup_destroy (&sup);
}

static void
test_permanent_restarts_after_any_exit (void **state)
{
    (void) state;
    s_check_type (TLY_PERMANENT, "exit", true);
    s_check_type (TLY_PERMANENT, "crash", true);
}

static void
test_transient_restarts_only_after_failure (void **state)
{
    (void) state;
    s_check_type (TLY_TRANSIENT, "exit", false);
    s_check_type (TLY_TRANSIENT, "crash", true);
}

static void
test_temporary_never_restarts (void **state)
{
    (void) state;
    s_check_type (TLY_TEMPORARY, "exit", false);
    s_check_type (TLY_TEMPORARY, "crash", false);
}

/*  one_for_all: a temporary sibling is stopped for good, a transient one
    is restarted, and a terminated one stays terminated. */
static void
test_one_for_all_sibling_types (void **state)
{
    (void) state;
    tly_child_spec specs [3] = { s_spec ("a", TLY_TEMPORARY, NULL),
                                 s_spec ("b", TLY_PERMANENT, NULL),
                                 s_spec ("c", TLY_TRANSIENT, NULL) };
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ALL);
    tly_sup *sup = tly_sup_new (&cfg, specs, 3);
    assert_non_null (sup);
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "c", TLY_CHILD_RUNNING, 1);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 1);
    s_await_child (sup, "a", TLY_CHILD_TERMINATED, 0);

    assert_int_equal (tly_sup_terminate_child (sup, "c"), TLY_OK);
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 2);
    s_await_child (sup, "c", TLY_CHILD_TERMINATED, 1);
    tly_sup_destroy (&sup);
}

static void
test_intensity_exceeded_escalates (void **state)
{
    (void) state;
    tly_child_spec specs [3] = { s_spec ("a", TLY_PERMANENT, NULL),
                                 s_spec ("b", TLY_PERMANENT, NULL),
                                 s_spec ("c", TLY_PERMANENT, NULL) };
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    cfg.intensity = 2;
    tly_sup *sup = tly_sup_new (&cfg, specs, 3);
    assert_non_null (sup);
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 1);
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 2);
    assert_false (s_escalated (sup, 0, NULL, 0));
    int crashed = journal_count ("start:b");
    s_command (sup, "b", "crash", NULL);

    char reason [200];
    assert_true (s_escalated (sup, DEADLINE_MS, reason, sizeof reason));
    assert_non_null (strstr (reason, "more than 2 restarts"));
    assert_non_null (strstr (reason, "child b"));
    /*  b not restarted; the others stopped in reverse order */
    assert_int_equal (journal_count ("start:b"), crashed);
    assert_order (0, "exit:b:3", "exit:b:3", "exit:b:3", "stop:c", "stop:a", NULL);
    s_assert_unavailable (sup);
    s_assert_all_ended ();
    tly_sup_destroy (&sup);
}

static void
test_intensity_spread_out (void **state)
{
    (void) state;
    tly_child_spec spec = s_spec ("a", TLY_PERMANENT, NULL);
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    cfg.intensity = 1;
    cfg.period_ms = 300;
    tly_sup *sup = tly_sup_new (&cfg, &spec, 1);
    assert_non_null (sup);
    for (uint64_t k = 1; k <= 3; k++) {
        s_command (sup, "a", "crash", NULL);
        s_await_child (sup, "a", TLY_CHILD_RUNNING, k);
        zclock_sleep (400);     /*  past period_ms: the window empties */
    }
    assert_false (s_escalated (sup, 0, NULL, 0));
    tly_sup_destroy (&sup);
}

static void
test_heartbeat_failure_restarts (void **state)
{
    (void) state;
    /*  transient: restarted only because missing heartbeats is abnormal,
        even though the child then returns 0 on $TERM */
    tly_child_spec specs [2] = { s_spec ("a", TLY_TRANSIENT, NULL),
                                 s_spec ("b", TLY_PERMANENT, NULL) };
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    tly_sup *sup = tly_sup_new (&cfg, specs, 2);
    assert_non_null (sup);
    s_command (sup, "a", "hang", "400");
    s_await_child (sup, "a", TLY_CHILD_RUNNING, 1);
    assert_order (0, "stop:a", "start:a", NULL);
    assert_int_equal (s_restarts (sup, "b"), 0);
    /*  a healthy child is left alone over many heartbeats */
    zclock_sleep (300);
    assert_int_equal (s_restarts (sup, "a"), 1);
    assert_int_equal (s_restarts (sup, "b"), 0);
    tly_sup_destroy (&sup);
}

static void
test_hung_child_escalates (void **state)
{
    (void) state;
    tly_child_spec specs [3] = { s_spec ("a", TLY_PERMANENT, NULL),
                                 s_spec ("b", TLY_PERMANENT, NULL),
                                 s_spec ("c", TLY_PERMANENT, NULL) };
    specs [1].shutdown_ms = 200;
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    tly_sup *sup = tly_sup_new (&cfg, specs, 3);
    assert_non_null (sup);
    s_command (sup, "b", "hangforever", NULL);
    char reason [200];
    assert_true (s_escalated (sup, DEADLINE_MS, reason, sizeof reason));
    assert_non_null (strstr (reason, "child b did not exit"));
    assert_order (0, "start:c", "stop:c", "stop:a", NULL);
    assert_int_equal (journal_count ("stop:b"), 0);
    assert_int_equal (tly_sup_orphans (), 1);
    s_assert_unavailable (sup);
    tly_sup_destroy (&sup);

    /*  the abandoned thread cleans up after itself once it returns */
    atomic_store (&s_release, true);
    int64_t deadline = zclock_mono () + DEADLINE_MS;
    while (tly_sup_orphans () > 0 && zclock_mono () < deadline)
        zclock_sleep (5);
    assert_int_equal (tly_sup_orphans (), 0);
    assert_int_equal (journal_count ("released:b"), 1);
}

static void
test_start_failure (void **state)
{
    (void) state;
    s_opts failing = { .fail_start = 7 };
    tly_child_spec specs [3] = { s_spec ("a", TLY_PERMANENT, NULL),
                                 s_spec ("b", TLY_PERMANENT, &failing),
                                 s_spec ("c", TLY_PERMANENT, NULL) };
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    assert_null (tly_sup_new (&cfg, specs, 3));
    assert_order (0, "start:a", "start:b", "fail:b", "stop:a", NULL);
    assert_int_equal (journal_count ("start:c"), 0);

    /*  not READY within shutdown_ms: stopped, counted as a failure */
    journal_reset ();
    s_opts slow = { .ready_delay_ms = 300 };
    specs [1].args = &slow;
    specs [1].shutdown_ms = 200;        /*  READY late, but exits in time */
    assert_null (tly_sup_new (&cfg, specs, 3));
    assert_order (0, "start:a", "start:b", "stop:b", "stop:a", NULL);
    assert_int_equal (journal_count ("start:c"), 0);
}

static void
test_restart_failure_counts_towards_intensity (void **state)
{
    (void) state;
    s_opts opts = { 0 };
    tly_child_spec specs [2] = { s_spec ("a", TLY_PERMANENT, NULL),
                                 s_spec ("b", TLY_PERMANENT, &opts) };
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    cfg.intensity = 3;
    tly_sup *sup = tly_sup_new (&cfg, specs, 2);
    assert_non_null (sup);
    atomic_store (&opts.fail_start, 9);
    s_command (sup, "b", "crash", NULL);
    char reason [200];
    assert_true (s_escalated (sup, DEADLINE_MS, reason, sizeof reason));
    assert_non_null (strstr (reason, "child b failed to start"));
    /*  the crash and two retries were allowed, the third retry was not */
    assert_int_equal (journal_count ("fail:b"), 3);
    assert_order (0, "fail:b", "stop:a", NULL);
    s_assert_all_ended ();
    tly_sup_destroy (&sup);
}

static void
test_terminate_and_restart_child (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ALL, specs);
    assert_int_equal (tly_sup_terminate_child (sup, "b"), TLY_OK);
    s_await_child (sup, "b", TLY_CHILD_TERMINATED, 0);
    assert_int_equal (journal_count ("stop:b"), 1);
    /*  operator stops are not failures: nobody else restarted */
    assert_int_equal (s_restarts (sup, "a") + s_restarts (sup, "c"), 0);
    assert_int_equal (s_call (sup, "b", NULL, 0, 500, "ping", NULL, NULL), TLY_EUNAVAIL);
    assert_int_equal (tly_sup_terminate_child (sup, "b"), TLY_OK);    /*  again */
    size_t specs_n, active;
    assert_int_equal (tly_sup_count_children (sup, &specs_n, &active), TLY_OK);
    assert_int_equal (specs_n, 3);
    assert_int_equal (active, 2);

    assert_int_equal (tly_sup_restart_child (sup, "b"), TLY_OK);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 1);
    char reply [16];
    assert_int_equal (s_call (sup, "b", reply, sizeof reply, 1000, "ping", NULL, NULL), TLY_OK);
    assert_string_equal (reply, "pong");
    assert_int_equal (s_restarts (sup, "a") + s_restarts (sup, "c"), 0);
    tly_sup_destroy (&sup);
}

static void
test_restart_running_child (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ONE, specs);
    assert_int_equal (tly_sup_restart_child (sup, "a"), TLY_OK);
    s_await_child (sup, "a", TLY_CHILD_RUNNING, 1);
    assert_order (0, "start:c", "stop:a", "start:a", NULL);
    assert_int_equal (tly_sup_restart_child (sup, "a"), TLY_OK);
    s_await_child (sup, "a", TLY_CHILD_RUNNING, 2);
    assert_int_equal (s_restarts (sup, "b"), 0);
    tly_sup_destroy (&sup);
}

static void
test_unknown_child (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ONE, specs);
    assert_int_equal (tly_sup_terminate_child (sup, "nope"), TLY_ENOTFOUND);
    assert_int_equal (tly_sup_restart_child (sup, "nope"), TLY_ENOTFOUND);
    assert_int_equal (s_call (sup, "nope", NULL, 0, 500, "ping", NULL, NULL), TLY_ENOTFOUND);
    assert_int_equal (tly_sup_terminate_child (sup, NULL), TLY_EINVAL);
    tly_sup_destroy (&sup);
}

static void
test_which_and_count (void **state)
{
    (void) state;
    uint64_t before = tly_now_ms ();
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ONE, specs);
    tly_child_info infos [4];
    memset (infos, 0xAB, sizeof infos);
    assert_int_equal (tly_sup_which_children (sup, infos, 4), 3);
    const char *names [] = { "a", "b", "c" };
    for (int k = 0; k < 3; k++) {
        assert_string_equal (infos [k].name, names [k]);
        assert_int_equal (infos [k].state, TLY_CHILD_RUNNING);
        assert_int_equal (infos [k].restarts, 0);
        assert_true (infos [k].since >= before && infos [k].since <= tly_now_ms ());
    }
    /*  fewer slots than children: fills what fits, tells how many */
    memset (infos, 0xAB, sizeof infos);
    assert_int_equal (tly_sup_which_children (sup, infos, 1), 3);
    assert_string_equal (infos [0].name, "a");
    assert_int_equal ((unsigned char) infos [1].name [0], 0xAB);
    assert_int_equal (tly_sup_which_children (sup, NULL, 0), 3);

    size_t n, active;
    assert_int_equal (tly_sup_count_children (sup, &n, &active), TLY_OK);
    assert_int_equal (n, 3);
    assert_int_equal (active, 3);
    assert_int_equal (tly_sup_terminate_child (sup, "c"), TLY_OK);
    assert_int_equal (tly_sup_count_children (sup, &n, &active), TLY_OK);
    assert_int_equal (active, 2);
    tly_child_info info = { 0 };
    assert_true (s_info (sup, "c", &info));
    assert_int_equal (info.state, TLY_CHILD_TERMINATED);
    assert_true (info.since >= infos [0].since);
    tly_sup_destroy (&sup);
}

static void
s_assert_peer (tly_sup *sup, const char *asker, const char *peer, const char *state)
{
    char reply [32];
    assert_int_equal (s_call (sup, asker, reply, sizeof reply, 1000, "peer", peer, NULL), TLY_OK);
    assert_string_equal (reply, state);
}

static void
test_peer_notices (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    tly_sup *sup = s_abc (TLY_ONE_FOR_ONE, specs);
    s_assert_peer (sup, "a", "c", "running");       /*  told after a started */
    s_assert_peer (sup, "a", "zzz", "running");     /*  never told */

    assert_int_equal (tly_sup_terminate_child (sup, "b"), TLY_OK);
    s_assert_peer (sup, "a", "b", "terminated");
    s_assert_peer (sup, "c", "b", "terminated");

    /*  a newly started child is told where the others stand */
    assert_int_equal (tly_sup_terminate_child (sup, "c"), TLY_OK);
    assert_int_equal (tly_sup_restart_child (sup, "b"), TLY_OK);
    s_assert_peer (sup, "b", "c", "terminated");
    s_assert_peer (sup, "b", "a", "running");
    s_assert_peer (sup, "a", "b", "running");

    /*  a crash and restart end with the peer running again */
    s_command (sup, "b", "crash", NULL);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 2);
    s_assert_peer (sup, "a", "b", "running");
    s_assert_peer (sup, "b", "c", "terminated");
    tly_sup_destroy (&sup);
}

static void
test_stale_reply_dropped (void **state)
{
    (void) state;
    tly_child_spec specs [3];
    specs [0] = s_spec ("a", TLY_PERMANENT, NULL);
    specs [1] = s_spec ("b", TLY_PERMANENT, NULL);
    tly_sup_config cfg = s_cfg (TLY_ONE_FOR_ONE);
    cfg.heartbeat_timeout_ms = 2000;        /*  slow calls are not hangs here */
    tly_sup *sup = tly_sup_new (&cfg, specs, 2);
    assert_non_null (sup);
    char reply [32];

    /*  the child replies after the caller gave up: the next call gets its own */
    assert_int_equal (s_call (sup, "a", reply, sizeof reply, 50, "slow", "200", "late"),
                      TLY_ETIMEOUT);
    assert_int_equal (s_call (sup, "a", reply, sizeof reply, 1000, "ping", NULL, NULL), TLY_OK);
    assert_string_equal (reply, "pong");

    /*  restarted mid-call: its late reply reaches nobody */
    assert_int_equal (s_call (sup, "b", reply, sizeof reply, 50, "slow", "200", "late"),
                      TLY_ETIMEOUT);
    assert_int_equal (tly_sup_restart_child (sup, "b"), TLY_OK);
    assert_int_equal (s_call (sup, "b", reply, sizeof reply, 1000, "ping", NULL, NULL), TLY_OK);
    assert_string_equal (reply, "pong");
    assert_int_equal (s_call (sup, "a", reply, sizeof reply, 1000, "ping", NULL, NULL), TLY_OK);
    assert_string_equal (reply, "pong");

    /*  a child that ends without replying fails the call at once */
    int64_t start = zclock_mono ();
    assert_int_equal (s_call (sup, "b", reply, sizeof reply, 2000, "die", NULL, NULL),
                      TLY_EUNAVAIL);
    assert_true (zclock_mono () - start < 1500);
    s_await_child (sup, "b", TLY_CHILD_RUNNING, 2);
    tly_sup_destroy (&sup);
}

static void
test_destroy_mid_restart (void **state)
{
    (void) state;
    /*  b takes a while to become READY again: destroy lands mid-restart */
    s_opts opts = { 0 };
    tly_child_spec specs [3] = { s_spec ("a", TLY_PERMANENT, NULL),
                                 s_spec ("b", TLY_PERMANENT, &opts),
                                 s_spec ("c", TLY_PERMANENT, NULL) };
    tly_sup_config cfg = s_cfg (TLY_REST_FOR_ONE);
    tly_sup *sup = tly_sup_new (&cfg, specs, 3);
    assert_non_null (sup);
    atomic_store (&opts.ready_delay_ms, 150);
    s_command (sup, "b", "crash", NULL);
    s_await_journal ("start:b", 2);     /*  the supervisor now waits for READY */
    tly_sup_destroy (&sup);
    assert_order (0, "exit:b:3", "stop:c", "start:b", "start:c",
                  "stop:c", "stop:b", "stop:a", NULL);
    s_assert_all_ended ();

    /*  and while a failed restart waits to be retried */
    journal_reset ();
    atomic_store (&opts.ready_delay_ms, 0);
    tly_sup *again = tly_sup_new (&cfg, specs, 3);
    assert_non_null (again);
    atomic_store (&opts.fail_start, 4);
    s_command (again, "b", "crash", NULL);
    s_await_journal ("fail:b", 1);
    tly_sup_destroy (&again);
    s_assert_all_ended ();
}

int
main (void)
{
    const struct CMUnitTest tests [] = {
        cmocka_unit_test_setup (test_names_and_defaults, s_setup),
        cmocka_unit_test_setup (test_start_order_and_reverse_stop, s_setup),
        cmocka_unit_test_setup (test_one_for_one, s_setup),
        cmocka_unit_test_setup (test_one_for_all, s_setup),
        cmocka_unit_test_setup (test_rest_for_one, s_setup),
        cmocka_unit_test_setup (test_permanent_restarts_after_any_exit, s_setup),
        cmocka_unit_test_setup (test_transient_restarts_only_after_failure, s_setup),
        cmocka_unit_test_setup (test_temporary_never_restarts, s_setup),
        cmocka_unit_test_setup (test_one_for_all_sibling_types, s_setup),
        cmocka_unit_test_setup (test_intensity_exceeded_escalates, s_setup),
        cmocka_unit_test_setup (test_intensity_spread_out, s_setup),
        cmocka_unit_test_setup (test_heartbeat_failure_restarts, s_setup),
        cmocka_unit_test_setup (test_hung_child_escalates, s_setup),
        cmocka_unit_test_setup (test_start_failure, s_setup),
        cmocka_unit_test_setup (test_restart_failure_counts_towards_intensity, s_setup),
        cmocka_unit_test_setup (test_terminate_and_restart_child, s_setup),
        cmocka_unit_test_setup (test_restart_running_child, s_setup),
        cmocka_unit_test_setup (test_unknown_child, s_setup),
        cmocka_unit_test_setup (test_which_and_count, s_setup),
        cmocka_unit_test_setup (test_peer_notices, s_setup),
        cmocka_unit_test_setup (test_stale_reply_dropped, s_setup),
        cmocka_unit_test_setup (test_destroy_mid_restart, s_setup),
    };
    int failed = cmocka_run_group_tests_name ("supervisor", tests, NULL, NULL);
    zsys_shutdown ();
    return failed;
}
