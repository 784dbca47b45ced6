/* nn.c: the cpu reference of the layer ops: activations (GELU tanh and erf,
 * relu), dropout, layer norm, token embedding with fairseq's sinusoidal
 * positions, and softmax cross-entropy over the vocabulary.
 *
 * Plain loops in fp32 on fp32/fp16/bf16 storage; reductions (layer-norm
 * statistics, parameter-gradient sums, softmax denominators) accumulate in
 * double in a fixed order, so the oracle is both accurate and reproducible.
 * Not fused and not fast: the cuda backend is the fast path.
 *
 * Conventions a reader would trip over:
 *  - GELU tanh is Megatron's bias_gelu formula, erf is the exact GELU
 *    (FAIRSEQ_SPEC.md §1.8); each backward is the analytic derivative of its
 *    own forward formula. relu is max(0, x) with derivative 0 at x == 0, and
 *    its backward selects dout (inp > 0) or 0 rather than multiplying, as
 *    PyTorch's threshold_backward; NaN passes through both, as in torch.relu.
 *  - Dropout keeps element i iff moe_philox_uniform(seed, stream, i) >= p
 *    (word i & 3 of the Philox group i >> 2, kernels/philox.h) and scales
 *    kept values by 1/(1-p) computed in fp32; p == 1 drops everything.
 *  - Sinusoidal positions follow FAIRSEQ_SPEC.md §1.4 computed in fp32 as
 *    fairseq does: half = C/2, freq_k = exp(-k*ln(10000)/(half-1)), the row is
 *    [sin(p*freq) | cos(p*freq)] (concatenated, a zero last column when C is
 *    odd); token t of a row sits at position padding_idx+1+t, pad tokens at
 *    padding_idx, whose row is zero. The token lookup itself is not masked:
 *    a pad token still reads scale*table[padding_idx] (tied weights make that
 *    row non-zero once training starts, §1.3).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

#define CPU_ERROR(c, st, ...)                                                                 \
    (((c) != NULL && (c)->host != NULL && (c)->host->error != NULL)                           \
         ? (c)->host->error((c)->host, (st), __VA_ARGS__)                                     \
         : (st))

static int is_float_dtype(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F16 || dt == MOE_BF16; }

static moe_status check_float(moe_ctx *c, const char *op, moe_dtype dt, int64_t n)
{
    if (!is_float_dtype(dt))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected dtype f32, f16 or bf16, found dtype %d", op,
                         (int)dt);
    if (n < 0)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected a size >= 0, found %lld", op, (long long)n);
    return MOE_OK;
}

/* ----------------------------------------------------------- activations */

#define GELU_TANH_K 0.7978845608f /* sqrt(2/pi) */
#define GELU_TANH_C 0.044715f

/* relu lets x through where x > 0 or x is NaN (torch.relu propagates NaN) */
static int relu_pass(float x) { return x > 0.0f || isnan(x); }

float moe_cpu_act(float x, moe_act_kind kind)
{
    if (kind == MOE_ACT_RELU)
        return relu_pass(x) ? x : 0.0f;
    if (kind == MOE_ACT_GELU_ERF)
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    return 0.5f * x * (1.0f + tanhf(GELU_TANH_K * (x + GELU_TANH_C * x * x * x)));
}

/* d act / dx for the GELUs (relu selects instead, see moe_cpu_act_backward) */
static float gelu_grad(float x, moe_act_kind kind)
{
    if (kind == MOE_ACT_GELU_ERF) {
        /* Phi(x) + x * phi(x) */
        const float inv_sqrt_2pi = 0.39894228040143268f;
        return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * inv_sqrt_2pi * expf(-0.5f * x * x);
    }
    const float t = tanhf(GELU_TANH_K * (x + GELU_TANH_C * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_TANH_K * (1.0f + 3.0f * GELU_TANH_C * x * x);
}

static moe_status check_act(moe_ctx *c, const char *op, moe_dtype dt, int64_t n, moe_act_kind kind)
{
    MOE_TRY(check_float(c, op, dt, n));
    if (kind != MOE_ACT_GELU_TANH && kind != MOE_ACT_GELU_ERF && kind != MOE_ACT_RELU)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu %s: unknown activation kind %d; expected MOE_ACT_GELU_TANH, MOE_ACT_GELU_ERF or "
                         "MOE_ACT_RELU",
                         op, (int)kind);
    return MOE_OK;
}

moe_status moe_cpu_act_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, moe_act_kind kind)
{
    MOE_TRY(check_act(c, "act_forward", dt, n, kind));
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(out, dt, i, moe_cpu_act(moe_cpu_load(inp, dt, i), kind));
    return MOE_OK;
}

moe_status moe_cpu_act_backward(moe_ctx *c, void *dinp, const void *inp, const void *dout, int64_t n, moe_dtype dt,
                                 moe_act_kind kind)
{
    MOE_TRY(check_act(c, "act_backward", dt, n, kind));
    if (kind == MOE_ACT_RELU) {
        for (int64_t i = 0; i < n; i++) /* dout[i] is read before dinp[i] is written: aliasing is safe */
            moe_cpu_store(dinp, dt, i, relu_pass(moe_cpu_load(inp, dt, i)) ? moe_cpu_load(dout, dt, i) : 0.0f);
        return MOE_OK;
    }
    for (int64_t i = 0; i < n; i++) /* dout[i] is read before dinp[i] is written: aliasing is safe */
        moe_cpu_store(dinp, dt, i, moe_cpu_load(dout, dt, i) * gelu_grad(moe_cpu_load(inp, dt, i), kind));
    return MOE_OK;
}

/* --------------------------------------------------------------- dropout */

/* out = in * keep * 1/(1-p); shared by forward and backward, which differ only in naming */
static moe_status dropout_apply(moe_ctx *c, const char *op, void *out, const void *in, int64_t n, moe_dtype dt,
                                float p, uint64_t seed, uint64_t stream)
{
    MOE_TRY(check_float(c, op, dt, n));
    if (!(p >= 0.0f && p <= 1.0f))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected a probability 0 <= p <= 1, found %g", op, (double)p);
    if (p == 0.0f) {
        if (out != in && n > 0)
            memmove(out, in, (size_t)n * moe_dtype_size(dt));
        return MOE_OK;
    }
    if (p == 1.0f) {
        for (int64_t i = 0; i < n; i++)
            moe_cpu_store(out, dt, i, 0.0f);
        return MOE_OK;
    }
    const float scale = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < n; i++) {
        const int keep = moe_philox_uniform(seed, stream, (uint64_t)i) >= p;
        moe_cpu_store(out, dt, i, keep ? moe_cpu_load(in, dt, i) * scale : 0.0f);
    }
    return MOE_OK;
}

moe_status moe_cpu_dropout_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, float p,
                                   uint64_t seed, uint64_t stream)
{
    return dropout_apply(c, "dropout_forward", out, inp, n, dt, p, seed, stream);
}

moe_status moe_cpu_dropout_backward(moe_ctx *c, void *din, const void *dout, int64_t n, moe_dtype dt, float p,
                                    uint64_t seed, uint64_t stream)
{
    return dropout_apply(c, "dropout_backward", din, dout, n, dt, p, seed, stream);
}

/* ------------------------------------------------------------ layer norm */

moe_status moe_cpu_layernorm_forward(moe_ctx *c, void *out, float *mean, float *rstd, const void *inp,
                                     const void *weight, const void *bias, int64_t N, int64_t C, float eps,
                                     moe_dtype dt)
{
    MOE_TRY(check_float(c, "layernorm_forward", dt, N));
    if (C < 1 || !(eps >= 0.0f))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu layernorm_forward: expected C >= 1 and eps >= 0, found C %lld, eps %g",
                         (long long)C, (double)eps);
    for (int64_t r = 0; r < N; r++) {
        const int64_t base = r * C;
        double s = 0.0;
        for (int64_t j = 0; j < C; j++)
            s += (double)moe_cpu_load(inp, dt, base + j);
        const double m = s / (double)C;
        double v = 0.0;
        for (int64_t j = 0; j < C; j++) {
            const double d = (double)moe_cpu_load(inp, dt, base + j) - m;
            v += d * d;
        }
        const float mf = (float)m, rf = (float)(1.0 / sqrt(v / (double)C + (double)eps));
        for (int64_t j = 0; j < C; j++) {
            float y = (moe_cpu_load(inp, dt, base + j) - mf) * rf;
            if (weight != NULL)
                y *= moe_cpu_load(weight, dt, j);
            if (bias != NULL)
                y += moe_cpu_load(bias, dt, j);
            moe_cpu_store(out, dt, base + j, y);
        }
        if (mean != NULL)
            mean[r] = mf;
        if (rstd != NULL)
            rstd[r] = rf;
    }
    return MOE_OK;
}

moe_status moe_cpu_layernorm_backward(moe_ctx *c, void *dinp, void *dweight, void *dbias, const void *dout,
                                      const void *inp, const void *weight, const float *mean, const float *rstd,
                                      int64_t N, int64_t C, moe_dtype dt)
{
    MOE_TRY(check_float(c, "layernorm_backward", dt, N));
    if (C < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu layernorm_backward: expected C >= 1, found %lld", (long long)C);
    double *dw = calloc((size_t)C * 2u, sizeof(double));
    if (dw == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu layernorm_backward: out of host memory for %lld column sums",
                         (long long)C * 2);
    double *db = dw + C;
    for (int64_t r = 0; r < N; r++) {
        const int64_t base = r * C;
        const float mf = mean[r], rf = rstd[r];
        /* dxhat = dout * w; dinp = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) */
        double s1 = 0.0, s2 = 0.0;
        for (int64_t j = 0; j < C; j++) {
            const float g = moe_cpu_load(dout, dt, base + j);
            const float xhat = (moe_cpu_load(inp, dt, base + j) - mf) * rf;
            const float dxhat = weight != NULL ? g * moe_cpu_load(weight, dt, j) : g;
            s1 += (double)dxhat;
            s2 += (double)dxhat * (double)xhat;
            dw[j] += (double)g * (double)xhat;
            db[j] += (double)g;
        }
        if (dinp == NULL)
            continue;
        const float m1 = (float)(s1 / (double)C), m2 = (float)(s2 / (double)C);
        for (int64_t j = 0; j < C; j++) {
            const float g = moe_cpu_load(dout, dt, base + j);
            const float xhat = (moe_cpu_load(inp, dt, base + j) - mf) * rf;
            const float dxhat = weight != NULL ? g * moe_cpu_load(weight, dt, j) : g;
            const float d = rf * (dxhat - m1 - xhat * m2);
            moe_cpu_store(dinp, dt, base + j, moe_cpu_load(dinp, dt, base + j) + d);
        }
    }
    for (int64_t j = 0; j < C; j++) {
        if (dweight != NULL)
            moe_cpu_store(dweight, dt, j, (float)((double)moe_cpu_load(dweight, dt, j) + dw[j]));
        if (dbias != NULL)
            moe_cpu_store(dbias, dt, j, (float)((double)moe_cpu_load(dbias, dt, j) + db[j]));
    }
    free(dw);
    return MOE_OK;
}

/* ------------------------------------------------------------- embedding */

moe_status moe_cpu_embedding_forward(moe_ctx *c, void *out, const int32_t *tokens, const void *table, int64_t B,
                                     int64_t T, int64_t C, float scale, int padding_idx, int sinusoidal,
                                     moe_dtype dt)
{
    MOE_TRY(check_float(c, "embedding_forward", dt, B));
    if (T < 0 || C < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu embedding_forward: expected T >= 0 and C >= 1, found T %lld, C %lld",
                         (long long)T, (long long)C);
    const int64_t half = C / 2;
    if (sinusoidal && half < 2)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu embedding_forward: sinusoidal positions need C >= 4 (half-1 divides the frequency "
                         "exponent), found C %lld",
                         (long long)C);
    float *freq = NULL;
    if (sinusoidal) {
        freq = malloc((size_t)half * sizeof(float));
        if (freq == NULL)
            return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu embedding_forward: out of host memory for %lld frequencies",
                             (long long)half);
        /* fp32 as fairseq: exp(arange(half) * -(ln(10000)/(half-1))) */
        const float e = (float)(log(10000.0) / (double)(half - 1));
        for (int64_t k = 0; k < half; k++)
            freq[k] = expf((float)k * -e);
    }
    for (int64_t n = 0; n < B * T; n++) {
        const int32_t tok = tokens[n];
        if (tok < 0) {
            free(freq);
            return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                             "cpu embedding_forward: token %d at position %lld is negative; expected a dictionary index",
                             (int)tok, (long long)n);
        }
        const int64_t row = (int64_t)tok * C, o = n * C;
        const int with_pos = sinusoidal && tok != padding_idx; /* the padding position row is zero */
        const float pos = (float)((int64_t)padding_idx + 1 + n % T);
        for (int64_t j = 0; j < C; j++) {
            float v = scale * moe_cpu_load(table, dt, row + j);
            if (with_pos && j < 2 * half)
                v += j < half ? sinf(pos * freq[j]) : cosf(pos * freq[j - half]);
            moe_cpu_store(out, dt, o + j, v);
        }
    }
    free(freq);
    return MOE_OK;
}

moe_status moe_cpu_embedding_backward(moe_ctx *c, void *dtable, const void *dout, const int32_t *tokens, int64_t B,
                                      int64_t T, int64_t C, int64_t V, float scale, int padding_idx, moe_dtype dt)
{
    MOE_TRY(check_float(c, "embedding_backward", dt, B));
    if (T < 0 || C < 1 || V < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu embedding_backward: expected T >= 0, C >= 1, V >= 1, found T %lld, C %lld, V %lld",
                         (long long)T, (long long)C, (long long)V);
    const int64_t n_tok = B * T;
    for (int64_t n = 0; n < n_tok; n++)
        if (tokens[n] < 0 || tokens[n] >= V)
            return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                             "cpu embedding_backward: token %d at position %lld is outside the dictionary [0, %lld)",
                             (int)tokens[n], (long long)n, (long long)V);

    /* Group positions by token (a stable counting sort) so each table row is
     * summed in fp32 in position order and rounded once, whatever the dtype. */
    int64_t *start = calloc((size_t)V + 1u, sizeof(int64_t));
    int64_t *cursor = malloc((size_t)V * sizeof(int64_t));
    int64_t *order = malloc((size_t)(n_tok > 0 ? n_tok : 1) * sizeof(int64_t));
    float *acc = malloc((size_t)C * sizeof(float));
    moe_status st = MOE_OK;
    if (start == NULL || cursor == NULL || order == NULL || acc == NULL) {
        st = CPU_ERROR(c, MOE_ERR_NOMEM, "cpu embedding_backward: out of host memory grouping %lld tokens over %lld rows",
                       (long long)n_tok, (long long)V);
        goto done;
    }
    for (int64_t n = 0; n < n_tok; n++)
        if (tokens[n] != padding_idx)
            start[tokens[n] + 1]++;
    for (int64_t v = 0; v < V; v++) {
        start[v + 1] += start[v];
        cursor[v] = start[v];
    }
    for (int64_t n = 0; n < n_tok; n++)
        if (tokens[n] != padding_idx)
            order[cursor[tokens[n]]++] = n;
    for (int64_t v = 0; v < V; v++) {
        if (start[v] == start[v + 1])
            continue;
        memset(acc, 0, (size_t)C * sizeof(float));
        for (int64_t q = start[v]; q < start[v + 1]; q++) {
            const int64_t o = order[q] * C;
            for (int64_t j = 0; j < C; j++)
                acc[j] += moe_cpu_load(dout, dt, o + j);
        }
        for (int64_t j = 0; j < C; j++)
            moe_cpu_store(dtable, dt, v * C + j, moe_cpu_load(dtable, dt, v * C + j) + scale * acc[j]);
    }
done:
    free(start);
    free(cursor);
    free(order);
    free(acc);
    return st;
}

/* --------------------------------------------------------- cross-entropy */

moe_status moe_cpu_cross_entropy(moe_ctx *c, float *losses, void *logits, const int32_t *targets, int64_t N,
                                 int64_t V, int ignore_index, float grad_scale, moe_dtype dt)
{
    MOE_TRY(check_float(c, "cross_entropy", dt, N));
    if (V < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu cross_entropy: expected V >= 1, found %lld", (long long)V);
    for (int64_t r = 0; r < N; r++) {
        const int32_t t = targets[r];
        const int64_t base = r * V;
        if (t == ignore_index) {
            losses[r] = 0.0f;
            if (grad_scale != 0.0f)
                for (int64_t j = 0; j < V; j++)
                    moe_cpu_store(logits, dt, base + j, 0.0f);
            continue;
        }
        if (t < 0 || t >= V)
            return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                             "cpu cross_entropy: target %d of row %lld is outside the vocabulary [0, %lld) and is not "
                             "ignore_index %d",
                             (int)t, (long long)r, (long long)V, ignore_index);
        float mx = -INFINITY;
        for (int64_t j = 0; j < V; j++) {
            const float x = moe_cpu_load(logits, dt, base + j);
            if (x > mx)
                mx = x;
        }
        double s = 0.0;
        for (int64_t j = 0; j < V; j++)
            s += exp((double)(moe_cpu_load(logits, dt, base + j) - mx));
        const float lse = mx + (float)log(s);
        losses[r] = lse - moe_cpu_load(logits, dt, base + t);
        if (grad_scale == 0.0f)
            continue;
        for (int64_t j = 0; j < V; j++) {
            const float p = expf(moe_cpu_load(logits, dt, base + j) - lse);
            moe_cpu_store(logits, dt, base + j, grad_scale * (j == t ? p - 1.0f : p));
        }
    }
    return MOE_OK;
}
