/* top2.c: the top-2 gate plugin (libmoe-gate-top2.so), fairseq's Top2Gate
 * (FAIRSEQ_SPEC.md §2.2, §2.7): each token goes to its two most probable
 * experts, the second chosen by the --moe-second-expert-policy.
 *
 * It is only settings of the shared gate (gate_common.h): k = 2 of
 * fairseq's router, the policy and flags. The routing itself is the
 * backend's route_forward and route_backward (kernels/cpu/route.c is the
 * reference); the gate projection wg belongs to the arch.
 *
 * Conventions a reader would trip over:
 *  - The per-update seed and the caller's stream both enter the noise, so the
 *    layers draw independent noise and a recomputed layer
 *    (--checkpoint-activations) draws the same noise again (gate_common.h).
 *  - There is no capacity-factor option, as in fairseq: training capacity is
 *    2 * ceil(S / E); --moe-dropless replaces it with its bound (gate.h).
 */
#include <string.h>

#include "moe/gate.h"

static const moe_option top2_options[] = {
    {"moe-second-expert-policy", MOE_OPT_CHOICE, "sampling",
     "policy for the second expert: sampling (Gumbel noise on the logits), all (always the second-best), "
     "random (second-best, kept with probability min(1, 2 p2))",
     0, 0, "sampling|all|random"},
    {"moe-normalize-gate-prob-before-dropping", MOE_OPT_FLAG, NULL,
     "normalize the two gate probabilities before capacity and random dropping, and not after", 0, 0, NULL},
    {"moe-batch-prioritized-routing", MOE_OPT_FLAG, NULL,
     "assign expert capacity in order of descending max gate probability instead of token order", 0, 0, NULL},
    MOE_GATE_OPT_EVAL_CAPACITY,
    MOE_GATE_OPT_DROPLESS,
};

static moe_status top2_init(const moe_host *h, int num_experts, void **out)
{
    *out = NULL;
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
    moe_gate_base *g;
    MOE_TRY(moe_gate_create(h, "top2", num_experts, 2, "; use --moe-top1-expert for a single expert", &g));
    g->route.k = 2;
    g->route.policy = p;
    g->route.normalize_before_drop = h->opt_flag(h, "moe-normalize-gate-prob-before-dropping");
    g->route.batch_prioritized = h->opt_flag(h, "moe-batch-prioritized-routing");
    *out = g;
    return MOE_OK;
}

static const moe_gate_ops top2_ops = MOE_GATE_OPS(top2_init, NULL);

MOE_PLUGIN_DEFINE(MOE_KIND_GATE, moe_gate_ops, "top2", "1.0",
                  "top-2 gating (GShard; fairseq Top2Gate) with second-expert policies sampling, all, random",
                  top2_options, (int)(sizeof top2_options / sizeof top2_options[0]), NULL, NULL, &top2_ops)
