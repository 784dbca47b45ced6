/* route_common.h: what every backend's routing shares, so cpu and cuda
 * refuse the same requests with the same words and compute the histogram
 * metrics with the same arithmetic:
 *  - moe_route_args_problem: the validation of moe_route_args (host code;
 *    each backend reports the message through its own error path and checks
 *    its workspace itself);
 *  - moe_route_hist_metrics: unused count, top and bottom sums of one argmax
 *    histogram (FAIRSEQ_SPEC.md §2.2 step 15), host or device (MOE_HD);
 *  - moe_route_gumbel: the sampling policy's noise, so route_forward and the
 *    decoding gate (gate_topk_forward) draw the same values.
 * Definitions live here for the reason kernels/philox.h gives: the same code
 * compiles as C for the cpu backend and as CUDA for the cuda one.
 */
#ifndef MOE_KERNELS_ROUTE_COMMON_H
#define MOE_KERNELS_ROUTE_COMMON_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/philox.h" /* MOE_HD */
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

/* Gumbel(0, 1) noise of the sampling policy for logit e of the token drawn
 * at index `tok` (s, or moe_route_args.noise_index[s]): -log(-log(u)) in
 * double, u = philox_uniform(seed, stream, tok*E + e) kept within
 * [FLT_MIN, 1 - FLT_EPSILON], the range torch's Gumbel draws from. */
MOE_HD float moe_route_gumbel(uint64_t seed, uint64_t stream, int64_t tok, int E, int e)
{
    float u = moe_philox_uniform(seed, stream, (uint64_t)(tok * E + e));
    if (u < FLT_MIN)
        u = FLT_MIN;
    if (u > 1.0f - FLT_EPSILON)
        u = 1.0f - FLT_EPSILON;
    return (float)-log(-log((double)u));
}

MOE_HD float moe_route_hist_percent(int64_t count, int64_t S) { return (100.0f * (float)count) / (float)S; }

/* hist: tokens per expert; sorted: E scratch entries */
MOE_HD void moe_route_hist_metrics(const int64_t *hist, int64_t *sorted, int E, int64_t S, float *unused, float *top,
                                   float *bottom)
{
    int n_unused = 0;
    for (int e = 0; e < E; e++) {
        n_unused += hist[e] == 0;
        sorted[e] = hist[e];
    }
    for (int i = 1; i < E; i++) { /* descending insertion sort; E is small */
        int64_t v = sorted[i];
        int j = i - 1;
        while (j >= 0 && sorted[j] < v) {
            sorted[j + 1] = sorted[j];
            j--;
        }
        sorted[j + 1] = v;
    }
    /* n = max(ceil(0.2 E), 1), evaluated in double as fairseq does */
    int n = (int)ceil((double)E * 0.2);
    if (n < 1)
        n = 1;
    double t = 0.0, b = 0.0;
    for (int i = 0; i < n; i++) {
        /* fairseq adds float32's smallest normal to every sorted entry */
        t += (double)(moe_route_hist_percent(sorted[i], S) + FLT_MIN);
        b += (double)(moe_route_hist_percent(sorted[E - 1 - i], S) + FLT_MIN);
    }
    *unused = (float)n_unused;
    *top = (float)t;
    *bottom = (float)b;
}

#endif
