/* backend.cu: the cuda backend plugin (libmoe-backend-cuda.so): context
 * (device, stream, cuBLASLt handle and workspace), the caching device
 * allocator, copies on the stream, and the ops table.
 *
 * Not here: the ops themselves (one .cu per family, see cuda.h), and any
 * notion of several streams: everything is ordered on the context's stream
 * (graph recording, for decoding, records that stream).
 *
 * The allocator keeps every block it ever got from cudaMalloc. Requests up to
 * 7/8 of MOE_CUDA_LARGE_BYTES are rounded up to a size class (four classes
 * per power of two, at least 512 bytes) with one free list per class; larger
 * ones are rounded to 2 MiB and reuse a cached block at most 1/8 bigger. A block
 * freed goes back to its list at once: later work on the same stream is
 * ordered after the work that used it. "allocated" counts the rounded sizes
 * of live blocks (what torch.cuda.memory_allocated counts), "reserved" every
 * block held. When cudaMalloc fails the cache is released and the call
 * retried once; a second failure is an error naming the allocation, the
 * request and the device's free bytes.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/decode.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/grouped.h"
#include "kernels/cuda/matmul.h"
#include "kernels/cuda/nn.h"
#include "kernels/cuda/optim.h"
#include "kernels/cuda/route.h"

#define MOE_CUDA_MIN_BYTES 512ull
#define MOE_CUDA_LARGE_BYTES (64ull << 20)
#define MOE_CUDA_LARGE_ROUND (2ull << 20)
#define MOE_CUDA_WORKSPACE_BYTES (32ull << 20)
#define MOE_CUDA_SCRATCH_BYTES (64ull << 10)

/* ------------------------------------------------------------- errors */

moe_status moe_cuda_fail(moe_ctx *c, moe_status st, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c != NULL && c->host != NULL && c->host->error != NULL)
        return c->host->error(c->host, st, "%s", msg);
    return st;
}

moe_status moe_cuda_error(moe_ctx *c, cudaError_t e, const char *stmt, const char *file, int line)
{
    return moe_cuda_fail(c, MOE_ERR_BACKEND, "cuda backend: %s failed with %s (%s) at %s:%d; check the device and driver",
                         stmt, cudaGetErrorName(e), cudaGetErrorString(e), file, line);
}

const char *moe_cuda_dtype_name(moe_dtype dt)
{
    switch (dt) {
    case MOE_F32: return "f32";
    case MOE_F16: return "f16";
    case MOE_BF16: return "bf16";
    case MOE_I32: return "i32";
    default: return "unknown";
    }
}

int moe_cuda_is_float(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F16 || dt == MOE_BF16; }

static void cuda_log(moe_ctx *c, moe_log_level level, const char *msg)
{
    if (c != NULL && c->host != NULL && c->host->log != NULL)
        c->host->log(c->host, level, "moe.cuda", "%s", msg);
}

/* ------------------------------------------------------------ allocator */

/* Size class of a request below MOE_CUDA_LARGE_BYTES: its index and rounded size. */
static int size_class(uint64_t bytes, uint64_t *rounded)
{
    if (bytes <= MOE_CUDA_MIN_BYTES) {
        *rounded = MOE_CUDA_MIN_BYTES;
        return 0;
    }
    int p = 63 - __builtin_clzll(bytes); /* 2^p <= bytes < 2^(p+1), p >= 9 */
    uint64_t step = 1ull << (p - 2);
    uint64_t q = (bytes + step - 1) / step; /* 4..8 */
    *rounded = q * step;
    return (p - 9) * 4 + (int)(q - 4) + 1;
}

static size_t live_bucket(const void *ptr) { return (size_t)(((uintptr_t)ptr >> 9) % MOE_CUDA_LIVE_BUCKETS); }

static void live_insert(moe_ctx *c, moe_cuda_block *b)
{
    size_t h = live_bucket(b->ptr);
    b->next = c->live[h];
    c->live[h] = b;
}

static moe_cuda_block *live_remove(moe_ctx *c, const void *ptr)
{
    moe_cuda_block **pp = &c->live[live_bucket(ptr)];
    while (*pp != NULL && (*pp)->ptr != ptr)
        pp = &(*pp)->next;
    moe_cuda_block *b = *pp;
    if (b != NULL)
        *pp = b->next;
    return b;
}

/* Give every cached (free) block back to the device. */
static void release_cache(moe_ctx *c)
{
    for (int i = 0; i < MOE_CUDA_NUM_CLASSES; i++) {
        while (c->free_class[i] != NULL) {
            moe_cuda_block *b = c->free_class[i];
            c->free_class[i] = b->next;
            cudaFree(b->ptr);
            c->reserved -= b->size;
            free(b);
        }
    }
    while (c->free_large != NULL) {
        moe_cuda_block *b = c->free_large;
        c->free_large = b->next;
        cudaFree(b->ptr);
        c->reserved -= b->size;
        free(b);
    }
}

static moe_cuda_block *take_cached(moe_ctx *c, int cls, uint64_t rounded)
{
    if (cls >= 0) {
        moe_cuda_block *b = c->free_class[cls];
        if (b != NULL)
            c->free_class[cls] = b->next;
        return b;
    }
    /* large: best fit among blocks no more than 1/8 bigger than asked */
    moe_cuda_block **best = NULL;
    for (moe_cuda_block **pp = &c->free_large; *pp != NULL; pp = &(*pp)->next) {
        uint64_t s = (*pp)->size;
        if (s >= rounded && s <= rounded + rounded / 8 && (best == NULL || s < (*best)->size))
            best = pp;
    }
    if (best == NULL)
        return NULL;
    moe_cuda_block *b = *best;
    *best = b->next;
    return b;
}

static moe_status cuda_alloc(moe_ctx *c, uint64_t bytes, const char *what, void **ptr)
{
    *ptr = NULL;
    const char *name = what != NULL ? what : "(unnamed)";
    uint64_t rounded;
    int cls = -1;
    if (bytes <= MOE_CUDA_LARGE_BYTES / 8 * 7) { /* its class size stays below LARGE */
        cls = size_class(bytes, &rounded);
    } else {
        if (bytes > (1ull << 48))
            return moe_cuda_fail(c, MOE_ERR_NOMEM,
                                 "cuda backend: allocating %s: requested %llu bytes, more than any device holds; "
                                 "check the sizes that led to it",
                                 name, (unsigned long long)bytes);
        rounded = (bytes + MOE_CUDA_LARGE_ROUND - 1) / MOE_CUDA_LARGE_ROUND * MOE_CUDA_LARGE_ROUND;
    }
    moe_cuda_block *b = take_cached(c, cls, rounded);
    if (b == NULL) {
        b = (moe_cuda_block *)calloc(1, sizeof *b);
        if (b == NULL)
            return moe_cuda_fail(c, MOE_ERR_NOMEM, "cuda backend: out of host memory tracking %s", name);
        void *p = NULL;
        cudaError_t e = cudaMalloc(&p, (size_t)rounded);
        if (e == cudaErrorMemoryAllocation) {
            (void)cudaGetLastError(); /* not sticky: clear it and retry without the cache */
            release_cache(c);
            e = cudaMalloc(&p, (size_t)rounded);
        }
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            free(b);
            size_t free_b = 0, total_b = 0;
            cudaMemGetInfo(&free_b, &total_b);
            if (e == cudaErrorMemoryAllocation)
                return moe_cuda_fail(c, MOE_ERR_NOMEM,
                                     "cuda backend: out of device memory allocating %s: requested %llu bytes "
                                     "(%llu rounded), %llu bytes free of %llu on device %d, %llu allocated and "
                                     "%llu reserved by this process; reduce --max-tokens/--batch-size or the model",
                                     name, (unsigned long long)bytes, (unsigned long long)rounded,
                                     (unsigned long long)free_b, (unsigned long long)total_b, c->device,
                                     (unsigned long long)c->allocated, (unsigned long long)c->reserved);
            return moe_cuda_error(c, e, "cudaMalloc", __FILE__, __LINE__);
        }
        b->ptr = p;
        b->size = rounded;
        b->cls = cls;
        c->reserved += rounded;
        if (c->reserved > c->peak_reserved)
            c->peak_reserved = c->reserved;
    }
    live_insert(c, b);
    c->allocated += b->size;
    if (c->allocated > c->peak_allocated)
        c->peak_allocated = c->allocated;
    *ptr = b->ptr;
    return MOE_OK;
}

static void cuda_free(moe_ctx *c, void *ptr)
{
    if (ptr == NULL)
        return;
    moe_cuda_block *b = live_remove(c, ptr);
    if (b == NULL) {
        char msg[160];
        snprintf(msg, sizeof msg, "free of %p, which this backend did not allocate or already freed; ignored", ptr);
        cuda_log(c, MOE_LOG_ERROR, msg);
        return;
    }
    c->allocated -= b->size;
    if (b->cls >= 0) {
        b->next = c->free_class[b->cls];
        c->free_class[b->cls] = b;
    } else {
        b->next = c->free_large;
        c->free_large = b;
    }
}

moe_status moe_cuda_scratch_alloc(moe_ctx *c, uint64_t bytes, const char *what, void **ptr)
{
    return cuda_alloc(c, bytes, what, ptr);
}

void moe_cuda_scratch_free(moe_ctx *c, void *ptr) { cuda_free(c, ptr); }

static void cuda_memory_stats(moe_ctx *c, moe_mem_stats *out)
{
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        (void)cudaGetLastError();
        total_b = 0;
    }
    out->allocated = c->allocated;
    out->peak_allocated = c->peak_allocated;
    out->reserved = c->reserved;
    out->peak_reserved = c->peak_reserved;
    out->total = total_b;
}

static void cuda_reset_peak(moe_ctx *c)
{
    c->peak_allocated = c->allocated;
    c->peak_reserved = c->reserved;
}

/* ------------------------------------------------------------ lifecycle */

static int cuda_available(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n > 0;
}

static void cuda_destroy(moe_ctx *c)
{
    if (c == NULL)
        return;
    if (c->side != NULL)
        c->stream = c->compute;
    if (c->stream != NULL)
        cudaStreamSynchronize(c->stream);
    for (int h = 0; h < MOE_CUDA_LIVE_BUCKETS; h++) {
        while (c->live[h] != NULL) {
            moe_cuda_block *b = c->live[h];
            c->live[h] = b->next;
            cudaFree(b->ptr);
            free(b);
        }
    }
    release_cache(c);
    if (c->scratch != NULL)
        cudaFree(c->scratch);
    if (c->lt_workspace != NULL)
        cudaFree(c->lt_workspace);
    if (c->lt != NULL)
        cublasLtDestroy(c->lt);
    if (c->side != NULL) {
        cudaStreamSynchronize(c->side);
        cudaStreamDestroy(c->side);
        cudaEventDestroy(c->ev_fork);
        cudaEventDestroy(c->ev_join);
    }
    if (c->compute != NULL)
        cudaStreamDestroy(c->compute);
    free(c);
}

static moe_status cuda_create(const moe_host *h, int device_id, moe_ctx **out)
{
    *out = NULL;
    moe_ctx *c = (moe_ctx *)calloc(1, sizeof *c);
    if (c == NULL) {
        if (h != NULL && h->error != NULL)
            return h->error(h, MOE_ERR_NOMEM, "cuda backend: out of host memory creating the context");
        return MOE_ERR_NOMEM;
    }
    c->host = h;
    moe_status st = MOE_OK;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        st = moe_cuda_fail(c, MOE_ERR_BACKEND,
                           "cuda backend: expected a visible CUDA device, found none (%s); run on a GPU machine or "
                           "use --cpu",
                           e != cudaSuccess ? cudaGetErrorString(e) : "device count 0");
        goto fail;
    }
    if (device_id >= n) {
        st = moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                           "cuda backend: expected a device id below %d (devices visible), found %d; check "
                           "CUDA_VISIBLE_DEVICES and --device-id",
                           n, device_id);
        goto fail;
    }
    if (device_id < 0) {
        if ((e = cudaGetDevice(&c->device)) != cudaSuccess)
            goto cuda_fail;
    } else {
        c->device = device_id;
    }
    if ((e = cudaSetDevice(c->device)) != cudaSuccess)
        goto cuda_fail;
    if ((e = cudaDeviceGetAttribute(&c->num_sms, cudaDevAttrMultiProcessorCount, c->device)) != cudaSuccess)
        goto cuda_fail;
    if ((e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess)
        goto cuda_fail;
    c->compute = c->stream;
    c->lt_workspace_bytes = MOE_CUDA_WORKSPACE_BYTES;
    if ((e = cudaMalloc(&c->lt_workspace, c->lt_workspace_bytes)) != cudaSuccess)
        goto cuda_fail;
    c->scratch_bytes = MOE_CUDA_SCRATCH_BYTES;
    if ((e = cudaMalloc((void **)&c->scratch, c->scratch_bytes)) != cudaSuccess)
        goto cuda_fail;
    {
        cublasStatus_t bs = cublasLtCreate(&c->lt);
        if (bs != CUBLAS_STATUS_SUCCESS) {
            c->lt = NULL;
            st = moe_cuda_fail(c, MOE_ERR_BACKEND, "cuda backend: cublasLtCreate failed with status %d (%s)",
                               (int)bs, cublasLtGetStatusString(bs));
            goto fail;
        }
    }
    *out = c;
    return MOE_OK;
cuda_fail:
    (void)cudaGetLastError();
    st = moe_cuda_error(c, e, "creating the context", __FILE__, __LINE__);
fail:
    cuda_destroy(c);
    return st;
}

/* ------------------------------------------------------------- copies */

static moe_status cuda_copy_to_host(moe_ctx *c, void *host_dst, const void *src, uint64_t bytes)
{
    if (bytes == 0)
        return MOE_OK;
    MOE_CUDA_TRY(c, cudaMemcpyAsync(host_dst, src, (size_t)bytes, cudaMemcpyDeviceToHost, c->stream));
    MOE_CUDA_TRY(c, cudaStreamSynchronize(c->stream));
    return MOE_OK;
}

static moe_status cuda_copy_from_host(moe_ctx *c, void *dst, const void *host_src, uint64_t bytes)
{
    if (bytes == 0)
        return MOE_OK;
    /* from pageable memory the call returns once the source is staged, so
     * the caller may reuse host_src at once */
    MOE_CUDA_TRY(c, cudaMemcpyAsync(dst, host_src, (size_t)bytes, cudaMemcpyHostToDevice, c->stream));
    return MOE_OK;
}

static moe_status cuda_copy(moe_ctx *c, void *dst, const void *src, uint64_t bytes)
{
    if (bytes == 0 || dst == src)
        return MOE_OK;
    MOE_CUDA_TRY(c, cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDeviceToDevice, c->stream));
    return MOE_OK;
}

/* the stream every op is queued on, so a communicator can queue after them */
static void *cuda_native_stream(moe_ctx *c) { return (void *)c->stream; }

/* ABI 1.6: fork sends the ops that follow to a second stream that first
 * waits for the compute queued so far; back returns them to the compute
 * stream; join makes the compute stream wait for the side's work */
static moe_status cuda_side_stream(moe_ctx *c, int phase)
{
    if (phase != MOE_SIDE_FORK && phase != MOE_SIDE_BACK && phase != MOE_SIDE_JOIN)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda side_stream: expected a phase of 0, 1 or 2, found %d",
                             phase);
    if (c->side == NULL) {
        if (phase != MOE_SIDE_FORK)
            return MOE_OK; /* nothing was ever forked */
        MOE_CUDA_TRY(c, cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking));
        MOE_CUDA_TRY(c, cudaEventCreateWithFlags(&c->ev_fork, cudaEventDisableTiming));
        MOE_CUDA_TRY(c, cudaEventCreateWithFlags(&c->ev_join, cudaEventDisableTiming));
    }
    if (phase == MOE_SIDE_FORK) {
        if (c->stream == c->side)
            return moe_cuda_fail(c, MOE_ERR_INTERNAL, "cuda side_stream: fork while already on the side stream");
        MOE_CUDA_TRY(c, cudaEventRecord(c->ev_fork, c->compute));
        MOE_CUDA_TRY(c, cudaStreamWaitEvent(c->side, c->ev_fork, 0));
        c->stream = c->side;
    } else if (phase == MOE_SIDE_BACK) {
        c->stream = c->compute;
    } else {
        c->stream = c->compute;
        MOE_CUDA_TRY(c, cudaEventRecord(c->ev_join, c->side));
        MOE_CUDA_TRY(c, cudaStreamWaitEvent(c->compute, c->ev_join, 0));
    }
    return MOE_OK;
}

static moe_status cuda_synchronize(moe_ctx *c)
{
    MOE_CUDA_TRY(c, cudaStreamSynchronize(c->stream));
    return MOE_OK;
}

/* ------------------------------------------------------------ timers */

/* --profile's markers: CUDA events recorded on the compute stream. */
static moe_status cuda_timer_mark(moe_ctx *c, void **mark)
{
    *mark = NULL;
    cudaEvent_t e = NULL;
    MOE_CUDA_TRY(c, cudaEventCreate(&e));
    cudaError_t err = cudaEventRecord(e, c->stream);
    if (err != cudaSuccess) {
        cudaEventDestroy(e);
        return moe_cuda_error(c, err, "cudaEventRecord(e, c->stream)", __FILE__, __LINE__);
    }
    *mark = (void *)e;
    return MOE_OK;
}

static moe_status cuda_timer_elapsed_ms(moe_ctx *c, const void *from, const void *to, double *ms)
{
    float f = 0.0f;
    MOE_CUDA_TRY(c, cudaEventSynchronize((cudaEvent_t)to));
    MOE_CUDA_TRY(c, cudaEventElapsedTime(&f, (cudaEvent_t)from, (cudaEvent_t)to));
    *ms = (double)f;
    return MOE_OK;
}

static void cuda_timer_free(moe_ctx *c, void *mark)
{
    (void)c;
    if (mark)
        cudaEventDestroy((cudaEvent_t)mark);
}

/* ------------------------------------------------------------ graphs */

/* Decoding replays a step's launches as one CUDA graph: capture on the
 * context's stream (thread-local mode: other threads may still allocate),
 * instantiate, launch on the same stream. */
static moe_status cuda_graph_begin(moe_ctx *c)
{
    MOE_CUDA_TRY(c, cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    return MOE_OK;
}

static moe_status cuda_graph_end(moe_ctx *c, void **graph)
{
    *graph = NULL;
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* an invalidated capture is not sticky */
        if (g != NULL)
            cudaGraphDestroy(g);
        return moe_cuda_error(c, e, "cudaStreamEndCapture", __FILE__, __LINE__);
    }
    cudaGraphExec_t x = NULL;
    e = cudaGraphInstantiate(&x, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return moe_cuda_error(c, e, "cudaGraphInstantiate", __FILE__, __LINE__);
    }
    *graph = (void *)x;
    return MOE_OK;
}

static moe_status cuda_graph_launch(moe_ctx *c, void *graph)
{
    MOE_CUDA_TRY(c, cudaGraphLaunch((cudaGraphExec_t)graph, c->stream));
    return MOE_OK;
}

static void cuda_graph_destroy(moe_ctx *c, void *graph)
{
    (void)c;
    if (graph != NULL)
        cudaGraphExecDestroy((cudaGraphExec_t)graph);
}

/* ------------------------------------------------------------ the tables */

static moe_ops make_ops(void)
{
    moe_ops o;
    memset(&o, 0, sizeof o);
    o.fill = moe_cuda_fill;
    o.cast = moe_cuda_cast;
    o.axpby = moe_cuda_axpby;
    o.add = moe_cuda_add;
    o.init_uniform = moe_cuda_init_uniform;
    o.init_normal = moe_cuda_init_normal;
    o.sum_f32 = moe_cuda_sum_f32;
    o.sumsq = moe_cuda_sumsq;
    o.matmul = moe_cuda_matmul;
    o.bias_backward = moe_cuda_bias_backward;
    o.act_forward = moe_cuda_act_forward;
    o.act_backward = moe_cuda_act_backward;
    o.dropout_forward = moe_cuda_dropout_forward;
    o.dropout_backward = moe_cuda_dropout_backward;
    o.layernorm_forward = moe_cuda_layernorm_forward;
    o.layernorm_backward = moe_cuda_layernorm_backward;
    o.embedding_forward = moe_cuda_embedding_forward;
    o.embedding_backward = moe_cuda_embedding_backward;
    o.attention_forward = moe_cuda_attention_forward;
    o.attention_backward = moe_cuda_attention_backward;
    o.cross_entropy = moe_cuda_cross_entropy;
    o.route_workspace_bytes = moe_cuda_route_workspace_bytes;
    o.route_forward = moe_cuda_route_forward;
    o.route_backward = moe_cuda_route_backward;
    o.dispatch_forward = moe_cuda_dispatch_forward;
    o.dispatch_backward = moe_cuda_dispatch_backward;
    o.combine_forward = moe_cuda_combine_forward;
    o.combine_backward = moe_cuda_combine_backward;
    o.dispatch_wide_forward = moe_cuda_dispatch_wide_forward;
    o.dispatch_wide_backward = moe_cuda_dispatch_wide_backward;
    o.combine_wide_forward = moe_cuda_combine_wide_forward;
    o.combine_wide_backward = moe_cuda_combine_wide_backward;
    o.expert_rows = moe_cuda_expert_rows;
    o.grouped_matmul = moe_cuda_grouped_matmul;
    o.adam_step = moe_cuda_adam_step;
    o.sgd_step = moe_cuda_sgd_step;
    o.embedding_at_forward = moe_cuda_embedding_at_forward;
    o.rowlinear_forward = moe_cuda_rowlinear_forward;
    o.attention_decode = moe_cuda_attention_decode;
    o.gate_topk_forward = moe_cuda_gate_topk_forward;
    o.expert_ffn_forward = moe_cuda_expert_ffn_forward;
    o.logits_stats = moe_cuda_logits_stats;
    o.graph_begin = cuda_graph_begin;
    o.graph_end = cuda_graph_end;
    o.graph_launch = cuda_graph_launch;
    o.graph_destroy = cuda_graph_destroy;
    return o;
}

static const moe_ops cuda_ops_table = make_ops();

static const moe_backend_ops cuda_backend = {
    cuda_create,      cuda_destroy,      cuda_available,    cuda_alloc,        cuda_free,
    cuda_copy_to_host, cuda_copy_from_host, cuda_copy,       cuda_synchronize,  cuda_memory_stats,
    cuda_reset_peak,  &cuda_ops_table,   cuda_native_stream, cuda_timer_mark,   cuda_timer_elapsed_ms,
    cuda_timer_free,  (uint32_t)sizeof(moe_ops), cuda_side_stream,
};

extern "C" {
MOE_PLUGIN_DEFINE(MOE_KIND_BACKEND, moe_backend_ops, "cuda", "1.0",
                  "NVIDIA GPUs: cuBLASLt GEMMs, fused kernels, flash-style attention, deterministic reductions",
                  NULL, 0, NULL, NULL, &cuda_backend)
}
