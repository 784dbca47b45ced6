/* topk.c: the general top-k gate plugin (libmoe-gate-topk.so, --moe-moe_gate_base
 * topk) with Megatron-Core's router flags: any k, softmax or sigmoid scores,
 * router z-loss, GShard/Switch load-balancing loss per batch or per
 * sequence, group-limited routing, and DeepSeek-V3's aux-loss-free
 * balancing (a per-expert bias that selects experts but does not weigh them).
 *
 * It is only settings of the shared gate (gate_common.h); the math is the
 * backend's route_forward/route_backward with moe_route_args.topk = 1
 * (kernels/cpu/route.c documents it).
 *
 * Conventions a reader would trip over:
 *  - Weights follow Megatron-Core: softmax scores are renormalised over the
 *    k choices (a softmax of the chosen logits) unless
 *    --moe-router-pre-softmax; sigmoid scores are divided by their sum over
 *    the k choices (plus 1e-20) when k > 1 and used raw at k = 1. Hence
 *    softmax at k = 1 without --moe-router-pre-softmax weighs every token 1.
 *  - Training capacity is ceil(--moe-expert-capacity-factor * k * ceil(S / E)),
 *    k * ceil(S / E) by default as top-2's 2 * ceil(S / E); factor 0 drops
 *    nothing (capacity S). --moe-dropless replaces it with its bound
 *    (gate.h) and refuses a factor other than the default alongside.
 *  - The load-balancing loss is l_aux (weighted by the criterion's
 *    --moe-gate-loss-wt, as fairseq's); the z-loss is added to l_aux, so its
 *    weight in the loss is --moe-z-loss-coeff times --moe-gate-loss-wt, and
 *    it is logged on its own as z_loss.
 *  - --moe-aux-loss-type seq needs the caller to set moe_route_args.seq_len.
 *  - The expert bias starts at 0 and moves only through moe_gate_ops.update,
 *    once per update, from the loads of the training forwards since the last
 *    update (summed over the ranks).
 */
#include <string.h>

#include "moe/gate.h"

static const moe_option topk_options[] = {
    {"moe-router-topk", MOE_OPT_INT, "2", "number of experts each token is routed to (1 .. --moe-expert-count)", 1,
     1 << 20, NULL},
    {"moe-router-score-function", MOE_OPT_CHOICE, "softmax",
     "router scores: softmax over the experts, or a sigmoid per expert (DeepSeek-V3)", 0, 0, "softmax|sigmoid"},
    {"moe-router-pre-softmax", MOE_OPT_FLAG, NULL,
     "softmax scores: weigh the k choices by their softmax over all experts instead of renormalising them over "
     "the k (Megatron-Core's flag)",
     0, 0, NULL},
    {"moe-z-loss-coeff", MOE_OPT_FLOAT, "0",
     "router z-loss coefficient: coeff * mean over tokens of logsumexp(logits)^2 is added to the gate loss", 0.0,
     1e6, NULL},
    {"moe-aux-loss-type", MOE_OPT_CHOICE, "batch",
     "load-balancing loss E * sum_e f_e P_e over the batch (GShard/Switch), per sequence averaged over the "
     "sequences (DeepSeek-V3), or none",
     0, 0, "batch|seq|none"},
    {"moe-router-num-groups", MOE_OPT_INT, NULL,
     "group-limited routing: split the experts into this many groups of consecutive experts", 1,
     64, NULL},
    {"moe-router-group-topk", MOE_OPT_INT, NULL,
     "group-limited routing: route each token within the groups of largest sum of their top (k / this) scores",
     1, 64, NULL},
    {"moe-router-enable-expert-bias", MOE_OPT_FLAG, NULL,
     "aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores to select experts (not to "
     "weigh them), moved each update towards balanced loads",
     0, 0, NULL},
    {"moe-router-bias-update-rate", MOE_OPT_FLOAT, "0.001",
     "expert bias update per update: bias += rate * sign(mean load - load of the expert)", 0.0, 1e6, NULL},
    {"moe-expert-capacity-factor", MOE_OPT_FLOAT, "1.0",
     "training capacity ceil(factor * k * ceil(tokens / experts)); 0 drops no token (capacity = tokens)", 0.0,
     1e6, NULL},
    MOE_GATE_OPT_EVAL_CAPACITY,
    MOE_GATE_OPT_DROPLESS,
};

static const char *const topk_log_fields[] = {"z_loss", NULL};

static int opt_int_or(const moe_host *h, const char *name, int none)
{
    return h->opt_set(h, name) ? (int)h->opt_int(h, name) : none;
}

static moe_status topk_init(const moe_host *h, int num_experts, void **out)
{
    *out = NULL;
    const int k = opt_int_or(h, "moe-router-topk", 2), E = num_experts;
    if (k < 1 || k > E)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate topk: expected 1 <= --moe-router-topk <= --moe-expert-count (%d), found %d", E, k);
    const char *score = h->opt_str(h, "moe-router-score-function");
    const int sigmoid = score != NULL && strcmp(score, "sigmoid") == 0;
    if (score != NULL && !sigmoid && strcmp(score, "softmax") != 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate topk: expected --moe-router-score-function softmax or sigmoid, found '%s'", score);
    const int pre_softmax = h->opt_flag(h, "moe-router-pre-softmax");
    if (sigmoid && pre_softmax)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate topk: expected --moe-router-pre-softmax only with softmax scores, found it with "
                        "--moe-router-score-function sigmoid");
    const char *aux = h->opt_str(h, "moe-aux-loss-type");
    moe_route_aux aux_type = MOE_AUX_BATCH;
    if (aux != NULL && strcmp(aux, "seq") == 0)
        aux_type = MOE_AUX_SEQ;
    else if (aux != NULL && strcmp(aux, "none") == 0)
        aux_type = MOE_AUX_NONE;
    else if (aux != NULL && strcmp(aux, "batch") != 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "gate topk: expected --moe-aux-loss-type batch, seq or none, found '%s'",
                        aux);
    const int G = opt_int_or(h, "moe-router-num-groups", 0), Gk = opt_int_or(h, "moe-router-group-topk", 0);
    if ((G > 0) != (Gk > 0))
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate topk: expected --moe-router-num-groups and --moe-router-group-topk together, found "
                        "only %s",
                        G > 0 ? "--moe-router-num-groups" : "--moe-router-group-topk");
    if (G > 0 && E % G != 0)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate topk: expected --moe-router-num-groups dividing --moe-expert-count %d, found %d", E, G);
    if (G > 0 && (Gk > G || Gk > k || Gk * (E / G) < k))
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate topk: expected --moe-router-group-topk at most --moe-router-num-groups (%d) and "
                        "--moe-router-topk (%d), with groups holding at least k experts (%d each), found %d",
                        G, k, E / G, Gk);

    moe_gate_base *g;
    MOE_TRY(moe_gate_create(h, "topk", E, 1, "", &g));
    moe_route_args *r = &g->route;
    r->topk = 1;
    r->k = k;
    r->score = sigmoid ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    r->renormalize = sigmoid ? k > 1 : !pre_softmax;
    r->z_loss_coeff = (float)h->opt_float(h, "moe-z-loss-coeff");
    r->aux = aux_type;
    r->num_groups = G;
    r->group_topk = Gk;
    g->capacity_factor = h->opt_set(h, "moe-expert-capacity-factor") ? h->opt_float(h, "moe-expert-capacity-factor")
                                                                      : 1.0;
    if (g->dropless && g->capacity_factor != 1.0) {
        moe_gate_destroy(g);
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate topk: expected no --moe-expert-capacity-factor with --moe-dropless (the bound is "
                        "--moe-dropless-capacity-factor), found --moe-expert-capacity-factor %g",
                        h->opt_float(h, "moe-expert-capacity-factor"));
    }
    if (h->opt_flag(h, "moe-router-enable-expert-bias")) {
        moe_status st = moe_gate_enable_expert_bias(g, (float)h->opt_float(h, "moe-router-bias-update-rate"));
        if (st != MOE_OK) {
            moe_gate_destroy(g);
            return st;
        }
    }
    *out = g;
    return MOE_OK;
}

static const moe_gate_ops topk_ops = MOE_GATE_OPS(topk_init, topk_log_fields);

MOE_PLUGIN_DEFINE(MOE_KIND_GATE, moe_gate_ops, "topk", "1.0",
                  "top-k gating with Megatron-Core's router options: softmax or sigmoid scores, z-loss, batch or "
                  "sequence load-balancing loss, group-limited routing, aux-loss-free expert bias",
                  topk_options, (int)(sizeof topk_options / sizeof topk_options[0]), NULL, NULL, &topk_ops)
