/* test_real_text.c: real text end to end on the CPU backend, as a user with a
 * corpus would go: the license texts every Debian system ships
 * (/usr/share/common-licenses) split into train/valid/test, a small GPT-2
 * byte-level BPE trained by this test on the train part (encoder.json and
 * vocab.bpe in GPT-2's format), moelm-preprocess --bpe gpt2, then a small MoE
 * model trained with --task language_modeling: the validation loss must fall
 * well below the unigram entropy of the training tokens (a model that learnt
 * nothing but token frequencies scores about that).
 *
 * Skips, saying so, where the license texts are missing.
 */
#include <dirent.h>
#include <math.h>
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
#include "runcmd.h"

#define LICENSES "/usr/share/common-licenses"
#define MERGES 400

static char dir[64];

static void shell_ok(const char *cmd, moe_cmd_result *r)
{
    assert_int_equal(moe_run_shell(cmd, r), 0);
    if (r->status != 0)
        fail_msg("'%s' failed (%d):\n%s\n%s", cmd, r->status, r->out, r->err);
}

/* ------------------------------------------------- a small BPE trainer */

/* A word (pre-token) seen `count` times, as a sequence of symbol ids. */
typedef struct word {
    int *sym;
    int n;
    long count;
} word;

typedef struct vocab {
    char **tok;   /* token strings (UTF-8 of their byte chars) */
    int n, cap;
    word *words;
    int nw, capw;
    char **keys;  /* the words' bytes, for counting */
} vocab;

static int add_token(vocab *v, const char *s)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 512;
        v->tok = realloc(v->tok, (size_t)v->cap * sizeof *v->tok);
        assert_non_null(v->tok);
    }
    v->tok[v->n] = strdup(s);
    return v->n++;
}

static void utf8_put(char *out, size_t *k, uint32_t cp)
{
    if (cp < 0x80) {
        out[(*k)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*k)++] = (char)(0xC0 | (cp >> 6));
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*k)++] = (char)(0xE0 | (cp >> 12));
        out[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    }
}

/* counts each distinct pre-token (linear probing over a fixed table) */
#define WORD_TABLE (1 << 16)
static moe_status count_piece(const char *piece, size_t len, void *arg)
{
    vocab *v = arg;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)piece[i]) * 1099511628211ull;
    for (size_t slot = h & (WORD_TABLE - 1);; slot = (slot + 1) & (WORD_TABLE - 1)) {
        if (!v->keys[slot]) {
            v->keys[slot] = strndup(piece, len);
            assert_true(v->nw < v->capw);
            word *w = &v->words[v->nw++];
            w->sym = malloc(len * sizeof *w->sym);
            w->n = (int)len;
            w->count = 1;
            for (size_t i = 0; i < len; i++)
                w->sym[i] = (unsigned char)piece[i]; /* byte b is token b */
            /* remember which word this key is: store its index after the NUL */
            v->keys[slot] = realloc(v->keys[slot], len + 1 + sizeof(int));
            int idx = v->nw - 1;
            memcpy(v->keys[slot] + len + 1, &idx, sizeof idx);
            return MOE_OK;
        }
        if (strlen(v->keys[slot]) == len && memcmp(v->keys[slot], piece, len) == 0) {
            int idx;
            memcpy(&idx, v->keys[slot] + len + 1, sizeof idx);
            v->words[idx].count++;
            return MOE_OK;
        }
    }
}

/* trains MERGES merges on train.txt; writes encoder.json and vocab.bpe */
static void train_bpe(const char *train, const char *encoder, const char *merges_path)
{
    vocab v;
    memset(&v, 0, sizeof v);
    /* tokens 0..255: the byte chars of DATA_SPEC.md §4.1, byte b -> id b */
    for (int b = 0; b < 256; b++) {
        char s[8];
        size_t k = 0;
        utf8_put(s, &k, moe_bpe_byte_to_char((uint8_t)b));
        s[k] = '\0';
        add_token(&v, s);
    }
    /* a byte-only BPE to pre-tokenize with the GPT-2 regex */
    char enc0[128], bpe0[128];
    snprintf(enc0, sizeof enc0, "%s/bytes.json", dir);
    snprintf(bpe0, sizeof bpe0, "%s/bytes.bpe", dir);
    FILE *f = fopen(enc0, "w");
    assert_non_null(f);
    fputc('{', f);
    for (int i = 0; i < 256; i++)
        fprintf(f, "%s\"%s%s\": %d", i ? ", " : "", v.tok[i][0] == '"' || v.tok[i][0] == '\\' ? "\\" : "", v.tok[i],
                i);
    fputs("}\n", f);
    fclose(f);
    f = fopen(bpe0, "w");
    assert_non_null(f);
    fputs("#version: 0.2\n", f);
    fclose(f);
    moe_bpe *bytes;
    if (moe_bpe_load_gpt2(enc0, bpe0, &bytes) != MOE_OK)
        fail_msg("byte BPE: %s", moe_data_error());
    moe_bpe_state *st;
    assert_int_equal(moe_bpe_state_create(bytes, &st), MOE_OK);
    v.keys = calloc(WORD_TABLE, sizeof *v.keys);
    v.capw = WORD_TABLE / 2;
    v.words = calloc((size_t)v.capw, sizeof *v.words);
    f = fopen(train, "r");
    assert_non_null(f);
    char line[1 << 16];
    while (fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == ' '))
            line[--len] = '\0';
        if (moe_bpe_pretokenize(st, line, len, count_piece, &v) != MOE_OK)
            fail_msg("pretokenize: %s", moe_data_error());
    }
    fclose(f);
    moe_bpe_state_destroy(st);
    moe_bpe_destroy(bytes);

    /* greedy merges: the most frequent adjacent pair, ties to the smaller ids */
    FILE *mf = fopen(merges_path, "w");
    assert_non_null(mf);
    fputs("#version: 0.2\n", mf);
    for (int m = 0; m < MERGES; m++) {
        long best = 0;
        int ba = -1, bb = -1;
        /* pair counts in a dense table over the current tokens */
        int nt = v.n;
        long *pc = calloc((size_t)nt * (size_t)nt, sizeof *pc);
        assert_non_null(pc);
        for (int i = 0; i < v.nw; i++)
            for (int j = 0; j + 1 < v.words[i].n; j++)
                pc[(size_t)v.words[i].sym[j] * (size_t)nt + (size_t)v.words[i].sym[j + 1]] += v.words[i].count;
        for (int a = 0; a < nt; a++)
            for (int b = 0; b < nt; b++)
                if (pc[(size_t)a * (size_t)nt + (size_t)b] > best) {
                    best = pc[(size_t)a * (size_t)nt + (size_t)b];
                    ba = a;
                    bb = b;
                }
        free(pc);
        if (best < 2)
            break;
        char joined[256];
        snprintf(joined, sizeof joined, "%s%s", v.tok[ba], v.tok[bb]);
        int id = add_token(&v, joined);
        fprintf(mf, "%s %s\n", v.tok[ba], v.tok[bb]);
        for (int i = 0; i < v.nw; i++) {
            word *w = &v.words[i];
            int k = 0;
            for (int j = 0; j < w->n; j++) {
                if (j + 1 < w->n && w->sym[j] == ba && w->sym[j + 1] == bb) {
                    w->sym[k++] = id;
                    j++;
                } else {
                    w->sym[k++] = w->sym[j];
                }
            }
            w->n = k;
        }
    }
    fclose(mf);
    f = fopen(encoder, "w");
    assert_non_null(f);
    fputc('{', f);
    for (int i = 0; i < v.n; i++) {
        fprintf(f, "%s\"", i ? ", " : "");
        for (const char *p = v.tok[i]; *p; p++) {
            if (*p == '"' || *p == '\\')
                fputc('\\', f);
            fputc(*p, f);
        }
        fprintf(f, "\": %d", i);
    }
    fputs("}\n", f);
    fclose(f);
    for (int i = 0; i < v.n; i++)
        free(v.tok[i]);
    for (int i = 0; i < v.nw; i++)
        free(v.words[i].sym);
    for (int i = 0; i < WORD_TABLE; i++)
        free(v.keys[i]);
    free(v.tok);
    free(v.words);
    free(v.keys);
}

/* -------------------------------------------------------------- corpus */

/* every license text, line by line: 1 in 10 lines to valid, 1 in 10 to test */
static int split_corpus(void)
{
    DIR *d = opendir(LICENSES);
    if (!d)
        return 0;
    char names[64][256];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < 64)
        if (e->d_name[0] != '.')
            snprintf(names[n++], sizeof names[0], "%s", e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof names[0], (int (*)(const void *, const void *))strcmp);
    char path[3][128];
    FILE *out[3];
    static const char *const split[3] = {"train", "valid", "test"};
    for (int k = 0; k < 3; k++) {
        snprintf(path[k], sizeof path[k], "%s/%s.txt", dir, split[k]);
        out[k] = fopen(path[k], "w");
        assert_non_null(out[k]);
    }
    long lines = 0;
    for (int i = 0; i < n; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%.255s", LICENSES, names[i]);
        FILE *f = fopen(p, "r");
        if (!f)
            continue;
        char line[1 << 16];
        while (fgets(line, sizeof line, f)) {
            int k = lines % 10 == 3 ? 1 : lines % 10 == 7 ? 2 : 0;
            fputs(line, out[k]);
            lines++;
        }
        fclose(f);
    }
    for (int k = 0; k < 3; k++)
        fclose(out[k]);
    return lines > 1000;
}

/* H = -sum p log2 p of the training tokens, from dict.txt's counts plus one
 * eos per line (dict.txt does not list the specials) */
static double unigram_entropy_bits(const char *dict, long lines)
{
    FILE *f = fopen(dict, "r");
    assert_non_null(f);
    double total = (double)lines, sum_clogc = (double)lines * log((double)lines);
    char w[512];
    long c;
    while (fscanf(f, "%511s %ld", w, &c) == 2)
        if (c > 0) {
            total += (double)c;
            sum_clogc += (double)c * log((double)c);
        }
    fclose(f);
    return (log(total) - sum_clogc / total) / log(2.0);
}

static long count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    long n = 0;
    int ch;
    while ((ch = fgetc(f)) != EOF)
        n += ch == '\n';
    fclose(f);
    return n;
}

/* the last "valid_loss" of the run's JSON log */
static double last_valid_loss(const char *out)
{
    double loss = NAN;
    for (const char *p = strstr(out, "\"valid_loss\": \""); p; p = strstr(p + 1, "\"valid_loss\": \""))
        loss = strtod(p + strlen("\"valid_loss\": \""), NULL);
    return loss;
}

static void test_real_text_bpe_preprocess_train(void **s)
{
    (void)s;
    snprintf(dir, sizeof dir, "/tmp/moelm-text-XXXXXX");
    assert_non_null(mkdtemp(dir));
    if (!split_corpus()) {
        printf("SKIP: no license texts in " LICENSES "\n");
        skip();
    }
    char train[128], encoder[128], merges[128], cmd[2048];
    snprintf(train, sizeof train, "%s/train.txt", dir);
    snprintf(encoder, sizeof encoder, "%s/encoder.json", dir);
    snprintf(merges, sizeof merges, "%s/vocab.bpe", dir);
    train_bpe(train, encoder, merges);

    moe_cmd_result r;
    snprintf(cmd, sizeof cmd,
             "%s/moelm-preprocess --only-source --bpe gpt2 --gpt2-encoder-json %s --gpt2-vocab-bpe %s --keep-empty "
             "--trainpref %s/train.txt --validpref %s/valid.txt --testpref %s/test.txt --destdir %s/data-bin "
             "--workers 2",
             MOE_TEST_BIN_DIR, encoder, merges, dir, dir, dir, dir);
    shell_ok(cmd, &r);
    assert_non_null(strstr(r.out, "| fairseq_cli.preprocess | Wrote preprocessed data to "));
    moe_cmd_result_free(&r);

    char dict[128];
    snprintf(dict, sizeof dict, "%s/data-bin/dict.txt", dir);
    double h_unigram = unigram_entropy_bits(dict, count_lines(train));

    snprintf(cmd, sizeof cmd,
             "%s/moelm-train --cpu --task language_modeling %s/data-bin --tokens-per-sample 64 "
             "--arch transformer_lm_gpt --share-decoder-input-output-embed --decoder-layers 2 --decoder-embed-dim 64 "
             "--decoder-ffn-embed-dim 128 --decoder-attention-heads 4 --moe-expert-count 4 --moe-freq 2 "
             "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "
             "--optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.004 --lr-scheduler inverse_sqrt "
             "--warmup-updates 30 --dropout 0.1 --batch-size 16 --max-update 240 --validate-interval-updates 80 "
             "--max-valid-steps 8 --log-format json --log-interval 40 --no-save",
             MOE_TEST_BIN_DIR, dir);
    shell_ok(cmd, &r);
    double loss = last_valid_loss(r.out);
    printf("unigram entropy %.3f bits, validation loss %.3f bits after 240 updates\n", h_unigram, loss);
    if (!(loss < h_unigram - 1.0))
        fail_msg("validation loss %.3f bits is not well below the unigram entropy %.3f bits:\n%s", loss, h_unigram,
                 r.out);
    moe_cmd_result_free(&r);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_real_text_bpe_preprocess_train),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
