/* decode.cu: the decoding ops of the cuda backend (ops.h, "decoding";
 * kernels/cpu/decode.c is the reference): embedding at given positions, the
 * row-wise Linear, attention against a per-row K/V cache, the no-drop top-k
 * gate, the experts of the routed tokens, and the logits statistics.
 *
 * What shapes them: a decoding step at batch 1 multiplies one token by every
 * weight it needs, so the time is the time to stream those weights once from
 * HBM. The products are therefore GEMVs written for bandwidth, not tensor-core
 * GEMMs: the input rows are staged once per block in shared memory (as fp32,
 * after the fused LayerNorm), and each block streams tiles of weight rows
 * against them, a row's columns split over all its threads (tile_stream):
 * 16-byte loads, the next tile's issued before the current one is used, the
 * first before the block's prologue. Blocks are one wave (as many as the SMs
 * hold at once) and take many tiles each, so the prologue is paid once per
 * block. Everything a layer does around a product (LayerNorm before; bias,
 * q scale, activation, residual add after)
 * happens in the same kernel, so a transformer layer is 5 launches (k|v|q,
 * attention, out, fc1, fc2) and a MoE layer 6 (gate, expert fc1, expert
 * fc2+combine instead of fc1, fc2), few enough to replay as one CUDA graph
 * per step. They are launched as programmatic dependents (launch_pdl): each
 * starts its first weight loads while the kernel before it finishes.
 *
 * Conventions a reader would trip over:
 *  - Blocks take the input rows in groups of at most DEC_MROWS (grid.y), as
 *    many as fit whole in DEC_SMEM_MAX: a step with more rows re-reads the
 *    weights once per group. Decoding runs its larger steps (prefill)
 *    through the training ops instead.
 *  - No atomics: every sum has one owner and a fixed order; the expert
 *    combine is done by the block that owns the output rows, after it has
 *    computed every expert's contribution to them; attention merges its
 *    key groups' online softmaxes in group order.
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
#define DEC_SMEM_MAX (112 * 1024)   /* shared memory a product kernel may take (two blocks an SM) */
#define STAGE_U 4                   /* 16-byte input loads a thread has in flight while staging */

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
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

static __host__ __device__ __forceinline__ bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

template <typename T> static __device__ __forceinline__ float ld_t(const void *p, int64_t i)
{
    return moe_cuda_f32(((const T *)p)[i]);
}

/* Stages input rows xrow[0..mm) (shared-memory pointers to k elements of
 * T each) into xs (row stride k) as fp32 and, with layernorm, normalizes
 * them in place: statistics in double as layernorm_forward (warp i owns row
 * i), the result rounded to T as layernorm_forward stores it. Every thread
 * calls it; it ends with a barrier. */
template <typename T>
static __device__ void stage_rows_ln(float *xs, const T *const *xrow, int mm, int64_t k, int layernorm, const T *lnw,
                                     const T *lnb, float eps)
{
    constexpr int VE = vec_elems<T>::n;
    bool vec = k % VE == 0;
    for (int i = 0; i < mm; i++)
        vec = vec && aligned16(xrow[i]);
    if (vec) {
        /* 16-byte loads, STAGE_U of them issued before any is used: a row
         * of 8,192 arrives in one round trip, not in a chain of them */
        const int64_t nv = k / VE, total = (int64_t)mm * nv;
        for (int64_t q0 = threadIdx.x; q0 < total; q0 += (int64_t)STAGE_U * blockDim.x) {
            uint4 v[STAGE_U];
#pragma unroll
            for (int u = 0; u < STAGE_U; u++) {
                const int64_t q = q0 + (int64_t)u * blockDim.x;
                v[u] = q < total ? *(const uint4 *)(xrow[q / nv] + (q % nv) * VE) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < STAGE_U; u++) {
                const int64_t q = q0 + (int64_t)u * blockDim.x;
                if (q >= total)
                    break;
                float f[VE];
                widen(v[u], f, T());
                float4 *dst = (float4 *)(xs + (q / nv) * k + (q % nv) * VE);
#pragma unroll
                for (int x = 0; x < VE; x += 4)
                    dst[x / 4] = make_float4(f[x], f[x + 1], f[x + 2], f[x + 3]);
            }
        }
    } else {
        for (int i = 0; i < mm; i++) {
            const T *src = xrow[i];
            float *dst = xs + (int64_t)i * k;
#pragma unroll 4
            for (int64_t q = threadIdx.x; q < k; q += blockDim.x)
                dst[q] = moe_cuda_f32(src[q]);
        }
    }
    __syncthreads();
    if (!layernorm)
        return;
    __shared__ float s_mean[DEC_MROWS], s_rstd[DEC_MROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = warp; i < mm; i += blockDim.x >> 5) {
        const float *r = xs + (int64_t)i * k;
        double s = 0.0;
        for (int64_t q = lane; q < k; q += 32)
            s += (double)r[q];
        const double m = moe_cuda_warp_sum_d(s) / (double)k;
        double v = 0.0;
        for (int64_t q = lane; q < k; q += 32) {
            const double dd = (double)r[q] - m;
            v += dd * dd;
        }
        v = moe_cuda_warp_sum_d(v);
        if (lane == 0) {
            s_mean[i] = (float)m;
            s_rstd[i] = (float)(1.0 / sqrt(v / (double)k + (double)eps));
        }
    }
    __syncthreads();
    for (int i = 0; i < mm; i++) {
        float *r = xs + (int64_t)i * k;
        const float mean = s_mean[i], rstd = s_rstd[i];
        for (int64_t q = threadIdx.x; q < k; q += blockDim.x) {
            /* rounded step by step as the cpu does (no contraction into an
             * FMA): the result is rounded to T, where one ulp of fp32 can move it */
            float y = __fmul_rn(r[q] - mean, rstd);
            if (lnw != nullptr)
                y = __fmul_rn(y, moe_cuda_f32(lnw[q]));
            if (lnb != nullptr)
                y = __fadd_rn(y, moe_cuda_f32(lnb[q]));
            r[q] = round_t<T>(y);
        }
    }
    __syncthreads();
}

/* A block streaming tiles of R rows of W (row stride ldw, k columns)
 * against the mm input rows staged in xs (row stride ldxs): tiles tile0,
 * tile0 + stride, ... below ceil(nrows / R). The k columns are cut into
 * chunks of DEC_THREADS * VE; thread t owns columns t*VE.. of each chunk,
 * so every thread loads a 16-byte piece of each of the R rows and a row's
 * sum is split over the whole block (merged in a fixed order: lanes, then
 * warps). A pass loads KC chunks of the tile's R rows at once (R * KC loads
 * a thread), the next pass's loads issued before the current one is used;
 * prime() issues the first, before the kernel's prologue. For every row j
 * and input i, epi(j, i, sum) runs once, on some thread of the block. The
 * scalar path (VEC false: unaligned rows or k not a multiple of VE) loads
 * the same pieces element by element. */
template <typename T, bool VEC, int R, int KC> struct tile_stream {
    static constexpr int VE = vec_elems<T>::n;
    static constexpr int64_t CH = (int64_t)DEC_THREADS * VE;
    const T *W;
    int64_t ldw, nrows, k, ntiles;
    int np; /* passes a tile */
    uint4 cur[R][KC];

    __device__ __forceinline__ tile_stream(const T *W_, int64_t ldw_, int64_t nrows_, int64_t k_)
        : W(W_), ldw(ldw_), nrows(nrows_), k(k_), ntiles((nrows_ + R - 1) / R),
          np((int)((k_ + CH * KC - 1) / (CH * KC)))
    {
    }

    __device__ __forceinline__ void load(uint4 (&buf)[R][KC], int64_t tile, int pass) const
    {
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int c = 0; c < KC; c++) {
                const int64_t row = tile * R + r, q = ((int64_t)pass * KC + c) * CH + (int64_t)threadIdx.x * VE;
                if (row >= nrows || q >= k) {
                    buf[r][c] = make_uint4(0u, 0u, 0u, 0u);
                } else if (VEC) {
                    buf[r][c] = ld_stream(W + row * ldw + q);
                } else {
                    union {
                        uint4 u;
                        T t[VE];
                    } g;
#pragma unroll
                    for (int e = 0; e < VE; e++)
                        g.t[e] = q + e < k ? W[row * ldw + q + e] : moe_cuda_from_f32<T>(0.0f);
                    buf[r][c] = g.u;
                }
            }
    }

    __device__ __forceinline__ void prime(int64_t tile0)
    {
        if (tile0 < ntiles)
            load(cur, tile0, 0);
    }

    /* red: 2 * DEC_WARPS * DEC_MROWS * R floats of shared memory */
    template <typename Epi>
    __device__ __forceinline__ void run(int64_t tile0, int64_t stride, const float *xs, int64_t ldxs, int mm,
                                        float *red, Epi &epi)
    {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        float acc[DEC_MROWS][R];
#pragma unroll
        for (int i = 0; i < DEC_MROWS; i++)
#pragma unroll
            for (int r = 0; r < R; r++)
                acc[i][r] = 0.0f;
        int64_t tile = tile0;
        int pass = 0, half = 0;
        while (tile < ntiles) { /* block-uniform */
            int64_t ntile = tile;
            int npass = pass + 1;
            if (npass == np) {
                npass = 0;
                ntile = tile + stride;
            }
            uint4 nxt[R][KC];
            if (ntile < ntiles)
                load(nxt, ntile, npass);
            else
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int c = 0; c < KC; c++)
                        nxt[r][c] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int c = 0; c < KC; c++) {
                const int64_t q = ((int64_t)pass * KC + c) * CH + (int64_t)threadIdx.x * VE;
                if (q >= k)
                    break;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float wf[VE];
                    widen(cur[r][c], wf, T());
#pragma unroll
                    for (int i = 0; i < DEC_MROWS; i++) {
                        if (i >= mm)
                            break;
                        const float *xp = xs + (int64_t)i * ldxs + q;
                        if (VEC) {
#pragma unroll
                            for (int x = 0; x < VE; x += 4) {
                                const float4 f = *(const float4 *)(xp + x);
                                acc[i][r] += wf[x] * f.x + wf[x + 1] * f.y + wf[x + 2] * f.z + wf[x + 3] * f.w;
                            }
                        } else {
#pragma unroll
                            for (int x = 0; x < VE; x++)
                                if (q + x < k)
                                    acc[i][r] += wf[x] * xp[x];
                        }
                    }
                }
            }
            if (npass == 0) {
                float *rb = red + (int64_t)half * DEC_WARPS * DEC_MROWS * R;
#pragma unroll
                for (int i = 0; i < DEC_MROWS; i++) {
                    if (i >= mm)
                        break;
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const float v = moe_cuda_warp_sum(acc[i][r]);
                        if (lane == 0)
                            rb[(warp * DEC_MROWS + i) * R + r] = v;
                        acc[i][r] = 0.0f;
                    }
                }
                /* the other half was last read before this barrier's previous
                 * crossing, so the next tile may write it without another */
                __syncthreads();
                for (int t = threadIdx.x; t < mm * R; t += blockDim.x) {
                    const int i = t / R, r = t % R;
                    const int64_t row = tile * R + r;
                    if (row >= nrows)
                        continue;
                    float v = 0.0f;
                    for (int w = 0; w < DEC_WARPS; w++)
                        v += rb[(w * DEC_MROWS + i) * R + r];
                    epi(row, i, v);
                }
                half ^= 1;
            }
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int c = 0; c < KC; c++)
                    cur[r][c] = nxt[r][c];
            tile = ntile;
            pass = npass;
        }
    }
};

/* Input rows a block takes at once: as many as fit in DEC_SMEM_MAX whole
 * (at most DEC_MROWS, at least 1); 0 when not even one fits. */
static int group_rows(int64_t m, int64_t k)
{
    int64_t g = m < DEC_MROWS ? m : DEC_MROWS;
    if (g < 1)
        g = 1;
    while (g > 1 && g * k * 4 > DEC_SMEM_MAX)
        g--;
    return g * k * 4 > DEC_SMEM_MAX ? 0 : (int)g;
}

/* Programmatic dependent launch: a decoding kernel is launched allowed to
 * start while the kernel before it finishes. It lets its own dependents
 * launch at once (pdl_trigger), issues what depends on nothing earlier
 * (its first weight loads), and waits for every earlier kernel's writes
 * (pdl_wait) before it reads an activation or writes anything. Both are
 * no-ops for a kernel launched without the attribute. */
static __device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
static __device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

template <typename... KArgs, typename... Args>
static cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                              Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
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

/* blocks an SM holds at once of kernel k (cached by the caller in *occ) */
template <typename K> static moe_status occupancy_of(moe_ctx *c, K kernel, size_t smem, int *occ)
{
    if (*occ == 0) {
        MOE_CUDA_TRY(c, cudaOccupancyMaxActiveBlocksPerMultiprocessor(occ, kernel, DEC_THREADS, smem));
        if (*occ < 1)
            *occ = 1;
    }
    return MOE_OK;
}

/* one wave of blocks shared by `others` grid rows, at most one a tile */
static unsigned tile_grid(const moe_ctx *c, int occ, int64_t tiles, int64_t others)
{
    const int64_t sms = c->num_sms > 0 ? c->num_sms : 132;
    int64_t g = (occ * sms + others - 1) / (others > 0 ? others : 1);
    if (g > tiles)
        g = tiles;
    return g < 1 ? 1u : (unsigned)g;
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
            /* the cpu's expf, correctly rounded: glibc's is, CUDA's expf is not */
            const float freq = (float)exp((double)((float)kk * neg_e));
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
    int64_t m, n, k, ldx, ldy;
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

/* output row j of input row m0 + i */
template <typename T> struct rl_epi {
    const rl_params &p;
    int64_t m0;
    __device__ __forceinline__ void operator()(int64_t j, int i, float v) const
    {
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
};

/* Block (x, y): input rows y*g.. staged once; the block streams tiles of R
 * output rows blockIdx.x, then every gridDim.x further. */
template <typename T, bool VEC, int R, int KC>
static __global__ void __launch_bounds__(DEC_THREADS) rowlinear_kernel(rl_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [g][k] */
    __shared__ const T *s_rows[DEC_MROWS];
    __shared__ float red[2 * DEC_WARPS * DEC_MROWS * R];
    const int64_t m0 = (int64_t)blockIdx.y * p.g;
    const int mm = (int)(p.m - m0 < p.g ? p.m - m0 : p.g);
    pdl_trigger();
    tile_stream<T, VEC, R, KC> ts((const T *)p.w, p.k, p.n, p.k);
    ts.prime(blockIdx.x); /* the first weights travel while the kernel before ends and the inputs are staged */
    pdl_wait();
    if (threadIdx.x < mm) {
        const int64_t src = p.rows != nullptr ? (int64_t)p.rows[m0 + threadIdx.x] : m0 + threadIdx.x;
        s_rows[threadIdx.x] = (const T *)p.x + src * p.ldx;
    }
    __syncthreads();
    stage_rows_ln<T>(xs, s_rows, mm, p.k, p.layernorm, (const T *)p.lnw, (const T *)p.lnb, p.eps);
    rl_epi<T> epi{p, m0};
    ts.run(blockIdx.x, gridDim.x, xs, p.k, mm, red, epi);
}

template <typename T, bool VEC, int R, int KC> static moe_status rowlinear_launch(moe_ctx *c, const rl_params &p)
{
    static size_t allowed = 0;
    const size_t smem = (size_t)p.g * (size_t)p.k * sizeof(float);
    MOE_TRY(smem_attr(c, rowlinear_kernel<T, VEC, R, KC>, smem, &allowed));
    static int occ = 0;
    MOE_TRY(occupancy_of(c, rowlinear_kernel<T, VEC, R, KC>, smem, &occ));
    const unsigned gy = (unsigned)((p.m + p.g - 1) / p.g);
    dim3 grid(tile_grid(c, occ, (p.n + R - 1) / R, gy), gy);
    MOE_CUDA_TRY(c, launch_pdl(rowlinear_kernel<T, VEC, R, KC>, grid, dim3(DEC_THREADS), smem, c->stream, p));
    return MOE_OK;
}

/* R rows a tile and KC chunks a pass: two rows, as many chunks as the row
 * has up to four (few registers, so an SM holds many blocks) */
template <typename T, bool VEC> static moe_status rowlinear_shape(moe_ctx *c, const rl_params &p)
{
    const int64_t ch = (int64_t)DEC_THREADS * vec_elems<T>::n;
    if (p.k > 2 * ch)
        return rowlinear_launch<T, VEC, 2, 4>(c, p);
    if (p.k > ch)
        return rowlinear_launch<T, VEC, 2, 2>(c, p);
    return rowlinear_launch<T, VEC, 2, 1>(c, p);
}

template <typename T> static moe_status rowlinear_typed(moe_ctx *c, const rl_params &p)
{
    constexpr int VE = vec_elems<T>::n;
    /* 16-byte loads need aligned rows */
    if (aligned16(p.w) && p.k % VE == 0)
        return rowlinear_shape<T, true>(c, p);
    return rowlinear_shape<T, false>(c, p);
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
    p.g = group_rows(d->m, d->k);
    if (p.g == 0)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda rowlinear_forward: a row of %lld inputs needs %lld bytes of shared memory, above the "
                             "%d this kernel takes; use layernorm_forward and matmul",
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
#define RL_CALL(TT) return rowlinear_typed<TT>(c, p)
    DEC_DISPATCH_T(d->dt, RL_CALL);
#undef RL_CALL
}

/* ------------------------------------------------------------- attention */

#define ATT_THREADS 256
#define ATT_BATCH 8   /* keys whose key and value loads a thread issues before using them */

/* One block per (row b, head h, new query j). Keys t < cache_len come from
 * the cache, newer ones from the step's own k and v.
 * Vectorised path (a head of 1..32 16-byte vectors, a power of two): one
 * pass. A group of TPK threads owns every (ATT_THREADS/TPK)-th key, each
 * thread VE dims of it; the group keeps an online softmax (running max,
 * sum, weighted values) over its keys, ATT_BATCH keys' loads in flight;
 * the groups are merged at the end in a fixed order.
 * Scalar path (other head sizes or alignments): scores into shared memory,
 * softmax, then one thread per dim over all keys. */
template <typename T>
static __global__ void __launch_bounds__(ATT_THREADS)
    attention_decode_kernel(T *out, const T *q, const T *k, const T *v, int64_t ld, T *k_cache, T *v_cache,
                            const int32_t *cache_len, const int32_t *n_new, int64_t n, int64_t H, int64_t D,
                            int64_t Tc, int tpk)
{
    constexpr int VE = vec_elems<T>::n;
    extern __shared__ __align__(16) float sm[];
    __shared__ float s_red[32];
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, j = blockIdx.y;
    const int tid = threadIdx.x;
    pdl_trigger();
    pdl_wait();
    const int64_t cl = cache_len[b], nn = n_new[b];
    T *o = out + (b * n + j) * H * D + h * D;
    if (j >= nn) {
        for (int64_t x = tid; x < D; x += blockDim.x)
            o[x] = moe_cuda_from_f32<T>(0.0f);
        return;
    }
    const int64_t cbase = bh * Tc * D, L = cl + j + 1;
    const T *qrow = q + (b * n + j) * ld + h * D;
    float *qs = sm;
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
    if (tpk > 1) {
        const int kpp = ATT_THREADS / tpk, g = tid / tpk, part = tid % tpk;
        float *red = qs + D;                 /* [kpp][D] weighted values */
        float *gm = red + (int64_t)kpp * D;  /* [kpp] running max */
        float *gl = gm + kpp;                /* [kpp] running sum */
        float qv[VE], acc[VE];
#pragma unroll
        for (int x = 0; x < VE; x++) {
            qv[x] = qs[part * VE + x];
            acc[x] = 0.0f;
        }
        float m = -INFINITY, l = 0.0f;
        /* warp-uniform trip count: the shuffles below need every lane */
        for (int64_t t0 = 0; t0 < L; t0 += (int64_t)kpp * ATT_BATCH) {
            uint4 kv[ATT_BATCH], vv[ATT_BATCH];
#pragma unroll
            for (int u = 0; u < ATT_BATCH; u++) {
                const int64_t t = t0 + (int64_t)u * kpp + g;
                kv[u] = t < L ? *(const uint4 *)(KROW(t, k, k_cache) + part * VE) : make_uint4(0u, 0u, 0u, 0u);
                vv[u] = t < L ? *(const uint4 *)(KROW(t, v, v_cache) + part * VE) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < ATT_BATCH; u++) {
                const int64_t t = t0 + (int64_t)u * kpp + g;
                float kf[VE], s = 0.0f;
                widen(kv[u], kf, T());
#pragma unroll
                for (int x = 0; x < VE; x++)
                    s += qv[x] * kf[x];
                /* the group's lanes are consecutive and tpk divides 32: xor stays inside the group */
                for (int off = tpk / 2; off > 0; off >>= 1)
                    s += __shfl_xor_sync(0xffffffffu, s, off);
                if (t >= L)
                    continue;
                const float mn = fmaxf(m, s), scale = expf(m - mn), pt = expf(s - mn);
                float vf[VE];
                widen(vv[u], vf, T());
#pragma unroll
                for (int x = 0; x < VE; x++)
                    acc[x] = acc[x] * scale + pt * vf[x];
                l = l * scale + pt;
                m = mn;
            }
        }
#pragma unroll
        for (int x = 0; x < VE; x++)
            red[(int64_t)g * D + part * VE + x] = acc[x];
        if (part == 0) {
            gm[g] = m;
            gl[g] = l;
        }
        __syncthreads();
        float M = -INFINITY;
        for (int gg = 0; gg < kpp; gg++)
            M = fmaxf(M, gm[gg]);
        for (int64_t x = tid; x < D; x += blockDim.x) {
            float s = 0.0f, lsum = 0.0f;
            for (int gg = 0; gg < kpp; gg++) {
                const float w = gm[gg] == -INFINITY ? 0.0f : expf(gm[gg] - M); /* a group without keys */
                s += w * red[(int64_t)gg * D + x];
                lsum += w * gl[gg];
            }
            o[x] = moe_cuda_from_f32<T>(s / lsum);
        }
        return;
    }
    float *sc = qs + D; /* [L] scores */
    for (int64_t t = tid; t < L; t += blockDim.x) {
        const T *kr = KROW(t, k, k_cache);
        float s = 0.0f;
        for (int64_t x = 0; x < D; x++)
            s += qs[x] * moe_cuda_f32(kr[x]);
        sc[t] = s;
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
    for (int64_t x = tid; x < D; x += blockDim.x) {
        float s = 0.0f;
        for (int64_t t = 0; t < L; t++)
            s += sc[t] * moe_cuda_f32(KROW(t, v, v_cache)[x]);
        o[x] = moe_cuda_from_f32<T>(s * inv);
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
    if (vecs >= 2 && vecs <= 32 && (vecs & (vecs - 1)) == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
        aligned16(k_cache) && aligned16(v_cache) && (ld * (int64_t)sizeof(T)) % 16 == 0 &&
        (D * (int64_t)sizeof(T)) % 16 == 0)
        tpk = (int)vecs;
    const int64_t kpp = ATT_THREADS / tpk;
    const size_t smem =
        tpk > 1 ? (size_t)(D + kpp * D + 2 * kpp) * sizeof(float) : (size_t)(D + Tc) * sizeof(float);
    if (smem > 200u * 1024u)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda attention_decode: a cache of %lld positions with heads of %lld needs %zu bytes of "
                             "shared memory; use a shorter --max-len-b or the cpu",
                             (long long)Tc, (long long)D, smem);
    static size_t allowed = 0;
    MOE_TRY(smem_attr(c, attention_decode_kernel<T>, smem, &allowed));
    dim3 grid((unsigned)(B * H), (unsigned)n);
    MOE_CUDA_TRY(c, launch_pdl(attention_decode_kernel<T>, grid, dim3(ATT_THREADS), smem, c->stream, (T *)out,
                               (const T *)q, (const T *)k, (const T *)v, ld, (T *)k_cache, (T *)v_cache, cache_len,
                               n_new, n, H, D, Tc, tpk));
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
    int vec;                     /* 16-byte loads of wg's rows */
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

/* writes the E gate logits, rounded to T as the arch's gate GEMM stores them */
template <typename T> struct gate_logit {
    float *l;
    __device__ __forceinline__ void operator()(int64_t e, int, float v) const { l[e] = round_t<T>(v); }
};

#define GATE_R 8 /* gate rows a tile: every row of a gate of up to 8 experts in one pass */

template <typename T, bool VEC>
static __device__ void gate_logits(const gate_params &p, const float *xs, float *red, float *l)
{
    tile_stream<T, VEC, GATE_R, 1> ts((const T *)p.wg, p.d, p.E, p.d);
    ts.prime(0);
    gate_logit<T> epi{l};
    ts.run(0, 1, xs, p.d, 1, red, epi);
}

/* One block per token: LayerNorm, E logits (tiles of GATE_R rows over the
 * whole block), then route_forward's softmax and choices on thread 0, in
 * its order. */
template <typename T> static __global__ void __launch_bounds__(DEC_THREADS) gate_topk_kernel(gate_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [d] */
    __shared__ float l[GATE_MAX_E];
    __shared__ const T *s_row[1];
    __shared__ float red[2 * DEC_WARPS * DEC_MROWS * GATE_R];
    const int64_t s = blockIdx.x;
    pdl_trigger();
    pdl_wait();
    if (p.pad != nullptr && p.pad[s]) {
        if (threadIdx.x < 2) {
            p.expert[s * 2 + threadIdx.x] = -1;
            p.weight[s * 2 + threadIdx.x] = 0.0f;
        }
        return;
    }
    if (threadIdx.x == 0)
        s_row[0] = (const T *)p.x + s * p.d;
    __syncthreads();
    stage_rows_ln<T>(xs, s_row, 1, p.d, p.layernorm, (const T *)p.lnw, (const T *)p.lnb, p.eps);
    if (p.vec)
        gate_logits<T, true>(p, xs, red, l);
    else
        gate_logits<T, false>(p, xs, red, l);
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
        MOE_CUDA_TRY(c, launch_pdl(gate_topk_kernel<TT>, dim3((unsigned)a->S), dim3(DEC_THREADS), smem,  \
                                   c->stream, p));                                             \
    } while (0)
    DEC_DISPATCH_T(a->dt, GATE_CALL);
#undef GATE_CALL
    return MOE_OK;
}

/* --------------------------------------------------------------- experts */

typedef struct ex_params {
    int64_t S, d, f;
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

/* hidden[a_i] = act(v + b1[e]) rounded to T */
template <typename T> struct fc1_epi {
    const ex_params &p;
    const int64_t *asg;
    const T *bias;
    __device__ __forceinline__ void operator()(int64_t j, int i, float v) const
    {
        ((T *)p.hidden)[asg[i] * p.f + j] = moe_cuda_from_f32<T>(moe_cuda_act(v + moe_cuda_f32(bias[j]), p.act));
    }
};

/* eout[a_i] = v + b2[e] rounded to T (kept as fp32) */
template <typename T> struct fc2_epi {
    const ex_params &p;
    const int64_t *asg;
    const T *bias;
    __device__ __forceinline__ void operator()(int64_t j, int i, float v) const
    {
        p.eout[asg[i] * p.d + j] = round_t<T>(v + moe_cuda_f32(bias[j]));
    }
};

#define EX_R 2 /* rows a tile of the experts' products */

/* The products of expert e's weight rows W (nrows of k) with the tokens
 * routed to e, in groups of g staged from rows_of(assignment) (LayerNorm'd
 * with layernorm): epi(j, i, v) for every row j and assignment s_asg[i].
 * Every thread calls it. */
template <typename T, bool VEC, int KC, typename Rows, typename Epi>
static __device__ void expert_rows(const ex_params &p, int e, const T *W, int64_t nrows, int64_t k, int layernorm,
                                   float *xs, int64_t *s_asg, const T **s_rows, float *red, Rows rows_of, Epi &epi)
{
    __shared__ int s_cnt;
    __shared__ int64_t s_next;
    tile_stream<T, VEC, EX_R, KC> ts(W, k, nrows, k);
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
        ts.prime(blockIdx.x); /* the expert's first weights travel during the staging and LayerNorm */
        if (threadIdx.x < mm)
            s_rows[threadIdx.x] = rows_of(s_asg[threadIdx.x]);
        __syncthreads();
        stage_rows_ln<T>(xs, s_rows, mm, k, layernorm, (const T *)p.lnw, (const T *)p.lnb, p.eps);
        ts.run(blockIdx.x, gridDim.x, xs, k, mm, red, epi);
    }
}

template <typename T> struct fc1_rows {
    const ex_params &p;
    __device__ __forceinline__ const T *operator()(int64_t a) const { return (const T *)p.x + (a / 2) * p.d; }
};
template <typename T> struct fc2_rows {
    const ex_params &p;
    __device__ __forceinline__ const T *operator()(int64_t a) const { return (const T *)p.hidden + a * p.f; }
};

/* fc1 of one chosen expert (blockIdx.y), every assignment routed to it:
 * hidden[a] = act(LN(x_s) W1^T + b1) rounded to T. One chunk of d a pass. */
template <typename T> static __global__ void __launch_bounds__(DEC_THREADS) expert_fc1_kernel(ex_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [g][d] */
    __shared__ int64_t s_asg[DEC_MROWS];
    __shared__ const T *s_rows[DEC_MROWS];
    __shared__ int s_e;
    __shared__ float red[2 * DEC_WARPS * DEC_MROWS * EX_R];
    pdl_trigger();
    pdl_wait(); /* the routing is the kernel before's */
    if (threadIdx.x == 0)
        s_e = p.by_rank ? expert_of_rank(p, (int)blockIdx.y) : (int)blockIdx.y;
    __syncthreads();
    const int e = s_e;
    if (e < 0)
        return;
    const T *W = (const T *)p.w1[e];
    fc1_epi<T> epi{p, s_asg, (const T *)p.b1[e]};
    if (p.vec_rows && aligned16(W))
        expert_rows<T, true, 1>(p, e, W, p.f, p.d, p.layernorm, xs, s_asg, s_rows, red, fc1_rows<T>{p}, epi);
    else
        expert_rows<T, false, 1>(p, e, W, p.f, p.d, p.layernorm, xs, s_asg, s_rows, red, fc1_rows<T>{p}, epi);
}

/* fc2 of every chosen expert for this block's tiles of output rows
 * (blockIdx.x, every gridDim.x), then the combine of those rows: the block
 * owns them for every token. Up to four chunks of f a pass. */
template <typename T> static __global__ void __launch_bounds__(DEC_THREADS) expert_fc2_kernel(ex_params p)
{
    extern __shared__ __align__(16) float xs[]; /* [g][f] */
    __shared__ int64_t s_asg[DEC_MROWS];
    __shared__ const T *s_rows[DEC_MROWS];
    __shared__ float red[2 * DEC_WARPS * DEC_MROWS * EX_R];
    pdl_trigger();
    pdl_wait();
    for (int e = 0; e < p.E; e++) {
        const T *W = (const T *)p.w2[e];
        fc2_epi<T> epi{p, s_asg, (const T *)p.b2[e]};
        if (p.vec_rows && aligned16(W))
            expert_rows<T, true, 4>(p, e, W, p.d, p.f, 0, xs, s_asg, s_rows, red, fc2_rows<T>{p}, epi);
        else
            expert_rows<T, false, 4>(p, e, W, p.d, p.f, 0, xs, s_asg, s_rows, red, fc2_rows<T>{p}, epi);
    }
    __syncthreads(); /* every eout row of this block's rows is written */
    T *y = (T *)p.y;
    const int64_t ntiles = (p.d + EX_R - 1) / EX_R;
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x)
        for (int64_t e2 = threadIdx.x; e2 < p.S * EX_R; e2 += blockDim.x) {
            const int64_t s = e2 / EX_R, j = tile * EX_R + e2 % EX_R;
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

template <typename T> static moe_status expert_typed(moe_ctx *c, ex_params p)
{
    constexpr int VE = vec_elems<T>::n;
    /* a group holds the tokens of one expert: at most S */
    ex_params p1 = p, p2 = p;
    p1.g = group_rows(p.S, p.d);
    p2.g = group_rows(p.S, p.f);
    if (p1.g == 0 || p2.g == 0)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda expert_ffn_forward: rows of %lld (d) or %lld (f) need more than the %d bytes of "
                             "shared memory this kernel takes",
                             (long long)p.d, (long long)p.f, DEC_SMEM_MAX);
    p1.vec_rows = p.d % VE == 0;
    p2.vec_rows = p.f % VE == 0;
    p1.by_rank = 2 * p.S <= EX_RANK_MAX;
    const int64_t ny = p1.by_rank ? (2 * p.S < p.E ? 2 * p.S : p.E) : p.E;
    {
        static size_t allowed = 0;
        static int occ = 0;
        const size_t smem = (size_t)p1.g * (size_t)p.d * sizeof(float);
        MOE_TRY(smem_attr(c, expert_fc1_kernel<T>, smem, &allowed));
        MOE_TRY(occupancy_of(c, expert_fc1_kernel<T>, smem, &occ));
        dim3 grid(tile_grid(c, occ, (p.f + EX_R - 1) / EX_R, ny), (unsigned)ny);
        MOE_CUDA_TRY(c, launch_pdl(expert_fc1_kernel<T>, grid, dim3(DEC_THREADS), smem, c->stream, p1));
    }
    {
        static size_t allowed = 0;
        static int occ = 0;
        const size_t smem = (size_t)p2.g * (size_t)p.f * sizeof(float);
        MOE_TRY(smem_attr(c, expert_fc2_kernel<T>, smem, &allowed));
        MOE_TRY(occupancy_of(c, expert_fc2_kernel<T>, smem, &occ));
        MOE_CUDA_TRY(c, launch_pdl(expert_fc2_kernel<T>, dim3(tile_grid(c, occ, (p.d + EX_R - 1) / EX_R, 1)),
                                   dim3(DEC_THREADS), smem, c->stream, p2));
    }
    return MOE_OK;
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
    if (a->E > 65535)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda expert_ffn_forward: expected at most 65535 experts, found %d", a->E);
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
#define STATS_PART 1024   /* vocabulary entries a first-stage block reads (one per thread) */
#define STATS_K_MAX 16    /* K up to which the two-stage path runs */

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

/* The best (value, index) of the block among the candidates each thread
 * offers (bi < 0: none); thread 0 gets it. sv, si: 32 entries. */
static __device__ __forceinline__ void block_best(float &bv, int64_t &bi, float *sv, int64_t *si)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (oi >= 0 && (bi < 0 || ranks_above(ov, oi, bv, bi))) {
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads(); /* sv, si may still be read from a previous call */
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < nw; w++)
            if (si[w] >= 0 && (bi < 0 || ranks_above(sv[w], si[w], bv, bi))) {
                bv = sv[w];
                bi = si[w];
            }
}

/* Stage one, block (part p, row r): entries [p*STATS_PART, ..) of the row,
 * one a thread: their max m, sum of exp(z - m) (double) and top K, into
 * pm, ps, pv, pi at r*P + p. */
static __global__ void __launch_bounds__(STATS_PART)
    logits_part_kernel(float *pm, double *ps, float *pv, int32_t *pi, const float *logits, int64_t V, int P, int K,
                       float temperature)
{
    __shared__ double sd[32];
    __shared__ float sf[32], sv[32];
    __shared__ int64_t si[32];
    __shared__ float s_pv;
    __shared__ int64_t s_pi;
    const int64_t r = blockIdx.y, part = blockIdx.x, v = part * STATS_PART + threadIdx.x;
    const bool have = v < V;
    const float z = have ? zval(logits + r * V, v, temperature) : -INFINITY;
    const float m = moe_cuda_block_max(z, sf);
    const double s = moe_cuda_block_sum_d(have && m != -INFINITY ? (double)expf(z - m) : 0.0, sd);
    const int64_t o = r * P + part;
    if (threadIdx.x == 0) {
        pm[o] = m;
        ps[o] = s;
    }
    /* top K: each round the best entry below the previous one */
    float prev_v = INFINITY;
    int64_t prev_i = -1;
    for (int k = 0; k < K; k++) {
        float bv = z;
        int64_t bi = have && (k == 0 || ranks_above(prev_v, prev_i, z, v)) ? v : -1;
        if (bi < 0)
            bv = -INFINITY;
        block_best(bv, bi, sv, si);
        if (threadIdx.x == 0) {
            pv[o * K + k] = bv;
            pi[o * K + k] = (int32_t)bi;
            s_pv = bv;
            s_pi = bi;
        }
        __syncthreads();
        prev_v = s_pv;
        prev_i = s_pi;
        __syncthreads(); /* s_pv, s_pi are written again next round */
    }
}

/* Stage two, one block a row: lse from the parts' (m, s), the top K among
 * the parts' candidates (ids -1 mark parts with fewer entries than K). */
static __global__ void __launch_bounds__(256)
    logits_merge_kernel(float *lse, float *top_val, int32_t *top_idx, float *tgt, const float *pm, const double *ps,
                        const float *pv, const int32_t *pi, const float *logits, const int32_t *targets, int64_t V,
                        int P, int K, float temperature)
{
    __shared__ double sd[32];
    __shared__ float sf[32], sv[32];
    __shared__ int64_t si[32];
    __shared__ float s_pv;
    __shared__ int64_t s_pi;
    const int64_t r = blockIdx.x;
    float m = -INFINITY;
    for (int p = threadIdx.x; p < P; p += blockDim.x)
        m = fmaxf(m, pm[r * P + p]);
    const float M = moe_cuda_block_max(m, sf);
    double s = 0.0;
    if (M != -INFINITY)
        for (int p = threadIdx.x; p < P; p += blockDim.x) {
            const float mp = pm[r * P + p];
            if (mp != -INFINITY)
                s += ps[r * P + p] * exp((double)mp - (double)M);
        }
    s = moe_cuda_block_sum_d(s, sd);
    if (threadIdx.x == 0) {
        if (lse != nullptr)
            lse[r] = M == -INFINITY ? -INFINITY : M + (float)log(s);
        if (tgt != nullptr && targets != nullptr)
            tgt[r] = zval(logits + r * V, targets[r], temperature);
    }
    float prev_v = INFINITY;
    int64_t prev_i = -1;
    const int64_t C = (int64_t)P * K;
    for (int k = 0; k < K; k++) {
        float bv = -INFINITY;
        int64_t bi = -1;
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
            const int64_t ci = pi[r * C + c];
            const float cv = pv[r * C + c];
            if (ci < 0 || (k > 0 && !ranks_above(prev_v, prev_i, cv, ci)))
                continue;
            if (bi < 0 || ranks_above(cv, ci, bv, bi)) {
                bv = cv;
                bi = ci;
            }
        }
        block_best(bv, bi, sv, si);
        if (threadIdx.x == 0) {
            top_val[r * K + k] = bv;
            top_idx[r * K + k] = (int32_t)bi;
            s_pv = bv;
            s_pi = bi;
        }
        __syncthreads();
        prev_v = s_pv;
        prev_i = s_pi;
        __syncthreads();
    }
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
    if (R > 65535 || K > STATS_K_MAX) {
        /* one block a row, K passes over it */
        if (R > INT32_MAX)
            return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED, "cuda logits_stats: %lld rows is too many", (long long)R);
        logits_stats_kernel<<<(unsigned)R, STATS_THREADS, 0, c->stream>>>(lse, top_val, top_idx, tgt, logits, targets,
                                                                           V, K, temperature);
        MOE_CUDA_CHECK_LAUNCH(c);
        return MOE_OK;
    }
    /* two stages: parts of STATS_PART entries in parallel, then a merge a row */
    const int64_t P = (V + STATS_PART - 1) / STATS_PART;
    const int64_t n = R * P, kk = K > 0 ? K : 1;
    const uint64_t bytes = (uint64_t)n * (8u + 4u + (uint64_t)kk * 8u) + 64u;
    void *ws = NULL;
    MOE_TRY(moe_cuda_scratch_alloc(c, bytes, "logits_stats partials", &ws));
    double *ps = (double *)ws;
    float *pm = (float *)(ps + n), *pv = pm + n;
    int32_t *pi = (int32_t *)(pv + n * kk);
    logits_part_kernel<<<dim3((unsigned)P, (unsigned)R), STATS_PART, 0, c->stream>>>(pm, ps, pv, pi, logits, V,
                                                                                    (int)P, K, temperature);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) {
        logits_merge_kernel<<<(unsigned)R, 256, 0, c->stream>>>(lse, top_val, top_idx, tgt, pm, ps, pv, pi, logits,
                                                               targets, V, (int)P, K, temperature);
        e = cudaGetLastError();
    }
    moe_cuda_scratch_free(c, ws);
    MOE_CUDA_TRY(c, e);
    return MOE_OK;
}
