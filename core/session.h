/* session.h: a trained model opened for use by the tools (moelm-eval-lm,
 * moelm-generate, moelm-checkpoint export): the same options, plugins,
 * runtime, task and model moelm-train built, with the parameters of a
 * checkpoint of any world size.
 *
 * How the options are made: moelm-train's core table plus the tool's own
 * table; the training command line stored in the checkpoint is parsed first,
 * then the tool's command line, so the tool's flags win (DATA, --cpu, batch
 * sizes, --moe-eval-capacity-token-fraction, ...). What belongs to how the
 * training run was distributed or trained (world size and rank, the ddp
 * backend, activation checkpointing, --restore-file, saving) is cleared
 * before the tool's flags are read: a session runs on the ranks it is
 * launched with (one by default; torchrun variables or mpirun for several).
 *
 * What it is not: training. A session allocates parameters (no gradients
 * are used), no optimizer; the arch is set up by the tool for the batches it
 * runs.
 */
#ifndef MOE_CORE_SESSION_H
#define MOE_CORE_SESSION_H

#include "core/components.h"
#include "core/options.h"
#include "core/registry.h"
#include "core/runtime.h"
#include "core/trainer.h"

typedef struct moe_session_config {
    const char *prog;            /* "moelm-eval-lm": errors and help name it */
    const char *usage;           /* after "usage: <prog> " */
    const char *about;           /* help's paragraph */
    const moe_option *options;   /* the tool's own flags (may be NULL) */
    int n_options;
    /* the tool's positional arguments, in order, each a STRING option of
     * `options` (DATA for eval-lm and generate); at most 4 */
    const char *const *positional;
    int n_positional;
    int need_checkpoint;         /* --path is required (else: random init from the flags) */
    int need_task;               /* build the task (its dictionary; DATA needed) */
    /* options of the training command line the tool does not inherit (back
     * to their defaults before its own flags are read), NULL-terminated, or
     * NULL; the run's distribution and checkpointing flags always are */
    const char *const *reset;
    /* called once the options are final, before the runtime and the task are
     * made (a tool's defaults that depend on what was given), or NULL */
    moe_status (*prepare)(moe_opts *o, void *arg);
    void *prepare_arg;
} moe_session_config;

typedef struct moe_session {
    moe_opts *opts;
    moe_registry *reg;
    moe_runtime *rt;
    const moe_host *h;
    moe_components c;            /* arch + model, task (if built); no optimizer */
    const char *arch_name, *task_name, *gate_name;
    char ckpt_path[4096];        /* the checkpoint --path named ("" without one) */
    int64_t num_updates;         /* of the checkpoint (0 without one) */
    int usage_error;             /* a failure of moe_session_open was the command line's */
    int done, exit_code;         /* this process only started the node's ranks; exit with exit_code */
    /* internal */
    moe_loaded_components lc;
    char names[3][MOE_SELECTION_NAME_MAX];
} moe_session;

/* Parses the command line (argv[0] is the program), handles --help, reads
 * the checkpoint's stored command line (--path), loads the plugins, creates
 * the runtime (cpu with --cpu or without a GPU, else cuda) on the ranks the
 * process was launched with (--distributed-world-size N on one node starts
 * N processes, as moelm-train does), builds the task (when asked) and the
 * model, allocates the parameters and loads them from the checkpoint.
 * *out is set even on failure (close it); st == MOE_OK with (*out)->h ==
 * NULL means there is nothing left to do: --help was printed, or (done) the
 * node's ranks ran as children. */
moe_status moe_session_open(const moe_session_config *cfg, int argc, char **argv, moe_session **out);
void moe_session_close(moe_session *s);

/* What a tool's main does with moe_session_open: -1 when *out is open and
 * the tool goes on; otherwise the exit status, the failure reported as
 * "<prog>: error: ..." (or nothing left to do: --help, or the node's ranks
 * ran as children) and the session closed (*out NULL). */
int moe_session_start(const moe_session_config *cfg, int argc, char **argv, moe_session **out);


#endif
