/*  util.c -- status names, the clock and tuning from the environment. */
#include <errno.h>
#include <stdlib.h>
#include <time.h>
#include "tally/tally.h"
#include "tally/log.h"

const char *
tly_strerror (int rc)
{
    switch (rc) {
        case TLY_OK:        return "ok";
        case TLY_EINVAL:    return "invalid input";
        case TLY_ETOOLARGE: return "too large";
        case TLY_ENOTFOUND: return "not found";
        case TLY_EIO:       return "I/O error";
        case TLY_ENOMEM:    return "out of memory";
        case TLY_ECORRUPT:  return "stored data is corrupt";
        case TLY_EUNAVAIL:  return "unavailable";
        case TLY_ETIMEOUT:  return "timed out";
        case TLY_ECRYPTO:   return "signature or proof does not verify";
        case TLY_EPROTO:    return "protocol error";
        case TLY_ESERVER:   return "server error";
        case TLY_EEXIST:    return "already exists";
        default:            return "unknown error";
    }
}

uint64_t
tly_now_ms (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    return (uint64_t) ts.tv_sec * 1000u + (uint64_t) ts.tv_nsec / 1000000u;
}

uint64_t
tly_env_u64 (const char *who, const char *name, uint64_t dflt, uint64_t min, uint64_t max)
{
    const char *text = getenv (name);
    if (!text || !*text)
        return dflt;
    char *end;
    errno = 0;
    unsigned long long v = strtoull (text, &end, 10);
    if (errno || *end || text[0] < '0' || text[0] > '9' || v < min || v > max) {
        tly_warn (who, "%s=%s is not a number from %llu to %llu; using %llu", name, text,
                  (unsigned long long) min, (unsigned long long) max,
                  (unsigned long long) dflt);
        return dflt;
    }
    return v;
}
