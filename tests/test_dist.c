/* test_dist.c: multi-rank training on the CPU backend through the MPI
 * communicator (mpirun --oversubscribe), against the one-rank run with the
 * same global batch (update-freq scaled), dropout 0 (FAIRSEQ_SPEC.md §2.4,
 * §2.9, §7). Skips, saying so, when mpirun is not installed. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <cmocka.h>

#include "runcmd.h"

/* the model and run without a gate's flags */
#define TINY_ANY_GATE                                                                                            \
    "--cpu --task dummy_lm --tokens-per-sample 32 --dict-size 96 "                                               \
    "--arch transformer_lm_gpt --share-decoder-input-output-embed "                                              \
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "          \
    "--moe-freq 2 "                                                                                              \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "                 \
    "--optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.002 --warmup-updates 2 "                                 \
    "--dropout 0 --attention-dropout 0 --batch-size 2 "                                                          \
    "--log-format json --log-interval 1 --max-update 6 --no-save "
#define TINY_MODEL TINY_ANY_GATE "--moe-second-expert-policy all "
#define TINY TINY_MODEL "--disable-validation "

#define NUPD 6

static int have_mpirun;

static int run_ranks_on(int ranks, const char *base, const char *extra, moe_cmd_result *r)
{
    char args[2048];
    if (ranks == 1) {
        snprintf(args, sizeof args, "%s%s", base, extra);
        return moe_run_train(args, r);
    }
    snprintf(args, sizeof args, "mpirun --oversubscribe -np %d %s/moelm-train %s%s", ranks, MOE_TEST_BIN_DIR, base,
             extra);
    return moe_run_shell(args, r);
}

static int run_ranks(int ranks, const char *extra, moe_cmd_result *r) { return run_ranks_on(ranks, TINY, extra, r); }

/* every "key": "value" of the lines tagged `tag` ("| train_inner | "), in order */
static int tagged_values(const char *out, const char *tag, const char *key, double *v, int max)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": \"", key);
    int n = 0;
    for (const char *p = strstr(out, tag); p && n < max; p = strstr(p + 1, tag)) {
        const char *eol = strchr(p, '\n');
        const char *q = strstr(p, pat);
        if (q && (!eol || q < eol))
            v[n++] = atof(q + strlen(pat));
    }
    return n;
}

static int values(const char *out, const char *key, double *v, int max)
{
    return tagged_values(out, "| train_inner | ", key, v, max);
}

/* the gnorm logged at update 1 of a run on `ranks` ranks */
static double first_gnorm(int ranks, const char *extra)
{
    moe_cmd_result r;
    assert_int_equal(run_ranks(ranks, extra, &r), 0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    double v[NUPD];
    assert_int_equal(values(r.out, "gnorm", v, NUPD), NUPD);
    moe_cmd_result_free(&r);
    return v[0];
}

/* one rank against `ranks` on the model `base` */
static void expect_same_losses_on(int ranks, const char *base, const char *one_rank_extra, const char *n_rank_extra)
{
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    moe_cmd_result a, b;
    assert_int_equal(run_ranks_on(1, base, one_rank_extra, &a), 0);
    if (a.status != 0)
        fprintf(stderr, "%s\n%s\n", a.out, a.err);
    assert_int_equal(a.status, 0);
    assert_int_equal(run_ranks_on(ranks, base, n_rank_extra, &b), 0);
    if (b.status != 0)
        fprintf(stderr, "%s\n%s\n", b.out, b.err);
    assert_int_equal(b.status, 0);
    double la[NUPD], lb[NUPD];
    assert_int_equal(values(a.out, "loss", la, NUPD), NUPD);
    assert_int_equal(values(b.out, "loss", lb, NUPD), NUPD);
    for (int i = 0; i < NUPD; i++) {
        /* logged with 3 decimals; fp32 reduction order moves the 4th at most */
        if (fabs(la[i] - lb[i]) > 0.0025)
            fail_msg("update %d: 1 rank loss %.3f, %d ranks %.3f", i + 1, la[i], ranks, lb[i]);
    }
    /* only rank 0 logs at INFO */
    assert_int_equal(moe_count_lines(b.out, "| train_inner | "), NUPD);
    moe_cmd_result_free(&a);
    moe_cmd_result_free(&b);
}

static void expect_same_losses(int ranks, const char *one_rank_extra, const char *n_rank_extra)
{
    expect_same_losses_on(ranks, TINY, one_rank_extra, n_rank_extra);
}

static void test_dist_data_parallel_2(void **s)
{
    (void)s;
    expect_same_losses(2, "--moe-expert-count 2 --update-freq 2", "--moe-expert-count 2 --update-freq 1");
}

static void test_dist_experts_4_over_2(void **s)
{
    (void)s;
    expect_same_losses(2, "--moe-expert-count 4 --update-freq 2 --moe-normalize-expert-grad world_size",
                       "--moe-expert-count 4 --update-freq 1 --moe-normalize-expert-grad world_size");
}

/* the general top-k router with everything it does across ranks: k = 4 of
 * 8 experts (4 per rank), sigmoid scores, z-loss, the per-sequence loss,
 * groups, and the expert bias whose loads are summed over the ranks; the
 * z-loss and the per-expert loads (--log-expert-load, summed over ranks)
 * match the one-rank run too */
#define TOPK_FLAGS                                                                                               \
    "--moe-expert-count 8 --moe-gate topk --moe-router-topk 4 --moe-router-score-function sigmoid "             \
    "--moe-z-loss-coeff 0.001 --moe-aux-loss-type seq --moe-router-num-groups 4 --moe-router-group-topk 2 "      \
    "--moe-router-enable-expert-bias --moe-router-bias-update-rate 0.01 --moe-normalize-expert-grad world_size " \
    "--log-expert-load --disable-validation "

/* the run of `ranks` ranks (experts 8 / ranks each) against one rank
 * accumulating the same micro-batches */
static void topk_over(int ranks)
{
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    char one[64];
    snprintf(one, sizeof one, "--update-freq %d", ranks);
    char flags[sizeof TOPK_FLAGS + 64];
    snprintf(flags, sizeof flags, "%s%s", TOPK_FLAGS, one);
    moe_cmd_result a, b;
    assert_int_equal(run_ranks_on(1, TINY_ANY_GATE, flags, &a), 0);
    assert_int_equal(run_ranks_on(ranks, TINY_ANY_GATE, TOPK_FLAGS "--update-freq 1", &b), 0);
    if (a.status != 0 || b.status != 0)
        fprintf(stderr, "%s\n%s\n%s\n%s\n", a.out, a.err, b.out, b.err);
    assert_int_equal(a.status, 0);
    assert_int_equal(b.status, 0);
    double la[NUPD], lb[NUPD], za[NUPD], zb[NUPD];
    assert_int_equal(values(a.out, "loss", la, NUPD), NUPD);
    assert_int_equal(values(b.out, "loss", lb, NUPD), NUPD);
    assert_int_equal(values(a.out, "z_loss", za, NUPD), NUPD);
    assert_int_equal(values(b.out, "z_loss", zb, NUPD), NUPD);
    for (int i = 0; i < NUPD; i++) {
        if (fabs(la[i] - lb[i]) > 0.0025)
            fail_msg("update %d: 1 rank loss %.3f, %d ranks %.3f", i + 1, la[i], ranks, lb[i]);
        if (!(za[i] > 0.0) || fabs(za[i] - zb[i]) > 1e-6 + 1e-4 * za[i])
            fail_msg("update %d: 1 rank z_loss %.8f, %d ranks %.8f", i + 1, za[i], ranks, zb[i]);
    }
    /* one expert_load line per logged update, on rank 0 only, the same counts */
    assert_int_equal(moe_count_lines(a.out, "| expert_load | "), NUPD);
    assert_int_equal(moe_count_lines(b.out, "| expert_load | "), NUPD);
    for (const char *p = strstr(a.out, "| expert_load | "), *q = strstr(b.out, "| expert_load | "); p && q;
         p = strstr(p + 1, "| expert_load | "), q = strstr(q + 1, "| expert_load | ")) {
        size_t n = strcspn(p, "\n");
        if (n != strcspn(q, "\n") || strncmp(p, q, n) != 0)
            fail_msg("expert loads differ: 1 rank '%.*s', %d ranks '%.*s'", (int)n, p, ranks, (int)strcspn(q, "\n"),
                     q);
    }
    moe_cmd_result_free(&a);
    moe_cmd_result_free(&b);
}

static void test_dist_topk_experts_8_over_2(void **s)
{
    (void)s;
    topk_over(2);
}

static void test_dist_topk_experts_8_over_4(void **s)
{
    (void)s;
    topk_over(4);
}

static void test_dist_experts_4_over_4(void **s)
{
    (void)s;
    expect_same_losses(4, "--moe-expert-count 4 --update-freq 4 --moe-normalize-expert-grad world_size",
                       "--moe-expert-count 4 --update-freq 1 --moe-normalize-expert-grad world_size");
}

static void test_dist_replicated_experts_2_over_4(void **s)
{
    (void)s;
    expect_same_losses(4, "--moe-expert-count 2 --update-freq 4 --moe-normalize-expert-grad world_size",
                       "--moe-expert-count 2 --update-freq 1 --moe-normalize-expert-grad world_size "
                       "--ddp-backend fully_sharded");
}

static void test_dist_fully_sharded_2(void **s)
{
    (void)s;
    expect_same_losses(2, "--moe-expert-count 2 --update-freq 2",
                       "--moe-expert-count 2 --update-freq 1 --ddp-backend fully_sharded");
}

/* expert choice routes each micro-batch on its own, so 2 ranks of 2
 * experts each route as one rank does micro-batch by micro-batch */
static void test_dist_expert_choice_4_over_2(void **s)
{
    (void)s;
    expect_same_losses_on(2, TINY_ANY_GATE "--disable-validation ",
                          "--moe-expert-count 4 --moe-gate expert_choice --update-freq 2 "
                          "--moe-normalize-expert-grad world_size",
                          "--moe-expert-count 4 --moe-gate expert_choice --update-freq 1 "
                          "--moe-normalize-expert-grad world_size");
}

static void test_dist_expert_choice_8_over_4(void **s)
{
    (void)s;
    expect_same_losses_on(4, TINY_ANY_GATE "--disable-validation ",
                          "--moe-expert-count 8 --moe-gate expert_choice --update-freq 4 "
                          "--moe-normalize-expert-grad world_size",
                          "--moe-expert-count 8 --moe-gate expert_choice --update-freq 1 "
                          "--moe-normalize-expert-grad world_size");
}

/* --moe-dropless with experts over ranks: each rank's experts multiply
 * only the filled rows of every rank's chunk, counted by expert_rows and
 * exchanged by an all-to-all (the grouped products, here the cpu's); one
 * rank counts on the host. The same losses either way. */
static void dropless_over(int ranks)
{
    char one[256], many[256];
    snprintf(one, sizeof one, "--moe-expert-count 8 --moe-dropless --update-freq %d "
             "--moe-normalize-expert-grad world_size", ranks);
    snprintf(many, sizeof many, "--moe-expert-count 8 --moe-dropless --update-freq 1 "
             "--moe-normalize-expert-grad world_size");
    expect_same_losses(ranks, one, many);
}

static void test_dist_dropless_experts_8_over_2(void **s)
{
    (void)s;
    dropless_over(2);
}

static void test_dist_dropless_experts_8_over_4(void **s)
{
    (void)s;
    dropless_over(4);
}

/* a shared expert is a non-expert part of its layer: sharded with it */
static void test_dist_shared_expert_fully_sharded_2(void **s)
{
    (void)s;
    expect_same_losses(2, "--moe-expert-count 4 --moe-expert-ffn-dim 16 --moe-shared-expert-ffn-dim 24 "
                          "--update-freq 2 --moe-normalize-expert-grad world_size",
                       "--moe-expert-count 4 --moe-expert-ffn-dim 16 --moe-shared-expert-ffn-dim 24 "
                       "--update-freq 1 --moe-normalize-expert-grad world_size --ddp-backend fully_sharded");
}

/* ZeRO-3 against plain data parallel on the same 2 ranks: layers gathered
 * again for their recomputation (--checkpoint-activations), and validation
 * forwards that gather and free the root unit between updates */
static void test_dist_fully_sharded_checkpoint_validation(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    const char *common = "--moe-expert-count 2 --validate-interval-updates 3 --max-valid-steps 2 ";
    char ddp[512], fsdp[512];
    snprintf(ddp, sizeof ddp, "%s--ddp-backend pytorch_ddp", common);
    snprintf(fsdp, sizeof fsdp, "%s--ddp-backend fully_sharded --checkpoint-activations", common);
    moe_cmd_result a, b;
    assert_int_equal(run_ranks_on(2, TINY_MODEL, ddp, &a), 0);
    assert_int_equal(run_ranks_on(2, TINY_MODEL, fsdp, &b), 0);
    if (a.status != 0 || b.status != 0)
        fprintf(stderr, "%s\n%s\n%s\n%s\n", a.out, a.err, b.out, b.err);
    assert_int_equal(a.status, 0);
    assert_int_equal(b.status, 0);
    double la[NUPD], lb[NUPD];
    assert_int_equal(values(a.out, "loss", la, NUPD), NUPD);
    assert_int_equal(values(b.out, "loss", lb, NUPD), NUPD);
    for (int i = 0; i < NUPD; i++)
        if (fabs(la[i] - lb[i]) > 0.0025)
            fail_msg("update %d: pytorch_ddp loss %.3f, fully_sharded %.3f", i + 1, la[i], lb[i]);
    double va[4], vb[4];
    int n = tagged_values(a.out, "| valid | ", "valid_loss", va, 4);
    assert_true(n >= 2);
    assert_int_equal(tagged_values(b.out, "| valid | ", "valid_loss", vb, 4), n);
    for (int i = 0; i < n; i++)
        if (fabs(va[i] - vb[i]) > 0.0025)
            fail_msg("validation %d: pytorch_ddp loss %.3f, fully_sharded %.3f", i + 1, va[i], vb[i]);
    moe_cmd_result_free(&a);
    moe_cmd_result_free(&b);
}

/* §2.9: legacy_ddp divides expert gradients by the world size and does not
 * consult --moe-normalize-expert-grad: sqrt_world_size logs the gnorm of
 * world_size there, and a different one with pytorch_ddp */
static void test_dist_legacy_ddp_ignores_normalizer(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    static const char *const extra[3] = {
        "--moe-expert-count 4 --ddp-backend legacy_ddp --moe-normalize-expert-grad world_size",
        "--moe-expert-count 4 --ddp-backend legacy_ddp --moe-normalize-expert-grad sqrt_world_size",
        "--moe-expert-count 4 --ddp-backend pytorch_ddp --moe-normalize-expert-grad sqrt_world_size"};
    double g[3];
    for (int k = 0; k < 3; k++) {
        g[k] = first_gnorm(4, extra[k]);
    }
    if (g[0] != g[1] || fabs(g[2] - g[1]) < 1e-3)
        fail_msg("gnorm at update 1: legacy_ddp world_size %.3f, legacy_ddp sqrt_world_size %.3f, pytorch_ddp "
                 "sqrt_world_size %.3f",
                 g[0], g[1], g[2]);
}

/* §2.5: the forward all-to-alls are timed only when asked */
static void test_dist_a2a_perf_stats(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    moe_cmd_result r;
    assert_int_equal(run_ranks(2, "--moe-expert-count 2 --record-a2a-perf-stats", &r), 0);
    assert_int_equal(r.status, 0);
    double v[NUPD];
    assert_int_equal(values(r.out, "all_to_all_cpu_time_ms", v, NUPD), NUPD);
    assert_true(v[0] > 0);
    assert_int_equal(values(r.out, "all_to_all_cuda_time_ms", v, NUPD), NUPD);
    assert_true(v[0] > 0);
    moe_cmd_result_free(&r);
    assert_int_equal(run_ranks(2, "--moe-expert-count 2", &r), 0);
    assert_int_equal(r.status, 0);
    assert_int_equal(moe_count_lines(r.out, "\"all_to_all_cpu_time_ms\": \"0\""), NUPD);
    moe_cmd_result_free(&r);
}

/* fp32 master weights sharded with the optimizer state */
static void test_dist_fully_sharded_fp16_master_4(void **s)
{
    (void)s;
    expect_same_losses(4, "--moe-expert-count 4 --update-freq 4 --fp16",
                       "--moe-expert-count 4 --update-freq 1 --fp16 --ddp-backend fully_sharded");
}

/* §2.9: sqrt_world_size leaves expert gradients sqrt(N) times the exact ones
 * (N = world / expert group size), world_size leaves them exact. At update 1
 * the norms are of the same global gradient, so
 *   gnorm_sqrt^2 - gnorm_ws^2 = (N - 1) * |expert grad|^2,
 * and the ratio of that difference between 4 and 2 ranks is 3. */
static void test_dist_normalizer_scaling(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    double d[2];
    for (int k = 0; k < 2; k++) {
        int ranks = k == 0 ? 2 : 4;
        double g[2];
        for (int m = 0; m < 2; m++) {
            char extra[256];
            snprintf(extra, sizeof extra, "--moe-expert-count 4 --update-freq 1 --moe-normalize-expert-grad %s",
                     m == 0 ? "world_size" : "sqrt_world_size");
            g[m] = first_gnorm(ranks, extra);
        }
        d[k] = g[1] * g[1] - g[0] * g[0];
        assert_true(d[k] > 0);
    }
    double ratio = d[1] / d[0];
    fprintf(stderr, "(gnorm_sqrt^2 - gnorm_ws^2) ratio 4 vs 2 ranks: %.4f (expected 3)\n", ratio);
    assert_true(fabs(ratio - 3.0) < 0.05);
}

int main(void)
{
    have_mpirun = moe_mpirun_prepare();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dist_data_parallel_2),  cmocka_unit_test(test_dist_experts_4_over_2),
        cmocka_unit_test(test_dist_topk_experts_8_over_2), cmocka_unit_test(test_dist_topk_experts_8_over_4),
                cmocka_unit_test(test_dist_experts_4_over_4), cmocka_unit_test(test_dist_replicated_experts_2_over_4),
        cmocka_unit_test(test_dist_fully_sharded_2),  cmocka_unit_test(test_dist_fully_sharded_fp16_master_4),
        cmocka_unit_test(test_dist_normalizer_scaling), cmocka_unit_test(test_dist_a2a_perf_stats),
        cmocka_unit_test(test_dist_fully_sharded_checkpoint_validation),
        cmocka_unit_test(test_dist_legacy_ddp_ignores_normalizer),
        cmocka_unit_test(test_dist_expert_choice_4_over_2), cmocka_unit_test(test_dist_expert_choice_8_over_4),
        cmocka_unit_test(test_dist_dropless_experts_8_over_2), cmocka_unit_test(test_dist_dropless_experts_8_over_4),
        cmocka_unit_test(test_dist_shared_expert_fully_sharded_2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
