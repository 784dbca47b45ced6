/* route_common.h: what every backend's routing shares, so cpu and cuda
 * refuse the same requests with the same words and compute the histogram
 * metrics and the top-k router's per-token math with the same arithmetic:
 *  - moe_route_args_problem: the validation of moe_route_args (host code;
 *    each backend reports the message through its own error path and checks
 *    its workspace itself);
 *  - moe_route_topk_token, moe_route_topk_token_backward: one token of the
 *    general top-k router (moe_route_args.topk = 1), forward and backward,
 *    host or device (MOE_HD); the backends add capacity and the sums over
 *    tokens around them;
 *  - moe_route_ec_token, moe_route_ec_token_backward: one token of
 *    expert-choice routing (moe_route_args.expert_choice = 1), forward
 *    (scores, entropy, preference histograms; the backends select) and
 *    backward;
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

/* most groups of group-limited routing: the chosen groups are a 64-bit mask */
#define MOE_ROUTE_MAX_GROUPS 64

/* columns of expert/slot/weight */
MOE_HD int moe_route_width(const moe_route_args *a) { return a->width > 0 ? a->width : 2; }

/* exp of a float, correctly rounded on both backends (glibc's expf is, CUDA's
 * expf is not, by up to 2 ulp): the choices compare probabilities exactly,
 * and expert choice ranks thousands of near-equal ones, so an ulp would
 * move a token across an expert's capacity on one backend only */
MOE_HD float moe_route_exp(float x) { return (float)exp((double)x); }

/* the top-k router's fields; NULL if acceptable */
static inline const char *moe_route_topk_problem(const moe_route_args *a, const char *backend, const char *op,
                                                 char *buf, size_t size)
{
    const int G = a->num_groups;
    if (a->E < 1 || a->k < 1 || a->k > a->E)
        snprintf(buf, size, "%s %s: expected 1 <= k <= E for top-k routing, found k = %d, E = %d", backend, op, a->k,
                 a->E);
    else if (moe_route_width(a) < a->k)
        snprintf(buf, size,
                 "%s %s: expected routing buffers of at least k = %d columns (moe_route_args.width), found %d",
                 backend, op, a->k, moe_route_width(a));
    else if (a->score != MOE_SCORE_SOFTMAX && a->score != MOE_SCORE_SIGMOID)
        snprintf(buf, size, "%s %s: expected score function softmax or sigmoid (0..1), found %d", backend, op,
                 (int)a->score);
    else if (a->aux != MOE_AUX_BATCH && a->aux != MOE_AUX_SEQ && a->aux != MOE_AUX_NONE)
        snprintf(buf, size, "%s %s: expected aux loss type batch, seq or none (0..2), found %d", backend, op,
                 (int)a->aux);
    else if (a->aux == MOE_AUX_SEQ && (a->seq_len < 1 || a->S % a->seq_len != 0))
        snprintf(buf, size,
                 "%s %s: expected a sequence length dividing the %lld tokens for the per-sequence aux loss, found "
                 "seq_len = %lld",
                 backend, op, (long long)a->S, (long long)a->seq_len);
    else if (!(a->z_loss_coeff >= 0.0f) || isinf(a->z_loss_coeff))
        snprintf(buf, size, "%s %s: expected a finite z-loss coefficient >= 0, found %g", backend, op,
                 (double)a->z_loss_coeff);
    else if (G != 0 && (G < 1 || G > MOE_ROUTE_MAX_GROUPS || a->E % G != 0))
        snprintf(buf, size, "%s %s: expected 1 <= num_groups <= %d dividing E = %d, found %d", backend, op,
                 MOE_ROUTE_MAX_GROUPS, a->E, G);
    else if (G != 0 && (a->group_topk < 1 || a->group_topk > G || a->group_topk > a->k ||
                        (int64_t)a->group_topk * (a->E / G) < a->k))
        snprintf(buf, size,
                 "%s %s: expected 1 <= group_topk <= min(num_groups, k) with group_topk * E / num_groups >= k, "
                 "found group_topk = %d (num_groups = %d, E = %d, k = %d)",
                 backend, op, a->group_topk, G, a->E, a->k);
    else if (G == 0 && a->group_topk != 0)
        snprintf(buf, size, "%s %s: expected group_topk 0 without groups, found %d", backend, op, a->group_topk);
    else if (a->normalize_before_drop || a->batch_prioritized)
        snprintf(buf, size,
                 "%s %s: expected no normalize_before_drop or batch_prioritized with top-k routing (fairseq's "
                 "top-2 options), found them set",
                 backend, op);
    else
        return NULL;
    return buf;
}

/* NULL if `a` is acceptable, else a one-line message in buf ("<backend> <op>: ...") */
static inline const char *moe_route_args_problem(const moe_route_args *a, const char *backend, const char *op,
                                                 char *buf, size_t size)
{
    if (a == NULL)
        snprintf(buf, size, "%s %s: expected route arguments, found NULL", backend, op);
    else if (a->expert_choice != 0 && (a->expert_choice != 1 || a->topk != 0))
        snprintf(buf, size, "%s %s: expected expert_choice 0 or 1, and topk 0 with it, found %d and %d", backend, op,
                 a->expert_choice, a->topk);
    else if (a->expert_choice && (a->E < 1 || moe_route_width(a) != a->E))
        snprintf(buf, size,
                 "%s %s: expected routing buffers of E = %d columns (moe_route_args.width) for expert choice, found "
                 "%d",
                 backend, op, a->E, moe_route_width(a));
    else if (a->expert_choice && (a->S < 1 || a->S > INT32_MAX || a->capacity < 1 || a->capacity > a->S))
        snprintf(buf, size, "%s %s: expected 1 <= capacity <= S <= %d for expert choice, found capacity %lld, S %lld",
                 backend, op, INT32_MAX, (long long)a->capacity, (long long)a->S);
    else if (a->expert_choice)
        return a->probs == NULL || a->expert == NULL || a->slot == NULL
                   ? (snprintf(buf, size, "%s %s: expected probs, expert and slot buffers, found NULL", backend, op),
                      buf)
                   : NULL;
    else if (a->topk != 0 && a->topk != 1)
        snprintf(buf, size, "%s %s: expected topk 0 (fairseq's top-1/top-2) or 1 (top-k), found %d", backend, op,
                 a->topk);
    else if (a->topk && moe_route_topk_problem(a, backend, op, buf, size) != NULL)
        return buf;
    else if (!a->topk && moe_route_width(a) != 2)
        snprintf(buf, size, "%s %s: expected width 0 or 2 for top-1/top-2 routing, found %d", backend, op,
                 a->width);
    else if (!a->topk && a->k != 1 && a->k != 2)
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
    else if (!a->topk && a->k == 2 && a->policy != MOE_ROUTE_SAMPLING && a->policy != MOE_ROUTE_ALL &&
             a->policy != MOE_ROUTE_RANDOM)
        snprintf(buf, size, "%s %s: expected second-expert policy sampling, all or random (0..2), found %d", backend,
                 op, (int)a->policy);
    else if (a->probs == NULL || a->expert == NULL || a->slot == NULL)
        snprintf(buf, size, "%s %s: expected probs, expert and slot buffers, found NULL", backend, op);
    else
        return NULL;
    return buf;
}

/* p = softmax(l) over E experts as fairseq's top-1/top-2 routing computes
 * it: shifted by the largest logit, expf, the sum in double, each quotient
 * rounded to float. */
MOE_HD void moe_route_softmax(const float *l, float *p, int E)
{
    float mx = l[0];
    for (int e = 1; e < E; e++)
        if (l[e] > mx)
            mx = l[e];
    double den = 0.0;
    for (int e = 0; e < E; e++) {
        p[e] = expf(l[e] - mx);
        den += (double)p[e];
    }
    for (int e = 0; e < E; e++)
        p[e] = (float)((double)p[e] / den);
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

/* ------------------------------------------------- the top-k router, per token */

/* sigmoid scores are normalised by their sum plus this for the weights and
 * the load-balancing loss (Megatron-Core's 1e-20) */
#define MOE_ROUTE_SIGMOID_EPS 1e-20

/* What one token's forward tells the caller besides what it writes. */
typedef struct moe_topk_token {
    double entropy; /* of the token's score distribution (softmax, or sigmoid / its sum) */
    double lse;     /* log sum_e exp(logits), for the z-loss (0 when z_loss_coeff is 0) */
    double norm;    /* what probs are divided by for the loss's distribution: 1, or sum sigmoid + eps */
    int first, second; /* the first two choices, pad or not (-1: none), for the histograms */
} moe_topk_token;

/* (v, i) comes after (pv, pi) in the order "score descending, index ascending" */
MOE_HD int moe_route_after(float v, int i, float pv, int pi) { return v < pv || (v == pv && i > pi); }

/* selection score: the score plus the expert's bias */
MOE_HD float moe_route_sel(const moe_route_args *a, const float *p, int e)
{
    return a->expert_bias != NULL ? p[e] + a->expert_bias[e] : p[e];
}

/* the first expert of [lo, hi), in the order above, that comes after (pv, pi)
 * and whose group is in `groups` (bit g); -1 when none */
MOE_HD int moe_route_next(const moe_route_args *a, const float *p, int lo, int hi, float pv, int pi, uint64_t groups,
                          int per_group)
{
    int best = -1;
    float bv = 0.0f;
    for (int e = lo; e < hi; e++) {
        if (!((groups >> (e / per_group)) & 1u))
            continue;
        float v = moe_route_sel(a, p, e);
        if (moe_route_after(v, e, pv, pi) && (best < 0 || moe_route_after(bv, best, v, e))) {
            best = e;
            bv = v;
        }
    }
    return best;
}

/* The groups token p may choose from (bit g): every group without
 * group-limited routing; else the group_topk groups with the largest sums
 * of their k / group_topk best selection scores (Megatron-Core's
 * group_limited_topk; DeepSeek-V3's top-2 sum at k = 8, group_topk = 4),
 * ties to the lower group. */
MOE_HD uint64_t moe_route_groups(const moe_route_args *a, const float *p)
{
    const int G = a->num_groups;
    if (G <= 1)
        return ~(uint64_t)0;
    const int n = a->E / G, m = a->k / a->group_topk;
    float gs[MOE_ROUTE_MAX_GROUPS];
    for (int g = 0; g < G; g++) {
        double sum = 0.0;
        float pv = INFINITY;
        int pi = -1;
        for (int i = 0; i < m; i++) {
            int e = moe_route_next(a, p, g * n, (g + 1) * n, pv, pi, ~(uint64_t)0, n);
            if (e < 0)
                break;
            pv = moe_route_sel(a, p, e);
            pi = e;
            sum += (double)pv;
        }
        gs[g] = (float)sum;
    }
    uint64_t chosen = 0;
    float pv = INFINITY;
    int pi = -1;
    for (int i = 0; i < a->group_topk; i++) {
        int best = -1;
        for (int g = 0; g < G; g++)
            if (moe_route_after(gs[g], g, pv, pi) && (best < 0 || moe_route_after(gs[best], best, gs[g], g)))
                best = g;
        if (best < 0)
            break;
        chosen |= (uint64_t)1 << best;
        pv = gs[best];
        pi = best;
    }
    return chosen;
}

/* One token s of the top-k router's forward:
 *   probs[s]  softmax(logits[s]) or sigmoid(logits[s]) (the scores)
 *   expert[s*W+j], j < k: the k experts of the largest selection scores
 *             (score + expert_bias), best first, ties to the lower index,
 *             within the chosen groups; -1 for pads and columns j >= k
 *   weight    the score of each choice, divided by the sum over the k
 *             choices (plus 1e-20 for sigmoid) when renormalize; 0 for pads
 *   slot      1 where an assignment claims capacity (non-pad choices), -1
 *             elsewhere; the backend's capacity pass turns claims into slots
 * and accumulates nothing. Sums over experts are in double. */
MOE_HD moe_topk_token moe_route_topk_token(const moe_route_args *a, int64_t s)
{
    const int E = a->E, k = a->k, W = moe_route_width(a);
    const float *l = a->logits + s * E;
    float *p = a->probs + s * E;
    moe_topk_token t;
    t.lse = 0.0;
    t.norm = 1.0;
    float mx = l[0];
    for (int e = 1; e < E; e++)
        if (l[e] > mx)
            mx = l[e];
    if (a->score == MOE_SCORE_SOFTMAX || a->z_loss_coeff != 0.0f) {
        double den = 0.0;
        for (int e = 0; e < E; e++) {
            float x = moe_route_exp(l[e] - mx);
            den += (double)x;
            if (a->score == MOE_SCORE_SOFTMAX)
                p[e] = x;
        }
        if (a->score == MOE_SCORE_SOFTMAX)
            for (int e = 0; e < E; e++)
                p[e] = (float)((double)p[e] / den);
        if (a->z_loss_coeff != 0.0f)
            t.lse = (double)mx + log(den);
    }
    if (a->score == MOE_SCORE_SIGMOID) {
        double sum = 0.0;
        for (int e = 0; e < E; e++) {
            p[e] = (float)(1.0 / (1.0 + exp(-(double)l[e])));
            sum += (double)p[e];
        }
        t.norm = sum + MOE_ROUTE_SIGMOID_EPS;
    }
    double h = 0.0;
    for (int e = 0; e < E; e++) {
        float q = (float)((double)p[e] / t.norm);
        /* as fairseq's entropy_gating: torch's Categorical clamps q inside the log */
        float qc = q < FLT_EPSILON ? FLT_EPSILON : (q > 1.0f - FLT_EPSILON ? 1.0f - FLT_EPSILON : q);
        h -= (double)q * log((double)qc);
    }
    t.entropy = h;

    const uint64_t groups = moe_route_groups(a, p);
    const int per_group = a->num_groups > 1 ? E / a->num_groups : E;
    const int is_pad = a->pad != NULL && a->pad[s] != 0;
    int32_t *ex = a->expert + s * W;
    float *wt = a->weight + s * W;
    int32_t *sl = a->slot + s * W;
    float pv = INFINITY;
    int pi = -1;
    double gsum = 0.0;
    t.first = t.second = -1;
    for (int j = 0; j < W; j++) {
        int e = j < k ? moe_route_next(a, p, 0, E, pv, pi, groups, per_group) : -1;
        if (e >= 0) {
            pv = moe_route_sel(a, p, e);
            pi = e;
            gsum += (double)p[e];
        }
        if (j == 0)
            t.first = e;
        if (j == 1)
            t.second = e;
        ex[j] = is_pad ? -1 : e;
        sl[j] = !is_pad && e >= 0 ? 1 : -1;
        wt[j] = !is_pad && e >= 0 ? p[e] : 0.0f;
    }
    if (a->renormalize && !is_pad) {
        const double d = gsum + (a->score == MOE_SCORE_SIGMOID ? MOE_ROUTE_SIGMOID_EPS : 0.0);
        for (int j = 0; j < k; j++)
            wt[j] = (float)((double)wt[j] / d);
    }
    return t;
}

/* One token s of the top-k router's backward: dlogits[s] (written) from
 * dweight[s] (kept choices only) and the losses.
 *   aux_scale * cnt[e]: d loss / d q[s,e] of the load-balancing loss, q the
 *     token's score distribution (probs / norm) and cnt the choices of
 *     expert e in the token's batch or sequence;
 *   z_scale: dl_aux * z_loss_coeff * 2 / S.
 * Weights: w_j = kept_j g_j (/ D with renormalize, D = sum_j g_j (+ eps),
 * over all k choices, kept or not); written as (a_j D - sum_i a_i g_i) / D^2
 * with a = kept dweight, which is exactly 0 for a single choice. */
MOE_HD void moe_route_topk_token_backward(const moe_route_args *a, int64_t s, const float *dweight, const int *cnt,
                                          double aux_scale, double z_scale, float *dlogits)
{
    const int E = a->E, k = a->k, W = moe_route_width(a);
    const float *p = a->probs + s * E;
    const int32_t *ex = a->expert + s * W, *sl = a->slot + s * W;
    const float *dw = dweight + s * W;
    const int sigmoid = a->score == MOE_SCORE_SIGMOID;
    double G = 0.0, A = 0.0;
    for (int j = 0; j < k; j++) {
        if (ex[j] < 0)
            continue;
        const double g = (double)p[ex[j]], aj = sl[j] >= 0 ? (double)dw[j] : 0.0;
        G += g;
        A += aj * g;
    }
    const double D = G + (sigmoid ? MOE_ROUTE_SIGMOID_EPS : 0.0);
    double norm = 1.0;
    if (sigmoid) {
        double sum = 0.0;
        for (int e = 0; e < E; e++)
            sum += (double)p[e];
        norm = sum + MOE_ROUTE_SIGMOID_EPS;
    }
    /* d loss / d score_e, before the aux term's normalisation (sigmoid) */
#define MOE_TOPK_DG(e, out)                                                          \
    do {                                                                             \
        out = 0.0;                                                                   \
        for (int j_ = 0; j_ < k; j_++)                                               \
            if (ex[j_] == (e)) {                                                     \
                const double a_ = sl[j_] >= 0 ? (double)dw[j_] : 0.0;               \
                out = a->renormalize ? (a_ * D - A) / (D * D) : a_;                  \
            }                                                                        \
    } while (0)
    double dot = 0.0; /* softmax: sum_e p dp; sigmoid: sum_e c_e sigma_e */
    for (int e = 0; e < E; e++) {
        const double c = aux_scale * (double)cnt[e];
        if (sigmoid) {
            dot += c * (double)p[e];
        } else {
            double dg;
            MOE_TOPK_DG(e, dg);
            dot += (double)p[e] * (dg + c);
        }
    }
    double mx = 0.0, lse = 0.0, zs = 0.0;
    if (z_scale != 0.0) {
        const float *l = a->logits + s * E;
        float m = l[0];
        for (int e = 1; e < E; e++)
            if (l[e] > m)
                m = l[e];
        double den = 0.0;
        for (int e = 0; e < E; e++)
            den += (double)moe_route_exp(l[e] - m);
        mx = (double)m;
        lse = mx + log(den);
        zs = z_scale * lse / den; /* times exp(l - m): softmax * lse * z_scale */
    }
    for (int e = 0; e < E; e++) {
        const double c = aux_scale * (double)cnt[e], pe = (double)p[e];
        double dg, dl;
        MOE_TOPK_DG(e, dg);
        if (sigmoid)
            dl = (dg + c / norm - dot / (norm * norm)) * pe * (1.0 - pe);
        else
            dl = pe * (dg + c - dot);
        if (z_scale != 0.0)
            dl += zs * (double)moe_route_exp(a->logits[s * E + e] - (float)mx);
        dlogits[s * E + e] = (float)dl;
    }
#undef MOE_TOPK_DG
}

/* ------------------------------------------------- expert choice, per token */

/* One token s of expert-choice routing before the selection: probs[s] =
 * softmax(logits[s]), and the token's row of expert/slot/weight cleared
 * (-1, -1, 0) for the selection to fill. Its entropy and first two
 * preferences (for the histograms) are the top-2 softmax router's. */
MOE_HD moe_topk_token moe_route_ec_token(const moe_route_args *a, int64_t s)
{
    moe_route_args t = *a;
    t.topk = 1;
    t.k = a->E < 2 ? a->E : 2;
    t.score = MOE_SCORE_SOFTMAX;
    t.renormalize = 0;
    t.z_loss_coeff = 0.0f;
    t.num_groups = t.group_topk = 0;
    t.expert_bias = NULL;
    t.pad = NULL;
    const moe_topk_token r = moe_route_topk_token(&t, s);
    const int E = a->E;
    for (int e = 0; e < E; e++) {
        a->expert[s * E + e] = -1;
        a->slot[s * E + e] = -1;
        a->weight[s * E + e] = 0.0f;
    }
    return r;
}

/* (v, t) goes before (pv, pt) in an expert's choice order: score
 * descending, token index ascending; pads (v < 0) never go before others */
MOE_HD int moe_route_ec_before(float v, int64_t t, float pv, int64_t pt) { return v > pv || (v == pv && t < pt); }

/* One token s of expert-choice backward: the weight of a kept (s, e) is
 * probs[s, e], so d loss / d probs[s, e] = dweight[s*E+e] there and 0
 * elsewhere; dlogits[s] = p * (dp - sum_e p dp) (softmax), in double. The
 * selection itself carries no gradient, and there is no auxiliary loss. */
MOE_HD void moe_route_ec_token_backward(const moe_route_args *a, int64_t s, const float *dweight, float *dlogits)
{
    const int E = a->E;
    const float *p = a->probs + s * E;
    const int32_t *ex = a->expert + s * E, *sl = a->slot + s * E;
    const float *dw = dweight + s * E;
    double dot = 0.0;
    for (int e = 0; e < E; e++)
        if (ex[e] >= 0 && sl[e] >= 0)
            dot += (double)p[e] * (double)dw[e];
    for (int e = 0; e < E; e++) {
        const double dp = ex[e] >= 0 && sl[e] >= 0 ? (double)dw[e] : 0.0;
        dlogits[s * E + e] = (float)((double)p[e] * (dp - dot));
    }
}

#endif
