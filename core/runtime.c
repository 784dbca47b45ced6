/* runtime.c: the core state behind moe_host and the parameter store.
 *
 * The host struct is the first member of moe_runtime, so a host pointer handed
 * to a plugin leads back to its runtime. Parameters are registered as units
 * (one flat buffer each) of tensors; the layout is fixed at registration and
 * memory is allocated only by moe_runtime_alloc_params, so --dry-run can count
 * without allocating.
 *
 * Initialisation is counter-based: each tensor draws from (seed, stream) with
 * stream = FNV-1a hash of its name, so the result depends neither on the order
 * of allocation nor on the rank. Expert units use fairseq's per-expert seed
 * s0 + global_expert (FAIRSEQ_SPEC.md §1.6; s0 is derived from --seed), so
 * replicas of an expert (E < world) are identical on every rank.
 *
 * Not here: the fully sharded engine behind unit_gather, unit_prefetch and
 * unit_release (core/fsdp.c), which works on the structs of
 * core/runtime_private.h; the parallel plan the unit layout follows
 * (core/plan.c).
 */
#include "core/runtime.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/fsdp.h"
#include "core/internal.h"
#include "core/log.h"
#include "core/opwrap.h"
#include "core/runtime_private.h"

static moe_runtime *rt_of(const moe_host *h) { return (moe_runtime *)(uintptr_t)h; }

/* ---------------------------------------------------------------- host */

static void host_log(const moe_host *h, moe_log_level level, const char *component, const char *fmt, ...)
{
    (void)h;
    va_list ap;
    va_start(ap, fmt);
    moe_logv(level, component, fmt, ap);
    va_end(ap);
}

static moe_status host_error(const moe_host *h, moe_status st, const char *fmt, ...)
{
    (void)h;
    va_list ap;
    va_start(ap, fmt);
    moe_status r = moe_error_setv(st, fmt, ap);
    va_end(ap);
    return r;
}

/* Options a plugin asks for must exist: a typo in a plugin is a bug worth a
 * loud message, not a silent zero. */
static int host_check_opt(const moe_host *h, const char *name)
{
    if (moe_opts_known(rt_of(h)->opts, name))
        return 1;
    moe_log(MOE_LOG_ERROR, "moelm.host", "a plugin asked for unknown option --%s (returning 0/None)", name);
    return 0;
}

static int host_opt_set(const moe_host *h, const char *name)
{
    return moe_opts_known(rt_of(h)->opts, name) && moe_opts_has_value(rt_of(h)->opts, name);
}

static int64_t host_opt_int(const moe_host *h, const char *name)
{
    return host_check_opt(h, name) ? moe_opts_int(rt_of(h)->opts, name) : 0;
}

static double host_opt_float(const moe_host *h, const char *name)
{
    return host_check_opt(h, name) ? moe_opts_float(rt_of(h)->opts, name) : 0.0;
}

static int host_opt_flag(const moe_host *h, const char *name)
{
    return host_check_opt(h, name) ? moe_opts_flag(rt_of(h)->opts, name) : 0;
}

static const char *host_opt_str(const moe_host *h, const char *name)
{
    return host_check_opt(h, name) ? moe_opts_str(rt_of(h)->opts, name) : NULL;
}

static int host_opt_floats(const moe_host *h, const char *name, double *out, int max)
{
    if (!host_check_opt(h, name))
        return -1;
    int n = 0;
    if (moe_opts_float_list(rt_of(h)->opts, name, out, max, &n) != MOE_OK)
        return -1;
    return n;
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static moe_status host_unit_add(const moe_host *h, const char *name, int expert_index, int *unit_id)
{
    moe_runtime *rt = rt_of(h);
    if (rt->allocated)
        return moe_error_set(MOE_ERR_INTERNAL, "unit '%s' registered after parameters were allocated", name);
    if (rt->n_units == rt->cap_units) {
        int cap = rt->cap_units ? 2 * rt->cap_units : 64;
        moe_unit_entry *u = realloc(rt->units, (size_t)cap * sizeof *u);
        if (!u)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory registering unit '%s'", name);
        rt->units = u;
        rt->cap_units = cap;
    }
    moe_unit_entry *u = &rt->units[rt->n_units];
    memset(u, 0, sizeof *u);
    u->name = dup_str(name);
    if (!u->name)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory registering unit '%s'", name);
    u->expert_index = expert_index;
    *unit_id = rt->n_units++;
    return MOE_OK;
}

/* 2^53: element counts up to it are exact in a double, and bytes in int64 */
#define MOE_MAX_ELEMENTS ((int64_t)1 << 53)

static moe_status too_many_elements(const moe_param_def *def)
{
    char shape[64];
    if (def->ndim > 1)
        snprintf(shape, sizeof shape, "%lld, %lld", (long long)def->shape[0], (long long)def->shape[1]);
    else
        snprintf(shape, sizeof shape, "%lld", (long long)def->shape[0]);
    return moe_error_set(MOE_ERR_INVALID_ARG,
                         "parameter '%s' of shape (%s): expected a model of at most 2^53 parameters in all, found "
                         "more; lower the sizes that make it (--dict-size, --decoder-embed-dim, "
                         "--decoder-ffn-embed-dim, --decoder-layers, --moe-expert-count)",
                         def->name, shape);
}

static moe_status host_param_add(const moe_host *h, int unit_id, const moe_param_def *def, int *param_id)
{
    moe_runtime *rt = rt_of(h);
    if (unit_id < 0 || unit_id >= rt->n_units)
        return moe_error_set(MOE_ERR_INVALID_ARG, "parameter '%s': no unit with id %d", def->name, unit_id);
    if (rt->allocated)
        return moe_error_set(MOE_ERR_INTERNAL, "parameter '%s' registered after allocation", def->name);
    if (def->ndim < 1 || def->ndim > 2)
        return moe_error_set(MOE_ERR_INVALID_ARG, "parameter '%s': ndim must be 1 or 2, got %d", def->name,
                             def->ndim);
    int64_t numel = 1;
    for (int i = 0; i < def->ndim; i++) {
        if (def->shape[i] <= 0)
            return moe_error_set(MOE_ERR_INVALID_ARG, "parameter '%s': dimension %d is %lld, expected > 0",
                                 def->name, i, (long long)def->shape[i]);
        if (def->shape[i] > MOE_MAX_ELEMENTS / numel)
            return too_many_elements(def);
        numel *= def->shape[i];
    }
    /* every count, byte size and sum over units derived from these stays
     * exact in int64 (and in a double) */
    if (numel > MOE_MAX_ELEMENTS - rt->total_numel)
        return too_many_elements(def);
    if (rt->n_params == rt->cap_params) {
        int cap = rt->cap_params ? 2 * rt->cap_params : 256;
        moe_param_entry *p = realloc(rt->params, (size_t)cap * sizeof *p);
        if (!p)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory registering '%s'", def->name);
        rt->params = p;
        rt->cap_params = cap;
    }
    moe_param_entry *p = &rt->params[rt->n_params];
    p->name = dup_str(def->name);
    if (!p->name)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory registering '%s'", def->name);
    p->unit = unit_id;
    p->numel = numel;
    p->offset = rt->units[unit_id].numel;
    p->def = *def;
    p->def.name = p->name;
    rt->units[unit_id].numel += numel;
    rt->total_numel += numel;
    *param_id = rt->n_params++;
    return MOE_OK;
}

static void *offset_ptr(void *base, int64_t offset, moe_dtype dt)
{
    return base ? (char *)base + (size_t)offset * moe_dtype_size(dt) : NULL;
}

/* A sharded unit's whole buffers exist only while it is gathered: a tensor
 * asked for outside unit_gather/unit_release is a bug in the arch, named here
 * (the op that receives the NULL would only say "null pointer"). */
static void *outside_gather(const moe_unit_entry *u, const moe_param_entry *p, const char *what)
{
    moe_log(MOE_LOG_ERROR, "moelm.params", "%s '%s' asked for outside unit_gather/unit_release of its fully "
            "sharded unit '%s'", what, p->name, u->name);
    return NULL;
}

static void *host_param_data(const moe_host *h, int param_id)
{
    moe_runtime *rt = rt_of(h);
    if (param_id < 0 || param_id >= rt->n_params)
        return NULL;
    moe_param_entry *p = &rt->params[param_id];
    moe_unit_entry *u = &rt->units[p->unit];
    if (u->sharded && !u->param)
        return outside_gather(u, p, "parameter");
    return offset_ptr(u->param, p->offset, rt->cfg.act_dtype);
}

static void *host_grad_data(const moe_host *h, int param_id)
{
    moe_runtime *rt = rt_of(h);
    if (param_id < 0 || param_id >= rt->n_params)
        return NULL;
    moe_param_entry *p = &rt->params[param_id];
    moe_unit_entry *u = &rt->units[p->unit];
    if (u->sharded) {
        if (!u->gathers)
            return outside_gather(u, p, "the gradient of parameter");
        if (moe_fsdp_full_grad(rt, u) != MOE_OK) {
            moe_log(MOE_LOG_ERROR, "moelm.params", "%s", moe_error_message());
            return NULL;
        }
    }
    return offset_ptr(u->grad, p->offset, rt->cfg.grad_dtype);
}

static void *host_unit_data(const moe_host *h, int unit_id)
{
    moe_runtime *rt = rt_of(h);
    return unit_id >= 0 && unit_id < rt->n_units ? rt->units[unit_id].param : NULL;
}

static void *host_unit_grad(const moe_host *h, int unit_id)
{
    moe_runtime *rt = rt_of(h);
    if (unit_id < 0 || unit_id >= rt->n_units)
        return NULL;
    moe_unit_entry *u = &rt->units[unit_id];
    if (u->sharded && (!u->gathers || moe_fsdp_full_grad(rt, u) != MOE_OK))
        return NULL;
    return u->grad;
}

/* The arch brackets each layer's forward and backward with these: observed
 * runs see them as per-layer spans (core/opwrap.h). */
static moe_status host_unit_gather(const moe_host *h, int unit_id)
{
    moe_runtime *rt = rt_of(h);
    if (rt->observed && unit_id >= 0 && unit_id < rt->n_units)
        moe_opwrap_unit(rt->units[unit_id].name, 1);
    return moe_fsdp_gather(rt, unit_id);
}

static moe_status host_unit_release(const moe_host *h, int unit_id)
{
    moe_runtime *rt = rt_of(h);
    moe_status st = moe_fsdp_release(rt, unit_id);
    if (rt->observed && unit_id >= 0 && unit_id < rt->n_units)
        moe_opwrap_unit(rt->units[unit_id].name, 0);
    return st;
}

static moe_status host_unit_prefetch(const moe_host *h, int unit_id) { return moe_fsdp_prefetch(rt_of(h), unit_id); }

moe_status moe_runtime_check_unit(const moe_runtime *rt, int unit_id, const char *fn)
{
    if (unit_id < 0 || unit_id >= rt->n_units)
        return moe_error_set(MOE_ERR_INVALID_ARG, "%s: no unit with id %d (%d registered)", fn, unit_id,
                             rt->n_units);
    if (!rt->allocated)
        return moe_error_set(MOE_ERR_INTERNAL, "%s of unit '%s' before parameters were allocated", fn,
                             rt->units[unit_id].name);
    return MOE_OK;
}

static moe_status host_unit_grad_ready(const moe_host *h, int unit_id)
{
    moe_runtime *rt = rt_of(h);
    MOE_TRY(moe_runtime_check_unit(rt, unit_id, "unit_grad_ready"));
    return rt->grad_ready ? rt->grad_ready(rt->grad_ready_ctx, unit_id) : MOE_OK;
}

void moe_runtime_set_grad_ready(moe_runtime *rt, moe_status (*fn)(void *ctx, int unit_id), void *ctx)
{
    rt->grad_ready = fn;
    rt->grad_ready_ctx = ctx;
}

moe_status moe_runtime_finish_reductions(moe_runtime *rt) { return moe_fsdp_finish(rt); }

static uint64_t host_step_seed(const moe_host *h) { return rt_of(h)->step_seed; }

/* ------------------------------------------------------------------ plan */

static moe_status build_plan(moe_runtime *rt, int experts)
{
    moe_parallel_plan_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.world = rt->host.world;
    spec.rank = rt->host.rank;
    spec.experts = experts;
    spec.fully_sharded = rt->cfg.fully_sharded;
    const char *ddp = moe_opts_known(rt->opts, "ddp-backend") ? moe_opts_str(rt->opts, "ddp-backend") : NULL;
    spec.legacy_ddp = ddp && strcmp(ddp, "legacy_ddp") == 0;
    spec.normalizer = rt->normalizer;
    moe_parallel_plan p;
    MOE_TRY(moe_parallel_plan_build(&spec, &p));
    moe_parallel_plan_free(&rt->plan);
    rt->plan = p;
    rt->host.expert_grad_scale = p.expert_grad_scale;
    return MOE_OK;
}

static moe_status host_plan_experts(const moe_host *h, int experts, const moe_parallel_plan **plan)
{
    moe_runtime *rt = rt_of(h);
    *plan = &rt->plan;
    if (rt->plan_declared) {
        if (experts == rt->plan.experts)
            return MOE_OK;
        return moe_error_set(MOE_ERR_INTERNAL, "plan_experts: expected the %d experts declared before, found %d",
                             rt->plan.experts, experts);
    }
    if (experts < 1)
        return moe_error_set(MOE_ERR_INVALID_ARG, "plan_experts: expected at least one expert, found %d", experts);
    MOE_TRY(build_plan(rt, experts));
    rt->plan_declared = 1;
    /* groups need a communicator that joined several ranks (a dry run plans
     * for a world it never joins) */
    if (rt->comm_ops && rt->comm && rt->comm_ops->world(rt->comm) > 1)
        MOE_TRY(moe_parallel_plan_create_groups(&rt->plan, rt->comm_ops, rt->comm));
    return MOE_OK;
}

const moe_parallel_plan *moe_runtime_plan(const moe_runtime *rt) { return &rt->plan; }

void moe_runtime_set_normalizer(moe_runtime *rt, const moe_normalizer_ops *normalizer) { rt->normalizer = normalizer; }

/* ------------------------------------------------------------- lifecycle */

moe_status moe_runtime_create(moe_opts *opts, moe_registry *reg, const moe_runtime_config *cfg, moe_runtime **out)
{
    *out = NULL;
    moe_runtime *rt = calloc(1, sizeof *rt);
    if (!rt)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory creating the runtime");
    rt->opts = opts;
    rt->reg = reg;
    rt->cfg = *cfg;
    rt->step_seed = cfg->seed;
    rt->rs_unit = -1;

    moe_host *h = &rt->host;
    h->size = sizeof *h;
    h->log = host_log;
    h->error = host_error;
    h->opt_set = host_opt_set;
    h->opt_int = host_opt_int;
    h->opt_float = host_opt_float;
    h->opt_flag = host_opt_flag;
    h->opt_str = host_opt_str;
    h->opt_floats = host_opt_floats;
    h->act_dtype = cfg->act_dtype;
    h->grad_dtype = cfg->grad_dtype;
    h->unit_add = host_unit_add;
    h->param_add = host_param_add;
    h->param_data = host_param_data;
    h->grad_data = host_grad_data;
    h->unit_data = host_unit_data;
    h->unit_grad = host_unit_grad;
    h->unit_gather = host_unit_gather;
    h->unit_release = host_unit_release;
    h->unit_prefetch = host_unit_prefetch;
    h->unit_grad_ready = host_unit_grad_ready;
    h->seed = cfg->seed;
    h->step_seed = host_step_seed;
    h->expert_grad_scale = 1.0f;
    h->padding_idx = 1;
    h->rank = 0;
    h->world = 1;
    h->plan = &rt->plan;
    h->plan_experts = host_plan_experts;

    moe_status st;
    const moe_plugin_desc *d;
    MOE_TRY_GOTO(st, moe_registry_load(reg, MOE_KIND_BACKEND, cfg->backend, &d), fail);
    rt->be = d->ops;
    if (d->load && (st = d->load(h)) != MOE_OK) {
        st = moe_registry_hook_error(reg, d, "load", st);
        goto fail;
    }
    if (!rt->be->available()) {
        st = moe_error_set(MOE_ERR_BACKEND, "backend '%s' cannot run on this machine (no device visible); use --cpu",
                           cfg->backend);
        goto fail;
    }
    MOE_TRY_GOTO(st, rt->be->create(h, cfg->device_id, &rt->ctx), fail);
    h->backend = rt->be;
    h->ctx = rt->ctx;
    h->ops = rt->be->ops;

    if (cfg->communicator) {
        MOE_TRY_GOTO(st, moe_registry_load(reg, MOE_KIND_COMMUNICATOR, cfg->communicator, &d), fail);
        rt->comm_ops = d->ops;
        if (d->load && (st = d->load(h)) != MOE_OK) {
            st = moe_registry_hook_error(reg, d, "load", st);
            goto fail;
        }
        MOE_TRY_GOTO(st, rt->comm_ops->init(h, &rt->comm), fail);
        h->comm_ops = rt->comm_ops;
        h->comm = rt->comm;
        h->rank = rt->comm_ops->rank(rt->comm);
        h->world = rt->comm_ops->world(rt->comm);
    } else if (moe_opts_has_value(opts, "distributed-world-size")) {
        /* dry run: plan for the requested world without joining one */
        h->world = (int)moe_opts_int(opts, "distributed-world-size");
        h->rank = moe_opts_has_value(opts, "distributed-rank") ? (int)moe_opts_int(opts, "distributed-rank") : 0;
    }
    MOE_TRY_GOTO(st, build_plan(rt, 0), fail);
    *out = rt;
    return MOE_OK;
fail:
    moe_runtime_destroy(rt);
    return st;
}

void moe_runtime_destroy(moe_runtime *rt)
{
    if (!rt)
        return;
    if (rt->rs_unit >= 0)
        moe_fsdp_finish(rt);
    for (int i = 0; i < rt->n_units; i++) {
        moe_unit_entry *u = &rt->units[i];
        if (u->prefetched)
            moe_fsdp_prefetch_finish(rt, u, 1);
        if (rt->be && rt->ctx) {
            if (u->param)
                rt->be->free(rt->ctx, u->param);
            if (u->grad)
                rt->be->free(rt->ctx, u->grad);
            if (u->master)
                rt->be->free(rt->ctx, u->master);
            if (u->grad_shard)
                rt->be->free(rt->ctx, u->grad_shard);
            if (u->param_shard)
                rt->be->free(rt->ctx, u->param_shard);
        }
        free(u->name);
    }
    for (int i = 0; i < rt->n_params; i++)
        free(rt->params[i].name);
    free(rt->units);
    free(rt->params);
    moe_parallel_plan_free(&rt->plan);
    if (rt->comm_ops && rt->comm)
        rt->comm_ops->destroy(rt->comm);
    if (rt->be && rt->ctx)
        rt->be->destroy(rt->ctx);
    for (int i = 0; i < rt->argc; i++)
        free(rt->argv[i]);
    free(rt->argv);
    if (rt->owns_opts) {
        moe_registry_destroy(rt->reg);
        moe_opts_destroy(rt->opts);
    }
    free(rt);
}

const moe_host *moe_runtime_host(const moe_runtime *rt) { return &rt->host; }
moe_opts *moe_runtime_opts(const moe_runtime *rt) { return rt->opts; }
moe_registry *moe_runtime_registry(const moe_runtime *rt) { return rt->reg; }
void moe_runtime_set_step_seed(moe_runtime *rt, uint64_t step_seed) { rt->step_seed = step_seed; }
void moe_runtime_set_gate(moe_runtime *rt, const moe_gate_ops *gate) { rt->host.gate_ops = gate; }
void moe_runtime_set_expert_grad_scale(moe_runtime *rt, float scale) { rt->host.expert_grad_scale = scale; }

void moe_runtime_set_padding_idx(moe_runtime *rt, int padding_idx) { rt->host.padding_idx = padding_idx; }

moe_status moe_runtime_set_args(moe_runtime *rt, int nargs, const char *const *args)
{
    char **argv = calloc((size_t)nargs + 1, sizeof *argv);
    if (!argv)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    for (int i = 0; i < nargs; i++) {
        argv[i] = dup_str(args[i]);
        if (!argv[i]) {
            for (int j = 0; j < i; j++)
                free(argv[j]);
            free(argv);
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        }
    }
    for (int i = 0; i < rt->argc; i++)
        free(rt->argv[i]);
    free(rt->argv);
    rt->argv = argv;
    rt->argc = nargs;
    return MOE_OK;
}

int moe_runtime_args(const moe_runtime *rt, const char *const **args)
{
    *args = (const char *const *)rt->argv;
    return rt->argc;
}

moe_status moe_runtime_load_plugin(moe_runtime *rt, moe_plugin_kind kind, const char *name,
                                   const moe_plugin_desc **out)
{
    const moe_plugin_desc *d;
    MOE_TRY(moe_registry_load(rt->reg, kind, name, &d));
    if (d->n_options > 0) {
        char owner[160];
        snprintf(owner, sizeof owner, "%s %s", moe_kind_name(kind), name);
        MOE_TRY(moe_opts_add_table(rt->opts, owner, d->options, d->n_options));
        /* give the new options their values from the command line */
        char **argv = calloc((size_t)rt->argc + 2, sizeof *argv);
        if (!argv)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        argv[0] = (char *)"moelm-train";
        for (int i = 0; i < rt->argc; i++)
            argv[i + 1] = rt->argv[i];
        moe_status st = moe_opts_parse(rt->opts, rt->argc + 1, argv, 0);
        free(argv);
        MOE_TRY(st);
    }
    if (d->load) {
        moe_status st = d->load(&rt->host);
        if (st != MOE_OK)
            return moe_registry_hook_error(rt->reg, d, "load", st);
    }
    *out = d;
    return MOE_OK;
}

/* ------------------------------------------------------ parameter store */

void moe_runtime_wrap(moe_runtime *rt, const moe_ops *ops, const moe_comm_ops *comm)
{
    rt->host.ops = ops;
    if (comm) {
        rt->host.comm_ops = comm;
        rt->comm_ops = comm;
    }
    rt->observed = 1;
}

int moe_runtime_num_units(const moe_runtime *rt) { return rt->n_units; }

void moe_runtime_unit(const moe_runtime *rt, int unit, moe_unit_info *out)
{
    const moe_unit_entry *u = &rt->units[unit];
    out->name = u->name;
    out->expert_index = u->expert_index;
    out->numel = u->numel;
    moe_unit_layout l = moe_parallel_plan_unit(&rt->plan, u->expert_index, u->numel);
    out->sharded = l.sharded;
    out->padded = l.padded;
    out->shard = l.shard;
    out->start = l.start;
    out->param = u->param;
    out->grad = u->grad;
    out->master = u->master;
    out->param_shard = u->param_shard;
    out->grad_shard = u->grad_shard;
}

int moe_runtime_num_params(const moe_runtime *rt) { return rt->n_params; }

void moe_runtime_param(const moe_runtime *rt, int param, moe_param_info *out)
{
    const moe_param_entry *p = &rt->params[param];
    out->name = p->name;
    out->unit = p->unit;
    out->offset = p->offset;
    out->numel = p->numel;
    out->ndim = p->def.ndim;
    out->shape[0] = p->def.shape[0];
    out->shape[1] = p->def.ndim > 1 ? p->def.shape[1] : 0;
}

void moe_runtime_param_counts(const moe_runtime *rt, int64_t *non_expert, int64_t *expert)
{
    *non_expert = *expert = 0;
    for (int i = 0; i < rt->n_units; i++) {
        if (rt->units[i].expert_index >= 0)
            *expert += rt->units[i].numel;
        else
            *non_expert += rt->units[i].numel;
    }
}

static uint64_t fnv1a64(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ull;
    }
    return h;
}

/* fairseq draws s0 = randint(1e6) from the seeded global RNG; moelm derives
 * it from --seed with the same counter-based generator as everything else. */
static uint64_t expert_base_seed(uint64_t seed)
{
    uint64_t h = fnv1a64("moelm.expert_seed") ^ (seed * 0x9E3779B97F4A7C15ull);
    return (h >> 11) % 1000000ull;
}

static moe_status init_tensor(moe_runtime *rt, const moe_param_entry *p, void *data, moe_dtype dt)
{
    const moe_ops *ops = rt->host.ops;
    const moe_unit_entry *u = &rt->units[p->unit];
    uint64_t seed = u->expert_index >= 0 ? expert_base_seed(rt->cfg.seed) + (uint64_t)u->expert_index : rt->cfg.seed;
    uint64_t stream = fnv1a64(p->name);
    switch (p->def.init) {
    case MOE_INIT_ZERO:
        MOE_TRY(ops->fill(rt->ctx, data, dt, p->numel, 0.0f));
        break;
    case MOE_INIT_ONE:
        MOE_TRY(ops->fill(rt->ctx, data, dt, p->numel, 1.0f));
        break;
    case MOE_INIT_UNIFORM:
        MOE_TRY(ops->init_uniform(rt->ctx, data, dt, p->numel, -p->def.a, p->def.a, seed, stream));
        break;
    case MOE_INIT_NORMAL:
        MOE_TRY(ops->init_normal(rt->ctx, data, dt, p->numel, 0.0f, p->def.a, seed, stream));
        break;
    }
    if (p->def.zero_row >= 0 && p->def.ndim == 2) {
        if (p->def.zero_row >= p->def.shape[0])
            return moe_error_set(MOE_ERR_INVALID_ARG, "parameter '%s': zero_row %lld outside %lld rows", p->name,
                                 (long long)p->def.zero_row, (long long)p->def.shape[0]);
        int64_t cols = p->def.shape[1];
        MOE_TRY(ops->fill(rt->ctx, offset_ptr(data, p->def.zero_row * cols, dt), dt, cols, 0.0f));
    }
    return MOE_OK;
}

moe_status moe_runtime_alloc_params(moe_runtime *rt)
{
    if (rt->allocated)
        return MOE_OK;
    if (rt->cfg.dry_run)
        return moe_error_set(MOE_ERR_INTERNAL, "parameters cannot be allocated in a dry run");
    char what[200];
    const moe_dtype act = rt->cfg.act_dtype, gdt = rt->cfg.grad_dtype;
    for (int i = 0; i < rt->n_units; i++) {
        moe_unit_entry *u = &rt->units[i];
        if (u->numel == 0)
            continue;
        moe_unit_layout l = moe_parallel_plan_unit(&rt->plan, u->expert_index, u->numel);
        u->sharded = l.sharded;
        u->padded = l.padded;
        u->shard = l.shard;
        if (u->sharded) {
            snprintf(what, sizeof what, "parameter shard of %s", u->name);
            MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->shard * moe_dtype_size(act), what, &u->param_shard));
            snprintf(what, sizeof what, "gradient shard of %s", u->name);
            MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->shard * moe_dtype_size(gdt), what, &u->grad_shard));
        } else {
            snprintf(what, sizeof what, "parameters of %s", u->name);
            MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->padded * moe_dtype_size(act), what, &u->param));
            snprintf(what, sizeof what, "gradients of %s", u->name);
            MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->padded * moe_dtype_size(gdt), what, &u->grad));
        }
        if (rt->cfg.master_weights) {
            snprintf(what, sizeof what, "fp32 master weights of %s", u->name);
            MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->shard * 4u, what, &u->master));
        }
    }
    rt->allocated = 1;
    /* Every rank initialises whole units (the values do not depend on the
     * rank) and keeps its shard: in fp32 when there is a master copy (then
     * rounded once into the params), else straight in the parameter dtype. */
    for (int i = 0; i < rt->n_units; i++) {
        moe_unit_entry *u = &rt->units[i];
        if (u->numel == 0)
            continue;
        void *full = u->param, *full32 = NULL;
        moe_status st = MOE_OK;
        if (u->sharded) {
            snprintf(what, sizeof what, "initialisation of %s", u->name);
            MOE_TRY(rt->be->alloc(rt->ctx, (uint64_t)u->padded * moe_dtype_size(act), what, &full));
            st = rt->host.ops->fill(rt->ctx, full, act, u->padded, 0.0f); /* the padding stays 0 */
        }
        if (st == MOE_OK && u->master) {
            snprintf(what, sizeof what, "fp32 initialisation of %s", u->name);
            st = rt->be->alloc(rt->ctx, (uint64_t)u->padded * 4u, what, &full32);
            if (st == MOE_OK)
                st = rt->host.ops->fill(rt->ctx, full32, MOE_F32, u->padded, 0.0f);
        }
        for (int k = 0; k < rt->n_params && st == MOE_OK; k++) {
            const moe_param_entry *p = &rt->params[k];
            if (p->unit != i)
                continue;
            if (full32)
                st = init_tensor(rt, p, offset_ptr(full32, p->offset, MOE_F32), MOE_F32);
            else
                st = init_tensor(rt, p, offset_ptr(full, p->offset, act), act);
        }
        const int64_t first = moe_parallel_plan_unit(&rt->plan, u->expert_index, u->numel).start;
        if (full32 && st == MOE_OK)
            st = rt->host.ops->cast(rt->ctx, full, act, full32, MOE_F32, u->padded);
        if (full32 && st == MOE_OK)
            st = rt->be->copy(rt->ctx, u->master, offset_ptr(full32, first, MOE_F32), (uint64_t)u->shard * 4u);
        if (u->sharded && st == MOE_OK)
            st = rt->be->copy(rt->ctx, u->param_shard, offset_ptr(full, first, act),
                              (uint64_t)u->shard * moe_dtype_size(act));
        if (full32)
            rt->be->free(rt->ctx, full32);
        if (u->sharded)
            rt->be->free(rt->ctx, full);
        MOE_TRY(st);
    }
    return moe_runtime_zero_grads(rt);
}

/* Gradients between updates: whole for unsharded units, the shard for sharded
 * ones (their whole gradients live only inside a gather). A prefetch the
 * last update left unused read shards the optimizer has changed since: it is
 * dropped. */
moe_status moe_runtime_zero_grads(moe_runtime *rt)
{
    MOE_TRY(moe_fsdp_finish(rt));
    for (int i = 0; i < rt->n_units; i++) {
        moe_unit_entry *u = &rt->units[i];
        if (u->prefetched)
            MOE_TRY(moe_fsdp_prefetch_finish(rt, u, 1));
        if (u->sharded)
            MOE_TRY(rt->host.ops->fill(rt->ctx, u->grad_shard, rt->cfg.grad_dtype, u->shard, 0.0f));
        else if (u->grad)
            MOE_TRY(rt->host.ops->fill(rt->ctx, u->grad, rt->cfg.grad_dtype, u->padded, 0.0f));
    }
    return MOE_OK;
}

/* ------------------------------------------------------------------ tests */

moe_status moe_runtime_create_for_test(int nargs, const char *const *args, moe_runtime **out)
{
    *out = NULL;
    moe_opts *opts = NULL;
    moe_registry *reg = NULL;
    moe_status st;
    MOE_TRY_GOTO(st, moe_opts_create(&opts), fail);
    char **argv = calloc((size_t)nargs + 2, sizeof *argv);
    if (!argv) {
        st = moe_error_set(MOE_ERR_NOMEM, "out of host memory");
        goto fail;
    }
    argv[0] = (char *)"moelm-test";
    for (int i = 0; i < nargs; i++)
        argv[i + 1] = (char *)args[i];
    st = moe_opts_parse(opts, nargs + 1, argv, 0);
    free(argv);
    if (st != MOE_OK)
        goto fail;
    MOE_TRY_GOTO(st, moe_registry_create(moe_opts_str(opts, "user-dir"), &reg), fail);
    moe_runtime_config cfg = {0};
    cfg.backend = "cpu";
    /* --distributed-backend mpi joins the MPI job the test runs in */
    cfg.communicator = moe_opts_given(opts, "distributed-backend") ? moe_opts_str(opts, "distributed-backend")
                                                                   : "single";
    cfg.fully_sharded = strcmp(moe_opts_str(opts, "ddp-backend"), "fully_sharded") == 0;
    cfg.device_id = -1;
    cfg.seed = (uint64_t)moe_opts_int(opts, "seed");
    int loss_scaling;
    moe_config_precision(opts, &cfg.act_dtype, &cfg.grad_dtype, &cfg.master_weights, &loss_scaling);
    moe_runtime *rt;
    MOE_TRY_GOTO(st, moe_runtime_create(opts, reg, &cfg, &rt), fail);
    rt->owns_opts = 1;
    st = moe_runtime_set_args(rt, nargs, args);
    if (st != MOE_OK) {
        moe_runtime_destroy(rt);
        return st;
    }
    *out = rt;
    return MOE_OK;
fail:
    moe_registry_destroy(reg);
    moe_opts_destroy(opts);
    return st;
}
