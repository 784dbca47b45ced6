/* indexed.h: memory-mapped indexed datasets, the token files that
 * fairseq-preprocess (--dataset-impl mmap, its default) and Megatron-LM's
 * preprocess_data.py write: <prefix>.idx (header, item sizes, byte pointers)
 * and <prefix>.bin (every item's ids back to back, no header).
 *
 * One reader takes both layouts; they share magic and version and are told
 * apart by the .idx file size alone (DATA_SPEC §2.6):
 *   fairseq            26 + 12N bytes
 *   Megatron           34 + 12N + 8D bytes (D-entry document index after the pointers)
 *   Megatron multimodal 34 + 13N + 8D bytes (and one int8 mode per sequence)
 * Because the size is the discriminator, the size must be exact: an .idx with
 * bytes past its fairseq index is refused (fairseq itself ignores them) with a
 * message saying how long the file should be.
 *
 * Opening maps both files and checks the whole index (sizes >= 0, pointers
 * consistent with the sizes, .bin size == itemsize * total tokens, the
 * Megatron document index), but reads nothing of the .bin: opening a
 * many-gigabyte dataset costs a pass over its .idx. Ids are read on demand
 * and widened to int32, checked against the dictionary when asked. Files
 * must not change while open (a .bin truncated under a mapping faults).
 *
 * The builder writes fairseq's format byte for byte
 * (MMapIndexedDatasetBuilder), streaming: its memory does not grow with the
 * data; the outputs appear under their names only when finished (temporary
 * names until then, .bin renamed before .idx).
 *
 * Conventions a reader would trip over: "item" is fairseq's word (a line of
 * text, a Megatron "sequence"); positions in the "flat stream" count tokens
 * of all items concatenated; the on-disk format is little-endian and
 * big-endian hosts are refused rather than byte-swapped. dtype codes are the
 * fairseq/Megatron header codes (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
 * 8 uint16, 9 uint32, 10 uint64); the float codes 6 and 7 are refused (they
 * mean different types in different Megatron versions, and tokens are ints).
 *
 * Not here: fairseq's other dataset impls (raw, lazy, cached, huffman: named
 * and refused), the train/train1/... concatenation and the item-to-block
 * split (the task and data/blocks.h).
 */
#ifndef MOE_DATA_INDEXED_H
#define MOE_DATA_INDEXED_H

#include <stdint.h>

#include "moe/status.h"

typedef enum moe_idx_layout { MOE_IDX_FAIRSEQ = 0, MOE_IDX_MEGATRON, MOE_IDX_MEGATRON_MULTIMODAL } moe_idx_layout;

typedef struct moe_idx moe_idx;

/* Opens <prefix>.idx and <prefix>.bin. Every failure leaves one message
 * naming the file and the problem (missing file, other impl, truncated or
 * oversized .idx, unknown dtype code, pointers past or inconsistent with the
 * data, .bin of the wrong size, bad document index). */
moe_status moe_idx_open(const char *prefix, moe_idx **out);
void moe_idx_close(moe_idx *ds);

int64_t moe_idx_count(const moe_idx *ds);          /* items (fairseq: lines; Megatron: sequences) */
const int64_t *moe_idx_sizes(const moe_idx *ds);   /* count() item sizes in tokens (an aligned copy) */
/* count()+1 cumulative token offsets: item i is tokens [off[i], off[i+1]) of the flat stream */
const int64_t *moe_idx_offsets(const moe_idx *ds);
int64_t moe_idx_num_tokens(const moe_idx *ds);     /* offsets[count] */
moe_idx_layout moe_idx_layout_of(const moe_idx *ds);
int moe_idx_dtype_code(const moe_idx *ds);
const char *moe_idx_bin_path(const moe_idx *ds);
const char *moe_idx_idx_path(const moe_idx *ds);
/* Megatron's document_indices (*n = D entries, doc k is items [d[k], d[k+1])),
 * an aligned copy; NULL and *n = 0 for the fairseq layout. n may be NULL. */
const int64_t *moe_idx_doc_index(const moe_idx *ds, int64_t *n);
/* The multimodal layout's count() sequence modes; NULL for the other layouts. */
const int8_t *moe_idx_modes(const moe_idx *ds);

/* Tokens [start, start+n) of the flat stream, widened to int32. With
 * vocab > 0 every id must lie in [0, vocab); the first one outside fails with
 * a message naming the .bin, the item, the position in the item, the value
 * and the vocabulary size. With vocab <= 0 ids are not checked, except that
 * one that does not fit an int32 fails. A range outside the stream fails.
 * Safe to call from several threads at once. */
moe_status moe_idx_read(const moe_idx *ds, int64_t start, int64_t n, int64_t vocab, int32_t *out);
/* The item holding flat position pos (never an empty item), or -1 when pos
 * is outside [0, num_tokens). */
int64_t moe_idx_item_of(const moe_idx *ds, int64_t pos);

/* fairseq's best_fitting_int_dtype for a dictionary of vocab_size entries:
 * 8 (uint16) if < 65500, 9 (uint32) if < 4294967295, else 5 (int64). */
int moe_idx_best_dtype(int64_t vocab_size);
/* Bytes per element of a dtype code, 0 for a code this reader refuses. */
int moe_idx_dtype_size(int dtype_code);
/* "uint16", ...; "float64" / "float64 or float32" for 6 / 7; "unknown" otherwise. */
const char *moe_idx_dtype_name(int dtype_code);

typedef struct moe_idx_builder moe_idx_builder;

/* Starts <prefix>.bin and <prefix>.idx under temporary names in the same
 * directory; dtype_code is one of the integer codes above. */
moe_status moe_idx_builder_open(const char *prefix, int dtype_code, moe_idx_builder **out);
/* Appends one item of n >= 0 ids. An id the dtype cannot hold (negative for
 * an unsigned code, too large) fails before anything is written: the
 * builder stays usable (fairseq's numpy cast would wrap it silently). */
moe_status moe_idx_builder_add(moe_idx_builder *b, const int32_t *ids, int64_t n);
/* fairseq's merge_file_: appends the items of another finished
 * fairseq-layout dataset of the same dtype (its .bin bytes copied as they are). */
moe_status moe_idx_builder_append(moe_idx_builder *b, const char *other_prefix);
/* Items added so far. */
int64_t moe_idx_builder_count(const moe_idx_builder *b);
/* Writes the pointers and header, syncs, renames <prefix>.bin then
 * <prefix>.idx into place. Frees b whatever the outcome (on failure the
 * temporaries are removed and any older <prefix>.bin/.idx are left as
 * they were, unless the failure came between the two renames). */
moe_status moe_idx_builder_finish(moe_idx_builder *b);
/* Removes the temporaries and frees b (NULL is fine). */
void moe_idx_builder_abort(moe_idx_builder *b);

/* What Megatron-LM's preprocess_data.py (IndexedDatasetBuilder) writes:
 * the Megatron layout (DATA_SPEC §2.5) for n items of the given sizes whose
 * ids are items[] back to back, and the D-entry document index doc_index
 * (doc_index[0] == 0, non-decreasing, doc_index[D-1] == n). dtype_code is one
 * of Megatron's integer codes (1, 2, 3, 4, 5, 8). Not streaming and not
 * atomic: a writer for tests and small conversions. */
moe_status moe_idx_write_megatron(const char *prefix, int dtype_code, const int32_t *items, const int64_t *sizes,
                                  int64_t n, const int64_t *doc_index, int64_t D);
/* The same with the multimodal layout's n int8 sequence modes after the document index. */
moe_status moe_idx_write_megatron_multimodal(const char *prefix, int dtype_code, const int32_t *items,
                                             const int64_t *sizes, int64_t n, const int64_t *doc_index, int64_t D,
                                             const int8_t *modes);

#endif
