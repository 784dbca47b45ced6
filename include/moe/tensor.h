/* tensor.h: element types and the small tensor descriptor passed to ops.
 *
 * Tensor memory belongs to the active backend (host memory for cpu, device
 * memory for cuda). Core and plugins pass these pointers to ops and never
 * dereference them: data reaches the host only through backend->copy_to_host.
 * Layout is always row-major and contiguous; shapes are written (B,T,C) style
 * in comments, with the last index fastest.
 */
#ifndef MOE_TENSOR_H
#define MOE_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_dtype {
    MOE_F32 = 0,
    MOE_F16,
    MOE_BF16,
    MOE_I32,
    MOE_F64,          /* communication only (statistics summed across ranks); no op takes it */
    MOE_DTYPE_COUNT
} moe_dtype;

/* Bytes per element of a dtype (static inline: used on hot paths in every
 * component, and too small to deserve a symbol of its own). */
static inline size_t moe_dtype_size(moe_dtype t)
{
    return t == MOE_F64 ? 8u : t == MOE_F32 || t == MOE_I32 ? 4u : 2u;
}

#define MOE_MAX_DIMS 4

typedef struct moe_tensor {
    void *data;                   /* backend memory; never dereferenced by core or plugins */
    moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
} moe_tensor;

static inline int64_t moe_tensor_numel(const moe_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

#ifdef __cplusplus
}
#endif

#endif
