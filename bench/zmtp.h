/*  zmtp.h -- a ZMTP 3.0 DEALER peer on a plain TCP socket, for the load
    generator's connections.

    libzmq gives every socket an I/O thread: each request and each reply
    crosses two threads of the load generator before and after the wire,
    and on two shared cores those hand-offs are much of what a batch-1
    client costs.  PostgreSQL's client (libpq) reads and writes its socket
    in the caller's thread; this does the same for ZeroMQ's wire protocol
    (RFC 23/ZMTP 3.0, NULL mechanism), so the two baselines are driven the
    same way.  tallyd sees an ordinary DEALER peer.

    A connection is used by one thread.  Messages are single frames (a
    DEALER request with no envelope, as PROTOCOL.md s1 allows); a received
    message's envelope frames, if any, are skipped, and PING commands are
    answered with PONG.  Nothing reconnects: a closed connection is an
    error for the caller to count.

    Functions return 0 or -1; bz_error says why.
*/
#ifndef TALLY_BENCH_ZMTP_H
#define TALLY_BENCH_ZMTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BZ_MAX_FRAME (256u << 20)       /* a larger frame is a protocol error */

typedef struct {
    int fd;
    uint8_t *in;                        /* received bytes; parsed from in_off */
    size_t in_off, in_len, in_cap;
    uint8_t *out;                       /* queued bytes; written from out_off */
    size_t out_off, out_len, out_cap;
    char error[160];                    /* why the last call failed */
} bz_conn;

/*  Connects to "tcp://HOST:PORT" and completes the handshake, waiting at
    most timeout_ms in all.  The socket is non-blocking.  On failure the
    connection holds only its error. */
int bz_connect (bz_conn *self, const char *endpoint, int timeout_ms);
void bz_close (bz_conn *self);

/*  Queues one message and writes what the socket takes now. */
int bz_send (bz_conn *self, const void *data, size_t len);
/*  Writes what the socket takes of the queued bytes; bz_pending says
    whether some are left (then poll for POLLOUT). */
int bz_flush (bz_conn *self);
bool bz_pending (const bz_conn *self);

/*  Reads everything the socket has (non-blocking); -1 when the peer has
    closed the connection or an error occurred. */
int bz_fill (bz_conn *self);
/*  The next complete message, if any: 1 with *data and *len pointing into
    the connection's buffer (valid until the next bz_fill or bz_next), 0
    when none is complete, -1 on a protocol error. */
int bz_next (bz_conn *self, const uint8_t **data, size_t *len);

const char *bz_error (const bz_conn *self);

#endif
