/* top2.c: the top-2 gate plugin (libmoe-gate-top2.so), fairseq's Top2Gate
 * (FAIRSEQ_SPEC.md §2.2, §2.7): each token goes to its two most probable
 * experts, the second chosen by the --moe-second-expert-policy.
 *
 * It decides the routing's policy only: capacity (step 4), policy, flags and
 * the per-update seed. The routing itself is the backend's route_forward and
 * route_backward (kernels/cpu/route.c is the reference); the gate projection
 * wg belongs to the arch.
 *
 * Conventions a reader would trip over:
 *  - configure() sets a->seed to the per-update seed (fairseq reseeds its RNG
 *    with seed + num_updates every update) and leaves a->stream to the caller,
 *    which knows the layer and micro-batch: both must enter the stream so the
 *    layers draw independent noise and a recomputed layer
 *    (--checkpoint-activations) draws the same noise again.
 *  - There is no capacity-factor option, as in fairseq: training capacity is
 *    2 * ceil(S / E).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"

typedef struct top2_gate {
    const moe_host *h;
    int num_experts;
    moe_route_policy policy;
    int normalize_before_drop;
    int batch_prioritized;
    double eval_fraction;    /* --moe-eval-capacity-token-fraction */
} top2_gate;

static const moe_option top2_options[] = {
    {"moe-second-expert-policy", MOE_OPT_CHOICE, "sampling",
     "policy for the second expert: sampling (Gumbel noise on the logits), all (always the second-best), "
     "random (second-best, kept with probability min(1, 2 p2))",
     0, 0, "sampling|all|random"},
    {"moe-normalize-gate-prob-before-dropping", MOE_OPT_FLAG, NULL,
     "normalize the two gate probabilities before capacity and random dropping, and not after", 0, 0, NULL},
    {"moe-batch-prioritized-routing", MOE_OPT_FLAG, NULL,
     "assign expert capacity in order of descending max gate probability instead of token order", 0, 0, NULL},
    {"moe-eval-capacity-token-fraction", MOE_OPT_FLOAT, "0.25",
     "expert capacity at evaluation as a fraction of the tokens (ceil(fraction * tokens)); <= 0 uses the "
     "training capacity (an expert never receives more than all the tokens, hence at most 1)",
     -1.0, 1.0, NULL},
};

static moe_status top2_init(const moe_host *h, int num_experts, void **out)
{
    *out = NULL;
    if (num_experts < 2)
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate top2: expected --moe-expert-count >= 2 for top-2 gating, found %d; use "
                        "--moe-top1-expert for a single expert",
                        num_experts);
    const char *policy = h->opt_str(h, "moe-second-expert-policy");
    moe_route_policy p;
    if (policy == NULL || strcmp(policy, "sampling") == 0)
        p = MOE_ROUTE_SAMPLING;
    else if (strcmp(policy, "all") == 0)
        p = MOE_ROUTE_ALL;
    else if (strcmp(policy, "random") == 0)
        p = MOE_ROUTE_RANDOM;
    else
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate top2: expected --moe-second-expert-policy sampling, all or random, found '%s'", policy);
    top2_gate *g = calloc(1, sizeof *g);
    if (g == NULL)
        return h->error(h, MOE_ERR_NOMEM, "gate top2: out of host memory allocating the gate (%zu bytes)",
                        sizeof *g);
    g->h = h;
    g->num_experts = num_experts;
    g->policy = p;
    g->normalize_before_drop = h->opt_flag(h, "moe-normalize-gate-prob-before-dropping");
    g->batch_prioritized = h->opt_flag(h, "moe-batch-prioritized-routing");
    g->eval_fraction = h->opt_float(h, "moe-eval-capacity-token-fraction");
    *out = g;
    return MOE_OK;
}

static void top2_destroy(void *gate) { free(gate); }

static moe_status top2_configure(void *gate, int64_t S, int train, moe_route_args *a)
{
    top2_gate *g = gate;
    if (S < 1)
        return g->h->error(g->h, MOE_ERR_INVALID_ARG, "gate top2: expected at least one token to route, found %lld",
                           (long long)S);
    a->S = S;
    a->E = g->num_experts;
    a->k = 2;
    a->policy = g->policy;
    a->normalize_before_drop = g->normalize_before_drop;
    a->batch_prioritized = g->batch_prioritized;
    if (!train && g->eval_fraction > 0.0)
        a->capacity = (int64_t)ceil(g->eval_fraction * (double)S);
    else
        a->capacity = 2 * ((S + g->num_experts - 1) / g->num_experts);
    a->seed = g->h->step_seed(g->h);
    return MOE_OK;
}

static moe_status top2_forward(void *gate, const moe_route_args *a)
{
    top2_gate *g = gate;
    return g->h->ops->route_forward(g->h->ctx, a);
}

static moe_status top2_backward(void *gate, const moe_route_args *a, const float *dweight, float dl_aux,
                                float *dlogits)
{
    top2_gate *g = gate;
    return g->h->ops->route_backward(g->h->ctx, a, dweight, dl_aux, dlogits);
}

static const moe_gate_ops top2_ops = {top2_init, top2_destroy, top2_configure, top2_forward, top2_backward};

MOE_PLUGIN_DEFINE(MOE_KIND_GATE, moe_gate_ops, "top2", "1.0",
                  "top-2 gating (GShard; fairseq Top2Gate) with second-expert policies sampling, all, random",
                  top2_options, (int)(sizeof top2_options / sizeof top2_options[0]), NULL, NULL, &top2_ops)
