/* transformer_lm.h: what the two source files of the transformer_lm arch
 * plugins share: the model struct (its configuration, parameter ids and
 * training buffers), the dropout-stream sites, and the entry points of
 * incremental decoding. Private to plugins/archs/: nothing here is ABI.
 *
 *   transformer_lm.c         options, variants, build, setup, the decoder's
 *                            training forward and backward (the conventions
 *                            in its opening comment hold for every file), and
 *                            the helpers below that the others share
 *   moe_layer.c              the MoE layer (moe_layer.h): experts, gates,
 *                            dispatch, all-to-all, combine, their backward
 *   transformer_lm_decode.c  decode_setup / decode_step / decode_reset: the
 *                            K/V cache and the eval-mode decoding step
 */
#ifndef MOE_PLUGINS_ARCHS_TRANSFORMER_LM_H
#define MOE_PLUGINS_ARCHS_TRANSFORMER_LM_H

#include <stdint.h>

#include "moe/plugin.h"

#ifndef MOE_ARCH_VARIANT
#define MOE_ARCH_VARIANT "transformer_lm"
#endif

#define TLM_LOG "fairseq.models.transformer_lm"
#define TLM_LN_EPS 1e-5f

/* Defaults of one of fairseq's named architectures (transformer_lm.c's table). */
typedef struct tlm_variant {
    const char *name;
    int64_t d, f, layers, heads;   /* f == 0: 4*d (the gpt3 family) */
    double dropout, attention_dropout, activation_dropout;
    const char *activation;
    int no_final_norm;             /* the arch function forces no_decoder_final_norm */
    int force_share;               /* the arch function forces tied embeddings (gpt3) */
    int learned_pos;               /* fairseq defaults to learned positions (gpt3) */
    int adaptive;                  /* fairseq defaults to adaptive input/softmax (wiki103) */
} tlm_variant;

/* Dropout and routing-noise sites; see tlm_stream. */
enum tlm_site {
    SITE_EMBED = 0,
    SITE_ATTN_PROBS,
    SITE_ATTN_OUT,
    SITE_FFN_ACT,
    SITE_FFN_OUT,
    SITE_EXPERT_ACT,
    SITE_EXPERT_OUT,
    SITE_GATE
};

/* The Philox stream of a site: micro << 48 | layer << 32 | site << 24 | sub
 * (transformer_lm.c's opening comment). */
uint64_t tlm_stream(int layer, int site, int micro, int sub);

struct tlm_decode;

typedef struct tlm_expert {
    int gid;                  /* global expert id */
    int unit;
    int fc1_w, fc1_b, fc2_w, fc2_b;
} tlm_expert;

/* An FFN's parameter ids and hidden width (0: none): a MoE layer's shared expert. */
typedef struct tlm_ffn {
    int fc1_w, fc1_b, fc2_w, fc2_b;
    int64_t width;
} tlm_ffn;

typedef struct tlm_layer {
    int moe;                  /* gate + experts instead of a dense FFN */
    int moe_index;            /* index among MoE layers, -1 for dense */
    int64_t ffn;              /* dense FFN width */
    int unit;
    int wk, wv, wq, bk, bv, bq, wo, bo, ln1_w, ln1_b;
    int fc1_w, fc1_b, fc2_w, fc2_b; /* dense */
    int wg;                         /* MoE gate projection (E, d) */
    int ln2_w, ln2_b;
    tlm_expert *experts;      /* local experts (MoE) */
    int64_t *rows;            /* (local experts) rows each processes, set by the MoE forward */
    void *gate;               /* the gate plugin's state (MoE) */
    tlm_ffn shared;           /* the shared expert (MoE with --moe-shared-expert-ffn-dim), width 0 without */
} tlm_layer;

/* What backward needs of one layer (one shared set with checkpointing). */
typedef struct tlm_acts {
    void *h1;                 /* (N,d) self_attn_layer_norm output */
    float *mean1, *rstd1;     /* (N) */
    void *qkv;                /* (N,3d) [k | v | q], q scaled */
    void *att;                /* (N,d) attention output before out_proj */
    float *lse;               /* (B,H,T) */
    void *xmid;               /* (N,d) residual stream after attention */
    void *h2;                 /* (N,d) final_layer_norm output */
    float *mean2, *rstd2;     /* (N) */
    void *pre, *act;          /* (N,f) dense (or shared expert) fc1 pre-activation, activation after dropout
                               * (act NULL with m->act_recompute: m->dpre holds it) */
    /* MoE */
    moe_route_args route;     /* as the gate's forward left it */
    float *logits;            /* (N,E) fp32 */
    float *probs;             /* (N,E) */
    int32_t *expert, *slot;   /* (N,W), W = tlm.width */
    float *weight;            /* (N,W) */
    void *route_ws;
    void *xe;                 /* (E*C,d) expert inputs, expert-major */
    void *epre, *eact;        /* (E*C,fe); eact NULL when not kept (moe_layer.c: keep_expert_acts) */
    void *eback;              /* (E*C,d) expert outputs back in the global (dispatch) layout */
} tlm_acts;

typedef struct tlm_alloc {
    void **ptrs;
    int n, cap;
} tlm_alloc;

/* Scratch placed inside the logits buffer (tlm_shared_alloc): requests
 * recorded during setup, given their offsets by tlm_shared_commit. */
typedef struct tlm_shared {
    void ***outs;
    uint64_t *bytes;
    void ***same; /* same[i] != NULL: outs[i] gets *same[i] (bytes[i] 0) */
    int n, cap;
} tlm_shared;

typedef struct tlm {
    const moe_host *h;
    const tlm_variant *variant;
    const moe_gate_ops *gate_ops;
    moe_dtype dt;
    /* configuration */
    int64_t V, d, f, fe, L, H, D;
    int pad;
    float p_drop, p_attn, p_act;
    moe_act_kind act_kind;    /* the FFN activation (dense and experts) */
    int tied, scale_embed, final_norm, ckpt, pad_mask;
    int record_a2a;           /* --record-a2a-perf-stats */
    float a2a_ms[2];          /* this layer's forward all-to-alls: host ms, completed ms */
    int E, moe_freq, n_moe, local_experts;
    int a2a_world;            /* W: ranks in this rank's all-to-all group */
    const moe_parallel_plan *plan; /* the core's expert layout (MoE models only) */
    float emb_scale, q_scale;
    /* parameters */
    int root_unit, emb, out_proj, lnf_w, lnf_b;
    tlm_layer *layers;
    /* buffers (setup) */
    int ready;
    int64_t Bmax, Tmax, Nmax, C;  /* C: capacity the MoE buffers hold */
    int64_t C_train;          /* the capacity the gate asks for in training at Nmax tokens */
    void *hs;                 /* (N,d) the layer norm outputs' one buffer when they are recomputed (ln_recompute) */
    void *xes;                /* (E*C,d) the experts' inputs' one buffer when they are dispatched again in
                               * backward (ln_recompute, one rank per all-to-all group) */
    int ln_recompute;         /* the layer norm outputs (h1, h2) are not kept per layer: every layer writes them
                               * to m->hs, the backward recomputes them there (no checkpointing; setup) */
    int act_recompute;        /* FFN activations are not kept: written to backward scratch in the forward,
                               * recomputed from the kept pre-activations in backward (no activation
                               * dropout, no checkpointing; setup) */
    int width;                /* W: choices per token the routing arrays hold (max(k, 2); E for expert choice) */
    moe_group *a2a_group;
    tlm_alloc allocs;
    tlm_shared shared;
    void **xs;                /* (L+1) x (N,d): layer inputs, xs[L] the last output */
    void *xf;                 /* (N,d) after the final norm */
    float *meanf, *rstdf;
    void *logits;             /* (N,V) */
    float *l_aux, *metrics;   /* (n_moe), (n_moe, MOE_NUM_METRICS) */
    float *gate_metrics;      /* (n_moe, MOE_NUM_GATE_METRICS) */
    void *ones;               /* (N) ones: column sums of strided gradients */
    void *bq_scaled;          /* (d) q bias times q_scale */
    void *tmp;                /* (N,d) a branch's output before the residual add */
    tlm_acts *acts;           /* L sets, or 1 with checkpointing */
    /* MoE scratch shared by layers */
    void *glog;               /* (N,E) gate logits in the act dtype (fp16/bf16 only) */
    void *disp, *recv, *eout, *eperm; /* (E*C,d), each NULL when it is aliased (see setup) */
    uint8_t *pad_dev;         /* (N) 1 = pad token */
    int32_t *tok_host;
    uint8_t *pad_host;
    int32_t *rows_dev;        /* (n_moe, E) filled slots per expert of this rank's routing (expert_rows op) */
    int32_t *rows_recv;       /* (n_moe, E) with W > 1: rank w's count for local expert l at [w L + l] */
    int32_t *rows_host;       /* (E) host copy of rows_dev, on a backend that runs on the host */
    void **gptr;              /* (6 E) operand arrays of the grouped expert products */
    /* backward scratch */
    void *dres, *dtmp, *dh, *datt; /* (N,d) */
    void *dqkv;               /* (N,3d) */
    void *dpre;               /* (N, max dense f) */
    void *d_a, *d_b, *d_c, *d_e; /* MoE (E*C,d): combine grad, received, expert-major, expert input grads */
    void *depre;              /* (W*C, fe) */
    float *dweight, *dlogits; /* (N,W), (N,E) fp32 */
    void *ebias;              /* (max(d, fe)) an expert's bias gradient before host->expert_grad_scale */
    void *dlog;               /* (N,E) act dtype (fp16/bf16 only) */
    /* the last forward */
    const int32_t *tokens;
    int64_t B, T, N;
    int train, micro;
    uint64_t seed;
    int ws_layer;             /* checkpointing: layer whose activations the shared set holds */
    int root_gathered;        /* a training forward holds the root unit until its backward */
    struct tlm_decode *dec;   /* incremental decoding's state (transformer_lm_decode.c), or NULL */
    int64_t fs;               /* --moe-shared-expert-ffn-dim (0: no shared expert) */
    void *shy;                /* (N,d) the shared expert's output (NULL without one) */
} tlm;

/* moe_layer.c: the gate plugin's state for every MoE layer, once
 * host->gate_ops is known (setup and decode_setup need it) */
moe_status tlm_init_gates(tlm *m);

/* moe_layer.c: dispatch and combine (ops.h) of S tokens routed to W choices
 * each, at capacity C, in the model's width and dtype; decoding uses them too */
moe_status tlm_dispatch_forward(const tlm *m, int W, void *out, const void *x, const int32_t *expert,
                                const int32_t *slot, int64_t S, int64_t C);
moe_status tlm_combine_forward(const tlm *m, int W, void *y, const void *eout, const int32_t *expert,
                               const int32_t *slot, const float *weight, int64_t S, int64_t C);

/* transformer_lm.c: helpers the decoder and the MoE layer share */
void *tlm_off(const void *p, int64_t elems, moe_dtype dt);   /* p + elems elements */
void *tlm_param(const tlm *m, int id);                       /* host->param_data */
void *tlm_grad(const tlm *m, int id);                        /* host->grad_data */
/* backend memory freed with the model (tlm_destroy) */
moe_status tlm_dev_alloc(tlm *m, uint64_t bytes, const char *what, void **out);
moe_status tlm_act_alloc(tlm *m, int64_t elems, const char *what, void **out);
moe_status tlm_f32_alloc(tlm *m, int64_t elems, const char *what, float **out);
moe_status tlm_shared_alloc(tlm *m, int64_t elems, void **out);
moe_status tlm_shared_alias(tlm *m, void **out, void **same);
/* C(M,Nc) = alpha op(A) op(B) + beta C [+ bias [act]] in the model's dtypes */
moe_status tlm_mm(const tlm *m, int ta, int tb, int64_t M, int64_t Nc, int64_t K, float alpha, const void *a,
                  int64_t lda, const void *b, int64_t ldb, float beta, void *c, int64_t ldc, moe_dtype ab_dt,
                  moe_dtype c_dt, moe_epilogue epi, const void *bias, void *aux);
/* plain activation-dtype product without epilogue */
moe_status tlm_mmp(const tlm *m, int ta, int tb, int64_t M, int64_t Nc, int64_t K, float alpha, const void *a,
                   int64_t lda, const void *b, int64_t ldb, float beta, void *c, int64_t ldc);
/* dropout at a site (tlm_stream) in training; dx = dropout'(dy) into `out`,
 * or dy itself when no dropout applied */
moe_status tlm_dropout_fwd(const tlm *m, void *x, int64_t n, float p, int layer, int site, int sub);
moe_status tlm_dropout_bwd(const tlm *m, const void *dy, void *out, int64_t n, float p, int layer, int site, int sub,
                           const void **dx);
/* fc1/fc2 weights and biases of an FFN of `width` under `prefix` in `unit` */
moe_status tlm_add_ffn(tlm *m, int unit, const char *prefix, int64_t width, int *w1, int *b1, int *w2, int *b2);

/* transformer_lm_decode.c */
moe_status tlm_decode_setup(void *model, int64_t B, int64_t max_len, int64_t max_step, unsigned flags);
moe_status tlm_decode_step(void *model, const int32_t *tokens, const int32_t *n_new, int64_t n, int all_positions,
                           const float **logits);
moe_status tlm_decode_reset(void *model);
/* frees the decoding state (tlm_destroy) */
void tlm_decode_free(tlm *m);

#endif
