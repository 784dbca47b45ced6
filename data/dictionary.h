/* dictionary.h: fairseq's Dictionary (fairseq/data/dictionary.py): symbols,
 * counts and the dict.txt format, and a word counter for building one.
 *
 * Indices 0..3 are the specials <s> (bos), <pad>, </s> (eos) and <unk>, each
 * with count 1; they are never written to dict.txt, so line k of the file is
 * index 4+k. Symbols are byte strings (UTF-8 in practice), compared with
 * memcmp, which is Python's code-point order on UTF-8. Lookups go through a
 * hash table; with add(..., overwrite=1) a symbol can occupy two indices and
 * the lookup answers the newer one, as fairseq's.
 *
 * A dictionary is not thread-safe for writing; concurrent moe_dict_index and
 * moe_dict_symbol calls on an unchanging dictionary are safe (binarization
 * threads share one). A moe_wordcount is a thread's private counter; merge
 * them into the dictionary with moe_dict_add_counts.
 *
 * Not here: tokenizing lines (data/text.h), BPE (data/bpe.h), fairseq's
 * extra special symbols and the lang-token helpers of the translation tasks.
 */
#ifndef MOE_DATA_DICTIONARY_H
#define MOE_DATA_DICTIONARY_H

#include <stddef.h>
#include <stdint.h>

#include "moe/status.h"

#define MOE_DICT_BOS 0
#define MOE_DICT_PAD 1
#define MOE_DICT_EOS 2
#define MOE_DICT_UNK 3
#define MOE_DICT_NSPECIAL 4

typedef struct moe_dict moe_dict;

/* A dictionary holding the 4 specials. */
moe_status moe_dict_create(moe_dict **out);
void moe_dict_destroy(moe_dict *d);
/* Dictionary.load: the specials, then every line of a dict.txt
 * ("<symbol> <count>[ #fairseq:overwrite]"). A duplicate without the flag, a
 * line without a space, a count Python's int() refuses or invalid UTF-8 is an
 * error naming the file and the line. */
moe_status moe_dict_load(const char *path, moe_dict **out);
/* Dictionary.save: "<symbol> <count>\n" for every non-special index, written
 * to a temporary file in the same directory and renamed over `path`. */
moe_status moe_dict_save(const moe_dict *d, const char *path);

int64_t moe_dict_len(const moe_dict *d);
/* The symbol at `index` (NUL-terminated; *len gets its length when len is
 * non-NULL), or NULL if index is out of range. */
const char *moe_dict_symbol(const moe_dict *d, int64_t index, size_t *len);
int64_t moe_dict_count(const moe_dict *d, int64_t index); /* 0 if out of range */
/* The index of `word`, MOE_DICT_UNK if absent. */
int64_t moe_dict_index(const moe_dict *d, const char *word, size_t len);
/* add_symbol: an existing word gets n added to its count (unless overwrite);
 * otherwise (or with overwrite) the word is appended with count n. *index
 * (may be NULL) receives its index. */
moe_status moe_dict_add(moe_dict *d, const char *word, size_t len, int64_t n, int overwrite, int64_t *index);
/* finalize: keep the specials; order the other symbols by count descending,
 * ties by symbol (memcmp); keep the first nwords - 4 (all when nwords <= 0)
 * up to the first whose count < threshold; then pad with madeupword%04d
 * (count 0, names already present skipped) to a multiple of padding_factor
 * when padding_factor > 1. */
moe_status moe_dict_finalize(moe_dict *d, int64_t threshold, int64_t nwords, int64_t padding_factor);

/* ---- word counting ---- */

typedef struct moe_wordcount moe_wordcount;

moe_status moe_wordcount_create(moe_wordcount **out);
void moe_wordcount_destroy(moe_wordcount *c);
/* Adds n to the count of `word` (a new word starts at 0). */
moe_status moe_wordcount_add(moe_wordcount *c, const char *word, size_t len, int64_t n);
int64_t moe_wordcount_len(const moe_wordcount *c);       /* distinct words */
int64_t moe_wordcount_get(const moe_wordcount *c, const char *word, size_t len); /* 0 if absent */
/* moe_dict_add(d, word, count, 0) for every word of c, in symbol order (as
 * fairseq merges a worker's Counter). */
moe_status moe_dict_add_counts(moe_dict *d, const moe_wordcount *c);

#endif
