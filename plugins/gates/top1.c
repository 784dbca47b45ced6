/* top1.c: the top-1 gate plugin (libmoe-gate-top1.so), fairseq's Top1Gate
 * selected by --moe-top1-expert (FAIRSEQ_SPEC.md §2.3): each token goes to
 * its most probable expert with the raw probability as combine weight.
 *
 * It is only settings of the shared gate (gate_common.h): k = 1 of
 * fairseq's router. The routing itself is the backend's route_forward and
 * route_backward (kernels/cpu/route.c is the reference).
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
 *  - With --moe-dropless it routes through the general top-k router at
 *    k = 1 with the raw softmax probability as weight: the same choice,
 *    weight and load-balancing loss, and the router reports
 *    overflow_expert1, which the trainer's capacity check reads (gate.h).
 */
#include "moe/gate.h"

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
    MOE_GATE_OPT_EVAL_CAPACITY,
    MOE_GATE_OPT_DROPLESS,
};

static moe_status top1_init(const moe_host *h, int num_experts, void **out)
{
    moe_gate_base *g;
    MOE_TRY(moe_gate_create(h, "top1", num_experts, 1, "", &g));
    g->route.k = 1;
    g->route.policy = MOE_ROUTE_ALL; /* unused with k = 1 */
    if (g->dropless) {
        g->route.topk = 1;
        g->route.score = MOE_SCORE_SOFTMAX;
        g->route.renormalize = 0;
        g->route.aux = MOE_AUX_BATCH;
    }
    static const char *const ignored[] = {"moe-normalize-gate-prob-before-dropping",
                                          "moe-batch-prioritized-routing"};
    for (int i = 0; i < 2; i++)
        if (h->opt_flag(h, ignored[i]) && h->log != NULL)
            h->log(h, MOE_LOG_WARNING, "fairseq.modules.moe.top1gate",
                   "--%s has no effect with --moe-top1-expert (as in fairseq)", ignored[i]);
    *out = g;
    return MOE_OK;
}

static const moe_gate_ops top1_ops = MOE_GATE_OPS(top1_init, NULL);

MOE_PLUGIN_DEFINE(MOE_KIND_GATE, moe_gate_ops, "top1", "1.0",
                  "top-1 gating (Switch; fairseq Top1Gate, --moe-top1-expert): raw probability as combine weight",
                  top1_options, (int)(sizeof top1_options / sizeof top1_options[0]), NULL, NULL, &top1_ops)
