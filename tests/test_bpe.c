/* test_bpe.c: GPT-2 byte-level BPE of the data library (data/bpe.c).
 *
 * Every vocabulary here is small and written by the test into a temporary
 * directory: the 256 byte chars (id = byte value) plus the merges a case
 * needs. Expected pre-token splits and U+FFFD repairs were produced by the
 * Python `regex` module and bytes.decode("utf-8", errors="replace") and are
 * pasted as literals; nothing here runs Python. Merge results are checked
 * against a naive port of fairseq's Encoder.bpe kept in this file (strings,
 * min over the set of pairs, whole passes), which shares no code with the
 * library.
 *
 * Conventions: token and merge strings in this file are raw bytes; the
 * writers turn them into byte-level chars (space -> "Ġ") for the files.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "data/bpe.h"
#include "data/error.h"
#include "testutil.h"

/* ------------------------------------------------------------ files */

static char tmp_dir[64];
static char tmp_files[64][256];
static int n_tmp_files;

static const char *tmp_path(const char *name)
{
    static char p[8][256];
    static int k;
    char *r = p[k++ % 8];
    snprintf(r, 256, "%s/%s", tmp_dir, name);
    return r;
}

static const char *write_file(const char *name, const char *data, size_t len)
{
    const char *path = tmp_path(name);
    int known = 0;
    for (int i = 0; i < n_tmp_files; i++)
        known |= strcmp(tmp_files[i], path) == 0;
    if (!known && n_tmp_files < 64)
        snprintf(tmp_files[n_tmp_files++], 256, "%s", path);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
    return path;
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/moelm-bpe-XXXXXX");
    return mkdtemp(tmp_dir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < n_tmp_files; i++)
        unlink(tmp_files[i]);
    rmdir(tmp_dir);
    return 0;
}

static int case_setup(void **state)
{
    (void)state;
    moe_data_clear_error();
    return 0;
}

/* a growable string */
typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static void sb_add(sbuf *s, const void *d, size_t n)
{
    if (s->n + n + 1 > s->cap) {
        s->cap = (s->n + n + 1) * 2;
        s->p = realloc(s->p, s->cap);
        assert_non_null(s->p);
    }
    memcpy(s->p + s->n, d, n);
    s->n += n;
    s->p[s->n] = '\0';
}

static void sb_str(sbuf *s, const char *str) { sb_add(s, str, strlen(str)); }

static void sb_printf(sbuf *s, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    assert_true(n >= 0 && (size_t)n < sizeof tmp);
    sb_add(s, tmp, (size_t)n);
}

/* the byte-level chars of raw bytes, as UTF-8; JSON-escaped when json */
static void sb_bytelevel(sbuf *s, const char *raw, size_t n, int json)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = moe_bpe_byte_to_char((uint8_t)raw[i]);
        char u[3];
        if (cp < 0x80) {
            if (json && (cp == '"' || cp == '\\'))
                sb_add(s, "\\", 1);
            u[0] = (char)cp;
            sb_add(s, u, 1);
        } else {
            u[0] = (char)(0xC0 | (cp >> 6));
            u[1] = (char)(0x80 | (cp & 0x3F));
            sb_add(s, u, 2);
        }
    }
}

/* ------------------------------------------------------------ vocabularies */

#define TV_MAX 1024
#define TV_TOK 96

typedef struct tvocab {
    char tok[TV_MAX][TV_TOK]; /* raw bytes; id = index */
    size_t len[TV_MAX];
    int n;
    int ma[TV_MAX], mb[TV_MAX]; /* merges as token ids, rank = index (last duplicate wins) */
    int nm;
} tvocab;

static tvocab *tv_new(void)
{
    tvocab *v = calloc(1, sizeof *v);
    assert_non_null(v);
    for (int i = 0; i < 256; i++) {
        v->tok[i][0] = (char)i;
        v->len[i] = 1;
    }
    v->n = 256;
    return v;
}

static int tv_find(const tvocab *v, const char *t, size_t n)
{
    for (int i = 0; i < v->n; i++)
        if (v->len[i] == n && memcmp(v->tok[i], t, n) == 0)
            return i;
    return -1;
}

static int tv_add_token(tvocab *v, const char *t, size_t n)
{
    int id = tv_find(v, t, n);
    if (id >= 0)
        return id;
    assert_true(v->n < TV_MAX && n <= TV_TOK);
    memcpy(v->tok[v->n], t, n);
    v->len[v->n] = n;
    return v->n++;
}

/* merge of two token ids; adds their concatenation to the vocabulary */
static int tv_merge_ids(tvocab *v, int a, int b)
{
    char cat[2 * TV_TOK];
    memcpy(cat, v->tok[a], v->len[a]);
    memcpy(cat + v->len[a], v->tok[b], v->len[b]);
    int id = tv_add_token(v, cat, v->len[a] + v->len[b]);
    assert_true(v->nm < TV_MAX);
    v->ma[v->nm] = a;
    v->mb[v->nm] = b;
    v->nm++;
    return id;
}

static int tv_merge(tvocab *v, const char *a, const char *b)
{
    int ia = tv_find(v, a, strlen(a)), ib = tv_find(v, b, strlen(b));
    assert_true(ia >= 0 && ib >= 0);
    return tv_merge_ids(v, ia, ib);
}

static void sb_encoder_json(sbuf *s, const tvocab *v)
{
    sb_str(s, "{");
    for (int i = 0; i < v->n; i++) {
        sb_str(s, i ? ", \"" : "\"");
        sb_bytelevel(s, v->tok[i], v->len[i], 1);
        sb_printf(s, "\": %d", i);
    }
    sb_str(s, "}");
}

static const char *write_encoder(const tvocab *v, const char *name)
{
    sbuf s = {0};
    sb_encoder_json(&s, v);
    const char *p = write_file(name, s.p, s.n);
    free(s.p);
    return p;
}

static const char *write_vocab_bpe(const tvocab *v, const char *name, int trailing_newline)
{
    sbuf s = {0};
    sb_str(&s, "#version: 0.2");
    for (int i = 0; i < v->nm; i++) {
        sb_str(&s, "\n");
        sb_bytelevel(&s, v->tok[v->ma[i]], v->len[v->ma[i]], 0);
        sb_str(&s, " ");
        sb_bytelevel(&s, v->tok[v->mb[i]], v->len[v->mb[i]], 0);
    }
    if (trailing_newline)
        sb_str(&s, "\n");
    const char *p = write_file(name, s.p, s.n);
    free(s.p);
    return p;
}

static moe_bpe *load_gpt2(const tvocab *v)
{
    const char *enc = write_encoder(v, "encoder.json");
    char enc_path[256];
    snprintf(enc_path, sizeof enc_path, "%s", enc);
    const char *bpe = write_vocab_bpe(v, "vocab.bpe", 1);
    moe_bpe *b = NULL;
    moe_status st = moe_bpe_load_gpt2(enc_path, bpe, &b);
    if (st != MOE_OK)
        fail_msg("load: %s", moe_data_error());
    return b;
}

enum { MERGES_LEGACY, MERGES_ARRAYS };

/* tokenizer.json with the given pre_tokenizer; model_extra and top_extra
 * are appended inside "model" and at the top level (later JSON keys win) */
static const char *write_tokenizer_json(const tvocab *v, const char *name, int form, const char *pre_tokenizer,
                                        const char *model_extra, const char *top_extra)
{
    sbuf s = {0};
    sb_str(&s, "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": [{\"id\": 0, "
               "\"content\": \"<|endoftext|>\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
               "\"normalized\": true, \"special\": true}], \"normalizer\": null, \"pre_tokenizer\": ");
    sb_str(&s, pre_tokenizer);
    sb_str(&s, ", \"post_processor\": null, \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, "
               "\"trim_offsets\": true, \"use_regex\": true}, \"model\": {\"type\": \"BPE\", \"dropout\": null, "
               "\"unk_token\": null, \"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, "
               "\"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": false, \"vocab\": ");
    sb_encoder_json(&s, v);
    sb_str(&s, ", \"merges\": [");
    if (form == MERGES_LEGACY)
        sb_str(&s, "\"#version: 0.2\"");
    for (int i = 0; i < v->nm; i++) {
        sb_str(&s, (i || form == MERGES_LEGACY) ? ", " : "");
        sb_str(&s, form == MERGES_LEGACY ? "\"" : "[\"");
        sb_bytelevel(&s, v->tok[v->ma[i]], v->len[v->ma[i]], 1);
        sb_str(&s, form == MERGES_LEGACY ? " " : "\", \"");
        sb_bytelevel(&s, v->tok[v->mb[i]], v->len[v->mb[i]], 1);
        sb_str(&s, form == MERGES_LEGACY ? "\"" : "\"]");
    }
    sb_str(&s, "]");
    if (model_extra) {
        sb_str(&s, ", ");
        sb_str(&s, model_extra);
    }
    sb_str(&s, "}");
    if (top_extra) {
        sb_str(&s, ", ");
        sb_str(&s, top_extra);
    }
    sb_str(&s, "}");
    const char *p = write_file(name, s.p, s.n);
    free(s.p);
    return p;
}

static const char byte_level_pt[] =
    "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}";

/* ------------------------------------------------------------ reference */

/* fairseq's Encoder.bpe on raw bytes: symbols are [bound[k], bound[k+1]) of
 * the piece; returns the ids, or -1 when a symbol is not a token. */
static int ref_rank(const tvocab *v, const char *a, size_t al, const char *b, size_t bl)
{
    int r = -1;
    for (int i = 0; i < v->nm; i++)
        if (v->len[v->ma[i]] == al && v->len[v->mb[i]] == bl && memcmp(v->tok[v->ma[i]], a, al) == 0 &&
            memcmp(v->tok[v->mb[i]], b, bl) == 0)
            r = i;
    return r;
}

static int64_t ref_bpe(const tvocab *v, const char *p, size_t n, int32_t *out)
{
    size_t *bd = malloc((n + 1) * sizeof *bd), *nb = malloc((n + 1) * sizeof *nb);
    assert_true(bd && nb);
    size_t m = n;
    for (size_t i = 0; i <= n; i++)
        bd[i] = i;
    while (m > 1) {
        int best = -1;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < m; i++) {
            int r = ref_rank(v, p + bd[i], bd[i + 1] - bd[i], p + bd[i + 1], bd[i + 2] - bd[i + 1]);
            if (r >= 0 && (best < 0 || r < best)) {
                best = r;
                bi = i;
            }
        }
        if (best < 0)
            break;
        const char *first = p + bd[bi], *second = p + bd[bi + 1];
        size_t fl = bd[bi + 1] - bd[bi], sl = bd[bi + 2] - bd[bi + 1];
        size_t w = 0, i = 0;
        nb[w++] = 0;
        while (i < m) {
            if (i + 1 < m && bd[i + 1] - bd[i] == fl && memcmp(p + bd[i], first, fl) == 0 &&
                bd[i + 2] - bd[i + 1] == sl && memcmp(p + bd[i + 1], second, sl) == 0)
                i += 2;
            else
                i += 1;
            nb[w++] = bd[i];
        }
        m = w - 1;
        memcpy(bd, nb, w * sizeof *bd);
    }
    for (size_t k = 0; k < m; k++) {
        int id = tv_find(v, p + bd[k], bd[k + 1] - bd[k]);
        assert_true(id >= 0);
        out[k] = id;
    }
    free(bd);
    free(nb);
    return (int64_t)m;
}

typedef struct pieces {
    sbuf all; /* pieces joined */
    size_t off[8192], len[8192];
    int n;
} pieces;

static moe_status collect_piece(const char *p, size_t len, void *arg)
{
    pieces *ps = arg;
    assert_true(ps->n < 8192);
    ps->off[ps->n] = ps->all.n;
    ps->len[ps->n] = len;
    ps->n++;
    sb_add(&ps->all, p, len);
    return MOE_OK;
}

/* the reference ids of text: the library's pre-tokens, the reference merges */
static int64_t ref_encode(moe_bpe_state *s, const tvocab *v, const char *text, size_t len, int32_t *out)
{
    pieces *ps = calloc(1, sizeof *ps);
    assert_non_null(ps);
    assert_int_equal(moe_bpe_pretokenize(s, text, len, collect_piece, ps), MOE_OK);
    int64_t n = 0;
    for (int i = 0; i < ps->n; i++)
        n += ref_bpe(v, ps->all.p + ps->off[i], ps->len[i], out + n);
    free(ps->all.p);
    free(ps);
    return n;
}

static void assert_encodes_like_fairseq(moe_bpe *b, const tvocab *v, const char *text, size_t len)
{
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    assert_int_equal(moe_bpe_encode(s, text, len, &ids, &n, &cap), MOE_OK);
    int32_t *ref = malloc((len + 1) * sizeof *ref);
    assert_non_null(ref);
    int64_t rn = ref_encode(s, v, text, len, ref);
    assert_int_equal(n, rn);
    for (int64_t i = 0; i < n; i++)
        if (ids[i] != ref[i])
            fail_msg("id %lld: got %d, fairseq's loop gives %d", (long long)i, ids[i], ref[i]);
    char *back;
    size_t bl;
    assert_int_equal(moe_bpe_decode(b, ids, n, &back, &bl), MOE_OK);
    assert_int_equal(bl, len);
    assert_memory_equal(back, text, len);
    free(back);
    free(ref);
    free(ids);
    moe_bpe_state_destroy(s);
}

/* ids of text through a fresh state; returns the count, ids in out */
static int64_t encode(moe_bpe *b, const char *text, int32_t *out, int64_t max)
{
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    moe_status st = moe_bpe_encode(s, text, strlen(text), &ids, &n, &cap);
    if (st != MOE_OK)
        fail_msg("encode: %s", moe_data_error());
    assert_true(n <= max);
    if (n)
        memcpy(out, ids, (size_t)n * sizeof *ids);
    free(ids);
    moe_bpe_state_destroy(s);
    return n;
}

#define ASSERT_IDS(b, text, ...)                                                                \
    do {                                                                                        \
        const int32_t want_[] = {__VA_ARGS__};                                                  \
        int32_t got_[256];                                                                      \
        int64_t n_ = encode(b, text, got_, 256);                                                \
        assert_int_equal(n_, (int64_t)(sizeof want_ / sizeof want_[0]));                        \
        for (int64_t i_ = 0; i_ < n_; i_++)                                                     \
            if (got_[i_] != want_[i_])                                                          \
                fail_msg("\"%s\": id %lld is %d, expected %d", text, (long long)i_, got_[i_], \
                         want_[i_]);                                                            \
    } while (0)

static void assert_fails_with(moe_status st, moe_status want, const char *part1, const char *part2)
{
    if (st != want)
        fail_msg("status %d, expected %d (message: %s)", (int)st, (int)want, moe_data_error());
    const char *m = moe_data_error();
    if (part1 && !strstr(m, part1))
        fail_msg("message \"%s\" does not contain \"%s\"", m, part1);
    if (part2 && !strstr(m, part2))
        fail_msg("message \"%s\" does not contain \"%s\"", m, part2);
    moe_data_clear_error();
}

/* ------------------------------------------------------------ byte map */

static void test_bpe_byte_map(void **state)
{
    (void)state;
    assert_int_equal(moe_bpe_byte_to_char(' '), 0x120);  /* Ġ */
    assert_int_equal(moe_bpe_byte_to_char('\n'), 0x10A); /* Ċ */
    assert_int_equal(moe_bpe_byte_to_char(0x7F), 0x121);
    assert_int_equal(moe_bpe_byte_to_char(0xAD), 0x143);
    assert_int_equal(moe_bpe_byte_to_char(0x00), 0x100);
    assert_int_equal(moe_bpe_byte_to_char(0xA0), 0x142);
    assert_int_equal(moe_bpe_byte_to_char('!'), '!');
    assert_int_equal(moe_bpe_byte_to_char(0xA1), 0xA1);
    assert_int_equal(moe_bpe_byte_to_char(0xAC), 0xAC);
    assert_int_equal(moe_bpe_byte_to_char(0xAE), 0xAE);
    assert_int_equal(moe_bpe_byte_to_char(0xFF), 0xFF);
    int moved = 0;
    for (int b = 0; b < 256; b++) {
        uint32_t c = moe_bpe_byte_to_char((uint8_t)b);
        moved += c != (uint32_t)b;
        assert_int_equal(moe_bpe_char_to_byte(c), b);
    }
    assert_int_equal(moved, 68);
    assert_int_equal(moe_bpe_char_to_byte(' '), -1);
    assert_int_equal(moe_bpe_char_to_byte(0x7F), -1);
    assert_int_equal(moe_bpe_char_to_byte(0xAD), -1);
    assert_int_equal(moe_bpe_char_to_byte(0x144), -1);
    assert_int_equal(moe_bpe_char_to_byte(0x20AC), -1);

    /* the files carry the chars: id 32 is "Ġ", id 10 is "Ċ" */
    tvocab *v = tv_new();
    moe_bpe *b = load_gpt2(v);
    size_t len;
    assert_string_equal(moe_bpe_token(b, ' ', &len), "\xC4\xA0");
    assert_int_equal(len, 2);
    assert_string_equal(moe_bpe_token(b, '\n', NULL), "\xC4\x8A");
    assert_string_equal(moe_bpe_token(b, 0x7F, NULL), "\xC4\xA1");
    assert_string_equal(moe_bpe_token(b, 0xAD, NULL), "\xC5\x83");
    assert_string_equal(moe_bpe_token(b, 'A', NULL), "A");
    assert_null(moe_bpe_token(b, 256, NULL));
    assert_null(moe_bpe_token(b, -1, NULL));
    assert_int_equal(moe_bpe_token_id(b, "\xC4\xA0", 2), ' ');
    assert_int_equal(moe_bpe_token_id(b, " ", 1), -1);
    assert_int_equal(moe_bpe_vocab_size(b), 256);
    ASSERT_IDS(b, " \n\x7f", ' ', '\n', 0x7F);
    ASSERT_IDS(b, "\xC2\xAD", 0xC2, 0xAD); /* U+00AD soft hyphen: its bytes */
    moe_bpe_destroy(b);
    free(v);
}

/* ------------------------------------------------------------ pre-tokenization */

typedef struct split_case {
    const char *text;
    const char *pieces[12];
} split_case;

/* DATA_SPEC.md §4.2, and more, as the Python `regex` module's findall splits */
static const split_case gpt2_splits[] = {
    {"a  b", {"a", " ", " b"}},
    {"don't DON'T", {"don", "'t", " DON", "'", "T"}},
    {" 's x", {" '", "s", " x"}},
    {"a  ", {"a", "  "}},
    {"x\n\ny", {"x", "\n", "\n", "y"}},
    {"123abc 4.5", {"123", "abc", " 4", ".", "5"}},
    {"<|endoftext|>", {"<|", "endoftext", "|>"}},
    {"a\xC2\x85" "b", {"a", "\xC2\x85", "b"}},                     /* U+0085 is White_Space */
    {"a\xC2\x85!", {"a", "\xC2\x85", "!"}},
    {"!\xC2\x85 x", {"!", "\xC2\x85", " x"}},
    {"a\x1C" "b", {"a", "\x1C", "b"}}, /* U+001C is not */
    {"x \x1C\x1C y", {"x", " \x1C\x1C", " y"}},
    {"a\xE2\x80\xA9!", {"a", "\xE2\x80\xA9", "!"}}, /* U+2029 */
    {"\xC2\xA0\xC2\xA0!", {"\xC2\xA0", "\xC2\xA0", "!"}},
    {"a\xC2\xA0\xC2\xA0" "b", {"a", "\xC2\xA0", "\xC2\xA0", "b"}}, /* NBSP */
    {"x\xE2\x80\xA8y", {"x", "\xE2\x80\xA8", "y"}},                /* U+2028 */
    {"x \xE3\x80\x80y", {"x", " ", "\xE3\x80\x80", "y"}},          /* U+3000 */
    {"a \t\nb", {"a", " \t", "\n", "b"}},
    {"\xC3\xA9t\xC3\xA9 2023!", {"\xC3\xA9t\xC3\xA9", " 2023", "!"}},
    {"\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xD9\xA0\xD9\xA1", {"\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E", " \xD9\xA0\xD9\xA1"}},
    {"he's we'RE they'll", {"he", "'s", " we", "'", "RE", " they", "'ll"}},
    {"  \n", {"  \n"}},
    {"Hello world", {"Hello", " world"}},
    {"a\xE2\x80\x8B" "b", {"a", "\xE2\x80\x8B", "b"}}, /* U+200B is not White_Space */
    {"x\xC2\xB2y", {"x", "\xC2\xB2", "y"}},             /* superscript two is \p{N} */
    {"\xF0\x9F\x98\x80\xF0\x9F\x98\x80 ok", {"\xF0\x9F\x98\x80\xF0\x9F\x98\x80", " ok"}},
    {"", {NULL}},
};

static void assert_splits(moe_bpe *b, const split_case *c)
{
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    pieces *ps = calloc(1, sizeof *ps);
    assert_non_null(ps);
    assert_int_equal(moe_bpe_pretokenize(s, c->text, strlen(c->text), collect_piece, ps), MOE_OK);
    int want = 0;
    while (want < 12 && c->pieces[want])
        want++;
    if (ps->n != want)
        fail_msg("\"%s\": %d pieces, expected %d", c->text, ps->n, want);
    for (int i = 0; i < want; i++)
        if (ps->len[i] != strlen(c->pieces[i]) || memcmp(ps->all.p + ps->off[i], c->pieces[i], ps->len[i]) != 0)
            fail_msg("\"%s\": piece %d is \"%.*s\", expected \"%s\"", c->text, i, (int)ps->len[i],
                     ps->all.p + ps->off[i], c->pieces[i]);
    free(ps->all.p);
    free(ps);
    moe_bpe_state_destroy(s);
}

static void test_bpe_pretokenize_gpt2_splits(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    moe_bpe *b = load_gpt2(v);
    for (size_t i = 0; i < sizeof gpt2_splits / sizeof gpt2_splits[0]; i++)
        assert_splits(b, &gpt2_splits[i]);
    /* tokenizer.json's ByteLevel (use_regex true, the default) splits the same */
    const char *tj =
        write_tokenizer_json(v, "bl.json", MERGES_LEGACY, "{\"type\": \"ByteLevel\", \"add_prefix_space\": false}",
                             NULL, NULL);
    moe_bpe *h;
    assert_int_equal(moe_bpe_load_tokenizer_json(tj, &h), MOE_OK);
    for (size_t i = 0; i < sizeof gpt2_splits / sizeof gpt2_splits[0]; i++)
        assert_splits(h, &gpt2_splits[i]);
    moe_bpe_destroy(h);
    moe_bpe_destroy(b);
    free(v);
}

static void test_bpe_encode_rejects_invalid_utf8(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    moe_bpe *b = load_gpt2(v);
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *ids = NULL;
    int64_t n = 7, cap = 0;
    static const char *const bad[] = {"ab\xC3", "ab\xC0\xAF", "ab\xED\xA0\x80", "ab\xF4\x90\x80\x80", "ab\xFF"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_fails_with(moe_bpe_encode(s, bad[i], strlen(bad[i]), &ids, &n, &cap), MOE_ERR_INVALID_ARG,
                          "not valid UTF-8", "byte offset 2");
        assert_int_equal(n, 0);
    }
    free(ids);
    moe_bpe_state_destroy(s);
    moe_bpe_destroy(b);
    free(v);
}

/* ------------------------------------------------------------ merges */

static void test_bpe_merges_follow_rank(void **state)
{
    (void)state;
    /* (b,c) before (a,b): "abc" -> b+c, then a+bc */
    tvocab *v = tv_new();
    int bc = tv_merge(v, "b", "c");
    tv_merge(v, "a", "b");
    int abc = tv_merge(v, "a", "bc");
    moe_bpe *b = load_gpt2(v);
    assert_int_equal(moe_bpe_merge_count(b), 3);
    ASSERT_IDS(b, "abc", abc);
    ASSERT_IDS(b, "xbc", 'x', bc);
    ASSERT_IDS(b, "ab ab", tv_find(v, "ab", 2), ' ', tv_find(v, "ab", 2)); /* " ab": (" ", a) is no merge */
    moe_bpe_destroy(b);
    free(v);

    /* (a,b) before (b,c): "abc" -> ab + c, and (a,bc) never applies */
    v = tv_new();
    int ab = tv_merge(v, "a", "b");
    tv_merge(v, "b", "c");
    tv_merge(v, "a", "bc");
    b = load_gpt2(v);
    ASSERT_IDS(b, "abc", ab, 'c');
    moe_bpe_destroy(b);
    free(v);
}

static void test_bpe_merges_non_overlapping_left_to_right(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    int aa = tv_merge(v, "a", "a");
    moe_bpe *b = load_gpt2(v);
    ASSERT_IDS(b, "aaa", aa, 'a');
    ASSERT_IDS(b, "aaaa", aa, aa);
    ASSERT_IDS(b, "aaaaa", aa, aa, 'a');
    moe_bpe_destroy(b);
    free(v);

    /* a whole pass of one pair before anything else, as fairseq does: with
     * (ab,a) ranked before (a,b), "abab" is "ab" "ab" (Hugging Face's heap
     * would take (ab,a) as soon as it appears and give "aba" "b") */
    v = tv_new();
    int ab = tv_add_token(v, "ab", 2);
    tv_add_token(v, "aba", 3);
    v->ma[0] = ab; /* rank 0: (ab, a), whose left operand only rank 1 makes */
    v->mb[0] = 'a';
    v->ma[1] = 'a'; /* rank 1: (a, b) */
    v->mb[1] = 'b';
    v->nm = 2;
    b = load_gpt2(v);
    ASSERT_IDS(b, "abab", ab, ab);
    ASSERT_IDS(b, "aba", tv_find(v, "aba", 3));
    assert_encodes_like_fairseq(b, v, "ababab abab", 11);
    moe_bpe_destroy(b);
    free(v);
}

static void test_bpe_vocab_bpe_first_and_last_line_dropped(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    int ab = tv_merge(v, "a", "b");
    int bc = tv_merge(v, "b", "c");
    const char *enc = write_encoder(v, "encoder.json");
    char enc_path[256];
    snprintf(enc_path, sizeof enc_path, "%s", enc);
    moe_bpe *b;

    /* with the trailing newline both merges count */
    assert_int_equal(moe_bpe_load_gpt2(enc_path, write_vocab_bpe(v, "v1.bpe", 1), &b), MOE_OK);
    assert_int_equal(moe_bpe_merge_count(b), 2);
    ASSERT_IDS(b, "bc", bc);
    moe_bpe_destroy(b);

    /* without it the last line is dropped like the empty string after "\n" */
    assert_int_equal(moe_bpe_load_gpt2(enc_path, write_vocab_bpe(v, "v2.bpe", 0), &b), MOE_OK);
    assert_int_equal(moe_bpe_merge_count(b), 1);
    ASSERT_IDS(b, "ab", ab);
    ASSERT_IDS(b, "bc", 'b', 'c');
    moe_bpe_destroy(b);

    /* the first line is dropped whatever it holds */
    static const char no_header[] = "a b\nb c\n";
    assert_int_equal(moe_bpe_load_gpt2(enc_path, write_file("v3.bpe", no_header, sizeof no_header - 1), &b), MOE_OK);
    assert_int_equal(moe_bpe_merge_count(b), 1);
    ASSERT_IDS(b, "ab", 'a', 'b');
    ASSERT_IDS(b, "bc", bc);
    moe_bpe_destroy(b);

    /* universal newlines: \r\n and a lone \r end lines too; blank lines take a rank */
    static const char crlf[] = "#version: 0.2\r\na b\r\n\r\nb c\r";
    assert_int_equal(moe_bpe_load_gpt2(enc_path, write_file("v4.bpe", crlf, sizeof crlf - 1), &b), MOE_OK);
    assert_int_equal(moe_bpe_merge_count(b), 2);
    ASSERT_IDS(b, "abc", ab, 'c');
    moe_bpe_destroy(b);

    /* an empty file and a header alone have no merges */
    assert_int_equal(moe_bpe_load_gpt2(enc_path, write_file("v5.bpe", "", 0), &b), MOE_OK);
    assert_int_equal(moe_bpe_merge_count(b), 0);
    moe_bpe_destroy(b);
    assert_int_equal(moe_bpe_load_gpt2(enc_path, write_file("v6.bpe", "#version: 0.2", 13), &b), MOE_OK);
    assert_int_equal(moe_bpe_merge_count(b), 0);
    moe_bpe_destroy(b);

    /* fields split on any Python whitespace, here a tab and U+3000 */
    static const char ws[] = "#version: 0.2\n\ta\xE3\x80\x80" "b  \n";
    assert_int_equal(moe_bpe_load_gpt2(enc_path, write_file("v7.bpe", ws, sizeof ws - 1), &b), MOE_OK);
    ASSERT_IDS(b, "ab", ab);
    moe_bpe_destroy(b);
    free(v);
}

static void test_bpe_duplicate_merge_takes_the_later_rank(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    int ab = tv_merge(v, "a", "b");
    int bc = tv_merge(v, "b", "c");
    moe_bpe *b = load_gpt2(v);
    ASSERT_IDS(b, "abc", ab, 'c');
    moe_bpe_destroy(b);
    tv_merge(v, "a", "b"); /* again, after (b,c): its rank is now 2 */
    b = load_gpt2(v);
    assert_int_equal(moe_bpe_merge_count(b), 2);
    ASSERT_IDS(b, "abc", 'a', bc);
    moe_bpe_destroy(b);
    free(v);
}

/* random merges in random rank order, pieces short and long (the array and
 * the heap loops), against the reference */
static void test_bpe_merges_match_fairseq_loop(void **state)
{
    (void)state;
    moe_test_rng r = moe_test_rng_make(11);
    for (int round = 0; round < 6; round++) {
        tvocab *v = tv_new();
        int pool[TV_MAX];
        int np = 0;
        const char *alpha = round % 2 ? "ab" : "abc";
        for (const char *c = alpha; *c; c++)
            pool[np++] = (unsigned char)*c;
        for (int k = 0; k < 120 && v->n < TV_MAX - 1; k++) {
            int a = pool[moe_test_rng_int(&r, 0, np)], c = pool[moe_test_rng_int(&r, 0, np)];
            if (v->len[a] + v->len[c] > 40)
                continue;
            int before = v->n;
            int id = tv_merge_ids(v, a, c);
            if (v->n > before)
                pool[np++] = id;
        }
        /* shuffle the ranks: operands may now come from later merges */
        for (int i = v->nm - 1; i > 0; i--) {
            int j = (int)moe_test_rng_int(&r, 0, i + 1);
            int ta = v->ma[i], tb = v->mb[i];
            v->ma[i] = v->ma[j];
            v->mb[i] = v->mb[j];
            v->ma[j] = ta;
            v->mb[j] = tb;
        }
        moe_bpe *b = load_gpt2(v);
        char text[600];
        for (int t = 0; t < 40; t++) {
            size_t len = (size_t)moe_test_rng_int(&r, 1, t % 4 == 0 ? 600 : 90);
            for (size_t i = 0; i < len; i++) {
                double u = moe_test_rng_uniform(&r);
                text[i] = u < 0.03 ? ' ' : alpha[moe_test_rng_int(&r, 0, (int64_t)strlen(alpha))];
            }
            assert_encodes_like_fairseq(b, v, text, len);
        }
        moe_bpe_destroy(b);
        free(v);
    }
}

/* more distinct pre-tokens than the cache holds: it is cleared and refilled */
static void test_bpe_cache_overflow_keeps_results(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    static const char *const m[][2] = {{"e", "r"}, {"t", "h"}, {"a", "n"}, {"th", "e"}, {"i", "n"},
                                       {"o", "n"}, {"er", "s"}, {"an", "d"}, {"in", "g"}, {"r", "e"}};
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++)
        tv_merge(v, m[i][0], m[i][1]);
    moe_bpe *b = load_gpt2(v);
    moe_test_rng r = moe_test_rng_make(5);
    sbuf text = {0};
    for (int w = 0; w < 45000; w++) {
        char word[16];
        int len = (int)moe_test_rng_int(&r, 3, 10);
        word[0] = ' ';
        for (int i = 1; i <= len; i++)
            word[i] = "etaoinshrdg"[moe_test_rng_int(&r, 0, 11)];
        sb_add(&text, word, (size_t)len + 1);
    }
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *ids = NULL, *again = NULL;
    int64_t n = 0, cap = 0, n2 = 0, cap2 = 0;
    assert_int_equal(moe_bpe_encode(s, text.p, text.n, &ids, &n, &cap), MOE_OK);
    assert_int_equal(moe_bpe_encode(s, text.p, text.n, &again, &n2, &cap2), MOE_OK);
    assert_int_equal(n, n2);
    assert_memory_equal(ids, again, (size_t)n * sizeof *ids);
    /* the reference, word by word */
    int32_t ref[16];
    int64_t k = 0;
    for (size_t i = 0; i < text.n;) {
        size_t j = i + 1;
        while (j < text.n && text.p[j] != ' ')
            j++;
        int64_t rn = ref_bpe(v, text.p + i, j - i, ref);
        assert_true(k + rn <= n);
        assert_memory_equal(ids + k, ref, (size_t)rn * sizeof *ref);
        k += rn;
        i = j;
    }
    assert_int_equal(k, n);
    free(ids);
    free(again);
    free(text.p);
    moe_bpe_state_destroy(s);
    moe_bpe_destroy(b);
    free(v);
}

static void test_bpe_byte_without_id_is_an_error(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    /* no token "z": id 'z' is the string "zz" instead */
    v->tok['z'][0] = 'z';
    v->tok['z'][1] = 'z';
    v->len['z'] = 2;
    moe_bpe *b = load_gpt2(v);
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    assert_fails_with(moe_bpe_encode(s, "fizz", 4, &ids, &n, &cap), MOE_ERR_INVALID_ARG, "0x7A", "no id");
    free(ids);
    moe_bpe_state_destroy(s);
    moe_bpe_destroy(b);
    free(v);
}

/* ------------------------------------------------------------ load errors */

static void test_bpe_load_errors_name_the_file(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    tv_merge(v, "a", "b");
    char enc[256], bpe[256];
    snprintf(enc, sizeof enc, "%s", write_encoder(v, "encoder.json"));
    snprintf(bpe, sizeof bpe, "%s", write_vocab_bpe(v, "vocab.bpe", 1));
    moe_bpe *b = (moe_bpe *)&b;

    assert_fails_with(moe_bpe_load_gpt2(tmp_path("missing.json"), bpe, &b), MOE_ERR_IO, "missing.json",
                      "cannot open");
    assert_null(b);
    assert_fails_with(moe_bpe_load_gpt2(enc, tmp_path("missing.bpe"), &b), MOE_ERR_IO, "missing.bpe", "cannot open");

    const char *p = write_file("bad.json", "{\"a\": 1,", 8);
    assert_fails_with(moe_bpe_load_gpt2(p, bpe, &b), MOE_ERR_INVALID_ARG, "bad.json", "invalid JSON");
    p = write_file("list.json", "[1, 2]", 6);
    assert_fails_with(moe_bpe_load_gpt2(p, bpe, &b), MOE_ERR_INVALID_ARG, "list.json", "JSON object");
    p = write_file("str.json", "{\"a\": \"1\"}", 10);
    assert_fails_with(moe_bpe_load_gpt2(p, bpe, &b), MOE_ERR_INVALID_ARG, "str.json", "not an integer");
    p = write_file("neg.json", "{\"a\": -1}", 9);
    assert_fails_with(moe_bpe_load_gpt2(p, bpe, &b), MOE_ERR_INVALID_ARG, "neg.json", "id -1");
    p = write_file("empty.json", "{}", 2);
    assert_fails_with(moe_bpe_load_gpt2(p, bpe, &b), MOE_ERR_INVALID_ARG, "empty.json", "empty");

    static const char three[] = "#version: 0.2\na b\na b c\n";
    p = write_file("three.bpe", three, sizeof three - 1);
    assert_fails_with(moe_bpe_load_gpt2(enc, p, &b), MOE_ERR_INVALID_ARG, "three.bpe:3", "found 3 fields");
    static const char one[] = "#version: 0.2\nab\n";
    p = write_file("one.bpe", one, sizeof one - 1);
    assert_fails_with(moe_bpe_load_gpt2(enc, p, &b), MOE_ERR_INVALID_ARG, "one.bpe:2", "found 1 field");
    static const char unknown[] = "#version: 0.2\na b\nq \xE2\x82\xAC\n"; /* "€" is no byte char */
    p = write_file("unknown.bpe", unknown, sizeof unknown - 1);
    assert_fails_with(moe_bpe_load_gpt2(enc, p, &b), MOE_ERR_INVALID_ARG, "unknown.bpe:3", "is not a token");
    static const char no_result[] = "#version: 0.2\nb a\n"; /* "ba" is not in encoder.json */
    p = write_file("noresult.bpe", no_result, sizeof no_result - 1);
    assert_fails_with(moe_bpe_load_gpt2(enc, p, &b), MOE_ERR_INVALID_ARG, "noresult.bpe:2", "\"ba\"");
    static const char bad_utf8[] = "#version: 0.2\na b\na \xFF\n";
    p = write_file("badutf8.bpe", bad_utf8, sizeof bad_utf8 - 1);
    assert_fails_with(moe_bpe_load_gpt2(enc, p, &b), MOE_ERR_INVALID_ARG, "badutf8.bpe:3", "UTF-8");
    assert_null(b);
    free(v);
}

/* ------------------------------------------------------------ tokenizer.json */

static void test_bpe_tokenizer_json_matches_gpt2_files(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    tv_merge(v, " ", "t");
    tv_merge(v, "h", "e");
    tv_merge(v, " t", "he");
    tv_merge(v, "a", "\"");
    tv_merge(v, "\\", "n");
    tv_merge(v, "e", "r");
    moe_bpe *g = load_gpt2(v);
    static const char text[] = "the other \"a\" said \\n to them, then there";
    for (int form = MERGES_LEGACY; form <= MERGES_ARRAYS; form++) {
        const char *tj = write_tokenizer_json(v, form ? "arrays.json" : "legacy.json", form, byte_level_pt, NULL,
                                              NULL);
        moe_bpe *h;
        moe_status st = moe_bpe_load_tokenizer_json(tj, &h);
        if (st != MOE_OK)
            fail_msg("%s", moe_data_error());
        assert_int_equal(moe_bpe_merge_count(h), 6); /* "#version" took no rank */
        int32_t a[128], c[128];
        int64_t na = encode(g, text, a, 128), nc = encode(h, text, c, 128);
        assert_int_equal(na, nc);
        assert_memory_equal(a, c, (size_t)na * sizeof *a);
        assert_int_equal(a[0], 't');
        assert_int_equal(a[1], tv_find(v, "he", 2));
        assert_encodes_like_fairseq(h, v, text, sizeof text - 1);
        moe_bpe_destroy(h);
    }
    moe_bpe_destroy(g);
    free(v);
}

static void test_bpe_tokenizer_json_add_prefix_space(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    int sh = tv_merge(v, " ", "h");
    int shi = tv_merge(v, " h", "i");
    const char *tj = write_tokenizer_json(
        v, "aps.json", MERGES_LEGACY,
        "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true}", NULL,
        NULL);
    moe_bpe *h;
    assert_int_equal(moe_bpe_load_tokenizer_json(tj, &h), MOE_OK);
    ASSERT_IDS(h, "hi hi", shi, shi);
    ASSERT_IDS(h, " hi", shi);  /* already starts with a space: none added */
    ASSERT_IDS(h, "  hi", ' ', shi);
    ASSERT_IDS(h, "\nhi", ' ', '\n', 'h', 'i'); /* " \nhi" splits " ", "\n", "hi" */
    ASSERT_IDS(h, "h", sh);
    int32_t none[1];
    assert_int_equal(encode(h, "", none, 1), 0);
    moe_bpe_destroy(h);
    free(v);
}

/* Llama-3 style: a Split with its own pattern, then ByteLevel without regex */
static void test_bpe_tokenizer_json_split_sequence(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    int n12 = tv_merge(v, "1", "2");
    int n123 = tv_merge(v, "12", "3");
    tv_merge(v, "o", "k");
    int sok = tv_merge(v, " ", "ok");
    /* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
    static const char pat[] =
        "\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| "
        "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"";
    char pt[1024];
    snprintf(pt, sizeof pt,
             "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": %s}, "
             "\"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": "
             "false, \"trim_offsets\": true, \"use_regex\": false}]}",
             pat);
    const char *tj = write_tokenizer_json(v, "split.json", MERGES_ARRAYS, pt, NULL, NULL);
    moe_bpe *h;
    moe_status st = moe_bpe_load_tokenizer_json(tj, &h);
    if (st != MOE_OK)
        fail_msg("%s", moe_data_error());
    /* as the Python `regex` module (whose \s is White_Space, like Oniguruma's) splits it */
    static const split_case c = {"I'M 12345 ok\xC2\x85\xC2\x85x!!\n\nHi",
                                 {"I", "'M", " ", "123", "45", " ok", "\xC2\x85", "\xC2\x85x", "!!\n\n", "Hi"}};
    assert_splits(h, &c);
    static const split_case c2 = {"don'T stop", {"don", "'T", " stop"}};
    assert_splits(h, &c2);
    ASSERT_IDS(h, "12345 ok", n123, '4', '5', sok);
    (void)n12;
    moe_bpe_destroy(h);

    /* add_prefix_space in the Sequence's ByteLevel applies to every piece */
    snprintf(pt, sizeof pt,
             "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": %s}, "
             "\"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": "
             "true, \"trim_offsets\": true, \"use_regex\": false}]}",
             pat);
    tj = write_tokenizer_json(v, "split_aps.json", MERGES_ARRAYS, pt, NULL, NULL);
    assert_int_equal(moe_bpe_load_tokenizer_json(tj, &h), MOE_OK);
    ASSERT_IDS(h, "ok ok", sok, sok);
    moe_bpe_destroy(h);

    /* a String pattern is literal text */
    tj = write_tokenizer_json(v, "split_str.json", MERGES_ARRAYS,
                              "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
                              "{\"String\": \"+\"}, \"behavior\": \"Isolated\", \"invert\": false}, {\"type\": "
                              "\"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": "
                              "false}]}",
                              NULL, NULL);
    assert_int_equal(moe_bpe_load_tokenizer_json(tj, &h), MOE_OK);
    static const split_case c3 = {"ok+ok ok++", {"ok", "+", "ok ok", "+", "+"}};
    assert_splits(h, &c3);
    ASSERT_IDS(h, "ok+12", tv_find(v, "ok", 2), '+', n12);
    moe_bpe_destroy(h);
    free(v);
}

static void test_bpe_tokenizer_json_ignore_merges(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    int ab = tv_merge(v, "a", "b");
    int abc = tv_add_token(v, "abc", 3); /* a token no merge makes */
    const char *tj = write_tokenizer_json(v, "im.json", MERGES_LEGACY, byte_level_pt, "\"ignore_merges\": true", NULL);
    moe_bpe *h;
    assert_int_equal(moe_bpe_load_tokenizer_json(tj, &h), MOE_OK);
    ASSERT_IDS(h, "abc abcd", abc, ' ', ab, 'c', 'd'); /* " abcd" is not a token: merges as usual */
    moe_bpe_destroy(h);
    tj = write_tokenizer_json(v, "im0.json", MERGES_LEGACY, byte_level_pt, NULL, NULL);
    assert_int_equal(moe_bpe_load_tokenizer_json(tj, &h), MOE_OK);
    ASSERT_IDS(h, "abc", ab, 'c');
    moe_bpe_destroy(h);
    free(v);
}

static void test_bpe_tokenizer_json_refusals(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    tv_merge(v, "a", "b");
    static const char split_pt[] =
        "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\s+\"}, "
        "\"behavior\": \"%s\", \"invert\": %s}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
        "\"trim_offsets\": true, \"use_regex\": %s}]}";
    char removed[512], inverted[512], regex_twice[512];
    snprintf(removed, sizeof removed, split_pt, "Removed", "false", "false");
    snprintf(inverted, sizeof inverted, split_pt, "Isolated", "true", "false");
    snprintf(regex_twice, sizeof regex_twice, split_pt, "Isolated", "false", "true");
    static const char class_S[] =
        "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": "
        "\"[^\\\\S\\\\n]+\"}, \"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", "
        "\"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": false}]}";
    static const char bad_regex[] =
        "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a\"}, "
        "\"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
        "\"trim_offsets\": true, \"use_regex\": false}]}";
    const struct {
        const char *pt, *model_extra, *top_extra;
        moe_status st;
        const char *part;
    } cases[] = {
        {byte_level_pt, "\"type\": \"WordPiece\"", NULL, MOE_ERR_UNSUPPORTED, "model.type"},
        {byte_level_pt, "\"dropout\": 0.1", NULL, MOE_ERR_UNSUPPORTED, "model.dropout"},
        {byte_level_pt, "\"continuing_subword_prefix\": \"##\"", NULL, MOE_ERR_UNSUPPORTED,
         "model.continuing_subword_prefix"},
        {byte_level_pt, "\"end_of_word_suffix\": \"</w>\"", NULL, MOE_ERR_UNSUPPORTED, "model.end_of_word_suffix"},
        {byte_level_pt, "\"byte_fallback\": true", NULL, MOE_ERR_UNSUPPORTED, "model.byte_fallback"},
        {byte_level_pt, "\"ignore_merges\": 1", NULL, MOE_ERR_INVALID_ARG, "model.ignore_merges"},
        {byte_level_pt, "\"merges\": [\"a  b\"]", NULL, MOE_ERR_INVALID_ARG, "model.merges[0]"},
        {byte_level_pt, "\"merges\": [[\"a\", \"b\", \"c\"]]", NULL, MOE_ERR_INVALID_ARG, "model.merges[0]"},
        {byte_level_pt, "\"merges\": [\"a b\", \"q \\u00e9\"]", NULL, MOE_ERR_INVALID_ARG, "model.merges[1]"},
        {byte_level_pt, "\"vocab\": []", NULL, MOE_ERR_INVALID_ARG, "model.vocab"},
        {byte_level_pt, NULL, "\"normalizer\": {\"type\": \"NFC\"}", MOE_ERR_UNSUPPORTED, "normalizer"},
        {byte_level_pt, NULL, "\"model\": 3", MOE_ERR_INVALID_ARG, "model is a number"},
        {"null", NULL, NULL, MOE_ERR_UNSUPPORTED, "pre_tokenizer is null"},
        {"{\"type\": \"Whitespace\"}", NULL, NULL, MOE_ERR_UNSUPPORTED, "\"Whitespace\""},
        {"{\"type\": \"ByteLevel\", \"trim_offsets\": true}", NULL, NULL, MOE_ERR_INVALID_ARG,
         "pre_tokenizer.add_prefix_space is missing"},
        {removed, NULL, NULL, MOE_ERR_UNSUPPORTED, "behavior is \"Removed\""},
        {inverted, NULL, NULL, MOE_ERR_UNSUPPORTED, "invert is true"},
        {regex_twice, NULL, NULL, MOE_ERR_UNSUPPORTED, "pretokenizers[1].use_regex"},
        {class_S, NULL, NULL, MOE_ERR_UNSUPPORTED, "\\S inside"},
        {bad_regex, NULL, NULL, MOE_ERR_INVALID_ARG, "does not compile"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *tj = write_tokenizer_json(v, "refuse.json", MERGES_LEGACY, cases[i].pt, cases[i].model_extra,
                                              cases[i].top_extra);
        moe_bpe *h = (moe_bpe *)&h;
        moe_status st = moe_bpe_load_tokenizer_json(tj, &h);
        if (st != cases[i].st || !strstr(moe_data_error(), cases[i].part) || !strstr(moe_data_error(), "refuse.json"))
            fail_msg("case %zu: status %d, message \"%s\"; expected status %d naming refuse.json and \"%s\"", i,
                     (int)st, moe_data_error(), (int)cases[i].st, cases[i].part);
        assert_null(h);
        moe_data_clear_error();
    }
    moe_bpe *h;
    assert_fails_with(moe_bpe_load_tokenizer_json(tmp_path("nope.json"), &h), MOE_ERR_IO, "nope.json", "cannot open");
    free(v);
}

/* ------------------------------------------------------------ decoding */

#define C(in, out) {in, sizeof in - 1, out, sizeof out - 1}

/* bytes.decode("utf-8", errors="replace") in Python 3.11 */
static const struct {
    const char in[16];
    size_t in_len;
    const char out[40];
    size_t out_len;
} repairs[] = {
    C("\x80", "\xef\xbf\xbd"),
    C("\xbf\x41", "\xef\xbf\xbd\x41"),
    C("\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xc1\xbf", "\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xc2", "\xef\xbf\xbd"),
    C("\xc2\x41", "\xef\xbf\xbd\x41"),
    C("\xc2\xc2\xa9", "\xef\xbf\xbd\xc2\xa9"),
    C("\xe0", "\xef\xbf\xbd"),
    C("\xe0\x80\xaf", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xe0\xa0", "\xef\xbf\xbd"),
    C("\xe0\xa0\x41", "\xef\xbf\xbd\x41"),
    C("\xe1\x80\x00\x41", "\xef\xbf\xbd\x00\x41"),
    C("\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xed\x9f\xbf", "\xed\x9f\xbf"),
    C("\xef\xbf\xbf", "\xef\xbf\xbf"),
    C("\xf0", "\xef\xbf\xbd"),
    C("\xf0\x8f\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xf0\x90\x80\x80", "\xf0\x90\x80\x80"),
    C("\xf0\x90\x80", "\xef\xbf\xbd"),
    C("\xf0\x90", "\xef\xbf\xbd"),
    C("\xf4\x8f\x80\x80", "\xf4\x8f\x80\x80"),
    C("\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xf5\x80\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xff", "\xef\xbf\xbd"),
    C("\xfe\x41\xff", "\xef\xbf\xbd\x41\xef\xbf\xbd"),
    C("\x41\xe2\x82\xac\x42", "\x41\xe2\x82\xac\x42"),
    C("\xe2\x82", "\xef\xbf\xbd"),
    C("\xf0\xf0\x90\x80\x80", "\xef\xbf\xbd\xf0\x90\x80\x80"),
    C("\xc3\xa9\xe9", "\xc3\xa9\xef\xbf\xbd"),
    C("\x00\xc3", "\x00\xef\xbf\xbd"),
    C("\xf1\x80\x80\x80\xf1\x80", "\xf1\x80\x80\x80\xef\xbf\xbd"),
    C("\xe0\x80\x41", "\xef\xbf\xbd\xef\xbf\xbd\x41"),
    /* random byte strings, seed 2024 */
    C("\x9f\xf4\xef\xbf\xa0\xf4\xdf", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xa0\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xf5\xbf\xed\xa0\xf0\xff\xf4\xe0\xc2",
      "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xed\xf4\xef\xa0\xbf\xed\xf4", "\xef\xbf\xbd\xef\xbf\xbd\xef\xa0\xbf\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xed\x80\xf4\xf5\xff\xa0", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xff\xdf\x41\xf5\xc2", "\xef\xbf\xbd\xef\xbf\xbd\x41\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xc2\xf5\xa0\xc2\xdf\xdf", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xef\xa0\xff\xdf\xa0\xa0", "\xef\xbf\xbd\xef\xbf\xbd\xdf\xa0\xef\xbf\xbd"),
    C("\xf4\xa0\xf5\x41", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\x41"),
    C("\xe0\xc2\x9f\xa0\xc2", "\xef\xbf\xbd\xc2\x9f\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xef\xff\xf0\x9f\xbf\xdf\xef", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
    C("\xf4\xf5\xff\x9f\xc2\xa0\xef\xf0\x80",
      "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xc2\xa0\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"),
};

static void test_bpe_decode_replaces_invalid_utf8_like_python(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    moe_bpe *b = load_gpt2(v);
    for (size_t i = 0; i < sizeof repairs / sizeof repairs[0]; i++) {
        int32_t ids[16];
        for (size_t k = 0; k < repairs[i].in_len; k++)
            ids[k] = (uint8_t)repairs[i].in[k]; /* id = byte value in this vocabulary */
        char *out;
        size_t len;
        assert_int_equal(moe_bpe_decode(b, ids, (int64_t)repairs[i].in_len, &out, &len), MOE_OK);
        if (len != repairs[i].out_len || memcmp(out, repairs[i].out, len) != 0)
            fail_msg("case %zu: decoded %zu bytes, expected %zu", i, len, repairs[i].out_len);
        assert_int_equal(out[len], '\0');
        free(out);
    }
    /* ids spanning tokens: the bytes are joined before the UTF-8 repair */
    tv_merge(v, "\xC3", "\xA9");
    moe_bpe_destroy(b);
    b = load_gpt2(v);
    int32_t split_char[] = {0xE2, 0x82, 0xAC, 256, 0xC3};
    char *out;
    size_t len;
    assert_int_equal(moe_bpe_decode(b, split_char, 5, &out, &len), MOE_OK);
    assert_int_equal(len, 8);
    assert_memory_equal(out, "\xE2\x82\xAC\xC3\xA9\xEF\xBF\xBD", 8);
    free(out);
    moe_bpe_destroy(b);
    free(v);
}

static void test_bpe_decode_errors(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    moe_bpe *b = load_gpt2(v);
    char *out = (char *)&out;
    size_t len;
    int32_t past[] = {'a', 256};
    assert_fails_with(moe_bpe_decode(b, past, 2, &out, &len), MOE_ERR_INVALID_ARG, "id 256", "not in the vocabulary");
    assert_null(out);
    int32_t neg[] = {-3};
    assert_fails_with(moe_bpe_decode(b, neg, 1, &out, &len), MOE_ERR_INVALID_ARG, "id -3", "not in the vocabulary");
    int32_t none[1];
    assert_int_equal(moe_bpe_decode(b, none, 0, &out, &len), MOE_OK);
    assert_int_equal(len, 0);
    assert_string_equal(out, "");
    free(out);
    moe_bpe_destroy(b);

    /* a token whose chars are not byte chars ("€") stands for no bytes; a hole in the ids */
    static const char enc[] = "{\"a\": 0, \"\\u20ac\": 1, \"b\": 5}";
    const char *p = write_file("euro.json", enc, sizeof enc - 1);
    char ep[256];
    snprintf(ep, sizeof ep, "%s", p);
    assert_int_equal(moe_bpe_load_gpt2(ep, write_file("none.bpe", "#version: 0.2\n", 14), &b), MOE_OK);
    assert_int_equal(moe_bpe_vocab_size(b), 6);
    assert_null(moe_bpe_token(b, 3, NULL));
    int32_t euro[] = {0, 1};
    assert_fails_with(moe_bpe_decode(b, euro, 2, &out, &len), MOE_ERR_INVALID_ARG, "id 1", "byte map");
    int32_t hole[] = {3};
    assert_fails_with(moe_bpe_decode(b, hole, 1, &out, &len), MOE_ERR_INVALID_ARG, "id 3", "not in the vocabulary");
    int32_t ok[] = {0, 5};
    assert_int_equal(moe_bpe_decode(b, ok, 2, &out, &len), MOE_OK);
    assert_string_equal(out, "ab");
    free(out);
    moe_bpe_destroy(b);
    free(v);
}

static size_t put_utf8(uint8_t *o, uint32_t cp)
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

/* random code points of every plane, and NUL, survive encode + decode */
static void test_bpe_decode_round_trip_random_unicode(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    tv_merge(v, "\xE4", "\xB8");
    tv_merge(v, " ", "a");
    tv_merge(v, "\xF0", "\x9F");
    moe_bpe *b = load_gpt2(v);
    moe_test_rng r = moe_test_rng_make(3);
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    char text[4 * 400];
    for (int t = 0; t < 300; t++) {
        size_t len = 0;
        int chars = (int)moe_test_rng_int(&r, 0, 400);
        for (int k = 0; k < chars; k++) {
            uint32_t cp;
            double u = moe_test_rng_uniform(&r);
            if (u < 0.3)
                cp = (uint32_t)moe_test_rng_int(&r, 0, 0x80);
            else if (u < 0.4)
                cp = " \t\n"[moe_test_rng_int(&r, 0, 3)];
            else if (u < 0.6)
                cp = (uint32_t)moe_test_rng_int(&r, 0x80, 0x800);
            else if (u < 0.85)
                cp = (uint32_t)moe_test_rng_int(&r, 0x800, 0x10000);
            else
                cp = (uint32_t)moe_test_rng_int(&r, 0x10000, 0x110000);
            if (cp >= 0xD800 && cp < 0xE000)
                cp = 0x4E00;
            len += put_utf8((uint8_t *)text + len, cp);
        }
        moe_status st = moe_bpe_encode(s, text, len, &ids, &n, &cap);
        if (st != MOE_OK)
            fail_msg("text %d: %s", t, moe_data_error());
        char *back;
        size_t bl;
        assert_int_equal(moe_bpe_decode(b, ids, n, &back, &bl), MOE_OK);
        assert_int_equal(bl, len);
        assert_memory_equal(back, text, len);
        free(back);
    }
    free(ids);
    moe_bpe_state_destroy(s);
    moe_bpe_destroy(b);
    free(v);
}

/* ------------------------------------------------------------ a trained vocabulary */

static const char *const fragments[] = {
    "The quick brown fox jumps over the lazy dog. ",
    "It's what they'll do, and we're sure you've seen it; I'd say I'm done.\n",
    "Numbers: 3.14159, 2,718 and 1e-9 -- 42!\n",
    "Caf\xC3\xA9 cr\xC3\xA8me br\xC3\xBBl\xC3\xA9\x65, na\xC3\xAFve fa\xC3\xA7\x61\x64\x65. ",
    "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE6\x96\x87\xE7\xAB\xA0\xE3\x80\x82",
    "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82 \xD0\xBC\xD0\xB8\xD1\x80! ",
    "emoji \xF0\x9F\x98\x80\xF0\x9F\x8E\x89 and ZWJ \xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB\n",
    "tabs\tand  double  spaces   here\n\n",
    "nbsp\xC2\xA0here, line\xE2\x80\xA8sep, ideographic\xE3\x80\x80space\n",
    "    indented code(x) { return x * 2; }\n",
    "<|endoftext|>",
    "\xD8\xA7\xD9\x84\xD8\xB9\xD8\xB1\xD8\xA8\xD9\x8A\xD8\xA9 \xD9\xA1\xD9\xA2\xD9\xA3 ",
};

/* greedy BPE training over the pre-tokens: the most frequent adjacent pair,
 * merged everywhere, n_merges times */
static void train(tvocab *v, const pieces *ps, int n_merges)
{
    size_t total = ps->all.n;
    int32_t *sym = malloc(total * sizeof *sym);
    size_t *start = malloc((size_t)(ps->n + 1) * sizeof *start), *cnt = malloc((size_t)ps->n * sizeof *cnt);
    int32_t *pc = calloc((size_t)TV_MAX * TV_MAX, sizeof *pc);
    assert_true(sym && start && cnt && pc);
    for (int i = 0; i < ps->n; i++) {
        start[i] = ps->off[i];
        cnt[i] = ps->len[i];
        for (size_t k = 0; k < ps->len[i]; k++)
            sym[ps->off[i] + k] = (uint8_t)ps->all.p[ps->off[i] + k];
    }
    for (int it = 0; it < n_merges; it++) {
        memset(pc, 0, (size_t)TV_MAX * TV_MAX * sizeof *pc);
        int best = 0, ba = -1, bb = -1;
        for (int i = 0; i < ps->n; i++)
            for (size_t k = 0; k + 1 < cnt[i]; k++) {
                int a = sym[start[i] + k], c = sym[start[i] + k + 1];
                if (v->len[a] + v->len[c] > TV_TOK)
                    continue;
                int x = ++pc[a * TV_MAX + c];
                if (x > best) {
                    best = x;
                    ba = a;
                    bb = c;
                }
            }
        if (best < 2)
            break;
        int id = tv_merge_ids(v, ba, bb);
        for (int i = 0; i < ps->n; i++) {
            size_t w = 0;
            for (size_t k = 0; k < cnt[i]; k++) {
                if (k + 1 < cnt[i] && sym[start[i] + k] == ba && sym[start[i] + k + 1] == bb) {
                    sym[start[i] + w++] = id;
                    k++;
                } else
                    sym[start[i] + w++] = sym[start[i] + k];
            }
            cnt[i] = w;
        }
    }
    free(sym);
    free(start);
    free(cnt);
    free(pc);
}

static void test_bpe_trained_vocab_round_trip(void **state)
{
    (void)state;
    moe_test_rng r = moe_test_rng_make(17);
    sbuf text = {0};
    while (text.n < 6000)
        sb_str(&text, fragments[moe_test_rng_int(&r, 0, (int64_t)(sizeof fragments / sizeof fragments[0]))]);

    tvocab *v = tv_new();
    moe_bpe *b0 = load_gpt2(v);
    moe_bpe_state *s0;
    assert_int_equal(moe_bpe_state_create(b0, &s0), MOE_OK);
    pieces *ps = calloc(1, sizeof *ps);
    assert_non_null(ps);
    assert_int_equal(moe_bpe_pretokenize(s0, text.p, text.n, collect_piece, ps), MOE_OK);
    train(v, ps, 150);
    assert_true(v->nm >= 100);
    moe_bpe_state_destroy(s0);
    moe_bpe_destroy(b0);

    moe_bpe *b = load_gpt2(v);
    assert_int_equal(moe_bpe_merge_count(b), v->nm);
    assert_encodes_like_fairseq(b, v, text.p, text.n);
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    assert_int_equal(moe_bpe_encode(s, text.p, text.n, &ids, &n, &cap), MOE_OK);
    assert_true(n < (int64_t)text.n / 2); /* the merges do their work */
    char *back;
    size_t bl;
    assert_int_equal(moe_bpe_decode(b, ids, n, &back, &bl), MOE_OK);
    assert_int_equal(bl, text.n);
    assert_memory_equal(back, text.p, text.n);
    free(back);

    /* the same vocabulary through tokenizer.json gives the same ids */
    const char *tj = write_tokenizer_json(v, "trained.json", MERGES_ARRAYS, byte_level_pt, NULL, NULL);
    moe_bpe *h;
    assert_int_equal(moe_bpe_load_tokenizer_json(tj, &h), MOE_OK);
    moe_bpe_state *hs;
    assert_int_equal(moe_bpe_state_create(h, &hs), MOE_OK);
    int32_t *hids = NULL;
    int64_t hn = 0, hcap = 0;
    assert_int_equal(moe_bpe_encode(hs, text.p, text.n, &hids, &hn, &hcap), MOE_OK);
    assert_int_equal(hn, n);
    assert_memory_equal(hids, ids, (size_t)n * sizeof *ids);
    free(hids);
    moe_bpe_state_destroy(hs);
    moe_bpe_destroy(h);

    free(ids);
    free(ps->all.p);
    free(ps);
    free(text.p);
    moe_bpe_state_destroy(s);
    moe_bpe_destroy(b);
    free(v);
}

/* one moe_bpe, one state per thread: the same ids on every thread */
typedef struct thread_job {
    moe_bpe *b;
    const char *text;
    size_t len;
    const int32_t *want;
    int64_t n_want;
    int ok;
} thread_job;

static void *encode_job(void *arg)
{
    thread_job *j = arg;
    moe_bpe_state *s;
    if (moe_bpe_state_create(j->b, &s) != MOE_OK)
        return NULL;
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    j->ok = 1;
    for (int rep = 0; rep < 20 && j->ok; rep++)
        j->ok = moe_bpe_encode(s, j->text, j->len, &ids, &n, &cap) == MOE_OK && n == j->n_want &&
                memcmp(ids, j->want, (size_t)n * sizeof *ids) == 0;
    free(ids);
    moe_bpe_state_destroy(s);
    return NULL;
}

static void test_bpe_states_share_one_bpe_across_threads(void **state)
{
    (void)state;
    tvocab *v = tv_new();
    static const char *const m[][2] = {{"t", "h"}, {"th", "e"}, {" ", "the"}, {"e", "r"}, {"\xC3", "\xA9"}};
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++)
        tv_merge(v, m[i][0], m[i][1]);
    moe_bpe *b = load_gpt2(v);
    sbuf text = {0};
    for (int k = 0; k < 200; k++)
        sb_str(&text, fragments[k % (int)(sizeof fragments / sizeof fragments[0])]);
    moe_bpe_state *s;
    assert_int_equal(moe_bpe_state_create(b, &s), MOE_OK);
    int32_t *want = NULL;
    int64_t n = 0, cap = 0;
    assert_int_equal(moe_bpe_encode(s, text.p, text.n, &want, &n, &cap), MOE_OK);
    moe_bpe_state_destroy(s);
    thread_job jobs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){b, text.p, text.n, want, n, 0};
        assert_int_equal(pthread_create(&th[i], NULL, encode_job, &jobs[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_true(jobs[i].ok);
    }
    free(want);
    free(text.p);
    moe_bpe_destroy(b);
    free(v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_bpe_byte_map, case_setup),
        cmocka_unit_test_setup(test_bpe_pretokenize_gpt2_splits, case_setup),
        cmocka_unit_test_setup(test_bpe_encode_rejects_invalid_utf8, case_setup),
        cmocka_unit_test_setup(test_bpe_merges_follow_rank, case_setup),
        cmocka_unit_test_setup(test_bpe_merges_non_overlapping_left_to_right, case_setup),
        cmocka_unit_test_setup(test_bpe_vocab_bpe_first_and_last_line_dropped, case_setup),
        cmocka_unit_test_setup(test_bpe_duplicate_merge_takes_the_later_rank, case_setup),
        cmocka_unit_test_setup(test_bpe_merges_match_fairseq_loop, case_setup),
        cmocka_unit_test_setup(test_bpe_cache_overflow_keeps_results, case_setup),
        cmocka_unit_test_setup(test_bpe_byte_without_id_is_an_error, case_setup),
        cmocka_unit_test_setup(test_bpe_load_errors_name_the_file, case_setup),
        cmocka_unit_test_setup(test_bpe_tokenizer_json_matches_gpt2_files, case_setup),
        cmocka_unit_test_setup(test_bpe_tokenizer_json_add_prefix_space, case_setup),
        cmocka_unit_test_setup(test_bpe_tokenizer_json_split_sequence, case_setup),
        cmocka_unit_test_setup(test_bpe_tokenizer_json_ignore_merges, case_setup),
        cmocka_unit_test_setup(test_bpe_tokenizer_json_refusals, case_setup),
        cmocka_unit_test_setup(test_bpe_decode_replaces_invalid_utf8_like_python, case_setup),
        cmocka_unit_test_setup(test_bpe_decode_errors, case_setup),
        cmocka_unit_test_setup(test_bpe_decode_round_trip_random_unicode, case_setup),
        cmocka_unit_test_setup(test_bpe_trained_vocab_round_trip, case_setup),
        cmocka_unit_test_setup(test_bpe_states_share_one_bpe_across_threads, case_setup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
