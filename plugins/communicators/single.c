/* single.c: the `single` communicator, one process and no peers (world 1).
 *
 * Every collective over one rank is the identity: all_reduce, broadcast and
 * barrier do nothing; reduce_scatter, all_gather and all_to_all(v) copy their
 * one chunk from send to recv through the backend (nothing when the buffers
 * are the same). The only group is {0}, embedded in the communicator.
 *
 * Not here: any transport; a list naming another rank is an error, since it
 * means the caller believes in a larger world.
 */
#include <stdlib.h>

#include "moe/plugin.h"

struct moe_group {
    int rank0; /* the one member */
};

struct moe_comm {
    const moe_host *h;
    struct moe_group group;
};

static moe_status single_init(const moe_host *h, moe_comm **out)
{
    *out = NULL;
    moe_comm *c = calloc(1, sizeof *c);
    if (!c)
        return h->error(h, MOE_ERR_NOMEM, "single communicator: out of host memory");
    c->h = h;
    c->group.rank0 = 0;
    *out = c;
    return MOE_OK;
}

static void single_destroy(moe_comm *comm) { free(comm); }
static int single_rank(const moe_comm *comm) { (void)comm; return 0; }
static int single_world(const moe_comm *comm) { (void)comm; return 1; }

static moe_status check_group(moe_comm *comm, moe_group *g, const char *what)
{
    if (g && g != &comm->group)
        return comm->h->error(comm->h, MOE_ERR_COMM,
                              "single communicator: %s on a group this communicator did not create", what);
    return MOE_OK;
}

static moe_status single_group_create(moe_comm *comm, const int *ranks, int n, moe_group **g)
{
    *g = NULL;
    if (n < 1 || !ranks)
        return comm->h->error(comm->h, MOE_ERR_INVALID_ARG,
                              "single communicator: a group needs at least one rank; got %d", n);
    for (int i = 0; i < n; i++)
        if (ranks[i] != 0)
            return comm->h->error(comm->h, MOE_ERR_INVALID_ARG,
                                  "single communicator: the world is rank 0 only; group lists rank %d (of %d)",
                                  ranks[i], n);
    if (n != 1)
        return comm->h->error(comm->h, MOE_ERR_INVALID_ARG,
                              "single communicator: group lists rank 0 %d times; expected it once", n);
    *g = &comm->group;
    return MOE_OK;
}

/* recv = send for n elements of dt, through the backend */
static moe_status copy_chunk(moe_comm *comm, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    if (n < 0)
        return comm->h->error(comm->h, MOE_ERR_INVALID_ARG, "single communicator: negative count %lld",
                              (long long)n);
    if (n == 0 || recv == send)
        return MOE_OK;
    const moe_host *h = comm->h;
    return h->backend->copy(h->ctx, recv, send, (uint64_t)n * moe_dtype_size(dt));
}

static moe_status single_all_reduce(moe_comm *comm, moe_group *g, void *buf, int64_t n, moe_dtype dt,
                                    moe_reduce_op op)
{
    (void)buf, (void)n, (void)dt, (void)op;
    return check_group(comm, g, "all_reduce");
}

static moe_status single_reduce_scatter(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n,
                                        moe_dtype dt, moe_reduce_op op)
{
    (void)op;
    moe_status st = check_group(comm, g, "reduce_scatter");
    return st != MOE_OK ? st : copy_chunk(comm, recv, send, n, dt);
}

static moe_status single_all_gather(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n,
                                    moe_dtype dt)
{
    moe_status st = check_group(comm, g, "all_gather");
    return st != MOE_OK ? st : copy_chunk(comm, recv, send, n, dt);
}

static moe_status single_all_to_all(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n,
                                    moe_dtype dt)
{
    moe_status st = check_group(comm, g, "all_to_all");
    return st != MOE_OK ? st : copy_chunk(comm, recv, send, n, dt);
}

static moe_status single_all_to_allv(moe_comm *comm, moe_group *g, void *recv, const int64_t *recv_counts,
                                     const int64_t *recv_displs, const void *send, const int64_t *send_counts,
                                     const int64_t *send_displs, moe_dtype dt)
{
    MOE_TRY(check_group(comm, g, "all_to_allv"));
    if (send_counts[0] != recv_counts[0])
        return comm->h->error(comm->h, MOE_ERR_INVALID_ARG,
                              "single communicator: all_to_allv sends %lld elements to itself but expects to "
                              "receive %lld",
                              (long long)send_counts[0], (long long)recv_counts[0]);
    size_t es = moe_dtype_size(dt);
    return copy_chunk(comm, (char *)recv + (size_t)recv_displs[0] * es,
                      (const char *)send + (size_t)send_displs[0] * es, send_counts[0], dt);
}

static moe_status single_broadcast(moe_comm *comm, moe_group *g, void *buf, int64_t n, moe_dtype dt, int root)
{
    (void)buf, (void)n, (void)dt;
    MOE_TRY(check_group(comm, g, "broadcast"));
    if (root != 0)
        return comm->h->error(comm->h, MOE_ERR_INVALID_ARG,
                              "single communicator: broadcast from rank %d; the only rank is 0", root);
    return MOE_OK;
}

static moe_status single_barrier(moe_comm *comm, moe_group *g) { return check_group(comm, g, "barrier"); }

/* nothing to overlap: the copy is done before it returns */
static moe_status single_all_gather_start(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n,
                                          moe_dtype dt, moe_comm_req **req)
{
    *req = NULL;
    return single_all_gather(comm, g, recv, send, n, dt);
}

static moe_status single_reduce_scatter_start(moe_comm *comm, moe_group *g, void *recv, const void *send,
                                              int64_t n, moe_dtype dt, moe_reduce_op op, moe_comm_req **req)
{
    *req = NULL;
    return single_reduce_scatter(comm, g, recv, send, n, dt, op);
}

static moe_status single_wait(moe_comm *comm, moe_comm_req *req)
{
    if (req)
        return comm->h->error(comm->h, MOE_ERR_INVALID_ARG,
                              "single communicator: wait for a request it never started");
    return MOE_OK;
}

static const moe_comm_ops single_ops = {
    single_init,       single_destroy,        single_rank,       single_world,
    single_group_create, single_all_reduce,   single_reduce_scatter, single_all_gather,
    single_all_to_all, single_all_to_allv,    single_broadcast,  single_barrier,
    single_all_gather_start, single_reduce_scatter_start, single_wait,
};

MOE_PLUGIN_DEFINE(MOE_KIND_COMMUNICATOR, moe_comm_ops, "single", "1.0",
                  "one process, no peers: collectives are copies or nothing", NULL, 0, NULL, NULL, &single_ops)
