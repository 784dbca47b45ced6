/* fsdp.c: the fully sharded data parallel engine (see fsdp.h): gathering a
 * sharded unit's parameters around its use, prefetching the next one, and
 * reduce-scattering its gradient into this rank's shard on release.
 *
 * Not here: which units are sharded and how (the parallel plan, core/plan.h),
 * allocating and initialising the shards (the parameter store, runtime.c),
 * the reduction of unsharded gradients (the trainer).
 */
#include "core/fsdp.h"

#include <stdio.h>

#include "core/internal.h"

moe_status moe_fsdp_full_grad(moe_runtime *rt, moe_unit_entry *u)
{
    if (u->rs_staging) /* the last backward's gradient is still on its way */
        MOE_TRY(moe_fsdp_finish(rt));
    if (u->grad)
        return MOE_OK;
    char what[200];
    snprintf(what, sizeof what, "gathered gradients of %s", u->name);
    MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->padded * moe_dtype_size(rt->cfg.grad_dtype), what, &u->grad));
    return rt->host.ops->fill(rt->ctx, u->grad, rt->cfg.grad_dtype, u->padded, 0.0f);
}

moe_status moe_comm_start_all_gather(const moe_comm_ops *o, moe_comm *c, moe_group *g, void *recv, const void *send,
                                     int64_t n, moe_dtype dt, moe_comm_req **req)
{
    if (o->all_gather_start)
        return o->all_gather_start(c, g, recv, send, n, dt, req);
    *req = NULL;
    return o->all_gather(c, g, recv, send, n, dt);
}

moe_status moe_comm_start_reduce_scatter(const moe_comm_ops *o, moe_comm *c, moe_group *g, void *recv,
                                         const void *send, int64_t n, moe_dtype dt, moe_reduce_op op,
                                         moe_comm_req **req)
{
    if (o->reduce_scatter_start)
        return o->reduce_scatter_start(c, g, recv, send, n, dt, op, req);
    *req = NULL;
    return o->reduce_scatter(c, g, recv, send, n, dt, op);
}

/* the registry refuses a start op without wait: no wait, nothing in flight */
moe_status moe_comm_wait(const moe_comm_ops *o, moe_comm *c, moe_comm_req *req)
{
    return o->wait ? o->wait(c, req) : MOE_OK;
}

/* --ddp-backend fully_sharded (FAIRSEQ_SPEC.md §7.2): the first gather of a
 * sharded unit all-gathers its whole parameters from every rank's shard, or
 * waits for the all-gather unit_prefetch started; nested gathers (a layer
 * recomputed inside its backward) only count. */
static moe_status gather_start(moe_runtime *rt, moe_unit_entry *u, moe_comm_req **req)
{
    char what[200];
    snprintf(what, sizeof what, "gathered parameters of %s", u->name);
    MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->padded * moe_dtype_size(rt->cfg.act_dtype), what, &u->param));
    moe_status st;
    if (req)
        st = moe_comm_start_all_gather(rt->comm_ops, rt->comm, NULL, u->param, u->param_shard, u->shard,
                                       rt->cfg.act_dtype, req);
    else
        st = rt->comm_ops->all_gather(rt->comm, NULL, u->param, u->param_shard, u->shard, rt->cfg.act_dtype);
    if (st != MOE_OK) {
        rt->be->free(rt->ctx, u->param);
        u->param = NULL;
    }
    return st;
}

/* the all-gather a prefetch started: completed (wait), then the unit is
 * either gathered or (drop) freed unused */
moe_status moe_fsdp_prefetch_finish(moe_runtime *rt, moe_unit_entry *u, int drop)
{
    moe_status st = moe_comm_wait(rt->comm_ops, rt->comm, u->inflight);
    u->inflight = NULL;
    u->prefetched = 0;
    if (st != MOE_OK || drop) {
        rt->be->free(rt->ctx, u->param);
        u->param = NULL;
    }
    return st;
}

moe_status moe_fsdp_gather(moe_runtime *rt, int unit_id)
{
    MOE_TRY(moe_runtime_check_unit(rt, unit_id, "unit_gather"));
    moe_unit_entry *u = &rt->units[unit_id];
    if (!u->sharded || u->gathers++ > 0)
        return MOE_OK;
    moe_status st = u->prefetched ? moe_fsdp_prefetch_finish(rt, u, 0) : gather_start(rt, u, NULL);
    if (st != MOE_OK)
        u->gathers = 0;
    return st;
}

moe_status moe_fsdp_prefetch(moe_runtime *rt, int unit_id)
{
    MOE_TRY(moe_runtime_check_unit(rt, unit_id, "unit_prefetch"));
    moe_unit_entry *u = &rt->units[unit_id];
    if (!u->sharded || u->gathers > 0 || u->prefetched)
        return MOE_OK;
    MOE_TRY(gather_start(rt, u, &u->inflight));
    u->prefetched = 1;
    return MOE_OK;
}

/* The reduce-scatter in flight, if any: waited for, added into its unit's
 * gradient shard, and its buffers (the whole gradient, the staging shard)
 * freed. */
moe_status moe_fsdp_finish(moe_runtime *rt)
{
    if (rt->rs_unit < 0)
        return MOE_OK;
    moe_unit_entry *u = &rt->units[rt->rs_unit];
    rt->rs_unit = -1;
    double pre, post;
    moe_reduce_factors(rt->host.world, &pre, &post);
    moe_status st = moe_comm_wait(rt->comm_ops, rt->comm, u->rs_req);
    if (st == MOE_OK)
        st = rt->host.ops->axpby(rt->ctx, u->grad_shard, u->rs_staging, rt->cfg.grad_dtype, u->shard,
                                 (float)(1.0 / post), 1.0f);
    rt->be->free(rt->ctx, u->rs_staging);
    rt->be->free(rt->ctx, u->grad);
    u->rs_req = NULL;
    u->rs_staging = NULL;
    u->grad = NULL;
    return st;
}

/* The release that closes the first gather frees the whole parameters; a
 * gradient written meanwhile is reduce-scattered (averaged over the ranks,
 * moe_reduce_factors) into this rank's gradient shard. That reduce-scatter is left in flight, so it
 * overlaps the next layer's backward; the next release (or a gather of the
 * same unit, or moe_runtime_finish_reductions) completes it: one in flight at
 * a time, as FSDP's post-backward reduction. */
moe_status moe_fsdp_release(moe_runtime *rt, int unit_id)
{
    MOE_TRY(moe_runtime_check_unit(rt, unit_id, "unit_release"));
    moe_unit_entry *u = &rt->units[unit_id];
    if (!u->sharded)
        return MOE_OK;
    if (u->gathers == 0)
        return moe_error_set(MOE_ERR_INTERNAL, "unit_release of '%s' without a matching unit_gather", u->name);
    if (--u->gathers > 0)
        return MOE_OK;
    rt->be->free(rt->ctx, u->param);
    u->param = NULL;
    MOE_TRY(moe_fsdp_finish(rt));
    if (!u->grad)
        return MOE_OK;
    char what[200];
    snprintf(what, sizeof what, "gradient shard of %s on its way", u->name);
    const moe_dtype gdt = rt->cfg.grad_dtype;
    double pre, post;
    moe_reduce_factors(rt->host.world, &pre, &post);
    moe_status st = rt->be->alloc(rt->ctx, (uint64_t)u->shard * moe_dtype_size(gdt), what, &u->rs_staging);
    if (st == MOE_OK && pre != 1.0)
        st = rt->host.ops->axpby(rt->ctx, u->grad, u->grad, gdt, u->padded, 0.0f, (float)(1.0 / pre));
    if (st == MOE_OK)
        st = moe_comm_start_reduce_scatter(rt->comm_ops, rt->comm, NULL, u->rs_staging, u->grad, u->shard, gdt,
                                           MOE_REDUCE_SUM, &u->rs_req);
    if (st != MOE_OK) {
        if (u->rs_staging)
            rt->be->free(rt->ctx, u->rs_staging);
        rt->be->free(rt->ctx, u->grad);
        u->rs_staging = NULL;
        u->grad = NULL;
        return st;
    }
    rt->rs_unit = unit_id;
    return MOE_OK;
}

void moe_reduce_factors(int n, double *pre, double *post)
{
    int f = 1;
    while (n % f == 0 && n / f > f)
        f *= 2;
    *pre = f;
    *post = (double)n / f;
}
