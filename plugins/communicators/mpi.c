/* mpi.c: the MPI communicator (OpenMPI from the distribution), for the CPU
 * backend's multi-rank runs and CI's distributed tests.
 *
 * Buffers are host memory (the cpu backend's); this communicator is not
 * CUDA-aware. fp16 and bf16 travel as 16-bit words and are summed through
 * user-defined MPI operations that compute in fp32 (the same rounding as the
 * cpu backend). Collectives are nonblocking underneath and polled against
 * --distributed-timeout, so a rank that died or stalls makes the others fail
 * with a message instead of hanging; MPI cannot say which rank is missing
 * inside a collective, so the message names the collective and the group.
 */
#include <math.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/half.h"
#include "moe/plugin.h"

struct moe_group {
    MPI_Comm comm;
    int size, rank;
};

struct moe_comm {
    const moe_host *h;
    moe_group world;
    double timeout_s;
    int we_initialized;
    MPI_Op sum_f16, sum_bf16, max_f16, max_bf16;
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

/* Wait for a nonblocking collective, failing after the timeout. */
static moe_status wait_req(moe_comm *c, MPI_Request *req, const char *what, const moe_group *g)
{
    double deadline = now_s() + c->timeout_s;
    for (;;) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return c->h->error(c->h, MOE_ERR_COMM, "MPI %s failed on rank %d (MPI error %d)", what, c->world.rank, rc);
        if (done)
            return MOE_OK;
        if (now_s() > deadline) {
            /* With two ranks the missing one is known; in larger groups MPI
             * cannot tell which peer has not entered the collective. */
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
        struct timespec ts = {0, 200000}; /* 0.2 ms */
        nanosleep(&ts, NULL);
    }
}

static moe_group *grp(moe_comm *c, moe_group *g) { return g ? g : &c->world; }

static int count_ok(int64_t n) { return n >= 0 && n <= 2147483647; }

static moe_status comm_init(const moe_host *h, moe_comm **out)
{
    moe_comm *c = calloc(1, sizeof *c);
    if (!c)
        return h->error(h, MOE_ERR_NOMEM, "out of host memory creating the MPI communicator");
    c->h = h;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
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
    *out = c;
    return MOE_OK;
}

static void comm_destroy(moe_comm *c)
{
    if (!c)
        return;
    MPI_Op_free(&c->sum_f16);
    MPI_Op_free(&c->sum_bf16);
    MPI_Op_free(&c->max_f16);
    MPI_Op_free(&c->max_bf16);
    if (c->we_initialized) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized)
            MPI_Finalize();
    }
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

static moe_status comm_reduce_scatter(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n,
                                      moe_dtype dt, moe_reduce_op op)
{
    g = grp(c, g);
    if (g->size == 1) {
        memcpy(recv, send, (size_t)n * moe_dtype_size(dt));
        return MOE_OK;
    }
    if (!count_ok(n))
        return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "reduce_scatter of %lld elements exceeds MPI's int count",
                           (long long)n);
    MPI_Request req;
    MPI_Ireduce_scatter_block(send, recv, (int)n, mpi_type(dt), mpi_op(c, dt, op), g->comm, &req);
    return wait_req(c, &req, "reduce_scatter", g);
}

static moe_status comm_all_gather(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    g = grp(c, g);
    if (g->size == 1) {
        if (recv != send)
            memcpy(recv, send, (size_t)n * moe_dtype_size(dt));
        return MOE_OK;
    }
    if (!count_ok(n))
        return c->h->error(c->h, MOE_ERR_UNSUPPORTED, "all_gather of %lld elements exceeds MPI's int count",
                           (long long)n);
    MPI_Request req;
    MPI_Iallgather(send, (int)n, mpi_type(dt), recv, (int)n, mpi_type(dt), g->comm, &req);
    return wait_req(c, &req, "all_gather", g);
}

struct moe_comm_req {
    MPI_Request req;
    moe_group *g;
};

static moe_status comm_all_gather_start(moe_comm *c, moe_group *g, void *recv, const void *send, int64_t n,
                                        moe_dtype dt, moe_comm_req **out)
{
    *out = NULL;
    g = grp(c, g);
    if (g->size == 1 || !count_ok(n))
        return comm_all_gather(c, g, recv, send, n, dt); /* a copy, or the count error */
    moe_comm_req *r = malloc(sizeof *r);
    if (!r)
        return c->h->error(c->h, MOE_ERR_NOMEM, "out of host memory starting an all_gather");
    r->g = g;
    if (MPI_Iallgather(send, (int)n, mpi_type(dt), recv, (int)n, mpi_type(dt), g->comm, &r->req) != MPI_SUCCESS) {
        free(r);
        return c->h->error(c->h, MOE_ERR_COMM, "MPI all_gather could not start on rank %d", c->world.rank);
    }
    *out = r;
    return MOE_OK;
}

static moe_status comm_wait(moe_comm *c, moe_comm_req *r)
{
    if (!r)
        return MOE_OK;
    moe_status st = wait_req(c, &r->req, "all_gather", r->g);
    free(r);
    return st;
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
    comm_broadcast,  comm_barrier,        comm_all_gather_start, comm_wait,
};

MOE_PLUGIN_DEFINE(MOE_KIND_COMMUNICATOR, moe_comm_ops, "mpi", "1.0",
                  "MPI collectives over host memory (cpu backend), with timeouts", NULL, 0, NULL, NULL, &mpi_ops)
