/* moe_cuda.cuh — the GPU half of moe.h (nvcc only).

   moe.h includes this file from its implementation section when MOE_CUDA is defined and
   the compiler is nvcc; do not include it yourself. It defines the moe_cuda_* functions
   that moe.h declares (its section 14). Kernels are `static`, launched on the context's stream, and call
   the same MOE_HD element math as the CPU loops (conversions, scales), so the CPU tests
   cover the GPU arithmetic. All state lives in a moe_gpu; nothing here is global.

   Status: the skeleton — device setup, error translation, and the FP8 tile quantiser as
   the first kernel. The plan is to fill moe.h's kernel interface (struct moe_backend,
   section 3) entry by entry and run tests/test_backend.c against the CPU table. GEMMs (cuBLASLt with 1×128 / 128×128 FP8 scales), attention, MoE
   routing and NCCL collectives follow the plan in the GPU reference. */
#ifndef MOE_CUDA_CUH
#define MOE_CUDA_CUH

#if !defined(__CUDACC__)
#error "moe_cuda.cuh is compiled by nvcc; build without MOE_CUDA for the CPU"
#endif

#include <cuda_runtime.h>

struct moe_gpu {
    int device;
    int sm_count;
    char name[256];
    cudaStream_t stream;
};

/* Turn a CUDA error into a moe_status with the call site in the message. */
static moe_status moe__cuda_fail(moe_ctx *ctx, cudaError_t err, const char *what, const char *file, int line) {
    return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s failed at %s:%d: %s (%s)", what, file, line, cudaGetErrorName(err),
                     cudaGetErrorString(err));
}
#define MOE__CUDA_TRY(ctx, call)                                                              \
    do {                                                                                      \
        cudaError_t moe__e = (call);                                                          \
        if (moe__e != cudaSuccess) return moe__cuda_fail(ctx, moe__e, #call, __FILE__, __LINE__); \
    } while (0)

MOE_API moe_status moe_cuda_device_count(moe_ctx *ctx, int *count) {
    int n = 0;
    MOE__CHECK_CTX(ctx);
    if (!count) return moe__fail(ctx, MOE_ERR_ARG, "moe_cuda_device_count: count is NULL");
    *count = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { /* no driver or no device: zero GPUs */
        (void)cudaGetLastError();
        return MOE_OK;
    }
    *count = n;
    return MOE_OK;
}

MOE_API moe_status moe_cuda_init(moe_ctx *ctx, int device, moe_gpu **out) {
    cudaDeviceProp prop;
    moe_gpu *gpu;
    int n = 0;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_cuda_init: out is NULL");
    *out = NULL;
    MOE__TRY(moe_cuda_device_count(ctx, &n));
    if (device < 0 || device >= n) return moe__fail(ctx, MOE_ERR_ARG, "moe_cuda_init: device %d of %d", device, n);
    MOE__CUDA_TRY(ctx, cudaSetDevice(device));
    MOE__CUDA_TRY(ctx, cudaGetDeviceProperties(&prop, device));
    gpu = (moe_gpu *)moe__heap_calloc(ctx, sizeof *gpu);
    if (!gpu) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_cuda_init: out of memory");
    gpu->device = device;
    gpu->sm_count = prop.multiProcessorCount;
    snprintf(gpu->name, sizeof gpu->name, "%s", prop.name);
    if (cudaStreamCreateWithFlags(&gpu->stream, cudaStreamNonBlocking) != cudaSuccess) {
        MOE_FREE(gpu);
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_cuda_init: cannot create a stream");
    }
    *out = gpu;
    return MOE_OK;
}

MOE_API void moe_cuda_free(moe_gpu *gpu) {
    if (!gpu) return;
    cudaSetDevice(gpu->device);
    cudaStreamDestroy(gpu->stream);
    MOE_FREE(gpu);
}

MOE_API moe_status moe_cuda_sync(moe_ctx *ctx, moe_gpu *gpu) {
    MOE__CHECK_CTX(ctx);
    if (!gpu) return moe__fail(ctx, MOE_ERR_ARG, "moe_cuda_sync: gpu is NULL");
    MOE__CUDA_TRY(ctx, cudaSetDevice(gpu->device));
    MOE__CUDA_TRY(ctx, cudaStreamSynchronize(gpu->stream));
    return MOE_OK;
}

#define MOE__QUANT_THREADS 128

/* One block per 1×B tile: a shared-memory max-abs reduction, then the same scale and
   E4M3 rounding (code = e4m3(x / scale)) as moe.h's one quantiser, moe__fp8_quantize_groups,
   in the grouping that moe_fp8_quantize_tiles asks of it (1×B, amax/448 scales). The CUDA
   backend's fp8_quantize entry will generalise it to every grouping and power-of-two scales. */
static __global__ void __launch_bounds__(MOE__QUANT_THREADS)
moe__quantize_tiles_kernel(const float *x, int64_t cols, int64_t block, int64_t nb, uint8_t *q, float *scales) {
    __shared__ float red[MOE__QUANT_THREADS];
    int64_t r = blockIdx.x / nb, j = blockIdx.x % nb, c0 = j * block;
    int64_t n = cols - c0 < block ? cols - c0 : block, i;
    float m = 0.0f, s;
    const float *src = x + r * cols + c0;
    for (i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, fabsf(src[i]));
    red[threadIdx.x] = m;
    __syncthreads();
    for (int w = MOE__QUANT_THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + w]);
        __syncthreads();
    }
    s = moe_fp8_scale(red[0]);
    if (threadIdx.x == 0) scales[r * nb + j] = s;
    for (i = threadIdx.x; i < n; i += blockDim.x) q[r * cols + c0 + i] = moe_f32_to_e4m3(src[i] / s);
}

MOE_API moe_status moe_cuda_quantize_tiles(moe_ctx *ctx, moe_gpu *gpu, const float *x, int64_t rows, int64_t cols,
                                           int64_t block, uint8_t *q, float *scales) {
    int64_t nb;
    MOE__CHECK_CTX(ctx);
    if (!gpu || !x || !q || !scales) return moe__fail(ctx, MOE_ERR_ARG, "moe_cuda_quantize_tiles: NULL argument");
    if (rows < 0 || cols < 0 || block <= 0) return moe__fail(ctx, MOE_ERR_SHAPE, "moe_cuda_quantize_tiles: bad shape or block");
    if (rows == 0 || cols == 0) return MOE_OK;
    nb = (cols + block - 1) / block;
    if (rows * nb > 0x7FFFFFFF) return moe__fail(ctx, MOE_ERR_SHAPE, "moe_cuda_quantize_tiles: too many tiles for one launch");
    MOE__CUDA_TRY(ctx, cudaSetDevice(gpu->device));
    moe__quantize_tiles_kernel<<<(unsigned)(rows * nb), MOE__QUANT_THREADS, 0, gpu->stream>>>(x, cols, block, nb, q, scales);
    MOE__CUDA_TRY(ctx, cudaGetLastError());
    return MOE_OK;
}

#endif /* MOE_CUDA_CUH */
