/* dictionary.c: fairseq's Dictionary and a word counter (see dictionary.h).
 *
 * Both sit on one string table: symbol bytes in a pool (NUL-terminated, so a
 * symbol can be handed out as a C string), a count per entry, and an
 * open-addressing hash table (linear probing, at most half full) whose slots
 * pack the upper 32 bits of the hash with index+1, so most mismatches are
 * rejected without touching the pool. The hash is fixed (no random seed):
 * output never depends on it, only speed does.
 *
 * Deliberately not here: removing symbols (fairseq has no such operation
 * either; finalize builds a new table).
 */
#include "data/dictionary.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/error.h"
#include "data/text.h"

/* ------------------------------------------------------------ string table */

typedef struct strtab {
    char *pool;
    size_t pool_len, pool_cap;
    size_t *off;
    uint32_t *len;
    uint64_t *hash;
    int64_t *count;
    int64_t n, cap;
    uint64_t *slots; /* 0: empty; else (hash >> 32) << 32 | (index + 1) */
    size_t mask;     /* slot count - 1 (a power of two minus one) */
    size_t used;     /* filled slots */
} strtab;

#define MAX_ENTRIES 0xFFFFFFFEll

static moe_status nomem(void) { return moe_data_fail(MOE_ERR_NOMEM, "out of host memory while growing a dictionary"); }

/* 64x64 -> 128-bit multiply, folded (wyhash's mum). */
static inline uint64_t mum(uint64_t a, uint64_t b)
{
#if defined(__SIZEOF_INT128__)
    unsigned __int128 r = (unsigned __int128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
#else
    uint64_t ha = a >> 32, hb = b >> 32, la = (uint32_t)a, lb = (uint32_t)b;
    uint64_t rh = ha * hb, rm0 = ha * lb, rm1 = hb * la, rl = la * lb, t = rl + (rm0 << 32), c = t < rl;
    uint64_t lo = t + (rm1 << 32);
    c += lo < t;
    uint64_t hi = rh + (rm0 >> 32) + (rm1 >> 32) + c;
    return lo ^ hi;
#endif
}

static inline uint64_t load8(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t load4(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* wyhash's layout: words are short, so up to 16 bytes take two or four
 * overlapping loads and no loop. */
static uint64_t hash_bytes(const char *s, size_t n)
{
    const uint64_t k0 = 0xA0761D6478BD642Full, k1 = 0xE7037ED1A0B428DBull, k2 = 0x8EBC6AF09C88C6E3ull;
    const unsigned char *p = (const unsigned char *)s;
    uint64_t seed = k0, a, b;
    if (n <= 16) {
        if (n >= 4) {
            size_t q = (n >> 3) << 2;
            a = load4(p) << 32 | load4(p + q);
            b = load4(p + n - 4) << 32 | load4(p + n - 4 - q);
        } else if (n > 0) {
            a = (uint64_t)p[0] << 16 | (uint64_t)p[n >> 1] << 8 | p[n - 1];
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        size_t i = n;
        while (i > 16) {
            seed = mum(load8(p) ^ k1, load8(p + 8) ^ seed);
            p += 16;
            i -= 16;
        }
        a = load8(p + i - 16);
        b = load8(p + i - 8);
    }
    return mum(k1 ^ (uint64_t)n, mum(a ^ k1, b ^ seed ^ k2));
}

/* memcmp(a, b, n) == 0 without a call for the short strings words are. */
static inline int same_bytes(const char *a, const char *b, size_t n)
{
    const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
    while (n >= 8) {
        if (load8(x) != load8(y))
            return 0;
        x += 8;
        y += 8;
        n -= 8;
    }
    if (n >= 4)
        return load4(x) == load4(y) && load4(x + n - 4) == load4(y + n - 4);
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return 0;
    return 1;
}

static void tab_free(strtab *t)
{
    free(t->pool);
    free(t->off);
    free(t->len);
    free(t->hash);
    free(t->count);
    free(t->slots);
    memset(t, 0, sizeof *t);
}

static moe_status tab_init(strtab *t, size_t slots)
{
    memset(t, 0, sizeof *t);
    t->slots = calloc(slots, sizeof *t->slots);
    if (!t->slots)
        return nomem();
    t->mask = slots - 1;
    return MOE_OK;
}

/* The index of word, or -1; *slot receives its slot or the empty slot where
 * it would go. */
static int64_t tab_find(const strtab *t, const char *w, size_t len, uint64_t h, size_t *slot)
{
    uint64_t tag = h >> 32;
    size_t i = (size_t)h & t->mask;
    for (;;) {
        uint64_t s = t->slots[i];
        if (s == 0) {
            *slot = i;
            return -1;
        }
        if ((s >> 32) == tag) {
            int64_t idx = (int64_t)(s & 0xFFFFFFFFu) - 1;
            if (t->len[idx] == len && same_bytes(t->pool + t->off[idx], w, len)) {
                *slot = i;
                return idx;
            }
        }
        i = (i + 1) & t->mask;
    }
}

static moe_status tab_grow_slots(strtab *t)
{
    size_t n = (t->mask + 1) * 2;
    uint64_t *s = calloc(n, sizeof *s);
    if (!s)
        return nomem();
    for (size_t i = 0; i <= t->mask; i++) {
        uint64_t v = t->slots[i];
        if (v == 0)
            continue;
        uint64_t h = t->hash[(v & 0xFFFFFFFFu) - 1];
        size_t j = (size_t)h & (n - 1);
        while (s[j] != 0)
            j = (j + 1) & (n - 1);
        s[j] = v;
    }
    free(t->slots);
    t->slots = s;
    t->mask = n - 1;
    return MOE_OK;
}

/* Appends an entry without touching the slots; returns its index. */
static moe_status tab_append(strtab *t, const char *w, size_t len, uint64_t h, int64_t count, int64_t *index)
{
    if (t->n >= MAX_ENTRIES || len > 0xFFFFFFFFu)
        return moe_data_fail(MOE_ERR_UNSUPPORTED, "a dictionary holds at most %lld symbols of at most 4 GiB each",
                             (long long)MAX_ENTRIES);
    if (t->n == t->cap) {
        int64_t cap = t->cap ? 2 * t->cap : 64;
        size_t *off = realloc(t->off, (size_t)cap * sizeof *off);
        if (off)
            t->off = off;
        uint32_t *ln = realloc(t->len, (size_t)cap * sizeof *ln);
        if (ln)
            t->len = ln;
        uint64_t *hs = realloc(t->hash, (size_t)cap * sizeof *hs);
        if (hs)
            t->hash = hs;
        int64_t *c = realloc(t->count, (size_t)cap * sizeof *c);
        if (c)
            t->count = c;
        if (!off || !ln || !hs || !c)
            return nomem();
        t->cap = cap;
    }
    if (t->pool_len + len + 1 > t->pool_cap) {
        size_t cap = t->pool_cap ? t->pool_cap : 4096;
        while (cap < t->pool_len + len + 1)
            cap *= 2;
        char *p = realloc(t->pool, cap);
        if (!p)
            return nomem();
        t->pool = p;
        t->pool_cap = cap;
    }
    memcpy(t->pool + t->pool_len, w, len);
    t->pool[t->pool_len + len] = '\0';
    t->off[t->n] = t->pool_len;
    t->pool_len += len + 1;
    t->len[t->n] = (uint32_t)len;
    t->hash[t->n] = h;
    t->count[t->n] = count;
    *index = t->n++;
    return MOE_OK;
}

/* Points the word's slot at `index` (a new slot when the word is new). */
static moe_status tab_map(strtab *t, int64_t index)
{
    const char *w = t->pool + t->off[index];
    size_t slot;
    int64_t old = tab_find(t, w, t->len[index], t->hash[index], &slot);
    if (old < 0) {
        if ((t->used + 1) * 2 > t->mask + 1) {
            MOE_TRY(tab_grow_slots(t));
            tab_find(t, w, t->len[index], t->hash[index], &slot);
        }
        t->used++;
    }
    t->slots[slot] = (t->hash[index] >> 32) << 32 | (uint64_t)(index + 1);
    return MOE_OK;
}

static moe_status tab_add(strtab *t, const char *w, size_t len, int64_t n, int overwrite, int64_t *index)
{
    uint64_t h = hash_bytes(w, len);
    size_t slot;
    int64_t idx = tab_find(t, w, len, h, &slot);
    if (idx >= 0 && !overwrite) {
        t->count[idx] += n;
        if (index)
            *index = idx;
        return MOE_OK;
    }
    int64_t at;
    MOE_TRY(tab_append(t, w, len, h, n, &at));
    MOE_TRY(tab_map(t, at));
    if (index)
        *index = at;
    return MOE_OK;
}

static int64_t tab_index(const strtab *t, const char *w, size_t len)
{
    size_t slot;
    return tab_find(t, w, len, hash_bytes(w, len), &slot);
}

/* memcmp order, a prefix first (Python's str order on UTF-8). */
static int sym_cmp(const char *a, size_t na, const char *b, size_t nb)
{
    int c = memcmp(a, b, na < nb ? na : nb);
    if (c != 0)
        return c;
    return na < nb ? -1 : na > nb ? 1 : 0;
}

/* ------------------------------------------------------------- dictionary */

struct moe_dict {
    strtab t;
};

static const char *const special_names[MOE_DICT_NSPECIAL] = {"<s>", "<pad>", "</s>", "<unk>"};

moe_status moe_dict_create(moe_dict **out)
{
    *out = NULL;
    moe_dict *d = calloc(1, sizeof *d);
    if (!d)
        return nomem();
    moe_status st = tab_init(&d->t, 1024);
    for (int i = 0; st == MOE_OK && i < MOE_DICT_NSPECIAL; i++)
        st = tab_add(&d->t, special_names[i], strlen(special_names[i]), 1, 0, NULL);
    if (st != MOE_OK) {
        moe_dict_destroy(d);
        return st;
    }
    *out = d;
    return MOE_OK;
}

void moe_dict_destroy(moe_dict *d)
{
    if (!d)
        return;
    tab_free(&d->t);
    free(d);
}

int64_t moe_dict_len(const moe_dict *d) { return d->t.n; }

const char *moe_dict_symbol(const moe_dict *d, int64_t index, size_t *len)
{
    if (index < 0 || index >= d->t.n) {
        if (len)
            *len = 0;
        return NULL;
    }
    if (len)
        *len = d->t.len[index];
    return d->t.pool + d->t.off[index];
}

int64_t moe_dict_count(const moe_dict *d, int64_t index)
{
    return index >= 0 && index < d->t.n ? d->t.count[index] : 0;
}

int64_t moe_dict_index(const moe_dict *d, const char *word, size_t len)
{
    int64_t i = tab_index(&d->t, word, len);
    return i >= 0 ? i : MOE_DICT_UNK;
}

moe_status moe_dict_add(moe_dict *d, const char *word, size_t len, int64_t n, int overwrite, int64_t *index)
{
    return tab_add(&d->t, word, len, n, overwrite, index);
}

/* Sort contexts: qsort has no user pointer, so the table rides in front of
 * each key. */
typedef struct sort_key {
    const strtab *t;
    int64_t idx;
} sort_key;

static int by_symbol_then_count(const void *pa, const void *pb)
{
    const sort_key *a = pa, *b = pb;
    const strtab *t = a->t;
    int c = sym_cmp(t->pool + t->off[a->idx], t->len[a->idx], t->pool + t->off[b->idx], t->len[b->idx]);
    if (c != 0)
        return c;
    int64_t ca = t->count[a->idx], cb = t->count[b->idx];
    return ca < cb ? -1 : ca > cb ? 1 : 0;
}

static int by_count_desc_then_symbol(const void *pa, const void *pb)
{
    const sort_key *a = pa, *b = pb;
    const strtab *t = a->t;
    int64_t ca = t->count[a->idx], cb = t->count[b->idx];
    if (ca != cb)
        return ca > cb ? -1 : 1;
    return sym_cmp(t->pool + t->off[a->idx], t->len[a->idx], t->pool + t->off[b->idx], t->len[b->idx]);
}

moe_status moe_dict_finalize(moe_dict *d, int64_t threshold, int64_t nwords, int64_t padding_factor)
{
    strtab *t = &d->t;
    if (nwords <= 0)
        nwords = t->n;
    int64_t m = t->n - MOE_DICT_NSPECIAL;
    sort_key *keys = malloc((size_t)(m > 0 ? m : 1) * sizeof *keys);
    if (!keys)
        return nomem();
    for (int64_t i = 0; i < m; i++) {
        keys[i].t = t;
        keys[i].idx = MOE_DICT_NSPECIAL + i;
    }
    /* fairseq: Counter(dict(sorted(zip(symbols, counts)))): a symbol present
     * twice (overwrite) keeps the pair that sorts last, its larger count */
    qsort(keys, (size_t)m, sizeof *keys, by_symbol_then_count);
    int64_t u = 0;
    for (int64_t i = 0; i < m; i++) {
        if (i + 1 < m && t->len[keys[i].idx] == t->len[keys[i + 1].idx] &&
            memcmp(t->pool + t->off[keys[i].idx], t->pool + t->off[keys[i + 1].idx], t->len[keys[i].idx]) == 0)
            continue;
        keys[u++] = keys[i];
    }
    /* most_common: stable by count descending over that symbol order; the
     * symbols are distinct now, so a total order gives the same sequence */
    qsort(keys, (size_t)u, sizeof *keys, by_count_desc_then_symbol);
    int64_t take = nwords - MOE_DICT_NSPECIAL;
    if (take > u)
        take = u;
    strtab nt;
    moe_status st = tab_init(&nt, 1024);
    for (int i = 0; st == MOE_OK && i < MOE_DICT_NSPECIAL; i++) {
        int64_t at;
        st = tab_append(&nt, t->pool + t->off[i], t->len[i], t->hash[i], t->count[i], &at);
        if (st == MOE_OK)
            st = tab_map(&nt, at);
    }
    for (int64_t k = 0; st == MOE_OK && k < take; k++) {
        int64_t i = keys[k].idx;
        if (t->count[i] < threshold)
            break;
        size_t slot;
        if (tab_find(&nt, t->pool + t->off[i], t->len[i], t->hash[i], &slot) >= 0) {
            /* fairseq fails here too (an assertion): a special's name added
             * again with #fairseq:overwrite */
            st = moe_data_fail(MOE_ERR_INVALID_ARG,
                               "cannot finalize the dictionary: '%s' is both a special symbol and an ordinary entry "
                               "(added with #fairseq:overwrite); remove that entry",
                               t->pool + t->off[i]);
            break;
        }
        int64_t at;
        st = tab_append(&nt, t->pool + t->off[i], t->len[i], t->hash[i], t->count[i], &at);
        if (st == MOE_OK)
            st = tab_map(&nt, at);
    }
    free(keys);
    if (st != MOE_OK) {
        tab_free(&nt);
        return st;
    }
    tab_free(t);
    *t = nt;
    if (padding_factor > 1) {
        char name[48];
        for (int64_t i = 0; t->n % padding_factor != 0; i++) {
            int len = snprintf(name, sizeof name, "madeupword%04lld", (long long)i);
            MOE_TRY(tab_add(t, name, (size_t)len, 0, 0, NULL));
        }
    }
    return MOE_OK;
}

/* ------------------------------------------------------------ save / load */

moe_status moe_dict_save(const moe_dict *d, const char *path)
{
    const strtab *t = &d->t;
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 64);
    if (!tmp)
        return nomem();
    int fd = -1;
    for (int k = 0; k < 1000 && fd < 0; k++) {
        snprintf(tmp, plen + 64, "%s.tmp%ld.%d", path, (long)getpid(), k);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0666);
        if (fd < 0 && errno != EEXIST)
            break;
    }
    if (fd < 0) {
        moe_status st = moe_data_fail(MOE_ERR_IO, "cannot write the dictionary '%s': %s (creating '%s')", path,
                                      strerror(errno), tmp);
        free(tmp);
        return st;
    }
    FILE *f = fdopen(fd, "wb");
    if (!f) {
        close(fd);
        unlink(tmp);
        free(tmp);
        return moe_data_fail(MOE_ERR_IO, "cannot write the dictionary '%s': %s", path, strerror(errno));
    }
    int bad = 0;
    for (int64_t i = MOE_DICT_NSPECIAL; i < t->n && !bad; i++) {
        bad |= fwrite(t->pool + t->off[i], 1, t->len[i], f) != t->len[i];
        bad |= fprintf(f, " %lld\n", (long long)t->count[i]) < 0;
    }
    bad |= fflush(f) != 0;
    bad |= fsync(fileno(f)) != 0;
    int e = errno;
    bad |= fclose(f) != 0;
    if (!bad && rename(tmp, path) != 0) {
        e = errno;
        bad = 1;
    }
    if (bad) {
        unlink(tmp);
        free(tmp);
        return moe_data_fail(MOE_ERR_IO, "cannot write the dictionary '%s': %s; check the space and permissions of "
                                         "its directory",
                             path, strerror(e ? e : EIO));
    }
    free(tmp);
    return MOE_OK;
}

/* Python's int() on a str: surrounding whitespace, a sign, decimal digits
 * with single underscores between them. (Non-ASCII decimal digits, which
 * int() also takes, are refused.) 0 when not an integer, -1 when it does not
 * fit in 64 bits. */
static int py_int(const char *s, size_t n, int64_t *out)
{
    const char *p;
    size_t len;
    moe_text_strip(s, n, &p, &len);
    size_t i = 0;
    int neg = 0;
    if (i < len && (p[i] == '+' || p[i] == '-'))
        neg = p[i++] == '-';
    if (i >= len)
        return 0;
    uint64_t v = 0, limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    int prev_digit = 0, over = 0;
    for (; i < len; i++) {
        char c = p[i];
        if (c == '_') {
            if (!prev_digit || i + 1 >= len || p[i + 1] < '0' || p[i + 1] > '9')
                return 0;
            prev_digit = 0;
            continue;
        }
        if (c < '0' || c > '9')
            return 0;
        prev_digit = 1;
        unsigned dgt = (unsigned)(c - '0');
        if (v > (limit - dgt) / 10)
            over = 1;
        else
            v = v * 10 + dgt;
    }
    if (over)
        return -1;
    *out = neg ? (v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v) : (int64_t)v;
    return 1;
}

static const char *last_space(const char *s, size_t n)
{
    for (size_t i = n; i > 0; i--)
        if (s[i - 1] == ' ')
            return s + i - 1;
    return NULL;
}

static moe_status format_error(const char *path, int64_t line, const char *text, size_t n, const char *why)
{
    return moe_data_fail(MOE_ERR_INVALID_ARG,
                         "'%s' line %lld: %s: expected '<token> <count>' or '<token> <count> #fairseq:overwrite' "
                         "(fairseq's dict.txt), found \"%.*s\"; fix or remove the line",
                         path, (long long)line, why, (int)(n > 200 ? 200 : n), text);
}

static moe_status load_lines(moe_dict *d, const char *path)
{
    moe_text_reader *r;
    MOE_TRY(moe_text_open(path, 0, -1, &r));
    moe_status st = MOE_OK;
    for (;;) {
        const char *line;
        size_t n;
        st = moe_text_next(r, &line, &n);
        if (st != MOE_OK || !line)
            break;
        int64_t ln = moe_text_line_number(r);
        size_t keep = moe_text_rstrip(line, n);
        const char *sp = last_space(line, keep);
        if (!sp) {
            st = format_error(path, ln, line, keep, "no space before the count");
            break;
        }
        const char *field = sp + 1;
        size_t flen = (size_t)(line + keep - field), wlen = (size_t)(sp - line);
        int overwrite = 0;
        if (flen == 18 && memcmp(field, "#fairseq:overwrite", 18) == 0) {
            overwrite = 1;
            sp = last_space(line, wlen);
            if (!sp) {
                st = format_error(path, ln, line, keep, "no space before the count");
                break;
            }
            field = sp + 1;
            flen = (size_t)(line + wlen - field);
            wlen = (size_t)(sp - line);
        }
        int64_t count = 0;
        int ok = py_int(field, flen, &count);
        if (ok <= 0) {
            st = format_error(path, ln, line, keep,
                              ok < 0 ? "the count does not fit in 64 bits" : "the count is not an integer");
            break;
        }
        int64_t old = tab_index(&d->t, line, wlen);
        if (old >= 0 && !overwrite) {
            st = moe_data_fail(MOE_ERR_INVALID_ARG,
                               "'%s' line %lld: duplicate word '%.*s' (already index %lld; fairseq: \"Duplicate word "
                               "found when loading Dictionary\"); remove the line, or end it with "
                               "' #fairseq:overwrite' to replace the earlier entry",
                               path, (long long)ln, (int)(wlen > 200 ? 200 : wlen), line, (long long)old);
            break;
        }
        st = tab_add(&d->t, line, wlen, count, overwrite, NULL);
        if (st != MOE_OK)
            break;
    }
    moe_text_close(r);
    return st;
}

moe_status moe_dict_load(const char *path, moe_dict **out)
{
    *out = NULL;
    moe_dict *d;
    MOE_TRY(moe_dict_create(&d));
    moe_status st = load_lines(d, path);
    if (st != MOE_OK) {
        moe_dict_destroy(d);
        return st;
    }
    *out = d;
    return MOE_OK;
}

/* ------------------------------------------------------------ word counter */

struct moe_wordcount {
    strtab t;
};

moe_status moe_wordcount_create(moe_wordcount **out)
{
    *out = NULL;
    moe_wordcount *c = calloc(1, sizeof *c);
    if (!c)
        return nomem();
    moe_status st = tab_init(&c->t, 4096);
    if (st != MOE_OK) {
        free(c);
        return st;
    }
    *out = c;
    return MOE_OK;
}

void moe_wordcount_destroy(moe_wordcount *c)
{
    if (!c)
        return;
    tab_free(&c->t);
    free(c);
}

moe_status moe_wordcount_add(moe_wordcount *c, const char *word, size_t len, int64_t n)
{
    return tab_add(&c->t, word, len, n, 0, NULL);
}

int64_t moe_wordcount_len(const moe_wordcount *c) { return c->t.n; }

int64_t moe_wordcount_get(const moe_wordcount *c, const char *word, size_t len)
{
    int64_t i = tab_index(&c->t, word, len);
    return i >= 0 ? c->t.count[i] : 0;
}

static int by_symbol(const void *pa, const void *pb)
{
    const sort_key *a = pa, *b = pb;
    const strtab *t = a->t;
    return sym_cmp(t->pool + t->off[a->idx], t->len[a->idx], t->pool + t->off[b->idx], t->len[b->idx]);
}

moe_status moe_dict_add_counts(moe_dict *d, const moe_wordcount *c)
{
    const strtab *t = &c->t;
    sort_key *keys = malloc((size_t)(t->n > 0 ? t->n : 1) * sizeof *keys);
    if (!keys)
        return nomem();
    for (int64_t i = 0; i < t->n; i++) {
        keys[i].t = t;
        keys[i].idx = i;
    }
    qsort(keys, (size_t)t->n, sizeof *keys, by_symbol);
    moe_status st = MOE_OK;
    for (int64_t k = 0; k < t->n && st == MOE_OK; k++) {
        int64_t i = keys[k].idx;
        st = tab_add(&d->t, t->pool + t->off[i], t->len[i], t->count[i], 0, NULL);
    }
    free(keys);
    return st;
}
