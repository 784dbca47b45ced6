/* test_cli.c: moelm-train's answers to bad input, run as a user would: one
 * line on stderr starting "moelm-train: error: ", a non-zero exit, no crash;
 * plus --help, --list-plugins and --version. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "runcmd.h"

#define MODEL                                                                                                    \
    "--cpu --task dummy_lm --tokens-per-sample 16 --dict-size 28 --arch transformer_lm_gpt "                     \
    "--decoder-layers 2 --decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2 "          \
    "--moe-expert-count 4 --moe-freq 2 --criterion moe_cross_entropy --optimizer adam --batch-size 2 "           \
    "--max-update 1 --no-save "

/* runs args, expects a failure whose stderr is one error line containing every needle */
static void expect_error(const char *args, const char *const *needles, int n)
{
    moe_cmd_result r;
    assert_int_equal(moe_run_train(args, &r), 0);
    if (r.status == 0 || r.status < 0)
        fail_msg("expected a clean failure for: %s\nstatus %d\nstdout:\n%s\nstderr:\n%s", args, r.status, r.out, r.err);
    assert_int_equal(moe_count_lines(r.err, ""), 1);
    if (strncmp(r.err, "moelm-train: error: ", 20) != 0)
        fail_msg("stderr does not start with the error prefix: %s", r.err);
    for (int i = 0; i < n; i++)
        if (!strstr(r.err, needles[i]))
            fail_msg("stderr lacks \"%s\": %s", needles[i], r.err);
    moe_cmd_result_free(&r);
}

static void test_cli_unknown_flag_suggests_closest(void **s)
{
    (void)s;
    const char *n[] = {"--moe-expert-cout", "did you mean --moe-expert-count"};
    expect_error(MODEL "--moe-expert-cout 8 --dry-run", n, 2);
}

static void test_cli_unknown_component_lists_installed(void **s)
{
    (void)s;
    const char *n[] = {"moe_cros_entropy", "moe_cross_entropy", "cross_entropy"};
    expect_error(MODEL "--criterion moe_cros_entropy --dry-run", n, 3);
    /* closest first */
    moe_cmd_result r;
    assert_int_equal(moe_run_train(MODEL "--criterion moe_cros_entropy --dry-run", &r), 0);
    const char *a = strstr(r.err, "installed");
    assert_non_null(a);
    const char *first = strstr(a, "moe_cross_entropy"), *second = strstr(a, " cross_entropy");
    assert_non_null(first);
    assert_true(second == NULL || first < second);
    moe_cmd_result_free(&r);
}

static void test_cli_wrong_type_and_range(void **s)
{
    (void)s;
    const char *n1[] = {"--max-update", "abc"};
    expect_error(MODEL "--max-update abc --dry-run", n1, 2);
    const char *n2[] = {"--lr", "x"};
    expect_error(MODEL "--lr x --dry-run", n2, 2);
    const char *n3[] = {"--moe-second-expert-policy", "everything", "sampling"};
    expect_error(MODEL "--moe-second-expert-policy everything --dry-run", n3, 3);
    const char *n4[] = {"--batch-size", "0"};
    expect_error(MODEL "--batch-size 0 --dry-run", n4, 2);
}

static void test_cli_contradictory_flags(void **s)
{
    (void)s;
    const char *n1[] = {"--fp16", "--bf16"};
    expect_error(MODEL "--fp16 --bf16 --dry-run", n1, 2);
    const char *n2[] = {"6", "4"};
    expect_error(MODEL "--moe-expert-count 6 --distributed-world-size 4 --dry-run", n2, 2);
}

static void test_cli_broken_plugins(void **s)
{
    (void)s;
    char args[1024];
    struct {
        const char *name, *needle;
    } cases[] = {
        {"not_elf", "libmoe-criterion-not_elf.so"},
        {"fixture_no_symbol", "moe_plugin_descriptor"},
        {"fixture_abi_major", "ABI"},
        {"fixture_undefined", "libmoe-criterion-fixture_undefined.so"},
        {"fixture_wrong_kind", "libmoe-criterion-fixture_wrong_kind.so"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(args, sizeof args, MODEL "--user-dir %s --criterion %s --dry-run", MOE_TEST_FIXTURE_DIR,
                 cases[i].name);
        const char *n[] = {cases[i].needle};
        expect_error(args, n, 1);
    }
}

/* a plugin whose load hook fails, and entries named like plugins that are
 * not files: the error names the file and what is wrong with it */
static void test_cli_plugin_load_failures_name_file(void **s)
{
    (void)s;
    char args[1024];
    snprintf(args, sizeof args, MODEL "--user-dir %s --criterion fixture_load_fails --dry-run", MOE_TEST_FIXTURE_DIR);
    const char *n1[] = {"libmoe-criterion-fixture_load_fails.so", "load hook failed", "cannot open its table"};
    expect_error(args, n1, 3);
    snprintf(args, sizeof args, MODEL "--user-dir %s --criterion fixture_dir --dry-run", MOE_TEST_FIXTURE_DIR);
    const char *n2[] = {"libmoe-criterion-fixture_dir.so", "found a directory"};
    expect_error(args, n2, 2);
    snprintf(args, sizeof args, MODEL "--user-dir %s --criterion fixture_loop --dry-run", MOE_TEST_FIXTURE_DIR);
    const char *n3[] = {"libmoe-criterion-fixture_loop.so", "symbolic link"};
    expect_error(args, n3, 2);
}

/* runs args, expects exit status `code` and one error line naming `flag` */
static void expect_refused(const char *args, int code, const char *flag)
{
    moe_cmd_result r;
    assert_int_equal(moe_run_train(args, &r), 0);
    if (r.status != code || moe_count_lines(r.err, "") != 1 || !strstr(r.err, flag))
        fail_msg("expected exit %d and one line naming %s for: %s\nstatus %d\nstderr:\n%s", code, flag, args,
                 r.status, r.err);
    moe_cmd_result_free(&r);
}

/* Option values are checked when the command line is read, the same way
 * with --dry-run as for training, and every argument error exits 2. */
static void test_cli_values_checked_before_any_work(void **s)
{
    (void)s;
    const char *modes[] = {"--dry-run", "--disable-validation"};
    for (int m = 0; m < 2; m++) {
        char args[1024];
        const struct {
            const char *value, *flag;
        } cases[] = {
            {"--dict-size 4611686018427387904", "--dict-size"},
            {"--dict-size -1", "--dict-size"},
            {"--adam-betas inf", "--adam-betas"},
            {"--adam-betas '(0.9,'", "--adam-betas"},
            {"--adam-betas '(nan, 0.9)'", "--adam-betas"},
            {"--adam-betas '(0.9,)'", "--adam-betas"},
            {"--adam-eps NaN", "--adam-eps"},
            {"--moe-eval-capacity-token-fraction 4294967296", "--moe-eval-capacity-token-fraction"},
            {"--batch-size 9223372036854775807", "--batch-size"},
            {"--moe-gate-loss-wt inf", "--moe-gate-loss-wt"},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            snprintf(args, sizeof args, MODEL "%s %s", cases[i].value, modes[m]);
            expect_refused(args, 2, cases[i].flag);
        }
    }
}

/* Sizes within the ranges are computed exactly: a model past 2^53
 * parameters is refused by name, a large one is planned with its true size. */
static void test_cli_sizes_do_not_overflow(void **s)
{
    (void)s;
    expect_refused(MODEL "--decoder-layers 4096 --decoder-embed-dim 1048576 --decoder-ffn-embed-dim 1048576 "
                         "--decoder-attention-heads 1 --dry-run",
                   2, "2^53 parameters");
    moe_cmd_result r;
    assert_int_equal(moe_run_train(MODEL "--dict-size 2147483000 --decoder-embed-dim 1048576 "
                                         "--decoder-attention-heads 1 --share-decoder-input-output-embed --dry-run",
                                   &r),
                     0);
    assert_int_equal(r.status, 0);
    const char *p = strstr(r.out, "num. non-expert model params: ");
    assert_non_null(p);
    char digits[64];
    size_t n = 0;
    for (p += strlen("num. non-expert model params: "); *p && *p != '\n' && n < sizeof digits - 1; p++)
        if (*p >= '0' && *p <= '9')
            digits[n++] = *p;
    digits[n] = '\0';
    /* the tied embedding alone: 2147483008 x 1048576 */
    assert_true(strtoll(digits, NULL, 10) >= 2147483008LL * 1048576LL);
    moe_cmd_result_free(&r);
}

static void test_cli_help_shows_selected_plugin_options(void **s)
{
    (void)s;
    moe_cmd_result r;
    assert_int_equal(moe_run_train("--help", &r), 0);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "--max-update"));
    assert_null(strstr(r.out, "--decoder-embed-dim"));
    moe_cmd_result_free(&r);
    assert_int_equal(moe_run_train("--arch transformer_lm_gpt --optimizer adam --help", &r), 0);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "--decoder-embed-dim"));
    assert_non_null(strstr(r.out, "--adam-betas"));
    moe_cmd_result_free(&r);
}

static void test_cli_list_plugins_and_version(void **s)
{
    (void)s;
    moe_cmd_result r;
    assert_int_equal(moe_run_train("--list-plugins", &r), 0);
    assert_int_equal(r.status, 0);
    const char *names[] = {"transformer_lm_gpt", "dummy_lm", "moe_cross_entropy", "adam", "fixed", "top2",
                           "sqrt_world_size", "cpu", "single", "libmoe-criterion-moe_cross_entropy.so"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strstr(r.out, names[i]))
            fail_msg("--list-plugins lacks %s:\n%s", names[i], r.out);
    moe_cmd_result_free(&r);
    assert_int_equal(moe_run_train("--version", &r), 0);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "moelm "));
    moe_cmd_result_free(&r);
}

static void test_cli_key_equals_value_and_tuple(void **s)
{
    (void)s;
    moe_cmd_result r;
    assert_int_equal(moe_run_train(MODEL "--max-update=1 --adam-betas='(0.9, 0.98)' --dry-run", &r), 0);
    if (r.status != 0)
        fprintf(stderr, "%s\n", r.err);
    assert_int_equal(r.status, 0);
    moe_cmd_result_free(&r);
}

static void test_cli_task_vocabulary_too_small(void **s)
{
    (void)s;
    const char *n[] = {"--tokens-per-sample 16", "--dict-size"};
    expect_error(MODEL "--dict-size 12 --dry-run", n, 2);
}

static void test_cli_validation_line(void **s)
{
    (void)s;
    moe_cmd_result r;
    assert_int_equal(moe_run_train("--cpu --task dummy_lm --tokens-per-sample 16 --dict-size 28 --arch "
                                   "transformer_lm_gpt --decoder-layers 2 --decoder-embed-dim 16 "
                                   "--decoder-ffn-embed-dim 32 --decoder-attention-heads 2 --moe-expert-count 4 "
                                   "--moe-freq 2 --criterion moe_cross_entropy --optimizer adam --batch-size 2 "
                                   "--max-update 4 --validate-interval-updates 2 --max-sentences-valid 1 "
                                   "--max-valid-steps 3 --log-format json --log-interval 2 --no-save",
                                   &r),
                     0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    assert_int_equal(moe_count_lines(r.out, "| valid | {\"epoch\": 1, \"valid_loss\": "), 2);
    assert_int_equal(moe_count_lines(r.out, "\"valid_num_updates\": \"4\""), 1);
    moe_cmd_result_free(&r);
}

/* the core links neither CUDA, NCCL nor MPI: those live in plugins */
static void test_cli_core_links_no_device_libraries(void **s)
{
    (void)s;
    moe_cmd_result r;
    assert_int_equal(moe_run_shell("ldd " MOE_TEST_BIN_DIR "/moelm-train", &r), 0);
    assert_int_equal(r.status, 0);
    const char *banned[] = {"libcuda", "libcudart", "libcublas", "libnccl", "libmpi"};
    for (size_t i = 0; i < sizeof banned / sizeof banned[0]; i++)
        if (strstr(r.out, banned[i]))
            fail_msg("moelm-train links %s:\n%s", banned[i], r.out);
    assert_non_null(strstr(r.out, "libjansson"));
    moe_cmd_result_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cli_unknown_flag_suggests_closest),
        cmocka_unit_test(test_cli_unknown_component_lists_installed),
        cmocka_unit_test(test_cli_wrong_type_and_range),
        cmocka_unit_test(test_cli_contradictory_flags),
        cmocka_unit_test(test_cli_broken_plugins),
        cmocka_unit_test(test_cli_plugin_load_failures_name_file),
        cmocka_unit_test(test_cli_values_checked_before_any_work),
        cmocka_unit_test(test_cli_sizes_do_not_overflow),
        cmocka_unit_test(test_cli_help_shows_selected_plugin_options),
        cmocka_unit_test(test_cli_list_plugins_and_version),
        cmocka_unit_test(test_cli_key_equals_value_and_tuple),
        cmocka_unit_test(test_cli_task_vocabulary_too_small),
        cmocka_unit_test(test_cli_validation_line),
        cmocka_unit_test(test_cli_core_links_no_device_libraries),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
