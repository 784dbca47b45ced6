/* optim.cu: the cuda backend's Adam and SGD steps on one tensor, the same
 * arithmetic as kernels/cpu/optim.c (fairseq's FusedAdamV1, FAIRSEQ_SPEC.md
 * §5.2; torch SGD as fairseq uses it).
 *
 * Not here: multi-tensor batching, clipping, overflow checks; the optimizer
 * plugin decides what one tensor is.
 *
 * Conventions:
 *  - Every product and sum goes through __fmul_rn/__fadd_rn (no FMA
 *    contraction) and divisions and sqrtf are IEEE, so a step rounds exactly
 *    as the cpu's does.
 *  - fp16 moments (--fp16-adam-stats): pass 1 updates the parameter and
 *    reduces max|m|, max|v| per block (NaN sticky, like torch.norm(inf));
 *    a one-block kernel folds the block maxima into the new scales, keeping
 *    the old ones aside; pass 2 recomputes the same moments (bit-identical)
 *    and stores them against the new scales. Maxima are order-independent,
 *    so the result does not depend on the grid.
 *  - fp32 moments with every pointer 16-byte aligned (the flat buffers) take
 *    a templated kernel per (param, copy, grad) dtype: eight elements per
 *    thread through 16-byte loads and stores, the same per-element arithmetic
 *    (adam_elem) as the generic kernel, so results are bit-identical.
 */
#include <type_traits>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/optim.h"

#define OPT_THREADS 256
#define OPT_MAX_BLOCKS 1024
#define FP16_MAX 65504.0f

static int storage_ok(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F16 || dt == MOE_BF16; }

static __device__ __forceinline__ float nan_max(float a, float b)
{
    if (isnan(a))
        return a;
    if (isnan(b))
        return b;
    return b > a ? b : a;
}

static __device__ __forceinline__ float block_nan_max(float v, float *sh)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1)
        v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

typedef struct adam_k {
    int64_t n;
    void *param; moe_dtype param_dtype;
    void *param_copy; moe_dtype copy_dtype;
    const void *grad; moe_dtype grad_dtype;
    void *exp_avg; void *exp_avg_sq; moe_dtype state_dtype;
    float beta1, beta2, eps, wd, grad_scale, step_size;
} adam_k;

static __device__ __forceinline__ void adam_moments(const adam_k &a, int64_t i, float sm, float sv, float *m_out,
                                                    float *v_out)
{
    float g = moe_cuda_ld(a.grad, a.grad_dtype, i) / a.grad_scale;
    float m = __fmul_rn(moe_cuda_ld(a.exp_avg, a.state_dtype, i), sm);
    float v = __fmul_rn(moe_cuda_ld(a.exp_avg_sq, a.state_dtype, i), sv);
    *m_out = __fadd_rn(__fmul_rn(a.beta1, m), __fmul_rn(__fsub_rn(1.0f, a.beta1), g));
    *v_out = __fadd_rn(__fmul_rn(a.beta2, v), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, a.beta2), g), g));
}

/* one element of the fp32-moment step from its loaded values: the same
 * operations, in the same order, as adam_moments + adam_update_kernel with
 * unit moment scales */
static __device__ __forceinline__ void adam_elem(const adam_k &a, float graw, float *m, float *v, float *p)
{
    const float g = graw / a.grad_scale;
    const float m0 = __fmul_rn(*m, 1.0f), v0 = __fmul_rn(*v, 1.0f);
    *m = __fadd_rn(__fmul_rn(a.beta1, m0), __fmul_rn(__fsub_rn(1.0f, a.beta1), g));
    *v = __fadd_rn(__fmul_rn(a.beta2, v0), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, a.beta2), g), g));
    const float update = __fadd_rn(*m / __fadd_rn(sqrtf(*v), a.eps), __fmul_rn(a.wd, *p));
    *p = __fsub_rn(*p, __fmul_rn(a.step_size, update));
}

/* 8 consecutive elements as floats through 16-byte accesses (index i8 counts
 * groups of 8; the pointer is 16-byte aligned) */
template <typename T> static __device__ __forceinline__ void ld8(const void *p, int64_t i8, float f[8])
{
    if (sizeof(T) == 4) {
        const float4 a = ((const float4 *)p)[2 * i8], b = ((const float4 *)p)[2 * i8 + 1];
        f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
        f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    } else {
        uint4 r = ((const uint4 *)p)[i8];
        const T *e = (const T *)&r;
#pragma unroll
        for (int k = 0; k < 8; k++)
            f[k] = moe_cuda_f32(e[k]);
    }
}

template <typename T> static __device__ __forceinline__ void st8(void *p, int64_t i8, const float f[8])
{
    if (sizeof(T) == 4) {
        ((float4 *)p)[2 * i8] = make_float4(f[0], f[1], f[2], f[3]);
        ((float4 *)p)[2 * i8 + 1] = make_float4(f[4], f[5], f[6], f[7]);
    } else {
        uint4 r;
        T *e = (T *)&r;
#pragma unroll
        for (int k = 0; k < 8; k++)
            e[k] = moe_cuda_from_f32<T>(f[k]);
        ((uint4 *)p)[i8] = r;
    }
}

struct adam_no_copy {}; /* CT of adam_vec_kernel when there is no parameter copy */

/* fp32 moments, every pointer 16-byte aligned: groups of 8 elements, then a
 * scalar tail (n % 8 elements) done by the first threads */
template <typename PT, typename CT, typename GT>
static __global__ void __launch_bounds__(OPT_THREADS) adam_vec_kernel(adam_k a)
{
    const int64_t n8 = a.n / 8;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i8 = first; i8 < n8; i8 += stride) {
        float p[8], g[8], m[8], v[8];
        ld8<GT>(a.grad, i8, g);
        ld8<float>(a.exp_avg, i8, m);
        ld8<float>(a.exp_avg_sq, i8, v);
        ld8<PT>(a.param, i8, p);
#pragma unroll
        for (int k = 0; k < 8; k++)
            adam_elem(a, g[k], &m[k], &v[k], &p[k]);
        st8<PT>(a.param, i8, p);
        if (!std::is_same<CT, adam_no_copy>::value)
            st8<typename std::conditional<std::is_same<CT, adam_no_copy>::value, float, CT>::type>(a.param_copy, i8,
                                                                                                    p);
        st8<float>(a.exp_avg, i8, m);
        st8<float>(a.exp_avg_sq, i8, v);
    }
    for (int64_t i = 8 * n8 + first; i < a.n; i += stride) {
        float m = ((const float *)a.exp_avg)[i], v = ((const float *)a.exp_avg_sq)[i];
        float p = moe_cuda_ld(a.param, a.param_dtype, i);
        adam_elem(a, moe_cuda_ld(a.grad, a.grad_dtype, i), &m, &v, &p);
        moe_cuda_st(a.param, a.param_dtype, i, p);
        if (a.param_copy != NULL)
            moe_cuda_st(a.param_copy, a.copy_dtype, i, p);
        ((float *)a.exp_avg)[i] = m;
        ((float *)a.exp_avg_sq)[i] = v;
    }
}

typedef void (*adam_vec_fn)(adam_k);

template <typename PT, typename CT> static adam_vec_fn adam_vec_pick_grad(moe_dtype g)
{
    return g == MOE_BF16 ? adam_vec_kernel<PT, CT, __nv_bfloat16>
           : g == MOE_F16 ? adam_vec_kernel<PT, CT, __half>
                          : adam_vec_kernel<PT, CT, float>;
}

template <typename PT> static adam_vec_fn adam_vec_pick_copy(const adam_k &k)
{
    if (k.param_copy == NULL)
        return adam_vec_pick_grad<PT, adam_no_copy>(k.grad_dtype);
    return k.copy_dtype == MOE_BF16 ? adam_vec_pick_grad<PT, __nv_bfloat16>(k.grad_dtype)
           : k.copy_dtype == MOE_F16 ? adam_vec_pick_grad<PT, __half>(k.grad_dtype)
                                     : adam_vec_pick_grad<PT, float>(k.grad_dtype);
}

static adam_vec_fn adam_vec_pick(const adam_k &k)
{
    return k.param_dtype == MOE_BF16 ? adam_vec_pick_copy<__nv_bfloat16>(k)
           : k.param_dtype == MOE_F16 ? adam_vec_pick_copy<__half>(k)
                                      : adam_vec_pick_copy<float>(k);
}

static bool aligned16(const void *p) { return p == NULL || (uintptr_t)p % 16u == 0; }

/* scales: the per-tensor scale pointers, or NULL for fp32 moments;
 * partial: 2 floats per block (max|m|, max|v|) when fp16 */
static __global__ void adam_update_kernel(adam_k a, const float *scale_m, const float *scale_v, float *partial)
{
    __shared__ float sh[32];
    const bool fp16_state = scale_m != NULL;
    const float sm = fp16_state ? *scale_m : 1.0f, sv = fp16_state ? *scale_v : 1.0f;
    float max_m = 0.0f, max_v = 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.n; i += (int64_t)gridDim.x * blockDim.x) {
        float m, v;
        adam_moments(a, i, sm, sv, &m, &v);
        float p = moe_cuda_ld(a.param, a.param_dtype, i);
        float update = __fadd_rn(m / __fadd_rn(sqrtf(v), a.eps), __fmul_rn(a.wd, p));
        p = __fsub_rn(p, __fmul_rn(a.step_size, update));
        moe_cuda_st(a.param, a.param_dtype, i, p);
        if (a.param_copy != NULL)
            moe_cuda_st(a.param_copy, a.copy_dtype, i, p);
        if (fp16_state) {
            max_m = nan_max(max_m, fabsf(m));
            max_v = nan_max(max_v, fabsf(v));
        } else {
            ((float *)a.exp_avg)[i] = m;
            ((float *)a.exp_avg_sq)[i] = v;
        }
    }
    if (!fp16_state)
        return;
    max_m = block_nan_max(max_m, sh);
    max_v = block_nan_max(max_v, sh);
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = max_m;
        partial[2 * blockIdx.x + 1] = max_v;
    }
}

/* one block: new scales from the block maxima; old ones kept in saved[0..1] */
static __global__ void adam_scales_kernel(const float *partial, int np, float *scale_m, float *scale_v, float *saved)
{
    __shared__ float sh[32];
    float mm = 0.0f, mv = 0.0f;
    for (int i = threadIdx.x; i < np; i += blockDim.x) {
        mm = nan_max(mm, partial[2 * i]);
        mv = nan_max(mv, partial[2 * i + 1]);
    }
    mm = block_nan_max(mm, sh);
    mv = block_nan_max(mv, sh);
    if (threadIdx.x == 0) {
        saved[0] = *scale_m;
        saved[1] = *scale_v;
        float nm = __fadd_rn(1e-8f, mm / FP16_MAX), nv = __fadd_rn(1e-8f, mv / FP16_MAX);
        saved[2] = nm;
        saved[3] = nv;
        *scale_m = nm;
        *scale_v = nv;
    }
}

static __global__ void adam_store_fp16_kernel(adam_k a, const float *saved)
{
    const float sm = saved[0], sv = saved[1], nm = saved[2], nv = saved[3];
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.n; i += (int64_t)gridDim.x * blockDim.x) {
        float m, v;
        adam_moments(a, i, sm, sv, &m, &v);
        ((__half *)a.exp_avg)[i] = __float2half_rn(m / nm);
        ((__half *)a.exp_avg_sq)[i] = __float2half_rn(v / nv);
    }
}

moe_status moe_cuda_adam_step(moe_ctx *c, const moe_adam_args *a)
{
    if (a->n < 0)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda adam_step: expected n >= 0, got %lld", (long long)a->n);
    if (a->n == 0)
        return MOE_OK;
    if (!a->param || !a->grad || !a->exp_avg || !a->exp_avg_sq)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda adam_step: param, grad, exp_avg and exp_avg_sq must all be non-NULL for %lld "
                             "elements",
                             (long long)a->n);
    if (!storage_ok(a->param_dtype) || !storage_ok(a->grad_dtype) || (a->param_copy && !storage_ok(a->copy_dtype)))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda adam_step: parameters, copies and gradients must be fp32, fp16 or bf16 (dtypes "
                             "%d/%d/%d)",
                             (int)a->param_dtype, (int)a->copy_dtype, (int)a->grad_dtype);
    if (a->state_dtype != MOE_F32 && a->state_dtype != MOE_F16)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda adam_step: moments must be fp32 or fp16 (--fp16-adam-stats), got dtype %d",
                             (int)a->state_dtype);
    const int fp16_state = a->state_dtype == MOE_F16;
    if (fp16_state && (!a->scale_avg || !a->scale_avg_sq))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda adam_step: fp16 moments need their two per-tensor scales; got NULL scale pointers");
    if (a->step < 1)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda adam_step: step counts successful updates from 1; got %lld",
                             (long long)a->step);
    if (!(a->grad_scale != 0.0f))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda adam_step: grad_scale divides the gradients; got %g",
                             (double)a->grad_scale);

    /* as the cpu (apex): bias corrections in double from float betas, then float */
    const float bc1 = (float)(1.0 - pow((double)a->beta1, (double)a->step));
    const float bc2 = (float)(1.0 - pow((double)a->beta2, (double)a->step));
    adam_k k;
    k.n = a->n;
    k.param = a->param; k.param_dtype = a->param_dtype;
    k.param_copy = a->param_copy; k.copy_dtype = a->copy_dtype;
    k.grad = a->grad; k.grad_dtype = a->grad_dtype;
    k.exp_avg = a->exp_avg; k.exp_avg_sq = a->exp_avg_sq; k.state_dtype = a->state_dtype;
    k.beta1 = a->beta1; k.beta2 = a->beta2; k.eps = a->eps; k.wd = a->weight_decay; k.grad_scale = a->grad_scale;
    k.step_size = a->lr * sqrtf(bc2) / bc1;

    if (!fp16_state && aligned16(k.param) && aligned16(k.param_copy) && aligned16(k.grad) && aligned16(k.exp_avg) &&
        aligned16(k.exp_avg_sq)) {
        const adam_vec_fn fn = adam_vec_pick(k);
        fn<<<moe_cuda_blocks(c, a->n / 8 > 0 ? a->n / 8 : a->n, OPT_THREADS), OPT_THREADS, 0, c->stream>>>(k);
        MOE_CUDA_CHECK_LAUNCH(c);
        return MOE_OK;
    }
    int64_t nb = (a->n + OPT_THREADS - 1) / OPT_THREADS;
    unsigned blocks = (unsigned)(nb > OPT_MAX_BLOCKS ? OPT_MAX_BLOCKS : nb);
    float *partial = c->scratch, *saved = c->scratch + 2 * OPT_MAX_BLOCKS;
    adam_update_kernel<<<blocks, OPT_THREADS, 0, c->stream>>>(k, fp16_state ? a->scale_avg : NULL,
                                                              fp16_state ? a->scale_avg_sq : NULL, partial);
    MOE_CUDA_CHECK_LAUNCH(c);
    if (!fp16_state)
        return MOE_OK;
    adam_scales_kernel<<<1, OPT_THREADS, 0, c->stream>>>(partial, (int)blocks, a->scale_avg, a->scale_avg_sq, saved);
    MOE_CUDA_CHECK_LAUNCH(c);
    adam_store_fp16_kernel<<<blocks, OPT_THREADS, 0, c->stream>>>(k, saved);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

typedef struct sgd_k {
    int64_t n;
    void *param; moe_dtype param_dtype;
    void *param_copy; moe_dtype copy_dtype;
    const void *grad; moe_dtype grad_dtype;
    float *buf;
    float lr, momentum, wd, grad_scale;
} sgd_k;

static __global__ void sgd_kernel(sgd_k a)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.n; i += (int64_t)gridDim.x * blockDim.x) {
        float p = moe_cuda_ld(a.param, a.param_dtype, i);
        float d = moe_cuda_ld(a.grad, a.grad_dtype, i) / a.grad_scale;
        if (a.wd != 0.0f)
            d = __fadd_rn(d, __fmul_rn(a.wd, p));
        if (a.momentum != 0.0f) {
            float b = __fadd_rn(__fmul_rn(a.momentum, a.buf[i]), d);
            a.buf[i] = b;
            d = b;
        }
        p = __fsub_rn(p, __fmul_rn(a.lr, d));
        moe_cuda_st(a.param, a.param_dtype, i, p);
        if (a.param_copy != NULL)
            moe_cuda_st(a.param_copy, a.copy_dtype, i, p);
    }
}

moe_status moe_cuda_sgd_step(moe_ctx *c, const moe_sgd_args *a)
{
    if (a->n < 0)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda sgd_step: expected n >= 0, got %lld", (long long)a->n);
    if (a->n == 0)
        return MOE_OK;
    if (!a->param || !a->grad)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda sgd_step: param and grad must be non-NULL for %lld elements",
                             (long long)a->n);
    if (!storage_ok(a->param_dtype) || !storage_ok(a->grad_dtype) || (a->param_copy && !storage_ok(a->copy_dtype)))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda sgd_step: parameters, copies and gradients must be fp32, fp16 or bf16 (dtypes "
                             "%d/%d/%d)",
                             (int)a->param_dtype, (int)a->copy_dtype, (int)a->grad_dtype);
    if (a->momentum != 0.0f && !a->momentum_buf)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda sgd_step: momentum %g needs a momentum buffer of %lld fp32 values; got NULL",
                             (double)a->momentum, (long long)a->n);
    if (!(a->grad_scale != 0.0f))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda sgd_step: grad_scale divides the gradients; got %g",
                             (double)a->grad_scale);
    sgd_k k;
    k.n = a->n;
    k.param = a->param; k.param_dtype = a->param_dtype;
    k.param_copy = a->param_copy; k.copy_dtype = a->copy_dtype;
    k.grad = a->grad; k.grad_dtype = a->grad_dtype;
    k.buf = a->momentum_buf;
    k.lr = a->lr; k.momentum = a->momentum; k.wd = a->weight_decay; k.grad_scale = a->grad_scale;
    sgd_kernel<<<moe_cuda_blocks(c, a->n, OPT_THREADS), OPT_THREADS, 0, c->stream>>>(k);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}
