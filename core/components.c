/* components.c: see components.h. */
#include "core/components.h"

#include <stdio.h>
#include <string.h>

#include "core/config.h"
#include "core/internal.h"

static const char *keep(moe_selection *sel, int slot, const char *name)
{
    if (!name)
        return NULL;
    snprintf(sel->store[slot], MOE_SELECTION_NAME_MAX, "%s", name);
    return sel->store[slot];
}

moe_status moe_components_backend(moe_opts *o, moe_registry *reg, const char **out)
{
    *out = "cpu";
    if (moe_opts_flag(o, "cpu"))
        return MOE_OK;
    /* a GPU is used when the cuda backend is installed and sees a device */
    const moe_plugin_desc *d;
    char **names;
    int n = moe_registry_names(reg, MOE_KIND_BACKEND, &names);
    int have_cuda = 0;
    for (int i = 0; i < n; i++)
        have_cuda |= strcmp(names[i], "cuda") == 0;
    moe_registry_free_names(names, n);
    if (have_cuda && moe_registry_load(reg, MOE_KIND_BACKEND, "cuda", &d) == MOE_OK &&
        ((const moe_backend_ops *)d->ops)->available())
        *out = "cuda";
    moe_error_clear();
    return MOE_OK;
}

moe_status moe_components_launch(moe_opts *o, moe_registry *reg, const char *backend, int dry_run, moe_launch *l)
{
    memset(l, 0, sizeof *l);
    if (dry_run) {
        l->world = moe_opts_has_value(o, "distributed-world-size") ? (int)moe_opts_int(o, "distributed-world-size")
                                                                   : 1;
        return MOE_OK;
    }
    const moe_plugin_desc *bd;
    MOE_TRY(moe_registry_load(reg, MOE_KIND_BACKEND, backend, &bd));
    int devices = ((const moe_backend_ops *)bd->ops)->available();
    return moe_launch_detect(o, devices > 0 ? devices : 1, l);
}

moe_status moe_components_runtime(moe_opts *o, moe_registry *reg, const moe_selection *sel, const moe_launch *l,
                                  int dry_run, int argc, char **argv, moe_runtime **out)
{
    moe_runtime_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.backend = dry_run ? "cpu" : sel->backend;
    cfg.communicator = dry_run ? NULL : sel->communicator;
    cfg.device_id = l->world > 1                                ? l->local_rank
                    : moe_opts_has_value(o, "device-id") ? (int)moe_opts_int(o, "device-id")
                                                                : -1;
    cfg.seed = (uint64_t)moe_opts_int(o, "seed");
    cfg.dry_run = dry_run;
    const char *ddp = moe_opts_str(o, "ddp-backend");
    cfg.fully_sharded = ddp && strcmp(ddp, "fully_sharded") == 0;
    int loss_scaling;
    moe_config_precision(o, &cfg.act_dtype, &cfg.grad_dtype, &cfg.master_weights, &loss_scaling);
    MOE_TRY(moe_runtime_create(o, reg, &cfg, out));
    return moe_runtime_set_args(*out, argc, (const char *const *)argv);
}

moe_status moe_components_select(moe_opts *o, const moe_launch *l, int need_optimizer, moe_selection *sel)
{
    sel->arch = keep(sel, 0, moe_opts_str(o, "arch"));
    sel->task = keep(sel, 1, moe_opts_str(o, "task"));
    sel->criterion = keep(sel, 2, moe_opts_str(o, "criterion"));
    sel->optimizer = keep(sel, 3, moe_opts_str(o, "optimizer"));
    sel->lr_scheduler = keep(sel, 4, moe_opts_str(o, "lr-scheduler"));
    sel->gate = keep(sel, 5, moe_opts_str(o, "moe-gate"));
    if (!sel->gate)
        sel->gate = moe_opts_flag(o, "moe-top1-expert") ? "top1" : "top2";
    sel->normalizer = keep(sel, 6, moe_opts_str(o, "moe-normalize-expert-grad"));
    if (l->world <= 1 && !moe_opts_given(o, "distributed-backend"))
        sel->communicator = "single";
    else if (l->method == MOE_LAUNCH_MPI && strcmp(sel->backend, "cpu") == 0)
        sel->communicator = "mpi";
    else if (moe_opts_given(o, "distributed-backend"))
        sel->communicator = keep(sel, 7, moe_opts_str(o, "distributed-backend"));
    else
        sel->communicator = strcmp(sel->backend, "cuda") == 0 ? "nccl" : "mpi";
    /* (a dry run plans a world without launching one: method SINGLE) */
    if (l->world > 1 && strcmp(sel->communicator, "mpi") == 0 && l->method != MOE_LAUNCH_MPI &&
        l->method != MOE_LAUNCH_SINGLE)
        return moe_error_set(MOE_ERR_INVALID_ARG, "the mpi communicator needs an MPI launcher: start %d ranks with "
                                                  "mpirun -np %d ...",
                             l->world, l->world);
    if (!sel->arch)
        return moe_error_set(MOE_ERR_INVALID_ARG, "the following argument is required: --arch (see --list-plugins)");
    if (need_optimizer && !sel->optimizer)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "the following argument is required: --optimizer (installed ones: --list-plugins)");
    return MOE_OK;
}

moe_status moe_components_load(moe_opts *o, moe_registry *reg, const moe_selection *sel, int lenient,
                               moe_loaded_components *lc)
{
    const struct {
        moe_plugin_kind kind;
        const char *name;
    } comp[MOE_COMP_COUNT] = {
        [MOE_COMP_ARCH] = {MOE_KIND_ARCH, sel->arch},
        [MOE_COMP_TASK] = {MOE_KIND_TASK, sel->task},
        [MOE_COMP_CRITERION] = {MOE_KIND_CRITERION, sel->criterion},
        [MOE_COMP_OPTIMIZER] = {MOE_KIND_OPTIMIZER, sel->optimizer},
        [MOE_COMP_LR_SCHEDULER] = {MOE_KIND_LR_SCHEDULER, sel->lr_scheduler},
        [MOE_COMP_GATE] = {MOE_KIND_GATE, sel->gate},
        [MOE_COMP_NORMALIZER] = {MOE_KIND_NORMALIZER, sel->normalizer},
    };
    for (int i = 0; i < MOE_COMP_COUNT; i++) {
        if (!comp[i].name)
            continue;
        const moe_plugin_desc *d;
        moe_status st = moe_registry_load(reg, comp[i].kind, comp[i].name, &d);
        if (st == MOE_OK && d->n_options > 0) {
            char owner[160];
            snprintf(owner, sizeof owner, "%s %s", moe_kind_name(comp[i].kind), comp[i].name);
            st = moe_opts_add_table(o, owner, d->options, d->n_options);
        }
        if (st != MOE_OK) {
            if (!lenient)
                return st;
            moe_error_clear(); /* help still shows what it can */
            continue;
        }
        lc->d[i] = d;
    }
    return MOE_OK;
}

moe_status moe_components_apply_launch(moe_opts *o, const moe_launch *l)
{
    if (l->world <= 1)
        return MOE_OK;
    char buf[300];
    snprintf(buf, sizeof buf, "%d", l->world);
    MOE_TRY(moe_opts_set(o, "distributed-world-size", buf));
    snprintf(buf, sizeof buf, "%d", l->rank);
    MOE_TRY(moe_opts_set(o, "distributed-rank", buf));
    snprintf(buf, sizeof buf, "%d", l->local_rank);
    MOE_TRY(moe_opts_set(o, "device-id", buf));
    if (l->master_port > 0) {
        snprintf(buf, sizeof buf, "tcp://%s:%d", l->master_addr, l->master_port);
        MOE_TRY(moe_opts_set(o, "distributed-init-method", buf));
    }
    return MOE_OK;
}

moe_status moe_components_build(moe_runtime *rt, const moe_selection *sel, moe_loaded_components *lc, int build_task,
                                int64_t vocab, int padding_idx, moe_components *c)
{
    const moe_host *h = moe_runtime_host(rt);
    if (!lc->d[MOE_COMP_ARCH])
        return moe_error_set(MOE_ERR_INTERNAL, "the arch plugin was not loaded");
    if (lc->d[MOE_COMP_GATE])
        moe_runtime_set_gate(rt, lc->d[MOE_COMP_GATE]->ops);
    for (int i = 0; i < MOE_COMP_COUNT; i++)
        if (lc->d[i] && lc->d[i]->load) {
            moe_status st = lc->d[i]->load(h);
            if (st != MOE_OK)
                return moe_registry_hook_error(moe_runtime_registry(rt), lc->d[i], "load", st);
            lc->hooked[lc->n_hooked++] = lc->d[i];
        }
    memset(c, 0, sizeof *c);
    c->arch = lc->d[MOE_COMP_ARCH]->ops;
    c->task = lc->d[MOE_COMP_TASK] ? lc->d[MOE_COMP_TASK]->ops : NULL;
    c->criterion = lc->d[MOE_COMP_CRITERION] ? lc->d[MOE_COMP_CRITERION]->ops : NULL;
    c->criterion_name = sel->criterion;
    c->optimizer = lc->d[MOE_COMP_OPTIMIZER] ? lc->d[MOE_COMP_OPTIMIZER]->ops : NULL;
    c->lr_scheduler = lc->d[MOE_COMP_LR_SCHEDULER] ? lc->d[MOE_COMP_LR_SCHEDULER]->ops : NULL;
    c->normalizer = lc->d[MOE_COMP_NORMALIZER] ? lc->d[MOE_COMP_NORMALIZER]->ops : NULL;
    if (build_task) {
        if (!c->task)
            return moe_error_set(MOE_ERR_INTERNAL, "the task plugin was not loaded");
        MOE_TRY(c->task->init(h, &c->task_state));
        vocab = c->task->vocab_size(c->task_state);
        padding_idx = c->task->padding_idx(c->task_state);
    }
    moe_runtime_set_padding_idx(rt, padding_idx);
    moe_runtime_set_normalizer(rt, c->normalizer);
    return c->arch->build(h, vocab, padding_idx, &c->model);
}

void moe_components_teardown(moe_components *c, moe_loaded_components *lc)
{
    if (c->model)
        c->arch->destroy(c->model);
    if (c->task_state)
        c->task->destroy(c->task_state);
    c->model = c->task_state = NULL;
    for (int i = lc->n_hooked - 1; i >= 0; i--)
        if (lc->hooked[i]->unload)
            lc->hooked[i]->unload();
    lc->n_hooked = 0;
}
