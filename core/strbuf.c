/* strbuf.c: see strbuf.h. */
#include "core/strbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void reserve(moe_strbuf *b, size_t extra)
{
    if (b->failed || b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->failed = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

void moe_sb_putn(moe_strbuf *b, const char *s, size_t n)
{
    reserve(b, n);
    if (b->failed)
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void moe_sb_puts(moe_strbuf *b, const char *s) { moe_sb_putn(b, s, strlen(s)); }

void moe_sb_vprintf(moe_strbuf *b, const char *fmt, va_list ap)
{
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(NULL, 0, fmt, aq);
    va_end(aq);
    if (n < 0) {
        b->failed = 1;
        return;
    }
    reserve(b, (size_t)n);
    if (b->failed)
        return;
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
}

void moe_sb_printf(moe_strbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moe_sb_vprintf(b, fmt, ap);
    va_end(ap);
}
