/* test_config.c: flag combinations and derived settings (core/config.h).
 *
 * Each contradiction is rejected with a message naming the flags and what to
 * change, and the combinations next to it (the fix the message proposes, the
 * reference command) are accepted. The arch's MoE flags come from a small
 * stand-in table, as a loaded arch plugin would add them.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/config.h"
#include "core/internal.h"
#include "core/options.h"

#define MAX_WORDS 128

static const moe_option arch_opts[] = {
    {"moe-expert-count", MOE_OPT_INT, "0", "number of experts", 0, 1e9, NULL},
    {"moe-freq", MOE_OPT_INT, "0", "MoE every N layers", 0, 1e9, NULL},
};

/* A store with the core's table and the arch stand-in, parsed strictly from
 * `cmd` (blank-separated words, no quoting needed here). */
static moe_opts *opts_from(const char *cmd, int with_arch)
{
    static char buf[4096];
    char *argv[MAX_WORDS];
    int argc = 0;
    argv[argc++] = (char *)"moelm-train";
    snprintf(buf, sizeof buf, "%s", cmd);
    for (char *w = strtok(buf, " "); w; w = strtok(NULL, " ")) {
        assert_true(argc < MAX_WORDS);
        argv[argc++] = w;
    }
    moe_opts *o = NULL;
    assert_int_equal(moe_opts_create(&o), MOE_OK);
    if (with_arch)
        assert_int_equal(moe_opts_add_table(o, "arch test", arch_opts, 2), MOE_OK);
    moe_error_clear();
    if (moe_opts_parse(o, argc, argv, 1) != MOE_OK)
        fail_msg("'%s' does not parse: %s", cmd, moe_error_message());
    return o;
}

static void check_ok(const char *cmd, int world)
{
    moe_opts *o = opts_from(cmd, 1);
    moe_error_clear();
    moe_status st = moe_config_check(o, world);
    if (st != MOE_OK)
        fail_msg("'%s' on %d ranks: expected OK, got: %s", cmd, world, moe_error_message());
    moe_opts_destroy(o);
}

/* The check fails with MOE_ERR_INVALID_ARG and the message holds every needle. */
static void check_fails(const char *cmd, int world, int with_arch, ...)
{
    moe_opts *o = opts_from(cmd, with_arch);
    moe_error_clear();
    moe_status st = moe_config_check(o, world);
    const char *msg = moe_error_message();
    if (st != MOE_ERR_INVALID_ARG)
        fail_msg("'%s' on %d ranks: expected MOE_ERR_INVALID_ARG, got %d (%s)", cmd, world, (int)st, msg);
    va_list ap;
    va_start(ap, with_arch);
    for (const char *needle = va_arg(ap, const char *); needle; needle = va_arg(ap, const char *))
        if (!strstr(msg, needle))
            fail_msg("'%s': message \"%s\" lacks \"%s\"", cmd, msg, needle);
    va_end(ap);
    moe_error_clear();
    moe_opts_destroy(o);
}

#define BATCH "--batch-size 4 "

static void test_config_reference_command_passes(void **state)
{
    (void)state;
    const char *ref = "--ddp-backend fully_sharded --memory-efficient-fp16 --moe-expert-count 8 --moe-freq 2 "
                      "--moe-normalize-expert-grad sqrt_world_size --batch-size 4 --update-freq 1 --lr 0.0005 "
                      "--clip-norm 0.0 --max-update 250 --disable-validation --max-sentences-valid 1";
    check_ok(ref, 8);
    check_ok(ref, 1);
    check_ok("--ddp-backend fully_sharded --memory-efficient-fp16 --moe-expert-count 64 --moe-freq 2 "
             "--batch-size 12 --distributed-port 12345",
             64);
    check_ok(BATCH, 1); /* dense model, defaults */
}

static void test_config_precision_conflicts(void **state)
{
    (void)state;
    check_fails(BATCH "--fp16 --bf16", 1, 1, "--fp16", "--bf16", "keep one of", NULL);
    check_fails(BATCH "--memory-efficient-fp16 --bf16", 1, 1, "--memory-efficient-fp16", "--bf16", NULL);
    check_fails(BATCH "--fp16 --memory-efficient-bf16", 1, 1, "--fp16", "--memory-efficient-bf16", NULL);
    check_fails(BATCH "--memory-efficient-fp16 --memory-efficient-bf16", 1, 1,
                "--memory-efficient-fp16 cannot be combined with --memory-efficient-bf16", NULL);
    check_ok(BATCH "--fp16 --memory-efficient-fp16", 1);
    check_ok(BATCH "--bf16 --memory-efficient-bf16", 1);
}

static void test_config_expert_layout(void **state)
{
    (void)state;
    check_fails(BATCH "--moe-expert-count 6 --moe-freq 2", 4, 1, "--moe-expert-count 6 on 4 ranks",
                "multiple or a divisor", "use e.g. 4 or 8 experts", NULL);
    check_fails(BATCH "--moe-expert-count 3 --moe-freq 2 --ddp-backend fully_sharded", 8, 1,
                "--moe-expert-count 3 on 8 ranks", "use e.g. 2 or 4 experts", NULL);
    check_ok(BATCH "--moe-expert-count 8 --moe-freq 2", 4);   /* 2 experts per rank */
    check_ok(BATCH "--moe-expert-count 16 --moe-freq 2", 8);
    check_fails(BATCH "--moe-expert-count 2 --moe-freq 2", 8, 1, "--moe-expert-count 2",
                "smaller than the world size 8", "replicated on 4 ranks", "--ddp-backend fully_sharded",
                "found pytorch_ddp", "at least 8 experts", NULL);
    check_fails(BATCH "--moe-expert-count 2 --moe-freq 2 --ddp-backend legacy_ddp", 8, 1, "found legacy_ddp", NULL);
    check_ok(BATCH "--moe-expert-count 2 --moe-freq 2 --ddp-backend fully_sharded", 8);
    check_ok(BATCH "--moe-expert-count 5 --moe-freq 2", 1);
}

static void test_config_moe_freq_needs_experts(void **state)
{
    (void)state;
    check_fails(BATCH "--moe-freq 2", 8, 1, "--moe-freq 2", "--moe-expert-count is 0", "give --moe-expert-count N",
                "e.g. 8", NULL);
    check_ok(BATCH "--moe-freq 0", 8);
}

static void test_config_batch_size_required(void **state)
{
    (void)state;
    check_fails("--lr 0.1", 1, 1, "found neither --batch-size nor --max-tokens", NULL);
    check_ok("--max-tokens 2048", 1);
    check_ok("--max-sentences 2", 1);
}

static void test_config_update_freq_schedule(void **state)
{
    (void)state;
    check_fails(BATCH "--fp16 --update-freq 1,2", 1, 1, "--update-freq '1,2'", "2 values", "--fp16-scale-window",
                NULL);
    check_fails(BATCH "--memory-efficient-fp16 --update-freq [1,2,4]", 1, 1, "3 values", NULL);
    check_ok(BATCH "--fp16 --update-freq 1,2 --fp16-scale-window 128", 1);
    check_ok(BATCH "--update-freq 1,2", 1);          /* no loss scaler in fp32 */
    check_ok(BATCH "--bf16 --update-freq 1,2", 1);   /* nor in bf16 */
    check_ok(BATCH "--fp16 --update-freq 4", 1);
}

static void test_config_list_values(void **state)
{
    (void)state;
    check_fails(BATCH "--update-freq 0", 1, 1, "argument --update-freq", "positive integers", "'0'", NULL);
    check_fails(BATCH "--update-freq 1.5", 1, 1, "argument --update-freq", "positive integers", "'1.5'", NULL);
    check_fails(BATCH "--update-freq two", 1, 1, "argument --update-freq", "a list of numbers", "'two'", NULL);
    check_fails(BATCH "--lr fast", 1, 1, "argument --lr", "a list of numbers", "'fast'", NULL);
    check_fails(BATCH "--lr -0.1", 1, 1, "argument --lr", "non-negative", "'-0.1'", NULL);
    check_fails(BATCH "--lr ()", 1, 1, "argument --lr", "at least one value", NULL);
    check_ok(BATCH "--lr 0.1,0.05 --update-freq 2,1", 1);
}

static void test_config_distributed(void **state)
{
    (void)state;
    check_fails(BATCH "--distributed-rank 8", 8, 1, "--distributed-rank 8", "0..7", NULL);
    check_ok(BATCH "--distributed-rank 7", 8);
    check_ok(BATCH "--distributed-rank 3", 1); /* the world is not known yet: launch decides */
    check_fails(BATCH "--distributed-backend single", 4, 1, "--distributed-backend single", "4 ranks", NULL);
    check_fails(BATCH "--cpu --distributed-backend nccl", 2, 1, "nccl needs GPUs", "--distributed-backend mpi",
                NULL);
    check_ok(BATCH "--cpu --distributed-backend mpi", 2);
    check_ok(BATCH "--cpu", 2); /* the default backend is not a user's choice */
    check_ok(BATCH "--distributed-backend single", 1);
}

static void test_config_without_arch_flags(void **state)
{
    (void)state;
    /* a dense arch without MoE flags: no expert checks, no crash */
    moe_opts *o = opts_from(BATCH, 0);
    assert_int_equal(moe_config_check(o, 8), MOE_OK);
    moe_opts_destroy(o);
}

static void test_config_precision_modes(void **state)
{
    (void)state;
    const struct {
        const char *cmd;
        moe_dtype t;
        int master, scaling;
    } cases[] = {
        {"", MOE_F32, 0, 0},
        {"--fp16", MOE_F16, 1, 1},
        {"--memory-efficient-fp16", MOE_F16, 0, 1},
        {"--fp16 --memory-efficient-fp16", MOE_F16, 0, 1},
        {"--bf16", MOE_BF16, 1, 0},
        {"--memory-efficient-bf16", MOE_BF16, 0, 0},
        {"--bf16 --memory-efficient-bf16", MOE_BF16, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_opts *o = opts_from(cases[i].cmd, 1);
        moe_dtype act = MOE_I32, grad = MOE_I32;
        int master = -1, scaling = -1;
        moe_config_precision(o, &act, &grad, &master, &scaling);
        if (act != cases[i].t || grad != cases[i].t || master != cases[i].master || scaling != cases[i].scaling)
            fail_msg("'%s': act %d grad %d master %d scaling %d", cases[i].cmd, (int)act, (int)grad, master,
                     scaling);
        moe_opts_destroy(o);
    }
}

static void test_config_first_list_values(void **state)
{
    (void)state;
    moe_opts *o = opts_from(BATCH, 1);
    assert_int_equal(moe_config_update_freq(o), 1);
    assert_true(moe_config_lr(o) == 0.25); /* fairseq's default */
    moe_opts_destroy(o);
    o = opts_from(BATCH "--update-freq 4,2 --lr 0.0005", 1);
    assert_int_equal(moe_config_update_freq(o), 4);
    assert_true(moe_config_lr(o) == 0.0005);
    moe_opts_destroy(o);
    o = opts_from(BATCH "--update-freq [3,1] --lr (0.1,0.2)", 1);
    assert_int_equal(moe_config_update_freq(o), 3);
    assert_true(moe_config_lr(o) == 0.1);
    moe_opts_destroy(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_reference_command_passes),
        cmocka_unit_test(test_config_precision_conflicts),
        cmocka_unit_test(test_config_expert_layout),
        cmocka_unit_test(test_config_moe_freq_needs_experts),
        cmocka_unit_test(test_config_batch_size_required),
        cmocka_unit_test(test_config_update_freq_schedule),
        cmocka_unit_test(test_config_list_values),
        cmocka_unit_test(test_config_distributed),
        cmocka_unit_test(test_config_without_arch_flags),
        cmocka_unit_test(test_config_precision_modes),
        cmocka_unit_test(test_config_first_list_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
