/* test_batching.c: numpy's legacy RNG, ordering, size filter, batch_by_size,
 * epoch shuffles and sharding (data/batching.h).
 *
 * The literal numbers are numpy 2.4's (RandomState(seed) raw draws,
 * randint(0, max+1, dtype=uint64) for random_interval, permutation, lexsort,
 * shuffle) and fairseq's compiled batch_by_size_vec, pasted so that the test
 * needs no Python. Random batching cases are checked against a second,
 * literal transcription of the Cython loop kept in this file (int32 ends
 * array, np.split at ends[:count]).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "data/batching.h"
#include "data/error.h"
#include "testutil.h"

/* ------------------------------------------------------------ numpy RNG */

static void test_batching_np_seed_outputs(void **state)
{
    (void)state;
    static const uint32_t seeds[] = {0, 1, 42, 4294967295u};
    static const uint32_t want[4][5] = {
        {2357136044u, 2546248239u, 3071714933u, 3626093760u, 2588848963u},
        {1791095845u, 4282876139u, 3093770124u, 4005303368u, 491263u},
        {1608637542u, 3421126067u, 4083286876u, 787846414u, 3143890026u},
        {419326371u, 479346978u, 3918654476u, 2416749639u, 3388880820u},
    };
    for (int s = 0; s < 4; s++) {
        moe_np_rng r;
        moe_np_seed(&r, seeds[s]);
        for (int i = 0; i < 5; i++)
            assert_int_equal(moe_np_next_u32(&r), want[s][i]);
    }
    /* past the first 624 draws the state regenerates; reseeding restarts */
    moe_np_rng r;
    moe_np_seed(&r, 1);
    for (int i = 0; i < 700; i++)
        moe_np_next_u32(&r);
    moe_np_seed(&r, 1);
    assert_int_equal(moe_np_next_u32(&r), 1791095845u);
}

static void test_batching_np_interval(void **state)
{
    (void)state;
    static const uint64_t maxes[] = {0, 1, 5, 4294967295ull, 4294967301ull};
    static const uint64_t want[5][6] = {
        {0, 0, 0, 0, 0, 0},
        {1, 1, 0, 0, 1, 1},
        {5, 3, 4, 0, 1, 3},
        {1791095845ull, 4282876139ull, 3093770124ull, 4005303368ull, 491263ull, 550290313ull},
        {4005303368ull, 1703301249ull, 1666063943ull, 4018109721ull, 3634877716ull, 1345499493ull},
    };
    for (int m = 0; m < 5; m++) {
        moe_np_rng r;
        moe_np_seed(&r, 1);
        for (int i = 0; i < 6; i++)
            assert_int_equal(moe_np_interval(&r, maxes[m]), want[m][i]);
    }
    /* max 0 draws nothing */
    moe_np_rng r;
    moe_np_seed(&r, 1);
    assert_int_equal(moe_np_interval(&r, 0), 0);
    assert_int_equal(moe_np_next_u32(&r), 1791095845u);
}

static void test_batching_np_permutation(void **state)
{
    (void)state;
    static const uint32_t seeds[] = {0, 1, 42};
    static const int64_t want[3][10] = {
        {2, 8, 4, 9, 1, 6, 7, 3, 0, 5},
        {2, 9, 6, 4, 0, 3, 1, 7, 8, 5},
        {8, 1, 5, 0, 7, 2, 9, 4, 3, 6},
    };
    for (int s = 0; s < 3; s++) {
        moe_np_rng r;
        int64_t x[10];
        moe_np_seed(&r, seeds[s]);
        moe_np_permutation(&r, x, 10);
        assert_memory_equal(x, want[s], sizeof x);
    }
    moe_np_rng r;
    int64_t big[1000];
    moe_np_seed(&r, 0);
    moe_np_permutation(&r, big, 1000);
    static const int64_t head[] = {993, 859, 298, 553, 672, 971, 27, 231};
    assert_memory_equal(big, head, sizeof head);
    /* shuffling nothing or one element draws nothing */
    moe_np_seed(&r, 1);
    moe_np_shuffle(&r, big, 0);
    moe_np_shuffle(&r, big, 1);
    assert_int_equal(moe_np_next_u32(&r), 1791095845u);
}

/* ------------------------------------------------------------ ordering, filtering */

static void test_batching_ordered_indices(void **state)
{
    (void)state;
    static const int64_t sizes[] = {4, 4, 2, 4, 3, 4, 4, 4};
    int64_t *o;
    assert_int_equal(moe_order_by_size(sizes, 8, 1, 1, &o), MOE_OK);
    assert_memory_equal(o, ((int64_t[]){2, 4, 1, 6, 5, 7, 3, 0}), 8 * sizeof *o);
    free(o);
    assert_int_equal(moe_order_by_size(sizes, 8, 2, 1, &o), MOE_OK);
    assert_memory_equal(o, ((int64_t[]){2, 4, 7, 1, 3, 0, 6, 5}), 8 * sizeof *o);
    free(o);
    assert_int_equal(moe_order_by_size(sizes, 8, 1, 0, &o), MOE_OK);
    assert_memory_equal(o, ((int64_t[]){2, 4, 0, 1, 3, 5, 6, 7}), 8 * sizeof *o);
    free(o);
    assert_int_equal(moe_order_by_size(sizes, 0, 1, 1, &o), MOE_OK);
    free(o);
    /* ties broken by the permutation: equal sizes follow perm's order */
    moe_test_rng rng = moe_test_rng_make(3);
    int64_t n = 500, sz[500], perm[500];
    for (int64_t i = 0; i < n; i++)
        sz[i] = moe_test_rng_int(&rng, 0, 6);
    moe_np_rng r;
    moe_np_seed(&r, 9);
    moe_np_permutation(&r, perm, n);
    assert_int_equal(moe_order_by_size(sz, n, 9, 1, &o), MOE_OK);
    for (int64_t i = 1; i < n; i++) {
        assert_true(sz[o[i - 1]] <= sz[o[i]]);
        if (sz[o[i - 1]] == sz[o[i]])
            assert_true(perm[o[i - 1]] < perm[o[i]]); /* lexsort's secondary key: perm[id] */
    }
    free(o);
}

static void test_batching_filter_by_size(void **state)
{
    (void)state;
    static const int64_t sizes[] = {5, 9, 3, 12, 7, 10, 1};
    int64_t idx[] = {6, 2, 0, 4, 1, 5, 3};
    int64_t dropped[2] = {-1, -1}, nd = -1;
    int64_t kept = moe_filter_by_size(idx, 7, sizes, 8, dropped, 2, &nd);
    assert_int_equal(kept, 4);
    assert_memory_equal(idx, ((int64_t[]){6, 2, 0, 4}), 4 * sizeof *idx);
    assert_int_equal(nd, 3);
    assert_int_equal(dropped[0], 1);
    assert_int_equal(dropped[1], 5);
    int64_t idx2[] = {0, 1};
    assert_int_equal(moe_filter_by_size(idx2, 2, sizes, 9, NULL, 0, NULL), 2); /* size == max is kept */
}

/* ------------------------------------------------------------ batch_by_size */

static void expect_batch_sizes(const int64_t *sizes, int64_t n, int64_t mt, int64_t ms, int64_t mult, int drop,
                               const int64_t *want, int64_t nwant)
{
    int64_t idx[64];
    for (int64_t i = 0; i < n; i++)
        idx[i] = i;
    moe_batch_list b;
    assert_int_equal(moe_batch_by_size(idx, n, sizes, mt, ms, mult, drop, &b), MOE_OK);
    assert_int_equal(b.n, nwant);
    for (int64_t k = 0; k < nwant; k++)
        assert_int_equal(b.offsets[k + 1] - b.offsets[k], want[k]);
    for (int64_t j = 0; j < b.offsets[b.n]; j++)
        assert_int_equal(b.indices[j], j);
    moe_batch_list_free(&b);
    assert_null(b.offsets);
}

static void test_batching_spec_examples(void **state)
{
    (void)state;
    int64_t s512[10], s3[17], s1_12[12];
    for (int i = 0; i < 10; i++)
        s512[i] = 512;
    for (int i = 0; i < 17; i++)
        s3[i] = 3;
    for (int i = 0; i < 12; i++)
        s1_12[i] = i + 1;
    expect_batch_sizes(s512, 10, 2048, 0, 8, 0, (int64_t[]){4, 4, 2}, 3);
    expect_batch_sizes(s512, 10, 2048, 0, 8, 1, (int64_t[]){4, 4}, 2); /* main drops the 2 */
    expect_batch_sizes(s512, 10, 4096, 0, 8, 0, (int64_t[]){8, 2}, 2);
    expect_batch_sizes(s512, 10, 4096, 0, 8, 1, (int64_t[]){8}, 1);
    expect_batch_sizes(s3, 17, 0, 8, 8, 0, (int64_t[]){8, 8, 1}, 3);
    expect_batch_sizes(s3, 17, -1, 8, 8, 1, (int64_t[]){8, 8}, 2);
    expect_batch_sizes(s1_12, 12, 30, 0, 4, 0, (int64_t[]){4, 3, 3, 2}, 4);
    expect_batch_sizes(s1_12, 12, 30, 0, 4, 1, (int64_t[]){4, 3, 3}, 3);
    /* the tail alone overflowing closes two batches (fairseq: [0..3] [4] [5]) */
    expect_batch_sizes((int64_t[]){1, 1, 1, 1, 1, 9}, 6, 10, 0, 4, 0, (int64_t[]){4, 1, 1}, 3);
    expect_batch_sizes((int64_t[]){2, 2, 2, 2, 2, 2, 2}, 7, 10, 0, 3, 0, (int64_t[]){3, 3, 1}, 3);
    /* multiple 1: drop_last never drops; no limits: the largest multiple, then the rest */
    expect_batch_sizes(s3, 17, 0, 8, 1, 1, (int64_t[]){8, 8, 1}, 3);
    expect_batch_sizes(s3, 17, 0, 0, 8, 0, (int64_t[]){16, 1}, 2);
}

static void test_batching_refusals(void **state)
{
    (void)state;
    static const int64_t sizes[] = {3, 9, 4};
    int64_t idx[] = {0, 2, 1};
    moe_batch_list b;
    moe_data_clear_error();
    assert_int_equal(moe_batch_by_size(idx, 3, sizes, 8, 0, 1, 0, &b), MOE_ERR_INVALID_ARG);
    assert_string_equal(moe_data_error(),
                        "Sentences lengths should not exceed max_tokens=8: sample 1 (position 2 of the ordered "
                        "samples) has 9 tokens; raise --max-tokens or drop longer samples (max positions)");
    assert_int_equal(b.n, 0);
    assert_null(b.offsets);
    moe_data_clear_error();
    assert_int_equal(moe_batch_by_size(idx, 3, sizes, 8, 0, 0, 0, &b), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "--required-batch-size-multiple 0"));
    moe_data_clear_error();
    /* no samples: no batches (drop_last too) */
    assert_int_equal(moe_batch_by_size(idx, 0, sizes, 8, 0, 8, 1, &b), MOE_OK);
    assert_int_equal(b.n, 0);
    assert_int_equal(b.offsets[0], 0);
    moe_batch_list_free(&b);
    moe_batch_list_free(NULL);
}

/* data_utils_fast.pyx: batch_by_size_vec, line for line */
static int64_t ref_batch_by_size_vec(const int64_t *ntok, int32_t len, int64_t max_tokens, int64_t max_sentences,
                                     int32_t bsz_mult, int64_t *split_at)
{
    int32_t *ends = calloc((size_t)len + 2, sizeof *ends);
    assert_non_null(ends);
    int32_t pos, new_batch_end, new_batch_sentences, batches_count = 0, batch_start = 0;
    int64_t new_batch_max_tokens, new_batch_num_tokens, tail_max_tokens = 0, batch_max_tokens = 0;
    for (pos = 0; pos < len; pos++) {
        tail_max_tokens = tail_max_tokens > ntok[pos] ? tail_max_tokens : ntok[pos];
        new_batch_end = pos + 1;
        new_batch_max_tokens = batch_max_tokens > tail_max_tokens ? batch_max_tokens : tail_max_tokens;
        new_batch_sentences = new_batch_end - batch_start;
        new_batch_num_tokens = new_batch_sentences * new_batch_max_tokens;
        int overflow = (new_batch_sentences > max_sentences && max_sentences > 0) ||
                       (new_batch_num_tokens > max_tokens && max_tokens > 0);
        int size_matches_with_bsz_mult = new_batch_sentences < bsz_mult || new_batch_sentences % bsz_mult == 0;
        if (overflow) {
            int64_t tail_num_tokens = tail_max_tokens * (new_batch_end - ends[batches_count]);
            int tail_overflow = tail_num_tokens > max_tokens && max_tokens > 0;
            if (tail_overflow) {
                batches_count += 1;
                ends[batches_count] = pos;
                tail_max_tokens = ntok[pos];
            }
            batch_start = ends[batches_count];
            batches_count += 1;
            new_batch_max_tokens = tail_max_tokens;
        }
        if (overflow || size_matches_with_bsz_mult) {
            ends[batches_count] = new_batch_end;
            batch_max_tokens = new_batch_max_tokens;
            tail_max_tokens = 0;
        }
    }
    if (ends[batches_count] != len)
        batches_count += 1;
    for (int32_t k = 0; k < batches_count; k++)
        split_at[k] = ends[k];
    free(ends);
    return batches_count; /* np.split gives batches_count + 1 pieces */
}

static void test_batching_random_against_transcription(void **state)
{
    (void)state;
    moe_test_rng rng = moe_test_rng_make(5);
    static const int64_t mts[] = {0, -1, 50, 100, 200, 256, 1000};
    static const int64_t mss[] = {0, -1, 1, 2, 3, 5, 8, 16};
    static const int64_t mults[] = {1, 1, 2, 3, 4, 8};
    static const int64_t caps[] = {3, 10, 50, 200};
    int checked = 0;
    for (int t = 0; t < 3000; t++) {
        int64_t n = moe_test_rng_int(&rng, 1, 80), sizes[80], idx[80], ntok[80], split[82];
        int64_t cap = caps[moe_test_rng_int(&rng, 0, 4)];
        for (int64_t i = 0; i < n; i++) {
            sizes[i] = moe_test_rng_int(&rng, 1, cap + 1);
            idx[i] = i;
        }
        moe_np_rng r;
        moe_np_seed(&r, (uint32_t)t);
        moe_np_shuffle(&r, idx, n);
        if (t % 2) { /* size-ordered, as the trainer hands them */
            int64_t *o;
            assert_int_equal(moe_order_by_size(sizes, n, (uint32_t)t, 1, &o), MOE_OK);
            memcpy(idx, o, (size_t)n * sizeof *idx);
            free(o);
        }
        int64_t mt = mts[moe_test_rng_int(&rng, 0, 7)], ms = mss[moe_test_rng_int(&rng, 0, 8)];
        int64_t mult = mults[moe_test_rng_int(&rng, 0, 6)];
        int too_long = 0;
        for (int64_t i = 0; i < n; i++) {
            ntok[i] = sizes[idx[i]];
            too_long |= mt > 0 && ntok[i] > mt;
        }
        moe_batch_list b;
        moe_status st = moe_batch_by_size(idx, n, sizes, mt, ms, mult, 0, &b);
        if (too_long) {
            assert_int_equal(st, MOE_ERR_INVALID_ARG);
            moe_data_clear_error();
            continue;
        }
        assert_int_equal(st, MOE_OK);
        int64_t count = ref_batch_by_size_vec(ntok, (int32_t)n, mt, ms, (int32_t)mult, split);
        assert_int_equal(b.n, count + 1);
        for (int64_t k = 0; k < count; k++)
            assert_int_equal(b.offsets[k + 1], split[k]);
        assert_int_equal(b.offsets[0], 0);
        assert_int_equal(b.offsets[b.n], n);
        assert_memory_equal(b.indices, idx, (size_t)n * sizeof *idx);
        for (int64_t k = 0; k < b.n; k++) {
            int64_t rows = b.offsets[k + 1] - b.offsets[k], longest = 0;
            assert_true(rows > 0);
            for (int64_t j = b.offsets[k]; j < b.offsets[k + 1]; j++)
                longest = ntok[j] > longest ? ntok[j] : longest;
            if (ms > 0)
                assert_true(rows <= ms);
            if (mt > 0)
                assert_true(rows * longest <= mt);
        }
        int64_t last = b.offsets[b.n] - b.offsets[b.n - 1];
        moe_batch_list d;
        assert_int_equal(moe_batch_by_size(idx, n, sizes, mt, ms, mult, 1, &d), MOE_OK);
        assert_int_equal(d.n, b.n - (mult > 1 && last % mult != 0));
        assert_memory_equal(d.offsets, b.offsets, (size_t)(d.n + 1) * sizeof *d.offsets);
        moe_batch_list_free(&d);
        moe_batch_list_free(&b);
        checked++;
    }
    assert_true(checked > 2000);
}

/* ------------------------------------------------------------ epochs, shards */

static void test_batching_epoch_shuffle(void **state)
{
    (void)state;
    static const int64_t want[3][10] = {
        {4, 1, 5, 0, 7, 2, 3, 6, 9, 8}, /* numpy_seed(1 + 1) */
        {5, 4, 1, 2, 9, 6, 7, 0, 3, 8},
        {3, 8, 4, 9, 2, 6, 0, 1, 5, 7},
    };
    for (int e = 1; e <= 3; e++) {
        int64_t *o;
        assert_int_equal(moe_epoch_batch_order(10, 1, e, 1, &o), MOE_OK);
        assert_memory_equal(o, want[e - 1], sizeof want[0]);
        free(o);
        assert_int_equal(moe_epoch_batch_order(10, 1, e, 0, &o), MOE_OK);
        for (int i = 0; i < 10; i++)
            assert_int_equal(o[i], i);
        free(o);
    }
    int64_t *o = NULL;
    moe_data_clear_error();
    assert_int_equal(moe_epoch_batch_order(10, 4294967295u, 1, 1, &o), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "outside numpy's seed range"));
    assert_null(o);
    moe_data_clear_error();
    assert_int_equal(moe_epoch_batch_order(0, 1, 1, 1, &o), MOE_OK);
    free(o);
}

static void test_batching_sharding_pads_with_empty_batches(void **state)
{
    (void)state;
    assert_int_equal(moe_shard_count(10, 4), 3);
    assert_int_equal(moe_shard_count(8, 4), 2);
    assert_int_equal(moe_shard_count(3, 4), 1);
    assert_int_equal(moe_shard_count(0, 4), 0);
    assert_int_equal(moe_shard_count(10, 1), 10);
    static const int64_t plain[4][3] = {{0, 4, 8}, {1, 5, 9}, {2, 6, -1}, {3, 7, -1}};
    int64_t *o;
    assert_int_equal(moe_epoch_batch_order(10, 1, 1, 1, &o), MOE_OK);
    static const int64_t shuffled[4][3] = {{4, 7, 9}, {1, 2, 8}, {5, 3, -1}, {0, 6, -1}};
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 3; i++) {
            assert_int_equal(moe_shard_batch(NULL, 10, 4, r, i), plain[r][i]);
            assert_int_equal(moe_shard_batch(o, 10, 4, r, i), shuffled[r][i]);
        }
    assert_int_equal(moe_shard_batch(o, 10, 4, 0, 3), -1);
    assert_int_equal(moe_shard_batch(o, 10, 4, 4, 0), -1);
    assert_int_equal(moe_shard_batch(o, 10, 4, 0, -1), -1);
    /* every batch reaches exactly one rank */
    int seen[10] = {0};
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < 3; i++) {
            int64_t bt = moe_shard_batch(o, 10, 4, r, i);
            if (bt >= 0)
                seen[bt]++;
        }
    for (int k = 0; k < 10; k++)
        assert_int_equal(seen[k], 1);
    free(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batching_np_seed_outputs),
        cmocka_unit_test(test_batching_np_interval),
        cmocka_unit_test(test_batching_np_permutation),
        cmocka_unit_test(test_batching_ordered_indices),
        cmocka_unit_test(test_batching_filter_by_size),
        cmocka_unit_test(test_batching_spec_examples),
        cmocka_unit_test(test_batching_refusals),
        cmocka_unit_test(test_batching_random_against_transcription),
        cmocka_unit_test(test_batching_epoch_shuffle),
        cmocka_unit_test(test_batching_sharding_pads_with_empty_batches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
