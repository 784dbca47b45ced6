/* test_arch.c: the transformer_lm arch plugins (plugins/archs/transformer_lm.c)
 * loaded from the build tree into a cpu runtime, as the trainer drives them.
 *
 * What is checked: fairseq's parameter counts for the reference model (build
 * only, planned for 8 ranks), expert placement over ranks, the variants'
 * defaults and the FLOPs formula, clear refusals of what is not implemented,
 * the full backward against central finite differences of the loss
 * (sum of token NLL + w * sum of l_aux) for every kind of parameter, with
 * GELU and with relu (the default of transformer_lm and kin), bit-
 * identical gradients with and without --checkpoint-activations under
 * dropout, fp16/bf16 runs that track fp32, dropout masks that depend on the
 * step seed and the micro-batch but not on the call, --use-moe-pad-mask, and
 * batches smaller or larger than the one set up.
 *
 * Layout knowledge: the finite-difference test walks the parameters in the
 * order build() registers them (documented in transformer_lm.c) and checks
 * each unit's size against that walk first, so a layout change fails loudly.
 * World sizes above 1 are planned the way --dry-run plans them: the host's
 * rank and world are set before build; nothing is allocated then.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/runtime.h"
#include "kernels/half.h"
#include "moe/plugin.h"

#define MAX_ARGS 64

typedef struct fixture {
    moe_runtime *rt;
    const moe_host *h;
    const moe_arch_ops *arch;
    void *model;
} fixture;

static void check_ok(moe_status st, const char *what)
{
    if (st != MOE_OK)
        fprintf(stderr, "%s failed: %s\n", what, moe_error_message());
    assert_int_equal(st, MOE_OK);
}

/* Splits `args` on spaces (no quoting needed here). */
static int split_args(char *buf, const char **argv)
{
    int n = 0;
    for (char *tok = strtok(buf, " "); tok && n < MAX_ARGS; tok = strtok(NULL, " "))
        argv[n++] = tok;
    return n;
}

/* Runtime + arch `variant` (+ the top2 gate) and build(); world > 1 plans for
 * that many ranks as `rank`. Returns build's status, the fixture is usable
 * (and must be closed) either way. */
static moe_status open_model(fixture *fx, const char *variant, const char *args, int world, int rank, int64_t vocab,
                             int with_gate)
{
    memset(fx, 0, sizeof *fx);
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", args);
    const char *argv[MAX_ARGS];
    int argc = split_args(buf, argv);
    check_ok(moe_runtime_create_for_test(argc, argv, &fx->rt), "runtime");
    fx->h = moe_runtime_host(fx->rt);
    if (world > 1) {
        moe_host *hw = (moe_host *)(uintptr_t)fx->h;
        hw->world = world;
        hw->rank = rank;
    }
    const moe_plugin_desc *d;
    check_ok(moe_runtime_load_plugin(fx->rt, MOE_KIND_ARCH, variant, &d), "load arch");
    fx->arch = d->ops;
    if (with_gate) {
        const moe_plugin_desc *g;
        check_ok(moe_runtime_load_plugin(fx->rt, MOE_KIND_GATE, "top2", &g), "load gate");
        moe_runtime_set_gate(fx->rt, g->ops);
    }
    moe_error_clear();
    return fx->arch->build(fx->h, vocab, 1, &fx->model);
}

static void close_model(fixture *fx)
{
    if (fx->model)
        fx->arch->destroy(fx->model);
    moe_runtime_destroy(fx->rt);
    memset(fx, 0, sizeof *fx);
}

/* ------------------------------------------------------ counts and layout */

#define REFERENCE                                                                                                \
    "--decoder-layers 24 --decoder-embed-dim 2048 --decoder-ffn-embed-dim 8192 --decoder-attention-heads 32 "   \
    "--moe-expert-count 8 --moe-freq 2 --share-decoder-input-output-embed --moe-gating-use-fp32 "               \
    "--checkpoint-activations --dropout 0.1 --attention-dropout 0.1"

static void test_arch_reference_param_counts(void **state)
{
    (void)state;
    fixture fx;
    check_ok(open_model(&fx, "transformer_lm_gpt", REFERENCE, 8, 0, 50000, 0), "build");
    int64_t ne, ex;
    moe_runtime_param_counts(fx.rt, &ne, &ex);
    assert_int_equal(ne, 908423168LL);  /* FAIRSEQ_SPEC.md §1.10, the sample log's line */
    assert_int_equal(ex, 402776064LL);
    /* root + 24 layers + 12 MoE layers x 1 local expert, rank 0 holds expert 0 */
    assert_int_equal(moe_runtime_num_units(fx.rt), 1 + 24 + 12);
    int experts = 0;
    for (int i = 0; i < moe_runtime_num_units(fx.rt); i++) {
        moe_unit_info u;
        moe_runtime_unit(fx.rt, i, &u);
        assert_null(u.param); /* build allocates nothing */
        if (u.expert_index >= 0) {
            assert_int_equal(u.expert_index, 0);
            assert_int_equal(u.numel, 33564672LL);
            experts++;
        }
    }
    assert_int_equal(experts, 12);
    moe_model_info info;
    fx.arch->info(fx.model, 2048, &info);
    assert_int_equal(info.num_layers, 24);
    assert_int_equal(info.num_moe_layers, 12);
    assert_int_equal(info.experts, 8);
    assert_int_equal(info.local_experts, 1);
    close_model(&fx);
}

/* expert ids per rank (FAIRSEQ_SPEC.md §2.4): E >= world: r*L + j; E < world: r mod E */
static void test_arch_expert_placement(void **state)
{
    (void)state;
    static const struct {
        int world, rank, expect_first, local;
    } cases[] = {{4, 3, 6, 2}, {8, 5, 5, 1}, {16, 11, 3, 1}, {1, 0, 0, 8}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        fixture fx;
        check_ok(open_model(&fx, "transformer_lm_gpt2_tiny",
                            "--decoder-layers 4 --moe-expert-count 8 --moe-freq 2 --decoder-ffn-embed-dim 48 "
                            "--moe-expert-ffn-dim 40",
                            cases[c].world, cases[c].rank, 100, 0),
                 "build");
        int seen = 0;
        for (int i = 0; i < moe_runtime_num_units(fx.rt); i++) {
            moe_unit_info u;
            moe_runtime_unit(fx.rt, i, &u);
            if (u.expert_index < 0)
                continue;
            /* experts of one layer follow the layer in id order */
            assert_int_equal(u.expert_index, cases[c].expect_first + seen % cases[c].local);
            /* --moe-expert-ffn-dim 40 is the expert width, d = 64 */
            assert_int_equal(u.numel, 64 * 40 + 40 + 40 * 64 + 64);
            char want[96];
            snprintf(want, sizeof want, "decoder.layers.%d.moe_layer.experts.%d", seen / cases[c].local * 2 + 1,
                     u.expert_index);
            assert_string_equal(u.name, want);
            seen++;
        }
        assert_int_equal(seen, 2 * cases[c].local);
        close_model(&fx);
    }
}

static void test_arch_variant_defaults_and_flops(void **state)
{
    (void)state;
    fixture fx;
    moe_model_info info;
    /* gpt2_tiny: d 64, f 64, 2 layers, 1 head */
    check_ok(open_model(&fx, "transformer_lm_gpt2_tiny", "", 1, 0, 100, 0), "build tiny");
    fx.arch->info(fx.model, 16, &info);
    assert_int_equal(info.embed_dim, 64);
    assert_int_equal(info.ffn_dim, 64);
    assert_int_equal(info.num_layers, 2);
    assert_int_equal(info.heads, 1);
    assert_int_equal(info.num_moe_layers, 0);
    /* dense: 3 * (L * (8d^2 + 4Td + 4df) + 2dV) */
    double d = 64, T = 16, f = 64, V = 100;
    assert_true(info.flops_per_token == 3.0 * (2 * (8 * d * d + 4 * T * d + 4 * d * f) + 2 * d * V));
    close_model(&fx);

    /* the command line wins; gpt3's ffn default is 4*d of the given d, and gpt3 always ties */
    check_ok(open_model(&fx, "transformer_lm_gpt3_small", "--decoder-embed-dim 32 --decoder-attention-heads 4", 1, 0,
                        100, 0),
             "build gpt3");
    fx.arch->info(fx.model, 8, &info);
    assert_int_equal(info.embed_dim, 32);
    assert_int_equal(info.ffn_dim, 128);
    assert_int_equal(info.num_layers, 12);
    moe_unit_info u;
    moe_runtime_unit(fx.rt, 0, &u);
    assert_int_equal(u.numel, 100 * 32 + 2 * 32); /* embedding + final LN, no output projection */
    close_model(&fx);

    /* MoE FLOPs with top-2: k * 4 d fe + 2 d E per MoE layer */
    check_ok(open_model(&fx, "transformer_lm_gpt",
                        "--decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-layers 2 "
                        "--decoder-attention-heads 2 --moe-expert-count 4 --moe-freq 2 --moe-expert-ffn-dim 24",
                        1, 0, 40, 1),
             "build moe");
    fx.arch->info(fx.model, 8, &info);
    d = 16, T = 8, f = 32, V = 40;
    double fe = 24, E = 4;
    double fwd = 2 * (8 * d * d + 4 * T * d) + 4 * d * f + 2 * 4 * d * fe + 2 * d * E + 2 * d * V;
    assert_true(info.flops_per_token == 3.0 * fwd);
    assert_int_equal(info.num_moe_layers, 1);
    close_model(&fx);

    /* --alternate-decoder-ffn-embed-dim: the MoE layer becomes a dense FFN of that width */
    check_ok(open_model(&fx, "transformer_lm_gpt",
                        "--decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-layers 2 "
                        "--decoder-attention-heads 2 --moe-expert-count 4 --moe-freq 2 "
                        "--alternate-decoder-ffn-embed-dim 24",
                        1, 0, 40, 1),
             "build alternate");
    int64_t ne, ex;
    moe_runtime_param_counts(fx.rt, &ne, &ex);
    int64_t attn = 4 * (16 * 16 + 16) + 4 * 16;
    assert_int_equal(ex, 0);
    /* untied: embedding and output projection */
    assert_int_equal(ne, 2 * 40 * 16 + 2 * 16 + 2 * attn + (16 * 32 + 32 + 32 * 16 + 16) +
                             (16 * 24 + 24 + 24 * 16 + 16));
    close_model(&fx);
}

static void test_arch_rejects_unsupported(void **state)
{
    (void)state;
    fixture fx;
    assert_int_equal(open_model(&fx, "transformer_lm_gpt", "--decoder-learned-pos", 1, 0, 100, 0),
                     MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_error_message(), "decoder-learned-pos"));
    close_model(&fx);
    assert_int_equal(open_model(&fx, "transformer_lm_gpt", "--decoder-embed-dim 30 --decoder-attention-heads 4", 1, 0,
                                100, 0),
                     MOE_ERR_INVALID_ARG);
    close_model(&fx);
    assert_int_equal(open_model(&fx, "transformer_lm_gpt", "--moe-expert-count 6 --moe-freq 2", 4, 0, 100, 0),
                     MOE_ERR_INVALID_ARG);
    close_model(&fx);
}

/* The variants whose fairseq default is relu build with their defaults alone
 * (--arch transformer_lm and the rest), at their fairseq sizes. */
static void test_arch_relu_variants_build(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        int64_t d, f, layers, heads;
    } relu[] = {{"transformer_lm", 512, 2048, 6, 8},
                {"transformer_lm_big", 1024, 4096, 12, 16},
                {"transformer_lm_wiki103", 1024, 4096, 16, 8},
                {"transformer_lm_baevski_wiki103", 1024, 4096, 16, 8},
                {"transformer_lm_gbw", 512, 4096, 12, 16},
                {"transformer_lm_baevski_gbw", 512, 4096, 12, 16}};
    for (size_t i = 0; i < sizeof relu / sizeof relu[0]; i++) {
        fixture fx;
        check_ok(open_model(&fx, relu[i].name, "", 1, 0, 100, 0), relu[i].name);
        moe_model_info info;
        fx.arch->info(fx.model, 16, &info);
        assert_int_equal(info.embed_dim, relu[i].d);
        assert_int_equal(info.ffn_dim, relu[i].f);
        assert_int_equal(info.num_layers, relu[i].layers);
        assert_int_equal(info.heads, relu[i].heads);
        close_model(&fx);
    }
}

/* ------------------------------------------------------------- training */

enum { B = 2, T = 8, NTOK = B * T, VOCAB = 40, PAD = 1 };

typedef struct run {
    fixture fx;
    int32_t *tokens, *targets;  /* device (B,T) */
    float *losses;              /* device (N) */
    int32_t tok[NTOK];          /* host copy of the input */
    int n_moe;
} run;

#define TINY                                                                                                     \
    "--decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-layers 2 --decoder-attention-heads 2 "         \
    "--moe-expert-count 4 --moe-freq 2 --seed 3 "

static void open_run_variant(run *r, const char *variant, const char *args)
{
    memset(r, 0, sizeof *r);
    check_ok(open_model(&r->fx, variant, args, 1, 0, VOCAB, 1), "build");
    check_ok(moe_runtime_alloc_params(r->fx.rt), "alloc params");
    check_ok(r->fx.arch->setup(r->fx.model, B, T), "setup");
    const moe_host *h = r->fx.h;
    check_ok(h->backend->alloc(h->ctx, NTOK * 4, "tokens", (void **)&r->tokens), "alloc");
    check_ok(h->backend->alloc(h->ctx, NTOK * 4, "targets", (void **)&r->targets), "alloc");
    check_ok(h->backend->alloc(h->ctx, NTOK * 4, "losses", (void **)&r->losses), "alloc");
    int32_t tok[NTOK], tgt[NTOK];
    uint32_t x = 12345u;
    for (int i = 0; i < NTOK; i++) {
        x = x * 1664525u + 1013904223u;
        tok[i] = 2 + (int32_t)((x >> 8) % (VOCAB - 2)); /* no pad in the input: see fd test */
        x = x * 1664525u + 1013904223u;
        tgt[i] = (int32_t)((x >> 8) % VOCAB);
    }
    tgt[5] = PAD; /* one ignored target */
    memcpy(r->tok, tok, sizeof tok);
    check_ok(h->backend->copy_from_host(h->ctx, r->tokens, tok, sizeof tok), "copy");
    check_ok(h->backend->copy_from_host(h->ctx, r->targets, tgt, sizeof tgt), "copy");
}

static void open_run(run *r, const char *args) { open_run_variant(r, "transformer_lm_gpt", args); }

static void close_run(run *r)
{
    const moe_host *h = r->fx.h;
    h->backend->free(h->ctx, r->tokens);
    h->backend->free(h->ctx, r->targets);
    h->backend->free(h->ctx, r->losses);
    close_model(&r->fx);
}

/* forward + loss (sum NLL + w_aux * sum l_aux, in double on the host); with
 * grad, the logits become dlogits and backward runs with dl_aux = w_aux */
static double step(run *r, int train, int micro, double w_aux, int grad, float *logits_copy)
{
    const moe_host *h = r->fx.h;
    moe_fwd_out out;
    check_ok(r->fx.arch->forward(r->fx.model, r->tokens, B, T, train, micro, &out), "forward");
    assert_int_equal(out.N, NTOK);
    assert_int_equal(out.V, VOCAB);
    r->n_moe = out.n_moe_layers;
    if (logits_copy) /* fp32 runs only */
        check_ok(h->backend->copy_to_host(h->ctx, logits_copy, out.logits, NTOK * VOCAB * 4), "copy");
    check_ok(h->ops->cross_entropy(h->ctx, r->losses, out.logits, r->targets, NTOK, VOCAB, PAD, grad ? 1.0f : 0.0f,
                                   h->act_dtype),
             "cross_entropy");
    float loss[NTOK], aux[8];
    check_ok(h->backend->copy_to_host(h->ctx, loss, r->losses, sizeof loss), "copy");
    assert_true(out.n_moe_layers <= 8);
    check_ok(h->backend->copy_to_host(h->ctx, aux, out.l_aux, (uint64_t)out.n_moe_layers * 4), "copy");
    double total = 0.0;
    for (int i = 0; i < NTOK; i++)
        total += loss[i];
    for (int i = 0; i < out.n_moe_layers; i++)
        total += w_aux * aux[i];
    if (grad)
        check_ok(r->fx.arch->backward(r->fx.model, (float)w_aux), "backward");
    return total;
}

/* every unit's gradient on the host, concatenated */
static float *grads_copy(run *r, int64_t *n_out)
{
    int64_t n = 0;
    int nu = moe_runtime_num_units(r->fx.rt);
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(r->fx.rt, i, &u);
        n += u.numel;
    }
    const moe_dtype dt = r->fx.h->grad_dtype;
    float *g = malloc((size_t)n * sizeof *g);
    uint16_t *half = malloc((size_t)n * sizeof *half);
    assert_non_null(g);
    assert_non_null(half);
    int64_t o = 0;
    for (int i = 0; i < nu; i++) {
        moe_unit_info u;
        moe_runtime_unit(r->fx.rt, i, &u);
        void *dst = dt == MOE_F32 ? (void *)(g + o) : (void *)(half + o);
        check_ok(r->fx.h->backend->copy_to_host(r->fx.h->ctx, dst, u.grad, (uint64_t)u.numel * moe_dtype_size(dt)),
                 "copy");
        o += u.numel;
    }
    for (int64_t i = 0; dt != MOE_F32 && i < n; i++)
        g[i] = dt == MOE_F16 ? moe_f16_to_f32(half[i]) : moe_bf16_to_f32(half[i]);
    free(half);
    *n_out = n;
    return g;
}

/* Tensors in registration order: unit, offset in the unit, size, name. */
typedef struct tensor_ref {
    int unit;
    int64_t offset, numel;
    char name[64];
} tensor_ref;

static int add_ref(tensor_ref *t, int n, int unit, int64_t *offset, int64_t numel, const char *name)
{
    t[n].unit = unit;
    t[n].offset = *offset;
    t[n].numel = numel;
    snprintf(t[n].name, sizeof t[n].name, "%s", name);
    *offset += numel;
    return n + 1;
}

/* tiny model: d 16, f 32, 2 layers (0 dense, 1 MoE), E 4 experts of width fe */
static int tiny_layout(tensor_ref *t, int64_t *unit_sizes, int tied, int final_norm, int64_t fe)
{
    const int64_t d = 16, f = 32, E = 4, V = VOCAB;
    int n = 0;
    int64_t o = 0;
    n = add_ref(t, n, 0, &o, V * d, "embed_tokens");
    if (final_norm) {
        n = add_ref(t, n, 0, &o, d, "layer_norm.weight");
        n = add_ref(t, n, 0, &o, d, "layer_norm.bias");
    }
    if (!tied)
        n = add_ref(t, n, 0, &o, V * d, "output_projection");
    unit_sizes[0] = o;
    for (int l = 0; l < 2; l++) {
        o = 0;
        static const char *const attn[] = {"k_proj.weight", "v_proj.weight", "q_proj.weight", "k_proj.bias",
                                           "v_proj.bias",   "q_proj.bias",   "out_proj.weight", "out_proj.bias",
                                           "self_attn_layer_norm.weight", "self_attn_layer_norm.bias"};
        static const int64_t sq[] = {1, 1, 1, 0, 0, 0, 1, 0, 0, 0};
        for (int j = 0; j < 10; j++)
            n = add_ref(t, n, 1 + l, &o, sq[j] ? d * d : d, attn[j]);
        if (l == 0) {
            n = add_ref(t, n, 1, &o, f * d, "fc1.weight");
            n = add_ref(t, n, 1, &o, f, "fc1.bias");
            n = add_ref(t, n, 1, &o, d * f, "fc2.weight");
            n = add_ref(t, n, 1, &o, d, "fc2.bias");
        } else {
            n = add_ref(t, n, 2, &o, E * d, "moe_layer.gate.wg");
        }
        n = add_ref(t, n, 1 + l, &o, d, "final_layer_norm.weight");
        n = add_ref(t, n, 1 + l, &o, d, "final_layer_norm.bias");
        unit_sizes[1 + l] = o;
    }
    for (int e = 0; e < E; e++) {
        o = 0;
        n = add_ref(t, n, 3 + e, &o, fe * d, "expert fc1.weight");
        n = add_ref(t, n, 3 + e, &o, fe, "expert fc1.bias");
        n = add_ref(t, n, 3 + e, &o, d * fe, "expert fc2.weight");
        n = add_ref(t, n, 3 + e, &o, d, "expert fc2.bias");
        unit_sizes[3 + e] = o;
    }
    return n;
}

static float get_param(run *r, int unit, int64_t idx)
{
    moe_unit_info u;
    moe_runtime_unit(r->fx.rt, unit, &u);
    float v;
    check_ok(r->fx.h->backend->copy_to_host(r->fx.h->ctx, &v, (float *)u.param + idx, 4), "copy");
    return v;
}

static void set_param(run *r, int unit, int64_t idx, float v)
{
    moe_unit_info u;
    moe_runtime_unit(r->fx.rt, unit, &u);
    check_ok(r->fx.h->backend->copy_from_host(r->fx.h->ctx, (float *)u.param + idx, &v, 4), "copy");
}

/* Central differences of the fp32 loss against the analytic gradient for 4
 * random elements of every tensor (for the embedding 16: one in the pad row,
 * the others in rows the input looks up). With eps = 1e-2 the truncation error is
 * eps^2 |f'''| / 6 ~ 1e-5 here and the rounding noise of a ~60-nat fp32 sum
 * over a few hundred operations is ~1e-5 / eps = 1e-3 at most, so 2e-3
 * absolute plus 1% relative separates a correct gradient from any wrong
 * factor or missing term (the worst error seen is ~3e-4). A sample whose
 * perturbation moves a routing decision is not a gradient check: the loss
 * has a kink or a jump inside [-eps, eps]. Two signs give it away: a second
 * difference far above the smooth eps^2 f'' ~ 1e-4, or a central difference
 * over [-eps/2, eps/2] that disagrees with the one over [-eps, eps] (on a
 * smooth loss they differ by eps^2 |f'''| / 8 ~ 1e-5). Such samples are
 * skipped and counted.
 *
 * With `kinks` (a relu model) the loss has a kink wherever a pre-activation
 * crosses 0, and with ~1500 of them some cross inside [-eps, eps] for many
 * samples, often too slightly for the signs above. The analytic gradient is
 * then the slope of the smooth piece that holds the unperturbed point, which
 * the second-order one-sided differences measure on a side the kink is not
 * on: L = (3 f(0) - 4 f(-eps/2) + f(-eps)) / eps over [-eps, 0], R alike over
 * [0, eps] (truncation eps^2 |f'''| / 3; rounding noise below 1.1e-3 as
 * measured on the smooth gelu losses). A sample passes when the central
 * difference (on a smooth loss) or L or R matches; a sample with kinks or
 * jumps on both sides that matches none is skipped and counted. A wrong relu
 * backward is wrong on the clean side too, so it still fails. */
static void check_finite_differences(const char *args, int tied, int final_norm, int64_t fe, int kinks)
{
    const double w_aux = 0.7, eps = 1e-2;
    run r;
    open_run(&r, args);
    assert_int_equal(moe_runtime_num_units(r.fx.rt), 7);
    tensor_ref t[64];
    int64_t unit_sizes[7];
    int nt = tiny_layout(t, unit_sizes, tied, final_norm, fe);
    for (int i = 0; i < 7; i++) {
        moe_unit_info u;
        moe_runtime_unit(r.fx.rt, i, &u);
        assert_int_equal(u.numel, unit_sizes[i]);
    }

    check_ok(moe_runtime_zero_grads(r.fx.rt), "zero grads");
    double f0 = step(&r, 1, 0, w_aux, 1, NULL);
    assert_int_equal(r.n_moe, 1);
    int64_t ng;
    float *grad = grads_copy(&r, &ng);
    int64_t unit_base[7] = {0};
    for (int i = 1; i < 7; i++)
        unit_base[i] = unit_base[i - 1] + unit_sizes[i - 1];

    int checked = 0, skipped = 0, nonzero = 0, one_sided = 0;
    double worst = 0.0;
    uint32_t x = 777u;
    for (int k = 0; k < nt; k++) {
        int samples = k == 0 ? 16 : t[k].numel < 4 ? (int)t[k].numel : 4;
        for (int s = 0; s < samples; s++) {
            x = x * 1664525u + 1013904223u;
            int64_t idx = t[k].offset + (int64_t)((x >> 8) % (uint32_t)t[k].numel);
            if (k == 0) /* the pad row (no lookup gradient), then rows of input tokens */
                idx = (s == 0 ? PAD : r.tok[s]) * 16 + (int64_t)((x >> 4) % 16u);
            float p0 = get_param(&r, t[k].unit, idx);
            set_param(&r, t[k].unit, idx, (float)(p0 + eps));
            double fp = step(&r, 1, 0, w_aux, 0, NULL);
            set_param(&r, t[k].unit, idx, (float)(p0 - eps));
            double fm = step(&r, 1, 0, w_aux, 0, NULL);
            set_param(&r, t[k].unit, idx, (float)(p0 + 0.5 * eps));
            double fph = step(&r, 1, 0, w_aux, 0, NULL);
            set_param(&r, t[k].unit, idx, (float)(p0 - 0.5 * eps));
            double fmh = step(&r, 1, 0, w_aux, 0, NULL);
            set_param(&r, t[k].unit, idx, p0);
            double fd = (fp - fm) / ((double)(float)(p0 + eps) - (double)(float)(p0 - eps));
            double fdh = (fph - fmh) / ((double)(float)(p0 + 0.5 * eps) - (double)(float)(p0 - 0.5 * eps));
            const int smooth = !(fabs(fp + fm - 2.0 * f0) > 1e-2 || fabs(fd - fdh) > 2e-3 + 1e-2 * fabs(fd));
            const double an = grad[unit_base[t[k].unit] + idx];
            double err = fabs(fd - an), tol = 2e-3 + 1e-2 * fabs(fd);
            if (kinks && !(smooth && err <= tol)) {
                const double lo = (3.0 * f0 - 4.0 * fmh + fm) / eps, hi = (-3.0 * f0 + 4.0 * fph - fp) / eps;
                const double one = fabs(lo - an) < fabs(hi - an) ? lo : hi;
                if (fabs(one - an) <= 2e-3 + 1e-2 * fabs(one)) {
                    fd = one;
                    err = fabs(fd - an);
                    tol = 2e-3 + 1e-2 * fabs(fd);
                    one_sided++;
                }
            }
            if (err > tol && !smooth) {
                skipped++;
                continue;
            }
            if (err > tol)
                fprintf(stderr, "%s[%lld]: analytic %.6g, finite difference %.6g\n", t[k].name, (long long)idx, an,
                        fd);
            assert_true(err <= tol);
            if (err > worst)
                worst = err;
            if (fabs(an) > 1e-2)
                nonzero++;
            checked++;
        }
    }
    fprintf(stderr,
            "finite differences: %d checked (%d one-sided), %d skipped at routing changes or kinks, %d non-trivial, "
            "worst %.3g\n",
            checked, one_sided, skipped, nonzero, worst);
    assert_true(skipped * 10 <= checked);
    assert_true(nonzero * 2 >= checked); /* the comparisons are not vacuous */
    free(grad);
    close_run(&r);
}

/* tied embedding, final norm, tanh GELU, no dropout; the seed keeps every token
 * of the tiny batch away from a routing tie (no sample is skipped) */
static void test_arch_gradients_match_finite_differences(void **state)
{
    (void)state;
    check_finite_differences(TINY "--share-decoder-input-output-embed --moe-second-expert-policy all --dropout 0 "
                                  "--attention-dropout 0 --seed 4",
                             1, 1, 32, 0);
}

/* Untied output projection, no final norm, erf GELU, an expert width of its
 * own, no embedding scale, and every dropout on: the masks are a function of
 * (seed, stream), so the loss stays a smooth function of the parameters and
 * finite differences check that backward applies the very masks forward drew.
 * The seed keeps the tiny batch's tokens away from routing ties under these
 * masks (no sample skipped). */
static void test_arch_gradients_untied_with_dropout(void **state)
{
    (void)state;
    check_finite_differences(TINY "--moe-second-expert-policy all --dropout 0.2 --attention-dropout 0.2 "
                                  "--activation-dropout 0.2 --no-decoder-final-norm --gelu-erf "
                                  "--moe-expert-ffn-dim 24 --no-scale-embedding --seed 2",
                             0, 0, 24, 0);
}

/* The first model with relu: samples whose perturbation moves a pre-activation
 * across 0 are checked by one-sided differences (about 30 of 200 here, one
 * skipped). A relu backward that multiplied by a GELU derivative, or passed
 * dout where the pre-activation is negative, fails on the first few samples. */
static void test_arch_gradients_relu(void **state)
{
    (void)state;
    check_finite_differences(TINY "--share-decoder-input-output-embed --moe-second-expert-policy all --dropout 0 "
                                  "--attention-dropout 0 --activation-fn relu --seed 4",
                             1, 1, 32, 1);
}

/* relu with every dropout on, the activation dropout given as fairseq's
 * --relu-dropout, untied, an expert width of its own: backward applies the
 * masks forward drew after the relu */
static void test_arch_gradients_relu_with_dropout(void **state)
{
    (void)state;
    check_finite_differences(TINY "--moe-second-expert-policy all --dropout 0.2 --attention-dropout 0.2 "
                                  "--relu-dropout 0.2 --activation-fn relu --no-decoder-final-norm "
                                  "--moe-expert-ffn-dim 24",
                             0, 0, 24, 1);
}

static int differs(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof *a) != 0; }

/* transformer_lm's default activation is relu: its model is transformer_lm_gpt
 * with --activation-fn relu (the other defaults given), not the gelu one. And
 * fairseq's --relu-dropout is the activation dropout when --activation-dropout
 * is 0: the same masks at the same sites, ignored when it is not 0. */
static void test_arch_relu_default_and_relu_dropout(void **state)
{
    (void)state;
    const char *same = TINY "--dropout 0.1 --attention-dropout 0.1 --moe-second-expert-policy all ";
    static const struct {
        const char *variant, *args;
    } runs[] = {{"transformer_lm", ""},
                {"transformer_lm_gpt", "--activation-fn relu"},
                {"transformer_lm_gpt", "--activation-fn gelu"},
                {"transformer_lm", "--activation-dropout 0.3"},
                {"transformer_lm", "--relu-dropout 0.3"},
                {"transformer_lm", "--activation-dropout 0.3 --relu-dropout 0.6"},
                {"transformer_lm", "--relu-dropout 0.6"}};
    enum { RUNS = sizeof runs / sizeof runs[0] };
    static float logits[RUNS][NTOK * VOCAB];
    for (int i = 0; i < RUNS; i++) {
        char args[512];
        snprintf(args, sizeof args, "%s%s", same, runs[i].args);
        run r;
        open_run_variant(&r, runs[i].variant, args);
        step(&r, i >= 3, 0, 0.0, 0, logits[i]); /* evaluation for the first three: no dropout */
        close_run(&r);
    }
    assert_false(differs(logits[0], logits[1], NTOK * VOCAB));
    assert_true(differs(logits[0], logits[2], NTOK * VOCAB));
    assert_false(differs(logits[3], logits[4], NTOK * VOCAB));
    assert_false(differs(logits[3], logits[5], NTOK * VOCAB));
    assert_true(differs(logits[3], logits[6], NTOK * VOCAB));
}

static double cosine(const float *a, const float *b, int64_t n)
{
    double ab = 0, aa = 0, bb = 0;
    for (int64_t i = 0; i < n; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return ab / sqrt(aa * bb);
}

/* fp16 and bf16 storage (the gate logits and their gradient go through casts
 * there, which fp32 skips): the loss and the gradient track the fp32 run of
 * the same model. Bounds: a few roundings of each format's unit roundoff
 * (2^-11, 2^-8) through two layers, about ten times what is measured (loss
 * within 5e-5 / 7e-4 relative, gradient cosines 0.99999 / 0.9997; the bf16
 * gate gradient, a small tensor summed from few tokens, 0.998); a wrong
 * cast or a dtype mix-up gives garbage far outside them. */
static void test_arch_half_precision_tracks_fp32(void **state)
{
    (void)state;
    const char *base = TINY "--share-decoder-input-output-embed --moe-second-expert-policy all --dropout 0 "
                            "--attention-dropout 0";
    tensor_ref t[64];
    int64_t unit_sizes[7], unit_base[7] = {0};
    int nt = tiny_layout(t, unit_sizes, 1, 1, 32);
    for (int i = 1; i < 7; i++)
        unit_base[i] = unit_base[i - 1] + unit_sizes[i - 1];
    int wg = -1;
    for (int k = 0; k < nt; k++)
        if (strcmp(t[k].name, "moe_layer.gate.wg") == 0)
            wg = k;
    assert_true(wg >= 0);
    const int64_t wg_at = unit_base[t[wg].unit] + t[wg].offset, wg_n = t[wg].numel;

    run r;
    open_run(&r, base);
    check_ok(moe_runtime_zero_grads(r.fx.rt), "zero grads");
    double loss32 = step(&r, 1, 0, 0.7, 1, NULL);
    int64_t n32;
    float *g32 = grads_copy(&r, &n32);
    close_run(&r);

    static const struct {
        const char *flag;
        moe_dtype dt;
        double loss_rel, cos_all, cos_gate;
    } modes[] = {{"--memory-efficient-fp16", MOE_F16, 5e-4, 0.9999, 0.999},
                 {"--memory-efficient-bf16", MOE_BF16, 5e-3, 0.999, 0.995}};
    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        char args[512];
        snprintf(args, sizeof args, "%s %s", base, modes[m].flag);
        open_run(&r, args);
        assert_int_equal(r.fx.h->act_dtype, modes[m].dt);
        check_ok(moe_runtime_zero_grads(r.fx.rt), "zero grads");
        double loss = step(&r, 1, 0, 0.7, 1, NULL);
        int64_t n;
        float *g = grads_copy(&r, &n);
        assert_int_equal(n, n32);
        double c_all = cosine(g, g32, n), c_gate = cosine(g + wg_at, g32 + wg_at, wg_n);
        fprintf(stderr, "%s: loss %.6f vs fp32 %.6f, gradient cosine %.6f, gate %.6f\n", modes[m].flag, loss, loss32,
                c_all, c_gate);
        assert_true(fabs(loss - loss32) <= modes[m].loss_rel * fabs(loss32));
        assert_true(c_all >= modes[m].cos_all);
        assert_true(c_gate >= modes[m].cos_gate);
        free(g);
        close_run(&r);
    }
    free(g32);
}

/* --checkpoint-activations recomputes every layer with the same masks and
 * routing noise: gradients (two micro-batches accumulated) are bit-identical.
 * So are those of the run without it, which recomputes the layer norm
 * outputs, the experts' inputs and, without activation dropout, the FFN and
 * expert activations (fp32: act of the kept pre-activation is the forward's) */
static void checkpointing_bit_identical(const char *act_dropout)
{
    char common[512], with[600];
    snprintf(common, sizeof common,
             TINY "--share-decoder-input-output-embed --dropout 0.1 --attention-dropout 0.1 "
                  "--activation-dropout %s --decoder-layers 3",
             act_dropout);
    snprintf(with, sizeof with, "%s --checkpoint-activations", common);
    float *g[2];
    int64_t n[2];
    double loss[2];
    for (int c = 0; c < 2; c++) {
        run r;
        open_run(&r, c ? with : common);
        check_ok(moe_runtime_zero_grads(r.fx.rt), "zero grads");
        loss[c] = step(&r, 1, 0, 0.5, 1, NULL) + step(&r, 1, 1, 0.5, 1, NULL);
        g[c] = grads_copy(&r, &n[c]);
        close_run(&r);
    }
    assert_int_equal(n[0], n[1]);
    assert_true(loss[0] == loss[1]);
    assert_memory_equal(g[0], g[1], (size_t)n[0] * sizeof(float));
    int64_t nz = 0;
    for (int64_t i = 0; i < n[0]; i++)
        nz += g[0][i] != 0.0f;
    assert_true(nz > n[0] / 2);
    free(g[0]);
    free(g[1]);
}

static void test_arch_checkpointing_bit_identical(void **state)
{
    (void)state;
    checkpointing_bit_identical("0.1");
    checkpointing_bit_identical("0");
}

/* host->expert_grad_scale (fairseq's 1/N hook, §2.9) multiplies the expert
 * units' gradients only, weights and biases; the rest is bit-identical */
static void test_arch_expert_grad_scale(void **state)
{
    (void)state;
    float *g[2];
    int64_t n = 0;
    for (int k = 0; k < 2; k++) {
        run r;
        open_run(&r, TINY);
        if (k == 1)
            moe_runtime_set_expert_grad_scale(r.fx.rt, 0.25f);
        step(&r, 1, 0, 0.01, 1, NULL);
        g[k] = grads_copy(&r, &n);
        if (k == 1) {
            int64_t o = 0, expert_elems = 0;
            for (int i = 0; i < moe_runtime_num_units(r.fx.rt); i++) {
                moe_unit_info u;
                moe_runtime_unit(r.fx.rt, i, &u);
                for (int64_t j = o; j < o + u.numel; j++) {
                    float want = u.expert_index >= 0 ? 0.25f * g[0][j] : g[0][j];
                    if (fabsf(g[1][j] - want) > 1e-6f * (1.0f + fabsf(want)))
                        fail_msg("unit %s element %lld: %g with scale 0.25, %g without", u.name, (long long)(j - o),
                                 g[1][j], g[0][j]);
                }
                if (u.expert_index >= 0)
                    expert_elems += u.numel;
                o += u.numel;
            }
            assert_true(expert_elems > 0);
        }
        close_run(&r);
    }
    free(g[0]);
    free(g[1]);
}

static void test_arch_dropout_depends_on_seed_and_micro(void **state)
{
    (void)state;
    run r;
    /* routing policy all: no gate noise, so every difference below is dropout's */
    open_run(&r, TINY "--share-decoder-input-output-embed --dropout 0.1 --attention-dropout 0.1 "
                      "--moe-second-expert-policy all");
    static float a[NTOK * VOCAB], b[NTOK * VOCAB];
    step(&r, 1, 0, 0.0, 0, a);
    step(&r, 1, 0, 0.0, 0, b);
    assert_false(differs(a, b, NTOK * VOCAB)); /* same seed, same micro: same masks */
    step(&r, 1, 1, 0.0, 0, b);
    assert_true(differs(a, b, NTOK * VOCAB)); /* another micro-batch: other masks */
    moe_runtime_set_step_seed(r.fx.rt, 4);
    step(&r, 1, 0, 0.0, 0, b);
    assert_true(differs(a, b, NTOK * VOCAB)); /* another update: other masks */
    step(&r, 0, 0, 0.0, 0, a);
    step(&r, 0, 1, 0.0, 0, b);
    assert_false(differs(a, b, NTOK * VOCAB)); /* evaluation: no dropout at all */
    /* backward after an evaluation forward is a usage error, said clearly */
    moe_error_clear();
    assert_int_equal(r.fx.arch->backward(r.fx.model, 0.0f), MOE_ERR_INTERNAL);
    assert_non_null(strstr(moe_error_message(), "train = 1"));
    close_run(&r);
}

static void l_aux_and_logits(run *r, float *l_aux, float *logits)
{
    moe_fwd_out out;
    check_ok(r->fx.arch->forward(r->fx.model, r->tokens, B, T, 1, 0, &out), "forward");
    check_ok(r->fx.h->backend->copy_to_host(r->fx.h->ctx, l_aux, out.l_aux, 4), "copy");
    check_ok(r->fx.h->backend->copy_to_host(r->fx.h->ctx, logits, out.logits, NTOK * VOCAB * 4), "copy");
}

/* --use-moe-pad-mask keeps pad tokens out of routing (and so out of the load-
 * balancing loss); without pads it changes nothing. Batches smaller than the
 * one set up run (validation), larger ones are refused. */
static void test_arch_pad_mask_and_batch_shapes(void **state)
{
    (void)state;
    const char *base = TINY "--share-decoder-input-output-embed --moe-second-expert-policy all --dropout 0 "
                            "--attention-dropout 0";
    char with[512];
    snprintf(with, sizeof with, "%s --use-moe-pad-mask", base);
    static float logits[2][2][NTOK * VOCAB];
    float aux[2][2];
    for (int c = 0; c < 2; c++) {
        run r;
        open_run(&r, c ? with : base);
        l_aux_and_logits(&r, &aux[c][0], logits[c][0]);
        int32_t tok[NTOK];
        memcpy(tok, r.tok, sizeof tok);
        for (int i = T - 3; i < T; i++) /* right padding of the second sequence */
            tok[T + i] = PAD;
        check_ok(r.fx.h->backend->copy_from_host(r.fx.h->ctx, r.tokens, tok, sizeof tok), "copy");
        l_aux_and_logits(&r, &aux[c][1], logits[c][1]);
        if (c == 1) {
            moe_fwd_out out;
            check_ok(r.fx.arch->forward(r.fx.model, r.tokens, 1, T, 0, 0, &out), "forward B = 1");
            assert_int_equal(out.N, T);
            moe_error_clear();
            assert_int_equal(r.fx.arch->forward(r.fx.model, r.tokens, B + 1, T, 0, 0, &out), MOE_ERR_INVALID_ARG);
            assert_non_null(strstr(moe_error_message(), "largest batch"));
        }
        close_run(&r);
    }
    /* no pads: identical; pads: the routing, hence l_aux, differs */
    assert_true(aux[0][0] == aux[1][0]);
    assert_memory_equal(logits[0][0], logits[1][0], sizeof logits[0][0]);
    assert_true(aux[0][1] != aux[1][1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_arch_reference_param_counts),
        cmocka_unit_test(test_arch_expert_placement),
        cmocka_unit_test(test_arch_variant_defaults_and_flops),
        cmocka_unit_test(test_arch_rejects_unsupported),
        cmocka_unit_test(test_arch_relu_variants_build),
        cmocka_unit_test(test_arch_gradients_match_finite_differences),
        cmocka_unit_test(test_arch_gradients_untied_with_dropout),
        cmocka_unit_test(test_arch_gradients_relu),
        cmocka_unit_test(test_arch_gradients_relu_with_dropout),
        cmocka_unit_test(test_arch_relu_default_and_relu_dropout),
        cmocka_unit_test(test_arch_half_precision_tracks_fp32),
        cmocka_unit_test(test_arch_checkpointing_bit_identical),
        cmocka_unit_test(test_arch_expert_grad_scale),
        cmocka_unit_test(test_arch_dropout_depends_on_seed_and_micro),
        cmocka_unit_test(test_arch_pad_mask_and_batch_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
