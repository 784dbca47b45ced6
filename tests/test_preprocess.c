/* test_preprocess.c: moelm-preprocess run as a user would (end to end).
 *
 * fairseq's own test vector byte for byte (DATA_SPEC.md §1.8: dict.txt,
 * train.bin, the 74-byte train.idx, the log lines on stdout and in
 * preprocess.log); output independent of --workers on LF, CRLF and CR files
 * (and equal across them, as a sequential read); the zero-line summary, the
 * "1e+02" percent, --srcdict ignoring the size flags, valid1/test1 names,
 * --dict-only; each bad input refused with one line naming the file and the
 * problem, leaving no dataset and no temporary behind; GPT-2 BPE on the way
 * in with a tiny encoder.json/vocab.bpe written here.
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

#include "tmpdir.h"

#include "data/bpe.h"
#include "runcmd.h"
#include "testutil.h"

static char g_dir[64];

static int setup_dir(void **state)
{
    (void)state;
    return moe_test_mkdtemp(g_dir, sizeof g_dir, "prep");
}

static int remove_dir(void **state)
{
    (void)state;
    return moe_test_rmtree(g_dir);
}

static char *path_of(const char *name)
{
    static char path[4][512];
    static int turn;
    turn = (turn + 1) % 4;
    snprintf(path[turn], sizeof path[turn], "%s/%s", g_dir, name);
    return path[turn];
}

static void write_bytes(const char *name, const void *data, size_t n)
{
    FILE *f = fopen(path_of(name), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void write_text(const char *name, const char *text) { write_bytes(name, text, strlen(text)); }

/* The file's bytes (malloc'd, NUL-terminated); *n its size. NULL if absent. */
static char *slurp(const char *name, size_t *n)
{
    FILE *f = fopen(path_of(name), "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
    buf[len] = '\0';
    fclose(f);
    if (n)
        *n = (size_t)len;
    return buf;
}

static int exists(const char *name)
{
    struct stat sb;
    return stat(path_of(name), &sb) == 0;
}

/* Runs moelm-preprocess in the test directory with `args`. */
static void run(const char *args, moe_cmd_result *r)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd '%s' && %s/moelm-preprocess %s", g_dir, MOE_TEST_BIN_DIR, args);
    assert_int_equal(moe_run_shell(cmd, r), 0);
}

static void run_ok(const char *args, moe_cmd_result *r)
{
    run(args, r);
    if (r->status != 0)
        fail_msg("moelm-preprocess %s: exit %d, stderr: %s", args, r->status, r->err);
    assert_string_equal(r->err, "");
}

/* A failing run: the exit status, one line on stderr starting with the
 * program name, holding every needle (NULL-terminated). */
static void run_fails(const char *args, int status, ...)
{
    moe_cmd_result r;
    run(args, &r);
    if (r.status != status)
        fail_msg("moelm-preprocess %s: expected exit %d, found %d; stderr: %s", args, status, r.status, r.err);
    assert_int_equal(moe_count_lines(r.err, ""), 1);
    assert_non_null(strstr(r.err, "moelm-preprocess: error: "));
    va_list ap;
    va_start(ap, status);
    for (const char *needle; (needle = va_arg(ap, const char *)) != NULL;)
        if (!strstr(r.err, needle))
            fail_msg("stderr \"%s\" lacks \"%s\"", r.err, needle);
    va_end(ap);
    moe_cmd_result_free(&r);
}

/* Every stdout line is "YYYY-MM-DD HH:MM:SS | INFO | fairseq_cli.preprocess | <message>";
 * returns the messages joined by '\n'. */
static char *messages_of(const char *out)
{
    static char buf[1 << 14];
    size_t o = 0;
    for (const char *line = out; *line;) {
        const char *end = strchr(line, '\n');
        assert_non_null(end);
        const char *prefix = " | INFO | fairseq_cli.preprocess | ";
        assert_true(end - line > 19 + (long)strlen(prefix));
        for (int i = 0; i < 19; i++) {
            char c = line[i];
            if (i == 4 || i == 7)
                assert_int_equal(c, '-');
            else if (i == 10)
                assert_int_equal(c, ' ');
            else if (i == 13 || i == 16)
                assert_int_equal(c, ':');
            else
                assert_true(c >= '0' && c <= '9');
        }
        assert_memory_equal(line + 19, prefix, strlen(prefix));
        const char *msg = line + 19 + strlen(prefix);
        memcpy(buf + o, msg, (size_t)(end - msg) + 1);
        o += (size_t)(end - msg) + 1;
        line = end + 1;
    }
    buf[o] = '\0';
    return buf;
}

/* The messages after the Namespace line. */
static const char *after_namespace(const char *msgs)
{
    assert_memory_equal(msgs, "Namespace(", 10);
    const char *nl = strchr(msgs, '\n');
    assert_non_null(nl);
    return nl + 1;
}

static void expect_same_file(const char *a, const char *b)
{
    size_t na, nb;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    assert_non_null(x);
    assert_non_null(y);
    if (na != nb || memcmp(x, y, na) != 0)
        fail_msg("%s and %s differ (%zu and %zu bytes)", a, b, na, nb);
    free(x);
    free(y);
}

static void test_preprocess_fairseq_test_vector(void **state)
{
    (void)state;
    write_text("train.txt", "the cat sat\nthe dog\n\na cat\n");
    write_text("valid.txt", "the bird sat\n<unk> cat\n");
    moe_cmd_result r;
    run_ok("--only-source --trainpref train.txt --validpref valid.txt --destdir tv", &r);
    char *msgs = messages_of(r.out);
    assert_string_equal(after_namespace(msgs), "[None] Dictionary: 16 types\n"
                                               "[None] train.txt: 4 sents, 11 tokens, 0.0% replaced (by <unk>)\n"
                                               "[None] Dictionary: 16 types\n"
                                               "[None] valid.txt: 2 sents, 7 tokens, 14.3% replaced (by <unk>)\n"
                                               "Wrote preprocessed data to tv\n");
    assert_non_null(strstr(msgs, "Namespace(bpe=None, dataset_impl='mmap', destdir='tv', dict_only=False, "));
    assert_non_null(strstr(msgs, "nwordssrc=-1, only_source=True, padding_factor=8, source_lang=None, srcdict=None, "
                                 "target_lang=None, task='translation', testpref=None, thresholdsrc=0, "));
    assert_non_null(strstr(msgs, "trainpref='train.txt', validpref='valid.txt', workers=1)\n"));
    /* the log file holds the bare messages */
    char *log = slurp("tv/preprocess.log", NULL);
    assert_string_equal(log, msgs);
    free(log);
    char *dict = slurp("tv/dict.txt", NULL);
    assert_string_equal(dict, "cat 2\nthe 2\na 1\ndog 1\nsat 1\nmadeupword0000 0\nmadeupword0001 0\n"
                              "madeupword0002 0\nmadeupword0003 0\nmadeupword0004 0\nmadeupword0005 0\n"
                              "madeupword0006 0\n");
    free(dict);
    static const unsigned char train_bin[] = {5, 0, 4, 0, 8, 0, 2, 0, 5, 0, 7, 0, 2, 0, 2, 0, 6, 0, 4, 0, 2, 0};
    static const unsigned char train_idx[74] = {
        0x4d, 0x4d, 0x49, 0x44, 0x49, 0x44, 0x58, 0, 0, /* magic */
        1, 0, 0, 0, 0, 0, 0, 0,                         /* version */
        8,                                              /* uint16 */
        4, 0, 0, 0, 0, 0, 0, 0,                         /* count */
        4, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, /* sizes */
        0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, /* pointers */
        14, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0};
    static const unsigned char valid_bin[] = {5, 0, 3, 0, 8, 0, 2, 0, 3, 0, 4, 0, 2, 0};
    size_t n;
    char *b = slurp("tv/train.bin", &n);
    assert_int_equal(n, sizeof train_bin);
    assert_memory_equal(b, train_bin, n);
    free(b);
    b = slurp("tv/train.idx", &n);
    assert_int_equal(n, 74);
    assert_memory_equal(b, train_idx, n);
    free(b);
    b = slurp("tv/valid.bin", &n);
    assert_int_equal(n, sizeof valid_bin);
    assert_memory_equal(b, valid_bin, n);
    free(b);
    moe_cmd_result_free(&r);
    /* more workers than lines: empty chunks change nothing */
    run_ok("--trainpref train.txt --validpref valid.txt --destdir tv7 --workers 7", &r);
    moe_cmd_result_free(&r);
    static const char *const files[] = {"dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx"};
    for (int f = 0; f < 5; f++) {
        char a[64], c[64];
        snprintf(a, sizeof a, "tv/%s", files[f]);
        snprintf(c, sizeof c, "tv7/%s", files[f]);
        expect_same_file(a, c);
    }
    /* a second run reusing the dictionary appends to the log */
    run_ok("--srcdict tv/dict.txt --validpref valid.txt --destdir tv", &r);
    log = slurp("tv/preprocess.log", NULL);
    assert_int_equal(moe_count_lines(log, "Namespace("), 2);
    assert_int_equal(moe_count_lines(log, "[None] valid.txt: 2 sents, 7 tokens, 14.3% replaced (by <unk>)"), 2);
    free(log);
    moe_cmd_result_free(&r);
}

/* A few thousand random lines: words, empty lines, multi-byte text, NBSP
 * inside a "word", literal specials, a BOM at the start. */
static char *random_corpus(size_t *len)
{
    moe_test_rng rng = moe_test_rng_make(11);
    static const char *const extra[] = {"\xc3\xa9t\xc3\xa9", "\xe6\x97\xa5\xe6\x9c\xac", "<unk>", "</s>",
                                        "x\xc2\xa0y", "madeupword0001", "10", "9", "\xe2\x80\xa8"};
    size_t cap = 1 << 20, o = 0;
    char *t = malloc(cap);
    assert_non_null(t);
    o += (size_t)snprintf(t, cap, "\xef\xbb\xbfstart\n");
    for (int line = 0; line < 4000; line++) {
        int words = (int)moe_test_rng_int(&rng, 0, 14);
        for (int w = 0; w < words; w++) {
            int64_t k = moe_test_rng_int(&rng, 0, 420);
            if (w > 0)
                t[o++] = moe_test_rng_int(&rng, 0, 10) == 0 ? '\t' : ' ';
            if (k < 400)
                o += (size_t)snprintf(t + o, cap - o, "w%lld", (long long)(k * k % 397));
            else
                o += (size_t)snprintf(t + o, cap - o, "%s", extra[k % 9]);
        }
        t[o++] = '\n';
        assert_true(o + 256 < cap);
    }
    *len = o;
    return t;
}

/* The same text with every "\n" replaced by `eol`. */
static void write_with_eol(const char *name, const char *lf, size_t n, const char *eol)
{
    size_t el = strlen(eol), o = 0;
    char *t = malloc(2 * n + 1);
    assert_non_null(t);
    for (size_t i = 0; i < n; i++) {
        if (lf[i] == '\n') {
            memcpy(t + o, eol, el);
            o += el;
        } else {
            t[o++] = lf[i];
        }
    }
    write_bytes(name, t, o);
    free(t);
}

static void test_preprocess_workers_byte_identical(void **state)
{
    (void)state;
    size_t n;
    char *lf = random_corpus(&n);
    write_with_eol("w-lf.txt", lf, n, "\n");
    write_with_eol("w-crlf.txt", lf, n, "\r\n");
    write_with_eol("w-cr.txt", lf, n, "\r");
    write_bytes("w-valid.txt", lf, n / 3);
    free(lf);
    static const char *const eols[] = {"lf", "crlf", "cr"};
    static const int workers[] = {1, 2, 3, 7};
    char args[512], dir[64], a[128], b[128];
    for (int e = 0; e < 3; e++) {
        for (int w = 0; w < 4; w++) {
            moe_cmd_result r;
            snprintf(args, sizeof args, "--trainpref w-%s.txt --validpref w-valid.txt --destdir w-%s-%d --workers %d",
                     eols[e], eols[e], workers[w], workers[w]);
            run_ok(args, &r);
            snprintf(dir, sizeof dir, "w-%s-%d", eols[e], workers[w]);
            char want[128];
            snprintf(want, sizeof want, "[None] w-%s.txt: 4001 sents, ", eols[e]);
            assert_non_null(strstr(r.out, want));
            moe_cmd_result_free(&r);
            static const char *const files[] = {"dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx"};
            for (int f = 0; f < 5; f++) {
                snprintf(a, sizeof a, "w-lf-1/%s", files[f]);
                snprintf(b, sizeof b, "%s/%s", dir, files[f]);
                if (e > 0 || w > 0)
                    expect_same_file(a, b);
            }
            /* no temporary is left */
            char cmd[256];
            snprintf(cmd, sizeof cmd, "test $(ls -A '%s/%s' | wc -l) -eq 6", g_dir, dir);
            assert_int_equal(system(cmd), 0);
        }
    }
    /* the BOM is part of the first word, the NBSP splits x and y */
    char *dict = slurp("w-lf-1/dict.txt", NULL);
    assert_non_null(strstr(dict, "\n\xef\xbb\xbfstart 1\n"));
    assert_null(strstr(dict, "x\xc2\xa0y"));
    assert_non_null(strstr(dict, "\nx "));
    free(dict);
}

static void test_preprocess_zero_lines(void **state)
{
    (void)state;
    write_text("empty.txt", "");
    moe_cmd_result r;
    run_ok("--trainpref empty.txt --validpref empty.txt --destdir z", &r);
    assert_string_equal(after_namespace(messages_of(r.out)), "[None] Dictionary: 8 types\n"
                                                             "[None] empty.txt: 0 sents, 0 tokens (by <unk>)\n"
                                                             "[None] Dictionary: 8 types\n"
                                                             "[None] empty.txt: 0 sents, 0 tokens (by <unk>)\n"
                                                             "Wrote preprocessed data to z\n");
    moe_cmd_result_free(&r);
    char *dict = slurp("z/dict.txt", NULL);
    assert_string_equal(dict, "madeupword0000 0\nmadeupword0001 0\nmadeupword0002 0\nmadeupword0003 0\n");
    free(dict);
    size_t n;
    char *idx = slurp("z/train.idx", &n);
    assert_int_equal(n, 26);
    free(idx);
    char *bin = slurp("z/valid.bin", &n);
    assert_int_equal(n, 0);
    free(bin);
}

static void test_preprocess_percent_formats(void **state)
{
    (void)state;
    write_text("p-train.txt", "a b c d\n");
    /* 3000 unknown words + eos: 99.97% -> "1e+02" */
    size_t cap = 3000 * 8, o = 0;
    char *t = malloc(cap);
    for (int i = 0; i < 3000; i++)
        o += (size_t)snprintf(t + o, cap - o, "%su%d", i ? " " : "", i);
    t[o++] = '\n';
    t[o] = '\0';
    write_text("p-unk.txt", t);
    free(t);
    write_text("p-half.txt", "a zz\n");       /* 1 of 3 -> 33.3 */
    write_text("p-five.txt", "a b c d zz a b c d a b c d a b c d a b\n"); /* 1 of 20 -> 5.0 */
    moe_cmd_result r;
    run_ok("--trainpref p-train.txt --validpref p-unk.txt,p-half.txt,p-five.txt --destdir p", &r);
    assert_non_null(strstr(r.out, "[None] p-unk.txt: 1 sents, 3001 tokens, 1e+02% replaced (by <unk>)\n"));
    assert_non_null(strstr(r.out, "[None] p-half.txt: 1 sents, 3 tokens, 33.3% replaced (by <unk>)\n"));
    assert_non_null(strstr(r.out, "[None] p-five.txt: 1 sents, 20 tokens, 5.0% replaced (by <unk>)\n"));
    moe_cmd_result_free(&r);
}

static void test_preprocess_srcdict_ignores_size_flags(void **state)
{
    (void)state;
    write_text("s-train.txt", "b a c\nb a\nb\n");
    write_text("s-dict.txt", "a 7\nb 5\nc 1\nd 0\n");
    moe_cmd_result r;
    run_ok("--trainpref s-train.txt --srcdict s-dict.txt --nwordssrc 5 --thresholdsrc 3 --padding-factor 16 "
           "--destdir s",
           &r);
    assert_non_null(strstr(r.out, "[None] Dictionary: 8 types\n"));
    moe_cmd_result_free(&r);
    char *dict = slurp("s/dict.txt", NULL);
    assert_string_equal(dict, "a 7\nb 5\nc 1\nd 0\n");
    free(dict);
    size_t n;
    char *bin = slurp("s/train.bin", &n);
    static const unsigned char want[] = {5, 0, 4, 0, 6, 0, 2, 0, 5, 0, 4, 0, 2, 0, 5, 0, 2, 0};
    assert_int_equal(n, sizeof want);
    assert_memory_equal(bin, want, n);
    free(bin);
    /* the same flags do apply when the dictionary is built: nwords counts the specials */
    run_ok("--trainpref s-train.txt --nwordssrc 6 --padding-factor 1 --destdir s2", &r);
    moe_cmd_result_free(&r);
    dict = slurp("s2/dict.txt", NULL);
    assert_string_equal(dict, "b 3\na 2\n");
    free(dict);
    run_ok("--trainpref s-train.txt --thresholdsrc 2 --padding-factor 4 --destdir s3", &r);
    moe_cmd_result_free(&r);
    dict = slurp("s3/dict.txt", NULL);
    assert_string_equal(dict, "b 3\na 2\nmadeupword0000 0\nmadeupword0001 0\n");
    free(dict);
}

static void test_preprocess_split_names(void **state)
{
    (void)state;
    write_text("n-train.txt", "x y\n");
    write_text("n-v0.txt", "x\n");
    write_text("n-v1.txt", "y\ny\n");
    write_text("n-t0.txt", "z\n");
    write_text("n-t1.txt", "x y z\n");
    moe_cmd_result r;
    run_ok("--trainpref n-train.txt --validpref n-v0.txt,n-v1.txt --testpref n-t0.txt,n-t1.txt --destdir n", &r);
    const char *m = after_namespace(messages_of(r.out));
    const char *order[] = {"n-train.txt: 1 sents", "n-v0.txt: 1 sents", "n-v1.txt: 2 sents", "n-t0.txt: 1 sents",
                           "n-t1.txt: 1 sents, 4 tokens, 25.0% replaced"};
    for (int i = 0; i < 5; i++) {
        const char *at = strstr(m, order[i]);
        if (!at)
            fail_msg("no \"%s\" in the log, or out of order", order[i]);
        m = at;
    }
    moe_cmd_result_free(&r);
    static const char *const names[] = {"train", "valid", "valid1", "test", "test1"};
    static const long sizes[] = {6, 4, 8, 4, 8};
    for (int i = 0; i < 5; i++) {
        char name[64];
        size_t n;
        snprintf(name, sizeof name, "n/%s.bin", names[i]);
        char *b = slurp(name, &n);
        assert_non_null(b);
        assert_int_equal(n, sizes[i]);
        free(b);
        snprintf(name, sizeof name, "n/%s.idx", names[i]);
        assert_true(exists(name));
    }
    assert_false(exists("n/valid2.bin"));
}

static void test_preprocess_dict_only(void **state)
{
    (void)state;
    write_text("d-train.txt", "q r r\n");
    moe_cmd_result r;
    run_ok("--trainpref d-train.txt --dict-only --padding-factor 1 --destdir d", &r);
    assert_null(strstr(r.out, "Wrote preprocessed data"));
    moe_cmd_result_free(&r);
    char *dict = slurp("d/dict.txt", NULL);
    assert_string_equal(dict, "r 2\nq 1\n");
    free(dict);
    assert_false(exists("d/train.bin"));
}

/* Only preprocess.log may remain in a destdir after a failure. */
static void expect_only_log(const char *dir)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "test \"$(ls -A '%s/%s')\" = preprocess.log", g_dir, dir);
    if (system(cmd) != 0) {
        snprintf(cmd, sizeof cmd, "ls -A '%s/%s' >&2", g_dir, dir);
        if (system(cmd) != 0) { /* only a listing for the failure message */
        }
        fail_msg("%s holds more than preprocess.log after a failure", dir);
    }
}

static void test_preprocess_bad_inputs(void **state)
{
    (void)state;
    write_text("ok.txt", "a b\nc\n");
    run_fails("--trainpref missing.txt --destdir b1", 1, "--trainpref", "'missing.txt'", "No such file", NULL);
    expect_only_log("b1");
    run_fails("--trainpref ok.txt --validpref ok.txt,gone.txt --destdir b1", 1, "--validpref", "'gone.txt'", NULL);
    expect_only_log("b1");
    /* an existing dictionary is not overwritten by a new count */
    moe_cmd_result r;
    run_ok("--trainpref ok.txt --destdir b2", &r);
    moe_cmd_result_free(&r);
    run_fails("--trainpref ok.txt --destdir b2", 1, "b2/dict.txt already exists", "--srcdict", NULL);
    /* invalid UTF-8 anywhere: the file, the line and the byte offset; with
     * --workers the line is still the file's */
    write_bytes("latin1.txt", "caf\xe9\n", 5);
    run_fails("--trainpref latin1.txt --destdir b3", 1, "'latin1.txt' line 1", "byte offset 3", "0xe9", "UTF-8",
              NULL);
    expect_only_log("b3");
    size_t n = 0, cap = 64 * 1024;
    char *t = malloc(cap);
    for (int i = 0; i < 3000; i++)
        n += (size_t)snprintf(t + n, cap - n, "line %d\r\n", i);
    memcpy(t + n, "bad \xff\r\n", 7);
    n += 7;
    write_bytes("late-bad.txt", t, n);
    free(t);
    run_fails("--trainpref ok.txt --validpref late-bad.txt --destdir b4 --workers 3", 1, "'late-bad.txt' line 3001",
              NULL);
    expect_only_log("b4");
    run_fails("--trainpref late-bad.txt --destdir b5 --workers 7", 1, "line 3001", NULL);
    expect_only_log("b5");
    /* command-line mistakes: exit 2, nothing written */
    run_fails("--trainpref ok.txt --dataset-impl lazy --destdir b6", 2, "--dataset-impl", "'lazy'", "only mmap",
              NULL);
    run_fails("--trainpref ok.txt --dataset-impl nope --destdir b6", 2, "--dataset-impl", "mmap", NULL);
    assert_false(exists("b6"));
    run_fails("--trainpref ok.txt --source-lang en --destdir b6", 2, "--source-lang", "monolingual", NULL);
    run_fails("--trainpref ok.txt --target-lang de --destdir b6", 2, "--target-lang", NULL);
    run_fails("--destdir b6", 2, "--trainpref must be set", NULL);
    run_fails("--trainpref ok.txt --workers 0", 2, "--workers", NULL);
    run_fails("--trainpref ok.txt --bpe gpt2", 2, "--gpt2-encoder-json", "--gpt2-vocab-bpe", NULL);
    run_fails("--trainpref ok.txt --keep-empty", 2, "--keep-empty", NULL);
    run_fails("--trainpref ok.txt --nwordstgt 5", 2, "unrecognized argument: --nwordstgt", NULL);
    run_fails("--trainpref ok.txt --tokenizer moses --destdir b8", 1, "--tokenizer", "'moses'", "tokenizer.json",
              NULL);
    expect_only_log("b8");
    assert_false(exists("b6"));
    /* a broken --srcdict names its line */
    write_text("broken-dict.txt", "a 1\nb\n");
    run_fails("--srcdict broken-dict.txt --validpref ok.txt --destdir b7", 1, "'broken-dict.txt' line 2", NULL);
    expect_only_log("b7");
}

static void test_preprocess_help_and_task(void **state)
{
    (void)state;
    moe_cmd_result r;
    run_ok("--help", &r);
    assert_non_null(strstr(r.out, "usage: moelm-preprocess"));
    assert_non_null(strstr(r.out, "--trainpref"));
    assert_non_null(strstr(r.out, "--keep-empty"));
    moe_cmd_result_free(&r);
    write_text("t-train.txt", "a\n");
    run_ok("--task language_modeling --only-source --trainpref t-train.txt --destdir t", &r);
    assert_non_null(strstr(r.out, "task='language_modeling'"));
    moe_cmd_result_free(&r);
}

/* ------------------------------------------------------------------ BPE */

/* A tiny GPT-2-format vocabulary: the 256 byte chars as ids 0..255, then
 * the merges of "hello" and " world" as ids 256...; written as fairseq's
 * encoder.json + vocab.bpe and as the equivalent Hugging Face tokenizer.json. */
static void write_tiny_bpe(void)
{
    static const char *const merges[][2] = {
        {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\xc4\xa0", "w"}, {"o", "r"}, {"\xc4\xa0w", "or"},
        {"\xc4\xa0wor", "l"}, {"\xc4\xa0worl", "d"},
    };
    const int nm = (int)(sizeof merges / sizeof merges[0]);
    char vocab[8192];
    size_t o = 0;
    vocab[o++] = '{';
    for (int b = 0; b < 256; b++) {
        uint32_t cp = moe_bpe_byte_to_char((uint8_t)b);
        char u[8];
        int n = 0;
        if (cp < 0x80) {
            u[n++] = (char)cp;
        } else {
            u[n++] = (char)(0xC0 | (cp >> 6));
            u[n++] = (char)(0x80 | (cp & 0x3F));
        }
        u[n] = '\0';
        o += (size_t)snprintf(vocab + o, sizeof vocab - o, "%s\"%s%s\": %d", b ? ", " : "",
                              cp == '"' || cp == '\\' ? "\\" : "", u, b);
    }
    for (int i = 0; i < nm; i++)
        o += (size_t)snprintf(vocab + o, sizeof vocab - o, ", \"%s%s\": %d", merges[i][0], merges[i][1], 256 + i);
    o += (size_t)snprintf(vocab + o, sizeof vocab - o, "}");
    assert_true(o + 1 < sizeof vocab);
    FILE *e = fopen(path_of("encoder.json"), "wb"), *v = fopen(path_of("vocab.bpe"), "wb"),
         *t = fopen(path_of("tokenizer.json"), "wb");
    assert_non_null(e);
    assert_non_null(v);
    assert_non_null(t);
    fprintf(e, "%s\n", vocab);
    fprintf(v, "#version: 0.2\n");
    fprintf(t, "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": [], "
               "\"normalizer\": null, \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
               "\"trim_offsets\": true, \"use_regex\": true}, \"post_processor\": null, \"decoder\": null, "
               "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, "
               "\"continuing_subword_prefix\": \"\", \"end_of_word_suffix\": \"\", \"fuse_unk\": false, "
               "\"byte_fallback\": false, \"vocab\": %s, \"merges\": [",
            vocab);
    for (int i = 0; i < nm; i++) {
        fprintf(v, "%s %s\n", merges[i][0], merges[i][1]);
        fprintf(t, "%s\"%s %s\"", i ? ", " : "", merges[i][0], merges[i][1]);
    }
    fprintf(t, "]}}\n");
    fclose(e);
    fclose(v);
    fclose(t);
}

static void test_preprocess_gpt2_bpe(void **state)
{
    (void)state;
    write_tiny_bpe();
    /* ids: "hello" 259, " world" 264, "h" 104, "!" 33, "\n" never (lines are stripped) */
    write_text("bpe.txt", "  hello world \t\n\n\xe3\x80\x80\nhello\nh!\r\nhello world\n");
    moe_cmd_result r;
    run_ok("--trainpref bpe.txt --validpref bpe.txt --bpe gpt2 --gpt2-encoder-json encoder.json "
           "--gpt2-vocab-bpe vocab.bpe --destdir g",
           &r);
    assert_non_null(strstr(r.out, "[None] bpe.txt: 4 sents, 11 tokens, 0.0% replaced (by <unk>)\n"));
    moe_cmd_result_free(&r);
    char *dict = slurp("g/dict.txt", NULL);
    /* counts: 259 x3, 264 x2, 104 x1, 33 x1; ties by string: "104" < "33" */
    assert_string_equal(dict, "259 3\n264 2\n104 1\n33 1\n"); /* 8 entries: no padding */
    free(dict);
    size_t n;
    char *bin = slurp("g/train.bin", &n);
    static const unsigned char want[] = {4, 0, 5, 0, 2, 0, 4, 0, 2, 0, 6, 0, 7, 0, 2, 0, 4, 0, 5, 0, 2, 0};
    assert_int_equal(n, sizeof want);
    assert_memory_equal(bin, want, n);
    free(bin);
    /* the same with several workers, and with --keep-empty (two empty items) */
    run_ok("--trainpref bpe.txt --bpe gpt2 --gpt2-encoder-json encoder.json --gpt2-vocab-bpe vocab.bpe "
           "--destdir g3 --workers 3",
           &r);
    moe_cmd_result_free(&r);
    expect_same_file("g/train.bin", "g3/train.bin");
    expect_same_file("g/train.idx", "g3/train.idx");
    expect_same_file("g/dict.txt", "g3/dict.txt");
    run_ok("--trainpref bpe.txt --bpe gpt2 --gpt2-encoder-json encoder.json --gpt2-vocab-bpe vocab.bpe "
           "--keep-empty --destdir gk --workers 2",
           &r);
    assert_non_null(strstr(r.out, "[None] bpe.txt: 6 sents, 13 tokens, 0.0% replaced (by <unk>)\n"));
    moe_cmd_result_free(&r);
    bin = slurp("gk/train.bin", &n);
    static const unsigned char want_k[] = {4, 0, 5, 0, 2, 0, 2, 0, 2, 0, 4, 0, 2, 0, 6, 0, 7, 0, 2, 0,
                                           4, 0, 5, 0, 2, 0};
    assert_int_equal(n, sizeof want_k);
    assert_memory_equal(bin, want_k, n);
    free(bin);
    /* with a fairseq-style --srcdict over GPT-2 ids: unknown ids are replaced */
    write_text("gpt2-dict.txt", "264 9\n259 8\n");
    run_ok("--srcdict gpt2-dict.txt --validpref bpe.txt --bpe gpt2 --gpt2-encoder-json encoder.json "
           "--gpt2-vocab-bpe vocab.bpe --destdir gs",
           &r);
    assert_non_null(strstr(r.out, "[None] bpe.txt: 4 sents, 11 tokens, 18.2% replaced (by <unk>)\n"));
    moe_cmd_result_free(&r);
    bin = slurp("gs/valid.bin", &n);
    static const unsigned char want_s[] = {5, 0, 4, 0, 2, 0, 5, 0, 2, 0, 3, 0, 3, 0, 2, 0, 5, 0, 4, 0, 2, 0};
    assert_int_equal(n, sizeof want_s);
    assert_memory_equal(bin, want_s, n);
    free(bin);
    /* the same vocabulary as a tokenizer.json gives the same bytes */
    run_ok("--trainpref bpe.txt --validpref bpe.txt --tokenizer tokenizer.json --destdir gt --workers 2", &r);
    moe_cmd_result_free(&r);
    expect_same_file("g/dict.txt", "gt/dict.txt");
    expect_same_file("g/train.bin", "gt/train.bin");
    expect_same_file("g/train.idx", "gt/train.idx");
    expect_same_file("g/valid.bin", "gt/valid.bin");
    /* no BPE cache is left behind */
    char cmd[256];
    snprintf(cmd, sizeof cmd, "test $(ls -A '%s/g3' | wc -l) -eq 4", g_dir);
    assert_int_equal(system(cmd), 0);
    /* a missing BPE file is named */
    run_fails("--trainpref bpe.txt --bpe gpt2 --gpt2-encoder-json nope.json --gpt2-vocab-bpe vocab.bpe --destdir gx",
              1, "--gpt2-encoder-json", "'nope.json'", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_preprocess_fairseq_test_vector),
        cmocka_unit_test(test_preprocess_workers_byte_identical),
        cmocka_unit_test(test_preprocess_zero_lines),
        cmocka_unit_test(test_preprocess_percent_formats),
        cmocka_unit_test(test_preprocess_srcdict_ignores_size_flags),
        cmocka_unit_test(test_preprocess_split_names),
        cmocka_unit_test(test_preprocess_dict_only),
        cmocka_unit_test(test_preprocess_bad_inputs),
        cmocka_unit_test(test_preprocess_help_and_task),
        cmocka_unit_test(test_preprocess_gpt2_bpe),
    };
    return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
