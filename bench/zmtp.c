/*  zmtp.c -- a ZMTP 3.0 DEALER peer on a plain TCP socket (see zmtp.h).

    The wire (RFC 23): each side sends a 64-byte greeting (signature
    FF, 8 bytes of padding, 7F; version 3.0, mechanism "NULL", as-server 0, filler), then a
    READY command with its socket type; after that, frames.  A frame is a
    flags byte (bit 0 MORE, bit 1 LONG, bit 2 COMMAND), a size (one byte,
    or eight big-endian with LONG) and the body.  A command's body is a
    name (one length byte, then the name) and its data.
*/
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include "zmtp.h"

#define F_MORE    0x01
#define F_LONG    0x02
#define F_COMMAND 0x04
#define GREETING  64
#define IN_START  (64u << 10)
#define READY_MAX 4096              /* the peer's READY, with its metadata */

static int
fail (bz_conn *self, const char *fmt, ...) __attribute__ ((format (printf, 2, 3)));

/*  Sets the error; the arguments may include the error so far (formatted
    aside first, since vsnprintf must not read what it writes). */
static int
fail (bz_conn *self, const char *fmt, ...)
{
    char why[sizeof self->error];
    va_list ap;
    va_start (ap, fmt);
    vsnprintf (why, sizeof why, fmt, ap);
    va_end (ap);
    memcpy (self->error, why, sizeof why);
    return -1;
}

const char *
bz_error (const bz_conn *self)
{
    return self->error;
}

/* ---- buffers ---- */

static int
reserve (uint8_t **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : IN_START;
    while (c < need)
        c *= 2;
    uint8_t *p = realloc (*buf, c);
    if (!p)
        return -1;
    *buf = p;
    *cap = c;
    return 0;
}

/*  A long frame's size: 8 bytes, big-endian. */
static uint64_t
get_be64 (const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/*  Appends one frame (flags, size, body) to the output queue. */
static int
queue_frame (bz_conn *self, uint8_t flags, const void *body, size_t len)
{
    if (self->out_off == self->out_len)
        self->out_off = self->out_len = 0;
    else
    if (self->out_off > self->out_len / 2) {
        /*  What was sent is dead weight: keep only what is left. */
        memmove (self->out, self->out + self->out_off, self->out_len - self->out_off);
        self->out_len -= self->out_off;
        self->out_off = 0;
    }
    if (reserve (&self->out, &self->out_cap, self->out_len + 9 + len))
        return fail (self, "out of memory queueing %zu bytes", len);
    uint8_t *p = self->out + self->out_len;
    if (len > 255) {
        *p++ = flags | F_LONG;
        for (int i = 7; i >= 0; i--)
            *p++ = (uint8_t) ((uint64_t) len >> (8 * i));
    }
    else {
        *p++ = flags;
        *p++ = (uint8_t) len;
    }
    memcpy (p, body, len);
    self->out_len = (size_t) (p - self->out) + len;
    return 0;
}

/* ---- the handshake ---- */

static int
parse_endpoint (bz_conn *self, const char *endpoint, char *host, size_t host_len,
                char *port, size_t port_len)
{
    if (strncmp (endpoint, "tcp://", 6))
        return fail (self, "%s: only tcp:// endpoints", endpoint);
    const char *h = endpoint + 6;
    const char *colon = strrchr (h, ':');
    if (!colon || colon == h || !colon[1])
        return fail (self, "%s: expected tcp://HOST:PORT", endpoint);
    size_t hl = (size_t) (colon - h);
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl >= host_len || strlen (colon + 1) >= port_len)
        return fail (self, "%s: too long", endpoint);
    memcpy (host, h, hl);
    host[hl] = 0;
    strcpy (port, colon + 1);
    return 0;
}

static uint64_t
now_ms (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000u + (uint64_t) ts.tv_nsec / 1000000u;
}

/*  Waits for `events` on the socket until `deadline`; 0 when they came. */
static int
wait_until (bz_conn *self, short events, uint64_t deadline)
{
    for (;;) {
        uint64_t now = now_ms ();
        struct pollfd p = { self->fd, events, 0 };
        int n = now < deadline ? poll (&p, 1, (int) (deadline - now)) : 0;
        if (n > 0)
            return 0;
        if (n == 0)
            return fail (self, "timed out");
        if (errno != EINTR)
            return fail (self, "poll: %s", strerror (errno));
    }
}

/*  A non-blocking connect, waited for until `deadline`. */
static int
connect_by (bz_conn *self, const struct addrinfo *a, uint64_t deadline)
{
    if (connect (self->fd, a->ai_addr, a->ai_addrlen) == 0)
        return 0;
    if (errno != EINPROGRESS && errno != EINTR)
        return fail (self, "%s", strerror (errno));
    if (wait_until (self, POLLOUT, deadline))
        return -1;
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt (self->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    return err ? fail (self, "%s", strerror (err)) : 0;
}

static int
dial (bz_conn *self, const char *endpoint, uint64_t deadline)
{
    char host[256], port[16];
    if (parse_endpoint (self, endpoint, host, sizeof host, port, sizeof port))
        return -1;
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai;
    int rc = getaddrinfo (host, port, &hints, &ai);
    if (rc)
        return fail (self, "%s: %s", endpoint, gai_strerror (rc));
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        self->fd = socket (a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                           a->ai_protocol);
        if (self->fd < 0)
            fail (self, "socket: %s", strerror (errno));
        else
        if (connect_by (self, a, deadline)) {
            close (self->fd);
            self->fd = -1;
        }
        else
            break;
    }
    freeaddrinfo (ai);
    if (self->fd < 0)
        return fail (self, "cannot connect to %s: %s", endpoint, self->error);
    int one = 1;
    setsockopt (self->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return 0;
}

/*  Reads exactly `len` bytes before `deadline`. */
static int
read_exact (bz_conn *self, uint8_t *buf, size_t len, uint64_t deadline)
{
    size_t got = 0;
    while (got < len) {
        if (wait_until (self, POLLIN, deadline))
            return fail (self, "the handshake %s", self->error);
        ssize_t r = read (self->fd, buf + got, len - got);
        if (r == 0)
            return fail (self, "the server closed the connection in the handshake");
        if (r < 0 && errno != EINTR && errno != EAGAIN)
            return fail (self, "handshake: %s", strerror (errno));
        if (r > 0)
            got += (size_t) r;
    }
    return 0;
}

/*  Writes the queued bytes before `deadline`. */
static int
write_queued (bz_conn *self, uint64_t deadline)
{
    while (bz_pending (self))
        if (bz_flush (self) || (bz_pending (self) && wait_until (self, POLLOUT, deadline)))
            return fail (self, "handshake: %s", self->error);
    return 0;
}

static int
handshake (bz_conn *self, uint64_t deadline)
{
    uint8_t g[GREETING] = { 0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 3, 0, 'N', 'U', 'L', 'L' };
    static const uint8_t ready[] = {
        5, 'R', 'E', 'A', 'D', 'Y',
        11, 'S', 'o', 'c', 'k', 'e', 't', '-', 'T', 'y', 'p', 'e',
        0, 0, 0, 6, 'D', 'E', 'A', 'L', 'E', 'R'
    };
    if (reserve (&self->out, &self->out_cap, sizeof g))
        return fail (self, "out of memory");
    memcpy (self->out, g, sizeof g);
    self->out_len = sizeof g;
    if (queue_frame (self, F_COMMAND, ready, sizeof ready) || write_queued (self, deadline))
        return -1;
    uint8_t peer[GREETING];
    if (read_exact (self, peer, sizeof peer, deadline))
        return -1;
    if (peer[0] != 0xFF || !(peer[9] & 1) || peer[10] < 3
    ||  memcmp (peer + 12, "NULL", 5))
        return fail (self, "the peer does not speak ZMTP 3 with the NULL mechanism");
    /*  Its READY: a command frame, long when its metadata is. */
    uint8_t head[9], body[READY_MAX];
    if (read_exact (self, head, 2, deadline))
        return -1;
    if (!(head[0] & F_COMMAND) || (head[0] & F_MORE))
        return fail (self, "the peer's first frame is not a command");
    uint64_t size = head[1];
    if (head[0] & F_LONG) {
        if (read_exact (self, head + 2, 7, deadline))
            return -1;
        size = get_be64 (head + 1);
    }
    if (size > sizeof body)
        return fail (self, "the peer's READY is %llu bytes", (unsigned long long) size);
    if (read_exact (self, body, (size_t) size, deadline))
        return -1;
    if (size < 6 || body[0] != 5 || memcmp (body + 1, "READY", 5))
        return fail (self, "the peer's first command is not READY");
    return 0;
}

int
bz_connect (bz_conn *self, const char *endpoint, int timeout_ms)
{
    memset (self, 0, sizeof *self);
    self->fd = -1;
    uint64_t deadline = now_ms () + (uint64_t) timeout_ms;
    if (dial (self, endpoint, deadline) || handshake (self, deadline)) {
        char why[sizeof self->error];
        memcpy (why, self->error, sizeof why);
        bz_close (self);
        memcpy (self->error, why, sizeof why);
        return -1;
    }
    return 0;
}

void
bz_close (bz_conn *self)
{
    if (self->fd >= 0)
        close (self->fd);
    free (self->in);
    free (self->out);
    memset (self, 0, sizeof *self);
    self->fd = -1;
}

/* ---- messages ---- */

int
bz_flush (bz_conn *self)
{
    while (self->out_off < self->out_len) {
        ssize_t w = send (self->fd, self->out + self->out_off, self->out_len - self->out_off,
                          MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (w <= 0)
            return fail (self, "send: %s", w < 0 ? strerror (errno) : "no progress");
        self->out_off += (size_t) w;
    }
    self->out_off = self->out_len = 0;
    return 0;
}

bool
bz_pending (const bz_conn *self)
{
    return self->out_off < self->out_len;
}

int
bz_send (bz_conn *self, const void *data, size_t len)
{
    if (self->fd < 0)
        return fail (self, "not connected");
    if (queue_frame (self, 0, data, len))
        return -1;
    return bz_flush (self);
}

int
bz_fill (bz_conn *self)
{
    if (self->in_off) {
        memmove (self->in, self->in + self->in_off, self->in_len - self->in_off);
        self->in_len -= self->in_off;
        self->in_off = 0;
    }
    for (;;) {
        if (self->in_len == self->in_cap
        &&  reserve (&self->in, &self->in_cap, self->in_len + 1))
            return fail (self, "out of memory reading");
        ssize_t r = recv (self->fd, self->in + self->in_len, self->in_cap - self->in_len, 0);
        if (r > 0) {
            self->in_len += (size_t) r;
            continue;
        }
        if (r == 0)
            return fail (self, "the server closed the connection");
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return fail (self, "recv: %s", strerror (errno));
    }
}

/*  Answers a command: PING gets PONG with the ping's context; the rest
    (a late READY, ERROR, ...) needs nothing from a DEALER. */
static int
on_command (bz_conn *self, const uint8_t *body, size_t len)
{
    if (len < 1 || (size_t) body[0] + 1 > len)
        return fail (self, "a malformed command frame");
    if (body[0] == 4 && memcmp (body + 1, "PING", 4) == 0) {
        if (len < 7)
            return fail (self, "a PING without its TTL");
        uint8_t pong[5 + 16] = { 4, 'P', 'O', 'N', 'G' };
        size_t ctx = len - 7 < 16 ? len - 7 : 16;
        memcpy (pong + 5, body + 7, ctx);
        return queue_frame (self, F_COMMAND, pong, 5 + ctx) ? -1 : bz_flush (self);
    }
    return 0;
}

int
bz_next (bz_conn *self, const uint8_t **data, size_t *len)
{
    for (;;) {
        size_t avail = self->in_len - self->in_off;
        if (avail < 2)
            return 0;
        const uint8_t *p = self->in + self->in_off;
        uint8_t flags = p[0];
        if (flags & ~(F_MORE | F_LONG | F_COMMAND))
            return fail (self, "a frame with unknown flags 0x%02x", flags);
        size_t head = flags & F_LONG ? 9 : 2;
        if (avail < head)
            return 0;
        uint64_t size = flags & F_LONG ? get_be64 (p + 1) : p[1];
        if (size > BZ_MAX_FRAME)
            return fail (self, "a frame of %llu bytes", (unsigned long long) size);
        if (avail - head < size) {
            if (reserve (&self->in, &self->in_cap, self->in_off + head + (size_t) size))
                return fail (self, "out of memory for a frame of %llu bytes",
                             (unsigned long long) size);
            return 0;
        }
        const uint8_t *body = self->in + self->in_off + head;
        self->in_off += head + (size_t) size;
        if (flags & F_COMMAND) {
            if (on_command (self, body, (size_t) size))
                return -1;
            continue;
        }
        if (flags & F_MORE)
            continue;               /* an envelope frame: the body is the last */
        *data = body;
        *len = (size_t) size;
        return 1;
    }
}
