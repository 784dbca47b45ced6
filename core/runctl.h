/* runctl.h: run control for long jobs on shared clusters: stop requests by
 * signal (preemption), the launcher's death, and the start-up check of
 * --save-dir.
 *
 * Signals: SIGTERM and SIGUSR1 (what SLURM sends before it preempts, or at
 * --signal=USR1@90), and SIGINT when asked (--save-on-sigint), only set a
 * flag; the trainer reads it once per update, folded into the statistics it
 * sums over the ranks anyway, so every rank stops after the same update,
 * whichever rank was signalled. A second signal of any of them while the
 * first is pending ends the process at once (the default action of that
 * signal, re-raised). Without --save-on-sigint, SIGINT keeps its default
 * action: the process ends without saving.
 *
 * Not here: what a stop does (the trainer saves checkpoint_last and returns);
 * the flag is process-wide state, as signal dispositions are.
 */
#ifndef MOE_CORE_RUNCTL_H
#define MOE_CORE_RUNCTL_H

#include "moe/plugin.h"

/* Installs the handlers (SIGINT too when save_on_sigint). Idempotent. */
moe_status moe_runctl_install(int save_on_sigint);
/* Restores the dispositions moe_runctl_install replaced and clears the flag. */
void moe_runctl_uninstall(void);
/* The signal that asked the run to stop, or 0. */
int moe_runctl_stop_signal(void);
/* "SIGTERM", "SIGUSR1", "SIGINT", or "signal N". */
const char *moe_runctl_signal_name(int sig);

/* The launcher this process was started by (mpirun, or moelm-train's own
 * one-process-per-GPU launcher, which names itself in MOE_LAUNCHER_PID; a
 * parent that is neither, a shell say, is not watched): its pid is
 * remembered here, and
 * moe_runctl_check_launcher fails once this process has been orphaned
 * (the launcher was killed), so a rank stops instead of training on and
 * writing checkpoints nobody asked for. */
void moe_runctl_watch_launcher(int launched_by_mpi);
/* What moe_launch_spawn sets in its children: the launcher's pid. */
#define MOE_LAUNCHER_PID_ENV "MOE_LAUNCHER_PID"
moe_status moe_runctl_check_launcher(void);

/* --save-dir at start-up (fairseq's verify_checkpoint_directory): created
 * when missing (mkdir -p), a directory, and writable (a file is created in it
 * and removed). One error naming the directory and why not. */
moe_status moe_runctl_check_save_dir(const char *dir);

#endif
