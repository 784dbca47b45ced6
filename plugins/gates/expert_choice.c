/* expert_choice.c: the expert-choice gate plugin (libmoe-gate-expert_choice.so,
 * --moe-gate expert_choice; Zhou et al. 2022, "Mixture-of-Experts with Expert
 * Choice Routing"): every expert takes the C tokens of the micro-batch with
 * the largest softmax score for it, and a token's output is the sum of the
 * outputs of the experts that took it, each weighed by the token's score.
 *
 * It is settings of the shared gate (gate_common.h) and its own configure;
 * the math is the backend's route_forward/route_backward with
 * moe_route_args.expert_choice = 1 (kernels/cpu/route.c documents it).
 *
 * Conventions a reader would trip over:
 *  - Capacity C = ceil(--moe-expert-capacity-factor * S / E), at most S: on
 *    average a token gets `factor` experts. The default 2 is the paper's
 *    EC-CF2, the compute of top-2 routing.
 *  - The same C holds in evaluation, unless
 *    --moe-eval-capacity-token-fraction f is given: then C = ceil(f * S),
 *    as the other gates' evaluation capacity.
 *  - Routing is per forward call: an expert chooses among all the tokens of
 *    the micro-batch, later positions and other sequences included, so in a
 *    causal LM a token's routing depends on tokens after it. Decoding token
 *    by token cannot reproduce that; the arch refuses to decode with it.
 *  - The routing arrays hold E columns per token (moe_route_args.width = E):
 *    column e is expert e, its slot the token's rank among e's C tokens.
 *  - There is no load-balancing loss (l_aux is 0) and nothing overflows;
 *    overflow_expert1 logs the percentage of tokens no expert took.
 *  - --moe-dropless is declared only to be refused with a message: each
 *    expert takes a fixed C tokens, so the choice of tokens is the capacity.
 */
#include <math.h>

#include "moe/gate.h"

static const moe_option ec_options[] = {
    {"moe-expert-capacity-factor", MOE_OPT_FLOAT, "2.0",
     "tokens each expert takes: ceil(factor * tokens / experts), at most all; a token gets `factor` experts on "
     "average (2: the paper's EC-CF2)",
     1e-6, 1e6, NULL},
    {"moe-eval-capacity-token-fraction", MOE_OPT_FLOAT, "0",
     "expert capacity at evaluation as a fraction of the tokens (ceil(fraction * tokens)); <= 0 uses the "
     "training capacity",
     -1.0, 1.0, NULL},
    MOE_GATE_OPT_DROPLESS,
};

static moe_status ec_init(const moe_host *h, int num_experts, void **out)
{
    moe_gate_base *g;
    MOE_TRY(moe_gate_create(h, "expert_choice", num_experts, 1, "", &g));
    if (g->dropless) {
        moe_gate_destroy(g);
        return h->error(h, MOE_ERR_INVALID_ARG,
                        "gate expert_choice: expected --moe-dropless only with the top1, top2 or topk gate, found it "
                        "with expert choice, where each expert takes a fixed number of tokens; raise "
                        "--moe-expert-capacity-factor instead");
    }
    g->capacity_factor = h->opt_float(h, "moe-expert-capacity-factor");
    *out = g;
    return MOE_OK;
}

static moe_status ec_configure(void *gate_, int64_t S, int train, moe_route_args *a)
{
    moe_gate_base *g = gate_;
    MOE_TRY(moe_gate_configure(g, S, train, a));
    a->expert_choice = 1;
    a->width = g->num_experts;
    if (train || !(g->eval_fraction > 0.0))
        a->capacity = (int64_t)ceil(g->capacity_factor * (double)S / (double)g->num_experts);
    if (a->capacity < 1)
        a->capacity = 1;
    if (a->capacity > S)
        a->capacity = S;
    return MOE_OK;
}

static const moe_gate_ops ec_ops = {ec_init,      moe_gate_destroy, ec_configure, moe_gate_forward,
                                    moe_gate_backward, NULL,         moe_gate_update,  moe_gate_state};

MOE_PLUGIN_DEFINE(MOE_KIND_GATE, moe_gate_ops, "expert_choice", "1.0",
                  "expert-choice routing (Zhou et al. 2022): each expert takes its top tokens by softmax score; "
                  "no overflow, no load-balancing loss",
                  ec_options, (int)(sizeof ec_options / sizeof ec_options[0]), NULL, NULL, &ec_ops)
