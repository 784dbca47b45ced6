/* test_parity.c: the cuda backend against the cpu backend, op by op.
 *
 * Both backend plugins are loaded from the build tree with dlopen, as the
 * core loads them. Every op of ops.h runs on both with identical random
 * inputs (never zeros); outputs are poisoned with NaN first on both sides,
 * so an element the cuda op forgets to write shows as a mismatch; results
 * are compared normwise (max |cuda - cpu| / max |cpu|, testutil.h). A NaN on
 * one side only is a mismatch; NaN on both (padding a layout never writes,
 * entries an op leaves untouched) is agreement. Integer outputs (routing
 * experts and slots, casts to i32) must match exactly. Backward ops get the
 * cpu forward's outputs on both sides, so each op is checked on its own.
 *
 * Tolerances, by the dtype results are stored in:
 *   fp32  1e-5   arithmetic order and exp/log ulps only
 *   fp16  4e-3   a result may round to the neighbouring fp16 (2^-10 of it)
 *   bf16  2e-2   the same for bf16 (2^-7); the tensor-core attention also
 *                rounds P and dS to the storage dtype, as FlashAttention does
 * Reductions over tokens or experts the cpu does in double are done in
 * double on the gpu too, so their fp32 results use the fp32 tolerance.
 *
 * Also checked on the gpu alone: memory accounting and the out-of-memory
 * message, copies, and determinism (bit-identical repeats of the reductions
 * and of attention backward).
 *
 * Without a visible GPU the program prints "SKIP: no CUDA device visible"
 * and exits 77, which CTest reports as skipped. Every comparison prints one
 * "PARITY" line (op, dtype, error, tolerance, verdict); MOE_PARITY_FILTER
 * (a cmocka test-name pattern) runs a subset, e.g. under compute-sanitizer;
 * MOE_PARITY_BENCH=1 instead times the hot ops at the reference model's
 * sizes (printed "BENCH" lines, no verdict).
 */
#include <dlfcn.h>
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

#include "kernels/half.h"
#include "moe/plugin.h"
#include "testutil.h"

typedef struct backend {
    const char *name;
    void *so;
    const moe_backend_ops *be;
    const moe_ops *ops;
    moe_ctx *ctx;
} backend;

static moe_host g_host;
static backend g_cpu = {"cpu", NULL, NULL, NULL, NULL}, g_gpu = {"cuda", NULL, NULL, NULL, NULL};
static int g_fails;      /* mismatches in the running test case */
static int g_total_fails;

static const moe_dtype k_dtypes[3] = {MOE_F32, MOE_F16, MOE_BF16};

static const char *dt_name(moe_dtype dt)
{
    switch (dt) {
    case MOE_F32: return "f32";
    case MOE_F16: return "f16";
    case MOE_BF16: return "bf16";
    case MOE_I32: return "i32";
    default: return "?";
    }
}

static const char *act_name(moe_act_kind act)
{
    switch (act) {
    case MOE_ACT_GELU_TANH: return "gelu tanh";
    case MOE_ACT_GELU_ERF: return "gelu erf";
    case MOE_ACT_RELU: return "relu";
    default: return "?";
    }
}

static double tol_of(moe_dtype dt)
{
    switch (dt) {
    case MOE_F16: return 4e-3;
    case MOE_BF16: return 2e-2;
    case MOE_I32: return 0.0;
    default: return 1e-5;
    }
}

#define TOL32 1e-5

/* ------------------------------------------------------------ loading */

static int load_backend(backend *b)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/libmoe-backend-%s.so", MOE_TEST_PLUGIN_DIR, b->name);
    b->so = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (b->so == NULL) {
        fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
        return -1;
    }
    moe_plugin_entry_fn entry = (moe_plugin_entry_fn)dlsym(b->so, MOE_PLUGIN_SYMBOL);
    if (entry == NULL) {
        fprintf(stderr, "%s: no symbol %s\n", path, MOE_PLUGIN_SYMBOL);
        return -1;
    }
    const moe_plugin_desc *d = entry();
    if (d->kind != MOE_KIND_BACKEND || d->ops_size != sizeof(moe_backend_ops) || strcmp(d->name, b->name) != 0) {
        fprintf(stderr, "%s: expected backend '%s' with a table of %zu bytes, found kind %d '%s' of %u bytes\n", path,
                b->name, sizeof(moe_backend_ops), (int)d->kind, d->name, d->ops_size);
        return -1;
    }
    b->be = (const moe_backend_ops *)d->ops;
    b->ops = b->be->ops;
    return 0;
}

/* --------------------------------------------------------- host values */

static void h_st(void *p, moe_dtype dt, size_t i, float v)
{
    switch (dt) {
    case MOE_F16: ((uint16_t *)p)[i] = moe_f32_to_f16(v); break;
    case MOE_BF16: ((uint16_t *)p)[i] = moe_f32_to_bf16(v); break;
    case MOE_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    default: ((float *)p)[i] = v; break;
    }
}

static float h_ld(const void *p, moe_dtype dt, size_t i)
{
    switch (dt) {
    case MOE_F16: return moe_f16_to_f32(((const uint16_t *)p)[i]);
    case MOE_BF16: return moe_bf16_to_f32(((const uint16_t *)p)[i]);
    case MOE_I32: return (float)((const int32_t *)p)[i];
    default: return ((const float *)p)[i];
    }
}

static moe_test_rng g_rng;

/* ------------------------------------------------- paired device buffers */

/* the same logical buffer on both backends */
typedef struct pbuf {
    void *c, *g;
    size_t bytes;
} pbuf;

static pbuf pb_alloc(size_t bytes)
{
    pbuf b;
    b.bytes = bytes > 0 ? bytes : 4;
    assert_int_equal(g_cpu.be->alloc(g_cpu.ctx, b.bytes, "parity buffer", &b.c), MOE_OK);
    assert_int_equal(g_gpu.be->alloc(g_gpu.ctx, b.bytes, "parity buffer", &b.g), MOE_OK);
    return b;
}

static void pb_free(pbuf *b)
{
    g_cpu.be->free(g_cpu.ctx, b->c);
    g_gpu.be->free(g_gpu.ctx, b->g);
    b->c = b->g = NULL;
}

static void pb_upload(pbuf *b, const void *host, size_t bytes)
{
    assert_true(bytes <= b->bytes);
    assert_int_equal(g_cpu.be->copy_from_host(g_cpu.ctx, b->c, host, bytes), MOE_OK);
    assert_int_equal(g_gpu.be->copy_from_host(g_gpu.ctx, b->g, host, bytes), MOE_OK);
}

/* n values of dt, uniform in [lo, hi), never zero */
static void *host_rand(moe_dtype dt, size_t n, float lo, float hi)
{
    void *h = malloc((n > 0 ? n : 1) * 4);
    assert_non_null(h);
    for (size_t i = 0; i < n; i++) {
        float v;
        do
            v = lo + (float)((double)(hi - lo) * moe_test_rng_uniform(&g_rng));
        while (v == 0.0f);
        h_st(h, dt, i, v);
        if (h_ld(h, dt, i) == 0.0f)
            h_st(h, dt, i, hi);
    }
    return h;
}

static pbuf pb_rand(moe_dtype dt, size_t n, float lo, float hi)
{
    pbuf b = pb_alloc(n * moe_dtype_size(dt));
    void *h = host_rand(dt, n, lo, hi);
    pb_upload(&b, h, n * moe_dtype_size(dt));
    free(h);
    return b;
}

/* NaN everywhere (i32: a value no op writes) */
static void pb_poison(pbuf *b, moe_dtype dt, size_t n)
{
    void *h = malloc((n > 0 ? n : 1) * 4);
    assert_non_null(h);
    for (size_t i = 0; i < n; i++) {
        if (dt == MOE_I32)
            ((int32_t *)h)[i] = -123456789;
        else
            h_st(h, dt, i, NAN);
    }
    pb_upload(b, h, n * moe_dtype_size(dt));
    free(h);
}

static pbuf pb_nan(moe_dtype dt, size_t n)
{
    pbuf b = pb_alloc(n * moe_dtype_size(dt));
    pb_poison(&b, dt, n);
    return b;
}

/* copy the cpu side over the gpu side (feed a cpu result to both) */
static void pb_sync_from_cpu(pbuf *b, size_t bytes)
{
    void *h = malloc(bytes > 0 ? bytes : 1);
    assert_non_null(h);
    assert_int_equal(g_cpu.be->copy_to_host(g_cpu.ctx, h, b->c, bytes), MOE_OK);
    assert_int_equal(g_gpu.be->copy_from_host(g_gpu.ctx, b->g, h, bytes), MOE_OK);
    free(h);
}

/* ------------------------------------------------------------ checking */

static void record(const char *what, moe_dtype dt, double err, double tol, const char *detail)
{
    int ok = err <= tol;
    printf("PARITY %-44s %-4s max_rel_err %.3e tol %.0e %s%s%s\n", what, dt_name(dt), err, tol, ok ? "PASS" : "FAIL",
           detail[0] ? " " : "", detail);
    fflush(stdout);
    if (!ok) {
        g_fails++;
        g_total_fails++;
    }
}

/* Compares n values of dt, cpu side as the reference. */
static double compare(const char *what, const pbuf *b, moe_dtype dt, size_t n, double tol)
{
    size_t bytes = n * moe_dtype_size(dt);
    void *hc = malloc(bytes > 0 ? bytes : 1), *hg = malloc(bytes > 0 ? bytes : 1);
    assert_non_null(hc);
    assert_non_null(hg);
    moe_status sc = g_cpu.be->copy_to_host(g_cpu.ctx, hc, b->c, bytes);
    moe_status sg = g_gpu.be->copy_to_host(g_gpu.ctx, hg, b->g, bytes);
    char detail[1200] = "";
    double err = 0.0;
    if (sc != MOE_OK || sg != MOE_OK) {
        snprintf(detail, sizeof detail, "(copy failed: %s)", moe_test_last_error());
        err = INFINITY;
    } else {
        double num = 0.0, den = 0.0;
        size_t worst = 0, one_nan = 0;
        for (size_t i = 0; i < n; i++) {
            double r = h_ld(hc, dt, i), g = h_ld(hg, dt, i);
            if (isnan(r) || isnan(g)) {
                if (isnan(r) != isnan(g)) {
                    if (one_nan++ == 0)
                        worst = i;
                }
                continue;
            }
            double d = fabs(r - g);
            if (isinf(r) || isinf(g))
                d = r == g ? 0.0 : INFINITY;
            if (d > num) {
                num = d;
                if (one_nan == 0)
                    worst = i;
            }
            if (fabs(r) > den && !isinf(r))
                den = fabs(r);
        }
        err = one_nan > 0 ? INFINITY : (den > 0.0 ? num / den : num);
        if (err > tol && n > 0)
            snprintf(detail, sizeof detail, "(worst [%zu]: cpu %.9g, cuda %.9g; %zu NaN on one side)", worst,
                     (double)h_ld(hc, dt, worst), (double)h_ld(hg, dt, worst), one_nan);
    }
    record(what, dt, err, tol, detail);
    free(hc);
    free(hg);
    return err;
}

static void check_ok(const char *what, moe_status sc, moe_status sg)
{
    if (sc != MOE_OK || sg != MOE_OK) {
        printf("PARITY %-44s status cpu %d, cuda %d: %s FAIL\n", what, (int)sc, (int)sg, moe_test_last_error());
        fflush(stdout);
        g_fails++;
        g_total_fails++;
    }
}

/* Runs `call` on each backend: CALL(ops, ctx, side) where side picks .c or .g */
#define BOTH(what, CALL)                                                     \
    do {                                                                     \
        moe_status sc_ = CALL(g_cpu.ops, g_cpu.ctx, c);                      \
        moe_status sg_ = CALL(g_gpu.ops, g_gpu.ctx, g);                      \
        check_ok((what), sc_, sg_);                                          \
    } while (0)

static void begin_case(void) { g_fails = 0; }
static void end_case(void) { assert_int_equal(g_fails, 0); }

/* ============================================================ tests */

static void test_parity_elementwise(void **state)
{
    (void)state;
    begin_case();
    char what[96];
    const size_t n = 1001;
    for (int t = 0; t < 3; t++) {
        const moe_dtype dt = k_dtypes[t];
        const double tol = tol_of(dt);
        pbuf x = pb_rand(dt, n, -2.0f, 2.0f), y = pb_rand(dt, n, -2.0f, 2.0f), out = pb_nan(dt, n);

#define FILL(o, cx, s) (o)->fill((cx), out.s, dt, (int64_t)n, 0.37f)
        BOTH("fill", FILL);
        snprintf(what, sizeof what, "fill 0.37");
        compare(what, &out, dt, n, tol);
#undef FILL
#define FILL0(o, cx, s) (o)->fill((cx), out.s, dt, (int64_t)n, 0.0f)
        pb_poison(&out, dt, n);
        BOTH("fill 0", FILL0);
        compare("fill 0", &out, dt, n, tol);
#undef FILL0

#define AXPBY(o, cx, s) (o)->axpby((cx), y.s, x.s, dt, (int64_t)n, 0.5f, -1.25f)
        BOTH("axpby", AXPBY);
        compare("axpby a=0.5 b=-1.25", &y, dt, n, tol);
#undef AXPBY
        pb_poison(&out, dt, n);
#define AXPBY0(o, cx, s) (o)->axpby((cx), out.s, x.s, dt, (int64_t)n, 0.75f, 0.0f)
        BOTH("axpby b=0", AXPBY0);
        compare("axpby b=0 (y poisoned, must not be read)", &out, dt, n, tol);
#undef AXPBY0
        pb_poison(&out, dt, n);
#define ADD(o, cx, s) (o)->add((cx), out.s, x.s, y.s, dt, (int64_t)n)
        BOTH("add", ADD);
        compare("add", &out, dt, n, tol);
#undef ADD
#define ADDIP(o, cx, s) (o)->add((cx), x.s, x.s, y.s, dt, (int64_t)n)
        BOTH("add in place", ADDIP);
        compare("add in place", &x, dt, n, tol);
#undef ADDIP

        static const moe_act_kind acts[3] = {MOE_ACT_GELU_TANH, MOE_ACT_GELU_ERF, MOE_ACT_RELU};
        for (int kind = 0; kind < 3; kind++) {
            const moe_act_kind ak = acts[kind];
            pb_poison(&out, dt, n);
#define ACTF(o, cx, s) (o)->act_forward((cx), out.s, x.s, (int64_t)n, dt, ak)
            BOTH("act_forward", ACTF);
            snprintf(what, sizeof what, "act_forward %s", act_name(ak));
            compare(what, &out, dt, n, tol);
#undef ACTF
            pbuf dout = pb_rand(dt, n, -1.0f, 1.0f);
            pb_poison(&out, dt, n);
#define ACTB(o, cx, s) (o)->act_backward((cx), out.s, x.s, dout.s, (int64_t)n, dt, ak)
            BOTH("act_backward", ACTB);
            snprintf(what, sizeof what, "act_backward %s", act_name(ak));
            compare(what, &out, dt, n, tol);
#undef ACTB
#define ACTBIP(o, cx, s) (o)->act_backward((cx), dout.s, x.s, dout.s, (int64_t)n, dt, ak)
            BOTH("act_backward in place", ACTBIP);
            snprintf(what, sizeof what, "act_backward %s in place", act_name(ak));
            compare(what, &dout, dt, n, tol);
#undef ACTBIP
            pb_free(&dout);
        }

        const float ps[3] = {0.3f, 0.0f, 1.0f};
        for (int k = 0; k < 3; k++) {
            float p = ps[k];
            pb_poison(&out, dt, n);
#define DROPF(o, cx, s) (o)->dropout_forward((cx), out.s, x.s, (int64_t)n, dt, p, 1234u, 77u)
            BOTH("dropout_forward", DROPF);
            snprintf(what, sizeof what, "dropout_forward p=%g", (double)p);
            compare(what, &out, dt, n, tol);
#undef DROPF
            pb_poison(&out, dt, n);
#define DROPB(o, cx, s) (o)->dropout_backward((cx), out.s, y.s, (int64_t)n, dt, p, 1234u, 77u)
            BOTH("dropout_backward", DROPB);
            snprintf(what, sizeof what, "dropout_backward p=%g", (double)p);
            compare(what, &out, dt, n, tol);
#undef DROPB
        }
        /* n % 4 == 0 with aligned buffers: the vectorised dropout (whole Philox groups) */
        pb_poison(&out, dt, n);
#define DROPV(o, cx, s) (o)->dropout_forward((cx), out.s, x.s, (int64_t)(n - 1), dt, 0.3f, 1234u, 78u)
        BOTH("dropout_forward n % 4 == 0", DROPV);
        compare("dropout_forward p=0.3, n % 4 == 0", &out, dt, n - 1, tol);
#undef DROPV

        pb_poison(&out, dt, n);
#define INITU(o, cx, s) (o)->init_uniform((cx), out.s, dt, (int64_t)n, -0.2f, 0.3f, 7u, 3u)
        BOTH("init_uniform", INITU);
        compare("init_uniform", &out, dt, n, tol);
#undef INITU
        pb_poison(&out, dt, n);
#define INITN(o, cx, s) (o)->init_normal((cx), out.s, dt, (int64_t)n, 0.1f, 0.02f, 9u, 5u)
        BOTH("init_normal", INITN);
        compare("init_normal", &out, dt, n, tol);
#undef INITN

        /* sumsq over several blocks; double accumulation on both sides */
        const size_t nsq = 5000;
        pbuf big = pb_rand(dt, nsq, -3.0f, 3.0f);
        pbuf acc = pb_alloc(sizeof(float));
        float start = 1.5f;
        pb_upload(&acc, &start, sizeof start);
#define SUMSQ(o, cx, s) (o)->sumsq((cx), (float *)acc.s, big.s, dt, (int64_t)nsq)
        BOTH("sumsq", SUMSQ);
        compare("sumsq (accumulates)", &acc, MOE_F32, 1, TOL32);
#undef SUMSQ
        pb_free(&big);
        pb_free(&acc);

        pb_free(&x);
        pb_free(&y);
        pb_free(&out);
    }

    /* sum_f32 with strides, several blocks */
    for (int stride = 1; stride <= 3; stride += 2) {
        const size_t ns = 10000;
        pbuf x = pb_rand(MOE_F32, ns * (size_t)stride, -1.0f, 1.0f), acc = pb_alloc(sizeof(float));
        float start = 2.0f;
        pb_upload(&acc, &start, sizeof start);
#define SUMF(o, cx, s) (o)->sum_f32((cx), (float *)acc.s, (const float *)x.s, (int64_t)ns, stride, 0.5f)
        BOTH("sum_f32", SUMF);
        snprintf(what, sizeof what, "sum_f32 stride %d", stride);
        compare(what, &acc, MOE_F32, 1, TOL32);
#undef SUMF
        pb_free(&x);
        pb_free(&acc);
    }

    /* fill and casts, i32 included (exact) */
    {
        pbuf o = pb_nan(MOE_I32, n);
#define FILLI(op, cx, s) (op)->fill((cx), o.s, MOE_I32, (int64_t)n, 7.0f)
        BOTH("fill i32", FILLI);
        compare("fill i32", &o, MOE_I32, n, 0.0);
#undef FILLI
        pb_free(&o);
    }
    const moe_dtype casts[][2] = {{MOE_F32, MOE_F16},  {MOE_F16, MOE_F32}, {MOE_F32, MOE_BF16}, {MOE_BF16, MOE_F16},
                                  {MOE_F16, MOE_BF16}, {MOE_F32, MOE_I32}, {MOE_I32, MOE_F32},  {MOE_F16, MOE_F16}};
    for (size_t k = 0; k < sizeof casts / sizeof casts[0]; k++) {
        moe_dtype src = casts[k][0], dst = casts[k][1];
        pbuf x = pb_rand(src, n, -50.0f, 50.0f), o = pb_nan(dst, n);
#define CAST(op, cx, s) (op)->cast((cx), o.s, dst, x.s, src, (int64_t)n)
        BOTH("cast", CAST);
#undef CAST
        snprintf(what, sizeof what, "cast %s -> %s", dt_name(src), dt_name(dst));
        compare(what, &o, dst, n, 0.0); /* one rounding of the same value: exact */
        pb_free(&x);
        pb_free(&o);
    }
    end_case();
}

/* ---------------------------------------------------------- matmul */

typedef struct mm_case {
    int ta, tb;
    int64_t m, n, k, batch;
    float alpha, beta;
    moe_epilogue epi;
    moe_act_kind act;
    int with_aux;
    moe_dtype ab, cd;
    int64_t ldc_pad;
    int bias_broadcast;
} mm_case;

static void run_matmul_case(const mm_case *mc)
{
    const int64_t a_rows = mc->ta ? mc->k : mc->m, a_cols = mc->ta ? mc->m : mc->k;
    const int64_t b_rows = mc->tb ? mc->n : mc->k, b_cols = mc->tb ? mc->k : mc->n;
    const int64_t lda = a_cols + 3, ldb = b_cols + 1, ldc = mc->n + mc->ldc_pad;
    const int64_t sa = a_rows * lda + 5, sb = b_rows * ldb + 2, sc = mc->m * ldc + 8;
    const int64_t sbias = mc->bias_broadcast ? 0 : mc->n;
    const size_t na = (size_t)(sa * mc->batch), nb = (size_t)(sb * mc->batch), nc = (size_t)(sc * mc->batch);
    pbuf a = pb_rand(mc->ab, na, -1.0f, 1.0f), b = pb_rand(mc->ab, nb, -1.0f, 1.0f);
    pbuf c = mc->beta != 0.0f ? pb_rand(mc->cd, nc, -1.0f, 1.0f) : pb_nan(mc->cd, nc);
    pbuf bias = pb_rand(mc->cd, (size_t)(mc->n * mc->batch), -0.5f, 0.5f);
    pbuf aux = pb_nan(mc->cd, nc);
    moe_matmul_desc d;
    memset(&d, 0, sizeof d);
    d.trans_a = mc->ta;
    d.trans_b = mc->tb;
    d.m = mc->m;
    d.n = mc->n;
    d.k = mc->k;
    d.alpha = mc->alpha;
    d.beta = mc->beta;
    d.lda = lda;
    d.ldb = ldb;
    d.ldc = ldc;
    d.stride_a = sa;
    d.stride_b = sb;
    d.stride_c = sc;
    d.ab_dtype = mc->ab;
    d.c_dtype = mc->cd;
    d.batch = mc->batch;
    d.epilogue = mc->epi;
    d.stride_bias = sbias;
    d.act = mc->act;
    moe_matmul_desc dc = d, dg = d;
    dc.a = a.c; dc.b = b.c; dc.c = c.c; dc.bias = mc->epi != MOE_EPI_NONE ? bias.c : NULL;
    dc.aux = mc->with_aux ? aux.c : NULL;
    dg.a = a.g; dg.b = b.g; dg.c = c.g; dg.bias = mc->epi != MOE_EPI_NONE ? bias.g : NULL;
    dg.aux = mc->with_aux ? aux.g : NULL;
    check_ok("matmul", g_cpu.ops->matmul(g_cpu.ctx, &dc), g_gpu.ops->matmul(g_gpu.ctx, &dg));
    char what[128];
    const char *epi = mc->epi == MOE_EPI_NONE ? "none" : mc->epi == MOE_EPI_BIAS ? "bias" : "bias_act/";
    snprintf(what, sizeof what, "matmul %s%s %lldx%lldx%lld b%lld %s%s %s->%s ldc%lld", mc->ta ? "T" : "N",
             mc->tb ? "T" : "N", (long long)mc->m, (long long)mc->n, (long long)mc->k, (long long)mc->batch, epi,
             mc->epi == MOE_EPI_BIAS_ACT ? act_name(mc->act) : "", dt_name(mc->ab), dt_name(mc->cd), (long long)ldc);
    compare(what, &c, mc->cd, nc, tol_of(mc->cd));
    if (mc->with_aux) {
        snprintf(what, sizeof what, "matmul aux (pre-activation) %s", dt_name(mc->ab));
        compare(what, &aux, mc->cd, nc, tol_of(mc->cd));
    }
    pb_free(&a);
    pb_free(&b);
    pb_free(&c);
    pb_free(&bias);
    pb_free(&aux);
}

static void test_parity_matmul(void **state)
{
    (void)state;
    begin_case();
    const mm_case cases[] = {
        {0, 0, 37, 45, 70, 1, 1.0f, 0.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 0, MOE_F32, MOE_F32, 0, 0},
        {1, 0, 37, 45, 70, 3, 0.5f, 0.75f, MOE_EPI_BIAS, MOE_ACT_GELU_TANH, 0, MOE_F32, MOE_F32, 2, 0},
        {0, 1, 37, 45, 70, 1, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_GELU_TANH, 1, MOE_F16, MOE_F16, 3, 0},
        {1, 1, 37, 45, 70, 2, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_GELU_ERF, 1, MOE_BF16, MOE_BF16, 0, 0},
        {0, 0, 37, 45, 70, 2, 1.0f, 1.0f, MOE_EPI_BIAS, MOE_ACT_GELU_TANH, 0, MOE_F16, MOE_F32, 0, 1},
        {0, 1, 37, 45, 70, 1, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_GELU_TANH, 0, MOE_F32, MOE_F16, 0, 0},
        {0, 0, 37, 45, 70, 1, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_GELU_TANH, 1, MOE_BF16, MOE_F32, 1, 0},
        {0, 0, 37, 45, 0, 1, 1.0f, 0.5f, MOE_EPI_BIAS, MOE_ACT_GELU_TANH, 0, MOE_F32, MOE_F32, 0, 0},
        {0, 0, 128, 256, 512, 1, 1.0f, 0.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 0, MOE_F16, MOE_F16, 0, 0},
        {1, 0, 64, 96, 128, 4, 1.0f, 0.0f, MOE_EPI_BIAS, MOE_ACT_GELU_TANH, 0, MOE_BF16, MOE_BF16, 0, 0},
        /* relu: cuBLASLt's BIAS epilogue into aux (or C) and the activation pass, never RELU_AUX_BIAS
         * (whose aux is a bitmask); f32 x f32 -> f16 takes the tiled fallback */
        {0, 1, 37, 45, 70, 1, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_RELU, 1, MOE_F16, MOE_F16, 3, 0},
        {1, 1, 37, 45, 70, 2, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_RELU, 1, MOE_BF16, MOE_BF16, 0, 0},
        {0, 0, 37, 45, 70, 2, 0.5f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_RELU, 0, MOE_F32, MOE_F32, 1, 1},
        {0, 1, 37, 45, 70, 1, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_RELU, 1, MOE_F32, MOE_F16, 0, 0},
        {0, 0, 128, 256, 512, 1, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_RELU, 1, MOE_F16, MOE_F16, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_matmul_case(&cases[i]);

    /* bias_backward accumulates column sums */
    for (int t = 0; t < 3; t++) {
        const moe_dtype dt = k_dtypes[t];
        const int64_t N = 150, C = 70;
        pbuf dy = pb_rand(dt, (size_t)(N * C), -1.0f, 1.0f), db = pb_rand(dt, (size_t)C, -1.0f, 1.0f);
#define BB(o, cx, s) (o)->bias_backward((cx), db.s, dy.s, N, C, dt)
        BOTH("bias_backward", BB);
#undef BB
        compare("bias_backward (accumulates)", &db, dt, (size_t)C, tol_of(dt));
        pb_free(&dy);
        pb_free(&db);
    }
    end_case();
}

/* ------------------------------------------------------- layer norm */

static void test_parity_layernorm(void **state)
{
    (void)state;
    begin_case();
    const int64_t shapes[2][2] = {{33, 70}, {9, 300}};
    for (int sh = 0; sh < 2; sh++) {
        const int64_t N = shapes[sh][0], C = shapes[sh][1];
        for (int t = 0; t < 3; t++) {
            const moe_dtype dt = k_dtypes[t];
            const double tol = tol_of(dt);
            pbuf x = pb_rand(dt, (size_t)(N * C), -2.0f, 3.0f), w = pb_rand(dt, (size_t)C, 0.5f, 1.5f),
                 b = pb_rand(dt, (size_t)C, -0.5f, 0.5f);
            pbuf out = pb_nan(dt, (size_t)(N * C)), mean = pb_nan(MOE_F32, (size_t)N),
                 rstd = pb_nan(MOE_F32, (size_t)N);
#define LNF(o, cx, s) \
    (o)->layernorm_forward((cx), out.s, (float *)mean.s, (float *)rstd.s, x.s, w.s, b.s, N, C, 1e-5f, dt)
            BOTH("layernorm_forward", LNF);
#undef LNF
            compare("layernorm_forward out", &out, dt, (size_t)(N * C), tol);
            compare("layernorm_forward mean", &mean, MOE_F32, (size_t)N, TOL32);
            compare("layernorm_forward rstd", &rstd, MOE_F32, (size_t)N, TOL32);
            pb_sync_from_cpu(&mean, (size_t)N * 4);
            pb_sync_from_cpu(&rstd, (size_t)N * 4);
            pbuf dout = pb_rand(dt, (size_t)(N * C), -1.0f, 1.0f), dx = pb_rand(dt, (size_t)(N * C), -1.0f, 1.0f);
            pbuf dw = pb_rand(dt, (size_t)C, -1.0f, 1.0f), db = pb_rand(dt, (size_t)C, -1.0f, 1.0f);
#define LNB(o, cx, s)                                                                                                \
    (o)->layernorm_backward((cx), dx.s, dw.s, db.s, dout.s, x.s, w.s, (const float *)mean.s, (const float *)rstd.s, \
                            N, C, dt)
            BOTH("layernorm_backward", LNB);
#undef LNB
            compare("layernorm_backward dinp (accumulates)", &dx, dt, (size_t)(N * C), tol);
            compare("layernorm_backward dweight (accumulates)", &dw, dt, (size_t)C, tol);
            compare("layernorm_backward dbias (accumulates)", &db, dt, (size_t)C, tol);
            pb_free(&x); pb_free(&w); pb_free(&b); pb_free(&out); pb_free(&mean); pb_free(&rstd);
            pb_free(&dout); pb_free(&dx); pb_free(&dw); pb_free(&db);
        }
    }
    end_case();
}

/* ------------------------------------------------------- embedding */

static void test_parity_embedding(void **state)
{
    (void)state;
    begin_case();
    const int64_t B = 3, T = 11, C = 24, V = 40;
    const int pad = 1;
    int32_t tok[3 * 11];
    for (int i = 0; i < B * T; i++)
        tok[i] = i % 7 == 3 ? pad : (int32_t)moe_test_rng_int(&g_rng, 0, 12); /* repeats on purpose */
    pbuf tokens = pb_alloc(sizeof tok);
    pb_upload(&tokens, tok, sizeof tok);
    for (int t = 0; t < 3; t++) {
        const moe_dtype dt = k_dtypes[t];
        pbuf table = pb_rand(dt, (size_t)(V * C), -1.0f, 1.0f), out = pb_nan(dt, (size_t)(B * T * C));
        for (int sin_pos = 0; sin_pos < 2; sin_pos++) {
            pb_poison(&out, dt, (size_t)(B * T * C));
#define EMBF(o, cx, s) \
    (o)->embedding_forward((cx), out.s, (const int32_t *)tokens.s, table.s, B, T, C, 4.9f, pad, sin_pos, dt)
            BOTH("embedding_forward", EMBF);
#undef EMBF
            compare(sin_pos ? "embedding_forward sinusoidal" : "embedding_forward", &out, dt, (size_t)(B * T * C),
                    tol_of(dt));
        }
        pbuf dout = pb_rand(dt, (size_t)(B * T * C), -1.0f, 1.0f), dtab = pb_rand(dt, (size_t)(V * C), -1.0f, 1.0f);
#define EMBB(o, cx, s) \
    (o)->embedding_backward((cx), dtab.s, dout.s, (const int32_t *)tokens.s, B, T, C, V, 4.9f, pad, dt)
        BOTH("embedding_backward", EMBB);
#undef EMBB
        compare("embedding_backward (accumulates, pad skipped)", &dtab, dt, (size_t)(V * C), tol_of(dt));
        pb_free(&table); pb_free(&out); pb_free(&dout); pb_free(&dtab);
    }
    pb_free(&tokens);
    end_case();
}

/* ---------------------------------------------------- cross-entropy */

static void test_parity_cross_entropy(void **state)
{
    (void)state;
    begin_case();
    const int64_t N = 17, V = 1000;
    const int ignore = 1;
    int32_t tg[17];
    for (int i = 0; i < N; i++)
        tg[i] = i % 5 == 2 ? ignore : (int32_t)moe_test_rng_int(&g_rng, 2, V);
    pbuf targets = pb_alloc(sizeof tg);
    pb_upload(&targets, tg, sizeof tg);
    for (int t = 0; t < 3; t++) {
        const moe_dtype dt = k_dtypes[t];
        for (int with_grad = 0; with_grad < 2; with_grad++) {
            float gs = with_grad ? 2.0f : 0.0f;
            pbuf logits = pb_rand(dt, (size_t)(N * V), -4.0f, 4.0f), losses = pb_nan(MOE_F32, (size_t)N);
#define CE(o, cx, s) (o)->cross_entropy((cx), (float *)losses.s, logits.s, (const int32_t *)targets.s, N, V, ignore, gs, dt)
            BOTH("cross_entropy", CE);
#undef CE
            compare(with_grad ? "cross_entropy losses" : "cross_entropy losses (no grad)", &losses, MOE_F32,
                    (size_t)N, TOL32);
            compare(with_grad ? "cross_entropy dlogits (in place)" : "cross_entropy logits untouched", &logits, dt,
                    (size_t)(N * V), tol_of(dt));
            pb_free(&logits);
            pb_free(&losses);
        }
    }
    pb_free(&targets);
    end_case();
}

/* -------------------------------------------------------- attention */

typedef struct att_case {
    moe_dtype dt;
    int64_t B, T, H, D;
    float p;
} att_case;

static void run_attention_case(const att_case *ac)
{
    const moe_dtype dt = ac->dt;
    const int64_t B = ac->B, T = ac->T, H = ac->H, D = ac->D, C = H * D, ld = 3 * C;
    const size_t nqkv = (size_t)(B * T * ld), nout = (size_t)(B * T * C), nlse = (size_t)(B * H * T);
    const size_t es = moe_dtype_size(dt);
    pbuf qkv = pb_rand(dt, nqkv, -1.0f, 1.0f);
    pbuf out = pb_nan(dt, nout), lse = pb_nan(MOE_F32, nlse);
    char what[128], tag[64];
    snprintf(tag, sizeof tag, "B%lld T%lld H%lld D%lld p%.1f", (long long)B, (long long)T, (long long)H, (long long)D,
             (double)ac->p);
#define QKV(s, k) ((const char *)qkv.s + (size_t)(k) * (size_t)C * es)
#define ATTF(o, cx, s) \
    (o)->attention_forward((cx), out.s, (float *)lse.s, QKV(s, 0), QKV(s, 1), QKV(s, 2), ld, B, T, H, D, ac->p, 42u, 9u, dt)
    BOTH("attention_forward", ATTF);
#undef ATTF
    snprintf(what, sizeof what, "attention_forward out %s", tag);
    compare(what, &out, dt, nout, tol_of(dt));
    snprintf(what, sizeof what, "attention_forward lse %s", tag);
    compare(what, &lse, MOE_F32, nlse, TOL32);
    pb_sync_from_cpu(&out, nout * es);
    pb_sync_from_cpu(&lse, nlse * 4);
    pbuf dout = pb_rand(dt, nout, -1.0f, 1.0f), dqkv = pb_nan(dt, nqkv);
#define DQKV(s, k) ((char *)dqkv.s + (size_t)(k) * (size_t)C * es)
#define ATTB(o, cx, s)                                                                                               \
    (o)->attention_backward((cx), DQKV(s, 0), DQKV(s, 1), DQKV(s, 2), ld, dout.s, out.s, (const float *)lse.s,      \
                            QKV(s, 0), QKV(s, 1), QKV(s, 2), ld, B, T, H, D, ac->p, 42u, 9u, dt)
    BOTH("attention_backward", ATTB);
#undef ATTB
    snprintf(what, sizeof what, "attention_backward dq|dk|dv %s", tag);
    compare(what, &dqkv, dt, nqkv, tol_of(dt));
    pb_free(&qkv); pb_free(&out); pb_free(&lse); pb_free(&dout); pb_free(&dqkv);
}

static void test_parity_attention(void **state)
{
    (void)state;
    begin_case();
    const att_case cases[] = {
        {MOE_F32, 2, 70, 2, 16, 0.0f},  {MOE_F32, 1, 40, 3, 24, 0.2f},  {MOE_F16, 2, 70, 2, 64, 0.0f},
        {MOE_BF16, 2, 70, 2, 64, 0.1f}, {MOE_F16, 1, 130, 2, 32, 0.2f}, {MOE_BF16, 1, 65, 1, 128, 0.0f},
        {MOE_F16, 2, 33, 2, 40, 0.1f},  {MOE_BF16, 1, 64, 2, 64, 0.0f},
        /* T % 4 == 0 with dropout: one Philox evaluation per group of four keys */
        {MOE_BF16, 2, 132, 2, 64, 0.1f}, {MOE_F16, 1, 96, 3, 32, 0.2f}, {MOE_BF16, 1, 64, 1, 128, 0.3f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_attention_case(&cases[i]);
    end_case();
}

/* ------------------------------------------------------------ routing */

typedef struct route_case {
    int k;
    moe_route_policy policy;
    int norm_before, prioritized, with_pad;
    int64_t capacity;
} route_case;

static const char *policy_name(moe_route_policy p)
{
    return p == MOE_ROUTE_SAMPLING ? "sampling" : p == MOE_ROUTE_ALL ? "all" : "random";
}

/* buffers of one routing on both backends */
typedef struct route_bufs {
    pbuf logits, pad, probs, expert, slot, weight, l_aux, metrics, ws;
    moe_route_args ac, ag;
} route_bufs;

static void route_setup(route_bufs *r, const route_case *rc, int64_t S, int E)
{
    r->logits = pb_rand(MOE_F32, (size_t)(S * E), -2.0f, 2.0f);
    uint8_t pads[512];
    assert_true(S <= 512);
    for (int64_t s = 0; s < S; s++)
        pads[s] = rc->with_pad && s % 7 == 5;
    r->pad = pb_alloc((size_t)S);
    pb_upload(&r->pad, pads, (size_t)S);
    r->probs = pb_nan(MOE_F32, (size_t)(S * E));
    r->expert = pb_nan(MOE_I32, (size_t)(2 * S));
    r->slot = pb_nan(MOE_I32, (size_t)(2 * S));
    r->weight = pb_nan(MOE_F32, (size_t)(2 * S));
    r->l_aux = pb_nan(MOE_F32, 1);
    r->metrics = pb_nan(MOE_F32, MOE_NUM_METRICS);
    int64_t wc = g_cpu.ops->route_workspace_bytes(S, E), wg = g_gpu.ops->route_workspace_bytes(S, E);
    assert_true(wc >= 0 && wg > 0);
    r->ws.bytes = (size_t)(wc > wg ? wc : wg);
    assert_int_equal(g_cpu.be->alloc(g_cpu.ctx, r->ws.bytes, "route workspace", &r->ws.c), MOE_OK);
    assert_int_equal(g_gpu.be->alloc(g_gpu.ctx, r->ws.bytes, "route workspace", &r->ws.g), MOE_OK);
    moe_route_args a;
    memset(&a, 0, sizeof a);
    a.S = S;
    a.E = E;
    a.capacity = rc->capacity;
    a.k = rc->k;
    a.policy = rc->policy;
    a.normalize_before_drop = rc->norm_before;
    a.batch_prioritized = rc->prioritized;
    a.seed = 2024;
    a.stream = 17;
    r->ac = a;
    r->ag = a;
#define ROUTE_PTRS(dst, s)                                 \
    do {                                                   \
        (dst).logits = (const float *)r->logits.s;         \
        (dst).pad = (const uint8_t *)r->pad.s;             \
        (dst).probs = (float *)r->probs.s;                 \
        (dst).expert = (int32_t *)r->expert.s;             \
        (dst).slot = (int32_t *)r->slot.s;                 \
        (dst).weight = (float *)r->weight.s;               \
        (dst).l_aux = (float *)r->l_aux.s;                 \
        (dst).metrics = (float *)r->metrics.s;             \
        (dst).workspace = r->ws.s;                         \
    } while (0)
    ROUTE_PTRS(r->ac, c);
    ROUTE_PTRS(r->ag, g);
#undef ROUTE_PTRS
}

static void route_free(route_bufs *r)
{
    pb_free(&r->logits); pb_free(&r->pad); pb_free(&r->probs); pb_free(&r->expert); pb_free(&r->slot);
    pb_free(&r->weight); pb_free(&r->l_aux); pb_free(&r->metrics); pb_free(&r->ws);
}

static void test_parity_route(void **state)
{
    (void)state;
    begin_case();
    const int64_t S = 64;
    const int E = 8;
    const route_case cases[] = {
        {1, MOE_ROUTE_ALL, 0, 0, 0, 10},      {2, MOE_ROUTE_ALL, 0, 0, 0, 12},      {2, MOE_ROUTE_SAMPLING, 0, 0, 0, 12},
        {2, MOE_ROUTE_RANDOM, 0, 0, 0, 12},   {2, MOE_ROUTE_ALL, 1, 0, 0, 12},      {2, MOE_ROUTE_SAMPLING, 0, 1, 1, 12},
        {2, MOE_ROUTE_RANDOM, 1, 1, 1, 12},   {1, MOE_ROUTE_ALL, 0, 1, 1, 6},       {2, MOE_ROUTE_ALL, 0, 0, 1, 16},
    };
    char what[128];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const route_case *rc = &cases[i];
        char tag[80];
        snprintf(tag, sizeof tag, "top%d %s%s%s%s C%lld", rc->k, rc->k == 2 ? policy_name(rc->policy) : "",
                 rc->norm_before ? " norm-before" : "", rc->prioritized ? " prioritized" : "",
                 rc->with_pad ? " pad" : "", (long long)rc->capacity);
        route_bufs r;
        route_setup(&r, rc, S, E);
        check_ok("route_forward", g_cpu.ops->route_forward(g_cpu.ctx, &r.ac), g_gpu.ops->route_forward(g_gpu.ctx, &r.ag));
        snprintf(what, sizeof what, "route_forward probs %s", tag);
        compare(what, &r.probs, MOE_F32, (size_t)(S * E), TOL32);
        snprintf(what, sizeof what, "route_forward expert %s", tag);
        compare(what, &r.expert, MOE_I32, (size_t)(2 * S), 0.0);
        snprintf(what, sizeof what, "route_forward slot %s", tag);
        compare(what, &r.slot, MOE_I32, (size_t)(2 * S), 0.0);
        snprintf(what, sizeof what, "route_forward weight %s", tag);
        compare(what, &r.weight, MOE_F32, (size_t)(2 * S), TOL32);
        snprintf(what, sizeof what, "route_forward l_aux %s", tag);
        compare(what, &r.l_aux, MOE_F32, 1, TOL32);
        snprintf(what, sizeof what, "route_forward metrics %s", tag);
        compare(what, &r.metrics, MOE_F32, MOE_NUM_METRICS, TOL32);

        /* backward from the cpu's routing on both sides */
        pb_sync_from_cpu(&r.probs, (size_t)(S * E) * 4);
        pb_sync_from_cpu(&r.expert, (size_t)(2 * S) * 4);
        pb_sync_from_cpu(&r.slot, (size_t)(2 * S) * 4);
        pb_sync_from_cpu(&r.weight, (size_t)(2 * S) * 4);
        pbuf dweight = pb_rand(MOE_F32, (size_t)(2 * S), -1.0f, 1.0f), dlogits = pb_nan(MOE_F32, (size_t)(S * E));
        check_ok("route_backward",
                 g_cpu.ops->route_backward(g_cpu.ctx, &r.ac, (const float *)dweight.c, 0.7f, (float *)dlogits.c),
                 g_gpu.ops->route_backward(g_gpu.ctx, &r.ag, (const float *)dweight.g, 0.7f, (float *)dlogits.g));
        snprintf(what, sizeof what, "route_backward dlogits %s", tag);
        compare(what, &dlogits, MOE_F32, (size_t)(S * E), TOL32);
        pb_free(&dweight);
        pb_free(&dlogits);
        route_free(&r);
    }
    end_case();
}

static void test_parity_dispatch_combine(void **state)
{
    (void)state;
    begin_case();
    const int64_t S = 64, Cap = 10, d = 24;
    const int E = 8;
    const route_case rc = {2, MOE_ROUTE_ALL, 0, 0, 1, Cap};
    route_bufs r;
    route_setup(&r, &rc, S, E);
    assert_int_equal(g_cpu.ops->route_forward(g_cpu.ctx, &r.ac), MOE_OK);
    pb_sync_from_cpu(&r.expert, (size_t)(2 * S) * 4);
    pb_sync_from_cpu(&r.slot, (size_t)(2 * S) * 4);
    pb_sync_from_cpu(&r.weight, (size_t)(2 * S) * 4);
    const size_t rows = (size_t)(E * Cap);
    for (int t = 0; t < 3; t++) {
        const moe_dtype dt = k_dtypes[t];
        const double tol = tol_of(dt);
        pbuf x = pb_rand(dt, (size_t)(S * d), -1.0f, 1.0f), out = pb_nan(dt, rows * (size_t)d);
#define EXP(s) ((const int32_t *)r.expert.s)
#define SLT(s) ((const int32_t *)r.slot.s)
#define DF(o, cx, s) (o)->dispatch_forward((cx), out.s, x.s, EXP(s), SLT(s), S, E, Cap, d, dt)
        BOTH("dispatch_forward", DF);
#undef DF
        compare("dispatch_forward (unused rows zero)", &out, dt, rows * (size_t)d, tol);
        pbuf dout = pb_rand(dt, rows * (size_t)d, -1.0f, 1.0f), dx = pb_rand(dt, (size_t)(S * d), -1.0f, 1.0f);
#define DB(o, cx, s) (o)->dispatch_backward((cx), dx.s, dout.s, EXP(s), SLT(s), S, E, Cap, d, dt)
        BOTH("dispatch_backward", DB);
#undef DB
        compare("dispatch_backward (accumulates)", &dx, dt, (size_t)(S * d), tol);
        pbuf eout = pb_rand(dt, rows * (size_t)d, -1.0f, 1.0f), y = pb_nan(dt, (size_t)(S * d));
#define CF(o, cx, s) (o)->combine_forward((cx), y.s, eout.s, EXP(s), SLT(s), (const float *)r.weight.s, S, E, Cap, d, dt)
        BOTH("combine_forward", CF);
#undef CF
        compare("combine_forward", &y, dt, (size_t)(S * d), tol);
        pbuf dy = pb_rand(dt, (size_t)(S * d), -1.0f, 1.0f), deout = pb_nan(dt, rows * (size_t)d);
        pbuf dw = pb_nan(MOE_F32, (size_t)(2 * S));
#define CB(o, cx, s)                                                                                               \
    (o)->combine_backward((cx), deout.s, (float *)dw.s, dy.s, eout.s, EXP(s), SLT(s), (const float *)r.weight.s, S, \
                          E, Cap, d, dt)
        BOTH("combine_backward", CB);
#undef CB
#undef EXP
#undef SLT
        compare("combine_backward deout", &deout, dt, rows * (size_t)d, tol);
        compare("combine_backward dweight", &dw, MOE_F32, (size_t)(2 * S), TOL32);
        pb_free(&x); pb_free(&out); pb_free(&dout); pb_free(&dx); pb_free(&eout); pb_free(&y); pb_free(&dy);
        pb_free(&deout); pb_free(&dw);
    }
    route_free(&r);
    end_case();
}

/* -------------------------------------------------------- optimizers */

typedef struct adam_case {
    moe_dtype param, copy, grad, state; /* copy MOE_DTYPE_COUNT: none */
    float wd;
} adam_case;

static void test_parity_optim(void **state)
{
    (void)state;
    begin_case();
    const int64_t n = 3003; /* not a multiple of 8: the vectorised Adam's scalar tail */
    const adam_case cases[] = {
        {MOE_F32, MOE_DTYPE_COUNT, MOE_F32, MOE_F32, 0.0f},
        {MOE_F32, MOE_F16, MOE_F16, MOE_F16, 0.0f},
        {MOE_F16, MOE_DTYPE_COUNT, MOE_F16, MOE_F16, 0.01f},
        {MOE_BF16, MOE_DTYPE_COUNT, MOE_BF16, MOE_F32, 0.0f},
        {MOE_F32, MOE_BF16, MOE_F32, MOE_F16, 0.1f},
        {MOE_F32, MOE_BF16, MOE_BF16, MOE_F32, 0.01f}, /* --bf16: fp32 master, bf16 copy and grads */
        {MOE_F32, MOE_F16, MOE_F16, MOE_F32, 0.0f},
    };
    char what[128];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const adam_case *k = &cases[i];
        const int has_copy = k->copy != MOE_DTYPE_COUNT;
        pbuf p = pb_rand(k->param, (size_t)n, -1.0f, 1.0f);
        pbuf pc = has_copy ? pb_nan(k->copy, (size_t)n) : pb_alloc(4);
        pbuf m = pb_alloc((size_t)n * moe_dtype_size(k->state)), v = pb_alloc((size_t)n * moe_dtype_size(k->state));
        pbuf scales = pb_alloc(2 * sizeof(float));
        void *zero = calloc((size_t)n, 4);
        assert_non_null(zero);
        pb_upload(&m, zero, (size_t)n * moe_dtype_size(k->state));
        pb_upload(&v, zero, (size_t)n * moe_dtype_size(k->state));
        free(zero);
        float ones[2] = {1.0f, 1.0f};
        pb_upload(&scales, ones, sizeof ones);
        for (int step = 1; step <= 2; step++) {
            pbuf g = pb_rand(k->grad, (size_t)n, -100.0f, 100.0f);
            moe_adam_args a;
            memset(&a, 0, sizeof a);
            a.n = n;
            a.param_dtype = k->param;
            a.copy_dtype = has_copy ? k->copy : MOE_F32;
            a.grad_dtype = k->grad;
            a.state_dtype = k->state;
            a.lr = 1e-3f;
            a.beta1 = 0.9f;
            a.beta2 = 0.98f;
            a.eps = 1e-8f;
            a.weight_decay = k->wd;
            a.grad_scale = 128.0f;
            a.step = step;
            moe_adam_args ac = a, ag = a;
            ac.param = p.c; ac.param_copy = has_copy ? pc.c : NULL; ac.grad = g.c; ac.exp_avg = m.c; ac.exp_avg_sq = v.c;
            ac.scale_avg = (float *)scales.c; ac.scale_avg_sq = (float *)scales.c + 1;
            ag.param = p.g; ag.param_copy = has_copy ? pc.g : NULL; ag.grad = g.g; ag.exp_avg = m.g; ag.exp_avg_sq = v.g;
            ag.scale_avg = (float *)scales.g; ag.scale_avg_sq = (float *)scales.g + 1;
            check_ok("adam_step", g_cpu.ops->adam_step(g_cpu.ctx, &ac), g_gpu.ops->adam_step(g_gpu.ctx, &ag));
            pb_free(&g);
        }
        snprintf(what, sizeof what, "adam param (state %s%s, wd %g, 2 steps)", dt_name(k->state),
                 has_copy ? ", copy" : "", (double)k->wd);
        compare(what, &p, k->param, (size_t)n, tol_of(k->param));
        if (has_copy)
            compare("adam param copy", &pc, k->copy, (size_t)n, tol_of(k->copy));
        compare("adam exp_avg", &m, k->state, (size_t)n, tol_of(k->state));
        compare("adam exp_avg_sq", &v, k->state, (size_t)n, tol_of(k->state));
        if (k->state == MOE_F16)
            compare("adam moment scales", &scales, MOE_F32, 2, TOL32);
        pb_free(&p); pb_free(&pc); pb_free(&m); pb_free(&v); pb_free(&scales);
    }

    for (int mom = 0; mom < 2; mom++) {
        const moe_dtype dt = mom ? MOE_F32 : MOE_F16;
        pbuf p = pb_rand(dt, (size_t)n, -1.0f, 1.0f), buf = pb_rand(MOE_F32, (size_t)n, -0.1f, 0.1f);
        pbuf pc = pb_nan(MOE_BF16, (size_t)n);
        pbuf g = pb_rand(dt, (size_t)n, -10.0f, 10.0f);
        moe_sgd_args a;
        memset(&a, 0, sizeof a);
        a.n = n;
        a.param_dtype = dt;
        a.copy_dtype = MOE_BF16;
        a.grad_dtype = dt;
        a.lr = 0.05f;
        a.momentum = mom ? 0.9f : 0.0f;
        a.weight_decay = 1e-4f;
        a.grad_scale = 4.0f;
        moe_sgd_args ac = a, ag = a;
        ac.param = p.c; ac.param_copy = pc.c; ac.grad = g.c; ac.momentum_buf = mom ? (float *)buf.c : NULL;
        ag.param = p.g; ag.param_copy = pc.g; ag.grad = g.g; ag.momentum_buf = mom ? (float *)buf.g : NULL;
        check_ok("sgd_step", g_cpu.ops->sgd_step(g_cpu.ctx, &ac), g_gpu.ops->sgd_step(g_gpu.ctx, &ag));
        compare(mom ? "sgd param (momentum 0.9)" : "sgd param", &p, dt, (size_t)n, tol_of(dt));
        compare("sgd param copy", &pc, MOE_BF16, (size_t)n, tol_of(MOE_BF16));
        if (mom)
            compare("sgd momentum buffer", &buf, MOE_F32, (size_t)n, TOL32);
        pb_free(&p); pb_free(&buf); pb_free(&pc); pb_free(&g);
    }
    end_case();
}

/* ------------------------------------------------- gpu-only properties */

static void test_parity_memory_and_copies(void **state)
{
    (void)state;
    const moe_backend_ops *be = g_gpu.be;
    moe_ctx *cx = g_gpu.ctx;
    moe_mem_stats s0, s1, s2;
    be->memory_stats(cx, &s0);
    void *p = NULL;
    assert_int_equal(be->alloc(cx, 3u << 20, "stats probe", &p), MOE_OK);
    be->memory_stats(cx, &s1);
    assert_true(s1.allocated >= s0.allocated + (3u << 20));
    assert_true(s1.peak_allocated >= s1.allocated);
    assert_true(s1.reserved >= s1.allocated);
    assert_true(s1.total > 0);
    /* copies round-trip through device memory */
    const size_t n = 100000;
    uint32_t *h = malloc(n * 4), *back = malloc(n * 4);
    assert_non_null(h);
    assert_non_null(back);
    for (size_t i = 0; i < n; i++)
        h[i] = (uint32_t)(i * 2654435761u);
    assert_int_equal(be->copy_from_host(cx, p, h, n * 4), MOE_OK);
    void *q = NULL;
    assert_int_equal(be->alloc(cx, n * 4, "copy target", &q), MOE_OK);
    assert_int_equal(be->copy(cx, q, p, n * 4), MOE_OK);
    assert_int_equal(be->copy_to_host(cx, back, q, n * 4), MOE_OK);
    assert_memory_equal(h, back, n * 4);
    be->free(cx, q);
    be->free(cx, p);
    be->memory_stats(cx, &s2);
    assert_int_equal(s2.allocated, s0.allocated);
    assert_true(s2.peak_allocated >= s1.allocated);
    be->reset_peak(cx);
    be->memory_stats(cx, &s2);
    assert_int_equal(s2.peak_allocated, s2.allocated);
    /* a freed block is reused without growing what is held */
    uint64_t held = s2.reserved;
    assert_int_equal(be->alloc(cx, 3u << 20, "reuse probe", &p), MOE_OK);
    be->memory_stats(cx, &s2);
    assert_int_equal(s2.reserved, held);
    be->free(cx, p);
    /* out of memory: one clear message naming the allocation and the free bytes */
    moe_test_clear_error();
    void *huge = NULL;
    assert_int_equal(be->alloc(cx, 1ull << 46, "the impossible tensor", &huge), MOE_ERR_NOMEM);
    assert_null(huge);
    printf("out-of-memory message: %s\n", moe_test_last_error());
    assert_non_null(strstr(moe_test_last_error(), "the impossible tensor"));
    assert_non_null(strstr(moe_test_last_error(), "free"));
    assert_non_null(strstr(moe_test_last_error(), "70368744177664"));
    /* the backend still works afterwards */
    assert_int_equal(be->alloc(cx, 4096, "after oom", &p), MOE_OK);
    assert_int_equal(be->synchronize(cx), MOE_OK);
    be->free(cx, p);
    free(h);
    free(back);
}

/* Runs an op twice on the gpu from the same state; results must be identical bits. */
static void test_parity_determinism(void **state)
{
    (void)state;
    const moe_backend_ops *be = g_gpu.be;
    const moe_ops *o = g_gpu.ops;
    moe_ctx *cx = g_gpu.ctx;
    /* layernorm backward (parameter sums), embedding backward, attention backward */
    const int64_t N = 500, C = 96, V = 30, B = 2, T = 100, H = 2, D = 64;
    const size_t nbig = (size_t)(B * T * 3 * H * D);
    void *hx = host_rand(MOE_F16, nbig, -1.0f, 1.0f), *hy = host_rand(MOE_F16, nbig, -1.0f, 1.0f);
    void *x, *y, *acc1, *acc2, *stat;
    assert_int_equal(be->alloc(cx, nbig * 2, "x", &x), MOE_OK);
    assert_int_equal(be->alloc(cx, nbig * 2, "y", &y), MOE_OK);
    assert_int_equal(be->alloc(cx, nbig * 2, "acc1", &acc1), MOE_OK);
    assert_int_equal(be->alloc(cx, nbig * 2, "acc2", &acc2), MOE_OK);
    assert_int_equal(be->alloc(cx, (size_t)(B * H * T) * 4 + (size_t)N * 8, "stats", &stat), MOE_OK);
    assert_int_equal(be->copy_from_host(cx, x, hx, nbig * 2), MOE_OK);
    assert_int_equal(be->copy_from_host(cx, y, hy, nbig * 2), MOE_OK);
    unsigned char *r1 = malloc(nbig * 2), *r2 = malloc(nbig * 2);
    assert_non_null(r1);
    assert_non_null(r2);
    float *mean = (float *)stat, *rstd = mean + N;
    for (int rep = 0; rep < 2; rep++) {
        void *acc = rep ? acc2 : acc1;
        assert_int_equal(o->fill(cx, acc, MOE_F16, (int64_t)nbig, 0.0f), MOE_OK);
        assert_int_equal(o->layernorm_forward(cx, acc, mean, rstd, x, NULL, NULL, N, C, 1e-5f, MOE_F16), MOE_OK);
        assert_int_equal(o->fill(cx, acc, MOE_F16, (int64_t)nbig, 0.0f), MOE_OK);
        assert_int_equal(o->layernorm_backward(cx, acc, (char *)acc + N * C * 2, (char *)acc + N * C * 2 + C * 2, y, x,
                                               NULL, mean, rstd, N, C, MOE_F16),
                         MOE_OK);
        int32_t tok[500];
        for (int i = 0; i < N; i++)
            tok[i] = (int32_t)((i * 7) % V);
        void *dtok;
        assert_int_equal(be->alloc(cx, sizeof tok, "tokens", &dtok), MOE_OK);
        assert_int_equal(be->copy_from_host(cx, dtok, tok, sizeof tok), MOE_OK);
        assert_int_equal(
            o->embedding_backward(cx, (char *)acc + (N * C + 2 * C) * 2, y, dtok, 1, N, C, V, 2.0f, 1, MOE_F16), MOE_OK);
        be->free(cx, dtok);
        assert_int_equal(be->copy_to_host(cx, rep ? r2 : r1, acc, nbig * 2), MOE_OK);
    }
    assert_memory_equal(r1, r2, nbig * 2);
    /* attention backward twice (dropout on) */
    const int64_t ld = 3 * H * D;
    float *lse = (float *)stat;
    void *out;
    assert_int_equal(be->alloc(cx, (size_t)(B * T * H * D) * 2, "attention out", &out), MOE_OK);
    assert_int_equal(o->attention_forward(cx, out, lse, x, (char *)x + H * D * 2, (char *)x + 2 * H * D * 2, ld, B, T,
                                          H, D, 0.1f, 5u, 6u, MOE_F16),
                     MOE_OK);
    for (int rep = 0; rep < 2; rep++) {
        void *acc = rep ? acc2 : acc1;
        assert_int_equal(o->attention_backward(cx, acc, (char *)acc + H * D * 2, (char *)acc + 2 * H * D * 2, ld, y,
                                               out, lse, x, (char *)x + H * D * 2, (char *)x + 2 * H * D * 2, ld, B,
                                               T, H, D, 0.1f, 5u, 6u, MOE_F16),
                         MOE_OK);
        assert_int_equal(be->copy_to_host(cx, rep ? r2 : r1, acc, nbig * 2), MOE_OK);
    }
    assert_memory_equal(r1, r2, nbig * 2);
    printf("PARITY %-44s %-4s bit-identical repeats PASS\n", "determinism (layernorm/embedding/attention bwd)", "f16");
    be->free(cx, out);
    be->free(cx, x);
    be->free(cx, y);
    be->free(cx, acc1);
    be->free(cx, acc2);
    be->free(cx, stat);
    free(hx);
    free(hy);
    free(r1);
    free(r2);
}

/* ---------------------------------------------------- opt-in timing */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* Mean milliseconds of `reps` launches of op after two warm-ups; the ops
 * table has no events, so this is host time around a synchronize. */
#define BENCH(name, reps, work, unit, CALL)                                                         \
    do {                                                                                            \
        for (int w_ = 0; w_ < 2; w_++)                                                              \
            assert_int_equal((CALL), MOE_OK);                                                       \
        assert_int_equal(be->synchronize(cx), MOE_OK);                                              \
        double t0_ = now_ms();                                                                      \
        for (int r_ = 0; r_ < (reps); r_++)                                                         \
            assert_int_equal((CALL), MOE_OK);                                                       \
        assert_int_equal(be->synchronize(cx), MOE_OK);                                              \
        double ms_ = (now_ms() - t0_) / (reps);                                                     \
        printf("BENCH %-52s %9.3f ms %8.1f %s\n", (name), ms_, (work) / (ms_ * 1e-3) / 1e12, (unit)); \
        fflush(stdout);                                                                             \
    } while (0)

/* MOE_PARITY_BENCH=1: the hot ops at the reference model's per-GPU sizes
 * (FAIRSEQ_SPEC.md §2.6: 8192 tokens, d 2048, ffn 8192, 32 heads of 64,
 * vocabulary 50000, 8 experts), fp16. Not part of the parity verdict. */
static void test_parity_bench(void **state)
{
    (void)state;
    const moe_backend_ops *be = g_gpu.be;
    const moe_ops *o = g_gpu.ops;
    moe_ctx *cx = g_gpu.ctx;
    const int64_t N = 8192, Cm = 2048, F = 8192, B = 4, T = 2048, H = 32, D = 64, V = 50000;
    void *x, *w, *y, *aux, *bias, *qkv, *att, *dqkv, *lse, *logits, *loss, *tg, *st;
    assert_int_equal(be->alloc(cx, (uint64_t)(N * Cm) * 2, "x", &x), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(F * Cm) * 2, "w", &w), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(N * F) * 2, "y", &y), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(N * F) * 2, "aux", &aux), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)F * 2, "bias", &bias), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(N * 3 * Cm) * 2, "qkv", &qkv), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(N * 3 * Cm) * 2, "dqkv", &dqkv), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(N * Cm) * 2, "att", &att), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(B * H * T) * 4, "lse", &lse), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(N * V) * 2, "logits", &logits), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)N * 4, "loss", &loss), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)N * 4, "targets", &tg), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)N * 8 + 1024, "stats", &st), MOE_OK);
    assert_int_equal(o->init_uniform(cx, x, MOE_F16, N * Cm, -1.0f, 1.0f, 1u, 1u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, w, MOE_F16, F * Cm, -0.02f, 0.02f, 1u, 2u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, bias, MOE_F16, F, -0.02f, 0.02f, 1u, 3u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, qkv, MOE_F16, N * 3 * Cm, -0.5f, 0.5f, 1u, 4u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, logits, MOE_F16, N * V, -4.0f, 4.0f, 1u, 5u), MOE_OK);
    assert_int_equal(o->fill(cx, tg, MOE_I32, N, 7.0f), MOE_OK);

    moe_matmul_desc d;
    memset(&d, 0, sizeof d);
    d.trans_b = 1; /* y(N,F) = x(N,C) w(F,C)^T, as a Linear */
    d.m = N; d.n = F; d.k = Cm; d.alpha = 1.0f;
    d.a = x; d.lda = Cm; d.b = w; d.ldb = Cm; d.c = y; d.ldc = F;
    d.ab_dtype = MOE_F16; d.c_dtype = MOE_F16; d.batch = 1;
    d.epilogue = MOE_EPI_BIAS_ACT; d.bias = bias; d.aux = aux; d.act = MOE_ACT_GELU_TANH;
    double mm = 2.0 * (double)N * (double)F * (double)Cm;
    BENCH("matmul fc1 8192x8192x2048 bias+gelu(aux) f16", 10, mm, "TFLOP/s", o->matmul(cx, &d));
    d.act = MOE_ACT_RELU; /* BIAS epilogue into aux, then the relu pass */
    BENCH("matmul fc1 8192x8192x2048 bias+relu(aux) f16", 10, mm, "TFLOP/s", o->matmul(cx, &d));
    const int64_t ld = 3 * Cm;
    const char *q = (const char *)qkv, *k = q + Cm * 2, *v = q + 2 * Cm * 2;
    char *dq = (char *)dqkv;
    double af = 2.0 * 2.0 * (double)(B * H) * (double)T * (double)T * (double)D / 2.0; /* causal */
    BENCH("attention_forward B4 T2048 H32 D64 p0.1 f16", 10, af, "TFLOP/s",
          o->attention_forward(cx, att, (float *)lse, q, k, v, ld, B, T, H, D, 0.1f, 1u, 2u, MOE_F16));
    BENCH("attention_backward B4 T2048 H32 D64 p0.1 f16", 5, 2.5 * af, "TFLOP/s",
          o->attention_backward(cx, dq, dq + Cm * 2, dq + 2 * Cm * 2, ld, att, att, (float *)lse, q, k, v, ld, B, T,
                                H, D, 0.1f, 1u, 2u, MOE_F16));
    BENCH("attention_forward B4 T2048 H32 D64 p0 f16", 10, af, "TFLOP/s",
          o->attention_forward(cx, att, (float *)lse, q, k, v, ld, B, T, H, D, 0.0f, 1u, 2u, MOE_F16));
    BENCH("attention_backward B4 T2048 H32 D64 p0 f16", 5, 2.5 * af, "TFLOP/s",
          o->attention_backward(cx, dq, dq + Cm * 2, dq + 2 * Cm * 2, ld, att, att, (float *)lse, q, k, v, ld, B, T,
                                H, D, 0.0f, 1u, 2u, MOE_F16));
    double ce_bytes = 3.0 * (double)N * (double)V * 2.0;
    BENCH("cross_entropy N8192 V50000 f16 (+grad in place)", 5, ce_bytes, "TB/s",
          o->cross_entropy(cx, (float *)loss, logits, (const int32_t *)tg, N, V, 1, 1.0f, MOE_F16));
    float *mean = (float *)st, *rstd = mean + N;
    double ln_bytes = 2.0 * (double)N * (double)Cm * 2.0;
    BENCH("layernorm_forward 8192x2048 f16", 10, ln_bytes, "TB/s",
          o->layernorm_forward(cx, att, mean, rstd, x, bias, bias, N, Cm, 1e-5f, MOE_F16));
    BENCH("layernorm_backward 8192x2048 f16", 10, 2.0 * ln_bytes, "TB/s",
          o->layernorm_backward(cx, y, aux, (char *)aux + Cm * 2, att, x, bias, mean, rstd, N, Cm, MOE_F16));
    BENCH("act_forward gelu tanh 8192x8192 f16", 10, 2.0 * (double)(N * F) * 2.0, "TB/s",
          o->act_forward(cx, y, aux, N * F, MOE_F16, MOE_ACT_GELU_TANH));
    BENCH("dropout_forward 8192x8192 f16", 10, 2.0 * (double)(N * F) * 2.0, "TB/s",
          o->dropout_forward(cx, y, aux, N * F, MOE_F16, 0.1f, 3u, 4u));
    /* routing of 8192 tokens over 8 experts, top-2 */
    moe_route_args ra;
    memset(&ra, 0, sizeof ra);
    ra.S = N; ra.E = 8; ra.capacity = 2 * N / 8; ra.k = 2; ra.policy = MOE_ROUTE_SAMPLING; ra.seed = 1; ra.stream = 2;
    void *rbuf, *rws;
    assert_int_equal(be->alloc(cx, (uint64_t)N * 8 * 4 * 2 + (uint64_t)N * 2 * 12 + 4096, "route", &rbuf), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)o->route_workspace_bytes(N, 8), "route ws", &rws), MOE_OK);
    float *rl = (float *)rbuf;
    assert_int_equal(o->init_uniform(cx, rl, MOE_F32, N * 8, -2.0f, 2.0f, 1u, 6u), MOE_OK);
    ra.logits = rl; ra.probs = rl + N * 8; ra.expert = (int32_t *)(rl + 2 * N * 8); ra.slot = ra.expert + 2 * N;
    ra.weight = (float *)(ra.slot + 2 * N); ra.l_aux = ra.weight + 2 * N; ra.metrics = ra.l_aux + 1; ra.workspace = rws;
    BENCH("route_forward S8192 E8 top2 sampling", 10, 0.0, "-", o->route_forward(cx, &ra));
    /* dispatch of 8192 tokens of 2048 into 8 x 2048 slots, and combine */
    BENCH("dispatch_forward S8192 d2048 E8 C2048 f16", 10, 2.0 * 2.0 * (double)(N * Cm) * 2.0, "TB/s",
          o->dispatch_forward(cx, y, x, ra.expert, ra.slot, N, 8, 2048, Cm, MOE_F16));
    BENCH("combine_forward S8192 d2048 f16", 10, 3.0 * (double)(N * Cm) * 2.0, "TB/s",
          o->combine_forward(cx, att, y, ra.expert, ra.slot, ra.weight, N, 8, 2048, Cm, MOE_F16));
    /* Adam over 16M fp16 parameters with fp16 moments (one expert's FFN is 33.5M) */
    const int64_t np = 16 << 20;
    moe_adam_args aa;
    memset(&aa, 0, sizeof aa);
    aa.n = np; aa.param = y; aa.param_dtype = MOE_F16; aa.grad = aux; aa.grad_dtype = MOE_F16;
    aa.exp_avg = logits; aa.exp_avg_sq = (char *)logits + np * 2; aa.state_dtype = MOE_F16;
    aa.scale_avg = (float *)st; aa.scale_avg_sq = (float *)st + 1;
    aa.lr = 1e-4f; aa.beta1 = 0.9f; aa.beta2 = 0.98f; aa.eps = 1e-8f; aa.grad_scale = 1.0f; aa.step = 1;
    assert_int_equal(o->fill(cx, st, MOE_F32, 2, 1.0f), MOE_OK);
    BENCH("adam_step 16M f16 params, f16 moments", 10, (double)np * 2.0 * (3.0 + 3.0 + 2.0), "TB/s",
          o->adam_step(cx, &aa));
    /* --bf16's case: 64M fp32 master params with a bf16 copy, bf16 grads, fp32 moments
     * (read p, g, m, v; write p, copy, m, v: 28 bytes a parameter) */
    const int64_t nb16 = 64 << 20;
    memset(&aa, 0, sizeof aa);
    aa.n = nb16; aa.param = logits; aa.param_dtype = MOE_F32; aa.param_copy = y; aa.copy_dtype = MOE_BF16;
    aa.grad = aux; aa.grad_dtype = MOE_BF16; aa.exp_avg = (char *)logits + nb16 * 4;
    aa.exp_avg_sq = (char *)logits + 2 * nb16 * 4; aa.state_dtype = MOE_F32;
    aa.lr = 1e-4f; aa.beta1 = 0.9f; aa.beta2 = 0.98f; aa.eps = 1e-8f; aa.grad_scale = 1.0f; aa.step = 1;
    assert_int_equal(o->init_uniform(cx, logits, MOE_F32, nb16, -1.0f, 1.0f, 1u, 7u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, aa.exp_avg, MOE_F32, nb16, -1e-3f, 1e-3f, 1u, 8u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, aa.exp_avg_sq, MOE_F32, nb16, 0.0f, 1e-6f, 1u, 9u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, aux, MOE_BF16, nb16, -1e-2f, 1e-2f, 1u, 10u), MOE_OK);
    BENCH("adam_step 64M f32+bf16 copy, bf16 grad, f32 moments", 10, (double)nb16 * 28.0, "TB/s",
          o->adam_step(cx, &aa));
    void *bufs[] = {x, w, y, aux, bias, qkv, att, dqkv, lse, logits, loss, tg, st, rbuf, rws};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        be->free(cx, bufs[i]);
}

/* ------------------------------------------------------------- main */

static int group_setup(void **state)
{
    (void)state;
    if (g_cpu.be->create(&g_host, -1, &g_cpu.ctx) != MOE_OK || g_gpu.be->create(&g_host, -1, &g_gpu.ctx) != MOE_OK) {
        fprintf(stderr, "creating the backends failed: %s\n", moe_test_last_error());
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    g_gpu.be->destroy(g_gpu.ctx);
    g_cpu.be->destroy(g_cpu.ctx);
    printf("PARITY summary: %d failing comparison(s)\n", g_total_fails);
    return 0;
}

int main(void)
{
    moe_test_host_init(&g_host);
    g_rng = moe_test_rng_make(20261129);
    if (load_backend(&g_cpu) != 0 || load_backend(&g_gpu) != 0)
        return 1;
    if (!g_gpu.be->available()) {
        printf("SKIP: no CUDA device visible\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity_elementwise),   cmocka_unit_test(test_parity_matmul),
        cmocka_unit_test(test_parity_layernorm),     cmocka_unit_test(test_parity_embedding),
        cmocka_unit_test(test_parity_cross_entropy), cmocka_unit_test(test_parity_attention),
        cmocka_unit_test(test_parity_route),         cmocka_unit_test(test_parity_dispatch_combine),
        cmocka_unit_test(test_parity_optim),         cmocka_unit_test(test_parity_memory_and_copies),
        cmocka_unit_test(test_parity_determinism),
    };
    const char *bench = getenv("MOE_PARITY_BENCH");
    if (bench != NULL && bench[0] == '1') {
        const struct CMUnitTest timing[] = {cmocka_unit_test(test_parity_bench)};
        return cmocka_run_group_tests(timing, group_setup, group_teardown);
    }
    /* MOE_PARITY_FILTER=test_parity_attention runs the matching cases only */
    const char *filter = getenv("MOE_PARITY_FILTER");
    if (filter != NULL && filter[0] != '\0')
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
