/* blocks.h: fairseq's TokenBlockDataset over the flat token stream: how the
 * items (lines) of a split are cut into training samples, and the
 * (source, target) pair of each sample (DATA_SPEC §3.5).
 *
 * Blocks are ranges [start, end) of the flat stream (all items back to back),
 * cut exactly as fairseq's Cython _get_slice_indices_fast does:
 *   none          fixed blocks of block_size tokens across item boundaries;
 *                 only the last one can be short
 *   complete      whole items packed while they fit in block_size (an item
 *                 that alone exceeds it becomes one oversized block)
 *   complete_doc  the same, but an item of exactly doc_sep_len tokens (an
 *                 empty line: [eos]) is a document separator: it closes the
 *                 block, its token belongs to no block, and blocks of 0 or 1
 *                 token are dropped
 *   eos           one block per item, block_size ignored
 * The sample of a block is fairseq's with include_targets and the "future"
 * target: target = the block's tokens; source = the same shifted right by
 * one, starting with the true previous token, or with a fabricated eos when
 * the block starts at an item boundary (where the previous token is an
 * item's final eos anyway, for preprocessed text).
 *
 * Conventions a reader would trip over: size[] is fairseq's recorded block
 * size, wrapped to uint16 when block_size < 65535 (uint32 otherwise), so an
 * oversized block of >= 65536 tokens in complete/complete_doc/eos mode sorts,
 * filters and batches by a wrong, small size while its data stays whole
 * (copied from fairseq on purpose; use end - start for the true length).
 * Empty items (size 0; preprocessing never writes them) add no tokens: the
 * cuts are fairseq's, and samples follow the flat stream. fairseq's own
 * samples go wrong around them: its item searcher asserts, or ends a block
 * on the empty item and returns it short; in eos mode an empty item's block
 * is empty (fairseq returns source [eos] with an empty target; here the
 * sample has length 0).
 *
 * Not here: ordering, filtering and batching (data/batching.h), the past and
 * self targets, --add-bos-token and --output-dictionary-size (the task).
 */
#ifndef MOE_DATA_BLOCKS_H
#define MOE_DATA_BLOCKS_H

#include <stdint.h>

#include "moe/status.h"

typedef enum moe_break_mode {
    MOE_BREAK_NONE = 0,
    MOE_BREAK_COMPLETE,
    MOE_BREAK_COMPLETE_DOC,
    MOE_BREAK_EOS
} moe_break_mode;

/* "none", "complete", "complete_doc", "eos" (fairseq's --sample-break-mode values). */
moe_status moe_break_mode_parse(const char *s, moe_break_mode *out);
const char *moe_break_mode_name(moe_break_mode m);

typedef struct moe_blocks {
    int64_t n;
    int64_t *start, *end;   /* flat token range [start, end) of each block */
    uint8_t *at_item_start; /* 1 when the block starts at an item boundary: its first input is a fabricated eos */
    int64_t *size;          /* fairseq's recorded size: end - start wrapped to uint16 (block_size < 65535) or uint32 */
} moe_blocks;

/* Cuts n_items items of the given sizes (>= 0) into blocks. block_size > 0
 * (any value >= 0 in eos mode, where it only picks the size wrap).
 * Fails with a message when n_items == 0 (fairseq asserts), and when
 * complete or complete_doc produce no block at all (e.g. a split of only
 * empty lines; fairseq crashes in numpy). none mode over zero tokens gives
 * zero blocks, as fairseq. *out is zeroed first; free with moe_blocks_free. */
moe_status moe_blocks_build(const int64_t *item_sizes, int64_t n_items, int64_t block_size, moe_break_mode mode,
                            int64_t doc_sep_len, moe_blocks *out);
void moe_blocks_free(moe_blocks *b);

/* Fetches flat tokens [start, start+n) into out. */
typedef moe_status (*moe_token_reader)(void *ctx, int64_t start, int64_t n, int32_t *out);

/* Block k's sample: tgt = tokens[start, end); src = [eos] + tokens[start,
 * end-1) when at_item_start, else tokens[start-1, end-1). src and tgt hold
 * end - start entries; *len is set to that. A failing read passes its status
 * (and message) through. */
moe_status moe_blocks_sample(const moe_blocks *b, int64_t k, moe_token_reader read, void *ctx, int32_t eos,
                             int32_t *src, int32_t *tgt, int64_t *len);

#endif
