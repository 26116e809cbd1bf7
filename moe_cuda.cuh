/* moe_cuda.cuh — the CUDA backend of moe.h (nvcc only).

   moe.h includes this file from its implementation section when MOE_CUDA is defined and
   the compiler is nvcc; do not include it yourself. It fills moe.h's kernel interface
   (struct moe_backend, section 3) for device memory, so the one model definition, trainer
   and generator run on a GPU after moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, index).

   Sections, in the order of the table's entries:
     1. base       struct moe_gpu (device, stream, cuBLASLt handle and workspace, the context's
                   device step arena), errors with file:line, launches, memory entries
     2. numerics   FP8 quantise / dequantise in any grouping, dtype conversions, element-wise
     3. gemm       cuBLASLt: FP32, BF16 (FP32 accumulation), FP8 by the recipe's roles
                   (quantised, dequantised exactly, multiplied), strided batches, grouped by expert
     4. rows       RMSNorm, softmax, cross-entropy, SwiGLU, RoPE, top-k
     5. attention  causal attention forward / backward, decoding over the latent cache, MLA's K/V
     6. moe        router, balance loss, dispatch plan, gather / combine without float atomics
     7. optim      sums and norms, AdamW, distillation losses, the teacher's top-k
     8. the table
     9. comm       NCCL, moe.h's third communicator backend (MOE_NCCL): compiled when moe.h's
                   section 15 includes this file a second time, below struct moe_comm

   Rules (../shared/reference/gpu.md §0, §1): all state hangs off the context (no globals);
   errors come back as moe_status with the CUDA or cuBLAS message and file:line, never
   exit(); every kernel has __launch_bounds__ and runs on the context's stream; per-element
   math is the MOE_HD functions the CPU uses (conversions, moe_expf, SiLU, scales), compiled
   without FMA contraction (--fmad=false), so element-wise entries give the CPU's bits and
   reductions differ from it only in their order. No float atomics anywhere: every sum has a
   fixed order, so two runs give the same bits. Results reach the host only through the
   entries' host_* outputs and D2H copies, which wait for the stream. */
#ifndef MOE_CUDA_CUH
#define MOE_CUDA_CUH

#if !defined(__CUDACC__)
#error "moe_cuda.cuh is compiled by nvcc; build without MOE_CUDA for the CPU"
#endif
#ifdef MOE_REAL_F64
#error "the CUDA backend computes in float: MOE_REAL_F64 is a CPU-only build"
#endif

/* (cuda_runtime.h and cublasLt.h come from moe.h, outside its extern "C") */

/* ============================================================================================
   1. base — the context's GPU, errors, launches, memory                              >>cu.base
   ============================================================================================ */

#define MOE__CUDA_THREADS 256      /* threads of every kernel's block */
#define MOE__CUDA_MAX_BLOCKS 65536 /* grid-stride loops cover the rest */
#define MOE__CUDA_ALIGN 256        /* device allocations and arena pieces (cuBLASLt wants 256) */
#define MOE__CUDA_LT_WS ((size_t)32 << 20) /* cuBLASLt workspace (gpu.md §2.1: Hopper wants 32 MiB) */

/* One block of a context's device step arena (as the host arena: the first block grows to
   a step's peak at reset, so a loop of equal steps allocates nothing after the first). */
typedef struct moe__gpu_block {
    struct moe__gpu_block *next;
    unsigned char *mem;
    size_t cap, used;
} moe__gpu_block;

struct moe_gpu {
    int device, sm_count;
    int fp8_tensor_cores;   /* Hopper (compute capability 9.x) and not MOE_CUDA_FP8_TC=0: section 3 */
    char name[256];
    int owner;              /* 1: this context created the stream and handle; 0: borrowed */
    int debug_sync;         /* wait for and check every launch */
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *lt_ws;            /* cuBLASLt workspace, MOE__CUDA_LT_WS bytes */
    struct moe__lt_cache *plans; /* cuBLASLt descriptors and algorithms by shape (section 3) */
    int64_t fp8_tc_products;     /* FP8 products run on the tensor cores (the bench checks they ran) */
    moe__gpu_block *arena;  /* current block first */
    size_t arena_used;
};

#define MOE__GPU(ctx) ((ctx)->gpu)
static struct moe__lt_cache *moe__lt_cache_new(moe_ctx *ctx); /* section 3 */
static void moe__lt_cache_free(struct moe__lt_cache *c);

/* A CUDA error as a moe_status, with the call and its place in the message. */
static moe_status moe__cuda_fail(moe_ctx *ctx, cudaError_t err, const char *what, const char *file, int line) {
    return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "CUDA: %s failed at %s:%d: %s (%s)", what, file, line, cudaGetErrorName(err),
                     cudaGetErrorString(err));
}
static moe_status moe__cublas_fail(moe_ctx *ctx, cublasStatus_t err, const char *what, const char *file, int line) {
    return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "cuBLASLt: %s failed at %s:%d: %s (%s)", what, file, line,
                     cublasLtGetStatusName(err), cublasLtGetStatusString(err));
}
#define MOE__CUDA_TRY(ctx, call)                                                                  \
    do {                                                                                          \
        cudaError_t moe__e = (call);                                                              \
        if (moe__e != cudaSuccess) return moe__cuda_fail(ctx, moe__e, #call, __FILE__, __LINE__); \
    } while (0)
#define MOE__CUBLAS_TRY(ctx, call)                                                                         \
    do {                                                                                                   \
        cublasStatus_t moe__s = (call);                                                                    \
        if (moe__s != CUBLAS_STATUS_SUCCESS) return moe__cublas_fail(ctx, moe__s, #call, __FILE__, __LINE__); \
    } while (0)

/* After a launch: the launch's own error, and with debug_sync the kernel's. */
static moe_status moe__cuda_launched(moe_ctx *ctx, const char *kernel, const char *file, int line) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess && MOE__GPU(ctx)->debug_sync) e = cudaStreamSynchronize(MOE__GPU(ctx)->stream);
    return e == cudaSuccess ? MOE_OK : moe__cuda_fail(ctx, e, kernel, file, line);
}
/* The context's device made current (it is per host thread: two contexts on two GPUs may
   take turns in one thread). */
#define MOE__CUDA_ON(ctx) MOE__CUDA_TRY(ctx, cudaSetDevice(MOE__GPU(ctx)->device))
/* kernel<<<blocks, MOE__CUDA_THREADS, 0, the context's stream>>>(args...), checked. */
#define MOE__CUDA_LAUNCH(ctx, kernel, blocks, ...)                                             \
    do {                                                                                       \
        MOE__CUDA_ON(ctx);                                                                     \
        kernel<<<(unsigned)(blocks), MOE__CUDA_THREADS, 0, MOE__GPU(ctx)->stream>>>(__VA_ARGS__); \
        MOE__TRY(moe__cuda_launched(ctx, #kernel, __FILE__, __LINE__));                        \
    } while (0)

/* Blocks for n items of `per_block` each (at least 1, at most MOE__CUDA_MAX_BLOCKS: kernels
   loop over the rest with a grid stride). */
static int64_t moe__cuda_blocks(int64_t n, int64_t per_block) {
    int64_t b = (n + per_block - 1) / per_block;
    return b < 1 ? 1 : b > MOE__CUDA_MAX_BLOCKS ? MOE__CUDA_MAX_BLOCKS : b;
}
#define MOE__CUDA_GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)
#define MOE__CUDA_BLOCK_STRIDE(r, n) for (int64_t r = blockIdx.x; r < (n); r += gridDim.x)

/* Block-wide sums and maxima (all MOE__CUDA_THREADS threads call them; every thread gets the
   result). The order of the additions is fixed by the block shape: the same bits every run.
   `shm` holds MOE__CUDA_THREADS / 32 values. */
#define MOE__CUDA_BLOCK_SUM(name, T)                                                    \
    static __device__ T name(T v, T *shm) {                                             \
        int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5, w;              \
        for (w = 16; w > 0; w >>= 1) v += __shfl_xor_sync(0xffffffffu, v, w);          \
        __syncthreads(); /* shm may still be read by a previous call */                 \
        if (lane == 0) shm[warp] = v;                                                   \
        __syncthreads();                                                                \
        v = (T)0;                                                                       \
        for (w = 0; w < MOE__CUDA_THREADS / 32; w++) v += shm[w];                       \
        return v;                                                                       \
    }
/* one reduction, in float and in double (C linkage: no overloads, no templates) */
MOE__CUDA_BLOCK_SUM(moe__cuda_block_sum, float)
MOE__CUDA_BLOCK_SUM(moe__cuda_block_sum_f64, double)
#undef MOE__CUDA_BLOCK_SUM
static __device__ float moe__cuda_block_max(float v, float *shm) {
    int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5, w;
    for (w = 16; w > 0; w >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, w));
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = shm[0];
    for (w = 1; w < MOE__CUDA_THREADS / 32; w++) v = fmaxf(v, shm[w]);
    return v;
}

/* out[j] += Σ_c part[c·d + j], c in order, one thread per column: the second pass of a sum over
   rows taken in chunks of MOE__ROW_CHUNK rows (the CPU's order, so the CPU's bits). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_add_chunk_sums(const moe_real *part, int64_t d, int64_t nchunks, moe_real *out) {
    MOE__CUDA_GRID_STRIDE(j, d) {
        moe_real acc = out[j];
        int64_t c;
        for (c = 0; c < nchunks; c++) acc += part[c * d + j];
        out[j] = acc;
    }
}

/* ---- the context's GPU: open, borrow, reset, close ---- */

static void moe__cuda_arena_free(moe__gpu_block *b) {
    while (b) {
        moe__gpu_block *next = b->next;
        cudaFree(b->mem);
        MOE_FREE(b);
        b = next;
    }
}

static moe__gpu_block *moe__cuda_block_new(size_t cap) {
    moe__gpu_block *b = (moe__gpu_block *)MOE_MALLOC(sizeof *b);
    if (!b) return NULL;
    memset(b, 0, sizeof *b);
    if (cudaMalloc((void **)&b->mem, cap) != cudaSuccess) {
        (void)cudaGetLastError();
        MOE_FREE(b);
        return NULL;
    }
    b->cap = cap;
    return b;
}

static void moe__cuda_close(moe_ctx *ctx) {
    moe_gpu *g = ctx->gpu;
    if (!g) return;
    cudaSetDevice(g->device);
    cudaStreamSynchronize(g->stream);
    moe__cuda_arena_free(g->arena);
    if (g->owner) {
        moe__lt_cache_free(g->plans);
        if (g->lt) cublasLtDestroy(g->lt);
        cudaFree(g->lt_ws);
        cudaStreamDestroy(g->stream);
    }
    MOE_FREE(g);
    ctx->gpu = NULL;
}

static moe_status moe__cuda_open(moe_ctx *ctx, int device) {
    cudaDeviceProp prop;
    moe_gpu *g;
    const char *dbg = getenv("MOE_CUDA_SYNC");
    int n = 0;
    cudaError_t e;
    MOE__TRY(moe_cuda_device_count(ctx, &n));
    if (n == 0)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_ctx_set_device: no CUDA device here (no GPU, or no driver for it)");
    if (device < 0 || device >= n)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_device: CUDA device %d does not exist (%d found)", device, n);
    MOE__CUDA_TRY(ctx, cudaSetDevice(device));
    MOE__CUDA_TRY(ctx, cudaGetDeviceProperties(&prop, device));
    g = (moe_gpu *)moe__heap_calloc(ctx, sizeof *g);
    if (!g) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_ctx_set_device: out of memory");
    g->device = device;
    g->sm_count = prop.multiProcessorCount;
    g->fp8_tensor_cores = prop.major == 9 && !(getenv("MOE_CUDA_FP8_TC") && getenv("MOE_CUDA_FP8_TC")[0] == '0');
    snprintf(g->name, sizeof g->name, "%s", prop.name);
    g->owner = 1;
    g->debug_sync = dbg && dbg[0] == '1';
    ctx->gpu = g; /* from here moe__cuda_close undoes a partial open */
    e = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMalloc(&g->lt_ws, MOE__CUDA_LT_WS);
    if (e == cudaSuccess && !(g->plans = moe__lt_cache_new(ctx))) e = cudaErrorMemoryAllocation;
    if (e != cudaSuccess) {
        moe__cuda_close(ctx);
        return moe__cuda_fail(ctx, e, "moe_ctx_set_device (stream, workspace)", __FILE__, __LINE__);
    }
    if (cublasLtCreate(&g->lt) != CUBLAS_STATUS_SUCCESS) {
        g->lt = NULL;
        moe__cuda_close(ctx);
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_ctx_set_device: cublasLtCreate failed on CUDA device %d", device);
    }
    return MOE_OK;
}

/* A child context works on its parent's device and stream (so their work stays ordered)
   with a step arena of its own. */
static moe_status moe__cuda_borrow(moe_ctx *ctx, const moe_ctx *parent) {
    moe_gpu *g = (moe_gpu *)moe__heap_calloc(ctx, sizeof *g);
    if (!g) return moe__fail(ctx, MOE_ERR_MEMORY, "out of memory for a GPU context");
    *g = *parent->gpu;
    g->owner = 0;
    g->arena = NULL;
    g->arena_used = 0;
    ctx->gpu = g;
    return MOE_OK;
}

/* moe_ctx_reset: the step's device memory is free again. A step that needed several blocks
   gets one block for its whole size (freeing waits for the work that used them). */
static void moe__cuda_reset(moe_ctx *ctx) {
    moe_gpu *g = ctx->gpu;
    if (!g) return;
    if (g->arena && g->arena->next) {
        size_t want = g->arena_used;
        cudaSetDevice(g->device);
        moe__cuda_arena_free(g->arena);
        g->arena = moe__cuda_block_new(want > MOE__ARENA_MIN_BLOCK ? want : MOE__ARENA_MIN_BLOCK);
    } else if (g->arena) {
        g->arena->used = 0;
    }
    g->arena_used = 0;
}

/* ---- public entry points (moe.h section 14) ---- */

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

MOE_API moe_status moe_cuda_sync(moe_ctx *ctx) {
    MOE__CHECK_CTX(ctx);
    if (!ctx->gpu) return MOE_OK;
    MOE__CUDA_TRY(ctx, cudaSetDevice(ctx->gpu->device));
    MOE__CUDA_TRY(ctx, cudaStreamSynchronize(ctx->gpu->stream));
    return MOE_OK;
}

MOE_API moe_status moe_cuda_set_debug_sync(moe_ctx *ctx, int on) {
    MOE__CHECK_CTX(ctx);
    if (!ctx->gpu) return moe__fail(ctx, MOE_ERR_STATE, "moe_cuda_set_debug_sync: the context is not on a CUDA device");
    ctx->gpu->debug_sync = on != 0;
    return MOE_OK;
}

MOE_API const char *moe_cuda_device_name(const moe_ctx *ctx) { return ctx && ctx->gpu ? ctx->gpu->name : "cpu"; }

/* ---- memory entries ---- */

static moe_status moe__cuda_alloc(moe_ctx *ctx, size_t bytes, void **out) {
    cudaError_t e;
    *out = NULL;
    MOE__CUDA_ON(ctx);
    e = cudaMalloc(out, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *out = NULL;
        return moe__fail(ctx, MOE_ERR_MEMORY, "out of GPU memory for %zu bytes (%s)", bytes, cudaGetErrorString(e));
    }
    e = cudaMemsetAsync(*out, 0, bytes, MOE__GPU(ctx)->stream);
    if (e != cudaSuccess) {
        cudaFree(*out);
        *out = NULL;
        return moe__cuda_fail(ctx, e, "cudaMemsetAsync", __FILE__, __LINE__);
    }
    return MOE_OK;
}
/* (ctx may be NULL; cudaFree waits for the device's work) */
static void moe__cuda_free(moe_ctx *ctx, void *p) {
    (void)ctx;
    if (p) cudaFree(p);
}
static moe_status moe__cuda_copy(moe_ctx *ctx, void *dst, const void *src, size_t bytes, moe__copy_kind kind) {
    static const cudaMemcpyKind kinds[3] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice};
    if (!bytes) return MOE_OK;
    MOE__CUDA_ON(ctx);
    MOE__CUDA_TRY(ctx, cudaMemcpyAsync(dst, src, bytes, kinds[kind], MOE__GPU(ctx)->stream));
    /* the host reads what came down at once (H2D from pageable memory returns once the source
       is staged, so the caller may reuse it) */
    if (kind == MOE__D2H) MOE__CUDA_TRY(ctx, cudaStreamSynchronize(MOE__GPU(ctx)->stream));
    return MOE_OK;
}
/* (ctx may be NULL: no stream to order it with, so the memory's device is waited for before
   and after; no message) */
static moe_status moe__cuda_memset(moe_ctx *ctx, void *dst, int byte, size_t bytes) {
    if (!bytes) return MOE_OK;
    if (!ctx || !ctx->gpu) {
        cudaPointerAttributes at;
        if (cudaPointerGetAttributes(&at, dst) != cudaSuccess || cudaSetDevice(at.device) != cudaSuccess ||
            cudaDeviceSynchronize() != cudaSuccess || cudaMemset(dst, byte, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
            (void)cudaGetLastError();
            return MOE_ERR_UNSUPPORTED;
        }
        return MOE_OK;
    }
    MOE__CUDA_ON(ctx);
    MOE__CUDA_TRY(ctx, cudaMemsetAsync(dst, byte, bytes, MOE__GPU(ctx)->stream));
    return MOE_OK;
}
static moe_status moe__cuda_scratch(moe_ctx *ctx, size_t bytes, void **out) {
    moe_gpu *g = MOE__GPU(ctx);
    moe__gpu_block *b = g->arena;
    size_t need = (bytes + MOE__CUDA_ALIGN - 1) & ~(size_t)(MOE__CUDA_ALIGN - 1);
    *out = NULL;
    if (need < bytes) return moe__fail(ctx, MOE_ERR_MEMORY, "GPU step memory: size overflows");
    MOE__CUDA_ON(ctx);
    if (ctx->conf.arena_limit && (need > ctx->conf.arena_limit || g->arena_used > ctx->conf.arena_limit - need))
        return moe__fail(ctx, MOE_ERR_MEMORY, "GPU step memory: the arena limit (%zu bytes) is reached", ctx->conf.arena_limit);
    if (!b || b->cap - b->used < need) {
        size_t cap = need > MOE__ARENA_MIN_BLOCK ? need : MOE__ARENA_MIN_BLOCK;
        if (b && cap < b->cap) cap = b->cap;
        b = moe__cuda_block_new(cap);
        if (!b) return moe__fail(ctx, MOE_ERR_MEMORY, "out of GPU memory for %zu bytes of step memory", cap);
        b->next = g->arena;
        g->arena = b;
    }
    *out = b->mem + b->used;
    b->used += need;
    g->arena_used += need;
    return MOE_OK;
}

/* Copy device results to a host output and wait for them. */
static moe_status moe__cuda_download(moe_ctx *ctx, void *host, const void *dev, size_t bytes) {
    return moe__cuda_copy(ctx, host, dev, bytes, MOE__D2H);
}

/* The entries the other sections define (the GEMM uses the quantiser, attention the GEMM). */
static moe_status moe__cuda_gemm(moe_ctx *ctx, const moe__gemm_op *op);
static moe_status moe__cuda_fp8_quantize(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc,
                                         int pow2, uint8_t *codes, float *scales, moe_real *deq);
static moe_status moe__cuda_convert(moe_ctx *ctx, const void *src, moe_dtype src_dtype, int64_t n, void *dst,
                                    moe_dtype dst_dtype);

/* ============================================================================================
   2. numerics — FP8 quantise / dequantise, dtype conversions, element-wise       >>cu.numerics
   ============================================================================================
   FP8 quantisation is the CPU's one quantiser (moe__fp8_quantize_groups) in two passes:
     1. the scale of every gr×gc group from its amax (a max: any order gives the same bits):
        small groups (≤ MOE__CUDA_NUMERICS_SMALL values) a warp, part of a warp or one thread
        each; larger ones a block per piece of at most MOE__CUDA_NUMERICS_CHUNK values, the
        pieces' maxima folded by a second kernel, a block per group, when a group has several;
     2. one thread per element: code = e4m3(x / scale), deq = value(code) · scale.
   The amax ignores NaN (0 to start, fmaxf keeps the number, as the CPU's `>` fold does); the
   scale is moe_fp8_scale, with pow2 the power of two at or above it (moe__pow2_at_or_above by
   bits). Element-wise entries run one thread per element (MOE__CUDA_GRID_STRIDE) and round
   every product and sum once, as the CPU does (no FMA; the IEEE _rn intrinsics make it
   independent of the compiler's contraction flags). fill_normal is the CPU's Box–Muller in
   double on the same counter-based hashes (device log/cos: within an ulp of glibc). */

#define MOE__CUDA_NUMERICS_SMALL 1024  /* groups up to this many values: a warp (or less) each */
#define MOE__CUDA_NUMERICS_CHUNK 65536 /* the most values one block takes of a large group */

/* a / b for 0 ≤ a, 1 ≤ b: 32-bit division when both fit (the usual case), else 64-bit. */
static __device__ __forceinline__ int64_t moe__cuda_numerics_div(int64_t a, int64_t b) {
    if ((((uint64_t)a | (uint64_t)b) >> 32) == 0) return (int64_t)((uint32_t)a / (uint32_t)b);
    return a / b;
}

/* The scale of a group of max-abs amax: moe_fp8_scale, with pow2 the smallest power of two
   at or above it (moe__pow2_at_or_above; the scale is a positive normal float, so that is
   itself when its mantissa is zero, else 2^(exponent + 1)). */
static __device__ float moe__cuda_numerics_scale_of(float amax, int pow2) {
    float s = moe_fp8_scale(amax);
    if (pow2) {
        uint32_t u = moe__f32_bits(s);
        if (u & 0x7FFFFFu) s = moe__bits_f32(((u >> 23) + 1u) << 23);
    }
    return s;
}

/* Pass 1 for small groups: 2^lanes_log2 lanes per group (1 to 32), 32 >> lanes_log2 groups
   per warp, warps over the groups with a grid stride. The lanes of a group fold |x| over its
   values (row-major inside the group), then across each other with shuffles; the group's
   first lane writes the scale. The loop bound depends on the warp only, so the shuffles see
   every lane. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_amax_small(const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc, int64_t ngc,
                                  int64_t ngroups, int lanes_log2, int pow2, float *scales) {
    const int lane = (int)threadIdx.x & 31, lanes = 1 << lanes_log2, sub = lane & (lanes - 1);
    const int64_t per_warp = 32 >> lanes_log2;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5, nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    int64_t base;
    for (base = warp * per_warp; base < ngroups; base += nwarps * per_warp) {
        const int64_t g = base + (lane >> lanes_log2);
        float m = 0.0f;
        int off;
        if (g < ngroups) {
            const int64_t gi = moe__cuda_numerics_div(g, ngc), gj = g - gi * ngc, r0 = gi * gr, c0 = gj * gc;
            const int64_t h = gr < rows - r0 ? gr : rows - r0, w = gc < cols - c0 ? gc : cols - c0;
            const uint32_t nv = (uint32_t)(h * w), w32 = (uint32_t)w; /* nv ≤ MOE__CUDA_NUMERICS_SMALL */
            uint32_t e;
            for (e = (uint32_t)sub; e < nv; e += (uint32_t)lanes) {
                const uint32_t r = e / w32, c = e - r * w32;
                m = fmaxf(m, fabsf(x[(r0 + r) * cols + c0 + c]));
            }
        }
        for (off = lanes >> 1; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, off));
        if (g < ngroups && sub == 0) scales[g] = moe__cuda_numerics_scale_of(m, pow2);
    }
}

/* Pass 1 for large groups: each group is cut into `parts` pieces of at most rp rows × cp
   columns (nrp × ncp of them; a smaller edge group has empty pieces), one block per piece
   (block stride over ngroups·parts). The block's max of |x| over its piece goes to the scale
   when parts = 1, else to partial[group·parts + piece] for moe__cuda_numerics_amax_fold. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_amax_pieces(const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc, int64_t ngc,
                                   int64_t ngroups, int64_t rp, int64_t cp, int64_t ncp, int64_t parts, int pow2,
                                   float *partial, float *scales) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(it, ngroups * parts) {
        const int64_t g = it / parts, p = it - g * parts, gi = g / ngc, gj = g - gi * ngc, r0 = gi * gr, c0 = gj * gc;
        const int64_t h = gr < rows - r0 ? gr : rows - r0, w = gc < cols - c0 ? gc : cols - c0;
        const int64_t pr = p / ncp, pc = p - pr * ncp, rs = pr * rp, cs = pc * cp;
        const int64_t nr = rp < h - rs ? rp : h - rs, nc = cp < w - cs ? cp : w - cs;
        float m = 0.0f;
        if (nr > 0 && nc > 0) {
            const uint32_t nv = (uint32_t)(nr * nc), nc32 = (uint32_t)nc; /* nv ≤ MOE__CUDA_NUMERICS_CHUNK */
            const moe_real *x0 = x + (r0 + rs) * cols + c0 + cs;
            uint32_t e;
            for (e = threadIdx.x; e < nv; e += MOE__CUDA_THREADS) {
                const uint32_t r = e / nc32, c = e - r * nc32;
                m = fmaxf(m, fabsf(x0[(int64_t)r * cols + c]));
            }
        }
        m = moe__cuda_block_max(m, shm);
        if (threadIdx.x == 0) {
            if (parts == 1) scales[g] = moe__cuda_numerics_scale_of(m, pow2);
            else partial[it] = m;
        }
    }
}

/* Pass 1's second level: one block per group folds its pieces' maxima into the scale. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_amax_fold(const float *partial, int64_t ngroups, int64_t parts, int pow2, float *scales) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(g, ngroups) {
        float m = 0.0f;
        int64_t p;
        for (p = threadIdx.x; p < parts; p += MOE__CUDA_THREADS) m = fmaxf(m, partial[g * parts + p]);
        m = moe__cuda_block_max(m, shm);
        if (threadIdx.x == 0) scales[g] = moe__cuda_numerics_scale_of(m, pow2);
    }
}

/* Pass 2, one thread per element: codes[i] = e4m3(x[i] / scale) and deq[i] = value · scale
   (either may be NULL; deq may be x: each thread reads its element before writing it). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_fp8_encode(const moe_real *x, int64_t n, int64_t cols, int64_t gr, int64_t gc, int64_t ngc,
                                  const float *scales, uint8_t *codes, moe_real *deq) {
    MOE__CUDA_GRID_STRIDE(i, n) {
        const int64_t r = moe__cuda_numerics_div(i, cols), c = i - r * cols;
        const float s = scales[moe__cuda_numerics_div(r, gr) * ngc + moe__cuda_numerics_div(c, gc)];
        const uint8_t q = moe_f32_to_e4m3(__fdiv_rn((float)x[i], s));
        if (codes) codes[i] = q;
        if (deq) deq[i] = (moe_real)__fmul_rn(moe_e4m3_to_f32(q), s);
    }
}

static moe_status moe__cuda_fp8_quantize(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc,
                                         int pow2, uint8_t *codes, float *scales, moe_real *deq) {
    int64_t ngr, ngc, ngroups, grh, gcw, gmax;
    if (gr < 1 || gc < 1) return moe__fail(ctx, MOE_ERR_ARG, "fp8_quantize: groups of %lld x %lld", (long long)gr, (long long)gc);
    if (rows <= 0 || cols <= 0) return MOE_OK;
    ngr = rows / gr + (rows % gr != 0);
    ngc = cols / gc + (cols % gc != 0);
    ngroups = ngr * ngc;
    grh = gr < rows ? gr : rows; /* the largest group: grh × gcw values */
    gcw = gc < cols ? gc : cols;
    gmax = grh * gcw;
    if (!scales) { /* (the CPU always writes them; a caller without a use for them still gets codes) */
        scales = (float *)moe__dev_scratch(ctx, ngroups, sizeof(float), __func__);
        if (!scales) return MOE_ERR_MEMORY;
    }
    if (gmax <= MOE__CUDA_NUMERICS_SMALL) {
        /* a column group (gc = 1) is one thread's: neighbouring threads read neighbouring
           columns; otherwise the smallest power of two of lanes ≥ the group, at most a warp */
        int lanes_log2 = 0;
        int64_t per_warp, warps;
        if (gc > 1)
            while (lanes_log2 < 5 && ((int64_t)1 << lanes_log2) < gmax) lanes_log2++;
        per_warp = 32 >> lanes_log2;
        warps = ngroups / per_warp + (ngroups % per_warp != 0);
        MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_amax_small, moe__cuda_blocks(warps * 32, MOE__CUDA_THREADS), x, rows, cols, gr,
                         gc, ngc, ngroups, lanes_log2, pow2, scales);
    } else {
        const int64_t cp = gcw < MOE__CUDA_NUMERICS_CHUNK ? gcw : MOE__CUDA_NUMERICS_CHUNK;
        const int64_t rp = MOE__CUDA_NUMERICS_CHUNK / cp < grh ? MOE__CUDA_NUMERICS_CHUNK / cp : grh;
        const int64_t nrp = grh / rp + (grh % rp != 0), ncp = gcw / cp + (gcw % cp != 0), parts = nrp * ncp;
        float *partial = NULL;
        if (parts > 1) {
            partial = (float *)moe__dev_scratch(ctx, ngroups * parts, sizeof(float), __func__);
            if (!partial) return MOE_ERR_MEMORY;
        }
        MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_amax_pieces, moe__cuda_blocks(ngroups * parts, 1), x, rows, cols, gr, gc, ngc,
                         ngroups, rp, cp, ncp, parts, pow2, partial, scales);
        if (parts > 1)
            MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_amax_fold, moe__cuda_blocks(ngroups, 1), (const float *)partial, ngroups, parts,
                             pow2, scales);
    }
    if (codes || deq)
        MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_fp8_encode, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), x, rows * cols,
                         cols, gr, gc, ngc, (const float *)scales, codes, deq);
    return MOE_OK;
}

/* x[i] = value(codes[i]) · its group's scale, one thread per element. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_fp8_decode(const uint8_t *codes, const float *scales, int64_t n, int64_t cols, int64_t gr, int64_t gc,
                                  int64_t ngc, moe_real *x) {
    MOE__CUDA_GRID_STRIDE(i, n) {
        const int64_t r = moe__cuda_numerics_div(i, cols), c = i - r * cols;
        const float s = scales[moe__cuda_numerics_div(r, gr) * ngc + moe__cuda_numerics_div(c, gc)];
        x[i] = (moe_real)__fmul_rn(moe_e4m3_to_f32(codes[i]), s);
    }
}

static moe_status moe__cuda_fp8_dequantize(moe_ctx *ctx, const uint8_t *codes, const float *scales, int64_t rows, int64_t cols,
                                           int64_t gr, int64_t gc, moe_real *x) {
    int64_t ngc;
    if (gr < 1 || gc < 1) return moe__fail(ctx, MOE_ERR_ARG, "fp8_dequantize: groups of %lld x %lld", (long long)gr, (long long)gc);
    if (rows <= 0 || cols <= 0) return MOE_OK;
    ngc = cols / gc + (cols % gc != 0);
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_fp8_decode, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), codes, scales,
                     rows * cols, cols, gr, gc, ngc, x);
    return MOE_OK;
}

/* ---- conversions ---- */

/* Element i of an array of any dtype as double, and back: moe__load / moe__store. */
static __device__ double moe__cuda_numerics_load(const void *data, int dtype, int64_t i) {
    switch (dtype) {
    case MOE_F32: return (double)((const moe_real *)data)[i];
    case MOE_BF16: return (double)moe_bf16_to_f32(((const uint16_t *)data)[i]);
    case MOE_F16: return (double)moe_f16_to_f32(((const uint16_t *)data)[i]);
    case MOE_FP8_E4M3: return (double)moe_e4m3_to_f32(((const uint8_t *)data)[i]);
    case MOE_FP8_E5M2: return (double)moe_e5m2_to_f32(((const uint8_t *)data)[i]);
    case MOE_I32: return (double)((const int32_t *)data)[i];
    default: return (double)NAN;
    }
}
static __device__ void moe__cuda_numerics_store(void *data, int dtype, int64_t i, double v) {
    switch (dtype) {
    case MOE_F32: ((moe_real *)data)[i] = (moe_real)v; break;
    case MOE_BF16: ((uint16_t *)data)[i] = moe_f32_to_bf16((float)v); break;
    case MOE_F16: ((uint16_t *)data)[i] = moe_f32_to_f16((float)v); break;
    case MOE_FP8_E4M3: ((uint8_t *)data)[i] = moe_f32_to_e4m3((float)v); break;
    case MOE_FP8_E5M2: ((uint8_t *)data)[i] = moe_f32_to_e5m2((float)v); break;
    case MOE_I32:
        /* the CPU's (int32_t)v truncates; NaN and values outside int32 (undefined in C) give
           INT32_MIN as x86's cvttsd2si does, where a plain device cast would saturate */
        ((int32_t *)data)[i] = v > -2147483649.0 && v < 2147483648.0 ? (int32_t)v : INT32_MIN;
        break;
    default: break;
    }
}

/* dst[i] = src[i] converted, one thread per element (the dtypes are the same for every
   thread, so the switches do not diverge). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_convert(const void *src, int src_dtype, int64_t n, void *dst, int dst_dtype) {
    MOE__CUDA_GRID_STRIDE(i, n) moe__cuda_numerics_store(dst, dst_dtype, i, moe__cuda_numerics_load(src, src_dtype, i));
}

static moe_status moe__cuda_convert(moe_ctx *ctx, const void *src, moe_dtype src_dtype, int64_t n, void *dst, moe_dtype dst_dtype) {
    if (!moe_dtype_size(src_dtype) || !moe_dtype_size(dst_dtype)) return moe__fail(ctx, MOE_ERR_DTYPE, "convert: invalid dtype");
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_convert, moe__cuda_blocks(n, MOE__CUDA_THREADS), src, (int)src_dtype, n, dst,
                     (int)dst_dtype);
    return MOE_OK;
}

/* ---- element-wise ---- */

/* dst[r·ldd + c] (+)= src[r·lds + c] for r < rows, c < cols, one thread per element. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_copy2d(const moe_real *src, int64_t lds, int64_t rows, int64_t cols, moe_real *dst, int64_t ldd,
                              int accumulate) {
    MOE__CUDA_GRID_STRIDE(i, rows * cols) {
        const int64_t r = moe__cuda_numerics_div(i, cols), c = i - r * cols;
        const moe_real s = src[r * lds + c];
        moe_real *d = dst + r * ldd + c;
        *d = accumulate ? __fadd_rn(*d, s) : s;
    }
}
static moe_status moe__cuda_copy2d(moe_ctx *ctx, const moe_real *src, int64_t lds, int64_t rows, int64_t cols, moe_real *dst,
                                   int64_t ldd, int accumulate) {
    if (rows <= 0 || cols <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_copy2d, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), src, lds, rows, cols, dst,
                     ldd, accumulate != 0);
    return MOE_OK;
}

/* y[i] = a[i] + b[i mod nb] (nb = 0: b[i]). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_add(const moe_real *a, const moe_real *b, int64_t n, int64_t nb, moe_real *y) {
    MOE__CUDA_GRID_STRIDE(i, n) {
        const int64_t j = nb ? i - moe__cuda_numerics_div(i, nb) * nb : i;
        y[i] = __fadd_rn(a[i], b[j]);
    }
}
static moe_status moe__cuda_add(moe_ctx *ctx, const moe_real *a, const moe_real *b, int64_t n, int64_t nb, moe_real *y) {
    if (nb < 1 || n % nb) return moe__fail(ctx, MOE_ERR_SHAPE, "add: %lld values do not repeat %lld", (long long)n, (long long)nb);
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_add, moe__cuda_blocks(n, MOE__CUDA_THREADS), a, b, n, nb == n ? (int64_t)0 : nb, y);
    return MOE_OK;
}

/* y[i] (+)= a[i]·b[i]: the product rounded, then the sum. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_mul(const moe_real *a, const moe_real *b, int64_t n, moe_real *y, int accumulate) {
    MOE__CUDA_GRID_STRIDE(i, n) {
        const moe_real p = __fmul_rn(a[i], b[i]);
        y[i] = accumulate ? __fadd_rn(y[i], p) : p;
    }
}
static moe_status moe__cuda_mul(moe_ctx *ctx, const moe_real *a, const moe_real *b, int64_t n, moe_real *y, int accumulate) {
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_mul, moe__cuda_blocks(n, MOE__CUDA_THREADS), a, b, n, y, accumulate != 0);
    return MOE_OK;
}

/* y[i] (+)= alpha·x[i]: the product rounded, then the sum (scale and axpy). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_scale(moe_real alpha, const moe_real *x, int64_t n, moe_real *y, int accumulate) {
    MOE__CUDA_GRID_STRIDE(i, n) {
        const moe_real p = __fmul_rn(alpha, x[i]);
        y[i] = accumulate ? __fadd_rn(y[i], p) : p;
    }
}
static moe_status moe__cuda_scale(moe_ctx *ctx, moe_real alpha, const moe_real *x, int64_t n, moe_real *y) {
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_scale, moe__cuda_blocks(n, MOE__CUDA_THREADS), alpha, x, n, y, 0);
    return MOE_OK;
}
static moe_status moe__cuda_axpy(moe_ctx *ctx, moe_real alpha, const moe_real *x, int64_t n, moe_real *y) {
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_scale, moe__cuda_blocks(n, MOE__CUDA_THREADS), alpha, x, n, y, 1);
    return MOE_OK;
}

static __global__ void __launch_bounds__(MOE__CUDA_THREADS) moe__cuda_numerics_fill(moe_real value, int64_t n, moe_real *x) {
    MOE__CUDA_GRID_STRIDE(i, n) x[i] = value;
}
static moe_status moe__cuda_fill(moe_ctx *ctx, moe_real value, int64_t n, moe_real *x) {
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_fill, moe__cuda_blocks(n, MOE__CUDA_THREADS), value, n, x);
    return MOE_OK;
}

/* moe__rng_normal_at: Box–Muller in double on the hashes of counters c (u1 in (0, 1]) and
   c + 1 (u2 in [0, 1)), 53 bits each. cos(2π·u2) is cospi(2·u2) (2·u2 exact): device cos
   carries a large-argument reduction in local memory, which the build refuses; the angle
   differs from the CPU's fl(6.283185307179586·u2) by under 2^-50, so a double ulp or two
   of the cosine, far below the float the value is rounded to. */
static __device__ double moe__cuda_numerics_normal_at(uint64_t key, uint64_t c) {
    const double u1 = __dmul_rn(__dadd_rn((double)(moe_rng_hash(key, c) >> 11), 1.0), 1.0 / 9007199254740992.0);
    const double u2 = __dmul_rn((double)(moe_rng_hash(key, c + 1) >> 11), 1.0 / 9007199254740992.0);
    return __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cospi(__dmul_rn(2.0, u2)));
}
/* x[i] = mean + sd·N(counter + 2i) in double, rounded once to float; one thread per value. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_numerics_fill_normal(uint64_t key, uint64_t counter, moe_real mean, moe_real sd, int64_t n, moe_real *x) {
    MOE__CUDA_GRID_STRIDE(i, n) {
        const double v = moe__cuda_numerics_normal_at(key, counter + 2 * (uint64_t)i);
        x[i] = (moe_real)__dadd_rn((double)mean, __dmul_rn((double)sd, v));
    }
}
static moe_status moe__cuda_fill_normal(moe_ctx *ctx, uint64_t key, uint64_t counter, moe_real mean, moe_real sd, int64_t n,
                                        moe_real *x) {
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_numerics_fill_normal, moe__cuda_blocks(n, MOE__CUDA_THREADS), key, counter, mean, sd, n, x);
    return MOE_OK;
}

/* ============================================================================================
   3. gemm — cuBLASLt products in FP32, BF16 and FP8                                  >>cu.gemm
   ============================================================================================
   The table's row-major C[m,n] = alpha·op(A)·op(B) (+ C) is cuBLAS's column-major
   Cᵀ = op(B)ᵀ·op(A)ᵀ: a row-major matrix read column-major is its transpose, so B goes first
   and each operand keeps its own transpose flag (gpu.md §2.1). Precisions, as the CPU engine:
   - FP32: FP32 operands, CUBLAS_COMPUTE_32F (no TF32);
   - BF16: operands rounded to BF16 (moe_f32_to_bf16, round to nearest even) into step memory,
     products exact, sums in FP32;
   - FP8: each operand quantised as its role says (moe__fp8_role_group: 1×B tiles along the
     reduction for activations and gradients, B×B blocks for weights, B×1 down the tokens for
     Wgrad) by the table's fp8_quantize, its dequantised values multiplied: on the BF16 path
     with power-of-two scales (every such value is exactly a BF16 number, so the products are
     the FP8 products), on the FP32 path with amax scales. This is the recipe's arithmetic
     up to the order of the sums (gpu.md §2.2 "fake-quant"), for any block size; on Hopper,
     with B = 128 and shapes it takes, cuBLASLt's block-scaled FP8 kernels multiply the same
     codes and scales on the tensor cores instead (below).
   Descriptors are built per call (host work of a few microseconds); a cache keyed by shape
   is the planned next step. The emulated narrow accumulator (moe_fp8_options.acc_bits) and
   the FP8 error statistics are CPU-only and refused here. */

/* The cuBLASLt plan of one column-major product D[m,n] = op(A)[m,k]·op(B)[k,n] (+ C = D),
   `batch` times at the given strides: the matmul descriptor and the three layouts. */
typedef struct moe__lt_plan {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
} moe__lt_plan;

static void moe__lt_plan_free(moe__lt_plan *p) {
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    memset(p, 0, sizeof *p);
}

/* A layout of a stored rows×cols column-major matrix (ld ≥ rows), batched. */
static cublasStatus_t moe__lt_layout(cublasLtMatrixLayout_t *l, cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld,
                                     int64_t batch, int64_t stride) {
    int32_t count = (int32_t)batch;
    cublasStatus_t s = cublasLtMatrixLayoutCreate(l, type, (uint64_t)rows, (uint64_t)cols, ld);
    if (s != CUBLAS_STATUS_SUCCESS || batch == 1) return s;
    s = cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride);
    return s;
}

/* The plan of the table's row-major product op (inputs of `ab_type` at lda/ldb and strides
   sa/sb, FP32 output): cuBLAS m = op->n, n = op->m, A = op->b, B = op->a. Host work only, so
   tests check it without a GPU. */
static cublasStatus_t moe__lt_plan_rowmajor(moe__lt_plan *p, cudaDataType_t ab_type, const moe__gemm_op *op, int64_t m, int64_t k,
                                            int64_t lda, int64_t sa, int64_t ldb, int64_t sb) {
    cublasOperation_t ta = op->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, tb = op->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t s;
    memset(p, 0, sizeof *p);
    s = cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    /* op(B)ᵀ [n, k]: B stored [k, n] row-major = [n, k] column-major, or [n, k] = [k, n] */
    if (s == CUBLAS_STATUS_SUCCESS)
        s = moe__lt_layout(&p->a, ab_type, op->trans_b ? k : op->n, op->trans_b ? op->n : k, ldb, op->batch, sb);
    /* op(A)ᵀ [k, m] likewise */
    if (s == CUBLAS_STATUS_SUCCESS) s = moe__lt_layout(&p->b, ab_type, op->trans_a ? m : k, op->trans_a ? k : m, lda, op->batch, sa);
    if (s == CUBLAS_STATUS_SUCCESS) s = moe__lt_layout(&p->c, CUDA_R_32F, op->n, m, op->ldc, op->batch, op->stride_c);
    if (s != CUBLAS_STATUS_SUCCESS) moe__lt_plan_free(p);
    return s;
}

/* The alignment in bytes (a power of two, at most 256) that every matrix of a batch keeps:
   its start, its rows at ld and its batch members at stride, of `size`-byte values. */
static uint32_t moe__lt_alignment(const void *p, int64_t ld, int64_t stride, int64_t batch, size_t size) {
    uint64_t bits = (uint64_t)(uintptr_t)p | (uint64_t)ld * size | (batch > 1 ? (uint64_t)stride * size : 0) | 256u;
    return (uint32_t)(bits & (~bits + 1)); /* the lowest set bit */
}

/* ---- the plan cache ----
   A product's descriptors and the algorithm cuBLASLt's heuristic chose for them, kept by shape
   (gpu.md §2.1): the heuristic is host work that would cost more than a small GEMM (and the
   MoE layers' per-expert loops make many), and a kept algorithm keeps each shape's bits the
   same from call to call. The key holds everything the descriptors and the heuristic see,
   including each matrix's alignment (the heuristic assumes 256 bytes unless told, and picks
   kernels that may read only what it is told). MOE__LT_CACHE entries, the oldest replaced. */
#define MOE__LT_CACHE 512
typedef struct moe__lt_key {
    int32_t type, trans_a, trans_b, mode_a, mode_b; /* FP8 scale modes; -1 without */
    uint32_t align[3];                              /* cuBLAS's A, B, C = D */
    int64_t m, n, k, lda, ldb, ldc, batch, sa, sb, sc;
} moe__lt_key;
typedef struct moe__lt_entry {
    moe__lt_key key;
    moe__lt_plan plan;
    cublasLtMatmulAlgo_t algo;
    int found; /* 0: cuBLASLt has no algorithm for it */
} moe__lt_entry;
typedef struct moe__lt_cache {
    moe__lt_entry e[MOE__LT_CACHE];
    int count, next;
} moe__lt_cache;

static moe__lt_cache *moe__lt_cache_new(moe_ctx *ctx) { return (moe__lt_cache *)moe__heap_calloc(ctx, sizeof(moe__lt_cache)); }
static void moe__lt_cache_free(moe__lt_cache *c) {
    int i;
    if (!c) return;
    for (i = 0; i < c->count; i++) moe__lt_plan_free(&c->e[i].plan);
    MOE_FREE(c);
}
static moe__lt_entry *moe__lt_find(moe_gpu *g, const moe__lt_key *key) {
    int i;
    for (i = 0; i < g->plans->count; i++)
        if (memcmp(&g->plans->e[i].key, key, sizeof *key) == 0) return &g->plans->e[i];
    return NULL;
}
/* Keep plan p (the cache owns it from here) under key, with the heuristic's algorithm. */
static moe__lt_entry *moe__lt_keep(moe_ctx *ctx, const moe__lt_key *key, moe__lt_plan *p) {
    moe__lt_cache *c = MOE__GPU(ctx)->plans;
    moe__lt_entry *e;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t best;
    uint64_t ws = MOE__CUDA_LT_WS;
    int found = 0;
    cublasStatus_t s;
    if (c->count < MOE__LT_CACHE) e = &c->e[c->count++];
    else {
        e = &c->e[c->next];
        c->next = (c->next + 1) % MOE__LT_CACHE;
        moe__lt_plan_free(&e->plan);
    }
    e->key = *key;
    e->plan = *p;
    memset(&best, 0, sizeof best);
    s = cublasLtMatmulPreferenceCreate(&pref);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key->align[0], sizeof key->align[0]);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key->align[1], sizeof key->align[1]);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key->align[2], sizeof key->align[2]);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key->align[2], sizeof key->align[2]);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulAlgoGetHeuristic(MOE__GPU(ctx)->lt, p->desc, p->a, p->b, p->c, p->c, pref, 1, &best, &found);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    /* a shape it refuses (NOT_SUPPORTED, or no algorithm) is kept as refused */
    e->found = s == CUBLAS_STATUS_SUCCESS && found > 0;
    e->algo = best.algo;
    return e;
}
/* D = alpha·A·B + beta·D with entry e's plan and algorithm, on the context's stream. */
static moe_status moe__lt_matmul(moe_ctx *ctx, const moe__lt_entry *e, const void *A, const void *B, float *D, float alpha, float beta) {
    moe_gpu *g = MOE__GPU(ctx);
    if (!e->found)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "gemm: cuBLASLt has no algorithm for m=%lld n=%lld k=%lld batch=%lld (type %d)",
                         (long long)e->key.n, (long long)e->key.m, (long long)e->key.k, (long long)e->key.batch, (int)e->key.type);
    MOE__CUDA_ON(ctx);
    MOE__CUBLAS_TRY(ctx, cublasLtMatmul(g->lt, e->plan.desc, &alpha, A, e->plan.a, B, e->plan.b, &beta, D, e->plan.c, D, e->plan.c, &e->algo,
                                        g->lt_ws, MOE__CUDA_LT_WS, g->stream));
    return MOE_OK;
}

/* dst [batch][rows][ldd] BF16 from src rows at stride ld, batches at stride `stride` (the
   cols ≤ ldd values of each row; the padding is left alone). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_pack_bf16(const float *src, int64_t ld, int64_t stride, int64_t rows, int64_t cols, int64_t batch, uint16_t *dst,
                    int64_t ldd) {
    int64_t per = rows * cols;
    MOE__CUDA_GRID_STRIDE(i, batch * per) {
        int64_t b = i / per, r = (i % per) / cols, c = i % cols;
        dst[(b * rows + r) * ldd + c] = moe_f32_to_bf16(src[b * stride + r * ld + c]);
    }
}
/* dst [rows][cols] dense FP32 from src rows at stride ld. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_pack_f32(const float *src, int64_t ld, int64_t rows, int64_t cols, float *dst) {
    MOE__CUDA_GRID_STRIDE(i, rows * cols) dst[i] = src[(i / cols) * ld + i % cols];
}

/* One product of op (batched as op says) on operands a, b of type `type` (FP32, or BF16 when
   `type` is CUDA_R_16BF) at lda/sa and ldb/sb: C rows m, reduction k. */
static moe_status moe__cuda_product(moe_ctx *ctx, const moe__gemm_op *op, cudaDataType_t type, const void *a, int64_t lda, int64_t sa,
                                    const void *b, int64_t ldb, int64_t sb, moe_real *c, int64_t m, int64_t k) {
    size_t size = type == CUDA_R_16BF ? 2 : 4;
    moe__lt_key key;
    moe__lt_entry *e;
    memset(&key, 0, sizeof key); /* (padding bytes too: keys are compared whole) */
    key.type = (int32_t)type;
    key.trans_a = op->trans_a;
    key.trans_b = op->trans_b;
    key.mode_a = key.mode_b = -1;
    key.align[0] = moe__lt_alignment(b, ldb, sb, op->batch, size); /* cuBLAS's A is our B */
    key.align[1] = moe__lt_alignment(a, lda, sa, op->batch, size);
    key.align[2] = moe__lt_alignment(c, op->ldc, op->stride_c, op->batch, sizeof(moe_real));
    key.m = m; key.n = op->n; key.k = k; key.lda = lda; key.ldb = ldb; key.ldc = op->ldc;
    key.batch = op->batch;
    if (op->batch > 1) {
        key.sa = sa;
        key.sb = sb;
        key.sc = op->stride_c;
    }
    if (!(e = moe__lt_find(MOE__GPU(ctx), &key))) {
        moe__lt_plan p;
        cublasStatus_t s = moe__lt_plan_rowmajor(&p, type, op, m, k, lda, sa, ldb, sb);
        if (s != CUBLAS_STATUS_SUCCESS) return moe__cublas_fail(ctx, s, "gemm: building the cuBLASLt descriptors", __FILE__, __LINE__);
        e = moe__lt_keep(ctx, &key, &p);
    }
    return moe__lt_matmul(ctx, e, b, a, c, op->alpha, op->accumulate ? 1.0f : 0.0f);
}

/* The stored shape of operand A (rows × cols) of an m×k product, and of B for k×n. */
#define MOE__GEMM_A_ROWS(op, m, k) ((op)->trans_a ? (k) : (m))
#define MOE__GEMM_A_COLS(op, m, k) ((op)->trans_a ? (m) : (k))
#define MOE__GEMM_B_ROWS(op, k) ((op)->trans_b ? (op)->n : (k))
#define MOE__GEMM_B_COLS(op, k) ((op)->trans_b ? (k) : (op)->n)

/* The FP8 form of one stored operand x [rows, cols] (row stride ld) in `role`, dequantised
   into dense step memory (*out). */
static moe_status moe__cuda_fp8_operand(moe_ctx *ctx, const moe_real *x, int64_t ld, int64_t rows, int64_t cols, moe_fp8_role role,
                                        moe_real **out) {
    int64_t gr, gc;
    int pow2 = moe__fp8_group_shape(ctx, moe__fp8_role_group(role), rows, cols, &gr, &gc);
    moe_real *dense = (moe_real *)moe__dev_scratch(ctx, rows * cols, sizeof(moe_real), __func__);
    float *scales = (float *)moe__dev_scratch(ctx, ((rows + gr - 1) / gr) * ((cols + gc - 1) / gc), sizeof(float), __func__);
    if (!dense || !scales) return MOE_ERR_MEMORY;
    if (ld != cols) {
        MOE__CUDA_LAUNCH(ctx, moe__cuda_pack_f32, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), x, ld, rows, cols, dense);
        x = dense;
    }
    MOE__TRY(moe__cuda_fp8_quantize(ctx, x, rows, cols, gr, gc, pow2, NULL, scales, dense));
    *out = dense;
    return MOE_OK;
}

/* ---- FP8 on Hopper's tensor cores (B = 128) ----
   cuBLASLt multiplies E4M3 codes with DeepSeek's scales itself (gpu.md §2.2): one FP32 scale
   per 128 values along the reduction (VEC128_32F) or per 128×128 block (BLK128x128_32F), both
   operands with the reduction contiguous ("TN"). The codes and scales are the recipe's, from
   the same quantiser as the emulation (bit-exact with the CPU); an operand whose reduction
   runs down its storage's rows (Dgrad's W, Wgrad's dY and X) is transposed as codes and scale
   grid, which keeps every group whole. The products are the same as the emulation's; the sums
   are the tensor cores' (within each 128-long block an accumulator of about 14 bits, then
   scaled and added in FP32: DeepSeek-V3 §3.3.2), so results differ from the emulation's by
   the accumulation (normwise ~1e-3; bench/gpu.cu checks it on a GPU). Taken where
   moe__cuda_fp8_tc_fits says and cuBLASLt agrees; anything else, or MOE_CUDA_FP8_TC=0, takes
   the emulation. */

/* dst[c·rows + r] = src[r·cols + c]: codes [rows, cols] → [cols, rows]. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_transpose_u8(const uint8_t *src, int64_t rows, int64_t cols, uint8_t *dst) {
    MOE__CUDA_GRID_STRIDE(i, rows * cols) dst[(i % cols) * rows + i / cols] = src[i];
}
/* A scale grid of rg groups along the operand's rows and kg along its reduction, read from
   `in` (k_major_in: in[kb·rg + r], else in[r·kg + kb]) into out (k_major_out: out[kb·ld + r],
   else out[r·ld + kb]). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_fp8_scale_grid(const float *in, int k_major_in, int64_t rg, int64_t kg, int k_major_out, int64_t ld, float *out) {
    MOE__CUDA_GRID_STRIDE(i, rg * kg) {
        int64_t r = i / kg, kb = i % kg;
        out[k_major_out ? kb * ld + r : r * ld + kb] = in[k_major_in ? kb * rg + r : r * kg + kb];
    }
}

/* Operand x stored [rows, cols] (row stride ld) in `role`, whose reduction runs along its
   columns (k_cols) or down its rows, as cuBLASLt's TN operand: codes [R, k] and scales. */
static moe_status moe__cuda_fp8_tn(moe_ctx *ctx, const moe_real *x, int64_t ld, int64_t rows, int64_t cols, int k_cols, moe_fp8_role role,
                                   uint8_t **codes, float **scales, int *blocks) {
    int64_t gr, gc, R = k_cols ? rows : cols, k = k_cols ? cols : rows, L = (k + 127) / 128, L4 = (L + 3) / 4 * 4, Rg, Kg;
    moe__fp8_group g = moe__fp8_role_group(role);
    int pow2 = moe__fp8_group_shape(ctx, g, rows, cols, &gr, &gc);
    float *grid = (float *)moe__dev_scratch(ctx, ((rows + gr - 1) / gr) * ((cols + gc - 1) / gc), sizeof(float), __func__);
    uint8_t *q = (uint8_t *)moe__dev_scratch(ctx, rows * cols, 1, __func__);
    moe_real *dense = NULL;
    if (!grid || !q) return MOE_ERR_MEMORY;
    if (ld != cols) {
        if (!(dense = (moe_real *)moe__dev_scratch(ctx, rows * cols, sizeof(moe_real), __func__))) return MOE_ERR_MEMORY;
        MOE__CUDA_LAUNCH(ctx, moe__cuda_pack_f32, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), x, ld, rows, cols, dense);
        x = dense;
    }
    MOE__TRY(moe__cuda_fp8_quantize(ctx, x, rows, cols, gr, gc, pow2, q, grid, NULL));
    *codes = q;
    if (!k_cols) { /* the reduction down the rows: codes to [cols, rows] */
        if (!(*codes = (uint8_t *)moe__dev_scratch(ctx, rows * cols, 1, __func__))) return MOE_ERR_MEMORY;
        MOE__CUDA_LAUNCH(ctx, moe__cuda_transpose_u8, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), q, rows, cols, *codes);
    }
    *blocks = g == MOE__FP8_BLOCKS;
    Rg = *blocks ? (R + 127) / 128 : R;
    Kg = L;
    /* cuBLASLt's layouts: vectors k-block-major [L][R]; blocks [Rg][L4] (the padding zeroed) */
    if (!(*scales = (float *)moe__dev_scratch(ctx, *blocks ? Rg * L4 : L * R, sizeof(float), __func__))) return MOE_ERR_MEMORY;
    if (*blocks) MOE__TRY(moe__cuda_memset(ctx, *scales, 0, (size_t)(Rg * L4) * sizeof(float)));
    /* the storage grid is [row groups][col groups]: k-major exactly when k runs down the rows */
    MOE__CUDA_LAUNCH(ctx, moe__cuda_fp8_scale_grid, moe__cuda_blocks(Rg * Kg, MOE__CUDA_THREADS), grid, !k_cols, Rg, Kg, !*blocks,
                     *blocks ? L4 : R, *scales);
    return MOE_OK;
}

/* Whether one FP8 product of op (m × n, reduction k) may run on the tensor cores: B = 128,
   roles whose groups lie along the reduction (tiles) or are blocks (at most one operand), k a
   multiple of 128 (no partial scale block until a GPU test says cuBLASLt takes one), m a
   multiple of 8 and n of 4 (Transformer Engine's bounds for 1D-scaled operands), C rows
   16-byte aligned. cuBLASLt may still refuse: then the emulation runs (moe__cuda_fp8_tc). */
static int moe__cuda_fp8_tc_fits(const moe_ctx *ctx, const moe__gemm_op *op, const moe_real *c, int64_t m, int64_t k) {
    const moe_fp8_options *f = &ctx->conf.fp8;
    moe__fp8_group ga = moe__fp8_role_group(op->role_a), gb = moe__fp8_role_group(op->role_b);
    int a_ok = ga == MOE__FP8_BLOCKS || ga == (op->trans_a ? MOE__FP8_DOWN_COLS : MOE__FP8_ALONG_ROWS);
    int b_ok = gb == MOE__FP8_BLOCKS || gb == (op->trans_b ? MOE__FP8_ALONG_ROWS : MOE__FP8_DOWN_COLS);
    return MOE__GPU(ctx)->fp8_tensor_cores && f->block == 128 && !f->per_tensor && !f->acc_bits && !f->stats && op->batch == 1 &&
           a_ok && b_ok && !(ga == MOE__FP8_BLOCKS && gb == MOE__FP8_BLOCKS) && k % 128 == 0 && m % 8 == 0 && op->n % 4 == 0 &&
           op->ldc % 4 == 0 && ((uintptr_t)c & 15) == 0;
}

/* The cuBLASLt plan of an FP8 product D[n, m] (column-major, at ldc) = A·B with A the codes
   [n, k] (k contiguous, op T) and B the codes [m, k] (op N), scale modes mode_a, mode_b, FP32
   sums and output, fast accumulation off. Host work only (tests read it back without a GPU);
   the scale pointers are set per call. */
static cublasStatus_t moe__lt_plan_fp8(moe__lt_plan *p, int64_t m, int64_t n, int64_t k, int64_t ldc, int32_t mode_a, int32_t mode_b) {
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    int8_t fast = 0;
    cublasStatus_t s;
    memset(p, 0, sizeof *p);
    s = cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_a, sizeof mode_a);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_b, sizeof mode_b);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&p->a, CUDA_R_8F_E4M3, (uint64_t)k, (uint64_t)n, k);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&p->b, CUDA_R_8F_E4M3, (uint64_t)k, (uint64_t)m, k);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&p->c, CUDA_R_32F, (uint64_t)n, (uint64_t)m, ldc);
    if (s != CUBLAS_STATUS_SUCCESS) moe__lt_plan_free(p);
    return s;
}

/* C (+)= alpha·op(A)·op(B) in E4M3 on the tensor cores: cuBLAS A = op(B)ᵀ codes [n, k], B =
   op(A) codes [m, k], both "TN", D = C column-major [n, m] at ldc. *taken = 0 (and nothing
   done) when cuBLASLt has no algorithm for the shape: the caller emulates. */
static moe_status moe__cuda_fp8_tc(moe_ctx *ctx, const moe__gemm_op *op, const moe_real *a, const moe_real *b, moe_real *c, int64_t m,
                                   int64_t k, int *taken) {
    uint8_t *qa, *qb;
    float *sa, *sb;
    int blk_a, blk_b;
    moe__lt_key key;
    moe__lt_entry *e;
    memset(&key, 0, sizeof key);
    key.type = CUDA_R_8F_E4M3;
    key.trans_a = 1; /* cuBLAS's: A transposed, B not */
    /* cuBLAS's A is our B: blocks when B is the weight */
    key.mode_a = moe__fp8_role_group(op->role_b) == MOE__FP8_BLOCKS ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                                                     : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    key.mode_b = moe__fp8_role_group(op->role_a) == MOE__FP8_BLOCKS ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                                                     : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    key.align[0] = key.align[1] = moe__lt_alignment((const void *)(uintptr_t)MOE__CUDA_ALIGN, k, 0, 1, 1); /* codes in step memory */
    key.align[2] = moe__lt_alignment(c, op->ldc, 0, 1, sizeof(moe_real));
    key.m = m; key.n = op->n; key.k = k; key.lda = key.ldb = k; key.ldc = op->ldc; key.batch = 1;
    if (!(e = moe__lt_find(MOE__GPU(ctx), &key))) {
        moe__lt_plan p;
        cublasStatus_t s = moe__lt_plan_fp8(&p, m, op->n, k, op->ldc, key.mode_a, key.mode_b);
        if (s != CUBLAS_STATUS_SUCCESS) return moe__cublas_fail(ctx, s, "gemm: building the FP8 cuBLASLt descriptors", __FILE__, __LINE__);
        e = moe__lt_keep(ctx, &key, &p);
    }
    *taken = e->found;
    if (!e->found) return MOE_OK;
    /* op(A) [m, k] has k along A's columns unless trans_a; op(B) [k, n] has k along B's rows unless trans_b */
    MOE__TRY(moe__cuda_fp8_tn(ctx, a, op->lda, op->trans_a ? k : m, op->trans_a ? m : k, !op->trans_a, op->role_a, &qa, &sa, &blk_a));
    MOE__TRY(moe__cuda_fp8_tn(ctx, b, op->ldb, op->trans_b ? op->n : k, op->trans_b ? k : op->n, op->trans_b, op->role_b, &qb, &sb, &blk_b));
    MOE__CUBLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(e->plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sb, sizeof sb));
    MOE__CUBLAS_TRY(ctx, cublasLtMatmulDescSetAttribute(e->plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa, sizeof sa));
    MOE__GPU(ctx)->fp8_tc_products++;
    return moe__lt_matmul(ctx, e, qb, qa, c, op->alpha, op->accumulate ? 1.0f : 0.0f);
}

/* One product in op's precision: C (m rows at op->ldc) from a, b at op's leading dimensions. */
static moe_status moe__cuda_product_in(moe_ctx *ctx, const moe__gemm_op *op, const moe_real *a, const moe_real *b, moe_real *c, int64_t m,
                                       int64_t k) {
    int64_t ra = MOE__GEMM_A_ROWS(op, m, k), ca = MOE__GEMM_A_COLS(op, m, k), rb = MOE__GEMM_B_ROWS(op, k), cb = MOE__GEMM_B_COLS(op, k);
    if (m == 0 || op->n == 0) return MOE_OK;
    if (k == 0) { /* an empty sum: C = 0, or C unchanged */
        if (op->accumulate) return MOE_OK;
        for (int64_t i = 0; i < op->batch; i++)
            MOE__CUDA_TRY(ctx, cudaMemset2DAsync(c + i * op->stride_c, (size_t)op->ldc * sizeof(moe_real), 0, (size_t)op->n * sizeof(moe_real),
                                                 (size_t)m, MOE__GPU(ctx)->stream));
        return MOE_OK;
    }
    if (op->precision == MOE_F32) return moe__cuda_product(ctx, op, CUDA_R_32F, a, op->lda, op->stride_a, b, op->ldb, op->stride_b, c, m, k);
    if (op->precision == MOE_BF16) { /* rows padded to 8 values (16 bytes), the alignment tensor cores like */
        int64_t lda16 = (ca + 7) / 8 * 8, ldb16 = (cb + 7) / 8 * 8;
        uint16_t *a16 = (uint16_t *)moe__dev_scratch(ctx, op->batch * ra * lda16, 2, __func__), *b16 = (uint16_t *)moe__dev_scratch(ctx, op->batch * rb * ldb16, 2, __func__);
        if (!a16 || !b16) return MOE_ERR_MEMORY;
        MOE__CUDA_LAUNCH(ctx, moe__cuda_pack_bf16, moe__cuda_blocks(op->batch * ra * ca, MOE__CUDA_THREADS), a, op->lda, op->stride_a, ra, ca,
                         op->batch, a16, lda16);
        MOE__CUDA_LAUNCH(ctx, moe__cuda_pack_bf16, moe__cuda_blocks(op->batch * rb * cb, MOE__CUDA_THREADS), b, op->ldb, op->stride_b, rb, cb,
                         op->batch, b16, ldb16);
        return moe__cuda_product(ctx, op, CUDA_R_16BF, a16, lda16, ra * lda16, b16, ldb16, rb * ldb16, c, m, k);
    }
    /* FP8: product by product (each batch member has its own scales) */
    if (ctx->conf.fp8.acc_bits > 0 || ctx->conf.fp8.stats)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "gemm: the FP8 accumulator emulation (acc_bits) and statistics are CPU-only");
    if (moe__cuda_fp8_tc_fits(ctx, op, c, m, k)) {
        int taken = 0;
        MOE__TRY(moe__cuda_fp8_tc(ctx, op, a, b, c, m, k, &taken));
        if (taken) return MOE_OK;
    }
    for (int64_t i = 0; i < op->batch; i++) {
        moe__gemm_op one = *op;
        moe_real *qa, *qb;
        MOE__TRY(moe__cuda_fp8_operand(ctx, a + i * op->stride_a, op->lda, ra, ca, op->role_a, &qa));
        MOE__TRY(moe__cuda_fp8_operand(ctx, b + i * op->stride_b, op->ldb, rb, cb, op->role_b, &qb));
        one.batch = 1;
        one.lda = ca;
        one.ldb = cb;
        one.stride_a = one.stride_b = one.stride_c = 0;
        one.precision = ctx->conf.fp8.amax_scales ? MOE_F32 : MOE_BF16; /* power-of-two scales: exact in BF16 */
        MOE__TRY(moe__cuda_product_in(ctx, &one, qa, qb, c + i * op->stride_c, m, k));
    }
    return MOE_OK;
}

static moe_status moe__cuda_gemm(moe_ctx *ctx, const moe__gemm_op *op) {
    MOE__TRY(moe__gemm_check(ctx, "gemm", op));
    if (op->batch > 0x7FFFFFFF) return moe__fail(ctx, MOE_ERR_SHAPE, "gemm: batch %lld is more than cuBLASLt takes", (long long)op->batch);
    return moe__cuda_product_in(ctx, op, op->a, op->b, op->c, op->m, op->k);
}

/* Group by group on the stream (a per-expert loop of cuBLASLt calls, gpu.md §0.3): group e's
   token rows [off[e], off[e+1]) are A's rows (and C's), or with group_k the reduction rows of
   A and B, its C at e·stride_c (zeroed for a group without tokens unless accumulate). */
static moe_status moe__cuda_gemm_grouped(moe_ctx *ctx, const moe__gemm_op *op, int64_t groups, const int64_t *host_offsets,
                                         int group_k) {
    moe__gemm_op one = *op;
    int64_t e;
    MOE__TRY(moe__gemm_check(ctx, "gemm_grouped", op));
    if (groups < 1 || !host_offsets || op->batch != 1 || (group_k && (!op->trans_a || op->trans_b)) || (!group_k && op->trans_a))
        return moe__fail(ctx, MOE_ERR_ARG, "gemm_grouped: want groups >= 1 with offsets, batch 1, and token rows in A");
    for (e = 0; e < groups; e++) {
        int64_t r0 = host_offsets[e], rows = host_offsets[e + 1] - r0;
        if (rows < 0) return moe__fail(ctx, MOE_ERR_ARG, "gemm_grouped: offsets decrease at group %lld", (long long)e);
        if (group_k) {
            if (rows == 0 && op->accumulate) continue;
            MOE__TRY(moe__cuda_product_in(ctx, &one, op->a + r0 * op->lda, op->b + r0 * op->ldb, op->c + e * op->stride_c, op->m, rows));
        } else if (rows > 0) {
            MOE__TRY(moe__cuda_product_in(ctx, &one, op->a + r0 * op->lda, op->b + e * op->stride_b, op->c + r0 * op->ldc, rows, op->k));
        }
    }
    return MOE_OK;
}

/* ============================================================================================
   4. rows — RMSNorm, softmax, cross-entropy, SwiGLU, RoPE, top-k                     >>cu.rows
   ============================================================================================
   Row reductions run one block per row (MOE__CUDA_BLOCK_STRIDE over the rows), summing in
   float as the CPU does with the block's fixed-order sums; element-wise entries run one
   thread per element (MOE__CUDA_GRID_STRIDE) through the MOE_HD functions the CPU calls, so
   they give the CPU's bits. The two sums across rows keep the CPU's order exactly:
   rmsnorm_bwd's dw goes through partials of MOE__ROW_CHUNK rows added in chunk order, and
   xent_fwd's host_sum is a serial sum in row order. top-k is exact (a total order). */

/* ---- RMSNorm ---- */

/* One block per row: ss = Σ x² (block sum), rs = 1/sqrt(ss/d + eps), y = w ⊙ (x·rs). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_rmsnorm_fwd_rows(const moe_real *x, int64_t ldx, const moe_real *w, int64_t rows, int64_t d, moe_real eps,
                               moe_real *y, int64_t ldy, moe_real *rstd) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const moe_real *xr = x + r * ldx;
        moe_real *yr = y + r * ldy, ss = 0, rs;
        int64_t i;
        for (i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
        ss = moe__cuda_block_sum(ss, shm);
        rs = (moe_real)1 / sqrtf(ss / (moe_real)d + eps);
        if (rstd && threadIdx.x == 0) rstd[r] = rs;
        for (i = threadIdx.x; i < d; i += blockDim.x) yr[i] = w[i] * (xr[i] * rs);
    }
}
static moe_status moe__cuda_rmsnorm_fwd(moe_ctx *ctx, const moe_real *x, int64_t ldx, const moe_real *w, int64_t rows, int64_t d,
                                        moe_real eps, moe_real *y, int64_t ldy, moe_real *rstd) {
    if (rows <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_rmsnorm_fwd_rows, moe__cuda_blocks(rows, 1), x, ldx, w, rows, d, eps, y, ldy, rstd);
    return MOE_OK;
}

/* One block per row: dot = Σ (dy·w)·(x·rs) / d (block sum), then
   dx += rs·(dy·w − (x·rs)·dot), the CPU's operations element by element. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_rmsnorm_bwd_dx_rows(const moe_real *x, const moe_real *w, const moe_real *rstd, const moe_real *dy, int64_t rows,
                                  int64_t d, moe_real *dx) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const moe_real *xr = x + r * d, *dyr = dy + r * d;
        moe_real *dxr = dx + r * d, rs = rstd[r], dot = 0;
        int64_t i;
        for (i = threadIdx.x; i < d; i += blockDim.x) dot += dyr[i] * w[i] * (xr[i] * rs);
        dot = moe__cuda_block_sum(dot, shm);
        dot /= (moe_real)d;
        for (i = threadIdx.x; i < d; i += blockDim.x) dxr[i] += rs * (dyr[i] * w[i] - xr[i] * rs * dot);
    }
}
/* One thread per (chunk, column): partial[c, i] = Σ dy·(x·rs) over the chunk's MOE__ROW_CHUNK
   rows in order, from 0 (as the CPU's chunk partials). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_rmsnorm_bwd_dw_chunks(const moe_real *x, const moe_real *rstd, const moe_real *dy, int64_t rows, int64_t d,
                                    int64_t nchunks, moe_real *partial) {
    MOE__CUDA_GRID_STRIDE(e, nchunks * d) {
        int64_t c = e / d, i = e - c * d, r = c * MOE__ROW_CHUNK;
        int64_t r1 = r + MOE__ROW_CHUNK < rows ? r + MOE__ROW_CHUNK : rows;
        moe_real p = 0;
        for (; r < r1; r++) p += dy[r * d + i] * (x[r * d + i] * rstd[r]);
        partial[e] = p;
    }
}
static moe_status moe__cuda_rmsnorm_bwd(moe_ctx *ctx, const moe_real *x, const moe_real *w, const moe_real *rstd,
                                        const moe_real *dy, int64_t rows, int64_t d, moe_real *dx, moe_real *dw) {
    int64_t nchunks = (rows + MOE__ROW_CHUNK - 1) / MOE__ROW_CHUNK;
    if (rows <= 0 || d <= 0) return MOE_OK;
    if (dx) MOE__CUDA_LAUNCH(ctx, moe__cuda_rmsnorm_bwd_dx_rows, moe__cuda_blocks(rows, 1), x, w, rstd, dy, rows, d, dx);
    if (dw) {
        moe_real *partial = (moe_real *)moe__dev_scratch(ctx, nchunks * d, sizeof(moe_real), __func__);
        if (!partial) return MOE_ERR_MEMORY;
        MOE__CUDA_LAUNCH(ctx, moe__cuda_rmsnorm_bwd_dw_chunks, moe__cuda_blocks(nchunks * d, MOE__CUDA_THREADS), x, rstd, dy,
                         rows, d, nchunks, partial);
        MOE__CUDA_LAUNCH(ctx, moe__cuda_add_chunk_sums, moe__cuda_blocks(d, MOE__CUDA_THREADS), partial, d, nchunks, dw);
    }
    return MOE_OK;
}

/* ---- softmax, cross-entropy ---- */

/* The max of row x[0..n) over the block (every thread gets it; −inf for n = 0). */
static __device__ moe_real moe__cuda_rows_max(const moe_real *x, int64_t n, float *shm) {
    moe_real m = -INFINITY;
    int64_t i;
    for (i = threadIdx.x; i < n; i += blockDim.x) m = x[i] > m ? x[i] : m;
    return moe__cuda_block_max(m, shm);
}
/* Σ exp(x[i] − shift) over the block (y[i] gets each term when y is not NULL). */
static __device__ moe_real moe__cuda_rows_exp_sum(const moe_real *x, moe_real *y, int64_t n, moe_real shift, float *shm) {
    moe_real s = 0, e;
    int64_t i;
    for (i = threadIdx.x; i < n; i += blockDim.x) {
        e = moe_expf(x[i] - shift);
        if (y) y[i] = e;
        s += e;
    }
    return moe__cuda_block_sum(s, shm);
}

/* One block per row: y = exp(x − max), then y /= Σ y (y may be x). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_softmax_fwd_rows(const moe_real *x, int64_t rows, int64_t d, moe_real *y) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const moe_real *xr = x + r * d;
        moe_real *yr = y + r * d, m = moe__cuda_rows_max(xr, d, shm), s = moe__cuda_rows_exp_sum(xr, yr, d, m, shm);
        int64_t i;
        for (i = threadIdx.x; i < d; i += blockDim.x) yr[i] /= s; /* the same thread wrote yr[i] */
    }
}
static moe_status moe__cuda_softmax_fwd(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t d, moe_real *y) {
    if (rows <= 0 || d <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_softmax_fwd_rows, moe__cuda_blocks(rows, 1), x, rows, d, y);
    return MOE_OK;
}

/* One block per row: dot = Σ dy·y (block sum), dx += y·(dy − dot). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_softmax_bwd_rows(const moe_real *y, const moe_real *dy, int64_t rows, int64_t d, moe_real *dx) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const moe_real *yr = y + r * d, *g = dy + r * d;
        moe_real *dxr = dx + r * d, dot = 0;
        int64_t i;
        for (i = threadIdx.x; i < d; i += blockDim.x) dot += g[i] * yr[i];
        dot = moe__cuda_block_sum(dot, shm);
        for (i = threadIdx.x; i < d; i += blockDim.x) dxr[i] += yr[i] * (g[i] - dot);
    }
}
static moe_status moe__cuda_softmax_bwd(moe_ctx *ctx, const moe_real *y, const moe_real *dy, int64_t rows, int64_t d,
                                        moe_real *dx) {
    if (rows <= 0 || d <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_softmax_bwd_rows, moe__cuda_blocks(rows, 1), y, dy, rows, d, dx);
    return MOE_OK;
}

/* One block per row: lse = max + log Σ exp(x − max); loss[r] = lse − x[target], 0 for an
   ignored row (NaN for a target outside [0, V), which the CPU would read out of bounds). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_xent_fwd_rows(const moe_real *x, const int32_t *targets, int32_t ignore, int64_t rows, int64_t V, moe_real *lse,
                            moe_real *loss) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const moe_real *xr = x + r * V;
        moe_real m = moe__cuda_rows_max(xr, V, shm), l = m + logf(moe__cuda_rows_exp_sum(xr, NULL, V, m, shm));
        if (threadIdx.x == 0) {
            int32_t t = targets[r];
            lse[r] = l;
            loss[r] = t == ignore ? (moe_real)0 : t >= 0 && (int64_t)t < V ? l - xr[t] : (moe_real)NAN;
        }
    }
}
/* One block: thread 0 sums the losses in row order, in moe_real (the CPU's serial sum, so a
   serial loop here); the block counts the rows that are not ignored. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_xent_fwd_total(const moe_real *loss, const int32_t *targets, int32_t ignore, int64_t rows, moe_real *sum,
                             int64_t *count) {
    __shared__ double shm[MOE__CUDA_THREADS / 32];
    double c = 0;
    int64_t r;
    if (blockIdx.x != 0) return; /* (one block is launched) */
    for (r = threadIdx.x; r < rows; r += blockDim.x) c += targets[r] != ignore ? 1.0 : 0.0;
    c = moe__cuda_block_sum_f64(c, shm); /* integers below 2^53: exact in any order */
    if (threadIdx.x == 0) {
        moe_real total = 0;
        for (r = 0; r + 4 <= rows; r += 4) { /* loads issued together, additions in order */
            moe_real a = loss[r], b = loss[r + 1], e = loss[r + 2], f = loss[r + 3];
            total += a;
            total += b;
            total += e;
            total += f;
        }
        for (; r < rows; r++) total += loss[r];
        *sum = total;
        *count = (int64_t)c;
    }
}
static moe_status moe__cuda_xent_fwd(moe_ctx *ctx, const moe_real *x, const int32_t *targets, int32_t ignore, int64_t rows,
                                     int64_t V, moe_real *lse, moe_real *host_sum, int64_t *host_count) {
    moe_real *loss, *d_sum;
    int64_t *d_count;
    if (rows <= 0) {
        *host_sum = 0;
        *host_count = 0;
        return MOE_OK;
    }
    loss = (moe_real *)moe__dev_scratch(ctx, rows, sizeof(moe_real), __func__);
    if (!loss) return MOE_ERR_MEMORY;
    d_count = (int64_t *)moe__dev_scratch(ctx, 1, sizeof(int64_t), __func__);
    if (!d_count) return MOE_ERR_MEMORY;
    d_sum = (moe_real *)moe__dev_scratch(ctx, 1, sizeof(moe_real), __func__);
    if (!d_sum) return MOE_ERR_MEMORY;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_xent_fwd_rows, moe__cuda_blocks(rows, 1), x, targets, ignore, rows, V, lse, loss);
    MOE__CUDA_LAUNCH(ctx, moe__cuda_xent_fwd_total, 1, loss, targets, ignore, rows, d_sum, d_count);
    MOE__TRY(moe__cuda_download(ctx, host_sum, d_sum, sizeof(moe_real)));
    MOE__TRY(moe__cuda_download(ctx, host_count, d_count, sizeof(int64_t)));
    return MOE_OK;
}

/* One block per row that is not ignored: dx += scale·exp(x − lse), then dx[target] −= scale
   (two roundings there, as the CPU; a target outside [0, V) gets no one-hot term). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_xent_bwd_rows(const moe_real *x, const int32_t *targets, int32_t ignore, const moe_real *lse, moe_real scale,
                            int64_t rows, int64_t V, moe_real *dx) {
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const int32_t t = targets[r];
        const moe_real *xr = x + r * V;
        moe_real *dxr = dx + r * V, l = lse[r];
        int64_t i;
        if (t == ignore) continue; /* the same for the whole block: no barriers here */
        for (i = threadIdx.x; i < V; i += blockDim.x) {
            moe_real v = dxr[i] + scale * moe_expf(xr[i] - l);
            if (i == (int64_t)t) v = v - scale;
            dxr[i] = v;
        }
    }
}
static moe_status moe__cuda_xent_bwd(moe_ctx *ctx, const moe_real *x, const int32_t *targets, int32_t ignore, const moe_real *lse,
                                     moe_real scale, int64_t rows, int64_t V, moe_real *dx) {
    if (rows <= 0 || V <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_xent_bwd_rows, moe__cuda_blocks(rows, 1), x, targets, ignore, lse, scale, rows, V, dx);
    return MOE_OK;
}

/* ---- SwiGLU ---- */

/* One thread per element: y[r, c] = silu(gate[r, c])·up[r, c] (up NULL: silu(gate)). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_swiglu_fwd_elems(const moe_real *gate, const moe_real *up, int64_t ld_in, int64_t rows, int64_t cols, moe_real *y,
                               int64_t ld_y) {
    MOE__CUDA_GRID_STRIDE(e, rows * cols) {
        int64_t r = e / cols, c = e - r * cols, in = r * ld_in + c;
        moe_real s = moe_silu_scalar(gate[in]);
        y[r * ld_y + c] = up ? s * up[in] : s;
    }
}
static moe_status moe__cuda_swiglu_fwd(moe_ctx *ctx, const moe_real *gate, const moe_real *up, int64_t ld_in, int64_t rows,
                                       int64_t cols, moe_real *y, int64_t ld_y) {
    if (rows <= 0 || cols <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_swiglu_fwd_elems, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), gate, up, ld_in, rows,
                     cols, y, ld_y);
    return MOE_OK;
}

/* One thread per element: dgate (+)= (dy·up)·silu'(gate), dup (+)= dy·silu(gate) (up NULL:
   dy·silu'(gate); either output NULL: skipped). dy has rows of `cols`. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_swiglu_bwd_elems(const moe_real *gate, const moe_real *up, int64_t ld_in, const moe_real *dy, int64_t rows,
                               int64_t cols, moe_real *dgate, moe_real *dup, int64_t ld_d, int accumulate) {
    MOE__CUDA_GRID_STRIDE(e, rows * cols) {
        int64_t r = e / cols, c = e - r * cols, in = r * ld_in + c, out = r * ld_d + c;
        moe_real g = gate[in], d = dy[e];
        if (dgate) {
            moe_real v = d * (up ? up[in] : (moe_real)1) * moe_silu_grad_scalar(g);
            dgate[out] = accumulate ? dgate[out] + v : v;
        }
        if (dup) {
            moe_real v = d * moe_silu_scalar(g);
            dup[out] = accumulate ? dup[out] + v : v;
        }
    }
}
static moe_status moe__cuda_swiglu_bwd(moe_ctx *ctx, const moe_real *gate, const moe_real *up, int64_t ld_in, const moe_real *dy,
                                       int64_t rows, int64_t cols, moe_real *dgate, moe_real *dup, int64_t ld_d, int accumulate) {
    if (rows <= 0 || cols <= 0 || (!dgate && !dup)) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_swiglu_bwd_elems, moe__cuda_blocks(rows * cols, MOE__CUDA_THREADS), gate, up, ld_in, dy, rows,
                     cols, dgate, dup, ld_d, accumulate);
    return MOE_OK;
}

/* ---- RoPE ---- */

/* One thread per (token, head, pair j): token t's table row is cos_sin + (pos0 + t % T)·dim
   ([dim/2][2] cos, sin); pair j is (x[2j], x[2j+1]) (PAIRS) or (x[j], x[j + dim/2]) (HALVES)
   of the vector at x + (t·heads + h)·head_stride + offset, rotated by moe_rope_rotate with
   sin times `sign` (−1: the inverse). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_rope_pairs(moe_real *x, int64_t tokens, int64_t T, int64_t heads, int64_t head_stride, int64_t offset, int64_t dim,
                         const float *cos_sin, int64_t pos0, int halves, moe_real sign) {
    const int64_t half = dim / 2;
    MOE__CUDA_GRID_STRIDE(e, tokens * heads * half) {
        int64_t vec = e / half, j = e - vec * half, t = vec / heads; /* vec = t·heads + h */
        moe_real *v = x + vec * head_stride + offset;
        const float *row = cos_sin + (pos0 + t % T) * dim;
        int64_t ia = halves ? j : 2 * j, ib = halves ? j + half : 2 * j + 1;
        moe_rope_rotate(&v[ia], &v[ib], (moe_real)row[2 * j], sign * (moe_real)row[2 * j + 1]);
    }
}
static moe_status moe__cuda_rope(moe_ctx *ctx, moe_real *x, int64_t tokens, int64_t T, int64_t heads, int64_t head_stride,
                                 int64_t offset, int64_t dim, const float *cos_sin, int64_t pos0, moe_rope_layout layout,
                                 int inverse) {
    if (tokens <= 0 || heads <= 0 || dim / 2 <= 0) return MOE_OK;
    if (T <= 0) return moe__fail(ctx, MOE_ERR_ARG, "rope: T must be positive, got %lld", (long long)T);
    MOE__CUDA_LAUNCH(ctx, moe__cuda_rope_pairs, moe__cuda_blocks(tokens * heads * (dim / 2), MOE__CUDA_THREADS), x, tokens, T,
                     heads, head_stride, offset, dim, cos_sin, pos0, layout == MOE_ROPE_HALVES ? 1 : 0,
                     inverse ? (moe_real)-1 : (moe_real)1);
    return MOE_OK;
}

/* ---- top-k ---- */

/* Whether (a, ia) ranks strictly before (b, ib) in top-k order: a number before a NaN, a larger
   value first, equal values (−0 == +0) and two NaNs by the lower index; index −1 is "none"
   and ranks last. A strict total order over a row's indices: the k-th pick is the first of
   those that rank after pick k−1, which is the CPU's "largest not yet taken" scan. */
static __device__ int moe__cuda_rows_topk_before(moe_real a, int ia, moe_real b, int ib) {
    int an = a != a, bn = b != b;
    if (ib < 0) return ia >= 0;
    if (ia < 0) return 0;
    if (an != bn) return bn;
    if (!an && a != b) return a > b;
    return ia < ib;
}

/* One block per row, k passes: each thread takes the first-ranked of its strided elements
   that rank after the previous pick, then the block keeps the first-ranked of those (warp
   shuffles, then the 8 warps' candidates through shared memory). The value is x's own bits. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_topk_fwd_rows(const moe_real *x, int64_t rows, int64_t n, int64_t k, moe_real *val, int32_t *idx) {
    __shared__ float cand_v[MOE__CUDA_THREADS / 32];
    __shared__ int cand_i[MOE__CUDA_THREADS / 32];
    const int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5;
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const moe_real *xr = x + r * n;
        moe_real pv = 0; /* the previous pick (pi = −1: none yet) */
        int pi = -1;
        int64_t j;
        for (j = 0; j < k; j++) {
            moe_real bv = 0;
            int bi = -1, w;
            int64_t i;
            for (i = threadIdx.x; i < n; i += blockDim.x) {
                moe_real v = xr[i];
                if (pi >= 0 && !moe__cuda_rows_topk_before(pv, pi, v, (int)i)) continue; /* taken already */
                if (moe__cuda_rows_topk_before(v, (int)i, bv, bi)) bv = v, bi = (int)i;
            }
            for (w = 16; w > 0; w >>= 1) {
                moe_real ov = __shfl_xor_sync(0xffffffffu, bv, w);
                int oi = __shfl_xor_sync(0xffffffffu, bi, w);
                if (moe__cuda_rows_topk_before(ov, oi, bv, bi)) bv = ov, bi = oi;
            }
            __syncthreads(); /* the previous pass may still read the candidates */
            if (lane == 0) cand_v[warp] = bv, cand_i[warp] = bi;
            __syncthreads();
            bv = cand_v[0];
            bi = cand_i[0];
            for (w = 1; w < MOE__CUDA_THREADS / 32; w++)
                if (moe__cuda_rows_topk_before(cand_v[w], cand_i[w], bv, bi)) bv = cand_v[w], bi = cand_i[w];
            if (threadIdx.x == 0) {
                idx[r * k + j] = (int32_t)bi;
                val[r * k + j] = bv;
            }
            pv = bv;
            pi = bi;
        }
    }
}
static moe_status moe__cuda_topk_fwd(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t n, int64_t k, moe_real *val,
                                     int32_t *idx) {
    if (rows <= 0 || k <= 0) return MOE_OK;
    if (k > n || n > INT32_MAX)
        return moe__fail(ctx, MOE_ERR_ARG, "topk: k must be 1..n (n below 2^31), got k %lld of n %lld", (long long)k, (long long)n);
    MOE__CUDA_LAUNCH(ctx, moe__cuda_topk_fwd_rows, moe__cuda_blocks(rows, 1), x, rows, n, k, val, idx);
    return MOE_OK;
}

/* One thread per row: dx[r, idx[r, j]] += dy[r, j] for j in order (repeated indices add in
   the CPU's order). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_topk_bwd_rows(const moe_real *dy, const int32_t *idx, int64_t rows, int64_t n, int64_t k, moe_real *dx) {
    MOE__CUDA_GRID_STRIDE(r, rows) {
        int64_t j;
        for (j = 0; j < k; j++) dx[r * n + idx[r * k + j]] += dy[r * k + j];
    }
}
static moe_status moe__cuda_topk_bwd(moe_ctx *ctx, const moe_real *dy, const int32_t *idx, int64_t rows, int64_t n, int64_t k,
                                     moe_real *dx) {
    if (rows <= 0 || k <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_topk_bwd_rows, moe__cuda_blocks(rows, MOE__CUDA_THREADS), dy, idx, rows, n, k, dx);
    return MOE_OK;
}

/* ============================================================================================
   5. attention — causal attention, decoding over the latent cache, MLA's K/V    >>cu.attention
   ============================================================================================
   v1 (gpu.md §3): direct kernels, one block per output row. A block walks the keys (or, in
   the backward's dk/dv, the queries) its row sees in chunks of MOE__CUDA_THREADS: warp w
   scores chunk items w, w + 8, … (its lanes stride over the features, then a shuffle tree
   sums them), the chunk's scores sit in shared memory, and thread t owns the output
   features t, t + 256, … across all chunks, so every sum has a fixed order and no atomics
   are needed. The forward and the decode use an online softmax (running max m and sum l
   per row, rescaled per chunk, as the CPU's tiles): no T×T matrix is stored. The backward
   recomputes p = exp(scale·q·k − lse) from the forward's lse; dq is owned by a block per
   query, dk and dv by a block per key, each summing its chunks in order in a device temp
   and adding to the output once. */

#define MOE__CUDA_ATTENTION_CHUNK MOE__CUDA_THREADS /* keys (or queries) scored per step */
#define MOE__CUDA_ATTENTION_WARPS (MOE__CUDA_THREADS / 32)

/* Σ_d a[d]·b[d] over n features by one warp: lane l sums d = l, l + 32, …, then a shuffle
   tree; every lane gets the same bits. */
static __device__ float moe__cuda_attention_warp_dot(const moe_real *a, const moe_real *b, int64_t n) {
    int lane = (int)threadIdx.x & 31, w;
    float s = 0.0f;
    int64_t d;
    for (d = lane; d < n; d += 32) s += a[d] * b[d];
    for (w = 16; w > 0; w >>= 1) s += __shfl_xor_sync(0xffffffffu, s, w);
    return s;
}

/* One query row (the whole block calls it): scores scale·(qi · key j) for keys j < nk (key j
   at k0 + j·ldk, value j at v0 + j·ldv), softmax, out[0..Dv) = Σ_j p_j·value_j; with lse, *lse
   = m + log(l). out holds the running unnormalised sum between chunks (each thread its own
   features; the first chunk overwrites, so out may hold anything on entry). nk ≥ 1. */
static __device__ void moe__cuda_attention_row(const moe_real *qi, const moe_real *k0, int64_t ldk, const moe_real *v0,
                                               int64_t ldv, int64_t nk, int64_t Dk, int64_t Dv, float scale, moe_real *out,
                                               moe_real *lse, float *sc, float *shm) {
    const int tid = (int)threadIdx.x, warp = tid >> 5, lane = tid & 31;
    float m = -INFINITY, l = 0.0f;
    int64_t j0, d;
    for (j0 = 0; j0 < nk; j0 += MOE__CUDA_ATTENTION_CHUNK) {
        const int cn = (int)(nk - j0 < MOE__CUDA_ATTENTION_CHUNK ? nk - j0 : MOE__CUDA_ATTENTION_CHUNK);
        float s, mnew, corr, e, csum;
        int jj;
        for (jj = warp; jj < cn; jj += MOE__CUDA_ATTENTION_WARPS) {
            float dot = moe__cuda_attention_warp_dot(qi, k0 + (j0 + jj) * ldk, Dk);
            if (lane == 0) sc[jj] = dot * scale;
        }
        __syncthreads();
        s = tid < cn ? sc[tid] : -INFINITY;
        mnew = fmaxf(m, moe__cuda_block_max(s, shm));
        corr = j0 == 0 ? 0.0f : moe_expf(m - mnew);
        e = tid < cn ? moe_expf(s - mnew) : 0.0f;
        csum = moe__cuda_block_sum(e, shm);
        l = l * corr + csum;
        if (tid < cn) sc[tid] = e; /* each thread rewrites only the slot it read */
        __syncthreads();
        for (d = tid; d < Dv; d += MOE__CUDA_THREADS) {
            float acc = 0.0f;
            for (jj = 0; jj < cn; jj++) acc += sc[jj] * v0[(j0 + jj) * ldv + d];
            out[d] = j0 == 0 ? acc : out[d] * corr + acc;
        }
        m = mnew;
        __syncthreads(); /* sc is rewritten by the next chunk */
    }
    for (d = tid; d < Dv; d += MOE__CUDA_THREADS) out[d] = out[d] / l;
    if (lse && tid == 0) *lse = m + logf(l);
}

/* Forward: one block per query row r = (b, h, i) of B·H·Tq; query i sees keys 0..Tk − Tq + i. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_fwd_rows(const moe_real *q, const moe_real *k, const moe_real *v, int64_t B, int64_t Tq, int64_t Tk,
                                 int64_t H, int64_t Dk, int64_t Dv, float scale, moe_real *o, moe_real *lse) {
    __shared__ float sc[MOE__CUDA_ATTENTION_CHUNK];
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, B * H * Tq) {
        const int64_t b = r / (H * Tq), h = (r / Tq) % H, i = r % Tq;
        moe__cuda_attention_row(q + ((b * Tq + i) * H + h) * Dk, k + (b * Tk * H + h) * Dk, H * Dk, v + (b * Tk * H + h) * Dv,
                                H * Dv, Tk - Tq + i + 1, Dk, Dv, scale, o + ((b * Tq + i) * H + h) * Dv, lse + r, sc, shm);
    }
}

static moe_status moe__cuda_attention_fwd(moe_ctx *ctx, const moe_real *q, const moe_real *k, const moe_real *v, int64_t B,
                                          int64_t Tq, int64_t Tk, int64_t H, int64_t Dk, int64_t Dv, moe_real scale, moe_real *o,
                                          moe_real *lse) {
    const int64_t rows = B * H * Tq;
    if (Tq < 1 || Tq > Tk) return moe__fail(ctx, MOE_ERR_SHAPE, "attention: want 1 <= Tq <= Tk, got %lld and %lld", (long long)Tq, (long long)Tk);
    if (rows <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_fwd_rows, moe__cuda_blocks(rows, 1), q, k, v, B, Tq, Tk, H, Dk, Dv, (float)scale,
                     o, lse);
    return MOE_OK;
}

/* delta[r] = dO_i · O_i for the rows r = (b, h, i) of B·H·T: a block per row. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_delta(const moe_real *o, const moe_real *dout, int64_t B, int64_t T, int64_t H, int64_t Dv,
                              float *delta) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, B * H * T) {
        const int64_t b = r / (H * T), h = (r / T) % H, i = r % T, at = ((b * T + i) * H + h) * Dv;
        float s = 0.0f;
        int64_t d;
        for (d = threadIdx.x; d < Dv; d += MOE__CUDA_THREADS) s += dout[at + d] * o[at + d];
        s = moe__cuda_block_sum(s, shm);
        if (threadIdx.x == 0) delta[r] = s;
    }
}

/* dq: one block per query row r = (b, h, i): dq_i += scale·Σ_{j ≤ i} p_ij·(dO_i·v_j − delta_i)·k_j,
   the chunks summed in order in acc [B·H·T, Dk] (a temp), then added once. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_bwd_dq(const moe_real *q, const moe_real *k, const moe_real *v, const moe_real *lse,
                               const moe_real *dout, const float *delta, int64_t B, int64_t T, int64_t H, int64_t Dk,
                               int64_t Dv, float scale, float *acc, moe_real *dq) {
    __shared__ float ds[MOE__CUDA_ATTENTION_CHUNK];
    const int tid = (int)threadIdx.x, warp = tid >> 5, lane = tid & 31;
    MOE__CUDA_BLOCK_STRIDE(r, B * H * T) {
        const int64_t b = r / (H * T), h = (r / T) % H, i = r % T, nk = i + 1;
        const moe_real *qi = q + ((b * T + i) * H + h) * Dk, *doi = dout + ((b * T + i) * H + h) * Dv;
        const moe_real *k0 = k + (b * T * H + h) * Dk, *v0 = v + (b * T * H + h) * Dv;
        const float lse_i = lse[r], delta_i = delta[r];
        float *acc_r = acc + r * Dk;
        moe_real *dq_i = dq + ((b * T + i) * H + h) * Dk;
        int64_t j0, d;
        for (j0 = 0; j0 < nk; j0 += MOE__CUDA_ATTENTION_CHUNK) {
            const int cn = (int)(nk - j0 < MOE__CUDA_ATTENTION_CHUNK ? nk - j0 : MOE__CUDA_ATTENTION_CHUNK);
            int jj;
            for (jj = warp; jj < cn; jj += MOE__CUDA_ATTENTION_WARPS) {
                float dot = moe__cuda_attention_warp_dot(qi, k0 + (j0 + jj) * H * Dk, Dk);
                float dp = moe__cuda_attention_warp_dot(doi, v0 + (j0 + jj) * H * Dv, Dv);
                if (lane == 0) {
                    float p = moe_expf(dot * scale - lse_i);
                    ds[jj] = p * (dp - delta_i) * scale;
                }
            }
            __syncthreads();
            for (d = tid; d < Dk; d += MOE__CUDA_THREADS) {
                float a = 0.0f;
                for (jj = 0; jj < cn; jj++) a += ds[jj] * k0[(j0 + jj) * H * Dk + d];
                acc_r[d] = j0 == 0 ? a : acc_r[d] + a;
            }
            __syncthreads(); /* ds is rewritten by the next chunk */
        }
        for (d = tid; d < Dk; d += MOE__CUDA_THREADS) dq_i[d] += acc_r[d];
    }
}

/* dk, dv: one block per key row r = (b, h, j): over the queries i ≥ j,
   dk_j += scale·Σ_i p_ij·(dO_i·v_j − delta_i)·q_i and dv_j += Σ_i p_ij·dO_i, the chunks summed in
   order in dk_acc [B·H·T, Dk] / dv_acc [B·H·T, Dv] (temps), then added once; dk or dv NULL
   (then its acc is NULL too) is skipped. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_bwd_dkdv(const moe_real *q, const moe_real *k, const moe_real *v, const moe_real *lse,
                                 const moe_real *dout, const float *delta, int64_t B, int64_t T, int64_t H, int64_t Dk,
                                 int64_t Dv, float scale, float *dk_acc, float *dv_acc, moe_real *dk, moe_real *dv) {
    __shared__ float ps[MOE__CUDA_ATTENTION_CHUNK];
    __shared__ float ds[MOE__CUDA_ATTENTION_CHUNK];
    const int tid = (int)threadIdx.x, warp = tid >> 5, lane = tid & 31;
    MOE__CUDA_BLOCK_STRIDE(r, B * H * T) {
        const int64_t b = r / (H * T), h = (r / T) % H, j = r % T, bh = b * H + h;
        const moe_real *kj = k + ((b * T + j) * H + h) * Dk, *vj = v + ((b * T + j) * H + h) * Dv;
        const moe_real *q0 = q + (b * T * H + h) * Dk, *do0 = dout + (b * T * H + h) * Dv;
        int64_t i0, d;
        for (i0 = j; i0 < T; i0 += MOE__CUDA_ATTENTION_CHUNK) {
            const int cn = (int)(T - i0 < MOE__CUDA_ATTENTION_CHUNK ? T - i0 : MOE__CUDA_ATTENTION_CHUNK);
            int ii;
            for (ii = warp; ii < cn; ii += MOE__CUDA_ATTENTION_WARPS) {
                const int64_t i = i0 + ii;
                float dot = moe__cuda_attention_warp_dot(q0 + i * H * Dk, kj, Dk);
                float dp = moe__cuda_attention_warp_dot(do0 + i * H * Dv, vj, Dv);
                if (lane == 0) {
                    float p = moe_expf(dot * scale - lse[bh * T + i]);
                    ps[ii] = p;
                    ds[ii] = p * (dp - delta[bh * T + i]) * scale;
                }
            }
            __syncthreads();
            if (dk)
                for (d = tid; d < Dk; d += MOE__CUDA_THREADS) {
                    float a = 0.0f;
                    for (ii = 0; ii < cn; ii++) a += ds[ii] * q0[(i0 + ii) * H * Dk + d];
                    dk_acc[r * Dk + d] = i0 == j ? a : dk_acc[r * Dk + d] + a;
                }
            if (dv)
                for (d = tid; d < Dv; d += MOE__CUDA_THREADS) {
                    float a = 0.0f;
                    for (ii = 0; ii < cn; ii++) a += ps[ii] * do0[(i0 + ii) * H * Dv + d];
                    dv_acc[r * Dv + d] = i0 == j ? a : dv_acc[r * Dv + d] + a;
                }
            __syncthreads(); /* ps and ds are rewritten by the next chunk */
        }
        if (dk)
            for (d = tid; d < Dk; d += MOE__CUDA_THREADS) dk[((b * T + j) * H + h) * Dk + d] += dk_acc[r * Dk + d];
        if (dv)
            for (d = tid; d < Dv; d += MOE__CUDA_THREADS) dv[((b * T + j) * H + h) * Dv + d] += dv_acc[r * Dv + d];
    }
}

static moe_status moe__cuda_attention_bwd(moe_ctx *ctx, const moe_real *q, const moe_real *k, const moe_real *v,
                                          const moe_real *o, const moe_real *lse, const moe_real *dout, int64_t B, int64_t T,
                                          int64_t H, int64_t Dk, int64_t Dv, moe_real scale, moe_real *dq, moe_real *dk,
                                          moe_real *dv) {
    const int64_t rows = B * H * T;
    const int64_t blocks = moe__cuda_blocks(rows, 1);
    float *delta, *dq_acc, *dk_acc = NULL, *dv_acc = NULL;
    if (rows <= 0 || (!dq && !dk && !dv)) return MOE_OK;
    if (!(delta = (float *)moe__dev_scratch(ctx, rows, sizeof(float), __func__))) return MOE_ERR_MEMORY;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_delta, blocks, o, dout, B, T, H, Dv, delta);
    if (dq) {
        if (!(dq_acc = (float *)moe__dev_scratch(ctx, rows * Dk, sizeof(float), __func__))) return MOE_ERR_MEMORY;
        MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_bwd_dq, blocks, q, k, v, lse, dout, delta, B, T, H, Dk, Dv, (float)scale,
                         dq_acc, dq);
    }
    if (dk || dv) {
        if (dk && !(dk_acc = (float *)moe__dev_scratch(ctx, rows * Dk, sizeof(float), __func__))) return MOE_ERR_MEMORY;
        if (dv && !(dv_acc = (float *)moe__dev_scratch(ctx, rows * Dv, sizeof(float), __func__))) return MOE_ERR_MEMORY;
        MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_bwd_dkdv, blocks, q, k, v, lse, dout, delta, B, T, H, Dk, Dv, (float)scale,
                         dk_acc, dv_acc, dk, dv);
    }
    return MOE_OK;
}

/* Decode over the latent cache: one block per (token t, head h) pair of n·H; the pair sees
   cache rows 0..pos0 + t (keys of width R, values their first `width` features). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_decode_pairs(const moe_real *qc, const moe_real *cache, int64_t n, int64_t H, int64_t R,
                                     int64_t width, int64_t pos0, float scale, moe_real *ob) {
    __shared__ float sc[MOE__CUDA_ATTENTION_CHUNK];
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(pair, n * H) {
        moe__cuda_attention_row(qc + pair * R, cache, R, cache, R, pos0 + pair / H + 1, R, width, scale, ob + pair * width, NULL,
                                sc, shm);
    }
}

static moe_status moe__cuda_attention_decode(moe_ctx *ctx, const moe_real *qc, const moe_real *cache, int64_t n, int64_t H,
                                             int64_t R, int64_t width, int64_t pos0, moe_real scale, moe_real *ob) {
    if (n * H <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_decode_pairs, moe__cuda_blocks(n * H, 1), qc, cache, n, H, R, width, pos0,
                     (float)scale, ob);
    return MOE_OK;
}

/* ---- MLA: keys and values from the expanded latent ---- */

/* Element e of the n·H rows of [k (dn + dr) ; v (dv)]: k_nope and v copied from kvb, k_pe from
   the token's shared kpe row. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_split_kv(const moe_real *kvb, const moe_real *kpe, int64_t ld_kpe, int64_t n, int64_t H, int64_t dn,
                                 int64_t dr, int64_t dv, moe_real *k, moe_real *v) {
    const int64_t dqk = dn + dr, w = dqk + dv;
    MOE__CUDA_GRID_STRIDE(e, n * H * w) {
        const int64_t row = e / w, c = e % w; /* row = t·H + h */
        if (c < dn)
            k[row * dqk + c] = kvb[row * (dn + dv) + c];
        else if (c < dqk)
            k[row * dqk + c] = kpe[(row / H) * ld_kpe + (c - dn)];
        else
            v[row * dv + (c - dqk)] = kvb[row * (dn + dv) + dn + (c - dqk)];
    }
}

static moe_status moe__cuda_mla_split_kv(moe_ctx *ctx, const moe_real *kvb, const moe_real *kpe, int64_t ld_kpe, int64_t n,
                                         int64_t H, int64_t dn, int64_t dr, int64_t dv, moe_real *k, moe_real *v) {
    const int64_t total = n * H * (dn + dr + dv);
    if (total <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_split_kv, moe__cuda_blocks(total, MOE__CUDA_THREADS), kvb, kpe, ld_kpe, n, H, dn,
                     dr, dv, k, v);
    return MOE_OK;
}

/* dkvb [n·H, dn + dv] = [dk_nope ; dv], element by element. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_merge_kvb(const moe_real *dk, const moe_real *dv, int64_t n, int64_t H, int64_t dn, int64_t dr,
                                  int64_t dv_dim, moe_real *dkvb) {
    const int64_t w = dn + dv_dim;
    MOE__CUDA_GRID_STRIDE(e, n * H * w) {
        const int64_t row = e / w, c = e % w;
        dkvb[e] = c < dn ? dk[row * (dn + dr) + c] : dv[row * dv_dim + (c - dn)];
    }
}
/* dkpe[t, j] += dk_pe of head 0, then of head 1, … (each addition rounded): a thread per
   element, looping over the heads in order. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_attention_merge_kpe(const moe_real *dk, int64_t n, int64_t H, int64_t dn, int64_t dr, moe_real *dkpe) {
    MOE__CUDA_GRID_STRIDE(e, n * dr) {
        const int64_t t = e / dr, j = e % dr;
        float acc = dkpe[e];
        int64_t h;
        for (h = 0; h < H; h++) acc = acc + dk[(t * H + h) * (dn + dr) + dn + j];
        dkpe[e] = acc;
    }
}

static moe_status moe__cuda_mla_merge_kv(moe_ctx *ctx, const moe_real *dk, const moe_real *dv, int64_t n, int64_t H, int64_t dn,
                                         int64_t dr, int64_t dv_dim, moe_real *dkvb, moe_real *dkpe) {
    const int64_t total = n * H * (dn + dv_dim);
    if (total > 0)
        MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_merge_kvb, moe__cuda_blocks(total, MOE__CUDA_THREADS), dk, dv, n, H, dn, dr,
                         dv_dim, dkvb);
    if (n * dr > 0 && H > 0)
        MOE__CUDA_LAUNCH(ctx, moe__cuda_attention_merge_kpe, moe__cuda_blocks(n * dr, MOE__CUDA_THREADS), dk, n, H, dn, dr, dkpe);
    return MOE_OK;
}

/* ============================================================================================
   6. moe — router, balance loss, dispatch plan, gather / combine                      >>cu.moe
   ============================================================================================
   The router runs a block per token: scores, keys and flags in shared memory (at most
   MOE__CUDA_MOE_MAX_E experts), every selection a block-wide argmax with the CPU scan's
   rule, so the choices are the CPU's for the same scores. The dispatch plan and the inverse
   list of scatter_add_rows are stable counting sorts on the host (the counts must reach the
   host anyway); every sum runs in the CPU's order, or in a fixed block order where the
   contract allows it (router_bwd, expert_gate_bwd). No float atomics. */

#define MOE__CUDA_MOE_MAX_E 1024       /* experts per router block (shared memory) */
#define MOE__CUDA_MOE_NONE 0x7fffffff  /* "no candidate" in the block argmax */

/* Is candidate (ka, ia) ahead of (kb, ib): a larger key, ties to the lower index; none last. */
static __device__ int moe__cuda_moe_ahead(double ka, int ia, double kb, int ib) {
    if (ia == MOE__CUDA_MOE_NONE) return 0;
    if (ib == MOE__CUDA_MOE_NONE) return 1;
    return ka > kb || (ka == kb && ia < ib);
}

/* The CPU's scan "be = the first eligible e; then be = e wherever key[e] > key[be]" over the
   e < n with skip[e] == 0, as a block reduction: the first eligible when its key is NaN, else
   the largest non-NaN key, ties to the lower index (MOE__CUDA_MOE_NONE when nothing is
   eligible). Every thread of the block calls it and gets the result; key and skip must be
   written before the call (and a __syncthreads). red_* hold MOE__CUDA_THREADS / 32 values. */
static __device__ int moe__cuda_moe_argmax(const double *key, const unsigned char *skip, int n, double *red_k, int *red_i,
                                           int *red_f) {
    const int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5;
    double bk = -INFINITY;
    int bi = MOE__CUDA_MOE_NONE, first = MOE__CUDA_MOE_NONE, e, w;
    for (e = (int)threadIdx.x; e < n; e += MOE__CUDA_THREADS) { /* e ascending: strict > keeps the lower index */
        double k = key[e];
        if (skip[e]) continue;
        if (first == MOE__CUDA_MOE_NONE) first = e;
        if (k != k) continue; /* a NaN never replaces the best */
        if (bi == MOE__CUDA_MOE_NONE || k > bk) {
            bk = k;
            bi = e;
        }
    }
    for (w = 16; w > 0; w >>= 1) {
        double ok = __shfl_xor_sync(0xffffffffu, bk, w);
        int oi = __shfl_xor_sync(0xffffffffu, bi, w), of = __shfl_xor_sync(0xffffffffu, first, w);
        if (moe__cuda_moe_ahead(ok, oi, bk, bi)) {
            bk = ok;
            bi = oi;
        }
        first = of < first ? of : first;
    }
    __syncthreads(); /* red_* may still be read by a previous call */
    if (lane == 0) {
        red_k[warp] = bk;
        red_i[warp] = bi;
        red_f[warp] = first;
    }
    __syncthreads();
    bk = red_k[0];
    bi = red_i[0];
    first = red_f[0];
    for (w = 1; w < MOE__CUDA_THREADS / 32; w++) {
        if (moe__cuda_moe_ahead(red_k[w], red_i[w], bk, bi)) {
            bk = red_k[w];
            bi = red_i[w];
        }
        first = red_f[w] < first ? red_f[w] : first;
    }
    if (first != MOE__CUDA_MOE_NONE && key[first] != key[first]) return first;
    return bi;
}

/* router_fwd: a block per token (grid stride). Scores (sigmoid per element; softmax: block
   max, e^(z − max), the sum in the CPU's order: 8 interleaved partial sums over the full
   octets added ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)), then the tail in order),
   keys s + bias in double, group scores one thread per group, the kept groups and the K
   choices by block argmax; thread 0 writes the choices, sel_sum and the gates in order. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_router_fwd_kernel(const moe_real *z, const moe_real *bias, int64_t n, int E, int K, int G, int topk_group,
                            int use_groups, int noaux, int softmax, int norm, moe_real Rs, moe_real *s, int32_t *chosen,
                            moe_real *gates, moe_real *sel_sum) {
    __shared__ double key[MOE__CUDA_MOE_MAX_E], gscore[MOE__CUDA_MOE_MAX_E];
    __shared__ moe_real sc[MOE__CUDA_MOE_MAX_E];
    __shared__ unsigned char taken[MOE__CUDA_MOE_MAX_E], keep[MOE__CUDA_MOE_MAX_E];
    __shared__ int ch[MOE__CUDA_MOE_MAX_E];
    __shared__ float red[MOE__CUDA_THREADS / 32], lane_sum[8];
    __shared__ moe_real tot_sh;
    __shared__ double red_k[MOE__CUDA_THREADS / 32];
    __shared__ int red_i[MOE__CUDA_THREADS / 32], red_f[MOE__CUDA_THREADS / 32];
    const int tid = (int)threadIdx.x;
    MOE__CUDA_BLOCK_STRIDE(t, n) {
        const moe_real *zt = z + t * E;
        moe_real *st = s + t * E;
        int e, g, k;
        if (softmax) {
            float m = -INFINITY;
            for (e = tid; e < E; e += MOE__CUDA_THREADS) m = fmaxf(m, zt[e]);
            m = moe__cuda_block_max(m, red);
            for (e = tid; e < E; e += MOE__CUDA_THREADS) sc[e] = moe_expf(zt[e] - m);
            __syncthreads();
            if (tid < 8) {
                moe_real a = 0;
                for (e = 0; e + 8 <= E; e += 8) a += sc[e + tid];
                lane_sum[tid] = a;
            }
            __syncthreads();
            if (tid == 0) {
                moe_real tot = ((lane_sum[0] + lane_sum[4]) + (lane_sum[2] + lane_sum[6])) +
                               ((lane_sum[1] + lane_sum[5]) + (lane_sum[3] + lane_sum[7]));
                for (e = E & ~7; e < E; e++) tot += sc[e];
                tot_sh = tot;
            }
            __syncthreads();
            for (e = tid; e < E; e += MOE__CUDA_THREADS) {
                sc[e] = sc[e] / tot_sh;
                st[e] = sc[e];
            }
        } else {
            for (e = tid; e < E; e += MOE__CUDA_THREADS) {
                sc[e] = moe_sigmoid_scalar(zt[e]); /* 1/(1 + e^−z): the CPU's values */
                st[e] = sc[e];
            }
        }
        for (e = tid; e < E; e += MOE__CUDA_THREADS) {
            key[e] = (double)sc[e] + (noaux && bias ? (double)bias[e] : 0.0);
            taken[e] = 0;
        }
        __syncthreads();
        if (use_groups) {
            const int per = E / G;
            for (g = tid; g < G; g += MOE__CUDA_THREADS) {
                double best = -INFINITY, second = -INFINITY;
                for (e = g * per; e < (g + 1) * per; e++) {
                    if (key[e] > best) {
                        second = best;
                        best = key[e];
                    } else if (key[e] > second) {
                        second = key[e];
                    }
                }
                gscore[g] = noaux ? best + (per > 1 ? second : 0.0) : best;
                keep[g] = 0;
            }
            __syncthreads();
            for (k = 0; k < topk_group; k++) {
                int bg = moe__cuda_moe_argmax(gscore, keep, G, red_k, red_i, red_f);
                if (tid == 0 && bg != MOE__CUDA_MOE_NONE) keep[bg] = 1;
                __syncthreads();
            }
            for (e = tid; e < E; e += MOE__CUDA_THREADS)
                if (!keep[e / per]) key[e] = -INFINITY;
            __syncthreads();
        }
        for (k = 0; k < K; k++) {
            int be = moe__cuda_moe_argmax(key, taken, E, red_k, red_i, red_f);
            if (be == MOE__CUDA_MOE_NONE) be = 0; /* K ≤ E: not reached (the CPU writes 0 too) */
            if (tid == 0) {
                ch[k] = be;
                taken[be] = 1;
            }
            __syncthreads();
        }
        if (tid == 0) {
            moe_real sum = 0;
            for (k = 0; k < K; k++) sum += sc[ch[k]];
            sel_sum[t] = sum;
            for (k = 0; k < K; k++) {
                moe_real gk = sc[ch[k]];
                chosen[t * K + k] = (int32_t)ch[k];
                gates[t * K + k] = Rs * (norm ? gk / sum : gk);
            }
        }
        __syncthreads(); /* the next token rewrites the shared arrays */
    }
}

static moe_status moe__cuda_router_fwd(moe_ctx *ctx, const moe_config *cfg, const moe_real *z, const moe_real *bias, int64_t n,
                                       moe_real *s, int32_t *chosen, moe_real *gates, moe_real *sel_sum) {
    const int64_t E = cfg->n_routed_experts, K = cfg->num_experts_per_tok, G = cfg->n_group, tg = cfg->topk_group;
    const int use_groups = cfg->topk_method != MOE_TOPK_GREEDY && G > 1 && tg < G;
    if (E > MOE__MAX_EXPERTS) return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "router: at most %d experts", MOE__MAX_EXPERTS);
    if (E > MOE__CUDA_MOE_MAX_E)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "router: at most %d experts on CUDA", MOE__CUDA_MOE_MAX_E);
    if (E < 1 || K < 0 || K > E)
        return moe__fail(ctx, MOE_ERR_ARG, "router: %lld experts per token of %lld", (long long)K, (long long)E);
    if (use_groups && (E % G != 0 || tg < 0))
        return moe__fail(ctx, MOE_ERR_ARG, "router: n_group (%lld) must divide n_routed_experts (%lld)", (long long)G,
                         (long long)E);
    if (n <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_router_fwd_kernel, moe__cuda_blocks(n, 1), z, bias, n, (int)E, (int)K,
                     use_groups ? (int)G : 1, use_groups ? (int)tg : 0, use_groups, cfg->topk_method == MOE_TOPK_NOAUX_TC,
                     cfg->scoring_func == MOE_SCORING_SOFTMAX, cfg->norm_topk_prob != 0, (moe_real)cfg->routed_scaling_factor,
                     s, chosen, gates, sel_sum);
    return MOE_OK;
}

/* router_bwd: a block per token (grid stride). ds in shared memory: thread 0 adds the gates'
   terms in the CPU's order, then each thread its experts' balance terms and the Jacobian
   (the sums over E are block sums). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_router_bwd_kernel(const moe_real *s, const int32_t *chosen, const moe_real *sel_sum, const moe_real *dgates,
                            const moe_real *f, moe_real w, int use_balance, int64_t n, int64_t T, int E, int K, int norm,
                            int sigmoid, moe_real Rs, moe_real *dz) {
    __shared__ moe_real ds[MOE__CUDA_MOE_MAX_E];
    __shared__ float red[MOE__CUDA_THREADS / 32];
    const int tid = (int)threadIdx.x;
    MOE__CUDA_BLOCK_STRIDE(t, n) {
        const moe_real *st = s + t * E, *dg = dgates + t * K;
        const int32_t *ch = chosen + t * K;
        moe_real *dzt = dz + t * E;
        int e, k;
        for (e = tid; e < E; e += MOE__CUDA_THREADS) ds[e] = 0;
        __syncthreads();
        if (tid == 0) {
            if (norm) {
                moe_real sum = sel_sum[t], corr = 0;
                for (k = 0; k < K; k++) corr += dg[k] * st[ch[k]] / sum;
                for (k = 0; k < K; k++) ds[ch[k]] += Rs / sum * (dg[k] - corr);
            } else {
                for (k = 0; k < K; k++) ds[ch[k]] += Rs * dg[k];
            }
        }
        __syncthreads();
        if (use_balance) {
            const moe_real *ft = f + (t / T) * E;
            if (sigmoid) {
                moe_real tot = 0, dot = 0;
                for (e = tid; e < E; e += MOE__CUDA_THREADS) tot += st[e];
                tot = moe__cuda_block_sum(tot, red);
                for (e = tid; e < E; e += MOE__CUDA_THREADS) dot += ft[e] * st[e] / tot;
                dot = moe__cuda_block_sum(dot, red);
                for (e = tid; e < E; e += MOE__CUDA_THREADS) ds[e] += w * (ft[e] - dot) / tot;
            } else {
                for (e = tid; e < E; e += MOE__CUDA_THREADS) ds[e] += w * ft[e];
            }
        }
        if (sigmoid) {
            for (e = tid; e < E; e += MOE__CUDA_THREADS) dzt[e] = ds[e] * (st[e] * ((moe_real)1 - st[e]));
        } else {
            moe_real dot = 0;
            for (e = tid; e < E; e += MOE__CUDA_THREADS) dot += ds[e] * st[e];
            dot = moe__cuda_block_sum(dot, red);
            for (e = tid; e < E; e += MOE__CUDA_THREADS) dzt[e] = st[e] * (ds[e] - dot);
        }
        __syncthreads(); /* the next token rewrites ds */
    }
}

static moe_status moe__cuda_router_bwd(moe_ctx *ctx, const moe_config *cfg, const moe_real *s, const int32_t *chosen,
                                       const moe_real *sel_sum, const moe_real *dgates, const moe_real *f, moe_real balance_scale,
                                       int64_t n, int64_t T, moe_real *dz) {
    const int64_t E = cfg->n_routed_experts, K = cfg->num_experts_per_tok;
    const int use_balance = f && balance_scale != 0;
    if (E > MOE__CUDA_MOE_MAX_E)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "router_bwd: at most %d experts on CUDA", MOE__CUDA_MOE_MAX_E);
    if (K < 0 || K > E)
        return moe__fail(ctx, MOE_ERR_ARG, "router_bwd: %lld experts per token of %lld", (long long)K, (long long)E);
    if (use_balance && T < 1) return moe__fail(ctx, MOE_ERR_ARG, "router_bwd: %lld tokens per sequence", (long long)T);
    if (n <= 0 || E < 1) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_router_bwd_kernel, moe__cuda_blocks(n, 1), s, chosen, sel_sum, dgates, f, balance_scale,
                     use_balance, n, use_balance ? T : 1, (int)E, (int)K, cfg->norm_topk_prob != 0,
                     cfg->scoring_func == MOE_SCORING_SIGMOID, (moe_real)cfg->routed_scaling_factor, dz);
    return MOE_OK;
}

/* balance_loss, step 1: how many slots of sequence b chose expert e, cnt [B, E] (integer
   atomics: the counts do not depend on the order). A thread per (token, slot). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_balance_count_kernel(const int32_t *chosen, int64_t slots, int64_t TK, int64_t E, int32_t *cnt) {
    MOE__CUDA_GRID_STRIDE(i, slots) {
        int64_t e = chosen[i];
        if (e >= 0 && e < E) atomicAdd(&cnt[(i / TK) * E + e], 1);
    }
}
/* step 2 (sigmoid scores): Σ_j s_tj of each token, a thread per token, j in order (the CPU's sum). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_balance_tot_kernel(const moe_real *s, int64_t n, int64_t E, moe_real *tot) {
    MOE__CUDA_GRID_STRIDE(t, n) {
        const moe_real *st = s + t * E;
        moe_real sum = 0;
        int64_t j;
        for (j = 0; j < E; j++) sum += st[j];
        tot[t] = sum;
    }
}
/* step 3, a thread per (b, e): f_be = E/(K·T) added cnt times (the CPU's additions of equal
   terms, so its bits), P_be = Σ_t s_te / tot_t with t in order, term = f·P/T. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_balance_fp_kernel(const moe_real *s, const moe_real *tot, const int32_t *cnt, int64_t B, int64_t T, int64_t E,
                            moe_real inc, moe_real *f, moe_real *term) {
    MOE__CUDA_GRID_STRIDE(i, B * E) {
        const int64_t b = i / E, e = i - b * E;
        moe_real fv = 0, P = 0;
        int64_t c, t;
        for (c = 0; c < cnt[i]; c++) fv += inc;
        for (t = b * T; t < (b + 1) * T; t++) P += tot ? s[t * E + e] / tot[t] : s[t * E + e];
        f[i] = fv;
        term[i] = fv * P / (moe_real)T;
    }
}

static moe_status moe__cuda_balance_loss(moe_ctx *ctx, const moe_config *c, const moe_real *s, const int32_t *chosen, int64_t B,
                                         int64_t T, moe_real *f, moe_real *host_loss) {
    const int64_t E = c->n_routed_experts, K = c->num_experts_per_tok, n = B * T, BE = B * E;
    const int sigmoid = c->scoring_func == MOE_SCORING_SIGMOID;
    moe_real balance = 0, *tot = NULL, *term, *host_term;
    int32_t *cnt;
    int64_t i;
    moe_status st;
    *host_loss = 0;
    if (B < 0 || T < 0 || E < 0 || K < 0)
        return moe__fail(ctx, MOE_ERR_ARG, "balance_loss: B=%lld T=%lld E=%lld K=%lld", (long long)B, (long long)T, (long long)E,
                         (long long)K);
    if (BE == 0) return MOE_OK;
    cnt = (int32_t *)moe__dev_scratch(ctx, BE, sizeof(int32_t), __func__);
    term = (moe_real *)moe__dev_scratch(ctx, BE, sizeof(moe_real), __func__);
    if (!cnt || !term) return MOE_ERR_MEMORY;
    MOE__TRY(moe__cuda_memset(ctx, cnt, 0, (size_t)BE * sizeof(int32_t)));
    if (n * K > 0)
        MOE__CUDA_LAUNCH(ctx, moe__cuda_balance_count_kernel, moe__cuda_blocks(n * K, MOE__CUDA_THREADS), chosen, n * K, T * K, E,
                         cnt);
    if (sigmoid && n > 0) {
        tot = (moe_real *)moe__dev_scratch(ctx, n, sizeof(moe_real), __func__);
        if (!tot) return MOE_ERR_MEMORY;
        MOE__CUDA_LAUNCH(ctx, moe__cuda_balance_tot_kernel, moe__cuda_blocks(n, MOE__CUDA_THREADS), s, n, E, tot);
    }
    MOE__CUDA_LAUNCH(ctx, moe__cuda_balance_fp_kernel, moe__cuda_blocks(BE, MOE__CUDA_THREADS), s, tot, cnt, B, T, E,
                     (moe_real)E / (moe_real)(K * T), f, term);
    host_term = (moe_real *)MOE_MALLOC((size_t)BE * sizeof(moe_real));
    if (!host_term) return moe__fail(ctx, MOE_ERR_MEMORY, "balance_loss: out of host memory");
    st = moe__cuda_download(ctx, host_term, term, (size_t)BE * sizeof(moe_real));
    if (st == MOE_OK) {
        for (i = 0; i < BE; i++) balance += host_term[i]; /* b, then e: the CPU's order */
        *host_loss = balance;
    }
    MOE_FREE(host_term);
    return st;
}

/* dispatch_plan: chosen comes to the host, the CPU's stable counting sort runs there, and
   row_of / slot_of go back (the offsets are host output anyway). Serial over n·k choices. */
static moe_status moe__cuda_dispatch_plan(moe_ctx *ctx, const int32_t *chosen, int64_t n, int64_t k, int64_t E,
                                          int64_t *host_offsets, int32_t *row_of, int32_t *slot_of) {
    const int64_t nk = n * k;
    int32_t *ch, *rows, *slots;
    int64_t *fill, t, e;
    moe_status st;
    if (n < 0 || k < 0 || E < 0 || nk > INT32_MAX)
        return moe__fail(ctx, MOE_ERR_ARG, "dispatch_plan: n=%lld k=%lld E=%lld", (long long)n, (long long)k, (long long)E);
    for (e = 0; e <= E; e++) host_offsets[e] = 0;
    if (nk == 0) return MOE_OK;
    ch = (int32_t *)MOE_MALLOC((size_t)nk * 3 * sizeof(int32_t));
    fill = (int64_t *)MOE_MALLOC((size_t)(E > 0 ? E : 1) * sizeof(int64_t));
    if (!ch || !fill) {
        MOE_FREE(ch);
        MOE_FREE(fill);
        return moe__fail(ctx, MOE_ERR_MEMORY, "dispatch_plan: out of host memory");
    }
    rows = ch + nk;
    slots = rows + nk;
    st = moe__cuda_download(ctx, ch, chosen, (size_t)nk * sizeof(int32_t));
    for (t = 0; st == MOE_OK && t < nk; t++)
        if (ch[t] < 0 || ch[t] >= E)
            st = moe__fail(ctx, MOE_ERR_ARG, "dispatch_plan: expert %d of choice %lld is outside [0, %lld)", (int)ch[t],
                           (long long)t, (long long)E);
    if (st == MOE_OK) {
        for (t = 0; t < nk; t++) host_offsets[ch[t] + 1]++;
        for (e = 0; e < E; e++) {
            host_offsets[e + 1] += host_offsets[e];
            fill[e] = host_offsets[e];
        }
        for (t = 0; t < nk; t++) {
            int64_t r = fill[ch[t]]++;
            rows[t] = (int32_t)r;
            slots[r] = (int32_t)t;
        }
        /* from pageable memory: each copy returns once its source is staged, so freeing is safe */
        st = moe__cuda_copy(ctx, row_of, rows, (size_t)nk * sizeof(int32_t), MOE__H2D);
        if (st == MOE_OK) st = moe__cuda_copy(ctx, slot_of, slots, (size_t)nk * sizeof(int32_t), MOE__H2D);
    }
    MOE_FREE(ch);
    MOE_FREE(fill);
    return st;
}

/* gather_rows: a thread per element of dst (grid stride). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_gather_rows_kernel(const moe_real *src, const int32_t *idx, int32_t div, int64_t rows, int64_t d, moe_real *dst) {
    MOE__CUDA_GRID_STRIDE(i, rows * d) {
        const int64_t r = i / d, c = i - r * d;
        dst[i] = src[(int64_t)(idx[r] / div) * d + c];
    }
}
static moe_status moe__cuda_gather_rows(moe_ctx *ctx, const moe_real *src, const int32_t *idx, int32_t div, int64_t rows, int64_t d,
                                        moe_real *dst) {
    if (div < 1) return moe__fail(ctx, MOE_ERR_ARG, "gather_rows: div = %d", (int)div);
    if (rows <= 0 || d <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_gather_rows_kernel, moe__cuda_blocks(rows * d, MOE__CUDA_THREADS), src, idx, div, rows, d, dst);
    return MOE_OK;
}

/* scatter_add_rows: a thread per (destination row that receives something, column); it adds
   its sources in r order (order: the rows sorted stably by destination, group u's in
   order[start[u] .. start[u + 1])), so each element gets the CPU's additions. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_scatter_add_kernel(const moe_real *src, const int32_t *order, const int32_t *dst_row, const int32_t *start,
                             int64_t U, int64_t d, moe_real *dst) {
    MOE__CUDA_GRID_STRIDE(i, U * d) {
        const int64_t u = i / d, c = i - u * d;
        moe_real *y = dst + (int64_t)dst_row[u] * d + c;
        moe_real v = *y;
        int32_t p;
        for (p = start[u]; p < start[u + 1]; p++) v += src[(int64_t)order[p] * d + c];
        *y = v;
    }
}
/* The inverse list comes from a stable counting sort of idx on the host (one download). */
static moe_status moe__cuda_scatter_add_rows(moe_ctx *ctx, const moe_real *src, const int32_t *idx, int64_t rows, int64_t d,
                                             moe_real *dst) {
    int32_t *h, *order, *dst_row, *start, *dev = NULL;
    int64_t *pos = NULL, S = 0, U = 0, r, v;
    moe_status st;
    if (rows <= 0 || d <= 0) return MOE_OK;
    if (rows > INT32_MAX) return moe__fail(ctx, MOE_ERR_ARG, "scatter_add_rows: %lld rows", (long long)rows);
    /* h: idx [rows], then order [rows], dst_row [U], start [U + 1] (U ≤ rows) */
    h = (int32_t *)MOE_MALLOC(((size_t)rows * 4 + 1) * sizeof(int32_t));
    if (!h) return moe__fail(ctx, MOE_ERR_MEMORY, "scatter_add_rows: out of host memory");
    st = moe__cuda_download(ctx, h, idx, (size_t)rows * sizeof(int32_t));
    for (r = 0; st == MOE_OK && r < rows; r++) {
        if (h[r] < 0)
            st = moe__fail(ctx, MOE_ERR_ARG, "scatter_add_rows: index %d at row %lld", (int)h[r], (long long)r);
        else if ((int64_t)h[r] + 1 > S)
            S = (int64_t)h[r] + 1;
    }
    if (st == MOE_OK) {
        pos = (int64_t *)MOE_MALLOC((size_t)(S + 1) * sizeof(int64_t));
        if (!pos) st = moe__fail(ctx, MOE_ERR_MEMORY, "scatter_add_rows: out of host memory");
    }
    if (st == MOE_OK) {
        memset(pos, 0, (size_t)(S + 1) * sizeof(int64_t));
        for (r = 0; r < rows; r++) pos[h[r] + 1]++;
        for (v = 0; v < S; v++) { /* U: the destinations that receive rows; pos[v]: where v's rows start */
            U += pos[v + 1] > 0;
            pos[v + 1] += pos[v];
        }
        order = h + rows;
        dst_row = order + rows;
        start = dst_row + U;
        U = 0;
        for (v = 0; v < S; v++)
            if (pos[v + 1] > pos[v]) {
                dst_row[U] = (int32_t)v;
                start[U++] = (int32_t)pos[v];
            }
        start[U] = (int32_t)rows;
        for (r = 0; r < rows; r++) order[pos[h[r]]++] = (int32_t)r; /* stable: r ascending */
        dev = (int32_t *)moe__dev_scratch(ctx, rows + 2 * U + 1, sizeof(int32_t), __func__);
        if (!dev) st = MOE_ERR_MEMORY;
        /* from pageable memory: the copy returns once the source is staged, so freeing is safe */
        if (st == MOE_OK) st = moe__cuda_copy(ctx, dev, order, (size_t)(rows + 2 * U + 1) * sizeof(int32_t), MOE__H2D);
    }
    MOE_FREE(pos);
    MOE_FREE(h);
    if (st != MOE_OK) return st;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_scatter_add_kernel, moe__cuda_blocks(U * d, MOE__CUDA_THREADS), src, dev, dev + rows,
                     dev + rows + U, U, d, dst);
    return MOE_OK;
}

/* combine: a thread per element of y (grid stride), y += g·src (or src) for j in order: a
   rounded product, then a rounded sum, as the CPU. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_combine_kernel(const moe_real *src, const int32_t *row_of, const moe_real *gates, int64_t n, int64_t k, int64_t d,
                         moe_real *y) {
    MOE__CUDA_GRID_STRIDE(i, n * d) {
        const int64_t t = i / d, c = i - t * d;
        moe_real v = y[i];
        int64_t j;
        if (gates) {
            for (j = 0; j < k; j++) {
                moe_real p = gates[t * k + j] * src[(int64_t)row_of[t * k + j] * d + c];
                v += p;
            }
        } else {
            for (j = 0; j < k; j++) v += src[(int64_t)row_of[t * k + j] * d + c];
        }
        y[i] = v;
    }
}
static moe_status moe__cuda_combine(moe_ctx *ctx, const moe_real *src, const int32_t *row_of, const moe_real *gates, int64_t n,
                                    int64_t k, int64_t d, moe_real *y) {
    if (n <= 0 || d <= 0 || k <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_combine_kernel, moe__cuda_blocks(n * d, MOE__CUDA_THREADS), src, row_of, gates, n, k, d, y);
    return MOE_OK;
}

/* expert_gate_bwd: a block per row: dgate = Σ dact·act (a block sum), then both rows scaled. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
moe__cuda_expert_gate_bwd_kernel(const moe_real *gate, int64_t rows, int64_t cols, moe_real *dact, moe_real *act,
                                 moe_real *dgate) {
    __shared__ float red[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        moe_real *da = dact + r * cols, *a = act + r * cols, sum = 0, g = gate[r];
        int64_t j;
        for (j = threadIdx.x; j < cols; j += MOE__CUDA_THREADS) sum += da[j] * a[j];
        sum = moe__cuda_block_sum(sum, red); /* every thread has read its elements */
        if (threadIdx.x == 0) dgate[r] = sum;
        for (j = threadIdx.x; j < cols; j += MOE__CUDA_THREADS) {
            da[j] *= g;
            a[j] *= g;
        }
    }
}
static moe_status moe__cuda_expert_gate_bwd(moe_ctx *ctx, const moe_real *gate, int64_t rows, int64_t cols, moe_real *dact,
                                            moe_real *act, moe_real *dgate) {
    if (rows <= 0) return MOE_OK;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_expert_gate_bwd_kernel, moe__cuda_blocks(rows, 1), gate, rows, cols > 0 ? cols : 0, dact, act,
                     dgate);
    return MOE_OK;
}

/* ============================================================================================
   7. optim — sums and norms, AdamW, distillation, the teacher's top-k               >>cu.optim
   ============================================================================================
   Sums keep the CPU's order where its contract states one: sum is a serial sum in index order
   (one thread, fed by its block through shared memory tiles), colsum adds partials of
   MOE__ROW_CHUNK rows in chunk order (the CPU's bits). sumsq sums each chunk in double with a
   block's fixed-order tree. AdamW is element-wise with the CPU's operations in its order
   (IEEE division and square root, no contraction): the CPU's bits. The distillation rows run
   one block per row with float block sums where the CPU sums in float; per-row results come
   down and are added on the host in row order, as the CPU does. The teacher's top-k runs one
   block per row in double, picking the k most likely by k block-wide arg-max rounds in the
   CPU's total order (log-probability descending, ties to the lower id). */

/* ---- sum ---- */

#define MOE__CUDA_OPTIM_SUM_TILE 4096 /* values per shared-memory tile (two tiles: 32 KiB) */

/* One block: the threads load the next tile of x into shared memory while thread 0 adds the
   current one in index order — the CPU's serial sum, value by value. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS) moe__cuda_optim_sum_serial(const moe_real *x, int64_t n, moe_real *out) {
    __shared__ moe_real tile[2][MOE__CUDA_OPTIM_SUM_TILE];
    moe_real s = 0;
    int64_t t0, i;
    int b = 0;
    for (i = threadIdx.x; i < n && i < MOE__CUDA_OPTIM_SUM_TILE; i += blockDim.x) tile[0][i] = x[i];
    __syncthreads();
    for (t0 = 0; t0 < n; t0 += MOE__CUDA_OPTIM_SUM_TILE) {
        const int64_t next = t0 + MOE__CUDA_OPTIM_SUM_TILE;
        const int64_t len = n - t0 < MOE__CUDA_OPTIM_SUM_TILE ? n - t0 : MOE__CUDA_OPTIM_SUM_TILE;
        const int64_t len_next = n - next < MOE__CUDA_OPTIM_SUM_TILE ? n - next : MOE__CUDA_OPTIM_SUM_TILE;
        /* tile[b ^ 1] was last read in the previous round, which ended with a barrier */
        for (i = threadIdx.x; i < len_next; i += blockDim.x) tile[b ^ 1][i] = x[next + i];
        if (threadIdx.x == 0)
            for (i = 0; i < len; i++) s += tile[b][i];
        __syncthreads();
        b ^= 1;
    }
    if (threadIdx.x == 0) *out = s;
}
/* (a serial sum: the contract's order admits no parallel split; about 2–3 ns per value) */
static moe_status moe__cuda_sum(moe_ctx *ctx, const moe_real *x, int64_t n, moe_real *host_sum) {
    moe_real *d_sum;
    if (n <= 0) {
        *host_sum = 0;
        return MOE_OK;
    }
    if (!(d_sum = (moe_real *)moe__dev_scratch(ctx, 1, sizeof(moe_real), __func__))) return MOE_ERR_MEMORY;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_sum_serial, 1, x, n, d_sum);
    return moe__cuda_download(ctx, host_sum, d_sum, sizeof(moe_real));
}

/* ---- sumsq ---- */

/* One block per chunk: part[c] = Σ x² over the chunk in double (block tree: NORMREL against
   the CPU's four interleaved sums). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_optim_sumsq_chunks(const moe_real *x, int64_t n, int64_t chunk, int64_t nchunks, double *part) {
    __shared__ double shm[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(c, nchunks) {
        const moe_real *xc = x + c * chunk;
        const int64_t len = n - c * chunk < chunk ? n - c * chunk : chunk;
        double acc = 0;
        int64_t i;
        for (i = threadIdx.x; i < len; i += blockDim.x) acc += (double)xc[i] * (double)xc[i];
        acc = moe__cuda_block_sum_f64(acc, shm);
        if (threadIdx.x == 0) part[c] = acc;
    }
}
static moe_status moe__cuda_sumsq(moe_ctx *ctx, const moe_real *x, int64_t n, int64_t chunk, double *host_parts) {
    int64_t nchunks;
    double *d_part;
    if (n <= 0) return MOE_OK;
    if (chunk < 1) return moe__fail(ctx, MOE_ERR_ARG, "sumsq: chunk must be >= 1, got %lld", (long long)chunk);
    nchunks = (n + chunk - 1) / chunk;
    if (!(d_part = (double *)moe__dev_scratch(ctx, nchunks, sizeof(double), __func__))) return MOE_ERR_MEMORY;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_sumsq_chunks, moe__cuda_blocks(nchunks, 1), x, n, chunk, nchunks, d_part);
    return moe__cuda_download(ctx, host_parts, d_part, (size_t)nchunks * sizeof(double));
}

/* ---- colsum ---- */

/* One thread per (chunk, column): part[c, j] = Σ x[r, j] over the chunk's MOE__ROW_CHUNK rows
   in order, from 0 (the CPU's chunk partials). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_optim_colsum_chunks(const moe_real *x, int64_t rows, int64_t d, int64_t nchunks, moe_real *part) {
    MOE__CUDA_GRID_STRIDE(e, nchunks * d) {
        int64_t c = e / d, j = e - c * d, r = c * MOE__ROW_CHUNK;
        const int64_t r1 = r + MOE__ROW_CHUNK < rows ? r + MOE__ROW_CHUNK : rows;
        moe_real p = 0;
        for (; r < r1; r++) p += x[r * d + j];
        part[e] = p;
    }
}
static moe_status moe__cuda_colsum(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t d, moe_real *out) {
    const int64_t nchunks = (rows + MOE__ROW_CHUNK - 1) / MOE__ROW_CHUNK;
    moe_real *part;
    if (rows <= 0 || d <= 0) return MOE_OK;
    if (!(part = (moe_real *)moe__dev_scratch(ctx, nchunks * d, sizeof(moe_real), __func__))) return MOE_ERR_MEMORY;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_colsum_chunks, moe__cuda_blocks(nchunks * d, MOE__CUDA_THREADS), x, rows, d, nchunks,
                     part);
    MOE__CUDA_LAUNCH(ctx, moe__cuda_add_chunk_sums, moe__cuda_blocks(d, MOE__CUDA_THREADS), part, d, nchunks, out);
    return MOE_OK;
}

/* ---- AdamW ---- */

/* The step's constants, as the CPU forms them in float (c1 = 1 − β1, c2 = 1 − β2). */
typedef struct moe__cuda_optim_adamw_k {
    float gs, b1, c1, b2, c2, eps, step, inv_bc2;
} moe__cuda_optim_adamw_k;

/* One thread per slab value in [0, end), grid-stride; each thread finds its first value's
   segment by bisection and then walks the segments forward (its values only grow), skipping
   the gaps. Per value, the CPU's operations in its order:
   g ← g·gs; m ← β1·m + (1−β1)·g; v ← β2·v + ((1−β2)·g)·g;
   p ← p − (step·m/(sqrt(v·inv_bc2) + eps) + decay·p); g ← 0 — with the float m and v, stored
   as bf16 when `bf16` (any other moment dtype is f32, as on the CPU). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_optim_adamw_slab(moe_real *p, moe_real *g, void *m, void *v, int bf16, const moe__adamw_segment *seg, int64_t nseg,
                               int64_t end, moe__cuda_optim_adamw_k k) {
    int64_t s = 0, lo = 0, hi = nseg;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    while (lo < hi) { /* the first segment that ends after this thread's first value */
        int64_t mid = lo + (hi - lo) / 2;
        if (seg[mid].start + seg[mid].len <= first) lo = mid + 1;
        else hi = mid;
    }
    s = lo;
    MOE__CUDA_GRID_STRIDE(i, end) {
        float gj, mj, vj, pj, mo, vo;
        while (s < nseg && seg[s].start + seg[s].len <= i) s++;
        if (s == nseg) break;
        if (i < seg[s].start) continue; /* a gap between tensors: untouched */
        if (bf16) {
            mo = moe_bf16_to_f32(((const uint16_t *)m)[i]);
            vo = moe_bf16_to_f32(((const uint16_t *)v)[i]);
        } else {
            mo = ((const float *)m)[i];
            vo = ((const float *)v)[i];
        }
        gj = (float)g[i] * k.gs;
        mj = k.b1 * mo + k.c1 * gj;
        vj = k.b2 * vo + k.c2 * gj * gj;
        if (bf16) {
            ((uint16_t *)m)[i] = moe_f32_to_bf16(mj);
            ((uint16_t *)v)[i] = moe_f32_to_bf16(vj);
        } else {
            ((float *)m)[i] = mj;
            ((float *)v)[i] = vj;
        }
        pj = (float)p[i];
        p[i] = (moe_real)(pj - (__fdiv_rn(k.step * mj, __fsqrt_rn(vj * k.inv_bc2) + k.eps) + seg[s].decay * pj));
        g[i] = 0;
    }
}
static moe_status moe__cuda_adamw(moe_ctx *ctx, const moe__adamw_op *op) {
    const int64_t nseg = op->n_segments;
    moe__adamw_segment *d_seg;
    moe__cuda_optim_adamw_k k;
    int64_t end;
    if (nseg <= 0) return MOE_OK;
    end = op->host_segments[nseg - 1].start + op->host_segments[nseg - 1].len;
    if (end <= 0) return MOE_OK;
    if (!(d_seg = (moe__adamw_segment *)moe__dev_scratch(ctx, nseg, sizeof(moe__adamw_segment), __func__))) return MOE_ERR_MEMORY;
    MOE__TRY(moe__cuda_copy(ctx, d_seg, op->host_segments, (size_t)nseg * sizeof(moe__adamw_segment), MOE__H2D));
    k.gs = op->grad_scale;
    k.b1 = op->beta1;
    k.c1 = 1 - op->beta1;
    k.b2 = op->beta2;
    k.c2 = 1 - op->beta2;
    k.eps = op->eps;
    k.step = op->step;
    k.inv_bc2 = op->inv_bc2;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_adamw_slab, moe__cuda_blocks(end, MOE__CUDA_THREADS), op->p, op->g, op->m, op->v,
                     op->moment_dtype == MOE_BF16, d_seg, nseg, end, k);
    return MOE_OK;
}

/* ---- distillation rows (moe.h section 11 states the losses and gradients) ---- */

/* Blocks of the top-k distillation kernels: each has a bitmap of V bits marking its row's
   ids (zero between rows), so their number is bounded. */
#define MOE__CUDA_OPTIM_MARK_BLOCKS 1024

/* Is id j marked in a block's bitmap (read from L2, where the atomics land)? */
static __device__ int moe__cuda_optim_marked(const uint32_t *mark, int64_t j) {
    return mark && ((__ldcg(mark + (j >> 5)) >> (j & 31)) & 1u);
}
/* Mark (on = 1) or unmark (on = 0) the k ids of a row (distinct ids: the caller checks). */
static __device__ void moe__cuda_optim_mark_ids(uint32_t *mark, const int32_t *ids, int64_t k, int on) {
    int64_t i;
    for (i = threadIdx.x; i < k; i += blockDim.x) {
        const uint32_t bit = 1u << (ids[i] & 31);
        if (on) atomicOr(mark + (ids[i] >> 5), bit);
        else atomicAnd(mark + (ids[i] >> 5), ~bit);
    }
}

/* Block-wide log-sum-exp of s·x[j] over j < n, skipping marked ids (mark NULL: none), as the
   CPU's moe__distill_lse in float: −inf when every term is skipped or −inf. */
static __device__ moe_real moe__cuda_optim_block_lse(const moe_real *x, int64_t n, moe_real s, const uint32_t *mark, float *shm) {
    moe_real m = -(moe_real)INFINITY, sum = 0;
    int64_t j;
    for (j = threadIdx.x; j < n; j += blockDim.x)
        if (!moe__cuda_optim_marked(mark, j) && s * x[j] > m) m = s * x[j];
    m = moe__cuda_block_max(m, shm);
    if (m == -(moe_real)INFINITY) return m; /* the same for every thread */
    for (j = threadIdx.x; j < n; j += blockDim.x)
        if (!moe__cuda_optim_marked(mark, j)) sum += moe_expf(s * x[j] - m);
    sum = moe__cuda_block_sum(sum, shm);
    return m + logf(sum);
}

/* The per-row constants of a distillation call, formed on the host in float as the CPU does. */
typedef struct moe__cuda_optim_distill_k {
    moe_real invT; /* 1/T */
    moe_real cs;   /* scale·α (backward) */
    moe_real ks;   /* scale·(1 − α)·T (backward) */
} moe__cuda_optim_distill_k;

/* Forward, one block per row (block stride): per row that counts, lse1 (labels) and CE at
   T = 1, lseT, lseX (the teacher's lse, or the student's tail lse for a top-k teacher) and the
   KL at T into D.kl; out[3r..3r+2] = CE, KL, 1 for a row that counts (0, 0, 0 otherwise), which
   the host adds in row order. */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_optim_distill_fwd_rows(moe__distill_op D, const moe_real *zs, moe__cuda_optim_distill_k K, uint32_t *marks,
                                     int64_t words, moe_real *out) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    const int64_t V = D.V, k = D.k;
    const moe_real invT = K.invT;
    const int fwd = !D.reverse;
    uint32_t *mark = marks ? marks + (int64_t)blockIdx.x * words : NULL;
    MOE__CUDA_BLOCK_STRIDE(r, D.rows) {
        const moe_real *x = zs + r * V;
        moe_real lseT, kr = 0, ce = 0;
        int64_t j, i;
        if (D.labels && D.labels[r] == D.ignore_index) {
            if (threadIdx.x == 0) {
                D.kl[r] = 0;
                out[3 * r] = 0;
                out[3 * r + 1] = 0;
                out[3 * r + 2] = 0;
            }
            continue;
        }
        if (D.labels) {
            const moe_real lse1 = moe__cuda_optim_block_lse(x, V, 1, NULL, shm);
            ce = lse1 - x[D.labels[r]];
            if (threadIdx.x == 0) D.lse1[r] = lse1;
        }
        lseT = moe__cuda_optim_block_lse(x, V, invT, NULL, shm);
        if (threadIdx.x == 0) D.lseT[r] = lseT;
        if (!k) {
            const moe_real *y = D.zt + r * V;
            const moe_real lset = moe__cuda_optim_block_lse(y, V, invT, NULL, shm);
            if (threadIdx.x == 0) D.lseX[r] = lset;
            for (j = threadIdx.x; j < V; j += blockDim.x) {
                const moe_real lp = invT * y[j] - lset, lq = invT * x[j] - lseT;
                kr += fwd ? moe_expf(lp) * (lp - lq) : moe_expf(lq) * (lq - lp);
            }
            kr = moe__cuda_block_sum(kr, shm);
        } else {
            const int32_t *ids = D.ids + r * k;
            const moe_real *lp = D.logp + r * k, pR = D.tail[r];
            moe_real lseR, lqR;
            __syncthreads(); /* the previous row's marks are cleared */
            moe__cuda_optim_mark_ids(mark, ids, k, 1);
            __syncthreads();
            lseR = k < V ? moe__cuda_optim_block_lse(x, V, invT, mark, shm) : -(moe_real)INFINITY;
            __syncthreads(); /* every thread has read the marks */
            moe__cuda_optim_mark_ids(mark, ids, k, 0);
            if (threadIdx.x == 0) D.lseX[r] = lseR;
            lqR = lseR - lseT;
            for (i = threadIdx.x; i < k; i += blockDim.x) {
                const moe_real lq = invT * x[ids[i]] - lseT;
                kr += fwd ? moe_expf(lp[i]) * (lp[i] - lq) : moe_expf(lq) * (lq - lp[i]);
            }
            kr = moe__cuda_block_sum(kr, shm);
            if (k < V) {
                if (fwd) {
                    if (pR > 0) kr += pR * (logf(pR) - lqR);
                } else {
                    const moe_real lpR = logf(pR > (moe_real)MOE__DISTILL_TAIL_FLOOR ? pR : (moe_real)MOE__DISTILL_TAIL_FLOOR);
                    kr += moe_expf(lqR) * (lqR - lpR);
                }
            }
        }
        if (threadIdx.x == 0) {
            D.kl[r] = kr;
            out[3 * r] = ce;
            out[3 * r + 1] = kr;
            out[3 * r + 2] = 1;
        }
    }
}

/* Zeroed bitmaps for the top-k kernels' blocks (NULL for a full teacher), and their grid. */
static moe_status moe__cuda_optim_marks(moe_ctx *ctx, const moe__distill_op *op, uint32_t **marks, int64_t *words,
                                        int64_t *blocks) {
    *marks = NULL;
    *words = 0;
    *blocks = moe__cuda_blocks(op->rows, 1);
    if (!op->k) return MOE_OK;
    if (*blocks > MOE__CUDA_OPTIM_MARK_BLOCKS) *blocks = MOE__CUDA_OPTIM_MARK_BLOCKS;
    *words = (op->V + 31) / 32;
    if (!(*marks = (uint32_t *)moe__dev_scratch(ctx, *blocks * *words, sizeof(uint32_t), __func__))) return MOE_ERR_MEMORY;
    return moe__cuda_memset(ctx, *marks, 0, (size_t)(*blocks * *words) * sizeof(uint32_t));
}

static moe_status moe__cuda_distill_fwd(moe_ctx *ctx, const moe__distill_op *op, const moe_real *zs, double *host_ce,
                                        double *host_kl, int64_t *host_count) {
    moe__cuda_optim_distill_k K;
    moe_real *d_out, *h_out;
    uint32_t *marks;
    int64_t words, blocks, r, count = 0;
    double ce_sum = 0, kl_sum = 0;
    *host_ce = 0;
    *host_kl = 0;
    *host_count = 0;
    if (op->rows <= 0) return MOE_OK;
    MOE__TRY(moe__cuda_optim_marks(ctx, op, &marks, &words, &blocks));
    if (!(d_out = (moe_real *)moe__dev_scratch(ctx, 3 * op->rows, sizeof(moe_real), __func__))) return MOE_ERR_MEMORY;
    if (!(h_out = (moe_real *)moe__arena_alloc(ctx, (size_t)(3 * op->rows), sizeof(moe_real), "distillation"))) return MOE_ERR_MEMORY;
    K.invT = (moe_real)1 / op->temperature;
    K.cs = 0;
    K.ks = 0;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_distill_fwd_rows, blocks, *op, zs, K, marks, words, d_out);
    MOE__TRY(moe__cuda_download(ctx, h_out, d_out, (size_t)(3 * op->rows) * sizeof(moe_real)));
    for (r = 0; r < op->rows; r++) { /* the CPU's order: rows that count, in row order */
        if (h_out[3 * r + 2] == 0) continue;
        ce_sum += (double)h_out[3 * r];
        kl_sum += (double)h_out[3 * r + 1];
        count++;
    }
    *host_ce = ce_sum;
    *host_kl = kl_sum;
    *host_count = count;
    return MOE_OK;
}

/* Backward, one block per row (block stride), per row that counts:
   dz += cs·(softmax(z) − onehot(label)) (labels, α > 0), then the KL part ks·dKL/da. Each
   value gets the CPU's operations in its order (CE, label, KL); with a top-k teacher the tail
   ids (unmarked) are done in the first pass and the k ids after a barrier. P = p_R + Σ p_i is a
   block sum (the CPU's is serial: NORMREL). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_optim_distill_bwd_rows(moe__distill_op D, const moe_real *zs, moe__cuda_optim_distill_k K, uint32_t *marks,
                                     int64_t words, moe_real *dz) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    const int64_t V = D.V, k = D.k;
    const moe_real invT = K.invT, cs = K.cs, ks = K.ks;
    const int fwd = !D.reverse, do_ce = D.labels && D.alpha > 0;
    uint32_t *mark = marks ? marks + (int64_t)blockIdx.x * words : NULL;
    MOE__CUDA_BLOCK_STRIDE(r, D.rows) {
        const moe_real *x = zs + r * V;
        moe_real *d = dz + r * V;
        const moe_real lseT = D.lseT[r], klr = D.kl[r];
        const int64_t label = D.labels ? (int64_t)D.labels[r] : -1;
        const moe_real l1 = do_ce ? D.lse1[r] : 0;
        int64_t j, i;
        if (D.labels && D.labels[r] == D.ignore_index) continue;
        if (!do_ce && ks == 0) continue;
        if (!k || ks == 0) { /* one pass: CE, and the KL against a full teacher */
            const moe_real *y = k ? NULL : D.zt + r * V;
            const moe_real lset = k ? 0 : D.lseX[r];
            for (j = threadIdx.x; j < V; j += blockDim.x) {
                moe_real dj = d[j];
                if (do_ce) {
                    dj += cs * moe_expf(x[j] - l1);
                    if (j == label) dj -= cs;
                }
                if (ks != 0) {
                    const moe_real lp = invT * y[j] - lset, lq = invT * x[j] - lseT, q = moe_expf(lq);
                    dj += ks * (fwd ? q - moe_expf(lp) : q * (lq - lp - klr));
                }
                d[j] = dj;
            }
        } else { /* top-k teacher with a KL part */
            const int32_t *ids = D.ids + r * k;
            const moe_real *lp = D.logp + r * k, pR = D.tail[r], lseR = D.lseX[r], lqR = lseR - lseT;
            const moe_real lpR = logf(pR > (moe_real)MOE__DISTILL_TAIL_FLOOR ? pR : (moe_real)MOE__DISTILL_TAIL_FLOOR);
            moe_real P = 0;
            for (i = threadIdx.x; i < k; i += blockDim.x) P += moe_expf(lp[i]);
            P = pR + moe__cuda_block_sum(P, shm);
            __syncthreads(); /* the previous row's marks are cleared */
            moe__cuda_optim_mark_ids(mark, ids, k, 1);
            __syncthreads();
            for (j = threadIdx.x; j < V; j += blockDim.x) {
                moe_real dj;
                const int tail = k < V && !moe__cuda_optim_marked(mark, j);
                if (!do_ce && !tail) continue;
                dj = d[j];
                if (do_ce) {
                    dj += cs * moe_expf(x[j] - l1);
                    if (j == label) dj -= cs;
                }
                if (tail) {
                    /* q_j/q_R = exp(a_j − lse_tail): no division by a tail that may underflow */
                    const moe_real q = moe_expf(invT * x[j] - lseT);
                    dj += ks * (fwd ? P * q - pR * moe_expf(invT * x[j] - lseR) : q * (lqR - lpR - klr));
                }
                d[j] = dj;
            }
            __syncthreads(); /* the first pass's values of d are written, the marks read */
            moe__cuda_optim_mark_ids(mark, ids, k, 0);
            for (i = threadIdx.x; i < k; i += blockDim.x) {
                const int64_t id = ids[i];
                const moe_real lq = invT * x[id] - lseT, q = moe_expf(lq);
                d[id] += ks * (fwd ? P * q - moe_expf(lp[i]) : q * (lq - lp[i] - klr));
            }
        }
    }
}
static moe_status moe__cuda_distill_bwd(moe_ctx *ctx, const moe__distill_op *op, const moe_real *zs, moe_real scale,
                                        moe_real *dzs) {
    const moe_real T = op->temperature, alpha = op->alpha;
    moe__cuda_optim_distill_k K;
    uint32_t *marks;
    int64_t words, blocks;
    if (op->rows <= 0) return MOE_OK;
    MOE__TRY(moe__cuda_optim_marks(ctx, op, &marks, &words, &blocks));
    K.invT = (moe_real)1 / T;
    K.cs = scale * alpha;
    K.ks = scale * (1 - alpha) * T;
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_distill_bwd_rows, blocks, *op, zs, K, marks, words, dzs);
    return MOE_OK;
}

/* ---- the teacher's top-k ---- */

/* The first non-finite value's index (atomicMin: the result does not depend on the order). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_optim_first_nonfinite(const moe_real *z, int64_t n, unsigned long long *first) {
    MOE__CUDA_GRID_STRIDE(i, n) {
        if (!isfinite(z[i])) {
            atomicMin(first, (unsigned long long)i);
            return; /* this thread's later values have larger indices */
        }
    }
}

/* Block-wide arg-max of (v, id) in the order v descending, then id ascending (a total order:
   every thread gets the same pair). */
static __device__ void moe__cuda_optim_block_argmax(double *v, long long *id, double *shv, long long *shi) {
    int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5, w;
    for (w = 16; w > 0; w >>= 1) {
        const double ov = __shfl_xor_sync(0xffffffffu, *v, w);
        const long long oi = __shfl_xor_sync(0xffffffffu, *id, w);
        if (ov > *v || (ov == *v && oi < *id)) {
            *v = ov;
            *id = oi;
        }
    }
    __syncthreads(); /* shv, shi may still be read by a previous call */
    if (lane == 0) {
        shv[warp] = *v;
        shi[warp] = *id;
    }
    __syncthreads();
    *v = shv[0];
    *id = shi[0];
    for (w = 1; w < MOE__CUDA_THREADS / 32; w++)
        if (shv[w] > *v || (shv[w] == *v && shi[w] < *id)) {
            *v = shv[w];
            *id = shi[w];
        }
}

/* One block per row (block stride), in double as the CPU: mx = max z, lse = log Σ
   exp((z − mx)/T), lp_j = (z_j − mx)/T − lse. The top k in the order (lp descending, id
   ascending) come out one per round: round t takes the best value after round t − 1's in that
   order (k rounds over the row). tail = Σ exp(lp_j) over the values after the k-th (block sum
   in double, rounded once). */
static __global__ void __launch_bounds__(MOE__CUDA_THREADS)
    moe__cuda_optim_teacher_topk_rows(const moe_real *z, int64_t rows, int64_t V, int64_t k, double invT, int32_t *ids,
                                      moe_real *logp, moe_real *tail) {
    __shared__ float shm[MOE__CUDA_THREADS / 32];
    __shared__ double shd[MOE__CUDA_THREADS / 32];
    __shared__ long long shi[MOE__CUDA_THREADS / 32];
    MOE__CUDA_BLOCK_STRIDE(r, rows) {
        const moe_real *x = z + r * V;
        float mxf = -INFINITY;
        double mx, sum = 0, lse, prev = INFINITY, tl = 0;
        long long prev_id = -1;
        int64_t j, t;
        for (j = threadIdx.x; j < V; j += blockDim.x) mxf = fmaxf(mxf, (float)x[j]);
        mx = (double)moe__cuda_block_max(mxf, shm);
        for (j = threadIdx.x; j < V; j += blockDim.x) sum += exp(((double)x[j] - mx) * invT);
        lse = log(moe__cuda_block_sum_f64(sum, shd));
        for (t = 0; t < k; t++) {
            double best = -INFINITY;
            long long best_id = (long long)V;
            for (j = threadIdx.x; j < V; j += blockDim.x) {
                const double lp = ((double)x[j] - mx) * invT - lse;
                /* after the previous pick in the order; a thread's ids grow, so ">" keeps the lower id */
                if ((lp < prev || (lp == prev && j > prev_id)) && lp > best) {
                    best = lp;
                    best_id = j;
                }
            }
            moe__cuda_optim_block_argmax(&best, &best_id, shd, shi);
            if (threadIdx.x == 0) {
                ids[r * k + t] = (int32_t)best_id;
                logp[r * k + t] = (moe_real)(float)best;
            }
            prev = best;
            prev_id = best_id;
        }
        for (j = threadIdx.x; j < V; j += blockDim.x) {
            const double lp = ((double)x[j] - mx) * invT - lse;
            if (lp < prev || (lp == prev && j > prev_id)) tl += exp(lp);
        }
        tl = moe__cuda_block_sum_f64(tl, shd);
        if (threadIdx.x == 0) tail[r] = (moe_real)(float)tl;
    }
}
/* (k block-wide passes over each row: fine for a teacher's top-k of tens; k near V is
   quadratic in V) */
static moe_status moe__cuda_teacher_topk(moe_ctx *ctx, const moe_real *z, int64_t rows, int64_t V, int64_t k, moe_real temperature,
                                         int32_t *ids, moe_real *logp, moe_real *tail) {
    unsigned long long *d_first, first = 0;
    if (rows <= 0) return MOE_OK;
    if (k < 1 || k > V)
        return moe__fail(ctx, MOE_ERR_ARG, "teacher_topk: k must be 1..%lld, got %lld", (long long)V, (long long)k);
    if (!(d_first = (unsigned long long *)moe__dev_scratch(ctx, 1, sizeof(unsigned long long), __func__))) return MOE_ERR_MEMORY;
    MOE__TRY(moe__cuda_memset(ctx, d_first, 0xFF, sizeof(unsigned long long)));
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_first_nonfinite, moe__cuda_blocks(rows * V, MOE__CUDA_THREADS), z, rows * V, d_first);
    MOE__TRY(moe__cuda_download(ctx, &first, d_first, sizeof first));
    if (first != ~0ull) {
        const int64_t i = (int64_t)first;
        moe_real bad = 0;
        MOE__TRY(moe__cuda_download(ctx, &bad, z + i, sizeof bad));
        return moe__fail(ctx, MOE_ERR_NUMERIC, "teacher logit %lld of row %lld is %g", (long long)(i % V), (long long)(i / V),
                         (double)bad);
    }
    MOE__CUDA_LAUNCH(ctx, moe__cuda_optim_teacher_topk_rows, moe__cuda_blocks(rows, 1), z, rows, V, k, 1.0 / (double)temperature,
                     ids, logp, tail);
    return MOE_OK;
}


/* ============================================================================================
   8. the table                                                                      >>cu.table
   ============================================================================================ */

static const moe_backend moe__cuda_table = {
    "cuda", MOE_DEVICE_CUDA,
    moe__cuda_alloc, moe__cuda_free, moe__cuda_copy, moe__cuda_memset, moe__cuda_scratch,
    moe__cuda_gemm, moe__cuda_gemm_grouped,
    moe__cuda_rmsnorm_fwd, moe__cuda_rmsnorm_bwd, moe__cuda_softmax_fwd, moe__cuda_softmax_bwd, moe__cuda_xent_fwd,
    moe__cuda_xent_bwd, moe__cuda_swiglu_fwd, moe__cuda_swiglu_bwd, moe__cuda_rope, moe__cuda_topk_fwd, moe__cuda_topk_bwd,
    moe__cuda_attention_fwd, moe__cuda_attention_bwd, moe__cuda_attention_decode,
    moe__cuda_mla_split_kv, moe__cuda_mla_merge_kv, moe__cuda_router_fwd, moe__cuda_router_bwd, moe__cuda_balance_loss,
    moe__cuda_dispatch_plan, moe__cuda_gather_rows, moe__cuda_scatter_add_rows, moe__cuda_combine, moe__cuda_expert_gate_bwd,
    moe__cuda_fp8_quantize, moe__cuda_fp8_dequantize,
    moe__cuda_convert, moe__cuda_copy2d, moe__cuda_add, moe__cuda_mul, moe__cuda_scale, moe__cuda_axpy, moe__cuda_fill,
    moe__cuda_fill_normal,
    moe__cuda_sum, moe__cuda_sumsq, moe__cuda_colsum,
    moe__cuda_adamw, moe__cuda_distill_fwd, moe__cuda_distill_bwd, moe__cuda_teacher_topk};

static const moe_backend *moe__cuda_backend(void) { return &moe__cuda_table; }

#endif /* MOE_CUDA_CUH */

/* ============================================================================================
   9. comm — NCCL: the communicator on GPU memory (MOE_NCCL)                         >>cu.comm
   ============================================================================================
   moe.h's section 15 includes this file again with MOE__CUDA_COMM_SECTION once struct
   moe_comm, its ops table and the bootstrap helpers exist; only this section compiles then.
   One more moe__comm_ops table (gpu.md §5.5): broadcast and all-reduce are NCCL's
   collectives; the all-gather and the all-to-all with per-rank counts are one group of
   ncclSend / ncclRecv each (NCCL has no variable-count collective; every peer's pair in one
   group so that they progress together), the rank's own block a device copy; the barrier is
   a one-value all-reduce and a stream sync; split is ncclCommSplit. Everything is enqueued on
   the stream of the context the communicator was made with, after that context's kernels.
   The all-to-all-v without waiting is the one above (it is stream-ordered already; expert
   parallelism, its only caller, is not built over NCCL).
   Host buffers (flags, counts, the config check) pass through a device stage buffer and are
   waited for. The ordered sums' receive buffer is device memory and their block sum a kernel
   with one thread per element adding the ranks' blocks in rank order, so its bits are the
   host's sum (moe__comm_sum_blocks). NCCL errors come back as MOE_ERR_COMM with NCCL's
   message and file:line; after one, freeing the communicator aborts it instead of waiting.
   Never run on a GPU yet (gpu.md §7): compiled with the strict flags and host-tested only. */
#if defined(MOE__CUDA_COMM_SECTION) && !defined(MOE_CUDA_CUH_COMM)
#define MOE_CUDA_CUH_COMM

typedef struct moe__nccl {
    ncclComm_t comm;
    int device;
    cudaStream_t stream;  /* the context's: collectives stay ordered with its kernels */
    int broken;           /* an NCCL call failed: release aborts instead of destroying */
    void *scratch, *stage; /* device memory: the ordered sums' blocks; host buffers' copies */
    size_t scratch_bytes, stage_bytes;
} moe__nccl;

#define MOE__NCCL(c) ((moe__nccl *)(c)->impl)

/* An NCCL result as a moe_status, with the call, its place and NCCL's last message. */
static moe_status moe__nccl_fail(moe_ctx *ctx, moe__nccl *N, ncclResult_t r, const char *what, const char *file, int line) {
    const char *last = ncclGetLastError(N ? N->comm : NULL);
    if (N) N->broken = 1;
    return moe__fail(ctx, MOE_ERR_COMM, "NCCL: %s failed at %s:%d: %s%s%s", what, file, line, ncclGetErrorString(r),
                     last && *last ? ": " : "", last && *last ? last : "");
}
#define MOE__NCCL_TRY(ctx, N, call)                                                                \
    do {                                                                                           \
        ncclResult_t moe__r = (call);                                                              \
        if (moe__r != ncclSuccess) return moe__nccl_fail(ctx, N, moe__r, #call, __FILE__, __LINE__); \
    } while (0)

static ncclDataType_t moe__nccl_type(moe_comm_type t) {
    switch (t) {
    case MOE_COMM_F32: return ncclFloat32;
    case MOE_COMM_F64: return ncclFloat64;
    case MOE_COMM_I32: return ncclInt32;
    case MOE_COMM_I64: return ncclInt64;
    case MOE_COMM_BYTE: break;
    }
    return ncclUint8;
}

/* Whether p is memory the GPU reads (device or managed), not plain or pinned host memory. */
static int moe__nccl_on_device(const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

/* *buf, device memory of at least `bytes` (a larger buffer replaces it once the stream has
   finished with the old one); NULL and MOE_ERR_MEMORY when the GPU has no room. */
static void *moe__nccl_grow(moe_ctx *ctx, moe__nccl *N, void **buf, size_t *cap, size_t bytes, const char *fn) {
    cudaError_t e;
    bytes = (bytes + MOE__CUDA_ALIGN - 1) / MOE__CUDA_ALIGN * MOE__CUDA_ALIGN;
    if (bytes <= *cap && *buf) return *buf;
    if ((e = cudaStreamSynchronize(N->stream)) != cudaSuccess) {
        moe__cuda_fail(ctx, e, "cudaStreamSynchronize (before growing a communicator buffer)", __FILE__, __LINE__);
        return NULL;
    }
    cudaFree(*buf);
    *buf = NULL;
    *cap = 0;
    if ((e = cudaMalloc(buf, bytes)) != cudaSuccess) {
        (void)cudaGetLastError();
        *buf = NULL;
        moe__fail(ctx, MOE_ERR_MEMORY, "%s: no room for %zu bytes of communicator buffer on the GPU (%s)", fn, bytes,
                  cudaGetErrorString(e));
        return NULL;
    }
    *cap = bytes;
    return *buf;
}

/* Device addresses for a collective's send (sbytes) and receive (rbytes) buffers: a host
   buffer gets room in the stage buffer, the send side copied there. */
static moe_status moe__nccl_stage_in(moe_ctx *ctx, moe__nccl *N, const void *send, size_t sbytes, void *recv, size_t rbytes,
                                     const void **dsend, void **drecv, const char *fn) {
    int host_send = sbytes > 0 && !moe__nccl_on_device(send), host_recv = rbytes > 0 && !moe__nccl_on_device(recv);
    size_t at = (sbytes + MOE__CUDA_ALIGN - 1) / MOE__CUDA_ALIGN * MOE__CUDA_ALIGN;
    unsigned char *stage;
    *dsend = send;
    *drecv = recv;
    if (!host_send && !host_recv) return MOE_OK;
    if (!(stage = (unsigned char *)moe__nccl_grow(ctx, N, &N->stage, &N->stage_bytes, at + (host_recv ? rbytes : 0), fn)))
        return MOE_ERR_MEMORY;
    if (host_send) { /* waited for: the caller may reuse its buffer on return, pinned memory too */
        MOE__CUDA_TRY(ctx, cudaMemcpyAsync(stage, send, sbytes, cudaMemcpyHostToDevice, N->stream));
        MOE__CUDA_TRY(ctx, cudaStreamSynchronize(N->stream));
        *dsend = stage;
    }
    if (host_recv) *drecv = stage + at;
    return MOE_OK;
}
/* A staged receive buffer back to the host (waits for the stream). */
static moe_status moe__nccl_stage_out(moe_ctx *ctx, moe__nccl *N, void *recv, void *drecv, size_t rbytes) {
    if (drecv == recv || rbytes == 0) return MOE_OK;
    MOE__CUDA_TRY(ctx, cudaMemcpyAsync(recv, drecv, rbytes, cudaMemcpyDeviceToHost, N->stream));
    MOE__CUDA_TRY(ctx, cudaStreamSynchronize(N->stream));
    return MOE_OK;
}

static moe_status moe__nccl_barrier(moe_ctx *ctx, moe_comm *c) {
    moe__nccl *N = MOE__NCCL(c);
    void *d;
    MOE__CUDA_TRY(ctx, cudaSetDevice(N->device));
    if (!(d = moe__nccl_grow(ctx, N, &N->stage, &N->stage_bytes, sizeof(int32_t), "moe_comm_barrier"))) return MOE_ERR_MEMORY;
    MOE__CUDA_TRY(ctx, cudaMemsetAsync(d, 0, sizeof(int32_t), N->stream));
    MOE__NCCL_TRY(ctx, N, ncclAllReduce(d, d, 1, ncclInt32, ncclSum, N->comm, N->stream));
    MOE__CUDA_TRY(ctx, cudaStreamSynchronize(N->stream));
    return MOE_OK;
}

static moe_status moe__nccl_bcast(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, int root) {
    moe__nccl *N = MOE__NCCL(c);
    size_t bytes = (size_t)n * moe__comm_type_size(t);
    const void *s;
    void *r;
    MOE__CUDA_TRY(ctx, cudaSetDevice(N->device));
    MOE__TRY(moe__nccl_stage_in(ctx, N, buf, c->rank == root ? bytes : 0, buf, bytes, &s, &r, "moe_comm_bcast"));
    MOE__NCCL_TRY(ctx, N, ncclBroadcast(c->rank == root ? s : r, r, (size_t)n, moe__nccl_type(t), root, N->comm, N->stream));
    return moe__nccl_stage_out(ctx, N, buf, r, bytes);
}

static moe_status moe__nccl_allreduce(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, moe_comm_op op) {
    moe__nccl *N = MOE__NCCL(c);
    size_t bytes = (size_t)n * moe__comm_type_size(t);
    const void *s;
    void *r;
    MOE__CUDA_TRY(ctx, cudaSetDevice(N->device));
    MOE__TRY(moe__nccl_stage_in(ctx, N, buf, bytes, buf, bytes, &s, &r, "moe_comm_allreduce"));
    MOE__NCCL_TRY(ctx, N, ncclAllReduce(s, r, (size_t)n, moe__nccl_type(t), op == MOE_COMM_MAX ? ncclMax : ncclSum, N->comm, N->stream));
    return moe__nccl_stage_out(ctx, N, buf, r, bytes);
}

/* The point-to-point half of the all-gather and the all-to-all: to every other rank p,
   scount[p] elements from send + soff[p] and from it rcount[p] into recv + roff[p], all in one
   group; zero counts send nothing (both sides know them); this rank's own block is a copy. */
static moe_status moe__nccl_exchange(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *scount, const int64_t *soff,
                                     void *recv, const int64_t *rcount, const int64_t *roff, moe_comm_type t) {
    moe__nccl *N = MOE__NCCL(c);
    size_t es = moe__comm_type_size(t);
    ncclDataType_t nt = moe__nccl_type(t);
    ncclResult_t rc, end;
    int p, me = c->rank;
    if (scount[me] != rcount[me])
        return moe__fail(ctx, MOE_ERR_ARG, "comm: this rank sends %lld elements to itself and receives %lld", (long long)scount[me],
                         (long long)rcount[me]);
    if (scount[me] > 0)
        MOE__CUDA_TRY(ctx, cudaMemcpyAsync((char *)recv + (size_t)roff[me] * es, (const char *)send + (size_t)soff[me] * es,
                                           (size_t)scount[me] * es, cudaMemcpyDeviceToDevice, N->stream));
    MOE__NCCL_TRY(ctx, N, ncclGroupStart());
    rc = ncclSuccess;
    for (p = 0; p < c->size && rc == ncclSuccess; p++) {
        if (p == me) continue;
        if (scount[p] > 0) rc = ncclSend((const char *)send + (size_t)soff[p] * es, (size_t)scount[p], nt, p, N->comm, N->stream);
        if (rc == ncclSuccess && rcount[p] > 0)
            rc = ncclRecv((char *)recv + (size_t)roff[p] * es, (size_t)rcount[p], nt, p, N->comm, N->stream);
    }
    end = ncclGroupEnd();
    if (rc == ncclSuccess) rc = end;
    if (rc != ncclSuccess) return moe__nccl_fail(ctx, N, rc, "the group of ncclSend / ncclRecv", __FILE__, __LINE__);
    return MOE_OK;
}

static moe_status moe__nccl_allgatherv(moe_ctx *ctx, moe_comm *c, const void *send, void *recv, const int64_t *counts,
                                       const int64_t *offsets, moe_comm_type t) {
    moe__nccl *N = MOE__NCCL(c);
    size_t es = moe__comm_type_size(t), total = (size_t)(offsets[c->size - 1] + counts[c->size - 1]) * es;
    int64_t *mine;
    const void *s;
    void *r;
    int p;
    moe_status st;
    MOE__CUDA_TRY(ctx, cudaSetDevice(N->device));
    MOE__TRY(moe__nccl_stage_in(ctx, N, send, (size_t)counts[c->rank] * es, recv, total, &s, &r, "moe_comm_allgather"));
    if (!(mine = (int64_t *)MOE_MALLOC(sizeof(int64_t) * 2 * (size_t)c->size)))
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_allgather: out of memory for %d ranks' counts", c->size);
    for (p = 0; p < c->size; p++) { /* the same block, from offset 0 of send, to every rank */
        mine[p] = counts[c->rank];
        mine[c->size + p] = 0;
    }
    st = moe__nccl_exchange(ctx, c, s, mine, mine + c->size, r, counts, offsets, t);
    MOE_FREE(mine);
    MOE__TRY(st);
    return moe__nccl_stage_out(ctx, N, recv, r, total);
}

static moe_status moe__nccl_alltoallv(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *send_counts,
                                      const int64_t *send_offsets, void *recv, const int64_t *recv_counts,
                                      const int64_t *recv_offsets, moe_comm_type t) {
    moe__nccl *N = MOE__NCCL(c);
    int P = c->size;
    size_t es = moe__comm_type_size(t), stotal = (size_t)(send_offsets[P - 1] + send_counts[P - 1]) * es,
           rtotal = (size_t)(recv_offsets[P - 1] + recv_counts[P - 1]) * es;
    const void *s;
    void *r;
    MOE__CUDA_TRY(ctx, cudaSetDevice(N->device));
    MOE__TRY(moe__nccl_stage_in(ctx, N, send, stotal, recv, rtotal, &s, &r, "moe_comm_alltoallv"));
    MOE__TRY(moe__nccl_exchange(ctx, c, s, send_counts, send_offsets, r, recv_counts, recv_offsets, t));
    return moe__nccl_stage_out(ctx, N, recv, r, rtotal);
}

static moe_status moe__nccl_split(moe_ctx *ctx, moe_comm *c, int color, int key, moe_comm *out) {
    moe__nccl *N = MOE__NCCL(c), *S;
    ncclComm_t sub = NULL;
    ncclResult_t r;
    MOE__CUDA_TRY(ctx, cudaSetDevice(N->device));
    MOE__NCCL_TRY(ctx, N, ncclCommSplit(N->comm, color, key, &sub, NULL));
    if (!(S = (moe__nccl *)moe__heap_calloc(ctx, sizeof *S))) {
        ncclCommAbort(sub); /* an error path, like the next one: a destroy may wait on the other ranks */
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_split: out of memory");
    }
    S->comm = sub;
    S->device = N->device;
    S->stream = N->stream;
    if ((r = ncclCommUserRank(sub, &out->rank)) != ncclSuccess || (r = ncclCommCount(sub, &out->size)) != ncclSuccess) {
        moe_status st = moe__nccl_fail(ctx, S, r, "ncclCommUserRank / ncclCommCount", __FILE__, __LINE__);
        ncclCommAbort(sub);
        MOE_FREE(S);
        return st;
    }
    out->impl = S;
    return MOE_OK;
}

static void moe__nccl_release(moe_comm *c) {
    moe__nccl *N = MOE__NCCL(c);
    ncclResult_t async = ncclSuccess;
    if (!N) return;
    cudaSetDevice(N->device);
    if (N->comm) { /* a clean end waits for the queued work; after an error NCCL may never finish it */
        int clean = !N->broken && ncclCommGetAsyncError(N->comm, &async) == ncclSuccess && async == ncclSuccess &&
                    cudaStreamSynchronize(N->stream) == cudaSuccess;
        if (clean) ncclCommDestroy(N->comm); /* tried once: a failed destroy is not followed by an abort of what it freed */
        else ncclCommAbort(N->comm);
    }
    cudaFree(N->scratch);
    cudaFree(N->stage);
    (void)cudaGetLastError();
    MOE_FREE(N);
    c->impl = NULL;
}

static void *moe__nccl_scratch(moe_ctx *ctx, moe_comm *c, size_t bytes, const char *fn) {
    moe__nccl *N = MOE__NCCL(c);
    cudaError_t e = cudaSetDevice(N->device);
    if (e != cudaSuccess) {
        moe__cuda_fail(ctx, e, "cudaSetDevice", __FILE__, __LINE__);
        return NULL;
    }
    return moe__nccl_grow(ctx, N, &N->scratch, &N->scratch_bytes, bytes, fn);
}

/* out[i] = ((b_0[i] + b_1[i]) + b_2[i]) + …: moe__comm_sum_blocks on the GPU, one thread per
   element, the same additions in the same order (integers wrap: unsigned). */
#define MOE__NCCL_SUM_KERNEL(name, T)                                                     \
    static __global__ void __launch_bounds__(MOE__CUDA_THREADS) name(const T *b, int nb, int64_t n, T *o) { \
        MOE__CUDA_GRID_STRIDE(i, n) {                                                     \
            T s = b[i];                                                                   \
            for (int j = 1; j < nb; j++) s += b[(int64_t)j * n + i];                      \
            o[i] = s;                                                                     \
        }                                                                                 \
    }
MOE__NCCL_SUM_KERNEL(moe__nccl_sum_f32, float)
MOE__NCCL_SUM_KERNEL(moe__nccl_sum_f64, double)
MOE__NCCL_SUM_KERNEL(moe__nccl_sum_u32, uint32_t)
MOE__NCCL_SUM_KERNEL(moe__nccl_sum_u64, uint64_t)
#undef MOE__NCCL_SUM_KERNEL

static moe_status moe__nccl_sum_blocks(moe_ctx *ctx, moe_comm *c, const void *blocks, int nb, int64_t n, moe_comm_type t,
                                       void *out) {
    moe__nccl *N = MOE__NCCL(c);
    size_t bytes = (size_t)n * moe__comm_type_size(t);
    unsigned g = (unsigned)moe__cuda_blocks(n, MOE__CUDA_THREADS);
    void *o = out;
    cudaError_t e;
    if (t == MOE_COMM_BYTE) return moe__fail(ctx, MOE_ERR_ARG, "comm: bytes have no sum");
    if (n <= 0) return MOE_OK;
    MOE__CUDA_TRY(ctx, cudaSetDevice(N->device));
    if (!moe__nccl_on_device(out) && !(o = moe__nccl_grow(ctx, N, &N->stage, &N->stage_bytes, bytes, "comm: the ordered sum")))
        return MOE_ERR_MEMORY;
    switch (t) {
    case MOE_COMM_F32: moe__nccl_sum_f32<<<g, MOE__CUDA_THREADS, 0, N->stream>>>((const float *)blocks, nb, n, (float *)o); break;
    case MOE_COMM_F64: moe__nccl_sum_f64<<<g, MOE__CUDA_THREADS, 0, N->stream>>>((const double *)blocks, nb, n, (double *)o); break;
    case MOE_COMM_I32:
        moe__nccl_sum_u32<<<g, MOE__CUDA_THREADS, 0, N->stream>>>((const uint32_t *)blocks, nb, n, (uint32_t *)o);
        break;
    case MOE_COMM_I64:
        moe__nccl_sum_u64<<<g, MOE__CUDA_THREADS, 0, N->stream>>>((const uint64_t *)blocks, nb, n, (uint64_t *)o);
        break;
    case MOE_COMM_BYTE: break;
    }
    if ((e = cudaGetLastError()) != cudaSuccess) return moe__cuda_fail(ctx, e, "moe__nccl_sum_*", __FILE__, __LINE__);
    return moe__nccl_stage_out(ctx, N, out, o, bytes);
}

static const moe__comm_ops moe__comm_nccl = {MOE_DEVICE_CUDA,       moe__nccl_barrier,      moe__nccl_bcast,
                                             moe__nccl_allreduce,   moe__nccl_allgatherv,   moe__nccl_alltoallv,
                                             moe__comm_start_now,   moe__comm_done_already, moe__comm_done_already,
                                             moe__nccl_split,       moe__nccl_release,      moe__nccl_scratch,
                                             moe__nccl_sum_blocks};

/* NCCL's id from rank 0 to every rank, over `boot` (a collective over it: rank 0's
   ncclGetUniqueId, then a broadcast of the 128 bytes) or, with boot NULL, through
   moe_comm_share(how) with moe_comm_env's rank and size; *rank and *size become NCCL's. */
static moe_status moe__nccl_share_id(moe_ctx *ctx, moe_comm *boot, const char *how, double timeout_s, int *rank, int *size,
                                     ncclUniqueId *id) {
    moe_status st = MOE_OK;
    ncclResult_t r;
    int local = 0;
    memset(id, 0, sizeof *id);
    if (boot) {
        *rank = boot->rank;
        *size = boot->size;
    } else {
        MOE__TRY(moe_comm_env(ctx, rank, size, &local));
    }
    if (*rank == 0 && (r = ncclGetUniqueId(id)) != ncclSuccess) st = moe__nccl_fail(ctx, NULL, r, "ncclGetUniqueId", __FILE__, __LINE__);
    if (!boot) return st != MOE_OK ? st : moe_comm_share(ctx, how, *rank, *size, id->internal, sizeof id->internal, timeout_s);
    MOE__TRY(moe__comm_agree(ctx, boot, "moe_comm_init_nccl", st));
    return moe_comm_bcast(ctx, boot, id->internal, (int64_t)sizeof id->internal, MOE_COMM_BYTE, 0);
}

MOE_API moe_status moe_comm_init_nccl(moe_ctx *ctx, moe_comm *bootstrap, const char *how, double timeout_s, moe_comm **out) {
    static const char *fn = "moe_comm_init_nccl";
    moe__nccl *N;
    moe_comm *c;
    ncclUniqueId id;
    ncclResult_t r;
    int rank = 0, size = 1;
    moe_status st = MOE_OK;
    cudaError_t e;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!bootstrap == !how)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: give a bootstrap communicator (MPI) or how (\"tcp:HOST:PORT\" or \"file:PATH\"), "
                                           "one of the two", fn);
    N = (moe__nccl *)moe__heap_calloc(ctx, sizeof *N);
    c = (moe_comm *)moe__heap_calloc(ctx, sizeof *c);
    if (!N || !c) st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    else if (!ctx->gpu)
        st = moe__fail(ctx, MOE_ERR_ARG, "%s: the context is on the CPU, and NCCL works on a GPU's memory "
                                         "(moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, local rank) first)", fn);
    if (bootstrap) st = moe__comm_agree(ctx, bootstrap, fn, st); /* no rank waits for one that stopped here */
    if (!st) st = moe__nccl_share_id(ctx, bootstrap, how, timeout_s, &rank, &size, &id);
    if (!st) {
        N->device = ctx->gpu->device;
        N->stream = ctx->gpu->stream;
        if ((e = cudaSetDevice(N->device)) != cudaSuccess) st = moe__cuda_fail(ctx, e, "cudaSetDevice", __FILE__, __LINE__);
        else if ((r = ncclCommInitRank(&N->comm, size, id, rank)) != ncclSuccess) {
            N->comm = NULL;
            st = moe__nccl_fail(ctx, NULL, r, "ncclCommInitRank", __FILE__, __LINE__);
        }
    }
    if (st) {
        MOE_FREE(N);
        MOE_FREE(c);
        return st;
    }
    c->ops = &moe__comm_nccl;
    c->rank = rank;
    c->size = size;
    c->impl = N;
    *out = c;
    return MOE_OK;
}

#endif /* MOE__CUDA_COMM_SECTION */
