/* opwrap.c: see opwrap.h. The wrappers below are one pattern repeated:
 * begin a span, call the real entry, end the span. */
#include "core/opwrap.h"

#include <string.h>

#include "core/internal.h"
#include "core/profile.h"

static moe_ops g_ops;        /* the backend's table, as it was */
static moe_comm_ops g_comm;  /* the communicator's */
static moe_ops g_wops;       /* what plugins see */
static moe_comm_ops g_wcomm;
static moe_route_observer g_observer;
static void *g_observer_ctx;

#define UNIT_DEPTH 8
static const char *g_units[UNIT_DEPTH];
static int g_unit_spans[UNIT_DEPTH];
static int g_n_units;

void moe_opwrap_unit(const char *name, int begin)
{
    if (begin) {
        if (g_n_units < UNIT_DEPTH) {
            g_units[g_n_units] = name;
            g_unit_spans[g_n_units] = moe_profile_begin(MOE_PROF_INHERIT, name);
        }
        g_n_units++;
        return;
    }
    /* releases come in reverse order of gathers, except the root unit, which
     * a training forward gathers and the backward releases: find it */
    for (int i = (g_n_units < UNIT_DEPTH ? g_n_units : UNIT_DEPTH) - 1; i >= 0; i--) {
        if (g_units[i] == name) {
            moe_profile_end(g_unit_spans[i]);
            memmove(&g_units[i], &g_units[i + 1], (size_t)(UNIT_DEPTH - 1 - i) * sizeof g_units[0]);
            memmove(&g_unit_spans[i], &g_unit_spans[i + 1], (size_t)(UNIT_DEPTH - 1 - i) * sizeof g_unit_spans[0]);
            g_n_units--;
            return;
        }
    }
    if (g_n_units > UNIT_DEPTH) /* one of those not kept */
        g_n_units--;
}

void moe_opwrap_set_route_observer(moe_route_observer fn, void *ctx)
{
    g_observer = fn;
    g_observer_ctx = ctx;
}

static moe_status w_route_forward(moe_ctx *c, const moe_route_args *a)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "route_forward");
    moe_status st = g_ops.route_forward(c, a);
    moe_profile_end(id);
    if (st == MOE_OK && g_observer)
        g_observer(g_observer_ctx, g_n_units > 0 && g_n_units <= UNIT_DEPTH ? g_units[g_n_units - 1] : NULL, a);
    return st;
}

static moe_status w_fill(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float value)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "fill");
    moe_status st = g_ops.fill(c, x, dt, n, value);
    moe_profile_end(id);
    return st;
}

static moe_status w_cast(moe_ctx *c, void *dst, moe_dtype dst_dt, const void *src, moe_dtype src_dt, int64_t n)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "cast");
    moe_status st = g_ops.cast(c, dst, dst_dt, src, src_dt, n);
    moe_profile_end(id);
    return st;
}

static moe_status w_axpby(moe_ctx *c, void *y, const void *x, moe_dtype dt, int64_t n, float a, float b)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "axpby");
    moe_status st = g_ops.axpby(c, y, x, dt, n, a, b);
    moe_profile_end(id);
    return st;
}

static moe_status w_add(moe_ctx *c, void *out, const void *x, const void *y, moe_dtype dt, int64_t n)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "add");
    moe_status st = g_ops.add(c, out, x, y, dt, n);
    moe_profile_end(id);
    return st;
}

static moe_status w_init_uniform(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float lo, float hi, uint64_t seed, uint64_t stream)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "init_uniform");
    moe_status st = g_ops.init_uniform(c, x, dt, n, lo, hi, seed, stream);
    moe_profile_end(id);
    return st;
}

static moe_status w_init_normal(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float mean, float std, uint64_t seed, uint64_t stream)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "init_normal");
    moe_status st = g_ops.init_normal(c, x, dt, n, mean, std, seed, stream);
    moe_profile_end(id);
    return st;
}

static moe_status w_sum_f32(moe_ctx *c, float *out, const float *x, int64_t n, int64_t stride, float scale)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "sum_f32");
    moe_status st = g_ops.sum_f32(c, out, x, n, stride, scale);
    moe_profile_end(id);
    return st;
}

static moe_status w_sumsq(moe_ctx *c, float *out, const void *x, moe_dtype dt, int64_t n)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "sumsq");
    moe_status st = g_ops.sumsq(c, out, x, dt, n);
    moe_profile_end(id);
    return st;
}

static moe_status w_matmul(moe_ctx *c, const moe_matmul_desc *d)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "matmul");
    moe_status st = g_ops.matmul(c, d);
    moe_profile_end(id);
    return st;
}

static moe_status w_bias_backward(moe_ctx *c, void *dbias, const void *dy, int64_t N, int64_t C, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "bias_backward");
    moe_status st = g_ops.bias_backward(c, dbias, dy, N, C, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_act_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, moe_act_kind kind)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "act_forward");
    moe_status st = g_ops.act_forward(c, out, inp, n, dt, kind);
    moe_profile_end(id);
    return st;
}

static moe_status w_act_backward(moe_ctx *c, void *dinp, const void *inp, const void *dout, int64_t n, moe_dtype dt, moe_act_kind kind)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "act_backward");
    moe_status st = g_ops.act_backward(c, dinp, inp, dout, n, dt, kind);
    moe_profile_end(id);
    return st;
}

static moe_status w_dropout_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, float p, uint64_t seed, uint64_t stream)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "dropout_forward");
    moe_status st = g_ops.dropout_forward(c, out, inp, n, dt, p, seed, stream);
    moe_profile_end(id);
    return st;
}

static moe_status w_dropout_backward(moe_ctx *c, void *din, const void *dout, int64_t n, moe_dtype dt, float p, uint64_t seed, uint64_t stream)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "dropout_backward");
    moe_status st = g_ops.dropout_backward(c, din, dout, n, dt, p, seed, stream);
    moe_profile_end(id);
    return st;
}

static moe_status w_layernorm_forward(moe_ctx *c, void *out, float *mean, float *rstd, const void *inp, const void *weight, const void *bias, int64_t N, int64_t C, float eps, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "layernorm_forward");
    moe_status st = g_ops.layernorm_forward(c, out, mean, rstd, inp, weight, bias, N, C, eps, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_layernorm_backward(moe_ctx *c, void *dinp, void *dweight, void *dbias, const void *dout, const void *inp, const void *weight, const float *mean, const float *rstd, int64_t N, int64_t C, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "layernorm_backward");
    moe_status st = g_ops.layernorm_backward(c, dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_embedding_forward(moe_ctx *c, void *out, const int32_t *tokens, const void *table, int64_t B, int64_t T, int64_t C, float scale, int padding_idx, int sinusoidal, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "embedding_forward");
    moe_status st = g_ops.embedding_forward(c, out, tokens, table, B, T, C, scale, padding_idx, sinusoidal, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_embedding_backward(moe_ctx *c, void *dtable, const void *dout, const int32_t *tokens, int64_t B, int64_t T, int64_t C, int64_t V, float scale, int padding_idx, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "embedding_backward");
    moe_status st = g_ops.embedding_backward(c, dtable, dout, tokens, B, T, C, V, scale, padding_idx, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_attention_forward(moe_ctx *c, void *out, float *lse, const void *q, const void *k, const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D, float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "attention_forward");
    moe_status st = g_ops.attention_forward(c, out, lse, q, k, v, ld, B, T, H, D, dropout_p, seed, stream, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_attention_backward(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout, const void *out, const float *lse, const void *q, const void *k, const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D, float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "attention_backward");
    moe_status st = g_ops.attention_backward(c, dq, dk, dv, ldd, dout, out, lse, q, k, v, ld, B, T, H, D, dropout_p, seed, stream, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_cross_entropy(moe_ctx *c, float *losses, void *logits, const int32_t *targets, int64_t N, int64_t V, int ignore_index, float grad_scale, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "cross_entropy");
    moe_status st = g_ops.cross_entropy(c, losses, logits, targets, N, V, ignore_index, grad_scale, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_route_backward(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux, float *dlogits)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "route_backward");
    moe_status st = g_ops.route_backward(c, a, dweight, dl_aux, dlogits);
    moe_profile_end(id);
    return st;
}

static moe_status w_dispatch_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert, const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "dispatch_forward");
    moe_status st = g_ops.dispatch_forward(c, out, x, expert, slot, S, E, C, d, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_dispatch_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert, const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "dispatch_backward");
    moe_status st = g_ops.dispatch_backward(c, dx, dout, expert, slot, S, E, C, d, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_combine_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert, const int32_t *slot, const float *weight, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "combine_forward");
    moe_status st = g_ops.combine_forward(c, y, eout, expert, slot, weight, S, E, C, d, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_combine_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout, const int32_t *expert, const int32_t *slot, const float *weight, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "combine_backward");
    moe_status st = g_ops.combine_backward(c, deout, dweight, dy, eout, expert, slot, weight, S, E, C, d, dt);
    moe_profile_end(id);
    return st;
}

static moe_status w_adam_step(moe_ctx *c, const moe_adam_args *a)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "adam_step");
    moe_status st = g_ops.adam_step(c, a);
    moe_profile_end(id);
    return st;
}

static moe_status w_sgd_step(moe_ctx *c, const moe_sgd_args *a)
{
    int id = moe_profile_begin(MOE_PROF_INHERIT, "sgd_step");
    moe_status st = g_ops.sgd_step(c, a);
    moe_profile_end(id);
    return st;
}

static moe_status c_all_reduce(moe_comm *comm, moe_group *g, void *buf, int64_t n, moe_dtype dt, moe_reduce_op op)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "all_reduce");
    moe_status st = g_comm.all_reduce(comm, g, buf, n, dt, op);
    moe_profile_end(id);
    return st;
}

static moe_status c_reduce_scatter(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt, moe_reduce_op op)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "reduce_scatter");
    moe_status st = g_comm.reduce_scatter(comm, g, recv, send, n, dt, op);
    moe_profile_end(id);
    return st;
}

static moe_status c_all_gather(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "all_gather");
    moe_status st = g_comm.all_gather(comm, g, recv, send, n, dt);
    moe_profile_end(id);
    return st;
}

static moe_status c_all_to_all(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "all_to_all");
    moe_status st = g_comm.all_to_all(comm, g, recv, send, n, dt);
    moe_profile_end(id);
    return st;
}

static moe_status c_all_to_allv(moe_comm *comm, moe_group *g, void *recv, const int64_t *recv_counts, const int64_t *recv_displs, const void *send, const int64_t *send_counts, const int64_t *send_displs, moe_dtype dt)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "all_to_allv");
    moe_status st = g_comm.all_to_allv(comm, g, recv, recv_counts, recv_displs, send, send_counts, send_displs, dt);
    moe_profile_end(id);
    return st;
}

static moe_status c_broadcast(moe_comm *comm, moe_group *g, void *buf, int64_t n, moe_dtype dt, int root)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "broadcast");
    moe_status st = g_comm.broadcast(comm, g, buf, n, dt, root);
    moe_profile_end(id);
    return st;
}

static moe_status c_barrier(moe_comm *comm, moe_group *g)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "barrier");
    moe_status st = g_comm.barrier(comm, g);
    moe_profile_end(id);
    return st;
}

static moe_status c_all_gather_start(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt, moe_comm_req **req)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "all_gather_start");
    moe_status st = g_comm.all_gather_start(comm, g, recv, send, n, dt, req);
    moe_profile_end(id);
    return st;
}

static moe_status c_reduce_scatter_start(moe_comm *comm, moe_group *g, void *recv, const void *send, int64_t n, moe_dtype dt, moe_reduce_op op, moe_comm_req **req)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "reduce_scatter_start");
    moe_status st = g_comm.reduce_scatter_start(comm, g, recv, send, n, dt, op, req);
    moe_profile_end(id);
    return st;
}

static moe_status c_wait(moe_comm *comm, moe_comm_req *req)
{
    int id = moe_profile_begin(MOE_PROF_COMM, "wait");
    moe_status st = g_comm.wait(comm, req);
    moe_profile_end(id);
    return st;
}

static void set_ops(moe_ops *w)
{
    w->fill = w_fill;
    w->cast = w_cast;
    w->axpby = w_axpby;
    w->add = w_add;
    w->init_uniform = w_init_uniform;
    w->init_normal = w_init_normal;
    w->sum_f32 = w_sum_f32;
    w->sumsq = w_sumsq;
    w->matmul = w_matmul;
    w->bias_backward = w_bias_backward;
    w->act_forward = w_act_forward;
    w->act_backward = w_act_backward;
    w->dropout_forward = w_dropout_forward;
    w->dropout_backward = w_dropout_backward;
    w->layernorm_forward = w_layernorm_forward;
    w->layernorm_backward = w_layernorm_backward;
    w->embedding_forward = w_embedding_forward;
    w->embedding_backward = w_embedding_backward;
    w->attention_forward = w_attention_forward;
    w->attention_backward = w_attention_backward;
    w->cross_entropy = w_cross_entropy;
    w->route_backward = w_route_backward;
    w->dispatch_forward = w_dispatch_forward;
    w->dispatch_backward = w_dispatch_backward;
    w->combine_forward = w_combine_forward;
    w->combine_backward = w_combine_backward;
    w->adam_step = w_adam_step;
    w->sgd_step = w_sgd_step;
    w->route_forward = w_route_forward;
}

static void set_comm(moe_comm_ops *w)
{
    w->all_reduce = c_all_reduce;
    w->reduce_scatter = c_reduce_scatter;
    w->all_gather = c_all_gather;
    w->all_to_all = c_all_to_all;
    w->all_to_allv = c_all_to_allv;
    w->broadcast = c_broadcast;
    w->barrier = c_barrier;
    /* the overlapping ops are optional (ABI 1.1): wrapped only when there */
    w->all_gather_start = g_comm.all_gather_start ? c_all_gather_start : NULL;
    w->reduce_scatter_start = g_comm.reduce_scatter_start ? c_reduce_scatter_start : NULL;
    w->wait = g_comm.wait ? c_wait : NULL;
}

moe_status moe_opwrap_install(moe_runtime *rt)
{
    const moe_host *h = moe_runtime_host(rt);
    if (!h->ops)
        return moe_error_set(MOE_ERR_INTERNAL, "moe_opwrap_install: the runtime has no ops table yet");
    g_ops = *h->ops;
    g_wops = g_ops;
    set_ops(&g_wops);
    const moe_comm_ops *comm = NULL;
    if (h->comm_ops) {
        g_comm = *h->comm_ops;
        g_wcomm = g_comm;
        set_comm(&g_wcomm);
        comm = &g_wcomm;
    }
    moe_runtime_wrap(rt, &g_wops, comm);
    return MOE_OK;
}
