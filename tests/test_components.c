/* test_components.c: the small components loaded as plugins through a real
 * runtime (cpu backend, single communicator) the way moelm-train loads them:
 * lr schedulers (fixed, inverse_sqrt; FAIRSEQ_SPEC.md §6), normalizers
 * (§2.9), the dummy_lm task (§4), the criteria on a hand-computed example
 * (§3.1), the optimizer plugins (option parsing, state, one step against a
 * double-precision reference) and the single communicator.
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
#include "core/options.h"
#include "core/registry.h"
#include "core/runtime.h"

/* ------------------------------------------------------------ fixtures */

typedef struct env {
    moe_runtime *rt;
    const moe_host *h;
    moe_opts *opts;      /* only for runtimes made by env_world */
    moe_registry *reg;
} env;

#define ARGS(...) (const char *const[]){__VA_ARGS__}, (int)(sizeof((const char *const[]){__VA_ARGS__}) / sizeof(char *))

/* A test runtime (cpu, fp32, single communicator) from argv-style args. */
static void env_open(env *e, const char *const *args, int n)
{
    memset(e, 0, sizeof *e);
    moe_status st = moe_runtime_create_for_test(n, args, &e->rt);
    if (st != MOE_OK)
        fail_msg("runtime: %s", moe_error_message());
    e->h = moe_runtime_host(e->rt);
}

/* A runtime that plans for `world` ranks without joining any (no
 * communicator): what a task sees on one of `world` data-parallel ranks. */
static void env_world(env *e, const char *const *args, int n)
{
    memset(e, 0, sizeof *e);
    char *argv[32];
    assert_true(n < 31);
    argv[0] = (char *)"moelm-test";
    for (int i = 0; i < n; i++)
        argv[i + 1] = (char *)args[i];
    assert_int_equal(moe_opts_create(&e->opts), MOE_OK);
    assert_int_equal(moe_opts_parse(e->opts, n + 1, argv, 0), MOE_OK);
    assert_int_equal(moe_registry_create(NULL, &e->reg), MOE_OK);
    moe_runtime_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.backend = "cpu";
    cfg.device_id = -1;
    cfg.act_dtype = cfg.grad_dtype = MOE_F32;
    cfg.seed = 1;
    cfg.dry_run = 1;
    if (moe_runtime_create(e->opts, e->reg, &cfg, &e->rt) != MOE_OK)
        fail_msg("runtime: %s", moe_error_message());
    assert_int_equal(moe_runtime_set_args(e->rt, n, args), MOE_OK);
    e->h = moe_runtime_host(e->rt);
}

static void env_close(env *e)
{
    moe_runtime_destroy(e->rt);
    if (e->reg)
        moe_registry_destroy(e->reg);
    if (e->opts)
        moe_opts_destroy(e->opts);
    moe_error_clear();
}

static const void *load(env *e, moe_plugin_kind kind, const char *name)
{
    const moe_plugin_desc *d = NULL;
    if (moe_runtime_load_plugin(e->rt, kind, name, &d) != MOE_OK)
        fail_msg("loading %s: %s", name, moe_error_message());
    assert_int_equal(d->kind, kind);
    assert_string_equal(d->name, name);
    return d->ops;
}

static void *dev_alloc(env *e, size_t bytes)
{
    void *p = NULL;
    assert_int_equal(e->h->backend->alloc(e->h->ctx, bytes, "test buffer", &p), MOE_OK);
    return p;
}

static void to_dev(env *e, void *dst, const void *src, size_t bytes)
{
    assert_int_equal(e->h->backend->copy_from_host(e->h->ctx, dst, src, bytes), MOE_OK);
}

static void to_host(env *e, void *dst, const void *src, size_t bytes)
{
    assert_int_equal(e->h->backend->copy_to_host(e->h->ctx, dst, src, bytes), MOE_OK);
}

static void expect_g(double v, const char *want) /* fairseq logs lr with {:g} */
{
    char buf[32];
    snprintf(buf, sizeof buf, "%g", v);
    assert_string_equal(buf, want);
}

static int close_rel(double a, double b, double rel) { return fabs(a - b) <= rel * fabs(b); }

/* ------------------------------------------------------- lr schedulers */

static void test_components_fixed_warmup(void **state)
{
    (void)state;
    env e;
    env_open(&e, ARGS("--lr", "0.0005", "--warmup-updates", "750"));
    const moe_lr_scheduler_ops *ops = load(&e, MOE_KIND_LR_SCHEDULER, "fixed");
    void *s;
    assert_int_equal(ops->init(e.h, &s), MOE_OK);
    /* update 1 runs at the lr set for n = 0: lr/750 */
    assert_true(close_rel(ops->lr_at(s, 0), 5e-4 / 750, 1e-15));
    char buf[32];
    snprintf(buf, sizeof buf, "%.4g", ops->lr_at(s, 0));
    assert_string_equal(buf, "6.667e-07");
    /* the logged lr after updates 10/20/30 of the sample log */
    assert_true(close_rel(ops->lr_at(s, 10), 5e-4 * 11 / 750, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 20), 5e-4 * 21 / 750, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 30), 5e-4 * 31 / 750, 1e-15));
    expect_g(ops->lr_at(s, 10), "7.33333e-06");
    expect_g(ops->lr_at(s, 20), "1.4e-05");
    expect_g(ops->lr_at(s, 30), "2.06667e-05");
    expect_g(ops->lr_at(s, 250), "0.000167333");
    assert_true(ops->lr_at(s, 749) == 5e-4); /* 750/750 */
    assert_true(ops->lr_at(s, 750) == 5e-4);
    assert_true(ops->lr_at(s, 100000) == 5e-4);
    ops->destroy(s);
    env_close(&e);

    /* no warmup: the first value of the --lr list from the start */
    env_open(&e, ARGS("--lr", "0.25,0.1"));
    ops = load(&e, MOE_KIND_LR_SCHEDULER, "fixed");
    assert_int_equal(ops->init(e.h, &s), MOE_OK);
    assert_true(ops->lr_at(s, 0) == 0.25);
    assert_true(ops->lr_at(s, 7) == 0.25);
    ops->destroy(s);
    env_close(&e);
}

static void test_components_fixed_rejects(void **state)
{
    (void)state;
    env e;
    void *s = NULL;
    env_open(&e, ARGS("--lr", "fast"));
    const moe_lr_scheduler_ops *ops = load(&e, MOE_KIND_LR_SCHEDULER, "fixed");
    assert_int_equal(ops->init(e.h, &s), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "--lr"));
    assert_non_null(strstr(moe_error_message(), "fast"));
    env_close(&e);

    env_open(&e, ARGS("--lr", "0.1", "--force-anneal", "2"));
    ops = load(&e, MOE_KIND_LR_SCHEDULER, "fixed");
    assert_int_equal(ops->init(e.h, &s), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_error_message(), "--force-anneal"));
    env_close(&e);
}

static void test_components_inverse_sqrt(void **state)
{
    (void)state;
    env e;
    void *s;
    env_open(&e, ARGS("--lr", "0.001", "--warmup-updates", "4"));
    const moe_lr_scheduler_ops *ops = load(&e, MOE_KIND_LR_SCHEDULER, "inverse_sqrt");
    assert_int_equal(ops->init(e.h, &s), MOE_OK);
    /* warmup from 0 (warmup-init-lr -1 with W > 0), then lr*sqrt(W/n) */
    assert_true(ops->lr_at(s, 0) == 0.0);
    assert_true(close_rel(ops->lr_at(s, 1), 0.00025, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 3), 0.00075, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 4), 0.001, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 16), 0.0005, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 100), 0.0002, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 7), 0.001 * 2.0 / sqrt(7.0), 1e-15));
    ops->destroy(s);
    env_close(&e);

    env_open(&e, ARGS("--lr", "0.001", "--warmup-updates", "10", "--warmup-init-lr", "1e-07"));
    ops = load(&e, MOE_KIND_LR_SCHEDULER, "inverse_sqrt");
    assert_int_equal(ops->init(e.h, &s), MOE_OK);
    assert_true(close_rel(ops->lr_at(s, 0), 1e-7, 1e-15));
    assert_true(close_rel(ops->lr_at(s, 5), 1e-7 + 5 * (0.001 - 1e-7) / 10, 1e-14));
    assert_true(close_rel(ops->lr_at(s, 40), 0.001 * sqrt(10.0 / 40.0), 1e-14));
    ops->destroy(s);
    env_close(&e);

    /* fairseq refuses a list of lrs with inverse_sqrt */
    env_open(&e, ARGS("--lr", "0.001,0.002"));
    ops = load(&e, MOE_KIND_LR_SCHEDULER, "inverse_sqrt");
    assert_int_equal(ops->init(e.h, &s), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "--lr-scheduler=fixed"));
    env_close(&e);
}

/* ---------------------------------------------------------- normalizers */

static void test_components_normalizers(void **state)
{
    (void)state;
    env e;
    env_open(&e, ARGS("--lr", "0.1"));
    const moe_normalizer_ops *ws = load(&e, MOE_KIND_NORMALIZER, "world_size");
    const moe_normalizer_ops *sq = load(&e, MOE_KIND_NORMALIZER, "sqrt_world_size");
    assert_true(ws->divisor(8) == 8.0);
    assert_true(ws->divisor(1) == 1.0);
    assert_true(sq->divisor(8) == sqrt(8.0)); /* 2.8284, the reference command */
    assert_true(sq->divisor(4) == 2.0);
    assert_true(sq->divisor(1) == 1.0);
    env_close(&e);
}

/* ------------------------------------------------------------- dummy_lm */

static void test_components_dummy_lm_batch(void **state)
{
    (void)state;
    env e;
    env_open(&e, ARGS("--tokens-per-sample", "8", "--batch-size", "4", "--dict-size", "996"));
    const moe_task_ops *ops = load(&e, MOE_KIND_TASK, "dummy_lm");
    void *t;
    assert_int_equal(ops->init(e.h, &t), MOE_OK);
    assert_int_equal(ops->vocab_size(t), 1000); /* 4 specials + 996 words */
    assert_int_equal(ops->padding_idx(t), 1);
    assert_int_equal(ops->num_batches(t, "train"), 25000); /* 100000 / 4 on one rank */
    moe_batch b;
    for (int64_t index = 0; index < 2; index++) {
        assert_int_equal(ops->get_batch(t, "train", index * 24999, &b), MOE_OK);
        assert_int_equal(b.B, 4);
        assert_int_equal(b.T, 8);
        assert_int_equal(b.ntokens, 32);
        assert_int_equal(b.nsentences, 4);
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < 8; i++) {
                assert_int_equal(b.src[r * 8 + i], 2 + i); /* </s>, <unk>, word0, ... */
                assert_int_equal(b.tgt[r * 8 + i], 3 + i);
            }
        ops->free_batch(t, &b);
    }
    assert_int_equal(ops->get_batch(t, "train", 25000, &b), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "25000"));
    moe_error_clear();
    assert_int_equal(ops->num_batches(t, "dev"), -1);
    assert_non_null(strstr(moe_error_message(), "'dev'"));
    moe_error_clear();
    assert_int_equal(ops->get_batch(t, "dev", 0, &b), MOE_ERR_INVALID_ARG);
    ops->destroy(t);
    env_close(&e);

    /* defaults: 49996 words -> 50000 types; T = 512 */
    env_open(&e, ARGS("--batch-size", "2"));
    ops = load(&e, MOE_KIND_TASK, "dummy_lm");
    assert_int_equal(ops->init(e.h, &t), MOE_OK);
    assert_int_equal(ops->vocab_size(t), 50000);
    assert_int_equal(ops->get_batch(t, "train", 0, &b), MOE_OK);
    assert_int_equal(b.T, 512);
    assert_int_equal(b.tgt[2 * 512 - 1], 514);
    ops->free_batch(t, &b);
    ops->destroy(t);
    env_close(&e);

    /* padding to a multiple of 8: 4 + 5 words -> 16 */
    env_open(&e, ARGS("--batch-size", "2", "--dict-size", "5", "--tokens-per-sample", "8"));
    ops = load(&e, MOE_KIND_TASK, "dummy_lm");
    assert_int_equal(ops->init(e.h, &t), MOE_OK);
    assert_int_equal(ops->vocab_size(t), 16);
    ops->destroy(t);
    env_close(&e);
}

static void test_components_dummy_lm_sharded(void **state)
{
    (void)state;
    env e;
    env_world(&e, ARGS("--distributed-world-size", "8", "--batch-size", "4", "--batch-size-valid", "1",
                       "--tokens-per-sample", "16"));
    assert_int_equal(e.h->world, 8);
    const moe_task_ops *ops = load(&e, MOE_KIND_TASK, "dummy_lm");
    void *t;
    assert_int_equal(ops->init(e.h, &t), MOE_OK);
    assert_int_equal(ops->num_batches(t, "train"), 3125);  /* the reference: 25000 batches over 8 ranks */
    assert_int_equal(ops->num_batches(t, "valid"), 12500); /* 100000 batches of 1 over 8 ranks */
    moe_batch b;
    assert_int_equal(ops->get_batch(t, "valid", 12499, &b), MOE_OK);
    assert_int_equal(b.B, 4); /* fairseq's dummy batch is the same for every split */
    ops->free_batch(t, &b);
    ops->destroy(t);
    env_close(&e);

    /* uneven: ceil(ceil(1000/3)/8) = ceil(334/8) = 42 */
    env_world(&e, ARGS("--distributed-world-size", "8", "--batch-size", "3", "--dataset-size", "1000",
                       "--tokens-per-sample", "16"));
    ops = load(&e, MOE_KIND_TASK, "dummy_lm");
    assert_int_equal(ops->init(e.h, &t), MOE_OK);
    assert_int_equal(ops->num_batches(t, "train"), 42);
    ops->destroy(t);
    env_close(&e);
}

static void test_components_dummy_lm_batch_size(void **state)
{
    (void)state;
    env e;
    void *t;
    env_open(&e, ARGS("--max-tokens", "20", "--tokens-per-sample", "8"));
    const moe_task_ops *ops = load(&e, MOE_KIND_TASK, "dummy_lm");
    assert_int_equal(ops->init(e.h, &t), MOE_OK);
    moe_batch b;
    assert_int_equal(ops->get_batch(t, "train", 0, &b), MOE_OK);
    assert_int_equal(b.B, 2); /* max_tokens // tokens_per_sample */
    ops->free_batch(t, &b);
    ops->destroy(t);
    env_close(&e);

    env_open(&e, ARGS("--tokens-per-sample", "8"));
    ops = load(&e, MOE_KIND_TASK, "dummy_lm");
    assert_int_equal(ops->init(e.h, &t), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "--batch-size"));
    env_close(&e);
}

/* ------------------------------------------------------------- criteria */

/* Three tokens, V = 3: rows [1,2,3] -> target 2, [0,0,0] -> target 0, and a
 * pad target (1) that must not count. Two MoE layers with l_aux 0.5, 1.5. */
#define CE_N 3
#define CE_V 3
static const float ce_logits[CE_N * CE_V] = {1, 2, 3, 0, 0, 0, 5, -1, 2};
static const int32_t ce_targets[CE_N] = {2, 0, 1};

static double ce_row_nll(int r)
{
    const float *x = ce_logits + r * CE_V;
    double z = 0;
    for (int j = 0; j < CE_V; j++)
        z += exp(x[j]);
    return log(z) - x[ce_targets[r]];
}

typedef struct crit_run {
    float stats[MOE_STAT_COUNT];
    float dlogits[CE_N * CE_V];
    float dl_aux;
} crit_run;

static moe_status run_criterion(env *e, const moe_criterion_ops *ops, float grad_scale, int layers, crit_run *out)
{
    float *logits = dev_alloc(e, sizeof ce_logits);
    int32_t *targets = dev_alloc(e, sizeof ce_targets);
    float *laux = dev_alloc(e, 2 * sizeof(float));
    float *metrics = dev_alloc(e, 2 * MOE_NUM_METRICS * sizeof(float));
    float *stats = dev_alloc(e, MOE_STAT_COUNT * sizeof(float));
    float *scratch = dev_alloc(e, CE_N * sizeof(float));
    float laux_h[2] = {0.5f, 1.5f}, metrics_h[2 * MOE_NUM_METRICS];
    for (int k = 0; k < MOE_NUM_METRICS; k++) {
        metrics_h[k] = (float)k;                        /* layer 0 */
        metrics_h[MOE_NUM_METRICS + k] = 10.0f + 2 * k; /* layer 1 */
    }
    to_dev(e, logits, ce_logits, sizeof ce_logits);
    to_dev(e, targets, ce_targets, sizeof ce_targets);
    to_dev(e, laux, laux_h, sizeof laux_h);
    to_dev(e, metrics, metrics_h, sizeof metrics_h);
    assert_int_equal(e->h->ops->fill(e->h->ctx, stats, MOE_F32, MOE_STAT_COUNT, 0.0f), MOE_OK);

    void *crit;
    moe_status st = ops->init(e->h, &crit);
    if (st == MOE_OK) {
        moe_fwd_out f;
        memset(&f, 0, sizeof f);
        f.logits = logits;
        f.N = CE_N;
        f.V = CE_V;
        f.n_moe_layers = layers;
        f.l_aux = laux;
        f.metrics = metrics;
        moe_crit_in in;
        memset(&in, 0, sizeof in);
        in.fwd = &f;
        in.targets = targets;
        in.sample_size = 2; /* non-pad targets */
        in.grad_scale = grad_scale;
        in.stats = stats;
        in.scratch = scratch;
        out->dl_aux = -1.0f;
        st = ops->compute(crit, &in, &out->dl_aux);
        ops->destroy(crit);
        to_host(e, out->stats, stats, sizeof out->stats);
        to_host(e, out->dlogits, logits, sizeof out->dlogits);
    }
    void *bufs[] = {logits, targets, laux, metrics, stats, scratch};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        e->h->backend->free(e->h->ctx, bufs[i]);
    return st;
}

static void test_components_cross_entropy(void **state)
{
    (void)state;
    env e;
    env_open(&e, ARGS("--lr", "0.1"));
    const moe_criterion_ops *ops = load(&e, MOE_KIND_CRITERION, "cross_entropy");
    crit_run r;
    assert_int_equal(run_criterion(&e, ops, 8.0f, 2, &r), MOE_OK);
    double nll = ce_row_nll(0) + ce_row_nll(1); /* log(1+e^-1+e^-2) + log 3 = 1.5062 */
    assert_true(fabs(nll - 1.5062182) < 1e-6);
    assert_true(close_rel(r.stats[MOE_STAT_LOSS], nll, 1e-6));
    assert_true(r.stats[MOE_STAT_MOE_LOSS] == 0.0f); /* gate losses ignored */
    assert_true(r.dl_aux == 0.0f);
    /* dlogits = 8 * (softmax - onehot); the pad row is zero */
    double z = exp(1) + exp(2) + exp(3);
    assert_true(fabs(r.dlogits[2] - 8.0 * (exp(3) / z - 1.0)) < 1e-5);
    assert_true(fabs(r.dlogits[3] - 8.0 * (1.0 / 3.0 - 1.0)) < 1e-5);
    for (int j = 0; j < CE_V; j++)
        assert_true(r.dlogits[2 * CE_V + j] == 0.0f);
    env_close(&e);
}

static void test_components_moe_cross_entropy(void **state)
{
    (void)state;
    const double nll = ce_row_nll(0) + ce_row_nll(1);
    crit_run r;
    env e;

    /* average over layers (the default method): G = (0.5 + 1.5)/2 = 1 */
    env_open(&e, ARGS("--moe-gate-loss-wt", "0.01"));
    const moe_criterion_ops *ops = load(&e, MOE_KIND_CRITERION, "moe_cross_entropy");
    assert_int_equal(run_criterion(&e, ops, 128.0f, 2, &r), MOE_OK);
    assert_true(close_rel(r.stats[MOE_STAT_INNER_LOSS], nll, 1e-6));
    assert_true(close_rel(r.stats[MOE_STAT_MOE_LOSS], 2.0 * 1.0, 1e-6));        /* sample_size * G */
    assert_true(close_rel(r.stats[MOE_STAT_LOSS], nll + 0.01 * 2.0 * 1.0, 1e-6)); /* inner + w * ss * G */
    assert_true(close_rel(r.dl_aux, 0.01 * 2.0 * 0.5 * 128.0, 1e-6));            /* w * ss / layers * scale */
    for (int k = 0; k < MOE_NUM_METRICS; k++) /* each metric averaged over the layers */
        assert_true(close_rel(r.stats[MOE_STAT_METRICS + k], (k + 10.0 + 2 * k) / 2.0, 1e-6));
    double z = exp(1) + exp(2) + exp(3);
    assert_true(fabs(r.dlogits[0] - 128.0 * exp(1) / z) < 1e-4);

    /* validation: no gradient, logits untouched, dl_aux 0 */
    assert_int_equal(run_criterion(&e, ops, 0.0f, 2, &r), MOE_OK);
    assert_true(r.dl_aux == 0.0f);
    assert_true(r.dlogits[0] == 1.0f && r.dlogits[8] == 2.0f);
    assert_true(close_rel(r.stats[MOE_STAT_LOSS], nll + 0.02, 1e-6));

    /* a dense model: no gate loss, no metrics */
    assert_int_equal(run_criterion(&e, ops, 1.0f, 0, &r), MOE_OK);
    assert_true(close_rel(r.stats[MOE_STAT_LOSS], nll, 1e-6));
    assert_true(r.stats[MOE_STAT_MOE_LOSS] == 0.0f && r.dl_aux == 0.0f);
    env_close(&e);

    /* sum over layers: G = 2 */
    env_open(&e, ARGS("--moe-gate-loss-wt", "0.01", "--moe-gate-loss-combine-method", "sum"));
    ops = load(&e, MOE_KIND_CRITERION, "moe_cross_entropy");
    assert_int_equal(run_criterion(&e, ops, 128.0f, 2, &r), MOE_OK);
    assert_true(close_rel(r.stats[MOE_STAT_MOE_LOSS], 2.0 * 2.0, 1e-6));
    assert_true(close_rel(r.stats[MOE_STAT_LOSS], nll + 0.01 * 2.0 * 2.0, 1e-6));
    assert_true(close_rel(r.dl_aux, 0.01 * 2.0 * 128.0, 1e-6));
    assert_true(close_rel(r.stats[MOE_STAT_METRICS + 3], (3.0 + 16.0) / 2.0, 1e-6)); /* still averaged */
    env_close(&e);

    /* the default weight is 1.0 */
    env_open(&e, ARGS("--lr", "0.1"));
    ops = load(&e, MOE_KIND_CRITERION, "moe_cross_entropy");
    assert_int_equal(run_criterion(&e, ops, 1.0f, 2, &r), MOE_OK);
    assert_true(close_rel(r.stats[MOE_STAT_LOSS], nll + 2.0, 1e-6));
    assert_true(close_rel(r.dl_aux, 1.0, 1e-6));
    env_close(&e);

    env_open(&e, ARGS("--moe-gate-loss-transform", "neg_log"));
    ops = load(&e, MOE_KIND_CRITERION, "moe_cross_entropy");
    assert_int_equal(run_criterion(&e, ops, 1.0f, 2, &r), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_error_message(), "neg_log"));
    env_close(&e);
}

/* ----------------------------------------------------------- optimizers */

typedef struct opt_bufs {
    float *param, *grad;
    int64_t n;
} opt_bufs;

static void opt_bufs_make(env *e, opt_bufs *b, const float *p, const float *g, int64_t n)
{
    b->n = n;
    b->param = dev_alloc(e, (size_t)n * 4);
    b->grad = dev_alloc(e, (size_t)n * 4);
    to_dev(e, b->param, p, (size_t)n * 4);
    to_dev(e, b->grad, g, (size_t)n * 4);
}

static void opt_bufs_free(env *e, opt_bufs *b)
{
    e->h->backend->free(e->h->ctx, b->param);
    e->h->backend->free(e->h->ctx, b->grad);
}

/* Two Adam steps through the plugin, with betas (0.9, 0.98), eps 0.1 (large,
 * so that beta2 shows at step 1) and decay 0.01, against a double reference.
 * Gradients are stored times 2 and unscaled with grad_scale 2. */
static void run_adam_plugin(int fp16_stats)
{
    env e;
    if (fp16_stats)
        env_open(&e, ARGS("--adam-betas", "(0.9, 0.98)", "--adam-eps", "0.1", "--weight-decay", "0.01",
                          "--fp16-adam-stats"));
    else
        env_open(&e, ARGS("--adam-betas", "(0.9, 0.98)", "--adam-eps", "0.1", "--weight-decay", "0.01"));
    const moe_optimizer_ops *ops = load(&e, MOE_KIND_OPTIMIZER, "adam");
    assert_true(ops->state_bytes_per_param(e.h) == (fp16_stats ? 4.0 : 8.0));
    enum { n = 5 };
    const float p[n] = {0.5f, -0.25f, 1.0f, 0.75f, -1.0f};
    const float g[2][n] = {{0.6f, -4.0f, 0.02f, 0.0f, 2.0f}, {0.2f, 2.0f, -1.0f, 0.4f, 2.0f}};
    opt_bufs b0, b1;
    opt_bufs_make(&e, &b0, p, g[0], n);
    opt_bufs_make(&e, &b1, p, g[0], 3); /* a second tensor: its own moments and scales */
    moe_opt_tensor ts[2] = {{b0.param, MOE_F32, NULL, MOE_F32, b0.grad, MOE_F32, n},
                            {b1.param, MOE_F32, NULL, MOE_F32, b1.grad, MOE_F32, 3}};
    void *opt;
    assert_int_equal(ops->init(e.h, ts, 2, &opt), MOE_OK);
    double rp[n], rm[n] = {0}, rv[n] = {0};
    for (int i = 0; i < n; i++)
        rp[i] = p[i];
    const double b1f = 0.9f, b2f = 0.98f, eps = 0.1f, wd = 0.01f, lr = 0.01f;
    for (int t = 1; t <= 2; t++) {
        to_dev(&e, b0.grad, g[t - 1], sizeof g[t - 1]);
        assert_int_equal(ops->step(opt, lr, 2.0, t), MOE_OK);
        double ss = lr * sqrt(1 - pow(b2f, t)) / (1 - pow(b1f, t));
        for (int i = 0; i < n; i++) {
            double gi = g[t - 1][i] / 2.0;
            rm[i] = b1f * rm[i] + (1 - b1f) * gi;
            rv[i] = b2f * rv[i] + (1 - b2f) * gi * gi;
            rp[i] -= ss * (rm[i] / (sqrt(rv[i]) + eps) + wd * rp[i]);
        }
        float got[n];
        to_host(&e, got, b0.param, sizeof got);
        for (int i = 0; i < n; i++) /* fp16 moments: one fp16 rounding of m and v per step */
            assert_true(fabs(got[i] - rp[i]) <= (fp16_stats ? 2e-3 : 1e-5) * lr + 2e-7);
    }
    /* the second tensor took the same two steps with its first three grads */
    float q[3];
    to_host(&e, q, b1.param, sizeof q);
    for (int i = 0; i < 3; i++)
        assert_true(q[i] != p[i]);
    ops->destroy(opt);
    opt_bufs_free(&e, &b0);
    opt_bufs_free(&e, &b1);
    env_close(&e);
}

static void test_components_adam_step(void **state)
{
    (void)state;
    run_adam_plugin(0);
}

static void test_components_adam_fp16_stats_step(void **state)
{
    (void)state;
    run_adam_plugin(1);
}

static void test_components_adam_rejects_betas(void **state)
{
    (void)state;
    /* refused as the plugin's options are read, before any work */
    const char *bad[] = {"(0.9)", "(0.9, 1.5)", "0.9; 0.98", "(0.9, 0.98, 0.5)", "inf", "(0.9,", "(nan, 0.9)",
                         "(1, 0.9)"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        env e;
        env_open(&e, ARGS("--adam-betas", bad[i]));
        const moe_plugin_desc *d = NULL;
        assert_int_equal(moe_runtime_load_plugin(e.rt, MOE_KIND_OPTIMIZER, "adam", &d), MOE_ERR_INVALID_ARG);
        if (!strstr(moe_error_message(), "--adam-betas"))
            fail_msg("'%s': %s", bad[i], moe_error_message());
        env_close(&e);
    }
    /* the accepted spellings */
    const char *good[] = {"(0.9, 0.98)", "[0.9,0.98]", "0.9, 0.98", "(0.9, 0.98,)"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        env e;
        env_open(&e, ARGS("--adam-betas", good[i]));
        const moe_optimizer_ops *ops = load(&e, MOE_KIND_OPTIMIZER, "adam");
        void *opt = NULL;
        assert_int_equal(ops->init(e.h, NULL, 0, &opt), MOE_OK);
        ops->destroy(opt);
        env_close(&e);
    }
}

static void test_components_sgd_step(void **state)
{
    (void)state;
    env e;
    env_open(&e, ARGS("--momentum", "0.9", "--weight-decay", "0.1"));
    const moe_optimizer_ops *ops = load(&e, MOE_KIND_OPTIMIZER, "sgd");
    assert_true(ops->state_bytes_per_param(e.h) == 4.0);
    float p[3] = {1.0f, -2.0f, 0.5f}, g[3] = {0.5f, 0.25f, -1.0f};
    opt_bufs b;
    opt_bufs_make(&e, &b, p, g, 3);
    moe_opt_tensor ts = {b.param, MOE_F32, NULL, MOE_F32, b.grad, MOE_F32, 3};
    void *opt;
    assert_int_equal(ops->init(e.h, &ts, 1, &opt), MOE_OK);
    double rp[3] = {p[0], p[1], p[2]}, rb[3] = {0, 0, 0};
    for (int t = 0; t < 2; t++) {
        assert_int_equal(ops->step(opt, 0.1, 1.0, t + 1), MOE_OK);
        for (int i = 0; i < 3; i++) { /* d = g + wd p; b = mu b + d; p -= lr b */
            double d = g[i] + (double)0.1f * rp[i];
            rb[i] = (double)0.9f * rb[i] + d;
            rp[i] -= (double)0.1f * rb[i];
        }
    }
    float got[3];
    to_host(&e, got, b.param, sizeof got);
    for (int i = 0; i < 3; i++)
        assert_true(fabs(got[i] - rp[i]) <= 1e-6);
    ops->destroy(opt);
    opt_bufs_free(&e, &b);
    env_close(&e);

    env_open(&e, ARGS("--lr", "0.1"));
    ops = load(&e, MOE_KIND_OPTIMIZER, "sgd");
    assert_true(ops->state_bytes_per_param(e.h) == 0.0); /* no momentum, no state */
    env_close(&e);
}

/* -------------------------------------------------------- communicator */

static void test_components_single_communicator(void **state)
{
    (void)state;
    env e;
    env_open(&e, ARGS("--lr", "0.1"));
    const moe_comm_ops *c = e.h->comm_ops;
    assert_non_null(c);
    assert_int_equal(c->rank(e.h->comm), 0);
    assert_int_equal(c->world(e.h->comm), 1);
    assert_int_equal(e.h->world, 1);

    moe_group *g = NULL;
    int r0 = 0, r1 = 1, r00[2] = {0, 0};
    assert_int_equal(c->group_create(e.h->comm, &r0, 1, &g), MOE_OK);
    assert_non_null(g);
    moe_group *bad = NULL;
    assert_int_equal(c->group_create(e.h->comm, &r1, 1, &bad), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "rank 1"));
    moe_error_clear();
    assert_int_equal(c->group_create(e.h->comm, r00, 2, &bad), MOE_ERR_INVALID_ARG);
    moe_error_clear();

    float src[6] = {1, 2, 3, 4, 5, 6}, out[6];
    float *a = dev_alloc(&e, sizeof src), *b = dev_alloc(&e, sizeof src);
    to_dev(&e, a, src, sizeof src);
    assert_int_equal(e.h->ops->fill(e.h->ctx, b, MOE_F32, 6, 0.0f), MOE_OK);
    assert_int_equal(c->all_reduce(e.h->comm, NULL, a, 6, MOE_F32, MOE_REDUCE_SUM), MOE_OK);
    assert_int_equal(c->all_reduce(e.h->comm, g, a, 6, MOE_F32, MOE_REDUCE_MAX), MOE_OK);
    to_host(&e, out, a, sizeof out);
    assert_memory_equal(out, src, sizeof src);
    assert_int_equal(c->all_gather(e.h->comm, g, b, a, 6, MOE_F32), MOE_OK);
    to_host(&e, out, b, sizeof out);
    assert_memory_equal(out, src, sizeof src);
    /* fp16 elements: 4 halves = 8 bytes = the first two floats */
    assert_int_equal(e.h->ops->fill(e.h->ctx, b, MOE_F32, 6, 0.0f), MOE_OK);
    assert_int_equal(c->all_to_all(e.h->comm, NULL, b, a, 4, MOE_F16), MOE_OK);
    to_host(&e, out, b, sizeof out);
    assert_true(out[0] == 1 && out[1] == 2 && out[2] == 0);
    assert_int_equal(c->reduce_scatter(e.h->comm, NULL, b, a, 6, MOE_F32, MOE_REDUCE_SUM), MOE_OK);
    to_host(&e, out, b, sizeof out);
    assert_memory_equal(out, src, sizeof src);
    /* all_to_allv honours displacements: 2 elements from a+3 to b+1 */
    assert_int_equal(e.h->ops->fill(e.h->ctx, b, MOE_F32, 6, 0.0f), MOE_OK);
    int64_t cnt = 2, sd = 3, rd = 1, cnt_bad = 3;
    assert_int_equal(c->all_to_allv(e.h->comm, NULL, b, &cnt, &rd, a, &cnt, &sd, MOE_F32), MOE_OK);
    to_host(&e, out, b, sizeof out);
    assert_true(out[0] == 0 && out[1] == 4 && out[2] == 5 && out[3] == 0);
    assert_int_equal(c->all_to_allv(e.h->comm, NULL, b, &cnt_bad, &rd, a, &cnt, &sd, MOE_F32), MOE_ERR_INVALID_ARG);
    moe_error_clear();
    assert_int_equal(c->broadcast(e.h->comm, NULL, a, 6, MOE_F32, 0), MOE_OK);
    assert_int_equal(c->broadcast(e.h->comm, NULL, a, 6, MOE_F32, 1), MOE_ERR_INVALID_ARG);
    moe_error_clear();
    assert_int_equal(c->barrier(e.h->comm, g), MOE_OK);
    e.h->backend->free(e.h->ctx, a);
    e.h->backend->free(e.h->ctx, b);
    env_close(&e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_components_fixed_warmup),
        cmocka_unit_test(test_components_fixed_rejects),
        cmocka_unit_test(test_components_inverse_sqrt),
        cmocka_unit_test(test_components_normalizers),
        cmocka_unit_test(test_components_dummy_lm_batch),
        cmocka_unit_test(test_components_dummy_lm_sharded),
        cmocka_unit_test(test_components_dummy_lm_batch_size),
        cmocka_unit_test(test_components_cross_entropy),
        cmocka_unit_test(test_components_moe_cross_entropy),
        cmocka_unit_test(test_components_adam_step),
        cmocka_unit_test(test_components_adam_fp16_stats_step),
        cmocka_unit_test(test_components_adam_rejects_betas),
        cmocka_unit_test(test_components_sgd_step),
        cmocka_unit_test(test_components_single_communicator),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
