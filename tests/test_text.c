/* test_text.c: line reading, worker chunks and tokenize_line (data/text.h).
 *
 * Universal newlines at every position a buffer can split them, strict UTF-8
 * with the line and offset in the message, chunked reads that equal the
 * sequential read for every chunk count on LF, CRLF and CR files, and the 29
 * whitespace code points of fairseq's tokenize_line. Files live in a fresh
 * directory under /tmp, removed at the end.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tmpdir.h"

#include "data/error.h"
#include "data/text.h"
#include "testutil.h"

static char g_dir[64];

static int setup_dir(void **state)
{
    (void)state;
    return moe_test_mkdtemp(g_dir, sizeof g_dir, "text");
}

static int remove_dir(void **state)
{
    (void)state;
    return moe_test_rmtree(g_dir);
}

static const char *write_file(const char *name, const void *data, size_t n)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
    return path;
}

/* All lines of [begin, end) joined as "line|line|..." (each line followed by '|'). */
static char *read_lines(const char *path, int64_t begin, int64_t end, char *out, size_t cap)
{
    moe_text_reader *r;
    assert_int_equal(moe_text_open(path, begin, end, &r), MOE_OK);
    size_t o = 0;
    for (;;) {
        const char *line;
        size_t n;
        assert_int_equal(moe_text_next(r, &line, &n), MOE_OK);
        if (!line)
            break;
        assert_true(o + n + 1 < cap);
        memcpy(out + o, line, n);
        o += n;
        out[o++] = '|';
    }
    out[o] = '\0';
    moe_text_close(r);
    return out;
}

static void expect_lines(const char *data, size_t n, const char *want)
{
    char buf[4096];
    const char *p = write_file("lines.txt", data, n);
    assert_string_equal(read_lines(p, 0, -1, buf, sizeof buf), want);
}

#define EXPECT_LINES(lit, want) expect_lines((lit), sizeof(lit) - 1, (want))

static void test_text_universal_newlines(void **state)
{
    (void)state;
    EXPECT_LINES("a\nb\r\nc\rd", "a|b|c|d|");
    EXPECT_LINES("", "");
    EXPECT_LINES("\n", "|");
    EXPECT_LINES("\r\n\r\n", "||");
    EXPECT_LINES("\r\r\n", "||");
    EXPECT_LINES("\n\r", "||");
    EXPECT_LINES("x\r", "x|");
    EXPECT_LINES("x\ny", "x|y|");
    /* U+2028, U+2029, U+0085, \v, \f and \x1c..\x1e do not end a line in a file */
    EXPECT_LINES("a\xe2\x80\xa8" "b\xc2\x85" "c\v\f\x1c\x1d\x1e" "d\n", "a\xe2\x80\xa8" "b\xc2\x85" "c\v\f\x1c\x1d\x1e" "d|");
    /* a BOM stays */
    EXPECT_LINES("\xef\xbb\xbfhi\n", "\xef\xbb\xbfhi|");
    /* a NUL is an ordinary character */
    const char *p = write_file("nul.txt", "a\0b\nc", 5);
    moe_text_reader *r;
    assert_int_equal(moe_text_open(p, 0, -1, &r), MOE_OK);
    const char *line;
    size_t len;
    assert_int_equal(moe_text_next(r, &line, &len), MOE_OK);
    assert_int_equal(len, 3);
    assert_memory_equal(line, "a\0b", 3);
    moe_text_close(r);
}

/* A "\r\n" pair split by the reader's 1 MiB block, and a line longer than the block. */
static void test_text_block_edges(void **state)
{
    (void)state;
    size_t block = 1u << 20;
    for (size_t at = block - 2; at <= block + 1; at++) {
        size_t n = at + 8;
        char *data = malloc(n);
        memset(data, 'x', n);
        data[at] = '\r';
        data[at + 1] = '\n';
        data[at + 2] = 'y';
        const char *p = write_file("edge.txt", data, n);
        moe_text_reader *r;
        assert_int_equal(moe_text_open(p, 0, -1, &r), MOE_OK);
        const char *line;
        size_t len;
        assert_int_equal(moe_text_next(r, &line, &len), MOE_OK);
        assert_int_equal(len, at);
        assert_int_equal(moe_text_next(r, &line, &len), MOE_OK);
        assert_int_equal(len, 6);
        assert_memory_equal(line, "yxxxxx", 6);
        assert_int_equal(moe_text_next(r, &line, &len), MOE_OK);
        assert_null(line);
        moe_text_close(r);
        free(data);
    }
    /* a multi-byte character across the block end */
    size_t n = block + 16;
    char *data = malloc(n);
    memset(data, 'a', n);
    memcpy(data + block - 2, "\xf0\x9f\x98\x80", 4);
    data[n - 1] = '\n';
    const char *p = write_file("long.txt", data, n);
    moe_text_reader *r;
    assert_int_equal(moe_text_open(p, 0, -1, &r), MOE_OK);
    const char *line;
    size_t len;
    assert_int_equal(moe_text_next(r, &line, &len), MOE_OK);
    assert_int_equal(len, n - 1);
    assert_memory_equal(line, data, n - 1);
    assert_int_equal(moe_text_line_number(r), 1);
    moe_text_close(r);
    free(data);
}

/* The reader fails on `data` and the message holds every needle (NULL-terminated). */
static void expect_utf8_error(const char *data, size_t n, ...)
{
    const char *p = write_file("bad.txt", data, n);
    moe_data_clear_error();
    moe_text_reader *r;
    assert_int_equal(moe_text_open(p, 0, -1, &r), MOE_OK);
    moe_status st = MOE_OK;
    for (;;) {
        const char *line;
        size_t len;
        st = moe_text_next(r, &line, &len);
        if (st != MOE_OK || !line)
            break;
    }
    moe_text_close(r);
    assert_int_equal(st, MOE_ERR_INVALID_ARG);
    const char *msg = moe_data_error();
    va_list ap;
    va_start(ap, n);
    for (const char *needle; (needle = va_arg(ap, const char *)) != NULL;)
        if (!strstr(msg, needle))
            fail_msg("message \"%s\" lacks \"%s\"", msg, needle);
    va_end(ap);
    assert_non_null(strstr(msg, "bad.txt"));
}

#define EXPECT_UTF8_ERROR(lit, ...) expect_utf8_error((lit), sizeof(lit) - 1, __VA_ARGS__)

static void test_text_utf8_strict(void **state)
{
    (void)state;
    EXPECT_LINES("\xf0\x9f\x98\x80 \xe2\x82\xac \xc3\xa9 \xf4\x8f\xbf\xbf\n",
                 "\xf0\x9f\x98\x80 \xe2\x82\xac \xc3\xa9 \xf4\x8f\xbf\xbf|");
    EXPECT_UTF8_ERROR("ok\nab\xff\n", "line 2", "byte offset 5", "0xff", "invalid start byte", NULL);
    EXPECT_UTF8_ERROR("\xc0\x80", "line 1", "byte offset 0", "0xc0", NULL);             /* overlong */
    EXPECT_UTF8_ERROR("x\r\xe0\x80\x80", "line 2", "byte offset 2", "continuation", NULL); /* overlong */
    EXPECT_UTF8_ERROR("a\r\nb\r\n\xed\xa0\x80", "line 3", "byte offset 6", NULL);       /* surrogate */
    EXPECT_UTF8_ERROR("\xf4\x90\x80\x80", "line 1", NULL);                                /* > U+10FFFF */
    EXPECT_UTF8_ERROR("\xf5\x80\x80\x80", "invalid start byte", NULL);
    EXPECT_UTF8_ERROR("a\xc3" "b", "byte offset 1", "continuation", NULL);
    EXPECT_UTF8_ERROR("abc\xe2\x82", "byte offset 3", "unexpected end of data", NULL); /* cut at the end */
    EXPECT_UTF8_ERROR("abc\xe2\x82\n", "byte offset 3", "continuation", NULL);
    EXPECT_UTF8_ERROR("\x80", "invalid start byte", NULL);
}

/* A reader that starts inside the file reports the absolute line number. */
static void test_text_error_line_in_chunk(void **state)
{
    (void)state;
    const char data[] = "one\r\ntwo\rthree\nfour \xfe\n";
    const char *p = write_file("chunk.txt", data, sizeof data - 1);
    moe_text_reader *r;
    assert_int_equal(moe_text_open(p, 15, -1, &r), MOE_OK);
    const char *line;
    size_t len;
    moe_data_clear_error();
    assert_int_equal(moe_text_next(r, &line, &len), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "line 4"));
    assert_non_null(strstr(moe_data_error(), "byte offset 20"));
    moe_text_close(r);
    /* the number of a line read from a range is the file's */
    assert_int_equal(moe_text_open(p, 9, 15, &r), MOE_OK);
    assert_int_equal(moe_text_next(r, &line, &len), MOE_OK);
    assert_int_equal(len, 5);
    assert_int_equal(moe_text_line_number(r), 3);
    moe_text_close(r);
}

static void test_text_open_errors(void **state)
{
    (void)state;
    moe_text_reader *r = NULL;
    char path[256];
    snprintf(path, sizeof path, "%s/absent.txt", g_dir);
    moe_data_clear_error();
    assert_int_equal(moe_text_open(path, 0, -1, &r), MOE_ERR_IO);
    assert_null(r);
    assert_non_null(strstr(moe_data_error(), "absent.txt"));
    assert_non_null(strstr(moe_data_error(), "No such file"));
    moe_data_clear_error();
    assert_int_equal(moe_text_open(g_dir, 0, -1, &r), MOE_ERR_IO);
    assert_non_null(strstr(moe_data_error(), "directory"));
    moe_data_clear_error();
}

/* Random files with LF, CRLF and CR ends, empty lines and multi-byte text:
 * the chunks of every count, read in order, give the sequential lines. */
static void test_text_chunks_equal_sequential(void **state)
{
    (void)state;
    moe_test_rng rng = moe_test_rng_make(7);
    static const char *const pieces[] = {"a", "bc", " ", "\xc3\xa9", "\xe2\x80\xa8", "\r", "\n", "\r\n", "\n\n", "\r\r"};
    size_t cap = 1 << 16;
    char *seq = malloc(cap), *chunked = malloc(cap), *data = malloc(4096);
    for (int trial = 0; trial < 300; trial++) {
        size_t n = 0;
        int count = (int)moe_test_rng_int(&rng, 0, 200);
        for (int k = 0; k < count; k++) {
            const char *pc = pieces[moe_test_rng_int(&rng, 0, 10)];
            memcpy(data + n, pc, strlen(pc));
            n += strlen(pc);
        }
        const char *p = write_file("chunks.txt", data, n);
        read_lines(p, 0, -1, seq, cap);
        for (int w = 1; w <= 9; w++) {
            int64_t off[10];
            assert_int_equal(moe_text_chunks(p, w, off), MOE_OK);
            assert_int_equal(off[0], 0);
            assert_int_equal(off[w], (int64_t)n);
            size_t o = 0;
            for (int i = 0; i < w; i++) {
                assert_true(off[i] <= off[i + 1]);
                if (off[i] > 0 && off[i] < (int64_t)n) /* a boundary never splits "\r\n" */
                    assert_false(data[off[i] - 1] == '\r' && data[off[i]] == '\n');
                if (off[i] > 0 && off[i] < (int64_t)n) /* and sits just after a line end */
                    assert_true(data[off[i] - 1] == '\n' || data[off[i] - 1] == '\r');
                read_lines(p, off[i], off[i + 1], chunked + o, cap - o);
                o += strlen(chunked + o);
            }
            if (strcmp(seq, chunked) != 0)
                fail_msg("trial %d, %d chunks: chunked read differs from the sequential one", trial, w);
        }
    }
    free(seq);
    free(chunked);
    free(data);
}

/* fairseq's find_offsets: just after the line holding byte i*(size/n). */
static void test_text_chunks_offsets(void **state)
{
    (void)state;
    const char data[] = "aaaa\nbb\ncccccc\r\ndd\n"; /* 19 bytes */
    const char *p = write_file("off.txt", data, sizeof data - 1);
    int64_t off[5];
    assert_int_equal(moe_text_chunks(p, 3, off), MOE_OK); /* chunk 6: bytes 6 and 12 */
    assert_int_equal(off[1], 8);
    assert_int_equal(off[2], 16);
    assert_int_equal(off[3], 19);
    const char crlf[] = "ab\r\ncd\r\n"; /* 2 chunks of 4: byte 4 starts "cd" */
    p = write_file("off2.txt", crlf, sizeof crlf - 1);
    assert_int_equal(moe_text_chunks(p, 2, off), MOE_OK);
    assert_int_equal(off[1], 8);
    const char mid[] = "a\r\nb\r\n"; /* 2 chunks of 3: byte 3 is after the pair */
    p = write_file("off3.txt", mid, sizeof mid - 1);
    assert_int_equal(moe_text_chunks(p, 2, off), MOE_OK);
    assert_int_equal(off[1], 6);
    const char mid2[] = "ab\r\ncd"; /* 2 chunks of 3: byte 3 is the "\n" of the pair */
    p = write_file("off4.txt", mid2, sizeof mid2 - 1);
    assert_int_equal(moe_text_chunks(p, 2, off), MOE_OK);
    assert_int_equal(off[1], 4);
    p = write_file("empty.txt", "", 0);
    assert_int_equal(moe_text_chunks(p, 4, off), MOE_OK);
    for (int i = 0; i <= 4; i++)
        assert_int_equal(off[i], 0);
}

static void expect_tokens(const char *s, const char *want)
{
    char buf[512];
    size_t pos = 0, o = 0, len;
    const char *tok;
    while (moe_text_next_token(s, strlen(s), &pos, &tok, &len)) {
        memcpy(buf + o, tok, len);
        o += len;
        buf[o++] = '|';
    }
    buf[o] = '\0';
    assert_string_equal(buf, want);
}

static void test_text_tokenize_line(void **state)
{
    (void)state;
    expect_tokens("the cat  sat", "the|cat|sat|");
    expect_tokens("", "");
    expect_tokens(" \t\n\v\f\r ", "");
    /* all 29 Python whitespace code points split */
    expect_tokens("a\tb\nc\vd\fe\rf\x1cg\x1dh\x1ei\x1fj k", "a|b|c|d|e|f|g|h|i|j|k|");
    expect_tokens("a\xc2\x85" "b\xc2\xa0" "c\xe1\x9a\x80" "d\xe2\x80\x80" "e\xe2\x80\x8a" "f\xe2\x80\xa8"
                  "g\xe2\x80\xa9" "h\xe2\x80\xaf" "i\xe2\x81\x9f" "j\xe3\x80\x80" "k",
                  "a|b|c|d|e|f|g|h|i|j|k|");
    /* near misses are part of tokens: U+200B, U+FEFF, U+0084, U+180E, U+2060, U+3001 */
    expect_tokens("a\xe2\x80\x8b" "b\xef\xbb\xbf" "c\xc2\x84" "d\xe1\xa0\x8e" "e\xe2\x81\xa0" "f\xe3\x80\x81" "g",
                  "a\xe2\x80\x8b" "b\xef\xbb\xbf" "c\xc2\x84" "d\xe1\xa0\x8e" "e\xe2\x81\xa0" "f\xe3\x80\x81" "g|");
    expect_tokens("\xc3\xa9t\xc3\xa9  <unk>\xe3\x80\x80", "\xc3\xa9t\xc3\xa9|<unk>|");
}

static void test_text_strip(void **state)
{
    (void)state;
    const char s[] = "\xe3\x80\x80 \x1c" "a b\xc2\xa0" "c\xe2\x80\xa9\t";
    const char *out;
    size_t len;
    moe_text_strip(s, sizeof s - 1, &out, &len);
    assert_int_equal(len, 6);
    assert_memory_equal(out, "a b\xc2\xa0" "c", 6);
    assert_int_equal(moe_text_lstrip(s, sizeof s - 1), 5);
    assert_int_equal(moe_text_rstrip("x\xc3\xa9", 3), 3);
    assert_int_equal(moe_text_rstrip("  ", 2), 0);
    moe_text_strip("", 0, &out, &len);
    assert_int_equal(len, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_universal_newlines),
        cmocka_unit_test(test_text_block_edges),
        cmocka_unit_test(test_text_utf8_strict),
        cmocka_unit_test(test_text_error_line_in_chunk),
        cmocka_unit_test(test_text_open_errors),
        cmocka_unit_test(test_text_chunks_equal_sequential),
        cmocka_unit_test(test_text_chunks_offsets),
        cmocka_unit_test(test_text_tokenize_line),
        cmocka_unit_test(test_text_strip),
    };
    return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
