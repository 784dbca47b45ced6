/* text.c: line reading with universal newlines and strict UTF-8, worker
 * chunk offsets, and fairseq's tokenize_line (see text.h).
 *
 * The reader keeps one growing buffer: a line longer than the buffer doubles
 * it, so memory follows the longest line, not the file. Validation and the
 * search for the line end are one pass, eight ASCII bytes at a time when it
 * can. Offsets in messages are absolute byte positions in the file (0-based);
 * line numbers are 1-based and absolute too: a reader that starts inside the
 * file counts the lines before its range only when a number is asked for
 * (an error to report).
 */
#include "data/text.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/error.h"

#define READ_BLOCK (1u << 20)

struct moe_text_reader {
    int fd;
    char *path;
    unsigned char *buf;
    size_t cap;
    size_t pos;      /* start of the next line in buf */
    size_t scan;     /* bytes [pos, scan) are validated and hold no terminator */
    size_t fill;     /* bytes [0, fill) hold data */
    int64_t buf_off; /* file offset of buf[0] */
    int64_t next;    /* file offset of the next read */
    int64_t begin, end;
    int at_end;      /* every byte of the range is in buf */
    int64_t lineno;  /* lines returned */
    int64_t base;    /* lines before begin; -1 until counted */
};

static moe_status nomem(const char *what)
{
    return moe_data_fail(MOE_ERR_NOMEM, "out of host memory while %s", what);
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

ssize_t moe_data_pread(int fd, void *buf, size_t n, int64_t off)
{
    size_t got = 0;
    while (got < n) {
        ssize_t k = pread(fd, (char *)buf + got, n - got, (off_t)(off + (int64_t)got));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0)
            break;
        got += (size_t)k;
    }
    return (ssize_t)got;
}

moe_status moe_text_open(const char *path, int64_t begin, int64_t end, moe_text_reader **out)
{
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return moe_data_fail(MOE_ERR_IO, "cannot open '%s': %s; expected a readable text file", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || S_ISDIR(sb.st_mode)) {
        int e = errno;
        close(fd);
        return moe_data_fail(MOE_ERR_IO, "cannot read '%s': %s; expected a text file", path,
                             S_ISDIR(sb.st_mode) ? "it is a directory" : strerror(e));
    }
    if (end < 0 || end > (int64_t)sb.st_size)
        end = (int64_t)sb.st_size;
    if (begin < 0 || begin > end) {
        close(fd);
        return moe_data_fail(MOE_ERR_INVALID_ARG, "'%s': byte range [%lld, %lld) is not inside the file (%lld bytes)",
                             path, (long long)begin, (long long)end, (long long)sb.st_size);
    }
    moe_text_reader *r = calloc(1, sizeof *r);
    if (!r) {
        close(fd);
        return nomem("opening a text file");
    }
    r->fd = fd;
    r->path = dup_str(path);
    r->cap = READ_BLOCK;
    r->buf = malloc(r->cap);
    if (!r->path || !r->buf) {
        moe_text_close(r);
        return nomem("opening a text file");
    }
    r->begin = begin;
    r->end = end;
    r->buf_off = begin;
    r->next = begin;
    r->at_end = begin >= end;
    r->base = begin > 0 ? -1 : 0;
    *out = r;
    return MOE_OK;
}

void moe_text_close(moe_text_reader *r)
{
    if (!r)
        return;
    if (r->fd >= 0)
        close(r->fd);
    free(r->path);
    free(r->buf);
    free(r);
}


/* Lines ending in [0, off) of the open file (off is a line start). */
static int64_t lines_before(int fd, int64_t off)
{
    unsigned char block[65536];
    int64_t lines = 0, at = 0;
    int cr = 0; /* the previous byte was a "\r" */
    while (at < off) {
        size_t want = off - at < (int64_t)sizeof block ? (size_t)(off - at) : sizeof block;
        ssize_t k = moe_data_pread(fd, block, want, at);
        if (k <= 0)
            break;
        for (ssize_t i = 0; i < k; i++) {
            unsigned char c = block[i];
            if (c == '\n') {
                if (!cr)
                    lines++;
                cr = 0;
            } else if (c == '\r') {
                lines++;
                cr = 1;
            } else {
                cr = 0;
            }
        }
        at += k;
    }
    return lines;
}

/* The length of the UTF-8 sequence at s (avail bytes readable): > 0 when
 * valid, 0 when valid so far but cut off, < 0 when invalid; *why says how. */
static int utf8_len(const unsigned char *s, size_t avail, const char **why)
{
    unsigned c = s[0];
    int n;
    unsigned lo = 0x80, hi = 0xBF; /* the range of the second byte */
    if (c < 0x80)
        return 1;
    if (c < 0xC2) {
        *why = "invalid start byte";
        return -1;
    } else if (c < 0xE0) {
        n = 2;
    } else if (c < 0xF0) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (c < 0xF5) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        *why = "invalid start byte";
        return -1;
    }
    for (int i = 1; i < n; i++) {
        if ((size_t)i >= avail)
            return 0;
        unsigned b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) {
            *why = "invalid continuation byte";
            return -1;
        }
    }
    return n;
}

int64_t moe_text_line_number(moe_text_reader *r)
{
    if (r->base < 0)
        r->base = r->begin > 0 ? lines_before(r->fd, r->begin) : 0;
    return r->base + r->lineno;
}

static moe_status utf8_error(moe_text_reader *r, size_t at, const char *why)
{
    int64_t off = r->buf_off + (int64_t)at;
    int64_t line = moe_text_line_number(r) + 1;
    return moe_data_fail(MOE_ERR_INVALID_ARG,
                         "'%s' line %lld: invalid UTF-8 at byte offset %lld of the file (byte 0x%02x: %s); the text "
                         "must be UTF-8: convert it (e.g. iconv -f latin1 -t utf-8) or remove the bad bytes",
                         r->path, (long long)line, (long long)off, r->buf[at], why);
}

/* Moves the pending line to the front of buf (growing it when the line fills
 * it) and reads more of the range. */
static moe_status refill(moe_text_reader *r)
{
    if (r->pos > 0) {
        size_t keep = r->fill - r->pos;
        memmove(r->buf, r->buf + r->pos, keep);
        r->buf_off += (int64_t)r->pos;
        r->scan -= r->pos;
        r->fill = keep;
        r->pos = 0;
    }
    if (r->fill == r->cap) {
        size_t cap = r->cap * 2;
        unsigned char *b = realloc(r->buf, cap);
        if (!b)
            return nomem("reading a long line");
        r->buf = b;
        r->cap = cap;
    }
    size_t want = r->cap - r->fill;
    if (r->next >= r->end)
        want = 0;
    else if ((int64_t)want > r->end - r->next)
        want = (size_t)(r->end - r->next);
    ssize_t k = moe_data_pread(r->fd, r->buf + r->fill, want, r->next);
    if (k < 0)
        return moe_data_fail(MOE_ERR_IO, "cannot read '%s' at byte %lld: %s", r->path, (long long)r->next,
                             strerror(errno));
    r->fill += (size_t)k;
    r->next += k;
    if (r->next >= r->end || (size_t)k < want) /* a file cut short ends the range */
        r->at_end = 1;
    return MOE_OK;
}

#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull
#define HAS_ZERO(v) (((v) - ONES) & ~(v) & HIGHS)

moe_status moe_text_next(moe_text_reader *r, const char **line, size_t *len)
{
    *line = NULL;
    *len = 0;
    for (;;) {
        const unsigned char *b = r->buf;
        size_t i = r->scan, fill = r->fill;
        while (i < fill) {
            while (i + 8 <= fill) {
                uint64_t w;
                memcpy(&w, b + i, 8);
                if ((w & HIGHS) || HAS_ZERO(w ^ (ONES * '\n')) || HAS_ZERO(w ^ (ONES * '\r')))
                    break;
                i += 8;
            }
            if (i >= fill)
                break;
            unsigned c = b[i];
            if (c == '\n' || c == '\r') {
                size_t term = 1;
                if (c == '\r') {
                    if (i + 1 < fill)
                        term = b[i + 1] == '\n' ? 2 : 1;
                    else if (!r->at_end)
                        break; /* a "\n" may follow in the next read */
                }
                *line = (const char *)b + r->pos;
                *len = i - r->pos;
                r->pos = r->scan = i + term;
                r->lineno++;
                return MOE_OK;
            }
            if (c < 0x80) {
                i++;
                continue;
            }
            const char *why = "";
            int k = utf8_len(b + i, fill - i, &why);
            if (k > 0) {
                i += (size_t)k;
                continue;
            }
            if (k < 0)
                return utf8_error(r, i, why);
            if (r->at_end)
                return utf8_error(r, i, "unexpected end of data");
            break;
        }
        r->scan = i;
        if (r->at_end && r->scan == r->fill) {
            if (r->pos == r->fill)
                return MOE_OK; /* the end */
            *line = (const char *)r->buf + r->pos; /* the unterminated last line */
            *len = r->fill - r->pos;
            r->pos = r->scan = r->fill;
            r->lineno++;
            return MOE_OK;
        }
        MOE_TRY(refill(r));
    }
}

moe_status moe_text_chunks(const char *path, int n, int64_t *offsets)
{
    if (n < 1)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "moe_text_chunks: expected at least 1 chunk, found %d", n);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return moe_data_fail(MOE_ERR_IO, "cannot open '%s': %s; expected a readable text file", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return moe_data_fail(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(e));
    }
    int64_t size = (int64_t)sb.st_size, chunk = size / n;
    offsets[0] = 0;
    offsets[n] = size;
    unsigned char block[4096];
    for (int i = 1; i < n; i++) {
        int64_t at = (int64_t)i * chunk, found = size;
        if (at < offsets[i - 1])
            at = offsets[i - 1];
        while (at < size) {
            ssize_t k = moe_data_pread(fd, block, sizeof block, at);
            if (k < 0) {
                int e = errno;
                close(fd);
                return moe_data_fail(MOE_ERR_IO, "cannot read '%s' at byte %lld: %s", path, (long long)at,
                                     strerror(e));
            }
            if (k == 0)
                break;
            ssize_t j = 0;
            while (j < k && block[j] != '\n' && block[j] != '\r')
                j++;
            if (j == k) {
                at += k;
                continue;
            }
            found = at + j + 1;
            if (block[j] == '\r') { /* a "\r\n" pair stays together */
                unsigned char next;
                if (j + 1 < k)
                    next = block[j + 1];
                else if (moe_data_pread(fd, &next, 1, at + j + 1) != 1)
                    next = 0;
                if (next == '\n')
                    found++;
            }
            break;
        }
        offsets[i] = found;
    }
    close(fd);
    return MOE_OK;
}

/* ------------------------------------------------------------ whitespace */

size_t moe_text_space_len(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    unsigned c = u[0];
    if (c < 0x80)
        return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) ? 1 : 0;
    if (c == 0xC2)
        return n >= 2 && (u[1] == 0x85 || u[1] == 0xA0) ? 2 : 0;
    if (n < 3)
        return 0;
    if (c == 0xE1) /* U+1680 */
        return u[1] == 0x9A && u[2] == 0x80 ? 3 : 0;
    if (c == 0xE2) {
        if (u[1] == 0x80) /* U+2000-200A, U+2028, U+2029, U+202F */
            return u[2] <= 0x8A || u[2] == 0xA8 || u[2] == 0xA9 || u[2] == 0xAF ? 3 : 0;
        return u[1] == 0x81 && u[2] == 0x9F ? 3 : 0; /* U+205F */
    }
    if (c == 0xE3) /* U+3000 */
        return u[1] == 0x80 && u[2] == 0x80 ? 3 : 0;
    return 0;
}

/* Per byte: 0 never starts whitespace, 1 is ASCII whitespace, 2 is the lead
 * byte of a multi-byte whitespace character or of something else. */
static const unsigned char space_class[256] = {
    ['\t'] = 1, ['\n'] = 1, ['\v'] = 1, ['\f'] = 1, ['\r'] = 1, [0x1C] = 1, [0x1D] = 1, [0x1E] = 1, [0x1F] = 1,
    [' '] = 1,   [0xC2] = 2, [0xE1] = 2, [0xE2] = 2, [0xE3] = 2,
};

int moe_text_next_token(const char *s, size_t n, size_t *pos, const char **tok, size_t *tok_len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = *pos, sp;
    for (; i < n; i += sp) {
        unsigned c = space_class[u[i]];
        if (c == 0)
            break;
        sp = c == 1 ? 1 : moe_text_space_len(s + i, n - i);
        if (sp == 0)
            break;
    }
    if (i >= n) {
        *pos = n;
        return 0;
    }
    size_t start = i;
    for (;;) {
        while (i < n && space_class[u[i]] == 0)
            i++;
        if (i >= n || space_class[u[i]] == 1 || moe_text_space_len(s + i, n - i) > 0)
            break;
        i++;
    }
    *tok = s + start;
    *tok_len = i - start;
    *pos = i;
    return 1;
}

size_t moe_text_rstrip(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    while (n > 0) {
        size_t k = n - 1; /* the start of the last character */
        while (k > 0 && n - k < 4 && (u[k] & 0xC0) == 0x80)
            k--;
        if (moe_text_space_len(s + k, n - k) != n - k)
            break;
        n = k;
    }
    return n;
}

size_t moe_text_lstrip(const char *s, size_t n)
{
    size_t i = 0, sp;
    while (i < n && (sp = moe_text_space_len(s + i, n - i)) > 0)
        i += sp;
    return i;
}

void moe_text_strip(const char *s, size_t n, const char **out, size_t *out_len)
{
    size_t skip = moe_text_lstrip(s, n);
    *out = s + skip;
    *out_len = moe_text_rstrip(s + skip, n - skip);
}
