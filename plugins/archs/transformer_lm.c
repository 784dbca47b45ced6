/* transformer_lm.c: fairseq's transformer_lm decoder family with MoE layers
 * (FAIRSEQ_SPEC.md §1, §2.4): one source, built once per named architecture
 * (libmoe-arch-<variant>.so, -DMOE_ARCH_VARIANT="<variant>"), whose defaults
 * are those of fairseq's register_model_architecture functions. Options given
 * on the command line win over the variant's defaults.
 *
 * What it is: parameter registration (build), activation buffers (setup), the
 * explicit forward and backward of the pre-LN decoder. The MoE layer (gate
 * projection, dispatch, all-to-all, local experts and combine) is
 * moe_layer.c behind moe_layer.h; incremental decoding (the K/V cache of
 * moelm-generate) is transformer_lm_decode.c; the model struct the files
 * share is transformer_lm.h. Every number is
 * computed by host->ops on memory from host->backend->alloc; nothing here
 * reads tensor memory, so the same code runs on the cpu and cuda backends.
 * What it is not: the routing policy (the gate plugin, host->gate_ops), the
 * loss (the criterion), gradient reduction or the optimizer (the trainer).
 *
 * Conventions a reader would trip over:
 *  - Activations are token-major (N, d) with N = B*T batch-major (n = b*T+t)
 *    throughout, which is fairseq's MoE token order; fairseq's (T, B, d)
 *    transposes are layout only and change no number.
 *  - Registration (one flat unit each, FAIRSEQ_SPEC.md §1.3-1.10): unit
 *    "decoder" = embed_tokens.weight, layer_norm.{weight,bias} (unless
 *    --no-decoder-final-norm), output_projection.weight (untied only); unit
 *    "decoder.layers.i" = self_attn.{k,v,q}_proj.weight, then their biases,
 *    out_proj.{weight,bias}, self_attn_layer_norm.{weight,bias}, then
 *    fc1/fc2.{weight,bias} (dense) or moe_layer.gate.wg.weight (MoE) and,
 *    with --moe-shared-expert-ffn-dim, moe_layer.shared_expert.fc1/fc2.
 *    {weight,bias}, then final_layer_norm.{weight,bias}; after a MoE layer one unit per local
 *    expert, "decoder.layers.i.moe_layer.experts.<global id>", holding
 *    fc1/fc2.{weight,bias}.
 *  - Because k, v, q weights are consecutive, the projection is one (N, 3d)
 *    buffer [k | v | q] per token that attention reads at row stride 3d. k|v
 *    is one GEMM, q another with alpha = head_dim^-0.5 and a bias pre-scaled
 *    by the same factor (exact when head_dim is a power of 4, within one
 *    rounding otherwise).
 *  - No key padding mask in attention: language-model batches are right-
 *    padded, so the causal mask already hides every pad key from every real
 *    query; outputs at pad positions are never scored (their target is pad).
 *  - Dropout streams: every site draws from Philox with seed =
 *    host->step_seed() and stream = tlm_stream(layer, site, micro, sub):
 *        micro << 48 | layer << 32 | site << 24 | sub
 *    where layer is 0 for the embedding and i+1 for decoder layer i, site is a
 *    tlm_site below, and sub is the global expert id for expert sites (0
 *    otherwise). Sites, layers, micro-batches and experts therefore never
 *    share masks, and a recomputed layer (--checkpoint-activations) draws the
 *    same ones, so gradients are bit-identical with and without it.
 *  - Activation (--activation-fn, default the variant's): fairseq's "gelu"
 *    runs Megatron's fused bias-GELU, the tanh approximation (FAIRSEQ_SPEC.md
 *    §1.8); "gelu_accurate" is the same tanh formula; --gelu-erf selects the
 *    exact erf GELU instead (and is ignored with relu). "relu" is max(0, x)
 *    with gradient 0 at x == 0, as torch.relu. Whatever the activation, the
 *    activation dropout is --activation-dropout, or --relu-dropout when that
 *    is 0 (fairseq's FeedForwardNetwork), and it runs after the activation.
 *  - The gate, the expert-parallel layout and its exchange: moe_layer.c's
 *    opening comment.
 *  - Shared expert (--moe-shared-expert-ffn-dim F, DeepSeek-MoE and
 *    Megatron-Core's shared experts): a dense FFN of width F in every MoE
 *    layer, on the same input as the routed experts, its output added to
 *    theirs with no gate. It is the dense FFN's code, initialisation and
 *    dropout sites (SITE_FFN_ACT, SITE_FFN_OUT, which a MoE layer does not
 *    otherwise use), and its parameters sit in the layer's own unit:
 *    non-expert, sharded with fully_sharded, never expert-parallel.
 *  - Where fairseq's defaults need what moelm lacks: the gpt3 variants
 *    (learned positions) and wiki103 (adaptive input and softmax) build with
 *    sinusoidal positions and a plain embedding, and say so in a warning.
 *  - --use-moe-pad-mask builds the mask on the host from a copy of the tokens
 *    (one small round trip per forward, only with the flag).
 *  - With --checkpoint-activations all layers share one set of activation
 *    buffers; only each layer's input stays, and backward recomputes a layer
 *    before differentiating it (the last layer's activations are still in
 *    place after forward, so it is not recomputed).
 *  - Fully sharded units (--ddp-backend fully_sharded): each layer's unit is
 *    gathered around its forward and again around its backward (recompute
 *    included), as fairseq's FSDP wrapping of every layer; the root unit
 *    (embedding, final norm, output projection) is used at both ends of the
 *    model, so a training forward gathers it once and its backward releases
 *    it, as FSDP keeps the root's parameters between forward and backward.
 *    The next layer's gather is started (host->unit_prefetch) before a
 *    layer's compute is queued, so it overlaps it: forward and backward
 *    prefetch as fairseq's FSDP does. Expert units are never sharded; the host makes gather/release no-ops
 *    for them and for every unit without fully_sharded.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"
#include "plugins/archs/moe_layer.h"
#include "plugins/archs/transformer_lm.h"

/* ------------------------------------------------------------- variants */

/* Defaults of fairseq's named architectures (fairseq/models/transformer_lm.py). */
static const tlm_variant tlm_variants[] = {
    {"transformer_lm", 512, 2048, 6, 8, 0.1, 0.0, 0.0, "relu", 0, 0, 0, 0},
    {"transformer_lm_big", 1024, 4096, 12, 16, 0.1, 0.0, 0.0, "relu", 0, 0, 0, 0},
    {"transformer_lm_baevski_wiki103", 1024, 4096, 16, 8, 0.3, 0.1, 0.1, "relu", 1, 0, 0, 1},
    {"transformer_lm_wiki103", 1024, 4096, 16, 8, 0.3, 0.1, 0.1, "relu", 1, 0, 0, 1},
    {"transformer_lm_baevski_gbw", 512, 4096, 12, 16, 0.1, 0.1, 0.0, "relu", 1, 0, 0, 0},
    {"transformer_lm_gbw", 512, 4096, 12, 16, 0.1, 0.1, 0.0, "relu", 1, 0, 0, 0},
    {"transformer_lm_gpt", 768, 3072, 12, 12, 0.1, 0.1, 0.0, "gelu", 0, 0, 0, 0},
    {"transformer_lm_gpt2_small", 1024, 4096, 24, 16, 0.1, 0.1, 0.0, "gelu", 0, 0, 0, 0},
    {"transformer_lm_gpt2_tiny", 64, 64, 2, 1, 0.1, 0.1, 0.0, "gelu", 0, 0, 0, 0},
    {"transformer_lm_gpt2_medium", 1280, 5120, 36, 20, 0.1, 0.1, 0.0, "gelu", 0, 0, 0, 0},
    {"transformer_lm_gpt2_big", 1600, 6400, 48, 25, 0.1, 0.1, 0.0, "gelu", 0, 0, 0, 0},
    {"transformer_lm_gpt3_small", 768, 0, 12, 12, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
    {"transformer_lm_gpt3_medium", 1024, 0, 24, 16, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
    {"transformer_lm_gpt3_large", 1536, 0, 24, 16, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
    {"transformer_lm_gpt3_xl", 2048, 0, 24, 32, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
    {"transformer_lm_gpt3_2_7", 2560, 0, 32, 32, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
    {"transformer_lm_gpt3_6_7", 4096, 0, 32, 32, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
    {"transformer_lm_gpt3_13", 5120, 0, 40, 40, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
    {"transformer_lm_gpt3_175", 12288, 0, 96, 96, 0.0, 0.0, 0.0, "gelu", 0, 1, 1, 0},
};

static const tlm_variant *tlm_variant_find(const char *name)
{
    for (size_t i = 0; i < sizeof tlm_variants / sizeof tlm_variants[0]; i++)
        if (strcmp(tlm_variants[i].name, name) == 0)
            return &tlm_variants[i];
    return NULL;
}

/* --------------------------------------------------------------- options */

enum {
    OPT_EMBED_DIM = 0,
    OPT_FFN_DIM,
    OPT_LAYERS,
    OPT_HEADS,
    OPT_DROPOUT,
    OPT_ATTN_DROPOUT,
    OPT_ACT_DROPOUT,
    OPT_ACT_FN,
    OPT_VARIANT_COUNT, /* the options above take the variant's defaults */
    OPT_RELU_DROPOUT = OPT_VARIANT_COUNT,
    OPT_GELU_ERF,
    OPT_SHARE,
    OPT_NO_SCALE,
    OPT_LEARNED_POS,
    OPT_NO_FINAL_NORM,
    OPT_CKPT,
    OPT_EXPERTS,
    OPT_MOE_FREQ,
    OPT_DECODER_MOE_FREQ,
    OPT_GATING_FP32,
    OPT_EXPERT_FFN,
    OPT_PAD_MASK,
    OPT_ALT_FFN,
    OPT_SHARED_FFN,
    OPT_COUNT
};

#define TLM_NOLIMIT 0, 0

/* Not const: the variant's defaults are written into the first
 * OPT_VARIANT_COUNT entries when the descriptor is first asked for. */
static moe_option tlm_options[OPT_COUNT] = {
    {"decoder-embed-dim", MOE_OPT_INT, NULL, "decoder embedding dimension", 1, 1 << 20, NULL},
    {"decoder-ffn-embed-dim", MOE_OPT_INT, NULL,
     "decoder embedding dimension for FFN (dense layers, and experts unless --moe-expert-ffn-dim); None: 4 x "
     "--decoder-embed-dim",
     1, 1 << 22, NULL},
    {"decoder-layers", MOE_OPT_INT, NULL, "num decoder layers", 1, 4096, NULL},
    {"decoder-attention-heads", MOE_OPT_INT, NULL, "num decoder attention heads", 1, 4096, NULL},
    {"dropout", MOE_OPT_FLOAT, NULL, "dropout probability (embedding, attention output, FFN and expert output)", 0,
     1, NULL},
    {"attention-dropout", MOE_OPT_FLOAT, NULL, "dropout probability for attention weights", 0, 1, NULL},
    {"activation-dropout", MOE_OPT_FLOAT, NULL, "dropout probability after activation in FFN", 0, 1, NULL},
    {"activation-fn", MOE_OPT_CHOICE, NULL,
     "activation function to use: relu, or gelu and gelu_accurate, which both compute the tanh approximation, "
     "as fairseq's fused Megatron kernel does (--gelu-erf for the exact erf GELU)",
     TLM_NOLIMIT, "relu|gelu|gelu_accurate"},
    {"relu-dropout", MOE_OPT_FLOAT, NULL,
     "dropout probability after activation in FFN, used when --activation-dropout is 0 (fairseq's alias)", 0, 1,
     NULL},
    {"gelu-erf", MOE_OPT_FLAG, NULL,
     "compute GELU exactly with erf instead of the tanh approximation (moelm; no effect with relu)",
     TLM_NOLIMIT, NULL},
    {"share-decoder-input-output-embed", MOE_OPT_FLAG, NULL, "share decoder input and output embeddings",
     TLM_NOLIMIT, NULL},
    {"no-scale-embedding", MOE_OPT_FLAG, NULL, "if True, dont scale embeddings by sqrt(embed dim)", TLM_NOLIMIT,
     NULL},
    {"decoder-learned-pos", MOE_OPT_FLAG, NULL,
     "use learned positional embeddings in the decoder (not supported: moelm uses sinusoidal positions)",
     TLM_NOLIMIT, NULL},
    {"no-decoder-final-norm", MOE_OPT_FLAG, NULL, "don't add an extra layernorm after the last decoder block",
     TLM_NOLIMIT, NULL},
    {"checkpoint-activations", MOE_OPT_FLAG, NULL,
     "checkpoint activations at each layer: keep each layer's input, recompute the layer in backward",
     TLM_NOLIMIT, NULL},
    {"moe-expert-count", MOE_OPT_INT, "0", "number of experts in each MoE layer (global, over all ranks)", 0,
     1 << 20, NULL},
    {"moe-freq", MOE_OPT_INT, "0", "frequency at which to insert MoE layers: layer i is MoE when (i+1) % freq == 0",
     0, 4096, NULL},
    {"decoder-moe-freq", MOE_OPT_INT, "0", "like --moe-freq for the decoder; the larger of the two is used", 0, 4096,
     NULL},
    {"moe-gating-use-fp32", MOE_OPT_FLAG, NULL,
     "use fp32 for the gate's routing math (accepted for compatibility: moelm always routes in fp32)", TLM_NOLIMIT,
     NULL},
    {"moe-expert-ffn-dim", MOE_OPT_INT, NULL,
     "expert FFN hidden dimension; default: --decoder-ffn-embed-dim. Unlike fairseq, which declares this flag but "
     "never uses it, moelm does use it",
     1, 1 << 22, NULL},
    {"use-moe-pad-mask", MOE_OPT_FLAG, NULL,
     "don't route padding tokens to any expert (costs a host round trip of the tokens per forward)", TLM_NOLIMIT,
     NULL},
    {"alternate-decoder-ffn-embed-dim", MOE_OPT_INT, "0",
     "if > 0, layers that would be MoE are dense FFNs of this width instead (dense baseline with matched FLOPs)", 0,
     1 << 22, NULL},
    {"moe-shared-expert-ffn-dim", MOE_OPT_INT, "0",
     "if > 0, every MoE layer also has a shared expert: a dense FFN of this width on every token, its output added "
     "to the routed experts' (DeepSeek-MoE, Megatron-Core)",
     0, 1 << 22, NULL},
};

/* ----------------------------------------------------------------- model */

uint64_t tlm_stream(int layer, int site, int micro, int sub)
{
    return ((uint64_t)(micro & 0xFFFF) << 48) | ((uint64_t)(layer & 0xFFFF) << 32) | ((uint64_t)(site & 0xFF) << 24) |
           (uint64_t)(sub & 0xFFFFFF);
}

/* ------------------------------------------------------------ utilities */

void *tlm_off(const void *p, int64_t elems, moe_dtype dt)
{
    return (char *)(uintptr_t)p + (size_t)elems * moe_dtype_size(dt);
}

void *tlm_param(const tlm *m, int id) { return m->h->param_data(m->h, id); }
void *tlm_grad(const tlm *m, int id) { return m->h->grad_data(m->h, id); }

moe_status tlm_dev_alloc(tlm *m, uint64_t bytes, const char *what, void **out)
{
    *out = NULL;
    if (bytes == 0)
        return MOE_OK;
    if (m->allocs.n == m->allocs.cap) {
        int cap = m->allocs.cap ? 2 * m->allocs.cap : 64;
        void **p = realloc(m->allocs.ptrs, (size_t)cap * sizeof *p);
        if (!p)
            return m->h->error(m->h, MOE_ERR_NOMEM, "%s: out of host memory tracking buffers", MOE_ARCH_VARIANT);
        m->allocs.ptrs = p;
        m->allocs.cap = cap;
    }
    MOE_TRY(m->h->backend->alloc(m->h->ctx, bytes, what, out));
    m->allocs.ptrs[m->allocs.n++] = *out;
    return MOE_OK;
}

moe_status tlm_act_alloc(tlm *m, int64_t elems, const char *what, void **out)
{
    return tlm_dev_alloc(m, (uint64_t)elems * moe_dtype_size(m->dt), what, out);
}

moe_status tlm_f32_alloc(tlm *m, int64_t elems, const char *what, float **out)
{
    return tlm_dev_alloc(m, (uint64_t)elems * 4u, what, (void **)out);
}

/* Scratch of the forward's and the backward's layers that holds nothing
 * from one layer to the next (branch outputs, activations on their way to a
 * product, gradients) lives inside the logits buffer: the logits exist from
 * the output product of the forward to the end of the output layer's
 * backward, when no layer runs. A request made here during setup gets its
 * pointer from tlm_shared_commit; the buffer is the larger of the logits and
 * the requests together. */
static moe_status shared_request(tlm *m, void **out, uint64_t bytes, void **same)
{
    *out = NULL;
    tlm_shared *sh = &m->shared;
    if (sh->n == sh->cap) {
        const int cap = sh->cap ? 2 * sh->cap : 32;
        void ***o = realloc(sh->outs, (size_t)cap * sizeof *o);
        if (o)
            sh->outs = o;
        uint64_t *b = o ? realloc(sh->bytes, (size_t)cap * sizeof *b) : NULL;
        if (b)
            sh->bytes = b;
        void ***q = b ? realloc(sh->same, (size_t)cap * sizeof *q) : NULL;
        if (!q)
            return m->h->error(m->h, MOE_ERR_NOMEM, "%s: out of host memory tracking buffers", MOE_ARCH_VARIANT);
        sh->same = q;
        sh->cap = cap;
    }
    sh->outs[sh->n] = out;
    sh->bytes[sh->n] = bytes;
    sh->same[sh->n++] = same;
    return MOE_OK;
}

moe_status tlm_shared_alloc(tlm *m, int64_t elems, void **out)
{
    return shared_request(m, out, (uint64_t)elems * moe_dtype_size(m->dt), NULL);
}

/* *out = *same once the shared buffers are placed */
moe_status tlm_shared_alias(tlm *m, void **out, void **same) { return shared_request(m, out, 0, same); }

static void shared_free(tlm_shared *sh)
{
    free(sh->outs);
    free(sh->bytes);
    free(sh->same);
    memset(sh, 0, sizeof *sh);
}

/* the logits buffer with the shared scratch at 256-byte aligned offsets */
static moe_status tlm_shared_commit(tlm *m)
{
    tlm_shared *sh = &m->shared;
    uint64_t total = 0;
    for (int i = 0; i < sh->n; i++)
        total += (sh->bytes[i] + 255u) / 256u * 256u;
    const uint64_t logits = (uint64_t)m->Nmax * (uint64_t)m->V * moe_dtype_size(m->dt);
    MOE_TRY(tlm_dev_alloc(m, total > logits ? total : logits, "logits (and the layers' scratch)", &m->logits));
    uint64_t off = 0;
    for (int i = 0; i < sh->n; i++) {
        *sh->outs[i] = sh->bytes[i] > 0 ? (char *)m->logits + off : NULL;
        off += (sh->bytes[i] + 255u) / 256u * 256u;
    }
    for (int i = 0; i < sh->n; i++)
        if (sh->same[i])
            *sh->outs[i] = *sh->same[i];
    shared_free(sh);
    return MOE_OK;
}

/* C(M,Nc) = alpha op(A) op(B) + beta C [+ bias [act]] in the model's dtypes */
moe_status tlm_mm(const tlm *m, int ta, int tb, int64_t M, int64_t Nc, int64_t K, float alpha, const void *a,
                     int64_t lda, const void *b, int64_t ldb, float beta, void *c, int64_t ldc, moe_dtype ab_dt,
                     moe_dtype c_dt, moe_epilogue epi, const void *bias, void *aux)
{
    moe_matmul_desc d;
    memset(&d, 0, sizeof d);
    d.trans_a = ta;
    d.trans_b = tb;
    d.m = M;
    d.n = Nc;
    d.k = K;
    d.alpha = alpha;
    d.beta = beta;
    d.a = a;
    d.lda = lda;
    d.b = b;
    d.ldb = ldb;
    d.c = c;
    d.ldc = ldc;
    d.ab_dtype = ab_dt;
    d.c_dtype = c_dt;
    d.batch = 1;
    d.epilogue = epi;
    d.bias = bias;
    d.aux = aux;
    d.act = m->act_kind;
    return m->h->ops->matmul(m->h->ctx, &d);
}

/* plain activation-dtype product without epilogue */
moe_status tlm_mmp(const tlm *m, int ta, int tb, int64_t M, int64_t Nc, int64_t K, float alpha, const void *a,
                      int64_t lda, const void *b, int64_t ldb, float beta, void *c, int64_t ldc)
{
    return tlm_mm(m, ta, tb, M, Nc, K, alpha, a, lda, b, ldb, beta, c, ldc, m->dt, m->dt, MOE_EPI_NONE, NULL, NULL);
}

moe_status tlm_dropout_fwd(const tlm *m, void *x, int64_t n, float p, int layer, int site, int sub)
{
    if (!m->train || p <= 0.0f)
        return MOE_OK;
    return m->h->ops->dropout_forward(m->h->ctx, x, x, n, m->dt, p, m->seed, tlm_stream(layer, site, m->micro, sub));
}

/* dx = dropout'(dy) into `out`, or dy itself when no dropout applied */
moe_status tlm_dropout_bwd(const tlm *m, const void *dy, void *out, int64_t n, float p, int layer, int site,
                              int sub, const void **dx)
{
    if (p <= 0.0f) {
        *dx = dy;
        return MOE_OK;
    }
    *dx = out;
    return m->h->ops->dropout_backward(m->h->ctx, out, dy, n, m->dt, p, m->seed,
                                       tlm_stream(layer, site, m->micro, sub));
}

/* ----------------------------------------------------------------- build */

static moe_status add_param(tlm *m, int unit, const char *name, int64_t rows, int64_t cols, moe_init_kind init,
                            float a, int64_t zero_row, int *id)
{
    moe_param_def def;
    memset(&def, 0, sizeof def);
    def.name = name;
    def.ndim = cols > 0 ? 2 : 1;
    def.shape[0] = rows;
    def.shape[1] = cols > 0 ? cols : 0;
    def.init = init;
    def.a = a;
    def.zero_row = zero_row;
    return m->h->param_add(m->h, unit, &def, id);
}

moe_status tlm_add_ffn(tlm *m, int unit, const char *prefix, int64_t width, int *w1, int *b1, int *w2, int *b2)
{
    char name[200];
    float a1 = (float)(1.0 / sqrt((double)m->d)), a2 = (float)(1.0 / sqrt((double)width));
    snprintf(name, sizeof name, "%s.fc1.weight", prefix);
    MOE_TRY(add_param(m, unit, name, width, m->d, MOE_INIT_UNIFORM, a1, -1, w1));
    snprintf(name, sizeof name, "%s.fc1.bias", prefix);
    MOE_TRY(add_param(m, unit, name, width, 0, MOE_INIT_UNIFORM, a1, -1, b1));
    snprintf(name, sizeof name, "%s.fc2.weight", prefix);
    MOE_TRY(add_param(m, unit, name, m->d, width, MOE_INIT_UNIFORM, a2, -1, w2));
    snprintf(name, sizeof name, "%s.fc2.bias", prefix);
    MOE_TRY(add_param(m, unit, name, m->d, 0, MOE_INIT_UNIFORM, a2, -1, b2));
    return MOE_OK;
}

static moe_status register_layer(tlm *m, int i)
{
    const moe_host *h = m->h;
    tlm_layer *ly = &m->layers[i];
    char pfx[96], name[200];
    snprintf(pfx, sizeof pfx, "decoder.layers.%d", i);
    MOE_TRY(h->unit_add(h, pfx, -1, &ly->unit));
    const double d = (double)m->d;
    const float qkv_bound = (float)(sqrt(6.0 / (2.0 * d)) / sqrt(2.0)); /* xavier_uniform, gain 1/sqrt(2) */
    const float out_bound = (float)sqrt(6.0 / (2.0 * d));               /* xavier_uniform, gain 1 */
    const float bias_bound = (float)(1.0 / sqrt(d));                    /* nn.Linear default */
    static const char *const proj[3] = {"k_proj", "v_proj", "q_proj"};
    int *wid[3] = {&ly->wk, &ly->wv, &ly->wq}, *bid[3] = {&ly->bk, &ly->bv, &ly->bq};
    for (int j = 0; j < 3; j++) {
        snprintf(name, sizeof name, "%s.self_attn.%s.weight", pfx, proj[j]);
        MOE_TRY(add_param(m, ly->unit, name, m->d, m->d, MOE_INIT_UNIFORM, qkv_bound, -1, wid[j]));
    }
    for (int j = 0; j < 3; j++) {
        snprintf(name, sizeof name, "%s.self_attn.%s.bias", pfx, proj[j]);
        MOE_TRY(add_param(m, ly->unit, name, m->d, 0, MOE_INIT_UNIFORM, bias_bound, -1, bid[j]));
    }
    snprintf(name, sizeof name, "%s.self_attn.out_proj.weight", pfx);
    MOE_TRY(add_param(m, ly->unit, name, m->d, m->d, MOE_INIT_UNIFORM, out_bound, -1, &ly->wo));
    snprintf(name, sizeof name, "%s.self_attn.out_proj.bias", pfx);
    MOE_TRY(add_param(m, ly->unit, name, m->d, 0, MOE_INIT_ZERO, 0.0f, -1, &ly->bo));
    snprintf(name, sizeof name, "%s.self_attn_layer_norm.weight", pfx);
    MOE_TRY(add_param(m, ly->unit, name, m->d, 0, MOE_INIT_ONE, 0.0f, -1, &ly->ln1_w));
    snprintf(name, sizeof name, "%s.self_attn_layer_norm.bias", pfx);
    MOE_TRY(add_param(m, ly->unit, name, m->d, 0, MOE_INIT_ZERO, 0.0f, -1, &ly->ln1_b));
    if (ly->moe) {
        snprintf(name, sizeof name, "%s.moe_layer.gate.wg.weight", pfx);
        MOE_TRY(add_param(m, ly->unit, name, m->E, m->d, MOE_INIT_UNIFORM, bias_bound, -1, &ly->wg));
        if (m->fs > 0) {
            tlm_ffn *x = &ly->shared;
            snprintf(name, sizeof name, "%s.moe_layer.shared_expert", pfx);
            x->width = m->fs;
            MOE_TRY(tlm_add_ffn(m, ly->unit, name, m->fs, &x->fc1_w, &x->fc1_b, &x->fc2_w, &x->fc2_b));
        }
    } else {
        MOE_TRY(tlm_add_ffn(m, ly->unit, pfx, ly->ffn, &ly->fc1_w, &ly->fc1_b, &ly->fc2_w, &ly->fc2_b));
    }
    snprintf(name, sizeof name, "%s.final_layer_norm.weight", pfx);
    MOE_TRY(add_param(m, ly->unit, name, m->d, 0, MOE_INIT_ONE, 0.0f, -1, &ly->ln2_w));
    snprintf(name, sizeof name, "%s.final_layer_norm.bias", pfx);
    MOE_TRY(add_param(m, ly->unit, name, m->d, 0, MOE_INIT_ZERO, 0.0f, -1, &ly->ln2_b));

    if (ly->moe)
        MOE_TRY(tlm_moe_register_experts(m, i, pfx));
    return MOE_OK;
}

static void tlm_destroy(void *model);

static moe_status read_options(tlm *m)
{
    const moe_host *h = m->h;
    const tlm_variant *v = m->variant;
    m->d = h->opt_set(h, "decoder-embed-dim") ? h->opt_int(h, "decoder-embed-dim") : v->d;
    m->L = h->opt_set(h, "decoder-layers") ? h->opt_int(h, "decoder-layers") : v->layers;
    m->H = h->opt_set(h, "decoder-attention-heads") ? h->opt_int(h, "decoder-attention-heads") : v->heads;
    if (h->opt_set(h, "decoder-ffn-embed-dim"))
        m->f = h->opt_int(h, "decoder-ffn-embed-dim");
    else
        m->f = v->f > 0 ? v->f : 4 * m->d;
    double p_drop = h->opt_set(h, "dropout") ? h->opt_float(h, "dropout") : v->dropout;
    double p_attn = h->opt_set(h, "attention-dropout") ? h->opt_float(h, "attention-dropout") : v->attention_dropout;
    double p_act = h->opt_set(h, "activation-dropout") ? h->opt_float(h, "activation-dropout") : v->activation_dropout;
    if (p_act == 0.0 && h->opt_set(h, "relu-dropout"))
        p_act = h->opt_float(h, "relu-dropout"); /* fairseq's FeedForwardNetwork falls back to relu_dropout */
    m->p_drop = (float)p_drop;
    m->p_attn = (float)p_attn;
    m->p_act = (float)p_act;
    const char *act = h->opt_set(h, "activation-fn") ? h->opt_str(h, "activation-fn") : v->activation;
    const int gelu_erf = h->opt_flag(h, "gelu-erf");
    if (act != NULL && strcmp(act, "relu") == 0)
        m->act_kind = MOE_ACT_RELU;
    else if (act != NULL && (strcmp(act, "gelu") == 0 || strcmp(act, "gelu_accurate") == 0))
        m->act_kind = gelu_erf ? MOE_ACT_GELU_ERF : MOE_ACT_GELU_TANH;
    else /* the option parser allows only the choices above */
        return h->error(h, MOE_ERR_INVALID_ARG, "%s: unknown activation '%s'; expected relu, gelu or gelu_accurate",
                        MOE_ARCH_VARIANT, act ? act : "None");
    if (h->opt_flag(h, "decoder-learned-pos"))
        return h->error(h, MOE_ERR_UNSUPPORTED,
                        "%s: --decoder-learned-pos is not supported: moelm implements sinusoidal positions only; "
                        "drop the flag",
                        MOE_ARCH_VARIANT);
    m->tied = v->force_share || h->opt_flag(h, "share-decoder-input-output-embed");
    m->scale_embed = !h->opt_flag(h, "no-scale-embedding");
    m->final_norm = !(v->no_final_norm || h->opt_flag(h, "no-decoder-final-norm"));
    m->ckpt = h->opt_flag(h, "checkpoint-activations");
    m->pad_mask = h->opt_flag(h, "use-moe-pad-mask");
    m->record_a2a = h->opt_set(h, "record-a2a-perf-stats") && h->opt_flag(h, "record-a2a-perf-stats");
    m->E = (int)h->opt_int(h, "moe-expert-count");
    int64_t f1 = h->opt_int(h, "moe-freq"), f2 = h->opt_int(h, "decoder-moe-freq");
    m->moe_freq = (int)(f1 > f2 ? f1 : f2);
    m->fe = h->opt_set(h, "moe-expert-ffn-dim") ? h->opt_int(h, "moe-expert-ffn-dim") : m->f;
    m->fs = h->opt_int(h, "moe-shared-expert-ffn-dim");
    (void)h->opt_flag(h, "moe-gating-use-fp32"); /* accepted: routing is always fp32 here */

    if (m->d < 1 || m->H < 1 || m->d % m->H != 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: expected --decoder-embed-dim divisible by --decoder-attention-heads, found %lld and %lld",
                        MOE_ARCH_VARIANT, (long long)m->d, (long long)m->H);
    if (m->L < 1 || m->f < 1)
        return h->error(h, MOE_ERR_INVALID_ARG, "%s: expected at least one layer and an FFN width >= 1, found %lld, %lld",
                        MOE_ARCH_VARIANT, (long long)m->L, (long long)m->f);
    if (m->moe_freq > 0 && m->E < 1)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: --moe-freq %d asks for MoE layers but --moe-expert-count is %d; give the number of experts",
                        MOE_ARCH_VARIANT, m->moe_freq, m->E);
    if (m->fs > 0 && (m->moe_freq < 1 || h->opt_int(h, "alternate-decoder-ffn-embed-dim") > 0))
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: --moe-shared-expert-ffn-dim %lld expects MoE layers (--moe-freq and --moe-expert-count, "
                        "without --alternate-decoder-ffn-embed-dim), found none",
                        MOE_ARCH_VARIANT, (long long)m->fs);
    return MOE_OK;
}

static moe_status tlm_build(const moe_host *h, int64_t vocab, int padding_idx, void **model)
{
    *model = NULL;
    const tlm_variant *v = tlm_variant_find(MOE_ARCH_VARIANT);
    if (!v)
        return h->error(h, MOE_ERR_INTERNAL, "arch plugin built for unknown variant '%s'; rebuild with a name from "
                                             "fairseq's transformer_lm architectures", MOE_ARCH_VARIANT);
    if (h->grad_dtype != h->act_dtype)
        return h->error(h, MOE_ERR_UNSUPPORTED,
                        "%s: expected gradients in the activation dtype, found dtypes %d and %d; use one precision mode",
                        MOE_ARCH_VARIANT, (int)h->grad_dtype, (int)h->act_dtype);
    if (vocab < 1 || padding_idx < 0 || padding_idx >= vocab)
        return h->error(h, MOE_ERR_INVALID_ARG, "%s: expected a vocabulary containing padding index %d, found size %lld",
                        MOE_ARCH_VARIANT, padding_idx, (long long)vocab);
    tlm *m = calloc(1, sizeof *m);
    if (!m)
        return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for the model", MOE_ARCH_VARIANT);
    m->h = h;
    m->variant = v;
    m->dt = h->act_dtype;
    m->V = vocab;
    m->pad = padding_idx;
    m->ws_layer = -1;
    moe_status st;
    MOE_TRY_GOTO(st, read_options(m), fail);
    m->D = m->d / m->H;
    m->q_scale = (float)(1.0 / sqrt((double)m->D));
    m->emb_scale = m->scale_embed ? (float)sqrt((double)m->d) : 1.0f;
    if (v->learned_pos)
        h->log(h, MOE_LOG_WARNING, TLM_LOG,
               "%s: fairseq defaults this architecture to learned positions; moelm uses sinusoidal positions "
               "(no position parameters)", MOE_ARCH_VARIANT);
    if (v->adaptive)
        h->log(h, MOE_LOG_WARNING, TLM_LOG,
               "%s: fairseq defaults this architecture to adaptive input and softmax; moelm uses a plain "
               "embedding and a full softmax", MOE_ARCH_VARIANT);

    /* layer kinds and the expert layout */
    m->layers = calloc((size_t)m->L, sizeof *m->layers);
    if (!m->layers) {
        st = h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for %lld layers", MOE_ARCH_VARIANT, (long long)m->L);
        goto fail;
    }
    int64_t alt = h->opt_int(h, "alternate-decoder-ffn-embed-dim");
    for (int i = 0; i < m->L; i++) {
        tlm_layer *ly = &m->layers[i];
        int is_moe = m->moe_freq > 0 && m->E > 0 && (i + 1) % m->moe_freq == 0;
        ly->moe_index = -1;
        ly->ffn = m->f;
        if (is_moe && alt > 0) {
            ly->ffn = alt; /* fairseq's dense baseline: the MoE layer becomes an FFN of this width */
        } else if (is_moe) {
            ly->moe = 1;
            ly->moe_index = m->n_moe++;
        }
    }
    MOE_TRY_GOTO(st, tlm_moe_plan(m), fail);

    /* root unit: embedding, final norm, untied output projection */
    MOE_TRY_GOTO(st, h->unit_add(h, "decoder", -1, &m->root_unit), fail);
    MOE_TRY_GOTO(st, add_param(m, m->root_unit, "decoder.embed_tokens.weight", m->V, m->d, MOE_INIT_NORMAL,
                               (float)(1.0 / sqrt((double)m->d)), m->pad, &m->emb), fail);
    m->lnf_w = m->lnf_b = m->out_proj = -1;
    if (m->final_norm) {
        MOE_TRY_GOTO(st, add_param(m, m->root_unit, "decoder.layer_norm.weight", m->d, 0, MOE_INIT_ONE, 0.0f, -1,
                                   &m->lnf_w), fail);
        MOE_TRY_GOTO(st, add_param(m, m->root_unit, "decoder.layer_norm.bias", m->d, 0, MOE_INIT_ZERO, 0.0f, -1,
                                   &m->lnf_b), fail);
    }
    if (!m->tied)
        MOE_TRY_GOTO(st, add_param(m, m->root_unit, "decoder.output_projection.weight", m->V, m->d, MOE_INIT_NORMAL,
                                   (float)(1.0 / sqrt((double)m->d)), -1, &m->out_proj), fail);
    for (int i = 0; i < m->L; i++)
        MOE_TRY_GOTO(st, register_layer(m, i), fail);
    MOE_TRY_GOTO(st, tlm_init_gates(m), fail);
    *model = m;
    return MOE_OK;
fail:
    tlm_destroy(m);
    return st;
}

static void tlm_destroy(void *model)
{
    tlm *m = model;
    if (!m)
        return;
    tlm_decode_free(m);
    for (int i = 0; i < m->allocs.n; i++)
        m->h->backend->free(m->h->ctx, m->allocs.ptrs[i]);
    free(m->allocs.ptrs);
    shared_free(&m->shared);
    tlm_moe_free(m);
    free(m->layers);
    free(m->acts);
    free(m->xs);
    free(m->tok_host);
    free(m->pad_host);
    free(m);
}

/* ------------------------------------------------------------------ info */

/* Model FLOPs per token, forward: per layer 2*(4d^2) for the q, k, v and out
 * projections, 2*2*T*d for the scores and the weighted sum of values over the
 * full T (no causal halving), then 2*2*d*f for a dense FFN or, for a MoE layer,
 * k*2*2*d*fe for the k experts a token visits plus 2*d*E for the gate (and
 * 2*2*d*fs for a shared expert); plus
 * 2*d*V for the output projection. Training is three times the forward. */
static void tlm_info(void *model, int64_t tokens_per_sample, moe_model_info *out)
{
    tlm *m = model;
    const moe_host *h = m->h;
    double k = 2.0; /* experts a token visits: k, or C * E / S with expert choice */
    if (m->n_moe > 0 && m->gate_ops) {
        moe_route_args a;
        memset(&a, 0, sizeof a);
        for (int i = 0; i < m->L; i++)
            if (m->layers[i].moe) {
                if (m->gate_ops->configure(m->layers[i].gate, tokens_per_sample > 0 ? tokens_per_sample : 1, 1,
                                           &a) == MOE_OK)
                    k = a.expert_choice ? (double)a.capacity * (double)m->E / (double)a.S : (double)a.k;
                break;
            }
    } else if (h->opt_set(h, "moe-top1-expert") && h->opt_flag(h, "moe-top1-expert")) {
        k = 1.0;
    }
    const double d = (double)m->d, T = (double)(tokens_per_sample > 0 ? tokens_per_sample : 0);
    double fwd = 0.0;
    for (int i = 0; i < m->L; i++) {
        const tlm_layer *ly = &m->layers[i];
        fwd += 2.0 * 4.0 * d * d + 2.0 * 2.0 * T * d;
        if (ly->moe)
            fwd += k * 2.0 * 2.0 * d * (double)m->fe + 2.0 * d * (double)m->E + 2.0 * 2.0 * d * (double)m->fs;
        else
            fwd += 2.0 * 2.0 * d * (double)ly->ffn;
    }
    fwd += 2.0 * d * (double)m->V;
    memset(out, 0, sizeof *out);
    out->num_layers = m->L;
    out->embed_dim = m->d;
    out->ffn_dim = m->f;
    out->heads = m->H;
    out->num_moe_layers = m->n_moe;
    out->experts = m->n_moe > 0 ? m->E : 0;
    out->local_experts = m->n_moe > 0 ? m->local_experts : 0;
    out->flops_per_token = 3.0 * fwd;
}

/* ----------------------------------------------------------------- setup */

static moe_status alloc_acts(tlm *m, tlm_acts *a, int dense, int moe, int64_t fmax)
{
    const int64_t N = m->Nmax, d = m->d;
    if (m->ln_recompute)
        a->h1 = m->hs;
    else
        MOE_TRY(tlm_act_alloc(m, N * d, "attention layer norm output", &a->h1));
    MOE_TRY(tlm_f32_alloc(m, N, "layer norm mean", &a->mean1));
    MOE_TRY(tlm_f32_alloc(m, N, "layer norm rstd", &a->rstd1));
    MOE_TRY(tlm_act_alloc(m, N * 3 * d, "q, k, v projections", &a->qkv));
    MOE_TRY(tlm_act_alloc(m, N * d, "attention output", &a->att));
    MOE_TRY(tlm_f32_alloc(m, N * m->H, "attention log-sum-exp", &a->lse));
    MOE_TRY(tlm_act_alloc(m, N * d, "residual after attention", &a->xmid));
    if (m->ln_recompute)
        a->h2 = m->hs;
    else
        MOE_TRY(tlm_act_alloc(m, N * d, "FFN layer norm output", &a->h2));
    MOE_TRY(tlm_f32_alloc(m, N, "layer norm mean", &a->mean2));
    MOE_TRY(tlm_f32_alloc(m, N, "layer norm rstd", &a->rstd2));
    if (dense) {
        MOE_TRY(tlm_act_alloc(m, N * fmax, "FFN pre-activation", &a->pre));
        if (!m->act_recompute)
            MOE_TRY(tlm_act_alloc(m, N * fmax, "FFN activation", &a->act));
    }
    if (moe)
        MOE_TRY(tlm_moe_alloc_acts(m, a));
    return MOE_OK;
}

/* a * b, or -1 when it passes 2^53 (element counts stay exact, bytes fit) */
static int64_t elems(int64_t a, int64_t b)
{
    const int64_t max = (int64_t)1 << 53;
    if (a < 0 || b < 0 || (a > 0 && b > max / a))
        return -1;
    return a * b;
}

/* width of a layer's FFN activations: the dense FFN's, the shared expert's, or 0 */
static int64_t ffn_width(const tlm_layer *ly) { return ly->moe ? ly->shared.width : ly->ffn; }

static moe_status tlm_setup(void *model, int64_t B, int64_t T)
{
    tlm *m = model;
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    if (m->ready)
        return h->error(h, MOE_ERR_INTERNAL, "%s: setup called twice", MOE_ARCH_VARIANT);
    if (B < 1 || T < 1)
        return h->error(h, MOE_ERR_INVALID_ARG, "%s: expected a batch of at least 1 x 1 tokens, found %lld x %lld",
                        MOE_ARCH_VARIANT, (long long)B, (long long)T);
    /* --add-bos-token makes a full block tokens_per_sample + 1 long (DATA_SPEC.md §3.11) */
    int64_t max_len = h->opt_set(h, "tokens-per-sample") ? h->opt_int(h, "tokens-per-sample") : 0;
    if (max_len > 0 && h->opt_set(h, "add-bos-token") && h->opt_flag(h, "add-bos-token"))
        max_len++;
    if (max_len > 0 && T > max_len)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: sequences of %lld tokens exceed the model's max positions (--tokens-per-sample %lld)",
                        MOE_ARCH_VARIANT, (long long)T, (long long)h->opt_int(h, "tokens-per-sample"));
    if (elems(B, T) < 0 || elems(elems(B, T), m->V) < 0 || elems(elems(B, T), 4 * m->d) < 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: micro-batches of %lld x %lld tokens with a vocabulary of %lld and --decoder-embed-dim "
                        "%lld: expected activations of at most 2^53 elements, found more; lower --batch-size, "
                        "--max-tokens or --tokens-per-sample",
                        MOE_ARCH_VARIANT, (long long)B, (long long)T, (long long)m->V, (long long)m->d);
    m->Bmax = B;
    m->Tmax = T;
    m->Nmax = B * T;
    const int64_t N = m->Nmax, d = m->d;

    MOE_TRY(tlm_moe_setup(m, N));

    int64_t fmax = 0; /* widest FFN activations: dense layers and shared experts */
    int any_dense = 0;
    for (int i = 0; i < m->L; i++)
        if (ffn_width(&m->layers[i]) > 0) {
            any_dense = 1;
            if (ffn_width(&m->layers[i]) > fmax)
                fmax = ffn_width(&m->layers[i]);
        }
    if (elems(N, fmax) < 0 || elems(N, m->E) < 0 || elems(elems(m->E, m->C), d) < 0 ||
        elems(elems(m->a2a_world > 0 ? m->a2a_world : 1, m->C), m->fe) < 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: micro-batches of %lld tokens: expected FFN and expert buffers of at most 2^53 elements "
                        "(tokens x --decoder-ffn-embed-dim, experts x capacity x --decoder-embed-dim), found more; "
                        "lower --batch-size, --max-tokens or the FFN size",
                        MOE_ARCH_VARIANT, (long long)N);

    /* Without activation dropout the FFN activation is act(pre) exactly as
     * the backward can recompute it: one elementwise pass per FFN in
     * backward instead of an (N, f) buffer per layer (with checkpointing the
     * layers share one set anyway). */
    m->act_recompute = m->p_act <= 0.0f && !m->ckpt;
    /* Likewise the layer norm outputs: the backward recomputes each from the
     * kept input (the same kernel on the same input: the same values, mean
     * and rstd included) just before the products that read it. */
    m->ln_recompute = !m->ckpt;
    if (m->ln_recompute)
        MOE_TRY(tlm_act_alloc(m, N * d, "layer norm output", &m->hs));
    m->xs = calloc((size_t)m->L + 1, sizeof *m->xs);
    m->acts = calloc(m->ckpt ? 1u : (size_t)m->L, sizeof *m->acts);
    if (!m->xs || !m->acts)
        return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory", MOE_ARCH_VARIANT);
    for (int i = 0; i <= m->L; i++)
        MOE_TRY(tlm_act_alloc(m, N * d, "layer inputs", &m->xs[i]));
    if (m->ckpt) {
        MOE_TRY(alloc_acts(m, &m->acts[0], any_dense, m->n_moe > 0, fmax));
    } else {
        for (int i = 0; i < m->L; i++)
            MOE_TRY(alloc_acts(m, &m->acts[i], ffn_width(&m->layers[i]) > 0, m->layers[i].moe,
                               ffn_width(&m->layers[i])));
    }
    if (m->final_norm) {
        MOE_TRY(tlm_act_alloc(m, N * d, "final layer norm output", &m->xf));
        MOE_TRY(tlm_f32_alloc(m, N, "layer norm mean", &m->meanf));
        MOE_TRY(tlm_f32_alloc(m, N, "layer norm rstd", &m->rstdf));
    }
    int nm = m->n_moe > 0 ? m->n_moe : 1;
    MOE_TRY(tlm_f32_alloc(m, nm, "MoE auxiliary losses", &m->l_aux));
    MOE_TRY(tlm_f32_alloc(m, (int64_t)nm * MOE_NUM_METRICS, "MoE metrics", &m->metrics));
    MOE_TRY(tlm_f32_alloc(m, (int64_t)nm * MOE_NUM_GATE_METRICS, "MoE gate metrics", &m->gate_metrics));
    MOE_TRY(tlm_act_alloc(m, N, "ones", &m->ones));
    MOE_TRY(ops->fill(h->ctx, m->ones, m->dt, N, 1.0f));
    MOE_TRY(tlm_act_alloc(m, d, "scaled q bias", &m->bq_scaled));
    MOE_TRY(ops->fill(h->ctx, m->bq_scaled, m->dt, d, 0.0f)); /* axpby reads it with b = 0 */
    /* the output layer's backward writes dh and dres: they stay apart */
    MOE_TRY(tlm_act_alloc(m, N * d, "residual gradient", &m->dres));
    MOE_TRY(tlm_act_alloc(m, N * d, "layer norm output gradient", &m->dh));
    MOE_TRY(tlm_shared_alloc(m, N * d, &m->tmp));
    MOE_TRY(tlm_shared_alloc(m, N * d, &m->dtmp));
    MOE_TRY(tlm_shared_alloc(m, N * d, &m->datt));
    MOE_TRY(tlm_shared_alloc(m, N * 3 * d, &m->dqkv));
    if (any_dense)
        MOE_TRY(tlm_shared_alloc(m, N * fmax, &m->dpre));
    if (m->fs > 0)
        MOE_TRY(tlm_act_alloc(m, N * d, "shared expert output", &m->shy));

    if (m->n_moe > 0)
        MOE_TRY(tlm_moe_alloc_scratch(m));
    MOE_TRY(tlm_shared_commit(m));
    m->ready = 1;
    return MOE_OK;
}

/* --------------------------------------------------------------- forward */

static tlm_acts *acts_of(tlm *m, int i) { return &m->acts[m->ckpt ? 0 : i]; }

/* out (N,d) = dropout(fc2(dropout(act(fc1(h2))))) of layer i's dense FFN or
 * shared expert f, keeping a->pre (and a->act, unless m->act_recompute: the
 * activation then lives in the backward's scratch m->dpre until fc2 read it) */
static moe_status ffn_forward(tlm *m, int i, const tlm_ffn *x, tlm_acts *a, void *out)
{
    const int64_t N = m->N, d = m->d, f = x->width;
    void *act = a->act ? a->act : m->dpre;
    MOE_TRY(tlm_mm(m, 0, 1, N, f, d, 1.0f, a->h2, d, tlm_param(m, x->fc1_w), d, 0.0f, act, f, m->dt, m->dt,
                   MOE_EPI_BIAS_ACT, tlm_param(m, x->fc1_b), a->pre));
    MOE_TRY(tlm_dropout_fwd(m, act, N * f, m->p_act, i + 1, SITE_FFN_ACT, 0));
    MOE_TRY(tlm_mm(m, 0, 1, N, d, f, 1.0f, act, f, tlm_param(m, x->fc2_w), f, 0.0f, out, d, m->dt, m->dt,
                   MOE_EPI_BIAS, tlm_param(m, x->fc2_b), NULL));
    return tlm_dropout_fwd(m, out, N * d, m->p_drop, i + 1, SITE_FFN_OUT, 0);
}

/* ffn_forward's backward given dy = m->dres: accumulates f's gradients;
 * m->dh = beta * m->dh + d loss / d h2 */
static moe_status ffn_backward(tlm *m, int i, const tlm_ffn *x, tlm_acts *a, float beta)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    const int64_t N = m->N, d = m->d, f = x->width;
    const void *dy, *dact;
    MOE_TRY(tlm_dropout_bwd(m, m->dres, m->dtmp, N * d, m->p_drop, i + 1, SITE_FFN_OUT, 0, &dy));
    const void *act = a->act;
    if (!act) { /* m->act_recompute: from the pre-activations, into the scratch fc2's input gradient overwrites */
        MOE_TRY(ops->act_forward(h->ctx, m->dpre, a->pre, N * f, m->dt, m->act_kind));
        act = m->dpre;
    }
    MOE_TRY(tlm_mmp(m, 1, 0, d, f, N, 1.0f, dy, d, act, f, 1.0f, tlm_grad(m, x->fc2_w), f));
    MOE_TRY(ops->bias_backward(h->ctx, tlm_grad(m, x->fc2_b), dy, N, d, m->dt));
    MOE_TRY(tlm_mmp(m, 0, 0, N, f, d, 1.0f, dy, d, tlm_param(m, x->fc2_w), f, 0.0f, m->dpre, f));
    MOE_TRY(tlm_dropout_bwd(m, m->dpre, m->dpre, N * f, m->p_act, i + 1, SITE_FFN_ACT, 0, &dact));
    MOE_TRY(ops->act_backward(h->ctx, m->dpre, a->pre, dact, N * f, m->dt, m->act_kind));
    MOE_TRY(tlm_mmp(m, 1, 0, f, d, N, 1.0f, m->dpre, f, a->h2, d, 1.0f, tlm_grad(m, x->fc1_w), d));
    MOE_TRY(ops->bias_backward(h->ctx, tlm_grad(m, x->fc1_b), m->dpre, N, f, m->dt));
    return tlm_mmp(m, 0, 0, N, d, f, 1.0f, m->dpre, f, tlm_param(m, x->fc1_w), d, beta, m->dh, d);
}

/* xs[i] -> xs[i+1] for decoder layer i (pre-LN block, FAIRSEQ_SPEC.md §1.2 step 6) */
static moe_status layer_forward(tlm *m, int i)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    const tlm_layer *ly = &m->layers[i];
    tlm_acts *a = acts_of(m, i);
    const int64_t N = m->N, d = m->d;
    void *xin = m->xs[i], *xout = m->xs[i + 1];

    MOE_TRY(ops->layernorm_forward(h->ctx, a->h1, a->mean1, a->rstd1, xin, tlm_param(m, ly->ln1_w), tlm_param(m, ly->ln1_b), N, d,
                                   TLM_LN_EPS, m->dt));
    /* [k | v] = h1 [Wk; Wv]^T + [bk; bv];  q = s (h1 Wq^T + bq) */
    MOE_TRY(tlm_mm(m, 0, 1, N, 2 * d, d, 1.0f, a->h1, d, tlm_param(m, ly->wk), d, 0.0f, a->qkv, 3 * d, m->dt, m->dt,
               MOE_EPI_BIAS, tlm_param(m, ly->bk), NULL));
    MOE_TRY(ops->axpby(h->ctx, m->bq_scaled, tlm_param(m, ly->bq), m->dt, d, m->q_scale, 0.0f));
    MOE_TRY(tlm_mm(m, 0, 1, N, d, d, m->q_scale, a->h1, d, tlm_param(m, ly->wq), d, 0.0f, tlm_off(a->qkv, 2 * d, m->dt), 3 * d,
               m->dt, m->dt, MOE_EPI_BIAS, m->bq_scaled, NULL));
    MOE_TRY(ops->attention_forward(h->ctx, a->att, a->lse, tlm_off(a->qkv, 2 * d, m->dt), a->qkv, tlm_off(a->qkv, d, m->dt),
                                   3 * d, m->B, m->T, m->H, m->D, m->train ? m->p_attn : 0.0f, m->seed,
                                   tlm_stream(i + 1, SITE_ATTN_PROBS, m->micro, 0), m->dt));
    MOE_TRY(tlm_mm(m, 0, 1, N, d, d, 1.0f, a->att, d, tlm_param(m, ly->wo), d, 0.0f, m->tmp, d, m->dt, m->dt, MOE_EPI_BIAS,
               tlm_param(m, ly->bo), NULL));
    MOE_TRY(tlm_dropout_fwd(m, m->tmp, N * d, m->p_drop, i + 1, SITE_ATTN_OUT, 0));
    MOE_TRY(ops->add(h->ctx, a->xmid, xin, m->tmp, m->dt, N * d));

    MOE_TRY(ops->layernorm_forward(h->ctx, a->h2, a->mean2, a->rstd2, a->xmid, tlm_param(m, ly->ln2_w), tlm_param(m, ly->ln2_b), N,
                                   d, TLM_LN_EPS, m->dt));
    if (ly->moe) {
        MOE_TRY(tlm_moe_forward(m, i, a, m->tmp)); /* dropout sits inside the experts */
        if (ly->shared.width > 0) {
            MOE_TRY(ffn_forward(m, i, &ly->shared, a, m->shy));
            MOE_TRY(ops->add(h->ctx, m->tmp, m->tmp, m->shy, m->dt, N * d));
        }
    } else {
        const tlm_ffn dense = {ly->fc1_w, ly->fc1_b, ly->fc2_w, ly->fc2_b, ly->ffn};
        MOE_TRY(ffn_forward(m, i, &dense, a, m->tmp));
    }
    MOE_TRY(ops->add(h->ctx, xout, a->xmid, m->tmp, m->dt, N * d));
    m->ws_layer = i;
    return MOE_OK;
}

static moe_status build_pad_mask(tlm *m)
{
    const moe_host *h = m->h;
    const int64_t N = m->N;
    MOE_TRY(h->backend->copy_to_host(h->ctx, m->tok_host, m->tokens, (uint64_t)N * sizeof(int32_t)));
    for (int64_t n = 0; n < N; n++)
        m->pad_host[n] = m->tok_host[n] == m->pad ? 1u : 0u;
    return h->backend->copy_from_host(h->ctx, m->pad_dev, m->pad_host, (uint64_t)N);
}

static moe_status tlm_forward(void *model, const int32_t *tokens, int64_t B, int64_t T, int train, int micro,
                              moe_fwd_out *out)
{
    tlm *m = model;
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    if (!m->ready)
        return h->error(h, MOE_ERR_INTERNAL, "%s: forward called before setup", MOE_ARCH_VARIANT);
    if (B < 1 || T < 1 || B * T > m->Nmax || T > m->Tmax)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: expected a batch of at most %lld tokens and %lld per row (as set up), found %lld x %lld; "
                        "call setup with the largest batch",
                        MOE_ARCH_VARIANT, (long long)m->Nmax, (long long)m->Tmax, (long long)B, (long long)T);
    m->tokens = tokens;
    m->B = B;
    m->T = T;
    m->N = B * T;
    m->train = train;
    m->micro = micro;
    m->seed = h->step_seed(h);
    const int64_t N = m->N, d = m->d;
    int nm = m->n_moe > 0 ? m->n_moe : 1;
    MOE_TRY(ops->fill(h->ctx, m->l_aux, MOE_F32, nm, 0.0f));
    MOE_TRY(ops->fill(h->ctx, m->metrics, MOE_F32, (int64_t)nm * MOE_NUM_METRICS, 0.0f));
    MOE_TRY(ops->fill(h->ctx, m->gate_metrics, MOE_F32, (int64_t)nm * MOE_NUM_GATE_METRICS, 0.0f));
    if (m->pad_mask && m->n_moe > 0)
        MOE_TRY(build_pad_mask(m));
    if (!m->root_gathered) {
        MOE_TRY(h->unit_gather(h, m->root_unit));
        m->root_gathered = 1;
    }
    MOE_TRY(h->unit_prefetch(h, m->layers[0].unit)); /* overlaps the embedding */

    MOE_TRY(ops->embedding_forward(h->ctx, m->xs[0], tokens, tlm_param(m, m->emb), B, T, d, m->emb_scale, m->pad, 1, m->dt));
    MOE_TRY(tlm_dropout_fwd(m, m->xs[0], N * d, m->p_drop, 0, SITE_EMBED, 0));
    for (int i = 0; i < m->L; i++) {
        MOE_TRY(h->unit_gather(h, m->layers[i].unit));
        if (i + 1 < m->L)
            MOE_TRY(h->unit_prefetch(h, m->layers[i + 1].unit)); /* overlaps layer i */
        MOE_TRY(layer_forward(m, i));
        MOE_TRY(h->unit_release(h, m->layers[i].unit));
    }
    const void *xf = m->xs[m->L];
    if (m->final_norm) {
        MOE_TRY(ops->layernorm_forward(h->ctx, m->xf, m->meanf, m->rstdf, m->xs[m->L], tlm_param(m, m->lnf_w),
                                       tlm_param(m, m->lnf_b), N, d, TLM_LN_EPS, m->dt));
        xf = m->xf;
    }
    const void *wout = tlm_param(m, m->tied ? m->emb : m->out_proj);
    MOE_TRY(tlm_mmp(m, 0, 1, N, m->V, d, 1.0f, xf, d, wout, d, 0.0f, m->logits, m->V));
    if (!train) {
        m->root_gathered = 0;
        MOE_TRY(h->unit_release(h, m->root_unit));
    }
    out->logits = m->logits;
    out->N = N;
    out->V = m->V;
    out->n_moe_layers = m->n_moe;
    out->l_aux = m->l_aux;
    out->metrics = m->metrics;
    out->gate_metrics = m->gate_metrics;
    return MOE_OK;
}

/* -------------------------------------------------------------- backward */

/* m->dres: d loss / d xs[i+1] on entry, d loss / d xs[i] on return */
static moe_status layer_backward(tlm *m, int i, float dl_aux)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    const tlm_layer *ly = &m->layers[i];
    tlm_acts *a = acts_of(m, i);
    const int64_t N = m->N, d = m->d;
    const void *dy;

    /* FFN / MoE branch: d xmid = dres + LN2'(branch'(dres)) */
    if (m->ln_recompute)
        MOE_TRY(ops->layernorm_forward(h->ctx, a->h2, a->mean2, a->rstd2, a->xmid, tlm_param(m, ly->ln2_w),
                                       tlm_param(m, ly->ln2_b), N, d, TLM_LN_EPS, m->dt));
    if (ly->moe) {
        MOE_TRY(tlm_moe_backward(m, i, a, dl_aux));
        if (ly->shared.width > 0)
            MOE_TRY(ffn_backward(m, i, &ly->shared, a, 1.0f));
    } else {
        const tlm_ffn dense = {ly->fc1_w, ly->fc1_b, ly->fc2_w, ly->fc2_b, ly->ffn};
        MOE_TRY(ffn_backward(m, i, &dense, a, 0.0f));
    }
    MOE_TRY(ops->layernorm_backward(h->ctx, m->dres, tlm_grad(m, ly->ln2_w), tlm_grad(m, ly->ln2_b), m->dh, a->xmid,
                                    tlm_param(m, ly->ln2_w), a->mean2, a->rstd2, N, d, m->dt));

    /* attention branch: d xin = dres + LN1'(attn'(dres)) */
    MOE_TRY(tlm_dropout_bwd(m, m->dres, m->dtmp, N * d, m->p_drop, i + 1, SITE_ATTN_OUT, 0, &dy));
    MOE_TRY(tlm_mmp(m, 1, 0, d, d, N, 1.0f, dy, d, a->att, d, 1.0f, tlm_grad(m, ly->wo), d));
    MOE_TRY(ops->bias_backward(h->ctx, tlm_grad(m, ly->bo), dy, N, d, m->dt));
    MOE_TRY(tlm_mmp(m, 0, 0, N, d, d, 1.0f, dy, d, tlm_param(m, ly->wo), d, 0.0f, m->datt, d));
    void *dq = tlm_off(m->dqkv, 2 * d, m->dt), *dk = m->dqkv, *dv = tlm_off(m->dqkv, d, m->dt);
    MOE_TRY(ops->attention_backward(h->ctx, dq, dk, dv, 3 * d, m->datt, a->att, a->lse, tlm_off(a->qkv, 2 * d, m->dt),
                                    a->qkv, tlm_off(a->qkv, d, m->dt), 3 * d, m->B, m->T, m->H, m->D, m->p_attn, m->seed,
                                    tlm_stream(i + 1, SITE_ATTN_PROBS, m->micro, 0), m->dt));
    /* dq is the gradient of the scaled q: the unscaled projection gets q_scale * dq */
    const float s = m->q_scale;
    if (m->ln_recompute)
        MOE_TRY(ops->layernorm_forward(h->ctx, a->h1, a->mean1, a->rstd1, m->xs[i], tlm_param(m, ly->ln1_w),
                                       tlm_param(m, ly->ln1_b), N, d, TLM_LN_EPS, m->dt));
    MOE_TRY(tlm_mmp(m, 1, 0, 2 * d, d, N, 1.0f, m->dqkv, 3 * d, a->h1, d, 1.0f, tlm_grad(m, ly->wk), d));
    MOE_TRY(tlm_mmp(m, 1, 0, d, d, N, s, dq, 3 * d, a->h1, d, 1.0f, tlm_grad(m, ly->wq), d));
    MOE_TRY(tlm_mmp(m, 0, 0, 1, 2 * d, N, 1.0f, m->ones, N, m->dqkv, 3 * d, 1.0f, tlm_grad(m, ly->bk), 2 * d));
    MOE_TRY(tlm_mmp(m, 0, 0, 1, d, N, s, m->ones, N, dq, 3 * d, 1.0f, tlm_grad(m, ly->bq), d));
    MOE_TRY(tlm_mmp(m, 0, 0, N, d, 2 * d, 1.0f, m->dqkv, 3 * d, tlm_param(m, ly->wk), d, 0.0f, m->dh, d));
    MOE_TRY(tlm_mmp(m, 0, 0, N, d, d, s, dq, 3 * d, tlm_param(m, ly->wq), d, 1.0f, m->dh, d));
    MOE_TRY(ops->layernorm_backward(h->ctx, m->dres, tlm_grad(m, ly->ln1_w), tlm_grad(m, ly->ln1_b), m->dh, m->xs[i],
                                    tlm_param(m, ly->ln1_w), a->mean1, a->rstd1, N, d, m->dt));
    return MOE_OK;
}

/* layer i's units (its own and its local experts') have their whole
 * gradient once its backward ran: nothing later in the backward adds to them */
static moe_status layer_grads_ready(tlm *m, int i)
{
    const moe_host *h = m->h;
    const tlm_layer *ly = &m->layers[i];
    MOE_TRY(h->unit_grad_ready(h, ly->unit));
    if (ly->moe)
        for (int l = 0; l < m->local_experts; l++)
            MOE_TRY(h->unit_grad_ready(h, ly->experts[l].unit));
    return MOE_OK;
}

static moe_status tlm_backward(void *model, float dl_aux)
{
    tlm *m = model;
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    if (!m->ready || !m->tokens)
        return h->error(h, MOE_ERR_INTERNAL, "%s: backward called before a forward", MOE_ARCH_VARIANT);
    if (!m->train)
        return h->error(h, MOE_ERR_INTERNAL,
                        "%s: backward after an evaluation forward (train = 0); run forward with train = 1",
                        MOE_ARCH_VARIANT);
    const int64_t N = m->N, d = m->d, V = m->V;
    const int wid = m->tied ? m->emb : m->out_proj;
    const void *xf = m->final_norm ? m->xf : m->xs[m->L];

    /* logits = xf W^T: dW += dlogits^T xf, dxf = dlogits W */
    MOE_TRY(tlm_mmp(m, 1, 0, V, d, N, 1.0f, m->logits, V, xf, d, 1.0f, tlm_grad(m, wid), d));
    if (m->final_norm) {
        MOE_TRY(tlm_mmp(m, 0, 0, N, d, V, 1.0f, m->logits, V, tlm_param(m, wid), d, 0.0f, m->dh, d));
        MOE_TRY(ops->fill(h->ctx, m->dres, m->dt, N * d, 0.0f));
        MOE_TRY(ops->layernorm_backward(h->ctx, m->dres, tlm_grad(m, m->lnf_w), tlm_grad(m, m->lnf_b), m->dh, m->xs[m->L],
                                        tlm_param(m, m->lnf_w), m->meanf, m->rstdf, N, d, m->dt));
    } else {
        MOE_TRY(tlm_mmp(m, 0, 0, N, d, V, 1.0f, m->logits, V, tlm_param(m, wid), d, 0.0f, m->dres, d));
    }
    for (int i = m->L - 1; i >= 0; i--) {
        MOE_TRY(h->unit_gather(h, m->layers[i].unit));
        if (i > 0)
            MOE_TRY(h->unit_prefetch(h, m->layers[i - 1].unit)); /* overlaps layer i's backward */
        if (m->ckpt && m->ws_layer != i)
            MOE_TRY(layer_forward(m, i)); /* same seed, micro and inputs: the same activations and masks */
        MOE_TRY(layer_backward(m, i, dl_aux));
        MOE_TRY(h->unit_release(h, m->layers[i].unit));
        MOE_TRY(layer_grads_ready(m, i));
    }
    const void *demb;
    MOE_TRY(tlm_dropout_bwd(m, m->dres, m->dtmp, N * d, m->p_drop, 0, SITE_EMBED, 0, &demb));
    MOE_TRY(ops->embedding_backward(h->ctx, tlm_grad(m, m->emb), demb, m->tokens, m->B, m->T, d, V, m->emb_scale, m->pad,
                                    m->dt));
    m->ws_layer = -1; /* recomputation overwrote the shared activations */
    m->root_gathered = 0;
    MOE_TRY(h->unit_release(h, m->root_unit));
    return h->unit_grad_ready(h, m->root_unit);
}

/* ------------------------------------------------------------ descriptor */

/* the gate of MoE layer j, the gates made on first use (NULL when they
 * cannot be: no gate resolved yet, or its init failed) */
static void *tlm_moe_gate(void *model, int j)
{
    tlm *m = model;
    if (tlm_init_gates(m) != MOE_OK)
        return NULL;
    for (int i = 0; m->layers && i < m->L; i++)
        if (m->layers[i].moe && m->layers[i].moe_index == j)
            return m->layers[i].gate;
    return NULL;
}

static const moe_arch_ops tlm_ops = {tlm_build,        tlm_destroy,     tlm_info,         tlm_setup,
                                     tlm_forward,      tlm_backward,    tlm_decode_setup, tlm_decode_step,
                                     tlm_decode_reset, tlm_moe_gate};

static char tlm_defaults[OPT_VARIANT_COUNT][32];
static moe_plugin_desc tlm_desc;

/* The descriptor carries the variant's defaults in its option table, so --help
 * shows them. It is filled on the first call, which the loader makes once,
 * right after dlopen and before anything else in the plugin runs. */
MOE_EXPORT const moe_plugin_desc *moe_plugin_descriptor(void);
const moe_plugin_desc *moe_plugin_descriptor(void)
{
    static int ready;
    if (!ready) {
        const tlm_variant *v = tlm_variant_find(MOE_ARCH_VARIANT);
        if (v) {
            snprintf(tlm_defaults[OPT_EMBED_DIM], 32, "%lld", (long long)v->d);
            if (v->f > 0)
                snprintf(tlm_defaults[OPT_FFN_DIM], 32, "%lld", (long long)v->f);
            snprintf(tlm_defaults[OPT_LAYERS], 32, "%lld", (long long)v->layers);
            snprintf(tlm_defaults[OPT_HEADS], 32, "%lld", (long long)v->heads);
            snprintf(tlm_defaults[OPT_DROPOUT], 32, "%g", v->dropout);
            snprintf(tlm_defaults[OPT_ATTN_DROPOUT], 32, "%g", v->attention_dropout);
            snprintf(tlm_defaults[OPT_ACT_DROPOUT], 32, "%g", v->activation_dropout);
            snprintf(tlm_defaults[OPT_ACT_FN], 32, "%s", v->activation);
            for (int i = 0; i < OPT_VARIANT_COUNT; i++)
                tlm_options[i].default_value = tlm_defaults[i][0] ? tlm_defaults[i] : NULL; /* gpt3 f: 4*d */
        }
        moe_plugin_desc d = {MOE_ABI_MAJOR,
                             MOE_ABI_MINOR,
                             (uint32_t)sizeof(moe_plugin_desc),
                             (uint32_t)sizeof(moe_host),
                             (uint32_t)sizeof(moe_arch_ops),
                             MOE_KIND_ARCH,
                             MOE_ARCH_VARIANT,
                             "1.0",
                             "fairseq transformer_lm decoder (pre-LN, sinusoidal positions) with MoE layers",
                             tlm_options,
                             OPT_COUNT,
                             NULL,
                             NULL,
                             &tlm_ops};
        tlm_desc = d;
        ready = 1;
    }
    return &tlm_desc;
}
