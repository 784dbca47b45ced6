/* decode.cu: the decoding ops of the cuda backend (ops.h, "decoding";
 * kernels/cpu/decode.c is the reference): embedding at given positions, the
 * row-wise Linear, attention against a per-row K/V cache, the no-drop top-k
 * gate, the experts of the routed tokens, and the logits statistics.
 *
 * What shapes them: a decoding step at batch 1 multiplies one token by every
 * weight it needs, so the time is the time to stream those weights once from
 * HBM. The products are therefore GEMVs written for bandwidth, not tensor-core
 * GEMMs: each warp owns RW output rows and streams them with 16-byte loads,
 * several in flight per lane, against the input rows staged once per block in
 * shared memory (as fp32, after the fused LayerNorm). Everything a layer does
 * around a product (LayerNorm before; bias, q scale, activation, residual
 * add after) happens in the same kernel, so a transformer layer is 5 launches
 * (k|v|q, attention, out, fc1, fc2) and a MoE layer 6 (gate, expert fc1,
 * expert fc2+combine instead of fc1, fc2), few enough to replay as one CUDA
 * graph per step.
 *
 * Conventions a reader would trip over:
 *  - Blocks take the input rows in groups of at most DEC_MROWS (grid.y): a
 *    step with more rows re-reads the weights once per group. Decoding runs
 *    its larger steps (prefill) through the training ops instead.
 *  - A fused LayerNorm needs a whole row in shared memory (its statistics are
 *    two passes in double, as layernorm_forward's): the group shrinks until
 *    it fits (launch_rows).
 *  - No atomics: every sum has one owner and a fixed order; the expert
 *    combine is done by the block that owns the output rows, after it has
 *    computed every expert's contribution to them.
 *  - Values the cpu checks on the host (cache lengths, expert ids) live in
 *    device memory here and are trusted, as route.cu trusts its slots.
 */
#include <cfloat>
#include <cstring>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/decode.h"
#include "kernels/route_common.h"

#define DEC_THREADS 256
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_MROWS 8                 /* input rows a block multiplies at once */
#define DEC_SMEM_MAX (96 * 1024)    /* shared memory a product kernel may take */
#define DEC_VEC_LOADS 8             /* 16-byte weight loads in flight per lane */

/* ------------------------------------------------------------- helpers */

template <typename T> static __device__ __forceinline__ float round_t(float v)
{
    return moe_cuda_f32(moe_cuda_from_f32<T>(v));
}

/* elements of T in one 16-byte load */
template <typename T> struct vec_elems { static constexpr int n = 16 / (int)sizeof(T); };

/* a 16-byte vector of T widened to fp32 */
static __device__ __forceinline__ void widen(const uint4 &r, float *out, float)
{
    out[0] = __uint_as_float(r.x);
    out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z);
    out[3] = __uint_as_float(r.w);
}
static __device__ __forceinline__ void widen(const uint4 &r, float *out, __half)
{
    const __half2 *h = (const __half2 *)&r;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}
static __device__ __forceinline__ void widen(const uint4 &r, float *out, __nv_bfloat16)
{
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&r;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

/* weights are read once per step: through the read-only path, not kept in L1 */
static __device__ __forceinline__ uint4 ld_stream(const void *p)
{
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

static __host__ __device__ __forceinline__ bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

template <typename T> static __device__ __forceinline__ float ld_t(const void *p, int64_t i)
{
    return moe_cuda_f32(((const T *)p)[i]);
}

/* Stages columns [k0, k0 + kc) of input rows xrow[0..mm) (shared memory
 * pointers to rows of T) into xs (row stride kc) as fp32 and, with
 * layernorm (then k0 == 0 and kc is the whole row), normalizes them in
 * place: statistics in double as layernorm_forward (warp i owns row i), the
 * result rounded to T as layernorm_forward stores it. Every thread calls it;
 * it ends with a barrier. */
template <typename T>
static __device__ void stage_rows_ln(float *xs, const T *const *xrow, int64_t k0, int mm, int64_t kc, int layernorm,
                                     const T *lnw, const T *lnb, float eps)
{
#pragma unroll 4
    for (int64_t e = threadIdx.x; e < (int64_t)mm * kc; e += blockDim.x) {
        const int i = (int)(e / kc);
        const int64_t q = e - (int64_t)i * kc;
        xs[e] = moe_cuda_f32(xrow[i][k0 + q]);
    }
    __syncthreads();
    if (!layernorm)
        return;
    __shared__ float s_mean[DEC_MROWS], s_rstd[DEC_MROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = warp; i < mm; i += blockDim.x >> 5) {
        const float *r = xs + (int64_t)i * kc;
        double s = 0.0;
        for (int64_t q = lane; q < kc; q += 32)
            s += (double)r[q];
        const double m = moe_cuda_warp_sum_d(s) / (double)kc;
        double v = 0.0;
        for (int64_t q = lane; q < kc; q += 32) {
            const double dd = (double)r[q] - m;
            v += dd * dd;
        }
        v = moe_cuda_warp_sum_d(v);
        if (lane == 0) {
            s_mean[i] = (float)m;
            s_rstd[i] = (float)(1.0 / sqrt(v / (double)kc + (double)eps));
        }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < (int64_t)mm * kc; e += blockDim.x) {
        const int i = (int)(e / kc);
        const int64_t q = e - (int64_t)i * kc;
        /* rounded step by step as the cpu does (no contraction into an FMA):
         * the result is rounded to T, where one ulp of fp32 can move it */
        float y = __fmul_rn(xs[e] - s_mean[i], s_rstd[i]);
        if (lnw != nullptr)
            y = __fmul_rn(y, moe_cuda_f32(lnw[q]));
        if (lnb != nullptr)
            y = __fadd_rn(y, moe_cuda_f32(lnb[q]));
        xs[e] = round_t<T>(y);
    }
    __syncthreads();
}

/* acc[r][i] += sum over q in [0, kc) of W[row0 + r][k0 + q] * xs[i][q] for
 * this lane's share of the columns (the caller reduces across the warp).
 * Rows at or past nrows contribute nothing. VEC: 16-byte loads (W's rows
 * and k0 aligned to them, kc a multiple of the vector); else scalar. */
template <typename T, int RW, bool VEC>
static __device__ __forceinline__ void warp_dots(float (&acc)[RW][DEC_MROWS], const T *W, int64_t ldw, int64_t row0,
                                                 int64_t nrows, int64_t k0, int64_t kc, const float *xs, int64_t ldxs,
                                                 int mm)
{
    const int lane = threadIdx.x & 31;
    if (VEC) {
        constexpr int VE = vec_elems<T>::n;
        constexpr int U = DEC_VEC_LOADS / RW > 0 ? DEC_VEC_LOADS / RW : 1;
        for (int64_t q0 = (int64_t)lane * VE; q0 < kc; q0 += (int64_t)32 * VE * U) {
            uint4 wv[RW][U];
#pragma unroll
            for (int r = 0; r < RW; r++)
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int64_t q = q0 + (int64_t)u * 32 * VE;
                    wv[r][u] = row0 + r < nrows && q < kc ? ld_stream(W + (row0 + r) * ldw + k0 + q)
                                                          : make_uint4(0u, 0u, 0u, 0u);
                }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int64_t q = q0 + (int64_t)u * 32 * VE;
                if (q >= kc)
                    break;
                float wf[RW][VE];
#pragma unroll
                for (int r = 0; r < RW; r++)
                    widen(wv[r][u], wf[r], T());
#pragma unroll
                for (int i = 0; i < DEC_MROWS; i++) {
                    if (i >= mm)
                        break;
                    const float *xp = xs + (int64_t)i * ldxs + q;
                    float xv[VE];
#pragma unroll
                    for (int x = 0; x < VE; x += 4) {
                        const float4 f = *(const float4 *)(xp + x);
                        xv[x] = f.x;
                        xv[x + 1] = f.y;
                        xv[x + 2] = f.z;
                        xv[x + 3] = f.w;
                    }
#pragma unroll
                    for (int r = 0; r < RW; r++)
#pragma unroll
                        for (int x = 0; x < VE; x++)
                            acc[r][i] += wf[r][x] * xv[x];
                }
            }
        }
    } else {
        for (int64_t q = lane; q < kc; q += 32) {
#pragma unroll
            for (int r = 0; r < RW; r++) {
                if (row0 + r >= nrows)
                    continue;
                const float w = moe_cuda_f32(W[(row0 + r) * ldw + k0 + q]);
#pragma unroll
                for (int i = 0; i < DEC_MROWS; i++)
                    if (i < mm)
                        acc[r][i] += w * xs[(int64_t)i * ldxs + q];
            }
        }
    }
}

/* warp_dots with the load width chosen at run time (the expert tables'
 * pointers are only known on the device) */
template <typename T, int RW>
static __device__ __forceinline__ void warp_dots_any(bool vec, float (&acc)[RW][DEC_MROWS], const T *W, int64_t ldw,
                                                     int64_t row0, int64_t nrows, int64_t k0, int64_t kc,
                                                     const float *xs, int64_t ldxs, int mm)
{
    if (vec)
        warp_dots<T, RW, true>(acc, W, ldw, row0, nrows, k0, kc, xs, ldxs, mm);
    else
        warp_dots<T, RW, false>(acc, W, ldw, row0, nrows, k0, kc, xs, ldxs, mm);
}

template <int RW> static __device__ __forceinline__ void zero_acc(float (&acc)[RW][DEC_MROWS])
{
#pragma unroll
    for (int r = 0; r < RW; r++)
#pragma unroll
        for (int i = 0; i < DEC_MROWS; i++)
            acc[r][i] = 0.0f;
}

/* every lane ends with the warp's sums */
template <int RW> static __device__ __forceinline__ void warp_reduce(float (&acc)[RW][DEC_MROWS], int mm)
{
#pragma unroll
    for (int r = 0; r < RW; r++)
#pragma unroll
        for (int i = 0; i < DEC_MROWS; i++)
            if (i < mm)
                acc[r][i] = moe_cuda_warp_sum(acc[r][i]);
}

/* RW (output rows per warp) for n outputs: enough blocks to keep every SM
 * streaming, as many rows per warp as that allows */
static int pick_rw(const moe_ctx *c, int64_t n)
{
    const int64_t want = 2 * (int64_t)(c->num_sms > 0 ? c->num_sms : 132);
    if ((n + 4 * DEC_WARPS - 1) / (4 * DEC_WARPS) >= want)
        return 4;
    if ((n + 2 * DEC_WARPS - 1) / (2 * DEC_WARPS) >= want)
        return 2;
    return 1;
}

/* rows per block group and the staged chunk: with a LayerNorm the whole row
 * (k) is staged, otherwise chunks of kc; 0 when a LayerNorm row cannot fit */
static void launch_rows(int64_t m, int64_t k, int layernorm, int *g, int64_t *kc)
{
    int64_t rows = m < DEC_MROWS ? m : DEC_MROWS;
    if (rows < 1)
        rows = 1;
    if (layernorm) {
        while (rows > 1 && rows * k * 4 > DEC_SMEM_MAX)
            rows--;
        *g = rows * k * 4 > DEC_SMEM_MAX ? 0 : (int)rows;
        *kc = k;
        return;
    }
    int64_t chunk = DEC_SMEM_MAX / (4 * rows);
    chunk -= chunk % 256;
    *g = (int)rows;
    *kc = k < chunk ? k : chunk;
}

/* Dynamic shared memory above 48 KiB must be allowed per kernel; *allowed
 * (a static of the launching template) remembers what was, so a step being
 * recorded into a graph makes no attribute call once an eager step ran. */
template <typename K> static moe_status smem_attr(moe_ctx *c, K kernel, size_t bytes, size_t *allowed)
{
    if (bytes > 48u * 1024u && bytes > *allowed) {
        MOE_CUDA_TRY(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        *allowed = bytes;
    }
    return MOE_OK;
}

#define DEC_DISPATCH_T(dt, CALL)                        \
    do {                                                \
        if ((dt) == MOE_F16)                            \
            CALL(__half);                               \
        else if ((dt) == MOE_BF16)                      \
            CALL(__nv_bfloat16);                        \
        else                                            \
            CALL(float);                                \
    } while (0)

/* ------------------------------------------------------------- embedding */

static __global__ void embedding_at_kernel(void *out, const int32_t *tokens, const int32_t *positions,
                                           const void *table, int64_t N, int64_t C, float scale, int padding_idx,
                                           int sinusoidal, float neg_e, moe_dtype dt)
{
    const int64_t half = C / 2;
    for (int64_t x = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; x < N * C; x += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = x / C, j = x % C;
        const int32_t tok = tokens[n];
        float v = tok >= 0 ? scale * moe_cuda_ld(table, dt, (int64_t)tok * C + j) : __int_as_float(0x7fc00000);
        if (sinusoidal && tok != padding_idx && j < 2 * half) {
            const float pos = (float)positions[n];
            const int64_t kk = j < half ? j : j - half;
            const float freq = expf((float)kk * neg_e);
            v += j < half ? sinf(pos * freq) : cosf(pos * freq);
        }
        moe_cuda_st(out, dt, x, v);
    }
}

moe_status moe_cuda_embedding_at_forward(moe_ctx *c, void *out, const int32_t *tokens, const int32_t *positions,
                                         const void *table, int64_t N, int64_t C, float scale, int padding_idx,
                                         int sinusoidal, moe_dtype dt)
{
    if (!moe_cuda_is_float(dt) || N < 0 || C < 1)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda embedding_at_forward: expected a float dtype, N >= 0 and C >= 1, found %s, N %lld, "
                             "C %lld",
                             moe_cuda_dtype_name(dt), (long long)N, (long long)C);
    const int64_t half = C / 2;
    if (sinusoidal && half < 2)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda embedding_at_forward: sinusoidal positions need C >= 4, found C %lld", (long long)C);
    if (N == 0)
        return MOE_OK;
    const float e = sinusoidal ? (float)(log(10000.0) / (double)(half - 1)) : 0.0f;
    embedding_at_kernel<<<moe_cuda_blocks(c, N * C, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(
        out, tokens, positions, table, N, C, scale, padding_idx, sinusoidal, -e, dt);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* ------------------------------------------------------------- rowlinear */

typedef struct rl_params {
    int64_t m, n, k, ldx, ldy, kc;
    int g;                       /* input rows per block group */
    const void *x;
    const int32_t *rows;
    int layernorm;
    const void *lnw, *lnb;
    float eps;
    const void *w, *bias;
    float q_scale;
    int64_t q_from;              /* first output scaled by q_scale (n: none) */
    int act;
    moe_act_kind act_kind;
    float beta;
    void *y;
    int y_f32;
} rl_params;

template <typename T, int RW, bool VEC>
static __global__ void __launch_bounds__(DEC_THREADS) rowlinear_kernel(rl_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [g][kc] */
    __shared__ const T *s_rows[DEC_MROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t m0 = (int64_t)blockIdx.y * p.g;
    const int mm = (int)(p.m - m0 < p.g ? p.m - m0 : p.g);
    const int64_t row0 = ((int64_t)blockIdx.x * DEC_WARPS + warp) * RW;
    if (threadIdx.x < mm) {
        const int64_t src = p.rows != nullptr ? (int64_t)p.rows[m0 + threadIdx.x] : m0 + threadIdx.x;
        s_rows[threadIdx.x] = (const T *)p.x + src * p.ldx;
    }
    __syncthreads();
    float acc[RW][DEC_MROWS];
    zero_acc<RW>(acc);
    const T *W = (const T *)p.w;
    for (int64_t k0 = 0; k0 < p.k; k0 += p.kc) {
        const int64_t kc = p.k - k0 < p.kc ? p.k - k0 : p.kc;
        if (k0 > 0)
            __syncthreads(); /* every warp is done with the previous chunk */
        /* a LayerNorm implies one chunk: kc == k */
        stage_rows_ln<T>(xs, s_rows, k0, mm, kc, p.layernorm, (const T *)p.lnw, (const T *)p.lnb, p.eps);
        warp_dots<T, RW, VEC>(acc, W, p.k, row0, p.n, k0, kc, xs, kc, mm);
    }
    warp_reduce<RW>(acc, mm);
#pragma unroll
    for (int r = 0; r < RW; r++) {
        const int64_t j = row0 + r;
#pragma unroll
        for (int i = 0; i < DEC_MROWS; i++) {
            if (i >= mm || j >= p.n || lane != (r * DEC_MROWS + i) % 32)
                continue;
            float v = acc[r][i];
            if (p.bias != nullptr)
                v += ld_t<T>(p.bias, j);
            if (j >= p.q_from)
                v *= p.q_scale;
            if (p.act)
                v = moe_cuda_act(v, p.act_kind);
            const int64_t o = (m0 + i) * p.ldy + j;
            if (p.y_f32) {
                float *y = (float *)p.y;
                y[o] = p.beta != 0.0f ? p.beta * y[o] + v : v;
            } else {
                T *y = (T *)p.y;
                v = round_t<T>(v);
                if (p.beta != 0.0f)
                    v = p.beta * moe_cuda_f32(y[o]) + v;
                y[o] = moe_cuda_from_f32<T>(v);
            }
        }
    }
}

template <typename T, int RW, bool VEC> static moe_status rowlinear_launch(moe_ctx *c, const rl_params &p)
{
    static size_t allowed = 0;
    const size_t smem = (size_t)p.g * (size_t)p.kc * sizeof(float);
    MOE_TRY(smem_attr(c, rowlinear_kernel<T, RW, VEC>, smem, &allowed));
    dim3 grid((unsigned)((p.n + (int64_t)DEC_WARPS * RW - 1) / ((int64_t)DEC_WARPS * RW)),
              (unsigned)((p.m + p.g - 1) / p.g));
    rowlinear_kernel<T, RW, VEC><<<grid, DEC_THREADS, smem, c->stream>>>(p);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

template <typename T> static moe_status rowlinear_typed(moe_ctx *c, const rl_params &p, int rw)
{
    constexpr int VE = vec_elems<T>::n;
    /* 16-byte loads need aligned rows, and chunks that keep them aligned */
    const bool vec = aligned16(p.w) && p.k % VE == 0 && p.kc % VE == 0;
    if (vec)
        return rw == 4 ? rowlinear_launch<T, 4, true>(c, p) : rw == 2 ? rowlinear_launch<T, 2, true>(c, p)
                                                                      : rowlinear_launch<T, 1, true>(c, p);
    return rw == 4 ? rowlinear_launch<T, 4, false>(c, p) : rw == 2 ? rowlinear_launch<T, 2, false>(c, p)
                                                                   : rowlinear_launch<T, 1, false>(c, p);
}

moe_status moe_cuda_rowlinear_forward(moe_ctx *c, const moe_rowlinear_desc *d)
{
    if (d == NULL || !moe_cuda_is_float(d->dt) || (d->y_dtype != d->dt && d->y_dtype != MOE_F32) || d->m < 0 ||
        d->n < 0 || d->k < 1 || d->ldy < d->n || (d->rows == NULL && d->ldx < d->k) || d->q_cols < 0 ||
        d->q_cols > d->n)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda rowlinear_forward: expected m, n >= 0, k >= 1, ldx >= k, ldy >= n, 0 <= q_cols <= n "
                             "and y dtype f32 or the storage dtype, found m %lld, n %lld, k %lld, ldx %lld, ldy %lld, "
                             "q_cols %lld",
                             d ? (long long)d->m : -1LL, d ? (long long)d->n : -1LL, d ? (long long)d->k : -1LL,
                             d ? (long long)d->ldx : -1LL, d ? (long long)d->ldy : -1LL,
                             d ? (long long)d->q_cols : -1LL);
    if (d->m == 0 || d->n == 0)
        return MOE_OK;
    rl_params p;
    memset(&p, 0, sizeof p);
    launch_rows(d->m, d->k, d->layernorm, &p.g, &p.kc);
    if (p.g == 0)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda rowlinear_forward: a LayerNorm over rows of %lld needs %lld bytes of shared memory, "
                             "above the %d this kernel takes; use layernorm_forward and matmul",
                             (long long)d->k, (long long)(d->k * 4), DEC_SMEM_MAX);
    if ((p.m = d->m) > 65535LL * p.g)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED, "cuda rowlinear_forward: %lld rows is too many; use matmul",
                             (long long)d->m);
    p.n = d->n;
    p.k = d->k;
    p.ldx = d->ldx;
    p.ldy = d->ldy;
    p.x = d->x;
    p.rows = d->rows;
    p.layernorm = d->layernorm;
    p.lnw = d->ln_weight;
    p.lnb = d->ln_bias;
    p.eps = d->ln_eps;
    p.w = d->w;
    p.bias = d->bias;
    p.q_scale = d->q_scale;
    p.q_from = d->n - d->q_cols;
    p.act = d->act;
    p.act_kind = d->act_kind;
    p.beta = d->beta;
    p.y = d->y;
    p.y_f32 = d->y_dtype == MOE_F32 && d->dt != MOE_F32 ? 1 : 0;
    const int rw = pick_rw(c, d->n);
#define RL_CALL(TT) return rowlinear_typed<TT>(c, p, rw)
    DEC_DISPATCH_T(d->dt, RL_CALL);
#undef RL_CALL
}

/* ------------------------------------------------------------- attention */

#define ATT_THREADS 256
#define ATT_BATCH 8   /* key (or value) loads a thread issues before using them */

/* One block per (row b, head h, new query j). Keys t < cache_len come from
 * the cache, newer ones from the step's own k and v. Vectorised path: TPK
 * threads per key, each VE dims with 16-byte loads; (ATT_THREADS / TPK)
 * keys per pass. Scalar path (other head sizes or alignments): one thread
 * per key for the scores, one per dim for the output. */
template <typename T>
static __global__ void __launch_bounds__(ATT_THREADS)
    attention_decode_kernel(T *out, const T *q, const T *k, const T *v, int64_t ld, T *k_cache, T *v_cache,
                            const int32_t *cache_len, const int32_t *n_new, int64_t n, int64_t H, int64_t D,
                            int64_t Tc, int tpk)
{
    constexpr int VE = vec_elems<T>::n;
    extern __shared__ __align__(16) float sm[];
    float *qs = sm, *red = qs + D, *sc = red + ATT_THREADS * VE; /* q, partial outputs, scores (Tc) */
    __shared__ float s_red[32];
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, j = blockIdx.y;
    const int tid = threadIdx.x;
    const int64_t cl = cache_len[b], nn = n_new[b];
    T *o = out + (b * n + j) * H * D + h * D;
    if (j >= nn) {
        for (int64_t x = tid; x < D; x += blockDim.x)
            o[x] = moe_cuda_from_f32<T>(0.0f);
        return;
    }
    const int64_t cbase = bh * Tc * D, L = cl + j + 1;
    const T *qrow = q + (b * n + j) * ld + h * D;
    for (int64_t x = tid; x < D; x += blockDim.x)
        qs[x] = moe_cuda_f32(qrow[x]);
    /* this query's own key and value join the cache for later steps (no
     * block of this launch reads cache positions >= cache_len) */
    for (int64_t x = tid; x < D; x += blockDim.x) {
        k_cache[cbase + (cl + j) * D + x] = k[(b * n + j) * ld + h * D + x];
        v_cache[cbase + (cl + j) * D + x] = v[(b * n + j) * ld + h * D + x];
    }
    __syncthreads();
#define KROW(t, buf, cache) ((t) < cl ? (cache) + cbase + (t) * D : (buf) + (b * n + (t) - cl) * ld + h * D)
    const int kpp = ATT_THREADS / tpk, g = tid / tpk, part = tid % tpk;
    if (tpk > 1) {
        /* scores: lanes of a key group sum their dims, then across the group;
         * ATT_BATCH passes' loads are issued before any is used */
        for (int64_t t0 = 0; t0 < L; t0 += (int64_t)kpp * ATT_BATCH) {
            uint4 kv[ATT_BATCH];
#pragma unroll
            for (int u = 0; u < ATT_BATCH; u++) {
                const int64_t t = t0 + (int64_t)u * kpp + g;
                kv[u] = t < L ? *(const uint4 *)(KROW(t, k, k_cache) + part * VE) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < ATT_BATCH; u++) {
                const int64_t t = t0 + (int64_t)u * kpp + g;
                float kf[VE], s = 0.0f;
                widen(kv[u], kf, T());
#pragma unroll
                for (int x = 0; x < VE; x++)
                    s += qs[part * VE + x] * kf[x];
                for (int off = tpk / 2; off > 0; off >>= 1)
                    s += __shfl_xor_sync(0xffffffffu, s, off);
                if (t < L && part == 0)
                    sc[t] = s;
            }
        }
    } else {
        for (int64_t t = tid; t < L; t += blockDim.x) {
            const T *kr = KROW(t, k, k_cache);
            float s = 0.0f;
            for (int64_t x = 0; x < D; x++)
                s += qs[x] * moe_cuda_f32(kr[x]);
            sc[t] = s;
        }
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int64_t t = tid; t < L; t += blockDim.x)
        mx = fmaxf(mx, sc[t]);
    mx = moe_cuda_block_max(mx, s_red);
    float sum = 0.0f;
    for (int64_t t = tid; t < L; t += blockDim.x) {
        const float e = expf(sc[t] - mx);
        sc[t] = e;
        sum += e;
    }
    sum = moe_cuda_block_sum(sum, s_red); /* also orders the sc writes before the reads below */
    const float inv = 1.0f / sum;
    if (tpk > 1) {
        float acc[VE];
#pragma unroll
        for (int x = 0; x < VE; x++)
            acc[x] = 0.0f;
        for (int64_t t0 = g; t0 < L; t0 += (int64_t)kpp * ATT_BATCH) {
            uint4 vv[ATT_BATCH];
#pragma unroll
            for (int u = 0; u < ATT_BATCH; u++) {
                const int64_t t = t0 + (int64_t)u * kpp;
                vv[u] = t < L ? *(const uint4 *)(KROW(t, v, v_cache) + part * VE) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < ATT_BATCH; u++) {
                const int64_t t = t0 + (int64_t)u * kpp;
                if (t >= L)
                    break;
                float vf[VE];
                widen(vv[u], vf, T());
                const float pt = sc[t];
#pragma unroll
                for (int x = 0; x < VE; x++)
                    acc[x] += pt * vf[x];
            }
        }
#pragma unroll
        for (int x = 0; x < VE; x++)
            red[(int64_t)g * D + part * VE + x] = acc[x];
        __syncthreads();
        for (int64_t x = tid; x < D; x += blockDim.x) {
            float s = 0.0f;
            for (int gg = 0; gg < kpp; gg++)
                s += red[(int64_t)gg * D + x];
            o[x] = moe_cuda_from_f32<T>(s * inv);
        }
    } else {
        for (int64_t x = tid; x < D; x += blockDim.x) {
            float s = 0.0f;
            for (int64_t t = 0; t < L; t++)
                s += sc[t] * moe_cuda_f32(KROW(t, v, v_cache)[x]);
            o[x] = moe_cuda_from_f32<T>(s * inv);
        }
    }
#undef KROW
}

template <typename T>
static moe_status attention_decode_typed(moe_ctx *c, void *out, const void *q, const void *k, const void *v,
                                         int64_t ld, void *k_cache, void *v_cache, const int32_t *cache_len,
                                         const int32_t *n_new, int64_t B, int64_t n, int64_t H, int64_t D, int64_t Tc)
{
    constexpr int VE = vec_elems<T>::n;
    /* vectorised when a head is a power-of-two number (<= 32) of 16-byte
     * vectors and every row the kernel reads starts on 16 bytes */
    int tpk = 1;
    const int64_t vecs = D % VE == 0 ? D / VE : 0;
    if (vecs >= 1 && vecs <= 32 && (vecs & (vecs - 1)) == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
        aligned16(k_cache) && aligned16(v_cache) && (ld * (int64_t)sizeof(T)) % 16 == 0 &&
        (D * (int64_t)sizeof(T)) % 16 == 0)
        tpk = (int)vecs;
    const size_t smem = (size_t)(D + ATT_THREADS * VE + Tc) * sizeof(float);
    if (smem > 200u * 1024u)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda attention_decode: a cache of %lld positions needs %zu bytes of shared memory for its "
                             "scores; use a shorter --max-len-b or the cpu",
                             (long long)Tc, smem);
    static size_t allowed = 0;
    MOE_TRY(smem_attr(c, attention_decode_kernel<T>, smem, &allowed));
    dim3 grid((unsigned)(B * H), (unsigned)n);
    attention_decode_kernel<T><<<grid, ATT_THREADS, smem, c->stream>>>(
        (T *)out, (const T *)q, (const T *)k, (const T *)v, ld, (T *)k_cache, (T *)v_cache, cache_len, n_new, n, H, D,
        Tc, tpk);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_attention_decode(moe_ctx *c, void *out, const void *q, const void *k, const void *v, int64_t ld,
                                     void *k_cache, void *v_cache, const int32_t *cache_len, const int32_t *n_new,
                                     int64_t B, int64_t n, int64_t H, int64_t D, int64_t Tc, moe_dtype dt)
{
    if (!moe_cuda_is_float(dt) || B < 0 || n < 1 || H < 1 || D < 1 || Tc < 1 || ld < H * D)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda attention_decode: expected a float dtype, B >= 0, n, H, D, Tc >= 1 and ld >= H*D, "
                             "found %s, B %lld, n %lld, H %lld, D %lld, Tc %lld, ld %lld",
                             moe_cuda_dtype_name(dt), (long long)B, (long long)n, (long long)H, (long long)D,
                             (long long)Tc, (long long)ld);
    if (B * H > INT32_MAX || n > 65535)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda attention_decode: expected B*H <= %d and n <= 65535, found %lld and %lld", INT32_MAX,
                             (long long)(B * H), (long long)n);
    if (B == 0)
        return MOE_OK;
#define AD_CALL(TT) return attention_decode_typed<TT>(c, out, q, k, v, ld, k_cache, v_cache, cache_len, n_new, B, n, H, D, Tc)
    DEC_DISPATCH_T(dt, AD_CALL);
#undef AD_CALL
}

/* ------------------------------------------------------------------ gate */

typedef struct gate_params {
    int64_t S, d;
    int E, k, sampling;
    bool vec;                    /* 16-byte loads of wg's rows */
    const void *x;
    int layernorm;
    const void *lnw, *lnb;
    float eps;
    const void *wg;
    uint64_t seed, stream;
    const int32_t *noise_index;
    const uint8_t *pad;
    int32_t *expert;
    float *weight;
} gate_params;

#define GATE_MAX_E 256

/* One block per token: LayerNorm, E logits (a warp each, rounded to T), then
 * route_forward's softmax and choices on thread 0, in its order. */
template <typename T> static __global__ void __launch_bounds__(DEC_THREADS) gate_topk_kernel(gate_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [d] */
    __shared__ float l[GATE_MAX_E];
    const int64_t s = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (p.pad != nullptr && p.pad[s]) {
        if (threadIdx.x < 2) {
            p.expert[s * 2 + threadIdx.x] = -1;
            p.weight[s * 2 + threadIdx.x] = 0.0f;
        }
        return;
    }
    __shared__ const T *s_row[1];
    if (threadIdx.x == 0)
        s_row[0] = (const T *)p.x + s * p.d;
    __syncthreads();
    stage_rows_ln<T>(xs, s_row, 0, 1, p.d, p.layernorm, (const T *)p.lnw, (const T *)p.lnb, p.eps);
    for (int e = warp; e < p.E; e += DEC_WARPS) {
        float acc[1][DEC_MROWS];
        zero_acc<1>(acc);
        warp_dots_any<T, 1>(p.vec, acc, (const T *)p.wg, p.d, e, p.E, 0, p.d, xs, p.d, 1);
        warp_reduce<1>(acc, 1);
        if (lane == 0)
            l[e] = round_t<T>(acc[0][0]);
    }
    __syncthreads();
    if (threadIdx.x != 0)
        return;
    const int E = p.E;
    float pr[GATE_MAX_E];
    float mx = l[0];
    for (int e = 1; e < E; e++)
        if (l[e] > mx)
            mx = l[e];
    double den = 0.0;
    for (int e = 0; e < E; e++) {
        pr[e] = expf(l[e] - mx);
        den += (double)pr[e];
    }
    int i1 = 0;
    for (int e = 0; e < E; e++) {
        pr[e] = (float)((double)pr[e] / den);
        if (pr[e] > pr[i1])
            i1 = e;
    }
    int32_t *ex = p.expert + s * 2;
    float *w = p.weight + s * 2;
    ex[0] = i1;
    ex[1] = -1;
    w[1] = 0.0f;
    if (p.k == 1) {
        w[0] = pr[i1];
        return;
    }
    const int64_t tok = p.noise_index != nullptr ? (int64_t)p.noise_index[s] : s;
    int i2 = -1;
    float best = 0.0f;
    for (int e = 0; e < E; e++) {
        if (e == i1)
            continue;
        const float v = p.sampling ? l[e] + moe_route_gumbel(p.seed, p.stream, tok, E, e) : l[e];
        if (i2 < 0 || v > best) {
            i2 = e;
            best = v;
        }
    }
    float dn = pr[i1] + pr[i2];
    if (dn < FLT_EPSILON)
        dn = FLT_EPSILON;
    ex[1] = i2;
    w[0] = pr[i1] / dn;
    w[1] = pr[i2] / dn;
}

moe_status moe_cuda_gate_topk_forward(moe_ctx *c, const moe_gate_topk_args *a)
{
    if (a == NULL || !moe_cuda_is_float(a->dt) || a->S < 0 || a->d < 1 || (a->k != 1 && a->k != 2) || a->E < a->k ||
        (a->k == 2 && a->policy != MOE_ROUTE_ALL && a->policy != MOE_ROUTE_SAMPLING))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda gate_topk_forward: expected k 1 or 2 with E >= k, S >= 0, d >= 1 and the policy all "
                             "or sampling (random drops: use route_forward), found k %d, E %d, S %lld, d %lld, policy "
                             "%d",
                             a ? a->k : -1, a ? a->E : -1, a ? (long long)a->S : -1LL, a ? (long long)a->d : -1LL,
                             a ? (int)a->policy : -1);
    if (a->E > GATE_MAX_E || a->d * 4 > DEC_SMEM_MAX || a->S > INT32_MAX)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda gate_topk_forward: expected at most %d experts, d <= %d and S <= %d, found E %d, d "
                             "%lld, S %lld; use route_forward",
                             GATE_MAX_E, DEC_SMEM_MAX / 4, INT32_MAX, a->E, (long long)a->d, (long long)a->S);
    if (a->S == 0)
        return MOE_OK;
    gate_params p;
    memset(&p, 0, sizeof p);
    p.S = a->S;
    p.d = a->d;
    p.E = a->E;
    p.k = a->k;
    p.sampling = a->k == 2 && a->policy == MOE_ROUTE_SAMPLING;
    p.x = a->x;
    p.layernorm = a->layernorm;
    p.lnw = a->ln_weight;
    p.lnb = a->ln_bias;
    p.eps = a->ln_eps;
    p.wg = a->wg;
    p.seed = a->seed;
    p.stream = a->stream;
    p.noise_index = a->noise_index;
    p.pad = a->pad;
    p.expert = a->expert;
    p.weight = a->weight;
    const int ve = a->dt == MOE_F32 ? 4 : 8;
    p.vec = aligned16(a->wg) && a->d % ve == 0;
    const size_t smem = (size_t)a->d * sizeof(float);
#define GATE_CALL(TT)                                                                          \
    do {                                                                                       \
        static size_t allowed = 0;                                                             \
        MOE_TRY(smem_attr(c, gate_topk_kernel<TT>, smem, &allowed));                           \
        gate_topk_kernel<TT><<<(unsigned)a->S, DEC_THREADS, smem, c->stream>>>(p);             \
    } while (0)
    DEC_DISPATCH_T(a->dt, GATE_CALL);
#undef GATE_CALL
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* --------------------------------------------------------------- experts */

typedef struct ex_params {
    int64_t S, d, f, kc;
    int E, g;
    int by_rank;                 /* fc1: blockIdx.y is the rank of a distinct chosen expert, not the expert */
    int vec_rows;                /* row lengths allow 16-byte loads (pointers are checked on the device) */
    const void *x;
    int layernorm;
    const void *lnw, *lnb;
    float eps;
    const int32_t *expert;
    const float *weight;
    const void *const *w1, *const *b1, *const *w2, *const *b2;
    moe_act_kind act;
    float beta;
    void *y, *hidden;
    float *eout;
} ex_params;

#define EX_RANK_MAX 32           /* assignments up to which fc1 launches one block row per chosen expert */

static __device__ __forceinline__ bool counts(const ex_params &p, int64_t i)
{
    return p.expert[i] >= 0 && p.weight[i] != 0.0f;
}

/* The expert of rank `rank` among the distinct experts the counted
 * assignments chose (ascending ids), or -1 when fewer were chosen. Thread 0
 * only; O(rank * S), used while 2S <= EX_RANK_MAX. */
static __device__ int expert_of_rank(const ex_params &p, int rank)
{
    int prev = -1;
    for (int k = 0; k <= rank; k++) {
        int best = -1;
        for (int64_t i = 0; i < 2 * p.S; i++)
            if (counts(p, i) && p.expert[i] > prev && (best < 0 || p.expert[i] < best))
                best = p.expert[i];
        if (best < 0)
            return -1;
        prev = best;
    }
    return prev;
}

/* Up to g assignments (s*2+j) counted for expert e, from `from` on, in
 * order; returns how many, and the index to continue from in *next.
 * Thread 0 only. (A token chooses an expert at most once.) */
static __device__ int next_group(const ex_params &p, int e, int64_t from, int64_t *asg, int64_t *next)
{
    int cnt = 0;
    int64_t i = from;
    for (; i < 2 * p.S && cnt < p.g; i++)
        if (p.expert[i] == e && counts(p, i))
            asg[cnt++] = i;
    *next = i;
    return cnt;
}

/* fc1 of one expert for the output rows of blockIdx.x, for every assignment
 * routed to it: hidden[a] = act(LN(x_s) W1^T + b1) rounded to T */
template <typename T, int RW> static __global__ void __launch_bounds__(DEC_THREADS) expert_fc1_kernel(ex_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [g][d] */
    __shared__ int64_t s_asg[DEC_MROWS];
    __shared__ const T *s_rows[DEC_MROWS];
    __shared__ int s_cnt, s_e;
    __shared__ int64_t s_next;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t row0 = ((int64_t)blockIdx.x * DEC_WARPS + warp) * RW;
    if (threadIdx.x == 0)
        s_e = p.by_rank ? expert_of_rank(p, (int)blockIdx.y) : (int)blockIdx.y;
    __syncthreads();
    const int e = s_e;
    if (e < 0)
        return;
    const T *W = (const T *)p.w1[e], *bias = (const T *)p.b1[e];
    const bool vec = p.vec_rows && aligned16(W);
    int64_t from = 0;
    for (;;) {
        __syncthreads(); /* the previous group's s_asg, s_rows and xs are no longer read */
        if (threadIdx.x == 0)
            s_cnt = next_group(p, e, from, s_asg, &s_next);
        __syncthreads();
        const int mm = s_cnt;
        from = s_next;
        if (mm == 0)
            return;
        if (threadIdx.x < mm)
            s_rows[threadIdx.x] = (const T *)p.x + (s_asg[threadIdx.x] / 2) * p.d;
        __syncthreads();
        stage_rows_ln<T>(xs, s_rows, 0, mm, p.d, p.layernorm, (const T *)p.lnw, (const T *)p.lnb, p.eps);
        float acc[RW][DEC_MROWS];
        zero_acc<RW>(acc);
        warp_dots_any<T, RW>(vec, acc, W, p.d, row0, p.f, 0, p.d, xs, p.d, mm);
        warp_reduce<RW>(acc, mm);
#pragma unroll
        for (int r = 0; r < RW; r++)
#pragma unroll
            for (int i = 0; i < DEC_MROWS; i++) {
                const int64_t j = row0 + r;
                if (i < mm && j < p.f && lane == (r * DEC_MROWS + i) % 32)
                    ((T *)p.hidden)[s_asg[i] * p.f + j] =
                        moe_cuda_from_f32<T>(moe_cuda_act(acc[r][i] + moe_cuda_f32(bias[j]), p.act));
            }
    }
}

/* fc2 of every chosen expert for the output rows of blockIdx.x, then the
 * combine of those rows: this block owns them for every token */
template <typename T, int RW> static __global__ void __launch_bounds__(DEC_THREADS) expert_fc2_kernel(ex_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [g][kc] */
    __shared__ int64_t s_asg[DEC_MROWS];
    __shared__ const T *s_rows[DEC_MROWS];
    __shared__ int s_cnt;
    __shared__ int64_t s_next;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t rb0 = (int64_t)blockIdx.x * DEC_WARPS * RW, row0 = rb0 + (int64_t)warp * RW;
    for (int e = 0; e < p.E; e++) {
        int64_t from = 0;
        for (;;) {
            __syncthreads(); /* the previous group's s_asg, s_rows and xs are no longer read */
            if (threadIdx.x == 0)
                s_cnt = next_group(p, e, from, s_asg, &s_next);
            __syncthreads();
            const int mm = s_cnt;
            from = s_next;
            if (mm == 0)
                break;
            if (threadIdx.x < mm)
                s_rows[threadIdx.x] = (const T *)p.hidden + s_asg[threadIdx.x] * p.f;
            const T *W = (const T *)p.w2[e], *bias = (const T *)p.b2[e];
            const bool vec = p.vec_rows && aligned16(W);
            __syncthreads();
            float acc[RW][DEC_MROWS];
            zero_acc<RW>(acc);
            for (int64_t k0 = 0; k0 < p.f; k0 += p.kc) {
                const int64_t kc = p.f - k0 < p.kc ? p.f - k0 : p.kc;
                if (k0 > 0)
                    __syncthreads();
                stage_rows_ln<T>(xs, s_rows, k0, mm, kc, 0, nullptr, nullptr, 0.0f);
                warp_dots_any<T, RW>(vec, acc, W, p.f, row0, p.d, k0, kc, xs, kc, mm);
            }
            warp_reduce<RW>(acc, mm);
#pragma unroll
            for (int r = 0; r < RW; r++)
#pragma unroll
                for (int i = 0; i < DEC_MROWS; i++) {
                    const int64_t j = row0 + r;
                    if (i < mm && j < p.d && lane == (r * DEC_MROWS + i) % 32)
                        p.eout[s_asg[i] * p.d + j] = round_t<T>(acc[r][i] + moe_cuda_f32(bias[j]));
                }
        }
    }
    __syncthreads(); /* every eout row of this block's columns is written */
    const int64_t nrows = (int64_t)DEC_WARPS * RW;
    T *y = (T *)p.y;
    for (int64_t e2 = threadIdx.x; e2 < p.S * nrows; e2 += blockDim.x) {
        const int64_t s = e2 / nrows, j = rb0 + e2 % nrows;
        if (j >= p.d)
            continue;
        double acc = 0.0;
        for (int jj = 0; jj < 2; jj++) {
            const int64_t i = s * 2 + jj;
            if (counts(p, i))
                acc += (double)p.weight[i] * (double)p.eout[i * p.d + j];
        }
        float v = round_t<T>((float)acc);
        if (p.beta != 0.0f)
            v = p.beta * moe_cuda_f32(y[s * p.d + j]) + v;
        y[s * p.d + j] = moe_cuda_from_f32<T>(v);
    }
}

template <typename T, int RW> static moe_status expert_fc1_launch(moe_ctx *c, const ex_params &p)
{
    static size_t allowed = 0;
    const size_t smem = (size_t)p.g * (size_t)p.d * sizeof(float);
    MOE_TRY(smem_attr(c, expert_fc1_kernel<T, RW>, smem, &allowed));
    const int64_t rows = (p.f + (int64_t)DEC_WARPS * RW - 1) / ((int64_t)DEC_WARPS * RW);
    const int64_t ny = p.by_rank ? (2 * p.S < p.E ? 2 * p.S : p.E) : p.E;
    expert_fc1_kernel<T, RW><<<dim3((unsigned)rows, (unsigned)ny), DEC_THREADS, smem, c->stream>>>(p);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

template <typename T, int RW> static moe_status expert_fc2_launch(moe_ctx *c, const ex_params &p)
{
    static size_t allowed = 0;
    const size_t smem = (size_t)p.g * (size_t)p.kc * sizeof(float);
    MOE_TRY(smem_attr(c, expert_fc2_kernel<T, RW>, smem, &allowed));
    const int64_t rows = (p.d + (int64_t)DEC_WARPS * RW - 1) / ((int64_t)DEC_WARPS * RW);
    expert_fc2_kernel<T, RW><<<(unsigned)rows, DEC_THREADS, smem, c->stream>>>(p);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

template <typename T> static moe_status expert_typed(moe_ctx *c, ex_params p)
{
    constexpr int VE = vec_elems<T>::n;
    ex_params p1 = p, p2 = p;
    int64_t kc1;
    /* a group holds the tokens of one expert: at most S */
    launch_rows(p.S, p.d, 1, &p1.g, &kc1);
    launch_rows(p.S, p.f, 0, &p2.g, &p2.kc);
    p1.vec_rows = p.d % VE == 0;
    p2.vec_rows = p.f % VE == 0 && p2.kc % VE == 0;
    p1.by_rank = 2 * p.S <= EX_RANK_MAX;
    const int rw1 = pick_rw(c, p.f), rw2 = pick_rw(c, p.d);
    moe_status st = rw1 == 4 ? expert_fc1_launch<T, 4>(c, p1)
                    : rw1 == 2 ? expert_fc1_launch<T, 2>(c, p1)
                               : expert_fc1_launch<T, 1>(c, p1);
    if (st != MOE_OK)
        return st;
    return rw2 == 4 ? expert_fc2_launch<T, 4>(c, p2) : rw2 == 2 ? expert_fc2_launch<T, 2>(c, p2)
                                                                : expert_fc2_launch<T, 1>(c, p2);
}

moe_status moe_cuda_expert_ffn_forward(moe_ctx *c, const moe_expert_ffn_args *a)
{
    if (a == NULL || !moe_cuda_is_float(a->dt) || a->S < 0 || a->d < 1 || a->f < 1 || a->E < 1 || a->w1 == NULL ||
        a->b1 == NULL || a->w2 == NULL || a->b2 == NULL || a->hidden == NULL || a->eout == NULL)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda expert_ffn_forward: expected S >= 0, d, f, E >= 1, the four pointer tables and "
                             "both scratch buffers, found S %lld, d %lld, f %lld, E %d",
                             a ? (long long)a->S : -1LL, a ? (long long)a->d : -1LL, a ? (long long)a->f : -1LL,
                             a ? a->E : -1);
    if (a->d * 4 > DEC_SMEM_MAX || a->E > 65535)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda expert_ffn_forward: expected d <= %d and at most 65535 experts, found d %lld, E %d",
                             DEC_SMEM_MAX / 4, (long long)a->d, a->E);
    if (a->S == 0)
        return MOE_OK;
    ex_params p;
    memset(&p, 0, sizeof p);
    p.S = a->S;
    p.d = a->d;
    p.f = a->f;
    p.E = a->E;
    p.x = a->x;
    p.layernorm = a->layernorm;
    p.lnw = a->ln_weight;
    p.lnb = a->ln_bias;
    p.eps = a->ln_eps;
    p.expert = a->expert;
    p.weight = a->weight;
    p.w1 = a->w1;
    p.b1 = a->b1;
    p.w2 = a->w2;
    p.b2 = a->b2;
    p.act = a->act;
    p.beta = a->beta;
    p.y = a->y;
    p.hidden = a->hidden;
    p.eout = a->eout;
#define EX_CALL(TT) return expert_typed<TT>(c, p)
    DEC_DISPATCH_T(a->dt, EX_CALL);
#undef EX_CALL
}

/* ---------------------------------------------------------------- logits */

#define STATS_THREADS 1024

/* (v, i) ranks above (pv, pi): larger value, or equal value at a lower index */
static __device__ __forceinline__ bool ranks_above(float v, int64_t i, float pv, int64_t pi)
{
    return v > pv || (v == pv && i < pi);
}

static __device__ __forceinline__ float zval(const float *l, int64_t v, float temperature)
{
    const float x = l[v];
    return isnan(x) ? -INFINITY : x / temperature;
}

static __global__ void __launch_bounds__(STATS_THREADS)
    logits_stats_kernel(float *lse, float *top_val, int32_t *top_idx, float *tgt, const float *logits,
                        const int32_t *targets, int64_t V, int K, float temperature)
{
    __shared__ double sd[32];
    __shared__ float sf[32], s_bv[32];
    __shared__ int64_t s_bi[32];
    __shared__ float s_pv;
    __shared__ int64_t s_pi;
    const int64_t r = blockIdx.x;
    const float *l = logits + r * V;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    if (lse != nullptr) {
        float mx = -INFINITY;
        for (int64_t v = tid; v < V; v += blockDim.x)
            mx = fmaxf(mx, zval(l, v, temperature));
        mx = moe_cuda_block_max(mx, sf);
        double s = 0.0;
        if (mx != -INFINITY)
            for (int64_t v = tid; v < V; v += blockDim.x)
                s += (double)expf(zval(l, v, temperature) - mx);
        s = moe_cuda_block_sum_d(s, sd);
        if (tid == 0)
            lse[r] = mx == -INFINITY ? -INFINITY : mx + (float)log(s);
    }
    if (tid == 0) {
        s_pv = INFINITY;
        s_pi = -1;
        if (tgt != nullptr && targets != nullptr)
            tgt[r] = zval(l, targets[r], temperature);
    }
    __syncthreads();
    for (int k = 0; k < K; k++) {
        const float pv = s_pv;
        const int64_t pi = s_pi;
        float bv = -INFINITY;
        int64_t bi = -1;
        for (int64_t v = tid; v < V; v += blockDim.x) {
            const float z = zval(l, v, temperature);
            if (k > 0 && !ranks_above(pv, pi, z, v))
                continue;
            if (bi < 0 || ranks_above(z, v, bv, bi)) {
                bv = z;
                bi = v;
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
            const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
            if (oi >= 0 && (bi < 0 || ranks_above(ov, oi, bv, bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            s_bv[warp] = bv;
            s_bi[warp] = bi;
        }
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < nw; w++)
                if (s_bi[w] >= 0 && (bi < 0 || ranks_above(s_bv[w], s_bi[w], bv, bi))) {
                    bv = s_bv[w];
                    bi = s_bi[w];
                }
            top_val[r * K + k] = bv;
            top_idx[r * K + k] = (int32_t)bi;
            s_pv = bv;
            s_pi = bi;
        }
        __syncthreads();
    }
}

moe_status moe_cuda_logits_stats(moe_ctx *c, float *lse, float *top_val, int32_t *top_idx, float *tgt,
                                 const float *logits, const int32_t *targets, int64_t R, int64_t V, int K,
                                 float temperature)
{
    if (R < 0 || V < 1 || K < 0 || K > V || !(temperature > 0.0f) || (K > 0 && (top_val == NULL || top_idx == NULL)))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda logits_stats: expected R >= 0, V >= 1, 0 <= K <= V (with output buffers) and a "
                             "positive temperature, found R %lld, V %lld, K %d, temperature %g",
                             (long long)R, (long long)V, K, (double)temperature);
    if (R == 0)
        return MOE_OK;
    if (R > INT32_MAX)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED, "cuda logits_stats: %lld rows is too many", (long long)R);
    logits_stats_kernel<<<(unsigned)R, STATS_THREADS, 0, c->stream>>>(lse, top_val, top_idx, tgt, logits, targets, V,
                                                                       K, temperature);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}
