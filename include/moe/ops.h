/* ops.h: the compute ops table that every backend implements (cpu, cuda).
 *
 * Every op takes the backend context first and returns a moe_status. All
 * pointers are backend memory (device pointers on cuda) unless a parameter says
 * "host". Ops never synchronise with the host; values the host needs (loss sums,
 * norms, metrics) are left in small device buffers and fetched with
 * backend->copy_to_host at log time.
 *
 * Conventions a reader would trip over:
 *  - Storage dtypes are MOE_F32, MOE_F16 or MOE_BF16 (argument `dt`); all
 *    arithmetic is fp32 and each result is rounded once on store.
 *  - "accumulates" means out += result; "writes" means out = result.
 *  - Matrices are row-major. Token-major activations are (N, C) with
 *    N = B*T tokens ordered batch-major (n = b*T + t), as fairseq's MoE layer
 *    flattens them.
 *  - Randomness is counter-based (kernels/philox.h): a value is a pure function
 *    of (seed, stream, index); index i is word (i & 3) of the Philox4x32-10
 *    evaluation at counter (i >> 2, stream), so one evaluation serves four
 *    consecutive indices. cpu and cuda draw the same dropout masks and
 *    recomputation (--checkpoint-activations) reproduces them exactly.
 *  - Nothing here is a mock: the cpu backend is the oracle the cuda backend is
 *    tested against op by op.
 */
#ifndef MOE_OPS_H
#define MOE_OPS_H

#include <stdint.h>

#include "moe/status.h"
#include "moe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_ctx moe_ctx; /* a backend's stream/context, opaque */

/* The FFN activation: GELU in its tanh (Megatron's fused bias-GELU) or exact erf
 * form (FAIRSEQ_SPEC.md §1.8), or relu = max(0, x) with derivative 0 at x == 0;
 * relu passes NaN through forward and backward, as torch.relu does. */
typedef enum moe_act_kind { MOE_ACT_GELU_TANH = 0, MOE_ACT_GELU_ERF = 1, MOE_ACT_RELU = 2 } moe_act_kind;

typedef enum moe_epilogue {
    MOE_EPI_NONE = 0,
    MOE_EPI_BIAS,      /* C = alpha*op(A)op(B) + beta*C + bias                    */
    MOE_EPI_BIAS_ACT,  /* pre = alpha*op(A)op(B) + bias; C = act(pre); aux = pre  */
    MOE_EPI_DACT       /* (ABI 1.5, grouped_matmul only) C = alpha*op(A)op(B) times
                        * act'(aux): aux holds the pre-activations, read        */
} moe_epilogue;

/* C(m,n) = alpha * op(A)(m,k) * op(B)(k,n) + beta * C, row-major, for `batch`
 * independent problems at the given element strides. op(X) = X or X^T. */
typedef struct moe_matmul_desc {
    int trans_a, trans_b;
    int64_t m, n, k;
    float alpha, beta;
    const void *a; int64_t lda; int64_t stride_a;
    const void *b; int64_t ldb; int64_t stride_b;
    void *c;       int64_t ldc; int64_t stride_c;
    moe_dtype ab_dtype;        /* dtype of A and B */
    moe_dtype c_dtype;         /* dtype of C (and bias, aux) */
    int64_t batch;             /* >= 1 */
    moe_epilogue epilogue;
    const void *bias;          /* (n) per batch at stride_bias, or NULL */
    int64_t stride_bias;
    void *aux;                 /* BIAS_ACT: pre-activation (m,n) like C, or NULL */
    moe_act_kind act;          /* BIAS_ACT: the activation */
} moe_matmul_desc;

/* Second-expert policies of top-2 gating (FAIRSEQ_SPEC.md §2.7). */
typedef enum moe_route_policy {
    MOE_ROUTE_SAMPLING = 0,
    MOE_ROUTE_ALL,
    MOE_ROUTE_RANDOM
} moe_route_policy;

/* Scores of the general top-k router (moe_route_args.topk = 1). */
typedef enum moe_route_score { MOE_SCORE_SOFTMAX = 0, MOE_SCORE_SIGMOID } moe_route_score;

/* Load-balancing loss of the general top-k router: GShard/Switch's over the
 * whole batch, the same per sequence averaged over the sequences
 * (DeepSeek-V3's sequence-wise loss, Megatron-Core's seq_aux_loss), or none. */
typedef enum moe_route_aux { MOE_AUX_BATCH = 0, MOE_AUX_SEQ, MOE_AUX_NONE } moe_route_aux;

/* Values a gate adds to the log (moe_gate_ops.log_fields names them), per
 * MoE layer, in this order: what route_forward writes to
 * moe_route_args.gate_metrics. z_loss is the router z-loss times its
 * coefficient, the part of l_aux it is. */
enum { MOE_GATE_METRIC_Z_LOSS = 0, MOE_NUM_GATE_METRICS };

/* Routing metrics, per MoE layer, in this order (FAIRSEQ_SPEC.md §2.2, §8.2). */
enum {
    MOE_METRIC_OVERFLOW_EXPERT1 = 0,
    MOE_METRIC_OVERFLOW_EXPERT2,
    MOE_METRIC_ENTROPY_GATING,
    MOE_METRIC_EXPERT1_BALANCE_TOP,
    MOE_METRIC_EXPERT1_BALANCE_BOTTOM,
    MOE_METRIC_UNUSED_EXPERT1_COUNT,
    MOE_METRIC_EXPERT2_BALANCE_TOP,
    MOE_METRIC_EXPERT2_BALANCE_BOTTOM,
    MOE_METRIC_UNUSED_EXPERT2_COUNT,
    MOE_METRIC_A2A_CPU_MS,
    MOE_METRIC_A2A_CUDA_MS,
    MOE_NUM_METRICS
};

/* One routing decision for S tokens over E experts with capacity C.
 * Index form: for token s and choice j (0 = first, 1 = second, ...), with W
 * columns (W = width, or 2 when width is 0):
 *   expert[s*W+j]  global expert id, or -1 (no choice: pad token, top-1's j=1)
 *   slot[s*W+j]    capacity slot 0..C-1, or -1 if dropped (capacity, random policy)
 *   weight[s*W+j]  combine weight (0 when dropped)
 * route_forward writes expert/slot/weight/probs, writes l_aux (1 float) and
 * metrics (MOE_NUM_METRICS floats; the a2a entries are left untouched for the
 * caller) and, when given, gate_metrics; it accumulates only expert_load.
 *
 * Two routers share these arguments. topk = 0 is fairseq's top-1/top-2
 * (FAIRSEQ_SPEC.md §2.2-2.3; W must be 2). topk = 1 is the general top-k
 * router (kernels/cpu/route.c describes its math): k of the E experts by
 * softmax or sigmoid scores, optionally group-limited and with a selection
 * bias, capacity claims in token order with choice j's claims after every
 * claim of the choices before it, GShard/Switch's loss per batch or per
 * sequence plus the router z-loss; it ignores policy and seed, and refuses
 * normalize_before_drop and batch_prioritized. expert_choice = 1 is
 * expert-choice routing: expert[s*E+e] = e where expert e took token s (-1
 * elsewhere), slot its rank among the tokens e took, weight the token's
 * softmax score for e; a token gets 0..E experts, none overflows. */
typedef struct moe_route_args {
    int64_t S;                  /* tokens */
    int E;                      /* global experts */
    int64_t capacity;           /* C */
    int k;                      /* choices per token: 1 or 2 (topk = 0), 1..E (topk = 1) */
    moe_route_policy policy;    /* second-expert policy, k == 2 only */
    int normalize_before_drop;  /* --moe-normalize-gate-prob-before-dropping */
    int batch_prioritized;      /* --moe-batch-prioritized-routing */
    uint64_t seed, stream;      /* for Gumbel noise and the random policy */
    const float *logits;        /* (S,E) fp32 in */
    const uint8_t *pad;         /* (S) 1 = padding token, or NULL */
    float *probs;               /* (S,E) fp32 out: softmax(logits) (sigmoid with MOE_SCORE_SIGMOID), kept for backward */
    int32_t *expert;            /* (S,W) out */
    int32_t *slot;              /* (S,W) out */
    float *weight;              /* (S,W) out */
    float *l_aux;               /* (1) out */
    float *metrics;             /* (MOE_NUM_METRICS) out */
    void *workspace;            /* route_workspace_bytes(S,E) bytes of backend scratch */
    /* (ABI 1.3) (S) i32, or NULL: the token index the randomness of token s is drawn
     * with (Gumbel noise of logit e at noise_index[s]*E + e, the random
     * policy's draw at noise_index[s]) instead of s. Decoding passes each
     * token's place in its own sequence, so its routing does not depend on
     * the other rows of the batch. */
    const int32_t *noise_index;

    /* ---- (ABI 1.4) the general top-k router; all 0/NULL for fairseq's ---- */
    int topk;                   /* 1: the general top-k router; 0: fairseq's top-1/top-2 */
    int width;                  /* W, columns of expert/slot/weight: 0 means 2; >= k */
    moe_route_score score;      /* softmax over the experts, or a sigmoid per expert */
    int renormalize;            /* weights of the k choices divided by their sum (before capacity) */
    float z_loss_coeff;         /* >= 0: l_aux += coeff * mean_s logsumexp(logits[s])^2 */
    moe_route_aux aux;          /* the load-balancing loss */
    int64_t seq_len;            /* tokens per sequence (MOE_AUX_SEQ; divides S; set by the caller) */
    int num_groups, group_topk; /* group-limited routing: E/num_groups experts per group; 0, 0: none */
    const float *expert_bias;   /* (E) or NULL: added to the scores to select, not to weigh */
    float *expert_load;         /* (E) or NULL: accumulates the non-pad choices per expert (before capacity) */
    float *gate_metrics;        /* (MOE_NUM_GATE_METRICS) out, or NULL */
    /* (ABI 1.4) 1: expert-choice routing (Zhou et al. 2022; kernels/cpu/route.c
     * describes it): each expert takes the `capacity` tokens of largest
     * softmax score, in the per-expert layout W = E (column e is expert e);
     * needs topk = 0 and width = E. 0 (or absent, a caller older than this
     * member): the router topk names. */
    int expert_choice;
} moe_route_args;

/* Adam (fairseq FusedAdamV1 semantics, FAIRSEQ_SPEC.md §5.2) on one tensor. */
typedef struct moe_adam_args {
    int64_t n;
    void *param;  moe_dtype param_dtype;   /* updated in place (fp32 master or the param itself) */
    void *param_copy; moe_dtype copy_dtype;/* if non-NULL: also written, rounded (fp16/bf16 compute copy) */
    const void *grad; moe_dtype grad_dtype;
    void *exp_avg; void *exp_avg_sq; moe_dtype state_dtype; /* MOE_F32, or MOE_F16 for --fp16-adam-stats */
    float *scale_avg, *scale_avg_sq;       /* (1) device: per-tensor scales when state is fp16 */
    float lr, beta1, beta2, eps, weight_decay;
    float grad_scale;                      /* grads are divided by this (loss scale, sample size) */
    int64_t step;                          /* 1-based, counts successful updates */
} moe_adam_args;

typedef struct moe_sgd_args {
    int64_t n;
    void *param; moe_dtype param_dtype;
    void *param_copy; moe_dtype copy_dtype;
    const void *grad; moe_dtype grad_dtype;
    float *momentum_buf;                   /* (n) fp32, or NULL when momentum == 0 */
    float lr, momentum, weight_decay, grad_scale;
} moe_sgd_args;

/* ---- decoding (moelm-generate): inference only, nothing here has a backward ----
 *
 * A decoding step feeds a few new tokens per row against a per-row K/V cache.
 * At batch 1 a step is bound by streaming the weights once, so these ops fuse
 * what surrounds each product into it: a LayerNorm of the input rows before
 * the product, bias, the q scale, the activation and the residual add after
 * it. Each rounds where the unfused training path rounds (the LayerNorm
 * output, a layer's output before the residual add, the experts' outputs), so
 * a decode step computes what arch->forward computes, up to the order of
 * fp32 sums. */

/* y (m,n) = epilogue(prologue(x) W^T): a Linear over a few rows.
 *   h_i   = x[rows ? rows[i] : i] (row stride ldx); with layernorm:
 *           LN(h_i) with ln_weight, ln_bias, ln_eps (statistics in double as
 *           layernorm_forward), rounded to dt as layernorm_forward stores it
 *   v_ij  = h_i . w_j + bias_j (bias NULL: 0), times q_scale for the last
 *           q_cols outputs j >= n - q_cols (the q of a packed k|v|q
 *           projection; q_cols 0: none), then act_kind when act
 *   y_ij  = v_ij rounded to y_dtype, then, when beta != 0, beta*y_ij + that,
 *           rounded again (the residual add). beta == 0 does not read y.
 * x, w, bias, ln_* are dt; y is dt or MOE_F32. y must not overlap x. */
typedef struct moe_rowlinear_desc {
    int64_t m, n, k;
    const void *x;
    int64_t ldx;
    const int32_t *rows;         /* (m) backend i32, or NULL */
    int layernorm;
    const void *ln_weight, *ln_bias; /* (k), either may be NULL (1, 0) */
    float ln_eps;
    const void *w;               /* (n,k) row-major: a Linear's weight */
    const void *bias;            /* (n) or NULL */
    float q_scale;
    int64_t q_cols;
    int act;
    moe_act_kind act_kind;
    float beta;
    void *y;
    int64_t ldy;
    moe_dtype y_dtype;
    moe_dtype dt;
} moe_rowlinear_desc;

/* Top-1/top-2 gating of S tokens when nothing can be dropped (capacity >= S,
 * policy all or sampling): the gate projection, softmax and choices of
 * route_forward in one op, without capacity, l_aux or metrics.
 *   h = LN(x) rounded to dt (layernorm) or x; logits = h wg^T rounded to dt
 *   (as the arch's gate GEMM stores them), then in fp32: probs = softmax;
 *   i1 = argmax probs; i2 (k == 2) = argmax over e != i1 of the logits plus,
 *   for the sampling policy, route_forward's Gumbel noise (noise_index as
 *   there); ties to the lower index.
 *   weight: top-1 probs[i1]; top-2 p/max(p1+p2, FLT_EPSILON) for both.
 *   expert (S,2) = i1, i2 (-1 for top-1's second and for pad tokens, whose
 *   weights are 0). These are route_forward's expert and weight whenever it
 *   drops nothing; an assignment counts when expert >= 0 and weight != 0. */
typedef struct moe_gate_topk_args {
    int64_t S, d;
    int E, k;
    const void *x;               /* (S,d) dt */
    int layernorm;
    const void *ln_weight, *ln_bias;
    float ln_eps;
    const void *wg;              /* (E,d) dt */
    moe_route_policy policy;     /* MOE_ROUTE_ALL or MOE_ROUTE_SAMPLING (k == 2) */
    uint64_t seed, stream;
    const int32_t *noise_index;  /* (S) or NULL, as in moe_route_args */
    const uint8_t *pad;          /* (S) 1 = padding token, or NULL */
    int32_t *expert;             /* (S,2) out */
    float *weight;               /* (S,2) out */
    moe_dtype dt;
} moe_gate_topk_args;

/* The experts of a MoE layer for the tokens routed to them, no capacity
 * slots: only the experts some token chose are read.
 *   h_s    = LN(x_s) rounded to dt (layernorm) or x_s
 *   for each assignment (s,j) with expert[s*2+j] = e >= 0 and weight != 0:
 *   a_sj   = act(h_s W1[e]^T + b1[e]) rounded to dt (into hidden)
 *   o_sj   = a_sj W2[e]^T + b2[e] rounded to dt (into eout, as fp32)
 *   moe_s  = sum_j weight[s*2+j] * o_sj (j = 0, 1; in double), rounded to dt
 *   y_s    = moe_s, or with beta != 0 beta*y_s + moe_s rounded again.
 * w1, b1, w2, b2 are tables of E pointers, in backend memory, to each
 * expert's fc1.weight (f,d), fc1.bias (f), fc2.weight (d,f), fc2.bias (d).
 * y may alias x. */
typedef struct moe_expert_ffn_args {
    int64_t S, d, f;
    int E;
    const void *x;               /* (S,d) dt */
    int layernorm;
    const void *ln_weight, *ln_bias;
    float ln_eps;
    const int32_t *expert;       /* (S,2) */
    const float *weight;         /* (S,2) */
    const void *const *w1, *const *b1, *const *w2, *const *b2;
    moe_act_kind act;
    float beta;
    void *y;                     /* (S,d) dt */
    void *hidden;                /* (S*2, f) dt scratch */
    float *eout;                 /* (S*2, d) fp32 scratch */
    moe_dtype dt;
} moe_expert_ffn_args;

/* Products of grouped_matmul (ABI 1.5): one per group g < groups, each as
 * moe_matmul_desc's with batch 1 (row-major, op(A) m x k, op(B) k x n, C m x
 * n, fp32 accumulation, A, B, C, bias and aux in one dtype), group g's
 * operands at a[g], b[g], c[g] (host arrays of device pointers) and its
 * variable dimension cut to rows[g] (device memory, read by the kernels, so
 * the sizes never visit the host):
 *  - trans_a == 0: the first min(rows[g], m) rows of op(A) and C (the other
 *    rows of C are not written);
 *  - trans_a == 1: the sum runs over the first min(rows[g], k) rows of A
 *    and op(B) (none: C = beta C); with dbias, dbias[g] (m) += alpha times
 *    the column sums of those rows of A (the bias gradient of a Linear
 *    layer whose output gradient is A).
 * Epilogues as moe_matmul_desc's (BIAS_ACT with beta 0, trans_a 0 only), and
 * DACT (beta 0, trans_a 0): the gradient through the activation act of the
 * pre-activations aux, an activation's backward fused into the product. */
typedef struct moe_grouped_matmul_args {
    int trans_a, trans_b;
    int64_t groups;
    const int32_t *rows;         /* (groups) int32, device memory */
    int64_t rows_total;          /* trans_a == 0: a bound on the sum of rows[g] (the grid's), 0 = groups * m */
    int64_t m, n, k;             /* the variable one's bound */
    float alpha, beta;
    const void *const *a; int64_t lda;
    const void *const *b; int64_t ldb;
    void *const *c;       int64_t ldc;
    moe_dtype dtype;
    moe_epilogue epilogue;
    const void *const *bias;     /* (n) per group, or NULL */
    void *const *aux;            /* BIAS_ACT: pre-activations like C (written), or NULL; DACT: read */
    moe_act_kind act;
    void *const *dbias;          /* trans_a == 1: (m) per group, or NULL */
} moe_grouped_matmul_args;

typedef struct moe_ops {
    /* ---- elementwise and utility ---- */
    /* x[i] = value */
    moe_status (*fill)(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float value);
    /* dst[i] = (dst_dt) src[i] */
    moe_status (*cast)(moe_ctx *c, void *dst, moe_dtype dst_dt, const void *src, moe_dtype src_dt, int64_t n);
    /* y[i] = a*x[i] + b*y[i]   (x and y share dt) */
    moe_status (*axpby)(moe_ctx *c, void *y, const void *x, moe_dtype dt, int64_t n, float a, float b);
    /* out[i] = x[i] + y[i]   (out may alias x or y) */
    moe_status (*add)(moe_ctx *c, void *out, const void *x, const void *y, moe_dtype dt, int64_t n);
    /* x ~ U(lo, hi) from (seed, stream), element i uses uniform index i */
    moe_status (*init_uniform)(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float lo, float hi,
                               uint64_t seed, uint64_t stream);
    /* x ~ N(mean, std) from (seed, stream), element i from uniform indices 2i, 2i+1 */
    moe_status (*init_normal)(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float mean, float std,
                              uint64_t seed, uint64_t stream);
    /* *out += scale * sum_i x[i*stride]  (fp32 in/out, fixed summation order) */
    moe_status (*sum_f32)(moe_ctx *c, float *out, const float *x, int64_t n, int64_t stride, float scale);
    /* *out += sum_i (float)x[i]^2  (fp32 out; inf/nan propagate, which is the overflow check) */
    moe_status (*sumsq)(moe_ctx *c, float *out, const void *x, moe_dtype dt, int64_t n);

    /* ---- linear algebra ---- */
    moe_status (*matmul)(moe_ctx *c, const moe_matmul_desc *d);
    /* dbias(C) += sum over rows of dy(N,C) */
    moe_status (*bias_backward)(moe_ctx *c, void *dbias, const void *dy, int64_t N, int64_t C, moe_dtype dt);

    /* ---- activations and regularisation ---- */
    /* out = act(inp) */
    moe_status (*act_forward)(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, moe_act_kind kind);
    /* dinp = dout * act'(inp)   (writes; dinp may alias dout). relu selects rather than
     * multiplies: dinp = inp > 0 ? dout : 0 (an inf dout at inp <= 0 gives 0, not NaN) */
    moe_status (*act_backward)(moe_ctx *c, void *dinp, const void *inp, const void *dout, int64_t n, moe_dtype dt,
                               moe_act_kind kind);
    /* out = inp * keep / (1-p), keep = uniform(seed, stream, i) >= p. In place allowed.
     * p == 0 is a plain copy (or nothing, in place). */
    moe_status (*dropout_forward)(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, float p,
                                  uint64_t seed, uint64_t stream);
    /* din = dout * keep / (1-p) with the same mask (writes; in place allowed) */
    moe_status (*dropout_backward)(moe_ctx *c, void *din, const void *dout, int64_t n, moe_dtype dt, float p,
                                   uint64_t seed, uint64_t stream);

    /* ---- layer norm (eps given; statistics fp32) ---- */
    /* out(N,C) = (inp - mean) * rstd * weight + bias; writes mean(N), rstd(N) fp32 */
    moe_status (*layernorm_forward)(moe_ctx *c, void *out, float *mean, float *rstd, const void *inp,
                                    const void *weight, const void *bias, int64_t N, int64_t C, float eps,
                                    moe_dtype dt);
    /* accumulates dinp(N,C), dweight(C), dbias(C) */
    moe_status (*layernorm_backward)(moe_ctx *c, void *dinp, void *dweight, void *dbias, const void *dout,
                                     const void *inp, const void *weight, const float *mean, const float *rstd,
                                     int64_t N, int64_t C, moe_dtype dt);

    /* ---- embedding with fairseq's sinusoidal positions (FAIRSEQ_SPEC.md §1.2-1.4) ----
     * out[b,t] = scale * table[tok[b,t]] + (sinusoidal ? pos(padding_idx+1+t) : 0);
     * pad tokens get position row padding_idx, which is zero. tokens (B,T) i32. */
    moe_status (*embedding_forward)(moe_ctx *c, void *out, const int32_t *tokens, const void *table,
                                    int64_t B, int64_t T, int64_t C, float scale, int padding_idx,
                                    int sinusoidal, moe_dtype dt);
    /* dtable[tok] += scale * dout[b,t], except tok == padding_idx (no gradient). */
    moe_status (*embedding_backward)(moe_ctx *c, void *dtable, const void *dout, const int32_t *tokens,
                                     int64_t B, int64_t T, int64_t C, int64_t V, float scale, int padding_idx,
                                     moe_dtype dt);

    /* ---- causal multi-head attention ----
     * q, k, v: (B,T,H,D) at row stride ld (elements between consecutive tokens),
     * so they can point into one packed projection output. q is already scaled.
     * out: (B,T,H*D) contiguous. lse: (B,H,T) fp32 log-sum-exp of each score row,
     * saved for backward. Dropout p on the probabilities, mask index
     * ((b*H + h)*T + i)*T + j (uniform index: four consecutive keys j of a row
     * share one Philox evaluation when T % 4 == 0). */
    moe_status (*attention_forward)(moe_ctx *c, void *out, float *lse, const void *q, const void *k,
                                    const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D,
                                    float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt);
    /* writes dq, dk, dv (same layout and stride ldd as their inputs' ld) */
    moe_status (*attention_backward)(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout,
                                     const void *out, const float *lse, const void *q, const void *k,
                                     const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D,
                                     float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt);

    /* ---- softmax cross-entropy over the vocabulary ----
     * losses[n] = -log_softmax_fp32(logits[n])[target[n]], 0 where target == ignore_index.
     * If grad_scale != 0, logits(N,V) is overwritten with
     * grad_scale * (softmax - onehot(target)), zero rows for ignored targets. */
    moe_status (*cross_entropy)(moe_ctx *c, float *losses, void *logits, const int32_t *targets, int64_t N,
                                int64_t V, int ignore_index, float grad_scale, moe_dtype dt);

    /* ---- MoE routing, dispatch, combine ---- */
    int64_t (*route_workspace_bytes)(int64_t S, int E);
    moe_status (*route_forward)(moe_ctx *c, const moe_route_args *a);
    /* dlogits(S,E) fp32 written from dweight(S,W) (gradient of the combine
     * weights) and dl_aux (host scalar: d loss / d l_aux), through the weight
     * normalisation, the softmax (or sigmoid), the load-balancing loss and
     * the z-loss. Uses a->probs, a->expert, a->slot as route_forward left
     * them (and a->logits for the z-loss). */
    moe_status (*route_backward)(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux,
                                 float *dlogits);
    /* out(E*C, d): row e*C+slot = x[s] for each kept (s, j); other rows zero */
    moe_status (*dispatch_forward)(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                   const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
    /* dx(S,d) accumulates sum over kept (s, j) of dout[e*C+slot] */
    moe_status (*dispatch_backward)(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                    const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
    /* y(S,d) = sum over kept (s, j) of weight * eout[e*C+slot] (writes; zero if none kept) */
    moe_status (*combine_forward)(moe_ctx *c, void *y, const void *eout, const int32_t *expert,
                                  const int32_t *slot, const float *weight, int64_t S, int E, int64_t C,
                                  int64_t d, moe_dtype dt);
    /* writes deout(E*C,d) (zero rows for unused slots) and dweight(S,2) fp32 */
    moe_status (*combine_backward)(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                   const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                   int E, int64_t C, int64_t d, moe_dtype dt);

    /* ---- optimizers ---- */
    moe_status (*adam_step)(moe_ctx *c, const moe_adam_args *a);
    moe_status (*sgd_step)(moe_ctx *c, const moe_sgd_args *a);

    /* ---- (ABI 1.3) decoding (moelm-generate), see the structs above ----
     * NULL in a table of an older minor (moe_backend_ops.ops_size): the
     * arch's decode_setup then refuses, naming the op. */
    /* out(N,C) = scale * table[tok[i]] + (sinusoidal and tok[i] != padding_idx ?
     * pos(positions[i]) : 0): embedding_forward with each token's position
     * given (a decoding step's tokens sit at padding_idx+1+cache length+j).
     * tokens, positions: (N) i32. */
    moe_status (*embedding_at_forward)(moe_ctx *c, void *out, const int32_t *tokens, const int32_t *positions,
                                       const void *table, int64_t N, int64_t C, float scale, int padding_idx,
                                       int sinusoidal, moe_dtype dt);
    moe_status (*rowlinear_forward)(moe_ctx *c, const moe_rowlinear_desc *d);
    /* Causal attention of n new queries per row against a per-row cache.
     * q, k, v: (B,n,H,D) at row stride ld (one packed projection; q already
     * scaled). k_cache, v_cache: (B,H,Tc,D). cache_len, n_new: (B) i32.
     * Query j < n_new[b] of row b attends the cached positions
     * 0..cache_len[b]-1 and the new positions 0..j; the new keys and values
     * j < n_new[b] are written to the cache at cache_len[b]+j (advancing
     * cache_len is the caller's). out: (B,n,H*D); rows j >= n_new[b] are
     * zero. Needs cache_len[b] + n_new[b] <= Tc and n_new[b] <= n (the cuda
     * backend trusts them: they live in device memory). */
    moe_status (*attention_decode)(moe_ctx *c, void *out, const void *q, const void *k, const void *v, int64_t ld,
                                   void *k_cache, void *v_cache, const int32_t *cache_len, const int32_t *n_new,
                                   int64_t B, int64_t n, int64_t H, int64_t D, int64_t Tc, moe_dtype dt);
    moe_status (*gate_topk_forward)(moe_ctx *c, const moe_gate_topk_args *a);
    moe_status (*expert_ffn_forward)(moe_ctx *c, const moe_expert_ffn_args *a);
    /* For each row r of logits (R,V) fp32, with z = logits[r] / temperature
     * (NaN counts as -inf): lse[r] = log sum_v exp(z_v) (in double);
     * top_val, top_idx (R,K): the K largest z in descending order, ties to
     * the lower index (0 <= K <= V); tgt[r] = z[targets[r]] when targets is
     * not NULL. What a sampler needs without copying the vocabulary. */
    moe_status (*logits_stats)(moe_ctx *c, float *lse, float *top_val, int32_t *top_idx, float *tgt,
                               const float *logits, const int32_t *targets, int64_t R, int64_t V, int K,
                               float temperature);
    /* Recorded launches (NULL where the backend runs ops as they are queued,
     * the cpu): between graph_begin and graph_end the ops queued are recorded,
     * not run; graph_launch replays the recording with the same pointers and
     * scalars (data is read at replay). Ops that need the host mid-way
     * (copies from the host, allocation, synchronisation) cannot be recorded.
     * graph_end always ends the recording, also after a failed op. */
    moe_status (*graph_begin)(moe_ctx *c);
    moe_status (*graph_end)(moe_ctx *c, void **graph);
    moe_status (*graph_launch)(moe_ctx *c, void *graph);
    void (*graph_destroy)(moe_ctx *c, void *graph);

    /* ---- (ABI 1.4) dispatch and combine over W choices per token ----
     * dispatch_forward through combine_backward with expert, slot, weight
     * and dweight (S,W) instead of (S,2), W >= 1 (moe_route_args.width: the
     * general top-k router with k > 2, W = E for expert choice); at W = 2
     * they are the ops above.
     * Choices are summed in the order j = 0..W-1. NULL in a table of an
     * older minor: the MoE layer then refuses more than two choices per
     * token, naming the op. */
    moe_status (*dispatch_wide_forward)(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                        const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                        moe_dtype dt);
    moe_status (*dispatch_wide_backward)(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                         const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                         moe_dtype dt);
    moe_status (*combine_wide_forward)(moe_ctx *c, void *y, const void *eout, const int32_t *expert,
                                       const int32_t *slot, const float *weight, int64_t S, int W, int E, int64_t C,
                                       int64_t d, moe_dtype dt);
    moe_status (*combine_wide_backward)(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                        const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                        int W, int E, int64_t C, int64_t d, moe_dtype dt);

    /* ---- (ABI 1.5) experts over the rows they were given ----
     * rows[e] = 1 + the largest slot < C of a choice routed to expert e
     * (0 when none) for e < E, from expert and slot (S,W): how far expert
     * e's slots are filled, computed on the device (int32). With
     * grouped_matmul (above) the experts multiply only those rows, without
     * a host synchronisation. NULL in a table of an older minor: the MoE
     * layer then multiplies every slot up to the capacity. */
    moe_status (*expert_rows)(moe_ctx *c, int32_t *rows, const int32_t *expert, const int32_t *slot, int64_t S,
                              int W, int E, int64_t C);
    moe_status (*grouped_matmul)(moe_ctx *c, const moe_grouped_matmul_args *g);
} moe_ops;

#ifdef __cplusplus
}
#endif

#endif
