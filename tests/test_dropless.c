/* test_dropless.c: --moe-dropless on the CPU backend, run as a user would.
 *  - top-2 and top-k (k = 4 of 8 experts) on a setup whose regular capacity
 *    drops tokens (the logged overflow metrics are > 0 without the flag)
 *    train with the flag with every logged overflow metric 0;
 *  - a bound too small for the routing (a tiny
 *    --moe-dropless-capacity-factor) stops training with one error naming
 *    the layer, the expert's load, the bound and the flag to raise;
 *  - the flag is refused where it means nothing: with expert choice, with
 *    top-k's --moe-expert-capacity-factor, and without the criterion that
 *    sums the routing metrics the check reads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "runcmd.h"

#define BASE                                                                                                     \
    "--cpu --task dummy_lm --tokens-per-sample 32 --dict-size 996 "                                              \
    "--arch transformer_lm_gpt --share-decoder-input-output-embed "                                              \
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 4 "         \
    "--moe-expert-count 8 --moe-freq 2 --moe-gate-loss-wt 0.01 "                 \
    "--optimizer adam --lr 0.005 --clip-norm 0.0 --batch-size 4 --disable-validation "                          \
    "--log-format json --log-interval 1 --no-save --max-update 6 "
#define MOE_CRIT "--criterion moe_cross_entropy "

/* the sum of "key": "value" over every train_inner line, and their count */
static double sum_field(const char *out, const char *key, int *lines)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": \"", key);
    double sum = 0.0;
    *lines = 0;
    for (const char *p = strstr(out, "| train_inner | "); p; p = strstr(p + 1, "| train_inner | ")) {
        const char *q = strstr(p, pat), *eol = strchr(p, '\n');
        if (q && (!eol || q < eol)) {
            sum += atof(q + strlen(pat));
            (*lines)++;
        }
    }
    return sum;
}

static void run_ok(const char *args, moe_cmd_result *r)
{
    assert_int_equal(moe_run_train(args, r), 0);
    if (r->status != 0)
        fprintf(stderr, "%s\n%s\n", r->out, r->err);
    assert_int_equal(r->status, 0);
}

/* the same run drops tokens without the flag and none with it */
static void check_drops_nothing(const char *gate)
{
    char args[1024];
    moe_cmd_result a, b;
    int n1, n2;
    snprintf(args, sizeof args, BASE MOE_CRIT "%s", gate);
    run_ok(args, &a);
    double dropped = sum_field(a.out, "overflow_expert1", &n1) + sum_field(a.out, "overflow_expert2", &n2);
    assert_int_equal(n1, 6);
    assert_int_equal(n2, 6);
    fprintf(stderr, "%s: overflow without --moe-dropless summed over 6 updates: %.3f\n", gate, dropped);
    assert_true(dropped > 0.0);

    snprintf(args, sizeof args, BASE MOE_CRIT "%s --moe-dropless", gate);
    run_ok(args, &b);
    double kept = sum_field(b.out, "overflow_expert1", &n1) + sum_field(b.out, "overflow_expert2", &n2);
    assert_int_equal(n1, 6);
    assert_int_equal(n2, 6);
    assert_true(kept == 0.0);
    moe_cmd_result_free(&a);
    moe_cmd_result_free(&b);
}

static void test_dropless_top2_drops_nothing(void **state)
{
    (void)state;
    check_drops_nothing("--moe-gate top2 --moe-second-expert-policy all");
}

static void test_dropless_topk4_drops_nothing(void **state)
{
    (void)state;
    check_drops_nothing("--moe-gate topk --moe-router-topk 4");
}

/* 128 tokens, 8 experts, k = 2: the bound is ceil(0.3 * 2 * 16) = 10 */
static void test_dropless_collapse_is_an_error(void **state)
{
    (void)state;
    moe_cmd_result r;
    assert_int_equal(moe_run_train(BASE MOE_CRIT "--moe-second-expert-policy all --moe-dropless "
                                                 "--moe-dropless-capacity-factor 0.3",
                                   &r),
                     0);
    assert_int_equal(r.status, 1);
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 0);
    const char *e = strstr(r.err, "--moe-dropless: expected at most 10 tokens per expert in a micro-batch of 128 "
                                  "(the bound with --moe-dropless-capacity-factor 0.3), found ");
    if (!e)
        fail_msg("no collapse error in: %s", r.err);
    long load = 0;
    int expert = -1;
    assert_int_equal(sscanf(e + strlen("--moe-dropless: expected at most 10 tokens per expert in a micro-batch of "
                                       "128 (the bound with --moe-dropless-capacity-factor 0.3), found "),
                            "%ld routed to expert %d", &load, &expert),
                     2);
    assert_true(load > 10 && load <= 128);
    assert_true(expert >= 0 && expert < 8);
    assert_non_null(strstr(e, " of decoder.layers.1 at update 1 (routing collapse); raise "
                              "--moe-dropless-capacity-factor"));
    moe_cmd_result_free(&r);
}

static void check_refused(const char *args, const char *message)
{
    moe_cmd_result r;
    assert_int_equal(moe_run_train(args, &r), 0);
    assert_true(r.status != 0);
    if (!strstr(r.err, message))
        fail_msg("expected '%s' in: %s", message, r.err);
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 0);
    moe_cmd_result_free(&r);
}

static void test_dropless_refused_where_meaningless(void **state)
{
    (void)state;
    check_refused(BASE MOE_CRIT "--moe-gate expert_choice --moe-dropless",
                  "gate expert_choice: expected --moe-dropless only with the top1, top2 or topk gate, found it "
                  "with expert choice");
    check_refused(BASE MOE_CRIT "--moe-gate topk --moe-expert-capacity-factor 2 --moe-dropless",
                  "gate topk: expected no --moe-expert-capacity-factor with --moe-dropless (the bound is "
                  "--moe-dropless-capacity-factor), found --moe-expert-capacity-factor 2");
    check_refused("--cpu --task dummy_lm --tokens-per-sample 32 --dict-size 996 --arch transformer_lm_gpt "
                  "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 "
                  "--decoder-attention-heads 4 --moe-expert-count 8 --moe-freq 2 --criterion cross_entropy "
                  "--optimizer adam --lr 0.005 --batch-size 4 --disable-validation --no-save --max-update 2 "
                  "--moe-dropless",
                  "expected --criterion moe_cross_entropy with --moe-dropless");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dropless_top2_drops_nothing),
        cmocka_unit_test(test_dropless_topk4_drops_nothing),
        cmocka_unit_test(test_dropless_collapse_is_an_error),
        cmocka_unit_test(test_dropless_refused_where_meaningless),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
