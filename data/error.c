/* error.c: the data library's per-thread error message (data/error.h). */
#include "data/error.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char data_msg[2048];

moe_status moe_data_fail(moe_status st, const char *fmt, ...)
{
    if (data_msg[0] == '\0') {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(data_msg, sizeof data_msg, fmt, ap);
        va_end(ap);
    }
    return st;
}

const char *moe_data_error(void) { return data_msg; }

void moe_data_clear_error(void) { data_msg[0] = '\0'; }
