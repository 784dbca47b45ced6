/* batching.h: how fairseq orders, filters and batches samples and hands the
 * batches to data-parallel ranks each epoch (DATA_SPEC §3.8, §3.9), with
 * numpy's legacy random generator reproduced bit for bit so that the same
 * --seed gives the same batches and the same batch order as fairseq.
 *
 * Pipeline: moe_order_by_size (ordered_indices) -> moe_filter_by_size
 * (filter_indices_by_size) -> moe_batch_by_size (batch_by_size_vec, built
 * once) -> per epoch moe_epoch_batch_order (EpochBatchIterator's shuffle) ->
 * moe_shard_batch (ShardedIterator, padded with empty batches).
 *
 * Conventions a reader would trip over: sizes[] is indexed by sample id,
 * while batch_by_size walks the ordered ids; fairseq's seeds are the caller's
 * business (v0.12 orders with --seed, main with --seed + epoch; the batch
 * shuffle uses --seed + epoch in both). batch_by_size keeps a last batch of
 * any size, as v0.12 and fairseq's moe branch; drop_last = 1 gives main's
 * drop of a last batch whose size is not a multiple of the required multiple.
 * Arrays returned through pointers are malloc'd; the caller frees them.
 *
 * Not here: the size filter's warning or error text (the task words it), the
 * update-freq grouping and the dummy batch (the trainer).
 */
#ifndef MOE_DATA_BATCHING_H
#define MOE_DATA_BATCHING_H

#include <stdint.h>

#include "moe/status.h"

/* numpy's legacy RandomState (MT19937, np.random.seed / shuffle / permutation). */
typedef struct moe_np_rng {
    uint32_t mt[624];
    int pos;
} moe_np_rng;

void moe_np_seed(moe_np_rng *r, uint32_t seed); /* np.random.seed(seed): init_genrand */
uint32_t moe_np_next_u32(moe_np_rng *r);
/* random_interval: uniform in [0, max] by masking and rejection (no draw
 * when max == 0; a 64-bit draw, high word first, when max > 2^32-1). */
uint64_t moe_np_interval(moe_np_rng *r, uint64_t max);
void moe_np_shuffle(moe_np_rng *r, int64_t *x, int64_t n); /* for i = n-1 down to 1: j = interval(i); swap */
void moe_np_permutation(moe_np_rng *r, int64_t *x, int64_t n); /* x = arange(n), shuffled */

/* MonolingualDataset.ordered_indices under numpy_seed(seed): ids sorted by
 * size ascending, ties broken by permutation(n) (shuffle) or by id (no
 * shuffle): np.lexsort([permutation(n) or arange(n), sizes]). *out gets n ids. */
moe_status moe_order_by_size(const int64_t *sizes, int64_t n, uint32_t seed, int shuffle, int64_t **out);

/* filter_indices_by_size: keeps the order, drops ids whose size >
 * max_positions, returns the count kept (in indices[0..kept)). The first
 * min(dropped, max_report) dropped ids go to `dropped` (may be NULL), their
 * total to *n_dropped (may be NULL). */
int64_t moe_filter_by_size(int64_t *indices, int64_t n, const int64_t *sizes, int64_t max_positions,
                           int64_t *dropped, int max_report, int64_t *n_dropped);

/* Batch b is indices[offsets[b] .. offsets[b+1]), b < n. */
typedef struct moe_batch_list {
    int64_t n;
    int64_t *offsets;
    int64_t *indices;
} moe_batch_list;

/* data_utils.batch_by_size (batch_by_size_vec): max_tokens / max_sentences
 * <= 0 mean no limit, multiple >= 1 (--required-batch-size-multiple). A
 * sample larger than max_tokens fails with fairseq's "Sentences lengths
 * should not exceed max_tokens=<MT>" and names the sample. No ids gives no
 * batches. drop_last: see the top of this file. *out is zeroed first. */
moe_status moe_batch_by_size(const int64_t *indices, int64_t n, const int64_t *sizes, int64_t max_tokens,
                             int64_t max_sentences, int64_t multiple, int drop_last, moe_batch_list *out);
void moe_batch_list_free(moe_batch_list *b);

/* EpochBatchIterator.ordered_batches: (*order)[i] = the batch that comes i-th
 * in `epoch` (1-based): the identity without shuffle, else np.random.shuffle
 * of 0..nb-1 under numpy_seed(seed + epoch) (which must stay below 2^32, as
 * numpy requires). */
moe_status moe_epoch_batch_order(int64_t nb, uint32_t seed, int64_t epoch, int shuffle, int64_t **order);

/* ShardedIterator: each of `world` ranks takes ceil(nb / world) batches;
 * rank r's i-th is order[i*world + r] (order NULL: the identity), or -1 past
 * the end: an empty batch, which the trainer runs as a zero-weight dummy so
 * every rank takes the same steps. */
int64_t moe_shard_count(int64_t nb, int world);
int64_t moe_shard_batch(const int64_t *order, int64_t nb, int world, int rank, int64_t i);

#endif
