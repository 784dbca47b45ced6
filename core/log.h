/* log.h: the one logger. fairseq's line format, levels, rank prefix, the JSON
 * stats lines and the live progress line.
 *
 * Line: "YYYY-MM-DD HH:MM:SS | LEVEL | component | message" on the configured
 * stream (stderr by default, as fairseq). Rank 0 logs from INFO up with no
 * prefix; other ranks log WARNING and above with the component prefixed
 * "[rank r] ", so their lines can be told apart.
 */
#ifndef MOE_CORE_LOG_H
#define MOE_CORE_LOG_H

#include <stdarg.h>
#include <stdio.h>

#include "moe/plugin.h"

typedef enum moe_log_format { MOE_LOG_FORMAT_JSON = 0, MOE_LOG_FORMAT_SIMPLE, MOE_LOG_FORMAT_NONE } moe_log_format;

/* Defaults: stderr, rank 0 of 1, INFO, simple. */
void moe_log_configure(FILE *out, int rank, int world, moe_log_level min_level, moe_log_format fmt);
moe_log_format moe_log_get_format(void);
/* --log-file: also append every line to `path` (NULL or "": stop copying). */
moe_status moe_log_open_file(const char *path);
void moe_log_close_file(void);
moe_status moe_log_parse_format(const char *s, moe_log_format *fmt);  /* "json"|"simple"|"none"|"tqdm" */

void moe_log(moe_log_level level, const char *component, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
void moe_logv(moe_log_level level, const char *component, const char *fmt, va_list ap);

/* Stats lines (FAIRSEQ_SPEC.md §8). A stats record is an ordered list of
 * (key, already formatted value string) pairs plus the integer fields.
 * json:   <prefix> | INFO | <tag> | {"epoch": 1, "update": 0.004, "loss": "20.714", ...}
 * simple: <prefix> | INFO | <tag> | epoch 001 | loss 20.714 | ... (fairseq's SimpleProgressBar)
 * none:   nothing. */
typedef struct moe_stat_kv {
    char key[48];
    char value[32];
} moe_stat_kv;

void moe_log_stats(const char *tag, int epoch, const char *update /* "13/3125" (position) or "0.004" or NULL */,
                   const moe_stat_kv *kv, int n);

/* fairseq's format_stat for a rounded number: round to `digits` decimals,
 * then "{:g}" (6 significant digits). digits < 0: no rounding. */
void moe_format_stat(char *buf, size_t size, double value, int digits);

/* Python's repr() of a float: shortest round-trip digits, ".0" on integral
 * values, exponent form below 1e-4 and from 1e16 (64.0, 0.0001220703125,
 * 6.103515625e-05, 1e+16, inf, nan). */
void moe_format_pyfloat(char *buf, size_t size, double v);

/* Seconds on the monotonic clock (durations) and on the wall clock (event
 * times), as doubles. */
double moe_mono_s(void);
double moe_wall_s(void);

/* Live progress (only when the output is a terminal): one rewritten line,
 * cleared before the next log line. Call moe_progress_update every update. */
void moe_progress_update(const char *text);
void moe_progress_clear(void);

#endif
