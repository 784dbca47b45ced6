/* attention.cu: causal multi-head attention of the cuda backend, forward and
 * backward, flash-style: the scores of a (query tile, key tile) pair live
 * only in registers (and shared memory on the fp32 path), softmax statistics
 * are carried online, and nothing of size T x T ever reaches global memory.
 *
 * Two paths with the same math (kernels/cpu/attention.c is the reference):
 *  - fp16/bf16 with head_dim 32, 64 or 128: tensor cores, FlashAttention-2
 *    style (mma.sync with ldmatrix operands; blocks of 4 warps own 128 rows
 *    at head dim <= 64 (64 at 128, and in the dQ pass), the other side
 *    streams in tiles of 64 copied with cp.async while the current one is
 *    used; exponentials by the hardware's ex2 (__expf), as FlashAttention
 *    does: the softmax and the dropout draws, not the tensor cores, bound
 *    these kernels at these head sizes). Scores and their gradients are fp32 in registers; the
 *    probabilities and dS that feed the P.V, dS.K and dS^T.Q products are
 *    rounded to the storage dtype, as in FlashAttention-2.
 *  - every other case (fp32, other head sizes up to 256): CUDA cores in fp32,
 *    one warp per query (or key) row over key (or query) tiles of 32 staged
 *    in shared memory.
 * Backward recomputes the probabilities from the saved lse in two passes, one
 * owning a key tile (dK, dV) and one owning a query tile (dQ), so every
 * gradient element has a single writer and no atomics are needed. D_i =
 * dO_i . O_i comes first from its own small kernel.
 *
 * Dropout on the probabilities draws index ((b*H + h)*T + i)*T + j with
 * kernels/philox.h's 16-bit attention draws, as the cpu does, so masks match
 * exactly in both directions. With T % 8 == 0 the eight keys 8m .. 8m+7 of
 * a row are one Philox group, and the tensor-core path evaluates each group
 * once: the lanes holding a pair of 8-key blocks share the groups they touch
 * (one evaluation a lane) and swap bytes (keep_rows, keep_cols). Other T
 * (and the fp32 path) draw score by score.
 */
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/mma.cuh"

#define SA_ROWS 8     /* warps (rows) per block on the simple path */
#define SA_TILE 32    /* keys or queries staged per step on the simple path */
#define SA_DMAX 256
#define SA_PER_LANE (SA_DMAX / 32)

/* dropout factor keep/(1-p) of score (bh, i, j), or 1 without dropout */
static __device__ __forceinline__ float drop_factor(float p, float scale, uint64_t seed, uint64_t stream, int64_t bh,
                                                    int64_t T, int64_t i, int64_t j)
{
    if (p == 0.0f)
        return 1.0f;
    uint64_t counter = (uint64_t)((bh * T + i) * T + j);
    return moe_philox_keep16(seed, stream, counter, moe_philox_threshold16(p)) ? scale : 0.0f;
}

/* Row-major mma tile (rows ia, ib = ia + 8; this lane's keys jt + 8u + 2cq,
 * +1 of the two 8-key column blocks u = 0, 1 at jt), T % 8 == 0: keep bits
 * in accumulator order, bit 4u + e for element e of block u (0, 1: row ia;
 * 2, 3: row ib). A quad's lanes share four Philox groups (rows ia, ib x
 * blocks 0, 1): lane cq draws row cq & 1 of block cq >> 1, the quad swaps
 * the bytes. Every lane of the warp must call this. */
static __device__ __forceinline__ unsigned keep_rows(uint32_t thr, uint64_t seed, uint64_t stream, int64_t bh,
                                                     int64_t T, int64_t ia, int64_t ib, int64_t jt, int cq)
{
    const int64_t row = cq & 1 ? ib : ia, jg = jt + 8 * (cq >> 1);
    unsigned all = moe_philox_keep8(seed, stream, (uint64_t)((bh * T + row) * T + jg) >> 3, thr) << (8 * cq);
    all |= __shfl_xor_sync(0xffffffffu, all, 1);
    all |= __shfl_xor_sync(0xffffffffu, all, 2); /* byte 2u + r: block u, row r */
    unsigned keep = 0;
#pragma unroll
    for (int u = 0; u < 2; u++)
        keep |= ((all >> (16 * u + 2 * cq)) & 3u | ((all >> (16 * u + 8 + 2 * cq)) & 3u) << 2) << (4 * u);
    return keep;
}

/* Transposed mma tile (rows: keys jw + g and jw + g + 8 of the warp's 16 at
 * jw; columns: this lane's queries it + 8u + 2cq, +1 of the two 8-query
 * blocks u = 0, 1 at it), T % 8 == 0: keep bits in accumulator order, bit
 * 4u + e for element e of block u (e & 1: the second query, e >> 1: the
 * second key). The block pair touches 32 Philox groups (16 queries x two
 * 8-key halves), one a lane: lane (g, cq) draws query it + 8(cq >> 1) + g,
 * half cq & 1; each quad gathers its query's four groups, and a lane takes
 * the words of the two queries it holds. Every lane of the warp must call
 * this. */
static __device__ __forceinline__ unsigned keep_cols(uint32_t thr, uint64_t seed, uint64_t stream, int64_t bh,
                                                     int64_t T, int64_t it, int64_t jw, int g, int cq)
{
    const int64_t row = it + 8 * (cq >> 1) + g, jg = jw + 8 * (cq & 1);
    unsigned all = moe_philox_keep8(seed, stream, (uint64_t)((bh * T + row) * T + jg) >> 3, thr) << (8 * cq);
    all |= __shfl_xor_sync(0xffffffffu, all, 1);
    all |= __shfl_xor_sync(0xffffffffu, all, 2); /* quad r: byte 2u + half of query it + 8u + r */
    const unsigned w0 = __shfl_sync(0xffffffffu, all, 8 * cq), w1 = __shfl_sync(0xffffffffu, all, 8 * cq + 4);
    unsigned keep = 0;
#pragma unroll
    for (int u = 0; u < 2; u++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            keep |= (((e & 1 ? w1 : w0) >> (8 * (2 * u + (e >> 1)) + g)) & 1u) << (4 * u + e);
    return keep;
}

/* D_i = dO_i . O_i, one warp per (b, t, h) row */
static __global__ void attn_delta_kernel(float *delta, const void *dout, const void *out, int64_t B, int64_t T,
                                         int64_t H, int64_t D, moe_dtype dt)
{
    int lane = threadIdx.x & 31;
    int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= B * T * H)
        return;
    int64_t h = row % H, bt = row / H, b = bt / T, t = bt % T;
    int64_t base = bt * H * D + h * D;
    double s = 0.0;
    for (int64_t d = lane; d < D; d += 32)
        s += (double)moe_cuda_ld(dout, dt, base + d) * (double)moe_cuda_ld(out, dt, base + d);
    s = moe_cuda_warp_sum_d(s);
    if (lane == 0)
        delta[(b * H + h) * T + t] = (float)s;
}

/* ================================================== simple (CUDA cores) */

/* Forward: block = SA_ROWS query rows of one (b, h), one warp per row. */
static __global__ void attn_fwd_simple_kernel(void *out, float *lse, const void *q, const void *k, const void *v,
                                              int64_t ld, int64_t T, int64_t H, int64_t D, float p, float scale,
                                              uint64_t seed, uint64_t stream, moe_dtype dt)
{
    extern __shared__ float sm[];
    const int64_t LK = D + 1;
    float *Ks = sm, *Vs = Ks + SA_TILE * LK, *Qs = Vs + SA_TILE * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
    const int64_t i0 = (int64_t)blockIdx.y * SA_ROWS, i = i0 + warp;
    const bool active = i < T;
    const int64_t i_last = i0 + SA_ROWS - 1 < T - 1 ? i0 + SA_ROWS - 1 : T - 1;
    for (int64_t d = lane; d < D; d += 32)
        Qs[warp * D + d] = active ? moe_cuda_ld(q, dt, (b * T + i) * ld + h * D + d) : 0.0f;
    float o[SA_PER_LANE];
#pragma unroll
    for (int u = 0; u < SA_PER_LANE; u++)
        o[u] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int64_t j0 = 0; j0 <= i_last; j0 += SA_TILE) {
        __syncthreads();
        for (int64_t e = threadIdx.x; e < SA_TILE * D; e += blockDim.x) {
            int64_t jj = e / D, d = e % D, j = j0 + jj;
            Ks[jj * LK + d] = j < T ? moe_cuda_ld(k, dt, (b * T + j) * ld + h * D + d) : 0.0f;
            Vs[jj * D + d] = j < T ? moe_cuda_ld(v, dt, (b * T + j) * ld + h * D + d) : 0.0f;
        }
        __syncthreads();
        if (!active)
            continue;
        /* j0 <= i0 <= i: key j0 is valid for every row, so the max is finite */
        const int64_t j = j0 + lane;
        const bool valid = j <= i;
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++)
            s += Qs[warp * D + d] * Ks[lane * LK + d];
        s = valid ? s : -INFINITY;
        const float mn = fmaxf(m, moe_cuda_warp_max(s));
        const float pj = expf(s - mn), alpha = expf(m - mn);
        l = l * alpha + moe_cuda_warp_sum(pj);
        m = mn;
        const float pd = valid ? pj * drop_factor(p, scale, seed, stream, bh, T, i, j) : 0.0f;
#pragma unroll
        for (int u = 0; u < SA_PER_LANE; u++)
            o[u] *= alpha;
        for (int jj = 0; jj < SA_TILE; jj++) {
            const float w = __shfl_sync(0xffffffffu, pd, jj);
#pragma unroll
            for (int u = 0; u < SA_PER_LANE; u++) {
                int64_t d = lane + 32 * u;
                if (d < D)
                    o[u] += w * Vs[jj * D + d];
            }
        }
    }
    if (!active)
        return;
    const float inv = 1.0f / l;
#pragma unroll
    for (int u = 0; u < SA_PER_LANE; u++) {
        int64_t d = lane + 32 * u;
        if (d < D)
            moe_cuda_st(out, dt, (b * T + i) * H * D + h * D + d, o[u] * inv);
    }
    if (lane == 0)
        lse[bh * T + i] = m + logf(l);
}

/* Backward, dK and dV: block = SA_ROWS keys of one (b, h), one warp per key,
 * over query tiles from the block's first key on. */
static __global__ void attn_bwd_dkdv_simple_kernel(void *dk, void *dv, int64_t ldd, const void *dout,
                                                   const float *lse, const float *delta, const void *q,
                                                   const void *k, const void *v, int64_t ld, int64_t T, int64_t H,
                                                   int64_t D, float p, float scale, uint64_t seed, uint64_t stream,
                                                   moe_dtype dt)
{
    extern __shared__ float sm[];
    const int64_t LQ = D + 1;
    float *Qs = sm, *dOs = Qs + SA_TILE * LQ, *kr = dOs + SA_TILE * LQ, *vr = kr + SA_ROWS * D;
    float *ls = vr + SA_ROWS * D, *dls = ls + SA_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, C = H * D;
    const int64_t j0b = (int64_t)blockIdx.y * SA_ROWS, j = j0b + warp;
    const bool active = j < T;
    for (int64_t d = lane; d < D; d += 32) {
        kr[warp * D + d] = active ? moe_cuda_ld(k, dt, (b * T + j) * ld + h * D + d) : 0.0f;
        vr[warp * D + d] = active ? moe_cuda_ld(v, dt, (b * T + j) * ld + h * D + d) : 0.0f;
    }
    float gk[SA_PER_LANE], gv[SA_PER_LANE];
#pragma unroll
    for (int u = 0; u < SA_PER_LANE; u++)
        gk[u] = gv[u] = 0.0f;
    for (int64_t i0 = j0b / SA_TILE * SA_TILE; i0 < T; i0 += SA_TILE) {
        __syncthreads();
        for (int64_t e = threadIdx.x; e < SA_TILE * D; e += blockDim.x) {
            int64_t ii = e / D, d = e % D, i = i0 + ii;
            Qs[ii * LQ + d] = i < T ? moe_cuda_ld(q, dt, (b * T + i) * ld + h * D + d) : 0.0f;
            dOs[ii * LQ + d] = i < T ? moe_cuda_ld(dout, dt, (b * T + i) * C + h * D + d) : 0.0f;
        }
        if (threadIdx.x < SA_TILE) {
            int64_t i = i0 + threadIdx.x;
            ls[threadIdx.x] = i < T ? lse[bh * T + i] : 0.0f;
            dls[threadIdx.x] = i < T ? delta[bh * T + i] : 0.0f;
        }
        __syncthreads();
        if (!active)
            continue;
        const int64_t i = i0 + lane;
        const bool valid = i >= j && i < T;
        float s = 0.0f, dpd = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            s += Qs[lane * LQ + d] * kr[warp * D + d];
            dpd += dOs[lane * LQ + d] * vr[warp * D + d];
        }
        const float pr = valid ? expf(s - ls[lane]) : 0.0f;
        const float z = valid ? drop_factor(p, scale, seed, stream, bh, T, i, j) : 0.0f;
        const float ds = pr * (z * dpd - dls[lane]), pz = pr * z;
        for (int ii = 0; ii < SA_TILE; ii++) {
            const float a = __shfl_sync(0xffffffffu, pz, ii), g = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
            for (int u = 0; u < SA_PER_LANE; u++) {
                int64_t d = lane + 32 * u;
                if (d < D) {
                    gv[u] += a * dOs[ii * LQ + d];
                    gk[u] += g * Qs[ii * LQ + d];
                }
            }
        }
    }
    if (!active)
        return;
#pragma unroll
    for (int u = 0; u < SA_PER_LANE; u++) {
        int64_t d = lane + 32 * u;
        if (d < D) {
            moe_cuda_st(dk, dt, (b * T + j) * ldd + h * D + d, gk[u]);
            moe_cuda_st(dv, dt, (b * T + j) * ldd + h * D + d, gv[u]);
        }
    }
}

/* Backward, dQ: block = SA_ROWS queries of one (b, h), one warp per query. */
static __global__ void attn_bwd_dq_simple_kernel(void *dq, int64_t ldd, const void *dout, const float *lse,
                                                 const float *delta, const void *q, const void *k, const void *v,
                                                 int64_t ld, int64_t T, int64_t H, int64_t D, float p, float scale,
                                                 uint64_t seed, uint64_t stream, moe_dtype dt)
{
    extern __shared__ float sm[];
    const int64_t LK = D + 1;
    float *Ks = sm, *Vs = Ks + SA_TILE * LK, *qr = Vs + SA_TILE * LK, *dor = qr + SA_ROWS * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, C = H * D;
    const int64_t i0 = (int64_t)blockIdx.y * SA_ROWS, i = i0 + warp;
    const bool active = i < T;
    const int64_t i_last = i0 + SA_ROWS - 1 < T - 1 ? i0 + SA_ROWS - 1 : T - 1;
    for (int64_t d = lane; d < D; d += 32) {
        qr[warp * D + d] = active ? moe_cuda_ld(q, dt, (b * T + i) * ld + h * D + d) : 0.0f;
        dor[warp * D + d] = active ? moe_cuda_ld(dout, dt, (b * T + i) * C + h * D + d) : 0.0f;
    }
    const float lse_i = active ? lse[bh * T + i] : 0.0f, d_i = active ? delta[bh * T + i] : 0.0f;
    float gq[SA_PER_LANE];
#pragma unroll
    for (int u = 0; u < SA_PER_LANE; u++)
        gq[u] = 0.0f;
    for (int64_t j0 = 0; j0 <= i_last; j0 += SA_TILE) {
        __syncthreads();
        for (int64_t e = threadIdx.x; e < SA_TILE * D; e += blockDim.x) {
            int64_t jj = e / D, d = e % D, j = j0 + jj;
            Ks[jj * LK + d] = j < T ? moe_cuda_ld(k, dt, (b * T + j) * ld + h * D + d) : 0.0f;
            Vs[jj * LK + d] = j < T ? moe_cuda_ld(v, dt, (b * T + j) * ld + h * D + d) : 0.0f;
        }
        __syncthreads();
        if (!active)
            continue;
        const int64_t j = j0 + lane;
        const bool valid = j <= i;
        float s = 0.0f, dpd = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            s += qr[warp * D + d] * Ks[lane * LK + d];
            dpd += dor[warp * D + d] * Vs[lane * LK + d];
        }
        const float pr = valid ? expf(s - lse_i) : 0.0f;
        const float z = valid ? drop_factor(p, scale, seed, stream, bh, T, i, j) : 0.0f;
        const float ds = pr * (z * dpd - d_i);
        for (int jj = 0; jj < SA_TILE; jj++) {
            const float g = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
            for (int u = 0; u < SA_PER_LANE; u++) {
                int64_t d = lane + 32 * u;
                if (d < D)
                    gq[u] += g * Ks[jj * LK + d];
            }
        }
    }
    if (!active)
        return;
#pragma unroll
    for (int u = 0; u < SA_PER_LANE; u++) {
        int64_t d = lane + 32 * u;
        if (d < D)
            moe_cuda_st(dq, dt, (b * T + i) * ldd + h * D + d, gq[u]);
    }
}

/* ========================================= tensor cores (mma.sync, FA2) */

/* FlashAttention-2 layout: a block of 4 warps owns 64 * MT rows (queries,
 * or keys in the dK/dV pass), 16 * MT per warp; the other side streams
 * through shared memory in tiles of 64. Products are mma.sync.m16n8k16 with
 * fp32 accumulators; operands come from shared memory through ldmatrix. A
 * warp holds MT m16 tiles, so every B fragment it loads serves MT products:
 * at head dimension 64 one m16 tile per warp needs about twice the shared
 * memory bandwidth the tensor cores can be fed with (2 bytes of B per MAC
 * and row), two are within it. The accumulator fragment of two adjacent n8
 * tiles has the register layout of an m16k16 A operand, so probabilities
 * (and dS) go from one product into the next without leaving registers,
 * rounded once to the storage dtype.
 * Fragment layouts (PTX ISA, mma.m16n8k16): with g = lane/4, c = lane%4,
 * accumulator c0,c1 are (row g, cols 2c, 2c+1), c2,c3 (row g+8, same cols). */

#define MMA_ROWS 64
#define MMA_THREADS 128

/* m16 tiles per warp of the forward and the dK/dV pass: two where the
 * registers allow it. The dQ pass keeps one: with two (255 registers, two
 * blocks an SM) it ran 0.26 ms slower at the reference shape on an H200. */
template <int D> struct mma_mt { static constexpr int value = D <= 64 ? 2 : 1; };

template <typename T, int D> struct mma_cfg {
    static constexpr int LD = D + 8; /* row stride in elements: ldmatrix rows hit distinct banks */
    static constexpr int MT = mma_mt<D>::value;
    static constexpr size_t tile = (size_t)MMA_ROWS * LD * sizeof(T);
    /* the tiles a loop walks are double-buffered: the next one is copied
     * (cp.async) while the current one is used */
    static constexpr size_t fwd_bytes = (MT + 4) * tile;     /* Q (MT tiles), K and V twice */
    static constexpr size_t dq_bytes = 6 * tile;             /* Q, dO, K and V twice */
    static constexpr size_t dkdv_bytes = (2 * MT + 4) * tile + 4 * MMA_ROWS * sizeof(float); /* K, V; Q, dO twice */
};

/* rows r0..r0+63 of one head of a (B,T,H,D) tensor (row stride ld) into a
 * [64][LD] tile, zero past T; 16-byte copies when vec (pointer and ld allow) */
template <typename T, int D>
static __device__ __forceinline__ void mma_load_tile(T *dst, const T *src, int64_t ld, int64_t b, int64_t h,
                                                     int64_t r0, int64_t T_, bool vec)
{
    constexpr int LD = mma_cfg<T, D>::LD;
    if (vec) {
        constexpr int CH = D / 8;
        for (int e = threadIdx.x; e < MMA_ROWS * CH; e += blockDim.x) {
            int r = e / CH, ch = e % CH;
            int64_t t = r0 + r;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (t < T_)
                v = *(const uint4 *)(src + (b * T_ + t) * ld + h * D + ch * 8);
            *(uint4 *)(dst + r * LD + ch * 8) = v;
        }
    } else {
        for (int e = threadIdx.x; e < MMA_ROWS * D; e += blockDim.x) {
            int r = e / D, d = e % D;
            int64_t t = r0 + r;
            dst[r * LD + d] = t < T_ ? src[(b * T_ + t) * ld + h * D + d] : moe_cuda_from_f32<T>(0.0f);
        }
    }
}

/* mma_load_tile of `tiles` consecutive tiles (rows r0.. r0 + 64 tiles - 1),
 * but with vec the copies are issued (cp.async) and not waited for: the
 * caller commits them as a group and waits before use */
template <typename T, int D>
static __device__ __forceinline__ void mma_load_tile_async(T *dst, const T *src, int64_t ld, int64_t b, int64_t h,
                                                           int64_t r0, int64_t T_, bool vec, int tiles = 1)
{
    constexpr int LD = mma_cfg<T, D>::LD;
    if (!vec) {
        for (int m = 0; m < tiles; m++)
            mma_load_tile<T, D>(dst + m * MMA_ROWS * LD, src, ld, b, h, r0 + m * MMA_ROWS, T_, vec);
        return;
    }
    constexpr int CH = D / 8;
    for (int e = threadIdx.x; e < tiles * MMA_ROWS * CH; e += blockDim.x) {
        const int r = e / CH, ch = e % CH;
        const int64_t t = r0 + r;
        T *d = dst + r * LD + ch * 8;
        if (t < T_)
            cp_async16(d, src + (b * T_ + t) * ld + h * D + ch * 8);
        else
            *(uint4 *)d = make_uint4(0u, 0u, 0u, 0u);
    }
}

/* Key tile kt of last + 1 is in buffer kt & 1 of Kb and Vb (its copies were
 * committed as one group): starts the copies of tile kt + 1 into the other
 * buffer, then waits for tile kt's (and the block's barrier) */
template <typename T, int D>
static __device__ __forceinline__ void next_kv_tile(T *Kb, T *Vb, const T *k, const T *v, int64_t ld, int64_t b,
                                                    int64_t h, int kt, int last, int64_t T_, bool vec)
{
    constexpr int LD = mma_cfg<T, D>::LD;
    if (kt < last) {
        const int64_t j1 = (int64_t)(kt + 1) * MMA_ROWS;
        mma_load_tile_async<T, D>(Kb + ((kt + 1) & 1) * MMA_ROWS * LD, k, ld, b, h, j1, T_, vec);
        mma_load_tile_async<T, D>(Vb + ((kt + 1) & 1) * MMA_ROWS * LD, v, ld, b, h, j1, T_, vec);
        cp_async_commit();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
}

/* acc[MT][NC/8][4] (16 MT rows x NC cols) = A(16 MT x D, rows r0.. of ta) .
 * B^T(NC rows of tb, [n][k]); each B fragment serves the MT row tiles */
template <typename T, int D, int MT, int NC = MMA_ROWS>
static __device__ __forceinline__ void mma_abt(float acc[MT][NC / 8][4], const T *ta, int r0, const T *tb)
{
    constexpr int LD = mma_cfg<T, D>::LD;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NC / 8; nt++)
            acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
            frag_a<LD>(a[mt], ta, r0 + 16 * mt, kk * 16);
#pragma unroll
        for (int np = 0; np < NC / 16; np++) {
            uint32_t b[4];
            frag_b_nk<LD>(b, tb, np * 16, kk * 16);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

/* out[MT][D/8][4] (16 MT x D) += P(16 MT x KC, accumulator layout) . X(KC x D rows of tx, [k][n]) */
template <typename T, int D, int MT, int KC = MMA_ROWS>
static __device__ __forceinline__ void mma_px(float out[MT][D / 8][4], const float p[MT][KC / 8][4], const T *tx)
{
    constexpr int LD = mma_cfg<T, D>::LD;
#pragma unroll
    for (int kk = 0; kk < KC / 16; kk++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            a[mt][0] = pack2<T>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
            a[mt][1] = pack2<T>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
            a[mt][2] = pack2<T>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
            a[mt][3] = pack2<T>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; dp++) {
            uint32_t b[4];
            frag_b_kn<LD>(b, tx, kk * 16, dp * 16);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma16816<T>(out[mt][2 * dp], a[mt], b[0], b[1]);
                mma16816<T>(out[mt][2 * dp + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

/* stores a 16 x D accumulator (rows row0 + g, +8) to a (B,T,H,D) view */
template <typename T, int D>
static __device__ __forceinline__ void mma_store_rows(T *dst, int64_t ld, int64_t b, int64_t h, int64_t row0,
                                                      int64_t T_, const float acc[D / 8][4], float sa, float sb)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, cq = lane & 3;
    const int64_t ra = row0 + g, rb = ra + 8;
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++) {
        const int d = nt * 8 + 2 * cq;
        if (ra < T_)
            store2<T>(dst + (b * T_ + ra) * ld + h * D + d, acc[nt][0] * sa, acc[nt][1] * sa);
        if (rb < T_)
            store2<T>(dst + (b * T_ + rb) * ld + h * D + d, acc[nt][2] * sb, acc[nt][3] * sb);
    }
}

/* How a kernel draws the dropout mask, fixed at compile time so the variant
 * without dropout carries none of the Philox code: none (p == 0), whole
 * groups (T % 8 == 0: keep_rows / keep_cols), or score by score. */
#define DROP_NONE 0
#define DROP_GROUPS 1
#define DROP_SCORES 2

/* dropout factors (keep/(1-p), or 0) of a row-major tile's accumulator
 * blocks 2np, 2np + 1 (keys jt = j0 + 16np ..): z[u][e] as keep_rows orders
 * them. Every lane of the warp must call this. */
template <int DROP>
static __device__ __forceinline__ void drop_rows(float z[2][4], float p, uint32_t thr, float scale, uint64_t seed,
                                                 uint64_t stream, int64_t bh, int64_t T_, int64_t ia, int64_t ib,
                                                 int64_t jt, int cq)
{
    if (DROP == DROP_GROUPS) {
        const unsigned keep = keep_rows(thr, seed, stream, bh, T_, ia, ib, jt, cq);
#pragma unroll
        for (int u = 0; u < 2; u++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                z[u][e] = (keep >> (4 * u + e)) & 1u ? scale : 0.0f;
    } else {
#pragma unroll
        for (int u = 0; u < 2; u++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                z[u][e] = DROP == DROP_NONE ? 1.0f
                                            : drop_factor(p, scale, seed, stream, bh, T_, e < 2 ? ia : ib,
                                                          jt + 8 * u + 2 * cq + (e & 1));
    }
}

/* -inf at the scores of row-major accumulators past the causal diagonal or T */
static __device__ __forceinline__ void mask_rows(float s[8][4], int64_t ia, int64_t ib, int64_t j0, int64_t T_,
                                                 int cq)
{
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        const int64_t j = j0 + nt * 8 + 2 * cq;
        if (j > ia || j >= T_) s[nt][0] = -INFINITY;
        if (j + 1 > ia || j + 1 >= T_) s[nt][1] = -INFINITY;
        if (j > ib || j >= T_) s[nt][2] = -INFINITY;
        if (j + 1 > ib || j + 1 >= T_) s[nt][3] = -INFINITY;
    }
}

/* Forward: warp w owns queries w0 = i0 + 16 MT w .. +16 MT - 1 of the
 * block's 64 MT; key tiles past the warp's last query are skipped. */
template <typename T, int D, int DROP>
static __global__ void __launch_bounds__(MMA_THREADS)
    attn_fwd_mma_kernel(T *out, float *lse, const T *q, const T *k, const T *v, int64_t ld, int64_t T_, int64_t H,
                        float p, float scale, uint64_t seed, uint64_t stream, bool vec)
{
    const uint32_t thr = moe_philox_threshold16(p);
    constexpr int LD = mma_cfg<T, D>::LD, MT = mma_cfg<T, D>::MT, BM = MT * MMA_ROWS;
    extern __shared__ __align__(128) unsigned char smem[];
    T *Qs = (T *)smem, *Kb = Qs + BM * LD, *Vb = Kb + 2 * MMA_ROWS * LD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, cq = lane & 3;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
    const int qt = (int)gridDim.y - 1 - (int)blockIdx.y; /* the longest rows (most key tiles) start first */
    const int64_t i0 = (int64_t)qt * BM, w0 = i0 + warp * 16 * MT;
    const int last = (int)(((i0 + BM < T_ ? i0 + BM : T_) - 1) / MMA_ROWS);

    mma_load_tile_async<T, D>(Qs, q, ld, b, h, i0, T_, vec, MT);
    mma_load_tile_async<T, D>(Kb, k, ld, b, h, 0, T_, vec);
    mma_load_tile_async<T, D>(Vb, v, ld, b, h, 0, T_, vec);
    cp_async_commit();
    float o[MT][D / 8][4];
    float mx[MT][2], l[MT][2]; /* row maxima of rows g, g + 8 of each m16 tile; l: this thread's partial sums */
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++)
            o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.0f;
        mx[mt][0] = mx[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
    }
    for (int kt = 0; kt <= last; kt++) {
        const int64_t j0 = (int64_t)kt * MMA_ROWS;
        const T *Ks = Kb + (kt & 1) * MMA_ROWS * LD, *Vs = Vb + (kt & 1) * MMA_ROWS * LD;
        next_kv_tile<T, D>(Kb, Vb, k, v, ld, b, h, kt, last, T_, vec);
        if (j0 <= w0 + 16 * MT - 1) { /* warp-uniform: some row of the warp sees key j0 */
            float s[MT][8][4];
            mma_abt<T, D, MT>(s, Qs, warp * 16 * MT, Ks);
            const bool edge = j0 + MMA_ROWS - 1 > w0 || j0 + MMA_ROWS > T_;
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const int64_t ia = w0 + 16 * mt + g, ib = ia + 8;
                /* key 0 is valid in every row, so after the first tile each row max is finite */
                if (edge)
                    mask_rows(s[mt], ia, ib, j0, T_, cq);
                float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    xa = fmaxf(xa, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                    xb = fmaxf(xb, fmaxf(s[mt][nt][2], s[mt][nt][3]));
                }
                xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 1));
                xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 2));
                xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 1));
                xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 2));
                const float na = fmaxf(mx[mt][0], xa), nb = fmaxf(mx[mt][1], xb);
                const float alpha_a = __expf(mx[mt][0] - na), alpha_b = __expf(mx[mt][1] - nb);
                mx[mt][0] = na;
                mx[mt][1] = nb;
                float sa = 0.0f, sb = 0.0f;
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    s[mt][nt][0] = __expf(s[mt][nt][0] - na);
                    s[mt][nt][1] = __expf(s[mt][nt][1] - na);
                    s[mt][nt][2] = __expf(s[mt][nt][2] - nb);
                    s[mt][nt][3] = __expf(s[mt][nt][3] - nb);
                    sa += s[mt][nt][0] + s[mt][nt][1];
                    sb += s[mt][nt][2] + s[mt][nt][3];
                }
                l[mt][0] = l[mt][0] * alpha_a + sa;
                l[mt][1] = l[mt][1] * alpha_b + sb;
#pragma unroll
                for (int nt = 0; nt < D / 8; nt++) {
                    o[mt][nt][0] *= alpha_a;
                    o[mt][nt][1] *= alpha_a;
                    o[mt][nt][2] *= alpha_b;
                    o[mt][nt][3] *= alpha_b;
                }
                if (DROP != DROP_NONE) {
#pragma unroll
                    for (int np = 0; np < 4; np++) {
                        float z[2][4];
                        drop_rows<DROP>(z, p, thr, scale, seed, stream, bh, T_, ia, ib, j0 + np * 16, cq);
#pragma unroll
                        for (int x = 0; x < 8; x++)
                            s[mt][2 * np + (x >> 2)][x & 3] *= z[x >> 2][x & 3];
                    }
                }
            }
            mma_px<T, D, MT>(o, s, Vs);
        }
        __syncthreads(); /* this tile's buffers are refilled by the next iteration's copies */
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        float la = l[mt][0], lb = l[mt][1];
        la += __shfl_xor_sync(0xffffffffu, la, 1);
        la += __shfl_xor_sync(0xffffffffu, la, 2);
        lb += __shfl_xor_sync(0xffffffffu, lb, 1);
        lb += __shfl_xor_sync(0xffffffffu, lb, 2);
        const int64_t ia = w0 + 16 * mt + g, ib = ia + 8;
        mma_store_rows<T, D>(out, H * D, b, h, w0 + 16 * mt, T_, o[mt], 1.0f / la, 1.0f / lb);
        if (cq == 0) {
            if (ia < T_)
                lse[bh * T_ + ia] = mx[mt][0] + logf(la);
            if (ib < T_)
                lse[bh * T_ + ib] = mx[mt][1] + logf(lb);
        }
    }
}

/* Backward, dK and dV of 64 MT keys: warp w owns keys jw = j0 + 16 MT w ..
 * +16 MT - 1 and keeps their gradients in registers over every query tile
 * at or after them; a query tile of 64 is taken in two halves of 32 (the
 * registers of MT m16 tiles' scores and dS over 64 queries would not fit).
 * The products are transposed: S^T = K Q^T, dPd^T = V dO^T, then dV += Pd^T
 * dO and dK += dS^T Q. */
template <typename T, int D, int DROP>
static __global__ void __launch_bounds__(MMA_THREADS)
    attn_bwd_dkdv_mma_kernel(T *dk, T *dv, int64_t ldd, const T *dout, const float *lse, const float *delta,
                             const T *q, const T *k, const T *v, int64_t ld, int64_t T_, int64_t H, float p,
                             float scale, uint64_t seed, uint64_t stream, bool vec, bool vec_o)
{
    constexpr int LD = mma_cfg<T, D>::LD, MT = mma_cfg<T, D>::MT, BN = MT * MMA_ROWS, HQ = MMA_ROWS / 2;
    const uint32_t thr = moe_philox_threshold16(p);
    extern __shared__ __align__(128) unsigned char smem[];
    T *Ks = (T *)smem, *Vs = Ks + BN * LD, *Qb = Vs + BN * LD, *dOb = Qb + 2 * MMA_ROWS * LD;
    float *lb = (float *)(dOb + 2 * MMA_ROWS * LD), *dlb = lb + 2 * MMA_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, cq = lane & 3;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, C = H * D;
    const int64_t j0 = (int64_t)blockIdx.y * BN, jw = j0 + warp * 16 * MT;

    /* query tile i0 (and its lse and delta) into buffer `buf` */
    auto load_q = [&](int64_t i0, int buf) {
        mma_load_tile_async<T, D>(Qb + buf * MMA_ROWS * LD, q, ld, b, h, i0, T_, vec);
        mma_load_tile_async<T, D>(dOb + buf * MMA_ROWS * LD, dout, C, b, h, i0, T_, vec_o);
        if (threadIdx.x < MMA_ROWS) {
            const int64_t i = i0 + threadIdx.x;
            lb[buf * MMA_ROWS + threadIdx.x] = i < T_ ? lse[bh * T_ + i] : 0.0f;
            dlb[buf * MMA_ROWS + threadIdx.x] = i < T_ ? delta[bh * T_ + i] : 0.0f;
        }
        cp_async_commit();
    };
    mma_load_tile_async<T, D>(Ks, k, ld, b, h, j0, T_, vec, MT);
    mma_load_tile_async<T, D>(Vs, v, ld, b, h, j0, T_, vec, MT);
    load_q(j0, 0);
    float gk[MT][D / 8][4], gv[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                gk[mt][nt][e] = gv[mt][nt][e] = 0.0f;
    int buf = 0;
    for (int64_t i0 = j0; i0 < T_; i0 += MMA_ROWS, buf ^= 1) {
        const T *Qs = Qb + buf * MMA_ROWS * LD, *dOs = dOb + buf * MMA_ROWS * LD;
        const float *ls = lb + buf * MMA_ROWS, *dls = dlb + buf * MMA_ROWS;
        if (i0 + MMA_ROWS < T_) { /* the next query tile travels while this one is used */
            load_q(i0 + MMA_ROWS, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bool edge = i0 < j0 + BN || i0 + MMA_ROWS > T_;
#pragma unroll
        for (int hq = 0; hq < 2; hq++) {
            const int64_t iq = i0 + hq * HQ; /* the half's first query */
            if (iq + HQ - 1 < jw)
                continue; /* warp-uniform: every query of the half is before the warp's keys */
            float st[MT][HQ / 8][4], dp[MT][HQ / 8][4];
            mma_abt<T, D, MT, HQ>(st, Ks, warp * 16 * MT, Qs + hq * HQ * LD);
            mma_abt<T, D, MT, HQ>(dp, Vs, warp * 16 * MT, dOs + hq * HQ * LD);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const int64_t ja = jw + 16 * mt + g, jb = ja + 8;
#pragma unroll
                for (int np = 0; np < HQ / 16; np++) {
                    const unsigned keep =
                        DROP == DROP_GROUPS ? keep_cols(thr, seed, stream, bh, T_, iq + np * 16, jw + 16 * mt, g, cq)
                                            : 0xFFu;
#pragma unroll
                    for (int x = 0; x < 8; x++) {
                        const int nt = 2 * np + (x >> 2), e = x & 3;
                        const int col = hq * HQ + nt * 8 + 2 * cq + (e & 1);
                        const int64_t i = i0 + col, j = e < 2 ? ja : jb;
                        const bool valid = !edge || (i >= j && i < T_ && j < T_);
                        const float pr = valid ? __expf(st[mt][nt][e] - ls[col]) : 0.0f;
                        const float z = !valid                ? 0.0f
                                        : DROP == DROP_NONE   ? 1.0f
                                        : DROP == DROP_GROUPS ? ((keep >> x) & 1u ? scale : 0.0f)
                                                              : drop_factor(p, scale, seed, stream, bh, T_, i, j);
                        st[mt][nt][e] = pr * z;                             /* Pd^T */
                        dp[mt][nt][e] = pr * (z * dp[mt][nt][e] - dls[col]); /* dS^T */
                    }
                }
            }
            mma_px<T, D, MT, HQ>(gv, st, dOs + hq * HQ * LD);
            mma_px<T, D, MT, HQ>(gk, dp, Qs + hq * HQ * LD);
        }
        __syncthreads(); /* this tile's buffers are refilled by the next iteration's copies */
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        mma_store_rows<T, D>(dk, ldd, b, h, jw + 16 * mt, T_, gk[mt], 1.0f, 1.0f);
        mma_store_rows<T, D>(dv, ldd, b, h, jw + 16 * mt, T_, gv[mt], 1.0f, 1.0f);
    }
}

/* Backward, dQ of one query tile of 64: warp w owns queries w0 = i0 + 16w
 * .. +15 (MT = 1 of the forward's code). */
template <typename T, int D, int DROP>
static __global__ void __launch_bounds__(MMA_THREADS)
    attn_bwd_dq_mma_kernel(T *dq, int64_t ldd, const T *dout, const float *lse, const float *delta, const T *q,
                           const T *k, const T *v, int64_t ld, int64_t T_, int64_t H, float p, float scale,
                           uint64_t seed, uint64_t stream, bool vec, bool vec_o)
{
    const uint32_t thr = moe_philox_threshold16(p);
    constexpr int LD = mma_cfg<T, D>::LD, MT = 1, BM = MMA_ROWS;
    extern __shared__ __align__(128) unsigned char smem[];
    T *Qs = (T *)smem, *dOs = Qs + BM * LD, *Kb = dOs + BM * LD, *Vb = Kb + 2 * MMA_ROWS * LD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, cq = lane & 3;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, C = H * D;
    const int qt = (int)gridDim.y - 1 - (int)blockIdx.y; /* the longest rows (most key tiles) start first */
    const int64_t i0 = (int64_t)qt * BM, w0 = i0 + warp * 16 * MT;
    const int last = (int)(((i0 + BM < T_ ? i0 + BM : T_) - 1) / MMA_ROWS);
    float ls[MT][2], dl[MT][2]; /* lse and delta of rows g, g + 8 of each m16 tile */
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int64_t i = w0 + 16 * mt + g + 8 * r;
            ls[mt][r] = i < T_ ? lse[bh * T_ + i] : 0.0f;
            dl[mt][r] = i < T_ ? delta[bh * T_ + i] : 0.0f;
        }

    mma_load_tile_async<T, D>(Qs, q, ld, b, h, i0, T_, vec, MT);
    mma_load_tile_async<T, D>(dOs, dout, C, b, h, i0, T_, vec_o, MT);
    mma_load_tile_async<T, D>(Kb, k, ld, b, h, 0, T_, vec);
    mma_load_tile_async<T, D>(Vb, v, ld, b, h, 0, T_, vec);
    cp_async_commit();
    float gq[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++)
            gq[mt][nt][0] = gq[mt][nt][1] = gq[mt][nt][2] = gq[mt][nt][3] = 0.0f;
    for (int kt = 0; kt <= last; kt++) {
        const int64_t j0 = (int64_t)kt * MMA_ROWS;
        const T *Ks = Kb + (kt & 1) * MMA_ROWS * LD, *Vs = Vb + (kt & 1) * MMA_ROWS * LD;
        next_kv_tile<T, D>(Kb, Vb, k, v, ld, b, h, kt, last, T_, vec);
        if (j0 <= w0 + 16 * MT - 1) { /* warp-uniform: some row of the warp sees key j0 */
            float s[MT][8][4], dp[MT][8][4];
            mma_abt<T, D, MT>(s, Qs, warp * 16 * MT, Ks);
            mma_abt<T, D, MT>(dp, dOs, warp * 16 * MT, Vs);
            const bool edge = j0 + MMA_ROWS - 1 > w0 || j0 + MMA_ROWS > T_;
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const int64_t ia = w0 + 16 * mt + g, ib = ia + 8;
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    float z[2][4];
                    drop_rows<DROP>(z, p, thr, scale, seed, stream, bh, T_, ia, ib, j0 + np * 16, cq);
#pragma unroll
                    for (int x = 0; x < 8; x++) {
                        const int nt = 2 * np + (x >> 2), e = x & 3;
                        const int64_t j = j0 + nt * 8 + 2 * cq + (e & 1), i = e < 2 ? ia : ib;
                        const bool valid = (!edge || (j <= i && j < T_)) && i < T_;
                        const float pr = valid ? __expf(s[mt][nt][e] - ls[mt][e >> 1]) : 0.0f;
                        dp[mt][nt][e] = valid ? pr * (z[x >> 2][e] * dp[mt][nt][e] - dl[mt][e >> 1]) : 0.0f; /* dS */
                    }
                }
            }
            mma_px<T, D, MT>(gq, dp, Ks);
        }
        __syncthreads(); /* this tile's buffers are refilled by the next iteration's copies */
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
        mma_store_rows<T, D>(dq, ldd, b, h, w0 + 16 * mt, T_, gq[mt], 1.0f, 1.0f);
}

/* ------------------------------------------------------------ dispatch */

static moe_status check_args(moe_ctx *c, const char *op, int64_t ld, int64_t ldd, int64_t B, int64_t T, int64_t H,
                             int64_t D, float p, moe_dtype dt)
{
    if (!moe_cuda_is_float(dt))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected dtype f32, f16 or bf16, found %s", op,
                             moe_cuda_dtype_name(dt));
    if (B < 0 || T < 0 || H < 1 || D < 1)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda %s: expected B, T >= 0 and H, D >= 1, found B %lld, T %lld, H %lld, D %lld", op,
                             (long long)B, (long long)T, (long long)H, (long long)D);
    if (ld < H * D || ldd < H * D)
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG,
                             "cuda %s: expected row strides >= H*D = %lld, found ld %lld (gradients: %lld)", op,
                             (long long)(H * D), (long long)ld, (long long)ldd);
    if (!(p >= 0.0f && p < 1.0f))
        return moe_cuda_fail(c, MOE_ERR_INVALID_ARG, "cuda %s: expected attention dropout 0 <= p < 1, found %g", op,
                             (double)p);
    if (D > SA_DMAX)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda %s: head dimension %lld is above the supported %d; use fewer, wider heads or "
                             "the cpu backend",
                             op, (long long)D, SA_DMAX);
    if (B * H > INT32_MAX || (T + SA_ROWS - 1) / SA_ROWS > 65535)
        return moe_cuda_fail(c, MOE_ERR_UNSUPPORTED,
                             "cuda %s: expected B*H <= %d and T <= %d, found B*H %lld, T %lld", op, INT32_MAX,
                             65535 * SA_ROWS, (long long)(B * H), (long long)T);
    return MOE_OK;
}

static int use_mma(moe_dtype dt, int64_t D) { return (dt == MOE_F16 || dt == MOE_BF16) && (D == 32 || D == 64 || D == 128); }

template <typename T, int D>
static moe_status fwd_mma(moe_ctx *c, void *out, float *lse, const void *q, const void *k, const void *v, int64_t ld,
                          int64_t B, int64_t T_, int64_t H, float p, uint64_t seed, uint64_t stream)
{
    const size_t bytes = mma_cfg<T, D>::fwd_bytes;
    const int64_t bm = mma_cfg<T, D>::MT * MMA_ROWS;
    const bool vec = rows_aligned16(q, ld, sizeof(T)) && rows_aligned16(k, ld, sizeof(T)) &&
                     rows_aligned16(v, ld, sizeof(T));
    const int drop = p == 0.0f ? DROP_NONE : (T_ & 7) == 0 ? DROP_GROUPS : DROP_SCORES;
    auto kern = drop == DROP_NONE     ? attn_fwd_mma_kernel<T, D, DROP_NONE>
                : drop == DROP_GROUPS ? attn_fwd_mma_kernel<T, D, DROP_GROUPS>
                                      : attn_fwd_mma_kernel<T, D, DROP_SCORES>;
    MOE_TRY(set_smem(c, kern, bytes));
    dim3 grid((unsigned)(B * H), (unsigned)((T_ + bm - 1) / bm));
    kern<<<grid, MMA_THREADS, bytes, c->stream>>>((T *)out, lse, (const T *)q, (const T *)k, (const T *)v, ld, T_, H,
                                                  p, p > 0.0f ? 1.0f / (1.0f - p) : 1.0f, seed, stream, vec);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

template <typename T, int D>
static moe_status bwd_mma(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout,
                          const float *lse, const float *delta, const void *q, const void *k, const void *v,
                          int64_t ld, int64_t B, int64_t T_, int64_t H, float p, uint64_t seed, uint64_t stream)
{
    const float scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    const int64_t bm = mma_cfg<T, D>::MT * MMA_ROWS;
    const bool vec = rows_aligned16(q, ld, sizeof(T)) && rows_aligned16(k, ld, sizeof(T)) &&
                     rows_aligned16(v, ld, sizeof(T));
    const bool vec_o = rows_aligned16(dout, H * D, sizeof(T));
    dim3 grid((unsigned)(B * H), (unsigned)((T_ + bm - 1) / bm));
    const int drop = p == 0.0f ? DROP_NONE : (T_ & 7) == 0 ? DROP_GROUPS : DROP_SCORES;
    auto dkdv = drop == DROP_NONE     ? attn_bwd_dkdv_mma_kernel<T, D, DROP_NONE>
                : drop == DROP_GROUPS ? attn_bwd_dkdv_mma_kernel<T, D, DROP_GROUPS>
                                      : attn_bwd_dkdv_mma_kernel<T, D, DROP_SCORES>;
    auto dqk = drop == DROP_NONE     ? attn_bwd_dq_mma_kernel<T, D, DROP_NONE>
               : drop == DROP_GROUPS ? attn_bwd_dq_mma_kernel<T, D, DROP_GROUPS>
                                     : attn_bwd_dq_mma_kernel<T, D, DROP_SCORES>;
    MOE_TRY(set_smem(c, dkdv, mma_cfg<T, D>::dkdv_bytes));
    dkdv<<<grid, MMA_THREADS, mma_cfg<T, D>::dkdv_bytes, c->stream>>>(
        (T *)dk, (T *)dv, ldd, (const T *)dout, lse, delta, (const T *)q, (const T *)k, (const T *)v, ld, T_, H, p,
        scale, seed, stream, vec, vec_o);
    MOE_CUDA_CHECK_LAUNCH(c);
    MOE_TRY(set_smem(c, dqk, mma_cfg<T, D>::dq_bytes));
    dqk<<<dim3((unsigned)(B * H), (unsigned)((T_ + MMA_ROWS - 1) / MMA_ROWS)), MMA_THREADS, mma_cfg<T, D>::dq_bytes, c->stream>>>(
        (T *)dq, ldd, (const T *)dout, lse, delta, (const T *)q, (const T *)k, (const T *)v, ld, T_, H, p, scale,
        seed, stream, vec, vec_o);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

#define MMA_DISPATCH(dt, D, CALL_T_D)                                      \
    do {                                                                   \
        if ((dt) == MOE_F16) {                                             \
            if ((D) == 32) CALL_T_D(__half, 32);                           \
            else if ((D) == 64) CALL_T_D(__half, 64);                      \
            else CALL_T_D(__half, 128);                                    \
        } else {                                                           \
            if ((D) == 32) CALL_T_D(__nv_bfloat16, 32);                    \
            else if ((D) == 64) CALL_T_D(__nv_bfloat16, 64);               \
            else CALL_T_D(__nv_bfloat16, 128);                             \
        }                                                                  \
    } while (0)

moe_status moe_cuda_attention_forward(moe_ctx *c, void *out, float *lse, const void *q, const void *k, const void *v,
                                      int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D, float dropout_p,
                                      uint64_t seed, uint64_t stream, moe_dtype dt)
{
    MOE_TRY(check_args(c, "attention_forward", ld, ld, B, T, H, D, dropout_p, dt));
    if (B == 0 || T == 0)
        return MOE_OK;
    if (use_mma(dt, D)) {
#define FWD_CALL(TT, DD) \
    return fwd_mma<TT, DD>(c, out, lse, q, k, v, ld, B, T, H, dropout_p, seed, stream)
        MMA_DISPATCH(dt, D, FWD_CALL);
#undef FWD_CALL
    }
    const size_t bytes = (size_t)(SA_TILE * (D + 1) + SA_TILE * D + SA_ROWS * D) * sizeof(float);
    MOE_TRY(set_smem(c, attn_fwd_simple_kernel, bytes));
    dim3 grid((unsigned)(B * H), (unsigned)((T + SA_ROWS - 1) / SA_ROWS));
    attn_fwd_simple_kernel<<<grid, SA_ROWS * 32, bytes, c->stream>>>(
        out, lse, q, k, v, ld, T, H, D, dropout_p, dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f, seed, stream,
        dt);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

moe_status moe_cuda_attention_backward(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout,
                                       const void *out, const float *lse, const void *q, const void *k,
                                       const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D,
                                       float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt)
{
    MOE_TRY(check_args(c, "attention_backward", ld, ldd, B, T, H, D, dropout_p, dt));
    if (B == 0 || T == 0)
        return MOE_OK;
    float *delta = NULL;
    MOE_TRY(moe_cuda_scratch_alloc(c, (uint64_t)(B * H * T) * sizeof(float), "attention_backward row sums",
                                   (void **)&delta));
    moe_status st = MOE_OK;
    {
        const int64_t rows = B * T * H;
        attn_delta_kernel<<<(unsigned)((rows + 7) / 8), 256, 0, c->stream>>>(delta, dout, out, B, T, H, D, dt);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) {
            st = moe_cuda_error(c, e, "attn_delta_kernel", __FILE__, __LINE__);
            goto done;
        }
    }
    if (use_mma(dt, D)) {
#define BWD_CALL(TT, DD)                                                                                   \
    do {                                                                                                   \
        st = bwd_mma<TT, DD>(c, dq, dk, dv, ldd, dout, lse, delta, q, k, v, ld, B, T, H, dropout_p, seed, \
                              stream);                                                                     \
        goto done;                                                                                         \
    } while (0)
        MMA_DISPATCH(dt, D, BWD_CALL);
#undef BWD_CALL
    }
    {
        const float scale = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;
        dim3 grid((unsigned)(B * H), (unsigned)((T + SA_ROWS - 1) / SA_ROWS));
        const size_t b1 = (size_t)(2 * SA_TILE * (D + 1) + 2 * SA_ROWS * D + 2 * SA_TILE) * sizeof(float);
        const size_t b2 = (size_t)(2 * SA_TILE * (D + 1) + 2 * SA_ROWS * D) * sizeof(float);
        st = set_smem(c, attn_bwd_dkdv_simple_kernel, b1);
        if (st != MOE_OK)
            goto done;
        st = set_smem(c, attn_bwd_dq_simple_kernel, b2);
        if (st != MOE_OK)
            goto done;
        attn_bwd_dkdv_simple_kernel<<<grid, SA_ROWS * 32, b1, c->stream>>>(dk, dv, ldd, dout, lse, delta, q, k, v, ld,
                                                                            T, H, D, dropout_p, scale, seed, stream,
                                                                            dt);
        attn_bwd_dq_simple_kernel<<<grid, SA_ROWS * 32, b2, c->stream>>>(dq, ldd, dout, lse, delta, q, k, v, ld, T, H,
                                                                          D, dropout_p, scale, seed, stream, dt);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = moe_cuda_error(c, e, "attention backward kernels", __FILE__, __LINE__);
    }
done:
    moe_cuda_scratch_free(c, delta);
    return st;
}
