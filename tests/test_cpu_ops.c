/* test_cpu_ops.c: unit tests of the cpu backend (kernels/cpu): the plugin and
 * its memory accounting, the elementwise/utility ops, and every forward op
 * against a naive double-precision reference written here, and every
 * backward against central finite differences of its own forward.
 *
 * The cpu sources are compiled into this program, so the moe_cpu_* functions
 * are called directly; the plugin descriptor is checked to point at them.
 * Sizes are tiny on purpose: the whole program runs in well under a second.
 *
 * Finite differences: fp32 storage, losses L = sum(W * out) with random W,
 * summed in double, step h as stated per test. Elementwise and linear ops
 * give exact differences up to one fp32 rounding, so their tolerances are
 * 1e-4..2e-4; the coupled ops (layer norm, attention, cross-entropy) add an
 * O(h^2) truncation term and use 5e-4. A wrong factor (a missing 1/(1-p),
 * a forgotten transpose, a halved gradient) gives relative errors of order 1.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "kernels/cpu/cpu.h"
#include "testutil.h"

/* defined by MOE_PLUGIN_DEFINE in kernels/cpu/backend.c */
const moe_plugin_desc *moe_plugin_descriptor(void);

static moe_host g_host;
static const moe_backend_ops *g_be;
static moe_ctx *g_ctx;

static int group_setup(void **state)
{
    (void)state;
    moe_test_host_init(&g_host);
    g_be = (const moe_backend_ops *)moe_plugin_descriptor()->ops;
    return g_be->create(&g_host, -1, &g_ctx) == MOE_OK ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    g_be->destroy(g_ctx);
    return 0;
}

/* ------------------------------------------------------------ helpers */

static float *fbuf(int64_t n)
{
    float *p = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    assert_non_null(p);
    return p;
}

static double *dbuf(int64_t n)
{
    double *p = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    assert_non_null(p);
    return p;
}

static void *tbuf(int64_t n, moe_dtype dt)
{
    void *p = calloc((size_t)(n > 0 ? n : 1), moe_dtype_size(dt));
    assert_non_null(p);
    return p;
}

/* x rounded to the precision of dt, in place */
static void round_to(float *x, int64_t n, moe_dtype dt)
{
    uint16_t h;
    for (int64_t i = 0; i < n; i++) {
        if (dt == MOE_F16) {
            h = moe_f32_to_f16(x[i]);
            x[i] = moe_f16_to_f32(h);
        } else if (dt == MOE_BF16) {
            h = moe_f32_to_bf16(x[i]);
            x[i] = moe_bf16_to_f32(h);
        }
    }
}

static void store_all(void *dst, moe_dtype dt, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(dst, dt, i, src[i]);
}

static void load_all(float *dst, const void *src, moe_dtype dt, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = moe_cpu_load(src, dt, i);
}

static double dot_wd(const float *w, const float *y, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (double)w[i] * (double)y[i];
    return s;
}

static double gelu_ref(double x, moe_act_kind kind)
{
    if (kind == MOE_ACT_GELU_ERF)
        return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    return 0.5 * x * (1.0 + tanh(0.7978845608 * (x + 0.044715 * x * x * x)));
}

static double act_ref(double x, moe_act_kind kind)
{
    if (kind == MOE_ACT_RELU)
        return x > 0.0 ? x : 0.0;
    return gelu_ref(x, kind);
}

/* ------------------------------------------------------ plugin, memory */

static void test_cpu_ops_plugin_descriptor(void **state)
{
    (void)state;
    const moe_plugin_desc *d = moe_plugin_descriptor();
    assert_int_equal(d->abi_major, MOE_ABI_MAJOR);
    assert_int_equal(d->kind, MOE_KIND_BACKEND);
    assert_string_equal(d->name, "cpu");
    assert_int_equal(d->ops_size, sizeof(moe_backend_ops));
    const moe_backend_ops *be = d->ops;
    assert_int_equal(be->available(), 1);
    assert_non_null(be->alloc);
    assert_non_null(be->copy);
    const moe_ops *o = be->ops;
    assert_ptr_equal(o->fill, moe_cpu_fill);
    assert_ptr_equal(o->cast, moe_cpu_cast);
    assert_ptr_equal(o->axpby, moe_cpu_axpby);
    assert_ptr_equal(o->add, moe_cpu_add);
    assert_ptr_equal(o->init_uniform, moe_cpu_init_uniform);
    assert_ptr_equal(o->init_normal, moe_cpu_init_normal);
    assert_ptr_equal(o->sum_f32, moe_cpu_sum_f32);
    assert_ptr_equal(o->sumsq, moe_cpu_sumsq);
    assert_ptr_equal(o->matmul, moe_cpu_matmul);
    assert_ptr_equal(o->bias_backward, moe_cpu_bias_backward);
    assert_ptr_equal(o->act_forward, moe_cpu_act_forward);
    assert_ptr_equal(o->act_backward, moe_cpu_act_backward);
    assert_ptr_equal(o->dropout_forward, moe_cpu_dropout_forward);
    assert_ptr_equal(o->dropout_backward, moe_cpu_dropout_backward);
    assert_ptr_equal(o->layernorm_forward, moe_cpu_layernorm_forward);
    assert_ptr_equal(o->layernorm_backward, moe_cpu_layernorm_backward);
    assert_ptr_equal(o->embedding_forward, moe_cpu_embedding_forward);
    assert_ptr_equal(o->embedding_backward, moe_cpu_embedding_backward);
    assert_ptr_equal(o->attention_forward, moe_cpu_attention_forward);
    assert_ptr_equal(o->attention_backward, moe_cpu_attention_backward);
    assert_ptr_equal(o->cross_entropy, moe_cpu_cross_entropy);
    assert_ptr_equal(o->route_workspace_bytes, moe_cpu_route_workspace_bytes);
    assert_ptr_equal(o->route_forward, moe_cpu_route_forward);
    assert_ptr_equal(o->route_backward, moe_cpu_route_backward);
    assert_ptr_equal(o->dispatch_forward, moe_cpu_dispatch_forward);
    assert_ptr_equal(o->dispatch_backward, moe_cpu_dispatch_backward);
    assert_ptr_equal(o->combine_forward, moe_cpu_combine_forward);
    assert_ptr_equal(o->combine_backward, moe_cpu_combine_backward);
    assert_ptr_equal(o->adam_step, moe_cpu_adam_step);
    assert_ptr_equal(o->sgd_step, moe_cpu_sgd_step);
}

static void test_cpu_ops_memory_accounting(void **state)
{
    (void)state;
    moe_mem_stats s0, s;
    g_be->memory_stats(g_ctx, &s0);
    void *a = NULL, *b = NULL;
    assert_int_equal(g_be->alloc(g_ctx, 100, "a", &a), MOE_OK);
    assert_int_equal(g_be->alloc(g_ctx, 1000, "b", &b), MOE_OK);
    assert_int_equal((uintptr_t)a % 64, 0);
    assert_int_equal((uintptr_t)b % 64, 0);
    g_be->memory_stats(g_ctx, &s);
    assert_int_equal(s.allocated, s0.allocated + 1100);
    assert_true(s.peak_allocated >= s0.allocated + 1100);
    assert_int_equal(s.total, 0);

    g_be->free(g_ctx, a);
    g_be->memory_stats(g_ctx, &s);
    assert_int_equal(s.allocated, s0.allocated + 1000);
    assert_true(s.peak_allocated >= s0.allocated + 1100);
    g_be->reset_peak(g_ctx);
    g_be->memory_stats(g_ctx, &s);
    assert_int_equal(s.peak_allocated, s0.allocated + 1000);

    /* copies in, across and out */
    unsigned char src[1000], dst[1000];
    for (int i = 0; i < 1000; i++)
        src[i] = (unsigned char)(i * 7 + 1);
    void *c = NULL;
    assert_int_equal(g_be->alloc(g_ctx, 1000, "c", &c), MOE_OK);
    assert_int_equal(g_be->copy_from_host(g_ctx, b, src, 1000), MOE_OK);
    assert_int_equal(g_be->copy(g_ctx, c, b, 1000), MOE_OK);
    assert_int_equal(g_be->synchronize(g_ctx), MOE_OK);
    assert_int_equal(g_be->copy_to_host(g_ctx, dst, c, 1000), MOE_OK);
    assert_memory_equal(src, dst, 1000);

    /* an impossible request fails with a message naming it, its size and what is held */
    void *huge = (void *)&huge;
    moe_test_clear_error();
    assert_int_equal(g_be->alloc(g_ctx, UINT64_MAX / 2, "expert activations", &huge), MOE_ERR_NOMEM);
    assert_null(huge);
    char held[32];
    snprintf(held, sizeof held, "%llu", (unsigned long long)(s0.allocated + 2000));
    assert_non_null(strstr(moe_test_last_error(), "expert activations"));
    assert_non_null(strstr(moe_test_last_error(), "9223372036854775807"));
    assert_non_null(strstr(moe_test_last_error(), held));

    g_be->free(g_ctx, b);
    g_be->free(g_ctx, c);
    g_be->free(g_ctx, NULL);
    g_be->memory_stats(g_ctx, &s);
    assert_int_equal(s.allocated, s0.allocated);
}

/* ------------------------------------------------ elementwise, utility */

static void test_cpu_ops_cast_round_trips(void **state)
{
    (void)state;
    /* exactly representable in f16 (incl. the largest normal and a subnormal) and in bf16 */
    const float exact16[] = {1.0f, -2.5f, 0x1.998p-4f, 65504.0f, -0x1p-24f, 1023.5f};
    const float exactbf[] = {1.0f, -2.5f, 0x1.fep127f, 0.0078125f, 0x1p-133f};
    uint16_t h[8];
    float back[8];
    assert_int_equal(moe_cpu_cast(g_ctx, h, MOE_F16, exact16, MOE_F32, 6), MOE_OK);
    assert_int_equal(moe_cpu_cast(g_ctx, back, MOE_F32, h, MOE_F16, 6), MOE_OK);
    assert_memory_equal(back, exact16, sizeof exact16);
    assert_int_equal(moe_cpu_cast(g_ctx, h, MOE_BF16, exactbf, MOE_F32, 5), MOE_OK);
    assert_int_equal(moe_cpu_cast(g_ctx, back, MOE_F32, h, MOE_BF16, 5), MOE_OK);
    assert_memory_equal(back, exactbf, sizeof exactbf);

    /* rounding: ties to even, overflow to inf */
    const float r16[] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 70000.0f, 65519.0f};
    assert_int_equal(moe_cpu_cast(g_ctx, h, MOE_F16, r16, MOE_F32, 4), MOE_OK);
    assert_int_equal(moe_cpu_cast(g_ctx, back, MOE_F32, h, MOE_F16, 4), MOE_OK);
    assert_true(back[0] == 1.0f);
    assert_true(back[1] == 1.0f + 0x1p-9f);
    assert_true(isinf(back[2]) && back[2] > 0);
    assert_true(back[3] == 65504.0f);
    const float rbf[] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f};
    assert_int_equal(moe_cpu_cast(g_ctx, h, MOE_BF16, rbf, MOE_F32, 2), MOE_OK);
    assert_int_equal(moe_cpu_cast(g_ctx, back, MOE_F32, h, MOE_BF16, 2), MOE_OK);
    assert_true(back[0] == 1.0f);
    assert_true(back[1] == 1.0f + 0x1p-6f);

    /* random values: one rounding, relative error within half an ulp */
    moe_test_rng r = moe_test_rng_make(11);
    enum { N = 1000 };
    float *x = fbuf(N), *y = fbuf(N);
    uint16_t *hh = tbuf(N, MOE_F16);
    moe_test_fill_signed(&r, x, N, 1e-3f, 1e3f);
    const moe_dtype dts[2] = {MOE_F16, MOE_BF16};
    const double half_ulp[2] = {0x1p-11, 0x1p-8};
    for (int d = 0; d < 2; d++) {
        assert_int_equal(moe_cpu_cast(g_ctx, hh, dts[d], x, MOE_F32, N), MOE_OK);
        assert_int_equal(moe_cpu_cast(g_ctx, y, MOE_F32, hh, dts[d], N), MOE_OK);
        for (int i = 0; i < N; i++)
            assert_true(fabs((double)y[i] - (double)x[i]) <= half_ulp[d] * fabs((double)x[i]));
    }
    /* f16 <-> bf16 goes through fp32; i32 truncates toward zero */
    const float fi[] = {3.75f, -3.75f, 1e6f};
    int32_t iv[3];
    assert_int_equal(moe_cpu_cast(g_ctx, iv, MOE_I32, fi, MOE_F32, 3), MOE_OK);
    assert_int_equal(iv[0], 3);
    assert_int_equal(iv[1], -3);
    assert_int_equal(iv[2], 1000000);
    assert_int_equal(moe_cpu_cast(g_ctx, back, MOE_F32, iv, MOE_I32, 3), MOE_OK);
    assert_true(back[0] == 3.0f && back[1] == -3.0f && back[2] == 1e6f);
    free(x);
    free(y);
    free(hh);
}

static void test_cpu_ops_fill_axpby_add(void **state)
{
    (void)state;
    uint16_t h[5];
    assert_int_equal(moe_cpu_fill(g_ctx, h, MOE_F16, 5, 0.1f), MOE_OK);
    for (int i = 0; i < 5; i++)
        assert_int_equal(h[i], moe_f32_to_f16(0.1f));
    int32_t iv[3];
    assert_int_equal(moe_cpu_fill(g_ctx, iv, MOE_I32, 3, 7.0f), MOE_OK);
    assert_int_equal(iv[2], 7);

    moe_test_rng r = moe_test_rng_make(12);
    enum { N = 37 };
    float x[N], y[N], y0[N], out[N];
    double ref[N];
    moe_test_fill_signed(&r, x, N, 0.1f, 2.0f);
    moe_test_fill_signed(&r, y0, N, 0.1f, 2.0f);
    memcpy(y, y0, sizeof y);
    assert_int_equal(moe_cpu_axpby(g_ctx, y, x, MOE_F32, N, 2.0f, -3.0f), MOE_OK);
    for (int i = 0; i < N; i++)
        ref[i] = 2.0 * x[i] - 3.0 * y0[i];
    assert_true(moe_test_close("axpby", y, ref, N, 1e-6));
    /* b == 0 does not read y: NaN there must not leak */
    for (int i = 0; i < N; i++)
        y[i] = NAN;
    assert_int_equal(moe_cpu_axpby(g_ctx, y, x, MOE_F32, N, 0.5f, 0.0f), MOE_OK);
    for (int i = 0; i < N; i++)
        assert_true(y[i] == 0.5f * x[i]);
    /* add, also aliased onto its first input */
    assert_int_equal(moe_cpu_add(g_ctx, out, x, y0, MOE_F32, N), MOE_OK);
    for (int i = 0; i < N; i++)
        assert_true(out[i] == x[i] + y0[i]);
    assert_int_equal(moe_cpu_add(g_ctx, x, x, y0, MOE_F32, N), MOE_OK);
    assert_memory_equal(x, out, sizeof out);
    /* bf16 storage: each result rounded once */
    uint16_t hb[N], hx[N];
    store_all(hb, MOE_BF16, y0, N);
    store_all(hx, MOE_BF16, x, N);
    assert_int_equal(moe_cpu_add(g_ctx, hb, hb, hx, MOE_BF16, N), MOE_OK);
    for (int i = 0; i < N; i++)
        assert_int_equal(hb[i], moe_f32_to_bf16(moe_bf16_to_f32(moe_f32_to_bf16(y0[i])) +
                                                moe_bf16_to_f32(moe_f32_to_bf16(x[i]))));
}

static void test_cpu_ops_sums(void **state)
{
    (void)state;
    /* double accumulation: fp32 running sums would lose the 1s next to 1e8 */
    const float x[] = {1e8f, 1.0f, -1e8f, 1.0f, 3.0f, 5.0f};
    float out = 10.0f;
    assert_int_equal(moe_cpu_sum_f32(g_ctx, &out, x, 4, 1, 0.5f), MOE_OK);
    assert_true(out == 11.0f);
    out = 0.0f; /* stride 2: x[0] + x[2] + x[4] */
    assert_int_equal(moe_cpu_sum_f32(g_ctx, &out, x, 3, 2, 1.0f), MOE_OK);
    assert_true(out == 3.0f);

    moe_test_rng r = moe_test_rng_make(13);
    enum { N = 501 };
    float v[N];
    uint16_t h[N];
    moe_test_fill_signed(&r, v, N, 0.1f, 3.0f);
    store_all(h, MOE_F16, v, N);
    double ref = 2.0;
    for (int i = 0; i < N; i++) {
        double f = (double)moe_f16_to_f32(h[i]);
        ref += f * f;
    }
    out = 2.0f;
    assert_int_equal(moe_cpu_sumsq(g_ctx, &out, h, MOE_F16, N), MOE_OK);
    assert_true(fabs((double)out - ref) <= 1e-6 * ref);
    /* inf and nan propagate (the overflow check) */
    h[100] = 0x7C00u; /* +inf */
    out = 0.0f;
    assert_int_equal(moe_cpu_sumsq(g_ctx, &out, h, MOE_F16, N), MOE_OK);
    assert_true(isinf(out));
    v[7] = NAN;
    out = 0.0f;
    assert_int_equal(moe_cpu_sumsq(g_ctx, &out, v, MOE_F32, N), MOE_OK);
    assert_true(isnan(out));
}

static void test_cpu_ops_init_distributions(void **state)
{
    (void)state;
    enum { N = 100000 };
    float *x = fbuf(N), *y = fbuf(N);
    /* U(-2, 3): mean 0.5, variance 25/12; the standard error of the mean is 0.0046 */
    assert_int_equal(moe_cpu_init_uniform(g_ctx, x, MOE_F32, N, -2.0f, 3.0f, 42, 7), MOE_OK);
    double s = 0, ss = 0;
    for (int i = 0; i < N; i++) {
        assert_true(x[i] >= -2.0f && x[i] <= 3.0f);
        s += x[i];
        ss += (double)x[i] * x[i];
    }
    double mean = s / N, var = ss / N - mean * mean;
    assert_true(fabs(mean - 0.5) < 0.025);
    assert_true(fabs(var - 25.0 / 12.0) < 0.05);
    /* reproducible per (seed, stream), counter = element index */
    assert_int_equal(moe_cpu_init_uniform(g_ctx, y, MOE_F32, N, -2.0f, 3.0f, 42, 7), MOE_OK);
    assert_memory_equal(x, y, N * sizeof(float));
    assert_true(x[123] == -2.0f + 5.0f * moe_philox_uniform(42, 7, 123));
    assert_int_equal(moe_cpu_init_uniform(g_ctx, y, MOE_F32, N, -2.0f, 3.0f, 42, 8), MOE_OK);
    int same = 0;
    for (int i = 0; i < N; i++)
        same += x[i] == y[i];
    assert_true(same < 100);

    /* N(1, 2): standard errors 0.0063 (mean), 0.0045 (std) */
    assert_int_equal(moe_cpu_init_normal(g_ctx, x, MOE_F32, N, 1.0f, 2.0f, 5, 3), MOE_OK);
    s = ss = 0;
    int within = 0;
    for (int i = 0; i < N; i++) {
        assert_true(isfinite(x[i]));
        s += x[i];
        ss += (double)x[i] * x[i];
        within += fabs((double)x[i] - 1.0) < 2.0;
    }
    mean = s / N;
    double sd = sqrt(ss / N - mean * mean);
    assert_true(fabs(mean - 1.0) < 0.03);
    assert_true(fabs(sd - 2.0) < 0.03);
    assert_true(fabs((double)within / N - 0.6827) < 0.01); /* a normal, not just any unit-variance law */
    assert_int_equal(moe_cpu_init_normal(g_ctx, y, MOE_F32, N, 1.0f, 2.0f, 5, 3), MOE_OK);
    assert_memory_equal(x, y, N * sizeof(float));
    free(x);
    free(y);
}

/* --------------------------------------------------------------- matmul */

/* C = alpha*op(A)op(B) + beta*C (+ epilogue) on random data with padded
 * leading dimensions and batch strides, against a double reference computed
 * from the stored (rounded) inputs. */
static int check_matmul_act(int ta, int tb, int64_t m, int64_t n, int64_t k, int64_t batch, moe_dtype dt,
                            moe_epilogue epi, float alpha, float beta, double tol, moe_act_kind act)
{
    moe_test_rng r = moe_test_rng_make((uint64_t)(1000 + ta * 2 + tb + m * 7 + n * 13 + k * 17 + epi * 31 + dt));
    const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
    const int64_t lda = a_cols + 3, ldb = b_cols + 1, ldc = n + 2;
    const int64_t sa = a_rows * lda + 5, sb = b_rows * ldb, sc = m * ldc + 1, sbias = n + 4;
    float *a = fbuf(batch * sa), *b = fbuf(batch * sb), *c0 = fbuf(batch * sc), *bias = fbuf(batch * sbias);
    moe_test_fill_signed(&r, a, batch * sa, 0.1f, 1.0f);
    moe_test_fill_signed(&r, b, batch * sb, 0.1f, 1.0f);
    moe_test_fill_signed(&r, c0, batch * sc, 0.1f, 1.0f);
    moe_test_fill_signed(&r, bias, batch * sbias, 0.1f, 1.0f);
    if (beta == 0.0f)
        for (int64_t i = 0; i < batch * sc; i++)
            c0[i] = NAN; /* beta == 0 must not read C */
    round_to(a, batch * sa, dt);
    round_to(b, batch * sb, dt);
    round_to(c0, batch * sc, dt);
    round_to(bias, batch * sbias, dt);
    void *ta_ = tbuf(batch * sa, dt), *tb_ = tbuf(batch * sb, dt), *tc = tbuf(batch * sc, dt),
         *tbias = tbuf(batch * sbias, dt), *taux = tbuf(batch * sc, dt);
    store_all(ta_, dt, a, batch * sa);
    store_all(tb_, dt, b, batch * sb);
    store_all(tc, dt, c0, batch * sc);
    store_all(tbias, dt, bias, batch * sbias);

    moe_matmul_desc d = {0};
    d.trans_a = ta;
    d.trans_b = tb;
    d.m = m;
    d.n = n;
    d.k = k;
    d.alpha = alpha;
    d.beta = beta;
    d.a = ta_;
    d.lda = lda;
    d.stride_a = sa;
    d.b = tb_;
    d.ldb = ldb;
    d.stride_b = sb;
    d.c = tc;
    d.ldc = ldc;
    d.stride_c = sc;
    d.ab_dtype = dt;
    d.c_dtype = dt;
    d.batch = batch;
    d.epilogue = epi;
    d.bias = epi != MOE_EPI_NONE ? tbias : NULL;
    d.stride_bias = sbias;
    d.aux = epi == MOE_EPI_BIAS_ACT ? taux : NULL;
    d.act = act;
    int ok = moe_cpu_matmul(g_ctx, &d) == MOE_OK;

    const int64_t total = batch * m * n;
    float *got = fbuf(total), *got_aux = fbuf(total);
    double *ref = dbuf(total), *ref_aux = dbuf(total);
    for (int64_t bt = 0; bt < batch; bt++)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                double s = 0.0;
                for (int64_t p = 0; p < k; p++) {
                    double av = ta ? a[bt * sa + p * lda + i] : a[bt * sa + i * lda + p];
                    double bv = tb ? b[bt * sb + j * ldb + p] : b[bt * sb + p * ldb + j];
                    s += av * bv;
                }
                double v = alpha * s;
                if (beta != 0.0f)
                    v += beta * (double)c0[bt * sc + i * ldc + j];
                if (epi != MOE_EPI_NONE)
                    v += bias[bt * sbias + j];
                const int64_t o = (bt * m + i) * n + j, at = bt * sc + i * ldc + j;
                ref_aux[o] = v;
                got_aux[o] = moe_cpu_load(taux, dt, at);
                ref[o] = epi == MOE_EPI_BIAS_ACT ? act_ref(v, act) : v;
                got[o] = moe_cpu_load(tc, dt, at);
            }
    char label[96];
    snprintf(label, sizeof label, "matmul ta=%d tb=%d %lldx%lldx%lld batch %lld dt %d epi %d act %d", ta, tb,
             (long long)m, (long long)n, (long long)k, (long long)batch, (int)dt, (int)epi, (int)act);
    ok = ok && moe_test_close(label, got, ref, total, tol);
    if (epi == MOE_EPI_BIAS_ACT)
        ok = ok && moe_test_close("matmul aux", got_aux, ref_aux, total, tol);
    /* C's padding columns are untouched */
    for (int64_t bt = 0; bt < batch && ok; bt++)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = n; j < ldc; j++) {
                const int64_t at = bt * sc + i * ldc + j;
                const float now = moe_cpu_load(tc, dt, at);
                ok = ok && ((isnan(now) && isnan(c0[at])) || now == c0[at]);
            }
    free(a);
    free(b);
    free(c0);
    free(bias);
    free(ta_);
    free(tb_);
    free(tc);
    free(tbias);
    free(taux);
    free(got);
    free(got_aux);
    free(ref);
    free(ref_aux);
    return ok;
}

static int check_matmul(int ta, int tb, int64_t m, int64_t n, int64_t k, int64_t batch, moe_dtype dt,
                        moe_epilogue epi, float alpha, float beta, double tol)
{
    return check_matmul_act(ta, tb, m, n, k, batch, dt, epi, alpha, beta, tol, MOE_ACT_GELU_TANH);
}

static void test_cpu_ops_matmul_reference(void **state)
{
    (void)state;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            /* small, and across every tile boundary (64 x 256 x 128) */
            assert_true(check_matmul(ta, tb, 5, 7, 9, 2, MOE_F32, MOE_EPI_NONE, 0.7f, 0.3f, 1e-6));
            assert_true(check_matmul(ta, tb, 70, 260, 130, 1, MOE_F32, MOE_EPI_NONE, 1.0f, 0.0f, 1e-6));
            /* fp16/bf16 storage: the reference uses the same rounded inputs, so
             * only the output rounding (half an ulp) separates them */
            assert_true(check_matmul(ta, tb, 6, 5, 11, 2, MOE_F16, MOE_EPI_NONE, 1.0f, 0.5f, 0x1p-10));
            assert_true(check_matmul(ta, tb, 6, 5, 11, 2, MOE_BF16, MOE_EPI_NONE, 1.0f, 0.5f, 0x1p-7));
        }
    assert_true(check_matmul(0, 1, 9, 6, 4, 3, MOE_F32, MOE_EPI_BIAS, 1.0f, 0.5f, 1e-6));
    assert_true(check_matmul(1, 0, 9, 6, 4, 2, MOE_F32, MOE_EPI_BIAS_ACT, 1.5f, 0.0f, 1e-6));
    assert_true(check_matmul(0, 0, 9, 300, 4, 1, MOE_BF16, MOE_EPI_BIAS_ACT, 1.0f, 0.0f, 0x1p-7));
    assert_true(check_matmul_act(0, 1, 9, 6, 4, 2, MOE_F32, MOE_EPI_BIAS_ACT, 1.0f, 0.0f, 1e-6, MOE_ACT_GELU_ERF));
    /* relu: about half the pre-activations are negative and must come out 0, aux keeps them */
    assert_true(check_matmul_act(1, 0, 9, 6, 4, 2, MOE_F32, MOE_EPI_BIAS_ACT, 1.5f, 0.0f, 1e-6, MOE_ACT_RELU));
    assert_true(check_matmul_act(0, 1, 70, 260, 5, 1, MOE_F16, MOE_EPI_BIAS_ACT, 1.0f, 0.0f, 0x1p-10, MOE_ACT_RELU));
    assert_true(check_matmul_act(0, 0, 9, 300, 4, 1, MOE_BF16, MOE_EPI_BIAS_ACT, 1.0f, 0.0f, 0x1p-7, MOE_ACT_RELU));
    /* k == 0: C = beta*C + bias */
    assert_true(check_matmul(0, 0, 3, 4, 0, 1, MOE_F32, MOE_EPI_BIAS, 1.0f, 2.0f, 1e-6));
}

/* grouped_matmul and expert_rows (the dropless experts' products): each
 * group against a double reference over its counted rows, the rows past a
 * count untouched (NaN stays NaN), counts past the bound cut to it. */
static double dact_ref(double x, moe_act_kind kind)
{
    if (kind == MOE_ACT_RELU)
        return x > 0.0 ? 1.0 : 0.0;
    const double h = 1e-5;
    return (gelu_ref(x + h, kind) - gelu_ref(x - h, kind)) / (2.0 * h);
}

static void check_grouped(int ta, moe_epilogue epi, moe_act_kind act, int with_dbias)
{
    enum { G = 4 };
    const int64_t m = 7, n = 5, k = 6, V = ta ? k : m;
    const int32_t rows[G] = {0, 3, (int32_t)V + 2, 5};
    const int tb = ta ? 0 : 1; /* NT forward / TN weight gradient; NN below */
    const int tbv = epi == MOE_EPI_DACT ? 0 : tb;
    float *A[G], *B[G], *C[G], *C0[G], *bias[G], *aux[G], *db[G], *db0[G];
    moe_test_rng rng = moe_test_rng_make(11);
    for (int g = 0; g < G; g++) {
        A[g] = fbuf(m * k);
        B[g] = fbuf(k * n);
        C[g] = fbuf(m * n);
        C0[g] = fbuf(m * n);
        bias[g] = fbuf(n);
        aux[g] = fbuf(m * n);
        db[g] = fbuf(m);
        db0[g] = fbuf(m);
        moe_test_fill_uniform(&rng, A[g], m * k, -1.0f, 1.0f);
        moe_test_fill_uniform(&rng, B[g], k * n, -1.0f, 1.0f);
        moe_test_fill_uniform(&rng, bias[g], n, -0.5f, 0.5f);
        moe_test_fill_uniform(&rng, db[g], m, -0.5f, 0.5f);
        memcpy(db0[g], db[g], (size_t)m * sizeof(float));
        for (int64_t i = 0; i < m * n; i++) {
            C[g][i] = epi == MOE_EPI_NONE && ta ? (float)moe_test_rng_uniform(&rng) : NAN;
            aux[g][i] = epi == MOE_EPI_DACT ? (float)(4.0 * moe_test_rng_uniform(&rng) - 2.0) : NAN;
        }
        memcpy(C0[g], C[g], (size_t)(m * n) * sizeof(float));
    }
    moe_grouped_matmul_args a;
    memset(&a, 0, sizeof a);
    a.trans_a = ta;
    a.trans_b = tbv;
    a.groups = G;
    a.rows = rows;
    a.m = m;
    a.n = n;
    a.k = k;
    a.alpha = ta ? 0.5f : 1.0f;
    a.beta = ta ? 1.0f : 0.0f;
    a.a = (const void *const *)A;
    a.lda = ta ? m : k;
    a.b = (const void *const *)B;
    a.ldb = tbv ? k : n;
    a.c = (void *const *)C;
    a.ldc = n;
    a.dtype = MOE_F32;
    a.epilogue = epi;
    a.bias = epi == MOE_EPI_BIAS || epi == MOE_EPI_BIAS_ACT ? (const void *const *)bias : NULL;
    a.aux = epi == MOE_EPI_BIAS_ACT || epi == MOE_EPI_DACT ? (void *const *)aux : NULL;
    a.act = act;
    a.dbias = with_dbias ? (void *const *)db : NULL;
    assert_int_equal(moe_cpu_grouped_matmul(g_ctx, &a), MOE_OK);
    for (int g = 0; g < G; g++) {
        const int64_t r = rows[g] < V ? rows[g] : V;
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                const float got = C[g][i * n + j];
                if (!ta && i >= r) { /* not written */
                    assert_true(isnan(got));
                    continue;
                }
                double sum = 0.0;
                for (int64_t q = 0; q < (ta ? r : k); q++) {
                    const double av = ta ? A[g][q * m + i] : A[g][i * k + q];
                    const double bv = tbv ? B[g][j * k + q] : B[g][q * n + j];
                    sum += av * bv;
                }
                double want = a.alpha * sum + (ta ? (double)C0[g][i * n + j] : 0.0);
                if (epi == MOE_EPI_DACT)
                    want *= dact_ref(aux[g][i * n + j], act);
                if (epi == MOE_EPI_BIAS || epi == MOE_EPI_BIAS_ACT)
                    want += bias[g][j];
                if (epi == MOE_EPI_BIAS_ACT) {
                    if (fabs(aux[g][i * n + j] - want) > 1e-5 * (1.0 + fabs(want)))
                        fail_msg("group %d (%lld, %lld): pre %g, expected %g", g, (long long)i, (long long)j,
                                 (double)aux[g][i * n + j], want);
                    want = act_ref(want, act);
                }
                if (fabs(got - want) > 1e-5 * (1.0 + fabs(want)))
                    fail_msg("group %d (%lld, %lld) of %lld rows: %g, expected %g", g, (long long)i, (long long)j,
                             (long long)r, (double)got, want);
            }
        for (int64_t i = 0; with_dbias && i < m; i++) {
            double sum = 0.0;
            for (int64_t q = 0; q < r; q++)
                sum += A[g][q * m + i];
            assert_true(fabs(db[g][i] - (db0[g][i] + 0.5 * sum)) < 1e-5);
        }
    }
    for (int g = 0; g < G; g++) {
        free(A[g]);
        free(B[g]);
        free(C[g]);
        free(C0[g]);
        free(bias[g]);
        free(aux[g]);
        free(db[g]);
        free(db0[g]);
    }
}

static void test_cpu_ops_grouped_matmul(void **state)
{
    (void)state;
    check_grouped(0, MOE_EPI_BIAS_ACT, MOE_ACT_GELU_TANH, 0);
    check_grouped(0, MOE_EPI_BIAS, MOE_ACT_GELU_TANH, 0);
    check_grouped(0, MOE_EPI_DACT, MOE_ACT_GELU_ERF, 0);
    check_grouped(0, MOE_EPI_DACT, MOE_ACT_RELU, 0);
    check_grouped(1, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 1);

    /* refused: a bias gradient where k is not the counted side, DACT without its pre-activations */
    moe_grouped_matmul_args a;
    memset(&a, 0, sizeof a);
    void *none[1] = {NULL};
    a.dbias = none;
    assert_int_equal(moe_cpu_grouped_matmul(g_ctx, &a), MOE_ERR_INVALID_ARG);
    a.dbias = NULL;
    a.epilogue = MOE_EPI_DACT;
    assert_int_equal(moe_cpu_grouped_matmul(g_ctx, &a), MOE_ERR_INVALID_ARG);

    /* expert_rows: 1 + the largest slot below C per expert; dropped choices (-1) and slots >= C ignored */
    const int32_t expert[6] = {0, 2, -1, 2, 0, 1}, slot[6] = {0, 4, 3, 1, 7, -1};
    int32_t got[3] = {-5, -5, -5};
    assert_int_equal(moe_cpu_expert_rows(g_ctx, got, expert, slot, 3, 2, 3, 6), MOE_OK);
    assert_int_equal(got[0], 1);
    assert_int_equal(got[1], 0);
    assert_int_equal(got[2], 5);
}

/* Backward of Y = op(A)op(B) + bias through the same matmul with other
 * transposes (what every layer's backward does), against differences of
 * L = sum(W * Y). */
typedef struct mm_fd {
    int ta, tb;
    int64_t m, n, k;
    float *a, *b, *bias, *w, *y;
} mm_fd;

static moe_matmul_desc mm_desc(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *a, const float *b,
                               float *c, float beta)
{
    moe_matmul_desc d = {0};
    d.trans_a = ta;
    d.trans_b = tb;
    d.m = m;
    d.n = n;
    d.k = k;
    d.alpha = 1.0f;
    d.beta = beta;
    d.a = a;
    d.lda = ta ? m : k;
    d.b = b;
    d.ldb = tb ? k : n;
    d.c = c;
    d.ldc = n;
    d.ab_dtype = MOE_F32;
    d.c_dtype = MOE_F32;
    d.batch = 1;
    return d;
}

static double mm_loss(void *ctx)
{
    mm_fd *p = ctx;
    moe_matmul_desc d = mm_desc(p->ta, p->tb, p->m, p->n, p->k, p->a, p->b, p->y, 0.0f);
    d.epilogue = MOE_EPI_BIAS;
    d.bias = p->bias;
    assert_int_equal(moe_cpu_matmul(g_ctx, &d), MOE_OK);
    return dot_wd(p->w, p->y, p->m * p->n);
}

static void test_cpu_ops_matmul_backward_fd(void **state)
{
    (void)state;
    const int64_t m = 4, n = 5, k = 6;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            moe_test_rng r = moe_test_rng_make((uint64_t)(20 + ta * 2 + tb));
            mm_fd p = {ta, tb, m, n, k, fbuf(m * k), fbuf(k * n), fbuf(n), fbuf(m * n), fbuf(m * n)};
            moe_test_fill_signed(&r, p.a, m * k, 0.1f, 1.0f);
            moe_test_fill_signed(&r, p.b, k * n, 0.1f, 1.0f);
            moe_test_fill_signed(&r, p.bias, n, 0.1f, 1.0f);
            moe_test_fill_signed(&r, p.w, m * n, 0.1f, 1.0f);
            double *fa = dbuf(m * k), *fb = dbuf(k * n), *fbias = dbuf(n);
            /* L is linear in each input: differences are exact up to fp32 rounding of Y */
            moe_test_fd_grad(mm_loss, &p, p.a, m * k, 1e-2f, fa);
            moe_test_fd_grad(mm_loss, &p, p.b, k * n, 1e-2f, fb);
            moe_test_fd_grad(mm_loss, &p, p.bias, n, 1e-2f, fbias);

            float *da = fbuf(m * k), *db = fbuf(k * n), *dbias = fbuf(n);
            const float *dy = p.w;
            moe_matmul_desc d;
            if (!ta) /* dA(m,k) = dY op(B)^T */
                d = mm_desc(0, !tb, m, k, n, dy, p.b, da, 0.0f);
            else     /* dA stored (k,m) = op(B) dY^T */
                d = mm_desc(tb, 1, k, m, n, p.b, dy, da, 0.0f);
            assert_int_equal(moe_cpu_matmul(g_ctx, &d), MOE_OK);
            if (!tb) /* dB(k,n) = op(A)^T dY */
                d = mm_desc(!ta, 0, k, n, m, p.a, dy, db, 0.0f);
            else     /* dB stored (n,k) = dY^T op(A) */
                d = mm_desc(1, ta, n, k, m, dy, p.a, db, 0.0f);
            assert_int_equal(moe_cpu_matmul(g_ctx, &d), MOE_OK);
            /* bias_backward accumulates: start from 0.25 and take it off again */
            for (int64_t j = 0; j < n; j++)
                dbias[j] = 0.25f;
            assert_int_equal(moe_cpu_bias_backward(g_ctx, dbias, dy, m, n, MOE_F32), MOE_OK);
            for (int64_t j = 0; j < n; j++)
                fbias[j] += 0.25;

            assert_true(moe_test_close("matmul dA", da, fa, m * k, 1e-4));
            assert_true(moe_test_close("matmul dB", db, fb, k * n, 1e-4));
            assert_true(moe_test_close("bias_backward", dbias, fbias, n, 1e-4));
            free(p.a);
            free(p.b);
            free(p.bias);
            free(p.w);
            free(p.y);
            free(fa);
            free(fb);
            free(fbias);
            free(da);
            free(db);
            free(dbias);
        }

    /* bias_backward in bf16: column sums of the stored values, added once */
    moe_test_rng r = moe_test_rng_make(29);
    enum { N = 33, C = 6 };
    float dy[N * C], acc[C];
    uint16_t hdy[N * C], hdb[C];
    moe_test_fill_signed(&r, dy, N * C, 0.1f, 1.0f);
    store_all(hdy, MOE_BF16, dy, N * C);
    moe_test_fill_signed(&r, acc, C, 0.1f, 1.0f);
    store_all(hdb, MOE_BF16, acc, C);
    assert_int_equal(moe_cpu_bias_backward(g_ctx, hdb, hdy, N, C, MOE_BF16), MOE_OK);
    for (int j = 0; j < C; j++) {
        double s = moe_bf16_to_f32(moe_f32_to_bf16(acc[j]));
        for (int i = 0; i < N; i++)
            s += moe_bf16_to_f32(hdy[i * C + j]);
        assert_int_equal(hdb[j], moe_f32_to_bf16((float)s));
    }
}

static void test_cpu_ops_matmul_throughput(void **state)
{
    (void)state;
    /* Reported, not asserted: timing on a shared CI machine is not a property of the code. */
    enum { S = 256, REPS = 4 };
    moe_test_rng r = moe_test_rng_make(30);
    float *a = fbuf(S * S), *b = fbuf(S * S), *c = fbuf(S * S);
    moe_test_fill_signed(&r, a, S * S, 0.1f, 1.0f);
    moe_test_fill_signed(&r, b, S * S, 0.1f, 1.0f);
    moe_matmul_desc d = mm_desc(0, 0, S, S, S, a, b, c, 0.0f);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < REPS; i++)
        assert_int_equal(moe_cpu_matmul(g_ctx, &d), MOE_OK);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double sec = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    printf("cpu matmul 256x256x256 f32: %.2f GFLOP/s\n", 2.0 * S * S * S * REPS / sec * 1e-9);
    double s = 0.0; /* one entry, to be sure the timed work was the real product */
    for (int p = 0; p < S; p++)
        s += (double)a[17 * S + p] * (double)b[p * S + 99];
    assert_true(fabs((double)c[17 * S + 99] - s) <= 1e-5 * fabs(s) + 1e-4);
    free(a);
    free(b);
    free(c);
}

/* ------------------------------------------------ activations, dropout */

typedef struct ew_fd {
    int64_t n;
    float *x, *w, *y;
    moe_act_kind kind;
    float p;
    uint64_t seed, stream;
} ew_fd;

static double act_loss(void *ctx)
{
    ew_fd *e = ctx;
    assert_int_equal(moe_cpu_act_forward(g_ctx, e->y, e->x, e->n, MOE_F32, e->kind), MOE_OK);
    return dot_wd(e->w, e->y, e->n);
}

static void test_cpu_ops_gelu(void **state)
{
    (void)state;
    /* known values: gelu_erf(1) = Phi(1) = 0.841344746...; tanh form by its formula */
    const float pts[] = {1.0f, -1.0f, 0.0f, 3.0f};
    float y[4];
    assert_int_equal(moe_cpu_act_forward(g_ctx, y, pts, 4, MOE_F32, MOE_ACT_GELU_ERF), MOE_OK);
    assert_true(fabs(y[0] - 0.8413447460685429) < 1e-6);
    assert_true(fabs(y[1] - (-0.15865525393145707)) < 1e-6);
    assert_true(y[2] == 0.0f);
    assert_int_equal(moe_cpu_act_forward(g_ctx, y, pts, 4, MOE_F32, MOE_ACT_GELU_TANH), MOE_OK);
    assert_true(fabs(y[0] - 0.8411919906082768) < 1e-6); /* 0.5*(1+tanh(0.7978845608*1.044715)) */
    assert_true(fabs(y[3] - gelu_ref(3.0, MOE_ACT_GELU_TANH)) < 1e-6);

    for (int kind = 0; kind < 2; kind++) {
        moe_test_rng r = moe_test_rng_make((uint64_t)(40 + kind));
        enum { N = 64 };
        ew_fd e = {N, fbuf(N), fbuf(N), fbuf(N), (moe_act_kind)kind, 0, 0, 0};
        moe_test_fill_signed(&r, e.x, N, 0.05f, 3.0f);
        moe_test_fill_signed(&r, e.w, N, 0.1f, 1.0f);
        double *fd = dbuf(N);
        double ref[N];
        moe_test_fd_grad(act_loss, &e, e.x, N, 1e-2f, fd);
        /* dinp may alias dout */
        float *g = fbuf(N);
        memcpy(g, e.w, N * sizeof(float));
        assert_int_equal(moe_cpu_act_backward(g_ctx, g, e.x, g, N, MOE_F32, (moe_act_kind)kind), MOE_OK);
        /* elementwise: difference error is h^2 |gelu'''|/6 ~ 1e-5 */
        assert_true(moe_test_close(kind ? "gelu erf backward" : "gelu tanh backward", g, fd, N, 2e-4));
        for (int i = 0; i < N; i++)
            ref[i] = gelu_ref(e.x[i], (moe_act_kind)kind);
        assert_int_equal(moe_cpu_act_forward(g_ctx, e.y, e.x, N, MOE_F32, (moe_act_kind)kind), MOE_OK);
        assert_true(moe_test_close("gelu forward", e.y, ref, N, 1e-6));
        free(e.x);
        free(e.w);
        free(e.y);
        free(fd);
        free(g);
    }
}

/* relu: max(0, x), derivative 0 at x == 0; backward selects, so an inf dout
 * where the input is negative gives 0 (not inf * 0 = NaN); NaN passes through
 * both ways, as torch.relu and its threshold_backward do. */
static void test_cpu_ops_relu(void **state)
{
    (void)state;
    const float pts[] = {-2.0f, -0.5f, 0.0f, -0.0f, 0.25f, 3.0f, -INFINITY, INFINITY, NAN};
    const float dpts[] = {1.5f, INFINITY, 2.0f, 2.0f, -0.75f, 4.0f, 1.0f, 1.0f, 1.0f};
    enum { P = sizeof pts / sizeof pts[0] };
    float y[P], g[P];
    assert_int_equal(moe_cpu_act_forward(g_ctx, y, pts, P, MOE_F32, MOE_ACT_RELU), MOE_OK);
    const float want_y[P] = {0.0f, 0.0f, 0.0f, 0.0f, 0.25f, 3.0f, 0.0f, INFINITY, NAN};
    assert_int_equal(moe_cpu_act_backward(g_ctx, g, pts, dpts, P, MOE_F32, MOE_ACT_RELU), MOE_OK);
    const float want_g[P] = {0.0f, 0.0f, 0.0f, 0.0f, -0.75f, 4.0f, 0.0f, 1.0f, 1.0f};
    for (int i = 0; i < P - 1; i++) {
        assert_true(y[i] == want_y[i]);
        assert_true(g[i] == want_g[i]);
    }
    assert_true(isnan(y[P - 1]));
    assert_true(g[P - 1] == want_g[P - 1]);

    /* away from 0 (|x| >= 0.05 > h) relu is linear on [x - h, x + h]: differences are exact up to rounding */
    moe_test_rng r = moe_test_rng_make(45);
    enum { N = 64 };
    ew_fd e = {N, fbuf(N), fbuf(N), fbuf(N), MOE_ACT_RELU, 0, 0, 0};
    moe_test_fill_signed(&r, e.x, N, 0.05f, 3.0f);
    moe_test_fill_signed(&r, e.w, N, 0.1f, 1.0f);
    double *fd = dbuf(N);
    double ref[N];
    moe_test_fd_grad(act_loss, &e, e.x, N, 1e-2f, fd);
    int positive = 0;
    for (int i = 0; i < N; i++) {
        ref[i] = act_ref(e.x[i], MOE_ACT_RELU);
        positive += e.x[i] > 0.0f;
    }
    assert_true(positive > N / 4 && positive < 3 * N / 4); /* both pieces are exercised */
    float *gb = fbuf(N);
    memcpy(gb, e.w, N * sizeof(float));
    assert_int_equal(moe_cpu_act_backward(g_ctx, gb, e.x, gb, N, MOE_F32, MOE_ACT_RELU), MOE_OK); /* in place */
    assert_true(moe_test_close("relu backward", gb, fd, N, 1e-5));
    for (int i = 0; i < N; i++)
        assert_true(gb[i] == (e.x[i] > 0.0f ? e.w[i] : 0.0f));
    assert_int_equal(moe_cpu_act_forward(g_ctx, e.y, e.x, N, MOE_F32, MOE_ACT_RELU), MOE_OK);
    assert_true(moe_test_close("relu forward", e.y, ref, N, 0.0));

    /* half storage: relu of a stored value is that value or 0, nothing to round */
    for (int t = 0; t < 2; t++) {
        const moe_dtype dt = t ? MOE_BF16 : MOE_F16;
        uint16_t hx[N], hw[N], hy[N];
        float xr[N], back[N];
        memcpy(xr, e.x, sizeof xr);
        round_to(xr, N, dt);
        store_all(hx, dt, xr, N);
        store_all(hw, dt, e.w, N);
        assert_int_equal(moe_cpu_act_forward(g_ctx, hy, hx, N, dt, MOE_ACT_RELU), MOE_OK);
        load_all(back, hy, dt, N);
        for (int i = 0; i < N; i++)
            assert_true(back[i] == (xr[i] > 0.0f ? xr[i] : 0.0f));
        assert_int_equal(moe_cpu_act_backward(g_ctx, hy, hx, hw, N, dt, MOE_ACT_RELU), MOE_OK);
        load_all(back, hy, dt, N);
        for (int i = 0; i < N; i++)
            assert_true(back[i] == (xr[i] > 0.0f ? moe_cpu_load(hw, dt, i) : 0.0f));
    }

    /* an unknown kind is refused */
    moe_test_clear_error();
    assert_int_equal(moe_cpu_act_forward(g_ctx, y, pts, P, MOE_F32, (moe_act_kind)3), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_test_last_error(), "MOE_ACT_RELU"));
    moe_test_clear_error();
    free(e.x);
    free(e.w);
    free(e.y);
    free(fd);
    free(gb);
}

static double dropout_loss(void *ctx)
{
    ew_fd *e = ctx;
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, e->y, e->x, e->n, MOE_F32, e->p, e->seed, e->stream), MOE_OK);
    return dot_wd(e->w, e->y, e->n);
}

static void test_cpu_ops_dropout(void **state)
{
    (void)state;
    enum { N = 20000 };
    const float p = 0.3f;
    moe_test_rng r = moe_test_rng_make(50);
    float *x = fbuf(N), *y1 = fbuf(N), *y2 = fbuf(N), *y3 = fbuf(N);
    moe_test_fill_signed(&r, x, N, 0.1f, 1.0f);
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, y1, x, N, MOE_F32, p, 9, 4), MOE_OK);
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, y2, x, N, MOE_F32, p, 9, 4), MOE_OK);
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, y3, x, N, MOE_F32, p, 9, 5), MOE_OK);
    assert_memory_equal(y1, y2, N * sizeof(float)); /* same (seed, stream): same mask */
    int kept = 0, differ = 0;
    const float scale = 1.0f / (1.0f - p);
    for (int i = 0; i < N; i++) {
        const int keep = moe_philox_uniform(9, 4, (uint64_t)i) >= p; /* the documented mask */
        assert_true(y1[i] == (keep ? x[i] * scale : 0.0f));
        kept += keep;
        differ += (y1[i] == 0.0f) != (y3[i] == 0.0f);
    }
    /* keep rate 0.7, standard error 0.0032; another stream draws another mask (42% of entries differ) */
    assert_true(fabs((double)kept / N - 0.7) < 0.02);
    assert_true(differ > N / 4);

    /* in place, p == 0 copies, p == 1 drops everything, p outside [0, 1] is refused */
    memcpy(y2, x, N * sizeof(float));
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, y2, y2, N, MOE_F32, p, 9, 4), MOE_OK);
    assert_memory_equal(y1, y2, N * sizeof(float));
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, y2, x, N, MOE_F32, 0.0f, 9, 4), MOE_OK);
    assert_memory_equal(x, y2, N * sizeof(float));
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, y2, x, 10, MOE_F32, 1.0f, 9, 4), MOE_OK);
    for (int i = 0; i < 10; i++)
        assert_true(y2[i] == 0.0f);
    assert_int_equal(moe_cpu_dropout_forward(g_ctx, y2, x, N, MOE_F32, 1.5f, 9, 4), MOE_ERR_INVALID_ARG);

    /* backward: the same mask and scale on dout, checked by differences on a slice */
    enum { M = 50 };
    ew_fd e = {M, x, fbuf(M), fbuf(M), MOE_ACT_GELU_TANH, p, 9, 4};
    moe_test_fill_signed(&r, e.w, M, 0.1f, 1.0f);
    double *fd = dbuf(M);
    moe_test_fd_grad(dropout_loss, &e, x, M, 1e-2f, fd);
    float *din = fbuf(M);
    assert_int_equal(moe_cpu_dropout_backward(g_ctx, din, e.w, M, MOE_F32, p, 9, 4), MOE_OK);
    assert_true(moe_test_close("dropout backward", din, fd, M, 1e-4));
    free(x);
    free(y1);
    free(y2);
    free(y3);
    free(e.w);
    free(e.y);
    free(fd);
    free(din);
}

/* ------------------------------------------------------------ layernorm */

typedef struct ln_fd {
    int64_t N, C;
    float *x, *w, *b, *W, *y, *mean, *rstd;
} ln_fd;

static double ln_loss(void *ctx)
{
    ln_fd *l = ctx;
    assert_int_equal(
        moe_cpu_layernorm_forward(g_ctx, l->y, l->mean, l->rstd, l->x, l->w, l->b, l->N, l->C, 1e-5f, MOE_F32),
        MOE_OK);
    return dot_wd(l->W, l->y, l->N * l->C);
}

static void test_cpu_ops_layernorm(void **state)
{
    (void)state;
    enum { N = 3, C = 8 };
    moe_test_rng r = moe_test_rng_make(60);
    ln_fd l = {N, C, fbuf(N * C), fbuf(C), fbuf(C), fbuf(N * C), fbuf(N * C), fbuf(N), fbuf(N)};
    moe_test_fill_signed(&r, l.x, N * C, 0.1f, 1.0f);
    moe_test_fill_signed(&r, l.w, C, 0.5f, 1.5f);
    moe_test_fill_signed(&r, l.b, C, 0.1f, 1.0f);
    moe_test_fill_signed(&r, l.W, N * C, 0.1f, 1.0f);

    /* forward against double: population variance, eps inside the root */
    ln_loss(&l);
    double ref[N * C];
    for (int i = 0; i < N; i++) {
        double m = 0, v = 0;
        for (int j = 0; j < C; j++)
            m += l.x[i * C + j];
        m /= C;
        for (int j = 0; j < C; j++)
            v += (l.x[i * C + j] - m) * (l.x[i * C + j] - m);
        double rs = 1.0 / sqrt(v / C + 1e-5);
        assert_true(fabs(l.mean[i] - m) < 1e-6);
        assert_true(fabs(l.rstd[i] - rs) < 1e-6 * rs);
        for (int j = 0; j < C; j++)
            ref[i * C + j] = (l.x[i * C + j] - m) * rs * l.w[j] + l.b[j];
    }
    assert_true(moe_test_close("layernorm forward", l.y, ref, N * C, 1e-6));

    /* backward accumulates into dinp, dweight, dbias: start from known values */
    double *fx = dbuf(N * C), *fw = dbuf(C), *fb = dbuf(C);
    moe_test_fd_grad(ln_loss, &l, l.x, N * C, 3e-3f, fx);
    moe_test_fd_grad(ln_loss, &l, l.w, C, 3e-3f, fw);
    moe_test_fd_grad(ln_loss, &l, l.b, C, 3e-3f, fb);
    ln_loss(&l);
    float *dx = fbuf(N * C), *dw = fbuf(C), *db = fbuf(C);
    for (int i = 0; i < N * C; i++)
        dx[i] = 0.5f;
    for (int j = 0; j < C; j++)
        dw[j] = db[j] = -0.25f;
    assert_int_equal(moe_cpu_layernorm_backward(g_ctx, dx, dw, db, l.W, l.x, l.w, l.mean, l.rstd, N, C, MOE_F32),
                     MOE_OK);
    for (int i = 0; i < N * C; i++)
        fx[i] += 0.5;
    for (int j = 0; j < C; j++) {
        fw[j] -= 0.25;
        fb[j] -= 0.25;
    }
    /* h = 3e-3: truncation h^2 * O(rstd^3) and rounding 1e-7/h, both well under 5e-4 */
    assert_true(moe_test_close("layernorm dinp", dx, fx, N * C, 5e-4));
    assert_true(moe_test_close("layernorm dweight", dw, fw, C, 5e-4));
    assert_true(moe_test_close("layernorm dbias", db, fb, C, 5e-4));
    free(l.x);
    free(l.w);
    free(l.b);
    free(l.W);
    free(l.y);
    free(l.mean);
    free(l.rstd);
    free(fx);
    free(fw);
    free(fb);
    free(dx);
    free(dw);
    free(db);
}

/* ------------------------------------------------------------ embedding */

typedef struct emb_fd {
    int64_t B, T, C, V;
    const int32_t *tok;
    float *table, *W, *y, scale;
    int pad;
} emb_fd;

static double emb_loss(void *ctx)
{
    emb_fd *e = ctx;
    assert_int_equal(
        moe_cpu_embedding_forward(g_ctx, e->y, e->tok, e->table, e->B, e->T, e->C, e->scale, e->pad, 1, MOE_F32),
        MOE_OK);
    return dot_wd(e->W, e->y, e->B * e->T * e->C);
}

static void test_cpu_ops_embedding(void **state)
{
    (void)state;
    enum { B = 2, T = 4, C = 8, V = 6, PAD = 1 };
    const int32_t tok[B * T] = {3, 0, 5, 3, 2, 3, PAD, PAD};
    const float scale = 2.5f;
    moe_test_rng r = moe_test_rng_make(70);
    emb_fd e = {B, T, C, V, tok, fbuf(V * C), fbuf(B * T * C), fbuf(B * T * C), scale, PAD};
    moe_test_fill_signed(&r, e.table, V * C, 0.1f, 1.0f); /* the pad row too: tied weights train it */
    moe_test_fill_signed(&r, e.W, B * T * C, 0.1f, 1.0f);
    emb_loss(&e);

    /* positions by hand (FAIRSEQ_SPEC.md §1.4): half = 4, freq_k = 10000^(-k/3);
     * token t sits at position pad+1+t = t+2; columns [sin | cos] */
    const double f1 = 0.046415888336127774; /* 10000^(-1/3) */
    const float *o = e.y;
    const float *t3 = e.table + 3 * C;
    assert_true(fabs(o[0] - (scale * t3[0] + sin(2.0))) < 2e-6); /* b0 t0: p = 2, k = 0 */
    assert_true(fabs(o[4] - (scale * t3[4] + cos(2.0))) < 2e-6);    /* cos half */
    assert_true(fabs(o[3] - (scale * t3[3] + sin(2e-4))) < 2e-6);   /* k = 3: freq 1e-4 exactly */
    assert_true(fabs(o[7] - (scale * t3[7] + cos(2e-4))) < 2e-6);
    const float *o1 = e.y + 1 * C, *t0 = e.table;
    assert_true(fabs(o1[1] - (scale * t0[1] + sin(3.0 * f1))) < 2e-6); /* b0 t1: p = 3, k = 1 */
    assert_true(fabs(o1[5] - (scale * t0[5] + cos(3.0 * f1))) < 2e-6);
    const float *o5 = e.y + 5 * C; /* b1 t1: token 3 at p = 3 */
    assert_true(fabs(o5[0] - (scale * t3[0] + sin(3.0))) < 2e-6);
    /* pad tokens: scale * table[pad] and no position */
    for (int t = 6; t < 8; t++)
        for (int j = 0; j < C; j++)
            assert_true(e.y[t * C + j] == scale * e.table[PAD * C + j]);

    /* no positions: the scaled lookup exactly; odd C: the last column gets no position */
    float yy[B * T * 9];
    assert_int_equal(moe_cpu_embedding_forward(g_ctx, yy, tok, e.table, B, T, C, scale, PAD, 0, MOE_F32), MOE_OK);
    for (int i = 0; i < B * T * C; i++)
        assert_true(yy[i] == scale * e.table[tok[i / C] * C + i % C]);
    float tab9[V * 9];
    moe_test_fill_signed(&r, tab9, V * 9, 0.1f, 1.0f);
    assert_int_equal(moe_cpu_embedding_forward(g_ctx, yy, tok, tab9, B, T, 9, 1.0f, PAD, 1, MOE_F32), MOE_OK);
    assert_true(yy[8] == tab9[3 * 9 + 8]);
    assert_true(fabs(yy[0] - (tab9[3 * 9] + sin(2.0))) < 2e-6);
    assert_true(fabs(yy[4] - (tab9[3 * 9 + 4] + cos(2.0))) < 2e-6);

    /* backward: dtable[tok] += scale * dout, nothing for pad; accumulates (token 3 thrice) */
    double *fd = dbuf(V * C);
    moe_test_fd_grad(emb_loss, &e, e.table, V * C, 1e-2f, fd);
    float *dt = fbuf(V * C), *dt0 = fbuf(V * C);
    moe_test_fill_signed(&r, dt0, V * C, 0.1f, 1.0f);
    memcpy(dt, dt0, V * C * sizeof(float));
    assert_int_equal(moe_cpu_embedding_backward(g_ctx, dt, e.W, tok, B, T, C, V, scale, PAD, MOE_F32), MOE_OK);
    for (int j = 0; j < C; j++) {
        assert_true(dt[PAD * C + j] == dt0[PAD * C + j]);
        fd[PAD * C + j] = 0.0; /* the lookup reads the pad row, its gradient is dropped by design */
        dt[PAD * C + j] = 0.0f;
    }
    for (int i = 0; i < V * C; i++)
        if (i / C != PAD) {
            fd[i] += (double)dt0[i];
        }
    assert_true(moe_test_close("embedding backward", dt, fd, V * C, 1e-4));
    /* rows no token used (4) are untouched */
    for (int j = 0; j < C; j++)
        assert_true(dt[4 * C + j] == dt0[4 * C + j]);
    /* a token outside the dictionary is refused */
    const int32_t bad[2] = {0, V};
    moe_test_clear_error();
    assert_int_equal(moe_cpu_embedding_backward(g_ctx, dt, e.W, bad, 1, 2, C, V, scale, PAD, MOE_F32),
                     MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_test_last_error(), "outside the dictionary"));
    free(e.table);
    free(e.W);
    free(e.y);
    free(fd);
    free(dt);
    free(dt0);
}

/* -------------------------------------------------------- cross-entropy */

typedef struct ce_fd {
    int64_t N, V;
    const int32_t *tgt;
    int ignore;
    float *logits, *work, *losses;
} ce_fd;

static double ce_loss(void *ctx)
{
    ce_fd *c = ctx;
    memcpy(c->work, c->logits, (size_t)(c->N * c->V) * sizeof(float));
    assert_int_equal(moe_cpu_cross_entropy(g_ctx, c->losses, c->work, c->tgt, c->N, c->V, c->ignore, 0.0f, MOE_F32),
                     MOE_OK);
    double s = 0.0;
    for (int64_t i = 0; i < c->N; i++)
        s += c->losses[i];
    return s;
}

static void test_cpu_ops_cross_entropy(void **state)
{
    (void)state;
    enum { N = 4, V = 11, IGN = 1 };
    const int32_t tgt[N] = {3, IGN, 0, 10};
    moe_test_rng r = moe_test_rng_make(80);
    ce_fd c = {N, V, tgt, IGN, fbuf(N * V), fbuf(N * V), fbuf(N)};
    moe_test_fill_signed(&r, c.logits, N * V, 0.1f, 3.0f);
    for (int j = 0; j < V; j++)
        c.logits[2 * V + j] += 200.0f; /* exp(200) overflows: max subtraction keeps this row finite */

    /* grad_scale 0: losses only, logits untouched */
    memcpy(c.work, c.logits, sizeof(float) * N * V);
    assert_int_equal(moe_cpu_cross_entropy(g_ctx, c.losses, c.work, tgt, N, V, IGN, 0.0f, MOE_F32), MOE_OK);
    assert_memory_equal(c.work, c.logits, sizeof(float) * N * V);
    double ref[N];
    for (int i = 0; i < N; i++) {
        if (tgt[i] == IGN) {
            ref[i] = 0.0;
            continue;
        }
        double mx = -INFINITY, s = 0.0;
        for (int j = 0; j < V; j++)
            mx = fmax(mx, c.logits[i * V + j]);
        for (int j = 0; j < V; j++)
            s += exp((double)c.logits[i * V + j] - mx);
        ref[i] = mx + log(s) - c.logits[i * V + tgt[i]];
    }
    assert_true(c.losses[1] == 0.0f);
    /* row 2's logits are ~200, where one fp32 ulp is 1.5e-5 */
    assert_true(moe_test_close("cross_entropy losses", c.losses, ref, N, 2e-5));

    /* gradient in place, scaled; the ignored row is zero */
    double *fd = dbuf(N * V);
    moe_test_fd_grad(ce_loss, &c, c.logits, N * V, 1e-2f, fd);
    const float gs = 0.25f;
    memcpy(c.work, c.logits, sizeof(float) * N * V);
    assert_int_equal(moe_cpu_cross_entropy(g_ctx, c.losses, c.work, tgt, N, V, IGN, gs, MOE_F32), MOE_OK);
    for (int j = 0; j < V; j++)
        assert_true(c.work[IGN * V + j] == 0.0f);
    for (int i = 0; i < N * V; i++)
        fd[i] *= gs;
    /* rows 0, 1, 3 only: at |logit| ~ 200 the loss is resolved to 1.5e-5, too coarse for a 1e-2 step */
    float got3[3 * V];
    double ref3[3 * V];
    const int rows[3] = {0, 1, 3};
    for (int q = 0; q < 3; q++)
        for (int j = 0; j < V; j++) {
            got3[q * V + j] = c.work[rows[q] * V + j];
            ref3[q * V + j] = fd[rows[q] * V + j];
        }
    assert_true(moe_test_close("cross_entropy gradient", got3, ref3, 3 * V, 5e-4));
    /* the shifted row: softmax - onehot against double */
    double mx = -INFINITY, s = 0.0, g2[V];
    for (int j = 0; j < V; j++)
        mx = fmax(mx, c.logits[2 * V + j]);
    for (int j = 0; j < V; j++)
        s += exp((double)c.logits[2 * V + j] - mx);
    for (int j = 0; j < V; j++)
        g2[j] = gs * (exp((double)c.logits[2 * V + j] - mx) / s - (j == tgt[2]));
    assert_true(moe_test_close("cross_entropy gradient, shifted row", c.work + 2 * V, g2, V, 1e-4));

    /* a target outside the vocabulary (and not ignored) is refused */
    const int32_t bad[1] = {V};
    moe_test_clear_error();
    assert_int_equal(moe_cpu_cross_entropy(g_ctx, c.losses, c.work, bad, 1, V, IGN, 0.0f, MOE_F32),
                     MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_test_last_error(), "outside the vocabulary"));
    free(c.logits);
    free(c.work);
    free(c.losses);
    free(fd);
}

/* ------------------------------------------------------------ attention */

/* q, k, v packed in one (B,T,ld) buffer: q at column 0, k at H*D, v at 2*H*D,
 * two padding columns at the end of each row. */
typedef struct attn_fd {
    int64_t B, T, H, D, ld;
    float p;
    float *qkv, *W, *out, *lse;
} attn_fd;

static double attn_loss(void *ctx)
{
    attn_fd *a = ctx;
    const int64_t HD = a->H * a->D;
    assert_int_equal(moe_cpu_attention_forward(g_ctx, a->out, a->lse, a->qkv, a->qkv + HD, a->qkv + 2 * HD, a->ld,
                                               a->B, a->T, a->H, a->D, a->p, 77, 3, MOE_F32),
                     MOE_OK);
    return dot_wd(a->W, a->out, a->B * a->T * HD);
}

/* out and lse in double with explicit dropout masks */
static void attn_reference(const attn_fd *a, double *out, double *lse)
{
    const int64_t B = a->B, T = a->T, H = a->H, D = a->D, HD = H * D;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < T; i++) {
                double s[64], mx = -INFINITY, sum = 0.0;
                for (int64_t j = 0; j <= i; j++) {
                    s[j] = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        s[j] += (double)a->qkv[(b * T + i) * a->ld + h * D + d] *
                                (double)a->qkv[(b * T + j) * a->ld + HD + h * D + d];
                    mx = fmax(mx, s[j]);
                }
                for (int64_t j = 0; j <= i; j++)
                    sum += exp(s[j] - mx);
                lse[(b * H + h) * T + i] = mx + log(sum);
                for (int64_t d = 0; d < D; d++)
                    out[(b * T + i) * HD + h * D + d] = 0.0;
                for (int64_t j = 0; j <= i; j++) {
                    double pr = exp(s[j] - mx) / sum;
                    if (a->p > 0.0f) {
                        const uint64_t ctr = (uint64_t)(((b * H + h) * T + i) * T + j);
                        pr = moe_philox_keep16(77, 3, ctr, moe_philox_threshold16(a->p)) ? pr / (1.0 - (double)a->p) : 0.0;
                    }
                    for (int64_t d = 0; d < D; d++)
                        out[(b * T + i) * HD + h * D + d] += pr * a->qkv[(b * T + j) * a->ld + 2 * HD + h * D + d];
                }
            }
}

static void check_attention(float p)
{
    enum { B = 2, T = 5, H = 2, D = 3, HD = H * D, LD = 3 * HD + 2 };
    moe_test_rng r = moe_test_rng_make(90 + (uint64_t)(p * 10));
    attn_fd a = {B, T, H, D, LD, p, fbuf(B * T * LD), fbuf(B * T * HD), fbuf(B * T * HD), fbuf(B * H * T)};
    moe_test_fill_signed(&r, a.qkv, B * T * LD, 0.2f, 1.5f);
    moe_test_fill_signed(&r, a.W, B * T * HD, 0.1f, 1.0f);
    attn_loss(&a);
    double ref[B * T * HD], ref_lse[B * H * T];
    attn_reference(&a, ref, ref_lse);
    assert_true(moe_test_close("attention forward", a.out, ref, B * T * HD, 1e-6));
    assert_true(moe_test_close("attention lse", a.lse, ref_lse, B * H * T, 1e-6));

    /* gradients written into one packed buffer at stride LD; padding columns keep a sentinel */
    double *fd = dbuf(B * T * LD);
    moe_test_fd_grad(attn_loss, &a, a.qkv, B * T * LD, 1e-2f, fd);
    attn_loss(&a);
    float *g = fbuf(B * T * LD);
    for (int i = 0; i < B * T * LD; i++)
        g[i] = 7777.0f;
    assert_int_equal(moe_cpu_attention_backward(g_ctx, g, g + HD, g + 2 * HD, LD, a.W, a.out, a.lse, a.qkv,
                                                a.qkv + HD, a.qkv + 2 * HD, LD, B, T, H, D, p, 77, 3, MOE_F32),
                     MOE_OK);
    for (int t = 0; t < B * T; t++)
        for (int j = 3 * HD; j < LD; j++) {
            assert_true(g[t * LD + j] == 7777.0f);
            g[t * LD + j] = 0.0f; /* the difference there is 0: nothing reads them */
        }
    /* h = 1e-2 on inputs of size ~1: truncation ~h^2 and rounding ~1e-7/h */
    assert_true(moe_test_close(p > 0 ? "attention backward, dropout" : "attention backward", g, fd, B * T * LD,
                               5e-4));
    free(a.qkv);
    free(a.W);
    free(a.out);
    free(a.lse);
    free(fd);
    free(g);
}

static void test_cpu_ops_attention(void **state)
{
    (void)state;
    check_attention(0.0f);
}

static void test_cpu_ops_attention_dropout(void **state)
{
    (void)state;
    /* the masks are a fixed function of (seed, stream, counter), so differences
     * still hold with dropout on, and the reference applies them explicitly */
    check_attention(0.4f);
}

/* The attention draws (kernels/philox.h): 16 bits a score, eight a group,
 * dropped with probability ceil(65536 p) / 65536 */
static void test_cpu_ops_attention_draws(void **state)
{
    (void)state;
    assert_int_equal(moe_philox_threshold16(0.0f), 0);
    assert_int_equal(moe_philox_threshold16(0.5f), 32768);
    assert_int_equal(moe_philox_threshold16(0.1f), 6554); /* 0.1f * 65536 = 6553.6001 */
    assert_int_equal(moe_philox_threshold16(1.0f / 65536.0f), 1);
    assert_int_equal(moe_philox_threshold16(0.99999f), 65536); /* above the last 16-bit value: all dropped */
    /* index i is half (i & 1) of word (i >> 1) & 3 of group i >> 3 */
    for (uint64_t g = 0; g < 64; g++) {
        const moe_philox_out o = moe_philox4x32(5, 6, g);
        const unsigned k8 = moe_philox_keep8(5, 6, g, 20000);
        for (int w = 0; w < 8; w++) {
            const uint32_t bits = w & 1 ? o.v[w >> 1] >> 16 : o.v[w >> 1] & 0xFFFFu;
            assert_int_equal((k8 >> w) & 1u, bits >= 20000);
            assert_int_equal(moe_philox_keep16(5, 6, 8 * g + (uint64_t)w, 20000), bits >= 20000);
        }
        assert_int_equal(moe_philox_keep8(5, 6, g, 0), 0xFF);
        assert_int_equal(moe_philox_keep8(5, 6, g, 65536), 0);
    }
    /* drop rate of p = 0.3 over 2^20 scores: 19661/65536 = 0.300003, standard error 0.00045 */
    const uint32_t thr = moe_philox_threshold16(0.3f);
    long dropped = 0;
    for (uint64_t i = 0; i < (1u << 20); i++)
        dropped += !moe_philox_keep16(11, 2, i, thr);
    assert_true(fabs((double)dropped / (1u << 20) - (double)thr / 65536.0) < 0.0025);
}

/* ---------------------------------------------------- fp16/bf16 storage */

/* Each op on dt storage against the same op in fp32 on the same rounded
 * inputs: only the rounding of the outputs (half an ulp of dt) separates them. */
static void check_half_storage(moe_dtype dt, double tol)
{
    enum { N = 6, C = 16, T = 3, H = 2, D = 4, HD = H * D };
    moe_test_rng r = moe_test_rng_make(100 + (uint64_t)dt);
    float x[N * C], w[C], b[C], y32[N * C], y16f[N * C];
    moe_test_fill_signed(&r, x, N * C, 0.1f, 2.0f);
    moe_test_fill_signed(&r, w, C, 0.5f, 1.5f);
    moe_test_fill_signed(&r, b, C, 0.1f, 1.0f);
    round_to(x, N * C, dt);
    round_to(w, C, dt);
    round_to(b, C, dt);
    uint16_t hx[N * C], hw[C], hb[C], hy[N * C];
    store_all(hx, dt, x, N * C);
    store_all(hw, dt, w, C);
    store_all(hb, dt, b, C);

    /* gelu */
    assert_int_equal(moe_cpu_act_forward(g_ctx, y32, x, N * C, MOE_F32, MOE_ACT_GELU_TANH), MOE_OK);
    assert_int_equal(moe_cpu_act_forward(g_ctx, hy, hx, N * C, dt, MOE_ACT_GELU_TANH), MOE_OK);
    load_all(y16f, hy, dt, N * C);
    assert_true(moe_test_close_f("gelu, half storage", y16f, y32, N * C, tol));

    /* layernorm */
    float mean[N], rstd[N];
    assert_int_equal(moe_cpu_layernorm_forward(g_ctx, y32, mean, rstd, x, w, b, N, C, 1e-5f, MOE_F32), MOE_OK);
    assert_int_equal(moe_cpu_layernorm_forward(g_ctx, hy, mean, rstd, hx, hw, hb, N, C, 1e-5f, dt), MOE_OK);
    load_all(y16f, hy, dt, N * C);
    assert_true(moe_test_close_f("layernorm, half storage", y16f, y32, N * C, tol));

    /* attention: (N/T, T, H, D) taken from x as q, k, v at stride C */
    float lse[(N / T) * H * T], o32[N * HD], o16f[N * HD];
    uint16_t ho[N * HD];
    assert_int_equal(moe_cpu_attention_forward(g_ctx, o32, lse, x, x + 4, x + 8, C, N / T, T, H, D, 0.0f, 1, 1,
                                               MOE_F32),
                     MOE_OK);
    assert_int_equal(moe_cpu_attention_forward(g_ctx, ho, lse, hx, hx + 4, hx + 8, C, N / T, T, H, D, 0.0f, 1, 1, dt),
                     MOE_OK);
    load_all(o16f, ho, dt, N * HD);
    assert_true(moe_test_close_f("attention, half storage", o16f, o32, N * HD, tol));

    /* cross-entropy: fp32 losses agree to fp32 rounding; the gradient is rounded once */
    const int32_t tgt[N] = {0, 5, 15, 3, 9, 1};
    float l32[N], l16[N];
    memcpy(y32, x, sizeof y32);
    memcpy(hy, hx, sizeof hy);
    assert_int_equal(moe_cpu_cross_entropy(g_ctx, l32, y32, tgt, N, C, -100, 1.0f, MOE_F32), MOE_OK);
    assert_int_equal(moe_cpu_cross_entropy(g_ctx, l16, hy, tgt, N, C, -100, 1.0f, dt), MOE_OK);
    assert_true(moe_test_close_f("cross_entropy losses, half storage", l16, l32, N, 1e-6));
    load_all(y16f, hy, dt, N * C);
    assert_true(moe_test_close_f("cross_entropy gradient, half storage", y16f, y32, N * C, tol));
}

static void test_cpu_ops_half_storage(void **state)
{
    (void)state;
    check_half_storage(MOE_F16, 0x1p-10);
    check_half_storage(MOE_BF16, 0x1p-7);
}

/* --------------------------------------------------------------- errors */

static void expect_error(moe_status st, const char *needle)
{
    assert_int_equal(st, MOE_ERR_INVALID_ARG);
    if (strstr(moe_test_last_error(), needle) == NULL)
        fail_msg("expected an error message containing '%s', got '%s'", needle, moe_test_last_error());
    moe_test_clear_error();
}

static void test_cpu_ops_invalid_arguments(void **state)
{
    (void)state;
    float a[64] = {0}, b[64] = {0}, c[64] = {0};
    moe_matmul_desc d = mm_desc(0, 0, 4, 4, 4, a, b, c, 0.0f);
    d.lda = 3;
    expect_error(moe_cpu_matmul(g_ctx, &d), "lda >= 4");
    d = mm_desc(0, 1, 4, 4, 4, a, b, c, 0.0f);
    d.ldb = 2;
    expect_error(moe_cpu_matmul(g_ctx, &d), "ldb >= 4");
    d = mm_desc(0, 0, 4, 4, 4, a, b, c, 1.0f);
    d.epilogue = MOE_EPI_BIAS_ACT;
    d.bias = b;
    expect_error(moe_cpu_matmul(g_ctx, &d), "beta == 0");
    d.beta = 0.0f;
    d.bias = NULL;
    expect_error(moe_cpu_matmul(g_ctx, &d), "needs a bias");
    d.bias = b;
    d.act = (moe_act_kind)3;
    expect_error(moe_cpu_matmul(g_ctx, &d), "unknown activation kind 3");
    expect_error(moe_cpu_fill(g_ctx, a, MOE_DTYPE_COUNT, 4, 1.0f), "dtype");
    expect_error(moe_cpu_axpby(g_ctx, a, b, MOE_I32, 4, 1.0f, 1.0f), "dtype");
    expect_error(moe_cpu_dropout_backward(g_ctx, a, b, 4, MOE_F32, -0.1f, 1, 1), "0 <= p <= 1");
    expect_error(moe_cpu_layernorm_forward(g_ctx, a, b, c, a, NULL, NULL, 2, 0, 1e-5f, MOE_F32), "C >= 1");
    expect_error(moe_cpu_attention_forward(g_ctx, a, b, a, a, a, 5, 1, 2, 2, 3, 0.0f, 1, 1, MOE_F32), "H*D = 6");
    expect_error(moe_cpu_attention_forward(g_ctx, a, b, a, a, a, 6, 1, 2, 2, 3, 1.0f, 1, 1, MOE_F32), "p < 1");
    const int32_t neg[1] = {-3};
    expect_error(moe_cpu_embedding_forward(g_ctx, a, neg, b, 1, 1, 4, 1.0f, 1, 1, MOE_F32), "negative");
    const int32_t ok[1] = {0};
    expect_error(moe_cpu_embedding_forward(g_ctx, a, ok, b, 1, 1, 2, 1.0f, 1, 1, MOE_F32), "C >= 4");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu_ops_plugin_descriptor),
        cmocka_unit_test(test_cpu_ops_memory_accounting),
        cmocka_unit_test(test_cpu_ops_cast_round_trips),
        cmocka_unit_test(test_cpu_ops_fill_axpby_add),
        cmocka_unit_test(test_cpu_ops_sums),
        cmocka_unit_test(test_cpu_ops_init_distributions),
        cmocka_unit_test(test_cpu_ops_matmul_reference),
        cmocka_unit_test(test_cpu_ops_matmul_backward_fd),
        cmocka_unit_test(test_cpu_ops_matmul_throughput),
        cmocka_unit_test(test_cpu_ops_grouped_matmul),
        cmocka_unit_test(test_cpu_ops_gelu),
        cmocka_unit_test(test_cpu_ops_relu),
        cmocka_unit_test(test_cpu_ops_dropout),
        cmocka_unit_test(test_cpu_ops_layernorm),
        cmocka_unit_test(test_cpu_ops_embedding),
        cmocka_unit_test(test_cpu_ops_cross_entropy),
        cmocka_unit_test(test_cpu_ops_attention),
        cmocka_unit_test(test_cpu_ops_attention_dropout),
        cmocka_unit_test(test_cpu_ops_attention_draws),
        cmocka_unit_test(test_cpu_ops_half_storage),
        cmocka_unit_test(test_cpu_ops_invalid_arguments),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
