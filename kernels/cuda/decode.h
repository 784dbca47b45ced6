/* decode.h: the cuda backend's decoding ops (ops.h, "decoding"): embedding
 * at positions, the row-wise Linear, attention against a K/V cache, the
 * no-drop top-k gate, the routed experts and the logits statistics. Defined
 * in decode.cu; the graph recording they are replayed with is backend.cu's. */
#ifndef MOE_KERNELS_CUDA_DECODE_H
#define MOE_KERNELS_CUDA_DECODE_H

#include "moe/ops.h"

moe_status moe_cuda_embedding_at_forward(moe_ctx *c, void *out, const int32_t *tokens, const int32_t *positions,
                                         const void *table, int64_t N, int64_t C, float scale, int padding_idx,
                                         int sinusoidal, moe_dtype dt);
moe_status moe_cuda_rowlinear_forward(moe_ctx *c, const moe_rowlinear_desc *d);
moe_status moe_cuda_attention_decode(moe_ctx *c, void *out, const void *q, const void *k, const void *v, int64_t ld,
                                     void *k_cache, void *v_cache, const int32_t *cache_len, const int32_t *n_new,
                                     int64_t B, int64_t n, int64_t H, int64_t D, int64_t Tc, moe_dtype dt);
moe_status moe_cuda_gate_topk_forward(moe_ctx *c, const moe_gate_topk_args *a);
moe_status moe_cuda_expert_ffn_forward(moe_ctx *c, const moe_expert_ffn_args *a);
moe_status moe_cuda_logits_stats(moe_ctx *c, float *lse, float *top_val, int32_t *top_idx, float *tgt,
                                 const float *logits, const int32_t *targets, int64_t R, int64_t V, int K,
                                 float temperature);

#endif
