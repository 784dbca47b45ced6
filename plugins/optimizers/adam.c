/* adam.c: the `adam` optimizer, fairseq's Adam as run by FusedAdamV1
 * (FAIRSEQ_SPEC.md §5.2): bias correction on, eps outside the square root,
 * L2 weight decay, optional fp16 moments with one dynamic scale per tensor
 * (--fp16-adam-stats).
 *
 * The plugin owns the state (two moments per element, plus the two scales of
 * each tensor in fp16 mode) in backend memory and calls ops->adam_step once
 * per tensor. A tensor is whatever the trainer hands over (a flat unit, a
 * shard, an expert); that is also the granularity of the fp16 scales.
 *
 * Not here: loss scaling, clipping, overflow handling (the trainer's), the
 * arithmetic itself (the backend's adam_step), AdamW's decoupled decay.
 * Unlike fairseq, --fp16-adam-stats is accepted with fp32 parameters too.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/plugin.h"
#include "state_io.h"

static const moe_option adam_options[] = {
    /* the ranges are torch's checks, made when the command line is read */
    {"adam-betas", MOE_OPT_FLOATS, "(0.9, 0.999)", "betas for Adam optimizer (two numbers in [0, 1))", 0,
     0.999999999999, "2"},
    {"adam-eps", MOE_OPT_FLOAT, "1e-8", "epsilon for Adam optimizer", 0, INFINITY, NULL},
    {"weight-decay", MOE_OPT_FLOAT, "0.0", "weight decay", 0, INFINITY, NULL},
    {"fp16-adam-stats", MOE_OPT_FLAG, NULL, "use FP16 stats (with automatic scaling)", 0, 0, NULL},
};

typedef struct adam_tensor {
    moe_opt_tensor t;
    void *exp_avg, *exp_avg_sq;
} adam_tensor;

typedef struct adam_state {
    const moe_host *h;
    float beta1, beta2, eps, weight_decay;
    int fp16_stats;
    int n;
    adam_tensor *ts;
    float *scales; /* (2n) device: scale of exp_avg, scale of exp_avg_sq, per tensor */
} adam_state;

static void adam_destroy(void *opt)
{
    adam_state *a = opt;
    if (!a)
        return;
    const moe_host *h = a->h;
    for (int i = 0; i < a->n; i++) {
        if (a->ts[i].exp_avg)
            h->backend->free(h->ctx, a->ts[i].exp_avg);
        if (a->ts[i].exp_avg_sq)
            h->backend->free(h->ctx, a->ts[i].exp_avg_sq);
    }
    if (a->scales)
        h->backend->free(h->ctx, a->scales);
    free(a->ts);
    free(a);
}

static moe_status adam_init(const moe_host *h, const moe_opt_tensor *tensors, int n, void **opt)
{
    *opt = NULL;
    double b[2];
    int nb = h->opt_floats(h, "adam-betas", b, 2);
    if (nb < 0)
        return MOE_ERR_INVALID_ARG; /* the message names the option and the text */
    if (nb != 2)
        return h->error(h, MOE_ERR_INVALID_ARG, "--adam-betas: expected two floats like '(0.9, 0.98)', got %d", nb);
    float betas[2] = {(float)b[0], (float)b[1]};
    for (int k = 0; k < 2; k++)
        if (!(betas[k] >= 0.0f && betas[k] < 1.0f))
            return h->error(h, MOE_ERR_INVALID_ARG, "--adam-betas: each beta must be in [0, 1), got %g",
                            (double)betas[k]);
    double eps = h->opt_float(h, "adam-eps");
    if (!(eps >= 0.0))
        return h->error(h, MOE_ERR_INVALID_ARG, "--adam-eps: expected a value >= 0, got %g", eps);
    if (n < 0)
        return h->error(h, MOE_ERR_INVALID_ARG, "adam: expected a tensor count >= 0, got %d", n);

    adam_state *a = calloc(1, sizeof *a);
    if (!a)
        return h->error(h, MOE_ERR_NOMEM, "adam: out of host memory for the optimizer state");
    a->h = h;
    a->beta1 = betas[0];
    a->beta2 = betas[1];
    a->eps = (float)eps;
    a->weight_decay = (float)h->opt_float(h, "weight-decay");
    a->fp16_stats = h->opt_flag(h, "fp16-adam-stats");
    a->ts = calloc(n > 0 ? (size_t)n : 1u, sizeof *a->ts);
    if (!a->ts) {
        free(a);
        return h->error(h, MOE_ERR_NOMEM, "adam: out of host memory for %d tensors", n);
    }
    a->n = n;
    moe_status st = MOE_OK;
    moe_dtype sdt = a->fp16_stats ? MOE_F16 : MOE_F32;
    char what[96];
    for (int i = 0; i < n && st == MOE_OK; i++) {
        adam_tensor *t = &a->ts[i];
        t->t = tensors[i];
        if (t->t.n <= 0)
            continue;
        uint64_t bytes = (uint64_t)t->t.n * moe_dtype_size(sdt);
        snprintf(what, sizeof what, "adam exp_avg of tensor %d (%lld elements)", i, (long long)t->t.n);
        st = h->backend->alloc(h->ctx, bytes, what, &t->exp_avg);
        if (st == MOE_OK) {
            snprintf(what, sizeof what, "adam exp_avg_sq of tensor %d (%lld elements)", i, (long long)t->t.n);
            st = h->backend->alloc(h->ctx, bytes, what, &t->exp_avg_sq);
        }
        if (st == MOE_OK)
            st = h->ops->fill(h->ctx, t->exp_avg, sdt, t->t.n, 0.0f);
        if (st == MOE_OK)
            st = h->ops->fill(h->ctx, t->exp_avg_sq, sdt, t->t.n, 0.0f);
    }
    if (st == MOE_OK && a->fp16_stats && n > 0) {
        /* fairseq starts both scales at 1.0 */
        st = h->backend->alloc(h->ctx, (uint64_t)n * 2u * sizeof(float), "adam fp16 moment scales",
                               (void **)&a->scales);
        if (st == MOE_OK)
            st = h->ops->fill(h->ctx, a->scales, MOE_F32, 2 * (int64_t)n, 1.0f);
    }
    if (st != MOE_OK) {
        adam_destroy(a);
        return st;
    }
    *opt = a;
    return MOE_OK;
}

/* tensors first .. first + count - 1 of init (ABI 1.6 step_range; step is all of them) */
static moe_status adam_step_range(void *opt, double lr, double grad_scale, int64_t step, int first, int count)
{
    adam_state *a = opt;
    const moe_host *h = a->h;
    if (first < 0 || count < 0 || first > a->n - count)
        return h->error(h, MOE_ERR_INVALID_ARG, "adam: expected tensors within 0 .. %d, found %d .. %d", a->n - 1,
                        first, first + count - 1);
    for (int i = first; i < first + count; i++) {
        const adam_tensor *t = &a->ts[i];
        if (t->t.n <= 0)
            continue;
        moe_adam_args args;
        memset(&args, 0, sizeof args);
        args.n = t->t.n;
        args.param = t->t.param;
        args.param_dtype = t->t.param_dtype;
        args.param_copy = t->t.param_copy;
        args.copy_dtype = t->t.copy_dtype;
        args.grad = t->t.grad;
        args.grad_dtype = t->t.grad_dtype;
        args.exp_avg = t->exp_avg;
        args.exp_avg_sq = t->exp_avg_sq;
        args.state_dtype = a->fp16_stats ? MOE_F16 : MOE_F32;
        args.scale_avg = a->fp16_stats ? a->scales + 2 * i : NULL;
        args.scale_avg_sq = a->fp16_stats ? a->scales + 2 * i + 1 : NULL;
        args.lr = (float)lr;
        args.beta1 = a->beta1;
        args.beta2 = a->beta2;
        args.eps = a->eps;
        args.weight_decay = a->weight_decay;
        args.grad_scale = (float)grad_scale;
        args.step = step;
        moe_status st = h->ops->adam_step(h->ctx, &args);
        if (st != MOE_OK)
            return st;
    }
    return MOE_OK;
}

static moe_status adam_step(void *opt, double lr, double grad_scale, int64_t step)
{
    return adam_step_range(opt, lr, grad_scale, step, 0, ((adam_state *)opt)->n);
}

static double adam_state_bytes_per_param(const moe_host *h)
{
    /* two moments, fp32 or fp16 (the per-tensor scales are negligible) */
    return h->opt_flag(h, "fp16-adam-stats") ? 4.0 : 8.0;
}

/* Checkpoint state (ABI 1.1): per tensor of init, exp_avg then exp_avg_sq
 * (fp32, or fp16 with --fp16-adam-stats), then with --fp16-adam-stats the 2n
 * fp32 moment scales (scale of exp_avg, of exp_avg_sq, tensor after tensor):
 * the layout adam_state_layout describes. `k`-th segment of that byte string, or 0 past the end. */
static uint64_t adam_segment(const void *opt, int k, void **ptr)
{
    const adam_state *a = opt;
    uint64_t sd = a->fp16_stats ? 2u : 4u;
    if (k < 2 * a->n) {
        const adam_tensor *t = &a->ts[k / 2];
        *ptr = k % 2 ? t->exp_avg_sq : t->exp_avg;
        return t->t.n > 0 ? (uint64_t)t->t.n * sd : 0u;
    }
    if (k == 2 * a->n && a->scales) {
        *ptr = a->scales;
        return (uint64_t)a->n * 2u * sizeof(float);
    }
    *ptr = NULL;
    return 0;
}

static int adam_segments(const adam_state *a) { return 2 * a->n + 1; }

static uint64_t adam_state_bytes(void *opt)
{
    return moe_state_total(opt, adam_segments(opt), adam_segment);
}

static moe_status adam_save_state(void *opt, uint64_t offset, void *host, uint64_t bytes)
{
    const adam_state *a = opt;
    return moe_state_io(a->h, "adam", opt, adam_segments(a), adam_segment, offset, host, bytes, 1);
}

static moe_status adam_load_state(void *opt, uint64_t offset, const void *host, uint64_t bytes)
{
    const adam_state *a = opt;
    return moe_state_io(a->h, "adam", opt, adam_segments(a), adam_segment, offset, (void *)(uintptr_t)host, bytes,
                        0);
}

/* That byte string described (ABI 1.2): two fields, torch's names; with
 * fp16 moments each is stored divided by its tensor's scale (the kernel's
 * dynamic scale), the two scales being the tensor's scalars. */
static void adam_state_layout(void *opt, moe_opt_state_layout *out)
{
    const adam_state *a = opt;
    memset(out, 0, sizeof *out);
    out->fields = 2;
    out->field_dtype[0] = out->field_dtype[1] = a->fp16_stats ? MOE_F16 : MOE_F32;
    out->field_name[0] = "exp_avg";
    out->field_name[1] = "exp_avg_sq";
    out->field_scale[0] = a->fp16_stats ? 0 : -1;
    out->field_scale[1] = a->fp16_stats ? 1 : -1;
    out->scalars = a->fp16_stats ? 2 : 0;
    out->scalar_name[0] = a->fp16_stats ? "exp_avg_scale" : NULL;
    out->scalar_name[1] = a->fp16_stats ? "exp_avg_sq_scale" : NULL;
}

static const moe_optimizer_ops adam_ops = {
    adam_init,        adam_destroy,     adam_step, adam_state_bytes_per_param, adam_state_bytes,
    adam_save_state,  adam_load_state,  adam_state_layout, adam_step_range,
};

MOE_PLUGIN_DEFINE(MOE_KIND_OPTIMIZER, moe_optimizer_ops, "adam", "1.0",
                  "Adam (fairseq FusedAdamV1: bias correction, eps outside sqrt, optional fp16 moments)",
                  adam_options, (int)(sizeof adam_options / sizeof adam_options[0]), NULL, NULL, &adam_ops)
