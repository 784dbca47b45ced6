/* runctl.c: see runctl.h.
 *
 * The handlers are async-signal-safe by construction: they store to a
 * sig_atomic_t, or restore the default disposition and raise the signal
 * again. Everything else (logging, saving) happens on the trainer's thread
 * when it next looks at the flag.
 */
#include "core/runctl.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/internal.h"

static volatile sig_atomic_t g_stop_signal;

static const int g_signals[] = {SIGTERM, SIGUSR1, SIGINT};
#define N_SIGNALS ((int)(sizeof g_signals / sizeof g_signals[0]))
static struct sigaction g_saved[N_SIGNALS];
static int g_installed[N_SIGNALS];

static void on_stop_signal(int sig)
{
    if (g_stop_signal != 0) {
        /* the second request: stop now, as if no handler were installed */
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    g_stop_signal = sig;
}

moe_status moe_runctl_install(int save_on_sigint)
{
    for (int i = 0; i < N_SIGNALS; i++) {
        if (g_installed[i] || (g_signals[i] == SIGINT && !save_on_sigint))
            continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_stop_signal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART; /* blocking reads and collectives carry on */
        if (sigaction(g_signals[i], &sa, &g_saved[i]) != 0)
            return moe_error_set(MOE_ERR_INTERNAL, "cannot install the handler of %s: %s",
                                 moe_runctl_signal_name(g_signals[i]), strerror(errno));
        g_installed[i] = 1;
    }
    return MOE_OK;
}

void moe_runctl_uninstall(void)
{
    for (int i = 0; i < N_SIGNALS; i++)
        if (g_installed[i]) {
            sigaction(g_signals[i], &g_saved[i], NULL);
            g_installed[i] = 0;
        }
    g_stop_signal = 0;
}

int moe_runctl_stop_signal(void) { return (int)g_stop_signal; }

const char *moe_runctl_signal_name(int sig)
{
    static _Thread_local char buf[32];
    switch (sig) {
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    case SIGINT: return "SIGINT";
    default: snprintf(buf, sizeof buf, "signal %d", sig); return buf;
    }
}

/* ------------------------------------------------------------ the launcher */

static pid_t g_launcher;

void moe_runctl_watch_launcher(int launched_by_mpi)
{
    pid_t p = getppid();
    const char *env = getenv(MOE_LAUNCHER_PID_ENV);
    int ours = env && *env && strtol(env, NULL, 10) == (long)p;
    g_launcher = p > 1 && (launched_by_mpi || ours) ? p : 0; /* already orphaned: nothing to watch */
}

moe_status moe_runctl_check_launcher(void)
{
    if (g_launcher == 0 || getppid() == g_launcher)
        return MOE_OK;
    return moe_error_set(MOE_ERR_COMM,
                         "the launcher of this rank (process %ld) has ended, so the job is over: stopping without "
                         "writing a checkpoint (restart the job to resume from the last one)",
                         (long)g_launcher);
}

/* ------------------------------------------------------------ --save-dir */

static moe_status dir_error(const char *dir, const char *found, int err)
{
    return moe_error_set(MOE_ERR_INVALID_ARG,
                         "--save-dir '%s': expected a writable directory, found %s%s%s%s; pass another --save-dir "
                         "(or --no-save)",
                         dir, found, err ? " (" : "", err ? strerror(err) : "", err ? ")" : "");
}

moe_status moe_runctl_check_save_dir(const char *dir)
{
    if (!dir || !*dir)
        dir = ".";
    int last = 0;
    switch (moe_mkdir_p(dir, 0777, NULL, 0, &last)) {
    case MOE_MKDIR_OK:
        break;
    case MOE_MKDIR_NOT_DIR:
        return dir_error(dir, last ? "a file that is not a directory" : "a path through a file", 0);
    case MOE_MKDIR_UNREADABLE:
        return dir_error(dir, "a path that cannot be examined", errno);
    case MOE_MKDIR_CREATE:
        return dir_error(dir, "that it cannot be created", errno);
    }
    size_t n = strlen(dir);
    char *p = malloc(n + 64);
    if (!p)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory checking --save-dir");
    memcpy(p, dir, n + 1);
    moe_status st = MOE_OK;
    /* writable: what a save will do, on this filesystem, as this user */
    snprintf(p + n, 64, "/.moelm-write-test-%ld", (long)getpid());
    int fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        st = dir_error(dir, "a directory in which no file can be created", errno);
    } else {
        close(fd);
        unlink(p);
    }
    free(p);
    return st;
}
