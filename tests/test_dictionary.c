/* test_dictionary.c: fairseq's Dictionary (data/dictionary.h).
 *
 * The specials, add with and without overwrite, finalize's order (count
 * descending, ties by code point: "10" < "9" < "B" < "a" < "é"), threshold,
 * nwords counting the specials, padding that skips madeupword names already
 * present, dict.txt written byte for byte and read back, and every rule of
 * fairseq's add_from_file: the overwrite flag, the last-space split, Python
 * int() counts, duplicate and malformed lines named by file and line.
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

#include "data/dictionary.h"
#include "data/error.h"

static char g_dir[64];

static int setup_dir(void **state)
{
    (void)state;
    return moe_test_mkdtemp(g_dir, sizeof g_dir, "dict");
}

static int remove_dir(void **state)
{
    (void)state;
    return moe_test_rmtree(g_dir);
}

static const char *path_of(const char *name)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    return path;
}

static const char *write_file(const char *name, const char *text)
{
    const char *p = path_of(name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return p;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static void add(moe_dict *d, const char *w, int64_t n)
{
    assert_int_equal(moe_dict_add(d, w, strlen(w), n, 0, NULL), MOE_OK);
}

/* The non-special symbols as "sym count|sym count|..." */
static const char *listing(const moe_dict *d)
{
    static char buf[4096];
    size_t o = 0;
    for (int64_t i = MOE_DICT_NSPECIAL; i < moe_dict_len(d); i++)
        o += (size_t)snprintf(buf + o, sizeof buf - o, "%s %lld|", moe_dict_symbol(d, i, NULL),
                              (long long)moe_dict_count(d, i));
    buf[o] = '\0';
    return buf;
}

static void test_dictionary_specials(void **state)
{
    (void)state;
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    assert_int_equal(moe_dict_len(d), 4);
    const char *names[] = {"<s>", "<pad>", "</s>", "<unk>"};
    for (int i = 0; i < 4; i++) {
        size_t len;
        assert_string_equal(moe_dict_symbol(d, i, &len), names[i]);
        assert_int_equal(len, strlen(names[i]));
        assert_int_equal(moe_dict_count(d, i), 1);
        assert_int_equal(moe_dict_index(d, names[i], strlen(names[i])), i);
    }
    assert_int_equal(MOE_DICT_BOS, 0);
    assert_int_equal(MOE_DICT_PAD, 1);
    assert_int_equal(MOE_DICT_EOS, 2);
    assert_int_equal(MOE_DICT_UNK, 3);
    assert_int_equal(moe_dict_index(d, "cat", 3), MOE_DICT_UNK);
    assert_int_equal(moe_dict_index(d, "<unk", 4), MOE_DICT_UNK);
    assert_null(moe_dict_symbol(d, 4, NULL));
    assert_null(moe_dict_symbol(d, -1, NULL));
    assert_int_equal(moe_dict_count(d, 4), 0);
    /* a literal special in the corpus merges into the special */
    add(d, "</s>", 5);
    assert_int_equal(moe_dict_len(d), 4);
    assert_int_equal(moe_dict_count(d, MOE_DICT_EOS), 6);
    moe_dict_destroy(d);
}

static void test_dictionary_add_overwrite(void **state)
{
    (void)state;
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    int64_t i1, i2, i3;
    assert_int_equal(moe_dict_add(d, "a", 1, 1, 0, &i1), MOE_OK);
    assert_int_equal(moe_dict_add(d, "a", 1, 4, 0, &i2), MOE_OK);
    assert_int_equal(i1, 4);
    assert_int_equal(i2, 4);
    assert_int_equal(moe_dict_count(d, 4), 5);
    assert_int_equal(moe_dict_add(d, "a", 1, 7, 1, &i3), MOE_OK);
    assert_int_equal(i3, 5);
    assert_int_equal(moe_dict_len(d), 6);
    assert_int_equal(moe_dict_index(d, "a", 1), 5); /* the newer entry */
    assert_int_equal(moe_dict_count(d, 4), 5);
    assert_int_equal(moe_dict_count(d, 5), 7);
    /* symbols are byte strings: an embedded NUL is part of the word */
    assert_int_equal(moe_dict_add(d, "a\0b", 3, 1, 0, &i1), MOE_OK);
    assert_int_equal(i1, 6);
    assert_int_equal(moe_dict_index(d, "a\0b", 3), 6);
    assert_int_equal(moe_dict_index(d, "a\0c", 3), MOE_DICT_UNK);
    moe_dict_destroy(d);
}

static void test_dictionary_finalize_ties(void **state)
{
    (void)state;
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    /* inserted out of order on purpose */
    const char *words[] = {"\xc3\xa9", "a", "9", "B", "10", "zz", "y", "x"};
    int64_t counts[] = {1, 1, 1, 1, 1, 3, 2, 2};
    for (int i = 0; i < 8; i++)
        add(d, words[i], counts[i]);
    assert_int_equal(moe_dict_finalize(d, -1, -1, 1), MOE_OK);
    assert_string_equal(listing(d), "zz 3|x 2|y 2|10 1|9 1|B 1|a 1|\xc3\xa9 1|");
    assert_int_equal(moe_dict_index(d, "x", 1), 5);
    assert_int_equal(moe_dict_index(d, "\xc3\xa9", 2), 11);
    /* the specials keep their place and counts */
    assert_int_equal(moe_dict_count(d, MOE_DICT_UNK), 1);
    assert_string_equal(moe_dict_symbol(d, MOE_DICT_EOS, NULL), "</s>");
    moe_dict_destroy(d);
}

static moe_dict *counted(void)
{
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    add(d, "a", 5);
    add(d, "b", 3);
    add(d, "c", 3);
    add(d, "d", 1);
    add(d, "e", 2);
    return d;
}

static void test_dictionary_threshold(void **state)
{
    (void)state;
    moe_dict *d = counted();
    assert_int_equal(moe_dict_finalize(d, 3, -1, 1), MOE_OK);
    assert_string_equal(listing(d), "a 5|b 3|c 3|");
    moe_dict_destroy(d);
    d = counted();
    assert_int_equal(moe_dict_finalize(d, 0, -1, 1), MOE_OK);
    assert_string_equal(listing(d), "a 5|b 3|c 3|e 2|d 1|");
    moe_dict_destroy(d);
    d = counted();
    assert_int_equal(moe_dict_finalize(d, 6, -1, 1), MOE_OK);
    assert_int_equal(moe_dict_len(d), 4);
    moe_dict_destroy(d);
}

static void test_dictionary_nwords_counts_specials(void **state)
{
    (void)state;
    moe_dict *d = counted();
    assert_int_equal(moe_dict_finalize(d, 0, 6, 1), MOE_OK);
    assert_string_equal(listing(d), "a 5|b 3|");
    moe_dict_destroy(d);
    d = counted();
    assert_int_equal(moe_dict_finalize(d, 0, 4, 1), MOE_OK);
    assert_int_equal(moe_dict_len(d), 4);
    moe_dict_destroy(d);
    d = counted();
    assert_int_equal(moe_dict_finalize(d, 0, 2, 1), MOE_OK); /* below the specials: none */
    assert_int_equal(moe_dict_len(d), 4);
    moe_dict_destroy(d);
    d = counted();
    assert_int_equal(moe_dict_finalize(d, 0, 0, 1), MOE_OK); /* <= 0: all */
    assert_int_equal(moe_dict_len(d), 9);
    moe_dict_destroy(d);
    /* nwords applies before padding: the size may exceed it */
    d = counted();
    assert_int_equal(moe_dict_finalize(d, 0, 7, 8), MOE_OK);
    assert_string_equal(listing(d), "a 5|b 3|c 3|madeupword0000 0|");
    moe_dict_destroy(d);
}

static void test_dictionary_padding(void **state)
{
    (void)state;
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    add(d, "madeupword0000", 5);
    add(d, "x", 1);
    assert_int_equal(moe_dict_finalize(d, 0, -1, 8), MOE_OK);
    assert_string_equal(listing(d), "madeupword0000 5|x 1|madeupword0001 0|madeupword0002 0|");
    moe_dict_destroy(d);
    /* already a multiple; factor 1 and 0 pad nothing */
    for (int64_t factor = -1; factor <= 4; factor++) {
        assert_int_equal(moe_dict_create(&d), MOE_OK);
        add(d, "x", 1);
        assert_int_equal(moe_dict_finalize(d, 0, -1, factor), MOE_OK);
        int64_t want = factor > 1 ? (5 + factor - 1) / factor * factor : 5;
        assert_int_equal(moe_dict_len(d), want);
        moe_dict_destroy(d);
    }
    /* beyond madeupword9999 the number grows a digit, as Python's %04d */
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    char w[32];
    for (int i = 0; i < 10000; i++) {
        snprintf(w, sizeof w, "madeupword%04d", i);
        add(d, w, 1);
    }
    assert_int_equal(moe_dict_finalize(d, 0, -1, 8), MOE_OK);
    assert_int_equal(moe_dict_len(d), 10008);
    assert_string_equal(moe_dict_symbol(d, 10004, NULL), "madeupword10000");
    assert_string_equal(moe_dict_symbol(d, 10007, NULL), "madeupword10003");
    moe_dict_destroy(d);
}

static void test_dictionary_save_load_round_trip(void **state)
{
    (void)state;
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    add(d, "the", 2);
    add(d, "cat", 2);
    add(d, "a", 1);
    add(d, "dog", 1);
    add(d, "sat", 1);
    assert_int_equal(moe_dict_finalize(d, 0, -1, 8), MOE_OK);
    assert_int_equal(moe_dict_len(d), 16);
    const char *p = path_of("dict.txt");
    assert_int_equal(moe_dict_save(d, p), MOE_OK);
    assert_string_equal(slurp(p), "cat 2\nthe 2\na 1\ndog 1\nsat 1\nmadeupword0000 0\nmadeupword0001 0\n"
                                  "madeupword0002 0\nmadeupword0003 0\nmadeupword0004 0\nmadeupword0005 0\n"
                                  "madeupword0006 0\n");
    moe_dict *e;
    assert_int_equal(moe_dict_load(p, &e), MOE_OK);
    assert_int_equal(moe_dict_len(e), 16);
    for (int64_t i = 0; i < 16; i++) {
        assert_string_equal(moe_dict_symbol(e, i, NULL), moe_dict_symbol(d, i, NULL));
        assert_int_equal(moe_dict_count(e, i), moe_dict_count(d, i));
        assert_int_equal(moe_dict_index(e, moe_dict_symbol(d, i, NULL), strlen(moe_dict_symbol(d, i, NULL))), i);
    }
    /* saving again gives the same bytes; no temporary is left behind */
    assert_int_equal(moe_dict_save(e, path_of("dict2.txt")), MOE_OK);
    char first[1024];
    const char *text = slurp(p);
    assert_true(strlen(text) < sizeof first);
    memcpy(first, text, strlen(text) + 1);
    assert_string_equal(slurp(path_of("dict2.txt")), first);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "test $(ls '%s' | grep -c tmp) -eq 0", g_dir);
    assert_int_equal(system(cmd), 0);
    moe_dict_destroy(e);
    moe_dict_destroy(d);
    /* an unwritable place is an error naming the path */
    moe_data_clear_error();
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    assert_int_equal(moe_dict_save(d, "/nonexistent-dir/dict.txt"), MOE_ERR_IO);
    assert_non_null(strstr(moe_data_error(), "/nonexistent-dir/dict.txt"));
    moe_data_clear_error();
    moe_dict_destroy(d);
}

static void test_dictionary_load_overwrite(void **state)
{
    (void)state;
    moe_dict *d;
    const char *p = write_file("ow.txt", "a 1\nb 2\na 3 #fairseq:overwrite\nhello world 4\r\nx\xe2\x80\xa8y 5\r"
                                         "tab\t 6  \n");
    assert_int_equal(moe_dict_load(p, &d), MOE_OK);
    assert_int_equal(moe_dict_len(d), 10);
    assert_int_equal(moe_dict_index(d, "a", 1), 6);
    assert_int_equal(moe_dict_count(d, 4), 1);
    assert_int_equal(moe_dict_count(d, 6), 3);
    assert_int_equal(moe_dict_index(d, "hello world", 11), 7); /* the split is at the last space */
    assert_int_equal(moe_dict_index(d, "x\xe2\x80\xa8y", 5), 8); /* U+2028 does not end a line */
    assert_int_equal(moe_dict_index(d, "tab\t", 4), 9);
    assert_int_equal(moe_dict_count(d, 9), 6);
    moe_dict_destroy(d);
    /* the flag also lets a special be listed again */
    p = write_file("ow2.txt", "<unk> 9 #fairseq:overwrite\n");
    assert_int_equal(moe_dict_load(p, &d), MOE_OK);
    assert_int_equal(moe_dict_len(d), 5);
    assert_int_equal(moe_dict_index(d, "<unk>", 5), 4);
    moe_dict_destroy(d);
}

static void test_dictionary_python_int_counts(void **state)
{
    (void)state;
    moe_dict *d;
    const char *p = write_file("ints.txt", "a +5\nb -3\nc 1_000\nd 007\ne \t7\nf 0\ng 9223372036854775807\n"
                                           "h -9223372036854775808\ni \xe3\x80\x80" "8\n");
    assert_int_equal(moe_dict_load(p, &d), MOE_OK);
    int64_t want[] = {5, -3, 1000, 7, 7, 0, INT64_MAX, INT64_MIN, 8};
    for (int i = 0; i < 9; i++)
        assert_int_equal(moe_dict_count(d, 4 + i), want[i]);
    assert_string_equal(moe_dict_symbol(d, 8, NULL), "e");
    moe_dict_destroy(d);
}

/* Loading `text` fails and the message holds every needle (NULL-terminated). */
static void expect_load_error(const char *text, ...)
{
    const char *p = write_file("bad-dict.txt", text);
    moe_dict *d = (moe_dict *)1;
    moe_data_clear_error();
    assert_int_equal(moe_dict_load(p, &d), MOE_ERR_INVALID_ARG);
    assert_null(d);
    const char *msg = moe_data_error();
    assert_non_null(strstr(msg, "bad-dict.txt"));
    va_list ap;
    va_start(ap, text);
    for (const char *needle; (needle = va_arg(ap, const char *)) != NULL;)
        if (!strstr(msg, needle))
            fail_msg("message \"%s\" lacks \"%s\"", msg, needle);
    va_end(ap);
    assert_null(strchr(msg, '\n'));
    moe_data_clear_error();
}

static void test_dictionary_load_errors(void **state)
{
    (void)state;
    expect_load_error("a 1\na 2\n", "line 2", "duplicate word 'a'", "#fairseq:overwrite", NULL);
    expect_load_error("x 1\n<unk> 2\n", "line 2", "duplicate word '<unk>'", "index 3", NULL);
    expect_load_error("a 1\nnospace\n", "line 2", "\"nospace\"", "<token> <count>", NULL);
    expect_load_error("a 1\n\n", "line 2", "no space", NULL);
    expect_load_error("a 1\nb \n", "line 2", NULL); /* rstrip removes the only space */
    expect_load_error("a x\n", "line 1", "not an integer", NULL);
    expect_load_error("a 1.0\n", "not an integer", NULL);
    expect_load_error("a 0x10\n", "not an integer", NULL);
    expect_load_error("a 1__0\n", "not an integer", NULL);
    expect_load_error("a _1\n", "not an integer", NULL);
    expect_load_error("a 1_\n", "not an integer", NULL);
    expect_load_error("a +\n", "not an integer", NULL);
    expect_load_error("a 9223372036854775808\n", "64 bits", NULL);
    expect_load_error("a #fairseq:overwrite\n", "line 1", NULL);
    expect_load_error("ok 1\r\nb\xff 2\n", "line 2", "UTF-8", "byte offset 7", NULL);
    moe_dict *d = NULL;
    moe_data_clear_error();
    assert_int_equal(moe_dict_load(path_of("absent.txt"), &d), MOE_ERR_IO);
    assert_non_null(strstr(moe_data_error(), "absent.txt"));
    moe_data_clear_error();
}

static void test_dictionary_wordcount_merge(void **state)
{
    (void)state;
    moe_wordcount *c1, *c2;
    assert_int_equal(moe_wordcount_create(&c1), MOE_OK);
    assert_int_equal(moe_wordcount_create(&c2), MOE_OK);
    assert_int_equal(moe_wordcount_add(c1, "the", 3, 1), MOE_OK);
    assert_int_equal(moe_wordcount_add(c1, "cat", 3, 1), MOE_OK);
    assert_int_equal(moe_wordcount_add(c1, "the", 3, 1), MOE_OK);
    assert_int_equal(moe_wordcount_add(c1, "</s>", 4, 2), MOE_OK);
    assert_int_equal(moe_wordcount_add(c2, "cat", 3, 1), MOE_OK);
    assert_int_equal(moe_wordcount_add(c2, "a", 1, 1), MOE_OK);
    assert_int_equal(moe_wordcount_len(c1), 3);
    assert_int_equal(moe_wordcount_get(c1, "the", 3), 2);
    assert_int_equal(moe_wordcount_get(c1, "dog", 3), 0);
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    assert_int_equal(moe_dict_add_counts(d, c1), MOE_OK);
    assert_int_equal(moe_dict_add_counts(d, c2), MOE_OK);
    assert_string_equal(listing(d), "cat 2|the 2|a 1|"); /* each counter added in symbol order */
    assert_int_equal(moe_dict_count(d, MOE_DICT_EOS), 3);
    moe_wordcount_destroy(c1);
    moe_wordcount_destroy(c2);
    moe_dict_destroy(d);
}

/* Many symbols: the table grows and every lookup still answers its index. */
static void test_dictionary_many_symbols(void **state)
{
    (void)state;
    moe_dict *d;
    assert_int_equal(moe_dict_create(&d), MOE_OK);
    char w[32];
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        int len = snprintf(w, sizeof w, "w%d", i);
        add(d, w, 1 + i % 7);
        (void)len;
    }
    for (int i = 0; i < n; i++) {
        int len = snprintf(w, sizeof w, "w%d", i);
        assert_int_equal(moe_dict_index(d, w, (size_t)len), 4 + i);
    }
    assert_int_equal(moe_dict_finalize(d, 0, -1, 8), MOE_OK);
    assert_int_equal(moe_dict_len(d), 200008);
    /* counts descend, ties ascend by symbol */
    for (int64_t i = 5; i < 4 + n; i++) {
        size_t la, lb;
        const char *a = moe_dict_symbol(d, i - 1, &la), *b = moe_dict_symbol(d, i, &lb);
        int64_t ca = moe_dict_count(d, i - 1), cb = moe_dict_count(d, i);
        assert_true(ca > cb || (ca == cb && strcmp(a, b) < 0));
        assert_int_equal(moe_dict_index(d, b, lb), i);
    }
    moe_dict_destroy(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dictionary_specials),
        cmocka_unit_test(test_dictionary_add_overwrite),
        cmocka_unit_test(test_dictionary_finalize_ties),
        cmocka_unit_test(test_dictionary_threshold),
        cmocka_unit_test(test_dictionary_nwords_counts_specials),
        cmocka_unit_test(test_dictionary_padding),
        cmocka_unit_test(test_dictionary_save_load_round_trip),
        cmocka_unit_test(test_dictionary_load_overwrite),
        cmocka_unit_test(test_dictionary_python_int_counts),
        cmocka_unit_test(test_dictionary_load_errors),
        cmocka_unit_test(test_dictionary_wordcount_merge),
        cmocka_unit_test(test_dictionary_many_symbols),
    };
    return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
