/* components.h: the plugins a command line selects, loading them (with the
 * flags each adds), and building them on a runtime. moelm-train and the
 * tools that open a trained model (core/session.c) go through the same
 * steps, so a component is chosen and configured the same way everywhere.
 *
 * Not here: parsing (core/options.c), what flags mean together
 * (core/config.c), the training loop (core/trainer.c).
 */
#ifndef MOE_CORE_COMPONENTS_H
#define MOE_CORE_COMPONENTS_H

#include "core/launch.h"
#include "core/options.h"
#include "core/registry.h"
#include "core/runtime.h"
#include "core/trainer.h"

#define MOE_SELECTION_NAME_MAX 128

/* Component names (copies: option values move when the command line is
 * parsed again). NULL where nothing is selected. */
typedef struct moe_selection {
    const char *arch, *task, *criterion, *optimizer, *lr_scheduler, *gate, *normalizer, *backend, *communicator;
    char store[9][MOE_SELECTION_NAME_MAX];
} moe_selection;

/* The loaded descriptors, in the order components are built. */
enum { MOE_COMP_ARCH = 0, MOE_COMP_TASK, MOE_COMP_CRITERION, MOE_COMP_OPTIMIZER, MOE_COMP_LR_SCHEDULER, MOE_COMP_GATE,
       MOE_COMP_NORMALIZER, MOE_COMP_COUNT };
typedef struct moe_loaded_components {
    const moe_plugin_desc *d[MOE_COMP_COUNT];
    const moe_plugin_desc *hooked[MOE_COMP_COUNT]; /* whose load hook ran, for unload */
    int n_hooked;
} moe_loaded_components;

/* The backend: "cpu" with --cpu, else "cuda" when that plugin is installed
 * and sees a device, else "cpu". */
moe_status moe_components_backend(moe_opts *o, moe_registry *reg, const char **out);

/* How this process joins its run (core/launch.h), on the backend chosen;
 * a dry run plans for --distributed-world-size ranks without joining any. */
moe_status moe_components_launch(moe_opts *o, moe_registry *reg, const char *backend, int dry_run, moe_launch *l);

/* Names from the options, with fairseq's defaults (gate top2, or top1 with
 * --moe-top1-expert); the communicator from the launch. sel->backend must be
 * set by the caller. --arch is required; so is --optimizer when
 * need_optimizer. */
moe_status moe_components_select(moe_opts *o, const moe_launch *l, int need_optimizer, moe_selection *sel);

/* Loads every selected plugin and adds its flags to o. lenient (for --help):
 * a plugin that fails to load is skipped. */
moe_status moe_components_load(moe_opts *o, moe_registry *reg, const moe_selection *sel, int lenient,
                               moe_loaded_components *lc);

/* Writes what the communicator plugins read (world size, rank, device, the
 * rendezvous address) into the options. */
moe_status moe_components_apply_launch(moe_opts *o, const moe_launch *l);

/* The runtime for these options: sel's backend and communicator, this
 * process's device, --seed, the precision regime and the ddp backend; a dry
 * run gets the cpu, no communicator and no parameter memory. The command
 * line (argv without argv[0]) is what plugins loaded later parse. */
moe_status moe_components_runtime(moe_opts *o, moe_registry *reg, const moe_selection *sel, const moe_launch *l,
                                  int dry_run, int argc, char **argv, moe_runtime **out);

/* On a created runtime: the gate the arch drives, the plugins' load hooks,
 * then the task (when build_task; its vocabulary and padding index are the
 * model's) and the model (without a task: of `vocab` types, padding
 * `padding_idx`). c->criterion etc. are filled from what was loaded. */
moe_status moe_components_build(moe_runtime *rt, const moe_selection *sel, moe_loaded_components *lc, int build_task,
                                int64_t vocab, int padding_idx, moe_components *c);

/* Destroys the model and the task, then runs the unload hooks. */
void moe_components_teardown(moe_components *c, moe_loaded_components *lc);

#endif
