/* philox.h: the counter-based RNG shared by every backend (Philox4x32-10,
 * Salmon et al. 2011). A draw is a pure function of (seed, stream, index), so
 * the cpu and cuda backends produce identical dropout masks and
 * initialisations, and recomputation reproduces them.
 *
 * Definitions live here (static inline) because the same code must compile as
 * C for the cpu backend and as CUDA device code; nothing else does this.
 * Mapping: key = seed, counter = (index, stream); one 32-bit output per draw
 * (word 0), uniform = (x >> 8) * 2^-24 in [0, 1).
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

/* uniform in [0, 1) with 24 random bits: exact in fp32 on every backend */
MOE_HD float moe_philox_uniform(uint64_t seed, uint64_t stream, uint64_t index)
{
    return (float)(moe_philox4x32(seed, stream, index).v[0] >> 8) * (1.0f / 16777216.0f);
}

/* two uniforms in (0, 1] and [0, 1) for Box-Muller */
MOE_HD void moe_philox_uniform2(uint64_t seed, uint64_t stream, uint64_t index, float *u1, float *u2)
{
    moe_philox_out o = moe_philox4x32(seed, stream, index);
    *u1 = (float)((o.v[0] >> 8) + 1u) * (1.0f / 16777216.0f);
    *u2 = (float)(o.v[1] >> 8) * (1.0f / 16777216.0f);
}

#endif
