/* route.h: the cuda backend's MoE routing (top-1/top-2, top-k and expert
 * choice), dispatch and combine in index form (ops.h's moe_route_args).
 * Defined in route.cu. */
#ifndef MOE_KERNELS_CUDA_ROUTE_H
#define MOE_KERNELS_CUDA_ROUTE_H

#include "moe/ops.h"

int64_t moe_cuda_route_workspace_bytes(int64_t S, int E);
moe_status moe_cuda_route_forward(moe_ctx *c, const moe_route_args *a);
moe_status moe_cuda_route_backward(moe_ctx *c, const moe_route_args *a, const float *dweight, float dl_aux,
                                   float *dlogits);
moe_status moe_cuda_dispatch_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                     const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cuda_dispatch_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                      const int32_t *slot, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cuda_combine_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert, const int32_t *slot,
                                    const float *weight, int64_t S, int E, int64_t C, int64_t d, moe_dtype dt);
moe_status moe_cuda_combine_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                     const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                     int E, int64_t C, int64_t d, moe_dtype dt);
/* the four above over W choices per token (ops.h's *_wide_* ops) */
moe_status moe_cuda_dispatch_wide_forward(moe_ctx *c, void *out, const void *x, const int32_t *expert,
                                          const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                          moe_dtype dt);
moe_status moe_cuda_dispatch_wide_backward(moe_ctx *c, void *dx, const void *dout, const int32_t *expert,
                                           const int32_t *slot, int64_t S, int W, int E, int64_t C, int64_t d,
                                           moe_dtype dt);
moe_status moe_cuda_combine_wide_forward(moe_ctx *c, void *y, const void *eout, const int32_t *expert,
                                         const int32_t *slot, const float *weight, int64_t S, int W, int E, int64_t C,
                                         int64_t d, moe_dtype dt);
moe_status moe_cuda_combine_wide_backward(moe_ctx *c, void *deout, float *dweight, const void *dy, const void *eout,
                                          const int32_t *expert, const int32_t *slot, const float *weight, int64_t S,
                                          int W, int E, int64_t C, int64_t d, moe_dtype dt);

#endif
