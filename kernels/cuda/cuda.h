/* cuda.h: what the cuda backend's files share: the context (stream, cuBLASLt
 * handle, caching allocator), error helpers, scratch memory, element
 * load/store on the device, reductions and launch helpers. Each op family
 * declares its moe_cuda_* functions, the ones the ops table points at, in its
 * own header (elementwise.h, matmul.h, nn.h, attention.h, route.h, optim.h,
 * decode.h).
 *
 * Not here: anything a plugin or the core sees. The backend is reached only
 * through its moe_backend_ops table; every symbol of this .so but the
 * descriptor is hidden.
 *
 * Conventions a reader would trip over:
 *  - Device helpers are defined in this header (static __device__ inline):
 *    without relocatable device code every .cu must see their bodies, the
 *    same reason kernels/philox.h carries definitions.
 *  - Everything runs on the context's one stream, in order. Memory freed to
 *    the caching allocator is reused by later work on that same stream, so a
 *    free needs no synchronisation; work on other streams must synchronise
 *    with this one before it touches backend memory.
 *  - No float atomics anywhere: every reduction has a fixed order, so a run
 *    repeats bit for bit on the same GPU.
 */
#ifndef MOE_KERNELS_CUDA_H
#define MOE_KERNELS_CUDA_H

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/philox.h"
#include "moe/ops.h"
#include "moe/plugin.h"

/* ------------------------------------------------------------- context */

/* One device allocation held by the caching allocator (backend.cu). */
typedef struct moe_cuda_block {
    void *ptr;
    uint64_t size;                /* rounded size actually held */
    int cls;                      /* size class, or -1 for the large list */
    struct moe_cuda_block *next;  /* free list or live-table chain */
} moe_cuda_block;

#define MOE_CUDA_NUM_CLASSES 160   /* size classes below MOE_CUDA_LARGE_BYTES */
#define MOE_CUDA_LIVE_BUCKETS 4096 /* chains of the live-pointer table */

struct moe_ctx {
    const moe_host *host;
    int device;
    int num_sms;
    cudaStream_t stream;          /* where ops queue: the compute stream, or the side one between a
                                   * MOE_SIDE_FORK and its MOE_SIDE_BACK */
    cudaStream_t compute, side;   /* side_stream (ABI 1.6): created at the first fork */
    cudaEvent_t ev_fork, ev_join;
    cublasLtHandle_t lt;
    void *lt_workspace;
    size_t lt_workspace_bytes;
    float *scratch;               /* small fixed buffer for reduction partials */
    size_t scratch_bytes;
    /* caching allocator */
    moe_cuda_block *free_class[MOE_CUDA_NUM_CLASSES];
    moe_cuda_block *free_large;   /* blocks of MOE_CUDA_LARGE_BYTES and more */
    moe_cuda_block *live[MOE_CUDA_LIVE_BUCKETS];
    uint64_t allocated, peak_allocated, reserved, peak_reserved;
};

/* ------------------------------------------------------------- errors */

/* Formats one line, records it through the host (when there is one) and
 * returns st. */
moe_status moe_cuda_fail(moe_ctx *c, moe_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* A CUDA runtime error as one line naming the call, file and line. */
moe_status moe_cuda_error(moe_ctx *c, cudaError_t e, const char *stmt, const char *file, int line);

#define MOE_CUDA_TRY(c, expr)                                                     \
    do {                                                                          \
        cudaError_t moe_cuda_e_ = (expr);                                         \
        if (moe_cuda_e_ != cudaSuccess)                                           \
            return moe_cuda_error((c), moe_cuda_e_, #expr, __FILE__, __LINE__);   \
    } while (0)

/* After a kernel launch: a bad configuration shows up here. */
#define MOE_CUDA_CHECK_LAUNCH(c) MOE_CUDA_TRY((c), cudaGetLastError())

/* Scratch device memory from the caching allocator (backend.cu); free it with
 * moe_cuda_scratch_free as soon as the launches using it are queued. */
moe_status moe_cuda_scratch_alloc(moe_ctx *c, uint64_t bytes, const char *what, void **ptr);
void moe_cuda_scratch_free(moe_ctx *c, void *ptr);

const char *moe_cuda_dtype_name(moe_dtype dt);
int moe_cuda_is_float(moe_dtype dt);

/* ------------------------------------------------------------- launch */

#define MOE_CUDA_THREADS 256

/* Blocks for a grid-stride loop over n elements: enough to fill the device,
 * never more than the work needs. */
static inline unsigned moe_cuda_blocks(const moe_ctx *c, int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    int64_t cap = (int64_t)(c->num_sms > 0 ? c->num_sms : 132) * 16;
    if (b > cap)
        b = cap;
    return b < 1 ? 1u : (unsigned)b;
}

#if defined(__CUDACC__)

/* ------------------------------------------------- element load/store */

static __device__ __forceinline__ float moe_cuda_ld(const void *p, moe_dtype dt, int64_t i)
{
    switch (dt) {
    case MOE_F16: return __half2float(((const __half *)p)[i]);
    case MOE_BF16: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    case MOE_I32: return (float)((const int32_t *)p)[i];
    default: return ((const float *)p)[i];
    }
}

/* round to nearest even, saturating to inf, as the cpu's half.h */
static __device__ __forceinline__ void moe_cuda_st(void *p, moe_dtype dt, int64_t i, float v)
{
    switch (dt) {
    case MOE_F16: ((__half *)p)[i] = __float2half_rn(v); break;
    case MOE_BF16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); break;
    case MOE_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    default: ((float *)p)[i] = v; break;
    }
}

/* typed conversions for the templated kernels */
static __device__ __forceinline__ float moe_cuda_f32(float x) { return x; }
static __device__ __forceinline__ float moe_cuda_f32(__half x) { return __half2float(x); }
static __device__ __forceinline__ float moe_cuda_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> static __device__ __forceinline__ T moe_cuda_from_f32(float v);
template <> __device__ __forceinline__ float moe_cuda_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half moe_cuda_from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 moe_cuda_from_f32<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

/* ------------------------------------------------- warp reductions */

static __device__ __forceinline__ float moe_cuda_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ double moe_cuda_warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float moe_cuda_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over a block of blockDim.x threads (a multiple of 32, at most 1024) in
 * a fixed order; every thread gets the result. `sh` holds 32 doubles. */
static __device__ __forceinline__ double moe_cuda_block_sum_d(double v, double *sh)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = moe_cuda_warp_sum_d(v);
    __syncthreads(); /* sh may still be read from a previous call */
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
    return moe_cuda_warp_sum_d(v);
}

static __device__ __forceinline__ float moe_cuda_block_sum(float v, float *sh)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = moe_cuda_warp_sum(v);
    __syncthreads();
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return moe_cuda_warp_sum(v);
}

static __device__ __forceinline__ float moe_cuda_block_max(float v, float *sh)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = moe_cuda_warp_max(v);
    __syncthreads();
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return moe_cuda_warp_max(v);
}

/* ------------------------------------------------------- activations */

/* relu lets x through where x > 0 or x is NaN (torch.relu propagates NaN); the
 * same predicate selects dout in backward, so the derivative at 0 is 0 */
static __device__ __forceinline__ bool moe_cuda_relu_pass(float x) { return x > 0.0f || isnan(x); }

/* GELU tanh approximation (Megatron's fused bias-GELU, FAIRSEQ_SPEC.md §1.8),
 * GELU erf, or relu */
static __device__ __forceinline__ float moe_cuda_act(float x, moe_act_kind kind)
{
    if (kind == MOE_ACT_RELU)
        return moe_cuda_relu_pass(x) ? x : 0.0f;
    if (kind == MOE_ACT_GELU_TANH)
        return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

/* dout * d act / dx at x, the analytic derivative of the same formula; relu
 * selects (x > 0 ? dout : 0) rather than multiplying, as the cpu does */
static __device__ __forceinline__ float moe_cuda_act_backward_one(float dout, float x, moe_act_kind kind)
{
    if (kind == MOE_ACT_RELU)
        return moe_cuda_relu_pass(x) ? dout : 0.0f;
    if (kind == MOE_ACT_GELU_TANH) {
        const float k0 = 0.7978845608028654f, k1 = 0.044715f;
        float u = k0 * (x + k1 * x * x * x);
        float t = tanhf(u);
        return dout * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * x * x));
    }
    return dout * (0.5f * (1.0f + erff(x * 0.7071067811865476f)) + x * 0.3989422804014327f * expf(-0.5f * x * x));
}

#endif /* __CUDACC__ */

#endif
