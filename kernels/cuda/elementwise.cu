/* elementwise.cu: fill, cast, axpby, add, the counter-based initialisers and
 * the two deterministic sums of the cuda backend.
 *
 * Not here: anything fused with a neighbouring op; these are the plain
 * building blocks the core and plugins call between layers.
 *
 * Conventions:
 *  - Products and sums that the cpu backend writes as a*x + b go through
 *    __fmul_rn/__fadd_rn so nvcc cannot contract them into an FMA: the
 *    initialisers and axpby then round exactly as the cpu does.
 *  - sum_f32 and sumsq accumulate in double like the cpu, in two passes with
 *    a grid that depends on n (and sumsq's alignment) only: block partials in
 *    a fixed tree order, then one block adds the partials in a fixed order.
 *    No atomics.
 */
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/elementwise.h"

#define SUM_THREADS 256
#define SUM_MAX_BLOCKS 1024

static moe_status check_float(moe_ctx *c, const char *op, moe_dtype dt, int64_t n)
{
    if (!moe_cuda_is_float(dt))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected dtype f32, f16 or bf16, found %s (%d)", op,
                             moe_cuda_dtype_name(dt), (int)dt);
    if (n < 0)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected n >= 0, found %lld", op, (long long)n);
    return MOE_OK;
}

static int is_dtype(moe_dtype dt) { return moe_cuda_is_float(dt) || dt == MOE_I32; }

/* ------------------------------------------------------------ kernels */

static __global__ void fill_kernel(void *x, moe_dtype dt, int64_t n, float value)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        moe_cuda_st(x, dt, i, value);
}

static __global__ void fill_i32_kernel(int32_t *x, int64_t n, int32_t value)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] = value;
}

static __global__ void cast_kernel(void *dst, moe_dtype dst_dt, const void *src, moe_dtype src_dt, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        moe_cuda_st(dst, dst_dt, i, moe_cuda_ld(src, src_dt, i));
}

static __global__ void axpby_kernel(void *y, const void *x, moe_dtype dt, int64_t n, float a, float b)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = __fmul_rn(a, moe_cuda_ld(x, dt, i));
        if (b != 0.0f) /* b == 0 never reads y: it may hold garbage */
            v = __fadd_rn(v, __fmul_rn(b, moe_cuda_ld(y, dt, i)));
        moe_cuda_st(y, dt, i, v);
    }
}

static __global__ void add_kernel(void *out, const void *x, const void *y, moe_dtype dt, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        moe_cuda_st(out, dt, i, moe_cuda_ld(x, dt, i) + moe_cuda_ld(y, dt, i));
}

/* the same with 16 bytes of each array a thread (arrays 16-byte aligned); the
 * n % (16 / sizeof(T)) elements past the last vector go to block 0 */
template <typename T> static __global__ void add_vec_kernel(T *out, const T *x, const T *y, int64_t n)
{
    constexpr int PER = 16 / (int)sizeof(T);
    const int64_t nv = n / PER;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nv; i += (int64_t)gridDim.x * blockDim.x) {
        const uint4 a = ((const uint4 *)x)[i], b = ((const uint4 *)y)[i];
        uint4 r;
        const T *ea = (const T *)&a, *eb = (const T *)&b;
        T *er = (T *)&r;
#pragma unroll
        for (int k = 0; k < PER; k++)
            er[k] = moe_cuda_from_f32<T>(moe_cuda_f32(ea[k]) + moe_cuda_f32(eb[k]));
        ((uint4 *)out)[i] = r;
    }
    if (blockIdx.x == 0)
        for (int64_t i = nv * PER + threadIdx.x; i < n; i += blockDim.x)
            out[i] = moe_cuda_from_f32<T>(moe_cuda_f32(x[i]) + moe_cuda_f32(y[i]));
}

static __global__ void init_uniform_kernel(void *x, moe_dtype dt, int64_t n, float lo, float width, uint64_t seed,
                                           uint64_t stream)
{
    /* one thread per Philox group of four elements */
    const int64_t groups = (n + 3) >> 2;
    for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups;
         g += (int64_t)gridDim.x * blockDim.x) {
        float u[4];
        moe_philox_uniform4(seed, stream, (uint64_t)g, u);
#pragma unroll
        for (int w = 0; w < 4; w++)
            if (4 * g + w < n)
                moe_cuda_st(x, dt, 4 * g + w, __fadd_rn(lo, __fmul_rn(width, u[w])));
    }
}

static __global__ void init_normal_kernel(void *x, moe_dtype dt, int64_t n, float mean, float std, uint64_t seed,
                                          uint64_t stream)
{
    const double two_pi = 6.283185307179586476925286766559;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        /* Box-Muller, cosine branch, normal i from uniforms 2i, 2i+1, as the cpu */
        float u1, u2;
        moe_philox_uniform2(seed, stream, (uint64_t)i, &u1, &u2);
        double z = __dmul_rn(sqrt(__dmul_rn(-2.0, log((double)u1))), cos(__dmul_rn(two_pi, (double)u2)));
        moe_cuda_st(x, dt, i, (float)__dadd_rn((double)mean, __dmul_rn((double)std, z)));
    }
}

/* pass 1 of the sums: one double partial per block */
template <bool SQUARE>
static __global__ void sum_partial_kernel(double *partial, const void *x, moe_dtype dt, int64_t n, int64_t stride)
{
    __shared__ double sh[32];
    double s = 0.0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        double v = (double)moe_cuda_ld(x, dt, i * stride);
        s += SQUARE ? v * v : v;
    }
    s = moe_cuda_block_sum_d(s, sh);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = s;
}

/* pass 1 of sumsq over a 16-byte aligned array: a thread reads 16 bytes
 * (16 / sizeof(T) elements) at a time, so enough bytes are in flight to
 * stream at the memory's bandwidth (one 2-byte element a thread streamed
 * the gradients at about a third of it); block 0 also reads the elements
 * past the last whole vector */
template <typename T> static __global__ void sumsq_vec_kernel(double *partial, const T *x, int64_t n)
{
    constexpr int PER = 16 / (int)sizeof(T);
    __shared__ double sh[32];
    double s = 0.0;
    const int64_t nv = n / PER;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nv; i += (int64_t)gridDim.x * blockDim.x) {
        const uint4 u = ((const uint4 *)x)[i];
        const T *e = (const T *)&u;
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const double v = (double)moe_cuda_f32(e[k]);
            s += v * v;
        }
    }
    if (blockIdx.x == 0)
        for (int64_t i = nv * PER + threadIdx.x; i < n; i += blockDim.x) {
            const double v = (double)moe_cuda_f32(x[i]);
            s += v * v;
        }
    s = moe_cuda_block_sum_d(s, sh);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = s;
}

/* pass 2: *out = (float)(*out + scale * sum of the partials) */
static __global__ void sum_final_kernel(float *out, const double *partial, int np, float scale)
{
    __shared__ double sh[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < np; i += blockDim.x)
        s += partial[i];
    s = moe_cuda_block_sum_d(s, sh);
    if (threadIdx.x == 0)
        *out = (float)((double)*out + (double)scale * s);
}

/* ------------------------------------------------------------ the ops */

moe_status moe_cuda_fill(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float value)
{
    if (!is_dtype(dt) || n < 0)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda fill: expected a known dtype and n >= 0, found dtype %d, n %lld", (int)dt,
                             (long long)n);
    if (n == 0)
        return MOE_OK;
    if (value == 0.0f && !signbit(value)) {
        MOE_CUDA_TRY(c, cudaMemsetAsync(x, 0, (size_t)n * moe_dtype_size(dt), c->stream));
        return MOE_OK;
    }
    if (dt == MOE_I32)
        fill_i32_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
            (int32_t *)x, n, (int32_t)value);
    else
        fill_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(x, dt, n, value);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_cast(moe_ctx *c, void *dst, moe_dtype dst_dt, const void *src, moe_dtype src_dt, int64_t n)
{
    if (!is_dtype(dst_dt) || !is_dtype(src_dt) || n < 0)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda cast: expected known dtypes and n >= 0, found %s -> %s, n %lld",
                             moe_cuda_dtype_name(src_dt), moe_cuda_dtype_name(dst_dt), (long long)n);
    if (n == 0)
        return MOE_OK;
    if (dst_dt == src_dt) {
        if (dst != src)
            MOE_CUDA_TRY(c, cudaMemcpyAsync(dst, src, (size_t)n * moe_dtype_size(dst_dt), cudaMemcpyDeviceToDevice,
                                            c->stream));
        return MOE_OK;
    }
    cast_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(dst, dst_dt, src,
                                                                                            src_dt, n);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_axpby(moe_ctx *c, void *y, const void *x, moe_dtype dt, int64_t n, float a, float b)
{
    MOE_TRY(check_float(c, "axpby", dt, n));
    if (n == 0)
        return MOE_OK;
    axpby_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(y, x, dt, n, a, b);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_add(moe_ctx *c, void *out, const void *x, const void *y, moe_dtype dt, int64_t n)
{
    MOE_TRY(check_float(c, "add", dt, n));
    if (n == 0)
        return MOE_OK;
    const int64_t per = 16 / (int64_t)moe_dtype_size(dt);
    const unsigned vblocks = moe_cuda_blocks(c, n / per > 0 ? n / per : 1, MOE_CUDA_THREADS);
    if ((uintptr_t)out % 16u != 0 || (uintptr_t)x % 16u != 0 || (uintptr_t)y % 16u != 0)
        add_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(out, x, y, dt, n);
    else if (dt == MOE_BF16)
        add_vec_kernel<<<vblocks, MOE_CUDA_THREADS, 0, c->stream>>>((__nv_bfloat16 *)out, (const __nv_bfloat16 *)x,
                                                                    (const __nv_bfloat16 *)y, n);
    else if (dt == MOE_F16)
        add_vec_kernel<<<vblocks, MOE_CUDA_THREADS, 0, c->stream>>>((__half *)out, (const __half *)x,
                                                                    (const __half *)y, n);
    else
        add_vec_kernel<<<vblocks, MOE_CUDA_THREADS, 0, c->stream>>>((float *)out, (const float *)x, (const float *)y,
                                                                    n);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_init_uniform(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float lo, float hi, uint64_t seed,
                                 uint64_t stream)
{
    MOE_TRY(check_float(c, "init_uniform", dt, n));
    if (!(lo <= hi))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda init_uniform: expected lo <= hi, found lo %g, hi %g",
                             (double)lo, (double)hi);
    if (n == 0)
        return MOE_OK;
    init_uniform_kernel<<<moe_cuda_blocks(c, (n + 3) / 4, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        x, dt, n, lo, hi - lo, seed, stream);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_init_normal(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float mean, float std, uint64_t seed,
                                uint64_t stream)
{
    MOE_TRY(check_float(c, "init_normal", dt, n));
    if (!(std >= 0.0f))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda init_normal: expected std >= 0, found %g", (double)std);
    if (n == 0)
        return MOE_OK;
    init_normal_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        x, dt, n, mean, std, seed, stream);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* Both sums: partial blocks depend on n only, so the order is fixed. */
static moe_status sum_two_pass(moe_ctx *c, float *out, const void *x, moe_dtype dt, int64_t n, int64_t stride,
                               float scale, bool square)
{
    /* sumsq of an aligned array: 16-byte vectors (sumsq_vec_kernel) */
    const bool vec = square && stride == 1 && n > 0 && (uintptr_t)x % 16u == 0;
    const int64_t items = vec ? n / (16 / (int64_t)moe_dtype_size(dt)) : n;
    int64_t nb = (items + SUM_THREADS - 1) / SUM_THREADS;
    int blocks = (int)(nb < 1 ? 1 : nb > SUM_MAX_BLOCKS ? SUM_MAX_BLOCKS : nb);
    double *partial = (double *)c->scratch; /* SUM_MAX_BLOCKS doubles fit in the fixed scratch */
    if (vec && dt == MOE_F32)
        sumsq_vec_kernel<float><<<blocks, SUM_THREADS, 0, c->stream>>>(partial, (const float *)x, n);
    else if (vec && dt == MOE_F16)
        sumsq_vec_kernel<__half><<<blocks, SUM_THREADS, 0, c->stream>>>(partial, (const __half *)x, n);
    else if (vec)
        sumsq_vec_kernel<__nv_bfloat16><<<blocks, SUM_THREADS, 0, c->stream>>>(partial, (const __nv_bfloat16 *)x, n);
    else if (square)
        sum_partial_kernel<true><<<blocks, SUM_THREADS, 0, c->stream>>>(partial, x, dt, n, stride);
    else
        sum_partial_kernel<false><<<blocks, SUM_THREADS, 0, c->stream>>>(partial, x, dt, n, stride);
    MOE_CUDA_CHECK_LAUNCH(c);
    sum_final_kernel<<<1, SUM_THREADS, 0, c->stream>>>(out, partial, blocks, scale);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_sum_f32(moe_ctx *c, float *out, const float *x, int64_t n, int64_t stride, float scale)
{
    if (n < 0 || (n > 1 && stride < 1))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda sum_f32: expected n >= 0 and stride >= 1, found n %lld, stride %lld", (long long)n,
                             (long long)stride);
    return sum_two_pass(c, out, x, MOE_F32, n, stride < 1 ? 1 : stride, scale, false);
}

moe_status moe_cuda_sumsq(moe_ctx *c, float *out, const void *x, moe_dtype dt, int64_t n)
{
    MOE_TRY(check_float(c, "sumsq", dt, n));
    return sum_two_pass(c, out, x, dt, n, 1, 1.0f, true);
}
