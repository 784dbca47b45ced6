/* error.c: the pending error of each thread (core/internal.h).
 *
 * One message per thread, kept in C11 thread-local storage so that a failure
 * on one thread (a communicator's progress thread, a data loader) never
 * overwrites or clears the report of another. The first message wins until
 * moe_error_clear: the innermost failure knows what went wrong, and callers
 * that add their own moe_error_set on the way up would only blur it.
 *
 * The trace is the path the failure took, one "stmt (file:line)" line per
 * MOE_TRY that passed it up, innermost first. Both buffers are fixed-size and
 * never allocate, so reporting "out of memory" cannot itself fail; a message
 * that does not fit is cut and ends in "...", a trace that does not fit keeps
 * its innermost lines and says how many it dropped. A message longer than its
 * buffer keeps its words: the longest quoted values and long unbroken tokens
 * (paths, command lines) are shortened in the middle ("abc...xyz") until it
 * fits, so "cannot create '<5,000 characters>': File name too long" still
 * ends in the reason; only if that is not enough (or the full text cannot be
 * formatted for lack of memory) is the end cut, marked "...".
 *
 * Not a logger: nothing here prints. main() (or the trainer) decides where the
 * message goes.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

#define MOE_ERROR_MSG_CAP 1024
#define MOE_ERROR_TRACE_CAP 4096

typedef struct moe_error_state {
    int has_message;
    char message[MOE_ERROR_MSG_CAP];
    size_t trace_len;
    int trace_dropped;
    char trace[MOE_ERROR_TRACE_CAP + 64]; /* entries use the first CAP bytes; the rest, the "dropped" note */
} moe_error_state;

static _Thread_local moe_error_state moe_err_tls;

/* Spans worth shortening: the inside of single or double quotes, and runs of
 * non-space characters. Writes the longest one of s[0..n) to start and len. */
static void longest_span(const char *s, size_t n, size_t *start, size_t *len)
{
    *start = *len = 0;
    for (size_t i = 0; i < n;) {
        size_t b, l;
        if ((s[i] == '\'' || s[i] == '"') && memchr(s + i + 1, s[i], n - i - 1)) {
            const char *close = memchr(s + i + 1, s[i], n - i - 1);
            b = i + 1;
            l = (size_t)(close - (s + b));
            i = (size_t)(close - s) + 1;
        } else if (s[i] != ' ') {
            b = i;
            while (i < n && s[i] != ' ' && s[i] != '\'' && s[i] != '"')
                i++;
            l = i - b;
        } else {
            i++;
            continue;
        }
        if (l > *len) {
            *start = b;
            *len = l;
        }
    }
}

/* Fits the n-byte message `full` (modified) into out[cap]: see the top. */
static void shorten_into(char *full, size_t n, char *out, size_t cap)
{
    const size_t keep_min = 48; /* what is left of a shortened value */
    while (n + 1 > cap) {
        size_t b, l;
        longest_span(full, n, &b, &l);
        if (l <= keep_min + 3)
            break;
        size_t excess = n + 1 - cap;
        size_t keep = l > excess + 3 + keep_min ? l - excess - 3 : keep_min;
        size_t head = keep / 2, tail = keep - head;
        /* full[b..b+l) -> head bytes, "...", tail bytes */
        memmove(full + b + head + 3, full + b + l - tail, n - (b + l - tail) + 1);
        memcpy(full + b + head, "...", 3);
        n = n - l + keep + 3;
    }
    if (n + 1 > cap) {
        memcpy(out, full, cap - 4);
        memcpy(out + cap - 4, "...", 4);
    } else {
        memcpy(out, full, n + 1);
    }
}

moe_status moe_error_setv(moe_status st, const char *fmt, va_list ap)
{
    moe_error_state *e = &moe_err_tls;
    if (st == MOE_OK || fmt == NULL || e->has_message)
        return st;
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(e->message, sizeof e->message, fmt, ap);
    if (n < 0) {
        snprintf(e->message, sizeof e->message, "%s (the error message could not be formatted)",
                 moe_status_name(st));
    } else if ((size_t)n >= sizeof e->message) {
        char *full = malloc((size_t)n + 1);
        if (full && vsnprintf(full, (size_t)n + 1, fmt, aq) == n)
            shorten_into(full, (size_t)n, e->message, sizeof e->message);
        else
            memcpy(e->message + sizeof e->message - 4, "...", 4);
        free(full);
    }
    va_end(aq);
    e->has_message = 1;
    return st;
}

moe_status moe_error_set(moe_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moe_status r = moe_error_setv(st, fmt, ap);
    va_end(ap);
    return r;
}

const char *moe_error_message(void)
{
    return moe_err_tls.has_message ? moe_err_tls.message : "";
}

/* __FILE__ may be absolute; its last two components ("core/runtime.c") say enough */
static const char *short_path(const char *file)
{
    if (!file)
        return "?";
    const char *last = strrchr(file, '/');
    if (!last)
        return file;
    const char *p = last;
    while (p > file && p[-1] != '/')
        p--;
    return p;
}

void moe_error_trace(const char *stmt, const char *file, int line)
{
    moe_error_state *e = &moe_err_tls;
    if (e->trace_dropped) {
        e->trace_dropped++;
        return;
    }
    const char *shown = short_path(file);
    char entry[512];
    int n = snprintf(entry, sizeof entry, "%s%s (%s:%d)", e->trace_len ? "\n" : "", stmt ? stmt : "?", shown,
                     line);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof entry ? (size_t)n : sizeof entry - 1;
    if (e->trace_len + len + 1 > MOE_ERROR_TRACE_CAP) {
        e->trace_dropped = 1;
        return;
    }
    memcpy(e->trace + e->trace_len, entry, len + 1);
    e->trace_len += len;
}

const char *moe_error_trace_text(void)
{
    moe_error_state *e = &moe_err_tls;
    if (e->trace_dropped) /* after the entries, which no longer grow */
        snprintf(e->trace + e->trace_len, sizeof e->trace - e->trace_len, "\n(%d outer trace entries dropped)",
                 e->trace_dropped);
    return e->trace;
}

void moe_error_clear(void)
{
    moe_error_state *e = &moe_err_tls;
    e->has_message = 0;
    e->message[0] = '\0';
    e->trace_len = 0;
    e->trace_dropped = 0;
    e->trace[0] = '\0';
}

const char *moe_status_name(moe_status st)
{
    switch (st) {
    case MOE_OK: return "MOE_OK";
    case MOE_ERR_INVALID_ARG: return "MOE_ERR_INVALID_ARG";
    case MOE_ERR_NOMEM: return "MOE_ERR_NOMEM";
    case MOE_ERR_IO: return "MOE_ERR_IO";
    case MOE_ERR_PLUGIN: return "MOE_ERR_PLUGIN";
    case MOE_ERR_UNSUPPORTED: return "MOE_ERR_UNSUPPORTED";
    case MOE_ERR_BACKEND: return "MOE_ERR_BACKEND";
    case MOE_ERR_COMM: return "MOE_ERR_COMM";
    case MOE_ERR_OVERFLOW: return "MOE_ERR_OVERFLOW";
    case MOE_ERR_MIN_SCALE: return "MOE_ERR_MIN_SCALE";
    case MOE_ERR_INTERNAL: return "MOE_ERR_INTERNAL";
    }
    return "MOE_ERR_UNKNOWN";
}

int moe_error_report(const char *prog, moe_status st, int usage_error)
{
    const char *msg = moe_error_message();
    fprintf(stderr, "%s: error: %s\n", prog, msg && *msg ? msg : moe_status_name(st));
    const char *trace = moe_error_trace_text();
    if (getenv("MOE_DEBUG") && trace && *trace)
        fprintf(stderr, "%s\n", trace);
    return usage_error ? 2 : 1;
}
