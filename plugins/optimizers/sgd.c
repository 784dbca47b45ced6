/* sgd.c: the `sgd` optimizer, torch.optim.SGD as fairseq's SGD wraps it:
 * p -= lr * d with d = g/grad_scale + weight_decay*p, or the heavy-ball
 * buffer b = momentum*b + d in its place when --momentum is non-zero (no
 * dampening, no Nesterov).
 *
 * The plugin owns the momentum buffers (fp32, backend memory, only when
 * momentum != 0) and calls ops->sgd_step once per tensor. Not here: the
 * arithmetic (the backend's sgd_step), clipping, loss scaling.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"
#include "state_io.h"

static const moe_option sgd_options[] = {
    {"momentum", MOE_OPT_FLOAT, "0.0", "momentum factor", 0, INFINITY, NULL},
    {"weight-decay", MOE_OPT_FLOAT, "0.0", "weight decay", 0, INFINITY, NULL},
};

typedef struct sgd_tensor {
    moe_opt_tensor t;
    float *buf; /* (n) fp32 momentum buffer, or NULL */
} sgd_tensor;

typedef struct sgd_state {
    const moe_host *h;
    float momentum, weight_decay;
    int n;
    sgd_tensor *ts;
} sgd_state;

static void sgd_destroy(void *opt)
{
    sgd_state *s = opt;
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        if (s->ts[i].buf)
            s->h->backend->free(s->h->ctx, s->ts[i].buf);
    free(s->ts);
    free(s);
}

static moe_status sgd_init(const moe_host *h, const moe_opt_tensor *tensors, int n, void **opt)
{
    *opt = NULL;
    double momentum = h->opt_float(h, "momentum");
    if (!(momentum >= 0.0))
        return h->error(h, MOE_ERR_INVALID_ARG, "--momentum: expected a value >= 0, got %g", momentum);
    if (n < 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "sgd: expected a tensor count >= 0, got %d", n);
    sgd_state *s = calloc(1, sizeof *s);
    if (!s)
        return h->error(h, MOE_ERR_NOMEM, "sgd: out of host memory for the optimizer state");
    s->h = h;
    s->momentum = (float)momentum;
    s->weight_decay = (float)h->opt_float(h, "weight-decay");
    s->ts = calloc(n > 0 ? (size_t)n : 1u, sizeof *s->ts);
    if (!s->ts) {
        free(s);
        return h->error(h, MOE_ERR_NOMEM, "sgd: out of host memory for %d tensors", n);
    }
    s->n = n;
    moe_status st = MOE_OK;
    char what[96];
    for (int i = 0; i < n && st == MOE_OK; i++) {
        s->ts[i].t = tensors[i];
        if (s->momentum == 0.0f || tensors[i].n <= 0)
            continue;
        snprintf(what, sizeof what, "sgd momentum buffer of tensor %d (%lld elements)", i,
                 (long long)tensors[i].n);
        st = h->backend->alloc(h->ctx, (uint64_t)tensors[i].n * sizeof(float), what, (void **)&s->ts[i].buf);
        if (st == MOE_OK)
            st = h->ops->fill(h->ctx, s->ts[i].buf, MOE_F32, tensors[i].n, 0.0f);
    }
    if (st != MOE_OK) {
        sgd_destroy(s);
        return st;
    }
    *opt = s;
    return MOE_OK;
}

/* tensors first .. first + count - 1 of init (ABI 1.6 step_range; step is all of them) */
static moe_status sgd_step_range(void *opt, double lr, double grad_scale, int64_t step, int first, int count)
{
    (void)step;
    sgd_state *s = opt;
    const moe_host *h = s->h;
    if (first < 0 || count < 0 || first > s->n - count)
        return h->error(h, MOE_ERR_INVALID_ARG, "sgd: expected tensors within 0 .. %d, found %d .. %d", s->n - 1,
                        first, first + count - 1);
    for (int i = first; i < first + count; i++) {
        const sgd_tensor *t = &s->ts[i];
        if (t->t.n <= 0)
            continue;
        moe_sgd_args args;
        memset(&args, 0, sizeof args);
        args.n = t->t.n;
        args.param = t->t.param;
        args.param_dtype = t->t.param_dtype;
        args.param_copy = t->t.param_copy;
        args.copy_dtype = t->t.copy_dtype;
        args.grad = t->t.grad;
        args.grad_dtype = t->t.grad_dtype;
        args.momentum_buf = t->buf;
        args.lr = (float)lr;
        args.momentum = s->momentum;
        args.weight_decay = s->weight_decay;
        args.grad_scale = (float)grad_scale;
        moe_status st = h->ops->sgd_step(h->ctx, &args);
        if (st != MOE_OK)
            return st;
    }
    return MOE_OK;
}

static moe_status sgd_step(void *opt, double lr, double grad_scale, int64_t step)
{
    return sgd_step_range(opt, lr, grad_scale, step, 0, ((sgd_state *)opt)->n);
}

static double sgd_state_bytes_per_param(const moe_host *h)
{
    return h->opt_float(h, "momentum") != 0.0 ? 4.0 : 0.0;
}

/* Checkpoint state (ABI 1.1): the fp32 momentum buffers of the tensors of
 * init, in order (nothing without momentum). */
static uint64_t sgd_segment(const void *opt, int k, void **ptr)
{
    const sgd_state *s = opt;
    *ptr = s->ts[k].buf;
    return s->ts[k].buf ? (uint64_t)s->ts[k].t.n * sizeof(float) : 0u;
}

static uint64_t sgd_state_bytes(void *opt)
{
    const sgd_state *s = opt;
    return moe_state_total(opt, s->n, sgd_segment);
}

static moe_status sgd_save_state(void *opt, uint64_t offset, void *host, uint64_t bytes)
{
    const sgd_state *s = opt;
    return moe_state_io(s->h, "sgd", opt, s->n, sgd_segment, offset, host, bytes, 1);
}

static moe_status sgd_load_state(void *opt, uint64_t offset, const void *host, uint64_t bytes)
{
    const sgd_state *s = opt;
    return moe_state_io(s->h, "sgd", opt, s->n, sgd_segment, offset, (void *)(uintptr_t)host, bytes, 0);
}

/* ABI 1.2: one fp32 field with momentum, none without */
static void sgd_state_layout(void *opt, moe_opt_state_layout *out)
{
    const sgd_state *s = opt;
    memset(out, 0, sizeof *out);
    out->fields = s->momentum != 0.0f ? 1 : 0;
    out->field_dtype[0] = MOE_F32;
    out->field_scale[0] = -1;
    out->field_name[0] = "momentum_buffer";
}

static const moe_optimizer_ops sgd_ops = {
    sgd_init,        sgd_destroy,    sgd_step, sgd_state_bytes_per_param, sgd_state_bytes,
    sgd_save_state,  sgd_load_state, sgd_state_layout, sgd_step_range,
};

MOE_PLUGIN_DEFINE(MOE_KIND_OPTIMIZER, moe_optimizer_ops, "sgd", "1.0",
                  "stochastic gradient descent with momentum and weight decay (torch.optim.SGD)", sgd_options,
                  (int)(sizeof sgd_options / sizeof sgd_options[0]), NULL, NULL, &sgd_ops)
