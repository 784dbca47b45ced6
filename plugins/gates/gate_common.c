/* gate_common.c: the gate implementation the gate plugins share
 * (moe/gate.h, the gate SDK): creation, capacity, the calls into the backend's route
 * ops, and the aux-loss-free expert-bias update.
 *
 * It touches only what moe_host hands it: options, the backend's memory and
 * ops, the communicator (to sum the expert loads over the ranks).
 *
 * Conventions a reader would trip over:
 *  - The bias update runs on the host: the loads and the bias (E floats
 *    each) are copied to the host once per update and layer, the bias moved
 *    by rate * sign(mean load - load) (DeepSeek-V3; Megatron-Core's
 *    get_updated_expert_bias) and copied back. Loads are summed over every
 *    rank first, so all ranks keep the same bias. Counts from a forward
 *    recomputed under --checkpoint-activations double every load alike,
 *    which leaves the signs as they were.
 */
#include "moe/gate.h"

#include <math.h>
#include <stdlib.h>

moe_status moe_gate_create(const moe_host *h, const char *name, int num_experts, int min_experts, const char *hint,
                       moe_gate_base **out)
{
    *out = NULL;
    if (num_experts < min_experts)
        return h->error(h, MOE_ERR_INVALID_ARG, "gate %s: expected --moe-expert-count >= %d, found %d%s", name,
                        min_experts, num_experts, hint);
    moe_gate_base *g = calloc(1, sizeof *g);
    if (g == NULL)
        return h->error(h, MOE_ERR_NOMEM, "gate %s: out of host memory allocating the gate (%zu bytes)", name,
                        sizeof *g);
    g->h = h;
    g->name = name;
    g->num_experts = num_experts;
    g->route.k = 1;
    g->capacity_factor = 1.0;
    g->eval_fraction = h->opt_float(h, "moe-eval-capacity-token-fraction");
    g->dropless = h->opt_set(h, "moe-dropless") && h->opt_flag(h, "moe-dropless");
    g->dropless_factor = g->dropless ? h->opt_float(h, "moe-dropless-capacity-factor") : 0.0;
    *out = g;
    return MOE_OK;
}

moe_status moe_gate_enable_expert_bias(moe_gate_base *g, float rate)
{
    const moe_host *h = g->h;
    if (h->backend == NULL || h->ops == NULL)
        return h->error(h, MOE_ERR_INVALID_ARG, "gate %s: expected a backend for the expert bias, found none",
                        g->name);
    const uint64_t bytes = (uint64_t)g->num_experts * sizeof(float);
    MOE_TRY(h->backend->alloc(h->ctx, bytes, "expert bias", (void **)&g->bias));
    MOE_TRY(h->backend->alloc(h->ctx, bytes, "expert loads", (void **)&g->load));
    MOE_TRY(h->ops->fill(h->ctx, g->bias, MOE_F32, g->num_experts, 0.0f));
    MOE_TRY(h->ops->fill(h->ctx, g->load, MOE_F32, g->num_experts, 0.0f));
    g->bias_rate = rate;
    return MOE_OK;
}

void moe_gate_destroy(void *gate_)
{
    moe_gate_base *g = gate_;
    if (g == NULL)
        return;
    if (g->h->backend != NULL) {
        if (g->bias != NULL)
            g->h->backend->free(g->h->ctx, g->bias);
        if (g->load != NULL)
            g->h->backend->free(g->h->ctx, g->load);
    }
    free(g);
}

moe_status moe_gate_configure(void *gate_, int64_t S, int train, moe_route_args *a)
{
    moe_gate_base *g = gate_;
    const moe_route_args *r = &g->route;
    if (S < 1)
        return g->h->error(g->h, MOE_ERR_INVALID_ARG, "gate %s: expected at least one token to route, found %lld",
                           g->name, (long long)S);
    a->S = S;
    a->E = g->num_experts;
    a->k = r->k;
    a->policy = r->policy;
    a->normalize_before_drop = r->normalize_before_drop;
    a->batch_prioritized = r->batch_prioritized;
    a->topk = r->topk;
    a->score = r->score;
    a->renormalize = r->renormalize;
    a->z_loss_coeff = r->z_loss_coeff;
    a->aux = r->aux;
    a->num_groups = r->num_groups;
    a->group_topk = r->group_topk;
    a->expert_bias = g->bias;
    a->expert_load = train ? g->load : NULL;
    if (g->dropless) { /* the bound, in training and evaluation (gate.h) */
        const double c = ceil(g->dropless_factor * (double)r->k *
                              (double)((S + g->num_experts - 1) / g->num_experts));
        a->capacity = c < (double)S ? (int64_t)c : S;
        if (a->capacity < 1)
            a->capacity = 1;
    } else if (!train && g->eval_fraction > 0.0)
        a->capacity = (int64_t)ceil(g->eval_fraction * (double)S);
    else if (g->capacity_factor > 0.0)
        a->capacity = (int64_t)ceil(g->capacity_factor * (double)r->k *
                                    (double)((S + g->num_experts - 1) / g->num_experts));
    else
        a->capacity = S;
    a->seed = g->h->step_seed(g->h);
    return MOE_OK;
}

moe_status moe_gate_forward(void *gate_, const moe_route_args *a)
{
    moe_gate_base *g = gate_;
    return g->h->ops->route_forward(g->h->ctx, a);
}

moe_status moe_gate_backward(void *gate_, const moe_route_args *a, const float *dweight, float dl_aux, float *dlogits)
{
    moe_gate_base *g = gate_;
    return g->h->ops->route_backward(g->h->ctx, a, dweight, dl_aux, dlogits);
}

moe_status moe_gate_update(void *gate_)
{
    moe_gate_base *g = gate_;
    const moe_host *h = g->h;
    if (g->bias == NULL)
        return MOE_OK;
    const int E = g->num_experts;
    if (h->world > 1 && h->comm_ops != NULL)
        MOE_TRY(h->comm_ops->all_reduce(h->comm, NULL, g->load, E, MOE_F32, MOE_REDUCE_SUM));
    float *host = malloc(2 * (size_t)E * sizeof *host);
    if (host == NULL)
        return h->error(h, MOE_ERR_NOMEM, "gate %s: out of host memory for the expert-bias update", g->name);
    float *load = host, *bias = host + E;
    moe_status st = h->backend->copy_to_host(h->ctx, load, g->load, (uint64_t)E * sizeof *load);
    if (st == MOE_OK)
        st = h->backend->copy_to_host(h->ctx, bias, g->bias, (uint64_t)E * sizeof *bias);
    if (st == MOE_OK) {
        double mean = 0.0;
        for (int e = 0; e < E; e++)
            mean += (double)load[e];
        mean /= (double)E;
        for (int e = 0; e < E; e++) /* sign(mean - load): 0 when equal */
            bias[e] += g->bias_rate * (float)((mean > (double)load[e]) - (mean < (double)load[e]));
        st = h->backend->copy_from_host(h->ctx, g->bias, bias, (uint64_t)E * sizeof *bias);
    }
    free(host);
    if (st == MOE_OK)
        st = h->ops->fill(h->ctx, g->load, MOE_F32, E, 0.0f);
    return st;
}

float *moe_gate_state(void *gate_, int64_t *n)
{
    moe_gate_base *g = gate_;
    *n = g->bias != NULL ? g->num_experts : 0;
    return g->bias;
}
