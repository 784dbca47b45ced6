/* transformer_lm_decode.c: incremental decoding for the transformer_lm arch
 * plugins (moe_arch_ops decode_setup / decode_step / decode_reset): a K/V
 * cache per layer and the eval-mode step that feeds a few new tokens per
 * row against it, as fairseq's incremental_state does for
 * fairseq-interactive.
 *
 * What it is: the same decoder as transformer_lm.c's forward with train = 0
 * (no dropout, gates configured for evaluation), computed only for the new
 * tokens. What it is not: training (no activations are kept), sampling (the
 * caller turns logits into tokens), or several ranks (one process holds
 * every unit and every expert).
 *
 * Two ways through a step, one result:
 *  - rows mode, when the step holds at most DEC_ROWS tokens (a decoding step
 *    of up to 8 rows): the row-wise ops of ops.h, each a weight-streaming
 *    GEMV with what surrounds it fused in (LayerNorm before, bias, q scale,
 *    activation, residual add after). A MoE layer routes with
 *    gate_topk_forward and runs only the chosen experts
 *    (expert_ffn_forward), reading top-k experts' weights instead of all E.
 *    The general top-k router (--moe-gate topk) routes with route_forward
 *    instead (gate_topk_forward is fairseq's softmax top-1/top-2), and with
 *    more than two choices per token its experts run as in matrix mode.
 *    Per layer: k|v|q, attention, out, then fc1, fc2 (dense) or gate, expert
 *    fc1, expert fc2 (MoE; a shared expert's fc1, fc2 before them). On a backend that records graphs (cuda) the step
 *    is recorded on its second run of a shape and replayed afterwards: one
 *    launch per token instead of ~140.
 *  - matrix mode, for larger steps (a prompt fed at once): the training ops
 *    (layernorm_forward, matmul on cuBLASLt, route_forward with capacity,
 *    dispatch, expert GEMMs, combine), with attention_decode for the cache.
 *
 * Conventions a reader would trip over:
 *  - A step's tokens are (B, n), row b feeding its first n_new[b]; the rest
 *    are padding, placed at positions nobody reads, kept out of routing (the
 *    pad mask) and of the cache (attention_decode writes only fed keys).
 *  - Token j of row b sits at position padding_idx + 1 + len[b] + j, where
 *    len[b] is the row's cached length, exactly where arch->forward puts
 *    that token of the whole sequence; the routing noise of the sampling
 *    policy is drawn at its index len[b] + j in the sequence (route args'
 *    noise_index), so a row's tokens route as in a forward of that row
 *    alone, whatever else the batch holds.
 *  - Nothing drops when the gate's evaluation capacity covers the step's
 *    tokens (moelm-generate sets --moe-eval-capacity-token-fraction 1 unless
 *    given), and then every token routes as in a full forward. With a
 *    smaller fraction the capacity applies per step, as fairseq's would per
 *    forward call.
 *  - The host keeps each row's cached length; the step's inputs (tokens,
 *    positions, noise indices, lengths, counts, last rows, pad mask) go to
 *    the device in one copy before the (recorded) launches.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"
#include "plugins/archs/transformer_lm.h"

#define DEC_ROWS 8   /* steps with at most this many tokens run in rows mode */

typedef struct tlm_decode {
    int64_t B, Tc, max_step, Nmax;
    unsigned flags;
    tlm_alloc allocs;
    void **kc, **vc;            /* (L) caches (B,H,Tc,D) */
    /* the step's inputs: one device i32 buffer and its host copy, laid out
     * tokens (Nmax) | positions (Nmax) | noise index (Nmax) | cache_len (B)
     * | n_new (B) | last row (B) | pad mask (Nmax bytes) */
    int32_t *in_dev, *in_host;
    int64_t in_words;
    int32_t *len;               /* (B) host: cached positions per row */
    /* activations */
    void *x;                    /* (Nmax,d) the residual stream */
    void *h;                    /* (Nmax,d) LayerNorm output (matrix mode) */
    void *qkv;                  /* (Nmax,3d) [k | v | q] */
    void *att;                  /* (Nmax,d) attention output, then the MoE output (matrix mode) */
    void *ffh;                  /* (Nmax,max dense or shared expert f) */
    void *shy;                  /* (Nmax,d) the shared expert's output, or NULL */
    void *bq;                   /* (d) q bias times q_scale (matrix mode) */
    float *logits;              /* (Nmax,V) fp32 */
    /* MoE, rows mode */
    int width;                  /* W = max(k, 2): choices per token the routing arrays hold */
    int32_t *ex;                /* (Nmax,W) */
    float *ew;                  /* (Nmax,W) */
    void *ehid;                 /* (2*DEC_ROWS, fe) */
    float *eout;                /* (2*DEC_ROWS, d) */
    const void **tab;           /* device: per MoE layer, 4*E pointers (w1 | b1 | w2 | b2) */
    /* MoE, matrix mode and drops in rows mode: route_forward + dispatch */
    int64_t C;                  /* capacity the dispatch buffers hold */
    void *glog;                 /* (Nmax,E) gate logits in the activation dtype */
    float *glog32, *probs;      /* (Nmax,E) */
    int32_t *slot;              /* (Nmax,W) */
    float *l_aux, *metrics;
    void *route_ws;
    void *xe, *eact, *eo;       /* (E*C,d), (E*C,fe), (E*C,d) */
    /* recorded steps (rows mode), by tokens per row and all_positions */
    void *graph[DEC_ROWS + 1][2];
    int runs[DEC_ROWS + 1][2];
} tlm_decode;

/* ------------------------------------------------------------ utilities */

static void *doff(const void *p, int64_t elems, moe_dtype dt)
{
    return (char *)(uintptr_t)p + (size_t)elems * moe_dtype_size(dt);
}

static void *param(const tlm *m, int id) { return m->h->param_data(m->h, id); }

static moe_status dalloc(tlm *m, tlm_decode *dc, uint64_t bytes, const char *what, void **out)
{
    *out = NULL;
    if (bytes == 0)
        return MOE_OK;
    if (dc->allocs.n == dc->allocs.cap) {
        int cap = dc->allocs.cap ? 2 * dc->allocs.cap : 64;
        void **p = realloc(dc->allocs.ptrs, (size_t)cap * sizeof *p);
        if (!p)
            return m->h->error(m->h, MOE_ERR_NOMEM, "%s: out of host memory tracking decoding buffers",
                               MOE_ARCH_VARIANT);
        dc->allocs.ptrs = p;
        dc->allocs.cap = cap;
    }
    MOE_TRY(m->h->backend->alloc(m->h->ctx, bytes, what, out));
    dc->allocs.ptrs[dc->allocs.n++] = *out;
    return MOE_OK;
}

static moe_status aalloc(tlm *m, tlm_decode *dc, int64_t elems, const char *what, void **out)
{
    return dalloc(m, dc, (uint64_t)elems * moe_dtype_size(m->dt), what, out);
}

void tlm_decode_free(tlm *m)
{
    tlm_decode *dc = m->dec;
    if (!dc)
        return;
    const moe_host *h = m->h;
    for (int n = 0; n <= DEC_ROWS; n++)
        for (int a = 0; a < 2; a++)
            if (dc->graph[n][a] && h->ops->graph_destroy)
                h->ops->graph_destroy(h->ctx, dc->graph[n][a]);
    for (int i = 0; i < dc->allocs.n; i++)
        h->backend->free(h->ctx, dc->allocs.ptrs[i]);
    free(dc->allocs.ptrs);
    free(dc->kc);
    free(dc->vc);
    free(dc->in_host);
    free(dc->len);
    free(dc);
    m->dec = NULL;
}

/* C(M,Nc) = alpha A W^T + beta C [+ bias [act]] (matrix mode): every product
 * here is x W^T with W a Linear's (out, in) weight */
static moe_status gemm(const tlm *m, int64_t M, int64_t Nc, int64_t K, float alpha, const void *a, int64_t lda,
                       const void *b, float beta, void *c, int64_t ldc, moe_dtype c_dt, moe_epilogue epi,
                       const void *bias)
{
    return tlm_mm(m, 0, 1, M, Nc, K, alpha, a, lda, b, K, beta, c, ldc, m->dt, c_dt, epi, bias, NULL);
}

/* y = epilogue(LN?(x) W^T) over M rows (rows mode) */
static moe_status rowlin(const tlm *m, int64_t M, const void *x, int64_t ldx, const int32_t *rows, int ln_w, int ln_b,
                         const void *w, int64_t Nc, int64_t K, const void *bias, void *y, int64_t ldy, moe_dtype y_dt,
                         float beta, int act, float q_scale, int64_t q_cols)
{
    moe_rowlinear_desc d;
    memset(&d, 0, sizeof d);
    d.m = M;
    d.n = Nc;
    d.k = K;
    d.x = x;
    d.ldx = ldx;
    d.rows = rows;
    d.layernorm = ln_w >= 0;
    d.ln_weight = ln_w >= 0 ? param(m, ln_w) : NULL;
    d.ln_bias = ln_b >= 0 ? param(m, ln_b) : NULL;
    d.ln_eps = TLM_LN_EPS;
    d.w = w;
    d.bias = bias;
    d.q_scale = q_scale;
    d.q_cols = q_cols;
    d.act = act;
    d.act_kind = m->act_kind;
    d.beta = beta;
    d.y = y;
    d.ldy = ldy;
    d.y_dtype = y_dt;
    d.dt = m->dt;
    return m->h->ops->rowlinear_forward(m->h->ctx, &d);
}

/* ----------------------------------------------------------------- setup */

/* Routing buffers (and the expert buffers of matrix mode) for steps of up
 * to Nmax tokens, with the gate's evaluation capacity for them. */
static moe_status alloc_moe(tlm *m, tlm_decode *dc)
{
    const moe_host *h = m->h;
    const int64_t N = dc->Nmax, E = m->E, d = m->d;
    moe_route_args a;
    memset(&a, 0, sizeof a);
    int g = 0;
    while (!m->layers[g].moe)
        g++;
    MOE_TRY(m->gate_ops->configure(m->layers[g].gate, N, 0, &a));
    dc->C = a.capacity > 0 ? a.capacity : 1;
    dc->width = a.k > 2 ? a.k : 2;
    const uint64_t NW = (uint64_t)N * (uint64_t)dc->width;
    MOE_TRY(dalloc(m, dc, NW * 4u, "decoding routing experts", (void **)&dc->ex));
    MOE_TRY(dalloc(m, dc, NW * 4u, "decoding routing weights", (void **)&dc->ew));
    MOE_TRY(dalloc(m, dc, NW * 4u, "decoding routing slots", (void **)&dc->slot));
    MOE_TRY(aalloc(m, dc, 2 * DEC_ROWS * m->fe, "decoding expert hidden", &dc->ehid));
    MOE_TRY(dalloc(m, dc, (uint64_t)(2 * DEC_ROWS * d) * 4u, "decoding expert outputs", (void **)&dc->eout));
    MOE_TRY(aalloc(m, dc, N * E, "decoding gate logits", &dc->glog));
    MOE_TRY(dalloc(m, dc, (uint64_t)(N * E) * 4u, "decoding gate logits (fp32)", (void **)&dc->glog32));
    MOE_TRY(dalloc(m, dc, (uint64_t)(N * E) * 4u, "decoding gate probabilities", (void **)&dc->probs));
    MOE_TRY(dalloc(m, dc, 4u, "decoding l_aux", (void **)&dc->l_aux));
    MOE_TRY(dalloc(m, dc, MOE_NUM_METRICS * 4u, "decoding routing metrics", (void **)&dc->metrics));
    int64_t wsb = h->ops->route_workspace_bytes(N, m->E);
    MOE_TRY(dalloc(m, dc, (uint64_t)(wsb > 0 ? wsb : 0), "decoding routing workspace", &dc->route_ws));
    if (N > DEC_ROWS || dc->width > 2) { /* the capacity path: steps of more tokens, or more than 2 choices */
        const int64_t EC = E * dc->C;
        MOE_TRY(aalloc(m, dc, EC * d, "decoding expert inputs", &dc->xe));
        MOE_TRY(aalloc(m, dc, EC * m->fe, "decoding expert activations", &dc->eact));
        MOE_TRY(aalloc(m, dc, EC * d, "decoding expert outputs", &dc->eo));
    }
    /* per MoE layer, the experts' parameter pointers by global expert id */
    const int64_t per = 4 * E;
    const void **host = calloc((size_t)(per * m->n_moe), sizeof *host);
    if (!host)
        return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for the expert tables", MOE_ARCH_VARIANT);
    for (int i = 0; i < m->L; i++) {
        const tlm_layer *ly = &m->layers[i];
        if (!ly->moe)
            continue;
        const void **t = host + per * ly->moe_index;
        for (int l = 0; l < m->local_experts; l++) {
            const tlm_expert *x = &ly->experts[l];
            t[x->gid] = param(m, x->fc1_w);
            t[E + x->gid] = param(m, x->fc1_b);
            t[2 * E + x->gid] = param(m, x->fc2_w);
            t[3 * E + x->gid] = param(m, x->fc2_b);
        }
    }
    moe_status st = dalloc(m, dc, (uint64_t)(per * m->n_moe) * sizeof(void *), "decoding expert tables",
                           (void **)&dc->tab);
    if (st == MOE_OK)
        st = h->backend->copy_from_host(h->ctx, (void *)dc->tab, host, (uint64_t)(per * m->n_moe) * sizeof(void *));
    if (st == MOE_OK)
        st = h->backend->synchronize(h->ctx); /* the host table is freed next */
    free(host);
    return st;
}

/* Expert choice routes a forward's tokens together (each expert takes the
 * best of all of them), which a step of a few new tokens cannot reproduce. */
static moe_status refuse_expert_choice(tlm *m)
{
    moe_route_args a;
    memset(&a, 0, sizeof a);
    int g = 0;
    while (!m->layers[g].moe)
        g++;
    MOE_TRY(m->gate_ops->configure(m->layers[g].gate, 1, 0, &a));
    if (a.expert_choice)
        return m->h->error(m->h, MOE_ERR_UNSUPPORTED,
                           "%s: expected a gate that routes each token on its own for decoding, found expert choice, "
                           "whose experts choose among all the tokens of a forward (later ones included); evaluate "
                           "the model with moelm-eval-lm instead",
                           MOE_ARCH_VARIANT);
    return MOE_OK;
}

moe_status tlm_decode_setup(void *model, int64_t B, int64_t max_len, int64_t max_step, unsigned flags)
{
    tlm *m = model;
    const moe_host *h = m->h;
    if (h->world > 1 || (m->n_moe > 0 && (m->a2a_world > 1 || m->local_experts != m->E)))
        return h->error(h, MOE_ERR_UNSUPPORTED,
                        "%s: decoding runs on one process holding every expert, found %d ranks (%d of %d experts "
                        "here); run the tool on one process",
                        MOE_ARCH_VARIANT, h->world, m->local_experts, m->E);
    /* ops a backend of ABI 1.2 or older does not have (NULL) */
    const char *lacking = !h->ops->embedding_at_forward ? "embedding_at_forward"
                          : !h->ops->rowlinear_forward  ? "rowlinear_forward"
                          : !h->ops->attention_decode   ? "attention_decode"
                          : !h->ops->gate_topk_forward  ? "gate_topk_forward"
                          : !h->ops->expert_ffn_forward ? "expert_ffn_forward"
                                                        : NULL;
    if (lacking)
        return h->error(h, MOE_ERR_UNSUPPORTED,
                        "%s: decoding expects the backend's %s op (ABI 1.3), found none; use a backend built "
                        "against ABI 1.3 or later",
                        MOE_ARCH_VARIANT, lacking);
    if (B < 1 || max_len < 1 || max_step < 1 || max_step > max_len)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: decode_setup expects B >= 1 rows and 1 <= max_step <= max_len, found B %lld, max_len "
                        "%lld, max_step %lld",
                        MOE_ARCH_VARIANT, (long long)B, (long long)max_len, (long long)max_step);
    if (B * max_step > INT32_MAX / 4 || B * max_len > INT32_MAX)
        return h->error(h, MOE_ERR_INVALID_ARG, "%s: decode_setup for %lld rows of %lld positions is too large",
                        MOE_ARCH_VARIANT, (long long)B, (long long)max_len);
    tlm_decode_free(m);
    if (m->n_moe > 0) {
        MOE_TRY(tlm_init_gates(m));
        if (!m->gate_ops)
            return h->error(h, MOE_ERR_INTERNAL,
                            "%s: the model has MoE layers but no gate was resolved (host->gate_ops is NULL)",
                            MOE_ARCH_VARIANT);
        MOE_TRY(refuse_expert_choice(m));
    }
    tlm_decode *dc = calloc(1, sizeof *dc);
    if (!dc)
        return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for the decoding state", MOE_ARCH_VARIANT);
    m->dec = dc;
    dc->B = B;
    dc->Tc = max_len;
    dc->max_step = max_step;
    dc->Nmax = B * max_step;
    dc->flags = flags;
    const int64_t N = dc->Nmax, d = m->d;
    dc->in_words = 3 * N + 3 * B + (N + 3) / 4;
    dc->in_host = calloc((size_t)dc->in_words, sizeof(int32_t));
    dc->len = calloc((size_t)B, sizeof(int32_t));
    dc->kc = calloc((size_t)m->L, sizeof(void *));
    dc->vc = calloc((size_t)m->L, sizeof(void *));
    if (!dc->in_host || !dc->len || !dc->kc || !dc->vc)
        return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for the decoding state", MOE_ARCH_VARIANT);
    MOE_TRY(dalloc(m, dc, (uint64_t)dc->in_words * 4u, "decoding step inputs", (void **)&dc->in_dev));
    const int64_t cache = B * m->H * max_len * m->D;
    for (int i = 0; i < m->L; i++) {
        MOE_TRY(aalloc(m, dc, cache, "key cache", &dc->kc[i]));
        MOE_TRY(aalloc(m, dc, cache, "value cache", &dc->vc[i]));
    }
    int64_t fmax = m->fs;
    for (int i = 0; i < m->L; i++)
        if (!m->layers[i].moe && m->layers[i].ffn > fmax)
            fmax = m->layers[i].ffn;
    MOE_TRY(aalloc(m, dc, N * d, "decoding residual stream", &dc->x));
    MOE_TRY(aalloc(m, dc, N * d, "decoding layer norm output", &dc->h));
    MOE_TRY(aalloc(m, dc, N * 3 * d, "decoding q, k, v", &dc->qkv));
    MOE_TRY(aalloc(m, dc, N * d, "decoding attention output", &dc->att));
    MOE_TRY(aalloc(m, dc, N * fmax, "decoding FFN hidden", &dc->ffh));
    if (m->fs > 0)
        MOE_TRY(aalloc(m, dc, N * d, "decoding shared expert output", &dc->shy));
    MOE_TRY(aalloc(m, dc, d, "decoding scaled q bias", &dc->bq));
    MOE_TRY(dalloc(m, dc, (uint64_t)(N * m->V) * 4u, "decoding logits", (void **)&dc->logits));
    if (m->n_moe > 0)
        MOE_TRY(alloc_moe(m, dc));
    return MOE_OK;
}

moe_status tlm_decode_reset(void *model)
{
    tlm *m = model;
    if (!m->dec)
        return m->h->error(m->h, MOE_ERR_INTERNAL, "%s: decode_reset before decode_setup", MOE_ARCH_VARIANT);
    memset(m->dec->len, 0, (size_t)m->dec->B * sizeof(int32_t));
    return MOE_OK;
}

/* ------------------------------------------------------------------ step */

typedef struct step_views {
    const int32_t *tok, *pos, *noise, *clen, *nnew, *last;
    const uint8_t *pad;
} step_views;

static step_views views_of(const tlm_decode *dc, const int32_t *base, int64_t N)
{
    step_views v;
    v.tok = base;
    v.pos = base + N;
    v.noise = base + 2 * N;
    v.clen = base + 3 * N;
    v.nnew = v.clen + dc->B;
    v.last = v.nnew + dc->B;
    v.pad = (const uint8_t *)(v.last + dc->B);
    return v;
}

/* the MoE layer on the residual stream x (N tokens): x += MoE(LN2(x)) */
static moe_status moe_step(tlm *m, int i, int64_t N, int rows, const step_views *v)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    tlm_decode *dc = m->dec;
    tlm_layer *ly = &m->layers[i];
    const int64_t d = m->d, E = m->E;
    moe_route_args r;
    memset(&r, 0, sizeof r);
    MOE_TRY(m->gate_ops->configure(ly->gate, N, 0, &r));
    /* nothing drops when every expert can take every token; the random policy drops by itself.
     * gate_topk_forward is fairseq's softmax top-1/top-2: the general top-k
     * router (scores, groups, bias) always goes through route_forward. */
    const int no_drop = !r.topk && r.capacity >= N && (r.k == 1 || r.policy != MOE_ROUTE_RANDOM);
    /* expert_ffn_forward reads two choices per token; wider routings take the capacity path */
    const int W = dc->width, expert_rows = rows && W == 2;
    const uint64_t stream = tlm_stream(i + 1, SITE_GATE, 0, 0);
    if (rows && no_drop) {
        moe_gate_topk_args g;
        memset(&g, 0, sizeof g);
        g.S = N;
        g.d = d;
        g.E = (int)E;
        g.k = r.k;
        g.x = dc->x;
        g.layernorm = 1;
        g.ln_weight = param(m, ly->ln2_w);
        g.ln_bias = param(m, ly->ln2_b);
        g.ln_eps = TLM_LN_EPS;
        g.wg = param(m, ly->wg);
        g.policy = r.k == 2 ? r.policy : MOE_ROUTE_ALL;
        g.seed = r.seed;
        g.stream = stream;
        g.noise_index = v->noise;
        g.pad = v->pad;
        g.expert = dc->ex;
        g.weight = dc->ew;
        g.dt = m->dt;
        MOE_TRY(ops->gate_topk_forward(h->ctx, &g));
    } else {
        /* the gate projection as the training forward computes it, then route_forward with capacity */
        if (r.capacity < 1 || r.capacity > dc->C)
            return h->error(h, MOE_ERR_INTERNAL,
                            "%s: the gate asked for capacity %lld for %lld tokens, decoding buffers hold 1..%lld",
                            MOE_ARCH_VARIANT, (long long)r.capacity, (long long)N, (long long)dc->C);
        if (rows) {
            MOE_TRY(rowlin(m, N, dc->x, d, NULL, ly->ln2_w, ly->ln2_b, param(m, ly->wg), E, d, NULL, dc->glog, E,
                           m->dt, 0.0f, 0, 1.0f, 0));
        } else {
            MOE_TRY(ops->layernorm_forward(h->ctx, dc->h, NULL, NULL, dc->x, param(m, ly->ln2_w), param(m, ly->ln2_b),
                                           N, d, TLM_LN_EPS, m->dt));
            MOE_TRY(gemm(m, N, E, d, 1.0f, dc->h, d, param(m, ly->wg), 0.0f, dc->glog, E, m->dt, MOE_EPI_NONE, NULL));
        }
        MOE_TRY(ops->cast(h->ctx, dc->glog32, MOE_F32, dc->glog, m->dt, N * E));
        r.S = N;
        r.E = (int)E;
        r.width = W;
        r.seq_len = N; /* the sequence-wise loss is not used here: one segment */
        r.stream = stream;
        r.logits = dc->glog32;
        r.pad = v->pad;
        r.noise_index = v->noise;
        r.probs = dc->probs;
        r.expert = dc->ex;
        r.slot = dc->slot;
        r.weight = dc->ew;
        r.l_aux = dc->l_aux;
        r.metrics = dc->metrics;
        r.workspace = dc->route_ws;
        MOE_TRY(m->gate_ops->forward(ly->gate, &r));
    }
    if (expert_rows) {
        /* dropped assignments carry weight 0: expert_ffn skips them as combine does */
        const int64_t per = 4 * E;
        const void **t = dc->tab + per * ly->moe_index;
        moe_expert_ffn_args a;
        memset(&a, 0, sizeof a);
        a.S = N;
        a.d = d;
        a.f = m->fe;
        a.E = (int)E;
        a.x = dc->x;
        a.layernorm = 1;
        a.ln_weight = param(m, ly->ln2_w);
        a.ln_bias = param(m, ly->ln2_b);
        a.ln_eps = TLM_LN_EPS;
        a.expert = dc->ex;
        a.weight = dc->ew;
        a.w1 = t;
        a.b1 = t + E;
        a.w2 = t + 2 * E;
        a.b2 = t + 3 * E;
        a.act = m->act_kind;
        a.beta = 1.0f;
        a.y = dc->x;
        a.hidden = dc->ehid;
        a.eout = dc->eout;
        a.dt = m->dt;
        return ops->expert_ffn_forward(h->ctx, &a);
    }
    /* matrix mode: capacity slots, each local expert's GEMMs over them, combine */
    const int64_t C = r.capacity, fe = m->fe;
    if (rows) /* the rows gate fused LN2 into its product */
        MOE_TRY(ops->layernorm_forward(h->ctx, dc->h, NULL, NULL, dc->x, param(m, ly->ln2_w), param(m, ly->ln2_b), N,
                                       d, TLM_LN_EPS, m->dt));
    MOE_TRY(tlm_dispatch_forward(m, W, dc->xe, dc->h, dc->ex, dc->slot, N, C));
    for (int l = 0; l < m->local_experts; l++) {
        const tlm_expert *x = &ly->experts[l];
        void *xin = doff(dc->xe, (int64_t)x->gid * C * d, m->dt), *act = doff(dc->eact, (int64_t)x->gid * C * fe, m->dt);
        void *o = doff(dc->eo, (int64_t)x->gid * C * d, m->dt);
        MOE_TRY(gemm(m, C, fe, d, 1.0f, xin, d, param(m, x->fc1_w), 0.0f, act, fe, m->dt, MOE_EPI_BIAS_ACT,
                     param(m, x->fc1_b)));
        MOE_TRY(gemm(m, C, d, fe, 1.0f, act, fe, param(m, x->fc2_w), 0.0f, o, d, m->dt, MOE_EPI_BIAS,
                     param(m, x->fc2_b)));
    }
    MOE_TRY(tlm_combine_forward(m, W, dc->att, dc->eo, dc->ex, dc->slot, dc->ew, N, C));
    return ops->add(h->ctx, dc->x, dc->x, dc->att, m->dt, N * d);
}

/* y = beta * y + fc2(act(fc1(LN2(x)))) of FFN f (dense, or a shared expert) */
static moe_status ffn_step(tlm *m, const tlm_layer *ly, const tlm_ffn *x, int64_t N, int rows, void *y, float beta)
{
    const moe_host *h = m->h;
    tlm_decode *dc = m->dec;
    const int64_t d = m->d, f = x->width;
    if (rows) {
        MOE_TRY(rowlin(m, N, dc->x, d, NULL, ly->ln2_w, ly->ln2_b, param(m, x->fc1_w), f, d, param(m, x->fc1_b),
                       dc->ffh, f, m->dt, 0.0f, 1, 1.0f, 0));
        return rowlin(m, N, dc->ffh, f, NULL, -1, -1, param(m, x->fc2_w), d, f, param(m, x->fc2_b), y, d, m->dt, beta, 0,
                      1.0f, 0);
    }
    MOE_TRY(h->ops->layernorm_forward(h->ctx, dc->h, NULL, NULL, dc->x, param(m, ly->ln2_w), param(m, ly->ln2_b), N,
                                      d, TLM_LN_EPS, m->dt));
    MOE_TRY(gemm(m, N, f, d, 1.0f, dc->h, d, param(m, x->fc1_w), 0.0f, dc->ffh, f, m->dt, MOE_EPI_BIAS_ACT,
                 param(m, x->fc1_b)));
    return gemm(m, N, d, f, 1.0f, dc->ffh, f, param(m, x->fc2_w), beta, y, d, m->dt, MOE_EPI_BIAS, param(m, x->fc2_b));
}

/* one decoder layer on the step's tokens */
static moe_status layer_step(tlm *m, int i, int64_t n, int rows, const step_views *v)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    tlm_decode *dc = m->dec;
    const tlm_layer *ly = &m->layers[i];
    const int64_t N = dc->B * n, d = m->d;

    /* [k | v | q] = LN1(x) [Wk; Wv; Wq]^T + [bk; bv; bq], q scaled: the three
     * weights (and biases) are consecutive in the layer's unit */
    if (rows) {
        MOE_TRY(rowlin(m, N, dc->x, d, NULL, ly->ln1_w, ly->ln1_b, param(m, ly->wk), 3 * d, d, param(m, ly->bk),
                       dc->qkv, 3 * d, m->dt, 0.0f, 0, m->q_scale, d));
    } else {
        MOE_TRY(ops->layernorm_forward(h->ctx, dc->h, NULL, NULL, dc->x, param(m, ly->ln1_w), param(m, ly->ln1_b), N, d,
                                       TLM_LN_EPS, m->dt));
        MOE_TRY(gemm(m, N, 2 * d, d, 1.0f, dc->h, d, param(m, ly->wk), 0.0f, dc->qkv, 3 * d, m->dt, MOE_EPI_BIAS,
                     param(m, ly->bk)));
        MOE_TRY(ops->axpby(h->ctx, dc->bq, param(m, ly->bq), m->dt, d, m->q_scale, 0.0f));
        MOE_TRY(gemm(m, N, d, d, m->q_scale, dc->h, d, param(m, ly->wq), 0.0f, doff(dc->qkv, 2 * d, m->dt), 3 * d,
                     m->dt, MOE_EPI_BIAS, dc->bq));
    }
    MOE_TRY(ops->attention_decode(h->ctx, dc->att, doff(dc->qkv, 2 * d, m->dt), dc->qkv, doff(dc->qkv, d, m->dt),
                                  3 * d, dc->kc[i], dc->vc[i], v->clen, v->nnew, dc->B, n, m->H, m->D, dc->Tc, m->dt));
    /* x += att Wo^T + bo */
    if (rows)
        MOE_TRY(rowlin(m, N, dc->att, d, NULL, -1, -1, param(m, ly->wo), d, d, param(m, ly->bo), dc->x, d, m->dt, 1.0f,
                       0, 1.0f, 0));
    else
        MOE_TRY(gemm(m, N, d, d, 1.0f, dc->att, d, param(m, ly->wo), 1.0f, dc->x, d, m->dt, MOE_EPI_BIAS,
                     param(m, ly->bo)));

    if (!ly->moe) {
        const tlm_ffn dense = {ly->fc1_w, ly->fc1_b, ly->fc2_w, ly->fc2_b, ly->ffn};
        return ffn_step(m, ly, &dense, N, rows, dc->x, 1.0f);
    }
    if (ly->shared.width == 0)
        return moe_step(m, i, N, rows, v);
    /* both branches read LN2(x): the shared expert's output waits in shy */
    MOE_TRY(ffn_step(m, ly, &ly->shared, N, rows, dc->shy, 0.0f));
    MOE_TRY(moe_step(m, i, N, rows, v));
    return ops->add(h->ctx, dc->x, dc->x, dc->shy, m->dt, N * d);
}

/* every launch of a step, from the inputs already on the device */
static moe_status run_step(tlm *m, int64_t n, int all_positions)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    tlm_decode *dc = m->dec;
    const int64_t N = dc->B * n, d = m->d;
    const int rows = N <= DEC_ROWS;
    const step_views v = views_of(dc, dc->in_dev, N);
    MOE_TRY(h->unit_gather(h, m->root_unit));
    MOE_TRY(ops->embedding_at_forward(h->ctx, dc->x, v.tok, v.pos, param(m, m->emb), N, d, m->emb_scale, m->pad, 1,
                                      m->dt));
    for (int i = 0; i < m->L; i++) {
        MOE_TRY(h->unit_gather(h, m->layers[i].unit));
        MOE_TRY(layer_step(m, i, n, rows, &v));
        MOE_TRY(h->unit_release(h, m->layers[i].unit));
    }
    /* logits = LNf(x) W^T in fp32, for every fed position or each row's last */
    const void *w = param(m, m->tied ? m->emb : m->out_proj);
    const int lnw = m->final_norm ? m->lnf_w : -1, lnb = m->final_norm ? m->lnf_b : -1;
    if (all_positions && !rows) {
        const void *xf = dc->x;
        if (m->final_norm) {
            MOE_TRY(ops->layernorm_forward(h->ctx, dc->h, NULL, NULL, dc->x, param(m, lnw), param(m, lnb), N, d,
                                           TLM_LN_EPS, m->dt));
            xf = dc->h;
        }
        MOE_TRY(gemm(m, N, m->V, d, 1.0f, xf, d, w, 0.0f, dc->logits, m->V, MOE_F32, MOE_EPI_NONE, NULL));
    } else {
        MOE_TRY(rowlin(m, all_positions ? N : dc->B, dc->x, d, all_positions ? NULL : v.last, lnw, lnb, w, m->V, d,
                       NULL, dc->logits, m->V, MOE_F32, 0.0f, 0, 1.0f, 0));
    }
    return h->unit_release(h, m->root_unit);
}

moe_status tlm_decode_step(void *model, const int32_t *tokens, const int32_t *n_new, int64_t n, int all_positions,
                           const float **logits)
{
    tlm *m = model;
    const moe_host *h = m->h;
    tlm_decode *dc = m->dec;
    *logits = NULL;
    if (!dc)
        return h->error(h, MOE_ERR_INTERNAL, "%s: decode_step before decode_setup", MOE_ARCH_VARIANT);
    if (n < 1 || n > dc->max_step)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "%s: decode_step feeds 1..%lld tokens per row (decode_setup's max_step), found %lld",
                        MOE_ARCH_VARIANT, (long long)dc->max_step, (long long)n);
    const int64_t B = dc->B, N = B * n;
    int32_t *in = dc->in_host;
    step_views v = views_of(dc, in, N);
    int32_t *tok = (int32_t *)(uintptr_t)v.tok, *pos = (int32_t *)(uintptr_t)v.pos;
    int32_t *noise = (int32_t *)(uintptr_t)v.noise, *clen = (int32_t *)(uintptr_t)v.clen;
    int32_t *nnew = (int32_t *)(uintptr_t)v.nnew, *last = (int32_t *)(uintptr_t)v.last;
    uint8_t *pad = (uint8_t *)(uintptr_t)v.pad;
    for (int64_t b = 0; b < B; b++) {
        const int32_t k = n_new[b];
        if (k < 0 || k > n || (int64_t)dc->len[b] + k > dc->Tc)
            return h->error(h, MOE_ERR_INVALID_ARG,
                            "%s: row %lld feeds %d tokens after %d cached; expected 0..%lld new and at most %lld "
                            "positions in all (decode_setup's max_len)",
                            MOE_ARCH_VARIANT, (long long)b, (int)k, (int)dc->len[b], (long long)n, (long long)dc->Tc);
        for (int64_t j = 0; j < n; j++) {
            const int64_t i = b * n + j;
            const int fed = j < k;
            const int32_t t = fed ? tokens[i] : m->pad;
            if (t < 0 || t >= m->V)
                return h->error(h, MOE_ERR_INVALID_ARG,
                                "%s: token %d (row %lld, position %lld of the step) is outside the dictionary of %lld",
                                MOE_ARCH_VARIANT, (int)t, (long long)b, (long long)j, (long long)m->V);
            tok[i] = t;
            pos[i] = m->pad + 1 + dc->len[b] + (int32_t)j;
            noise[i] = dc->len[b] + (int32_t)j;
            pad[i] = (uint8_t)(!fed || (m->pad_mask && t == m->pad));
        }
        clen[b] = dc->len[b];
        nnew[b] = k;
        last[b] = (int32_t)(b * n + (k > 0 ? k - 1 : 0));
    }
    MOE_TRY(h->backend->copy_from_host(h->ctx, dc->in_dev, in, (uint64_t)dc->in_words * 4u));

    const int rows = N <= DEC_ROWS, a = all_positions ? 1 : 0;
    const moe_ops *ops = h->ops;
    const int recordable = rows && ops->graph_begin && !(dc->flags & MOE_DECODE_NO_GRAPH);
    if (recordable && dc->graph[n][a]) {
        MOE_TRY(ops->graph_launch(h->ctx, dc->graph[n][a]));
    } else if (recordable && dc->runs[n][a] > 0) {
        /* the second step of this shape: record it (the first ran eagerly, so
         * every kernel is loaded and configured), then replay it from now on */
        MOE_TRY(ops->graph_begin(h->ctx));
        moe_status st = run_step(m, n, a);
        void *g = NULL;
        moe_status st_end = ops->graph_end(h->ctx, &g);
        if (st != MOE_OK || st_end != MOE_OK) {
            if (g)
                ops->graph_destroy(h->ctx, g);
            return h->error(h, st != MOE_OK ? st : st_end,
                            "%s: recording the decoding step as a graph failed (see the message before); decoding "
                            "without graphs (MOE_DECODE_NO_GRAPH) avoids recording",
                            MOE_ARCH_VARIANT);
        }
        dc->graph[n][a] = g;
        MOE_TRY(ops->graph_launch(h->ctx, g));
    } else {
        MOE_TRY(run_step(m, n, a));
        if (rows)
            dc->runs[n][a]++;
    }
    for (int64_t b = 0; b < B; b++)
        dc->len[b] += n_new[b];
    *logits = dc->logits;
    return MOE_OK;
}
