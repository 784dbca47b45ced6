// gemv_chain.cu: the weight-streaming ceiling of batch-1 decoding on one GPU.
// Replays, in one CUDA graph with programmatic dependent launch, the dense
// products of 24 layers of the reference model (k|v|q 6144x2048, out
// 2048x2048, fc1 8192x2048, fc2 2048x8192 per layer, bf16, distinct weights
// so nothing stays in L2) against one input row, with two kernel designs:
// a warp per weight row (the decoder's earlier design) and block tiles (a
// row's columns split over the block, R rows a block). No LayerNorm,
// staging or epilogue: the difference between these figures and
// moelm-generate's products is what surrounds the products.
// Build and run: bench/gemv_chain.sh
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) {                                                               \
            std::fprintf(stderr, "gemv_chain: %s at line %d\n", cudaGetErrorString(e_), __LINE__); \
            std::exit(1);                                                                      \
        }                                                                                      \
    } while (0)

static __device__ __forceinline__ uint4 ld_stream(const void *p)
{
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}
static __device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
static __device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
static __device__ __forceinline__ void widen(const uint4 &r, float *o)
{
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&r;
    for (int i = 0; i < 4; i++) {
        const float2 f = __bfloat1622float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}

// block tiles: R rows a block; thread t owns columns (j*256 + t)*8.. for j < KV
template <int KV, int R>
__global__ void __launch_bounds__(256) tile_kernel(const __nv_bfloat16 *W, const __nv_bfloat16 *x, __nv_bfloat16 *y,
                                                   int n, int k)
{
    const int t = threadIdx.x;
    const int64_t r0 = (int64_t)blockIdx.x * R;
    pdl_trigger();
    uint4 w[R][KV];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < KV; j++)
            w[r][j] = r0 + r < n ? ld_stream(W + (r0 + r) * k + (j * 256 + t) * 8) : make_uint4(0, 0, 0, 0);
    pdl_wait();
    float xf[KV][8];
#pragma unroll
    for (int j = 0; j < KV; j++)
        widen(*(const uint4 *)(x + (j * 256 + t) * 8), xf[j]);
    __shared__ float red[8][R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        float a = 0.0f;
#pragma unroll
        for (int j = 0; j < KV; j++) {
            float wf[8];
            widen(w[r][j], wf);
#pragma unroll
            for (int q = 0; q < 8; q++)
                a += wf[q] * xf[j][q];
        }
        for (int o = 16; o; o >>= 1)
            a += __shfl_xor_sync(~0u, a, o);
        if ((t & 31) == 0)
            red[t >> 5][r] = a;
    }
    __syncthreads();
    if (t < R && r0 + t < n) {
        float s = 0.0f;
        for (int i = 0; i < 8; i++)
            s += red[i][t];
        y[r0 + t] = __float2bfloat16(s);
    }
}

// a warp per row: eight 16-byte loads a lane a batch, the next batch issued
// before the current one is used; 264 blocks of 8 warps stride over the rows
template <int NB>
__global__ void __launch_bounds__(256) warp_row_kernel(const __nv_bfloat16 *W, const __nv_bfloat16 *x,
                                                       __nv_bfloat16 *y, int n, int k)
{
    const int lane = threadIdx.x & 31;
    int64_t row = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int64_t stride = (int64_t)gridDim.x * 8;
    pdl_trigger();
    uint4 cur[8];
    if (row < n)
        for (int u = 0; u < 8; u++)
            cur[u] = ld_stream(W + row * k + (u * 32 + lane) * 8);
    pdl_wait();
    int b = 0;
    float a = 0.0f;
    while (row < n) {
        int64_t nrow = row;
        int nb = b + 1;
        if (nb == NB) {
            nb = 0;
            nrow = row + stride;
        }
        uint4 nxt[8];
        for (int u = 0; u < 8; u++)
            nxt[u] = nrow < n ? ld_stream(W + nrow * k + ((nb * 8 + u) * 32 + lane) * 8) : make_uint4(0, 0, 0, 0);
        for (int u = 0; u < 8; u++) {
            float wf[8], xf[8];
            widen(cur[u], wf);
            widen(*(const uint4 *)(x + ((b * 8 + u) * 32 + lane) * 8), xf);
            for (int q = 0; q < 8; q++)
                a += wf[q] * xf[q];
        }
        if (nb == 0) {
            for (int o = 16; o; o >>= 1)
                a += __shfl_xor_sync(~0u, a, o);
            if (lane == 0)
                y[row] = __float2bfloat16(a);
            a = 0.0f;
        }
        for (int u = 0; u < 8; u++)
            cur[u] = nxt[u];
        row = nrow;
        b = nb;
    }
}

typedef void (*kernel_t)(const __nv_bfloat16 *, const __nv_bfloat16 *, __nv_bfloat16 *, int, int);

static void launch(kernel_t kern, int grid, cudaStream_t s, const __nv_bfloat16 *W, const __nv_bfloat16 *x,
                   __nv_bfloat16 *y, int n, int k)
{
    cudaLaunchConfig_t c = {};
    c.gridDim = grid;
    c.blockDim = 256;
    c.stream = s;
    cudaLaunchAttribute a[1];
    a[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a[0].val.programmaticStreamSerializationAllowed = 1;
    c.attrs = a;
    c.numAttrs = 1;
    CK(cudaLaunchKernelEx(&c, kern, W, x, y, n, k));
}

int main()
{
    const int L = 24, shapes[4][2] = {{6144, 2048}, {2048, 2048}, {8192, 2048}, {2048, 8192}};
    size_t per_layer = 0;
    for (int i = 0; i < 4; i++)
        per_layer += (size_t)shapes[i][0] * shapes[i][1];
    const size_t total = per_layer * L;
    __nv_bfloat16 *W, *x, *y;
    CK(cudaMalloc(&W, total * 2));
    std::vector<__nv_bfloat16> h(1 << 20);
    for (size_t i = 0; i < h.size(); i++)
        h[i] = __float2bfloat16((float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f);
    for (size_t o = 0; o < total; o += h.size())
        CK(cudaMemcpy(W + o, h.data(), std::min(h.size(), total - o) * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&x, 8192 * 2));
    CK(cudaMalloc(&y, 8192 * 2));
    CK(cudaMemcpy(x, h.data(), 8192 * 2, cudaMemcpyHostToDevice));
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    struct variant {
        const char *name;
        kernel_t k2048, k8192;
        int r2048, r8192; /* rows a block (0: a warp per row, 264 blocks) */
    } variants[] = {
        {"warp per row", warp_row_kernel<1>, warp_row_kernel<4>, 0, 0},
        {"tiles, 2 rows", tile_kernel<1, 2>, tile_kernel<4, 2>, 2, 2},
        {"tiles, 4 rows (k 2048) / 1 row (k 8192)", tile_kernel<1, 4>, tile_kernel<4, 1>, 4, 1},
        {"tiles, 8 rows / 4 rows", tile_kernel<1, 8>, tile_kernel<4, 4>, 8, 4},
    };
    for (const variant &v : variants) {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
        size_t off = 0;
        for (int l = 0; l < L; l++)
            for (int i = 0; i < 4; i++) {
                const int n = shapes[i][0], k = shapes[i][1];
                const int r = k == 2048 ? v.r2048 : v.r8192;
                launch(k == 2048 ? v.k2048 : v.k8192, r == 0 ? 264 : (n + r - 1) / r, s, W + off, x, y, n, k);
                off += (size_t)n * k;
            }
        CK(cudaStreamEndCapture(s, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        for (int w = 0; w < 3; w++)
            CK(cudaGraphLaunch(ge, s));
        const int iters = 20;
        CK(cudaEventRecord(e0, s));
        for (int w = 0; w < iters; w++)
            CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        ms /= iters;
        std::printf("RESULT %s: %.3f ms for %d products (%.2f GB), %.2f TB/s\n", v.name, ms, 4 * L,
                    (double)total * 2 / 1e9, (double)total * 2 / ms / 1e9);
        CK(cudaGraphExecDestroy(ge));
        CK(cudaGraphDestroy(g));
    }
    return 0;
}
