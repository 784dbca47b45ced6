/* preprocess.c: moelm-preprocess, fairseq-preprocess --only-source for
 * language-model data (DATA_SPEC.md §1), optionally with GPT-2 byte-level BPE
 * applied on the way in (§4.4).
 *
 * Flow as fairseq_cli/preprocess.py: log the arguments, refuse an existing
 * <destdir>/dict.txt unless --srcdict, count the train file into a dictionary
 * (or load --srcdict, then neither finalized nor padded), binarize train,
 * valid, valid1.., test, test1.. into mmap datasets with eos after every line,
 * log a summary per file. --workers N splits each file into N line-aligned
 * chunks handled by N threads (this one included): counts are merged, the
 * chunks' datasets appended in order, so the output bytes do not depend on N
 * (for CR and CRLF files too, where fairseq's processes duplicate lines: this
 * is its --workers 1 result).
 *
 * With --bpe gpt2 (and its two files) or --tokenizer tokenizer.json each line
 * is first stripped of whitespace, dropped when empty (kept as an empty item
 * with --keep-empty) and encoded to GPT-2 ids, which are then words like any
 * other ("15496"): what examples/roberta/multiprocessing_bpe_encoder.py
 * followed by fairseq-preprocess gives, without the intermediate text file.
 * fairseq-preprocess itself accepts --bpe and ignores it; here it encodes, so
 * the files must be named (a habit flag on already encoded text would encode
 * the digits again). When a dictionary is built, the counting pass keeps each
 * chunk's ids in a temporary file that the binarizing pass reads back, so BPE
 * runs once per line.
 *
 * Streaming: memory follows the vocabulary and the longest line, not the
 * corpus. Outputs are written under temporary names in destdir and renamed at
 * the very end, datasets first and dict.txt last; a failure removes the
 * temporaries and leaves earlier files as they were.
 *
 * Messages: stdout gets fairseq's log lines, <destdir>/preprocess.log the
 * bare messages (appended). Errors are one line on stderr, exit 2 for
 * command-line mistakes and 1 otherwise. Where fairseq prints a traceback
 * (invalid UTF-8, a missing file) the message names the file, the line and
 * the byte offset instead.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/strbuf.h"
#include "core/log.h"
#include "core/options.h"
#include "data/bpe.h"
#include "data/dictionary.h"
#include "data/error.h"
#include "data/indexed.h"
#include "data/text.h"

#define PROG "moelm-preprocess"
#define LOGGER "fairseq_cli.preprocess"
#define MAX_WORKERS 1024
#define MAX_SPLITS 256

#define NOLIMIT 0, 0

static const moe_option preprocess_options[] = {
    {"help", MOE_OPT_FLAG, NULL, "show this help message and exit", NOLIMIT, NULL},
    {"only-source", MOE_OPT_FLAG, NULL,
     "only process the source language (accepted; moelm-preprocess always writes monolingual data)", NOLIMIT, NULL},
    {"source-lang", MOE_OPT_STRING, NULL,
     "refused: language-model data has no language suffix (leave unset, as with --only-source)", NOLIMIT, NULL},
    {"target-lang", MOE_OPT_STRING, NULL, "refused: language-model data has no target side", NOLIMIT, NULL},
    {"trainpref", MOE_OPT_STRING, NULL, "the train text file (the dictionary is counted from it)", NOLIMIT, NULL},
    {"validpref", MOE_OPT_STRING, NULL,
     "comma separated valid text files, written as valid, valid1, valid2, ...", NOLIMIT, NULL},
    {"testpref", MOE_OPT_STRING, NULL, "comma separated test text files, written as test, test1, ...", NOLIMIT,
     NULL},
    {"destdir", MOE_OPT_STRING, "data-bin", "destination dir", NOLIMIT, NULL},
    {"srcdict", MOE_OPT_STRING, NULL,
     "reuse given dictionary (then --nwordssrc, --thresholdsrc and --padding-factor are ignored, as in fairseq)",
     NOLIMIT, NULL},
    {"nwordssrc", MOE_OPT_INT, "-1", "number of source words to retain, the 4 special symbols included", NOLIMIT,
     NULL},
    {"thresholdsrc", MOE_OPT_INT, "0", "map words appearing less than threshold times to unknown", NOLIMIT, NULL},
    {"padding-factor", MOE_OPT_INT, "8", "pad dictionary size to be multiple of N", NOLIMIT, NULL},
    {"workers", MOE_OPT_INT, "1", "number of parallel workers (threads); the output does not depend on it", 1,
     MAX_WORKERS, NULL},
    {"dataset-impl", MOE_OPT_CHOICE, "mmap", "output dataset implementation (only mmap is written)", NOLIMIT,
     "raw|lazy|cached|mmap|fasta|huffman"},
    {"dict-only", MOE_OPT_FLAG, NULL, "if true, only builds a dictionary and then exits", NOLIMIT, NULL},
    {"task", MOE_OPT_CHOICE, "translation",
     "accepted for fairseq compatibility: these tasks build the same dictionary", NOLIMIT,
     "translation|language_modeling|masked_lm"},
    {"bpe", MOE_OPT_CHOICE, NULL,
     "gpt2: encode every line with GPT-2 byte-level BPE first (needs --gpt2-encoder-json and --gpt2-vocab-bpe); "
     "unlike fairseq-preprocess, which ignores --bpe, the text is encoded here",
     NOLIMIT, "gpt2"},
    {"gpt2-encoder-json", MOE_OPT_STRING, NULL, "path to GPT-2's encoder.json (with --bpe gpt2)", NOLIMIT, NULL},
    {"gpt2-vocab-bpe", MOE_OPT_STRING, NULL, "path to GPT-2's vocab.bpe (with --bpe gpt2)", NOLIMIT, NULL},
    {"tokenizer", MOE_OPT_STRING, NULL,
     "a Hugging Face tokenizer.json holding a GPT-2 style byte-level BPE: encode every line with it (instead of "
     "--bpe gpt2)",
     NOLIMIT, NULL},
    {"keep-empty", MOE_OPT_FLAG, NULL,
     "with BPE: keep lines that are empty after stripping, as the item [eos] (document breaks), instead of "
     "dropping them",
     NOLIMIT, NULL},
};

#define N_OPTIONS ((int)(sizeof preprocess_options / sizeof preprocess_options[0]))

/* ------------------------------------------------------------------ context */

typedef struct prep {
    const char *destdir;
    int workers;
    moe_dict *dict;
    moe_bpe *bpe; /* NULL: whitespace-separated words */
    int keep_empty;
    int dtype;
    FILE *log;
    atomic_int stop; /* set by a failing chunk: the others give up early */
    char tag[48];    /* ".tmp<pid>": marks this run's temporaries */
    /* finished temporary prefixes (.bin/.idx) and final names, renamed at the end */
    char *tmp_prefix[MAX_SPLITS];
    char *final_prefix[MAX_SPLITS];
    int n_done;
} prep;

/* One line of log: stdout as fairseq's logger, the file bare. */
static void plog(prep *p, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void plog(prep *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = NULL;
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(NULL, 0, fmt, aq);
    va_end(aq);
    if (n >= 0 && (msg = malloc((size_t)n + 1)) != NULL)
        vsnprintf(msg, (size_t)n + 1, fmt, ap);
    va_end(ap);
    if (!msg)
        return;
    moe_log(MOE_LOG_INFO, LOGGER, "%s", msg);
    if (p->log) {
        fprintf(p->log, "%s\n", msg);
        fflush(p->log);
    }
    free(msg);
}

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%s/%s", dir, name);
    return s;
}

static char *str_printf(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
static char *str_printf(const char *fmt, ...)
{
    va_list ap, aq;
    va_start(ap, fmt);
    va_copy(aq, ap);
    int n = vsnprintf(NULL, 0, fmt, aq);
    va_end(aq);
    char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (s)
        vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

static moe_status nomem(void) { return moe_data_fail(MOE_ERR_NOMEM, "out of host memory"); }

/* os.makedirs(path, exist_ok=True) */
static moe_status make_dirs(const char *path)
{
    char *s = str_printf("%s", path);
    if (!s)
        return nomem();
    moe_status st = MOE_OK;
    for (char *q = s + 1;; q++) {
        if (*q != '/' && *q != '\0')
            continue;
        char c = *q;
        *q = '\0';
        if (mkdir(s, 0777) != 0 && errno != EEXIST) {
            st = moe_data_fail(MOE_ERR_IO, "cannot create the directory '%s' (for --destdir %s): %s", s, path,
                               strerror(errno));
            break;
        }
        *q = c;
        if (c == '\0')
            break;
    }
    struct stat sb;
    if (st == MOE_OK && (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode)))
        st = moe_data_fail(MOE_ERR_IO, "--destdir %s: expected a directory, found a file", path);
    free(s);
    return st;
}

static void unlink_dataset(const char *prefix)
{
    char *b = str_printf("%s.bin", prefix), *i = str_printf("%s.idx", prefix);
    if (b)
        unlink(b);
    if (i)
        unlink(i);
    free(b);
    free(i);
}

/* ------------------------------------------------------------ Python text */

/* Python's format(v, ".3"): %.3g, except that the exponent form starts at
 * 1e+02 and a fixed-point result keeps at least one decimal. */
static void py_format_3(char *buf, size_t size, double v)
{
    if (v == 0.0) {
        snprintf(buf, size, "0.0");
        return;
    }
    char e[48];
    snprintf(e, sizeof e, "%.2e", v);
    char *ep = strchr(e, 'e');
    int x = atoi(ep + 1);
    if (x < -4 || x >= 2) {
        *ep = '\0';
        size_t n = strlen(e);
        while (n > 0 && e[n - 1] == '0')
            e[--n] = '\0';
        if (n > 0 && e[n - 1] == '.')
            e[--n] = '\0';
        snprintf(buf, size, "%se%c%02d", e, x < 0 ? '-' : '+', x < 0 ? -x : x);
        return;
    }
    snprintf(buf, size, "%.*f", 2 - x, v);
    size_t n = strlen(buf);
    if (strchr(buf, '.')) {
        while (n > 0 && buf[n - 1] == '0')
            buf[--n] = '\0';
        if (n > 0 && buf[n - 1] == '.' && n + 1 < size) {
            buf[n++] = '0';
            buf[n] = '\0';
        }
    } else if (n + 2 < size) {
        memcpy(buf + n, ".0", 3);
    }
}

/* Code points Python's repr escapes beyond the ASCII controls: the C1
 * controls, the non-space separators and the common format characters. */
static int py_unprintable(uint32_t cp)
{
    return (cp >= 0x80 && cp <= 0xA0) || cp == 0xAD || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200F) ||
           (cp >= 0x2028 && cp <= 0x202F) || (cp >= 0x205F && cp <= 0x2064) || cp == 0x3000 || cp == 0xFEFF;
}

/* Python's repr() of a str given as UTF-8 (bytes that are not UTF-8 show as
 * the surrogates Python's filesystem decoding gives them). */
static void py_repr(moe_strbuf *b, const char *s)
{
    char quote = strchr(s, '\'') && !strchr(s, '"') ? '"' : '\'';
    char tmp[16];
    moe_sb_putn(b, &quote, 1);
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; u[i];) {
        unsigned c = u[i];
        if (c < 0x80) {
            if (c == (unsigned)quote || c == '\\') {
                tmp[0] = '\\';
                tmp[1] = (char)c;
                moe_sb_putn(b, tmp, 2);
            } else if (c == '\n') {
                moe_sb_puts(b, "\\n");
            } else if (c == '\r') {
                moe_sb_puts(b, "\\r");
            } else if (c == '\t') {
                moe_sb_puts(b, "\\t");
            } else if (c < 0x20 || c == 0x7F) {
                snprintf(tmp, sizeof tmp, "\\x%02x", c);
                moe_sb_puts(b, tmp);
            } else {
                moe_sb_putn(b, (const char *)u + i, 1);
            }
            i++;
            continue;
        }
        int n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
        int ok = n > 0 && c >= 0xC2 && c <= 0xF4;
        uint32_t cp = n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
        for (int k = 1; ok && k < n; k++) {
            if ((u[i + k] & 0xC0) != 0x80)
                ok = 0;
            else
                cp = cp << 6 | (u[i + k] & 0x3F);
        }
        if (ok && ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 ||
                                                                                          cp > 0x10FFFF))))
            ok = 0;
        if (!ok) {
            snprintf(tmp, sizeof tmp, "\\udc%02x", c);
            moe_sb_puts(b, tmp);
            i++;
            continue;
        }
        if (py_unprintable(cp)) {
            if (cp <= 0xFF)
                snprintf(tmp, sizeof tmp, "\\x%02x", (unsigned)cp);
            else
                snprintf(tmp, sizeof tmp, "\\u%04x", (unsigned)cp);
            moe_sb_puts(b, tmp);
        } else {
            moe_sb_putn(b, (const char *)u + i, (size_t)n);
        }
        i += (size_t)n;
    }
    moe_sb_putn(b, &quote, 1);
}

typedef struct opt_name {
    char dest[64];
    const moe_option *def;
} opt_name;

static int by_dest(const void *a, const void *b)
{
    return strcmp(((const opt_name *)a)->dest, ((const opt_name *)b)->dest);
}

/* argparse's Namespace(...) of the options this tool has, sorted by name. */
static char *namespace_repr(const moe_opts *o)
{
    opt_name names[N_OPTIONS];
    int n = 0;
    for (int i = 0; i < N_OPTIONS; i++) {
        if (strcmp(preprocess_options[i].name, "help") == 0)
            continue; /* argparse's help has no dest */
        snprintf(names[n].dest, sizeof names[n].dest, "%s", preprocess_options[i].name);
        for (char *q = names[n].dest; *q; q++)
            if (*q == '-')
                *q = '_';
        names[n].def = &preprocess_options[i];
        n++;
    }
    qsort(names, (size_t)n, sizeof names[0], by_dest);
    moe_strbuf b = {0};
    moe_sb_puts(&b, "Namespace(");
    for (int i = 0; i < n; i++) {
        const moe_option *d = names[i].def;
        if (i > 0)
            moe_sb_puts(&b, ", ");
        moe_sb_puts(&b, names[i].dest);
        moe_sb_puts(&b, "=");
        char num[32];
        switch (d->type) {
        case MOE_OPT_FLAG:
            moe_sb_puts(&b, moe_opts_flag(o, d->name) ? "True" : "False");
            break;
        case MOE_OPT_INT:
            snprintf(num, sizeof num, "%lld", (long long)moe_opts_int(o, d->name));
            moe_sb_puts(&b, num);
            break;
        case MOE_OPT_FLOAT:
            snprintf(num, sizeof num, "%.17g", moe_opts_float(o, d->name));
            moe_sb_puts(&b, num);
            break;
        default:
            if (moe_opts_str(o, d->name))
                py_repr(&b, moe_opts_str(o, d->name));
            else
                moe_sb_puts(&b, "None");
        }
    }
    moe_sb_puts(&b, ")");
    if (b.failed) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

/* ------------------------------------------------------------ chunk work */

typedef enum pass_kind { PASS_COUNT, PASS_BINARIZE } pass_kind;

typedef struct chunk_job {
    const prep *p;
    pass_kind kind;
    const char *path; /* the input text */
    int64_t begin, end;
    /* counting */
    moe_wordcount *wc;   /* words (no BPE) */
    int64_t *idcount;    /* ids (BPE): idcount[id] */
    int64_t idcount_len;
    char *cache;         /* BPE ids of this chunk: written by counting, read by binarizing */
    int64_t lines;       /* lines counted */
    /* binarizing */
    char *out_prefix;
    moe_idx_builder *b;  /* chunk 0's stays open for the others to be appended */
    int keep_open;
    int64_t nseq, ntok, nrep;
    /* outcome: the data library's message is per thread, so it is carried back */
    moe_status st;
    atomic_int *stop; /* the run's flag (prep.stop) */
    int gave_up;      /* stopped because another chunk failed */
    char err[2048];
} chunk_job;

/* Whether another chunk failed: checked once per line. */
static int give_up(chunk_job *j)
{
    if (!atomic_load_explicit(j->stop, memory_order_relaxed))
        return 0;
    j->gave_up = 1;
    return 1;
}

static moe_status grow_ids(int32_t **ids, int64_t *cap, int64_t need)
{
    if (need <= *cap)
        return MOE_OK;
    int64_t c = *cap ? *cap : 256;
    while (c < need)
        c *= 2;
    int32_t *q = realloc(*ids, (size_t)c * sizeof *q);
    if (!q)
        return nomem();
    *ids = q;
    *cap = c;
    return MOE_OK;
}

/* Puts the reader's file and line in front of a message from the BPE. */
static moe_status with_line(moe_status st, moe_text_reader *r, const char *path)
{
    char msg[2048];
    snprintf(msg, sizeof msg, "%s", moe_data_error());
    moe_data_clear_error();
    return moe_data_fail(st, "'%s' line %lld: %s", path, (long long)moe_text_line_number(r), msg);
}

/* The next line's GPT-2 ids, as multiprocessing_bpe_encoder.py writes them:
 * stripped, dropped when empty (unless keep_empty: then no ids). *got is 0 at
 * the end of the range. */
static moe_status bpe_next(const prep *p, moe_text_reader *r, const char *path, moe_bpe_state *s, int32_t **ids,
                           int64_t *n, int64_t *cap, int *got)
{
    for (;;) {
        const char *line;
        size_t len;
        MOE_TRY(moe_text_next(r, &line, &len));
        if (!line) {
            *got = 0;
            return MOE_OK;
        }
        const char *t;
        size_t tlen;
        moe_text_strip(line, len, &t, &tlen);
        if (tlen == 0) {
            if (!p->keep_empty)
                continue;
            *n = 0;
            *got = 1;
            return MOE_OK;
        }
        moe_status st = moe_bpe_encode(s, t, tlen, ids, n, cap);
        if (st != MOE_OK)
            return with_line(st, r, path);
        *got = 1;
        return MOE_OK;
    }
}

static moe_status write_all(FILE *f, const void *data, size_t n, const char *path)
{
    if (n > 0 && fwrite(data, 1, n, f) != n)
        return moe_data_fail(MOE_ERR_IO, "cannot write the temporary file '%s': %s; check the free space of --destdir",
                             path, strerror(errno));
    return MOE_OK;
}

static moe_status count_chunk(chunk_job *j)
{
    const prep *p = j->p;
    moe_text_reader *r = NULL;
    moe_bpe_state *s = NULL;
    FILE *cache = NULL;
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    moe_status st;
    MOE_TRY_GOTO(st, moe_text_open(j->path, j->begin, j->end, &r), done);
    if (!p->bpe) {
        MOE_TRY_GOTO(st, moe_wordcount_create(&j->wc), done);
        for (;;) {
            const char *line, *tok;
            size_t len, tlen, pos = 0;
            MOE_TRY_GOTO(st, moe_text_next(r, &line, &len), done);
            if (!line)
                break;
            if (give_up(j)) {
                st = MOE_ERR_INTERNAL;
                goto done;
            }
            while (moe_text_next_token(line, len, &pos, &tok, &tlen))
                MOE_TRY_GOTO(st, moe_wordcount_add(j->wc, tok, tlen, 1), done);
            j->lines++;
        }
        goto done;
    }
    MOE_TRY_GOTO(st, moe_bpe_state_create(p->bpe, &s), done);
    j->idcount_len = moe_bpe_vocab_size(p->bpe);
    j->idcount = calloc((size_t)(j->idcount_len > 0 ? j->idcount_len : 1), sizeof *j->idcount);
    if (!j->idcount) {
        st = nomem();
        goto done;
    }
    if (j->cache) {
        cache = fopen(j->cache, "wb");
        if (!cache) {
            st = moe_data_fail(MOE_ERR_IO, "cannot create the temporary file '%s': %s", j->cache, strerror(errno));
            goto done;
        }
        setvbuf(cache, NULL, _IOFBF, 1 << 20);
    }
    for (;;) {
        int got;
        MOE_TRY_GOTO(st, bpe_next(p, r, j->path, s, &ids, &n, &cap, &got), done);
        if (!got)
            break;
        if (give_up(j)) {
            st = MOE_ERR_INTERNAL;
            goto done;
        }
        for (int64_t i = 0; i < n; i++) {
            int32_t id = ids[i];
            if (id < 0) {
                st = moe_data_fail(MOE_ERR_INTERNAL, "'%s' line %lld: the BPE gave the negative id %d", j->path,
                                   (long long)moe_text_line_number(r), id);
                goto done;
            }
            if (id >= j->idcount_len) { /* not expected: ids are below the vocabulary size */
                int64_t len = j->idcount_len ? j->idcount_len : 1;
                while (len <= id)
                    len *= 2;
                int64_t *q = realloc(j->idcount, (size_t)len * sizeof *q);
                if (!q) {
                    st = nomem();
                    goto done;
                }
                memset(q + j->idcount_len, 0, (size_t)(len - j->idcount_len) * sizeof *q);
                j->idcount = q;
                j->idcount_len = len;
            }
            j->idcount[id]++;
        }
        j->lines++;
        if (cache) {
            int32_t n32 = (int32_t)n;
            if ((int64_t)n32 != n) {
                st = moe_data_fail(MOE_ERR_UNSUPPORTED, "'%s' line %lld: %lld tokens on one line; at most %d",
                                   j->path, (long long)moe_text_line_number(r), (long long)n, INT32_MAX);
                goto done;
            }
            MOE_TRY_GOTO(st, write_all(cache, &n32, sizeof n32, j->cache), done);
            MOE_TRY_GOTO(st, write_all(cache, ids, (size_t)n * sizeof *ids, j->cache), done);
        }
    }
done:
    if (cache && fclose(cache) != 0 && st == MOE_OK)
        st = moe_data_fail(MOE_ERR_IO, "cannot write the temporary file '%s': %s; check the free space of --destdir",
                           j->cache, strerror(errno));
    free(ids);
    moe_bpe_state_destroy(s);
    moe_text_close(r);
    return st;
}

/* Id -> dictionary index for BPE output: the id's decimal string looked up
 * once per id and remembered (-1: not looked up yet). */
typedef struct id_map {
    int32_t *idx;
    int64_t len;
} id_map;

static moe_status map_id(const moe_dict *d, id_map *m, int32_t id, int32_t *out)
{
    if (id < 0)
        return moe_data_fail(MOE_ERR_INTERNAL, "the BPE gave the negative id %d", id);
    if (id >= m->len) {
        int64_t len = m->len ? m->len : 1024;
        while (len <= id)
            len *= 2;
        int32_t *q = realloc(m->idx, (size_t)len * sizeof *q);
        if (!q)
            return nomem();
        for (int64_t i = m->len; i < len; i++)
            q[i] = -1;
        m->idx = q;
        m->len = len;
    }
    if (m->idx[id] < 0) {
        char w[16];
        int n = snprintf(w, sizeof w, "%d", id);
        m->idx[id] = (int32_t)moe_dict_index(d, w, (size_t)n);
    }
    *out = m->idx[id];
    return MOE_OK;
}

/* One item: the dictionary indices of the words or ids, then eos. */
static moe_status add_item(chunk_job *j, const int32_t *idx, int64_t n)
{
    MOE_TRY(moe_idx_builder_add(j->b, idx, n));
    j->nseq++;
    j->ntok += n;
    return MOE_OK;
}

static moe_status read_cache_item(FILE *f, const char *path, int32_t **ids, int64_t *n, int64_t *cap, int *got)
{
    int32_t n32;
    size_t k = fread(&n32, sizeof n32, 1, f);
    if (k != 1) {
        if (ferror(f))
            return moe_data_fail(MOE_ERR_IO, "cannot read the temporary file '%s': %s", path, strerror(errno));
        *got = 0;
        return MOE_OK;
    }
    if (n32 < 0)
        return moe_data_fail(MOE_ERR_IO, "the temporary file '%s' is damaged (a negative length)", path);
    MOE_TRY(grow_ids(ids, cap, n32 > 0 ? n32 : 1));
    if (n32 > 0 && fread(*ids, sizeof **ids, (size_t)n32, f) != (size_t)n32)
        return moe_data_fail(MOE_ERR_IO, "the temporary file '%s' ended early (changed while running?)", path);
    *n = n32;
    *got = 1;
    return MOE_OK;
}

static moe_status binarize_chunk(chunk_job *j)
{
    const prep *p = j->p;
    moe_text_reader *r = NULL;
    moe_bpe_state *s = NULL;
    FILE *cache = NULL;
    int32_t *ids = NULL, *idx = NULL;
    int64_t n = 0, cap = 0, icap = 0;
    id_map m = {NULL, 0};
    moe_status st;
    MOE_TRY_GOTO(st, moe_idx_builder_open(j->out_prefix, p->dtype, &j->b), done);
    if (j->cache) {
        cache = fopen(j->cache, "rb");
        if (!cache) {
            st = moe_data_fail(MOE_ERR_IO, "cannot open the temporary file '%s': %s", j->cache, strerror(errno));
            goto done;
        }
        setvbuf(cache, NULL, _IOFBF, 1 << 20);
    } else {
        MOE_TRY_GOTO(st, moe_text_open(j->path, j->begin, j->end, &r), done);
        if (p->bpe)
            MOE_TRY_GOTO(st, moe_bpe_state_create(p->bpe, &s), done);
    }
    for (;;) {
        if (!p->bpe) {
            const char *line, *tok;
            size_t len, tlen, pos = 0;
            MOE_TRY_GOTO(st, moe_text_next(r, &line, &len), done);
            if (!line)
                break;
            n = 0;
            while (moe_text_next_token(line, len, &pos, &tok, &tlen)) {
                if (n + 2 > icap)
                    MOE_TRY_GOTO(st, grow_ids(&idx, &icap, n + 2), done);
                int64_t k = moe_dict_index(p->dict, tok, tlen);
                if (k == MOE_DICT_UNK && !(tlen == 5 && memcmp(tok, "<unk>", 5) == 0))
                    j->nrep++;
                idx[n++] = (int32_t)k;
            }
        } else {
            int got;
            if (cache)
                MOE_TRY_GOTO(st, read_cache_item(cache, j->cache, &ids, &n, &cap, &got), done);
            else
                MOE_TRY_GOTO(st, bpe_next(p, r, j->path, s, &ids, &n, &cap, &got), done);
            if (!got)
                break;
            MOE_TRY_GOTO(st, grow_ids(&idx, &icap, n + 1), done);
            for (int64_t i = 0; i < n; i++) {
                MOE_TRY_GOTO(st, map_id(p->dict, &m, ids[i], &idx[i]), done);
                if (idx[i] == MOE_DICT_UNK)
                    j->nrep++;
            }
        }
        if (give_up(j)) {
            st = MOE_ERR_INTERNAL;
            goto done;
        }
        MOE_TRY_GOTO(st, grow_ids(&idx, &icap, n + 1), done);
        idx[n++] = MOE_DICT_EOS;
        MOE_TRY_GOTO(st, add_item(j, idx, n), done);
    }
    if (!j->keep_open) {
        moe_idx_builder *b = j->b;
        j->b = NULL;
        st = moe_idx_builder_finish(b);
    }
done:
    if (st != MOE_OK && j->b) {
        moe_idx_builder_abort(j->b);
        j->b = NULL;
    }
    if (cache)
        fclose(cache);
    free(ids);
    free(idx);
    free(m.idx);
    moe_bpe_state_destroy(s);
    moe_text_close(r);
    return st;
}

static void *run_job(void *arg)
{
    chunk_job *j = arg;
    j->st = j->kind == PASS_COUNT ? count_chunk(j) : binarize_chunk(j);
    if (j->st != MOE_OK) {
        snprintf(j->err, sizeof j->err, "%s", *moe_data_error() ? moe_data_error() : "failed (no message)");
        atomic_store(j->stop, 1);
    }
    moe_data_clear_error();
    return NULL;
}

/* Runs jobs 1..n-1 on threads and job 0 here; the first failure in chunk
 * order (not counting chunks that gave up because of it) becomes this
 * thread's error. */
static moe_status run_jobs(chunk_job *jobs, int n)
{
    pthread_t tid[MAX_WORKERS];
    int started[MAX_WORKERS] = {0};
    for (int k = 1; k < n; k++) {
        int e = pthread_create(&tid[k], NULL, run_job, &jobs[k]);
        if (e == 0) {
            started[k] = 1;
        } else {
            jobs[k].st = MOE_ERR_INTERNAL;
            snprintf(jobs[k].err, sizeof jobs[k].err, "cannot start worker thread %d of --workers %d: %s", k + 1, n,
                     strerror(e));
            atomic_store(jobs[k].stop, 1);
        }
    }
    run_job(&jobs[0]);
    for (int k = 1; k < n; k++)
        if (started[k])
            pthread_join(tid[k], NULL);
    for (int k = 0; k < n; k++)
        if (jobs[k].st != MOE_OK && !jobs[k].gave_up)
            return moe_data_fail(jobs[k].st, "%s", jobs[k].err);
    for (int k = 0; k < n; k++)
        if (jobs[k].st != MOE_OK)
            return moe_data_fail(jobs[k].st, "%s", jobs[k].err);
    return MOE_OK;
}

static void free_jobs(chunk_job *jobs, int n)
{
    for (int k = 0; k < n; k++) {
        moe_wordcount_destroy(jobs[k].wc);
        free(jobs[k].idcount);
        if (jobs[k].b)
            moe_idx_builder_abort(jobs[k].b);
        if (jobs[k].cache)
            unlink(jobs[k].cache);
        free(jobs[k].cache);
        free(jobs[k].out_prefix);
    }
    free(jobs);
}

static moe_status make_jobs(prep *p, const char *path, pass_kind kind, chunk_job **out)
{
    int64_t off[MAX_WORKERS + 1];
    MOE_TRY(moe_text_chunks(path, p->workers, off));
    chunk_job *jobs = calloc((size_t)p->workers, sizeof *jobs);
    if (!jobs)
        return nomem();
    for (int k = 0; k < p->workers; k++) {
        jobs[k].p = p;
        jobs[k].stop = &p->stop;
        jobs[k].kind = kind;
        jobs[k].path = path;
        jobs[k].begin = off[k];
        jobs[k].end = off[k + 1];
    }
    *out = jobs;
    return MOE_OK;
}

/* ------------------------------------------------------------ the passes */

/* The dictionary of the train file: counted per chunk, merged in chunk
 * order, finalized. With BPE, each chunk's ids stay in *cache_jobs for the
 * binarizing pass (NULL otherwise). */
static moe_status build_dictionary(prep *p, const char *train, int64_t threshold, int64_t nwords, int64_t padding,
                                   chunk_job **cache_jobs)
{
    if (cache_jobs)
        *cache_jobs = NULL;
    chunk_job *jobs;
    MOE_TRY(make_jobs(p, train, PASS_COUNT, &jobs));
    moe_status st = MOE_OK;
    for (int k = 0; k < p->workers && p->bpe && cache_jobs; k++) {
        jobs[k].cache = str_printf("%s/.train%s.bpe%d", p->destdir, p->tag, k);
        if (!jobs[k].cache)
            st = nomem();
    }
    if (st == MOE_OK)
        st = run_jobs(jobs, p->workers);
    if (st == MOE_OK)
        st = moe_dict_create(&p->dict);
    for (int k = 0; k < p->workers && st == MOE_OK; k++) {
        if (jobs[k].wc)
            st = moe_dict_add_counts(p->dict, jobs[k].wc);
        for (int64_t id = 0; st == MOE_OK && id < jobs[k].idcount_len; id++) {
            if (jobs[k].idcount[id] == 0)
                continue;
            char w[24];
            int n = snprintf(w, sizeof w, "%lld", (long long)id);
            st = moe_dict_add(p->dict, w, (size_t)n, jobs[k].idcount[id], 0, NULL);
        }
        if (st == MOE_OK) /* fairseq counts one eos per line */
            st = moe_dict_add(p->dict, "</s>", 4, jobs[k].lines, 0, NULL);
    }
    if (st == MOE_OK)
        st = moe_dict_finalize(p->dict, threshold, nwords, padding);
    if (st == MOE_OK && p->bpe && cache_jobs) {
        for (int k = 0; k < p->workers; k++) { /* only the caches live on */
            moe_wordcount_destroy(jobs[k].wc);
            jobs[k].wc = NULL;
            free(jobs[k].idcount);
            jobs[k].idcount = NULL;
        }
        *cache_jobs = jobs;
        return MOE_OK;
    }
    free_jobs(jobs, p->workers);
    return st;
}

/* Binarizes one text file into <destdir>/<name>.bin/.idx (under a
 * temporary name until the end) and logs fairseq's two lines. */
static moe_status binarize_file(prep *p, const char *input, const char *name, chunk_job *cached)
{
    if (p->n_done == MAX_SPLITS)
        return moe_data_fail(MOE_ERR_UNSUPPORTED, "at most %d files per run", MAX_SPLITS);
    plog(p, "[None] Dictionary: %lld types", (long long)moe_dict_len(p->dict));
    chunk_job *jobs = NULL;
    moe_status st;
    MOE_TRY_GOTO(st, make_jobs(p, input, PASS_BINARIZE, &jobs), fail);
    char *tmp = str_printf("%s/.%s%s", p->destdir, name, p->tag);
    char *final = path_join(p->destdir, name);
    p->tmp_prefix[p->n_done] = tmp;
    p->final_prefix[p->n_done] = final;
    if (!tmp || !final) {
        st = nomem();
        goto fail;
    }
    for (int k = 0; k < p->workers; k++) {
        if (cached) { /* the counting pass's chunks of the same file */
            jobs[k].begin = cached[k].begin;
            jobs[k].end = cached[k].end;
            jobs[k].cache = cached[k].cache;
            cached[k].cache = NULL;
        }
        jobs[k].out_prefix = k == 0 ? str_printf("%s", tmp) : str_printf("%s.pt%d", tmp, k);
        if (!jobs[k].out_prefix) {
            st = nomem();
            goto fail;
        }
        jobs[k].keep_open = k == 0 && p->workers > 1;
    }
    st = run_jobs(jobs, p->workers);
    /* the other chunks' datasets are appended to chunk 0's, then removed */
    for (int k = 1; k < p->workers; k++) {
        if (st == MOE_OK)
            st = moe_idx_builder_append(jobs[0].b, jobs[k].out_prefix);
        if (jobs[k].st == MOE_OK)
            unlink_dataset(jobs[k].out_prefix);
    }
    if (jobs[0].b) {
        moe_idx_builder *b = jobs[0].b;
        jobs[0].b = NULL;
        if (st == MOE_OK)
            st = moe_idx_builder_finish(b);
        else
            moe_idx_builder_abort(b);
    }
    if (st != MOE_OK)
        goto fail;
    p->n_done++;
    int64_t nseq = 0, ntok = 0, nrep = 0;
    for (int k = 0; k < p->workers; k++) {
        nseq += jobs[k].nseq;
        ntok += jobs[k].ntok;
        nrep += jobs[k].nrep;
    }
    free_jobs(jobs, p->workers);
    if (nseq == 0) {
        plog(p, "[None] %s: 0 sents, 0 tokens (by <unk>)", input);
    } else {
        char pct[32];
        py_format_3(pct, sizeof pct, 100.0 * (double)nrep / (double)ntok);
        plog(p, "[None] %s: %lld sents, %lld tokens, %s%% replaced (by <unk>)", input, (long long)nseq,
             (long long)ntok, pct);
    }
    return MOE_OK;
fail:
    if (jobs)
        free_jobs(jobs, p->workers);
    free(p->tmp_prefix[p->n_done]);
    free(p->final_prefix[p->n_done]);
    p->tmp_prefix[p->n_done] = p->final_prefix[p->n_done] = NULL;
    return st;
}

/* valid, valid1, valid2, ... for a comma-separated list */
static moe_status binarize_list(prep *p, const char *list, const char *split)
{
    char *copy = str_printf("%s", list);
    if (!copy)
        return nomem();
    moe_status st = MOE_OK;
    int k = 0;
    for (char *s = copy, *comma;; s = comma + 1, k++) {
        comma = strchr(s, ',');
        if (comma)
            *comma = '\0';
        char name[64];
        if (k == 0)
            snprintf(name, sizeof name, "%s", split);
        else
            snprintf(name, sizeof name, "%s%d", split, k);
        st = binarize_file(p, s, name, NULL);
        if (st != MOE_OK || !comma)
            break;
    }
    free(copy);
    return st;
}

/* Renames every finished temporary into place. */
static moe_status commit(prep *p)
{
    for (int i = 0; i < p->n_done; i++) {
        for (int e = 0; e < 2; e++) {
            const char *ext = e == 0 ? ".bin" : ".idx";
            char *from = str_printf("%s%s", p->tmp_prefix[i], ext), *to = str_printf("%s%s", p->final_prefix[i], ext);
            int bad = !from || !to || rename(from, to) != 0;
            moe_status st = MOE_OK;
            if (bad)
                st = moe_data_fail(MOE_ERR_IO, "cannot rename '%s' to '%s': %s", from ? from : "?", to ? to : "?",
                                   strerror(errno));
            free(from);
            free(to);
            if (st != MOE_OK)
                return st;
        }
    }
    return MOE_OK;
}

static void remove_temporaries(prep *p)
{
    for (int i = 0; i < p->n_done; i++)
        unlink_dataset(p->tmp_prefix[i]);
}

/* ------------------------------------------------------------ checks */

/* A readable regular file, or a message naming the flag. */
static moe_status check_input(const char *flag, const char *path)
{
    struct stat sb;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return moe_data_fail(MOE_ERR_IO, "%s: cannot open '%s': %s", flag, path, strerror(errno));
    int isdir = fstat(fd, &sb) == 0 && S_ISDIR(sb.st_mode);
    close(fd);
    if (isdir)
        return moe_data_fail(MOE_ERR_IO, "%s: '%s' is a directory, expected a text file", flag, path);
    return MOE_OK;
}

static moe_status check_list(const char *flag, const char *list)
{
    char *copy = str_printf("%s", list);
    if (!copy)
        return nomem();
    moe_status st = MOE_OK;
    for (char *s = copy, *comma;; s = comma + 1) {
        comma = strchr(s, ',');
        if (comma)
            *comma = '\0';
        st = check_input(flag, s);
        if (st != MOE_OK || !comma)
            break;
    }
    free(copy);
    return st;
}

/* Flag combinations; a failure is a command-line mistake (exit 2). */
static moe_status check_flags(const moe_opts *o)
{
    if (moe_opts_str(o, "source-lang") || moe_opts_str(o, "target-lang"))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "argument %s: moelm-preprocess writes monolingual language-model data, whose files "
                             "have no language suffix (fairseq's --only-source without languages): drop "
                             "--source-lang/--target-lang and give the whole file name to --trainpref (e.g. "
                             "--trainpref train.en)",
                             moe_opts_str(o, "source-lang") ? "--source-lang" : "--target-lang");
    const char *impl = moe_opts_str(o, "dataset-impl");
    if (strcmp(impl, "mmap") != 0)
        return moe_error_set(MOE_ERR_UNSUPPORTED,
                             "argument --dataset-impl: '%s' is not written by moelm-preprocess; only mmap "
                             "datasets are (fairseq's default, what the language_modeling task reads): drop the flag "
                             "or pass --dataset-impl mmap",
                             impl);
    if (!moe_opts_str(o, "trainpref") && !moe_opts_str(o, "srcdict"))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--trainpref must be set if --srcdict is not specified (the dictionary is counted from "
                             "the train file)");
    int gpt2 = moe_opts_str(o, "bpe") != NULL, tok = moe_opts_str(o, "tokenizer") != NULL;
    int files = moe_opts_str(o, "gpt2-encoder-json") || moe_opts_str(o, "gpt2-vocab-bpe");
    if (gpt2 && tok)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--bpe gpt2 and --tokenizer both name a BPE; give one (--tokenizer tokenizer.json, or "
                             "--bpe gpt2 --gpt2-encoder-json encoder.json --gpt2-vocab-bpe vocab.bpe)");
    if (gpt2 && (!moe_opts_str(o, "gpt2-encoder-json") || !moe_opts_str(o, "gpt2-vocab-bpe")))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--bpe gpt2 encodes the text here and needs both files: add --gpt2-encoder-json "
                             "encoder.json --gpt2-vocab-bpe vocab.bpe (fairseq-preprocess ignores --bpe; if the "
                             "text is already encoded, drop --bpe)");
    if (files && !gpt2)
        return moe_error_set(MOE_ERR_INVALID_ARG, "%s is given without --bpe gpt2; add --bpe gpt2 to encode the text "
                                                  "with GPT-2 BPE, or drop it",
                             moe_opts_str(o, "gpt2-encoder-json") ? "--gpt2-encoder-json" : "--gpt2-vocab-bpe");
    if (moe_opts_flag(o, "keep-empty") && !gpt2 && !tok)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "--keep-empty applies to BPE encoding (--bpe gpt2 or --tokenizer); without it every line, "
                             "empty ones included, is already kept as an item");
    return MOE_OK;
}

/* ------------------------------------------------------------ main */

static moe_status run(const moe_opts *o)
{
    prep p;
    memset(&p, 0, sizeof p);
    atomic_init(&p.stop, 0);
    p.destdir = moe_opts_str(o, "destdir");
    p.workers = (int)moe_opts_int(o, "workers");
    p.keep_empty = moe_opts_flag(o, "keep-empty");
    snprintf(p.tag, sizeof p.tag, ".tmp%ld", (long)getpid());
    const char *train = moe_opts_str(o, "trainpref"), *srcdict = moe_opts_str(o, "srcdict");
    char *dict_path = NULL, *log_path = NULL, *ns = NULL;
    chunk_job *cached = NULL;
    moe_status st;

    MOE_TRY_GOTO(st, make_dirs(p.destdir), done);
    dict_path = path_join(p.destdir, "dict.txt");
    log_path = path_join(p.destdir, "preprocess.log");
    if (!dict_path || !log_path) {
        st = nomem();
        goto done;
    }
    p.log = fopen(log_path, "a");
    if (!p.log) {
        st = moe_data_fail(MOE_ERR_IO, "cannot open '%s' for appending: %s", log_path, strerror(errno));
        goto done;
    }
    ns = namespace_repr(o);
    if (!ns) {
        st = nomem();
        goto done;
    }
    plog(&p, "%s", ns);

    if (!srcdict && access(dict_path, F_OK) == 0) {
        st = moe_data_fail(MOE_ERR_IO,
                           "%s already exists (FileExistsError in fairseq): a previous run's dictionary; pass "
                           "--srcdict %s to reuse it, or remove it, or choose another --destdir",
                           dict_path, dict_path);
        goto done;
    }
    /* every input is checked before the long passes start */
    if (srcdict)
        MOE_TRY_GOTO(st, check_input("--srcdict", srcdict), done);
    if (train)
        MOE_TRY_GOTO(st, check_input("--trainpref", train), done);
    if (moe_opts_str(o, "validpref"))
        MOE_TRY_GOTO(st, check_list("--validpref", moe_opts_str(o, "validpref")), done);
    if (moe_opts_str(o, "testpref"))
        MOE_TRY_GOTO(st, check_list("--testpref", moe_opts_str(o, "testpref")), done);
    if (moe_opts_str(o, "bpe")) {
        MOE_TRY_GOTO(st, check_input("--gpt2-encoder-json", moe_opts_str(o, "gpt2-encoder-json")), done);
        MOE_TRY_GOTO(st, check_input("--gpt2-vocab-bpe", moe_opts_str(o, "gpt2-vocab-bpe")), done);
        MOE_TRY_GOTO(st,
                     moe_bpe_load_gpt2(moe_opts_str(o, "gpt2-encoder-json"), moe_opts_str(o, "gpt2-vocab-bpe"),
                                       &p.bpe),
                     done);
    } else if (moe_opts_str(o, "tokenizer")) {
        st = check_input("--tokenizer", moe_opts_str(o, "tokenizer"));
        if (st != MOE_OK) { /* fairseq's --tokenizer names a word tokenizer (moses, nltk, space) */
            char msg[2048];
            snprintf(msg, sizeof msg, "%s", moe_data_error());
            moe_data_clear_error();
            st = moe_data_fail(st, "%s; --tokenizer takes a Hugging Face tokenizer.json holding a GPT-2 style BPE "
                                   "(fairseq's moses, nltk and space tokenizers are not applied here)",
                               msg);
            goto done;
        }
        MOE_TRY_GOTO(st, moe_bpe_load_tokenizer_json(moe_opts_str(o, "tokenizer"), &p.bpe), done);
    }

    if (srcdict) {
        MOE_TRY_GOTO(st, moe_dict_load(srcdict, &p.dict), done);
    } else {
        int dict_only = moe_opts_flag(o, "dict-only");
        MOE_TRY_GOTO(st,
                     build_dictionary(&p, train, moe_opts_int(o, "thresholdsrc"), moe_opts_int(o, "nwordssrc"),
                                      moe_opts_int(o, "padding-factor"), dict_only ? NULL : &cached),
                     done);
    }
    if (moe_opts_flag(o, "dict-only")) {
        MOE_TRY_GOTO(st, moe_dict_save(p.dict, dict_path), done);
        goto done;
    }
    p.dtype = moe_idx_best_dtype(moe_dict_len(p.dict));
    if (train) {
        st = binarize_file(&p, train, "train", cached);
        if (cached) {
            free_jobs(cached, p.workers);
            cached = NULL;
        }
        if (st != MOE_OK)
            goto done;
    }
    if (moe_opts_str(o, "validpref"))
        MOE_TRY_GOTO(st, binarize_list(&p, moe_opts_str(o, "validpref"), "valid"), done);
    if (moe_opts_str(o, "testpref"))
        MOE_TRY_GOTO(st, binarize_list(&p, moe_opts_str(o, "testpref"), "test"), done);
    MOE_TRY_GOTO(st, commit(&p), done);
    MOE_TRY_GOTO(st, moe_dict_save(p.dict, dict_path), done);
    plog(&p, "Wrote preprocessed data to %s", p.destdir);
done:
    if (st != MOE_OK)
        remove_temporaries(&p);
    if (cached)
        free_jobs(cached, p.workers);
    for (int i = 0; i < p.n_done; i++) {
        free(p.tmp_prefix[i]);
        free(p.final_prefix[i]);
    }
    if (p.log)
        fclose(p.log);
    moe_dict_destroy(p.dict);
    moe_bpe_destroy(p.bpe);
    free(ns);
    free(dict_path);
    free(log_path);
    return st;
}

static const char *message(moe_status st)
{
    const char *m = moe_data_error();
    if (m && *m)
        return m;
    m = moe_error_message();
    return m && *m ? m : moe_status_name(st);
}

int main(int argc, char **argv)
{
    moe_log_configure(stdout, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE);
    moe_opts *o = NULL;
    int rc = 0;
    moe_status st = moe_opts_create_tool(
        PROG, "[-h] [--trainpref FP] [--validpref FP] [--testpref FP] [--destdir DIR] [--srcdict FP] [options]",
        "Binarizes text for language modeling as fairseq-preprocess --only-source does: a dictionary counted from "
        "the train file (or --srcdict), then each file as an mmap dataset with eos after every line, in "
        "<destdir>/{dict.txt,train,valid,valid1,...,test,...}.{bin,idx}. --bpe gpt2 or --tokenizer first encodes "
        "each line with GPT-2 byte-level BPE.",
        &o);
    if (st == MOE_OK)
        st = moe_opts_add_table(o, "preprocessing", preprocess_options, N_OPTIONS);
    if (st == MOE_OK)
        st = moe_opts_parse(o, argc, argv, 1);
    if (st == MOE_OK && moe_opts_flag(o, "help")) {
        moe_opts_print_help(o, stdout);
        moe_opts_destroy(o);
        return 0;
    }
    if (st == MOE_OK)
        st = check_flags(o);
    if (st != MOE_OK) {
        fprintf(stderr, PROG ": error: %s\n", message(st));
        rc = 2;
    } else {
        st = run(o);
        if (st != MOE_OK) {
            fflush(stdout);
            fprintf(stderr, PROG ": error: %s\n", message(st));
            rc = 1;
        }
    }
    fflush(stdout);
    moe_opts_destroy(o);
    return rc;
}
