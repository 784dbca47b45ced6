/* attention.h: the cuda backend's causal multi-head attention, forward and
 * backward (ops.h gives layouts and the dropout counter). Defined in
 * attention.cu. */
#ifndef MOE_KERNELS_CUDA_ATTENTION_H
#define MOE_KERNELS_CUDA_ATTENTION_H

#include "moe/ops.h"

moe_status moe_cuda_attention_forward(moe_ctx *c, void *out, float *lse, const void *q, const void *k, const void *v,
                                      int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D, float dropout_p,
                                      uint64_t seed, uint64_t stream, moe_dtype dt);
moe_status moe_cuda_attention_backward(moe_ctx *c, void *dq, void *dk, void *dv, int64_t ldd, const void *dout,
                                       const void *out, const float *lse, const void *q, const void *k,
                                       const void *v, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t D,
                                       float dropout_p, uint64_t seed, uint64_t stream, moe_dtype dt);

#endif
