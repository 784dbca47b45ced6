/* optim.h: the cuda backend's optimizer steps on one tensor (Adam with
 * optional fp16 moments, SGD). Defined in optim.cu. */
#ifndef MOE_KERNELS_CUDA_OPTIM_H
#define MOE_KERNELS_CUDA_OPTIM_H

#include "moe/ops.h"

moe_status moe_cuda_adam_step(moe_ctx *c, const moe_adam_args *a);
moe_status moe_cuda_sgd_step(moe_ctx *c, const moe_sgd_args *a);

#endif
