/* optim.c: the cpu backend's optimizer steps, Adam and SGD on one tensor.
 *
 * Adam is fairseq's FusedAdamV1 (apex's fused_adam_cuda kernel, eps mode 1)
 * as FAIRSEQ_SPEC.md §5.2 describes it: fp32 arithmetic whatever the storage,
 * the gradient divided by grad_scale, bias correction folded into the step
 * size with eps outside the square root, L2 weight decay added to the update
 * (not decoupled), the parameter rounded once on store. With fp16 moments
 * (--fp16-adam-stats) each moment tensor carries one fp32 scale: it is loaded
 * as m16*scale and stored as m/scale' with scale' = 1e-8 + max|m|/65504, the
 * scale computed from the new moments, so the largest entry maps to 65504.
 *
 * SGD is torch.optim.SGD as fairseq uses it: weight decay added to the
 * gradient, then heavy-ball momentum without dampening or Nesterov.
 *
 * Deliberately not here: clipping, overflow checks, the choice of per-tensor
 * granularity (the optimizer plugin decides what one tensor is), multi-tensor
 * batching. Scales are backend memory like everything else; on the cpu that
 * is plain host memory, read and written directly.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include "kernels/cpu/cpu.h"

#define MOE_FP16_MAX 65504.0f

/* One-line error through the host when there is one (tests may pass a bare context). */
static moe_status optim_fail(moe_ctx *c, moe_status st, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c && c->host && c->host->error)
        return c->host->error(c->host, st, "%s", msg);
    return st;
}

static int storage_dtype_ok(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F16 || dt == MOE_BF16; }

/* max|x| with NaN sticky, as torch.norm(x, inf) propagates NaN */
static float absmax_update(float mx, float x)
{
    float ax = fabsf(x);
    if (isnan(mx))
        return mx;
    return (isnan(ax) || ax > mx) ? ax : mx;
}

/* new first and second moments of element i (both passes of the fp16 path use this) */
static inline void adam_moments(const moe_adam_args *a, int64_t i, float sm, float sv, float *m_out, float *v_out)
{
    float g = moe_cpu_load(a->grad, a->grad_dtype, i) / a->grad_scale;
    float m = moe_cpu_load(a->exp_avg, a->state_dtype, i) * sm;
    float v = moe_cpu_load(a->exp_avg_sq, a->state_dtype, i) * sv;
    *m_out = a->beta1 * m + (1.0f - a->beta1) * g;
    *v_out = a->beta2 * v + (1.0f - a->beta2) * g * g;
}

moe_status moe_cpu_adam_step(moe_ctx *c, const moe_adam_args *a)
{
    if (a->n < 0)
        return optim_fail(c, MOE_ERR_INVALID_ARG, "adam_step: expected n >= 0, got %lld", (long long)a->n);
    if (a->n == 0)
        return MOE_OK;
    if (!a->param || !a->grad || !a->exp_avg || !a->exp_avg_sq)
        return optim_fail(c, MOE_ERR_INVALID_ARG,
                          "adam_step: param, grad, exp_avg and exp_avg_sq must all be non-NULL for %lld elements",
                          (long long)a->n);
    if (!storage_dtype_ok(a->param_dtype) || !storage_dtype_ok(a->grad_dtype) ||
        (a->param_copy && !storage_dtype_ok(a->copy_dtype)))
        return optim_fail(c, MOE_ERR_INVALID_ARG,
                          "adam_step: parameters, copies and gradients must be fp32, fp16 or bf16 (dtypes %d/%d/%d)",
                          (int)a->param_dtype, (int)a->copy_dtype, (int)a->grad_dtype);
    if (a->state_dtype != MOE_F32 && a->state_dtype != MOE_F16)
        return optim_fail(c, MOE_ERR_INVALID_ARG,
                          "adam_step: moments must be fp32 or fp16 (--fp16-adam-stats), got dtype %d",
                          (int)a->state_dtype);
    int fp16_state = a->state_dtype == MOE_F16;
    if (fp16_state && (!a->scale_avg || !a->scale_avg_sq))
        return optim_fail(c, MOE_ERR_INVALID_ARG,
                          "adam_step: fp16 moments need their two per-tensor scales; got NULL scale pointers");
    if (a->step < 1)
        return optim_fail(c, MOE_ERR_INVALID_ARG,
                          "adam_step: step counts successful updates from 1; got %lld", (long long)a->step);
    if (!(a->grad_scale != 0.0f))
        return optim_fail(c, MOE_ERR_INVALID_ARG, "adam_step: grad_scale divides the gradients; got %g",
                          (double)a->grad_scale);

    /* apex: the bias corrections in double from float betas, then float */
    const float bc1 = (float)(1.0 - pow((double)a->beta1, (double)a->step));
    const float bc2 = (float)(1.0 - pow((double)a->beta2, (double)a->step));
    const float step_size = a->lr * sqrtf(bc2) / bc1;
    const float eps = a->eps, wd = a->weight_decay;
    const float sm = fp16_state ? *a->scale_avg : 1.0f;
    const float sv = fp16_state ? *a->scale_avg_sq : 1.0f;
    float max_m = 0.0f, max_v = 0.0f;

    for (int64_t i = 0; i < a->n; i++) {
        float m, v;
        adam_moments(a, i, sm, sv, &m, &v);
        float p = moe_cpu_load(a->param, a->param_dtype, i);
        float update = m / (sqrtf(v) + eps) + wd * p;
        p = p - step_size * update;
        moe_cpu_store(a->param, a->param_dtype, i, p);
        if (a->param_copy)
            moe_cpu_store(a->param_copy, a->copy_dtype, i, p);
        if (fp16_state) {
            max_m = absmax_update(max_m, m);
            max_v = absmax_update(max_v, v);
        } else {
            moe_cpu_store(a->exp_avg, MOE_F32, i, m);
            moe_cpu_store(a->exp_avg_sq, MOE_F32, i, v);
        }
    }
    if (!fp16_state)
        return MOE_OK;

    /* second pass: the new moments again (same inputs, same fp32 arithmetic,
     * so bit-identical) stored against the scales of their new maxima */
    const float nsm = 1e-8f + max_m / MOE_FP16_MAX;
    const float nsv = 1e-8f + max_v / MOE_FP16_MAX;
    for (int64_t i = 0; i < a->n; i++) {
        float m, v;
        adam_moments(a, i, sm, sv, &m, &v);
        moe_cpu_store(a->exp_avg, MOE_F16, i, m / nsm);
        moe_cpu_store(a->exp_avg_sq, MOE_F16, i, v / nsv);
    }
    *a->scale_avg = nsm;
    *a->scale_avg_sq = nsv;
    return MOE_OK;
}

moe_status moe_cpu_sgd_step(moe_ctx *c, const moe_sgd_args *a)
{
    if (a->n < 0)
        return optim_fail(c, MOE_ERR_INVALID_ARG, "sgd_step: expected n >= 0, got %lld", (long long)a->n);
    if (a->n == 0)
        return MOE_OK;
    if (!a->param || !a->grad)
        return optim_fail(c, MOE_ERR_INVALID_ARG, "sgd_step: param and grad must be non-NULL for %lld elements",
                          (long long)a->n);
    if (!storage_dtype_ok(a->param_dtype) || !storage_dtype_ok(a->grad_dtype) ||
        (a->param_copy && !storage_dtype_ok(a->copy_dtype)))
        return optim_fail(c, MOE_ERR_INVALID_ARG,
                          "sgd_step: parameters, copies and gradients must be fp32, fp16 or bf16 (dtypes %d/%d/%d)",
                          (int)a->param_dtype, (int)a->copy_dtype, (int)a->grad_dtype);
    if (a->momentum != 0.0f && !a->momentum_buf)
        return optim_fail(c, MOE_ERR_INVALID_ARG,
                          "sgd_step: momentum %g needs a momentum buffer of %lld fp32 values; got NULL",
                          (double)a->momentum, (long long)a->n);
    if (!(a->grad_scale != 0.0f))
        return optim_fail(c, MOE_ERR_INVALID_ARG, "sgd_step: grad_scale divides the gradients; got %g",
                          (double)a->grad_scale);

    for (int64_t i = 0; i < a->n; i++) {
        float p = moe_cpu_load(a->param, a->param_dtype, i);
        float d = moe_cpu_load(a->grad, a->grad_dtype, i) / a->grad_scale;
        if (a->weight_decay != 0.0f)
            d += a->weight_decay * p;
        if (a->momentum != 0.0f) {
            /* torch starts the buffer at d; with a zeroed buffer and no
             * dampening, momentum*0 + d is the same value */
            float buf = a->momentum * a->momentum_buf[i] + d;
            a->momentum_buf[i] = buf;
            d = buf;
        }
        p -= a->lr * d;
        moe_cpu_store(a->param, a->param_dtype, i, p);
        if (a->param_copy)
            moe_cpu_store(a->param_copy, a->copy_dtype, i, p);
    }
    return MOE_OK;
}
