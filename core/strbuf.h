/* strbuf.h: a growing NUL-terminated string, for building log lines and
 * tool output piece by piece.
 *
 * An allocation failure sets `failed` and turns every later call into a
 * no-op, so callers check once at the end (and print nothing rather than a
 * truncated line). Start from {0}; free(b.p) when done.
 */
#ifndef MOE_CORE_STRBUF_H
#define MOE_CORE_STRBUF_H

#include <stdarg.h>
#include <stddef.h>

typedef struct moe_strbuf {
    char *p;       /* NULL until something is written */
    size_t len, cap;
    int failed;
} moe_strbuf;

void moe_sb_putn(moe_strbuf *b, const char *s, size_t n);
void moe_sb_puts(moe_strbuf *b, const char *s);
void moe_sb_vprintf(moe_strbuf *b, const char *fmt, va_list ap);
void moe_sb_printf(moe_strbuf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif
