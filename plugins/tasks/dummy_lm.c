/* dummy_lm.c: the `dummy_lm` task, fairseq's benchmark DummyLMTask
 * (FAIRSEQ_SPEC.md §4): synthetic language-model data with one fixed batch.
 *
 * Dictionary: the 4 specials (<s>=0, <pad>=1, </s>=2, <unk>=3), then
 * --dict-size words, padded to a multiple of 8: V = 50000 for 49996 words.
 * Batch: seq = [0..T] + pad + 1 = [2..T+2]; every row has src = [2..T+1] and
 * tgt = [3..T+2]; no padding, so ntokens = B*T. B is --batch-size, or
 * max(1, --max-tokens // T) without one. As in fairseq, every split returns
 * the same batch (B rows); only the number of batches differs: the dataset
 * has --dataset-size items, grouped by --batch-size (train) or
 * --batch-size-valid (other splits), and the iterator is sharded over the
 * ranks, so an epoch is ceil(ceil(dataset_size / bsz) / world) batches per
 * rank (fairseq's ShardedIterator length; exact for batch sizes below 8 or
 * multiples of --required-batch-size-multiple).
 *
 * Not here: real data (language_modeling), add_bos_token.
 */
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"

#define DUMMY_PAD 1
#define DUMMY_NSPECIAL 4

/* Ranges keep every size derived from them exact: token ids are int32
 * (the dictionary, padded to 8, below 2^31), a batch's rows times tokens
 * fits in int64 with room for bytes. */
static const moe_option dummy_lm_options[] = {
    {"dict-size", MOE_OPT_INT, "49996", "number of dictionary words (before the 4 specials and padding to 8)", 0,
     2147483632.0, NULL},
    {"dataset-size", MOE_OPT_INT, "100000", "number of items in the dataset", 1, 9007199254740992.0, NULL},
    {"tokens-per-sample", MOE_OPT_INT, "512", "max number of total tokens over all segments per sample", 1,
     16777216.0, NULL},
};

typedef struct dummy_lm {
    const moe_host *h;
    int64_t vocab, T, dataset_size;
    int64_t bsz;        /* rows of every batch */
    int64_t bsz_train;  /* items per batch when counting batches */
    int64_t bsz_valid;
    int world;
} dummy_lm;

static void dummy_destroy(void *task) { free(task); }

static moe_status dummy_init(const moe_host *h, void **out)
{
    *out = NULL;
    int64_t dict = h->opt_int(h, "dict-size");
    int64_t T = h->opt_int(h, "tokens-per-sample");
    int64_t size = h->opt_int(h, "dataset-size");
    if (dict < 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "--dict-size: expected >= 0 words, got %lld", (long long)dict);
    if (T <= 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "--tokens-per-sample: expected > 0, got %lld", (long long)T);
    if (size <= 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "--dataset-size: expected > 0 items, got %lld", (long long)size);
    int64_t bsz;
    if (h->opt_set(h, "batch-size")) {
        bsz = h->opt_int(h, "batch-size");
    } else if (h->opt_set(h, "max-tokens")) {
        bsz = h->opt_int(h, "max-tokens") / T;
        if (bsz < 1)
            bsz = 1;
    } else {
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "dummy_lm needs a batch size: give --batch-size (sentences per GPU) or --max-tokens");
    }
    if (bsz <= 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "--batch-size: expected > 0 sentences, got %lld", (long long)bsz);
    int64_t bsz_valid = bsz;
    if (h->opt_set(h, "batch-size-valid")) {
        bsz_valid = h->opt_int(h, "batch-size-valid");
        if (bsz_valid <= 0)
            return h->error(h, MOE_ERR_INVALID_ARG, "--batch-size-valid: expected > 0 sentences, got %lld",
                            (long long)bsz_valid);
    }
    dummy_lm *d = calloc(1, sizeof *d);
    if (!d)
        return h->error(h, MOE_ERR_NOMEM, "dummy_lm: out of host memory");
    d->h = h;
    int64_t n = DUMMY_NSPECIAL + dict;
    d->vocab = (n + 7) / 8 * 8; /* Dictionary.pad_to_multiple_(8) */
    if (T + 2 >= d->vocab) {
        /* the fixed sequence holds ids 2..T+2, all of which must be words of the dictionary */
        int64_t need = T + 3 - DUMMY_NSPECIAL;
        free(d);
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "dummy_lm: --tokens-per-sample %lld needs token ids up to %lld, but the dictionary has %lld "
                        "entries; use --dict-size %lld or more",
                        (long long)T, (long long)(T + 2), (long long)(n + 7) / 8 * 8, (long long)need);
    }
    d->T = T;
    d->dataset_size = size;
    d->bsz = bsz;
    d->bsz_train = bsz;
    d->bsz_valid = bsz_valid;
    d->world = h->world > 0 ? h->world : 1;
    h->log(h, MOE_LOG_INFO, "fairseq.benchmark.dummy_lm", "dictionary: %lld types", (long long)d->vocab);
    *out = d;
    return MOE_OK;
}

static int64_t dummy_vocab_size(void *task) { return ((dummy_lm *)task)->vocab; }

static int dummy_padding_idx(void *task)
{
    (void)task;
    return DUMMY_PAD;
}

/* items per batch for a split, or 0 for an unknown split name */
static int64_t split_bsz(const dummy_lm *d, const char *split)
{
    if (!split)
        return 0;
    if (strcmp(split, "train") == 0)
        return d->bsz_train;
    if (strncmp(split, "valid", 5) == 0 || strncmp(split, "test", 4) == 0)
        return d->bsz_valid;
    return 0;
}

static int64_t dummy_num_batches(void *task, const char *split)
{
    const dummy_lm *d = task;
    int64_t b = split_bsz(d, split);
    if (b <= 0) {
        d->h->error(d->h, MOE_ERR_INVALID_ARG,
                    "dummy_lm: unknown split '%s'; expected train, valid or test (optionally numbered: valid1)",
                    split ? split : "(null)");
        return -1;
    }
    int64_t batches = (d->dataset_size + b - 1) / b;
    return (batches + d->world - 1) / d->world;
}

static moe_status dummy_get_batch(void *task, const char *split, int64_t index, moe_batch *b)
{
    const dummy_lm *d = task;
    const moe_host *h = d->h;
    memset(b, 0, sizeof *b);
    int64_t nb = dummy_num_batches(task, split);
    if (nb < 0)
        return MOE_ERR_INVALID_ARG; /* message set by num_batches */
    if (index < 0 || index >= nb)
        return h->error(h, MOE_ERR_INVALID_ARG, "dummy_lm: batch %lld of split '%s' requested; it has %lld per rank",
                        (long long)index, split, (long long)nb);
    int64_t B = d->bsz, T = d->T;
    b->src = malloc((size_t)(B * T) * sizeof *b->src);
    b->tgt = malloc((size_t)(B * T) * sizeof *b->tgt);
    if (!b->src || !b->tgt) {
        free(b->src);
        free(b->tgt);
        memset(b, 0, sizeof *b);
        return h->error(h, MOE_ERR_NOMEM, "dummy_lm: out of host memory for a %lld x %lld batch", (long long)B,
                        (long long)T);
    }
    for (int64_t r = 0; r < B; r++)
        for (int64_t t = 0; t < T; t++) {
            /* seq[i] = i + pad + 1; src = seq[:-1], tgt = seq[1:] */
            b->src[r * T + t] = (int32_t)(t + DUMMY_PAD + 1);
            b->tgt[r * T + t] = (int32_t)(t + DUMMY_PAD + 2);
        }
    b->B = B;
    b->T = T;
    b->ntokens = B * T;
    b->nsentences = B;
    return MOE_OK;
}

static void dummy_free_batch(void *task, moe_batch *b)
{
    (void)task;
    free(b->src);
    free(b->tgt);
    b->src = b->tgt = NULL;
}

static const moe_task_ops dummy_lm_ops = {
    dummy_init, dummy_destroy, dummy_vocab_size, dummy_padding_idx, dummy_num_batches, dummy_get_batch,
    dummy_free_batch, NULL, NULL,
};

MOE_PLUGIN_DEFINE(MOE_KIND_TASK, moe_task_ops, "dummy_lm", "1.0",
                  "synthetic language-model data: one fixed batch of 'previous token + 1' sequences",
                  dummy_lm_options, (int)(sizeof dummy_lm_options / sizeof dummy_lm_options[0]), NULL, NULL,
                  &dummy_lm_ops)
