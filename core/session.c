/* session.c: see session.h. */
#include "core/session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/checkpoint.h"
#include "core/components.h"
#include "core/config.h"
#include "core/internal.h"
#include "core/launch.h"
#include "core/log.h"

/* What the training run's command line says about how it was distributed,
 * checkpointed or trained, and what no tool inherits from it. */
static const char *const run_only[] = {
    "distributed-world-size", "distributed-rank", "distributed-init-method", "distributed-port", "device-id",
    "distributed-backend", "ddp-backend", "checkpoint-activations", "restore-file", "save-dir",
    "save-interval-updates", "keep-interval-updates", "no-save", "dry-run", "help", "version", "list-plugins",
    "user-dir", "cpu", "log-format", "log-interval", "reset-optimizer", "reset-dataloader", "reset-lr-scheduler",
    "reset-meters", "max-update", "max-epoch",
};

static moe_status reset_run_only(moe_opts *o, const moe_session_config *cfg)
{
    for (size_t i = 0; i < sizeof run_only / sizeof run_only[0]; i++)
        MOE_TRY(moe_opts_reset(o, run_only[i]));
    for (int i = 0; cfg->reset && cfg->reset[i]; i++)
        MOE_TRY(moe_opts_reset(o, cfg->reset[i]));
    return MOE_OK;
}

/* argv-style parse of a list without argv[0] */
static moe_status parse_list(moe_opts *o, int n, char **args, int strict)
{
    char **argv = calloc((size_t)n + 2, sizeof *argv);
    if (!argv)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    argv[0] = (char *)"moelm";
    for (int i = 0; i < n; i++)
        argv[i + 1] = args[i];
    moe_status st = moe_opts_parse(o, n + 1, argv, strict);
    free(argv);
    return st;
}

/* The stored command line, then the tool's (which wins). */
static moe_status parse_both(moe_session *s, const moe_session_config *cfg, int n_stored, char **stored, int argc,
                             char **argv, int strict)
{
    if (n_stored > 0)
        MOE_TRY(parse_list(s->opts, n_stored, stored, 0));
    MOE_TRY(reset_run_only(s->opts, cfg));
    return moe_opts_parse(s->opts, argc, argv, strict);
}

/* A session computes with the parameters alone: --fp16/--bf16 become their
 * memory-efficient forms, which keep no fp32 master copy. */
static moe_status no_masters(moe_opts *o)
{
    if (moe_opts_flag(o, "fp16") && !moe_opts_flag(o, "memory-efficient-fp16"))
        MOE_TRY(moe_opts_set(o, "memory-efficient-fp16", "1"));
    if (moe_opts_flag(o, "bf16") && !moe_opts_flag(o, "memory-efficient-bf16"))
        MOE_TRY(moe_opts_set(o, "memory-efficient-bf16", "1"));
    return MOE_OK;
}

static moe_status open_session(moe_session *s, const moe_session_config *cfg, int argc, char **argv)
{
    moe_status st;
    moe_log_configure(stdout, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE);
    s->usage_error = 1;
    MOE_TRY(moe_opts_create(&s->opts));
    moe_opts_set_program(s->opts, cfg->prog, cfg->usage, cfg->about);
    if (cfg->n_options > 0)
        MOE_TRY(moe_opts_add_table(s->opts, cfg->prog, cfg->options, cfg->n_options));
    for (int i = 0; i < cfg->n_positional; i++)
        if (strcmp(cfg->positional[i], "data") != 0)
            MOE_TRY(moe_opts_add_positional(s->opts, cfg->positional[i]));
    MOE_TRY(moe_opts_parse(s->opts, argc, argv, 0));
    int help = moe_opts_flag(s->opts, "help");

    /* the training command line the checkpoint holds */
    int n_stored = 0;
    char **stored = NULL;
    const char *path = moe_opts_known(s->opts, "path") ? moe_opts_str(s->opts, "path") : NULL;
    if (path && *path && !help) {
        snprintf(s->ckpt_path, sizeof s->ckpt_path, "%s", path);
        s->usage_error = 0;
        MOE_TRY(moe_ckpt_read_args(s->ckpt_path, &n_stored, &stored));
        s->usage_error = 1;
    } else if (cfg->need_checkpoint && !help) {
        return moe_error_set(MOE_ERR_INVALID_ARG, "the following argument is required: --path (a checkpoint)");
    }
    st = parse_both(s, cfg, n_stored, stored, argc, argv, 0);
    if (st == MOE_OK)
        st = moe_registry_create(moe_opts_str(s->opts, "user-dir"), &s->reg);
    moe_selection sel;
    memset(&sel, 0, sizeof sel);
    moe_launch launch;
    memset(&launch, 0, sizeof launch);
    if (st == MOE_OK)
        st = moe_components_backend(s->opts, s->reg, &sel.backend);
    if (st == MOE_OK && !help)
        st = moe_components_launch(s->opts, s->reg, sel.backend, 0, &launch);
    if (st == MOE_OK)
        st = moe_components_select(s->opts, &launch, 0, &sel);
    if (st != MOE_OK && help) {
        moe_error_clear();
        st = MOE_OK;
    }
    if (st == MOE_OK)
        st = moe_components_load(s->opts, s->reg, &sel, help, &s->lc);
    if (st == MOE_OK && help) {
        moe_opts_print_help(s->opts, stdout);
        moe_ckpt_free_args(n_stored, stored);
        return MOE_OK;
    }
    /* again, now that every selected plugin's flags are known */
    if (st == MOE_OK)
        st = parse_both(s, cfg, n_stored, stored, argc, argv, 1);
    moe_ckpt_free_args(n_stored, stored);
    MOE_TRY(st);
    MOE_TRY(no_masters(s->opts));
    if (cfg->prepare)
        MOE_TRY(cfg->prepare(s->opts, cfg->prepare_arg));
    moe_log_format fmt = MOE_LOG_FORMAT_SIMPLE;
    if (moe_opts_str(s->opts, "log-format"))
        MOE_TRY(moe_log_parse_format(moe_opts_str(s->opts, "log-format"), &fmt));
    if (launch.spawn > 0) { /* this process only starts the ranks of its node */
        s->exit_code = moe_launch_spawn(&launch, argv);
        s->done = 1;
        return MOE_OK;
    }
    MOE_TRY(moe_components_apply_launch(s->opts, &launch));
    s->usage_error = 0;

    MOE_TRY(moe_components_runtime(s->opts, s->reg, &sel, &launch, 0, argc - 1, argv + 1, &s->rt));
    const moe_host *h = moe_runtime_host(s->rt);
    moe_log_configure(stdout, h->rank, h->world, MOE_LOG_INFO, fmt);
    snprintf(s->names[0], sizeof s->names[0], "%s", sel.arch);
    snprintf(s->names[1], sizeof s->names[1], "%s", sel.task ? sel.task : "");
    snprintf(s->names[2], sizeof s->names[2], "%s", sel.gate ? sel.gate : "");
    s->arch_name = s->names[0];
    s->task_name = s->names[1];
    s->gate_name = s->names[2];
    MOE_TRY(moe_components_build(s->rt, &sel, &s->lc, cfg->need_task, 0, 1, &s->c));
    MOE_TRY(moe_runtime_alloc_params(s->rt));
    if (s->ckpt_path[0]) {
        MOE_TRY(moe_ckpt_load_params(s->rt, s->ckpt_path, &s->num_updates));
        /* the gates' state (the expert bias routes in evaluation too) */
        moe_ckpt_buffer *gb;
        int ngb;
        MOE_TRY(moe_ckpt_gate_buffers(s->rt, s->c.arch, s->c.model, &gb, &ngb));
        moe_status lst = moe_ckpt_load_buffers(s->rt, s->ckpt_path, gb, ngb);
        moe_ckpt_free_buffers(gb, ngb);
        MOE_TRY(lst);
        moe_log(MOE_LOG_INFO, "fairseq.checkpoint_utils", "loaded checkpoint %s (%lld updates)", s->ckpt_path,
                (long long)s->num_updates);
        /* randomness the model draws in evaluation (top-2 'sampling' adds
         * Gumbel noise there too, as fairseq) follows --seed + num_updates,
         * as in the training run's validation of this checkpoint */
        moe_runtime_set_step_seed(s->rt, h->seed + (uint64_t)s->num_updates);
    } else {
        moe_log(MOE_LOG_WARNING, cfg->prog, "no --path: the model's parameters are randomly initialised");
    }
    s->h = h;
    return MOE_OK;
}

moe_status moe_session_open(const moe_session_config *cfg, int argc, char **argv, moe_session **out)
{
    moe_session *s = calloc(1, sizeof *s);
    *out = s;
    if (!s)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory");
    return open_session(s, cfg, argc, argv);
}

int moe_session_start(const moe_session_config *cfg, int argc, char **argv, moe_session **out)
{
    moe_session *s = NULL;
    moe_status st = moe_session_open(cfg, argc, argv, &s);
    int rc = -1;
    if (st != MOE_OK)
        rc = moe_error_report(cfg->prog, st, s ? s->usage_error : 1);
    else if (!s->h)
        rc = s->done ? s->exit_code : 0;
    if (rc >= 0) {
        moe_session_close(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

void moe_session_close(moe_session *s)
{
    if (!s)
        return;
    moe_components_teardown(&s->c, &s->lc);
    moe_runtime_destroy(s->rt);
    moe_registry_destroy(s->reg);
    moe_opts_destroy(s->opts);
    free(s);
}
