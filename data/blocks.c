/* blocks.c: fairseq's TokenBlockDataset (data/blocks.h).
 *
 * The cuts follow token_block_utils_fast.pyx (_get_slice_indices_fast) line
 * for line, including its quirks: complete_doc advances past a dropped
 * one-token block and past each separator, so those tokens belong to no
 * block. Instead of fairseq's (start item, start offset, end item) records,
 * a block keeps its flat range and whether its start offset within its item
 * is 0, which is all __getitem__ uses them for.
 */
#include "data/blocks.h"

#include <stdlib.h>
#include <string.h>

#include "data/error.h"

static const char *const mode_names[] = {"none", "complete", "complete_doc", "eos"};

moe_status moe_break_mode_parse(const char *s, moe_break_mode *out)
{
    for (int m = 0; m < 4; m++)
        if (s && strcmp(s, mode_names[m]) == 0) {
            *out = (moe_break_mode)m;
            return MOE_OK;
        }
    return moe_data_fail(MOE_ERR_INVALID_ARG,
                         "invalid --sample-break-mode '%s': expected one of none, complete, complete_doc, eos",
                         s ? s : "(null)");
}

const char *moe_break_mode_name(moe_break_mode m)
{
    return (unsigned)m < 4 ? mode_names[m] : "unknown";
}

void moe_blocks_free(moe_blocks *b)
{
    if (!b)
        return;
    free(b->start);
    free(b->end);
    free(b->at_item_start);
    free(b->size);
    memset(b, 0, sizeof *b);
}

static void push(moe_blocks *b, int64_t start, int64_t end)
{
    b->start[b->n] = start;
    b->end[b->n] = end;
    b->n++;
}

moe_status moe_blocks_build(const int64_t *item_sizes, int64_t n_items, int64_t block_size, moe_break_mode mode,
                            int64_t doc_sep_len, moe_blocks *out)
{
    memset(out, 0, sizeof *out);
    if ((unsigned)mode > MOE_BREAK_EOS)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "token blocks: unknown break mode %d", (int)mode);
    if (n_items <= 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "token blocks: the split has no items (fairseq's TokenBlockDataset asserts a non-empty "
                             "dataset): preprocess a non-empty text file");
    if (block_size < 0 || (block_size == 0 && mode != MOE_BREAK_EOS))
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "token blocks: block size (--tokens-per-sample) %lld, expected a positive number",
                             (long long)block_size);
    int64_t total = 0;
    for (int64_t i = 0; i < n_items; i++) {
        if (item_sizes[i] < 0 || item_sizes[i] > INT64_MAX - total)
            return moe_data_fail(MOE_ERR_INVALID_ARG, "token blocks: item %lld has invalid size %lld", (long long)i,
                                 (long long)item_sizes[i]);
        total += item_sizes[i];
    }
    int64_t cap = mode == MOE_BREAK_NONE ? total / block_size + (total % block_size != 0) : n_items;
    size_t alloc = (size_t)(cap > 0 ? cap : 1);
    out->start = malloc(alloc * sizeof *out->start);
    out->end = malloc(alloc * sizeof *out->end);
    out->size = malloc(alloc * sizeof *out->size);
    out->at_item_start = malloc(alloc);
    if (!out->start || !out->end || !out->size || !out->at_item_start) {
        moe_blocks_free(out);
        return moe_data_fail(MOE_ERR_NOMEM, "out of host memory for %lld token blocks", (long long)cap);
    }
    int64_t tok = 0, cur = 0, i = 0;
    switch (mode) {
    case MOE_BREAK_NONE:
        for (int64_t k = 0; k < cap; k++) {
            int64_t s = k * block_size;
            push(out, s, total - s < block_size ? total : s + block_size);
        }
        break;
    case MOE_BREAK_COMPLETE:
        while (i < n_items) {
            if (cur + item_sizes[i] <= block_size || cur == 0) {
                cur += item_sizes[i++];
            } else {
                push(out, tok, tok + cur);
                tok += cur;
                cur = 0;
            }
        }
        if (cur > 0)
            push(out, tok, tok + cur);
        break;
    case MOE_BREAK_COMPLETE_DOC:
        while (i < n_items) {
            int64_t s = item_sizes[i];
            if ((cur + s <= block_size || cur == 0) && s != doc_sep_len) {
                cur += s;
                i++;
            } else {
                if (cur > 1) /* only non-empty documents are kept */
                    push(out, tok, tok + cur);
                tok += cur;
                cur = 0;
                if (s == doc_sep_len) {
                    tok += s;
                    i++;
                }
            }
        }
        if (cur > 1)
            push(out, tok, tok + cur);
        break;
    case MOE_BREAK_EOS:
        for (; i < n_items; i++) {
            push(out, tok, tok + item_sizes[i]);
            tok += item_sizes[i];
        }
        break;
    }
    if (out->n == 0 && mode != MOE_BREAK_NONE) {
        moe_blocks_free(out);
        if (mode == MOE_BREAK_COMPLETE_DOC)
            return moe_data_fail(MOE_ERR_INVALID_ARG,
                                 "token blocks: --sample-break-mode complete_doc found no document of 2 or more tokens "
                                 "in %lld items (only empty lines, i.e. document separators of %lld tokens?); fairseq "
                                 "fails here too: use another break mode or check the data",
                                 (long long)n_items, (long long)doc_sep_len);
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "token blocks: --sample-break-mode complete found no tokens in %lld items (all are "
                             "empty); fairseq fails here too: check the data",
                             (long long)n_items);
    }
    /* fairseq stores block sizes as uint16 below block size 65535, else uint32 */
    const int64_t mask = block_size < 65535 ? 0xFFFF : 0xFFFFFFFF;
    int64_t item = 0, item_start = 0; /* none mode: the first item ending after a block's start */
    for (int64_t k = 0; k < out->n; k++) {
        out->size[k] = (out->end[k] - out->start[k]) & mask;
        if (mode != MOE_BREAK_NONE) {
            out->at_item_start[k] = 1; /* every other mode cuts at item boundaries */
            continue;
        }
        while (item < n_items && item_start + item_sizes[item] <= out->start[k])
            item_start += item_sizes[item++];
        out->at_item_start[k] = item_start == out->start[k];
    }
    return MOE_OK;
}

moe_status moe_blocks_sample(const moe_blocks *b, int64_t k, moe_token_reader read, void *ctx, int32_t eos,
                             int32_t *src, int32_t *tgt, int64_t *len)
{
    *len = 0;
    if (k < 0 || k >= b->n)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "token blocks: block %lld requested, there are %lld", (long long)k,
                             (long long)b->n);
    int64_t n = b->end[k] - b->start[k];
    if (n == 0)
        return MOE_OK;
    MOE_TRY(read(ctx, b->start[k], n, tgt));
    if (b->at_item_start[k])
        src[0] = eos;
    else
        MOE_TRY(read(ctx, b->start[k] - 1, 1, src));
    memcpy(src + 1, tgt, (size_t)(n - 1) * sizeof *src);
    *len = n;
    return MOE_OK;
}
