/* log.c: the one logger (core/log.h): fairseq's line format, levels, the rank
 * rule, the stats lines in json / simple / none, fairseq's number format and
 * the live progress line.
 *
 * Lines are Python logging's "%(asctime)s | %(levelname)s | %(name)s |
 * %(message)s" with datefmt "%Y-%m-%d %H:%M:%S" in local time, as fairseq's
 * train.py configures it, so a fairseq log parser reads them unchanged.
 *
 * Stats lines follow fairseq/logging/progress_bar.py:
 *  - json (JsonProgressBar): json.dumps of an ordered dict, "epoch" an int,
 *    "update" a float printed with Python's repr, every other value a string.
 *    The object is built and dumped with jansson (insertion order kept,
 *    separators ", " and ": " as Python's defaults); its escapes are then made
 *    Python's (lower-case hex, DEL escaped), so the bytes are those of Python.
 *  - simple (SimpleProgressBar): an inner line (update given) is
 *    "epoch 001:     13 / 3125 loss=20.714, ups=0.25"; an end-of-epoch or
 *    validation line (no update) is "epoch 001 | loss 20.714 | ups 0.25".
 *    fairseq's print() adds the "<tag>_" key prefix only in json, so simple
 *    lines drop it from keys that carry it.
 *  - none (NoopProgressBar): no stats lines; ordinary lines still print.
 * `update` may be given two ways: a JSON number literal ("0.004"), used as
 * is, or the iterator position "i+1/len" ("13/3125"), from which the json
 * value round(epoch - 1 + (i+1)/len, 3) and the simple "   13 / 3125" are
 * both derived exactly as fairseq does. Only the second form carries what the
 * simple inner line needs; with a literal it prints "update 0.004" instead.
 *
 * Live progress is a terminal nicety, not a log: when the log stream is a
 * terminal, or else stderr is one (and the format is not none, and this rank
 * prints INFO), one line there is
 * rewritten in place with "\r" + erase-line, cut to the terminal width so the
 * rewrite stays on one row. A log line erases it first and redraws it after,
 * so it stays at the bottom; nothing of it reaches a file or a pipe.
 *
 * --log-file: every line (stats lines included, never the live progress) is
 * also appended to the file, in the same format; fairseq copies only its
 * train.py logger's messages there.
 *
 * Not thread-safe against moe_log_configure: configure before threads start.
 * Lines from several threads are written whole (flockfile), never interleaved.
 */
#include "core/log.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/strbuf.h"

#define MOE_PROGRESS_CAP 512

static struct {
    FILE *out; /* NULL: stderr, looked up at use so the default needs no constructor */
    int rank, world;
    moe_log_level min_level;
    moe_log_format fmt;
    int progress_shown;
    char progress[MOE_PROGRESS_CAP];
    FILE *copy; /* --log-file: every line also appended here, or NULL */
} g_log = {NULL, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE, 0, {0}, NULL};

static FILE *log_out(void)
{
    return g_log.out ? g_log.out : stderr;
}

void moe_log_configure(FILE *out, int rank, int world, moe_log_level min_level, moe_log_format fmt)
{
    moe_progress_clear();
    g_log.out = out;
    g_log.rank = rank < 0 ? 0 : rank;
    g_log.world = world < 1 ? 1 : world;
    g_log.min_level = min_level;
    g_log.fmt = fmt;
}

moe_status moe_log_open_file(const char *path)
{
    moe_log_close_file();
    if (!path || !*path)
        return MOE_OK;
    FILE *f = fopen(path, "a");
    if (!f)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--log-file '%s': expected a file that can be appended to, found that it cannot be "
                             "opened (%s); pass another path",
                             path, strerror(errno));
    g_log.copy = f;
    return MOE_OK;
}

void moe_log_close_file(void)
{
    if (g_log.copy)
        fclose(g_log.copy);
    g_log.copy = NULL;
}

moe_log_format moe_log_get_format(void)
{
    return g_log.fmt;
}

moe_status moe_log_parse_format(const char *s, moe_log_format *fmt)
{
    if (!fmt)
        return moe_error_set(MOE_ERR_INTERNAL, "moe_log_parse_format: expected an output pointer, got NULL");
    /* fairseq's default (None) is tqdm, which is simple when not on a terminal;
     * the live line below is this logger's tqdm, so tqdm and simple coincide */
    if (!s || strcmp(s, "simple") == 0 || strcmp(s, "tqdm") == 0) {
        *fmt = MOE_LOG_FORMAT_SIMPLE;
        return MOE_OK;
    }
    if (strcmp(s, "json") == 0) {
        *fmt = MOE_LOG_FORMAT_JSON;
        return MOE_OK;
    }
    if (strcmp(s, "none") == 0) {
        *fmt = MOE_LOG_FORMAT_NONE;
        return MOE_OK;
    }
    return moe_error_set(MOE_ERR_INVALID_ARG,
                         "--log-format: expected one of json, simple, none, tqdm; found '%s'. Pass one of those.",
                         s);
}

/* Rank 0 prints from min_level up; other ranks only warnings and errors. */
static int level_passes(moe_log_level level)
{
    if (level < g_log.min_level)
        return 0;
    return g_log.rank == 0 || level >= MOE_LOG_WARNING;
}

static const char *level_name(moe_log_level level)
{
    switch (level) {
    case MOE_LOG_DEBUG: return "DEBUG";
    case MOE_LOG_INFO: return "INFO";
    case MOE_LOG_WARNING: return "WARNING";
    case MOE_LOG_ERROR: return "ERROR";
    }
    return "INFO";
}

/* ------------------------------------------------------------ line output */

static void erase_line(FILE *out)
{
    fputs("\r\033[K", out);
}

/* Where the live progress line goes: the log stream when it is a terminal,
 * else stderr when that is one (logs redirected to a file), else nowhere. */
static FILE *progress_out(void)
{
    FILE *out = log_out();
    if (isatty(fileno(out)))
        return out;
    return isatty(fileno(stderr)) ? stderr : NULL;
}

static void write_line(moe_log_level level, const char *component, const char *message)
{
    FILE *out = log_out(), *pout = g_log.progress_shown ? progress_out() : NULL;
    char stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    if (localtime_r(&now, &tm) == NULL || strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm) == 0)
        snprintf(stamp, sizeof stamp, "0000-00-00 00:00:00");
    char rank_prefix[32] = "";
    if (g_log.rank != 0)
        snprintf(rank_prefix, sizeof rank_prefix, "[rank %d] ", g_log.rank);

    flockfile(out);
    if (pout) {
        erase_line(pout);
        fflush(pout);
    }
    fprintf(out, "%s | %s | %s%s | %s\n", stamp, level_name(level), rank_prefix, component ? component : "moelm",
            message);
    fflush(out);
    if (g_log.copy) { /* one write per line, so ranks appending to one file do not interleave within lines */
        fprintf(g_log.copy, "%s | %s | %s%s | %s\n", stamp, level_name(level), rank_prefix,
                component ? component : "moelm", message);
        fflush(g_log.copy);
    }
    if (pout) {
        fputs(g_log.progress, pout);
        fflush(pout);
    }
    funlockfile(out);
}

void moe_logv(moe_log_level level, const char *component, const char *fmt, va_list ap)
{
    if (!level_passes(level) || !fmt)
        return;
    moe_strbuf b = {0};
    moe_sb_vprintf(&b, fmt, ap);
    if (!b.failed)
        write_line(level, component, b.p ? b.p : "");
    else
        write_line(level, component, "(log message lost: out of host memory)");
    free(b.p);
}

void moe_log(moe_log_level level, const char *component, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moe_logv(level, component, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------ Python numbers */

/* Python's round(x, ndigits) for ndigits >= 0: the decimal correctly rounded
 * from the exact binary value, exact ties to even, read back as a double.
 * glibc's printf rounds exactly that way in the default rounding mode. */
static double py_round(double x, int ndigits)
{
    if (!isfinite(x) || x == 0.0)
        return x;
    if (ndigits > 323 || fabs(x) >= 9007199254740992.0) /* nothing left to round */
        return x;
    char buf[400];
    snprintf(buf, sizeof buf, "%.*f", ndigits, x);
    return strtod(buf, NULL);
}

void moe_format_pyfloat(char *buf, size_t size, double v)
{
    if (size == 0)
        return;
    if (isnan(v)) {
        snprintf(buf, size, "nan");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, size, "%sinf", v < 0 ? "-" : "");
        return;
    }
    /* shortest %e form that reads back as the same double */
    char e[40];
    for (int prec = 0; prec < 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec, v);
        if (strtod(e, NULL) == v)
            break;
    }
    /* split "-d.ddde+XX" into sign, digits and decimal exponent */
    const char *p = e;
    int neg = *p == '-';
    if (neg)
        p++;
    char digits[24];
    int nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9' && nd < (int)sizeof digits - 1)
            digits[nd++] = *p;
    digits[nd] = '\0';
    int exp10 = *p == 'e' ? atoi(p + 1) : 0;
    while (nd > 1 && digits[nd - 1] == '0') /* %e pads nothing, but be safe */
        digits[--nd] = '\0';

    char out[64];
    size_t o = 0;
    if (neg)
        out[o++] = '-';
    if (v == 0.0) {
        snprintf(out + o, sizeof out - o, "0.0");
    } else if (exp10 < -4 || exp10 >= 16) {
        /* Python: d[.ddd]e[+-]XX with at least two exponent digits */
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++)
                out[o++] = digits[i];
        }
        snprintf(out + o, sizeof out - o, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
    } else if (exp10 < 0) {
        out[o++] = '0';
        out[o++] = '.';
        for (int i = 0; i < -exp10 - 1; i++)
            out[o++] = '0';
        for (int i = 0; i < nd; i++)
            out[o++] = digits[i];
        out[o] = '\0';
    } else {
        for (int i = 0; i <= exp10; i++)
            out[o++] = i < nd ? digits[i] : '0';
        out[o++] = '.';
        if (nd > exp10 + 1)
            for (int i = exp10 + 1; i < nd; i++)
                out[o++] = digits[i];
        else
            out[o++] = '0';
        out[o] = '\0';
    }
    snprintf(buf, size, "%s", out);
}

void moe_format_stat(char *buf, size_t size, double value, int digits)
{
    if (!buf || size == 0)
        return;
    double v = digits >= 0 ? py_round(value, digits) : value;
    /* C's %g is Python's '{:g}' (6 significant digits, trailing zeros cut,
     * exponent of at least two digits); only NaN's sign differs */
    if (isnan(v))
        snprintf(buf, size, "nan");
    else
        snprintf(buf, size, "%g", v);
}

/* ------------------------------------------------------------ stats lines */

/* A JSON number literal, as json.loads would accept it. */
static int is_json_number(const char *s)
{
    const char *p = s;
    if (*p == '-')
        p++;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (isdigit((unsigned char)*p))
            p++;
    else
        return 0;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return 0;
        while (isdigit((unsigned char)*p))
            p++;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!isdigit((unsigned char)*p))
            return 0;
        while (isdigit((unsigned char)*p))
            p++;
    }
    return *p == '\0';
}

/* "13/3125" -> pos 13, len 3125 */
static int parse_position(const char *s, long long *pos, long long *len)
{
    char *end;
    if (!isdigit((unsigned char)*s))
        return 0;
    *pos = strtoll(s, &end, 10);
    if (*end != '/' || !isdigit((unsigned char)end[1]))
        return 0;
    *len = strtoll(end + 1, &end, 10);
    return *end == '\0' && *len > 0;
}

/* jansson rejects strings that are not UTF-8; Python would have escaped
 * whatever the bytes decoded to. Replace the offending bytes with '?'. */
static json_t *json_string_lenient(const char *s)
{
    json_t *j = json_string(s);
    if (j)
        return j;
    size_t n = strlen(s);
    char *copy = malloc(n + 1);
    if (!copy)
        return NULL;
    for (size_t i = 0; i <= n; i++)
        copy[i] = (unsigned char)s[i] >= 0x80 ? '?' : s[i];
    j = json_string(copy);
    free(copy);
    return j;
}

/* Make jansson's escapes Python's: "\u00E9" -> "\u00e9", raw DEL -> "\u007f".
 * Escapes are read left to right, so "\\u" (an escaped backslash) is skipped. */
static void json_pythonize(moe_strbuf *b, const char *s)
{
    for (const char *p = s; *p; p++) {
        if (*p == '\\' && p[1] == 'u') {
            char esc[7] = {'\\', 'u', 0, 0, 0, 0, 0};
            for (int i = 0; i < 4 && p[2 + i]; i++)
                esc[2 + i] = (char)tolower((unsigned char)p[2 + i]);
            moe_sb_puts(b, esc);
            p += 1 + strlen(esc + 2);
        } else if (*p == '\\' && p[1]) {
            moe_sb_putn(b, p, 2);
            p++;
        } else if (*p == 0x7f) {
            moe_sb_puts(b, "\\u007f");
        } else {
            moe_sb_putn(b, p, 1);
        }
    }
}

static void stats_json(moe_strbuf *b, int epoch, const char *update, const moe_stat_kv *kv, int n)
{
    moe_sb_puts(b, "{");
    int first = 1;
    if (epoch > 0) {
        moe_sb_printf(b, "\"epoch\": %d", epoch);
        first = 0;
    }
    long long pos, len;
    if (update && parse_position(update, &pos, &len)) {
        if (epoch > 0) { /* fairseq: update is None when epoch is */
            char num[64];
            double u = (double)(epoch - 1) + (double)pos / (double)len;
            moe_format_pyfloat(num, sizeof num, py_round(u, 3));
            moe_sb_printf(b, ", \"update\": %s", num);
        }
    } else if (update) {
        moe_sb_printf(b, "%s\"update\": ", first ? "" : ", ");
        if (is_json_number(update)) {
            moe_sb_puts(b, update);
        } else {
            json_t *j = json_string_lenient(update);
            char *t = j ? json_dumps(j, JSON_ENCODE_ANY | JSON_ENSURE_ASCII) : NULL;
            json_pythonize(b, t ? t : "null");
            free(t);
            json_decref(j);
        }
        first = 0;
    }
    json_t *obj = json_object();
    if (!obj) {
        b->failed = 1;
        return;
    }
    for (int i = 0; i < n; i++) {
        json_t *v = json_string_lenient(kv[i].value);
        char key[sizeof kv[i].key + 1];
        snprintf(key, sizeof key, "%s", kv[i].key);
        for (char *k = key; *k; k++)
            if ((unsigned char)*k >= 0x80)
                *k = '?';
        if (!v || json_object_set_new(obj, key, v) != 0)
            b->failed = 1;
    }
    char *text = json_dumps(obj, JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII);
    json_decref(obj);
    if (!text) {
        b->failed = 1;
        return;
    }
    size_t tl = strlen(text);
    if (tl > 2) { /* "{...}" -> "..." */
        text[tl - 1] = '\0';
        if (!first)
            moe_sb_puts(b, ", ");
        json_pythonize(b, text + 1);
    }
    free(text);
    moe_sb_puts(b, "}");
}

/* Python's str.strip() for the value strings */
static void put_stripped(moe_strbuf *b, const char *s)
{
    while (*s && isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        n--;
    moe_sb_putn(b, s, n);
}

static void stats_simple(moe_strbuf *b, const char *tag, int epoch, const char *update, const moe_stat_kv *kv, int n)
{
    char prefix[32] = "";
    if (epoch > 0)
        snprintf(prefix, sizeof prefix, "epoch %03d", epoch);
    if (update) {
        long long pos, len;
        if (parse_position(update, &pos, &len))
            moe_sb_printf(b, "%s:  %5lld / %lld ", prefix, pos, len);
        else
            moe_sb_printf(b, "%s:  update %s ", prefix, update);
        for (int i = 0; i < n; i++) {
            moe_sb_printf(b, "%s%s=", i ? ", " : "", kv[i].key);
            put_stripped(b, kv[i].value);
        }
        return;
    }
    /* fairseq's validation progress bar carries the subset in its prefix */
    if (tag && strcmp(tag, "train") != 0 && strcmp(tag, "train_inner") != 0)
        moe_sb_printf(b, "%s%svalid on '%s' subset | ", prefix, *prefix ? " | " : "", tag);
    else
        moe_sb_printf(b, "%s | ", prefix);
    size_t tag_len = tag ? strlen(tag) : 0;
    for (int i = 0; i < n; i++) {
        const char *key = kv[i].key;
        if (tag_len && strncmp(key, tag, tag_len) == 0 && key[tag_len] == '_' && key[tag_len + 1])
            key += tag_len + 1;
        moe_sb_printf(b, "%s%s ", i ? " | " : "", key);
        put_stripped(b, kv[i].value);
    }
}

void moe_log_stats(const char *tag, int epoch, const char *update, const moe_stat_kv *kv, int n)
{
    if (g_log.fmt == MOE_LOG_FORMAT_NONE || !level_passes(MOE_LOG_INFO))
        return;
    if (!kv || n < 0)
        n = 0;
    moe_strbuf b = {0};
    if (g_log.fmt == MOE_LOG_FORMAT_JSON)
        stats_json(&b, epoch, update, kv, n);
    else
        stats_simple(&b, tag, epoch, update, kv, n);
    const char *component = tag ? tag : "fairseq.logging.progress_bar";
    if (b.failed || !b.p)
        write_line(MOE_LOG_WARNING, component, "(stats line lost: out of host memory)");
    else
        write_line(MOE_LOG_INFO, component, b.p);
    free(b.p);
}

double moe_mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double moe_wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------ live progress */

static int terminal_columns(FILE *out)
{
    struct winsize ws;
    if (ioctl(fileno(out), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    return 80;
}

void moe_progress_update(const char *text)
{
    FILE *out = progress_out();
    if (!text || g_log.fmt == MOE_LOG_FORMAT_NONE || !level_passes(MOE_LOG_INFO) || !out)
        return;
    /* one row: no line breaks, and short of the last column so no wrap */
    size_t max = (size_t)terminal_columns(out) - 1;
    if (max >= sizeof g_log.progress)
        max = sizeof g_log.progress - 1;
    flockfile(out);
    size_t n = 0;
    for (const char *p = text; *p && n < max; p++)
        g_log.progress[n++] = (*p == '\n' || *p == '\r') ? ' ' : *p;
    g_log.progress[n] = '\0';
    erase_line(out);
    fputs(g_log.progress, out);
    fflush(out);
    g_log.progress_shown = 1;
    funlockfile(out);
}

void moe_progress_clear(void)
{
    FILE *out = progress_out();
    if (!out) {
        g_log.progress_shown = 0;
        return;
    }
    flockfile(out);
    if (g_log.progress_shown) {
        erase_line(out);
        fflush(out);
        g_log.progress_shown = 0;
        g_log.progress[0] = '\0';
    }
    funlockfile(out);
}
