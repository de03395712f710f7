/*  log.c -- levelled logging to stderr. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "tally/log.h"

static volatile tly_log_level s_level = TLY_LOG_INFO;
static const char *s_names[] = { "DEBUG", "INFO", "WARN", "ERROR" };

void
tly_log_set_level (tly_log_level level)
{
    s_level = level;
}

int
tly_log_parse_level (const char *name, tly_log_level *out)
{
    for (int i = 0; i < 4; i++)
        if (strcasecmp (name, s_names[i]) == 0
        ||  (i == TLY_LOG_WARN && strcasecmp (name, "warning") == 0)) {
            *out = (tly_log_level) i;
            return 0;
        }
    return -1;
}

void
tly_log (tly_log_level level, const char *who, const char *fmt, ...)
{
    if (level < s_level)
        return;
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r (&ts.tv_sec, &tm);
    char line [2048];
    int n = snprintf (line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s %s: ",
                      tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                      tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, s_names[level], who);
    va_list args;
    va_start (args, fmt);
    n += vsnprintf (line + n, sizeof line - (size_t) n - 1, fmt, args);
    va_end (args);
    if (n > (int) sizeof line - 2)
        n = (int) sizeof line - 2;
    line[n++] = '\n';
    ssize_t rc = write (STDERR_FILENO, line, (size_t) n);
    (void) rc;      /* nowhere left to report a failed log write */
}
