/* language_modeling.c: fairseq's `language_modeling` task over real data
 * (DATA_SPEC.md §3): a data directory written by moelm-preprocess or
 * fairseq-preprocess (dict.txt, <split>.idx/.bin in fairseq's mmap format or
 * Megatron's), cut into token blocks (--sample-break-mode,
 * --tokens-per-sample), ordered by size with a seeded tie-break, batched by
 * --max-tokens / --batch-size, shuffled per epoch and sharded over the ranks
 * as fairseq's EpochBatchIterator does.
 *
 * What it is: the data path from files to host batches, for training,
 * validation and evaluation. What it is not: the formats, blocks and batching
 * themselves (data/indexed, data/blocks, data/batching, shared with the
 * tools), nor any prefetching thread (assembling a batch from the memory-
 * mapped files costs microseconds next to a training step).
 *
 * Conventions a reader would trip over:
 *  - DATA may list several directories separated by ':'; epoch e reads its
 *    train split from directory (e-1) % n, so each epoch reloads and
 *    rebatches; validation always reads the first directory, and the
 *    dictionary is the first directory's dict.txt (fairseq's shard rotation).
 *    With one directory the train batches are built once and only their order
 *    changes from epoch to epoch.
 *  - The trainer's "train" split is --train-subset (default train), read as
 *    train, train1, train2, ... concatenated (fairseq's combine); a
 *    validation subset is exactly the split named.
 *  - A dataset of tokenizer ids, as Megatron's preprocess_data.py writes it,
 *    has no dict.txt: --vocab-size N says the ids are 0..N-1; padding is then
 *    id N, the end-of-document id (--eod-id, default N-1) is what starts a
 *    block's input at a document boundary, and the model's vocabulary is N+1
 *    rounded up to a multiple of 8. With a dict.txt (fairseq's data, or a
 *    Megatron file binarized through a fairseq dictionary) the specials are
 *    fairseq's: <s> 0, <pad> 1, </s> 2, <unk> 3.
 *  - Order and batches follow fairseq v0.12 and its moe branch, which moelm
 *    reproduces: ordered indices are seeded with --seed (not seed + epoch as in
 *    fairseq's later main branch) and the last batch of a split is kept
 *    whatever its size (main drops one that is not a multiple of
 *    --required-batch-size-multiple).
 *  - With --context-window C (moelm-eval-lm's), blocks hold tokens_per_sample
 *    - C tokens and evaluation splits keep their index order, so the tool can
 *    hand every block the C tokens before it (fairseq's eval_lm).
 *  - Token ids are checked against the dictionary as each batch is read from
 *    the memory-mapped file (so opening a large dataset reads nothing up front,
 *    and a corrupt file is refused with its name and the offending position
 *    before any number reaches a device).
 *  - On several ranks every rank of a step pads its batch to the largest rows
 *    and row length among the step's batches (every rank knows the whole batch
 *    list), so MoE layers see the same token count, hence the same expert
 *    capacity, on every rank of an all-to-all; a rank past the end of an epoch's
 *    batches gets a batch of padding with no tokens (fairseq's empty batch).
 *    fairseq pads inside the MoE layer and keeps those rows out of routing;
 *    here they are routed like other padding unless --use-moe-pad-mask.
 */
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/batching.h"
#include "data/blocks.h"
#include "data/dictionary.h"
#include "data/error.h"
#include "data/indexed.h"
#include "moe/plugin.h"

#define LM "language_modeling"
#define MAX_PATHS 256
#define MAX_SPLITS 16

static const moe_option lm_options[] = {
    {"tokens-per-sample", MOE_OPT_INT, "1024", "max number of tokens per sample for LM dataset", 1, 16777216.0,
     NULL},
    {"sample-break-mode", MOE_OPT_CHOICE, "none",
     "none: fill each sample with tokens-per-sample tokens; complete: split at sentence (line) ends; complete_doc: "
     "like complete but never across documents (empty lines); eos: one sentence per sample",
     0, 0, "none|complete|complete_doc|eos"},
    {"add-bos-token", MOE_OPT_FLAG, NULL, "prepend beginning of sentence token (<s>)", 0, 0, NULL},
    {"output-dictionary-size", MOE_OPT_INT, "-1", "limit the size of output dictionary (-1: the whole dictionary)", 0,
     0, NULL},
    {"dataset-impl", MOE_OPT_CHOICE, NULL, "output dataset implementation (only mmap datasets are read)", 0, 0,
     "raw|lazy|cached|mmap|fasta|huffman"},
    {"ignore-unused-valid-subsets", MOE_OPT_FLAG, NULL,
     "do not complain about valid*N files in DATA that --valid-subset does not list", 0, 0, NULL},
    {"vocab-size", MOE_OPT_INT, NULL,
     "a dataset of tokenizer ids without a dict.txt (as Megatron's preprocess_data.py writes): the ids are 0..N-1 "
     "and padding is id N",
     1, 2147483647.0, NULL},
    {"eod-id", MOE_OPT_INT, NULL,
     "with --vocab-size: the end-of-document id that also starts each block's input (default: N-1, GPT-2's "
     "<|endoftext|>)",
     0, 2147483647.0, NULL},
};

/* one split: its datasets (concatenated), blocks and frozen batches */
typedef struct lm_split {
    char name[64];
    char dir[4096];
    int n_ds;
    moe_idx **ds;
    int64_t *tok_off;        /* (n_ds + 1) flat token offset of each dataset */
    moe_blocks blocks;
    moe_batch_list batches;
    int64_t *rows, *len;     /* per batch: rows, longest row (with bos) */
    int64_t *order;          /* batch order of the current epoch */
    int train;
} lm_split;

typedef struct lm_task {
    const moe_host *h;
    moe_dict *dict;           /* NULL with --vocab-size (tokenizer ids) */
    int64_t vocab, out_vocab;
    int64_t id_bound;         /* data ids must be below it */
    int32_t pad, eos, bos;
    char *paths[MAX_PATHS];
    int n_paths;
    int64_t tps;
    int64_t context;          /* eval-lm's --context-window: blocks of tps - context, evaluation splits in index order */
    moe_break_mode mode;
    int add_bos;
    uint32_t seed;
    int world, rank;
    int64_t mult;
    int64_t max_tokens, max_sentences, max_tokens_valid, max_sentences_valid;
    int skip_invalid_valid;
    int64_t epoch;            /* of the loaded train split; 0 before */
    lm_split *train;
    lm_split *valid[MAX_SPLITS];
    int n_valid;
} lm_task;

/* ------------------------------------------------------------ data errors */

static moe_status fail_data(const lm_task *t, moe_status st)
{
    moe_status r = t->h->error(t->h, st, "%s", moe_data_error());
    moe_data_clear_error();
    return r;
}

#define DATA_TRY(t, expr)                  \
    do {                                   \
        moe_status st_ = (expr);           \
        if (st_ != MOE_OK)                 \
            return fail_data((t), st_);    \
    } while (0)

/* ---------------------------------------------------------- split loading */

static void split_free(lm_split *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_ds; i++)
        moe_idx_close(s->ds[i]);
    free(s->ds);
    free(s->tok_off);
    moe_blocks_free(&s->blocks);
    moe_batch_list_free(&s->batches);
    free(s->rows);
    free(s->len);
    free(s->order);
    free(s);
}

static int file_exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f)
        fclose(f);
    return f != NULL;
}

/* the flat token reader blocks read through: the datasets concatenated,
 * every id checked against the dictionary */
typedef struct read_ctx {
    const lm_split *s;
    int64_t vocab;
} read_ctx;

static moe_status checked_read(void *ctx, int64_t start, int64_t n, int32_t *out)
{
    const read_ctx *c = ctx;
    const lm_split *s = c->s;
    int d = 0;
    while (n > 0) {
        while (d + 1 < s->n_ds && start >= s->tok_off[d + 1])
            d++;
        int64_t take = s->tok_off[d + 1] - start;
        if (take > n)
            take = n;
        if (take <= 0)
            return moe_data_fail(MOE_ERR_INTERNAL, "split %s: read of tokens [%lld, %lld) past its end", s->name,
                                 (long long)start, (long long)(start + n));
        moe_status st = moe_idx_read(s->ds[d], start - s->tok_off[d], take, c->vocab, out);
        if (st != MOE_OK)
            return st;
        out += take;
        start += take;
        n -= take;
    }
    return MOE_OK;
}

/* open <dir>/<name> (and, for train, <dir>/<name>1, <name>2, ... while they exist) */
static moe_status open_datasets(lm_task *t, lm_split *s, const char *dir, const char *name, int combine)
{
    const moe_host *h = t->h;
    int cap = 4;
    s->ds = calloc((size_t)cap, sizeof *s->ds);
    if (!s->ds)
        return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
    for (int k = 0;; k++) {
        char prefix[4400], idx[4500];
        if (k == 0)
            snprintf(prefix, sizeof prefix, "%s/%s", dir, name);
        else
            snprintf(prefix, sizeof prefix, "%s/%s%d", dir, name, k);
        snprintf(idx, sizeof idx, "%s.idx", prefix);
        if (k > 0 && (!combine || !file_exists(idx)))
            break;
        if (k == 0 && !file_exists(idx)) {
            char raw[4500];
            snprintf(raw, sizeof raw, "%s", prefix);
            if (file_exists(raw))
                return h->error(h, MOE_ERR_INVALID_ARG,
                                LM ": %s is a raw text file (fairseq's raw dataset impl); binarize it with "
                                "moelm-preprocess (or fairseq-preprocess --dataset-impl mmap)",
                                raw);
            return h->error(h, MOE_ERR_IO,
                            LM ": split '%s' not found: expected %s and %s.bin in the data directory %s (written "
                            "by moelm-preprocess or fairseq-preprocess)",
                            name, idx, prefix, dir);
        }
        if (s->n_ds == cap) {
            cap *= 2;
            moe_idx **ds = realloc(s->ds, (size_t)cap * sizeof *ds);
            if (!ds)
                return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
            s->ds = ds;
        }
        moe_idx *ds = NULL;
        DATA_TRY(t, moe_idx_open(prefix, &ds));
        s->ds[s->n_ds++] = ds;
        h->log(h, MOE_LOG_INFO, "fairseq.data.data_utils", "loaded %lld examples from: %s",
               (long long)moe_idx_count(ds), prefix);
    }
    return MOE_OK;
}

/* blocks of the concatenated datasets, ordered, filtered and batched */
static moe_status build_split(lm_task *t, lm_split *s)
{
    const moe_host *h = t->h;
    int64_t n_items = 0;
    s->tok_off = calloc((size_t)s->n_ds + 1, sizeof *s->tok_off);
    if (!s->tok_off)
        return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
    for (int d = 0; d < s->n_ds; d++) {
        n_items += moe_idx_count(s->ds[d]);
        s->tok_off[d + 1] = s->tok_off[d] + moe_idx_num_tokens(s->ds[d]);
    }
    if (n_items == 0)
        return h->error(h, MOE_ERR_INVALID_ARG, LM ": split '%s' in %s is empty (no items in %s)", s->name, s->dir,
                        moe_idx_bin_path(s->ds[0]));
    const int64_t *sizes;
    int64_t *cat = NULL;
    if (s->n_ds == 1) {
        sizes = moe_idx_sizes(s->ds[0]);
    } else {
        cat = malloc((size_t)n_items * sizeof *cat);
        if (!cat)
            return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory for %lld item sizes", (long long)n_items);
        int64_t k = 0;
        for (int d = 0; d < s->n_ds; d++) {
            memcpy(cat + k, moe_idx_sizes(s->ds[d]), (size_t)moe_idx_count(s->ds[d]) * sizeof *cat);
            k += moe_idx_count(s->ds[d]);
        }
        sizes = cat;
    }
    moe_status st = moe_blocks_build(sizes, n_items, t->tps, t->mode, 1, &s->blocks);
    free(cat);
    if (st != MOE_OK) {
        h->error(h, st, LM ": split '%s' in %s: %s", s->name, s->dir, moe_data_error());
        moe_data_clear_error();
        return st;
    }
    const int64_t nblocks = s->blocks.n;
    int64_t *indices = NULL;
    if (t->context > 0 && !s->train) { /* LMContextWindowDataset: index order, each block after its predecessor */
        indices = malloc((size_t)(nblocks > 0 ? nblocks : 1) * sizeof *indices);
        if (!indices)
            return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
        for (int64_t i = 0; i < nblocks; i++)
            indices[i] = i;
    } else {
        DATA_TRY(t, moe_order_by_size(s->blocks.size, nblocks, t->seed, 1, &indices));
    }

    /* filter_indices_by_size: the model's max positions (tokens_per_sample),
     * for train also --max-tokens (fairseq's resolve_max_positions) */
    int64_t max_pos = t->tps;
    int64_t mt = s->train ? t->max_tokens : t->max_tokens_valid;
    int64_t ms = s->train ? t->max_sentences : t->max_sentences_valid;
    if (s->train && mt > 0 && mt < max_pos)
        max_pos = mt;
    int64_t dropped[10], n_dropped = 0;
    int64_t kept = moe_filter_by_size(indices, nblocks, s->blocks.size, max_pos, dropped, 10, &n_dropped);
    if (n_dropped > 0) {
        if (!s->train && !t->skip_invalid_valid) {
            moe_status e = h->error(h, MOE_ERR_INVALID_ARG,
                                    "Size of sample #%lld is invalid (=%lld) since max_positions=%lld, skip this "
                                    "example with --skip-invalid-size-inputs-valid-test (split '%s' in %s)",
                                    (long long)dropped[0], (long long)s->blocks.size[dropped[0]], (long long)max_pos,
                                    s->name, s->dir);
            free(indices);
            return e;
        }
        char ids[256];
        int len = snprintf(ids, sizeof ids, "[");
        for (int64_t i = 0; i < n_dropped && i < 10 && len < (int)sizeof ids; i++)
            len += snprintf(ids + len, sizeof ids - (size_t)len, "%s%lld", i ? ", " : "", (long long)dropped[i]);
        if (len < (int)sizeof ids)
            snprintf(ids + len, sizeof ids - (size_t)len, "]");
        char count[32];
        /* {:,} */
        char plain[32];
        snprintf(plain, sizeof plain, "%lld", (long long)n_dropped);
        int pl = (int)strlen(plain), o = 0;
        for (int i = 0; i < pl; i++) {
            if (i > 0 && (pl - i) % 3 == 0)
                count[o++] = ',';
            count[o++] = plain[i];
        }
        count[o] = '\0';
        h->log(h, MOE_LOG_WARNING, "fairseq.data.data_utils",
               "%s samples have invalid sizes and will be skipped, max_positions=%lld, first few sample ids=%s",
               count, (long long)max_pos, ids);
    }
    if (kept == 0) {
        free(indices);
        return h->error(h, MOE_ERR_INVALID_ARG,
                        LM ": split '%s' in %s has no sample of at most %lld tokens (max positions); raise "
                        "--tokens-per-sample%s",
                        s->name, s->dir, (long long)max_pos, s->train && mt > 0 ? " or --max-tokens" : "");
    }
    st = moe_batch_by_size(indices, kept, s->blocks.size, mt, ms, t->mult, 0, &s->batches);
    free(indices);
    if (st != MOE_OK) {
        h->error(h, st, LM ": split '%s' in %s: %s", s->name, s->dir, moe_data_error());
        moe_data_clear_error();
        return st;
    }
    int64_t nb = s->batches.n;
    s->rows = malloc((size_t)nb * sizeof *s->rows);
    s->len = malloc((size_t)nb * sizeof *s->len);
    if (!s->rows || !s->len)
        return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
    for (int64_t b = 0; b < nb; b++) {
        int64_t longest = 0;
        for (int64_t k = s->batches.offsets[b]; k < s->batches.offsets[b + 1]; k++) {
            int64_t blk = s->batches.indices[k];
            int64_t l = s->blocks.end[blk] - s->blocks.start[blk];
            if (l > longest)
                longest = l;
        }
        s->rows[b] = s->batches.offsets[b + 1] - s->batches.offsets[b];
        s->len[b] = longest + t->add_bos;
    }
    return MOE_OK;
}

static moe_status load_split(lm_task *t, const char *dir, const char *name, int train, lm_split **out)
{
    const moe_host *h = t->h;
    *out = NULL;
    if (strlen(name) >= sizeof((lm_split *)0)->name)
        return h->error(h, MOE_ERR_INVALID_ARG, LM ": split name '%s' is too long", name);
    lm_split *s = calloc(1, sizeof *s);
    if (!s)
        return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
    snprintf(s->name, sizeof s->name, "%s", name);
    snprintf(s->dir, sizeof s->dir, "%s", dir);
    s->train = train;
    moe_status st = open_datasets(t, s, dir, name, train);
    if (st == MOE_OK)
        st = build_split(t, s);
    if (st == MOE_OK && !train)
        st = moe_epoch_batch_order(s->batches.n, t->seed, 1, 0, &s->order) == MOE_OK ? MOE_OK
                                                                                     : fail_data(t, MOE_ERR_NOMEM);
    if (st != MOE_OK) {
        split_free(s);
        return st;
    }
    *out = s;
    return MOE_OK;
}

/* the split a name refers to (loading a validation subset on first use) */
static moe_status find_split(lm_task *t, const char *name, lm_split **out)
{
    *out = NULL;
    if (!name)
        return t->h->error(t->h, MOE_ERR_INVALID_ARG, LM ": no split name given");
    if (strcmp(name, "train") == 0) {
        if (!t->train)
            return t->h->error(t->h, MOE_ERR_INTERNAL, LM ": train batches asked for before set_epoch");
        *out = t->train;
        return MOE_OK;
    }
    for (int i = 0; i < t->n_valid; i++)
        if (strcmp(t->valid[i]->name, name) == 0) {
            *out = t->valid[i];
            return MOE_OK;
        }
    if (t->n_valid == MAX_SPLITS)
        return t->h->error(t->h, MOE_ERR_INVALID_ARG, LM ": more than %d evaluation splits", MAX_SPLITS);
    MOE_TRY(load_split(t, t->paths[0], name, 0, &t->valid[t->n_valid]));
    *out = t->valid[t->n_valid++];
    return MOE_OK;
}

/* ------------------------------------------------------------------ ops */

static void lm_destroy(void *task)
{
    lm_task *t = task;
    if (!t)
        return;
    split_free(t->train);
    for (int i = 0; i < t->n_valid; i++)
        split_free(t->valid[i]);
    for (int i = 0; i < t->n_paths; i++)
        free(t->paths[i]);
    moe_dict_destroy(t->dict);
    free(t);
}

/* fairseq's raise_if_valid_subsets_unintentionally_ignored: valid<N> files
 * the run would not read are an error unless asked to ignore them */
static moe_status check_unused_valid(lm_task *t)
{
    const moe_host *h = t->h;
    if (h->opt_flag(h, "disable-validation") || h->opt_flag(h, "ignore-unused-valid-subsets"))
        return MOE_OK;
    const char *list = h->opt_str(h, "valid-subset");
    DIR *d = opendir(t->paths[0]);
    if (!d)
        return MOE_OK;
    struct dirent *e;
    moe_status st = MOE_OK;
    while ((e = readdir(d)) != NULL && st == MOE_OK) {
        const char *n = e->d_name;
        if (strncmp(n, "valid", 5) != 0)
            continue;
        const char *dot = strrchr(n, '.');
        if (!dot || strcmp(dot, ".idx") != 0 || dot == n + 5 || dot[-1] < '0' || dot[-1] > '9')
            continue;
        char split[256];
        snprintf(split, sizeof split, "%.*s", (int)(dot - n), n);
        int listed = 0;
        for (const char *p = list ? list : "valid"; *p;) {
            size_t len = strcspn(p, ",");
            listed |= len == strlen(split) && strncmp(p, split, len) == 0;
            p += len;
            if (*p == ',')
                p++;
        }
        if (!listed)
            st = h->error(h, MOE_ERR_INVALID_ARG,
                          LM ": %s/%s.idx is a validation split that --valid-subset (%s) does not list; add it "
                          "(--valid-subset %s,%s) or pass --ignore-unused-valid-subsets",
                          t->paths[0], split, list ? list : "valid", list ? list : "valid", split);
    }
    closedir(d);
    return st;
}

static moe_status lm_init(const moe_host *h, void **out)
{
    *out = NULL;
    const char *data = h->opt_str(h, "data");
    if (!data || !*data)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        LM " needs DATA, the directory moelm-preprocess or fairseq-preprocess wrote: moelm-train "
                        "--task " LM " <dir> ...");
    const char *impl = h->opt_str(h, "dataset-impl");
    if (impl && strcmp(impl, "mmap") != 0)
        return h->error(h, MOE_ERR_UNSUPPORTED,
                        LM ": --dataset-impl %s is not read; moelm reads mmap datasets (fairseq's and Megatron's): "
                        "re-run fairseq-preprocess with --dataset-impl mmap, or use moelm-preprocess",
                        impl);
    lm_task *t = calloc(1, sizeof *t);
    if (!t)
        return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
    t->h = h;
    moe_status st = MOE_OK;
    for (const char *p = data; *p && st == MOE_OK;) {
        size_t len = strcspn(p, ":");
        if (len == 0 || t->n_paths == MAX_PATHS) {
            st = h->error(h, MOE_ERR_INVALID_ARG,
                          LM ": DATA '%s': expected 1 to %d directories separated by ':', found %s", data, MAX_PATHS,
                          len == 0 ? "an empty one" : "more");
            break;
        }
        t->paths[t->n_paths] = strndup(p, len);
        if (!t->paths[t->n_paths++])
            st = h->error(h, MOE_ERR_NOMEM, LM ": out of host memory");
        p += len;
        if (*p == ':')
            p++;
    }
    if (st != MOE_OK)
        goto fail;
    t->tps = h->opt_int(h, "tokens-per-sample");
    t->context = h->opt_set(h, "context-window") ? h->opt_int(h, "context-window") : 0;
    if (t->context > 0 && t->context >= t->tps) {
        st = h->error(h, MOE_ERR_INVALID_ARG, LM ": --context-window %lld must be smaller than --tokens-per-sample %lld",
                      (long long)t->context, (long long)t->tps);
        goto fail;
    }
    t->tps -= t->context > 0 ? t->context : 0;
    t->add_bos = h->opt_flag(h, "add-bos-token");
    if (moe_break_mode_parse(h->opt_str(h, "sample-break-mode"), &t->mode) != MOE_OK) {
        st = fail_data(t, MOE_ERR_INVALID_ARG);
        goto fail;
    }
    int64_t seed = h->opt_int(h, "seed");
    t->seed = (uint32_t)seed;
    t->world = h->world > 0 ? h->world : 1;
    t->rank = h->rank;
    t->mult = h->opt_int(h, "required-batch-size-multiple");
    t->max_tokens = h->opt_set(h, "max-tokens") ? h->opt_int(h, "max-tokens") : 0;
    t->max_sentences = h->opt_set(h, "batch-size") ? h->opt_int(h, "batch-size") : 0;
    t->max_tokens_valid = h->opt_set(h, "max-tokens-valid") ? h->opt_int(h, "max-tokens-valid") : t->max_tokens;
    t->max_sentences_valid = h->opt_set(h, "batch-size-valid") ? h->opt_int(h, "batch-size-valid") : t->max_sentences;
    t->skip_invalid_valid = h->opt_flag(h, "skip-invalid-size-inputs-valid-test");
    if (t->max_tokens <= 0 && t->max_sentences <= 0) {
        st = h->error(h, MOE_ERR_INVALID_ARG, LM " needs a batch size: give --max-tokens and/or --batch-size");
        goto fail;
    }

    char dict_path[4400];
    snprintf(dict_path, sizeof dict_path, "%s/dict.txt", t->paths[0]);
    if (h->opt_set(h, "vocab-size")) {
        /* tokenizer ids (a Megatron dataset): no dictionary, padding after the
         * last id, the vocabulary padded to a multiple of 8 as fairseq's */
        int64_t n = h->opt_int(h, "vocab-size");
        if (t->add_bos) {
            st = h->error(h, MOE_ERR_INVALID_ARG,
                          LM ": --add-bos-token needs a dict.txt (its <s>); with --vocab-size the ids are the "
                          "tokenizer's");
            goto fail;
        }
        t->id_bound = n;
        t->pad = (int32_t)n;
        t->eos = (int32_t)(h->opt_set(h, "eod-id") ? h->opt_int(h, "eod-id") : n - 1);
        t->bos = t->eos;
        if (t->eos >= n) {
            st = h->error(h, MOE_ERR_INVALID_ARG, LM ": --eod-id %d is not below --vocab-size %lld", (int)t->eos,
                          (long long)n);
            goto fail;
        }
        t->vocab = (n + 1 + 7) / 8 * 8;
        h->log(h, MOE_LOG_INFO, "fairseq.tasks.language_modeling",
               "no dictionary: token ids 0..%lld, end of document %d, padding %d (%lld types)", (long long)n - 1,
               (int)t->eos, (int)t->pad, (long long)t->vocab);
    } else {
        if (!file_exists(dict_path)) {
            st = h->error(h, MOE_ERR_IO,
                          LM ": %s not found: DATA must hold fairseq's dict.txt (moelm-preprocess or "
                          "fairseq-preprocess write it); for a dataset of tokenizer ids (Megatron's) give "
                          "--vocab-size N instead",
                          dict_path);
            goto fail;
        }
        if (moe_dict_load(dict_path, &t->dict) != MOE_OK) {
            st = fail_data(t, MOE_ERR_IO);
            goto fail;
        }
        t->vocab = moe_dict_len(t->dict);
        t->id_bound = t->vocab;
        t->pad = MOE_DICT_PAD;
        t->eos = MOE_DICT_EOS;
        t->bos = MOE_DICT_BOS;
        h->log(h, MOE_LOG_INFO, "fairseq.tasks.language_modeling", "dictionary: %lld types", (long long)t->vocab);
    }
    int64_t ods = h->opt_int(h, "output-dictionary-size");
    if (ods >= 0 && !t->dict) {
        st = h->error(h, MOE_ERR_INVALID_ARG, LM ": --output-dictionary-size needs a dict.txt (its <unk>)");
        goto fail;
    }
    t->out_vocab = ods >= 0 && ods < t->vocab ? ods : t->vocab;
    st = check_unused_valid(t);
    if (st != MOE_OK)
        goto fail;
    *out = t;
    return MOE_OK;
fail:
    lm_destroy(t);
    return st;
}

static int64_t lm_vocab_size(void *task) { return ((lm_task *)task)->vocab; }

static int lm_padding_idx(void *task) { return ((lm_task *)task)->pad; }

static moe_status lm_set_epoch(void *task, int64_t epoch)
{
    lm_task *t = task;
    if (epoch < 1)
        return t->h->error(t->h, MOE_ERR_INTERNAL, LM ": epoch %lld (epochs count from 1)", (long long)epoch);
    const char *dir = t->paths[(epoch - 1) % t->n_paths];
    if (!t->train || (t->n_paths > 1 && strcmp(t->train->dir, dir) != 0)) {
        split_free(t->train);
        t->train = NULL;
        const char *name = t->h->opt_str(t->h, "train-subset");
        MOE_TRY(load_split(t, dir, name && *name ? name : "train", 1, &t->train));
    }
    free(t->train->order);
    t->train->order = NULL;
    if (moe_epoch_batch_order(t->train->batches.n, t->seed, epoch, 1, &t->train->order) != MOE_OK)
        return fail_data(t, MOE_ERR_NOMEM);
    t->epoch = epoch;
    return MOE_OK;
}

static int64_t lm_num_batches(void *task, const char *split)
{
    lm_task *t = task;
    lm_split *s;
    if (find_split(t, split, &s) != MOE_OK)
        return -1;
    return moe_shard_count(s->batches.n, t->world);
}

/* the shape every rank of step i pads to: its own batch alone on one rank */
static void step_shape(const lm_task *t, const lm_split *s, int64_t i, int64_t *rows, int64_t *len)
{
    *rows = 0;
    *len = 0;
    int first = t->world > 1 ? 0 : t->rank, last = t->world > 1 ? t->world : t->rank + 1;
    for (int r = first; r < last; r++) {
        int64_t b = moe_shard_batch(s->order, s->batches.n, t->world, r, i);
        if (b < 0)
            continue;
        if (s->rows[b] > *rows)
            *rows = s->rows[b];
        if (s->len[b] > *len)
            *len = s->len[b];
    }
}

static moe_status lm_get_batch(void *task, const char *split, int64_t index, moe_batch *out)
{
    lm_task *t = task;
    const moe_host *h = t->h;
    memset(out, 0, sizeof *out);
    lm_split *s;
    MOE_TRY(find_split(t, split, &s));
    int64_t per_rank = moe_shard_count(s->batches.n, t->world);
    if (index < 0 || index >= per_rank)
        return h->error(h, MOE_ERR_INVALID_ARG, LM ": batch %lld of split '%s' asked for; it has %lld per rank",
                        (long long)index, split, (long long)per_rank);
    int64_t B, T;
    step_shape(t, s, index, &B, &T);
    int64_t b = moe_shard_batch(s->order, s->batches.n, t->world, t->rank, index);
    int32_t *src = malloc((size_t)(B * T) * sizeof *src), *tgt = malloc((size_t)(B * T) * sizeof *tgt);
    if (!src || !tgt) {
        free(src);
        free(tgt);
        return h->error(h, MOE_ERR_NOMEM, LM ": out of host memory for a %lld x %lld batch", (long long)B,
                        (long long)T);
    }
    for (int64_t k = 0; k < B * T; k++)
        src[k] = tgt[k] = t->pad;
    int64_t ntokens = 0, nsent = 0;
    if (b >= 0) {
        read_ctx rc = {s, t->id_bound};
        for (int64_t r = 0; r < s->rows[b]; r++) {
            int64_t blk = s->batches.indices[s->batches.offsets[b] + r];
            int32_t *rs = src + r * T + t->add_bos, *rt = tgt + r * T + t->add_bos;
            int64_t len = 0;
            moe_status st = moe_blocks_sample(&s->blocks, blk, checked_read, &rc, t->eos, rs, rt, &len);
            if (st != MOE_OK) {
                free(src);
                free(tgt);
                h->error(h, st, LM ": split '%s' in %s: %s", s->name, s->dir, moe_data_error());
                moe_data_clear_error();
                return st;
            }
            if (t->add_bos) {
                src[r * T] = t->bos;
                tgt[r * T] = t->bos;
                len++;
            }
            if (t->out_vocab < t->vocab) /* TruncatedDictionary: targets only */
                for (int64_t k = 0; k < len; k++)
                    if (tgt[r * T + k] >= t->out_vocab)
                        tgt[r * T + k] = MOE_DICT_UNK;
            ntokens += len;
            nsent++;
        }
    }
    out->B = B;
    out->T = T;
    out->src = src;
    out->tgt = tgt;
    out->ntokens = ntokens;
    out->nsentences = nsent;
    return MOE_OK;
}

static void lm_free_batch(void *task, moe_batch *b)
{
    (void)task;
    free(b->src);
    free(b->tgt);
    b->src = b->tgt = NULL;
}

static void bound_split(const lm_split *s, int64_t *max_tokens, int64_t *max_len)
{
    for (int64_t b = 0; b < s->batches.n; b++) {
        if (s->rows[b] * s->len[b] > *max_tokens)
            *max_tokens = s->rows[b] * s->len[b];
        if (s->len[b] > *max_len)
            *max_len = s->len[b];
    }
}

/* the largest batch: over every shard's train split and the validation
 * subsets the run reads (on several ranks a step pads to the largest rows and
 * longest row of its batches, so the bound is their product) */
static moe_status lm_max_batch(void *task, int64_t *max_tokens, int64_t *max_len)
{
    lm_task *t = task;
    const moe_host *h = t->h;
    int64_t rows = 0, len = 0, tokens = 0;
    int64_t epoch = t->epoch > 0 ? t->epoch : 1;
    for (int p = 0; p < t->n_paths; p++) {
        if (t->n_paths > 1 || !t->train)
            MOE_TRY(lm_set_epoch(t, p + 1));
        bound_split(t->train, &tokens, &len);
        for (int64_t b = 0; b < t->train->batches.n; b++)
            if (t->train->rows[b] > rows)
                rows = t->train->rows[b];
    }
    if (t->n_paths > 1)
        MOE_TRY(lm_set_epoch(t, epoch));
    if (!h->opt_flag(h, "disable-validation")) {
        const char *list = h->opt_str(h, "valid-subset");
        for (const char *p = list ? list : "valid"; *p;) {
            size_t n = strcspn(p, ",");
            char name[64];
            snprintf(name, sizeof name, "%.*s", (int)n, p);
            lm_split *s;
            MOE_TRY(find_split(t, name, &s));
            bound_split(s, &tokens, &len);
            for (int64_t b = 0; b < s->batches.n; b++)
                if (s->rows[b] > rows)
                    rows = s->rows[b];
            p += n;
            if (*p == ',')
                p++;
        }
    }
    *max_len = len;
    *max_tokens = t->world > 1 ? rows * len : tokens;
    return MOE_OK;
}

static const moe_task_ops lm_ops = {
    lm_init,       lm_destroy,    lm_vocab_size, lm_padding_idx, lm_num_batches,
    lm_get_batch,  lm_free_batch, lm_set_epoch,  lm_max_batch,
};

MOE_PLUGIN_DEFINE(MOE_KIND_TASK, moe_task_ops, LM, "1.0",
                  "language modeling on binarized text (fairseq-preprocess / Megatron mmap datasets)", lm_options,
                  (int)(sizeof lm_options / sizeof lm_options[0]), NULL, NULL, &lm_ops)
