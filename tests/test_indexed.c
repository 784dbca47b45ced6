/* test_indexed.c: mmap indexed datasets (data/indexed.h).
 *
 * The builder's output against fairseq's bytes (DATA_SPEC §1.8), round trips
 * in every integer dtype, the 65,500 dtype cut, fairseq's merge_file_,
 * Megatron layouts with and without the multimodal modes, every refusal with
 * its message, the dictionary check of reads, and that opening maps rather
 * than reads (a sparse 4 GiB .bin opens at once, touching few pages). Files
 * live in a fresh directory under /tmp, removed at the end.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "tmpdir.h"

#include "data/error.h"
#include "data/indexed.h"
#include "testutil.h"

static char g_dir[64];

static int setup_dir(void **state)
{
    (void)state;
    return moe_test_mkdtemp(g_dir, sizeof g_dir, "indexed");
}

static int remove_dir(void **state)
{
    (void)state;
    return moe_test_rmtree(g_dir);
}

/* <dir>/<name>; a few rotating buffers so several can be live at once */
static const char *at(const char *name)
{
    static char paths[8][256];
    static int k;
    char *p = paths[k++ % 8];
    snprintf(p, 256, "%s/%s", g_dir, name);
    return p;
}

static uint8_t *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void write_all_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n)
        assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void copy_file(const char *from, const char *to)
{
    size_t n;
    uint8_t *b = read_all(from, &n);
    write_all_file(to, b, n);
    free(b);
}

static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void put_i32(uint8_t *p, int32_t v) { memcpy(p, &v, 4); }
static void put_i64(uint8_t *p, int64_t v) { memcpy(p, &v, 8); }

/* a fairseq-layout .idx for the given sizes (pointers consistent), malloc'd */
static uint8_t *fairseq_idx(int code, const int64_t *sizes, int64_t n, size_t *len)
{
    *len = 26 + 12 * (size_t)n;
    uint8_t *b = calloc(1, *len);
    assert_non_null(b);
    memcpy(b, "MMIDIDX\0\0", 9);
    put_u64(b + 9, 1);
    b[17] = (uint8_t)code;
    put_u64(b + 18, (uint64_t)n);
    int64_t addr = 0;
    for (int64_t i = 0; i < n; i++) {
        put_i32(b + 26 + 4 * i, (int32_t)sizes[i]);
        put_i64(b + 26 + 4 * n + 8 * i, addr);
        addr += sizes[i] * moe_idx_dtype_size(code);
    }
    return b;
}

static void build(const char *prefix, int code, const int32_t *flat, const int64_t *sizes, int64_t n)
{
    moe_idx_builder *b;
    assert_int_equal(moe_idx_builder_open(prefix, code, &b), MOE_OK);
    for (int64_t i = 0, at_ = 0; i < n; at_ += sizes[i], i++)
        assert_int_equal(moe_idx_builder_add(b, flat + at_, sizes[i]), MOE_OK);
    assert_int_equal(moe_idx_builder_count(b), n);
    assert_int_equal(moe_idx_builder_finish(b), MOE_OK);
}

/* opening `prefix` fails with st and a message containing every needle */
static void expect_open_fails(const char *prefix, moe_status st, const char *needle1, const char *needle2)
{
    moe_data_clear_error();
    moe_idx *ds = (moe_idx *)0x1;
    moe_status got = moe_idx_open(prefix, &ds);
    if (got == MOE_OK)
        fail_msg("opening %s succeeded, expected a failure mentioning '%s'", prefix, needle1);
    assert_null(ds);
    const char *msg = moe_data_error();
    const char *verbose = getenv("MOE_TEST_VERBOSE");
    if (verbose && verbose[0] && verbose[0] != '0')
        printf("  [%s]\n", msg);
    assert_int_equal(got, st);
    if (!strstr(msg, needle1) || (needle2 && !strstr(msg, needle2)))
        fail_msg("message '%s' lacks '%s'%s%s", msg, needle1, needle2 ? " or " : "", needle2 ? needle2 : "");
    moe_data_clear_error();
}

/* files whose name starts with `stem` in the test directory */
static int count_files(const char *stem)
{
    DIR *d = opendir(g_dir);
    assert_non_null(d);
    int k = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strncmp(e->d_name, stem, strlen(stem)) == 0)
            k++;
    closedir(d);
    return k;
}

/* ------------------------------------------------------------ §1.8 */

static const int32_t vec_flat[] = {5, 4, 8, 2, 5, 7, 2, 2, 6, 4, 2};
static const int64_t vec_sizes[] = {4, 3, 1, 3};

static void test_indexed_fairseq_test_vector(void **state)
{
    (void)state;
    const char *prefix = at("train");
    build(prefix, moe_idx_best_dtype(16), vec_flat, vec_sizes, 4);
    static const uint8_t want_bin[] = {5, 0, 4, 0, 8, 0, 2, 0, 5, 0, 7, 0, 2, 0, 2, 0, 6, 0, 4, 0, 2, 0};
    static const uint8_t want_idx[74] = {
        0x4d, 0x4d, 0x49, 0x44, 0x49, 0x44, 0x58, 0x00, 0x00, /* magic */
        1, 0, 0, 0, 0, 0, 0, 0,                               /* version */
        8,                                                    /* dtype uint16 */
        4, 0, 0, 0, 0, 0, 0, 0,                               /* count */
        4, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0,       /* sizes */
        0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0,       /* pointers */
        14, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0};
    size_t n;
    uint8_t *bin = read_all(at("train.bin"), &n);
    assert_int_equal(n, sizeof want_bin);
    assert_memory_equal(bin, want_bin, n);
    free(bin);
    uint8_t *idx = read_all(at("train.idx"), &n);
    assert_int_equal(n, 74);
    assert_memory_equal(idx, want_idx, 74);
    free(idx);
    assert_int_equal(count_files("train"), 2); /* no temporaries left */

    moe_idx *ds;
    assert_int_equal(moe_idx_open(prefix, &ds), MOE_OK);
    assert_int_equal(moe_idx_count(ds), 4);
    assert_int_equal(moe_idx_num_tokens(ds), 11);
    assert_int_equal(moe_idx_layout_of(ds), MOE_IDX_FAIRSEQ);
    assert_int_equal(moe_idx_dtype_code(ds), 8);
    assert_string_equal(moe_idx_bin_path(ds), at("train.bin"));
    int64_t nd = 7;
    assert_null(moe_idx_doc_index(ds, &nd));
    assert_int_equal(nd, 0);
    assert_null(moe_idx_modes(ds));
    static const int64_t want_off[] = {0, 4, 7, 8, 11};
    assert_memory_equal(moe_idx_sizes(ds), vec_sizes, sizeof vec_sizes);
    assert_memory_equal(moe_idx_offsets(ds), want_off, sizeof want_off);
    int32_t out[11];
    assert_int_equal(moe_idx_read(ds, 0, 11, 16, out), MOE_OK);
    assert_memory_equal(out, vec_flat, sizeof out);
    assert_int_equal(moe_idx_read(ds, 5, 3, 16, out), MOE_OK);
    assert_int_equal(out[0], 7);
    assert_int_equal(out[2], 2);
    assert_int_equal(moe_idx_read(ds, 11, 0, 16, out), MOE_OK);
    static const int64_t want_item[] = {0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3};
    for (int64_t p = 0; p < 11; p++)
        assert_int_equal(moe_idx_item_of(ds, p), want_item[p]);
    assert_int_equal(moe_idx_item_of(ds, -1), -1);
    assert_int_equal(moe_idx_item_of(ds, 11), -1);
    moe_data_clear_error();
    assert_int_equal(moe_idx_read(ds, 9, 3, 16, out), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "read of tokens [9, 12) outside the dataset's 11 tokens"));
    moe_data_clear_error();
    assert_int_equal(moe_idx_read(ds, -1, 1, 16, out), MOE_ERR_INVALID_ARG);
    moe_data_clear_error();
    moe_idx_close(ds);
}

/* ------------------------------------------------------------ dtypes */

static void test_indexed_round_trip_every_dtype(void **state)
{
    (void)state;
    static const int codes[] = {1, 2, 3, 4, 5, 8, 9, 10};
    moe_test_rng rng = moe_test_rng_make(7);
    for (size_t c = 0; c < sizeof codes / sizeof *codes; c++) {
        int code = codes[c];
        int64_t lo = 0, hi = 0;
        switch (code) {
        case 1: lo = 0; hi = 255; break;
        case 2: lo = -128; hi = 127; break;
        case 3: lo = -32768; hi = 32767; break;
        case 8: lo = 0; hi = 65535; break;
        case 9: case 10: lo = 0; hi = INT32_MAX; break;
        default: lo = INT32_MIN; hi = INT32_MAX; break;
        }
        enum { ITEMS = 300 };
        int64_t sizes[ITEMS], total = 0;
        for (int i = 0; i < ITEMS; i++) {
            sizes[i] = i % 17 == 5 ? 0 : moe_test_rng_int(&rng, 1, 40); /* some empty items */
            total += sizes[i];
        }
        int32_t *flat = malloc((size_t)total * sizeof *flat), *back = malloc((size_t)total * sizeof *back);
        assert_non_null(flat);
        assert_non_null(back);
        for (int64_t k = 0; k < total; k++) {
            uint64_t r = moe_test_rng_next(&rng);
            flat[k] = (int32_t)(k % 11 == 0 ? (k % 22 == 0 ? lo : hi) : lo + (int64_t)(r % (uint64_t)(hi - lo + 1)));
        }
        char name[32];
        snprintf(name, sizeof name, "dtype%d", code);
        const char *prefix = at(name);
        build(prefix, code, flat, sizes, ITEMS);
        moe_idx *ds;
        assert_int_equal(moe_idx_open(prefix, &ds), MOE_OK);
        assert_int_equal(moe_idx_dtype_code(ds), code);
        assert_int_equal(moe_idx_count(ds), ITEMS);
        assert_int_equal(moe_idx_num_tokens(ds), total);
        assert_memory_equal(moe_idx_sizes(ds), sizes, sizeof sizes);
        struct stat sb;
        assert_int_equal(stat(moe_idx_bin_path(ds), &sb), 0);
        assert_int_equal(sb.st_size, total * moe_idx_dtype_size(code));
        assert_int_equal(moe_idx_read(ds, 0, total, 0, back), MOE_OK);
        assert_memory_equal(back, flat, (size_t)total * sizeof *flat);
        for (int t = 0; t < 50; t++) {
            int64_t s = moe_test_rng_int(&rng, 0, total), n = moe_test_rng_int(&rng, 0, total - s + 1);
            assert_int_equal(moe_idx_read(ds, s, n, 0, back), MOE_OK);
            assert_memory_equal(back, flat + s, (size_t)n * sizeof *flat);
            if (n > 0) {
                int64_t item = moe_idx_item_of(ds, s);
                const int64_t *off = moe_idx_offsets(ds);
                assert_true(off[item] <= s && s < off[item + 1]);
            }
        }
        moe_idx_close(ds);
        free(flat);
        free(back);
    }
}

static void test_indexed_dtype_cut_at_65500(void **state)
{
    (void)state;
    assert_int_equal(moe_idx_best_dtype(4), 8);
    assert_int_equal(moe_idx_best_dtype(65499), 8);
    assert_int_equal(moe_idx_best_dtype(65500), 9);
    assert_int_equal(moe_idx_best_dtype(65535), 9);
    assert_int_equal(moe_idx_best_dtype(65536), 9);
    assert_int_equal(moe_idx_best_dtype(4294967294LL), 9);
    assert_int_equal(moe_idx_best_dtype(4294967295LL), 5);
    /* a dictionary of 65,500 entries writes 4-byte ids */
    const int32_t ids[] = {65499, 2};
    const int64_t size = 2;
    build(at("cut"), moe_idx_best_dtype(65500), ids, &size, 1);
    moe_idx *ds;
    assert_int_equal(moe_idx_open(at("cut"), &ds), MOE_OK);
    assert_int_equal(moe_idx_dtype_code(ds), 9);
    struct stat sb;
    assert_int_equal(stat(at("cut.bin"), &sb), 0);
    assert_int_equal(sb.st_size, 8);
    int32_t out[2];
    assert_int_equal(moe_idx_read(ds, 0, 2, 65500, out), MOE_OK);
    assert_int_equal(out[0], 65499);
    moe_data_clear_error();
    assert_int_equal(moe_idx_read(ds, 0, 2, 65499, out), MOE_ERR_INVALID_ARG);
    moe_data_clear_error();
    moe_idx_close(ds);
}

static void test_indexed_builder_refuses_unfit_ids(void **state)
{
    (void)state;
    moe_idx_builder *b;
    moe_data_clear_error();
    assert_int_equal(moe_idx_builder_open(at("unfit"), 6, &b), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "dtype code 6 (float64) cannot hold token ids"));
    moe_data_clear_error();
    assert_int_equal(moe_idx_builder_open(at("unfit"), 8, &b), MOE_OK);
    const int32_t good[] = {3, 2}, bad[] = {4, 65536, 2}, neg[] = {-1};
    assert_int_equal(moe_idx_builder_add(b, good, 2), MOE_OK);
    assert_int_equal(moe_idx_builder_add(b, bad, 3), MOE_ERR_INVALID_ARG);
    assert_non_null(
        strstr(moe_data_error(), "id 65536 at position 1 of item 1 does not fit the dataset's dtype uint16 (0..65535)"));
    moe_data_clear_error();
    assert_int_equal(moe_idx_builder_add(b, neg, 1), MOE_ERR_INVALID_ARG);
    moe_data_clear_error();
    assert_int_equal(moe_idx_builder_add(b, good, 2), MOE_OK); /* still usable */
    assert_int_equal(moe_idx_builder_finish(b), MOE_OK);
    moe_idx *ds;
    assert_int_equal(moe_idx_open(at("unfit"), &ds), MOE_OK);
    assert_int_equal(moe_idx_count(ds), 2);
    assert_int_equal(moe_idx_num_tokens(ds), 4);
    moe_idx_close(ds);
    /* an aborted builder leaves nothing behind */
    assert_int_equal(moe_idx_builder_open(at("gone"), 4, &b), MOE_OK);
    assert_int_equal(moe_idx_builder_add(b, good, 2), MOE_OK);
    assert_int_equal(count_files("gone"), 2);
    moe_idx_builder_abort(b);
    assert_int_equal(count_files("gone"), 0);
}

/* resident pages of this process now (Linux), -1 when unknown */
static long resident_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return -1;
    long size = 0, res = -1;
    if (fscanf(f, "%ld %ld", &size, &res) != 2)
        res = -1;
    fclose(f);
    return res < 0 ? -1 : res * (sysconf(_SC_PAGESIZE) / 1024);
}

/* the builder's memory does not grow with the item count: 4M items would
 * take 16-32 MiB as a size list */
static void test_indexed_builder_streams(void **state)
{
    (void)state;
    const int64_t items = 4 << 20;
    moe_idx_builder *b;
    assert_int_equal(moe_idx_builder_open(at("many"), 8, &b), MOE_OK);
    long before = resident_kib();
    for (int64_t i = 0; i < items; i++) {
        const int32_t id = (int32_t)(i % 65536);
        assert_true(moe_idx_builder_add(b, &id, 1) == MOE_OK);
    }
    long after = resident_kib();
    if (before >= 0 && after >= 0) {
        printf("  %lld items added: resident memory grew by %ld KiB\n", (long long)items, after - before);
        assert_true(after - before < 4096);
    }
    assert_int_equal(moe_idx_builder_finish(b), MOE_OK);
    moe_idx *ds;
    assert_int_equal(moe_idx_open(at("many"), &ds), MOE_OK);
    assert_int_equal(moe_idx_count(ds), items);
    assert_int_equal(moe_idx_offsets(ds)[items], items);
    int32_t out[3];
    assert_int_equal(moe_idx_read(ds, items - 3, 3, 0, out), MOE_OK);
    for (int k = 0; k < 3; k++)
        assert_int_equal(out[k], (int32_t)((items - 3 + k) % 65536));
    moe_idx_close(ds);
    unlink(at("many.bin"));
    unlink(at("many.idx"));
}

/* ------------------------------------------------------------ merge */

static void test_indexed_append_equals_direct_build(void **state)
{
    (void)state;
    const int32_t a[] = {10, 11, 2, 12, 2}, bb[] = {2, 13, 14, 15, 2, 300, 2};
    const int64_t sa[] = {3, 2}, sb[] = {1, 0, 4, 2};
    build(at("partA"), 8, a, sa, 2);
    build(at("partB"), 8, bb, sb, 4);
    const int32_t first[] = {7, 2}, last[] = {9, 9, 2};
    moe_idx_builder *b;
    assert_int_equal(moe_idx_builder_open(at("merged"), 8, &b), MOE_OK);
    assert_int_equal(moe_idx_builder_add(b, first, 2), MOE_OK);
    assert_int_equal(moe_idx_builder_append(b, at("partA")), MOE_OK);
    assert_int_equal(moe_idx_builder_append(b, at("partB")), MOE_OK);
    assert_int_equal(moe_idx_builder_add(b, last, 3), MOE_OK);
    assert_int_equal(moe_idx_builder_count(b), 8);
    assert_int_equal(moe_idx_builder_finish(b), MOE_OK);

    const int32_t all[] = {7, 2, 10, 11, 2, 12, 2, 2, 13, 14, 15, 2, 300, 2, 9, 9, 2};
    const int64_t sall[] = {2, 3, 2, 1, 0, 4, 2, 3};
    build(at("direct"), 8, all, sall, 8);
    const char *ext[] = {".bin", ".idx"};
    for (int e = 0; e < 2; e++) {
        char p1[64], p2[64];
        snprintf(p1, sizeof p1, "merged%s", ext[e]);
        snprintf(p2, sizeof p2, "direct%s", ext[e]);
        size_t n1, n2;
        uint8_t *x = read_all(at(p1), &n1), *y = read_all(at(p2), &n2);
        assert_int_equal(n1, n2);
        assert_memory_equal(x, y, n1);
        free(x);
        free(y);
    }
    /* merge_file_ asserts equal dtypes; a Megatron index is not fairseq's */
    assert_int_equal(moe_idx_builder_open(at("merged2"), 4, &b), MOE_OK);
    moe_data_clear_error();
    assert_int_equal(moe_idx_builder_append(b, at("partA")), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "its dtype is uint16, this dataset's is int32"));
    moe_data_clear_error();
    const int64_t docs[] = {0, 2};
    assert_int_equal(moe_idx_write_megatron(at("meg_part"), 4, a, sa, 2, docs, 2), MOE_OK);
    assert_int_equal(moe_idx_builder_append(b, at("meg_part")), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_data_error(), "Megatron-layout"));
    moe_data_clear_error();
    assert_int_equal(moe_idx_builder_append(b, at("nothing_here")), MOE_ERR_IO);
    moe_data_clear_error();
    moe_idx_builder_abort(b);
    assert_int_equal(count_files("merged2"), 0);
}

/* ------------------------------------------------------------ Megatron */

static const int32_t ex_flat[] = {10, 11, 2, 12, 2, 2, 13, 14, 15, 16, 17, 2, 18, 2};
static const int64_t ex_sizes[] = {3, 2, 1, 6, 2};

static void test_indexed_megatron_layouts(void **state)
{
    (void)state;
    const int64_t docs[] = {0, 2, 5};
    assert_int_equal(moe_idx_write_megatron(at("meg"), 8, ex_flat, ex_sizes, 5, docs, 3), MOE_OK);
    size_t n;
    uint8_t *idx = read_all(at("meg.idx"), &n);
    assert_int_equal(n, 34 + 12 * 5 + 8 * 3);
    assert_memory_equal(idx, "MMIDIDX\0\0", 9);
    uint64_t v;
    memcpy(&v, idx + 18, 8);
    assert_int_equal(v, 5);
    memcpy(&v, idx + 26, 8);
    assert_int_equal(v, 3);
    int32_t s3;
    memcpy(&s3, idx + 34 + 12, 4);
    assert_int_equal(s3, 6);
    int64_t p4;
    memcpy(&p4, idx + 34 + 20 + 32, 8); /* pointer of item 4: 12 tokens in */
    assert_int_equal(p4, 24);
    free(idx);

    moe_idx *ds;
    assert_int_equal(moe_idx_open(at("meg"), &ds), MOE_OK);
    assert_int_equal(moe_idx_layout_of(ds), MOE_IDX_MEGATRON);
    assert_int_equal(moe_idx_count(ds), 5);
    assert_int_equal(moe_idx_num_tokens(ds), 14);
    assert_memory_equal(moe_idx_sizes(ds), ex_sizes, sizeof ex_sizes);
    int64_t nd;
    const int64_t *d = moe_idx_doc_index(ds, &nd);
    assert_int_equal(nd, 3);
    assert_memory_equal(d, docs, sizeof docs);
    assert_null(moe_idx_modes(ds));
    int32_t out[14];
    assert_int_equal(moe_idx_read(ds, 0, 14, 19, out), MOE_OK);
    assert_memory_equal(out, ex_flat, sizeof out);
    moe_idx_close(ds);

    const int8_t modes[] = {0, 1, 0, 1, 1};
    assert_int_equal(moe_idx_write_megatron_multimodal(at("mm"), 4, ex_flat, ex_sizes, 5, docs, 3, modes), MOE_OK);
    struct stat sb;
    assert_int_equal(stat(at("mm.idx"), &sb), 0);
    assert_int_equal(sb.st_size, 34 + 13 * 5 + 8 * 3);
    assert_int_equal(moe_idx_open(at("mm"), &ds), MOE_OK);
    assert_int_equal(moe_idx_layout_of(ds), MOE_IDX_MEGATRON_MULTIMODAL);
    assert_int_equal(moe_idx_dtype_code(ds), 4);
    assert_memory_equal(moe_idx_modes(ds), modes, sizeof modes);
    assert_memory_equal(moe_idx_doc_index(ds, NULL), docs, sizeof docs);
    assert_int_equal(moe_idx_read(ds, 3, 11, 19, out), MOE_OK);
    assert_memory_equal(out, ex_flat + 3, 11 * sizeof *out);
    moe_idx_close(ds);

    /* no sequences: the one-entry document index, plain layout */
    const int64_t empty_docs[] = {0};
    assert_int_equal(moe_idx_write_megatron(at("meg0"), 8, NULL, NULL, 0, empty_docs, 1), MOE_OK);
    assert_int_equal(moe_idx_open(at("meg0"), &ds), MOE_OK);
    assert_int_equal(moe_idx_layout_of(ds), MOE_IDX_MEGATRON);
    assert_int_equal(moe_idx_count(ds), 0);
    assert_int_equal(moe_idx_num_tokens(ds), 0);
    moe_idx_close(ds);

    /* the writer checks what it is given */
    moe_data_clear_error();
    const int64_t bad_docs[] = {0, 4};
    assert_int_equal(moe_idx_write_megatron(at("megbad"), 8, ex_flat, ex_sizes, 5, bad_docs, 2), MOE_ERR_INVALID_ARG);
    moe_data_clear_error();
    assert_int_equal(moe_idx_write_megatron(at("megbad"), 9, ex_flat, ex_sizes, 5, docs, 3), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "Megatron's integer codes"));
    moe_data_clear_error();
}

/* ------------------------------------------------------------ refusals */

/* <name>.idx = idx bytes, <name>.bin = the §1.8 data (or none) */
static const char *bad_dataset(const char *name, const uint8_t *idx, size_t len, int with_bin)
{
    char file[64];
    snprintf(file, sizeof file, "%s.idx", name);
    write_all_file(at(file), idx, len);
    if (with_bin) {
        snprintf(file, sizeof file, "%s.bin", name);
        copy_file(at("good.bin"), at(file));
    }
    return at(name);
}

static void test_indexed_refusals(void **state)
{
    (void)state;
    build(at("good"), 8, vec_flat, vec_sizes, 4);
    size_t len;
    uint8_t *good = read_all(at("good.idx"), &len);
    assert_int_equal(len, 74);
    uint8_t *b = malloc(len + 64);
    assert_non_null(b);
#define FRESH() memcpy(b, good, len)

    FRESH();
    memcpy(b, "TNTIDX\0\0", 8);
    expect_open_fails(bad_dataset("tnt", b, len, 1), MOE_ERR_UNSUPPORTED, "lazy/cached", "--dataset-impl mmap");
    FRESH();
    memcpy(b, "HUFFIDX\0\0", 9);
    expect_open_fails(bad_dataset("huff", b, len, 1), MOE_ERR_UNSUPPORTED, "huffman", "--dataset-impl mmap");
    FRESH();
    memcpy(b, "NOTANIDX!", 9);
    expect_open_fails(bad_dataset("magic", b, len, 1), MOE_ERR_INVALID_ARG,
                      "starts with bytes 4e 4f 54 41 4e 49 44 58 21", "MMIDIDX");
    FRESH();
    b[9] = 2;
    expect_open_fails(bad_dataset("ver2", b, len, 1), MOE_ERR_UNSUPPORTED, "index version 2, expected 1", NULL);
    FRESH();
    b[17] = 6;
    expect_open_fails(bad_dataset("dt6", b, len, 1), MOE_ERR_UNSUPPORTED, "dtype code 6 is a float type", "integers");
    FRESH();
    b[17] = 7;
    expect_open_fails(bad_dataset("dt7", b, len, 1), MOE_ERR_UNSUPPORTED, "dtype code 7 is a float type",
                      "float32 in current Megatron");
    FRESH();
    b[17] = 11;
    expect_open_fails(bad_dataset("dt11", b, len, 1), MOE_ERR_INVALID_ARG, "unknown dtype code 11", NULL);
    FRESH();
    b[17] = 0;
    expect_open_fails(bad_dataset("dt0", b, len, 1), MOE_ERR_INVALID_ARG, "unknown dtype code 0", NULL);

    /* truncated: inside the header, inside the arrays, empty */
    FRESH();
    expect_open_fails(bad_dataset("trunc_head", b, 20, 1), MOE_ERR_INVALID_ARG, "is truncated: 20 bytes",
                      "26-byte header");
    expect_open_fails(bad_dataset("trunc_magic", b, 5, 1), MOE_ERR_INVALID_ARG, "is truncated: 5 bytes", NULL);
    expect_open_fails(bad_dataset("trunc_arr", b, 70, 1), MOE_ERR_INVALID_ARG,
                      "is truncated: its header counts 4 items", "need at least 74 bytes, but the file has 70");
    expect_open_fails(bad_dataset("empty", b, 0, 1), MOE_ERR_INVALID_ARG, "is empty (0 bytes)", NULL);
    FRESH();
    put_u64(b + 18, UINT64_MAX / 2);
    expect_open_fails(bad_dataset("huge_n", b, len, 1), MOE_ERR_INVALID_ARG, "is truncated", "more than 2^64");

    /* trailing bytes: fairseq would ignore them, the layout test cannot */
    FRESH();
    memset(b + len, 0xab, 8);
    expect_open_fails(bad_dataset("trail", b, len + 8, 1), MOE_ERR_INVALID_ARG,
                      "has 82 bytes, which fits neither layout for its 4 items",
                      "exactly 74 bytes (the file has 8 more)");
    /* .bin shorter or longer than the sizes say, or missing */
    FRESH();
    bad_dataset("shortbin", b, len, 0);
    write_all_file(at("shortbin.bin"), "\5\0\4\0\10\0\2\0\5\0\7\0\2\0\2\0", 16);
    expect_open_fails(at("shortbin"), MOE_ERR_INVALID_ARG, "is truncated: 16 bytes",
                      "item 3 (bytes from 16) points past the end of the data");
    bad_dataset("longbin", b, len, 0);
    write_all_file(at("longbin.bin"), "\5\0\4\0\10\0\2\0\5\0\7\0\2\0\2\0\6\0\4\0\2\0\0\0", 24);
    expect_open_fails(at("longbin"), MOE_ERR_INVALID_ARG, "2 bytes are not covered by the index", NULL);
    bad_dataset("nobin", b, len, 0);
    expect_open_fails(at("nobin"), MOE_ERR_IO, "cannot open", "nobin.bin': No such file");
    expect_open_fails(at("noidx"), MOE_ERR_IO, "noidx.idx': No such file", NULL);
    write_all_file(at("rawtext"), "the cat\n", 8);
    expect_open_fails(at("rawtext"), MOE_ERR_INVALID_ARG, "raw dataset impl", "--dataset-impl mmap");

    /* pointers and sizes */
    FRESH();
    put_i64(b + 26 + 16 + 16, 15); /* pointer of item 2: 14 expected */
    expect_open_fails(bad_dataset("ptr", b, len, 1), MOE_ERR_INVALID_ARG, "item 2's byte pointer is 15, expected 14",
                      "inconsistent");
    FRESH();
    put_i64(b + 26 + 16, 2);
    expect_open_fails(bad_dataset("ptr0", b, len, 1), MOE_ERR_INVALID_ARG, "item 0's byte pointer is 2, expected 0",
                      NULL);
    FRESH();
    put_i32(b + 26 + 4, -3);
    expect_open_fails(bad_dataset("negsize", b, len, 1), MOE_ERR_INVALID_ARG, "item 1 has negative size -3", NULL);
    FRESH();
    put_i32(b + 26 + 12, 4000); /* the last item points past the data */
    expect_open_fails(bad_dataset("past", b, len, 1), MOE_ERR_INVALID_ARG, "is truncated: 22 bytes",
                      "item 3 (bytes from 16) points past the end");

    /* Megatron document index */
    const int64_t docs[] = {0, 2, 5};
    assert_int_equal(moe_idx_write_megatron(at("megdoc"), 8, ex_flat, ex_sizes, 5, docs, 3), MOE_OK);
    size_t mlen;
    uint8_t *meg = read_all(at("megdoc.idx"), &mlen);
    size_t doc_at = 34 + 12 * 5;
    put_i64(meg + doc_at + 16, 4);
    write_all_file(at("megdoc.idx"), meg, mlen);
    expect_open_fails(at("megdoc"), MOE_ERR_INVALID_ARG, "document index ends at 4, expected the sequence count 5",
                      NULL);
    put_i64(meg + doc_at + 16, 5);
    put_i64(meg + doc_at, 1);
    write_all_file(at("megdoc.idx"), meg, mlen);
    expect_open_fails(at("megdoc"), MOE_ERR_INVALID_ARG, "document index entry 0 is 1", NULL);
    put_i64(meg + doc_at, 0);
    put_i64(meg + doc_at + 8, 6);
    write_all_file(at("megdoc.idx"), meg, mlen);
    expect_open_fails(at("megdoc"), MOE_ERR_INVALID_ARG, "document index entry 1 is 6", NULL);
    put_i64(meg + doc_at + 8, 2);
    write_all_file(at("megdoc.idx"), meg, mlen);
    moe_idx *ds;
    assert_int_equal(moe_idx_open(at("megdoc"), &ds), MOE_OK); /* restored */
    moe_idx_close(ds);
    /* a Megatron index cut short fits no layout */
    write_all_file(at("megdoc.idx"), meg, mlen - 8);
    expect_open_fails(at("megdoc"), MOE_ERR_INVALID_ARG, "fits neither layout",
                      "Megatron one with the document-index length 3 read at byte 26 would be 118 bytes");
    free(meg);
    free(b);
    free(good);
#undef FRESH
}

/* ------------------------------------------------------------ reads */

static void test_indexed_read_checks_vocab(void **state)
{
    (void)state;
    const int32_t flat[] = {5, 4, 2, 6, 9, 70, 2};
    const int64_t sizes[] = {3, 4};
    build(at("vocab"), 8, flat, sizes, 2);
    moe_idx *ds;
    assert_int_equal(moe_idx_open(at("vocab"), &ds), MOE_OK);
    int32_t out[7];
    assert_int_equal(moe_idx_read(ds, 0, 5, 16, out), MOE_OK);
    moe_data_clear_error();
    assert_int_equal(moe_idx_read(ds, 0, 7, 16, out), MOE_ERR_INVALID_ARG);
    const char *msg = moe_data_error();
    if (!strstr(msg, "vocab.bin': token 2 of item 1 (flat position 5) is 70, outside the dictionary of 16 entries "
                     "(ids 0..15)"))
        fail_msg("message: %s", msg);
    moe_data_clear_error();
    assert_int_equal(moe_idx_read(ds, 0, 7, 71, out), MOE_OK);
    assert_int_equal(moe_idx_read(ds, 0, 7, 0, out), MOE_OK); /* no dictionary: no check */
    moe_idx_close(ds);

    /* signed dtypes: negative ids are outside any dictionary */
    const int32_t sflat[] = {3, -4, 2};
    const int64_t ssize = 3;
    build(at("signed"), 3, sflat, &ssize, 1);
    assert_int_equal(moe_idx_open(at("signed"), &ds), MOE_OK);
    assert_int_equal(moe_idx_read(ds, 0, 3, 0, out), MOE_OK);
    assert_int_equal(out[1], -4);
    moe_data_clear_error();
    assert_int_equal(moe_idx_read(ds, 0, 3, 50, out), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "token 1 of item 0 (flat position 1) is -4, outside the dictionary"));
    moe_data_clear_error();
    moe_idx_close(ds);

    /* an id that no int32 holds is refused even without a dictionary */
    const int64_t one = 1;
    size_t ilen;
    uint8_t *idx = fairseq_idx(10, &one, 1, &ilen);
    write_all_file(at("wide.idx"), idx, ilen);
    free(idx);
    const uint64_t wide = 1ull << 40;
    write_all_file(at("wide.bin"), &wide, 8);
    assert_int_equal(moe_idx_open(at("wide"), &ds), MOE_OK);
    moe_data_clear_error();
    assert_int_equal(moe_idx_read(ds, 0, 1, 0, out), MOE_ERR_INVALID_ARG);
    assert_non_null(strstr(moe_data_error(), "is 1099511627776, which does not fit a 32-bit token id"));
    moe_data_clear_error();
    moe_idx_close(ds);
}

/* ------------------------------------------------------------ mapping */

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static long minor_faults(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt + ru.ru_majflt;
}

static void test_indexed_open_maps_not_reads(void **state)
{
    (void)state;
    /* 2^31 uint16 tokens (4 GiB) in two items, as a sparse file */
    const int64_t sizes[] = {1LL << 30, 1LL << 30};
    size_t ilen;
    uint8_t *idx = fairseq_idx(8, sizes, 2, &ilen);
    write_all_file(at("sparse.idx"), idx, ilen);
    free(idx);
    int fd = open(at("sparse.bin"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    const off_t bytes = (off_t)1 << 32;
    if (ftruncate(fd, bytes) != 0) {
        close(fd);
        skip(); /* a filesystem without sparse files */
    }
    const uint16_t last[2] = {7, 2};
    assert_int_equal(pwrite(fd, last, 4, bytes - 4), 4);
    close(fd);

    long f0 = minor_faults();
    double t0 = now_s();
    moe_idx *ds;
    assert_int_equal(moe_idx_open(at("sparse"), &ds), MOE_OK);
    double dt = now_s() - t0;
    long faults = minor_faults() - f0;
    printf("  opening a 4 GiB dataset: %.4f s, %ld page faults\n", dt, faults);
    assert_true(dt < 0.5);      /* reading 4 GiB takes seconds */
    assert_true(faults < 1000); /* touching it would fault 2^20 pages */
    assert_int_equal(moe_idx_num_tokens(ds), 1LL << 31);
    int32_t out[3];
    assert_int_equal(moe_idx_read(ds, (1LL << 31) - 3, 3, 16, out), MOE_OK);
    assert_int_equal(out[0], 0);
    assert_int_equal(out[1], 7);
    assert_int_equal(out[2], 2);
    assert_int_equal(moe_idx_item_of(ds, (1LL << 31) - 1), 1);
    assert_int_equal(moe_idx_item_of(ds, (1LL << 30) - 1), 0);
    moe_idx_close(ds);
    unlink(at("sparse.bin"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_indexed_fairseq_test_vector),
        cmocka_unit_test(test_indexed_round_trip_every_dtype),
        cmocka_unit_test(test_indexed_dtype_cut_at_65500),
        cmocka_unit_test(test_indexed_builder_refuses_unfit_ids),
        cmocka_unit_test(test_indexed_builder_streams),
        cmocka_unit_test(test_indexed_append_equals_direct_build),
        cmocka_unit_test(test_indexed_megatron_layouts),
        cmocka_unit_test(test_indexed_refusals),
        cmocka_unit_test(test_indexed_read_checks_vocab),
        cmocka_unit_test(test_indexed_open_maps_not_reads),
    };
    return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
