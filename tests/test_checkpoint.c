/* test_checkpoint.c: checkpoints, run as a user would (CPU backend).
 *  - a run stopped and resumed logs the same updates, field for field, as an
 *    uninterrupted one: fp32 (across an epoch boundary, resumed from an
 *    end-of-epoch checkpoint), fp16 (loss scaler, fp16 Adam moments), and
 *    fully sharded on 2 MPI ranks (per-rank files of shards and masters);
 *  - fairseq's names, interval checkpoints pruned by --keep-interval-updates;
 *  - truncated and corrupted files are refused (size, checksums); so are a
 *    different dtype or model shape (another world size resumes: 2 ranks'
 *    fully sharded files on one);
 *  - a temporary file left by a crash while saving does not stop the last good
 *    checkpoint from loading; --no-save writes nothing. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "runcmd.h"

/* the task: dummy_lm, or language_modeling over a corpus the test writes */
#define DUMMY_TASK "--task dummy_lm --tokens-per-sample 32 --dict-size 96 --batch-size 2 "
static char task_args[512] = DUMMY_TASK;

#define TINY                                                                                                     \
    "--cpu --arch transformer_lm_gpt --share-decoder-input-output-embed "                                              \
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "          \
    "--moe-expert-count 2 --moe-freq 2 --moe-second-expert-policy all "                                         \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "                 \
    "--lr 0.002 --warmup-updates 4 "                                                                             \
    "--dropout 0.1 --attention-dropout 0.1 --disable-validation "                                                \
    "--log-format json --log-interval 1 "

/* the optimizer unless `extra` names one */
static const char *optimizer_of(const char *extra)
{
    return strstr(extra, "--optimizer ") ? "" : "--optimizer adam --adam-betas '(0.9, 0.98)' ";
}

static int have_mpirun;

static void tmpdir(char *out, size_t n)
{
    snprintf(out, n, "/tmp/moelm-ckpt-XXXXXX");
    assert_non_null(mkdtemp(out));
}

static void rmdir_all(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static int exists(const char *dir, const char *name)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return access(p, F_OK) == 0;
}

/* runs moelm-train (on `ranks` MPI ranks when > 1) with TINY, `extra` and --save-dir dir */
static void train(int ranks, const char *dir, const char *extra, moe_cmd_result *r)
{
    char args[4096];
    if (ranks > 1) {
        snprintf(args, sizeof args, "mpirun --oversubscribe -np %d %s/moelm-train %s" TINY "%s--save-dir %s %s", ranks,
                 MOE_TEST_BIN_DIR, task_args, optimizer_of(extra), dir, extra);
        assert_int_equal(moe_run_shell(args, r), 0);
    } else {
        snprintf(args, sizeof args, "%s" TINY "%s--save-dir %s %s", task_args, optimizer_of(extra), dir, extra);
        assert_int_equal(moe_run_train(args, r), 0);
    }
}

static void train_ok(int ranks, const char *dir, const char *extra, moe_cmd_result *r)
{
    train(ranks, dir, extra, r);
    if (r->status != 0)
        fail_msg("moelm-train %s failed:\n%s\n%s", extra, r->out, r->err);
}

/* the values that must match, of the train_inner line of update `u`, as
 * logged (text); "" when there is no such line */
static void update_fields(const char *out, int u, char *dst, size_t n)
{
    static const char *const keys[] = {"epoch", "loss", "moe_gate_loss", "inner_loss", "num_updates",
                                       "lr",    "gnorm", "loss_scale"};
    dst[0] = '\0';
    char want[64];
    snprintf(want, sizeof want, "\"num_updates\": \"%d\"", u);
    for (const char *p = strstr(out, "| train_inner | "); p; p = strstr(p + 1, "| train_inner | ")) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        const char *hit = strstr(p, want);
        if (!hit || hit > p + len)
            continue;
        size_t w = 0;
        for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
            char pat[64];
            snprintf(pat, sizeof pat, "\"%s\": ", keys[k]);
            const char *q = strstr(p, pat);
            if (!q || q > p + len)
                continue;
            const char *v = q + strlen(pat);
            const char *end = strpbrk(v, ",}");
            w += (size_t)snprintf(dst + w, n - w, "%s=%.*s ", keys[k], (int)(end - v), v);
        }
        return;
    }
}

/* updates from..to of `resumed` equal those of `full`, which logs them all */
static void expect_same_updates(const char *full, const char *resumed, int from, int to)
{
    for (int u = from; u <= to; u++) {
        char a[1024], b[1024];
        update_fields(full, u, a, sizeof a);
        update_fields(resumed, u, b, sizeof b);
        if (!a[0])
            fail_msg("update %d missing from the uninterrupted run", u);
        if (strcmp(a, b) != 0)
            fail_msg("update %d:\n  uninterrupted %s\n  resumed       %s", u, a, b);
    }
    /* the resumed run starts after its checkpoint */
    char b[1024];
    update_fields(resumed, from - 1, b, sizeof b);
    assert_string_equal(b, "");
}

/* 12 updates in one go, saving every 6, against a run stopped at `stop` and resumed to 12 */
static void resume_matches(int ranks, const char *extra, int stop, const char *const *files_after_stop, int nfiles)
{
    char d1[64], d2[64], a1[1024], a2[1024];
    tmpdir(d1, sizeof d1);
    tmpdir(d2, sizeof d2);
    moe_cmd_result full, part, rest;
    snprintf(a1, sizeof a1, "%s --max-update 12 --save-interval-updates 6", extra);
    train_ok(ranks, d1, a1, &full);
    assert_non_null(strstr(full.out, "| fairseq.trainer | No existing checkpoint found "));
    /* the interval checkpoint at update 6, in whichever epoch that falls */
    int epoch6 = 0;
    char saved[256];
    for (int e = 1; e <= 6 && !epoch6; e++) {
        snprintf(saved, sizeof saved,
                 "| saved checkpoint %s/checkpoint_%d_6-rank-0.pt (epoch %d @ 6 updates, score None) (writing took ",
                 d1, e, e);
        if (strstr(full.out, saved))
            epoch6 = e;
    }
    if (!epoch6)
        fail_msg("no interval checkpoint at update 6 logged");
    assert_true(exists(d1, "checkpoint_last-rank-0.pt"));
    for (int r = 0; r < ranks; r++) {
        char name[64];
        snprintf(name, sizeof name, "checkpoint_%d_6-rank-%d.pt", epoch6, r);
        assert_true(exists(d1, name));
    }

    snprintf(a2, sizeof a2, "%s --max-update %d", extra, stop);
    train_ok(ranks, d2, a2, &part);
    for (int i = 0; i < nfiles; i++)
        if (!exists(d2, files_after_stop[i]))
            fail_msg("%s missing after the run stopped at %d", files_after_stop[i], stop);
    snprintf(a2, sizeof a2, "%s --max-update 12", extra);
    train_ok(ranks, d2, a2, &rest);
    char loaded[256];
    snprintf(loaded, sizeof loaded, "| fairseq.trainer | loaded checkpoint %s/checkpoint_last-rank-0.pt (epoch ", d2);
    assert_non_null(strstr(rest.out, loaded));
    expect_same_updates(full.out, part.out, 1, stop);
    expect_same_updates(full.out, rest.out, stop + 1, 12);
    assert_int_equal(moe_count_lines(rest.out, "| train_inner | "), 12 - stop);
    moe_cmd_result_free(&full);
    moe_cmd_result_free(&part);
    moe_cmd_result_free(&rest);
    rmdir_all(d1);
    rmdir_all(d2);
}

/* fp32, 8 batches an epoch: stopped at the end of epoch 1 (checkpoint1 and
 * checkpoint_last, resumed into epoch 2) and stopped mid-epoch */
static void test_ckpt_resume_fp32(void **s)
{
    (void)s;
    static const char *const at8[] = {"checkpoint1-rank-0.pt", "checkpoint_last-rank-0.pt"};
    resume_matches(1, "--dataset-size 16", 8, at8, 2);
    static const char *const at6[] = {"checkpoint_last-rank-0.pt"};
    resume_matches(1, "--dataset-size 16", 6, at6, 1);
}

/* fp16 with fp32 masters, fp16 Adam moments and a loss scale that overflows
 * at first and grows every 3 updates: all of it must come back */
static void test_ckpt_resume_fp16(void **s)
{
    (void)s;
    static const char *const at6[] = {"checkpoint_last-rank-0.pt"};
    resume_matches(1, "--fp16 --fp16-adam-stats --fp16-init-scale 4096 --fp16-scale-window 3", 6, at6, 1);
    resume_matches(1, "--memory-efficient-fp16 --fp16-adam-stats --fp16-scale-window 3", 5, at6, 1);
}

/* whether buf[0..n) holds the bytes of s */
static int holds(const char *buf, size_t n, const char *s)
{
    const size_t k = strlen(s);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(buf + i, s, k) == 0)
            return 1;
    return 0;
}

/* a shared expert beside 16 fine-grained experts resumes exactly, and the
 * checkpoint names its tensors decoder.layers.1.moe_layer.shared_expert.* */
static void test_ckpt_resume_shared_expert(void **s)
{
    (void)s;
    static const char *const at6[] = {"checkpoint_last-rank-0.pt"};
    const char *extra = "--moe-expert-count 16 --moe-expert-ffn-dim 8 --moe-shared-expert-ffn-dim 24";
    resume_matches(1, extra, 6, at6, 1);
    char d[64], path[512], args[512];
    tmpdir(d, sizeof d);
    moe_cmd_result r;
    snprintf(args, sizeof args, "%s --max-update 1", extra);
    train_ok(1, d, args, &r);
    moe_cmd_result_free(&r);
    snprintf(path, sizeof path, "%s/checkpoint_last-rank-0.pt", d);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    static char buf[1 << 21];
    const size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    static const char *const names[] = {"decoder.layers.1.moe_layer.shared_expert.fc1.weight",
                                        "decoder.layers.1.moe_layer.shared_expert.fc1.bias",
                                        "decoder.layers.1.moe_layer.shared_expert.fc2.weight",
                                        "decoder.layers.1.moe_layer.shared_expert.fc2.bias"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!holds(buf, n, names[i]))
            fail_msg("%s does not name %s", path, names[i]);
    rmdir_all(d);
}

/* sgd's momentum buffers come back too */
static void test_ckpt_resume_sgd_momentum(void **s)
{
    (void)s;
    static const char *const at6[] = {"checkpoint_last-rank-0.pt"};
    resume_matches(1, "--optimizer sgd --momentum 0.9", 6, at6, 1);
}

/* --task language_modeling over a text of 400 pseudo-random lines (every 9th
 * empty), prepared by moelm-preprocess: a resumed run continues with exactly
 * the batches of an unbroken one, mid-epoch and across epoch boundaries
 * (each epoch shuffles its batches), with --update-freq groups cut short at
 * an epoch's end, with --max-tokens batches of varying shape, and on 2 ranks
 * with the experts spread over them (steps padded to a common shape, empty
 * batches past a rank's share) */
static void test_ckpt_resume_language_modeling(void **s)
{
    (void)s;
    char d[64], cmd[1024];
    tmpdir(d, sizeof d);
    char text[128];
    snprintf(text, sizeof text, "%s/corpus.txt", d);
    FILE *f = fopen(text, "w");
    assert_non_null(f);
    uint32_t x = 12345;
    for (int line = 0; line < 400; line++) {
        if (line % 9 == 8) {
            fputc('\n', f);
            continue;
        }
        x = x * 1103515245u + 12345u;
        int words = 1 + (int)((x >> 16) % 17);
        for (int w = 0; w < words; w++) {
            x = x * 1103515245u + 12345u;
            fprintf(f, "%sw%u", w ? " " : "", (x >> 16) % 60u);
        }
        fputc('\n', f);
    }
    fclose(f);
    moe_cmd_result r;
    snprintf(cmd, sizeof cmd,
             "%s/moelm-preprocess --only-source --trainpref %s --validpref %s --destdir %s/data-bin >/dev/null",
             MOE_TEST_BIN_DIR, text, text, d);
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status != 0)
        fail_msg("moelm-preprocess failed: %s", r.err);
    moe_cmd_result_free(&r);

    snprintf(task_args, sizeof task_args,
             "--task language_modeling %s/data-bin --tokens-per-sample 32 --required-batch-size-multiple 1 ", d);
    static const char *const last[] = {"checkpoint_last-rank-0.pt"};
    /* 3535 tokens: 111 blocks of 32 (the last 15), 10 batches of at most 12 */
    resume_matches(1, "--batch-size 12", 5, last, 1);  /* mid-epoch 1 */
    resume_matches(1, "--batch-size 12", 10, last, 1); /* at the end of epoch 1 */
    resume_matches(1, "--batch-size 8 --update-freq 3", 7, last, 1); /* 14 batches: updates of 3,3,3,3,2 */
    resume_matches(1, "--max-tokens 100 --sample-break-mode complete", 7, last, 1);
    if (have_mpirun) {
        /* one block per line: 13 batches of up to 31, 7 steps an epoch, rank 1's 7th empty */
        static const char *const last2[] = {"checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt"};
        resume_matches(2, "--batch-size 31 --sample-break-mode eos --tokens-per-sample 40", 5, last2, 2);
    } else {
        printf("SKIP (2 ranks): mpirun not found\n");
    }
    snprintf(task_args, sizeof task_args, DUMMY_TASK);
    rmdir_all(d);
}

/* 2 ranks, fully sharded: each rank writes and reads its shards */
static void test_ckpt_resume_fully_sharded_2(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    static const char *const at6[] = {"checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt"};
    resume_matches(2, "--ddp-backend fully_sharded --fp16 --fp16-adam-stats --dropout 0 --attention-dropout 0", 6,
                   at6, 2);

    /* those files on one rank: another world size resumes from them */
    char d[64];
    tmpdir(d, sizeof d);
    moe_cmd_result r;
    train_ok(2, d, "--ddp-backend fully_sharded --max-update 2", &r);
    moe_cmd_result_free(&r);
    train_ok(1, d, "--ddp-backend fully_sharded --max-update 4", &r);
    assert_non_null(strstr(r.out, "(epoch 1 @ 2 updates)"));
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 2);
    moe_cmd_result_free(&r);
    rmdir_all(d);
}

static void expect_refused(const char *dir, const char *extra, const char *needle)
{
    moe_cmd_result r;
    train(1, dir, extra, &r);
    if (r.status == 0 || strncmp(r.err, "moelm-train: error: ", 20) != 0 || !strstr(r.err, needle))
        fail_msg("expected a refusal with '%s', got status %d:\n%s", needle, r.status, r.err);
    assert_int_equal(moe_count_lines(r.err, "error"), 1);
    moe_cmd_result_free(&r);
}

static void patch_file(const char *path, long offset, const void *bytes, size_t n)
{
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, offset, SEEK_SET), 0);
    assert_int_equal(fwrite(bytes, 1, n, f), n);
    fclose(f);
}

static long file_size(const char *path)
{
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    return (long)sb.st_size;
}

static void copy_file(const char *from, const char *to)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", from, to);
    assert_int_equal(system(cmd), 0);
}

/* damaged files and other runs' files are refused with one line */
static void test_ckpt_refuses_bad_files(void **s)
{
    (void)s;
    char d[64], last[128], good[128];
    tmpdir(d, sizeof d);
    snprintf(last, sizeof last, "%s/checkpoint_last-rank-0.pt", d);
    snprintf(good, sizeof good, "%s/good.bin", d);
    moe_cmd_result r;
    train_ok(1, d, "--max-update 2", &r);
    moe_cmd_result_free(&r);
    copy_file(last, good);
    long size = file_size(last);

    /* one flipped byte in the parameters */
    unsigned char b;
    FILE *f = fopen(last, "rb");
    assert_non_null(f);
    fseek(f, size / 2, SEEK_SET);
    assert_int_equal(fread(&b, 1, 1, f), 1);
    fclose(f);
    b ^= 0x10;
    patch_file(last, size / 2, &b, 1);
    expect_refused(d, "--max-update 4", "is corrupt: checksum mismatch");

    /* cut short */
    copy_file(good, last);
    assert_int_equal(truncate(last, size - 100), 0);
    expect_refused(d, "--max-update 4", "is truncated or damaged");

    /* not a checkpoint */
    copy_file(good, last);
    patch_file(last, 0, "NOTACKPT", 8);
    expect_refused(d, "--max-update 4", "is not a moelm checkpoint");

    /* a header field changed (the world size, offset 24): the header's checksum */
    copy_file(good, last);
    uint32_t two = 2;
    patch_file(last, 24, &two, 4);
    expect_refused(d, "--max-update 4", "is corrupt: checksum mismatch in its header");

    /* another precision, another shape, another optimizer state */
    copy_file(good, last);
    expect_refused(d, "--max-update 4 --fp16", "holds fp32 parameters and fp32 gradients, this run fp16 and fp16");
    expect_refused(d, "--max-update 4 --decoder-embed-dim 64", "a different model shape");
    expect_refused(d, "--max-update 4 --fp16-adam-stats", "bytes of adam state");

    /* the good file still loads (and --reset-optimizer skips the optimizer check) */
    train_ok(1, d, "--max-update 3 --fp16-adam-stats --reset-optimizer", &r);
    assert_non_null(strstr(r.out, "loaded checkpoint"));
    moe_cmd_result_free(&r);
    rmdir_all(d);
}

/* a crash while saving leaves <name>.tmp beside the last good file: loading
 * ignores it, and the next save replaces it */
static void test_ckpt_leftover_temporary(void **s)
{
    (void)s;
    char d[64], tmp[128];
    tmpdir(d, sizeof d);
    moe_cmd_result r;
    train_ok(1, d, "--max-update 3", &r);
    moe_cmd_result_free(&r);
    snprintf(tmp, sizeof tmp, "%s/checkpoint_last-rank-0.pt.tmp", d);
    FILE *f = fopen(tmp, "wb");
    assert_non_null(f);
    fputs("MOELMCKP half a checkpoint", f);
    fclose(f);
    train_ok(1, d, "--max-update 5", &r);
    assert_non_null(strstr(r.out, "(epoch 1 @ 3 updates)"));
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 2);
    assert_false(exists(d, "checkpoint_last-rank-0.pt.tmp"));
    moe_cmd_result_free(&r);
    train_ok(1, d, "--max-update 6", &r);
    assert_non_null(strstr(r.out, "(epoch 1 @ 5 updates)"));
    moe_cmd_result_free(&r);
    rmdir_all(d);
}

/* --keep-interval-updates 2 keeps the two newest interval checkpoints;
 * --no-epoch-checkpoints and --no-last-checkpoints drop theirs */
static void test_ckpt_names_and_pruning(void **s)
{
    (void)s;
    char d[64];
    tmpdir(d, sizeof d);
    moe_cmd_result r;
    train_ok(1, d, "--dataset-size 16 --max-update 12 --save-interval-updates 2 --keep-interval-updates 2", &r);
    moe_cmd_result_free(&r);
    /* 8 batches an epoch: checkpoint_1_2, _1_4, _1_6, checkpoint1 (the end of
     * epoch 1 at update 8), checkpoint_2_10, checkpoint_2_12 */
    static const char *const gone[] = {"checkpoint_1_2-rank-0.pt", "checkpoint_1_4-rank-0.pt",
                                       "checkpoint_1_6-rank-0.pt", "checkpoint_1_8-rank-0.pt"};
    static const char *const kept[] = {"checkpoint1-rank-0.pt", "checkpoint_2_10-rank-0.pt",
                                       "checkpoint_2_12-rank-0.pt", "checkpoint_last-rank-0.pt"};
    for (size_t i = 0; i < sizeof gone / sizeof gone[0]; i++)
        if (exists(d, gone[i]))
            fail_msg("%s should have been removed", gone[i]);
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        if (!exists(d, kept[i]))
            fail_msg("%s missing", kept[i]);
    rmdir_all(d);

    tmpdir(d, sizeof d);
    train_ok(1, d, "--dataset-size 16 --max-update 10 --no-epoch-checkpoints --no-last-checkpoints", &r);
    assert_false(exists(d, "checkpoint1-rank-0.pt"));
    assert_false(exists(d, "checkpoint_last-rank-0.pt"));
    assert_int_equal(moe_count_lines(r.out, "saved checkpoint"), 0);
    moe_cmd_result_free(&r);
    rmdir_all(d);
}

/* --no-save: no directory, no file, no line */
static void test_ckpt_no_save(void **s)
{
    (void)s;
    char d[64], sub[96];
    tmpdir(d, sizeof d);
    snprintf(sub, sizeof sub, "%s/ckpts", d);
    moe_cmd_result r;
    train_ok(1, sub, "--max-update 4 --save-interval-updates 2 --no-save", &r);
    assert_int_equal(moe_count_lines(r.out, "saved checkpoint"), 0);
    assert_int_equal(access(sub, F_OK), -1);
    moe_cmd_result_free(&r);
    /* and without it, the directory is made */
    train_ok(1, sub, "--max-update 4 --save-interval-updates 2", &r);
    assert_int_equal(moe_count_lines(r.out, "saved checkpoint"), 2);
    assert_true(exists(sub, "checkpoint_1_2-rank-0.pt"));
    moe_cmd_result_free(&r);
    rmdir_all(d);
}

int main(void)
{
    have_mpirun = moe_mpirun_prepare();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ckpt_resume_fp32),       cmocka_unit_test(test_ckpt_resume_fp16),
        cmocka_unit_test(test_ckpt_resume_fully_sharded_2), cmocka_unit_test(test_ckpt_refuses_bad_files),
        cmocka_unit_test(test_ckpt_leftover_temporary), cmocka_unit_test(test_ckpt_names_and_pruning),
        cmocka_unit_test(test_ckpt_no_save),          cmocka_unit_test(test_ckpt_resume_sgd_momentum),
        cmocka_unit_test(test_ckpt_resume_language_modeling),
        cmocka_unit_test(test_ckpt_resume_shared_expert),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
