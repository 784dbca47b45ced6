/* gate.h: the gate SDK, the one gate implementation every gate plugin
 * compiles in (plugins/gates/gate_common.c; installed as
 * share/moelm/gate_common.c, which moelm_add_plugin(gate ...) adds to an
 * out-of-tree gate). A gate plugin is its options and an init that turns
 * them into routing settings (the policy fields of moe_route_args);
 * configure, forward, backward, the expert-bias update and the state are
 * shared, and the routing itself is the backend's route_forward and
 * route_backward (kernels/cpu/route.c is the reference). Not part of the
 * plugin ABI: the core never sees moe_gate_base, only the moe_gate_ops a
 * plugin builds with MOE_GATE_OPS.
 *
 * Not here: option tables (each plugin declares its own; the one option
 * every gate shares is MOE_GATE_OPT_EVAL_CAPACITY) and the gate projection wg,
 * which belongs to the arch.
 *
 * Conventions a reader would trip over:
 *  - Training capacity is ceil(capacity_factor * k * ceil(S / E)), with
 *    factor 1 unless the plugin sets another: ceil(S / E) for top-1 and
 *    2 * ceil(S / E) for top-2 exactly as fairseq; a factor <= 0 means no
 *    token is dropped (capacity S). Evaluation with
 *    --moe-eval-capacity-token-fraction f > 0 uses ceil(f * S).
 *  - --moe-dropless (a gate that declares MOE_GATE_OPT_DROPLESS): no token
 *    is dropped for capacity. The capacity, in training and evaluation
 *    alike, is then the buffer bound min(S, ceil(F * k * ceil(S / E))),
 *    F = --moe-dropless-capacity-factor; an expert that receives more is an
 *    error, raised by the trainer from the overflow metrics (any overflow
 *    with dropless on), so the routing itself needs no host round trip.
 *  - configure() copies the settings, sets the per-update seed (fairseq
 *    reseeds with seed + num_updates every update) and, in training, the
 *    expert-bias buffers; it leaves to the caller the stream (layer and
 *    micro-batch), the buffers, width, seq_len and gate_metrics.
 *  - These functions have hidden visibility: each plugin holds its own copy.
 */
#ifndef MOE_GATE_H
#define MOE_GATE_H

#include "moe/plugin.h"

typedef struct moe_gate_base {
    const moe_host *h;
    const char *name;          /* the plugin's name, for messages */
    int num_experts;
    moe_route_args route;      /* the settings configure() copies: k, policy, flags, top-k fields */
    double capacity_factor;    /* training capacity, see above */
    double eval_fraction;      /* --moe-eval-capacity-token-fraction */
    float *bias, *load;        /* aux-loss-free balancing: (E) backend fp32 each, or NULL */
    float bias_rate;           /* --moe-router-bias-update-rate */
    int dropless;              /* --moe-dropless */
    double dropless_factor;    /* --moe-dropless-capacity-factor: the bound, see above */
} moe_gate_base;

/* the option every gate declares (fairseq's, shared by top1 and top2) */
#define MOE_GATE_OPT_EVAL_CAPACITY                                                                                  \
    {"moe-eval-capacity-token-fraction", MOE_OPT_FLOAT, "0.25",                                               \
     "expert capacity at evaluation as a fraction of the tokens (ceil(fraction * tokens)); <= 0 uses the "     \
     "training capacity (an expert never receives more than all the tokens, hence at most 1)",                \
     -1.0, 1.0, NULL}

/* --moe-dropless and its bound, for the gates that offer it (top1, top2,
 * topk); moe_gate_create reads them when the plugin declares them */
#define MOE_GATE_OPT_DROPLESS                                                                                       \
    {"moe-dropless", MOE_OPT_FLAG, NULL,                                                                        \
     "drop no token for capacity (Megatron-Core's flag): experts take every token routed to them, up to the "  \
     "bound set by --moe-dropless-capacity-factor; more is an error",                                          \
     0, 0, NULL},                                                                                               \
    {"moe-dropless-capacity-factor", MOE_OPT_FLOAT, "4",                                                        \
     "with --moe-dropless: the most tokens one expert may receive in a micro-batch, "                          \
     "min(tokens, ceil(factor * k * ceil(tokens / experts))), which sizes the expert buffers",                 \
     1e-6, 1e6, NULL}

/* A gate of `name` over num_experts (at least min_experts, else an error
 * ending with `hint`) with k = 1, capacity factor 1 and the eval fraction
 * read, and --moe-dropless with its factor where the plugin declares them
 * (MOE_GATE_OPT_DROPLESS); the plugin's init fills g->route and may change
 * the factor. */
moe_status moe_gate_create(const moe_host *h, const char *name, int num_experts, int min_experts, const char *hint,
                       moe_gate_base **out);
/* Aux-loss-free balancing (DeepSeek-V3): a zero bias and load per expert on
 * the backend; update() moves the bias by `rate` towards balance. */
moe_status moe_gate_enable_expert_bias(moe_gate_base *g, float rate);

/* the moe_gate_ops entries every gate shares */
void moe_gate_destroy(void *gate);
moe_status moe_gate_configure(void *gate, int64_t S, int train, moe_route_args *a);
moe_status moe_gate_forward(void *gate, const moe_route_args *a);
moe_status moe_gate_backward(void *gate, const moe_route_args *a, const float *dweight, float dl_aux, float *dlogits);
moe_status moe_gate_update(void *gate);
float *moe_gate_state(void *gate, int64_t *n);

/* A gate plugin's ops table: its init, the shared rest, its log fields. */
#define MOE_GATE_OPS(init_fn, log_fields)                                                                          \
    {(init_fn), moe_gate_destroy, moe_gate_configure, moe_gate_forward, moe_gate_backward, (log_fields), moe_gate_update, moe_gate_state}

#endif
