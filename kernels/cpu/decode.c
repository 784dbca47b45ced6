/* decode.c: the cpu reference of the decoding ops (ops.h, "decoding"):
 * embedding at given positions, the row-wise Linear with its fused LayerNorm
 * and epilogues, attention against a per-row K/V cache, the no-drop top-k
 * gate, the experts of the routed tokens only, and the logits statistics a
 * sampler reads.
 *
 * Plain loops, written to be read next to ops.h: each op computes what the
 * unfused training ops would (layernorm_forward, matmul, attention_forward,
 * route_forward, dispatch/experts/combine) and rounds where they store.
 * There is no backward and no graph recording here: the cpu runs each op
 * when it is called, so the table's graph entries are NULL.
 *
 * Conventions a reader would trip over:
 *  - "rounded to dt" is a store to and load from the storage dtype
 *    (round_dt), so fp32 runs see no rounding at all.
 *  - Attention reads keys j < cache_len from the cache and the newer ones
 *    from the step's own k and v, and writes those into the cache: a step's
 *    own keys never round-trip through the cache before use.
 *  - Expert and pointer tables (w1, b1, w2, b2) are host arrays here, as all
 *    "device" memory of this backend is.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/route_common.h"

#define CPU_ERROR(c, st, ...)                                                                 \
    (((c) != NULL && (c)->host != NULL && (c)->host->error != NULL)                           \
         ? (c)->host->error((c)->host, (st), __VA_ARGS__)                                     \
         : (st))

static int is_float_dtype(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F16 || dt == MOE_BF16; }

static float round_dt(float v, moe_dtype dt)
{
    switch (dt) {
    case MOE_F16: return moe_f16_to_f32(moe_f32_to_f16(v));
    case MOE_BF16: return moe_bf16_to_f32(moe_f32_to_bf16(v));
    default: return v;
    }
}

static const void *at(const void *p, moe_dtype dt, int64_t elems)
{
    return (const unsigned char *)p + elems * (int64_t)moe_dtype_size(dt);
}

/* out[0..k) = LN(x[0..k)) rounded to dt, as layernorm_forward computes and
 * stores it; or x itself (widened) without layernorm */
static void load_row(float *out, const void *x, int64_t k, int layernorm, const void *lw, const void *lb, float eps,
                     moe_dtype dt)
{
    if (!layernorm) {
        for (int64_t j = 0; j < k; j++)
            out[j] = moe_cpu_load(x, dt, j);
        return;
    }
    double s = 0.0;
    for (int64_t j = 0; j < k; j++)
        s += (double)moe_cpu_load(x, dt, j);
    const double m = s / (double)k;
    double v = 0.0;
    for (int64_t j = 0; j < k; j++) {
        const double d = (double)moe_cpu_load(x, dt, j) - m;
        v += d * d;
    }
    const float mf = (float)m, rf = (float)(1.0 / sqrt(v / (double)k + (double)eps));
    for (int64_t j = 0; j < k; j++) {
        float y = (moe_cpu_load(x, dt, j) - mf) * rf;
        if (lw != NULL)
            y *= moe_cpu_load(lw, dt, j);
        if (lb != NULL)
            y += moe_cpu_load(lb, dt, j);
        out[j] = round_dt(y, dt);
    }
}

static float dot_row(const float *h, const void *w, int64_t row, int64_t k, moe_dtype dt)
{
    float acc = 0.0f;
    for (int64_t p = 0; p < k; p++)
        acc += h[p] * moe_cpu_load(w, dt, row * k + p);
    return acc;
}

/* ------------------------------------------------------------- embedding */

moe_status moe_cpu_embedding_at_forward(moe_ctx *c, void *out, const int32_t *tokens, const int32_t *positions,
                                        const void *table, int64_t N, int64_t C, float scale, int padding_idx,
                                        int sinusoidal, moe_dtype dt)
{
    if (!is_float_dtype(dt) || N < 0 || C < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu embedding_at_forward: expected a float dtype, N >= 0 and C >= 1, found dtype %d, N %lld, "
                         "C %lld",
                         (int)dt, (long long)N, (long long)C);
    const int64_t half = C / 2;
    if (sinusoidal && half < 2)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu embedding_at_forward: sinusoidal positions need C >= 4, found C %lld", (long long)C);
    const float e = sinusoidal ? (float)(log(10000.0) / (double)(half - 1)) : 0.0f;
    for (int64_t n = 0; n < N; n++) {
        const int32_t tok = tokens[n];
        if (tok < 0)
            return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                             "cpu embedding_at_forward: token %d at %lld is negative; expected a dictionary index",
                             (int)tok, (long long)n);
        const int with_pos = sinusoidal && tok != padding_idx;
        const float pos = (float)positions[n];
        for (int64_t j = 0; j < C; j++) {
            float v = scale * moe_cpu_load(table, dt, (int64_t)tok * C + j);
            if (with_pos && j < 2 * half) {
                /* the same fp32 frequencies as embedding_forward */
                const float freq = expf((float)(j < half ? j : j - half) * -e);
                v += j < half ? sinf(pos * freq) : cosf(pos * freq);
            }
            moe_cpu_store(out, dt, n * C + j, v);
        }
    }
    return MOE_OK;
}

/* ------------------------------------------------------------- rowlinear */

moe_status moe_cpu_rowlinear_forward(moe_ctx *c, const moe_rowlinear_desc *d)
{
    if (d == NULL || !is_float_dtype(d->dt) || (d->y_dtype != d->dt && d->y_dtype != MOE_F32) || d->m < 0 ||
        d->n < 0 || d->k < 1 || d->ldy < d->n || (d->rows == NULL && d->ldx < d->k) || d->q_cols < 0 ||
        d->q_cols > d->n)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu rowlinear_forward: expected m, n >= 0, k >= 1, ldx >= k, ldy >= n, 0 <= q_cols <= n and "
                         "y dtype f32 or the storage dtype, found m %lld, n %lld, k %lld, ldx %lld, ldy %lld, q_cols "
                         "%lld",
                         d ? (long long)d->m : -1LL, d ? (long long)d->n : -1LL, d ? (long long)d->k : -1LL,
                         d ? (long long)d->ldx : -1LL, d ? (long long)d->ldy : -1LL, d ? (long long)d->q_cols : -1LL);
    if (d->m == 0 || d->n == 0)
        return MOE_OK;
    float *h = malloc((size_t)d->k * sizeof(float));
    if (h == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu rowlinear_forward: out of host memory for a row of %lld",
                         (long long)d->k);
    const moe_dtype dt = d->dt;
    for (int64_t i = 0; i < d->m; i++) {
        const int64_t src = d->rows != NULL ? (int64_t)d->rows[i] : i;
        load_row(h, at(d->x, dt, src * d->ldx), d->k, d->layernorm, d->ln_weight, d->ln_bias, d->ln_eps, dt);
        for (int64_t j = 0; j < d->n; j++) {
            float v = dot_row(h, d->w, j, d->k, dt);
            if (d->bias != NULL)
                v += moe_cpu_load(d->bias, dt, j);
            if (j >= d->n - d->q_cols)
                v *= d->q_scale;
            if (d->act)
                v = moe_cpu_act(v, d->act_kind);
            const int64_t o = i * d->ldy + j;
            v = round_dt(v, d->y_dtype == MOE_F32 ? MOE_F32 : dt);
            if (d->beta != 0.0f)
                v = d->beta * moe_cpu_load(d->y, d->y_dtype, o) + v;
            moe_cpu_store(d->y, d->y_dtype, o, v);
        }
    }
    free(h);
    return MOE_OK;
}

/* ------------------------------------------------------------- attention */

moe_status moe_cpu_attention_decode(moe_ctx *c, void *out, const void *q, const void *k, const void *v, int64_t ld,
                                    void *k_cache, void *v_cache, const int32_t *cache_len, const int32_t *n_new,
                                    int64_t B, int64_t n, int64_t H, int64_t D, int64_t Tc, moe_dtype dt)
{
    if (!is_float_dtype(dt) || B < 0 || n < 1 || H < 1 || D < 1 || Tc < 1 || ld < H * D)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu attention_decode: expected a float dtype, B >= 0, n, H, D, Tc >= 1 and ld >= H*D, found "
                         "dtype %d, B %lld, n %lld, H %lld, D %lld, Tc %lld, ld %lld",
                         (int)dt, (long long)B, (long long)n, (long long)H, (long long)D, (long long)Tc,
                         (long long)ld);
    for (int64_t b = 0; b < B; b++)
        if (cache_len[b] < 0 || n_new[b] < 0 || n_new[b] > n || (int64_t)cache_len[b] + n_new[b] > Tc)
            return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                             "cpu attention_decode: row %lld has %d cached and %d new positions; expected 0 <= new <= "
                             "%lld and cached + new <= the cache's %lld",
                             (long long)b, (int)cache_len[b], (int)n_new[b], (long long)n, (long long)Tc);
    float *qrow = malloc((size_t)(2 * D + Tc) * sizeof(float));
    if (qrow == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu attention_decode: out of host memory for %lld scores", (long long)Tc);
    float *orow = qrow + D, *prob = orow + D;
    const int64_t C = H * D;
    for (int64_t b = 0; b < B; b++) {
        const int64_t cl = cache_len[b], nn = n_new[b];
        for (int64_t h = 0; h < H; h++) {
            const int64_t cbase = (b * H + h) * Tc * D;
            /* key t of the row: cached below cl, else the step's own row t - cl */
#define KEY_AT(t, buf, cache) ((t) < cl ? at((cache), dt, cbase + (t) * D) : at((buf), dt, (b * n + (t) - cl) * ld + h * D))
            for (int64_t j = 0; j < n; j++) {
                const int64_t o = (b * n + j) * C + h * D;
                if (j >= nn) {
                    for (int64_t x = 0; x < D; x++)
                        moe_cpu_store(out, dt, o + x, 0.0f);
                    continue;
                }
                for (int64_t x = 0; x < D; x++)
                    qrow[x] = moe_cpu_load(q, dt, (b * n + j) * ld + h * D + x);
                const int64_t L = cl + j + 1;
                float mx = -INFINITY;
                for (int64_t t = 0; t < L; t++) {
                    const void *kt = KEY_AT(t, k, k_cache);
                    float s = 0.0f;
                    for (int64_t x = 0; x < D; x++)
                        s += qrow[x] * moe_cpu_load(kt, dt, x);
                    prob[t] = s;
                    if (s > mx)
                        mx = s;
                }
                double sum = 0.0;
                for (int64_t t = 0; t < L; t++) {
                    prob[t] = expf(prob[t] - mx);
                    sum += (double)prob[t];
                }
                const float inv = (float)(1.0 / sum);
                for (int64_t x = 0; x < D; x++)
                    orow[x] = 0.0f;
                for (int64_t t = 0; t < L; t++) {
                    const void *vt = KEY_AT(t, v, v_cache);
                    const float p = prob[t] * inv;
                    for (int64_t x = 0; x < D; x++)
                        orow[x] += p * moe_cpu_load(vt, dt, x);
                }
                for (int64_t x = 0; x < D; x++)
                    moe_cpu_store(out, dt, o + x, orow[x]);
            }
#undef KEY_AT
            /* the step's keys and values join the cache after every query read them */
            for (int64_t j = 0; j < nn; j++)
                for (int64_t x = 0; x < D; x++) {
                    const int64_t src = (b * n + j) * ld + h * D + x, dst = cbase + (cl + j) * D + x;
                    moe_cpu_store(k_cache, dt, dst, moe_cpu_load(k, dt, src));
                    moe_cpu_store(v_cache, dt, dst, moe_cpu_load(v, dt, src));
                }
        }
    }
    free(qrow);
    return MOE_OK;
}

/* ------------------------------------------------------------------ gate */

moe_status moe_cpu_gate_topk_forward(moe_ctx *c, const moe_gate_topk_args *a)
{
    if (a == NULL || !is_float_dtype(a->dt) || a->S < 0 || a->d < 1 || (a->k != 1 && a->k != 2) || a->E < a->k ||
        (a->k == 2 && a->policy != MOE_ROUTE_ALL && a->policy != MOE_ROUTE_SAMPLING))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu gate_topk_forward: expected k 1 or 2 with E >= k, S >= 0, d >= 1 and the policy all or "
                         "sampling (random drops: use route_forward), found k %d, E %d, S %lld, d %lld, policy %d",
                         a ? a->k : -1, a ? a->E : -1, a ? (long long)a->S : -1LL, a ? (long long)a->d : -1LL,
                         a ? (int)a->policy : -1);
    const int E = a->E;
    float *h = malloc((size_t)(a->d + 2 * E) * sizeof(float));
    if (h == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu gate_topk_forward: out of host memory");
    float *l = h + a->d, *p = l + E;
    for (int64_t s = 0; s < a->S; s++) {
        int32_t *ex = a->expert + s * 2;
        float *w = a->weight + s * 2;
        if (a->pad != NULL && a->pad[s]) {
            ex[0] = ex[1] = -1;
            w[0] = w[1] = 0.0f;
            continue;
        }
        load_row(h, at(a->x, a->dt, s * a->d), a->d, a->layernorm, a->ln_weight, a->ln_bias, a->ln_eps, a->dt);
        for (int e = 0; e < E; e++)
            l[e] = round_dt(dot_row(h, a->wg, e, a->d, a->dt), a->dt);
        /* softmax and choices exactly as route_forward */
        moe_route_softmax(l, p, E);
        int i1 = 0;
        for (int e = 1; e < E; e++)
            if (p[e] > p[i1])
                i1 = e;
        ex[0] = i1;
        ex[1] = -1;
        w[1] = 0.0f;
        if (a->k == 1) {
            w[0] = p[i1];
            continue;
        }
        const int64_t tok = a->noise_index != NULL ? (int64_t)a->noise_index[s] : s;
        int i2 = -1;
        float best = 0.0f;
        for (int e = 0; e < E; e++) {
            if (e == i1)
                continue;
            float v = a->policy == MOE_ROUTE_SAMPLING ? l[e] + moe_route_gumbel(a->seed, a->stream, tok, E, e) : l[e];
            if (i2 < 0 || v > best) {
                i2 = e;
                best = v;
            }
        }
        float dn = p[i1] + p[i2];
        if (dn < FLT_EPSILON)
            dn = FLT_EPSILON;
        ex[1] = i2;
        w[0] = p[i1] / dn;
        w[1] = p[i2] / dn;
    }
    free(h);
    return MOE_OK;
}

/* --------------------------------------------------------------- experts */

moe_status moe_cpu_expert_ffn_forward(moe_ctx *c, const moe_expert_ffn_args *a)
{
    if (a == NULL || !is_float_dtype(a->dt) || a->S < 0 || a->d < 1 || a->f < 1 || a->E < 1 || a->w1 == NULL ||
        a->b1 == NULL || a->w2 == NULL || a->b2 == NULL || a->hidden == NULL || a->eout == NULL)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu expert_ffn_forward: expected S >= 0, d, f, E >= 1, the four pointer tables and both "
                         "scratch buffers, found S %lld, d %lld, f %lld, E %d",
                         a ? (long long)a->S : -1LL, a ? (long long)a->d : -1LL, a ? (long long)a->f : -1LL,
                         a ? a->E : -1);
    const moe_dtype dt = a->dt;
    const int64_t d = a->d, f = a->f;
    for (int64_t i = 0; i < 2 * a->S; i++)
        if (a->expert[i] >= a->E)
            return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                             "cpu expert_ffn_forward: expert %d of token %lld is outside the %d experts of the tables",
                             a->expert[i], (long long)(i / 2), a->E);
    float *h = malloc((size_t)(d > f ? d : f) * sizeof(float));
    if (h == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu expert_ffn_forward: out of host memory");
    /* every assignment's expert output first: y may alias x */
    for (int64_t s = 0; s < a->S; s++) {
        int loaded = 0;
        for (int j = 0; j < 2; j++) {
            const int64_t i = s * 2 + j;
            const int e = a->expert[i];
            if (e < 0 || a->weight[i] == 0.0f)
                continue;
            if (!loaded) {
                load_row(h, at(a->x, dt, s * d), d, a->layernorm, a->ln_weight, a->ln_bias, a->ln_eps, dt);
                loaded = 1;
            }
            void *hid = (void *)(uintptr_t)at(a->hidden, dt, i * f);
            for (int64_t r = 0; r < f; r++)
                moe_cpu_store(hid, dt, r,
                              moe_cpu_act(dot_row(h, a->w1[e], r, d, dt) + moe_cpu_load(a->b1[e], dt, r), a->act));
        }
    }
    for (int64_t i = 0; i < 2 * a->S; i++) {
        const int e = a->expert[i];
        if (e < 0 || a->weight[i] == 0.0f)
            continue;
        const void *hid = at(a->hidden, dt, i * f);
        for (int64_t r = 0; r < f; r++)
            h[r] = moe_cpu_load(hid, dt, r);
        for (int64_t r = 0; r < d; r++)
            a->eout[i * d + r] = round_dt(dot_row(h, a->w2[e], r, f, dt) + moe_cpu_load(a->b2[e], dt, r), dt);
    }
    for (int64_t s = 0; s < a->S; s++) {
        for (int64_t r = 0; r < d; r++) {
            double acc = 0.0;
            for (int j = 0; j < 2; j++) {
                const int64_t i = s * 2 + j;
                if (a->expert[i] >= 0 && a->weight[i] != 0.0f)
                    acc += (double)a->weight[i] * (double)a->eout[i * d + r];
            }
            float v = round_dt((float)acc, dt);
            if (a->beta != 0.0f)
                v = a->beta * moe_cpu_load(a->y, dt, s * d + r) + v;
            moe_cpu_store(a->y, dt, s * d + r, v);
        }
    }
    free(h);
    return MOE_OK;
}

/* ---------------------------------------------------------------- logits */

/* z ranks above (pv, pi): larger value, or equal value at a lower index */
static int ranks_above(float z, int64_t i, float pv, int64_t pi) { return z > pv || (z == pv && i < pi); }

moe_status moe_cpu_logits_stats(moe_ctx *c, float *lse, float *top_val, int32_t *top_idx, float *tgt,
                                const float *logits, const int32_t *targets, int64_t R, int64_t V, int K,
                                float temperature)
{
    if (R < 0 || V < 1 || K < 0 || K > V || !(temperature > 0.0f) || (K > 0 && (top_val == NULL || top_idx == NULL)))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu logits_stats: expected R >= 0, V >= 1, 0 <= K <= V (with output buffers) and a positive "
                         "temperature, found R %lld, V %lld, K %d, temperature %g",
                         (long long)R, (long long)V, K, (double)temperature);
    for (int64_t r = 0; r < R; r++) {
        const float *l = logits + r * V;
#define Z(v) (isnan(l[(v)]) ? -INFINITY : l[(v)] / temperature)
        float mx = -INFINITY;
        for (int64_t v = 0; v < V; v++)
            if (Z(v) > mx)
                mx = Z(v);
        if (lse != NULL) {
            if (mx == -INFINITY) {
                lse[r] = -INFINITY;
            } else {
                double s = 0.0;
                for (int64_t v = 0; v < V; v++)
                    s += (double)expf(Z(v) - mx);
                lse[r] = mx + (float)log(s);
            }
        }
        /* selection in rank order: each pick is the best below the previous one */
        float pv = INFINITY;
        int64_t pi = -1;
        for (int k = 0; k < K; k++) {
            float bv = -INFINITY;
            int64_t bi = -1;
            for (int64_t v = 0; v < V; v++) {
                const float z = Z(v);
                if (k > 0 && !ranks_above(pv, pi, z, v))
                    continue; /* not strictly below the previous pick */
                if (bi < 0 || ranks_above(z, v, bv, bi)) {
                    bv = z;
                    bi = v;
                }
            }
            top_val[r * K + k] = bv;
            top_idx[r * K + k] = (int32_t)bi;
            pv = bv;
            pi = bi;
        }
        if (tgt != NULL && targets != NULL) {
            const int32_t t = targets[r];
            if (t < 0 || t >= V)
                return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                                 "cpu logits_stats: target %d of row %lld is outside the vocabulary [0, %lld)", (int)t,
                                 (long long)r, (long long)V);
            tgt[r] = Z(t);
        }
#undef Z
    }
    return MOE_OK;
}
