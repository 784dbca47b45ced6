/* matmul.cu: the cuda backend's GEMM and bias_backward.
 *
 * matmul goes to cuBLASLt whenever it takes the problem: fp32, fp16 and bf16
 * inputs with fp32 accumulation (CUBLAS_COMPUTE_32F, never TF32, so fp32
 * results stay within rounding of the cpu), C in the input dtype or fp32,
 * batched at the given strides, with the BIAS epilogue, and GELU_AUX_BIAS /
 * GELU_BIAS when the activation is the tanh GELU (cuBLASLt's GELU is tanh). An
 * erf GELU, a relu, an aux buffer cuBLASLt cannot write (leading dimension not
 * a multiple of 8) or a combination with no cuBLASLt algorithm takes the BIAS
 * epilogue writing the pre-activation (to aux, or C) and a separate activation
 * pass, or a plain tiled kernel; results are the same up to rounding. relu
 * never uses cuBLASLt's RELU_AUX_BIAS: its aux is a bitmask, not the
 * pre-activation that act_backward reads.
 *
 * Row-major to cuBLASLt's column-major: a row-major X(r,c) with leading
 * dimension ld is the column-major X^T(c,r) with the same ld, so
 * C^T(n,m) = op(B)^T op(A)^T: cuBLASLt's A is our B and its B is our A, each
 * keeping its own transpose flag; the bias runs along cuBLASLt's rows.
 *
 * bias_backward is a deterministic column sum: row chunks write fp32 partials,
 * then a second pass adds each column's partials in a fixed order (16 bytes
 * of a row a thread where the rows allow, the same order either way).
 */
#include <string.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/matmul.h"

#define TILE 16

/* ------------------------------------------------------- tiled fallback */

typedef struct gemm_params {
    int trans_a, trans_b;
    int64_t m, n, k;
    float alpha, beta;
    const void *a; int64_t lda, stride_a;
    const void *b; int64_t ldb, stride_b;
    void *c; int64_t ldc, stride_c;
    moe_dtype ab, cd;
    const void *bias; int64_t stride_bias;
    void *aux;
    int act; /* 0 none, else 1 + moe_act_kind */
} gemm_params;

static __global__ void gemm_tiled_kernel(gemm_params p, int64_t batch0)
{
    __shared__ float As[TILE][TILE + 1], Bs[TILE][TILE + 1];
    const int64_t bt = batch0 + blockIdx.z;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t i = (int64_t)blockIdx.y * TILE + ty, j = (int64_t)blockIdx.x * TILE + tx;
    const int64_t oa = bt * p.stride_a, ob = bt * p.stride_b, oc = bt * p.stride_c;
    float acc = 0.0f;
    for (int64_t k0 = 0; k0 < p.k; k0 += TILE) {
        int64_t ka = k0 + tx, kb = k0 + ty;
        /* A(i, ka) and B(kb, j) of op(A), op(B) */
        int64_t ia = (int64_t)blockIdx.y * TILE + ty;
        As[ty][tx] = (ia < p.m && ka < p.k)
                         ? moe_cuda_ld(p.a, p.ab, oa + (p.trans_a ? ka * p.lda + ia : ia * p.lda + ka))
                         : 0.0f;
        Bs[ty][tx] = (kb < p.k && j < p.n)
                         ? moe_cuda_ld(p.b, p.ab, ob + (p.trans_b ? j * p.ldb + kb : kb * p.ldb + j))
                         : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TILE; kk++)
            acc += As[ty][kk] * Bs[kk][tx];
        __syncthreads();
    }
    if (i >= p.m || j >= p.n)
        return;
    float v = p.alpha * acc;
    int64_t ci = oc + i * p.ldc + j;
    if (p.beta != 0.0f) /* beta == 0 never reads C */
        v += p.beta * moe_cuda_ld(p.c, p.cd, ci);
    if (p.bias != NULL)
        v += moe_cuda_ld(p.bias, p.cd, bt * p.stride_bias + j);
    if (p.act) {
        if (p.aux != NULL)
            moe_cuda_st(p.aux, p.cd, ci, v);
        v = moe_cuda_act(v, (moe_act_kind)(p.act - 1));
    }
    moe_cuda_st(p.c, p.cd, ci, v);
}

/* C = act(pre) over a strided batch of (m,n) matrices; pre may be C itself */
static __global__ void act_strided_kernel(void *c, const void *pre, moe_dtype dt, int64_t m, int64_t n, int64_t ld,
                                          int64_t stride, int64_t batch, moe_act_kind kind)
{
    int64_t total = batch * m * n;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t bt = e / (m * n), r = (e / n) % m, col = e % n;
        int64_t idx = bt * stride + r * ld + col;
        moe_cuda_st(c, dt, idx, moe_cuda_act(moe_cuda_ld(pre, dt, idx), kind));
    }
}

static moe_status gemm_fallback(moe_ctx *c, const moe_matmul_desc *d)
{
    gemm_params p;
    memset(&p, 0, sizeof p);
    p.trans_a = d->trans_a; p.trans_b = d->trans_b;
    p.m = d->m; p.n = d->n; p.k = d->k;
    p.alpha = d->alpha; p.beta = d->beta;
    p.a = d->a; p.lda = d->lda; p.stride_a = d->stride_a;
    p.b = d->b; p.ldb = d->ldb; p.stride_b = d->stride_b;
    p.c = d->c; p.ldc = d->ldc; p.stride_c = d->stride_c;
    p.ab = d->ab_dtype; p.cd = d->c_dtype;
    if (d->epilogue != MOE_EPI_NONE) {
        p.bias = d->bias;
        p.stride_bias = d->stride_bias;
    }
    if (d->epilogue == MOE_EPI_BIAS_ACT) {
        p.aux = d->aux;
        p.act = 1 + (int)d->act;
    }
    dim3 block(TILE, TILE);
    for (int64_t b0 = 0; b0 < d->batch; b0 += 65535) {
        int64_t nb = d->batch - b0 < 65535 ? d->batch - b0 : 65535;
        dim3 grid((unsigned)((d->n + TILE - 1) / TILE), (unsigned)((d->m + TILE - 1) / TILE), (unsigned)nb);
        gemm_tiled_kernel<<<grid, block, 0, c->stream>>>(p, b0);
        MOE_CUDA_CHECK_LAUNCH(c);
    }
    return MOE_OK;
}

/* ------------------------------------------------------------ cuBLASLt */

static cudaDataType_t lt_type(moe_dtype dt)
{
    return dt == MOE_F16 ? CUDA_R_16F : dt == MOE_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* Largest power of two (at most 256) dividing the address of every batch's
 * matrix: what cuBLASLt may assume about alignment. */
static uint32_t align_of(const void *p, int64_t stride_elems, size_t esize, int64_t batch)
{
    uint64_t x = (uint64_t)(uintptr_t)p | 256u;
    if (batch > 1)
        x |= (uint64_t)stride_elems * esize;
    return (uint32_t)(x & (~x + 1u));
}

#define LT_TRY(call)                                 \
    do {                                             \
        if ((call) != CUBLAS_STATUS_SUCCESS)         \
            goto done;                               \
    } while (0)

/* Runs d on cuBLASLt with the given epilogue; `out` receives the result
 * (C, or aux when the activation is done separately). *ran = 0 when cuBLASLt
 * has no algorithm for it (the caller falls back); an error only when a
 * chosen algorithm fails to run. */
static moe_status lt_matmul(moe_ctx *c, const moe_matmul_desc *d, cublasLtEpilogue_t epi, void *out, int *ran)
{
    *ran = 0;
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL, ld = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cublasStatus_t run = CUBLAS_STATUS_SUCCESS;
    const cudaDataType_t tab = lt_type(d->ab_dtype), tc = lt_type(d->c_dtype);
    const size_t eab = moe_dtype_size(d->ab_dtype), ec = moe_dtype_size(d->c_dtype);
    const cublasOperation_t opa = d->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t opb = d->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int32_t batch = (int32_t)d->batch;

    LT_TRY(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (epi != CUBLASLT_EPILOGUE_DEFAULT) {
        LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &d->bias, sizeof d->bias));
        if (d->batch > 1) {
            int64_t sb = d->stride_bias;
            LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &sb, sizeof sb));
        }
    }
    if (epi == CUBLASLT_EPILOGUE_GELU_AUX_BIAS) {
        int64_t aux_ld = d->ldc, aux_stride = d->stride_c;
        LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &d->aux, sizeof d->aux));
        LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof aux_ld));
        if (d->batch > 1)
            LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, &aux_stride,
                                                  sizeof aux_stride));
    }
    /* cuBLASLt A = our B, B = our A, D(n,m) = our C^T */
    LT_TRY(cublasLtMatrixLayoutCreate(&la, tab, d->trans_b ? d->k : d->n, d->trans_b ? d->n : d->k, d->ldb));
    LT_TRY(cublasLtMatrixLayoutCreate(&lb, tab, d->trans_a ? d->m : d->k, d->trans_a ? d->k : d->m, d->lda));
    LT_TRY(cublasLtMatrixLayoutCreate(&lc, tc, d->n, d->m, d->ldc));
    LT_TRY(cublasLtMatrixLayoutCreate(&ld, tc, d->n, d->m, d->ldc));
    if (d->batch > 1) {
        int64_t sa = d->stride_b, sbb = d->stride_a, sc = d->stride_c;
        LT_TRY(cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sa, sizeof sa));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(lb, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(lb, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sbb, sizeof sbb));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(lc, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(lc, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sc, sizeof sc));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(ld, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        LT_TRY(cublasLtMatrixLayoutSetAttribute(ld, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sc, sizeof sc));
    }
    {
        LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t ws = c->lt_workspace_bytes;
        uint32_t al_a = align_of(d->b, d->stride_b, eab, d->batch), al_b = align_of(d->a, d->stride_a, eab, d->batch);
        uint32_t al_c = align_of(d->c, d->stride_c, ec, d->batch), al_d = align_of(out, d->stride_c, ec, d->batch);
        LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
        LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a));
        LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b));
        LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c));
        LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof al_d));
        cublasLtMatmulHeuristicResult_t heur;
        int found = 0;
        memset(&heur, 0, sizeof heur);
        if (cublasLtMatmulAlgoGetHeuristic(c->lt, op, la, lb, lc, ld, pref, 1, &heur, &found) !=
                CUBLAS_STATUS_SUCCESS ||
            found < 1 || heur.state != CUBLAS_STATUS_SUCCESS)
            goto done;
        /* beta == 0: cuBLASLt does not read C, which may hold anything */
        run = cublasLtMatmul(c->lt, op, &d->alpha, d->b, la, d->a, lb, &d->beta, d->c, lc, out, ld, &heur.algo,
                             c->lt_workspace, c->lt_workspace_bytes, c->stream);
        *ran = 1;
    }
done:
    if (pref != NULL)
        cublasLtMatmulPreferenceDestroy(pref);
    if (ld != NULL)
        cublasLtMatrixLayoutDestroy(ld);
    if (lc != NULL)
        cublasLtMatrixLayoutDestroy(lc);
    if (lb != NULL)
        cublasLtMatrixLayoutDestroy(lb);
    if (la != NULL)
        cublasLtMatrixLayoutDestroy(la);
    if (op != NULL)
        cublasLtMatmulDescDestroy(op);
    if (*ran && run != CUBLAS_STATUS_SUCCESS)
        return moe_cuda_fail(c, MOE_ERR_BACKEND,
                             "cuda matmul: cublasLtMatmul failed with %s for m %lld, n %lld, k %lld, batch %lld "
                             "(%s x %s -> %s)",
                             cublasLtGetStatusString(run), (long long)d->m, (long long)d->n, (long long)d->k,
                             (long long)d->batch, moe_cuda_dtype_name(d->ab_dtype),
                             moe_cuda_dtype_name(d->ab_dtype), moe_cuda_dtype_name(d->c_dtype));
    return MOE_OK;
}

static int lt_supports(const moe_matmul_desc *d)
{
    if (d->k < 1 || d->batch > INT32_MAX)
        return 0;
    if (d->ab_dtype == MOE_F32)
        return d->c_dtype == MOE_F32;
    return d->c_dtype == d->ab_dtype || d->c_dtype == MOE_F32;
}

static moe_status act_pass(moe_ctx *c, const moe_matmul_desc *d, const void *pre)
{
    int64_t total = d->batch * d->m * d->n;
    act_strided_kernel<<<moe_cuda_blocks(c, total, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        d->c, pre, d->c_dtype, d->m, d->n, d->ldc, d->stride_c, d->batch, d->act);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_matmul(moe_ctx *c, const moe_matmul_desc *d)
{
    if (d == NULL || d->m < 0 || d->n < 0 || d->k < 0 || d->batch < 1 || !moe_cuda_is_float(d->ab_dtype) ||
        !moe_cuda_is_float(d->c_dtype))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda matmul: expected m, n, k >= 0, batch >= 1 and float dtypes, found m %lld, n %lld, "
                             "k %lld, batch %lld, %s x %s -> %s",
                             d ? (long long)d->m : -1LL, d ? (long long)d->n : -1LL, d ? (long long)d->k : -1LL,
                             d ? (long long)d->batch : -1LL, d ? moe_cuda_dtype_name(d->ab_dtype) : "?",
                             d ? moe_cuda_dtype_name(d->ab_dtype) : "?", d ? moe_cuda_dtype_name(d->c_dtype) : "?");
    if (d->epilogue != MOE_EPI_NONE && d->epilogue != MOE_EPI_BIAS && d->epilogue != MOE_EPI_BIAS_ACT)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda matmul: unknown epilogue %d; expected NONE, BIAS or BIAS_ACT",
                             (int)d->epilogue);
    if (d->epilogue != MOE_EPI_NONE && d->bias == NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda matmul: epilogue %s needs a bias, found NULL; pass the bias or use MOE_EPI_NONE",
                             d->epilogue == MOE_EPI_BIAS ? "BIAS" : "BIAS_ACT");
    if (d->epilogue == MOE_EPI_BIAS_ACT && d->beta != 0.0f)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda matmul: BIAS_ACT expects beta == 0 (C is overwritten with act(pre)), found beta %g",
                             (double)d->beta);
    if (d->epilogue == MOE_EPI_BIAS_ACT && d->act != MOE_ACT_GELU_TANH && d->act != MOE_ACT_GELU_ERF &&
        d->act != MOE_ACT_RELU)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda matmul: unknown activation kind %d; expected GELU_TANH, GELU_ERF or RELU",
                             (int)d->act);
    if (d->m == 0 || d->n == 0)
        return MOE_OK;
    const int has_bias = d->epilogue != MOE_EPI_NONE && d->bias != NULL;
    if (lt_supports(d)) {
        int ran = 0;
        if (d->epilogue == MOE_EPI_BIAS_ACT) {
            if (d->act == MOE_ACT_GELU_TANH && has_bias && (d->aux == NULL || (d->ldc % 8 == 0 && (d->batch == 1 ||
                                                                            d->stride_c % 8 == 0)))) {
                cublasLtEpilogue_t e = d->aux != NULL ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS;
                MOE_TRY(lt_matmul(c, d, e, d->c, &ran));
                if (ran)
                    return MOE_OK;
            }
            /* erf GELU, relu, or what cuBLASLt's GELU epilogue did not take: the
             * pre-activation into aux (or C), then the activation as its own pass */
            void *pre = d->aux != NULL ? d->aux : d->c;
            MOE_TRY(lt_matmul(c, d, has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, pre, &ran));
            if (ran)
                return act_pass(c, d, pre);
        } else {
            MOE_TRY(lt_matmul(c, d, has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, d->c, &ran));
            if (ran)
                return MOE_OK;
        }
    }
    return gemm_fallback(c, d);
}

/* ------------------------------------------------------- bias backward */

#define BB_COLS 32
#define BB_ROWS 8

/* partial[r*C + col] = sum of dy over rows of chunk r, in a fixed order */
static __global__ void bias_partial_kernel(float *partial, const void *dy, moe_dtype dt, int64_t N, int64_t C,
                                           int64_t rows_per)
{
    __shared__ float sh[BB_ROWS][BB_COLS + 1];
    int64_t col = (int64_t)blockIdx.x * BB_COLS + threadIdx.x;
    int64_t r0 = (int64_t)blockIdx.y * rows_per, r1 = r0 + rows_per < N ? r0 + rows_per : N;
    float s = 0.0f;
    if (col < C)
        for (int64_t r = r0 + threadIdx.y; r < r1; r += BB_ROWS)
            s += moe_cuda_ld(dy, dt, r * C + col);
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < C) {
        float t = 0.0f;
        for (int y = 0; y < BB_ROWS; y++)
            t += sh[y][threadIdx.x];
        partial[blockIdx.y * C + col] = t;
    }
}

/* The same for C % (16 / sizeof(T)) == 0 and 16-byte aligned dy: a thread
 * sums 16 bytes of columns a row (one 2-byte column a thread keeps too few
 * bytes in flight to stream), each column in the order above. */
template <typename T>
static __global__ void bias_partial_vec_kernel(float *partial, const T *dy, int64_t N, int64_t C, int64_t rows_per)
{
    constexpr int PER = 16 / (int)sizeof(T);
    __shared__ float sh[BB_ROWS][BB_COLS * PER + 1];
    const int64_t cv = (int64_t)blockIdx.x * BB_COLS + threadIdx.x, nv = C / PER; /* this thread's vector */
    const int64_t r0 = (int64_t)blockIdx.y * rows_per, r1 = r0 + rows_per < N ? r0 + rows_per : N;
    float s[PER];
#pragma unroll
    for (int k = 0; k < PER; k++)
        s[k] = 0.0f;
    if (cv < nv)
#pragma unroll 4
        for (int64_t r = r0 + threadIdx.y; r < r1; r += BB_ROWS) {
            const uint4 u = ((const uint4 *)(dy + r * C))[cv];
            const T *e = (const T *)&u;
#pragma unroll
            for (int k = 0; k < PER; k++)
                s[k] += moe_cuda_f32(e[k]);
        }
#pragma unroll
    for (int k = 0; k < PER; k++)
        sh[threadIdx.y][threadIdx.x * PER + k] = s[k];
    __syncthreads();
    for (int i = threadIdx.y * BB_COLS + threadIdx.x; i < BB_COLS * PER; i += BB_COLS * BB_ROWS) {
        const int64_t col = (int64_t)blockIdx.x * BB_COLS * PER + i;
        if (col >= C)
            break;
        float t = 0.0f;
        for (int y = 0; y < BB_ROWS; y++)
            t += sh[y][i];
        partial[blockIdx.y * C + col] = t;
    }
}

/* dbias[col] += sum over chunks r of partial[r*C + col]: a block of BB_COLS
 * columns x BB_ROWS groups, group y adding chunks y, y+BB_ROWS, ..., then the
 * group sums added in order (a fixed order, with every SM busy) */
static __global__ void bias_final_kernel(void *dbias, moe_dtype dt, const float *partial, int64_t R, int64_t C)
{
    __shared__ float sh[BB_ROWS][BB_COLS + 1];
    const int64_t col = (int64_t)blockIdx.x * BB_COLS + threadIdx.x;
    float s = 0.0f;
    if (col < C)
        for (int64_t r = threadIdx.y; r < R; r += BB_ROWS)
            s += partial[r * C + col];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y != 0 || col >= C)
        return;
    for (int y = 1; y < BB_ROWS; y++)
        s += sh[y][threadIdx.x];
    moe_cuda_st(dbias, dt, col, moe_cuda_ld(dbias, dt, col) + s);
}

moe_status moe_cuda_bias_backward(moe_ctx *c, void *dbias, const void *dy, int64_t N, int64_t C, moe_dtype dt)
{
    if (!moe_cuda_is_float(dt) || N < 0 || C < 0)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda bias_backward: expected a float dtype and N, C >= 0, found %s, N %lld, C %lld",
                             moe_cuda_dtype_name(dt), (long long)N, (long long)C);
    if (N == 0 || C == 0)
        return MOE_OK;
    int64_t R = (N + 127) / 128;
    if (R > 64)
        R = 64;
    int64_t rows_per = (N + R - 1) / R;
    R = (N + rows_per - 1) / rows_per;
    float *partial = NULL;
    MOE_TRY(moe_cuda_scratch_alloc(c, (uint64_t)(R * C) * sizeof(float), "bias_backward partials", (void **)&partial));
    const int64_t per = 16 / (int64_t)moe_dtype_size(dt), nv = C / per;
    const bool vec = C % per == 0 && (uintptr_t)dy % 16u == 0;
    const dim3 block(BB_COLS, BB_ROWS);
    const unsigned col_blocks = (unsigned)((C + BB_COLS - 1) / BB_COLS);
    const dim3 vgrid((unsigned)((nv + BB_COLS - 1) / BB_COLS), (unsigned)R);
    if (vec && dt == MOE_BF16)
        bias_partial_vec_kernel<__nv_bfloat16><<<vgrid, block, 0, c->stream>>>(partial, (const __nv_bfloat16 *)dy, N,
                                                                                 C, rows_per);
    else if (vec && dt == MOE_F16)
        bias_partial_vec_kernel<__half><<<vgrid, block, 0, c->stream>>>(partial, (const __half *)dy, N, C, rows_per);
    else if (vec)
        bias_partial_vec_kernel<float><<<vgrid, block, 0, c->stream>>>(partial, (const float *)dy, N, C, rows_per);
    else
        bias_partial_kernel<<<dim3(col_blocks, (unsigned)R), block, 0, c->stream>>>(partial, dy, dt, N, C, rows_per);
    cudaError_t e1 = cudaGetLastError();
    if (e1 == cudaSuccess)
        bias_final_kernel<<<col_blocks, block, 0, c->stream>>>(dbias, dt, partial, R, C);
    moe_cuda_scratch_free(c, partial);
    MOE_CUDA_TRY(c, e1);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}
