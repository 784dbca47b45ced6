/* test_route_ec.c: expert-choice routing of the cpu backend
 * (route_forward/route_backward with moe_route_args.expert_choice = 1;
 * kernels/cpu/route.c, compiled into this test), dispatch and combine over
 * its E columns per token, and the expert_choice gate plugin (loaded with
 * dlopen from the build tree, given a fake host).
 *
 * Expected values are worked out by hand in the comments: scores are chosen
 * first and the logits are their logarithms, so the softmax gives them back
 * to within fp32 rounding. Gradients are checked by central differences on
 * the logits whose perturbation leaves the selection as it was (at least
 * 80 % of them).
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

#include <cmocka.h>

#include "kernels/cpu/cpu.h"
#include "moe/plugin.h"
#include "tests/testutil.h"

#define MAXS 16
#define MAXE 8

static moe_host g_host;
static moe_ctx g_ctx;

typedef struct ec_case {
    moe_route_args a;
    float logits[MAXS * MAXE], probs[MAXS * MAXE], weight[MAXS * MAXE], l_aux, metrics[MOE_NUM_METRICS];
    int32_t expert[MAXS * MAXE], slot[MAXS * MAXE];
    uint8_t pad[MAXS];
    void *ws;
} ec_case;

static void case_init(ec_case *tc, int64_t S, int E, int64_t C)
{
    memset(tc, 0, sizeof *tc);
    moe_test_host_init(&g_host);
    memset(&g_ctx, 0, sizeof g_ctx);
    g_ctx.host = &g_host;
    moe_test_clear_error();
    moe_route_args *a = &tc->a;
    a->expert_choice = 1;
    a->S = S;
    a->E = E;
    a->k = 1;
    a->width = E;
    a->capacity = C;
    a->logits = tc->logits;
    a->probs = tc->probs;
    a->expert = tc->expert;
    a->slot = tc->slot;
    a->weight = tc->weight;
    a->l_aux = &tc->l_aux;
    a->metrics = tc->metrics;
    tc->ws = malloc((size_t)moe_cpu_route_workspace_bytes(S, E));
    assert_non_null(tc->ws);
    a->workspace = tc->ws;
}

static void set_probs(ec_case *tc, int64_t s, const double *p)
{
    for (int e = 0; e < tc->a.E; e++)
        tc->logits[s * tc->a.E + e] = (float)log(p[e]);
}

static void run(ec_case *tc) { assert_int_equal(moe_cpu_route_forward(&g_ctx, &tc->a), MOE_OK); }

/* (s, e): taken at `slot` with weight w, or not taken (slot -1) */
static void expect(const ec_case *tc, int64_t s, int e, int slot, double w)
{
    const int E = tc->a.E;
    const int ex = slot >= 0 ? e : -1;
    if (tc->expert[s * E + e] != ex || tc->slot[s * E + e] != slot || fabs(tc->weight[s * E + e] - w) > 1e-6)
        fail_msg("token %lld expert %d: expected (expert %d, slot %d, weight %.7g), found (%d, %d, %.7g)",
                 (long long)s, e, ex, slot, w, tc->expert[s * E + e], tc->slot[s * E + e],
                 (double)tc->weight[s * E + e]);
}

/* S = 4, E = 3, C = 2, scores
 *   token 0 (0.5, 0.3, 0.2)   token 1 (0.6, 0.1, 0.3)
 *   token 2 (0.2, 0.2, 0.6)   token 3 (0.1, 0.7, 0.2)
 * expert 0 by score: tokens 1, 0; expert 1: 3, 0; expert 2: 2, 1.
 * Token 0 gets experts 0 and 1 (slots 1, 1), token 1 experts 0 and 2 (slots
 * 0, 1), token 2 expert 2 (slot 0), token 3 expert 1 (slot 0); weights are
 * the scores. Every token is taken: overflow 0, l_aux 0. */
static const double hand_p[4][3] = {{0.5, 0.3, 0.2}, {0.6, 0.1, 0.3}, {0.2, 0.2, 0.6}, {0.1, 0.7, 0.2}};

static void hand_case(ec_case *tc, int64_t C)
{
    case_init(tc, 4, 3, C);
    for (int s = 0; s < 4; s++)
        set_probs(tc, s, hand_p[s]);
    tc->l_aux = 5.0f;
    run(tc);
}

static void test_route_ec_selection_and_weights(void **state)
{
    (void)state;
    ec_case tc;
    hand_case(&tc, 2);
    expect(&tc, 0, 0, 1, 0.5);
    expect(&tc, 0, 1, 1, 0.3);
    expect(&tc, 0, 2, -1, 0.0);
    expect(&tc, 1, 0, 0, 0.6);
    expect(&tc, 1, 1, -1, 0.0);
    expect(&tc, 1, 2, 1, 0.3);
    expect(&tc, 2, 0, -1, 0.0);
    expect(&tc, 2, 1, -1, 0.0);
    expect(&tc, 2, 2, 0, 0.6);
    expect(&tc, 3, 0, -1, 0.0);
    expect(&tc, 3, 1, 0, 0.7);
    expect(&tc, 3, 2, -1, 0.0);
    assert_true(tc.l_aux == 0.0f);
    assert_true(tc.metrics[MOE_METRIC_OVERFLOW_EXPERT1] == 0.0f);
    /* first preferences: experts 0, 0, 2, 1; second: 1, 2, 0 (tie 0/1 to the lower), 2 */
    assert_float_equal(tc.metrics[MOE_METRIC_UNUSED_EXPERT1_COUNT], 0.0, 0.0);
    for (int e = 0; e < 3; e++)
        assert_float_equal(tc.probs[e], hand_p[0][e], 1e-7);
    free(tc.ws);

    /* C = 1: expert 0 takes token 1, expert 1 token 3, expert 2 token 2;
     * token 0 is taken by none: 25 % of the tokens */
    hand_case(&tc, 1);
    for (int e = 0; e < 3; e++)
        expect(&tc, 0, e, -1, 0.0);
    expect(&tc, 1, 0, 0, 0.6);
    expect(&tc, 3, 1, 0, 0.7);
    expect(&tc, 2, 2, 0, 0.6);
    assert_float_equal(tc.metrics[MOE_METRIC_OVERFLOW_EXPERT1], 25.0, 1e-6);
    free(tc.ws);
}

/* Pads are never taken: with token 3 a pad and C = 2, expert 1 takes tokens
 * 0 (0.3) and 2 (0.2) instead of 3 and 0, expert 0 tokens 1 and 0. Equal
 * scores go to the lower token: with two tokens of scores (0.5, 0.5) and
 * C = 1 both experts take token 0, and token 1 (50 %) is taken by none. */
static void test_route_ec_pads_and_ties(void **state)
{
    (void)state;
    ec_case tc;
    case_init(&tc, 4, 3, 2);
    for (int s = 0; s < 4; s++)
        set_probs(&tc, s, hand_p[s]);
    tc.pad[3] = 1;
    tc.a.pad = tc.pad;
    run(&tc);
    expect(&tc, 0, 1, 0, 0.3);
    expect(&tc, 2, 1, 1, 0.2);
    expect(&tc, 1, 1, -1, 0.0);
    for (int e = 0; e < 3; e++)
        expect(&tc, 3, e, -1, 0.0);
    expect(&tc, 1, 0, 0, 0.6);
    expect(&tc, 0, 0, 1, 0.5);
    free(tc.ws);

    case_init(&tc, 2, 2, 1);
    const double half[2] = {0.5, 0.5};
    set_probs(&tc, 0, half);
    set_probs(&tc, 1, half);
    run(&tc);
    expect(&tc, 0, 0, 0, 0.5);
    expect(&tc, 0, 1, 0, 0.5);
    expect(&tc, 1, 0, -1, 0.0);
    expect(&tc, 1, 1, -1, 0.0);
    assert_float_equal(tc.metrics[MOE_METRIC_OVERFLOW_EXPERT1], 50.0, 1e-6);
    free(tc.ws);
}

/* Dispatch and combine over the E columns of the hand case (C = 2, d = 2):
 * x[s] = (s, -s); expert rows e*C + slot get their tokens; with expert
 * outputs eout[r] = (r, 10 + r), token 0's output is
 * 0.5 * eout[1] + 0.3 * eout[3] = (1.4, 9.4). Backward with dout[r] = (r, 1):
 * token 0 collects rows 1 and 3, (4, 2); dweight of (0, 0) is <dy[0], eout[1]>. */
static void test_route_ec_dispatch_combine(void **state)
{
    (void)state;
    ec_case tc;
    hand_case(&tc, 2);
    const int64_t S = 4, C = 2, d = 2;
    const int E = 3;
    float x[8], xe[12], eout[12], y[8], dout[12], dx[8], dy[8], deout[12], dw[12];
    for (int s = 0; s < 4; s++) {
        x[s * 2] = (float)s;
        x[s * 2 + 1] = (float)-s;
    }
    assert_int_equal(moe_cpu_dispatch_wide_forward(&g_ctx, xe, x, tc.expert, tc.slot, S, E, E, C, d, MOE_F32), MOE_OK);
    const int row_token[6] = {1, 0, 3, 0, 2, 1}; /* rows e*C + slot */
    for (int r = 0; r < 6; r++) {
        assert_float_equal(xe[r * 2], (float)row_token[r], 0.0);
        assert_float_equal(xe[r * 2 + 1], (float)-row_token[r], 0.0);
        eout[r * 2] = (float)r;
        eout[r * 2 + 1] = 10.0f + (float)r;
        dout[r * 2] = (float)r;
        dout[r * 2 + 1] = 1.0f;
    }
    assert_int_equal(
        moe_cpu_combine_wide_forward(&g_ctx, y, eout, tc.expert, tc.slot, tc.weight, S, E, E, C, d, MOE_F32), MOE_OK);
    assert_float_equal(y[0], 1.4, 1e-6);
    assert_float_equal(y[1], 9.4, 1e-6);
    assert_float_equal(y[6], 0.7 * 2.0, 1e-6); /* token 3: 0.7 * eout[2] */
    memset(dx, 0, sizeof dx);
    assert_int_equal(moe_cpu_dispatch_wide_backward(&g_ctx, dx, dout, tc.expert, tc.slot, S, E, E, C, d, MOE_F32),
                     MOE_OK);
    assert_float_equal(dx[0], 4.0, 0.0);
    assert_float_equal(dx[1], 2.0, 0.0);
    for (int i = 0; i < 8; i++)
        dy[i] = (float)(i + 1);
    assert_int_equal(moe_cpu_combine_wide_backward(&g_ctx, deout, dw, dy, eout, tc.expert, tc.slot, tc.weight, S, E, E,
                                                   C, d, MOE_F32),
                     MOE_OK);
    assert_float_equal(dw[0], 1.0 * 1.0 + 2.0 * 11.0, 1e-6); /* <dy[0], eout[1]> */
    assert_float_equal(dw[2], 0.0, 0.0);                      /* (0, 2) not taken */
    assert_float_equal(deout[1 * 2], 0.5 * 1.0, 1e-6);        /* row 1 = weight 0.5 * dy[0] */
    free(tc.ws);
}

/* ------------------------------------------------- finite differences */

typedef struct fd_ctx {
    ec_case *tc;
    const float *c;
    int32_t e0[MAXS * MAXE], s0[MAXS * MAXE];
    int changed;
} fd_ctx;

/* L = sum c * weight; notes whether the selection moved */
static double fd_loss(void *ctx)
{
    fd_ctx *f = ctx;
    ec_case *tc = f->tc;
    run(tc);
    const int64_t n = tc->a.S * tc->a.E;
    f->changed |= memcmp(f->e0, tc->expert, (size_t)n * 4) != 0 || memcmp(f->s0, tc->slot, (size_t)n * 4) != 0;
    double L = 0.0;
    for (int64_t i = 0; i < n; i++)
        L += (double)f->c[i] * (double)tc->weight[i];
    return L;
}

static void fd_check(int E, int64_t C, int pad)
{
    const int S = 12;
    ec_case tc;
    case_init(&tc, S, E, C);
    moe_test_rng r = moe_test_rng_make(300 + (uint64_t)(E * 3 + C + pad));
    moe_test_fill_uniform(&r, tc.logits, S * E, -1.5f, 1.5f);
    if (pad) {
        tc.pad[2] = tc.pad[7] = 1;
        tc.a.pad = tc.pad;
    }
    float c[MAXS * MAXE], dl[MAXS * MAXE];
    moe_test_fill_uniform(&r, c, S * E, -0.5f, 0.7f);
    fd_ctx f;
    memset(&f, 0, sizeof f);
    f.tc = &tc;
    f.c = c;
    run(&tc);
    memcpy(f.e0, tc.expert, sizeof(int32_t) * (size_t)(S * E));
    memcpy(f.s0, tc.slot, sizeof(int32_t) * (size_t)(S * E));
    assert_int_equal(moe_cpu_route_backward(&g_ctx, &tc.a, c, 3.0f, dl), MOE_OK); /* dl_aux has no effect */
    int checked = 0;
    double norm = 0.0;
    for (int i = 0; i < S * E; i++) {
        double num;
        f.changed = 0;
        moe_test_fd_grad(fd_loss, &f, &tc.logits[i], 1, 2e-3f, &num);
        norm += fabs((double)dl[i]);
        if (f.changed)
            continue;
        checked++;
        if (fabs(num - (double)dl[i]) > 2e-4 * fmax(1.0, fabs(num)))
            fail_msg("E=%d C=%lld pad=%d: dlogits[%d] = %.6g, finite difference %.6g", E, (long long)C, pad, i,
                     (double)dl[i], num);
    }
    if (checked * 100 < S * E * 80)
        fail_msg("E=%d C=%lld pad=%d: only %d of %d logits leave the selection as it was", E, (long long)C, pad,
                 checked, S * E);
    assert_true(norm > 1e-3);
    if (pad)
        for (int e = 0; e < E; e++)
            assert_true(dl[2 * E + e] == 0.0f);
    free(tc.ws);
}

static void test_route_ec_backward_finite_difference(void **state)
{
    (void)state;
    fd_check(4, 6, 0);
    fd_check(4, 3, 1);
    fd_check(8, 3, 0);
    fd_check(2, 12, 1); /* every non-pad token taken by both experts */
}

static void expect_refused(ec_case *tc, const char *words)
{
    assert_int_equal(moe_cpu_route_forward(&g_ctx, &tc->a), MOE_ERR_INVALID_ARG);
    if (strstr(moe_test_last_error(), words) == NULL)
        fail_msg("expected an error with '%s', found '%s'", words, moe_test_last_error());
}

static void test_route_ec_rejects_bad_arguments(void **state)
{
    (void)state;
    ec_case tc;
    case_init(&tc, 4, 3, 2);
    tc.a.width = 2;
    expect_refused(&tc, "E = 3 columns");
    tc.a.width = 3;
    tc.a.topk = 1;
    expect_refused(&tc, "topk 0 with it");
    tc.a.topk = 0;
    tc.a.capacity = 5;
    expect_refused(&tc, "1 <= capacity <= S");
    tc.a.capacity = 0;
    expect_refused(&tc, "1 <= capacity <= S");
    free(tc.ws);
}

/* ------------------------------------------------- the plugin */

static const char *g_factor, *g_fraction;
static int fake_opt_set(const moe_host *h, const char *name)
{
    (void)h;
    if (strcmp(name, "moe-eval-capacity-token-fraction") == 0)
        return g_fraction != NULL;
    return strcmp(name, "moe-expert-capacity-factor") == 0 && g_factor != NULL; /* nothing else is given */
}
static double fake_opt_float(const moe_host *h, const char *name)
{
    (void)h;
    const char *v = strcmp(name, "moe-eval-capacity-token-fraction") == 0 ? g_fraction : g_factor;
    return v != NULL ? atof(v) : 0.0;
}
static uint64_t fake_step_seed(const moe_host *h) { (void)h; return 7u; }

/* Capacity ceil(factor * S / E), at most S, in training and (without a
 * fraction) in evaluation: S = 10, E = 4: factor 2 -> 5, 0.5 -> ceil(1.25)
 * = 2, 100 -> 10; eval fraction 0.3 -> ceil(3) = 3. Width E, expert choice. */
static void test_route_ec_plugin_capacity(void **state)
{
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/libmoe-gate-expert_choice.so", MOE_TEST_PLUGIN_DIR);
    void *hd = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (hd == NULL)
        fail_msg("cannot load %s: %s", path, dlerror());
    moe_plugin_entry_fn entry;
    void *sym = dlsym(hd, MOE_PLUGIN_SYMBOL);
    assert_non_null(sym);
    memcpy(&entry, &sym, sizeof entry);
    const moe_plugin_desc *d = entry();
    assert_string_equal(d->name, "expert_choice");
    const moe_gate_ops *g = d->ops;
    moe_test_host_init(&g_host);
    g_host.opt_set = fake_opt_set;
    g_host.opt_float = fake_opt_float;
    g_host.step_seed = fake_step_seed;
    const struct {
        const char *factor, *fraction;
        int train;
        int64_t C;
    } cases[] = {{"2", NULL, 1, 5}, {"2", NULL, 0, 5}, {"0.5", NULL, 1, 2},
                 {"100", NULL, 1, 10}, {"2", "0.3", 0, 3}, {"2", "0.3", 1, 5}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        g_factor = cases[i].factor;
        g_fraction = cases[i].fraction;
        void *gate;
        assert_int_equal(g->init(&g_host, 4, &gate), MOE_OK);
        moe_route_args a;
        memset(&a, 0, sizeof a);
        assert_int_equal(g->configure(gate, 10, cases[i].train, &a), MOE_OK);
        if (a.capacity != cases[i].C)
            fail_msg("factor %s, fraction %s, train %d: expected capacity %lld, found %lld", cases[i].factor,
                     cases[i].fraction ? cases[i].fraction : "-", cases[i].train, (long long)cases[i].C,
                     (long long)a.capacity);
        assert_int_equal(a.expert_choice, 1);
        assert_int_equal(a.width, 4);
        assert_int_equal(a.topk, 0);
        g->destroy(gate);
    }
    dlclose(hd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_ec_selection_and_weights),
        cmocka_unit_test(test_route_ec_pads_and_ties),
        cmocka_unit_test(test_route_ec_dispatch_combine),
        cmocka_unit_test(test_route_ec_backward_finite_difference),
        cmocka_unit_test(test_route_ec_rejects_bad_arguments),
        cmocka_unit_test(test_route_ec_plugin_capacity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
