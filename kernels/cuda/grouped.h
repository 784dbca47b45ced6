/* grouped.h: the cuda backend's products of the local experts over the rows
 * routing filled (expert_rows, grouped_matmul; ops.h, ABI 1.5). */
#ifndef MOE_KERNELS_CUDA_GROUPED_H
#define MOE_KERNELS_CUDA_GROUPED_H

#include "moe/ops.h"

moe_status moe_cuda_expert_rows(moe_ctx *c, int32_t *rows, const int32_t *expert, const int32_t *slot, int64_t S,
                                int W, int E, int64_t C);
moe_status moe_cuda_grouped_matmul(moe_ctx *c, const moe_grouped_matmul_args *a);

#endif
