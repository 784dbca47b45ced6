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

#include "core/components.h"
#include "core/config.h"
#include "core/dryrun.h"
#include "core/internal.h"
#include "core/launch.h"
#include "core/log.h"
#include "core/opwrap.h"
#include "core/options.h"
#include "core/profile.h"
#include "core/registry.h"
#include "core/runctl.h"
#include "core/runtime.h"
#include "core/trainer.h"

#define PROG "moelm-train"

typedef struct cli_state {
    moe_opts *opts;
    moe_registry *reg;
    moe_runtime *rt;
    int argc;
    char **argv;
    moe_components c;              /* built components, torn down before the runtime */
    moe_loaded_components lc;
} cli_state;

/* Components go first (they free backend memory through the host), then the
 * plugins' unload hooks, then the runtime, the registry and the options. */
static void cleanup(cli_state *s)
{
    moe_components_teardown(&s->c, &s->lc);
    moe_runctl_uninstall();
    moe_runtime_destroy(s->rt);
    moe_registry_destroy(s->reg);
    moe_opts_destroy(s->opts);
    moe_log_close_file();
    moe_profile_reset();
}

static int fail(moe_status st, int usage_error) { return moe_error_report(PROG, st, usage_error); }

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

    moe_selection sel;
    memset(&sel, 0, sizeof sel);
    int dry_run = moe_opts_flag(s->opts, "dry-run");
    if (dry_run)
        sel.backend = "cpu"; /* a plan needs no device (and probing one can take a second) */
    else
        MOE_TRY_GOTO(st, moe_components_backend(s->opts, s->reg, &sel.backend), usage);
    moe_launch launch;
    MOE_TRY_GOTO(st, moe_components_launch(s->opts, s->reg, sel.backend, dry_run, &launch), usage);
    int world = launch.world;
    st = moe_components_select(s->opts, &launch, 1, &sel);
    if (st != MOE_OK) {
        if (!help)
            goto usage;
        moe_error_clear();
    }

    /* phase two: each selected component adds its own flags */
    MOE_TRY_GOTO(st, moe_components_load(s->opts, s->reg, &sel, help, &s->lc), usage);
    if (help) {
        moe_opts_print_help(s->opts, stdout);
        return 0;
    }
    MOE_TRY_GOTO(st, moe_opts_parse(s->opts, s->argc, s->argv, 1), usage);
    MOE_TRY_GOTO(st, moe_config_check(s->opts, world), usage);

    moe_log_format fmt = MOE_LOG_FORMAT_SIMPLE;
    if (moe_opts_str(s->opts, "log-format"))
        MOE_TRY_GOTO(st, moe_log_parse_format(moe_opts_str(s->opts, "log-format"), &fmt), usage);
    MOE_TRY_GOTO(st, moe_log_open_file(moe_opts_str(s->opts, "log-file")), usage);
    /* a --save-dir that cannot take checkpoints fails now, not after the first hours of training */
    if (!dry_run && !moe_opts_flag(s->opts, "no-save"))
        MOE_TRY_GOTO(st, moe_runctl_check_save_dir(moe_opts_str(s->opts, "save-dir")), usage);
    if (!dry_run && launch.spawn <= 0)
        MOE_TRY_GOTO(st, moe_profile_configure(moe_opts_str(s->opts, "profile"), moe_opts_str(s->opts, "profile-updates")),
                     usage);

    if (!dry_run && launch.spawn > 0) /* this process only starts the ranks of its node */
        return moe_launch_spawn(&launch, s->argv);
    if (!dry_run) /* what the communicator plugins read */
        MOE_TRY_GOTO(st, moe_components_apply_launch(s->opts, &launch), failure);

    MOE_TRY_GOTO(st, moe_components_runtime(s->opts, s->reg, &sel, &launch, dry_run, s->argc - 1, s->argv + 1, &s->rt),
                 failure);
    const moe_host *h = moe_runtime_host(s->rt);
    moe_log_configure(stdout, h->rank, h->world, MOE_LOG_INFO, fmt);
    if (h->world > 1)
        moe_log(MOE_LOG_INFO, "fairseq.distributed.utils", "distributed init (rank %d of %d, launched by %s)", h->rank,
                h->world, moe_launch_method_name(launch.method));
    /* --profile, --tensorboard-logdir and --log-expert-load watch the ops and
     * collectives, --moe-dropless the routing when it names an overloaded
     * expert: wrap them before any plugin sees them */
    const char *tb_dir = moe_opts_str(s->opts, "tensorboard-logdir");
    const int dropless = moe_opts_known(s->opts, "moe-dropless") && moe_opts_flag(s->opts, "moe-dropless");
    if (!dry_run && (moe_profile_wanted() || (tb_dir && *tb_dir) || moe_opts_flag(s->opts, "log-expert-load") ||
                     dropless))
        MOE_TRY_GOTO(st, moe_opwrap_install(s->rt), failure);
    moe_components *cp = &s->c;
    st = moe_components_build(s->rt, &sel, &s->lc, 1, 0, 0, cp);
    if (st == MOE_ERR_INVALID_ARG) /* a component refused a value of its flags: an argument error */
        goto usage;
    if (st != MOE_OK)
        goto failure;

    if (dry_run) {
        MOE_TRY_GOTO(st, moe_dry_run(s->rt, cp, stdout), failure);
    } else {
        moe_log(MOE_LOG_INFO, "fairseq_cli.train", "model %s, criterion %s, optimizer %s, lr scheduler %s, gate %s",
                sel.arch, sel.criterion, sel.optimizer, sel.lr_scheduler, sel.gate);
        moe_log_param_counts(s->rt);
        moe_log(MOE_LOG_INFO, "fairseq_cli.train", "training on %d devices (%s)", h->world,
                strcmp(sel.backend, "cpu") == 0 ? "CPUs" : "GPUs/TPUs");
        MOE_TRY_GOTO(st, moe_runtime_alloc_params(s->rt), failure);
        MOE_TRY_GOTO(st, moe_runctl_install(moe_opts_flag(s->opts, "save-on-sigint")), failure);
        moe_runctl_watch_launcher(launch.method == MOE_LAUNCH_MPI);
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
