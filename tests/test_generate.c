/* test_generate.c: incremental decoding (moe_arch_ops decode_*, the K/V
 * cache of plugins/archs/transformer_lm_decode.c) and moelm-generate.
 *
 * The arch cases drive a tiny transformer_lm_gpt on the cpu backend, as
 * test_arch.c does, and hold decoding to the full forward: for every fed
 * token the decode logits must be those arch->forward (train = 0) gives for
 * that token over the whole sequence so far, in fp32 to 1e-4 of the logits'
 * scale and with the same argmax, and greedy decoding with the cache must
 * pick, at every step, the argmax of a full forward over the growing
 * sequence. Covered: prompts fed in rows mode (<= 8 tokens a step) and in
 * matrix mode (more), in one piece or in chunks, batches of rows of
 * different lengths (each equal to its row alone), rows that feed nothing
 * for a step, top-1 and top-2 gates (policies all and sampling), a dense
 * model, an untied output projection without final norm, capacity drops
 * (the prefill of a prompt against a forward over that prompt), and fp16 /
 * bf16 tracking fp32.
 *
 * The tool cases run bin/moelm-generate on a random-initialised model over a
 * small DATA directory: reproducible sampling, batch-size independence, top-k
 * 1 and tiny top-p equal to greedy, the output formats, and refusals.
 */
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

#include "core/internal.h"
#include "core/runtime.h"
#include "data/bpe.h"
#include "kernels/half.h"
#include "moe/plugin.h"
#include "lmcorpus.h"
#include "runcmd.h"

#define MAX_ARGS 64
#define VOCAB 50
#define PAD 1
#define TMAX 24

typedef struct model {
    moe_runtime *rt;
    const moe_host *h;
    const moe_arch_ops *arch;
    void *m;
    int32_t *tokens;      /* device (1, TMAX) for the reference forward */
} model;

static void check_ok(moe_status st, const char *what)
{
    if (st != MOE_OK)
        fprintf(stderr, "%s failed: %s\n", what, moe_error_message());
    assert_int_equal(st, MOE_OK);
}

#define TINY                                                                                                     \
    "--decoder-embed-dim 32 --decoder-ffn-embed-dim 48 --decoder-layers 4 --decoder-attention-heads 4 "         \
    "--moe-expert-count 4 --moe-freq 2 --moe-expert-ffn-dim 40 --seed 7 --moe-eval-capacity-token-fraction 1.0 "

/* builds, allocates and sets up (for the reference forward) a model of `args` */
static void open_model(model *md, const char *args, const char *gate)
{
    memset(md, 0, sizeof *md);
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", args);
    const char *argv[MAX_ARGS];
    int argc = 0;
    for (char *tok = strtok(buf, " "); tok && argc < MAX_ARGS; tok = strtok(NULL, " "))
        argv[argc++] = tok;
    check_ok(moe_runtime_create_for_test(argc, argv, &md->rt), "runtime");
    md->h = moe_runtime_host(md->rt);
    const moe_plugin_desc *d;
    check_ok(moe_runtime_load_plugin(md->rt, MOE_KIND_ARCH, "transformer_lm_gpt", &d), "load arch");
    md->arch = d->ops;
    const moe_plugin_desc *g;
    check_ok(moe_runtime_load_plugin(md->rt, MOE_KIND_GATE, gate, &g), "load gate");
    moe_runtime_set_gate(md->rt, g->ops);
    check_ok(md->arch->build(md->h, VOCAB, PAD, &md->m), "build");
    check_ok(moe_runtime_alloc_params(md->rt), "alloc params");
    check_ok(md->arch->setup(md->m, 1, TMAX), "setup");
    check_ok(md->h->backend->alloc(md->h->ctx, TMAX * 4, "tokens", (void **)&md->tokens), "alloc");
}

static void close_model(model *md)
{
    md->h->backend->free(md->h->ctx, md->tokens);
    md->arch->destroy(md->m);
    moe_runtime_destroy(md->rt);
}

/* logits (T, V) as fp32 of a full eval forward over seq[0..T) */
static void forward_logits(model *md, const int32_t *seq, int T, float *out)
{
    const moe_host *h = md->h;
    check_ok(h->backend->copy_from_host(h->ctx, md->tokens, seq, (uint64_t)T * 4), "copy tokens");
    moe_fwd_out fo;
    check_ok(md->arch->forward(md->m, md->tokens, 1, T, 0, 0, &fo), "forward");
    assert_int_equal(fo.V, VOCAB);
    const int64_t n = (int64_t)T * VOCAB;
    if (h->act_dtype == MOE_F32) {
        check_ok(h->backend->copy_to_host(h->ctx, out, fo.logits, (uint64_t)n * 4), "copy logits");
        return;
    }
    uint16_t *half = malloc((size_t)n * 2);
    assert_non_null(half);
    check_ok(h->backend->copy_to_host(h->ctx, half, fo.logits, (uint64_t)n * 2), "copy logits");
    for (int64_t i = 0; i < n; i++)
        out[i] = h->act_dtype == MOE_BF16 ? moe_bf16_to_f32(half[i]) : moe_f16_to_f32(half[i]);
    free(half);
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* max |a - b| / max |b| over one row of logits */
static double row_err(const float *a, const float *b)
{
    double num = 0.0, den = 0.0;
    for (int v = 0; v < VOCAB; v++) {
        num = fmax(num, fabs((double)a[v] - (double)b[v]));
        den = fmax(den, fabs((double)b[v]));
    }
    return den > 0.0 ? num / den : num;
}

static void expect_row(const float *dec, const float *ref, double tol, const char *what, int pos)
{
    double e = row_err(dec, ref);
    if (e > tol || (tol <= 1e-4 && argmax(dec, VOCAB) != argmax(ref, VOCAB)))
        fprintf(stderr, "%s, position %d: relative error %.3e (tolerance %.0e), argmax %d vs %d\n", what, pos, e, tol,
                argmax(dec, VOCAB), argmax(ref, VOCAB));
    assert_true(e <= tol);
    if (tol <= 1e-4)
        assert_int_equal(argmax(dec, VOCAB), argmax(ref, VOCAB));
}

static void prompt_of(int32_t *p, int len, uint32_t seed)
{
    p[0] = 2; /* generation starts from </s>, as fairseq's language_modeling task */
    uint32_t x = seed;
    for (int i = 1; i < len; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = 4 + (int32_t)((x >> 8) % (VOCAB - 4));
    }
}

/* Feeds rows of prompts (lengths len[b], fed in pieces of at most `chunk`)
 * with all positions returned, checks each fed position against the row's
 * own full forward, then decodes `steps` greedy tokens per row (a row skips
 * the steps listed in skip[b], -1 terminated) and checks every step. */
static void decode_vs_forward(model *md, int B, const int *len, int chunk, int steps, const int *const *skip,
                              double tol, const char *what)
{
    const moe_host *h = md->h;
    int32_t seq[8][TMAX];
    int have[8], fed[8];
    for (int b = 0; b < B; b++) {
        prompt_of(seq[b], len[b], 1000u + (uint32_t)b * 77u + (uint32_t)len[b]);
        have[b] = len[b];
        fed[b] = 0;
    }
    check_ok(md->arch->decode_setup(md->m, B, TMAX, chunk, 0), "decode_setup");
    float *ref = malloc((size_t)TMAX * VOCAB * 4), *got = malloc((size_t)B * chunk * VOCAB * 4);
    assert_non_null(ref);
    assert_non_null(got);
    int32_t tok[8 * TMAX], nn[8];
    /* the prompts, piece by piece */
    for (;;) {
        int any = 0;
        for (int b = 0; b < B; b++) {
            nn[b] = have[b] - fed[b] < chunk ? have[b] - fed[b] : chunk;
            for (int j = 0; j < chunk; j++)
                tok[b * chunk + j] = j < nn[b] ? seq[b][fed[b] + j] : 0;
            any |= nn[b] > 0;
        }
        if (!any)
            break;
        const float *lg;
        check_ok(md->arch->decode_step(md->m, tok, nn, chunk, 1, &lg), "decode_step (prompt)");
        check_ok(h->backend->copy_to_host(h->ctx, got, lg, (uint64_t)B * chunk * VOCAB * 4), "copy");
        for (int b = 0; b < B; b++) {
            if (nn[b] == 0)
                continue;
            forward_logits(md, seq[b], fed[b] + nn[b], ref);
            for (int j = 0; j < nn[b]; j++)
                expect_row(got + ((int64_t)b * chunk + j) * VOCAB, ref + (int64_t)(fed[b] + j) * VOCAB, tol, what,
                           fed[b] + j);
            fed[b] += nn[b];
        }
    }
    /* greedy continuation, one token per row and step: each row's next token
     * is the argmax of a full forward over its sequence so far */
    for (int s = 0; s < steps; s++) {
        for (int b = 0; b < B; b++) {
            int skipped = 0;
            for (const int *k = skip ? skip[b] : NULL; k && *k >= 0; k++)
                skipped |= *k == s;
            forward_logits(md, seq[b], have[b], ref);
            nn[b] = skipped || have[b] >= TMAX ? 0 : 1;
            if (nn[b]) {
                seq[b][have[b]] = argmax(ref + (int64_t)(have[b] - 1) * VOCAB, VOCAB);
                tok[b] = seq[b][have[b]];
            } else {
                tok[b] = 0;
            }
        }
        const float *lg;
        check_ok(md->arch->decode_step(md->m, tok, nn, 1, 0, &lg), "decode_step (greedy)");
        check_ok(h->backend->copy_to_host(h->ctx, got, lg, (uint64_t)B * VOCAB * 4), "copy");
        for (int b = 0; b < B; b++) {
            if (!nn[b])
                continue;
            have[b]++;
            forward_logits(md, seq[b], have[b], ref);
            expect_row(got + (int64_t)b * VOCAB, ref + (int64_t)(have[b] - 1) * VOCAB, tol, what, have[b] - 1);
        }
    }
    free(ref);
    free(got);
}

/* ------------------------------------------------------------- arch cases */

static void test_generate_decode_matches_forward(void **state)
{
    (void)state;
    model md;
    open_model(&md, TINY "--moe-second-expert-policy all", "top2");
    static const int one_short[] = {5}, one_long[] = {11};
    decode_vs_forward(&md, 1, one_short, 8, 10, NULL, 1e-4, "top2 all, prompt 5 at once (rows mode)");
    decode_vs_forward(&md, 1, one_long, 11, 8, NULL, 1e-4, "top2 all, prompt 11 at once (matrix mode)");
    decode_vs_forward(&md, 1, one_long, 4, 6, NULL, 1e-4, "top2 all, prompt 11 in pieces of 4");
    /* rows of different lengths, one resting for two steps: each its own */
    static const int three[] = {3, 9, 6};
    static const int rest1[] = {1, 2, -1}, none[] = {-1};
    const int *const skips[] = {none, rest1, none};
    decode_vs_forward(&md, 3, three, 9, 6, skips, 1e-4, "top2 all, batch of 3 (matrix mode prefill)");
    static const int two[] = {2, 4};
    decode_vs_forward(&md, 2, two, 4, 5, NULL, 1e-4, "top2 all, batch of 2 (rows mode throughout)");
    /* decode_reset empties the rows: the same prompt again gives the same */
    check_ok(md.arch->decode_reset(md.m), "decode_reset");
    close_model(&md);
}

static void test_generate_decode_gates_and_layouts(void **state)
{
    (void)state;
    static const int one[] = {7}, pair[] = {5, 10};
    model md;
    /* sampling policy: the Gumbel noise follows each token's index in its sequence */
    open_model(&md, TINY "--moe-second-expert-policy sampling", "top2");
    decode_vs_forward(&md, 1, one, 7, 6, NULL, 1e-4, "top2 sampling");
    decode_vs_forward(&md, 2, pair, 10, 4, NULL, 1e-4, "top2 sampling, batch of 2");
    close_model(&md);
    open_model(&md, TINY "--moe-top1-expert", "top1");
    decode_vs_forward(&md, 1, one, 3, 6, NULL, 1e-4, "top1");
    close_model(&md);
    open_model(&md,
               "--decoder-embed-dim 32 --decoder-ffn-embed-dim 48 --decoder-layers 2 --decoder-attention-heads 2 "
               "--seed 9 --activation-fn relu",
               "top2");
    decode_vs_forward(&md, 1, one, 7, 6, NULL, 1e-4, "dense, relu");
    close_model(&md);
    open_model(&md, TINY "--no-decoder-final-norm --moe-second-expert-policy all", "top2");
    decode_vs_forward(&md, 2, pair, 10, 4, NULL, 1e-4, "untied output projection, no final norm");
    close_model(&md);
    open_model(&md, TINY "--share-decoder-input-output-embed --no-scale-embedding --moe-second-expert-policy all",
               "top2");
    decode_vs_forward(&md, 1, one, 7, 4, NULL, 1e-4, "tied, unscaled embedding");
    close_model(&md);
    /* a shared expert beside fine-grained experts: in both modes */
    open_model(&md, TINY "--moe-shared-expert-ffn-dim 24 --moe-expert-count 8 --moe-expert-ffn-dim 8 "
                         "--moe-second-expert-policy all",
               "top2");
    decode_vs_forward(&md, 1, one, 7, 6, NULL, 1e-4, "shared expert, rows mode");
    decode_vs_forward(&md, 2, pair, 10, 4, NULL, 1e-4, "shared expert, matrix mode prefill");
    close_model(&md);
}

#define TOPK_MODEL                                                                                               \
    "--decoder-embed-dim 32 --decoder-ffn-embed-dim 48 --decoder-layers 4 --decoder-attention-heads 4 "         \
    "--moe-expert-count 8 --moe-freq 2 --moe-expert-ffn-dim 40 --seed 5 --moe-eval-capacity-token-fraction 1.0 "

/* every MoE layer's expert bias set to distinct values, large enough to
 * change which experts the scores alone would pick */
static void set_expert_bias(model *md)
{
    const moe_gate_ops *g = md->h->gate_ops;
    for (int j = 0;; j++) {
        void *gate = md->arch->moe_gate(md->m, j);
        if (!gate)
            break;
        int64_t n = 0;
        float *bias = g->state(gate, &n);
        assert_non_null(bias);
        float v[64];
        assert_true(n > 0 && n <= 64);
        for (int64_t e = 0; e < n; e++)
            v[e] = 0.15f * (float)((e * 5 + j * 3) % 7) - 0.4f;
        check_ok(md->h->backend->copy_from_host(md->h->ctx, bias, v, (uint64_t)n * 4), "set expert bias");
    }
}

/* The general top-k router decodes through route_forward (never fairseq's
 * softmax top-1/top-2 shortcut): more than two choices per token, sigmoid
 * scores, groups and a selection bias route as the full forward routes. */
static void test_generate_decode_topk(void **state)
{
    (void)state;
    static const int one[] = {6}, long_one[] = {12}, pair[] = {4, 9};
    model md;
    open_model(&md,
               TOPK_MODEL "--moe-router-topk 4 --moe-router-score-function sigmoid --moe-router-num-groups 4 "
                          "--moe-router-group-topk 2 --moe-router-enable-expert-bias --moe-aux-loss-type seq",
               "topk");
    set_expert_bias(&md);
    decode_vs_forward(&md, 1, one, 6, 8, NULL, 1e-4, "topk 4 sigmoid, groups, bias (rows mode)");
    decode_vs_forward(&md, 1, long_one, 12, 4, NULL, 1e-4, "topk 4 sigmoid, groups, bias (matrix mode)");
    decode_vs_forward(&md, 2, pair, 9, 5, NULL, 1e-4, "topk 4 sigmoid, groups, bias, batch of 2");
    close_model(&md);
    open_model(&md, TOPK_MODEL "--moe-router-topk 2 --moe-router-enable-expert-bias", "topk");
    set_expert_bias(&md);
    decode_vs_forward(&md, 2, pair, 9, 5, NULL, 1e-4, "topk 2 softmax, bias");
    close_model(&md);
    open_model(&md, TOPK_MODEL "--moe-router-topk 1 --moe-router-pre-softmax", "topk");
    decode_vs_forward(&md, 1, one, 6, 6, NULL, 1e-4, "topk 1 softmax, pre-softmax weights");
    close_model(&md);
}

/* A fraction below 1 drops by capacity; a prompt fed at once is routed as
 * the forward over that prompt routes it (the same tokens in one call). */
static void test_generate_decode_capacity_drops(void **state)
{
    (void)state;
    static const int rows_mode[] = {8}, matrix_mode[] = {16};
    model md;
    open_model(&md,
               "--decoder-embed-dim 32 --decoder-ffn-embed-dim 48 --decoder-layers 2 --decoder-attention-heads 4 "
               "--moe-expert-count 4 --moe-freq 1 --seed 11 --moe-second-expert-policy all "
               "--moe-eval-capacity-token-fraction 0.25",
               "top2");
    decode_vs_forward(&md, 1, rows_mode, 8, 0, NULL, 1e-4, "drops, rows mode");
    decode_vs_forward(&md, 1, matrix_mode, 16, 0, NULL, 1e-4, "drops, matrix mode");
    close_model(&md);
}

/* fp16 and bf16 store what fp32 computes to within their rounding */
static void test_generate_decode_half_precision(void **state)
{
    (void)state;
    static const int one[] = {6}, pair[] = {4, 10};
    model md;
    open_model(&md, TINY "--moe-second-expert-policy all --fp16", "top2");
    decode_vs_forward(&md, 1, one, 6, 4, NULL, 2e-2, "fp16");
    decode_vs_forward(&md, 2, pair, 10, 3, NULL, 2e-2, "fp16, batch of 2");
    close_model(&md);
    open_model(&md, TINY "--moe-second-expert-policy all --bf16", "top2");
    decode_vs_forward(&md, 1, one, 6, 4, NULL, 8e-2, "bf16");
    close_model(&md);
}

static void test_generate_decode_refusals(void **state)
{
    (void)state;
    model md;
    open_model(&md, TINY "--moe-second-expert-policy all", "top2");
    const float *lg;
    int32_t tok[4] = {2, 5, 6, 7}, nn[2] = {2, 2};
    moe_error_clear();
    assert_int_equal(md.arch->decode_step(md.m, tok, nn, 2, 0, &lg), MOE_ERR_INTERNAL); /* before setup */
    check_ok(md.arch->decode_setup(md.m, 2, 4, 2, 0), "decode_setup");
    moe_error_clear();
    assert_int_equal(md.arch->decode_step(md.m, tok, nn, 3, 0, &lg), MOE_ERR_INVALID_ARG); /* n > max_step */
    tok[1] = VOCAB;
    moe_error_clear();
    assert_int_equal(md.arch->decode_step(md.m, tok, nn, 2, 0, &lg), MOE_ERR_INVALID_ARG); /* outside the dictionary */
    assert_non_null(strstr(moe_error_message(), "outside the dictionary"));
    tok[1] = 5;
    check_ok(md.arch->decode_step(md.m, tok, nn, 2, 0, &lg), "decode_step");
    check_ok(md.arch->decode_step(md.m, tok, nn, 2, 0, &lg), "decode_step");
    moe_error_clear();
    assert_int_equal(md.arch->decode_step(md.m, tok, nn, 2, 0, &lg), MOE_ERR_INVALID_ARG); /* cache full */
    assert_non_null(strstr(moe_error_message(), "max_len"));
    check_ok(md.arch->decode_reset(md.m), "decode_reset");
    check_ok(md.arch->decode_step(md.m, tok, nn, 2, 0, &lg), "decode_step after reset");
    moe_error_clear();
    assert_int_equal(md.arch->decode_setup(md.m, 1, 4, 5, 0), MOE_ERR_INVALID_ARG); /* max_step > max_len */
    close_model(&md);
    /* expert choice routes a forward's tokens together: no token-by-token decoding */
    open_model(&md, TINY, "expert_choice");
    moe_error_clear();
    assert_int_equal(md.arch->decode_setup(md.m, 1, 8, 1, 0), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(moe_error_message(), "found expert choice"));
    close_model(&md);
}

/* ------------------------------------------------------------- the tool */

static char dir[64];

#define RANDOM_MODEL                                                                                             \
    "--cpu --task language_modeling --tokens-per-sample 64 --arch transformer_lm_gpt --decoder-layers 2 "       \
    "--decoder-embed-dim 32 --decoder-ffn-embed-dim 48 --decoder-attention-heads 4 --moe-expert-count 4 "       \
    "--moe-freq 2 --seed 3 "

static void write_file(const char *name, const char *text)
{
    char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* moelm-generate DATA <args>, DATA the corpus' data-bin (or `data`) */
static void gen_run(const char *data, const char *args, moe_cmd_result *r)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s/moelm-generate %s/%s %s", MOE_TEST_BIN_DIR, dir, data, args);
    assert_int_equal(moe_run_shell(cmd, r), 0);
}

static void gen_ok(const char *data, const char *args, moe_cmd_result *r)
{
    gen_run(data, args, r);
    if (r->status != 0)
        fail_msg("moelm-generate %s failed (%d):\n%s\n%s", args, r->status, r->out, r->err);
}

/* the lines of `out` starting with one of `kinds` ("HDP": H-, D-, P-), in order */
static char *lines_of(const char *out, const char *kinds)
{
    size_t n = strlen(out);
    char *res = calloc(n + 1, 1);
    assert_non_null(res);
    size_t k = 0;
    for (const char *p = out; *p;) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p + 1) : strlen(p);
        if (len > 1 && p[1] == '-' && strchr(kinds, p[0]))
            memcpy(res + k, p, len), k += len;
        p += len;
    }
    return res;
}

/* the text after "<kind>-<id>\t" (and the score column for H and D), up to the line end */
static char *field(const char *out, char kind, int id)
{
    char key[32];
    snprintf(key, sizeof key, "%c-%d\t", kind, id);
    const char *p = strstr(out, key);
    if (!p)
        return NULL;
    p += strlen(key);
    if (kind == 'H' || kind == 'D') {
        p = strchr(p, '\t');
        assert_non_null(p);
        p++;
    }
    size_t len = strcspn(p, "\n");
    return strndup(p, len);
}

static int count_words(const char *s)
{
    int n = 0;
    for (const char *p = s; *p;) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        n++;
        while (*p && *p != ' ')
            p++;
    }
    return n;
}

static int tool_setup(void **state)
{
    (void)state;
    return moe_test_lm_corpus(dir, sizeof dir, "generate", 4242, 200, 12, 0);
}

static int tool_teardown(void **state)
{
    (void)state;
    return moe_test_rmtree(dir);
}

/* A checkpoint trained here: its flags come from the file, the prompt is
 * forced and scored, the continuation is greedy. */
static void test_generate_tool_checkpoint(void **state)
{
    (void)state;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s/moelm-train --task language_modeling %s/data-bin --cpu --tokens-per-sample 32 "
             "--arch transformer_lm_gpt --share-decoder-input-output-embed --decoder-layers 2 --decoder-embed-dim 32 "
             "--decoder-ffn-embed-dim 64 --decoder-attention-heads 2 --moe-expert-count 2 --moe-freq 2 "
             "--moe-second-expert-policy all --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --optimizer adam "
             "--lr 0.003 --warmup-updates 2 --batch-size 8 --max-update 6 --disable-validation --log-format json "
             "--save-dir %s/ck",
             MOE_TEST_BIN_DIR, dir, dir);
    moe_cmd_result r;
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    if (r.status != 0)
        fail_msg("training failed (%d):\n%s\n%s", r.status, r.out, r.err);
    moe_cmd_result_free(&r);
    char args[512];
    snprintf(args, sizeof args, "--path %s/ck/checkpoint_last.pt --prompt 'w1 w2 w3' --max-len-b 12", dir);
    gen_ok("data-bin", args, &r);
    assert_non_null(strstr(r.out, "loaded checkpoint"));
    assert_non_null(strstr(r.out, "S-0\tw1 w2 w3\n"));
    assert_non_null(strstr(r.out, "W-0\t"));
    char *h = field(r.out, 'H', 0), *d = field(r.out, 'D', 0), *p = field(r.out, 'P', 0);
    assert_non_null(h);
    assert_non_null(d);
    assert_non_null(p);
    assert_true(strncmp(h, "w1 w2 w3", 8) == 0); /* the prompt is the hypothesis' prefix */
    assert_string_equal(h, d);                  /* no BPE: detokenizing changes nothing */
    assert_int_equal(count_words(p), count_words(h) + 1); /* a score per token and the final </s> */
    assert_true(count_words(h) <= 12);
    free(h);
    free(d);
    free(p);
    moe_cmd_result_free(&r);
}

static void same_hdp(const moe_cmd_result *a, const moe_cmd_result *b, int expect_same)
{
    char *x = lines_of(a->out, "HDP"), *y = lines_of(b->out, "HDP");
    assert_true(strlen(x) > 0);
    if (expect_same && strcmp(x, y) != 0)
        fail_msg("expected the same hypotheses:\n%s\n---\n%s", x, y);
    if (!expect_same && strcmp(x, y) == 0)
        fail_msg("expected different hypotheses, found the same:\n%s", x);
    free(x);
    free(y);
}

/* Sampling repeats with its seed, whatever the batch; top-k 1 and a tiny
 * top-p are greedy. */
static void test_generate_tool_sampling(void **state)
{
    (void)state;
    write_file("prompts.txt", "w1 w2 w3\nw7\nw4 w5 w6 w7 w8 w9 w10 w11 w12 w13\n");
    char in[160];
    snprintf(in, sizeof in, "--input %s/prompts.txt --max-len-b 20 ", dir);
    char a[1024];
    moe_cmd_result s1, s2, s3, s4, g1, k1, p1;
    snprintf(a, sizeof a, RANDOM_MODEL "%s --sampling --buffer-size 3 --batch-size 3", in);
    gen_ok("data-bin", a, &s1);
    gen_ok("data-bin", a, &s2);
    same_hdp(&s1, &s2, 1);
    assert_int_equal(moe_count_lines(s1.out, "H-"), 3);
    snprintf(a, sizeof a, RANDOM_MODEL "%s --sampling --batch-size 1", in);
    gen_ok("data-bin", a, &s3);
    same_hdp(&s1, &s3, 1); /* batch size 3 and 1 */
    snprintf(a, sizeof a, "--cpu --task language_modeling --tokens-per-sample 64 --arch transformer_lm_gpt "
                          "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 48 "
                          "--decoder-attention-heads 4 --moe-expert-count 4 --moe-freq 2 --seed 4 %s --sampling",
             in);
    gen_ok("data-bin", a, &s4);
    same_hdp(&s1, &s4, 0); /* another seed (and model) */
    snprintf(a, sizeof a, RANDOM_MODEL "%s --buffer-size 3 --batch-size 2", in);
    gen_ok("data-bin", a, &g1);
    snprintf(a, sizeof a, RANDOM_MODEL "%s --sampling --sampling-topk 1", in);
    gen_ok("data-bin", a, &k1);
    same_hdp(&g1, &k1, 1);
    snprintf(a, sizeof a, RANDOM_MODEL "%s --sampling --sampling-topp 0.00001", in);
    gen_ok("data-bin", a, &p1);
    same_hdp(&g1, &p1, 1);
    moe_cmd_result *all[] = {&s1, &s2, &s3, &s4, &g1, &k1, &p1};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        moe_cmd_result_free(all[i]);
}

static void test_generate_tool_formats(void **state)
{
    (void)state;
    moe_cmd_result f, p, t;
    /* unknown words are <unk>; an empty prompt starts from </s> alone */
    gen_ok("data-bin", RANDOM_MODEL "--prompt 'w3 nosuchword w4' --max-len-b 6", &f);
    assert_non_null(strstr(f.out, "S-0\tw3 <unk> w4\n"));
    char *h = field(f.out, 'H', 0);
    assert_non_null(h);
    assert_true(strncmp(h, "w3 <unk> w4", 11) == 0);
    assert_non_null(strstr(f.out, "NOTE: hypothesis and token scores are output in base 2"));
    /* plain: the detokenized hypothesis alone on stdout, the log on stderr */
    gen_ok("data-bin", RANDOM_MODEL "--prompt 'w3 nosuchword w4' --max-len-b 6 --output-format plain", &p);
    char want[512];
    snprintf(want, sizeof want, "%s\n", h);
    assert_string_equal(p.out, want);
    assert_non_null(strstr(p.err, "Type the input sentence"));
    free(h);
    /* --report-speed on stderr */
    gen_ok("data-bin", RANDOM_MODEL "--prompt '' --max-len-b 8 --min-len 8 --report-speed", &t);
    assert_non_null(strstr(t.err, "tokens/s"));
    h = field(t.out, 'H', 0);
    assert_non_null(h);
    assert_int_equal(count_words(h), 8); /* --min-len 8 keeps </s> out until max_len forces it */
    free(h);
    moe_cmd_result_free(&f);
    moe_cmd_result_free(&p);
    moe_cmd_result_free(&t);
}

static void expect_refusal(const char *data, const char *args, int status, const char *needle)
{
    moe_cmd_result r;
    gen_run(data, args, &r);
    if (r.status != status || !strstr(r.err, needle))
        fail_msg("moelm-generate %s: expected exit %d and '%s', found %d:\n%s\n%s", args, status, needle, r.status,
                 r.out, r.err);
    moe_cmd_result_free(&r);
}

static void test_generate_tool_refusals(void **state)
{
    (void)state;
    expect_refusal("data-bin", RANDOM_MODEL "--prompt w1 --beam 2", 2, "beam search is not implemented");
    expect_refusal("data-bin", RANDOM_MODEL "--prompt w1 --output-format xml", 2, "output-format");
    expect_refusal("data-bin", RANDOM_MODEL "--prompt w1 --bpe gpt2", 2, "--gpt2-encoder-json");
    expect_refusal("data-bin", RANDOM_MODEL "--prompt w1 --sampling-topk 3", 2, "--sampling");
    expect_refusal("data-bin", RANDOM_MODEL "--prompt w1 --batch-size 4", 2, "--buffer-size");
    expect_refusal("nowhere", RANDOM_MODEL "--prompt w1", 1, "dict.txt");
    /* no DATA at all */
    moe_cmd_result r;
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/moelm-generate " RANDOM_MODEL "--prompt w1", MOE_TEST_BIN_DIR);
    assert_int_equal(moe_run_shell(cmd, &r), 0);
    assert_true(r.status != 0);
    assert_non_null(strstr(r.err, "DATA"));
    moe_cmd_result_free(&r);
}

/* A tiny GPT-2 vocabulary (the 256 byte chars, then the merges of "hello"
 * and " world") and a dictionary of its ids: prompts are encoded, outputs
 * decoded. */
static void test_generate_tool_bpe(void **state)
{
    (void)state;
    static const char *const merges[][2] = {
        {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\xc4\xa0", "w"}, {"o", "r"}, {"\xc4\xa0w", "or"},
        {"\xc4\xa0wor", "l"}, {"\xc4\xa0worl", "d"},
    };
    const int nm = (int)(sizeof merges / sizeof merges[0]);
    char path[256];
    snprintf(path, sizeof path, "%s/encoder.json", dir);
    FILE *e = fopen(path, "w");
    snprintf(path, sizeof path, "%s/vocab.bpe", dir);
    FILE *v = fopen(path, "w");
    char dpath[128];
    snprintf(dpath, sizeof dpath, "%s/bpe-bin", dir);
    char mk[160];
    snprintf(mk, sizeof mk, "mkdir -p %s", dpath);
    assert_int_equal(system(mk), 0);
    snprintf(path, sizeof path, "%s/dict.txt", dpath);
    FILE *d = fopen(path, "w");
    assert_non_null(e);
    assert_non_null(v);
    assert_non_null(d);
    fputc('{', e);
    for (int b = 0; b < 256; b++) {
        uint32_t cp = moe_bpe_byte_to_char((uint8_t)b);
        char u[8];
        int n = 0;
        if (cp < 0x80) {
            u[n++] = (char)cp;
        } else {
            u[n++] = (char)(0xC0 | (cp >> 6));
            u[n++] = (char)(0x80 | (cp & 0x3F));
        }
        u[n] = '\0';
        fprintf(e, "%s\"%s%s\": %d", b ? ", " : "", cp == '"' || cp == '\\' ? "\\" : "", u, b);
    }
    for (int i = 0; i < nm; i++)
        fprintf(e, ", \"%s%s\": %d", merges[i][0], merges[i][1], 256 + i);
    fprintf(e, "}\n");
    fprintf(v, "#version: 0.2\n");
    for (int i = 0; i < nm; i++)
        fprintf(v, "%s %s\n", merges[i][0], merges[i][1]);
    /* the letters and the merged words as dictionary symbols (GPT-2 ids), 4 + 28 + 8 padding = 40 types */
    for (int id = 97; id <= 122; id++)
        fprintf(d, "%d %d\n", id, 200 - id);
    fprintf(d, "259 300\n264 299\n");
    for (int i = 0; i < 8; i++)
        fprintf(d, "madeupword%04d 0\n", i);
    fclose(e);
    fclose(v);
    fclose(d);
    char args[1024];
    snprintf(args, sizeof args,
             RANDOM_MODEL "--bpe gpt2 --gpt2-encoder-json %s/encoder.json --gpt2-vocab-bpe %s/vocab.bpe "
                          "--prompt 'hello world' --max-len-b 8",
             dir, dir);
    moe_cmd_result r;
    gen_ok("bpe-bin", args, &r);
    assert_non_null(strstr(r.out, "S-0\t259 264\n"));
    char *dt = field(r.out, 'D', 0);
    assert_non_null(dt);
    assert_true(strncmp(dt, "hello world", 11) == 0); /* the prompt decodes back */
    free(dt);
    moe_cmd_result_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generate_decode_matches_forward),
        cmocka_unit_test(test_generate_decode_gates_and_layouts),
        cmocka_unit_test(test_generate_decode_topk),
        cmocka_unit_test(test_generate_decode_capacity_drops),
        cmocka_unit_test(test_generate_decode_half_precision),
        cmocka_unit_test(test_generate_decode_refusals),
    };
    const struct CMUnitTest tool[] = {
        cmocka_unit_test(test_generate_tool_checkpoint), cmocka_unit_test(test_generate_tool_sampling),
        cmocka_unit_test(test_generate_tool_formats),    cmocka_unit_test(test_generate_tool_refusals),
        cmocka_unit_test(test_generate_tool_bpe),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    return failed + cmocka_run_group_tests(tool, tool_setup, tool_teardown);
}
