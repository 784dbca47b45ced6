/* elementwise.h: the cuda backend's elementwise and utility ops (fill, cast,
 * axpby, add, the two initialisers, the two deterministic sums); ops.h says
 * what each computes. Defined in elementwise.cu. */
#ifndef MOE_KERNELS_CUDA_ELEMENTWISE_H
#define MOE_KERNELS_CUDA_ELEMENTWISE_H

#include "moe/ops.h"

moe_status moe_cuda_fill(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float value);
moe_status moe_cuda_cast(moe_ctx *c, void *dst, moe_dtype dst_dt, const void *src, moe_dtype src_dt, int64_t n);
moe_status moe_cuda_axpby(moe_ctx *c, void *y, const void *x, moe_dtype dt, int64_t n, float a, float b);
moe_status moe_cuda_add(moe_ctx *c, void *out, const void *x, const void *y, moe_dtype dt, int64_t n);
moe_status moe_cuda_init_uniform(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float lo, float hi, uint64_t seed,
                                 uint64_t stream);
moe_status moe_cuda_init_normal(moe_ctx *c, void *x, moe_dtype dt, int64_t n, float mean, float std, uint64_t seed,
                                uint64_t stream);
moe_status moe_cuda_sum_f32(moe_ctx *c, float *out, const float *x, int64_t n, int64_t stride, float scale);
moe_status moe_cuda_sumsq(moe_ctx *c, float *out, const void *x, moe_dtype dt, int64_t n);

#endif
