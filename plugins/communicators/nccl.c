/* nccl.c: the NCCL communicator for GPU runs.
 *
 * Peers meet through a TCP rendezvous at --distributed-init-method
 * tcp://host:port (set by moelm-train from SLURM, torchrun-style variables or
 * its own single-node spawner): rank 0 creates the NCCL unique id and hands it
 * to every rank that connects; a rank that never arrives is named in the error
 * after --distributed-timeout seconds (peer_monitor.c).
 *
 * Collectives run on this communicator's own stream, ordered against the
 * backend's compute stream (backend->native_stream) by events and never by a
 * host synchronisation: the comm stream waits for an event recorded on the
 * compute stream before each collective, and the compute stream for the
 * collective's completion event after it. all_gather_start and
 * reduce_scatter_start leave that second wait to wait(), so the collective
 * overlaps the compute queued in between.
 *
 * Watchdog. A rank that dies or stalls inside a collective blocks NCCL, and
 * at the next host read the main thread, for good. So every collective's
 * completion event joins a queue with its sequence number and name; a thread
 * polls the oldest (cudaEventQuery) and, once it has waited longer than
 * --distributed-timeout, tells the peer monitor, which asks every rank over
 * the rendezvous connections (kept open) and names the rank that died,
 * stalled or exited. A connection that closes without a goodbye is reported at
 * once, in a collective or not. Then this process ends from the monitor's
 * thread, as torch's NCCL watchdog does: the error line on stderr,
 * ncclCommAbort, _exit(1) -- the main thread may never return from CUDA, so
 * returning an error is not possible. World size 1 has no peers: no sockets,
 * no threads.
 */
#include <cuda_runtime.h>
#include <errno.h>
#include <nccl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moe/plugin.h"
#include "peer_monitor.h"

struct moe_group {
    ncclComm_t comm;
    int size, rank;
};

/* a collective queued on the comm stream and not yet seen complete */
typedef struct pending_op {
    unsigned long long seq;
    const char *name;
    cudaEvent_t done;
    double queued_at;
} pending_op;

/* all_gather_start's handle: its own completion event, so that the queue may
 * recycle the one it watches before wait() comes */
struct moe_comm_req {
    cudaEvent_t done;
};

struct moe_comm {
    const moe_host *h;
    moe_group world;
    moe_group **groups; /* from group_create; destroyed with the communicator */
    int n_groups, cap_groups;
    cudaStream_t compute; /* the backend's */
    cudaStream_t stream;  /* ours */
    cudaEvent_t ready;    /* recorded on compute before each collective */
    int device;
    double timeout_s;
    void *barrier_word;

    /* the queue and the event pool, shared with the watchdog thread */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sync_init;
    pending_op *q;
    size_t q_cap, q_head, q_len;
    cudaEvent_t *free_ev, *all_ev;
    size_t n_free, n_all, cap_ev;
    unsigned long long seq;
    double last_done_at;
    int reported, wd_stop;
    pthread_t wd;
    int wd_started;

    moe_peer_monitor *mon;
    /* Read side: held around every NCCL call on a communicator. Write side:
     * creating and destroying them, and the failure path, which aborts them
     * and never lets go: ncclCommAbort while this thread is inside NCCL with
     * the same communicator crashes the process (seen on a GPU: SIGSEGV
     * instead of the exit status 1), and a call after the abort waits here
     * until _exit. */
    pthread_rwlock_t life;
};

#define NCCL_TRY(c, call)                                                                                     \
    do {                                                                                                      \
        pthread_rwlock_rdlock(&(c)->life);                                                                    \
        ncclResult_t r_ = (call);                                                                             \
        pthread_rwlock_unlock(&(c)->life);                                                                    \
        if (r_ != ncclSuccess)                                                                                \
            return (c)->h->error((c)->h, MOE_ERR_COMM, "%s failed: %s", #call, ncclGetErrorString(r_));      \
    } while (0)

#define CUDA_TRY(c, call)                                                                                     \
    do {                                                                                                      \
        cudaError_t e_ = (call);                                                                              \
        if (e_ != cudaSuccess)                                                                                \
            return (c)->h->error((c)->h, MOE_ERR_BACKEND, "%s failed: %s", #call, cudaGetErrorString(e_));   \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static ncclDataType_t nccl_type(moe_dtype dt)
{
    switch (dt) {
    case MOE_F16: return ncclFloat16;
    case MOE_BF16: return ncclBfloat16;
    case MOE_I32: return ncclInt32;
    case MOE_F64: return ncclFloat64;
    default: return ncclFloat32;
    }
}

/* "tcp://host:port" */
static moe_status parse_init_method(moe_comm *c, const char *m, char *host, size_t hs, int *port)
{
    if (!m || strncmp(m, "tcp://", 6) != 0)
        return c->h->error(c->h, MOE_ERR_INVALID_ARG,
                           "the nccl communicator needs --distributed-init-method tcp://HOST:PORT (got '%s'); "
                           "launch with srun --distributed-port, torchrun-style variables, or "
                           "--distributed-world-size N on one node",
                           m ? m : "None");
    const char *hp = m + 6, *colon = strrchr(hp, ':');
    if (!colon || (size_t)(colon - hp) >= hs)
        return c->h->error(c->h, MOE_ERR_INVALID_ARG, "cannot read host:port from '%s'", m);
    memcpy(host, hp, (size_t)(colon - hp));
    host[colon - hp] = '\0';
    *port = atoi(colon + 1);
    if (*port <= 0 || *port > 65535)
        return c->h->error(c->h, MOE_ERR_INVALID_ARG, "bad port in '%s'", m);
    return MOE_OK;
}

/* ------------------------------------------------------ queue and events */

/* Under mu. Completion is in queue order: one stream. */
static void retire_done(moe_comm *c)
{
    while (c->q_len > 0) {
        pending_op *op = &c->q[c->q_head];
        /* an error here (a broken context) also ends the wait: the main
         * thread meets the same error at its next CUDA call */
        if (cudaEventQuery(op->done) == cudaErrorNotReady)
            break;
        c->free_ev[c->n_free++] = op->done;
        c->q_head = (c->q_head + 1) % c->q_cap;
        c->q_len--;
        c->last_done_at = now_s();
    }
}

/* An event from the pool; the pool grows when all are in use. Not under mu:
 * no CUDA call that could block is ever made holding it (see op_end). */
static moe_status take_event(moe_comm *c, cudaEvent_t *ev)
{
    pthread_mutex_lock(&c->mu);
    int have = c->n_free > 0;
    if (have)
        *ev = c->free_ev[--c->n_free];
    pthread_mutex_unlock(&c->mu);
    if (have)
        return MOE_OK;
    CUDA_TRY(c, cudaEventCreateWithFlags(ev, cudaEventDisableTiming));
    moe_status st = MOE_OK;
    pthread_mutex_lock(&c->mu);
    if (c->n_all == c->cap_ev) {
        /* free_ev can hold every event: all may be back in the pool at once */
        size_t cap = c->cap_ev ? 2 * c->cap_ev : 64;
        cudaEvent_t *f = realloc(c->free_ev, cap * sizeof *f);
        if (f)
            c->free_ev = f;
        cudaEvent_t *a = f ? realloc(c->all_ev, cap * sizeof *a) : NULL;
        if (a) {
            c->all_ev = a;
            c->cap_ev = cap;
        }
    }
    if (c->n_all < c->cap_ev)
        c->all_ev[c->n_all++] = *ev;
    else
        st = MOE_ERR_NOMEM;
    pthread_mutex_unlock(&c->mu);
    if (st != MOE_OK) {
        cudaEventDestroy(*ev);
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory for NCCL completion events");
    }
    return MOE_OK;
}

/* Under mu. */
static moe_status queue_push(moe_comm *c, const char *name, cudaEvent_t done)
{
    if (c->q_len == c->q_cap) {
        size_t cap = c->q_cap ? 2 * c->q_cap : 64;
        pending_op *q = malloc(cap * sizeof *q);
        if (!q)
            return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory queueing an NCCL collective");
        for (size_t i = 0; i < c->q_len; i++)
            q[i] = c->q[(c->q_head + i) % c->q_cap];
        free(c->q);
        c->q = q;
        c->q_cap = cap;
        c->q_head = 0;
    }
    pending_op *op = &c->q[(c->q_head + c->q_len) % c->q_cap];
    op->seq = ++c->seq;
    op->name = name;
    op->done = done;
    op->queued_at = now_s();
    if (c->q_len++ == 0)
        pthread_cond_signal(&c->cv); /* the watchdog sleeps while nothing is queued */
    return MOE_OK;
}

/* Before a collective: the comm stream waits for the compute queued so far. */
static moe_status op_begin(moe_comm *c)
{
    CUDA_TRY(c, cudaEventRecord(c->ready, c->compute));
    CUDA_TRY(c, cudaStreamWaitEvent(c->stream, c->ready, 0));
    return MOE_OK;
}

static void put_event(moe_comm *c, cudaEvent_t ev)
{
    pthread_mutex_lock(&c->mu);
    c->free_ev[c->n_free++] = ev;
    pthread_mutex_unlock(&c->mu);
}

/* After a collective was queued: its completion event goes to the watchdog;
 * `join`: the compute stream waits for it; `extra`: a second completion event
 * for the caller, which returns it with put_event. The records and waits are
 * made without holding mu: with the GPU stuck behind a hung collective a
 * launch can block once the queue is full, and the watchdog must still get mu
 * to report it. */
static moe_status op_end(moe_comm *c, const char *name, int join, cudaEvent_t *extra)
{
    cudaEvent_t ev = NULL, ev2 = NULL;
    moe_status st = take_event(c, &ev);
    if (st == MOE_OK && extra)
        st = take_event(c, &ev2);
    cudaError_t e = cudaSuccess;
    if (st == MOE_OK && (e = cudaEventRecord(ev, c->stream)) == cudaSuccess && extra)
        e = cudaEventRecord(ev2, c->stream);
    if (st == MOE_OK && e == cudaSuccess && join)
        e = cudaStreamWaitEvent(c->compute, ev, 0);
    if (st == MOE_OK && e != cudaSuccess)
        st = c->h->error(c->h, MOE_ERR_BACKEND, "ordering NCCL %s against the compute stream failed: %s", name,
                         cudaGetErrorString(e));
    if (st == MOE_OK) {
        pthread_mutex_lock(&c->mu);
        retire_done(c);
        st = queue_push(c, name, ev);
        pthread_mutex_unlock(&c->mu);
    }
    if (st != MOE_OK) {
        if (ev)
            put_event(c, ev);
        if (ev2)
            put_event(c, ev2);
        return st;
    }
    if (extra)
        *extra = ev2;
    return MOE_OK;
}

/* ------------------------------------------------------------ watchdog */

static void *watchdog_main(void *arg)
{
    moe_comm *c = arg;
    cudaSetDevice(c->device);
    double tick = c->timeout_s / 10.0;
    tick = tick < 0.05 ? 0.05 : tick > 1.0 ? 1.0 : tick;
    pthread_mutex_lock(&c->mu);
    while (!c->wd_stop) {
        retire_done(c);
        if (c->q_len == 0) {
            pthread_cond_wait(&c->cv, &c->mu);
            continue;
        }
        /* a collective cannot start before the one ahead of it ended */
        const pending_op *op = &c->q[c->q_head];
        double since = op->queued_at > c->last_done_at ? op->queued_at : c->last_done_at;
        if (!c->reported && now_s() - since > c->timeout_s) {
            char what[256];
            snprintf(what, sizeof what, "NCCL collective %s #%llu timed out after %.0f s on rank %d", op->name,
                     op->seq, c->timeout_s, c->world.rank);
            c->reported = 1;
            pthread_mutex_unlock(&c->mu);
            moe_peer_monitor_stuck(c->mon, what); /* the verdict comes back through on_peer_fail */
            pthread_mutex_lock(&c->mu);
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        double t = (double)ts.tv_nsec * 1e-9 + tick;
        ts.tv_sec += (time_t)t;
        ts.tv_nsec = (long)((t - (double)(time_t)t) * 1e9);
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* The monitor's view of this rank: the oldest collective not yet seen
 * complete (by the watchdog's last tick or the last collective queued). It
 * makes no CUDA call and does not wait for mu: the monitor answers PINGs with
 * it, and an answer must not hang on a stuck GPU or driver. */
static int peer_activity(void *user, char *buf, size_t n)
{
    moe_comm *c = user;
    int locked = 0;
    for (int i = 0; i < 50 && !(locked = pthread_mutex_trylock(&c->mu) == 0); i++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (!locked) {
        snprintf(buf, n, "rank %d (its NCCL watchdog is blocked in CUDA)", c->world.rank);
        return 1;
    }
    int pending = c->q_len > 0;
    if (pending) {
        const pending_op *op = &c->q[c->q_head];
        snprintf(buf, n, "NCCL collective %s #%llu on rank %d (waiting %.0f s)", op->name, op->seq, c->world.rank,
                 now_s() - op->queued_at);
    } else {
        snprintf(buf, n, "rank %d cannot continue", c->world.rank);
    }
    pthread_mutex_unlock(&c->mu);
    return pending;
}

/* If ncclCommAbort itself hangs, the process still ends. */
static void *exit_later(void *arg)
{
    (void)arg;
    struct timespec ts = {10, 0};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
    _exit(1);
}

/* The monitor's verdict, on its thread: the main thread may be blocked in a
 * CUDA call for good, so the process ends here. The line goes out first, with
 * write(): stdio may be locked by the blocked thread. */
static void on_peer_fail(void *user, const char *msg)
{
    moe_comm *c = user;
    char line[1024];
    int k = snprintf(line, sizeof line, "moelm-train: error: %s\n", msg);
    if (k > (int)sizeof line - 1)
        k = (int)sizeof line - 1;
    if (write(STDERR_FILENO, line, (size_t)k) < 0) {
        /* no stderr: the exit status still says it */
    }
    pthread_t t;
    if (pthread_create(&t, NULL, exit_later, NULL) == 0)
        pthread_detach(t);
    /* abort only communicators that exist and are not being destroyed */
    for (int i = 0; i < 100; i++) {
        if (pthread_rwlock_trywrlock(&c->life) == 0) {
            for (int g = 0; g < c->n_groups; g++)
                ncclCommAbort(c->groups[g]->comm);
            if (c->world.comm)
                ncclCommAbort(c->world.comm);
            break;
        }
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    _exit(1);
}

/* ------------------------------------------------------------ lifecycle */

/* Wait for what was queued, with the watchdog still on duty. */
static void drain(moe_comm *c)
{
    double deadline = now_s() + 2.0 * c->timeout_s + 30.0;
    struct timespec ts = {0, 1000000};
    for (;;) {
        pthread_mutex_lock(&c->mu);
        retire_done(c);
        size_t left = c->q_len;
        pthread_mutex_unlock(&c->mu);
        if (!left || now_s() > deadline)
            return;
        nanosleep(&ts, NULL);
        if (ts.tv_nsec < 10000000)
            ts.tv_nsec *= 2;
    }
}

/* goodbye: see moe_peer_monitor_close */
static void release(moe_comm *c, int goodbye)
{
    if (c->sync_init)
        drain(c);
    if (c->wd_started) {
        pthread_mutex_lock(&c->mu);
        c->wd_stop = 1;
        pthread_cond_signal(&c->cv);
        pthread_mutex_unlock(&c->mu);
        pthread_join(c->wd, NULL);
    }
    /* NCCL first (ncclCommDestroy finishes what we still owe the others),
     * then the goodbye: a rank that leaves earlier than the others is not
     * taken for dead */
    if (c->sync_init)
        pthread_rwlock_wrlock(&c->life);
    for (int g = 0; g < c->n_groups; g++) {
        ncclCommDestroy(c->groups[g]->comm);
        free(c->groups[g]);
    }
    if (c->world.comm)
        ncclCommDestroy(c->world.comm);
    c->world.comm = NULL;
    c->n_groups = 0;
    if (c->sync_init)
        pthread_rwlock_unlock(&c->life);
    moe_peer_monitor_close(c->mon, goodbye);
    for (size_t i = 0; i < c->n_all; i++)
        cudaEventDestroy(c->all_ev[i]);
    if (c->ready)
        cudaEventDestroy(c->ready);
    if (c->stream)
        cudaStreamDestroy(c->stream);
    if (c->barrier_word)
        cudaFree(c->barrier_word);
    if (c->sync_init) {
        pthread_cond_destroy(&c->cv);
        pthread_mutex_destroy(&c->mu);
        pthread_rwlock_destroy(&c->life);
    }
    free(c->q);
    free(c->free_ev);
    free(c->all_ev);
    free(c->groups);
    free(c);
}

/* The end of a run, or of a rank that failed on an error it could return
 * (then the others are still told "exited" once they wait for it). */
static void comm_destroy(moe_comm *c)
{
    if (c)
        release(c, 1);
}

static moe_status sync_setup(moe_comm *c)
{
    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0)
        return c->h->error(c->h, MOE_ERR_NOMEM, "cannot initialise the NCCL watchdog's condition variable");
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* ticks unaffected by wall-clock changes */
    int e = pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (e != 0)
        return c->h->error(c->h, MOE_ERR_NOMEM, "cannot initialise the NCCL watchdog's condition variable");
    pthread_mutex_init(&c->mu, NULL);
    pthread_rwlock_init(&c->life, NULL);
    c->sync_init = 1;
    return MOE_OK;
}

static moe_status start_watchdog(moe_comm *c)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with the main thread */
    int e = pthread_create(&c->wd, NULL, watchdog_main, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e != 0)
        return c->h->error(c->h, MOE_ERR_COMM, "cannot start the NCCL watchdog thread: %s", strerror(e));
    c->wd_started = 1;
    return MOE_OK;
}

static moe_status comm_setup(moe_comm *c)
{
    const moe_host *h = c->h;
    CUDA_TRY(c, cudaGetDevice(&c->device));
    CUDA_TRY(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    CUDA_TRY(c, cudaEventCreateWithFlags(&c->ready, cudaEventDisableTiming));
    MOE_TRY(sync_setup(c));
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (c->world.rank == 0)
        NCCL_TRY(c, ncclGetUniqueId(&id));
    if (c->world.size > 1) {
        char host[256] = "", err[600];
        int port = 0;
        MOE_TRY(parse_init_method(c, h->opt_str(h, "distributed-init-method"), host, sizeof host, &port));
        /* the monitor watches from here on: a rank that dies inside
         * ncclCommInitRank is reported too */
        moe_peer_monitor_cfg cfg = {c->world.rank, c->world.size, host, port, c->timeout_s, 0.0, "the NCCL id",
                                    on_peer_fail, peer_activity, c};
        moe_status st = moe_peer_monitor_open(&cfg, &id, sizeof id, &c->mon, err, sizeof err);
        if (st != MOE_OK)
            return h->error(h, st, "%s", err);
    }
    ncclComm_t comm = NULL;
    ncclResult_t r = ncclCommInitRank(&comm, c->world.size, id, c->world.rank);
    if (r != ncclSuccess)
        return h->error(h, MOE_ERR_COMM, "ncclCommInitRank (rank %d of %d) failed: %s", c->world.rank,
                        c->world.size, ncclGetErrorString(r));
    pthread_rwlock_wrlock(&c->life);
    c->world.comm = comm;
    pthread_rwlock_unlock(&c->life);
    if (c->world.size > 1)
        MOE_TRY(start_watchdog(c));
    return MOE_OK;
}

static moe_status comm_init(const moe_host *h, moe_comm **out)
{
    moe_comm *c = calloc(1, sizeof *c);
    if (!c)
        return h->error(h, MOE_ERR_NOMEM, "out of host memory");
    c->h = h;
    c->world.size = h->opt_set(h, "distributed-world-size") ? (int)h->opt_int(h, "distributed-world-size") : 1;
    c->world.rank = h->opt_set(h, "distributed-rank") ? (int)h->opt_int(h, "distributed-rank") : 0;
    c->timeout_s = h->opt_set(h, "distributed-timeout") ? h->opt_float(h, "distributed-timeout") : 1800.0;
    c->compute = h->backend && h->backend->native_stream ? (cudaStream_t)h->backend->native_stream(h->ctx) : NULL;
    moe_status st = comm_setup(c);
    if (st != MOE_OK) {
        /* no goodbye: ranks waiting for this one in ncclCommInitRank are in
         * no collective the watchdog could time out, so they stop on the
         * closed connection */
        release(c, 0);
        return st;
    }
    *out = c;
    return MOE_OK;
}

static int comm_rank(const moe_comm *c) { return c->world.rank; }
static int comm_world(const moe_comm *c) { return c->world.size; }

static moe_status comm_group_create(moe_comm *c, const int *ranks, int n, moe_group **out)
{
    *out = NULL;
    int member = -1;
    for (int i = 0; i < n; i++)
        if (ranks[i] == c->world.rank)
            member = i;
    ncclComm_t nc = NULL;
    NCCL_TRY(c, ncclCommSplit(c->world.comm, member >= 0 ? 0 : NCCL_SPLIT_NOCOLOR, member, &nc, NULL));
    if (member < 0)
        return MOE_OK;
    moe_group *g = calloc(1, sizeof *g);
    /* the list is read by the failure path, so it changes only under life */
    pthread_rwlock_wrlock(&c->life);
    if (g && c->n_groups == c->cap_groups) {
        int cap = c->cap_groups ? 2 * c->cap_groups : 8;
        moe_group **gs = realloc(c->groups, (size_t)cap * sizeof *gs);
        if (gs) {
            c->groups = gs;
            c->cap_groups = cap;
        }
    }
    int ok = g && c->n_groups < c->cap_groups;
    if (ok) {
        g->comm = nc;
        g->size = n;
        g->rank = member;
        c->groups[c->n_groups++] = g;
    }
    pthread_rwlock_unlock(&c->life);
    if (!ok) {
        free(g);
        ncclCommDestroy(nc);
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory");
    }
    *out = g;
    return MOE_OK;
}

static moe_group *grp(moe_comm *c, moe_group *g) { return g ? g : &c->world; }

static moe_status comm_all_reduce(moe_comm *c, moe_group *g, void *buf, int64_t n, moe_dtype dt, moe_reduce_op op)
{
    g = grp(c, g);
    if (n == 0)
        return MOE_OK;
    MOE_TRY(op_begin(c));
    NCCL_TRY(c, ncclAllReduce(buf, buf, (size_t)n, nccl_type(dt), op == MOE_REDUCE_SUM ? ncclSum : ncclMax, g->comm,
                              c->stream));
    return op_end(c, "all_reduce", 1, NULL);
}

static moe_status comm_reduce_scatter(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n,
                                      moe_dtype dt, moe_reduce_op op)
{
    g = grp(c, g);
    MOE_TRY(op_begin(c));
    NCCL_TRY(c, ncclReduceScatter(send, recv, (size_t)n, nccl_type(dt), op == MOE_REDUCE_SUM ? ncclSum : ncclMax,
                                  g->comm, c->stream));
    return op_end(c, "reduce_scatter", 1, NULL);
}

static moe_status comm_all_gather(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    g = grp(c, g);
    MOE_TRY(op_begin(c));
    NCCL_TRY(c, ncclAllGather(send, recv, (size_t)n, nccl_type(dt), g->comm, c->stream));
    return op_end(c, "all_gather", 1, NULL);
}

/* A started collective: queued like the others, but the compute stream's
 * wait for it is left to comm_wait. `reduce`: reduce-scatter, else all-gather. */
static moe_status start_op(moe_comm *c, moe_group *g, int reduce, void *recv, const void *send, int64_t n,
                           moe_dtype dt, moe_reduce_op op, moe_comm_req **out)
{
    *out = NULL;
    g = grp(c, g);
    const char *name = reduce ? "reduce_scatter" : "all_gather";
    moe_comm_req *req = malloc(sizeof *req);
    if (!req)
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory starting an NCCL %s", name);
    moe_status st = op_begin(c);
    if (st == MOE_OK) {
        pthread_rwlock_rdlock(&c->life);
        ncclResult_t r = reduce ? ncclReduceScatter(send, recv, (size_t)n, nccl_type(dt),
                                                    op == MOE_REDUCE_SUM ? ncclSum : ncclMax, g->comm, c->stream)
                                : ncclAllGather(send, recv, (size_t)n, nccl_type(dt), g->comm, c->stream);
        pthread_rwlock_unlock(&c->life);
        if (r != ncclSuccess)
            st = c->h->error(c->h, MOE_ERR_COMM, "NCCL %s (started) failed: %s", name, ncclGetErrorString(r));
    }
    if (st == MOE_OK)
        st = op_end(c, name, 0, &req->done);
    if (st != MOE_OK) {
        free(req);
        return st;
    }
    *out = req;
    return MOE_OK;
}

static moe_status comm_all_gather_start(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n,
                                        moe_dtype dt, moe_comm_req **out)
{
    return start_op(c, g, 0, recv, send, n, dt, MOE_REDUCE_SUM, out);
}

static moe_status comm_reduce_scatter_start(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n,
                                            moe_dtype dt, moe_reduce_op op, moe_comm_req **out)
{
    return start_op(c, g, 1, recv, send, n, dt, op, out);
}

/* the compute stream waits for the gather; the host does not */
static moe_status comm_wait(moe_comm *c, moe_comm_req *req)
{
    if (!req)
        return MOE_OK;
    cudaError_t e = cudaStreamWaitEvent(c->compute, req->done, 0);
    put_event(c, req->done); /* a later record does not move a wait already queued */
    free(req);
    if (e != cudaSuccess)
        return c->h->error(c->h, MOE_ERR_BACKEND, "waiting for a started NCCL all_gather failed: %s",
                           cudaGetErrorString(e));
    return MOE_OK;
}

static moe_status comm_all_to_allv(moe_comm *c, moe_group *g, void *recv, const int64_t *recv_counts,
                                   const int64_t *recv_displs, const void *send, const int64_t *send_counts,
                                   const int64_t *send_displs, moe_dtype dt)
{
    g = grp(c, g);
    size_t es = moe_dtype_size(dt);
    MOE_TRY(op_begin(c));
    pthread_rwlock_rdlock(&c->life);
    ncclResult_t r = ncclGroupStart();
    int opened = r == ncclSuccess;
    for (int p = 0; p < g->size && r == ncclSuccess; p++) {
        if (send_counts[p] > 0)
            r = ncclSend((const char *)send + (size_t)send_displs[p] * es, (size_t)send_counts[p], nccl_type(dt), p,
                         g->comm, c->stream);
        if (r == ncclSuccess && recv_counts[p] > 0)
            r = ncclRecv((char *)recv + (size_t)recv_displs[p] * es, (size_t)recv_counts[p], nccl_type(dt), p,
                         g->comm, c->stream);
    }
    /* a group once opened is closed even after an error: NCCL keeps its
     * group state per thread */
    ncclResult_t r_end = opened ? ncclGroupEnd() : ncclSuccess;
    pthread_rwlock_unlock(&c->life);
    if (r != ncclSuccess || r_end != ncclSuccess)
        return c->h->error(c->h, MOE_ERR_COMM, "NCCL all_to_allv over %d ranks failed: %s", g->size,
                           ncclGetErrorString(r != ncclSuccess ? r : r_end));
    return op_end(c, "all_to_all", 1, NULL);
}

static moe_status comm_all_to_all(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    moe_group *gg = grp(c, g);
    int64_t counts[1024], displs[1024];
    if (gg->size > 1024)
        return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "all_to_all over more than 1024 ranks");
    for (int p = 0; p < gg->size; p++) {
        counts[p] = n;
        displs[p] = (int64_t)p * n;
    }
    return comm_all_to_allv(c, g, recv, counts, displs, send, counts, displs, dt);
}

static moe_status comm_broadcast(moe_comm *c, moe_group *g, void *buf, int64_t n, moe_dtype dt, int root)
{
    g = grp(c, g);
    if (g->size == 1)
        return MOE_OK;
    MOE_TRY(op_begin(c));
    NCCL_TRY(c, ncclBroadcast(buf, buf, (size_t)n, nccl_type(dt), root, g->comm, c->stream));
    return op_end(c, "broadcast", 1, NULL);
}

/* An all-reduce of one word that the host waits for. The watchdog names a
 * missing rank after the timeout; the host's own limit is only a backstop. */
static moe_status comm_barrier(moe_comm *c, moe_group *g)
{
    g = grp(c, g);
    if (g->size == 1)
        return MOE_OK;
    if (!c->barrier_word)
        CUDA_TRY(c, cudaMalloc(&c->barrier_word, 4));
    MOE_TRY(op_begin(c));
    CUDA_TRY(c, cudaMemsetAsync(c->barrier_word, 0, 4, c->stream));
    NCCL_TRY(c, ncclAllReduce(c->barrier_word, c->barrier_word, 1, ncclFloat32, ncclSum, g->comm, c->stream));
    cudaEvent_t done;
    MOE_TRY(op_end(c, "barrier", 1, &done));
    double deadline = now_s() + 2.0 * c->timeout_s + 30.0;
    struct timespec ts = {0, 100000};
    cudaError_t q;
    while ((q = cudaEventQuery(done)) == cudaErrorNotReady && now_s() < deadline) {
        nanosleep(&ts, NULL);
        if (ts.tv_nsec < 10000000)
            ts.tv_nsec *= 2;
    }
    put_event(c, done);
    if (q == cudaErrorNotReady)
        return c->h->error(c->h, MOE_ERR_COMM,
                           "barrier still waiting after %.0f s on rank %d, and the watchdog named no rank: another "
                           "rank died or stalled; check the other ranks' logs",
                           2.0 * c->timeout_s + 30.0, c->world.rank);
    if (q != cudaSuccess)
        return c->h->error(c->h, MOE_ERR_BACKEND, "barrier on rank %d failed: %s", c->world.rank,
                           cudaGetErrorString(q));
    return MOE_OK;
}

static const moe_comm_ops nccl_ops = {
    comm_init,       comm_destroy,        comm_rank,       comm_world,      comm_group_create,
    comm_all_reduce, comm_reduce_scatter, comm_all_gather, comm_all_to_all, comm_all_to_allv,
    comm_broadcast,  comm_barrier,        comm_all_gather_start, comm_reduce_scatter_start, comm_wait,
};

MOE_PLUGIN_DEFINE(MOE_KIND_COMMUNICATOR, moe_comm_ops, "nccl", "1.0",
                  "NCCL collectives on their own stream, TCP rendezvous, a watchdog naming a dead or stalled rank",
                  NULL, 0, NULL, NULL, &nccl_ops)
