/* cpu.h: the cpu backend's functions, one per ops-table entry (ops.h says what
 * each computes). The readable reference: plain loops, fp32 arithmetic,
 * fp32/fp16/bf16 storage through load/store helpers. Files by family:
 *   backend.c  context, memory, the ops table, elementwise and utility ops
 *   matmul.c   matmul (+ epilogues), bias_backward
 *   nn.c       activations (gelu, relu), dropout, layernorm, embedding,
 *              cross_entropy
 *   attention.c causal attention forward/backward
 *   route.c    MoE routing, dispatch, combine
 *   optim.c    adam_step, sgd_step
 *   decode.c   the decoding ops: embedding at positions, row-wise Linear,
 *              cached attention, no-drop gate, routed experts, logits
 *              statistics
 */
#ifndef MOE_KERNELS_CPU_H
#define MOE_KERNELS_CPU_H

#include "kernels/half.h"
#include "kernels/philox.h"
#include "moe/ops.h"
#include "moe/plugin.h"

struct moe_ctx {
    const moe_host *host;
    uint64_t allocated, peak;   /* bytes in live allocations, and the peak since reset */
};

/* element load/store for a storage dtype (fp32 arithmetic) */
static inline float moe_cpu_load(const void *p, moe_dtype dt, int64_t i)
{
    switch (dt) {
    case MOE_F16: return moe_f16_to_f32(((const uint16_t *)p)[i]);
    case MOE_BF16: return moe_bf16_to_f32(((const uint16_t *)p)[i]);
    case MOE_I32: return (float)((const int32_t *)p)[i];
    default: return ((const float *)p)[i];
    }
}

static inline void moe_cpu_store(void *p, moe_dtype dt, int64_t i, float v)
{
    switch (dt) {
    case MOE_F16: ((uint16_t *)p)[i] = moe_f32_to_f16(v); break;
    case MOE_BF16: ((uint16_t *)p)[i] = moe_f32_to_bf16(v); break;
    case MOE_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    default: ((float *)p)[i] = v; break;
    }
}

/* backend.c */
moe_status moe_cpu_fill(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float value);
moe_status moe_cpu_cast(moe_ctx *c, void *dst, moe_dtype dst_dt, const void *src, moe_dtype src_dt, int64_t n);
moe_status moe_cpu_axpby(moe_ctx *c, void *y, const void *x, moe_dtype dt, int64_t n, float a, float b);
moe_status moe_cpu_add(moe_ctx *c, void *out, const void *x, const void *y, moe_dtype dt, int64_t n);
moe_status moe_cpu_init_uniform(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float lo, float hi, uint64_t seed,
                                uint64_t stream);
moe_status moe_cpu_init_normal(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float mean, float std, uint64_t seed,
                               uint64_t stream);
moe_status moe_cpu_sum_f32(moe_ctx *c, float *out, const float *x, int64_t n, int64_t stride, float scale);
moe_status moe_cpu_sumsq(moe_ctx *c, float *out, const void *x, moe_dtype dt, int64_t n);

/* matmul.c */
moe_status moe_cpu_matmul(moe_ctx *c, const moe_matmul_desc *d);
moe_status moe_cpu_bias_backward(moe_ctx *c, void *dbias, const void *dy, int64_t N, int64_t C, moe_dtype dt);
moe_status moe_cpu_grouped_matmul(moe_ctx *c, const moe_grouped_matmul_args *g);

/* nn.c */
float moe_cpu_act(float x, moe_act_kind kind); /* one element: the forward of act_forward */
moe_status moe_cpu_act_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, moe_act_kind kind);
moe_status moe_cpu_act_backward(moe_ctx *c, void *dinp, const void *inp, const void *dout, int64_t n, moe_dtype dt,
                                 moe_act_kind kind);
moe_status moe_cpu_dropout_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, float p,
                                   uint64_t seed, uint64_t stream);
moe_status moe_cpu_dropout_backward(moe_ctx *c, void *din, const void *dout, int64_t n, moe_dtype dt, float p,
                                    uint64_t seed, uint64_t stream);
moe_status moe_cpu_layernorm_forward(moe_ctx *c, void *out, float *mean, float *rstd, const void *inp,
                                     const void *weight, const void *bias, int64_t N, int64_t C, float eps,
                                     moe_dtype dt);
moe_status moe_cpu_layernorm_backward(moe_ctx *c, void *dinp, void *dweight, void *dbias, const void *dout,
                                      const void *inp, const void *weight, const float *mean, const float *rstd,
                                      int64_t N, int64_t C, moe_dtype dt);
moe_status moe_cpu_embedding_forward(moe_ctx *c, void *out, const int32_t *tokens, const void *table, int64_t B,
                                     int64_t T, int64_t C, float scale, int padding_idx, int sinusoidal,
                                     moe_dtype dt);
moe_status moe_cpu_embedding_backward(moe_ctx *c, void *dtable, const void *dout, const int32_t *tokens, int64_t B,
                                      int64_t T, int64_t C, int64_t V, float scale, int padding_idx, moe_dtype dt);
moe_status moe_cpu_cross_entropy(moe_ctx *c, float *losses, void *logits, const int32_t *targets, int64_t N,
                                 int64_t V, int ignore_index, float grad_scale, moe_dtype dt);

/* attention.c */
moe_status moe_cpu_attention_forward(moe_ctx *c, void *out, float *lse, const void *q, const void *k, const void *v,
                                     int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D, float dropout_p,
                                     uint64_t seed, uint64_t stream, moe_dtype dt);
moe_status moe_cpu_attention_backward(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout,
                                      const void *out, const float *lse, const void *q, const void *k,
                                      const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D,
                                      float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt);

/* route.c */
int64_t moe_cpu_route_workspace_bytes(int64_t S, int E);
moe_status moe_cpu_route_forward(moe_ctx *c, const moe_route_args *a);
moe_status moe_cpu_route_backward(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux,
                                  float *dlogits);
moe_status moe_cpu_dispatch_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                    const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cpu_dispatch_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                     const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cpu_combine_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert, const int32_t *slot,
                                   const float *weight, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cpu_combine_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                    const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                    int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cpu_dispatch_wide_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                         const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                         moe_dtype dt);
moe_status moe_cpu_dispatch_wide_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                          const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                          moe_dtype dt);
moe_status moe_cpu_combine_wide_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert,
                                        const int32_t *slot, const float *weight, int64_t S, int W, int E, int64_t C,
                                        int64_t d, moe_dtype dt);
moe_status moe_cpu_combine_wide_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                         const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                         int W, int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cpu_expert_rows(moe_ctx *c, int32_t *rows, const int32_t *expert, const int32_t *slot, int64_t S,
                               int W, int E, int64_t C);

/* decode.c */
moe_status moe_cpu_embedding_at_forward(moe_ctx *c, void *out, const int32_t *tokens, const int32_t *positions,
                                        const void *table, int64_t N, int64_t C, float scale, int padding_idx,
                                        int sinusoidal, moe_dtype dt);
moe_status moe_cpu_rowlinear_forward(moe_ctx *c, const moe_rowlinear_desc *d);
moe_status moe_cpu_attention_decode(moe_ctx *c, void *out, const void *q, const void *k, const void *v, int64_t ld,
                                    void *k_cache, void *v_cache, const int32_t *cache_len, const int32_t *n_new,
                                    int64_t B, int64_t n, int64_t H, int64_t D, int64_t Tc, moe_dtype dt);
moe_status moe_cpu_gate_topk_forward(moe_ctx *c, const moe_gate_topk_args *a);
moe_status moe_cpu_expert_ffn_forward(moe_ctx *c, const moe_expert_ffn_args *a);
moe_status moe_cpu_logits_stats(moe_ctx *c, float *lse, float *top_val, int32_t *top_idx, float *tgt,
                                const float *logits, const int32_t *targets, int64_t R, int64_t V, int K,
                                float temperature);

/* optim.c */
moe_status moe_cpu_adam_step(moe_ctx *c, const moe_adam_args *a);
moe_status moe_cpu_sgd_step(moe_ctx *c, const moe_sgd_args *a);

#endif
