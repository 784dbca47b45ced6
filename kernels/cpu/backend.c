/* backend.c: the cpu backend plugin (libmoe-backend-cpu.so): context, host
 * memory with current/peak accounting, copies, the ops table, and the
 * elementwise and utility ops (fill, cast, axpby, add, init, sums).
 *
 * It is the readable reference, not a fast runtime: single-threaded loops,
 * fp32 arithmetic on fp32/fp16/bf16 storage (cpu.h load/store), and reductions
 * that accumulate in double in a fixed order so results are reproducible.
 *
 * Conventions a reader would trip over:
 *  - "Device" memory is host memory here, 64-byte aligned. Its contents after
 *    alloc are undefined, as on a GPU; code that reads before writing is a bug
 *    the cuda backend would expose too.
 *  - Every allocation carries a 64-byte header holding its size, so free can
 *    keep the allocated/peak counters exact.
 *  - axpby with b == 0 does not read y (BLAS convention), so y may be
 *    uninitialised or hold NaN.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

/* Records a one-line error through the host (when there is one) and returns st. */
#define CPU_ERROR(c, st, ...)                                                                 \
    (((c) != NULL && (c)->host != NULL && (c)->host->error != NULL)                           \
         ? (c)->host->error((c)->host, (st), __VA_ARGS__)                                     \
         : (st))

#define CPU_ALIGN 64u

static const char *dtype_name(moe_dtype dt)
{
    switch (dt) {
    case MOE_F32: return "f32";
    case MOE_F16: return "f16";
    case MOE_BF16: return "bf16";
    case MOE_I32: return "i32";
    default: return "unknown";
    }
}

static int is_float_dtype(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F16 || dt == MOE_BF16; }
static int is_dtype(moe_dtype dt) { return is_float_dtype(dt) || dt == MOE_I32; }

static moe_status check_float(moe_ctx *c, const char *op, moe_dtype dt, int64_t n)
{
    if (!is_float_dtype(dt))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected dtype f32, f16 or bf16, found %s (%d)", op,
                         dtype_name(dt), (int)dt);
    if (n < 0)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected n >= 0, found %lld", op, (long long)n);
    return MOE_OK;
}

/* ------------------------------------------------------------ lifecycle */

static moe_status cpu_create(const moe_host *h, int device_id, moe_ctx **ctx)
{
    (void)device_id; /* one host, one "device" */
    moe_ctx *c = calloc(1, sizeof *c);
    if (c == NULL) {
        *ctx = NULL;
        if (h != NULL && h->error != NULL)
            return h->error(h, MOE_ERR_NOMEM, "cpu backend: out of host memory creating the context (%zu bytes)",
                            sizeof *c);
        return MOE_ERR_NOMEM;
    }
    c->host = h;
    *ctx = c;
    return MOE_OK;
}

static void cpu_destroy(moe_ctx *ctx) { free(ctx); }

static int cpu_available(void) { return 1; }

/* ---------------------------------------------------------------- memory */

static moe_status cpu_alloc(moe_ctx *c, uint64_t bytes, const char *what, void **ptr)
{
    *ptr = NULL;
    /* header + payload, rounded up to the alignment as aligned_alloc requires */
    uint64_t total = bytes + CPU_ALIGN + (CPU_ALIGN - 1u);
    void *base = NULL;
    if (total > bytes && total <= (uint64_t)SIZE_MAX) {
        total &= ~(uint64_t)(CPU_ALIGN - 1u);
        base = aligned_alloc(CPU_ALIGN, (size_t)total);
    }
    if (base == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM,
                         "cpu backend: out of host memory allocating %s: requested %llu bytes with %llu bytes "
                         "already allocated; reduce --max-tokens/--batch-size or the model size",
                         what != NULL ? what : "(unnamed)", (unsigned long long)bytes,
                         (unsigned long long)c->allocated);
    memcpy(base, &bytes, sizeof bytes);
    c->allocated += bytes;
    if (c->allocated > c->peak)
        c->peak = c->allocated;
    *ptr = (unsigned char *)base + CPU_ALIGN;
    return MOE_OK;
}

static void cpu_free(moe_ctx *c, void *ptr)
{
    if (ptr == NULL)
        return;
    unsigned char *base = (unsigned char *)ptr - CPU_ALIGN;
    uint64_t bytes;
    memcpy(&bytes, base, sizeof bytes);
    c->allocated -= bytes;
    free(base);
}

static moe_status cpu_copy_to_host(moe_ctx *c, void *host_dst, const void *src, uint64_t bytes)
{
    (void)c;
    if (bytes > 0)
        memcpy(host_dst, src, (size_t)bytes);
    return MOE_OK;
}

static moe_status cpu_copy_from_host(moe_ctx *c, void *dst, const void *host_src, uint64_t bytes)
{
    (void)c;
    if (bytes > 0)
        memcpy(dst, host_src, (size_t)bytes);
    return MOE_OK;
}

static moe_status cpu_copy(moe_ctx *c, void *dst, const void *src, uint64_t bytes)
{
    (void)c;
    if (bytes > 0 && dst != src)
        memmove(dst, src, (size_t)bytes);
    return MOE_OK;
}

static moe_status cpu_synchronize(moe_ctx *c)
{
    (void)c; /* every op has finished when it returns */
    return MOE_OK;
}

static void cpu_memory_stats(moe_ctx *c, moe_mem_stats *out)
{
    out->allocated = c->allocated;
    out->peak_allocated = c->peak;
    out->reserved = c->allocated; /* no caching allocator: held == handed out */
    out->peak_reserved = c->peak;
    out->total = 0;               /* host memory: capacity unknown */
}

static void cpu_reset_peak(moe_ctx *c) { c->peak = c->allocated; }

/* ------------------------------------------------- elementwise and utility */

moe_status moe_cpu_fill(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float value)
{
    if (!is_dtype(dt) || n < 0)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu fill: expected a known dtype and n >= 0, found dtype %d, n %lld",
                         (int)dt, (long long)n);
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(x, dt, i, value);
    return MOE_OK;
}

moe_status moe_cpu_cast(moe_ctx *c, void *dst, moe_dtype dst_dt, const void *src, moe_dtype src_dt, int64_t n)
{
    if (!is_dtype(dst_dt) || !is_dtype(src_dt) || n < 0)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu cast: expected known dtypes and n >= 0, found %s -> %s, n %lld", dtype_name(src_dt),
                         dtype_name(dst_dt), (long long)n);
    if (dst_dt == src_dt) {
        if (n > 0 && dst != src)
            memmove(dst, src, (size_t)n * moe_dtype_size(dst_dt));
        return MOE_OK;
    }
    /* through fp32; to i32 truncates toward zero as C (and torch's .int()) do */
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(dst, dst_dt, i, moe_cpu_load(src, src_dt, i));
    return MOE_OK;
}

moe_status moe_cpu_axpby(moe_ctx *c, void *y, const void *x, moe_dtype dt, int64_t n, float a, float b)
{
    MOE_TRY(check_float(c, "axpby", dt, n));
    if (b == 0.0f) {
        for (int64_t i = 0; i < n; i++)
            moe_cpu_store(y, dt, i, a * moe_cpu_load(x, dt, i));
        return MOE_OK;
    }
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(y, dt, i, a * moe_cpu_load(x, dt, i) + b * moe_cpu_load(y, dt, i));
    return MOE_OK;
}

moe_status moe_cpu_add(moe_ctx *c, void *out, const void *x, const void *y, moe_dtype dt, int64_t n)
{
    MOE_TRY(check_float(c, "add", dt, n));
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(out, dt, i, moe_cpu_load(x, dt, i) + moe_cpu_load(y, dt, i));
    return MOE_OK;
}

moe_status moe_cpu_init_uniform(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float lo, float hi, uint64_t seed,
                                uint64_t stream)
{
    MOE_TRY(check_float(c, "init_uniform", dt, n));
    if (!(lo <= hi))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu init_uniform: expected lo <= hi, found lo %g, hi %g", (double)lo,
                         (double)hi);
    const float width = hi - lo;
    for (int64_t i = 0; i < n; i++)
        moe_cpu_store(x, dt, i, lo + width * moe_philox_uniform(seed, stream, (uint64_t)i));
    return MOE_OK;
}

moe_status moe_cpu_init_normal(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float mean, float std, uint64_t seed,
                               uint64_t stream)
{
    MOE_TRY(check_float(c, "init_normal", dt, n));
    if (!(std >= 0.0f))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu init_normal: expected std >= 0, found %g", (double)std);
    const double two_pi = 6.283185307179586476925286766559;
    for (int64_t i = 0; i < n; i++) {
        /* Box-Muller, cosine branch only: normal i from uniforms 2i, 2i+1; u1 in (0, 1] so log(u1) is finite */
        float u1, u2;
        moe_philox_uniform2(seed, stream, (uint64_t)i, &u1, &u2);
        double z = sqrt(-2.0 * log((double)u1)) * cos(two_pi * (double)u2);
        moe_cpu_store(x, dt, i, (float)((double)mean + (double)std * z));
    }
    return MOE_OK;
}

moe_status moe_cpu_sum_f32(moe_ctx *c, float *out, const float *x, int64_t n, int64_t stride, float scale)
{
    if (n < 0 || (n > 1 && stride < 1))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu sum_f32: expected n >= 0 and stride >= 1, found n %lld, stride %lld",
                         (long long)n, (long long)stride);
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (double)x[i * stride];
    *out = (float)((double)*out + (double)scale * s);
    return MOE_OK;
}

moe_status moe_cpu_sumsq(moe_ctx *c, float *out, const void *x, moe_dtype dt, int64_t n)
{
    MOE_TRY(check_float(c, "sumsq", dt, n));
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double v = (double)moe_cpu_load(x, dt, i);
        s += v * v; /* inf and nan propagate: this is the overflow check */
    }
    *out = (float)((double)*out + s);
    return MOE_OK;
}

/* ------------------------------------------------------------ the tables */

static const moe_ops cpu_ops_table = {
    .fill = moe_cpu_fill,
    .cast = moe_cpu_cast,
    .axpby = moe_cpu_axpby,
    .add = moe_cpu_add,
    .init_uniform = moe_cpu_init_uniform,
    .init_normal = moe_cpu_init_normal,
    .sum_f32 = moe_cpu_sum_f32,
    .sumsq = moe_cpu_sumsq,
    .matmul = moe_cpu_matmul,
    .bias_backward = moe_cpu_bias_backward,
    .act_forward = moe_cpu_act_forward,
    .act_backward = moe_cpu_act_backward,
    .dropout_forward = moe_cpu_dropout_forward,
    .dropout_backward = moe_cpu_dropout_backward,
    .layernorm_forward = moe_cpu_layernorm_forward,
    .layernorm_backward = moe_cpu_layernorm_backward,
    .embedding_forward = moe_cpu_embedding_forward,
    .embedding_backward = moe_cpu_embedding_backward,
    .attention_forward = moe_cpu_attention_forward,
    .attention_backward = moe_cpu_attention_backward,
    .cross_entropy = moe_cpu_cross_entropy,
    .route_workspace_bytes = moe_cpu_route_workspace_bytes,
    .route_forward = moe_cpu_route_forward,
    .route_backward = moe_cpu_route_backward,
    .dispatch_forward = moe_cpu_dispatch_forward,
    .dispatch_backward = moe_cpu_dispatch_backward,
    .combine_forward = moe_cpu_combine_forward,
    .combine_backward = moe_cpu_combine_backward,
    .dispatch_wide_forward = moe_cpu_dispatch_wide_forward,
    .dispatch_wide_backward = moe_cpu_dispatch_wide_backward,
    .combine_wide_forward = moe_cpu_combine_wide_forward,
    .combine_wide_backward = moe_cpu_combine_wide_backward,
    .expert_rows = moe_cpu_expert_rows,
    .grouped_matmul = moe_cpu_grouped_matmul,
    .adam_step = moe_cpu_adam_step,
    .sgd_step = moe_cpu_sgd_step,
    .embedding_at_forward = moe_cpu_embedding_at_forward,
    .rowlinear_forward = moe_cpu_rowlinear_forward,
    .attention_decode = moe_cpu_attention_decode,
    .gate_topk_forward = moe_cpu_gate_topk_forward,
    .expert_ffn_forward = moe_cpu_expert_ffn_forward,
    .logits_stats = moe_cpu_logits_stats,
    /* graph_*: NULL, every op runs when it is called */
};

static const moe_backend_ops cpu_backend = {
    .create = cpu_create,
    .destroy = cpu_destroy,
    .available = cpu_available,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .copy_to_host = cpu_copy_to_host,
    .copy_from_host = cpu_copy_from_host,
    .copy = cpu_copy,
    .synchronize = cpu_synchronize,
    .memory_stats = cpu_memory_stats,
    .reset_peak = cpu_reset_peak,
    .ops = &cpu_ops_table,
    .ops_size = sizeof(moe_ops),
};

MOE_PLUGIN_DEFINE(MOE_KIND_BACKEND, moe_backend_ops, "cpu", "1.0",
                  "reference backend: plain C loops, fp32 arithmetic on fp32/fp16/bf16 storage", NULL, 0, NULL, NULL,
                  &cpu_backend)
