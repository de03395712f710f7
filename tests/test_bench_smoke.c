/*  test_bench_smoke.c -- keeps tally-bench from rotting (issue 3).

    Runs the real tally-bench ($TALLY_BENCH) against a tallyd it spawns
    ($TALLYD) with tiny sizes, and asserts that its counts are exactly right:
    every new event accepted, every re-sent key a duplicate, nothing else,
    and the log grown by exactly the accepted events.  Never timings.
*/
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char s_dir[64];

static const char *
env_path (const char *name)
{
    const char *p = getenv (name);
    if (!p || !*p || access (p, X_OK)) {
        fprintf (stderr, "bench_smoke: $%s (%s) is not an executable; build tally-bench "
                         "and tallyd first\n", name, p ? p : "unset");
        return NULL;
    }
    return p;
}

/*  Runs tally-bench with `args` (--json added); returns its exit status
    and the JSON line in out. */
static int
run_bench (const char *args, char *out, size_t size)
{
    const char *bench = env_path ("TALLY_BENCH"), *tallyd = env_path ("TALLYD");
    assert_non_null (bench);
    assert_non_null (tallyd);
    char cmd[2048];
    snprintf (cmd, sizeof cmd, "'%s' --tallyd '%s' --json --quiet --timeout 60 %s", bench,
              tallyd, args);
    FILE *p = popen (cmd, "r");
    assert_non_null (p);
    out[0] = 0;
    char line[4096];
    while (fgets (line, sizeof line, p))
        if (line[0] == '{')
            snprintf (out, size, "%s", line);
    int st = pclose (p);
    fprintf (stderr, "bench_smoke: %s\n  -> %s", cmd, out[0] ? out : "(no JSON line)\n");
    return WIFEXITED (st) ? WEXITSTATUS (st) : -1;
}

/*  The unsigned value of "key" in a flat JSON line (asserts it is there). */
static unsigned long long
field (const char *json, const char *key)
{
    char pat[64];
    snprintf (pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr (json, pat);
    if (!p)
        fail_msg ("no \"%s\" in the result", key);
    return strtoull (p + strlen (pat), NULL, 10);
}

static bool
field_true (const char *json, const char *key)
{
    char pat[64];
    snprintf (pat, sizeof pat, "\"%s\":true", key);
    return strstr (json, pat) != NULL;
}

static int
group_setup (void **state)
{
    (void) state;
    snprintf (s_dir, sizeof s_dir, "/tmp/tally-bench-smoke.XXXXXX");
    return mkdtemp (s_dir) ? 0 : -1;
}

static int
group_teardown (void **state)
{
    (void) state;
    char cmd[128];
    snprintf (cmd, sizeof cmd, "rm -rf '%s'", s_dir);
    return system (cmd) == 0 ? 0 : -1;
}

/*  Closed loop, 2 connections, batch 10, 2,000 events, 10 % re-sent keys. */
static void
test_closed_loop_counts (void **state)
{
    (void) state;
    char json[4096], args[512];
    snprintf (args, sizeof args, "--spawn --data-dir '%s' --connections 2 --inflight 2 "
              "--batch 10 --events 2000 --dup-ratio 0.1 --verify-every 1", s_dir);
    assert_int_equal (run_bench (args, json, sizeof json), 0);
    assert_true (field_true (json, "clean"));
    assert_int_equal (field (json, "events"), 2000);
    assert_int_equal (field (json, "requests"), 200);
    assert_int_equal (field (json, "dups_sent"), 200);
    assert_int_equal (field (json, "accepted"), 1800);
    assert_int_equal (field (json, "duplicate"), 200);
    assert_int_equal (field (json, "conflict"), 0);
    assert_int_equal (field (json, "rejected"), 0);
    assert_int_equal (field (json, "errors"), 0);
    assert_int_equal (field (json, "unexpected"), 0);
    assert_int_equal (field (json, "tree_before"), 0);
    assert_int_equal (field (json, "tree_after"), 1800);
    assert_int_equal (field (json, "sth_verified"), 200);
    assert_true (field (json, "data_bytes") > 0);
}

/*  Open loop on the same log: 600 events at 3,000/s in requests of 7
    (the last one short), no duplicates. */
static void
test_open_loop_counts (void **state)
{
    (void) state;
    char json[4096], args[512];
    snprintf (args, sizeof args, "--spawn --data-dir '%s' --connections 3 --threads 3 "
              "--batch 7 --events 600 --rate 3000", s_dir);
    assert_int_equal (run_bench (args, json, sizeof json), 0);
    assert_true (field_true (json, "clean"));
    assert_int_equal (field (json, "events"), 600);
    assert_int_equal (field (json, "requests"), 87);        /* 3 x ceil(200 / 7) */
    assert_int_equal (field (json, "accepted"), 600);
    assert_int_equal (field (json, "duplicate"), 0);
    assert_int_equal (field (json, "errors"), 0);
    assert_int_equal (field (json, "tree_before"), 1800);
    assert_int_equal (field (json, "tree_after"), 2400);
}

/*  Inclusion proofs against that 2,400-entry log. */
static void
test_proofs_counts (void **state)
{
    (void) state;
    char json[4096], args[512];
    snprintf (args, sizeof args, "--spawn --data-dir '%s' --proofs --connections 2 "
              "--inflight 4 --events 500 --verify-every 10", s_dir);
    assert_int_equal (run_bench (args, json, sizeof json), 0);
    assert_true (field_true (json, "clean"));
    assert_int_equal (field (json, "requests"), 500);
    assert_int_equal (field (json, "accepted"), 500);
    assert_int_equal (field (json, "errors"), 0);
    assert_int_equal (field (json, "unexpected"), 0);
    assert_int_equal (field (json, "sth_verified"), 50);
    assert_int_equal (field (json, "tree_before"), 2400);
}

/*  The same load through libzmq's DEALER sockets (--transport zmq). */
static void
test_zmq_transport_counts (void **state)
{
    (void) state;
    char json[4096], args[512];
    snprintf (args, sizeof args, "--spawn --data-dir '%s' --transport zmq --connections 2 "
              "--inflight 2 --batch 10 --events 1000 --dup-ratio 0.1", s_dir);
    assert_int_equal (run_bench (args, json, sizeof json), 0);
    assert_true (field_true (json, "clean"));
    assert_int_equal (field (json, "events"), 1000);
    assert_int_equal (field (json, "accepted"), 900);
    assert_int_equal (field (json, "duplicate"), 100);
    assert_int_equal (field (json, "errors"), 0);
    assert_int_equal (field (json, "unexpected"), 0);
    assert_int_equal (field (json, "tree_before"), 2400);
    assert_int_equal (field (json, "tree_after"), 3300);
}

/*  Requests of 10,000 events (frames of about 800 KB each way), 4 in
    flight on each connection. */
static void
test_large_requests (void **state)
{
    (void) state;
    char json[4096], args[512];
    snprintf (args, sizeof args, "--spawn --data-dir '%s' --connections 2 --inflight 4 "
              "--batch 10000 --events 80000", s_dir);
    assert_int_equal (run_bench (args, json, sizeof json), 0);
    assert_true (field_true (json, "clean"));
    assert_int_equal (field (json, "requests"), 8);
    assert_int_equal (field (json, "accepted"), 80000);
    assert_int_equal (field (json, "errors"), 0);
    assert_int_equal (field (json, "tree_before"), 3300);
    assert_int_equal (field (json, "tree_after"), 83300);
}

/*  Recovery (S5) on the same log: load for a second, kill -9 while
    requests are in flight, restart; every acknowledged event is there.
    The connections the kill closes are not errors. */
static void
test_recovery (void **state)
{
    (void) state;
    char json[4096], args[512];
    snprintf (args, sizeof args, "--spawn --data-dir '%s' --recovery --duration 1 "
              "--connections 4 --batch 10", s_dir);
    assert_int_equal (run_bench (args, json, sizeof json), 0);
    assert_true (field_true (json, "durable"));
    assert_true (field_true (json, "ingest_ok"));
    assert_true (field_true (json, "sth_verified"));
    assert_int_equal (field (json, "tree_before_load"), 83300);
    assert_true (field (json, "acked_during_load") > 0);
    assert_true (field (json, "tree_after_restart") >= 83300 + field (json, "acked_during_load"));
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test (test_closed_loop_counts),
        cmocka_unit_test (test_open_loop_counts),
        cmocka_unit_test (test_proofs_counts),
        cmocka_unit_test (test_zmq_transport_counts),
        cmocka_unit_test (test_large_requests),
        cmocka_unit_test (test_recovery),
    };
    return cmocka_run_group_tests_name ("bench_smoke", tests, group_setup, group_teardown);
}
