/* route.c: the cpu reference for MoE routing (top-1 and top-2 gating,
 * FAIRSEQ_SPEC.md §2.2-2.3, and the general top-k router), and for dispatch
 * and combine in index form (§2.4). The cuda backend is tested against these
 * functions.
 *
 * It is not the gate plugin (plugins/gates/ choose capacity, policy and seed)
 * and it never builds fairseq's dense (S, E, C) combine tensor: a routing is
 * kept as expert/slot/weight per (token, choice), ops.h's moe_route_args.
 *
 * Conventions a reader would trip over:
 *  - Token order is s = 0..S-1 (batch-major). Capacity is first come, first
 *    served in that order, or in descending max-probability order with
 *    batch_prioritized (a stable sort: equal probabilities keep token order).
 *    Second choices take slots after ALL first-choice claims on their expert,
 *    including first choices that capacity then drops (§2.2 step 11).
 *  - expert[s*2+j] keeps the argmax choice even when capacity or the random
 *    policy drops it (slot -1, weight 0); backward needs it for the load-
 *    balancing loss and for normalize-before-dropping. Pad tokens get expert
 *    -1 for both choices, top-1 gets -1 for j = 1.
 *  - A kept assignment whose combine weight is exactly 0 (its probability
 *    underflowed) is reported with slot -1: fairseq dispatches only where the
 *    combine weight is non-zero (§2.2 step 18). Its capacity slot stays used,
 *    as in fairseq, and the gradient it would carry is zero (it is multiplied
 *    by that zero probability in the softmax backward).
 *  - overflow_expertk is 0 when no token made a k-th choice (all pads, or the
 *    random policy dropped every second choice); fairseq divides 0 by 0 there
 *    and logs nan, which helps nobody.
 *  - Randomness (kernels/philox.h), a pure function of (seed, stream, index),
 *    with t = s (or noise_index[s] when given):
 *      sampling policy: Gumbel noise for logit (s, e) is -log(-log(u)),
 *        evaluated in double and rounded to fp32, with
 *        u = moe_philox_uniform(seed, stream, t*E + e) kept within
 *        [FLT_MIN, 1 - FLT_EPSILON], the range torch's Gumbel draws from
 *        (moe_route_gumbel, kernels/route_common.h);
 *      random policy: u = moe_philox_uniform(seed, stream ^ ROUTE_RANDOM_STREAM, t).
 *  - Arithmetic is fp32 as fairseq's --moe-gating-use-fp32 path; sums over
 *    tokens or experts (softmax denominator, entropy, me, l_aux, histogram
 *    sums, dot products) accumulate in double and are rounded once.
 *
 * The general top-k router (moe_route_args.topk = 1; its per-token math is
 * moe_route_topk_token in kernels/route_common.h, shared with cuda):
 *  - Scores: softmax over the experts, or sigmoid per expert. The k choices
 *    maximise score + expert_bias (the bias selects, never weighs), within
 *    the group_topk groups of largest top-(k / group_topk) sums when
 *    group-limited. Weights are the scores of the choices, renormalised over
 *    the k choices (kept or dropped) when asked: Megatron-Core's semantics,
 *    where softmax-then-top-k without renormalisation is its
 *    --moe-router-pre-softmax and sigmoid divides by the sum plus 1e-20.
 *  - Capacity: choice 0 of every token in token order, then choice 1 after
 *    all choice-0 claims on the expert, and so on (fairseq's top-2 rule,
 *    generalised); overflow_expert1 counts choice 0, overflow_expert2 the
 *    choices 1..k-1; the histograms are of choices 0 and 1.
 *  - Load-balancing loss over segments of T tokens (the whole batch, or each
 *    sequence with MOE_AUX_SEQ), averaged over the segments:
 *    E * sum_e P_e f_e, P_e the mean over the segment of the token's score
 *    distribution q (softmax, or sigmoid / (its sum + 1e-20)), pads
 *    included as fairseq's me; f_e = (non-pad choices of e) / (k T), before
 *    capacity. f counts the experts the router chose (bias and groups
 *    included) as GShard/Switch count dispatched tokens; Megatron-Core
 *    recounts a plain top-k of the scores, the same without bias or groups.
 *    1.0 at perfect balance. Gradient flows through P only.
 *  - z-loss: z_loss_coeff * mean over all S tokens of logsumexp(logits)^2,
 *    added to l_aux and written to gate_metrics.
 *
 * Expert-choice routing (moe_route_args.expert_choice = 1; Zhou et al.
 * 2022, "Mixture-of-Experts with Expert Choice Routing"):
 *  - Scores: the softmax over the experts of each token. Each expert e
 *    takes the C = capacity non-pad tokens of largest score for e (score
 *    descending, ties to the lower token index); with fewer non-pad tokens
 *    it takes them all. A token gets 0..E experts; none overflows.
 *  - Layout, W = E columns: expert[s*E+e] = e where e took s, else -1;
 *    slot[s*E+e] = the token's rank among e's C, so slots fill the (E, C)
 *    table directly; weight = probs[s, e], not renormalised (the paper's
 *    gating matrix). A weight of exactly 0 is not dispatched (slot -1).
 *  - No auxiliary loss (l_aux = 0): the load is balanced by construction.
 *    Metrics: overflow_expert1 is the percentage of non-pad tokens no expert
 *    took (their MoE output is 0), overflow_expert2 0; the histograms are of
 *    each token's first and second preference (argmax scores), as top-2's.
 *  - Backward: the gradient of each taken weight flows through the softmax
 *    to the logits; the selection is a constant.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/route_common.h"

/* Records a one-line error through the host (when there is one) and returns st. */
#define ROUTE_ERROR(c, st, ...)                                                               \
    (((c) != NULL && (c)->host != NULL && (c)->host->error != NULL)                           \
         ? (c)->host->error((c)->host, (st), __VA_ARGS__)                                     \
         : (st))

/* xor'ed into the stream of the random policy's draws, so they never reuse
 * the Gumbel counters of the sampling policy ("RAND" in ASCII) */
#define ROUTE_RANDOM_STREAM 0x52414E44ull

/* ------------------------------------------------------------- workspace */

/* Workspace layout, every piece 64-byte aligned:
 *   order[S], tmp[S]   int32  token order for capacity, the merge sort's buffer
 *   key[S]             fp32   max probability per token (batch-prioritized order)
 *   cnt[6*E]           int64  running claims 1 and 2, first-choice totals,
 *                             argmax histograms 1 and 2, scratch
 *   acc[E]             double me (forward) or d loss/d probs of one token (backward)
 *   cnt[E]             int32  top-k: choices per expert in the current segment */
typedef struct route_ws {
    int32_t *order, *tmp;
    float *key;
    int64_t *run1, *run2, *tot1, *hist1, *hist2, *scratch;
    double *acc;
    int *cnt;
} route_ws;

static int64_t align64(int64_t x) { return (x + 63) & ~(int64_t)63; }

int64_t moe_cpu_route_workspace_bytes(int64_t S, int E)
{
    if (S < 0 || E < 0)
        return 0;
    return 3 * align64(S * 4) + align64(6 * (int64_t)E * (int64_t)sizeof(int64_t)) +
           align64((int64_t)E * (int64_t)sizeof(double)) + align64((int64_t)E * (int64_t)sizeof(int));
}

static route_ws ws_carve(void *base, int64_t S, int E)
{
    route_ws w;
    unsigned char *p = base;
    w.order = (int32_t *)p;
    p += align64(S * 4);
    w.tmp = (int32_t *)p;
    p += align64(S * 4);
    w.key = (float *)p;
    p += align64(S * 4);
    int64_t *cnt = (int64_t *)p;
    w.run1 = cnt;
    w.run2 = cnt + E;
    w.tot1 = cnt + 2 * E;
    w.hist1 = cnt + 3 * E;
    w.hist2 = cnt + 4 * E;
    w.scratch = cnt + 5 * E;
    p += align64(6 * (int64_t)E * (int64_t)sizeof(int64_t));
    w.acc = (double *)p;
    p += align64((int64_t)E * (int64_t)sizeof(double));
    w.cnt = (int *)p;
    return w;
}

/* The metrics every router writes alike: the mean gating entropy and the
 * first (and, with `second`, second) choices' histogram statistics; without
 * `second` those of the second choice are 0. */
static void hist_metrics(float *m, route_ws *w, int E, int64_t S, double entropy, int second)
{
    m[MOE_METRIC_ENTROPY_GATING] = (float)(entropy / (double)S);
    moe_route_hist_metrics(w->hist1, w->scratch, E, S, &m[MOE_METRIC_UNUSED_EXPERT1_COUNT],
                           &m[MOE_METRIC_EXPERT1_BALANCE_TOP], &m[MOE_METRIC_EXPERT1_BALANCE_BOTTOM]);
    if (second) {
        moe_route_hist_metrics(w->hist2, w->scratch, E, S, &m[MOE_METRIC_UNUSED_EXPERT2_COUNT],
                               &m[MOE_METRIC_EXPERT2_BALANCE_TOP], &m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM]);
    } else {
        m[MOE_METRIC_UNUSED_EXPERT2_COUNT] = 0.0f;
        m[MOE_METRIC_EXPERT2_BALANCE_TOP] = 0.0f;
        m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM] = 0.0f;
    }
}

static moe_status check_route_args(moe_ctx *c, const char *op, const moe_route_args *a)
{
    char msg[256];
    if (moe_route_args_problem(a, "cpu", op, msg, sizeof msg) != NULL)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG, "%s", msg);
    if (moe_cpu_route_workspace_bytes(a->S, a->E) > 0 && a->workspace == NULL)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                           "cpu %s: expected a workspace of route_workspace_bytes(%lld, %d) = %lld bytes, found "
                           "NULL",
                           op, (long long)a->S, a->E, (long long)moe_cpu_route_workspace_bytes(a->S, a->E));
    return MOE_OK;
}

/* ------------------------------------------------------------- helpers */

/* Stable merge sort of order[0..n) by descending key[order[i]]; tmp has n entries. */
static void sort_desc_stable(int32_t *order, int32_t *tmp, int64_t n, const float *key)
{
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t i = lo, j = mid, o = lo;
            /* take from the right run only when strictly larger: stability */
            while (i < mid && j < hi)
                tmp[o++] = key[order[j]] > key[order[i]] ? order[j++] : order[i++];
            while (i < mid)
                tmp[o++] = order[i++];
            while (j < hi)
                tmp[o++] = order[j++];
        }
        memcpy(order, tmp, (size_t)n * sizeof *order);
    }
}

/* ------------------------------------------------------------- forward */

/* The top-k router's forward (the file comment). */
static void topk_forward(const moe_route_args *a)
{
    const int64_t S = a->S, C = a->capacity;
    const int E = a->E, k = a->k, W = moe_route_width(a);
    const int64_t T = a->aux == MOE_AUX_SEQ ? a->seq_len : S, nseg = S / T;
    route_ws w = ws_carve(a->workspace, S, E);
    for (int e = 0; e < E; e++)
        w.run1[e] = w.tot1[e] = w.hist1[e] = w.hist2[e] = 0;

    /* per token, and the loss's sums per segment */
    double entropy = 0.0, z = 0.0, laux = 0.0;
    for (int64_t b = 0; b < nseg; b++) {
        for (int e = 0; e < E; e++) {
            w.acc[e] = 0.0;
            w.cnt[e] = 0;
        }
        for (int64_t s = b * T; s < (b + 1) * T; s++) {
            const moe_topk_token t = moe_route_topk_token(a, s);
            entropy += t.entropy;
            z += t.lse * t.lse;
            if (t.first >= 0)
                w.hist1[t.first]++;
            if (t.second >= 0)
                w.hist2[t.second]++;
            for (int e = 0; e < E; e++)
                w.acc[e] += (double)a->probs[s * E + e] / t.norm;
            for (int j = 0; j < k; j++) {
                const int e = a->expert[s * W + j];
                if (e >= 0)
                    w.cnt[e]++;
            }
        }
        double term = 0.0;
        for (int e = 0; e < E; e++) {
            term += w.acc[e] * (double)w.cnt[e];
            w.tot1[e] += w.cnt[e];
        }
        laux += term;
    }

    /* capacity: choice j claims after every claim of choices 0..j-1 */
    int64_t claims1 = 0, over1 = 0, claims2 = 0, over2 = 0;
    for (int j = 0; j < k; j++)
        for (int64_t s = 0; s < S; s++) {
            int32_t *sl = &a->slot[s * W + j];
            if (*sl != 1)
                continue;
            const int64_t loc = w.run1[a->expert[s * W + j]]++;
            claims1 += j == 0;
            over1 += j == 0 && loc >= C;
            claims2 += j > 0;
            over2 += j > 0 && loc >= C;
            *sl = loc < C ? (int32_t)loc : -1;
        }
    /* dropped: weight 0; a kept weight of exactly 0 is not dispatched (as fairseq) */
    for (int64_t i = 0; i < S * W; i++) {
        if (a->slot[i] < 0)
            a->weight[i] = 0.0f;
        else if (a->weight[i] == 0.0f)
            a->slot[i] = -1;
    }

    const double zl = (double)a->z_loss_coeff * z / (double)S;
    const double aux = a->aux == MOE_AUX_NONE ? 0.0 : laux * (double)E / ((double)nseg * (double)T * (double)T * k);
    *a->l_aux = (float)(aux + zl);
    if (a->gate_metrics != NULL)
        a->gate_metrics[MOE_GATE_METRIC_Z_LOSS] = (float)zl;
    if (a->expert_load != NULL)
        for (int e = 0; e < E; e++)
            a->expert_load[e] += (float)w.tot1[e];

    float *m = a->metrics;
    m[MOE_METRIC_OVERFLOW_EXPERT1] = claims1 > 0 ? (100.0f * (float)over1) / (float)claims1 : 0.0f;
    m[MOE_METRIC_OVERFLOW_EXPERT2] = claims2 > 0 ? (100.0f * (float)over2) / (float)claims2 : 0.0f;
    hist_metrics(m, &w, E, S, entropy, k >= 2);
}

/* Expert-choice routing's forward (the file comment). */
static void ec_forward(const moe_route_args *a)
{
    const int64_t S = a->S, C = a->capacity;
    const int E = a->E;
    route_ws w = ws_carve(a->workspace, S, E);
    for (int e = 0; e < E; e++)
        w.hist1[e] = w.hist2[e] = 0;
    double entropy = 0.0;
    for (int64_t s = 0; s < S; s++) {
        const moe_topk_token t = moe_route_ec_token(a, s);
        entropy += t.entropy;
        if (t.first >= 0)
            w.hist1[t.first]++;
        if (t.second >= 0)
            w.hist2[t.second]++;
    }
    /* each expert sorts the tokens by its score (pads last) and takes C */
    for (int e = 0; e < E; e++) {
        for (int64_t s = 0; s < S; s++) {
            w.order[s] = (int32_t)s;
            w.key[s] = a->pad != NULL && a->pad[s] ? -1.0f : a->probs[s * E + e];
        }
        sort_desc_stable(w.order, w.tmp, S, w.key);
        for (int64_t r = 0; r < C; r++) {
            const int64_t s = w.order[r];
            if (w.key[s] < 0.0f)
                break;
            a->expert[s * E + e] = e;
            a->weight[s * E + e] = w.key[s];
            a->slot[s * E + e] = w.key[s] != 0.0f ? (int32_t)r : -1;
        }
    }
    int64_t tokens = 0, untaken = 0;
    for (int64_t s = 0; s < S; s++) {
        if (a->pad != NULL && a->pad[s])
            continue;
        int taken = 0;
        for (int e = 0; e < E; e++)
            taken |= a->slot[s * E + e] >= 0;
        tokens++;
        untaken += !taken;
    }
    *a->l_aux = 0.0f;
    if (a->gate_metrics != NULL)
        a->gate_metrics[MOE_GATE_METRIC_Z_LOSS] = 0.0f;
    float *m = a->metrics;
    m[MOE_METRIC_OVERFLOW_EXPERT1] = tokens > 0 ? (100.0f * (float)untaken) / (float)tokens : 0.0f;
    m[MOE_METRIC_OVERFLOW_EXPERT2] = 0.0f;
    hist_metrics(m, &w, E, S, entropy, 1);
}

moe_status moe_cpu_route_forward(moe_ctx *c, const moe_route_args *a)
{
    MOE_TRY(check_route_args(c, "route_forward", a));
    if (a->logits == NULL || a->weight == NULL || a->l_aux == NULL || a->metrics == NULL)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                           "cpu route_forward: expected logits, weight, l_aux and metrics buffers, found NULL");
    if (a->expert_choice) {
        ec_forward(a);
        return MOE_OK;
    }
    if (a->topk) {
        topk_forward(a);
        return MOE_OK;
    }

    const int64_t S = a->S, C = a->capacity;
    const int E = a->E, k = a->k;
    const int sampling = k == 2 && a->policy == MOE_ROUTE_SAMPLING;
    const int random_policy = k == 2 && a->policy == MOE_ROUTE_RANDOM;
    const int norm_before = k == 2 && a->normalize_before_drop;
    route_ws w = ws_carve(a->workspace, S, E);
    int32_t *expert = a->expert, *slot = a->slot;
    float *probs = a->probs, *weight = a->weight;

    for (int e = 0; e < E; e++) {
        w.run1[e] = w.run2[e] = w.tot1[e] = w.hist1[e] = w.hist2[e] = 0;
        w.acc[e] = 0.0;
    }

    /* Pass 1, per token: softmax, entropy, choices, policies, pad mask.
     * slot[] holds 1 where an assignment claims capacity, 0 where not, until
     * pass 2 turns it into slots. weight[] holds normalized-before-dropping
     * values meanwhile. */
    double entropy = 0.0;
    for (int64_t s = 0; s < S; s++) {
        const int64_t tok = a->noise_index != NULL ? (int64_t)a->noise_index[s] : s; /* index of its draws */
        const float *l = a->logits + s * E;
        float *p = probs + s * E;
        moe_route_softmax(l, p, E);
        double h = 0.0;
        for (int e = 0; e < E; e++) {
            w.acc[e] += (double)p[e];
            /* torch's Categorical entropy clamps p to [eps, 1-eps] inside the log */
            float pc = p[e] < FLT_EPSILON ? FLT_EPSILON : (p[e] > 1.0f - FLT_EPSILON ? 1.0f - FLT_EPSILON : p[e]);
            h -= (double)p[e] * log((double)pc);
        }
        entropy += h;

        int i1 = 0; /* argmax of probabilities; ties go to the lowest index */
        for (int e = 1; e < E; e++)
            if (p[e] > p[i1])
                i1 = e;
        w.hist1[i1]++;
        w.key[s] = p[i1];
        const int is_pad = a->pad != NULL && a->pad[s] != 0;
        expert[s * 2] = is_pad ? -1 : i1;
        slot[s * 2] = !is_pad;
        weight[s * 2] = 0.0f;
        expert[s * 2 + 1] = -1;
        slot[s * 2 + 1] = 0;
        weight[s * 2 + 1] = 0.0f;
        if (!is_pad)
            w.tot1[i1]++;
        if (k == 1)
            continue;

        /* second choice: argmax of the (noisy) logits with i1 excluded */
        int i2 = -1;
        float best = 0.0f;
        for (int e = 0; e < E; e++) {
            if (e == i1)
                continue;
            float v = sampling ? l[e] + moe_route_gumbel(a->seed, a->stream, tok, E, e) : l[e];
            if (i2 < 0 || v > best) {
                i2 = e;
                best = v;
            }
        }
        w.hist2[i2]++;
        float g1 = p[i1], g2 = p[i2];
        if (norm_before) {
            float d = g1 + g2;
            if (d < FLT_EPSILON)
                d = FLT_EPSILON;
            g1 /= d;
            g2 /= d;
            weight[s * 2] = g1;
            weight[s * 2 + 1] = g2;
        }
        int claim2 = !is_pad;
        if (random_policy) {
            float u = moe_philox_uniform(a->seed, a->stream ^ ROUTE_RANDOM_STREAM, (uint64_t)tok);
            claim2 = claim2 && 2.0f * g2 > u;
        }
        expert[s * 2 + 1] = is_pad ? -1 : i2;
        slot[s * 2 + 1] = claim2;
    }

    /* Pass 2: capacity slots in token order or in priority order. */
    for (int64_t s = 0; s < S; s++)
        w.order[s] = (int32_t)s;
    if (a->batch_prioritized)
        sort_desc_stable(w.order, w.tmp, S, w.key);
    int64_t claims1 = 0, over1 = 0, claims2 = 0, over2 = 0;
    for (int64_t i = 0; i < S; i++) {
        int64_t s = w.order[i];
        if (slot[s * 2]) {
            int e = expert[s * 2];
            int64_t loc = w.run1[e]++;
            claims1++;
            over1 += loc >= C;
            slot[s * 2] = loc < C ? (int32_t)loc : -1;
        } else {
            slot[s * 2] = -1;
        }
    }
    for (int64_t i = 0; i < S; i++) {
        int64_t s = w.order[i];
        if (k == 2 && slot[s * 2 + 1]) {
            int e = expert[s * 2 + 1];
            int64_t loc = w.tot1[e] + w.run2[e]++;
            claims2++;
            over2 += loc >= C;
            slot[s * 2 + 1] = loc < C ? (int32_t)loc : -1;
        } else {
            slot[s * 2 + 1] = -1;
        }
    }

    /* Pass 3: combine weights (§2.2 step 16, §2.3). */
    for (int64_t s = 0; s < S; s++) {
        const float *p = probs + s * E;
        const int kept1 = slot[s * 2] >= 0, kept2 = slot[s * 2 + 1] >= 0;
        float w1, w2 = 0.0f;
        if (k == 1) {
            w1 = kept1 ? p[expert[s * 2]] : 0.0f;
        } else if (norm_before) {
            w1 = kept1 ? weight[s * 2] : 0.0f;
            w2 = kept2 ? weight[s * 2 + 1] : 0.0f;
        } else {
            float g1 = kept1 ? p[expert[s * 2]] : 0.0f;
            float g2 = kept2 ? p[expert[s * 2 + 1]] : 0.0f;
            float d = g1 + g2;
            if (d < FLT_EPSILON)
                d = FLT_EPSILON;
            w1 = g1 / d; /* exactly 1.0 when only one survived */
            w2 = g2 / d;
        }
        if (kept1 && w1 == 0.0f)
            slot[s * 2] = -1;
        if (kept2 && w2 == 0.0f)
            slot[s * 2 + 1] = -1;
        weight[s * 2] = w1;
        weight[s * 2 + 1] = w2;
    }

    /* Load-balancing loss: E * sum_e me_e * ce_e, me over all S tokens (pads
     * included), ce from first choices after pad masking, before capacity. */
    double laux = 0.0;
    for (int e = 0; e < E; e++)
        laux += (w.acc[e] / (double)S) * ((double)w.tot1[e] / (double)S);
    *a->l_aux = (float)(laux * (double)E);

    float *m = a->metrics;
    m[MOE_METRIC_OVERFLOW_EXPERT1] = k == 2 && claims1 > 0 ? (100.0f * (float)over1) / (float)claims1 : 0.0f;
    m[MOE_METRIC_OVERFLOW_EXPERT2] = k == 2 && claims2 > 0 ? (100.0f * (float)over2) / (float)claims2 : 0.0f;
    hist_metrics(m, &w, E, S, entropy, k == 2);
    return MOE_OK;
}

/* ------------------------------------------------------------- backward */

/* Gradient of w_j = g_j / max(g1 + g2, eps) with respect to g1 and g2, given
 * dw_j. With D = g1 + g2 (clamp inactive), dL/dg_j = sum_k (dw_j - dw_k) g_k / D^2,
 * written in that form so the only-one-survived case (w = g/g, the other
 * g = 0) is exactly zero rather than a rounding residue. */
static void normalize_grad(double g1, double g2, double dw1, double dw2, double *dg1, double *dg2)
{
    double d = g1 + g2;
    if (d >= (double)FLT_EPSILON) {
        *dg1 = (dw1 - dw2) * g2 / (d * d);
        *dg2 = (dw2 - dw1) * g1 / (d * d);
    } else { /* the clamp at eps is active: the denominator is a constant */
        *dg1 = dw1 / (double)FLT_EPSILON;
        *dg2 = dw2 / (double)FLT_EPSILON;
    }
}

/* The top-k router's backward, segment by segment: the counts of the
 * segment's choices, then each token (moe_route_topk_token_backward). */
static moe_status topk_backward(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux,
                                float *dlogits)
{
    const int64_t S = a->S;
    const int E = a->E, k = a->k, W = moe_route_width(a);
    const int64_t T = a->aux == MOE_AUX_SEQ ? a->seq_len : S, nseg = S / T;
    if (a->z_loss_coeff != 0.0f && a->logits == NULL)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                           "cpu route_backward: expected the logits for the z-loss's gradient, found NULL");
    route_ws w = ws_carve(a->workspace, S, E);
    const double aux_scale =
        a->aux == MOE_AUX_NONE ? 0.0 : (double)dl_aux * (double)E / ((double)nseg * (double)T * (double)T * k);
    const double z_scale = (double)dl_aux * (double)a->z_loss_coeff * 2.0 / (double)S;
    for (int64_t b = 0; b < nseg; b++) {
        for (int e = 0; e < E; e++)
            w.cnt[e] = 0;
        for (int64_t s = b * T; s < (b + 1) * T; s++)
            for (int j = 0; j < k; j++) {
                const int e = a->expert[s * W + j];
                if (e >= E)
                    return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                                       "cpu route_backward: expected expert ids in [0, %d), found %d at token %lld; "
                                       "pass the routing route_forward wrote",
                                       E, e, (long long)s);
                if (e >= 0)
                    w.cnt[e]++;
            }
        for (int64_t s = b * T; s < (b + 1) * T; s++)
            moe_route_topk_token_backward(a, s, dweight, w.cnt, aux_scale, z_scale, dlogits);
    }
    return MOE_OK;
}

moe_status moe_cpu_route_backward(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux,
                                  float *dlogits)
{
    MOE_TRY(check_route_args(c, "route_backward", a));
    if (dweight == NULL || dlogits == NULL)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG, "cpu route_backward: expected dweight and dlogits, found NULL");
    if (a->expert_choice) {
        for (int64_t s = 0; s < a->S; s++)
            moe_route_ec_token_backward(a, s, dweight, dlogits);
        return MOE_OK;
    }
    if (a->topk)
        return topk_backward(c, a, dweight, dl_aux, dlogits);

    const int64_t S = a->S;
    const int E = a->E, k = a->k;
    const int norm_before = k == 2 && a->normalize_before_drop;
    route_ws w = ws_carve(a->workspace, S, E);
    const int32_t *expert = a->expert, *slot = a->slot;
    double *dp = w.acc;

    /* ce_e * S: first choices after pad masking, before capacity */
    for (int e = 0; e < E; e++)
        w.tot1[e] = 0;
    for (int64_t s = 0; s < S; s++) {
        int e = expert[s * 2];
        if (e < 0)
            continue;
        if (e >= E)
            return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                               "cpu route_backward: expected expert ids in [0, %d), found %d at token %lld; pass "
                               "the routing route_forward wrote",
                               E, e, (long long)s);
        w.tot1[e]++;
    }
    /* l_aux = E * sum_e me_e ce_e with me_e = mean_s probs[s, e] */
    const double laux_scale = (double)dl_aux * (double)E / ((double)S * (double)S);

    for (int64_t s = 0; s < S; s++) {
        const float *p = a->probs + s * E;
        for (int e = 0; e < E; e++)
            dp[e] = laux_scale * (double)w.tot1[e];

        const int i1 = expert[s * 2], i2 = k == 2 ? expert[s * 2 + 1] : -1;
        const int kept1 = i1 >= 0 && slot[s * 2] >= 0;
        const int kept2 = i2 >= 0 && slot[s * 2 + 1] >= 0;
        if (i2 >= E)
            return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                               "cpu route_backward: expected expert ids in [0, %d), found %d at token %lld; pass "
                               "the routing route_forward wrote",
                               E, i2, (long long)s);
        const double dw1 = kept1 ? (double)dweight[s * 2] : 0.0;
        const double dw2 = kept2 ? (double)dweight[s * 2 + 1] : 0.0;
        if (k == 1) {
            if (kept1) /* weight = raw probability */
                dp[i1] += dw1;
        } else if (norm_before) {
            /* weights g_j * kept_j, g normalised over both argmax choices
             * whether dropped or not: both probabilities get gradient */
            if (i1 >= 0 && i2 >= 0) {
                double dg1, dg2;
                normalize_grad((double)p[i1], (double)p[i2], dw1, dw2, &dg1, &dg2);
                dp[i1] += dg1;
                dp[i2] += dg2;
            }
        } else {
            /* weights renormalised over the kept choices: a dropped choice has
             * g = 0 and a zero mask, so it neither gives nor gets gradient */
            double dg1, dg2;
            normalize_grad(kept1 ? (double)p[i1] : 0.0, kept2 ? (double)p[i2] : 0.0, dw1, dw2, &dg1, &dg2);
            if (kept1)
                dp[i1] += dg1;
            if (kept2)
                dp[i2] += dg2;
        }

        /* softmax: dl = p * (dp - sum_e p dp) */
        double dot = 0.0;
        for (int e = 0; e < E; e++)
            dot += (double)p[e] * dp[e];
        for (int e = 0; e < E; e++)
            dlogits[s * E + e] = (float)((double)p[e] * (dp[e] - dot));
    }
    return MOE_OK;
}

/* ------------------------------------------------- dispatch and combine */

static moe_status check_assign(moe_ctx *c, const char *op, const int32_t *expert, const int32_t *slot, int64_t S,
                               int W, int E, int64_t C, int64_t d, moe_dtype dt)
{
    if (dt != MOE_F32 && dt != MOE_F16 && dt != MOE_BF16)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected storage dtype f32, f16 or bf16, found %d", op,
                           (int)dt);
    if (S < 0 || W < 1 || E < 1 || C < 0 || d < 0)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                           "cpu %s: expected S >= 0, W >= 1, E >= 1, C >= 0, d >= 0, found S = %lld, W = %d, "
                           "E = %d, C = %lld, d = %lld",
                           op, (long long)S, W, E, (long long)C, (long long)d);
    if (S > 0 && (expert == NULL || slot == NULL))
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected expert and slot arrays, found NULL", op);
    for (int64_t i = 0; i < W * S; i++) {
        if (expert[i] < 0 || slot[i] < 0)
            continue;
        if (expert[i] >= E || slot[i] >= C)
            return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                               "cpu %s: expected (expert, slot) in [0, %d) x [0, %lld), found (%d, %d) at token "
                               "%lld choice %d; pass the routing route_forward wrote with the same capacity",
                               op, E, (long long)C, expert[i], slot[i], (long long)(i / W), (int)(i % W));
    }
    return MOE_OK;
}

/* row of the (E*C, d) expert buffer that assignment i uses, or -1 */
static int64_t assign_row(const int32_t *expert, const int32_t *slot, int64_t i, int64_t C)
{
    return expert[i] >= 0 && slot[i] >= 0 ? (int64_t)expert[i] * C + slot[i] : -1;
}

/* The ops of two choices per token are the wide ops at W = 2. */

moe_status moe_cpu_dispatch_wide_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                         const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                         moe_dtype dt)
{
    MOE_TRY(check_assign(c, "dispatch_forward", expert, slot, S, W, E, C, d, dt));
    const int64_t rows = (int64_t)E * C;
    for (int64_t i = 0; i < rows * d; i++)
        moe_cpu_store(out, dt, i, 0.0f);
    for (int64_t i = 0; i < W * S; i++) {
        int64_t r = assign_row(expert, slot, i, C);
        if (r < 0)
            continue;
        for (int64_t j = 0; j < d; j++)
            moe_cpu_store(out, dt, r * d + j, moe_cpu_load(x, dt, (i / W) * d + j));
    }
    return MOE_OK;
}

moe_status moe_cpu_dispatch_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                    const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cpu_dispatch_wide_forward(c, out, x, expert, slot, S, 2, E, C, d, dt);
}

moe_status moe_cpu_dispatch_wide_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                          const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                          moe_dtype dt)
{
    MOE_TRY(check_assign(c, "dispatch_backward", expert, slot, S, W, E, C, d, dt));
    for (int64_t s = 0; s < S; s++) {
        int any = 0;
        for (int k = 0; k < W; k++)
            any |= assign_row(expert, slot, s * W + k, C) >= 0;
        if (!any)
            continue;
        for (int64_t j = 0; j < d; j++) {
            double acc = (double)moe_cpu_load(dx, dt, s * d + j);
            for (int k = 0; k < W; k++) {
                int64_t r = assign_row(expert, slot, s * W + k, C);
                if (r >= 0)
                    acc += (double)moe_cpu_load(dout, dt, r * d + j);
            }
            moe_cpu_store(dx, dt, s * d + j, (float)acc);
        }
    }
    return MOE_OK;
}

moe_status moe_cpu_dispatch_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                     const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cpu_dispatch_wide_backward(c, dx, dout, expert, slot, S, 2, E, C, d, dt);
}

moe_status moe_cpu_combine_wide_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert,
                                        const int32_t *slot, const float *weight, int64_t S, int W, int E, int64_t C,
                                        int64_t d, moe_dtype dt)
{
    MOE_TRY(check_assign(c, "combine_forward", expert, slot, S, W, E, C, d, dt));
    if (S > 0 && weight == NULL)
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG, "cpu combine_forward: expected weights, found NULL");
    for (int64_t s = 0; s < S; s++) {
        for (int64_t j = 0; j < d; j++) {
            double acc = 0.0;
            for (int k = 0; k < W; k++) {
                int64_t r = assign_row(expert, slot, s * W + k, C);
                if (r >= 0)
                    acc += (double)weight[s * W + k] * (double)moe_cpu_load(eout, dt, r * d + j);
            }
            moe_cpu_store(y, dt, s * d + j, (float)acc);
        }
    }
    return MOE_OK;
}

moe_status moe_cpu_combine_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert, const int32_t *slot,
                                   const float *weight, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cpu_combine_wide_forward(c, y, eout, expert, slot, weight, S, 2, E, C, d, dt);
}

moe_status moe_cpu_combine_wide_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                         const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                         int W, int E, int64_t C, int64_t d, moe_dtype dt)
{
    MOE_TRY(check_assign(c, "combine_backward", expert, slot, S, W, E, C, d, dt));
    if (S > 0 && (weight == NULL || dweight == NULL))
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG, "cpu combine_backward: expected weight and dweight, found NULL");
    const int64_t rows = (int64_t)E * C;
    for (int64_t i = 0; i < rows * d; i++)
        moe_cpu_store(deout, dt, i, 0.0f);
    for (int64_t i = 0; i < W * S; i++) {
        int64_t r = assign_row(expert, slot, i, C), s = i / W;
        if (r < 0) {
            dweight[i] = 0.0f;
            continue;
        }
        double dot = 0.0;
        for (int64_t j = 0; j < d; j++) {
            float g = moe_cpu_load(dy, dt, s * d + j);
            dot += (double)g * (double)moe_cpu_load(eout, dt, r * d + j);
            moe_cpu_store(deout, dt, r * d + j, weight[i] * g);
        }
        dweight[i] = (float)dot;
    }
    return MOE_OK;
}

moe_status moe_cpu_combine_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                    const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                    int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cpu_combine_wide_backward(c, deout, dweight, dy, eout, expert, slot, weight, S, 2, E, C, d, dt);
}

moe_status moe_cpu_expert_rows(moe_ctx *c, int32_t *rows, const int32_t *expert, const int32_t *slot, int64_t S,
                               int W, int E, int64_t C)
{
    if (S < 0 || W < 1 || E < 1 || C < 0 || C > INT32_MAX || (S > 0 && (expert == NULL || slot == NULL)))
        return ROUTE_ERROR(c, MOE_ERR_INVALID_ARG,
                           "cpu expert_rows: expected S >= 0, W >= 1, E >= 1, 0 <= C < 2^31 and the routing arrays, "
                           "found S %lld, W %d, E %d, C %lld",
                           (long long)S, W, E, (long long)C);
    for (int e = 0; e < E; e++)
        rows[e] = 0;
    for (int64_t i = 0; i < W * S; i++)
        if (expert[i] >= 0 && expert[i] < E && slot[i] >= 0 && slot[i] < C && slot[i] + 1 > rows[expert[i]])
            rows[expert[i]] = slot[i] + 1;
    return MOE_OK;
}
