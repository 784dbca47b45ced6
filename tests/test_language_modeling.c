/* test_language_modeling.c: the language_modeling task plugin, loaded the way
 * moelm-train loads it, over data directories the test writes with the data
 * library (dictionary, fairseq and Megatron mmap datasets):
 *  - DATA_SPEC.md §3.5's example through the task's batches in every break
 *    mode, as (source -> target) rows, with --add-bos-token;
 *  - size ordering with the seeded tie-break, per-epoch batch shuffles and
 *    sharding over ranks (expected orders worked out with numpy's legacy
 *    RandomState, as fairseq draws them; see the cases);
 *  - --max-tokens batching, padding to a step's common shape on several
 *    ranks, empty (dummy) batches past the end of a shard;
 *  - ':'-separated data shards rotating per epoch, train/train1 combined;
 *  - bad input: no DATA, no dict.txt, a missing split, an id outside the
 *    dictionary (named with file and position), --dataset-impl lazy, unused
 *    valid1 files, an empty split, blocks all too long.
 */
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

#include "core/internal.h"
#include "core/options.h"
#include "core/registry.h"
#include "core/runtime.h"
#include "data/dictionary.h"
#include "data/error.h"
#include "data/indexed.h"

/* ------------------------------------------------------------ fixtures */

typedef struct env {
    moe_runtime *rt;
    const moe_host *h;
    moe_opts *opts;
    moe_registry *reg;
    const moe_task_ops *ops;
    void *task;
} env;

/* A runtime planning for the world the args name (no communicator joined),
 * with the language_modeling task loaded; init's status returned. */
static moe_status env_open(env *e, const char *cmdline)
{
    memset(e, 0, sizeof *e);
    char *copy = strdup(cmdline);
    char *argv[64];
    int n = 0;
    argv[n++] = (char *)"moelm-test";
    for (char *w = strtok(copy, " "); w && n < 63; w = strtok(NULL, " "))
        argv[n++] = w;
    assert_int_equal(moe_opts_create(&e->opts), MOE_OK);
    assert_int_equal(moe_opts_parse(e->opts, n, argv, 0), MOE_OK);
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
    assert_int_equal(moe_runtime_set_args(e->rt, n - 1, (const char *const *)argv + 1), MOE_OK);
    e->h = moe_runtime_host(e->rt);
    const moe_plugin_desc *d = NULL;
    if (moe_runtime_load_plugin(e->rt, MOE_KIND_TASK, "language_modeling", &d) != MOE_OK)
        fail_msg("loading language_modeling: %s", moe_error_message());
    e->ops = d->ops;
    moe_error_clear();
    moe_status st = e->ops->init(e->h, &e->task);
    free(copy);
    return st;
}

static void env_close(env *e)
{
    if (e->task)
        e->ops->destroy(e->task);
    moe_runtime_destroy(e->rt);
    moe_registry_destroy(e->reg);
    moe_opts_destroy(e->opts);
    moe_error_clear();
}

static void env_ok(env *e, const char *cmdline)
{
    if (env_open(e, cmdline) != MOE_OK)
        fail_msg("init '%s': %s", cmdline, moe_error_message());
}

/* the init (or the first batch) fails with every needle in the message */
static void expect_fail(const char *cmdline, const char *split, ...)
{
    env e;
    moe_status st = env_open(&e, cmdline);
    if (st == MOE_OK && split) {
        int64_t nb = e.ops->num_batches(e.task, split);
        st = nb < 0 ? MOE_ERR_INVALID_ARG : MOE_OK;
        if (st == MOE_OK) {
            moe_batch b;
            st = e.ops->get_batch(e.task, split, 0, &b);
            if (st == MOE_OK)
                e.ops->free_batch(e.task, &b);
        }
    }
    if (st == MOE_OK)
        fail_msg("'%s' (split %s) succeeded; expected a failure", cmdline, split ? split : "-");
    const char *msg = moe_error_message();
    va_list ap;
    va_start(ap, split);
    for (const char *needle = va_arg(ap, const char *); needle; needle = va_arg(ap, const char *))
        if (!strstr(msg, needle))
            fail_msg("'%s': message \"%s\" lacks \"%s\"", cmdline, msg, needle);
    va_end(ap);
    env_close(&e);
}

static char root[64];

static void mkdir_p(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* dict.txt with words w4 .. w<n-1> (indices 4 .. n-1) */
static void write_dict(const char *dir, int n)
{
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    for (int i = 4; i < n; i++) {
        char w[16];
        snprintf(w, sizeof w, "w%d", i);
        int64_t idx;
        assert_int_equal(moe_dict_add(d, w, strlen(w), n - i, 0, &idx), MOE_OK);
        assert_int_equal(idx, i);
    }
    char path[256];
    snprintf(path, sizeof path, "%s/dict.txt", dir);
    assert_int_equal(moe_dict_save(d, path), MOE_OK);
    moe_dict_destroy(d);
}

/* <dir>/<name>.idx/.bin in fairseq's format from items separated by -1 */
static void write_split(const char *dir, const char *name, const int32_t *flat, int n)
{
    char prefix[256];
    snprintf(prefix, sizeof prefix, "%s/%s", dir, name);
    moe_idx_builder *b;
    if (moe_idx_builder_open(prefix, 8, &b) != MOE_OK)
        fail_msg("builder: %s", moe_data_error());
    int start = 0;
    for (int i = 0; i <= n; i++)
        if (i == n || flat[i] < 0) {
            if (i > start || (i < n))
                assert_int_equal(moe_idx_builder_add(b, flat + start, i - start), MOE_OK);
            start = i + 1;
        }
    assert_int_equal(moe_idx_builder_finish(b), MOE_OK);
}

/* DATA_SPEC.md §3.5: [10 11 2] [12 2] [2] [13 14 15 16 17 2] [18 2] */
static const int32_t example[] = {10, 11, 2, -1, 12, 2, -1, 2, -1, 13, 14, 15, 16, 17, 2, -1, 18, 2};
#define EXAMPLE_N ((int)(sizeof example / sizeof example[0]))

static void example_dir(const char *dir)
{
    mkdir_p(dir);
    write_dict(dir, 24);
    write_split(dir, "train", example, EXAMPLE_N);
    write_split(dir, "valid", example, EXAMPLE_N);
}

/* row r of a batch equals src -> tgt (n tokens, then padding) */
static void expect_row(const moe_batch *b, int64_t r, const int32_t *src, const int32_t *tgt, int n)
{
    for (int64_t i = 0; i < b->T; i++) {
        int32_t ws = i < n ? src[i] : 1, wt = i < n ? tgt[i] : 1;
        if (b->src[r * b->T + i] != ws || b->tgt[r * b->T + i] != wt)
            fail_msg("row %lld position %lld: got %d -> %d, expected %d -> %d", (long long)r, (long long)i,
                     b->src[r * b->T + i], b->tgt[r * b->T + i], ws, wt);
    }
}

static int setup(void **state)
{
    (void)state;
    snprintf(root, sizeof root, "/tmp/moelm-lm-XXXXXX");
    assert_non_null(mkdtemp(root));
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    return system(cmd);
}

#define BASE "--seed 1 --required-batch-size-multiple 1 "

/* ------------------------------------------------------------------ cases */

/* none: blocks [0,4) [4,8) [8,12) [12,14); sizes 4 4 4 2 sort to blocks
 * 3 2 1 0 (numpy seed 1: permutation(4) breaks the ties); validation keeps
 * that order, train shuffles the batches with seed + epoch: epoch 1
 * [2 3 1 0], epoch 2 [3 1 0 2], epoch 3 [0 1 3 2] (np.random.shuffle). */
static void test_language_modeling_none_blocks_order_and_epochs(void **s)
{
    (void)s;
    char dir[128], cmd[512];
    snprintf(dir, sizeof dir, "%s/none", root);
    example_dir(dir);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 %s", dir);
    env e;
    env_ok(&e, cmd);
    assert_int_equal(e.ops->vocab_size(e.task), 24);
    assert_int_equal(e.ops->padding_idx(e.task), 1);
    static const int32_t src[4][4] = {{2, 10, 11, 2}, {12, 2, 2, 13}, {14, 15, 16, 17}, {2, 18}};
    static const int32_t tgt[4][4] = {{10, 11, 2, 12}, {2, 2, 13, 14}, {15, 16, 17, 2}, {18, 2}};
    static const int len[4] = {4, 4, 4, 2};
    static const int valid_blocks[4] = {3, 2, 1, 0};
    assert_int_equal(e.ops->num_batches(e.task, "valid"), 4);
    for (int i = 0; i < 4; i++) {
        moe_batch b;
        assert_int_equal(e.ops->get_batch(e.task, "valid", i, &b), MOE_OK);
        int k = valid_blocks[i];
        assert_int_equal(b.B, 1);
        assert_int_equal(b.T, len[k]);
        assert_int_equal(b.ntokens, len[k]);
        assert_int_equal(b.nsentences, 1);
        expect_row(&b, 0, src[k], tgt[k], len[k]);
        e.ops->free_batch(e.task, &b);
    }
    static const int epoch_order[3][4] = {{2, 3, 1, 0}, {3, 1, 0, 2}, {0, 1, 3, 2}};
    for (int ep = 1; ep <= 3; ep++) {
        assert_int_equal(e.ops->set_epoch(e.task, ep), MOE_OK);
        assert_int_equal(e.ops->num_batches(e.task, "train"), 4);
        for (int i = 0; i < 4; i++) {
            moe_batch b;
            assert_int_equal(e.ops->get_batch(e.task, "train", i, &b), MOE_OK);
            int k = valid_blocks[epoch_order[ep - 1][i]];
            expect_row(&b, 0, src[k], tgt[k], len[k]);
            e.ops->free_batch(e.task, &b);
        }
    }
    int64_t max_tokens = 0, max_len = 0;
    assert_int_equal(e.ops->max_batch(e.task, &max_tokens, &max_len), MOE_OK);
    assert_int_equal(max_len, 4);
    assert_int_equal(max_tokens, 4);
    env_close(&e);
}

/* complete / complete_doc / eos on the same items, with --add-bos-token:
 * bos (0) starts source and target, T grows by one, ntokens counts it */
static void test_language_modeling_break_modes_and_bos(void **s)
{
    (void)s;
    char dir[128], cmd[512];
    snprintf(dir, sizeof dir, "%s/modes", root);
    example_dir(dir);
    /* complete: [0,3) [3,6) [6,12) [12,14); the 6-token block exceeds
     * --tokens-per-sample 4: skipped (valid with the flag) */
    snprintf(cmd, sizeof cmd,
             BASE "--tokens-per-sample 4 --batch-size 8 --sample-break-mode complete --add-bos-token "
                  "--skip-invalid-size-inputs-valid-test %s",
             dir);
    env e;
    env_ok(&e, cmd);
    assert_int_equal(e.ops->num_batches(e.task, "valid"), 1);
    moe_batch b;
    assert_int_equal(e.ops->get_batch(e.task, "valid", 0, &b), MOE_OK);
    assert_int_equal(b.B, 3);
    assert_int_equal(b.T, 4); /* 3 tokens + bos */
    assert_int_equal(b.ntokens, 2 + 1 + 3 + 1 + 3 + 1);
    /* sizes 3 3 2 (block 2 filtered): order by size, ties by numpy's
     * permutation: blocks 3, 1, 0 */
    expect_row(&b, 0, (const int32_t[]){0, 2, 18}, (const int32_t[]){0, 18, 2}, 3);
    expect_row(&b, 1, (const int32_t[]){0, 2, 12, 2}, (const int32_t[]){0, 12, 2, 2}, 4);
    expect_row(&b, 2, (const int32_t[]){0, 2, 10, 11}, (const int32_t[]){0, 10, 11, 2}, 4);
    e.ops->free_batch(e.task, &b);
    env_close(&e);

    /* eos: one block per line, the empty line is 2 -> 2 */
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 8 --batch-size 8 --sample-break-mode eos %s", dir);
    env_ok(&e, cmd);
    assert_int_equal(e.ops->get_batch(e.task, "valid", 0, &b), MOE_OK);
    assert_int_equal(b.B, 5);
    assert_int_equal(b.T, 6);
    assert_int_equal(b.ntokens, 14);
    expect_row(&b, 0, (const int32_t[]){2}, (const int32_t[]){2}, 1);
    expect_row(&b, 4, (const int32_t[]){2, 13, 14, 15, 16, 17}, (const int32_t[]){13, 14, 15, 16, 17, 2}, 6);
    e.ops->free_batch(e.task, &b);
    env_close(&e);

    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 8 --batch-size 8 --sample-break-mode complete_doc %s", dir);
    env_ok(&e, cmd);
    /* complete_doc with 8 tokens: [0,5) closed by the empty line, whose token
     * belongs to no block, then [6,14) */
    assert_int_equal(e.ops->get_batch(e.task, "valid", 0, &b), MOE_OK);
    assert_int_equal(b.B, 2);
    assert_int_equal(b.T, 8);
    assert_int_equal(b.ntokens, 5 + 8);
    expect_row(&b, 0, (const int32_t[]){2, 10, 11, 2, 12}, (const int32_t[]){10, 11, 2, 12, 2}, 5);
    e.ops->free_batch(e.task, &b);
    env_close(&e);
}

/* --max-tokens 8 on the none blocks (sizes 2 4 4 4 in order): batch_by_size
 * packs {3, 2} (2 rows of at most 4 tokens) and {1, 0} */
static void test_language_modeling_max_tokens(void **s)
{
    (void)s;
    char dir[128], cmd[512];
    snprintf(dir, sizeof dir, "%s/maxtok", root);
    example_dir(dir);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --max-tokens 8 %s", dir);
    env e;
    env_ok(&e, cmd);
    assert_int_equal(e.ops->num_batches(e.task, "valid"), 2);
    moe_batch b;
    assert_int_equal(e.ops->get_batch(e.task, "valid", 0, &b), MOE_OK);
    assert_int_equal(b.B, 2);
    assert_int_equal(b.T, 4);
    assert_int_equal(b.ntokens, 6);
    expect_row(&b, 0, (const int32_t[]){2, 18}, (const int32_t[]){18, 2}, 2); /* right-padded */
    e.ops->free_batch(e.task, &b);
    int64_t max_tokens = 0, max_len = 0;
    assert_int_equal(e.ops->max_batch(e.task, &max_tokens, &max_len), MOE_OK);
    assert_int_equal(max_tokens, 8);
    assert_int_equal(max_len, 4);
    env_close(&e);
}

/* world 3: 4 batches -> 2 per rank; every rank pads to its step's largest
 * batch (step 0: 4 tokens per row; step 1: only block 3, 2 tokens), a rank
 * past the end gets an empty (ntokens 0) batch of that shape */
static void test_language_modeling_sharding(void **s)
{
    (void)s;
    char dir[128], cmd[512];
    snprintf(dir, sizeof dir, "%s/shard", root);
    example_dir(dir);
    /* epoch 1 order [2 3 1 0] -> blocks 1, 0, 2, 3 at positions 0..3 */
    static const int32_t src[4][4] = {{2, 10, 11, 2}, {12, 2, 2, 13}, {14, 15, 16, 17}, {2, 18}};
    static const int32_t tgt[4][4] = {{10, 11, 2, 12}, {2, 2, 13, 14}, {15, 16, 17, 2}, {18, 2}};
    static const int pos_block[4] = {1, 0, 2, 3};
    for (int rank = 0; rank < 3; rank++) {
        snprintf(cmd, sizeof cmd,
                 BASE "--tokens-per-sample 4 --batch-size 1 --distributed-world-size 3 --distributed-rank %d %s", rank,
                 dir);
        env e;
        env_ok(&e, cmd);
        assert_int_equal(e.ops->set_epoch(e.task, 1), MOE_OK);
        assert_int_equal(e.ops->num_batches(e.task, "train"), 2);
        for (int i = 0; i < 2; i++) {
            moe_batch b;
            assert_int_equal(e.ops->get_batch(e.task, "train", i, &b), MOE_OK);
            int pos = i * 3 + rank;
            assert_int_equal(b.T, i == 0 ? 4 : 2);
            assert_int_equal(b.B, 1);
            if (pos < 4) {
                int k = pos_block[pos];
                expect_row(&b, 0, src[k], tgt[k], k == 3 ? 2 : 4);
                assert_true(b.ntokens > 0);
            } else {
                assert_int_equal(b.ntokens, 0);
                assert_int_equal(b.nsentences, 0);
                expect_row(&b, 0, NULL, NULL, 0);
            }
            e.ops->free_batch(e.task, &b);
        }
        env_close(&e);
    }
}

/* DATA=a:b: epoch 1 reads a, 2 reads b, 3 a again; train1 joins train */
static void test_language_modeling_data_shards_and_combine(void **s)
{
    (void)s;
    char a[128], b_dir[128], cmd[512];
    snprintf(a, sizeof a, "%s/sa", root);
    snprintf(b_dir, sizeof b_dir, "%s/sb", root);
    example_dir(a);
    mkdir_p(b_dir);
    write_dict(b_dir, 24);
    static const int32_t one[] = {20, 21, 22, 2};
    write_split(b_dir, "train", one, 4);
    write_split(a, "train1", one, 4);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 --disable-validation %s:%s", a, b_dir);
    env e;
    env_ok(&e, cmd);
    assert_int_equal(e.ops->set_epoch(e.task, 1), MOE_OK);
    assert_int_equal(e.ops->num_batches(e.task, "train"), 5); /* 18 + 4 tokens: 5 blocks of <= 4 */
    assert_int_equal(e.ops->set_epoch(e.task, 2), MOE_OK);
    assert_int_equal(e.ops->num_batches(e.task, "train"), 1);
    moe_batch bt;
    assert_int_equal(e.ops->get_batch(e.task, "train", 0, &bt), MOE_OK);
    expect_row(&bt, 0, (const int32_t[]){2, 20, 21, 22}, (const int32_t[]){20, 21, 22, 2}, 4);
    e.ops->free_batch(e.task, &bt);
    assert_int_equal(e.ops->set_epoch(e.task, 3), MOE_OK);
    assert_int_equal(e.ops->num_batches(e.task, "train"), 5);
    int64_t max_tokens = 0, max_len = 0;
    assert_int_equal(e.ops->max_batch(e.task, &max_tokens, &max_len), MOE_OK);
    assert_int_equal(max_len, 4);
    assert_int_equal(e.ops->num_batches(e.task, "train"), 5); /* max_batch left epoch 3's data in place */
    env_close(&e);
}

/* a Megatron-format split (document index after the pointers) reads the same */
static void test_language_modeling_megatron_split(void **s)
{
    (void)s;
    char dir[128], cmd[512], prefix[256];
    snprintf(dir, sizeof dir, "%s/megatron", root);
    example_dir(dir);
    snprintf(prefix, sizeof prefix, "%s/valid", dir);
    static const int32_t items[] = {10, 11, 2, 12, 2, 2, 13, 14, 15, 16, 17, 2, 18, 2};
    static const int64_t sizes[] = {3, 2, 1, 6, 2};
    static const int64_t docs[] = {0, 2, 5};
    if (moe_idx_write_megatron(prefix, 8, items, sizes, 5, docs, 3) != MOE_OK)
        fail_msg("megatron writer: %s", moe_data_error());
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 %s", dir);
    env e;
    env_ok(&e, cmd);
    moe_batch b;
    assert_int_equal(e.ops->get_batch(e.task, "valid", 0, &b), MOE_OK);
    expect_row(&b, 0, (const int32_t[]){2, 18}, (const int32_t[]){18, 2}, 2);
    e.ops->free_batch(e.task, &b);
    env_close(&e);

    /* tokenizer ids without a dict.txt: --vocab-size 30, end of document 2
     * (so blocks start as with fairseq's eos), padding 30, 32 types */
    char ids[128];
    snprintf(ids, sizeof ids, "%s/ids", root);
    mkdir_p(ids);
    snprintf(prefix, sizeof prefix, "%s/valid", ids);
    assert_int_equal(moe_idx_write_megatron(prefix, 8, items, sizes, 5, docs, 3), MOE_OK);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 2 --vocab-size 30 --eod-id 2 %s", ids);
    env_ok(&e, cmd);
    assert_int_equal(e.ops->vocab_size(e.task), 32);
    assert_int_equal(e.ops->padding_idx(e.task), 30);
    assert_int_equal(e.ops->get_batch(e.task, "valid", 0, &b), MOE_OK);
    assert_int_equal(b.B, 2);
    for (int i = 2; i < 4; i++) /* block 3 (2 tokens) right-padded with 30 */
        assert_int_equal(b.src[i], 30);
    e.ops->free_batch(e.task, &b);
    env_close(&e);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 2 %s", ids);
    expect_fail(cmd, NULL, "dict.txt not found", "--vocab-size", NULL);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 2 --vocab-size 10 %s", ids);
    expect_fail(cmd, "valid", "valid.bin", "18", NULL); /* ids beyond the vocabulary */
}

static void test_language_modeling_bad_input(void **s)
{
    (void)s;
    char dir[128], cmd[600];
    snprintf(dir, sizeof dir, "%s/bad", root);
    example_dir(dir);
    expect_fail(BASE "--batch-size 1", NULL, "needs DATA", NULL);
    snprintf(cmd, sizeof cmd, BASE "--batch-size 1 %s/nowhere", root);
    expect_fail(cmd, NULL, "nowhere/dict.txt", NULL);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 --dataset-impl lazy %s", dir);
    expect_fail(cmd, NULL, "--dataset-impl lazy", "mmap", NULL);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 %s", dir);
    expect_fail(cmd, "test", "split 'test' not found", "test.idx", NULL);
    /* blocks longer than --tokens-per-sample in validation, without the skip flag */
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 --sample-break-mode eos %s", dir);
    expect_fail(cmd, "valid", "--skip-invalid-size-inputs-valid-test", "max_positions=4", NULL);

    /* a dictionary smaller than the ids in the data: refused when read, naming the file */
    char small[128];
    snprintf(small, sizeof small, "%s/small", root);
    mkdir_p(small);
    write_dict(small, 16);
    write_split(small, "valid", example, EXAMPLE_N);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 %s", small);
    expect_fail(cmd, "valid", "valid.bin", "18", "16", NULL);

    /* an empty split */
    char empty[128];
    snprintf(empty, sizeof empty, "%s/empty", root);
    mkdir_p(empty);
    write_dict(empty, 24);
    write_split(empty, "valid", example, 0);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 %s", empty);
    expect_fail(cmd, "valid", "empty", NULL);

    /* valid1 present but not listed */
    write_split(dir, "valid1", example, EXAMPLE_N);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 %s", dir);
    expect_fail(cmd, NULL, "valid1", "--ignore-unused-valid-subsets", NULL);
    env e;
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 --valid-subset valid,valid1 %s", dir);
    env_ok(&e, cmd);
    assert_int_equal(e.ops->num_batches(e.task, "valid1"), 4);
    env_close(&e);
    snprintf(cmd, sizeof cmd, BASE "--tokens-per-sample 4 --batch-size 1 --ignore-unused-valid-subsets %s", dir);
    env_ok(&e, cmd);
    env_close(&e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_language_modeling_none_blocks_order_and_epochs),
        cmocka_unit_test(test_language_modeling_break_modes_and_bos),
        cmocka_unit_test(test_language_modeling_max_tokens),
        cmocka_unit_test(test_language_modeling_sharding),
        cmocka_unit_test(test_language_modeling_data_shards_and_combine),
        cmocka_unit_test(test_language_modeling_megatron_split),
        cmocka_unit_test(test_language_modeling_bad_input),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
