/* test_route.c: MoE routing, dispatch and combine of the cpu backend
 * (kernels/cpu/route.c, compiled into this test) and the top1/top2 gate
 * plugins (loaded with dlopen from the build tree, given a fake host).
 *
 * Expected values are worked out by hand in the comments from
 * FAIRSEQ_SPEC.md §2.2-2.4. Gate probabilities are chosen first (0.5, 0.25,
 * 0.125 ...) and the logits are their logarithms, so softmax gives them back
 * to within fp32 rounding. "A(i, j)" below is the token with probability 0.5 on
 * expert i, 0.25 on expert j and 0.125 on the other two (E = 4); "U" is the
 * uniform token 0.25 x 4. Gradients are checked by central differences on
 * cases whose routing does not change within the step.
 */
#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/cpu.h"
#include "moe/plugin.h"

/* the random policy's stream offset, as route.c documents it */
#define RANDOM_STREAM_XOR 0x52414E44ull

#define MAXS 64
#define MAXE 8

/* ------------------------------------------------------------ fake host */

static char last_error[512];

static moe_status fake_error(const moe_host *h, moe_status st, const char *fmt, ...)
{
    (void)h;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return st;
}

static int n_warnings;

static void fake_log(const moe_host *h, moe_log_level level, const char *component, const char *fmt, ...)
{
    (void)h;
    (void)component;
    (void)fmt;
    n_warnings += level == MOE_LOG_WARNING;
}

/* option values by name; NULL value = not given */
static const char *opt_policy, *opt_fraction;
static int opt_norm_before, opt_bpr;

static const char *fake_opt_str(const moe_host *h, const char *name)
{
    (void)h;
    if (strcmp(name, "moe-second-expert-policy") == 0)
        return opt_policy;
    if (strcmp(name, "moe-eval-capacity-token-fraction") == 0)
        return opt_fraction;
    return NULL;
}

static int fake_opt_flag(const moe_host *h, const char *name)
{
    (void)h;
    if (strcmp(name, "moe-normalize-gate-prob-before-dropping") == 0)
        return opt_norm_before;
    if (strcmp(name, "moe-batch-prioritized-routing") == 0)
        return opt_bpr;
    return 0;
}

static double fake_opt_float(const moe_host *h, const char *name)
{
    const char *v = fake_opt_str(h, name);
    return v != NULL ? atof(v) : 0.0;
}

static int64_t fake_opt_int(const moe_host *h, const char *name) { return (int64_t)fake_opt_float(h, name); }
static int fake_opt_set(const moe_host *h, const char *name) { return fake_opt_str(h, name) != NULL; }
static uint64_t fake_step_seed(const moe_host *h) { (void)h; return 4242u; }

static moe_ops fake_ops;
static moe_host fake_host;
static moe_ctx fake_ctx;

static void fake_host_init(void)
{
    memset(&fake_ops, 0, sizeof fake_ops);
    fake_ops.route_workspace_bytes = moe_cpu_route_workspace_bytes;
    fake_ops.route_forward = moe_cpu_route_forward;
    fake_ops.route_backward = moe_cpu_route_backward;
    memset(&fake_host, 0, sizeof fake_host);
    fake_host.size = (uint32_t)sizeof fake_host;
    fake_host.log = fake_log;
    fake_host.error = fake_error;
    fake_host.opt_set = fake_opt_set;
    fake_host.opt_int = fake_opt_int;
    fake_host.opt_float = fake_opt_float;
    fake_host.opt_flag = fake_opt_flag;
    fake_host.opt_str = fake_opt_str;
    fake_host.ctx = &fake_ctx;
    fake_host.ops = &fake_ops;
    fake_host.step_seed = fake_step_seed;
    fake_ctx.host = &fake_host;
    opt_policy = "sampling";
    opt_fraction = "0.25";
    opt_norm_before = opt_bpr = 0;
    n_warnings = 0;
    last_error[0] = '\0';
}

/* ---------------------------------------------------------- route cases */

typedef struct route_case {
    moe_route_args a;
    float logits[MAXS * MAXE], probs[MAXS * MAXE], weight[MAXS * 2], l_aux, metrics[MOE_NUM_METRICS];
    int32_t expert[MAXS * 2], slot[MAXS * 2];
    uint8_t pad[MAXS];
    void *ws;
} route_case;

static void case_init(route_case *rc, int64_t S, int E, int k, int64_t C, moe_route_policy policy)
{
    memset(rc, 0, sizeof *rc);
    rc->a.S = S;
    rc->a.E = E;
    rc->a.k = k;
    rc->a.capacity = C;
    rc->a.policy = policy;
    rc->a.seed = 1;
    rc->a.stream = 7;
    rc->a.logits = rc->logits;
    rc->a.probs = rc->probs;
    rc->a.expert = rc->expert;
    rc->a.slot = rc->slot;
    rc->a.weight = rc->weight;
    rc->a.l_aux = &rc->l_aux;
    rc->a.metrics = rc->metrics;
    rc->ws = malloc((size_t)moe_cpu_route_workspace_bytes(S, E));
    assert_non_null(rc->ws);
    rc->a.workspace = rc->ws;
    fake_host_init();
}

static void case_free(route_case *rc) { free(rc->ws); }

static void set_probs(route_case *rc, int64_t s, const double *p)
{
    for (int e = 0; e < rc->a.E; e++)
        rc->logits[s * rc->a.E + e] = (float)log(p[e]);
}

/* A(i, j) of the file comment, E = 4 */
static void set_A(route_case *rc, int64_t s, int i, int j)
{
    double p[4] = {0.125, 0.125, 0.125, 0.125};
    p[i] = 0.5;
    p[j] = 0.25;
    set_probs(rc, s, p);
}

static void set_U(route_case *rc, int64_t s)
{
    const double p[4] = {0.25, 0.25, 0.25, 0.25};
    set_probs(rc, s, p);
}

static void run(route_case *rc)
{
    assert_int_equal(moe_cpu_route_forward(&fake_ctx, &rc->a), MOE_OK);
}

static void expect_route(const route_case *rc, int64_t s, int e1, int c1, double w1, int e2, int c2, double w2)
{
    assert_int_equal(rc->expert[s * 2], e1);
    assert_int_equal(rc->slot[s * 2], c1);
    assert_float_equal(rc->weight[s * 2], w1, 1e-6);
    assert_int_equal(rc->expert[s * 2 + 1], e2);
    assert_int_equal(rc->slot[s * 2 + 1], c2);
    assert_float_equal(rc->weight[s * 2 + 1], w2, 1e-6);
}

/* The S = 8, E = 4 example used by several tests (policy all):
 *   s: 0=A(0,1) 1=A(0,2) 2=A(0,1) 3=A(1,0) 4=U(ties: 0 then 1) 5=A(2,0) 6=A(0,3) 7=A(1,2) */
static void case_s8(route_case *rc, int64_t C)
{
    case_init(rc, 8, 4, 2, C, MOE_ROUTE_ALL);
    set_A(rc, 0, 0, 1);
    set_A(rc, 1, 0, 2);
    set_A(rc, 2, 0, 1);
    set_A(rc, 3, 1, 0);
    set_U(rc, 4);
    set_A(rc, 5, 2, 0);
    set_A(rc, 6, 0, 3);
    set_A(rc, 7, 1, 2);
}

/* ---------------------------------------------------------------- tests */

/* Capacity slots with C = 2 (§2.2 steps 11, 14, 16, 17).
 * First choices in token order: e0 <- s0:0 s1:1 s2:2x s4:3x s6:4x; e1 <- s3:0 s7:1;
 * e2 <- s5:0; first-choice totals [5, 2, 1, 0].
 * Second choices start after those totals: e0 <- s3:5x s5:6x; e1 <- s0:2x s2:3x s4:4x;
 * e2 <- s1:1 s7:2x; e3 <- s6:0.  (x = dropped, >= C)
 * Weights: s1 keeps both, 0.5/0.75 and 0.25/0.75; s0, s3, s5, s7 keep only the
 * first and s6 only the second: weight exactly 1.0; s2 and s4 keep neither. */
static void test_route_slot_order_and_drops(void **state)
{
    (void)state;
    route_case rc;
    case_s8(&rc, 2);
    run(&rc);
    expect_route(&rc, 0, 0, 0, 1.0, 1, -1, 0.0);
    expect_route(&rc, 1, 0, 1, 2.0 / 3.0, 2, 1, 1.0 / 3.0);
    expect_route(&rc, 2, 0, -1, 0.0, 1, -1, 0.0);
    expect_route(&rc, 3, 1, 0, 1.0, 0, -1, 0.0);
    expect_route(&rc, 4, 0, -1, 0.0, 1, -1, 0.0);
    expect_route(&rc, 5, 2, 0, 1.0, 0, -1, 0.0);
    expect_route(&rc, 6, 0, -1, 0.0, 3, 0, 1.0);
    expect_route(&rc, 7, 1, 1, 1.0, 2, -1, 0.0);
    /* only one survived: exactly 1.0, not merely close */
    assert_true(rc.weight[0] == 1.0f && rc.weight[6 * 2 + 1] == 1.0f);
    /* probabilities come back from the logits */
    assert_float_equal(rc.probs[4 * 4 + 2], 0.25, 1e-7);
    assert_float_equal(rc.probs[5 * 4 + 2], 0.5, 1e-7);

    /* With the training capacity 2 * ceil(8/4) = 4 nothing of the first
     * choices beyond slot 3 fits: e0's s6 (loc 4) is dropped, s4 (loc 3) kept;
     * second choices: e2 <- s1:1 s7:2, e3 <- s6:0 kept, e0 <- s3:5x, s5:6x,
     * e1 <- s0:2 s2:3 kept, s4:4x. */
    rc.a.capacity = 4;
    run(&rc);
    expect_route(&rc, 0, 0, 0, 2.0 / 3.0, 1, 2, 1.0 / 3.0);
    expect_route(&rc, 2, 0, 2, 2.0 / 3.0, 1, 3, 1.0 / 3.0);
    expect_route(&rc, 3, 1, 0, 1.0, 0, -1, 0.0);
    expect_route(&rc, 4, 0, 3, 1.0, 1, -1, 0.0);
    expect_route(&rc, 6, 0, -1, 0.0, 3, 0, 1.0);
    expect_route(&rc, 7, 1, 1, 2.0 / 3.0, 2, 2, 1.0 / 3.0);
    case_free(&rc);
}

/* Every metric of the S = 8, E = 4, C = 2 example (§2.2 steps 3, 12, 13, 15).
 *   overflow_expert1 = 100 * 3 dropped / 8 first choices = 37.5
 *   overflow_expert2 = 100 * 6 dropped / 8 second choices = 75
 *   entropy: A has 0.5 ln 2 + 0.25 ln 4 + 2 * 0.125 ln 8 = 1.75 ln 2, U has 2 ln 2;
 *            mean = (7 * 1.75 + 2) / 8 ln 2 = 1.78125 ln 2
 *   first-choice histogram [5, 2, 1, 0] / 8 = [62.5, 25, 12.5, 0] %, one unused;
 *            n = max(ceil(0.2 * 4), 1) = 1: top 62.5, bottom 0 + 1.18e-38 (FLT_MIN)
 *   second-choice histogram [2, 3, 2, 1] / 8 = [25, 37.5, 25, 12.5] %: top 37.5,
 *            bottom 12.5, none unused
 *   l_aux: me = column sums [2.875, 2.125, 1.75, 1.25] / 8, ce = [5, 2, 1, 0] / 8,
 *          l_aux = 4 * (2.875*5 + 2.125*2 + 1.75*1) / 64 = 81.5 / 64 = 1.2734375 */
static void test_route_metrics_s8_e4(void **state)
{
    (void)state;
    route_case rc;
    case_s8(&rc, 2);
    rc.metrics[MOE_METRIC_A2A_CPU_MS] = 123.0f; /* left for the caller */
    rc.metrics[MOE_METRIC_A2A_CUDA_MS] = 456.0f;
    run(&rc);
    const float *m = rc.metrics;
    assert_float_equal(m[MOE_METRIC_OVERFLOW_EXPERT1], 37.5, 1e-5);
    assert_float_equal(m[MOE_METRIC_OVERFLOW_EXPERT2], 75.0, 1e-5);
    assert_float_equal(m[MOE_METRIC_ENTROPY_GATING], 1.78125 * log(2.0), 1e-6);
    assert_float_equal(m[MOE_METRIC_EXPERT1_BALANCE_TOP], 62.5, 1e-5);
    assert_true(m[MOE_METRIC_EXPERT1_BALANCE_BOTTOM] == FLT_MIN); /* 0 + tiny, not 0 */
    assert_float_equal(m[MOE_METRIC_UNUSED_EXPERT1_COUNT], 1.0, 0.0);
    assert_float_equal(m[MOE_METRIC_EXPERT2_BALANCE_TOP], 37.5, 1e-5);
    assert_float_equal(m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM], 12.5, 1e-5);
    assert_float_equal(m[MOE_METRIC_UNUSED_EXPERT2_COUNT], 0.0, 0.0);
    assert_float_equal(m[MOE_METRIC_A2A_CPU_MS], 123.0, 0.0);
    assert_float_equal(m[MOE_METRIC_A2A_CUDA_MS], 456.0, 0.0);
    assert_float_equal(rc.l_aux, 1.2734375, 1e-6);
    case_free(&rc);
}

/* E = 8 takes the n = max(ceil(0.2 * 8), 1) = 2 largest and smallest entries.
 * 8 tokens, first choices e0 x3, e1 x2, e2, e3, e4 x1 (e5..e7 unused):
 * histogram [37.5, 25, 12.5, 12.5, 12.5, 0, 0, 0]: top 62.5, bottom 2 * FLT_MIN. */
static void test_route_balance_e8(void **state)
{
    (void)state;
    route_case rc;
    case_init(&rc, 8, 8, 2, 4, MOE_ROUTE_ALL);
    const int first[8] = {0, 0, 0, 1, 1, 2, 3, 4};
    for (int s = 0; s < 8; s++) {
        double p[8];
        for (int e = 0; e < 8; e++)
            p[e] = 0.05;
        p[first[s]] = 0.5;
        p[(first[s] + 1) % 8] = 0.2; /* second choices e1 x3, e2 x2, e3, e4, e5 */
        set_probs(&rc, s, p);
    }
    run(&rc);
    assert_float_equal(rc.metrics[MOE_METRIC_EXPERT1_BALANCE_TOP], 62.5, 1e-5);
    assert_true(rc.metrics[MOE_METRIC_EXPERT1_BALANCE_BOTTOM] == 2.0f * FLT_MIN);
    assert_float_equal(rc.metrics[MOE_METRIC_UNUSED_EXPERT1_COUNT], 3.0, 0.0);
    /* second: [0, 37.5, 25, 12.5, 12.5, 12.5, 0, 0]: top 62.5, e0, e6, e7 unused */
    assert_float_equal(rc.metrics[MOE_METRIC_EXPERT2_BALANCE_TOP], 62.5, 1e-5);
    assert_float_equal(rc.metrics[MOE_METRIC_UNUSED_EXPERT2_COUNT], 3.0, 0.0);
    assert_true(rc.metrics[MOE_METRIC_EXPERT2_BALANCE_BOTTOM] == 2.0f * FLT_MIN);
    case_free(&rc);
}

/* l_aux = 1.0 exactly at perfect balance: token s = A(s, s+1 mod 4), so every
 * expert's mean probability is (0.5 + 0.25 + 0.125 + 0.125) / 4 = 1/4 and every
 * expert gets one first choice: 4 * 4 * (1/4 * 1/4) = 1. */
static void test_route_laux_perfect_balance(void **state)
{
    (void)state;
    route_case rc;
    case_init(&rc, 4, 4, 2, 2, MOE_ROUTE_ALL);
    for (int s = 0; s < 4; s++)
        set_A(&rc, s, s, (s + 1) % 4);
    run(&rc);
    assert_float_equal(rc.l_aux, 1.0, 1e-6);
    assert_float_equal(rc.metrics[MOE_METRIC_UNUSED_EXPERT1_COUNT], 0.0, 0.0);
    assert_float_equal(rc.metrics[MOE_METRIC_OVERFLOW_EXPERT1], 0.0, 0.0);
    assert_float_equal(rc.metrics[MOE_METRIC_OVERFLOW_EXPERT2], 0.0, 0.0);
    case_free(&rc);
}

/* Gradient through the weights only (dl_aux = 0), C = 2 example, dweight = 1
 * for the first choice and 0 for the second.
 * Tokens whose weight is the constant x/x = 1 (s0, s3, s5, s6, s7) and tokens
 * with both choices dropped (s2, s4) get exactly zero gradient.
 * s1 = A(0,2) keeps both: w1 = p1/(p1+p2) with p1 = 0.5, p2 = 0.25, D = 0.75;
 *   dL/dp1 = p2/D^2 = 4/9, dL/dp2 = -p1/D^2 = -8/9; sum_e p dL/dp = 0, so
 *   dlogits = p * dL/dp = [2/9, 0, -2/9, 0]. */
static void test_route_backward_only_one_survived(void **state)
{
    (void)state;
    route_case rc;
    case_s8(&rc, 2);
    run(&rc);
    float dw[16], dl[32];
    for (int s = 0; s < 8; s++) {
        dw[s * 2] = 1.0f;
        dw[s * 2 + 1] = 0.0f;
    }
    assert_int_equal(moe_cpu_route_backward(&fake_ctx, &rc.a, dw, 0.0f, dl), MOE_OK);
    for (int s = 0; s < 8; s++)
        for (int e = 0; e < 4; e++)
            if (s != 1)
                assert_true(dl[s * 4 + e] == 0.0f);
    assert_float_equal(dl[4 + 0], 2.0 / 9.0, 1e-6);
    assert_float_equal(dl[4 + 1], 0.0, 1e-7);
    assert_float_equal(dl[4 + 2], -2.0 / 9.0, 1e-6);
    assert_float_equal(dl[4 + 3], 0.0, 1e-7);

    /* any dweight on the survivor still gives zero: the path is x/x */
    for (int i = 0; i < 16; i++)
        dw[i] = 0.3f + 0.1f * (float)i;
    assert_int_equal(moe_cpu_route_backward(&fake_ctx, &rc.a, dw, 0.0f, dl), MOE_OK);
    for (int e = 0; e < 4; e++) {
        assert_true(dl[0 * 4 + e] == 0.0f);
        assert_true(dl[6 * 4 + e] == 0.0f);
    }
    case_free(&rc);
}

/* --moe-normalize-gate-prob-before-dropping: g = p/(p1+p2) before capacity
 * and no renormalisation after. C = 2 example: s0 = A(0,1) keeps only its
 * first choice, with weight 0.5/0.75 = 2/3 (not 1); s6 = A(0,3) keeps only
 * its second: 0.25/0.75 = 1/3; s1 keeps both: 2/3, 1/3.
 * Backward for s0 with dweight (1, 0): the dropped second probability is in
 * the denominator, so dL/dp = [p2, -p1, 0, 0]/D^2 = [4/9, -8/9, 0, 0] and
 * dlogits = p * dL/dp = [2/9, -2/9, 0, 0]. */
static void test_route_normalize_before_dropping(void **state)
{
    (void)state;
    route_case rc;
    case_s8(&rc, 2);
    rc.a.normalize_before_drop = 1;
    run(&rc);
    expect_route(&rc, 0, 0, 0, 2.0 / 3.0, 1, -1, 0.0);
    expect_route(&rc, 1, 0, 1, 2.0 / 3.0, 2, 1, 1.0 / 3.0);
    expect_route(&rc, 2, 0, -1, 0.0, 1, -1, 0.0);
    expect_route(&rc, 6, 0, -1, 0.0, 3, 0, 1.0 / 3.0);
    float dw[16] = {0}, dl[32];
    dw[0] = 1.0f;
    assert_int_equal(moe_cpu_route_backward(&fake_ctx, &rc.a, dw, 0.0f, dl), MOE_OK);
    assert_float_equal(dl[0], 2.0 / 9.0, 1e-6);
    assert_float_equal(dl[1], -2.0 / 9.0, 1e-6);
    assert_float_equal(dl[2], 0.0, 1e-7);
    assert_float_equal(dl[3], 0.0, 1e-7);
    for (int i = 4; i < 32; i++)
        assert_true(dl[i] == 0.0f);
    case_free(&rc);
}

/* --moe-batch-prioritized-routing, S = 4, E = 2, C = 2:
 *   s0 [0.6, 0.4]  s1 [0.9, 0.1]  s2 [0.3, 0.7]  s3 [0.9, 0.1]
 * Token order: e0 <- s0:0 s1:1 s3:2x; e1 <- s2:0; second: e1 <- s0:1 s1:2x s3:3x;
 *   e0 <- s2:3x.
 * Priority order s1, s3 (equal 0.9: token order kept), s2 (0.7), s0 (0.6):
 *   e0 <- s1:0 s3:1 s0:2x; e1 <- s2:0; second (same order, after the totals
 *   [3, 1]): e1 <- s1:1 s3:2x s0:3x; e0 <- s2:3x. */
static void test_route_batch_prioritized(void **state)
{
    (void)state;
    route_case rc;
    case_init(&rc, 4, 2, 2, 2, MOE_ROUTE_ALL);
    const double p[4][2] = {{0.6, 0.4}, {0.9, 0.1}, {0.3, 0.7}, {0.9, 0.1}};
    for (int s = 0; s < 4; s++)
        set_probs(&rc, s, p[s]);
    run(&rc);
    expect_route(&rc, 0, 0, 0, 0.6, 1, 1, 0.4);
    expect_route(&rc, 1, 0, 1, 1.0, 1, -1, 0.0);
    expect_route(&rc, 2, 1, 0, 1.0, 0, -1, 0.0);
    expect_route(&rc, 3, 0, -1, 0.0, 1, -1, 0.0);

    rc.a.batch_prioritized = 1;
    run(&rc);
    expect_route(&rc, 0, 0, -1, 0.0, 1, -1, 0.0);
    expect_route(&rc, 1, 0, 0, 0.9, 1, 1, 0.1);
    expect_route(&rc, 2, 1, 0, 1.0, 0, -1, 0.0);
    expect_route(&rc, 3, 0, 1, 1.0, 1, -1, 0.0);
    /* one of 4 first choices (s0) and 3 of 4 second choices dropped */
    assert_float_equal(rc.metrics[MOE_METRIC_OVERFLOW_EXPERT1], 25.0, 1e-5);
    assert_float_equal(rc.metrics[MOE_METRIC_OVERFLOW_EXPERT2], 75.0, 1e-5);
    case_free(&rc);
}

/* Policy random: the second choice is kept iff 2 * g2 > u, with u drawn as
 * route.c documents. Every token is [0.5, 0.3, 0.2]: 2 * g2 = 0.6 raw, and
 * 0.75 with normalize-before-dropping (g2 = 0.3/0.8). Capacity never binds. */
static void test_route_random_policy(void **state)
{
    (void)state;
    route_case rc;
    const int S = 48;
    case_init(&rc, S, 3, 2, S, MOE_ROUTE_RANDOM);
    rc.a.seed = 99;
    const double p[3] = {0.5, 0.3, 0.2};
    for (int s = 0; s < S; s++)
        set_probs(&rc, s, p);
    int between = 0, kept_raw = 0, dropped_raw = 0;
    for (int norm = 0; norm <= 1; norm++) {
        rc.a.normalize_before_drop = norm;
        run(&rc);
        int next_slot = 0; /* e1 has no first choices: kept second choices take 0, 1, ... */
        for (int s = 0; s < S; s++) {
            float u = moe_philox_uniform(rc.a.seed, rc.a.stream ^ RANDOM_STREAM_XOR, (uint64_t)s);
            int keep = (norm ? 0.75f : 0.6f) > u;
            if (!norm) {
                between += u >= 0.6f && u < 0.75f;
                kept_raw += keep;
                dropped_raw += !keep;
            }
            assert_int_equal(rc.expert[s * 2 + 1], 1); /* the choice is kept even when dropped */
            if (keep) {
                assert_int_equal(rc.slot[s * 2 + 1], next_slot++);
                /* 0.3/0.8 either way: renormalised over the two kept, or normalized before */
                assert_float_equal(rc.weight[s * 2 + 1], 0.375, 1e-6);
            } else {
                assert_int_equal(rc.slot[s * 2 + 1], -1);
                assert_float_equal(rc.weight[s * 2 + 1], 0.0, 0.0);
                /* only the first survived: 1.0, or 0.625 normalized before */
                assert_float_equal(rc.weight[s * 2], norm ? 0.625 : 1.0, 1e-6);
            }
        }
    }
    /* the seed is one where both outcomes and the band between occur */
    assert_true(between > 0 && kept_raw > 0 && dropped_raw > 0);
    /* overflow_expert2 counts only the kept (sampled) second choices: none overflow */
    assert_float_equal(rc.metrics[MOE_METRIC_OVERFLOW_EXPERT2], 0.0, 0.0);
    case_free(&rc);
}

/* Policy sampling: second choice = argmax over e != i1 of logit + Gumbel noise,
 * noise -log(-log(u)), u = philox(seed, stream, s*E + e) clamped to
 * [FLT_MIN, 1 - FLT_EPSILON]. Reproducible for a seed, different for another. */
static void test_route_sampling_reproducible(void **state)
{
    (void)state;
    route_case rc;
    const int S = 32, E = 8;
    case_init(&rc, S, E, 2, 2 * S, MOE_ROUTE_SAMPLING);
    uint32_t x = 12345u;
    for (int i = 0; i < S * E; i++) {
        x = x * 1664525u + 1013904223u;
        rc.logits[i] = (float)(x >> 8) / 16777216.0f; /* flat-ish: noise matters */
    }
    rc.a.seed = 2024;
    rc.a.stream = 3;
    run(&rc);
    int32_t first[MAXS * 2];
    memcpy(first, rc.expert, sizeof first);
    for (int s = 0; s < S; s++) {
        const float *l = rc.logits + s * E;
        int i1 = 0;
        for (int e = 1; e < E; e++)
            if (rc.probs[s * E + e] > rc.probs[s * E + i1])
                i1 = e;
        int i2 = -1;
        float best = 0.0f;
        for (int e = 0; e < E; e++) {
            if (e == i1)
                continue;
            float u = moe_philox_uniform(2024, 3, (uint64_t)(s * E + e));
            u = u < FLT_MIN ? FLT_MIN : (u > 1.0f - FLT_EPSILON ? 1.0f - FLT_EPSILON : u);
            float v = l[e] + (float)-log(-log((double)u));
            if (i2 < 0 || v > best) {
                i2 = e;
                best = v;
            }
        }
        assert_int_equal(rc.expert[s * 2], i1);
        assert_int_equal(rc.expert[s * 2 + 1], i2);
    }
    run(&rc);
    assert_memory_equal(first, rc.expert, sizeof first);
    /* the noise decides: the deterministic second-best differs somewhere */
    int differs_all = 0, differs_seed = 0, differs_stream = 0;
    rc.a.policy = MOE_ROUTE_ALL;
    run(&rc);
    for (int i = 0; i < 2 * S; i++)
        differs_all += rc.expert[i] != first[i];
    rc.a.policy = MOE_ROUTE_SAMPLING;
    rc.a.seed = 2025;
    run(&rc);
    for (int i = 0; i < 2 * S; i++)
        differs_seed += rc.expert[i] != first[i];
    rc.a.seed = 2024;
    rc.a.stream = 4;
    run(&rc);
    for (int i = 0; i < 2 * S; i++)
        differs_stream += rc.expert[i] != first[i];
    assert_true(differs_all > 0 && differs_seed > 0 && differs_stream > 0);
    case_free(&rc);
}

/* Pad tokens (§2.2 step 10), S = 4, E = 2, C = 4:
 *   s0 pad [0.75, 0.25]; s1 [0.75, 0.25]; s2 [0.25, 0.75]; s3 pad [0.25, 0.75]
 * Pads route nowhere and take no capacity: s1 -> e0:0 and e1:1 (after e1's one
 * first choice, s2), s2 -> e1:0 and e0:1.
 * l_aux: me over all four tokens = [0.5, 0.5], ce from non-pads = [1/4, 1/4]:
 *   2 * (0.5/4 + 0.5/4) = 0.5. The histograms count pads (before masking):
 *   first choices [2, 2] -> 50 %, 50 %. Entropy counts pads too. */
static void test_route_pad_tokens(void **state)
{
    (void)state;
    route_case rc;
    case_init(&rc, 4, 2, 2, 4, MOE_ROUTE_ALL);
    const double a[2] = {0.75, 0.25}, b[2] = {0.25, 0.75};
    set_probs(&rc, 0, a);
    set_probs(&rc, 1, a);
    set_probs(&rc, 2, b);
    set_probs(&rc, 3, b);
    rc.pad[0] = rc.pad[3] = 1;
    rc.a.pad = rc.pad;
    run(&rc);
    expect_route(&rc, 0, -1, -1, 0.0, -1, -1, 0.0);
    expect_route(&rc, 1, 0, 0, 0.75, 1, 1, 0.25);
    expect_route(&rc, 2, 1, 0, 0.75, 0, 1, 0.25);
    expect_route(&rc, 3, -1, -1, 0.0, -1, -1, 0.0);
    assert_float_equal(rc.l_aux, 0.5, 1e-6);
    assert_float_equal(rc.metrics[MOE_METRIC_EXPERT1_BALANCE_TOP], 50.0, 1e-5);
    assert_float_equal(rc.metrics[MOE_METRIC_EXPERT1_BALANCE_BOTTOM], 50.0, 1e-5);
    double h = -(0.75 * log(0.75) + 0.25 * log(0.25));
    assert_float_equal(rc.metrics[MOE_METRIC_ENTROPY_GATING], h, 1e-6);
    assert_float_equal(rc.metrics[MOE_METRIC_OVERFLOW_EXPERT1], 0.0, 0.0);

    /* backward: pads get only the l_aux gradient (me counts them); with
     * dl_aux = 1: dL/dp_e = E * ce_e / S = 2 * (1/4) / 4 = 1/8 for both experts,
     * a constant shift the softmax removes: zero. */
    float dw[8] = {1, 1, 1, 1, 1, 1, 1, 1}, dl[8];
    assert_int_equal(moe_cpu_route_backward(&fake_ctx, &rc.a, dw, 1.0f, dl), MOE_OK);
    for (int e = 0; e < 2; e++) {
        assert_float_equal(dl[0 * 2 + e], 0.0, 1e-7);
        assert_float_equal(dl[3 * 2 + e], 0.0, 1e-7);
    }
    case_free(&rc);
}

/* Top-1 (§2.3), S = 4, E = 2, C = ceil(4/2) = 2:
 *   s0 [0.75, 0.25] s1 [0.6, 0.4] s2 [0.9, 0.1] s3 [0.2, 0.8]
 * e0 <- s0:0 s1:1 s2:2x; e1 <- s3:0. Weights are the raw probabilities.
 * l_aux = 2 * (me . ce) with me = [2.45, 1.55]/4, ce = [3, 1]/4:
 *   2 * (7.35 + 1.55) / 16 = 1.1125. Histogram [75, 25] %, n = 1.
 * Overflow and second-expert metrics are not produced: 0.
 * Backward: dweight 1 on s1's weight p0: dlogits = p0 * (onehot0 - p) = 0.6 * [0.4, -0.4]. */
static void test_route_top1(void **state)
{
    (void)state;
    route_case rc;
    case_init(&rc, 4, 2, 1, 2, MOE_ROUTE_SAMPLING);
    const double p[4][2] = {{0.75, 0.25}, {0.6, 0.4}, {0.9, 0.1}, {0.2, 0.8}};
    for (int s = 0; s < 4; s++)
        set_probs(&rc, s, p[s]);
    for (int i = 0; i < MOE_NUM_METRICS; i++)
        rc.metrics[i] = -1.0f;
    run(&rc);
    expect_route(&rc, 0, 0, 0, 0.75, -1, -1, 0.0);
    expect_route(&rc, 1, 0, 1, 0.6, -1, -1, 0.0);
    expect_route(&rc, 2, 0, -1, 0.0, -1, -1, 0.0);
    expect_route(&rc, 3, 1, 0, 0.8, -1, -1, 0.0);
    assert_float_equal(rc.l_aux, 1.1125, 1e-6);
    const float *m = rc.metrics;
    assert_float_equal(m[MOE_METRIC_OVERFLOW_EXPERT1], 0.0, 0.0);
    assert_float_equal(m[MOE_METRIC_OVERFLOW_EXPERT2], 0.0, 0.0);
    assert_float_equal(m[MOE_METRIC_EXPERT1_BALANCE_TOP], 75.0, 1e-5);
    assert_float_equal(m[MOE_METRIC_EXPERT1_BALANCE_BOTTOM], 25.0, 1e-5);
    assert_float_equal(m[MOE_METRIC_UNUSED_EXPERT1_COUNT], 0.0, 0.0);
    assert_float_equal(m[MOE_METRIC_EXPERT2_BALANCE_TOP], 0.0, 0.0);
    assert_float_equal(m[MOE_METRIC_EXPERT2_BALANCE_BOTTOM], 0.0, 0.0);
    assert_float_equal(m[MOE_METRIC_UNUSED_EXPERT2_COUNT], 0.0, 0.0);

    float dw[8] = {0}, dl[8];
    dw[1 * 2] = 1.0f;
    assert_int_equal(moe_cpu_route_backward(&fake_ctx, &rc.a, dw, 0.0f, dl), MOE_OK);
    assert_float_equal(dl[2], 0.6 * 0.4, 1e-6);
    assert_float_equal(dl[3], -0.6 * 0.4, 1e-6);
    for (int i = 0; i < 8; i++)
        if (i != 2 && i != 3)
            assert_true(dl[i] == 0.0f);
    case_free(&rc);
}

/* A saturated gate: logits [0, -200, -200, -200] give p = [1, 0, 0, 0] in fp32.
 *  - Entropy uses torch's clamp of p to [eps, 1 - eps] inside the log:
 *    -(1 * ln(1 - 2^-23)) = 1.1920929e-7 per token, not 0.
 *  - The second choice (e1, the lowest of the tied zeros) claims a slot but its
 *    weight 0/(1 + 0) is 0: fairseq does not dispatch it (dispatch = weight != 0),
 *    so slot -1, and the slot stays used: s1 = A(0,1) gets e1's slot 1, not 0.
 *    The first choice gets 1/(1 + 0) = 1.0. */
static void test_route_saturated_gate(void **state)
{
    (void)state;
    route_case rc;
    case_init(&rc, 1, 4, 2, 4, MOE_ROUTE_ALL);
    const float sat[4] = {0.0f, -200.0f, -200.0f, -200.0f};
    memcpy(rc.logits, sat, sizeof sat);
    run(&rc);
    assert_float_equal(rc.metrics[MOE_METRIC_ENTROPY_GATING], -log(1.0 - (double)FLT_EPSILON), 1e-13);
    assert_true(rc.metrics[MOE_METRIC_ENTROPY_GATING] > 0.0f);
    case_free(&rc);

    case_init(&rc, 2, 4, 2, 4, MOE_ROUTE_ALL);
    memcpy(rc.logits, sat, sizeof sat);
    set_A(&rc, 1, 0, 1);
    run(&rc);
    expect_route(&rc, 0, 0, 0, 1.0, 1, -1, 0.0);
    expect_route(&rc, 1, 0, 1, 2.0 / 3.0, 1, 1, 1.0 / 3.0);
    case_free(&rc);
}

/* ------------------------------------------------- finite differences */

/* L = sum_{s,j} c[s,j] * weight[s,j] + lam * l_aux, computed from a forward. */
static double fd_loss(route_case *rc, const float *c, float lam)
{
    run(rc);
    double L = (double)lam * (double)rc->l_aux;
    for (int64_t i = 0; i < 2 * rc->a.S; i++)
        L += (double)c[i] * (double)rc->weight[i];
    return L;
}

/* route_backward against central differences of route_forward, for one
 * configuration; elements whose perturbation changes the routing are skipped
 * (none should, by construction; at least 95 % must be checked). */
static void fd_check(int k, int norm_before, int64_t C, moe_route_policy policy, int with_pad)
{
    route_case rc;
    const int S = 12, E = 4;
    case_init(&rc, S, E, k, C, policy);
    rc.a.normalize_before_drop = norm_before;
    uint32_t x = 777u + (uint32_t)(k * 10 + norm_before + (int)C);
    for (int i = 0; i < S * E; i++) {
        x = x * 1664525u + 1013904223u;
        rc.logits[i] = 2.0f * ((float)(x >> 8) / 16777216.0f) - 1.0f;
    }
    if (with_pad) {
        rc.pad[3] = rc.pad[7] = 1;
        rc.a.pad = rc.pad;
    }
    float c[MAXS * 2];
    for (int i = 0; i < 2 * S; i++) {
        x = x * 1664525u + 1013904223u;
        c[i] = (float)(x >> 8) / 16777216.0f - 0.3f;
    }
    const float lam = 0.7f;
    run(&rc);
    int32_t e0[MAXS * 2], s0[MAXS * 2];
    memcpy(e0, rc.expert, sizeof e0);
    memcpy(s0, rc.slot, sizeof s0);
    float dl[MAXS * MAXE];
    assert_int_equal(moe_cpu_route_backward(&fake_ctx, &rc.a, c, lam, dl), MOE_OK);

    int checked = 0, total = 0;
    const float h = 2e-3f;
    for (int i = 0; i < S * E; i++) {
        float keep = rc.logits[i];
        rc.logits[i] = keep + h;
        double lp = fd_loss(&rc, c, lam);
        int same = memcmp(e0, rc.expert, sizeof e0) == 0 && memcmp(s0, rc.slot, sizeof s0) == 0;
        rc.logits[i] = keep - h;
        double lm = fd_loss(&rc, c, lam);
        same = same && memcmp(e0, rc.expert, sizeof e0) == 0 && memcmp(s0, rc.slot, sizeof s0) == 0;
        rc.logits[i] = keep;
        total++;
        if (!same)
            continue;
        checked++;
        double num = (lp - lm) / ((double)(keep + h) - (double)(keep - h));
        if (fabs(num - (double)dl[i]) > 2e-4 * fmax(1.0, fabs(num)))
            fail_msg("k=%d norm_before=%d C=%lld policy=%d pad=%d: dlogits[%d] = %.6g, finite difference %.6g", k,
                     norm_before, (long long)C, (int)policy, with_pad, i, (double)dl[i], num);
    }
    assert_true(checked * 100 >= total * 95);
    /* the gradient is not trivially zero */
    double norm = 0.0;
    for (int i = 0; i < S * E; i++)
        norm += fabs((double)dl[i]);
    assert_true(norm > 1e-3);
    case_free(&rc);
}

static void test_route_backward_finite_difference(void **state)
{
    (void)state;
    fd_check(2, 0, 6, MOE_ROUTE_ALL, 0);      /* training capacity 2*ceil(12/4) */
    fd_check(2, 0, 2, MOE_ROUTE_ALL, 0);      /* tight: drops, only-one-survived */
    fd_check(2, 1, 2, MOE_ROUTE_ALL, 0);      /* normalize before dropping */
    fd_check(2, 0, 3, MOE_ROUTE_SAMPLING, 1); /* noise fixed by the seed; pads */
    fd_check(2, 1, 4, MOE_ROUTE_RANDOM, 0);
    fd_check(1, 0, 3, MOE_ROUTE_ALL, 0);      /* top-1: raw probability */
    fd_check(1, 0, 2, MOE_ROUTE_ALL, 1);
}

/* ------------------------------------------------- dispatch and combine */

/* S = 3, E = 2, C = 2, d = 2:
 *   s0 -> (e1, slot 0, w 0.25) and (e0, slot 1, w 0.75); s1 -> (e0, 0, 1.0), second dropped;
 *   s2 -> nothing.
 * Dispatch rows (e*C + c): 0 = x1, 1 = x0, 2 = x0, 3 = zero. */
static void test_route_dispatch_combine(void **state)
{
    (void)state;
    const int32_t expert[6] = {1, 0, 0, 1, 0, -1};
    const int32_t slot[6] = {0, 1, 0, -1, -1, -1};
    const float weight[6] = {0.25f, 0.75f, 1.0f, 0.0f, 0.0f, 0.0f};
    const float x[6] = {1, 2, 3, 4, 5, 6};
    float out[8];
    memset(out, 0x7f, sizeof out); /* garbage: dispatch must write every row */
    assert_int_equal(moe_cpu_dispatch_forward(&fake_ctx, out, x, expert, slot, 3, 2, 2, 2, MOE_F32), MOE_OK);
    const float want[8] = {3, 4, 1, 2, 1, 2, 0, 0};
    assert_memory_equal(out, want, sizeof want);

    /* dispatch backward accumulates: dx[s] += rows of s */
    const float dout[8] = {1, 1, 10, 10, 100, 100, 1000, 1000};
    float dx[6] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    assert_int_equal(moe_cpu_dispatch_backward(&fake_ctx, dx, dout, expert, slot, 3, 2, 2, 2, MOE_F32), MOE_OK);
    const float want_dx[6] = {110.5f, 110.5f, 1.5f, 1.5f, 0.5f, 0.5f};
    assert_memory_equal(dx, want_dx, sizeof want_dx);

    /* combine: y0 = 0.25 * row2 + 0.75 * row1, y1 = row0, y2 = 0 */
    const float eout[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    float y[6];
    memset(y, 0x7f, sizeof y);
    assert_int_equal(moe_cpu_combine_forward(&fake_ctx, y, eout, expert, slot, weight, 3, 2, 2, 2, MOE_F32),
                     MOE_OK);
    const float want_y[6] = {0.25f * 5 + 0.75f * 3, 0.25f * 6 + 0.75f * 4, 1, 2, 0, 0};
    assert_memory_equal(y, want_y, sizeof want_y);

    /* combine backward: deout[row] = w * dy[s], dweight = <dy[s], eout[row]> */
    const float dy[6] = {1, -1, 2, 3, 7, 7};
    float deout[8], dweight[6];
    memset(deout, 0x7f, sizeof deout);
    memset(dweight, 0x7f, sizeof dweight);
    assert_int_equal(moe_cpu_combine_backward(&fake_ctx, deout, dweight, dy, eout, expert, slot, weight, 3, 2, 2, 2,
                                              MOE_F32),
                     MOE_OK);
    const float want_deout[8] = {2, 3, 0.75f, -0.75f, 0.25f, -0.25f, 0, 0};
    assert_memory_equal(deout, want_deout, sizeof want_deout);
    const float want_dw[6] = {5 - 6, 3 - 4, 2 * 1 + 3 * 2, 0, 0, 0};
    assert_memory_equal(dweight, want_dw, sizeof want_dw);

    /* fp16 storage: dispatch is an exact copy */
    uint16_t xh[6], outh[8];
    for (int i = 0; i < 6; i++)
        xh[i] = moe_f32_to_f16(x[i] / 3.0f);
    assert_int_equal(moe_cpu_dispatch_forward(&fake_ctx, outh, xh, expert, slot, 3, 2, 2, 2, MOE_F16), MOE_OK);
    assert_int_equal(outh[2], xh[0]);
    assert_int_equal(outh[5], xh[1]);
    assert_int_equal(outh[1], xh[3]);
    assert_int_equal(outh[6], 0);
}

/* Combine backward against central differences in eout and weight, and
 * dispatch backward as the adjoint of dispatch forward: <D x, r> = <x, D^T r>. */
static void test_route_dispatch_combine_finite_difference(void **state)
{
    (void)state;
    enum { S = 5, E = 3, C = 2, D = 3 };
    /* every (expert, slot) used once; s2's second choice absent, s3's first and
     * both of s4's dropped */
    const int32_t expert[2 * S] = {0, 1, 2, 0, 1, -1, 0, 2, 1, 2};
    const int32_t slot[2 * S] = {0, 0, 0, 1, 1, -1, -1, 1, -1, -1};
    float weight[2 * S], eout[E * C * D], dy[S * D], x[S * D], r[E * C * D];
    uint32_t u = 5u;
#define NEXT() (u = u * 1664525u + 1013904223u, (float)(u >> 8) / 16777216.0f - 0.5f)
    for (int i = 0; i < 2 * S; i++)
        weight[i] = NEXT();
    for (int i = 0; i < E * C * D; i++) {
        eout[i] = NEXT();
        r[i] = NEXT();
    }
    for (int i = 0; i < S * D; i++) {
        dy[i] = NEXT();
        x[i] = NEXT();
    }
#undef NEXT
    float deout[E * C * D], dweight[2 * S], y[S * D];
    assert_int_equal(moe_cpu_combine_backward(&fake_ctx, deout, dweight, dy, eout, expert, slot, weight, S, E, C, D,
                                              MOE_F32),
                     MOE_OK);
    const float h = 1e-2f; /* L is linear in each variable: the difference is exact up to rounding */
#define LOSS(out_)                                                                                                \
    do {                                                                                                          \
        assert_int_equal(moe_cpu_combine_forward(&fake_ctx, y, eout, expert, slot, weight, S, E, C, D, MOE_F32),  \
                         MOE_OK);                                                                                 \
        double acc_ = 0.0;                                                                                        \
        for (int q_ = 0; q_ < S * D; q_++)                                                                        \
            acc_ += (double)y[q_] * (double)dy[q_];                                                               \
        (out_) = acc_;                                                                                            \
    } while (0)
    for (int i = 0; i < E * C * D; i++) {
        double lp, lm;
        float keep = eout[i];
        eout[i] = keep + h;
        LOSS(lp);
        eout[i] = keep - h;
        LOSS(lm);
        eout[i] = keep;
        assert_float_equal((lp - lm) / (2.0 * h), deout[i], 1e-4);
    }
    for (int i = 0; i < 2 * S; i++) {
        double lp, lm;
        float keep = weight[i];
        weight[i] = keep + h;
        LOSS(lp);
        weight[i] = keep - h;
        LOSS(lm);
        weight[i] = keep;
        assert_float_equal((lp - lm) / (2.0 * h), dweight[i], 1e-4);
    }
#undef LOSS
    float dx[S * D], dsp[E * C * D];
    memset(dx, 0, sizeof dx);
    assert_int_equal(moe_cpu_dispatch_forward(&fake_ctx, dsp, x, expert, slot, S, E, C, D, MOE_F32), MOE_OK);
    assert_int_equal(moe_cpu_dispatch_backward(&fake_ctx, dx, r, expert, slot, S, E, C, D, MOE_F32), MOE_OK);
    double lhs = 0.0, rhs = 0.0;
    for (int i = 0; i < E * C * D; i++)
        lhs += (double)dsp[i] * (double)r[i];
    for (int i = 0; i < S * D; i++)
        rhs += (double)x[i] * (double)dx[i];
    assert_float_equal(lhs, rhs, 1e-5);
    assert_true(fabs(lhs) > 1e-3);
}

/* ------------------------------------------------------------ bad input */

static void test_route_rejects_bad_arguments(void **state)
{
    (void)state;
    route_case rc;
    case_s8(&rc, 2);
    rc.a.k = 3;
    assert_int_equal(moe_cpu_route_forward(&fake_ctx, &rc.a), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(last_error, "expected k = 1 (top-1) or 2 (top-2), found 3"));
    rc.a.k = 2;
    rc.a.E = 1;
    assert_int_equal(moe_cpu_route_forward(&fake_ctx, &rc.a), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(last_error, "found E = 1"));
    rc.a.E = 4;
    rc.a.workspace = NULL;
    assert_int_equal(moe_cpu_route_forward(&fake_ctx, &rc.a), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(last_error, "workspace"));
    rc.a.workspace = rc.ws;
    run(&rc);
    /* a routing made for capacity 2 does not fit a capacity-1 buffer */
    float x[8 * 2] = {0}, out[4 * 1 * 2];
    assert_int_equal(moe_cpu_dispatch_forward(&fake_ctx, out, x, rc.expert, rc.slot, 8, 4, 1, 2, MOE_F32),
                     MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(last_error, "same capacity"));
    case_free(&rc);
}

/* ------------------------------------------------------- gate plugins */

static const moe_plugin_desc *load_gate(const char *name, void **handle)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/libmoe-gate-%s.so", MOE_TEST_PLUGIN_DIR, name);
    *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (*handle == NULL)
        fail_msg("cannot load %s: %s", path, dlerror());
    moe_plugin_entry_fn entry;
    void *sym = dlsym(*handle, MOE_PLUGIN_SYMBOL);
    assert_non_null(sym);
    memcpy(&entry, &sym, sizeof entry);
    const moe_plugin_desc *d = entry();
    assert_int_equal(d->abi_major, MOE_ABI_MAJOR);
    assert_int_equal(d->kind, MOE_KIND_GATE);
    assert_string_equal(d->name, name);
    assert_int_equal(d->ops_size, sizeof(moe_gate_ops));
    assert_int_equal(d->host_size, sizeof(moe_host));
    return d;
}

static const moe_option *find_option(const moe_plugin_desc *d, const char *name)
{
    for (int i = 0; i < d->n_options; i++)
        if (strcmp(d->options[i].name, name) == 0)
            return &d->options[i];
    return NULL;
}

/* Capacity (§2.2 step 4, §2.3) and options through the plugins.
 *   top2 train: 2 * ceil(S/E): S = 8192, E = 8 -> 2048; S = 10, E = 4 -> 2 * 3 = 6
 *   top2 eval, fraction 0.25: ceil(0.25 * 10) = 3; fraction -1: training rule, 6
 *   top1 train: ceil(S/E): S = 9, E = 4 -> 3; eval fraction 0.5: ceil(4.5) = 5 */
static void test_route_gate_plugins_capacity(void **state)
{
    (void)state;
    void *h2, *h1;
    const moe_plugin_desc *d2 = load_gate("top2", &h2), *d1 = load_gate("top1", &h1);
    const moe_option *o = find_option(d2, "moe-second-expert-policy");
    assert_non_null(o);
    assert_int_equal(o->type, MOE_OPT_CHOICE);
    assert_string_equal(o->default_value, "sampling");
    assert_string_equal(o->choices, "sampling|all|random");
    o = find_option(d2, "moe-eval-capacity-token-fraction");
    assert_non_null(o);
    assert_string_equal(o->default_value, "0.25");
    assert_non_null(find_option(d2, "moe-normalize-gate-prob-before-dropping"));
    assert_non_null(find_option(d2, "moe-batch-prioritized-routing"));
    /* top1 accepts the policy flag (no effect), so fairseq command lines keep working */
    const moe_option *p1 = find_option(d1, "moe-second-expert-policy");
    assert_non_null(p1);
    assert_string_equal(p1->choices, "sampling|all|random");
    const moe_option *o1 = find_option(d1, "moe-eval-capacity-token-fraction");
    assert_non_null(o1);
    assert_int_equal(o1->type, o->type); /* shared option: same type */

    const moe_gate_ops *g2 = d2->ops, *g1 = d1->ops;
    void *gate;
    moe_route_args a;

    fake_host_init();
    opt_policy = "all";
    opt_norm_before = 1;
    assert_int_equal(g2->init(&fake_host, 8, &gate), MOE_OK);
    memset(&a, 0, sizeof a);
    a.stream = 77;
    assert_int_equal(g2->configure(gate, 8192, 1, &a), MOE_OK);
    assert_int_equal(a.capacity, 2048);
    assert_int_equal(a.k, 2);
    assert_int_equal(a.E, 8);
    assert_int_equal(a.S, 8192);
    assert_int_equal(a.policy, MOE_ROUTE_ALL);
    assert_int_equal(a.normalize_before_drop, 1);
    assert_int_equal(a.batch_prioritized, 0);
    assert_int_equal(a.seed, 4242u);
    assert_int_equal(a.stream, 77u); /* the caller's */
    g2->destroy(gate);

    fake_host_init();
    opt_policy = "random";
    opt_bpr = 1;
    assert_int_equal(g2->init(&fake_host, 4, &gate), MOE_OK);
    assert_int_equal(g2->configure(gate, 10, 1, &a), MOE_OK);
    assert_int_equal(a.capacity, 6);
    assert_int_equal(a.policy, MOE_ROUTE_RANDOM);
    assert_int_equal(a.batch_prioritized, 1);
    assert_int_equal(g2->configure(gate, 10, 0, &a), MOE_OK);
    assert_int_equal(a.capacity, 3);
    g2->destroy(gate);
    opt_fraction = "-1.0";
    assert_int_equal(g2->init(&fake_host, 4, &gate), MOE_OK);
    assert_int_equal(g2->configure(gate, 10, 0, &a), MOE_OK);
    assert_int_equal(a.capacity, 6);
    g2->destroy(gate);

    fake_host_init();
    assert_int_equal(g2->init(&fake_host, 1, &gate), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(last_error, "--moe-expert-count >= 2"));

    fake_host_init();
    opt_fraction = "0.5";
    opt_bpr = 1; /* accepted, no effect on top-1, said in a warning */
    assert_int_equal(g1->init(&fake_host, 4, &gate), MOE_OK);
    assert_int_equal(n_warnings, 1);
    assert_int_equal(g1->configure(gate, 9, 1, &a), MOE_OK);
    assert_int_equal(a.capacity, 3);
    assert_int_equal(a.k, 1);
    assert_int_equal(a.batch_prioritized, 0);
    assert_int_equal(g1->configure(gate, 9, 0, &a), MOE_OK);
    assert_int_equal(a.capacity, 5);
    g1->destroy(gate);

    dlclose(h1);
    dlclose(h2);
}

/* forward/backward through the plugin reach the backend's route ops. */
static void test_route_gate_plugin_forward_backward(void **state)
{
    (void)state;
    void *h2;
    const moe_plugin_desc *d2 = load_gate("top2", &h2);
    const moe_gate_ops *g2 = d2->ops;
    route_case rc;
    case_s8(&rc, 0);
    opt_policy = "all";
    void *gate;
    assert_int_equal(g2->init(&fake_host, 4, &gate), MOE_OK);
    /* training capacity 2 * ceil(8/4) = 4: as the second half of
     * test_route_slot_order_and_drops */
    assert_int_equal(g2->configure(gate, 8, 1, &rc.a), MOE_OK);
    assert_int_equal(rc.a.capacity, 4);
    assert_int_equal(g2->forward(gate, &rc.a), MOE_OK);
    expect_route(&rc, 4, 0, 3, 1.0, 1, -1, 0.0);
    expect_route(&rc, 6, 0, -1, 0.0, 3, 0, 1.0);
    float dw[16] = {0}, dl[32];
    assert_int_equal(g2->backward(gate, &rc.a, dw, 1.0f, dl), MOE_OK);
    double norm = 0.0;
    for (int i = 0; i < 32; i++)
        norm += fabs((double)dl[i]);
    assert_true(norm > 1e-3); /* l_aux alone gives gradient */
    g2->destroy(gate);
    case_free(&rc);
    dlclose(h2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_slot_order_and_drops),
        cmocka_unit_test(test_route_metrics_s8_e4),
        cmocka_unit_test(test_route_balance_e8),
        cmocka_unit_test(test_route_laux_perfect_balance),
        cmocka_unit_test(test_route_backward_only_one_survived),
        cmocka_unit_test(test_route_normalize_before_dropping),
        cmocka_unit_test(test_route_batch_prioritized),
        cmocka_unit_test(test_route_random_policy),
        cmocka_unit_test(test_route_sampling_reproducible),
        cmocka_unit_test(test_route_pad_tokens),
        cmocka_unit_test(test_route_top1),
        cmocka_unit_test(test_route_saturated_gate),
        cmocka_unit_test(test_route_backward_finite_difference),
        cmocka_unit_test(test_route_dispatch_combine),
        cmocka_unit_test(test_route_dispatch_combine_finite_difference),
        cmocka_unit_test(test_route_rejects_bad_arguments),
        cmocka_unit_test(test_route_gate_plugins_capacity),
        cmocka_unit_test(test_route_gate_plugin_forward_backward),
    };
    return cmocka_run_group_tests_name("route", tests, NULL, NULL);
}
