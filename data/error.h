/* error.h: how the data library reports a failure.
 *
 * The data library (dictionary, indexed datasets, token blocks, batching,
 * GPT-2 BPE) is linked into the language_modeling task plugin and into the
 * tools, so it cannot use the core's error slot (a plugin reports through
 * moe_host). It keeps its own: one message per thread, the first one set
 * wins until moe_data_clear_error(). A fallible function returns a
 * moe_status and leaves a one-line message naming the file, the position and
 * what was expected; the caller passes it on (h->error(h, st, "%s",
 * moe_data_error())).
 */
#ifndef MOE_DATA_ERROR_H
#define MOE_DATA_ERROR_H

#include "moe/status.h"

/* Records the message (unless one is pending) and returns st. */
moe_status moe_data_fail(moe_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
const char *moe_data_error(void); /* "" when none */
void moe_data_clear_error(void);

#endif
