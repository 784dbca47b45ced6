/* philox.h: the counter-based RNG shared by every backend (Philox4x32-10,
 * Salmon et al. 2011). A draw is a pure function of (seed, stream, index), so
 * the cpu and cuda backends produce identical dropout masks and
 * initialisations, and recomputation reproduces them.
 *
 * Definitions live here (static inline) because the same code must compile as
 * C for the cpu backend and as CUDA device code; nothing else does this.
 *
 * Mapping: key = seed; one evaluation at counter (group, stream) yields four
 * 32-bit words, and group g serves the four consecutive indices 4g .. 4g+3:
 * index i draws word (i & 3) of moe_philox4x32(seed, stream, i >> 2), and
 * uniform = (word >> 8) * 2^-24 in [0, 1). A kernel that owns the indices of
 * a whole group (or half of one) evaluates Philox once for all of them
 * (moe_philox_uniform4); moe_philox_uniform is the same draw one index at a
 * time, so every caller agrees whatever its access pattern.
 * Normals (moe_philox_uniform2, Box-Muller): normal i uses the uniforms of
 * indices 2i and 2i+1, i.e. words 2(i & 1) and 2(i & 1) + 1 of group i >> 1.
 */
#ifndef MOE_KERNELS_PHILOX_H
#define MOE_KERNELS_PHILOX_H

#include <stdint.h>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD static inline
#endif

typedef struct moe_philox_out { uint32_t v[4]; } moe_philox_out;

MOE_HD uint32_t moe_philox_mulhilo(uint32_t a, uint32_t b, uint32_t *hi)
{
    uint64_t p = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

MOE_HD moe_philox_out moe_philox4x32(uint64_t seed, uint64_t stream, uint64_t index)
{
    uint32_t c0 = (uint32_t)index, c1 = (uint32_t)(index >> 32);
    uint32_t c2 = (uint32_t)stream, c3 = (uint32_t)(stream >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint32_t hi0, hi1;
        uint32_t lo0 = moe_philox_mulhilo(0xD2511F53u, c0, &hi0);
        uint32_t lo1 = moe_philox_mulhilo(0xCD9E8D57u, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    moe_philox_out o;
    o.v[0] = c0; o.v[1] = c1; o.v[2] = c2; o.v[3] = c3;
    return o;
}

/* a word as a uniform in [0, 1) with 24 random bits: exact in fp32 on every backend */
MOE_HD float moe_philox_u24(uint32_t x)
{
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}

/* the uniforms of indices 4*group .. 4*group + 3 (u[w] is index 4*group + w) */
MOE_HD void moe_philox_uniform4(uint64_t seed, uint64_t stream, uint64_t group, float u[4])
{
    moe_philox_out o = moe_philox4x32(seed, stream, group);
    u[0] = moe_philox_u24(o.v[0]);
    u[1] = moe_philox_u24(o.v[1]);
    u[2] = moe_philox_u24(o.v[2]);
    u[3] = moe_philox_u24(o.v[3]);
}

/* the uniform of one index: word (index & 3) of group index >> 2 */
MOE_HD float moe_philox_uniform(uint64_t seed, uint64_t stream, uint64_t index)
{
    const moe_philox_out o = moe_philox4x32(seed, stream, index >> 2);
    const unsigned w = (unsigned)(index & 3); /* selects, not o.v[w]: a run-time index would put o in memory */
    return moe_philox_u24(w == 0 ? o.v[0] : w == 1 ? o.v[1] : w == 2 ? o.v[2] : o.v[3]);
}

/* two uniforms in (0, 1] and [0, 1) for Box-Muller: normal `index` takes the
 * words of uniform indices 2*index and 2*index + 1 (one evaluation serves two
 * normals) */
MOE_HD void moe_philox_uniform2(uint64_t seed, uint64_t stream, uint64_t index, float *u1, float *u2)
{
    const moe_philox_out o = moe_philox4x32(seed, stream, index >> 1);
    const int hi = (int)(index & 1);
    *u1 = (float)(((hi ? o.v[2] : o.v[0]) >> 8) + 1u) * (1.0f / 16777216.0f);
    *u2 = moe_philox_u24(hi ? o.v[3] : o.v[1]);
}

/* Attention dropout draws 16 bits a score, eight scores a Philox group (its
 * T x T masks are the largest of the model, drawn in the forward and again
 * in both backward passes): index i takes half (i & 1), low half first, of
 * word (i >> 1) & 3 of group i >> 3, and is kept iff those bits are >=
 * moe_philox_threshold16(p) = ceil(p * 65536). So P(drop) = ceil(p * 65536)
 * / 65536, within 2^-16 of p (as FlashAttention's byte threshold, but 256
 * times finer); the scale of the kept scores stays 1/(1 - p). */
MOE_HD uint32_t moe_philox_threshold16(float p)
{
    const float t = p * 65536.0f; /* exact: a power of two */
    const uint32_t f = (uint32_t)t;
    return (float)f < t ? f + 1u : f;
}

/* keep bits of the eight scores of group `group`: bit w for index 8 group + w */
MOE_HD unsigned moe_philox_keep8(uint64_t seed, uint64_t stream, uint64_t group, uint32_t threshold)
{
    const moe_philox_out o = moe_philox4x32(seed, stream, group);
    unsigned keep = 0;
    for (int w = 0; w < 4; w++)
        keep |= (unsigned)((o.v[w] & 0xFFFFu) >= threshold) << (2 * w) |
                (unsigned)((o.v[w] >> 16) >= threshold) << (2 * w + 1);
    return keep;
}

/* whether the score of attention-dropout index `index` is kept */
MOE_HD int moe_philox_keep16(uint64_t seed, uint64_t stream, uint64_t index, uint32_t threshold)
{
    return (int)((moe_philox_keep8(seed, stream, index >> 3, threshold) >> (index & 7)) & 1u);
}

#endif
