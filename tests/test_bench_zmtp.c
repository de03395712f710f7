/*  test_bench_zmtp.c -- the load generator's ZMTP framing (bench/zmtp.h).

    A connection is put on one end of a socketpair and the test plays the
    server on the other: frames split anywhere, envelopes, commands, bad
    flags and sizes, a closed peer.  The handshake against a real tallyd is
    covered by the bench smoke suite.
*/
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "zmtp.h"

typedef struct {
    bz_conn conn;
    int peer;
} pair_t;

static int
setup (void **state)
{
    static pair_t p;
    int sv[2];
    if (socketpair (AF_UNIX, SOCK_STREAM, 0, sv))
        return -1;
    memset (&p, 0, sizeof p);
    p.conn.fd = sv[0];
    fcntl (sv[0], F_SETFL, fcntl (sv[0], F_GETFL) | O_NONBLOCK);
    p.peer = sv[1];
    *state = &p;
    return 0;
}

static int
teardown (void **state)
{
    pair_t *p = *state;
    bz_close (&p->conn);
    if (p->peer >= 0)
        close (p->peer);
    return 0;
}

static void
put (pair_t *p, const void *data, size_t len)
{
    assert_int_equal (write (p->peer, data, len), (ssize_t) len);
}

/*  Expects the next message to be `want`. */
static void
expect_msg (pair_t *p, const char *want, size_t len)
{
    const uint8_t *data;
    size_t got;
    assert_int_equal (bz_next (&p->conn, &data, &got), 1);
    assert_int_equal (got, len);
    assert_memory_equal (data, want, len);
}

static void
expect_none (pair_t *p)
{
    const uint8_t *data;
    size_t got;
    assert_int_equal (bz_next (&p->conn, &data, &got), 0);
}

/*  Expects what was put to be refused as a protocol error. */
static void
expect_fault (pair_t *p)
{
    const uint8_t *data;
    size_t got;
    assert_int_equal (bz_fill (&p->conn), 0);
    assert_int_equal (bz_next (&p->conn, &data, &got), -1);
}

static void
test_short_and_long_frames (void **state)
{
    pair_t *p = *state;
    static uint8_t big[9 + 300];
    big[0] = 0x02;
    big[7] = 0x01;                  /* 8-byte size 300 = 0x12c */
    big[8] = 0x2c;
    memset (big + 9, 'x', 300);
    put (p, "\x00\x03" "abc", 5);
    put (p, big, sizeof big);
    put (p, "\x00\x00", 2);         /* an empty message */
    assert_int_equal (bz_fill (&p->conn), 0);
    expect_msg (p, "abc", 3);
    expect_msg (p, (const char *) big + 9, 300);
    expect_msg (p, "", 0);
    expect_none (p);
}

static void
test_split_anywhere (void **state)
{
    pair_t *p = *state;
    const uint8_t frame[] = { 0x02, 0, 0, 0, 0, 0, 0, 0, 5, 'h', 'e', 'l', 'l', 'o' };
    for (size_t i = 0; i < sizeof frame; i++) {
        expect_none (p);
        put (p, frame + i, 1);
        assert_int_equal (bz_fill (&p->conn), 0);
    }
    expect_msg (p, "hello", 5);
    expect_none (p);
}

/*  A message, then a frame larger than the first buffer, arriving in
    pieces: the message is read before the rest of the frame is there. */
static void
test_split_between_frames (void **state)
{
    pair_t *p = *state;
    static uint8_t big[9 + 200000];
    big[0] = 0x02;
    big[6] = 0x03;                  /* 200,000 = 0x030d40 */
    big[7] = 0x0d;
    big[8] = 0x40;
    for (size_t i = 9; i < sizeof big; i++)
        big[i] = (uint8_t) (i * 13);
    put (p, "\x00\x02" "ab", 4);
    put (p, big, 5000);
    assert_int_equal (bz_fill (&p->conn), 0);
    expect_msg (p, "ab", 2);
    expect_none (p);
    for (size_t off = 5000; off < sizeof big; off += 50000) {
        size_t n = sizeof big - off < 50000 ? sizeof big - off : 50000;
        put (p, big + off, n);
        assert_int_equal (bz_fill (&p->conn), 0);
        if (off + n < sizeof big)
            expect_none (p);
    }
    expect_msg (p, (const char *) big + 9, 200000);
    expect_none (p);
}

static void
test_envelope_skipped (void **state)
{
    pair_t *p = *state;
    put (p, "\x01\x02" "id" "\x01\x00" "\x00\x04" "body", 12);
    assert_int_equal (bz_fill (&p->conn), 0);
    expect_msg (p, "body", 4);
    expect_none (p);
}

static void
test_ping_answered (void **state)
{
    pair_t *p = *state;
    /*  PING, TTL 0x0010, context "ctx"; then a message. */
    put (p, "\x04\x0a" "\x04PING" "\x00\x10" "ctx" "\x00\x01" "m", 15);
    assert_int_equal (bz_fill (&p->conn), 0);
    expect_msg (p, "m", 1);
    uint8_t pong[32];
    assert_int_equal (read (p->peer, pong, sizeof pong), 10);
    assert_memory_equal (pong, "\x04\x08" "\x04PONG" "ctx", 10);
}

static void
test_send_frames (void **state)
{
    pair_t *p = *state;
    static uint8_t body[1000];
    memset (body, 'y', sizeof body);
    assert_int_equal (bz_send (&p->conn, "hi", 2), 0);
    assert_int_equal (bz_send (&p->conn, body, sizeof body), 0);
    assert_false (bz_pending (&p->conn));
    static uint8_t got[4 + 9 + 1000];
    size_t n = 0;
    while (n < sizeof got) {
        ssize_t r = read (p->peer, got + n, sizeof got - n);
        assert_true (r > 0);
        n += (size_t) r;
    }
    assert_memory_equal (got, "\x00\x02" "hi", 4);
    assert_memory_equal (got + 4, "\x02\0\0\0\0\0\0\x03\xe8", 9);
    assert_memory_equal (got + 13, body, 1000);
}

/*  A message larger than the socket takes stays queued until it drains. */
static void
test_send_partial (void **state)
{
    pair_t *p = *state;
    int small = 4096;
    setsockopt (p->conn.fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    static uint8_t body[1 << 20], got[9 + (1 << 20)];
    for (size_t i = 0; i < sizeof body; i++)
        body[i] = (uint8_t) (i * 7);
    assert_int_equal (bz_send (&p->conn, body, sizeof body), 0);
    assert_true (bz_pending (&p->conn));
    size_t n = 0;
    while (n < sizeof got) {
        ssize_t r = read (p->peer, got + n, sizeof got - n);
        assert_true (r > 0);
        n += (size_t) r;
        assert_int_equal (bz_flush (&p->conn), 0);
    }
    assert_false (bz_pending (&p->conn));
    assert_memory_equal (got, "\x02\0\0\0\0\0\x10\0\0", 9);
    assert_memory_equal (got + 9, body, sizeof body);
}

static void
test_unknown_flags (void **state)
{
    pair_t *p = *state;
    put (p, "\x08\x01" "z", 3);
    expect_fault (p);
    assert_non_null (strstr (bz_error (&p->conn), "flags"));
}

static void
test_oversized_frame (void **state)
{
    pair_t *p = *state;
    put (p, "\x02\x00\x00\x00\x00\x7f\xff\xff\xff", 9);     /* 2 GiB */
    expect_fault (p);
}

static void
test_malformed_command (void **state)
{
    pair_t *p = *state;
    put (p, "\x04\x02" "\x09P", 4);  /* a name longer than the frame */
    expect_fault (p);
}

static void
test_peer_closed (void **state)
{
    pair_t *p = *state;
    put (p, "\x00\x01" "q", 3);
    close (p->peer);
    p->peer = -1;
    /*  What arrived before the close is still read. */
    assert_int_equal (bz_fill (&p->conn), -1);
    expect_msg (p, "q", 1);
    assert_non_null (strstr (bz_error (&p->conn), "closed"));
}

static void
test_connect_refused (void **state)
{
    (void) state;
    bz_conn c;
    assert_int_equal (bz_connect (&c, "ipc:///tmp/x", 100), -1);
    assert_non_null (strstr (bz_error (&c), "tcp://"));
    assert_int_equal (bz_connect (&c, "tcp://127.0.0.1:1", 100), -1);
    assert_non_null (strstr (bz_error (&c), "cannot connect"));
    assert_int_equal (c.fd, -1);
}

int
main (void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown (test_short_and_long_frames, setup, teardown),
        cmocka_unit_test_setup_teardown (test_split_anywhere, setup, teardown),
        cmocka_unit_test_setup_teardown (test_split_between_frames, setup, teardown),
        cmocka_unit_test_setup_teardown (test_envelope_skipped, setup, teardown),
        cmocka_unit_test_setup_teardown (test_ping_answered, setup, teardown),
        cmocka_unit_test_setup_teardown (test_send_frames, setup, teardown),
        cmocka_unit_test_setup_teardown (test_send_partial, setup, teardown),
        cmocka_unit_test_setup_teardown (test_unknown_flags, setup, teardown),
        cmocka_unit_test_setup_teardown (test_oversized_frame, setup, teardown),
        cmocka_unit_test_setup_teardown (test_malformed_command, setup, teardown),
        cmocka_unit_test_setup_teardown (test_peer_closed, setup, teardown),
        cmocka_unit_test (test_connect_refused),
    };
    return cmocka_run_group_tests_name ("bench_zmtp", tests, NULL, NULL);
}
