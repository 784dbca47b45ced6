/* test_optim.c: the cpu optimizer kernels (kernels/cpu/optim.c) against
 * double-precision references written out here from FAIRSEQ_SPEC.md §5.2
 * (FusedAdamV1) and torch.optim.SGD.
 *
 * The kernel is compiled into this test and called with a bare context, so
 * nothing else of the backend is needed. Tolerances: fp32 storage is held to
 * 2e-6 relative on the update (fp32 arithmetic, a few roundings); fp16/bf16
 * storage to one unit in the last place of the stored value; fp16 moments to
 * one fp16 rounding of m/scale. Learning rates are large enough that a wrong
 * factor anywhere moves results by many units in the last place.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/cpu.h"

#define N_ELEM 257

/* ------------------------------------------------------------ helpers */

static uint64_t rng_state;

static double rnd_uniform(double lo, double hi) /* splitmix64 */
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return lo + (hi - lo) * ((double)(z >> 11) * (1.0 / 9007199254740992.0));
}

/* random value away from zero, either sign */
static double rnd_nonzero(double lo, double hi)
{
    double v = rnd_uniform(lo, hi);
    return rnd_uniform(0.0, 1.0) < 0.5 ? -v : v;
}

static void *alloc_dt(moe_dtype dt, int64_t n)
{
    void *p = calloc((size_t)n, moe_dtype_size(dt));
    assert_non_null(p);
    return p;
}

/* unit in the last place of v when stored in dt */
static double ulp_of(moe_dtype dt, double v)
{
    int e;
    frexp(fabs(v) > 1e-30 ? v : 1e-30, &e); /* |v| in [2^(e-1), 2^e) */
    int mant = dt == MOE_F16 ? 11 : dt == MOE_BF16 ? 8 : 24;
    double u = ldexp(1.0, e - mant);
    if (dt == MOE_F16 && u < ldexp(1.0, -24))
        u = ldexp(1.0, -24); /* fp16 subnormal spacing */
    return u;
}

typedef struct adam_ref {
    double lr, b1, b2, eps, wd, grad_scale;
    int64_t step;
} adam_ref;

/* One FusedAdamV1 step in double on one element; m, v are the loaded (fp32
 * value times scale) moments, updated in place; returns the new parameter. */
static double adam_ref_step(const adam_ref *r, double p, double g_raw, double *m, double *v)
{
    double g = g_raw / r->grad_scale;
    *m = r->b1 * *m + (1.0 - r->b1) * g;
    *v = r->b2 * *v + (1.0 - r->b2) * g * g;
    double step_size = r->lr * sqrt(1.0 - pow(r->b2, (double)r->step)) / (1.0 - pow(r->b1, (double)r->step));
    return p - step_size * (*m / (sqrt(*v) + r->eps) + r->wd * p);
}

/* ------------------------------------------------------------ adam */

/* Two Adam steps on random data with the given storage dtypes, each checked
 * element by element against adam_ref_step. */
static void run_adam_random(moe_dtype pdt, moe_dtype sdt, int with_copy, float wd)
{
    rng_state = 0x1234u + (uint64_t)pdt * 17u + (uint64_t)sdt * 5u + (uint64_t)with_copy;
    const int64_t n = N_ELEM;
    void *param = alloc_dt(pdt, n), *grad = alloc_dt(MOE_F16, n);
    void *m = alloc_dt(sdt, n), *v = alloc_dt(sdt, n);
    void *copy = with_copy ? alloc_dt(MOE_F16, n) : NULL;
    double *rm = calloc((size_t)n, sizeof *rm), *rv = calloc((size_t)n, sizeof *rv);
    assert_true(rm && rv);
    float scale_m = 1.0f, scale_v = 1.0f;
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(param, pdt, i, (float)rnd_nonzero(0.05, 1.0));
    adam_ref r = {0.01, 0.9, 0.98, 1e-8, wd, 64.0, 0};
    for (int step = 1; step <= 2; step++) {
        for (int64_t i = 0; i < n; i++) /* fp16 grads, scaled by 64 like a loss scale */
            moe_cpu_store(grad, MOE_F16, i, (float)(64.0 * rnd_nonzero(1e-3, 1.0)));
        r.step = step;
        moe_adam_args a;
        memset(&a, 0, sizeof a);
        a.n = n;
        a.param = param;
        a.param_dtype = pdt;
        a.param_copy = copy;
        a.copy_dtype = MOE_F16;
        a.grad = grad;
        a.grad_dtype = MOE_F16;
        a.exp_avg = m;
        a.exp_avg_sq = v;
        a.state_dtype = sdt;
        a.scale_avg = &scale_m;
        a.scale_avg_sq = &scale_v;
        a.lr = (float)r.lr;
        a.beta1 = 0.9f;
        a.beta2 = 0.98f;
        a.eps = (float)r.eps;
        a.weight_decay = wd;
        a.grad_scale = 64.0f;
        a.step = step;
        /* the reference starts from what the kernel will load */
        float sm = sdt == MOE_F16 ? scale_m : 1.0f, sv = sdt == MOE_F16 ? scale_v : 1.0f;
        for (int64_t i = 0; i < n; i++) {
            rm[i] = (double)moe_cpu_load(m, sdt, i) * sm;
            rv[i] = (double)moe_cpu_load(v, sdt, i) * sv;
        }
        /* the reference uses the betas as the kernel sees them (fp32) */
        r.b1 = (double)0.9f;
        r.b2 = (double)0.98f;
        double max_m = 0, max_v = 0;
        double *want = calloc((size_t)n, sizeof *want), *mag_m = calloc((size_t)n, sizeof *mag_m);
        assert_true(want && mag_m);
        for (int64_t i = 0; i < n; i++) {
            double p0 = moe_cpu_load(param, pdt, i);
            mag_m[i] = fabs(r.b1 * rm[i]) + fabs((1 - r.b1) * moe_cpu_load(grad, MOE_F16, i) / r.grad_scale);
            want[i] = adam_ref_step(&r, p0, moe_cpu_load(grad, MOE_F16, i), &rm[i], &rv[i]);
            max_m = fmax(max_m, fabs(rm[i]));
            max_v = fmax(max_v, fabs(rv[i]));
        }
        float old_p0 = moe_cpu_load(param, pdt, 0);
        assert_int_equal(moe_cpu_adam_step(NULL, &a), MOE_OK);
        for (int64_t i = 0; i < n; i++) {
            double got = moe_cpu_load(param, pdt, i);
            if (pdt == MOE_F32)
                assert_true(fabs(got - want[i]) <= 2e-6 * fabs(want[i]) + 1e-7 * r.lr);
            else
                assert_true(fabs(got - want[i]) <= ulp_of(pdt, want[i]));
            if (copy) /* the compute copy is the new parameter rounded once */
                assert_int_equal(((uint16_t *)copy)[i], moe_f32_to_f16(moe_cpu_load(param, pdt, i)));
            if (sdt == MOE_F32) { /* fp32 rounding of b1*m + (1-b1)*g, which may cancel */
                assert_true(fabs(moe_cpu_load(m, MOE_F32, i) - rm[i]) <= 1e-6 * mag_m[i]);
                assert_true(fabs(moe_cpu_load(v, MOE_F32, i) - rv[i]) <= 1e-6 * fabs(rv[i]));
            }
        }
        /* the step moved the parameters by about lr (Adam's normalised step) */
        assert_true(fabs((double)moe_cpu_load(param, pdt, 0) - old_p0) > 0.1 * r.lr);
        if (sdt == MOE_F16) {
            /* per-tensor scales from the new maxima: 1e-8 + max/65504 */
            double want_sm = 1e-8 + max_m / 65504.0, want_sv = 1e-8 + max_v / 65504.0;
            assert_true(fabs(scale_m - want_sm) <= 1e-5 * want_sm);
            assert_true(fabs(scale_v - want_sv) <= 1e-5 * want_sv);
            /* the largest moment maps to 65504 and every stored value is m/scale rounded once */
            float top_m = 0, top_v = 0;
            for (int64_t i = 0; i < n; i++) {
                float qm = moe_cpu_load(m, MOE_F16, i), qv = moe_cpu_load(v, MOE_F16, i);
                top_m = fmaxf(top_m, fabsf(qm));
                top_v = fmaxf(top_v, fabsf(qv));
                assert_true(fabs(qm * (double)scale_m - rm[i]) <= fabs(rm[i]) * 0x1p-10 + scale_m * 0x1p-23);
                assert_true(fabs(qv * (double)scale_v - rv[i]) <= fabs(rv[i]) * 0x1p-10 + scale_v * 0x1p-23);
            }
            /* the largest maps to max/scale = 65504*max/(max + 65504e-8): 65504
             * for large moments, a little less for small ones (one fp16 ulp there is 32) */
            assert_true(fabs(top_m - 65504.0 * max_m / (max_m + 65504e-8)) <= 32.0);
            assert_true(fabs(top_v - 65504.0 * max_v / (max_v + 65504e-8)) <= 32.0);
        }
        free(want);
        free(mag_m);
    }
    free(param), free(grad), free(m), free(v), free(copy), free(rm), free(rv);
}

static void test_optim_adam_fp32_params_fp32_moments(void **state)
{
    (void)state;
    run_adam_random(MOE_F32, MOE_F32, 1, 0.0f);
}

static void test_optim_adam_fp16_params_fp32_moments(void **state)
{
    (void)state;
    run_adam_random(MOE_F16, MOE_F32, 0, 0.0f);
}

static void test_optim_adam_fp32_params_fp16_moments(void **state)
{
    (void)state;
    run_adam_random(MOE_F32, MOE_F16, 1, 0.0f);
}

static void test_optim_adam_fp16_params_fp16_moments(void **state)
{
    (void)state;
    run_adam_random(MOE_F16, MOE_F16, 0, 0.0f);
}

static void test_optim_adam_bf16_params_weight_decay(void **state)
{
    (void)state;
    run_adam_random(MOE_BF16, MOE_F32, 0, 0.1f);
}

/* With a constant gradient, bias correction makes steps 1 and 2 both move by
 * lr*sign(g) (up to eps); without it step 1 would be (1-b1)/sqrt(1-b2) = 3.16x
 * larger for betas (0.9, 0.99). */
static void test_optim_adam_bias_correction(void **state)
{
    (void)state;
    float p[4] = {0.5f, -0.25f, 1.0f, 0.0f};
    float g[4] = {0.3f, -2.0f, 0.05f, -0.7f};
    float m[4] = {0}, v[4] = {0};
    const float lr = 1e-2f;
    moe_adam_args a;
    memset(&a, 0, sizeof a);
    a.n = 4;
    a.param = p;
    a.param_dtype = MOE_F32;
    a.grad = g;
    a.grad_dtype = MOE_F32;
    a.exp_avg = m;
    a.exp_avg_sq = v;
    a.state_dtype = MOE_F32;
    a.lr = lr;
    a.beta1 = 0.9f;
    a.beta2 = 0.99f;
    a.eps = 1e-8f;
    a.grad_scale = 1.0f;
    for (int t = 1; t <= 2; t++) {
        float before[4];
        memcpy(before, p, sizeof p);
        a.step = t;
        assert_int_equal(moe_cpu_adam_step(NULL, &a), MOE_OK);
        for (int i = 0; i < 4; i++) {
            /* m = (1-b1^t) g and v = (1-b2^t) g^2, so the bias-corrected step is
             * lr * c g / (c |g| + eps) with c = sqrt(1-b2^t): lr * sign(g) up to eps */
            double c = sqrt(1.0 - pow((double)0.99f, t));
            double moved = (double)p[i] - before[i];
            double want = -(double)lr * c * g[i] / (c * fabs(g[i]) + 1e-8);
            assert_true(fabs(moved - want) <= 1e-5 * lr + ulp_of(MOE_F32, before[i]));
            assert_true(fabs(fabs(moved) - lr) <= 1e-3 * lr);
        }
    }
    /* the moments after two steps: m = (1-b1^2) g, v = (1-b2^2) g^2 */
    for (int i = 0; i < 4; i++) {
        double b1 = 0.9f, b2 = 0.99f;
        assert_true(fabs(m[i] - (1 - b1 * b1) * g[i]) <= 1e-6 * fabs(g[i]));
        assert_true(fabs(v[i] - (1 - b2 * b2) * g[i] * g[i]) <= 1e-6 * g[i] * g[i]);
    }
}

/* Zero gradient: only decay moves the weights, p -= step_size * wd * p with
 * step_size = lr*sqrt(1-b2)/(1-b1) at t = 1. */
static void test_optim_adam_weight_decay(void **state)
{
    (void)state;
    float p[3] = {2.0f, -1.0f, 0.5f};
    float g[3] = {0, 0, 0}, m[3] = {0}, v[3] = {0};
    moe_adam_args a;
    memset(&a, 0, sizeof a);
    a.n = 3;
    a.param = p;
    a.param_dtype = MOE_F32;
    a.grad = g;
    a.grad_dtype = MOE_F32;
    a.exp_avg = m;
    a.exp_avg_sq = v;
    a.state_dtype = MOE_F32;
    a.lr = 0.1f;
    a.beta1 = 0.9f;
    a.beta2 = 0.999f;
    a.eps = 1e-8f;
    a.weight_decay = 0.5f;
    a.grad_scale = 1.0f;
    a.step = 1;
    float p0[3];
    memcpy(p0, p, sizeof p);
    assert_int_equal(moe_cpu_adam_step(NULL, &a), MOE_OK);
    double step_size = 0.1 * sqrt(1.0 - (double)0.999f) / (1.0 - (double)0.9f);
    for (int i = 0; i < 3; i++) {
        double want = p0[i] - step_size * 0.5 * p0[i];
        assert_true(fabs(p[i] - want) <= 1e-6 * fabs(want));
    }
}

/* fp16 moments in a step with every gradient zero keep zero moments and a
 * scale of exactly 1e-8 (the epsilon of the scale formula). */
static void test_optim_adam_fp16_moments_zero_gradient(void **state)
{
    (void)state;
    uint16_t p[2] = {moe_f32_to_f16(1.0f), moe_f32_to_f16(-1.0f)};
    uint16_t g[2] = {0, 0}, m[2] = {0, 0}, v[2] = {0, 0};
    float sm = 1.0f, sv = 1.0f;
    moe_adam_args a;
    memset(&a, 0, sizeof a);
    a.n = 2;
    a.param = p;
    a.param_dtype = MOE_F16;
    a.grad = g;
    a.grad_dtype = MOE_F16;
    a.exp_avg = m;
    a.exp_avg_sq = v;
    a.state_dtype = MOE_F16;
    a.scale_avg = &sm;
    a.scale_avg_sq = &sv;
    a.lr = 1e-3f;
    a.beta1 = 0.9f;
    a.beta2 = 0.98f;
    a.eps = 1e-8f;
    a.grad_scale = 1.0f;
    a.step = 1;
    assert_int_equal(moe_cpu_adam_step(NULL, &a), MOE_OK);
    assert_true(sm == 1e-8f && sv == 1e-8f);
    assert_int_equal(m[0], 0);
    assert_int_equal(v[1], 0);
    assert_true(moe_f16_to_f32(p[0]) == 1.0f);
}

static moe_status fake_error(const moe_host *h, moe_status st, const char *fmt, ...)
{
    (void)h, (void)fmt;
    return st;
}

static void test_optim_adam_rejects_bad_args(void **state)
{
    (void)state;
    moe_host host;
    memset(&host, 0, sizeof host);
    host.error = fake_error;
    struct moe_ctx ctx = {&host, 0, 0};
    float p[1] = {1}, g[1] = {1}, m[1] = {0}, v[1] = {0};
    moe_adam_args a;
    memset(&a, 0, sizeof a);
    a.n = 1;
    a.param = p;
    a.grad = g;
    a.exp_avg = m;
    a.exp_avg_sq = v;
    a.lr = 1e-3f;
    a.beta1 = 0.9f;
    a.beta2 = 0.98f;
    a.grad_scale = 1.0f;
    a.step = 0; /* steps count from 1 */
    assert_int_equal(moe_cpu_adam_step(&ctx, &a), MOE_ERR_INVALID_ARG);
    a.step = 1;
    a.state_dtype = MOE_F16; /* fp16 moments need their scales */
    assert_int_equal(moe_cpu_adam_step(&ctx, &a), MOE_ERR_INVALID_ARG);
    a.state_dtype = MOE_BF16;
    assert_int_equal(moe_cpu_adam_step(&ctx, &a), MOE_ERR_INVALID_ARG);
    a.state_dtype = MOE_F32;
    a.grad_scale = 0.0f;
    assert_int_equal(moe_cpu_adam_step(&ctx, &a), MOE_ERR_INVALID_ARG);
    a.grad_scale = 1.0f;
    assert_int_equal(moe_cpu_adam_step(&ctx, &a), MOE_OK);
    assert_true(p[0] < 1.0f);
}

/* ------------------------------------------------------------ sgd */

static void test_optim_sgd_momentum_weight_decay(void **state)
{
    (void)state;
    rng_state = 99;
    enum { n = 33 };
    float p[n], g[n], buf[n];
    double rp[n], rb[n];
    uint16_t copy[n];
    for (int i = 0; i < n; i++) {
        p[i] = (float)rnd_nonzero(0.1, 1.0);
        rp[i] = p[i];
        rb[i] = 0.0;
        buf[i] = 0.0f;
    }
    moe_sgd_args a;
    memset(&a, 0, sizeof a);
    a.n = n;
    a.param = p;
    a.param_dtype = MOE_F32;
    a.param_copy = copy;
    a.copy_dtype = MOE_F16;
    a.grad = g;
    a.grad_dtype = MOE_F32;
    a.momentum_buf = buf;
    a.lr = 0.05f;
    a.momentum = 0.9f;
    a.weight_decay = 0.01f;
    a.grad_scale = 4.0f;
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < n; i++)
            g[i] = (float)(4.0 * rnd_nonzero(0.01, 1.0));
        for (int i = 0; i < n; i++) { /* torch: d = g + wd p; b = mu b + d (b = d first); p -= lr b */
            double d = g[i] / 4.0 + (double)0.01f * rp[i];
            rb[i] = step == 0 ? d : (double)0.9f * rb[i] + d;
            rp[i] -= (double)0.05f * rb[i];
        }
        assert_int_equal(moe_cpu_sgd_step(NULL, &a), MOE_OK);
        for (int i = 0; i < n; i++) {
            assert_true(fabs(p[i] - rp[i]) <= 1e-6 * (fabs(rp[i]) + 0.05));
            assert_true(fabs(buf[i] - rb[i]) <= 1e-6 * (fabs(rb[i]) + 1e-3));
            assert_int_equal(copy[i], moe_f32_to_f16(p[i]));
        }
    }
}

static void test_optim_sgd_plain_without_buffer(void **state)
{
    (void)state;
    uint16_t p[2] = {moe_f32_to_f16(1.0f), moe_f32_to_f16(-2.0f)};
    float g[2] = {0.5f, -1.0f};
    moe_sgd_args a;
    memset(&a, 0, sizeof a);
    a.n = 2;
    a.param = p;
    a.param_dtype = MOE_F16;
    a.grad = g;
    a.grad_dtype = MOE_F32;
    a.lr = 0.25f;
    a.grad_scale = 1.0f;
    assert_int_equal(moe_cpu_sgd_step(NULL, &a), MOE_OK);
    assert_true(moe_f16_to_f32(p[0]) == 0.875f);  /* 1 - 0.25*0.5 */
    assert_true(moe_f16_to_f32(p[1]) == -1.75f);  /* -2 + 0.25*1 */
    a.momentum = 0.9f; /* momentum without a buffer is a caller bug */
    assert_int_equal(moe_cpu_sgd_step(NULL, &a), MOE_ERR_INVALID_ARG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_optim_adam_fp32_params_fp32_moments),
        cmocka_unit_test(test_optim_adam_fp16_params_fp32_moments),
        cmocka_unit_test(test_optim_adam_fp32_params_fp16_moments),
        cmocka_unit_test(test_optim_adam_fp16_params_fp16_moments),
        cmocka_unit_test(test_optim_adam_bf16_params_weight_decay),
        cmocka_unit_test(test_optim_adam_bias_correction),
        cmocka_unit_test(test_optim_adam_weight_decay),
        cmocka_unit_test(test_optim_adam_fp16_moments_zero_gradient),
        cmocka_unit_test(test_optim_adam_rejects_bad_args),
        cmocka_unit_test(test_optim_sgd_momentum_weight_decay),
        cmocka_unit_test(test_optim_sgd_plain_without_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
