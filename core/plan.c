/* plan.c: the parallel plan (see plan.h and moe_parallel_plan in
 * include/moe/plugin.h for the layout it encodes).
 *
 * Group creation follows the order every rank must share: the all-to-all
 * groups (contiguous blocks of E ranks), then the replica groups (expert i on
 * ranks i, i+E, ...), each list in ascending order of its first rank.
 */
#include "core/plan.h"

#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

static int layout_ok(int64_t e, int64_t w) { return e > 0 && (e % w == 0 || w % e == 0); }

moe_status moe_parallel_plan_check(int64_t experts, int64_t world)
{
    const int64_t E = experts, W = world > 0 ? world : 1;
    if (E <= 0 || layout_ok(E, W))
        return MOE_OK;
    int64_t lo = 0, hi = 0;
    for (int64_t v = E - 1; v >= 1 && !lo; v--)
        if (layout_ok(v, W))
            lo = v;
    for (int64_t v = E + 1; !hi; v++)
        if (layout_ok(v, W))
            hi = v;
    return moe_error_set(MOE_ERR_INVALID_ARG,
                         "--moe-expert-count %lld on %lld ranks: expected the expert count to be a multiple or "
                         "a divisor of the world size, found neither; use e.g. %lld or %lld experts",
                         (long long)E, (long long)W, (long long)(lo ? lo : hi), (long long)hi);
}

moe_status moe_parallel_plan_build(const moe_parallel_plan_spec *spec, moe_parallel_plan *p)
{
    memset(p, 0, sizeof *p);
    const int W = spec->world > 0 ? spec->world : 1, E = spec->experts > 0 ? spec->experts : 0;
    if (spec->rank < 0 || spec->rank >= W)
        return moe_error_set(MOE_ERR_INVALID_ARG, "expected a rank in 0..%d for a world of %d ranks, found %d", W - 1,
                             W, spec->rank);
    MOE_TRY(moe_parallel_plan_check(E, W));
    p->world = W;
    p->rank = spec->rank;
    p->experts = E;
    p->fully_sharded = spec->fully_sharded;
    p->shards = spec->fully_sharded && W > 1 ? W : 1;
    p->a2a_world = 1;
    p->replicas = 1;
    if (E > 0) {
        int *ids;
        if (E >= W) {
            p->local_experts = E / W;
            p->a2a_world = W;
        } else {
            p->local_experts = 1;
            p->a2a_world = E;
            p->replicas = W / E;
        }
        ids = malloc((size_t)p->local_experts * sizeof *ids);
        if (!ids)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory for the expert plan");
        for (int j = 0; j < p->local_experts; j++)
            ids[j] = E >= W ? p->rank * p->local_experts + j : p->rank % E;
        p->local_ids = ids;
    }
    /* expert gradient normalisation (§2.9): experts are not reduced over the
     * data-parallel ranks, only over their replicas; legacy_ddp divides by the
     * world size whatever --moe-normalize-expert-grad says */
    p->expert_grad_scale = 1.0f;
    if (spec->normalizer || spec->legacy_ddp) {
        double divisor =
            spec->legacy_ddp ? (double)W : spec->normalizer->divisor(W / p->replicas);
        p->expert_grad_scale = (float)(1.0 / divisor);
    }
    return MOE_OK;
}

/* groups of `n` ranks, first + k*stride for k < n, for first = 0..count-1
 * (times `block`); *mine receives the one holding p->rank */
static moe_status make_groups(moe_parallel_plan *p, const moe_comm_ops *ops, moe_comm *comm, int count, int n,
                              int block, int stride, moe_group **mine)
{
    int *ranks = malloc((size_t)n * sizeof *ranks);
    if (!ranks)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    moe_status st = MOE_OK;
    for (int g = 0; g < count && st == MOE_OK; g++) {
        int in = 0;
        for (int k = 0; k < n; k++) {
            ranks[k] = g * block + k * stride;
            in |= ranks[k] == p->rank;
        }
        moe_group *grp = NULL;
        st = ops->group_create(comm, ranks, n, &grp);
        if (st == MOE_OK && in)
            *mine = grp;
    }
    free(ranks);
    return st;
}

moe_status moe_parallel_plan_create_groups(moe_parallel_plan *p, const moe_comm_ops *ops, moe_comm *comm)
{
    if (p->world <= 1 || p->experts <= 0 || p->experts >= p->world)
        return MOE_OK;
    const int E = p->experts, groups = p->world / E;
    MOE_TRY(make_groups(p, ops, comm, groups, E, E, 1, &p->a2a_group));
    return make_groups(p, ops, comm, E, groups, 1, E, &p->replica_group);
}

void moe_parallel_plan_free(moe_parallel_plan *p)
{
    free((void *)(uintptr_t)p->local_ids);
    p->local_ids = NULL;
    p->local_experts = 0;
}

moe_unit_layout moe_parallel_plan_unit(const moe_parallel_plan *p, int expert_index, int64_t numel)
{
    moe_unit_layout l;
    const int W = p->shards;
    l.sharded = W > 1 && expert_index < 0 && numel > 0;
    l.padded = l.sharded ? (numel + W - 1) / W * W : numel;
    l.shard = l.sharded ? l.padded / W : numel;
    l.start = l.sharded ? (int64_t)p->rank * l.shard : 0;
    return l;
}
