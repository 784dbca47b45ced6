/* bpe.h: GPT-2 byte-level BPE as fairseq applies it (DATA_SPEC.md §4).
 *
 * Loads either fairseq's pair of files (encoder.json + vocab.bpe) or a
 * Hugging Face tokenizer.json that describes the same kind of BPE, encodes
 * UTF-8 text to GPT-2 ids and decodes ids back to UTF-8 bytes.
 *
 * What it is not: no special tokens (`<|endoftext|>` in text is split like
 * any other text, as fairseq does; tokenizer.json's added_tokens are
 * ignored), no normalizer, no BPE dropout, and no fairseq dictionary: the ids
 * here are GPT-2 ids, not fairseq indices (DATA_SPEC.md §4.4).
 *
 * Threads: a moe_bpe is immutable once loaded and may be shared; each thread
 * encodes through its own moe_bpe_state (regex match data and a bounded cache
 * of pre-token -> ids, about 3.5 MB, cleared whenever it fills). Decoding
 * needs no state.
 *
 * Errors: every fallible function returns a moe_status and leaves one message
 * in the data library's error slot (data/error.h). Load errors name the file
 * and the line or JSON field; encode/decode errors name the offending byte
 * offset or id, and the caller adds which file and line it was reading.
 */
#ifndef MOE_DATA_BPE_H
#define MOE_DATA_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "moe/status.h"

typedef struct moe_bpe moe_bpe;             /* immutable after load, shared by threads */
typedef struct moe_bpe_state moe_bpe_state; /* per-thread scratch and cache */

/* fairseq's get_encoder: encoder.json (token -> id) and vocab.bpe (merges).
 * Pre-tokenization is the GPT-2 regex; no prefix space. */
moe_status moe_bpe_load_gpt2(const char *encoder_json, const char *vocab_bpe, moe_bpe **out);

/* A Hugging Face tokenizer.json whose model is a GPT-2-equivalent BPE and whose
 * pre_tokenizer is ByteLevel, or Sequence [Split(Regex|String, Isolated),
 * ByteLevel(use_regex false)]. Anything else is refused with a message naming
 * the file and the field. */
moe_status moe_bpe_load_tokenizer_json(const char *path, moe_bpe **out);

void moe_bpe_destroy(moe_bpe *b);

moe_status moe_bpe_state_create(const moe_bpe *b, moe_bpe_state **out);
void moe_bpe_state_destroy(moe_bpe_state *s);

/* GPT-2 ids of `text` (len bytes, UTF-8): pre-tokenization regex, byte-to-unicode
 * map, merges by rank. *ids is a buffer of *cap entries (may be NULL/0) grown
 * with realloc as needed and owned by the caller, also after a failure; *n
 * receives the count. Invalid UTF-8 is an error naming the byte offset. */
moe_status moe_bpe_encode(moe_bpe_state *s, const char *text, size_t len, int32_t **ids, int64_t *n,
                          int64_t *cap);

/* Bytes of the ids (fairseq's Encoder.decode): each id's token string, chars
 * mapped back to bytes, then UTF-8 with errors="replace" (each maximal invalid
 * subpart becomes one U+FFFD, as Python does). *text is malloc'd and
 * NUL-terminated; *len excludes the NUL (the text may contain NUL bytes). An id
 * with no token, or a token with a char outside the byte map, is an error. */
moe_status moe_bpe_decode(const moe_bpe *b, const int32_t *ids, int64_t n, char **text, size_t *len);

/* The pre-tokens of `text` in order, as encode sees them (after any prefix
 * space of tokenizer.json's ByteLevel): fn is called with each piece's bytes,
 * which live only for the call. A status other than MOE_OK from fn stops the
 * walk and is returned as is (fn sets its own message). */
typedef moe_status (*moe_bpe_piece_fn)(const char *piece, size_t len, void *arg);
moe_status moe_bpe_pretokenize(moe_bpe_state *s, const char *text, size_t len, moe_bpe_piece_fn fn,
                               void *arg);

/* Largest id + 1 (the id space; ids without a token are holes). */
int64_t moe_bpe_vocab_size(const moe_bpe *b);
/* Number of merge rules in effect (after duplicates collapsed). */
int64_t moe_bpe_merge_count(const moe_bpe *b);
/* The token string (UTF-8 of its chars, NUL-terminated), NULL if id has none. */
const char *moe_bpe_token(const moe_bpe *b, int32_t id, size_t *len);
/* Id of a token string, -1 if it is not in the vocabulary. */
int32_t moe_bpe_token_id(const moe_bpe *b, const char *token, size_t len);

/* The byte <-> char map of DATA_SPEC.md §4.1: the code point byte b stands for,
 * and the byte a code point stands for (-1 if it stands for none). */
uint32_t moe_bpe_byte_to_char(uint8_t b);
int moe_bpe_char_to_byte(uint32_t cp);

#endif
