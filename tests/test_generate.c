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

#include <cmocka.h>

#include "core/internal.h"
#include "core/runtime.h"
#include "kernels/half.h"
#include "moe/plugin.h"

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
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generate_decode_matches_forward),
        cmocka_unit_test(test_generate_decode_gates_and_layouts),
        cmocka_unit_test(test_generate_decode_capacity_drops),
        cmocka_unit_test(test_generate_decode_half_precision),
        cmocka_unit_test(test_generate_decode_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
