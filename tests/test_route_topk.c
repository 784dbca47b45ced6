/* test_route_topk.c: the general top-k router of the cpu backend
 * (route_forward/route_backward with moe_route_args.topk = 1;
 * kernels/cpu/route.c, compiled into this test) and the topk gate plugin
 * (loaded with dlopen from the build tree, given a fake host and a fake
 * host-memory backend).
 *
 * Expected values are worked out by hand in the comments. As in
 * test_route.c, scores are chosen first and the logits are their logarithms
 * (softmax) or logits (sigmoid: 0 -> 1/2, ln 3 -> 3/4, -ln 3 -> 1/4,
 * ln 9 -> 9/10), so the router gives them back to within fp32 rounding.
 * Gradients are checked by central differences on cases whose routing does
 * not change within the step.
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
#include "tests/testutil.h"

#define MAXS 16
#define MAXE 8
#define MAXW 8

static moe_host g_host;
static moe_ctx g_ctx;
static moe_ops g_ops;

/* ---------------------------------------------------------------- cases */

typedef struct topk_case {
    moe_route_args a;
    float logits[MAXS * MAXE], probs[MAXS * MAXE], weight[MAXS * MAXW], l_aux, metrics[MOE_NUM_METRICS];
    float gate_metrics[MOE_NUM_GATE_METRICS], bias[MAXE], load[MAXE];
    int32_t expert[MAXS * MAXW], slot[MAXS * MAXW];
    uint8_t pad[MAXS];
    void *ws;
} topk_case;

static void host_init(void)
{
    moe_test_host_init(&g_host);
    memset(&g_ctx, 0, sizeof g_ctx);
    g_ctx.host = &g_host;
    moe_test_clear_error();
}

/* S tokens, E experts, k choices in k columns (at least 2), capacity C, softmax, renormalised */
static void case_init(topk_case *tc, int64_t S, int E, int k, int64_t C)
{
    memset(tc, 0, sizeof *tc);
    host_init();
    moe_route_args *a = &tc->a;
    a->topk = 1;
    a->S = S;
    a->E = E;
    a->k = k;
    a->width = k > 2 ? k : 2;
    a->capacity = C;
    a->renormalize = 1;
    a->logits = tc->logits;
    a->probs = tc->probs;
    a->expert = tc->expert;
    a->slot = tc->slot;
    a->weight = tc->weight;
    a->l_aux = &tc->l_aux;
    a->metrics = tc->metrics;
    a->gate_metrics = tc->gate_metrics;
    tc->ws = malloc((size_t)moe_cpu_route_workspace_bytes(S, E));
    assert_non_null(tc->ws);
    a->workspace = tc->ws;
}

static void case_free(topk_case *tc) { free(tc->ws); }

/* softmax token: logits log p + shift (lse = shift when p sums to 1) */
static void set_probs(topk_case *tc, int64_t s, const double *p, double shift)
{
    for (int e = 0; e < tc->a.E; e++)
        tc->logits[s * tc->a.E + e] = (float)(log(p[e]) + shift);
}

static void run(topk_case *tc)
{
    assert_int_equal(moe_cpu_route_forward(&g_ctx, &tc->a), MOE_OK);
}

static void expect_choice(const topk_case *tc, int64_t s, int j, int e, int slot, double w)
{
    const int W = tc->a.width;
    if (tc->expert[s * W + j] != e || tc->slot[s * W + j] != slot || fabs(tc->weight[s * W + j] - w) > 1e-6)
        fail_msg("token %lld choice %d: expected (expert %d, slot %d, weight %.7g), found (%d, %d, %.7g)",
                 (long long)s, j, e, slot, w, tc->expert[s * W + j], tc->slot[s * W + j],
                 (double)tc->weight[s * W + j]);
}

/* ---------------------------------------------------------------- tests */

/* k = 3 of E = 4 with p = (0.4, 0.1, 0.3, 0.2): experts 0, 2, 3.
 * Renormalised: 0.4/0.9, 0.3/0.9, 0.2/0.9; without: the probabilities. */
static void test_route_topk_softmax_selection_and_weights(void **state)
{
    (void)state;
    const double p[4] = {0.4, 0.1, 0.3, 0.2};
    topk_case tc;
    case_init(&tc, 1, 4, 3, 3);
    set_probs(&tc, 0, p, 0.0);
    run(&tc);
    expect_choice(&tc, 0, 0, 0, 0, 0.4 / 0.9);
    expect_choice(&tc, 0, 1, 2, 0, 0.3 / 0.9);
    expect_choice(&tc, 0, 2, 3, 0, 0.2 / 0.9);
    for (int e = 0; e < 4; e++)
        assert_float_equal(tc.probs[e], p[e], 1e-7);
    tc.a.renormalize = 0;
    run(&tc);
    expect_choice(&tc, 0, 0, 0, 0, 0.4);
    expect_choice(&tc, 0, 1, 2, 0, 0.3);
    expect_choice(&tc, 0, 2, 3, 0, 0.2);
    case_free(&tc);
}

/* sigmoid scores (0.5, 0.75, 0.25, 0.9), k = 2: experts 3, 1, weights
 * 0.9/1.65, 0.75/1.65. With bias (+0.5, 0, 0, 0) the selection scores are
 * (1.0, 0.75, 0.25, 0.9): experts 0, 3, weighed by the unbiased 0.5/1.4 and
 * 0.9/1.4. probs keeps the sigmoid. */
static void test_route_topk_sigmoid_and_bias(void **state)
{
    (void)state;
    const float l[4] = {0.0f, (float)log(3.0), (float)-log(3.0), (float)log(9.0)};
    topk_case tc;
    case_init(&tc, 1, 4, 2, 1);
    tc.a.score = MOE_SCORE_SIGMOID;
    memcpy(tc.logits, l, sizeof l);
    run(&tc);
    expect_choice(&tc, 0, 0, 3, 0, 0.9 / 1.65);
    expect_choice(&tc, 0, 1, 1, 0, 0.75 / 1.65);
    assert_float_equal(tc.probs[0], 0.5, 1e-7);
    assert_float_equal(tc.probs[3], 0.9, 1e-7);
    tc.bias[0] = 0.5f;
    tc.a.expert_bias = tc.bias;
    run(&tc);
    expect_choice(&tc, 0, 0, 0, 0, 0.5 / 1.4);
    expect_choice(&tc, 0, 1, 3, 0, 0.9 / 1.4);
    case_free(&tc);
}

/* E = 8 in 4 groups of 2, group_topk 2, k = 4: group sums of the top
 * k / group_topk = 2 scores (both experts):
 *   p = (0.30 0.01 | 0.12 0.12 | 0.20 0.02 | 0.13 0.10): 0.31, 0.24, 0.22, 0.23
 * so groups 0 and 1, and within them experts 0, 2, 3 (tie: lower index), 1.
 * Without groups: 0, 4, 6, 2. */
static void test_route_topk_group_limited(void **state)
{
    (void)state;
    const double p[8] = {0.30, 0.01, 0.12, 0.12, 0.20, 0.02, 0.13, 0.10};
    topk_case tc;
    case_init(&tc, 1, 8, 4, 1);
    tc.a.renormalize = 0;
    set_probs(&tc, 0, p, 0.0);
    run(&tc);
    expect_choice(&tc, 0, 0, 0, 0, 0.30);
    expect_choice(&tc, 0, 1, 4, 0, 0.20);
    expect_choice(&tc, 0, 2, 6, 0, 0.13);
    expect_choice(&tc, 0, 3, 2, 0, 0.12);
    tc.a.num_groups = 4;
    tc.a.group_topk = 2;
    run(&tc);
    expect_choice(&tc, 0, 0, 0, 0, 0.30);
    expect_choice(&tc, 0, 1, 2, 0, 0.12);
    expect_choice(&tc, 0, 2, 3, 0, 0.12);
    expect_choice(&tc, 0, 3, 1, 0, 0.01);
    case_free(&tc);
}

/* E = 2, k = 2, C = 2, every token chooses both experts:
 *   t0 (0.7, 0.3), t1 (0.6, 0.4), t2 (0.2, 0.8).
 * Choice 0 in token order: e0 <- t0:0 t1:1; e1 <- t2:0. Choice 1 after all
 * choice-0 claims: e1 <- t0:1 t1:2x; e0 <- t2:2x. Weights renormalised over
 * both choices before dropping, so a dropped choice leaves the other as it
 * was. overflow_expert1 = 0 %, overflow_expert2 = 2 of 3 = 66.67 %. */
static void test_route_topk_capacity_order(void **state)
{
    (void)state;
    topk_case tc;
    case_init(&tc, 3, 2, 2, 2);
    const double p[3][2] = {{0.7, 0.3}, {0.6, 0.4}, {0.2, 0.8}};
    for (int s = 0; s < 3; s++)
        set_probs(&tc, s, p[s], 0.0);
    run(&tc);
    expect_choice(&tc, 0, 0, 0, 0, 0.7);
    expect_choice(&tc, 0, 1, 1, 1, 0.3);
    expect_choice(&tc, 1, 0, 0, 1, 0.6);
    expect_choice(&tc, 1, 1, 1, -1, 0.0);
    expect_choice(&tc, 2, 0, 1, 0, 0.8);
    expect_choice(&tc, 2, 1, 0, -1, 0.0);
    assert_float_equal(tc.metrics[MOE_METRIC_OVERFLOW_EXPERT1], 0.0, 0.0);
    assert_float_equal(tc.metrics[MOE_METRIC_OVERFLOW_EXPERT2], 200.0 / 3.0, 1e-4);
    /* perfect balance: P = (0.5, 0.5), f = 3/6 each: l_aux = 2 * 0.5 = 1 */
    assert_float_equal(tc.l_aux, 1.0, 1e-6);
    case_free(&tc);
}

/* S = 2, E = 4, k = 2, softmax:
 *   t0 p = (0.4, 0.1, 0.3, 0.2) -> 0, 2;  logits shifted by 1 (lse 1)
 *   t1 p = (0.1, 0.5, 0.3, 0.1) -> 1, 2;  logits shifted by 2 (lse 2)
 * batch: P = (0.25, 0.3, 0.3, 0.15), f = (1, 1, 2, 0) / 4:
 *   l = 4 * (0.0625 + 0.075 + 0.15) = 1.15
 * seq (seq_len 1): t0 4 * (0.4 * 0.5 + 0.3 * 0.5) = 1.4, t1 4 * (0.5 * 0.5 +
 *   0.3 * 0.5) = 1.6, mean 1.5
 * z-loss 0.1 * (1 + 4) / 2 = 0.25, added to l_aux and reported. Pads: a
 * third token, uniform and padding, chooses nothing but counts in P:
 *   P = (0.75, 0.85, 0.85, 0.55) / 3 with f = (1, 1, 2, 0) / (k S = 6). */
static void test_route_topk_losses(void **state)
{
    (void)state;
    const double p0[4] = {0.4, 0.1, 0.3, 0.2}, p1[4] = {0.1, 0.5, 0.3, 0.1}, u[4] = {0.25, 0.25, 0.25, 0.25};
    topk_case tc;
    case_init(&tc, 2, 4, 2, 2);
    set_probs(&tc, 0, p0, 1.0);
    set_probs(&tc, 1, p1, 2.0);
    run(&tc);
    assert_float_equal(tc.l_aux, 1.15, 1e-6);
    assert_float_equal(tc.gate_metrics[MOE_GATE_METRIC_Z_LOSS], 0.0, 0.0);
    tc.a.z_loss_coeff = 0.1f;
    run(&tc);
    assert_float_equal(tc.gate_metrics[MOE_GATE_METRIC_Z_LOSS], 0.25, 1e-6);
    assert_float_equal(tc.l_aux, 1.4, 1e-6);
    tc.a.aux = MOE_AUX_SEQ;
    tc.a.seq_len = 1;
    run(&tc);
    assert_float_equal(tc.l_aux, 1.75, 1e-6);
    tc.a.aux = MOE_AUX_NONE;
    run(&tc);
    assert_float_equal(tc.l_aux, 0.25, 1e-6);
    /* the loads of the choices accumulate */
    tc.a.expert_load = tc.load;
    run(&tc);
    run(&tc);
    const float load[4] = {2.0f, 2.0f, 4.0f, 0.0f};
    assert_memory_equal(tc.load, load, sizeof load);
    case_free(&tc);

    case_init(&tc, 3, 4, 2, 3);
    set_probs(&tc, 0, p0, 0.0);
    set_probs(&tc, 1, p1, 0.0);
    set_probs(&tc, 2, u, 0.0);
    tc.pad[2] = 1;
    tc.a.pad = tc.pad;
    tc.a.expert_load = tc.load;
    run(&tc);
    expect_choice(&tc, 2, 0, -1, -1, 0.0);
    expect_choice(&tc, 2, 1, -1, -1, 0.0);
    const double P[4] = {0.75 / 3, 0.85 / 3, 0.85 / 3, 0.55 / 3}, f[4] = {1.0 / 6, 1.0 / 6, 2.0 / 6, 0.0};
    double want = 0.0;
    for (int e = 0; e < 4; e++)
        want += 4.0 * P[e] * f[e];
    assert_float_equal(tc.l_aux, want, 1e-6);
    const float load3[4] = {1.0f, 1.0f, 2.0f, 0.0f};
    assert_memory_equal(tc.load, load3, sizeof load3);
    case_free(&tc);
}

/* k = 1 softmax without renormalisation is fairseq's top-1 (no capacity
 * limit here, and the l_aux formula coincides); k = 2 renormalised is
 * fairseq's top-2 "all" when nothing is dropped (weights p / (p1 + p2)). */
static void test_route_topk_matches_fairseq(void **state)
{
    (void)state;
    moe_test_rng r = moe_test_rng_make(11);
    for (int k = 1; k <= 2; k++) {
        topk_case tk, fs;
        case_init(&tk, 12, 4, k, 12);
        tk.a.renormalize = k == 2;
        moe_test_fill_uniform(&r, tk.logits, 12 * 4, -2.0f, 2.0f);
        fs = tk;
        fs.a.topk = 0;
        fs.a.renormalize = 0;
        fs.a.policy = MOE_ROUTE_ALL;
        fs.ws = malloc((size_t)moe_cpu_route_workspace_bytes(12, 4));
        assert_non_null(fs.ws);
#define POINT(x) x.a.logits = x.logits, x.a.probs = x.probs, x.a.expert = x.expert, x.a.slot = x.slot, \
                 x.a.weight = x.weight, x.a.l_aux = &x.l_aux, x.a.metrics = x.metrics, x.a.workspace = x.ws, \
                 x.a.gate_metrics = x.gate_metrics
        POINT(tk);
        POINT(fs);
#undef POINT
        run(&tk);
        run(&fs);
        assert_memory_equal(tk.expert, fs.expert, sizeof(int32_t) * 24);
        assert_memory_equal(tk.slot, fs.slot, sizeof(int32_t) * 24);
        for (int i = 0; i < 24; i++)
            assert_float_equal(tk.weight[i], fs.weight[i], 1e-7);
        if (k == 1)
            assert_float_equal(tk.l_aux, fs.l_aux, 1e-6);
        case_free(&tk);
        case_free(&fs);
    }
}

/* ------------------------------------------------- finite differences */

typedef struct fd_ctx {
    topk_case *tc;
    const float *c;
    float lam;
    int32_t e0[MAXS * MAXW], s0[MAXS * MAXW];
    int changed;
} fd_ctx;

/* L = sum c * weight + lam * l_aux; notes whether the routing moved */
static double fd_loss(void *ctx)
{
    fd_ctx *f = ctx;
    topk_case *tc = f->tc;
    run(tc);
    const int64_t n = tc->a.S * tc->a.width;
    f->changed |= memcmp(f->e0, tc->expert, (size_t)n * 4) != 0 || memcmp(f->s0, tc->slot, (size_t)n * 4) != 0;
    double L = (double)f->lam * (double)tc->l_aux;
    for (int64_t i = 0; i < n; i++)
        L += (double)f->c[i] * (double)tc->weight[i];
    return L;
}

typedef struct fd_setup {
    int k, E;
    int64_t C;
    moe_route_score score;
    int renormalize, pad, groups, bias;
    float z;
    moe_route_aux aux;
} fd_setup;

/* route_backward against central differences; logits whose perturbation
 * moves the routing are skipped (at least 90 % must be checked) */
static void fd_check(const fd_setup *u)
{
    const int S = 12;
    topk_case tc;
    case_init(&tc, S, u->E, u->k, u->C);
    tc.a.score = u->score;
    tc.a.renormalize = u->renormalize;
    tc.a.z_loss_coeff = u->z;
    tc.a.aux = u->aux;
    tc.a.seq_len = 4;
    if (u->groups) {
        tc.a.num_groups = 4;
        tc.a.group_topk = 2;
    }
    moe_test_rng r = moe_test_rng_make(100 + (uint64_t)(u->k * 7 + u->E + u->renormalize));
    moe_test_fill_uniform(&r, tc.logits, S * u->E, -1.5f, 1.5f);
    if (u->bias) {
        moe_test_fill_uniform(&r, tc.bias, u->E, -0.3f, 0.3f);
        tc.a.expert_bias = tc.bias;
    }
    if (u->pad) {
        tc.pad[3] = tc.pad[8] = 1;
        tc.a.pad = tc.pad;
    }
    const int W = tc.a.width;
    float c[MAXS * MAXW];
    moe_test_fill_uniform(&r, c, S * W, -0.5f, 0.7f);
    fd_ctx f;
    memset(&f, 0, sizeof f);
    f.tc = &tc;
    f.c = c;
    f.lam = 0.7f;
    run(&tc);
    memcpy(f.e0, tc.expert, sizeof(int32_t) * (size_t)(S * W));
    memcpy(f.s0, tc.slot, sizeof(int32_t) * (size_t)(S * W));
    float dl[MAXS * MAXE];
    assert_int_equal(moe_cpu_route_backward(&g_ctx, &tc.a, c, f.lam, dl), MOE_OK);

    int checked = 0, total = 0;
    double norm = 0.0;
    for (int i = 0; i < S * u->E; i++) {
        double num;
        f.changed = 0;
        moe_test_fd_grad(fd_loss, &f, &tc.logits[i], 1, 2e-3f, &num);
        total++;
        norm += fabs((double)dl[i]);
        if (f.changed)
            continue;
        checked++;
        if (fabs(num - (double)dl[i]) > 2e-4 * fmax(1.0, fabs(num)))
            fail_msg("k=%d E=%d C=%lld score=%d renorm=%d pad=%d groups=%d bias=%d z=%g aux=%d: dlogits[%d] = %.6g, "
                     "finite difference %.6g",
                     u->k, u->E, (long long)u->C, (int)u->score, u->renormalize, u->pad, u->groups, u->bias,
                     (double)u->z, (int)u->aux, i, (double)dl[i], num);
    }
    assert_true(checked * 100 >= total * 90);
    assert_true(norm > 1e-3); /* not trivially zero */
    case_free(&tc);
}

static void test_route_topk_backward_finite_difference(void **state)
{
    (void)state;
    const fd_setup cases[] = {
        /* k  E  C   score               renorm pad groups bias z     aux */
        {2, 4, 6, MOE_SCORE_SOFTMAX, 1, 0, 0, 0, 0.0f, MOE_AUX_BATCH},
        {2, 4, 6, MOE_SCORE_SOFTMAX, 0, 0, 0, 0, 0.0f, MOE_AUX_BATCH},
        {3, 4, 4, MOE_SCORE_SOFTMAX, 1, 1, 0, 0, 0.1f, MOE_AUX_BATCH},  /* drops, pads, z-loss */
        {1, 4, 3, MOE_SCORE_SOFTMAX, 0, 0, 0, 0, 0.0f, MOE_AUX_SEQ},
        {2, 4, 6, MOE_SCORE_SIGMOID, 1, 0, 0, 0, 0.0f, MOE_AUX_BATCH},
        {1, 4, 3, MOE_SCORE_SIGMOID, 0, 1, 0, 0, 0.2f, MOE_AUX_SEQ},
        {3, 4, 3, MOE_SCORE_SIGMOID, 1, 0, 0, 1, 0.0f, MOE_AUX_SEQ},    /* bias, tight capacity */
        {4, 8, 12, MOE_SCORE_SIGMOID, 1, 0, 1, 1, 0.05f, MOE_AUX_BATCH}, /* DeepSeek-V3 style */
        {4, 8, 5, MOE_SCORE_SOFTMAX, 1, 1, 1, 0, 0.0f, MOE_AUX_NONE},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        fd_check(&cases[i]);
}

/* k = 1 renormalised weighs every kept token exactly 1 (Megatron's softmax
 * after top-1): no gradient through the weight, only through the loss. */
static void test_route_topk_single_choice_weight_is_constant(void **state)
{
    (void)state;
    topk_case tc;
    case_init(&tc, 2, 4, 1, 2);
    const double p0[4] = {0.4, 0.1, 0.3, 0.2}, p1[4] = {0.1, 0.5, 0.3, 0.1};
    set_probs(&tc, 0, p0, 0.0);
    set_probs(&tc, 1, p1, 0.0);
    tc.a.aux = MOE_AUX_NONE;
    run(&tc);
    expect_choice(&tc, 0, 0, 0, 0, 1.0);
    expect_choice(&tc, 1, 0, 1, 0, 1.0);
    const float dw[4] = {0.9f, 0.0f, -1.3f, 0.0f};
    float dl[8];
    assert_int_equal(moe_cpu_route_backward(&g_ctx, &tc.a, dw, 1.0f, dl), MOE_OK);
    for (int i = 0; i < 8; i++)
        assert_true(dl[i] == 0.0f);
    case_free(&tc);
}

static void expect_refused(topk_case *tc, const char *words)
{
    assert_int_equal(moe_cpu_route_forward(&g_ctx, &tc->a), MOE_ERR_INVALID_ARG);
    if (strstr(moe_test_last_error(), words) == NULL)
        fail_msg("expected an error with '%s', found '%s'", words, moe_test_last_error());
}

static void test_route_topk_rejects_bad_arguments(void **state)
{
    (void)state;
    topk_case tc;
    case_init(&tc, 4, 4, 3, 4);
    tc.a.width = 2;
    expect_refused(&tc, "at least k = 3 columns (moe_route_args.width), found 2");
    tc.a.width = 3;
    tc.a.k = 5;
    expect_refused(&tc, "expected 1 <= k <= E for top-k routing, found k = 5, E = 4");
    tc.a.k = 3;
    tc.a.aux = MOE_AUX_SEQ;
    tc.a.seq_len = 3;
    expect_refused(&tc, "sequence length dividing the 4 tokens");
    tc.a.aux = MOE_AUX_BATCH;
    tc.a.num_groups = 3;
    tc.a.group_topk = 1;
    expect_refused(&tc, "num_groups <= 64 dividing E = 4, found 3");
    tc.a.num_groups = 2;
    tc.a.group_topk = 1; /* one group of 2 experts cannot hold k = 3 */
    expect_refused(&tc, "group_topk * E / num_groups >= k");
    tc.a.num_groups = 0;
    tc.a.group_topk = 0;
    tc.a.z_loss_coeff = -1.0f;
    expect_refused(&tc, "z-loss coefficient >= 0, found -1");
    tc.a.z_loss_coeff = 0.0f;
    tc.a.batch_prioritized = 1;
    expect_refused(&tc, "no normalize_before_drop or batch_prioritized");
    tc.a.batch_prioritized = 0;
    tc.a.topk = 0;
    expect_refused(&tc, "expected width 0 or 2 for top-1/top-2 routing, found 3");
    case_free(&tc);
}

/* ------------------------------------------------------ the topk plugin */

/* options by name; NULL value: not given (the plugin's defaults are not applied by this fake) */
typedef struct opt_kv {
    const char *name, *value;
} opt_kv;
static opt_kv g_opts[16];

static const char *opt_value(const char *name)
{
    for (int i = 0; i < 16 && g_opts[i].name != NULL; i++)
        if (strcmp(g_opts[i].name, name) == 0)
            return g_opts[i].value;
    return NULL;
}
static const char *fake_opt_str(const moe_host *h, const char *name) { (void)h; return opt_value(name); }
static int fake_opt_set(const moe_host *h, const char *name) { (void)h; return opt_value(name) != NULL; }
static int fake_opt_flag(const moe_host *h, const char *name) { (void)h; return opt_value(name) != NULL; }
static double fake_opt_float(const moe_host *h, const char *name)
{
    (void)h;
    const char *v = opt_value(name);
    return v != NULL ? atof(v) : 0.0;
}
static int64_t fake_opt_int(const moe_host *h, const char *name) { return (int64_t)fake_opt_float(h, name); }
static uint64_t fake_step_seed(const moe_host *h) { (void)h; return 99u; }

/* a backend of host memory: what the gate's expert bias needs */
static moe_status fake_alloc(moe_ctx *c, uint64_t bytes, const char *what, void **ptr)
{
    (void)c;
    (void)what;
    *ptr = malloc(bytes > 0 ? bytes : 1);
    return *ptr != NULL ? MOE_OK : MOE_ERR_NOMEM;
}
static void fake_free(moe_ctx *c, void *ptr) { (void)c; free(ptr); }
static moe_status fake_copy(moe_ctx *c, void *dst, const void *src, uint64_t bytes)
{
    (void)c;
    memcpy(dst, src, bytes);
    return MOE_OK;
}
static moe_status fake_fill(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float value)
{
    (void)c;
    assert_int_equal(dt, MOE_F32);
    for (int64_t i = 0; i < n; i++)
        ((float *)x)[i] = value;
    return MOE_OK;
}
static moe_backend_ops g_backend;

static void plugin_host_init(void)
{
    host_init();
    memset(g_opts, 0, sizeof g_opts);
    memset(&g_ops, 0, sizeof g_ops);
    g_ops.route_workspace_bytes = moe_cpu_route_workspace_bytes;
    g_ops.route_forward = moe_cpu_route_forward;
    g_ops.route_backward = moe_cpu_route_backward;
    g_ops.fill = fake_fill;
    memset(&g_backend, 0, sizeof g_backend);
    g_backend.alloc = fake_alloc;
    g_backend.free = fake_free;
    g_backend.copy_to_host = fake_copy;
    g_backend.copy_from_host = fake_copy;
    g_backend.copy = fake_copy;
    g_host.opt_set = fake_opt_set;
    g_host.opt_int = fake_opt_int;
    g_host.opt_float = fake_opt_float;
    g_host.opt_flag = fake_opt_flag;
    g_host.opt_str = fake_opt_str;
    g_host.step_seed = fake_step_seed;
    g_host.ops = &g_ops;
    g_host.backend = &g_backend;
    g_host.ctx = &g_ctx;
}

static const moe_gate_ops *load_topk(void **handle)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/libmoe-gate-topk.so", MOE_TEST_PLUGIN_DIR);
    *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (*handle == NULL)
        fail_msg("cannot load %s: %s", path, dlerror());
    moe_plugin_entry_fn entry;
    void *sym = dlsym(*handle, MOE_PLUGIN_SYMBOL);
    assert_non_null(sym);
    memcpy(&entry, &sym, sizeof entry);
    const moe_plugin_desc *d = entry();
    assert_int_equal(d->kind, MOE_KIND_GATE);
    assert_string_equal(d->name, "topk");
    assert_int_equal(d->ops_size, sizeof(moe_gate_ops));
    const moe_gate_ops *g = d->ops;
    assert_non_null(g->log_fields);
    assert_string_equal(g->log_fields[MOE_GATE_METRIC_Z_LOSS], "z_loss");
    assert_null(g->log_fields[MOE_NUM_GATE_METRICS]);
    return g;
}

/* Settings and capacity through the plugin:
 *   k = 3, S = 10, E = 4: 3 * ceil(10/4) = 9; factor 1.5: ceil(13.5) = 14;
 *   factor 0: 10 (nothing dropped); eval fraction 0.25: ceil(2.5) = 3. */
static void test_route_topk_plugin_settings(void **state)
{
    (void)state;
    void *hd;
    const moe_gate_ops *g = load_topk(&hd);
    void *gate;
    moe_route_args a;

    plugin_host_init();
    g_opts[0] = (opt_kv){"moe-router-topk", "3"};
    g_opts[1] = (opt_kv){"moe-router-score-function", "sigmoid"};
    g_opts[2] = (opt_kv){"moe-z-loss-coeff", "0.001"};
    g_opts[3] = (opt_kv){"moe-aux-loss-type", "seq"};
    g_opts[4] = (opt_kv){"moe-eval-capacity-token-fraction", "0.25"};
    assert_int_equal(g->init(&g_host, 4, &gate), MOE_OK);
    memset(&a, 0, sizeof a);
    a.stream = 5;
    a.seq_len = 5;
    assert_int_equal(g->configure(gate, 10, 1, &a), MOE_OK);
    assert_int_equal(a.topk, 1);
    assert_int_equal(a.k, 3);
    assert_int_equal(a.capacity, 9);
    assert_int_equal(a.score, MOE_SCORE_SIGMOID);
    assert_int_equal(a.renormalize, 1);
    assert_float_equal(a.z_loss_coeff, 0.001, 1e-9);
    assert_int_equal(a.aux, MOE_AUX_SEQ);
    assert_int_equal(a.seq_len, 5); /* the caller's */
    assert_int_equal(a.stream, 5u);
    assert_null(a.expert_bias);
    assert_int_equal(g->configure(gate, 10, 0, &a), MOE_OK);
    assert_int_equal(a.capacity, 3);
    int64_t n = -1;
    assert_null(g->state(gate, &n));
    assert_int_equal(n, 0);
    assert_int_equal(g->update(gate), MOE_OK); /* nothing to update */
    g->destroy(gate);

    plugin_host_init();
    g_opts[0] = (opt_kv){"moe-router-topk", "3"};
    g_opts[1] = (opt_kv){"moe-expert-capacity-factor", "1.5"};
    g_opts[2] = (opt_kv){"moe-router-pre-softmax", ""};
    assert_int_equal(g->init(&g_host, 4, &gate), MOE_OK);
    assert_int_equal(g->configure(gate, 10, 1, &a), MOE_OK);
    assert_int_equal(a.capacity, 14);
    assert_int_equal(a.score, MOE_SCORE_SOFTMAX);
    assert_int_equal(a.renormalize, 0);
    g->destroy(gate);
    g_opts[1].value = "0";
    g_opts[2].name = NULL;
    assert_int_equal(g->init(&g_host, 4, &gate), MOE_OK);
    assert_int_equal(g->configure(gate, 10, 1, &a), MOE_OK);
    assert_int_equal(a.capacity, 10);
    assert_int_equal(a.renormalize, 1);
    g->destroy(gate);

    /* refused settings, one line each */
    const struct {
        opt_kv o[3];
        const char *words;
    } bad[] = {
        {{{"moe-router-topk", "5"}}, "expected 1 <= --moe-router-topk <= --moe-expert-count (4), found 5"},
        {{{"moe-router-num-groups", "2"}}, "together, found only --moe-router-num-groups"},
        {{{"moe-router-num-groups", "3"}, {"moe-router-group-topk", "1"}}, "dividing --moe-expert-count 4, found 3"},
        {{{"moe-router-num-groups", "4"}, {"moe-router-group-topk", "1"}}, "at least k experts (1 each), found 1"},
        {{{"moe-router-score-function", "sigmoid"}, {"moe-router-pre-softmax", ""}}, "only with softmax scores"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        plugin_host_init();
        memcpy(g_opts, bad[i].o, sizeof bad[i].o);
        gate = (void *)&a;
        assert_int_equal(g->init(&g_host, 4, &gate), MOE_ERR_INVALID_ARG);
        assert_null(gate);
        if (strstr(moe_test_last_error(), bad[i].words) == NULL)
            fail_msg("expected an error with '%s', found '%s'", bad[i].words, moe_test_last_error());
    }
    dlclose(hd);
}

/* Aux-loss-free balancing through the plugin (E = 4, k = 1, rate 0.25):
 * the two tokens t0 (0.4, 0.1, 0.3, 0.2) and t1 (0.1, 0.5, 0.3, 0.1) choose
 * experts 0 and 1: loads (1, 1, 0, 0), mean 0.5, so the bias moves by
 * -0.25, -0.25, +0.25, +0.25. Then t0's selection scores are
 * (0.15, -0.15, 0.55, 0.45): expert 2, weighed by its unbiased 0.3 (pre-softmax).
 * Evaluation forwards count no load. */
static void test_route_topk_plugin_expert_bias(void **state)
{
    (void)state;
    void *hd;
    const moe_gate_ops *g = load_topk(&hd);
    topk_case tc;
    const double p0[4] = {0.4, 0.1, 0.3, 0.2}, p1[4] = {0.1, 0.5, 0.3, 0.1};
    case_init(&tc, 2, 4, 1, 2);
    set_probs(&tc, 0, p0, 0.0);
    set_probs(&tc, 1, p1, 0.0);
    plugin_host_init();
    g_opts[0] = (opt_kv){"moe-router-topk", "1"};
    g_opts[1] = (opt_kv){"moe-router-enable-expert-bias", ""};
    g_opts[2] = (opt_kv){"moe-router-bias-update-rate", "0.25"};
    g_opts[3] = (opt_kv){"moe-router-pre-softmax", ""};
    void *gate;
    assert_int_equal(g->init(&g_host, 4, &gate), MOE_OK);
    int64_t n = 0;
    float *bias = g->state(gate, &n);
    assert_non_null(bias);
    assert_int_equal(n, 4);
    assert_int_equal(g->configure(gate, 2, 0, &tc.a), MOE_OK); /* evaluation: no load */
    assert_int_equal(g->forward(gate, &tc.a), MOE_OK);
    assert_int_equal(g->configure(gate, 2, 1, &tc.a), MOE_OK);
    assert_int_equal(g->forward(gate, &tc.a), MOE_OK);
    expect_choice(&tc, 0, 0, 0, 0, 0.4);
    expect_choice(&tc, 1, 0, 1, 0, 0.5);
    assert_int_equal(g->update(gate), MOE_OK);
    const float want[4] = {-0.25f, -0.25f, 0.25f, 0.25f};
    assert_memory_equal(bias, want, sizeof want);
    assert_int_equal(g->forward(gate, &tc.a), MOE_OK);
    expect_choice(&tc, 0, 0, 2, 0, 0.3);
    /* loads were reset by the update: this forward alone counts (experts 2, 2) */
    assert_int_equal(g->update(gate), MOE_OK);
    const float want2[4] = {0.0f, 0.0f, 0.0f, 0.5f};
    assert_memory_equal(bias, want2, sizeof want2);
    g->destroy(gate);
    case_free(&tc);
    dlclose(hd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_topk_softmax_selection_and_weights),
        cmocka_unit_test(test_route_topk_sigmoid_and_bias),
        cmocka_unit_test(test_route_topk_group_limited),
        cmocka_unit_test(test_route_topk_capacity_order),
        cmocka_unit_test(test_route_topk_losses),
        cmocka_unit_test(test_route_topk_matches_fairseq),
        cmocka_unit_test(test_route_topk_backward_finite_difference),
        cmocka_unit_test(test_route_topk_single_choice_weight_is_constant),
        cmocka_unit_test(test_route_topk_rejects_bad_arguments),
        cmocka_unit_test(test_route_topk_plugin_settings),
        cmocka_unit_test(test_route_topk_plugin_expert_bias),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
