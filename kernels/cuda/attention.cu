/* attention.cu: causal multi-head attention of the cuda backend, forward and
 * backward, flash-style: the scores of a (query tile, key tile) pair live
 * only in shared memory and registers, softmax statistics are carried
 * online, and nothing of size T x T ever reaches global memory.
 *
 * Two paths with the same math (kernels/cpu/attention.c is the reference):
 *  - fp16/bf16 with head_dim 32, 64 or 128: tensor cores through WMMA, tiles
 *    of 64 queries x 64 keys, 4 warps of 16 rows each. Scores and their
 *    gradients are kept in fp32; the probabilities and dS that feed the P.V,
 *    dS.K and dS^T.Q products are rounded to the storage dtype, as in
 *    FlashAttention-2.
 *  - every other case (fp32, other head sizes up to 256): CUDA cores in fp32,
 *    one warp per query (or key) row over key (or query) tiles of 32 staged
 *    in shared memory.
 * Backward recomputes the probabilities from the saved lse in two passes, one
 * owning a key tile (dK, dV) and one owning a query tile (dQ), so every
 * gradient element has a single writer and no atomics are needed. D_i =
 * dO_i . O_i comes first from its own small kernel.
 *
 * Dropout on the probabilities uses the counter ((b*H + h)*T + i)*T + j, the
 * same Philox draw as the cpu, so masks match exactly in both directions.
 */
#include <mma.h>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda.h"

#define WM_TILE 64    /* queries and keys per tile on the tensor-core path */
#define WM_THREADS 128
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
    return moe_philox_uniform(seed, stream, counter) >= p ? scale : 0.0f;
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

/* ================================================ tensor cores (WMMA) */

namespace wm = nvcuda::wmma;

template <typename T, int D> struct wm_cfg {
    static constexpr int LD = D + 8;          /* T row stride of Q/K/V/dO tiles */
    static constexpr int LDS = WM_TILE + 4;   /* fp32 row stride of score tiles */
    static constexpr int LDP = WM_TILE + 8;   /* T row stride of P / dS tiles */
    static constexpr int LDO = D + 4;         /* fp32 row stride of output tiles */
    static constexpr size_t tile_t = (size_t)WM_TILE * LD * sizeof(T);
    static constexpr size_t tile_s = (size_t)WM_TILE * LDS * sizeof(float);
    static constexpr size_t tile_p = (size_t)WM_TILE * LDP * sizeof(T);
    static constexpr size_t tile_o = (size_t)WM_TILE * LDO * sizeof(float);
    static constexpr size_t fwd_bytes = 3 * tile_t + tile_s + tile_p + tile_o + 2 * WM_TILE * sizeof(float);
    static constexpr size_t bwd_bytes = 4 * tile_t + 2 * tile_s + tile_p + 2 * WM_TILE * sizeof(float);
};

typedef wm::fragment<wm::accumulator, 16, 16, 16, float> wm_acc;

/* rows r0..r0+63 of one head of a (B,T,H,D) tensor at row stride ld into a
 * [64][LD] tile, zero rows past T */
template <typename T, int D>
static __device__ __forceinline__ void wm_load_tile(T *dst, const T *src, int64_t ld, int64_t b, int64_t h,
                                                    int64_t r0, int64_t T_)
{
    constexpr int LD = wm_cfg<T, D>::LD;
    for (int e = threadIdx.x; e < WM_TILE * D; e += blockDim.x) {
        int r = e / D, d = e % D;
        int64_t t = r0 + r;
        dst[r * LD + d] = t < T_ ? src[(b * T_ + t) * ld + h * D + d] : moe_cuda_from_f32<T>(0.0f);
    }
}

/* acc(16x16) = A(16 rows at a, row-major lda) . B^T where B's 16 rows start at
 * bt (row-major ldb): products against a transposed tile, over D */
template <typename T, int D>
static __device__ __forceinline__ void wm_abt(wm_acc &acc, const T *a, const T *bt, int lda)
{
    wm::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> fa;
        wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> fb;
        wm::load_matrix_sync(fa, a + kk * 16, lda);
        wm::load_matrix_sync(fb, bt + kk * 16, lda);
        wm::mma_sync(acc, fa, fb, acc);
    }
}

/* acc(16x16) += P(16x64 at p, row-major ldp) . X(64 rows x 16 cols at x, row-major ldx) */
template <typename T>
static __device__ __forceinline__ void wm_pv(wm_acc &acc, const T *p, int ldp, const T *x, int ldx)
{
#pragma unroll
    for (int kk = 0; kk < WM_TILE / 16; kk++) {
        wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> fa;
        wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major> fb;
        wm::load_matrix_sync(fa, p + kk * 16, ldp);
        wm::load_matrix_sync(fb, x + kk * 16 * ldx, ldx);
        wm::mma_sync(acc, fa, fb, acc);
    }
}

template <typename T, int D>
static __global__ void __launch_bounds__(WM_THREADS)
    attn_fwd_wmma_kernel(T *out, float *lse, const T *q, const T *k, const T *v, int64_t ld, int64_t T_, int64_t H,
                         float p, float scale, uint64_t seed, uint64_t stream)
{
    typedef wm_cfg<T, D> cfg;
    constexpr int LD = cfg::LD, LDS = cfg::LDS, LDP = cfg::LDP, LDO = cfg::LDO;
    extern __shared__ __align__(128) unsigned char smem[];
    T *Qs = (T *)smem, *Ks = Qs + WM_TILE * LD, *Vs = Ks + WM_TILE * LD;
    float *Ss = (float *)(Vs + WM_TILE * LD);
    T *Ps = (T *)(Ss + WM_TILE * LDS);
    float *Os = (float *)(Ps + WM_TILE * LDP);
    float *rm = Os + WM_TILE * LDO, *rl = rm + WM_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
    const int qt = blockIdx.y;
    const int64_t i0 = (int64_t)qt * WM_TILE;

    wm_load_tile<T, D>(Qs, q, ld, b, h, i0, T_);
    for (int e = threadIdx.x; e < WM_TILE * LDO; e += blockDim.x)
        Os[e] = 0.0f;
    if (threadIdx.x < WM_TILE) {
        rm[threadIdx.x] = -INFINITY;
        rl[threadIdx.x] = 0.0f;
    }
    for (int kt = 0; kt <= qt; kt++) {
        const int64_t j0 = (int64_t)kt * WM_TILE;
        __syncthreads();
        wm_load_tile<T, D>(Ks, k, ld, b, h, j0, T_);
        wm_load_tile<T, D>(Vs, v, ld, b, h, j0, T_);
        __syncthreads();
        /* S(16x64) of this warp's rows */
#pragma unroll
        for (int cc = 0; cc < WM_TILE / 16; cc++) {
            wm_acc acc;
            wm_abt<T, D>(acc, Qs + warp * 16 * LD, Ks + cc * 16 * LD, LD);
            wm::store_matrix_sync(Ss + warp * 16 * LDS + cc * 16, acc, LDS, wm::mem_row_major);
        }
        __syncwarp();
        /* online softmax; key j0 <= i0 <= i is valid in every row, so the max is finite */
        for (int r = 0; r < 16; r++) {
            const int row = warp * 16 + r;
            const int64_t i = i0 + row, ja = j0 + lane, jb = ja + 32;
            const bool va = ja <= i && ja < T_, vb = jb <= i && jb < T_;
            const float s0 = va ? Ss[row * LDS + lane] : -INFINITY;
            const float s1 = vb ? Ss[row * LDS + lane + 32] : -INFINITY;
            const float mo = rm[row];
            const float mn = fmaxf(mo, moe_cuda_warp_max(fmaxf(s0, s1)));
            float p0 = expf(s0 - mn), p1 = expf(s1 - mn);
            const float alpha = expf(mo - mn);
            const float sum = moe_cuda_warp_sum(p0 + p1);
            if (p > 0.0f) {
                p0 = va ? p0 * drop_factor(p, scale, seed, stream, bh, T_, i, ja) : 0.0f;
                p1 = vb ? p1 * drop_factor(p, scale, seed, stream, bh, T_, i, jb) : 0.0f;
            }
            Ps[row * LDP + lane] = moe_cuda_from_f32<T>(p0);
            Ps[row * LDP + lane + 32] = moe_cuda_from_f32<T>(p1);
            for (int d = lane; d < D; d += 32)
                Os[row * LDO + d] *= alpha;
            __syncwarp();
            if (lane == 0) {
                rm[row] = mn;
                rl[row] = rl[row] * alpha + sum;
            }
        }
        __syncwarp();
        /* O(16xD) += P(16x64) V(64xD) */
#pragma unroll
        for (int cc = 0; cc < D / 16; cc++) {
            wm_acc acc;
            wm::load_matrix_sync(acc, Os + warp * 16 * LDO + cc * 16, LDO, wm::mem_row_major);
            wm_pv<T>(acc, Ps + warp * 16 * LDP, LDP, Vs + cc * 16, LD);
            wm::store_matrix_sync(Os + warp * 16 * LDO + cc * 16, acc, LDO, wm::mem_row_major);
        }
        __syncwarp();
    }
    for (int r = 0; r < 16; r++) {
        const int row = warp * 16 + r;
        const int64_t i = i0 + row;
        if (i >= T_)
            break;
        const float l = rl[row], inv = 1.0f / l;
        for (int d = lane; d < D; d += 32)
            out[(b * T_ + i) * H * D + h * D + d] = moe_cuda_from_f32<T>(Os[row * LDO + d] * inv);
        if (lane == 0)
            lse[bh * T_ + i] = rm[row] + logf(l);
    }
}

/* Backward, dK and dV of one key tile: warp w owns keys 16w..16w+15 and keeps
 * their gradients in fragments over every query tile at or after the keys. */
template <typename T, int D>
static __global__ void __launch_bounds__(WM_THREADS)
    attn_bwd_dkdv_wmma_kernel(T *dk, T *dv, int64_t ldd, const T *dout, const float *lse, const float *delta,
                              const T *q, const T *k, const T *v, int64_t ld, int64_t T_, int64_t H, float p,
                              float scale, uint64_t seed, uint64_t stream)
{
    typedef wm_cfg<T, D> cfg;
    constexpr int LD = cfg::LD, LDS = cfg::LDS, LDP = cfg::LDP, LDO = cfg::LDO;
    extern __shared__ __align__(128) unsigned char smem[];
    T *Ks = (T *)smem, *Vs = Ks + WM_TILE * LD, *Qs = Vs + WM_TILE * LD, *dOs = Qs + WM_TILE * LD;
    float *St = (float *)(dOs + WM_TILE * LD), *dPt = St + WM_TILE * LDS;
    T *Ph = (T *)(dPt + WM_TILE * LDS);
    float *ls = (float *)(Ph + WM_TILE * LDP), *dls = ls + WM_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, C = H * D;
    const int kt = blockIdx.y;
    const int64_t j0 = (int64_t)kt * WM_TILE;

    wm_load_tile<T, D>(Ks, k, ld, b, h, j0, T_);
    wm_load_tile<T, D>(Vs, v, ld, b, h, j0, T_);
    wm_acc gk[D / 16], gv[D / 16];
#pragma unroll
    for (int cc = 0; cc < D / 16; cc++) {
        wm::fill_fragment(gk[cc], 0.0f);
        wm::fill_fragment(gv[cc], 0.0f);
    }
    for (int64_t i0 = j0; i0 < T_; i0 += WM_TILE) {
        __syncthreads();
        wm_load_tile<T, D>(Qs, q, ld, b, h, i0, T_);
        wm_load_tile<T, D>(dOs, dout, C, b, h, i0, T_);
        if (threadIdx.x < WM_TILE) {
            int64_t i = i0 + threadIdx.x;
            ls[threadIdx.x] = i < T_ ? lse[bh * T_ + i] : 0.0f;
            dls[threadIdx.x] = i < T_ ? delta[bh * T_ + i] : 0.0f;
        }
        __syncthreads();
        /* S^T and dPd^T (16 keys x 64 queries) of this warp's keys */
#pragma unroll
        for (int cc = 0; cc < WM_TILE / 16; cc++) {
            wm_acc acc;
            wm_abt<T, D>(acc, Ks + warp * 16 * LD, Qs + cc * 16 * LD, LD);
            wm::store_matrix_sync(St + warp * 16 * LDS + cc * 16, acc, LDS, wm::mem_row_major);
            wm_abt<T, D>(acc, Vs + warp * 16 * LD, dOs + cc * 16 * LD, LD);
            wm::store_matrix_sync(dPt + warp * 16 * LDS + cc * 16, acc, LDS, wm::mem_row_major);
        }
        __syncwarp();
        for (int r = 0; r < 16; r++) {
            const int row = warp * 16 + r;
            const int64_t j = j0 + row;
            for (int col = lane; col < WM_TILE; col += 32) {
                const int64_t i = i0 + col;
                const bool valid = i >= j && i < T_ && j < T_;
                const float pr = valid ? expf(St[row * LDS + col] - ls[col]) : 0.0f;
                const float z = valid ? drop_factor(p, scale, seed, stream, bh, T_, i, j) : 0.0f;
                Ph[row * LDP + col] = moe_cuda_from_f32<T>(pr * z);
                St[row * LDS + col] = pr * (z * dPt[row * LDS + col] - dls[col]);
            }
        }
        __syncwarp();
        /* dV(16xD) += Pd^T(16x64) dO(64xD) */
#pragma unroll
        for (int cc = 0; cc < D / 16; cc++)
            wm_pv<T>(gv[cc], Ph + warp * 16 * LDP, LDP, dOs + cc * 16, LD);
        __syncwarp();
        for (int r = 0; r < 16; r++) {
            const int row = warp * 16 + r;
            for (int col = lane; col < WM_TILE; col += 32)
                Ph[row * LDP + col] = moe_cuda_from_f32<T>(St[row * LDS + col]);
        }
        __syncwarp();
        /* dK(16xD) += dS^T(16x64) Q(64xD) */
#pragma unroll
        for (int cc = 0; cc < D / 16; cc++)
            wm_pv<T>(gk[cc], Ph + warp * 16 * LDP, LDP, Qs + cc * 16, LD);
        __syncwarp();
    }
    /* out through fp32 staging: St and dPt together hold 64 rows of LDO, rows
     * that other warps used for scores, hence the barrier */
    __syncthreads();
    float *Og = St;
#pragma unroll
    for (int pass = 0; pass < 2; pass++) {
        __syncwarp();
#pragma unroll
        for (int cc = 0; cc < D / 16; cc++)
            wm::store_matrix_sync(Og + warp * 16 * LDO + cc * 16, pass == 0 ? gk[cc] : gv[cc], LDO,
                                  wm::mem_row_major);
        __syncwarp();
        T *dst = pass == 0 ? dk : dv;
        for (int r = 0; r < 16; r++) {
            const int row = warp * 16 + r;
            const int64_t j = j0 + row;
            if (j >= T_)
                break;
            for (int d = lane; d < D; d += 32)
                dst[(b * T_ + j) * ldd + h * D + d] = moe_cuda_from_f32<T>(Og[row * LDO + d]);
        }
    }
}

/* Backward, dQ of one query tile: warp w owns queries 16w..16w+15. */
template <typename T, int D>
static __global__ void __launch_bounds__(WM_THREADS)
    attn_bwd_dq_wmma_kernel(T *dq, int64_t ldd, const T *dout, const float *lse, const float *delta, const T *q,
                            const T *k, const T *v, int64_t ld, int64_t T_, int64_t H, float p, float scale,
                            uint64_t seed, uint64_t stream)
{
    typedef wm_cfg<T, D> cfg;
    constexpr int LD = cfg::LD, LDS = cfg::LDS, LDP = cfg::LDP, LDO = cfg::LDO;
    extern __shared__ __align__(128) unsigned char smem[];
    T *Qs = (T *)smem, *dOs = Qs + WM_TILE * LD, *Ks = dOs + WM_TILE * LD, *Vs = Ks + WM_TILE * LD;
    float *Ss = (float *)(Vs + WM_TILE * LD), *dPs = Ss + WM_TILE * LDS;
    T *Ph = (T *)(dPs + WM_TILE * LDS);
    float *ls = (float *)(Ph + WM_TILE * LDP), *dls = ls + WM_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, C = H * D;
    const int qt = blockIdx.y;
    const int64_t i0 = (int64_t)qt * WM_TILE;

    wm_load_tile<T, D>(Qs, q, ld, b, h, i0, T_);
    wm_load_tile<T, D>(dOs, dout, C, b, h, i0, T_);
    if (threadIdx.x < WM_TILE) {
        int64_t i = i0 + threadIdx.x;
        ls[threadIdx.x] = i < T_ ? lse[bh * T_ + i] : 0.0f;
        dls[threadIdx.x] = i < T_ ? delta[bh * T_ + i] : 0.0f;
    }
    wm_acc gq[D / 16];
#pragma unroll
    for (int cc = 0; cc < D / 16; cc++)
        wm::fill_fragment(gq[cc], 0.0f);
    for (int kt = 0; kt <= qt; kt++) {
        const int64_t j0 = (int64_t)kt * WM_TILE;
        __syncthreads();
        wm_load_tile<T, D>(Ks, k, ld, b, h, j0, T_);
        wm_load_tile<T, D>(Vs, v, ld, b, h, j0, T_);
        __syncthreads();
#pragma unroll
        for (int cc = 0; cc < WM_TILE / 16; cc++) {
            wm_acc acc;
            wm_abt<T, D>(acc, Qs + warp * 16 * LD, Ks + cc * 16 * LD, LD);
            wm::store_matrix_sync(Ss + warp * 16 * LDS + cc * 16, acc, LDS, wm::mem_row_major);
            wm_abt<T, D>(acc, dOs + warp * 16 * LD, Vs + cc * 16 * LD, LD);
            wm::store_matrix_sync(dPs + warp * 16 * LDS + cc * 16, acc, LDS, wm::mem_row_major);
        }
        __syncwarp();
        for (int r = 0; r < 16; r++) {
            const int row = warp * 16 + r;
            const int64_t i = i0 + row;
            for (int col = lane; col < WM_TILE; col += 32) {
                const int64_t j = j0 + col;
                const bool valid = j <= i && j < T_ && i < T_;
                const float pr = valid ? expf(Ss[row * LDS + col] - ls[row]) : 0.0f;
                const float z = valid ? drop_factor(p, scale, seed, stream, bh, T_, i, j) : 0.0f;
                Ph[row * LDP + col] = moe_cuda_from_f32<T>(pr * (z * dPs[row * LDS + col] - dls[row]));
            }
        }
        __syncwarp();
        /* dQ(16xD) += dS(16x64) K(64xD) */
#pragma unroll
        for (int cc = 0; cc < D / 16; cc++)
            wm_pv<T>(gq[cc], Ph + warp * 16 * LDP, LDP, Ks + cc * 16, LD);
        __syncwarp();
    }
    __syncthreads();
    float *Og = Ss; /* Ss and dPs together hold 64 rows of LDO (other warps' score rows) */
#pragma unroll
    for (int cc = 0; cc < D / 16; cc++)
        wm::store_matrix_sync(Og + warp * 16 * LDO + cc * 16, gq[cc], LDO, wm::mem_row_major);
    __syncwarp();
    for (int r = 0; r < 16; r++) {
        const int row = warp * 16 + r;
        const int64_t i = i0 + row;
        if (i >= T_)
            break;
        for (int d = lane; d < D; d += 32)
            dq[(b * T_ + i) * ldd + h * D + d] = moe_cuda_from_f32<T>(Og[row * LDO + d]);
    }
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

static int use_wmma(moe_dtype dt, int64_t D) { return (dt == MOE_F16 || dt == MOE_BF16) && (D == 32 || D == 64 || D == 128); }

template <typename K> static moe_status set_smem(moe_ctx *c, K kernel, size_t bytes)
{
    if (bytes > 48u * 1024u)
        MOE_CUDA_TRY(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return MOE_OK;
}

template <typename T, int D>
static moe_status fwd_wmma(moe_ctx *c, void *out, float *lse, const void *q, const void *k, const void *v, int64_t ld,
                           int64_t B, int64_t T_, int64_t H, float p, uint64_t seed, uint64_t stream)
{
    const size_t bytes = wm_cfg<T, D>::fwd_bytes;
    MOE_TRY(set_smem(c, attn_fwd_wmma_kernel<T, D>, bytes));
    dim3 grid((unsigned)(B * H), (unsigned)((T_ + WM_TILE - 1) / WM_TILE));
    attn_fwd_wmma_kernel<T, D><<<grid, WM_THREADS, bytes, c->stream>>>(
        (T *)out, lse, (const T *)q, (const T *)k, (const T *)v, ld, T_, H, p, p > 0.0f ? 1.0f / (1.0f - p) : 1.0f,
        seed, stream);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

template <typename T, int D>
static moe_status bwd_wmma(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout,
                           const float *lse, const float *delta, const void *q, const void *k, const void *v,
                           int64_t ld, int64_t B, int64_t T_, int64_t H, float p, uint64_t seed, uint64_t stream)
{
    const size_t bytes = wm_cfg<T, D>::bwd_bytes;
    const float scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    dim3 grid((unsigned)(B * H), (unsigned)((T_ + WM_TILE - 1) / WM_TILE));
    MOE_TRY(set_smem(c, attn_bwd_dkdv_wmma_kernel<T, D>, bytes));
    attn_bwd_dkdv_wmma_kernel<T, D><<<grid, WM_THREADS, bytes, c->stream>>>(
        (T *)dk, (T *)dv, ldd, (const T *)dout, lse, delta, (const T *)q, (const T *)k, (const T *)v, ld, T_, H, p,
        scale, seed, stream);
    MOE_CUDA_CHECK_LAUNCH(c);
    MOE_TRY(set_smem(c, attn_bwd_dq_wmma_kernel<T, D>, bytes));
    attn_bwd_dq_wmma_kernel<T, D><<<grid, WM_THREADS, bytes, c->stream>>>(
        (T *)dq, ldd, (const T *)dout, lse, delta, (const T *)q, (const T *)k, (const T *)v, ld, T_, H, p, scale,
        seed, stream);
    MOE_CUDA_CHECK_LAUNCH(c);
    return MOE_OK;
}

#define WM_DISPATCH(dt, D, CALL_T_D)                                       \
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
    if (use_wmma(dt, D)) {
#define FWD_CALL(TT, DD) \
    return fwd_wmma<TT, DD>(c, out, lse, q, k, v, ld, B, T, H, dropout_p, seed, stream)
        WM_DISPATCH(dt, D, FWD_CALL);
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
    if (use_wmma(dt, D)) {
#define BWD_CALL(TT, DD)                                                                                   \
    do {                                                                                                   \
        st = bwd_wmma<TT, DD>(c, dq, dk, dv, ldd, dout, lse, delta, q, k, v, ld, B, T, H, dropout_p, seed, \
                              stream);                                                                     \
        goto done;                                                                                         \
    } while (0)
        WM_DISPATCH(dt, D, BWD_CALL);
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
