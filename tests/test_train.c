/* test_train.c: whole trainings on the CPU backend, run as a user would.
 *  - a tiny reference-shaped MoE model learns dummy_lm: the first logged loss
 *    is above the uniform log2(V) (FAIRSEQ_SPEC.md §4.5) and the loss falls by
 *    at least half within a few hundred updates; every §8 field is present;
 *  - two identical runs (dropout on) give identical logs apart from timing;
 *  - --optimizer-overlap (units stepped as their backward finishes) logs the
 *    same updates as the step after the backward, and is refused where it
 *    would not be exact;
 *  - the reference precision flags (memory-efficient fp16, fp16 Adam moments,
 *    activation checkpointing) train too, with the loss scale logged;
 *  - the general top-k router (k = 4, sigmoid, z-loss, per-sequence loss,
 *    groups, expert bias) learns, logs z_loss and the expert loads, and its
 *    bias survives a checkpoint: a resumed run logs the same updates;
 *  - expert-choice routing trains: no gate loss, and the loss falls by half;
 *  - a shared expert with 16 fine-grained experts trains, and the logged
 *    parameter counts are the hand formula's. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "runcmd.h"
#include "tmpdir.h"

#define TINY                                                                                                     \
    "--cpu --task dummy_lm --tokens-per-sample 64 --dict-size 996 "                                              \
    "--arch transformer_lm_gpt --share-decoder-input-output-embed "                                              \
    "--decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 256 --decoder-attention-heads 4 "         \
    "--moe-expert-count 4 --moe-freq 2 --moe-gating-use-fp32 --moe-second-expert-policy all "                   \
    "--moe-normalize-expert-grad sqrt_world_size --moe-eval-capacity-token-fraction -1.0 "                      \
    "--max-sentences-valid 1 --num-workers-valid 0 "                                                             \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "                 \
    "--optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0 "                                               \
    "--dropout 0.1 --attention-dropout 0.1 --batch-size 4 --update-freq 1 --disable-validation "                 \
    "--log-format json --log-interval 10 --no-save "

static const char *const fields[] = {
    "\"epoch\": 1",       "\"update\": ",          "\"loss\": ",                  "\"moe_gate_loss\": ",
    "\"overflow_expert1\": ", "\"overflow_expert2\": ", "\"entropy_gating\": ",   "\"expert1_balance_top\": ",
    "\"expert1_balance_bottom\": ", "\"unused_expert1_count\": ", "\"expert2_balance_top\": ",
    "\"expert2_balance_bottom\": ", "\"unused_expert2_count\": ", "\"all_to_all_cpu_time_ms\": ",
    "\"all_to_all_cuda_time_ms\": ", "\"inner_loss\": ", "\"ppl\": ", "\"wps\": ", "\"ups\": ", "\"wpb\": \"256\"",
    "\"bsz\": \"4\"", "\"num_updates\": ", "\"lr\": ", "\"gnorm\": ", "\"train_wall\": ", "\"cuda_gb_allocated\": ",
    "\"cuda_gb_reserved\": ", "\"cuda_gb_free\": ", "\"wall\": "};

/* "loss": "12.345" of the n-th train_inner line */
static double loss_of_line(const char *out, int n)
{
    const char *p = out;
    for (int i = 0; i <= n; i++) {
        p = strstr(p, "| train_inner | ");
        if (!p)
            return NAN;
        p++;
    }
    const char *q = strstr(p, "\"loss\": \"");
    return q ? atof(q + 9) : NAN;
}

static void test_train_tiny_model_learns(void **state)
{
    (void)state;
    moe_cmd_result r;
    assert_int_equal(moe_run_train(TINY "--lr 0.005 --warmup-updates 50 --max-update 150", &r), 0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 15);
    const char *first = strstr(r.out, "| train_inner | ");
    assert_non_null(first);
    const char *eol = strchr(first, '\n');
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        const char *hit = strstr(first, fields[i]);
        if (!hit || hit > eol)
            fail_msg("field %s missing from %.*s", fields[i], (int)(eol - first), first);
    }
    double l0 = loss_of_line(r.out, 0), l_last = loss_of_line(r.out, 14);
    double uniform = log2(1000.0);
    fprintf(stderr, "first loss %.3f, last loss %.3f (uniform %.3f)\n", l0, l_last, uniform);
    assert_true(l0 > uniform);
    assert_true(l_last < 0.5 * l0);
    assert_non_null(strstr(r.out, "| train | {\"epoch\": 1, \"train_loss\": "));
    assert_non_null(strstr(r.out, "done training in"));
    moe_cmd_result_free(&r);
}

static void test_train_expert_choice_learns(void **state)
{
    (void)state;
    moe_cmd_result r;
    assert_int_equal(moe_run_train("--cpu --task dummy_lm --tokens-per-sample 64 --dict-size 996 "
                                   "--arch transformer_lm_gpt --share-decoder-input-output-embed "
                                   "--decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 128 "
                                   "--decoder-attention-heads 4 --moe-expert-count 4 --moe-freq 2 "
                                   "--moe-gate expert_choice --moe-expert-capacity-factor 1.5 "
                                   "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 "
                                   "--optimizer adam --clip-norm 0.0 --dropout 0.1 --batch-size 4 "
                                   "--disable-validation --log-format json --log-interval 10 --no-save "
                                   "--lr 0.005 --warmup-updates 20 --max-update 60",
                                   &r),
                     0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 6);
    assert_non_null(strstr(r.out, "\"moe_gate_loss\": \"0\""));
    double l0 = loss_of_line(r.out, 0), l_last = loss_of_line(r.out, 5);
    fprintf(stderr, "expert choice: first loss %.3f, last loss %.3f\n", l0, l_last);
    assert_true(l_last < 0.5 * l0);
    moe_cmd_result_free(&r);
}

/* "num. <kind> model params: N" as logged */
static long params_of(const char *out, const char *kind)
{
    char pat[64];
    snprintf(pat, sizeof pat, "num. %s model params: ", kind);
    const char *p = strstr(out, pat);
    assert_non_null(p);
    long v = 0;
    for (p += strlen(pat); *p && *p != ' '; p++)
        if (*p >= '0' && *p <= '9')
            v = v * 10 + (*p - '0');
    return v;
}

/* d = 32, 2 layers (layer 1 MoE), FFN 64, V = 104 (96 + 8 dummy_lm
 * specials), tied embedding; 16 experts of width 8, shared expert width 24:
 *   non-expert: embedding 104*32 = 3328, final norm 64, per layer attention
 *     4*32*32 + 4*32 = 4224 and two norms 128; dense FFN 2*32*64 + 64 + 32 =
 *     4192; gate 16*32 = 512; shared expert 2*32*24 + 24 + 32 = 1592:
 *     3392 + 2*4352 + 4192 + 512 + 1592 = 18392
 *   expert: 16 * (2*32*8 + 8 + 32) = 8832 */
static void test_train_shared_expert_fine_grained(void **state)
{
    (void)state;
    moe_cmd_result r;
    assert_int_equal(moe_run_train("--cpu --task dummy_lm --tokens-per-sample 32 --dict-size 96 --batch-size 4 "
                                   "--arch transformer_lm_gpt --share-decoder-input-output-embed "
                                   "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 "
                                   "--decoder-attention-heads 2 --moe-expert-count 16 --moe-freq 2 "
                                   "--moe-expert-ffn-dim 8 --moe-shared-expert-ffn-dim 24 "
                                   "--moe-second-expert-policy all --criterion moe_cross_entropy "
                                   "--moe-gate-loss-wt 0.01 --optimizer adam --clip-norm 0.0 --dropout 0.1 "
                                   "--disable-validation --log-format json --log-interval 10 --no-save "
                                   "--lr 0.005 --warmup-updates 20 --max-update 60",
                                   &r),
                     0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    assert_int_equal(params_of(r.out, "non-expert"), 18392);
    assert_int_equal(params_of(r.out, "expert"), 8832);
    double l0 = loss_of_line(r.out, 0), l_last = loss_of_line(r.out, 5);
    fprintf(stderr, "shared expert: first loss %.3f, last loss %.3f\n", l0, l_last);
    assert_true(l_last < 0.5 * l0);
    moe_cmd_result_free(&r);
}

/* drop the values of timing fields, the timestamps and the total time
 * (in place; the result is shorter) */
static void strip_timing(char *s)
{
    static const char *const timing[] = {"\"wps\": \"", "\"ups\": \"", "_wall\": \"", "\"wall\": \"",
                                         "\"train_wps\": \"", "\"train_ups\": \"", "done training in "};
    char *w = s;
    for (const char *r = s; *r;) {
        /* timestamp at the start of a line: "YYYY-MM-DD HH:MM:SS" */
        if ((r == s || r[-1] == '\n') && strlen(r) > 19 && r[4] == '-' && r[13] == ':') {
            r += 19;
            continue;
        }
        int skipped = 0;
        for (size_t k = 0; k < sizeof timing / sizeof timing[0] && !skipped; k++) {
            size_t n = strlen(timing[k]);
            if (strncmp(r, timing[k], n) == 0) {
                memmove(w, r, n);
                w += n;
                r += n;
                while (*r && *r != '"' && *r != '\n')
                    r++;
                skipped = 1;
            }
        }
        if (!skipped)
            *w++ = *r++;
    }
    *w = '\0';
}

static void test_train_identical_runs_identical_logs(void **state)
{
    (void)state;
    moe_cmd_result a, b;
    const char *args = TINY "--lr 0.003 --warmup-updates 5 --max-update 20 --log-interval 5";
    assert_int_equal(moe_run_train(args, &a), 0);
    assert_int_equal(moe_run_train(args, &b), 0);
    assert_int_equal(a.status, 0);
    assert_int_equal(b.status, 0);
    strip_timing(a.out);
    strip_timing(b.out);
    assert_string_equal(a.out, b.out);
    moe_cmd_result_free(&a);
    moe_cmd_result_free(&b);
}

/* --optimizer-overlap steps each unit as its backward finishes it: the same
 * updates as the step after the backward (fp32 and bf16, dropout on), and a
 * setting under which it would not be exact is refused with one line */
static void test_train_optimizer_overlap(void **state)
{
    (void)state;
    const char *modes[] = {"", "--bf16 "};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        char plain[2048], overlap[2100];
        snprintf(plain, sizeof plain, TINY "--lr 0.003 --warmup-updates 5 --max-update 12 --log-interval 1 %s",
                 modes[i]);
        snprintf(overlap, sizeof overlap, "%s--optimizer-overlap", plain);
        moe_cmd_result a, b;
        assert_int_equal(moe_run_train(plain, &a), 0);
        assert_int_equal(moe_run_train(overlap, &b), 0);
        if (b.status != 0)
            fail_msg("%s failed:\n%s\n%s", overlap, b.out, b.err);
        assert_int_equal(a.status, 0);
        assert_int_equal(moe_count_lines(b.out, "| train_inner | "), 12);
        strip_timing(a.out);
        strip_timing(b.out);
        assert_string_equal(a.out, b.out);
        moe_cmd_result_free(&a);
        moe_cmd_result_free(&b);
    }
    const struct {
        const char *flags, *expect;
    } refused[] = {
        {"--update-freq 2", "--optimizer-overlap: expected --update-freq 1"},
        {"--clip-norm 1.0", "--optimizer-overlap: expected --clip-norm 0"},
        {"--fp16", "--optimizer-overlap: expected no loss scaling"},
        {"--bf16 --fp16-adam-stats", "--optimizer-overlap: expected fp32 Adam moments"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        char args[2048];
        snprintf(args, sizeof args, TINY "--lr 0.003 --max-update 2 --optimizer-overlap %s", refused[i].flags);
        moe_cmd_result r;
        assert_int_equal(moe_run_train(args, &r), 0);
        assert_int_not_equal(r.status, 0);
        if (!strstr(r.err, refused[i].expect))
            fail_msg("%s: expected '%s' in:\n%s", refused[i].flags, refused[i].expect, r.err);
        moe_cmd_result_free(&r);
    }
}

static void test_train_reference_precision_flags(void **state)
{
    (void)state;
    moe_cmd_result r;
    assert_int_equal(moe_run_train(TINY "--memory-efficient-fp16 --fp16-adam-stats --checkpoint-activations "
                                        "--ddp-backend fully_sharded --lr 0.003 --warmup-updates 5 --max-update 20",
                                   &r),
                     0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 2);
    assert_int_equal(moe_count_lines(r.out, "\"loss_scale\": "), 2);
    moe_cmd_result_free(&r);
}

/* every precision mode trains on the CPU backend, with gradient accumulation */
static void test_train_precision_modes(void **state)
{
    (void)state;
    const char *modes[] = {"--fp16", "--bf16", "--memory-efficient-bf16", "--update-freq 2"};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        char args[2048];
        snprintf(args, sizeof args, TINY "--lr 0.003 --warmup-updates 2 --max-update 10 %s", modes[i]);
        moe_cmd_result r;
        assert_int_equal(moe_run_train(args, &r), 0);
        if (r.status != 0)
            fail_msg("%s failed:\n%s\n%s", modes[i], r.out, r.err);
        double l = loss_of_line(r.out, 0);
        if (!(l > 0 && l < 20))
            fail_msg("%s: first loss %f", modes[i], l);
        assert_int_equal(moe_count_lines(r.out, "\"loss_scale\": "), strstr(modes[i], "fp16") ? 1 : 0);
        moe_cmd_result_free(&r);
    }
}

/* fp16 gradients overflow at a loss scale of 2^16 (the target's dlogit is
 * scale * (p - 1)): fairseq's NOTE line at each halving, then the minimum
 * loss scale stops the run with fairseq's message. */
static void test_train_loss_scaler_overflow_and_minimum(void **state)
{
    (void)state;
    moe_cmd_result r;
    assert_int_equal(moe_run_train(TINY "--memory-efficient-fp16 --fp16-init-scale 1048576 --min-loss-scale 65536 "
                                        "--lr 0.003 --warmup-updates 2 --max-update 10",
                                   &r),
                     0);
    assert_true(r.status != 0);
    assert_non_null(strstr(r.out, "| fairseq.trainer | NOTE: gradient overflow detected, ignoring gradient, "
                                  "setting loss scale to: 524288.0"));
    assert_non_null(strstr(r.out, "setting loss scale to: 131072.0"));
    assert_non_null(strstr(r.err, "Minimum loss scale reached"));
    moe_cmd_result_free(&r);
}

/* the general top-k router with all it does: k = 4 of 8 experts, sigmoid
 * scores, z-loss, the per-sequence loss, groups, the expert bias */
#define TOPK                                                                                                     \
    "--cpu --task dummy_lm --tokens-per-sample 32 --dict-size 996 "                                              \
    "--arch transformer_lm_gpt --share-decoder-input-output-embed "                                              \
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 4 "         \
    "--moe-expert-count 8 --moe-freq 2 --moe-gate topk --moe-router-topk 4 --moe-router-score-function sigmoid " \
    "--moe-z-loss-coeff 0.001 --moe-aux-loss-type seq --moe-router-num-groups 4 --moe-router-group-topk 2 "      \
    "--moe-router-enable-expert-bias --moe-router-bias-update-rate 0.01 --moe-eval-capacity-token-fraction -1.0 " \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "                 \
    "--optimizer adam --lr 0.005 --clip-norm 0.0 --dropout 0.1 --batch-size 4 --disable-validation "           \
    "--log-format json --log-interval 5 --log-expert-load --max-update 40 "                                      \
    "--save-interval-updates 20 --no-epoch-checkpoints "

/* the train_inner lines of `out` from the n-th on, timing stripped */
static char *inner_lines_from(const char *out, int n)
{
    const char *p = strstr(out, "| train_inner | ");
    for (int i = 0; i < n && p; i++)
        p = strstr(p + 1, "| train_inner | ");
    assert_non_null(p);
    size_t len = 0;
    char *r = malloc(strlen(p) + 1);
    assert_non_null(r);
    for (const char *q = p; q; q = strstr(q + 1, "| train_inner | ")) {
        size_t k = strcspn(q, "\n");
        memcpy(r + len, q, k);
        len += k;
        r[len++] = '\n';
    }
    r[len] = '\0';
    strip_timing(r);
    return r;
}

/* It learns and logs z_loss and the expert loads; the bias moves, is saved,
 * and a run resumed from the checkpoint logs the same updates afterwards. */
static void test_train_topk_router(void **state)
{
    (void)state;
    char dir[128], args[2048], cmd[512];
    assert_int_equal(moe_test_mkdtemp(dir, sizeof dir, "topk"), 0);
    moe_cmd_result a, b, info;
    snprintf(args, sizeof args, TOPK "--save-dir %s", dir);
    assert_int_equal(moe_run_train(args, &a), 0);
    if (a.status != 0)
        fprintf(stderr, "%s\n%s\n", a.out, a.err);
    assert_int_equal(a.status, 0);
    assert_int_equal(moe_count_lines(a.out, "| train_inner | "), 8);
    assert_int_equal(moe_count_lines(a.out, "| expert_load | decoder.layers.1: "), 8);
    const char *z = strstr(strstr(a.out, "| train_inner | "), "\"z_loss\": \"");
    assert_non_null(z);
    assert_true(atof(z + 11) > 0.0);
    double l0 = loss_of_line(a.out, 0), l_last = loss_of_line(a.out, 7);
    fprintf(stderr, "topk: first loss %.3f, last loss %.3f\n", l0, l_last);
    assert_true(l_last < 0.75 * l0);

    /* the bias left zero by now would mean no update ran */
    snprintf(cmd, sizeof cmd, "%s/moelm-checkpoint info %s/checkpoint_1_20.pt", MOE_TEST_BIN_DIR, dir);
    assert_int_equal(moe_run_shell(cmd, &info), 0);
    assert_int_equal(info.status, 0);
    const char *bias = strstr(info.out, "decoder.layers.1.moe_layer.gate.expert_bias [8] fp32, min ");
    assert_non_null(bias);
    double lo = 0.0, hi = 0.0;
    assert_int_equal(sscanf(bias, "decoder.layers.1.moe_layer.gate.expert_bias [8] fp32, min %lf, max %lf", &lo, &hi),
                     2);
    assert_true(lo < 0.0 && hi > 0.0);

    snprintf(args, sizeof args, TOPK "--save-dir %s --restore-file checkpoint_1_20.pt", dir);
    assert_int_equal(moe_run_train(args, &b), 0);
    assert_int_equal(b.status, 0);
    assert_int_equal(moe_count_lines(b.out, "| train_inner | "), 4);
    char *after_a = inner_lines_from(a.out, 4), *after_b = inner_lines_from(b.out, 0);
    assert_string_equal(after_a, after_b);
    free(after_a);
    free(after_b);
    moe_cmd_result_free(&a);
    moe_cmd_result_free(&b);
    moe_cmd_result_free(&info);
    assert_int_equal(moe_test_rmtree(dir), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_tiny_model_learns),
        cmocka_unit_test(test_train_topk_router),
        cmocka_unit_test(test_train_identical_runs_identical_logs),
        cmocka_unit_test(test_train_optimizer_overlap),
        cmocka_unit_test(test_train_reference_precision_flags),
        cmocka_unit_test(test_train_precision_modes),
        cmocka_unit_test(test_train_loss_scaler_overflow_and_minimum),
        cmocka_unit_test(test_train_expert_choice_learns),
        cmocka_unit_test(test_train_shared_expert_fine_grained),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
