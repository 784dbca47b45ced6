/* peer_monitor.h: the TCP rendezvous of a multi-process communicator and the
 * watchdog that keeps its connections open afterwards to name a rank that died
 * or stalled.
 *
 * Rank 0 listens on a port; every other rank connects, says its rank and gets a
 * blob back (for NCCL: the unique id). The connections then stay open, a star
 * around rank 0, and one thread per process watches them:
 * - a connection that closes without a goodbye (BYE) means that process died;
 *   rank 0 tells every other rank (ABORT) at once;
 * - when the owner says its oldest collective has waited longer than the
 *   timeout (moe_peer_monitor_stuck), rank 0 asks every rank to answer (PING);
 *   the watchdog threads answer on their own, so a process whose main thread
 *   is blocked in a collective still answers and a stopped one (SIGSTOP, a
 *   hung node) does not; those that did not answer within the grace are named.
 * The verdict reaches the owner once, as one line, through on_fail, on the
 * monitor's thread. The monitor never exits the process: the owner decides.
 *
 * Plain POSIX (sockets, poll, pthreads) and generic over the blob: no CUDA and
 * no NCCL here, so the test runs on any CI machine.
 */
#ifndef MOE_PEER_MONITOR_H
#define MOE_PEER_MONITOR_H

#include <stddef.h>

#include "moe/status.h"

typedef struct moe_peer_monitor moe_peer_monitor;

typedef struct moe_peer_monitor_cfg {
    int rank, world;
    const char *host;      /* rank 0's address as the other ranks reach it */
    int port;
    double timeout_s;      /* the rendezvous waits this long for every rank */
    double grace_s;        /* how long answers to a PING may take; <= 0: min(timeout_s, 5) */
    const char *blob_name; /* names the blob in messages ("the NCCL id") */
    /* The verdict: one line "<what this rank was doing>: <who is missing>",
     * called at most once, from the monitor's thread. */
    void (*on_fail)(void *user, const char *msg);
    /* Optional, called from the monitor's thread: writes what this rank is
     * doing (the start of a verdict that came before moe_peer_monitor_stuck)
     * and returns 1 when it waits for a collective to finish, 0 when not. */
    int (*activity)(void *user, char *buf, size_t n);
    void *user;
} moe_peer_monitor_cfg;

/* Meet the other ranks: rank 0 sends `blob` (n bytes) to every rank, the
 * others receive it into `blob`; then start the watchdog thread. On failure
 * writes a one-line message to err (naming the ranks that never arrived). */
moe_status moe_peer_monitor_open(const moe_peer_monitor_cfg *cfg, void *blob, size_t n, moe_peer_monitor **out,
                                 char *err, size_t err_size);

/* The owner's oldest collective has waited longer than the timeout; `what`
 * starts the verdict ("NCCL collective all_reduce #412 timed out after 30 s on
 * rank 2"). Thread-safe; only the first call counts. */
void moe_peer_monitor_stuck(moe_peer_monitor *m, const char *what);

/* Stop the thread, close and free; NULL is fine. goodbye: say BYE first to
 * the ranks still connected, so that this exit is not taken for a death (a
 * normal end); 0 (this rank fails) lets the others see a closed connection
 * and stop at once instead of after the timeout. */
void moe_peer_monitor_close(moe_peer_monitor *m, int goodbye);

#endif
