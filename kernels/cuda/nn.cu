/* nn.cu: the cuda backend's layer ops: activations (GELU, relu), dropout,
 * layer norm, token embedding with sinusoidal positions, and softmax
 * cross-entropy.
 *
 * Not here: fusions across ops (bias+activation lives in the matmul
 * epilogue) and anything that needs the host to look at data: arguments the
 * cpu oracle checks element by element (token ids inside the table, targets
 * inside the vocabulary) are not checked here; a target outside the
 * vocabulary gives a NaN loss, a token outside the table gets no gradient.
 *
 * Conventions, the same as kernels/cpu/nn.c so the two agree to rounding:
 *  - dropout keeps element i iff philox_uniform(seed, stream, i) >= p (word
 *    i & 3 of the Philox group i >> 2) and scales by 1/(1-p) computed in
 *    fp32; p == 1 drops everything. Each thread owns whole groups of four
 *    elements, so one Philox evaluation serves four.
 *  - layer-norm statistics and parameter-gradient sums accumulate in double;
 *    dweight/dbias are column sums over row chunks (fp64 partials) added in
 *    chunk order: deterministic, no atomics. Rows of whole 16-byte vectors
 *    (C % 8 == 0, fp32 C % 4 == 0) in 16-byte aligned arrays, up to 4096
 *    elements (fp32 2048), take kernels that hold the row in registers and
 *    read each element once; other shapes take per-element kernels.
 *  - embedding backward groups positions by token with a stable radix sort
 *    (CUB), then each table row is summed in fp32 in position order and
 *    added once, as the cpu's counting sort does.
 *  - cross-entropy is one block per row and one read of the logits for the
 *    statistics (max and sum of exponentials, combined across threads in a
 *    fixed order), then the gradient written in place: no fp32 copy of the
 *    (N,V) logits. Rows of whole 16-byte vectors, 16-byte aligned, up to
 *    65536 logits (fp32 32768) stay in registers between the two; longer or
 *    unaligned rows are read a second time.
 */
#include <cub/device/device_radix_sort.cuh>
#include <type_traits>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/nn.h"

static moe_status check_float(moe_ctx *c, const char *op, moe_dtype dt, int64_t n)
{
    if (!moe_cuda_is_float(dt))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected dtype f32, f16 or bf16, found %s (%d)", op,
                             moe_cuda_dtype_name(dt), (int)dt);
    if (n < 0)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected a size >= 0, found %lld", op, (long long)n);
    return MOE_OK;
}

/* ----------------------------------------------------------- activations */

static __global__ void act_forward_kernel(void *out, const void *inp, int64_t n, moe_dtype dt, moe_act_kind kind)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        moe_cuda_st(out, dt, i, moe_cuda_act(moe_cuda_ld(inp, dt, i), kind));
}

static __global__ void act_backward_kernel(void *dinp, const void *inp, const void *dout, int64_t n, moe_dtype dt,
                                           moe_act_kind kind)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        moe_cuda_st(dinp, dt, i, moe_cuda_act_backward_one(moe_cuda_ld(dout, dt, i), moe_cuda_ld(inp, dt, i), kind));
}

/* The same per element, 16 bytes (8 fp16/bf16 or 4 fp32 elements) a thread
 * a step when every array is 16-byte aligned: one 2-byte element a thread
 * left too few bytes in flight to stream at the memory's bandwidth. */
template <typename T>
static __global__ void act_forward_vec_kernel(T *out, const T *inp, int64_t n, moe_act_kind kind)
{
    constexpr int PER = 16 / (int)sizeof(T);
    const int64_t nv = n / PER, first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x,
                  step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = first; i < nv; i += step) {
        uint4 u = ((const uint4 *)inp)[i];
        T *e = (T *)&u;
#pragma unroll
        for (int k = 0; k < PER; k++)
            e[k] = moe_cuda_from_f32<T>(moe_cuda_act(moe_cuda_f32(e[k]), kind));
        ((uint4 *)out)[i] = u;
    }
    for (int64_t i = nv * PER + first; i < n; i += step)
        out[i] = moe_cuda_from_f32<T>(moe_cuda_act(moe_cuda_f32(inp[i]), kind));
}

template <typename T>
static __global__ void act_backward_vec_kernel(T *dinp, const T *inp, const T *dout, int64_t n, moe_act_kind kind)
{
    constexpr int PER = 16 / (int)sizeof(T);
    const int64_t nv = n / PER, first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x,
                  step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = first; i < nv; i += step) {
        const uint4 x = ((const uint4 *)inp)[i];
        uint4 g = ((const uint4 *)dout)[i];
        const T *xe = (const T *)&x;
        T *ge = (T *)&g;
#pragma unroll
        for (int k = 0; k < PER; k++)
            ge[k] = moe_cuda_from_f32<T>(moe_cuda_act_backward_one(moe_cuda_f32(ge[k]), moe_cuda_f32(xe[k]), kind));
        ((uint4 *)dinp)[i] = g;
    }
    for (int64_t i = nv * PER + first; i < n; i += step)
        dinp[i] = moe_cuda_from_f32<T>(moe_cuda_act_backward_one(moe_cuda_f32(dout[i]), moe_cuda_f32(inp[i]), kind));
}

static bool aligned16(const void *p) { return (uintptr_t)p % 16u == 0; }

static moe_status check_act(moe_ctx *c, const char *op, moe_dtype dt, int64_t n, moe_act_kind kind)
{
    MOE_TRY(check_float(c, op, dt, n));
    if (kind != MOE_ACT_GELU_TANH && kind != MOE_ACT_GELU_ERF && kind != MOE_ACT_RELU)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda %s: unknown activation kind %d; expected MOE_ACT_GELU_TANH, MOE_ACT_GELU_ERF or "
                             "MOE_ACT_RELU",
                             op, (int)kind);
    return MOE_OK;
}

moe_status moe_cuda_act_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, moe_act_kind kind)
{
    MOE_TRY(check_act(c, "act_forward", dt, n, kind));
    if (n == 0)
        return MOE_OK;
    if (aligned16(out) && aligned16(inp)) {
        const unsigned blocks = moe_cuda_blocks(c, (n + 7) / 8, MOE_CUDA_THREADS);
        if (dt == MOE_F16)
            act_forward_vec_kernel<__half><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>((__half *)out,
                                                                                     (const __half *)inp, n, kind);
        else if (dt == MOE_BF16)
            act_forward_vec_kernel<__nv_bfloat16><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>(
                (__nv_bfloat16 *)out, (const __nv_bfloat16 *)inp, n, kind);
        else
            act_forward_vec_kernel<float><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>((float *)out,
                                                                                    (const float *)inp, n, kind);
        MOE_CUDA_CHECK_LAUNCH(c);
        return MOE_OK;
    }
    act_forward_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(out, inp, n, dt,
                                                                                                   kind);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_act_backward(moe_ctx *c, void *dinp, const void *inp, const void *dout, int64_t n, moe_dtype dt,
                                 moe_act_kind kind)
{
    MOE_TRY(check_act(c, "act_backward", dt, n, kind));
    if (n == 0)
        return MOE_OK;
    if (aligned16(dinp) && aligned16(inp) && aligned16(dout)) {
        const unsigned blocks = moe_cuda_blocks(c, (n + 7) / 8, MOE_CUDA_THREADS);
        if (dt == MOE_F16)
            act_backward_vec_kernel<__half><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>(
                (__half *)dinp, (const __half *)inp, (const __half *)dout, n, kind);
        else if (dt == MOE_BF16)
            act_backward_vec_kernel<__nv_bfloat16><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>(
                (__nv_bfloat16 *)dinp, (const __nv_bfloat16 *)inp, (const __nv_bfloat16 *)dout, n, kind);
        else
            act_backward_vec_kernel<float><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>(
                (float *)dinp, (const float *)inp, (const float *)dout, n, kind);
        MOE_CUDA_CHECK_LAUNCH(c);
        return MOE_OK;
    }
    act_backward_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        dinp, inp, dout, n, dt, kind);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* --------------------------------------------------------------- dropout */

/* one thread per Philox group: elements 4g .. 4g+3 (any storage alignment) */
static __global__ void dropout_kernel(void *out, const void *in, int64_t n, moe_dtype dt, float p, float scale,
                                      uint64_t seed, uint64_t stream)
{
    const int64_t groups = (n + 3) >> 2;
    for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups;
         g += (int64_t)gridDim.x * blockDim.x) {
        float u[4];
        moe_philox_uniform4(seed, stream, (uint64_t)g, u);
#pragma unroll
        for (int w = 0; w < 4; w++) {
            const int64_t i = 4 * g + w;
            if (i < n)
                moe_cuda_st(out, dt, i, u[w] >= p ? moe_cuda_ld(in, dt, i) * scale : 0.0f);
        }
    }
}

/* 4 elements of T as one aligned vector (8 bytes for 16-bit types, 16 for fp32) */
template <typename T> struct drop_vec4 {
    typedef typename std::conditional<sizeof(T) == 4, float4, uint2>::type type;
};

/* the same for n % 4 == 0 and 4-element-aligned pointers: one vector load and
 * store per group */
template <typename T>
static __global__ void dropout_vec_kernel(T *out, const T *in, int64_t groups, float p, float scale, uint64_t seed,
                                          uint64_t stream)
{
    typedef typename drop_vec4<T>::type V;
    for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups;
         g += (int64_t)gridDim.x * blockDim.x) {
        float u[4];
        moe_philox_uniform4(seed, stream, (uint64_t)g, u);
        V v = ((const V *)in)[g];
        T *e = (T *)&v;
#pragma unroll
        for (int w = 0; w < 4; w++)
            e[w] = moe_cuda_from_f32<T>(u[w] >= p ? moe_cuda_f32(e[w]) * scale : 0.0f);
        ((V *)out)[g] = v;
    }
}

static moe_status dropout_apply(moe_ctx *c, const char *op, void *out, const void *in, int64_t n, moe_dtype dt,
                                float p, uint64_t seed, uint64_t stream)
{
    MOE_TRY(check_float(c, op, dt, n));
    if (!(p >= 0.0f && p <= 1.0f))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected a probability 0 <= p <= 1, found %g", op,
                             (double)p);
    if (n == 0)
        return MOE_OK;
    if (p == 0.0f) {
        if (out != in)
            MOE_CUDA_TRY(c, cudaMemcpyAsync(out, in, (size_t)n * moe_dtype_size(dt), cudaMemcpyDeviceToDevice,
                                            c->stream));
        return MOE_OK;
    }
    if (p == 1.0f) {
        MOE_CUDA_TRY(c, cudaMemsetAsync(out, 0, (size_t)n * moe_dtype_size(dt), c->stream));
        return MOE_OK;
    }
    const float scale = 1.0f / (1.0f - p);
    const int64_t groups = (n + 3) / 4;
    const unsigned blocks = moe_cuda_blocks(c, groups, MOE_CUDA_THREADS);
    const size_t vb = 4 * moe_dtype_size(dt);
    if (n % 4 == 0 && (uintptr_t)out % vb == 0 && (uintptr_t)in % vb == 0) {
        if (dt == MOE_BF16)
            dropout_vec_kernel<__nv_bfloat16><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>(
                (__nv_bfloat16 *)out, (const __nv_bfloat16 *)in, groups, p, scale, seed, stream);
        else if (dt == MOE_F16)
            dropout_vec_kernel<__half><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>(
                (__half *)out, (const __half *)in, groups, p, scale, seed, stream);
        else
            dropout_vec_kernel<float><<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>((float *)out, (const float *)in,
                                                                                  groups, p, scale, seed, stream);
    } else {
        dropout_kernel<<<blocks, MOE_CUDA_THREADS, 0, c->stream>>>(out, in, n, dt, p, scale, seed, stream);
    }
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_dropout_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, float p,
                                    uint64_t seed, uint64_t stream)
{
    return dropout_apply(c, "dropout_forward", out, inp, n, dt, p, seed, stream);
}

moe_status moe_cuda_dropout_backward(moe_ctx *c, void *din, const void *dout, int64_t n, moe_dtype dt, float p,
                                     uint64_t seed, uint64_t stream)
{
    return dropout_apply(c, "dropout_backward", din, dout, n, dt, p, seed, stream);
}

/* ------------------------------------------------------------ layer norm */

#define LN_WARPS 8

/* one warp per row */
static __global__ void layernorm_forward_kernel(void *out, float *mean, float *rstd, const void *inp,
                                                const void *weight, const void *bias, int64_t N, int64_t C, float eps,
                                                moe_dtype dt)
{
    int lane = threadIdx.x & 31;
    int64_t r = (int64_t)blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
    if (r >= N)
        return;
    const int64_t base = r * C;
    double s = 0.0;
    for (int64_t j = lane; j < C; j += 32)
        s += (double)moe_cuda_ld(inp, dt, base + j);
    const double m = moe_cuda_warp_sum_d(s) / (double)C;
    double v = 0.0;
    for (int64_t j = lane; j < C; j += 32) {
        double d = (double)moe_cuda_ld(inp, dt, base + j) - m;
        v += d * d;
    }
    v = moe_cuda_warp_sum_d(v);
    const float mf = (float)m, rf = (float)(1.0 / sqrt(v / (double)C + (double)eps));
    for (int64_t j = lane; j < C; j += 32) {
        float y = (moe_cuda_ld(inp, dt, base + j) - mf) * rf;
        if (weight != NULL)
            y *= moe_cuda_ld(weight, dt, j);
        if (bias != NULL)
            y += moe_cuda_ld(bias, dt, j);
        moe_cuda_st(out, dt, base + j, y);
    }
    if (lane == 0) {
        if (mean != NULL)
            mean[r] = mf;
        if (rstd != NULL)
            rstd[r] = rf;
    }
}

/* The same with the row held in registers, NV 16-byte vectors a lane: the
 * row is read from memory once, 16 bytes a load, where the kernel above reads
 * it three times, 2 bytes a load. Needs C % (16 / sizeof(T)) == 0 (every row
 * 16-byte aligned), C <= 32 * NV * 16 / sizeof(T) and 16-byte aligned arrays. */
template <typename T, int NV>
static __global__ void layernorm_forward_vec_kernel(T *out, float *mean, float *rstd, const T *inp, const T *weight,
                                                    const T *bias, int64_t N, int64_t C, float eps)
{
    constexpr int PER = 16 / (int)sizeof(T);
    const int lane = threadIdx.x & 31, nv = (int)(C / PER);
    const int64_t r = (int64_t)blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
    if (r >= N)
        return;
    const uint4 *x = (const uint4 *)(inp + r * C);
    uint4 u[NV];
#pragma unroll
    for (int k = 0; k < NV; k++)
        u[k] = lane + 32 * k < nv ? x[lane + 32 * k] : make_uint4(0u, 0u, 0u, 0u);
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const T *e = (const T *)&u[k];
#pragma unroll
        for (int q = 0; q < PER; q++)
            s += (double)moe_cuda_f32(e[q]); /* padding vectors are zeros */
    }
    const double m = moe_cuda_warp_sum_d(s) / (double)C;
    double v = 0.0;
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const T *e = (const T *)&u[k];
        if (lane + 32 * k < nv)
#pragma unroll
            for (int q = 0; q < PER; q++) {
                const double d = (double)moe_cuda_f32(e[q]) - m;
                v += d * d;
            }
    }
    v = moe_cuda_warp_sum_d(v);
    const float mf = (float)m, rf = (float)(1.0 / sqrt(v / (double)C + (double)eps));
    uint4 *y = (uint4 *)(out + r * C);
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const int j = lane + 32 * k;
        if (j >= nv)
            break;
        const uint4 wv = weight != NULL ? ((const uint4 *)weight)[j] : make_uint4(0u, 0u, 0u, 0u);
        const uint4 bv = bias != NULL ? ((const uint4 *)bias)[j] : make_uint4(0u, 0u, 0u, 0u);
        const T *we = (const T *)&wv, *be = (const T *)&bv;
        T *e = (T *)&u[k];
#pragma unroll
        for (int q = 0; q < PER; q++) {
            float yq = (moe_cuda_f32(e[q]) - mf) * rf;
            if (weight != NULL)
                yq *= moe_cuda_f32(we[q]);
            if (bias != NULL)
                yq += moe_cuda_f32(be[q]);
            e[q] = moe_cuda_from_f32<T>(yq);
        }
        y[j] = u[k];
    }
    if (lane == 0) {
        if (mean != NULL)
            mean[r] = mf;
        if (rstd != NULL)
            rstd[r] = rf;
    }
}

/* dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), one warp
 * per row. Columns go LN_BATCH at a time with every load of a batch before
 * any store: the pointers may alias, so the compiler could not move a later
 * load above a store, and one column per step would wait a full memory round
 * trip each time. (Each element is read before it is written by the same
 * thread, so dinp == dout stays correct.) */
#define LN_BATCH 4
static __global__ void layernorm_dinp_kernel(void *dinp, const void *dout, const void *inp, const void *weight,
                                             const float *mean, const float *rstd, int64_t N, int64_t C, moe_dtype dt)
{
    int lane = threadIdx.x & 31;
    int64_t r = (int64_t)blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
    if (r >= N)
        return;
    const int64_t base = r * C;
    const float mf = mean[r], rf = rstd[r];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t j0 = lane; j0 < C; j0 += 32 * LN_BATCH) {
        float g[LN_BATCH], x[LN_BATCH], w[LN_BATCH];
#pragma unroll
        for (int u = 0; u < LN_BATCH; u++) {
            const int64_t j = j0 + 32 * u;
            g[u] = j < C ? moe_cuda_ld(dout, dt, base + j) : 0.0f;
            x[u] = j < C ? moe_cuda_ld(inp, dt, base + j) : 0.0f;
            w[u] = j < C && weight != NULL ? moe_cuda_ld(weight, dt, j) : 1.0f;
        }
#pragma unroll
        for (int u = 0; u < LN_BATCH; u++) {
            if (j0 + 32 * u >= C)
                break;
            const float xhat = (x[u] - mf) * rf, dxhat = g[u] * w[u];
            s1 += (double)dxhat;
            s2 += (double)dxhat * (double)xhat;
        }
    }
    s1 = moe_cuda_warp_sum_d(s1);
    s2 = moe_cuda_warp_sum_d(s2);
    const float m1 = (float)(s1 / (double)C), m2 = (float)(s2 / (double)C);
    for (int64_t j0 = lane; j0 < C; j0 += 32 * LN_BATCH) {
        float g[LN_BATCH], x[LN_BATCH], w[LN_BATCH], acc[LN_BATCH];
#pragma unroll
        for (int u = 0; u < LN_BATCH; u++) {
            const int64_t j = j0 + 32 * u;
            g[u] = j < C ? moe_cuda_ld(dout, dt, base + j) : 0.0f;
            x[u] = j < C ? moe_cuda_ld(inp, dt, base + j) : 0.0f;
            w[u] = j < C && weight != NULL ? moe_cuda_ld(weight, dt, j) : 1.0f;
            acc[u] = j < C ? moe_cuda_ld(dinp, dt, base + j) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < LN_BATCH; u++) {
            const int64_t j = j0 + 32 * u;
            if (j >= C)
                break;
            const float xhat = (x[u] - mf) * rf, dxhat = g[u] * w[u];
            moe_cuda_st(dinp, dt, base + j, acc[u] + rf * (dxhat - m1 - xhat * m2));
        }
    }
}

#define COL_W 32
#define COL_H 8

/* partial[(0|1)*R*C + r*C + col] = sums over rows of chunk r of dout*xhat and dout */
static __global__ void layernorm_dparam_partial_kernel(double *partial, const void *dout, const void *inp,
                                                       const float *mean, const float *rstd, int64_t N, int64_t C,
                                                       int64_t rows_per, int64_t R, moe_dtype dt)
{
    __shared__ double shw[COL_H][COL_W + 1], shb[COL_H][COL_W + 1];
    int64_t col = (int64_t)blockIdx.x * COL_W + threadIdx.x;
    int64_t r0 = (int64_t)blockIdx.y * rows_per, r1 = r0 + rows_per < N ? r0 + rows_per : N;
    double sw = 0.0, sb = 0.0;
    if (col < C)
#pragma unroll 4
        for (int64_t r = r0 + threadIdx.y; r < r1; r += COL_H) {
            float g = moe_cuda_ld(dout, dt, r * C + col);
            float xhat = (moe_cuda_ld(inp, dt, r * C + col) - mean[r]) * rstd[r];
            sw += (double)g * (double)xhat;
            sb += (double)g;
        }
    shw[threadIdx.y][threadIdx.x] = sw;
    shb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && col < C) {
        double tw = 0.0, tb = 0.0;
        for (int y = 0; y < COL_H; y++) {
            tw += shw[y][threadIdx.x];
            tb += shb[y][threadIdx.x];
        }
        partial[blockIdx.y * C + col] = tw;
        partial[R * C + blockIdx.y * C + col] = tb;
    }
}

/* dweight, dbias (+)= sums of the R chunk partials of each column: a block of
 * COL_W columns x COL_HF row groups, group y adding chunks y, y+COL_HF, ...,
 * then the group sums added in order (fixed order; COL_HF groups keep enough
 * loads in flight for the vector kernel's partials, a few MB) */
#define COL_HF 32
static __global__ void layernorm_dparam_final_kernel(void *dweight, void *dbias, const double *partial, int64_t R,
                                                     int64_t C, moe_dtype dt)
{
    __shared__ double shw[COL_HF][COL_W + 1], shb[COL_HF][COL_W + 1];
    const int64_t col = (int64_t)blockIdx.x * COL_W + threadIdx.x;
    double sw = 0.0, sb = 0.0;
    if (col < C)
        for (int64_t r = threadIdx.y; r < R; r += COL_HF) {
            sw += partial[r * C + col];
            sb += partial[R * C + r * C + col];
        }
    shw[threadIdx.y][threadIdx.x] = sw;
    shb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y != 0 || col >= C)
        return;
    for (int y = 1; y < COL_HF; y++) {
        sw += shw[y][threadIdx.x];
        sb += shb[y][threadIdx.x];
    }
    if (dweight != NULL)
        moe_cuda_st(dweight, dt, col, (float)((double)moe_cuda_ld(dweight, dt, col) + sw));
    if (dbias != NULL)
        moe_cuda_st(dbias, dt, col, (float)((double)moe_cuda_ld(dbias, dt, col) + sb));
}

/* Sums a and b over the block in a fixed order; every thread gets both. The
 * first barrier is there because sh is reused row after row: a warp must not
 * overwrite it while another still reads the previous row's sums. */
static __device__ __forceinline__ void ln_block_sum2(double &a, double &b, double2 *sh)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    a = moe_cuda_warp_sum_d(a);
    b = moe_cuda_warp_sum_d(b);
    __syncthreads();
    if (lane == 0)
        sh[warp] = make_double2(a, b);
    __syncthreads();
    const double2 v = lane < nw ? sh[lane] : make_double2(0.0, 0.0);
    a = moe_cuda_warp_sum_d(v.x);
    b = moe_cuda_warp_sum_d(v.y);
}

/* Blocks of the vector backward kernel resident on one SM: 512 threads, at
 * most 128 registers each (it needs about 120, no spills). */
#define LNB_MIN_BLOCKS(threads) (512 / (threads))

#define LNB_STAGES 4 /* ring stages: rows a block has in flight while one is used */

/* Layer-norm backward in one pass, for C % (16 / sizeof(T)) == 0, C <= THREADS
 * * 16 / sizeof(T) and 16-byte aligned arrays: a block of THREADS walks the
 * rows [r0, r1) of its chunk, one 16-byte vector of dout, inp and dinp a
 * thread, so each element is read once (the fallback's kernels read dout and
 * inp three times, 2 bytes a load). The rows travel LNB_STAGES ahead through
 * a ring in shared memory (cp.async, each thread copying the vectors it
 * reads itself: no barrier), so the memory system always has rows of every
 * block in flight, whatever the block reductions wait for. Each
 * thread keeps its columns' sums of dout*xhat and dout in double registers and
 * writes them as the chunk's partials for layernorm_dparam_final_kernel
 * (partial NULL: no parameter gradients). dinp may be dout: a thread reads its
 * elements, for both the row sums and the parameter sums, before it writes
 * them. */
template <typename T, int THREADS>
static __global__ void __launch_bounds__(THREADS, LNB_MIN_BLOCKS(THREADS))
    layernorm_backward_vec_kernel(T *dinp, double *partial, const T *dout, const T *inp, const T *weight,
                                  const float *mean, const float *rstd, int64_t N, int64_t C, int64_t rows_per,
                                  int64_t R)
{
    constexpr int PER = 16 / (int)sizeof(T);
    __shared__ double2 sh[32];
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const int j = threadIdx.x;
    const bool on = j < C / PER;
    const int64_t r0 = (int64_t)blockIdx.x * rows_per, r1 = r0 + rows_per < N ? r0 + rows_per : N;
    float w[PER];
    {
        const uint4 wv = on && weight != NULL ? ((const uint4 *)weight)[j] : zero;
        const T *we = (const T *)&wv;
#pragma unroll
        for (int q = 0; q < PER; q++)
            w[q] = weight != NULL ? moe_cuda_f32(we[q]) : 1.0f;
    }
    double dw[PER], db[PER];
#pragma unroll
    for (int q = 0; q < PER; q++)
        dw[q] = db[q] = 0.0;
    extern __shared__ uint4 ring[]; /* [LNB_STAGES][3][THREADS]: dout, inp, dinp */
    const int64_t nrows = r1 - r0;
    auto fetch = [&](int64_t k) { /* row r0 + k into stage k % LNB_STAGES; one commit group either way */
        if (on && k < nrows) {
            uint4 *st = ring + (k % LNB_STAGES) * 3 * THREADS + j;
            const int64_t off = (r0 + k) * C;
            cp_async16(st, (const uint4 *)(dout + off) + j);
            cp_async16(st + THREADS, (const uint4 *)(inp + off) + j);
            if (dinp != NULL)
                cp_async16(st + 2 * THREADS, (const uint4 *)(dinp + off) + j);
        }
        cp_async_commit();
    };
#pragma unroll
    for (int k = 0; k < LNB_STAGES; k++)
        fetch(k);
    for (int64_t r = r0; r < r1; r++) {
        const float mf = mean[r], rf = rstd[r];
        cp_async_wait<LNB_STAGES - 1>(); /* this thread's copies of row r have landed */
        uint4 g = zero, x = zero, a = zero;
        if (on) {
            const uint4 *st = ring + ((r - r0) % LNB_STAGES) * 3 * THREADS + j;
            g = st[0];
            x = st[THREADS];
            if (dinp != NULL)
                a = st[2 * THREADS];
        }
        const T *ge = (const T *)&g, *xe = (const T *)&x;
        double s1 = 0.0, s2 = 0.0;
        if (on)
#pragma unroll
            for (int q = 0; q < PER; q++) {
                const float gq = moe_cuda_f32(ge[q]), xhat = (moe_cuda_f32(xe[q]) - mf) * rf, dxhat = gq * w[q];
                s1 += (double)dxhat;
                s2 += (double)dxhat * (double)xhat;
                dw[q] += (double)gq * (double)xhat;
                db[q] += (double)gq;
            }
        if (dinp != NULL) {
            ln_block_sum2(s1, s2, sh);
            const float m1 = (float)(s1 / (double)C), m2 = (float)(s2 / (double)C);
            if (on) {
                T *ae = (T *)&a;
#pragma unroll
                for (int q = 0; q < PER; q++) {
                    const float xhat = (moe_cuda_f32(xe[q]) - mf) * rf, dxhat = moe_cuda_f32(ge[q]) * w[q];
                    ae[q] = moe_cuda_from_f32<T>(moe_cuda_f32(ae[q]) + rf * (dxhat - m1 - xhat * m2));
                }
                ((uint4 *)(dinp + r * C))[j] = a;
            }
        }
        fetch(r - r0 + LNB_STAGES); /* into the stage read above, whose values are used by now */
    }
    cp_async_wait<0>();
    if (partial != NULL && on)
#pragma unroll
        for (int q = 0; q < PER; q++) {
            partial[blockIdx.x * C + j * PER + q] = dw[q];
            partial[(R + blockIdx.x) * C + j * PER + q] = db[q];
        }
}

#define LN_MAX_NV 16        /* forward vector path: rows up to 32 * 16 vectors */
#define LNB_MAX_THREADS 512 /* backward vector path: rows up to 512 vectors */

template <typename T>
static void layernorm_forward_vec(moe_ctx *c, unsigned blocks, int nv, void *out, float *mean, float *rstd,
                                  const void *inp, const void *weight, const void *bias, int64_t N, int64_t C,
                                  float eps)
{
    T *o = (T *)out;
    const T *x = (const T *)inp, *w = (const T *)weight, *b = (const T *)bias;
    const int th = LN_WARPS * 32;
    switch (nv) {
    case 1: layernorm_forward_vec_kernel<T, 1><<<blocks, th, 0, c->stream>>>(o, mean, rstd, x, w, b, N, C, eps); break;
    case 2: layernorm_forward_vec_kernel<T, 2><<<blocks, th, 0, c->stream>>>(o, mean, rstd, x, w, b, N, C, eps); break;
    case 4: layernorm_forward_vec_kernel<T, 4><<<blocks, th, 0, c->stream>>>(o, mean, rstd, x, w, b, N, C, eps); break;
    case 8: layernorm_forward_vec_kernel<T, 8><<<blocks, th, 0, c->stream>>>(o, mean, rstd, x, w, b, N, C, eps); break;
    default:
        layernorm_forward_vec_kernel<T, LN_MAX_NV><<<blocks, th, 0, c->stream>>>(o, mean, rstd, x, w, b, N, C, eps);
        break;
    }
}

template <typename T, int THREADS>
static moe_status layernorm_backward_launch(moe_ctx *c, unsigned R, T *di, double *partial, const T *g, const T *x,
                                            const T *w, const float *mean, const float *rstd, int64_t N, int64_t C,
                                            int64_t rows_per)
{
    const size_t ring = (size_t)LNB_STAGES * 3 * THREADS * sizeof(uint4);
    MOE_CUDA_TRY(c, cudaFuncSetAttribute(layernorm_backward_vec_kernel<T, THREADS>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ring));
    layernorm_backward_vec_kernel<T, THREADS><<<R, THREADS, ring, c->stream>>>(di, partial, g, x, w, mean, rstd, N, C,
                                                                              rows_per, R);
    return MOE_OK;
}

template <typename T>
static moe_status layernorm_backward_vec(moe_ctx *c, unsigned R, int threads, void *dinp, double *partial,
                                         const void *dout, const void *inp, const void *weight, const float *mean,
                                         const float *rstd, int64_t N, int64_t C, int64_t rows_per)
{
    T *di = (T *)dinp;
    const T *g = (const T *)dout, *x = (const T *)inp, *w = (const T *)weight;
    if (threads == 128)
        return layernorm_backward_launch<T, 128>(c, R, di, partial, g, x, w, mean, rstd, N, C, rows_per);
    if (threads == 256)
        return layernorm_backward_launch<T, 256>(c, R, di, partial, g, x, w, mean, rstd, N, C, rows_per);
    return layernorm_backward_launch<T, LNB_MAX_THREADS>(c, R, di, partial, g, x, w, mean, rstd, N, C, rows_per);
}

moe_status moe_cuda_layernorm_forward(moe_ctx *c, void *out, float *mean, float *rstd, const void *inp,
                                      const void *weight, const void *bias, int64_t N, int64_t C, float eps,
                                      moe_dtype dt)
{
    MOE_TRY(check_float(c, "layernorm_forward", dt, N));
    if (C < 1 || !(eps >= 0.0f))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda layernorm_forward: expected C >= 1 and eps >= 0, found C %lld, eps %g",
                             (long long)C, (double)eps);
    if (N == 0)
        return MOE_OK;
    const unsigned blocks = (unsigned)((N + LN_WARPS - 1) / LN_WARPS);
    const int64_t per = 16 / (int64_t)moe_dtype_size(dt);
    if (C % per == 0 && C <= 32 * LN_MAX_NV * per && aligned16(out) && aligned16(inp) &&
        (weight == NULL || aligned16(weight)) && (bias == NULL || aligned16(bias))) {
        int nv = 1; /* vectors a lane: the fewest that cover the row */
        while (32 * nv * per < C)
            nv *= 2;
        if (dt == MOE_F16)
            layernorm_forward_vec<__half>(c, blocks, nv, out, mean, rstd, inp, weight, bias, N, C, eps);
        else if (dt == MOE_BF16)
            layernorm_forward_vec<__nv_bfloat16>(c, blocks, nv, out, mean, rstd, inp, weight, bias, N, C, eps);
        else
            layernorm_forward_vec<float>(c, blocks, nv, out, mean, rstd, inp, weight, bias, N, C, eps);
    } else {
        layernorm_forward_kernel<<<blocks, LN_WARPS * 32, 0, c->stream>>>(out, mean, rstd, inp, weight, bias, N, C,
                                                                            eps, dt);
    }
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_layernorm_backward(moe_ctx *c, void *dinp, void *dweight, void *dbias, const void *dout,
                                       const void *inp, const void *weight, const float *mean, const float *rstd,
                                       int64_t N, int64_t C, moe_dtype dt)
{
    MOE_TRY(check_float(c, "layernorm_backward", dt, N));
    if (C < 1)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda layernorm_backward: expected C >= 1, found %lld",
                             (long long)C);
    if (N == 0 || (dinp == NULL && dweight == NULL && dbias == NULL))
        return MOE_OK;
    const int64_t per = 16 / (int64_t)moe_dtype_size(dt);
    const bool vec = C % per == 0 && C <= LNB_MAX_THREADS * per && aligned16(dout) && aligned16(inp) &&
                     (dinp == NULL || aligned16(dinp)) && (weight == NULL || aligned16(weight));
    int threads = 128; /* vector kernel: the fewest threads that cover the row */
    while (vec && threads * per < C)
        threads *= 2;
    /* row chunks: the vector kernel fills the device once, each block walking
     * its chunk; the fallback keeps its chunks of at least 128 rows */
    int64_t R;
    if (vec) {
        R = (int64_t)(c->num_sms > 0 ? c->num_sms : 132) * LNB_MIN_BLOCKS(threads);
    } else {
        R = (N + 127) / 128;
        if (R > 64)
            R = 64;
    }
    if (R > N)
        R = N;
    const int64_t rows_per = (N + R - 1) / R;
    R = (N + rows_per - 1) / rows_per;
    double *partial = NULL;
    if (dweight != NULL || dbias != NULL)
        MOE_TRY(moe_cuda_scratch_alloc(c, (uint64_t)(2 * R * C) * sizeof(double), "layernorm_backward partials",
                                       (void **)&partial));
    const unsigned col_blocks = (unsigned)((C + COL_W - 1) / COL_W);
    cudaError_t e = cudaSuccess;
    moe_status vst = MOE_OK;
    if (vec) {
        if (dt == MOE_F16)
            vst = layernorm_backward_vec<__half>(c, (unsigned)R, threads, dinp, partial, dout, inp, weight, mean, rstd,
                                                 N, C, rows_per);
        else if (dt == MOE_BF16)
            vst = layernorm_backward_vec<__nv_bfloat16>(c, (unsigned)R, threads, dinp, partial, dout, inp, weight,
                                                        mean, rstd, N, C, rows_per);
        else
            vst = layernorm_backward_vec<float>(c, (unsigned)R, threads, dinp, partial, dout, inp, weight, mean, rstd,
                                                N, C, rows_per);
        e = vst == MOE_OK ? cudaGetLastError() : cudaSuccess;
    } else if (partial != NULL) {
        /* the parameter sums first: dinp may be dout */
        layernorm_dparam_partial_kernel<<<dim3(col_blocks, (unsigned)R), dim3(COL_W, COL_H), 0, c->stream>>>(
            partial, dout, inp, mean, rstd, N, C, rows_per, R, dt);
        e = cudaGetLastError();
    }
    if (vst == MOE_OK && e == cudaSuccess && partial != NULL) {
        layernorm_dparam_final_kernel<<<col_blocks, dim3(COL_W, COL_HF), 0, c->stream>>>(dweight, dbias, partial, R,
                                                                                         C, dt);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess && !vec && dinp != NULL) {
        layernorm_dinp_kernel<<<(unsigned)((N + LN_WARPS - 1) / LN_WARPS), LN_WARPS * 32, 0, c->stream>>>(
            dinp, dout, inp, weight, mean, rstd, N, C, dt);
        e = cudaGetLastError();
    }
    moe_cuda_scratch_free(c, partial);
    MOE_TRY(vst);
    MOE_CUDA_TRY(c, e);
    return MOE_OK;
}

/* ------------------------------------------------------------- embedding */

static __global__ void embedding_forward_kernel(void *out, const int32_t *tokens, const void *table, int64_t NT,
                                                int64_t T, int64_t C, float scale, int padding_idx, int sinusoidal,
                                                float neg_e, moe_dtype dt)
{
    const int64_t half = C / 2;
    for (int64_t x = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; x < NT * C; x += (int64_t)gridDim.x * blockDim.x) {
        int64_t n = x / C, j = x % C;
        int32_t tok = tokens[n];
        float v = tok >= 0 ? scale * moe_cuda_ld(table, dt, (int64_t)tok * C + j) : __int_as_float(0x7fc00000);
        if (sinusoidal && tok != padding_idx && j < 2 * half) {
            float pos = (float)((int64_t)padding_idx + 1 + n % T);
            int64_t kk = j < half ? j : j - half;
            float freq = expf((float)kk * neg_e);
            v += j < half ? sinf(pos * freq) : cosf(pos * freq);
        }
        moe_cuda_st(out, dt, x, v);
    }
}

/* One block per run of equal keys in the sorted tokens: sums dout over the
 * run's positions in order and adds scale * sum to the table row once. */
static __global__ void embedding_backward_kernel(void *dtable, const void *dout, const int32_t *sorted_tok,
                                                 const int32_t *sorted_pos, int64_t NT, int64_t C, int64_t V,
                                                 float scale, int padding_idx, moe_dtype dt)
{
    for (int64_t q = blockIdx.x; q < NT; q += gridDim.x) {
        int32_t v = sorted_tok[q];
        if ((q > 0 && sorted_tok[q - 1] == v) || v < 0 || v >= V || v == padding_idx)
            continue;
        int64_t end = q + 1;
        while (end < NT && sorted_tok[end] == v)
            end++;
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
            float acc = 0.0f;
            for (int64_t r = q; r < end; r++)
                acc += moe_cuda_ld(dout, dt, (int64_t)sorted_pos[r] * C + j);
            moe_cuda_st(dtable, dt, (int64_t)v * C + j, moe_cuda_ld(dtable, dt, (int64_t)v * C + j) + scale * acc);
        }
    }
}

static __global__ void iota_kernel(int32_t *x, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] = (int32_t)i;
}

moe_status moe_cuda_embedding_forward(moe_ctx *c, void *out, const int32_t *tokens, const void *table, int64_t B,
                                      int64_t T, int64_t C, float scale, int padding_idx, int sinusoidal,
                                      moe_dtype dt)
{
    MOE_TRY(check_float(c, "embedding_forward", dt, B));
    if (T < 0 || C < 1)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda embedding_forward: expected T >= 0 and C >= 1, found T %lld, C %lld", (long long)T,
                             (long long)C);
    const int64_t half = C / 2;
    if (sinusoidal && half < 2)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda embedding_forward: sinusoidal positions need C >= 4 (half-1 divides the frequency "
                             "exponent), found C %lld",
                             (long long)C);
    const int64_t NT = B * T;
    if (NT == 0)
        return MOE_OK;
    /* fp32 as fairseq: freq_k = exp(k * -(ln(10000)/(half-1))) */
    const float e = sinusoidal ? (float)(log(10000.0) / (double)(half - 1)) : 0.0f;
    embedding_forward_kernel<<<moe_cuda_blocks(c, NT * C, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        out, tokens, table, NT, T, C, scale, padding_idx, sinusoidal, -e, dt);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_embedding_backward(moe_ctx *c, void *dtable, const void *dout, const int32_t *tokens, int64_t B,
                                       int64_t T, int64_t C, int64_t V, float scale, int padding_idx, moe_dtype dt)
{
    MOE_TRY(check_float(c, "embedding_backward", dt, B));
    if (T < 0 || C < 1 || V < 1)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda embedding_backward: expected T >= 0, C >= 1, V >= 1, found T %lld, C %lld, V %lld",
                             (long long)T, (long long)C, (long long)V);
    const int64_t NT = B * T;
    if (NT == 0)
        return MOE_OK;
    if (NT > INT32_MAX)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda embedding_backward: expected at most %d tokens, found %lld; split the batch",
                             INT32_MAX, (long long)NT);
    const int n = (int)NT;
    size_t temp_bytes = 0;
    if (cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, (const int32_t *)NULL, (int32_t *)NULL,
                                        (const int32_t *)NULL, (int32_t *)NULL, n, 0, 32, c->stream) != cudaSuccess)
        return moe_cuda_fail(c, MOE_ERR_BACKEND, "cuda embedding_backward: sizing the token sort failed");
    const size_t arr = ((size_t)n * sizeof(int32_t) + 255) & ~(size_t)255;
    unsigned char *buf = NULL;
    MOE_TRY(moe_cuda_scratch_alloc(c, 3 * arr + temp_bytes, "embedding_backward token sort", (void **)&buf));
    int32_t *pos_in = (int32_t *)buf, *tok_out = (int32_t *)(buf + arr), *pos_out = (int32_t *)(buf + 2 * arr);
    void *temp = buf + 3 * arr;
    iota_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(pos_in, n);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) /* stable: equal tokens keep position order */
        e = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tokens, tok_out, pos_in, pos_out, n, 0, 32, c->stream);
    if (e == cudaSuccess) {
        unsigned blocks = (unsigned)(n < 65535 * 4 ? n : 65535 * 4);
        int threads = C >= 256 ? 256 : (int)((C + 31) / 32 * 32);
        embedding_backward_kernel<<<blocks, threads, 0, c->stream>>>(dtable, dout, tok_out, pos_out, NT, C, V, scale,
                                                                    padding_idx, dt);
        e = cudaGetLastError();
    }
    moe_cuda_scratch_free(c, buf);
    MOE_CUDA_TRY(c, e);
    return MOE_OK;
}

/* --------------------------------------------------------- cross-entropy */

#define CE_THREADS 256
#define CE_MAX_NV 8 /* vector path: rows up to 1024 threads * 8 vectors */

/* (m, s) pairs of an online softmax: s = sum exp(x - m) */
static __device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2)
{
    float mn = fmaxf(m, m2);
    if (mn == -INFINITY) /* both empty */
        return;
    s = (m == -INFINITY ? 0.0f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mn));
    m = mn;
}

/* Combines the block's (m, s) pairs in a fixed order (warp shuffles, then
 * warp 0 over the warps) into the row's log-sum-exp, returned to every
 * thread. Thread 0 writes the row's loss, reading the target's logit before
 * the barrier after which the row may be overwritten. */
static __device__ float ce_row_lse(float m, float s, float *loss, const void *logits, int64_t base, int32_t t,
                                   int64_t V, moe_dtype dt)
{
    __shared__ float shm[32], shs[32];
    __shared__ float sh_lse;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        shm[warp] = m;
        shs[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        m = lane < nw ? shm[lane] : -INFINITY;
        s = lane < nw ? shs[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            float lse = m + logf(s);
            sh_lse = lse;
            *loss = (t >= 0 && t < V) ? lse - moe_cuda_ld(logits, dt, base + t) : __int_as_float(0x7fc00000);
        }
    }
    __syncthreads();
    return sh_lse;
}

static __global__ void cross_entropy_kernel(float *losses, void *logits, const int32_t *targets, int64_t N, int64_t V,
                                            int ignore_index, float grad_scale, moe_dtype dt)
{
    const int64_t r = blockIdx.x;
    const int32_t t = targets[r];
    const int64_t base = r * V;
    if (t == ignore_index) {
        if (threadIdx.x == 0)
            losses[r] = 0.0f;
        if (grad_scale != 0.0f)
            for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
                moe_cuda_st(logits, dt, base + j, 0.0f);
        return;
    }
    float m = -INFINITY, s = 0.0f;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        float x = moe_cuda_ld(logits, dt, base + j);
        if (x > m) {
            s = (m == -INFINITY ? 0.0f : s * expf(m - x)) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    const float lse = ce_row_lse(m, s, losses + r, logits, base, t, V, dt);
    if (grad_scale == 0.0f)
        return;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        float p = expf(moe_cuda_ld(logits, dt, base + j) - lse);
        moe_cuda_st(logits, dt, base + j, grad_scale * (j == t ? p - 1.0f : p));
    }
}

/* The same with the row held in registers, NV 16-byte vectors a thread (V %
 * (16 / sizeof(T)) == 0, V <= blockDim.x * NV * 16 / sizeof(T), logits
 * 16-byte aligned): the logits are read from memory once and written once,
 * 16 bytes an access, where the kernel above reads them twice, 2 bytes a
 * load. A thread takes the max of its values, then their sum of exponentials;
 * the combine across threads is the one above. */
template <typename T, int NV>
static __global__ void __launch_bounds__(1024)
    cross_entropy_vec_kernel(float *losses, T *logits, const int32_t *targets, int64_t V, int ignore_index,
                             float grad_scale, moe_dtype dt)
{
    constexpr int PER = 16 / (int)sizeof(T);
    const int64_t r = blockIdx.x;
    const int nv = (int)(V / PER);
    const int32_t t = targets[r];
    uint4 *row = (uint4 *)(logits + r * V);
    if (t == ignore_index) {
        if (threadIdx.x == 0)
            losses[r] = 0.0f;
        if (grad_scale != 0.0f)
#pragma unroll
            for (int k = 0; k < NV; k++)
                if ((int)threadIdx.x + k * (int)blockDim.x < nv)
                    row[threadIdx.x + k * blockDim.x] = make_uint4(0u, 0u, 0u, 0u);
        return;
    }
    uint4 u[NV];
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const int v = (int)threadIdx.x + k * (int)blockDim.x;
        u[k] = v < nv ? row[v] : make_uint4(0u, 0u, 0u, 0u);
    }
    auto each_value = [&](auto f) { /* f(x) for this thread's logits, in order */
#pragma unroll
        for (int k = 0; k < NV; k++) {
            const T *e = (const T *)&u[k];
            if ((int)threadIdx.x + k * (int)blockDim.x < nv)
#pragma unroll
                for (int q = 0; q < PER; q++)
                    f(moe_cuda_f32(e[q]));
        }
    };
    float m = -INFINITY, s = 0.0f;
    each_value([&](float x) { m = fmaxf(m, x); });
    if (m != -INFINITY) /* else the thread holds no value above -inf: an empty pair */
        each_value([&](float x) { s += expf(x - m); });
    const float lse = ce_row_lse(m, s, losses + r, logits, r * V, t, V, dt);
    if (grad_scale == 0.0f)
        return;
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const int v = (int)threadIdx.x + k * (int)blockDim.x;
        if (v >= nv)
            break;
        T *e = (T *)&u[k];
#pragma unroll
        for (int q = 0; q < PER; q++) {
            const float p = expf(moe_cuda_f32(e[q]) - lse);
            e[q] = moe_cuda_from_f32<T>(grad_scale * ((int64_t)v * PER + q == t ? p - 1.0f : p));
        }
        row[v] = u[k];
    }
}

template <typename T>
static void cross_entropy_vec(moe_ctx *c, unsigned rows, int threads, int nv, float *losses, void *logits,
                              const int32_t *targets, int64_t V, int ignore_index, float grad_scale, moe_dtype dt)
{
    T *lg = (T *)logits;
    switch (nv) {
    case 1:
        cross_entropy_vec_kernel<T, 1><<<rows, threads, 0, c->stream>>>(losses, lg, targets, V, ignore_index,
                                                                          grad_scale, dt);
        break;
    case 2:
        cross_entropy_vec_kernel<T, 2><<<rows, threads, 0, c->stream>>>(losses, lg, targets, V, ignore_index,
                                                                          grad_scale, dt);
        break;
    case 4:
        cross_entropy_vec_kernel<T, 4><<<rows, threads, 0, c->stream>>>(losses, lg, targets, V, ignore_index,
                                                                          grad_scale, dt);
        break;
    default:
        cross_entropy_vec_kernel<T, CE_MAX_NV><<<rows, threads, 0, c->stream>>>(losses, lg, targets, V, ignore_index,
                                                                                  grad_scale, dt);
        break;
    }
}

moe_status moe_cuda_cross_entropy(moe_ctx *c, float *losses, void *logits, const int32_t *targets, int64_t N,
                                  int64_t V, int ignore_index, float grad_scale, moe_dtype dt)
{
    MOE_TRY(check_float(c, "cross_entropy", dt, N));
    if (V < 1)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda cross_entropy: expected V >= 1, found %lld", (long long)V);
    const int64_t per = 16 / (int64_t)moe_dtype_size(dt), nvec = V / per;
    const bool vec = V % per == 0 && nvec <= 1024 * CE_MAX_NV && aligned16(logits);
    int nv = 1; /* vector path: vectors a thread, then the fewest warps that cover the row */
    while (vec && nvec > 1024 * nv)
        nv *= 2;
    const int threads = vec ? (int)(((nvec + nv - 1) / nv + 31) / 32 * 32) : CE_THREADS;
    for (int64_t r0 = 0; r0 < N; r0 += INT32_MAX) {
        const unsigned rows = (unsigned)(N - r0 < INT32_MAX ? N - r0 : INT32_MAX);
        void *lg = (char *)logits + r0 * V * moe_dtype_size(dt);
        if (vec && dt == MOE_F16)
            cross_entropy_vec<__half>(c, rows, threads, nv, losses + r0, lg, targets + r0, V, ignore_index,
                                      grad_scale, dt);
        else if (vec && dt == MOE_BF16)
            cross_entropy_vec<__nv_bfloat16>(c, rows, threads, nv, losses + r0, lg, targets + r0, V, ignore_index,
                                             grad_scale, dt);
        else if (vec)
            cross_entropy_vec<float>(c, rows, threads, nv, losses + r0, lg, targets + r0, V, ignore_index, grad_scale,
                                     dt);
        else
            cross_entropy_kernel<<<rows, threads, 0, c->stream>>>(losses + r0, lg, targets + r0, rows, V,
                                                                   ignore_index, grad_scale, dt);
        MOE_CUDA_CHECK_LAUNCH(c);
    }
    return MOE_OK;
}
