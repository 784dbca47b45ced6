/* moe_layer.c: the MoE layer of the transformer_lm archs (FAIRSEQ_SPEC.md
 * §2): its expert units and layout (the core's parallel plan, host->plan),
 * the gates, the buffers, and the explicit forward and backward of gate
 * projection, dispatch, all-to-all, local experts, all-to-all back and
 * combine. The decoder (transformer_lm.c) calls the interface of
 * moe_layer.h; the gate weight stays in the decoder layer's unit, where
 * fairseq's state_dict puts it.
 *
 * What it is not: the routing policy (the gate plugin, host->gate_ops), the
 * reduction of expert gradients over replicas (the trainer), incremental
 * decoding's routed experts (transformer_lm_decode.c).
 *
 * Conventions a reader would trip over (transformer_lm.c's opening comment
 * has the rest):
 *  - Gate: logits = x wg^T in the activation dtype, cast to fp32; all routing
 *    math is fp32 whether or not --moe-gating-use-fp32 is given.
 *  - Expert-parallel layout (§2.4): the dispatched (E*C, d) buffer is rank-
 *    major, so the all-to-all moves contiguous chunks; each local expert
 *    processes the W*C slots it receives from the W ranks of its all-to-all
 *    group. With several local experts and several ranks the received buffer
 *    is permuted to expert-major and back with plain copies.
 *  - An expert's gradient contribution is multiplied by
 *    host->expert_grad_scale as it accumulates (fairseq's hook, §2.9).
 *  - The routing arrays hold m->width choices per token
 *    (moe_route_args.width): max(k, 2) for the top-k gates, E for expert
 *    choice (whose column e is expert e), dispatched and combined by the
 *    backend's *_wide_* ops (ABI 1.4; a backend without them does 2 only).
 *    Not to be confused with W below, the ranks of the all-to-all group. The
 *    general top-k router's sequence-wise loss takes each row of the batch
 *    as one sequence (seq_len = T).
 *  - Rows an expert processes: its whole capacity C per rank, slots left
 *    empty included (zero inputs, outputs never combined), except where the
 *    backend's expert_rows op (ABI 1.5) counts each expert's filled slots
 *    (the all-to-all group's ranks hold consecutive expert ids, as the
 *    rank-major layout has them):
 *     - on a backend whose ops run on the host (no device timers: the cpu)
 *       with every expert local, the counts are read back (no
 *       synchronisation to pay) and each expert multiplies only its filled
 *       slots;
 *     - otherwise, when the capacity is more than twice the choices routed
 *       (E C > 2 N W: --moe-dropless's bound), the counts stay on the device
 *       (with expert parallelism each rank's counts reach the experts'
 *       ranks by an all-to-all of E integers) and the expert products are
 *       the backend's grouped_matmul over them, one group per (source rank,
 *       local expert) chunk: no host synchronisation, the step stays
 *       capturable, and the compute follows the tokens routed, not the
 *       bound. Dropout (when on) still runs over every slot; rows past a
 *       count are left unwritten and never read.
 *    The result is the same: an empty slot adds exact zeros to every
 *    gradient.
 *  - Kept for backward per layer unless recomputed (transformer_lm.h,
 *    ln_recompute and act_recompute): the experts' inputs are dispatched
 *    again from the recomputed h2 on a rank that holds its tokens' experts
 *    (a->xe is then the shared m->xes), and the activations (a->eact) are
 *    recomputed per expert in m->depre unless the grouped products may run
 *    (keep_expert_acts).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe/plugin.h"
#include "plugins/archs/moe_layer.h"

/* ------------------------------------------------------------------ build */

moe_status tlm_moe_plan(tlm *m)
{
    const moe_host *h = m->h;
    if (m->n_moe == 0)
        return MOE_OK;
    /* the expert layout (FAIRSEQ_SPEC.md §2.4) is the core's parallel plan */
    MOE_TRY(h->plan_experts(h, m->E, &m->plan));
    m->local_experts = m->plan->local_experts;
    m->a2a_world = m->plan->a2a_world;
    m->a2a_group = m->plan->a2a_group;
    return MOE_OK;
}

/* The local experts of MoE layer i, one unit each after the layer's unit:
 * "<pfx>.moe_layer.experts.<global id>" holding fc1/fc2.{weight,bias}, in the
 * plan's order. */
moe_status tlm_moe_register_experts(tlm *m, int i, const char *pfx)
{
    const moe_host *h = m->h;
    tlm_layer *ly = &m->layers[i];
    ly->experts = calloc((size_t)m->local_experts, sizeof *ly->experts);
    ly->rows = calloc((size_t)m->local_experts, sizeof *ly->rows);
    if (!ly->experts || !ly->rows)
        return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for layer %d's experts", MOE_ARCH_VARIANT, i);
    for (int j = 0; j < m->local_experts; j++) {
        tlm_expert *x = &ly->experts[j];
        x->gid = m->plan->local_ids[j];
        char epfx[128];
        snprintf(epfx, sizeof epfx, "%s.moe_layer.experts.%d", pfx, x->gid);
        MOE_TRY(h->unit_add(h, epfx, x->gid, &x->unit));
        MOE_TRY(tlm_add_ffn(m, x->unit, epfx, m->fe, &x->fc1_w, &x->fc1_b, &x->fc2_w, &x->fc2_b));
    }
    return MOE_OK;
}

moe_status tlm_init_gates(tlm *m)
{
    if (m->n_moe == 0 || m->gate_ops)
        return MOE_OK;
    const moe_host *h = m->h;
    if (!h->gate_ops)
        return MOE_OK; /* resolved later; setup checks again */
    m->gate_ops = h->gate_ops;
    for (int i = 0; i < m->L; i++)
        if (m->layers[i].moe)
            MOE_TRY(m->gate_ops->init(h, m->E, &m->layers[i].gate));
    return MOE_OK;
}

void tlm_moe_free(tlm *m)
{
    if (!m->layers)
        return;
    for (int i = 0; i < m->L; i++) {
        if (m->layers[i].gate && m->gate_ops)
            m->gate_ops->destroy(m->layers[i].gate);
        free(m->layers[i].experts);
        free(m->layers[i].rows);
    }
    free(m->rows_host);
    free(m->gptr);
}

/* ------------------------------------------------------------------ setup */

/* The gates, the capacity C and the routing width W the buffers hold: the
 * largest the gate asks for N tokens, in training and in evaluation. */
moe_status tlm_moe_setup(tlm *m, int64_t N)
{
    const moe_host *h = m->h;
    m->C = 0;
    m->width = 2;
    if (m->n_moe == 0)
        return MOE_OK;
    MOE_TRY(tlm_init_gates(m));
    if (!m->gate_ops)
        return h->error(h, MOE_ERR_INTERNAL,
                        "%s: the model has MoE layers but no gate was resolved (host->gate_ops is NULL); load a "
                        "gate plugin (--moe-gate) before building the model",
                        MOE_ARCH_VARIANT);
    for (int train = 0; train < 2; train++) {
        moe_route_args a;
        memset(&a, 0, sizeof a);
        int g = 0;
        while (!m->layers[g].moe)
            g++;
        MOE_TRY(m->gate_ops->configure(m->layers[g].gate, N, train, &a));
        if (a.capacity > m->C)
            m->C = a.capacity;
        if (train)
            m->C_train = a.capacity;
        const int w = a.width > (a.k > 2 ? a.k : 2) ? a.width : (a.k > 2 ? a.k : 2);
        if (w > m->width)
            m->width = w;
    }
    if (m->C < 1)
        m->C = 1;
    if (m->width > 2 && !h->ops->dispatch_wide_forward)
        return h->error(h, MOE_ERR_UNSUPPORTED,
                        "%s: the gate routes %d experts per token, which needs the backend's dispatch_wide_forward "
                        "op (ABI 1.4), found none; use a backend built against ABI 1.4 or later",
                        MOE_ARCH_VARIANT, m->width);
    return MOE_OK;
}

/* Dispatch and combine over W choices per token: the wide ops (ABI 1.4), or
 * the two-choice ops of an older backend (tlm_moe_setup refuses W > 2 there). */
moe_status tlm_dispatch_forward(const tlm *m, int W, void *out, const void *x, const int32_t *expert,
                                const int32_t *slot, int64_t S, int64_t C)
{
    const moe_host *h = m->h;
    if (h->ops->dispatch_wide_forward)
        return h->ops->dispatch_wide_forward(h->ctx, out, x, expert, slot, S, W, m->E, C, m->d, m->dt);
    return h->ops->dispatch_forward(h->ctx, out, x, expert, slot, S, m->E, C, m->d, m->dt);
}

moe_status tlm_combine_forward(const tlm *m, int W, void *y, const void *eout, const int32_t *expert,
                               const int32_t *slot, const float *weight, int64_t S, int64_t C)
{
    const moe_host *h = m->h;
    if (h->ops->combine_wide_forward)
        return h->ops->combine_wide_forward(h->ctx, y, eout, expert, slot, weight, S, W, m->E, C, m->d, m->dt);
    return h->ops->combine_forward(h->ctx, y, eout, expert, slot, weight, S, m->E, C, m->d, m->dt);
}

static int keep_expert_acts(const tlm *m);

/* The experts' inputs are not kept per layer but dispatched again in
 * backward from the recomputed h2 (the tokens stay on this rank): every
 * layer's a->xe is then the one m->xes. */
static int inputs_dispatched_again(const tlm *m) { return m->ln_recompute && m->a2a_world == 1; }

/* A MoE layer's activations for backward (one set per layer, or the shared
 * set with checkpointing). */
moe_status tlm_moe_alloc_acts(tlm *m, tlm_acts *a)
{
    const int64_t N = m->Nmax, d = m->d, EC = (int64_t)m->E * m->C;
    MOE_TRY(tlm_f32_alloc(m, N * m->E, "gate logits", &a->logits));
    MOE_TRY(tlm_f32_alloc(m, N * m->E, "gate probabilities", &a->probs));
    const uint64_t NW = (uint64_t)N * (uint64_t)m->width;
    MOE_TRY(tlm_dev_alloc(m, NW * 4u, "routing experts", (void **)&a->expert));
    MOE_TRY(tlm_dev_alloc(m, NW * 4u, "routing slots", (void **)&a->slot));
    MOE_TRY(tlm_f32_alloc(m, (int64_t)NW, "routing weights", &a->weight));
    int64_t wsb = m->h->ops->route_workspace_bytes(N, m->E);
    MOE_TRY(tlm_dev_alloc(m, (uint64_t)(wsb > 0 ? wsb : 0), "routing workspace", &a->route_ws));
    if (inputs_dispatched_again(m)) {
        MOE_TRY(tlm_shared_alias(m, &a->xe, &m->xes)); /* m->xes: tlm_moe_alloc_scratch */
    } else {
        MOE_TRY(tlm_act_alloc(m, EC * d, "expert inputs", &a->xe));
    }
    MOE_TRY(tlm_act_alloc(m, EC * m->fe, "expert pre-activations", &a->epre));
    if (keep_expert_acts(m))
        MOE_TRY(tlm_act_alloc(m, EC * m->fe, "expert activations", &a->eact));
    MOE_TRY(tlm_act_alloc(m, EC * d, "expert outputs", &a->eback));
    return MOE_OK;
}

/* columns of the routing arrays (W = E with expert choice) */
static int route_width(const moe_route_args *r) { return r->width > 0 ? r->width : 2; }

/* The all-to-all group's W ranks hold E = W L experts, this rank the L
 * consecutive ids its chunk of the rank-major buffer carries: expert_rows'
 * counts (over all E experts) then say how far each chunk is filled. */
static int counted_layout(const tlm *m)
{
    const int L = m->local_experts;
    if (m->h->ops->expert_rows == NULL || (int64_t)m->a2a_world * L != m->E || m->plan->local_ids[0] % L != 0)
        return 0;
    for (int l = 1; l < L; l++)
        if (m->plan->local_ids[l] != m->plan->local_ids[0] + l)
            return 0;
    return 1;
}

/* The experts multiply only their filled slots, counted on the host: every
 * expert is local and the backend runs on the host (the cpu has no device
 * timers, plugin.h). */
static int rows_on_host(const tlm *m)
{
    return m->a2a_world == 1 && counted_layout(m) && m->h->backend->timer_mark == NULL;
}

/* ... or counted on the device, through grouped_matmul, when the capacity is
 * more than twice the choices routed (the counts of other ranks' tokens
 * arrive by an all-to-all of E integers) and the experts' activations are
 * kept (keep_expert_acts). */
static int rows_on_device(const tlm *m, const tlm_acts *a, const moe_route_args *r)
{
    return !rows_on_host(m) && counted_layout(m) && m->h->ops->grouped_matmul != NULL && a->eact != NULL &&
           (int64_t)m->E * r->capacity > 2 * m->N * (int64_t)route_width(r);
}

/* MoE layer ly's counts as grouped_matmul reads them: rank w's chunk of
 * local expert l at [w L + l] (W = 1: expert l's own count) */
static const int32_t *layer_rows(const tlm *m, const tlm_layer *ly)
{
    return (m->a2a_world > 1 ? m->rows_recv : m->rows_dev) + (size_t)ly->moe_index * (size_t)m->E;
}

/* The experts' activations are kept per layer unless m->act_recompute and
 * the grouped products can never run in training (they multiply every
 * expert at once, so they need them all): then each expert's activation
 * lives in the backward's scratch m->depre while its fc2 reads it, and the
 * backward recomputes it there from the kept pre-activations. Without them
 * (a->eact NULL) the grouped products are not used, in evaluation either. */
static int keep_expert_acts(const tlm *m)
{
    return !m->act_recompute || (counted_layout(m) && m->h->ops->grouped_matmul != NULL &&
                                 (int64_t)m->E * m->C_train > 2 * m->Nmax * (int64_t)m->width);
}

/* ly->rows: each expert's slots up to its last filled one on the host path,
 * else its whole W*C; on the device path layer_rows(m, ly), kept from the
 * forward for the backward */
static moe_status expert_rows(tlm *m, tlm_layer *ly, const tlm_acts *a, const moe_route_args *r)
{
    const moe_host *h = m->h;
    const int64_t C = r->capacity;
    for (int l = 0; l < m->local_experts; l++)
        ly->rows[l] = (int64_t)m->a2a_world * C;
    const int host = rows_on_host(m);
    if (!host && !rows_on_device(m, a, r))
        return MOE_OK;
    int32_t *own = m->rows_dev + (size_t)ly->moe_index * (size_t)m->E;
    MOE_TRY(h->ops->expert_rows(h->ctx, own, a->expert, a->slot, m->N, m->width, m->E, C));
    if (m->a2a_world > 1)
        return h->comm_ops->all_to_all(h->comm, m->a2a_group, (void *)layer_rows(m, ly), own, m->local_experts,
                                       MOE_I32);
    if (!host)
        return MOE_OK;
    MOE_TRY(h->backend->copy_to_host(h->ctx, m->rows_host, own, (uint64_t)m->E * sizeof *m->rows_host));
    for (int l = 0; l < m->local_experts; l++)
        ly->rows[l] = m->rows_host[l];
    return MOE_OK;
}

/* Scratch every MoE layer shares (forward exchange buffers, backward
 * gradients, the padding mask). */
moe_status tlm_moe_alloc_scratch(tlm *m)
{
    const moe_host *h = m->h;
    const int64_t N = m->Nmax, d = m->d;
    const int64_t EC = (int64_t)m->E * m->C, W = m->a2a_world;
    const int perm = W > 1 && m->local_experts > 1;
    if (m->dt != MOE_F32) {
        MOE_TRY(tlm_act_alloc(m, N * m->E, "gate logits", &m->glog));
        MOE_TRY(tlm_act_alloc(m, N * m->E, "gate logits gradient", &m->dlog));
    }
    /* Forward scratch, NULL where aliased: with W == 1 the dispatch writes the
     * expert inputs directly and the experts write the combine's input. This
     * scratch and the backward's lives inside the logits (tlm_shared_alloc). */
    if (W > 1) {
        MOE_TRY(tlm_shared_alloc(m, EC * d, &m->disp));
        MOE_TRY(tlm_shared_alloc(m, EC * d, &m->eout));
        if (perm) {
            MOE_TRY(tlm_shared_alloc(m, EC * d, &m->recv));
            MOE_TRY(tlm_shared_alloc(m, EC * d, &m->eperm));
        }
    }
    if (inputs_dispatched_again(m))
        MOE_TRY(tlm_shared_alloc(m, EC * d, &m->xes));
    MOE_TRY(tlm_shared_alloc(m, EC * d, &m->d_a));
    if (W > 1)
        MOE_TRY(tlm_shared_alloc(m, EC * d, &m->d_b));
    if (perm)
        MOE_TRY(tlm_shared_alloc(m, EC * d, &m->d_c));
    MOE_TRY(tlm_shared_alloc(m, EC * d, &m->d_e));
    MOE_TRY(tlm_shared_alloc(m, W * m->C * m->fe, &m->depre));
    MOE_TRY(tlm_f32_alloc(m, N * m->width, "routing weight gradient", &m->dweight));
    MOE_TRY(tlm_f32_alloc(m, N * m->E, "gate logits gradient", &m->dlogits));
    MOE_TRY(tlm_act_alloc(m, d > m->fe ? d : m->fe, "expert bias gradient", &m->ebias));
    if (counted_layout(m)) {
        const uint64_t counts = (uint64_t)m->n_moe * (uint64_t)m->E;
        MOE_TRY(tlm_dev_alloc(m, counts * sizeof *m->rows_dev, "filled expert rows", (void **)&m->rows_dev));
        if (W > 1)
            MOE_TRY(tlm_dev_alloc(m, counts * sizeof *m->rows_recv, "received expert rows", (void **)&m->rows_recv));
        m->rows_host = malloc((size_t)m->E * sizeof *m->rows_host);
        m->gptr = calloc(6 * (size_t)m->E, sizeof *m->gptr);
        if (!m->rows_host || !m->gptr)
            return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for the experts' row counts", MOE_ARCH_VARIANT);
    }
    if (m->pad_mask) {
        MOE_TRY(tlm_dev_alloc(m, (uint64_t)N, "padding mask", (void **)&m->pad_dev));
        m->tok_host = malloc((size_t)N * sizeof *m->tok_host);
        m->pad_host = malloc((size_t)N);
        if (!m->tok_host || !m->pad_host)
            return h->error(h, MOE_ERR_NOMEM, "%s: out of host memory for the padding mask", MOE_ARCH_VARIANT);
    }
    return MOE_OK;
}

/* ---------------------------------------------------------------- forward */

/* Rank-major (W, L, C, d) <-> expert-major (L, W, C, d), one copy per block. */
static moe_status permute(const tlm *m, void *dst, const void *src, int64_t C, int to_expert_major)
{
    const int W = m->a2a_world, Le = m->local_experts;
    const uint64_t block = (uint64_t)C * (uint64_t)m->d * moe_dtype_size(m->dt);
    for (int w = 0; w < W; w++)
        for (int l = 0; l < Le; l++) {
            int64_t rm = (int64_t)w * Le + l, em = (int64_t)l * W + w;
            int64_t s = to_expert_major ? rm : em, t = to_expert_major ? em : rm;
            MOE_TRY(m->h->backend->copy(m->h->ctx, (char *)dst + (uint64_t)t * block,
                                        (const char *)src + (uint64_t)s * block, block));
        }
    return MOE_OK;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

/* With --record-a2a-perf-stats (§2.5) the forward all-to-alls are timed: the
 * host time of the call (fairseq's CPU launch time) and, with the device
 * drained before and after, the time until it completed (its CUDA event
 * interval). Both are summed per layer into a2a_ms. */
static moe_status all_to_all(tlm *m, void *recv, const void *send, int64_t C, int timed)
{
    const moe_host *h = m->h;
    if (!(timed && m->record_a2a))
        return h->comm_ops->all_to_all(h->comm, m->a2a_group, recv, send, (int64_t)m->local_experts * C * m->d,
                                       m->dt);
    MOE_TRY(h->backend->synchronize(h->ctx));
    double t0 = now_ms();
    MOE_TRY(h->comm_ops->all_to_all(h->comm, m->a2a_group, recv, send, (int64_t)m->local_experts * C * m->d, m->dt));
    double t1 = now_ms();
    MOE_TRY(h->backend->synchronize(h->ctx));
    m->a2a_ms[0] += (float)(t1 - t0);
    m->a2a_ms[1] += (float)(now_ms() - t0);
    return MOE_OK;
}

/* The grouped products of the local experts (rows_on_device): group
 * q = w L + l is rank w's chunk of local expert l (C slots at rows
 * (l W + w) C of the expert-major buffers), its rows counted in m->rows_dev
 * (W = 1) or m->rows_recv. gp(m, j) is the j-th of the six operand arrays
 * in m->gptr, filled per group; a product over groups [q0, q0 + G). */
static const void **gp(const tlm *m, int j) { return (const void **)m->gptr + (size_t)j * (size_t)m->E; }

static moe_status grouped(const tlm *m, const tlm_layer *ly, int64_t q0, int64_t G, int ta, int tb, int64_t M,
                          int64_t Nc, int64_t K,
                          float alpha, int64_t lda, int64_t ldb, float beta, int64_t ldc, moe_epilogue epi,
                          int with_bias, int with_aux, int with_dbias)
{
    moe_grouped_matmul_args g;
    memset(&g, 0, sizeof g);
    g.trans_a = ta;
    g.trans_b = tb;
    g.groups = G;
    g.rows = layer_rows(m, ly) + q0;
    g.rows_total = m->a2a_world * m->Nmax * m->width; /* each choice fills a slot at most, every rank */
    g.m = M;
    g.n = Nc;
    g.k = K;
    g.alpha = alpha;
    g.beta = beta;
    g.a = gp(m, 0) + q0;
    g.lda = lda;
    g.b = gp(m, 1) + q0;
    g.ldb = ldb;
    g.c = (void *const *)gp(m, 2) + q0;
    g.ldc = ldc;
    g.dtype = m->dt;
    g.epilogue = epi;
    g.bias = with_bias ? gp(m, 3) + q0 : NULL;
    g.aux = with_aux ? (void *const *)gp(m, 4) + q0 : NULL;
    g.act = m->act_kind;
    g.dbias = with_dbias ? (void *const *)gp(m, 5) + q0 : NULL;
    return m->h->ops->grouped_matmul(m->h->ctx, &g);
}

/* first slot row of group q in the expert-major buffers */
static int64_t group_row(const tlm *m, int64_t q, int64_t C)
{
    const int64_t L = m->local_experts, w = q / L, l = q % L;
    return (l * m->a2a_world + w) * C;
}

/* fc1 and fc2 of every local expert as grouped products over the filled
 * rows of each chunk; dropout over every slot per expert as the loop in
 * tlm_moe_forward does */
static moe_status experts_forward_grouped(tlm *m, int i, const tlm_layer *ly, tlm_acts *a, void *eout, int64_t C)
{
    const int64_t d = m->d, fe = m->fe, R = m->a2a_world * C;
    const int L = m->local_experts;
    const int64_t G = m->E;
    for (int64_t q = 0; q < G; q++) {
        const tlm_expert *x = &ly->experts[q % L];
        const int64_t r0 = group_row(m, q, C);
        gp(m, 0)[q] = tlm_off(a->xe, r0 * d, m->dt);
        gp(m, 1)[q] = tlm_param(m, x->fc1_w);
        gp(m, 2)[q] = tlm_off(a->eact, r0 * fe, m->dt);
        gp(m, 3)[q] = tlm_param(m, x->fc1_b);
        gp(m, 4)[q] = tlm_off(a->epre, r0 * fe, m->dt);
    }
    MOE_TRY(grouped(m, ly, 0, G, 0, 1, C, fe, d, 1.0f, d, d, 0.0f, fe, MOE_EPI_BIAS_ACT, 1, 1, 0));
    for (int l = 0; l < L; l++)
        MOE_TRY(tlm_dropout_fwd(m, tlm_off(a->eact, l * R * fe, m->dt), R * fe, m->p_act, i + 1, SITE_EXPERT_ACT,
                                ly->experts[l].gid));
    for (int64_t q = 0; q < G; q++) {
        const tlm_expert *x = &ly->experts[q % L];
        const int64_t r0 = group_row(m, q, C);
        gp(m, 0)[q] = tlm_off(a->eact, r0 * fe, m->dt);
        gp(m, 1)[q] = tlm_param(m, x->fc2_w);
        gp(m, 2)[q] = tlm_off(eout, r0 * d, m->dt);
        gp(m, 3)[q] = tlm_param(m, x->fc2_b);
    }
    MOE_TRY(grouped(m, ly, 0, G, 0, 1, C, d, fe, 1.0f, fe, fe, 0.0f, d, MOE_EPI_BIAS, 1, 0, 0));
    for (int l = 0; l < L; l++)
        MOE_TRY(tlm_dropout_fwd(m, tlm_off(eout, l * R * d, m->dt), R * d, m->p_drop, i + 1, SITE_EXPERT_OUT,
                                ly->experts[l].gid));
    return MOE_OK;
}

/* A weight gradient over groups: one product per source rank w, whose
 * groups (its chunks of the L experts) write distinct gradients, so the
 * chunks of one expert accumulate in turn */
static moe_status grouped_wgrad(const tlm *m, const tlm_layer *ly, int64_t M, int64_t Nc, int64_t C, float gs,
                                int64_t lda, int64_t ldb)
{
    const int64_t L = m->local_experts;
    for (int64_t w = 0; w < m->a2a_world; w++)
        MOE_TRY(grouped(m, ly, w * L, L, 1, 0, M, Nc, C, gs, lda, ldb, 1.0f, Nc, MOE_EPI_NONE, 0, 0, 1));
    return MOE_OK;
}

/* The backward of experts_forward_grouped, given the experts' output
 * gradients dxo (expert-major); writes m->d_e. The pre-activation gradient
 * overwrites the activations (a->eact), which only fc2's weight gradient
 * reads, first. Without activation dropout the activation's backward is
 * fc2's input-gradient epilogue (DACT), so no pass runs over the slots
 * past the counts. */
static moe_status experts_backward_grouped(tlm *m, int i, const tlm_layer *ly, tlm_acts *a, void *dxo, int64_t C)
{
    const moe_host *h = m->h;
    const int64_t d = m->d, fe = m->fe, R = m->a2a_world * C;
    const int L = m->local_experts;
    const int64_t G = m->E;
    const float gs = h->expert_grad_scale;
    for (int l = 0; l < L; l++) {
        void *dyo = tlm_off(dxo, l * R * d, m->dt);
        const void *dy;
        MOE_TRY(tlm_dropout_bwd(m, dyo, dyo, R * d, m->p_drop, i + 1, SITE_EXPERT_OUT, ly->experts[l].gid, &dy));
        if (dy != dyo)
            return h->error(h, MOE_ERR_INTERNAL, "%s: expected the expert output's dropout in place",
                            MOE_ARCH_VARIANT);
    }
    for (int64_t q = 0; q < G; q++) {
        const tlm_expert *x = &ly->experts[q % L];
        const int64_t r0 = group_row(m, q, C);
        gp(m, 0)[q] = tlm_off(dxo, r0 * d, m->dt);
        gp(m, 1)[q] = tlm_off(a->eact, r0 * fe, m->dt);
        gp(m, 2)[q] = tlm_grad(m, x->fc2_w);
        gp(m, 5)[q] = tlm_grad(m, x->fc2_b);
    }
    MOE_TRY(grouped_wgrad(m, ly, d, fe, C, gs, d, fe));
    /* fc2's input gradient, through the activation in its epilogue when no
     * dropout sits between them */
    const int fuse = m->p_act <= 0.0f;
    for (int64_t q = 0; q < G; q++) {
        const int64_t r0 = group_row(m, q, C);
        gp(m, 1)[q] = tlm_param(m, ly->experts[q % L].fc2_w);
        gp(m, 2)[q] = tlm_off(a->eact, r0 * fe, m->dt);
        gp(m, 4)[q] = tlm_off(a->epre, r0 * fe, m->dt);
    }
    MOE_TRY(grouped(m, ly, 0, G, 0, 0, C, fe, d, 1.0f, d, fe, 0.0f, fe, fuse ? MOE_EPI_DACT : MOE_EPI_NONE, 0, fuse,
                    0));
    for (int l = 0; l < L && !fuse; l++) {
        void *depre = tlm_off(a->eact, l * R * fe, m->dt);
        const void *dact;
        MOE_TRY(tlm_dropout_bwd(m, depre, depre, R * fe, m->p_act, i + 1, SITE_EXPERT_ACT, ly->experts[l].gid,
                                &dact));
        MOE_TRY(h->ops->act_backward(h->ctx, depre, tlm_off(a->epre, l * R * fe, m->dt), dact, R * fe, m->dt,
                                     m->act_kind));
    }
    for (int64_t q = 0; q < G; q++) {
        const tlm_expert *x = &ly->experts[q % L];
        const int64_t r0 = group_row(m, q, C);
        gp(m, 0)[q] = tlm_off(a->eact, r0 * fe, m->dt);
        gp(m, 1)[q] = tlm_off(a->xe, r0 * d, m->dt);
        gp(m, 2)[q] = tlm_grad(m, x->fc1_w);
        gp(m, 5)[q] = tlm_grad(m, x->fc1_b);
    }
    MOE_TRY(grouped_wgrad(m, ly, fe, d, C, gs, fe, d));
    for (int64_t q = 0; q < G; q++) {
        const int64_t r0 = group_row(m, q, C);
        gp(m, 1)[q] = tlm_param(m, ly->experts[q % L].fc1_w);
        gp(m, 2)[q] = tlm_off(m->d_e, r0 * d, m->dt);
    }
    return grouped(m, ly, 0, G, 0, 0, C, d, fe, 1.0f, fe, d, 0.0f, d, MOE_EPI_NONE, 0, 0, 0);
}

/* y (N,d) = MoE(h2): gate, dispatch, all-to-all, local experts, all-to-all, combine */
moe_status tlm_moe_forward(tlm *m, int i, tlm_acts *a, void *y)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    tlm_layer *ly = &m->layers[i];
    const int64_t N = m->N, d = m->d, fe = m->fe;
    const int E = m->E, W = m->a2a_world;

    if (m->dt == MOE_F32) {
        MOE_TRY(tlm_mm(m, 0, 1, N, E, d, 1.0f, a->h2, d, tlm_param(m, ly->wg), d, 0.0f, a->logits, E, m->dt, MOE_F32,
                   MOE_EPI_NONE, NULL, NULL));
    } else {
        MOE_TRY(tlm_mmp(m, 0, 1, N, E, d, 1.0f, a->h2, d, tlm_param(m, ly->wg), d, 0.0f, m->glog, E));
        MOE_TRY(ops->cast(h->ctx, a->logits, MOE_F32, m->glog, m->dt, N * E));
    }
    moe_route_args *r = &a->route;
    memset(r, 0, sizeof *r);
    MOE_TRY(m->gate_ops->configure(ly->gate, N, m->train, r));
    if (r->capacity < 1 || r->capacity > m->C || route_width(r) > m->width)
        return h->error(h, MOE_ERR_INTERNAL,
                        "%s: the gate asked for capacity %lld and %d routing columns, buffers hold 1..%lld and %lld "
                        "(setup for %lld tokens, now %lld)",
                        MOE_ARCH_VARIANT, (long long)r->capacity, route_width(r), (long long)m->C,
                        (long long)m->width, (long long)m->Nmax, (long long)N);
    r->S = N;
    r->E = E;
    r->width = m->width;
    r->seq_len = m->T;
    r->seed = m->seed;
    r->stream = tlm_stream(i + 1, SITE_GATE, m->micro, 0);
    r->logits = a->logits;
    r->pad = m->pad_mask ? m->pad_dev : NULL;
    r->probs = a->probs;
    r->expert = a->expert;
    r->slot = a->slot;
    r->weight = a->weight;
    r->l_aux = m->l_aux + ly->moe_index;
    r->metrics = m->metrics + (int64_t)ly->moe_index * MOE_NUM_METRICS;
    r->gate_metrics = m->gate_metrics + (int64_t)ly->moe_index * MOE_NUM_GATE_METRICS;
    r->workspace = a->route_ws;
    MOE_TRY(m->gate_ops->forward(ly->gate, r));
    const int64_t C = r->capacity, R = (int64_t)W * C; /* rows each local expert processes */

    void *disp = W > 1 ? m->disp : a->xe;
    MOE_TRY(tlm_dispatch_forward(m, m->width, disp, a->h2, a->expert, a->slot, N, C));
    m->a2a_ms[0] = m->a2a_ms[1] = 0.0f;
    if (W > 1) {
        void *recv = m->recv ? m->recv : a->xe;
        MOE_TRY(all_to_all(m, recv, disp, C, 1));
        if (m->recv)
            MOE_TRY(permute(m, a->xe, recv, C, 1));
    }
    void *eout = W > 1 ? m->eout : a->eback;
    const int grouped = rows_on_device(m, a, r);
    MOE_TRY(expert_rows(m, ly, a, r));
    if (grouped)
        MOE_TRY(experts_forward_grouped(m, i, ly, a, eout, C));
    for (int l = 0; l < m->local_experts && !grouped; l++) {
        const tlm_expert *x = &ly->experts[l];
        const int64_t Rl = ly->rows[l];
        if (Rl == 0)
            continue;
        void *xin = tlm_off(a->xe, l * R * d, m->dt), *pre = tlm_off(a->epre, l * R * fe, m->dt);
        void *act = a->eact ? tlm_off(a->eact, l * R * fe, m->dt) : m->depre, *o = tlm_off(eout, l * R * d, m->dt);
        MOE_TRY(tlm_mm(m, 0, 1, Rl, fe, d, 1.0f, xin, d, tlm_param(m, x->fc1_w), d, 0.0f, act, fe, m->dt, m->dt,
                   MOE_EPI_BIAS_ACT, tlm_param(m, x->fc1_b), pre));
        MOE_TRY(tlm_dropout_fwd(m, act, Rl * fe, m->p_act, i + 1, SITE_EXPERT_ACT, x->gid));
        MOE_TRY(tlm_mm(m, 0, 1, Rl, d, fe, 1.0f, act, fe, tlm_param(m, x->fc2_w), fe, 0.0f, o, d, m->dt, m->dt,
                   MOE_EPI_BIAS, tlm_param(m, x->fc2_b), NULL));
        MOE_TRY(tlm_dropout_fwd(m, o, Rl * d, m->p_drop, i + 1, SITE_EXPERT_OUT, x->gid));
    }
    if (W > 1) {
        void *send = eout;
        if (m->eperm) {
            MOE_TRY(permute(m, m->eperm, eout, C, 0));
            send = m->eperm;
        }
        MOE_TRY(all_to_all(m, a->eback, send, C, 1));
    }
    if (m->record_a2a) /* into this layer's metrics, after the gate wrote the others */
        MOE_TRY(h->backend->copy_from_host(h->ctx, r->metrics + MOE_METRIC_A2A_CPU_MS, m->a2a_ms, sizeof m->a2a_ms));
    return tlm_combine_forward(m, m->width, y, a->eback, a->expert, a->slot, a->weight, N, C);
}

/* --------------------------------------------------------------- backward */

/* dbias(C) += s * column sums of dy(R,C), s = host->expert_grad_scale: an
 * expert's gradient contribution is scaled as it arrives, as fairseq's hook
 * does (the weight GEMMs take s as alpha) */
static moe_status expert_bias_backward(const tlm *m, void *dbias, const void *dy, int64_t R, int64_t C)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    const float s = h->expert_grad_scale;
    if (s == 1.0f)
        return ops->bias_backward(h->ctx, dbias, dy, R, C, m->dt);
    MOE_TRY(ops->fill(h->ctx, m->ebias, m->dt, C, 0.0f));
    MOE_TRY(ops->bias_backward(h->ctx, m->ebias, dy, R, C, m->dt));
    return ops->axpby(h->ctx, dbias, m->ebias, m->dt, C, s, 1.0f);
}

/* dh (N,d) = d loss / d h2 through the MoE layer, given dy = m->dres */
moe_status tlm_moe_backward(tlm *m, int i, tlm_acts *a, float dl_aux)
{
    const moe_host *h = m->h;
    const moe_ops *ops = h->ops;
    tlm_layer *ly = &m->layers[i];
    const int64_t N = m->N, d = m->d, fe = m->fe;
    const int E = m->E, W = m->a2a_world;
    const moe_route_args *r = &a->route;
    const int64_t C = r->capacity, R = (int64_t)W * C;
    const float gs = h->expert_grad_scale;

    if (a->xe == m->xes) /* not kept: the same dispatch of the recomputed h2 (layer_backward) */
        MOE_TRY(tlm_dispatch_forward(m, m->width, a->xe, a->h2, a->expert, a->slot, N, C));

    /* combine -> all-to-all -> expert-major */
    if (ops->combine_wide_backward)
        MOE_TRY(ops->combine_wide_backward(h->ctx, m->d_a, m->dweight, m->dres, a->eback, a->expert, a->slot,
                                           a->weight, N, m->width, E, C, d, m->dt));
    else
        MOE_TRY(ops->combine_backward(h->ctx, m->d_a, m->dweight, m->dres, a->eback, a->expert, a->slot, a->weight, N,
                                      E, C, d, m->dt));
    void *dxo = m->d_a;
    if (W > 1) {
        MOE_TRY(all_to_all(m, m->d_b, m->d_a, C, 0));
        dxo = m->d_b;
        if (m->d_c) {
            MOE_TRY(permute(m, m->d_c, m->d_b, C, 1));
            dxo = m->d_c;
        }
    }
    const int grouped = rows_on_device(m, a, r); /* with the counts of the forward */
    if (grouped)
        MOE_TRY(experts_backward_grouped(m, i, ly, a, dxo, C));
    for (int l = 0; l < m->local_experts && !grouped; l++) {
        const tlm_expert *x = &ly->experts[l];
        const int64_t Rl = ly->rows[l]; /* as the forward set them */
        if (Rl == 0)
            continue;
        void *dyo = tlm_off(dxo, l * R * d, m->dt);
        const void *xin = tlm_off(a->xe, l * R * d, m->dt), *pre = tlm_off(a->epre, l * R * fe, m->dt);
        const void *act = a->eact ? tlm_off(a->eact, l * R * fe, m->dt) : m->depre;
        const void *dy;
        MOE_TRY(tlm_dropout_bwd(m, dyo, dyo, Rl * d, m->p_drop, i + 1, SITE_EXPERT_OUT, x->gid, &dy));
        if (!a->eact) /* not kept: recomputed into the scratch fc2's input gradient then overwrites */
            MOE_TRY(ops->act_forward(h->ctx, m->depre, pre, Rl * fe, m->dt, m->act_kind));
        MOE_TRY(tlm_mmp(m, 1, 0, d, fe, Rl, gs, dy, d, act, fe, 1.0f, tlm_grad(m, x->fc2_w), fe));
        MOE_TRY(expert_bias_backward(m, tlm_grad(m, x->fc2_b), dy, Rl, d));
        MOE_TRY(tlm_mmp(m, 0, 0, Rl, fe, d, 1.0f, dy, d, tlm_param(m, x->fc2_w), fe, 0.0f, m->depre, fe));
        const void *dact;
        MOE_TRY(tlm_dropout_bwd(m, m->depre, m->depre, Rl * fe, m->p_act, i + 1, SITE_EXPERT_ACT, x->gid, &dact));
        MOE_TRY(ops->act_backward(h->ctx, m->depre, pre, dact, Rl * fe, m->dt, m->act_kind));
        MOE_TRY(tlm_mmp(m, 1, 0, fe, d, Rl, gs, m->depre, fe, xin, d, 1.0f, tlm_grad(m, x->fc1_w), d));
        MOE_TRY(expert_bias_backward(m, tlm_grad(m, x->fc1_b), m->depre, Rl, fe));
        MOE_TRY(tlm_mmp(m, 0, 0, Rl, d, fe, 1.0f, m->depre, fe, tlm_param(m, x->fc1_w), d, 0.0f, tlm_off(m->d_e, l * R * d, m->dt), d));
    }
    /* expert-major -> all-to-all back -> dispatch */
    const void *dxg = m->d_e;
    if (W > 1) {
        const void *send = m->d_e;
        if (m->d_c) {
            MOE_TRY(permute(m, m->d_b, m->d_e, C, 0));
            send = m->d_b;
        }
        MOE_TRY(all_to_all(m, m->d_a, send, C, 0));
        dxg = m->d_a;
    }
    MOE_TRY(ops->fill(h->ctx, m->dh, m->dt, N * d, 0.0f));
    if (ops->dispatch_wide_backward)
        MOE_TRY(ops->dispatch_wide_backward(h->ctx, m->dh, dxg, a->expert, a->slot, N, m->width, E, C, d, m->dt));
    else
        MOE_TRY(ops->dispatch_backward(h->ctx, m->dh, dxg, a->expert, a->slot, N, E, C, d, m->dt));

    /* gate: routing weights and l_aux -> logits -> x and wg */
    MOE_TRY(m->gate_ops->backward(ly->gate, r, m->dweight, dl_aux, m->dlogits));
    const void *dlog = m->dlogits;
    if (m->dt != MOE_F32) {
        MOE_TRY(ops->cast(h->ctx, m->dlog, m->dt, m->dlogits, MOE_F32, N * E));
        dlog = m->dlog;
    }
    MOE_TRY(tlm_mmp(m, 0, 0, N, d, E, 1.0f, dlog, E, tlm_param(m, ly->wg), d, 1.0f, m->dh, d));
    MOE_TRY(tlm_mmp(m, 1, 0, E, d, N, 1.0f, dlog, E, a->h2, d, 1.0f, tlm_grad(m, ly->wg), d));
    return MOE_OK;
}
