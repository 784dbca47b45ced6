/* launch.c: launch detection and the single-node spawner (see launch.h).
 *
 * Detection only reads the environment and options; it never talks to other
 * ranks. Spawned children find their rank in the torchrun-style variables, so
 * a child detects MOE_LAUNCH_ENV and never spawns again.
 *
 * The spawner's children run in a process group of their own, and the
 * spawner passes SIGTERM, SIGUSR1 and SIGINT on to them: a signal to the
 * job (a terminal's Ctrl-C, a scheduler signalling the process group, kill
 * of the spawner) then reaches each rank exactly once, which matters because
 * a second stop signal ends a rank at once (core/runctl.h). The children
 * learn the spawner's pid (MOE_LAUNCHER_PID) and stop without saving if it
 * dies. When a child fails, the others are killed (SIGKILL: a SIGTERM would
 * ask them to save, which cannot complete without the failed rank).
 */
#include "core/launch.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/runctl.h"

const char *moe_launch_method_name(moe_launch_method m)
{
    static const char *const names[] = {"single process", "slurm", "environment (torchrun-style)", "mpi",
                                        "single-node spawn"};
    return (unsigned)m < sizeof names / sizeof names[0] ? names[m] : "?";
}

static int env_int(const char *name, int *out)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return 0;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end != '\0')
        return 0;
    *out = (int)x;
    return 1;
}

moe_status moe_slurm_first_host(const char *nodelist, char *out, size_t size)
{
    /* first entry: up to a ',' outside brackets */
    size_t n = 0;
    const char *p = nodelist;
    while (*p && *p != ',' && *p != '[') {
        if (n + 1 >= size)
            return moe_error_set(MOE_ERR_INVALID_ARG, "SLURM node list entry too long: '%s'", nodelist);
        out[n++] = *p++;
    }
    if (*p == '[') {
        /* first number of the range: keep its zero padding */
        p++;
        while (*p >= '0' && *p <= '9') {
            if (n + 1 >= size)
                return moe_error_set(MOE_ERR_INVALID_ARG, "SLURM node list entry too long: '%s'", nodelist);
            out[n++] = *p++;
        }
        if (*p != '-' && *p != ',' && *p != ']')
            return moe_error_set(MOE_ERR_INVALID_ARG, "cannot read the SLURM node list '%s'", nodelist);
    }
    out[n] = '\0';
    if (n == 0)
        return moe_error_set(MOE_ERR_INVALID_ARG, "empty SLURM node list");
    return MOE_OK;
}

moe_status moe_launch_detect(const moe_opts *o, int visible_devices, moe_launch *l)
{
    memset(l, 0, sizeof *l);
    l->world = 1;
    int port = (int)moe_opts_int(o, "distributed-port");
    const char *nodelist = getenv("SLURM_STEP_NODELIST");
    if (!nodelist || !*nodelist)
        nodelist = getenv("SLURM_JOB_NODELIST");
    int r, w;

    if (port > 0 && nodelist && *nodelist) {
        l->method = MOE_LAUNCH_SLURM;
        l->master_port = port;
        MOE_TRY(moe_slurm_first_host(nodelist, l->master_addr, sizeof l->master_addr));
        int nnodes = 1, per_node = 0, ntasks = 0, node_id = 0, proc_id = 0, local_id = 0;
        env_int("SLURM_NNODES", &nnodes);
        if (!env_int("SLURM_NTASKS_PER_NODE", &per_node) && env_int("SLURM_NTASKS", &ntasks))
            per_node = ntasks / (nnodes > 0 ? nnodes : 1);
        if (per_node <= 0)
            return moe_error_set(MOE_ERR_INVALID_ARG,
                                 "SLURM launch: neither SLURM_NTASKS_PER_NODE nor SLURM_NTASKS is set");
        if (per_node == 1) {
            /* one task per node: it starts one process per GPU */
            env_int("SLURM_NODEID", &node_id);
            l->world = nnodes * visible_devices;
            l->spawn = visible_devices;
            l->spawn_base_rank = node_id * visible_devices;
            l->rank = l->spawn_base_rank;
        } else {
            if (per_node != visible_devices)
                return moe_error_set(MOE_ERR_INVALID_ARG,
                                     "SLURM launch: %d tasks per node but %d visible devices; fairseq requires "
                                     "one task per GPU (do not mask CUDA_VISIBLE_DEVICES per task)",
                                     per_node, visible_devices);
            env_int("SLURM_PROCID", &proc_id);
            env_int("SLURM_LOCALID", &local_id);
            l->world = per_node * nnodes;
            l->rank = proc_id;
            l->local_rank = local_id;
        }
        return MOE_OK;
    }

    const char *ma = getenv("MASTER_ADDR"), *mp = getenv("MASTER_PORT");
    if (ma && *ma && mp && *mp && env_int("WORLD_SIZE", &w) && env_int("RANK", &r)) {
        l->method = MOE_LAUNCH_ENV;
        l->world = w;
        l->rank = r;
        if (!env_int("LOCAL_RANK", &l->local_rank))
            l->local_rank = (int)moe_opts_int(o, "device-id");
        snprintf(l->master_addr, sizeof l->master_addr, "%s", ma);
        l->master_port = atoi(mp);
        if (w < 1 || r < 0 || r >= w)
            return moe_error_set(MOE_ERR_INVALID_ARG, "RANK=%d and WORLD_SIZE=%d are inconsistent", r, w);
        return MOE_OK;
    }

    if ((env_int("OMPI_COMM_WORLD_SIZE", &w) && env_int("OMPI_COMM_WORLD_RANK", &r)) ||
        (env_int("PMI_SIZE", &w) && env_int("PMI_RANK", &r)) ||
        (env_int("PMIX_SIZE", &w) && env_int("PMIX_RANK", &r))) {
        l->method = MOE_LAUNCH_MPI;
        l->world = w;
        l->rank = r;
        if (!env_int("OMPI_COMM_WORLD_LOCAL_RANK", &l->local_rank))
            l->local_rank = 0;
        return MOE_OK;
    }

    int requested = moe_opts_has_value(o, "distributed-world-size") ? (int)moe_opts_int(o, "distributed-world-size")
                                                                     : visible_devices;
    if (requested > 1) {
        l->method = MOE_LAUNCH_SPAWN;
        l->world = requested;
        l->spawn = requested;
        snprintf(l->master_addr, sizeof l->master_addr, "127.0.0.1");
        /* fairseq picks a random port in 10000-20000 */
        l->master_port = port > 0 ? port : 10000 + (int)((unsigned)time(NULL) ^ (unsigned)getpid()) % 10000;
        return MOE_OK;
    }
    l->method = MOE_LAUNCH_SINGLE;
    return MOE_OK;
}

static pid_t *g_children;
static int g_n_children;

static void forward_signal(int sig)
{
    for (int i = 0; i < g_n_children; i++)
        if (g_children[i] > 0)
            kill(g_children[i], sig);
}

int moe_launch_spawn(const moe_launch *l, char **argv)
{
    pid_t *pids = calloc((size_t)l->spawn, sizeof *pids);
    if (!pids) {
        fprintf(stderr, "moelm-train: error: out of memory starting %d processes\n", l->spawn);
        return 1;
    }
    char buf[32];
    char launcher[32];
    snprintf(launcher, sizeof launcher, "%ld", (long)getpid());
    for (int i = 0; i < l->spawn; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            fprintf(stderr, "moelm-train: error: fork failed for local rank %d: %s\n", i, strerror(errno));
            for (int j = 0; j < i; j++)
                kill(pids[j], SIGKILL);
            free(pids);
            return 1;
        }
        if (pid == 0) {
            setpgid(0, 0);
            setenv(MOE_LAUNCHER_PID_ENV, launcher, 1);
            snprintf(buf, sizeof buf, "%d", l->spawn_base_rank + i);
            setenv("RANK", buf, 1);
            snprintf(buf, sizeof buf, "%d", l->world);
            setenv("WORLD_SIZE", buf, 1);
            snprintf(buf, sizeof buf, "%d", i);
            setenv("LOCAL_RANK", buf, 1);
            setenv("MASTER_ADDR", l->master_addr, 1);
            snprintf(buf, sizeof buf, "%d", l->master_port);
            setenv("MASTER_PORT", buf, 1);
            execv("/proc/self/exe", argv);
            execvp(argv[0], argv);
            fprintf(stderr, "moelm-train: error: cannot start %s: %s\n", argv[0], strerror(errno));
            _exit(127);
        }
        pids[i] = pid;
    }
    g_children = pids;
    g_n_children = l->spawn;
    const int forwarded[] = {SIGTERM, SIGUSR1, SIGINT};
    struct sigaction saved[3];
    for (int k = 0; k < 3; k++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = forward_signal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART;
        sigaction(forwarded[k], &sa, &saved[k]);
    }
    int rc = 0, left = l->spawn;
    while (left > 0) {
        int status;
        pid_t pid = wait(&status);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            break;
        for (int i = 0; i < l->spawn; i++)
            if (pids[i] == pid)
                pids[i] = 0; /* reaped: never signal a recycled pid */
        left--;
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        if (code != 0 && rc == 0) {
            rc = code;
            for (int i = 0; i < l->spawn; i++)
                if (pids[i] > 0)
                    kill(pids[i], SIGKILL);
        }
    }
    for (int k = 0; k < 3; k++)
        sigaction(forwarded[k], &saved[k], NULL);
    g_children = NULL;
    g_n_children = 0;
    free(pids);
    return rc;
}
