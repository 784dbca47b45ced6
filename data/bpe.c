/* bpe.c: GPT-2 byte-level BPE (data/bpe.h, DATA_SPEC.md §4).
 *
 * Pipeline of one encode: validate UTF-8 -> pre-tokenize with the regex ->
 * per piece: the per-state cache, else bytes -> byte-char ids -> merges by rank
 * -> ids. Decoding maps each id's token chars back to bytes and repairs the
 * UTF-8 as Python's errors="replace" does.
 *
 * What it deliberately is not: a general Hugging Face tokenizer. Only what
 * fairseq's gpt2_bpe_utils.Encoder does, plus the tokenizer.json shapes that
 * describe the same BPE. added_tokens, post_processor and decoder are not read
 * (fairseq has no special-token step, and decoding here is always ByteLevel);
 * a normalizer is refused; unk_token is ignored (a byte whose char has no id
 * is an encode error, as fairseq's KeyError is, where Hugging Face would drop it
 * or emit unk).
 *
 * Conventions a reader would trip over:
 *  - Symbols are vocabulary ids. Every merge (a, b) must have a, b and a+b in
 *    the vocabulary (checked at load, as Hugging Face does), so a pair of ids
 *    identifies a pair of strings and the merged string's id stands for the
 *    merged symbol. The merge table maps (left id, right id) -> (rank, merged
 *    id); ranks are unique per pair (a later duplicate line overwrites).
 *  - The merge loop is fairseq's (Encoder.bpe), not Hugging Face's heap: pick
 *    the lowest-ranked pair among the adjacent pairs, merge every
 *    non-overlapping occurrence left to right, repeat. Short pieces use arrays;
 *    long ones a heap of (rank, position) that merges a whole rank at a time,
 *    which gives the same result in O(n log n).
 *  - "\s" in the GPT-2 pattern is Unicode White_Space (25 code points) written
 *    out, not PCRE2's \s (which lacks U+0085). In a tokenizer.json Split
 *    pattern, \s and \S are rewritten the same way (Hugging Face runs it with
 *    Oniguruma, whose \s is White_Space); \S inside a [...] class is refused.
 *  - \p{L} and \p{N} come from PCRE2's Unicode tables: PCRE2 10.42 (Debian 12)
 *    carries Unicode 14.0.0. The Python `regex` module that fairseq uses ships
 *    its own tables and follows new Unicode releases (regex 2026.5.9 has
 *    17.0.0: Sidetic U+10940 is a letter there). Code points assigned after
 *    14.0 (Kawi, CJK extension I, Garay, ...) are letters or digits there and
 *    "other" here, so text containing them may split differently; for code
 *    points assigned by 14.0 the splits agree. Pin the `regex` version on the
 *    Python side when ids must match bit for bit.
 *  - Pre-tokenization is "split, keeping matches and the text between them"
 *    (Hugging Face's Isolated). For the GPT-2 pattern nothing lies between
 *    matches, so this is also Python's findall. An empty match is skipped and
 *    the search resumes one code point later.
 *  - Token strings live in one arena, NUL-terminated; per id the UTF-8 token
 *    and its raw bytes (the chars mapped back through the byte map).
 */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "data/bpe.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/error.h"

/* Ids are int32; the id space is allocated densely, so bound it. */
#define BPE_MAX_ID ((int64_t)1 << 26)
/* Pieces of at most this many bytes use the array merge loop. */
#define BPE_SMALL_MAX 64
/* The per-state cache: pieces up to CACHE_KEY_MAX bytes. */
#define CACHE_SLOTS (1u << 16)
#define CACHE_MAX_ENTRIES (CACHE_SLOTS / 2)
#define CACHE_KEY_MAX 128
#define CACHE_KEY_BYTES (1u << 20)
#define CACHE_ID_COUNT (1u << 18)

#define NO_TOKEN UINT32_MAX       /* tok_len of an id without a token */
#define NOT_BYTE_LEVEL UINT32_MAX /* raw_len of a token with a char outside the byte map */
#define PAIR_EMPTY UINT64_MAX

enum { PREFIX_NONE, PREFIX_TEXT, PREFIX_PIECE };

/* Unicode White_Space, the \s of the Python `regex` module and Oniguruma. */
#define WS_CLASS                                                                                  \
    "\\t\\n\\x0B\\f\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}" \
    "\\x{205F}\\x{3000}"

static const char gpt2_pattern[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS_CLASS
                                   "\\p{L}\\p{N}]+|[" WS_CLASS "]+(?![^" WS_CLASS "])|[" WS_CLASS "]+";

typedef struct str_entry { /* open-addressing entry: key bytes in an arena */
    uint32_t hash;
    int32_t id; /* -1: empty */
    uint32_t off;
    uint32_t len;
} str_entry;

typedef struct pair_entry {
    uint64_t key; /* left << 32 | right; PAIR_EMPTY when free */
    int32_t rank;
    int32_t merged;
} pair_entry;

struct moe_bpe {
    int64_t n_ids; /* largest id + 1 */
    int64_t n_tokens;
    char *tok; /* UTF-8 token strings, NUL-terminated */
    size_t tok_len_total;
    uint32_t *tok_off, *tok_len;
    uint8_t *raw; /* raw bytes of each byte-level token */
    uint32_t *raw_off, *raw_len;
    str_entry *vocab_tab; /* token string -> id */
    uint64_t vocab_mask;
    str_entry *raw_tab; /* raw bytes -> id (ignore_merges only) */
    uint64_t raw_mask;
    pair_entry *pairs;
    uint64_t pair_mask;
    int64_t n_merges;
    int32_t byte_id[256]; /* id of each byte's single char, -1 if none */
    pcre2_code *re;       /* NULL: no splitting */
    int jit;
    int prefix;
    int ignore_merges;
};

typedef struct cache_slot {
    uint64_t hash;
    uint32_t key_off;
    uint32_t ids_off;
    uint16_t key_len; /* 0: empty */
    uint16_t n_ids;
} cache_slot;

typedef struct heap_ent {
    int32_t rank, pos, left, right, merged;
} heap_ent;

struct moe_bpe_state {
    const moe_bpe *b;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jstack;
    PCRE2_SIZE *ov;
    cache_slot *slots;
    uint32_t n_entries;
    uint8_t *ckeys;
    uint32_t ckeys_used;
    int32_t *cids;
    uint32_t cids_used;
    /* scratch: the prefixed text or piece, and the long-piece merge arrays */
    uint8_t *buf;
    size_t buf_cap;
    int32_t *lsym, *lnxt, *lprv, *lgather;
    heap_ent *heap;
    size_t long_cap;
};

/* ------------------------------------------------------------ byte map */

uint32_t moe_bpe_byte_to_char(uint8_t b)
{
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)
        return b;
    /* the other 68 bytes in increasing order from U+0100 */
    if (b <= 0x20)
        return 0x100u + b;
    if (b <= 0xA0)
        return 0x100u + 33u + (uint32_t)(b - 0x7F);
    return 0x143u; /* 0xAD */
}

int moe_bpe_char_to_byte(uint32_t cp)
{
    if (cp < 0x100)
        return moe_bpe_byte_to_char((uint8_t)cp) == cp ? (int)cp : -1;
    if (cp > 0x143)
        return -1;
    uint32_t k = cp - 0x100;
    if (k <= 32)
        return (int)k;
    if (k <= 66)
        return (int)(0x7F + (k - 33));
    return 0xAD;
}

/* ------------------------------------------------------------ UTF-8 */

/* Offset of the first byte that does not start a well-formed UTF-8 sequence
 * (strict: no overlongs, surrogates or code points above U+10FFFF); n if all
 * of s is well-formed. */
static size_t utf8_valid_prefix(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (n - i >= 8) {
            uint64_t v;
            memcpy(&v, s + i, 8);
            if (!(v & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0)
                lo = 0xA0;
            if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0)
                lo = 0x90;
            if (c == 0xF4)
                hi = 0x8F;
        } else
            return i;
        if (n - i - 1 < need || s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return i;
        i += need + 1;
    }
    return n;
}

/* Decodes the code point at s (well-formed UTF-8, at least one byte). */
static uint32_t utf8_next(const uint8_t *s, size_t *adv)
{
    uint8_t c = s[0];
    if (c < 0x80) {
        *adv = 1;
        return c;
    }
    if (c < 0xE0) {
        *adv = 2;
        return ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
    }
    if (c < 0xF0) {
        *adv = 3;
        return ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    }
    *adv = 4;
    return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) |
           (s[3] & 0x3F);
}

static size_t utf8_put(uint8_t *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t)(0xC0 | (cp >> 6));
        o[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xE0 | (cp >> 12));
        o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | (cp >> 18));
    o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* Python's str.isspace() (29 code points): what str.split() splits on when
 * fairseq reads vocab.bpe. Returns the byte length of the char at s if it is
 * one, else 0. */
static size_t py_space_at(const uint8_t *s, const uint8_t *end)
{
    uint8_t c = s[0];
    if ((c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20))
        return 1;
    if (c < 0x80)
        return 0;
    size_t adv;
    uint32_t cp = utf8_next(s, &adv);
    if ((size_t)(end - s) < adv)
        return 0;
    if (cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
        cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000)
        return adv;
    return 0;
}

/* ------------------------------------------------------------ hashing */

static inline uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static inline uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xbf58476d1ce4e5b9ull);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0x94d049bb133111ebull;
        h ^= h >> 31;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t v = 0;
        for (size_t i = 0; i < n; i++)
            v |= (uint64_t)p[i] << (8 * i);
        h = (h ^ v) * 0x94d049bb133111ebull;
    }
    return mix64(h);
}

static uint64_t table_size_for(uint64_t n)
{
    uint64_t cap = 16;
    while (cap < 2 * n + 2)
        cap <<= 1;
    return cap;
}

static int32_t str_find(const str_entry *tab, uint64_t mask, const char *arena, const void *key, size_t len)
{
    uint64_t h = hash_bytes(key, len);
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        const str_entry *e = &tab[i];
        if (e->id < 0)
            return -1;
        if (e->hash == (uint32_t)h && e->len == len && memcmp(arena + e->off, key, len) == 0)
            return e->id;
    }
}

/* Inserts or overwrites (the table has room: sized for every key). */
static void str_put(str_entry *tab, uint64_t mask, const char *arena, uint32_t off, uint32_t len, int32_t id)
{
    uint64_t h = hash_bytes((const uint8_t *)arena + off, len);
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        str_entry *e = &tab[i];
        if (e->id < 0 || (e->hash == (uint32_t)h && e->len == len && memcmp(arena + e->off, arena + off, len) == 0)) {
            e->hash = (uint32_t)h;
            e->id = id;
            e->off = off;
            e->len = len;
            return;
        }
    }
}

static str_entry *str_table_new(uint64_t n, uint64_t *mask)
{
    uint64_t cap = table_size_for(n);
    str_entry *t = malloc(cap * sizeof *t);
    if (!t)
        return NULL;
    for (uint64_t i = 0; i < cap; i++)
        t[i].id = -1;
    *mask = cap - 1;
    return t;
}

static inline uint64_t pair_key(int32_t l, int32_t r) { return ((uint64_t)(uint32_t)l << 32) | (uint32_t)r; }

static inline int32_t pair_find(const moe_bpe *b, int32_t l, int32_t r, int32_t *merged)
{
    uint64_t key = pair_key(l, r);
    for (uint64_t i = mix64(key) & b->pair_mask;; i = (i + 1) & b->pair_mask) {
        const pair_entry *e = &b->pairs[i];
        if (e->key == key) {
            *merged = e->merged;
            return e->rank;
        }
        if (e->key == PAIR_EMPTY)
            return INT32_MAX;
    }
}

static void pair_put(moe_bpe *b, int32_t l, int32_t r, int32_t rank, int32_t merged)
{
    uint64_t key = pair_key(l, r);
    for (uint64_t i = mix64(key) & b->pair_mask;; i = (i + 1) & b->pair_mask) {
        pair_entry *e = &b->pairs[i];
        if (e->key == PAIR_EMPTY || e->key == key) {
            if (e->key == PAIR_EMPTY)
                b->n_merges++;
            e->key = key;
            e->rank = rank;
            e->merged = merged;
            return;
        }
    }
}

/* ------------------------------------------------------------ files */

static moe_status read_file(const char *path, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return moe_data_fail(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        fclose(f);
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory reading %s", path);
    }
    for (;;) {
        if (n == cap) {
            char *nb = cap > SIZE_MAX / 4 ? NULL : realloc(buf, 2 * cap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return moe_data_fail(MOE_ERR_NOMEM, "out of memory reading %s (%zu bytes so far)", path, n);
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                int e = errno;
                free(buf);
                fclose(f);
                return moe_data_fail(MOE_ERR_IO, "cannot read %s: %s", path, strerror(e));
            }
            break;
        }
    }
    fclose(f);
    if (n >= UINT32_MAX) {
        free(buf);
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s is %zu bytes; vocabulary files above 4 GiB are not supported",
                             path, n);
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return MOE_OK;
}

static moe_status load_json(const char *path, json_t **out)
{
    char *text;
    size_t len;
    *out = NULL;
    MOE_TRY(read_file(path, &text, &len));
    json_error_t err;
    json_t *j = json_loadb(text, len, 0, &err);
    free(text);
    if (!j)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: invalid JSON at line %d, column %d: %s", path, err.line,
                             err.column, err.text);
    *out = j;
    return MOE_OK;
}

/* ------------------------------------------------------------ building */

static moe_bpe *bpe_new(void)
{
    moe_bpe *b = calloc(1, sizeof *b);
    if (b)
        for (int i = 0; i < 256; i++)
            b->byte_id[i] = -1;
    return b;
}

/* vocab: a JSON object token -> id. `what` names it in messages
 * ("encoder.json path" or "path: model.vocab"). */
static moe_status load_vocab(moe_bpe *b, json_t *vocab, const char *what)
{
    if (!json_is_object(vocab))
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: expected a JSON object from token string to id", what);
    size_t n = json_object_size(vocab);
    if (n == 0)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: the vocabulary is empty", what);
    const char *key;
    json_t *val;
    int64_t max_id = -1;
    size_t bytes = 0;
    json_object_foreach(vocab, key, val)
    {
        if (!json_is_integer(val))
            return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: the id of token \"%s\" is not an integer", what, key);
        json_int_t id = json_integer_value(val);
        if (id < 0 || id >= BPE_MAX_ID)
            return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: token \"%s\" has id %lld; ids must lie in [0, %lld)",
                                 what, key, (long long)id, (long long)BPE_MAX_ID);
        if (id > max_id)
            max_id = id;
        bytes += strlen(key) + 1;
    }
    b->n_ids = max_id + 1;
    b->n_tokens = (int64_t)n;
    b->tok = malloc(bytes);
    b->tok_off = malloc((size_t)b->n_ids * sizeof *b->tok_off);
    b->tok_len = malloc((size_t)b->n_ids * sizeof *b->tok_len);
    b->vocab_tab = str_table_new(n, &b->vocab_mask);
    if (!b->tok || !b->tok_off || !b->tok_len || !b->vocab_tab)
        return moe_data_fail(MOE_ERR_NOMEM, "%s: out of memory for %zu tokens", what, n);
    for (int64_t i = 0; i < b->n_ids; i++)
        b->tok_len[i] = NO_TOKEN;
    size_t off = 0;
    json_object_foreach(vocab, key, val)
    {
        size_t len = strlen(key);
        int32_t id = (int32_t)json_integer_value(val);
        memcpy(b->tok + off, key, len + 1);
        /* two tokens with one id: the later one is the id's string, as
         * fairseq's decoder dict {v: k} keeps the last */
        b->tok_off[id] = (uint32_t)off;
        b->tok_len[id] = (uint32_t)len;
        str_put(b->vocab_tab, b->vocab_mask, b->tok, (uint32_t)off, (uint32_t)len, id);
        off += len + 1;
    }
    b->tok_len_total = off;

    /* raw bytes of every byte-level token: decoding and ignore_merges */
    b->raw = malloc(off ? off : 1);
    b->raw_off = malloc((size_t)b->n_ids * sizeof *b->raw_off);
    b->raw_len = malloc((size_t)b->n_ids * sizeof *b->raw_len);
    if (!b->raw || !b->raw_off || !b->raw_len)
        return moe_data_fail(MOE_ERR_NOMEM, "%s: out of memory for %zu tokens", what, n);
    size_t roff = 0;
    for (int64_t id = 0; id < b->n_ids; id++) {
        b->raw_off[id] = (uint32_t)roff;
        b->raw_len[id] = NOT_BYTE_LEVEL;
        if (b->tok_len[id] == NO_TOKEN)
            continue;
        const uint8_t *t = (const uint8_t *)b->tok + b->tok_off[id];
        size_t tl = b->tok_len[id], k = 0, r = roff;
        int ok = 1;
        while (k < tl) {
            size_t adv;
            int byte = moe_bpe_char_to_byte(utf8_next(t + k, &adv));
            if (byte < 0) {
                ok = 0;
                break;
            }
            b->raw[r++] = (uint8_t)byte;
            k += adv;
        }
        if (ok) {
            b->raw_len[id] = (uint32_t)(r - roff);
            roff = r;
        }
    }
    for (int i = 0; i < 256; i++) {
        uint8_t u[4];
        size_t ul = utf8_put(u, moe_bpe_byte_to_char((uint8_t)i));
        b->byte_id[i] = str_find(b->vocab_tab, b->vocab_mask, b->tok, u, ul);
    }
    return MOE_OK;
}

static moe_status build_raw_table(moe_bpe *b, const char *what)
{
    b->raw_tab = str_table_new((uint64_t)b->n_tokens, &b->raw_mask);
    if (!b->raw_tab)
        return moe_data_fail(MOE_ERR_NOMEM, "%s: out of memory", what);
    for (int64_t id = 0; id < b->n_ids; id++)
        if (b->tok_len[id] != NO_TOKEN && b->raw_len[id] != NOT_BYTE_LEVEL)
            str_put(b->raw_tab, b->raw_mask, (const char *)b->raw, b->raw_off[id], b->raw_len[id], (int32_t)id);
    return MOE_OK;
}

static moe_status pairs_alloc(moe_bpe *b, uint64_t n, const char *what)
{
    uint64_t cap = table_size_for(n);
    b->pairs = malloc(cap * sizeof *b->pairs);
    if (!b->pairs)
        return moe_data_fail(MOE_ERR_NOMEM, "%s: out of memory for %llu merges", what, (unsigned long long)n);
    for (uint64_t i = 0; i < cap; i++)
        b->pairs[i].key = PAIR_EMPTY;
    b->pair_mask = cap - 1;
    return MOE_OK;
}

/* One merge rule: a, b and a+b must be tokens. `where` names the line or
 * element, `vocab_what` the vocabulary file. */
static moe_status add_merge(moe_bpe *b, const char *x, size_t xl, const char *y, size_t yl, int64_t rank,
                            const char *where, const char *vocab_what)
{
    int32_t xi = str_find(b->vocab_tab, b->vocab_mask, b->tok, x, xl);
    int32_t yi = str_find(b->vocab_tab, b->vocab_mask, b->tok, y, yl);
    const char *missing = NULL;
    size_t ml = 0;
    if (xi < 0) {
        missing = x;
        ml = xl;
    } else if (yi < 0) {
        missing = y;
        ml = yl;
    }
    int32_t zi = -1;
    char small[256];
    char *cat = small;
    if (!missing) {
        if (xl + yl > sizeof small && !(cat = malloc(xl + yl)))
            return moe_data_fail(MOE_ERR_NOMEM, "%s: out of memory", where);
        memcpy(cat, x, xl);
        memcpy(cat + xl, y, yl);
        zi = str_find(b->vocab_tab, b->vocab_mask, b->tok, cat, xl + yl);
        if (zi < 0) {
            moe_data_fail(MOE_ERR_INVALID_ARG,
                          "%s: merge \"%.*s\" + \"%.*s\" makes \"%.*s\", which is not a token of %s; the merges and "
                          "the vocabulary must come from the same tokenizer",
                          where, (int)xl, x, (int)yl, y, (int)(xl + yl), cat, vocab_what);
            if (cat != small)
                free(cat);
            return MOE_ERR_INVALID_ARG;
        }
        if (cat != small)
            free(cat);
    } else
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "%s: merge \"%.*s\" + \"%.*s\" uses \"%.*s\", which is not a token of %s; the merges and "
                             "the vocabulary must come from the same tokenizer",
                             where, (int)xl, x, (int)yl, y, (int)ml, missing, vocab_what);
    if (rank >= INT32_MAX)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: more than %d merges", where, INT32_MAX - 1);
    pair_put(b, xi, yi, (int32_t)rank, zi);
    return MOE_OK;
}

static moe_status compile_regex(moe_bpe *b, const char *pat, size_t len, uint32_t opts, const char *what)
{
    int code;
    PCRE2_SIZE at;
    /* PCRE2_LITERAL admits PCRE2_UTF but not PCRE2_UCP */
    uint32_t ucp = (opts & PCRE2_LITERAL) ? 0 : PCRE2_UCP;
    b->re = pcre2_compile((PCRE2_SPTR)pat, len, PCRE2_UTF | ucp | opts, &code, &at, NULL);
    if (!b->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: the pre-tokenizer pattern does not compile at offset %zu: %s",
                             what, (size_t)at, (const char *)msg);
    }
    /* JIT when this PCRE2 has it; pcre2_match interprets otherwise */
    b->jit = pcre2_jit_compile(b->re, PCRE2_JIT_COMPLETE) == 0;
    return MOE_OK;
}

/* ------------------------------------------------------------ fairseq files */

static moe_status parse_vocab_bpe(moe_bpe *b, const char *path, const char *vocab_path)
{
    char *text;
    size_t len;
    MOE_TRY(read_file(path, &text, &len));
    const uint8_t *s = (const uint8_t *)text;
    size_t bad = utf8_valid_prefix(s, len);
    if (bad < len) {
        size_t line = 1;
        for (size_t i = 0; i < bad; i++)
            line += s[i] == '\n' || (s[i] == '\r' && !(i + 1 < len && s[i + 1] == '\n'));
        unsigned byte = s[bad];
        free(text);
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s:%zu: not valid UTF-8 (byte 0x%02X at offset %zu)", path, line,
                             byte, bad);
    }
    /* Python reads with universal newlines (\r\n and \r become \n) and then
     * splits on \n: count the elements, drop the first and the last. */
    size_t n_elems = 1;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '\n' || (s[i] == '\r' && !(i + 1 < len && s[i + 1] == '\n')))
            n_elems++;
    size_t n_merges = n_elems >= 2 ? n_elems - 2 : 0;
    moe_status st = pairs_alloc(b, n_merges, path);
    size_t elem = 0, i = 0;
    char where[64 + 4096];
    while (st == MOE_OK && i <= len) {
        size_t start = i;
        while (i < len && s[i] != '\n' && s[i] != '\r')
            i++;
        size_t end = i;
        if (i < len && s[i] == '\r' && i + 1 < len && s[i + 1] == '\n')
            i++;
        i++; /* past the line break, or past len at the end */
        size_t this_elem = elem++;
        if (this_elem == 0 || this_elem == n_elems - 1)
            continue;
        /* str.split(): fields separated by runs of Python whitespace */
        const uint8_t *fs[3];
        size_t fl[3];
        int nf = 0;
        size_t k = start;
        while (k < end) {
            size_t w = py_space_at(s + k, s + end);
            if (w) {
                k += w;
                continue;
            }
            size_t f0 = k;
            while (k < end && !py_space_at(s + k, s + end)) {
                size_t adv;
                utf8_next(s + k, &adv);
                k += adv;
            }
            if (nf < 3) {
                fs[nf] = s + f0;
                fl[nf] = k - f0;
            }
            nf++;
        }
        snprintf(where, sizeof where, "%s:%zu", path, this_elem + 1);
        if (nf == 0)
            continue; /* an empty tuple in fairseq: takes a rank, never matches */
        if (nf != 2) {
            st = moe_data_fail(MOE_ERR_INVALID_ARG,
                               "%s: expected a merge of two tokens separated by whitespace, found %d field%s: \"%.*s\"",
                               where, nf, nf == 1 ? "" : "s", (int)(end - start > 200 ? 200 : end - start),
                               text + start);
            break;
        }
        st = add_merge(b, (const char *)fs[0], fl[0], (const char *)fs[1], fl[1], (int64_t)this_elem - 1, where,
                       vocab_path);
    }
    free(text);
    return st;
}

moe_status moe_bpe_load_gpt2(const char *encoder_json, const char *vocab_bpe, moe_bpe **out)
{
    *out = NULL;
    moe_bpe *b = bpe_new();
    if (!b)
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory loading %s", encoder_json);
    json_t *vocab = NULL;
    moe_status st;
    MOE_TRY_GOTO(st, load_json(encoder_json, &vocab), fail);
    MOE_TRY_GOTO(st, load_vocab(b, vocab, encoder_json), fail);
    MOE_TRY_GOTO(st, parse_vocab_bpe(b, vocab_bpe, encoder_json), fail);
    MOE_TRY_GOTO(st, compile_regex(b, gpt2_pattern, sizeof gpt2_pattern - 1, 0, encoder_json), fail);
    json_decref(vocab);
    *out = b;
    return MOE_OK;
fail:
    json_decref(vocab);
    moe_bpe_destroy(b);
    return st;
}

/* ------------------------------------------------------------ tokenizer.json */

/* A Split pattern for PCRE2: \s and \S as Unicode White_Space (Oniguruma's
 * meaning) instead of PCRE2's; the rest is passed through. */
static moe_status rewrite_split_pattern(const char *pat, size_t n, char **out, size_t *out_len, const char *what)
{
    static const char ws[] = WS_CLASS;
    size_t cap = n * (sizeof ws + 4) + 1, o = 0;
    char *r = malloc(cap);
    if (!r)
        return moe_data_fail(MOE_ERR_NOMEM, "%s: out of memory", what);
    int in_class = 0;
    size_t class_start = 0;
    for (size_t i = 0; i < n;) {
        char c = pat[i];
        if (c == '\\' && i + 1 < n) {
            char d = pat[i + 1];
            if (d == 's' || d == 'S') {
                const char *pre = in_class ? "" : (d == 's' ? "[" : "[^");
                if (in_class && d == 'S') {
                    free(r);
                    return moe_data_fail(MOE_ERR_UNSUPPORTED,
                                         "%s: \\S inside a [...] class at offset %zu is not supported (PCRE2's \\s is "
                                         "not Unicode White_Space and a negated set cannot be written into a class); "
                                         "rewrite the pattern without it",
                                         what, i);
                }
                o += (size_t)sprintf(r + o, "%s%s%s", pre, ws, in_class ? "" : "]");
                i += 2;
                continue;
            }
            if (d == 'Q') { /* \Q...\E is literal text: copy it untouched */
                size_t e = i + 2;
                while (e < n && !(pat[e] == '\\' && e + 1 < n && pat[e + 1] == 'E'))
                    e++;
                e = e < n ? e + 2 : n;
                memcpy(r + o, pat + i, e - i);
                o += e - i;
                i = e;
                continue;
            }
            r[o++] = c;
            r[o++] = d;
            i += 2;
            continue;
        }
        if (!in_class && c == '[') {
            in_class = 1;
            r[o++] = c;
            i++;
            if (i < n && pat[i] == '^')
                r[o++] = pat[i++];
            class_start = i;
            continue;
        }
        if (in_class && c == '[' && i + 1 < n && pat[i + 1] == ':') { /* [:alpha:] */
            const char *e = strstr(pat + i + 2, ":]");
            size_t stop = e ? (size_t)(e - pat) + 2 : n;
            memcpy(r + o, pat + i, stop - i);
            o += stop - i;
            i = stop;
            continue;
        }
        if (in_class && c == ']' && i != class_start)
            in_class = 0;
        r[o++] = c;
        i++;
    }
    r[o] = '\0';
    *out = r;
    *out_len = o;
    return MOE_OK;
}

static const char *json_type_name(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* A boolean field: absent -> dflt (or an error when dflt < 0). */
static moe_status get_bool(const json_t *obj, const char *key, int dflt, int *out, const char *path,
                           const char *field)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (dflt < 0)
            return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: %s.%s is missing; expected true or false", path, field,
                                 key);
        *out = dflt;
        return MOE_OK;
    }
    if (!json_is_boolean(v))
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: %s.%s is %s; expected true or false", path, field, key,
                             json_type_name(v));
    *out = json_is_true(v);
    return MOE_OK;
}

static const char *get_type(const json_t *obj)
{
    json_t *t = json_object_get(obj, "type");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

static moe_status parse_byte_level(const json_t *bl, const char *path, const char *field, int *aps, int *use_regex)
{
    MOE_TRY(get_bool(bl, "add_prefix_space", -1, aps, path, field));
    return get_bool(bl, "use_regex", 1, use_regex, path, field);
}

static moe_status parse_pre_tokenizer(moe_bpe *b, const json_t *root, const char *path)
{
    const json_t *pt = json_object_get(root, "pre_tokenizer");
    static const char want[] = "a GPT-2 byte-level BPE needs ByteLevel, or Sequence [Split (Isolated), ByteLevel "
                               "(use_regex false)]";
    if (!json_is_object(pt))
        return moe_data_fail(MOE_ERR_UNSUPPORTED, "%s: pre_tokenizer is %s; %s", path,
                             pt ? json_type_name(pt) : "missing", want);
    const char *type = get_type(pt);
    int aps = 0, use_regex = 1;
    if (type && strcmp(type, "ByteLevel") == 0) {
        MOE_TRY(parse_byte_level(pt, path, "pre_tokenizer", &aps, &use_regex));
        b->prefix = aps ? PREFIX_TEXT : PREFIX_NONE;
        return use_regex ? compile_regex(b, gpt2_pattern, sizeof gpt2_pattern - 1, 0, path) : MOE_OK;
    }
    if (!type || strcmp(type, "Sequence") != 0)
        return moe_data_fail(MOE_ERR_UNSUPPORTED, "%s: pre_tokenizer.type is \"%s\"; %s", path,
                             type ? type : "(none)", want);
    const json_t *seq = json_object_get(pt, "pretokenizers");
    if (!json_is_array(seq))
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: pre_tokenizer.pretokenizers is %s; expected an array", path,
                             seq ? json_type_name(seq) : "missing");
    size_t n = json_array_size(seq);
    const json_t *last = n ? json_array_get(seq, n - 1) : NULL;
    const char *last_type = last && json_is_object(last) ? get_type(last) : NULL;
    if (n == 0 || n > 2 || !last_type || strcmp(last_type, "ByteLevel") != 0)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "%s: pre_tokenizer is a Sequence of %zu pre-tokenizers ending in %s; %s", path, n,
                             last_type ? last_type : "(none)", want);
    char field[64];
    snprintf(field, sizeof field, "pre_tokenizer.pretokenizers[%zu]", n - 1);
    MOE_TRY(parse_byte_level(last, path, field, &aps, &use_regex));
    if (n == 1) {
        b->prefix = aps ? PREFIX_TEXT : PREFIX_NONE;
        return use_regex ? compile_regex(b, gpt2_pattern, sizeof gpt2_pattern - 1, 0, path) : MOE_OK;
    }
    const json_t *sp = json_array_get(seq, 0);
    const char *sp_type = json_is_object(sp) ? get_type(sp) : NULL;
    if (!sp_type || strcmp(sp_type, "Split") != 0)
        return moe_data_fail(MOE_ERR_UNSUPPORTED, "%s: pre_tokenizer.pretokenizers[0].type is \"%s\"; %s", path,
                             sp_type ? sp_type : "(none)", want);
    if (use_regex)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "%s: pre_tokenizer.pretokenizers[1].use_regex is true: a GPT-2 regex split after the "
                             "Split is not supported; expected false",
                             path);
    const json_t *beh = json_object_get(sp, "behavior");
    if (!json_is_string(beh) || strcmp(json_string_value(beh), "Isolated") != 0)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "%s: pre_tokenizer.pretokenizers[0].behavior is %s%s%s; only \"Isolated\" is supported",
                             path, json_is_string(beh) ? "\"" : "",
                             json_is_string(beh) ? json_string_value(beh) : (beh ? json_type_name(beh) : "missing"),
                             json_is_string(beh) ? "\"" : "");
    int invert = 0;
    MOE_TRY(get_bool(sp, "invert", 0, &invert, path, "pre_tokenizer.pretokenizers[0]"));
    if (invert)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "%s: pre_tokenizer.pretokenizers[0].invert is true; only false is supported", path);
    const json_t *pat = json_object_get(sp, "pattern");
    const json_t *re = json_is_object(pat) ? json_object_get(pat, "Regex") : NULL;
    const json_t *lit = json_is_object(pat) ? json_object_get(pat, "String") : NULL;
    if (json_is_string(re)) {
        char *rw = NULL;
        size_t rl = 0;
        MOE_TRY(rewrite_split_pattern(json_string_value(re), json_string_length(re), &rw, &rl, path));
        /* Oniguruma's Ruby syntax: ^ and $ match at line breaks */
        moe_status st = compile_regex(b, rw, rl, PCRE2_MULTILINE, path);
        free(rw);
        MOE_TRY(st);
    } else if (json_is_string(lit)) {
        if (json_string_length(lit) == 0)
            return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: pre_tokenizer.pretokenizers[0].pattern.String is empty",
                                 path);
        MOE_TRY(compile_regex(b, json_string_value(lit), json_string_length(lit), PCRE2_LITERAL, path));
    } else
        return moe_data_fail(MOE_ERR_INVALID_ARG,
                             "%s: pre_tokenizer.pretokenizers[0].pattern must be {\"Regex\": \"...\"} or "
                             "{\"String\": \"...\"}",
                             path);
    b->prefix = aps ? PREFIX_PIECE : PREFIX_NONE;
    return MOE_OK;
}

static moe_status parse_merges(moe_bpe *b, const json_t *merges, const char *path, const char *vocab_what)
{
    if (!json_is_array(merges))
        return moe_data_fail(MOE_ERR_INVALID_ARG, "%s: model.merges is %s; expected an array", path,
                             merges ? json_type_name(merges) : "missing");
    size_t n = json_array_size(merges);
    MOE_TRY(pairs_alloc(b, n, path));
    int64_t rank = 0;
    char where[96];
    for (size_t i = 0; i < n; i++) {
        const json_t *m = json_array_get(merges, i);
        snprintf(where, sizeof where, "%s: model.merges[%zu]", path, i);
        const char *x, *y;
        size_t xl, yl;
        if (json_is_string(m)) {
            /* legacy "a b": exactly one U+0020; #version lines take no rank */
            const char *s = json_string_value(m);
            size_t sl = json_string_length(m);
            if (sl >= 8 && memcmp(s, "#version", 8) == 0)
                continue;
            const char *sp = memchr(s, ' ', sl);
            if (!sp || memchr(sp + 1, ' ', sl - (size_t)(sp - s) - 1))
                return moe_data_fail(MOE_ERR_INVALID_ARG,
                                     "%s is \"%s\"; expected two tokens separated by a single space", where, s);
            x = s;
            xl = (size_t)(sp - s);
            y = sp + 1;
            yl = sl - xl - 1;
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            x = json_string_value(json_array_get(m, 0));
            xl = json_string_length(json_array_get(m, 0));
            y = json_string_value(json_array_get(m, 1));
            yl = json_string_length(json_array_get(m, 1));
        } else
            return moe_data_fail(MOE_ERR_INVALID_ARG,
                                 "%s is %s; expected \"a b\" or an array of two strings [\"a\", \"b\"]", where,
                                 json_is_array(m) ? "an array that is not two strings" : json_type_name(m));
        MOE_TRY(add_merge(b, x, xl, y, yl, rank, where, vocab_what));
        rank++;
    }
    return MOE_OK;
}

static moe_status check_model(moe_bpe *b, const json_t *model, const char *path)
{
    const char *type = get_type(model);
    const json_t *t = json_object_get(model, "type");
    if (t && (!type || strcmp(type, "BPE") != 0))
        return moe_data_fail(MOE_ERR_UNSUPPORTED, "%s: model.type is \"%s\"; only BPE is supported", path,
                             type ? type : json_type_name(t));
    const json_t *d = json_object_get(model, "dropout");
    if (d && !json_is_null(d) && !(json_is_number(d) && json_number_value(d) == 0.0))
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "%s: model.dropout is %s; BPE dropout is random and fairseq's encoder has none: expected "
                             "null",
                             path, json_is_number(d) ? "a non-zero number" : json_type_name(d));
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const json_t *a = json_object_get(model, affixes[i]);
        if (a && !json_is_null(a) && !(json_is_string(a) && json_string_length(a) == 0))
            return moe_data_fail(MOE_ERR_UNSUPPORTED,
                                 "%s: model.%s is %s%s%s; GPT-2 BPE has none: expected null", path, affixes[i],
                                 json_is_string(a) ? "\"" : "", json_is_string(a) ? json_string_value(a)
                                                                                  : json_type_name(a),
                                 json_is_string(a) ? "\"" : "");
    }
    int fallback = 0;
    MOE_TRY(get_bool(model, "byte_fallback", 0, &fallback, path, "model"));
    if (fallback)
        return moe_data_fail(MOE_ERR_UNSUPPORTED,
                             "%s: model.byte_fallback is true (SentencePiece-style <0xNN> tokens); GPT-2 BPE maps "
                             "bytes to chars instead: expected false",
                             path);
    return get_bool(model, "ignore_merges", 0, &b->ignore_merges, path, "model");
}

moe_status moe_bpe_load_tokenizer_json(const char *path, moe_bpe **out)
{
    *out = NULL;
    moe_bpe *b = bpe_new();
    if (!b)
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory loading %s", path);
    json_t *root = NULL;
    moe_status st;
    char vocab_what[4096 + 16];
    snprintf(vocab_what, sizeof vocab_what, "%s: model.vocab", path);
    MOE_TRY_GOTO(st, load_json(path, &root), fail);
    if (!json_is_object(root)) {
        st = moe_data_fail(MOE_ERR_INVALID_ARG, "%s: expected a JSON object at the top level, found %s", path,
                           json_type_name(root));
        goto fail;
    }
    const json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) {
        st = moe_data_fail(MOE_ERR_INVALID_ARG, "%s: model is %s; expected an object", path,
                           model ? json_type_name(model) : "missing");
        goto fail;
    }
    const json_t *norm = json_object_get(root, "normalizer");
    if (norm && !json_is_null(norm)) {
        const char *nt = json_is_object(norm) ? get_type(norm) : NULL;
        st = moe_data_fail(MOE_ERR_UNSUPPORTED,
                           "%s: normalizer is %s%s%s; fairseq's GPT-2 encoder does not normalize: expected null", path,
                           nt ? "\"" : "", nt ? nt : json_type_name(norm), nt ? "\"" : "");
        goto fail;
    }
    MOE_TRY_GOTO(st, check_model(b, model, path), fail);
    MOE_TRY_GOTO(st, load_vocab(b, json_object_get(model, "vocab"), vocab_what), fail);
    MOE_TRY_GOTO(st, parse_merges(b, json_object_get(model, "merges"), path, vocab_what), fail);
    MOE_TRY_GOTO(st, parse_pre_tokenizer(b, root, path), fail);
    if (b->ignore_merges)
        MOE_TRY_GOTO(st, build_raw_table(b, path), fail);
    json_decref(root);
    *out = b;
    return MOE_OK;
fail:
    json_decref(root);
    moe_bpe_destroy(b);
    return st;
}

void moe_bpe_destroy(moe_bpe *b)
{
    if (!b)
        return;
    free(b->tok);
    free(b->tok_off);
    free(b->tok_len);
    free(b->raw);
    free(b->raw_off);
    free(b->raw_len);
    free(b->vocab_tab);
    free(b->raw_tab);
    free(b->pairs);
    pcre2_code_free(b->re);
    free(b);
}

/* ------------------------------------------------------------ state */

moe_status moe_bpe_state_create(const moe_bpe *b, moe_bpe_state **out)
{
    *out = NULL;
    moe_bpe_state *s = calloc(1, sizeof *s);
    if (!s)
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory for a BPE state");
    s->b = b;
    s->slots = calloc(CACHE_SLOTS, sizeof *s->slots);
    s->ckeys = malloc(CACHE_KEY_BYTES);
    s->cids = malloc(CACHE_ID_COUNT * sizeof *s->cids);
    int ok = s->slots && s->ckeys && s->cids;
    if (ok && b->re) {
        s->md = pcre2_match_data_create_from_pattern(b->re, NULL);
        s->mctx = pcre2_match_context_create(NULL);
        ok = s->md && s->mctx;
        if (ok && b->jit) {
            /* patterns like \s+(?!\S) backtrack; give JIT room beyond its 32 KiB default */
            s->jstack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
            ok = s->jstack != NULL;
            if (ok)
                pcre2_jit_stack_assign(s->mctx, NULL, s->jstack);
        }
        if (ok)
            s->ov = pcre2_get_ovector_pointer(s->md);
    }
    if (!ok) {
        moe_bpe_state_destroy(s);
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory for a BPE state");
    }
    *out = s;
    return MOE_OK;
}

void moe_bpe_state_destroy(moe_bpe_state *s)
{
    if (!s)
        return;
    pcre2_match_data_free(s->md);
    pcre2_match_context_free(s->mctx);
    pcre2_jit_stack_free(s->jstack);
    free(s->slots);
    free(s->ckeys);
    free(s->cids);
    free(s->buf);
    free(s->lsym);
    free(s->lnxt);
    free(s->lprv);
    free(s->lgather);
    free(s->heap);
    free(s);
}

/* ------------------------------------------------------------ merges */

/* fairseq's loop on at most BPE_SMALL_MAX symbols, in place; returns the new
 * count. rk[i] is the rank of pair (i, i+1), carried over for pairs that a
 * pass left untouched. */
static int merge_small(const moe_bpe *b, int32_t *sym, int m)
{
    int32_t rk[BPE_SMALL_MAX], mg[BPE_SMALL_MAX];
    int32_t nsym[BPE_SMALL_MAX], nrk[BPE_SMALL_MAX], nmg[BPE_SMALL_MAX];
    int src[BPE_SMALL_MAX];
    uint8_t fresh[BPE_SMALL_MAX];
    for (int i = 0; i + 1 < m; i++)
        rk[i] = pair_find(b, sym[i], sym[i + 1], &mg[i]);
    while (m > 1) {
        int32_t best = INT32_MAX;
        for (int i = 0; i + 1 < m; i++)
            if (rk[i] < best)
                best = rk[i];
        if (best == INT32_MAX)
            break;
        int w = 0;
        for (int i = 0; i < m; w++) {
            src[w] = i;
            if (i + 1 < m && rk[i] == best) {
                nsym[w] = mg[i];
                fresh[w] = 1;
                i += 2;
            } else {
                nsym[w] = sym[i];
                fresh[w] = 0;
                i += 1;
            }
        }
        /* two untouched neighbours were neighbours before: reuse their rank */
        for (int k = 0; k + 1 < w; k++) {
            if (!fresh[k] && !fresh[k + 1]) {
                nrk[k] = rk[src[k]];
                nmg[k] = mg[src[k]];
            } else
                nrk[k] = pair_find(b, nsym[k], nsym[k + 1], &nmg[k]);
        }
        m = w;
        memcpy(sym, nsym, (size_t)m * sizeof *sym);
        if (m > 1) {
            memcpy(rk, nrk, (size_t)(m - 1) * sizeof *rk);
            memcpy(mg, nmg, (size_t)(m - 1) * sizeof *mg);
        }
    }
    return m;
}

static inline int heap_less(const heap_ent *x, const heap_ent *y)
{
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void heap_push(heap_ent *h, size_t *n, heap_ent e)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static heap_ent heap_pop(heap_ent *h, size_t *n)
{
    heap_ent top = h[0], last = h[--*n];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m)
            break;
        if (c + 1 < m && heap_less(&h[c + 1], &h[c]))
            c++;
        if (!heap_less(&h[c], &last))
            break;
        h[i] = h[c];
        i = c;
    }
    if (m)
        h[i] = last;
    return top;
}

static moe_status long_reserve(moe_bpe_state *s, size_t m)
{
    if (m <= s->long_cap)
        return MOE_OK;
    size_t cap = m + m / 2;
    int32_t *a = realloc(s->lsym, cap * sizeof *a);
    if (a)
        s->lsym = a;
    int32_t *c = a ? realloc(s->lnxt, cap * sizeof *c) : NULL;
    if (c)
        s->lnxt = c;
    int32_t *d = c ? realloc(s->lprv, cap * sizeof *d) : NULL;
    if (d)
        s->lprv = d;
    int32_t *g = d ? realloc(s->lgather, cap * sizeof *g) : NULL;
    if (g)
        s->lgather = g;
    heap_ent *h = g ? realloc(s->heap, 3 * cap * sizeof *h) : NULL;
    if (h)
        s->heap = h;
    if (!h)
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory merging a pre-token of %zu bytes", m);
    s->long_cap = cap;
    return MOE_OK;
}

/* fairseq's loop for long pieces: a heap of (rank, position) over the live
 * pairs of a linked list. All entries of the lowest rank are taken at once
 * (they are the occurrences of one pair) and merged left to right without
 * overlap, as one pass of Encoder.bpe does; the pairs a merge creates go back
 * on the heap. Stale entries are recognised by their (left, right) ids. */
static moe_status merge_long(moe_bpe_state *s, int32_t *sym_io, int64_t m, int64_t *m_out)
{
    const moe_bpe *b = s->b;
    MOE_TRY(long_reserve(s, (size_t)m));
    int32_t *sym = s->lsym, *nxt = s->lnxt, *prv = s->lprv, *gather = s->lgather;
    heap_ent *h = s->heap;
    size_t hn = 0;
    for (int64_t i = 0; i < m; i++) {
        sym[i] = sym_io[i];
        nxt[i] = i + 1 < m ? (int32_t)(i + 1) : -1;
        prv[i] = (int32_t)i - 1;
    }
    for (int64_t i = 0; i + 1 < m; i++) {
        heap_ent e = {0, (int32_t)i, sym[i], sym[i + 1], 0};
        e.rank = pair_find(b, e.left, e.right, &e.merged);
        if (e.rank != INT32_MAX)
            heap_push(h, &hn, e);
    }
#define LIVE(e) (sym[(e).pos] == (e).left && nxt[(e).pos] >= 0 && sym[nxt[(e).pos]] == (e).right)
    while (hn > 0) {
        if (!LIVE(h[0])) {
            heap_pop(h, &hn);
            continue;
        }
        heap_ent top = h[0];
        size_t ng = 0;
        while (hn > 0 && h[0].rank == top.rank) {
            heap_ent e = heap_pop(h, &hn);
            if (LIVE(e) && (ng == 0 || gather[ng - 1] != e.pos))
                gather[ng++] = e.pos;
        }
        for (size_t k = 0; k < ng; k++) {
            int32_t p = gather[k];
            if (sym[p] != top.left)
                continue; /* consumed as the right half of the previous occurrence */
            int32_t q = nxt[p];
            if (q < 0 || sym[q] != top.right)
                continue;
            sym[p] = top.merged;
            sym[q] = -1;
            nxt[p] = nxt[q];
            if (nxt[q] >= 0)
                prv[nxt[q]] = p;
            if (prv[p] >= 0) {
                heap_ent e = {0, prv[p], sym[prv[p]], sym[p], 0};
                e.rank = pair_find(b, e.left, e.right, &e.merged);
                if (e.rank != INT32_MAX)
                    heap_push(h, &hn, e);
            }
            if (nxt[p] >= 0) {
                heap_ent e = {0, p, sym[p], sym[nxt[p]], 0};
                e.rank = pair_find(b, e.left, e.right, &e.merged);
                if (e.rank != INT32_MAX)
                    heap_push(h, &hn, e);
            }
        }
    }
#undef LIVE
    int64_t w = 0;
    for (int32_t i = 0; i >= 0; i = nxt[i])
        sym_io[w++] = sym[i];
    *m_out = w;
    return MOE_OK;
}

/* ------------------------------------------------------------ encoding */

typedef struct out_ids {
    int32_t **ids;
    int64_t *n, *cap;
} out_ids;

static moe_status out_reserve(out_ids *o, int64_t more)
{
    if (*o->n + more <= *o->cap && *o->ids)
        return MOE_OK;
    int64_t cap = *o->cap > 0 ? *o->cap : 256;
    while (cap < *o->n + more)
        cap *= 2;
    int32_t *p = realloc(*o->ids, (size_t)cap * sizeof *p);
    if (!p)
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory for %lld token ids", (long long)cap);
    *o->ids = p;
    *o->cap = cap;
    return MOE_OK;
}

static void cache_clear(moe_bpe_state *s)
{
    memset(s->slots, 0, CACHE_SLOTS * sizeof *s->slots);
    s->n_entries = 0;
    s->ckeys_used = 0;
    s->cids_used = 0;
}

/* The ids of one pre-token, appended to o. */
static moe_status encode_piece(moe_bpe_state *s, const uint8_t *p, size_t len, void *ctx)
{
    out_ids *o = ctx;
    const moe_bpe *b = s->b;
    if (len == 1 && b->byte_id[p[0]] >= 0) {
        MOE_TRY(out_reserve(o, 1));
        (*o->ids)[(*o->n)++] = b->byte_id[p[0]];
        return MOE_OK;
    }
    uint64_t h = 0, slot = 0;
    int cacheable = len <= CACHE_KEY_MAX;
    if (cacheable) {
        h = hash_bytes(p, len);
        for (slot = h & (CACHE_SLOTS - 1); s->slots[slot].key_len; slot = (slot + 1) & (CACHE_SLOTS - 1)) {
            const cache_slot *c = &s->slots[slot];
            if (c->hash == h && c->key_len == len && memcmp(s->ckeys + c->key_off, p, len) == 0) {
                MOE_TRY(out_reserve(o, c->n_ids));
                memcpy(*o->ids + *o->n, s->cids + c->ids_off, (size_t)c->n_ids * sizeof(int32_t));
                *o->n += c->n_ids;
                return MOE_OK;
            }
        }
    }
    MOE_TRY(out_reserve(o, (int64_t)len));
    int32_t *sym = *o->ids + *o->n;
    int64_t m = -1;
    if (b->ignore_merges) {
        int32_t id = str_find(b->raw_tab, b->raw_mask, (const char *)b->raw, p, len);
        if (id >= 0) {
            sym[0] = id;
            m = 1;
        }
    }
    if (m < 0) {
        for (size_t i = 0; i < len; i++) {
            sym[i] = b->byte_id[p[i]];
            if (sym[i] < 0) {
                uint8_t u[4];
                size_t ul = utf8_put(u, moe_bpe_byte_to_char(p[i]));
                return moe_data_fail(MOE_ERR_INVALID_ARG,
                                     "byte 0x%02X (char \"%.*s\", U+%04X) has no id in the vocabulary; a byte-level "
                                     "vocabulary has a token for each of the 256 byte chars",
                                     p[i], (int)ul, (const char *)u, (unsigned)moe_bpe_byte_to_char(p[i]));
            }
        }
        if (len <= BPE_SMALL_MAX)
            m = merge_small(b, sym, (int)len);
        else
            MOE_TRY(merge_long(s, sym, (int64_t)len, &m));
    }
    if (cacheable) {
        if (s->n_entries >= CACHE_MAX_ENTRIES || s->ckeys_used + len > CACHE_KEY_BYTES ||
            s->cids_used + (uint64_t)m > CACHE_ID_COUNT) {
            cache_clear(s);
            slot = h & (CACHE_SLOTS - 1);
        }
        cache_slot *c = &s->slots[slot];
        c->hash = h;
        c->key_off = s->ckeys_used;
        c->key_len = (uint16_t)len;
        c->ids_off = s->cids_used;
        c->n_ids = (uint16_t)m;
        memcpy(s->ckeys + s->ckeys_used, p, len);
        memcpy(s->cids + s->cids_used, sym, (size_t)m * sizeof *sym);
        s->ckeys_used += (uint32_t)len;
        s->cids_used += (uint32_t)m;
        s->n_entries++;
    }
    *o->n += m;
    return MOE_OK;
}

typedef moe_status (*sink_fn)(moe_bpe_state *s, const uint8_t *p, size_t len, void *ctx);

static moe_status buf_reserve(moe_bpe_state *s, size_t n)
{
    if (n <= s->buf_cap)
        return MOE_OK;
    size_t cap = n + n / 2 + 64;
    uint8_t *p = realloc(s->buf, cap);
    if (!p)
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory for %zu bytes of text", n);
    s->buf = p;
    s->buf_cap = cap;
    return MOE_OK;
}

/* One piece to the sink, with ByteLevel's per-piece prefix space when the
 * pre-tokenizer is Sequence [Split, ByteLevel(add_prefix_space)]. */
static moe_status emit(moe_bpe_state *s, const uint8_t *p, size_t len, sink_fn sink, void *ctx)
{
    if (s->b->prefix == PREFIX_PIECE && p[0] != ' ') {
        MOE_TRY(buf_reserve(s, len + 1));
        s->buf[0] = ' ';
        memcpy(s->buf + 1, p, len);
        return sink(s, s->buf, len + 1, ctx);
    }
    return sink(s, p, len, ctx);
}

static moe_status split_text(moe_bpe_state *s, const uint8_t *t, size_t len, sink_fn sink, void *ctx)
{
    const moe_bpe *b = s->b;
    if (len == 0)
        return MOE_OK;
    if (b->prefix == PREFIX_TEXT && t[0] != ' ') {
        MOE_TRY(buf_reserve(s, len + 1));
        s->buf[0] = ' ';
        memcpy(s->buf + 1, t, len);
        t = s->buf;
        len++;
    }
    if (!b->re)
        return emit(s, t, len, sink, ctx);
    size_t pos = 0, last = 0;
    while (pos < len) {
        int rc = b->jit ? pcre2_jit_match(b->re, t, len, pos, 0, s->md, s->mctx)
                        : pcre2_match(b->re, t, len, pos, PCRE2_NO_UTF_CHECK, s->md, s->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return moe_data_fail(MOE_ERR_INVALID_ARG, "the pre-tokenizer regex failed at byte offset %zu: %s", pos,
                                 (const char *)msg);
        }
        size_t ms = s->ov[0], me = s->ov[1];
        if (me == ms) {
            if (ms >= len)
                break;
            size_t adv;
            utf8_next(t + ms, &adv);
            pos = ms + adv;
            continue;
        }
        if (ms > last)
            MOE_TRY(emit(s, t + last, ms - last, sink, ctx));
        MOE_TRY(emit(s, t + ms, me - ms, sink, ctx));
        last = pos = me;
    }
    if (last < len)
        MOE_TRY(emit(s, t + last, len - last, sink, ctx));
    return MOE_OK;
}

static moe_status check_utf8(const char *text, size_t len)
{
    size_t bad = utf8_valid_prefix((const uint8_t *)text, len);
    if (bad < len)
        return moe_data_fail(MOE_ERR_INVALID_ARG, "text is not valid UTF-8: byte 0x%02X at byte offset %zu",
                             (unsigned)(uint8_t)text[bad], bad);
    return MOE_OK;
}

moe_status moe_bpe_encode(moe_bpe_state *s, const char *text, size_t len, int32_t **ids, int64_t *n, int64_t *cap)
{
    *n = 0;
    MOE_TRY(check_utf8(text, len));
    out_ids o = {ids, n, cap};
    return split_text(s, (const uint8_t *)text, len, encode_piece, &o);
}

typedef struct user_sink {
    moe_bpe_piece_fn fn;
    void *arg;
} user_sink;

static moe_status call_user(moe_bpe_state *s, const uint8_t *p, size_t len, void *ctx)
{
    (void)s;
    user_sink *u = ctx;
    return u->fn((const char *)p, len, u->arg);
}

moe_status moe_bpe_pretokenize(moe_bpe_state *s, const char *text, size_t len, moe_bpe_piece_fn fn, void *arg)
{
    MOE_TRY(check_utf8(text, len));
    user_sink u = {fn, arg};
    return split_text(s, (const uint8_t *)text, len, call_user, &u);
}

/* ------------------------------------------------------------ decoding */

/* Python's bytes.decode("utf-8", errors="replace"): each maximal subpart of an
 * ill-formed sequence (Unicode §3.9, the longest prefix of a well-formed
 * sequence, or one byte) becomes one U+FFFD. out has room for 3 * n bytes. */
static size_t utf8_repair(const uint8_t *s, size_t n, uint8_t *out)
{
    size_t i = 0, o = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            out[o++] = c;
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            lo = c == 0xE0 ? 0xA0 : 0x80;
            hi = c == 0xED ? 0x9F : 0xBF;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            lo = c == 0xF0 ? 0x90 : 0x80;
            hi = c == 0xF4 ? 0x8F : 0xBF;
        } else
            need = 0;
        size_t j = i + 1;
        if (need && j < n && s[j] >= lo && s[j] <= hi) {
            j++;
            while (j < n && j - i <= need && (s[j] & 0xC0) == 0x80)
                j++;
            if (j - i == need + 1) {
                memcpy(out + o, s + i, j - i);
                o += j - i;
                i = j;
                continue;
            }
        }
        out[o++] = 0xEF;
        out[o++] = 0xBF;
        out[o++] = 0xBD;
        i = j;
    }
    return o;
}

moe_status moe_bpe_decode(const moe_bpe *b, const int32_t *ids, int64_t n, char **text, size_t *len)
{
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= b->n_ids || b->tok_len[id] == NO_TOKEN)
            return moe_data_fail(MOE_ERR_INVALID_ARG, "id %d (position %lld) is not in the vocabulary (ids 0..%lld)",
                                 id, (long long)i, (long long)b->n_ids - 1);
        if (b->raw_len[id] == NOT_BYTE_LEVEL)
            return moe_data_fail(MOE_ERR_INVALID_ARG,
                                 "id %d (position %lld) is the token \"%s\", which has a char outside the GPT-2 byte "
                                 "map and stands for no bytes",
                                 id, (long long)i, b->tok + b->tok_off[id]);
        total += b->raw_len[id];
    }
    uint8_t *raw = malloc(total ? total : 1);
    uint8_t *out = total <= (SIZE_MAX - 1) / 3 ? malloc(3 * total + 1) : NULL;
    if (!raw || !out) {
        free(raw);
        free(out);
        return moe_data_fail(MOE_ERR_NOMEM, "out of memory decoding %lld ids", (long long)n);
    }
    size_t r = 0;
    for (int64_t i = 0; i < n; i++) {
        memcpy(raw + r, b->raw + b->raw_off[ids[i]], b->raw_len[ids[i]]);
        r += b->raw_len[ids[i]];
    }
    size_t o = utf8_repair(raw, r, out);
    free(raw);
    out[o] = '\0';
    char *shrunk = realloc(out, o + 1);
    *text = shrunk ? shrunk : (char *)out;
    *len = o;
    return MOE_OK;
}

/* ------------------------------------------------------------ accessors */

int64_t moe_bpe_vocab_size(const moe_bpe *b) { return b->n_ids; }

int64_t moe_bpe_merge_count(const moe_bpe *b) { return b->n_merges; }

const char *moe_bpe_token(const moe_bpe *b, int32_t id, size_t *len)
{
    if (id < 0 || id >= b->n_ids || b->tok_len[id] == NO_TOKEN)
        return NULL;
    if (len)
        *len = b->tok_len[id];
    return b->tok + b->tok_off[id];
}

int32_t moe_bpe_token_id(const moe_bpe *b, const char *token, size_t len)
{
    return str_find(b->vocab_tab, b->vocab_mask, b->tok, token, len);
}
