/* launch.h: how this process became rank r of w (FAIRSEQ_SPEC.md §7.4).
 *
 * In fairseq's order: SLURM (--distributed-port > 0 and a SLURM node list),
 * torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), an MPI
 * launcher (mpirun/srun --mpi: OMPI_COMM_WORLD_* or PMI_* variables), and
 * finally a single node with --distributed-world-size N > 1, where this
 * process starts one child per GPU on localhost. The NCCL communicator meets
 * its peers at master_addr:master_port (TCP rendezvous); MPI needs neither.
 */
#ifndef MOE_CORE_LAUNCH_H
#define MOE_CORE_LAUNCH_H

#include "core/options.h"

typedef enum moe_launch_method {
    MOE_LAUNCH_SINGLE = 0,  /* one process, world 1 */
    MOE_LAUNCH_SLURM,
    MOE_LAUNCH_ENV,         /* torchrun-style variables */
    MOE_LAUNCH_MPI,
    MOE_LAUNCH_SPAWN        /* this process starts `spawn` local children */
} moe_launch_method;

typedef struct moe_launch {
    moe_launch_method method;
    int world, rank, local_rank;
    char master_addr[256];
    int master_port;
    int spawn;            /* children to start here (SLURM one task per node, or single node) */
    int spawn_base_rank;  /* rank of the first child */
} moe_launch;

/* visible_devices: GPUs this node can use (1 on the cpu backend). */
moe_status moe_launch_detect(const moe_opts *o, int visible_devices, moe_launch *l);
const char *moe_launch_method_name(moe_launch_method m);

/* Expand the first host of a SLURM node list ("gpu[003-010,012],cpu1" ->
 * "gpu003"). */
moe_status moe_slurm_first_host(const char *nodelist, char *out, size_t size);

/* Start l->spawn copies of this program (argv) with RANK, WORLD_SIZE,
 * LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, wait for them, and return the
 * first non-zero exit status (the others are then stopped). */
int moe_launch_spawn(const moe_launch *l, char **argv);

#endif
