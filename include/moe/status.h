/* status.h: status codes and the check macros used everywhere in moelm.
 *
 * Every fallible function returns a moe_status. The first failure records a
 * one-line message (what was expected, what was found, what to do) with
 * moe_error_set(); callers pass the status up with MOE_TRY so that control flow
 * stays visible at the call site. Only main() and test programs exit.
 * This header declares; the core (core/error.c) defines. Plugins reach the same
 * functions through the host services (host->error), never by linking the core.
 */
#ifndef MOE_STATUS_H
#define MOE_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERR_INVALID_ARG,  /* bad value from the user or a caller */
    MOE_ERR_NOMEM,        /* host or device allocation failed */
    MOE_ERR_IO,           /* file or socket */
    MOE_ERR_PLUGIN,       /* plugin not found, failed to load, wrong ABI */
    MOE_ERR_UNSUPPORTED,  /* valid request this component does not implement */
    MOE_ERR_BACKEND,      /* compute backend failure (CUDA, cuBLAS, ...) */
    MOE_ERR_COMM,         /* communicator failure or timeout */
    MOE_ERR_OVERFLOW,     /* gradient overflow (handled by the trainer) */
    MOE_ERR_MIN_SCALE,    /* loss scale reached --min-loss-scale */
    MOE_ERR_INTERNAL      /* a bug: an invariant did not hold */
} moe_status;

#define MOE_STATUS_COUNT 11

/* Where a failure passed through. The core defines MOE_TRACE (core/internal.h)
 * to append "statement (file:line)" to the error's trace, printed at debug log
 * level; elsewhere it is a no-op unless the includer defines it first. */
#ifndef MOE_TRACE
#define MOE_TRACE(stmt, file, line) ((void)0)
#endif

/* Evaluate a moe_status expression; on failure return it from the caller. */
#define MOE_TRY(expr)                                   \
    do {                                                \
        moe_status moe_try_s_ = (expr);                 \
        if (moe_try_s_ != MOE_OK) {                     \
            MOE_TRACE(#expr, __FILE__, __LINE__);       \
            return moe_try_s_;                          \
        }                                               \
    } while (0)

/* Same, but store the status in `st` and jump to `label` (cleanup paths). */
#define MOE_TRY_GOTO(st, expr, label)                   \
    do {                                                \
        (st) = (expr);                                  \
        if ((st) != MOE_OK) {                           \
            MOE_TRACE(#expr, __FILE__, __LINE__);       \
            goto label;                                 \
        }                                               \
    } while (0)

#ifdef __cplusplus
}
#endif

#endif
