/* attention.c: the cpu reference of causal multi-head self-attention, forward
 * and backward, as ops.h documents it (FAIRSEQ_SPEC.md §1.5 for the math).
 *
 * Plain loops per (batch, head, query row) with O(T) scratch per row and the
 * head's keys and values widened to fp32 once; no tiling, no online softmax.
 * The cuda backend's flash-style kernel is checked against this.
 *
 * Conventions a reader would trip over:
 *  - q arrives already scaled by head_dim^-0.5, so scores are plain q.k, and
 *    dq is the gradient with respect to that scaled q.
 *  - q, k, v (and dq, dk, dv) are (B,T,H,D) views with a row stride (ld, ldd)
 *    between tokens, so they may live inside one packed projection; out is
 *    (B,T,H*D) contiguous. Element (b,t,h,d) sits at (b*T + t)*ld + h*D + d.
 *  - Dropout acts on the probabilities after the softmax: P'_ij = P_ij *
 *    keep_ij / (1-p), keep_ij = moe_philox_keep16(seed, stream,
 *    ((b*H+h)*T+i)*T+j, ceil(65536 p)): 16 random bits a score, P(drop)
 *    within 2^-16 of p (kernels/philox.h).
 *    lse is of the scores before dropout. The backward's D_i = rowsum(dO*O)
 *    stays exact with dropout, since sum_j P_ij dP_ij = dO_i . O_i.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels/cpu/cpu.h"

#define CPU_ERROR(c, st, ...)                                                                 \
    (((c) != NULL && (c)->host != NULL && (c)->host->error != NULL)                           \
         ? (c)->host->error((c)->host, (st), __VA_ARGS__)                                     \
         : (st))

static moe_status check_args(moe_ctx *c, const char *op, int64_t ld, int64_t ldd, int64_t B, int64_t T, int64_t H,
                             int64_t D, float p, moe_dtype dt)
{
    if (dt != MOE_F32 && dt != MOE_F16 && dt != MOE_BF16)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected dtype f32, f16 or bf16, found dtype %d", op, (int)dt);
    if (B < 0 || T < 0 || H < 1 || D < 1)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu %s: expected B, T >= 0 and H, D >= 1, found B %lld, T %lld, H %lld, D %lld", op,
                         (long long)B, (long long)T, (long long)H, (long long)D);
    if (ld < H * D || ldd < H * D)
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG,
                         "cpu %s: expected row strides >= H*D = %lld, found ld %lld (gradients: %lld)", op,
                         (long long)(H * D), (long long)ld, (long long)ldd);
    if (!(p >= 0.0f && p < 1.0f))
        return CPU_ERROR(c, MOE_ERR_INVALID_ARG, "cpu %s: expected attention dropout 0 <= p < 1, found %g", op,
                         (double)p);
    return MOE_OK;
}

/* dst[t*D + d] = src(b, t, h, d) for t < T */
static void load_head(float *dst, const void *src, moe_dtype dt, int64_t ld, int64_t b, int64_t h, int64_t T,
                      int64_t D)
{
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < D; d++)
            dst[t * D + d] = moe_cpu_load(src, dt, (b * T + t) * ld + h * D + d);
}

static float dot(const float *x, const float *y, int64_t n)
{
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += x[i] * y[i];
    return s;
}

/* keep/(1-p) for score (b,h,i,j): the dropout factor z_ij, index
 * ((b*H + h)*T + i)*T + j of kernels/philox.h's 16-bit attention draws */
static float drop_factor(float p, float scale, uint64_t seed, uint64_t stream, int64_t b, int64_t h, int64_t i,
                         int64_t j, int64_t H, int64_t T)
{
    if (p == 0.0f)
        return 1.0f;
    const uint64_t counter = (uint64_t)(((b * H + h) * T + i) * T + j);
    return moe_philox_keep16(seed, stream, counter, moe_philox_threshold16(p)) ? scale : 0.0f;
}

moe_status moe_cpu_attention_forward(moe_ctx *c, void *out, float *lse, const void *q, const void *k, const void *v,
                                     int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D, float dropout_p,
                                     uint64_t seed, uint64_t stream, moe_dtype dt)
{
    MOE_TRY(check_args(c, "attention_forward", ld, ld, B, T, H, D, dropout_p, dt));
    if (B == 0 || T == 0)
        return MOE_OK;
    float *kf = malloc((size_t)(2 * T * D + 2 * D + T) * sizeof(float));
    if (kf == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu attention_forward: out of host memory for T=%lld, D=%lld scratch",
                         (long long)T, (long long)D);
    float *vf = kf + T * D, *qrow = vf + T * D, *orow = qrow + D, *prob = orow + D;
    const float scale = 1.0f / (1.0f - dropout_p);
    const int64_t C = H * D;

    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            load_head(kf, k, dt, ld, b, h, T, D);
            load_head(vf, v, dt, ld, b, h, T, D);
            for (int64_t i = 0; i < T; i++) {
                for (int64_t d = 0; d < D; d++)
                    qrow[d] = moe_cpu_load(q, dt, (b * T + i) * ld + h * D + d);
                float mx = -INFINITY;
                for (int64_t j = 0; j <= i; j++) {
                    prob[j] = dot(qrow, kf + j * D, D);
                    if (prob[j] > mx)
                        mx = prob[j];
                }
                double sum = 0.0;
                for (int64_t j = 0; j <= i; j++) {
                    prob[j] = expf(prob[j] - mx);
                    sum += (double)prob[j];
                }
                const float inv = (float)(1.0 / sum);
                lse[(b * H + h) * T + i] = mx + (float)log(sum);
                for (int64_t d = 0; d < D; d++)
                    orow[d] = 0.0f;
                for (int64_t j = 0; j <= i; j++) {
                    const float pj = prob[j] * inv * drop_factor(dropout_p, scale, seed, stream, b, h, i, j, H, T);
                    for (int64_t d = 0; d < D; d++)
                        orow[d] += pj * vf[j * D + d];
                }
                for (int64_t d = 0; d < D; d++)
                    moe_cpu_store(out, dt, (b * T + i) * C + h * D + d, orow[d]);
            }
        }
    }
    free(kf);
    return MOE_OK;
}

moe_status moe_cpu_attention_backward(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout,
                                      const void *out, const float *lse, const void *q, const void *k,
                                      const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D,
                                      float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt)
{
    MOE_TRY(check_args(c, "attention_backward", ld, ldd, B, T, H, D, dropout_p, dt));
    if (B == 0 || T == 0)
        return MOE_OK;
    float *kf = malloc((size_t)(4 * T * D + 3 * D) * sizeof(float));
    if (kf == NULL)
        return CPU_ERROR(c, MOE_ERR_NOMEM, "cpu attention_backward: out of host memory for T=%lld, D=%lld scratch",
                         (long long)T, (long long)D);
    float *vf = kf + T * D, *dkf = vf + T * D, *dvf = dkf + T * D, *qrow = dvf + T * D, *dorow = qrow + D,
          *dqrow = dorow + D;
    const float scale = 1.0f / (1.0f - dropout_p);
    const int64_t C = H * D;

    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            load_head(kf, k, dt, ld, b, h, T, D);
            load_head(vf, v, dt, ld, b, h, T, D);
            for (int64_t x = 0; x < T * D; x++)
                dkf[x] = dvf[x] = 0.0f;
            for (int64_t i = 0; i < T; i++) {
                const int64_t orow_at = (b * T + i) * C + h * D;
                double di = 0.0; /* D_i = dO_i . O_i */
                for (int64_t d = 0; d < D; d++) {
                    qrow[d] = moe_cpu_load(q, dt, (b * T + i) * ld + h * D + d);
                    dorow[d] = moe_cpu_load(dout, dt, orow_at + d);
                    di += (double)dorow[d] * (double)moe_cpu_load(out, dt, orow_at + d);
                    dqrow[d] = 0.0f;
                }
                const float lse_i = lse[(b * H + h) * T + i], di_f = (float)di;
                for (int64_t j = 0; j <= i; j++) {
                    const float pj = expf(dot(qrow, kf + j * D, D) - lse_i);
                    const float z = drop_factor(dropout_p, scale, seed, stream, b, h, i, j, H, T);
                    const float dpj = z * dot(dorow, vf + j * D, D); /* dP_ij, through the dropout */
                    const float ds = pj * (dpj - di_f);
                    const float pz = pj * z;
                    for (int64_t d = 0; d < D; d++) {
                        dvf[j * D + d] += pz * dorow[d];
                        dqrow[d] += ds * kf[j * D + d];
                        dkf[j * D + d] += ds * qrow[d];
                    }
                }
                for (int64_t d = 0; d < D; d++)
                    moe_cpu_store(dq, dt, (b * T + i) * ldd + h * D + d, dqrow[d]);
            }
            for (int64_t t = 0; t < T; t++)
                for (int64_t d = 0; d < D; d++) {
                    moe_cpu_store(dk, dt, (b * T + t) * ldd + h * D + d, dkf[t * D + d]);
                    moe_cpu_store(dv, dt, (b * T + t) * ldd + h * D + d, dvf[t * D + d]);
                }
        }
    }
    free(kf);
    return MOE_OK;
}
