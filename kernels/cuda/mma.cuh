/* mma.cuh: tensor-core building blocks the cuda backend's own matrix kernels
 * share (flash attention, the grouped expert products): ldmatrix loads of
 * shared-memory tiles, mma.sync m16n8k16 with fp32 accumulators, cp.async
 * copies, operand fragments of row-major tiles and the launch helpers.
 *
 * Fragment layout of mma.m16n8k16 (PTX ISA): lane = 4g + cq; the A operand
 * holds rows g, g+8 and columns 2cq, 2cq+1 (+8); B columns g; the
 * accumulator c0,c1 are (row g, cols 2cq, 2cq+1), c2,c3 (row g+8, same cols).
 */
#ifndef MOE_KERNELS_CUDA_MMA_CUH
#define MOE_KERNELS_CUDA_MMA_CUH

#include "kernels/cuda/cuda.h"

static __device__ __forceinline__ uint32_t smem_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

static __device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

template <typename T> static __device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0,
                                                                     uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* two floats as one register of two T, x in the low half (the lower column) */
template <typename T> static __device__ __forceinline__ uint32_t pack2(float x, float y);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float x, float y)
{
    __half2 h = __floats2half2_rn(x, y);
    return *(uint32_t *)&h;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y)
{
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *(uint32_t *)&h;
}

/* two adjacent elements; separate stores, since row strides may be odd */
template <typename T> static __device__ __forceinline__ void store2(T *p, float x, float y)
{
    p[0] = moe_cuda_from_f32<T>(x);
    p[1] = moe_cuda_from_f32<T>(y);
}

static __device__ __forceinline__ void cp_async16(void *dst, const void *src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
/* waits until at most N committed groups of this thread are in flight */
template <int N> static __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* A operand (16 x 16 at rows r0.., cols k0..) of a row-major [rows][LD] tile */
template <int LD, typename T>
static __device__ __forceinline__ void frag_a(uint32_t a[4], const T *tile, int r0, int k0)
{
    const int lane = threadIdx.x & 31;
    ldsm_x4(a, tile + (r0 + (lane & 15)) * LD + k0 + (lane >> 4) * 8);
}

/* B operands of two n8 tiles (n0.., n0+8..) x k16 (k0..) from a tile stored
 * [n][k] (keys x head dim): b[0], b[1] for n0, b[2], b[3] for n0+8 */
template <int LD, typename T>
static __device__ __forceinline__ void frag_b_nk(uint32_t b[4], const T *tile, int n0, int k0)
{
    const int lane = threadIdx.x & 31;
    ldsm_x4(b, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * LD + k0 + ((lane >> 3) & 1) * 8);
}

/* the same from a tile stored [k][n] (keys x head dim, keys the k side) */
template <int LD, typename T>
static __device__ __forceinline__ void frag_b_kn(uint32_t b[4], const T *tile, int k0, int n0)
{
    const int lane = threadIdx.x & 31;
    ldsm_x4_t(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8);
}

/* A operand (16 x 16 at rows r0.., cols k0..) of a tile stored [k][rows]
 * (the transpose of frag_a's layout) */
template <int LD, typename T>
static __device__ __forceinline__ void frag_a_t(uint32_t a[4], const T *tile, int r0, int k0)
{
    const int lane = threadIdx.x & 31;
    ldsm_x4_t(a, tile + (k0 + (lane & 7) + (lane >> 4) * 8) * LD + r0 + ((lane >> 3) & 1) * 8);
}

template <typename K> static moe_status set_smem(moe_ctx *c, K kernel, size_t bytes)
{
    if (bytes > 48u * 1024u)
        MOE_CUDA_TRY(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return MOE_OK;
}

/* 16-byte tile copies need 16-byte aligned rows */
static bool rows_aligned16(const void *p, int64_t ld, size_t es)
{
    return ((uintptr_t)p % 16u) == 0 && ((uint64_t)ld * es) % 16u == 0;
}

#endif
