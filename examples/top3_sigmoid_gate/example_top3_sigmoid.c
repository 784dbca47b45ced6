/* example_top3_sigmoid.c: a gate plugin built outside the moelm tree
 * (--moe-gate example_top3_sigmoid). Each token goes to its three experts of
 * largest sigmoid score, weighed by those scores divided by their sum
 * (DeepSeek-V3's router without its bias), with a z-loss on the logits and
 * a training capacity of --example-capacity-factor times 3 * ceil(S / E).
 *
 * A gate is its options and an init that turns them into routing settings;
 * everything else (configure, the backend's routing ops, backward, the
 * expert-bias update, checkpoint state) is the gate SDK's (moe/gate.h),
 * which moelm_add_plugin(gate ...) compiles in.
 */
#include <moe/gate.h>

static const moe_option options[] = {
    {"example-capacity-factor", MOE_OPT_FLOAT, "1.25",
     "training capacity: this times 3 * ceil(tokens / experts); 0 drops no token", 0.0, 64.0, NULL},
    MOE_GATE_OPT_EVAL_CAPACITY,
};

static moe_status init(const moe_host *h, int num_experts, void **out)
{
    moe_gate_base *g;
    MOE_TRY(moe_gate_create(h, "example_top3_sigmoid", num_experts, 3, "; three experts a token need three", &g));
    g->route.topk = 1;               /* the general top-k router (ops.h, moe_route_args) */
    g->route.k = 3;
    g->route.score = MOE_SCORE_SIGMOID;
    g->route.renormalize = 1;
    g->route.z_loss_coeff = 1e-3f;
    g->route.aux = MOE_AUX_BATCH;
    g->capacity_factor = h->opt_float(h, "example-capacity-factor");
    *out = g;
    return MOE_OK;
}

static const char *const log_fields[] = {"z_loss", NULL};
static const moe_gate_ops ops = MOE_GATE_OPS(init, log_fields);

MOE_PLUGIN_DEFINE(MOE_KIND_GATE, moe_gate_ops, "example_top3_sigmoid", "1.0",
                  "example gate: top-3 of sigmoid scores, renormalised, with a router z-loss", options,
                  (int)(sizeof options / sizeof options[0]), NULL, NULL, &ops)
