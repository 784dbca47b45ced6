/* top1.c: the top-1 gate plugin (libmoe-gate-top1.so), fairseq's Top1Gate
 * selected by --moe-top1-expert (FAIRSEQ_SPEC.md §2.3): each token goes to
 * its most probable expert with the raw probability as combine weight.
 *
 * It decides the routing's policy only (capacity, flags); the routing itself
 * is the backend's route_forward and route_backward (kernels/cpu/route.c is
 * the reference).
 *
 * Conventions a reader would trip over:
 *  - Training capacity is ceil(S / E): fairseq's capacity_factor is fixed at
 *    1.0 with no flag.
 *  - --moe-normalize-gate-prob-before-dropping and
 *    --moe-batch-prioritized-routing are accepted, as fairseq accepts them with
 *    --moe-top1-expert, and have no effect, as in fairseq's top1gating; init
 *    says so in a warning rather than ignoring them silently.
 *  - Top-1 produces no overflow metrics and no second-expert metrics; they
 *    log as 0 (route_forward writes 0).
 */
#include <math.h>
#include <stdlib.h>

#include "moe/plugin.h"

typedef struct top1_gate {
    const moe_host *h;
    int num_experts;
    double eval_fraction;    /* --moe-eval-capacity-token-fraction */
} top1_gate;

static const moe_option top1_options[] = {
    {"moe-second-expert-policy", MOE_OPT_CHOICE, "sampling",
     "policy for the second expert (top-2 only; accepted with --moe-top1-expert as fairseq does)", 0, 0,
     "sampling|all|random"},
    {"moe-normalize-gate-prob-before-dropping", MOE_OPT_FLAG, NULL,
     "normalize the two gate probabilities before capacity and random dropping, and not after (top-2 only)", 0,
     0, NULL},
    {"moe-batch-prioritized-routing", MOE_OPT_FLAG, NULL,
     "assign expert capacity in order of descending max gate probability instead of token order (top-2 only)", 0,
     0, NULL},
    {"moe-eval-capacity-token-fraction", MOE_OPT_FLOAT, "0.25",
     "expert capacity at evaluation as a fraction of the tokens (ceil(fraction * tokens)); <= 0 uses the "
     "training capacity (an expert never receives more than all the tokens, hence at most 1)",
     -1.0, 1.0, NULL},
};

static moe_status top1_init(const moe_host *h, int num_experts, void **out)
{
    *out = NULL;
    if (num_experts < 1)
        return h->error(h, MOE_ERR_INVALID_ARG, "gate top1: expected --moe-expert-count >= 1, found %d",
                        num_experts);
    top1_gate *g = calloc(1, sizeof *g);
    if (g == NULL)
        return h->error(h, MOE_ERR_NOMEM, "gate top1: out of host memory allocating the gate (%zu bytes)",
                        sizeof *g);
    g->h = h;
    g->num_experts = num_experts;
    g->eval_fraction = h->opt_float(h, "moe-eval-capacity-token-fraction");
    static const char *const ignored[] = {"moe-normalize-gate-prob-before-dropping",
                                          "moe-batch-prioritized-routing"};
    for (int i = 0; i < 2; i++)
        if (h->opt_flag(h, ignored[i]) && h->log != NULL)
            h->log(h, MOE_LOG_WARNING, "fairseq.modules.moe.top1gate",
                   "--%s has no effect with --moe-top1-expert (as in fairseq)", ignored[i]);
    *out = g;
    return MOE_OK;
}

static void top1_destroy(void *gate) { free(gate); }

static moe_status top1_configure(void *gate, int64_t S, int train, moe_route_args *a)
{
    top1_gate *g = gate;
    if (S < 1)
        return g->h->error(g->h, MOE_ERR_INVALID_ARG, "gate top1: expected at least one token to route, found %lld",
                           (long long)S);
    a->S = S;
    a->E = g->num_experts;
    a->k = 1;
    a->policy = MOE_ROUTE_ALL; /* unused with k = 1 */
    a->normalize_before_drop = 0;
    a->batch_prioritized = 0;
    if (!train && g->eval_fraction > 0.0)
        a->capacity = (int64_t)ceil(g->eval_fraction * (double)S);
    else
        a->capacity = (S + g->num_experts - 1) / g->num_experts;
    a->seed = g->h->step_seed(g->h);
    return MOE_OK;
}

static moe_status top1_forward(void *gate, const moe_route_args *a)
{
    top1_gate *g = gate;
    return g->h->ops->route_forward(g->h->ctx, a);
}

static moe_status top1_backward(void *gate, const moe_route_args *a, const float *dweight, float dl_aux,
                                float *dlogits)
{
    top1_gate *g = gate;
    return g->h->ops->route_backward(g->h->ctx, a, dweight, dl_aux, dlogits);
}

static const moe_gate_ops top1_ops = {top1_init, top1_destroy, top1_configure, top1_forward, top1_backward};

MOE_PLUGIN_DEFINE(MOE_KIND_GATE, moe_gate_ops, "top1", "1.0",
                  "top-1 gating (Switch; fairseq Top1Gate, --moe-top1-expert): raw probability as combine weight",
                  top1_options, (int)(sizeof top1_options / sizeof top1_options[0]), NULL, NULL, &top1_ops)
