/* internal.h: what core files share with each other and nothing else.
 *
 * Not installed, not visible to plugins (they get moe_host). Defines MOE_TRACE
 * so MOE_TRY in core code records the path a failure took.
 */
#ifndef MOE_CORE_INTERNAL_H
#define MOE_CORE_INTERNAL_H

#include <stdarg.h>
#include <stdio.h>

void moe_error_trace(const char *stmt, const char *file, int line);
#undef MOE_TRACE
#define MOE_TRACE(stmt, file, line) moe_error_trace((stmt), (file), (line))

#include "moe/plugin.h"
#include "moe/status.h"

/* ---- errors (core/error.c) ----
 * One pending error message per thread. moe_error_set formats it and returns
 * `st`; the first message wins until moe_error_clear. */
moe_status moe_error_set(moe_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
moe_status moe_error_setv(moe_status st, const char *fmt, va_list ap);
const char *moe_error_message(void);   /* "" if none */
const char *moe_error_trace_text(void);/* newline-separated "stmt (file:line)" */
void moe_error_clear(void);
const char *moe_status_name(moe_status st);
/* What every executable does with a failure: prints "<prog>: error: <the
 * pending message>" on stderr (and the trace with MOE_DEBUG set), returns
 * the exit status, 2 for command-line mistakes and 1 for the rest. */
int moe_error_report(const char *prog, moe_status st, int usage_error);

#endif
