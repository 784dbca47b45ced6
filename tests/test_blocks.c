/* test_blocks.c: fairseq's TokenBlockDataset (data/blocks.h).
 *
 * DATA_SPEC §3.5's example in every break mode as (source -> target) pairs,
 * and hand-worked cases of fairseq's Cython cuts: empty items, items longer
 * than the block, complete_doc's separators and its drop of one-token
 * blocks, the short last block, the uint16/uint32 wrap of recorded sizes,
 * and the inputs fairseq crashes on (refused here with a message).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "data/blocks.h"
#include "data/error.h"
#include "testutil.h"

typedef struct flat_reader {
    const int32_t *tok;
    int64_t n;
    int calls;
} flat_reader;

static moe_status read_flat(void *ctx, int64_t start, int64_t n, int32_t *out)
{
    flat_reader *r = ctx;
    r->calls++;
    if (start < 0 || n < 0 || start + n > r->n)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "test reader: [%lld, %lld) outside %lld tokens", (long long)start,
                             (long long)(start + n), (long long)r->n);
    memcpy(out, r->tok + start, (size_t)n * sizeof *out);
    return MOE_OK;
}

static moe_status read_fails(void *ctx, int64_t start, int64_t n, int32_t *out)
{
    (void)ctx;
    (void)start;
    (void)n;
    (void)out;
    return moe_data_fail(MOE_ERR_IO, "test reader: disk on fire");
}

/* blocks as "[s,e) [s,e) ..." */
static const char *ranges(const moe_blocks *b)
{
    static char buf[1024];
    size_t o = 0;
    buf[0] = '\0';
    for (int64_t k = 0; k < b->n; k++)
        o += (size_t)snprintf(buf + o, sizeof buf - o, "%s[%lld,%lld)", k ? " " : "", (long long)b->start[k],
                              (long long)b->end[k]);
    return buf;
}

/* every sample as "src->tgt; src->tgt" with tokens separated by spaces */
static const char *pairs(const moe_blocks *b, const int32_t *tok, int64_t ntok)
{
    static char buf[2048];
    size_t o = 0;
    buf[0] = '\0';
    flat_reader r = {tok, ntok, 0};
    for (int64_t k = 0; k < b->n; k++) {
        int32_t src[64], tgt[64];
        int64_t len = -1;
        assert_true(b->end[k] - b->start[k] <= 64);
        assert_int_equal(moe_blocks_sample(b, k, read_flat, &r, 2, src, tgt, &len), MOE_OK);
        assert_int_equal(len, b->end[k] - b->start[k]);
        if (k)
            o += (size_t)snprintf(buf + o, sizeof buf - o, "; ");
        for (int64_t i = 0; i < len; i++)
            o += (size_t)snprintf(buf + o, sizeof buf - o, "%s%d", i ? " " : "", src[i]);
        o += (size_t)snprintf(buf + o, sizeof buf - o, "->");
        for (int64_t i = 0; i < len; i++)
            o += (size_t)snprintf(buf + o, sizeof buf - o, "%s%d", i ? " " : "", tgt[i]);
    }
    return buf;
}

static void build_ok(const int64_t *sizes, int64_t n, int64_t block, moe_break_mode mode, int64_t sep, moe_blocks *b)
{
    moe_data_clear_error();
    if (moe_blocks_build(sizes, n, block, mode, sep, b) != MOE_OK)
        fail_msg("moe_blocks_build: %s", moe_data_error());
}

static void build_fails(const int64_t *sizes, int64_t n, int64_t block, moe_break_mode mode, int64_t sep,
                        const char *needle)
{
    moe_blocks b;
    moe_data_clear_error();
    assert_int_equal(moe_blocks_build(sizes, n, block, mode, sep, &b), MOE_ERR_INVALID_ARG);
    assert_int_equal(b.n, 0);
    assert_null(b.start);
    if (!strstr(moe_data_error(), needle))
        fail_msg("message '%s' lacks '%s'", moe_data_error(), needle);
    moe_data_clear_error();
}

/* ------------------------------------------------------------ §3.5 example */

static const int32_t ex_tok[] = {10, 11, 2, 12, 2, 2, 13, 14, 15, 16, 17, 2, 18, 2};
static const int64_t ex_sizes[] = {3, 2, 1, 6, 2};
#define EX_N 5
#define EX_T 14

static void test_blocks_spec_example(void **state)
{
    (void)state;
    moe_blocks b;
    build_ok(ex_sizes, EX_N, 4, MOE_BREAK_NONE, 1, &b);
    assert_string_equal(ranges(&b), "[0,4) [4,8) [8,12) [12,14)");
    assert_string_equal(pairs(&b, ex_tok, EX_T),
                        "2 10 11 2->10 11 2 12; 12 2 2 13->2 2 13 14; 14 15 16 17->15 16 17 2; 2 18->18 2");
    /* only the first and the last start at a line */
    assert_int_equal(b.at_item_start[0], 1);
    assert_int_equal(b.at_item_start[1], 0);
    assert_int_equal(b.at_item_start[2], 0);
    assert_int_equal(b.at_item_start[3], 1);
    moe_blocks_free(&b);
    assert_null(b.start);

    build_ok(ex_sizes, EX_N, 4, MOE_BREAK_COMPLETE, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [3,6) [6,12) [12,14)");
    assert_string_equal(pairs(&b, ex_tok, EX_T),
                        "2 10 11->10 11 2; 2 12 2->12 2 2; 2 13 14 15 16 17->13 14 15 16 17 2; 2 18->18 2");
    const int64_t want_sizes[] = {3, 3, 6, 2};
    assert_memory_equal(b.size, want_sizes, sizeof want_sizes);
    moe_blocks_free(&b);

    /* the empty line [5,6) is dropped and ends the block "12 2" */
    build_ok(ex_sizes, EX_N, 4, MOE_BREAK_COMPLETE_DOC, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [3,5) [6,12) [12,14)");
    assert_string_equal(pairs(&b, ex_tok, EX_T),
                        "2 10 11->10 11 2; 2 12->12 2; 2 13 14 15 16 17->13 14 15 16 17 2; 2 18->18 2");
    moe_blocks_free(&b);

    /* one block per line; the empty line gives source 2, target 2; B ignored */
    build_ok(ex_sizes, EX_N, 4, MOE_BREAK_EOS, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [3,5) [5,6) [6,12) [12,14)");
    assert_string_equal(pairs(&b, ex_tok, EX_T),
                        "2 10 11->10 11 2; 2 12->12 2; 2->2; 2 13 14 15 16 17->13 14 15 16 17 2; 2 18->18 2");
    moe_blocks_free(&b);
    build_ok(ex_sizes, EX_N, 0, MOE_BREAK_EOS, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [3,5) [5,6) [6,12) [12,14)");
    moe_blocks_free(&b);
}

static void test_blocks_mode_names(void **state)
{
    (void)state;
    static const char *names[] = {"none", "complete", "complete_doc", "eos"};
    for (int m = 0; m < 4; m++) {
        moe_break_mode got = MOE_BREAK_EOS;
        assert_int_equal(moe_break_mode_parse(names[m], &got), MOE_OK);
        assert_int_equal(got, m);
        assert_string_equal(moe_break_mode_name(got), names[m]);
    }
    moe_break_mode got;
    moe_data_clear_error();
    assert_int_equal(moe_break_mode_parse("completedoc", &got), MOE_ERR_INVALID_ARG);
    assert_string_equal(moe_data_error(),
                        "invalid --sample-break-mode 'completedoc': expected one of none, complete, complete_doc, eos");
    moe_data_clear_error();
}

/* ------------------------------------------------------------ hand-worked cases */

static void test_blocks_none_mode(void **state)
{
    (void)state;
    moe_blocks b;
    const int64_t s[] = {3, 5};
    build_ok(s, 2, 4, MOE_BREAK_NONE, 1, &b); /* exact multiple: no short block */
    assert_string_equal(ranges(&b), "[0,4) [4,8)");
    assert_int_equal(b.at_item_start[1], 0);
    moe_blocks_free(&b);
    build_ok(s, 2, 100, MOE_BREAK_NONE, 1, &b); /* one short block */
    assert_string_equal(ranges(&b), "[0,8)");
    assert_int_equal(b.size[0], 8);
    moe_blocks_free(&b);
    build_ok(s, 2, 1, MOE_BREAK_NONE, 1, &b);
    assert_int_equal(b.n, 8);
    assert_int_equal(b.at_item_start[3], 1);
    assert_int_equal(b.at_item_start[4], 0);
    moe_blocks_free(&b);
    /* zero tokens: zero blocks, as fairseq */
    const int64_t z[] = {0, 0};
    build_ok(z, 2, 4, MOE_BREAK_NONE, 1, &b);
    assert_int_equal(b.n, 0);
    moe_blocks_free(&b);
}

static void test_blocks_empty_items(void **state)
{
    (void)state;
    moe_blocks b;
    /* complete: empty items join whichever block is open */
    const int64_t c[] = {0, 2, 0, 0, 3, 0};
    build_ok(c, 6, 3, MOE_BREAK_COMPLETE, 1, &b);
    assert_string_equal(ranges(&b), "[0,2) [2,5)");
    assert_int_equal(b.at_item_start[0] + b.at_item_start[1], 2);
    moe_blocks_free(&b);
    /* none: an empty item between two others is no boundary of its own */
    const int64_t nn[] = {0, 2, 0, 3};
    const int32_t tok[] = {20, 2, 30, 31, 2};
    build_ok(nn, 4, 2, MOE_BREAK_NONE, 1, &b);
    assert_string_equal(ranges(&b), "[0,2) [2,4) [4,5)");
    assert_int_equal(b.at_item_start[0], 1);
    assert_int_equal(b.at_item_start[1], 1);
    assert_int_equal(b.at_item_start[2], 0);
    assert_string_equal(pairs(&b, tok, 5), "2 20->20 2; 2 30->30 31; 31->2");
    moe_blocks_free(&b);
    /* eos: an empty block of size 0 and an empty sample */
    const int64_t e[] = {2, 0, 1};
    build_ok(e, 3, 8, MOE_BREAK_EOS, 1, &b);
    assert_string_equal(ranges(&b), "[0,2) [2,2) [2,3)");
    assert_int_equal(b.size[1], 0);
    int32_t src[2] = {-1, -1}, tgt[2] = {-1, -1};
    int64_t len = 7;
    flat_reader r = {tok, 3, 0};
    assert_int_equal(moe_blocks_sample(&b, 1, read_flat, &r, 2, src, tgt, &len), MOE_OK);
    assert_int_equal(len, 0);
    assert_int_equal(r.calls, 0);
    assert_int_equal(src[0], -1);
    moe_blocks_free(&b);
    /* complete_doc: empty items are not separators of length 1 */
    const int64_t d[] = {0, 3, 1, 0, 0, 2};
    build_ok(d, 6, 8, MOE_BREAK_COMPLETE_DOC, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [4,6)");
    moe_blocks_free(&b);
    /* ... but are with document_sep_len 0 (items without eos) */
    build_ok(d, 6, 8, MOE_BREAK_COMPLETE_DOC, 0, &b);
    assert_string_equal(ranges(&b), "[0,4) [4,6)");
    moe_blocks_free(&b);
    /* complete over nothing but empty items fails as fairseq does */
    build_fails(nn, 1, 4, MOE_BREAK_COMPLETE, 1, "complete found no tokens in 1 items");
}

static void test_blocks_oversized_items(void **state)
{
    (void)state;
    moe_blocks b;
    const int64_t c[] = {2, 7, 1};
    build_ok(c, 3, 4, MOE_BREAK_COMPLETE, 1, &b);
    assert_string_equal(ranges(&b), "[0,2) [2,9) [9,10)");
    assert_int_equal(b.size[1], 7);
    moe_blocks_free(&b);
    const int64_t d[] = {5, 1, 3, 3};
    build_ok(d, 4, 4, MOE_BREAK_COMPLETE_DOC, 1, &b);
    assert_string_equal(ranges(&b), "[0,5) [6,9) [9,12)");
    moe_blocks_free(&b);
    /* first item alone over the block, then items that fit exactly */
    const int64_t e[] = {9, 2, 2, 4};
    build_ok(e, 4, 4, MOE_BREAK_COMPLETE, 1, &b);
    assert_string_equal(ranges(&b), "[0,9) [9,13) [13,17)");
    moe_blocks_free(&b);
}

static void test_blocks_complete_doc_rules(void **state)
{
    (void)state;
    moe_blocks b;
    /* no separators: blocks close on overflow */
    const int64_t a[] = {3, 3, 3};
    build_ok(a, 3, 4, MOE_BREAK_COMPLETE_DOC, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [3,6) [6,9)");
    moe_blocks_free(&b);
    /* a one-token block closed by overflow is dropped too; its token is in no block */
    const int64_t o[] = {1, 4, 2, 2};
    build_ok(o, 4, 4, MOE_BREAK_COMPLETE_DOC, 0, &b);
    assert_string_equal(ranges(&b), "[1,5) [5,9)");
    moe_blocks_free(&b);
    /* consecutive separators, a separator first and last, two documents packed */
    const int64_t s[] = {1, 2, 2, 1, 1, 3, 1};
    build_ok(s, 7, 8, MOE_BREAK_COMPLETE_DOC, 1, &b);
    assert_string_equal(ranges(&b), "[1,5) [7,10)");
    moe_blocks_free(&b);
    /* a separator longer than one token (document_sep_len 2) */
    const int64_t w[] = {3, 2, 4};
    build_ok(w, 3, 8, MOE_BREAK_COMPLETE_DOC, 2, &b);
    assert_string_equal(ranges(&b), "[0,3) [5,9)");
    moe_blocks_free(&b);
    /* only separators: fairseq crashes (numpy reshape), here a message */
    const int64_t only[] = {1, 1, 1};
    build_fails(only, 3, 4, MOE_BREAK_COMPLETE_DOC, 1, "complete_doc found no document of 2 or more tokens in 3 items");
}

static void test_blocks_eos_mode_empty_line(void **state)
{
    (void)state;
    const int64_t s[] = {3, 1, 2};
    const int32_t tok[] = {10, 11, 2, 2, 12, 2};
    moe_blocks b;
    build_ok(s, 3, 1024, MOE_BREAK_EOS, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [3,4) [4,6)");
    assert_string_equal(pairs(&b, tok, 6), "2 10 11->10 11 2; 2->2; 2 12->12 2");
    const int64_t want[] = {3, 1, 2};
    assert_memory_equal(b.size, want, sizeof want);
    moe_blocks_free(&b);
}

static void test_blocks_size_wraps_like_fairseq(void **state)
{
    (void)state;
    moe_blocks b;
    const int64_t s[] = {3, 70000, 2};
    /* block size < 65535: sizes are uint16, the 70000-token block records 4464 */
    build_ok(s, 3, 4, MOE_BREAK_COMPLETE, 1, &b);
    assert_string_equal(ranges(&b), "[0,3) [3,70003) [70003,70005)");
    assert_int_equal(b.size[1], 70000 - 65536);
    assert_int_equal(b.end[1] - b.start[1], 70000);
    moe_blocks_free(&b);
    build_ok(s, 3, 0, MOE_BREAK_EOS, 1, &b);
    assert_int_equal(b.size[1], 4464);
    moe_blocks_free(&b);
    build_ok(s, 3, 65534, MOE_BREAK_COMPLETE_DOC, 1, &b);
    assert_int_equal(b.size[1], 4464);
    moe_blocks_free(&b);
    /* exactly 65536 wraps to 0 */
    const int64_t t[] = {65536};
    build_ok(t, 1, 8, MOE_BREAK_EOS, 1, &b);
    assert_int_equal(b.size[0], 0);
    moe_blocks_free(&b);
    /* block size >= 65535: uint32, no wrap */
    build_ok(s, 3, 65535, MOE_BREAK_COMPLETE, 1, &b);
    assert_int_equal(b.size[1], 70000);
    moe_blocks_free(&b);
    build_ok(s, 3, 65536, MOE_BREAK_NONE, 1, &b);
    assert_string_equal(ranges(&b), "[0,65536) [65536,70005)");
    assert_int_equal(b.size[0], 65536);
    moe_blocks_free(&b);
}

static void test_blocks_refusals(void **state)
{
    (void)state;
    const int64_t s[] = {3, 2};
    build_fails(s, 0, 4, MOE_BREAK_NONE, 1, "the split has no items");
    build_fails(s, 2, 0, MOE_BREAK_NONE, 1, "block size (--tokens-per-sample) 0, expected a positive number");
    build_fails(s, 2, -4, MOE_BREAK_COMPLETE, 1, "block size (--tokens-per-sample) -4");
    const int64_t neg[] = {3, -1};
    build_fails(neg, 2, 4, MOE_BREAK_EOS, 1, "item 1 has invalid size -1");
    moe_blocks b;
    build_ok(ex_sizes, EX_N, 4, MOE_BREAK_NONE, 1, &b);
    int32_t src[4], tgt[4];
    int64_t len;
    moe_data_clear_error();
    assert_int_equal(moe_blocks_sample(&b, 4, read_flat, NULL, 2, src, tgt, &len), MOE_ERR_INVALID_ARG);
    assert_string_equal(moe_data_error(), "token blocks: block 4 requested, there are 4");
    moe_data_clear_error();
    assert_int_equal(moe_blocks_sample(&b, 1, read_fails, NULL, 2, src, tgt, &len), MOE_ERR_IO);
    assert_string_equal(moe_data_error(), "test reader: disk on fire");
    moe_data_clear_error();
    moe_blocks_free(&b);
    moe_blocks_free(NULL);
}

/* random sizes: every mode's samples equal the flat-stream rule, blocks
 * are ordered and inside the stream, and complete/eos cover every token */
static void test_blocks_random_invariants(void **state)
{
    (void)state;
    moe_test_rng rng = moe_test_rng_make(11);
    for (int trial = 0; trial < 400; trial++) {
        int64_t n = moe_test_rng_int(&rng, 1, 40), sizes[40], total = 0;
        for (int64_t i = 0; i < n; i++) {
            sizes[i] = moe_test_rng_int(&rng, trial % 4 == 0 ? 0 : 1, 9);
            total += sizes[i];
        }
        int32_t tok[400];
        for (int64_t k = 0; k < total; k++)
            tok[k] = (int32_t)(100 + k);
        int64_t block = moe_test_rng_int(&rng, 1, 12);
        for (int m = 0; m < 4; m++) {
            moe_blocks b;
            if (moe_blocks_build(sizes, n, block, (moe_break_mode)m, 1, &b) != MOE_OK) {
                assert_true(m == MOE_BREAK_COMPLETE || m == MOE_BREAK_COMPLETE_DOC);
                moe_data_clear_error();
                continue;
            }
            int64_t covered = 0, prev_end = 0;
            flat_reader r = {tok, total, 0};
            for (int64_t k = 0; k < b.n; k++) {
                int64_t s = b.start[k], e = b.end[k];
                assert_true(s >= prev_end && e >= s && e <= total);
                if (m == MOE_BREAK_NONE)
                    assert_true(e - s == block || e == total);
                prev_end = e;
                covered += e - s;
                int32_t src[400], tgt[400];
                int64_t len;
                assert_int_equal(moe_blocks_sample(&b, k, read_flat, &r, 2, src, tgt, &len), MOE_OK);
                assert_int_equal(len, e - s);
                if (len == 0)
                    continue;
                assert_memory_equal(tgt, tok + s, (size_t)len * sizeof *tgt);
                assert_int_equal(src[0], b.at_item_start[k] ? 2 : tok[s - 1]);
                assert_memory_equal(src + 1, tok + s, (size_t)(len - 1) * sizeof *src);
            }
            if (m != MOE_BREAK_COMPLETE_DOC)
                assert_int_equal(covered, total);
            moe_blocks_free(&b);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blocks_spec_example),
        cmocka_unit_test(test_blocks_mode_names),
        cmocka_unit_test(test_blocks_none_mode),
        cmocka_unit_test(test_blocks_empty_items),
        cmocka_unit_test(test_blocks_oversized_items),
        cmocka_unit_test(test_blocks_complete_doc_rules),
        cmocka_unit_test(test_blocks_eos_mode_empty_line),
        cmocka_unit_test(test_blocks_size_wraps_like_fairseq),
        cmocka_unit_test(test_blocks_refusals),
        cmocka_unit_test(test_blocks_random_invariants),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
