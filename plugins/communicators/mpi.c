/* mpi.c: the MPI communicator (OpenMPI from the distribution), for the CPU
 * backend's multi-rank runs and CI's distributed tests.
 *
 * Buffers are host memory (the cpu backend's); this communicator is not
 * CUDA-aware. fp16 and bf16 travel as 16-bit words and are summed through
 * user-defined MPI operations that compute in fp32 (the same rounding as the
 * cpu backend).
 *
 * A rank that dies or stalls must not leave the others hanging, and the
 * message must name it; MPI itself can do neither (inside a collective it
 * cannot say which peer is missing). So collectives are nonblocking
 * underneath and polled (MPI_Test) against --distributed-timeout, and with
 * more than one rank a peer monitor (peer_monitor.c, the NCCL communicator's
 * watchdog) runs beside MPI: at init rank 0 picks a free TCP port and
 * broadcasts it with MPI (everyone is alive then), the ranks connect to it,
 * and a thread per process keeps the connections. When a collective has
 * waited longer than the timeout, the monitor asks every rank and names the
 * one that died, stalled (SIGSTOP, a hung node: its thread does not answer)
 * or exited; every rank gets that verdict and the collective returns it as
 * its error. A connection that closes without a goodbye (a rank died) ends
 * the collective being polled at once.
 *
 * MPI is initialised MPI_THREAD_FUNNELED: the monitor's thread makes no MPI
 * call; it hands its verdict to the main thread under `mu`. After a failed
 * collective MPI_Finalize is skipped: it would wait for the missing rank (and
 * requests that never finish), so the failing process could not exit and
 * mpirun could not end the job (it ends it once a rank exits with an error).
 * If the monitor cannot start (no TCP from the ranks to rank 0's host), a
 * warning says so and the timeouts work as before, naming the missing rank
 * only in groups of two.
 */
#include <math.h>
#include <mpi.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kernels/half.h"
#include "moe/plugin.h"
#include "peer_monitor.h"

struct moe_group {
    MPI_Comm comm;
    int size, rank;
};

struct moe_comm {
    const moe_host *h;
    moe_group world;
    double timeout_s;
    int we_initialized;
    int failed; /* a collective failed: MPI may hold requests that never finish */
    MPI_Op sum_f16, sum_bf16, max_f16, max_bf16;

    moe_peer_monitor *mon; /* NULL with one rank, or when it could not start */
    double grace_s;        /* the monitor's, for how long to wait for its verdict */
    pthread_mutex_t mu;
    int mu_init;
    /* under mu: what the main thread polls (for the monitor's questions) and
     * the monitor's verdict (for the main thread) */
    const char *busy_what; /* the collective being polled; NULL outside */
    double busy_since;
    int have_verdict;
    char verdict[640];
};

static void sum_f16_fn(void *in, void *inout, int *len, MPI_Datatype *dt)
{
    (void)dt;
    uint16_t *a = in, *b = inout;
    for (int i = 0; i < *len; i++)
        b[i] = moe_f32_to_f16(moe_f16_to_f32(a[i]) + moe_f16_to_f32(b[i]));
}

static void sum_bf16_fn(void *in, void *inout, int *len, MPI_Datatype *dt)
{
    (void)dt;
    uint16_t *a = in, *b = inout;
    for (int i = 0; i < *len; i++)
        b[i] = moe_f32_to_bf16(moe_bf16_to_f32(a[i]) + moe_bf16_to_f32(b[i]));
}

static void max_f16_fn(void *in, void *inout, int *len, MPI_Datatype *dt)
{
    (void)dt;
    uint16_t *a = in, *b = inout;
    for (int i = 0; i < *len; i++)
        b[i] = moe_f32_to_f16(fmaxf(moe_f16_to_f32(a[i]), moe_f16_to_f32(b[i])));
}

static void max_bf16_fn(void *in, void *inout, int *len, MPI_Datatype *dt)
{
    (void)dt;
    uint16_t *a = in, *b = inout;
    for (int i = 0; i < *len; i++)
        b[i] = moe_f32_to_bf16(fmaxf(moe_bf16_to_f32(a[i]), moe_bf16_to_f32(b[i])));
}

static MPI_Datatype mpi_type(moe_dtype dt)
{
    switch (dt) {
    case MOE_F32: return MPI_FLOAT;
    case MOE_I32: return MPI_INT;
    case MOE_F64: return MPI_DOUBLE;
    default: return MPI_UINT16_T;
    }
}

static MPI_Op mpi_op(moe_comm *c, moe_dtype dt, moe_reduce_op op)
{
    if (dt == MOE_F16)
        return op == MOE_REDUCE_SUM ? c->sum_f16 : c->max_f16;
    if (dt == MOE_BF16)
        return op == MOE_REDUCE_SUM ? c->sum_bf16 : c->max_bf16;
    return op == MOE_REDUCE_SUM ? MPI_SUM : MPI_MAX;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The message without the monitor's verdict (it could not start, or gave
 * none in time). With two ranks the missing one is known; in larger groups
 * MPI cannot tell which peer has not entered the collective. */
static moe_status timeout_error(moe_comm *c, const char *what, const moe_group *g)
{
    if (g->size == 2) {
        MPI_Group mine, world;
        MPI_Comm_group(g->comm, &mine);
        MPI_Comm_group(MPI_COMM_WORLD, &world);
        int other = 1 - g->rank, other_world = -1;
        MPI_Group_translate_ranks(mine, 1, &other, world, &other_world);
        MPI_Group_free(&mine);
        MPI_Group_free(&world);
        return c->h->error(c->h, MOE_ERR_COMM,
                           "MPI %s timed out after %.0f s on rank %d: rank %d died or stalled (raise "
                           "--distributed-timeout if it is only slow)",
                           what, c->timeout_s, c->world.rank, other_world);
    }
    return c->h->error(c->h, MOE_ERR_COMM,
                       "MPI %s timed out after %.0f s on rank %d of a group of %d: another rank died or "
                       "stalled (raise --distributed-timeout if it is only slow)",
                       what, c->timeout_s, c->world.rank, g->size);
}

static void set_busy(moe_comm *c, const char *what, double since)
{
    pthread_mutex_lock(&c->mu);
    c->busy_what = what;
    c->busy_since = since;
    pthread_mutex_unlock(&c->mu);
}

/* The verdict as this call's error, once it has come. */
static int take_verdict(moe_comm *c, moe_status *st)
{
    char msg[sizeof c->verdict];
    pthread_mutex_lock(&c->mu);
    int have = c->have_verdict;
    if (have)
        memcpy(msg, c->verdict, sizeof msg);
    pthread_mutex_unlock(&c->mu);
    if (have)
        *st = c->h->error(c->h, MOE_ERR_COMM, "%s", msg);
    return have;
}

/* Wait for a nonblocking collective, failing after the timeout. With the
 * monitor, a timeout asks it who is missing and waits for the verdict (every
 * rank gets one within a few graces); a verdict that comes first (a peer died,
 * or another rank's question was answered) ends the wait at once. Once the
 * monitor was asked, the run is over even if the collective then completes:
 * every other rank fails with the same verdict. */
static moe_status wait_req(moe_comm *c, MPI_Request *req, const char *what, const moe_group *g)
{
    double start = now_s(), deadline = start + c->timeout_s, give_up = 0.0;
    int done = 0, asked = 0;
    moe_status st = MOE_OK;
    if (c->mon)
        set_busy(c, what, start);
    for (;;) {
        if (c->mon && take_verdict(c, &st))
            break;
        if (!done) {
            int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
            if (rc != MPI_SUCCESS) {
                st = c->h->error(c->h, MOE_ERR_COMM, "MPI %s failed on rank %d (MPI error %d)", what, c->world.rank,
                                 rc);
                break;
            }
            if (done && !asked)
                break;
        }
        double t = now_s();
        if (!asked && t > deadline) {
            if (!c->mon) {
                st = timeout_error(c, what, g);
                break;
            }
            char head[256];
            snprintf(head, sizeof head, "MPI %s timed out after %.0f s on rank %d", what, c->timeout_s,
                     c->world.rank);
            moe_peer_monitor_stuck(c->mon, head); /* the verdict comes through on_peer_fail */
            asked = 1;
            /* a rank other than 0 hears from rank 0 within a grace, and gets
             * the verdict within two more; the monitor always gives one by
             * then, this is only a backstop */
            give_up = t + 3.0 * c->grace_s + 2.0;
        } else if (asked && t > give_up) {
            st = timeout_error(c, what, g);
            break;
        }
        struct timespec ts = {0, asked ? 2000000 : 200000}; /* 0.2 ms; 2 ms once only the verdict is awaited */
        nanosleep(&ts, NULL);
    }
    if (c->mon)
        set_busy(c, NULL, 0.0);
    if (st != MOE_OK)
        c->failed = 1;
    return st;
}

/* The monitor's view of this rank (its thread): the collective being polled,
 * if any. mu is only ever held for a few instructions. */
static int peer_activity(void *user, char *buf, size_t n)
{
    moe_comm *c = user;
    pthread_mutex_lock(&c->mu);
    int busy = c->busy_what != NULL;
    if (busy)
        snprintf(buf, n, "MPI %s on rank %d (waiting %.0f s)", c->busy_what, c->world.rank,
                 now_s() - c->busy_since);
    else
        snprintf(buf, n, "rank %d cannot continue", c->world.rank);
    pthread_mutex_unlock(&c->mu);
    return busy;
}

/* The monitor's verdict (its thread): kept for the main thread, which makes
 * every MPI call and returns the error from the collective it polls. */
static void on_peer_fail(void *user, const char *msg)
{
    moe_comm *c = user;
    pthread_mutex_lock(&c->mu);
    if (!c->have_verdict) {
        snprintf(c->verdict, sizeof c->verdict, "%s", msg);
        c->have_verdict = 1;
    }
    pthread_mutex_unlock(&c->mu);
}

static moe_group *grp(moe_comm *c, moe_group *g) { return g ? g : &c->world; }

static int count_ok(int64_t n) { return n >= 0 && n <= 2147483647; }

/* A port that was free a moment ago: the monitor binds it itself (with
 * SO_REUSEADDR), so another process could take it in between; the nonce in
 * the rendezvous blob catches a rank that reached the wrong listener. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = 0;
    socklen_t len = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* What rank 0 tells the others over MPI (everyone is alive at start-up). */
typedef struct monitor_addr {
    char host[256]; /* rank 0's hostname */
    int32_t port;   /* <= 0: rank 0 found none, no monitor */
    uint32_t nonce[2];
} monitor_addr;

/* Start the peer monitor beside MPI. Not fatal: without it the timeouts
 * still work, only the message cannot name the missing rank; every rank
 * agrees on whether it runs. */
static void start_monitor(moe_comm *c)
{
    const moe_host *h = c->h;
    monitor_addr ad;
    memset(&ad, 0, sizeof ad);
    char me[256] = "";
    if (gethostname(me, sizeof me - 1) != 0)
        snprintf(me, sizeof me, "localhost");
    if (c->world.rank == 0) {
        memcpy(ad.host, me, sizeof ad.host);
        ad.port = free_port();
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ad.nonce[0] = (uint32_t)ts.tv_nsec ^ ((uint32_t)getpid() << 12);
        ad.nonce[1] = (uint32_t)ts.tv_sec;
    }
    MPI_Bcast(&ad, (int)sizeof ad, MPI_BYTE, 0, MPI_COMM_WORLD);
    ad.host[sizeof ad.host - 1] = '\0';
    /* one host for all (the usual CI and single-node case): loopback, which
     * needs no name service */
    int same = strcmp(me, ad.host) == 0, all_same = 0;
    MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (ad.port <= 0) {
        if (c->world.rank == 0)
            h->log(h, MOE_LOG_WARNING, "moe.communicator.mpi",
                   "the rank watchdog did not start: rank 0 found no free TCP port; collectives still time out "
                   "after --distributed-timeout, but the message cannot name the missing rank");
        return;
    }
    const char *host = all_same ? "127.0.0.1" : ad.host;
    /* every rank is up: the rendezvous takes milliseconds, unless TCP to
     * rank 0's host is blocked; the grace is the monitor's default,
     * min(timeout, 5 s), but at least 1 s */
    double rdv = c->timeout_s < 5.0 ? 5.0 : c->timeout_s > 30.0 ? 30.0 : c->timeout_s;
    c->grace_s = c->timeout_s < 1.0 ? 1.0 : c->timeout_s > 5.0 ? 5.0 : c->timeout_s;
    uint32_t nonce[2] = {0, 0};
    if (c->world.rank == 0)
        memcpy(nonce, ad.nonce, sizeof nonce);
    moe_peer_monitor_cfg cfg = {.rank = c->world.rank,
                                .world = c->world.size,
                                .host = host,
                                .port = ad.port,
                                .timeout_s = rdv,
                                .grace_s = c->grace_s,
                                .blob_name = "the MPI job's nonce",
                                .on_fail = on_peer_fail,
                                .activity = peer_activity,
                                .user = c};
    char err[600] = "";
    moe_status st = moe_peer_monitor_open(&cfg, nonce, sizeof nonce, &c->mon, err, sizeof err);
    if (st == MOE_OK && memcmp(nonce, ad.nonce, sizeof nonce) != 0) {
        snprintf(err, sizeof err, "rank %d reached a listener at %s:%d that is not this job's rank 0",
                 c->world.rank, host, (int)ad.port);
        st = MOE_ERR_COMM;
    }
    int ok = st == MOE_OK, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (all_ok)
        return;
    /* A monitor some ranks lack would report them dead: drop it everywhere,
     * with whatever it said meanwhile. */
    moe_peer_monitor_close(c->mon, 1);
    c->mon = NULL;
    pthread_mutex_lock(&c->mu);
    c->have_verdict = 0;
    pthread_mutex_unlock(&c->mu);
    if (!ok)
        h->log(h, MOE_LOG_WARNING, "moe.communicator.mpi",
               "the rank watchdog did not start on rank %d: %s; collectives still time out after "
               "--distributed-timeout, but the message cannot name the missing rank (allow TCP from every "
               "rank to rank 0's host to get it)",
               c->world.rank, err);
}

static moe_status comm_init(const moe_host *h, moe_comm **out)
{
    moe_comm *c = calloc(1, sizeof *c);
    if (!c)
        return h->error(h, MOE_ERR_NOMEM, "out of host memory creating the MPI communicator");
    c->h = h;
    if (pthread_mutex_init(&c->mu, NULL) != 0) {
        free(c);
        return h->error(h, MOE_ERR_NOMEM, "cannot create the MPI communicator's mutex");
    }
    c->mu_init = 1;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            pthread_mutex_destroy(&c->mu);
            free(c);
            return h->error(h, MOE_ERR_COMM, "MPI_Init failed: start moelm-train with mpirun (or srun --mpi)");
        }
        c->we_initialized = 1;
    }
    c->world.comm = MPI_COMM_WORLD;
    MPI_Comm_rank(MPI_COMM_WORLD, &c->world.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->world.size);
    c->timeout_s = h->opt_set(h, "distributed-timeout") ? h->opt_float(h, "distributed-timeout") : 1800.0;
    MPI_Op_create(sum_f16_fn, 1, &c->sum_f16);
    MPI_Op_create(sum_bf16_fn, 1, &c->sum_bf16);
    MPI_Op_create(max_f16_fn, 1, &c->max_f16);
    MPI_Op_create(max_bf16_fn, 1, &c->max_bf16);
    if (c->world.size > 1)
        start_monitor(c);
    *out = c;
    return MOE_OK;
}

/* The end of a run, or of a rank that failed. After a failed collective (or
 * a verdict this rank has not yet returned) the missing rank may never come:
 * MPI_Finalize would wait for it, so it is skipped and the process exits
 * without it (mpirun then ends the job). Otherwise the goodbye first, so
 * that a rank that finishes earlier than the others is not taken for dead. */
static void comm_destroy(moe_comm *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    int verdict = c->have_verdict, failed = c->failed || verdict;
    pthread_mutex_unlock(&c->mu);
    if (verdict) {
        /* every rank got the verdict at about the same moment; once the
         * first one exits, mpirun kills the rest: a moment's pause lets them
         * print it too */
        struct timespec ts = {0, 500000000};
        nanosleep(&ts, NULL);
    }
    moe_peer_monitor_close(c->mon, !failed);
    c->mon = NULL;
    MPI_Op_free(&c->sum_f16);
    MPI_Op_free(&c->sum_bf16);
    MPI_Op_free(&c->max_f16);
    MPI_Op_free(&c->max_bf16);
    if (c->we_initialized && !failed) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized)
            MPI_Finalize();
    }
    if (c->mu_init)
        pthread_mutex_destroy(&c->mu);
    free(c);
}

static int comm_rank(const moe_comm *c) { return c->world.rank; }
static int comm_world(const moe_comm *c) { return c->world.size; }

static moe_status comm_group_create(moe_comm *c, const int *ranks, int n, moe_group **out)
{
    *out = NULL;
    MPI_Group wg, ng;
    MPI_Comm_group(MPI_COMM_WORLD, &wg);
    MPI_Group_incl(wg, n, ranks, &ng);
    MPI_Comm nc;
    int rc = MPI_Comm_create(MPI_COMM_WORLD, ng, &nc);
    MPI_Group_free(&ng);
    MPI_Group_free(&wg);
    if (rc != MPI_SUCCESS)
        return c->h->error(c->h, MOE_ERR_COMM, "MPI_Comm_create failed for a group of %d ranks", n);
    if (nc == MPI_COMM_NULL)
        return MOE_OK;
    moe_group *g = calloc(1, sizeof *g);
    if (!g)
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory");
    g->comm = nc;
    MPI_Comm_rank(nc, &g->rank);
    MPI_Comm_size(nc, &g->size);
    *out = g;
    return MOE_OK;
}

static moe_status comm_all_reduce(moe_comm *c, moe_group *g, void *buf, int64_t n, moe_dtype dt, moe_reduce_op op)
{
    g = grp(c, g);
    if (g->size == 1 || n == 0)
        return MOE_OK;
    if (!count_ok(n))
        return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "all_reduce of %lld elements exceeds MPI's int count",
                           (long long)n);
    MPI_Request req;
    MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, mpi_type(dt), mpi_op(c, dt, op), g->comm, &req);
    return wait_req(c, &req, "all_reduce", g);
}

struct moe_comm_req {
    MPI_Request req;
    moe_group *g;
    const char *what;
};

/* A started collective: MPI progresses it while the caller computes (as far
 * as OpenMPI progresses nonblocking collectives without a progress thread:
 * at the latest in comm_wait). `reduce`: reduce-scatter, else all-gather.
 * A group of one is a copy, done at once (*out stays NULL). */
static moe_status start_op(moe_comm *c, moe_group *g, int reduce, void *recv, const void *send, int64_t n,
                           moe_dtype dt, moe_reduce_op op, moe_comm_req **out)
{
    *out = NULL;
    g = grp(c, g);
    const char *what = reduce ? "reduce_scatter" : "all_gather";
    if (g->size == 1) {
        if (recv != send)
            memcpy(recv, send, (size_t)n * moe_dtype_size(dt));
        return MOE_OK;
    }
    if (!count_ok(n))
        return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "%s of %lld elements exceeds MPI's int count", what,
                           (long long)n);
    moe_comm_req *r = malloc(sizeof *r);
    if (!r)
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory starting an MPI %s", what);
    r->g = g;
    r->what = what;
    int rc = reduce ? MPI_Ireduce_scatter_block(send, recv, (int)n, mpi_type(dt), mpi_op(c, dt, op), g->comm, &r->req)
                    : MPI_Iallgather(send, (int)n, mpi_type(dt), recv, (int)n, mpi_type(dt), g->comm, &r->req);
    if (rc != MPI_SUCCESS) {
        free(r);
        return c->h->error(c->h, MOE_ERR_COMM, "MPI %s could not start on rank %d (MPI error %d)", what,
                           c->world.rank, rc);
    }
    *out = r;
    return MOE_OK;
}

static moe_status comm_wait(moe_comm *c, moe_comm_req *r)
{
    if (!r)
        return MOE_OK;
    moe_status st = wait_req(c, &r->req, r->what, r->g);
    free(r);
    return st;
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

/* the blocking forms: started and waited for */
static moe_status comm_all_gather(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    moe_comm_req *r;
    MOE_TRY(start_op(c, g, 0, recv, send, n, dt, MOE_REDUCE_SUM, &r));
    return comm_wait(c, r);
}

static moe_status comm_reduce_scatter(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n,
                                      moe_dtype dt, moe_reduce_op op)
{
    moe_comm_req *r;
    MOE_TRY(start_op(c, g, 1, recv, send, n, dt, op, &r));
    return comm_wait(c, r);
}

static moe_status comm_all_to_all(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    g = grp(c, g);
    if (g->size == 1) {
        if (recv != send)
            memcpy(recv, send, (size_t)n * moe_dtype_size(dt));
        return MOE_OK;
    }
    if (!count_ok(n))
        return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "all_to_all of %lld elements exceeds MPI's int count",
                           (long long)n);
    MPI_Request req;
    MPI_Ialltoall(send, (int)n, mpi_type(dt), recv, (int)n, mpi_type(dt), g->comm, &req);
    return wait_req(c, &req, "all_to_all", g);
}

static moe_status comm_all_to_allv(moe_comm *c, moe_group *g, void *recv, const int64_t *recv_counts,
                                   const int64_t *recv_displs, const void *send, const int64_t *send_counts,
                                   const int64_t *send_displs, moe_dtype dt)
{
    g = grp(c, g);
    int p = g->size;
    int *buf = malloc((size_t)p * 4 * sizeof *buf);
    if (!buf)
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory");
    for (int i = 0; i < p; i++) {
        if (!count_ok(recv_counts[i]) || !count_ok(recv_displs[i]) || !count_ok(send_counts[i]) ||
            !count_ok(send_displs[i])) {
            free(buf);
            return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "all_to_allv counts exceed MPI's int range");
        }
        buf[i] = (int)send_counts[i];
        buf[p + i] = (int)send_displs[i];
        buf[2 * p + i] = (int)recv_counts[i];
        buf[3 * p + i] = (int)recv_displs[i];
    }
    MPI_Request req;
    MPI_Ialltoallv(send, buf, buf + p, mpi_type(dt), recv, buf + 2 * p, buf + 3 * p, mpi_type(dt), g->comm, &req);
    moe_status st = wait_req(c, &req, "all_to_allv", g);
    free(buf);
    return st;
}

static moe_status comm_broadcast(moe_comm *c, moe_group *g, void *buf, int64_t n, moe_dtype dt, int root)
{
    g = grp(c, g);
    if (g->size == 1)
        return MOE_OK;
    if (!count_ok(n))
        return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "broadcast of %lld elements exceeds MPI's int count",
                           (long long)n);
    MPI_Request req;
    MPI_Ibcast(buf, (int)n, mpi_type(dt), root, g->comm, &req);
    return wait_req(c, &req, "broadcast", g);
}

static moe_status comm_barrier(moe_comm *c, moe_group *g)
{
    g = grp(c, g);
    MPI_Request req;
    MPI_Ibarrier(g->comm, &req);
    return wait_req(c, &req, "barrier", g);
}

static const moe_comm_ops mpi_ops = {
    comm_init,       comm_destroy,        comm_rank,       comm_world,       comm_group_create,
    comm_all_reduce, comm_reduce_scatter, comm_all_gather, comm_all_to_all,  comm_all_to_allv,
    comm_broadcast,  comm_barrier,        comm_all_gather_start, comm_reduce_scatter_start, comm_wait,
};

MOE_PLUGIN_DEFINE(MOE_KIND_COMMUNICATOR, moe_comm_ops, "mpi", "1.0",
                  "MPI collectives over host memory (cpu backend), with timeouts", NULL, 0, NULL, NULL, &mpi_ops)
