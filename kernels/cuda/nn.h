/* nn.h: the cuda backend's layer ops: activations (GELU, relu), dropout,
 * layer norm, embedding with sinusoidal positions, softmax cross-entropy.
 * ops.h says what each computes. Defined in nn.cu. */
#ifndef MOE_KERNELS_CUDA_NN_H
#define MOE_KERNELS_CUDA_NN_H

#include "moe/ops.h"

moe_status moe_cuda_act_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, moe_act_kind kind);
moe_status moe_cuda_act_backward(moe_ctx *c, void *dinp, const void *inp, const void *dout, int64_t n, moe_dtype dt,
                                 moe_act_kind kind);
moe_status moe_cuda_dropout_forward(moe_ctx *c, void *out, const void *inp, int64_t n, moe_dtype dt, float p,
                                    uint64_t seed, uint64_t stream);
moe_status moe_cuda_dropout_backward(moe_ctx *c, void *din, const void *dout, int64_t n, moe_dtype dt, float p,
                                     uint64_t seed, uint64_t stream);
moe_status moe_cuda_layernorm_forward(moe_ctx *c, void *out, float *mean, float *rstd, const void *inp,
                                      const void *weight, const void *bias, int64_t N, int64_t C, float eps,
                                      moe_dtype dt);
moe_status moe_cuda_layernorm_backward(moe_ctx *c, void *dinp, void *dweight, void *dbias, const void *dout,
                                       const void *inp, const void *weight, const float *mean, const float *rstd,
                                       int64_t N, int64_t C, moe_dtype dt);
moe_status moe_cuda_embedding_forward(moe_ctx *c, void *out, const int32_t *tokens, const void *table, int64_t B,
                                      int64_t T, int64_t C, float scale, int padding_idx, int sinusoidal,
                                      moe_dtype dt);
moe_status moe_cuda_embedding_backward(moe_ctx *c, void *dtable, const void *dout, const int32_t *tokens, int64_t B,
                                       int64_t T, int64_t C, int64_t V, float scale, int padding_idx, moe_dtype dt);
moe_status moe_cuda_cross_entropy(moe_ctx *c, float *losses, void *logits, const int32_t *targets, int64_t N,
                                  int64_t V, int ignore_index, float grad_scale, moe_dtype dt);

#endif
