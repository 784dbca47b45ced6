/* indexed.c: the mmap indexed dataset reader (fairseq and Megatron layouts),
 * fairseq's streaming builder, and a small Megatron writer (data/indexed.h).
 *
 * The .idx fields after the 26- or 34-byte header are unaligned (sizes start
 * at byte 26, pointers at 26+4N): they are read and written with memcpy,
 * never through cast pointers. The builder writes the item sizes straight
 * into the temporary .idx behind a header whose count is patched at the end,
 * then reads them back to append the pointers: that file is the size stream,
 * so the builder holds two write buffers and nothing per item.
 */
#include "data/indexed.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/error.h"
#include "data/text.h"

#define MAGIC "MMIDIDX\0\0"
#define MAGIC_LEN 9
#define FAIRSEQ_HEADER 26  /* magic, u64 version, u8 dtype, u64 N */
#define MEGATRON_HEADER 34 /* ... and u64 D */

struct moe_idx {
    char *idx_path, *bin_path;
    const uint8_t *idx_map; /* the whole .idx (NULL when empty) */
    size_t idx_len;
    const uint8_t *bin_map; /* the whole .bin (NULL when empty) */
    size_t bin_len;
    int dtype, itemsize;
    moe_idx_layout layout;
    int64_t n, n_docs, n_tokens;
    int64_t *sizes, *offsets, *docs; /* NULL when opened for append only */
    const int8_t *modes;             /* into idx_map, multimodal only */
    size_t sizes_at;                 /* byte offset of the int32 sizes in the .idx */
};

/* ------------------------------------------------------------ small helpers */

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    uint8_t first;
    memcpy(&first, &one, 1);
    return first == 1;
}

static moe_status refuse_big_endian(const char *what)
{
    return moe_data_fail(MOE_ERR_UNSUPPORTED,
                         "%s: this host is big-endian; indexed datasets are little-endian and this library does not "
                         "byte-swap them: use a little-endian machine",
                         what);
}

static moe_status nomem(const char *what)
{
    return moe_data_fail(MOE_ERR_NOMEM, "out of host memory %s", what);
}

static char *path_with(const char *prefix, const char *suffix)
{
    size_t a = strlen(prefix), b = strlen(suffix);
    char *p = malloc(a + b + 1);
    if (p) {
        memcpy(p, prefix, a);
        memcpy(p + a, suffix, b + 1);
    }
    return p;
}

static uint64_t rd_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static int32_t rd_i32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static int64_t rd_i64(const uint8_t *p)
{
    int64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

int moe_idx_dtype_size(int code)
{
    switch (code) {
    case 1: case 2: return 1;
    case 3: case 8: return 2;
    case 4: case 9: return 4;
    case 5: case 10: return 8;
    default: return 0;
    }
}

const char *moe_idx_dtype_name(int code)
{
    switch (code) {
    case 1: return "uint8";
    case 2: return "int8";
    case 3: return "int16";
    case 4: return "int32";
    case 5: return "int64";
    case 6: return "float64";
    case 7: return "float64 or float32";
    case 8: return "uint16";
    case 9: return "uint32";
    case 10: return "uint64";
    default: return "unknown";
    }
}

int moe_idx_best_dtype(int64_t vocab_size)
{
    if (vocab_size < 65500)
        return 8;
    if (vocab_size < 4294967295LL)
        return 9;
    return 5;
}

/* The ids a dtype holds: [lo, hi]. */
static void dtype_range(int code, int64_t *lo, int64_t *hi)
{
    switch (code) {
    case 1: *lo = 0; *hi = 255; break;
    case 2: *lo = -128; *hi = 127; break;
    case 3: *lo = -32768; *hi = 32767; break;
    case 8: *lo = 0; *hi = 65535; break;
    case 9: case 10: *lo = 0; *hi = INT64_MAX; break;
    default: *lo = INT64_MIN; *hi = INT64_MAX; break; /* int32, int64 */
    }
}

/* ids[0..n) as dtype `code` into dst (little-endian host); the ids must fit. */
static void encode_ids(int code, const int32_t *ids, int64_t n, uint8_t *dst)
{
    for (int64_t i = 0; i < n; i++) {
        switch (code) {
        case 1: { uint8_t v = (uint8_t)ids[i]; memcpy(dst + i, &v, 1); break; }
        case 2: { int8_t v = (int8_t)ids[i]; memcpy(dst + i, &v, 1); break; }
        case 3: { int16_t v = (int16_t)ids[i]; memcpy(dst + 2 * i, &v, 2); break; }
        case 8: { uint16_t v = (uint16_t)ids[i]; memcpy(dst + 2 * i, &v, 2); break; }
        case 4: { int32_t v = ids[i]; memcpy(dst + 4 * i, &v, 4); break; }
        case 9: { uint32_t v = (uint32_t)ids[i]; memcpy(dst + 4 * i, &v, 4); break; }
        case 5: { int64_t v = ids[i]; memcpy(dst + 8 * i, &v, 8); break; }
        case 10: { uint64_t v = (uint64_t)ids[i]; memcpy(dst + 8 * i, &v, 8); break; }
        default: break;
        }
    }
}

/* -1 when every id fits the dtype, else the position of the first that does not. */
static int64_t first_unfit(int code, const int32_t *ids, int64_t n)
{
    int64_t lo, hi;
    dtype_range(code, &lo, &hi);
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < lo || ids[i] > hi)
            return i;
    return -1;
}

static moe_status check_write_dtype(const char *what, const char *path, int code, int megatron)
{
    int ok = megatron ? (code >= 1 && code <= 5) || code == 8 : moe_idx_dtype_size(code) > 0;
    if (!ok)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "%s '%s': dtype code %d (%s) cannot hold token ids; expected one of %s", what, path, code,
                             moe_idx_dtype_name(code),
                             megatron ? "Megatron's integer codes 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16"
                                      : "1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16, 9 uint32, 10 uint64");
    return MOE_OK;
}

/* ------------------------------------------------------------ reader */

static void unmap_all(moe_idx *ds)
{
    if (ds->idx_map)
        munmap((void *)ds->idx_map, ds->idx_len);
    if (ds->bin_map)
        munmap((void *)ds->bin_map, ds->bin_len);
    ds->idx_map = ds->bin_map = NULL;
}

void moe_idx_close(moe_idx *ds)
{
    if (!ds)
        return;
    unmap_all(ds);
    free(ds->idx_path);
    free(ds->bin_path);
    free(ds->sizes);
    free(ds->offsets);
    free(ds->docs);
    free(ds);
}

/* Maps a whole regular file read-only; *map stays NULL for an empty file. */
static moe_status map_file(const char *path, const char *role, const char *prefix, const uint8_t **map, size_t *len)
{
    *map = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT && role[0] == 'i') {
            struct stat raw;
            if (stat(prefix, &raw) == 0 && S_ISREG(raw.st_mode))
                return moe_data_fail(MOE_ERR_INVALID_ARG,
                                     "'%s' is missing but '%s' is a plain file: that is fairseq's raw dataset impl "
                                     "(text read at load time), which is not supported; re-run fairseq-preprocess "
                                     "with --dataset-impl mmap (or moelm-preprocess)",
                                     path, prefix);
        }
        return moe_data_fail(MOE_ERR_IO,
                             "cannot open '%s': %s; an indexed dataset is the pair %s.idx and %s.bin written by "
                             "fairseq-preprocess or moelm-preprocess",
                             path, strerror(e), prefix, prefix);
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        int e = errno;
        close(fd);
        return moe_data_fail(MOE_ERR_IO, "cannot read '%s': %s; expected the dataset's %s file", path,
                             S_ISREG(sb.st_mode) ? strerror(e) : "not a regular file", role);
    }
    if ((uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
        close(fd);
        return moe_data_fail(MOE_ERR_UNSUPPORTED, "'%s' (%lld bytes) is larger than this host can map", path,
                             (long long)sb.st_size);
    }
    *len = (size_t)sb.st_size;
    if (*len > 0) {
        void *m = mmap(NULL, *len, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            *len = 0;
            return moe_data_fail(MOE_ERR_IO, "cannot map '%s' (%zu bytes): %s", path, (size_t)sb.st_size,
                                 strerror(e));
        }
        *map = m;
    }
    close(fd);
    return MOE_OK;
}

/* Magic, version, dtype; refuses fairseq's other impls by name. */
static moe_status check_header(const moe_idx *ds)
{
    const uint8_t *m = ds->idx_map;
    size_t F = ds->idx_len;
    const char *p = ds->idx_path;
    if (F >= 8 && memcmp(m, "TNTIDX\0\0", 8) == 0)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "'%s' is a fairseq lazy/cached dataset index (magic TNTIDX, also Megatron's legacy "
                             "format), not an mmap one: re-run fairseq-preprocess with --dataset-impl mmap (or "
                             "moelm-preprocess)",
                             p);
    if (F >= 8 && memcmp(m, "HUFFIDX\0", 8) == 0)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "'%s' is a fairseq huffman dataset index (magic HUFFIDX), not an mmap one: re-run "
                             "fairseq-preprocess with --dataset-impl mmap (or moelm-preprocess)",
                             p);
    size_t k = F < MAGIC_LEN ? F : MAGIC_LEN;
    if (memcmp(m, MAGIC, k) != 0) {
        char hex[3 * MAGIC_LEN + 1] = "";
        for (size_t i = 0; i < k; i++)
            snprintf(hex + 3 * i, 4, "%02x ", m[i]);
        if (k > 0)
            hex[3 * k - 1] = '\0';
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s' is not an indexed dataset index: it starts with bytes %s, expected the mmap magic "
                             "4d 4d 49 44 49 44 58 00 00 (\"MMIDIDX\\0\\0\") of fairseq-preprocess --dataset-impl mmap",
                             p, hex);
    }
    if (F < FAIRSEQ_HEADER)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s' is truncated: %zu bytes, shorter than the %d-byte header (magic, version, dtype, "
                             "count); re-run preprocessing",
                             p, F, FAIRSEQ_HEADER);
    uint64_t version = rd_u64(m + 9);
    if (version != 1)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "'%s': index version %llu, expected 1 (the only version fairseq and Megatron write)", p,
                             (unsigned long long)version);
    int code = m[17];
    if (code == 6 || code == 7)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "'%s': dtype code %d is a float type (%s; the meaning of 6 and 7 changed across Megatron "
                             "versions); token ids must be stored as integers: re-run preprocessing",
                             p, code, code == 6 ? "float64" : "float64 in fairseq, float32 in current Megatron");
    if (moe_idx_dtype_size(code) == 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s': unknown dtype code %d; expected one of 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, "
                             "8 uint16, 9 uint32, 10 uint64: the file is damaged or from an unknown writer",
                             p, code);
    return MOE_OK;
}

/* Tells the layouts apart by the exact file size (DATA_SPEC §2.6). */
static moe_status detect_layout(moe_idx *ds)
{
    const uint8_t *m = ds->idx_map;
    uint64_t F = ds->idx_len;
    const char *p = ds->idx_path;
    uint64_t N = rd_u64(m + 18);
    uint64_t fair_room = (F - FAIRSEQ_HEADER) / 12;
    if (N <= fair_room && F == FAIRSEQ_HEADER + 12 * N) {
        ds->layout = MOE_IDX_FAIRSEQ;
        ds->n = (int64_t)N;
        ds->sizes_at = FAIRSEQ_HEADER;
        return MOE_OK;
    }
    uint64_t D = 0;
    if (F >= MEGATRON_HEADER) {
        D = rd_u64(m + 26);
        uint64_t room = F - MEGATRON_HEADER;
        if (N <= room / 12) {
            uint64_t rest = room - 12 * N;
            if (rest % 8 == 0 && rest / 8 == D) {
                ds->layout = MOE_IDX_MEGATRON;
                ds->n = (int64_t)N;
                ds->n_docs = (int64_t)D;
                ds->sizes_at = MEGATRON_HEADER;
                return MOE_OK;
            }
        }
        if (N <= room / 13) {
            uint64_t rest = room - 13 * N;
            if (rest % 8 == 0 && rest / 8 == D) {
                ds->layout = MOE_IDX_MEGATRON_MULTIMODAL;
                ds->n = (int64_t)N;
                ds->n_docs = (int64_t)D;
                ds->sizes_at = MEGATRON_HEADER;
                return MOE_OK;
            }
        }
    }
    if (N > fair_room) {
        char need[64] = "more than 2^64";
        if (N <= (UINT64_MAX - FAIRSEQ_HEADER) / 12)
            snprintf(need, sizeof need, "at least %llu", (unsigned long long)(FAIRSEQ_HEADER + 12 * N));
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s' is truncated: its header counts %llu items, whose sizes and pointers need %s "
                             "bytes, but the file has %llu; re-run preprocessing",
                             p, (unsigned long long)N, need, (unsigned long long)F);
    }
    uint64_t want = FAIRSEQ_HEADER + 12 * N;
    char meg[160] = "";
    if (F >= MEGATRON_HEADER) {
        if (N <= (UINT64_MAX - MEGATRON_HEADER) / 12 && D <= (UINT64_MAX - MEGATRON_HEADER - 12 * N) / 8)
            snprintf(meg, sizeof meg, ", a Megatron one with the document-index length %llu read at byte 26 would be "
                     "%llu bytes", (unsigned long long)D, (unsigned long long)(MEGATRON_HEADER + 12 * N + 8 * D));
        else
            snprintf(meg, sizeof meg, ", and byte 26 holds no plausible Megatron document-index length (%llu)",
                     (unsigned long long)D);
    }
    return moe_data_fail(MOE_ERR_INVALID_ARG,
                         "'%s' has %llu bytes, which fits neither layout for its %llu items: a fairseq index would be "
                         "exactly %llu bytes (the file has %llu more)%s. fairseq ignores trailing bytes, but this "
                         "reader needs the exact size to tell the fairseq and Megatron layouts apart: if it is a "
                         "fairseq index with junk appended, truncate it to %llu bytes; else re-run preprocessing",
                         p, (unsigned long long)F, (unsigned long long)N, (unsigned long long)want,
                         (unsigned long long)(F - want), meg, (unsigned long long)want);
}

/* Sizes, pointers and the document index; fills the arrays when asked. */
static moe_status check_index(moe_idx *ds, int arrays)
{
    const uint8_t *m = ds->idx_map;
    const char *p = ds->idx_path;
    int64_t N = ds->n;
    const uint8_t *sz = m + ds->sizes_at, *ptr = sz + 4 * (size_t)N;
    if (arrays) {
        ds->sizes = malloc(((size_t)N + 1) * sizeof *ds->sizes);
        ds->offsets = malloc(((size_t)N + 1) * sizeof *ds->offsets);
        if (!ds->sizes || !ds->offsets)
            return nomem("for the item sizes of an indexed dataset");
    }
    uint64_t expect = 0;
    int64_t tok = 0;
    for (int64_t i = 0; i < N; i++) {
        int32_t s = rd_i32(sz + 4 * i);
        int64_t ptr_i = rd_i64(ptr + 8 * i);
        if (s < 0)
            return moe_data_fail(MOE_ERR_INVALID_ARG, "'%s': item %lld has negative size %d; the index is damaged", p,
                                 (long long)i, (int)s);
        if ((uint64_t)ptr_i != expect)
            return moe_data_fail(MOE_ERR_INVALID_ARG,
                                 "'%s': item %lld's byte pointer is %lld, expected %llu (the previous pointer plus "
                                 "%d bytes per token times the previous size): the pointers are inconsistent with the "
                                 "sizes; the index is damaged",
                                 p, (long long)i, (long long)ptr_i, (unsigned long long)expect, ds->itemsize);
        if (arrays) {
            ds->sizes[i] = s;
            ds->offsets[i] = tok;
        }
        expect += (uint64_t)s * (uint64_t)ds->itemsize;
        tok += s;
    }
    if (arrays)
        ds->offsets[N] = tok;
    ds->n_tokens = tok;
    if (ds->layout == MOE_IDX_FAIRSEQ)
        return MOE_OK;
    const uint8_t *dp = ptr + 8 * (size_t)N;
    int64_t D = ds->n_docs;
    if (D < 1)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s': Megatron index with an empty document index; expected at least the entry 0 (and "
                             "a last entry equal to the sequence count %lld)",
                             p, (long long)N);
    int64_t prev = 0;
    for (int64_t k = 0; k < D; k++) {
        int64_t d = rd_i64(dp + 8 * k);
        if ((k == 0 && d != 0) || d < prev || d > N)
            return moe_data_fail(MOE_ERR_INVALID_ARG,
                                 "'%s': Megatron document index entry %lld is %lld; expected entries that start at 0 "
                                 "and never decrease up to the sequence count %lld: the index is damaged",
                                 p, (long long)k, (long long)d, (long long)N);
        prev = d;
    }
    if (prev != N)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s': Megatron document index ends at %lld, expected the sequence count %lld (Megatron "
                             "asserts document_indices[-1] == sequence count): the index is damaged",
                             p, (long long)prev, (long long)N);
    if (arrays) {
        ds->docs = malloc((size_t)D * sizeof *ds->docs);
        if (!ds->docs)
            return nomem("for a Megatron document index");
        for (int64_t k = 0; k < D; k++)
            ds->docs[k] = rd_i64(dp + 8 * k);
    }
    if (ds->layout == MOE_IDX_MEGATRON_MULTIMODAL)
        ds->modes = (const int8_t *)(dp + 8 * (size_t)D);
    return MOE_OK;
}

static moe_status check_bin(moe_idx *ds)
{
    uint64_t want = (uint64_t)ds->n_tokens * (uint64_t)ds->itemsize;
    uint64_t have = ds->bin_len;
    if (have == want)
        return MOE_OK;
    if (have < want) {
        /* the first item the .bin does not hold */
        const uint8_t *sz = ds->idx_map + ds->sizes_at;
        int64_t i = 0;
        uint64_t at = 0;
        for (; i < ds->n; i++) {
            uint64_t end = at + (uint64_t)rd_i32(sz + 4 * i) * (uint64_t)ds->itemsize;
            if (end > have)
                break;
            at = end;
        }
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s' is truncated: %llu bytes, but '%s' describes %lld items of %lld %s tokens "
                             "(%llu bytes); item %lld (bytes from %llu) points past the end of the data: re-run "
                             "preprocessing or restore the file",
                             ds->bin_path, (unsigned long long)have, ds->idx_path, (long long)ds->n,
                             (long long)ds->n_tokens, moe_idx_dtype_name(ds->dtype), (unsigned long long)want,
                             (long long)i, (unsigned long long)at);
    }
    return moe_data_fail(MOE_ERR_INVALID_ARG,
                         "'%s' has %llu bytes, but '%s' describes %lld items of %lld %s tokens (%llu bytes): %llu "
                         "bytes are not covered by the index; the .bin and .idx do not belong together",
                         ds->bin_path, (unsigned long long)have, ds->idx_path, (long long)ds->n,
                         (long long)ds->n_tokens, moe_idx_dtype_name(ds->dtype), (unsigned long long)want,
                         (unsigned long long)(have - want));
}

static moe_status idx_open(const char *prefix, int arrays, moe_idx **out)
{
    *out = NULL;
    if (!host_is_little_endian())
        return refuse_big_endian(prefix);
    moe_idx *ds = calloc(1, sizeof *ds);
    if (!ds)
        return nomem("opening an indexed dataset");
    ds->idx_path = path_with(prefix, ".idx");
    ds->bin_path = path_with(prefix, ".bin");
    moe_status st = MOE_OK;
    if (!ds->idx_path || !ds->bin_path) {
        st = nomem("opening an indexed dataset");
        goto fail;
    }
    MOE_TRY_GOTO(st, map_file(ds->idx_path, "index (.idx)", prefix, &ds->idx_map, &ds->idx_len), fail);
    if (ds->idx_len == 0) {
        st = moe_data_fail(MOE_ERR_INVALID_ARG, "'%s' is empty (0 bytes); expected an mmap dataset index: re-run "
                           "preprocessing", ds->idx_path);
        goto fail;
    }
    MOE_TRY_GOTO(st, check_header(ds), fail);
    ds->dtype = ds->idx_map[17];
    ds->itemsize = moe_idx_dtype_size(ds->dtype);
    MOE_TRY_GOTO(st, detect_layout(ds), fail);
    MOE_TRY_GOTO(st, check_index(ds, arrays), fail);
    MOE_TRY_GOTO(st, map_file(ds->bin_path, "data (.bin)", prefix, &ds->bin_map, &ds->bin_len), fail);
    MOE_TRY_GOTO(st, check_bin(ds), fail);
    *out = ds;
    return MOE_OK;
fail:
    moe_idx_close(ds);
    return st;
}

moe_status moe_idx_open(const char *prefix, moe_idx **out) { return idx_open(prefix, 1, out); }

int64_t moe_idx_count(const moe_idx *ds) { return ds->n; }
const int64_t *moe_idx_sizes(const moe_idx *ds) { return ds->sizes; }
const int64_t *moe_idx_offsets(const moe_idx *ds) { return ds->offsets; }
int64_t moe_idx_num_tokens(const moe_idx *ds) { return ds->n_tokens; }
moe_idx_layout moe_idx_layout_of(const moe_idx *ds) { return ds->layout; }
int moe_idx_dtype_code(const moe_idx *ds) { return ds->dtype; }
const char *moe_idx_bin_path(const moe_idx *ds) { return ds->bin_path; }
const char *moe_idx_idx_path(const moe_idx *ds) { return ds->idx_path; }
const int8_t *moe_idx_modes(const moe_idx *ds) { return ds->modes; }

const int64_t *moe_idx_doc_index(const moe_idx *ds, int64_t *n)
{
    if (n)
        *n = ds->docs ? ds->n_docs : 0;
    return ds->docs;
}

int64_t moe_idx_item_of(const moe_idx *ds, int64_t pos)
{
    if (pos < 0 || pos >= ds->n_tokens)
        return -1;
    /* the last item starting at or before pos: it holds pos, since any later
     * item starting at the same offset would be empty */
    int64_t lo = 0, hi = ds->n - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (ds->offsets[mid] <= pos)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static moe_status bad_id(const moe_idx *ds, int64_t pos, int neg, unsigned long long mag, int64_t vocab)
{
    int64_t item = moe_idx_item_of(ds, pos);
    char val[32];
    snprintf(val, sizeof val, "%s%llu", neg ? "-" : "", mag);
    if (vocab > 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s': token %lld of item %lld (flat position %lld) is %s, outside the dictionary of "
                             "%lld entries (ids 0..%lld): the data was binarized with another dictionary or the file "
                             "is corrupt; re-run preprocessing with this dictionary",
                             ds->bin_path, (long long)(pos - ds->offsets[item]), (long long)item, (long long)pos, val,
                             (long long)vocab, (long long)(vocab - 1));
    return moe_data_fail(MOE_ERR_INVALID_ARG,
                         "'%s': token %lld of item %lld (flat position %lld) is %s, which does not fit a 32-bit token "
                         "id: the file is corrupt or not token data",
                         ds->bin_path, (long long)(pos - ds->offsets[item]), (long long)item, (long long)pos, val);
}

/* Unsigned element types: every id below `lim`. */
#define READ_UNSIGNED(T)                                                            \
    do {                                                                            \
        uint64_t lim = vocab > 0 ? (uint64_t)vocab : (uint64_t)INT32_MAX + 1;       \
        for (int64_t i = 0; i < n; i++) {                                           \
            T v;                                                                    \
            memcpy(&v, src + i * (int64_t)sizeof v, sizeof v);                      \
            if ((uint64_t)v >= lim)                                                 \
                return bad_id(ds, start + i, 0, (unsigned long long)v, vocab);      \
            out[i] = (int32_t)v;                                                    \
        }                                                                           \
    } while (0)

/* Signed element types: in [0, vocab), or any int32 without a vocabulary. */
#define READ_SIGNED(T)                                                              \
    do {                                                                            \
        int64_t lo = vocab > 0 ? 0 : INT32_MIN;                                     \
        int64_t hi = vocab > 0 ? vocab - 1 : INT32_MAX;                             \
        for (int64_t i = 0; i < n; i++) {                                           \
            T v;                                                                    \
            memcpy(&v, src + i * (int64_t)sizeof v, sizeof v);                      \
            if ((int64_t)v < lo || (int64_t)v > hi)                                 \
                return bad_id(ds, start + i, v < 0,                                 \
                              v < 0 ? 0ull - (unsigned long long)(int64_t)v         \
                                    : (unsigned long long)v, vocab);                \
            out[i] = (int32_t)v;                                                    \
        }                                                                           \
    } while (0)

moe_status moe_idx_read(const moe_idx *ds, int64_t start, int64_t n, int64_t vocab, int32_t *out)
{
    if (start < 0 || n < 0 || start > ds->n_tokens || n > ds->n_tokens - start)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s': read of tokens [%lld, %lld) outside the dataset's %lld tokens", ds->bin_path,
                             (long long)start, (long long)(start + n), (long long)ds->n_tokens);
    if (n == 0)
        return MOE_OK;
    const uint8_t *src = ds->bin_map + start * ds->itemsize;
    switch (ds->dtype) {
    case 1: READ_UNSIGNED(uint8_t); break;
    case 8: READ_UNSIGNED(uint16_t); break;
    case 9: READ_UNSIGNED(uint32_t); break;
    case 10: READ_UNSIGNED(uint64_t); break;
    case 2: READ_SIGNED(int8_t); break;
    case 3: READ_SIGNED(int16_t); break;
    case 4: READ_SIGNED(int32_t); break;
    case 5: READ_SIGNED(int64_t); break;
    default:
        return moe_data_fail(MOE_ERR_INTERNAL, "'%s': dtype code %d passed the open checks", ds->bin_path, ds->dtype);
    }
    return MOE_OK;
}

/* ------------------------------------------------------------ builder */

/* A buffered sequential writer over a raw descriptor. */
typedef struct wbuf {
    int fd;
    size_t len;
    uint8_t data[1 << 16];
} wbuf;

static int write_all(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t k = write(fd, b, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

static int wbuf_flush(wbuf *w)
{
    if (w->len > 0 && write_all(w->fd, w->data, w->len) != 0)
        return -1;
    w->len = 0;
    return 0;
}

/* Room for at least `want` (<= sizeof data) bytes at data + len. */
static int wbuf_reserve(wbuf *w, size_t want)
{
    return sizeof w->data - w->len >= want ? 0 : wbuf_flush(w);
}

static int wbuf_put(wbuf *w, const void *p, size_t n)
{
    if (n >= sizeof w->data) {
        if (wbuf_flush(w) != 0)
            return -1;
        return write_all(w->fd, p, n);
    }
    if (wbuf_reserve(w, n) != 0)
        return -1;
    memcpy(w->data + w->len, p, n);
    w->len += n;
    return 0;
}

struct moe_idx_builder {
    char *bin_path, *idx_path, *bin_tmp, *idx_tmp;
    int dtype, itemsize;
    int64_t count;
    uint64_t bin_bytes;
    int broken; /* a write failed: finish refuses */
    wbuf bin, idx;
};

static atomic_int tmp_serial;

/* <path>.tmp.<pid>.<k>, created exclusively */
static int open_tmp(const char *path, char **tmp_out)
{
    size_t cap = strlen(path) + 64;
    char *tmp = malloc(cap);
    if (!tmp) {
        errno = ENOMEM;
        return -1;
    }
    for (int tries = 0; tries < 1000; tries++) {
        snprintf(tmp, cap, "%s.tmp.%ld.%d", path, (long)getpid(), atomic_fetch_add(&tmp_serial, 1));
        int fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) {
            *tmp_out = tmp;
            return fd;
        }
        if (errno != EEXIST)
            break;
    }
    int e = errno;
    free(tmp);
    errno = e;
    return -1;
}

static void builder_free(moe_idx_builder *b, int remove_tmp)
{
    if (b->bin.fd >= 0)
        close(b->bin.fd);
    if (b->idx.fd >= 0)
        close(b->idx.fd);
    if (remove_tmp) {
        if (b->bin_tmp)
            unlink(b->bin_tmp);
        if (b->idx_tmp)
            unlink(b->idx_tmp);
    }
    free(b->bin_path);
    free(b->idx_path);
    free(b->bin_tmp);
    free(b->idx_tmp);
    free(b);
}

void moe_idx_builder_abort(moe_idx_builder *b)
{
    if (b)
        builder_free(b, 1);
}

static moe_status io_fail(moe_idx_builder *b, const char *doing, const char *path)
{
    int e = errno;
    b->broken = 1;
    return moe_data_fail(MOE_ERR_IO, "%s '%s': %s", doing, path, strerror(e));
}

moe_status moe_idx_builder_open(const char *prefix, int dtype_code, moe_idx_builder **out)
{
    *out = NULL;
    if (!host_is_little_endian())
        return refuse_big_endian(prefix);
    MOE_TRY(check_write_dtype("indexed dataset", prefix, dtype_code, 0));
    moe_idx_builder *b = calloc(1, sizeof *b);
    if (!b)
        return nomem("for an indexed dataset builder");
    b->bin.fd = b->idx.fd = -1;
    b->dtype = dtype_code;
    b->itemsize = moe_idx_dtype_size(dtype_code);
    b->bin_path = path_with(prefix, ".bin");
    b->idx_path = path_with(prefix, ".idx");
    if (!b->bin_path || !b->idx_path) {
        builder_free(b, 1);
        return nomem("for an indexed dataset builder");
    }
    b->bin.fd = open_tmp(b->bin_path, &b->bin_tmp);
    if (b->bin.fd < 0) {
        int e = errno;
        moe_status st = moe_data_fail(MOE_ERR_IO, "cannot create a temporary file beside '%s': %s", b->bin_path,
                                      strerror(e));
        builder_free(b, 1);
        return st;
    }
    b->idx.fd = open_tmp(b->idx_path, &b->idx_tmp);
    if (b->idx.fd < 0) {
        int e = errno;
        moe_status st = moe_data_fail(MOE_ERR_IO, "cannot create a temporary file beside '%s': %s", b->idx_path,
                                      strerror(e));
        builder_free(b, 1);
        return st;
    }
    /* the header; the count at byte 18 is patched by finish */
    uint8_t head[FAIRSEQ_HEADER] = {0};
    const uint64_t version = 1;
    memcpy(head, MAGIC, MAGIC_LEN);
    memcpy(head + 9, &version, 8);
    head[17] = (uint8_t)dtype_code;
    if (wbuf_put(&b->idx, head, sizeof head) != 0) {
        moe_status st = io_fail(b, "cannot write", b->idx_tmp);
        builder_free(b, 1);
        return st;
    }
    *out = b;
    return MOE_OK;
}

int64_t moe_idx_builder_count(const moe_idx_builder *b) { return b->count; }

static moe_status put_size(moe_idx_builder *b, int32_t size)
{
    if (wbuf_put(&b->idx, &size, sizeof size) != 0)
        return io_fail(b, "cannot write", b->idx_tmp);
    b->count++;
    return MOE_OK;
}

moe_status moe_idx_builder_add(moe_idx_builder *b, const int32_t *ids, int64_t n)
{
    if (b->broken)
        return moe_data_fail(MOE_ERR_IO, "'%s': an earlier write failed; abort this builder", b->bin_tmp);
    if (n < 0 || n > INT32_MAX)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s': item %lld has %lld ids; an item holds 0 to 2147483647 (its size is an int32 "
                             "in the index)",
                             b->bin_path, (long long)b->count, (long long)n);
    int64_t bad = first_unfit(b->dtype, ids, n);
    if (bad >= 0) {
        int64_t lo, hi;
        dtype_range(b->dtype, &lo, &hi);
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "'%s': id %d at position %lld of item %lld does not fit the dataset's dtype %s "
                             "(%lld..%lld); choose the dtype from the dictionary size (moe_idx_best_dtype)",
                             b->bin_path, (int)ids[bad], (long long)bad, (long long)b->count,
                             moe_idx_dtype_name(b->dtype), (long long)lo, (long long)hi);
    }
    const int64_t chunk = (int64_t)sizeof b->bin.data / 8;
    for (int64_t at = 0; at < n; at += chunk) {
        int64_t k = n - at < chunk ? n - at : chunk;
        size_t bytes = (size_t)k * (size_t)b->itemsize;
        if (wbuf_reserve(&b->bin, bytes) != 0)
            return io_fail(b, "cannot write", b->bin_tmp);
        encode_ids(b->dtype, ids + at, k, b->bin.data + b->bin.len);
        b->bin.len += bytes;
    }
    b->bin_bytes += (uint64_t)n * (uint64_t)b->itemsize;
    return put_size(b, (int32_t)n);
}

moe_status moe_idx_builder_append(moe_idx_builder *b, const char *other_prefix)
{
    if (b->broken)
        return moe_data_fail(MOE_ERR_IO, "'%s': an earlier write failed; abort this builder", b->bin_tmp);
    moe_idx *o;
    MOE_TRY(idx_open(other_prefix, 0, &o));
    moe_status st = MOE_OK;
    if (o->layout != MOE_IDX_FAIRSEQ) {
        st = moe_data_fail(MOE_ERR_UNSUPPORTED,
                           "cannot append '%s': it is a Megatron-layout index; fairseq's merge reads only the fairseq "
                           "layout (convert it first)",
                           o->idx_path);
        goto done;
    }
    if (o->dtype != b->dtype) {
        st = moe_data_fail(MOE_ERR_INVALID_ARG,
                           "cannot append '%s': its dtype is %s, this dataset's is %s (fairseq's merge_file_ asserts "
                           "equal dtypes); binarize both with the same dictionary",
                           o->idx_path, moe_idx_dtype_name(o->dtype), moe_idx_dtype_name(b->dtype));
        goto done;
    }
    if (o->n > INT64_MAX - b->count) {
        st = moe_data_fail(MOE_ERR_INVALID_ARG, "cannot append '%s': too many items", o->idx_path);
        goto done;
    }
    /* the int32 sizes as they are, then the raw data bytes */
    if (wbuf_put(&b->idx, o->idx_map + o->sizes_at, 4 * (size_t)o->n) != 0) {
        st = io_fail(b, "cannot write", b->idx_tmp);
        goto done;
    }
    b->count += o->n;
    if (o->bin_len > 0 && wbuf_put(&b->bin, o->bin_map, o->bin_len) != 0) {
        st = io_fail(b, "cannot write", b->bin_tmp);
        goto done;
    }
    b->bin_bytes += o->bin_len;
done:
    moe_idx_close(o);
    return st;
}

/* The pointers from the sizes already in the temporary .idx. */
static moe_status write_pointers(moe_idx_builder *b)
{
    enum { CHUNK = 8192 };
    int32_t sizes[CHUNK];
    uint64_t addr = 0;
    for (int64_t at = 0; at < b->count; at += CHUNK) {
        int64_t k = b->count - at < CHUNK ? b->count - at : CHUNK;
        if (k <= 0) /* cannot happen (at < count); says so to the compiler's range analysis */
            break;
        const size_t want = (size_t)k * 4;
        const ssize_t r = moe_data_pread(b->idx.fd, sizes, want, FAIRSEQ_HEADER + 4 * at);
        if (r != (ssize_t)want) {
            if (r >= 0)
                errno = EIO;
            return io_fail(b, "cannot read back", b->idx_tmp);
        }
        for (int64_t i = 0; i < k; i++) {
            int64_t p = (int64_t)addr;
            if (wbuf_put(&b->idx, &p, 8) != 0)
                return io_fail(b, "cannot write", b->idx_tmp);
            addr += (uint64_t)sizes[i] * (uint64_t)b->itemsize;
        }
    }
    if (addr != b->bin_bytes)
        return moe_data_fail(MOE_ERR_INTERNAL, "'%s': the sizes add up to %llu bytes but %llu were written",
                             b->idx_tmp, (unsigned long long)addr, (unsigned long long)b->bin_bytes);
    return MOE_OK;
}

moe_status moe_idx_builder_finish(moe_idx_builder *b)
{
    moe_status st = MOE_OK;
    if (b->broken) {
        st = moe_data_fail(MOE_ERR_IO, "'%s': an earlier write failed; nothing was written", b->bin_path);
        goto fail;
    }
    if (wbuf_flush(&b->bin) != 0 || fsync(b->bin.fd) != 0) {
        st = io_fail(b, "cannot write", b->bin_tmp);
        goto fail;
    }
    if (wbuf_flush(&b->idx) != 0) {
        st = io_fail(b, "cannot write", b->idx_tmp);
        goto fail;
    }
    MOE_TRY_GOTO(st, write_pointers(b), fail);
    uint64_t count = (uint64_t)b->count;
    if (wbuf_flush(&b->idx) != 0 || pwrite(b->idx.fd, &count, 8, 18) != 8 || fsync(b->idx.fd) != 0) {
        st = io_fail(b, "cannot write", b->idx_tmp);
        goto fail;
    }
    if (close(b->bin.fd) != 0) {
        b->bin.fd = -1;
        st = io_fail(b, "cannot close", b->bin_tmp);
        goto fail;
    }
    b->bin.fd = -1;
    if (close(b->idx.fd) != 0) {
        b->idx.fd = -1;
        st = io_fail(b, "cannot close", b->idx_tmp);
        goto fail;
    }
    b->idx.fd = -1;
    if (rename(b->bin_tmp, b->bin_path) != 0) {
        st = io_fail(b, "cannot rename the finished data to", b->bin_path);
        goto fail;
    }
    if (rename(b->idx_tmp, b->idx_path) != 0) {
        st = io_fail(b, "cannot rename the finished index to", b->idx_path);
        goto fail;
    }
    builder_free(b, 0);
    return MOE_OK;
fail:
    builder_free(b, 1);
    return st;
}

/* ------------------------------------------------------------ Megatron writer */

static moe_status write_megatron(const char *prefix, int code, const int32_t *items, const int64_t *sizes, int64_t n,
                                 const int64_t *doc_index, int64_t D, const int8_t *modes)
{
    if (!host_is_little_endian())
        return refuse_big_endian(prefix);
    MOE_TRY(check_write_dtype("Megatron dataset", prefix, code, 1));
    if (n < 0 || D < 1 || doc_index[0] != 0 || doc_index[D - 1] != n)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "Megatron dataset '%s': the document index must start at 0 and end at the item count "
                             "%lld (got %lld entries)",
                             prefix, (long long)n, (long long)D);
    for (int64_t k = 1; k < D; k++)
        if (doc_index[k] < doc_index[k - 1])
            return moe_data_fail(MOE_ERR_INVALID_ARG, "Megatron dataset '%s': document index entry %lld decreases",
                                 prefix, (long long)k);
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (sizes[i] < 0 || sizes[i] > INT32_MAX)
            return moe_data_fail(MOE_ERR_INVALID_ARG, "Megatron dataset '%s': item %lld has size %lld", prefix,
                                 (long long)i, (long long)sizes[i]);
        total += sizes[i];
    }
    int64_t bad = first_unfit(code, items, total);
    if (bad >= 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "Megatron dataset '%s': id %d (token %lld) does not fit dtype %s",
                             prefix, (int)items[bad], (long long)bad, moe_idx_dtype_name(code));
    int itemsize = moe_idx_dtype_size(code);
    size_t idx_len = MEGATRON_HEADER + 12 * (size_t)n + 8 * (size_t)D + (modes ? (size_t)n : 0);
    size_t bin_len = (size_t)total * (size_t)itemsize;
    uint8_t *idx = calloc(1, idx_len), *bin = malloc(bin_len ? bin_len : 1);
    char *idx_path = path_with(prefix, ".idx"), *bin_path = path_with(prefix, ".bin");
    moe_status st = MOE_OK;
    if (!idx || !bin || !idx_path || !bin_path) {
        st = nomem("writing a Megatron dataset");
        goto done;
    }
    const uint64_t version = 1, count = (uint64_t)n, docs = (uint64_t)D;
    memcpy(idx, MAGIC, MAGIC_LEN);
    memcpy(idx + 9, &version, 8);
    idx[17] = (uint8_t)code;
    memcpy(idx + 18, &count, 8);
    memcpy(idx + 26, &docs, 8);
    uint8_t *p = idx + MEGATRON_HEADER;
    int64_t addr = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t s = (int32_t)sizes[i];
        memcpy(p + 4 * i, &s, 4);
        memcpy(p + 4 * (size_t)n + 8 * i, &addr, 8);
        addr += sizes[i] * itemsize;
    }
    memcpy(p + 12 * (size_t)n, doc_index, 8 * (size_t)D);
    if (modes)
        memcpy(p + 12 * (size_t)n + 8 * (size_t)D, modes, (size_t)n);
    encode_ids(code, items, total, bin);
    const char *paths[2] = {bin_path, idx_path};
    const uint8_t *bufs[2] = {bin, idx};
    size_t lens[2] = {bin_len, idx_len};
    for (int f = 0; f < 2; f++) {
        FILE *fp = fopen(paths[f], "wb");
        int ok = fp && fwrite(bufs[f], 1, lens[f], fp) == lens[f];
        if (fp && fclose(fp) != 0)
            ok = 0;
        if (!ok) {
            st = moe_data_fail(MOE_ERR_IO, "cannot write '%s': %s", paths[f], strerror(errno));
            goto done;
        }
    }
done:
    free(idx);
    free(bin);
    free(idx_path);
    free(bin_path);
    return st;
}

moe_status moe_idx_write_megatron(const char *prefix, int dtype_code, const int32_t *items, const int64_t *sizes,
                                  int64_t n, const int64_t *doc_index, int64_t D)
{
    return write_megatron(prefix, dtype_code, items, sizes, n, doc_index, D, NULL);
}

moe_status moe_idx_write_megatron_multimodal(const char *prefix, int dtype_code, const int32_t *items,
                                             const int64_t *sizes, int64_t n, const int64_t *doc_index, int64_t D,
                                             const int8_t *modes)
{
    if (!modes)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "Megatron multimodal dataset '%s': no sequence modes given", prefix);
    return write_megatron(prefix, dtype_code, items, sizes, n, doc_index, D, modes);
}
