/* nccl.c: the NCCL communicator for GPU runs.
 *
 * Peers meet through a TCP rendezvous at --distributed-init-method
 * tcp://host:port (set by moelm-train from SLURM, torchrun-style variables or
 * its own single-node spawner): rank 0 listens, creates the NCCL unique id and
 * hands it to every rank that connects; a rank that never arrives is named in
 * the error after --distributed-timeout seconds. Collectives are queued on the
 * backend's native stream (backend->native_stream), so they are ordered after
 * the compute that produced their inputs without a host synchronisation.
 *
 * Not here: a watchdog for a peer that dies inside a collective after start-up
 * (NCCL then blocks the stream); the rendezvous and every host-side wait time out.
 */
#include <arpa/inet.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <nccl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "moe/plugin.h"

struct moe_group {
    ncclComm_t comm;
    int size, rank;
};

struct moe_comm {
    const moe_host *h;
    moe_group world;
    cudaStream_t stream;
    double timeout_s;
};

#define NCCL_TRY(c, call)                                                                                     \
    do {                                                                                                      \
        ncclResult_t r_ = (call);                                                                             \
        if (r_ != ncclSuccess)                                                                                \
            return (c)->h->error((c)->h, MOE_ERR_COMM, "%s failed: %s", #call, ncclGetErrorString(r_));      \
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

static int full_io(int fd, void *buf, size_t n, int writing, double deadline)
{
    char *p = buf;
    while (n > 0) {
        struct pollfd pf = {fd, (short)(writing ? POLLOUT : POLLIN), 0};
        int ms = (int)((deadline - now_s()) * 1000.0);
        if (ms <= 0 || poll(&pf, 1, ms) <= 0)
            return -1;
        ssize_t k = writing ? write(fd, p, n) : read(fd, p, n);
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
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

static moe_status rendezvous_root(moe_comm *c, int port, ncclUniqueId *id)
{
    int world = c->world.size;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = htons((uint16_t)port);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, world) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return c->h->error(c->h, MOE_ERR_COMM, "rank 0 cannot listen on port %d: %s (choose another "
                                               "--distributed-port / MASTER_PORT)",
                           port, strerror(e));
    }
    char *arrived = calloc((size_t)world, 1);
    int *fds = malloc((size_t)world * sizeof *fds);
    if (!arrived || !fds) {
        close(fd);
        free(arrived);
        free(fds);
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory");
    }
    arrived[0] = 1;
    int got = 1;
    double deadline = now_s() + c->timeout_s;
    while (got < world) {
        struct pollfd pf = {fd, POLLIN, 0};
        int ms = (int)((deadline - now_s()) * 1000.0);
        if (ms <= 0 || poll(&pf, 1, ms) <= 0)
            break;
        int cfd = accept(fd, NULL, NULL);
        if (cfd < 0)
            continue;
        int32_t r = -1;
        if (full_io(cfd, &r, sizeof r, 0, deadline) != 0 || r <= 0 || r >= world || arrived[r]) {
            close(cfd);
            continue;
        }
        arrived[r] = 1;
        fds[r] = cfd;
        got++;
    }
    moe_status st = MOE_OK;
    if (got < world) {
        char missing[512] = "";
        size_t o = 0;
        for (int r = 0; r < world && o + 16 < sizeof missing; r++)
            if (!arrived[r])
                o += (size_t)snprintf(missing + o, sizeof missing - o, "%s%d", o ? ", " : "", r);
        st = c->h->error(c->h, MOE_ERR_COMM, "rendezvous on port %d timed out after %.0f s: rank(s) %s never arrived",
                         port, c->timeout_s, missing);
    } else {
        for (int r = 1; r < world; r++)
            if (full_io(fds[r], id, sizeof *id, 1, deadline) != 0)
                st = c->h->error(c->h, MOE_ERR_COMM, "rendezvous: sending the NCCL id to rank %d failed", r);
    }
    for (int r = 1; r < world; r++)
        if (arrived[r])
            close(fds[r]);
    close(fd);
    free(arrived);
    free(fds);
    return st;
}

static moe_status rendezvous_peer(moe_comm *c, const char *host, int port, ncclUniqueId *id)
{
    char ports[16];
    snprintf(ports, sizeof ports, "%d", port);
    double deadline = now_s() + c->timeout_s;
    while (now_s() < deadline) {
        struct addrinfo hints, *res = NULL;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        if (getaddrinfo(host, ports, &hints, &res) == 0) {
            int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
            if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
                freeaddrinfo(res);
                int32_t r = c->world.rank;
                int ok = full_io(fd, &r, sizeof r, 1, deadline) == 0 && full_io(fd, id, sizeof *id, 0, deadline) == 0;
                close(fd);
                if (ok)
                    return MOE_OK;
                return c->h->error(c->h, MOE_ERR_COMM, "rendezvous with rank 0 at %s:%d broke off", host, port);
            }
            if (fd >= 0)
                close(fd);
            freeaddrinfo(res);
        }
        usleep(100000);
    }
    return c->h->error(c->h, MOE_ERR_COMM, "rank %d could not reach rank 0 at %s:%d within %.0f s: rank 0 never "
                                           "arrived",
                       c->world.rank, host, port, c->timeout_s);
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
    c->stream = h->backend && h->backend->native_stream ? (cudaStream_t)h->backend->native_stream(h->ctx) : NULL;
    ncclUniqueId id;
    moe_status st = MOE_OK;
    if (c->world.size == 1) {
        if (ncclGetUniqueId(&id) != ncclSuccess)
            st = h->error(h, MOE_ERR_COMM, "ncclGetUniqueId failed");
    } else {
        char host[256] = "";
        int port = 0;
        st = parse_init_method(c, h->opt_str(h, "distributed-init-method"), host, sizeof host, &port);
        if (st == MOE_OK) {
            if (c->world.rank == 0) {
                if (ncclGetUniqueId(&id) != ncclSuccess)
                    st = h->error(h, MOE_ERR_COMM, "ncclGetUniqueId failed");
                else
                    st = rendezvous_root(c, port, &id);
            } else {
                st = rendezvous_peer(c, host, port, &id);
            }
        }
    }
    if (st == MOE_OK) {
        ncclResult_t r = ncclCommInitRank(&c->world.comm, c->world.size, id, c->world.rank);
        if (r != ncclSuccess)
            st = h->error(h, MOE_ERR_COMM, "ncclCommInitRank (rank %d of %d) failed: %s", c->world.rank,
                          c->world.size, ncclGetErrorString(r));
    }
    if (st != MOE_OK) {
        free(c);
        return st;
    }
    *out = c;
    return MOE_OK;
}

static void comm_destroy(moe_comm *c)
{
    if (!c)
        return;
    if (c->world.comm)
        ncclCommDestroy(c->world.comm);
    free(c);
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
    if (!g)
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory");
    g->comm = nc;
    g->size = n;
    g->rank = member;
    *out = g;
    return MOE_OK;
}

static moe_group *grp(moe_comm *c, moe_group *g) { return g ? g : &c->world; }

static moe_status comm_all_reduce(moe_comm *c, moe_group *g, void *buf, int64_t n, moe_dtype dt, moe_reduce_op op)
{
    g = grp(c, g);
    if (n == 0)
        return MOE_OK;
    NCCL_TRY(c, ncclAllReduce(buf, buf, (size_t)n, nccl_type(dt), op == MOE_REDUCE_SUM ? ncclSum : ncclMax, g->comm,
                              c->stream));
    return MOE_OK;
}

static moe_status comm_reduce_scatter(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n,
                                      moe_dtype dt, moe_reduce_op op)
{
    g = grp(c, g);
    NCCL_TRY(c, ncclReduceScatter(send, recv, (size_t)n, nccl_type(dt), op == MOE_REDUCE_SUM ? ncclSum : ncclMax,
                                  g->comm, c->stream));
    return MOE_OK;
}

static moe_status comm_all_gather(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    g = grp(c, g);
    NCCL_TRY(c, ncclAllGather(send, recv, (size_t)n, nccl_type(dt), g->comm, c->stream));
    return MOE_OK;
}

static moe_status comm_all_to_allv(moe_comm *c, moe_group *g, void *recv, const int64_t *recv_counts,
                                   const int64_t *recv_displs, const void *send, const int64_t *send_counts,
                                   const int64_t *send_displs, moe_dtype dt)
{
    g = grp(c, g);
    size_t es = moe_dtype_size(dt);
    NCCL_TRY(c, ncclGroupStart());
    for (int p = 0; p < g->size; p++) {
        if (send_counts[p] > 0)
            NCCL_TRY(c, ncclSend((const char *)send + (size_t)send_displs[p] * es, (size_t)send_counts[p],
                                 nccl_type(dt), p, g->comm, c->stream));
        if (recv_counts[p] > 0)
            NCCL_TRY(c, ncclRecv((char *)recv + (size_t)recv_displs[p] * es, (size_t)recv_counts[p], nccl_type(dt), p,
                                 g->comm, c->stream));
    }
    NCCL_TRY(c, ncclGroupEnd());
    return MOE_OK;
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
    NCCL_TRY(c, ncclBroadcast(buf, buf, (size_t)n, nccl_type(dt), root, g->comm, c->stream));
    return MOE_OK;
}

static moe_status comm_barrier(moe_comm *c, moe_group *g)
{
    /* an all-reduce of one word, waited for on the host with the timeout */
    g = grp(c, g);
    if (g->size == 1)
        return MOE_OK;
    void *word;
    if (cudaMalloc(&word, 4) != cudaSuccess)
        return c->h->error(c->h, MOE_ERR_NOMEM, "barrier: cudaMalloc of 4 bytes failed");
    cudaMemsetAsync(word, 0, 4, c->stream);
    ncclResult_t r = ncclAllReduce(word, word, 1, ncclFloat32, ncclSum, g->comm, c->stream);
    double deadline = now_s() + c->timeout_s;
    cudaError_t q = cudaErrorNotReady;
    while (r == ncclSuccess && (q = cudaStreamQuery(c->stream)) == cudaErrorNotReady && now_s() < deadline)
        usleep(1000);
    cudaFree(word);
    if (r != ncclSuccess)
        return c->h->error(c->h, MOE_ERR_COMM, "barrier failed: %s", ncclGetErrorString(r));
    if (q == cudaErrorNotReady)
        return c->h->error(c->h, MOE_ERR_COMM, "barrier timed out after %.0f s on rank %d: another rank died or "
                                               "stalled",
                           c->timeout_s, c->world.rank);
    return MOE_OK;
}

static const moe_comm_ops nccl_ops = {
    comm_init,       comm_destroy,        comm_rank,       comm_world,      comm_group_create,
    comm_all_reduce, comm_reduce_scatter, comm_all_gather, comm_all_to_all, comm_all_to_allv,
    comm_broadcast,  comm_barrier,
};

MOE_PLUGIN_DEFINE(MOE_KIND_COMMUNICATOR, moe_comm_ops, "nccl", "1.0",
                  "NCCL collectives on the backend's stream, TCP rendezvous", NULL, 0, NULL, NULL, &nccl_ops)
