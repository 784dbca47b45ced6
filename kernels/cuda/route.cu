/* route.cu: MoE routing (top-1 and top-2 gating, FAIRSEQ_SPEC.md §2.2-2.3,
 * and the general top-k router), its backward, and dispatch/combine in index
 * form (§2.4) for the cuda backend. kernels/cpu/route.c is the reference;
 * the conventions below are its conventions, restated where the GPU does
 * them differently.
 *
 * Not here: the gate's policy choices (plugins/gates/ fill moe_route_args),
 * fairseq's dense (S, E, C) tensors, and checks that need the host to read
 * device data (expert ids and slots inside range are trusted: they come from
 * route_forward).
 *
 * How the forward runs, every step deterministic:
 *  1. one thread per token: softmax (denominator in double), entropy, the
 *     argmax choices, Gumbel noise (sampling) or the keep draw (random), the
 *     pad mask, and the capacity claims;
 *  2. one block per expert: me (sum of probabilities, double, fixed tree
 *     order), first-choice count after pad masking, argmax histograms; one
 *     more block sums the entropy;
 *  3. with batch_prioritized, a stable descending radix sort (CUB) of the
 *     tokens by max probability; equal keys keep token order, as the cpu's
 *     merge sort;
 *  4. one block per expert: capacity slots by a block-wide prefix sum of its
 *     claims in token (or priority) order; second choices start after all
 *     first-choice claims on the expert;
 *  5. one thread per token: combine weights (§2.2 step 16, §2.3);
 *  6. one thread: l_aux and the metrics from the per-expert totals.
 * Randomness, with t = s or noise_index[s]: Gumbel noise for logit (s, e) is
 * moe_route_gumbel (-log(-log(u)), u = philox_uniform(seed, stream, t*E + e)
 * clamped to [FLT_MIN, 1 - FLT_EPSILON]); the random policy draws
 * philox_uniform(seed, stream ^ 0x52414E44, t).
 *
 * The general top-k router (moe_route_args.topk = 1) runs the same shape
 * with the per-token math shared with the cpu (kernels/route_common.h):
 *  1. one thread per token: moe_route_topk_token (scores, choices, weights,
 *     claims), its entropy, squared logsumexp and score normaliser;
 *  2. one block per expert: for each segment (the batch, or each sequence)
 *     the sums of the loss's distribution and of the choices, and their
 *     product; the expert's choices, histograms and load; one more block
 *     sums the entropy and the z-loss;
 *  3. one block per expert: capacity, choice 0 of every token in token
 *     order, then choice 1 after them, and so on;
 *  4. one thread per assignment: dropped weights to 0;
 *  5. one thread: l_aux, gate_metrics and the metrics.
 * Its backward runs one block per (segment, chunk of tokens): the block
 * counts the segment's choices per expert in shared memory, then each
 * thread writes a token's dlogits (moe_route_topk_token_backward).
 *
 * Expert-choice routing (moe_route_args.expert_choice = 1):
 *  1. one thread per token: moe_route_ec_token (softmax, entropy, the two
 *     preferences, the token's row cleared);
 *  2. one thread per (token, expert): the token's rank in the expert's order
 *     (score descending, token index ascending, pads never counted), by
 *     comparing against every token through shared-memory tiles: O(S^2 E)
 *     compares, exact and without workspace; rank < C takes the token;
 *  3. one block per expert: the preference histograms; one more block: the
 *     entropy sum and the tokens no expert took;
 *  4. one thread: the metrics (l_aux 0).
 * Its backward is one thread per token (moe_route_ec_token_backward).
 */
#include <cfloat>
#include <cstring>
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda.h"
#include "kernels/route_common.h"
#include "kernels/cuda/route.h"

#define ROUTE_RANDOM_STREAM 0x52414E44ull
#define ROUTE_THREADS 256
#define SCAN_THREADS 1024

/* ------------------------------------------------------------ workspace */

typedef struct route_ws {
    int32_t *first, *second, *claim, *order, *iota;
    float *key, *key_sorted;
    double *ent, *z, *norm, *me; /* z, norm: top-k only */
    int64_t *tot1, *hist1, *hist2, *claims2, *over1, *over2, *sorted;
    void *cub_temp;
    size_t cub_bytes;
} route_ws;

static int64_t align256(int64_t x) { return (x + 255) & ~(int64_t)255; }

static size_t sort_temp_bytes(int64_t S)
{
    size_t b = 0;
    if (cub::DeviceRadixSort::SortPairsDescending(NULL, b, (const float *)NULL, (float *)NULL, (const int32_t *)NULL,
                                                  (int32_t *)NULL, (int)S) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return b;
}

/* Lays the pieces out from `base` (NULL: only sizes); returns the total. */
static int64_t ws_carve(void *base, int64_t S, int E, route_ws *w)
{
    unsigned char *p = (unsigned char *)base;
    int64_t off = 0;
#define WS_TAKE(field, type, count)                                    \
    do {                                                               \
        if (w != NULL)                                                 \
            w->field = (type *)(p != NULL ? p + off : NULL);           \
        off += align256((int64_t)(count) * (int64_t)sizeof(type));     \
    } while (0)
    WS_TAKE(first, int32_t, S);
    WS_TAKE(second, int32_t, S);
    WS_TAKE(claim, int32_t, 2 * S);
    WS_TAKE(order, int32_t, S);
    WS_TAKE(iota, int32_t, S);
    WS_TAKE(key, float, S);
    WS_TAKE(key_sorted, float, S);
    WS_TAKE(ent, double, S);
    WS_TAKE(z, double, S);
    WS_TAKE(norm, double, S);
    WS_TAKE(me, double, E);
    WS_TAKE(tot1, int64_t, E);
    WS_TAKE(hist1, int64_t, E);
    WS_TAKE(hist2, int64_t, E);
    WS_TAKE(claims2, int64_t, E);
    WS_TAKE(over1, int64_t, E);
    WS_TAKE(over2, int64_t, E);
    WS_TAKE(sorted, int64_t, E);
#undef WS_TAKE
    size_t cb = sort_temp_bytes(S);
    if (w != NULL) {
        w->cub_temp = p != NULL ? p + off : NULL;
        w->cub_bytes = cb;
    }
    off += align256((int64_t)cb);
    return off;
}

int64_t moe_cuda_route_workspace_bytes(int64_t S, int E)
{
    if (S < 1 || E < 1 || S > INT32_MAX)
        return 0;
    return ws_carve(NULL, S, E, NULL);
}

static moe_status check_route_args(moe_ctx *c, const char *op, const moe_route_args *a)
{
    char msg[256];
    if (moe_route_args_problem(a, "cuda", op, msg, sizeof msg) != NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "%s", msg);
    if (a->workspace == NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda %s: expected a workspace of route_workspace_bytes(%lld, %d) = %lld bytes, found "
                             "NULL",
                             op, (long long)a->S, a->E, (long long)moe_cuda_route_workspace_bytes(a->S, a->E));
    return MOE_OK;
}

/* ------------------------------------------------------------- forward */

typedef struct route_k {
    int64_t S, C;
    int E, k, sampling, random, norm_before, prioritized;
    uint64_t seed, stream;
    const float *logits;
    const uint8_t *pad;
    const int32_t *noise_index;
    float *probs, *weight;
    int32_t *expert, *slot;
} route_k;

/* step 1: one thread per token */
static __global__ void route_token_kernel(route_k a, route_ws w)
{
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < a.S; s += (int64_t)gridDim.x * blockDim.x) {
        const int E = a.E;
        const int64_t tok = a.noise_index != NULL ? (int64_t)a.noise_index[s] : s; /* index of its draws */
        const float *l = a.logits + s * E;
        float *p = a.probs + s * E;
        float mx = l[0];
        for (int e = 1; e < E; e++)
            if (l[e] > mx)
                mx = l[e];
        double den = 0.0;
        for (int e = 0; e < E; e++) {
            p[e] = expf(l[e] - mx);
            den += (double)p[e];
        }
        double h = 0.0;
        int i1 = 0;
        for (int e = 0; e < E; e++) {
            float pe = (float)((double)p[e] / den);
            p[e] = pe;
            /* torch's Categorical entropy clamps p to [eps, 1-eps] inside the log */
            float pc = pe < FLT_EPSILON ? FLT_EPSILON : (pe > 1.0f - FLT_EPSILON ? 1.0f - FLT_EPSILON : pe);
            h -= (double)pe * log((double)pc);
            if (pe > p[i1]) /* ties go to the lowest index */
                i1 = e;
        }
        w.ent[s] = h;
        w.first[s] = i1;
        w.key[s] = p[i1];
        const bool is_pad = a.pad != NULL && a.pad[s] != 0;
        a.expert[s * 2] = is_pad ? -1 : i1;
        a.expert[s * 2 + 1] = -1;
        a.slot[s * 2] = -1;
        a.slot[s * 2 + 1] = -1;
        a.weight[s * 2] = 0.0f;
        a.weight[s * 2 + 1] = 0.0f;
        w.claim[s * 2] = !is_pad;
        w.claim[s * 2 + 1] = 0;
        if (a.k == 1) {
            w.second[s] = -1;
            continue;
        }
        int i2 = -1;
        float best = 0.0f;
        for (int e = 0; e < E; e++) {
            if (e == i1)
                continue;
            float v = a.sampling ? l[e] + moe_route_gumbel(a.seed, a.stream, tok, E, e) : l[e];
            if (i2 < 0 || v > best) {
                i2 = e;
                best = v;
            }
        }
        w.second[s] = i2;
        float g1 = p[i1], g2 = p[i2];
        if (a.norm_before) {
            float d = g1 + g2;
            if (d < FLT_EPSILON)
                d = FLT_EPSILON;
            g1 /= d;
            g2 /= d;
            a.weight[s * 2] = g1;
            a.weight[s * 2 + 1] = g2;
        }
        bool claim2 = !is_pad;
        if (a.random) {
            float u = moe_philox_uniform(a.seed, a.stream ^ ROUTE_RANDOM_STREAM, (uint64_t)tok);
            claim2 = claim2 && 2.0f * g2 > u;
        }
        a.expert[s * 2 + 1] = is_pad ? -1 : i2;
        w.claim[s * 2 + 1] = claim2;
    }
}

/* step 2: block e < E: me, first-choice count, histograms of expert e;
 * block E: the entropy sum */
static __global__ void route_stats_kernel(route_k a, route_ws w, double *ent_sum)
{
    __shared__ double sh[32];
    const int e = blockIdx.x;
    if (e == a.E) {
        double s_ent = 0.0;
        for (int64_t s = threadIdx.x; s < a.S; s += blockDim.x)
            s_ent += w.ent[s];
        s_ent = moe_cuda_block_sum_d(s_ent, sh);
        if (threadIdx.x == 0)
            *ent_sum = s_ent;
        return;
    }
    double me = 0.0, t1 = 0.0, h1 = 0.0, h2 = 0.0;
    for (int64_t s = threadIdx.x; s < a.S; s += blockDim.x) {
        me += (double)a.probs[s * a.E + e];
        t1 += a.expert[s * 2] == e;
        h1 += w.first[s] == e;
        h2 += w.second[s] == e;
    }
    me = moe_cuda_block_sum_d(me, sh);
    t1 = moe_cuda_block_sum_d(t1, sh);
    h1 = moe_cuda_block_sum_d(h1, sh);
    h2 = moe_cuda_block_sum_d(h2, sh);
    if (threadIdx.x == 0) {
        w.me[e] = me;
        w.tot1[e] = (int64_t)t1;
        w.hist1[e] = (int64_t)h1;
        w.hist2[e] = (int64_t)h2;
    }
}

static __global__ void iota_kernel(int32_t *x, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] = (int32_t)i;
}

/* Exclusive prefix of a 0/1 flag over the block; *total gets the block's count. */
static __device__ __forceinline__ int64_t block_flag_scan(bool f, int *sh, int64_t *total)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const unsigned m = __ballot_sync(0xffffffffu, f);
    const int before = __popc(m & ((1u << lane) - 1u));
    __syncthreads(); /* sh may still be read from the previous chunk */
    if (lane == 0)
        sh[warp] = __popc(m);
    __syncthreads();
    int64_t off = 0, tot = 0;
    for (int i = 0; i < nw; i++) {
        if (i < warp)
            off += sh[i];
        tot += sh[i];
    }
    *total = tot;
    return off + before;
}

/* step 4: one block per expert, claims in token or priority order */
static __global__ void route_capacity_kernel(route_k a, route_ws w)
{
    __shared__ int sh[32];
    const int e = blockIdx.x;
    const int64_t C = a.C;
    int64_t run = 0;
    for (int64_t r0 = 0; r0 < a.S; r0 += blockDim.x) {
        const int64_t r = r0 + threadIdx.x;
        const int64_t s = r < a.S ? (a.prioritized ? w.order[r] : r) : 0;
        const bool f = r < a.S && w.claim[s * 2] && a.expert[s * 2] == e;
        int64_t total;
        const int64_t loc = run + block_flag_scan(f, sh, &total);
        if (f)
            a.slot[s * 2] = loc < C ? (int32_t)loc : -1;
        run += total;
    }
    const int64_t first_claims = run;
    int64_t run2 = 0, over2 = 0;
    if (a.k == 2) {
        for (int64_t r0 = 0; r0 < a.S; r0 += blockDim.x) {
            const int64_t r = r0 + threadIdx.x;
            const int64_t s = r < a.S ? (a.prioritized ? w.order[r] : r) : 0;
            const bool f = r < a.S && w.claim[s * 2 + 1] && a.expert[s * 2 + 1] == e;
            int64_t total;
            const int64_t loc = first_claims + run2 + block_flag_scan(f, sh, &total);
            if (f)
                a.slot[s * 2 + 1] = loc < C ? (int32_t)loc : -1;
            run2 += total;
        }
        /* claims at first_claims + 0 .. run2-1; those at C or above overflow */
        int64_t lo = first_claims > C ? first_claims : C;
        over2 = first_claims + run2 > lo ? first_claims + run2 - lo : 0;
    }
    if (threadIdx.x == 0) {
        w.over1[e] = first_claims > C ? first_claims - C : 0;
        w.claims2[e] = run2;
        w.over2[e] = over2;
    }
}

/* step 5: combine weights, one thread per token */
static __global__ void route_weight_kernel(route_k a)
{
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < a.S; s += (int64_t)gridDim.x * blockDim.x) {
        const float *p = a.probs + s * a.E;
        const bool kept1 = a.slot[s * 2] >= 0, kept2 = a.slot[s * 2 + 1] >= 0;
        float w1, w2 = 0.0f;
        if (a.k == 1) {
            w1 = kept1 ? p[a.expert[s * 2]] : 0.0f;
        } else if (a.norm_before) {
            w1 = kept1 ? a.weight[s * 2] : 0.0f;
            w2 = kept2 ? a.weight[s * 2 + 1] : 0.0f;
        } else {
            float g1 = kept1 ? p[a.expert[s * 2]] : 0.0f;
            float g2 = kept2 ? p[a.expert[s * 2 + 1]] : 0.0f;
            float d = g1 + g2;
            if (d < FLT_EPSILON)
                d = FLT_EPSILON;
            w1 = g1 / d;
            w2 = g2 / d;
        }
        if (kept1 && w1 == 0.0f)
            a.slot[s * 2] = -1;
        if (kept2 && w2 == 0.0f)
            a.slot[s * 2 + 1] = -1;
        a.weight[s * 2] = w1;
        a.weight[s * 2 + 1] = w2;
    }
}

/* step 6: l_aux and metrics, one thread */
static __global__ void route_finish_kernel(route_k a, route_ws w, const double *ent_sum, float *l_aux, float *m)
{
    if (threadIdx.x != 0 || blockIdx.x != 0)
        return;
    const int E = a.E;
    const int64_t S = a.S;
    double laux = 0.0;
    int64_t claims1 = 0, over1 = 0, claims2 = 0, over2 = 0;
    for (int e = 0; e < E; e++) {
        laux += (w.me[e] / (double)S) * ((double)w.tot1[e] / (double)S);
        claims1 += w.tot1[e];
        over1 += w.over1[e];
        claims2 += w.claims2[e];
        over2 += w.over2[e];
    }
    *l_aux = (float)(laux * (double)E);
    m[MOE_METRIC_OVERFLOW_EXPERT1] = a.k == 2 && claims1 > 0 ? (100.0f * (float)over1) / (float)claims1 : 0.0f;
    m[MOE_METRIC_OVERFLOW_EXPERT2] = a.k == 2 && claims2 > 0 ? (100.0f * (float)over2) / (float)claims2 : 0.0f;
    m[MOE_METRIC_ENTROPY_GATING] = (float)(*ent_sum / (double)S);
    moe_route_hist_metrics(w.hist1, w.sorted, E, S, &m[MOE_METRIC_UNUSED_EXPERT1_COUNT],
                           &m[MOE_METRIC_EXPERT1_BALANCE_TOP], &m[MOE_METRIC_EXPERT1_BALANCE_BOTTOM]);
    if (a.k == 2) {
        moe_route_hist_metrics(w.hist2, w.sorted, E, S, &m[MOE_METRIC_UNUSED_EXPERT2_COUNT],
                               &m[MOE_METRIC_EXPERT2_BALANCE_TOP], &m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM]);
    } else {
        m[MOE_METRIC_UNUSED_EXPERT2_COUNT] = 0.0f;
        m[MOE_METRIC_EXPERT2_BALANCE_TOP] = 0.0f;
        m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM] = 0.0f;
    }
}

/* ------------------------------------------------- top-k router, forward */

/* tokens per loss segment: the batch, or a sequence */
static __host__ __device__ int64_t topk_segment(const moe_route_args &a)
{
    return a.aux == MOE_AUX_SEQ ? a.seq_len : a.S;
}

/* step 1: one thread per token */
static __global__ void topk_token_kernel(moe_route_args a, route_ws w)
{
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < a.S; s += (int64_t)gridDim.x * blockDim.x) {
        const moe_topk_token t = moe_route_topk_token(&a, s);
        w.ent[s] = t.entropy;
        w.z[s] = t.lse * t.lse;
        w.norm[s] = t.norm;
        w.first[s] = t.first;
        w.second[s] = t.second;
    }
}

/* the tokens whose first and second preference is expert e (block-wide
 * sums, in every thread) */
static __device__ void preference_counts(const moe_route_args &a, const route_ws &w, int e, double *sh, double *h1,
                                         double *h2)
{
    double c1 = 0.0, c2 = 0.0;
    for (int64_t s = threadIdx.x; s < a.S; s += blockDim.x) {
        c1 += w.first[s] == e;
        c2 += w.second[s] == e;
    }
    *h1 = moe_cuda_block_sum_d(c1, sh);
    *h2 = moe_cuda_block_sum_d(c2, sh);
}

/* step 2: block e < E: sum over segments of P_e * choices_e (into me[e]),
 * choices, histograms and load of expert e; block E: entropy and z sums */
static __global__ void topk_stats_kernel(moe_route_args a, route_ws w, double *sums)
{
    __shared__ double sh[32];
    const int e = blockIdx.x, E = a.E, k = a.k, W = moe_route_width(&a);
    if (e == E) {
        double s_ent = 0.0, s_z = 0.0;
        for (int64_t s = threadIdx.x; s < a.S; s += blockDim.x) {
            s_ent += w.ent[s];
            s_z += w.z[s];
        }
        s_ent = moe_cuda_block_sum_d(s_ent, sh);
        s_z = moe_cuda_block_sum_d(s_z, sh);
        if (threadIdx.x == 0) {
            sums[0] = s_ent;
            sums[1] = s_z;
        }
        return;
    }
    const int64_t T = topk_segment(a), nseg = a.S / T;
    double term = 0.0, tot = 0.0;
    for (int64_t b = 0; b < nseg; b++) {
        double pe = 0.0, ce = 0.0;
        for (int64_t s = b * T + threadIdx.x; s < (b + 1) * T; s += blockDim.x) {
            pe += (double)a.probs[s * E + e] / w.norm[s];
            for (int j = 0; j < k; j++)
                ce += a.expert[s * W + j] == e;
        }
        pe = moe_cuda_block_sum_d(pe, sh);
        ce = moe_cuda_block_sum_d(ce, sh);
        term += pe * ce;
        tot += ce;
    }
    double h1, h2;
    preference_counts(a, w, e, sh, &h1, &h2);
    if (threadIdx.x == 0) {
        w.me[e] = term;
        w.tot1[e] = (int64_t)tot;
        w.hist1[e] = (int64_t)h1;
        w.hist2[e] = (int64_t)h2;
        if (a.expert_load != NULL)
            a.expert_load[e] += (float)tot;
    }
}

/* step 3: one block per expert; claims (slot 1) become slots */
static __global__ void topk_capacity_kernel(moe_route_args a, route_ws w)
{
    __shared__ int sh[32];
    const int e = blockIdx.x, W = moe_route_width(&a);
    const int64_t C = a.capacity;
    int64_t run = 0, over1 = 0, claims2 = 0, over2 = 0;
    for (int j = 0; j < a.k; j++) {
        const int64_t start = run;
        for (int64_t r0 = 0; r0 < a.S; r0 += blockDim.x) {
            const int64_t s = r0 + threadIdx.x;
            const bool f = s < a.S && a.expert[s * W + j] == e && a.slot[s * W + j] == 1;
            int64_t total;
            const int64_t loc = run + block_flag_scan(f, sh, &total);
            if (f)
                a.slot[s * W + j] = loc < C ? (int32_t)loc : -1;
            run += total;
        }
        /* claims at start .. run-1; those at C or above overflow */
        const int64_t lo = start > C ? start : C, over = run > lo ? run - lo : 0;
        if (j == 0) {
            over1 = over;
        } else {
            over2 += over;
            claims2 += run - start;
        }
    }
    if (threadIdx.x == 0) {
        w.over1[e] = over1;
        w.claims2[e] = claims2;
        w.over2[e] = over2;
    }
}

/* step 4: dropped assignments weigh 0; a kept weight of 0 is not dispatched */
static __global__ void topk_weight_kernel(moe_route_args a)
{
    const int64_t n = a.S * moe_route_width(&a);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        if (a.slot[i] < 0)
            a.weight[i] = 0.0f;
        else if (a.weight[i] == 0.0f)
            a.slot[i] = -1;
    }
}

/* step 5: l_aux, gate_metrics and metrics, one thread */
static __global__ void topk_finish_kernel(moe_route_args a, route_ws w, const double *sums)
{
    if (threadIdx.x != 0 || blockIdx.x != 0)
        return;
    const int E = a.E;
    const int64_t S = a.S, T = topk_segment(a), nseg = S / T;
    double laux = 0.0;
    int64_t claims1 = 0, over1 = 0, claims2 = 0, over2 = 0;
    for (int e = 0; e < E; e++) {
        laux += w.me[e];
        claims1 += w.tot1[e] - w.claims2[e];
        over1 += w.over1[e];
        claims2 += w.claims2[e];
        over2 += w.over2[e];
    }
    const double zl = (double)a.z_loss_coeff * sums[1] / (double)S;
    const double aux =
        a.aux == MOE_AUX_NONE ? 0.0 : laux * (double)E / ((double)nseg * (double)T * (double)T * a.k);
    *a.l_aux = (float)(aux + zl);
    if (a.gate_metrics != NULL)
        a.gate_metrics[MOE_GATE_METRIC_Z_LOSS] = (float)zl;
    float *m = a.metrics;
    m[MOE_METRIC_OVERFLOW_EXPERT1] = claims1 > 0 ? (100.0f * (float)over1) / (float)claims1 : 0.0f;
    m[MOE_METRIC_OVERFLOW_EXPERT2] = claims2 > 0 ? (100.0f * (float)over2) / (float)claims2 : 0.0f;
    m[MOE_METRIC_ENTROPY_GATING] = (float)(sums[0] / (double)S);
    moe_route_hist_metrics(w.hist1, w.sorted, E, S, &m[MOE_METRIC_UNUSED_EXPERT1_COUNT],
                           &m[MOE_METRIC_EXPERT1_BALANCE_TOP], &m[MOE_METRIC_EXPERT1_BALANCE_BOTTOM]);
    if (a.k >= 2) {
        moe_route_hist_metrics(w.hist2, w.sorted, E, S, &m[MOE_METRIC_UNUSED_EXPERT2_COUNT],
                               &m[MOE_METRIC_EXPERT2_BALANCE_TOP], &m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM]);
    } else {
        m[MOE_METRIC_UNUSED_EXPERT2_COUNT] = 0.0f;
        m[MOE_METRIC_EXPERT2_BALANCE_TOP] = 0.0f;
        m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM] = 0.0f;
    }
}

static moe_status topk_forward(moe_ctx *c, const moe_route_args *a, const route_ws &w)
{
    double *sums = (double *)c->scratch;
    const unsigned tb = moe_cuda_blocks(c, a->S, ROUTE_THREADS);
    topk_token_kernel<<<tb, ROUTE_THREADS, 0, c->stream>>>(*a, w);
    MOE_CUDA_CHECK_LAUNCH(c);
    topk_stats_kernel<<<a->E + 1, ROUTE_THREADS, 0, c->stream>>>(*a, w, sums);
    MOE_CUDA_CHECK_LAUNCH(c);
    topk_capacity_kernel<<<a->E, SCAN_THREADS, 0, c->stream>>>(*a, w);
    MOE_CUDA_CHECK_LAUNCH(c);
    topk_weight_kernel<<<moe_cuda_blocks(c, a->S * moe_route_width(a), ROUTE_THREADS), ROUTE_THREADS, 0,
                         c->stream>>>(*a);
    MOE_CUDA_CHECK_LAUNCH(c);
    topk_finish_kernel<<<1, 32, 0, c->stream>>>(*a, w, sums);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* ------------------------------------------------------ expert choice */

#define EC_TILE 256

/* step 1: one thread per token */
static __global__ void ec_token_kernel(moe_route_args a, route_ws w)
{
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < a.S; s += (int64_t)gridDim.x * blockDim.x) {
        const moe_topk_token t = moe_route_ec_token(&a, s);
        w.ent[s] = t.entropy;
        w.first[s] = t.first;
        w.second[s] = t.second;
    }
}

/* expert e's selection key of token s: its score, or -1 for a pad */
static __device__ __forceinline__ float ec_key(const moe_route_args &a, int64_t s, int e)
{
    return a.pad != NULL && a.pad[s] ? -1.0f : a.probs[s * a.E + e];
}

/* step 2: thread (s, e) of grid (token tiles, E); every thread of the block
 * loads the tiles, whether or not its token exists */
static __global__ void ec_select_kernel(moe_route_args a)
{
    __shared__ float key[EC_TILE];
    const int e = blockIdx.y;
    const int64_t s = (int64_t)blockIdx.x * EC_TILE + threadIdx.x;
    const float v = s < a.S ? ec_key(a, s, e) : -1.0f;
    int64_t rank = 0;
    for (int64_t t0 = 0; t0 < a.S; t0 += EC_TILE) {
        __syncthreads();
        if (t0 + threadIdx.x < a.S)
            key[threadIdx.x] = ec_key(a, t0 + threadIdx.x, e);
        __syncthreads();
        const int n = a.S - t0 < EC_TILE ? (int)(a.S - t0) : EC_TILE;
        for (int j = 0; j < n; j++)
            rank += key[j] >= 0.0f && moe_route_ec_before(key[j], t0 + j, v, s);
    }
    if (s < a.S && v >= 0.0f && rank < a.capacity) {
        const int64_t i = s * a.E + e;
        a.expert[i] = e;
        a.weight[i] = v;
        a.slot[i] = v != 0.0f ? (int32_t)rank : -1;
    }
}

/* step 3: block e < E: histograms of expert e; block E: sums[0] entropy,
 * sums[1] non-pad tokens no expert took, sums[2] non-pad tokens */
static __global__ void ec_stats_kernel(moe_route_args a, route_ws w, double *sums)
{
    __shared__ double sh[32];
    const int e = blockIdx.x, E = a.E;
    if (e == E) {
        double ent = 0.0, untaken = 0.0, tokens = 0.0;
        for (int64_t s = threadIdx.x; s < a.S; s += blockDim.x) {
            ent += w.ent[s];
            if (a.pad != NULL && a.pad[s])
                continue;
            int taken = 0;
            for (int x = 0; x < E; x++)
                taken |= a.slot[s * E + x] >= 0;
            tokens += 1.0;
            untaken += !taken;
        }
        ent = moe_cuda_block_sum_d(ent, sh);
        untaken = moe_cuda_block_sum_d(untaken, sh);
        tokens = moe_cuda_block_sum_d(tokens, sh);
        if (threadIdx.x == 0) {
            sums[0] = ent;
            sums[1] = untaken;
            sums[2] = tokens;
        }
        return;
    }
    double h1, h2;
    preference_counts(a, w, e, sh, &h1, &h2);
    if (threadIdx.x == 0) {
        w.hist1[e] = (int64_t)h1;
        w.hist2[e] = (int64_t)h2;
    }
}

/* step 4: one thread */
static __global__ void ec_finish_kernel(moe_route_args a, route_ws w, const double *sums)
{
    if (threadIdx.x != 0 || blockIdx.x != 0)
        return;
    const int E = a.E;
    *a.l_aux = 0.0f;
    if (a.gate_metrics != NULL)
        a.gate_metrics[MOE_GATE_METRIC_Z_LOSS] = 0.0f;
    float *m = a.metrics;
    const int64_t untaken = (int64_t)sums[1], tokens = (int64_t)sums[2];
    m[MOE_METRIC_OVERFLOW_EXPERT1] = tokens > 0 ? (100.0f * (float)untaken) / (float)tokens : 0.0f;
    m[MOE_METRIC_OVERFLOW_EXPERT2] = 0.0f;
    m[MOE_METRIC_ENTROPY_GATING] = (float)(sums[0] / (double)a.S);
    moe_route_hist_metrics(w.hist1, w.sorted, E, a.S, &m[MOE_METRIC_UNUSED_EXPERT1_COUNT],
                           &m[MOE_METRIC_EXPERT1_BALANCE_TOP], &m[MOE_METRIC_EXPERT1_BALANCE_BOTTOM]);
    moe_route_hist_metrics(w.hist2, w.sorted, E, a.S, &m[MOE_METRIC_UNUSED_EXPERT2_COUNT],
                           &m[MOE_METRIC_EXPERT2_BALANCE_TOP], &m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM]);
}

static moe_status ec_forward(moe_ctx *c, const moe_route_args *a, const route_ws &w)
{
    double *sums = (double *)c->scratch;
    ec_token_kernel<<<moe_cuda_blocks(c, a->S, ROUTE_THREADS), ROUTE_THREADS, 0, c->stream>>>(*a, w);
    MOE_CUDA_CHECK_LAUNCH(c);
    dim3 grid((unsigned)((a->S + EC_TILE - 1) / EC_TILE), (unsigned)a->E);
    ec_select_kernel<<<grid, EC_TILE, 0, c->stream>>>(*a);
    MOE_CUDA_CHECK_LAUNCH(c);
    ec_stats_kernel<<<a->E + 1, ROUTE_THREADS, 0, c->stream>>>(*a, w, sums);
    MOE_CUDA_CHECK_LAUNCH(c);
    ec_finish_kernel<<<1, 32, 0, c->stream>>>(*a, w, sums);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

static __global__ void ec_backward_kernel(moe_route_args a, const float *dweight, float *dlogits)
{
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < a.S; s += (int64_t)gridDim.x * blockDim.x)
        moe_route_ec_token_backward(&a, s, dweight, dlogits);
}

moe_status moe_cuda_route_forward(moe_ctx *c, const moe_route_args *a)
{
    MOE_TRY(check_route_args(c, "route_forward", a));
    if (a->logits == NULL || a->weight == NULL || a->l_aux == NULL || a->metrics == NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda route_forward: expected logits, weight, l_aux and metrics buffers, found NULL");
    route_ws w;
    ws_carve(a->workspace, a->S, a->E, &w);
    if (a->expert_choice)
        return ec_forward(c, a, w);
    if (a->topk)
        return topk_forward(c, a, w);
    route_k k;
    k.S = a->S;
    k.C = a->capacity;
    k.E = a->E;
    k.k = a->k;
    k.sampling = a->k == 2 && a->policy == MOE_ROUTE_SAMPLING;
    k.random = a->k == 2 && a->policy == MOE_ROUTE_RANDOM;
    k.norm_before = a->k == 2 && a->normalize_before_drop;
    k.prioritized = a->batch_prioritized != 0;
    k.seed = a->seed;
    k.stream = a->stream;
    k.logits = a->logits;
    k.pad = a->pad;
    k.noise_index = a->noise_index;
    k.probs = a->probs;
    k.weight = a->weight;
    k.expert = a->expert;
    k.slot = a->slot;
    double *ent_sum = (double *)c->scratch;
    const unsigned tb = moe_cuda_blocks(c, a->S, ROUTE_THREADS);

    route_token_kernel<<<tb, ROUTE_THREADS, 0, c->stream>>>(k, w);
    MOE_CUDA_CHECK_LAUNCH(c);
    route_stats_kernel<<<a->E + 1, ROUTE_THREADS, 0, c->stream>>>(k, w, ent_sum);
    MOE_CUDA_CHECK_LAUNCH(c);
    if (k.prioritized) {
        iota_kernel<<<tb, ROUTE_THREADS, 0, c->stream>>>(w.iota, a->S);
        MOE_CUDA_CHECK_LAUNCH(c);
        size_t bytes = w.cub_bytes;
        MOE_CUDA_TRY(c, cub::DeviceRadixSort::SortPairsDescending(w.cub_temp, bytes, w.key, w.key_sorted, w.iota,
                                                                  w.order, (int)a->S, 0, 32, c->stream));
    }
    route_capacity_kernel<<<a->E, SCAN_THREADS, 0, c->stream>>>(k, w);
    MOE_CUDA_CHECK_LAUNCH(c);
    route_weight_kernel<<<tb, ROUTE_THREADS, 0, c->stream>>>(k);
    MOE_CUDA_CHECK_LAUNCH(c);
    route_finish_kernel<<<1, 32, 0, c->stream>>>(k, w, ent_sum, a->l_aux, a->metrics);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* ------------------------------------------------------------- backward */

/* first choices after pad masking, per expert (one block each) */
static __global__ void route_count_kernel(const int32_t *expert, int64_t S, int64_t *tot1)
{
    __shared__ double sh[32];
    const int e = blockIdx.x;
    double t = 0.0;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
        t += expert[s * 2] == e;
    t = moe_cuda_block_sum_d(t, sh);
    if (threadIdx.x == 0)
        tot1[e] = (int64_t)t;
}

/* gradient of w_j = g_j / max(g1 + g2, eps), as the cpu writes it */
static __device__ __forceinline__ void normalize_grad(double g1, double g2, double dw1, double dw2, double *dg1,
                                                      double *dg2)
{
    double d = g1 + g2;
    if (d >= (double)FLT_EPSILON) {
        *dg1 = (dw1 - dw2) * g2 / (d * d);
        *dg2 = (dw2 - dw1) * g1 / (d * d);
    } else {
        *dg1 = dw1 / (double)FLT_EPSILON;
        *dg2 = dw2 / (double)FLT_EPSILON;
    }
}

static __global__ void route_backward_kernel(route_k a, const int64_t *tot1, const float *dweight, double laux_scale,
                                             float *dlogits)
{
    for (int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < a.S; s += (int64_t)gridDim.x * blockDim.x) {
        const int E = a.E;
        const float *p = a.probs + s * E;
        const int i1 = a.expert[s * 2], i2 = a.k == 2 ? a.expert[s * 2 + 1] : -1;
        const bool kept1 = i1 >= 0 && a.slot[s * 2] >= 0;
        const bool kept2 = i2 >= 0 && a.slot[s * 2 + 1] >= 0;
        const double dw1 = kept1 ? (double)dweight[s * 2] : 0.0;
        const double dw2 = kept2 ? (double)dweight[s * 2 + 1] : 0.0;
        double add1 = 0.0, add2 = 0.0; /* added to dp[i1], dp[i2] */
        int at1 = -1, at2 = -1;
        if (a.k == 1) {
            if (kept1) {
                add1 = dw1;
                at1 = i1;
            }
        } else if (a.norm_before) {
            if (i1 >= 0 && i2 >= 0) {
                normalize_grad((double)p[i1], (double)p[i2], dw1, dw2, &add1, &add2);
                at1 = i1;
                at2 = i2;
            }
        } else {
            normalize_grad(kept1 ? (double)p[i1] : 0.0, kept2 ? (double)p[i2] : 0.0, dw1, dw2, &add1, &add2);
            at1 = kept1 ? i1 : -1;
            at2 = kept2 ? i2 : -1;
        }
        double dot = 0.0;
        for (int e = 0; e < E; e++) {
            double dp = laux_scale * (double)tot1[e];
            if (e == at1)
                dp += add1;
            if (e == at2)
                dp += add2;
            dot += (double)p[e] * dp;
        }
        for (int e = 0; e < E; e++) {
            double dp = laux_scale * (double)tot1[e];
            if (e == at1)
                dp += add1;
            if (e == at2)
                dp += add2;
            dlogits[s * E + e] = (float)((double)p[e] * (dp - dot));
        }
    }
}

/* top-k: block (x, y) takes chunk x of the tokens of segments y, y +
 * gridDim.y, ...; the segment's choices per expert are counted in shared
 * memory (E ints) first */
static __global__ void topk_backward_kernel(moe_route_args a, const float *dweight, double aux_scale, double z_scale,
                                            float *dlogits)
{
    extern __shared__ int cnt[];
    const int E = a.E, k = a.k, W = moe_route_width(&a);
    const int64_t T = topk_segment(a), nseg = a.S / T;
    for (int64_t b = blockIdx.y; b < nseg; b += gridDim.y) {
        __syncthreads(); /* the previous segment's counts are no longer read */
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            cnt[e] = 0;
        __syncthreads();
        for (int64_t i = b * T * W + threadIdx.x; i < (b + 1) * T * W; i += blockDim.x) {
            const int e = a.expert[i];
            if (i % W < k && e >= 0 && e < E)
                atomicAdd(&cnt[e], 1);
        }
        __syncthreads();
        for (int64_t s = b * T + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; s < (b + 1) * T;
             s += (int64_t)gridDim.x * blockDim.x)
            moe_route_topk_token_backward(&a, s, dweight, cnt, aux_scale, z_scale, dlogits);
    }
}

static moe_status topk_backward(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux,
                                float *dlogits)
{
    if (a->z_loss_coeff != 0.0f && a->logits == NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda route_backward: expected the logits for the z-loss's gradient, found NULL");
    const int64_t T = topk_segment(*a), nseg = a->S / T;
    const double aux_scale = a->aux == MOE_AUX_NONE ? 0.0
                                                    : (double)dl_aux * (double)a->E /
                                                          ((double)nseg * (double)T * (double)T * a->k);
    const double z_scale = (double)dl_aux * (double)a->z_loss_coeff * 2.0 / (double)a->S;
    const int64_t chunks = (T + ROUTE_THREADS - 1) / ROUTE_THREADS;
    dim3 grid((unsigned)(chunks < 64 ? chunks : 64), (unsigned)(nseg < 65535 ? nseg : 65535));
    topk_backward_kernel<<<grid, ROUTE_THREADS, (size_t)a->E * sizeof(int), c->stream>>>(*a, dweight, aux_scale,
                                                                                         z_scale, dlogits);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_route_backward(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux,
                                   float *dlogits)
{
    MOE_TRY(check_route_args(c, "route_backward", a));
    if (dweight == NULL || dlogits == NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda route_backward: expected dweight and dlogits, found NULL");
    if (a->expert_choice) {
        ec_backward_kernel<<<moe_cuda_blocks(c, a->S, ROUTE_THREADS), ROUTE_THREADS, 0, c->stream>>>(*a, dweight,
                                                                                                  dlogits);
        MOE_CUDA_CHECK_LAUNCH(c);
        return MOE_OK;
    }
    if (a->topk)
        return topk_backward(c, a, dweight, dl_aux, dlogits);
    route_ws w;
    ws_carve(a->workspace, a->S, a->E, &w);
    route_k k;
    memset(&k, 0, sizeof k);
    k.S = a->S;
    k.E = a->E;
    k.k = a->k;
    k.norm_before = a->k == 2 && a->normalize_before_drop;
    k.probs = a->probs;
    k.expert = a->expert;
    k.slot = a->slot;
    const double laux_scale = (double)dl_aux * (double)a->E / ((double)a->S * (double)a->S);
    route_count_kernel<<<a->E, ROUTE_THREADS, 0, c->stream>>>(a->expert, a->S, w.tot1);
    MOE_CUDA_CHECK_LAUNCH(c);
    route_backward_kernel<<<moe_cuda_blocks(c, a->S, ROUTE_THREADS), ROUTE_THREADS, 0, c->stream>>>(
        k, w.tot1, dweight, laux_scale, dlogits);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* ------------------------------------------------- dispatch and combine */

static moe_status check_assign(moe_ctx *c, const char *op, const int32_t *expert, const int32_t *slot, int64_t S,
                               int W, int E, int64_t C, int64_t d, moe_dtype dt)
{
    if (S < 0 || W < 1 || E < 1 || C < 0 || d < 0 || !moe_cuda_is_float(dt))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda %s: expected S >= 0, W >= 1, E >= 1, C >= 0, d >= 0 and a float dtype, found "
                             "S = %lld, W = %d, E = %d, C = %lld, d = %lld, %s",
                             op, (long long)S, W, E, (long long)C, (long long)d, moe_cuda_dtype_name(dt));
    if (S > 0 && (expert == NULL || slot == NULL))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected expert and slot arrays, found NULL", op);
    return MOE_OK;
}

static __device__ __forceinline__ int64_t assign_row(const int32_t *expert, const int32_t *slot, int64_t i,
                                                      int64_t C)
{
    return expert[i] >= 0 && slot[i] >= 0 ? (int64_t)expert[i] * C + slot[i] : -1;
}

/* each kept assignment owns its row: one writer per element */
static __global__ void dispatch_scatter_kernel(void *out, const void *x, const int32_t *expert, const int32_t *slot,
                                               int64_t S, int W, int64_t C, int64_t d, moe_dtype dt)
{
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < W * S * d; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = e / d, j = e % d, r = assign_row(expert, slot, i, C);
        if (r >= 0)
            moe_cuda_st(out, dt, r * d + j, moe_cuda_ld(x, dt, (i / W) * d + j));
    }
}

/* choices summed in the order j = 0..W-1, as the cpu reference */
static __global__ void dispatch_gather_kernel(void *dx, const void *dout, const int32_t *expert, const int32_t *slot,
                                              int64_t S, int W, int64_t C, int64_t d, moe_dtype dt)
{
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < S * d; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t s = e / d, j = e % d;
        bool any = false;
        double acc = 0.0;
        for (int k = 0; k < W; k++) {
            int64_t r = assign_row(expert, slot, s * W + k, C);
            if (r < 0)
                continue;
            if (!any)
                acc = (double)moe_cuda_ld(dx, dt, e);
            any = true;
            acc += (double)moe_cuda_ld(dout, dt, r * d + j);
        }
        if (any)
            moe_cuda_st(dx, dt, e, (float)acc);
    }
}

static __global__ void combine_kernel(void *y, const void *eout, const int32_t *expert, const int32_t *slot,
                                      const float *weight, int64_t S, int W, int64_t C, int64_t d, moe_dtype dt)
{
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < S * d; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t s = e / d, j = e % d;
        double acc = 0.0;
        for (int k = 0; k < W; k++) {
            int64_t r = assign_row(expert, slot, s * W + k, C);
            if (r >= 0)
                acc += (double)weight[s * W + k] * (double)moe_cuda_ld(eout, dt, r * d + j);
        }
        moe_cuda_st(y, dt, e, (float)acc);
    }
}

/* one warp per assignment: deout row = weight * dy, dweight = <dy, eout row> */
static __global__ void combine_backward_kernel(void *deout, float *dweight, const void *dy, const void *eout,
                                               const int32_t *expert, const int32_t *slot, const float *weight,
                                               int64_t S, int W, int64_t C, int64_t d, moe_dtype dt)
{
    const int lane = threadIdx.x & 31;
    const int64_t nw = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t i = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); i < W * S; i += nw) {
        const int64_t r = assign_row(expert, slot, i, C), s = i / W;
        if (r < 0) {
            if (lane == 0)
                dweight[i] = 0.0f;
            continue;
        }
        const float w = weight[i];
        double dot = 0.0;
        for (int64_t j = lane; j < d; j += 32) {
            float g = moe_cuda_ld(dy, dt, s * d + j);
            dot += (double)g * (double)moe_cuda_ld(eout, dt, r * d + j);
            moe_cuda_st(deout, dt, r * d + j, w * g);
        }
        dot = moe_cuda_warp_sum_d(dot);
        if (lane == 0)
            dweight[i] = (float)dot;
    }
}

/* The ops of two choices per token are the wide ops at W = 2. */

moe_status moe_cuda_dispatch_wide_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                          const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                          moe_dtype dt)
{
    MOE_TRY(check_assign(c, "dispatch_forward", expert, slot, S, W, E, C, d, dt));
    const int64_t rows = (int64_t)E * C;
    if (rows * d > 0)
        MOE_CUDA_TRY(c, cudaMemsetAsync(out, 0, (size_t)(rows * d) * moe_dtype_size(dt), c->stream));
    if (S == 0 || d == 0)
        return MOE_OK;
    dispatch_scatter_kernel<<<moe_cuda_blocks(c, W * S * d, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        out, x, expert, slot, S, W, C, d, dt);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_dispatch_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                     const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cuda_dispatch_wide_forward(c, out, x, expert, slot, S, 2, E, C, d, dt);
}

moe_status moe_cuda_dispatch_wide_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                           const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                           moe_dtype dt)
{
    MOE_TRY(check_assign(c, "dispatch_backward", expert, slot, S, W, E, C, d, dt));
    if (S == 0 || d == 0)
        return MOE_OK;
    dispatch_gather_kernel<<<moe_cuda_blocks(c, S * d, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        dx, dout, expert, slot, S, W, C, d, dt);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_dispatch_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                      const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cuda_dispatch_wide_backward(c, dx, dout, expert, slot, S, 2, E, C, d, dt);
}

moe_status moe_cuda_combine_wide_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert,
                                         const int32_t *slot, const float *weight, int64_t S, int W, int E, int64_t C,
                                         int64_t d, moe_dtype dt)
{
    MOE_TRY(check_assign(c, "combine_forward", expert, slot, S, W, E, C, d, dt));
    if (S > 0 && weight == NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda combine_forward: expected weights, found NULL");
    if (S == 0 || d == 0)
        return MOE_OK;
    combine_kernel<<<moe_cuda_blocks(c, S * d, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        y, eout, expert, slot, weight, S, W, C, d, dt);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_combine_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert, const int32_t *slot,
                                    const float *weight, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cuda_combine_wide_forward(c, y, eout, expert, slot, weight, S, 2, E, C, d, dt);
}

moe_status moe_cuda_combine_wide_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                          const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                          int W, int E, int64_t C, int64_t d, moe_dtype dt)
{
    MOE_TRY(check_assign(c, "combine_backward", expert, slot, S, W, E, C, d, dt));
    if (S > 0 && (weight == NULL || dweight == NULL))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda combine_backward: expected weight and dweight, found NULL");
    const int64_t rows = (int64_t)E * C;
    if (rows * d > 0)
        MOE_CUDA_TRY(c, cudaMemsetAsync(deout, 0, (size_t)(rows * d) * moe_dtype_size(dt), c->stream));
    if (S == 0)
        return MOE_OK;
    combine_backward_kernel<<<moe_cuda_blocks(c, W * S * 32, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        deout, dweight, dy, eout, expert, slot, weight, S, W, C, d, dt);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_combine_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                     const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                     int E, int64_t C, int64_t d, moe_dtype dt)
{
    return moe_cuda_combine_wide_backward(c, deout, dweight, dy, eout, expert, slot, weight, S, 2, E, C, d, dt);
}
