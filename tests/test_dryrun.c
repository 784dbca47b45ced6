/* test_dryrun.c: --dry-run on fairseq's two reference commands, run as a user
 * would. The single-node counts are the sample log's; the 64-rank counts are
 * worked out by hand from FAIRSEQ_SPEC.md §1.10 below. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "runcmd.h"

#define COMMON                                                                                                   \
    "--ddp-backend fully_sharded --memory-efficient-fp16 --checkpoint-activations "                             \
    "--task dummy_lm --arch transformer_lm_gpt --share-decoder-input-output-embed "                              \
    "--moe-freq 2 --moe-gating-use-fp32 --moe-second-expert-policy all "                                        \
    "--moe-normalize-expert-grad sqrt_world_size --moe-eval-capacity-token-fraction -1.0 "                      \
    "--max-sentences-valid 1 --num-workers-valid 0 "                                                             \
    "--criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum "                 \
    "--optimizer adam --fp16-adam-stats --adam-betas '(0.9, 0.98)' --clip-norm 0.0 "                             \
    "--lr 0.0005 --warmup-updates 750 --dropout 0.1 --attention-dropout 0.1 --update-freq 1 "                   \
    "--max-update 250 --disable-validation --log-format json --log-interval 10 "

#define SINGLE_NODE                                                                                              \
    COMMON "--tokens-per-sample 2048 --decoder-layers 24 --decoder-embed-dim 2048 --decoder-ffn-embed-dim 8192 " \
           "--decoder-attention-heads 32 --moe-expert-count 8 --batch-size 4 "

#define MULTI_NODE                                                                                               \
    "--distributed-port 12345 " COMMON                                                                           \
    "--tokens-per-sample 1024 --decoder-layers 32 --decoder-embed-dim 4096 --decoder-ffn-embed-dim 16384 "       \
    "--decoder-attention-heads 32 --moe-expert-count 64 --batch-size 12 "

static void fmt_thousands(char *buf, long long v)
{
    char d[32];
    int n = snprintf(d, sizeof d, "%lld", v), o = 0;
    for (int i = 0; i < n; i++) {
        buf[o++] = d[i];
        if ((n - 1 - i) > 0 && (n - 1 - i) % 3 == 0)
            buf[o++] = ',';
    }
    buf[o] = '\0';
}

static void test_dryrun_single_node_counts(void **state)
{
    (void)state;
    moe_cmd_result r;
    assert_int_equal(moe_run_train(SINGLE_NODE "--distributed-world-size 8 --dry-run", &r), 0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "num. non-expert model params: 908,423,168 (num. trained: 908,423,168)"));
    assert_non_null(strstr(r.out, "num. expert model params: 402,776,064 (num. trained: 402,776,064)"));
    /* fully_sharded over 8 ranks, memory-efficient fp16 (2-byte params and
     * grads, no master copy, Adam's fp16 moments 4 bytes). V = 50000, d 2048:
     *   root "decoder"   embed 50000*2048 + final LN 2*2048 = 102,404,096
     *   dense layer      attn 4*(d*d+d) + 2 LNs 4*d + FFN 2*d*8192 + 8192 + d = 50,358,272
     *   MoE layer        attn + 2 LNs + gate 8*d = 16,809,984
     * 102,404,096 + 12 * 50,358,272 + 12 * 16,809,984 = 908,423,168, and each
     * unit divides by 8 exactly, so this rank keeps 113,552,896 non-expert
     * elements plus its local experts (one per MoE layer: the 402,776,064 of
     * fairseq's log line are this rank's). Whole at once: the root and two
     * layers (root + 2 dense layers), as parameters (the layer computed and
     * the next one prefetched) and as gradients (the layer computed and the
     * previous one, its reduce-scatter in flight into the largest shard,
     * 12,800,512). */
    const long long kept = 113552896LL + 402776064LL, whole = 102404096LL + 2 * 50358272LL;
    assert_true(102404096LL + 12 * 50358272LL + 12 * 16809984LL == 908423168LL);
    long long params = (kept + whole) * 2;
    long long grads = (kept + whole + 12800512LL) * 2;
    long long optim = kept * 4;
    char want[96];
    snprintf(want, sizeof want, "parameters %lld ", params);
    assert_non_null(strstr(r.out, want));
    snprintf(want, sizeof want, "gradients %lld ", grads);
    assert_non_null(strstr(r.out, want));
    snprintf(want, sizeof want, "optimizer state %lld ", optim);
    assert_non_null(strstr(r.out, want));
    assert_non_null(strstr(r.out, "model FLOPs per token"));
    assert_true(r.seconds < 1.0);
    moe_cmd_result_free(&r);
}

static void test_dryrun_multi_node_counts(void **state)
{
    (void)state;
    /* d 4096, f 16384, L 32 (16 dense, 16 MoE), E 64 over 64 ranks, V 50000 */
    const long long d = 4096, f = 16384, V = 50000, E = 64;
    long long embed = V * d + 2 * d;              /* embedding + final LN */
    long long attn_ln = 4 * (d * d + d) + 4 * d;  /* q,k,v,out + two LNs, per layer */
    long long ffn = d * f + f + f * d + d;        /* a dense FFN, also one expert */
    long long gate = d * E;
    long long non_expert = embed + 32 * attn_ln + 16 * ffn + 16 * gate;
    long long expert = 16 * 1 * ffn;              /* one local expert per MoE layer */
    assert_true(non_expert == 4505346048LL);      /* the same numbers, written out */
    assert_true(expert == 2147811328LL);
    char a[40], b[40], want[256];
    fmt_thousands(a, non_expert);
    fmt_thousands(b, expert);

    moe_cmd_result r;
    assert_int_equal(moe_run_train(MULTI_NODE "--distributed-world-size 64 --dry-run", &r), 0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    snprintf(want, sizeof want, "num. non-expert model params: %s (num. trained: %s)", a, a);
    assert_non_null(strstr(r.out, want));
    snprintf(want, sizeof want, "num. expert model params: %s (num. trained: %s)", b, b);
    assert_non_null(strstr(r.out, want));
    assert_true(r.seconds < 1.0);
    moe_cmd_result_free(&r);
}

static void test_dryrun_precision_changes_bytes(void **state)
{
    (void)state;
    /* fp32 with pytorch_ddp on one rank: 4-byte params and grads, Adam 8 bytes */
    moe_cmd_result r;
    assert_int_equal(moe_run_train("--task dummy_lm --arch transformer_lm_gpt --decoder-layers 2 "
                                   "--decoder-embed-dim 64 --decoder-ffn-embed-dim 128 --decoder-attention-heads 4 "
                                   "--share-decoder-input-output-embed --dict-size 996 --tokens-per-sample 64 "
                                   "--moe-expert-count 4 --moe-freq 2 --criterion moe_cross_entropy "
                                   "--optimizer adam --batch-size 2 --max-update 1 --dry-run",
                                   &r),
                     0);
    if (r.status != 0)
        fprintf(stderr, "%s\n%s\n", r.out, r.err);
    assert_int_equal(r.status, 0);
    /* V = 1000: embed 64000 + LN 128; per layer attn 4*(4096+64) + LN 256 = 16896;
     * layer 0 dense FFN 64*128+128+128*64+64 = 16576; layer 1 gate 256; 4 experts of 16576 */
    long long ne = 64000 + 128 + 2 * 16896 + 16576 + 256, ex = 4 * 16576;
    char want[96];
    snprintf(want, sizeof want, "parameters %lld ", (ne + ex) * 4);
    assert_non_null(strstr(r.out, want));
    snprintf(want, sizeof want, "optimizer state %lld ", (ne + ex) * 8);
    assert_non_null(strstr(r.out, want));
    moe_cmd_result_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dryrun_single_node_counts),
        cmocka_unit_test(test_dryrun_multi_node_counts),
        cmocka_unit_test(test_dryrun_precision_changes_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
