/* test_checkpoint_tool.c: checkpoints across world sizes and moelm-checkpoint,
 * run as a user would (CPU backend; MPI ranks where mpirun is installed, the
 * parts that need it skipped and said so otherwise).
 *  - reshard and consolidate round trips give the same bytes: 1 -> 2 -> 4
 *    (fully sharded) -> 1 with fp32 Adam, 1 -> 2 -> 1 with fp16 moments
 *    (whole tensors), 2 ranks fully sharded -> one file -> 2 ranks, 2 ranks
 *    with fp16 moments -> one file -> 2 ranks, 1 -> 3 with padded shards;
 *  - fp16 moments cut anew follow the kernel's scale rule, element for
 *    element;
 *  - training resumes from another world size: 1 rank from 2 ranks' files
 *    (resharded and trained ones), 4 ranks from 2 ranks' resharded files, a
 *    consolidated file; the losses are the unbroken run's (1e-3 relative,
 *    dropout 0); the layout reshard writes is the one moelm-train writes;
 *  - info and --json (num_params = the training log's two counts);
 *  - export: safetensors read back by a reader written here (header JSON,
 *    dtypes, shapes, contiguous offsets, data equal to the checkpoint's own
 *    bytes), F16 conversion, config.json, and python's safetensors when it
 *    is installed;
 *  - the library calls a session makes: the stored command line, the
 *    parameters loaded into a runtime of another world size and precision;
 *  - bad input refused with one line and nothing written. */
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
#include <jansson.h>

#include "core/checkpoint.h"
#include "core/internal.h"
#include "core/runtime.h"
#include "kernels/half.h"
#include "runcmd.h"

#define TINY                                                                                                     \
    "--cpu --task dummy_lm --tokens-per-sample 32 --dict-size 96 --batch-size 2 "                                \
    "--arch transformer_lm_gpt --share-decoder-input-output-embed "                                              \
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 "          \
    "--moe-expert-count 2 --moe-freq 2 --moe-second-expert-policy all "                                         \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "                 \
    "--optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.002 --warmup-updates 4 "                                \
    "--dropout 0 --attention-dropout 0 --disable-validation --log-format json --log-interval 1 "

#define TOOL MOE_TEST_BIN_DIR "/moelm-checkpoint"

static int have_mpirun;

static void tmpdir(char *out, size_t n)
{
    snprintf(out, n, "/tmp/moelm-ckpt-tool-XXXXXX");
    assert_non_null(mkdtemp(out));
}

static void rmdir_all(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static int exists(const char *path) { return access(path, F_OK) == 0; }

static void train_ok(int ranks, const char *dir, const char *extra, moe_cmd_result *r)
{
    char cmd[4096];
    if (ranks > 1)
        snprintf(cmd, sizeof cmd, "mpirun --oversubscribe -np %d %s/moelm-train " TINY "--save-dir %s %s", ranks,
                 MOE_TEST_BIN_DIR, dir, extra);
    else
        snprintf(cmd, sizeof cmd, "%s/moelm-train " TINY "--save-dir %s %s", MOE_TEST_BIN_DIR, dir, extra);
    assert_int_equal(moe_run_shell(cmd, r), 0);
    if (r->status != 0)
        fail_msg("moelm-train on %d rank(s) %s failed:\n%s\n%s", ranks, extra, r->out, r->err);
}

static void train_quiet(int ranks, const char *dir, const char *extra)
{
    moe_cmd_result r;
    train_ok(ranks, dir, extra, &r);
    moe_cmd_result_free(&r);
}

static void tool(const char *args, moe_cmd_result *r)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s %s", TOOL, args);
    assert_int_equal(moe_run_shell(cmd, r), 0);
}

static void tool_ok(const char *fmt, ...)
{
    char args[3000];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    moe_cmd_result r;
    tool(args, &r);
    if (r.status != 0)
        fail_msg("moelm-checkpoint %s failed:\n%s%s", args, r.out, r.err);
    moe_cmd_result_free(&r);
}

static void expect_same_file(const char *a, const char *b)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "cmp -s '%s' '%s'", a, b);
    if (system(cmd) != 0)
        fail_msg("%s and %s differ", a, b);
}

/* the "loss" of the train_inner line of update u (NAN when absent) */
static double loss_at(const char *out, int u)
{
    char want[64];
    snprintf(want, sizeof want, "\"num_updates\": \"%d\"", u);
    for (const char *p = strstr(out, "| train_inner | "); p; p = strstr(p + 1, "| train_inner | ")) {
        const char *eol = strchr(p, '\n');
        const char *hit = strstr(p, want), *l = strstr(p, "\"loss\": \"");
        if (hit && (!eol || hit < eol) && l && (!eol || l < eol))
            return atof(l + 9);
    }
    return NAN;
}

static void expect_losses_close(const char *full, const char *resumed, int from, int to)
{
    for (int u = from; u <= to; u++) {
        double a = loss_at(full, u), b = loss_at(resumed, u);
        if (isnan(a) || isnan(b) || fabs(a - b) > 1e-3 * fabs(a))
            fail_msg("update %d: loss %g unbroken, %g resumed", u, a, b);
    }
    assert_true(isnan(loss_at(resumed, from - 1)));
}

static json_t *info_json(const char *ckpt)
{
    char args[1024];
    snprintf(args, sizeof args, "info %s --json", ckpt);
    moe_cmd_result r;
    tool(args, &r);
    if (r.status != 0)
        fail_msg("info --json %s: %s", ckpt, r.err);
    json_error_t e;
    json_t *j = json_loads(r.out, 0, &e);
    if (!j)
        fail_msg("info --json is not JSON (%s): %s", e.text, r.out);
    moe_cmd_result_free(&r);
    return j;
}

/* the units' names and pieces of an info --json object, as text */
static char *layout_text(json_t *info)
{
    json_t *units = json_object_get(info, "units");
    json_t *slim = json_array();
    size_t i;
    json_t *u;
    json_array_foreach(units, i, u)
    {
        json_t *x = json_object();
        json_object_set(x, "name", json_object_get(u, "name"));
        json_object_set(x, "pieces", json_object_get(u, "pieces"));
        json_array_append_new(slim, x);
    }
    char *s = json_dumps(slim, JSON_COMPACT);
    json_decref(slim);
    return s;
}

/* "num. non-expert model params: 16,352 (num. trained: ...)" + the expert line */
static int64_t logged_params(const char *out)
{
    int64_t sum = 0;
    const char *keys[2] = {"num. non-expert model params: ", "num. expert model params: "};
    for (int k = 0; k < 2; k++) {
        const char *p = strstr(out, keys[k]);
        assert_non_null(p);
        int64_t v = 0;
        for (p += strlen(keys[k]); (*p >= '0' && *p <= '9') || *p == ','; p++)
            if (*p != ',')
                v = v * 10 + (*p - '0');
        sum += v;
    }
    return sum;
}

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    b[len] = 0;
    *n = (size_t)len;
    return b;
}

/* The data of a world-1 fp32 checkpoint file read straight from its bytes:
 * unit u's section starts where the footer's table says (section u + 1),
 * its parameters first. */
static const float *unit_params(const unsigned char *file, size_t size, int unit)
{
    uint32_t nsec;
    memcpy(&nsec, file + size - 32, 4);
    const unsigned char *table = file + size - 32 - (size_t)nsec * 24;
    uint64_t off;
    memcpy(&off, table + 24 * (size_t)(unit + 1), 8);
    return (const float *)(file + off);
}

/* a section of a checkpoint file, found through its footer's table */
static const unsigned char *section_of(const unsigned char *file, size_t size, int sec, uint64_t *len)
{
    uint32_t nsec;
    memcpy(&nsec, file + size - 32, 4);
    assert_true(sec < (int)nsec);
    const unsigned char *table = file + size - 32 - (size_t)nsec * 24;
    uint64_t off;
    memcpy(&off, table + 24 * (size_t)sec, 8);
    memcpy(len, table + 24 * (size_t)sec + 8, 8);
    return file + off;
}

/* fp16 moments of a unit cut anew: each piece's scale is the kernel's rule
 * over the piece (1e-8 + max|m| / 65504) and each moment m / scale rounded,
 * m the source's dequantized moment (fp16 parameters, fp32 masters: section
 * = 2n + 4n, then exp_avg and exp_avg_sq of n fp16, then 2 fp32 scales) */
static void expect_requantized(const char *src_path, const char *dst_path, int sec, int64_t numel, int64_t start,
                               int64_t n)
{
    size_t sn, dn;
    unsigned char *src = slurp(src_path, &sn), *dst = slurp(dst_path, &dn);
    uint64_t sl, dl;
    const unsigned char *a = section_of(src, sn, sec, &sl), *b = section_of(dst, dn, sec, &dl);
    assert_true(sl == (uint64_t)numel * 10u + 8u && dl == (uint64_t)n * 10u + 8u);
    for (int f = 0; f < 2; f++) {
        const unsigned char *af = a + (size_t)numel * (6 + 2 * f), *bf = b + (size_t)n * (6 + 2 * f);
        float s0, s1;
        memcpy(&s0, a + (size_t)numel * 10 + 4 * f, 4);
        memcpy(&s1, b + (size_t)n * 10 + 4 * f, 4);
        float mx = 0.0f;
        for (int64_t i = start; i < start + n && i < numel; i++) {
            uint16_t h;
            memcpy(&h, af + 2 * i, 2);
            float m = fabsf(moe_f16_to_f32(h) * s0);
            mx = m > mx ? m : mx;
        }
        assert_true(s1 == 1e-8f + mx / 65504.0f);
        for (int64_t i = start; i < start + n; i++) {
            uint16_t h = 0, g;
            if (i < numel)
                memcpy(&h, af + 2 * i, 2);
            memcpy(&g, bf + 2 * (i - start), 2);
            uint16_t want = i < numel ? moe_f32_to_f16(moe_f16_to_f32(h) * s0 / s1) : 0;
            if (g != want)
                fail_msg("%s section %d field %d element %lld: %04x, expected %04x", dst_path, sec, f, (long long)i, g,
                         want);
        }
    }
    free(src);
    free(dst);
}

/* ----------------------------------------------------------- round trips */

/* 1 -> 2 -> 4 (fully sharded) -> 1: the same bytes; moelm-train on one rank
 * resumes from the 2 and 4 ranks' files as from its own */
static void test_ckpt_tool_round_trip_1_2_4_1(void **s)
{
    (void)s;
    char d[64], a[128], b[128], last[160], back[160];
    tmpdir(d, sizeof d);
    snprintf(a, sizeof a, "%s/one", d);
    train_quiet(1, a, "--max-update 3");
    snprintf(last, sizeof last, "%s/checkpoint_last-rank-0.pt", a);
    tool_ok("reshard %s/checkpoint_last.pt --world-size 2 --out %s/two", a, d);
    tool_ok("reshard %s/two/checkpoint_last.pt --world-size 4 --ddp-backend fully_sharded --out %s/four", d, d);
    tool_ok("reshard %s/four/checkpoint_last.pt --world-size 1 --out %s/back", d, d);
    snprintf(back, sizeof back, "%s/back/checkpoint_last-rank-0.pt", d);
    expect_same_file(last, back);
    tool_ok("consolidate %s/four/checkpoint_last.pt --out %s/model.pt", d, d);
    snprintf(back, sizeof back, "%s/model.pt", d);
    expect_same_file(last, back);

    /* training continues from each as from the unbroken run */
    moe_cmd_result full, r;
    snprintf(b, sizeof b, "%s/full", d);
    train_ok(1, b, "--max-update 6", &full);
    const char *from[] = {"two", "four"};
    for (int i = 0; i < 2; i++) {
        char dir[160];
        snprintf(dir, sizeof dir, "%s/%s", d, from[i]);
        train_ok(1, dir, "--max-update 6", &r);
        assert_non_null(strstr(r.out, "(epoch 1 @ 3 updates)"));
        for (int u = 4; u <= 6; u++)
            if (loss_at(r.out, u) != loss_at(full.out, u))
                fail_msg("resumed from %s: update %d loss %g, unbroken %g", from[i], u, loss_at(r.out, u),
                         loss_at(full.out, u));
        moe_cmd_result_free(&r);
    }
    /* and from a consolidated file named by --restore-file */
    char extra[300];
    snprintf(extra, sizeof extra, "--max-update 6 --restore-file %s/model.pt", d);
    snprintf(b, sizeof b, "%s/from-file", d);
    train_ok(1, b, extra, &r);
    assert_non_null(strstr(r.out, "model.pt (epoch 1 @ 3 updates)"));
    expect_losses_close(full.out, r.out, 4, 6);
    moe_cmd_result_free(&r);
    moe_cmd_result_free(&full);
    rmdir_all(d);
}

/* fp16 moments with their scales come back bit for bit where every tensor
 * is cut as it was (pytorch_ddp: units whole everywhere) */
static void test_ckpt_tool_round_trip_fp16_moments(void **s)
{
    (void)s;
    char d[64], a[128], last[160], back[160];
    tmpdir(d, sizeof d);
    snprintf(a, sizeof a, "%s/one", d);
    train_quiet(1, a, "--max-update 3 --fp16 --fp16-adam-stats --fp16-init-scale 64");
    snprintf(last, sizeof last, "%s/checkpoint_last-rank-0.pt", a);
    tool_ok("reshard %s/checkpoint_last.pt --world-size 2 --out %s/two", a, d);
    tool_ok("consolidate %s/two/checkpoint_last.pt --out %s/model.pt", d, d);
    snprintf(back, sizeof back, "%s/model.pt", d);
    expect_same_file(last, back);
    /* cut anew (fully sharded): requantized moments, and still a run that continues */
    tool_ok("reshard %s/checkpoint_last.pt --world-size 2 --ddp-backend fully_sharded --out %s/sharded", a, d);
    char ck[160];
    snprintf(ck, sizeof ck, "%s/sharded/checkpoint_last.pt", d);
    json_t *info = info_json(ck), *u;
    size_t ui;
    /* the non-expert units come first, in the same order, in every file */
    json_array_foreach(json_object_get(info, "units"), ui, u)
    {
        if (!json_is_null(json_object_get(u, "expert")))
            continue;
        json_t *pieces = json_object_get(u, "pieces");
        for (int r = 0; r < 2; r++) {
            json_t *p = json_array_get(pieces, (size_t)r);
            char dst[200];
            snprintf(dst, sizeof dst, "%s/sharded/checkpoint_last-rank-%d.pt", d, r);
            assert_int_equal(json_integer_value(json_object_get(p, "rank")), r);
            expect_requantized(last, dst, (int)ui + 1, json_integer_value(json_object_get(u, "numel")),
                               json_integer_value(json_object_get(p, "start")),
                               json_integer_value(json_object_get(p, "numel")));
        }
    }
    json_decref(info);
    tool_ok("consolidate %s/sharded/checkpoint_last.pt --out %s/again.pt --no-optimizer", d, d);
    moe_cmd_result r;
    char b[128];
    snprintf(b, sizeof b, "%s/sharded", d);
    train_ok(1, b, "--max-update 5 --fp16 --fp16-adam-stats --fp16-init-scale 64", &r);
    assert_non_null(strstr(r.out, "(epoch 1 @ 3 updates)"));
    assert_int_equal(moe_count_lines(r.out, "| train_inner | "), 2);
    moe_cmd_result_free(&r);
    /* a file without optimizer state resumes with --reset-optimizer only */
    char extra[300];
    snprintf(extra, sizeof extra, "--max-update 4 --fp16 --fp16-adam-stats --restore-file %s/again.pt", d);
    snprintf(b, sizeof b, "%s/noopt", d);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s/moelm-train " TINY "--save-dir %s %s", MOE_TEST_BIN_DIR, b, extra);
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    assert_int_not_equal(r.status, 0);
    assert_non_null(strstr(r.err, "holds no optimizer state"));
    moe_cmd_result_free(&r);
    strcat(extra, " --reset-optimizer");
    train_ok(1, b, extra, &r);
    moe_cmd_result_free(&r);
    rmdir_all(d);
}

/* A dense model on 3 ranks, fully sharded: the units do not divide by 3, so
 * the last shard ends in padding. fp32 comes back byte for byte; fp16
 * moments are requantized per shard (padding 0); 3 ranks continue the run. */
static void test_ckpt_tool_padded_shards(void **s)
{
    (void)s;
    const char *dense = "--moe-expert-count 0 --moe-freq 0";
    char d[64], a[128], extra[256], last[160], back[160];
    tmpdir(d, sizeof d);
    snprintf(a, sizeof a, "%s/fp32", d);
    snprintf(extra, sizeof extra, "%s --max-update 3", dense);
    train_quiet(1, a, extra);
    tool_ok("reshard %s/checkpoint_last.pt --world-size 3 --ddp-backend fully_sharded --out %s/three", a, d);
    tool_ok("consolidate %s/three/checkpoint_last.pt --out %s/back.pt", d, d);
    snprintf(last, sizeof last, "%s/checkpoint_last-rank-0.pt", a);
    snprintf(back, sizeof back, "%s/back.pt", d);
    expect_same_file(last, back);

    snprintf(a, sizeof a, "%s/fp16", d);
    snprintf(extra, sizeof extra, "%s --max-update 3 --fp16 --fp16-adam-stats", dense);
    moe_cmd_result full, r;
    train_quiet(1, a, extra);
    tool_ok("reshard %s/checkpoint_last.pt --world-size 3 --ddp-backend fully_sharded --out %s/three16", a, d);
    snprintf(last, sizeof last, "%s/checkpoint_last-rank-0.pt", a);
    char ck[160];
    snprintf(ck, sizeof ck, "%s/three16/checkpoint_last.pt", d);
    json_t *info = info_json(ck), *u;
    size_t ui;
    int padded = 0;
    json_array_foreach(json_object_get(info, "units"), ui, u)
    {
        json_t *pieces = json_object_get(u, "pieces");
        int64_t numel = json_integer_value(json_object_get(u, "numel"));
        for (int rk = 0; rk < 3; rk++) {
            json_t *p = json_array_get(pieces, (size_t)rk);
            char dst[200];
            snprintf(dst, sizeof dst, "%s/three16/checkpoint_last-rank-%d.pt", d, rk);
            int64_t start = json_integer_value(json_object_get(p, "start")), n = json_integer_value(json_object_get(p, "numel"));
            padded |= start + n > numel;
            expect_requantized(last, dst, (int)ui + 1, numel, start, n);
        }
    }
    json_decref(info);
    assert_true(padded);
    if (!have_mpirun) {
        printf("SKIP (3 ranks): mpirun not found\n");
        rmdir_all(d);
        return;
    }
    snprintf(extra, sizeof extra, "%s --max-update 6 --fp16 --fp16-adam-stats", dense);
    snprintf(a, sizeof a, "%s/full", d);
    train_ok(1, a, extra, &full);
    snprintf(a, sizeof a, "%s/three16", d);
    snprintf(extra, sizeof extra, "%s --max-update 6 --fp16 --fp16-adam-stats --ddp-backend fully_sharded", dense);
    train_ok(3, a, extra, &r);
    assert_non_null(strstr(r.out, "(epoch 1 @ 3 updates)"));
    expect_losses_close(full.out, r.out, 4, 6);
    moe_cmd_result_free(&r);
    moe_cmd_result_free(&full);
    rmdir_all(d);
}

/* 2 ranks fully sharded (fp32) and 2 ranks with fp16 moments: one file and
 * back, the same bytes */
static void test_ckpt_tool_round_trip_2_ranks(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    static const char *const runs[] = {"--ddp-backend fully_sharded", "--fp16 --fp16-adam-stats"};
    for (int k = 0; k < 2; k++) {
        char d[64], a[128], extra[200];
        tmpdir(d, sizeof d);
        snprintf(a, sizeof a, "%s/two", d);
        snprintf(extra, sizeof extra, "--max-update 3 %s", runs[k]);
        train_quiet(2, a, extra);
        tool_ok("consolidate %s/checkpoint_last.pt --out %s/model.pt", a, d);
        tool_ok("reshard %s/model.pt --world-size 2 --out %s/back", d, d);
        for (int r = 0; r < 2; r++) {
            char x[160], y[160];
            snprintf(x, sizeof x, "%s/checkpoint_last-rank-%d.pt", a, r);
            snprintf(y, sizeof y, "%s/back/model-rank-%d.pt", d, r);
            expect_same_file(x, y);
        }
        rmdir_all(d);
    }
}

/* 2 ranks stopped at 3 updates, resharded for 4 and resumed there; and
 * resumed on 1 rank from the 2 ranks' files: the unbroken run's losses. The
 * layout reshard wrote is the one moelm-train writes on 4 ranks. */
static void test_ckpt_tool_resume_other_world(void **s)
{
    (void)s;
    if (!have_mpirun) {
        printf("SKIP: mpirun not found\n");
        skip();
    }
    char d[64], full_dir[128], part[128], four[128], one[128];
    tmpdir(d, sizeof d);
    snprintf(full_dir, sizeof full_dir, "%s/full", d);
    snprintf(part, sizeof part, "%s/part", d);
    snprintf(four, sizeof four, "%s/four", d);
    snprintf(one, sizeof one, "%s/one", d);
    moe_cmd_result full, r;
    train_ok(2, full_dir, "--ddp-backend fully_sharded --max-update 6", &full);
    train_quiet(2, part, "--ddp-backend fully_sharded --max-update 3");
    tool_ok("reshard %s/checkpoint_last.pt --world-size 4 --out %s", part, four);
    char ck[160];
    snprintf(ck, sizeof ck, "%s/checkpoint_last.pt", four);
    json_t *j = info_json(ck);
    char *planned = layout_text(j);
    assert_int_equal(json_integer_value(json_object_get(j, "world_size")), 4);
    json_decref(j);

    train_ok(4, four, "--ddp-backend fully_sharded --max-update 6", &r);
    assert_non_null(strstr(r.out, "(epoch 1 @ 3 updates)"));
    expect_losses_close(full.out, r.out, 4, 6);
    moe_cmd_result_free(&r);
    j = info_json(ck); /* now written by moelm-train on 4 ranks */
    char *trained = layout_text(j);
    assert_int_equal(json_integer_value(json_object_get(j, "num_updates")), 6);
    json_decref(j);
    assert_string_equal(planned, trained);
    free(planned);
    free(trained);

    /* one rank, straight from the 2 ranks' files */
    char cmd[512];
    snprintf(cmd, sizeof cmd, "mkdir -p %s && cp %s/checkpoint_last-rank-*.pt %s/", one, part, one);
    assert_int_equal(system(cmd), 0);
    train_ok(1, one, "--ddp-backend fully_sharded --max-update 6", &r);
    assert_non_null(strstr(r.out, "(epoch 1 @ 3 updates)"));
    expect_losses_close(full.out, r.out, 4, 6);
    moe_cmd_result_free(&r);
    moe_cmd_result_free(&full);
    rmdir_all(d);
}

/* ------------------------------------------------------------------ info */

static void test_ckpt_tool_info(void **s)
{
    (void)s;
    char d[64], a[128], ck[160];
    tmpdir(d, sizeof d);
    snprintf(a, sizeof a, "%s/one", d);
    moe_cmd_result r;
    train_ok(1, a, "--max-update 2 --fp16 --fp16-adam-stats", &r);
    int64_t logged = logged_params(r.out);
    moe_cmd_result_free(&r);
    snprintf(ck, sizeof ck, "%s/checkpoint_last.pt", a);
    char args[256];
    snprintf(args, sizeof args, "info %s --verify", ck);
    tool(args, &r);
    assert_int_equal(r.status, 0);
    static const char *const lines[] = {"world size: 1, not sharded", "updates: 2, epoch 1",
                                        "arch: transformer_lm_gpt, vocabulary 104 (padding index 1)",
                                        "precision: parameters fp16, gradients fp16, fp32 master weights: yes",
                                        "optimizer: adam, state per element: exp_avg fp16 (x exp_avg_scale), "
                                        "exp_avg_sq fp16 (x exp_avg_sq_scale)",
                                        "--adam-betas '(0.9, 0.98)'",
                                        "decoder.layers.1.moe_layer.experts.1.fc1.weight [64, 32] fp16",
                                        "every checksum matches"};
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++)
        if (!strstr(r.out, lines[i]))
            fail_msg("info lacks '%s':\n%s", lines[i], r.out);
    moe_cmd_result_free(&r);

    json_t *j = info_json(ck);
    assert_int_equal(json_integer_value(json_object_get(j, "num_params")), logged);
    assert_int_equal(json_integer_value(json_object_get(j, "world_size")), 1);
    assert_int_equal(json_integer_value(json_object_get(j, "num_updates")), 2);
    assert_string_equal(json_string_value(json_object_get(j, "dtype")), "F16");
    assert_true(json_is_true(json_object_get(j, "master_weights")));
    json_t *opt = json_object_get(j, "optimizer");
    assert_string_equal(json_string_value(json_object_get(opt, "name")), "adam");
    assert_int_equal(json_array_size(json_object_get(opt, "fields")), 2);
    json_t *args_j = json_object_get(j, "args");
    int found = 0;
    for (size_t i = 0; i + 1 < json_array_size(args_j); i++)
        found |= strcmp(json_string_value(json_array_get(args_j, i)), "--adam-betas") == 0 &&
                 strcmp(json_string_value(json_array_get(args_j, i + 1)), "(0.9, 0.98)") == 0;
    assert_true(found);
    assert_int_equal(json_array_size(json_object_get(j, "units")), 5); /* decoder, 2 layers, 2 experts */
    json_decref(j);

    if (have_mpirun) {
        /* 2 ranks, fully sharded: every expert once in the count */
        snprintf(a, sizeof a, "%s/two", d);
        train_quiet(2, a, "--max-update 2 --ddp-backend fully_sharded");
        snprintf(ck, sizeof ck, "%s/checkpoint_last.pt", a);
        j = info_json(ck);
        assert_int_equal(json_integer_value(json_object_get(j, "num_params")), logged);
        assert_int_equal(json_integer_value(json_object_get(j, "world_size")), 2);
        assert_true(json_is_true(json_object_get(j, "fully_sharded")));
        json_decref(j);
    } else {
        printf("SKIP (2 ranks): mpirun not found\n");
    }
    rmdir_all(d);
}

/* ---------------------------------------------------------------- export */

typedef struct st_tensor {
    const char *name;
    const char *dtype;
    int64_t shape[2];
    int ndim;
    uint64_t begin, end;
} st_tensor;

/* A safetensors file parsed as its specification says; returns the data
 * start; fails the test on any deviation. */
static size_t parse_safetensors(const unsigned char *b, size_t n, json_t **hdr_out)
{
    assert_true(n >= 8);
    uint64_t hl;
    memcpy(&hl, b, 8);
    assert_true(hl % 8 == 0 && 8 + hl <= n);
    char *text = malloc(hl + 1);
    memcpy(text, b + 8, hl);
    text[hl] = 0;
    for (size_t k = strlen(text); k < hl; k++)
        assert_true(text[k] == ' ');
    json_error_t e;
    json_t *h = json_loads(text, 0, &e);
    if (!h)
        fail_msg("safetensors header is not JSON: %s", e.text);
    free(text);
    json_t *meta = json_object_get(h, "__metadata__");
    assert_true(json_is_object(meta));
    const char *k;
    json_t *v;
    json_object_foreach(meta, k, v) assert_true(json_is_string(v));
    /* offsets: contiguous from 0 to the end of the file, no gaps or overlaps */
    size_t count = json_object_size(h) - 1, got = 0;
    uint64_t *begins = calloc(count, sizeof *begins), *ends = calloc(count, sizeof *ends);
    json_object_foreach(h, k, v)
    {
        if (strcmp(k, "__metadata__") == 0)
            continue;
        json_t *off = json_object_get(v, "data_offsets");
        assert_int_equal(json_array_size(off), 2);
        begins[got] = (uint64_t)json_integer_value(json_array_get(off, 0));
        ends[got] = (uint64_t)json_integer_value(json_array_get(off, 1));
        const char *dt = json_string_value(json_object_get(v, "dtype"));
        uint64_t es = strcmp(dt, "F32") == 0 ? 4 : 2, numel = 1;
        json_t *shape = json_object_get(v, "shape"), *x;
        size_t i;
        json_array_foreach(shape, i, x) numel *= (uint64_t)json_integer_value(x);
        assert_true(ends[got] - begins[got] == numel * es);
        got++;
    }
    uint64_t pos = 0;
    for (size_t round = 0; round < count; round++) {
        size_t i = 0;
        while (i < count && begins[i] != pos)
            i++;
        if (i == count)
            fail_msg("no tensor starts at data offset %llu", (unsigned long long)pos);
        pos = ends[i];
    }
    assert_true(pos == n - 8 - hl);
    free(begins);
    free(ends);
    *hdr_out = h;
    return 8 + (size_t)hl;
}

static void test_ckpt_tool_export(void **s)
{
    (void)s;
    char d[64], a[128], out[160], cmd[1024];
    tmpdir(d, sizeof d);
    snprintf(a, sizeof a, "%s/one", d);
    train_quiet(1, a, "--max-update 2");
    snprintf(out, sizeof out, "%s/x/model.safetensors", d);
    snprintf(cmd, sizeof cmd, "%s/x", d);
    mkdir(cmd, 0755);
    tool_ok("export %s/checkpoint_last.pt --format safetensors --out %s", a, out);

    char ckfile[160];
    snprintf(ckfile, sizeof ckfile, "%s/checkpoint_last-rank-0.pt", a);
    size_t cn, sn;
    unsigned char *ck = slurp(ckfile, &cn), *st = slurp(out, &sn);
    json_t *hdr;
    size_t data = parse_safetensors(st, sn, &hdr);
    json_t *info = info_json(ckfile);
    json_t *units = json_object_get(info, "units"), *u;
    size_t ui, n_tensors = 0;
    json_array_foreach(units, ui, u)
    {
        const float *params = unit_params(ck, cn, (int)ui);
        json_t *ts = json_object_get(u, "tensors"), *t;
        size_t ti;
        json_array_foreach(ts, ti, t)
        {
            const char *name = json_string_value(json_object_get(t, "name"));
            json_t *x = json_object_get(hdr, name);
            if (!x)
                fail_msg("%s missing from the export", name);
            assert_string_equal(json_string_value(json_object_get(x, "dtype")), "F32");
            assert_true(json_equal(json_object_get(x, "shape"), json_object_get(t, "shape")));
            uint64_t b0 = (uint64_t)json_integer_value(json_array_get(json_object_get(x, "data_offsets"), 0));
            uint64_t b1 = (uint64_t)json_integer_value(json_array_get(json_object_get(x, "data_offsets"), 1));
            int64_t off = json_integer_value(json_object_get(t, "offset"));
            if (memcmp(st + data + b0, params + off, b1 - b0) != 0)
                fail_msg("%s: exported data differ from the checkpoint's", name);
            n_tensors++;
        }
    }
    assert_int_equal(json_object_size(hdr) - 1, n_tensors);
    json_decref(info);

    /* config.json: the arch's options as resolved, the vocabulary, the count */
    snprintf(cmd, sizeof cmd, "%s/x/config.json", d);
    json_error_t e;
    json_t *cfg = json_load_file(cmd, 0, &e);
    assert_non_null(cfg);
    assert_string_equal(json_string_value(json_object_get(cfg, "arch")), "transformer_lm_gpt");
    assert_int_equal(json_integer_value(json_object_get(cfg, "decoder_embed_dim")), 32);
    assert_int_equal(json_integer_value(json_object_get(cfg, "moe_expert_count")), 2);
    assert_int_equal(json_integer_value(json_object_get(cfg, "vocab_size")), 104);
    assert_true(json_is_true(json_object_get(cfg, "share_decoder_input_output_embed")));
    json_t *ij = info_json(ckfile);
    assert_int_equal(json_integer_value(json_object_get(cfg, "num_params")),
                     json_integer_value(json_object_get(ij, "num_params")));
    json_decref(ij);
    json_decref(cfg);

    /* F16: each value rounded to nearest even */
    char out16[160];
    snprintf(out16, sizeof out16, "%s/x/model16.safetensors", d);
    tool_ok("export %s/checkpoint_last.pt --out %s --dtype F16", a, out16);
    size_t n16;
    unsigned char *s16 = slurp(out16, &n16);
    json_t *h16;
    size_t data16 = parse_safetensors(s16, n16, &h16);
    const char *k;
    json_t *v;
    json_object_foreach(hdr, k, v)
    {
        if (strcmp(k, "__metadata__") == 0)
            continue;
        json_t *v16 = json_object_get(h16, k);
        assert_string_equal(json_string_value(json_object_get(v16, "dtype")), "F16");
        uint64_t b0 = (uint64_t)json_integer_value(json_array_get(json_object_get(v, "data_offsets"), 0));
        uint64_t b1 = (uint64_t)json_integer_value(json_array_get(json_object_get(v, "data_offsets"), 1));
        uint64_t c0 = (uint64_t)json_integer_value(json_array_get(json_object_get(v16, "data_offsets"), 0));
        for (uint64_t i = 0; i < (b1 - b0) / 4; i++) {
            float f;
            uint16_t h;
            memcpy(&f, st + data + b0 + 4 * i, 4);
            memcpy(&h, s16 + data16 + c0 + 2 * i, 2);
            if (h != moe_f32_to_f16(f))
                fail_msg("%s[%llu]: %g exported as fp16 %04x", k, (unsigned long long)i, (double)f, h);
        }
    }
    json_decref(h16);
    free(s16);

    /* the same model from 2 ranks' files: the same bytes */
    tool_ok("reshard %s/checkpoint_last.pt --world-size 2 --ddp-backend fully_sharded --out %s/two", a, d);
    char out2[160];
    snprintf(out2, sizeof out2, "%s/x/model2.safetensors", d);
    tool_ok("export %s/two/checkpoint_last.pt --out %s", d, out2);
    expect_same_file(out, out2);

    /* python's reader, where installed */
    if (system("python3 -c 'import safetensors, numpy' >/dev/null 2>&1") == 0) {
        double sum = 0;
        json_object_foreach(hdr, k, v)
        {
            if (strcmp(k, "__metadata__") == 0)
                continue;
            uint64_t b0 = (uint64_t)json_integer_value(json_array_get(json_object_get(v, "data_offsets"), 0));
            uint64_t b1 = (uint64_t)json_integer_value(json_array_get(json_object_get(v, "data_offsets"), 1));
            for (uint64_t i = b0; i < b1; i += 4) {
                float f;
                memcpy(&f, st + data + i, 4);
                sum += f;
            }
        }
        snprintf(cmd, sizeof cmd,
                 "python3 -c \"from safetensors.numpy import load_file; import numpy as np; "
                 "t = load_file('%s'); u = load_file('%s'); "
                 "assert t.keys() == u.keys() and all(u[k].dtype == np.float16 for k in u); "
                 "print(len(t), sum(float(np.sum(x.astype(np.float64))) for x in t.values()), "
                 "t['decoder.embed_tokens.weight'].shape)\"",
                 out, out16);
        moe_cmd_result r;
        assert_int_equal(moe_run_shell(cmd, &r), 0);
        if (r.status != 0)
            fail_msg("python's safetensors: %s", r.err);
        int count = 0;
        double psum = 0;
        assert_int_equal(sscanf(r.out, "%d %lf", &count, &psum), 2);
        assert_int_equal((size_t)count, n_tensors);
        assert_true(fabs(psum - sum) <= 1e-9 * (1 + fabs(sum)));
        assert_non_null(strstr(r.out, "(104, 32)"));
        moe_cmd_result_free(&r);
    } else {
        printf("SKIP (python's safetensors): python3 -c 'import safetensors, numpy' fails\n");
    }
    json_decref(hdr);
    free(ck);
    free(st);
    rmdir_all(d);
}

/* ------------------------------------------------------- library calls */

/* What a session does: the stored command line, then a model of another
 * world size (1) and precision given the parameters of 2 ranks' files. */
static void test_ckpt_tool_load_params(void **s)
{
    (void)s;
    char d[64], a[128], ck[160];
    tmpdir(d, sizeof d);
    snprintf(a, sizeof a, "%s/one", d);
    train_quiet(1, a, "--max-update 2 --fp16");
    tool_ok("reshard %s/checkpoint_last.pt --world-size 2 --ddp-backend fully_sharded --out %s/two", a, d);
    snprintf(ck, sizeof ck, "%s/two/checkpoint_last.pt", d);
    int argc;
    char **argv;
    assert_int_equal(moe_ckpt_read_args(ck, &argc, &argv), MOE_OK);
    assert_true(argc > 10);
    assert_string_equal(argv[0], "--cpu");
    moe_ckpt *c;
    assert_int_equal(moe_ckpt_open(ck, &c), MOE_OK);

    /* fp32 (from the fp16 run's fp32 masters), fp16 with masters, bf16 without */
    static const char *const prec[] = {NULL, "--fp16", "--memory-efficient-bf16"};
    for (int k = 0; k < 3; k++) {
        const char *args[128];
        int n = 0;
        for (int i = 0; i < argc; i++)
            if (strcmp(argv[i], "--fp16") != 0)
                args[n++] = argv[i];
        if (prec[k])
            args[n++] = prec[k];
        moe_runtime *rt;
        if (moe_runtime_create_for_test(n, args, &rt) != MOE_OK)
            fail_msg("runtime: %s", moe_error_message());
        const moe_host *h = moe_runtime_host(rt);
        const moe_plugin_desc *desc;
        assert_int_equal(moe_runtime_load_plugin(rt, MOE_KIND_ARCH, "transformer_lm_gpt", &desc), MOE_OK);
        const moe_arch_ops *arch = desc->ops;
        void *model;
        assert_int_equal(arch->build(h, moe_ckpt_get_meta(c)->vocab, 1, &model), MOE_OK);
        assert_int_equal(moe_runtime_alloc_params(rt), MOE_OK);
        int64_t updates = -1;
        if (moe_ckpt_load_params(rt, ck, &updates) != MOE_OK)
            fail_msg("load_params: %s", moe_error_message());
        assert_int_equal(updates, 2);
        for (int i = 0; i < moe_runtime_num_units(rt); i++) {
            moe_unit_info u;
            moe_runtime_unit(rt, i, &u);
            int mu = moe_ckpt_find_unit(c, u.name);
            int unit = -1; /* its index in display order */
            for (int q = 0; q < moe_ckpt_num_units(c) && unit < 0; q++)
                if (strcmp(moe_ckpt_unit_at(c, q)->name, u.name) == 0)
                    unit = q;
            assert_true(mu >= 0 && unit >= 0);
            size_t es = moe_dtype_size(h->act_dtype);
            unsigned char *got = malloc((size_t)u.numel * es), *want = malloc((size_t)u.numel * es);
            assert_int_equal(h->backend->copy_to_host(h->ctx, got, u.param, (uint64_t)u.numel * es), MOE_OK);
            /* fp32 and bf16 runtimes from the masters, fp16 from the parameters */
            int from_master = h->act_dtype != MOE_F16;
            assert_int_equal(moe_ckpt_read(c, unit, from_master, 0, u.numel, h->act_dtype, want), MOE_OK);
            if (memcmp(got, want, (size_t)u.numel * es) != 0)
                fail_msg("%s: unit %s differs from the checkpoint", prec[k] ? prec[k] : "fp32", u.name);
            if (u.master) {
                float *m = malloc((size_t)u.numel * 4u), *wm = malloc((size_t)u.numel * 4u);
                assert_int_equal(h->backend->copy_to_host(h->ctx, m, u.master, (uint64_t)u.numel * 4u), MOE_OK);
                assert_int_equal(moe_ckpt_read(c, unit, 1, 0, u.numel, MOE_F32, wm), MOE_OK);
                assert_memory_equal(m, wm, (size_t)u.numel * 4u);
                free(m);
                free(wm);
            }
            free(got);
            free(want);
        }
        arch->destroy(model);
        moe_runtime_destroy(rt);
    }
    moe_ckpt_close(c);
    moe_ckpt_free_args(argc, argv);
    rmdir_all(d);
}

/* ---------------------------------------------------------- bad input */

/* one line on stderr, `status`, and no `left` (nor left.tmp) afterwards */
static void expect_refused(const char *args, int status, const char *needle, const char *left)
{
    moe_cmd_result r;
    tool(args, &r);
    if (r.status != status || strncmp(r.err, "moelm-checkpoint: error: ", 25) != 0 || !strstr(r.err, needle))
        fail_msg("moelm-checkpoint %s: expected status %d and '%s', got %d:\n%s", args, status, needle, r.status,
                 r.err);
    assert_int_equal(moe_count_lines(r.err, ""), 1);
    if (left) {
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%s.tmp", left);
        if (exists(left) || exists(tmp))
            fail_msg("moelm-checkpoint %s left %s behind", args, left);
    }
    moe_cmd_result_free(&r);
}

static void copy(const char *from, const char *to)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", to, from, to);
    assert_int_equal(system(cmd), 0);
}

static void test_ckpt_tool_refuses_bad_input(void **s)
{
    (void)s;
    char d[64], good[128], bad[128], other[128], args[1024], out[160], outdir[160], f1[200];
    tmpdir(d, sizeof d);
    snprintf(good, sizeof good, "%s/good", d);
    snprintf(bad, sizeof bad, "%s/bad", d);
    snprintf(other, sizeof other, "%s/other", d);
    snprintf(out, sizeof out, "%s/out.pt", d);
    snprintf(outdir, sizeof outdir, "%s/outdir", d);
    train_quiet(1, d, "--max-update 2");
    tool_ok("reshard %s/checkpoint_last.pt --world-size 2 --out %s", d, good);
    snprintf(f1, sizeof f1, "%s/checkpoint_last-rank-1.pt", bad);

    /* a rank's file missing */
    copy(good, bad);
    unlink(f1);
    snprintf(args, sizeof args, "consolidate %s/checkpoint_last.pt --out %s", bad, out);
    expect_refused(args, 1, "checkpoint_last-rank-1.pt is missing: ", out);

    /* a piece cut short */
    copy(good, bad);
    struct stat sb;
    assert_int_equal(stat(f1, &sb), 0);
    assert_int_equal(truncate(f1, sb.st_size - 1000), 0);
    expect_refused(args, 1, "is truncated or damaged", out);

    /* one flipped byte inside unit 2's section: its checksum, found before anything is written */
    copy(good, bad);
    size_t n;
    unsigned char *b = slurp(f1, &n);
    const unsigned char *p = (const unsigned char *)unit_params(b, n, 2);
    size_t at = (size_t)(p - b) + 100;
    free(b);
    FILE *f = fopen(f1, "r+b");
    assert_non_null(f);
    fseek(f, (long)at, SEEK_SET);
    int ch = fgetc(f);
    fseek(f, (long)at, SEEK_SET);
    fputc(ch ^ 0x01, f);
    fclose(f);
    expect_refused(args, 1, "is corrupt: checksum mismatch in unit 'decoder.layers.1'", out);
    snprintf(args, sizeof args, "reshard %s/checkpoint_last.pt --world-size 1 --out %s", bad, outdir);
    char left[200];
    snprintf(left, sizeof left, "%s/checkpoint_last-rank-0.pt", outdir);
    expect_refused(args, 1, "checksum mismatch", left);
    snprintf(args, sizeof args, "export %s/checkpoint_last.pt --out %s/m.safetensors", bad, d);
    snprintf(left, sizeof left, "%s/m.safetensors", d);
    expect_refused(args, 1, "checksum mismatch", left);
    snprintf(args, sizeof args, "info %s/checkpoint_last.pt --verify", bad);
    expect_refused(args, 1, "checksum mismatch", NULL);

    /* rank 1's file from another run (another seed, same shape) */
    char e[200];
    snprintf(e, sizeof e, "%s/e", d);
    train_quiet(1, e, "--max-update 2 --seed 7");
    tool_ok("reshard %s/checkpoint_last.pt --world-size 2 --out %s", e, other);
    copy(good, bad);
    snprintf(args, sizeof args, "cp %s/checkpoint_last-rank-1.pt %s", other, f1);
    assert_int_equal(system(args), 0);
    snprintf(args, sizeof args, "consolidate %s/checkpoint_last.pt --out %s", bad, out);
    expect_refused(args, 1, "are of different saves", out);

    /* a format 1 file */
    char v1[200];
    snprintf(v1, sizeof v1, "%s/old.pt", d);
    f = fopen(v1, "wb");
    assert_non_null(f);
    uint32_t words[6] = {1, 200, 4000, 0, 1, 0};
    fwrite("MOELMCKP", 1, 8, f);
    fwrite(words, 4, 6, f);
    for (int i = 0; i < 4000; i++)
        fputc(0, f);
    fclose(f);
    snprintf(args, sizeof args, "consolidate %s --out %s", v1, out);
    expect_refused(args, 1, "was written by an earlier moelm (checkpoint format 1", out);

    /* the command line */
    snprintf(args, sizeof args, "merge %s/checkpoint_last.pt --out %s", good, out);
    expect_refused(args, 2, "unknown command 'merge'", out);
    snprintf(args, sizeof args, "reshard %s/checkpoint_last.pt --world-size 0 --out %s", good, outdir);
    expect_refused(args, 2, "--world-size", left);
    snprintf(args, sizeof args, "consolidate %s/checkpoint_last.pt", good);
    expect_refused(args, 2, "consolidate needs --out", NULL);

    /* an output directory that cannot be made (below a file) */
    snprintf(args, sizeof args, "reshard %s/checkpoint_last.pt --world-size 2 --out %s/out.pt/sub", good, d);
    f = fopen(out, "w");
    fclose(f);
    expect_refused(args, 1, "out.pt/sub", NULL);
    unlink(out);
    snprintf(args, sizeof args, "consolidate %s/checkpoint_last.pt --out %s/nodir/model.pt", good, d);
    expect_refused(args, 1, "cannot write into", NULL);
    snprintf(args, sizeof args, "reshard %s/checkpoint_last.pt --world-size 2 --out %s", good, good);
    expect_refused(args, 1, "the checkpoint's own directory", NULL);
    rmdir_all(d);
}

int main(void)
{
    have_mpirun = moe_mpirun_prepare();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ckpt_tool_round_trip_1_2_4_1), cmocka_unit_test(test_ckpt_tool_round_trip_fp16_moments),
        cmocka_unit_test(test_ckpt_tool_round_trip_2_ranks), cmocka_unit_test(test_ckpt_tool_resume_other_world),
        cmocka_unit_test(test_ckpt_tool_info),               cmocka_unit_test(test_ckpt_tool_export),
        cmocka_unit_test(test_ckpt_tool_load_params),        cmocka_unit_test(test_ckpt_tool_refuses_bad_input),
        cmocka_unit_test(test_ckpt_tool_padded_shards),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
