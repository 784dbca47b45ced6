/* test_eval_lm.c: moelm-eval-lm, run as a user would, on a small model
 * trained here (CPU backend) over a pseudo-random text prepared with
 * moelm-preprocess:
 *  - its loss equals the validation inner_loss moelm-train logged for the
 *    same split, model and batches;
 *  - the same on 2 MPI ranks as on one (sums combined across ranks), with
 *    capacity for every token;
 *  - a checkpoint written by 2 ranks evaluates on one;
 *  - --context-window: the same tokens counted, each block scored with
 *    context;
 *  - bad input: no --path, a missing checkpoint, an unknown split, a window
 *    as long as the blocks.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "lmcorpus.h"
#include "runcmd.h"

#define MODEL                                                                                                    \
    "--cpu --tokens-per-sample 32 --arch transformer_lm_gpt --share-decoder-input-output-embed "                 \
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "          \
    "--moe-expert-count 2 --moe-freq 2 --moe-second-expert-policy all "                                         \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --optimizer adam --adam-betas '(0.9, 0.98)' "         \
    "--lr 0.003 --warmup-updates 4 --dropout 0.1 --batch-size 8 --batch-size-valid 4 "                          \
    "--log-format json --log-interval 4 "

static char dir[64];
static int have_mpirun;

static void shell_ok(const char *cmd, moe_cmd_result *r)
{
    assert_int_equal(moe_run_shell(cmd, r), 0);
    if (r->status != 0)
        fail_msg("'%s' failed (%d):\n%s\n%s", cmd, r->status, r->out, r->err);
}

/* the number after "<key>": in the last line holding it */
static double last_value(const char *out, const char *key)
{
    double v = NAN;
    size_t k = strlen(key);
    for (const char *p = strstr(out, key); p; p = strstr(p + 1, key)) {
        const char *q = p + k;
        while (*q == '"' || *q == ':' || *q == ' ')
            q++;
        v = strtod(q, NULL);
    }
    return v;
}

static double eval_loss(const char *out) { return last_value(out, "Loss (base 2):"); }

static long long evaluated_tokens(const char *out)
{
    const char *p = strstr(out, "Evaluated ");
    if (!p)
        return -1;
    long long n = 0;
    for (p += 10; *p && *p != ' '; p++)
        if (*p >= '0' && *p <= '9')
            n = n * 10 + (*p - '0');
    return n;
}

static int setup(void **state)
{
    (void)state;
    have_mpirun = moe_mpirun_prepare();
    return moe_test_lm_corpus(dir, sizeof dir, "eval", 777, 300, 15, 1);
}

static int teardown(void **state)
{
    (void)state;
    return moe_test_rmtree(dir);
}

/* trains 12 updates on `ranks` ranks into dir/<ckpt>, validating at the end */
static void train(int ranks, const char *ckpt, moe_cmd_result *r)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s%s/moelm-train --task language_modeling %s/data-bin " MODEL
             "--max-update 12 --save-dir %s/%s",
             ranks > 1 ? "mpirun --oversubscribe -np 2 " : "", MOE_TEST_BIN_DIR, dir, dir, ckpt);
    shell_ok(cmd, r);
}

static void eval(int ranks, const char *ckpt, const char *extra, moe_cmd_result *r)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s%s/moelm-eval-lm %s/data-bin --path %s/%s/checkpoint_last.pt %s",
             ranks > 1 ? "mpirun --oversubscribe -np 2 " : "", MOE_TEST_BIN_DIR, dir, dir, ckpt, extra);
    shell_ok(cmd, r);
}

static void test_eval_lm_equals_validation(void **s)
{
    (void)s;
    moe_cmd_result t, e;
    train(1, "one", &t);
    double valid = last_value(t.out, "\"valid_inner_loss\"");
    assert_false(isnan(valid));
    eval(1, "one", "--gen-subset valid --batch-size 4", &e);
    double loss = eval_loss(e.out);
    printf("validation inner_loss %.3f, moelm-eval-lm %.4f\n", valid, loss);
    if (!(fabs(loss - valid) <= 6e-4))
        fail_msg("eval-lm %.4f != validation %.3f:\n%s", loss, valid, e.out);
    assert_non_null(strstr(e.out, "| fairseq_cli.eval_lm | Evaluated "));
    assert_non_null(strstr(e.out, ", Perplexity: "));
    moe_cmd_result_free(&e);

    /* --context-window 8: blocks of 24, the same tokens counted */
    eval(1, "one", "--gen-subset valid --batch-size 4", &e);
    long long n = evaluated_tokens(e.out);
    moe_cmd_result_free(&e);
    eval(1, "one", "--gen-subset valid --batch-size 4 --context-window 8", &e);
    assert_int_equal(evaluated_tokens(e.out), n);
    assert_true(isfinite(eval_loss(e.out)));
    moe_cmd_result_free(&e);

    /* the default batching (--max-tokens 36000) gives the test split a loss too */
    eval(1, "one", "", &e);
    assert_true(evaluated_tokens(e.out) > 1000);
    moe_cmd_result_free(&e);
    moe_cmd_result_free(&t);
}

/* ranks add their sums: with room for every token in every expert, 2 ranks
 * score exactly what one does; and 2-rank checkpoints evaluate on one rank */
static void test_eval_lm_ranks(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    moe_cmd_result t, a, b;
    train(1, "one", &t);
    moe_cmd_result_free(&t);
    const char *flags = "--gen-subset valid --batch-size 4 --moe-eval-capacity-token-fraction 1.0";
    eval(1, "one", flags, &a);
    eval(2, "one", flags, &b);
    double la = eval_loss(a.out), lb = eval_loss(b.out);
    printf("1 rank %.4f, 2 ranks %.4f\n", la, lb);
    assert_true(fabs(la - lb) < 1e-4);
    assert_int_equal(evaluated_tokens(a.out), evaluated_tokens(b.out));
    moe_cmd_result_free(&a);
    moe_cmd_result_free(&b);

    train(2, "two", &t);
    moe_cmd_result_free(&t);
    eval(1, "two", flags, &a);
    assert_true(isfinite(eval_loss(a.out)));
    moe_cmd_result_free(&a);
}

static void expect_refused(const char *args, const char *needle)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s/moelm-eval-lm %s", MOE_TEST_BIN_DIR, args);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status == 0 || strncmp(r.err, "moelm-eval-lm: error: ", 22) != 0 || !strstr(r.err, needle))
        fail_msg("'%s': expected a refusal with '%s', got %d:\n%s", args, needle, r.status, r.err);
    assert_int_equal(moe_count_lines(r.err, "error"), 1);
    moe_cmd_result_free(&r);
}

/* a --moe-dropless model evaluates at its bound; a bound too small for a
 * batch's routing is the training's error, never a silent drop */
static void test_eval_lm_dropless(void **s)
{
    (void)s;
    moe_cmd_result t, e;
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s/moelm-train --task language_modeling %s/data-bin " MODEL
             "--moe-dropless --max-update 4 --save-dir %s/dropless",
             MOE_TEST_BIN_DIR, dir, dir);
    shell_ok(cmd, &t);
    assert_int_equal(t.status, 0);
    eval(1, "dropless", "--gen-subset valid --batch-size 4", &e);
    assert_int_equal(e.status, 0);
    assert_true(isfinite(eval_loss(e.out)));
    moe_cmd_result_free(&e);
    char args[1024];
    snprintf(args, sizeof args,
             "%s/data-bin --path %s/dropless/checkpoint_last.pt --gen-subset valid --batch-size 4 "
             "--moe-dropless-capacity-factor 0.05",
             dir, dir);
    expect_refused(args, "--moe-dropless: expected no expert over the bound (--moe-dropless-capacity-factor 0.05), "
                         "found ");
    expect_refused(args, "(routing collapse); raise --moe-dropless-capacity-factor");
    moe_cmd_result_free(&t);
}

static void test_eval_lm_bad_input(void **s)
{
    (void)s;
    moe_cmd_result t;
    train(1, "one", &t);
    moe_cmd_result_free(&t);
    char args[512];
    snprintf(args, sizeof args, "%s/data-bin", dir);
    expect_refused(args, "--path");
    snprintf(args, sizeof args, "%s/data-bin --path %s/nowhere/checkpoint_last.pt", dir, dir);
    expect_refused(args, "nowhere");
    snprintf(args, sizeof args, "%s/data-bin --path %s/one/checkpoint_last.pt --gen-subset valid7", dir, dir);
    expect_refused(args, "valid7");
    snprintf(args, sizeof args, "%s/data-bin --path %s/one/checkpoint_last.pt --context-window 32", dir, dir);
    expect_refused(args, "--context-window 32");
    snprintf(args, sizeof args, "%s/data-bin --path %s/one/checkpoint_last.pt --no-such-flag", dir, dir);
    expect_refused(args, "--no-such-flag");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eval_lm_equals_validation),
        cmocka_unit_test(test_eval_lm_ranks),
        cmocka_unit_test(test_eval_lm_dropless),
        cmocka_unit_test(test_eval_lm_bad_input),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
