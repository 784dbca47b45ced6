/* text.h: reading UTF-8 text files by lines the way fairseq's Python does,
 * and fairseq's tokenize_line.
 *
 * Lines follow Python's universal newlines: "\n", "\r\n" and a lone "\r" each
 * end a line; no other character does (U+2028 and U+0085 stay inside the
 * line). The line handed on excludes its terminator. The bytes must be strict
 * UTF-8 as Python decodes it (no overlong forms, no surrogates, nothing above
 * U+10FFFF); the first invalid sequence is an error naming the file, the line
 * number and the byte offset in the file. A UTF-8 byte order mark is not
 * stripped (Python's "utf-8" codec keeps it).
 *
 * A reader reads a byte range [begin, end) of a file; moe_text_chunks gives N
 * ranges that each start just after a line end, so reading the ranges in order
 * yields exactly the lines of one sequential read, for any N and for LF, CRLF
 * and CR files alike. (fairseq's --workers > 1 duplicates lines of CR files at
 * chunk ends; this emulates its --workers 1 result everywhere.)
 *
 * "Python whitespace" is the 29 code points where str.isspace() is true:
 * U+0009-000D, U+001C-001F, U+0020, U+0085, U+00A0, U+1680, U+2000-200A,
 * U+2028, U+2029, U+202F, U+205F and U+3000. The token and strip helpers
 * expect valid UTF-8 (what a reader hands out).
 *
 * Not here: decoding to code points, normalisation, the GPT-2 pre-tokenizer
 * (data/bpe.c uses Unicode White_Space, a different set).
 */
#ifndef MOE_DATA_TEXT_H
#define MOE_DATA_TEXT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "moe/status.h"

typedef struct moe_text_reader moe_text_reader;

/* Opens `path` to read the lines in bytes [begin, end) (end < 0: to the end
 * of the file). begin must be 0 or just after a line end (moe_text_chunks);
 * the last line of the range ends at `end` (or is the file's unterminated
 * last line). */
moe_status moe_text_open(const char *path, int64_t begin, int64_t end, moe_text_reader **out);
/* The next line: *line points into the reader (valid until the next call),
 * *len bytes without the terminator. At the end of the range *line is NULL
 * and *len 0. An invalid UTF-8 sequence or a read error fails. */
moe_status moe_text_next(moe_text_reader *r, const char **line, size_t *len);
/* The 1-based line number in the file of the line last returned (the line
 * before the range's first one, before the first call to next). For a range
 * starting inside the file, the first call counts the lines before it (one
 * read of that part of the file), so ask only when a message needs it. */
int64_t moe_text_line_number(moe_text_reader *r);
void moe_text_close(moe_text_reader *r);

/* pread until `n` bytes or the end of the file (EINTR retried); returns the
 * count read or -1 with errno set. */
ssize_t moe_data_pread(int fd, void *buf, size_t n, int64_t off);

/* offsets[0..n] for n >= 1 ranges of `path`: offsets[0] = 0, offsets[n] =
 * the file size, and offsets[i] just after the end of the line holding byte
 * i*(size/n) (fairseq's find_offsets), never between the "\r" and "\n" of a
 * pair. Ranges may be empty; they are non-decreasing. */
moe_status moe_text_chunks(const char *path, int n, int64_t *offsets);

/* Bytes of the Python-whitespace character at s[0] (1 to 3), or 0 when it is
 * not one; n > 0 bytes are readable. */
size_t moe_text_space_len(const char *s, size_t n);
/* fairseq's tokenize_line as an iterator: the next maximal run of
 * non-whitespace at or after *pos in s[0..n). Returns 1 with *tok, *tok_len
 * set and *pos moved past it; 0 when no token is left. */
int moe_text_next_token(const char *s, size_t n, size_t *pos, const char **tok, size_t *tok_len);
/* Python's str.rstrip() / str.lstrip() / str.strip() on valid UTF-8:
 * rstrip returns the kept length, lstrip the number of bytes skipped. */
size_t moe_text_rstrip(const char *s, size_t n);
size_t moe_text_lstrip(const char *s, size_t n);
void moe_text_strip(const char *s, size_t n, const char **out, size_t *out_len);

#endif
