/* grouped.cu: the cuda backend's expert_rows and grouped_matmul (ops.h, ABI
 * 1.5): the local experts' products over the rows routing filled, with the
 * counts read by the kernels on the device, so the sizes never visit the
 * host and the step stays capturable in a graph.
 *
 * grouped_matmul for fp16/bf16 with 16-byte aligned rows is a tensor-core
 * kernel: 128 x 128 output tiles, k steps of 64 through 3 stages of cp.async
 * copies (rows past a count or a bound are zero-filled), 4 warps of 64 x 64
 * (a larger warp tile, less ldmatrix traffic per product), the epilogue
 * (alpha, beta, bias, activation or its derivative) on the accumulators,
 * mma.sync m16n8k16 with fp32 accumulators (kernels/cuda/mma.cuh), operands
 * read from shared memory by ldmatrix, transposed by ldmatrix .trans where
 * an operand is stored the other way. Block to tile:
 *  - trans_a == 0 (rows vary in m: expert forward, input gradients): block
 *    (x, y) is n tile x of the y-th m tile of the groups' concatenated
 *    tiles (n fastest, so the blocks in flight share their A rows); it
 *    walks the groups' tile counts ceil(min(rows[g], m) / 128) to find its
 *    group. The grid holds the host's bound on the tiles (ceil(rows_total /
 *    128) + groups), blocks past the last tile return.
 *  - trans_a == 1 (rows vary in k: weight gradients): block (x, y, g) owns
 *    one output tile of group g and sums over its rows.
 * Everything else (fp32, odd sizes, unaligned operands) takes a plain kernel,
 * one thread per output element, same results up to rounding. dbias is a
 * column sum over each group's rows, added in a fixed order.
 *
 * Groups travel in the kernels' parameters, GM_MAXG per launch (parameter
 * space is 4 KB); more groups take several launches.
 */
#include <string.h>

#include <type_traits>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/grouped.h"
#include "kernels/cuda/mma.cuh"

#define GM_BM 128
#define GM_BN 128
#define GM_BK 64
#define GM_STAGES 3
#define GM_THREADS 128
#define GM_MAXG 64
#define GM_LDK (GM_BK + 8)  /* a [rows][k] tile's row stride: ldmatrix rows hit distinct banks */
#define GM_LDR (GM_BM + 8)  /* a [k][rows] tile's */
#define GM_TILE (GM_BM * GM_LDK > GM_BK * GM_LDR ? GM_BM * GM_LDK : GM_BK * GM_LDR)
#define GM_SMEM (2 * GM_STAGES * GM_TILE * 2)

/* ------------------------------------------------------------ expert_rows */

static __global__ void expert_rows_kernel(int32_t *rows, const int32_t *expert, const int32_t *slot, int64_t n,
                                          int E, int64_t C)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int32_t e = expert[i], s = slot[i];
        if (e >= 0 && e < E && s >= 0 && s < C)
            atomicMax(rows + e, s + 1);
    }
}

moe_status moe_cuda_expert_rows(moe_ctx *c, int32_t *rows, const int32_t *expert, const int32_t *slot, int64_t S,
                                int W, int E, int64_t C)
{
    if (S < 0 || W < 1 || E < 1 || C < 0 || C > INT32_MAX || (S > 0 && (expert == NULL || slot == NULL)))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda expert_rows: expected S >= 0, W >= 1, E >= 1, 0 <= C < 2^31 and the routing "
                             "arrays, found S %lld, W %d, E %d, C %lld",
                             (long long)S, W, E, (long long)C);
    MOE_CUDA_TRY(c, cudaMemsetAsync(rows, 0, (size_t)E * sizeof *rows, c->stream));
    const int64_t n = S * W;
    if (n == 0)
        return MOE_OK;
    expert_rows_kernel<<<moe_cuda_blocks(c, n, MOE_CUDA_THREADS), MOE_CUDA_THREADS, 0, c->stream>>>(rows, expert, slot,
                                                                                                   n, E, C);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

/* --------------------------------------------------------- grouped_matmul */

typedef struct gm_params {
    int64_t groups; /* in this launch, <= GM_MAXG */
    const int32_t *rows;
    int64_t m, n, k;
    float alpha, beta;
    int64_t lda, ldb, ldc;
    int epi; /* moe_epilogue */
    int act; /* moe_act_kind */
    const void *a[GM_MAXG], *b[GM_MAXG];
    void *c[GM_MAXG];
    const void *bias[GM_MAXG];
    void *aux[GM_MAXG];
} gm_params;

/* the rows of group g the product covers, clamped to [0, bound] */
static __device__ __forceinline__ int64_t gm_rows(const gm_params &p, int64_t g, int64_t bound)
{
    const int64_t r = p.rows[g];
    return r < 0 ? 0 : r > bound ? bound : r;
}

/* The epilogue of one element from its fp32 product acc, given the bias at
 * its column (0 without one) and what it reads at its place (C with beta,
 * the pre-activation with DACT): alpha, beta, the bias, then the activation
 * or its derivative; *pre gets the pre-activation BIAS_ACT keeps in aux. */
static __device__ __forceinline__ float gm_epilogue(const gm_params &p, float acc, float bias, float in, float *pre)
{
    const float v = p.alpha * acc;
    if (p.epi == MOE_EPI_DACT)
        return moe_cuda_act_backward_one(v, in, (moe_act_kind)p.act);
    *pre = p.beta != 0.0f ? v + p.beta * in : v;
    if (p.epi == MOE_EPI_BIAS || p.epi == MOE_EPI_BIAS_ACT)
        *pre += bias;
    return p.epi == MOE_EPI_BIAS_ACT ? moe_cuda_act(*pre, (moe_act_kind)p.act) : *pre;
}

/* C(r, j) of group g (and aux with BIAS_ACT) from the fp32 product acc */
template <typename T>
static __device__ __forceinline__ void gm_store(const gm_params &p, int64_t g, int64_t r, int64_t j, float acc)
{
    T *c = (T *)p.c[g];
    const int64_t at = r * p.ldc + j;
    const float bias =
        p.epi == MOE_EPI_BIAS || p.epi == MOE_EPI_BIAS_ACT ? moe_cuda_f32(((const T *)p.bias[g])[j]) : 0.0f;
    const float in = p.epi == MOE_EPI_DACT ? moe_cuda_f32(((const T *)p.aux[g])[at])
                     : p.beta != 0.0f      ? moe_cuda_f32(c[at])
                                           : 0.0f;
    float pre = 0.0f;
    const float v = gm_epilogue(p, acc, bias, in, &pre);
    if (p.epi == MOE_EPI_BIAS_ACT && p.aux[g])
        ((T *)p.aux[g])[at] = moe_cuda_from_f32<T>(pre);
    c[at] = moe_cuda_from_f32<T>(v);
}

/* gm_store of C(r, j) and C(r, j + 1) as one 4-byte store each (j even,
 * rows 4-byte aligned: the tensor-core path's conditions), given the bias
 * at j, j + 1 and what the epilogue reads there (C with beta, or the
 * pre-activations with DACT), loaded beforehand */
template <typename T>
static __device__ __forceinline__ void gm_store2(const gm_params &p, int64_t g, int64_t r, int64_t j, float a0,
                                                 float a1, const float bias[2], const float in[2])
{
    const int64_t at = r * p.ldc + j;
    float pre0 = 0.0f, pre1 = 0.0f;
    const float v0 = gm_epilogue(p, a0, bias[0], in[0], &pre0), v1 = gm_epilogue(p, a1, bias[1], in[1], &pre1);
    if (p.epi == MOE_EPI_BIAS_ACT && p.aux[g])
        *(uint32_t *)((T *)p.aux[g] + at) = pack2<T>(pre0, pre1);
    *(uint32_t *)((T *)p.c[g] + at) = pack2<T>(v0, v1);
}

/* op(A)(i, q) and op(B)(q, j) of group g, row-major storage */
template <typename T>
static __device__ __forceinline__ float gm_a(const gm_params &p, int ta, int64_t g, int64_t i, int64_t q)
{
    return moe_cuda_f32(((const T *)p.a[g])[ta ? q * p.lda + i : i * p.lda + q]);
}
template <typename T>
static __device__ __forceinline__ float gm_b(const gm_params &p, int tb, int64_t g, int64_t q, int64_t j)
{
    return moe_cuda_f32(((const T *)p.b[g])[tb ? j * p.ldb + q : q * p.ldb + j]);
}

/* the plain path: one thread per C element, grid (n / 16, bound / 16, groups) */
template <typename T> static __global__ void gm_plain_kernel(gm_params p, int ta, int tb)
{
    const int64_t g = blockIdx.z;
    const int64_t i = (int64_t)blockIdx.y * 16 + threadIdx.y, j = (int64_t)blockIdx.x * 16 + threadIdx.x;
    const int64_t M = ta ? p.m : gm_rows(p, g, p.m), K = ta ? gm_rows(p, g, p.k) : p.k;
    if (i >= M || j >= p.n || (ta && K == 0 && p.beta == 1.0f && p.epi == MOE_EPI_NONE))
        return;
    float acc = 0.0f;
    for (int64_t q = 0; q < K; q++)
        acc += gm_a<T>(p, ta, g, i, q) * gm_b<T>(p, tb, g, q, j);
    gm_store<T>(p, g, i, j, acc);
}

/* 16 bytes from src to shared dst, or zeros when !pred (nothing is read) */
static __device__ __forceinline__ void cp_async16_or_zero(void *dst, const void *src, bool pred)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(pred ? 16 : 0));
}

/* This thread's copies of one operand's tiles: TILE_ROWS rows of TILE_COLS
 * elements (stride LD) of a row-major operand, 16-byte chunks (r + i RSTEP,
 * ch) for i < NI. ROWS_K: the tile's rows are k (they advance with the k
 * step), else its columns are. The addresses and the validity of the fixed
 * side are computed once; a k step adds an offset and compares once per
 * chunk, so the copies cost little integer work next to the products. */
template <int TILE_ROWS, int TILE_COLS, int LD, bool ROWS_K, typename T> struct gm_src {
    static constexpr int CH = TILE_COLS / 8, RSTEP = GM_THREADS / CH, NI = TILE_ROWS / RSTEP;
    static_assert(NI * RSTEP == TILE_ROWS && NI <= 32, "tile copies split evenly over the block");
    const T *src, *base; /* the operand; this thread's first chunk at k = 0 */
    int64_t ld;
    int r, ch;
    uint32_t fixed_ok; /* ROWS_K: the column chunk is inside; else bit i: row r + i RSTEP is */

    /* rows from r0 (below rlim), columns from c0 (below clim) */
    __device__ __forceinline__ gm_src(const T *src_, int64_t ld_, int64_t r0, int64_t rlim, int64_t c0, int64_t clim)
        : src(src_), ld(ld_), r(threadIdx.x / CH), ch((threadIdx.x % CH) * 8)
    {
        base = src + (r0 + r) * ld + c0 + ch;
        fixed_ok = 0;
        if (ROWS_K)
            fixed_ok = c0 + ch < clim;
        else
#pragma unroll
            for (int i = 0; i < NI; i++)
                fixed_ok |= (uint32_t)(r0 + r + i * RSTEP < rlim) << i;
    }

    /* the tile of the k step at k0 into dst; krem = the valid k left from k0 */
    __device__ __forceinline__ void load(T *dst, int64_t k0, int64_t krem) const
    {
        const T *at = base + (ROWS_K ? k0 * ld : k0);
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int rr = r + i * RSTEP;
            const bool ok = ROWS_K ? (fixed_ok && rr < krem) : (((fixed_ok >> i) & 1u) && ch < krem);
            cp_async16_or_zero(dst + rr * LD + ch, ok ? at + (int64_t)i * RSTEP * ld : src, ok);
        }
    }
};

template <int TA, int TB, typename T>
static __global__ void __launch_bounds__(GM_THREADS) gm_mma_kernel(gm_params p)
{
    extern __shared__ __align__(16) unsigned char gm_smem[];
    T *smem = (T *)gm_smem;
    /* the block's group and tile */
    int64_t g, m0, Mlim, Klim;
    if (TA == 0) {
        int64_t t = blockIdx.y;
        for (g = 0; g < p.groups; g++) {
            const int64_t tiles = (gm_rows(p, g, p.m) + GM_BM - 1) / GM_BM;
            if (t < tiles)
                break;
            t -= tiles;
        }
        if (g == p.groups)
            return;
        m0 = t * GM_BM;
        Mlim = gm_rows(p, g, p.m);
        Klim = p.k;
    } else {
        g = blockIdx.z;
        m0 = (int64_t)blockIdx.y * GM_BM;
        Mlim = p.m;
        Klim = gm_rows(p, g, p.k);
        if (Klim == 0 && p.beta == 1.0f && p.epi == MOE_EPI_NONE)
            return;
    }
    const int64_t n0 = (int64_t)blockIdx.x * GM_BN;
    const T *a = (const T *)p.a[g], *b = (const T *)p.b[g];
    const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;

    float acc[4][8][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
            acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

    /* A: [m][k] (TA 0) or [k][m] (TA 1); B: [n][k] (TB 1) or [k][n] (TB 0) */
    const gm_src<TA == 0 ? GM_BM : GM_BK, TA == 0 ? GM_BK : GM_BM, TA == 0 ? GM_LDK : GM_LDR, TA == 1, T> sa(
        a, p.lda, TA == 0 ? m0 : 0, Mlim, TA == 0 ? 0 : m0, Mlim);
    const gm_src<TB == 1 ? GM_BN : GM_BK, TB == 1 ? GM_BK : GM_BN, TB == 1 ? GM_LDK : GM_LDR, TB == 0, T> sb(
        b, p.ldb, TB == 1 ? n0 : 0, p.n, TB == 1 ? 0 : n0, p.n);
    const int KT = (int)((Klim + GM_BK - 1) / GM_BK);
#pragma unroll
    for (int s = 0; s < GM_STAGES - 1; s++) {
        if (s < KT) {
            sa.load(smem + 2 * s * GM_TILE, (int64_t)s * GM_BK, Klim - (int64_t)s * GM_BK);
            sb.load(smem + (2 * s + 1) * GM_TILE, (int64_t)s * GM_BK, Klim - (int64_t)s * GM_BK);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<GM_STAGES - 2>();
        __syncthreads();
        const int nk = kt + GM_STAGES - 1;
        if (nk < KT) {
            const int s = nk % GM_STAGES;
            const int64_t k0 = (int64_t)nk * GM_BK;
            sa.load(smem + 2 * s * GM_TILE, k0, Klim - k0);
            sb.load(smem + (2 * s + 1) * GM_TILE, k0, Klim - k0);
        }
        cp_async_commit();
        const T *As = smem + 2 * (kt % GM_STAGES) * GM_TILE, *Bs = As + GM_TILE;
#pragma unroll
        for (int kk = 0; kk < GM_BK; kk += 16) {
            uint32_t af[4][4], bf[8][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                if (TA == 0)
                    frag_a<GM_LDK>(af[mi], As, wm * 64 + mi * 16, kk);
                else
                    frag_a_t<GM_LDR>(af[mi], As, wm * 64 + mi * 16, kk);
            }
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t r[4];
                if (TB == 1)
                    frag_b_nk<GM_LDK>(r, Bs, wn * 64 + np * 16, kk);
                else
                    frag_b_kn<GM_LDR>(r, Bs, kk, wn * 64 + np * 16);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int nj = 0; nj < 8; nj++)
                    mma16816<T>(acc[mi][nj], af[mi], bf[nj][0], bf[nj][1]);
        }
    }
    cp_async_wait<0>();

    /* The epilogue reads (bias, pre-activations, C with beta) before it
     * writes: the compiler cannot move a load past a store to a pointer that
     * may alias it, so loads interleaved with stores would each wait out a
     * memory latency. */
    const int lane = threadIdx.x & 31, gr = lane >> 2, cq = lane & 3;
    float bias[8][2];
#pragma unroll
    for (int nj = 0; nj < 8; nj++) {
        const int64_t j = n0 + wn * 64 + nj * 8 + 2 * cq;
        bias[nj][0] = bias[nj][1] = 0.0f;
        if ((p.epi == MOE_EPI_BIAS || p.epi == MOE_EPI_BIAS_ACT) && j < p.n) {
            const T *b = (const T *)p.bias[g] + j;
            bias[nj][0] = moe_cuda_f32(b[0]);
            bias[nj][1] = moe_cuda_f32(b[1]);
        }
    }
    const bool read = p.epi == MOE_EPI_DACT || p.beta != 0.0f;
    const T *src = (const T *)(p.epi == MOE_EPI_DACT ? p.aux[g] : p.c[g]);
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
        const int64_t r = m0 + wm * 64 + mi * 16 + gr;
        float in[8][4];
#pragma unroll
        for (int nj = 0; nj < 8; nj++) {
            const int64_t j = n0 + wn * 64 + nj * 8 + 2 * cq;
            in[nj][0] = in[nj][1] = in[nj][2] = in[nj][3] = 0.0f;
            if (read && j < p.n) {
                if (r < Mlim) {
                    in[nj][0] = moe_cuda_f32(src[r * p.ldc + j]);
                    in[nj][1] = moe_cuda_f32(src[r * p.ldc + j + 1]);
                }
                if (r + 8 < Mlim) {
                    in[nj][2] = moe_cuda_f32(src[(r + 8) * p.ldc + j]);
                    in[nj][3] = moe_cuda_f32(src[(r + 8) * p.ldc + j + 1]);
                }
            }
        }
#pragma unroll
        for (int nj = 0; nj < 8; nj++) {
            const int64_t j = n0 + wn * 64 + nj * 8 + 2 * cq;
            if (j >= p.n)
                continue;
            if (r < Mlim)
                gm_store2<T>(p, g, r, j, acc[mi][nj][0], acc[mi][nj][1], bias[nj], in[nj]);
            if (r + 8 < Mlim)
                gm_store2<T>(p, g, r + 8, j, acc[mi][nj][2], acc[mi][nj][3], bias[nj], in[nj] + 2);
        }
    }
}

/* dbias[g](j) += alpha * sum over the first rows[g] rows of A(g) (K x m,
 * row-major): 64 columns x 4 row lanes a block, the lanes added in order */
typedef struct gm_dbias_params {
    int64_t groups;
    const int32_t *rows;
    int64_t m, k, lda;
    float alpha;
    const void *a[GM_MAXG];
    void *dbias[GM_MAXG];
} gm_dbias_params;

template <typename T> static __global__ void gm_dbias_kernel(gm_dbias_params p)
{
    __shared__ float part[4][64];
    const int64_t g = blockIdx.y, j = (int64_t)blockIdx.x * 64 + (threadIdx.x & 63);
    const int lane_r = threadIdx.x >> 6;
    const int64_t r = p.rows[g], K = r < 0 ? 0 : r > p.k ? p.k : r;
    const T *a = (const T *)p.a[g];
    float s = 0.0f;
    if (j < p.m)
        for (int64_t q = lane_r; q < K; q += 4)
            s += moe_cuda_f32(a[q * p.lda + j]);
    part[lane_r][threadIdx.x & 63] = s;
    __syncthreads();
    if (lane_r == 0 && j < p.m) {
        const float t = ((part[0][threadIdx.x] + part[1][threadIdx.x]) + part[2][threadIdx.x]) + part[3][threadIdx.x];
        T *db = (T *)p.dbias[g];
        db[j] = moe_cuda_from_f32<T>(moe_cuda_f32(db[j]) + p.alpha * t);
    }
}

static bool aligned16(const void *p, int64_t ld) { return ((uintptr_t)p % 16u) == 0 && ld % 8 == 0; }

/* Whether groups [g0, g0 + G) take the tensor-core kernel */
static bool use_mma(const moe_grouped_matmul_args *a, int64_t g0, int64_t G)
{
    if (a->dtype != MOE_F16 && a->dtype != MOE_BF16)
        return false;
    if (a->n % 8 != 0 || (a->trans_a ? a->m % 8 : a->k % 8) != 0 || (a->trans_b ? a->k % 8 : a->n % 8) != 0)
        return false;
    for (int64_t g = g0; g < g0 + G; g++)
        if (!aligned16(a->a[g], a->lda) || !aligned16(a->b[g], a->ldb) || !aligned16(a->c[g], a->ldc) ||
            (a->aux && a->aux[g] && !aligned16(a->aux[g], a->ldc)))
            return false;
    return true;
}

template <typename T> static moe_status launch(moe_ctx *c, const moe_grouped_matmul_args *a, int64_t g0, int64_t G)
{
    gm_params p;
    memset(&p, 0, sizeof p);
    p.groups = G;
    p.rows = a->rows + g0;
    p.m = a->m;
    p.n = a->n;
    p.k = a->k;
    p.alpha = a->alpha;
    p.beta = a->beta;
    p.lda = a->lda;
    p.ldb = a->ldb;
    p.ldc = a->ldc;
    p.epi = (int)a->epilogue;
    p.act = (int)a->act;
    for (int64_t g = 0; g < G; g++) {
        p.a[g] = a->a[g0 + g];
        p.b[g] = a->b[g0 + g];
        p.c[g] = a->c[g0 + g];
        p.bias[g] = a->bias ? a->bias[g0 + g] : NULL;
        p.aux[g] = a->aux ? a->aux[g0 + g] : NULL;
    }
    bool mma = false;
    if constexpr (!std::is_same<T, float>::value) {
        if (use_mma(a, g0, G)) {
            mma = true;
            const unsigned nt = (unsigned)((a->n + GM_BN - 1) / GM_BN);
            const int64_t mt_bound = (a->m + GM_BM - 1) / GM_BM;
            dim3 grid;
            void (*kern)(gm_params);
            if (!a->trans_a) {
                int64_t tiles = G * mt_bound;
                if (a->rows_total > 0 && (a->rows_total + GM_BM - 1) / GM_BM + G < tiles)
                    tiles = (a->rows_total + GM_BM - 1) / GM_BM + G;
                if (tiles > 65535)
                    return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                                         "cuda grouped_matmul: %lld row tiles exceed a launch's 65535; pass a "
                                         "tighter rows_total or fewer groups",
                                         (long long)tiles);
                grid = dim3(nt, (unsigned)tiles, 1);
                kern = a->trans_b ? gm_mma_kernel<0, 1, T> : gm_mma_kernel<0, 0, T>;
            } else {
                grid = dim3(nt, (unsigned)mt_bound, (unsigned)G);
                kern = a->trans_b ? gm_mma_kernel<1, 1, T> : gm_mma_kernel<1, 0, T>;
            }
            if (grid.x == 0 || grid.y == 0)
                return MOE_OK;
            MOE_CUDA_TRY(c, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, GM_SMEM));
            kern<<<grid, GM_THREADS, GM_SMEM, c->stream>>>(p);
        }
    }
    if (!mma) {
        dim3 grid((unsigned)((a->n + 15) / 16), (unsigned)((a->m + 15) / 16), (unsigned)G);
        gm_plain_kernel<T><<<grid, dim3(16, 16), 0, c->stream>>>(p, a->trans_a, a->trans_b);
    }
    MOE_CUDA_CHECK_LAUNCH(c);
    if (a->dbias && a->m > 0) {
        gm_dbias_params q;
        memset(&q, 0, sizeof q);
        q.groups = G;
        q.rows = a->rows + g0;
        q.m = a->m;
        q.k = a->k;
        q.lda = a->lda;
        q.alpha = a->alpha;
        for (int64_t g = 0; g < G; g++) {
            q.a[g] = a->a[g0 + g];
            q.dbias[g] = a->dbias[g0 + g];
        }
        gm_dbias_kernel<T><<<dim3((unsigned)((a->m + 63) / 64), (unsigned)G), 256, 0, c->stream>>>(q);
        MOE_CUDA_CHECK_LAUNCH(c);
    }
    return MOE_OK;
}

moe_status moe_cuda_grouped_matmul(moe_ctx *c, const moe_grouped_matmul_args *a)
{
    if (a->groups < 0 || a->m < 0 || a->n < 0 || a->k < 0 ||
        (a->groups > 0 && (a->rows == NULL || a->a == NULL || a->b == NULL || a->c == NULL)))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda grouped_matmul: expected groups, m, n, k >= 0 and rows, a, b, c arrays, found "
                             "groups %lld, m %lld, n %lld, k %lld",
                             (long long)a->groups, (long long)a->m, (long long)a->n, (long long)a->k);
    const int64_t a_cols = a->trans_a ? a->m : a->k, b_cols = a->trans_b ? a->k : a->n;
    if (a->lda < a_cols || a->ldb < b_cols || a->ldc < a->n)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda grouped_matmul: expected lda >= %lld, ldb >= %lld, ldc >= %lld, found %lld, %lld, %lld",
                             (long long)a_cols, (long long)b_cols, (long long)a->n, (long long)a->lda,
                             (long long)a->ldb, (long long)a->ldc);
    if (a->epilogue > MOE_EPI_DACT || ((a->epilogue == MOE_EPI_BIAS || a->epilogue == MOE_EPI_BIAS_ACT) && !a->bias))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda grouped_matmul: expected the epilogue NONE, BIAS, BIAS_ACT or DACT (the bias ones "
                             "with a bias array), found %d",
                             (int)a->epilogue);
    if (a->epilogue == MOE_EPI_DACT && (a->trans_a || a->beta != 0.0f || !a->aux))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda grouped_matmul: the DACT epilogue expects trans_a 0, beta 0 and the pre-activations "
                             "(aux)");
    if ((a->epilogue == MOE_EPI_BIAS_ACT && (a->beta != 0.0f || a->trans_a)) || (a->dbias && !a->trans_a))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda grouped_matmul: BIAS_ACT expects beta 0 and trans_a 0, dbias trans_a 1");
    if (a->dtype != MOE_F32 && a->dtype != MOE_F16 && a->dtype != MOE_BF16)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda grouped_matmul: expected a f32/f16/bf16 dtype, found %d",
                             (int)a->dtype);
    if (a->n == 0 || (!a->trans_a && a->m == 0))
        return MOE_OK;
    for (int64_t g0 = 0; g0 < a->groups; g0 += GM_MAXG) {
        const int64_t G = a->groups - g0 < GM_MAXG ? a->groups - g0 : GM_MAXG;
        if (a->dtype == MOE_F16)
            MOE_TRY(launch<__half>(c, a, g0, G));
        else if (a->dtype == MOE_BF16)
            MOE_TRY(launch<__nv_bfloat16>(c, a, g0, G));
        else
            MOE_TRY(launch<float>(c, a, g0, G));
    }
    return MOE_OK;
}
