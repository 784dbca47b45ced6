/* main.c: moelm-train, fairseq's train.py with the same flags.
 *
 * Resolves every component by name (registry), parses the command line in two
 * phases (core flags, then each selected plugin's own flags), checks the
 * combination, then either plans (--dry-run), lists (--list-plugins), prints
 * help, or trains. Every failure ends here as one line on stderr:
 *   moelm-train: error: <what was expected, what was found, what to do>
 * with exit status 2 for command-line mistakes and 1 for failures while running.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/dryrun.h"
#include "core/internal.h"
#include "core/launch.h"
#include "core/log.h"
#include "core/options.h"
#include "core/registry.h"
#include "core/runtime.h"
#include "core/trainer.h"

#define PROG "moelm-train"

typedef struct cli_state {
    moe_opts *opts;
    moe_registry *reg;
    moe_runtime *rt;
    int argc;
    char **argv;
    moe_components c;               /* built components, torn down before the runtime */
    const moe_plugin_desc *loaded[16]; /* plugins whose load hook ran */
    int n_loaded;
} cli_state;

/* Components go first (they free backend memory through the host), then the
 * plugins' unload hooks, then the runtime, the registry and the options. */
static void cleanup(cli_state *s)
{
    if (s->c.model)
        s->c.arch->destroy(s->c.model);
    if (s->c.task_state)
        s->c.task->destroy(s->c.task_state);
    for (int i = s->n_loaded - 1; i >= 0; i--)
        if (s->loaded[i]->unload)
            s->loaded[i]->unload();
    moe_runtime_destroy(s->rt);
    moe_registry_destroy(s->reg);
    moe_opts_destroy(s->opts);
}

static int fail(moe_status st, int usage_error)
{
    const char *msg = moe_error_message();
    fprintf(stderr, PROG ": error: %s\n", msg && *msg ? msg : moe_status_name(st));
    const char *trace = moe_error_trace_text();
    if (getenv("MOE_DEBUG") && trace && *trace)
        fprintf(stderr, "%s\n", trace);
    return usage_error ? 2 : 1;
}

/* The component names the command line selects (fairseq's defaults where it
 * has one; an arch is required, as in fairseq). Copies: option values move
 * when the command line is parsed again. */
#define NAME_MAX_LEN 128
typedef struct selection {
    const char *arch, *task, *criterion, *optimizer, *lr_scheduler, *gate, *normalizer, *backend, *communicator;
    char store[9][NAME_MAX_LEN];
} selection;

static const char *keep(selection *sel, int slot, const char *name)
{
    if (!name)
        return NULL;
    snprintf(sel->store[slot], NAME_MAX_LEN, "%s", name);
    return sel->store[slot];
}

static moe_status backend_choice(cli_state *s, const char **out)
{
    if (moe_opts_flag(s->opts, "cpu")) {
        *out = "cpu";
        return MOE_OK;
    }
    /* a GPU is used when the cuda backend is installed and sees a device */
    const moe_plugin_desc *d;
    char **names;
    int n = moe_registry_names(s->reg, MOE_KIND_BACKEND, &names);
    int have_cuda = 0;
    for (int i = 0; i < n; i++)
        have_cuda |= strcmp(names[i], "cuda") == 0;
    moe_registry_free_names(names, n);
    *out = "cpu";
    if (have_cuda && moe_registry_load(s->reg, MOE_KIND_BACKEND, "cuda", &d) == MOE_OK &&
        ((const moe_backend_ops *)d->ops)->available())
        *out = "cuda";
    moe_error_clear();
    return MOE_OK;
}

static moe_status select_components(cli_state *s, const moe_launch *l, selection *sel)
{
    moe_opts *o = s->opts;
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
                                                  "mpirun -np %d moelm-train ...",
                             l->world, l->world);
    if (!sel->arch)
        return moe_error_set(MOE_ERR_INVALID_ARG, "the following argument is required: --arch (see --list-plugins)");
    if (!sel->optimizer)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "the following argument is required: --optimizer (installed ones: --list-plugins)");
    return MOE_OK;
}

/* Load a component and add its options to the command line. */
static moe_status load_component(cli_state *s, moe_plugin_kind kind, const char *name, const moe_plugin_desc **d)
{
    MOE_TRY(moe_registry_load(s->reg, kind, name, d));
    if ((*d)->n_options > 0) {
        char owner[160];
        snprintf(owner, sizeof owner, "%s %s", moe_kind_name(kind), name);
        MOE_TRY(moe_opts_add_table(s->opts, owner, (*d)->options, (*d)->n_options));
    }
    return MOE_OK;
}

static int run(cli_state *s)
{
    moe_status st;
    moe_log_configure(stdout, 0, 1, MOE_LOG_INFO, MOE_LOG_FORMAT_SIMPLE);
    MOE_TRY_GOTO(st, moe_opts_create(&s->opts), usage);
    MOE_TRY_GOTO(st, moe_opts_parse(s->opts, s->argc, s->argv, 0), usage);

    if (moe_opts_flag(s->opts, "version")) {
        printf("moelm %s (plugin ABI %d.%d)\n", MOE_VERSION, MOE_ABI_MAJOR, MOE_ABI_MINOR);
        return 0;
    }
    MOE_TRY_GOTO(st, moe_registry_create(moe_opts_str(s->opts, "user-dir"), &s->reg), usage);
    if (moe_opts_flag(s->opts, "list-plugins")) {
        MOE_TRY_GOTO(st, moe_registry_print(s->reg, stdout), failure);
        return 0;
    }
    int help = moe_opts_flag(s->opts, "help");

    selection sel;
    memset(&sel, 0, sizeof sel);
    int dry_run = moe_opts_flag(s->opts, "dry-run");
    if (dry_run)
        sel.backend = "cpu"; /* a plan needs no device (and probing one can take a second) */
    else
        MOE_TRY_GOTO(st, backend_choice(s, &sel.backend), usage);
    moe_launch launch;
    if (dry_run) {
        /* plan for the requested world without joining one */
        memset(&launch, 0, sizeof launch);
        launch.world = moe_opts_has_value(s->opts, "distributed-world-size")
                           ? (int)moe_opts_int(s->opts, "distributed-world-size")
                           : 1;
    } else {
        const moe_plugin_desc *bd;
        MOE_TRY_GOTO(st, moe_registry_load(s->reg, MOE_KIND_BACKEND, sel.backend, &bd), usage);
        int devices = ((const moe_backend_ops *)bd->ops)->available();
        MOE_TRY_GOTO(st, moe_launch_detect(s->opts, devices > 0 ? devices : 1, &launch), usage);
    }
    int world = launch.world;
    st = select_components(s, &launch, &sel);
    if (st != MOE_OK) {
        if (!help)
            goto usage;
        moe_error_clear();
    }

    /* phase two: each selected component adds its own flags */
    const moe_plugin_desc *d_arch = NULL, *d_task = NULL, *d_crit = NULL, *d_opt = NULL, *d_sched = NULL,
                          *d_gate = NULL, *d_norm = NULL;
    struct {
        moe_plugin_kind kind;
        const char *name;
        const moe_plugin_desc **d;
    } comp[] = {
        {MOE_KIND_ARCH, sel.arch, &d_arch},
        {MOE_KIND_TASK, sel.task, &d_task},
        {MOE_KIND_CRITERION, sel.criterion, &d_crit},
        {MOE_KIND_OPTIMIZER, sel.optimizer, &d_opt},
        {MOE_KIND_LR_SCHEDULER, sel.lr_scheduler, &d_sched},
        {MOE_KIND_GATE, sel.gate, &d_gate},
        {MOE_KIND_NORMALIZER, sel.normalizer, &d_norm},
    };
    for (size_t i = 0; i < sizeof comp / sizeof comp[0]; i++) {
        if (!comp[i].name)
            continue;
        st = load_component(s, comp[i].kind, comp[i].name, comp[i].d);
        if (st != MOE_OK) {
            if (help) { /* help still shows what it can */
                moe_error_clear();
                continue;
            }
            goto usage;
        }
    }
    if (help) {
        moe_opts_print_help(s->opts, stdout);
        return 0;
    }
    MOE_TRY_GOTO(st, moe_opts_parse(s->opts, s->argc, s->argv, 1), usage);
    MOE_TRY_GOTO(st, moe_config_check(s->opts, world), usage);

    moe_log_format fmt = MOE_LOG_FORMAT_SIMPLE;
    if (moe_opts_str(s->opts, "log-format"))
        MOE_TRY_GOTO(st, moe_log_parse_format(moe_opts_str(s->opts, "log-format"), &fmt), usage);

    if (!dry_run && launch.spawn > 0) /* this process only starts the ranks of its node */
        return moe_launch_spawn(&launch, s->argv);
    if (!dry_run && launch.world > 1) {
        /* what the communicator plugins read */
        char buf[300];
        snprintf(buf, sizeof buf, "%d", launch.world);
        MOE_TRY_GOTO(st, moe_opts_set(s->opts, "distributed-world-size", buf), failure);
        snprintf(buf, sizeof buf, "%d", launch.rank);
        MOE_TRY_GOTO(st, moe_opts_set(s->opts, "distributed-rank", buf), failure);
        snprintf(buf, sizeof buf, "%d", launch.local_rank);
        MOE_TRY_GOTO(st, moe_opts_set(s->opts, "device-id", buf), failure);
        if (launch.master_port > 0) {
            snprintf(buf, sizeof buf, "tcp://%s:%d", launch.master_addr, launch.master_port);
            MOE_TRY_GOTO(st, moe_opts_set(s->opts, "distributed-init-method", buf), failure);
        }
    }

    moe_runtime_config cfg = {0};
    cfg.backend = dry_run ? "cpu" : sel.backend;
    cfg.communicator = dry_run ? NULL : sel.communicator;
    cfg.device_id = launch.world > 1 ? launch.local_rank
                    : moe_opts_has_value(s->opts, "device-id") ? (int)moe_opts_int(s->opts, "device-id")
                                                                : -1;
    cfg.seed = (uint64_t)moe_opts_int(s->opts, "seed");
    cfg.dry_run = dry_run;
    cfg.fully_sharded = strcmp(moe_opts_str(s->opts, "ddp-backend"), "fully_sharded") == 0;
    int loss_scaling;
    moe_config_precision(s->opts, &cfg.act_dtype, &cfg.grad_dtype, &cfg.master_weights, &loss_scaling);
    MOE_TRY_GOTO(st, moe_runtime_create(s->opts, s->reg, &cfg, &s->rt), failure);
    MOE_TRY_GOTO(st, moe_runtime_set_args(s->rt, s->argc - 1, (const char *const *)s->argv + 1), failure);
    const moe_host *h = moe_runtime_host(s->rt);
    moe_log_configure(stdout, h->rank, h->world, MOE_LOG_INFO, fmt);
    if (h->world > 1)
        moe_log(MOE_LOG_INFO, "fairseq.distributed.utils", "distributed init (rank %d of %d, launched by %s)", h->rank,
                h->world, moe_launch_method_name(launch.method));
    moe_runtime_set_gate(s->rt, d_gate->ops);
    for (size_t i = 0; i < sizeof comp / sizeof comp[0]; i++)
        if (*comp[i].d && (*comp[i].d)->load) {
            MOE_TRY_GOTO(st, (*comp[i].d)->load(h), failure);
            s->loaded[s->n_loaded++] = *comp[i].d;
        }

    moe_components *cp = &s->c, c = {0};
    c.arch = d_arch->ops;
    c.task = d_task->ops;
    c.criterion = d_crit->ops;
    c.criterion_name = sel.criterion;
    c.optimizer = d_opt->ops;
    c.lr_scheduler = d_sched->ops;
    c.normalizer = d_norm->ops;
    *cp = c;
    MOE_TRY_GOTO(st, cp->task->init(h, &cp->task_state), failure);
    moe_runtime_set_padding_idx(s->rt, cp->task->padding_idx(cp->task_state));
    MOE_TRY_GOTO(st, cp->arch->build(h, cp->task->vocab_size(cp->task_state), cp->task->padding_idx(cp->task_state),
                                     &cp->model),
                 failure);

    if (dry_run) {
        MOE_TRY_GOTO(st, moe_dry_run(s->rt, cp, stdout), failure);
    } else {
        moe_log(MOE_LOG_INFO, "fairseq_cli.train", "model %s, criterion %s, optimizer %s, lr scheduler %s, gate %s",
                sel.arch, sel.criterion, sel.optimizer, sel.lr_scheduler, sel.gate);
        moe_log_param_counts(s->rt);
        moe_log(MOE_LOG_INFO, "fairseq_cli.train", "training on %d devices (%s)", h->world,
                strcmp(sel.backend, "cpu") == 0 ? "CPUs" : "GPUs/TPUs");
        MOE_TRY_GOTO(st, moe_runtime_alloc_params(s->rt), failure);
        MOE_TRY_GOTO(st, moe_train(s->rt, cp), failure);
    }
    return 0;
usage:
    return fail(st, 1);
failure:
    return fail(st, 0);
}

int main(int argc, char **argv)
{
    cli_state s = {0};
    s.argc = argc;
    s.argv = argv;
    int rc = run(&s);
    fflush(stdout);
    cleanup(&s);
    return rc;
}
