/* route_args.h: the validation of moe_route_args that every backend's
 * route_forward/route_backward performs, so the backends refuse exactly the
 * same requests with the same words. Host code only; each backend reports the
 * message through its own error path (and checks its workspace itself).
 * static inline because it is compiled as C for the cpu backend and as C++ for
 * the cuda one.
 */
#ifndef MOE_KERNELS_ROUTE_ARGS_H
#define MOE_KERNELS_ROUTE_ARGS_H

#include <stdint.h>
#include <stdio.h>

#include "moe/ops.h"

/* NULL if `a` is acceptable, else a one-line message in buf ("<backend> <op>: ...") */
static inline const char *moe_route_args_problem(const moe_route_args *a, const char *backend, const char *op,
                                                 char *buf, size_t size)
{
    if (a == NULL)
        snprintf(buf, size, "%s %s: expected route arguments, found NULL", backend, op);
    else if (a->k != 1 && a->k != 2)
        snprintf(buf, size, "%s %s: expected k = 1 (top-1) or 2 (top-2), found %d", backend, op, a->k);
    else if (a->E < a->k)
        snprintf(buf, size,
                 "%s %s: expected at least %d experts for top-%d gating, found E = %d; raise --moe-expert-count",
                 backend, op, a->k, a->k, a->E);
    else if (a->S < 1 || a->S > INT32_MAX)
        snprintf(buf, size, "%s %s: expected 1 <= S <= %d tokens, found S = %lld", backend, op, INT32_MAX,
                 (long long)a->S);
    else if (a->capacity < 0 || a->capacity > INT32_MAX)
        snprintf(buf, size, "%s %s: expected 0 <= capacity <= %d, found %lld", backend, op, INT32_MAX,
                 (long long)a->capacity);
    else if (a->k == 2 && a->policy != MOE_ROUTE_SAMPLING && a->policy != MOE_ROUTE_ALL &&
             a->policy != MOE_ROUTE_RANDOM)
        snprintf(buf, size, "%s %s: expected second-expert policy sampling, all or random (0..2), found %d", backend,
                 op, (int)a->policy);
    else if (a->probs == NULL || a->expert == NULL || a->slot == NULL)
        snprintf(buf, size, "%s %s: expected probs, expert and slot buffers, found NULL", backend, op);
    else
        return NULL;
    return buf;
}

#endif
