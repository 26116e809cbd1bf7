/* moe.h — train and run DeepSeek-V3-style models from one C header.        v0.1.0

   Do this in exactly one C or C++ file:
       #define MOE_IMPLEMENTATION
       #include "moe.h"
   and include "moe.h" plainly everywhere else.

   What is inside, in the order of the sections below:
     1. base      status codes, moe_ctx (threads, step arena, errors, logging), RNG, timer
     2. numerics  bf16 / fp16 / fp8 (E4M3, E5M2) conversions, bit-exact with the CUDA
                  intrinsics; fine-grained FP8 block quantisation (1×B tiles, B×B blocks)
     3. tensor    moe_tensor: dtype, up to 4 dims, contiguous data, optional grad
     4. kernels   CPU kernels on plain arrays, forward and backward: GEMM (packed, SIMD,
                  threaded; FP32 and BF16), RMSNorm, RoPE, SiLU/SwiGLU, softmax, causal
                  attention (tiled, online softmax), embedding, cross-entropy, top-k
     5. autograd  a tape recorded in the step arena, moe_backward, and the differentiable
                  tensor ops built on the kernels
   Sections 6–11 (layers, model, train, io, infer, dist) follow the plan in DESIGN.md.

   Conventions
     - Every fallible function returns moe_status (MOE_OK == 0) and leaves a one-line
       message in moe_ctx_error(ctx). Bad input never aborts the host program.
     - Tensors made by ops live in the context's step arena until moe_ctx_reset(ctx);
       tensors made with moe_tensor_new live until moe_tensor_free.
     - Results are bit-identical for any thread count: work is split so that every
       reduction runs in a fixed order.
     - Build with -ffp-contract=off (a fused multiply-add is written as fmaf where meant).

   Compile-time options (define before including)
     MOE_STATIC         make every public function static
     MOE_MALLOC(sz) / MOE_REALLOC(p,sz) / MOE_FREE(p)   the allocator (all three or none)
     MOE_ASSERT(x)      our own invariants (default: assert)
     MOE_NO_SIMD        portable scalar kernels only
     MOE_CBLAS          route FP32 GEMMs to cblas_sgemm (link a CBLAS library)
     MOE_REAL_F64       compute in double instead of float: the build that the
                        finite-difference gradient checks use (tensors of dtype MOE_F32
                        then hold doubles; FP8/BF16 paths still round through float)

   License: MIT or public domain, your choice — see the end of this file. */

#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0
#define MOE_VERSION_STRING "0.1.0"

#ifdef MOE_STATIC
#define MOE_API static
#else
#define MOE_API extern
#endif

#ifdef __cplusplus
#define MOE_RESTRICT __restrict__
#else
#define MOE_RESTRICT restrict
#endif

/* MOE_HD marks the element-wise math shared by the CPU loops and the CUDA kernels. */
#ifdef __CUDACC__
#define MOE_HD __host__ __device__ static inline
#else
#define MOE_HD static inline
#endif

#ifdef MOE_REAL_F64
typedef double moe_real;
#else
typedef float moe_real; /* the compute type of MOE_F32 tensors */
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ============================================================================================
   1. base — status codes, context, step arena, RNG, timer
   ============================================================================================
   A moe_ctx owns everything a computation needs besides the tensors themselves: the thread
   count, the step arena that op outputs and the autograd tape live in, GEMM workspace, the
   last error message and the log hook. There is no global state: two contexts never interact. */

typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERR_ARG,         /* NULL pointer or a value out of range */
    MOE_ERR_SHAPE,       /* shapes that do not fit together, zero or negative dims */
    MOE_ERR_DTYPE,       /* a dtype the operation does not take */
    MOE_ERR_MEMORY,      /* allocation failed, size overflow, arena limit reached */
    MOE_ERR_IO,          /* a file could not be opened, read or written */
    MOE_ERR_FORMAT,      /* a file's contents are truncated, corrupt or hostile */
    MOE_ERR_CONFIG,      /* an inconsistent model or training configuration */
    MOE_ERR_NUMERIC,     /* NaN or infinity where a finite value is required */
    MOE_ERR_STATE,       /* calls in an order the API does not allow */
    MOE_ERR_UNSUPPORTED  /* valid, but not built into this binary */
} moe_status;

/* The name of a status code, e.g. "MOE_ERR_SHAPE". */
MOE_API const char *moe_status_name(moe_status status);

typedef struct moe_ctx moe_ctx;

/* Create a context: threads = online cores, no arena limit, FP32 GEMMs, gradients on. */
MOE_API moe_status moe_ctx_new(moe_ctx **out);
/* Free the context and its arena (tensors made with moe_tensor_new are the caller's). */
MOE_API void moe_ctx_free(moe_ctx *ctx);
/* The message of the last error ("" if none). Safe to call with NULL. */
MOE_API const char *moe_ctx_error(const moe_ctx *ctx);
/* Number of worker threads for kernels (≥ 1). Results do not depend on it. */
MOE_API moe_status moe_ctx_set_threads(moe_ctx *ctx, int n_threads);
MOE_API int moe_ctx_threads(const moe_ctx *ctx);
/* Use the SIMD kernels (1, default) or the portable scalar ones (0). */
MOE_API moe_status moe_ctx_set_simd(moe_ctx *ctx, int enabled);
/* Cap the step arena at `bytes` (0 = no cap); an op that would exceed it fails. */
MOE_API moe_status moe_ctx_set_arena_limit(moe_ctx *ctx, size_t bytes);
/* Record ops on the autograd tape (1, default) or run forward-only (0, inference). */
MOE_API moe_status moe_ctx_set_grad_enabled(moe_ctx *ctx, int enabled);
/* End a step: forget the tape and every tensor that ops made since the last reset. */
MOE_API void moe_ctx_reset(moe_ctx *ctx);
/* Step-scoped scratch memory (64-byte aligned, zeroed), valid until moe_ctx_reset. */
MOE_API void *moe_ctx_scratch(moe_ctx *ctx, size_t bytes);
/* Heap allocations the context has made so far (to check a loop allocates nothing). */
MOE_API uint64_t moe_ctx_heap_allocs(const moe_ctx *ctx);
/* Bytes of the step arena in use now and at most since the context was made. */
MOE_API size_t moe_ctx_arena_used(const moe_ctx *ctx);
MOE_API size_t moe_ctx_arena_peak(const moe_ctx *ctx);

/* Log hook: level 0 = info, 1 = warning. Default: warnings to stderr, info dropped. */
typedef void (*moe_log_fn)(void *user, int level, const char *message);
MOE_API void moe_ctx_set_log(moe_ctx *ctx, moe_log_fn fn, void *user);

/* Counter-based RNG: value i of stream (key) is a pure function of (key, i), so a tensor
   filled in parallel gets the same numbers for any thread count. */
typedef struct moe_rng {
    uint64_t key;     /* derived from the seed and a stream id */
    uint64_t counter; /* index of the next value */
} moe_rng;

/* A 64-bit mix of (key, counter): the primitive every draw is built on. */
MOE_HD uint64_t moe_rng_hash(uint64_t key, uint64_t counter) {
    /* Two rounds of the splitmix64 finaliser over a Weyl sequence keyed by `key`. */
    uint64_t z = key ^ (counter * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    z = (z + key) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 32)) * 0xD6E8FEB86659FD93ull;
    return z ^ (z >> 32);
}
/* A generator for stream `stream` of `seed`. */
MOE_API moe_rng moe_rng_new(uint64_t seed, uint64_t stream);
MOE_API uint64_t moe_rng_next(moe_rng *rng);
/* Uniform in [0, 1) with 24 random bits. */
MOE_API float moe_rng_uniform(moe_rng *rng);
/* Standard normal (Box–Muller on two consecutive counters). */
MOE_API float moe_rng_normal(moe_rng *rng);

/* Wall-clock seconds from a monotonic clock. */
MOE_API double moe_time_s(void);

/* ============================================================================================
   2. numerics — low-precision formats and fine-grained FP8 quantisation
   ============================================================================================
   Conversions round to nearest, ties to even, keep subnormals and signed zeros, and match
   the CUDA host intrinsics bit for bit: __float2bfloat16_rn, __float2half_rn and
   __nv_cvt_float_to_fp8(x, __NV_SATFINITE, ...). NaN becomes the canonical NaN (bf16/f16
   0x7FFF, fp8 0x7F). E4M3 ("fn": no infinities, max 448) and E5M2 saturate out-of-range
   values and infinities to ±max finite, as SATFINITE does. */

MOE_HD uint32_t moe__f32_bits(float x) { union { float f; uint32_t u; } v; v.f = x; return v.u; }
MOE_HD float moe__bits_f32(uint32_t u) { union { float f; uint32_t u; } v; v.u = u; return v.f; }

MOE_HD uint16_t moe_f32_to_bf16(float x) {
    uint32_t u = moe__f32_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    /* Adding 0x7FFF plus the LSB of the kept part rounds half to even, carrying into the
       exponent when needed (up to infinity). */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
MOE_HD float moe_bf16_to_f32(uint16_t h) { return moe__bits_f32((uint32_t)h << 16); }

MOE_HD uint16_t moe_f32_to_f16(float x) {
    uint32_t u = moe__f32_bits(x), a = u & 0x7FFFFFFFu;
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (a > 0x7F800000u) return 0x7FFF;
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* ≥ 65520 rounds to inf */
    if (a >= 0x38800000u) {                                   /* normal in f16 */
        uint32_t r = a - 0x38000000u;                         /* rebias 127 → 15 */
        r = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
        return (uint16_t)(sign | r);
    }
    if (a < 0x33000001u) return sign; /* ≤ 2^-25: half the smallest subnormal rounds to 0 */
    {
        uint32_t e = a >> 23, mant = (a & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126u - e; /* result = mant >> (shift) in units of 2^-24 */
        uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
}
MOE_HD float moe_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return moe__bits_f32(sign | 0x7F800000u | (m << 13));
    if (e != 0) return moe__bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    if (m == 0) return moe__bits_f32(sign);
    return (sign ? -1.0f : 1.0f) * (float)m * 5.9604644775390625e-8f; /* m · 2^-24 */
}

/* FP8 encoder shared by both formats: `mbits` mantissa bits, exponent `bias`, the largest
   finite code `maxcode`, and `sat` = the magnitude above which values saturate. */
MOE_HD uint8_t moe__f32_to_fp8(float x, int mbits, int bias, uint8_t maxcode, float sat) {
    uint32_t u = moe__f32_bits(x);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    float a = moe__bits_f32(u & 0x7FFFFFFFu);
    int e;
    uint32_t au = u & 0x7FFFFFFFu, mant, q, rem, half, shift;
    if (au > 0x7F800000u) return 0x7F;
    if (a > sat) return (uint8_t)(sign | maxcode);
    e = (int)(au >> 23) - 127; /* unbiased float exponent; subnormal floats are far below range */
    if (au < 0x00800000u) return sign;
    mant = (au & 0x7FFFFFu) | 0x800000u; /* 24-bit significand, value = mant·2^(e-23) */
    if (e >= 1 - bias) { /* normal in fp8: keep mbits of fraction */
        shift = (uint32_t)(23 - mbits);
        q = mant >> shift;
        rem = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        /* q is 1.mmm (with the implicit bit) or overflowed to 10.000 — both encode right. */
        return (uint8_t)(sign | (((uint32_t)(e + bias) << mbits) + (q - (1u << mbits))));
    }
    /* subnormal in fp8: units of 2^(1-bias-mbits) */
    shift = (uint32_t)(23 - mbits + (1 - bias - e));
    if (shift > 31u) return sign;
    q = mant >> shift;
    rem = mant & ((1u << shift) - 1u);
    half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint8_t)(sign | q); /* q == 1<<mbits rolls into the smallest normal: correct */
}
MOE_HD float moe__fp8_to_f32(uint8_t v, int mbits, int bias) {
    int e = (v >> mbits) & ((1 << (7 - mbits)) - 1), m = v & ((1 << mbits) - 1);
    float mag;
    if (e == 0) mag = (float)m * moe__bits_f32((uint32_t)(127 + 1 - bias - mbits) << 23);
    else mag = (float)((1 << mbits) + m) * moe__bits_f32((uint32_t)(127 + e - bias - mbits) << 23);
    return (v & 0x80) ? -mag : mag;
}
MOE_HD uint8_t moe_f32_to_e4m3(float x) { return moe__f32_to_fp8(x, 3, 7, 0x7E, 464.0f); }
MOE_HD float moe_e4m3_to_f32(uint8_t v) {
    if ((v & 0x7F) == 0x7F) return moe__bits_f32(0x7FC00000u | ((uint32_t)(v & 0x80) << 24));
    return moe__fp8_to_f32(v, 3, 7);
}
/* E5M2: the tie at 61440 (maxnorm + half ulp) saturates too, as in CUDA. */
MOE_HD uint8_t moe_f32_to_e5m2(float x) { return moe__f32_to_fp8(x, 2, 15, 0x7B, 61439.996f); }
MOE_HD float moe_e5m2_to_f32(uint8_t v) {
    if ((v & 0x7C) == 0x7C) {
        uint32_t s = (uint32_t)(v & 0x80) << 24;
        return moe__bits_f32(s | ((v & 0x03) ? 0x7FC00000u : 0x7F800000u));
    }
    return moe__fp8_to_f32(v, 2, 15);
}

#define MOE_E4M3_MAX 448.0f
/* The scale of a quantisation tile: amax/448, so the largest element maps to ±448.
   An all-zero (or non-finite) tile gets scale 1; tiles so tiny that amax/448 would be a
   subnormal float get the smallest normal float, so q = x / scale never divides by 0. */
MOE_HD float moe_fp8_scale(float amax) {
    float s;
    if (!(amax > 0.0f && amax <= 3.4028234e38f)) return 1.0f;
    s = amax / MOE_E4M3_MAX;
    return s < 1.17549435e-38f ? 1.17549435e-38f : s; /* keep the scale a normal float */
}

/* 1×B tiles: x is [rows, cols]; scales[r·nb + j] covers row r, columns jB..jB+B-1
   (nb = ceil(cols/B), the last tile may be partial). q = e4m3(x / scale). */
MOE_API moe_status moe_fp8_quantize_tiles(moe_ctx *ctx, const float *x, int64_t rows, int64_t cols,
                                          int64_t block, uint8_t *q, float *scales);
/* B×B blocks: scales[(r/B)·nbc + c/B] with nbc = ceil(cols/B). */
MOE_API moe_status moe_fp8_quantize_blocks(moe_ctx *ctx, const float *x, int64_t rows, int64_t cols,
                                           int64_t block, uint8_t *q, float *scales);
MOE_API moe_status moe_fp8_dequantize_tiles(moe_ctx *ctx, const uint8_t *q, const float *scales,
                                            int64_t rows, int64_t cols, int64_t block, float *x);
MOE_API moe_status moe_fp8_dequantize_blocks(moe_ctx *ctx, const uint8_t *q, const float *scales,
                                             int64_t rows, int64_t cols, int64_t block, float *x);


/* ---- GPU (nvcc with MOE_CUDA; defined in moe_cuda.cuh) ---- */
#ifdef MOE_CUDA
typedef struct moe_gpu moe_gpu;
/* Number of usable GPUs (0 without a driver or device; that is not an error). */
MOE_API moe_status moe_cuda_device_count(moe_ctx *ctx, int *count);
MOE_API moe_status moe_cuda_init(moe_ctx *ctx, int device, moe_gpu **out);
MOE_API void moe_cuda_free(moe_gpu *gpu);
/* Wait for the GPU's stream. */
MOE_API moe_status moe_cuda_sync(moe_ctx *ctx, moe_gpu *gpu);
/* moe_fp8_quantize_tiles on device pointers, asynchronous on the GPU's stream. */
MOE_API moe_status moe_cuda_quantize_tiles(moe_ctx *ctx, moe_gpu *gpu, const float *x, int64_t rows, int64_t cols,
                                           int64_t block, uint8_t *q, float *scales);
#endif

/* ============================================================================================
   3. tensor
   ============================================================================================
   A moe_tensor is a dense row-major array of up to 4 dims with a dtype and a device tag, and
   optionally a gradient (same shape, MOE_F32) and FP8 scales. Views share their base's data. */

typedef enum moe_dtype {
    MOE_F32 = 0, /* moe_real: float (double under MOE_REAL_F64) */
    MOE_BF16,
    MOE_F16,
    MOE_FP8_E4M3,
    MOE_FP8_E5M2,
    MOE_I32,
    MOE_DTYPE_COUNT
} moe_dtype;

typedef enum moe_device { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 } moe_device;

#define MOE_MAX_DIMS 4

typedef struct moe_tensor moe_tensor;
struct moe_tensor {
    moe_dtype dtype;
    moe_device device;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t numel;
    void *data;
    moe_tensor *grad;     /* NULL unless gradients flow into this tensor */
    float *scales;        /* FP8 tensors: one scale per tile/block, else NULL */
    int64_t scale_block;  /* B of the tiles (1×B) or blocks (B×B) the scales cover */
    int scale_2d;         /* 1: B×B blocks over the last two dims; 0: 1×B tiles along the last dim */
    int requires_grad;    /* gradients are wanted for this tensor */
    int in_arena;         /* storage belongs to the step arena (made by an op) */
    moe_tensor *base;     /* a view's base tensor, else NULL */
};

/* Bytes per element (0 for an invalid dtype) and the dtype's name ("f32", "bf16", ...). */
MOE_API size_t moe_dtype_size(moe_dtype dtype);
MOE_API const char *moe_dtype_name(moe_dtype dtype);
/* A heap tensor, zero-filled; free it with moe_tensor_free. */
MOE_API moe_status moe_tensor_new(moe_ctx *ctx, moe_dtype dtype, int ndim, const int64_t *shape,
                                  moe_tensor **out);
MOE_API void moe_tensor_free(moe_ctx *ctx, moe_tensor *t);
/* A zero-filled tensor in the step arena, valid until moe_ctx_reset. */
MOE_API moe_status moe_tensor_temp(moe_ctx *ctx, moe_dtype dtype, int ndim, const int64_t *shape,
                                   moe_tensor **out);
/* Ask for gradients of a heap tensor (a parameter): allocates its zeroed grad. */
MOE_API moe_status moe_tensor_set_requires_grad(moe_ctx *ctx, moe_tensor *t, int on);
/* A view of `numel(shape)` elements starting at element `offset` of t (in the step arena). */
MOE_API moe_status moe_tensor_view(moe_ctx *ctx, moe_tensor *t, int ndim, const int64_t *shape,
                                   int64_t offset, moe_tensor **out);
/* Copy src into dst of the same shape, converting dtypes (to FP8 with 1×128 tile scales
   when dst has scales, else plain saturating casts). */
MOE_API moe_status moe_tensor_copy(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src);
MOE_API moe_status moe_tensor_fill(moe_ctx *ctx, moe_tensor *t, double value);
/* Fill with N(mean, std²) draws from rng (element i uses counter rng->counter + i). */
MOE_API moe_status moe_tensor_fill_normal(moe_ctx *ctx, moe_tensor *t, moe_rng *rng, float mean,
                                          float std);
/* Element i as double, whatever the dtype (no bounds check beyond i < numel → NaN). */
MOE_API double moe_tensor_get(const moe_tensor *t, int64_t i);
MOE_API moe_status moe_tensor_set(moe_tensor *t, int64_t i, double value);
/* Write "label: dtype[shape] first values..." through the context's log hook. */
MOE_API void moe_tensor_print(moe_ctx *ctx, const moe_tensor *t, const char *label);
/* Set t's gradient to zero (no-op when it has none). */
MOE_API void moe_tensor_zero_grad(moe_tensor *t);

/* ============================================================================================
   4. kernels — the public GEMM entry point (the other kernels are internal)
   ============================================================================================ */

/* C[m,n] = alpha·op(A)·op(B) + beta·C, row-major. op(A) is m×k: A is [m,k], or [k,m] with
   trans_a. op(B) is k×n: B is [k,n], or [n,k] with trans_b (a linear layer's x·Wᵀ).
   a_dtype/b_dtype: MOE_F32 or MOE_BF16 storage. compute: MOE_F32, or MOE_BF16 (operands
   rounded to bf16, FP32 accumulation). beta == 0 never reads C. */
typedef struct moe_gemm_args {
    int64_t m, n, k;
    const void *a; moe_dtype a_dtype; int64_t lda; int trans_a;
    const void *b; moe_dtype b_dtype; int64_t ldb; int trans_b;
    float *c; int64_t ldc;
    float alpha, beta;
    moe_dtype compute;
} moe_gemm_args;
MOE_API moe_status moe_gemm(moe_ctx *ctx, const moe_gemm_args *args);

/* Precision of the GEMMs inside differentiable ops and layers: MOE_F32 (default) or
   MOE_BF16 (operands rounded to bf16, FP32 accumulation; master weights stay FP32). */
MOE_API moe_status moe_ctx_set_gemm_precision(moe_ctx *ctx, moe_dtype compute);

/* ============================================================================================
   5. autograd — the tape, moe_backward and the differentiable ops
   ============================================================================================
   Each op checks its inputs, computes its output in the step arena and, when an input
   requires gradients and recording is on, appends a node to the tape. moe_backward(loss)
   walks the tape backwards, accumulating into every grad it reaches (parameters' grads
   accumulate across calls until zeroed: that is gradient accumulation). All ops take and
   give MOE_F32 tensors unless noted. */

/* Seed d(loss)/d(loss) = 1 for a one-element loss and run the tape backwards. The tape is
   used up either way; after an error, gradients may hold part of the step: zero them. */
MOE_API moe_status moe_backward(moe_ctx *ctx, moe_tensor *loss);

/* y = x·Wᵀ. x: [..., K]; W: [N, K] → y: [..., N]. Batched: W [B, N, K] with x [B, M, K]. */
MOE_API moe_status moe_matmul(moe_ctx *ctx, moe_tensor *x, moe_tensor *w, moe_tensor **y);
/* y = a + b; b has a's shape, or is a vector of a's last dim (broadcast over rows). */
MOE_API moe_status moe_add(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, moe_tensor **y);
/* y = a ⊙ b (same shapes). */
MOE_API moe_status moe_mul(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, moe_tensor **y);
/* y = s·x. */
MOE_API moe_status moe_scale(moe_ctx *ctx, moe_tensor *x, float s, moe_tensor **y);
/* y = Σ x, a one-element tensor. */
MOE_API moe_status moe_sum(moe_ctx *ctx, moe_tensor *x, moe_tensor **y);
/* y = w ⊙ x / sqrt(mean(x²) + eps) over the last dim; w: [last dim]. */
MOE_API moe_status moe_rmsnorm(moe_ctx *ctx, moe_tensor *x, moe_tensor *w, float eps, moe_tensor **y);

/* RoPE. Pair j of a head rotates by angle pos·f_j, f_j = theta^(-2j/dim) (YaRN-corrected
   when configured). MOE_ROPE_PAIRS rotates adjacent pairs (x[2j], x[2j+1]) — DeepSeek's
   reference layout, the one the released weights use; MOE_ROPE_HALVES rotates
   (x[j], x[j+dim/2]) — Hugging Face's rotate_half layout. */
typedef enum moe_rope_layout { MOE_ROPE_PAIRS = 0, MOE_ROPE_HALVES = 1 } moe_rope_layout;
/* YaRN context extension (all zero = off). */
typedef struct moe_yarn {
    double factor;              /* s, e.g. 40 */
    int64_t original_max_pos;   /* L0, e.g. 4096 */
    double beta_fast, beta_slow; /* 32, 1 */
    double mscale, mscale_all_dim;
} moe_yarn;
/* Precomputed cos/sin for positions [0, max_pos) of a rotary dim `dim` (even). */
typedef struct moe_rope_table {
    int64_t dim, max_pos;
    float *cos_sin; /* [max_pos][dim/2][2] */
} moe_rope_table;
MOE_API moe_status moe_rope_table_init(moe_ctx *ctx, moe_rope_table *table, int64_t dim,
                                       int64_t max_pos, double theta, const moe_yarn *yarn);
MOE_API void moe_rope_table_free(moe_rope_table *table);
/* x: [B, T, H, D] or [T, H, D]; token t sits at position pos0 + t. */
MOE_API moe_status moe_rope(moe_ctx *ctx, moe_tensor *x, const moe_rope_table *table, int64_t pos0,
                            moe_rope_layout layout, moe_tensor **y);

MOE_API moe_status moe_silu(moe_ctx *ctx, moe_tensor *x, moe_tensor **y);
/* y = silu(gate) ⊙ up. */
MOE_API moe_status moe_swiglu(moe_ctx *ctx, moe_tensor *gate, moe_tensor *up, moe_tensor **y);
/* Softmax over the last dim. */
MOE_API moe_status moe_softmax(moe_ctx *ctx, moe_tensor *x, moe_tensor **y);
/* Causal attention: q, k [B, T, H, Dk], v [B, T, H, Dv] → o [B, T, H, Dv] with
   o_t = Σ_{j≤t} softmax_j(scale·q_t·k_j) v_j, computed in key tiles with an online softmax
   (no T×T matrix is ever stored). 3-D inputs [T, H, D] mean B = 1. */
MOE_API moe_status moe_attention(moe_ctx *ctx, moe_tensor *q, moe_tensor *k, moe_tensor *v, float scale,
                                 moe_tensor **o);
/* y[i] = table[ids[i]]; ids: MOE_I32 of any shape, table: [V, D] → y: [ids..., D]. */
MOE_API moe_status moe_embedding(moe_ctx *ctx, moe_tensor *table, moe_tensor *ids, moe_tensor **y);
/* Mean over rows whose target != ignore_index of −log softmax(logits)[target].
   logits: [..., V]; targets: MOE_I32 [...]. */
MOE_API moe_status moe_cross_entropy(moe_ctx *ctx, moe_tensor *logits, moe_tensor *targets,
                                     int32_t ignore_index, moe_tensor **loss);
/* The k largest of each row of x [..., N]: values [..., k] (differentiable) and indices
   (MOE_I32), in descending order; ties go to the lower index. */
MOE_API moe_status moe_topk(moe_ctx *ctx, moe_tensor *x, int64_t k, moe_tensor **values,
                            moe_tensor **indices);
/* Rows: y[i] = x[idx[i]]; x: [N, D], idx: MOE_I32 [M] → y: [M, D]. */
MOE_API moe_status moe_gather(moe_ctx *ctx, moe_tensor *x, moe_tensor *idx, moe_tensor **y);
/* y: [n_rows, D] zero, then y[idx[i]] += src[i]; src: [M, D], idx: MOE_I32 [M]. */
MOE_API moe_status moe_scatter_add(moe_ctx *ctx, moe_tensor *src, moe_tensor *idx, int64_t n_rows,
                                   moe_tensor **y);
/* Join a and b along `dim` (all other dims equal). */
MOE_API moe_status moe_concat(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, int dim, moe_tensor **y);
/* Cut x along `dim` into the first `size0` entries and the rest. */
MOE_API moe_status moe_split(moe_ctx *ctx, moe_tensor *x, int dim, int64_t size0, moe_tensor **a,
                             moe_tensor **b);

#ifdef __cplusplus
}
#endif
#endif /* MOE_H */

/* ============================================================================================
   ============================================================================================
   IMPLEMENTATION
   ============================================================================================
   ============================================================================================ */
#if defined(MOE_IMPLEMENTATION) && !defined(MOE_IMPLEMENTATION_DONE)
#define MOE_IMPLEMENTATION_DONE

#if defined(__linux__) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if !defined(MOE_NO_SIMD) && (defined(__x86_64__) || defined(_M_X64) || defined(__i386__))
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#ifdef MOE_CBLAS
#include <cblas.h>
#endif

#if defined(MOE_MALLOC) && defined(MOE_FREE) && defined(MOE_REALLOC)
#elif !defined(MOE_MALLOC) && !defined(MOE_FREE) && !defined(MOE_REALLOC)
#define MOE_MALLOC(sz) malloc(sz)
#define MOE_REALLOC(p, sz) realloc(p, sz)
#define MOE_FREE(p) free(p)
#else
#error "define all of MOE_MALLOC, MOE_REALLOC and MOE_FREE, or none"
#endif
#ifndef MOE_ASSERT
#include <assert.h>
#define MOE_ASSERT(x) assert(x)
#endif

/* OpenMP pragmas through a macro so that builds without -fopenmp see no unknown pragma. */
#ifdef _OPENMP
#define MOE__OMP(directive) _Pragma(#directive)
#else
#define MOE__OMP(directive)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ============================================================================================
   1. base
   ============================================================================================ */

#define MOE__ALIGN 64
#define MOE__ARENA_MIN_BLOCK ((size_t)1 << 20)

/* One block of the step arena. The first block grows to the peak use of a step at each
   reset, so after the first step a loop of equal steps allocates nothing. */
typedef struct moe__arena_block {
    struct moe__arena_block *next;
    size_t cap, used;
    unsigned char *mem; /* MOE__ALIGN-aligned start inside the allocation */
} moe__arena_block;

typedef struct moe__node moe__node;

struct moe_ctx {
    int n_threads;
    int simd;
    int grad_enabled;
    moe_dtype gemm_compute;
    char error[512];
    moe_log_fn log_fn;
    void *log_user;
    uint64_t heap_allocs;
    /* step arena */
    moe__arena_block *arena;   /* current block first; older blocks follow */
    size_t arena_used;         /* bytes handed out since the last reset, all blocks */
    size_t arena_peak;
    size_t arena_limit;
    /* autograd tape: node pointers, capacity kept across steps */
    moe__node **tape;
    int64_t tape_len, tape_cap;
    /* GEMM packing workspace, grows to the largest call and stays */
    void *gemm_ws;
    size_t gemm_ws_size;
};

static const char *const moe__status_names[] = {
    "MOE_OK", "MOE_ERR_ARG", "MOE_ERR_SHAPE", "MOE_ERR_DTYPE", "MOE_ERR_MEMORY", "MOE_ERR_IO",
    "MOE_ERR_FORMAT", "MOE_ERR_CONFIG", "MOE_ERR_NUMERIC", "MOE_ERR_STATE", "MOE_ERR_UNSUPPORTED"};

MOE_API const char *moe_status_name(moe_status status) {
    if ((int)status < 0 || (int)status > (int)MOE_ERR_UNSUPPORTED) return "MOE_ERR_UNKNOWN";
    return moe__status_names[status];
}

/* Record an error message and return its status: `return moe__fail(ctx, MOE_ERR_ARG, ...)`. */
static moe_status moe__fail(moe_ctx *ctx, moe_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static moe_status moe__fail(moe_ctx *ctx, moe_status status, const char *fmt, ...) {
    if (ctx) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
        va_end(ap);
    }
    return status;
}

#define MOE__TRY(expr) do { moe_status moe__s = (expr); if (moe__s != MOE_OK) return moe__s; } while (0)
#define MOE__CHECK_CTX(ctx) do { if (!(ctx)) return MOE_ERR_ARG; } while (0)

static void moe__log(moe_ctx *ctx, int level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static void moe__log(moe_ctx *ctx, int level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ctx && ctx->log_fn) ctx->log_fn(ctx->log_user, level, msg);
    else if (level > 0) fprintf(stderr, "moe: %s\n", msg);
}

static void *moe__heap_alloc(moe_ctx *ctx, size_t bytes) {
    void *p = MOE_MALLOC(bytes ? bytes : 1);
    if (p && ctx) ctx->heap_allocs++;
    return p;
}
static void *moe__heap_calloc(moe_ctx *ctx, size_t bytes) {
    void *p = moe__heap_alloc(ctx, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

/* n·size with overflow detection; returns 0 and sets *out on success. */
static int moe__mul_overflows(size_t a, size_t b, size_t *out) {
    if (a && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
}

static int moe__default_threads(void) {
#ifdef _OPENMP
    int n = omp_get_num_procs();
    return n > 0 ? n : 1;
#elif defined(_SC_NPROCESSORS_ONLN)
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
#else
    return 1;
#endif
}

MOE_API moe_status moe_ctx_new(moe_ctx **out) {
    moe_ctx *ctx;
    if (!out) return MOE_ERR_ARG;
    *out = NULL;
    ctx = (moe_ctx *)MOE_MALLOC(sizeof *ctx);
    if (!ctx) return MOE_ERR_MEMORY;
    memset(ctx, 0, sizeof *ctx);
    ctx->heap_allocs = 1;
    ctx->n_threads = moe__default_threads();
    ctx->simd = 1;
    ctx->grad_enabled = 1;
    ctx->gemm_compute = MOE_F32;
    *out = ctx;
    return MOE_OK;
}

static void moe__arena_free_blocks(moe__arena_block *b) {
    while (b) {
        moe__arena_block *next = b->next;
        MOE_FREE(b);
        b = next;
    }
}

MOE_API void moe_ctx_free(moe_ctx *ctx) {
    if (!ctx) return;
    moe__arena_free_blocks(ctx->arena);
    MOE_FREE(ctx->tape);
    MOE_FREE(ctx->gemm_ws);
    MOE_FREE(ctx);
}

MOE_API const char *moe_ctx_error(const moe_ctx *ctx) {
    return ctx ? ctx->error : "moe_ctx is NULL";
}

MOE_API moe_status moe_ctx_set_threads(moe_ctx *ctx, int n_threads) {
    MOE__CHECK_CTX(ctx);
    if (n_threads < 1 || n_threads > 1024)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_threads: n_threads must be 1..1024, got %d", n_threads);
    ctx->n_threads = n_threads;
    return MOE_OK;
}
MOE_API int moe_ctx_threads(const moe_ctx *ctx) { return ctx ? ctx->n_threads : 1; }

MOE_API moe_status moe_ctx_set_simd(moe_ctx *ctx, int enabled) {
    MOE__CHECK_CTX(ctx);
    ctx->simd = enabled != 0;
    return MOE_OK;
}
MOE_API moe_status moe_ctx_set_arena_limit(moe_ctx *ctx, size_t bytes) {
    MOE__CHECK_CTX(ctx);
    ctx->arena_limit = bytes;
    return MOE_OK;
}
MOE_API moe_status moe_ctx_set_grad_enabled(moe_ctx *ctx, int enabled) {
    MOE__CHECK_CTX(ctx);
    ctx->grad_enabled = enabled != 0;
    return MOE_OK;
}
MOE_API moe_status moe_ctx_set_gemm_precision(moe_ctx *ctx, moe_dtype compute) {
    MOE__CHECK_CTX(ctx);
    if (compute != MOE_F32 && compute != MOE_BF16)
        return moe__fail(ctx, MOE_ERR_DTYPE, "moe_ctx_set_gemm_precision: want MOE_F32 or MOE_BF16, got %s",
                         moe_dtype_name(compute));
    ctx->gemm_compute = compute;
    return MOE_OK;
}
MOE_API void moe_ctx_set_log(moe_ctx *ctx, moe_log_fn fn, void *user) {
    if (!ctx) return;
    ctx->log_fn = fn;
    ctx->log_user = user;
}
MOE_API uint64_t moe_ctx_heap_allocs(const moe_ctx *ctx) { return ctx ? ctx->heap_allocs : 0; }
MOE_API size_t moe_ctx_arena_used(const moe_ctx *ctx) { return ctx ? ctx->arena_used : 0; }
MOE_API size_t moe_ctx_arena_peak(const moe_ctx *ctx) { return ctx ? ctx->arena_peak : 0; }

static moe__arena_block *moe__arena_block_new(moe_ctx *ctx, size_t cap) {
    size_t total = sizeof(moe__arena_block) + cap + MOE__ALIGN;
    moe__arena_block *b;
    if (total < cap) return NULL;
    b = (moe__arena_block *)moe__heap_alloc(ctx, total);
    if (!b) return NULL;
    b->next = NULL;
    b->cap = cap;
    b->used = 0;
    b->mem = (unsigned char *)(((uintptr_t)(b + 1) + MOE__ALIGN - 1) & ~(uintptr_t)(MOE__ALIGN - 1));
    return b;
}

/* Bump-allocate `bytes` (64-byte aligned, NOT zeroed) from the step arena. */
static void *moe__arena_alloc_raw(moe_ctx *ctx, size_t bytes) {
    moe__arena_block *b = ctx->arena;
    size_t need = (bytes + MOE__ALIGN - 1) & ~(size_t)(MOE__ALIGN - 1);
    void *p;
    if (need < bytes) return NULL;
    if (ctx->arena_limit && (need > ctx->arena_limit || ctx->arena_used > ctx->arena_limit - need)) return NULL;
    if (!b || b->cap - b->used < need) {
        size_t cap = need > MOE__ARENA_MIN_BLOCK ? need : MOE__ARENA_MIN_BLOCK;
        if (b && cap < b->cap) cap = b->cap; /* grow geometrically-ish while the first step runs */
        b = moe__arena_block_new(ctx, cap);
        if (!b) return NULL;
        b->next = ctx->arena;
        ctx->arena = b;
    }
    p = b->mem + b->used;
    b->used += need;
    ctx->arena_used += need;
    if (ctx->arena_used > ctx->arena_peak) ctx->arena_peak = ctx->arena_used;
    return p;
}

/* Zeroed arena memory for n elements of `size` bytes, with overflow checks and a message. */
static void *moe__arena_alloc(moe_ctx *ctx, size_t n, size_t size, const char *what) {
    size_t bytes;
    void *p;
    if (moe__mul_overflows(n, size, &bytes)) {
        moe__fail(ctx, MOE_ERR_MEMORY, "%s: size %zu x %zu overflows", what, n, size);
        return NULL;
    }
    p = moe__arena_alloc_raw(ctx, bytes);
    if (!p) {
        if (ctx->arena_limit)
            moe__fail(ctx, MOE_ERR_MEMORY, "%s: step arena limit of %zu bytes reached (%zu in use, %zu more wanted)",
                      what, ctx->arena_limit, ctx->arena_used, bytes);
        else
            moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory allocating %zu bytes", what, bytes);
        return NULL;
    }
    memset(p, 0, bytes);
    return p;
}

MOE_API void *moe_ctx_scratch(moe_ctx *ctx, size_t bytes) {
    if (!ctx) return NULL;
    return moe__arena_alloc(ctx, bytes, 1, "moe_ctx_scratch");
}

MOE_API void moe_ctx_reset(moe_ctx *ctx) {
    moe__arena_block *b;
    if (!ctx) return;
    ctx->tape_len = 0;
    b = ctx->arena;
    if (b && b->next) {
        /* The step needed several blocks: replace them by one that holds the whole step. */
        size_t want = ctx->arena_used;
        moe__arena_free_blocks(b);
        ctx->arena = moe__arena_block_new(ctx, want > MOE__ARENA_MIN_BLOCK ? want : MOE__ARENA_MIN_BLOCK);
    } else if (b) {
        b->used = 0;
    }
    ctx->arena_used = 0;
}

/* ---- RNG ---- */

MOE_API moe_rng moe_rng_new(uint64_t seed, uint64_t stream) {
    moe_rng r;
    r.key = moe_rng_hash(seed, stream ^ 0xA0761D6478BD642Full);
    r.counter = 0;
    return r;
}
MOE_API uint64_t moe_rng_next(moe_rng *rng) { return moe_rng_hash(rng->key, rng->counter++); }
MOE_HD float moe__u64_to_unit(uint64_t x) { return (float)(x >> 40) * (1.0f / 16777216.0f); }
MOE_API float moe_rng_uniform(moe_rng *rng) { return moe__u64_to_unit(moe_rng_next(rng)); }
/* A normal draw from the two uniforms at counters c and c+1 (Box–Muller, in double). */
static double moe__rng_normal_at(uint64_t key, uint64_t c) {
    double u1 = ((double)(moe_rng_hash(key, c) >> 11) + 1.0) * (1.0 / 9007199254740992.0); /* (0,1] */
    double u2 = (double)(moe_rng_hash(key, c + 1) >> 11) * (1.0 / 9007199254740992.0);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
MOE_API float moe_rng_normal(moe_rng *rng) {
    float v = (float)moe__rng_normal_at(rng->key, rng->counter);
    rng->counter += 2;
    return v;
}

MOE_API double moe_time_s(void) {
#if defined(CLOCK_MONOTONIC)
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

/* ============================================================================================
   2. numerics
   ============================================================================================ */

static moe_status moe__check_quant_args(moe_ctx *ctx, const char *fn, const void *src, const void *dst,
                                        const float *scales, int64_t rows, int64_t cols, int64_t block) {
    MOE__CHECK_CTX(ctx);
    if (!src || !dst || !scales) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL data or scales pointer", fn);
    if (rows < 0 || cols < 0) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: negative shape [%lld, %lld]", fn, (long long)rows, (long long)cols);
    if (block <= 0) return moe__fail(ctx, MOE_ERR_ARG, "%s: block size must be positive, got %lld", fn, (long long)block);
    return MOE_OK;
}

static float moe__amax(const float *x, int64_t n) {
    float m = 0.0f;
    int64_t i;
    for (i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m; /* NaN never wins, so a NaN tile keeps a finite scale */
    }
    return m;
}

MOE_API moe_status moe_fp8_quantize_tiles(moe_ctx *ctx, const float *x, int64_t rows, int64_t cols,
                                          int64_t block, uint8_t *q, float *scales) {
    int64_t nb, r;
    MOE__TRY(moe__check_quant_args(ctx, "moe_fp8_quantize_tiles", x, q, scales, rows, cols, block));
    nb = (cols + block - 1) / block;
    MOE__OMP(omp parallel for num_threads(ctx->n_threads) schedule(static) if (rows * cols > 65536))
    for (r = 0; r < rows; r++) {
        int64_t j, i;
        for (j = 0; j < nb; j++) {
            int64_t c0 = j * block, n = cols - c0 < block ? cols - c0 : block;
            const float *src = x + r * cols + c0;
            float s = moe_fp8_scale(moe__amax(src, n));
            scales[r * nb + j] = s;
            for (i = 0; i < n; i++) q[r * cols + c0 + i] = moe_f32_to_e4m3(src[i] / s);
        }
    }
    return MOE_OK;
}

MOE_API moe_status moe_fp8_dequantize_tiles(moe_ctx *ctx, const uint8_t *q, const float *scales,
                                            int64_t rows, int64_t cols, int64_t block, float *x) {
    int64_t nb, r;
    MOE__TRY(moe__check_quant_args(ctx, "moe_fp8_dequantize_tiles", q, x, scales, rows, cols, block));
    nb = (cols + block - 1) / block;
    MOE__OMP(omp parallel for num_threads(ctx->n_threads) schedule(static) if (rows * cols > 65536))
    for (r = 0; r < rows; r++) {
        int64_t c;
        for (c = 0; c < cols; c++) x[r * cols + c] = moe_e4m3_to_f32(q[r * cols + c]) * scales[r * nb + c / block];
    }
    return MOE_OK;
}

MOE_API moe_status moe_fp8_quantize_blocks(moe_ctx *ctx, const float *x, int64_t rows, int64_t cols,
                                           int64_t block, uint8_t *q, float *scales) {
    int64_t nbr, nbc, bi;
    MOE__TRY(moe__check_quant_args(ctx, "moe_fp8_quantize_blocks", x, q, scales, rows, cols, block));
    nbr = (rows + block - 1) / block;
    nbc = (cols + block - 1) / block;
    MOE__OMP(omp parallel for num_threads(ctx->n_threads) schedule(static) if (rows * cols > 65536))
    for (bi = 0; bi < nbr * nbc; bi++) {
        int64_t br = bi / nbc, bc = bi % nbc, r0 = br * block, c0 = bc * block;
        int64_t nr = rows - r0 < block ? rows - r0 : block, nc = cols - c0 < block ? cols - c0 : block, r, c;
        float amax = 0.0f, s;
        for (r = 0; r < nr; r++) {
            float m = moe__amax(x + (r0 + r) * cols + c0, nc);
            amax = m > amax ? m : amax;
        }
        s = moe_fp8_scale(amax);
        scales[bi] = s;
        for (r = 0; r < nr; r++)
            for (c = 0; c < nc; c++) q[(r0 + r) * cols + c0 + c] = moe_f32_to_e4m3(x[(r0 + r) * cols + c0 + c] / s);
    }
    return MOE_OK;
}

MOE_API moe_status moe_fp8_dequantize_blocks(moe_ctx *ctx, const uint8_t *q, const float *scales,
                                             int64_t rows, int64_t cols, int64_t block, float *x) {
    int64_t nbc, r;
    MOE__TRY(moe__check_quant_args(ctx, "moe_fp8_dequantize_blocks", q, x, scales, rows, cols, block));
    nbc = (cols + block - 1) / block;
    MOE__OMP(omp parallel for num_threads(ctx->n_threads) schedule(static) if (rows * cols > 65536))
    for (r = 0; r < rows; r++) {
        int64_t c;
        for (c = 0; c < cols; c++)
            x[r * cols + c] = moe_e4m3_to_f32(q[r * cols + c]) * scales[(r / block) * nbc + c / block];
    }
    return MOE_OK;
}

/* ============================================================================================
   3. tensor
   ============================================================================================ */

static const size_t moe__dtype_sizes[MOE_DTYPE_COUNT] = {sizeof(moe_real), 2, 2, 1, 1, 4};
static const char *const moe__dtype_names[MOE_DTYPE_COUNT] = {"f32", "bf16", "f16", "fp8_e4m3", "fp8_e5m2", "i32"};

MOE_API size_t moe_dtype_size(moe_dtype dtype) {
    return ((int)dtype >= 0 && dtype < MOE_DTYPE_COUNT) ? moe__dtype_sizes[dtype] : 0;
}
MOE_API const char *moe_dtype_name(moe_dtype dtype) {
    return ((int)dtype >= 0 && dtype < MOE_DTYPE_COUNT) ? moe__dtype_names[dtype] : "invalid";
}

#define MOE__MAX_ELEMS ((int64_t)1 << 48)

/* Validate dtype and shape, fill t's metadata (no data). */
static moe_status moe__tensor_meta(moe_ctx *ctx, const char *fn, moe_tensor *t, moe_dtype dtype, int ndim,
                                   const int64_t *shape) {
    int i;
    int64_t n = 1;
    memset(t, 0, sizeof *t);
    if ((int)dtype < 0 || dtype >= MOE_DTYPE_COUNT) return moe__fail(ctx, MOE_ERR_DTYPE, "%s: invalid dtype %d", fn, (int)dtype);
    if (ndim < 1 || ndim > MOE_MAX_DIMS) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: ndim must be 1..%d, got %d", fn, MOE_MAX_DIMS, ndim);
    if (!shape) return moe__fail(ctx, MOE_ERR_ARG, "%s: shape is NULL", fn);
    for (i = 0; i < ndim; i++) {
        if (shape[i] <= 0) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: dim %d is %lld, dims must be positive", fn, i, (long long)shape[i]);
        if (shape[i] > MOE__MAX_ELEMS / n) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: shape too large (more than 2^48 elements)", fn);
        n *= shape[i];
        t->shape[i] = shape[i];
    }
    t->dtype = dtype;
    t->ndim = ndim;
    t->numel = n;
    t->device = MOE_DEVICE_CPU;
    return MOE_OK;
}

MOE_API moe_status moe_tensor_new(moe_ctx *ctx, moe_dtype dtype, int ndim, const int64_t *shape, moe_tensor **out) {
    moe_tensor meta, *t;
    size_t bytes;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_new: out is NULL");
    *out = NULL;
    MOE__TRY(moe__tensor_meta(ctx, "moe_tensor_new", &meta, dtype, ndim, shape));
    bytes = (size_t)meta.numel * moe_dtype_size(dtype);
    t = (moe_tensor *)moe__heap_alloc(ctx, sizeof *t);
    if (!t) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_tensor_new: out of memory");
    *t = meta;
    t->data = moe__heap_calloc(ctx, bytes);
    if (!t->data) {
        MOE_FREE(t);
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_tensor_new: out of memory for %zu bytes", bytes);
    }
    *out = t;
    return MOE_OK;
}

MOE_API void moe_tensor_free(moe_ctx *ctx, moe_tensor *t) {
    (void)ctx;
    if (!t || t->in_arena) return; /* arena tensors go with moe_ctx_reset */
    if (t->grad) {
        MOE_FREE(t->grad->data);
        MOE_FREE(t->grad);
    }
    if (!t->base) {
        MOE_FREE(t->data);
        MOE_FREE(t->scales);
    }
    MOE_FREE(t);
}

MOE_API moe_status moe_tensor_temp(moe_ctx *ctx, moe_dtype dtype, int ndim, const int64_t *shape, moe_tensor **out) {
    moe_tensor meta, *t;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_temp: out is NULL");
    *out = NULL;
    MOE__TRY(moe__tensor_meta(ctx, "moe_tensor_temp", &meta, dtype, ndim, shape));
    t = (moe_tensor *)moe__arena_alloc(ctx, 1, sizeof *t, "moe_tensor_temp");
    if (!t) return MOE_ERR_MEMORY;
    *t = meta;
    t->in_arena = 1;
    t->data = moe__arena_alloc(ctx, (size_t)meta.numel, moe_dtype_size(dtype), "moe_tensor_temp");
    if (!t->data) return MOE_ERR_MEMORY;
    *out = t;
    return MOE_OK;
}

MOE_API moe_status moe_tensor_set_requires_grad(moe_ctx *ctx, moe_tensor *t, int on) {
    MOE__CHECK_CTX(ctx);
    if (!t) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_set_requires_grad: tensor is NULL");
    if (on && t->dtype != MOE_F32)
        return moe__fail(ctx, MOE_ERR_DTYPE, "moe_tensor_set_requires_grad: only f32 tensors take gradients, this one is %s",
                         moe_dtype_name(t->dtype));
    if (on && t->in_arena)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_set_requires_grad: use it on heap tensors (parameters), not op outputs");
    t->requires_grad = on != 0;
    if (on && !t->grad) {
        moe_tensor *g;
        MOE__TRY(moe_tensor_new(ctx, MOE_F32, t->ndim, t->shape, &g));
        t->grad = g;
    }
    return MOE_OK;
}

static double moe__load(const void *data, moe_dtype dtype, int64_t i) {
    switch (dtype) {
    case MOE_F32: return (double)((const moe_real *)data)[i];
    case MOE_BF16: return moe_bf16_to_f32(((const uint16_t *)data)[i]);
    case MOE_F16: return moe_f16_to_f32(((const uint16_t *)data)[i]);
    case MOE_FP8_E4M3: return moe_e4m3_to_f32(((const uint8_t *)data)[i]);
    case MOE_FP8_E5M2: return moe_e5m2_to_f32(((const uint8_t *)data)[i]);
    case MOE_I32: return (double)((const int32_t *)data)[i];
    default: return NAN;
    }
}
static void moe__store(void *data, moe_dtype dtype, int64_t i, double v) {
    switch (dtype) {
    case MOE_F32: ((moe_real *)data)[i] = (moe_real)v; break;
    case MOE_BF16: ((uint16_t *)data)[i] = moe_f32_to_bf16((float)v); break;
    case MOE_F16: ((uint16_t *)data)[i] = moe_f32_to_f16((float)v); break;
    case MOE_FP8_E4M3: ((uint8_t *)data)[i] = moe_f32_to_e4m3((float)v); break;
    case MOE_FP8_E5M2: ((uint8_t *)data)[i] = moe_f32_to_e5m2((float)v); break;
    case MOE_I32: ((int32_t *)data)[i] = (int32_t)v; break;
    default: break;
    }
}

/* Value i of t including its FP8 scale, if any. */
static double moe__tensor_value(const moe_tensor *t, int64_t i) {
    double v = moe__load(t->data, t->dtype, i);
    if (t->scales) {
        int64_t last = t->shape[t->ndim - 1], B = t->scale_block, r = i / last, c = i % last;
        int64_t nb = (last + B - 1) / B;
        if (t->scale_2d) v *= t->scales[(r / B) * nb + c / B];
        else v *= t->scales[r * nb + c / B];
    }
    return v;
}

MOE_API double moe_tensor_get(const moe_tensor *t, int64_t i) {
    if (!t || !t->data || i < 0 || i >= t->numel) return NAN;
    return moe__tensor_value(t, i);
}
MOE_API moe_status moe_tensor_set(moe_tensor *t, int64_t i, double value) {
    if (!t || !t->data || i < 0 || i >= t->numel || t->scales) return MOE_ERR_ARG;
    moe__store(t->data, t->dtype, i, value);
    return MOE_OK;
}

static int moe__same_shape(const moe_tensor *a, const moe_tensor *b) {
    int i;
    if (a->ndim != b->ndim) return 0;
    for (i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

/* "[2, 3, 4]" into buf. */
static const char *moe__shape_str(const moe_tensor *t, char *buf, size_t size) {
    int i;
    size_t used = 0;
    buf[0] = 0;
    if (!t) return "(null)";
    used += (size_t)snprintf(buf, size, "[");
    for (i = 0; i < t->ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (used < size) snprintf(buf + used, size - used, "]");
    return buf;
}

MOE_API moe_status moe_tensor_copy(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src) {
    int64_t i;
    MOE__CHECK_CTX(ctx);
    if (!dst || !src || !dst->data || !src->data) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_copy: NULL tensor");
    if (dst->numel != src->numel) {
        char a[96], b[96];
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_tensor_copy: dst %s and src %s differ in size",
                         moe__shape_str(dst, a, sizeof a), moe__shape_str(src, b, sizeof b));
    }
    if (dst->dtype == MOE_FP8_E4M3 && dst->scales) {
        /* Quantise through float tiles, row by row of the last dim. */
        int64_t last = dst->shape[dst->ndim - 1], rows = dst->numel / last, B = dst->scale_block;
        float *tmp = (float *)moe__arena_alloc(ctx, (size_t)dst->numel, sizeof(float), "moe_tensor_copy");
        if (!tmp) return MOE_ERR_MEMORY;
        for (i = 0; i < src->numel; i++) tmp[i] = (float)moe__tensor_value(src, i);
        if (dst->scale_2d) return moe_fp8_quantize_blocks(ctx, tmp, rows, last, B, (uint8_t *)dst->data, dst->scales);
        return moe_fp8_quantize_tiles(ctx, tmp, rows, last, B, (uint8_t *)dst->data, dst->scales);
    }
    if (dst->dtype == src->dtype && !src->scales) {
        memmove(dst->data, src->data, (size_t)src->numel * moe_dtype_size(src->dtype));
        return MOE_OK;
    }
    for (i = 0; i < src->numel; i++) moe__store(dst->data, dst->dtype, i, moe__tensor_value(src, i));
    return MOE_OK;
}

MOE_API moe_status moe_tensor_fill(moe_ctx *ctx, moe_tensor *t, double value) {
    int64_t i;
    MOE__CHECK_CTX(ctx);
    if (!t || !t->data) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_fill: NULL tensor");
    if (t->scales) return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_tensor_fill: fill a scaled FP8 tensor via moe_tensor_copy");
    for (i = 0; i < t->numel; i++) moe__store(t->data, t->dtype, i, value);
    return MOE_OK;
}

MOE_API moe_status moe_tensor_fill_normal(moe_ctx *ctx, moe_tensor *t, moe_rng *rng, float mean, float std) {
    int64_t i;
    MOE__CHECK_CTX(ctx);
    if (!t || !t->data || !rng) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_fill_normal: NULL tensor or rng");
    if (t->dtype == MOE_I32 || t->scales) return moe__fail(ctx, MOE_ERR_DTYPE, "moe_tensor_fill_normal: needs a float tensor");
    if (!(std >= 0.0f) || !isfinite(std) || !isfinite(mean))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_fill_normal: mean and std must be finite, std >= 0 (got %g, %g)", (double)mean, (double)std);
    for (i = 0; i < t->numel; i++)
        moe__store(t->data, t->dtype, i, (double)mean + (double)std * moe__rng_normal_at(rng->key, rng->counter + 2 * (uint64_t)i));
    rng->counter += 2 * (uint64_t)t->numel;
    return MOE_OK;
}

MOE_API void moe_tensor_print(moe_ctx *ctx, const moe_tensor *t, const char *label) {
    char line[1024], shape[96];
    size_t used;
    int64_t i, n;
    if (!t) {
        moe__log(ctx, 0, "%s: (null)", label ? label : "tensor");
        return;
    }
    used = (size_t)snprintf(line, sizeof line, "%s: %s%s", label ? label : "tensor", moe_dtype_name(t->dtype),
                            moe__shape_str(t, shape, sizeof shape));
    n = t->numel < 8 ? t->numel : 8;
    for (i = 0; i < n && used < sizeof line; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, " %.6g", moe__tensor_value(t, i));
    if (t->numel > n && used < sizeof line) snprintf(line + used, sizeof line - used, " ...");
    moe__log(ctx, 0, "%s", line);
}

MOE_API void moe_tensor_zero_grad(moe_tensor *t) {
    if (t && t->grad && t->grad->data) memset(t->grad->data, 0, (size_t)t->grad->numel * sizeof(moe_real));
}

/* ============================================================================================
   4. kernels
   ============================================================================================
   Plain loops over moe_real arrays, each a forward and a backward. Work is split over rows
   (or heads) that no two threads share; sums across rows use fixed row chunks whose partial
   results are added in chunk order, so the thread count never changes a result bit. */

static moe_real moe__exp(moe_real x) {
#ifdef MOE_REAL_F64
    return exp(x);
#else
    return expf(x);
#endif
}
static moe_real moe__ln(moe_real x) {
#ifdef MOE_REAL_F64
    return log(x);
#else
    return logf(x);
#endif
}
static moe_real moe__sqrt(moe_real x) {
#ifdef MOE_REAL_F64
    return sqrt(x);
#else
    return sqrtf(x);
#endif
}

/* Element-wise math shared with the CUDA kernels. */
MOE_HD moe_real moe_sigmoid_scalar(moe_real x) { return (moe_real)1 / ((moe_real)1 + (moe_real)exp(-(double)x)); }
MOE_HD moe_real moe_silu_scalar(moe_real x) { return x * moe_sigmoid_scalar(x); }
/* d silu / dx = σ(x)·(1 + x·(1 − σ(x))) */
MOE_HD moe_real moe_silu_grad_scalar(moe_real x) {
    moe_real s = moe_sigmoid_scalar(x);
    return s * ((moe_real)1 + x * ((moe_real)1 - s));
}
/* Rotate the pair (a, b) by the angle whose cosine/sine are (c, s); the backward pass
   rotates by the negative angle: moe_rope_rotate(da, db, c, -s). */
MOE_HD void moe_rope_rotate(moe_real *a, moe_real *b, moe_real c, moe_real s) {
    moe_real x0 = *a, x1 = *b;
    *a = x0 * c - x1 * s;
    *b = x0 * s + x1 * c;
}

#define MOE__ROW_CHUNK 64 /* rows per partial sum in cross-row reductions */

/* ---- GEMM ------------------------------------------------------------------------------- */

/* op(A) element (i, p) and op(B) element (p, j) for the portable path. */
#define MOE__GEMM_A(i, p) (ta ? A[(p) * lda + (i)] : A[(i) * lda + (p)])
#define MOE__GEMM_B(p, j) (tb ? B[(j) * ldb + (p)] : B[(p) * ldb + (j)])

static moe_real moe__round_bf16(moe_real x) { return (moe_real)moe_bf16_to_f32(moe_f32_to_bf16((float)x)); }

/* The portable GEMM on moe_real: c[i,j] = alpha·Σ_p a·b + beta·c, p ascending. Also the
   double-precision path of MOE_REAL_F64 builds. bf16 rounds each operand first. */
static void moe__gemm_portable(int n_threads, int ta, int tb, int64_t m, int64_t n, int64_t k, moe_real alpha,
                               const moe_real *A, int64_t lda, const moe_real *B, int64_t ldb, moe_real beta,
                               moe_real *C, int64_t ldc, int bf16) {
    int64_t i;
    (void)n_threads;
    MOE__OMP(omp parallel for num_threads(n_threads) schedule(static) if (m * n * k > 32768))
    for (i = 0; i < m; i++) {
        int64_t j, p;
        for (j = 0; j < n; j++) {
            moe_real acc = 0;
            if (bf16) {
                for (p = 0; p < k; p++) acc += moe__round_bf16(MOE__GEMM_A(i, p)) * moe__round_bf16(MOE__GEMM_B(p, j));
            } else {
                for (p = 0; p < k; p++) acc += MOE__GEMM_A(i, p) * MOE__GEMM_B(p, j);
            }
            C[i * ldc + j] = beta == 0 ? alpha * acc : alpha * acc + beta * C[i * ldc + j];
        }
    }
}

/* @@GEMM_PART@@ */

#if defined(MOE__HAVE_SIMD_GEMM) && !defined(MOE_REAL_F64)
/* Grow the context's GEMM workspace to `bytes`; it is kept for later calls. */
static void *moe__gemm_workspace(moe_ctx *ctx, size_t bytes) {
    if (bytes > ctx->gemm_ws_size) {
        void *p = moe__heap_alloc(ctx, bytes);
        if (!p) return NULL;
        MOE_FREE(ctx->gemm_ws);
        ctx->gemm_ws = p;
        ctx->gemm_ws_size = bytes;
    }
    return ctx->gemm_ws;
}
#endif

/* C = alpha·op(A)·op(B) + beta·C on moe_real arrays, in the context's precision `bf16`. */
static moe_status moe__gemm(moe_ctx *ctx, int ta, int tb, int64_t m, int64_t n, int64_t k, moe_real alpha,
                            const moe_real *A, int64_t lda, const moe_real *B, int64_t ldb, moe_real beta,
                            moe_real *C, int64_t ldc, int bf16) {
    if (m == 0 || n == 0) return MOE_OK;
#if defined(MOE__HAVE_SIMD_GEMM) && !defined(MOE_REAL_F64)
    if (ctx->simd) {
        moe__gemm_desc d;
        void *ws;
#ifdef MOE_CBLAS
        if (!bf16) {
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)m, (int)n,
                        (int)k, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
            return MOE_OK;
        }
#endif
        memset(&d, 0, sizeof d);
        d.m = m; d.n = n; d.k = k;
        d.a = A; d.lda = lda; d.a_trans = ta;
        d.b = B; d.ldb = ldb; d.b_trans = tb;
        d.c = C; d.ldc = ldc;
        d.alpha = alpha; d.beta = beta;
        d.bf16_compute = bf16;
        ws = moe__gemm_workspace(ctx, moe__gemm_workspace_bytes(&d, ctx->n_threads));
        if (!ws) return moe__fail(ctx, MOE_ERR_MEMORY, "gemm: out of memory for the packing workspace");
        moe__gemm_run(&d, moe__gemm_best_isa(), ctx->n_threads, ws);
        return MOE_OK;
    }
#endif
    moe__gemm_portable(ctx->n_threads, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, bf16);
    return MOE_OK;
}

MOE_API moe_status moe_gemm(moe_ctx *ctx, const moe_gemm_args *g) {
    MOE__CHECK_CTX(ctx);
    if (!g) return moe__fail(ctx, MOE_ERR_ARG, "moe_gemm: args is NULL");
    if (g->m < 0 || g->n < 0 || g->k < 0)
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_gemm: negative size m=%lld n=%lld k=%lld", (long long)g->m,
                         (long long)g->n, (long long)g->k);
    if ((g->m && g->n && !g->c) || (g->m && g->n && g->k && (!g->a || !g->b)))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_gemm: NULL operand");
    if ((g->a_dtype != MOE_F32 && g->a_dtype != MOE_BF16) || (g->b_dtype != MOE_F32 && g->b_dtype != MOE_BF16))
        return moe__fail(ctx, MOE_ERR_DTYPE, "moe_gemm: operands must be f32 or bf16, got %s and %s",
                         moe_dtype_name(g->a_dtype), moe_dtype_name(g->b_dtype));
    if (g->compute != MOE_F32 && g->compute != MOE_BF16)
        return moe__fail(ctx, MOE_ERR_DTYPE, "moe_gemm: compute must be f32 or bf16, got %s", moe_dtype_name(g->compute));
    if (g->lda < (g->trans_a ? g->m : g->k) || g->ldb < (g->trans_b ? g->k : g->n) || g->ldc < g->n)
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_gemm: leading dimension smaller than the row length");
#if defined(MOE__HAVE_SIMD_GEMM) && !defined(MOE_REAL_F64)
    {
        moe__gemm_desc d;
        void *ws;
        if (g->m == 0 || g->n == 0) return MOE_OK;
        memset(&d, 0, sizeof d);
        d.m = g->m; d.n = g->n; d.k = g->k;
        d.a = g->a; d.lda = g->lda; d.a_trans = g->trans_a; d.a_bf16 = g->a_dtype == MOE_BF16;
        d.b = g->b; d.ldb = g->ldb; d.b_trans = g->trans_b; d.b_bf16 = g->b_dtype == MOE_BF16;
        d.c = g->c; d.ldc = g->ldc;
        d.alpha = g->alpha; d.beta = g->beta;
        d.bf16_compute = g->compute == MOE_BF16;
        ws = moe__gemm_workspace(ctx, moe__gemm_workspace_bytes(&d, ctx->n_threads));
        if (!ws) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_gemm: out of memory for the packing workspace");
        moe__gemm_run(&d, ctx->simd ? moe__gemm_best_isa() : MOE__GEMM_SCALAR, ctx->n_threads, ws);
        return MOE_OK;
    }
#else
    if (g->a_dtype != MOE_F32 || g->b_dtype != MOE_F32 || sizeof(moe_real) != sizeof(float))
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_gemm: this build has only the portable f32 path");
    moe__gemm_portable(ctx->n_threads, g->trans_a, g->trans_b, g->m, g->n, g->k, (moe_real)g->alpha,
                       (const moe_real *)g->a, g->lda, (const moe_real *)g->b, g->ldb, (moe_real)g->beta,
                       (moe_real *)g->c, g->ldc, g->compute == MOE_BF16);
    return MOE_OK;
#endif
}

/* ---- RMSNorm ---------------------------------------------------------------------------- */

/* y = w ⊙ x·rstd per row of length d; rstd[r] = 1/sqrt(mean(x²)+eps) is kept for backward. */
static void moe__rmsnorm_fwd(int nt, const moe_real *x, const moe_real *w, moe_real *y, moe_real *rstd, int64_t rows,
                             int64_t d, moe_real eps) {
    int64_t r;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (rows * d > 16384))
    for (r = 0; r < rows; r++) {
        const moe_real *xr = x + r * d;
        moe_real *yr = y + r * d, ss = 0, rs;
        int64_t i;
        for (i = 0; i < d; i++) ss += xr[i] * xr[i];
        rs = (moe_real)1 / moe__sqrt(ss / (moe_real)d + eps);
        if (rstd) rstd[r] = rs;
        for (i = 0; i < d; i++) yr[i] = w[i] * (xr[i] * rs);
    }
}

/* dx (+)= rstd·(g − x̂·mean(g⊙x̂)), g = dy⊙w; dw += Σ_rows dy⊙x̂. dx or dw may be NULL.
   `partial` is scratch of ceil(rows/64)·d values for the fixed-order dw reduction. */
static void moe__rmsnorm_bwd(int nt, const moe_real *x, const moe_real *w, const moe_real *rstd, const moe_real *dy,
                             moe_real *dx, moe_real *dw, moe_real *partial, int64_t rows, int64_t d) {
    int64_t nchunks = (rows + MOE__ROW_CHUNK - 1) / MOE__ROW_CHUNK, c;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (rows * d > 16384))
    for (c = 0; c < nchunks; c++) {
        int64_t r, i, r1 = (c + 1) * MOE__ROW_CHUNK < rows ? (c + 1) * MOE__ROW_CHUNK : rows;
        moe_real *pw = dw ? partial + c * d : NULL;
        if (pw) memset(pw, 0, (size_t)d * sizeof(moe_real));
        for (r = c * MOE__ROW_CHUNK; r < r1; r++) {
            const moe_real *xr = x + r * d, *dyr = dy + r * d;
            moe_real rs = rstd[r], dot = 0;
            for (i = 0; i < d; i++) dot += dyr[i] * w[i] * (xr[i] * rs);
            dot /= (moe_real)d;
            if (dx)
                for (i = 0; i < d; i++) dx[r * d + i] += rs * (dyr[i] * w[i] - xr[i] * rs * dot);
            if (pw)
                for (i = 0; i < d; i++) pw[i] += dyr[i] * (xr[i] * rs);
        }
    }
    if (dw)
        for (c = 0; c < nchunks; c++) {
            int64_t i;
            for (i = 0; i < d; i++) dw[i] += partial[c * d + i];
        }
}

/* ---- RoPE ------------------------------------------------------------------------------- */

/* Rotate x [B, T, H, D] in place, token t at position pos0 + t; `sign` −1 undoes it. */
static void moe__rope_apply(int nt, moe_real *x, const float *cs, int64_t B, int64_t T, int64_t H, int64_t D,
                            int64_t pos0, moe_rope_layout layout, moe_real sign) {
    int64_t bt;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (B * T * H * D > 16384))
    for (bt = 0; bt < B * T; bt++) {
        const float *row = cs + (pos0 + bt % T) * D; /* [D/2][2] cos, sin */
        int64_t h, j, half = D / 2;
        for (h = 0; h < H; h++) {
            moe_real *v = x + (bt * H + h) * D;
            for (j = 0; j < half; j++) {
                moe_real c = (moe_real)row[2 * j], s = sign * (moe_real)row[2 * j + 1];
                if (layout == MOE_ROPE_PAIRS) moe_rope_rotate(&v[2 * j], &v[2 * j + 1], c, s);
                else moe_rope_rotate(&v[j], &v[j + half], c, s);
            }
        }
    }
}

/* f'_j of YaRN (reference §2.3): keep low-index (high-frequency) pairs, divide the rest by
   the factor, with a linear ramp between beta_fast and beta_slow correction dims. */
static double moe__yarn_freq(double f, int64_t j, int64_t dim, double theta, const moe_yarn *y) {
    double lo, hi, ramp;
    if (!y || y->factor <= 1.0) return f;
    lo = floor((double)dim * log((double)y->original_max_pos / (y->beta_fast * 2.0 * 3.141592653589793)) / (2.0 * log(theta)));
    hi = ceil((double)dim * log((double)y->original_max_pos / (y->beta_slow * 2.0 * 3.141592653589793)) / (2.0 * log(theta)));
    if (lo < 0) lo = 0;
    if (hi > (double)(dim - 1)) hi = (double)(dim - 1);
    if (lo == hi) hi += 0.001;
    ramp = ((double)j - lo) / (hi - lo);
    ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
    return f / y->factor * ramp + f * (1.0 - ramp);
}

MOE_API moe_status moe_rope_table_init(moe_ctx *ctx, moe_rope_table *table, int64_t dim, int64_t max_pos, double theta,
                                       const moe_yarn *yarn) {
    int64_t p, j;
    size_t n;
    MOE__CHECK_CTX(ctx);
    if (!table) return moe__fail(ctx, MOE_ERR_ARG, "moe_rope_table_init: table is NULL");
    memset(table, 0, sizeof *table);
    if (dim <= 0 || dim % 2 || dim > 65536)
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_rope_table_init: dim must be even and in 2..65536, got %lld", (long long)dim);
    if (max_pos <= 0 || max_pos > ((int64_t)1 << 26))
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_rope_table_init: max_pos must be 1..2^26, got %lld", (long long)max_pos);
    if (!(theta > 1.0)) return moe__fail(ctx, MOE_ERR_CONFIG, "moe_rope_table_init: theta must be > 1");
    if (yarn && yarn->factor > 1.0 && (yarn->original_max_pos <= 0 || !(yarn->beta_fast > 0) || !(yarn->beta_slow > 0)))
        return moe__fail(ctx, MOE_ERR_CONFIG, "moe_rope_table_init: YaRN needs original_max_pos, beta_fast, beta_slow > 0");
    if (moe__mul_overflows((size_t)max_pos, (size_t)dim * sizeof(float), &n))
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_rope_table_init: table too large");
    table->cos_sin = (float *)moe__heap_alloc(ctx, n);
    if (!table->cos_sin) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_rope_table_init: out of memory");
    table->dim = dim;
    table->max_pos = max_pos;
    for (j = 0; j < dim / 2; j++) {
        double f = moe__yarn_freq(pow(theta, -2.0 * (double)j / (double)dim), j, dim, theta, yarn);
        for (p = 0; p < max_pos; p++) {
            double a = (double)p * f;
            table->cos_sin[(p * (dim / 2) + j) * 2] = (float)cos(a);
            table->cos_sin[(p * (dim / 2) + j) * 2 + 1] = (float)sin(a);
        }
    }
    return MOE_OK;
}
MOE_API void moe_rope_table_free(moe_rope_table *table) {
    if (!table) return;
    MOE_FREE(table->cos_sin);
    memset(table, 0, sizeof *table);
}

/* ---- softmax, cross-entropy ------------------------------------------------------------- */

static void moe__softmax_fwd(int nt, const moe_real *x, moe_real *y, int64_t rows, int64_t d) {
    int64_t r;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (rows * d > 16384))
    for (r = 0; r < rows; r++) {
        const moe_real *xr = x + r * d;
        moe_real *yr = y + r * d, m = xr[0], s = 0;
        int64_t i;
        for (i = 1; i < d; i++) m = xr[i] > m ? xr[i] : m;
        for (i = 0; i < d; i++) s += (yr[i] = moe__exp(xr[i] - m));
        for (i = 0; i < d; i++) yr[i] /= s;
    }
}
/* dx += y ⊙ (dy − Σ dy⊙y) */
static void moe__softmax_bwd(int nt, const moe_real *y, const moe_real *dy, moe_real *dx, int64_t rows, int64_t d) {
    int64_t r;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (rows * d > 16384))
    for (r = 0; r < rows; r++) {
        const moe_real *yr = y + r * d, *g = dy + r * d;
        moe_real dot = 0;
        int64_t i;
        for (i = 0; i < d; i++) dot += g[i] * yr[i];
        for (i = 0; i < d; i++) dx[r * d + i] += yr[i] * (g[i] - dot);
    }
}

/* Per-row loss −log softmax(x)[t] (0 for ignored rows) and the row's log-sum-exp. */
static void moe__xent_fwd(int nt, const moe_real *x, const int32_t *targets, int32_t ignore, moe_real *row_loss,
                          moe_real *lse, int64_t rows, int64_t v) {
    int64_t r;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (rows * v > 16384))
    for (r = 0; r < rows; r++) {
        const moe_real *xr = x + r * v;
        moe_real m = xr[0], s = 0, l;
        int64_t i;
        for (i = 1; i < v; i++) m = xr[i] > m ? xr[i] : m;
        for (i = 0; i < v; i++) s += moe__exp(xr[i] - m);
        l = m + moe__ln(s);
        lse[r] = l;
        row_loss[r] = targets[r] == ignore ? 0 : l - xr[targets[r]];
    }
}
/* dx += scale·(softmax(x) − onehot(t)) for rows that are not ignored. */
static void moe__xent_bwd(int nt, const moe_real *x, const int32_t *targets, int32_t ignore, const moe_real *lse,
                          moe_real scale, moe_real *dx, int64_t rows, int64_t v) {
    int64_t r;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (rows * v > 16384))
    for (r = 0; r < rows; r++) {
        int64_t i;
        if (targets[r] == ignore) continue;
        for (i = 0; i < v; i++) dx[r * v + i] += scale * moe__exp(x[r * v + i] - lse[r]);
        dx[r * v + targets[r]] -= scale;
    }
}

/* ---- causal attention ------------------------------------------------------------------- */

#define MOE__ATT_TILE 64 /* keys per tile of the online softmax */

/* o[b,t,h] = Σ_{j≤t} softmax_j(scale·q[b,t,h]·k[b,j,h]) v[b,j,h], key tile by key tile with
   a running max and sum; lse[(b·H+h)·T+t] keeps the log-sum-exp for the backward pass. */
static void moe__attention_fwd(int nt, const moe_real *q, const moe_real *k, const moe_real *v, moe_real *o,
                               moe_real *lse, int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv, moe_real scale) {
    int64_t row;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(dynamic, 4) if (B * T * H > 64))
    for (row = 0; row < B * H * T; row++) {
        int64_t b = row / (H * T), h = (row / T) % H, t = row % T, j0, j, d;
        const moe_real *qr = q + ((b * T + t) * H + h) * Dk;
        moe_real *orow = o + ((b * T + t) * H + h) * Dv;
        moe_real m = -INFINITY, l = 0, s[MOE__ATT_TILE];
        for (d = 0; d < Dv; d++) orow[d] = 0;
        for (j0 = 0; j0 <= t; j0 += MOE__ATT_TILE) {
            int64_t j1 = j0 + MOE__ATT_TILE <= t + 1 ? j0 + MOE__ATT_TILE : t + 1;
            moe_real mt = m, corr;
            for (j = j0; j < j1; j++) {
                const moe_real *kr = k + ((b * T + j) * H + h) * Dk;
                moe_real dot = 0;
                for (d = 0; d < Dk; d++) dot += qr[d] * kr[d];
                s[j - j0] = dot * scale;
                mt = s[j - j0] > mt ? s[j - j0] : mt;
            }
            corr = moe__exp(m - mt); /* exp(−inf) = 0 on the first tile */
            l *= corr;
            for (d = 0; d < Dv; d++) orow[d] *= corr;
            for (j = j0; j < j1; j++) {
                const moe_real *vr = v + ((b * T + j) * H + h) * Dv;
                moe_real p = moe__exp(s[j - j0] - mt);
                l += p;
                for (d = 0; d < Dv; d++) orow[d] += p * vr[d];
            }
            m = mt;
        }
        for (d = 0; d < Dv; d++) orow[d] /= l;
        lse[(b * H + h) * T + t] = m + moe__ln(l);
    }
}

/* FlashAttention-2 style backward: recompute p = exp(scale·q·k − lse) tile by tile.
   One thread owns one (b, h) pair, so dk/dv accumulate over queries in a fixed order.
   dq, dk, dv are accumulated into (+=). */
static void moe__attention_bwd(int nt, const moe_real *q, const moe_real *k, const moe_real *v, const moe_real *o,
                               const moe_real *lse, const moe_real *dout, moe_real *dq, moe_real *dk, moe_real *dv,
                               int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv, moe_real scale) {
    int64_t bh;
    (void)nt;
    MOE__OMP(omp parallel for num_threads(nt) schedule(dynamic, 1) if (B * H > 1))
    for (bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, t, j, d;
        for (t = 0; t < T; t++) {
            const moe_real *qr = q + ((b * T + t) * H + h) * Dk, *dor = dout + ((b * T + t) * H + h) * Dv;
            const moe_real *orow = o + ((b * T + t) * H + h) * Dv;
            moe_real *dqr = dq ? dq + ((b * T + t) * H + h) * Dk : NULL, delta = 0, l = lse[bh * T + t];
            for (d = 0; d < Dv; d++) delta += dor[d] * orow[d];
            for (j = 0; j <= t; j++) {
                const moe_real *kr = k + ((b * T + j) * H + h) * Dk, *vr = v + ((b * T + j) * H + h) * Dv;
                moe_real dot = 0, p, dp = 0, ds;
                for (d = 0; d < Dk; d++) dot += qr[d] * kr[d];
                p = moe__exp(dot * scale - l);
                for (d = 0; d < Dv; d++) dp += dor[d] * vr[d];
                ds = p * (dp - delta) * scale;
                if (dv) {
                    moe_real *dvr = dv + ((b * T + j) * H + h) * Dv;
                    for (d = 0; d < Dv; d++) dvr[d] += p * dor[d];
                }
                if (dqr)
                    for (d = 0; d < Dk; d++) dqr[d] += ds * kr[d];
                if (dk) {
                    moe_real *dkr = dk + ((b * T + j) * H + h) * Dk;
                    for (d = 0; d < Dk; d++) dkr[d] += ds * qr[d];
                }
            }
        }
    }
}

/* ---- top-k ------------------------------------------------------------------------------ */

/* The k largest of x[0..n) in descending order, ties to the lower index; NaN ranks lowest. */
static void moe__topk_row(const moe_real *x, int64_t n, int64_t k, moe_real *val, int32_t *idx) {
    int64_t i, j;
    for (j = 0; j < k; j++) {
        int64_t best = -1;
        for (i = 0; i < n; i++) {
            int64_t m;
            int taken = 0;
            for (m = 0; m < j; m++)
                if (idx[m] == (int32_t)i) { taken = 1; break; }
            if (taken) continue;
            if (best < 0 || x[i] > x[best] || (x[best] != x[best] && x[i] == x[i])) best = i;
        }
        idx[j] = (int32_t)best;
        if (val) val[j] = x[best];
    }
}

/* ============================================================================================
   5. autograd
   ============================================================================================ */

typedef moe_status (*moe__backward_fn)(moe_ctx *ctx, moe__node *node);

/* One recorded op: its output, up to three inputs, and what its backward needs. */
struct moe__node {
    moe__backward_fn backward;
    moe_tensor *out;
    moe_tensor *in[3];
    void *saved;      /* op-specific saved values (rstd, log-sum-exp, indices, ...) */
    const void *cptr; /* op-specific constant data (a RoPE table) */
    double f[2];
    int64_t i[4];
};

/* The gradient buffer of t, made (zeroed, in the arena) on first use; NULL when t takes none
   or memory ran out (then ctx->error says so). */
static moe_real *moe__grad(moe_ctx *ctx, moe_tensor *t) {
    if (!t || !t->requires_grad) return NULL;
    if (!t->grad) {
        moe_tensor *g = (moe_tensor *)moe__arena_alloc(ctx, 1, sizeof *g, "backward");
        if (!g) return NULL;
        *g = *t;
        g->dtype = MOE_F32;
        g->grad = NULL;
        g->base = NULL;
        g->requires_grad = 0;
        g->in_arena = 1;
        g->data = moe__arena_alloc(ctx, (size_t)t->numel, sizeof(moe_real), "backward");
        if (!g->data) return NULL;
        t->grad = g;
    }
    return (moe_real *)t->grad->data;
}
#define MOE__GRAD_OR_FAIL(var, ctx, t) \
    do { var = moe__grad(ctx, t); if ((t)->requires_grad && !var) return MOE_ERR_MEMORY; } while (0)

static int moe__any_grad(const moe_ctx *ctx, const moe_tensor *a, const moe_tensor *b, const moe_tensor *c) {
    return ctx->grad_enabled && ((a && a->requires_grad) || (b && b->requires_grad) || (c && c->requires_grad));
}

/* Append a node for `out` to the tape when any input takes gradients. *node is NULL when
   nothing was recorded. */
static moe_status moe__record(moe_ctx *ctx, moe__backward_fn fn, moe_tensor *out, moe_tensor *a, moe_tensor *b,
                              moe_tensor *c, moe__node **node) {
    moe__node *n;
    *node = NULL;
    if (!moe__any_grad(ctx, a, b, c)) return MOE_OK;
    if (ctx->tape_len == ctx->tape_cap) {
        int64_t cap = ctx->tape_cap ? 2 * ctx->tape_cap : 256;
        moe__node **t = (moe__node **)MOE_REALLOC(ctx->tape, (size_t)cap * sizeof *t);
        if (!t) return moe__fail(ctx, MOE_ERR_MEMORY, "autograd: out of memory growing the tape");
        ctx->heap_allocs++;
        ctx->tape = t;
        ctx->tape_cap = cap;
    }
    n = (moe__node *)moe__arena_alloc(ctx, 1, sizeof *n, "autograd");
    if (!n) return MOE_ERR_MEMORY;
    n->backward = fn;
    n->out = out;
    n->in[0] = a;
    n->in[1] = b;
    n->in[2] = c;
    out->requires_grad = 1;
    ctx->tape[ctx->tape_len++] = n;
    *node = n;
    return MOE_OK;
}

MOE_API moe_status moe_backward(moe_ctx *ctx, moe_tensor *loss) {
    moe_real *g;
    int64_t i;
    double v;
    MOE__CHECK_CTX(ctx);
    if (!loss || !loss->data) return moe__fail(ctx, MOE_ERR_ARG, "moe_backward: loss is NULL");
    if (loss->dtype != MOE_F32)
        return moe__fail(ctx, MOE_ERR_DTYPE, "moe_backward: loss must be f32, got %s", moe_dtype_name(loss->dtype));
    if (loss->numel != 1)
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_backward: loss must have one element, it has %lld", (long long)loss->numel);
    if (!loss->requires_grad || ctx->tape_len == 0)
        return moe__fail(ctx, MOE_ERR_STATE, "moe_backward: nothing recorded leads to this loss (no parameter requires "
                                             "gradients, recording was off, or backward already ran for this step)");
    v = (double)((moe_real *)loss->data)[0];
    if (!isfinite(v)) return moe__fail(ctx, MOE_ERR_NUMERIC, "moe_backward: loss is %g", v);
    g = moe__grad(ctx, loss);
    if (!g) return MOE_ERR_MEMORY;
    g[0] = 1;
    for (i = ctx->tape_len - 1; i >= 0; i--) {
        moe__node *n = ctx->tape[i];
        moe_status st;
        if (!n->out->grad) continue; /* no gradient reached this op */
        st = n->backward(ctx, n);
        if (st != MOE_OK) {
            ctx->tape_len = 0; /* never replay a half-run tape: gradients may be partial now */
            return st;
        }
    }
    ctx->tape_len = 0; /* a tape is replayed once, as in PyTorch without retain_graph */
    return MOE_OK;
}

/* ---- argument checks shared by the ops ---- */

static moe_status moe__check_f32(moe_ctx *ctx, const char *fn, const moe_tensor *t, const char *what) {
    if (!t || !t->data) return moe__fail(ctx, MOE_ERR_ARG, "%s: %s is NULL", fn, what);
    if (t->dtype != MOE_F32)
        return moe__fail(ctx, MOE_ERR_DTYPE, "%s: %s must be f32, got %s", fn, what, moe_dtype_name(t->dtype));
    return MOE_OK;
}
static moe_status moe__check_i32(moe_ctx *ctx, const char *fn, const moe_tensor *t, const char *what) {
    if (!t || !t->data) return moe__fail(ctx, MOE_ERR_ARG, "%s: %s is NULL", fn, what);
    if (t->dtype != MOE_I32)
        return moe__fail(ctx, MOE_ERR_DTYPE, "%s: %s must be i32, got %s", fn, what, moe_dtype_name(t->dtype));
    return MOE_OK;
}
static moe_status moe__check_out(moe_ctx *ctx, const char *fn, moe_tensor **out) {
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: output pointer is NULL", fn);
    *out = NULL;
    return MOE_OK;
}
static moe_status moe__shape_mismatch(moe_ctx *ctx, const char *fn, const moe_tensor *a, const moe_tensor *b) {
    char sa[96], sb[96];
    return moe__fail(ctx, MOE_ERR_SHAPE, "%s: shapes %s and %s do not fit", fn, moe__shape_str(a, sa, sizeof sa),
                     moe__shape_str(b, sb, sizeof sb));
}
#define MOE__F32(t) ((moe_real *)(t)->data)
#define MOE__I32(t) ((int32_t *)(t)->data)
#define MOE__LAST(t) ((t)->shape[(t)->ndim - 1])

/* Column sums over rows in fixed row chunks: out[j] += Σ_r x[r·d + j]. */
static moe_status moe__colsum_add(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t d, moe_real *out) {
    int64_t nchunks = (rows + MOE__ROW_CHUNK - 1) / MOE__ROW_CHUNK, c;
    moe_real *part = (moe_real *)moe__arena_alloc(ctx, (size_t)(nchunks * d), sizeof(moe_real), "colsum");
    if (!part) return MOE_ERR_MEMORY;
    MOE__OMP(omp parallel for num_threads(ctx->n_threads) schedule(static) if (rows * d > 16384))
    for (c = 0; c < nchunks; c++) {
        int64_t r, j, r1 = (c + 1) * MOE__ROW_CHUNK < rows ? (c + 1) * MOE__ROW_CHUNK : rows;
        for (r = c * MOE__ROW_CHUNK; r < r1; r++)
            for (j = 0; j < d; j++) part[c * d + j] += x[r * d + j];
    }
    for (c = 0; c < nchunks; c++) {
        int64_t j;
        for (j = 0; j < d; j++) out[j] += part[c * d + j];
    }
    return MOE_OK;
}

/* ---- view (only its gradient routing lives here) ---- */

static moe_status moe__view_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dx, *dy = MOE__F32(n->out->grad);
    int64_t i;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    for (i = 0; i < n->out->numel; i++) dx[n->i[0] + i] += dy[i];
    return MOE_OK;
}

MOE_API moe_status moe_tensor_view(moe_ctx *ctx, moe_tensor *t, int ndim, const int64_t *shape, int64_t offset,
                                   moe_tensor **out) {
    moe_tensor meta, *v;
    size_t es;
    MOE__CHECK_CTX(ctx);
    if (!t || !out) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_view: NULL tensor or out");
    *out = NULL;
    MOE__TRY(moe__tensor_meta(ctx, "moe_tensor_view", &meta, t->dtype, ndim, shape));
    if (offset < 0 || offset > t->numel || meta.numel > t->numel - offset)
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_tensor_view: %lld elements at offset %lld exceed the base's %lld",
                         (long long)meta.numel, (long long)offset, (long long)t->numel);
    if (t->scales) return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_tensor_view: views of scaled FP8 tensors are not supported");
    v = (moe_tensor *)moe__arena_alloc(ctx, 1, sizeof *v, "moe_tensor_view");
    if (!v) return MOE_ERR_MEMORY;
    es = moe_dtype_size(t->dtype);
    *v = meta;
    v->in_arena = 1;
    v->base = t->base ? t->base : t;
    v->data = (unsigned char *)t->data + (size_t)offset * es;
    v->requires_grad = t->requires_grad;
    if (t->grad && !t->in_arena) {
        /* A parameter's view: its gradient aliases the base's, so gradients reach the base. */
        moe_tensor *g = (moe_tensor *)moe__arena_alloc(ctx, 1, sizeof *g, "moe_tensor_view");
        if (!g) return MOE_ERR_MEMORY;
        *g = meta;
        g->dtype = MOE_F32;
        g->in_arena = 1;
        g->base = t->grad;
        g->data = (moe_real *)t->grad->data + offset;
        v->grad = g;
    } else if (t->requires_grad) {
        /* A view of an op's output: a tape node routes the gradient back. */
        moe__node *n;
        v->requires_grad = 0;
        MOE__TRY(moe__record(ctx, moe__view_bwd, v, t, NULL, NULL, &n));
        if (n) n->i[0] = offset;
    }
    *out = v;
    return MOE_OK;
}

/* ---- matmul ---- */

static moe_status moe__matmul_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *w = n->in[1];
    moe_real *dy = MOE__F32(n->out->grad), *dx, *dw;
    int64_t batches = n->i[0], M = n->i[1], N = n->i[2], K = n->i[3], b;
    int bf16 = (int)n->f[0];
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    MOE__GRAD_OR_FAIL(dw, ctx, w);
    for (b = 0; b < batches; b++) {
        const moe_real *dyb = dy + b * M * N, *xb = MOE__F32(x) + b * M * K, *wb = MOE__F32(w) + (w->ndim == 3 ? b * N * K : 0);
        if (dx) MOE__TRY(moe__gemm(ctx, 0, 0, M, K, N, 1, dyb, N, wb, K, 1, dx + b * M * K, K, bf16));
        if (dw) MOE__TRY(moe__gemm(ctx, 1, 0, N, K, M, 1, dyb, N, xb, K, 1, dw + (w->ndim == 3 ? b * N * K : 0), K, bf16));
    }
    return MOE_OK;
}

MOE_API moe_status moe_matmul(moe_ctx *ctx, moe_tensor *x, moe_tensor *w, moe_tensor **y) {
    static const char *fn = "moe_matmul";
    int64_t shape[MOE_MAX_DIMS], batches, M, N, K, b;
    moe__node *n;
    int bf16;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe__check_f32(ctx, fn, w, "w"));
    K = MOE__LAST(x);
    if (w->ndim == 2) {
        if (w->shape[1] != K) return moe__shape_mismatch(ctx, fn, x, w);
        batches = 1;
        N = w->shape[0];
        M = x->numel / K;
    } else if (w->ndim == 3 && x->ndim == 3) {
        if (w->shape[0] != x->shape[0] || w->shape[2] != K) return moe__shape_mismatch(ctx, fn, x, w);
        batches = w->shape[0];
        N = w->shape[1];
        M = x->shape[1];
    } else {
        return moe__shape_mismatch(ctx, fn, x, w);
    }
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = N;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, shape, y));
    bf16 = ctx->gemm_compute == MOE_BF16;
    for (b = 0; b < batches; b++)
        MOE__TRY(moe__gemm(ctx, 0, 1, M, N, K, 1, MOE__F32(x) + b * M * K, K, MOE__F32(w) + b * N * K, K, 0,
                           MOE__F32(*y) + b * M * N, N, bf16));
    MOE__TRY(moe__record(ctx, moe__matmul_bwd, *y, x, w, NULL, &n));
    if (n) {
        n->i[0] = batches; n->i[1] = M; n->i[2] = N; n->i[3] = K;
        n->f[0] = bf16;
    }
    return MOE_OK;
}

/* ---- element-wise ---- */

static moe_status moe__add_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dy = MOE__F32(n->out->grad), *da, *db;
    int64_t i;
    MOE__GRAD_OR_FAIL(da, ctx, n->in[0]);
    MOE__GRAD_OR_FAIL(db, ctx, n->in[1]);
    if (da) for (i = 0; i < n->out->numel; i++) da[i] += dy[i];
    if (db) {
        if (n->in[1]->numel == n->out->numel) {
            for (i = 0; i < n->out->numel; i++) db[i] += dy[i];
        } else {
            int64_t d = n->in[1]->numel;
            MOE__TRY(moe__colsum_add(ctx, dy, n->out->numel / d, d, db));
        }
    }
    return MOE_OK;
}

MOE_API moe_status moe_add(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, moe_tensor **y) {
    static const char *fn = "moe_add";
    int64_t i, d;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, a, "a"));
    MOE__TRY(moe__check_f32(ctx, fn, b, "b"));
    if (!moe__same_shape(a, b) && !(b->ndim == 1 && b->shape[0] == MOE__LAST(a))) return moe__shape_mismatch(ctx, fn, a, b);
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, a->ndim, a->shape, y));
    d = b->numel;
    for (i = 0; i < a->numel; i++) MOE__F32(*y)[i] = MOE__F32(a)[i] + MOE__F32(b)[i % d];
    return moe__record(ctx, moe__add_bwd, *y, a, b, NULL, &n);
}

static moe_status moe__mul_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dy = MOE__F32(n->out->grad), *da, *db, *a = MOE__F32(n->in[0]), *b = MOE__F32(n->in[1]);
    int64_t i;
    MOE__GRAD_OR_FAIL(da, ctx, n->in[0]);
    MOE__GRAD_OR_FAIL(db, ctx, n->in[1]);
    for (i = 0; i < n->out->numel; i++) {
        if (da) da[i] += dy[i] * b[i];
        if (db) db[i] += dy[i] * a[i];
    }
    return MOE_OK;
}

MOE_API moe_status moe_mul(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, moe_tensor **y) {
    static const char *fn = "moe_mul";
    int64_t i;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, a, "a"));
    MOE__TRY(moe__check_f32(ctx, fn, b, "b"));
    if (!moe__same_shape(a, b)) return moe__shape_mismatch(ctx, fn, a, b);
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, a->ndim, a->shape, y));
    for (i = 0; i < a->numel; i++) MOE__F32(*y)[i] = MOE__F32(a)[i] * MOE__F32(b)[i];
    return moe__record(ctx, moe__mul_bwd, *y, a, b, NULL, &n);
}

static moe_status moe__scale_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dy = MOE__F32(n->out->grad), *dx, s = (moe_real)n->f[0];
    int64_t i;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    for (i = 0; i < n->out->numel; i++) dx[i] += s * dy[i];
    return MOE_OK;
}

MOE_API moe_status moe_scale(moe_ctx *ctx, moe_tensor *x, float s, moe_tensor **y) {
    static const char *fn = "moe_scale";
    int64_t i;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    if (!isfinite(s)) return moe__fail(ctx, MOE_ERR_NUMERIC, "%s: scale factor is %g", fn, (double)s);
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, x->shape, y));
    for (i = 0; i < x->numel; i++) MOE__F32(*y)[i] = (moe_real)s * MOE__F32(x)[i];
    MOE__TRY(moe__record(ctx, moe__scale_bwd, *y, x, NULL, NULL, &n));
    if (n) n->f[0] = s;
    return MOE_OK;
}

static moe_status moe__sum_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dx, g = MOE__F32(n->out->grad)[0];
    int64_t i;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    for (i = 0; i < n->in[0]->numel; i++) dx[i] += g;
    return MOE_OK;
}

MOE_API moe_status moe_sum(moe_ctx *ctx, moe_tensor *x, moe_tensor **y) {
    static const char *fn = "moe_sum";
    int64_t one = 1, i;
    moe_real s = 0;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, y));
    for (i = 0; i < x->numel; i++) s += MOE__F32(x)[i];
    MOE__F32(*y)[0] = s;
    return moe__record(ctx, moe__sum_bwd, *y, x, NULL, NULL, &n);
}

static moe_status moe__silu_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dy = MOE__F32(n->out->grad), *dx, *x = MOE__F32(n->in[0]);
    int64_t i;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    for (i = 0; i < n->out->numel; i++) dx[i] += dy[i] * moe_silu_grad_scalar(x[i]);
    return MOE_OK;
}

MOE_API moe_status moe_silu(moe_ctx *ctx, moe_tensor *x, moe_tensor **y) {
    static const char *fn = "moe_silu";
    int64_t i;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, x->shape, y));
    for (i = 0; i < x->numel; i++) MOE__F32(*y)[i] = moe_silu_scalar(MOE__F32(x)[i]);
    return moe__record(ctx, moe__silu_bwd, *y, x, NULL, NULL, &n);
}

static moe_status moe__swiglu_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dy = MOE__F32(n->out->grad), *dg, *du, *g = MOE__F32(n->in[0]), *u = MOE__F32(n->in[1]);
    int64_t i;
    MOE__GRAD_OR_FAIL(dg, ctx, n->in[0]);
    MOE__GRAD_OR_FAIL(du, ctx, n->in[1]);
    for (i = 0; i < n->out->numel; i++) {
        if (dg) dg[i] += dy[i] * u[i] * moe_silu_grad_scalar(g[i]);
        if (du) du[i] += dy[i] * moe_silu_scalar(g[i]);
    }
    return MOE_OK;
}

MOE_API moe_status moe_swiglu(moe_ctx *ctx, moe_tensor *gate, moe_tensor *up, moe_tensor **y) {
    static const char *fn = "moe_swiglu";
    int64_t i;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, gate, "gate"));
    MOE__TRY(moe__check_f32(ctx, fn, up, "up"));
    if (!moe__same_shape(gate, up)) return moe__shape_mismatch(ctx, fn, gate, up);
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, gate->ndim, gate->shape, y));
    for (i = 0; i < gate->numel; i++) MOE__F32(*y)[i] = moe_silu_scalar(MOE__F32(gate)[i]) * MOE__F32(up)[i];
    return moe__record(ctx, moe__swiglu_bwd, *y, gate, up, NULL, &n);
}

/* ---- row-wise ---- */

static moe_status moe__rmsnorm_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *w = n->in[1];
    int64_t d = MOE__LAST(x), rows = x->numel / d;
    moe_real *dx, *dw, *part = NULL;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    MOE__GRAD_OR_FAIL(dw, ctx, w);
    if (dw) {
        part = (moe_real *)moe__arena_alloc(ctx, (size_t)(((rows + MOE__ROW_CHUNK - 1) / MOE__ROW_CHUNK) * d),
                                            sizeof(moe_real), "moe_rmsnorm backward");
        if (!part) return MOE_ERR_MEMORY;
    }
    moe__rmsnorm_bwd(ctx->n_threads, MOE__F32(x), MOE__F32(w), (const moe_real *)n->saved, MOE__F32(n->out->grad), dx,
                     dw, part, rows, d);
    return MOE_OK;
}

MOE_API moe_status moe_rmsnorm(moe_ctx *ctx, moe_tensor *x, moe_tensor *w, float eps, moe_tensor **y) {
    static const char *fn = "moe_rmsnorm";
    int64_t d, rows;
    moe_real *rstd;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe__check_f32(ctx, fn, w, "w"));
    d = MOE__LAST(x);
    rows = x->numel / d;
    if (w->ndim != 1 || w->shape[0] != d) return moe__shape_mismatch(ctx, fn, x, w);
    if (!(eps > 0.0f) || !isfinite(eps)) return moe__fail(ctx, MOE_ERR_ARG, "%s: eps must be positive and finite", fn);
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, x->shape, y));
    rstd = (moe_real *)moe__arena_alloc(ctx, (size_t)rows, sizeof(moe_real), fn);
    if (!rstd) return MOE_ERR_MEMORY;
    moe__rmsnorm_fwd(ctx->n_threads, MOE__F32(x), MOE__F32(w), MOE__F32(*y), rstd, rows, d, (moe_real)eps);
    MOE__TRY(moe__record(ctx, moe__rmsnorm_bwd_node, *y, x, w, NULL, &n));
    if (n) n->saved = rstd;
    return MOE_OK;
}

static moe_status moe__softmax_bwd_node(moe_ctx *ctx, moe__node *n) {
    int64_t d = MOE__LAST(n->out);
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    moe__softmax_bwd(ctx->n_threads, MOE__F32(n->out), MOE__F32(n->out->grad), dx, n->out->numel / d, d);
    return MOE_OK;
}

MOE_API moe_status moe_softmax(moe_ctx *ctx, moe_tensor *x, moe_tensor **y) {
    static const char *fn = "moe_softmax";
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, x->shape, y));
    moe__softmax_fwd(ctx->n_threads, MOE__F32(x), MOE__F32(*y), x->numel / MOE__LAST(x), MOE__LAST(x));
    return moe__record(ctx, moe__softmax_bwd_node, *y, x, NULL, NULL, &n);
}

/* [B, T, H, D] or [T, H, D] → B, T, H, D */
static moe_status moe__bthd(moe_ctx *ctx, const char *fn, const moe_tensor *t, int64_t *B, int64_t *T, int64_t *H,
                            int64_t *D) {
    if (t->ndim == 4) { *B = t->shape[0]; *T = t->shape[1]; *H = t->shape[2]; *D = t->shape[3]; return MOE_OK; }
    if (t->ndim == 3) { *B = 1; *T = t->shape[0]; *H = t->shape[1]; *D = t->shape[2]; return MOE_OK; }
    {
        char s[96];
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: want [B, T, H, D] or [T, H, D], got %s", fn, moe__shape_str(t, s, sizeof s));
    }
}

static moe_status moe__rope_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0];
    const moe_rope_table *tab = (const moe_rope_table *)n->cptr;
    moe_real *dx, *tmp;
    int64_t B = 0, T = 0, H = 0, D = 0, i;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    MOE__TRY(moe__bthd(ctx, "moe_rope", x, &B, &T, &H, &D));
    tmp = (moe_real *)moe__arena_alloc(ctx, (size_t)x->numel, sizeof(moe_real), "moe_rope backward");
    if (!tmp) return MOE_ERR_MEMORY;
    memcpy(tmp, n->out->grad->data, (size_t)x->numel * sizeof(moe_real));
    moe__rope_apply(ctx->n_threads, tmp, tab->cos_sin, B, T, H, D, n->i[0], (moe_rope_layout)n->i[1], -1);
    for (i = 0; i < x->numel; i++) dx[i] += tmp[i];
    return MOE_OK;
}

MOE_API moe_status moe_rope(moe_ctx *ctx, moe_tensor *x, const moe_rope_table *table, int64_t pos0,
                            moe_rope_layout layout, moe_tensor **y) {
    static const char *fn = "moe_rope";
    int64_t B = 0, T = 0, H = 0, D = 0;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    if (!table || !table->cos_sin) return moe__fail(ctx, MOE_ERR_ARG, "%s: RoPE table is NULL or not initialised", fn);
    MOE__TRY(moe__bthd(ctx, fn, x, &B, &T, &H, &D));
    if (D != table->dim) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: head dim %lld but the table is for %lld", fn, (long long)D, (long long)table->dim);
    if (layout != MOE_ROPE_PAIRS && layout != MOE_ROPE_HALVES) return moe__fail(ctx, MOE_ERR_ARG, "%s: unknown layout %d", fn, (int)layout);
    if (pos0 < 0 || pos0 > table->max_pos - T)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: positions %lld..%lld exceed the table's %lld", fn, (long long)pos0,
                         (long long)(pos0 + T - 1), (long long)table->max_pos);
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, x->shape, y));
    memcpy((*y)->data, x->data, (size_t)x->numel * sizeof(moe_real));
    moe__rope_apply(ctx->n_threads, MOE__F32(*y), table->cos_sin, B, T, H, D, pos0, layout, 1);
    MOE__TRY(moe__record(ctx, moe__rope_bwd, *y, x, NULL, NULL, &n));
    if (n) {
        n->cptr = table;
        n->i[0] = pos0;
        n->i[1] = layout;
    }
    return MOE_OK;
}

static moe_status moe__attention_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *q = n->in[0], *k = n->in[1], *v = n->in[2];
    int64_t B = 0, T = 0, H = 0, Dk = 0, Dv = 0, tmp;
    moe_real *dq, *dk, *dv;
    MOE__GRAD_OR_FAIL(dq, ctx, q);
    MOE__GRAD_OR_FAIL(dk, ctx, k);
    MOE__GRAD_OR_FAIL(dv, ctx, v);
    MOE__TRY(moe__bthd(ctx, "moe_attention", q, &B, &T, &H, &Dk));
    MOE__TRY(moe__bthd(ctx, "moe_attention", v, &tmp, &tmp, &tmp, &Dv));
    moe__attention_bwd(ctx->n_threads, MOE__F32(q), MOE__F32(k), MOE__F32(v), MOE__F32(n->out), (const moe_real *)n->saved,
                       MOE__F32(n->out->grad), dq, dk, dv, B, T, H, Dk, Dv, (moe_real)n->f[0]);
    return MOE_OK;
}

MOE_API moe_status moe_attention(moe_ctx *ctx, moe_tensor *q, moe_tensor *k, moe_tensor *v, float scale, moe_tensor **o) {
    static const char *fn = "moe_attention";
    int64_t B = 0, T = 0, H = 0, Dk = 0, B2, T2, H2, Dk2, B3 = 0, T3 = 0, H3 = 0, Dv = 0, shape[4];
    moe_real *lse;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, o));
    MOE__TRY(moe__check_f32(ctx, fn, q, "q"));
    MOE__TRY(moe__check_f32(ctx, fn, k, "k"));
    MOE__TRY(moe__check_f32(ctx, fn, v, "v"));
    MOE__TRY(moe__bthd(ctx, fn, q, &B, &T, &H, &Dk));
    MOE__TRY(moe__bthd(ctx, fn, k, &B2, &T2, &H2, &Dk2));
    MOE__TRY(moe__bthd(ctx, fn, v, &B3, &T3, &H3, &Dv));
    if (!moe__same_shape(q, k) || B3 != B || T3 != T || H3 != H || q->ndim != v->ndim) return moe__shape_mismatch(ctx, fn, q, v);
    if (!(scale > 0.0f) || !isfinite(scale)) return moe__fail(ctx, MOE_ERR_ARG, "%s: scale must be positive and finite", fn);
    memcpy(shape, v->shape, sizeof shape);
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, v->ndim, shape, o));
    lse = (moe_real *)moe__arena_alloc(ctx, (size_t)(B * H * T), sizeof(moe_real), fn);
    if (!lse) return MOE_ERR_MEMORY;
    moe__attention_fwd(ctx->n_threads, MOE__F32(q), MOE__F32(k), MOE__F32(v), MOE__F32(*o), lse, B, T, H, Dk, Dv, (moe_real)scale);
    MOE__TRY(moe__record(ctx, moe__attention_bwd_node, *o, q, k, v, &n));
    if (n) {
        n->saved = lse;
        n->f[0] = scale;
    }
    return MOE_OK;
}

/* ---- indexing ---- */

static moe_status moe__check_ids(moe_ctx *ctx, const char *fn, const moe_tensor *ids, int64_t limit, int32_t allowed) {
    int64_t i;
    for (i = 0; i < ids->numel; i++) {
        int32_t id = MOE__I32(ids)[i];
        if ((id < 0 || id >= limit) && id != allowed)
            return moe__fail(ctx, MOE_ERR_ARG, "%s: index %d at position %lld is outside [0, %lld)", fn, (int)id,
                             (long long)i, (long long)limit);
    }
    return MOE_OK;
}

static moe_status moe__embedding_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *table = n->in[0], *ids = n->in[1];
    int64_t d = table->shape[1], i, j;
    moe_real *dt, *dy = MOE__F32(n->out->grad);
    MOE__GRAD_OR_FAIL(dt, ctx, table);
    for (i = 0; i < ids->numel; i++) {
        moe_real *row = dt + (int64_t)MOE__I32(ids)[i] * d;
        for (j = 0; j < d; j++) row[j] += dy[i * d + j];
    }
    return MOE_OK;
}

MOE_API moe_status moe_embedding(moe_ctx *ctx, moe_tensor *table, moe_tensor *ids, moe_tensor **y) {
    static const char *fn = "moe_embedding";
    int64_t shape[MOE_MAX_DIMS], d, i;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, table, "table"));
    MOE__TRY(moe__check_i32(ctx, fn, ids, "ids"));
    if (table->ndim != 2) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: table must be [V, D]", fn);
    if (ids->ndim >= MOE_MAX_DIMS) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: ids may have at most %d dims", fn, MOE_MAX_DIMS - 1);
    MOE__TRY(moe__check_ids(ctx, fn, ids, table->shape[0], 0));
    d = table->shape[1];
    memcpy(shape, ids->shape, sizeof shape);
    shape[ids->ndim] = d;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, ids->ndim + 1, shape, y));
    for (i = 0; i < ids->numel; i++)
        memcpy(MOE__F32(*y) + i * d, MOE__F32(table) + (int64_t)MOE__I32(ids)[i] * d, (size_t)d * sizeof(moe_real));
    return moe__record(ctx, moe__embedding_bwd, *y, table, ids, NULL, &n);
}

static moe_status moe__xent_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *t = n->in[1];
    int64_t v = MOE__LAST(x);
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    if (n->i[1] == 0) return MOE_OK; /* every row ignored: the loss is constant 0 */
    moe__xent_bwd(ctx->n_threads, MOE__F32(x), MOE__I32(t), (int32_t)n->i[0], (const moe_real *)n->saved,
                  MOE__F32(n->out->grad)[0] / (moe_real)n->i[1], dx, x->numel / v, v);
    return MOE_OK;
}

MOE_API moe_status moe_cross_entropy(moe_ctx *ctx, moe_tensor *logits, moe_tensor *targets, int32_t ignore_index,
                                     moe_tensor **loss) {
    static const char *fn = "moe_cross_entropy";
    int64_t v, rows, one = 1, i, count = 0;
    moe_real *row_loss, *lse, total = 0;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_f32(ctx, fn, logits, "logits"));
    MOE__TRY(moe__check_i32(ctx, fn, targets, "targets"));
    v = MOE__LAST(logits);
    rows = logits->numel / v;
    if (targets->numel != rows) return moe__shape_mismatch(ctx, fn, logits, targets);
    MOE__TRY(moe__check_ids(ctx, fn, targets, v, ignore_index));
    row_loss = (moe_real *)moe__arena_alloc(ctx, (size_t)rows, sizeof(moe_real), fn);
    lse = (moe_real *)moe__arena_alloc(ctx, (size_t)rows, sizeof(moe_real), fn);
    if (!row_loss || !lse) return MOE_ERR_MEMORY;
    moe__xent_fwd(ctx->n_threads, MOE__F32(logits), MOE__I32(targets), ignore_index, row_loss, lse, rows, v);
    for (i = 0; i < rows; i++) {
        total += row_loss[i];
        count += MOE__I32(targets)[i] != ignore_index;
    }
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, loss));
    MOE__F32(*loss)[0] = count ? total / (moe_real)count : 0;
    MOE__TRY(moe__record(ctx, moe__xent_bwd_node, *loss, logits, targets, NULL, &n));
    if (n) {
        n->saved = lse;
        n->i[0] = ignore_index;
        n->i[1] = count;
    }
    return MOE_OK;
}

static moe_status moe__topk_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0];
    const int32_t *idx = (const int32_t *)n->saved;
    int64_t k = MOE__LAST(n->out), cols = MOE__LAST(x), rows = x->numel / cols, r, j;
    moe_real *dx, *dy = MOE__F32(n->out->grad);
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    for (r = 0; r < rows; r++)
        for (j = 0; j < k; j++) dx[r * cols + idx[r * k + j]] += dy[r * k + j];
    return MOE_OK;
}

MOE_API moe_status moe_topk(moe_ctx *ctx, moe_tensor *x, int64_t k, moe_tensor **values, moe_tensor **indices) {
    static const char *fn = "moe_topk";
    int64_t shape[MOE_MAX_DIMS], cols, rows, r;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, values));
    MOE__TRY(moe__check_out(ctx, fn, indices));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    cols = MOE__LAST(x);
    rows = x->numel / cols;
    if (k < 1 || k > cols) return moe__fail(ctx, MOE_ERR_ARG, "%s: k must be 1..%lld, got %lld", fn, (long long)cols, (long long)k);
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = k;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, shape, values));
    MOE__TRY(moe_tensor_temp(ctx, MOE_I32, x->ndim, shape, indices));
    for (r = 0; r < rows; r++) moe__topk_row(MOE__F32(x) + r * cols, cols, k, MOE__F32(*values) + r * k, MOE__I32(*indices) + r * k);
    MOE__TRY(moe__record(ctx, moe__topk_bwd, *values, x, NULL, NULL, &n));
    if (n) n->saved = (*indices)->data;
    return MOE_OK;
}

static moe_status moe__gather_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *idx = n->in[1];
    int64_t d = x->shape[1], i, j;
    moe_real *dx, *dy = MOE__F32(n->out->grad);
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    for (i = 0; i < idx->numel; i++)
        for (j = 0; j < d; j++) dx[(int64_t)MOE__I32(idx)[i] * d + j] += dy[i * d + j];
    return MOE_OK;
}

MOE_API moe_status moe_gather(moe_ctx *ctx, moe_tensor *x, moe_tensor *idx, moe_tensor **y) {
    static const char *fn = "moe_gather";
    int64_t shape[2], d, i;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe__check_i32(ctx, fn, idx, "idx"));
    if (x->ndim != 2 || idx->ndim != 1) return moe__shape_mismatch(ctx, fn, x, idx);
    MOE__TRY(moe__check_ids(ctx, fn, idx, x->shape[0], 0));
    d = x->shape[1];
    shape[0] = idx->shape[0];
    shape[1] = d;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 2, shape, y));
    for (i = 0; i < idx->numel; i++)
        memcpy(MOE__F32(*y) + i * d, MOE__F32(x) + (int64_t)MOE__I32(idx)[i] * d, (size_t)d * sizeof(moe_real));
    return moe__record(ctx, moe__gather_bwd, *y, x, idx, NULL, &n);
}

static moe_status moe__scatter_add_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *src = n->in[0], *idx = n->in[1];
    int64_t d = src->shape[1], i, j;
    moe_real *ds, *dy = MOE__F32(n->out->grad);
    MOE__GRAD_OR_FAIL(ds, ctx, src);
    for (i = 0; i < idx->numel; i++)
        for (j = 0; j < d; j++) ds[i * d + j] += dy[(int64_t)MOE__I32(idx)[i] * d + j];
    return MOE_OK;
}

MOE_API moe_status moe_scatter_add(moe_ctx *ctx, moe_tensor *src, moe_tensor *idx, int64_t n_rows, moe_tensor **y) {
    static const char *fn = "moe_scatter_add";
    int64_t shape[2], d, i, j;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, src, "src"));
    MOE__TRY(moe__check_i32(ctx, fn, idx, "idx"));
    if (src->ndim != 2 || idx->ndim != 1 || idx->shape[0] != src->shape[0]) return moe__shape_mismatch(ctx, fn, src, idx);
    if (n_rows < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: n_rows must be positive, got %lld", fn, (long long)n_rows);
    MOE__TRY(moe__check_ids(ctx, fn, idx, n_rows, 0));
    d = src->shape[1];
    shape[0] = n_rows;
    shape[1] = d;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 2, shape, y));
    for (i = 0; i < idx->numel; i++)
        for (j = 0; j < d; j++) MOE__F32(*y)[(int64_t)MOE__I32(idx)[i] * d + j] += MOE__F32(src)[i * d + j];
    return moe__record(ctx, moe__scatter_add_bwd, *y, src, idx, NULL, &n);
}

/* ---- concat / split along a dim ---- */

/* Elements before `dim` (outer) and from `dim` on, one outer slice (span). */
static void moe__dim_split(const moe_tensor *t, int dim, int64_t *outer, int64_t *inner) {
    int i;
    *outer = 1;
    *inner = 1;
    for (i = 0; i < dim; i++) *outer *= t->shape[i];
    for (i = dim + 1; i < t->ndim; i++) *inner *= t->shape[i];
}

/* For each outer slice o: dst[o·dspan + doff ..][0..len) (+)= src[o·sspan + soff ..]. */
static void moe__copy_spans(moe_real *dst, int64_t dspan, int64_t doff, const moe_real *src, int64_t sspan, int64_t soff,
                            int64_t len, int64_t outer, int accumulate) {
    int64_t o, i;
    for (o = 0; o < outer; o++) {
        moe_real *d = dst + o * dspan + doff;
        const moe_real *s = src + o * sspan + soff;
        if (accumulate) for (i = 0; i < len; i++) d[i] += s[i];
        else memcpy(d, s, (size_t)len * sizeof(moe_real));
    }
}

/* A slice of x along dim: entries [start, start+len); i[] = {dim, start, len}. */
static moe_status moe__slice_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0];
    int64_t outer, inner;
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    moe__dim_split(x, (int)n->i[0], &outer, &inner);
    moe__copy_spans(dx, x->shape[n->i[0]] * inner, n->i[1] * inner, MOE__F32(n->out->grad), n->i[2] * inner, 0,
                    n->i[2] * inner, outer, 1);
    return MOE_OK;
}

static moe_status moe__slice(moe_ctx *ctx, moe_tensor *x, int dim, int64_t start, int64_t len, moe_tensor **y) {
    int64_t shape[MOE_MAX_DIMS], outer, inner;
    moe__node *n;
    memcpy(shape, x->shape, sizeof shape);
    shape[dim] = len;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, shape, y));
    moe__dim_split(x, dim, &outer, &inner);
    moe__copy_spans(MOE__F32(*y), len * inner, 0, MOE__F32(x), x->shape[dim] * inner, start * inner, len * inner, outer, 0);
    MOE__TRY(moe__record(ctx, moe__slice_bwd, *y, x, NULL, NULL, &n));
    if (n) { n->i[0] = dim; n->i[1] = start; n->i[2] = len; }
    return MOE_OK;
}

MOE_API moe_status moe_split(moe_ctx *ctx, moe_tensor *x, int dim, int64_t size0, moe_tensor **a, moe_tensor **b) {
    static const char *fn = "moe_split";
    MOE__TRY(moe__check_out(ctx, fn, a));
    MOE__TRY(moe__check_out(ctx, fn, b));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    if (dim < 0 || dim >= x->ndim) return moe__fail(ctx, MOE_ERR_ARG, "%s: dim %d out of range for %d dims", fn, dim, x->ndim);
    if (size0 < 1 || size0 >= x->shape[dim])
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: size0 must be 1..%lld, got %lld", fn, (long long)(x->shape[dim] - 1), (long long)size0);
    MOE__TRY(moe__slice(ctx, x, dim, 0, size0, a));
    return moe__slice(ctx, x, dim, size0, x->shape[dim] - size0, b);
}

static moe_status moe__concat_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *a = n->in[0], *b = n->in[1];
    int dim = (int)n->i[0];
    int64_t outer, inner, la, lb;
    moe_real *da, *db, *dy = MOE__F32(n->out->grad);
    MOE__GRAD_OR_FAIL(da, ctx, a);
    MOE__GRAD_OR_FAIL(db, ctx, b);
    moe__dim_split(n->out, dim, &outer, &inner);
    la = a->shape[dim] * inner;
    lb = b->shape[dim] * inner;
    if (da) moe__copy_spans(da, la, 0, dy, la + lb, 0, la, outer, 1);
    if (db) moe__copy_spans(db, lb, 0, dy, la + lb, la, lb, outer, 1);
    return MOE_OK;
}

MOE_API moe_status moe_concat(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, int dim, moe_tensor **y) {
    static const char *fn = "moe_concat";
    int64_t shape[MOE_MAX_DIMS], outer, inner, la, lb;
    int i;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, a, "a"));
    MOE__TRY(moe__check_f32(ctx, fn, b, "b"));
    if (a->ndim != b->ndim) return moe__shape_mismatch(ctx, fn, a, b);
    if (dim < 0 || dim >= a->ndim) return moe__fail(ctx, MOE_ERR_ARG, "%s: dim %d out of range for %d dims", fn, dim, a->ndim);
    for (i = 0; i < a->ndim; i++)
        if (i != dim && a->shape[i] != b->shape[i]) return moe__shape_mismatch(ctx, fn, a, b);
    memcpy(shape, a->shape, sizeof shape);
    shape[dim] = a->shape[dim] + b->shape[dim];
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, a->ndim, shape, y));
    moe__dim_split(*y, dim, &outer, &inner);
    la = a->shape[dim] * inner;
    lb = b->shape[dim] * inner;
    moe__copy_spans(MOE__F32(*y), la + lb, 0, MOE__F32(a), la, 0, la, outer, 0);
    moe__copy_spans(MOE__F32(*y), la + lb, la, MOE__F32(b), lb, 0, lb, outer, 0);
    MOE__TRY(moe__record(ctx, moe__concat_bwd, *y, a, b, NULL, &n));
    if (n) n->i[0] = dim;
    return MOE_OK;
}

#if defined(MOE_CUDA) && defined(__CUDACC__)
#include "moe_cuda.cuh"
#endif

#ifdef __cplusplus
}
#endif
#endif /* MOE_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licenses -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT License
Copyright (c) 2026 the moe.h authors
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
In jurisdictions that recognize copyright laws, the author or authors of this
software dedicate any and all copyright interest in the software to the public
domain. We make this dedication in recognition of the continued good-faith
efforts of our past, present and future maintainers. We believe that the
continued use of this software is in the public domain.
------------------------------------------------------------------------------
*/
