/* half.h: fp16 and bf16 conversions in plain C for the cpu backend, round to
 * nearest even, with inf/nan/subnormals handled as IEEE says (the overflow
 * checks of loss scaling depend on fp16 saturating to inf exactly as on GPUs).
 */
#ifndef MOE_KERNELS_HALF_H
#define MOE_KERNELS_HALF_H

#include <stdint.h>
#include <string.h>

static inline float moe_bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t moe_f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float moe_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0) {
        if (man == 0)
            return moe_bits_to_f32(sign);
        /* subnormal: value = man * 2^-24 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31)
        return moe_bits_to_f32(sign | 0x7F800000u | (man << 13));
    return moe_bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t moe_f32_to_f16(float f)
{
    uint32_t x = moe_f32_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7FFFFFFFu;
    if (absx >= 0x7F800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u));
    if (absx >= 0x477FF000u) /* >= 65520 rounds to inf */
        return (uint16_t)(sign | 0x7C00u);
    if (absx < 0x38800000u) { /* below 2^-14: subnormal or zero */
        if (absx < 0x33000000u) /* below 2^-25 rounds to zero */
            return (uint16_t)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
        /* value = m * 2^(e-150) and the subnormal unit is 2^-24, so h = m * 2^(e-126) */
        uint32_t sh = 126u - e;
        uint32_t h = m >> sh;
        uint32_t rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
        if (rem > half || (rem == half && (h & 1u)))
            h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((absx >> 13) - (112u << 10));
    uint32_t rem = absx & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

static inline float moe_bf16_to_f32(uint16_t b) { return moe_bits_to_f32((uint32_t)b << 16); }

static inline uint16_t moe_f32_to_bf16(float f)
{
    uint32_t x = moe_f32_to_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((x >> 16) | 0x40u); /* quiet nan */
    uint32_t lsb = (x >> 16) & 1u;
    x += 0x7FFFu + lsb;
    return (uint16_t)(x >> 16);
}

#endif
