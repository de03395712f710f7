/*  test_e2e_crash.c -- tallyd killed with SIGKILL under load, and stored
    bytes corrupted behind its back (at rest and while it runs).

    After a crash every event whose ingest result was `accepted` must be
    there with the same leaf hash, the new head must extend the last one
    any client saw (checked offline with a consistency proof), and quota
    usage must be rebuilt exactly.  A flipped byte in the LMDB file -- in a
    leaf, at rest or live, or in an interior node -- must be found by the
    scrubber, reported by `status` and `verify`, and logged as an ERROR; a
    corrupt signed head must stop tallyd from serving it.
*/
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <lmdb.h>
#include <sodium.h>
#include "tally/tally.h"
#include "tally/client.h"
#include "helper_server.h"

#define DETECT_MS 20000
//  How often these tests ask for status, as a monitoring system would
//  (test_e2e_control checks that fast polling does not stall the scrub).
#define STATUS_EVERY_MS 250

/* ---- crash under load ---- */

enum { PUSHERS = 3, CAPACITY = 30000 };

typedef struct {
    e2e_server *srv;
    e2e_conn *api;
    e2e_reply r;
} fixture;

static void
reconnect (fixture *fx)
{
    e2e_conn_destroy (&fx->api);
    fx->api = e2e_conn_new (fx->srv->api);
    assert_non_null (fx->api);
}

static tly_sth
current_sth (fixture *fx)
{
    assert_int_equal (e2e_callf (fx->api, &fx->r, "{'op':'sth'}"), TLY_OK);
    E2E_OK (&fx->r);
    tly_sth sth;
    assert_true (e2e_sth_decode (e2e_at (&fx->r.body, "sth"), &sth));
    assert_true (e2e_sth_verify (&sth, fx->srv->pk));
    return sth;
}

static size_t
total_done (e2e_pusher *p)
{
    size_t n = 0;
    for (int i = 0; i < PUSHERS; i++)
        n += atomic_load (&p[i].done);
    return n;
}

//  Every result the pushers recorded is in the restarted log: same seq,
//  same leaf hash, same key.
static void
check_recorded (fixture *fx, e2e_pusher *p)
{
    for (int i = 0; i < PUSHERS; i++) {
        size_t done = atomic_load (&p[i].done);
        for (size_t k = 0; k < done; k++) {
            tly_result *res = &p[i].results[k];
            if (res->status != TLY_ACCEPTED && res->status != TLY_DUPLICATE) {
                fprintf (stderr, "%s: status %d %s %s\n", p[i].keys[k], (int) res->status,
                         res->code, res->message);
                fail ();
            }
            assert_int_equal (e2e_callf (fx->api, &fx->r, "{'op':'get','seq':%llu}",
                                         (unsigned long long) res->seq), TLY_OK);
            if (!fx->r.ok)
                fprintf (stderr, "accepted %s (seq %llu) is gone after the crash: %s\n",
                         p[i].keys[k], (unsigned long long) res->seq, e2e_reply_json (&fx->r));
            E2E_OK (&fx->r);
            uint8_t leaf[32];
            assert_true (e2e_bin (&fx->r.body, "leaf", leaf, 32));
            assert_memory_equal (leaf, res->leaf, 32);
            assert_true (e2e_str_is (&fx->r.body, "entry.key", p[i].keys[k]));
            assert_true (e2e_str_is (&fx->r.body, "entry.customer", p[i].customer));
        }
    }
}

//  The newest head any pusher saw before the crash.
static tly_sth
newest_seen (e2e_pusher *p)
{
    tly_sth best;
    memset (&best, 0, sizeof best);
    for (int i = 0; i < PUSHERS; i++)
        if (p[i].newest.tree_size >= best.tree_size)
            best = p[i].newest;
    return best;
}

static void
check_consistent (fixture *fx, const tly_sth *old, const tly_sth *now)
{
    assert_true (now->tree_size >= old->tree_size);
    assert_true (e2e_sth_verify (old, fx->srv->pk));
    assert_true (e2e_sth_verify (now, fx->srv->pk));
    if (old->tree_size == 0)
        return;
    assert_int_equal (e2e_callf (fx->api, &fx->r, "{'op':'consistency','from':%llu,'to':%llu}",
                                 (unsigned long long) old->tree_size,
                                 (unsigned long long) now->tree_size), TLY_OK);
    E2E_OK (&fx->r);
    tly_proof proof;
    assert_true (e2e_proof_decode (&fx->r.body, true, &proof));
    int rc = tly_verify_consistency (fx->srv->pk, old, &proof);
    if (rc != TLY_OK)
        fprintf (stderr, "the head seen before the crash (size %llu) is not a prefix of the "
                 "new one (%s): %s\n", (unsigned long long) old->tree_size,
                 tly_strerror (rc), e2e_reply_json (&fx->r));
    assert_int_equal (rc, TLY_OK);
}

//  Pushes everything each pusher attempted again, with one client: all of
//  it is accepted (what the crash took before it was acknowledged) or a
//  duplicate of exactly what was recorded.  Returns the number of keys.
static size_t
push_again (fixture *fx, e2e_pusher *p)
{
    tly_client *client = e2e_client (fx->srv->api, 20000, 5);
    assert_non_null (client);
    size_t keys = 0;
    for (int i = 0; i < PUSHERS; i++) {
        size_t n = p[i].attempted, done = atomic_load (&p[i].done);
        if (n == 0)
            continue;
        tly_result *res = calloc (n, sizeof *res);
        assert_non_null (res);
        tly_sth sth;
        int rc = tly_client_push (client, p[i].events, n, 500, res, &sth, fx->srv->pk);
        if (rc != TLY_OK)
            fprintf (stderr, "push again: %s %s\n", tly_strerror (rc),
                     tly_client_error_message (client));
        assert_int_equal (rc, TLY_OK);
        for (size_t k = 0; k < n; k++) {
            if (k < done) {
                assert_int_equal (res[k].status, TLY_DUPLICATE);
                assert_int_equal (res[k].seq, p[i].results[k].seq);
                assert_memory_equal (res[k].leaf, p[i].results[k].leaf, 32);
            }
            else
                assert_true (res[k].status == TLY_ACCEPTED || res[k].status == TLY_DUPLICATE);
        }
        keys += n;
        free (res);
    }
    tly_client_destroy (&client);
    return keys;
}

static void
test_kill9_under_load (void **state)
{
    (void) state;
    fixture fx;
    memset (&fx, 0, sizeof fx);
    e2e_reply_init (&fx.r);
    fx.srv = e2e_server_new (3600);
    assert_non_null (fx.srv);
    reconnect (&fx);
    size_t keys_total = 0;

    //  two crashes, then a graceful stop under the same load
    for (int round = 0; round < 3; round++) {
        bool graceful = round == 2;
        e2e_pusher p[PUSHERS];
        for (int i = 0; i < PUSHERS; i++) {
            char prefix[24], customer[24];
            snprintf (prefix, sizeof prefix, "r%d-p%d", round, i);
            snprintf (customer, sizeof customer, "crash-%d", i);
            assert_int_equal (e2e_pusher_init (&p[i], fx.srv->api, fx.srv->pk, customer,
                                               "req", prefix, CAPACITY, 8 + 11 * (size_t) i),
                              TLY_OK);
            p[i].timeout_ms = 1000;
            p[i].retries = 0;
            assert_int_equal (e2e_pusher_start (&p[i]), TLY_OK);
        }
        bool ok;
        size_t target = 1500 + (size_t) (e2e_rand () % 1500);
        E2E_POLL (ok, 60000, total_done (p) >= target
                             || p[0].fail[0] || p[1].fail[0] || p[2].fail[0]);
        if (graceful) {
            int code = e2e_server_stop (fx.srv);
            if (code != 0)
                fprintf (stderr, "SIGTERM under load: exit %d\n", code);
            assert_int_equal (code, 0);
        }
        else
            e2e_server_kill (fx.srv);
        for (int i = 0; i < PUSHERS; i++)
            atomic_store (&p[i].abandon, true);
        for (int i = 0; i < PUSHERS; i++)
            e2e_pusher_join (&p[i]);
        for (int i = 0; i < PUSHERS; i++) {
            if (p[i].fail[0])
                fprintf (stderr, "pusher %d: %s\n", i, p[i].fail);
            assert_string_equal (p[i].fail, "");
        }
        assert_true (ok);
        size_t recorded = total_done (p);
        tly_sth old = newest_seen (p);
        fprintf (stderr, "round %d: %s after %zu acknowledged events; newest head seen: %llu\n",
                 round, graceful ? "stopped" : "killed", recorded,
                 (unsigned long long) old.tree_size);

        assert_int_equal (e2e_server_start (fx.srv), TLY_OK);
        reconnect (&fx);
        tly_sth now = current_sth (&fx);
        assert_true (now.tree_size >= keys_total + recorded);
        check_consistent (&fx, &old, &now);
        check_recorded (&fx, p);

        //  what was in flight may or may not be there; pushing it all again
        //  leaves every key exactly once
        keys_total += push_again (&fx, p);
        assert_int_equal (current_sth (&fx).tree_size, keys_total);
        for (int i = 0; i < PUSHERS; i++)
            e2e_pusher_free (&p[i]);
    }

    assert_int_equal (e2e_callf (fx.api, &fx.r, "{'op':'pubkey'}"), TLY_OK);
    uint8_t key[32];
    assert_true (e2e_bin (&fx.r.body, "key", key, 32));
    assert_memory_equal (key, fx.srv->pk, 32);
    e2e_conn *ctl = e2e_conn_new (fx.srv->control);
    assert_int_equal (e2e_callf (ctl, &fx.r, "{'op':'verify'}"), TLY_OK);
    E2E_OK (&fx.r);
    bool vok = false;
    assert_true (e2e_bool (&fx.r.body, "verification.ok", &vok));
    if (!vok)
        fprintf (stderr, "verify after crashes: %s\n", e2e_reply_json (&fx.r));
    assert_true (vok);
    e2e_conn_destroy (&ctl);
    e2e_conn_destroy (&fx.api);
    e2e_reply_free (&fx.r);
    assert_int_equal (e2e_server_destroy (&fx.srv), 0);
    e2e_pass ();
}

//  Quota is exact across a crash: after kill -9 under load the rebuilt
//  usage equals what the ledger holds, and the limit is never passed.
static void
test_kill9_quota_exact (void **state)
{
    (void) state;
    enum { LIMIT = 3000, EACH = 2000 };
    fixture fx;
    memset (&fx, 0, sizeof fx);
    e2e_reply_init (&fx.r);
    fx.srv = e2e_server_new (3600);
    assert_non_null (fx.srv);
    reconnect (&fx);
    e2e_conn *ctl = e2e_conn_new (fx.srv->control);
    assert_int_equal (e2e_callf (ctl, &fx.r, "{'op':'set_quota','customer':'kq','meter':'calls','limit':%d}",
                                 LIMIT), TLY_OK);
    E2E_OK (&fx.r);
    e2e_conn_destroy (&ctl);

    e2e_pusher p[PUSHERS];
    for (int i = 0; i < PUSHERS; i++) {
        char prefix[16];
        snprintf (prefix, sizeof prefix, "q%d", i);
        assert_int_equal (e2e_pusher_init (&p[i], fx.srv->api, fx.srv->pk, "kq", "calls",
                                           prefix, EACH, 9 + 10 * (size_t) i), TLY_OK);
        p[i].timeout_ms = 1000;
        p[i].retries = 0;
        assert_int_equal (e2e_pusher_start (&p[i]), TLY_OK);
    }
    bool ok;
    size_t target = 600 + (size_t) (e2e_rand () % 1200);
    E2E_POLL (ok, 60000, total_done (p) >= target
                         || p[0].fail[0] || p[1].fail[0] || p[2].fail[0]);
    e2e_server_kill (fx.srv);
    for (int i = 0; i < PUSHERS; i++)
        atomic_store (&p[i].abandon, true);
    for (int i = 0; i < PUSHERS; i++)
        e2e_pusher_join (&p[i]);
    for (int i = 0; i < PUSHERS; i++)
        assert_string_equal (p[i].fail, "");
    assert_true (ok);

    assert_int_equal (e2e_server_start (fx.srv), TLY_OK);
    reconnect (&fx);
    uint64_t size = current_sth (&fx).tree_size;
    assert_true (size >= total_done (p));
    assert_true (size < LIMIT);
    uint64_t used = 0, limit = 0;
    assert_int_equal (e2e_callf (fx.api, &fx.r, "{'op':'quota','customer':'kq'}"), TLY_OK);
    E2E_OK (&fx.r);
    if (!e2e_str_is (&fx.r.body, "limits.0.meter", "calls")
        || !e2e_uint (&fx.r.body, "limits.0.limit", &limit)
        || !e2e_uint (&fx.r.body, "limits.0.used", &used) || limit != LIMIT || used != size) {
        fprintf (stderr, "after the crash the ledger holds %llu units, quota says %s\n",
                 (unsigned long long) size, e2e_reply_json (&fx.r));
        fail ();
    }
    check_recorded (&fx, p);

    //  push everything, old and new: the limit is reached exactly
    tly_client *client = e2e_client (fx.srv->api, 20000, 5);
    assert_non_null (client);
    size_t accepted = 0, exceeded = 0;
    for (int i = 0; i < PUSHERS; i++) {
        tly_result *res = calloc (EACH, sizeof *res);
        assert_non_null (res);
        assert_int_equal (tly_client_push (client, p[i].events, EACH, 250, res, NULL, fx.srv->pk),
                          TLY_OK);
        for (size_t k = 0; k < EACH; k++) {
            if (res[k].status == TLY_ACCEPTED)
                accepted++;
            else
            if (res[k].status == TLY_REJECTED && strcmp (res[k].code, "quota_exceeded") == 0)
                exceeded++;
            else
                assert_int_equal (res[k].status, TLY_DUPLICATE);
        }
        free (res);
    }
    tly_client_destroy (&client);
    assert_int_equal (size + accepted, LIMIT);
    assert_int_equal (current_sth (&fx).tree_size, LIMIT);
    assert_int_equal (e2e_callf (fx.api, &fx.r, "{'op':'quota','customer':'kq'}"), TLY_OK);
    assert_true (e2e_uint (&fx.r.body, "limits.0.used", &used));
    assert_int_equal (used, LIMIT);
    for (int i = 0; i < PUSHERS; i++)
        e2e_pusher_free (&p[i]);
    e2e_conn_destroy (&fx.api);
    e2e_reply_free (&fx.r);
    assert_int_equal (e2e_server_destroy (&fx.srv), 0);
    e2e_pass ();
}

/* ---- corruption ---- */

//  Start of the mapping of `file` in this process (from /proc/self/maps).
static const char *
map_base (const char *file)
{
    char real[PATH_MAX];
    if (!realpath (file, real))
        return NULL;
    FILE *f = fopen ("/proc/self/maps", "r");
    if (!f)
        return NULL;
    char line[PATH_MAX + 256];
    const char *base = NULL;
    while (!base && fgets (line, sizeof line, f)) {
        unsigned long start, end, off;
        char perms[8];
        int pos = 0;
        if (sscanf (line, "%lx-%lx %7s %lx %*s %*s%n", &start, &end, perms, &off, &pos) < 4)
            continue;
        char *path = line + pos;
        while (*path == ' ')
            path++;
        path[strcspn (path, "\n")] = 0;
        if (off == 0 && strcmp (path, real) == 0)
            base = (const char *) start;
    }
    fclose (f);
    return base;
}

//  The file offset of the first occurrence of `needle` inside a live value
//  of LMDB table `db`, or -1.  LMDB (read-only, beside a running daemon or
//  not) walks the table; this process's mapping of data.mdb turns a value's
//  address into its place in the file.  Only the table's name is assumed,
//  not its keys: stale copies of the bytes in freed pages are never picked.
static off_t
find_live (const char *dir, const char *db, const void *needle, size_t len)
{
    char env_dir[256], file[300];
    snprintf (env_dir, sizeof env_dir, "%s/ledger", dir);
    snprintf (file, sizeof file, "%s/data.mdb", env_dir);
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    MDB_dbi dbi;
    off_t where = -1;
    if (mdb_env_create (&env) != 0)
        return -1;
    mdb_env_set_maxdbs (env, 32);
    int rc = mdb_env_open (env, env_dir, MDB_RDONLY, 0644);
    if (rc == 0)
        rc = mdb_txn_begin (env, NULL, MDB_RDONLY, &txn);
    if (rc == 0)
        rc = mdb_dbi_open (txn, db, 0, &dbi);
    if (rc == 0)
        rc = mdb_cursor_open (txn, dbi, &cur);
    const char *base = rc == 0 ? map_base (file) : NULL;
    if (base) {
        MDB_val k, v;
        for (int op = MDB_FIRST; where < 0 && mdb_cursor_get (cur, &k, &v, op) == 0; op = MDB_NEXT) {
            const char *hit = memmem (v.mv_data, v.mv_size, needle, len);
            if (hit)
                where = hit - base;
        }
    }
    if (rc != 0)
        fprintf (stderr, "lmdb: table %s: %s\n", db, mdb_strerror (rc));
    if (cur)
        mdb_cursor_close (cur);
    if (txn)
        mdb_txn_abort (txn);
    mdb_env_close (env);
    return where;
}

//  Flips bit 0 of the byte at `where`.
static void
flip_bit_at (const char *file, off_t where)
{
    int fd = open (file, O_RDWR);
    assert_true (fd >= 0);
    uint8_t c = 0;
    assert_int_equal (pread (fd, &c, 1, where), 1);
    c ^= 0x01;
    assert_int_equal (pwrite (fd, &c, 1, where), 1);
    assert_int_equal (fsync (fd), 0);
    close (fd);
}

//  Flips the case of the byte at `where` (the string stays valid UTF-8,
//  so only a hash can tell), checking it holds `expect` first.
static void
flip_at (const char *file, off_t where, char expect)
{
    int fd = open (file, O_RDWR);
    assert_true (fd >= 0);
    char c = 0;
    assert_int_equal (pread (fd, &c, 1, where), 1);
    assert_int_equal (c, expect);
    c ^= 0x20;
    assert_int_equal (pwrite (fd, &c, 1, where), 1);
    assert_int_equal (fsync (fd), 0);
    close (fd);
}

//  Flips one byte of `needle` (the customer string) in the leaf bytes of
//  a live entry; falls back to every occurrence of the needle in the file
//  if LMDB cannot find it.
static void
corrupt_entry (e2e_server *srv, const char *needle)
{
    char file[256];
    e2e_server_data_file (srv, file);
    size_t flip = strlen (needle) / 2;
    off_t where = find_live (srv->dir, "entries", needle, strlen (needle));
    if (where >= 0) {
        fprintf (stderr, "flipping byte %lld of %s\n", (long long) (where + (off_t) flip), file);
        flip_at (file, where + (off_t) flip, needle[flip]);
        return;
    }
    fprintf (stderr, "note: no live entry holds \"%s\" according to LMDB; flipping every "
             "copy in the file\n", needle);
    int fd = open (file, O_RDONLY);
    assert_true (fd >= 0);
    off_t size = lseek (fd, 0, SEEK_END);
    char *data = malloc ((size_t) size);
    assert_non_null (data);
    assert_int_equal (pread (fd, data, (size_t) size, 0), size);
    close (fd);
    size_t copies = 0;
    for (char *p = data; (p = memmem (p, (size_t) (data + size - p), needle, strlen (needle)));
         p++) {
        flip_at (file, (off_t) (p - data) + (off_t) flip, needle[flip]);
        copies++;
    }
    free (data);
    assert_true (copies > 0);
}

//  Pushes `n` events of `customer`, then `n` of another customer.
static void
push_marked (e2e_server *srv, const char *customer, size_t n)
{
    tly_client *client = e2e_client (srv->api, 20000, 3);
    assert_non_null (client);
    tly_event *evs = calloc (2 * n, sizeof *evs);
    tly_result *res = calloc (2 * n, sizeof *res);
    char (*keys)[32] = calloc (2 * n, sizeof *keys);
    assert_true (evs && res && keys);
    uint64_t now = tly_now_ms ();
    for (size_t i = 0; i < 2 * n; i++) {
        snprintf (keys[i], sizeof keys[i], "key-%zu", i);
        evs[i] = e2e_event (i < n ? customer : "plain-customer", "m", keys[i], i, now);
    }
    assert_int_equal (tly_client_push (client, evs, 2 * n, 7, res, NULL, srv->pk), TLY_OK);
    for (size_t i = 0; i < 2 * n; i++)
        assert_int_equal (res[i].status, TLY_ACCEPTED);
    free (evs);
    free (res);
    free (keys);
    tly_client_destroy (&client);
}

//  verification.ok from status (false when the call or field fails).
static bool
status_says_corrupt (e2e_conn *ctl, e2e_reply *r)
{
    bool ok = true;
    return e2e_callf (ctl, r, "{'op':'status'}") == TLY_OK && r->ok
           && e2e_bool (&r->body, "verification.ok", &ok) && !ok;
}

static void
expect_detected (e2e_server *srv)
{
    e2e_conn *ctl = e2e_conn_new (srv->control);
    assert_non_null (ctl);
    e2e_reply r;
    e2e_reply_init (&r);
    bool found;
    E2E_POLL_EVERY (found, DETECT_MS, STATUS_EVERY_MS, status_says_corrupt (ctl, &r));
    if (!found)
        fprintf (stderr, "status still reports no corruption: %s\n", e2e_reply_json (&r));
    assert_true (found);
    char error[256] = "";
    assert_true (e2e_str (&r.body, "verification.error", error, sizeof error));
    assert_true (strlen (error) > 0);
    uint64_t at = 0;
    assert_true (e2e_uint (&r.body, "verification.at", &at) && at > 0);
    fprintf (stderr, "status: %s\n", e2e_reply_json (&r));

    assert_int_equal (e2e_callf (ctl, &r, "{'op':'verify'}"), TLY_OK);
    E2E_OK (&r);
    bool ok = true;
    assert_true (e2e_bool (&r.body, "verification.ok", &ok));
    if (ok)
        fprintf (stderr, "verify missed the corruption: %s\n", e2e_reply_json (&r));
    assert_false (ok);
    assert_true (e2e_str (&r.body, "verification.error", error, sizeof error));
    assert_true (strlen (error) > 0);

    bool logged;
    E2E_POLL (logged, 5000, e2e_server_log_has (srv, " ERROR ", "corrupt")
                            || e2e_server_log_has (srv, " ERROR ", "mismatch"));
    if (!logged)
        fprintf (stderr, "no ERROR line about the corruption in the log\n");
    assert_true (logged);
    e2e_reply_free (&r);
    e2e_conn_destroy (&ctl);
}

static bool
verified_clean (e2e_conn *ctl, e2e_reply *r)
{
    bool ok = false;
    uint64_t at = 0;
    return e2e_callf (ctl, r, "{'op':'status'}") == TLY_OK && r->ok
           && e2e_uint (&r->body, "verification.at", &at) && at > 0
           && e2e_bool (&r->body, "verification.ok", &ok) && ok;
}

//  A tallyd scrubbing every second, with push_marked's 2n entries, after a
//  clean pass (so that what is found later is what the test did).
static e2e_server *
live_clean (const char *customer, size_t n)
{
    e2e_server *srv = e2e_server_new (1);
    assert_non_null (srv);
    push_marked (srv, customer, n);
    e2e_conn *ctl = e2e_conn_new (srv->control);
    e2e_reply r;
    e2e_reply_init (&r);
    bool clean;
    E2E_POLL_EVERY (clean, DETECT_MS, STATUS_EVERY_MS, verified_clean (ctl, &r));
    if (!clean)
        fprintf (stderr, "no clean verification: %s\n", e2e_reply_json (&r));
    assert_true (clean);
    e2e_reply_free (&r);
    e2e_conn_destroy (&ctl);
    return srv;
}

static void
test_corruption_at_rest (void **state)
{
    (void) state;
    e2e_server *srv = e2e_server_new (3600);
    assert_non_null (srv);
    char customer[64];
    snprintf (customer, sizeof customer, "CORRUPTME-%08llx",
              (unsigned long long) (e2e_rand () & 0xffffffffu));
    push_marked (srv, customer, 40);

    e2e_conn *ctl = e2e_conn_new (srv->control);
    e2e_reply r;
    e2e_reply_init (&r);
    assert_int_equal (e2e_callf (ctl, &r, "{'op':'verify'}"), TLY_OK);
    bool ok = false;
    assert_true (e2e_bool (&r.body, "verification.ok", &ok) && ok);
    e2e_conn_destroy (&ctl);

    assert_int_equal (e2e_server_stop (srv), 0);
    corrupt_entry (srv, customer);
    srv->verify_interval = 1;
    assert_int_equal (e2e_server_start (srv), TLY_OK);
    expect_detected (srv);
    e2e_reply_free (&r);
    //  it still stops cleanly
    assert_int_equal (e2e_server_destroy (&srv), 0);
    e2e_pass ();
}

static void
test_corruption_live (void **state)
{
    (void) state;
    char customer[64];
    snprintf (customer, sizeof customer, "LIVECORRUPT-%08llx",
              (unsigned long long) (e2e_rand () & 0xffffffffu));
    e2e_server *srv = live_clean (customer, 40);
    corrupt_entry (srv, customer);
    expect_detected (srv);
    assert_true (e2e_server_alive (srv));
    assert_int_equal (e2e_server_destroy (&srv), 0);
    e2e_pass ();
}

//  A flipped bit in an interior Merkle node is found while running.
static void
test_corruption_node_live (void **state)
{
    (void) state;
    e2e_server *srv = live_clean ("node-cust", 20);      //  40 entries: nodes up to level 5
    e2e_reply r;
    e2e_reply_init (&r);

    //  node (level 2, index 3) covers leaves 12..15: its hash, computed
    //  here, is what the nodes table holds
    e2e_conn *api = e2e_conn_new (srv->api);
    uint8_t h[4][32], pair[2][32], node[32], buf[65];
    for (int i = 0; i < 4; i++) {
        assert_int_equal (e2e_callf (api, &r, "{'op':'get','seq':%d}", 12 + i), TLY_OK);
        assert_true (e2e_bin (&r.body, "leaf", h[i], 32));
    }
    e2e_conn_destroy (&api);
    buf[0] = 0x01;
    for (int i = 0; i < 2; i++) {
        memcpy (buf + 1, h[2 * i], 32);
        memcpy (buf + 33, h[2 * i + 1], 32);
        crypto_hash_sha256 (pair[i], buf, sizeof buf);
    }
    memcpy (buf + 1, pair[0], 32);
    memcpy (buf + 33, pair[1], 32);
    crypto_hash_sha256 (node, buf, sizeof buf);
    off_t at = find_live (srv->dir, "nodes", node, 32);
    assert_true (at >= 0);
    char file[256];
    flip_bit_at (e2e_server_data_file (srv, file), at + 17);
    expect_detected (srv);
    e2e_reply_free (&r);
    assert_int_equal (e2e_server_destroy (&srv), 0);
    e2e_pass ();
}

//  The last entries deleted behind the running daemon's back (history cut
//  short, every stored byte left intact): the scrubber reports it, because
//  a signed head now covers more entries than the log holds.
static void
test_truncated_live (void **state)
{
    (void) state;
    e2e_server *srv = live_clean ("cut-cust", 20);       //  40 entries

    char env_dir[256];
    snprintf (env_dir, sizeof env_dir, "%s/ledger", srv->dir);
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi entries;
    assert_int_equal (mdb_env_create (&env), 0);
    assert_int_equal (mdb_env_set_maxdbs (env, 32), 0);
    assert_int_equal (mdb_env_open (env, env_dir, 0, 0644), 0);
    assert_int_equal (mdb_txn_begin (env, NULL, 0, &txn), 0);
    assert_int_equal (mdb_dbi_open (txn, "entries", MDB_INTEGERKEY, &entries), 0);
    for (uint64_t seq = 37; seq < 40; seq++) {
        MDB_val k = { sizeof seq, &seq };
        assert_int_equal (mdb_del (txn, entries, &k, NULL), 0);
    }
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);
    expect_detected (srv);
    assert_true (e2e_server_log_has (srv, " ERROR ", "entries at its end were removed"));
    assert_int_equal (e2e_server_destroy (&srv), 0);
    e2e_pass ();
}

//  A flipped bit in the stored root of the latest signed head: the daemon
//  must not carry on as if nothing happened.  Either it refuses to start
//  (non-zero exit, an ERROR in the log), or it starts and reports the
//  corruption -- and never serves a head that does not verify.
//  In the first run of the idempotency index that holds a block of two
//  or more records, swaps the seqs of its first two records: the block
//  stays well-formed (same keys, same order, its Bloom filter agrees),
//  but each record now names the other's entry.  False if no run has one.
static bool
swap_dedup_seqs (e2e_server *srv)
{
    char env_dir[300];
    snprintf (env_dir, sizeof env_dir, "%s/ledger", srv->dir);
    MDB_env *env;
    MDB_txn *txn;
    assert_int_equal (mdb_env_create (&env), 0);
    assert_int_equal (mdb_env_set_maxdbs (env, 300), 0);
    assert_int_equal (mdb_env_set_mapsize (env, (size_t) 1 << 30), 0);
    assert_int_equal (mdb_env_open (env, env_dir, 0, 0644), 0);
    assert_int_equal (mdb_txn_begin (env, NULL, 0, &txn), 0);
    bool swapped = false;
    for (int slot = 0; slot < 256 && !swapped; slot++) {
        char name[16];
        snprintf (name, sizeof name, "run.%d", slot);
        MDB_dbi dbi;
        MDB_cursor *cur;
        MDB_val k, v;
        if (mdb_dbi_open (txn, name, 0, &dbi) || mdb_cursor_open (txn, dbi, &cur))
            continue;
        for (int rc = mdb_cursor_get (cur, &k, &v, MDB_FIRST); rc == 0 && !swapped;
             rc = mdb_cursor_get (cur, &k, &v, MDB_NEXT)) {
            if (v.mv_size < 48 || v.mv_size % 24)
                continue;               //  one record, or not a block
            uint8_t block[24 * 80];
            assert_true (v.mv_size <= sizeof block);
            memcpy (block, v.mv_data, v.mv_size);
            uint8_t seq[8];
            memcpy (seq, block + 16, 8);
            memcpy (block + 16, block + 24 + 16, 8);
            memcpy (block + 24 + 16, seq, 8);
            MDB_val nv = { v.mv_size, block };
            assert_int_equal (mdb_cursor_put (cur, &k, &nv, MDB_CURRENT), 0);
            swapped = true;
        }
        mdb_cursor_close (cur);
    }
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);
    return swapped;
}

//  Status shows the index: its runs, per tier, and the entries whose keys
//  they hold, the rest in L0; the groups of runs stored and the runs in
//  none (none after a clean stop: tallyd stores the groups filling).
static void
expect_index_shape (e2e_server *srv, bool after_clean_stop)
{
    e2e_conn *ctl = e2e_conn_new (srv->control);
    assert_non_null (ctl);
    e2e_reply r;
    e2e_reply_init (&r);
    assert_int_equal (e2e_callf (ctl, &r, "{'op':'status'}"), TLY_OK);
    E2E_OK (&r);
    uint64_t size = 0, runs = 0, in_runs = 0, in_l0 = 0, sum = 0;
    assert_true (e2e_uint (&r.body, "tree_size", &size));
    assert_true (e2e_uint (&r.body, "index.runs", &runs) && runs > 0);
    assert_true (e2e_uint (&r.body, "index.in_runs", &in_runs) && in_runs > 0);
    assert_true (e2e_uint (&r.body, "index.in_l0", &in_l0));
    assert_int_equal (in_runs + in_l0, size);
    long tiers = e2e_len (&r.body, "index.tiers");
    assert_true (tiers >= 1);
    for (long i = 0; i < tiers; i++) {
        char path[32];
        uint64_t n = 0;
        snprintf (path, sizeof path, "index.tiers.%ld", i);
        assert_true (e2e_uint (&r.body, path, &n));
        sum += n;
    }
    assert_int_equal (sum, runs);
    uint64_t groups = 0, lone = 0;
    assert_true (e2e_uint (&r.body, "index.groups", &groups));
    assert_true (e2e_uint (&r.body, "index.lone", &lone));
    assert_true (lone <= runs && groups <= runs - lone);
    if (after_clean_stop)
        assert_true (lone == 0 && groups >= 1);
    e2e_reply_free (&r);
    e2e_conn_destroy (&ctl);
}

//  Idempotency records that name the wrong entries are found.
static void
test_corrupt_dedup_record (void **state)
{
    (void) state;
    setenv ("TALLY_L0_MAX", "16", 1);           //  runs from the first events
    e2e_server *srv = live_clean ("dedup-cust", 200);
    expect_index_shape (srv, false);
    assert_int_equal (e2e_server_stop (srv), 0);
    assert_true (swap_dedup_seqs (srv));
    srv->verify_interval = 1;
    assert_int_equal (e2e_server_start (srv), TLY_OK);
    unsetenv ("TALLY_L0_MAX");
    expect_index_shape (srv, true);
    expect_detected (srv);
    assert_int_equal (e2e_server_destroy (&srv), 0);
    e2e_pass ();
}

static void
test_corrupt_head_at_rest (void **state)
{
    (void) state;
    e2e_server *srv = e2e_server_new (3600);
    assert_non_null (srv);
    push_marked (srv, "head-cust", 10);
    e2e_conn *api = e2e_conn_new (srv->api);
    e2e_reply r;
    e2e_reply_init (&r);
    assert_int_equal (e2e_callf (api, &r, "{'op':'sth'}"), TLY_OK);
    uint64_t size = 0;
    assert_true (e2e_uint (&r.body, "sth.tree_size", &size) && size == 20);
    uint8_t root[32];
    assert_true (e2e_bin (&r.body, "sth.root", root, 32));
    e2e_conn_destroy (&api);
    assert_int_equal (e2e_server_stop (srv), 0);

    off_t at = find_live (srv->dir, "sths", root, 32);
    assert_true (at >= 0);
    char file[256];
    flip_bit_at (e2e_server_data_file (srv, file), at + 5);

    srv->verify_interval = 1;
    int code = 0;
    int rc = e2e_server_try_start (srv, &code);
    assert_true (rc >= 0);
    if (rc == 0) {
        fprintf (stderr, "tallyd refused to start on a corrupt head: exit %d\n", code);
        assert_int_not_equal (code, 0);
        assert_true (e2e_server_log_has (srv, " ERROR ", "corrupt")
                     || e2e_server_log_has (srv, " ERROR ", "mismatch")
                     || e2e_server_log_has (srv, " ERROR ", "does not"));
    }
    else {
        fprintf (stderr, "tallyd started on a corrupt head\n");
        api = e2e_conn_new (srv->api);
        assert_int_equal (e2e_callf (api, &r, "{'op':'sth'}"), TLY_OK);
        tly_sth sth;
        if (r.ok && e2e_sth_decode (e2e_at (&r.body, "sth"), &sth)
            && !e2e_sth_verify (&sth, srv->pk)) {
            fprintf (stderr, "it serves a head that does not verify: %s\n", e2e_reply_json (&r));
            fail ();
        }
        e2e_conn_destroy (&api);
        expect_detected (srv);
    }
    e2e_reply_free (&r);
    e2e_server_destroy (&srv);
    e2e_pass ();
}

/*  Rewrites a stored head that is neither the first nor the newest (the
    newest and, on every pass, a rotating one in TALLY_HEADS_FULL are
    checked in full; the others only by their seal).  reseal: change a
    byte of its root and seal the record again, as a bug that wrote a
    wrong head would; else flip a bit of its signature and leave the seal.
    Returns the head's tree size. */
#define STH_VAL_LEN (8 + 32 + 64)
#define STH_SEAL_LEN 16

static uint64_t
tamper_old_head (const char *dir, bool reseal)
{
    char env_dir[256];
    snprintf (env_dir, sizeof env_dir, "%s/ledger", dir);
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    MDB_dbi dbi;
    assert_int_equal (mdb_env_create (&env), 0);
    mdb_env_set_maxdbs (env, 64);
    assert_int_equal (mdb_env_open (env, env_dir, 0, 0644), 0);
    assert_int_equal (mdb_txn_begin (env, NULL, 0, &txn), 0);
    assert_int_equal (mdb_dbi_open (txn, "sths", MDB_INTEGERKEY, &dbi), 0);
    MDB_stat st;
    assert_int_equal (mdb_stat (txn, dbi, &st), 0);
    assert_true (st.ms_entries >= 3);
    assert_int_equal (mdb_cursor_open (txn, dbi, &cur), 0);
    MDB_val k, v;
    int op = MDB_FIRST;
    for (size_t i = 0; i <= st.ms_entries / 2; i++, op = MDB_NEXT)
        assert_int_equal (mdb_cursor_get (cur, &k, &v, op), 0);
    assert_int_equal (k.mv_size, 8);
    assert_int_equal (v.mv_size, STH_VAL_LEN + STH_SEAL_LEN);    /* format 8 and later */
    uint64_t size;
    memcpy (&size, k.mv_data, 8);
    uint8_t val[STH_VAL_LEN + STH_SEAL_LEN];
    memcpy (val, v.mv_data, sizeof val);
    mdb_cursor_close (cur);
    MDB_val key = { 8, &size };                 /* not a pointer into the map */
    if (reseal) {
        val[8 + 3] ^= 0x40;                 /* the root */
        crypto_generichash_state hs;
        crypto_generichash_init (&hs, NULL, 0, STH_SEAL_LEN);
        crypto_generichash_update (&hs, (const uint8_t *) &size, 8);
        crypto_generichash_update (&hs, val, STH_VAL_LEN);
        crypto_generichash_final (&hs, val + STH_VAL_LEN, STH_SEAL_LEN);
    }
    else
        val[40 + 5] ^= 0x01;                /* the signature */
    MDB_val nv = { sizeof val, val };
    assert_int_equal (mdb_put (txn, dbi, &key, &nv, 0), 0);
    assert_int_equal (mdb_txn_commit (txn), 0);
    mdb_env_close (env);
    return size;
}

//  Heads other than the newest: a changed byte breaks the seal and is
//  found in the first pass; a wrong head sealed as if right is found by
//  the full check, which covers each head once in TALLY_HEADS_FULL
//  passes (3 here, from a random phase; a pass a second).  Both were
//  written by commits the daemon acknowledged long before.
static void
corrupt_old_head (bool reseal)
{
    e2e_server *srv = e2e_server_new (3600);
    assert_non_null (srv);
    tly_client *client = e2e_client (srv->api, 20000, 3);
    assert_non_null (client);
    uint64_t now = tly_now_ms ();
    for (int i = 0; i < 4; i++) {           /* a commit, a head, each */
        char key[32];
        snprintf (key, sizeof key, "head-key-%d", i);
        tly_event ev = e2e_event ("heads-customer", "m", key, 1, now);
        tly_result res;
        assert_int_equal (tly_client_push (client, &ev, 1, 1, &res, NULL, srv->pk), TLY_OK);
        assert_int_equal (res.status, TLY_ACCEPTED);
    }
    tly_client_destroy (&client);
    assert_int_equal (e2e_server_stop (srv), 0);
    uint64_t size = tamper_old_head (srv->dir, reseal);
    fprintf (stderr, "tampered with the head of size %llu (%s)\n", (unsigned long long) size,
             reseal ? "root changed, resealed" : "signature bit flipped");
    srv->verify_interval = 1;
    if (reseal)
        setenv ("TALLY_HEADS_FULL", "3", 1);
    int rc = e2e_server_start (srv);
    unsetenv ("TALLY_HEADS_FULL");
    assert_int_equal (rc, TLY_OK);
    expect_detected (srv);
    char what[96];
    snprintf (what, sizeof what, "size %llu %s", (unsigned long long) size,
              reseal ? "does not verify with log.pub" : "does not match its seal");
    assert_true (e2e_server_log_has (srv, " ERROR ", what));
    assert_int_equal (e2e_server_destroy (&srv), 0);
    e2e_pass ();
}

static void
test_corrupt_old_head_seal (void **state)
{
    (void) state;
    corrupt_old_head (false);
}

static void
test_corrupt_old_head_resealed (void **state)
{
    (void) state;
    corrupt_old_head (true);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown (test_kill9_under_load, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_kill9_quota_exact, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_corruption_at_rest, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_corruption_live, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_corruption_node_live, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_truncated_live, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_corrupt_dedup_record, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_corrupt_head_at_rest, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_corrupt_old_head_seal, e2e_setup, e2e_teardown),
        cmocka_unit_test_setup_teardown (test_corrupt_old_head_resealed, e2e_setup, e2e_teardown),
    };
    return cmocka_run_group_tests_name ("e2e_crash", tests, NULL, e2e_group_teardown);
}
