/*  log.h -- levelled logging to stderr, one line per event:
        2026-11-23T10:00:00.123Z ERROR receipt: commit failed: ... (what to do)
    Thread-safe (one write(2) per line).  Say what happened and what to do. */
#ifndef TALLY_LOG_H
#define TALLY_LOG_H

typedef enum { TLY_LOG_DEBUG, TLY_LOG_INFO, TLY_LOG_WARN, TLY_LOG_ERROR } tly_log_level;

void tly_log_set_level (tly_log_level level);
/*  Parses "debug", "info", "warn" or "error"; returns 0 or -1. */
int tly_log_parse_level (const char *name, tly_log_level *out);
void tly_log (tly_log_level level, const char *who, const char *fmt, ...)
    __attribute__ ((format (printf, 3, 4)));

#define tly_debug(who, ...) tly_log (TLY_LOG_DEBUG, who, __VA_ARGS__)
#define tly_info(who, ...)  tly_log (TLY_LOG_INFO, who, __VA_ARGS__)
#define tly_warn(who, ...)  tly_log (TLY_LOG_WARN, who, __VA_ARGS__)
#define tly_error(who, ...) tly_log (TLY_LOG_ERROR, who, __VA_ARGS__)

#endif
