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
 * message, copies, determinism (bit-identical repeats of the reductions and
 * of attention backward), and graph recording (a replay equals the eager
 * run; the cpu has no graphs).
 *
 * Without a visible GPU the program prints "SKIP: no CUDA device visible"
 * and exits 77, which CTest reports as skipped. Every comparison prints one
 * "PARITY" line (op, dtype, error, tolerance, verdict); MOE_PARITY_FILTER
 * (a cmocka test-name pattern) runs a subset, e.g. under compute-sanitizer;
 * MOE_PARITY_BENCH=1 instead times the hot ops at the reference model's
 * sizes (printed "BENCH" lines, no verdict), the decoding ops at batch 1
 * and 8 among them; MOE_PARITY_BENCH_OPS=NAME keeps the ops whose name
 * holds NAME.
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
        /* one element past 16-byte alignment: the element-wise path */
        pb_poison(&out, dt, n);
#define ADDO(o, cx, s)                                                                                        \
    (o)->add((cx), (char *)out.s + moe_dtype_size(dt), (char *)x.s + moe_dtype_size(dt),                  \
             (char *)y.s + moe_dtype_size(dt), dt, (int64_t)n - 1)
        BOTH("add unaligned", ADDO);
        {
            const pbuf past = {(char *)out.c + moe_dtype_size(dt), (char *)out.g + moe_dtype_size(dt),
                               out.bytes - moe_dtype_size(dt)};
            compare("add unaligned", &past, dt, n - 1, tol);
        }
#undef ADDO

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
            /* arrays one element past 16-byte alignment: the element-wise path */
            pb_poison(&out, dt, n);
#define ACTBO(o, cx, s)                                                                                      \
    (o)->act_backward((cx), (char *)out.s + moe_dtype_size(dt), (char *)x.s + moe_dtype_size(dt),       \
                      (char *)dout.s + moe_dtype_size(dt), (int64_t)n - 1, dt, ak)
            BOTH("act_backward unaligned", ACTBO);
            snprintf(what, sizeof what, "act_backward %s unaligned", act_name(ak));
            const pbuf past = {(char *)out.c + moe_dtype_size(dt), (char *)out.g + moe_dtype_size(dt),
                               out.bytes - moe_dtype_size(dt)};
            compare(what, &past, dt, n - 1, tol);
#undef ACTBO
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
        /* 16-byte vectors with a tail, and an unaligned start (the scalar path) */
#define SUMSQ_AT(o, cx, s, off, cnt) \
    (o)->sumsq((cx), (float *)acc.s, (char *)big.s + (off) * moe_dtype_size(dt), dt, (int64_t)(cnt))
#define SUMSQ_TAIL(o, cx, s) SUMSQ_AT(o, cx, s, 0, nsq - 3)
#define SUMSQ_ODD(o, cx, s) SUMSQ_AT(o, cx, s, 1, nsq - 9)
        BOTH("sumsq", SUMSQ_TAIL);
        compare("sumsq n % 8 != 0", &acc, MOE_F32, 1, TOL32);
        BOTH("sumsq", SUMSQ_ODD);
        compare("sumsq unaligned start", &acc, MOE_F32, 1, TOL32);
#undef SUMSQ_ODD
#undef SUMSQ_TAIL
#undef SUMSQ_AT
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

    /* bias_backward accumulates column sums: C 70 by element, 264 and 2048 by
     * 16-byte vectors (264: a last column block of one vector, 8 row chunks) */
    const int64_t bb_shapes[3][2] = {{150, 70}, {1000, 264}, {300, 2048}};
    for (int t = 0; t < 9; t++) {
        const moe_dtype dt = k_dtypes[t % 3];
        const int64_t N = bb_shapes[t / 3][0], C = bb_shapes[t / 3][1];
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
    /* N, C; off 1: every row one element past 16-byte alignment; mode 0:
     * weight, bias, dinp, dweight and dbias; 1: no weight, bias, dweight or
     * dbias; 2: no dinp; alias: backward's dinp is the dout buffer. N is
     * not a multiple of the vector kernel's rows a chunk. */
    static const struct {
        int64_t N, C, off;
        int mode, alias;
    } shapes[] = {
        {33, 70, 0, 0, 0},     /* C % 4 != 0: the per-element kernels */
        {33, 70, 0, 0, 1},     /* the same, dinp is dout */
        {9, 300, 0, 0, 0},     /* fp32 vector kernels (C % 4 == 0), 16-bit per element */
        {1001, 2048, 0, 0, 0}, /* vector kernels, chunks of several rows, a shorter last one */
        {601, 1024, 0, 0, 1},  /* the same, dinp is dout */
        {301, 1024, 0, 1, 0},  /* vector kernels without parameters */
        {301, 1024, 0, 2, 0},  /* vector kernel, parameter gradients only */
        {7, 4096, 0, 0, 0},    /* the widest 16-bit vector rows; fp32 per element */
        {40, 2048, 1, 0, 0},   /* rows off 16-byte alignment: per element */
    };
    char what[96];
    for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++) {
        const int64_t N = shapes[sh].N, C = shapes[sh].C, off = shapes[sh].off;
        const int mode = shapes[sh].mode, alias = shapes[sh].alias;
        const size_t n = (size_t)(N * C + off);
        for (int t = 0; t < 3; t++) {
            const moe_dtype dt = k_dtypes[t];
            const double tol = tol_of(dt);
            const size_t o = (size_t)off * moe_dtype_size(dt);
            pbuf x = pb_rand(dt, n, -2.0f, 3.0f), w = pb_rand(dt, (size_t)C, 0.5f, 1.5f),
                 b = pb_rand(dt, (size_t)C, -0.5f, 0.5f);
            pbuf out = pb_nan(dt, n), mean = pb_nan(MOE_F32, (size_t)N), rstd = pb_nan(MOE_F32, (size_t)N);
            pbuf out_v = {(char *)out.c + o, (char *)out.g + o, out.bytes - o};
#define LNF(o_, cx, s)                                                                                              \
    (o_)->layernorm_forward((cx), (char *)out.s + o, (float *)mean.s, (float *)rstd.s, (char *)x.s + o,             \
                            mode != 1 ? w.s : NULL, mode != 1 ? b.s : NULL, N, C, 1e-5f, dt)
            BOTH("layernorm_forward", LNF);
#undef LNF
            snprintf(what, sizeof what, "layernorm_forward %lldx%lld%s out", (long long)N, (long long)C,
                     off ? " unaligned" : "");
            compare(what, &out_v, dt, (size_t)(N * C), tol);
            compare("layernorm_forward mean", &mean, MOE_F32, (size_t)N, TOL32);
            compare("layernorm_forward rstd", &rstd, MOE_F32, (size_t)N, TOL32);
            pb_sync_from_cpu(&mean, (size_t)N * 4);
            pb_sync_from_cpu(&rstd, (size_t)N * 4);
            pbuf dout = pb_rand(dt, n, -1.0f, 1.0f), dx = pb_rand(dt, n, -1.0f, 1.0f);
            pbuf dw = pb_rand(dt, (size_t)C, -1.0f, 1.0f), db = pb_rand(dt, (size_t)C, -1.0f, 1.0f);
            pbuf *dinp = alias ? &dout : &dx;
            pbuf dinp_v = {(char *)dinp->c + o, (char *)dinp->g + o, dinp->bytes - o};
#define LNB(o_, cx, s)                                                                                              \
    (o_)->layernorm_backward((cx), mode != 2 ? (char *)dinp->s + o : NULL, mode != 1 ? dw.s : NULL,                 \
                             mode != 1 ? db.s : NULL, (char *)dout.s + o, (char *)x.s + o, mode != 1 ? w.s : NULL, \
                             (const float *)mean.s, (const float *)rstd.s, N, C, dt)
            BOTH("layernorm_backward", LNB);
#undef LNB
            snprintf(what, sizeof what, "layernorm_backward %lldx%lld%s%s dinp (+=)", (long long)N, (long long)C,
                     off ? " unaligned" : "", alias ? " in dout" : "");
            compare(what, &dinp_v, dt, (size_t)(N * C), tol);
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
    /* N, V; off 1: every row one element past 16-byte alignment */
    static const struct {
        int64_t N, V, off;
    } shapes[] = {
        {17, 1000, 0},  /* rows in registers, one vector a thread */
        {17, 1001, 0},  /* V % 4 != 0: read twice, per element */
        {9, 1000, 1},   /* rows off 16-byte alignment: per element */
        {5, 50000, 0},  /* the reference vocabulary: 16-bit in registers (8 vectors a thread), fp32 read twice */
        {3, 32768, 0},  /* blocks of 1024 threads, 16-bit 4 vectors a thread, fp32 8 */
    };
    const int ignore = 1;
    char what[96];
    for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++) {
        const int64_t N = shapes[sh].N, V = shapes[sh].V, off = shapes[sh].off;
        int32_t tg[17];
        for (int i = 0; i < N; i++)
            tg[i] = i % 5 == 2 ? ignore : (int32_t)moe_test_rng_int(&g_rng, 2, V);
        tg[0] = (int32_t)(V - 1); /* the row's last element */
        pbuf targets = pb_alloc(sizeof tg);
        pb_upload(&targets, tg, sizeof tg);
        for (int t = 0; t < 3; t++) {
            const moe_dtype dt = k_dtypes[t];
            const size_t o = (size_t)off * moe_dtype_size(dt);
            for (int with_grad = 0; with_grad < 2; with_grad++) {
                float gs = with_grad ? 2.0f : 0.0f;
                pbuf logits = pb_rand(dt, (size_t)(N * V + off), -4.0f, 4.0f), losses = pb_nan(MOE_F32, (size_t)N);
                pbuf logits_v = {(char *)logits.c + o, (char *)logits.g + o, logits.bytes - o};
#define CE(o_, cx, s)                                                                                          \
    (o_)->cross_entropy((cx), (float *)losses.s, (char *)logits.s + o, (const int32_t *)targets.s, N, V, ignore, \
                        gs, dt)
                BOTH("cross_entropy", CE);
#undef CE
                snprintf(what, sizeof what, "cross_entropy %lldx%lld%s losses%s", (long long)N, (long long)V,
                         off ? " unaligned" : "", with_grad ? "" : " (no grad)");
                compare(what, &losses, MOE_F32, (size_t)N, TOL32);
                compare(with_grad ? "cross_entropy dlogits (in place)" : "cross_entropy logits untouched", &logits_v,
                        dt, (size_t)(N * V), tol_of(dt));
                pb_free(&logits);
                pb_free(&losses);
            }
        }
        pb_free(&targets);
    }
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
        /* T % 8 == 0 with dropout: one Philox evaluation per group of eight keys (132: score by score) */
        {MOE_BF16, 2, 132, 2, 64, 0.1f}, {MOE_BF16, 2, 136, 2, 64, 0.1f}, {MOE_F16, 1, 96, 3, 32, 0.2f}, {MOE_BF16, 1, 64, 1, 128, 0.3f},
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

/* The general top-k router (moe_route_args.topk = 1) at production sizes:
 * 8,192 tokens over 8 and 64 experts, softmax and sigmoid, group-limited
 * with a selection bias, per-sequence loss (4 sequences of 2,048), z-loss,
 * pads; capacity k * ceil(S / E), so choices are dropped. Forward on both
 * backends, then backward from the cpu's routing on both. */
typedef struct topk_pcase {
    int E, k;
    moe_route_score score;
    int renormalize, groups, bias, with_pad;
    float z;
    moe_route_aux aux;
} topk_pcase;

static void test_parity_route_topk(void **state)
{
    (void)state;
    begin_case();
    const int64_t S = 8192;
    const topk_pcase cases[] = {
        {8, 2, MOE_SCORE_SOFTMAX, 1, 0, 0, 0, 0.0f, MOE_AUX_BATCH},
        {8, 1, MOE_SCORE_SOFTMAX, 0, 0, 0, 1, 1e-3f, MOE_AUX_SEQ},
        {8, 3, MOE_SCORE_SIGMOID, 1, 0, 1, 0, 0.0f, MOE_AUX_BATCH},
        {64, 8, MOE_SCORE_SIGMOID, 1, 1, 1, 0, 1e-3f, MOE_AUX_SEQ},
        {64, 6, MOE_SCORE_SOFTMAX, 1, 0, 0, 1, 1e-2f, MOE_AUX_BATCH},
        {64, 4, MOE_SCORE_SOFTMAX, 0, 1, 0, 0, 0.0f, MOE_AUX_NONE},
    };
    char what[160];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const topk_pcase *tc = &cases[i];
        const int E = tc->E, W = tc->k > 2 ? tc->k : 2;
        const size_t SE = (size_t)(S * E), SW = (size_t)(S * W);
        char tag[96];
        snprintf(tag, sizeof tag, "top%d E%d %s%s%s%s%s %s", tc->k, E,
                 tc->score == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax", tc->renormalize ? " renorm" : "",
                 tc->groups ? " groups" : "", tc->bias ? " bias" : "", tc->with_pad ? " pad" : "",
                 tc->aux == MOE_AUX_SEQ ? "seq" : tc->aux == MOE_AUX_BATCH ? "batch" : "no-aux");
        pbuf logits = pb_rand(MOE_F32, SE, -2.0f, 2.0f), bias = pb_rand(MOE_F32, (size_t)E, -0.1f, 0.1f);
        pbuf probs = pb_nan(MOE_F32, SE), expert = pb_nan(MOE_I32, SW), slot = pb_nan(MOE_I32, SW);
        pbuf weight = pb_nan(MOE_F32, SW), l_aux = pb_nan(MOE_F32, 1), metrics = pb_nan(MOE_F32, MOE_NUM_METRICS);
        pbuf gm = pb_nan(MOE_F32, MOE_NUM_GATE_METRICS), load = pb_alloc((size_t)E * 4), pad = pb_alloc((size_t)S);
        float *ones = malloc((size_t)E * 4);
        uint8_t *pads = malloc((size_t)S);
        assert_non_null(ones);
        assert_non_null(pads);
        for (int e = 0; e < E; e++)
            ones[e] = 1.0f; /* loads accumulate onto what is there */
        for (int64_t s = 0; s < S; s++)
            pads[s] = tc->with_pad && s % 7 == 5;
        pb_upload(&load, ones, (size_t)E * 4);
        pb_upload(&pad, pads, (size_t)S);
        free(ones);
        free(pads);
        pbuf ws;
        int64_t wc = g_cpu.ops->route_workspace_bytes(S, E), wg = g_gpu.ops->route_workspace_bytes(S, E);
        assert_true(wc >= 0 && wg > 0);
        ws = pb_alloc((size_t)(wc > wg ? wc : wg));
        moe_route_args a;
        memset(&a, 0, sizeof a);
        a.topk = 1;
        a.S = S;
        a.E = E;
        a.k = tc->k;
        a.width = W;
        a.capacity = (int64_t)tc->k * ((S + E - 1) / E);
        a.score = tc->score;
        a.renormalize = tc->renormalize;
        a.z_loss_coeff = tc->z;
        a.aux = tc->aux;
        a.seq_len = 2048;
        a.num_groups = tc->groups ? 8 : 0;
        a.group_topk = tc->groups ? 4 : 0;
        moe_route_args ac = a, ag = a;
#define TOPK_PTRS(dst, x)                                              \
    do {                                                               \
        (dst).logits = (const float *)logits.x;                        \
        (dst).pad = tc->with_pad ? (const uint8_t *)pad.x : NULL;      \
        (dst).expert_bias = tc->bias ? (const float *)bias.x : NULL;   \
        (dst).probs = (float *)probs.x;                                \
        (dst).expert = (int32_t *)expert.x;                            \
        (dst).slot = (int32_t *)slot.x;                                \
        (dst).weight = (float *)weight.x;                              \
        (dst).l_aux = (float *)l_aux.x;                                \
        (dst).metrics = (float *)metrics.x;                            \
        (dst).gate_metrics = (float *)gm.x;                            \
        (dst).expert_load = (float *)load.x;                           \
        (dst).workspace = ws.x;                                        \
    } while (0)
        TOPK_PTRS(ac, c);
        TOPK_PTRS(ag, g);
#undef TOPK_PTRS
        check_ok("route_forward top-k", g_cpu.ops->route_forward(g_cpu.ctx, &ac),
                 g_gpu.ops->route_forward(g_gpu.ctx, &ag));
#define CMP(name, buf, dt, n, tol)                                     \
    do {                                                               \
        snprintf(what, sizeof what, "route_forward %s %s", name, tag); \
        compare(what, &(buf), dt, n, tol);                             \
    } while (0)
        CMP("probs", probs, MOE_F32, SE, TOL32);
        CMP("expert", expert, MOE_I32, SW, 0.0);
        CMP("slot", slot, MOE_I32, SW, 0.0);
        CMP("weight", weight, MOE_F32, SW, TOL32);
        CMP("l_aux", l_aux, MOE_F32, 1, TOL32);
        CMP("metrics", metrics, MOE_F32, MOE_NUM_METRICS, TOL32);
        CMP("z_loss", gm, MOE_F32, MOE_NUM_GATE_METRICS, TOL32);
        CMP("expert_load", load, MOE_F32, (size_t)E, 0.0);
#undef CMP

        pb_sync_from_cpu(&probs, SE * 4);
        pb_sync_from_cpu(&expert, SW * 4);
        pb_sync_from_cpu(&slot, SW * 4);
        pb_sync_from_cpu(&weight, SW * 4);
        pbuf dweight = pb_rand(MOE_F32, SW, -1.0f, 1.0f), dlogits = pb_nan(MOE_F32, SE);
        check_ok("route_backward top-k",
                 g_cpu.ops->route_backward(g_cpu.ctx, &ac, (const float *)dweight.c, 0.7f, (float *)dlogits.c),
                 g_gpu.ops->route_backward(g_gpu.ctx, &ag, (const float *)dweight.g, 0.7f, (float *)dlogits.g));
        snprintf(what, sizeof what, "route_backward dlogits %s", tag);
        compare(what, &dlogits, MOE_F32, SE, TOL32);
        pb_free(&dweight);
        pb_free(&dlogits);
        pb_free(&logits); pb_free(&bias); pb_free(&probs); pb_free(&expert); pb_free(&slot); pb_free(&weight);
        pb_free(&l_aux); pb_free(&metrics); pb_free(&gm); pb_free(&load); pb_free(&pad); pb_free(&ws);
    }
    end_case();
}

/* Expert-choice routing (moe_route_args.expert_choice = 1) at production
 * sizes: 8,192 tokens over 8 and 64 experts, capacity ceil(f * S / E) for
 * f = 2 and 1, with and without pads. Forward on both backends; backward,
 * dispatch and combine over the E columns from the cpu's routing on both. */
static void test_parity_route_expert_choice(void **state)
{
    (void)state;
    begin_case();
    const int64_t S = 8192, d = 16;
    const struct {
        int E;
        double factor;
        int with_pad;
    } cases[] = {{8, 2.0, 0}, {8, 1.0, 1}, {64, 2.0, 1}, {64, 1.0, 0}};
    char what[160];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int E = cases[i].E;
        const int64_t C = (int64_t)ceil(cases[i].factor * (double)S / (double)E);
        const size_t SE = (size_t)(S * E), rows = (size_t)(E * C);
        char tag[64];
        snprintf(tag, sizeof tag, "expert choice E%d C%lld%s", E, (long long)C, cases[i].with_pad ? " pad" : "");
        pbuf logits = pb_rand(MOE_F32, SE, -2.0f, 2.0f), probs = pb_nan(MOE_F32, SE);
        pbuf expert = pb_nan(MOE_I32, SE), slot = pb_nan(MOE_I32, SE), weight = pb_nan(MOE_F32, SE);
        pbuf l_aux = pb_nan(MOE_F32, 1), metrics = pb_nan(MOE_F32, MOE_NUM_METRICS), pad = pb_alloc((size_t)S);
        uint8_t *pads = malloc((size_t)S);
        assert_non_null(pads);
        for (int64_t s = 0; s < S; s++)
            pads[s] = cases[i].with_pad && s % 5 == 3;
        pb_upload(&pad, pads, (size_t)S);
        free(pads);
        int64_t wc = g_cpu.ops->route_workspace_bytes(S, E), wg = g_gpu.ops->route_workspace_bytes(S, E);
        assert_true(wc >= 0 && wg > 0);
        pbuf ws = pb_alloc((size_t)(wc > wg ? wc : wg));
        moe_route_args a;
        memset(&a, 0, sizeof a);
        a.expert_choice = 1;
        a.S = S;
        a.E = E;
        a.k = 1;
        a.width = E;
        a.capacity = C;
        moe_route_args ac = a, ag = a;
#define EC_PTRS(dst, x)                                                \
    do {                                                               \
        (dst).logits = (const float *)logits.x;                        \
        (dst).pad = cases[i].with_pad ? (const uint8_t *)pad.x : NULL; \
        (dst).probs = (float *)probs.x;                                \
        (dst).expert = (int32_t *)expert.x;                            \
        (dst).slot = (int32_t *)slot.x;                                \
        (dst).weight = (float *)weight.x;                              \
        (dst).l_aux = (float *)l_aux.x;                                \
        (dst).metrics = (float *)metrics.x;                            \
        (dst).workspace = ws.x;                                        \
    } while (0)
        EC_PTRS(ac, c);
        EC_PTRS(ag, g);
#undef EC_PTRS
        check_ok("route_forward expert choice", g_cpu.ops->route_forward(g_cpu.ctx, &ac),
                 g_gpu.ops->route_forward(g_gpu.ctx, &ag));
#define CMP(name, buf, dt, n, tol)                                     \
    do {                                                               \
        snprintf(what, sizeof what, "%s %s", name, tag);               \
        compare(what, &(buf), dt, n, tol);                             \
    } while (0)
        CMP("route_forward probs", probs, MOE_F32, SE, TOL32);
        CMP("route_forward expert", expert, MOE_I32, SE, 0.0);
        CMP("route_forward slot", slot, MOE_I32, SE, 0.0);
        CMP("route_forward weight", weight, MOE_F32, SE, TOL32);
        CMP("route_forward l_aux", l_aux, MOE_F32, 1, TOL32);
        CMP("route_forward metrics", metrics, MOE_F32, MOE_NUM_METRICS, TOL32);

        pb_sync_from_cpu(&probs, SE * 4);
        pb_sync_from_cpu(&expert, SE * 4);
        pb_sync_from_cpu(&slot, SE * 4);
        pb_sync_from_cpu(&weight, SE * 4);
        pbuf dweight = pb_rand(MOE_F32, SE, -1.0f, 1.0f), dlogits = pb_nan(MOE_F32, SE);
        check_ok("route_backward expert choice",
                 g_cpu.ops->route_backward(g_cpu.ctx, &ac, (const float *)dweight.c, 0.7f, (float *)dlogits.c),
                 g_gpu.ops->route_backward(g_gpu.ctx, &ag, (const float *)dweight.g, 0.7f, (float *)dlogits.g));
        CMP("route_backward dlogits", dlogits, MOE_F32, SE, TOL32);

        /* the E columns through dispatch and combine */
        pbuf x = pb_rand(MOE_F32, (size_t)(S * d), -1.0f, 1.0f), out = pb_nan(MOE_F32, rows * (size_t)d);
#define EXP(s) ((const int32_t *)expert.s)
#define SLT(s) ((const int32_t *)slot.s)
#define DF(o, cx, s) (o)->dispatch_wide_forward((cx), out.s, x.s, EXP(s), SLT(s), S, E, E, C, d, MOE_F32)
        BOTH("dispatch_wide_forward", DF);
#undef DF
        CMP("dispatch_wide_forward", out, MOE_F32, rows * (size_t)d, TOL32);
        pbuf dout = pb_rand(MOE_F32, rows * (size_t)d, -1.0f, 1.0f), dx = pb_rand(MOE_F32, (size_t)(S * d), -1.0f, 1.0f);
#define DB(o, cx, s) (o)->dispatch_wide_backward((cx), dx.s, dout.s, EXP(s), SLT(s), S, E, E, C, d, MOE_F32)
        BOTH("dispatch_wide_backward", DB);
#undef DB
        CMP("dispatch_wide_backward", dx, MOE_F32, (size_t)(S * d), TOL32);
        pbuf y = pb_nan(MOE_F32, (size_t)(S * d));
#define CF(o, cx, s)                                                                                               \
    (o)->combine_wide_forward((cx), y.s, dout.s, EXP(s), SLT(s), (const float *)weight.s, S, E, E, C, d, MOE_F32)
        BOTH("combine_wide_forward", CF);
#undef CF
        CMP("combine_wide_forward", y, MOE_F32, (size_t)(S * d), TOL32);
        pbuf deout = pb_nan(MOE_F32, rows * (size_t)d), dw = pb_nan(MOE_F32, SE);
#define CB(o, cx, s)                                                                                               \
    (o)->combine_wide_backward((cx), deout.s, (float *)dw.s, x.s, dout.s, EXP(s), SLT(s), (const float *)weight.s, S, \
                               E, E, C, d, MOE_F32)
        BOTH("combine_wide_backward", CB);
#undef CB
#undef EXP
#undef SLT
        CMP("combine_wide_backward deout", deout, MOE_F32, rows * (size_t)d, TOL32);
        CMP("combine_wide_backward dweight", dw, MOE_F32, SE, TOL32);
#undef CMP
        pb_free(&x); pb_free(&out); pb_free(&dout); pb_free(&dx); pb_free(&y); pb_free(&deout); pb_free(&dw);
        pb_free(&dweight); pb_free(&dlogits);
        pb_free(&logits); pb_free(&probs); pb_free(&expert); pb_free(&slot); pb_free(&weight);
        pb_free(&l_aux); pb_free(&metrics); pb_free(&pad); pb_free(&ws);
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

/* Dispatch and combine over W = k choices per token (the *_wide_* ops) at
 * production sizes: 8,192 tokens routed by the cpu's top-k router to k = 4
 * and 8 of 64 experts at capacity k * ceil(S / E), so some choices drop. */
/* ------------------------------------------- grouped expert products */

/* grouped_matmul: G groups, each with its own operands (one buffer, groups
 * at a stride) and a count of rows on the device: none, all, and partial
 * ones, so the tiles past a count, the bound and a group with no rows are
 * all crossed (a count past the bound is cut to it). Rows a count leaves
 * out stay NaN on both sides. */
typedef struct gm_case {
    int ta, tb;
    int64_t G, m, n, k;
    float alpha, beta;
    moe_epilogue epi;
    moe_act_kind act;
    int dbias;
    moe_dtype dt;
} gm_case;

static void run_grouped_case(const gm_case *tc)
{
    const moe_dtype dt = tc->dt;
    const int64_t G = tc->G, m = tc->m, n = tc->n, k = tc->k, V = tc->ta ? k : m;
    const size_t sa = (size_t)(m * k), sb = (size_t)(k * n), sc = (size_t)(m * n), es = moe_dtype_size(dt);
    int32_t *rows = malloc((size_t)G * sizeof *rows);
    assert_non_null(rows);
    int64_t total = 0;
    for (int64_t g = 0; g < G; g++) {
        const int64_t kind = g % 4;
        rows[g] = (int32_t)(kind == 0 ? 0 : kind == 1 ? V + 7 : kind == 2 ? V / 3 + 1 : moe_test_rng_int(&g_rng, 1, V));
        total += rows[g];
    }
    pbuf rb = pb_alloc((size_t)G * sizeof *rows);
    pb_upload(&rb, rows, (size_t)G * sizeof *rows);
    pbuf A = pb_rand(dt, (size_t)G * sa, -1.0f, 1.0f), B = pb_rand(dt, (size_t)G * sb, -1.0f, 1.0f);
    pbuf C = tc->beta != 0.0f ? pb_rand(dt, (size_t)G * sc, -1.0f, 1.0f) : pb_nan(dt, (size_t)G * sc);
    pbuf bias = pb_rand(dt, (size_t)(G * n), -0.5f, 0.5f);
    pbuf aux = tc->epi == MOE_EPI_DACT ? pb_rand(dt, (size_t)G * sc, -3.0f, 3.0f) : pb_nan(dt, (size_t)G * sc);
    pbuf db = pb_rand(dt, (size_t)(G * m), -0.5f, 0.5f);
    const void *pa[2][64], *pbv[2][64], *pbias[2][64];
    void *pc[2][64], *paux[2][64], *pdb[2][64];
    assert_true(G <= 64);
    for (int side = 0; side < 2; side++)
        for (int64_t g = 0; g < G; g++) {
#define AT(buf, off) ((char *)(side == 0 ? (buf).c : (buf).g) + (size_t)(off) * es)
            pa[side][g] = AT(A, (size_t)g * sa);
            pbv[side][g] = AT(B, (size_t)g * sb);
            pc[side][g] = AT(C, (size_t)g * sc);
            pbias[side][g] = AT(bias, g * n);
            paux[side][g] = AT(aux, (size_t)g * sc);
            pdb[side][g] = AT(db, g * m);
#undef AT
        }
    moe_grouped_matmul_args ga[2];
    for (int side = 0; side < 2; side++) {
        moe_grouped_matmul_args *a = &ga[side];
        memset(a, 0, sizeof *a);
        a->trans_a = tc->ta;
        a->trans_b = tc->tb;
        a->groups = G;
        a->rows = side == 0 ? rb.c : rb.g;
        a->rows_total = tc->ta ? 0 : total;
        a->m = m;
        a->n = n;
        a->k = k;
        a->alpha = tc->alpha;
        a->beta = tc->beta;
        a->a = pa[side];
        a->lda = tc->ta ? m : k;
        a->b = pbv[side];
        a->ldb = tc->tb ? k : n;
        a->c = pc[side];
        a->ldc = n;
        a->dtype = dt;
        a->epilogue = tc->epi;
        a->bias = tc->epi != MOE_EPI_NONE ? pbias[side] : NULL;
        a->aux = tc->epi == MOE_EPI_BIAS_ACT || tc->epi == MOE_EPI_DACT ? paux[side] : NULL;
        a->act = tc->act;
        a->dbias = tc->dbias ? pdb[side] : NULL;
    }
    char what[128];
    snprintf(what, sizeof what, "grouped_matmul %c%c G%lld m%lld n%lld k%lld%s%s", tc->ta ? 'T' : 'N',
             tc->tb ? 'T' : 'N', (long long)G, (long long)m, (long long)n, (long long)k,
             tc->epi == MOE_EPI_BIAS_ACT ? " bias+act"
             : tc->epi == MOE_EPI_BIAS  ? " bias"
             : tc->epi == MOE_EPI_DACT  ? " dact"
                                        : "",
             tc->dbias ? " dbias" : "");
    moe_status s0 = g_cpu.ops->grouped_matmul(g_cpu.ctx, &ga[0]);
    moe_status s1 = g_gpu.ops->grouped_matmul(g_gpu.ctx, &ga[1]);
    check_ok(what, s0, s1);
    compare(what, &C, dt, (size_t)G * sc, tol_of(dt));
    if (tc->epi == MOE_EPI_BIAS_ACT) {
        snprintf(what + strlen(what), sizeof what - strlen(what), " aux");
        compare(what, &aux, dt, (size_t)G * sc, tol_of(dt));
    }
    if (tc->dbias) {
        snprintf(what + strlen(what), sizeof what - strlen(what), " (bias grad)");
        compare(what, &db, dt, (size_t)(G * m), tol_of(dt));
    }
    pb_free(&rb);
    pb_free(&A);
    pb_free(&B);
    pb_free(&C);
    pb_free(&bias);
    pb_free(&aux);
    pb_free(&db);
    free(rows);
}

static void test_parity_grouped(void **state)
{
    (void)state;
    begin_case();
    for (int t = 0; t < 3; t++) {
        const moe_dtype dt = k_dtypes[t];
        const gm_case cases[] = {
            /* the expert forward: fc1 with bias + activation, fc2 with bias */
            {0, 1, 5, 300, 136, 72, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_GELU_TANH, 0, dt},
            {0, 1, 6, 260, 72, 136, 1.0f, 0.0f, MOE_EPI_BIAS, MOE_ACT_GELU_TANH, 0, dt},
            {0, 1, 4, 130, 64, 40, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_RELU, 0, dt},
            /* input gradients, through the activation's backward or not */
            {0, 0, 4, 260, 72, 136, 1.0f, 0.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 0, dt},
            {0, 0, 5, 260, 136, 72, 1.0f, 0.0f, MOE_EPI_DACT, MOE_ACT_GELU_TANH, 0, dt},
            {0, 0, 4, 200, 64, 48, 1.0f, 0.0f, MOE_EPI_DACT, MOE_ACT_GELU_ERF, 0, dt},
            {0, 0, 3, 100, 40, 56, 1.0f, 0.0f, MOE_EPI_DACT, MOE_ACT_RELU, 0, dt},
            /* weight and bias gradients, accumulated and scaled */
            {1, 0, 5, 136, 72, 300, 0.5f, 1.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 1, dt},
            {1, 1, 3, 64, 40, 100, 1.0f, 1.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 0, dt},
            {1, 0, 4, 72, 136, 260, 1.0f, 0.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 1, dt},
            /* sizes the tensor-core path does not take */
            {0, 1, 3, 37, 45, 70, 1.0f, 0.0f, MOE_EPI_BIAS, MOE_ACT_GELU_TANH, 0, dt},
            {1, 0, 3, 37, 45, 70, 1.0f, 1.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 1, dt},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            run_grouped_case(&cases[i]);
    }
    /* the reference expert's shapes, scaled down: 8 experts */
    const gm_case big[] = {
        {0, 1, 8, 1024, 512, 256, 1.0f, 0.0f, MOE_EPI_BIAS_ACT, MOE_ACT_GELU_TANH, 0, MOE_BF16},
        {0, 0, 8, 1024, 512, 256, 1.0f, 0.0f, MOE_EPI_DACT, MOE_ACT_GELU_TANH, 0, MOE_BF16},
        {0, 0, 8, 1024, 256, 512, 1.0f, 0.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 0, MOE_BF16},
        {1, 0, 8, 512, 256, 1024, 0.25f, 1.0f, MOE_EPI_NONE, MOE_ACT_GELU_TANH, 1, MOE_BF16},
    };
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        run_grouped_case(&big[i]);

    /* expert_rows and grouped_matmul recorded once into a graph, replayed
     * after the routing changed: the counts are read on the device at replay
     * time (what keeps a dropless step capturable), equal to the cpu run
     * eagerly on each routing */
    {
        const int64_t Sg = 512, Cg = 160, n = 64, k = 48;
        const int Wg = 2, Eg = 4;
        const moe_dtype dt = MOE_BF16;
        const size_t es = moe_dtype_size(dt), sa = (size_t)(Cg * k), sb = (size_t)(n * k), sc = (size_t)(Cg * n);
        pbuf ex = pb_alloc((size_t)(Sg * Wg) * 4), sl = pb_alloc((size_t)(Sg * Wg) * 4), rb = pb_alloc((size_t)Eg * 4);
        pbuf A = pb_rand(dt, (size_t)Eg * sa, -1.0f, 1.0f), B = pb_rand(dt, (size_t)Eg * sb, -1.0f, 1.0f);
        pbuf bias = pb_rand(dt, (size_t)(Eg * n), -0.5f, 0.5f), C = pb_nan(dt, (size_t)Eg * sc);
        const void *pa[2][4], *pbv[2][4], *pbias[2][4];
        void *pc[2][4];
        moe_grouped_matmul_args ga[2];
        for (int side = 0; side < 2; side++) {
            for (int e = 0; e < Eg; e++) {
                pa[side][e] = (char *)(side ? A.g : A.c) + (size_t)e * sa * es;
                pbv[side][e] = (char *)(side ? B.g : B.c) + (size_t)e * sb * es;
                pbias[side][e] = (char *)(side ? bias.g : bias.c) + (size_t)(e * n) * es;
                pc[side][e] = (char *)(side ? C.g : C.c) + (size_t)e * sc * es;
            }
            moe_grouped_matmul_args *a = &ga[side];
            memset(a, 0, sizeof *a);
            a->trans_b = 1;
            a->groups = Eg;
            a->rows = side ? rb.g : rb.c;
            a->rows_total = Sg * Wg;
            a->m = Cg;
            a->n = n;
            a->k = k;
            a->alpha = 1.0f;
            a->a = pa[side];
            a->lda = k;
            a->b = pbv[side];
            a->ldb = k;
            a->c = pc[side];
            a->ldc = n;
            a->dtype = dt;
            a->epilogue = MOE_EPI_BIAS;
            a->bias = pbias[side];
        }
        void *gr = NULL;
        assert_int_equal(g_gpu.ops->graph_begin(g_gpu.ctx), MOE_OK);
        moe_status s0 = g_gpu.ops->expert_rows(g_gpu.ctx, (int32_t *)rb.g, (const int32_t *)ex.g,
                                               (const int32_t *)sl.g, Sg, Wg, Eg, Cg);
        moe_status s1 = g_gpu.ops->grouped_matmul(g_gpu.ctx, &ga[1]);
        assert_int_equal(g_gpu.ops->graph_end(g_gpu.ctx, &gr), MOE_OK);
        check_ok("grouped products recorded", s0, s1);
        int32_t *he = malloc((size_t)(Sg * Wg) * 4), *hs = malloc((size_t)(Sg * Wg) * 4);
        assert_non_null(he);
        assert_non_null(hs);
        for (int rep = 0; rep < 2; rep++) {
            const int64_t top = rep == 0 ? Cg / 5 : Cg; /* few rows filled, then up to the bound */
            for (int64_t i = 0; i < Sg * Wg; i++) {
                he[i] = (int32_t)moe_test_rng_int(&g_rng, -1, Eg);
                hs[i] = (int32_t)moe_test_rng_int(&g_rng, -1, top);
            }
            pb_upload(&ex, he, (size_t)(Sg * Wg) * 4);
            pb_upload(&sl, hs, (size_t)(Sg * Wg) * 4);
            pb_poison(&C, dt, (size_t)Eg * sc);
            moe_status c0 = g_cpu.ops->expert_rows(g_cpu.ctx, (int32_t *)rb.c, (const int32_t *)ex.c,
                                                   (const int32_t *)sl.c, Sg, Wg, Eg, Cg);
            moe_status c1 = g_cpu.ops->grouped_matmul(g_cpu.ctx, &ga[0]);
            check_ok("grouped products eager (cpu)", c0, c1);
            check_ok("grouped products replay", g_gpu.ops->graph_launch(g_gpu.ctx, gr), MOE_OK);
            compare(rep == 0 ? "grouped_matmul graph replay, routing 1" : "grouped_matmul graph replay, routing 2",
                    &C, dt, (size_t)Eg * sc, tol_of(dt));
        }
        g_gpu.ops->graph_destroy(g_gpu.ctx, gr);
        free(he);
        free(hs);
        pb_free(&ex);
        pb_free(&sl);
        pb_free(&rb);
        pb_free(&A);
        pb_free(&B);
        pb_free(&bias);
        pb_free(&C);
    }

    /* expert_rows: routing with dropped choices (-1) and slots past C */
    const int64_t S = 8192, C = 1200;
    const int W = 2, E = 16;
    int32_t *ex = malloc((size_t)(S * W) * sizeof *ex), *sl = malloc((size_t)(S * W) * sizeof *sl);
    assert_non_null(ex);
    assert_non_null(sl);
    for (int64_t i = 0; i < S * W; i++) {
        ex[i] = (int32_t)moe_test_rng_int(&g_rng, -1, E);
        sl[i] = (int32_t)moe_test_rng_int(&g_rng, -1, C + 50);
    }
    pbuf pe = pb_alloc((size_t)(S * W) * 4), ps = pb_alloc((size_t)(S * W) * 4), pr = pb_nan(MOE_I32, (size_t)E);
    pb_upload(&pe, ex, (size_t)(S * W) * 4);
    pb_upload(&ps, sl, (size_t)(S * W) * 4);
#define ER(o, cx, s) (o)->expert_rows((cx), (int32_t *)pr.s, (const int32_t *)pe.s, (const int32_t *)ps.s, S, W, E, C)
    BOTH("expert_rows", ER);
#undef ER
    compare("expert_rows", &pr, MOE_I32, (size_t)E, 0.0);
    pb_free(&pe);
    pb_free(&ps);
    pb_free(&pr);
    free(ex);
    free(sl);
    end_case();
}

static void test_parity_dispatch_combine_wide(void **state)
{
    (void)state;
    begin_case();
    const int64_t S = 8192, d = 32;
    const int E = 64, ks[] = {4, 8};
    char what[128];
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
        const int W = ks[ki];
        const int64_t Cap = (int64_t)W * ((S + E - 1) / E);
        const size_t SE = (size_t)(S * E), SW = (size_t)(S * W), rows = (size_t)(E * Cap);
        pbuf logits = pb_rand(MOE_F32, SE, -2.0f, 2.0f), probs = pb_nan(MOE_F32, SE);
        pbuf expert = pb_nan(MOE_I32, SW), slot = pb_nan(MOE_I32, SW), weight = pb_nan(MOE_F32, SW);
        pbuf l_aux = pb_nan(MOE_F32, 1), metrics = pb_nan(MOE_F32, MOE_NUM_METRICS);
        pbuf ws = pb_alloc((size_t)g_cpu.ops->route_workspace_bytes(S, E));
        moe_route_args a;
        memset(&a, 0, sizeof a);
        a.topk = 1;
        a.S = S;
        a.E = E;
        a.k = W;
        a.width = W;
        a.capacity = Cap;
        a.renormalize = 1;
        a.aux = MOE_AUX_BATCH;
        a.logits = (const float *)logits.c;
        a.probs = (float *)probs.c;
        a.expert = (int32_t *)expert.c;
        a.slot = (int32_t *)slot.c;
        a.weight = (float *)weight.c;
        a.l_aux = (float *)l_aux.c;
        a.metrics = (float *)metrics.c;
        a.workspace = ws.c;
        assert_int_equal(g_cpu.ops->route_forward(g_cpu.ctx, &a), MOE_OK);
        pb_sync_from_cpu(&expert, SW * 4);
        pb_sync_from_cpu(&slot, SW * 4);
        pb_sync_from_cpu(&weight, SW * 4);
        for (int t = 0; t < 3; t++) {
            const moe_dtype dt = k_dtypes[t];
            const double tol = tol_of(dt);
            pbuf x = pb_rand(dt, (size_t)(S * d), -1.0f, 1.0f), out = pb_nan(dt, rows * (size_t)d);
#define EXP(s) ((const int32_t *)expert.s)
#define SLT(s) ((const int32_t *)slot.s)
#define WGT(s) ((const float *)weight.s)
#define DF(o, cx, s) (o)->dispatch_wide_forward((cx), out.s, x.s, EXP(s), SLT(s), S, W, E, Cap, d, dt)
            BOTH("dispatch_wide_forward", DF);
#undef DF
            snprintf(what, sizeof what, "dispatch_wide_forward k%d E%d", W, E);
            compare(what, &out, dt, rows * (size_t)d, tol);
            pbuf dout = pb_rand(dt, rows * (size_t)d, -1.0f, 1.0f), dx = pb_rand(dt, (size_t)(S * d), -1.0f, 1.0f);
#define DB(o, cx, s) (o)->dispatch_wide_backward((cx), dx.s, dout.s, EXP(s), SLT(s), S, W, E, Cap, d, dt)
            BOTH("dispatch_wide_backward", DB);
#undef DB
            snprintf(what, sizeof what, "dispatch_wide_backward k%d E%d (accumulates)", W, E);
            compare(what, &dx, dt, (size_t)(S * d), tol);
            pbuf eout = pb_rand(dt, rows * (size_t)d, -1.0f, 1.0f), y = pb_nan(dt, (size_t)(S * d));
#define CF(o, cx, s) (o)->combine_wide_forward((cx), y.s, eout.s, EXP(s), SLT(s), WGT(s), S, W, E, Cap, d, dt)
            BOTH("combine_wide_forward", CF);
#undef CF
            snprintf(what, sizeof what, "combine_wide_forward k%d E%d", W, E);
            compare(what, &y, dt, (size_t)(S * d), tol);
            pbuf dy = pb_rand(dt, (size_t)(S * d), -1.0f, 1.0f), deout = pb_nan(dt, rows * (size_t)d);
            pbuf dw = pb_nan(MOE_F32, SW);
#define CB(o, cx, s)                                                                                              \
    (o)->combine_wide_backward((cx), deout.s, (float *)dw.s, dy.s, eout.s, EXP(s), SLT(s), WGT(s), S, W, E, Cap, d, \
                               dt)
            BOTH("combine_wide_backward", CB);
#undef CB
#undef EXP
#undef SLT
#undef WGT
            snprintf(what, sizeof what, "combine_wide_backward deout k%d E%d", W, E);
            compare(what, &deout, dt, rows * (size_t)d, tol);
            snprintf(what, sizeof what, "combine_wide_backward dweight k%d E%d", W, E);
            compare(what, &dw, MOE_F32, SW, TOL32);
            pb_free(&x); pb_free(&out); pb_free(&dout); pb_free(&dx); pb_free(&eout); pb_free(&y); pb_free(&dy);
            pb_free(&deout); pb_free(&dw);
        }
        pb_free(&logits); pb_free(&probs); pb_free(&expert); pb_free(&slot); pb_free(&weight);
        pb_free(&l_aux); pb_free(&metrics); pb_free(&ws);
    }
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

/* ----------------------------------------------------------- decoding */

/* host i32 values into a paired buffer */
static pbuf pb_ints(const int32_t *v, size_t n)
{
    pbuf b = pb_alloc(n * 4);
    pb_upload(&b, v, n * 4);
    return b;
}

static void test_parity_decode_rowlinear(void **state)
{
    (void)state;
    begin_case();
    char what[160];
    /* embedding at explicit positions, pad tokens included */
    {
        const int64_t N = 13, C = 40, V = 30;
        int32_t tok[13], pos[13];
        for (int i = 0; i < N; i++) {
            tok[i] = i % 5 == 2 ? 1 : (int32_t)moe_test_rng_int(&g_rng, 0, V);
            pos[i] = (int32_t)moe_test_rng_int(&g_rng, 2, 2050); /* as far as --tokens-per-sample 2048 reaches */
        }
        pbuf t = pb_ints(tok, (size_t)N), ps = pb_ints(pos, (size_t)N);
        for (int d = 0; d < 3; d++) {
            const moe_dtype dt = k_dtypes[d];
            pbuf table = pb_rand(dt, (size_t)(V * C), -1.0f, 1.0f), out = pb_nan(dt, (size_t)(N * C));
#define EMBAT(o, cx, s)                                                                                       \
    (o)->embedding_at_forward((cx), out.s, (const int32_t *)t.s, (const int32_t *)ps.s, table.s, N, C, 3.5f, 1, 1, dt)
            BOTH("embedding_at_forward", EMBAT);
#undef EMBAT
            compare("embedding_at_forward sinusoidal, pad rows", &out, dt, (size_t)(N * C), tol_of(dt));
            pb_free(&table);
            pb_free(&out);
        }
        pb_free(&t);
        pb_free(&ps);
    }
    /* m rows (> 8: groups), k with 16-byte loads or not, chunked k, each epilogue */
    static const struct {
        int64_t m, n, k;
        int ln, bias, q_cols, act, beta, f32out, rows;
    } cases[] = {
        {1, 37, 64, 1, 1, 0, 0, 0, 0, 0},   {3, 300, 64, 1, 1, 100, 0, 0, 0, 0}, {2, 70, 72, 0, 1, 0, 1, 0, 0, 0},
        {5, 45, 33, 1, 0, 0, 0, 1, 0, 0},   {11, 130, 48, 0, 1, 0, 0, 1, 0, 1},  {4, 257, 96, 1, 0, 0, 0, 0, 1, 1},
        {8, 40, 4096, 0, 1, 0, 0, 1, 0, 0}, {1, 600, 2048, 1, 1, 0, 1, 0, 0, 0}, {9, 33, 40, 1, 1, 0, 0, 0, 1, 0},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int64_t m = cases[ci].m, n = cases[ci].n, k = cases[ci].k, ldx = k + 8, rows_in = m + 3;
        for (int d = 0; d < 3; d++) {
            const moe_dtype dt = k_dtypes[d];
            const moe_dtype yt = cases[ci].f32out ? MOE_F32 : dt;
            pbuf x = pb_rand(dt, (size_t)(rows_in * ldx), -2.0f, 2.0f), w = pb_rand(dt, (size_t)(n * k), -0.2f, 0.2f);
            pbuf b = pb_rand(dt, (size_t)n, -0.5f, 0.5f), lw = pb_rand(dt, (size_t)k, 0.5f, 1.5f),
                 lb = pb_rand(dt, (size_t)k, -0.5f, 0.5f);
            pbuf y = cases[ci].beta ? pb_rand(yt, (size_t)(m * n), -1.0f, 1.0f) : pb_nan(yt, (size_t)(m * n));
            int32_t ridx[16];
            for (int i = 0; i < m; i++)
                ridx[i] = (int32_t)((i * 5 + 2) % rows_in);
            pbuf ri = pb_ints(ridx, (size_t)m);
            moe_rowlinear_desc dc, dg;
            memset(&dc, 0, sizeof dc);
            dc.m = m;
            dc.n = n;
            dc.k = k;
            dc.ldx = ldx;
            dc.layernorm = cases[ci].ln;
            dc.ln_eps = 1e-5f;
            dc.q_scale = 0.125f;
            dc.q_cols = cases[ci].q_cols;
            dc.act = cases[ci].act;
            dc.act_kind = cases[ci].act == 1 && ci % 2 ? MOE_ACT_RELU : MOE_ACT_GELU_TANH;
            dc.beta = cases[ci].beta ? 1.0f : 0.0f;
            dc.ldy = n;
            dc.y_dtype = yt;
            dc.dt = dt;
            dg = dc;
            dc.x = x.c; dg.x = x.g;
            dc.w = w.c; dg.w = w.g;
            dc.bias = cases[ci].bias ? b.c : NULL; dg.bias = cases[ci].bias ? b.g : NULL;
            dc.ln_weight = lw.c; dg.ln_weight = lw.g;
            dc.ln_bias = lb.c; dg.ln_bias = lb.g;
            dc.rows = cases[ci].rows ? (const int32_t *)ri.c : NULL;
            dg.rows = cases[ci].rows ? (const int32_t *)ri.g : NULL;
            dc.y = y.c; dg.y = y.g;
            check_ok("rowlinear_forward", g_cpu.ops->rowlinear_forward(g_cpu.ctx, &dc),
                     g_gpu.ops->rowlinear_forward(g_gpu.ctx, &dg));
            snprintf(what, sizeof what, "rowlinear m%lld n%lld k%lld%s%s%s%s%s%s%s", (long long)m, (long long)n,
                     (long long)k, cases[ci].ln ? " ln" : "", cases[ci].bias ? " bias" : "",
                     cases[ci].q_cols ? " q" : "", cases[ci].act ? " act" : "", cases[ci].beta ? " +y" : "",
                     cases[ci].f32out ? " ->f32" : "", cases[ci].rows ? " rows" : "");
            /* the inputs are rounded to dt after the LayerNorm: dt's tolerance even for fp32 outputs */
            compare(what, &y, yt, (size_t)(m * n), tol_of(dt));
            pb_free(&x); pb_free(&w); pb_free(&b); pb_free(&lw); pb_free(&lb); pb_free(&y); pb_free(&ri);
        }
    }
    end_case();
}

static void test_parity_decode_attention(void **state)
{
    (void)state;
    begin_case();
    char what[128];
    static const struct {
        int64_t B, n, H, D, Tc;
        int32_t clen[3], nnew[3];
    } cases[] = {
        {3, 1, 2, 64, 40, {5, 0, 17}, {1, 1, 0}},  {3, 4, 2, 64, 40, {0, 9, 30}, {4, 2, 3}},
        {2, 3, 3, 24, 20, {6, 1, 0}, {3, 1, 0}},   {1, 1, 4, 128, 300, {257, 0, 0}, {1, 0, 0}},
        {2, 2, 2, 32, 12, {0, 10}, {2, 2}},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int64_t B = cases[ci].B, n = cases[ci].n, H = cases[ci].H, D = cases[ci].D, Tc = cases[ci].Tc;
        const int64_t ld = 3 * H * D, cache = B * H * Tc * D;
        pbuf cl = pb_ints(cases[ci].clen, (size_t)B), nn = pb_ints(cases[ci].nnew, (size_t)B);
        for (int d = 0; d < 3; d++) {
            const moe_dtype dt = k_dtypes[d];
            const size_t es = moe_dtype_size(dt);
            pbuf qkv = pb_rand(dt, (size_t)(B * n * ld), -1.0f, 1.0f), out = pb_nan(dt, (size_t)(B * n * H * D));
            pbuf kc = pb_rand(dt, (size_t)cache, -1.0f, 1.0f), vc = pb_rand(dt, (size_t)cache, -1.0f, 1.0f);
#define ATD(o, cx, s)                                                                                              \
    (o)->attention_decode((cx), out.s, (char *)qkv.s + 2 * H * D * es, qkv.s, (char *)qkv.s + H * D * es, ld, kc.s, \
                          vc.s, (const int32_t *)cl.s, (const int32_t *)nn.s, B, n, H, D, Tc, dt)
            BOTH("attention_decode", ATD);
#undef ATD
            snprintf(what, sizeof what, "attention_decode B%lld n%lld H%lld D%lld out", (long long)B, (long long)n,
                     (long long)H, (long long)D);
            compare(what, &out, dt, (size_t)(B * n * H * D), tol_of(dt));
            snprintf(what, sizeof what, "attention_decode B%lld n%lld H%lld D%lld caches", (long long)B,
                     (long long)n, (long long)H, (long long)D);
            compare(what, &kc, dt, (size_t)cache, 0.0);
            compare(what, &vc, dt, (size_t)cache, 0.0);
            pb_free(&qkv); pb_free(&out); pb_free(&kc); pb_free(&vc);
        }
        pb_free(&cl);
        pb_free(&nn);
    }
    end_case();
}

/* E experts' fc1/fc2 weights on both sides and each side's pointer tables;
 * `skew` offsets every pointer by one element (unaligned loads) */
typedef struct expert_set {
    pbuf w1, b1, w2, b2, tab;
} expert_set;

static expert_set experts_make(int E, int64_t d, int64_t f, moe_dtype dt, int skew)
{
    expert_set x;
    const size_t es = moe_dtype_size(dt);
    const int64_t n1 = f * d + 1, n2 = d * f + 1;
    x.w1 = pb_rand(dt, (size_t)(E * n1), -0.15f, 0.15f);
    x.b1 = pb_rand(dt, (size_t)(E * (f + 1)), -0.3f, 0.3f);
    x.w2 = pb_rand(dt, (size_t)(E * n2), -0.15f, 0.15f);
    x.b2 = pb_rand(dt, (size_t)(E * (d + 1)), -0.3f, 0.3f);
    x.tab = pb_alloc((size_t)(4 * E) * sizeof(void *));
    for (int side = 0; side < 2; side++) {
        const void *t[4 * 64];
        assert_true(E <= 64);
        for (int e = 0; e < E; e++) {
            t[e] = (char *)(side ? x.w1.g : x.w1.c) + ((size_t)e * (size_t)n1 + (size_t)skew) * es;
            t[E + e] = (char *)(side ? x.b1.g : x.b1.c) + ((size_t)e * (size_t)(f + 1) + (size_t)skew) * es;
            t[2 * E + e] = (char *)(side ? x.w2.g : x.w2.c) + ((size_t)e * (size_t)n2 + (size_t)skew) * es;
            t[3 * E + e] = (char *)(side ? x.b2.g : x.b2.c) + ((size_t)e * (size_t)(d + 1) + (size_t)skew) * es;
        }
        const moe_backend_ops *be = side ? g_gpu.be : g_cpu.be;
        assert_int_equal(be->copy_from_host(side ? g_gpu.ctx : g_cpu.ctx, side ? x.tab.g : x.tab.c, t,
                                            (size_t)(4 * E) * sizeof(void *)),
                         MOE_OK);
    }
    return x;
}

static void experts_free(expert_set *x)
{
    pb_free(&x->w1); pb_free(&x->b1); pb_free(&x->w2); pb_free(&x->b2); pb_free(&x->tab);
}

static void test_parity_decode_moe(void **state)
{
    (void)state;
    begin_case();
    char what[128];
    const int E = 8;
    /* the no-drop gate */
    static const struct {
        int64_t S, d;
        int k, sampling, ln, pad, noise;
    } gates[] = {{13, 64, 2, 0, 1, 1, 0}, {5, 40, 2, 1, 1, 0, 1}, {7, 64, 1, 0, 0, 1, 0}, {1, 2048, 2, 1, 1, 0, 1}};
    for (size_t gi = 0; gi < sizeof gates / sizeof gates[0]; gi++) {
        const int64_t S = gates[gi].S, d = gates[gi].d;
        uint8_t pads[16];
        int32_t noise[16];
        for (int s = 0; s < S; s++) {
            pads[s] = gates[gi].pad && s % 4 == 3;
            noise[s] = (int32_t)(100 + 3 * s);
        }
        pbuf pad = pb_alloc((size_t)S), nz = pb_ints(noise, (size_t)S);
        pb_upload(&pad, pads, (size_t)S);
        for (int di = 0; di < 3; di++) {
            const moe_dtype dt = k_dtypes[di];
            pbuf x = pb_rand(dt, (size_t)(S * d), -2.0f, 2.0f), wg = pb_rand(dt, (size_t)(E * d), -0.3f, 0.3f);
            pbuf lw = pb_rand(dt, (size_t)d, 0.5f, 1.5f), lb = pb_rand(dt, (size_t)d, -0.5f, 0.5f);
            pbuf ex = pb_nan(MOE_I32, (size_t)(2 * S)), ew = pb_nan(MOE_F32, (size_t)(2 * S));
            moe_gate_topk_args ac, ag;
            memset(&ac, 0, sizeof ac);
            ac.S = S; ac.d = d; ac.E = E; ac.k = gates[gi].k; ac.layernorm = gates[gi].ln; ac.ln_eps = 1e-5f;
            ac.policy = gates[gi].sampling ? MOE_ROUTE_SAMPLING : MOE_ROUTE_ALL; ac.seed = 17; ac.stream = 5;
            ac.dt = dt;
            ag = ac;
            ac.x = x.c; ag.x = x.g; ac.wg = wg.c; ag.wg = wg.g; ac.ln_weight = lw.c; ag.ln_weight = lw.g;
            ac.ln_bias = lb.c; ag.ln_bias = lb.g;
            ac.pad = gates[gi].pad ? (const uint8_t *)pad.c : NULL; ag.pad = gates[gi].pad ? (const uint8_t *)pad.g : NULL;
            ac.noise_index = gates[gi].noise ? (const int32_t *)nz.c : NULL;
            ag.noise_index = gates[gi].noise ? (const int32_t *)nz.g : NULL;
            ac.expert = (int32_t *)ex.c; ag.expert = (int32_t *)ex.g; ac.weight = (float *)ew.c; ag.weight = (float *)ew.g;
            check_ok("gate_topk_forward", g_cpu.ops->gate_topk_forward(g_cpu.ctx, &ac),
                     g_gpu.ops->gate_topk_forward(g_gpu.ctx, &ag));
            snprintf(what, sizeof what, "gate_topk S%lld d%lld top%d%s%s", (long long)S, (long long)d, gates[gi].k,
                     gates[gi].sampling ? " sampling" : "", gates[gi].pad ? " pad" : "");
            compare(what, &ex, MOE_I32, (size_t)(2 * S), 0.0);
            compare(what, &ew, MOE_F32, (size_t)(2 * S), TOL32);
            pb_free(&x); pb_free(&wg); pb_free(&lw); pb_free(&lb); pb_free(&ex); pb_free(&ew);
        }
        pb_free(&pad);
        pb_free(&nz);
    }
    /* route_forward draws its noise at noise_index when given */
    {
        const int64_t S = 24;
        int32_t noise[24];
        for (int s = 0; s < S; s++)
            noise[s] = (int32_t)(7 * s + 40);
        pbuf nz = pb_ints(noise, (size_t)S);
        const route_case rcs[] = {{2, MOE_ROUTE_SAMPLING, 0, 0, 0, 12}, {2, MOE_ROUTE_RANDOM, 0, 0, 1, 12}};
        for (int i = 0; i < 2; i++) {
            route_bufs r;
            route_setup(&r, &rcs[i], S, E);
            r.ac.noise_index = (const int32_t *)nz.c;
            r.ag.noise_index = (const int32_t *)nz.g;
            check_ok("route_forward", g_cpu.ops->route_forward(g_cpu.ctx, &r.ac),
                     g_gpu.ops->route_forward(g_gpu.ctx, &r.ag));
            snprintf(what, sizeof what, "route_forward noise_index %s expert", policy_name(rcs[i].policy));
            compare(what, &r.expert, MOE_I32, (size_t)(2 * S), 0.0);
            snprintf(what, sizeof what, "route_forward noise_index %s slot", policy_name(rcs[i].policy));
            compare(what, &r.slot, MOE_I32, (size_t)(2 * S), 0.0);
            route_free(&r);
        }
        pb_free(&nz);
    }
    /* the routed experts: repeats, -1 and zero weights, > 8 tokens of one expert, unaligned tables */
    static const struct {
        int64_t S, d, f;
        int ln, beta, skew;
    } xs[] = {{1, 64, 96, 1, 1, 0}, {5, 64, 96, 1, 1, 0}, {12, 40, 56, 0, 0, 0}, {3, 48, 72, 1, 1, 1},
              {1, 2048, 512, 1, 1, 0}};
    for (size_t xi = 0; xi < sizeof xs / sizeof xs[0]; xi++) {
        const int64_t S = xs[xi].S, d = xs[xi].d, f = xs[xi].f;
        int32_t ex[32];
        float ew[32];
        for (int s = 0; s < S; s++) {
            int e1 = S > 8 ? 3 : (int)((s * 5 + 1) % E), e2 = (e1 + 1 + s % 3) % E;
            ex[2 * s] = e1;
            ex[2 * s + 1] = s % 6 == 4 ? -1 : e2;
            ew[2 * s] = 0.6f + 0.01f * (float)s;
            ew[2 * s + 1] = s % 5 == 2 ? 0.0f : 0.4f - 0.01f * (float)s;
        }
        pbuf pe = pb_ints(ex, (size_t)(2 * S)), pw = pb_alloc((size_t)(2 * S) * 4);
        pb_upload(&pw, ew, (size_t)(2 * S) * 4);
        for (int di = 0; di < 3; di++) {
            const moe_dtype dt = k_dtypes[di];
            expert_set es = experts_make(E, d, f, dt, xs[xi].skew);
            pbuf x = pb_rand(dt, (size_t)(S * d), -2.0f, 2.0f), lw = pb_rand(dt, (size_t)d, 0.5f, 1.5f),
                 lb = pb_rand(dt, (size_t)d, -0.5f, 0.5f);
            pbuf hid = pb_nan(dt, (size_t)(2 * S * f)), eo = pb_nan(MOE_F32, (size_t)(2 * S * d));
            moe_expert_ffn_args ac, ag;
            memset(&ac, 0, sizeof ac);
            ac.S = S; ac.d = d; ac.f = f; ac.E = E; ac.layernorm = xs[xi].ln; ac.ln_eps = 1e-5f;
            ac.act = MOE_ACT_GELU_TANH; ac.beta = xs[xi].beta ? 1.0f : 0.0f; ac.dt = dt;
            ag = ac;
            ac.x = x.c; ag.x = x.g; ac.y = x.c; ag.y = x.g; /* in place, as the residual stream */
            ac.ln_weight = lw.c; ag.ln_weight = lw.g; ac.ln_bias = lb.c; ag.ln_bias = lb.g;
            ac.expert = (const int32_t *)pe.c; ag.expert = (const int32_t *)pe.g;
            ac.weight = (const float *)pw.c; ag.weight = (const float *)pw.g;
            const void *const *tc = (const void *const *)es.tab.c, *const *tg = (const void *const *)es.tab.g;
            ac.w1 = tc; ac.b1 = tc + E; ac.w2 = tc + 2 * E; ac.b2 = tc + 3 * E;
            ag.w1 = tg; ag.b1 = tg + E; ag.w2 = tg + 2 * E; ag.b2 = tg + 3 * E;
            ac.hidden = hid.c; ag.hidden = hid.g; ac.eout = (float *)eo.c; ag.eout = (float *)eo.g;
            check_ok("expert_ffn_forward", g_cpu.ops->expert_ffn_forward(g_cpu.ctx, &ac),
                     g_gpu.ops->expert_ffn_forward(g_gpu.ctx, &ag));
            snprintf(what, sizeof what, "expert_ffn S%lld d%lld f%lld%s%s%s y", (long long)S, (long long)d,
                     (long long)f, xs[xi].ln ? " ln" : "", xs[xi].beta ? " +x" : "", xs[xi].skew ? " unaligned" : "");
            compare(what, &x, dt, (size_t)(S * d), tol_of(dt));
            snprintf(what, sizeof what, "expert_ffn S%lld d%lld f%lld hidden", (long long)S, (long long)d, (long long)f);
            compare(what, &hid, dt, (size_t)(2 * S * f), tol_of(dt));
            pb_free(&x); pb_free(&lw); pb_free(&lb); pb_free(&hid); pb_free(&eo);
            experts_free(&es);
        }
        pb_free(&pe);
        pb_free(&pw);
    }
    end_case();
}

static void test_parity_decode_logits_and_graph(void **state)
{
    (void)state;
    begin_case();
    char what[128];
    static const struct {
        int64_t R, V;
        int K;
        float temperature;
    } cases[] = {{3, 1000, 5, 0.7f}, {1, 50000, 3, 1.0f}, {2, 37, 37, 1.3f}, {4, 300, 0, 1.0f}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int64_t R = cases[ci].R, V = cases[ci].V;
        const int K = cases[ci].K;
        float *hl = host_rand(MOE_F32, (size_t)(R * V), -6.0f, 6.0f);
        /* ties (ranked by index), a NaN (ranked as -inf) and -inf itself */
        for (int64_t r = 0; r < R; r++) {
            hl[r * V + 3] = hl[r * V + 11] = 9.0f;
            hl[r * V + 5] = NAN;
            hl[r * V + 7] = -INFINITY;
        }
        pbuf lg = pb_alloc((size_t)(R * V) * 4);
        pb_upload(&lg, hl, (size_t)(R * V) * 4);
        int32_t tg[4] = {3, 5, 7, 20};
        pbuf tgt_idx = pb_ints(tg, 4);
        pbuf lse = pb_nan(MOE_F32, (size_t)R), tv = pb_nan(MOE_F32, (size_t)(R * (K > 0 ? K : 1))),
             ti = pb_nan(MOE_I32, (size_t)(R * (K > 0 ? K : 1))), tgt = pb_nan(MOE_F32, (size_t)R);
#define LST(o, cx, s)                                                                                         \
    (o)->logits_stats((cx), (float *)lse.s, (float *)tv.s, (int32_t *)ti.s, (float *)tgt.s, (const float *)lg.s, \
                      (const int32_t *)tgt_idx.s, R, V, K, cases[ci].temperature)
        BOTH("logits_stats", LST);
#undef LST
        snprintf(what, sizeof what, "logits_stats R%lld V%lld K%d lse", (long long)R, (long long)V, K);
        compare(what, &lse, MOE_F32, (size_t)R, TOL32);
        snprintf(what, sizeof what, "logits_stats R%lld V%lld K%d top", (long long)R, (long long)V, K);
        compare(what, &tv, MOE_F32, (size_t)(R * K), TOL32);
        compare(what, &ti, MOE_I32, (size_t)(R * K), 0.0);
        snprintf(what, sizeof what, "logits_stats R%lld V%lld target", (long long)R, (long long)V);
        compare(what, &tgt, MOE_F32, (size_t)R, TOL32);
        pb_free(&lg); pb_free(&tgt_idx); pb_free(&lse); pb_free(&tv); pb_free(&ti); pb_free(&tgt);
        free(hl);
    }
    /* a recorded sequence of decoding ops replays as it runs (gpu only; the cpu has no graphs) */
    assert_null(g_cpu.ops->graph_begin);
    {
        const moe_backend_ops *be = g_gpu.be;
        const moe_ops *o = g_gpu.ops;
        moe_ctx *cx = g_gpu.ctx;
        const int64_t m = 2, n = 300, k = 256;
        const size_t bytes = (size_t)(m * n) * 2;
        void *hx = host_rand(MOE_BF16, (size_t)(m * k), -1.0f, 1.0f), *hw = host_rand(MOE_BF16, (size_t)(n * k), -0.1f, 0.1f);
        void *x, *w, *y1, *y2;
        assert_int_equal(be->alloc(cx, (size_t)(m * k) * 2, "x", &x), MOE_OK);
        assert_int_equal(be->alloc(cx, (size_t)(n * k) * 2, "w", &w), MOE_OK);
        assert_int_equal(be->alloc(cx, bytes, "y eager", &y1), MOE_OK);
        assert_int_equal(be->alloc(cx, bytes, "y graph", &y2), MOE_OK);
        assert_int_equal(be->copy_from_host(cx, x, hx, (size_t)(m * k) * 2), MOE_OK);
        assert_int_equal(be->copy_from_host(cx, w, hw, (size_t)(n * k) * 2), MOE_OK);
        moe_rowlinear_desc d;
        memset(&d, 0, sizeof d);
        d.m = m; d.n = n; d.k = k; d.x = x; d.ldx = k; d.layernorm = 1; d.ln_eps = 1e-5f; d.w = w; d.act = 1;
        d.act_kind = MOE_ACT_GELU_TANH; d.ldy = n; d.y_dtype = MOE_BF16; d.dt = MOE_BF16;
        d.y = y1;
        assert_int_equal(o->rowlinear_forward(cx, &d), MOE_OK);
        assert_int_equal(o->fill(cx, y2, MOE_BF16, m * n, 0.0f), MOE_OK);
        d.y = y2;
        void *gr = NULL;
        assert_int_equal(o->graph_begin(cx), MOE_OK);
        assert_int_equal(o->rowlinear_forward(cx, &d), MOE_OK);
        assert_int_equal(o->graph_end(cx, &gr), MOE_OK);
        assert_non_null(gr);
        unsigned char *r1 = malloc(bytes), *r2 = malloc(bytes);
        assert_non_null(r1);
        assert_non_null(r2);
        assert_int_equal(be->copy_to_host(cx, r2, y2, bytes), MOE_OK);
        int untouched = 1; /* recording runs nothing */
        for (size_t i = 0; i < bytes; i++)
            untouched &= r2[i] == 0;
        assert_true(untouched);
        assert_int_equal(o->graph_launch(cx, gr), MOE_OK);
        assert_int_equal(o->graph_launch(cx, gr), MOE_OK);
        assert_int_equal(be->copy_to_host(cx, r1, y1, bytes), MOE_OK);
        assert_int_equal(be->copy_to_host(cx, r2, y2, bytes), MOE_OK);
        assert_memory_equal(r1, r2, bytes);
        printf("PARITY %-44s %-4s replay equals the eager run PASS\n", "graph_begin/end/launch (rowlinear)", "bf16");
        o->graph_destroy(cx, gr);
        be->free(cx, x); be->free(cx, w); be->free(cx, y1); be->free(cx, y2);
        free(hx); free(hw); free(r1); free(r2);
    }
    end_case();
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
/* MOE_PARITY_BENCH_OPS=attention times only the ops whose name holds it */
static int bench_selected(const char *name)
{
    const char *only = getenv("MOE_PARITY_BENCH_OPS");
    return only == NULL || only[0] == '\0' || strstr(name, only) != NULL;
}

#define BENCH(name, reps, work, unit, CALL)                                                         \
    do {                                                                                            \
        if (!bench_selected(name))                                                                  \
            break;                                                                                  \
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
    /* dropless experts: 8 groups of 2048 rows (a balanced top-2 of 8192
     * tokens) under the bound 8192, d 2048, ffn 8192, as the reference model's
     * MoE layers with --moe-dropless; twice the FLOPs of the cuBLAS fc1 above.
     * Groups overlap in the buffers (rows e * 768 ..): timing only. */
    {
        int32_t rows_h[8];
        for (int g = 0; g < 8; g++)
            rows_h[g] = 2048;
        void *rows_d, *wg;
        assert_int_equal(be->alloc(cx, sizeof rows_h, "rows", &rows_d), MOE_OK);
        assert_int_equal(be->copy_from_host(cx, rows_d, rows_h, sizeof rows_h), MOE_OK);
        assert_int_equal(be->alloc(cx, (uint64_t)(8 * F * Cm) * 2, "grads", &wg), MOE_OK);
        const void *ga_a[8], *ga_b[8], *ga_bias[8];
        void *ga_c[8], *ga_aux[8], *ga_db[8];
        moe_grouped_matmul_args g;
        memset(&g, 0, sizeof g);
        g.groups = 8; g.rows = (const int32_t *)rows_d; g.rows_total = 2 * N; g.alpha = 1.0f;
        g.a = ga_a; g.b = ga_b; g.c = ga_c; g.bias = ga_bias; g.aux = ga_aux;
        g.dtype = MOE_F16; g.act = MOE_ACT_GELU_TANH;
        for (int e = 0; e < 8; e++) { /* fc1: y rows of group e = x rows . w^T */
            ga_a[e] = (const char *)x + (size_t)e * 768 * Cm * 2;
            ga_b[e] = w;
            ga_c[e] = (char *)y + (size_t)e * 768 * F * 2;
            ga_aux[e] = (char *)aux + (size_t)e * 768 * F * 2;
            ga_bias[e] = bias;
            ga_db[e] = bias;
        }
        g.trans_b = 1; g.m = N; g.n = F; g.k = Cm; g.lda = Cm; g.ldb = Cm; g.ldc = F; g.epilogue = MOE_EPI_BIAS_ACT;
        BENCH("grouped_matmul fc1 8x2048(/8192)x8192x2048 bias+gelu f16", 10, 2.0 * mm, "TFLOP/s", o->grouped_matmul(cx, &g));
        /* input gradient of fc2 through the activation: y(rows, F) = dy(rows, Cm) . w(Cm, F) */
        g.trans_b = 0; g.n = F; g.k = Cm; g.lda = Cm; g.ldb = F; g.ldc = F; g.epilogue = MOE_EPI_DACT; g.bias = NULL;
        BENCH("grouped_matmul fc2 dgrad 8x2048x8192x2048 dact f16", 10, 2.0 * mm, "TFLOP/s", o->grouped_matmul(cx, &g));
        /* fc1's input gradient: (rows, Cm) = dpre(rows, F) . w(F, Cm) */
        for (int e = 0; e < 8; e++) {
            ga_a[e] = (const char *)y + (size_t)e * 768 * F * 2;
            ga_c[e] = (char *)att + (size_t)e * 768 * Cm * 2;
        }
        g.n = Cm; g.k = F; g.lda = F; g.ldb = Cm; g.ldc = Cm; g.epilogue = MOE_EPI_NONE; g.aux = NULL;
        BENCH("grouped_matmul fc1 dgrad 8x2048x2048x8192 f16", 10, 2.0 * mm, "TFLOP/s", o->grouped_matmul(cx, &g));
        /* weight gradients: dW(F, Cm) += dpre(rows, F)^T . x(rows, Cm), with the bias gradient */
        for (int e = 0; e < 8; e++) {
            ga_b[e] = (const char *)x + (size_t)e * 768 * Cm * 2;
            ga_c[e] = (char *)wg + (size_t)e * F * Cm * 2;
        }
        g.trans_a = 1; g.m = F; g.n = Cm; g.k = N; g.lda = F; g.ldb = Cm; g.ldc = Cm; g.beta = 1.0f; g.dbias = ga_db;
        BENCH("grouped_matmul fc1 wgrad 8x8192x2048x2048 +dbias f16", 10, 2.0 * mm, "TFLOP/s", o->grouped_matmul(cx, &g));
        g.dbias = NULL;
        BENCH("grouped_matmul fc1 wgrad 8x8192x2048x2048 f16", 10, 2.0 * mm, "TFLOP/s", o->grouped_matmul(cx, &g));
        be->free(cx, rows_d);
        be->free(cx, wg);
    }
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

/* MOE_PARITY_BENCH=1, decoding: the row-wise ops at the reference model's
 * sizes for one token (batch 1) and eight, bf16. Weights rotate through
 * copies that together exceed the L2, so each launch streams from HBM as a
 * decoding step does; the bandwidth column counts the weight bytes read. */
static void test_parity_bench_decode(void **state)
{
    (void)state;
    const moe_backend_ops *be = g_gpu.be;
    const moe_ops *o = g_gpu.ops;
    moe_ctx *cx = g_gpu.ctx;
    const int64_t d = 2048, f = 8192, V = 50000, H = 32, D = 64, Tc = 2048, E = 8;
    const int64_t pool = 8 * f * d; /* elements: 8 matrices of 8192 x 2048, 256 MiB of bf16 */
    void *wp, *x, *y, *bias, *ln, *lg, *kc, *vc, *io, *hid, *eo, *tab;
    assert_int_equal(be->alloc(cx, (uint64_t)pool * 2 + (uint64_t)V * d * 2, "weights", &wp), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(8 * 3 * d) * 2, "x", &x), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(8 * f) * 2, "y", &y), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)f * 2 * 2, "bias", &bias), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)d * 2 * 2, "ln", &ln), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(8 * V) * 4, "logits", &lg), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(H * Tc * D) * 2, "k cache", &kc), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(H * Tc * D) * 2, "v cache", &vc), MOE_OK);
    assert_int_equal(be->alloc(cx, 4096, "ints", &io), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(16 * f) * 2, "hidden", &hid), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(16 * d) * 4, "eout", &eo), MOE_OK);
    assert_int_equal(be->alloc(cx, (uint64_t)(4 * E) * sizeof(void *), "tables", &tab), MOE_OK);
    assert_int_equal(o->init_uniform(cx, wp, MOE_BF16, pool + V * d, -0.02f, 0.02f, 1u, 11u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, x, MOE_BF16, 8 * 3 * d, -1.0f, 1.0f, 1u, 12u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, bias, MOE_BF16, 2 * f, -0.02f, 0.02f, 1u, 13u), MOE_OK);
    assert_int_equal(o->fill(cx, ln, MOE_BF16, d, 1.0f), MOE_OK);
    assert_int_equal(o->fill(cx, (char *)ln + d * 2, MOE_BF16, d, 0.0f), MOE_OK);
    assert_int_equal(o->init_uniform(cx, kc, MOE_BF16, H * Tc * D, -1.0f, 1.0f, 1u, 14u), MOE_OK);
    assert_int_equal(o->init_uniform(cx, vc, MOE_BF16, H * Tc * D, -1.0f, 1.0f, 1u, 15u), MOE_OK);
    uint16_t *wbase = (uint16_t *)wp;
    for (int rows = 1; rows <= 8; rows *= 8) {
        static const struct {
            const char *name;
            int64_t n, k;
            int ln, act, beta, q;
        } shapes[] = {{"k|v|q 6144x2048 +LN", 3 * 2048, 2048, 1, 0, 0, 2048},
                      {"out 2048x2048 +residual", 2048, 2048, 0, 0, 1, 0},
                      {"fc1 8192x2048 +LN+gelu", 8192, 2048, 1, 1, 0, 0},
                      {"fc2 2048x8192 +residual", 2048, 8192, 0, 0, 1, 0}};
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            moe_rowlinear_desc dd;
            memset(&dd, 0, sizeof dd);
            dd.m = rows; dd.n = shapes[si].n; dd.k = shapes[si].k; dd.x = x; dd.ldx = shapes[si].k;
            dd.layernorm = shapes[si].ln; dd.ln_weight = ln; dd.ln_bias = (char *)ln + d * 2; dd.ln_eps = 1e-5f;
            dd.bias = bias; dd.q_scale = 0.125f; dd.q_cols = shapes[si].q; dd.act = shapes[si].act;
            dd.act_kind = MOE_ACT_GELU_TANH; dd.beta = shapes[si].beta ? 1.0f : 0.0f; dd.y = y; dd.ldy = dd.n;
            dd.y_dtype = MOE_BF16; dd.dt = MOE_BF16;
            const int64_t mat = dd.n * dd.k, copies = pool / mat;
            const int reps = 200;
            for (int r = 0; r < reps + 5; r++) {
                if (r == 5) {
                    assert_int_equal(be->synchronize(cx), MOE_OK);
                }
                dd.w = wbase + (r % copies) * mat;
                assert_int_equal(o->rowlinear_forward(cx, &dd), MOE_OK);
            }
            double t0 = now_ms();
            for (int r = 0; r < reps; r++) {
                dd.w = wbase + (r % copies) * mat;
                assert_int_equal(o->rowlinear_forward(cx, &dd), MOE_OK);
            }
            assert_int_equal(be->synchronize(cx), MOE_OK);
            double ms = (now_ms() - t0) / reps;
            char name[96];
            snprintf(name, sizeof name, "rowlinear %s, %d row(s) bf16", shapes[si].name, rows);
            printf("BENCH %-52s %9.4f ms %8.2f TB/s\n", name, ms, (double)mat * 2.0 / (ms * 1e-3) / 1e12);
        }
        /* logits: LN + 50000 x 2048 into fp32 */
        moe_rowlinear_desc dl;
        memset(&dl, 0, sizeof dl);
        dl.m = rows; dl.n = V; dl.k = d; dl.x = x; dl.ldx = d; dl.layernorm = 1; dl.ln_weight = ln;
        dl.ln_bias = (char *)ln + d * 2; dl.ln_eps = 1e-5f; dl.w = wbase + pool; dl.y = lg; dl.ldy = V;
        dl.y_dtype = MOE_F32; dl.dt = MOE_BF16;
        char name[96];
        snprintf(name, sizeof name, "rowlinear logits 50000x2048 +LN ->f32, %d row(s)", rows);
        BENCH(name, 20, (double)V * d * 2.0, "TB/s", o->rowlinear_forward(cx, &dl));
        /* two experts a token out of 8, fc1 + fc2 + combine: 2 x 67 MB a row */
        const void *t[4 * 8];
        for (int e = 0; e < E; e++) {
            t[e] = wbase + (int64_t)e * f * d;
            t[E + e] = bias;
            t[2 * E + e] = wbase + (int64_t)((e + 4) % 8) * f * d;
            t[3 * E + e] = bias;
        }
        assert_int_equal(be->copy_from_host(cx, tab, t, sizeof t), MOE_OK);
        int32_t ex[16];
        float ew[16];
        for (int s = 0; s < rows; s++) {
            ex[2 * s] = s % 8;
            ex[2 * s + 1] = (s + 3) % 8;
            ew[2 * s] = 0.6f;
            ew[2 * s + 1] = 0.4f;
        }
        assert_int_equal(be->copy_from_host(cx, io, ex, sizeof ex), MOE_OK);
        assert_int_equal(be->copy_from_host(cx, (char *)io + 128, ew, sizeof ew), MOE_OK);
        moe_expert_ffn_args ea;
        memset(&ea, 0, sizeof ea);
        ea.S = rows; ea.d = d; ea.f = f; ea.E = (int)E; ea.x = x; ea.layernorm = 1; ea.ln_weight = ln;
        ea.ln_bias = (char *)ln + d * 2; ea.ln_eps = 1e-5f; ea.expert = (const int32_t *)io;
        ea.weight = (const float *)((char *)io + 128); ea.w1 = (const void *const *)tab;
        ea.b1 = (const void *const *)tab + E; ea.w2 = (const void *const *)tab + 2 * E;
        ea.b2 = (const void *const *)tab + 3 * E; ea.act = MOE_ACT_GELU_TANH; ea.beta = 1.0f; ea.y = x;
        ea.hidden = hid; ea.eout = (float *)eo; ea.dt = MOE_BF16;
        const int distinct = rows == 1 ? 2 : 8;
        snprintf(name, sizeof name, "expert_ffn top-2 of 8, d2048 f8192, %d row(s)", rows);
        BENCH(name, 20, (double)distinct * 2.0 * f * d * 2.0, "TB/s", o->expert_ffn_forward(cx, &ea));
        /* attention of one query a row against 300 cached positions */
        int32_t lens[2] = {300, 1};
        assert_int_equal(be->copy_from_host(cx, (char *)io + 512, lens, sizeof lens), MOE_OK);
        snprintf(name, sizeof name, "attention_decode H32 D64 cache 300, 1 row");
        if (rows == 1)
            BENCH(name, 50, 2.0 * 301 * H * D * 2.0, "TB/s",
                  o->attention_decode(cx, y, (char *)x + 2 * d * 2, x, (char *)x + d * 2, 3 * d, kc, vc,
                                      (const int32_t *)((char *)io + 512), (const int32_t *)((char *)io + 516), 1, 1,
                                      H, D, Tc, MOE_BF16));
        snprintf(name, sizeof name, "logits_stats V50000 K3, %d row(s)", rows);
        BENCH(name, 50, (double)rows * V * 4.0 * 4.0, "TB/s",
              o->logits_stats(cx, (float *)eo, (float *)eo + 16, (int32_t *)((char *)io + 1024), NULL, (const float *)lg,
                              NULL, rows, V, 3, 1.0f));
    }
    void *bufs[] = {wp, x, y, bias, ln, lg, kc, vc, io, hid, eo, tab};
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
        cmocka_unit_test(test_parity_route),         cmocka_unit_test(test_parity_route_topk),
        cmocka_unit_test(test_parity_route_expert_choice),
        cmocka_unit_test(test_parity_dispatch_combine), cmocka_unit_test(test_parity_dispatch_combine_wide),
        cmocka_unit_test(test_parity_grouped),
        cmocka_unit_test(test_parity_optim),         cmocka_unit_test(test_parity_memory_and_copies),
        cmocka_unit_test(test_parity_determinism),
        cmocka_unit_test(test_parity_decode_rowlinear),   cmocka_unit_test(test_parity_decode_attention),
        cmocka_unit_test(test_parity_decode_moe),         cmocka_unit_test(test_parity_decode_logits_and_graph),
    };
    /* MOE_PARITY_FILTER=test_parity_attention runs the matching cases only
     * (timings too: MOE_PARITY_FILTER=test_parity_bench_decode) */
    const char *filter = getenv("MOE_PARITY_FILTER");
    if (filter != NULL && filter[0] != '\0')
        cmocka_set_test_filter(filter);
    const char *bench = getenv("MOE_PARITY_BENCH");
    if (bench != NULL && bench[0] == '1') {
        const struct CMUnitTest timing[] = {cmocka_unit_test(test_parity_bench),
                                            cmocka_unit_test(test_parity_bench_decode)};
        return cmocka_run_group_tests(timing, group_setup, group_teardown);
    }
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
