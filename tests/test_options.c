/* test_options.c: the option store (core/options.h) and the core's table.
 *
 * Every parse path and every error message: messages are checked for the flag,
 * what was expected and the suggestion, since they are the user interface.
 * The two reference commands of fairseq's MoE README must parse leniently
 * with the core table alone, and strictly once small stand-ins for the
 * component tables (defined below) are added.
 */
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
#include "core/options_table.h"

/* ------------------------------------------------------------- helpers */

#define MAX_WORDS 256

typedef struct words {
    int argc;
    char *argv[MAX_WORDS];
    char buf[8192];
} words;

/* Splits `cmd` the way a shell would for these tests: blanks separate words,
 * '...' and "..." group; argv[0] is the program. */
static void split(const char *cmd, words *w)
{
    size_t o = 0;
    w->argc = 0;
    w->argv[w->argc++] = (char *)"moelm-train";
    const char *p = cmd;
    while (*p) {
        while (*p == ' ' || *p == '\n' || *p == '\t')
            p++;
        if (!*p)
            break;
        assert_true(w->argc < MAX_WORDS);
        w->argv[w->argc++] = &w->buf[o];
        char quote = 0;
        while (*p && (quote || (*p != ' ' && *p != '\n' && *p != '\t'))) {
            if (!quote && (*p == '\'' || *p == '"'))
                quote = *p;
            else if (quote && *p == quote)
                quote = 0;
            else
                w->buf[o++] = *p;
            p++;
            assert_true(o + 1 < sizeof w->buf);
        }
        w->buf[o++] = '\0';
    }
}

static moe_status parse(moe_opts *o, const char *cmd, int strict)
{
    words w;
    split(cmd, &w);
    return moe_opts_parse(o, w.argc, w.argv, strict);
}

static moe_opts *fresh(void)
{
    moe_opts *o = NULL;
    assert_int_equal(moe_opts_create(&o), MOE_OK);
    assert_non_null(o);
    return o;
}

/* The parse fails with MOE_ERR_INVALID_ARG and the message holds every needle
 * (a NULL-terminated list). */
static void expect_error(moe_opts *o, const char *cmd, int strict, ...)
{
    moe_error_clear();
    moe_status st = parse(o, cmd, strict);
    const char *msg = moe_error_message();
    if (st != MOE_ERR_INVALID_ARG)
        fail_msg("'%s' (strict %d): expected MOE_ERR_INVALID_ARG, got %d (%s)", cmd, strict, (int)st, msg);
    va_list ap;
    va_start(ap, strict);
    for (const char *needle = va_arg(ap, const char *); needle; needle = va_arg(ap, const char *))
        if (!strstr(msg, needle))
            fail_msg("'%s': message \"%s\" lacks \"%s\"", cmd, msg, needle);
    va_end(ap);
    moe_error_clear();
}

static void expect_message(moe_status st, moe_status want, ...)
{
    const char *msg = moe_error_message();
    if (st != want)
        fail_msg("expected status %d, got %d (%s)", (int)want, (int)st, msg);
    va_list ap;
    va_start(ap, want);
    for (const char *needle = va_arg(ap, const char *); needle; needle = va_arg(ap, const char *))
        if (!strstr(msg, needle))
            fail_msg("message \"%s\" lacks \"%s\"", msg, needle);
    va_end(ap);
    moe_error_clear();
}

static void ok(moe_opts *o, const char *cmd, int strict)
{
    moe_error_clear();
    moe_status st = parse(o, cmd, strict);
    if (st != MOE_OK)
        fail_msg("'%s' (strict %d) failed: %s", cmd, strict, moe_error_message());
}

/* ------------------------------------------- stand-ins for component tables */

static const moe_option arch_opts[] = {
    {"decoder-layers", MOE_OPT_INT, "12", "num decoder layers", 1, 1e9, NULL},
    {"decoder-embed-dim", MOE_OPT_INT, "768", "decoder embedding dimension", 1, 1e9, NULL},
    {"decoder-ffn-embed-dim", MOE_OPT_INT, "3072", "decoder FFN dimension", 1, 1e9, NULL},
    {"decoder-attention-heads", MOE_OPT_INT, "12", "num decoder attention heads", 1, 1e9, NULL},
    {"share-decoder-input-output-embed", MOE_OPT_FLAG, NULL, "share embeddings", 0, 0, NULL},
    {"checkpoint-activations", MOE_OPT_FLAG, NULL, "checkpoint activations", 0, 0, NULL},
    {"dropout", MOE_OPT_FLOAT, "0.1", "dropout probability", 0, 1, NULL},
    {"attention-dropout", MOE_OPT_FLOAT, "0.1", "attention dropout", 0, 1, NULL},
    {"moe-expert-count", MOE_OPT_INT, "0", "number of experts", 0, 1e9, NULL},
    {"moe-freq", MOE_OPT_INT, "0", "MoE every N layers", 0, 1e9, NULL},
    {"moe-gating-use-fp32", MOE_OPT_FLAG, NULL, "fp32 gating", 0, 0, NULL},
    {"moe-eval-capacity-token-fraction", MOE_OPT_FLOAT, "0.25", "eval capacity fraction", 0, 0, NULL},
    {"moe-top1-expert", MOE_OPT_FLAG, NULL, "top-1 gating (shared with the core)", 0, 0, NULL},
};
static const moe_option task_opts[] = {
    {"tokens-per-sample", MOE_OPT_INT, "512", "max tokens per sample", 1, 1e9, NULL},
};
static const moe_option gate_opts[] = {
    {"moe-second-expert-policy", MOE_OPT_CHOICE, "sampling", "second expert policy", 0, 0, "sampling|all|random"},
};
static const moe_option crit_opts[] = {
    {"moe-gate-loss-wt", MOE_OPT_FLOAT, "1.0", "gate loss weight", 0, 0, NULL},
    {"moe-gate-loss-combine-method", MOE_OPT_CHOICE, "average", "combine method", 0, 0, "average|sum"},
};
static const moe_option optim_opts[] = {
    {"adam-betas", MOE_OPT_STRING, "(0.9, 0.999)", "betas for Adam", 0, 0, NULL},
    {"fp16-adam-stats", MOE_OPT_FLAG, NULL, "fp16 moments", 0, 0, NULL},
};
static const moe_option sched_opts[] = {
    {"warmup-updates", MOE_OPT_INT, "0", "warmup the learning rate linearly", 0, 1e18, NULL},
};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static void add_component_tables(moe_opts *o)
{
    assert_int_equal(moe_opts_add_table(o, "arch transformer_lm_gpt", arch_opts, N_OF(arch_opts)), MOE_OK);
    assert_int_equal(moe_opts_add_table(o, "task dummy_lm", task_opts, N_OF(task_opts)), MOE_OK);
    assert_int_equal(moe_opts_add_table(o, "gate top2", gate_opts, N_OF(gate_opts)), MOE_OK);
    assert_int_equal(moe_opts_add_table(o, "criterion moe_cross_entropy", crit_opts, N_OF(crit_opts)), MOE_OK);
    assert_int_equal(moe_opts_add_table(o, "optimizer adam", optim_opts, N_OF(optim_opts)), MOE_OK);
    assert_int_equal(moe_opts_add_table(o, "lr_scheduler fixed", sched_opts, N_OF(sched_opts)), MOE_OK);
}

/* The README's two commands, arguments of train.py as written there, with
 * NUM_EXPERTS, TOKENS_PER_SAMPLE and DISTRIBUTED_PORT substituted. */
#define REF_COMMON                                                                                               \
    "--ddp-backend fully_sharded --memory-efficient-fp16 --checkpoint-activations "                             \
    "--task dummy_lm --tokens-per-sample %d "                                                                    \
    "--arch transformer_lm_gpt --share-decoder-input-output-embed "                                              \
    "--decoder-layers %d --decoder-embed-dim %d --decoder-ffn-embed-dim %d "                                     \
    "--decoder-attention-heads 32 "                                                                              \
    "--moe-expert-count %d --moe-freq 2 "                                                                        \
    "--moe-gating-use-fp32 --moe-second-expert-policy all "                                                     \
    "--moe-normalize-expert-grad sqrt_world_size "                                                               \
    "--moe-eval-capacity-token-fraction -1.0 "                                                                   \
    "--max-sentences-valid 1 --num-workers-valid 0 "                                                             \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "                 \
    "--optimizer adam --fp16-adam-stats --adam-betas '(0.9, 0.98)' --clip-norm 0.0 "                             \
    "--lr 0.0005 --warmup-updates 750 "                                                                          \
    "--dropout 0.1 --attention-dropout 0.1 "                                                                     \
    "--batch-size %d --update-freq 1 "                                                                           \
    "--max-update 250 --disable-validation "                                                                     \
    "--log-format json --log-interval 10"

static void reference_command(int multi_node, char *buf, size_t size)
{
    if (multi_node)
        snprintf(buf, size, "--distributed-port 12345 " REF_COMMON, 1024, 32, 4096, 16384, 64, 12);
    else
        snprintf(buf, size, REF_COMMON, 2048, 24, 2048, 8192, 8, 4);
}

/* ------------------------------------------------------------------ tests */

static void test_options_core_defaults(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    assert_int_equal(moe_opts_int(o, "seed"), 1);
    assert_string_equal(moe_opts_str(o, "lr-scheduler"), "fixed");
    assert_string_equal(moe_opts_str(o, "criterion"), "cross_entropy");
    assert_string_equal(moe_opts_str(o, "lr"), "0.25");
    assert_string_equal(moe_opts_str(o, "update-freq"), "1");
    assert_string_equal(moe_opts_str(o, "ddp-backend"), "pytorch_ddp");
    assert_string_equal(moe_opts_str(o, "distributed-backend"), "nccl");
    assert_string_equal(moe_opts_str(o, "moe-normalize-expert-grad"), "world_size");
    assert_string_equal(moe_opts_str(o, "save-dir"), "checkpoints");
    assert_string_equal(moe_opts_str(o, "valid-subset"), "valid");
    assert_int_equal(moe_opts_int(o, "fp16-init-scale"), 128);
    assert_true(moe_opts_float(o, "fp16-init-scale") == 128.0);
    assert_true(moe_opts_float(o, "min-loss-scale") == 1e-4);
    assert_true(moe_opts_float(o, "fp16-scale-tolerance") == 0.0);
    assert_true(moe_opts_float(o, "stop-min-lr") == -1.0);
    assert_int_equal(moe_opts_int(o, "log-interval"), 100);
    assert_int_equal(moe_opts_int(o, "distributed-port"), -1);
    assert_int_equal(moe_opts_int(o, "distributed-rank"), 0);
    assert_int_equal(moe_opts_int(o, "bucket-cap-mb"), 25);
    assert_int_equal(moe_opts_int(o, "num-workers"), 1);
    assert_int_equal(moe_opts_int(o, "num-workers-valid"), 0);
    assert_int_equal(moe_opts_int(o, "required-batch-size-multiple"), 8);
    assert_int_equal(moe_opts_int(o, "validate-interval"), 1);
    assert_int_equal(moe_opts_int(o, "max-update"), 0);
    assert_true(moe_opts_float(o, "clip-norm") == 0.0);
    /* None defaults */
    const char *none[] = {"arch", "optimizer", "moe-gate", "user-dir", "log-format", "fp16-scale-window",
                          "threshold-loss-scale", "distributed-world-size", "distributed-init-method",
                          "batch-size", "max-tokens", "batch-size-valid"};
    for (size_t i = 0; i < sizeof none / sizeof none[0]; i++) {
        assert_true(moe_opts_known(o, none[i]));
        assert_false(moe_opts_has_value(o, none[i]));
        assert_null(moe_opts_str(o, none[i]));
        assert_int_equal(moe_opts_int(o, none[i]), 0);
    }
    /* flags start off and are not "given" */
    const char *flags[] = {"cpu", "fp16", "bf16", "memory-efficient-fp16", "memory-efficient-bf16", "no-progress-bar",
                           "disable-validation", "no-save", "moe-top1-expert", "record-a2a-perf-stats", "dummy-a2a",
                           "list-plugins", "dry-run", "help", "version"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        assert_true(moe_opts_known(o, flags[i]));
        assert_false(moe_opts_flag(o, flags[i]));
        assert_false(moe_opts_given(o, flags[i]));
    }
    assert_true(moe_opts_has_value(o, "seed"));
    assert_false(moe_opts_given(o, "seed"));
    assert_false(moe_opts_known(o, "decoder-layers")); /* the arch's, not the core's */
    moe_opts_destroy(o);
}

static void test_options_core_table_is_consistent(void **state)
{
    (void)state;
    assert_true(moe_core_options_count > 50);
    for (int i = 0; i < moe_core_options_count; i++) {
        for (int j = 0; j < i; j++)
            if (strcmp(moe_core_options[i].name, moe_core_options[j].name) == 0)
                fail_msg("--%s listed twice", moe_core_options[i].name);
        assert_non_null(moe_core_options[i].help);
        assert_true(strlen(moe_core_options[i].help) > 5);
        assert_null(strchr(moe_core_options[i].name, '_'));
        /* components own their flags, the core does not duplicate them */
        const char *component[] = {"decoder-layers", "dropout", "adam-betas", "warmup-updates", "tokens-per-sample",
                                   "moe-expert-count", "moe-second-expert-policy", "moe-gate-loss-wt",
                                   "checkpoint-activations"};
        for (size_t k = 0; k < sizeof component / sizeof component[0]; k++)
            assert_string_not_equal(moe_core_options[i].name, component[k]);
    }
    assert_string_equal(moe_core_option_groups[0].first, moe_core_options[0].name);
    moe_opts *o = fresh(); /* creation validates every default and group */
    for (int a = 0; a < moe_core_option_aliases_count; a++)
        assert_true(moe_opts_known(o, moe_core_option_aliases[a].alias));
    moe_opts_destroy(o);
}

static void test_options_space_and_equals_forms(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--seed 7 --lr=0.0005 --arch transformer_lm_gpt --log-format=json --clip-norm=1e-1 --user-dir=/a=b", 1);
    assert_int_equal(moe_opts_int(o, "seed"), 7);
    assert_string_equal(moe_opts_str(o, "lr"), "0.0005");
    assert_string_equal(moe_opts_str(o, "arch"), "transformer_lm_gpt");
    assert_string_equal(moe_opts_str(o, "log-format"), "json");
    assert_true(moe_opts_float(o, "clip-norm") == 0.1);
    assert_string_equal(moe_opts_str(o, "user-dir"), "/a=b"); /* split at the first '=' only */
    assert_true(moe_opts_given(o, "seed"));
    assert_true(moe_opts_given(o, "lr"));
    assert_false(moe_opts_given(o, "max-update"));
    /* an empty string is a valid STR value */
    ok(o, "--valid-subset=", 1);
    assert_string_equal(moe_opts_str(o, "valid-subset"), "");
    moe_opts_destroy(o);
}

static void test_options_flags(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--cpu --memory-efficient-fp16 --disable-validation", 1);
    assert_true(moe_opts_flag(o, "cpu"));
    assert_true(moe_opts_flag(o, "memory-efficient-fp16"));
    assert_true(moe_opts_given(o, "cpu"));
    assert_true(moe_opts_has_value(o, "cpu"));
    assert_false(moe_opts_flag(o, "fp16"));
    assert_false(moe_opts_has_value(o, "fp16"));
    expect_error(o, "--cpu=yes", 1, "argument --cpu", "expected no value", "flag", "'--cpu=yes'", "give --cpu alone",
                 NULL);
    expect_error(o, "--fp16=", 0, "argument --fp16", "expected no value", NULL);
    moe_opts_destroy(o);
}

static void test_options_int_values(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--seed 0 --max-update 250 --distributed-port -5 --distributed-port=-6", 1);
    assert_int_equal(moe_opts_int(o, "seed"), 0);
    assert_int_equal(moe_opts_int(o, "max-update"), 250);
    assert_int_equal(moe_opts_int(o, "distributed-port"), -6);
    assert_true(moe_opts_float(o, "max-update") == 250.0);
    expect_error(o, "--seed abc", 0, "argument --seed", "expected an integer", "found 'abc'", "(e.g. --seed 1)",
                 NULL);
    expect_error(o, "--max-update 1.5", 1, "argument --max-update", "an integer", "'1.5'", NULL);
    expect_error(o, "--max-update 1e3", 1, "argument --max-update", "an integer", "'1e3'", NULL);
    expect_error(o, "--max-update=", 1, "argument --max-update", "an integer", "found ''", NULL);
    expect_error(o, "--max-update 0x10", 1, "argument --max-update", "'0x10'", NULL);
    expect_error(o, "--max-update 99999999999999999999999", 1, "argument --max-update", "an integer", NULL);
    expect_error(o, "'--distributed-port= 5'", 1, "argument --distributed-port", "an integer", "' 5'", NULL);
    assert_int_equal(moe_opts_int(o, "seed"), 0); /* failed parses leave the value alone */
    moe_opts_destroy(o);
}

static void test_options_float_values(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--min-loss-scale 1e-4 --clip-norm 0.5 --threshold-loss-scale 2 --stop-min-lr -1e-9", 1);
    assert_true(moe_opts_float(o, "min-loss-scale") == 1e-4);
    assert_true(moe_opts_float(o, "clip-norm") == 0.5);
    assert_true(moe_opts_float(o, "threshold-loss-scale") == 2.0);
    assert_true(moe_opts_float(o, "stop-min-lr") == -1e-9);
    assert_int_equal(moe_opts_int(o, "clip-norm"), 0); /* an int read of a float truncates */
    expect_error(o, "--clip-norm abc", 1, "argument --clip-norm", "expected a number", "found 'abc'",
                 "(e.g. --clip-norm 0.0)", NULL);
    expect_error(o, "--clip-norm 1.0.0", 1, "argument --clip-norm", "'1.0.0'", NULL);
    expect_error(o, "--clip-norm 0x1p3", 1, "argument --clip-norm", "'0x1p3'", NULL);
    expect_error(o, "--stop-min-lr 1e999", 1, "argument --stop-min-lr", "a number", NULL);
    moe_opts_destroy(o);
}

static void test_options_range(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--log-interval 1 --fp16-scale-tolerance 1.0 --seed 4294967295", 1);
    expect_error(o, "--log-interval 0", 1, "argument --log-interval", "an integer in [1, 2147483647]", "found '0'", NULL);
    expect_error(o, "--seed -1", 1, "argument --seed", "an integer in [0, 4294967295]", "found '-1'", NULL);
    expect_error(o, "--seed 4294967296", 1, "argument --seed", "[0, 4294967295]", NULL);
    expect_error(o, "--fp16-scale-tolerance 1.5", 1, "argument --fp16-scale-tolerance", "a number in [0, 1]",
                 "found '1.5'", NULL);
    expect_error(o, "--clip-norm -1", 1, "argument --clip-norm", "a number of at least 0", NULL);
    expect_error(o, "--clip-norm nan", 1, "argument --clip-norm", "found 'nan'", NULL);
    expect_error(o, "--batch-size 0", 1, "argument --batch-size", "in [1, ", "(e.g. --batch-size 1)", NULL);
    moe_opts_destroy(o);
}

static void test_options_choices(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--log-format tqdm --ddp-backend fully_sharded --moe-normalize-expert-grad sqrt_world_size", 1);
    assert_string_equal(moe_opts_str(o, "log-format"), "tqdm");
    assert_string_equal(moe_opts_str(o, "ddp-backend"), "fully_sharded");
    expect_error(o, "--log-format jsn", 1, "argument --log-format", "expected one of json, simple, none, tqdm",
                 "found 'jsn'", "(did you mean json?)", NULL);
    expect_error(o, "--ddp-backend fsdp", 0, "argument --ddp-backend",
                 "one of pytorch_ddp, c10d, legacy_ddp, no_c10d, fully_sharded", "found 'fsdp'", NULL);
    expect_error(o, "--moe-normalize-expert-grad sqrt_world", 1, "argument --moe-normalize-expert-grad",
                 "world_size, sqrt_world_size", "(did you mean sqrt_world_size?)", NULL);
    expect_error(o, "--distributed-backend xyz", 1, "argument --distributed-backend", "nccl, mpi, gloo, single",
                 NULL);
    /* no suggestion when nothing is close */
    moe_error_clear();
    assert_int_equal(parse(o, "--ddp-backend zzzzzzzz", 1), MOE_ERR_INVALID_ARG);
    assert_null(strstr(moe_error_message(), "did you mean"));
    moe_error_clear();
    moe_opts_destroy(o);
}

static void test_options_unknown_strict(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    add_component_tables(o);
    expect_error(o, "--moe-expert-cout 8", 1,
                 "unrecognized argument: --moe-expert-cout (did you mean --moe-expert-count?)", NULL);
    expect_error(o, "--moe-expert-cout=8", 1, "unrecognized argument: --moe-expert-cout (did you mean", NULL);
    expect_error(o, "--max_update 5", 1, "unrecognized argument: --max_update", "did you mean --max-update?",
                 "dashes", NULL);
    expect_error(o, "--max-sentence 4", 1, "did you mean --max-sentences?", NULL);
    expect_error(o, "--seeed 3", 1, "did you mean --seed?", NULL);
    moe_error_clear();
    assert_int_equal(parse(o, "--zzzz-qqqq-wwww", 1), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_error_message(), "unrecognized argument: --zzzz-qqqq-wwww"));
    assert_null(strstr(moe_error_message(), "did you mean"));
    assert_non_null(strstr(moe_error_message(), "--help"));
    moe_error_clear();
    expect_error(o, "-x 3", 1, "unrecognized argument: -x", NULL);
    /* the first problem is reported, in command-line order */
    expect_error(o, "--seed 2 --bogus-flag --also-bogus", 1, "--bogus-flag", NULL);
    moe_opts_destroy(o);
}

static void test_options_lenient_skips_unknown(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o,
       "--foo bar --seed 3 --baz --lr 0.1 --qux=1 --neg -1.5 --fp16 -x --decoder-layers 24 "
       "--moe-eval-capacity-token-fraction -1.0 --max-update 9",
       0);
    assert_int_equal(moe_opts_int(o, "seed"), 3);
    assert_string_equal(moe_opts_str(o, "lr"), "0.1");
    assert_true(moe_opts_flag(o, "fp16"));
    assert_int_equal(moe_opts_int(o, "max-update"), 9);
    assert_false(moe_opts_known(o, "foo"));
    assert_false(moe_opts_given(o, "foo"));
    /* a known option's bad value is an error in the lenient pass too */
    expect_error(o, "--unknown 5 --seed x", 0, "argument --seed", NULL);
    /* an unknown flag does not swallow a following flag */
    ok(o, "--unknown-flag --seed 11", 0);
    assert_int_equal(moe_opts_int(o, "seed"), 11);
    moe_opts_destroy(o);
}

static void test_options_last_wins(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--seed 2 --seed 5 --lr 0.1 --lr=0.2 --cpu --cpu", 1);
    assert_int_equal(moe_opts_int(o, "seed"), 5);
    assert_string_equal(moe_opts_str(o, "lr"), "0.2");
    assert_true(moe_opts_flag(o, "cpu"));
    /* parsing the same command again (lenient, then strict) changes nothing */
    ok(o, "--seed 2 --seed 5 --lr 0.1 --lr=0.2 --cpu --cpu", 0);
    assert_int_equal(moe_opts_int(o, "seed"), 5);
    moe_opts_destroy(o);
}

static void test_options_positional(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    /* one bare word is fairseq's DATA; a second is an error */
    expect_error(o, "--seed 3 data-bin more", 1, "unrecognized argument: 'more'", "takes 1 positional argument",
                 NULL);
    expect_error(o, "--cpu 1 data-bin", 1, "unrecognized argument: 'data-bin'", NULL); /* a flag takes no value */
    expect_error(o, "--seed 3 data-bin -- --lr", 1, "unrecognized argument: '--lr'", NULL);
    moe_opts_destroy(o);
    o = fresh();
    ok(o, "data-bin --seed 4", 1);
    assert_int_equal(moe_opts_int(o, "seed"), 4);
    assert_string_equal(moe_opts_str(o, "data"), "data-bin");
    moe_opts_destroy(o);
    o = fresh();
    ok(o, "--seed 6 -- --seed", 1); /* after "--" nothing is a flag */
    assert_int_equal(moe_opts_int(o, "seed"), 6);
    assert_string_equal(moe_opts_str(o, "data"), "--seed");
    moe_opts_destroy(o);

    /* a tool's store: its own name in messages, no core table */
    moe_opts *t = NULL;
    assert_int_equal(moe_opts_create_tool("moelm-x", "[-h] FILE", "does x", &t), MOE_OK);
    static const moe_option topts[] = {{"file", MOE_OPT_STRING, NULL, "FILE", 0, 0, NULL},
                                       {"n", MOE_OPT_INT, "2", "n", 0, 0, NULL}};
    assert_int_equal(moe_opts_add_table(t, "x", topts, 2), MOE_OK);
    assert_int_equal(moe_opts_add_positional(t, "n"), MOE_ERR_INTERNAL); /* not a string option */
    moe_error_clear();
    assert_int_equal(moe_opts_add_positional(t, "file"), MOE_OK);
    expect_error(t, "--seed 1", 1, "unrecognized argument: --seed", "not a flag of moelm-x;", NULL);
    ok(t, "f.txt --n 3", 1);
    assert_string_equal(moe_opts_str(t, "file"), "f.txt");
    assert_int_equal(moe_opts_int(t, "n"), 3);
    moe_opts_destroy(t);
}

static void test_options_help_and_version(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "-h", 1);
    assert_true(moe_opts_flag(o, "help"));
    moe_opts_destroy(o);
    o = fresh();
    ok(o, "--help --version --list-plugins --dry-run", 1);
    assert_true(moe_opts_flag(o, "help"));
    assert_true(moe_opts_flag(o, "version"));
    assert_true(moe_opts_flag(o, "list-plugins"));
    assert_true(moe_opts_flag(o, "dry-run"));
    moe_opts_destroy(o);
}

static void test_options_missing_value(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    expect_error(o, "--seed", 0, "argument --seed", "expected one value", "the end of the command line",
                 "give --seed INT", NULL);
    expect_error(o, "--lr --seed 3", 1, "argument --lr", "expected one value", "found the flag '--seed'", NULL);
    expect_error(o, "--arch -h", 1, "argument --arch", "found the flag '-h'", NULL);
    /* a negative number is a value, not a flag */
    ok(o, "--distributed-port -1 --stop-min-lr -0.5", 1);
    assert_true(moe_opts_float(o, "stop-min-lr") == -0.5);
    moe_opts_destroy(o);
}

static void test_options_aliases(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--max-sentences 4 --max-sentences-valid 1", 1);
    assert_int_equal(moe_opts_int(o, "batch-size"), 4);
    assert_int_equal(moe_opts_int(o, "max-sentences"), 4);
    assert_int_equal(moe_opts_int(o, "batch-size-valid"), 1);
    assert_int_equal(moe_opts_int(o, "max-sentences-valid"), 1);
    assert_true(moe_opts_given(o, "batch-size"));
    assert_true(moe_opts_given(o, "max-sentences"));
    assert_true(moe_opts_known(o, "max-sentences"));
    ok(o, "--batch-size=8", 1); /* one value under both names: last wins */
    assert_int_equal(moe_opts_int(o, "max-sentences"), 8);
    expect_error(o, "--max-sentences x", 1, "argument --max-sentences", "an integer", NULL);
    assert_int_equal(moe_opts_set(o, "max-sentences", "2"), MOE_OK);
    assert_int_equal(moe_opts_int(o, "batch-size"), 2);
    moe_opts_destroy(o);
}

static void test_options_add_table(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    add_component_tables(o);
    assert_true(moe_opts_known(o, "decoder-layers"));
    assert_int_equal(moe_opts_int(o, "decoder-layers"), 12);
    assert_true(moe_opts_float(o, "moe-eval-capacity-token-fraction") == 0.25);
    /* the same table again, and a shared name of the same type: fine */
    assert_int_equal(moe_opts_add_table(o, "task dummy_lm", task_opts, N_OF(task_opts)), MOE_OK);
    static const moe_option shared[] = {
        {"weight-decay", MOE_OPT_FLOAT, "0.0", "weight decay", 0, 0, NULL},
        {"tokens-per-sample", MOE_OPT_INT, "1024", "another default", 0, 0, NULL},
    };
    assert_int_equal(moe_opts_add_table(o, "optimizer sgd", shared, 2), MOE_OK);
    assert_int_equal(moe_opts_int(o, "tokens-per-sample"), 512); /* the first definition stays */

    /* a clash of types names both owners and is atomic: nothing of the table is added */
    static const moe_option clash[] = {
        {"brand-new", MOE_OPT_INT, "1", "new", 0, 0, NULL},
        {"decoder-layers", MOE_OPT_STRING, "x", "clash", 0, 0, NULL},
    };
    expect_message(moe_opts_add_table(o, "arch other", clash, 2), MOE_ERR_PLUGIN, "--decoder-layers", "arch other",
                   "STR", "arch transformer_lm_gpt", "INT", NULL);
    assert_false(moe_opts_known(o, "brand-new"));
    static const moe_option clash_core[] = {{"seed", MOE_OPT_STRING, NULL, "x", 0, 0, NULL}};
    expect_message(moe_opts_add_table(o, "task x", clash_core, 1), MOE_ERR_PLUGIN, "--seed", "common", NULL);

    static const moe_option bad_default[] = {{"layers", MOE_OPT_INT, "many", "x", 0, 0, NULL}};
    expect_message(moe_opts_add_table(o, "arch bad", bad_default, 1), MOE_ERR_PLUGIN, "arch bad", "--layers",
                   "default 'many'", "an integer", NULL);
    static const moe_option bad_range[] = {{"p", MOE_OPT_FLOAT, "2", "x", 0, 1, NULL}};
    expect_message(moe_opts_add_table(o, "arch bad", bad_range, 1), MOE_ERR_PLUGIN, "--p", "in [0, 1]", NULL);
    static const moe_option bad_choice[] = {{"pol", MOE_OPT_CHOICE, "c", "x", 0, 0, "a|b"}};
    expect_message(moe_opts_add_table(o, "gate bad", bad_choice, 1), MOE_ERR_PLUGIN, "--pol", "one of a, b", NULL);
    static const moe_option no_choices[] = {{"pol", MOE_OPT_CHOICE, NULL, "x", 0, 0, NULL}};
    expect_message(moe_opts_add_table(o, "gate bad", no_choices, 1), MOE_ERR_PLUGIN, "--pol", "without choices",
                   NULL);
    static const moe_option bad_name[] = {{"--dashes", MOE_OPT_INT, NULL, "x", 0, 0, NULL}};
    expect_message(moe_opts_add_table(o, "task bad", bad_name, 1), MOE_ERR_PLUGIN, "task bad", "\"--dashes\"",
                   NULL);
    static const moe_option underscore[] = {{"local_rank", MOE_OPT_INT, NULL, "x", 0, 0, NULL}};
    expect_message(moe_opts_add_table(o, "task bad", underscore, 1), MOE_ERR_PLUGIN, "local_rank", NULL);
    static const moe_option twice[] = {
        {"k", MOE_OPT_INT, NULL, "x", 0, 0, NULL},
        {"k", MOE_OPT_FLAG, NULL, "x", 0, 0, NULL},
    };
    expect_message(moe_opts_add_table(o, "task bad", twice, 2), MOE_ERR_PLUGIN, "lists --k twice", NULL);
    static const moe_option bad_flag[] = {{"f", MOE_OPT_FLAG, "maybe", "x", 0, 0, NULL}};
    expect_message(moe_opts_add_table(o, "task bad", bad_flag, 1), MOE_ERR_PLUGIN, "--f", "default 'maybe'", NULL);
    assert_false(moe_opts_known(o, "k"));

    /* a flag on by default, and an empty table */
    static const moe_option on_flag[] = {{"on-by-default", MOE_OPT_FLAG, "1", "x", 0, 0, NULL}};
    assert_int_equal(moe_opts_add_table(o, "task extra", on_flag, 1), MOE_OK);
    assert_true(moe_opts_flag(o, "on-by-default"));
    assert_int_equal(moe_opts_add_table(o, "task empty", NULL, 0), MOE_OK);
    moe_opts_destroy(o);
}

static void test_options_set(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    assert_int_equal(moe_opts_set(o, "fp16", "1"), MOE_OK);
    assert_true(moe_opts_flag(o, "fp16"));
    assert_true(moe_opts_given(o, "fp16"));
    assert_int_equal(moe_opts_set(o, "fp16", "0"), MOE_OK);
    assert_false(moe_opts_flag(o, "fp16"));
    assert_int_equal(moe_opts_set(o, "fp16-scale-window", "2048"), MOE_OK);
    assert_int_equal(moe_opts_int(o, "fp16-scale-window"), 2048);
    assert_true(moe_opts_given(o, "fp16-scale-window"));
    assert_int_equal(moe_opts_set(o, "fp16-scale-window", NULL), MOE_OK);
    assert_false(moe_opts_has_value(o, "fp16-scale-window"));
    expect_message(moe_opts_set(o, "fp16-scale-window", "big"), MOE_ERR_INVALID_ARG, "--fp16-scale-window",
                   "an integer in [1, 2147483647]", "'big'", NULL);
    expect_message(moe_opts_set(o, "fp16", "yes"), MOE_ERR_INVALID_ARG, "--fp16", "1 or 0", NULL);
    expect_message(moe_opts_set(o, "no-such-option", "1"), MOE_ERR_INTERNAL, "--no-such-option", NULL);
    moe_opts_destroy(o);
}

static void test_options_float_list(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    add_component_tables(o);
    double v[4];
    int n;
    const struct {
        const char *text;
        int n;
        double a, b;
    } good[] = {
        {"(0.9, 0.98)", 2, 0.9, 0.98}, {"[0.9,0.98]", 2, 0.9, 0.98}, {"0.9,0.98", 2, 0.9, 0.98},
        {"  ( 0.9 ,0.98 ) ", 2, 0.9, 0.98}, {"(0.5,)", 1, 0.5, 0}, {"0.5", 1, 0.5, 0},
        {"1e-3, -2", 2, 1e-3, -2}, {"()", 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        assert_int_equal(moe_opts_set(o, "adam-betas", good[i].text), MOE_OK);
        moe_status st = moe_opts_float_list(o, "adam-betas", v, 4, &n);
        if (st != MOE_OK)
            fail_msg("'%s': %s", good[i].text, moe_error_message());
        assert_int_equal(n, good[i].n);
        if (n > 0)
            assert_true(v[0] == good[i].a);
        if (n > 1)
            assert_true(v[1] == good[i].b);
    }
    const char *bad[] = {"(0.9; 0.98)", "(0.9, 0.98", "0.9 0.98", "(a, b)", "", "(0.9,,0.98)", "((0.9))",
                         "(0.9)]", "0.9,0.98)"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(moe_opts_set(o, "adam-betas", bad[i]), MOE_OK); /* a STR value */
        moe_error_clear();
        assert_int_equal(moe_opts_float_list(o, "adam-betas", v, 4, &n), MOE_ERR_INVALID_ARG);
        if (!strstr(moe_error_message(), "argument --adam-betas: expected a list of numbers"))
            fail_msg("'%s': %s", bad[i], moe_error_message());
        assert_non_null(strstr(moe_error_message(), bad[i]));
        assert_int_equal(n, 0);
        moe_error_clear();
    }
    assert_int_equal(moe_opts_set(o, "adam-betas", "(0.9, 0.98, 0.1)"), MOE_OK);
    expect_message(moe_opts_float_list(o, "adam-betas", v, 2, &n), MOE_ERR_INVALID_ARG, "--adam-betas",
                   "at most 2 numbers", "found 3", NULL);
    /* None is an empty list; --lr and --update-freq are lists too */
    assert_int_equal(moe_opts_float_list(o, "user-dir", v, 4, &n), MOE_OK);
    assert_int_equal(n, 0);
    ok(o, "--lr 0.1,0.05", 1);
    assert_int_equal(moe_opts_float_list(o, "lr", v, 4, &n), MOE_OK);
    assert_int_equal(n, 2);
    assert_true(v[1] == 0.05);
    expect_message(moe_opts_float_list(o, "not-an-option", v, 4, &n), MOE_ERR_INTERNAL, "--not-an-option", NULL);
    moe_opts_destroy(o);
}

static void test_options_edit_distance(void **state)
{
    (void)state;
    assert_int_equal(moe_edit_distance("", ""), 0);
    assert_int_equal(moe_edit_distance("abc", ""), 3);
    assert_int_equal(moe_edit_distance("", "ab"), 2);
    assert_int_equal(moe_edit_distance("moe-expert-cout", "moe-expert-count"), 1);
    assert_int_equal(moe_edit_distance("kitten", "sitting"), 3);
    assert_int_equal(moe_edit_distance("flaw", "lawn"), 2);
    assert_int_equal(moe_edit_distance("same", "same"), 0);
    assert_int_equal(moe_edit_distance("top1", "top2"), 1);
}

static int count_lines_starting(const char *text, const char *prefix)
{
    int n = 0;
    for (const char *line = text; line && *line;) {
        n += strncmp(line, prefix, strlen(prefix)) == 0;
        line = strchr(line, '\n');
        line = line ? line + 1 : NULL;
    }
    return n;
}

static void test_options_print_help(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    add_component_tables(o);
    char *text = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&text, &size);
    assert_non_null(f);
    moe_opts_print_help(o, f);
    fclose(f);
    assert_true(strncmp(text, "usage: moelm-train", 18) == 0);
    const char *needles[] = {
        "\ncommon:\n", "\ndistributed training:\n", "\ndataset:\n", "\noptimization:\n",
        "\narch transformer_lm_gpt:\n", "\ncriterion moe_cross_entropy:\n", "  -h, --help",
        "  --seed INT", "(default: 1)", "  --log-format {json,simple,none,tqdm}",
        "  --batch-size, --max-sentences INT", "  --batch-size-valid, --max-sentences-valid INT",
        "  --clip-norm FLOAT", "  --lr STR", "(default: 0.25)", "  --cpu ", "(default: fixed)",
        "  --decoder-layers INT", "  --moe-second-expert-policy {sampling,all,random}", "(default: sampling)",
        "top1 when --moe-top1-expert", "(default: None)",
    };
    for (size_t i = 0; i < sizeof needles / sizeof needles[0]; i++)
        if (!strstr(text, needles[i]))
            fail_msg("help lacks \"%s\":\n%s", needles[i], text);
    /* flags show no default; a help text that states its default is not given a second one */
    assert_null(strstr(text, "use CPU instead of CUDA (default"));
    assert_null(strstr(text, "all visible GPUs) (default"));
    /* the shared option appears once, under its first owner */
    assert_int_equal(count_lines_starting(text, "  --moe-top1-expert "), 1);
    assert_int_equal(count_lines_starting(text, "  --seed "), 1);
    /* no line is wider than the wrap width unless one word is */
    for (const char *line = text; *line;) {
        const char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (len > 100 && memchr(line, ' ', len) && strncmp(line, "usage:", 6) != 0)
            fail_msg("help line too wide: %.*s", (int)len, line);
        line = nl ? nl + 1 : line + len;
    }
    free(text);
    moe_opts_destroy(o);
}

static void test_options_reference_commands(void **state)
{
    (void)state;
    char cmd[4096];
    for (int multi = 0; multi < 2; multi++) {
        reference_command(multi, cmd, sizeof cmd);
        /* phase one: the core alone reads its flags and skips the components' */
        moe_opts *o = fresh();
        ok(o, cmd, 0);
        assert_string_equal(moe_opts_str(o, "arch"), "transformer_lm_gpt");
        assert_string_equal(moe_opts_str(o, "task"), "dummy_lm");
        assert_string_equal(moe_opts_str(o, "criterion"), "moe_cross_entropy");
        assert_string_equal(moe_opts_str(o, "optimizer"), "adam");
        assert_string_equal(moe_opts_str(o, "ddp-backend"), "fully_sharded");
        assert_string_equal(moe_opts_str(o, "moe-normalize-expert-grad"), "sqrt_world_size");
        assert_true(moe_opts_flag(o, "memory-efficient-fp16"));
        assert_true(moe_opts_flag(o, "disable-validation"));
        assert_int_equal(moe_opts_int(o, "batch-size"), multi ? 12 : 4);
        assert_int_equal(moe_opts_int(o, "batch-size-valid"), 1);
        assert_int_equal(moe_opts_int(o, "max-update"), 250);
        assert_int_equal(moe_opts_int(o, "log-interval"), 10);
        assert_int_equal(moe_opts_int(o, "distributed-port"), multi ? 12345 : -1);
        assert_string_equal(moe_opts_str(o, "lr"), "0.0005");
        assert_string_equal(moe_opts_str(o, "log-format"), "json");
        assert_true(moe_opts_float(o, "clip-norm") == 0.0);
        /* without the component tables the strict pass names the first component flag */
        expect_error(o, cmd, 1, "unrecognized argument: --checkpoint-activations", NULL);

        /* phase two: with the components' tables everything is known */
        add_component_tables(o);
        ok(o, cmd, 0);
        ok(o, cmd, 1);
        assert_int_equal(moe_opts_int(o, "decoder-layers"), multi ? 32 : 24);
        assert_int_equal(moe_opts_int(o, "decoder-embed-dim"), multi ? 4096 : 2048);
        assert_int_equal(moe_opts_int(o, "moe-expert-count"), multi ? 64 : 8);
        assert_int_equal(moe_opts_int(o, "tokens-per-sample"), multi ? 1024 : 2048);
        assert_int_equal(moe_opts_int(o, "warmup-updates"), 750);
        assert_true(moe_opts_float(o, "moe-eval-capacity-token-fraction") == -1.0);
        assert_true(moe_opts_float(o, "moe-gate-loss-wt") == 0.01);
        assert_string_equal(moe_opts_str(o, "moe-gate-loss-combine-method"), "sum");
        assert_string_equal(moe_opts_str(o, "moe-second-expert-policy"), "all");
        assert_true(moe_opts_flag(o, "fp16-adam-stats"));
        assert_true(moe_opts_flag(o, "share-decoder-input-output-embed"));
        double betas[2];
        int n;
        assert_int_equal(moe_opts_float_list(o, "adam-betas", betas, 2, &n), MOE_OK);
        assert_int_equal(n, 2);
        assert_true(betas[0] == 0.9 && betas[1] == 0.98);
        moe_opts_destroy(o);
    }
}

/* An integer read of a number past int64 saturates instead of converting
 * out of range (undefined; the option fuzzer found it with --lr). */
static void test_options_int_of_huge_number_saturates(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    ok(o, "--lr 77009123563345811836470", 1);
    assert_true(moe_opts_int(o, "lr") == INT64_MAX);
    ok(o, "--lr -1e30", 1);
    assert_true(moe_opts_int(o, "lr") == INT64_MIN);
    ok(o, "--lr 2.9", 1);
    assert_true(moe_opts_int(o, "lr") == 2);
    moe_opts_destroy(o);
}

static void test_options_getters_on_unknown_names(void **state)
{
    (void)state;
    moe_opts *o = fresh();
    /* a bug in the caller: logged, answered as None */
    assert_false(moe_opts_known(o, "not-registered"));
    assert_false(moe_opts_given(o, "not-registered"));
    assert_false(moe_opts_has_value(o, "not-registered"));
    assert_int_equal(moe_opts_int(o, "not-registered"), 0);
    assert_true(moe_opts_float(o, "not-registered") == 0.0);
    assert_false(moe_opts_flag(o, "not-registered"));
    assert_null(moe_opts_str(o, "not-registered"));
    assert_false(moe_opts_known(o, NULL));
    moe_opts_destroy(o);
    moe_opts_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_options_core_defaults),
        cmocka_unit_test(test_options_core_table_is_consistent),
        cmocka_unit_test(test_options_space_and_equals_forms),
        cmocka_unit_test(test_options_flags),
        cmocka_unit_test(test_options_int_values),
        cmocka_unit_test(test_options_float_values),
        cmocka_unit_test(test_options_range),
        cmocka_unit_test(test_options_choices),
        cmocka_unit_test(test_options_unknown_strict),
        cmocka_unit_test(test_options_lenient_skips_unknown),
        cmocka_unit_test(test_options_last_wins),
        cmocka_unit_test(test_options_positional),
        cmocka_unit_test(test_options_help_and_version),
        cmocka_unit_test(test_options_missing_value),
        cmocka_unit_test(test_options_aliases),
        cmocka_unit_test(test_options_add_table),
        cmocka_unit_test(test_options_set),
        cmocka_unit_test(test_options_float_list),
        cmocka_unit_test(test_options_int_of_huge_number_saturates),
        cmocka_unit_test(test_options_edit_distance),
        cmocka_unit_test(test_options_print_help),
        cmocka_unit_test(test_options_reference_commands),
        cmocka_unit_test(test_options_getters_on_unknown_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
