/* matmul.h: the cuda backend's GEMM (cuBLASLt, with a plain tiled kernel for
 * what cuBLASLt does not take) and bias_backward. Defined in matmul.cu. */
#ifndef MOE_KERNELS_CUDA_MATMUL_H
#define MOE_KERNELS_CUDA_MATMUL_H

#include "moe/ops.h"

moe_status moe_cuda_matmul(moe_ctx *c, const moe_matmul_desc *d);
moe_status moe_cuda_bias_backward(moe_ctx *c, void *dbias, const void *dy, int64_t N, int64_t C, moe_dtype dt);

#endif
