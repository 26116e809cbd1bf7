/* moe.h — train and run DeepSeek-V3-style models from one C header.        v0.1.0

   Do this in exactly one C or C++ file:
       #define MOE_IMPLEMENTATION
       #include "moe.h"
   and include "moe.h" plainly everywhere else.

   What is inside, in the order of the sections below (public declarations first, then the
   implementation, under the same numbers; each banner carries a tag to grep for, >>name):
     1. base      status codes, moe_ctx (device, threads, step arena, errors, logging), the
                  parallel loop every kernel uses, RNG, timer, file helpers
     2. numerics  bf16 / fp16 / fp8 (E4M3, E5M2) conversions, bit-exact with the CUDA
                  intrinsics; the one FP8 quantiser (1×B tiles, B×1 tiles, B×B blocks)
     3. kernels   the kernel interface (moe_backend): one table of entry points — memory,
                  GEMM, norms, RoPE, SwiGLU, attention, routing and dispatch, FP8, AdamW,
                  distillation — that every section from 6 on calls and a backend fills
     4. gemm      the CPU GEMM (packed, SIMD, threaded; FP32, BF16, FP8 by the V3 recipe),
                  grouped by expert; the public moe_gemm
     5. cpu       the CPU backend: every other entry of the table, SIMD + OpenMP
     6. tensor    moe_tensor: dtype, device, up to 4 dims, contiguous data, optional grad
     7. autograd  a tape recorded in the step arena, moe_backward, differentiable ops
     8. layers    linear layers (FP32, BF16, FP8) and what they keep for backward; MLA
                  (training and the absorbed, cached decode path), DeepSeekMoE (route, plan,
                  gather, experts, combine), SwiGLU MLP — orchestration only
     9. model     moe_config (Hugging Face names), moe_model (parameters, gradients in one
                  slab each) with MTP modules: one forward for training and decoding, the
                  loss, auxiliary-loss-free expert-bias updates
    10. train     AdamW (moments in slabs), learning-rate schedules, gradient clipping
    11. distill   teacher → student losses (forward / reverse KL), top-k teacher cache files
    12. io        config.json, token data, checkpoints, safetensors, Hugging Face directories
    13. infer     latent KV cache, sampling, MTP self-speculative decoding
    14. gpu       the CUDA entry points (moe_cuda.cuh)
    15. dist      moe_comm, the communicator: one process, or many over MPI (MOE_MPI) or, on
                  GPUs, NCCL (MOE_NCCL); the collectives data- and expert-parallel training
                  call, rank-ordered sums

   Conventions
     - Every fallible function returns moe_status (MOE_OK == 0) and leaves a one-line
       message in moe_ctx_error(ctx). Bad input never aborts the host program.
     - Tensors made by ops live in the context's step arena until moe_ctx_reset(ctx);
       tensors made with moe_tensor_new live until moe_tensor_free.
     - Results are bit-identical for any thread count: work is split so that every
       reduction runs in a fixed order.
     - Build with -ffp-contract=off (a fused multiply-add is written as fmaf where meant),
       and on glibc before 2.34 with -pthread (-fopenmp implies it): the TCP bootstrap's name
       lookup runs on a thread of its own.

   Compile-time options (define before including)
     MOE_STATIC         make every public function static
     MOE_MALLOC(sz) / MOE_REALLOC(p,sz) / MOE_FREE(p)   the allocator (all three or none)
     MOE_ASSERT(x)      our own invariants (default: assert)
     MOE_NO_SIMD        portable scalar kernels only
     MOE_CBLAS          route FP32 GEMMs to cblas_sgemm (link a CBLAS library)
     MOE_MPI            compile the MPI communicator in (build with mpicc)
     MOE_COMM_BUCKET    values per gradient-reduction bucket and ZeRO-1 round (default 2^22)
     MOE_REAL_F64       compute in double instead of float: the build that the
                        finite-difference gradient checks use (tensors of dtype MOE_F32
                        then hold doubles; FP8/BF16 paths still round through float)
     FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION   (the libFuzzer convention; tests/fuzz sets it)
                        the teacher cache's checksum is computed but not enforced, so a
                        fuzzer reaches the record checks behind it (checkpoints still
                        enforce theirs). Never define it in a real build.

   Environment
     MOE_GEMM_ZMM=0     new contexts use the 6×16 ymm FP32 GEMM kernel instead of the 6×32
                        zmm one (the default where the build has AVX-512; the same bits)
     MOE_GEMM_BF16=fma|dp|amx  the kernel of new contexts' BF16 GEMMs: FP32 FMAs over
                        bf16-rounded operands, vdpbf16ps (AVX512_BF16) or AMX tiles (AMX-BF16,
                        Linux); one the build or CPU lacks gives the next one down. Default:
                        amx where there is AMX, else dp, except on Intel CPUs (there vdpbf16ps
                        gives half the FP32 FMA rate: fma); other values: the default.
                        Unset, MOE_GEMM_BF16DP=0|1 (its name before) is read as fma|dp

   License: MIT or public domain, your choice — see the end of this file. */

#ifndef MOE_H
#define MOE_H

/* The implementation uses POSIX clock_gettime, fileno and fsync: ask for them before the
   first system header (include moe.h first in the MOE_IMPLEMENTATION file, or define
   _POSIX_C_SOURCE yourself; without it timing falls back to clock() and files skip fsync). */
#if defined(MOE_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && (defined(__unix__) || defined(__APPLE__))
#define _POSIX_C_SOURCE 200809L
#endif

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
   1. base — status codes, context, device, step arena, RNG, timer                       >>base
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
    MOE_ERR_UNSUPPORTED, /* valid, but not built into this binary */
    MOE_ERR_COMM         /* a collective failed: a peer is gone, or the ranks disagree */
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
/* Where the context's kernels run and its tensors and step arena live: the CPU (default),
   or a GPU of a build with the CUDA backend (section 14). Set it before making the tensors,
   models and optimizers that are to live there, with no step tensors held (after a reset). */
typedef enum moe_device { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 } moe_device;
MOE_API moe_status moe_ctx_set_device(moe_ctx *ctx, moe_device device, int index);
/* The same by name, as PyTorch writes it: "cpu", "cuda" (GPU 0) or "cuda:N". */
MOE_API moe_status moe_ctx_set_device_name(moe_ctx *ctx, const char *name);
MOE_API moe_device moe_ctx_device(const moe_ctx *ctx);
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
   2. numerics — low-precision formats and fine-grained FP8 quantisation             >>numerics
   ============================================================================================
   Conversions round to nearest, ties to even, keep subnormals and signed zeros, and match
   the CUDA host intrinsics bit for bit: __float2bfloat16_rn, __float2half_rn and
   __nv_cvt_float_to_fp8(x, __NV_SATFINITE, ...). NaN becomes the canonical NaN (bf16/f16
   0x7FFF, fp8 0x7F). E4M3 ("fn": no infinities, max 448) and E5M2 saturate out-of-range
   values and infinities to ±max finite, as SATFINITE does. */

typedef enum moe_dtype {
    MOE_F32 = 0, /* moe_real: float (double under MOE_REAL_F64) */
    MOE_BF16,
    MOE_F16,
    MOE_FP8_E4M3,
    MOE_FP8_E5M2,
    MOE_I32,
    MOE_DTYPE_COUNT
} moe_dtype;

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

/* ============================================================================================
   4. gemm — the public GEMM and the precision of the layers' GEMMs                      >>gemm
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

/* Precision of the GEMMs inside differentiable ops and layers, FP32 accumulation and FP32
   master weights in every mode:
   - MOE_F32 (default);
   - MOE_BF16: operands rounded to bf16; activations saved for backward kept in bf16;
   - MOE_FP8_E4M3: the DeepSeek-V3 recipe (reference §5). The three GEMMs of every linear
     layer of MLA and the MLPs (Fprop, Dgrad, Wgrad) take E4M3 operands: activations and
     output gradients in 1×B tiles along the reduction dim, weights in B×B blocks, the
     backward's operands re-quantised along their own reduction dim, one scale per tile or
     block computed online from its amax (by default the power of two at or above amax/448).
     The layers' inputs and the SwiGLU input are saved for backward in FP8, the rest in
     bf16. Embedding, output head, MTP projection and the other generic matmuls run in
     BF16; router, norms and the attention core in FP32. */
MOE_API moe_status moe_ctx_set_gemm_precision(moe_ctx *ctx, moe_dtype compute);

/* Options of the FP8 mode; zero fields take the defaults. */
typedef struct moe_fp8_options {
    int64_t block;    /* B (default 128; smaller for tiny models) */
    int per_tensor;   /* ablation: one scale per tensor instead of per tile / block */
    int amax_scales;  /* 1: every tile and block scaled by amax/448 (the V3 paper's scales);
                         0 (default): by the power of two at or above it (UE8M0 scales, as
                         in DeepSeek-V3.1), so that the backward's re-quantisation of a
                         1×B-tiled input into B×1 tiles is exact and every dequantised
                         operand is exactly a BF16 value: the GEMM then runs on the BF16
                         kernel (exact products, FP32 sums) instead of the FP32 one */
    int acc_bits;     /* emulate an accumulator that keeps this many significant bits
                         (Hopper's FP8 tensor cores: about 14); 0 = exact FP32 (default) */
    int acc_interval; /* with acc_bits: promote the partial sum to FP32 every this many
                         products (N_C, default 128); -1 = never */
    int stats;        /* 1: add up each GEMM operand's quantisation error (moe_ctx_fp8_stats) */
} moe_fp8_options;
/* Sets the FP8 options and zeroes the statistics. */
MOE_API moe_status moe_ctx_set_fp8(moe_ctx *ctx, const moe_fp8_options *opt);

/* What the FP8 GEMMs quantise, by role: Fprop X and W, Dgrad dY and W, Wgrad dY and X. */
typedef enum moe_fp8_role {
    MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, MOE_FP8_DGRAD_DY, MOE_FP8_DGRAD_W, MOE_FP8_WGRAD_DY, MOE_FP8_WGRAD_X, MOE_FP8_ROLES
} moe_fp8_role;
/* Quantisation error of the FP8 GEMM operands since moe_ctx_set_fp8, per role, with both
   scalings on the same values: the recipe's tiles and blocks, and one scale per tensor
   (whichever trains, the other is computed beside it, so with stats on every operand is
   quantised twice). A row is a token (X, dY) or an output channel (W). The error of the
   whole operand is sqrt(err_sq / sum_sq), dominated by its largest values; the typical
   row's is sqrt(row_rel_sq / rows), what the tiles protect: a token's precision whatever
   the others' magnitudes. Wgrad's X comes from the saved activations, FP8 in the scaling that
   trains where the recipe stashes one, so its errors there are largely those of the
   re-quantisation into B×1 tiles. Inside the MoE layer's parallel expert loop the sums are
   added in the order threads finish: equal to rounding, not bit for bit, from run to run. */
typedef struct moe_fp8_stats {
    int64_t values[MOE_FP8_ROLES];           /* elements quantised */
    int64_t rows[MOE_FP8_ROLES];             /* rows with a nonzero value */
    double sum_sq[MOE_FP8_ROLES];            /* Σ x² */
    double err_sq_tiles[MOE_FP8_ROLES];      /* Σ (x − x̂)², 1×B / B×1 tiles and B×B blocks */
    double err_sq_tensor[MOE_FP8_ROLES];     /* Σ (x − x̂)², one scale per tensor */
    double row_rel_sq_tiles[MOE_FP8_ROLES];  /* Σ over rows of Σ_row (x − x̂)² / Σ_row x² */
    double row_rel_sq_tensor[MOE_FP8_ROLES];
    int64_t zeroed_tiles[MOE_FP8_ROLES];     /* nonzero x with x̂ = 0 (below half the subnormal step) */
    int64_t zeroed_tensor[MOE_FP8_ROLES];
} moe_fp8_stats;
MOE_API moe_status moe_ctx_fp8_stats(moe_ctx *ctx, moe_fp8_stats *out);

/* ============================================================================================
   6. tensor — dense arrays with a dtype, a device and an optional gradient            >>tensor
   ============================================================================================
   A moe_tensor is a dense row-major array of up to 4 dims with a dtype and a device tag, and
   optionally a gradient (same shape, MOE_F32) and FP8 scales. Views share their base's data. */

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
/* Element i of a host tensor as double, whatever the dtype (i outside [0, numel) or a GPU
   tensor → NaN; set: MOE_ERR_ARG). A GPU tensor is read and written whole: */
MOE_API double moe_tensor_get(const moe_tensor *t, int64_t i);
MOE_API moe_status moe_tensor_set(moe_tensor *t, int64_t i, double value);
/* Copy all of t's values (numel × dtype size = bytes, without FP8 scales) to or from host
   memory, from any device (a GPU's: after the work queued before it). */
MOE_API moe_status moe_tensor_download(moe_ctx *ctx, const moe_tensor *t, void *host, size_t bytes);
MOE_API moe_status moe_tensor_upload(moe_ctx *ctx, moe_tensor *t, const void *host, size_t bytes);
/* Write "label: dtype[shape] first values..." through the context's log hook. */
MOE_API void moe_tensor_print(moe_ctx *ctx, const moe_tensor *t, const char *label);
/* Set t's gradient to zero (no-op when it has none). */
MOE_API void moe_tensor_zero_grad(moe_tensor *t);

/* ============================================================================================
   7. autograd — the tape, moe_backward and the differentiable ops                   >>autograd
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
/* YaRN context extension (all zero = off). As in transformers, cos/sin are multiplied by
   m(s, mscale)/m(s, mscale_all_dim) when both are non-zero, else by m(s, 1), where
   m(s, x) = 0.1·x·ln(s) + 1; the model's softmax scale gets m(s, mscale_all_dim)² when
   mscale_all_dim is non-zero. */
typedef struct moe_yarn {
    double factor;              /* s, e.g. 40 */
    int64_t original_max_pos;   /* L0, e.g. 4096 */
    double beta_fast, beta_slow; /* 32, 1 */
    double mscale, mscale_all_dim; /* 0: absent */
} moe_yarn;
/* Precomputed cos/sin for positions [0, max_pos) of a rotary dim `dim` (even). */
typedef struct moe_rope_table {
    int64_t dim, max_pos;
    float *cos_sin;    /* [max_pos][dim/2][2], in the memory of `device` */
    moe_device device; /* the device of the context that made it */
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

/* ============================================================================================
   8. layers and 9. model — DeepSeek-V3: MLA, DeepSeekMoE, MTP                          >>model
   ============================================================================================
   The configuration carries the Hugging Face DeepseekV3 config.json names. Sizes and
   hyper-parameters left at zero take the defaults of the tiny config (reference §12.1); for
   the optional features q_lora_rank, n_shared_experts, first_k_dense_replace,
   num_nextn_predict_layers, norm_topk_prob and tie_word_embeddings zero means "off".
   moe_config_load reads a config.json, where absent keys take Hugging Face's defaults and a
   0 that is written out is refused where it would mean "default" (a file says what it means). */

typedef enum moe_scoring { MOE_SCORING_SIGMOID = 0, MOE_SCORING_SOFTMAX = 1 } moe_scoring;
/* noaux_tc: sigmoid + bias, groups ranked by the sum of their top-2; group_limited_greedy:
   groups ranked by their max (V2); greedy: plain top-k over all experts (V2-Lite). */
typedef enum moe_topk_method { MOE_TOPK_NOAUX_TC = 0, MOE_TOPK_GREEDY = 1, MOE_TOPK_GROUP_LIMITED_GREEDY = 2 } moe_topk_method;

typedef struct moe_config {
    int64_t vocab_size, hidden_size, intermediate_size, moe_intermediate_size;
    int64_t num_hidden_layers, first_k_dense_replace, num_attention_heads;
    int64_t q_lora_rank; /* 0: a plain q_proj (Hugging Face null) */
    int64_t kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
    int64_t n_routed_experts, n_shared_experts, num_experts_per_tok, n_group, topk_group;
    moe_scoring scoring_func;
    moe_topk_method topk_method;
    int norm_topk_prob;
    double routed_scaling_factor;
    int64_t num_nextn_predict_layers;
    double rope_theta;
    moe_yarn rope_scaling; /* factor 0: no YaRN */
    double rms_norm_eps;
    int64_t max_position_embeddings;
    int tie_word_embeddings;
    double initializer_range; /* std of the N(0, std²) initialisation */
    moe_rope_layout rope_layout; /* of q_pe and k_pe: PAIRS (config.json rope_interleave true, the
                                    default) or HALVES (rope_interleave false, rotate_half) */
} moe_config;

/* The configs of reference §12: tiny (seconds on a CPU) and small (minutes). */
MOE_API moe_config moe_config_tiny(void);
MOE_API moe_config moe_config_small(void);
/* Fill zero fields with defaults (see above) into *out. */
MOE_API void moe_config_resolve(const moe_config *cfg, moe_config *out);
/* Check a (resolved) config; the message explains the first inconsistency. */
MOE_API moe_status moe_config_validate(moe_ctx *ctx, const moe_config *cfg);
/* Read a Hugging Face config.json (text in memory, or a file). Keys that are present are
   honoured or refused by name (out-of-range numbers, explicit zeros that would mean "default",
   features moe.h lacks such as attention_bias); keys it does not know are ignored. */
MOE_API moe_status moe_config_parse(moe_ctx *ctx, const char *json, size_t len, moe_config *cfg);
MOE_API moe_status moe_config_load(moe_ctx *ctx, const char *path, moe_config *cfg);
/* Write a config.json that transformers' DeepseekV3Config reads. */
MOE_API moe_status moe_config_save(moe_ctx *ctx, const moe_config *cfg, const char *path);

typedef struct moe_model moe_model;

/* A model with N(0, initializer_range²) weights, unit norms and zero expert biases; every
   parameter requires gradients. The seed fixes the initialisation. */
MOE_API moe_status moe_model_new(moe_ctx *ctx, const moe_config *cfg, uint64_t seed, moe_model **out);
/* A copy of src (a model of src_ctx's device) on dst_ctx's device: the same config, weights
   and expert biases, gradients zero — how a model moves between the host and a GPU. */
MOE_API moe_status moe_model_copy(moe_ctx *dst_ctx, moe_ctx *src_ctx, const moe_model *src, moe_model **out);
MOE_API void moe_model_free(moe_ctx *ctx, moe_model *model);
MOE_API const moe_config *moe_model_config(const moe_model *model);
/* The model's tensors, parameters first, then buffers (expert biases). */
MOE_API int64_t moe_model_tensor_count(const moe_model *model);
MOE_API moe_tensor *moe_model_tensor(const moe_model *model, int64_t i, const char **name, int *is_param);
MOE_API moe_tensor *moe_model_find(const moe_model *model, const char *name);
/* Parameter counts: all of them, and those one token runs through (routed experts counted
   num_experts_per_tok times, embedding and head once); MTP modules counted separately. */
MOE_API void moe_model_param_counts(const moe_model *model, int64_t *total, int64_t *active, int64_t *mtp);
MOE_API void moe_model_zero_grad(moe_model *model);
/* Gradient accumulation that "reduces fully, then adds": after each micro-batch's backward,
   move its gradients into the model's running sum (the first call after a zero_grad or a
   moe_model_reduce_grads starts it; later ones add, in call order) and zero them; section
   15's moe_model_reduce_grads makes the sum the gradients again. One more gradient-sized
   slab, made on first use. */
MOE_API moe_status moe_model_accumulate_grads(moe_ctx *ctx, moe_model *model);

/* Options of the training loss. */
typedef struct moe_loss_opts {
    float mtp_lambda;      /* λ of L = CE + (λ/D)·Σ_k CE_k (0.3 in V3's first phase) */
    float balance_alpha;   /* α of the sequence-wise balance loss (0 = off; V3: 1e-4) */
} moe_loss_opts;
/* What one loss evaluation was made of. */
typedef struct moe_loss_parts {
    double total, main, mtp[4], balance;
} moe_loss_parts;

/* Training loss on tokens [B, T+1] (inputs are [:, :T], next-token targets [:, 1:]). Records
   the tape when gradients are enabled; counts the expert loads for the bias update. */
MOE_API moe_status moe_model_loss(moe_ctx *ctx, moe_model *model, const int32_t *tokens, int64_t batch, int64_t seq,
                                  const moe_loss_opts *opts, moe_tensor **loss, moe_loss_parts *parts);
/* Next-token logits [B, T, V] of tokens [B, T] (positions pos0..pos0+T-1). */
MOE_API moe_status moe_model_logits(moe_ctx *ctx, moe_model *model, const int32_t *tokens, int64_t batch, int64_t seq,
                                    moe_tensor **logits);

/* Auxiliary-loss-free balancing: b_i ← b_i + γ·sign(mean_load − load_i) per MoE layer, over
   the loads counted since the last call (the whole batch of a step); then the counts reset. */
MOE_API moe_status moe_model_update_expert_bias(moe_ctx *ctx, moe_model *model, float gamma);
/* MaxVio = max_i load_i / mean_load − 1 over the loads counted so far, averaged over the
   MoE layers of the main model (0 when nothing was counted). */
MOE_API double moe_model_max_vio(const moe_model *model);
/* Forget the counted loads without updating the biases (e.g. after evaluation passes). */
MOE_API void moe_model_reset_loads(moe_model *model);
/* Bytes of activations the layers (MLA, MoE, FFN) saved for backward since the last
   reset, in the format they are kept in (FP32, BF16 or FP8 codes plus scales). */
MOE_API size_t moe_ctx_saved_bytes(const moe_ctx *ctx);

/* ============================================================================================
   10. train — AdamW, learning-rate schedules, gradient clipping                        >>train
   ============================================================================================ */

typedef struct moe_adamw_config {
    float beta1, beta2, eps, weight_decay; /* zeros: 0.9, 0.95, 1e-8, 0.1 */
    moe_dtype moment_dtype;                /* MOE_F32 (default) or MOE_BF16 moments */
} moe_adamw_config;
typedef struct moe_adamw moe_adamw;

/* AdamW over the model's parameters; norms and biases get no weight decay. */
MOE_API moe_status moe_adamw_new(moe_ctx *ctx, moe_model *model, const moe_adamw_config *cfg, moe_adamw **out);
MOE_API void moe_adamw_free(moe_ctx *ctx, moe_adamw *opt);
/* One update with learning rate lr: gradients are first multiplied by grad_scale (e.g.
   1/accumulation steps), then clipped to global norm `clip` (0 = no clipping). Writes the
   pre-clip global norm to *grad_norm when given. Gradients are zeroed afterwards. */
MOE_API moe_status moe_adamw_step(moe_ctx *ctx, moe_adamw *opt, float lr, float grad_scale, float clip, float *grad_norm);
/* The pre-clip global gradient norm that moe_adamw_step would report for this grad_scale (the
   same arithmetic, bit for bit), changing nothing: lets a trainer skip a step before it. */
MOE_API moe_status moe_adamw_grad_norm(moe_ctx *ctx, moe_adamw *opt, float grad_scale, float *grad_norm);
MOE_API int64_t moe_adamw_steps(const moe_adamw *opt);

typedef enum moe_lr_shape { MOE_LR_COSINE = 0, MOE_LR_WSD = 1 } moe_lr_shape;
/* Linear warm-up to lr_max, then cosine to lr_min (COSINE), or warm-up, constant until
   decay_start, cosine to lr_min by total_steps (WSD: the DeepSeek-V3 shape). */
typedef struct moe_lr_schedule {
    moe_lr_shape shape;
    float lr_max, lr_min;
    int64_t warmup_steps, decay_start, total_steps;
} moe_lr_schedule;
MOE_API float moe_lr_at(const moe_lr_schedule *sched, int64_t step);

/* ============================================================================================
   11. distill — a student learns from a frozen teacher's distribution                >>distill
   ============================================================================================
   L = α·CE(student, labels) + (1−α)·T²·KL, where KL compares the teacher's and the student's
   distributions at temperature T (the T² factor keeps the size of the KL gradient independent
   of T, as in Hinton et al. 2015). The teacher is a model run forward-only next to the student
   (online), or a file of its top-k log-probabilities per position written once (offline).
   Teacher and student must share the vocabulary; the teacher may be larger, dense or MoE. */

typedef enum moe_kl_dir {
    MOE_KL_FORWARD = 0, /* KL(p_teacher ‖ p_student): mass-covering, the usual choice */
    MOE_KL_REVERSE = 1  /* KL(p_student ‖ p_teacher): mode-seeking */
} moe_kl_dir;

typedef struct moe_distill_opts {
    float alpha;          /* weight of the hard-label cross-entropy, in [0, 1] */
    float temperature;    /* T > 0 of both distributions in the KL term */
    moe_kl_dir direction; /* which KL */
    int32_t ignore_index; /* rows whose label is this take part in neither term */
} moe_distill_opts;
/* alpha 0.5, temperature 2, forward KL, ignore_index −1: what a NULL opts means. */
MOE_API moe_distill_opts moe_distill_defaults(void);

/* What a distillation loss was made of; ce and kl are means over the rows that count. */
typedef struct moe_distill_parts {
    double total;          /* the loss (MTP and balance terms included at model level) */
    double ce;             /* hard-label cross-entropy of the student at T = 1 (nats) */
    double kl;             /* KL at temperature T, before the T² factor */
    double mtp[4], balance;
    int64_t rows;          /* rows that counted */
} moe_distill_parts;

/* The loss from full teacher logits. student_logits: [..., V], differentiable; teacher_logits:
   the same shape, never differentiated; labels: MOE_I32 [...] (may be NULL when alpha is 0:
   then every row counts). parts may be NULL. */
MOE_API moe_status moe_distill_loss(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *teacher_logits,
                                    moe_tensor *labels, const moe_distill_opts *opts, moe_tensor **loss,
                                    moe_distill_parts *parts);
/* The loss from the teacher's top-k: top_ids MOE_I32 [rows, k] (distinct, in [0, V)), top_logp
   [rows, k] (teacher log-probabilities at T) and tail [rows] (the teacher's mass outside the k
   ids). The tail is one bucket, compared with the student's mass outside the same k ids. */
MOE_API moe_status moe_distill_loss_topk(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *top_ids,
                                         moe_tensor *top_logp, moe_tensor *tail, moe_tensor *labels,
                                         const moe_distill_opts *opts, moe_tensor **loss, moe_distill_parts *parts);

/* The student's training loss on tokens [B, T+1] with a teacher model: moe_model_loss with the
   main cross-entropy replaced by the distillation loss (MTP and balance terms as lopts says).
   The teacher runs forward-only (no tape; its activations are dropped as soon as its logits
   are taken) and its expert-load counters are left as they were. */
MOE_API moe_status moe_model_distill_loss(moe_ctx *ctx, moe_model *student, moe_model *teacher, const int32_t *tokens,
                                          int64_t batch, int64_t seq, const moe_loss_opts *lopts,
                                          const moe_distill_opts *dopts, moe_tensor **loss, moe_distill_parts *parts);

/* ---- the top-k teacher cache ----
   A file of one record per position: the teacher's k most likely token ids, their
   log-probabilities at temperature T, and the probability mass left over. Header: magic,
   version, vocab, k, count, T, a caller's tag (e.g. a hash of the data settings) and an FNV-1a
   checksum over header and records. Written through a temporary file renamed into place. */
typedef struct moe_distill_writer moe_distill_writer;
typedef struct moe_distill_cache moe_distill_cache;
typedef struct moe_distill_info {
    int64_t vocab, k, count; /* count: records (positions) in the file */
    float temperature;
    uint64_t tag;
} moe_distill_info;

/* Start a cache for `path` (nothing appears there until moe_distill_writer_finish). */
MOE_API moe_status moe_distill_writer_new(moe_ctx *ctx, const char *path, int64_t vocab, int64_t k, float temperature,
                                          uint64_t tag, moe_distill_writer **out);
/* Append one record per row of teacher logits [..., vocab], in row order. */
MOE_API moe_status moe_distill_writer_add(moe_ctx *ctx, moe_distill_writer *w, const moe_tensor *teacher_logits);
/* Write the header (count, checksum), fsync and rename the file into place. */
MOE_API moe_status moe_distill_writer_finish(moe_ctx *ctx, moe_distill_writer *w);
/* Free the writer; an unfinished file is removed. */
MOE_API void moe_distill_writer_free(moe_distill_writer *w);

/* Open a cache: the header must be valid, the size must match count records exactly and the
   checksum must match (the whole file is read once to check it). */
MOE_API moe_status moe_distill_cache_open(moe_ctx *ctx, const char *path, moe_distill_cache **out);
MOE_API void moe_distill_cache_close(moe_distill_cache *cache);
/* The header's figures (all zero for NULL). */
MOE_API moe_distill_info moe_distill_cache_info(const moe_distill_cache *cache);
/* Records [first, first + rows) as step-arena tensors ids [rows, k], logp [rows, k] and
   tail [rows], the inputs of moe_distill_loss_topk. Reads only those records. */
MOE_API moe_status moe_distill_cache_read(moe_ctx *ctx, moe_distill_cache *cache, int64_t first, int64_t rows,
                                          moe_tensor **ids, moe_tensor **logp, moe_tensor **tail);
/* moe_model_distill_loss with the teacher read from the cache: records [first, first + B·T)
   hold the teacher at the B·T input positions of tokens, row-major. The cache's temperature
   must equal dopts' and its vocabulary the student's. */
MOE_API moe_status moe_model_distill_loss_cached(moe_ctx *ctx, moe_model *student, moe_distill_cache *cache,
                                                 int64_t first, const int32_t *tokens, int64_t batch, int64_t seq,
                                                 const moe_loss_opts *lopts, const moe_distill_opts *dopts,
                                                 moe_tensor **loss, moe_distill_parts *parts);

/* ============================================================================================
   12. io — token data, checkpoints (config.json: section 9)                               >>io
   ============================================================================================ */

/* A token stream split into training and validation parts. A file that starts with the
   llm.c shard header (magic 20240520, version 1, uint16 tokens) is read as tokens; any
   other file is text, one token per byte (vocabulary 256). The last `val_fraction` of the
   tokens is the validation part. */
typedef struct moe_dataset {
    int32_t *tokens;
    int64_t n_tokens, n_train; /* tokens [0, n_train) train, [n_train, n_tokens) validate */
    int64_t vocab;             /* 256 for text, max token + 1 for shards */
} moe_dataset;
MOE_API moe_status moe_data_load(moe_ctx *ctx, const char *path, double val_fraction, moe_dataset **out);
MOE_API void moe_data_free(moe_ctx *ctx, moe_dataset *data);
/* Batch number `index` as tokens [B, T+1]. Training batches are windows at positions drawn
   from the counter-based RNG of (seed, index), so batch i is the same after a resume;
   validation batches (val = 1) tile the validation part in order, wrapping around. */
MOE_API moe_status moe_data_batch(moe_ctx *ctx, const moe_dataset *data, int val, uint64_t seed, int64_t index, int64_t B,
                                  int64_t T, int32_t *out);

/* What a checkpoint holds besides the model and optimizer tensors. */
#define MOE_TRAIN_USER_MAX 512
typedef struct moe_train_state {
    int64_t step;          /* optimizer steps done */
    uint64_t seed;         /* data and initialisation seed */
    int64_t data_index;    /* next training batch index */
    double tokens_seen;
    int64_t total_steps;   /* the LR schedule's length, so that a resumed run keeps it (0: not recorded) */
    int64_t skipped;       /* steps a loss-spike guard skipped so far (not counted in step) */
    int64_t n_user;        /* values in use in user[], 0..MOE_TRAIN_USER_MAX */
    double user[MOE_TRAIN_USER_MAX]; /* the trainer's own numbers, stored verbatim (its settings, a
                                        spike detector's window): whatever an exact resume needs */
} moe_train_state;

/* Write model, optimizer moments, expert biases and state to `path` atomically (temporary
   file, fsync, rename) with a checksum; the previous file stays intact on failure. */
MOE_API moe_status moe_ckpt_save(moe_ctx *ctx, const char *path, const moe_model *model, const moe_adamw *opt,
                                 const moe_train_state *state);
/* Read a checkpoint into an existing model (and optimizer, when given) of the same config.
   A truncated, corrupt or mismatched file is refused and nothing is changed. */
MOE_API moe_status moe_ckpt_load(moe_ctx *ctx, const char *path, moe_model *model, moe_adamw *opt, moe_train_state *state);
/* Read just the config stored in a checkpoint (to build the model before moe_ckpt_load). */
MOE_API moe_status moe_ckpt_config(moe_ctx *ctx, const char *path, moe_config *cfg);

/* A run's checkpoints in one directory: DIR/PREFIX-<step, at least 8 digits>.bin (POSIX only).
   Save as DIR/PREFIX-<state->step>.bin, then delete the older files of PREFIX beyond the newest
   `keep` (0 keeps all; files of a later step are left alone). The path goes to `written`
   (cap bytes) when not NULL. */
MOE_API moe_status moe_ckpt_save_step(moe_ctx *ctx, const char *dir, const char *prefix, int keep, const moe_model *model,
                                      const moe_adamw *opt, const moe_train_state *state, char *written, size_t cap);
/* The newest DIR/PREFIX-<step>.bin whose header, length and checksum verify, into path (cap
   bytes); a newer file that fails is skipped with a warning (log hook) naming why. path is ""
   when there is none: still MOE_OK. */
MOE_API moe_status moe_ckpt_latest(moe_ctx *ctx, const char *dir, const char *prefix, char *path, size_t cap);
/* Remove the temporary files (NAME.tmp<pid>) that processes no longer running left in DIR (a
   kill during an atomic write) and, when prefix is not NULL, the checkpoints DIR/PREFIX-<step>.bin
   of a step above after_step (after_step < 0: all of them). *removed gets the count. */
MOE_API moe_status moe_ckpt_clean(moe_ctx *ctx, const char *dir, const char *prefix, int64_t after_step, int *removed);

/* ---- safetensors ----
   A strict reader: the 8-byte header length must fit the file (and 100 MB), the header must
   be a JSON object whose tensors have a known dtype, a shape whose byte size matches their
   data_offsets, and offsets that tile the data area exactly (no overlap, no gap). */
typedef enum moe_st_dtype {
    MOE_ST_F32, MOE_ST_BF16, MOE_ST_F16, MOE_ST_F8_E4M3, MOE_ST_F8_E5M2, MOE_ST_I32, MOE_ST_I64, MOE_ST_DTYPE_COUNT
} moe_st_dtype;
#define MOE_ST_MAX_DIMS 8
typedef struct moe_st_tensor {
    const char *name;
    moe_st_dtype dtype;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    int64_t numel;
    const void *data; /* little-endian bytes inside the file image */
    size_t bytes;
} moe_st_tensor;
typedef struct moe_st_file moe_st_file;

MOE_API moe_status moe_st_open(moe_ctx *ctx, const char *path, moe_st_file **out);
/* The same from bytes in memory (copied). */
MOE_API moe_status moe_st_open_memory(moe_ctx *ctx, const void *bytes, size_t len, moe_st_file **out);
MOE_API void moe_st_close(moe_st_file *file);
MOE_API int64_t moe_st_count(const moe_st_file *file);
MOE_API const moe_st_tensor *moe_st_get(const moe_st_file *file, int64_t i);
MOE_API const moe_st_tensor *moe_st_find(const moe_st_file *file, const char *name);
/* Element i as float (F32/BF16/F16/F8; NaN for integer dtypes). */
MOE_API float moe_st_value(const moe_st_tensor *t, int64_t i);

/* A writer that collects tensors (copied as given) and writes the file atomically. */
typedef struct moe_st_writer moe_st_writer;
MOE_API moe_status moe_st_writer_new(moe_ctx *ctx, moe_st_writer **out);
MOE_API moe_status moe_st_writer_add(moe_ctx *ctx, moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                                     const int64_t *shape, const void *data);
MOE_API moe_status moe_st_writer_save(moe_ctx *ctx, moe_st_writer *w, const char *path);
MOE_API void moe_st_writer_free(moe_st_writer *w);

/* ---- Hugging Face DeepseekV3 checkpoints ----
   A directory with config.json and model.safetensors (or shards listed in
   model.safetensors.index.json), tensor names as transformers' DeepseekV3ForCausalLM and the
   released weights use them (MTP module k as layer num_hidden_layers + k − 1). FP8 weights
   with weight_scale_inv blocks are dequantised on load. Loading is strict: every tensor with
   exactly its shape (fused expert stacks included), nothing extra, no NaN or Inf (refused with
   the tensor's name), an exact shard index; files that are not regular files are refused. */
typedef struct moe_hf_save_opts {
    int fp8;            /* write linear weights as F8_E4M3 + weight_scale_inv (B×B blocks) */
    int64_t fp8_block;  /* B, default 128 */
    int gradients;      /* write the parameters' gradients instead of their values */
} moe_hf_save_opts;
MOE_API moe_status moe_model_load_hf(moe_ctx *ctx, const char *dir, moe_model **out);
MOE_API moe_status moe_model_save_hf(moe_ctx *ctx, const moe_model *model, const char *dir, const moe_hf_save_opts *opts);

/* ============================================================================================
   13. infer — latent KV cache, sampling, generation, speculative decoding              >>infer
   ============================================================================================
   A moe_gen session holds, per layer and cached token, only what MLA needs (reference §2.4):
   the normalised latent c_KV (kv_lora_rank values) and the RoPE'd shared key k_pe
   (qk_rope_head_dim values). Decoding folds W_UK into the query and W_UV into the output, so
   keys and values are not expanded (except a prompt into an empty cache, which by default
   attends the naive way: see moe_gen_set_attn). The MTP modules get caches of their own and
   draft tokens that the main model verifies in one pass (reference §4.3). A session works in a
   private step arena, so it never resets the caller's context; errors are reported on the
   caller's context. It reads the model's weights at every call: changing them invalidates
   what is cached (call moe_gen_reset). */

typedef struct moe_gen moe_gen;

/* How attention reads the cache: AUTO takes NAIVE for a prompt into an empty cache (k and v
   are expanded once, cheaper when queries ≈ keys) and ABSORB otherwise (decode). */
typedef enum moe_gen_attn { MOE_GEN_ATTN_AUTO = 0, MOE_GEN_ATTN_ABSORB = 1, MOE_GEN_ATTN_NAIVE = 2 } moe_gen_attn;

/* A session for `model` with room for `max_len` tokens (0: max_position_embeddings, which is
   also the upper limit since RoPE is tabulated that far). The model must outlive it. */
MOE_API moe_status moe_gen_new(moe_ctx *ctx, moe_model *model, int64_t max_len, moe_gen **out);
MOE_API void moe_gen_free(moe_gen *gen);
/* Forget every cached token (main and MTP caches). */
MOE_API void moe_gen_reset(moe_gen *gen);
/* Tokens in the main cache, and how many fit. */
MOE_API int64_t moe_gen_len(const moe_gen *gen);
MOE_API int64_t moe_gen_capacity(const moe_gen *gen);
MOE_API moe_status moe_gen_set_attn(moe_ctx *ctx, moe_gen *gen, moe_gen_attn attn);
/* Append tokens[0..n) at positions len..len+n-1 and write the logits of the last
   `logit_rows` of them (0..n) to logits [logit_rows, vocab]. Past the capacity: an error,
   nothing changes. */
MOE_API moe_status moe_gen_forward(moe_ctx *ctx, moe_gen *gen, const int32_t *tokens, int64_t n, int64_t logit_rows,
                                   float *logits);
/* Roll the main cache back to its first `len` tokens (e.g. after rejected drafts). */
MOE_API moe_status moe_gen_truncate(moe_ctx *ctx, moe_gen *gen, int64_t len);
/* Cache bytes per token over the main layers: this latent cache, and a standard multi-head
   cache of k [H, nope+rope] and v [H, v_head_dim] for the same heads (both in moe_real). */
MOE_API void moe_gen_cache_bytes(const moe_model *model, int64_t *latent, int64_t *mha);

/* Sampling: temperature 0 is greedy (argmax, ties to the lower id); otherwise softmax of
   logits/temperature, restricted to the top_k most likely (0 = all), then to the smallest
   most-likely set whose mass reaches top_p (0 or ≥ 1 = all), renormalised. */
typedef struct moe_sampling {
    float temperature;
    int64_t top_k;
    float top_p;
} moe_sampling;
/* The distribution the options above make from logits [vocab] (greedy: one-hot). */
MOE_API moe_status moe_gen_probs(moe_ctx *ctx, const float *logits, int64_t vocab, const moe_sampling *s, float *probs);
/* Draw a token from probs [vocab] (need not be normalised) with one draw of rng. */
MOE_API moe_status moe_gen_sample_probs(moe_ctx *ctx, const float *probs, int64_t vocab, moe_rng *rng, int32_t *token);
/* Speculative-sampling check of a drafted token `draft` ~ q against the target p (both
   [vocab]): keep it with probability min(1, p/q), else draw from norm(max(p − q, 0)).
   *token is the draft or its replacement; whatever q is, *token is distributed as p. */
MOE_API moe_status moe_gen_verify_draft(moe_ctx *ctx, const float *p, const float *q, int64_t vocab, int32_t draft,
                                        moe_rng *rng, int32_t *token, int *accepted);

/* Called with each new token as it is produced; return non-zero to stop. */
typedef int (*moe_gen_token_fn)(void *user, int32_t token);

typedef struct moe_gen_opts {
    moe_sampling sampling;
    uint64_t seed;              /* of the sampling RNG */
    int64_t max_tokens;         /* new tokens at most (0: until the cache is full) */
    const char *stop;           /* stop after these bytes appear (byte-level tokens), or NULL */
    int speculative;            /* draft with the MTP modules and verify with the main model */
    int64_t n_draft;            /* drafts per step (0: one per MTP module, at most that many) */
    moe_gen_token_fn on_token;  /* streaming callback, or NULL */
    void *user;
} moe_gen_opts;

typedef enum moe_gen_stop { MOE_GEN_STOP_MAX_TOKENS = 0, MOE_GEN_STOP_STRING, MOE_GEN_STOP_CALLBACK, MOE_GEN_STOP_CACHE_FULL } moe_gen_stop;

/* What a generation did. tok_s counts the tokens after the first (which the prompt pass
   yields) over the decode time; acceptance = accepted / drafted. */
typedef struct moe_gen_stats {
    int64_t prompt_tokens, new_tokens, main_passes, drafted, accepted;
    double prefill_s, decode_s, tok_s, acceptance;
    int64_t cache_bytes_per_token, mha_cache_bytes_per_token;
    moe_gen_stop stop;
} moe_gen_stats;

/* Reset the session, run the prompt, and generate into out[0..cap) (*n_out tokens). The
   cache then holds the prompt and every generated token but the last. An explicit
   max_tokens that the cache cannot hold is an error before anything runs. */
MOE_API moe_status moe_gen_generate(moe_ctx *ctx, moe_gen *gen, const int32_t *prompt, int64_t n_prompt,
                                    const moe_gen_opts *opts, int32_t *out, int64_t cap, int64_t *n_out,
                                    moe_gen_stats *stats);

/* ============================================================================================
   14. gpu — the CUDA backend's entry points, the planned communicator                    >>gpu
   ============================================================================================
   moe_cuda.cuh defines these when the implementation is compiled by nvcc with MOE_CUDA
   defined (the implementation then includes it); other builds do not declare them. The GPU is
   chosen with moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, index): the context's tensors, models,
   optimizer and step arena then live in that GPU's memory, and every op runs section 3's
   table as moe_cuda.cuh fills it, on one stream per device. Results reach the host only
   through the calls that return host values (losses, norms, moe_tensor_get, checkpoints),
   which wait for the stream; everything else is asynchronous. */

#ifdef MOE_CUDA
/* Number of usable GPUs (0 without a driver or device; that is not an error). */
MOE_API moe_status moe_cuda_device_count(moe_ctx *ctx, int *count);
/* Wait until the work the context queued on its GPU is done (MOE_OK at once on the CPU). */
MOE_API moe_status moe_cuda_sync(moe_ctx *ctx);
/* on = 1: wait for and check every kernel as it is launched, so an asynchronous fault is
   reported by the call that caused it (slow; the environment's MOE_CUDA_SYNC=1 does the
   same for new GPU contexts). */
MOE_API moe_status moe_cuda_set_debug_sync(moe_ctx *ctx, int on);
/* The context's GPU, e.g. "NVIDIA H100 80GB HBM3" ("cpu" on the CPU). */
MOE_API const char *moe_cuda_device_name(const moe_ctx *ctx);
#endif

/* ============================================================================================
   15. dist — the communicator, data and expert parallelism, ZeRO-1                     >>dist
   ============================================================================================
   moe_comm is the second table beside the kernel one: the collectives that data- and
   expert-parallel training call at fixed points. SELF (one process) needs nothing; MPI is
   compiled in with MOE_MPI (Open MPI, build with mpicc). Every collective blocks, works on
   host memory and returns moe_status: an MPI error comes back as MOE_ERR_COMM with MPI's
   message (the communicator then cannot be trusted: report it and end the job). NCCL (the
   CUDA build with MOE_NCCL, moe_comm_init_nccl) works on GPU memory instead, on the
   context's stream: see there. Counts are
   elements; any rank may contribute zero. The rank-ordered sums (moe_comm_allreduce_ordered,
   moe_comm_reduce_scatter) give every rank ((x_0 + x_1) + x_2) + …, what one process adding
   P micro-batches in order computes, so a P-rank run can be bit-identical to one process:
   data parallelism (moe_model_reduce_grads), ZeRO-1 (moe_adamw_shard) and expert parallelism
   (moe_model_expert_parallel) keep to it, and their checkpoints are one process's. */

typedef struct moe_comm moe_comm;
typedef enum moe_comm_kind { MOE_COMM_SELF = 0, MOE_COMM_MPI, MOE_COMM_NCCL } moe_comm_kind;
typedef enum moe_comm_type { MOE_COMM_F32 = 0, MOE_COMM_F64, MOE_COMM_I32, MOE_COMM_I64, MOE_COMM_BYTE } moe_comm_type;
typedef enum moe_comm_op { MOE_COMM_SUM = 0, MOE_COMM_MAX } moe_comm_op;

/* This build's kind for a job: MPI when compiled with MOE_MPI, else one process. */
#ifdef MOE_MPI
#define MOE_COMM_DEFAULT MOE_COMM_MPI
#else
#define MOE_COMM_DEFAULT MOE_COMM_SELF
#endif

/* A communicator over the job: SELF, or MPI's world (MPI is initialised here, funneled,
   unless the program did it; then freeing this communicator finalises it). Over MPI, ctx's BF16
   GEMM kernel (MOE_GEMM_BF16) becomes the job's: the lowest of the ranks' (FMA < vdpbf16ps <
   AMX), so ranks on different CPUs compute alike (contexts made later choose their own). NCCL
   communicators come from moe_comm_init_nccl. */
MOE_API moe_status moe_comm_init(moe_ctx *ctx, moe_comm_kind kind, moe_comm **out);
/* An NCCL communicator over the job's GPUs (the CUDA build with MOE_NCCL and -lnccl; other
   builds: MOE_ERR_UNSUPPORTED). ctx must be on its GPU (moe_ctx_set_device(ctx,
   MOE_DEVICE_CUDA, local rank) first; one GPU per rank) and stay there while the
   communicator lives: its device and stream are the communicator's. NCCL's 128-byte id
   comes from rank 0 either over `bootstrap` (an MPI communicator: its ranks and size are
   NCCL's; how = NULL) or, with bootstrap NULL, through moe_comm_share(how = "tcp:HOST:PORT"
   or "file:PATH", timeout_s) with the rank and size of moe_comm_env: every step of it waits at
   most what is left of timeout_s (a rank 0 that never answers, or a process on PORT that
   accepts and never sends, gives MOE_ERR_COMM naming the timeout). file:PATH must be fresh per
   job (name it after the job, e.g. with $SLURM_JOB_ID, or remove it before the job starts): a
   rank that gets there before rank 0 has written reads a file an earlier job left at PATH and
   takes its stale id, and NCCL's init then fails or waits for ranks that never come (rank 0
   replaces the file atomically; it does not remove an old one first, as that would not close
   the window: the stale file is readable from the job's start until rank 0's write, removal
   or not). The collectives then
   take GPU buffers and are ordered on the context's stream (the host waits only where it
   reads: moe_cuda_sync, a download); host buffers are accepted too and pass through device
   memory (meant for flags and counts). The rank-ordered sums add on the GPU in rank order,
   the bits of the host's sum. moe_model_reduce_grads works with it for a GPU model (plain
   data parallelism); ZeRO-1 and expert parallelism over NCCL are refused. A failed NCCL call
   gives MOE_ERR_COMM with NCCL's message; a rank that dies makes the others wait in NCCL. */
MOE_API moe_status moe_comm_init_nccl(moe_ctx *ctx, moe_comm *bootstrap, const char *how, double timeout_s, moe_comm **out);
/* The ranks with the same color (≥ 0), ordered by key, then rank (a collective over comm). */
MOE_API moe_status moe_comm_split(moe_ctx *ctx, moe_comm *comm, int color, int key, moe_comm **out);
/* Free split communicators before the one they came from. */
MOE_API void moe_comm_free(moe_comm *comm);
MOE_API int moe_comm_rank(const moe_comm *comm);
MOE_API int moe_comm_size(const moe_comm *comm);
MOE_API moe_status moe_comm_barrier(moe_ctx *ctx, moe_comm *comm);
/* buf (n elements) of rank root to every rank. */
MOE_API moe_status moe_comm_bcast(moe_ctx *ctx, moe_comm *comm, void *buf, int64_t n, moe_comm_type type, int root);
/* buf = the sum or the max over ranks, in place, in MPI's order of addition (use the
   ordered sum where floating-point bits must not depend on the number of ranks). */
MOE_API moe_status moe_comm_allreduce(moe_ctx *ctx, moe_comm *comm, void *buf, int64_t n, moe_comm_type type,
                                      moe_comm_op op);
/* buf = Σ over ranks in rank order, in place (through a receive buffer of n × size elements
   that the communicator keeps until it is freed). Send and receive buffers of every
   collective must not overlap. */
MOE_API moe_status moe_comm_allreduce_ordered(moe_ctx *ctx, moe_comm *comm, void *buf, int64_t n, moe_comm_type type);
/* send holds size blocks, block r counts[r] elements; recv (counts[rank] elements) = the
   rank-ordered sum of block `rank` of every rank's send (ZeRO-1's gradient shards). */
MOE_API moe_status moe_comm_reduce_scatter(moe_ctx *ctx, moe_comm *comm, const void *send, void *recv, const int64_t *counts,
                                           moe_comm_type type);
/* recv = rank 0's send (counts[0] elements), then rank 1's, …; send holds counts[rank]. */
MOE_API moe_status moe_comm_allgather(moe_ctx *ctx, moe_comm *comm, const void *send, void *recv, const int64_t *counts,
                                      moe_comm_type type);
/* Block r of send (n elements) goes to rank r; block r of recv comes from rank r. */
MOE_API moe_status moe_comm_alltoall(moe_ctx *ctx, moe_comm *comm, const void *send, void *recv, int64_t n,
                                     moe_comm_type type);
/* send_rows[r] rows of `width` elements go to rank r and recv_rows[r] rows come from it, the
   blocks contiguous in rank order (the expert-parallel dispatch and combine). */
MOE_API moe_status moe_comm_alltoallv(moe_ctx *ctx, moe_comm *comm, const void *send, const int64_t *send_rows, void *recv,
                                      const int64_t *recv_rows, int64_t width, moe_comm_type type);
/* Bytes this rank has received from the other ranks through comm's broadcasts, gathers,
   all-to-alls and rank-ordered sums since it was made (MPI's own all-reduce, which carries a
   few scalars per training step, is not counted: its traffic is MPI's choice). */
MOE_API int64_t moe_comm_bytes_received(const moe_comm *comm);
/* MOE_ERR_CONFIG on every rank when any rank's model config differs from rank 0's, naming
   the first field that differs (a collective). */
MOE_API moe_status moe_comm_check_config(moe_ctx *ctx, moe_comm *comm, const moe_config *cfg);

/* Without MPI (a launcher that only sets environment variables): this process's rank, the
   number of processes and the rank on its node, from MOE_RANK / MOE_WORLD_SIZE /
   MOE_LOCAL_RANK, Open MPI's OMPI_COMM_WORLD_*, Slurm's SLURM_PROCID / SLURM_NTASKS /
   SLURM_LOCALID or torchrun's RANK / WORLD_SIZE / LOCAL_RANK (the first set found; none: one
   process). */
MOE_API moe_status moe_comm_env(moe_ctx *ctx, int *rank, int *size, int *local_rank);
/* Rank 0's n bytes at buf to every process without MPI (a GPU library's unique id: NCCL's is
   128 bytes). how = "tcp:HOST:PORT": rank 0 listens on PORT, the others connect to HOST:PORT
   and retry until it does; or "file:PATH": rank 0 writes PATH atomically (name it per job,
   e.g. with $SLURM_JOB_ID: a stale file of another job would be read), the others wait for
   it. Every process calls it; waiting stops after timeout_s seconds with MOE_ERR_COMM: the
   lookup of HOST and each connect, accept, send and receive wait at most what is left of
   timeout_s (the lookup runs on a thread of its own, left to finish alone when it is late). */
MOE_API moe_status moe_comm_share(moe_ctx *ctx, const char *how, int rank, int size, void *buf, size_t n, double timeout_s);

/* Data parallelism, after this rank's backward(s) of a step: the accumulated sum (if any)
   becomes the gradients, then the gradients are summed over comm's ranks in rank order (in
   buckets of MOE_COMM_BUCKET values) and the expert-load counts summed, so every rank takes
   the same optimizer step and bias update. With one micro-batch per rank, P ranks give the
   bits of one process that accumulates the same P micro-batches. A host-memory model takes a
   SELF or MPI communicator, a GPU model an NCCL one (plain data parallelism: the sums run on
   the GPU; ZeRO-1 is host-only). */
MOE_API moe_status moe_model_reduce_grads(moe_ctx *ctx, moe_model *model, moe_comm *comm);
#ifndef MOE_COMM_BUCKET
#define MOE_COMM_BUCKET ((int64_t)1 << 22)
#endif
/* ZeRO-1: from here on opt keeps the AdamW moments of one shard of the parameter slab per
   rank of comm (shards start at multiples of the gradient norm's chunk, so the norm keeps
   its bits). moe_model_reduce_grads over comm then reduce-scatters the gradients to the
   shards in rank order, moe_adamw_step updates this rank's shard and all-gathers the
   parameters: a P-rank step has the bits of the unsharded one. Moments already held (a
   checkpoint loaded before) are kept. A collective; comm must outlive opt. Checkpoints of a
   sharded optimizer: moe_ckpt_save (and _save_step) become collectives that gather the
   moments for rank 0 to write, the same file an unsharded run writes; moe_ckpt_load on every
   rank keeps each rank's shard. moe_adamw_grad_norm and moe_adamw_step of a sharded optimizer
   are collectives too (the norm's parts and the parameters are gathered): every rank calls
   them. */
MOE_API moe_status moe_adamw_shard(moe_ctx *ctx, moe_adamw *opt, moe_comm *comm);
/* Bytes of optimizer state (the two moments) this rank holds. */
MOE_API size_t moe_adamw_state_bytes(const moe_adamw *opt);

/* Expert parallelism: rank r of `ep` computes routed experts [r·E/P, (r+1)·E/P) of every MoE
   layer for all of ep's ranks. In each MoE layer the counts go first (all-to-all), then the
   packed rows (all-to-all-v) to their experts' ranks and the outputs back; backward sends
   output gradients and gates the same way (the owners kept the inputs) and brings input and
   gate gradients home. The shared experts run while the rows travel (forward: the dispatch;
   backward: the output gradients): over MPI that exchange is posted without waiting
   (MPI_Ialltoallv) and tested between the shared experts' GEMMs, since Open MPI moves data
   only inside MPI calls; every other exchange blocks.
   Each expert's weight gradient is added over the source ranks in the job's rank order:
   `edp` (NULL when every rank is in `ep`) joins the ranks that own the same experts in the
   other EP groups. Take ep = the consecutive ranks [g·P, (g+1)·P) and edp = the ranks with the
   same rank in ep (moe_comm_split(world, rank / P, rank, …) and (world, rank % P, rank, …)):
   then moe_model_reduce_grads over the world, plain or ZeRO-1, gives the bits of one process
   that trains the ranks' micro-batches in rank order. Weights, gradients and (unless ZeRO-1
   shards them) optimizer state stay whole on every rank — expert parallelism here divides
   the experts' compute, not their memory — so checkpoints are those of data parallelism and
   resume on any number of ranks and any EP size. Every rank of ep must run the same forward
   and backward passes (each MoE layer is a collective); ep = NULL turns it off. Each layer's
   allocations and arguments are voted on by the whole job (ep, then edp) before it exchanges
   anything, with the payload settings (below) and FP8 block the same on every rank, so a
   failure there fails every rank together (MOE_ERR_COMM on the others). A failure elsewhere
   in a step on one rank only (out of step memory in attention, say) returns on that rank
   while the others wait in the next layer's exchange: end the job then, as the examples do
   (a rank exiting non-zero makes mpirun stop the others). */
MOE_API moe_status moe_model_expert_parallel(moe_ctx *ctx, moe_model *model, moe_comm *ep, moe_comm *edp);
/* What the expert-parallel exchanges carry (every MoE layer of the model; no communication).
   dispatch: the rows sent to the experts in forward, MOE_F32 (the default) or MOE_FP8_E4M3
   (DeepSeek-V3's: E4M3 codes with one FP32 scale per 1×B tile of a row, B the context's FP8
   block, 1 + 4/B bytes a value instead of 4; only when training in FP8, whose first expert
   GEMM quantises the same tiles anyway). combine: the expert outputs coming home and the
   gradients going out and back in backward, MOE_F32 or MOE_BF16 (V3's combine). Anything but
   F32 / F32 gives up the bit-identity with one process: with power-of-two scales an FP8
   dispatch gives the forward's bits (re-quantising dequantised tiles is exact), but the
   experts' weight gradients then see the dispatched, 1×B-quantised inputs instead of the
   originals; BF16 rounds what it carries. The gates always travel in FP32. */
MOE_API moe_status moe_model_expert_parallel_payload(moe_ctx *ctx, moe_model *model, moe_dtype dispatch, moe_dtype combine);

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
#if defined(__GNUC__) || defined(__clang__)
#include <cpuid.h> /* the CPU's vendor and AMX (section 4: the BF16 GEMM kernel) */
#endif
#if defined(__linux__) && (defined(__AMX_TILE__) || defined(__AMXTILE__))
#include <sys/syscall.h> /* arch_prctl: the permission to use AMX tiles */
#ifndef __cplusplus /* unistd.h declares syscall only for _DEFAULT_SOURCE or _GNU_SOURCE (g++ defines it) */
extern long syscall(long number, ...);
#endif
#endif
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h> /* a name lookup with a deadline (section 15) */
#include <sys/socket.h>
#endif
#ifdef MOE_CBLAS
#include <cblas.h>
#endif
#ifdef MOE_MPI
#define OMPI_SKIP_MPICXX 1 /* the C API only, also from C++ */
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
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

/* The CUDA backend's headers (section 14 includes moe_cuda.cuh), outside extern "C". */
#if defined(MOE_CUDA) && defined(__CUDACC__)
#include <cuda_runtime.h>
#include <cublasLt.h>
#ifdef MOE_NCCL
#include <nccl.h>
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ============================================================================================
   1. base — context, threads, step arena, errors, RNG, files                            >>base
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
typedef struct moe_backend moe_backend; /* the kernel interface (section 3) */

/* What a context is set to: the moe_ctx_set_* values. A child context (moe__ctx_child) starts
   with its parent's, copied whole. */
/* The BF16 GEMM kernels of section 4, in order: a CPU and build with one have those before it. */
enum { MOE__BF16_FMA = 0, MOE__BF16_DP = 1, MOE__BF16_AMX = 2 };

typedef struct moe__conf {
    int n_threads;
    int simd;
    int f32_zmm;  /* FP32 GEMM on the 6×32 zmm kernel (section 4: where 512-bit FMAs run at full rate) */
    int bf16_kernel; /* the BF16 GEMM kernel, MOE__BF16_FMA / _DP / _AMX (section 4) */
    int grad_enabled;
    int count_loads; /* forward passes add their routing to the model's expert-load counts (internal: off for
                        a generation's and a distillation teacher's passes; no moe_ctx_set_ for it) */
    moe_dtype gemm_compute;
    moe_fp8_options fp8; /* used when gemm_compute is MOE_FP8_E4M3 */
    size_t arena_limit;
    moe_log_fn log_fn;
    void *log_user;
    const moe_backend *be; /* the device's kernels */
} moe__conf;

/* Memory of `slot` bytes for each of `count` threads, at base + tid·slot. */
typedef struct moe__thread_slots {
    void *base;
    size_t slot;
    int count;
} moe__thread_slots;

struct moe_ctx {
    moe__conf conf;
    char error[512];
    uint64_t heap_allocs;
    moe_fp8_stats fp8_stats;
    size_t saved_bytes;        /* activations saved for backward since the last reset */
    /* step arena (host memory; the CPU backend's device arena too) */
    moe__arena_block *arena;   /* current block first; older blocks follow */
    size_t arena_used;         /* bytes handed out since the last reset, all blocks */
    size_t arena_peak;
    /* autograd tape: node pointers, capacity kept across steps */
    moe__node **tape;
    int64_t tape_len, tape_cap;
    /* CPU backend state: the GEMM's packing workspace (grows to the largest call and stays),
       per-thread slots for GEMMs and FP8 operands inside a parallel loop over experts, and
       the GEMM's contention back-off {until, length, started} */
    void *gemm_ws;
    size_t gemm_ws_size;
    moe__thread_slots gemm_tws, fp8_tws;
    double gemm_backoff[3];
    /* CUDA backend state (moe_cuda.cuh): the device's stream and cuBLASLt handle (a child
       context borrows its parent's) and this context's device step arena; NULL on the CPU */
    struct moe_gpu *gpu;
};

static const char *const moe__status_names[] = {
    "MOE_OK", "MOE_ERR_ARG", "MOE_ERR_SHAPE", "MOE_ERR_DTYPE", "MOE_ERR_MEMORY", "MOE_ERR_IO",
    "MOE_ERR_FORMAT", "MOE_ERR_CONFIG", "MOE_ERR_NUMERIC", "MOE_ERR_STATE", "MOE_ERR_UNSUPPORTED", "MOE_ERR_COMM"};

MOE_API const char *moe_status_name(moe_status status) {
    if ((int)status < 0 || (int)status > (int)MOE_ERR_COMM) return "MOE_ERR_UNKNOWN";
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
    if (ctx && ctx->conf.log_fn) ctx->conf.log_fn(ctx->conf.log_user, level, msg);
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

/* ---- threads ----
   Work is split over items that no two threads share (rows, heads, experts, tiles), so no
   result depends on the thread count. Entering an OpenMP region costs about 0.4 µs even with
   one thread (a decode step would pay it a hundred times), so small work runs on the calling
   thread without entering one. These are the only parallel regions outside the GEMM.
   Where idle threads sleep (OMP_WAIT_POLICY=passive, which the examples use so that a busy
   machine does not lose a core to spinning), starting a region wakes them: measured at about
   50 µs a region on this project's 2-core VMs, so a loop is split only from about 0.1 ms of
   work (the tiny trainer's step: 13% faster than with a split from 16K units). */

#ifndef MOE__PAR_WORK
#define MOE__PAR_WORK 131072.0 /* work units (about a multiply-add each) from which a loop is split */
#endif

/* The body of a parallel loop: items [i0, i1) on thread `tid` (< the context's threads). */
typedef void (*moe__range_fn)(void *arg, int64_t i0, int64_t i1, int tid);

/* fn over the items [0, n), each costing about `cost` work units: on the calling thread when
   the loop is small, the context has one thread or a parallel region is already running;
   else on the context's threads, in one contiguous chunk each (dynamic = 0) or handed out
   one item at a time (dynamic = 1, for items of uneven cost). */
static void moe__parallel_for(const moe_ctx *ctx, int64_t n, double cost, int dynamic, moe__range_fn fn, void *arg) {
    if (n <= 0) return;
#ifdef _OPENMP
    {
        int nt = ctx->conf.n_threads;
        if (nt > 1 && n > 1 && (double)n * cost >= MOE__PAR_WORK && !omp_in_parallel()) {
            int64_t next = 0;
            if ((int64_t)nt > n) nt = (int)n;
#pragma omp parallel num_threads(nt)
            {
                int tid = omp_get_thread_num(), team = omp_get_num_threads();
                if (!dynamic) {
                    int64_t i0 = n * tid / team, i1 = n * (tid + 1) / team;
                    if (i1 > i0) fn(arg, i0, i1, tid);
                } else {
                    for (;;) {
                        int64_t i;
#pragma omp atomic capture
                        i = next++;
                        if (i >= n) break;
                        fn(arg, i, i + 1, tid);
                    }
                }
            }
            return;
        }
    }
#else
    (void)ctx; (void)cost; (void)dynamic;
#endif
    fn(arg, 0, n, 0);
}

/* fn(arg, tid, team) on up to `team` threads at once, the calling thread as tid 0, for work
   whose threads talk through the counters below while it runs; without OpenMP, team 1. */
static void moe__team_run(int team, void (*fn)(void *arg, int tid, int team), void *arg) {
#ifdef _OPENMP
    if (team > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(team)
        fn(arg, omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    (void)team;
    fn(arg, 0, 1);
}

/* Counters that threads share: one thread counts (after a flush, so that what it wrote
   before is seen by whoever reads the new count); others read it or wait for a value (then
   flush, so that they see those writes). */
static void moe__count_add(int64_t *counter, int64_t n) {
#ifdef _OPENMP
#pragma omp flush
#pragma omp atomic update
#endif
    *counter += n;
}
static void moe__count(int64_t *counter) { moe__count_add(counter, 1); }
static int64_t moe__count_read(int64_t *counter) {
    int64_t v;
#ifdef _OPENMP
#pragma omp atomic read
#endif
    v = *counter;
    return v;
}
static void moe__count_await(int64_t *counter, int64_t v) {
    while (moe__count_read(counter) < v) {
    }
#ifdef _OPENMP
#pragma omp flush
#endif
}

static const moe_backend *moe__cpu_backend(void); /* the CPU backend's table (section 5) */

/* A context with the given settings and nothing else. */
static moe_ctx *moe__ctx_make(const moe__conf *conf) {
    moe_ctx *ctx = (moe_ctx *)MOE_MALLOC(sizeof *ctx);
    if (!ctx) return NULL;
    memset(ctx, 0, sizeof *ctx);
    ctx->heap_allocs = 1;
    ctx->conf = *conf;
    return ctx;
}

static int moe__gemm_zmm_default(void);   /* section 4 */
static int moe__gemm_bf16_kernel_default(void); /* section 4 */

MOE_API moe_status moe_ctx_new(moe_ctx **out) {
    moe__conf c;
    if (!out) return MOE_ERR_ARG;
    memset(&c, 0, sizeof c);
    c.n_threads = moe__default_threads();
    c.simd = 1;
    c.f32_zmm = moe__gemm_zmm_default();
    c.bf16_kernel = moe__gemm_bf16_kernel_default();
    c.grad_enabled = 1;
    c.count_loads = 1;
    c.gemm_compute = MOE_F32;
    c.fp8.block = 128;
    c.fp8.acc_interval = 128;
    c.be = moe__cpu_backend();
    *out = moe__ctx_make(&c);
    return *out ? MOE_OK : MOE_ERR_MEMORY;
}

/* A context for work done on the side of `parent` (e.g. by a thread of a decode crew): the
   parent's settings, its own arena, tape and workspaces. */
static moe_status moe__ctx_child(moe_ctx *parent, moe_ctx **out) {
    *out = moe__ctx_make(&parent->conf);
    if (!*out) return moe__fail(parent, MOE_ERR_MEMORY, "out of memory for a context");
#if MOE__HAS_CUDA
    if (parent->gpu && moe__cuda_borrow(*out, parent) != MOE_OK) {
        moe__fail(parent, MOE_ERR_MEMORY, "%s", (*out)->error);
        moe_ctx_free(*out);
        *out = NULL;
        return MOE_ERR_MEMORY;
    }
#endif
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
#if MOE__HAS_CUDA
    moe__cuda_close(ctx);
#endif
    moe__arena_free_blocks(ctx->arena);
    MOE_FREE(ctx->tape);
    MOE_FREE(ctx->gemm_ws);
    MOE_FREE(ctx->gemm_tws.base);
    MOE_FREE(ctx->fp8_tws.base);
    MOE_FREE(ctx);
}

MOE_API const char *moe_ctx_error(const moe_ctx *ctx) {
    return ctx ? ctx->error : "moe_ctx is NULL";
}

MOE_API moe_status moe_ctx_set_threads(moe_ctx *ctx, int n_threads) {
    MOE__CHECK_CTX(ctx);
    if (n_threads < 1 || n_threads > 1024)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_threads: n_threads must be 1..1024, got %d", n_threads);
    ctx->conf.n_threads = n_threads;
    return MOE_OK;
}
MOE_API int moe_ctx_threads(const moe_ctx *ctx) { return ctx ? ctx->conf.n_threads : 1; }

#if defined(MOE_CUDA) && defined(__CUDACC__)
/* moe_cuda.cuh (section 14): the CUDA kernel table, and a context's GPU state — opened on a
   device, borrowed from a parent context, its step arena reset, closed. */
static const moe_backend *moe__cuda_backend(void);
static moe_status moe__cuda_open(moe_ctx *ctx, int device);
static moe_status moe__cuda_borrow(moe_ctx *ctx, const moe_ctx *parent);
static void moe__cuda_reset(moe_ctx *ctx);
static void moe__cuda_close(moe_ctx *ctx);
#define MOE__HAS_CUDA 1
#else
#define MOE__HAS_CUDA 0
#endif

/* The kernel table of a device kind (NULL: not in this build). */
static const moe_backend *moe__backend_for(moe_device device) {
#if MOE__HAS_CUDA
    if (device == MOE_DEVICE_CUDA) return moe__cuda_backend();
#endif
    return device == MOE_DEVICE_CPU ? moe__cpu_backend() : NULL;
}

MOE_API moe_status moe_ctx_set_device(moe_ctx *ctx, moe_device device, int index) {
    MOE__CHECK_CTX(ctx);
    if (device != MOE_DEVICE_CPU && device != MOE_DEVICE_CUDA)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_device: unknown device %d", (int)device);
    if (!moe__backend_for(device))
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_ctx_set_device: this build has no CUDA backend (compile the "
                                                   "implementation with nvcc and MOE_CUDA defined)");
    if (device == MOE_DEVICE_CPU && index != 0)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_device: the CPU is device 0, got %d", index);
    if (ctx->arena_used || ctx->tape_len)
        return moe__fail(ctx, MOE_ERR_STATE, "moe_ctx_set_device: the context holds step tensors (moe_ctx_reset it first)");
#if MOE__HAS_CUDA
    moe__cuda_close(ctx);
    if (device == MOE_DEVICE_CUDA) MOE__TRY(moe__cuda_open(ctx, index));
#endif
    ctx->conf.be = moe__backend_for(device);
    return MOE_OK;
}

MOE_API moe_status moe_ctx_set_device_name(moe_ctx *ctx, const char *name) {
    char *end = NULL;
    long index = 0;
    MOE__CHECK_CTX(ctx);
    if (name && strcmp(name, "cpu") == 0) return moe_ctx_set_device(ctx, MOE_DEVICE_CPU, 0);
    if (name && strncmp(name, "cuda", 4) == 0) {
        if (name[4] == ':') {
            index = strtol(name + 5, &end, 10);
            if (end == name + 5 || *end || index < 0 || index > 1023) index = -1;
        } else if (name[4]) {
            index = -1;
        }
        if (index >= 0) return moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, (int)index);
    }
    return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_device_name: want \"cpu\", \"cuda\" or \"cuda:N\", got \"%s\"", name ? name : "(null)");
}

MOE_API moe_status moe_ctx_set_simd(moe_ctx *ctx, int enabled) {
    MOE__CHECK_CTX(ctx);
    ctx->conf.simd = enabled != 0;
    return MOE_OK;
}
MOE_API moe_status moe_ctx_set_arena_limit(moe_ctx *ctx, size_t bytes) {
    MOE__CHECK_CTX(ctx);
    ctx->conf.arena_limit = bytes;
    return MOE_OK;
}
MOE_API moe_status moe_ctx_set_grad_enabled(moe_ctx *ctx, int enabled) {
    MOE__CHECK_CTX(ctx);
    ctx->conf.grad_enabled = enabled != 0;
    return MOE_OK;
}
MOE_API void moe_ctx_set_log(moe_ctx *ctx, moe_log_fn fn, void *user) {
    if (!ctx) return;
    ctx->conf.log_fn = fn;
    ctx->conf.log_user = user;
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
    if (ctx->conf.arena_limit && (need > ctx->conf.arena_limit || ctx->arena_used > ctx->conf.arena_limit - need)) return NULL;
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
        if (ctx->conf.arena_limit)
            moe__fail(ctx, MOE_ERR_MEMORY, "%s: step arena limit of %zu bytes reached (%zu in use, %zu more wanted)",
                      what, ctx->conf.arena_limit, ctx->arena_used, bytes);
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
    ctx->saved_bytes = 0;
#if MOE__HAS_CUDA
    moe__cuda_reset(ctx);
#endif
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

/* ---- files: whole reads, atomic writes, FNV-1a, little-endian fields ----
   Every file moe.h writes appears whole or not at all: it is written to PATH.tmpPID, flushed,
   fsynced and renamed over PATH. Checkpoints and the teacher cache carry an FNV-1a checksum. */

#define MOE__FNV_SEED 0xCBF29CE484222325ull
/* FNV-1a over p[0..n), continuing from h (MOE__FNV_SEED to start). */
static uint64_t moe__fnv1a(uint64_t h, const unsigned char *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}
/* A stored checksum against the computed one (not enforced in fuzzing builds, see the top). */
static int moe__checksum_ok(uint64_t stored, uint64_t computed) {
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
    (void)stored; (void)computed;
    return 1;
#else
    return stored == computed;
#endif
}
static void moe__le_put32(unsigned char *p, uint32_t v) {
    int i;
    for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void moe__le_put64(unsigned char *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t moe__le_get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t moe__le_get64(const unsigned char *p) { return (uint64_t)moe__le_get32(p) | (uint64_t)moe__le_get32(p + 4) << 32; }

/* Refuse what is not a regular file before opening it: fopen on a FIFO blocks until a writer
   comes, and a directory opens on Linux and then sizes as LONG_MAX. Without POSIX stat the
   check is left to fopen. */
static moe_status moe__check_regular(moe_ctx *ctx, const char *fn, const char *path) {
#if defined(__unix__) || defined(__APPLE__)
    struct stat sb;
    if (stat(path, &sb) != 0) return moe__fail(ctx, MOE_ERR_IO, "%s: cannot open '%s': %s", fn, path, strerror(errno));
    if (!S_ISREG(sb.st_mode))
        return moe__fail(ctx, MOE_ERR_IO, "%s: '%s' is %s, not a regular file", fn, path,
                         S_ISDIR(sb.st_mode) ? "a directory" : S_ISFIFO(sb.st_mode) ? "a FIFO (named pipe)" : "a device or socket");
#else
    (void)ctx; (void)fn; (void)path;
#endif
    return MOE_OK;
}

/* Whether anything (file, directory, FIFO ...) is at `path`, without opening it. */
static int moe__path_exists(const char *path) {
#if defined(__unix__) || defined(__APPLE__)
    struct stat sb;
    return stat(path, &sb) == 0;
#else
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
#endif
}

/* Read a whole regular file (at most max_bytes) into a heap buffer with a terminating 0. */
static moe_status moe__read_file(moe_ctx *ctx, const char *fn, const char *path, size_t max_bytes, unsigned char **buf,
                                 size_t *len) {
    FILE *f;
    long size;
    size_t got;
    *buf = NULL;
    *len = 0;
    if (!path) return moe__fail(ctx, MOE_ERR_ARG, "%s: path is NULL", fn);
    MOE__TRY(moe__check_regular(ctx, fn, path));
    f = fopen(path, "rb");
    if (!f) return moe__fail(ctx, MOE_ERR_IO, "%s: cannot open '%s': %s", fn, path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return moe__fail(ctx, MOE_ERR_IO, "%s: cannot size '%s'", fn, path);
    }
    if ((unsigned long)size > max_bytes) {
        fclose(f);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is %ld bytes, more than the %zu allowed", fn, path, size, max_bytes);
    }
    *buf = (unsigned char *)moe__heap_alloc(ctx, (size_t)size + 1);
    if (!*buf) {
        fclose(f);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory reading '%s'", fn, path);
    }
    got = fread(*buf, 1, (size_t)size, f);
    fclose(f);
    if (got != (size_t)size) {
        MOE_FREE(*buf);
        *buf = NULL;
        return moe__fail(ctx, MOE_ERR_IO, "%s: short read on '%s'", fn, path);
    }
    (*buf)[size] = 0;
    *len = (size_t)size;
    return MOE_OK;
}

/* A file being written atomically: bytes go to `tmp`, moe__out_commit renames it to `path`. */
typedef struct moe__out_file {
    FILE *f;
    char path[4096], tmp[4200];
} moe__out_file;

static moe_status moe__out_begin(moe_ctx *ctx, const char *fn, const char *path, moe__out_file *o) {
    memset(o, 0, sizeof *o);
    if (!path || !*path || strlen(path) >= sizeof o->path) return moe__fail(ctx, MOE_ERR_ARG, "%s: bad path", fn);
    snprintf(o->path, sizeof o->path, "%s", path);
    snprintf(o->tmp, sizeof o->tmp, "%s.tmp%ld", path, (long)getpid());
    o->f = fopen(o->tmp, "wb");
    if (!o->f) return moe__fail(ctx, MOE_ERR_IO, "%s: cannot create '%s': %s", fn, o->tmp, strerror(errno));
    return MOE_OK;
}
/* Close and remove the temporary file (after a failure, or instead of committing). */
static void moe__out_abort(moe__out_file *o) {
    if (o->f) fclose(o->f);
    o->f = NULL;
    if (o->tmp[0]) remove(o->tmp);
    o->tmp[0] = 0;
}
/* Flush, fsync, close and rename into place; on failure the temporary file is removed and
   whatever was at `path` before stays. */
static moe_status moe__out_commit(moe_ctx *ctx, const char *fn, moe__out_file *o) {
    int ok = fflush(o->f) == 0;
#if defined(_POSIX_C_SOURCE) && _POSIX_C_SOURCE >= 200112L
    ok = ok && fsync(fileno(o->f)) == 0;
#endif
    ok = (fclose(o->f) == 0) && ok;
    o->f = NULL;
    if (!ok || rename(o->tmp, o->path) != 0) {
        int e = errno;
        moe__out_abort(o);
        return moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, o->path, strerror(e));
    }
    o->tmp[0] = 0;
    return MOE_OK;
}
/* Write `len` bytes to path atomically. */
static moe_status moe__write_atomic(moe_ctx *ctx, const char *fn, const char *path, const void *data, size_t len) {
    moe__out_file o;
    MOE__TRY(moe__out_begin(ctx, fn, path, &o));
    if (fwrite(data, 1, len, o.f) != len) {
        int e = errno;
        moe__out_abort(&o);
        return moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, path, strerror(e));
    }
    return moe__out_commit(ctx, fn, &o);
}

/* ============================================================================================
   2. numerics — formats, the FP8 quantiser, vector math                             >>numerics
   ============================================================================================
   Element-wise math written once for the CPU loops and the CUDA kernels (MOE_HD), its 8-lane
   AVX2 twins (bit for bit the scalar functions), and FP8 quantisation. */

/* e^x in float, written so that compilers vectorise loops over it (straight-line selects, no
   floorf, no conversion of an unclamped value): Cody–Waite reduction x = n·ln2 + r, a degree-6
   polynomial for e^r on |r| ≤ ln2/2 (Cephes' coefficients), then ·2^n through the exponent
   bits. Within 2 ulp of exp() on [−87.3, 88.72]; 0 below, +inf above, NaN kept. */
MOE_HD float moe_expf(float x) {
    float y, n, r, p, xc = x >= -87.3f ? x : -87.3f; /* a NaN clamps too: its result is picked below */
    int32_t e;
    xc = xc <= 88.72f ? xc : 88.72f;
    y = xc * 1.44269504088896341f + 0.5f;
#ifdef __FAST_MATH__
    n = floorf(y); /* reassociation would fold the rounding trick below away */
#else
    n = (y + 12582912.0f) - 12582912.0f; /* rint(y): |y| < 2^22, so adding 1.5·2^23 drops the fraction */
    n = n > y ? n - 1.0f : n;            /* floor(y) */
#endif
    r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    e = (int32_t)n > 127 ? 127 : (int32_t)n; /* 2^128 is not a float: scale in two steps */
    p = p * moe__bits_f32((uint32_t)(e + 127) << 23) * moe__bits_f32((uint32_t)((int32_t)n - e + 127) << 23);
    p = x > 88.72f ? (float)INFINITY : p;
    p = x < -87.3f ? 0.0f : p;
    return x != x ? x : p;
}

#ifdef MOE_REAL_F64
static moe_real moe__exp(moe_real x) { return exp(x); }
static moe_real moe__ln(moe_real x) { return log(x); }
static moe_real moe__sqrt(moe_real x) { return sqrt(x); }
#else
static moe_real moe__exp(moe_real x) { return moe_expf(x); }
static moe_real moe__ln(moe_real x) { return logf(x); }
static moe_real moe__sqrt(moe_real x) { return sqrtf(x); }
#endif

/* x rounded to the nearest bf16 value (ties to even): what a BF16 operand holds. */
static moe_real moe__round_bf16(moe_real x) { return (moe_real)moe_bf16_to_f32(moe_f32_to_bf16((float)x)); }

/* Element-wise math shared with the CUDA kernels. */
MOE_HD moe_real moe_sigmoid_scalar(moe_real x) {
#ifdef MOE_REAL_F64
    return 1 / (1 + exp(-x));
#else
    return 1.0f / (1.0f + moe_expf(-x));
#endif
}
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



/* Element i of an array of any dtype as double, and back (MOE_F32 means moe_real). */
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

/* ---- 8-lane building blocks (AVX2) of the CPU kernels ---- */
#if defined(__AVX2__) && defined(__FMA__) && !defined(MOE_NO_SIMD) && !defined(MOE_REAL_F64)
#define MOE__SIMD_AVX2 1
/* Small SIMD helpers that must inline into their loops (exp8 below: as a call it reloads its
   dozen constants for every 8 values; the attention tiles' row loops measured about 3% faster
   inlined). */
#if defined(__GNUC__)
#define MOE__SIMD_INLINE __attribute__((always_inline)) inline
#else
#define MOE__SIMD_INLINE
#endif
/* moe_expf on 8 lanes: the same operations in the same order, so each lane is bit-identical
   to the scalar function (and the tails of the row loops below can use it). */
static MOE__SIMD_INLINE __m256 moe__exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.72f);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi), n, r, p;
    __m256i ni, e;
    n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)));
    r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_add_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(2.12194440e-4f)));
    p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
    ni = _mm256_cvttps_epi32(n);
    e = _mm256_min_epi32(ni, bias);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, bias), 23)));
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, e), bias), 23)));
    p = _mm256_blendv_ps(p, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    p = _mm256_blendv_ps(p, _mm256_set1_ps((float)INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
    return _mm256_blendv_ps(p, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* Lane sum in a fixed order: (0+4, 1+5, 2+6, 3+7), then pairs. */
static float moe__hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static float moe__hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
/* ---- 16-lane building blocks (AVX-512) for element-wise loops ----
   moe__exp8 on 16 lanes, the same operations in the same order: every lane has the scalar
   function's bits. Also faster on Zen 4, which runs 512-bit operations as two halves: the row
   SwiGLU measured 1.49x faster than on 8 lanes (fewer instructions for the same work). Loops
   that sum their exps add the two 8-lane halves in turn, as the 8-lane loop adds them. */
#define MOE__SIMD_AVX512 1
/* GCC 12's forms of several AVX-512 intrinsics pass an unspecified vector through
   (_mm512_undefined_*), which its C++ front end (nvcc's host compiler) reports as maybe
   uninitialized; their zero-masking forms with every lane kept are the same instructions. */
#define MOE__ALL16 ((__mmask16)0xFFFF)
static MOE__SIMD_INLINE __m256 moe__lo8(__m512 v) { return _mm512_maskz_extractf32x8_ps((__mmask8)0xFF, v, 0); }
static MOE__SIMD_INLINE __m256 moe__hi8(__m512 v) { return _mm512_maskz_extractf32x8_ps((__mmask8)0xFF, v, 1); }
static MOE__SIMD_INLINE __m512 moe__exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.72f);
    const __m512i bias = _mm512_set1_epi32(127);
    __m512 xc = _mm512_maskz_min_ps(MOE__ALL16, _mm512_maskz_max_ps(MOE__ALL16, x, lo), hi), n, r, p;
    __m512i ni, e;
    n = _mm512_maskz_roundscale_ps(MOE__ALL16,
                                   _mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_add_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    ni = _mm512_maskz_cvttps_epi32(MOE__ALL16, n);
    e = _mm512_maskz_min_epi32(MOE__ALL16, ni, bias);
    p = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(MOE__ALL16, _mm512_add_epi32(e, bias), 23)));
    p = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(MOE__ALL16, _mm512_add_epi32(_mm512_sub_epi32(ni, e), bias), 23)));
    p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), p, _mm512_setzero_ps());
    p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), p, _mm512_set1_ps((float)INFINITY));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), p, x);
}
#endif
#endif

/* ---- FP8 quantisation ---- */

/* The smallest power of two ≥ s (s a positive normal float). */
static float moe__pow2_at_or_above(float s) {
    int e;
    float f = frexpf(s, &e); /* s = f·2^e, f in [0.5, 1) */
    return f == 0.5f ? s : ldexpf(1.0f, e);
}

static void moe__e4m3_table(float lut[256]) {
    int i;
    for (i = 0; i < 256; i++) lut[i] = moe_e4m3_to_f32((uint8_t)i);
}

/* moe_f32_to_e4m3(v) for |v| ≤ 464, without branches on the rounding: normal values round
   their mantissa to 3 bits by the carry trick (a carry moves into the exponent, as it
   should), values below 2^-6 to multiples of the subnormal step 2^-9. Quantisation divides
   by amax/448, so every value it encodes is in range. */
static uint8_t moe__e4m3_in_range(float v) {
    uint32_t u = moe__f32_bits(v), au = u & 0x7FFFFFFFu, sign = (u >> 24) & 0x80u;
    if (au >= 0x3C800000u) { /* ≥ 2^-6 */
        uint32_t r = au + 0x7FFFFu + ((au >> 20) & 1u);
        return (uint8_t)(sign | ((r >> 20) - (120u << 3))); /* (float exponent − 127 + 7)·8 + mantissa */
    }
    {
        /* round to nearest even in units of 2^-9: adding 1.5·2^23 leaves the integer part */
        float t = moe__bits_f32(au) * 512.0f + 12582912.0f;
        return (uint8_t)(sign | (uint32_t)(t - 12582912.0f));
    }
}

#ifdef MOE__SIMD_AVX2
/* moe__e4m3_in_range on 8 lanes (each |v| ≤ 464): the codes (as int32 lanes) and, returned,
   their values with v's sign — what a table decode of the codes gives, bit for bit. */
static __m256 moe__e4m3_round8(__m256 v, __m256i *codes) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), one = _mm256_set1_epi32(1);
    const __m256 big = _mm256_set1_ps(12582912.0f);
    __m256i u = _mm256_castps_si256(v), au = _mm256_and_si256(u, abs_mask), sign = _mm256_andnot_si256(abs_mask, u);
    __m256i normal = _mm256_cmpgt_epi32(au, _mm256_set1_epi32(0x3C7FFFFF)); /* ≥ 2^-6 */
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(au, _mm256_set1_epi32(0x7FFFF)), _mm256_and_si256(_mm256_srli_epi32(au, 20), one));
    __m256 k = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_castsi256_ps(au), _mm256_set1_ps(512.0f)), big), big);
    __m256 mag = _mm256_blendv_ps(_mm256_mul_ps(k, _mm256_set1_ps(1.0f / 512.0f)),
                                  _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xFFF00000u))),
                                  _mm256_castsi256_ps(normal));
    *codes = _mm256_or_si256(_mm256_blendv_epi8(_mm256_cvttps_epi32(k), _mm256_sub_epi32(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(960)), normal),
                             _mm256_srli_epi32(sign, 24));
    return _mm256_or_ps(mag, _mm256_castsi256_ps(sign));
}
/* The low bytes of 8 int32 lanes, stored at q. */
static void moe__store_low_bytes8(uint8_t *q, __m256i c) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(c, pick), _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
    _mm_storel_epi64((__m128i *)(void *)q, _mm256_castsi256_si128(b));
}
#endif

/* The max-abs of x[0..n) folded into m (a NaN never wins). */
static float moe__amax_fold(const moe_real *x, int64_t n, float m) {
    int64_t i = 0;
#ifdef MOE__SIMD_AVX2
    if (n >= 8) {
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        __m256 acc = _mm256_set1_ps(m);
        for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), acc);
        m = moe__hmax8(acc);
    }
#endif
    for (; i < n; i++) m = fabsf((float)x[i]) > m ? fabsf((float)x[i]) : m;
    return m;
}

/* codes/out of x[0..n) with scale s, or with scale s_each[i] for element i when s_each is
   given: codes[i] = e4m3(x[i]/scale), out[i] = the code's value × scale (either may be NULL). */
static void moe__fp8_encode(const moe_real *x, int64_t n, float s, const float *s_each, const float *lut, uint8_t *codes,
                            moe_real *out) {
    int64_t i = 0;
#ifdef MOE__SIMD_AVX2
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), lim = _mm256_set1_ps(464.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 sv = s_each ? _mm256_loadu_ps(s_each + i) : _mm256_set1_ps(s), v = _mm256_div_ps(_mm256_loadu_ps(x + i), sv), y;
        __m256i c;
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(v, abs_mask), lim, _CMP_LE_OQ)) != 0xFF) break; /* NaN, inf */
        y = moe__e4m3_round8(v, &c);
        if (codes) moe__store_low_bytes8(codes + i, c);
        if (out) _mm256_storeu_ps(out + i, _mm256_mul_ps(y, sv));
    }
#endif
    for (; i < n; i++) {
        float si = s_each ? s_each[i] : s, v = (float)x[i] / si;
        uint8_t q = fabsf(v) <= 464.0f ? moe__e4m3_in_range(v) : moe_f32_to_e4m3(v); /* NaN, inf: slow path */
        if (codes) codes[i] = q;
        if (out) out[i] = (moe_real)(lut[q] * si);
    }
}

/* x[i] = lut[q[i]] · scale for i < n: scale s, or s_each[i] when s_each is given. */
static void moe__fp8_decode(const uint8_t *q, int64_t n, float s, const float *s_each, const float *lut, moe_real *x) {
    int64_t i = 0;
#ifdef MOE__SIMD_AVX2
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(q + i))), 4);
        _mm256_storeu_ps(x + i, _mm256_mul_ps(v, s_each ? _mm256_loadu_ps(s_each + i) : _mm256_set1_ps(s)));
    }
#endif
    for (; i < n; i++) x[i] = (moe_real)(lut[q[i]] * (s_each ? s_each[i] : s));
}

/* E4M3 quantisation of the row groups [g0, g1) of x [rows, cols] (row stride ldx) in groups
   of gr×gc elements, each with its own scale amax/448 (moe_fp8_scale; with pow2 the power of
   two at or above it) computed from the data: codes[r·cols + c] = e4m3(x/scale), scales
   [(r/gr)·ceil(cols/gc) + c/gc]. out (may be NULL, or x when ldx = cols) receives the
   dequantised values code·scale, the operand an FP8 GEMM multiplies. The one quantiser: the
   public functions, the FP8 GEMMs and the FP8 stashes all come here. */
static void moe__fp8_quantize_groups(const moe_real *x, int64_t ldx, int64_t rows, int64_t cols, int64_t gr, int64_t gc,
                                     int pow2, uint8_t *codes, float *scales, moe_real *out, int64_t g0, int64_t g1) {
    int64_t ngc = (cols + gc - 1) / gc, g;
    float lut[256];
    moe__e4m3_table(lut);
    for (g = g0; g < g1; g++) {
        int64_t r0 = g * gr, r1 = r0 + gr < rows ? r0 + gr : rows, r, c, cg;
        float *sc = scales + g * ngc;
        for (cg = 0; cg < ngc; cg++) sc[cg] = 0.0f;
        for (r = r0; r < r1; r++) {
            const moe_real *row = x + r * ldx;
            if (gc == 1) {
                /* one scale per column: the running max of each column over the group's rows */
                c = 0;
#ifdef MOE__SIMD_AVX2
                {
                    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
                    for (; c + 8 <= cols; c += 8)
                        _mm256_storeu_ps(sc + c, _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row + c), abs_mask), _mm256_loadu_ps(sc + c)));
                }
#endif
                for (; c < cols; c++) sc[c] = fabsf((float)row[c]) > sc[c] ? fabsf((float)row[c]) : sc[c];
            } else {
                for (cg = 0; cg < ngc; cg++) sc[cg] = moe__amax_fold(row + cg * gc, (cg + 1) * gc < cols ? gc : cols - cg * gc, sc[cg]);
            }
        }
        for (cg = 0; cg < ngc; cg++) sc[cg] = pow2 ? moe__pow2_at_or_above(moe_fp8_scale(sc[cg])) : moe_fp8_scale(sc[cg]);
        for (r = r0; r < r1; r++) {
            uint8_t *q = codes ? codes + r * cols : NULL;
            moe_real *o = out ? out + r * cols : NULL;
            if (gc == 1) {
                moe__fp8_encode(x + r * ldx, cols, 0.0f, sc, lut, q, o);
                continue;
            }
            for (cg = 0; cg < ngc; cg++) {
                int64_t c0 = cg * gc, n = c0 + gc < cols ? gc : cols - c0;
                moe__fp8_encode(x + r * ldx + c0, n, sc[cg], NULL, lut, q ? q + c0 : NULL, o ? o + c0 : NULL);
            }
        }
    }
}

/* x = code·scale for the row groups [g0, g1) of codes [rows, cols] in gr×gc groups. */
static void moe__fp8_dequantize_groups(const uint8_t *codes, const float *scales, int64_t rows, int64_t cols, int64_t gr,
                                       int64_t gc, moe_real *x, int64_t g0, int64_t g1) {
    int64_t ngc = (cols + gc - 1) / gc, r, cg;
    float lut[256];
    moe__e4m3_table(lut);
    for (r = g0 * gr; r < g1 * gr && r < rows; r++) {
        const float *sr = scales + (r / gr) * ngc;
        if (gc == 1) {
            moe__fp8_decode(codes + r * cols, cols, 0.0f, sr, lut, x + r * cols);
            continue;
        }
        for (cg = 0; cg < ngc; cg++) {
            int64_t c0 = cg * gc, n = c0 + gc < cols ? gc : cols - c0;
            moe__fp8_decode(codes + r * cols + c0, n, sr[cg], NULL, lut, x + r * cols + c0);
        }
    }
}


/* The quantiser and its inverse over a whole array, split over the context's threads by row
   group: the CPU backend's fp8 entries and the public functions below. */
typedef struct moe__fp8_job {
    const moe_real *x;
    const uint8_t *codes_in;
    uint8_t *codes;
    const float *scales_in;
    float *scales;
    moe_real *out;
    int64_t rows, cols, gr, gc;
    int pow2;
} moe__fp8_job;
static void moe__fp8_quantize_range(void *arg, int64_t g0, int64_t g1, int tid) {
    const moe__fp8_job *j = (const moe__fp8_job *)arg;
    (void)tid;
    moe__fp8_quantize_groups(j->x, j->cols, j->rows, j->cols, j->gr, j->gc, j->pow2, j->codes, j->scales, j->out, g0, g1);
}
static void moe__fp8_dequantize_range(void *arg, int64_t g0, int64_t g1, int tid) {
    const moe__fp8_job *j = (const moe__fp8_job *)arg;
    (void)tid;
    moe__fp8_dequantize_groups(j->codes_in, j->scales_in, j->rows, j->cols, j->gr, j->gc, j->out, g0, g1);
}
static void moe__fp8_quantize_all(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc, int pow2,
                                  uint8_t *codes, float *scales, moe_real *deq) {
    moe__fp8_job j;
    memset(&j, 0, sizeof j);
    j.x = x; j.rows = rows; j.cols = cols; j.gr = gr; j.gc = gc; j.pow2 = pow2; j.codes = codes; j.scales = scales; j.out = deq;
    moe__parallel_for(ctx, (rows + gr - 1) / gr, (double)(gr * cols) / 4, 0, moe__fp8_quantize_range, &j);
}
static void moe__fp8_dequantize_all(moe_ctx *ctx, const uint8_t *codes, const float *scales, int64_t rows, int64_t cols,
                                    int64_t gr, int64_t gc, moe_real *x) {
    moe__fp8_job j;
    memset(&j, 0, sizeof j);
    j.codes_in = codes; j.scales_in = scales; j.rows = rows; j.cols = cols; j.gr = gr; j.gc = gc; j.out = x;
    moe__parallel_for(ctx, (rows + gr - 1) / gr, (double)(gr * cols) / 4, 0, moe__fp8_dequantize_range, &j);
}

/* ---- the public FP8 functions (host arrays of float) ---- */

static moe_status moe__check_quant_args(moe_ctx *ctx, const char *fn, const void *src, const void *dst,
                                        const float *scales, int64_t rows, int64_t cols, int64_t block) {
    MOE__CHECK_CTX(ctx);
    if (!src || !dst || !scales) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL data or scales pointer", fn);
    if (rows < 0 || cols < 0) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: negative shape [%lld, %lld]", fn, (long long)rows, (long long)cols);
    if (block <= 0) return moe__fail(ctx, MOE_ERR_ARG, "%s: block size must be positive, got %lld", fn, (long long)block);
    return MOE_OK;
}

/* The public functions take the caller's float arrays (moe_real is double in MOE_REAL_F64
   builds: then through a converted copy) and amax/448 scales. */
static moe_status moe__fp8_public(moe_ctx *ctx, const char *fn, const float *x, const uint8_t *q_in, uint8_t *q, float *scales,
                                  float *x_out, int64_t rows, int64_t cols, int64_t block, int blocks) {
    int64_t n = rows * cols, i, gr = blocks ? block : 1;
    moe_real *tmp = NULL;
    MOE__TRY(moe__check_quant_args(ctx, fn, x ? (const void *)x : (const void *)q_in, q ? (void *)q : (void *)x_out, scales,
                                   rows, cols, block));
    if (rows == 0 || cols == 0) return MOE_OK;
    if (sizeof(moe_real) != sizeof(float)) {
        tmp = (moe_real *)moe__heap_alloc(ctx, (size_t)n * sizeof(moe_real));
        if (!tmp) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
        for (i = 0; x && i < n; i++) tmp[i] = (moe_real)x[i];
    }
    if (x)
        moe__fp8_quantize_all(ctx, tmp ? tmp : (const moe_real *)(const void *)x, rows, cols, gr, block, 0, q, scales, NULL);
    else
        moe__fp8_dequantize_all(ctx, q_in, scales, rows, cols, gr, block, tmp ? tmp : (moe_real *)(void *)x_out);
    for (i = 0; tmp && x_out && i < n; i++) x_out[i] = (float)tmp[i];
    MOE_FREE(tmp);
    return MOE_OK;
}

MOE_API moe_status moe_fp8_quantize_tiles(moe_ctx *ctx, const float *x, int64_t rows, int64_t cols, int64_t block, uint8_t *q,
                                          float *scales) {
    return moe__fp8_public(ctx, "moe_fp8_quantize_tiles", x, NULL, q, scales, NULL, rows, cols, block, 0);
}
MOE_API moe_status moe_fp8_dequantize_tiles(moe_ctx *ctx, const uint8_t *q, const float *scales, int64_t rows, int64_t cols,
                                            int64_t block, float *x) {
    return moe__fp8_public(ctx, "moe_fp8_dequantize_tiles", NULL, q, NULL, (float *)(uintptr_t)scales, x, rows, cols, block, 0);
}
MOE_API moe_status moe_fp8_quantize_blocks(moe_ctx *ctx, const float *x, int64_t rows, int64_t cols, int64_t block, uint8_t *q,
                                           float *scales) {
    return moe__fp8_public(ctx, "moe_fp8_quantize_blocks", x, NULL, q, scales, NULL, rows, cols, block, 1);
}
MOE_API moe_status moe_fp8_dequantize_blocks(moe_ctx *ctx, const uint8_t *q, const float *scales, int64_t rows, int64_t cols,
                                             int64_t block, float *x) {
    return moe__fp8_public(ctx, "moe_fp8_dequantize_blocks", NULL, q, NULL, (float *)(uintptr_t)scales, x, rows, cols, block, 1);
}

/* ============================================================================================
   3. kernels — the kernel interface, the contract a backend fills                    >>kernels
   ============================================================================================
   Everything that reads or writes activations, weights, gradients or optimizer moments goes
   through one table of entry points, the context's backend (ctx->conf.be). Sections 4 and 5
   fill it for the CPU (SIMD + OpenMP); a GPU backend in moe_cuda.cuh is to fill it next.
   Sections 6–13 are orchestration written once for every backend: they decide shapes, order
   and what to keep for backward, get device memory from the table, and call its entries;
   they hold no OpenMP pragma, no SIMD and no loop over activation values. What they still do
   on the host, by design: serialisation (io converts weights to and from file bytes, on host
   models only), checks of what the caller hands in (token ids, teacher top-k records),
   sampling from a downloaded row of logits (section 13, as moe_gen_probs takes them), and
   decoding's thread crew (section 13, over the base's team and counters: one row of a pass
   per CPU thread).

   Every entry
   - takes the context first and returns moe_status (a message in the context on failure);
   - takes device pointers, except those named host_* (index bookkeeping the host needs, and
     scalar results such as a loss sum) and the op descriptors and config (host structs);
     arrays are row-major, `ld` is a row stride in elements;
   - reads and writes moe_real values (MOE_F32), int32 indices, FP8 codes as bytes with float
     scales; outputs marked "+=" accumulate, the others are overwritten;
   - gives results that do not depend on the thread count or on how a device schedules its
     work: every sum runs in a fixed order;
   - rounds each product and each sum on its own (no fused multiply-add where the contract
     writes a·b + c: the CPU builds with -ffp-contract=off, a CUDA one with -fmad=false or
     __fmul_rn/__fadd_rn), so that bit-exact entries are bit-exact on every backend.
   tests/test_backend.c walks the whole table against plain references, each entry in its
   exactness class: bit-exact (copies, gathers, conversions, quantisation, routing),
   ULP-bounded (element- and row-wise math) or order-dependent (GEMMs, attention, sums:
   normalised error ‖a − b‖/‖b‖). */

typedef enum moe__copy_kind { MOE__H2D = 0, MOE__D2H = 1, MOE__D2D = 2 } moe__copy_kind;

/* One GEMM call: C[i] = alpha·op(A[i])·op(B[i]) (+ C[i] with accumulate) for i < batch, the
   operands of product i at a + i·stride_a, b + i·stride_b, c + i·stride_c. op(A) is m×k: A is
   [m, k], or [k, m] with trans_a; op(B) is k×n: B is [k, n], or [n, k] with trans_b (a linear
   layer's x·Wᵀ). precision: MOE_F32; MOE_BF16 (operands rounded to bf16, FP32 sums); or
   MOE_FP8_E4M3, where each operand is quantised as its role in the DeepSeek-V3 recipe says
   (Fprop X, Dgrad dY: 1×B tiles along their rows; weights: B×B blocks; Wgrad dY and X: B×1
   tiles down their columns) with the context's FP8 options, then multiplied exactly. */
typedef struct moe__gemm_op {
    int64_t m, n, k, batch;
    const moe_real *a; int64_t lda, stride_a; int trans_a;
    const moe_real *b; int64_t ldb, stride_b; int trans_b;
    moe_real *c; int64_t ldc, stride_c;
    moe_real alpha;
    int accumulate;
    moe_dtype precision;
    moe_fp8_role role_a, role_b; /* FP8 only */
} moe__gemm_op;

/* The optimizer's update of a slab of n parameters p with gradients g and moments m, v (f32
   or bf16), cut into segments with their weight decay; per element, in float:
   g ← g·grad_scale; m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
   p ← p − (step·m/(sqrt(v·inv_bc2) + eps) + decay·p) with the float m and v, which are
   then stored (rounded to bf16 for bf16 moments); then g ← 0. (1−β2)·g² is ((1−β2)·g)·g.
   Segments are in slab order and do not overlap. */
typedef struct moe__adamw_segment {
    int64_t start, len;
    int64_t entry; /* the model entry it belongs to (host only) */
    float decay;   /* lr·weight_decay, or 0 */
} moe__adamw_segment;
typedef struct moe__adamw_op {
    moe_real *p, *g;
    void *m, *v;
    moe_dtype moment_dtype;
    const moe__adamw_segment *host_segments;
    int64_t n_segments;
    float grad_scale, beta1, beta2, eps, step, inv_bc2;
} moe__adamw_op;

/* Distillation rows (section 11 states the losses and their gradients): student logits zs
   [rows, V] against a teacher given as full logits zt [rows, V] (k = 0), or as its top-k (ids,
   logp [rows, k] at temperature T, tail [rows]); labels [rows] for the hard-label term
   (NULL: every row counts, no hard-label term). */
typedef struct moe__distill_op {
    int64_t rows, V, k;
    const moe_real *zt;
    const int32_t *ids;
    const moe_real *logp, *tail;
    const int32_t *labels;
    int32_t ignore_index;
    moe_real alpha, temperature;
    int reverse;                       /* KL(q‖p) instead of KL(p‖q) */
    moe_real *lse1, *lseT, *lseX, *kl; /* [rows] each: written by distill_fwd for distill_bwd */
} moe__distill_op;

struct moe_backend {
    const char *name;
    moe_device device;

    /* ---- memory ----
       free and memset also take a NULL context, from calls that have none
       (moe_rope_table_free, moe_model_zero_grad): the device's default stream, no message. */
    /* Device memory of `bytes` (zeroed, MOE__ALIGN-aligned) until free. */
    moe_status (*alloc)(moe_ctx *ctx, size_t bytes, void **out);
    void (*free)(moe_ctx *ctx, void *p);
    moe_status (*copy)(moe_ctx *ctx, void *dst, const void *src, size_t bytes, moe__copy_kind kind);
    moe_status (*memset)(moe_ctx *ctx, void *dst, int byte, size_t bytes);
    /* Step memory (uninitialised, MOE__ALIGN-aligned) valid until moe_ctx_reset. */
    moe_status (*scratch)(moe_ctx *ctx, size_t bytes, void **out);

    /* ---- GEMM ---- */
    moe_status (*gemm)(moe_ctx *ctx, const moe__gemm_op *op);
    /* The same product for `groups` groups of tokens (the experts of a MoE layer): group e
       takes the token rows [host_offsets[e], host_offsets[e+1]); the token dimension is m (A and
       C rows, A not transposed), or k with group_k (A and B rows: a weight gradient per group,
       trans_a and not trans_b; a group without tokens gets dC_e = 0 unless accumulate); B (C
       with group_k) of group e starts at e·stride_b (e·stride_c). batch must be 1. */
    moe_status (*gemm_grouped)(moe_ctx *ctx, const moe__gemm_op *op, int64_t groups, const int64_t *host_offsets,
                               int group_k);

    /* ---- rows ---- */
    /* y = w ⊙ x / sqrt(mean(x²) + eps) per row of length d; rstd [rows] (may be NULL) keeps
       1/sqrt(mean(x²) + eps) for backward. */
    moe_status (*rmsnorm_fwd)(moe_ctx *ctx, const moe_real *x, int64_t ldx, const moe_real *w, int64_t rows, int64_t d,
                              moe_real eps, moe_real *y, int64_t ldy, moe_real *rstd);
    /* dx += rstd·(g − x̂·mean(g ⊙ x̂)) with g = dy ⊙ w, x̂ = x·rstd; dw += Σ_rows dy ⊙ x̂ (either NULL). */
    moe_status (*rmsnorm_bwd)(moe_ctx *ctx, const moe_real *x, const moe_real *w, const moe_real *rstd, const moe_real *dy,
                              int64_t rows, int64_t d, moe_real *dx, moe_real *dw);
    moe_status (*softmax_fwd)(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t d, moe_real *y);
    /* dx += y ⊙ (dy − Σ dy ⊙ y) */
    moe_status (*softmax_bwd)(moe_ctx *ctx, const moe_real *y, const moe_real *dy, int64_t rows, int64_t d, moe_real *dx);
    /* Per row: lse = log Σ e^x and loss = lse − x[target] unless target == ignore; host_sum gets
       Σ loss over the rows (summed in row order), host_count the rows that are not ignored. */
    moe_status (*xent_fwd)(moe_ctx *ctx, const moe_real *x, const int32_t *targets, int32_t ignore, int64_t rows, int64_t V,
                           moe_real *lse, moe_real *host_sum, int64_t *host_count);
    /* dx += scale·(softmax(x) − onehot(target)) for the rows that are not ignored. */
    moe_status (*xent_bwd)(moe_ctx *ctx, const moe_real *x, const int32_t *targets, int32_t ignore, const moe_real *lse,
                           moe_real scale, int64_t rows, int64_t V, moe_real *dx);
    /* y = silu(gate) ⊙ up ([rows, cols], input rows at stride ld_in, up NULL: y = silu(gate)). */
    moe_status (*swiglu_fwd)(moe_ctx *ctx, const moe_real *gate, const moe_real *up, int64_t ld_in, int64_t rows,
                             int64_t cols, moe_real *y, int64_t ld_y);
    /* dgate = dy ⊙ up ⊙ silu'(gate), dup = dy ⊙ silu(gate) (up NULL: dgate = dy ⊙ silu'(gate));
       outputs at stride ld_d, "+=" with accumulate; either output may be NULL. */
    moe_status (*swiglu_bwd)(moe_ctx *ctx, const moe_real *gate, const moe_real *up, int64_t ld_in, const moe_real *dy,
                             int64_t rows, int64_t cols, moe_real *dgate, moe_real *dup, int64_t ld_d, int accumulate);
    /* RoPE in place on the `dim` values at `offset` of each of `heads` vectors (stride
       head_stride) of `tokens` tokens; token t sits at position pos0 + t % T. cos_sin: the
       table [positions][dim/2][2] (device memory, moe_rope_table); inverse rotates back (the backward). */
    moe_status (*rope)(moe_ctx *ctx, moe_real *x, int64_t tokens, int64_t T, int64_t heads, int64_t head_stride,
                       int64_t offset, int64_t dim, const float *cos_sin, int64_t pos0, moe_rope_layout layout, int inverse);
    /* The k largest of each row of x [rows, n], descending, ties to the lower index, NaN last. */
    moe_status (*topk_fwd)(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t n, int64_t k, moe_real *val, int32_t *idx);
    /* dx[r, idx[r, j]] += dy[r, j] */
    moe_status (*topk_bwd)(moe_ctx *ctx, const moe_real *dy, const int32_t *idx, int64_t rows, int64_t n, int64_t k,
                           moe_real *dx);

    /* ---- attention ---- */
    /* Causal attention: q [B, Tq, H, Dk] over k [B, Tk, H, Dk], v [B, Tk, H, Dv] (Tq ≤ Tk; query
       i sits at position Tk − Tq + i) → o [B, Tq, H, Dv] and lse [B, H, Tq], the log-sum-exp of
       each query's scaled scores. */
    moe_status (*attention_fwd)(moe_ctx *ctx, const moe_real *q, const moe_real *k, const moe_real *v, int64_t B, int64_t Tq,
                                int64_t Tk, int64_t H, int64_t Dk, int64_t Dv, moe_real scale, moe_real *o, moe_real *lse);
    /* Its backward for Tq = Tk = T: dq, dk, dv += (any may be NULL). */
    moe_status (*attention_bwd)(moe_ctx *ctx, const moe_real *q, const moe_real *k, const moe_real *v, const moe_real *o,
                                const moe_real *lse, const moe_real *dout, int64_t B, int64_t T, int64_t H, int64_t Dk,
                                int64_t Dv, moe_real scale, moe_real *dq, moe_real *dk, moe_real *dv);
    /* Decoding over MLA's latent cache (absorbed attention): row t of the n new tokens (at
       position pos0 + t) attends over cache rows 0..pos0+t of width R; head h's score with row
       j is scale·(qc[t, h] · cache[j]), and ob[t, h] = Σ_j p_j cache[j, 0..width). */
    moe_status (*attention_decode)(moe_ctx *ctx, const moe_real *qc, const moe_real *cache, int64_t n, int64_t H, int64_t R,
                                   int64_t width, int64_t pos0, moe_real scale, moe_real *ob);

    /* ---- MLA, MoE ---- */
    /* k [n, H, dn + dr] = [k_nope ; k_pe] and v [n, H, dv] from kvb [n, H, dn + dv] =
       [k_nope ; v] and the shared RoPE key kpe [n, dr] (row stride ld_kpe). */
    moe_status (*mla_split_kv)(moe_ctx *ctx, const moe_real *kvb, const moe_real *kpe, int64_t ld_kpe, int64_t n, int64_t H,
                               int64_t dn, int64_t dr, int64_t dv, moe_real *k, moe_real *v);
    /* Its backward: dkvb = [dk_nope ; dv], dkpe += dk_pe of head 0, then of head 1, … */
    moe_status (*mla_merge_kv)(moe_ctx *ctx, const moe_real *dk, const moe_real *dv, int64_t n, int64_t H, int64_t dn,
                               int64_t dr, int64_t dv_dim, moe_real *dkvb, moe_real *dkpe);
    /* The router of n tokens: scores s = sigmoid(z) or softmax(z) [n, E]; chosen [n, K] the
       experts with the largest s + bias (noaux_tc, the sum taken in double; plain s
       otherwise) within the topk_group kept groups, best first, ties to the lower index;
       groups are ranked by the sum of their top two (noaux_tc) or their max (group-limited
       greedy), ties to the lower group; gates [n, K] = routed_scaling_factor · (s of the
       chosen, normalised by sel_sum [n] = their sum when norm_topk_prob). */
    moe_status (*router_fwd)(moe_ctx *ctx, const moe_config *cfg, const moe_real *z, const moe_real *bias, int64_t n,
                             moe_real *s, int32_t *chosen, moe_real *gates, moe_real *sel_sum);
    /* dz [n, E] from dgates [n, K], plus the sequence balance loss's gradient when
       balance_scale != 0: balance_scale·f_bi per unit of token t's normalised score
       s_ti / Σ_j s_tj (f [n/T, E] from balance_loss, T tokens per sequence; the caller folds
       the loss weight and the means' 1/(B·T) into balance_scale). */
    moe_status (*router_bwd)(moe_ctx *ctx, const moe_config *cfg, const moe_real *s, const int32_t *chosen,
                             const moe_real *sel_sum, const moe_real *dgates, const moe_real *f, moe_real balance_scale,
                             int64_t n, int64_t T, moe_real *dz);
    /* The sequence-wise balance loss of B sequences of T tokens before its α/B: host_loss =
       Σ_b Σ_i f_bi·P_bi with f_bi = E/(K·T) added once per slot that chose i (written to
       f [B, E]) and
       P_bi = mean over the sequence of s_i normalised over the experts. */
    moe_status (*balance_loss)(moe_ctx *ctx, const moe_config *cfg, const moe_real *s, const int32_t *chosen, int64_t B,
                               int64_t T, moe_real *f, moe_real *host_loss);
    /* The dispatch plan of n tokens' k choices among E experts: a stable counting sort of the
       n·k (token, slot) pairs by expert. host_offsets [E+1]: each expert's range of packed rows;
       row_of [n·k]: the packed row of each pair; slot_of [n·k]: the pair of each packed row. */
    moe_status (*dispatch_plan)(moe_ctx *ctx, const int32_t *chosen, int64_t n, int64_t k, int64_t E,
                                int64_t *host_offsets, int32_t *row_of, int32_t *slot_of);
    /* dst[r] = src[idx[r] / div] for rows of d values (an embedding, a MoE dispatch). */
    moe_status (*gather_rows)(moe_ctx *ctx, const moe_real *src, const int32_t *idx, int32_t div, int64_t rows, int64_t d,
                              moe_real *dst);
    /* dst[idx[r]] += src[r], r in order (an embedding's backward). */
    moe_status (*scatter_add_rows)(moe_ctx *ctx, const moe_real *src, const int32_t *idx, int64_t rows, int64_t d,
                                   moe_real *dst);
    /* y[t] += Σ_j gates[t, j]·src[row_of[t, j]] for j < k in order (gates NULL: 1): the MoE
       combine, and a dispatch's backward, without atomics. */
    moe_status (*combine)(moe_ctx *ctx, const moe_real *src, const int32_t *row_of, const moe_real *gates, int64_t n,
                          int64_t k, int64_t d, moe_real *y);
    /* A routed expert's gate in backward, per row r: dgate[r] = dact_r · act_r, then dact_r
       and act_r are scaled by gate[r]. */
    moe_status (*expert_gate_bwd)(moe_ctx *ctx, const moe_real *gate, int64_t rows, int64_t cols, moe_real *dact,
                                  moe_real *act, moe_real *dgate);

    /* ---- FP8 ---- */
    /* E4M3 codes of x [rows, cols] in groups of gr×gc, each scaled by its amax/448 (pow2: the
       power of two at or above it): scales [ceil(rows/gr)][ceil(cols/gc)]. codes and deq (the
       dequantised values code·scale) may each be NULL. */
    moe_status (*fp8_quantize)(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc, int pow2,
                               uint8_t *codes, float *scales, moe_real *deq);
    moe_status (*fp8_dequantize)(moe_ctx *ctx, const uint8_t *codes, const float *scales, int64_t rows, int64_t cols,
                                 int64_t gr, int64_t gc, moe_real *x);

    /* ---- element-wise ---- */
    /* n values from one dtype to another (round to nearest even, saturating to finite for FP8). */
    moe_status (*convert)(moe_ctx *ctx, const void *src, moe_dtype src_dtype, int64_t n, void *dst, moe_dtype dst_dtype);
    /* dst rows (+)= src rows: [rows, cols] blocks at row strides lds and ldd. */
    moe_status (*copy2d)(moe_ctx *ctx, const moe_real *src, int64_t lds, int64_t rows, int64_t cols, moe_real *dst,
                         int64_t ldd, int accumulate);
    /* y = a + b with b repeating every nb values (nb = n: plain). */
    moe_status (*add)(moe_ctx *ctx, const moe_real *a, const moe_real *b, int64_t n, int64_t nb, moe_real *y);
    /* y (+)= a ⊙ b */
    moe_status (*mul)(moe_ctx *ctx, const moe_real *a, const moe_real *b, int64_t n, moe_real *y, int accumulate);
    /* y = alpha·x */
    moe_status (*scale)(moe_ctx *ctx, moe_real alpha, const moe_real *x, int64_t n, moe_real *y);
    /* y += alpha·x */
    moe_status (*axpy)(moe_ctx *ctx, moe_real alpha, const moe_real *x, int64_t n, moe_real *y);
    moe_status (*fill)(moe_ctx *ctx, moe_real value, int64_t n, moe_real *x);
    /* x[i] = mean + std·N_i, N_i the Box–Muller normal of counters (counter + 2i, +1) of key
       (moe_rng_normal's mapping of the two hashes). */
    moe_status (*fill_normal)(moe_ctx *ctx, uint64_t key, uint64_t counter, moe_real mean, moe_real std, int64_t n,
                              moe_real *x);

    /* ---- reductions ---- */
    /* host_sum = Σ x in order (moe_real). */
    moe_status (*sum)(moe_ctx *ctx, const moe_real *x, int64_t n, moe_real *host_sum);
    /* host_parts[c] = Σ x² in double over chunk c of `chunk` values (the last one shorter):
       the caller adds the parts in order, so a sum split over ranks at chunk boundaries has
       the bits of the whole. */
    moe_status (*sumsq)(moe_ctx *ctx, const moe_real *x, int64_t n, int64_t chunk, double *host_parts);
    /* out[j] += Σ_r x[r, j] (rows in fixed chunks, added in order). */
    moe_status (*colsum)(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t d, moe_real *out);

    /* ---- optimizer, distillation ---- */
    moe_status (*adamw)(moe_ctx *ctx, const moe__adamw_op *op);
    /* Per row that counts, its cross-entropy at T = 1 and KL at T (into op->kl); host_ce and
       host_kl get their sums in row order (double), host_count the rows that count. */
    moe_status (*distill_fwd)(moe_ctx *ctx, const moe__distill_op *op, const moe_real *zs, double *host_ce, double *host_kl,
                              int64_t *host_count);
    /* dzs += scale·(α·(softmax(zs) − onehot(label)) + (1 − α)·T·dKL/da) per row that counts. */
    moe_status (*distill_bwd)(moe_ctx *ctx, const moe__distill_op *op, const moe_real *zs, moe_real scale, moe_real *dzs);
    /* The teacher's top-k at temperature T from logits z [rows, V]: ids [rows, k] (most likely
       first, ties to the lower id), logp [rows, k] and the probability outside them, tail [rows]
       (summed directly, in double). A non-finite logit is an error naming it. */
    moe_status (*teacher_topk)(moe_ctx *ctx, const moe_real *z, int64_t rows, int64_t V, int64_t k, moe_real temperature,
                               int32_t *ids, moe_real *logp, moe_real *tail);
};

/* ---- orchestration's side of the contract ---- */

#define MOE__BE(ctx) ((ctx)->conf.be)

MOE_API moe_device moe_ctx_device(const moe_ctx *ctx) { return ctx ? MOE__BE(ctx)->device : MOE_DEVICE_CPU; }

/* Device step memory for n values of `size` bytes (uninitialised), with a message on failure. */
static void *moe__dev_scratch(moe_ctx *ctx, int64_t n, size_t size, const char *what) {
    size_t bytes;
    void *p = NULL;
    if (n < 0 || moe__mul_overflows((size_t)n, size, &bytes)) {
        moe__fail(ctx, MOE_ERR_MEMORY, "%s: size overflows", what);
        return NULL;
    }
    if (MOE__BE(ctx)->scratch(ctx, bytes, &p) != MOE_OK) { /* the backend's message, after what wanted it */
        char why[sizeof ctx->error];
        memcpy(why, ctx->error, sizeof why);
        moe__fail(ctx, MOE_ERR_MEMORY, "%s: %s", what, why);
        return NULL;
    }
    return p;
}
/* n moe_real of device step memory, uninitialised (real) or zeroed (zeros). */
static moe_real *moe__dev_real(moe_ctx *ctx, int64_t n, const char *what) {
    return (moe_real *)moe__dev_scratch(ctx, n, sizeof(moe_real), what);
}
static moe_real *moe__dev_zeros(moe_ctx *ctx, int64_t n, const char *what) {
    moe_real *p = moe__dev_real(ctx, n, what);
    if (p && n > 0 && MOE__BE(ctx)->memset(ctx, p, 0, (size_t)n * sizeof(moe_real)) != MOE_OK) return NULL;
    return p;
}

/* The descriptor of one product C = op(A)·op(B) (+ C) (alpha 1, batch 1). */
static moe__gemm_op moe__gemm_1(int64_t m, int64_t n, int64_t k, const moe_real *a, int64_t lda, int trans_a, const moe_real *b,
                                int64_t ldb, int trans_b, moe_real *c, int64_t ldc, int accumulate, moe_dtype precision) {
    moe__gemm_op g;
    memset(&g, 0, sizeof g);
    g.m = m; g.n = n; g.k = k; g.batch = 1;
    g.a = a; g.lda = lda; g.trans_a = trans_a;
    g.b = b; g.ldb = ldb; g.trans_b = trans_b;
    g.c = c; g.ldc = ldc;
    g.alpha = 1;
    g.accumulate = accumulate;
    g.precision = precision;
    return g;
}

/* ---- the FP8 recipe's groupings (reference §5) ---- */

/* The grouping of an operand [rows, cols] in storage order: 1×B tiles along its rows, B×1
   tiles down its columns, or B×B blocks. */
typedef enum moe__fp8_group { MOE__FP8_ALONG_ROWS, MOE__FP8_DOWN_COLS, MOE__FP8_BLOCKS } moe__fp8_group;

/* The recipe: activations and output gradients are quantised along their reduction
   dimension (Fprop and Dgrad: their rows; Wgrad: down the tokens), weights in blocks. */
static moe__fp8_group moe__fp8_role_group(moe_fp8_role role) {
    switch (role) {
    case MOE_FP8_FPROP_W: case MOE_FP8_DGRAD_W: return MOE__FP8_BLOCKS;
    case MOE_FP8_WGRAD_DY: case MOE_FP8_WGRAD_X: return MOE__FP8_DOWN_COLS;
    default: return MOE__FP8_ALONG_ROWS;
    }
}

/* Group shape gr×gc of grouping g with block B, or of one scale per tensor. */
static void moe__fp8_group_dims(int64_t B, int per_tensor, moe__fp8_group g, int64_t rows, int64_t cols, int64_t *gr,
                                int64_t *gc) {
    if (per_tensor) {
        *gr = rows > 0 ? rows : 1;
        *gc = cols > 0 ? cols : 1;
    } else {
        *gr = g == MOE__FP8_ALONG_ROWS ? 1 : B;
        *gc = g == MOE__FP8_DOWN_COLS ? 1 : B;
    }
}
/* Group shape of grouping g in the context's mode, and whether its scales are powers of two
   (all of them, weights too, unless amax_scales). */
static int moe__fp8_group_shape(const moe_ctx *ctx, moe__fp8_group g, int64_t rows, int64_t cols, int64_t *gr, int64_t *gc) {
    moe__fp8_group_dims(ctx->conf.fp8.block, ctx->conf.fp8.per_tensor, g, rows, cols, gr, gc);
    return !ctx->conf.fp8.amax_scales;
}
/* ============================================================================================
   4. gemm — the CPU GEMM                                                                >>gemm
   ============================================================================================
   The backend's two GEMM entries (plain and strided-batched, grouped by expert), and the
   public moe_gemm, on one engine: a packed SIMD GEMM for everything but the smallest
   products, a dot-product path for a few rows (decoding), and the scalar reference. FP8
   products quantise their operands here, as the recipe's roles say, and multiply the exact
   values on the BF16 kernel.

   The engine: C[m,n] = alpha·op(A)·op(B) + beta·C, C row-major, FP32 (or BF16) operands,
   FP32 accumulation.

   Kernels
   - FP32: 6×16 micro-kernel, 12 ymm accumulators, AVX2+FMA; with AVX-512 a 6×32 one with 12
     zmm accumulators over two adjacent 16-wide B micro-panels (the same packing) does the
     whole tiles of column pairs. Intel's AVX-512 server cores run 512-bit FMAs at twice the
     256-bit rate; Zen 4 splits them in two, and there the zmm kernel still gained 2.5%
     (fewer loads and broadcasts per FMA; bench/gemm, geomean of 18 cells). Both make each
     element of C with the same FMAs in the same order: the same bits. MOE_GEMM_ZMM=0 in the
     environment keeps a new context on the ymm kernel.
   - BF16, the context's bf16_kernel (moe__gemm_bf16_kernel_default) — AMX (AMX-BF16, Linux):
     32×32 blocks on tiles, four C tiles fed by two A and two B tiles per 32 k (A packed as
     32 rows of K-pairs, B as for vdpbf16ps; K-pairs padded to 16). DP (AVX512_BF16): 6×32
     micro-kernel, 12 zmm accumulators, vdpbf16ps on K-pairs (A and B packed as one uint32
     per (k, k+1) pair, odd K padded with zero). FMA (no AVX512_BF16, or Intel without AMX,
     where vdpbf16ps is slower than FP32 FMAs): bf16_compute rounds operands to bf16 while
     packing into FP32 panels and runs the FP32 kernel (products of bf16 values are exact in
     FP32).
   Packing
   - B is always packed (NR-wide micro-panels, zero-padded) for a whole column super-panel
     and all of K, cooperatively by all threads, into the shared workspace.
   - A is read in place by the FP32 kernel (it takes a row stride and a k stride, so both
     A [m,k] and Aᵀ [k,m] work) unless it is bf16 / bf16-rounded or reused across enough
     columns; then it is packed once (micro-panels of the kernel's rows). Row tails (< 6 rows) are packed.
   Threads (OpenMP)
   - Phase 1 packs (panels handed out dynamically), a barrier, phase 2 computes C units
     (row chunk × column chunk, all K) handed out dynamically with an atomic counter, so a
     thread slowed down by a busy core does not hold the others back. Units shrink when
     there are fewer than MOE__GEMM_UNITS_PER_THREAD per thread.
   - Problems under MOE__GEMM_MT_FLOPS run on the calling thread.
   - The scalar path (MOE_NO_SIMD, moe_ctx_set_simd 0, the double-precision build) makes each
     element one sum over p in order.
   Determinism
   - The K blocking depends only on k; every element of C is produced by the same
     instruction sequence wherever its tile lies and whichever thread runs it (edge tiles
     run the same kernel on a temporary tile), so C is bit-identical for any thread count.
   - Epilogue per K block: first block C = alpha·acc (beta == 0: C not read) or
     fma(beta, C, alpha·acc); later blocks C = fma(alpha, acc, C).
 */

typedef enum moe__gemm_isa { MOE__GEMM_SCALAR = 0, MOE__GEMM_AVX2 = 1, MOE__GEMM_AVX512 = 2 } moe__gemm_isa;

typedef struct moe__gemm_desc {
    int64_t m, n, k;
    const void *a; int64_t lda; int a_trans; int a_bf16;
    const void *b; int64_t ldb; int b_trans; int b_bf16;
    moe_real *c; int64_t ldc;
    moe_real alpha, beta;
    int bf16_compute;
    double *backoff; /* the caller's contention state {until, length, started} (NULL: none) */
} moe__gemm_desc;

#ifdef MOE__SIMD_AVX2
#define MOE__GEMM_HAVE_AVX2 1
#endif
#if defined(MOE__GEMM_HAVE_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define MOE__GEMM_HAVE_AVX512 1
#endif
#if defined(MOE__GEMM_HAVE_AVX512) && defined(__AVX512BF16__)
#define MOE__GEMM_HAVE_BF16DP 1
#endif
#if defined(MOE__GEMM_HAVE_BF16DP) && defined(MOE__SIMD_AVX512) && defined(__AVX512VL__) && defined(__x86_64__) &&     \
    defined(__linux__) && (defined(__AMX_TILE__) || defined(__AMXTILE__)) && (defined(__AMX_BF16__) || defined(__AMXBF16__))
#define MOE__GEMM_HAVE_AMX 1
#endif

#if defined(__GNUC__)
#define MOE__GEMM_NOINLINE __attribute__((noinline))
#else
#define MOE__GEMM_NOINLINE
#endif

#define MOE__GEMM_MR 6      /* FP32 kernel rows */
#define MOE__GEMM_NR 16     /* FP32 kernel cols */
#define MOE__GEMM_BMR 6     /* BF16 kernel rows */
#define MOE__GEMM_BNR 32    /* BF16 kernel cols */
#define MOE__GEMM_KC 256    /* K block when k > KC1 (multiple of 128) */
#ifndef MOE__GEMM_KC1
#define MOE__GEMM_KC1 256   /* k up to this: a single K block (so multi-block splits stay 128-aligned) */
#endif
#ifndef MOE__GEMM_MCU
#define MOE__GEMM_MCU 96    /* rows of a compute unit (rounded up to a multiple of the kernel's rows) */
#endif
#ifndef MOE__GEMM_NCU
#define MOE__GEMM_NCU 128   /* cols of a compute unit (multiple of 32) */
#endif
#ifndef MOE__GEMM_UNITS_PER_THREAD
#define MOE__GEMM_UNITS_PER_THREAD 8 /* shrink compute units until there are this many per thread */
#endif
#ifndef MOE__GEMM_BBUDGET
#define MOE__GEMM_BBUDGET (4 << 20) /* bytes of packed B per column super-panel */
#endif
#ifndef MOE__GEMM_ABUDGET
#define MOE__GEMM_ABUDGET (8 << 20) /* bytes of packed A per row super-block */
#endif
#ifndef MOE__GEMM_PACKA_N
#define MOE__GEMM_PACKA_N 16384 /* FP32 row-major A: pack when n ≥ this */
#endif
#ifndef MOE__GEMM_PACKA_NT
#define MOE__GEMM_PACKA_NT 128 /* FP32 transposed A: pack when n ≥ this */
#endif
#ifndef MOE__GEMM_MT_FLOPS
#define MOE__GEMM_MT_FLOPS 1.0e7 /* below this many flops run on one thread (waking a second one costs ~50 µs, above) */
#endif
#define MOE__GEMM_AMR 32     /* AMX kernel rows (its cols: BNR, the BF16 kernel's B panels) */
#define MOE__GEMM_TILE (MOE__GEMM_AMR * MOE__GEMM_BNR) /* the largest kernel tile */
#define MOE__GEMM_KMAX (MOE__GEMM_KC1 > MOE__GEMM_KC ? MOE__GEMM_KC1 : MOE__GEMM_KC)

enum { MOE__GEMM_KIND_F32 = 0, MOE__GEMM_KIND_BF16 = 1, MOE__GEMM_KIND_AMX = 2 };

#if defined(MOE__GEMM_HAVE_AVX512)
/* A kernel switch from the environment: "1" on, "0" off, anything else (or unset) dflt. */
static int moe__gemm_env_switch(const char *name, int dflt) {
    const char *env = getenv(name);
    return env && (env[0] == '0' || env[0] == '1') && !env[1] ? env[0] == '1' : dflt;
}
#endif

/* The zmm FP32 kernel wherever the build has AVX-512, unless MOE_GEMM_ZMM=0. */
static int moe__gemm_zmm_default(void) {
#if defined(MOE__GEMM_HAVE_AVX512)
    return moe__gemm_env_switch("MOE_GEMM_ZMM", 1);
#else
    return 0;
#endif
}

#if defined(MOE__GEMM_HAVE_AMX)
/* Whether this CPU has AMX-BF16 tiles and Linux lets this process use them (the tile data
   is state the kernel saves only for processes that asked: arch_prctl ARCH_REQ_XCOMP_PERM
   for XTILEDATA, feature 18). */
static int moe__gemm_amx_usable(void) {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22)) || !(edx & (1u << 24))) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

/* The BF16 GEMM kernel of a new context (MOE__BF16_*): AMX tiles wherever the build and CPU
   have them (one tile instruction does 16×16 dot products of 32 bf16 values; measured on a Xeon,
   family 6 model 167: 2.5 TFLOP/s per core in a register-only loop, against 220 GFLOP/s for
   512-bit FMAs);
   else vdpbf16ps wherever the build has AVX512_BF16, except on Intel CPUs: there vdpbf16ps
   (64 FLOPs) gives half the FLOP rate of 512-bit FMAs (32 each, two a cycle), so the FP32
   kernel over operands rounded to bf16 while packing is faster (same Xeon: 110 against 220
   GFLOP/s per core); Zen 4 runs vdpbf16ps at twice its FP32 rate. MOE_GEMM_BF16 = fma, dp or
   amx picks one (the next one down where it is missing). All round the operands to bf16 and
   accumulate exact products in FP32, in different orders (single k, K-pairs, the tile's): a
   BF16 product's last bits follow the kernel, never the thread count. */
static int moe__gemm_bf16_kernel_default(void) {
    int have = MOE__BF16_FMA, dflt = MOE__BF16_FMA;
    const char *env = getenv("MOE_GEMM_BF16"), *old = getenv("MOE_GEMM_BF16DP");
    if (!env && old && (strcmp(old, "0") == 0 || strcmp(old, "1") == 0)) env = old[0] == '0' ? "fma" : "dp"; /* its old name */
    if (env && strcmp(env, "fma") == 0) return MOE__BF16_FMA;
#if defined(MOE__GEMM_HAVE_BF16DP)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    int intel = __get_cpuid(0, &eax, &ebx, &ecx, &edx) && ebx == signature_INTEL_ebx && edx == signature_INTEL_edx &&
                ecx == signature_INTEL_ecx;
    have = MOE__BF16_DP;
    dflt = intel ? MOE__BF16_FMA : MOE__BF16_DP;
#endif
    if (env && strcmp(env, "dp") == 0) return have;
#if defined(MOE__GEMM_HAVE_AMX)
    if (moe__gemm_amx_usable()) have = dflt = MOE__BF16_AMX; /* asks Linux for the tiles: only where they may be used */
#endif
    return env && strcmp(env, "amx") == 0 ? have : dflt;
}

static moe__gemm_isa moe__gemm_best_isa(void) {
#if defined(MOE__GEMM_HAVE_AVX512)
    return MOE__GEMM_AVX512;
#elif defined(MOE__GEMM_HAVE_AVX2)
    return MOE__GEMM_AVX2;
#else
    return MOE__GEMM_SCALAR;
#endif
}

static int64_t moe__gemm_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t moe__gemm_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t moe__gemm_rup(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

/* K block size: a function of k only (never of the thread count). */
static int64_t moe__gemm_kcb(int64_t k) { return k <= MOE__GEMM_KC1 ? k : MOE__GEMM_KC; }

/* ---- scalar element access ---- */
static moe_real moe__gemm_get(const void *p, int bf16, int64_t idx) {
    return bf16 ? (moe_real)moe_bf16_to_f32(((const uint16_t *)p)[idx]) : ((const moe_real *)p)[idx];
}
static moe_real moe__gemm_geta(const moe__gemm_desc *d, int64_t i, int64_t p) {
    return moe__gemm_get(d->a, d->a_bf16, d->a_trans ? p * d->lda + i : i * d->lda + p);
}
static moe_real moe__gemm_getb(const moe__gemm_desc *d, int64_t p, int64_t j) {
    return moe__gemm_get(d->b, d->b_bf16, d->b_trans ? j * d->ldb + p : p * d->ldb + j);
}

/* ---- the scalar path: rows [m0, m1), each element one sum over p in order ---- */
static void moe__gemm_scalar_rows(const moe__gemm_desc *d, int64_t m0, int64_t m1) {
    int64_t i, j, p;
    int rnd_a = d->bf16_compute && !d->a_bf16, rnd_b = d->bf16_compute && !d->b_bf16;
    for (i = m0; i < m1; i++) {
        moe_real *crow = d->c + i * d->ldc;
        for (j = 0; j < d->n; j++) {
            moe_real acc = 0, v;
            for (p = 0; p < d->k; p++) {
                moe_real av = moe__gemm_geta(d, i, p), bv = moe__gemm_getb(d, p, j);
                if (rnd_a) av = moe__round_bf16(av);
                if (rnd_b) bv = moe__round_bf16(bv);
                acc += av * bv;
            }
            v = d->alpha * acc;
            if (d->beta != 0) v += d->beta * crow[j];
            crow[j] = v;
        }
    }
}

#if defined(MOE__GEMM_HAVE_AVX2)
/* ---- bf16 conversion (round to nearest even, NaN → 0x7FFF, as moe_f32_to_bf16) ---- */
static __m256i moe__gemm_bf16_round8(__m256i u) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    const __m256i absm = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absm), inf);
    return _mm256_blendv_epi8(r, bias, nan);
}
static void moe__gemm_cvt_bf16(const float *MOE_RESTRICT src, uint16_t *MOE_RESTRICT dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i r0 = moe__gemm_bf16_round8(_mm256_loadu_si256((const __m256i *)(const void *)(src + i)));
        __m256i r1 = moe__gemm_bf16_round8(_mm256_loadu_si256((const __m256i *)(const void *)(src + i + 8)));
        __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8);
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), pk);
    }
    for (; i < n; i++) dst[i] = moe_f32_to_bf16(src[i]);
}
/* n consecutive elements of a float or bf16 array, as bf16 */
static void moe__gemm_get_bf16(const void *src, int bf16, int64_t idx, uint16_t *dst, int64_t n) {
    if (bf16) memcpy(dst, (const uint16_t *)src + idx, (size_t)n * sizeof(uint16_t));
    else moe__gemm_cvt_bf16((const float *)src + idx, dst, n);
}
#if defined(MOE__GEMM_HAVE_BF16DP) && defined(MOE__SIMD_AVX512)
#define MOE__GEMM_PAIRS16 1
/* The lanes of a 16-wide chunk starting at c that fall below n. */
static __mmask16 moe__gemm_keep16(int64_t n, int64_t c) {
    return n - c >= 16 ? MOE__ALL16 : n - c <= 0 ? (__mmask16)0 : (__mmask16)((1u << (n - c)) - 1u);
}
/* bf16(src[l]) in the low half of lane l for the lanes in `keep` (the others 0, not read): the
   operations of moe__gemm_bf16_round8 on 16 lanes, moe_f32_to_bf16's bits. */
static __m512i moe__gemm_bf16_round16(const float *src, __mmask16 keep) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
    const __m512i absm = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(keep, src));
    __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(MOE__ALL16, u, 16), one);
    __m512i r = _mm512_maskz_srli_epi32(MOE__ALL16, _mm512_add_epi32(_mm512_add_epi32(u, bias), lsb), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absm), inf), bias);
}
/* The packed BF16 layout's K-pairs straight from two float rows: lane l = bf16(lo[l]) |
   bf16(hi[l]) << 16 (hi NULL: 0); lanes outside `keep` are 0 and not read. */
static __m512i moe__gemm_bf16_pairs16(const float *lo, const float *hi, __mmask16 keep) {
    __m512i r = moe__gemm_bf16_round16(lo, keep);
    return hi ? _mm512_or_si512(r, _mm512_maskz_slli_epi32(MOE__ALL16, moe__gemm_bf16_round16(hi, keep), 16)) : r;
}
/* The K-pairs of a row whose k are consecutive (f32, or bf16 when `bf16`): lane l = values 2l
   and 2l + 1 from src; values past the n left are 0 and not read. */
static MOE__SIMD_INLINE __m512i moe__gemm_row_pairs16(const void *src, int bf16, int64_t n) {
    const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
    __m512i lo, hi;
    _mm_prefetch((const char *)src + 256, _MM_HINT_T0); /* along the row: two calls on for f32 values, four for bf16 */
    _mm_prefetch((const char *)src + 320, _MM_HINT_T0);
    if (bf16) return _mm512_maskz_loadu_epi16(n >= 32 ? ~(__mmask32)0 : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u), src);
    lo = moe__gemm_bf16_round16((const float *)src, moe__gemm_keep16(n, 0));
    hi = moe__gemm_bf16_round16((const float *)src + 16, moe__gemm_keep16(n, 16));
    /* packus joins 4 + 4 lanes per 128 bits (every value fits 16 bits): put lo's quarters first */
    return _mm512_maskz_permutexvar_epi64((__mmask8)0xFF, order, _mm512_maskz_packus_epi32(~(__mmask32)0, lo, hi));
}
/* r[0..15] transposed as 32-bit lanes: lane c of r[i] becomes lane i of r[c]. */
static void moe__gemm_transpose16(__m512i r[16]) {
    __m512i t[16];
    int i, j;
    for (i = 0; i < 16; i += 2) { /* lane L: rows i, i + 1 of columns 4L, 4L + 1 | 4L + 2, 4L + 3 */
        t[i] = _mm512_maskz_unpacklo_epi32(MOE__ALL16, r[i], r[i + 1]);
        t[i + 1] = _mm512_maskz_unpackhi_epi32(MOE__ALL16, r[i], r[i + 1]);
    }
    for (i = 0; i < 16; i += 4) { /* r[i + j], lane L: rows i .. i + 3 of column 4L + j */
        r[i] = _mm512_maskz_unpacklo_epi64((__mmask8)0xFF, t[i], t[i + 2]);
        r[i + 1] = _mm512_maskz_unpackhi_epi64((__mmask8)0xFF, t[i], t[i + 2]);
        r[i + 2] = _mm512_maskz_unpacklo_epi64((__mmask8)0xFF, t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_maskz_unpackhi_epi64((__mmask8)0xFF, t[i + 1], t[i + 3]);
    }
    for (j = 0; j < 4; j++) { /* column 4L + j: lane L of r[j], r[4 + j], r[8 + j], r[12 + j] */
        __m512i v0 = _mm512_maskz_shuffle_i32x4(MOE__ALL16, r[j], r[4 + j], 0x88);
        __m512i v1 = _mm512_maskz_shuffle_i32x4(MOE__ALL16, r[j], r[4 + j], 0xDD);
        __m512i w0 = _mm512_maskz_shuffle_i32x4(MOE__ALL16, r[8 + j], r[12 + j], 0x88);
        __m512i w1 = _mm512_maskz_shuffle_i32x4(MOE__ALL16, r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_maskz_shuffle_i32x4(MOE__ALL16, v0, w0, 0x88);
        t[8 + j] = _mm512_maskz_shuffle_i32x4(MOE__ALL16, v0, w0, 0xDD);
        t[4 + j] = _mm512_maskz_shuffle_i32x4(MOE__ALL16, v1, w1, 0x88);
        t[12 + j] = _mm512_maskz_shuffle_i32x4(MOE__ALL16, v1, w1, 0xDD);
    }
    for (i = 0; i < 16; i++) r[i] = t[i];
}
#endif

/* x = moe__round_bf16(x) over n floats in place (the FP32 kernel's panels under bf16_compute):
   16 lanes at a time where the pair packing's round16 is compiled, else 8 */
static void moe__gemm_round_bf16_inplace(float *x, int64_t n) {
    int64_t i = 0;
#if defined(MOE__GEMM_PAIRS16)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_si512((void *)(x + i), _mm512_maskz_slli_epi32(MOE__ALL16, moe__gemm_bf16_round16(x + i, MOE__ALL16), 16));
#endif
    for (; i + 8 <= n; i += 8) {
        __m256i r = moe__gemm_bf16_round8(_mm256_loadu_si256((const __m256i *)(const void *)(x + i)));
        _mm256_storeu_si256((__m256i *)(void *)(x + i), _mm256_slli_epi32(r, 16));
    }
    for (; i < n; i++) x[i] = moe__round_bf16(x[i]);
}

/* ---- packing: FP32 micro-panels ---- */
/* op(B) rows [p0, p0+kc), cols [j, j+nr), nr ≤ 16 → dst[kc][16], zero-padded. */
static void moe__gemm_pack_b_f32(const moe__gemm_desc *d, int64_t p0, int64_t kc, int64_t j, int64_t nr,
                                 float *MOE_RESTRICT dst) {
    const int NR = MOE__GEMM_NR;
    const int rnd = d->bf16_compute && !d->b_bf16;
    const int64_t ldb = d->ldb;
    int64_t p, jj;
    if (!d->b_bf16 && !d->b_trans) {
        const float *s = (const float *)d->b + p0 * ldb + j;
        if (nr == NR) {
            for (p = 0; p < kc; p++) {
                _mm256_store_ps(dst + p * NR, _mm256_loadu_ps(s + p * ldb));
                _mm256_store_ps(dst + p * NR + 8, _mm256_loadu_ps(s + p * ldb + 8));
            }
        } else {
            for (p = 0; p < kc; p++) {
                for (jj = 0; jj < nr; jj++) dst[p * NR + jj] = s[p * ldb + jj];
                for (; jj < NR; jj++) dst[p * NR + jj] = 0.0f;
            }
        }
    } else if (!d->b_bf16) { /* B stored [n, k]: transpose 8×8 blocks */
        const float *s = (const float *)d->b + j * ldb + p0;
        p = 0;
        if (nr == NR) {
            for (; p + 8 <= kc; p += 8) {
                int h;
                for (h = 0; h < 2; h++) {
                    const float *r = s + (int64_t)h * 8 * ldb + p;
                    float *o = dst + p * NR + h * 8;
                    __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + ldb);
                    __m256 r2 = _mm256_loadu_ps(r + 2 * ldb), r3 = _mm256_loadu_ps(r + 3 * ldb);
                    __m256 r4 = _mm256_loadu_ps(r + 4 * ldb), r5 = _mm256_loadu_ps(r + 5 * ldb);
                    __m256 r6 = _mm256_loadu_ps(r + 6 * ldb), r7 = _mm256_loadu_ps(r + 7 * ldb);
                    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
                    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
                    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
                    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
                    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                    _mm256_store_ps(o + 0 * NR, _mm256_permute2f128_ps(s0, s4, 0x20));
                    _mm256_store_ps(o + 1 * NR, _mm256_permute2f128_ps(s1, s5, 0x20));
                    _mm256_store_ps(o + 2 * NR, _mm256_permute2f128_ps(s2, s6, 0x20));
                    _mm256_store_ps(o + 3 * NR, _mm256_permute2f128_ps(s3, s7, 0x20));
                    _mm256_store_ps(o + 4 * NR, _mm256_permute2f128_ps(s0, s4, 0x31));
                    _mm256_store_ps(o + 5 * NR, _mm256_permute2f128_ps(s1, s5, 0x31));
                    _mm256_store_ps(o + 6 * NR, _mm256_permute2f128_ps(s2, s6, 0x31));
                    _mm256_store_ps(o + 7 * NR, _mm256_permute2f128_ps(s3, s7, 0x31));
                }
            }
        }
        for (; p < kc; p++) {
            for (jj = 0; jj < nr; jj++) dst[p * NR + jj] = s[jj * ldb + p];
            for (; jj < NR; jj++) dst[p * NR + jj] = 0.0f;
        }
    } else {
        for (p = 0; p < kc; p++) {
            for (jj = 0; jj < nr; jj++) dst[p * NR + jj] = moe__gemm_getb(d, p0 + p, j + jj);
            for (; jj < NR; jj++) dst[p * NR + jj] = 0.0f;
        }
    }
    if (rnd) moe__gemm_round_bf16_inplace(dst, kc * NR);
}

/* op(A) rows [i, i+mr), mr ≤ 6, k [p0, p0+kc) → dst[kc][6], zero-padded, rounded to bf16 under
   bf16_compute (Aᵀ in f32: moe__gemm_pack_at_f32_group). */
static void moe__gemm_pack_a_f32(const moe__gemm_desc *d, int64_t i, int64_t mr, int64_t p0, int64_t kc,
                                 float *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_MR;
    const int rnd = d->bf16_compute && !d->a_bf16;
    const int64_t lda = d->lda;
    int64_t p, ii;
    if (!d->a_trans && !d->a_bf16) {
        const float *s = (const float *)d->a + i * lda + p0;
        if (mr == MR) {
            const float *r0 = s, *r1 = s + lda, *r2 = s + 2 * lda, *r3 = s + 3 * lda, *r4 = s + 4 * lda,
                        *r5 = s + 5 * lda;
            for (p = 0; p < kc; p++) {
                float *o = dst + p * MR;
                o[0] = r0[p]; o[1] = r1[p]; o[2] = r2[p]; o[3] = r3[p]; o[4] = r4[p]; o[5] = r5[p];
            }
        } else {
            for (ii = 0; ii < mr; ii++)
                for (p = 0; p < kc; p++) dst[p * MR + ii] = s[ii * lda + p];
            for (; ii < MR; ii++)
                for (p = 0; p < kc; p++) dst[p * MR + ii] = 0.0f;
        }
    } else {
        for (p = 0; p < kc; p++) {
            for (ii = 0; ii < mr; ii++) dst[p * MR + ii] = moe__gemm_geta(d, i + ii, p0 + p);
            for (; ii < MR; ii++) dst[p * MR + ii] = 0.0f;
        }
    }
    if (rnd) moe__gemm_round_bf16_inplace(dst, kc * MR);
}

/* Transposed A (Aᵀ stored [k, m], f32, no rounding) for up to 8 panels at once: rows [i,
   i+rows), rows ≤ 48; panel g goes to dst + g*kc*6. Each k's values for all the panels are read
   together (panel by panel, the same cache lines of Aᵀ's far-apart rows came back up to 8
   times), with the rows four k ahead prefetched. */
static void moe__gemm_pack_at_f32_group(const moe__gemm_desc *d, int64_t i, int64_t rows, int64_t p0, int64_t kc,
                                        float *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_MR;
    const int64_t lda = d->lda, np = (rows + MR - 1) / MR;
    const float *row = (const float *)d->a + p0 * lda + i;
    int64_t p, g, c;
    for (p = 0; p < kc; p++, row += lda) {
        if (p + 4 < kc)
            for (c = 0; c < rows; c += 16) _mm_prefetch((const char *)(row + 4 * lda + c), _MM_HINT_T0);
        for (g = 0; g < np; g++) {
            const float *r = row + g * MR;
            float *o = dst + g * kc * MR + p * MR;
            if (rows - g * MR >= MR) { /* 4 + 2 floats */
                _mm_storeu_ps(o, _mm_loadu_ps(r));
                _mm_storel_pi((__m64 *)(void *)(o + 4), _mm_loadl_pi(_mm_setzero_ps(), (const __m64 *)(const void *)(r + 4)));
            } else {
                for (c = 0; c < MR; c++) o[c] = c < rows - g * MR ? r[c] : 0.0f;
            }
        }
    }
}

/* ---- packing: BF16 K-pairs (uint32: low half even k, high half odd k) ---- */
/* op(B) rows [p0, p0+kc), cols [j, j+nr), nr ≤ 32 → dst[(kc+1)/2][32]. */
static void moe__gemm_pack_b_bf16(const moe__gemm_desc *d, int64_t p0, int64_t kc, int64_t j, int64_t nr,
                                  uint32_t *MOE_RESTRICT dst) {
    const int NR = MOE__GEMM_BNR;
    const int64_t kp = (kc + 1) / 2, ldb = d->ldb;
    int64_t pp, jj;
    if (d->b_trans) { /* column j of op(B) is row j of B: consecutive k */
#if defined(MOE__GEMM_PAIRS16)
        /* each of 2 × 16 columns along its row (the order its memory is read best), then 16 × 16
           pairs at a time transposed into 16 rows of the panel */
        const size_t es = d->b_bf16 ? 2 : 4;
        uint32_t rows[16][MOE__GEMM_KMAX / 2 + 16];
        int64_t c, h, q;
        for (h = 0; h < 2; h++) {
            if (16 * h >= nr) { /* no columns in this half */
                for (q = 0; q < kp; q++) _mm512_storeu_si512((void *)(dst + q * NR + 16 * h), _mm512_setzero_si512());
                continue;
            }
            for (q = 0; q < 16; q++) { /* column j + 16h + q: row j + 16h + q of B (NULL: padding) */
                const unsigned char *col = 16 * h + q < nr ? (const unsigned char *)d->b + ((j + 16 * h + q) * ldb + p0) * es : NULL;
                for (c = 0; c < kc; c += 32)
                    _mm512_storeu_si512((void *)(rows[q] + c / 2),
                                        col ? moe__gemm_row_pairs16(col + c * es, d->b_bf16, kc - c) : _mm512_setzero_si512());
            }
            for (c = 0; c < kp; c += 16) {
                __m512i r[16];
                for (q = 0; q < 16; q++) r[q] = _mm512_loadu_si512((const void *)(rows[q] + c));
                moe__gemm_transpose16(r);
                for (q = 0; q < 16 && c + q < kp; q++) _mm512_storeu_si512((void *)(dst + (c + q) * NR + 16 * h), r[q]);
            }
        }
#else
        uint16_t tmp[MOE__GEMM_KMAX + 2];
        for (jj = 0; jj < nr; jj++) {
            moe__gemm_get_bf16(d->b, d->b_bf16, (j + jj) * ldb + p0, tmp, kc);
            tmp[kc] = 0;
            for (pp = 0; pp < kp; pp++) dst[pp * NR + jj] = (uint32_t)tmp[2 * pp] | ((uint32_t)tmp[2 * pp + 1] << 16);
        }
        for (; jj < NR; jj++)
            for (pp = 0; pp < kp; pp++) dst[pp * NR + jj] = 0u;
#endif
    } else {
        uint16_t t0[MOE__GEMM_BNR], t1[MOE__GEMM_BNR];
#if defined(MOE__GEMM_PAIRS16)
        if (!d->b_bf16) { /* rows p, p + 1 of B: 2 × 16 pairs */
            const float *row = (const float *)d->b + p0 * ldb + j;
            const __mmask16 k0 = moe__gemm_keep16(nr, 0), k1 = moe__gemm_keep16(nr, 16);
            for (pp = 0; pp < kp; pp++, row += 2 * ldb) {
                const float *next = 2 * pp + 1 < kc ? row + ldb : NULL;
                _mm512_storeu_si512((void *)(dst + pp * NR), moe__gemm_bf16_pairs16(row, next, k0));
                _mm512_storeu_si512((void *)(dst + pp * NR + 16), moe__gemm_bf16_pairs16(row + 16, next ? next + 16 : NULL, k1));
            }
            return;
        }
#endif
        for (pp = 0; pp < kp; pp++) {
            int64_t p = p0 + 2 * pp;
            uint32_t *o = dst + pp * NR;
            moe__gemm_get_bf16(d->b, d->b_bf16, p * ldb + j, t0, nr);
            if (2 * pp + 1 < kc) moe__gemm_get_bf16(d->b, d->b_bf16, (p + 1) * ldb + j, t1, nr);
            else memset(t1, 0, sizeof t1);
            for (jj = 0; jj < nr; jj++) o[jj] = (uint32_t)t0[jj] | ((uint32_t)t1[jj] << 16);
            for (; jj < NR; jj++) o[jj] = 0u;
        }
    }
}

static void moe__gemm_pack_at_bf16_group(const moe__gemm_desc *d, int64_t i, int64_t rows, int64_t p0, int64_t kc,
                                         uint32_t *MOE_RESTRICT dst);
/* op(A) rows [i, i+mr), mr ≤ 6, k [p0, p0+kc) → dst[(kc+1)/2][6]. */
static void moe__gemm_pack_a_bf16(const moe__gemm_desc *d, int64_t i, int64_t mr, int64_t p0, int64_t kc,
                                  uint32_t *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_BMR;
    const int64_t kp = (kc + 1) / 2, lda = d->lda;
    int64_t ii;
    if (!d->a_trans) { /* row i of A: consecutive k */
#if defined(MOE__GEMM_PAIRS16)
        /* 16 pairs of each of the 6 rows, interleaved into 6 × 16 lanes of the panel: lane t of
           vector v is pair g / 6 of row g % 6 (g = 16v + t), so the index picks lane g / 6 of
           the row pair (g % 6) / 2, the odd row from the second source; vectors v and v + 3
           differ by 8 pairs */
        const __m512i pick[3] = {_mm512_setr_epi32(0, 16, 0, 16, 0, 16, 1, 17, 1, 17, 1, 17, 2, 18, 2, 18),
                                 _mm512_setr_epi32(2, 18, 3, 19, 3, 19, 3, 19, 4, 20, 4, 20, 4, 20, 5, 21),
                                 _mm512_setr_epi32(5, 21, 5, 21, 6, 22, 6, 22, 6, 22, 7, 23, 7, 23, 7, 23)};
        const __mmask16 rows23[3] = {0xC30C, 0x0C30, 0x30C3}, rows45[3] = {0x0C30, 0x30C3, 0xC30C};
        const __m512i eight = _mm512_set1_epi32(8);
        const size_t es = d->a_bf16 ? 2 : 4;
        int64_t c, v;
        for (c = 0; c < kc; c += 32) {
            const int64_t np = kp - c / 2 < 16 ? kp - c / 2 : 16;
            __m512i r[6];
            for (ii = 0; ii < MR; ii++)
                r[ii] = ii < mr ? moe__gemm_row_pairs16((const unsigned char *)d->a + ((i + ii) * lda + p0 + c) * es, d->a_bf16, kc - c)
                                : _mm512_setzero_si512();
            for (v = 0; v < 6; v++) {
                __m512i idx = v < 3 ? pick[v] : _mm512_add_epi32(pick[v - 3], eight);
                __m512i o = _mm512_permutex2var_epi32(r[0], idx, r[1]);
                o = _mm512_mask_blend_epi32(rows23[v % 3], o, _mm512_permutex2var_epi32(r[2], idx, r[3]));
                o = _mm512_mask_blend_epi32(rows45[v % 3], o, _mm512_permutex2var_epi32(r[4], idx, r[5]));
                _mm512_mask_storeu_epi32(dst + c / 2 * MR + 16 * v, moe__gemm_keep16(np * MR, 16 * v), o);
            }
        }
#else
        uint16_t tmp[MOE__GEMM_KMAX + 2];
        int64_t pp;
        for (ii = 0; ii < mr; ii++) {
            moe__gemm_get_bf16(d->a, d->a_bf16, (i + ii) * lda + p0, tmp, kc);
            tmp[kc] = 0;
            for (pp = 0; pp < kp; pp++) dst[pp * MR + ii] = (uint32_t)tmp[2 * pp] | ((uint32_t)tmp[2 * pp + 1] << 16);
        }
        for (; ii < MR; ii++)
            for (pp = 0; pp < kp; pp++) dst[pp * MR + ii] = 0u;
#endif
    } else { /* one panel of the grouped packing */
        moe__gemm_pack_at_bf16_group(d, i, mr, p0, kc, dst);
    }
}
/* Transposed A (Aᵀ stored [k, m]) as bf16 pairs for up to 8 panels at once: rows [i, i+rows),
   rows ≤ 48; panel g goes to dst + g*kp*6. Converts 48 contiguous values per k at a time. */
static void moe__gemm_pack_at_bf16_group(const moe__gemm_desc *d, int64_t i, int64_t rows, int64_t p0, int64_t kc,
                                         uint32_t *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_BMR;
    const int64_t kp = (kc + 1) / 2, lda = d->lda, np = (rows + MR - 1) / MR;
    uint16_t t0[8 * MOE__GEMM_BMR], t1[8 * MOE__GEMM_BMR];
    int64_t pp, g, ii;
#if defined(MOE__GEMM_PAIRS16)
    if (!d->a_bf16) { /* rows p, p + 1 of Aᵀ: up to 3 × 16 pairs, then 6 to each panel */
        uint32_t t[8 * MOE__GEMM_BMR];
        int64_t c;
        for (pp = 0; pp < kp; pp++) {
            const float *row = (const float *)d->a + (p0 + 2 * pp) * lda + i, *next = 2 * pp + 1 < kc ? row + lda : NULL;
            if (2 * pp + 5 < kc) /* two pairs ahead: Aᵀ's rows are far apart (a profile's share 5.2% -> 3.8%) */
                for (c = 0; c < rows; c += 16) {
                    _mm_prefetch((const char *)(row + 4 * lda + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(row + 5 * lda + c), _MM_HINT_T0);
                }
            for (c = 0; c < np * MR; c += 16)
                _mm512_storeu_si512((void *)(t + c), moe__gemm_bf16_pairs16(row + c, next ? next + c : NULL, moe__gemm_keep16(rows, c)));
            for (g = 0; g < np; g++) memcpy(dst + g * kp * MR + pp * MR, t + g * MR, MR * sizeof(uint32_t));
        }
        return;
    }
#endif
    memset(t0, 0, sizeof t0);
    memset(t1, 0, sizeof t1);
    for (pp = 0; pp < kp; pp++) {
        int64_t p = p0 + 2 * pp;
        moe__gemm_get_bf16(d->a, d->a_bf16, p * lda + i, t0, rows);
        if (2 * pp + 1 < kc) moe__gemm_get_bf16(d->a, d->a_bf16, (p + 1) * lda + i, t1, rows);
        else memset(t1, 0, sizeof t1);
        for (g = 0; g < np; g++) {
            uint32_t *o = dst + g * kp * MR + pp * MR;
            for (ii = 0; ii < MR; ii++) o[ii] = (uint32_t)t0[g * MR + ii] | ((uint32_t)t1[g * MR + ii] << 16);
        }
    }
}
#endif


#if defined(MOE__GEMM_HAVE_AVX2)
/* ---- micro-kernels ---- */
/* The k loop of the FP32 kernels over A element (i, p) at a[i*rsa + p*csa]: rows in place
   (csa == 1), packed 6-row micro-panels (csa == MR) or any stride; STEP(A0..A5) takes the six
   rows' element pointers of one k. */
#define MOE__GEMM_A_WALK(STEP)                                                                        \
    if (csa == 1) {                                                                                   \
        const float *a0 = a, *a1 = a + rsa, *a2 = a + 2 * rsa, *a3 = a + 3 * rsa, *a4 = a + 4 * rsa,  \
                    *a5 = a + 5 * rsa;                                                                \
        for (p = 0; p + 4 <= kc; p += 4) {                                                            \
            STEP(a0 + p, a1 + p, a2 + p, a3 + p, a4 + p, a5 + p)                                      \
            STEP(a0 + p + 1, a1 + p + 1, a2 + p + 1, a3 + p + 1, a4 + p + 1, a5 + p + 1)              \
            STEP(a0 + p + 2, a1 + p + 2, a2 + p + 2, a3 + p + 2, a4 + p + 2, a5 + p + 2)              \
            STEP(a0 + p + 3, a1 + p + 3, a2 + p + 3, a3 + p + 3, a4 + p + 3, a5 + p + 3)              \
        }                                                                                             \
        for (; p < kc; p++) {                                                                         \
            STEP(a0 + p, a1 + p, a2 + p, a3 + p, a4 + p, a5 + p)                                      \
        }                                                                                             \
    } else if (csa == MOE__GEMM_MR) {                                                                 \
        for (p = 0; p + 4 <= kc; p += 4) {                                                            \
            STEP(a, a + 1, a + 2, a + 3, a + 4, a + 5)                                                \
            STEP(a + 6, a + 7, a + 8, a + 9, a + 10, a + 11)                                          \
            STEP(a + 12, a + 13, a + 14, a + 15, a + 16, a + 17)                                      \
            STEP(a + 18, a + 19, a + 20, a + 21, a + 22, a + 23)                                      \
            a += 24;                                                                                  \
        }                                                                                             \
        for (; p < kc; p++) {                                                                         \
            STEP(a, a + 1, a + 2, a + 3, a + 4, a + 5)                                                \
            a += 6;                                                                                   \
        }                                                                                             \
    } else {                                                                                          \
        for (p = 0; p < kc; p++) {                                                                    \
            STEP(a, a + 1, a + 2, a + 3, a + 4, a + 5)                                                \
            a += csa;                                                                                 \
        }                                                                                             \
    }

/* 6×16 FP32. A element (i, p) at a[i*rsa + p*csa] (either rsa == 1 or csa == 1);
   b: packed kc×16 (32-byte aligned). mode 0: C = alpha·acc; 1: C = fma(beta, C, alpha·acc);
   2: C = fma(alpha, acc, C). */
MOE__GEMM_NOINLINE static void moe__gemm_kern_avx2(int64_t kc, const float *MOE_RESTRICT a, int64_t rsa, int64_t csa,
                                const float *MOE_RESTRICT b, float *MOE_RESTRICT c, int64_t ldc,
                                float alpha, float beta, int mode) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    __m256 b0, b1, av, va;
    int64_t p;
    {
        int r;
        for (r = 0; r < 6; r++) {
            _mm_prefetch((const char *)(c + r * ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + r * ldc + 15), _MM_HINT_T0);
        }
    }
#define MOE__GEMM_STEP(A0, A1, A2, A3, A4, A5)                                                   \
    b0 = _mm256_load_ps(b); b1 = _mm256_load_ps(b + 8); b += 16;                               \
    av = _mm256_broadcast_ss(A0); c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01); \
    av = _mm256_broadcast_ss(A1); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11); \
    av = _mm256_broadcast_ss(A2); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21); \
    av = _mm256_broadcast_ss(A3); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31); \
    av = _mm256_broadcast_ss(A4); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41); \
    av = _mm256_broadcast_ss(A5); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    MOE__GEMM_A_WALK(MOE__GEMM_STEP)
#undef MOE__GEMM_STEP
    va = _mm256_set1_ps(alpha);
#define MOE__GEMM_EPI(R, X0, X1)                                                                 \
    {                                                                                            \
        float *cr = c + (R) * ldc;                                                               \
        if (mode == 0) {                                                                         \
            _mm256_storeu_ps(cr, _mm256_mul_ps(va, X0));                                         \
            _mm256_storeu_ps(cr + 8, _mm256_mul_ps(va, X1));                                     \
        } else if (mode == 1) {                                                                  \
            __m256 vb = _mm256_set1_ps(beta);                                                    \
            _mm256_storeu_ps(cr, _mm256_fmadd_ps(vb, _mm256_loadu_ps(cr), _mm256_mul_ps(va, X0))); \
            _mm256_storeu_ps(cr + 8, _mm256_fmadd_ps(vb, _mm256_loadu_ps(cr + 8), _mm256_mul_ps(va, X1))); \
        } else {                                                                                 \
            _mm256_storeu_ps(cr, _mm256_fmadd_ps(va, X0, _mm256_loadu_ps(cr)));                  \
            _mm256_storeu_ps(cr + 8, _mm256_fmadd_ps(va, X1, _mm256_loadu_ps(cr + 8)));          \
        }                                                                                        \
    }
    MOE__GEMM_EPI(0, c00, c01)
    MOE__GEMM_EPI(1, c10, c11)
    MOE__GEMM_EPI(2, c20, c21)
    MOE__GEMM_EPI(3, c30, c31)
    MOE__GEMM_EPI(4, c40, c41)
    MOE__GEMM_EPI(5, c50, c51)
#undef MOE__GEMM_EPI
}
#endif


#if defined(MOE__GEMM_HAVE_AVX512)
/* The epilogue of the 512-bit kernels (zmm FP32, vdpbf16ps, AMX) on one row of 32 sums x0 | x1
   at cr, as the engine's Determinism notes say: mode 0 C = alpha·acc, mode 1 C = fma(beta, C,
   alpha·acc), mode 2 C = fma(alpha, acc, C). */
static MOE__SIMD_INLINE void moe__gemm_epi32(float *cr, __m512 x0, __m512 x1, __m512 va, float beta, int mode) {
    if (mode == 0) {
        _mm512_storeu_ps(cr, _mm512_mul_ps(va, x0));
        _mm512_storeu_ps(cr + 16, _mm512_mul_ps(va, x1));
    } else if (mode == 1) {
        const __m512 vb = _mm512_set1_ps(beta);
        _mm512_storeu_ps(cr, _mm512_fmadd_ps(vb, _mm512_loadu_ps(cr), _mm512_mul_ps(va, x0)));
        _mm512_storeu_ps(cr + 16, _mm512_fmadd_ps(vb, _mm512_loadu_ps(cr + 16), _mm512_mul_ps(va, x1)));
    } else {
        _mm512_storeu_ps(cr, _mm512_fmadd_ps(va, x0, _mm512_loadu_ps(cr)));
        _mm512_storeu_ps(cr + 16, _mm512_fmadd_ps(va, x1, _mm512_loadu_ps(cr + 16)));
    }
}
/* 6×32 FP32 on zmm: the 6×16 kernel's arithmetic over two adjacent packed B micro-panels b0
   and b1 (kc×16 each), A and the modes as there. */
MOE__GEMM_NOINLINE static void moe__gemm_kern_zmm(int64_t kc, const float *MOE_RESTRICT a, int64_t rsa, int64_t csa,
                                                 const float *MOE_RESTRICT b0p, const float *MOE_RESTRICT b1p, float *MOE_RESTRICT c,
                                                 int64_t ldc, float alpha, float beta, int mode) {
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
    __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
    __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
    __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
    __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    __m512 b0, b1, av, va;
    int64_t p;
    {
        int r;
        for (r = 0; r < 6; r++) {
            _mm_prefetch((const char *)(c + r * ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + r * ldc + 31), _MM_HINT_T0);
        }
    }
#define MOE__GEMM_ZSTEP(A0, A1, A2, A3, A4, A5)                                                  \
    b0 = _mm512_loadu_ps(b0p); b1 = _mm512_loadu_ps(b1p); b0p += 16; b1p += 16;                \
    av = _mm512_set1_ps(*(A0)); c00 = _mm512_fmadd_ps(av, b0, c00); c01 = _mm512_fmadd_ps(av, b1, c01); \
    av = _mm512_set1_ps(*(A1)); c10 = _mm512_fmadd_ps(av, b0, c10); c11 = _mm512_fmadd_ps(av, b1, c11); \
    av = _mm512_set1_ps(*(A2)); c20 = _mm512_fmadd_ps(av, b0, c20); c21 = _mm512_fmadd_ps(av, b1, c21); \
    av = _mm512_set1_ps(*(A3)); c30 = _mm512_fmadd_ps(av, b0, c30); c31 = _mm512_fmadd_ps(av, b1, c31); \
    av = _mm512_set1_ps(*(A4)); c40 = _mm512_fmadd_ps(av, b0, c40); c41 = _mm512_fmadd_ps(av, b1, c41); \
    av = _mm512_set1_ps(*(A5)); c50 = _mm512_fmadd_ps(av, b0, c50); c51 = _mm512_fmadd_ps(av, b1, c51);
    MOE__GEMM_A_WALK(MOE__GEMM_ZSTEP)
#undef MOE__GEMM_ZSTEP
    va = _mm512_set1_ps(alpha);
    moe__gemm_epi32(c, c00, c01, va, beta, mode);
    moe__gemm_epi32(c + ldc, c10, c11, va, beta, mode);
    moe__gemm_epi32(c + 2 * ldc, c20, c21, va, beta, mode);
    moe__gemm_epi32(c + 3 * ldc, c30, c31, va, beta, mode);
    moe__gemm_epi32(c + 4 * ldc, c40, c41, va, beta, mode);
    moe__gemm_epi32(c + 5 * ldc, c50, c51, va, beta, mode);
}
#endif

#if defined(MOE__GEMM_HAVE_BF16DP)
/* 6×32 BF16 pairs: a packed [kp][6] uint32, b packed [kp][32] uint32 (64-byte aligned). */
MOE__GEMM_NOINLINE static void moe__gemm_kern_bf16(int64_t kp, const uint32_t *MOE_RESTRICT a, const uint32_t *MOE_RESTRICT b,
                                float *MOE_RESTRICT c, int64_t ldc, float alpha, float beta, int mode) {
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
    __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
    __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
    __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
    __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    __m512 va;
    int64_t p;
    {
        int r;
        for (r = 0; r < 6; r++) {
            _mm_prefetch((const char *)(c + r * ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + r * ldc + 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + r * ldc + 31), _MM_HINT_T0);
        }
    }
    for (p = 0; p < kp; p++) {
        __m512bh b0 = (__m512bh)_mm512_load_si512((const void *)b);
        __m512bh b1 = (__m512bh)_mm512_load_si512((const void *)(b + 16));
        __m512bh av;
        av = (__m512bh)_mm512_set1_epi32((int)a[0]); c00 = _mm512_dpbf16_ps(c00, av, b0); c01 = _mm512_dpbf16_ps(c01, av, b1);
        av = (__m512bh)_mm512_set1_epi32((int)a[1]); c10 = _mm512_dpbf16_ps(c10, av, b0); c11 = _mm512_dpbf16_ps(c11, av, b1);
        av = (__m512bh)_mm512_set1_epi32((int)a[2]); c20 = _mm512_dpbf16_ps(c20, av, b0); c21 = _mm512_dpbf16_ps(c21, av, b1);
        av = (__m512bh)_mm512_set1_epi32((int)a[3]); c30 = _mm512_dpbf16_ps(c30, av, b0); c31 = _mm512_dpbf16_ps(c31, av, b1);
        av = (__m512bh)_mm512_set1_epi32((int)a[4]); c40 = _mm512_dpbf16_ps(c40, av, b0); c41 = _mm512_dpbf16_ps(c41, av, b1);
        av = (__m512bh)_mm512_set1_epi32((int)a[5]); c50 = _mm512_dpbf16_ps(c50, av, b0); c51 = _mm512_dpbf16_ps(c51, av, b1);
        a += 6;
        b += 32;
    }
    va = _mm512_set1_ps(alpha);
    moe__gemm_epi32(c, c00, c01, va, beta, mode);
    moe__gemm_epi32(c + ldc, c10, c11, va, beta, mode);
    moe__gemm_epi32(c + 2 * ldc, c20, c21, va, beta, mode);
    moe__gemm_epi32(c + 3 * ldc, c30, c31, va, beta, mode);
    moe__gemm_epi32(c + 4 * ldc, c40, c41, va, beta, mode);
    moe__gemm_epi32(c + 5 * ldc, c50, c51, va, beta, mode);
}
#endif

#if defined(MOE__GEMM_HAVE_AMX)
/* ---- AMX: 32×32 blocks of BF16 products on tiles ----
   Eight tile registers of 16 rows × 64 bytes: C in four (16×16 FP32 each, a 32×32 block), A
   in two (16 rows × 16 K-pairs), B in two (16 K-pairs × 16 columns: rows of the BF16 kernel's
   B panel, whose K-pairs of 32 columns lie 128 bytes apart). A K block's pairs are padded with
   zeros to a multiple of 16 in both packings (A: 32 rows of pairs, row-major). */
typedef struct moe__gemm_amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} moe__gemm_amx_config;

/* Configure this thread's tiles (each 16 rows × 64 bytes) before the kernel runs on it. The
   configuration is a constant in memory: GCC's ldtilecfg tells the compiler it reads 8 bytes,
   so a configuration built on the stack could lose the stores of its other 56. */
static void moe__gemm_amx_begin(void) {
    static const moe__gemm_amx_config cfg = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};
    _tile_loadconfig(&cfg);
}
static void moe__gemm_amx_end(void) { _tile_release(); }

/* 16 K-pairs of 16 consecutive columns from two rows of a row-major array (float, or bf16 when
   `bf16`): lane l = bf16(lo[l]) | bf16(hi[l]) << 16 (hi NULL: 0); lanes outside `keep` 0, not read. */
static __m512i moe__gemm_col_pairs16(const void *lo, const void *hi, int bf16, __mmask16 keep) {
    __m512i r;
    if (!bf16) return moe__gemm_bf16_pairs16((const float *)lo, (const float *)hi, keep);
    r = _mm512_maskz_cvtepu16_epi32(MOE__ALL16, _mm256_maskz_loadu_epi16(keep, lo));
    if (!hi) return r;
    return _mm512_or_si512(
        r, _mm512_maskz_slli_epi32(MOE__ALL16, _mm512_maskz_cvtepu16_epi32(MOE__ALL16, _mm256_maskz_loadu_epi16(keep, hi)), 16));
}

/* op(A) rows [i, i+mr), mr ≤ 32, k [p0, p0+kc) → dst[32][kpp] K-pairs (kpp: kc's pairs rounded
   up to 16), zero past mr rows and kc values. */
static void moe__gemm_pack_a_amx(const moe__gemm_desc *d, int64_t i, int64_t mr, int64_t p0, int64_t kc, uint32_t *MOE_RESTRICT dst) {
    const int64_t kpp = moe__gemm_rup((kc + 1) / 2, 16), lda = d->lda;
    const size_t es = d->a_bf16 ? 2 : 4;
    const unsigned char *a = (const unsigned char *)d->a;
    int64_t r, c, q;
    if (!d->a_trans) { /* row i + r of A: consecutive k, 16 pairs at a time */
        for (r = 0; r < MOE__GEMM_AMR; r++) {
            if (r + 2 < mr) /* the start of the row after next (each row is a stream of its own) */
                for (q = 0; q < 4; q++) _mm_prefetch((const char *)(a + ((i + r + 2) * lda + p0) * es) + 64 * q, _MM_HINT_T0);
            for (c = 0; c < kpp; c += 16)
                _mm512_storeu_si512((void *)(dst + r * kpp + c),
                                    r < mr && 2 * c < kc ? moe__gemm_row_pairs16(a + ((i + r) * lda + p0 + 2 * c) * es, d->a_bf16, kc - 2 * c)
                                                         : _mm512_setzero_si512());
        }
        return;
    }
    /* Aᵀ [k, m]: two rows of Aᵀ give 32 rows' pairs side by side (128 contiguous bytes of f32
       each), 16 pairs of them transposed per 16 rows; rows two pairs ahead are prefetched */
    for (c = 0; c < kpp; c += 16) {
        __m512i t[2][16];
        for (q = 0; q < 16; q++) {
            const int64_t p = 2 * (c + q);
            const unsigned char *lo = a + ((p0 + p) * lda + i) * es;
            if (p + 5 < kc) {
                _mm_prefetch((const char *)(lo + 4 * lda * es), _MM_HINT_T0);
                _mm_prefetch((const char *)(lo + 4 * lda * es) + 64, _MM_HINT_T0);
                _mm_prefetch((const char *)(lo + 5 * lda * es), _MM_HINT_T0);
                _mm_prefetch((const char *)(lo + 5 * lda * es) + 64, _MM_HINT_T0);
            }
            for (r = 0; r < 2; r++)
                t[r][q] = 16 * r < mr && p < kc ? moe__gemm_col_pairs16(lo + 16 * r * es, p + 1 < kc ? lo + (lda + 16 * r) * es : NULL,
                                                                     d->a_bf16, moe__gemm_keep16(mr, 16 * r))
                                             : _mm512_setzero_si512();
        }
        for (r = 0; r < 2; r++) {
            moe__gemm_transpose16(t[r]);
            for (q = 0; q < 16; q++) _mm512_storeu_si512((void *)(dst + (16 * r + q) * kpp + c), t[r][q]);
        }
    }
}

/* 32×32 of C from a packed [32][kpp] and b packed [kpp][32] (K-pairs, kpp a multiple of 16),
   with the other kernels' epilogue over the tiles stored to memory (C = acc stores them in C). */
MOE__GEMM_NOINLINE static void moe__gemm_kern_amx(int64_t kpp, const uint32_t *MOE_RESTRICT a, const uint32_t *MOE_RESTRICT b,
                                                 float *MOE_RESTRICT c, int64_t ldc, float alpha, float beta, int mode) {
    float acc[MOE__GEMM_AMR * MOE__GEMM_BNR];
    const __m512 va = _mm512_set1_ps(alpha);
    int64_t q;
    int r;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (q = 0; q < kpp; q += 16) {
        _tile_loadd(4, a + q, kpp * 4);
        _tile_loadd(5, a + 16 * kpp + q, kpp * 4);
        _tile_loadd(6, b + q * 32, 128);
        _tile_loadd(7, b + q * 32 + 16, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (mode == 0 && alpha == 1.0f) { /* C = 1·acc = acc: the tiles go straight to C */
        _tile_stored(0, c, ldc * 4);
        _tile_stored(1, c + 16, ldc * 4);
        _tile_stored(2, c + 16 * ldc, ldc * 4);
        _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
        return;
    }
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    _tile_stored(2, acc + 16 * 32, 128);
    _tile_stored(3, acc + 16 * 32 + 16, 128);
    for (r = 0; r < MOE__GEMM_AMR; r++)
        moe__gemm_epi32(c + r * ldc, _mm512_loadu_ps(acc + r * 32), _mm512_loadu_ps(acc + r * 32 + 16), va, beta, mode);
}
#endif


/* ---- plan: blocking and workspace layout (a function of the problem, not of threads) ---- */
typedef struct moe__gemm_plan {
    int kind, mr, nr, pack_a;
    int64_t kcb;   /* K block */
    int64_t kpad;  /* k rounded up to even (AMX: to 32) */
    int64_t ncs;   /* columns per B super-panel (multiple of nr) */
    int64_t mcs;   /* rows per A super-block (multiple of mr) */
    size_t b_bytes, a_bytes, t_bytes;
} moe__gemm_plan;

static void moe__gemm_make_plan(const moe__gemm_desc *d, int kind, moe__gemm_plan *pl) {
    int64_t m = moe__gemm_max64(d->m, 1), n = moe__gemm_max64(d->n, 1), k = moe__gemm_max64(d->k, 1);
    pl->kind = kind;
    pl->mr = kind == MOE__GEMM_KIND_AMX ? MOE__GEMM_AMR : kind == MOE__GEMM_KIND_BF16 ? MOE__GEMM_BMR : MOE__GEMM_MR;
    pl->nr = kind == MOE__GEMM_KIND_F32 ? MOE__GEMM_NR : MOE__GEMM_BNR;
    pl->pack_a = kind != MOE__GEMM_KIND_F32 || d->a_bf16 || d->bf16_compute ||
                 (d->a_trans ? n >= MOE__GEMM_PACKA_NT : n >= MOE__GEMM_PACKA_N);
    pl->kcb = moe__gemm_kcb(k);
    pl->kpad = moe__gemm_rup(k, kind == MOE__GEMM_KIND_AMX ? 32 : 2);
    pl->ncs = moe__gemm_max64(pl->nr, (int64_t)(MOE__GEMM_BBUDGET / (pl->kpad * 4)) / pl->nr * pl->nr);
    pl->ncs = moe__gemm_min64(pl->ncs, moe__gemm_rup(n, pl->nr));
    pl->mcs = moe__gemm_rup(m, pl->mr);
    if (pl->pack_a)
        pl->mcs = moe__gemm_min64(pl->mcs, moe__gemm_max64(pl->mr, (int64_t)(MOE__GEMM_ABUDGET / (pl->kpad * 4)) / pl->mr * pl->mr));
    pl->b_bytes = (size_t)moe__gemm_rup(pl->kpad * pl->ncs * 4, 64);
    pl->a_bytes = (size_t)moe__gemm_rup(pl->kpad * (pl->pack_a ? pl->mcs : pl->mr) * 4, 64);
    pl->t_bytes = (size_t)moe__gemm_rup(MOE__GEMM_TILE * 4, 64);
}

/* Workspace for d on n_threads, for any kernel: bounds that never shrink as m or k grow (the
   grouped GEMM sizes each thread's memory for its largest group that way), where the plans'
   panel widths, cut to a byte budget, do not grow monotonically. */
static size_t moe__gemm_workspace_bytes(const moe__gemm_desc *d, int n_threads) {
    size_t most = 0;
    int kind;
    if (n_threads < 1) n_threads = 1;
    for (kind = MOE__GEMM_KIND_F32; kind <= MOE__GEMM_KIND_AMX; kind++) {
        moe__gemm_plan p;
        size_t col, row, b, a;
#if !defined(MOE__GEMM_HAVE_AMX)
        if (kind == MOE__GEMM_KIND_AMX) break;
#endif
        moe__gemm_make_plan(d, kind, &p);
        col = (size_t)p.kpad * 4; /* bytes of one packed column or row */
        b = col * (size_t)moe__gemm_rup(moe__gemm_max64(d->n, 1), p.nr);
        if (b > (size_t)MOE__GEMM_BBUDGET) b = col * (size_t)p.nr > (size_t)MOE__GEMM_BBUDGET ? col * (size_t)p.nr : (size_t)MOE__GEMM_BBUDGET;
        row = p.pack_a ? (size_t)moe__gemm_rup(moe__gemm_max64(d->m, 1), p.mr) : (size_t)p.mr;
        a = col * row;
        if (p.pack_a && a > (size_t)MOE__GEMM_ABUDGET) a = col * (size_t)p.mr > (size_t)MOE__GEMM_ABUDGET ? col * (size_t)p.mr : (size_t)MOE__GEMM_ABUDGET;
        if (b + a + 128 + p.t_bytes * (size_t)n_threads > most) most = b + a + 128 + p.t_bytes * (size_t)n_threads;
    }
    return most + 128;
}

#if defined(MOE__GEMM_HAVE_AVX2)
/* K-pairs of a K block of kc values in the BF16 packings (AMX's: a multiple of 16). */
static int64_t moe__gemm_block_pairs(const moe__gemm_plan *pl, int64_t kc) {
    return pl->kind == MOE__GEMM_KIND_AMX ? moe__gemm_rup((kc + 1) / 2, 16) : (kc + 1) / 2;
}

typedef struct moe__gemm_job {
    const moe__gemm_desc *d;
    moe__gemm_plan pl;
    float *bp, *ap, *tiles;
    int64_t counter; /* tickets handed out (shared) */
    double busy0;    /* seconds thread 0 spent working (for the contention check) */
    int64_t mcu, ncu; /* compute unit: rows (multiple of the kernel's) × cols (multiple of 32) */
    int zmm;          /* FP32 on the 6×32 zmm kernel where a unit has two full micro-panels */
} moe__gemm_job;


#ifdef _OPENMP
/* Contention back-off. On a shared machine another process may hold a core; a team thread
   queued behind it makes the caller wait at the barriers for a scheduler time slice (often
   5–25 ms), far longer than the GEMM itself. When thread 0 waited longer than it worked (and
   > 1 ms), the caller's later GEMMs run on one thread for a while (10 ms, doubling up to 0.5 s
   while it persists). The state bo = {until, length, started} belongs to the caller (its
   moe_ctx), so there is no global state; the thread count never changes the result. */
static void moe__gemm_backoff_note(double *bo, double wall, double busy) {
    double now = omp_get_wtime();
    if (!bo[2]) { /* the first team start creates the threads: not a contention signal */
        bo[2] = 1;
        return;
    }
    if (wall - busy > 1.0e-3 && wall - busy > busy) {
        bo[1] = bo[1] < 0.01 ? 0.01 : (bo[1] * 2.0 > 0.5 ? 0.5 : bo[1] * 2.0);
        bo[0] = now + bo[1];
    } else {
        bo[1] = 0.0;
    }
}
#endif

/* Dynamic work distribution: one global ticket sequence over all phases; a ticket past the
   current phase is kept for the next one. */
static int moe__gemm_take(moe__gemm_job *job, int64_t *mine, int64_t base, int64_t cnt, int64_t *u) {
    if (*mine < 0) {
        int64_t t;
#ifdef _OPENMP
#pragma omp atomic capture
#endif
        t = job->counter++;
        *mine = t;
    }
    if (*mine >= base + cnt) return 0;
    *u = *mine - base;
    *mine = -1;
    return 1;
}

/* Pack B panel: columns [j, j+nr) of the super-panel starting at js, all K. */
static void moe__gemm_do_pack_b(const moe__gemm_job *job, int64_t js, int64_t j, int64_t nr) {
    const moe__gemm_desc *d = job->d;
    const moe__gemm_plan *pl = &job->pl;
    int64_t pc;
    for (pc = 0; pc < d->k; pc += pl->kcb) {
        int64_t kc = moe__gemm_min64(pl->kcb, d->k - pc), kp = moe__gemm_block_pairs(pl, kc);
        if (pl->kind != MOE__GEMM_KIND_F32) {
            uint32_t *dst = (uint32_t *)job->bp + (pc / 2) * pl->ncs + (j - js) * kp;
            moe__gemm_pack_b_bf16(d, pc, kc, j, nr, dst);
            memset(dst + (kc + 1) / 2 * MOE__GEMM_BNR, 0, (size_t)(kp - (kc + 1) / 2) * MOE__GEMM_BNR * sizeof(uint32_t)); /* AMX's padding */
        } else {
            moe__gemm_pack_b_f32(d, pc, kc, j, nr, job->bp + pc * pl->ncs + (j - js) * kc);
        }
    }
}

/* Pack A panels for rows [i, i+rows) (rows ≤ 8 panels) at row offset off within the
   buffer layout, all K. */
static void moe__gemm_do_pack_a(const moe__gemm_job *job, int64_t i, int64_t rows, int64_t off) {
    const moe__gemm_desc *d = job->d;
    const moe__gemm_plan *pl = &job->pl;
    const int64_t width = pl->pack_a ? pl->mcs : pl->mr, MR = pl->mr;
    int64_t pc, r;
    for (pc = 0; pc < d->k; pc += pl->kcb) {
        int64_t kc = moe__gemm_min64(pl->kcb, d->k - pc), kp = moe__gemm_block_pairs(pl, kc);
#if defined(MOE__GEMM_HAVE_AMX)
        if (pl->kind == MOE__GEMM_KIND_AMX) {
            for (r = 0; r < rows; r += MR)
                moe__gemm_pack_a_amx(d, i + r, moe__gemm_min64(MR, rows - r), pc, kc, (uint32_t *)job->ap + (pc / 2) * width + (off + r) * kp);
            continue;
        }
#endif
        if (pl->kind == MOE__GEMM_KIND_BF16 && d->a_trans) {
            moe__gemm_pack_at_bf16_group(d, i, rows, pc, kc, (uint32_t *)job->ap + (pc / 2) * width + off * kp);
            continue;
        }
        if (pl->kind == MOE__GEMM_KIND_F32 && d->a_trans && !d->a_bf16) {
            float *dst = job->ap + pc * width + off * kc;
            moe__gemm_pack_at_f32_group(d, i, rows, pc, kc, dst);
            if (d->bf16_compute) moe__gemm_round_bf16_inplace(dst, (rows + MR - 1) / MR * MR * kc);
            continue;
        }
        for (r = 0; r < rows; r += MR) {
            int64_t mr = moe__gemm_min64(MR, rows - r);
            if (pl->kind == MOE__GEMM_KIND_BF16)
                moe__gemm_pack_a_bf16(d, i + r, mr, pc, kc, (uint32_t *)job->ap + (pc / 2) * width + (off + r) * kp);
            else
                moe__gemm_pack_a_f32(d, i + r, mr, pc, kc, job->ap + pc * width + (off + r) * kc);
        }
    }
}

/* The FP32 kernels' A for rows [ir, ir + MR) from K offset pc: packed, the packed row tail,
   or in place (Aᵀ or A). */
static const float *moe__gemm_a_panel(const moe__gemm_job *job, int64_t is, int64_t ir, int64_t pc, int64_t kc, int64_t *rsa,
                                      int64_t *csa) {
    const moe__gemm_desc *d = job->d;
    const moe__gemm_plan *pl = &job->pl;
    const int64_t width = pl->pack_a ? pl->mcs : pl->mr, mfull = d->m / pl->mr * pl->mr;
    *rsa = 1;
    *csa = MOE__GEMM_MR;
    if (pl->pack_a) return job->ap + pc * width + (ir - is) * kc;
    if (ir >= mfull) return job->ap + pc * width;
    if (d->a_trans) {
        *csa = d->lda;
        return (const float *)d->a + pc * d->lda + ir;
    }
    *rsa = d->lda;
    *csa = 1;
    return (const float *)d->a + ir * d->lda + pc;
}

/* C[i0:i1, jr:jr+nr) for the K block at pc, one micro-panel of B: whole tiles in place, edge
   tiles through the temporary tile (the same kernel either way). */
static void moe__gemm_panel_rows(const moe__gemm_job *job, float *tile, int64_t is, int64_t js, int64_t i0, int64_t i1, int64_t jr,
                                 int64_t nr, int64_t pc, int64_t kc, int mode) {
    const moe__gemm_desc *d = job->d;
    const moe__gemm_plan *pl = &job->pl;
    const int MR = pl->mr, NR = pl->nr;
    const int64_t ldc = d->ldc;
    int64_t ir, i;
    for (ir = i0; ir < i1; ir += MR) {
        const int64_t mr = moe__gemm_min64(MR, i1 - ir);
        float *cp = d->c + ir * ldc + jr, *ct = cp;
        int64_t ldt = ldc;
        if (mr < MR || nr < NR) {
            ct = tile;
            ldt = NR;
            if (mode != 0)
                for (i = 0; i < mr; i++) memcpy(tile + i * NR, cp + i * ldc, (size_t)nr * sizeof(float));
        }
#if defined(MOE__GEMM_HAVE_BF16DP)
        if (pl->kind != MOE__GEMM_KIND_F32) {
            const int64_t kp = moe__gemm_block_pairs(pl, kc), width = pl->pack_a ? pl->mcs : pl->mr;
            const uint32_t *ap = (const uint32_t *)job->ap + (pc / 2) * width + (ir - is) * kp;
            const uint32_t *bp = (const uint32_t *)job->bp + (pc / 2) * pl->ncs + (jr - js) * kp;
#if defined(MOE__GEMM_HAVE_AMX)
            if (pl->kind == MOE__GEMM_KIND_AMX) moe__gemm_kern_amx(kp, ap, bp, ct, ldt, d->alpha, d->beta, mode);
            else
#endif
                moe__gemm_kern_bf16(kp, ap, bp, ct, ldt, d->alpha, d->beta, mode);
        } else
#endif
        {
            int64_t rsa, csa;
            const float *ap = moe__gemm_a_panel(job, is, ir, pc, kc, &rsa, &csa);
            moe__gemm_kern_avx2(kc, ap, rsa, csa, job->bp + pc * pl->ncs + (jr - js) * kc, ct, ldt, d->alpha, d->beta, mode);
        }
        if (ct == tile)
            for (i = 0; i < mr; i++) memcpy(cp + i * ldc, tile + i * NR, (size_t)nr * sizeof(float));
    }
}

/* Compute C[i0:i1, j0:j1] over all of K (super-block origin is, super-panel origin js). */
static void moe__gemm_do_unit(const moe__gemm_job *job, float *tile, int64_t is, int64_t js, int64_t i0, int64_t i1,
                              int64_t j0, int64_t j1) {
    const moe__gemm_desc *d = job->d;
    const moe__gemm_plan *pl = &job->pl;
    const int64_t NR = pl->nr;
    int64_t pc, jr;
    for (pc = 0; pc < d->k; pc += pl->kcb) {
        const int64_t kc = moe__gemm_min64(pl->kcb, d->k - pc);
        const int mode = pc > 0 ? 2 : (d->beta == 0.0f ? 0 : 1);
        for (jr = j0; jr < j1; jr += NR) {
            int64_t nr = moe__gemm_min64(NR, j1 - jr), iz = i0;
#if defined(MOE__GEMM_HAVE_AVX512)
            if (job->zmm && pl->kind == MOE__GEMM_KIND_F32 && j1 - jr >= 2 * NR) { /* two panels, whole row tiles */
                const float *bp = job->bp + pc * pl->ncs + (jr - js) * kc;
                for (; iz + pl->mr <= i1; iz += pl->mr) {
                    int64_t rsa, csa;
                    const float *ap = moe__gemm_a_panel(job, is, iz, pc, kc, &rsa, &csa);
                    moe__gemm_kern_zmm(kc, ap, rsa, csa, bp, bp + NR * kc, d->c + iz * d->ldc + jr, d->ldc, d->alpha, d->beta, mode);
                }
                moe__gemm_panel_rows(job, tile, is, js, iz, i1, jr + NR, NR, pc, kc, mode); /* the row tail of the second */
                moe__gemm_panel_rows(job, tile, is, js, iz, i1, jr, NR, pc, kc, mode);      /* and of the first */
                jr += NR;
                continue;
            }
#endif
            moe__gemm_panel_rows(job, tile, is, js, iz, i1, jr, nr, pc, kc, mode);
        }
    }
}

/* Body run by every thread of the team (tid < number of tiles in the workspace). sync: called
   inside our own parallel region (barriers needed); 0 when called directly by the caller's
   thread, which may itself be inside someone else's parallel region: no barrier may bind there. */
static void moe__gemm_body(moe__gemm_job *job, int tid, int sync) {
    const moe__gemm_desc *d = job->d;
    const moe__gemm_plan *pl = &job->pl;
    const int64_t MR = pl->mr, NR = pl->nr, m = d->m, n = d->n;
    float *tile = job->tiles + (size_t)tid * (pl->t_bytes / sizeof(float));
    int64_t mine = -1, base = 0, is, js, u;
#ifdef _OPENMP
    double tw = tid == 0 ? omp_get_wtime() : 0.0;
#endif
    (void)sync;
    memset(tile, 0, pl->t_bytes);
#if defined(MOE__GEMM_HAVE_AMX)
    if (pl->kind == MOE__GEMM_KIND_AMX) moe__gemm_amx_begin();
#endif
    for (is = 0; is < m; is += pl->mcs) {
        const int64_t msz = moe__gemm_min64(pl->mcs, m - is);
        for (js = 0; js < n; js += pl->ncs) {
            const int64_t nsz = moe__gemm_min64(pl->ncs, n - js);
            const int64_t nbp = (nsz + NR - 1) / NR;
            int64_t nap = 0, nur, nuc, cnt;
            if (js == 0) {
                if (pl->pack_a) nap = (msz + 8 * MR - 1) / (8 * MR);
                else if (m % MR) nap = 1; /* the row tail, packed once */
            }
            cnt = nbp + nap;
            while (moe__gemm_take(job, &mine, base, cnt, &u)) {
                if (u < nbp) {
                    int64_t j = js + u * NR;
                    moe__gemm_do_pack_b(job, js, j, moe__gemm_min64(NR, js + nsz - j));
                } else if (pl->pack_a) {
                    int64_t i = is + (u - nbp) * 8 * MR;
                    moe__gemm_do_pack_a(job, i, moe__gemm_min64(8 * MR, is + msz - i), i - is);
                } else {
                    moe__gemm_do_pack_a(job, m / MR * MR, m % MR, 0);
                }
            }
            base += cnt;
#ifdef _OPENMP
            if (sync) {
                if (tid == 0) job->busy0 += omp_get_wtime() - tw;
#pragma omp barrier
                if (tid == 0) tw = omp_get_wtime();
            }
#endif
            nur = (msz + job->mcu - 1) / job->mcu;
            nuc = (nsz + job->ncu - 1) / job->ncu;
            cnt = nur * nuc;
            while (moe__gemm_take(job, &mine, base, cnt, &u)) {
                int64_t ur = u % nur, uc = u / nur;
                int64_t i0 = is + ur * job->mcu, j0 = js + uc * job->ncu;
                moe__gemm_do_unit(job, tile, is, js, i0, moe__gemm_min64(i0 + job->mcu, is + msz), j0,
                                  moe__gemm_min64(j0 + job->ncu, js + nsz));
            }
            base += cnt;
#ifdef _OPENMP
            if (sync) {
                if (tid == 0) job->busy0 += omp_get_wtime() - tw;
#pragma omp barrier
                if (tid == 0) tw = omp_get_wtime();
            }
#endif
        }
    }
#if defined(MOE__GEMM_HAVE_AMX)
    if (pl->kind == MOE__GEMM_KIND_AMX) moe__gemm_amx_end();
#endif
}
#endif

static void moe__gemm_run(const moe__gemm_desc *d, moe__gemm_isa isa, int f32_zmm, int bf16_kernel, int n_threads, void *workspace) {
    int nt = n_threads < 1 ? 1 : n_threads;
    int64_t i, j;
    if (d->m <= 0 || d->n <= 0) return;
    if (d->k <= 0) {
        for (i = 0; i < d->m; i++) {
            moe_real *cr = d->c + i * d->ldc;
            for (j = 0; j < d->n; j++) cr[j] = d->beta == 0 ? 0 : d->beta * cr[j];
        }
        return;
    }
    if ((int)isa > (int)moe__gemm_best_isa()) isa = moe__gemm_best_isa();
    /* small problems: thread start-up and barriers cost more than they give */
    if (2.0 * (double)d->m * (double)d->n * (double)d->k < MOE__GEMM_MT_FLOPS) nt = 1;
#ifndef _OPENMP
    nt = 1;
#endif
    if (isa == MOE__GEMM_SCALAR) {
        if (nt > d->m) nt = (int)d->m;
        if (nt <= 1) {
            moe__gemm_scalar_rows(d, 0, d->m);
        } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
            {
                int t, team = omp_get_num_threads(), tid = omp_get_thread_num();
                for (t = tid; t < nt; t += team) moe__gemm_scalar_rows(d, d->m * t / nt, d->m * (t + 1) / nt);
            }
#endif
        }
        (void)workspace;
        return;
    }
#if defined(MOE__GEMM_HAVE_AVX2)
    {
        moe__gemm_job job;
        unsigned char *ws = (unsigned char *)workspace;
        int kind = MOE__GEMM_KIND_F32;
        int64_t units;
        if (isa == MOE__GEMM_AVX512 && d->bf16_compute) {
#if defined(MOE__GEMM_HAVE_BF16DP)
            if (bf16_kernel == MOE__BF16_DP) kind = MOE__GEMM_KIND_BF16;
#endif
#if defined(MOE__GEMM_HAVE_AMX)
            if (bf16_kernel == MOE__BF16_AMX) kind = MOE__GEMM_KIND_AMX;
#endif
        }
        (void)bf16_kernel;
        job.d = d;
        moe__gemm_make_plan(d, kind, &job.pl);
        ws += (64u - (unsigned)((uintptr_t)ws & 63u)) & 63u;
        job.bp = (float *)(void *)ws;
        job.ap = (float *)(void *)(ws + job.pl.b_bytes);
        job.tiles = (float *)(void *)(ws + job.pl.b_bytes + job.pl.a_bytes);
        job.counter = 0;
        job.busy0 = 0.0;
        job.zmm = f32_zmm;
        /* compute units: smaller ones when there are too few to balance the threads */
        job.mcu = moe__gemm_rup(MOE__GEMM_MCU, job.pl.mr);
        job.ncu = MOE__GEMM_NCU;
        for (;;) {
            units = ((moe__gemm_min64(d->m, job.pl.mcs) + job.mcu - 1) / job.mcu) *
                    ((moe__gemm_min64(d->n, job.pl.ncs) + job.ncu - 1) / job.ncu);
            if (nt <= 1 || units >= MOE__GEMM_UNITS_PER_THREAD * (int64_t)nt) break;
            if (job.mcu > 24 && job.mcu > job.pl.mr) /* halved, a multiple of the kernel's rows: 96, 48, 24 or 96, 32 */
                job.mcu = moe__gemm_max64(job.pl.mr, job.mcu / (2 * job.pl.mr) * job.pl.mr);
            else if (job.ncu > 32) job.ncu /= 2;
            else break;
        }
        if ((int64_t)nt > units) nt = (int)units;
#ifdef _OPENMP
        if (d->backoff && nt > 1 && omp_get_wtime() < d->backoff[0]) nt = 1;
#endif
        if (nt <= 1) {
            moe__gemm_body(&job, 0, 0);
        } else {
#ifdef _OPENMP
            double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt)
            moe__gemm_body(&job, omp_get_thread_num(), 1);
            if (d->backoff) moe__gemm_backoff_note(d->backoff, omp_get_wtime() - t0, job.busy0);
#endif
        }
    }
#else
    (void)workspace;
    (void)f32_zmm;
    (void)bf16_kernel;
#endif
}

/* ---- workspaces ----
   A product at the top level packs into the context's workspace (grown to the largest call
   and kept); a product inside a parallel loop over groups (one expert per thread) uses its
   thread's slot, reserved before the loop, since the step arena is not thread-safe. */

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

/* Make sure *base holds a slot of at least `bytes` for each of the context's threads. */
/* At least `bytes` for each of the context's threads (the slots only grow). */
static moe_status moe__reserve_thread_slots(moe_ctx *ctx, moe__thread_slots *s, size_t bytes, const char *what) {
    size_t total;
    void *p;
    if (bytes <= s->slot && ctx->conf.n_threads <= s->count) return MOE_OK;
    bytes = bytes > s->slot ? (bytes + MOE__ALIGN - 1) / MOE__ALIGN * MOE__ALIGN : s->slot;
    if (moe__mul_overflows(bytes, (size_t)ctx->conf.n_threads, &total))
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: per-thread memory size overflows", what);
    p = moe__heap_alloc(ctx, total);
    if (!p) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for per-thread slots", what);
    MOE_FREE(s->base);
    s->base = p;
    s->slot = bytes;
    s->count = ctx->conf.n_threads;
    return MOE_OK;
}
/* Thread tid's slot if it holds `bytes` (NULL: the loop's owner did not reserve it). */
static void *moe__thread_slot(const moe__thread_slots *s, int tid, size_t bytes) {
    return tid < s->count && bytes <= s->slot ? (char *)s->base + (size_t)tid * s->slot : NULL;
}

/* One product on the engine: at the top level with the context's threads (tid < 0), or on
   thread tid of a parallel loop with its slot. */
static moe_status moe__gemm_engine(moe_ctx *ctx, const moe__gemm_desc *d, int tid) {
    moe__gemm_isa isa = ctx->conf.simd ? moe__gemm_best_isa() : MOE__GEMM_SCALAR;
    void *ws = NULL;
    if (d->m == 0 || d->n == 0) return MOE_OK;
#if defined(MOE_CBLAS) && !defined(MOE_REAL_F64)
    if (tid < 0 && ctx->conf.simd && !d->bf16_compute && !d->a_bf16 && !d->b_bf16) {
        cblas_sgemm(CblasRowMajor, d->a_trans ? CblasTrans : CblasNoTrans, d->b_trans ? CblasTrans : CblasNoTrans, (int)d->m,
                    (int)d->n, (int)d->k, d->alpha, (const float *)d->a, (int)d->lda, (const float *)d->b, (int)d->ldb, d->beta,
                    d->c, (int)d->ldc);
        return MOE_OK;
    }
#endif
    if (isa != MOE__GEMM_SCALAR) {
        if (tid >= 0) {
            ws = moe__thread_slot(&ctx->gemm_tws, tid, moe__gemm_workspace_bytes(d, 1));
            if (!ws) return MOE_ERR_STATE; /* the loop's owner reports it */
        } else {
            ws = moe__gemm_workspace(ctx, moe__gemm_workspace_bytes(d, ctx->conf.n_threads));
            if (!ws) return moe__fail(ctx, MOE_ERR_MEMORY, "gemm: out of memory for the packing workspace");
        }
    }
    moe__gemm_run(d, isa, isa == MOE__GEMM_AVX512 && ctx->conf.f32_zmm, ctx->conf.bf16_kernel, tid >= 0 ? 1 : ctx->conf.n_threads, ws);
    return MOE_OK;
}

/* ---- a few rows: dot products ----
   Decoding multiplies one to a few rows by a weight matrix, where packing the weights would
   cost more than the product. Up to MOE__GEMM_SMALL rows of FP32, C = A·Bᵀ runs as dot
   products of 8 interleaved partial sums, 8 output rows at a time (one 8-lane accumulator per
   output in AVX2), and C = A·B as rows of B added in order. Every element's arithmetic is the
   same whatever the number of rows, so a verification pass over 1 + k tokens gives bit for
   bit the values k + 1 single-token steps would. */

#define MOE__GEMM_SMALL 8

/* Σ a[i]·b[i] in 8 interleaved partial sums p_l (i ≡ l mod 8), added pairwise
   ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)), then the tail in order. */
static moe_real moe__dot8x(const moe_real *MOE_RESTRICT a, const moe_real *MOE_RESTRICT b, int64_t n) {
    moe_real p[8], s;
    int64_t i, l;
    for (l = 0; l < 8; l++) p[l] = 0;
    for (i = 0; i + 8 <= n; i += 8)
        for (l = 0; l < 8; l++) p[l] += a[i + l] * b[i + l];
    s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#ifdef MOE__SIMD_AVX2
/* y[r] = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)) of accumulator a_r's lanes, for
   r < 8: two rounds of horizontal adds and one add of the halves do all 8 rows together. */
static void moe__dot8x8_finish(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7,
                               float *y) {
    /* lanes of u0: (p0 + p1) + (p2 + p3) of rows 0-3, then (p4 + p5) + (p6 + p7) of rows 0-3 */
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}

/* y[r] = moe__dot8x(x, W + r·ldw, n) for r < 8, bit for bit. */
static void moe__dot8x8(const float *x, const float *W, int64_t ldw, int64_t n, float *y) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t i, r;
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        const float *w = W + i;
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(xv, _mm256_loadu_ps(w)));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(xv, _mm256_loadu_ps(w + ldw)));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(xv, _mm256_loadu_ps(w + 2 * ldw)));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(xv, _mm256_loadu_ps(w + 3 * ldw)));
        a4 = _mm256_add_ps(a4, _mm256_mul_ps(xv, _mm256_loadu_ps(w + 4 * ldw)));
        a5 = _mm256_add_ps(a5, _mm256_mul_ps(xv, _mm256_loadu_ps(w + 5 * ldw)));
        a6 = _mm256_add_ps(a6, _mm256_mul_ps(xv, _mm256_loadu_ps(w + 6 * ldw)));
        a7 = _mm256_add_ps(a7, _mm256_mul_ps(xv, _mm256_loadu_ps(w + 7 * ldw)));
    }
    moe__dot8x8_finish(a0, a1, a2, a3, a4, a5, a6, a7, y);
    for (; i < n; i++)
        for (r = 0; r < 8; r++) y[r] += x[i] * W[r * ldw + i];
}

/* moe__dot8x8 for two rows x and z at once (y and yz), each weight loaded once for both:
   the same arithmetic per output, bit for bit (a verification pass over 1 + k tokens reads
   the weights once per two tokens). */
static void moe__dot8x8_rows2(const float *x, const float *z, const float *W, int64_t ldw, int64_t n, float *y, float *yz) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0;
    int64_t i, r;
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i), zv = _mm256_loadu_ps(z + i);
        const float *w = W + i;
        __m256 wv;
#define MOE__ROWS2(k, ak, bk)                                  \
        wv = _mm256_loadu_ps(w + (k) * ldw);                   \
        ak = _mm256_add_ps(ak, _mm256_mul_ps(xv, wv));         \
        bk = _mm256_add_ps(bk, _mm256_mul_ps(zv, wv));
        MOE__ROWS2(0, a0, b0) MOE__ROWS2(1, a1, b1) MOE__ROWS2(2, a2, b2) MOE__ROWS2(3, a3, b3)
        MOE__ROWS2(4, a4, b4) MOE__ROWS2(5, a5, b5) MOE__ROWS2(6, a6, b6) MOE__ROWS2(7, a7, b7)
#undef MOE__ROWS2
    }
    moe__dot8x8_finish(a0, a1, a2, a3, a4, a5, a6, a7, y);
    moe__dot8x8_finish(b0, b1, b2, b3, b4, b5, b6, b7, yz);
    for (; i < n; i++)
        for (r = 0; r < 8; r++) {
            y[r] += x[i] * W[r * ldw + i];
            yz[r] += z[i] * W[r * ldw + i];
        }
}
#endif

/* c[j] = Σ_p (alpha·a[p])·B[p·ldb + j] for j in [j0, j1), or c[j] + that sum when
   `accumulate`: the rows of B added to the sums in order, 32 or 8 columns of sums held in
   registers (every column's arithmetic is the same whichever block holds it). */
static void moe__rows_sum(const moe_real *MOE_RESTRICT a, const moe_real *MOE_RESTRICT B, int64_t ldb, int64_t k,
                          moe_real alpha, int accumulate, moe_real *MOE_RESTRICT c, int64_t j0, int64_t j1) {
    int64_t j = j0, p;
#ifdef MOE__SIMD_AVX2
    for (; j + 32 <= j1; j += 32) {
        __m256 c0 = accumulate ? _mm256_loadu_ps(c + j) : _mm256_setzero_ps();
        __m256 c1 = accumulate ? _mm256_loadu_ps(c + j + 8) : _mm256_setzero_ps();
        __m256 c2 = accumulate ? _mm256_loadu_ps(c + j + 16) : _mm256_setzero_ps();
        __m256 c3 = accumulate ? _mm256_loadu_ps(c + j + 24) : _mm256_setzero_ps();
        for (p = 0; p < k; p++) {
            const __m256 av = _mm256_set1_ps(alpha * a[p]);
            const float *b = B + p * ldb + j;
            c0 = _mm256_add_ps(c0, _mm256_mul_ps(av, _mm256_loadu_ps(b)));
            c1 = _mm256_add_ps(c1, _mm256_mul_ps(av, _mm256_loadu_ps(b + 8)));
            c2 = _mm256_add_ps(c2, _mm256_mul_ps(av, _mm256_loadu_ps(b + 16)));
            c3 = _mm256_add_ps(c3, _mm256_mul_ps(av, _mm256_loadu_ps(b + 24)));
        }
        _mm256_storeu_ps(c + j, c0);
        _mm256_storeu_ps(c + j + 8, c1);
        _mm256_storeu_ps(c + j + 16, c2);
        _mm256_storeu_ps(c + j + 24, c3);
    }
    for (; j + 8 <= j1; j += 8) {
        __m256 c0 = accumulate ? _mm256_loadu_ps(c + j) : _mm256_setzero_ps();
        for (p = 0; p < k; p++) c0 = _mm256_add_ps(c0, _mm256_mul_ps(_mm256_set1_ps(alpha * a[p]), _mm256_loadu_ps(B + p * ldb + j)));
        _mm256_storeu_ps(c + j, c0);
    }
#endif
    for (; j < j1; j++) {
        moe_real s = accumulate ? c[j] : 0;
        for (p = 0; p < k; p++) s += (alpha * a[p]) * B[p * ldb + j];
        c[j] = s;
    }
}

/* Output columns [j0, j1) of a small product (j0 a multiple of 8). */
static void moe__gemm_small_cols(const moe__gemm_desc *d, int64_t j0, int64_t j1) {
    const moe_real *A = (const moe_real *)d->a, *B = (const moe_real *)d->b;
    const int64_t k = d->k, ldb = d->ldb;
    const moe_real alpha = d->alpha, beta = d->beta;
    int64_t t, j;
    for (t = 0; t < d->m; t++) {
        const moe_real *a = A + t * d->lda;
        moe_real *c = d->c + t * d->ldc;
        if (!d->b_trans) {
            moe__rows_sum(a, B, ldb, k, alpha, beta != 0, c, j0, j1);
            continue;
        }
        j = j0;
#ifdef MOE__SIMD_AVX2
        if (alpha == 1 && beta == 0 && t + 1 < d->m) { /* two rows at once, the sums straight to C */
            const moe_real *a2 = a + d->lda;
            moe_real *c2 = c + d->ldc;
            for (; j + 8 <= j1; j += 8) moe__dot8x8_rows2(a, a2, B + j * ldb, ldb, k, c + j, c2 + j);
            for (; j < j1; j++) {
                c[j] = moe__dot8x(a, B + j * ldb, k);
                c2[j] = moe__dot8x(a2, B + j * ldb, k);
            }
            t++;
            continue;
        }
        if (alpha == 1 && beta == 0) /* C = A·Bᵀ: the sums go straight to C */
            for (; j + 8 <= j1; j += 8) moe__dot8x8(a, B + j * ldb, ldb, k, c + j);
        for (; j + 8 <= j1; j += 8) {
            moe_real y[8];
            int l;
            moe__dot8x8(a, B + j * ldb, ldb, k, y);
            for (l = 0; l < 8; l++) c[j + l] = beta == 0 ? alpha * y[l] : alpha * y[l] + c[j + l];
        }
#endif
        for (; j < j1; j++) {
            moe_real y = moe__dot8x(a, B + j * ldb, k);
            c[j] = beta == 0 ? alpha * y : alpha * y + c[j];
        }
    }
}
static void moe__gemm_small_range(void *arg, int64_t b0, int64_t b1, int tid) {
    const moe__gemm_desc *d = (const moe__gemm_desc *)arg;
    (void)tid;
    moe__gemm_small_cols(d, b0 * 8, b1 * 8 < d->n ? b1 * 8 : d->n);
}

/* ---- FP8 products (reference §5) ----
   An FP8 product quantises each operand as its role says, into memory of its own (the step
   arena, or the thread's slot in a parallel loop), then multiplies the dequantised values:
   with power-of-two scales (the default) each is a 4-bit significand times a power of two,
   exactly a BF16 value, so the BF16 kernel's products are exact and its sums FP32, as an
   FP32 kernel's would be, at twice the speed (values below 2^-126, which only tiles with an
   amax below 2^-117 hold, count as zero there). */

/* Bytes of moe__fp8_operand's memory for a [rows, cols] operand, any grouping. */
static size_t moe__fp8_operand_bytes(int64_t rows, int64_t cols) {
    return ((size_t)(rows * cols) * (sizeof(moe_real) + sizeof(float)) + 2 * MOE__ALIGN) / MOE__ALIGN * MOE__ALIGN;
}

/* moe_fp8_options.stats: add operand x's quantisation error to the context's statistics, for
   the scaling in use (xq, its dequantised values) and for the other one, quantised here
   into a heap buffer (the operand is left out when there is no memory for it). */
static void moe__fp8_count(moe_ctx *ctx, const moe_real *x, int64_t ldx, const moe_real *xq, int64_t rows, int64_t cols,
                           moe__fp8_group g, moe_fp8_role role) {
    int64_t n = rows * cols, gr, gc, r, c, nz_rows = 0, zeroed = 0, zeroed_other = 0;
    int per_tensor = ctx->conf.fp8.per_tensor;
    moe_real *other;
    double sum_sq = 0, err = 0, err_other = 0, row_rel = 0, row_rel_other = 0;
    moe_fp8_stats *st = &ctx->fp8_stats;
    moe__fp8_group_dims(ctx->conf.fp8.block, !per_tensor, g, rows, cols, &gr, &gc);
    other = (moe_real *)MOE_MALLOC((size_t)n * sizeof(moe_real) + (size_t)(((rows + gr - 1) / gr) * ((cols + gc - 1) / gc)) * sizeof(float));
    if (!other) return;
    moe__fp8_quantize_groups(x, ldx, rows, cols, gr, gc, !ctx->conf.fp8.amax_scales, NULL, (float *)(void *)(other + n), other,
                             0, (rows + gr - 1) / gr);
    for (r = 0; r < rows; r++) {
        double ss = 0, e = 0, e_other = 0;
        for (c = 0; c < cols; c++) {
            double v = (double)x[r * ldx + c], dq = v - (double)xq[r * cols + c], d_other = v - (double)other[r * cols + c];
            ss += v * v;
            e += dq * dq;
            e_other += d_other * d_other;
            zeroed += v != 0 && xq[r * cols + c] == 0;
            zeroed_other += v != 0 && other[r * cols + c] == 0;
        }
        sum_sq += ss;
        err += e;
        err_other += e_other;
        if (ss > 0) {
            nz_rows++;
            row_rel += e / ss;
            row_rel_other += e_other / ss;
        }
    }
    MOE_FREE(other);
    MOE__OMP(omp critical(moe__fp8_stats_update))
    {
        ctx->heap_allocs++;
        st->values[role] += n;
        st->rows[role] += nz_rows;
        st->sum_sq[role] += sum_sq;
        st->err_sq_tiles[role] += per_tensor ? err_other : err;
        st->err_sq_tensor[role] += per_tensor ? err : err_other;
        st->row_rel_sq_tiles[role] += per_tensor ? row_rel_other : row_rel;
        st->row_rel_sq_tensor[role] += per_tensor ? row_rel : row_rel_other;
        st->zeroed_tiles[role] += per_tensor ? zeroed_other : zeroed;
        st->zeroed_tensor[role] += per_tensor ? zeroed : zeroed_other;
    }
}

/* The FP8 form of an operand x [rows, cols] (row stride ldx) in role `role`, as the GEMM
   multiplies it (dequantised values, row stride cols), placed at *mem
   (moe__fp8_operand_bytes of it; *mem moves past it). */
static const moe_real *moe__fp8_operand(moe_ctx *ctx, const moe_real *x, int64_t ldx, int64_t rows, int64_t cols,
                                        moe_fp8_role role, char **mem) {
    int64_t gr, gc;
    moe_real *out = (moe_real *)(void *)*mem;
    float *scales = (float *)(void *)(*mem + (size_t)(rows * cols) * sizeof(moe_real));
    moe__fp8_group g = moe__fp8_role_group(role);
    int pow2 = moe__fp8_group_shape(ctx, g, rows, cols, &gr, &gc);
    moe__fp8_quantize_groups(x, ldx, rows, cols, gr, gc, pow2, NULL, scales, out, 0, (rows + gr - 1) / gr);
    if (ctx->conf.fp8.stats) moe__fp8_count(ctx, x, ldx, out, rows, cols, g, role);
    *mem += moe__fp8_operand_bytes(rows, cols);
    return out;
}

/* v rounded toward zero to `bits` significant bits. */
static float moe__keep_bits(float v, int bits) {
    uint32_t u;
    if (bits >= 24) return v;
    memcpy(&u, &v, sizeof u);
    u &= ~((1u << (24 - bits)) - 1u);
    memcpy(&v, &u, sizeof v);
    return v;
}

/* C = op(A)·op(B) (+ C) where every product is added to a partial sum that keeps only `bits`
   significant bits (an emulation of a tensor-core FP8 accumulator), and the partial sum is
   promoted to an FP32 accumulator every `interval` products (−1: once, at the end). Scalar
   and slow: it exists to study the effect, not to train fast. */
static void moe__gemm_limited_acc(const moe__gemm_desc *d, int bits, int interval) {
    const moe_real *A = (const moe_real *)d->a, *B = (const moe_real *)d->b;
    int64_t i, j, p;
    for (i = 0; i < d->m; i++)
        for (j = 0; j < d->n; j++) {
            float acc = 0.0f, part = 0.0f;
            for (p = 0; p < d->k; p++) {
                float a = (float)(d->a_trans ? A[p * d->lda + i] : A[i * d->lda + p]);
                float b = (float)(d->b_trans ? B[j * d->ldb + p] : B[p * d->ldb + j]);
                part = moe__keep_bits(part + a * b, bits);
                if (interval > 0 && (p + 1) % interval == 0) {
                    acc += part;
                    part = 0.0f;
                }
            }
            acc += part;
            d->c[i * d->ldc + j] = d->alpha * (moe_real)acc + (d->beta != 0 ? d->beta * d->c[i * d->ldc + j] : 0);
        }
}

/* ---- the backend's GEMM entries ---- */

/* The engine's view of product i of op, its token rows [r0, r0 + rows) when grouped. */
static moe__gemm_desc moe__gemm_desc_of(const moe_ctx *ctx, const moe__gemm_op *op, const moe_real *a, const moe_real *b,
                                        moe_real *c, int64_t m, int64_t k) {
    moe__gemm_desc d;
    memset(&d, 0, sizeof d);
    d.m = m; d.n = op->n; d.k = k;
    d.a = a; d.lda = op->lda; d.a_trans = op->trans_a;
    d.b = b; d.ldb = op->ldb; d.b_trans = op->trans_b;
    d.c = c; d.ldc = op->ldc;
    d.alpha = op->alpha;
    d.beta = op->accumulate ? 1 : 0;
    d.bf16_compute = op->precision == MOE_BF16;
    d.backoff = (double *)ctx->gemm_backoff;
    return d;
}

/* One FP8 product: both operands quantised as their roles say, then multiplied (tid as for
   moe__gemm_engine). */
static moe_status moe__gemm_product_fp8(moe_ctx *ctx, const moe__gemm_op *op, const moe__gemm_desc *dp, int tid) {
    moe__gemm_desc d = *dp;
    int64_t ra = d.a_trans ? d.k : d.m, ca = d.a_trans ? d.m : d.k, rb = d.b_trans ? d.n : d.k, cb = d.b_trans ? d.k : d.n;
    size_t bytes = moe__fp8_operand_bytes(ra, ca) + moe__fp8_operand_bytes(rb, cb);
    char *mem;
    if (tid >= 0) {
        mem = (char *)moe__thread_slot(&ctx->fp8_tws, tid, bytes);
        if (!mem) return MOE_ERR_STATE; /* the loop's owner reports it */
    } else {
        mem = (char *)moe__dev_scratch(ctx, (int64_t)bytes, 1, "fp8 operands");
        if (!mem) return MOE_ERR_MEMORY;
    }
    d.a = moe__fp8_operand(ctx, (const moe_real *)d.a, d.lda, ra, ca, op->role_a, &mem);
    d.lda = ca;
    d.b = moe__fp8_operand(ctx, (const moe_real *)d.b, d.ldb, rb, cb, op->role_b, &mem);
    d.ldb = cb;
    if (ctx->conf.fp8.acc_bits > 0) {
        moe__gemm_limited_acc(&d, ctx->conf.fp8.acc_bits, ctx->conf.fp8.acc_interval);
        return MOE_OK;
    }
    d.bf16_compute = !ctx->conf.fp8.amax_scales;
    return moe__gemm_engine(ctx, &d, tid);
}

/* One product in op's precision (tid as for moe__gemm_engine). */
static moe_status moe__gemm_product(moe_ctx *ctx, const moe__gemm_op *op, const moe__gemm_desc *dp, int tid) {
    if (dp->m == 0 || dp->n == 0) return MOE_OK;
    if (op->precision == MOE_FP8_E4M3) return moe__gemm_product_fp8(ctx, op, dp, tid);
    if (ctx->conf.simd && !dp->bf16_compute && dp->m <= MOE__GEMM_SMALL && !dp->a_trans) {
        int64_t blocks = (dp->n + 7) / 8;
        /* a parallel region pays off only from about 2^18 multiply-adds (measured on decode) */
        if (tid >= 0) moe__gemm_small_cols(dp, 0, dp->n);
        else moe__parallel_for(ctx, blocks, (double)(8 * dp->m * dp->k) / 16.0, 0, moe__gemm_small_range, (void *)dp);
        return MOE_OK;
    }
    return moe__gemm_engine(ctx, dp, tid);
}

static moe_status moe__gemm_check(moe_ctx *ctx, const char *fn, const moe__gemm_op *op) {
    if (op->m < 0 || op->n < 0 || op->k < 0 || op->batch < 1)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: bad sizes m=%lld n=%lld k=%lld batch=%lld", fn, (long long)op->m,
                         (long long)op->n, (long long)op->k, (long long)op->batch);
    if (op->precision != MOE_F32 && op->precision != MOE_BF16 && op->precision != MOE_FP8_E4M3)
        return moe__fail(ctx, MOE_ERR_DTYPE, "%s: precision %s", fn, moe_dtype_name(op->precision));
    if (op->lda < (op->trans_a ? op->m : op->k) || op->ldb < (op->trans_b ? op->k : op->n) || op->ldc < op->n)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: a leading dimension is smaller than its row", fn);
    return MOE_OK;
}

static moe_status moe__cpu_gemm(moe_ctx *ctx, const moe__gemm_op *op) {
    moe__gemm_desc d = moe__gemm_desc_of(ctx, op, op->a, op->b, op->c, op->m, op->k);
    int64_t i;
    MOE__TRY(moe__gemm_check(ctx, "gemm", op));
    for (i = 0; i < op->batch; i++) {
        d.a = op->a + i * op->stride_a;
        d.b = op->b + i * op->stride_b;
        d.c = op->c + i * op->stride_c;
        MOE__TRY(moe__gemm_product(ctx, op, &d, -1));
    }
    return MOE_OK;
}

/* A grouped product: groups run in parallel, each on one thread (its GEMMs single-threaded,
   so no result depends on the thread count); one group alone gets all the threads. */
typedef struct moe__gemm_groups {
    moe_ctx *ctx;
    const moe__gemm_op *op;
    const int64_t *off;
    int group_k;
    moe_status *st;
} moe__gemm_groups;

static moe__gemm_desc moe__gemm_group_desc(const moe__gemm_groups *G, int64_t e) {
    const moe__gemm_op *op = G->op;
    int64_t r0 = G->off[e], rows = G->off[e + 1] - r0;
    if (G->group_k) /* dC_e = op(A_e)·B_e over the group's token rows: A is [tokens, m] (trans_a), B [tokens, n] */
        return moe__gemm_desc_of(G->ctx, op, op->a + r0 * op->lda, op->b + r0 * op->ldb, op->c + e * op->stride_c, op->m, rows);
    return moe__gemm_desc_of(G->ctx, op, op->a + r0 * op->lda, op->b + e * op->stride_b, op->c + r0 * op->ldc, rows, op->k);
}
#define MOE__GROUPS_ON_STACK 64 /* the statuses of up to this many groups need no step memory */
static void moe__gemm_group_range(void *arg, int64_t e0, int64_t e1, int tid) {
    const moe__gemm_groups *G = (const moe__gemm_groups *)arg;
    int64_t e;
    for (e = e0; e < e1; e++)
        if (G->off[e + 1] > G->off[e] || (G->group_k && !G->op->accumulate)) { /* no tokens: dC_e = 0 */
            moe__gemm_desc d = moe__gemm_group_desc(G, e);
            G->st[e] = moe__gemm_product(G->ctx, G->op, &d, tid);
        }
}

static moe_status moe__cpu_gemm_grouped(moe_ctx *ctx, const moe__gemm_op *op, int64_t groups, const int64_t *host_offsets,
                                        int group_k) {
    moe_status st_local[MOE__GROUPS_ON_STACK];
    moe__gemm_groups G;
    double flops;
    int64_t e, rows;
    MOE__TRY(moe__gemm_check(ctx, "gemm_grouped", op));
    if (groups < 1 || !host_offsets || op->batch != 1 || (group_k && (!op->trans_a || op->trans_b)) || (!group_k && op->trans_a))
        return moe__fail(ctx, MOE_ERR_ARG, "gemm_grouped: want groups >= 1 with offsets, batch 1, and token rows in A");
    G.ctx = ctx;
    G.op = op;
    G.off = host_offsets;
    G.group_k = group_k;
    if (groups == 1) {
        moe__gemm_desc d = moe__gemm_group_desc(&G, 0);
        return moe__gemm_product(ctx, op, &d, -1);
    }
    G.st = groups <= MOE__GROUPS_ON_STACK ? st_local
                                          : (moe_status *)moe__arena_alloc(ctx, (size_t)groups, sizeof(moe_status), "gemm_grouped");
    if (!G.st) return MOE_ERR_MEMORY;
    if (G.st == st_local) memset(st_local, 0, (size_t)groups * sizeof(moe_status));
    rows = host_offsets[groups];
    flops = 2.0 * (double)rows * (double)op->n * (double)(group_k ? op->m : op->k);
    if (!(ctx->conf.simd && op->precision == MOE_F32 && !group_k && rows <= MOE__GEMM_SMALL)) {
        /* Each thread's memory is sized for all the token rows in one group, a bound that does
           not change with the routing: after the first step a training loop allocates nothing.
           (A few rows in all take the dot-product path, which needs none.) */
        moe__gemm_desc d = moe__gemm_desc_of(ctx, op, op->a, op->b, op->c, group_k ? op->m : rows, group_k ? rows : op->k);
        size_t ws = moe__gemm_workspace_bytes(&d, 1), fp8 = 0;
        if (op->precision == MOE_FP8_E4M3) {
            fp8 = moe__fp8_operand_bytes(d.a_trans ? d.k : d.m, d.a_trans ? d.m : d.k) +
                  moe__fp8_operand_bytes(d.b_trans ? d.n : d.k, d.b_trans ? d.k : d.n);
            d.bf16_compute = 1;
            ws = moe__gemm_workspace_bytes(&d, 1);
        }
        MOE__TRY(moe__reserve_thread_slots(ctx, &ctx->gemm_tws, ws, "gemm_grouped"));
        if (fp8) MOE__TRY(moe__reserve_thread_slots(ctx, &ctx->fp8_tws, fp8, "gemm_grouped"));
    }
    moe__parallel_for(ctx, groups, flops / (double)groups / 64.0, 1, moe__gemm_group_range, &G);
    for (e = 0; e < groups; e++)
        if (G.st[e]) return moe__fail(ctx, G.st[e], "gemm_grouped: group %lld failed (%s)", (long long)e, moe_status_name(G.st[e]));
    return MOE_OK;
}

/* ---- the public GEMM (host arrays, f32 or bf16 storage) ---- */

MOE_API moe_status moe_gemm(moe_ctx *ctx, const moe_gemm_args *g) {
    moe__gemm_desc d;
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
    if (sizeof(moe_real) != sizeof(float))
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_gemm: the double-precision build (MOE_REAL_F64) has no float GEMM");
    memset(&d, 0, sizeof d);
    d.m = g->m; d.n = g->n; d.k = g->k;
    d.a = g->a; d.lda = g->lda; d.a_trans = g->trans_a; d.a_bf16 = g->a_dtype == MOE_BF16;
    d.b = g->b; d.ldb = g->ldb; d.b_trans = g->trans_b; d.b_bf16 = g->b_dtype == MOE_BF16;
    d.c = (moe_real *)(void *)g->c; d.ldc = g->ldc;
    d.alpha = (moe_real)g->alpha; d.beta = (moe_real)g->beta;
    d.bf16_compute = g->compute == MOE_BF16;
    d.backoff = ctx->gemm_backoff;
    return moe__gemm_engine(ctx, &d, -1);
}

/* ---- the precision of the layers' GEMMs ---- */

MOE_API moe_status moe_ctx_set_gemm_precision(moe_ctx *ctx, moe_dtype compute) {
    MOE__CHECK_CTX(ctx);
    if (compute != MOE_F32 && compute != MOE_BF16 && compute != MOE_FP8_E4M3)
        return moe__fail(ctx, MOE_ERR_DTYPE, "moe_ctx_set_gemm_precision: want MOE_F32, MOE_BF16 or MOE_FP8_E4M3, got %s",
                         moe_dtype_name(compute));
    ctx->conf.gemm_compute = compute;
    return MOE_OK;
}
MOE_API moe_status moe_ctx_set_fp8(moe_ctx *ctx, const moe_fp8_options *opt) {
    moe_fp8_options o;
    MOE__CHECK_CTX(ctx);
    if (!opt) return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_fp8: options are NULL");
    o = *opt;
    if (o.block == 0) o.block = 128;
    if (o.acc_interval == 0) o.acc_interval = 128;
    if (o.block < 1 || o.block > (1 << 20))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_fp8: block must be in [1, 2^20], got %lld", (long long)o.block);
    if (o.acc_bits < 0 || o.acc_bits > 24)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_fp8: acc_bits must be in [0, 24], got %d", o.acc_bits);
    if (o.acc_interval < -1)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_set_fp8: acc_interval must be -1 (never) or positive, got %d", o.acc_interval);
    ctx->conf.fp8 = o;
    memset(&ctx->fp8_stats, 0, sizeof ctx->fp8_stats);
    return MOE_OK;
}
MOE_API moe_status moe_ctx_fp8_stats(moe_ctx *ctx, moe_fp8_stats *out) {
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_ctx_fp8_stats: out is NULL");
    *out = ctx->fp8_stats;
    return MOE_OK;
}
/* ============================================================================================
   5. cpu — the CPU backend                                                               >>cpu
   ============================================================================================
   Every other entry of the kernel interface for host memory: SIMD row helpers (AVX2, each
   with the same arithmetic in plain C) and the kernels, each an entry function that checks
   what it must, sizes its work, and runs a range body over rows, heads or chunks through
   moe__parallel_for. Sums across rows use fixed chunks of MOE__ROW_CHUNK rows whose partial
   results are added in chunk order, so the thread count never changes a result bit. The
   table of entries closes the section. */

#define MOE__ROW_CHUNK 64 /* rows per partial sum in cross-row reductions */

/* ---- memory: the heap, and the context's step arena ---- */

/* Heap blocks aligned to MOE__ALIGN: the allocation's start is kept just before the block. */
static moe_status moe__cpu_alloc(moe_ctx *ctx, size_t bytes, void **out) {
    unsigned char *raw, *p;
    *out = NULL;
    if (bytes > SIZE_MAX - MOE__ALIGN - sizeof(void *)) return moe__fail(ctx, MOE_ERR_MEMORY, "alloc: size overflows");
    raw = (unsigned char *)moe__heap_alloc(ctx, bytes + MOE__ALIGN + sizeof(void *));
    if (!raw) return moe__fail(ctx, MOE_ERR_MEMORY, "out of memory for %zu bytes", bytes);
    p = (unsigned char *)(((uintptr_t)(raw + sizeof(void *)) + MOE__ALIGN - 1) & ~(uintptr_t)(MOE__ALIGN - 1));
    memcpy(p - sizeof(void *), &raw, sizeof raw);
    memset(p, 0, bytes);
    *out = p;
    return MOE_OK;
}
static void moe__cpu_free(moe_ctx *ctx, void *p) {
    void *raw;
    (void)ctx;
    if (!p) return;
    memcpy(&raw, (unsigned char *)p - sizeof(void *), sizeof raw);
    MOE_FREE(raw);
}
static moe_status moe__cpu_copy(moe_ctx *ctx, void *dst, const void *src, size_t bytes, moe__copy_kind kind) {
    (void)ctx;
    (void)kind; /* host memory all three ways */
    if (bytes) memmove(dst, src, bytes);
    return MOE_OK;
}
static moe_status moe__cpu_memset(moe_ctx *ctx, void *dst, int byte, size_t bytes) {
    (void)ctx;
    if (bytes) memset(dst, byte, bytes);
    return MOE_OK;
}
static moe_status moe__cpu_scratch(moe_ctx *ctx, size_t bytes, void **out) {
    if ((*out = moe__arena_alloc_raw(ctx, bytes)) != NULL) return MOE_OK;
    if (ctx->conf.arena_limit)
        return moe__fail(ctx, MOE_ERR_MEMORY, "step arena limit of %zu bytes reached (%zu in use, %zu more wanted)",
                         ctx->conf.arena_limit, ctx->arena_used, bytes);
    return moe__fail(ctx, MOE_ERR_MEMORY, "out of memory for %zu bytes of step memory", bytes);
}

/* ---- row helpers: max, exp-and-sum, exp-axpy (AVX2, with the same loops in plain C) ------ */

/* max of x[0..n), n ≥ 1 (with a NaN in x it is unspecified: the exp-sums that follow carry the NaN). */
static moe_real moe__row_max(const moe_real *x, int64_t n) {
    moe_real m = x[0];
    int64_t i = 1;
#ifdef MOE__SIMD_AVX2
    if (n >= 8) {
        __m256 vm = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) vm = _mm256_max_ps(_mm256_loadu_ps(x + i), vm);
        m = moe__hmax8(vm);
    }
#endif
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* y[i] = exp(x[i] − shift) (y may be x, or NULL to keep only the sum); returns Σ y[i],
   summed in 8 interleaved partial sums, then the tail: a fixed order for a given n. */
static moe_real moe__row_exp_sum(const moe_real *x, moe_real *y, int64_t n, moe_real shift) {
    moe_real s = 0, e;
    int64_t i = 0;
#ifdef MOE__SIMD_AVX2
    if (n >= 8) {
        const __m256 vs = _mm256_set1_ps(shift);
        __m256 acc = _mm256_setzero_ps(), ev;
#ifdef MOE__SIMD_AVX512
        const __m512 vs16 = _mm512_set1_ps(shift);
        for (; i + 16 <= n; i += 16) {
            __m512 e16 = moe__exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vs16));
            if (y) _mm512_storeu_ps(y + i, e16);
            acc = _mm256_add_ps(_mm256_add_ps(acc, moe__lo8(e16)), moe__hi8(e16));
        }
#endif
        for (; i + 8 <= n; i += 8) {
            ev = moe__exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
            if (y) _mm256_storeu_ps(y + i, ev);
            acc = _mm256_add_ps(acc, ev);
        }
        s = moe__hsum8(acc);
    }
#endif
    for (; i < n; i++) {
        e = moe__exp(x[i] - shift);
        if (y) y[i] = e;
        s += e;
    }
    return s;
}

/* y[i] += a·exp(x[i] − shift) */
static void moe__row_exp_axpy(const moe_real *x, moe_real shift, moe_real a, moe_real *y, int64_t n) {
    int64_t i = 0;
#ifdef MOE__SIMD_AVX2
    const __m256 vs = _mm256_set1_ps(shift), va = _mm256_set1_ps(a);
#ifdef MOE__SIMD_AVX512
    const __m512 vs16 = _mm512_set1_ps(shift), va16 = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_mul_ps(va16, moe__exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vs16)))));
#endif
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(va, moe__exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs)))));
#endif
    for (; i < n; i++) y[i] += a * moe__exp(x[i] - shift);
}

/* y[j] = silu(g[j])·u[j] (u NULL: silu(g[j])), moe_silu_scalar's values. */
static void moe__row_swiglu(const moe_real *g, const moe_real *u, moe_real *y, int64_t n) {
    int64_t j = 0;
#ifdef MOE__SIMD_AVX512
    const __m512 one16 = _mm512_set1_ps(1.0f);
    for (; j + 16 <= n; j += 16) {
        __m512 gv = _mm512_loadu_ps(g + j);
        __m512 sig = _mm512_div_ps(one16, _mm512_add_ps(one16, moe__exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        __m512 sv = _mm512_mul_ps(gv, sig);
        _mm512_storeu_ps(y + j, u ? _mm512_mul_ps(sv, _mm512_loadu_ps(u + j)) : sv);
    }
#endif
#ifdef MOE__SIMD_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= n; j += 8) {
        __m256 gv = _mm256_loadu_ps(g + j);
        __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, moe__exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        __m256 sv = _mm256_mul_ps(gv, sig);
        _mm256_storeu_ps(y + j, u ? _mm256_mul_ps(sv, _mm256_loadu_ps(u + j)) : sv);
    }
#endif
    for (; j < n; j++) y[j] = u ? moe_silu_scalar(g[j]) * u[j] : moe_silu_scalar(g[j]);
}

/* ---- RMSNorm ---------------------------------------------------------------------------- */

typedef struct moe__rmsnorm_job {
    const moe_real *x, *w, *rstd_in, *dy;
    moe_real *y, *rstd, *dx, *partial;
    int64_t ldx, ldy, rows, d;
    moe_real eps;
} moe__rmsnorm_job;

static void moe__rmsnorm_fwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__rmsnorm_job *j = (const moe__rmsnorm_job *)arg;
    int64_t r, i;
    (void)tid;
    for (r = r0; r < r1; r++) {
        const moe_real *xr = j->x + r * j->ldx;
        moe_real *yr = j->y + r * j->ldy, rs = (moe_real)1 / moe__sqrt(moe__dot8x(xr, xr, j->d) / (moe_real)j->d + j->eps);
        if (j->rstd) j->rstd[r] = rs;
        for (i = 0; i < j->d; i++) yr[i] = j->w[i] * (xr[i] * rs);
    }
}
static moe_status moe__cpu_rmsnorm_fwd(moe_ctx *ctx, const moe_real *x, int64_t ldx, const moe_real *w, int64_t rows, int64_t d,
                                       moe_real eps, moe_real *y, int64_t ldy, moe_real *rstd) {
    moe__rmsnorm_job j;
    memset(&j, 0, sizeof j);
    j.x = x; j.ldx = ldx; j.w = w; j.rows = rows; j.d = d; j.eps = eps; j.y = y; j.ldy = ldy; j.rstd = rstd;
    moe__parallel_for(ctx, rows, (double)d, 0, moe__rmsnorm_fwd_rows, &j);
    return MOE_OK;
}

/* Chunks [c0, c1) of MOE__ROW_CHUNK rows: dx rows, and each chunk's dw partial sum. */
static void moe__rmsnorm_bwd_chunks(void *arg, int64_t c0, int64_t c1, int tid) {
    const moe__rmsnorm_job *j = (const moe__rmsnorm_job *)arg;
    const moe_real *w = j->w;
    int64_t c, d = j->d;
    (void)tid;
    for (c = c0; c < c1; c++) {
        int64_t r, i, r1 = (c + 1) * MOE__ROW_CHUNK < j->rows ? (c + 1) * MOE__ROW_CHUNK : j->rows;
        moe_real *pw = j->partial ? j->partial + c * d : NULL;
        if (pw) memset(pw, 0, (size_t)d * sizeof(moe_real));
        for (r = c * MOE__ROW_CHUNK; r < r1; r++) {
            const moe_real *xr = j->x + r * d, *dyr = j->dy + r * d;
            moe_real rs = j->rstd_in[r], dot = 0;
            i = 0;
#ifdef MOE__SIMD_AVX2
            if (d >= 8) { /* Σ (dy⊙w)·(x·rs) in 8 interleaved partial sums */
                const __m256 vrs = _mm256_set1_ps(rs);
                __m256 acc = _mm256_setzero_ps();
                for (; i + 8 <= d; i += 8)
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(dyr + i), _mm256_loadu_ps(w + i)),
                                                           _mm256_mul_ps(_mm256_loadu_ps(xr + i), vrs)));
                dot = moe__hsum8(acc);
            }
#endif
            for (; i < d; i++) dot += dyr[i] * w[i] * (xr[i] * rs);
            dot /= (moe_real)d;
            if (j->dx)
                for (i = 0; i < d; i++) j->dx[r * d + i] += rs * (dyr[i] * w[i] - xr[i] * rs * dot);
            if (pw)
                for (i = 0; i < d; i++) pw[i] += dyr[i] * (xr[i] * rs);
        }
    }
}
static moe_status moe__cpu_rmsnorm_bwd(moe_ctx *ctx, const moe_real *x, const moe_real *w, const moe_real *rstd,
                                       const moe_real *dy, int64_t rows, int64_t d, moe_real *dx, moe_real *dw) {
    moe__rmsnorm_job j;
    int64_t nchunks = (rows + MOE__ROW_CHUNK - 1) / MOE__ROW_CHUNK, c, i;
    memset(&j, 0, sizeof j);
    j.x = x; j.w = w; j.rstd_in = rstd; j.dy = dy; j.rows = rows; j.d = d; j.dx = dx;
    if (dw && !(j.partial = moe__dev_real(ctx, nchunks * d, "rmsnorm backward"))) return MOE_ERR_MEMORY;
    moe__parallel_for(ctx, nchunks, (double)(MOE__ROW_CHUNK * d), 0, moe__rmsnorm_bwd_chunks, &j);
    for (c = 0; dw && c < nchunks; c++)
        for (i = 0; i < d; i++) dw[i] += j.partial[c * d + i];
    return MOE_OK;
}

/* ---- softmax, cross-entropy ------------------------------------------------------------- */

typedef struct moe__rows_job {
    const moe_real *x, *y, *dy, *lse_in;
    const int32_t *targets;
    moe_real *out, *lse, *dx;
    int64_t rows, d;
    int32_t ignore;
    moe_real scale;
} moe__rows_job;

static void moe__softmax_fwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__rows_job *j = (const moe__rows_job *)arg;
    int64_t r, i, d = j->d;
    (void)tid;
    for (r = r0; r < r1; r++) {
        const moe_real *xr = j->x + r * d;
        moe_real *yr = j->out + r * d, s = moe__row_exp_sum(xr, yr, d, moe__row_max(xr, d));
        for (i = 0; i < d; i++) yr[i] /= s;
    }
}
static moe_status moe__cpu_softmax_fwd(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t d, moe_real *y) {
    moe__rows_job j;
    memset(&j, 0, sizeof j);
    j.x = x; j.rows = rows; j.d = d; j.out = y;
    moe__parallel_for(ctx, rows, (double)d, 0, moe__softmax_fwd_rows, &j);
    return MOE_OK;
}
static void moe__softmax_bwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__rows_job *j = (const moe__rows_job *)arg;
    int64_t r, i, d = j->d;
    (void)tid;
    for (r = r0; r < r1; r++) {
        const moe_real *yr = j->y + r * d, *g = j->dy + r * d;
        moe_real dot = 0;
        for (i = 0; i < d; i++) dot += g[i] * yr[i];
        for (i = 0; i < d; i++) j->dx[r * d + i] += yr[i] * (g[i] - dot);
    }
}
static moe_status moe__cpu_softmax_bwd(moe_ctx *ctx, const moe_real *y, const moe_real *dy, int64_t rows, int64_t d,
                                       moe_real *dx) {
    moe__rows_job j;
    memset(&j, 0, sizeof j);
    j.y = y; j.dy = dy; j.rows = rows; j.d = d; j.dx = dx;
    moe__parallel_for(ctx, rows, (double)d, 0, moe__softmax_bwd_rows, &j);
    return MOE_OK;
}

static void moe__xent_fwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__rows_job *j = (const moe__rows_job *)arg;
    int64_t r, v = j->d;
    (void)tid;
    for (r = r0; r < r1; r++) {
        const moe_real *xr = j->x + r * v;
        moe_real m = moe__row_max(xr, v), l = m + moe__ln(moe__row_exp_sum(xr, NULL, v, m));
        j->lse[r] = l;
        j->out[r] = j->targets[r] == j->ignore ? 0 : l - xr[j->targets[r]];
    }
}
static moe_status moe__cpu_xent_fwd(moe_ctx *ctx, const moe_real *x, const int32_t *targets, int32_t ignore, int64_t rows,
                                    int64_t V, moe_real *lse, moe_real *host_sum, int64_t *host_count) {
    moe__rows_job j;
    moe_real total = 0;
    int64_t r, count = 0;
    memset(&j, 0, sizeof j);
    j.x = x; j.targets = targets; j.ignore = ignore; j.rows = rows; j.d = V; j.lse = lse;
    if (!(j.out = moe__dev_real(ctx, rows, "cross-entropy"))) return MOE_ERR_MEMORY;
    moe__parallel_for(ctx, rows, (double)V, 0, moe__xent_fwd_rows, &j);
    for (r = 0; r < rows; r++) {
        total += j.out[r];
        count += targets[r] != ignore;
    }
    *host_sum = total;
    *host_count = count;
    return MOE_OK;
}
static void moe__xent_bwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__rows_job *j = (const moe__rows_job *)arg;
    int64_t r, v = j->d;
    (void)tid;
    for (r = r0; r < r1; r++) {
        if (j->targets[r] == j->ignore) continue;
        moe__row_exp_axpy(j->x + r * v, j->lse_in[r], j->scale, j->dx + r * v, v);
        j->dx[r * v + j->targets[r]] -= j->scale;
    }
}
static moe_status moe__cpu_xent_bwd(moe_ctx *ctx, const moe_real *x, const int32_t *targets, int32_t ignore, const moe_real *lse,
                                    moe_real scale, int64_t rows, int64_t V, moe_real *dx) {
    moe__rows_job j;
    memset(&j, 0, sizeof j);
    j.x = x; j.targets = targets; j.ignore = ignore; j.lse_in = lse; j.scale = scale; j.rows = rows; j.d = V; j.dx = dx;
    moe__parallel_for(ctx, rows, (double)V, 0, moe__xent_bwd_rows, &j);
    return MOE_OK;
}

/* ---- SwiGLU ----------------------------------------------------------------------------- */

typedef struct moe__swiglu_job {
    const moe_real *gate, *up, *dy;
    moe_real *y, *dgate, *dup;
    int64_t ld_in, ld_out, cols;
    int accumulate;
} moe__swiglu_job;

static void moe__swiglu_fwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__swiglu_job *j = (const moe__swiglu_job *)arg;
    int64_t r;
    (void)tid;
    for (r = r0; r < r1; r++)
        moe__row_swiglu(j->gate + r * j->ld_in, j->up ? j->up + r * j->ld_in : NULL, j->y + r * j->ld_out, j->cols);
}
static moe_status moe__cpu_swiglu_fwd(moe_ctx *ctx, const moe_real *gate, const moe_real *up, int64_t ld_in, int64_t rows,
                                      int64_t cols, moe_real *y, int64_t ld_y) {
    moe__swiglu_job j;
    memset(&j, 0, sizeof j);
    j.gate = gate; j.up = up; j.ld_in = ld_in; j.cols = cols; j.y = y; j.ld_out = ld_y;
    moe__parallel_for(ctx, rows, (double)cols, 0, moe__swiglu_fwd_rows, &j);
    return MOE_OK;
}
/* The SwiGLU backward of one row: dg[j] (+)= dy[j]·u[j]·silu'(g[j]), du[j] (+)= dy[j]·silu(g[j])
   (u NULL: 1; dg or du NULL: not wanted), with moe_silu_grad_scalar's and moe_silu_scalar's
   values and order of operations. */
static void moe__row_swiglu_bwd(const moe_real *g, const moe_real *u, const moe_real *dy, moe_real *dg, moe_real *du, int64_t n,
                                int accumulate) {
    int64_t c = 0;
#ifdef MOE__SIMD_AVX512
    const __m512 one16 = _mm512_set1_ps(1.0f);
    for (; c + 16 <= n; c += 16) {
        __m512 gv = _mm512_loadu_ps(g + c), dyv = _mm512_loadu_ps(dy + c);
        __m512 sig = _mm512_div_ps(one16, _mm512_add_ps(one16, moe__exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        if (dg) {
            __m512 grad = _mm512_mul_ps(sig, _mm512_add_ps(one16, _mm512_mul_ps(gv, _mm512_sub_ps(one16, sig))));
            __m512 v = _mm512_mul_ps(u ? _mm512_mul_ps(dyv, _mm512_loadu_ps(u + c)) : dyv, grad);
            _mm512_storeu_ps(dg + c, accumulate ? _mm512_add_ps(_mm512_loadu_ps(dg + c), v) : v);
        }
        if (du) {
            __m512 v = _mm512_mul_ps(dyv, _mm512_mul_ps(gv, sig));
            _mm512_storeu_ps(du + c, accumulate ? _mm512_add_ps(_mm512_loadu_ps(du + c), v) : v);
        }
    }
#endif
#ifdef MOE__SIMD_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; c + 8 <= n; c += 8) {
        __m256 gv = _mm256_loadu_ps(g + c), dyv = _mm256_loadu_ps(dy + c);
        __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, moe__exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        if (dg) {
            __m256 grad = _mm256_mul_ps(sig, _mm256_add_ps(one, _mm256_mul_ps(gv, _mm256_sub_ps(one, sig))));
            __m256 v = _mm256_mul_ps(u ? _mm256_mul_ps(dyv, _mm256_loadu_ps(u + c)) : dyv, grad);
            _mm256_storeu_ps(dg + c, accumulate ? _mm256_add_ps(_mm256_loadu_ps(dg + c), v) : v);
        }
        if (du) {
            __m256 v = _mm256_mul_ps(dyv, _mm256_mul_ps(gv, sig));
            _mm256_storeu_ps(du + c, accumulate ? _mm256_add_ps(_mm256_loadu_ps(du + c), v) : v);
        }
    }
#endif
    for (; c < n; c++) {
        if (dg) {
            moe_real v = dy[c] * (u ? u[c] : 1) * moe_silu_grad_scalar(g[c]);
            dg[c] = accumulate ? dg[c] + v : v;
        }
        if (du) {
            moe_real v = dy[c] * moe_silu_scalar(g[c]);
            du[c] = accumulate ? du[c] + v : v;
        }
    }
}
static void moe__swiglu_bwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__swiglu_job *j = (const moe__swiglu_job *)arg;
    int64_t r;
    (void)tid;
    for (r = r0; r < r1; r++)
        moe__row_swiglu_bwd(j->gate + r * j->ld_in, j->up ? j->up + r * j->ld_in : NULL, j->dy + r * j->cols,
                            j->dgate ? j->dgate + r * j->ld_out : NULL, j->dup ? j->dup + r * j->ld_out : NULL, j->cols,
                            j->accumulate);
}
static moe_status moe__cpu_swiglu_bwd(moe_ctx *ctx, const moe_real *gate, const moe_real *up, int64_t ld_in, const moe_real *dy,
                                      int64_t rows, int64_t cols, moe_real *dgate, moe_real *dup, int64_t ld_d, int accumulate) {
    moe__swiglu_job j;
    memset(&j, 0, sizeof j);
    j.gate = gate; j.up = up; j.ld_in = ld_in; j.dy = dy; j.cols = cols; j.dgate = dgate; j.dup = dup; j.ld_out = ld_d;
    j.accumulate = accumulate;
    moe__parallel_for(ctx, rows, (double)cols, 0, moe__swiglu_bwd_rows, &j);
    return MOE_OK;
}

/* ---- RoPE ------------------------------------------------------------------------------- */

/* Rotate one vector's `half` pairs by a table row [half][2] of cos, sin (sin times `sign`).
   Adjacent pairs go through explicit SIMD: left to itself, GCC's -O3 vectoriser reads the
   rotation as a complex multiplication and fuses it (vfmaddsub) despite -ffp-contract=off,
   so results would depend on compiler flags and inlining. Both paths round each product,
   then the sum: bit-identical to moe_rope_rotate. */
#ifdef MOE__SIMD_AVX2
static void moe__rope_4pairs(float *v, const float *cs, __m256 sign) {
    __m256 x = _mm256_loadu_ps(v), t = _mm256_loadu_ps(cs);
    __m256 c = _mm256_moveldup_ps(t), s = _mm256_mul_ps(_mm256_movehdup_ps(t), sign);
    __m256 swapped = _mm256_permute_ps(x, 0xB1); /* (x1, x0) in every pair */
    _mm256_storeu_ps(v, _mm256_addsub_ps(_mm256_mul_ps(x, c), _mm256_mul_ps(swapped, s)));
}
#endif
static void moe__rope_row(moe_real *v, const float *cs, int64_t half, moe_rope_layout layout, moe_real sign) {
    int64_t j = 0;
    if (layout == MOE_ROPE_HALVES) {
        for (; j < half; j++) moe_rope_rotate(&v[j], &v[j + half], (moe_real)cs[2 * j], sign * (moe_real)cs[2 * j + 1]);
        return;
    }
#ifdef MOE__SIMD_AVX2
    {
        const __m256 sg = _mm256_set1_ps(sign);
        for (; j + 4 <= half; j += 4) moe__rope_4pairs(v + 2 * j, cs + 2 * j, sg);
        if (j < half) { /* the last 1–3 pairs through a zero-padded copy */
            float vt[8] = {0}, ct[8] = {0};
            size_t bytes = (size_t)(2 * (half - j)) * sizeof(float);
            memcpy(vt, v + 2 * j, bytes);
            memcpy(ct, cs + 2 * j, bytes);
            moe__rope_4pairs(vt, ct, sg);
            memcpy(v + 2 * j, vt, bytes);
        }
    }
#else
    for (; j < half; j++) moe_rope_rotate(&v[2 * j], &v[2 * j + 1], (moe_real)cs[2 * j], sign * (moe_real)cs[2 * j + 1]);
#endif
}

typedef struct moe__rope_job {
    moe_real *x;
    const float *cs;
    int64_t T, heads, head_stride, offset, dim, pos0;
    moe_rope_layout layout;
    moe_real sign;
} moe__rope_job;
static void moe__rope_tokens(void *arg, int64_t t0, int64_t t1, int tid) {
    const moe__rope_job *j = (const moe__rope_job *)arg;
    int64_t t, h;
    (void)tid;
    for (t = t0; t < t1; t++) {
        const float *row = j->cs + (j->pos0 + t % j->T) * j->dim; /* [dim/2][2] cos, sin */
        for (h = 0; h < j->heads; h++)
            moe__rope_row(j->x + (t * j->heads + h) * j->head_stride + j->offset, row, j->dim / 2, j->layout, j->sign);
    }
}
static moe_status moe__cpu_rope(moe_ctx *ctx, moe_real *x, int64_t tokens, int64_t T, int64_t heads, int64_t head_stride,
                                int64_t offset, int64_t dim, const float *cos_sin, int64_t pos0, moe_rope_layout layout,
                                int inverse) {
    moe__rope_job j;
    memset(&j, 0, sizeof j);
    j.x = x; j.cs = cos_sin; j.T = T; j.heads = heads; j.head_stride = head_stride; j.offset = offset; j.dim = dim;
    j.pos0 = pos0; j.layout = layout; j.sign = inverse ? -1 : 1;
    moe__parallel_for(ctx, tokens, (double)(heads * dim), 0, moe__rope_tokens, &j);
    return MOE_OK;
}

/* ---- top-k ------------------------------------------------------------------------------ */

typedef struct moe__topk_job {
    const moe_real *x, *dy;
    moe_real *val, *dx;
    const int32_t *idx_in;
    int32_t *idx;
    int64_t n, k;
} moe__topk_job;

/* The k largest of x[0..n) in descending order, ties to the lower index; NaN ranks lowest. */
static void moe__topk_fwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__topk_job *J = (const moe__topk_job *)arg;
    int64_t r, i, j, m;
    (void)tid;
    for (r = r0; r < r1; r++) {
        const moe_real *x = J->x + r * J->n;
        int32_t *idx = J->idx + r * J->k;
        for (j = 0; j < J->k; j++) {
            int64_t best = -1;
            for (i = 0; i < J->n; i++) {
                int taken = 0;
                for (m = 0; m < j; m++)
                    if (idx[m] == (int32_t)i) { taken = 1; break; }
                if (taken) continue;
                if (best < 0 || x[i] > x[best] || (x[best] != x[best] && x[i] == x[i])) best = i;
            }
            idx[j] = (int32_t)best;
            J->val[r * J->k + j] = x[best];
        }
    }
}
static moe_status moe__cpu_topk_fwd(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t n, int64_t k, moe_real *val,
                                    int32_t *idx) {
    moe__topk_job j;
    memset(&j, 0, sizeof j);
    j.x = x; j.n = n; j.k = k; j.val = val; j.idx = idx;
    moe__parallel_for(ctx, rows, (double)(n * k), 0, moe__topk_fwd_rows, &j);
    return MOE_OK;
}
static void moe__topk_bwd_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__topk_job *J = (const moe__topk_job *)arg;
    int64_t r, j;
    (void)tid;
    for (r = r0; r < r1; r++)
        for (j = 0; j < J->k; j++) J->dx[r * J->n + J->idx_in[r * J->k + j]] += J->dy[r * J->k + j];
}
static moe_status moe__cpu_topk_bwd(moe_ctx *ctx, const moe_real *dy, const int32_t *idx, int64_t rows, int64_t n, int64_t k,
                                    moe_real *dx) {
    moe__topk_job j;
    memset(&j, 0, sizeof j);
    j.dy = dy; j.idx_in = idx; j.n = n; j.k = k; j.dx = dx;
    moe__parallel_for(ctx, rows, (double)k, 0, moe__topk_bwd_rows, &j);
    return MOE_OK;
}

/* ---- causal attention ------------------------------------------------------------------- */

/* Tiles of the online softmax go through the GEMM's micro-kernels: a tile product runs over
   row groups of 6 (queries, or keys for dK and dV) and column panels of 16, with its B operand
   packed into 16-wide panels, two panels at a time on the 6×32 zmm kernel where the GEMM uses
   it (the same arithmetic as the 6×16 one, so the same bits). Tile buffers are padded to whole groups and panels
   (the padding is zero or only feeds rows that are dropped), and tiles on the causal
   boundary skip the groups and panels that the mask empties. */
#define MOE__ATT_TILE 64 /* queries and keys per tile (a multiple of the panel width 16) */
#define MOE__ATT_ROWS 66 /* a tile's rows rounded up to whole groups of 6 */

static int64_t moe__att_rup(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

/* Values in one thread's scratch: the buffers of the forward (over Tk keys) or the backward
   (over T positions), each rounded up to 16 values so that every buffer starts 64-byte
   aligned. The keys and values of a head (and in the backward its queries and output
   gradients) are packed once for all its tiles: a query tile reuses the key tiles that the
   head's earlier query tiles packed. */
static int64_t moe__att_total(const int64_t *sizes, int count) {
    int64_t total = 0;
    int i;
    for (i = 0; i < count; i++) total += moe__att_rup(sizes[i], 16);
    return total;
}
static int64_t moe__attention_scratch_fwd(int64_t Tk, int64_t Dk, int64_t Dv) {
    const int64_t TL = MOE__ATT_TILE, RL = MOE__ATT_ROWS, Tp = moe__att_rup(Tk, TL), Dvp = moe__att_rup(Dv, 16);
    const int64_t sizes[7] = {RL * Dk, Tp * Dk, Tp * Dvp, RL * TL, RL * Dvp, RL, RL};
    return moe__att_total(sizes, 7);
}
static int64_t moe__attention_scratch_bwd(int64_t T, int64_t Dk, int64_t Dv) {
    const int64_t TL = MOE__ATT_TILE, RL = MOE__ATT_ROWS, Tp = moe__att_rup(T, TL);
    const int64_t Dkp = moe__att_rup(Dk, 16), Dvp = moe__att_rup(Dv, 16);
    const int64_t sizes[13] = {Dk * Tp,  Dv * Tp, Tp * Dkp, (Tp + 6) * Dk, Tp * Dkp,      (Tp + 6) * Dv, Tp * Dvp,
                               RL * RL,  RL * RL, Tp,       RL * Dkp,      RL * Dvp, Tp / TL * RL * Dkp};
    return moe__att_total(sizes, 13);
}
/* The next buffer of n values from a thread's scratch. */
static moe_real *moe__att_take(moe_real **cursor, int64_t n) {
    moe_real *p = *cursor;
    *cursor += moe__att_rup(n, 16);
    return p;
}

/* C[6, 16] = alpha·Σ_p A(i, p)·B[p, ·], or C += that with `accumulate` (then alpha is 1);
   A element (i, p) at a[i·rsa + p·csa] (rsa or csa is 1), B one packed panel [kc][16]. */
static void moe__att_kern(int64_t kc, const moe_real *a, int64_t rsa, int64_t csa, const moe_real *b, moe_real *c,
                          int64_t ldc, moe_real alpha, int accumulate) {
#ifdef MOE__SIMD_AVX2
    moe__gemm_kern_avx2(kc, a, rsa, csa, b, c, ldc, alpha, 0.0f, accumulate ? 2 : 0);
#else
    int64_t i, j, p;
    for (i = 0; i < 6; i++)
        for (j = 0; j < 16; j++) {
            moe_real acc = 0;
            for (p = 0; p < kc; p++) acc += a[i * rsa + p * csa] * b[p * 16 + j];
            c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc : alpha * acc;
        }
#endif
}

/* C[6, ncols rounded up to 16] = alpha·A·B, or C += A·B with `accumulate`; B's panel of
   columns [c, c + 16) at b + c·bstep. Pairs of panels go through the zmm kernel when `zmm`. */
static void moe__att_tile(int zmm, int64_t kc, const moe_real *a, int64_t rsa, int64_t csa, const moe_real *b, int64_t bstep,
                          int64_t ncols, moe_real *c, int64_t ldc, moe_real alpha, int accumulate) {
    int64_t col = 0;
#if defined(MOE__GEMM_HAVE_AVX512)
    if (zmm)
        for (; col + 16 < ncols; col += 32)
            moe__gemm_kern_zmm(kc, a, rsa, csa, b + col * bstep, b + (col + 16) * bstep, c + col, ldc, alpha, 0.0f,
                               accumulate ? 2 : 0);
#else
    (void)zmm;
#endif
    for (; col < ncols; col += 16) moe__att_kern(kc, a, rsa, csa, b + col * bstep, c + col, ldc, alpha, accumulate);
}

/* A head's rows sit H·D values apart, a stride that the hardware prefetchers do not follow far
   enough ahead: the packing loops ask for row i + MOE__ATT_AHEAD while they copy row i. */
#define MOE__ATT_AHEAD 8
static void moe__att_prefetch(const moe_real *row, int64_t D) {
#ifdef MOE__SIMD_AVX2
    int64_t d;
    for (d = 0; d < D; d += 16) _mm_prefetch((const char *)(row + d), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + D - 1), _MM_HINT_T0);
#else
    (void)row;
    (void)D;
#endif
}

/* Rows r0..r0+n of head h of x [B·T, H, D] as an A operand [n + pad, D]; the `pad` rows
   after n (up to the end of the last group of 6 that reads them) are zero. */
static void moe__att_rows(const moe_real *x, int64_t H, int64_t D, int64_t h, int64_t r0, int64_t n, int64_t pad,
                          moe_real *dst) {
    int64_t i;
    for (i = 0; i < n; i++) {
        if (i + MOE__ATT_AHEAD < n) moe__att_prefetch(x + ((r0 + i + MOE__ATT_AHEAD) * H + h) * D, D);
        memcpy(dst + i * D, x + ((r0 + i) * H + h) * D, (size_t)D * sizeof(moe_real));
    }
    memset(dst + n * D, 0, (size_t)(pad * D) * sizeof(moe_real));
}
/* The same rows as a B operand with the rows as columns (for S = Q·Kᵀ): panel c is [D][16],
   element (d, j) = row 16c + j; rows after n, up to a whole panel, are zero. */
static void moe__att_pack_cols(const moe_real *x, int64_t H, int64_t D, int64_t h, int64_t r0, int64_t n, moe_real *dst) {
    int64_t j, d;
    for (j = 0; j < n; j++) {
        const moe_real *src = x + ((r0 + j) * H + h) * D;
        moe_real *col = dst + (j / 16) * D * 16 + j % 16;
        if (j + MOE__ATT_AHEAD < n) moe__att_prefetch(src + MOE__ATT_AHEAD * H * D, D);
        for (d = 0; d < D; d++) col[d * 16] = src[d];
    }
    for (; j < moe__att_rup(n, 16); j++) {
        moe_real *col = dst + (j / 16) * D * 16 + j % 16;
        for (d = 0; d < D; d++) col[d * 16] = 0;
    }
}
/* The same rows as a B operand with the rows as rows (for P·V): panel c is [ld][16] (ld rows
   of the head), element (i, j) = x[r0 + i, 16c + j]; features after D are zero. */
static void moe__att_pack_rows(const moe_real *x, int64_t H, int64_t D, int64_t h, int64_t r0, int64_t n, int64_t ld,
                               moe_real *dst) {
    int64_t i, d;
    for (i = 0; i < n; i++) {
        const moe_real *src = x + ((r0 + i) * H + h) * D;
        moe_real *row = dst + i * 16; /* feature d of this row sits at row[d·ld + d % 16] */
        if (i + MOE__ATT_AHEAD < n) moe__att_prefetch(src + MOE__ATT_AHEAD * H * D, D);
        for (d = 0; d + 16 <= D; d += 16) memcpy(row + d * ld, src + d, 16 * sizeof(moe_real));
        if (d < D) {
            memcpy(row + d * ld, src + d, (size_t)(D - d) * sizeof(moe_real));
            memset(row + d * ld + (D - d), 0, (size_t)(16 - (D - d)) * sizeof(moe_real));
        }
    }
}

#ifdef MOE__SIMD_AVX2
/* Lanes 0..n−1 of 8 set, for the tail of a row (0 < n < 8). */
static __m256 moe__att_lanes(int64_t n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
#endif

/* s[j] = exp(s[j] − shift) for j < n (n ≤ MOE__ATT_TILE), returning their sum in
   moe__row_exp_sum's order and bits (8 lane sums, then the tail one by one); the tail's exps
   run on 8 lanes too, because on a diagonal tile a row's tail is up to 7 of its values.
   s[n..] up to the next multiple of 8 becomes 0 (the row has room: tiles are whole 8s). */
static moe_real moe__att_exp_row(moe_real *s, int64_t n, moe_real shift) {
#ifdef MOE__SIMD_AVX2
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps(), ev;
    moe_real sum = 0, tail[8];
    int64_t j = 0, t;
#ifdef MOE__SIMD_AVX512
    const __m512 vs16 = _mm512_set1_ps(shift);
    for (; j + 16 <= n; j += 16) {
        __m512 e16 = moe__exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vs16));
        _mm512_storeu_ps(s + j, e16);
        acc = _mm256_add_ps(_mm256_add_ps(acc, moe__lo8(e16)), moe__hi8(e16));
    }
#endif
    for (; j + 8 <= n; j += 8) {
        ev = moe__exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vs));
        _mm256_storeu_ps(s + j, ev);
        acc = _mm256_add_ps(acc, ev);
    }
    if (n >= 8) sum = moe__hsum8(acc);
    if (j < n) {
        ev = _mm256_and_ps(moe__exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vs)), moe__att_lanes(n - j));
        _mm256_storeu_ps(s + j, ev);
        _mm256_storeu_ps(tail, ev);
        for (t = 0; t < n - j; t++) sum += tail[t];
    }
    return sum;
#else
    return moe__row_exp_sum(s, s, n, shift);
#endif
}

typedef struct moe__att_job {
    const moe_real *q, *k, *v, *o, *lse_in, *dout;
    moe_real *out, *lse, *dq, *dk, *dv, *scratch;
    int64_t B, Tq, Tk, H, Dk, Dv, ntiles, per_thread;
    moe_real scale;
    int zmm; /* tile products on the zmm kernel (the context's FP32 GEMM choice) */
} moe__att_job;

/* One job of the forward: query tile `it` of head h of sequence b against the 64-key tiles it
   sees, with a running max m and sum l per query (an online softmax: no T×T matrix is
   stored); query i sits at position Tk − Tq + i; lse keeps each query's log-sum-exp for the
   backward pass. A thread's jobs run in order, so its consecutive jobs of one head pack
   each key tile once (KT and V hold the head's keys packed so far). */
static void moe__attention_fwd_jobs(void *arg, int64_t job0, int64_t job1, int tid) {
    const moe__att_job *J = (const moe__att_job *)arg;
    const int64_t TL = MOE__ATT_TILE, RL = MOE__ATT_ROWS, Dk = J->Dk, Dv = J->Dv, Dvp = moe__att_rup(Dv, 16), H = J->H;
    const int64_t off = J->Tk - J->Tq, Tp = moe__att_rup(J->Tk, TL);
    moe_real *w = J->scratch + (int64_t)tid * J->per_thread;
    moe_real *Q = moe__att_take(&w, RL * Dk), *KT = moe__att_take(&w, Tp * Dk), *V = moe__att_take(&w, Tp * Dvp);
    moe_real *S = moe__att_take(&w, RL * TL), *O = moe__att_take(&w, RL * Dvp), *m = moe__att_take(&w, RL),
             *l = moe__att_take(&w, RL);
    int64_t job, packed_bh = -1, packed_tiles = 0;
    for (job = job0; job < job1; job++) {
        int64_t bh = job / J->ntiles, b = bh / H, h = bh % H, it = job % J->ntiles;
        int64_t i0 = it * TL, nq = J->Tq - i0 < TL ? J->Tq - i0 : TL, jt, jt_last = (off + i0 + nq - 1) / TL, r0, i, d;
        if (bh != packed_bh) {
            packed_bh = bh;
            packed_tiles = 0;
        }
        for (; packed_tiles <= jt_last; packed_tiles++) {
            int64_t j0 = packed_tiles * TL, nk = J->Tk - j0 < TL ? J->Tk - j0 : TL;
            moe__att_pack_cols(J->k, H, Dk, h, b * J->Tk + j0, nk, KT + j0 * Dk);
            moe__att_pack_rows(J->v, H, Dv, h, b * J->Tk + j0, nk, Tp, V + j0 * 16);
        }
        moe__att_rows(J->q, H, Dk, h, b * J->Tq + i0, nq, moe__att_rup(nq, 6) - nq, Q);
        for (i = 0; i < nq; i++) {
            m[i] = -INFINITY;
            l[i] = 0;
        }
        memset(O, 0, (size_t)(RL * Dvp) * sizeof(moe_real));
        for (jt = 0; jt <= jt_last; jt++) {
            int64_t j0 = jt * TL, nk = J->Tk - j0 < TL ? J->Tk - j0 : TL;
            const moe_real *KTt = KT + j0 * Dk, *Vt = V + j0 * 16;
            for (r0 = 0; r0 < nq; r0 += 6) {
                /* causal: the keys up to the group's last query */
                int64_t kmax = off + i0 + r0 + 6 - j0;
                kmax = kmax < nk ? kmax : nk;
                if (kmax <= 0) continue;
                moe__att_tile(J->zmm, Dk, Q + r0 * Dk, Dk, 1, KTt, Dk, kmax, S + r0 * TL, TL, J->scale, 0);
                for (i = r0; i < r0 + 6 && i < nq; i++) {
                    moe_real *s = S + i * TL, mt, corr;
                    int64_t kend = off + i0 + i + 1 - j0, jj;
                    kend = kend < nk ? kend : nk;
                    if (kend <= 0) { /* this query sees none of the tile's keys */
                        for (jj = 0; jj < kmax; jj++) s[jj] = 0;
                        continue;
                    }
                    mt = moe__row_max(s, kend);
                    mt = mt > m[i] ? mt : m[i];
                    corr = moe__exp(m[i] - mt); /* exp(−inf) = 0 on the first tile */
                    l[i] = l[i] * corr + moe__att_exp_row(s, kend, mt);
                    m[i] = mt;
                    for (jj = kend; jj < kmax; jj++) s[jj] = 0;
                    for (d = 0; d < Dv; d++) O[i * Dvp + d] *= corr;
                }
                /* rows after nq: Q is zero there, so S and their O rows stay zero */
                moe__att_tile(J->zmm, kmax, S + r0 * TL, TL, 1, Vt, Tp, Dv, O + r0 * Dvp, Dvp, 1, 1);
            }
        }
        for (i = 0; i < nq; i++) {
            moe_real *dst = J->out + ((b * J->Tq + i0 + i) * H + h) * Dv;
            for (d = 0; d < Dv; d++) dst[d] = O[i * Dvp + d] / l[i];
            J->lse[(b * H + h) * J->Tq + i0 + i] = m[i] + moe__ln(l[i]);
        }
    }
}
static moe_status moe__cpu_attention_fwd(moe_ctx *ctx, const moe_real *q, const moe_real *k, const moe_real *v, int64_t B,
                                         int64_t Tq, int64_t Tk, int64_t H, int64_t Dk, int64_t Dv, moe_real scale, moe_real *o,
                                         moe_real *lse) {
    moe__att_job J;
    if (Tq < 1 || Tq > Tk) return moe__fail(ctx, MOE_ERR_SHAPE, "attention: want 1 <= Tq <= Tk, got %lld and %lld", (long long)Tq, (long long)Tk);
    memset(&J, 0, sizeof J);
    J.q = q; J.k = k; J.v = v; J.B = B; J.Tq = Tq; J.Tk = Tk; J.H = H; J.Dk = Dk; J.Dv = Dv; J.scale = scale; J.out = o; J.lse = lse;
    J.zmm = ctx->conf.simd && ctx->conf.f32_zmm;
    J.ntiles = (Tq + MOE__ATT_TILE - 1) / MOE__ATT_TILE;
    J.per_thread = moe__attention_scratch_fwd(Tk, Dk, Dv);
    if (!(J.scratch = moe__dev_real(ctx, ctx->conf.n_threads * J.per_thread, "attention"))) return MOE_ERR_MEMORY;
    /* a job costs about a tile of queries against its keys */
    moe__parallel_for(ctx, B * H * J.ntiles, (double)(MOE__ATT_TILE * (Tk - Tq + MOE__ATT_TILE) * (Dk + Dv)), 1,
                      moe__attention_fwd_jobs, &J);
    return MOE_OK;
}

/* p[j] = exp(p[j] − lse) (p holds scale·q·k), ds[j] = p[j]·(ds[j] − delta)·scale (ds holds dO·v)
   for j < n (n ≤ MOE__ATT_TILE): one query row of a backward tile. With AVX2 the tail runs on 8
   lanes too (a diagonal tile's rows end in up to 7 values), its lanes from n on set to 0. */
static void moe__att_dscores(moe_real *p, moe_real *ds, int64_t n, moe_real lse, moe_real delta, moe_real scale) {
    int64_t j = 0;
#ifdef MOE__SIMD_AVX2
    const __m256 vl = _mm256_set1_ps(lse), vd = _mm256_set1_ps(delta), vs = _mm256_set1_ps(scale);
#ifdef MOE__SIMD_AVX512
    const __m512 vl16 = _mm512_set1_ps(lse), vd16 = _mm512_set1_ps(delta), vs16 = _mm512_set1_ps(scale);
    for (; j + 16 <= n; j += 16) {
        __m512 pv = moe__exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), vl16));
        _mm512_storeu_ps(p + j, pv);
        _mm512_storeu_ps(ds + j, _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(ds + j), vd16)), vs16));
    }
#endif
    for (; j + 8 <= n; j += 8) {
        __m256 pv = moe__exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vl));
        _mm256_storeu_ps(p + j, pv);
        _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(ds + j), vd)), vs));
    }
    if (j < n) {
        const __m256 keep = moe__att_lanes(n - j);
        __m256 pv = _mm256_and_ps(moe__exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vl)), keep);
        _mm256_storeu_ps(p + j, pv);
        _mm256_storeu_ps(ds + j, _mm256_and_ps(_mm256_mul_ps(_mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(ds + j), vd)), vs), keep));
        j = n;
    }
#endif
    for (; j < n; j++) {
        p[j] = moe__exp(p[j] - lse);
        ds[j] = p[j] * (ds[j] - delta) * scale;
    }
}

/* FlashAttention-2 style backward: p = exp(scale·q·k − lse) is recomputed tile by tile.
   One thread owns one (b, h), so dk and dv sum over query tiles in a fixed order and dq over
   key tiles in a fixed order. dq, dk, dv are accumulated into (+=); any may be NULL. The
   head's operands are packed once, up front, for all its tile pairs, and its dq rows are
   gathered once into dQ, which the dS·K products accumulate into (C + acc, the sum that
   adding each key tile's product to dq gives), then written back once. */
static void moe__attention_bwd_heads(void *arg, int64_t bh0, int64_t bh1, int tid) {
    const moe__att_job *J = (const moe__att_job *)arg;
    const moe_real *q = J->q, *k = J->k, *v = J->v, *o = J->o, *lse = J->lse_in, *dout = J->dout, scale = J->scale;
    moe_real *dq = J->dq, *dk = J->dk, *dv = J->dv;
    const int64_t TL = MOE__ATT_TILE, RL = MOE__ATT_ROWS, T = J->Tq, H = J->H, Dk = J->Dk, Dv = J->Dv, ntiles = J->ntiles;
    const int64_t Dkp = moe__att_rup(Dk, 16), Dvp = moe__att_rup(Dv, 16), Tp = moe__att_rup(T, TL);
    moe_real *w = J->scratch + (int64_t)tid * J->per_thread;
    /* B operands: KT, VT (keys as columns), K, Qn, DOn (rows as rows); A operands: Q, DO (the
       groups of the last query tile read up to 6 zero rows after T); P and DS [RL, RL]:
       columns past the causal end are zero, so the key groups of the transposed products
       (which run to RL) read zeros there */
    moe_real *KT = moe__att_take(&w, Dk * Tp), *VT = moe__att_take(&w, Dv * Tp), *K = moe__att_take(&w, Tp * Dkp);
    moe_real *Q = moe__att_take(&w, (Tp + 6) * Dk), *Qn = moe__att_take(&w, Tp * Dkp), *DO = moe__att_take(&w, (Tp + 6) * Dv),
             *DOn = moe__att_take(&w, Tp * Dvp);
    moe_real *P = moe__att_take(&w, RL * RL), *DS = moe__att_take(&w, RL * RL), *delta = moe__att_take(&w, Tp);
    /* dQ: a query tile's rows at it·RL, so a group's rows past the tile land in padding */
    moe_real *dKt = moe__att_take(&w, RL * Dkp), *dVt = moe__att_take(&w, RL * Dvp), *dQ = moe__att_take(&w, ntiles * RL * Dkp);
    int64_t bh;
    for (bh = bh0; bh < bh1; bh++) {
        int64_t b = bh / H, h = bh % H, jt, it, r0, i, d;
        moe__att_pack_cols(k, H, Dk, h, b * T, T, KT);
        moe__att_pack_cols(v, H, Dv, h, b * T, T, VT);
        moe__att_pack_rows(k, H, Dk, h, b * T, T, Tp, K);
        moe__att_rows(q, H, Dk, h, b * T, T, 6, Q);
        moe__att_rows(dout, H, Dv, h, b * T, T, 6, DO);
        moe__att_pack_rows(q, H, Dk, h, b * T, T, Tp, Qn);
        moe__att_pack_rows(dout, H, Dv, h, b * T, T, Tp, DOn);
        for (i = 0; i < T; i++) { /* delta_i = dO_i · O_i; the rows of dk and dv that the key tiles add to are fetched meanwhile */
            if (i + MOE__ATT_AHEAD < T) moe__att_prefetch(o + ((b * T + i + MOE__ATT_AHEAD) * H + h) * Dv, Dv);
            if (dk) moe__att_prefetch(dk + ((b * T + i) * H + h) * Dk, Dk);
            if (dv) moe__att_prefetch(dv + ((b * T + i) * H + h) * Dv, Dv);
            delta[i] = moe__dot8x(DO + i * Dv, o + ((b * T + i) * H + h) * Dv, Dv);
        }
        if (dq)
            for (i = 0; i < T; i++) {
                if (i + MOE__ATT_AHEAD < T) moe__att_prefetch(dq + ((b * T + i + MOE__ATT_AHEAD) * H + h) * Dk, Dk);
                memcpy(dQ + (i / TL * RL + i % TL) * Dkp, dq + ((b * T + i) * H + h) * Dk, (size_t)Dk * sizeof(moe_real));
            }
        for (jt = 0; jt < ntiles; jt++) {
            int64_t j0 = jt * TL, nk = T - j0 < TL ? T - j0 : TL;
            const moe_real *KTt = KT + j0 * Dk, *VTt = VT + j0 * Dv, *Kt = K + j0 * 16;
            /* dk and dv of this key tile collect over query tiles here, then go out once */
            memset(dKt, 0, (size_t)(RL * Dkp) * sizeof(moe_real));
            memset(dVt, 0, (size_t)(RL * Dvp) * sizeof(moe_real));
            for (it = jt; it < ntiles; it++) {
                int64_t i0 = it * TL, nq = T - i0 < TL ? T - i0 : TL;
                const moe_real *Qt = Q + i0 * Dk, *DOt = DO + i0 * Dv, *Qnt = Qn + i0 * 16, *DOnt = DOn + i0 * 16;
                /* query groups: P, dS, and dQ = dS·K */
                for (r0 = 0; r0 < nq; r0 += 6) {
                    int64_t kmax = it == jt && r0 + 6 < nk ? r0 + 6 : nk;
                    moe__att_tile(J->zmm, Dk, Qt + r0 * Dk, Dk, 1, KTt, Dk, kmax, P + r0 * RL, RL, scale, 0);
                    moe__att_tile(J->zmm, Dv, DOt + r0 * Dv, Dv, 1, VTt, Dv, kmax, DS + r0 * RL, RL, 1, 0);
                    for (i = r0; i < r0 + 6 && i < nq; i++) {
                        int64_t kend = it == jt ? i + 1 : nk;
                        moe__att_dscores(P + i * RL, DS + i * RL, kend, lse[bh * T + i0 + i], delta[i0 + i], scale);
                        memset(P + i * RL + kend, 0, (size_t)(RL - kend) * sizeof(moe_real));
                        memset(DS + i * RL + kend, 0, (size_t)(RL - kend) * sizeof(moe_real));
                    }
                    if (!dq) continue;
                    moe__att_tile(J->zmm, kmax, DS + r0 * RL, RL, 1, Kt, Tp, Dk, dQ + (it * RL + r0) * Dkp, Dkp, 1, 1);
                }
                /* key groups: dV += Pᵀ·dO, dK += dSᵀ·Q, over the queries that see the group */
                for (r0 = 0; r0 < nk; r0 += 6) {
                    int64_t qa = it == jt ? r0 : 0;
                    moe__att_tile(J->zmm, nq - qa, P + qa * RL + r0, 1, RL, DOnt + qa * 16, Tp, Dv, dVt + r0 * Dvp, Dvp, 1, 1);
                    moe__att_tile(J->zmm, nq - qa, DS + qa * RL + r0, 1, RL, Qnt + qa * 16, Tp, Dk, dKt + r0 * Dkp, Dkp, 1, 1);
                }
            }
            for (i = 0; i < nk; i++) {
                if (dv) {
                    moe_real *dvr = dv + ((b * T + j0 + i) * H + h) * Dv;
                    for (d = 0; d < Dv; d++) dvr[d] += dVt[i * Dvp + d];
                }
                if (dk) {
                    moe_real *dkr = dk + ((b * T + j0 + i) * H + h) * Dk;
                    for (d = 0; d < Dk; d++) dkr[d] += dKt[i * Dkp + d];
                }
            }
        }
        if (dq)
            for (i = 0; i < T; i++) memcpy(dq + ((b * T + i) * H + h) * Dk, dQ + (i / TL * RL + i % TL) * Dkp, (size_t)Dk * sizeof(moe_real));
    }
}
static moe_status moe__cpu_attention_bwd(moe_ctx *ctx, const moe_real *q, const moe_real *k, const moe_real *v, const moe_real *o,
                                         const moe_real *lse, const moe_real *dout, int64_t B, int64_t T, int64_t H, int64_t Dk,
                                         int64_t Dv, moe_real scale, moe_real *dq, moe_real *dk, moe_real *dv) {
    moe__att_job J;
    memset(&J, 0, sizeof J);
    J.q = q; J.k = k; J.v = v; J.o = o; J.lse_in = lse; J.dout = dout; J.B = B; J.Tq = J.Tk = T; J.H = H; J.Dk = Dk; J.Dv = Dv;
    J.scale = scale; J.dq = dq; J.dk = dk; J.dv = dv;
    J.zmm = ctx->conf.simd && ctx->conf.f32_zmm;
    J.ntiles = (T + MOE__ATT_TILE - 1) / MOE__ATT_TILE;
    J.per_thread = moe__attention_scratch_bwd(T, Dk, Dv);
    if (!(J.scratch = moe__dev_real(ctx, ctx->conf.n_threads * J.per_thread, "attention backward"))) return MOE_ERR_MEMORY;
    moe__parallel_for(ctx, B * H, (double)(T * T * (Dk + Dv)), 1, moe__attention_bwd_heads, &J);
    return MOE_OK;
}

/* ---- decode attention over MLA's latent cache ------------------------------------------- */

typedef struct moe__decode_job {
    const moe_real *qc, *cache;
    moe_real *ob, *scratch;
    int64_t H, R, width, pos0, per_thread;
    moe_real scale;
} moe__decode_job;

/* (token, head) pairs [p0, p1): scores over the cache rows the token sees (8 rows at a time,
   as the GEMM's dot-product path sums), softmax, and the weighted sum of the rows. */
static void moe__attention_decode_pairs(void *arg, int64_t p0, int64_t p1, int tid) {
    const moe__decode_job *J = (const moe__decode_job *)arg;
    const int64_t R = J->R, W = J->width;
    int64_t pair, j;
    for (pair = p0; pair < p1; pair++) {
        int64_t nk = J->pos0 + pair / J->H + 1;
        const moe_real *qh = J->qc + pair * R;
        moe_real *sc = J->scratch + (int64_t)tid * J->per_thread, *oh = J->ob + pair * W, mx = -INFINITY, sum;
        j = 0;
#ifdef MOE__SIMD_AVX2
        for (; j + 8 <= nk; j += 8) moe__dot8x8(qh, J->cache + j * R, R, R, sc + j);
#endif
        for (; j < nk; j++) sc[j] = moe__dot8x(qh, J->cache + j * R, R);
        for (j = 0; j < nk; j++) {
            sc[j] *= J->scale;
            mx = sc[j] > mx ? sc[j] : mx;
        }
        sum = moe__row_exp_sum(sc, sc, nk, mx);
        for (j = 0; j < nk; j++) sc[j] /= sum;
        moe__rows_sum(sc, J->cache, R, nk, 1, 0, oh, 0, W); /* oh = Σ_j p_j · c_j */
    }
}
static moe_status moe__cpu_attention_decode(moe_ctx *ctx, const moe_real *qc, const moe_real *cache, int64_t n, int64_t H,
                                            int64_t R, int64_t width, int64_t pos0, moe_real scale, moe_real *ob) {
    moe__decode_job J;
    memset(&J, 0, sizeof J);
    J.qc = qc; J.cache = cache; J.ob = ob; J.H = H; J.R = R; J.width = width; J.pos0 = pos0; J.scale = scale;
    J.per_thread = moe__att_rup(pos0 + n, 16);
    if (!(J.scratch = moe__dev_real(ctx, ctx->conf.n_threads * J.per_thread, "decode attention"))) return MOE_ERR_MEMORY;
    /* as the GEMMs' dot-product path: a region only from about 2^18 multiply-adds */
    moe__parallel_for(ctx, n * H, (double)((pos0 + n) * (R + width)) / 16.0, 0, moe__attention_decode_pairs, &J);
    return MOE_OK;
}

/* ---- MLA: keys and values from the expanded latent -------------------------------------- */

typedef struct moe__kv_job {
    const moe_real *kvb, *kpe, *dk, *dv;
    moe_real *k, *v, *dkvb, *dkpe;
    int64_t ld_kpe, H, dn, dr, dv_dim;
} moe__kv_job;
static void moe__mla_split_rows(void *arg, int64_t t0, int64_t t1, int tid) {
    const moe__kv_job *J = (const moe__kv_job *)arg;
    const int64_t H = J->H, dn = J->dn, dr = J->dr, dv = J->dv_dim, dqk = dn + dr;
    int64_t t, h;
    (void)tid;
    for (t = t0; t < t1; t++)
        for (h = 0; h < H; h++) {
            const moe_real *src = J->kvb + (t * H + h) * (dn + dv);
            memcpy(J->k + (t * H + h) * dqk, src, (size_t)dn * sizeof(moe_real));
            memcpy(J->k + (t * H + h) * dqk + dn, J->kpe + t * J->ld_kpe, (size_t)dr * sizeof(moe_real));
            memcpy(J->v + (t * H + h) * dv, src + dn, (size_t)dv * sizeof(moe_real));
        }
}
static moe_status moe__cpu_mla_split_kv(moe_ctx *ctx, const moe_real *kvb, const moe_real *kpe, int64_t ld_kpe, int64_t n,
                                        int64_t H, int64_t dn, int64_t dr, int64_t dv, moe_real *k, moe_real *v) {
    moe__kv_job J;
    memset(&J, 0, sizeof J);
    J.kvb = kvb; J.kpe = kpe; J.ld_kpe = ld_kpe; J.H = H; J.dn = dn; J.dr = dr; J.dv_dim = dv; J.k = k; J.v = v;
    moe__parallel_for(ctx, n, (double)(H * (dn + dr + dv)), 0, moe__mla_split_rows, &J);
    return MOE_OK;
}
static void moe__mla_merge_rows(void *arg, int64_t t0, int64_t t1, int tid) {
    const moe__kv_job *J = (const moe__kv_job *)arg;
    const int64_t H = J->H, dn = J->dn, dr = J->dr, dv = J->dv_dim, dqk = dn + dr;
    int64_t t, h, j;
    (void)tid;
    for (t = t0; t < t1; t++)
        for (h = 0; h < H; h++) {
            const moe_real *dkh = J->dk + (t * H + h) * dqk;
            for (j = 0; j < dr; j++) J->dkpe[t * dr + j] += dkh[dn + j];
            memcpy(J->dkvb + (t * H + h) * (dn + dv), dkh, (size_t)dn * sizeof(moe_real));
            memcpy(J->dkvb + (t * H + h) * (dn + dv) + dn, J->dv + (t * H + h) * dv, (size_t)dv * sizeof(moe_real));
        }
}
static moe_status moe__cpu_mla_merge_kv(moe_ctx *ctx, const moe_real *dk, const moe_real *dv, int64_t n, int64_t H, int64_t dn,
                                        int64_t dr, int64_t dv_dim, moe_real *dkvb, moe_real *dkpe) {
    moe__kv_job J;
    memset(&J, 0, sizeof J);
    J.dk = dk; J.dv = dv; J.H = H; J.dn = dn; J.dr = dr; J.dv_dim = dv_dim; J.dkvb = dkvb; J.dkpe = dkpe;
    moe__parallel_for(ctx, n, (double)(H * (dn + dr + dv_dim)), 0, moe__mla_merge_rows, &J);
    return MOE_OK;
}

/* ---- DeepSeekMoE: router, dispatch plan, gather, combine (reference §3) ------------------ */

#define MOE__MAX_EXPERTS 4096

/* Route one token: scores s[E] (sigmoid or softmax), bias b (noaux_tc only). Writes the K
   chosen experts, best first, ties to the lower index; masked groups are at −∞. */
static void moe__route(const moe_real *s, const moe_real *bias, const moe_config *c, int32_t *chosen) {
    double key[MOE__MAX_EXPERTS];
    unsigned char taken[MOE__MAX_EXPERTS];
    int64_t E = c->n_routed_experts, G = c->n_group, per = E / G, e, g, k;
    int use_groups = c->topk_method != MOE_TOPK_GREEDY && G > 1 && c->topk_group < G;
    for (e = 0; e < E; e++) key[e] = (double)s[e] + (c->topk_method == MOE_TOPK_NOAUX_TC && bias ? (double)bias[e] : 0.0);
    if (use_groups) {
        double gscore[MOE__MAX_EXPERTS];
        unsigned char keep[MOE__MAX_EXPERTS];
        for (g = 0; g < G; g++) {
            double best = -INFINITY, second = -INFINITY;
            for (e = g * per; e < (g + 1) * per; e++) {
                if (key[e] > best) { second = best; best = key[e]; }
                else if (key[e] > second) second = key[e];
            }
            gscore[g] = c->topk_method == MOE_TOPK_NOAUX_TC ? best + (per > 1 ? second : 0.0) : best;
            keep[g] = 0;
        }
        for (k = 0; k < c->topk_group; k++) {
            int64_t bg = 0;
            while (keep[bg]) bg++; /* topk_group < G, so an unkept group exists */
            for (g = bg + 1; g < G; g++)
                if (!keep[g] && gscore[g] > gscore[bg]) bg = g;
            keep[bg] = 1;
        }
        for (e = 0; e < E; e++)
            if (!keep[e / per]) key[e] = -INFINITY;
    }
    memset(taken, 0, (size_t)E);
    for (k = 0; k < c->num_experts_per_tok; k++) {
        int64_t be = -1;
        for (e = 0; e < E; e++)
            if (!taken[e] && (be < 0 || key[e] > key[be])) be = e;
        if (be < 0) be = 0; /* K ≤ E, so be ≥ 0 */
        taken[be] = 1;
        chosen[k] = (int32_t)be;
    }
}

typedef struct moe__router_job {
    const moe_config *cfg;
    const moe_real *z, *bias, *s_in, *sel_in, *dgates, *f;
    const int32_t *chosen_in;
    moe_real *s, *gates, *sel_sum, *dz;
    int32_t *chosen;
    moe_real balance_scale;
    int64_t T;
} moe__router_job;

static void moe__router_fwd_rows(void *arg, int64_t t0, int64_t t1, int tid) {
    const moe__router_job *J = (const moe__router_job *)arg;
    const moe_config *c = J->cfg;
    const int64_t E = c->n_routed_experts, K = c->num_experts_per_tok;
    int64_t t, k;
    (void)tid;
    for (t = t0; t < t1; t++) {
        const moe_real *z = J->z + t * E;
        moe_real *s = J->s + t * E, sum = 0;
        int32_t *ch = J->chosen + t * K;
        if (c->scoring_func == MOE_SCORING_SOFTMAX) {
            moe_real tot = moe__row_exp_sum(z, s, E, moe__row_max(z, E));
            for (k = 0; k < E; k++) s[k] /= tot;
        } else {
            for (k = 0; k < E; k++) s[k] = -z[k];
            moe__row_exp_sum(s, s, E, 0); /* e^−z, then σ = 1/(1 + e^−z): moe_sigmoid_scalar's values */
            for (k = 0; k < E; k++) s[k] = (moe_real)1 / ((moe_real)1 + s[k]);
        }
        moe__route(s, J->bias, c, ch);
        for (k = 0; k < K; k++) sum += s[ch[k]];
        J->sel_sum[t] = sum;
        for (k = 0; k < K; k++) {
            moe_real g = s[ch[k]];
            J->gates[t * K + k] = (moe_real)c->routed_scaling_factor * (c->norm_topk_prob ? g / sum : g);
        }
    }
}
static moe_status moe__cpu_router_fwd(moe_ctx *ctx, const moe_config *cfg, const moe_real *z, const moe_real *bias, int64_t n,
                                      moe_real *s, int32_t *chosen, moe_real *gates, moe_real *sel_sum) {
    moe__router_job J;
    if (cfg->n_routed_experts > MOE__MAX_EXPERTS)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "router: at most %d experts", MOE__MAX_EXPERTS);
    memset(&J, 0, sizeof J);
    J.cfg = cfg; J.z = z; J.bias = bias; J.s = s; J.chosen = chosen; J.gates = gates; J.sel_sum = sel_sum;
    moe__parallel_for(ctx, n, (double)(cfg->n_routed_experts * (4 + cfg->num_experts_per_tok)), 0, moe__router_fwd_rows, &J);
    return MOE_OK;
}

/* Per token: gates → scores (reference §10), plus the balance loss, → router logits z. */
static void moe__router_bwd_rows(void *arg, int64_t t0, int64_t t1, int tid) {
    const moe__router_job *J = (const moe__router_job *)arg;
    const moe_config *c = J->cfg;
    const int64_t E = c->n_routed_experts, K = c->num_experts_per_tok;
    int64_t t, k, j;
    (void)tid;
    for (t = t0; t < t1; t++) {
        const moe_real *st = J->s_in + t * E, *dg = J->dgates + t * K;
        const int32_t *ch = J->chosen_in + t * K;
        moe_real *dzt = J->dz + t * E, Rs = (moe_real)c->routed_scaling_factor, corr = 0;
        for (j = 0; j < E; j++) dzt[j] = 0; /* first ds, turned into dz below */
        if (c->norm_topk_prob) {
            moe_real sum = J->sel_in[t];
            for (k = 0; k < K; k++) corr += dg[k] * st[ch[k]] / sum;
            for (k = 0; k < K; k++) dzt[ch[k]] += Rs / sum * (dg[k] - corr);
        } else {
            for (k = 0; k < K; k++) dzt[ch[k]] += Rs * dg[k];
        }
        if (J->f && J->balance_scale != 0) {
            /* L = α/B Σ_b Σ_i f_i P_i, P_i = (1/T) Σ_t s'_{i,t}, s' = s / Σ_j s_j */
            const moe_real *f = J->f + (t / J->T) * E, w = J->balance_scale;
            moe_real tot = 0, dot = 0;
            if (c->scoring_func == MOE_SCORING_SIGMOID) {
                for (j = 0; j < E; j++) tot += st[j];
                for (j = 0; j < E; j++) dot += f[j] * st[j] / tot;
                for (j = 0; j < E; j++) dzt[j] += w * (f[j] - dot) / tot;
            } else {
                for (j = 0; j < E; j++) dzt[j] += w * f[j];
            }
        }
        if (c->scoring_func == MOE_SCORING_SIGMOID) {
            for (j = 0; j < E; j++) dzt[j] *= st[j] * (1 - st[j]);
        } else {
            moe_real dot = 0;
            for (j = 0; j < E; j++) dot += dzt[j] * st[j];
            for (j = 0; j < E; j++) dzt[j] = st[j] * (dzt[j] - dot);
        }
    }
}
static moe_status moe__cpu_router_bwd(moe_ctx *ctx, const moe_config *cfg, const moe_real *s, const int32_t *chosen,
                                      const moe_real *sel_sum, const moe_real *dgates, const moe_real *f, moe_real balance_scale,
                                      int64_t n, int64_t T, moe_real *dz) {
    moe__router_job J;
    memset(&J, 0, sizeof J);
    J.cfg = cfg; J.s_in = s; J.chosen_in = chosen; J.sel_in = sel_sum; J.dgates = dgates; J.f = f;
    J.balance_scale = balance_scale; J.T = T; J.dz = dz;
    moe__parallel_for(ctx, n, (double)(4 * cfg->n_routed_experts), 0, moe__router_bwd_rows, &J);
    return MOE_OK;
}

static moe_status moe__cpu_balance_loss(moe_ctx *ctx, const moe_config *c, const moe_real *s, const int32_t *chosen, int64_t B,
                                        int64_t T, moe_real *f, moe_real *host_loss) {
    const int64_t E = c->n_routed_experts, K = c->num_experts_per_tok;
    moe_real balance = 0, P[MOE__MAX_EXPERTS];
    int64_t b, t, e, k, j;
    (void)ctx;
    memset(f, 0, (size_t)(B * E) * sizeof(moe_real));
    for (b = 0; b < B; b++) {
        moe_real *fb = f + b * E;
        for (t = b * T; t < (b + 1) * T; t++)
            for (k = 0; k < K; k++) fb[chosen[t * K + k]] += (moe_real)E / (moe_real)(K * T);
        /* P_e = Σ_t s_te / Σ_j s_tj (sigmoid scores; softmax ones sum to 1), t in order */
        for (e = 0; e < E; e++) P[e] = 0;
        for (t = b * T; t < (b + 1) * T; t++) {
            moe_real tot = 0;
            if (c->scoring_func == MOE_SCORING_SIGMOID)
                for (j = 0; j < E; j++) tot += s[t * E + j];
            for (e = 0; e < E; e++) P[e] += c->scoring_func == MOE_SCORING_SIGMOID ? s[t * E + e] / tot : s[t * E + e];
        }
        for (e = 0; e < E; e++) balance += fb[e] * P[e] / (moe_real)T;
    }
    *host_loss = balance;
    return MOE_OK;
}

/* A stable counting sort: serial, one pass over the choices (a few thousand integers). */
static moe_status moe__cpu_dispatch_plan(moe_ctx *ctx, const int32_t *chosen, int64_t n, int64_t k, int64_t E,
                                         int64_t *host_offsets, int32_t *row_of, int32_t *slot_of) {
    int64_t *fill = (int64_t *)moe__arena_alloc(ctx, (size_t)E, sizeof(int64_t), "dispatch plan"), t, e;
    if (!fill) return MOE_ERR_MEMORY;
    for (e = 0; e <= E; e++) host_offsets[e] = 0;
    for (t = 0; t < n * k; t++) host_offsets[chosen[t] + 1]++;
    for (e = 0; e < E; e++) {
        host_offsets[e + 1] += host_offsets[e];
        fill[e] = host_offsets[e];
    }
    for (t = 0; t < n * k; t++) {
        int64_t r = fill[chosen[t]]++;
        row_of[t] = (int32_t)r;
        slot_of[r] = (int32_t)t;
    }
    return MOE_OK;
}

typedef struct moe__index_job {
    const moe_real *src, *gates;
    const int32_t *idx;
    moe_real *dst;
    int64_t rows, d, k;
    int32_t div;
} moe__index_job;

static void moe__gather_range(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__index_job *J = (const moe__index_job *)arg;
    int64_t r;
    (void)tid;
    for (r = r0; r < r1; r++)
        memcpy(J->dst + r * J->d, J->src + (int64_t)(J->idx[r] / J->div) * J->d, (size_t)J->d * sizeof(moe_real));
}
static moe_status moe__cpu_gather_rows(moe_ctx *ctx, const moe_real *src, const int32_t *idx, int32_t div, int64_t rows,
                                       int64_t d, moe_real *dst) {
    moe__index_job J;
    memset(&J, 0, sizeof J);
    J.src = src; J.idx = idx; J.div = div; J.rows = rows; J.d = d; J.dst = dst;
    moe__parallel_for(ctx, rows, (double)d, 0, moe__gather_range, &J);
    return MOE_OK;
}
/* Column blocks of 64: every destination row sums its sources in index order. */
static void moe__scatter_add_range(void *arg, int64_t b0, int64_t b1, int tid) {
    const moe__index_job *J = (const moe__index_job *)arg;
    int64_t c0 = b0 * 64, c1 = b1 * 64 < J->d ? b1 * 64 : J->d, r, c;
    (void)tid;
    for (r = 0; r < J->rows; r++) {
        moe_real *dst = J->dst + (int64_t)J->idx[r] * J->d;
        const moe_real *src = J->src + r * J->d;
        for (c = c0; c < c1; c++) dst[c] += src[c];
    }
}
static moe_status moe__cpu_scatter_add_rows(moe_ctx *ctx, const moe_real *src, const int32_t *idx, int64_t rows, int64_t d,
                                            moe_real *dst) {
    moe__index_job J;
    memset(&J, 0, sizeof J);
    J.src = src; J.idx = idx; J.rows = rows; J.d = d; J.dst = dst;
    moe__parallel_for(ctx, (d + 63) / 64, (double)(rows * 64), 0, moe__scatter_add_range, &J);
    return MOE_OK;
}
static void moe__combine_range(void *arg, int64_t t0, int64_t t1, int tid) {
    const moe__index_job *J = (const moe__index_job *)arg;
    int64_t t, k, j;
    (void)tid;
    for (t = t0; t < t1; t++)
        for (k = 0; k < J->k; k++) {
            const moe_real *src = J->src + (int64_t)J->idx[t * J->k + k] * J->d;
            moe_real *y = J->dst + t * J->d;
            if (J->gates) {
                moe_real g = J->gates[t * J->k + k];
                for (j = 0; j < J->d; j++) y[j] += g * src[j];
            } else {
                for (j = 0; j < J->d; j++) y[j] += src[j];
            }
        }
}
static moe_status moe__cpu_combine(moe_ctx *ctx, const moe_real *src, const int32_t *row_of, const moe_real *gates, int64_t n,
                                   int64_t k, int64_t d, moe_real *y) {
    moe__index_job J;
    memset(&J, 0, sizeof J);
    J.src = src; J.idx = row_of; J.gates = gates; J.rows = n; J.k = k; J.d = d; J.dst = y;
    moe__parallel_for(ctx, n, (double)(k * d), 0, moe__combine_range, &J);
    return MOE_OK;
}

static moe_status moe__cpu_expert_gate_bwd(moe_ctx *ctx, const moe_real *gate, int64_t rows, int64_t cols, moe_real *dact,
                                           moe_real *act, moe_real *dgate) {
    int64_t r, j;
    (void)ctx;
    for (r = 0; r < rows; r++) {
        moe_real *da = dact + r * cols, *a = act + r * cols;
        dgate[r] = moe__dot8x(da, a, cols);
        for (j = 0; j < cols; j++) {
            da[j] *= gate[r];
            a[j] *= gate[r]; /* dw2 += dYᵀ·(gate ⊙ act) */
        }
    }
    return MOE_OK;
}

/* ---- FP8 quantisation ------------------------------------------------------------------- */

static moe_status moe__cpu_fp8_quantize(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc,
                                        int pow2, uint8_t *codes, float *scales, moe_real *deq) {
    if (gr < 1 || gc < 1) return moe__fail(ctx, MOE_ERR_ARG, "fp8_quantize: groups of %lld x %lld", (long long)gr, (long long)gc);
    moe__fp8_quantize_all(ctx, x, rows, cols, gr, gc, pow2, codes, scales, deq);
    return MOE_OK;
}
static moe_status moe__cpu_fp8_dequantize(moe_ctx *ctx, const uint8_t *codes, const float *scales, int64_t rows, int64_t cols,
                                          int64_t gr, int64_t gc, moe_real *x) {
    if (gr < 1 || gc < 1) return moe__fail(ctx, MOE_ERR_ARG, "fp8_dequantize: groups of %lld x %lld", (long long)gr, (long long)gc);
    moe__fp8_dequantize_all(ctx, codes, scales, rows, cols, gr, gc, x);
    return MOE_OK;
}

/* ---- element-wise ----------------------------------------------------------------------- */

/* One job shape for the element-wise kernels: ranges of [0, n). */
typedef struct moe__ew_job {
    const void *a, *b;
    void *y;
    moe_dtype at, yt;
    int64_t nb, lda, ldy, cols;
    moe_real alpha;
    int accumulate;
    uint64_t key, counter;
} moe__ew_job;

static void moe__convert_range(void *arg, int64_t i0, int64_t i1, int tid) {
    const moe__ew_job *J = (const moe__ew_job *)arg;
    int64_t i;
    (void)tid;
    if (J->at == MOE_F32 && J->yt == MOE_BF16) {
        const moe_real *x = (const moe_real *)J->a;
        uint16_t *y = (uint16_t *)J->y;
        for (i = i0; i < i1; i++) y[i] = moe_f32_to_bf16((float)x[i]);
    } else if (J->at == MOE_BF16 && J->yt == MOE_F32) {
        const uint16_t *x = (const uint16_t *)J->a;
        moe_real *y = (moe_real *)J->y;
        for (i = i0; i < i1; i++) y[i] = (moe_real)moe_bf16_to_f32(x[i]);
    } else {
        for (i = i0; i < i1; i++) moe__store(J->y, J->yt, i, moe__load(J->a, J->at, i));
    }
}
static moe_status moe__cpu_convert(moe_ctx *ctx, const void *src, moe_dtype src_dtype, int64_t n, void *dst, moe_dtype dst_dtype) {
    moe__ew_job J;
    if (!moe_dtype_size(src_dtype) || !moe_dtype_size(dst_dtype)) return moe__fail(ctx, MOE_ERR_DTYPE, "convert: invalid dtype");
    memset(&J, 0, sizeof J);
    J.a = src; J.at = src_dtype; J.y = dst; J.yt = dst_dtype;
    moe__parallel_for(ctx, n, 1, 0, moe__convert_range, &J);
    return MOE_OK;
}

static void moe__copy2d_range(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__ew_job *J = (const moe__ew_job *)arg;
    int64_t r, c;
    (void)tid;
    for (r = r0; r < r1; r++) {
        const moe_real *s = (const moe_real *)J->a + r * J->lda;
        moe_real *d = (moe_real *)J->y + r * J->ldy;
        if (J->accumulate)
            for (c = 0; c < J->cols; c++) d[c] += s[c];
        else
            memcpy(d, s, (size_t)J->cols * sizeof(moe_real));
    }
}
static moe_status moe__cpu_copy2d(moe_ctx *ctx, const moe_real *src, int64_t lds, int64_t rows, int64_t cols, moe_real *dst,
                                  int64_t ldd, int accumulate) {
    moe__ew_job J;
    memset(&J, 0, sizeof J);
    J.a = src; J.lda = lds; J.cols = cols; J.y = dst; J.ldy = ldd; J.accumulate = accumulate;
    moe__parallel_for(ctx, rows, (double)cols, 0, moe__copy2d_range, &J);
    return MOE_OK;
}

/* y = a + b: items are values (nb = n), or whole repeats of b (no modulo per value). */
static void moe__add_range(void *arg, int64_t i0, int64_t i1, int tid) {
    const moe__ew_job *J = (const moe__ew_job *)arg;
    const moe_real *a = (const moe_real *)J->a, *b = (const moe_real *)J->b;
    moe_real *y = (moe_real *)J->y;
    int64_t i, j;
    (void)tid;
    if (!J->nb)
        for (i = i0; i < i1; i++) y[i] = a[i] + b[i];
    else
        for (i = i0; i < i1; i++)
            for (j = 0; j < J->nb; j++) y[i * J->nb + j] = a[i * J->nb + j] + b[j];
}
static moe_status moe__cpu_add(moe_ctx *ctx, const moe_real *a, const moe_real *b, int64_t n, int64_t nb, moe_real *y) {
    moe__ew_job J;
    if (nb < 1 || n % nb) return moe__fail(ctx, MOE_ERR_SHAPE, "add: %lld values do not repeat %lld", (long long)n, (long long)nb);
    memset(&J, 0, sizeof J);
    J.a = a; J.b = b; J.y = y; J.nb = nb == n ? 0 : nb;
    moe__parallel_for(ctx, J.nb ? n / nb : n, J.nb ? (double)nb : 1, 0, moe__add_range, &J);
    return MOE_OK;
}
static void moe__mul_range(void *arg, int64_t i0, int64_t i1, int tid) {
    const moe__ew_job *J = (const moe__ew_job *)arg;
    const moe_real *a = (const moe_real *)J->a, *b = (const moe_real *)J->b;
    moe_real *y = (moe_real *)J->y;
    int64_t i;
    (void)tid;
    if (J->accumulate)
        for (i = i0; i < i1; i++) y[i] += a[i] * b[i];
    else
        for (i = i0; i < i1; i++) y[i] = a[i] * b[i];
}
static moe_status moe__cpu_mul(moe_ctx *ctx, const moe_real *a, const moe_real *b, int64_t n, moe_real *y, int accumulate) {
    moe__ew_job J;
    memset(&J, 0, sizeof J);
    J.a = a; J.b = b; J.y = y; J.accumulate = accumulate;
    moe__parallel_for(ctx, n, 1, 0, moe__mul_range, &J);
    return MOE_OK;
}
static void moe__scale_range(void *arg, int64_t i0, int64_t i1, int tid) {
    const moe__ew_job *J = (const moe__ew_job *)arg;
    const moe_real *x = (const moe_real *)J->a;
    moe_real *y = (moe_real *)J->y;
    int64_t i;
    (void)tid;
    if (J->accumulate)
        for (i = i0; i < i1; i++) y[i] += J->alpha * x[i];
    else
        for (i = i0; i < i1; i++) y[i] = J->alpha * x[i];
}
static moe_status moe__cpu_scale(moe_ctx *ctx, moe_real alpha, const moe_real *x, int64_t n, moe_real *y) {
    moe__ew_job J;
    memset(&J, 0, sizeof J);
    J.a = x; J.y = y; J.alpha = alpha;
    moe__parallel_for(ctx, n, 1, 0, moe__scale_range, &J);
    return MOE_OK;
}
static moe_status moe__cpu_axpy(moe_ctx *ctx, moe_real alpha, const moe_real *x, int64_t n, moe_real *y) {
    moe__ew_job J;
    memset(&J, 0, sizeof J);
    J.a = x; J.y = y; J.alpha = alpha; J.accumulate = 1;
    moe__parallel_for(ctx, n, 1, 0, moe__scale_range, &J);
    return MOE_OK;
}
static void moe__fill_range(void *arg, int64_t i0, int64_t i1, int tid) {
    const moe__ew_job *J = (const moe__ew_job *)arg;
    moe_real *y = (moe_real *)J->y;
    int64_t i;
    (void)tid;
    for (i = i0; i < i1; i++) y[i] = J->alpha;
}
static moe_status moe__cpu_fill(moe_ctx *ctx, moe_real value, int64_t n, moe_real *x) {
    moe__ew_job J;
    memset(&J, 0, sizeof J);
    J.y = x; J.alpha = value;
    moe__parallel_for(ctx, n, 1, 0, moe__fill_range, &J);
    return MOE_OK;
}
static void moe__fill_normal_range(void *arg, int64_t i0, int64_t i1, int tid) {
    const moe__ew_job *J = (const moe__ew_job *)arg;
    moe_real *y = (moe_real *)J->y, mean = *(const moe_real *)J->a, std = *(const moe_real *)J->b;
    int64_t i;
    (void)tid;
    for (i = i0; i < i1; i++) y[i] = (moe_real)((double)mean + (double)std * moe__rng_normal_at(J->key, J->counter + 2 * (uint64_t)i));
}
static moe_status moe__cpu_fill_normal(moe_ctx *ctx, uint64_t key, uint64_t counter, moe_real mean, moe_real std, int64_t n,
                                       moe_real *x) {
    moe__ew_job J;
    memset(&J, 0, sizeof J);
    J.y = x; J.key = key; J.counter = counter; J.a = &mean; J.b = &std;
    moe__parallel_for(ctx, n, 64, 0, moe__fill_normal_range, &J);
    return MOE_OK;
}

/* ---- reductions ------------------------------------------------------------------------- */

static moe_status moe__cpu_sum(moe_ctx *ctx, const moe_real *x, int64_t n, moe_real *host_sum) {
    moe_real s = 0;
    int64_t i;
    (void)ctx;
    for (i = 0; i < n; i++) s += x[i];
    *host_sum = s;
    return MOE_OK;
}

/* Σ x² of each chunk in double as four interleaved partial sums, then (0+1)+(2+3). */
typedef struct moe__sumsq_job {
    const moe_real *x;
    double *part;
    int64_t n, chunk;
} moe__sumsq_job;
static void moe__sumsq_chunks(void *arg, int64_t c0, int64_t c1, int tid) {
    const moe__sumsq_job *J = (const moe__sumsq_job *)arg;
    int64_t c;
    (void)tid;
    for (c = c0; c < c1; c++) {
        const moe_real *x = J->x + c * J->chunk;
        int64_t n = J->n - c * J->chunk < J->chunk ? J->n - c * J->chunk : J->chunk, i;
        double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (i = 0; i + 4 <= n; i += 4) {
            a0 += (double)x[i] * (double)x[i];
            a1 += (double)x[i + 1] * (double)x[i + 1];
            a2 += (double)x[i + 2] * (double)x[i + 2];
            a3 += (double)x[i + 3] * (double)x[i + 3];
        }
        for (; i < n; i++) a0 += (double)x[i] * (double)x[i];
        J->part[c] = (a0 + a1) + (a2 + a3);
    }
}
static moe_status moe__cpu_sumsq(moe_ctx *ctx, const moe_real *x, int64_t n, int64_t chunk, double *host_parts) {
    moe__sumsq_job J;
    J.x = x;
    J.n = n;
    J.part = host_parts;
    J.chunk = chunk;
    moe__parallel_for(ctx, (n + chunk - 1) / chunk, (double)chunk, 0, moe__sumsq_chunks, &J);
    return MOE_OK;
}

typedef struct moe__colsum_job {
    const moe_real *x;
    moe_real *part;
    int64_t rows, d;
} moe__colsum_job;
static void moe__colsum_chunks(void *arg, int64_t c0, int64_t c1, int tid) {
    const moe__colsum_job *J = (const moe__colsum_job *)arg;
    int64_t c, r, j;
    (void)tid;
    for (c = c0; c < c1; c++) {
        int64_t r1 = (c + 1) * MOE__ROW_CHUNK < J->rows ? (c + 1) * MOE__ROW_CHUNK : J->rows;
        moe_real *p = J->part + c * J->d;
        for (j = 0; j < J->d; j++) p[j] = 0;
        for (r = c * MOE__ROW_CHUNK; r < r1; r++)
            for (j = 0; j < J->d; j++) p[j] += J->x[r * J->d + j];
    }
}
static moe_status moe__cpu_colsum(moe_ctx *ctx, const moe_real *x, int64_t rows, int64_t d, moe_real *out) {
    moe__colsum_job J;
    int64_t nchunks = (rows + MOE__ROW_CHUNK - 1) / MOE__ROW_CHUNK, c, j;
    J.x = x;
    J.rows = rows;
    J.d = d;
    if (!(J.part = moe__dev_real(ctx, nchunks * d, "colsum"))) return MOE_ERR_MEMORY;
    moe__parallel_for(ctx, nchunks, (double)(MOE__ROW_CHUNK * d), 0, moe__colsum_chunks, &J);
    for (c = 0; c < nchunks; c++)
        for (j = 0; j < d; j++) out[j] += J.part[c * d + j];
    return MOE_OK;
}

/* ---- AdamW ------------------------------------------------------------------------------ */

/* The per-element constants of one AdamW step for one parameter. */
typedef struct moe__adamw_k {
    float gs, b1, b2, eps, step, inv_bc2, decay;
} moe__adamw_k;

/* In float: g ← g·gs; m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
   p ← p − (step·m/(sqrt(v·inv_bc2) + eps) + decay·p); then the gradient is zeroed. The AVX2
   lanes do the same operations in the same order (no FMA), so every value is the same. */
static void moe__adamw_update_f32(moe_real *p, moe_real *g, float *mm, float *vv, int64_t n, const moe__adamw_k *k) {
    int64_t j = 0;
#ifdef MOE__SIMD_AVX2
    const __m256 gs = _mm256_set1_ps(k->gs), b1 = _mm256_set1_ps(k->b1), c1 = _mm256_set1_ps(1 - k->b1),
                 b2 = _mm256_set1_ps(k->b2), c2 = _mm256_set1_ps(1 - k->b2), eps = _mm256_set1_ps(k->eps),
                 step = _mm256_set1_ps(k->step), ib = _mm256_set1_ps(k->inv_bc2), decay = _mm256_set1_ps(k->decay);
    for (; j + 8 <= n; j += 8) {
        __m256 gj = _mm256_mul_ps(_mm256_loadu_ps(g + j), gs), pj = _mm256_loadu_ps(p + j);
        __m256 mj = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(mm + j)), _mm256_mul_ps(c1, gj));
        __m256 vj = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(vv + j)), _mm256_mul_ps(_mm256_mul_ps(c2, gj), gj));
        __m256 u = _mm256_div_ps(_mm256_mul_ps(step, mj), _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(vj, ib)), eps));
        _mm256_storeu_ps(mm + j, mj);
        _mm256_storeu_ps(vv + j, vj);
        _mm256_storeu_ps(p + j, _mm256_sub_ps(pj, _mm256_add_ps(u, _mm256_mul_ps(decay, pj))));
        _mm256_storeu_ps(g + j, _mm256_setzero_ps());
    }
#endif
    for (; j < n; j++) {
        float gj = (float)g[j] * k->gs, mj = k->b1 * mm[j] + (1 - k->b1) * gj, vj = k->b2 * vv[j] + (1 - k->b2) * gj * gj;
        mm[j] = mj;
        vv[j] = vj;
        p[j] -= (moe_real)(k->step * mj / (sqrtf(vj * k->inv_bc2) + k->eps) + k->decay * (float)p[j]);
        g[j] = 0;
    }
}
static void moe__adamw_update_bf16(moe_real *p, moe_real *g, uint16_t *mm, uint16_t *vv, int64_t n, const moe__adamw_k *k) {
    int64_t j;
    for (j = 0; j < n; j++) {
        float gj = (float)g[j] * k->gs, mj = k->b1 * moe_bf16_to_f32(mm[j]) + (1 - k->b1) * gj;
        float vj = k->b2 * moe_bf16_to_f32(vv[j]) + (1 - k->b2) * gj * gj;
        mm[j] = moe_f32_to_bf16(mj);
        vv[j] = moe_f32_to_bf16(vj);
        p[j] -= (moe_real)(k->step * mj / (sqrtf(vj * k->inv_bc2) + k->eps) + k->decay * (float)p[j]);
        g[j] = 0;
    }
}

/* The update runs over the slab in fixed slices of MOE__ADAMW_SLICE values, each the parts
   of the segments it overlaps (the gaps between tensors are skipped), split over the threads:
   every value's arithmetic is its own, so no split changes it. */
#define MOE__ADAMW_SLICE 32768
static void moe__adamw_range(void *arg, int64_t s0, int64_t s1, int tid) {
    const moe__adamw_op *op = (const moe__adamw_op *)arg;
    const moe__adamw_segment *seg = op->host_segments;
    int64_t lo = 0, hi = op->n_segments, a = s0 * MOE__ADAMW_SLICE, b = s1 * MOE__ADAMW_SLICE, i;
    moe__adamw_k k;
    (void)tid;
    k.gs = op->grad_scale; k.b1 = op->beta1; k.b2 = op->beta2; k.eps = op->eps; k.step = op->step; k.inv_bc2 = op->inv_bc2;
    while (lo < hi) { /* the first segment that ends after a (segments are in slab order) */
        int64_t mid = (lo + hi) / 2;
        if (seg[mid].start + seg[mid].len <= a) lo = mid + 1;
        else hi = mid;
    }
    for (i = lo; i < op->n_segments && seg[i].start < b; i++) {
        int64_t at = seg[i].start > a ? seg[i].start : a, end = seg[i].start + seg[i].len < b ? seg[i].start + seg[i].len : b;
        k.decay = seg[i].decay;
        if (op->moment_dtype == MOE_BF16)
            moe__adamw_update_bf16(op->p + at, op->g + at, (uint16_t *)op->m + at, (uint16_t *)op->v + at, end - at, &k);
        else
            moe__adamw_update_f32(op->p + at, op->g + at, (float *)op->m + at, (float *)op->v + at, end - at, &k);
    }
}
static moe_status moe__cpu_adamw(moe_ctx *ctx, const moe__adamw_op *op) {
    int64_t end = op->n_segments ? op->host_segments[op->n_segments - 1].start + op->host_segments[op->n_segments - 1].len : 0;
    moe__parallel_for(ctx, (end + MOE__ADAMW_SLICE - 1) / MOE__ADAMW_SLICE, MOE__ADAMW_SLICE, 0, moe__adamw_range, (void *)op);
    return MOE_OK;
}

/* ---- distillation rows (the losses and gradients are stated in section 11) ---------------- */

#define MOE__DISTILL_TAIL_FLOOR 1e-30

/* Log-sum-exp of s·x[j] over j < n, skipping ids marked in `skip` (NULL: none); −inf when
   every id is skipped. */
static moe_real moe__distill_lse(const moe_real *x, int64_t n, moe_real s, const unsigned char *skip) {
    moe_real m = -(moe_real)INFINITY, sum = 0;
    int64_t j;
    for (j = 0; j < n; j++)
        if (!(skip && skip[j]) && s * x[j] > m) m = s * x[j];
    if (m == -(moe_real)INFINITY) return m;
    for (j = 0; j < n; j++)
        if (!(skip && skip[j])) sum += moe__exp(s * x[j] - m);
    return m + moe__ln(sum);
}

static int moe__distill_counts(const moe__distill_op *D, int64_t r) {
    return !D->labels || D->labels[r] != D->ignore_index;
}

/* Forward of rows [r0, r1): per-row CE (at T = 1) into ce[r], KL (at T) into D->kl[r]. */
static void moe__distill_rows_fwd(const moe__distill_op *D, const moe_real *zs, int64_t r0, int64_t r1, unsigned char *mark,
                                  moe_real *ce) {
    const int64_t V = D->V, k = D->k;
    const moe_real invT = (moe_real)1 / D->temperature;
    const int fwd = !D->reverse;
    int64_t r, j, i;
    for (r = r0; r < r1; r++) {
        const moe_real *x = zs + r * V;
        moe_real lseT, kr = 0;
        ce[r] = 0;
        D->kl[r] = 0;
        if (!moe__distill_counts(D, r)) continue;
        if (D->labels) {
            D->lse1[r] = moe__distill_lse(x, V, 1, NULL);
            ce[r] = D->lse1[r] - x[D->labels[r]];
        }
        lseT = D->lseT[r] = moe__distill_lse(x, V, invT, NULL);
        if (!k) {
            const moe_real *y = D->zt + r * V;
            moe_real lset = D->lseX[r] = moe__distill_lse(y, V, invT, NULL);
            for (j = 0; j < V; j++) {
                moe_real lp = invT * y[j] - lset, lq = invT * x[j] - lseT;
                kr += fwd ? moe__exp(lp) * (lp - lq) : moe__exp(lq) * (lq - lp);
            }
        } else {
            const int32_t *ids = D->ids + r * k;
            const moe_real *lp = D->logp + r * k, pR = D->tail[r];
            moe_real lseR, lqR;
            for (i = 0; i < k; i++) mark[ids[i]] = 1;
            lseR = D->lseX[r] = k < V ? moe__distill_lse(x, V, invT, mark) : -(moe_real)INFINITY;
            for (i = 0; i < k; i++) mark[ids[i]] = 0;
            lqR = lseR - lseT;
            for (i = 0; i < k; i++) {
                moe_real lq = invT * x[ids[i]] - lseT;
                kr += fwd ? moe__exp(lp[i]) * (lp[i] - lq) : moe__exp(lq) * (lq - lp[i]);
            }
            if (k < V) {
                if (fwd) {
                    if (pR > 0) kr += pR * (moe__ln(pR) - lqR);
                } else {
                    moe_real lpR = moe__ln(pR > (moe_real)MOE__DISTILL_TAIL_FLOOR ? pR : (moe_real)MOE__DISTILL_TAIL_FLOOR);
                    kr += moe__exp(lqR) * (lqR - lpR);
                }
            }
        }
        D->kl[r] = kr;
    }
}

/* Backward of rows [r0, r1): dz += scale·(α·(softmax(z) − onehot) + (1−α)·T·dKL/da). */
static void moe__distill_rows_bwd(const moe__distill_op *D, const moe_real *zs, int64_t r0, int64_t r1, unsigned char *mark,
                                  moe_real scale, moe_real *dz) {
    const int64_t V = D->V, k = D->k;
    const moe_real T = D->temperature, invT = (moe_real)1 / T, alpha = D->alpha;
    const moe_real ks = scale * (1 - alpha) * T;
    const int fwd = !D->reverse;
    int64_t r, j, i;
    for (r = r0; r < r1; r++) {
        const moe_real *x = zs + r * V;
        moe_real *d = dz + r * V, lseT = D->lseT[r], klr = D->kl[r];
        if (!moe__distill_counts(D, r)) continue;
        if (D->labels && alpha > 0) {
            moe_real cs = scale * alpha, l1 = D->lse1[r];
            for (j = 0; j < V; j++) d[j] += cs * moe__exp(x[j] - l1);
            d[D->labels[r]] -= cs;
        }
        if (ks == 0) continue;
        if (!k) {
            const moe_real *y = D->zt + r * V;
            moe_real lset = D->lseX[r];
            for (j = 0; j < V; j++) {
                moe_real lp = invT * y[j] - lset, lq = invT * x[j] - lseT, q = moe__exp(lq);
                d[j] += ks * (fwd ? q - moe__exp(lp) : q * (lq - lp - klr));
            }
        } else {
            const int32_t *ids = D->ids + r * k;
            const moe_real *lp = D->logp + r * k, pR = D->tail[r], lseR = D->lseX[r], lqR = lseR - lseT;
            const moe_real lpR = moe__ln(pR > (moe_real)MOE__DISTILL_TAIL_FLOOR ? pR : (moe_real)MOE__DISTILL_TAIL_FLOOR);
            moe_real P = pR;
            for (i = 0; i < k; i++) {
                P += moe__exp(lp[i]);
                mark[ids[i]] = 1;
            }
            if (k < V) /* the tail bucket: ids outside S */
                for (j = 0; j < V; j++) {
                    moe_real q;
                    if (mark[j]) continue;
                    q = moe__exp(invT * x[j] - lseT);
                    /* q_j/q_R = exp(a_j − lse_tail): no division by a tail that may underflow */
                    d[j] += ks * (fwd ? P * q - pR * moe__exp(invT * x[j] - lseR) : q * (lqR - lpR - klr));
                }
            for (i = 0; i < k; i++) {
                int32_t id = ids[i];
                moe_real lq = invT * x[id] - lseT, q = moe__exp(lq);
                mark[id] = 0;
                d[id] += ks * (fwd ? P * q - moe__exp(lp[i]) : q * (lq - lp[i] - klr));
            }
        }
    }
}


typedef struct moe__distill_job {
    const moe__distill_op *op;
    const moe_real *zs;
    moe_real *ce, *dz, scale;
    unsigned char *mark; /* top-k: V bytes per thread, zero between rows */
} moe__distill_job;
static void moe__distill_fwd_range(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__distill_job *J = (const moe__distill_job *)arg;
    moe__distill_rows_fwd(J->op, J->zs, r0, r1, J->mark ? J->mark + (int64_t)tid * J->op->V : NULL, J->ce);
}
static void moe__distill_bwd_range(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__distill_job *J = (const moe__distill_job *)arg;
    moe__distill_rows_bwd(J->op, J->zs, r0, r1, J->mark ? J->mark + (int64_t)tid * J->op->V : NULL, J->scale, J->dz);
}
static moe_status moe__distill_job_init(moe_ctx *ctx, const moe__distill_op *op, const moe_real *zs, moe__distill_job *J) {
    memset(J, 0, sizeof *J);
    J->op = op;
    J->zs = zs;
    if (op->k) {
        J->mark = (unsigned char *)moe__arena_alloc(ctx, (size_t)ctx->conf.n_threads, (size_t)op->V, "distillation");
        if (!J->mark) return MOE_ERR_MEMORY;
    }
    return MOE_OK;
}
static moe_status moe__cpu_distill_fwd(moe_ctx *ctx, const moe__distill_op *op, const moe_real *zs, double *host_ce,
                                       double *host_kl, int64_t *host_count) {
    moe__distill_job J;
    double ce_sum = 0, kl_sum = 0;
    int64_t r, count = 0;
    MOE__TRY(moe__distill_job_init(ctx, op, zs, &J));
    if (!(J.ce = moe__dev_real(ctx, op->rows, "distillation"))) return MOE_ERR_MEMORY;
    moe__parallel_for(ctx, op->rows, (double)op->V, 0, moe__distill_fwd_range, &J);
    for (r = 0; r < op->rows; r++) { /* fixed order: the same sum for any thread count */
        if (!moe__distill_counts(op, r)) continue;
        ce_sum += (double)J.ce[r];
        kl_sum += (double)op->kl[r];
        count++;
    }
    *host_ce = ce_sum;
    *host_kl = kl_sum;
    *host_count = count;
    return MOE_OK;
}
static moe_status moe__cpu_distill_bwd(moe_ctx *ctx, const moe__distill_op *op, const moe_real *zs, moe_real scale,
                                       moe_real *dzs) {
    moe__distill_job J;
    MOE__TRY(moe__distill_job_init(ctx, op, zs, &J));
    J.scale = scale;
    J.dz = dzs;
    moe__parallel_for(ctx, op->rows, (double)op->V, 0, moe__distill_bwd_range, &J);
    return MOE_OK;
}

typedef struct moe__topk_teacher_job {
    const moe_real *z;
    int64_t V, k;
    double invT;
    int32_t *ids;
    moe_real *logp, *tail;
    double *lp;          /* V per thread */
    unsigned char *mark; /* V per thread, zero between rows */
    int64_t *top;        /* k per thread */
} moe__topk_teacher_job;
static void moe__teacher_topk_rows(void *arg, int64_t r0, int64_t r1, int tid) {
    const moe__topk_teacher_job *J = (const moe__topk_teacher_job *)arg;
    const int64_t V = J->V, k = J->k;
    double *lp = J->lp + (int64_t)tid * V;
    unsigned char *mark = J->mark + (int64_t)tid * V;
    int64_t *top = J->top + (int64_t)tid * k, r, j, i;
    for (r = r0; r < r1; r++) {
        const moe_real *z = J->z + r * V;
        double mx = -INFINITY, sum = 0, lse, tail = 0;
        int64_t n = 0;
        for (j = 0; j < V; j++)
            if ((double)z[j] > mx) mx = (double)z[j];
        for (j = 0; j < V; j++) sum += exp(((double)z[j] - mx) * J->invT);
        lse = log(sum);
        /* top-k by insertion into a descending list; an equal value stays behind the lower id */
        for (j = 0; j < V; j++) {
            double v = lp[j] = ((double)z[j] - mx) * J->invT - lse;
            int64_t pos;
            if (n == k && v <= lp[top[k - 1]]) continue;
            pos = n < k ? n++ : k - 1;
            while (pos > 0 && v > lp[top[pos - 1]]) {
                top[pos] = top[pos - 1];
                pos--;
            }
            top[pos] = j;
        }
        for (i = 0; i < k; i++) mark[top[i]] = 1;
        for (j = 0; j < V; j++)
            if (!mark[j]) tail += exp(lp[j]);
        for (i = 0; i < k; i++) {
            mark[top[i]] = 0;
            J->ids[r * k + i] = (int32_t)top[i];
            J->logp[r * k + i] = (moe_real)(float)lp[top[i]];
        }
        J->tail[r] = (moe_real)(float)tail;
    }
}
static moe_status moe__cpu_teacher_topk(moe_ctx *ctx, const moe_real *z, int64_t rows, int64_t V, int64_t k, moe_real temperature,
                                        int32_t *ids, moe_real *logp, moe_real *tail) {
    moe__topk_teacher_job J;
    int64_t i, nt = ctx->conf.n_threads;
    for (i = 0; i < rows * V; i++)
        if (!isfinite((double)z[i]))
            return moe__fail(ctx, MOE_ERR_NUMERIC, "teacher logit %lld of row %lld is %g", (long long)(i % V), (long long)(i / V),
                             (double)z[i]);
    memset(&J, 0, sizeof J);
    J.z = z; J.V = V; J.k = k; J.invT = 1.0 / (double)temperature; J.ids = ids; J.logp = logp; J.tail = tail;
    J.lp = (double *)moe__arena_alloc(ctx, (size_t)(nt * V), sizeof(double), "teacher top-k");
    J.mark = (unsigned char *)moe__arena_alloc(ctx, (size_t)(nt * V), 1, "teacher top-k");
    J.top = (int64_t *)moe__arena_alloc(ctx, (size_t)(nt * k), sizeof(int64_t), "teacher top-k");
    if (!J.lp || !J.mark || !J.top) return MOE_ERR_MEMORY;
    moe__parallel_for(ctx, rows, (double)(4 * V), 0, moe__teacher_topk_rows, &J);
    return MOE_OK;
}

/* ---- the table ---- */

static const moe_backend moe__cpu_table = {
    "cpu", MOE_DEVICE_CPU,
    moe__cpu_alloc, moe__cpu_free, moe__cpu_copy, moe__cpu_memset, moe__cpu_scratch,
    moe__cpu_gemm, moe__cpu_gemm_grouped,
    moe__cpu_rmsnorm_fwd, moe__cpu_rmsnorm_bwd, moe__cpu_softmax_fwd, moe__cpu_softmax_bwd, moe__cpu_xent_fwd,
    moe__cpu_xent_bwd, moe__cpu_swiglu_fwd, moe__cpu_swiglu_bwd, moe__cpu_rope, moe__cpu_topk_fwd, moe__cpu_topk_bwd,
    moe__cpu_attention_fwd, moe__cpu_attention_bwd, moe__cpu_attention_decode,
    moe__cpu_mla_split_kv, moe__cpu_mla_merge_kv, moe__cpu_router_fwd, moe__cpu_router_bwd, moe__cpu_balance_loss,
    moe__cpu_dispatch_plan, moe__cpu_gather_rows, moe__cpu_scatter_add_rows, moe__cpu_combine, moe__cpu_expert_gate_bwd,
    moe__cpu_fp8_quantize, moe__cpu_fp8_dequantize,
    moe__cpu_convert, moe__cpu_copy2d, moe__cpu_add, moe__cpu_mul, moe__cpu_scale, moe__cpu_axpy, moe__cpu_fill,
    moe__cpu_fill_normal,
    moe__cpu_sum, moe__cpu_sumsq, moe__cpu_colsum,
    moe__cpu_adamw, moe__cpu_distill_fwd, moe__cpu_distill_bwd, moe__cpu_teacher_topk};

static const moe_backend *moe__cpu_backend(void) { return &moe__cpu_table; }
/* ============================================================================================
   6. tensor — tensors on the context's device                                         >>tensor
   ============================================================================================
   Tensors live on the context's device: their memory comes from its backend (moe_tensor_new,
   the slabs of a model) or its step arena (op outputs), and every op refuses a tensor of
   another device. Element access (get, set, print) reads host tensors. */

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
    t->device = ctx ? MOE__BE(ctx)->device : MOE_DEVICE_CPU;
    return MOE_OK;
}

/* The kernels that own memory of `device`: the context's, or the CPU's for host memory. */
static const moe_backend *moe__backend_of(const moe_ctx *ctx, moe_device device) {
    if (ctx && MOE__BE(ctx)->device == device) return MOE__BE(ctx);
    return moe__backend_for(device);
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
    if (MOE__BE(ctx)->alloc(ctx, bytes, &t->data) != MOE_OK) {
        MOE_FREE(t);
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_tensor_new: out of memory for %zu bytes", bytes);
    }
    *out = t;
    return MOE_OK;
}

MOE_API void moe_tensor_free(moe_ctx *ctx, moe_tensor *t) {
    const moe_backend *be;
    if (!t || t->in_arena) return; /* arena tensors go with moe_ctx_reset */
    be = moe__backend_of(ctx, t->device);
    if (t->grad && !t->grad->base) {
        if (be) be->free(ctx, t->grad->data);
        MOE_FREE(t->grad);
    } else {
        MOE_FREE(t->grad); /* a view into a gradient slab: the slab's owner frees it */
    }
    if (!t->base) {
        if (be) be->free(ctx, t->data);
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
    t->data = moe__dev_scratch(ctx, meta.numel, moe_dtype_size(dtype), "moe_tensor_temp");
    if (!t->data) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->memset(ctx, t->data, 0, (size_t)meta.numel * moe_dtype_size(dtype)));
    *out = t;
    return MOE_OK;
}

/* An op's output in the step arena, NOT zeroed: for outputs the op writes in full. */
static moe_status moe__tensor_out(moe_ctx *ctx, int ndim, const int64_t *shape, moe_tensor **out) {
    moe_tensor meta, *t;
    MOE__TRY(moe__tensor_meta(ctx, "op output", &meta, MOE_F32, ndim, shape));
    if (!(t = (moe_tensor *)moe__arena_alloc_raw(ctx, sizeof *t))) { /* all of it assigned below */
        moe__fail(ctx, MOE_ERR_MEMORY, "op output: no step memory for a tensor header");
        return MOE_ERR_MEMORY;
    }
    *t = meta;
    t->in_arena = 1;
    t->data = moe__dev_real(ctx, meta.numel, "op output");
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
    if (!t || !t->data || i < 0 || i >= t->numel || t->device != MOE_DEVICE_CPU) return NAN;
    return moe__tensor_value(t, i);
}
MOE_API moe_status moe_tensor_set(moe_tensor *t, int64_t i, double value) {
    if (!t || !t->data || i < 0 || i >= t->numel || t->scales || t->device != MOE_DEVICE_CPU) return MOE_ERR_ARG;
    moe__store(t->data, t->dtype, i, value);
    return MOE_OK;
}

static moe_status moe__tensor_transfer(moe_ctx *ctx, const char *fn, const moe_tensor *t, void *dst, const void *src, size_t bytes,
                                       moe__copy_kind kind) {
    const moe_backend *be;
    MOE__CHECK_CTX(ctx);
    if (!t || !t->data || !dst || !src) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL tensor or host buffer", fn);
    if (bytes != (size_t)t->numel * moe_dtype_size(t->dtype))
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: %zu bytes for a tensor of %zu", fn, bytes, (size_t)t->numel * moe_dtype_size(t->dtype));
    be = moe__backend_of(ctx, t->device);
    if (!be) return moe__fail(ctx, MOE_ERR_ARG, "%s: the tensor is on a device this context cannot reach", fn);
    return be->copy(ctx, dst, src, bytes, kind);
}
MOE_API moe_status moe_tensor_download(moe_ctx *ctx, const moe_tensor *t, void *host, size_t bytes) {
    return moe__tensor_transfer(ctx, "moe_tensor_download", t, host, t ? t->data : NULL, bytes, MOE__D2H);
}
MOE_API moe_status moe_tensor_upload(moe_ctx *ctx, moe_tensor *t, const void *host, size_t bytes) {
    return moe__tensor_transfer(ctx, "moe_tensor_upload", t, t ? t->data : NULL, host, bytes, MOE__H2D);
}

static int moe__same_shape(const moe_tensor *a, const moe_tensor *b) {
    int i;
    if (a->ndim != b->ndim) return 0;
    for (i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

/* "[2, 3, 4]" into buf, from dims (also the safetensors and HF messages) or a tensor. */
static const char *moe__dims_str(char *buf, size_t size, int ndim, const int64_t *shape) {
    int i;
    size_t used = 0;
    buf[0] = 0;
    used += (size_t)snprintf(buf, size, "[");
    for (i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (used < size) snprintf(buf + used, size - used, "]");
    return buf;
}
static const char *moe__shape_str(const moe_tensor *t, char *buf, size_t size) {
    return t ? moe__dims_str(buf, size, t->ndim, t->shape) : "(null)";
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
    if (dst->device != MOE__BE(ctx)->device || src->device != MOE__BE(ctx)->device)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_copy: both tensors must be on the context's device");
    if (!dst->scales && !src->scales) {
        if (dst->dtype == src->dtype)
            return MOE__BE(ctx)->copy(ctx, dst->data, src->data, (size_t)src->numel * moe_dtype_size(src->dtype), MOE__D2D);
        return MOE__BE(ctx)->convert(ctx, src->data, src->dtype, src->numel, dst->data, dst->dtype);
    }
    if (MOE__BE(ctx)->device != MOE_DEVICE_CPU)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_tensor_copy: tensors with FP8 scales are host tensors");
    if (dst->dtype == MOE_FP8_E4M3 && dst->scales) {
        /* Quantise through float tiles, row by row of the last dim. */
        int64_t last = dst->shape[dst->ndim - 1], rows = dst->numel / last, B = dst->scale_block;
        float *tmp = (float *)moe__arena_alloc(ctx, (size_t)dst->numel, sizeof(float), "moe_tensor_copy");
        if (!tmp) return MOE_ERR_MEMORY;
        for (i = 0; i < src->numel; i++) tmp[i] = (float)moe__tensor_value(src, i);
        if (dst->scale_2d) return moe_fp8_quantize_blocks(ctx, tmp, rows, last, B, (uint8_t *)dst->data, dst->scales);
        return moe_fp8_quantize_tiles(ctx, tmp, rows, last, B, (uint8_t *)dst->data, dst->scales);
    }
    for (i = 0; i < src->numel; i++) moe__store(dst->data, dst->dtype, i, moe__tensor_value(src, i));
    return MOE_OK;
}

MOE_API moe_status moe_tensor_fill(moe_ctx *ctx, moe_tensor *t, double value) {
    int64_t i;
    MOE__CHECK_CTX(ctx);
    if (!t || !t->data) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_fill: NULL tensor");
    if (t->scales) return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_tensor_fill: fill a scaled FP8 tensor via moe_tensor_copy");
    if (t->device != MOE__BE(ctx)->device) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_fill: the tensor is on another device");
    if (t->dtype == MOE_F32) return MOE__BE(ctx)->fill(ctx, (moe_real)value, t->numel, (moe_real *)t->data);
    if (t->device != MOE_DEVICE_CPU) return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_tensor_fill: f32 tensors only on a device");
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
    if (t->device != MOE__BE(ctx)->device) return moe__fail(ctx, MOE_ERR_ARG, "moe_tensor_fill_normal: the tensor is on another device");
    if (t->dtype == MOE_F32) {
        MOE__TRY(MOE__BE(ctx)->fill_normal(ctx, rng->key, rng->counter, (moe_real)mean, (moe_real)std, t->numel, (moe_real *)t->data));
    } else if (t->device == MOE_DEVICE_CPU) {
        for (i = 0; i < t->numel; i++)
            moe__store(t->data, t->dtype, i, (double)mean + (double)std * moe__rng_normal_at(rng->key, rng->counter + 2 * (uint64_t)i));
    } else {
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_tensor_fill_normal: f32 tensors only on a device");
    }
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
    n = t->device != MOE_DEVICE_CPU ? 0 : t->numel < 8 ? t->numel : 8;
    for (i = 0; i < n && used < sizeof line; i++)
        used += (size_t)snprintf(line + used, sizeof line - used, " %.6g", moe__tensor_value(t, i));
    if (t->numel > n && used < sizeof line) snprintf(line + used, sizeof line - used, " ...");
    moe__log(ctx, 0, "%s", line);
}

MOE_API void moe_tensor_zero_grad(moe_tensor *t) {
    const moe_backend *be = t ? moe__backend_for(t->device) : NULL;
    if (be && t->grad && t->grad->data) be->memset(NULL, t->grad->data, 0, (size_t)t->grad->numel * sizeof(moe_real));
}

/* Element i of a tensor on the context's device, read into host memory (the loss, a norm). */
static moe_real moe__tensor_at(moe_ctx *ctx, const moe_tensor *t, int64_t i) {
    moe_real v = 0;
    if (MOE__BE(ctx)->copy(ctx, &v, (const moe_real *)t->data + i, sizeof v, MOE__D2H) != MOE_OK) return (moe_real)NAN;
    return v;
}

/* n values of the context's device as host floats (the public API's logits). */
static moe_status moe__download_floats(moe_ctx *ctx, float *dst, const moe_real *src, int64_t n) {
    moe_real *tmp;
    int64_t i;
    if (sizeof(moe_real) == sizeof(float)) return MOE__BE(ctx)->copy(ctx, dst, src, (size_t)n * sizeof(float), MOE__D2H);
    if (!(tmp = (moe_real *)moe__arena_alloc(ctx, (size_t)n, sizeof(moe_real), "download"))) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->copy(ctx, tmp, src, (size_t)n * sizeof(moe_real), MOE__D2H));
    for (i = 0; i < n; i++) dst[i] = (float)tmp[i];
    return MOE_OK;
}
/* ============================================================================================
   7. autograd — the tape and the differentiable ops                                 >>autograd
   ============================================================================================
   A tape of nodes recorded in the step arena during forward and replayed in reverse by
   moe_backward, and the differentiable ops: each checks its inputs, gets its output from the
   device's step memory, calls kernels and, when an input takes gradients and recording is
   on, appends a node whose backward calls kernels again. */

typedef moe_status (*moe__backward_fn)(moe_ctx *ctx, moe__node *node);

/* One recorded op: its output, up to three inputs, and what its backward needs. */
struct moe__node {
    moe__backward_fn backward;
    moe_tensor *out;
    moe_tensor *in[3];
    void *saved;      /* op-specific saved values (rstd, log-sum-exp, indices, ...) */
    const void *cptr; /* op-specific constant data (a RoPE table) */
    double f[2];
    int64_t i[5];
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
        g->data = moe__dev_zeros(ctx, t->numel, "backward");
        if (!g->data) return NULL;
        t->grad = g;
    }
    return (moe_real *)t->grad->data;
}
#define MOE__GRAD_OR_FAIL(var, ctx, t) \
    do { var = moe__grad(ctx, t); if ((t)->requires_grad && !var) return MOE_ERR_MEMORY; } while (0)

static int moe__any_grad(const moe_ctx *ctx, const moe_tensor *a, const moe_tensor *b, const moe_tensor *c) {
    return ctx->conf.grad_enabled && ((a && a->requires_grad) || (b && b->requires_grad) || (c && c->requires_grad));
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
    if (loss->device != MOE__BE(ctx)->device) return moe__fail(ctx, MOE_ERR_ARG, "moe_backward: the loss is on another device");
    v = (double)moe__tensor_at(ctx, loss, 0);
    if (!isfinite(v)) return moe__fail(ctx, MOE_ERR_NUMERIC, "moe_backward: loss is %g", v);
    g = moe__grad(ctx, loss);
    if (!g) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->fill(ctx, 1, 1, g));
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

static moe_status moe__check_device(moe_ctx *ctx, const char *fn, const moe_tensor *t, const char *what) {
    if (t->device != MOE__BE(ctx)->device)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: %s is on the %s, the context computes on the %s", fn, what,
                         t->device == MOE_DEVICE_CPU ? "CPU" : "GPU", MOE__BE(ctx)->device == MOE_DEVICE_CPU ? "CPU" : "GPU");
    return MOE_OK;
}
static moe_status moe__check_f32(moe_ctx *ctx, const char *fn, const moe_tensor *t, const char *what) {
    if (!t || !t->data) return moe__fail(ctx, MOE_ERR_ARG, "%s: %s is NULL", fn, what);
    if (t->dtype != MOE_F32)
        return moe__fail(ctx, MOE_ERR_DTYPE, "%s: %s must be f32, got %s", fn, what, moe_dtype_name(t->dtype));
    return moe__check_device(ctx, fn, t, what);
}
static moe_status moe__check_i32(moe_ctx *ctx, const char *fn, const moe_tensor *t, const char *what) {
    if (!t || !t->data) return moe__fail(ctx, MOE_ERR_ARG, "%s: %s is NULL", fn, what);
    if (t->dtype != MOE_I32)
        return moe__fail(ctx, MOE_ERR_DTYPE, "%s: %s must be i32, got %s", fn, what, moe_dtype_name(t->dtype));
    return moe__check_device(ctx, fn, t, what);
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


/* ---- views ---- */

static moe_status moe__view_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    return MOE__BE(ctx)->axpy(ctx, 1, MOE__F32(n->out->grad), n->out->numel, dx + n->i[0]);
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

/* y = x·Wᵀ, batch b of a 3-D W with batch b of x: the descriptor of the forward product. */
static moe__gemm_op moe__matmul_op(const moe__node *n, const moe_tensor *x, const moe_tensor *w, moe_real *y) {
    int64_t batches = n->i[0], M = n->i[1], N = n->i[2], K = n->i[3];
    moe__gemm_op g = moe__gemm_1(M, N, K, MOE__F32(x), K, 0, MOE__F32(w), K, 1, y, N, 0, (moe_dtype)n->i[4]);
    g.batch = batches;
    g.stride_a = M * K;
    g.stride_b = N * K;
    g.stride_c = M * N;
    return g;
}

static moe_status moe__matmul_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *w = n->in[1];
    moe_real *dy = MOE__F32(n->out->grad), *dx, *dw;
    int64_t batches = n->i[0], M = n->i[1], N = n->i[2], K = n->i[3];
    moe_dtype prec = (moe_dtype)n->i[4];
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    MOE__GRAD_OR_FAIL(dw, ctx, w);
    if (dx) { /* dx += dy·W */
        moe__gemm_op g = moe__gemm_1(M, K, N, dy, N, 0, MOE__F32(w), K, 0, dx, K, 1, prec);
        g.batch = batches; g.stride_a = M * N; g.stride_b = N * K; g.stride_c = M * K;
        MOE__TRY(MOE__BE(ctx)->gemm(ctx, &g));
    }
    if (dw) { /* dw += dyᵀ·x */
        moe__gemm_op g = moe__gemm_1(N, K, M, dy, N, 1, MOE__F32(x), K, 0, dw, K, 1, prec);
        g.batch = batches; g.stride_a = M * N; g.stride_b = M * K; g.stride_c = N * K;
        MOE__TRY(MOE__BE(ctx)->gemm(ctx, &g));
    }
    return MOE_OK;
}

MOE_API moe_status moe_matmul(moe_ctx *ctx, moe_tensor *x, moe_tensor *w, moe_tensor **y) {
    static const char *fn = "moe_matmul";
    int64_t shape[MOE_MAX_DIMS], batches, M, N, K;
    moe__node *n, meta;
    moe__gemm_op g;
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
    MOE__TRY(moe__tensor_out(ctx, x->ndim, shape, y));
    memset(&meta, 0, sizeof meta);
    meta.i[0] = batches; meta.i[1] = M; meta.i[2] = N; meta.i[3] = K;
    meta.i[4] = ctx->conf.gemm_compute != MOE_F32 ? MOE_BF16 : MOE_F32; /* FP8 mode: generic matmuls (head, MTP projection) in BF16 */
    g = moe__matmul_op(&meta, x, w, MOE__F32(*y));
    MOE__TRY(MOE__BE(ctx)->gemm(ctx, &g));
    MOE__TRY(moe__record(ctx, moe__matmul_bwd, *y, x, w, NULL, &n));
    if (n) memcpy(n->i, meta.i, sizeof n->i);
    return MOE_OK;
}

/* ---- element-wise ---- */

static moe_status moe__add_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dy = MOE__F32(n->out->grad), *da, *db;
    MOE__GRAD_OR_FAIL(da, ctx, n->in[0]);
    MOE__GRAD_OR_FAIL(db, ctx, n->in[1]);
    if (da) MOE__TRY(MOE__BE(ctx)->axpy(ctx, 1, dy, n->out->numel, da));
    if (db) {
        int64_t d = n->in[1]->numel;
        if (d == n->out->numel) MOE__TRY(MOE__BE(ctx)->axpy(ctx, 1, dy, d, db));
        else MOE__TRY(MOE__BE(ctx)->colsum(ctx, dy, n->out->numel / d, d, db));
    }
    return MOE_OK;
}

MOE_API moe_status moe_add(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, moe_tensor **y) {
    static const char *fn = "moe_add";
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, a, "a"));
    MOE__TRY(moe__check_f32(ctx, fn, b, "b"));
    if (!moe__same_shape(a, b) && !(b->ndim == 1 && b->shape[0] == MOE__LAST(a))) return moe__shape_mismatch(ctx, fn, a, b);
    MOE__TRY(moe__tensor_out(ctx, a->ndim, a->shape, y));
    /* b repeats along the rows of a (once when the shapes match) */
    MOE__TRY(MOE__BE(ctx)->add(ctx, MOE__F32(a), MOE__F32(b), a->numel, b->numel, MOE__F32(*y)));
    return moe__record(ctx, moe__add_bwd, *y, a, b, NULL, &n);
}

static moe_status moe__mul_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dy = MOE__F32(n->out->grad), *da, *db;
    MOE__GRAD_OR_FAIL(da, ctx, n->in[0]);
    MOE__GRAD_OR_FAIL(db, ctx, n->in[1]);
    if (da) MOE__TRY(MOE__BE(ctx)->mul(ctx, dy, MOE__F32(n->in[1]), n->out->numel, da, 1));
    if (db) MOE__TRY(MOE__BE(ctx)->mul(ctx, dy, MOE__F32(n->in[0]), n->out->numel, db, 1));
    return MOE_OK;
}

MOE_API moe_status moe_mul(moe_ctx *ctx, moe_tensor *a, moe_tensor *b, moe_tensor **y) {
    static const char *fn = "moe_mul";
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, a, "a"));
    MOE__TRY(moe__check_f32(ctx, fn, b, "b"));
    if (!moe__same_shape(a, b)) return moe__shape_mismatch(ctx, fn, a, b);
    MOE__TRY(moe__tensor_out(ctx, a->ndim, a->shape, y));
    MOE__TRY(MOE__BE(ctx)->mul(ctx, MOE__F32(a), MOE__F32(b), a->numel, MOE__F32(*y), 0));
    return moe__record(ctx, moe__mul_bwd, *y, a, b, NULL, &n);
}

static moe_status moe__scale_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    return MOE__BE(ctx)->axpy(ctx, (moe_real)n->f[0], MOE__F32(n->out->grad), n->out->numel, dx);
}

MOE_API moe_status moe_scale(moe_ctx *ctx, moe_tensor *x, float s, moe_tensor **y) {
    static const char *fn = "moe_scale";
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    if (!isfinite(s)) return moe__fail(ctx, MOE_ERR_NUMERIC, "%s: scale factor is %g", fn, (double)s);
    MOE__TRY(moe__tensor_out(ctx, x->ndim, x->shape, y));
    MOE__TRY(MOE__BE(ctx)->scale(ctx, (moe_real)s, MOE__F32(x), x->numel, MOE__F32(*y)));
    MOE__TRY(moe__record(ctx, moe__scale_bwd, *y, x, NULL, NULL, &n));
    if (n) n->f[0] = s;
    return MOE_OK;
}

static moe_status moe__sum_bwd(moe_ctx *ctx, moe__node *n) {
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    /* dx += dy, the one-element gradient repeating over x */
    return MOE__BE(ctx)->add(ctx, dx, MOE__F32(n->out->grad), n->in[0]->numel, 1, dx);
}

MOE_API moe_status moe_sum(moe_ctx *ctx, moe_tensor *x, moe_tensor **y) {
    static const char *fn = "moe_sum";
    int64_t one = 1;
    moe_real s = 0;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, y));
    MOE__TRY(MOE__BE(ctx)->sum(ctx, MOE__F32(x), x->numel, &s));
    MOE__TRY(MOE__BE(ctx)->fill(ctx, s, 1, MOE__F32(*y)));
    return moe__record(ctx, moe__sum_bwd, *y, x, NULL, NULL, &n);
}

static moe_status moe__swiglu_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *gate = n->in[0], *up = n->in[1];
    int64_t cols = MOE__LAST(gate);
    moe_real *dg, *du = NULL;
    MOE__GRAD_OR_FAIL(dg, ctx, gate);
    if (up) MOE__GRAD_OR_FAIL(du, ctx, up);
    return MOE__BE(ctx)->swiglu_bwd(ctx, MOE__F32(gate), up ? MOE__F32(up) : NULL, cols, MOE__F32(n->out->grad), gate->numel / cols,
                                    cols, dg, du, cols, 1);
}

/* silu(gate) ⊙ up, or silu(gate) when up is NULL. */
static moe_status moe__swiglu_op(moe_ctx *ctx, const char *fn, moe_tensor *gate, moe_tensor *up, moe_tensor **y) {
    int64_t cols;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, gate, up ? "gate" : "x"));
    if (up) {
        MOE__TRY(moe__check_f32(ctx, fn, up, "up"));
        if (!moe__same_shape(gate, up)) return moe__shape_mismatch(ctx, fn, gate, up);
    }
    cols = MOE__LAST(gate);
    MOE__TRY(moe__tensor_out(ctx, gate->ndim, gate->shape, y));
    MOE__TRY(MOE__BE(ctx)->swiglu_fwd(ctx, MOE__F32(gate), up ? MOE__F32(up) : NULL, cols, gate->numel / cols, cols, MOE__F32(*y), cols));
    return moe__record(ctx, moe__swiglu_bwd_node, *y, gate, up, NULL, &n);
}
MOE_API moe_status moe_silu(moe_ctx *ctx, moe_tensor *x, moe_tensor **y) { return moe__swiglu_op(ctx, "moe_silu", x, NULL, y); }
MOE_API moe_status moe_swiglu(moe_ctx *ctx, moe_tensor *gate, moe_tensor *up, moe_tensor **y) {
    MOE__TRY(moe__check_out(ctx, "moe_swiglu", y));
    MOE__TRY(moe__check_f32(ctx, "moe_swiglu", up, "up"));
    return moe__swiglu_op(ctx, "moe_swiglu", gate, up, y);
}

/* ---- row-wise ---- */

static moe_status moe__rmsnorm_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *w = n->in[1];
    int64_t d = MOE__LAST(x);
    moe_real *dx, *dw;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    MOE__GRAD_OR_FAIL(dw, ctx, w);
    return MOE__BE(ctx)->rmsnorm_bwd(ctx, MOE__F32(x), MOE__F32(w), (const moe_real *)n->saved, MOE__F32(n->out->grad),
                                     x->numel / d, d, dx, dw);
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
    MOE__TRY(moe__tensor_out(ctx, x->ndim, x->shape, y));
    rstd = moe__any_grad(ctx, x, w, NULL) ? moe__dev_real(ctx, rows, fn) : NULL; /* kept for backward */
    if (moe__any_grad(ctx, x, w, NULL) && !rstd) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->rmsnorm_fwd(ctx, MOE__F32(x), d, MOE__F32(w), rows, d, (moe_real)eps, MOE__F32(*y), d, rstd));
    MOE__TRY(moe__record(ctx, moe__rmsnorm_bwd_node, *y, x, w, NULL, &n));
    if (n) n->saved = rstd;
    return MOE_OK;
}

static moe_status moe__softmax_bwd_node(moe_ctx *ctx, moe__node *n) {
    int64_t d = MOE__LAST(n->out);
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    return MOE__BE(ctx)->softmax_bwd(ctx, MOE__F32(n->out), MOE__F32(n->out->grad), n->out->numel / d, d, dx);
}

MOE_API moe_status moe_softmax(moe_ctx *ctx, moe_tensor *x, moe_tensor **y) {
    static const char *fn = "moe_softmax";
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe__tensor_out(ctx, x->ndim, x->shape, y));
    MOE__TRY(MOE__BE(ctx)->softmax_fwd(ctx, MOE__F32(x), x->numel / MOE__LAST(x), MOE__LAST(x), MOE__F32(*y)));
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

/* YaRN's magnitude correction 0.1·m·ln(s) + 1 (1 when s <= 1), as transformers' yarn_get_mscale. */
static double moe__yarn_get_mscale(double s, double m) { return s <= 1.0 ? 1.0 : 0.1 * m * log(s) + 1.0; }
/* The factor on cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim) when both are given
   (non-zero), else mscale(s, 1), as transformers' _compute_yarn_parameters. */
static double moe__yarn_attention_factor(const moe_yarn *y) {
    if (!y || y->factor <= 1.0) return 1.0;
    if (y->mscale != 0 && y->mscale_all_dim != 0)
        return moe__yarn_get_mscale(y->factor, y->mscale) / moe__yarn_get_mscale(y->factor, y->mscale_all_dim);
    return moe__yarn_get_mscale(y->factor, 1.0);
}

MOE_API moe_status moe_rope_table_init(moe_ctx *ctx, moe_rope_table *table, int64_t dim, int64_t max_pos, double theta,
                                       const moe_yarn *yarn) {
    int64_t p, j;
    size_t n;
    double af = moe__yarn_attention_factor(yarn);
    MOE__CHECK_CTX(ctx);
    if (!table) return moe__fail(ctx, MOE_ERR_ARG, "moe_rope_table_init: table is NULL");
    memset(table, 0, sizeof *table);
    if (dim <= 0 || dim % 2 || dim > 65536)
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_rope_table_init: dim must be even and in 2..65536, got %lld", (long long)dim);
    if (max_pos <= 0 || max_pos > ((int64_t)1 << 26))
        return moe__fail(ctx, MOE_ERR_SHAPE, "moe_rope_table_init: max_pos must be 1..2^26, got %lld", (long long)max_pos);
    if (!(theta > 1.0)) return moe__fail(ctx, MOE_ERR_CONFIG, "moe_rope_table_init: theta must be > 1");
    if (yarn && yarn->factor > 1.0 && (yarn->original_max_pos <= 0 || !(yarn->beta_fast > 0) || !(yarn->beta_slow > 0) ||
                                       !(yarn->mscale >= 0) || !(yarn->mscale_all_dim >= 0) || !isfinite(yarn->factor)))
        return moe__fail(ctx, MOE_ERR_CONFIG, "moe_rope_table_init: YaRN needs original_max_pos, beta_fast, beta_slow > 0 and mscale, mscale_all_dim >= 0");
    if (moe__mul_overflows((size_t)max_pos, (size_t)dim * sizeof(float), &n))
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_rope_table_init: table too large");
    {
        float *host = (float *)moe__heap_alloc(ctx, n);
        moe_status st;
        if (!host) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_rope_table_init: out of memory");
        for (j = 0; j < dim / 2; j++) {
            double f = moe__yarn_freq(pow(theta, -2.0 * (double)j / (double)dim), j, dim, theta, yarn);
            for (p = 0; p < max_pos; p++) {
                double a = (double)p * f;
                host[(p * (dim / 2) + j) * 2] = (float)(cos(a) * af);
                host[(p * (dim / 2) + j) * 2 + 1] = (float)(sin(a) * af);
            }
        }
        table->device = MOE__BE(ctx)->device;
        st = MOE__BE(ctx)->alloc(ctx, n, (void **)&table->cos_sin);
        if (st == MOE_OK) st = MOE__BE(ctx)->copy(ctx, table->cos_sin, host, n, MOE__H2D);
        MOE_FREE(host);
        if (st != MOE_OK) {
            moe_rope_table_free(table);
            return st;
        }
    }
    table->dim = dim;
    table->max_pos = max_pos;
    return MOE_OK;
}
MOE_API void moe_rope_table_free(moe_rope_table *table) {
    if (!table) return;
    if (table->cos_sin) moe__backend_for(table->device)->free(NULL, table->cos_sin);
    memset(table, 0, sizeof *table);
}

static moe_status moe__rope_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0];
    const moe_rope_table *tab = (const moe_rope_table *)n->cptr;
    moe_real *dx, *tmp;
    int64_t B = 0, T = 0, H = 0, D = 0;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    MOE__TRY(moe__bthd(ctx, "moe_rope", x, &B, &T, &H, &D));
    if (!(tmp = moe__dev_real(ctx, x->numel, "moe_rope backward"))) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->copy(ctx, tmp, n->out->grad->data, (size_t)x->numel * sizeof(moe_real), MOE__D2D));
    MOE__TRY(MOE__BE(ctx)->rope(ctx, tmp, B * T, T, H, D, 0, D, tab->cos_sin, n->i[0], (moe_rope_layout)n->i[1], 1));
    return MOE__BE(ctx)->axpy(ctx, 1, tmp, x->numel, dx);
}

MOE_API moe_status moe_rope(moe_ctx *ctx, moe_tensor *x, const moe_rope_table *table, int64_t pos0,
                            moe_rope_layout layout, moe_tensor **y) {
    static const char *fn = "moe_rope";
    int64_t B = 0, T = 0, H = 0, D = 0;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    if (!table || !table->cos_sin) return moe__fail(ctx, MOE_ERR_ARG, "%s: RoPE table is NULL or not initialised", fn);
    if (table->device != MOE__BE(ctx)->device)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: the RoPE table is on another device", fn);
    MOE__TRY(moe__bthd(ctx, fn, x, &B, &T, &H, &D));
    if (D != table->dim) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: head dim %lld but the table is for %lld", fn, (long long)D, (long long)table->dim);
    if (layout != MOE_ROPE_PAIRS && layout != MOE_ROPE_HALVES) return moe__fail(ctx, MOE_ERR_ARG, "%s: unknown layout %d", fn, (int)layout);
    if (pos0 < 0 || pos0 > table->max_pos - T)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: positions %lld..%lld exceed the table's %lld", fn, (long long)pos0,
                         (long long)(pos0 + T - 1), (long long)table->max_pos);
    MOE__TRY(moe__tensor_out(ctx, x->ndim, x->shape, y));
    MOE__TRY(MOE__BE(ctx)->copy(ctx, (*y)->data, x->data, (size_t)x->numel * sizeof(moe_real), MOE__D2D));
    MOE__TRY(MOE__BE(ctx)->rope(ctx, MOE__F32(*y), B * T, T, H, D, 0, D, table->cos_sin, pos0, layout, 0));
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
    return MOE__BE(ctx)->attention_bwd(ctx, MOE__F32(q), MOE__F32(k), MOE__F32(v), MOE__F32(n->out), (const moe_real *)n->saved,
                                       MOE__F32(n->out->grad), B, T, H, Dk, Dv, (moe_real)n->f[0], dq, dk, dv);
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
    MOE__TRY(moe__tensor_out(ctx, v->ndim, shape, o));
    if (!(lse = moe__dev_real(ctx, B * H * T, fn))) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->attention_fwd(ctx, MOE__F32(q), MOE__F32(k), MOE__F32(v), B, T, T, H, Dk, Dv, (moe_real)scale,
                                         MOE__F32(*o), lse));
    MOE__TRY(moe__record(ctx, moe__attention_bwd_node, *o, q, k, v, &n));
    if (n) {
        n->saved = lse;
        n->f[0] = scale;
    }
    return MOE_OK;
}

/* ---- indexing ---- */

/* `bytes` of device memory where the host can read them: the memory itself on the CPU, else a
   copy in the step arena (NULL, message set, when there is no memory). */
static const void *moe__host_data(moe_ctx *ctx, const void *data, size_t bytes) {
    void *h;
    if (MOE__BE(ctx)->device == MOE_DEVICE_CPU) return data;
    h = moe__arena_alloc(ctx, bytes, 1, "a copy for the host");
    if (h && MOE__BE(ctx)->copy(ctx, h, data, bytes, MOE__D2H) != MOE_OK) return NULL;
    return h;
}

static moe_status moe__check_ids(moe_ctx *ctx, const char *fn, const moe_tensor *t, int64_t limit, int32_t allowed) {
    const int32_t *ids = (const int32_t *)moe__host_data(ctx, t->data, (size_t)t->numel * sizeof(int32_t));
    int64_t i;
    if (!ids) return MOE_ERR_MEMORY;
    for (i = 0; i < t->numel; i++)
        if ((ids[i] < 0 || ids[i] >= limit) && ids[i] != allowed)
            return moe__fail(ctx, MOE_ERR_ARG, "%s: index %d at position %lld is outside [0, %lld)", fn, (int)ids[i], (long long)i,
                             (long long)limit);
    return MOE_OK;
}

/* The backward of a row gather: dx[idx[i]] += dy[i]. */
static moe_status moe__gather_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *idx = n->in[1];
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    return MOE__BE(ctx)->scatter_add_rows(ctx, MOE__F32(n->out->grad), MOE__I32(idx), idx->numel, MOE__LAST(x), dx);
}

MOE_API moe_status moe_embedding(moe_ctx *ctx, moe_tensor *table, moe_tensor *ids, moe_tensor **y) {
    static const char *fn = "moe_embedding";
    int64_t shape[MOE_MAX_DIMS], d;
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
    MOE__TRY(moe__tensor_out(ctx, ids->ndim + 1, shape, y));
    MOE__TRY(MOE__BE(ctx)->gather_rows(ctx, MOE__F32(table), MOE__I32(ids), 1, ids->numel, d, MOE__F32(*y)));
    return moe__record(ctx, moe__gather_bwd, *y, table, ids, NULL, &n);
}

static moe_status moe__xent_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0], *t = n->in[1];
    int64_t v = MOE__LAST(x);
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    if (n->i[1] == 0) return MOE_OK; /* every row ignored: the loss is constant 0 */
    return MOE__BE(ctx)->xent_bwd(ctx, MOE__F32(x), MOE__I32(t), (int32_t)n->i[0], (const moe_real *)n->saved,
                                  moe__tensor_at(ctx, n->out->grad, 0) / (moe_real)n->i[1], x->numel / v, v, dx);
}

MOE_API moe_status moe_cross_entropy(moe_ctx *ctx, moe_tensor *logits, moe_tensor *targets, int32_t ignore_index,
                                     moe_tensor **loss) {
    static const char *fn = "moe_cross_entropy";
    int64_t v, rows, one = 1, count = 0;
    moe_real *lse, total = 0;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_f32(ctx, fn, logits, "logits"));
    MOE__TRY(moe__check_i32(ctx, fn, targets, "targets"));
    v = MOE__LAST(logits);
    rows = logits->numel / v;
    if (targets->numel != rows) return moe__shape_mismatch(ctx, fn, logits, targets);
    MOE__TRY(moe__check_ids(ctx, fn, targets, v, ignore_index));
    if (!(lse = moe__dev_real(ctx, rows, fn))) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->xent_fwd(ctx, MOE__F32(logits), MOE__I32(targets), ignore_index, rows, v, lse, &total, &count));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, loss));
    MOE__TRY(MOE__BE(ctx)->fill(ctx, count ? total / (moe_real)count : 0, 1, MOE__F32(*loss)));
    MOE__TRY(moe__record(ctx, moe__xent_bwd_node, *loss, logits, targets, NULL, &n));
    if (n) {
        n->saved = lse;
        n->i[0] = ignore_index;
        n->i[1] = count;
    }
    return MOE_OK;
}

static moe_status moe__topk_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0];
    int64_t k = MOE__LAST(n->out), cols = MOE__LAST(x);
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    return MOE__BE(ctx)->topk_bwd(ctx, MOE__F32(n->out->grad), (const int32_t *)n->saved, x->numel / cols, cols, k, dx);
}

MOE_API moe_status moe_topk(moe_ctx *ctx, moe_tensor *x, int64_t k, moe_tensor **values, moe_tensor **indices) {
    static const char *fn = "moe_topk";
    int64_t shape[MOE_MAX_DIMS], cols;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, values));
    MOE__TRY(moe__check_out(ctx, fn, indices));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    cols = MOE__LAST(x);
    if (k < 1 || k > cols) return moe__fail(ctx, MOE_ERR_ARG, "%s: k must be 1..%lld, got %lld", fn, (long long)cols, (long long)k);
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = k;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, x->ndim, shape, values));
    MOE__TRY(moe_tensor_temp(ctx, MOE_I32, x->ndim, shape, indices));
    MOE__TRY(MOE__BE(ctx)->topk_fwd(ctx, MOE__F32(x), x->numel / cols, cols, k, MOE__F32(*values), MOE__I32(*indices)));
    MOE__TRY(moe__record(ctx, moe__topk_bwd_node, *values, x, NULL, NULL, &n));
    if (n) n->saved = (*indices)->data;
    return MOE_OK;
}

MOE_API moe_status moe_gather(moe_ctx *ctx, moe_tensor *x, moe_tensor *idx, moe_tensor **y) {
    static const char *fn = "moe_gather";
    int64_t shape[2], d;
    moe__node *n;
    MOE__TRY(moe__check_out(ctx, fn, y));
    MOE__TRY(moe__check_f32(ctx, fn, x, "x"));
    MOE__TRY(moe__check_i32(ctx, fn, idx, "idx"));
    if (x->ndim != 2 || idx->ndim != 1) return moe__shape_mismatch(ctx, fn, x, idx);
    MOE__TRY(moe__check_ids(ctx, fn, idx, x->shape[0], 0));
    d = x->shape[1];
    shape[0] = idx->shape[0];
    shape[1] = d;
    MOE__TRY(moe__tensor_out(ctx, 2, shape, y));
    MOE__TRY(MOE__BE(ctx)->gather_rows(ctx, MOE__F32(x), MOE__I32(idx), 1, idx->numel, d, MOE__F32(*y)));
    return moe__record(ctx, moe__gather_bwd, *y, x, idx, NULL, &n);
}

/* The backward of a row scatter-add: dsrc[i] += dy[idx[i]]. */
static moe_status moe__scatter_add_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *src = n->in[0], *idx = n->in[1];
    int64_t d = src->shape[1];
    moe_real *ds, *tmp;
    MOE__GRAD_OR_FAIL(ds, ctx, src);
    if (!(tmp = moe__dev_real(ctx, src->numel, "moe_scatter_add backward"))) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->gather_rows(ctx, MOE__F32(n->out->grad), MOE__I32(idx), 1, idx->numel, d, tmp));
    return MOE__BE(ctx)->axpy(ctx, 1, tmp, src->numel, ds);
}

MOE_API moe_status moe_scatter_add(moe_ctx *ctx, moe_tensor *src, moe_tensor *idx, int64_t n_rows, moe_tensor **y) {
    static const char *fn = "moe_scatter_add";
    int64_t shape[2], d;
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
    MOE__TRY(MOE__BE(ctx)->scatter_add_rows(ctx, MOE__F32(src), MOE__I32(idx), idx->numel, d, MOE__F32(*y)));
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

/* A slice of x along dim: entries [start, start+len); i[] = {dim, start, len}. */
static moe_status moe__slice_bwd(moe_ctx *ctx, moe__node *n) {
    moe_tensor *x = n->in[0];
    int64_t outer, inner;
    moe_real *dx;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    moe__dim_split(x, (int)n->i[0], &outer, &inner);
    return MOE__BE(ctx)->copy2d(ctx, MOE__F32(n->out->grad), n->i[2] * inner, outer, n->i[2] * inner, dx + n->i[1] * inner,
                                x->shape[n->i[0]] * inner, 1);
}

static moe_status moe__slice(moe_ctx *ctx, moe_tensor *x, int dim, int64_t start, int64_t len, moe_tensor **y) {
    int64_t shape[MOE_MAX_DIMS], outer, inner;
    moe__node *n;
    memcpy(shape, x->shape, sizeof shape);
    shape[dim] = len;
    MOE__TRY(moe__tensor_out(ctx, x->ndim, shape, y));
    moe__dim_split(x, dim, &outer, &inner);
    MOE__TRY(MOE__BE(ctx)->copy2d(ctx, MOE__F32(x) + start * inner, x->shape[dim] * inner, outer, len * inner, MOE__F32(*y),
                                  len * inner, 0));
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
    if (da) MOE__TRY(MOE__BE(ctx)->copy2d(ctx, dy, la + lb, outer, la, da, la, 1));
    if (db) MOE__TRY(MOE__BE(ctx)->copy2d(ctx, dy + la, la + lb, outer, lb, db, lb, 1));
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
    MOE__TRY(moe__tensor_out(ctx, a->ndim, shape, y));
    moe__dim_split(*y, dim, &outer, &inner);
    la = a->shape[dim] * inner;
    lb = b->shape[dim] * inner;
    MOE__TRY(MOE__BE(ctx)->copy2d(ctx, MOE__F32(a), la, outer, la, MOE__F32(*y), la + lb, 0));
    MOE__TRY(MOE__BE(ctx)->copy2d(ctx, MOE__F32(b), lb, outer, lb, MOE__F32(*y) + la, la + lb, 0));
    MOE__TRY(moe__record(ctx, moe__concat_bwd, *y, a, b, NULL, &n));
    if (n) n->i[0] = dim;
    return MOE_OK;
}
/* ============================================================================================
   8. layers — linear, SwiGLU MLP, MLA, DeepSeekMoE                                    >>layers
   ============================================================================================
   Linear layers in FP32, BF16 or FP8 (reference §5), the activations they keep for backward,
   and the layers of DeepSeek-V3 — the SwiGLU MLP (dense FFN, shared and routed experts), MLA
   and DeepSeekMoE — each one tape node whose forward and hand-written backward are lists of
   kernel calls. What a backward needs is kept in a per-call record in the step arena. */

/* ---- linear layers ---- */

/* Y[n,out] = X[n,in]·Wᵀ with W [out, in] (Fprop). */
static moe_status moe__linear(moe_ctx *ctx, const moe_real *X, int64_t n, int64_t in, const moe_real *W, int64_t out,
                              moe_real *Y, moe_dtype prec) {
    moe__gemm_op g = moe__gemm_1(n, out, in, X, in, 0, W, in, 1, Y, out, 0, prec);
    g.role_a = MOE_FP8_FPROP_X;
    g.role_b = MOE_FP8_FPROP_W;
    return MOE__BE(ctx)->gemm(ctx, &g);
}
/* dX += dY·W (Dgrad) and dW += dYᵀ·X (Wgrad); either may be NULL. */
static moe_status moe__linear_bwd(moe_ctx *ctx, const moe_real *X, const moe_real *dY, int64_t n, int64_t in,
                                  const moe_real *W, int64_t out, moe_real *dX, moe_real *dW, moe_dtype prec) {
    if (dX) {
        moe__gemm_op g = moe__gemm_1(n, in, out, dY, out, 0, W, in, 0, dX, in, 1, prec);
        g.role_a = MOE_FP8_DGRAD_DY;
        g.role_b = MOE_FP8_DGRAD_W;
        MOE__TRY(MOE__BE(ctx)->gemm(ctx, &g));
    }
    if (dW) {
        moe__gemm_op g = moe__gemm_1(out, in, n, dY, out, 1, X, in, 0, dW, in, 1, prec);
        g.role_a = MOE_FP8_WGRAD_DY;
        g.role_b = MOE_FP8_WGRAD_X;
        MOE__TRY(MOE__BE(ctx)->gemm(ctx, &g));
    }
    return MOE_OK;
}
static moe_real *moe__param_grad(moe_tensor *t) { return t && t->requires_grad && t->grad ? (moe_real *)t->grad->data : NULL; }

/* ---- activations saved for backward ----
   A layer keeps what its backward needs as stashes, in the format of the precision mode:
   FP32 keeps the array itself; BF16 keeps bf16 copies; FP8 keeps E4M3 codes with a scale
   per 1×B tile where the recipe allows it (inputs of linear layers, the SwiGLU input) and
   bf16 for the rest. Every stash counts towards moe_ctx_saved_bytes. */
typedef struct moe__stash {
    moe_dtype dtype;  /* MOE_F32 (the array itself, not copied), MOE_BF16 or MOE_FP8_E4M3 */
    const void *data;
    float *scales;    /* FP8: one per gr×gc group */
    int64_t rows, cols, gr, gc;
} moe__stash;
MOE_API size_t moe_ctx_saved_bytes(const moe_ctx *ctx) { return ctx ? ctx->saved_bytes : 0; }

/* The format mode `prec` keeps an activation in; fp8_ok: the recipe allows FP8 for it. */
static moe_dtype moe__stash_format(moe_dtype prec, int fp8_ok) {
    if (prec == MOE_F32) return MOE_F32;
    return prec == MOE_FP8_E4M3 && fp8_ok ? MOE_FP8_E4M3 : MOE_BF16;
}

static moe_status moe__stash_put(moe_ctx *ctx, moe__stash *st, const moe_real *x, int64_t rows, int64_t cols, moe_dtype dtype) {
    int64_t n = rows * cols;
    memset(st, 0, sizeof *st);
    st->dtype = dtype;
    st->rows = rows;
    st->cols = cols;
    if (dtype == MOE_F32) {
        st->data = x;
        ctx->saved_bytes += (size_t)n * sizeof(moe_real);
    } else if (dtype == MOE_BF16) {
        void *b = moe__dev_scratch(ctx, n + 1, sizeof(uint16_t), "saved activation");
        if (!b) return MOE_ERR_MEMORY;
        MOE__TRY(MOE__BE(ctx)->convert(ctx, x, MOE_F32, n, b, MOE_BF16));
        st->data = b;
        ctx->saved_bytes += (size_t)n * sizeof(uint16_t);
    } else {
        int64_t ns;
        uint8_t *q = (uint8_t *)moe__dev_scratch(ctx, n + 1, 1, "saved activation");
        int pow2 = moe__fp8_group_shape(ctx, MOE__FP8_ALONG_ROWS, rows, cols, &st->gr, &st->gc);
        ns = ((rows + st->gr - 1) / st->gr) * ((cols + st->gc - 1) / st->gc);
        st->scales = (float *)moe__dev_scratch(ctx, ns + 1, sizeof(float), "saved activation scales");
        if (!q || !st->scales) return MOE_ERR_MEMORY;
        MOE__TRY(MOE__BE(ctx)->fp8_quantize(ctx, x, rows, cols, st->gr, st->gc, pow2, q, st->scales, NULL));
        st->data = q;
        ctx->saved_bytes += (size_t)n + (size_t)ns * sizeof(float);
    }
    return MOE_OK;
}

/* The stashed values as moe_real (the array itself for FP32, else decoded into step memory);
   NULL (message set) when out of memory. */
static const moe_real *moe__stash_get(moe_ctx *ctx, const moe__stash *st) {
    int64_t n = st->rows * st->cols;
    moe_real *x;
    if (st->dtype == MOE_F32) return (const moe_real *)st->data;
    if (!(x = moe__dev_real(ctx, n, "saved activation"))) return NULL;
    if (st->dtype == MOE_BF16) {
        if (MOE__BE(ctx)->convert(ctx, st->data, MOE_BF16, n, x, MOE_F32) != MOE_OK) return NULL;
    } else if (MOE__BE(ctx)->fp8_dequantize(ctx, (const uint8_t *)st->data, st->scales, st->rows, st->cols, st->gr, st->gc, x) !=
               MOE_OK) {
        return NULL;
    }
    return x;
}

/* ---- SwiGLU MLP: Y = (silu(X·W1ᵀ) ⊙ X·W3ᵀ)·W2ᵀ, W1 and W3 stacked in w13 [2I, d] ----
   One definition for a dense FFN, the shared experts and the routed experts: the rows of X
   fall into `groups` groups (offsets on the host), group e multiplied by its own weights
   w13 + e·2I·d and w2 + e·d·I (a dense layer is one group). */

/* An expert-parallel exchange in flight (section 15): work beside it calls moe__ep_progress
   between its steps, since MPI moves the rows only inside its calls. */
typedef struct moe__ep_xfer moe__ep_xfer;
static moe_status moe__ep_progress(moe_ctx *ctx, moe__ep_xfer *X);

typedef struct moe__mlp {
    const moe_real *w13, *w2;  /* [groups][2I, d], [groups][d, I] */
    moe_real *dw13, *dw2;      /* their gradients (NULL: none) */
    int64_t d, I, groups;
    const int64_t *offsets;    /* host [groups + 1] */
    moe__ep_xfer *beside;      /* an exchange in flight beside this MLP, advanced between its steps (NULL: none) */
} moe__mlp;

/* Between two steps of an MLP: the exchange beside it, if any, progresses. */
static moe_status moe__mlp_step(moe_ctx *ctx, const moe__mlp *M) { return M->beside ? moe__ep_progress(ctx, M->beside) : MOE_OK; }

/* Y = op(A)·op(B) per group: the linear layer of a group (Fprop: token rows of A and C). */
static moe_status moe__mlp_gemm(moe_ctx *ctx, const moe__mlp *M, int64_t n, int64_t m_cols, int64_t k, const moe_real *A,
                                const moe_real *W, int trans_w, moe_real *C, int accumulate, moe_fp8_role ra, moe_fp8_role rb,
                                moe_dtype prec) {
    int64_t one[2];
    moe__gemm_op g = moe__gemm_1(n, m_cols, k, A, k, 0, W, trans_w ? k : m_cols, trans_w, C, m_cols, accumulate, prec);
    g.stride_b = m_cols * k;
    g.role_a = ra;
    g.role_b = rb;
    one[0] = 0;
    one[1] = n;
    return MOE__BE(ctx)->gemm_grouped(ctx, &g, M->groups, M->offsets ? M->offsets : one, 0);
}
/* dW += dYᵀ·X per group (Wgrad): the group's token rows are the reduction. */
static moe_status moe__mlp_wgrad(moe_ctx *ctx, const moe__mlp *M, int64_t n, const moe_real *dY, int64_t out, const moe_real *X,
                                 int64_t in, moe_real *dW, moe_dtype prec) {
    int64_t one[2];
    moe__gemm_op g = moe__gemm_1(out, in, n, dY, out, 1, X, in, 0, dW, in, 1, prec);
    g.stride_c = out * in;
    g.role_a = MOE_FP8_WGRAD_DY;
    g.role_b = MOE_FP8_WGRAD_X;
    one[0] = 0;
    one[1] = n;
    return MOE__BE(ctx)->gemm_grouped(ctx, &g, M->groups, M->offsets ? M->offsets : one, 1);
}

/* Y [n, d] of X [n, d]; h13 [n, 2I] receives the gate | up pre-activations (the SwiGLU input,
   kept for backward); act [n, I] is scratch. */
static moe_status moe__mlp_fwd(moe_ctx *ctx, const moe__mlp *M, const moe_real *X, int64_t n, moe_real *Y, moe_real *h13,
                               moe_real *act, moe_dtype prec) {
    int64_t d = M->d, I = M->I;
    MOE__TRY(moe__mlp_gemm(ctx, M, n, 2 * I, d, X, M->w13, 1, h13, 0, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, prec));
    MOE__TRY(moe__mlp_step(ctx, M));
    MOE__TRY(MOE__BE(ctx)->swiglu_fwd(ctx, h13, h13 + I, 2 * I, n, I, act, I));
    MOE__TRY(moe__mlp_step(ctx, M));
    return moe__mlp_gemm(ctx, M, n, d, I, act, M->w2, 1, Y, 0, MOE_FP8_FPROP_X, MOE_FP8_FPROP_W, prec);
}

/* dX += ..., dw13 += ..., dw2 += ...; the SwiGLU output is recomputed from h13. With `gate`
   (routed experts) row r's output was scaled by gate[r] and dY is the unscaled output
   gradient: dgate[r] = <dY_r, Y_r> = <dY_r·W2, act_r> comes from the Dgrad product, so the
   expert outputs need not be kept. */
static moe_status moe__mlp_bwd(moe_ctx *ctx, const moe__mlp *M, const moe_real *X, const moe_real *dY, int64_t n,
                               const moe_real *h13, const moe_real *gate, moe_real *dgate, moe_real *dX, moe_dtype prec) {
    int64_t d = M->d, I = M->I;
    moe_real *act = moe__dev_real(ctx, n * I, "mlp backward"), *dact = moe__dev_real(ctx, n * I, "mlp backward");
    moe_real *dh13 = moe__dev_real(ctx, n * 2 * I, "mlp backward");
    if (!act || !dact || !dh13) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->swiglu_fwd(ctx, h13, h13 + I, 2 * I, n, I, act, I));
    MOE__TRY(moe__mlp_gemm(ctx, M, n, I, d, dY, M->w2, 0, dact, 0, MOE_FP8_DGRAD_DY, MOE_FP8_DGRAD_W, prec)); /* dact = dY·W2 */
    MOE__TRY(moe__mlp_step(ctx, M));
    if (gate) MOE__TRY(MOE__BE(ctx)->expert_gate_bwd(ctx, gate, n, I, dact, act, dgate));
    if (M->dw2) MOE__TRY(moe__mlp_wgrad(ctx, M, n, dY, d, act, I, M->dw2, prec));
    MOE__TRY(moe__mlp_step(ctx, M));
    MOE__TRY(MOE__BE(ctx)->swiglu_bwd(ctx, h13, h13 + I, 2 * I, dact, n, I, dh13, dh13 + I, 2 * I, 0));
    if (dX) MOE__TRY(moe__mlp_gemm(ctx, M, n, d, 2 * I, dh13, M->w13, 0, dX, 1, MOE_FP8_DGRAD_DY, MOE_FP8_DGRAD_W, prec));
    MOE__TRY(moe__mlp_step(ctx, M));
    if (M->dw13) MOE__TRY(moe__mlp_wgrad(ctx, M, n, dh13, 2 * I, X, d, M->dw13, prec));
    return MOE_OK;
}

/* A dense SwiGLU FFN layer (also the shared experts): weights w13 [2I, d], w2 [d, I]. */
typedef struct moe__ffn {
    moe_tensor *w13, *w2;
    int64_t inter;
} moe__ffn;

static moe__mlp moe__ffn_mlp(const moe__ffn *f, int64_t d) {
    moe__mlp M;
    memset(&M, 0, sizeof M);
    M.w13 = MOE__F32(f->w13);
    M.w2 = MOE__F32(f->w2);
    M.dw13 = moe__param_grad(f->w13);
    M.dw2 = moe__param_grad(f->w2);
    M.d = d;
    M.I = f->inter;
    M.groups = 1;
    return M;
}

typedef struct moe__ffn_node {
    const moe__ffn *ffn;
    moe__stash x, h13;
    moe_dtype prec;
} moe__ffn_node;

static moe_status moe__ffn_bwd(moe_ctx *ctx, moe__node *n) {
    moe__ffn_node *f = (moe__ffn_node *)n->saved;
    moe_tensor *x = n->in[0];
    int64_t d = MOE__LAST(x), rows = x->numel / d;
    moe__mlp M = moe__ffn_mlp(f->ffn, d);
    const moe_real *X = moe__stash_get(ctx, &f->x), *h13 = moe__stash_get(ctx, &f->h13);
    moe_real *dx;
    if (!X || !h13) return MOE_ERR_MEMORY;
    MOE__GRAD_OR_FAIL(dx, ctx, x);
    return moe__mlp_bwd(ctx, &M, X, MOE__F32(n->out->grad), rows, h13, NULL, NULL, dx, f->prec);
}

static moe_status moe__ffn_forward(moe_ctx *ctx, const moe__ffn *ffn, moe_tensor *x, moe_tensor **y) {
    int64_t d = MOE__LAST(x), rows = x->numel / d, I = ffn->inter;
    moe__ffn_node *f = (moe__ffn_node *)moe__arena_alloc(ctx, 1, sizeof *f, "ffn");
    moe__mlp M = moe__ffn_mlp(ffn, d);
    moe_real *h13 = moe__dev_real(ctx, rows * 2 * I, "ffn"), *act = moe__dev_real(ctx, rows * I, "ffn");
    moe__node *n;
    if (!f || !h13 || !act) return MOE_ERR_MEMORY;
    f->ffn = ffn;
    f->prec = ctx->conf.gemm_compute;
    MOE__TRY(moe__tensor_out(ctx, x->ndim, x->shape, y));
    MOE__TRY(moe__mlp_fwd(ctx, &M, MOE__F32(x), rows, MOE__F32(*y), h13, act, f->prec));
    MOE__TRY(moe__record(ctx, moe__ffn_bwd, *y, x, ffn->w13, ffn->w2, &n));
    if (n) {
        n->saved = f;
        MOE__TRY(moe__stash_put(ctx, &f->x, MOE__F32(x), rows, d, moe__stash_format(f->prec, 1)));
        MOE__TRY(moe__stash_put(ctx, &f->h13, h13, rows, 2 * I, moe__stash_format(f->prec, 1)));
    }
    return MOE_OK;
}

/* ---- MLA: multi-head latent attention (reference §2) ---- */

typedef struct moe__mla {
    moe_tensor *q_a, *q_a_norm, *q_b; /* q_lora_rank > 0 */
    moe_tensor *q_proj;               /* q_lora_rank == 0 */
    moe_tensor *kv_a, *kv_a_norm, *kv_b, *o;
} moe__mla;

/* Shapes and constants of one MLA call. */
typedef struct moe__mla_dims {
    int64_t B, T, N, d, H, qr, kvr, dn, dr, dqk, dv, pos0;
    moe_real eps, scale;
    moe_rope_layout layout; /* of q_pe and k_pe (config.json rope_interleave) */
} moe__mla_dims;

/* Decoding with several threads, one row of a pass each (section 13): a row publishes that
   it has written its cache rows, then waits until the rows before it have written theirs. */
#define MOE__LINE 8 /* int64_t per cache line: each row's counter on a line of its own */
typedef struct moe__pass_sync {
    int64_t *progress; /* [rows][MOE__LINE]: cache rows written so far, per row of the pass */
    int64_t row;
} moe__pass_sync;

/* The latent KV cache of one MLA layer: per token, RMSNorm(c_KV) (kvr values) and the RoPE'd
   shared key k_pe (dr values), R = kvr + dr. A layer called with a cache writes its tokens'
   rows at pos0.. and attends over every row up to each token's own position, absorbed (the
   decode-attention entry over the latents) or expanded (k and v of every row, as training). */
typedef struct moe__kv_cache {
    moe_real *rows;              /* [cap][R] */
    int absorb;
    int write_only;              /* write the tokens' rows and stop (no output): an entry whose rows alone are read later */
    const moe__pass_sync *sync;  /* NULL unless the rows of a pass run side by side */
} moe__kv_cache;

typedef struct moe__mla_saved {
    moe__mla_dims m;
    const moe__mla *w;
    const float *cos_sin;
    moe__stash x;             /* [N, d] the (normed) input */
    moe__stash cq, cqn;       /* [N, qr] compressed q before / after its norm */
    moe__stash ckv, ckvn;     /* [N, kvr] compressed kv before / after its norm */
    moe__stash q, k, v, o;    /* [N, H, dqk|dqk|dv|dv]; q and k rotated */
    moe__stash lse;           /* [B, H, T] */
    moe_real *rq, *rkv;       /* [N] rstd of the two norms */
    moe_dtype prec;
} moe__mla_saved;

static moe_status moe__mla_bwd(moe_ctx *ctx, moe__node *n) {
    const moe_backend *be = MOE__BE(ctx);
    moe__mla_saved *S = (moe__mla_saved *)n->saved;
    const moe__mla *w = S->w;
    moe__mla_dims m = S->m;
    const moe_real *dout = MOE__F32(n->out->grad);
    const moe_real *x = moe__stash_get(ctx, &S->x), *ckv = moe__stash_get(ctx, &S->ckv), *ckvn = moe__stash_get(ctx, &S->ckvn);
    const moe_real *q = moe__stash_get(ctx, &S->q), *k = moe__stash_get(ctx, &S->k), *v = moe__stash_get(ctx, &S->v);
    const moe_real *o = moe__stash_get(ctx, &S->o), *lse = moe__stash_get(ctx, &S->lse), *cq = NULL, *cqn = NULL;
    moe_real *dx, *dO, *dq, *dk, *dv, *dkvb, *dkpe, *dckvn, *dckv, *dwkva = moe__param_grad(w->kv_a);
    int64_t N = m.N, H = m.H, maxr = m.qr > m.kvr ? m.qr : m.kvr;
    if (!x || !ckv || !ckvn || !q || !k || !v || !o || !lse) return MOE_ERR_MEMORY;
    if (m.qr > 0 && (!(cq = moe__stash_get(ctx, &S->cq)) || !(cqn = moe__stash_get(ctx, &S->cqn)))) return MOE_ERR_MEMORY;
    MOE__GRAD_OR_FAIL(dx, ctx, n->in[0]);
    dO = moe__dev_zeros(ctx, N * H * m.dv, "mla backward");
    dq = moe__dev_zeros(ctx, N * H * m.dqk, "mla backward");
    dk = moe__dev_zeros(ctx, N * H * m.dqk, "mla backward");
    dv = moe__dev_zeros(ctx, N * H * m.dv, "mla backward");
    dkvb = moe__dev_real(ctx, N * H * (m.dn + m.dv), "mla backward");
    dkpe = moe__dev_zeros(ctx, N * m.dr, "mla backward");
    dckvn = moe__dev_zeros(ctx, N * maxr, "mla backward");
    dckv = moe__dev_zeros(ctx, N * maxr, "mla backward");
    if (!dO || !dq || !dk || !dv || !dkvb || !dkpe || !dckvn || !dckv) return MOE_ERR_MEMORY;
    /* output projection, attention core */
    MOE__TRY(moe__linear_bwd(ctx, o, dout, N, H * m.dv, MOE__F32(w->o), m.d, dO, moe__param_grad(w->o), S->prec));
    MOE__TRY(be->attention_bwd(ctx, q, k, v, o, lse, dO, m.B, m.T, H, m.dqk, m.dv, m.scale, dq, dk, dv));
    /* un-rotate: q per head; the shared k_pe collects the sum over heads first */
    MOE__TRY(be->rope(ctx, dq, N, m.T, H, m.dqk, m.dn, m.dr, S->cos_sin, m.pos0, m.layout, 1));
    MOE__TRY(be->mla_merge_kv(ctx, dk, dv, N, H, m.dn, m.dr, m.dv, dkvb, dkpe));
    MOE__TRY(be->rope(ctx, dkpe, N, m.T, 1, m.dr, 0, m.dr, S->cos_sin, m.pos0, m.layout, 1));
    /* kv path: kv_b, its norm, kv_a (rows 0..kvr-1 make c_KV, rows kvr.. the RoPE key) */
    MOE__TRY(moe__linear_bwd(ctx, ckvn, dkvb, N, m.kvr, MOE__F32(w->kv_b), H * (m.dn + m.dv), dckvn, moe__param_grad(w->kv_b), S->prec));
    MOE__TRY(be->rmsnorm_bwd(ctx, ckv, MOE__F32(w->kv_a_norm), S->rkv, dckvn, N, m.kvr, dckv, moe__param_grad(w->kv_a_norm)));
    MOE__TRY(moe__linear_bwd(ctx, x, dckv, N, m.d, MOE__F32(w->kv_a), m.kvr, dx, dwkva, S->prec));
    MOE__TRY(moe__linear_bwd(ctx, x, dkpe, N, m.d, MOE__F32(w->kv_a) + m.kvr * m.d, m.dr, dx, dwkva ? dwkva + m.kvr * m.d : NULL, S->prec));
    /* q path */
    if (m.qr > 0) {
        MOE__TRY(be->memset(ctx, dckvn, 0, (size_t)(N * m.qr) * sizeof(moe_real)));
        MOE__TRY(moe__linear_bwd(ctx, cqn, dq, N, m.qr, MOE__F32(w->q_b), H * m.dqk, dckvn, moe__param_grad(w->q_b), S->prec));
        MOE__TRY(be->memset(ctx, dckv, 0, (size_t)(N * m.qr) * sizeof(moe_real)));
        MOE__TRY(be->rmsnorm_bwd(ctx, cq, MOE__F32(w->q_a_norm), S->rq, dckvn, N, m.qr, dckv, moe__param_grad(w->q_a_norm)));
        MOE__TRY(moe__linear_bwd(ctx, x, dckv, N, m.d, MOE__F32(w->q_a), m.qr, dx, moe__param_grad(w->q_a), S->prec));
    } else {
        MOE__TRY(moe__linear_bwd(ctx, x, dq, N, m.d, MOE__F32(w->q_proj), H * m.dqk, dx, moe__param_grad(w->q_proj), S->prec));
    }
    return MOE_OK;
}

/* Attention over the cache, absorbed (reference §2.4): W_UK folds into the query,
   q̃_h = [W_UK_hᵀ q_nope_h ; q_pe_h], a vector that dots a cache row directly; the attention
   output ō_h is a mix of cache rows, and W_UV unfolds it: o_h = W_UV_h ō_h. */
static moe_status moe__mla_absorbed(moe_ctx *ctx, const moe__mla *w, const moe__mla_dims *m, const moe__kv_cache *cache,
                                    const moe_real *q, moe_real *o, moe_dtype prec) {
    const moe_backend *be = MOE__BE(ctx);
    const int64_t N = m->N, H = m->H, kvr = m->kvr, R = kvr + m->dr, dn = m->dn, dv = m->dv, dqk = m->dqk;
    const moe_real *kvb = MOE__F32(w->kv_b);
    moe_real *qc = moe__dev_real(ctx, N * H * R, "mla"), *ob = moe__dev_real(ctx, N * H * kvr, "mla");
    moe__gemm_op g;
    if (!qc || !ob) return MOE_ERR_MEMORY;
    prec = prec == MOE_F32 ? MOE_F32 : MOE_BF16; /* the per-head folds are not linear layers of the recipe */
    g = moe__gemm_1(N, kvr, dn, q, H * dqk, 0, kvb, kvr, 0, qc, H * R, 0, prec); /* q̃_h = q_nope_h · W_UK_h */
    g.batch = H; g.stride_a = dqk; g.stride_b = (dn + dv) * kvr; g.stride_c = R;
    MOE__TRY(be->gemm(ctx, &g));
    MOE__TRY(be->copy2d(ctx, q + dn, dqk, N * H, m->dr, qc + kvr, R, 0));
    MOE__TRY(be->attention_decode(ctx, qc, cache->rows, N, H, R, kvr, m->pos0, m->scale, ob));
    g = moe__gemm_1(N, dv, kvr, ob, H * kvr, 0, kvb + dn * kvr, kvr, 1, o, H * dv, 0, prec); /* o_h = ō_h · W_UV_hᵀ */
    g.batch = H; g.stride_a = kvr; g.stride_b = (dn + dv) * kvr; g.stride_c = dv;
    return be->gemm(ctx, &g);
}

/* out = MLA(x) for x [B, T, d] (already normed), tokens at positions pos0... With a cache
   (inference: B = 1), the tokens' latent rows go into it and attention reads it; without
   one (training), the latents are the call's own and backward is recorded. */
static moe_status moe__mla_forward(moe_ctx *ctx, const moe__mla *w, const moe__mla_dims *dims, const moe_rope_table *rope,
                                   const moe__kv_cache *cache, moe_tensor *x, moe_tensor **out) {
    const moe_backend *be = MOE__BE(ctx);
    moe__mla_saved *S = (moe__mla_saved *)moe__arena_alloc(ctx, 1, sizeof *S, "mla");
    moe__mla_dims m = *dims;
    const int64_t N = m.N, H = m.H, R = m.kvr + m.dr, Lk = cache ? m.pos0 + N : N;
    const int record = !cache && moe__any_grad(ctx, x, w->kv_a, w->o);
    moe_real *X = MOE__F32(x), *cq = NULL, *cqn = NULL, *ckv, *ckvn, *kpe, *q, *k = NULL, *v = NULL, *o, *lse = NULL;
    int64_t ld_lat = cache ? R : m.kvr, ld_kpe = cache ? R : m.dr;
    moe_dtype prec = ctx->conf.gemm_compute, keep = moe__stash_format(prec, 0), keep_fp8 = moe__stash_format(prec, 1);
    moe__gemm_op g;
    moe__node *n;
    if (!S) return MOE_ERR_MEMORY;
    S->m = m;
    S->w = w;
    S->cos_sin = rope->cos_sin;
    S->prec = prec;
    ckv = moe__dev_real(ctx, N * m.kvr, "mla");
    ckvn = cache ? cache->rows + m.pos0 * R : moe__dev_real(ctx, N * m.kvr, "mla");
    kpe = cache ? cache->rows + m.pos0 * R + m.kvr : moe__dev_real(ctx, N * m.dr, "mla");
    q = moe__dev_real(ctx, N * H * m.dqk, "mla");
    o = moe__dev_real(ctx, N * H * m.dv, "mla");
    if (record && !(S->rkv = moe__dev_real(ctx, N, "mla"))) return MOE_ERR_MEMORY;
    if (!ckv || !ckvn || !kpe || !q || !o) return MOE_ERR_MEMORY;
    /* the latents: RMSNorm(c_KV) and the decoupled RoPE key (kv_a's rows are [c_KV ; k_pe]) */
    MOE__TRY(moe__linear(ctx, X, N, m.d, MOE__F32(w->kv_a), m.kvr, ckv, prec));
    g = moe__gemm_1(N, m.dr, m.d, X, m.d, 0, MOE__F32(w->kv_a) + m.kvr * m.d, m.d, 1, kpe, ld_kpe, 0, prec);
    g.role_a = MOE_FP8_FPROP_X;
    g.role_b = MOE_FP8_FPROP_W;
    MOE__TRY(be->gemm(ctx, &g));
    MOE__TRY(be->rmsnorm_fwd(ctx, ckv, m.kvr, MOE__F32(w->kv_a_norm), N, m.kvr, m.eps, ckvn, ld_lat, S->rkv));
    MOE__TRY(be->rope(ctx, kpe, N, m.T, 1, ld_kpe, 0, m.dr, rope->cos_sin, m.pos0, m.layout, 0));
    if (cache && cache->sync) moe__count(cache->sync->progress + cache->sync->row * MOE__LINE); /* our rows are written */
    if (cache && cache->write_only) {
        *out = NULL;
        return MOE_OK;
    }
    /* queries, rotated at their positions */
    if (m.qr > 0) {
        cq = moe__dev_real(ctx, N * m.qr, "mla");
        cqn = moe__dev_real(ctx, N * m.qr, "mla");
        if (record && !(S->rq = moe__dev_real(ctx, N, "mla"))) return MOE_ERR_MEMORY;
        if (!cq || !cqn) return MOE_ERR_MEMORY;
        MOE__TRY(moe__linear(ctx, X, N, m.d, MOE__F32(w->q_a), m.qr, cq, prec));
        MOE__TRY(be->rmsnorm_fwd(ctx, cq, m.qr, MOE__F32(w->q_a_norm), N, m.qr, m.eps, cqn, m.qr, S->rq));
        MOE__TRY(moe__linear(ctx, cqn, N, m.qr, MOE__F32(w->q_b), H * m.dqk, q, prec));
    } else {
        MOE__TRY(moe__linear(ctx, X, N, m.d, MOE__F32(w->q_proj), H * m.dqk, q, prec));
    }
    MOE__TRY(be->rope(ctx, q, N, m.T, H, m.dqk, m.dn, m.dr, rope->cos_sin, m.pos0, m.layout, 0));
    if (cache && cache->sync) { /* the rows before ours, written by other threads, are read next */
        const moe__pass_sync *s = cache->sync;
        int64_t mine = moe__count_read(s->progress + s->row * MOE__LINE), j;
        for (j = 0; j < s->row; j++) moe__count_await(s->progress + j * MOE__LINE, mine);
    }
    /* attention */
    if (cache && cache->absorb) {
        MOE__TRY(moe__mla_absorbed(ctx, w, &m, cache, q, o, prec));
    } else {
        /* k_nope | v of every key row through kv_b, the RoPE key shared by the heads */
        moe_real *kvb = moe__dev_real(ctx, Lk * H * (m.dn + m.dv), "mla");
        k = moe__dev_real(ctx, Lk * H * m.dqk, "mla");
        v = moe__dev_real(ctx, Lk * H * m.dv, "mla");
        lse = moe__dev_real(ctx, m.B * H * m.T, "mla");
        if (!kvb || !k || !v || !lse) return MOE_ERR_MEMORY;
        g = moe__gemm_1(Lk, H * (m.dn + m.dv), m.kvr, cache ? cache->rows : ckvn, ld_lat, 0, MOE__F32(w->kv_b), m.kvr, 1, kvb,
                        H * (m.dn + m.dv), 0, prec);
        g.role_a = MOE_FP8_FPROP_X;
        g.role_b = MOE_FP8_FPROP_W;
        MOE__TRY(be->gemm(ctx, &g));
        MOE__TRY(be->mla_split_kv(ctx, kvb, cache ? cache->rows + m.kvr : kpe, ld_kpe, Lk, H, m.dn, m.dr, m.dv, k, v));
        MOE__TRY(be->attention_fwd(ctx, q, k, v, m.B, m.T, cache ? Lk : m.T, H, m.dqk, m.dv, m.scale, o, lse));
    }
    MOE__TRY(moe__tensor_out(ctx, x->ndim, x->shape, out));
    MOE__TRY(moe__linear(ctx, o, N, H * m.dv, MOE__F32(w->o), m.d, MOE__F32(*out), prec));
    if (cache) return MOE_OK;
    MOE__TRY(moe__record(ctx, moe__mla_bwd, *out, x, w->kv_a, w->o, &n));
    if (n) {
        n->saved = S;
        MOE__TRY(moe__stash_put(ctx, &S->x, X, N, m.d, keep_fp8));
        if (m.qr > 0) {
            MOE__TRY(moe__stash_put(ctx, &S->cq, cq, N, m.qr, keep));
            MOE__TRY(moe__stash_put(ctx, &S->cqn, cqn, N, m.qr, keep_fp8));
        }
        MOE__TRY(moe__stash_put(ctx, &S->ckv, ckv, N, m.kvr, keep));
        MOE__TRY(moe__stash_put(ctx, &S->ckvn, ckvn, N, m.kvr, keep_fp8));
        MOE__TRY(moe__stash_put(ctx, &S->q, q, N, H * m.dqk, keep));
        MOE__TRY(moe__stash_put(ctx, &S->k, k, N, H * m.dqk, keep));
        MOE__TRY(moe__stash_put(ctx, &S->v, v, N, H * m.dv, keep));
        MOE__TRY(moe__stash_put(ctx, &S->o, o, N, H * m.dv, keep)); /* attention backward reads it (V3: E5M6, not E4M3) */
        MOE__TRY(moe__stash_put(ctx, &S->lse, lse, m.B * H, m.T, MOE_F32));
        ctx->saved_bytes += (size_t)(m.qr > 0 ? 2 : 1) * (size_t)N * sizeof(moe_real); /* the rstd arrays */
    }
    return MOE_OK;
}

/* ---- DeepSeekMoE: route → plan → gather → experts → combine (reference §3) ----
   With expert parallelism (section 15) the packed rows are dispatched between the gather and
   the experts to the ranks that own their experts, and come back before the combine. */

typedef struct moe__moe {
    moe_tensor *gate;   /* [E, d] router weights */
    moe_tensor *bias;   /* [E] e_score_correction_bias: selection only, no gradient */
    moe_tensor *w13;    /* [E, 2I, d] gate_proj | up_proj of every routed expert */
    moe_tensor *w2;     /* [E, d, I] down_proj */
    moe__ffn shared;    /* n_shared_experts·I wide; w13 NULL when there are none */
    int64_t *load;      /* [E] (token, slot) assignments counted since the last bias update (host) */
    moe_comm *ep;       /* expert parallelism: the ranks the routed experts are spread over (NULL: all here) */
    moe_comm *edp;      /* the ranks that own the same experts in the other EP groups (NULL: none) */
    int64_t e_lo, e_n;  /* this rank computes experts [e_lo, e_lo + e_n) */
    moe_dtype ep_dispatch, ep_combine; /* what the exchanges carry (moe_model_expert_parallel_payload) */
} moe__moe;

/* The expert-parallel exchange of one MoE layer (section 15 implements it): the plan is made
   in forward from the packed rows' expert ranges and kept for backward. Received rows come
   rank-major: source s's block, inside it by local expert, each segment in the source's
   packed order. */
typedef struct moe__ep_plan {
    int64_t *send_rows, *recv_rows; /* [P] rows to and from each rank of the EP group (host) */
    int64_t *recv_start;            /* [P + 1] where source s's block starts (host) */
    int64_t *recv_off;              /* [P][e_n + 1] local expert j of source s: rows [off[j], off[j+1]) of s's block (host) */
    int64_t rows;                   /* rows received in all */
} moe__ep_plan;
static moe_status moe__ep_plan_make(moe_ctx *ctx, const moe__moe *L, const int64_t *offset, moe__ep_plan *plan);
/* Rows of `width` reals: dispatch (back = 0: packed rows to their experts' ranks) or combine
   (back = 1: received rows home again), carried as `payload` (MOE_F32, MOE_BF16, or
   MOE_FP8_E4M3 in 1×B tiles). */
static moe_status moe__ep_exchange(moe_ctx *ctx, const moe__moe *L, const moe__ep_plan *plan, int back, const moe_real *send,
                                   moe_real *recv, int64_t width, moe_dtype payload);
/* The same in two halves, for work beside it: post encodes the rows and posts them once the
   EP group agrees (st: this rank's verdict so far; on failure nothing is left in flight);
   finish, which must follow on every other path, completes the exchange and decodes the rows
   into recv (st: the verdict of the work beside it, returned unless OK). */
static moe_status moe__ep_post(moe_ctx *ctx, const moe__moe *L, const moe__ep_plan *plan, int back, const moe_real *send,
                               moe_real *recv, int64_t width, moe_dtype payload, moe_status st, moe__ep_xfer **X);
static moe_status moe__ep_finish(moe_ctx *ctx, moe__ep_xfer *X, moe_status st);
/* st on this rank → the EP group's verdict (a failure anywhere fails every rank). */
static moe_status moe__ep_agree(moe_ctx *ctx, const moe__moe *L, moe_status st);

typedef struct moe__moe_saved {
    const moe__moe *L;
    const moe_config *cfg;
    int64_t B, T, N, d, E, K, Is;
    moe_real *s;        /* [N, E] affinity scores */
    int32_t *chosen;    /* [N, K] */
    moe_real *gates;    /* [N, K] */
    moe_real *sel_sum;  /* [N] Σ of the chosen scores (normalisation) */
    int64_t *offset;    /* [E+1] packed-row range of each expert (host) */
    int32_t *row_of;    /* [N, K] packed row of (token, slot) */
    int32_t *slot_of;   /* [N·K] (token, slot) of a packed row */
    moe__stash u;       /* [N, d] the input (router, shared and routed experts) */
    moe__stash h13;     /* [N·K, 2I] packed SwiGLU inputs of the routed experts */
    moe__stash sh_h13;  /* [N, 2·Is] of the shared experts */
    moe_real *f;        /* [B, E] balance-loss load fractions f_i per sequence */
    moe_tensor *aux;    /* the balance loss (one element) */
    float alpha;
    moe_dtype prec;
    moe__ep_plan ep;    /* expert parallelism: the exchange (h13 then holds the received rows') */
    moe_real *xr;       /* and the received rows (arena) */
} moe__moe_saved;

static moe__mlp moe__experts_mlp(const moe__moe *L, const moe_config *c, const int64_t *offset) {
    moe__mlp M;
    memset(&M, 0, sizeof M);
    M.w13 = MOE__F32(L->w13);
    M.w2 = MOE__F32(L->w2);
    M.dw13 = moe__param_grad(L->w13);
    M.dw2 = moe__param_grad(L->w2);
    M.d = c->hidden_size;
    M.I = c->moe_intermediate_size;
    M.groups = c->n_routed_experts;
    M.offsets = offset;
    return M;
}

/* Expert parallelism: this rank's experts over source s's received block (the GEMMs one
   process runs on that source's micro-batch), their gradients into dw [e_n][2I·d | d·I]
   (the parts whose weights take gradients). */
static moe__mlp moe__ep_mlp(const moe__moe *L, const moe_config *c, const moe__ep_plan *P, int64_t s, moe_real *dw) {
    int64_t d = c->hidden_size, I = c->moe_intermediate_size;
    moe__mlp M = moe__experts_mlp(L, c, P->recv_off + s * (L->e_n + 1));
    M.w13 += L->e_lo * 2 * I * d;
    M.w2 += L->e_lo * d * I;
    M.dw13 = dw && M.dw13 ? dw : NULL;
    M.dw2 = dw && M.dw2 ? dw + L->e_n * 2 * I * d : NULL;
    M.groups = L->e_n;
    return M;
}

/* Forward of the routed experts under expert parallelism, in two halves around the shared
   experts, which run while the rows travel. Dispatch: the plan, then the packed rows xp [R, d]
   posted to their experts' ranks (the received rows kept for backward in S->xr). Forward: the
   dispatch completed (st: the shared experts' verdict), this rank's experts on every source's
   rows (the SwiGLU inputs into *h13, kept for backward), the outputs combined back into yp. */
static moe_status moe__ep_dispatch(moe_ctx *ctx, const moe__moe *L, moe__moe_saved *S, const moe_real *xp, moe__ep_xfer **X) {
    moe__ep_plan *P = &S->ep;
    MOE__TRY(moe__ep_plan_make(ctx, L, S->offset, P));
    S->xr = moe__dev_real(ctx, P->rows * S->d, "moe dispatch"); /* the owner of popular experts may run out alone */
    return moe__ep_post(ctx, L, P, 0, xp, S->xr, S->d, L->ep_dispatch, S->xr ? MOE_OK : MOE_ERR_MEMORY, X);
}
static moe_status moe__ep_forward(moe_ctx *ctx, const moe__moe *L, const moe_config *c, moe__moe_saved *S, moe__ep_xfer *X,
                                  moe_status st, moe_real *yp, moe_real **h13) {
    const moe__ep_plan *P = &S->ep;
    int64_t d = c->hidden_size, I = c->moe_intermediate_size, s;
    moe_real *yr, *act;
    st = moe__ep_finish(ctx, X, st);
    yr = moe__dev_real(ctx, P->rows * d, "moe dispatch");
    act = moe__dev_real(ctx, P->rows * I, "moe dispatch");
    *h13 = moe__dev_real(ctx, P->rows * 2 * I, "moe dispatch");
    if (!st && !(yr && act && *h13)) st = MOE_ERR_MEMORY;
    MOE__TRY(moe__ep_agree(ctx, L, st));
    for (s = 0; s < moe_comm_size(L->ep); s++) {
        int64_t r0 = P->recv_start[s], n = P->recv_start[s + 1] - r0;
        moe__mlp M = moe__ep_mlp(L, c, P, s, NULL);
        if (n) MOE__TRY(moe__mlp_fwd(ctx, &M, S->xr + r0 * d, n, yr + r0 * d, *h13 + r0 * 2 * I, act, S->prec));
    }
    return moe__ep_exchange(ctx, L, P, 1, yr, yp, d, L->ep_combine);
}

/* Its backward, in two halves around the shared experts' backward. Out: output gradients dyp
   and gates gp go to the owners (into *dyr, *gr), the gradients in flight (*X) while the gates
   travel and the shared experts run. Backward: that exchange completed (st: the shared
   experts' verdict); the owner still holds the rows it received (rounded as one process's
   saved layer input is). Per source the experts' backward, each source's weight gradients
   into a part added to the running sum in the job's rank order: an EDP group's ranks take
   turns, rank k starting from rank k−1's sum (a broadcast) and handing its own on; the last
   one keeps the sum, the others zero it, so that moe_model_reduce_grads over the job leaves it
   as it is. Input and gate gradients go home. */
static moe_status moe__ep_grads_out(moe_ctx *ctx, const moe__moe_saved *S, const moe_real *dyp, const moe_real *gp, moe_real **dyr,
                                    moe_real **gr, moe__ep_xfer **X) {
    const moe__moe *L = S->L;
    moe_status st;
    *dyr = moe__dev_real(ctx, S->ep.rows * S->d, "moe backward");
    *gr = moe__dev_real(ctx, S->ep.rows, "moe backward");
    MOE__TRY(moe__ep_post(ctx, L, &S->ep, 0, dyp, *dyr, S->d, L->ep_combine, *dyr && *gr ? MOE_OK : MOE_ERR_MEMORY, X));
    st = moe__ep_exchange(ctx, L, &S->ep, 0, gp, *gr, 1, MOE_F32);
    return st ? moe__ep_finish(ctx, *X, st) : MOE_OK;
}
static moe_status moe__ep_backward(moe_ctx *ctx, const moe__moe_saved *S, moe__ep_xfer *X, moe_status st, const moe_real *dyr,
                                   const moe_real *gr, const moe_real *h13, moe_real *dxp, moe_real *dgp) {
    const moe__moe *L = S->L;
    const moe__ep_plan *P = &S->ep;
    const moe_backend *be = MOE__BE(ctx);
    int64_t d = S->d, I = S->cfg->moe_intermediate_size, nw = L->e_n * 3 * I * d, rows = P->rows, s, t;
    int64_t R = L->edp ? moe_comm_size(L->edp) : 1, k = L->edp ? moe_comm_rank(L->edp) : 0;
    moe_real *xr = S->xr, *dxr, *dgr, *part = NULL, *sum = NULL, *u16 = NULL;
    moe_real *dw13 = moe__param_grad(L->w13), *dw2 = moe__param_grad(L->w2);
    moe_dtype keep = moe__stash_format(S->prec, 0);
    st = moe__ep_finish(ctx, X, st);
    dxr = moe__dev_zeros(ctx, rows * d, "moe backward");
    dgr = moe__dev_real(ctx, rows, "moe backward");
    if ((dw13 || dw2) && (!(part = moe__dev_real(ctx, nw, "moe backward")) || !(sum = moe__dev_zeros(ctx, nw, "moe backward"))))
        part = NULL;
    if (keep != MOE_F32) u16 = (moe_real *)moe__dev_scratch(ctx, rows * d + 1, sizeof(uint16_t), "moe backward");
    if (!st && !(dxr && dgr && (part || !(dw13 || dw2)) && (u16 || keep == MOE_F32))) st = MOE_ERR_MEMORY;
    MOE__TRY(moe__ep_agree(ctx, L, st));
    if (keep != MOE_F32) { /* the received inputs, rounded as one process's saved input gives them back */
        MOE__TRY(be->convert(ctx, xr, MOE_F32, rows * d, u16, keep));
        MOE__TRY(be->convert(ctx, u16, keep, rows * d, xr, MOE_F32));
    }
    for (t = 0; t < R; t++) {
        if (t == k)
            for (s = 0; s < moe_comm_size(L->ep); s++) {
                int64_t r0 = P->recv_start[s], n = P->recv_start[s + 1] - r0;
                moe__mlp M = moe__ep_mlp(L, S->cfg, P, s, part);
                if (!n) continue;
                if (part) MOE__TRY(be->memset(ctx, part, 0, (size_t)nw * sizeof(moe_real)));
                MOE__TRY(moe__mlp_bwd(ctx, &M, xr + r0 * d, dyr + r0 * d, n, h13 + r0 * 2 * I, gr + r0, dgr + r0, dxr + r0 * d, S->prec));
                if (part) MOE__TRY(be->axpy(ctx, 1, part, nw, sum)); /* sum + 1·part: exactly sum + part */
            }
        if (part && t < R - 1) MOE__TRY(moe_comm_bcast(ctx, L->edp, sum, nw, sizeof(moe_real) == 4 ? MOE_COMM_F32 : MOE_COMM_F64, (int)t));
    }
    if (part && k == R - 1) { /* into the model's gradient slab, laid out [E][2I·d] and [E][d·I] */
        if (dw13) MOE__TRY(be->axpy(ctx, 1, sum, L->e_n * 2 * I * d, dw13 + L->e_lo * 2 * I * d));
        if (dw2) MOE__TRY(be->axpy(ctx, 1, sum + L->e_n * 2 * I * d, L->e_n * d * I, dw2 + L->e_lo * d * I));
    }
    MOE__TRY(moe__ep_exchange(ctx, L, P, 1, dxr, dxp, d, L->ep_combine));
    return moe__ep_exchange(ctx, L, P, 1, dgr, dgp, 1, MOE_F32);
}

static moe_status moe__moe_bwd(moe_ctx *ctx, moe__node *n) {
    const moe_backend *be = MOE__BE(ctx);
    moe__moe_saved *S = (moe__moe_saved *)n->saved;
    const moe__moe *L = S->L;
    int64_t N = S->N, d = S->d, E = S->E, K = S->K, R = N * K;
    const moe_real *dy = MOE__F32(n->out->grad), *u = moe__stash_get(ctx, &S->u), *h13 = moe__stash_get(ctx, &S->h13);
    const moe_real *sh_h13 = NULL;
    moe__mlp experts = moe__experts_mlp(L, S->cfg, S->offset);
    moe_real *du = moe__grad(ctx, n->in[0]), *xp = NULL, *dyp, *dxp, *gp, *dgp, *dg, *dz, *dyr = NULL, *gr = NULL, aux_g = 0;
    moe__ep_xfer *X = NULL;
    moe_status st;
    if (L->shared.w13) sh_h13 = moe__stash_get(ctx, &S->sh_h13);
    if (S->aux && S->aux->grad) aux_g = moe__tensor_at(ctx, S->aux->grad, 0);
    if (!S->xr) xp = moe__dev_real(ctx, R * d, "moe backward"); /* expert parallel: the owners kept the rows */
    dyp = moe__dev_real(ctx, R * d, "moe backward");
    dxp = moe__dev_zeros(ctx, R * d, "moe backward");
    gp = moe__dev_real(ctx, R, "moe backward");
    dgp = moe__dev_real(ctx, R, "moe backward");
    dg = moe__dev_real(ctx, R, "moe backward");
    dz = moe__dev_real(ctx, N * E, "moe backward");
    st = u && h13 && (sh_h13 || !L->shared.w13) && (du || !n->in[0]->requires_grad) && (xp || S->xr) && dyp && dxp && gp && dgp &&
         dg && dz ? MOE_OK : MOE_ERR_MEMORY;
    MOE__TRY(S->xr ? moe__ep_agree(ctx, L, st) : st); /* expert parallel: no rank leaves the others waiting */
    /* dispatch again: packed inputs, output gradients and gates (expert parallel: sent to the
       experts' ranks, the output gradients in flight while the shared experts run) */
    if (xp) MOE__TRY(be->gather_rows(ctx, u, S->slot_of, (int32_t)K, R, d, xp));
    MOE__TRY(be->gather_rows(ctx, dy, S->slot_of, (int32_t)K, R, d, dyp));
    MOE__TRY(be->gather_rows(ctx, S->gates, S->slot_of, 1, R, 1, gp));
    if (S->xr) MOE__TRY(moe__ep_grads_out(ctx, S, dyp, gp, &dyr, &gr, &X));
    /* shared experts */
    if (L->shared.w13) {
        moe__mlp M = moe__ffn_mlp(&L->shared, d);
        M.beside = X;
        st = moe__mlp_bwd(ctx, &M, u, dy, N, sh_h13, NULL, NULL, du, S->prec);
    }
    /* the experts, with their gates' gradients, then un-permute (a dispatch's backward is a combine) */
    if (S->xr) st = moe__ep_backward(ctx, S, X, st, dyr, gr, h13, dxp, dgp); /* the exchange completes whatever st is */
    else if (!st) st = moe__mlp_bwd(ctx, &experts, xp, dyp, R, h13, gp, dgp, dxp, S->prec);
    MOE__TRY(st);
    MOE__TRY(be->gather_rows(ctx, dgp, S->row_of, 1, R, 1, dg));
    MOE__TRY(be->combine(ctx, dxp, S->row_of, NULL, N, K, d, du));
    /* router: gates → scores (reference §10), plus the balance loss, → logits z; its GEMMs stay FP32 */
    MOE__TRY(be->router_bwd(ctx, S->cfg, S->s, S->chosen, S->sel_sum, dg, S->f,
                            aux_g != 0 && S->alpha > 0 ? aux_g * (moe_real)S->alpha / (moe_real)(S->B * S->T) : 0, N, S->T, dz));
    return moe__linear_bwd(ctx, u, dz, N, d, MOE__F32(L->gate), E, du, moe__param_grad(L->gate), MOE_F32);
}

/* y = shared(u) + Σ_k g_k·Expert_k(u) for u [B, T, d]; *aux = the sequence-wise balance
   loss α·mean_b Σ_i f_i P_i (0 when alpha is 0). */
static moe_status moe__moe_forward(moe_ctx *ctx, moe__moe *L, const moe_config *c, int64_t B, int64_t T, float alpha,
                                   moe_tensor *x, moe_tensor **y, moe_tensor **aux) {
    const moe_backend *be = MOE__BE(ctx);
    moe__moe_saved *S = (moe__moe_saved *)moe__arena_alloc(ctx, 1, sizeof *S, "moe");
    int64_t N = B * T, d = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int64_t I = c->moe_intermediate_size, R = N * K, e, one = 1;
    const moe_real *u = MOE__F32(x);
    moe_real *z, *xp, *yp, *h13, *act, *sh_h13 = NULL, balance = 0;
    moe__mlp experts;
    moe__ep_xfer *X = NULL;
    moe__node *n;
    moe_status st;
    if (!S) return MOE_ERR_MEMORY;
    S->L = L; S->cfg = c; S->B = B; S->T = T; S->N = N; S->d = d; S->E = E; S->K = K;
    S->Is = L->shared.inter;
    S->alpha = alpha;
    S->prec = ctx->conf.gemm_compute;
    S->s = moe__dev_real(ctx, N * E, "moe");
    S->chosen = (int32_t *)moe__dev_scratch(ctx, R, sizeof(int32_t), "moe");
    S->gates = moe__dev_real(ctx, R, "moe");
    S->sel_sum = moe__dev_real(ctx, N, "moe");
    S->offset = (int64_t *)moe__arena_alloc(ctx, (size_t)(E + 1), sizeof(int64_t), "moe");
    S->row_of = (int32_t *)moe__dev_scratch(ctx, R, sizeof(int32_t), "moe");
    S->slot_of = (int32_t *)moe__dev_scratch(ctx, R, sizeof(int32_t), "moe");
    S->f = moe__dev_real(ctx, B * E, "moe");
    z = moe__dev_real(ctx, N * E, "moe");
    xp = moe__dev_real(ctx, R * d, "moe");
    yp = moe__dev_real(ctx, R * d, "moe");
    h13 = moe__dev_real(ctx, R * 2 * I, "moe");
    act = moe__dev_real(ctx, (R > N ? R : N) * (I > S->Is ? I : S->Is), "moe");
    if (!S->s || !S->chosen || !S->gates || !S->sel_sum || !S->offset || !S->row_of || !S->slot_of || !S->f || !z || !xp ||
        !yp || !h13 || !act)
        return MOE_ERR_MEMORY;
    /* route: the router in FP32, then sigmoid (softmax) scores and the group-limited top-k */
    MOE__TRY(moe__linear(ctx, u, N, d, MOE__F32(L->gate), E, z, MOE_F32));
    MOE__TRY(be->router_fwd(ctx, c, z, MOE__F32(L->bias), N, S->s, S->chosen, S->gates, S->sel_sum));
    /* plan: the packed rows of each expert; the loads the bias update balances */
    MOE__TRY(be->dispatch_plan(ctx, S->chosen, N, K, E, S->offset, S->row_of, S->slot_of));
    if (ctx->conf.count_loads)
        for (e = 0; e < E; e++) L->load[e] += S->offset[e + 1] - S->offset[e];
    /* gather, experts: one SwiGLU GEMM chain per expert over all its tokens */
    experts = moe__experts_mlp(L, c, S->offset);
    MOE__TRY(be->gather_rows(ctx, u, S->slot_of, (int32_t)K, R, d, xp));
    if (L->ep && ctx->conf.grad_enabled) { /* without a backward to come every rank runs all its experts: the same bits */
        if (S->prec == MOE_FP8_E4M3 && ctx->conf.fp8.per_tensor)
            return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "expert parallelism with per-tensor FP8 scales: a scale over every "
                             "source's rows is not one process's (use tile scales)");
        if (L->ep_dispatch == MOE_FP8_E4M3 && S->prec != MOE_FP8_E4M3)
            return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "expert parallelism: an FP8 dispatch wants FP8 training (the GEMM "
                             "precision is %s)", moe_dtype_name(S->prec));
        MOE__TRY(moe__ep_dispatch(ctx, L, S, xp, &X)); /* in flight while the shared experts run */
    } else {
        MOE__TRY(moe__mlp_fwd(ctx, &experts, xp, R, yp, h13, act, S->prec));
    }
    /* shared experts, then the weighted combine (gather-only: each token sums its slots) */
    if (L->shared.w13) {
        moe__mlp M = moe__ffn_mlp(&L->shared, d);
        M.beside = X;
        st = moe__tensor_out(ctx, x->ndim, x->shape, y); /* the shared experts write it */
        if (!st && !(sh_h13 = moe__dev_real(ctx, N * 2 * S->Is, "moe"))) st = MOE_ERR_MEMORY;
        if (!st) st = moe__mlp_fwd(ctx, &M, u, N, MOE__F32(*y), sh_h13, act, S->prec);
    } else {
        st = moe_tensor_temp(ctx, MOE_F32, x->ndim, x->shape, y);
    }
    if (S->xr) st = moe__ep_forward(ctx, L, c, S, X, st, yp, &h13); /* the dispatch completed whatever st is; h13 the received rows' */
    MOE__TRY(st);
    MOE__TRY(be->combine(ctx, yp, S->row_of, S->gates, N, K, d, MOE__F32(*y)));
    /* sequence-wise balance loss (reference §3.5), on the realised routing */
    if (alpha > 0) {
        MOE__TRY(be->balance_loss(ctx, c, S->s, S->chosen, B, T, S->f, &balance));
        balance *= (moe_real)alpha / (moe_real)B;
    }
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, aux));
    MOE__TRY(be->fill(ctx, balance, 1, MOE__F32(*aux)));
    S->aux = *aux;
    MOE__TRY(moe__record(ctx, moe__moe_bwd, *y, x, L->gate, L->w13, &n));
    if (n) {
        moe_dtype keep_fp8 = moe__stash_format(S->prec, 1);
        n->saved = S;
        if (alpha > 0) (*aux)->requires_grad = 1; /* its gradient is applied by this node */
        /* the router's input stays out of FP8; the routed experts' inputs are rows of it,
           dispatched again in backward */
        MOE__TRY(moe__stash_put(ctx, &S->u, u, N, d, moe__stash_format(S->prec, 0)));
        MOE__TRY(moe__stash_put(ctx, &S->h13, h13, S->xr ? S->ep.rows : R, 2 * I, keep_fp8));
        if (sh_h13) MOE__TRY(moe__stash_put(ctx, &S->sh_h13, sh_h13, N, 2 * S->Is, keep_fp8));
        /* router state: scores, gates, Σ, choices, permutation, load fractions */
        ctx->saved_bytes += (size_t)(N * E + R + N + B * E) * sizeof(moe_real) + (size_t)(3 * R) * sizeof(int32_t) +
                            (size_t)(E + 1) * sizeof(int64_t);
    }
    return MOE_OK;
}
/* ============================================================================================
   9. model — DeepSeek-V3 with MTP, one forward for training and decoding               >>model
   ============================================================================================
   moe_config, the model's tensors (parameters, gradients and buffers each one slab on the
   context's device; the tensors are views into them), and its forward passes: the blocks,
   the main trunk and the MTP modules, written once for training, evaluation and decoding
   (which passes each MLA layer its latent cache). */

MOE_API moe_config moe_config_tiny(void) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 256; c.hidden_size = 64; c.intermediate_size = 128; c.moe_intermediate_size = 32;
    c.num_hidden_layers = 4; c.first_k_dense_replace = 1; c.num_attention_heads = 4;
    c.q_lora_rank = 32; c.kv_lora_rank = 32; c.qk_nope_head_dim = 16; c.qk_rope_head_dim = 8; c.v_head_dim = 16;
    c.n_routed_experts = 16; c.n_shared_experts = 1; c.num_experts_per_tok = 4; c.n_group = 4; c.topk_group = 2;
    c.scoring_func = MOE_SCORING_SIGMOID; c.topk_method = MOE_TOPK_NOAUX_TC; c.norm_topk_prob = 1;
    c.routed_scaling_factor = 2.5; c.num_nextn_predict_layers = 1; c.rope_theta = 10000.0; c.rms_norm_eps = 1e-6;
    c.max_position_embeddings = 64; c.tie_word_embeddings = 0; c.initializer_range = 0.02;
    return c;
}

MOE_API moe_config moe_config_small(void) {
    moe_config c = moe_config_tiny();
    c.vocab_size = 4096; c.hidden_size = 256; c.intermediate_size = 512; c.moe_intermediate_size = 128;
    c.num_hidden_layers = 8; c.first_k_dense_replace = 2; c.num_attention_heads = 8;
    c.q_lora_rank = 128; c.kv_lora_rank = 128; c.qk_nope_head_dim = 32; c.qk_rope_head_dim = 16; c.v_head_dim = 32;
    c.n_routed_experts = 32; c.num_experts_per_tok = 4; c.n_group = 8; c.topk_group = 4;
    c.max_position_embeddings = 256;
    return c;
}

MOE_API void moe_config_resolve(const moe_config *cfg, moe_config *out) {
    moe_config d = moe_config_tiny(), c = *cfg;
#define MOE__DEF(f) if (c.f == 0) c.f = d.f
    MOE__DEF(vocab_size); MOE__DEF(hidden_size); MOE__DEF(intermediate_size); MOE__DEF(moe_intermediate_size);
    MOE__DEF(num_hidden_layers); MOE__DEF(num_attention_heads); MOE__DEF(kv_lora_rank); MOE__DEF(qk_nope_head_dim);
    MOE__DEF(qk_rope_head_dim); MOE__DEF(v_head_dim); MOE__DEF(n_routed_experts); MOE__DEF(num_experts_per_tok);
    MOE__DEF(routed_scaling_factor); MOE__DEF(rope_theta); MOE__DEF(rms_norm_eps); MOE__DEF(max_position_embeddings);
    MOE__DEF(initializer_range);
#undef MOE__DEF
    if (c.n_group == 0) c.n_group = 1;
    if (c.topk_group == 0) c.topk_group = c.n_group;
    *out = c;
}

MOE_API moe_status moe_config_validate(moe_ctx *ctx, const moe_config *c) {
    static const char *fn = "moe_config_validate";
    MOE__CHECK_CTX(ctx);
    if (!c) return moe__fail(ctx, MOE_ERR_ARG, "%s: config is NULL", fn);
    /* sizes are capped at 2^24 (layers 2^16) so that every product of three of them fits int64 */
#define MOE__POS(f) if (c->f <= 0 || c->f > ((int64_t)1 << 24)) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: " #f " must be 1..2^24, got %lld", fn, (long long)c->f)
#define MOE__NONNEG(f) if (c->f < 0 || c->f > ((int64_t)1 << 24)) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: " #f " must be 0..2^24, got %lld", fn, (long long)c->f)
    if (c->vocab_size <= 0) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: vocab_size must be positive, got %lld", fn, (long long)c->vocab_size);
    if (c->num_hidden_layers > 65536) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: num_hidden_layers must be at most 65536", fn);
    MOE__POS(hidden_size); MOE__POS(num_hidden_layers); MOE__POS(num_attention_heads); MOE__NONNEG(intermediate_size);
    MOE__NONNEG(moe_intermediate_size);
    MOE__POS(kv_lora_rank); MOE__POS(qk_nope_head_dim); MOE__POS(qk_rope_head_dim); MOE__POS(v_head_dim);
    MOE__POS(max_position_embeddings); MOE__NONNEG(q_lora_rank); MOE__NONNEG(first_k_dense_replace);
    MOE__NONNEG(n_shared_experts); MOE__NONNEG(num_nextn_predict_layers);
#undef MOE__POS
#undef MOE__NONNEG
    if (c->vocab_size > 0x7FFFFFFF) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: vocab_size must fit in int32", fn);
    if (c->qk_rope_head_dim % 2) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: qk_rope_head_dim must be even, got %lld", fn, (long long)c->qk_rope_head_dim);
    if (c->first_k_dense_replace > c->num_hidden_layers)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: first_k_dense_replace (%lld) exceeds num_hidden_layers (%lld)", fn,
                         (long long)c->first_k_dense_replace, (long long)c->num_hidden_layers);
    if (c->first_k_dense_replace > 0 && c->intermediate_size <= 0)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: dense layers need intermediate_size > 0", fn);
    if (c->num_nextn_predict_layers > 4) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: at most 4 MTP modules are supported, got %lld", fn, (long long)c->num_nextn_predict_layers);
    if (c->first_k_dense_replace < c->num_hidden_layers || c->num_nextn_predict_layers > 0) {
        if (c->n_routed_experts <= 0 || c->n_routed_experts > MOE__MAX_EXPERTS)
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: n_routed_experts must be 1..%d, got %lld", fn, MOE__MAX_EXPERTS, (long long)c->n_routed_experts);
        if (c->moe_intermediate_size <= 0) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: moe_intermediate_size must be positive", fn);
        if (c->num_experts_per_tok <= 0 || c->num_experts_per_tok > c->n_routed_experts)
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: num_experts_per_tok must be 1..n_routed_experts (%lld), got %lld", fn,
                             (long long)c->n_routed_experts, (long long)c->num_experts_per_tok);
        if (c->n_group <= 0 || c->n_routed_experts % c->n_group)
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: n_group (%lld) must divide n_routed_experts (%lld)", fn,
                             (long long)c->n_group, (long long)c->n_routed_experts);
        if (c->topk_group <= 0 || c->topk_group > c->n_group)
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: topk_group must be 1..n_group (%lld), got %lld", fn,
                             (long long)c->n_group, (long long)c->topk_group);
        if (c->topk_method != MOE_TOPK_GREEDY && c->topk_group * (c->n_routed_experts / c->n_group) < c->num_experts_per_tok)
            return moe__fail(ctx, MOE_ERR_CONFIG,
                             "%s: topk_group·n_routed_experts/n_group = %lld·%lld/%lld = %lld experts are eligible, fewer than num_experts_per_tok = %lld",
                             fn, (long long)c->topk_group, (long long)c->n_routed_experts, (long long)c->n_group,
                             (long long)(c->topk_group * (c->n_routed_experts / c->n_group)), (long long)c->num_experts_per_tok);
        if ((int)c->scoring_func < 0 || (int)c->scoring_func > 1) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: unknown scoring_func", fn);
        if ((int)c->topk_method < 0 || (int)c->topk_method > 2) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: unknown topk_method", fn);
        if (c->topk_method == MOE_TOPK_NOAUX_TC && c->scoring_func != MOE_SCORING_SIGMOID)
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: topk_method noaux_tc needs scoring_func sigmoid", fn);
        if (!(c->routed_scaling_factor > 0) || !isfinite(c->routed_scaling_factor))
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: routed_scaling_factor must be positive", fn);
    }
    if (!(c->rope_theta > 1) || !isfinite(c->rope_theta)) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: rope_theta must be > 1", fn);
    if (!(c->rms_norm_eps > 0) || c->rms_norm_eps > 1) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: rms_norm_eps must be in (0, 1]", fn);
    if (!(c->initializer_range >= 0) || !isfinite(c->initializer_range)) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: initializer_range must be >= 0", fn);
    if (c->rope_scaling.factor != 0) {
        const moe_yarn *y = &c->rope_scaling;
        if (!(y->factor >= 1 && y->factor <= 1e6) || y->original_max_pos <= 0 || y->original_max_pos > ((int64_t)1 << 26) ||
            !(y->beta_fast > 0 && y->beta_fast <= 1e6) || !(y->beta_slow > 0 && y->beta_slow <= 1e6))
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: rope_scaling (YaRN) needs factor in [1, 1e6], original_max_position_embeddings "
                             "in 1..2^26, beta_fast and beta_slow in (0, 1e6]", fn);
        if (!(y->mscale >= 0 && y->mscale <= 1e6) || !(y->mscale_all_dim >= 0 && y->mscale_all_dim <= 1e6))
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: rope_scaling (YaRN) mscale and mscale_all_dim must be in [0, 1e6] (0: absent)", fn);
    }
    if (c->rope_layout != MOE_ROPE_PAIRS && c->rope_layout != MOE_ROPE_HALVES)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: unknown rope_layout %d", fn, (int)c->rope_layout);
    if (c->max_position_embeddings > ((int64_t)1 << 26)) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: max_position_embeddings too large", fn);
    return MOE_OK;
}

#define MOE__NAME_MAX 96

typedef struct moe__block {
    moe_tensor *attn_norm, *ffn_norm;
    moe__mla attn;
    int is_moe;
    moe__ffn dense;
    moe__moe moe;
} moe__block;

typedef struct moe__mtp {
    moe_tensor *enorm, *hnorm, *eh_proj, *head_norm;
    moe__block block;
} moe__mtp;

typedef struct moe__entry {
    char name[MOE__NAME_MAX];
    moe_tensor *t;
    int64_t offset; /* in the parameter or buffer slab */
    int init;       /* MOE__INIT_NORMAL, _ONES or _BUFFER */
    int is_param;   /* 0: a buffer (expert bias): saved, never trained */
    int decay;      /* gets weight decay: matrices, not norms or biases */
    int mtp;        /* belongs to an MTP module */
} moe__entry;

struct moe_model {
    moe_config cfg;
    moe_tensor *embed, *norm, *head;
    moe__block *layers;
    moe__mtp *mtp;
    moe__entry *entries;
    int64_t n_entries, cap_entries;
    moe_tensor *params, *grads, *buffers; /* the slabs the entries are views of */
    int64_t n_params, n_buffers;          /* their lengths, each entry starting 64-byte aligned */
    const moe_backend *be;                /* whose memory the slabs are */
    moe_real *bias_step;                  /* [E] device: a bias update's steps */
    moe_rope_table rope;
    moe_real softmax_scale;
    int64_t *loads; /* expert load counters of every MoE layer, main then MTP (host) */
    int64_t n_loads;
    moe_tensor *grad_sum;  /* moe_model_accumulate_grads' running sum (made on first use) */
    int64_t n_accumulated; /* backwards in it */
    moe_adamw *zero;       /* the ZeRO-1 optimizer whose shards moe_model_reduce_grads scatters to */
};

MOE_API const moe_config *moe_model_config(const moe_model *m) { return m ? &m->cfg : NULL; }
MOE_API int64_t moe_model_tensor_count(const moe_model *m) { return m ? m->n_entries : 0; }
MOE_API moe_tensor *moe_model_tensor(const moe_model *m, int64_t i, const char **name, int *is_param) {
    if (!m || i < 0 || i >= m->n_entries) return NULL;
    if (name) *name = m->entries[i].name;
    if (is_param) *is_param = m->entries[i].is_param;
    return m->entries[i].t;
}
MOE_API moe_tensor *moe_model_find(const moe_model *m, const char *name) {
    int64_t i;
    if (!m || !name) return NULL;
    for (i = 0; i < m->n_entries; i++)
        if (strcmp(m->entries[i].name, name) == 0) return m->entries[i].t;
    return NULL;
}

enum { MOE__INIT_NORMAL, MOE__INIT_ONES, MOE__INIT_BUFFER };

/* Register one model tensor: its name, shape, slab (parameters or buffers) and offset in
   it; its memory and initial values come once every tensor is registered. */
static moe_status moe__model_add(moe_ctx *ctx, moe_model *m, moe_tensor **slot, int kind, int mtp, int ndim, int64_t d0,
                                 int64_t d1, int64_t d2, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 10, 11)))
#endif
    ;
static moe_status moe__model_add(moe_ctx *ctx, moe_model *m, moe_tensor **slot, int kind, int mtp, int ndim, int64_t d0,
                                 int64_t d1, int64_t d2, const char *fmt, ...) {
    int64_t shape[3], *len;
    moe__entry *e;
    moe_tensor meta;
    va_list ap;
    shape[0] = d0; shape[1] = d1; shape[2] = d2;
    if (m->n_entries == m->cap_entries) {
        int64_t cap = m->cap_entries ? 2 * m->cap_entries : 64;
        moe__entry *p = (moe__entry *)MOE_REALLOC(m->entries, (size_t)cap * sizeof *p);
        if (!p) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_model_new: out of memory");
        ctx->heap_allocs++;
        m->entries = p;
        m->cap_entries = cap;
    }
    e = &m->entries[m->n_entries];
    memset(e, 0, sizeof *e);
    va_start(ap, fmt);
    vsnprintf(e->name, sizeof e->name, fmt, ap);
    va_end(ap);
    MOE__TRY(moe__tensor_meta(ctx, "moe_model_new", &meta, MOE_F32, ndim, shape));
    if (!(e->t = (moe_tensor *)moe__heap_alloc(ctx, sizeof *e->t))) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_model_new: out of memory");
    *e->t = meta;
    m->n_entries++;
    *slot = e->t;
    e->init = kind;
    e->is_param = kind != MOE__INIT_BUFFER;
    e->decay = kind == MOE__INIT_NORMAL;
    e->mtp = mtp;
    len = e->is_param ? &m->n_params : &m->n_buffers;
    e->offset = *len;
    *len += (meta.numel + MOE__ALIGN / (int64_t)sizeof(moe_real) - 1) / (MOE__ALIGN / (int64_t)sizeof(moe_real)) *
            (MOE__ALIGN / (int64_t)sizeof(moe_real));
    return MOE_OK;
}

/* A view of `slab` from element `offset` with t's shape (a gradient: requires no gradient). */
static moe_status moe__slab_view(moe_ctx *ctx, moe_tensor *slab, int64_t offset, const moe_tensor *t, moe_tensor **out) {
    if (!(*out = (moe_tensor *)moe__heap_alloc(ctx, sizeof **out))) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_model_new: out of memory");
    **out = *t;
    (*out)->base = slab;
    (*out)->data = MOE__F32(slab) + offset;
    return MOE_OK;
}

/* Give the registered tensors their slabs and initial values: N(0, initializer_range²) from
   stream (registration index + 1) of the seed, so the initialisation depends on the seed and
   the architecture only; norms 1; buffers 0. */
static moe_status moe__model_place(moe_ctx *ctx, moe_model *m, uint64_t seed) {
    int64_t one, i;
    one = m->n_params > 0 ? m->n_params : 1;
    MOE__TRY(moe_tensor_new(ctx, MOE_F32, 1, &one, &m->params));
    MOE__TRY(moe_tensor_new(ctx, MOE_F32, 1, &one, &m->grads));
    one = m->n_buffers > 0 ? m->n_buffers : 1;
    MOE__TRY(moe_tensor_new(ctx, MOE_F32, 1, &one, &m->buffers));
    m->be = MOE__BE(ctx);
    MOE__TRY(m->be->alloc(ctx, (size_t)m->cfg.n_routed_experts * sizeof(moe_real), (void **)&m->bias_step));
    for (i = 0; i < m->n_entries; i++) {
        moe__entry *e = &m->entries[i];
        moe_tensor *t = e->t;
        t->base = e->is_param ? m->params : m->buffers;
        t->data = MOE__F32(t->base) + e->offset;
        if (e->init == MOE__INIT_NORMAL) {
            moe_rng rng = moe_rng_new(seed, (uint64_t)(i + 1));
            MOE__TRY(moe_tensor_fill_normal(ctx, t, &rng, 0.0f, (float)m->cfg.initializer_range));
        } else if (e->init == MOE__INIT_ONES) {
            MOE__TRY(moe_tensor_fill(ctx, t, 1.0));
        }
        if (e->is_param) {
            MOE__TRY(moe__slab_view(ctx, m->grads, e->offset, t, &t->grad));
            t->requires_grad = 1;
        }
    }
    return MOE_OK;
}

/* The tensors of one transformer block; `p` is its name prefix ("model.layers.3."). */
static moe_status moe__block_init(moe_ctx *ctx, moe_model *m, moe__block *b, int is_moe, int mtp,
                                  int64_t **loads, const char *p) {
    const moe_config *c = &m->cfg;
    int64_t d = c->hidden_size, H = c->num_attention_heads, dqk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    int64_t E = c->n_routed_experts, I = c->moe_intermediate_size;
    MOE__TRY(moe__model_add(ctx, m, &b->attn_norm, MOE__INIT_ONES, mtp, 1, d, 0, 0, "%sinput_layernorm.weight", p));
    if (c->q_lora_rank > 0) {
        MOE__TRY(moe__model_add(ctx, m, &b->attn.q_a, MOE__INIT_NORMAL, mtp, 2, c->q_lora_rank, d, 0, "%sself_attn.q_a_proj.weight", p));
        MOE__TRY(moe__model_add(ctx, m, &b->attn.q_a_norm, MOE__INIT_ONES, mtp, 1, c->q_lora_rank, 0, 0, "%sself_attn.q_a_layernorm.weight", p));
        MOE__TRY(moe__model_add(ctx, m, &b->attn.q_b, MOE__INIT_NORMAL, mtp, 2, H * dqk, c->q_lora_rank, 0, "%sself_attn.q_b_proj.weight", p));
    } else {
        MOE__TRY(moe__model_add(ctx, m, &b->attn.q_proj, MOE__INIT_NORMAL, mtp, 2, H * dqk, d, 0, "%sself_attn.q_proj.weight", p));
    }
    MOE__TRY(moe__model_add(ctx, m, &b->attn.kv_a, MOE__INIT_NORMAL, mtp, 2, c->kv_lora_rank + c->qk_rope_head_dim, d, 0,
                            "%sself_attn.kv_a_proj_with_mqa.weight", p));
    MOE__TRY(moe__model_add(ctx, m, &b->attn.kv_a_norm, MOE__INIT_ONES, mtp, 1, c->kv_lora_rank, 0, 0, "%sself_attn.kv_a_layernorm.weight", p));
    MOE__TRY(moe__model_add(ctx, m, &b->attn.kv_b, MOE__INIT_NORMAL, mtp, 2, H * (c->qk_nope_head_dim + c->v_head_dim),
                            c->kv_lora_rank, 0, "%sself_attn.kv_b_proj.weight", p));
    MOE__TRY(moe__model_add(ctx, m, &b->attn.o, MOE__INIT_NORMAL, mtp, 2, d, H * c->v_head_dim, 0, "%sself_attn.o_proj.weight", p));
    MOE__TRY(moe__model_add(ctx, m, &b->ffn_norm, MOE__INIT_ONES, mtp, 1, d, 0, 0, "%spost_attention_layernorm.weight", p));
    b->is_moe = is_moe;
    if (!is_moe) {
        b->dense.inter = c->intermediate_size;
        MOE__TRY(moe__model_add(ctx, m, &b->dense.w13, MOE__INIT_NORMAL, mtp, 2, 2 * c->intermediate_size, d, 0, "%smlp.gate_up_proj.weight", p));
        MOE__TRY(moe__model_add(ctx, m, &b->dense.w2, MOE__INIT_NORMAL, mtp, 2, d, c->intermediate_size, 0, "%smlp.down_proj.weight", p));
        return MOE_OK;
    }
    MOE__TRY(moe__model_add(ctx, m, &b->moe.gate, MOE__INIT_NORMAL, mtp, 2, E, d, 0, "%smlp.gate.weight", p));
    MOE__TRY(moe__model_add(ctx, m, &b->moe.bias, MOE__INIT_BUFFER, mtp, 1, E, 0, 0, "%smlp.gate.e_score_correction_bias", p));
    MOE__TRY(moe__model_add(ctx, m, &b->moe.w13, MOE__INIT_NORMAL, mtp, 3, E, 2 * I, d, "%smlp.experts.gate_up_proj", p));
    MOE__TRY(moe__model_add(ctx, m, &b->moe.w2, MOE__INIT_NORMAL, mtp, 3, E, d, I, "%smlp.experts.down_proj", p));
    if (c->n_shared_experts > 0) {
        b->moe.shared.inter = c->n_shared_experts * I;
        MOE__TRY(moe__model_add(ctx, m, &b->moe.shared.w13, MOE__INIT_NORMAL, mtp, 2, 2 * b->moe.shared.inter, d, 0,
                                "%smlp.shared_experts.gate_up_proj.weight", p));
        MOE__TRY(moe__model_add(ctx, m, &b->moe.shared.w2, MOE__INIT_NORMAL, mtp, 2, d, b->moe.shared.inter, 0,
                                "%smlp.shared_experts.down_proj.weight", p));
    }
    b->moe.load = *loads;
    *loads += E;
    return MOE_OK;
}

MOE_API moe_status moe_model_new(moe_ctx *ctx, const moe_config *cfg, uint64_t seed, moe_model **out) {
    moe_model *m;
    moe_config c;
    int64_t L, k, n_moe, *loads;
    char prefix[64];
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!cfg || !out) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_new: NULL config or out");
    *out = NULL;
    moe_config_resolve(cfg, &c);
    MOE__TRY(moe_config_validate(ctx, &c));
    m = (moe_model *)moe__heap_calloc(ctx, sizeof *m);
    if (!m) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_model_new: out of memory");
    m->cfg = c;
    n_moe = c.num_hidden_layers - c.first_k_dense_replace + c.num_nextn_predict_layers;
    m->layers = (moe__block *)moe__heap_calloc(ctx, sizeof(moe__block) * (size_t)c.num_hidden_layers);
    m->mtp = (moe__mtp *)moe__heap_calloc(ctx, sizeof(moe__mtp) * (size_t)(c.num_nextn_predict_layers + 1));
    m->loads = (int64_t *)moe__heap_calloc(ctx, sizeof(int64_t) * (size_t)(n_moe * c.n_routed_experts + 1));
    m->n_loads = n_moe * c.n_routed_experts;
    if (!m->layers || !m->mtp || !m->loads) {
        moe_model_free(ctx, m);
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_model_new: out of memory");
    }
    loads = m->loads;
    st = moe__model_add(ctx, m, &m->embed, MOE__INIT_NORMAL, 0, 2, c.vocab_size, c.hidden_size, 0, "model.embed_tokens.weight");
    for (L = 0; st == MOE_OK && L < c.num_hidden_layers; L++) {
        snprintf(prefix, sizeof prefix, "model.layers.%lld.", (long long)L);
        st = moe__block_init(ctx, m, &m->layers[L], L >= c.first_k_dense_replace, 0, &loads, prefix);
    }
    if (st == MOE_OK) st = moe__model_add(ctx, m, &m->norm, MOE__INIT_ONES, 0, 1, c.hidden_size, 0, 0, "model.norm.weight");
    if (st == MOE_OK) {
        if (c.tie_word_embeddings) m->head = m->embed;
        else st = moe__model_add(ctx, m, &m->head, MOE__INIT_NORMAL, 0, 2, c.vocab_size, c.hidden_size, 0, "lm_head.weight");
    }
    for (k = 0; st == MOE_OK && k < c.num_nextn_predict_layers; k++) {
        moe__mtp *t = &m->mtp[k];
        snprintf(prefix, sizeof prefix, "model.layers.%lld.", (long long)(c.num_hidden_layers + k));
        st = moe__model_add(ctx, m, &t->enorm, MOE__INIT_ONES, 1, 1, c.hidden_size, 0, 0, "%senorm.weight", prefix);
        if (st == MOE_OK) st = moe__model_add(ctx, m, &t->hnorm, MOE__INIT_ONES, 1, 1, c.hidden_size, 0, 0, "%shnorm.weight", prefix);
        if (st == MOE_OK)
            st = moe__model_add(ctx, m, &t->eh_proj, MOE__INIT_NORMAL, 1, 2, c.hidden_size, 2 * c.hidden_size, 0, "%seh_proj.weight", prefix);
        if (st == MOE_OK) st = moe__block_init(ctx, m, &t->block, 1, 1, &loads, prefix);
        if (st == MOE_OK)
            st = moe__model_add(ctx, m, &t->head_norm, MOE__INIT_ONES, 1, 1, c.hidden_size, 0, 0, "%sshared_head.norm.weight", prefix);
    }
    if (st == MOE_OK) st = moe__model_place(ctx, m, seed);
    if (st == MOE_OK) st = moe_rope_table_init(ctx, &m->rope, c.qk_rope_head_dim, c.max_position_embeddings, c.rope_theta,
                                               c.rope_scaling.factor > 1 ? &c.rope_scaling : NULL);
    if (st != MOE_OK) {
        moe_model_free(ctx, m);
        return st;
    }
    {
        double scale = 1.0 / sqrt((double)(c.qk_nope_head_dim + c.qk_rope_head_dim));
        if (c.rope_scaling.factor > 1 && c.rope_scaling.mscale_all_dim != 0) { /* transformers' yarn_apply_mscale */
            double ms = moe__yarn_get_mscale(c.rope_scaling.factor, c.rope_scaling.mscale_all_dim);
            scale *= ms * ms;
        }
        m->softmax_scale = (moe_real)scale;
    }
    *out = m;
    return MOE_OK;
}

MOE_API void moe_model_free(moe_ctx *ctx, moe_model *m) {
    int64_t i;
    if (!m) return;
    for (i = 0; i < m->n_entries; i++) moe_tensor_free(ctx, m->entries[i].t);
    moe_tensor_free(ctx, m->params);
    moe_tensor_free(ctx, m->grads);
    moe_tensor_free(ctx, m->grad_sum);
    moe_tensor_free(ctx, m->buffers);
    if (m->be) m->be->free(ctx, m->bias_step);
    moe_rope_table_free(&m->rope);
    MOE_FREE(m->entries);
    MOE_FREE(m->layers);
    MOE_FREE(m->mtp);
    MOE_FREE(m->loads);
    MOE_FREE(m);
}

MOE_API moe_status moe_model_copy(moe_ctx *dst_ctx, moe_ctx *src_ctx, const moe_model *src, moe_model **out) {
    static const char *fn = "moe_model_copy";
    moe_model *m = NULL;
    void *host = NULL;
    size_t np, nb;
    moe_status st;
    MOE__CHECK_CTX(dst_ctx);
    if (!src_ctx || !src || !out) return moe__fail(dst_ctx, MOE_ERR_ARG, "%s: NULL source context, model or out", fn);
    *out = NULL;
    if (src->be != MOE__BE(src_ctx)) return moe__fail(dst_ctx, MOE_ERR_ARG, "%s: the source model is not on src_ctx's device", fn);
    MOE__TRY(moe_model_new(dst_ctx, &src->cfg, 0, &m)); /* the same config: the same slab layout */
    np = (size_t)src->n_params * sizeof(moe_real);
    nb = (size_t)src->n_buffers * sizeof(moe_real);
    host = moe__heap_alloc(dst_ctx, (np > nb ? np : nb) + 1);
    st = host ? MOE_OK : moe__fail(dst_ctx, MOE_ERR_MEMORY, "%s: out of host memory", fn);
    /* through host memory (H2D copies from pageable memory return once the source is staged) */
    if (!st && (st = src->be->copy(src_ctx, host, src->params->data, np, MOE__D2H)) != MOE_OK) moe__fail(dst_ctx, st, "%s: %s", fn, src_ctx->error);
    if (!st) st = m->be->copy(dst_ctx, m->params->data, host, np, MOE__H2D);
    if (!st && nb && (st = src->be->copy(src_ctx, host, src->buffers->data, nb, MOE__D2H)) != MOE_OK) moe__fail(dst_ctx, st, "%s: %s", fn, src_ctx->error);
    if (!st && nb) st = m->be->copy(dst_ctx, m->buffers->data, host, nb, MOE__H2D);
    MOE_FREE(host);
    if (st) {
        moe_model_free(dst_ctx, m);
        return st;
    }
    *out = m;
    return MOE_OK;
}

MOE_API void moe_model_zero_grad(moe_model *m) {
    if (m && m->grads) m->be->memset(NULL, m->grads->data, 0, (size_t)m->grads->numel * sizeof(moe_real));
    if (m) m->n_accumulated = 0;
}

MOE_API moe_status moe_model_accumulate_grads(moe_ctx *ctx, moe_model *m) {
    const moe_backend *be;
    int64_t n;
    MOE__CHECK_CTX(ctx);
    if (!m || !m->grads) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_accumulate_grads: model is NULL");
    if (m->be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_accumulate_grads: the model lives on another device");
    be = m->be;
    n = m->grads->numel;
    if (!m->grad_sum) MOE__TRY(moe_tensor_new(ctx, MOE_F32, 1, &n, &m->grad_sum));
    if (m->n_accumulated == 0)
        MOE__TRY(be->copy(ctx, m->grad_sum->data, m->grads->data, (size_t)n * sizeof(moe_real), MOE__D2D));
    else
        MOE__TRY(be->axpy(ctx, 1, MOE__F32(m->grads), n, MOE__F32(m->grad_sum))); /* sum + 1·g: sum + g exactly */
    MOE__TRY(be->memset(ctx, m->grads->data, 0, (size_t)n * sizeof(moe_real)));
    m->n_accumulated++;
    return MOE_OK;
}

MOE_API void moe_model_param_counts(const moe_model *m, int64_t *total, int64_t *active, int64_t *mtp) {
    const moe_config *c;
    int64_t i, tot = 0, mt = 0, inactive;
    if (total) *total = 0;
    if (active) *active = 0;
    if (mtp) *mtp = 0;
    if (!m) return;
    c = &m->cfg;
    for (i = 0; i < m->n_entries; i++) {
        if (!m->entries[i].is_param) continue;
        if (m->entries[i].mtp) mt += m->entries[i].t->numel;
        else tot += m->entries[i].t->numel;
    }
    inactive = (c->num_hidden_layers - c->first_k_dense_replace) * (c->n_routed_experts - c->num_experts_per_tok) * 3 *
               c->hidden_size * c->moe_intermediate_size;
    if (total) *total = tot;
    if (active) *active = tot - inactive;
    if (mtp) *mtp = mt;
}

static moe__mla_dims moe__model_mla_dims(const moe_model *m, int64_t B, int64_t T, int64_t pos0) {
    const moe_config *c = &m->cfg;
    moe__mla_dims d;
    d.B = B; d.T = T; d.N = B * T; d.d = c->hidden_size; d.H = c->num_attention_heads;
    d.qr = c->q_lora_rank; d.kvr = c->kv_lora_rank; d.dn = c->qk_nope_head_dim; d.dr = c->qk_rope_head_dim;
    d.dqk = d.dn + d.dr; d.dv = c->v_head_dim; d.pos0 = pos0;
    d.eps = (moe_real)1e-6; /* q_a_layernorm and kv_a_layernorm: 1e-6 whatever rms_norm_eps says, as the
                               official code and transformers construct them */
    d.scale = m->softmax_scale;
    d.layout = c->rope_layout;
    return d;
}

/* x + Attn(norm(x)), then + FFN(norm(·)), for x [B, T, d] at positions pos0..; cache: the
   block's latent cache when decoding (NULL in training; with write_only, *out is NULL). *aux
   gets the MoE layer's balance loss (or NULL). */
static moe_status moe__block_forward(moe_ctx *ctx, moe_model *m, moe__block *b, moe_tensor *x, int64_t B, int64_t T, int64_t pos0,
                                     const moe__kv_cache *cache, float alpha, moe_tensor **out, moe_tensor **aux) {
    moe__mla_dims dims = moe__model_mla_dims(m, B, T, pos0);
    moe_tensor *h, *a, *x1, *h2, *f = NULL;
    float eps = (float)m->cfg.rms_norm_eps;
    *aux = NULL;
    MOE__TRY(moe_rmsnorm(ctx, x, b->attn_norm, eps, &h));
    MOE__TRY(moe__mla_forward(ctx, &b->attn, &dims, &m->rope, cache, h, &a));
    if (!a) { /* the cache rows were all that was wanted */
        *out = NULL;
        return MOE_OK;
    }
    MOE__TRY(moe_add(ctx, x, a, &x1));
    MOE__TRY(moe_rmsnorm(ctx, x1, b->ffn_norm, eps, &h2));
    if (b->is_moe) MOE__TRY(moe__moe_forward(ctx, &b->moe, &m->cfg, B, T, alpha, h2, &f, aux));
    else MOE__TRY(moe__ffn_forward(ctx, &b->dense, h2, &f));
    return moe_add(ctx, x1, f, out);
}

/* tokens[b·stride + off + t] for t < T (host) into an i32 tensor [B, T]. */
static moe_status moe__ids(moe_ctx *ctx, const int32_t *tokens, int64_t B, int64_t T, int64_t stride, int64_t off,
                           moe_tensor **out) {
    int64_t shape[2], b;
    shape[0] = B;
    shape[1] = T;
    MOE__TRY(moe_tensor_temp(ctx, MOE_I32, 2, shape, out));
    for (b = 0; b < B; b++)
        MOE__TRY(MOE__BE(ctx)->copy(ctx, MOE__I32(*out) + b * T, tokens + b * stride + off, (size_t)T * sizeof(int32_t), MOE__H2D));
    return MOE_OK;
}

/* The main model's final normed hidden states [B, T, d]; balance losses summed into *aux.
   caches: one per layer when decoding (tokens at positions pos0..), else NULL. */
static moe_status moe__model_trunk(moe_ctx *ctx, moe_model *m, moe_tensor *ids, int64_t B, int64_t T, int64_t pos0,
                                   const moe__kv_cache *caches, float alpha, moe_tensor **h, moe_tensor **aux) {
    moe_tensor *x, *a;
    int64_t L;
    MOE__TRY(moe_embedding(ctx, m->embed, ids, &x));
    for (L = 0; L < m->cfg.num_hidden_layers; L++) {
        MOE__TRY(moe__block_forward(ctx, m, &m->layers[L], x, B, T, pos0, caches ? &caches[L] : NULL, alpha, &x, &a));
        if (a && alpha > 0) {
            if (*aux) MOE__TRY(moe_add(ctx, *aux, a, aux));
            else *aux = a;
        }
    }
    return moe_rmsnorm(ctx, x, m->norm, (float)m->cfg.rms_norm_eps, h);
}

/* MTP module k (0-based) over B × T positions (reference §4.1): depth k+1 at position i reads
   h^k_i (hin [B, T, d]) and the embedding of token t_{i+k+1} (eids [B, T]), embedding first
   as in the released eh_proj, through the module's block; *hk gets h^{k+1}. */
static moe_status moe__mtp_forward(moe_ctx *ctx, moe_model *m, int64_t k, moe_tensor *hin, moe_tensor *eids, int64_t B, int64_t T,
                                   int64_t pos0, const moe__kv_cache *cache, float alpha, moe_tensor **hk, moe_tensor **aux) {
    moe__mtp *t = &m->mtp[k];
    moe_tensor *e, *en, *hn, *cat, *hp;
    float eps = (float)m->cfg.rms_norm_eps;
    MOE__TRY(moe_embedding(ctx, m->embed, eids, &e));
    MOE__TRY(moe_rmsnorm(ctx, e, t->enorm, eps, &en));
    MOE__TRY(moe_rmsnorm(ctx, hin, t->hnorm, eps, &hn));
    MOE__TRY(moe_concat(ctx, en, hn, hin->ndim - 1, &cat));
    MOE__TRY(moe_matmul(ctx, cat, t->eh_proj, &hp));
    return moe__block_forward(ctx, m, &t->block, hp, B, T, pos0, cache, alpha, hk, aux);
}

/* Every one of the n tokens inside the vocabulary. */
static moe_status moe__check_vocab(moe_ctx *ctx, const char *fn, const moe_model *m, const int32_t *tokens, int64_t n) {
    int64_t i;
    for (i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size)
            return moe__fail(ctx, MOE_ERR_ARG, "%s: token %d at %lld is outside the vocabulary [0, %lld)", fn, (int)tokens[i],
                             (long long)i, (long long)m->cfg.vocab_size);
    return MOE_OK;
}
static moe_status moe__check_tokens(moe_ctx *ctx, const char *fn, const moe_model *m, const int32_t *tokens, int64_t B,
                                    int64_t T, int64_t n) {
    MOE__CHECK_CTX(ctx);
    if (!m || !tokens) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL model or tokens", fn);
    if (B < 1 || T < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: batch and seq must be positive, got %lld x %lld", fn, (long long)B, (long long)T);
    if (T > m->cfg.max_position_embeddings)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: seq %lld exceeds max_position_embeddings %lld", fn, (long long)T,
                         (long long)m->cfg.max_position_embeddings);
    return moe__check_vocab(ctx, fn, m, tokens, n);
}

/* Add to *loss the MTP terms (λ/D)·Σ_k (T−k)/T·CE_k (reference §4: depth k predicts token
   i+k+1 from h^{k-1}_i and Emb(t_{i+k}), h^0 = the main model's normed hidden state h) and the
   balance losses: the trunk's (aux, may be NULL) and the MTP blocks'. Shared by the training
   loss and the distillation loss. */
static moe_status moe__model_add_mtp(moe_ctx *ctx, moe_model *m, const int32_t *tokens, int64_t B, int64_t T,
                                     const moe_loss_opts *o, moe_tensor *h, moe_tensor *aux, moe_tensor **loss,
                                     double *mtp_parts, double *balance) {
    const moe_config *c = &m->cfg;
    moe_tensor *mtp_sum = NULL, *hprev;
    int64_t k, D;
    D = o->mtp_lambda > 0 ? c->num_nextn_predict_layers : 0;
    hprev = h;
    for (k = 1; k <= D && T - k >= 1; k++) {
        int64_t Tk = T - k;
        moe_tensor *hin = hprev, *rest, *eids, *hk, *a, *kn, *lg, *ktg, *cek;
        if (hprev->shape[1] > Tk) MOE__TRY(moe_split(ctx, hprev, 1, Tk, &hin, &rest));
        MOE__TRY(moe__ids(ctx, tokens, B, Tk, T + 1, k, &eids));
        MOE__TRY(moe__mtp_forward(ctx, m, k - 1, hin, eids, B, Tk, 0, NULL, o->balance_alpha, &hk, &a));
        if (a && o->balance_alpha > 0) {
            if (aux) MOE__TRY(moe_add(ctx, aux, a, &aux));
            else aux = a;
        }
        MOE__TRY(moe_rmsnorm(ctx, hk, m->mtp[k - 1].head_norm, (float)c->rms_norm_eps, &kn));
        MOE__TRY(moe_matmul(ctx, kn, m->head, &lg));
        MOE__TRY(moe__ids(ctx, tokens, B, Tk, T + 1, k + 1, &ktg));
        MOE__TRY(moe_cross_entropy(ctx, lg, ktg, -1, &cek));
        if (mtp_parts) mtp_parts[k - 1] = (double)moe__tensor_at(ctx, cek, 0);
        /* the paper normalises L_k by T, not by the T-k predictions it has */
        MOE__TRY(moe_scale(ctx, cek, (float)Tk / (float)T, &cek));
        if (mtp_sum) MOE__TRY(moe_add(ctx, mtp_sum, cek, &mtp_sum));
        else mtp_sum = cek;
        hprev = hk;
    }
    if (mtp_sum) {
        MOE__TRY(moe_scale(ctx, mtp_sum, o->mtp_lambda / (float)D, &mtp_sum));
        MOE__TRY(moe_add(ctx, *loss, mtp_sum, loss));
    }
    if (aux) {
        if (balance) *balance = (double)moe__tensor_at(ctx, aux, 0);
        MOE__TRY(moe_add(ctx, *loss, aux, loss));
    }
    return MOE_OK;
}

MOE_API moe_status moe_model_loss(moe_ctx *ctx, moe_model *m, const int32_t *tokens, int64_t B, int64_t T,
                                  const moe_loss_opts *opts, moe_tensor **loss, moe_loss_parts *parts) {
    static const char *fn = "moe_model_loss";
    moe_tensor *ids, *tgt, *h, *logits, *ce, *aux = NULL;
    moe_loss_opts o;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_tokens(ctx, fn, m, tokens, B, T, B * (T + 1)));
    memset(&o, 0, sizeof o);
    if (opts) o = *opts;
    if (!(o.mtp_lambda >= 0) || !(o.balance_alpha >= 0)) return moe__fail(ctx, MOE_ERR_ARG, "%s: mtp_lambda and balance_alpha must be >= 0", fn);
    if (parts) memset(parts, 0, sizeof *parts);
    MOE__TRY(moe__ids(ctx, tokens, B, T, T + 1, 0, &ids));
    MOE__TRY(moe__ids(ctx, tokens, B, T, T + 1, 1, &tgt));
    MOE__TRY(moe__model_trunk(ctx, m, ids, B, T, 0, NULL, o.balance_alpha, &h, &aux));
    MOE__TRY(moe_matmul(ctx, h, m->head, &logits));
    MOE__TRY(moe_cross_entropy(ctx, logits, tgt, -1, &ce));
    *loss = ce;
    if (parts) parts->main = (double)moe__tensor_at(ctx, ce, 0);
    MOE__TRY(moe__model_add_mtp(ctx, m, tokens, B, T, &o, h, aux, loss, parts ? parts->mtp : NULL, parts ? &parts->balance : NULL));
    if (parts) parts->total = (double)moe__tensor_at(ctx, *loss, 0);
    return MOE_OK;
}

MOE_API moe_status moe_model_logits(moe_ctx *ctx, moe_model *m, const int32_t *tokens, int64_t B, int64_t T,
                                    moe_tensor **logits) {
    static const char *fn = "moe_model_logits";
    moe_tensor *ids, *h, *aux = NULL;
    MOE__TRY(moe__check_out(ctx, fn, logits));
    MOE__TRY(moe__check_tokens(ctx, fn, m, tokens, B, T, B * T));
    MOE__TRY(moe__ids(ctx, tokens, B, T, T, 0, &ids));
    MOE__TRY(moe__model_trunk(ctx, m, ids, B, T, 0, NULL, 0.0f, &h, &aux));
    return moe_matmul(ctx, h, m->head, logits);
}

/* MoE layer i of the model (main layers first, then MTP modules), or NULL for a dense one. */
static moe__moe *moe__model_moe_layer(moe_model *m, int64_t i) {
    int64_t n_main = m->cfg.num_hidden_layers;
    if (i < n_main) return m->layers[i].is_moe ? &m->layers[i].moe : NULL;
    return i - n_main < m->cfg.num_nextn_predict_layers ? &m->mtp[i - n_main].block.moe : NULL;
}

MOE_API moe_status moe_model_update_expert_bias(moe_ctx *ctx, moe_model *m, float gamma) {
    int64_t i, e, E;
    MOE__CHECK_CTX(ctx);
    if (!m) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_update_expert_bias: model is NULL");
    if (m->be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_update_expert_bias: the model lives on another device");
    if (!(gamma >= 0) || !isfinite(gamma)) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_update_expert_bias: gamma must be >= 0");
    E = m->cfg.n_routed_experts;
    for (i = 0; i < m->cfg.num_hidden_layers + m->cfg.num_nextn_predict_layers; i++) {
        moe__moe *L = moe__model_moe_layer(m, i);
        int64_t total = 0;
        if (!L) continue;
        for (e = 0; e < E; e++) total += L->load[e];
        if (total > 0 && gamma > 0) {
            /* each bias's step, on the host from the host's counts, then added on the device */
            moe_real step[MOE__MAX_EXPERTS];
            for (e = 0; e < E; e++) {
                /* mean − load_i compared in integers: total/E − load_i has the sign of total − E·load_i */
                int64_t diff = total - E * L->load[e];
                step[e] = (moe_real)(gamma * (float)((diff > 0) - (diff < 0)));
            }
            MOE__TRY(MOE__BE(ctx)->copy(ctx, m->bias_step, step, (size_t)E * sizeof(moe_real), MOE__H2D));
            MOE__TRY(MOE__BE(ctx)->axpy(ctx, 1, m->bias_step, E, MOE__F32(L->bias)));
        }
        for (e = 0; e < E; e++) L->load[e] = 0;
    }
    return MOE_OK;
}

MOE_API double moe_model_max_vio(const moe_model *m) {
    int64_t i, e, E, layers = 0;
    double sum = 0;
    if (!m) return 0;
    E = m->cfg.n_routed_experts;
    for (i = 0; i < m->cfg.num_hidden_layers; i++) {
        const moe__moe *L = m->layers[i].is_moe ? &m->layers[i].moe : NULL;
        int64_t total = 0, mx = 0;
        if (!L) continue;
        for (e = 0; e < E; e++) {
            total += L->load[e];
            mx = L->load[e] > mx ? L->load[e] : mx;
        }
        if (!total) continue;
        sum += (double)mx / ((double)total / (double)E) - 1.0;
        layers++;
    }
    return layers ? sum / (double)layers : 0;
}

MOE_API void moe_model_reset_loads(moe_model *m) {
    int64_t n;
    if (!m) return;
    n = (m->cfg.num_hidden_layers - m->cfg.first_k_dense_replace + m->cfg.num_nextn_predict_layers) * m->cfg.n_routed_experts;
    memset(m->loads, 0, (size_t)n * sizeof(int64_t));
}

/* ============================================================================================
   10. train — AdamW over the slabs, schedules                                          >>train
   ============================================================================================
   AdamW over the model's parameter slab (its two moments are slabs of the same layout), the
   global gradient norm and clipping, learning-rate schedules. */

struct moe_adamw {
    moe_model *model;
    moe_adamw_config cfg;
    int64_t step;
    void *m, *v;                   /* the moments of slab values [lo, hi), in cfg.moment_dtype */
    moe__adamw_segment *segments;  /* the parameter tensors' parts in [lo, hi), from lo (host) */
    int64_t n_segments;
    int64_t lo, hi;                /* this rank's share of the parameter slab: all of it, or a ZeRO-1 shard */
    double *parts;                 /* [2 × norm chunks] the gradient norm's per-chunk sums (host) */
    moe_comm *comm;                /* ZeRO-1: the ranks the shards are spread over (NULL: no sharding) */
    int64_t *bounds;               /* ZeRO-1: rank r's shard is [bounds[r], bounds[r+1]) (host) */
    int64_t *counts;               /* ZeRO-1: [4 × ranks] norm chunks of each shard, then a round's scratch (host) */
    void *stage;                   /* ZeRO-1: one round's values of every shard (host) */
};

/* section 15's ZeRO-1 gathers */
static moe_status moe__zero_gather_params(moe_ctx *ctx, moe_adamw *o);
static moe_status moe__zero_gather_moments(moe_ctx *ctx, const moe_adamw *o, void **m, void **v);

/* The gradient norm's chunk: 32768 values, or n/1024 for slabs of over 2^25 (the parts of
   section 3's sumsq); ZeRO-1 shards start at multiples of it. */
static int64_t moe__norm_chunk(int64_t n) { return n > ((int64_t)1 << 25) ? (n + 1023) / 1024 : 32768; }

/* The segments of the parameter tensors inside [lo, hi), offsets from lo. */
static void moe__adamw_segments(moe_adamw *o, int64_t lo, int64_t hi) {
    const moe_model *model = o->model;
    int64_t i;
    o->n_segments = 0;
    for (i = 0; i < model->n_entries; i++) {
        const moe__entry *e = &model->entries[i];
        int64_t a = e->offset > lo ? e->offset : lo, b = e->offset + e->t->numel < hi ? e->offset + e->t->numel : hi;
        if (!e->is_param || a >= b) continue;
        o->segments[o->n_segments].start = a - lo;
        o->segments[o->n_segments].len = b - a;
        o->segments[o->n_segments].entry = i;
        o->n_segments++;
    }
    o->lo = lo;
    o->hi = hi;
}

MOE_API moe_status moe_adamw_new(moe_ctx *ctx, moe_model *model, const moe_adamw_config *cfg, moe_adamw **out) {
    moe_adamw *o;
    size_t es;
    MOE__CHECK_CTX(ctx);
    if (!model || !out) return moe__fail(ctx, MOE_ERR_ARG, "moe_adamw_new: NULL model or out");
    *out = NULL;
    if (model->be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "moe_adamw_new: the model lives on another device");
    o = (moe_adamw *)moe__heap_calloc(ctx, sizeof *o);
    if (!o) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_adamw_new: out of memory");
    if (cfg) o->cfg = *cfg;
    if (o->cfg.beta1 == 0) o->cfg.beta1 = 0.9f;
    if (o->cfg.beta2 == 0) o->cfg.beta2 = 0.95f;
    if (o->cfg.eps == 0) o->cfg.eps = 1e-8f;
    if (o->cfg.weight_decay == 0) o->cfg.weight_decay = 0.1f;
    if (o->cfg.moment_dtype != MOE_F32 && o->cfg.moment_dtype != MOE_BF16) {
        MOE_FREE(o);
        return moe__fail(ctx, MOE_ERR_DTYPE, "moe_adamw_new: moments must be f32 or bf16");
    }
    if (!(o->cfg.beta1 > 0 && o->cfg.beta1 < 1) || !(o->cfg.beta2 > 0 && o->cfg.beta2 < 1) || !(o->cfg.eps > 0) ||
        !(o->cfg.weight_decay >= 0)) {
        MOE_FREE(o);
        return moe__fail(ctx, MOE_ERR_ARG, "moe_adamw_new: betas must be in (0,1), eps > 0, weight_decay >= 0");
    }
    o->model = model;
    es = o->cfg.moment_dtype == MOE_BF16 ? 2 : sizeof(float);
    o->segments = (moe__adamw_segment *)moe__heap_calloc(ctx, sizeof(moe__adamw_segment) * (size_t)(model->n_entries + 1));
    o->parts = (double *)moe__heap_alloc(ctx, sizeof(double) * (size_t)(2 * ((model->params->numel + 32767) / 32768 + 1)));
    if (!o->segments || !o->parts || MOE__BE(ctx)->alloc(ctx, es * (size_t)model->params->numel, &o->m) != MOE_OK ||
        MOE__BE(ctx)->alloc(ctx, es * (size_t)model->params->numel, &o->v) != MOE_OK) {
        moe_adamw_free(ctx, o);
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_adamw_new: out of memory for the moments");
    }
    moe__adamw_segments(o, 0, model->params->numel);
    *out = o;
    return MOE_OK;
}

MOE_API void moe_adamw_free(moe_ctx *ctx, moe_adamw *o) {
    if (!o) return;
    o->model->be->free(ctx, o->m);
    o->model->be->free(ctx, o->v);
    if (o->model->zero == o) o->model->zero = NULL;
    MOE_FREE(o->segments);
    MOE_FREE(o->parts);
    MOE_FREE(o->bounds);
    MOE_FREE(o->counts);
    MOE_FREE(o->stage);
    MOE_FREE(o);
}

MOE_API int64_t moe_adamw_steps(const moe_adamw *o) { return o ? o->step : 0; }

/* The global gradient norm times grad_scale: Σ g² over the gradient slab in fixed chunks
   (moe__norm_chunk), the chunks added in order; under ZeRO-1 each rank sums the chunks of its
   shard and the parts are gathered, so the bits are those of one process. */
static moe_status moe__adamw_norm(moe_ctx *ctx, const char *fn, moe_adamw *o, float grad_scale, double *norm) {
    const moe_model *m = o->model;
    int64_t n = m->grads->numel, chunk = moe__norm_chunk(n), nc = (n + chunk - 1) / chunk, c;
    double sumsq = 0, *mine = o->parts + nc + o->lo / chunk;
    *norm = NAN;
    if (m->be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "%s: the model lives on another device", fn);
    if (m->n_accumulated)
        return moe__fail(ctx, MOE_ERR_STATE, "%s: %lld accumulated gradients are not collected: call moe_model_reduce_grads first",
                         fn, (long long)m->n_accumulated);
    if (o->hi > o->lo) MOE__TRY(MOE__BE(ctx)->sumsq(ctx, MOE__F32(m->grads) + o->lo, o->hi - o->lo, chunk, mine));
    if (o->comm) MOE__TRY(moe_comm_allgather(ctx, o->comm, mine, o->parts, o->counts, MOE_COMM_F64));
    else memcpy(o->parts, mine, sizeof(double) * (size_t)nc);
    for (c = 0; c < nc; c++) sumsq += o->parts[c];
    *norm = sqrt(sumsq) * grad_scale;
    return MOE_OK;
}

MOE_API moe_status moe_adamw_grad_norm(moe_ctx *ctx, moe_adamw *o, float grad_scale, float *grad_norm) {
    double norm;
    MOE__CHECK_CTX(ctx);
    if (!o || !grad_norm) return moe__fail(ctx, MOE_ERR_ARG, "moe_adamw_grad_norm: NULL optimizer or grad_norm");
    if (!(grad_scale > 0) || !isfinite(grad_scale))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_adamw_grad_norm: need grad_scale > 0, got %g", (double)grad_scale);
    MOE__TRY(moe__adamw_norm(ctx, "moe_adamw_grad_norm", o, grad_scale, &norm));
    *grad_norm = (float)norm;
    return MOE_OK;
}

MOE_API moe_status moe_adamw_step(moe_ctx *ctx, moe_adamw *o, float lr, float grad_scale, float clip, float *grad_norm) {
    moe_model *m;
    double norm, coef, bc1, bc2;
    moe__adamw_op op;
    int64_t s;
    MOE__CHECK_CTX(ctx);
    if (!o) return moe__fail(ctx, MOE_ERR_ARG, "moe_adamw_step: optimizer is NULL");
    if (!(lr >= 0) || !isfinite(lr) || !(grad_scale > 0) || !isfinite(grad_scale) || !(clip >= 0))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_adamw_step: need lr >= 0, grad_scale > 0, clip >= 0 (got %g, %g, %g)",
                         (double)lr, (double)grad_scale, (double)clip);
    m = o->model;
    MOE__TRY(moe__adamw_norm(ctx, "moe_adamw_step", o, grad_scale, &norm));
    if (grad_norm) *grad_norm = (float)norm;
    if (!isfinite(norm)) {
        moe_model_zero_grad(m);
        return moe__fail(ctx, MOE_ERR_NUMERIC, "moe_adamw_step: gradient norm is %g; weights left unchanged", norm);
    }
    coef = grad_scale * (clip > 0 && norm > clip ? clip / norm : 1.0);
    o->step++;
    bc1 = 1.0 - pow(o->cfg.beta1, (double)o->step);
    bc2 = 1.0 - pow(o->cfg.beta2, (double)o->step);
    for (s = 0; s < o->n_segments; s++) o->segments[s].decay = lr * (m->entries[o->segments[s].entry].decay ? o->cfg.weight_decay : 0.0f);
    memset(&op, 0, sizeof op);
    op.p = MOE__F32(m->params) + o->lo;
    op.g = MOE__F32(m->grads) + o->lo;
    op.m = o->m;
    op.v = o->v;
    op.moment_dtype = o->cfg.moment_dtype;
    op.host_segments = o->segments;
    op.n_segments = o->n_segments;
    op.grad_scale = (float)coef;
    op.beta1 = o->cfg.beta1;
    op.beta2 = o->cfg.beta2;
    op.eps = o->cfg.eps;
    op.step = lr / (float)bc1;
    op.inv_bc2 = 1.0f / (float)bc2;
    MOE__TRY(MOE__BE(ctx)->adamw(ctx, &op));
    return o->comm ? moe__zero_gather_params(ctx, o) : MOE_OK; /* ZeRO-1: every rank's updated shard to all */
}

MOE_API float moe_lr_at(const moe_lr_schedule *s, int64_t step) {
    double p, start, span;
    if (!s) return 0;
    if (step < s->warmup_steps) return s->lr_max * (float)(step + 1) / (float)s->warmup_steps;
    start = (double)(s->shape == MOE_LR_WSD ? (s->decay_start > s->warmup_steps ? s->decay_start : s->warmup_steps) : s->warmup_steps);
    if ((double)step < start) return s->lr_max;
    span = (double)s->total_steps - start;
    p = span > 0 ? ((double)step - start) / span : 1.0;
    p = p > 1 ? 1 : p;
    return (float)(s->lr_min + 0.5 * (s->lr_max - s->lr_min) * (1.0 + cos(3.141592653589793 * p)));
}

/* ============================================================================================
   11. distill — distillation losses and the teacher cache                            >>distill
   ============================================================================================
   Notation for one row (position): a = z_s/T the student's tempered logits, q = softmax(a);
   p the teacher's distribution at T. With per-row loss ℓ = α·CE + (1−α)·T²·KL and
   dℓ/dz_s = (1/T)·dℓ/da, the KL gradients that the backward uses are
     forward  KL(p‖q) = Σ p (log p − log q):  dKL/da_j = q_j − p_j
     reverse  KL(q‖p) = Σ q (log q − log p):  dKL/da_j = q_j (log q_j − log p_j − KL)
   so T²·KL contributes (1−α)·T·dKL/da_j to dℓ/dz_j.

   Top-k teacher (ids S, log-probs lp_i at T, tail mass p_R = 1 − Σ_S p_i): the distributions
   are compared over the k+1 buckets S ∪ {R}, with the student's tail q_R = Σ_{j∉S} q_j taken
   in log space (log q_R = lse_{j∉S} a_j − lse_j a_j) so that it never cancels:
     forward  KL = Σ_S p_i (lp_i − log q_i) + p_R (log p_R − log q_R)
              dKL/da_j = P·q_j − p_j            (j ∈ S)
                         P·q_j − p_R·q_j/q_R    (j ∉ S),  P = Σ_S p_i + p_R (1 up to rounding)
              i.e. the teacher's tail mass is spread over the tail in the student's proportions;
     reverse  KL = Σ_S q_i (log q_i − lp_i) + q_R (log q_R − log p_R)
              dKL/da_j = q_j (log q_j − lp_j − KL)   (j ∈ S)
                         q_j (log q_R − log p_R − KL) (j ∉ S).
   In the reverse direction p_R is floored at MOE__DISTILL_TAIL_FLOOR so that a teacher whose
   tail underflowed to 0 gives a large but finite loss. With k = V there is no tail bucket. */

MOE_API moe_distill_opts moe_distill_defaults(void) {
    moe_distill_opts o;
    memset(&o, 0, sizeof o);
    o.alpha = 0.5f;
    o.temperature = 2.0f;
    o.direction = MOE_KL_FORWARD;
    o.ignore_index = -1;
    return o;
}

static moe_status moe__distill_opts(moe_ctx *ctx, const char *fn, const moe_distill_opts *in, moe_distill_opts *o) {
    *o = in ? *in : moe_distill_defaults();
    if (!(o->alpha >= 0.0f && o->alpha <= 1.0f))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: alpha must be in [0, 1], got %g", fn, (double)o->alpha);
    if (!(o->temperature > 0.0f) || !isfinite(o->temperature))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: temperature must be a finite number > 0, got %g (start from moe_distill_defaults())",
                         fn, (double)o->temperature);
    if (o->direction != MOE_KL_FORWARD && o->direction != MOE_KL_REVERSE)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: direction must be MOE_KL_FORWARD or MOE_KL_REVERSE, got %d", fn, (int)o->direction);
    return MOE_OK;
}

/* Everything a distillation node needs: the options, the kernels' description of the rows
   (teacher, labels, what the forward keeps per row) and the rows that counted. Lives in the
   step arena; the teacher's and the labels' tensors must live until the backward, like any
   op input. */
typedef struct moe__distill {
    moe_distill_opts o;
    moe__distill_op op;
    int64_t count;
} moe__distill;

static moe_status moe__distill_bwd_node(moe_ctx *ctx, moe__node *n) {
    moe_tensor *zs = n->in[0];
    const moe__distill *D = (const moe__distill *)n->saved;
    moe_real *dz;
    MOE__GRAD_OR_FAIL(dz, ctx, zs);
    if (D->count == 0) return MOE_OK; /* no row counted: the loss is constant 0 */
    return MOE__BE(ctx)->distill_bwd(ctx, &D->op, MOE__F32(zs), moe__tensor_at(ctx, n->out->grad, 0) / (moe_real)D->count, dz);
}

/* The shared body of both loss ops once D holds the teacher. */
static moe_status moe__distill_run(moe_ctx *ctx, const char *fn, moe__distill *D, moe_tensor *zs, moe_tensor **loss,
                                   moe_distill_parts *parts) {
    moe_real T2 = (moe_real)D->o.temperature * (moe_real)D->o.temperature, a = (moe_real)D->o.alpha;
    double ce_sum = 0, kl_sum = 0, total;
    int64_t one = 1, rows = D->op.rows;
    moe__node *n;
    D->op.lse1 = moe__dev_real(ctx, rows, fn);
    D->op.lseT = moe__dev_real(ctx, rows, fn);
    D->op.lseX = moe__dev_real(ctx, rows, fn);
    D->op.kl = moe__dev_real(ctx, rows, fn);
    if (!D->op.lse1 || !D->op.lseT || !D->op.lseX || !D->op.kl) return MOE_ERR_MEMORY;
    MOE__TRY(MOE__BE(ctx)->distill_fwd(ctx, &D->op, MOE__F32(zs), &ce_sum, &kl_sum, &D->count));
    if (!isfinite(ce_sum) || !isfinite(kl_sum))
        return moe__fail(ctx, MOE_ERR_NUMERIC, "%s: the loss is not finite (CE %g, KL %g): non-finite logits?", fn, ce_sum, kl_sum);
    total = D->count ? (double)a * ce_sum / (double)D->count + (double)((1 - a) * T2) * kl_sum / (double)D->count : 0.0;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, loss));
    MOE__TRY(MOE__BE(ctx)->fill(ctx, (moe_real)total, 1, MOE__F32(*loss)));
    if (parts) {
        memset(parts, 0, sizeof *parts);
        parts->total = total;
        parts->ce = D->op.labels && D->count ? ce_sum / (double)D->count : 0;
        parts->kl = D->count ? kl_sum / (double)D->count : 0;
        parts->rows = D->count;
    }
    MOE__TRY(moe__record(ctx, moe__distill_bwd_node, *loss, zs, NULL, NULL, &n));
    if (n) n->saved = D;
    return MOE_OK;
}

/* Checks shared by both ops: student logits, labels, options; fills D's common fields. */
static moe_status moe__distill_begin(moe_ctx *ctx, const char *fn, moe_tensor *zs, moe_tensor *labels,
                                     const moe_distill_opts *opts, moe_tensor **loss, moe__distill **out) {
    moe__distill *D = NULL;
    moe_distill_opts o;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_f32(ctx, fn, zs, "student_logits"));
    MOE__TRY(moe__distill_opts(ctx, fn, opts, &o));
    if (!labels && o.alpha > 0)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: labels are NULL but alpha is %g (NULL labels need alpha 0)", fn, (double)o.alpha);
    if (labels) {
        MOE__TRY(moe__check_i32(ctx, fn, labels, "labels"));
        if (labels->numel * MOE__LAST(zs) != zs->numel) return moe__shape_mismatch(ctx, fn, zs, labels);
        MOE__TRY(moe__check_ids(ctx, fn, labels, MOE__LAST(zs), o.ignore_index));
    }
    D = (moe__distill *)moe__arena_alloc(ctx, 1, sizeof *D, fn);
    if (!D) return MOE_ERR_MEMORY;
    D->o = o;
    D->op.V = MOE__LAST(zs);
    D->op.rows = zs->numel / D->op.V;
    D->op.labels = labels ? MOE__I32(labels) : NULL;
    D->op.ignore_index = o.ignore_index;
    D->op.alpha = (moe_real)o.alpha;
    D->op.temperature = (moe_real)o.temperature;
    D->op.reverse = o.direction == MOE_KL_REVERSE;
    *out = D;
    return MOE_OK;
}

MOE_API moe_status moe_distill_loss(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *teacher_logits,
                                    moe_tensor *labels, const moe_distill_opts *opts, moe_tensor **loss,
                                    moe_distill_parts *parts) {
    static const char *fn = "moe_distill_loss";
    moe__distill *D = NULL;
    int d;
    MOE__TRY(moe__distill_begin(ctx, fn, student_logits, labels, opts, loss, &D));
    MOE__TRY(moe__check_f32(ctx, fn, teacher_logits, "teacher_logits"));
    if (MOE__LAST(teacher_logits) != D->op.V)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the teacher's vocabulary (%lld) differs from the student's (%lld): "
                         "distillation needs the same vocabulary", fn, (long long)MOE__LAST(teacher_logits), (long long)D->op.V);
    if (teacher_logits->ndim != student_logits->ndim) return moe__shape_mismatch(ctx, fn, student_logits, teacher_logits);
    for (d = 0; d < teacher_logits->ndim; d++)
        if (teacher_logits->shape[d] != student_logits->shape[d]) return moe__shape_mismatch(ctx, fn, student_logits, teacher_logits);
    D->op.zt = MOE__F32(teacher_logits);
    return moe__distill_run(ctx, fn, D, student_logits, loss, parts);
}

/* Checks of a top-k teacher: ids in range and distinct within a row, log-probabilities
   finite and ≤ 0, tail in [0, 1], and the k + 1 masses summing to 1 within 1e-3. */
static int moe__cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}
/* Repeated ids are found with `mark` (V zeroed bytes, left zeroed) or, when mark is NULL, by
   sorting a copy of each row in `sorted` (k ints): a cache file's vocabulary comes from its
   header, and V bytes for a hostile 2^31 would be allocated for nothing. */
static moe_status moe__distill_check_topk(moe_ctx *ctx, const char *fn, moe_status err, int64_t first, const int32_t *ids,
                                          const moe_real *logp, const moe_real *tail, int64_t rows, int64_t k, int64_t V,
                                          unsigned char *mark, int32_t *sorted) {
    int64_t r, i;
    for (r = 0; r < rows; r++) {
        const int32_t *id = ids + r * k;
        const moe_real *lp = logp + r * k;
        double mass = (double)tail[r];
        const char *bad = NULL;
        if (!(tail[r] >= 0 && tail[r] <= 1)) bad = "a tail mass outside [0, 1]";
        if (!mark && !bad) {
            memcpy(sorted, id, (size_t)k * sizeof(int32_t));
            qsort(sorted, (size_t)k, sizeof(int32_t), moe__cmp_i32);
            for (i = 1; i < k && !bad; i++)
                if (sorted[i] == sorted[i - 1]) bad = "a repeated token id";
        }
        for (i = 0; i < k && !bad; i++) {
            if (id[i] < 0 || id[i] >= V) bad = "a token id outside the vocabulary";
            else if (mark && mark[id[i]]) bad = "a repeated token id";
            else if (!(lp[i] <= 1e-6) || !isfinite(lp[i])) bad = "a log-probability that is not finite and <= 0";
            else {
                if (mark) mark[id[i]] = 1;
                mass += exp((double)lp[i]);
            }
        }
        for (i = 0; mark && i < k; i++)
            if (id[i] >= 0 && id[i] < V) mark[id[i]] = 0;
        if (!bad && fabs(mass - 1.0) > 1e-3) bad = "top-k and tail masses that do not sum to 1";
        if (bad)
            return moe__fail(ctx, err, "%s: teacher record %lld has %s", fn, (long long)(first + r), bad);
    }
    return MOE_OK;
}

MOE_API moe_status moe_distill_loss_topk(moe_ctx *ctx, moe_tensor *student_logits, moe_tensor *top_ids,
                                         moe_tensor *top_logp, moe_tensor *tail, moe_tensor *labels,
                                         const moe_distill_opts *opts, moe_tensor **loss, moe_distill_parts *parts) {
    static const char *fn = "moe_distill_loss_topk";
    moe__distill *D = NULL;
    unsigned char *mark;
    int64_t k;
    MOE__TRY(moe__distill_begin(ctx, fn, student_logits, labels, opts, loss, &D));
    MOE__TRY(moe__check_i32(ctx, fn, top_ids, "top_ids"));
    MOE__TRY(moe__check_f32(ctx, fn, top_logp, "top_logp"));
    MOE__TRY(moe__check_f32(ctx, fn, tail, "tail"));
    k = MOE__LAST(top_ids);
    if (tail->numel != D->op.rows) return moe__shape_mismatch(ctx, fn, student_logits, tail);
    if (k < 1 || k > D->op.V || top_ids->numel != D->op.rows * k)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: top_ids must be [rows = %lld, k] with 1 <= k <= vocab (%lld), got %lld elements "
                         "with last dim %lld", fn, (long long)D->op.rows, (long long)D->op.V, (long long)top_ids->numel, (long long)k);
    if (top_logp->numel != top_ids->numel || MOE__LAST(top_logp) != k) return moe__shape_mismatch(ctx, fn, top_ids, top_logp);
    mark = (unsigned char *)moe__arena_alloc(ctx, (size_t)D->op.V, 1, fn);
    if (!mark) return MOE_ERR_MEMORY;
    {
        const int32_t *h_ids = (const int32_t *)moe__host_data(ctx, top_ids->data, (size_t)top_ids->numel * sizeof(int32_t));
        const moe_real *h_logp = (const moe_real *)moe__host_data(ctx, top_logp->data, (size_t)top_logp->numel * sizeof(moe_real));
        const moe_real *h_tail = (const moe_real *)moe__host_data(ctx, tail->data, (size_t)tail->numel * sizeof(moe_real));
        if (!h_ids || !h_logp || !h_tail) return MOE_ERR_MEMORY;
        MOE__TRY(moe__distill_check_topk(ctx, fn, MOE_ERR_ARG, 0, h_ids, h_logp, h_tail, D->op.rows, k, D->op.V, mark, NULL));
    }
    D->op.k = k;
    D->op.ids = MOE__I32(top_ids);
    D->op.logp = MOE__F32(top_logp);
    D->op.tail = MOE__F32(tail);
    return moe__distill_run(ctx, fn, D, student_logits, loss, parts);
}

/* ---- model-level losses ---- */

/* The teacher's logits [B, T, V] for the inputs of tokens [B, T+1], run forward-only. The
   result is allocated first; the teacher's activations after it are given back to the step
   arena as soon as the logits are copied out (when the arena did not need a new block meanwhile,
   which is every step once the first has sized it). The teacher's expert-load counters are
   left alone: a frozen teacher must not drift with the student's balancing. */
static moe_status moe__distill_teacher_logits(moe_ctx *ctx, moe_model *teacher, const int32_t *tokens, int64_t B, int64_t T,
                                              moe_tensor **out) {
    const moe_config *c = &teacher->cfg;
    int64_t shape[3];
    moe_tensor *tl, *ids, *h = NULL, *lg = NULL, *aux = NULL;
    moe__arena_block *b0;
    size_t used0, all0;
    int grad0 = ctx->conf.grad_enabled, count0 = ctx->conf.count_loads;
    moe_status s;
    shape[0] = B; shape[1] = T; shape[2] = c->vocab_size;
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 3, shape, &tl));
    b0 = ctx->arena;
    used0 = b0 ? b0->used : 0;
    all0 = ctx->arena_used;
    ctx->conf.grad_enabled = 0; /* inference mode: nothing goes on the tape */
    ctx->conf.count_loads = 0;  /* and nothing on the teacher's expert-load counts */
    s = moe__ids(ctx, tokens, B, T, T + 1, 0, &ids);
    if (s == MOE_OK) s = moe__model_trunk(ctx, teacher, ids, B, T, 0, NULL, 0.0f, &h, &aux);
    if (s == MOE_OK) s = moe_matmul(ctx, h, teacher->head, &lg);
    if (s == MOE_OK) s = MOE__BE(ctx)->copy(ctx, tl->data, lg->data, (size_t)tl->numel * sizeof(moe_real), MOE__D2D);
    ctx->conf.grad_enabled = grad0;
    ctx->conf.count_loads = count0;
    if (b0 && ctx->arena == b0) {
        b0->used = used0;
        ctx->arena_used = all0;
    }
    if (s != MOE_OK) return s;
    *out = tl;
    return MOE_OK;
}

/* The student's side: trunk, head and the distillation loss against the teacher (full logits
   tl, or the top-k ids/logp/tail), then the MTP and balance terms as moe_model_loss adds them
   (MTP modules learn from the hard labels: the teacher has no prediction for token i+k+1). */
static moe_status moe__model_distill_student(moe_ctx *ctx, const char *fn, moe_model *m, const int32_t *tokens, int64_t B,
                                             int64_t T, const moe_loss_opts *lopts, const moe_distill_opts *dopts,
                                             moe_tensor *tl, moe_tensor *tids, moe_tensor *tlogp, moe_tensor *ttail,
                                             moe_tensor **loss, moe_distill_parts *parts) {
    moe_tensor *ids, *tgt, *h, *logits, *dl = NULL, *aux = NULL;
    moe_distill_parts dp;
    moe_loss_opts o;
    moe_status st;
    memset(&o, 0, sizeof o);
    if (lopts) o = *lopts;
    if (!(o.mtp_lambda >= 0) || !(o.balance_alpha >= 0)) return moe__fail(ctx, MOE_ERR_ARG, "%s: mtp_lambda and balance_alpha must be >= 0", fn);
    MOE__TRY(moe__ids(ctx, tokens, B, T, T + 1, 0, &ids));
    MOE__TRY(moe__ids(ctx, tokens, B, T, T + 1, 1, &tgt));
    MOE__TRY(moe__model_trunk(ctx, m, ids, B, T, 0, NULL, o.balance_alpha, &h, &aux));
    MOE__TRY(moe_matmul(ctx, h, m->head, &logits));
    st = tl ? moe_distill_loss(ctx, logits, tl, tgt, dopts, &dl, &dp) : moe_distill_loss_topk(ctx, logits, tids, tlogp, ttail, tgt, dopts, &dl, &dp);
    if (st == MOE_ERR_NUMERIC) { /* still through the MTP block: under expert parallelism its MoE layer is a collective */
        char why[512];
        int64_t one = 1;
        snprintf(why, sizeof why, "%s", moe_ctx_error(ctx));
        MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, &one, &dl));
        MOE__TRY(MOE__BE(ctx)->fill(ctx, (moe_real)NAN, 1, MOE__F32(dl)));
        *loss = dl;
        memset(&dp, 0, sizeof dp);
        MOE__TRY(moe__model_add_mtp(ctx, m, tokens, B, T, &o, h, aux, loss, dp.mtp, &dp.balance));
        return moe__fail(ctx, st, "%s", why);
    }
    MOE__TRY(st);
    *loss = dl;
    MOE__TRY(moe__model_add_mtp(ctx, m, tokens, B, T, &o, h, aux, loss, dp.mtp, &dp.balance));
    dp.total = moe__tensor_at(ctx, *loss, 0);
    if (parts) *parts = dp;
    return MOE_OK;
}

MOE_API moe_status moe_model_distill_loss(moe_ctx *ctx, moe_model *student, moe_model *teacher, const int32_t *tokens,
                                          int64_t batch, int64_t seq, const moe_loss_opts *lopts,
                                          const moe_distill_opts *dopts, moe_tensor **loss, moe_distill_parts *parts) {
    static const char *fn = "moe_model_distill_loss";
    moe_tensor *tl;
    moe_distill_opts o;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_tokens(ctx, fn, student, tokens, batch, seq, batch * (seq + 1)));
    if (!teacher) return moe__fail(ctx, MOE_ERR_ARG, "%s: teacher is NULL", fn);
    if (teacher == student) return moe__fail(ctx, MOE_ERR_ARG, "%s: the teacher is the student itself", fn);
    if (teacher->cfg.vocab_size != student->cfg.vocab_size)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: the teacher's vocabulary (%lld) differs from the student's (%lld): "
                         "distillation needs the same vocabulary", fn, (long long)teacher->cfg.vocab_size,
                         (long long)student->cfg.vocab_size);
    MOE__TRY(moe__check_tokens(ctx, fn, teacher, tokens, batch, seq, batch * (seq + 1)));
    MOE__TRY(moe__distill_opts(ctx, fn, dopts, &o));
    MOE__TRY(moe__distill_teacher_logits(ctx, teacher, tokens, batch, seq, &tl));
    return moe__model_distill_student(ctx, fn, student, tokens, batch, seq, lopts, &o, tl, NULL, NULL, NULL, loss, parts);
}

/* ---- the top-k teacher cache ----
   Layout (little-endian):
     0  "MOEDSTL1"         8  u32 version (1)     12 u32 k
     16 u64 vocab          24 u64 count           32 f32 temperature    36 u32 0
     40 u64 tag            48 u64 0               56 u64 checksum
     64 count records of 8k + 4 bytes: k × u32 id (most likely first), k × f32 log-prob at T,
        f32 tail mass (the teacher's probability outside the k ids, summed directly, not as
        1 − Σ top-k, so that a small tail keeps its relative precision).
   The checksum is FNV-1a over the records followed by header bytes 0..55, so the writer can
   hash records as they stream out and add the header, whose count it knows only at the end. */

#define MOE__DISTILL_MAGIC "MOEDSTL1"
#define MOE__DISTILL_VERSION 1u
#define MOE__DISTILL_HDR 64

static void moe__distill_header(unsigned char *h, const moe_distill_info *in) {
    uint32_t tb;
    memset(h, 0, MOE__DISTILL_HDR);
    memcpy(h, MOE__DISTILL_MAGIC, 8);
    moe__le_put32(h + 8, MOE__DISTILL_VERSION);
    moe__le_put32(h + 12, (uint32_t)in->k);
    moe__le_put64(h + 16, (uint64_t)in->vocab);
    moe__le_put64(h + 24, (uint64_t)in->count);
    memcpy(&tb, &in->temperature, 4);
    moe__le_put32(h + 32, tb);
    moe__le_put64(h + 40, in->tag);
}

struct moe_distill_writer {
    moe__out_file out;   /* the temporary file, renamed into place by finish */
    moe_distill_info info;
    uint64_t hash;       /* FNV-1a of the records written so far */
    unsigned char *rec;  /* one encoded record */
    int failed, done;
};

MOE_API moe_status moe_distill_writer_new(moe_ctx *ctx, const char *path, int64_t vocab, int64_t k, float temperature,
                                          uint64_t tag, moe_distill_writer **out) {
    static const char *fn = "moe_distill_writer_new";
    moe_distill_writer *w;
    unsigned char hdr[MOE__DISTILL_HDR];
    if (out) *out = NULL;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    if (vocab < 1 || vocab > 0x7FFFFFFF) return moe__fail(ctx, MOE_ERR_ARG, "%s: vocab must be in [1, 2^31), got %lld", fn, (long long)vocab);
    if (k < 1 || k > vocab || k > 0x0FFFFFFF)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: k must be in [1, vocab = %lld], got %lld", fn, (long long)vocab, (long long)k);
    if (!(temperature > 0.0f) || !isfinite(temperature))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: temperature must be a finite number > 0, got %g", fn, (double)temperature);
    w = (moe_distill_writer *)moe__heap_calloc(ctx, sizeof *w);
    if (!w) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    w->info.vocab = vocab;
    w->info.k = k;
    w->info.temperature = temperature;
    w->info.tag = tag;
    w->hash = MOE__FNV_SEED;
    w->rec = (unsigned char *)moe__heap_alloc(ctx, (size_t)(8 * k + 4));
    if (!w->rec) {
        moe_distill_writer_free(w);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for vocab %lld, k %lld", fn, (long long)vocab, (long long)k);
    }
    {
        moe_status s = moe__out_begin(ctx, fn, path, &w->out);
        if (s != MOE_OK) {
            moe_distill_writer_free(w);
            return s;
        }
    }
    moe__distill_header(hdr, &w->info); /* a placeholder: count and checksum come at the end */
    if (fwrite(hdr, 1, sizeof hdr, w->out.f) != sizeof hdr) {
        moe_status s = moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, w->out.tmp, strerror(errno));
        moe_distill_writer_free(w);
        return s;
    }
    *out = w;
    return MOE_OK;
}

MOE_API moe_status moe_distill_writer_add(moe_ctx *ctx, moe_distill_writer *w, const moe_tensor *teacher_logits) {
    static const char *fn = "moe_distill_writer_add";
    int64_t V, k, rows, r, i;
    int32_t *ids;
    moe_real *logp, *tail;
    const int32_t *h_ids;
    const moe_real *h_logp, *h_tail;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!w) return moe__fail(ctx, MOE_ERR_ARG, "%s: writer is NULL", fn);
    if (w->done || w->failed) return moe__fail(ctx, MOE_ERR_STATE, "%s: the writer is %s", fn, w->done ? "finished" : "failed");
    MOE__TRY(moe__check_f32(ctx, fn, teacher_logits, "teacher_logits"));
    V = w->info.vocab;
    k = w->info.k;
    if (MOE__LAST(teacher_logits) != V)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the logits' vocabulary is %lld, the cache's %lld", fn,
                         (long long)MOE__LAST(teacher_logits), (long long)V);
    rows = teacher_logits->numel / V;
    ids = (int32_t *)moe__dev_scratch(ctx, rows * k, sizeof(int32_t), fn);
    logp = moe__dev_real(ctx, rows * k, fn);
    tail = moe__dev_real(ctx, rows, fn);
    if (!ids || !logp || !tail) return MOE_ERR_MEMORY;
    st = MOE__BE(ctx)->teacher_topk(ctx, MOE__F32(teacher_logits), rows, V, k, (moe_real)w->info.temperature, ids, logp, tail);
    if (st != MOE_OK) return moe__fail(ctx, st, "%s: %s", fn, moe_ctx_error(ctx));
    h_ids = (const int32_t *)moe__host_data(ctx, ids, (size_t)(rows * k) * sizeof(int32_t));
    h_logp = (const moe_real *)moe__host_data(ctx, logp, (size_t)(rows * k) * sizeof(moe_real));
    h_tail = (const moe_real *)moe__host_data(ctx, tail, (size_t)rows * sizeof(moe_real));
    if (!h_ids || !h_logp || !h_tail) return MOE_ERR_MEMORY;
    for (r = 0; r < rows; r++) { /* encode the records: k ids, k log-probabilities, the tail (f32) */
        uint32_t u;
        float f;
        for (i = 0; i < k; i++) {
            f = (float)h_logp[r * k + i];
            memcpy(&u, &f, 4);
            moe__le_put32(w->rec + 4 * i, (uint32_t)h_ids[r * k + i]);
            moe__le_put32(w->rec + 4 * (k + i), u);
        }
        f = (float)h_tail[r];
        memcpy(&u, &f, 4);
        moe__le_put32(w->rec + 8 * k, u);
        w->hash = moe__fnv1a(w->hash, w->rec, (size_t)(8 * k + 4));
        if (fwrite(w->rec, 1, (size_t)(8 * k + 4), w->out.f) != (size_t)(8 * k + 4)) {
            w->failed = 1;
            return moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, w->out.tmp, strerror(errno));
        }
        w->info.count++;
    }
    return MOE_OK;
}

MOE_API moe_status moe_distill_writer_finish(moe_ctx *ctx, moe_distill_writer *w) {
    static const char *fn = "moe_distill_writer_finish";
    unsigned char hdr[MOE__DISTILL_HDR];
    uint64_t h;
    moe_status s;
    MOE__CHECK_CTX(ctx);
    if (!w) return moe__fail(ctx, MOE_ERR_ARG, "%s: writer is NULL", fn);
    if (w->done || w->failed) return moe__fail(ctx, MOE_ERR_STATE, "%s: the writer is %s", fn, w->done ? "finished" : "failed");
    moe__distill_header(hdr, &w->info);
    h = moe__fnv1a(w->hash, hdr, 56);
    moe__le_put64(hdr + 56, h);
    /* the real header over the placeholder, then the file goes into place */
    if (fseek(w->out.f, 0, SEEK_SET) != 0 || fwrite(hdr, 1, sizeof hdr, w->out.f) != sizeof hdr) {
        int e = errno;
        w->failed = 1;
        moe__out_abort(&w->out);
        return moe__fail(ctx, MOE_ERR_IO, "%s: writing '%s' failed: %s", fn, w->out.path, strerror(e));
    }
    s = moe__out_commit(ctx, fn, &w->out);
    if (s != MOE_OK) w->failed = 1;
    else w->done = 1;
    return s;
}

MOE_API void moe_distill_writer_free(moe_distill_writer *w) {
    if (!w) return;
    moe__out_abort(&w->out); /* nothing left to remove once finished */
    MOE_FREE(w->rec);
    MOE_FREE(w);
}

struct moe_distill_cache {
    FILE *f;
    moe_distill_info info;
    size_t rec_bytes;
    char path[1024]; /* for messages (may be cut) */
};

MOE_API void moe_distill_cache_close(moe_distill_cache *c) {
    if (!c) return;
    if (c->f) fclose(c->f);
    MOE_FREE(c);
}

MOE_API moe_distill_info moe_distill_cache_info(const moe_distill_cache *c) {
    moe_distill_info i;
    memset(&i, 0, sizeof i);
    return c ? c->info : i;
}

MOE_API moe_status moe_distill_cache_open(moe_ctx *ctx, const char *path, moe_distill_cache **out) {
    static const char *fn = "moe_distill_cache_open";
    unsigned char hdr[MOE__DISTILL_HDR], *buf = NULL;
    moe_distill_cache *c;
    uint64_t vocab, k, count, h = MOE__FNV_SEED, left;
    uint32_t tb;
    long size = 0;
    moe_status s = MOE_OK;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!path) return moe__fail(ctx, MOE_ERR_ARG, "%s: path is NULL", fn);
    c = (moe_distill_cache *)moe__heap_calloc(ctx, sizeof *c);
    if (!c) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    snprintf(c->path, sizeof c->path, "%s", path);
    s = moe__check_regular(ctx, fn, path);
    if (s != MOE_OK) {
    } else if (!(c->f = fopen(path, "rb"))) s = moe__fail(ctx, MOE_ERR_IO, "%s: cannot open '%s': %s", fn, path, strerror(errno));
    else if (fseek(c->f, 0, SEEK_END) != 0 || (size = ftell(c->f)) < 0 || fseek(c->f, 0, SEEK_SET) != 0)
        s = moe__fail(ctx, MOE_ERR_IO, "%s: cannot size '%s'", fn, path);
    else if (size < MOE__DISTILL_HDR || fread(hdr, 1, sizeof hdr, c->f) != sizeof hdr)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is truncated: %ld bytes, shorter than the %d-byte header", fn, path, size,
                      MOE__DISTILL_HDR);
    else if (memcmp(hdr, MOE__DISTILL_MAGIC, 8) != 0)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is not a moe.h distillation cache (bad magic)", fn, path);
    else if (moe__le_get32(hdr + 8) != MOE__DISTILL_VERSION)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has version %u, this build reads version %u", fn, path,
                      (unsigned)moe__le_get32(hdr + 8), MOE__DISTILL_VERSION);
    if (s != MOE_OK) {
        moe_distill_cache_close(c);
        return s;
    }
    k = moe__le_get32(hdr + 12);
    vocab = moe__le_get64(hdr + 16);
    count = moe__le_get64(hdr + 24);
    tb = moe__le_get32(hdr + 32);
    memcpy(&c->info.temperature, &tb, 4);
    if (vocab < 1 || vocab > 0x7FFFFFFF || k < 1 || k > vocab || k > 0x0FFFFFFF)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has a bad header: vocab %llu, k %llu", fn, path, (unsigned long long)vocab,
                      (unsigned long long)k);
    else if (!(c->info.temperature > 0.0f) || !isfinite(c->info.temperature))
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has a bad header: temperature %g", fn, path, (double)c->info.temperature);
    else if (moe__le_get32(hdr + 36) != 0 || moe__le_get64(hdr + 48) != 0)
        s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has a bad header: reserved fields are not zero", fn, path);
    else {
        c->rec_bytes = (size_t)(8 * k + 4);
        /* size = 64 + count·rec, checked without overflow */
        if (count > ((uint64_t)size - MOE__DISTILL_HDR) / c->rec_bytes ||
            MOE__DISTILL_HDR + count * c->rec_bytes != (uint64_t)size) {
            s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is truncated or padded: the header says %llu records of %zu bytes, "
                          "the file has %ld bytes", fn, path, (unsigned long long)count, c->rec_bytes, size);
        }
    }
    if (s == MOE_OK) {
        const size_t chunk = (size_t)1 << 20;
        buf = (unsigned char *)moe__heap_alloc(ctx, chunk);
        if (!buf) s = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
        for (left = (uint64_t)size - MOE__DISTILL_HDR; s == MOE_OK && left > 0;) {
            size_t n = left < chunk ? (size_t)left : chunk;
            if (fread(buf, 1, n, c->f) != n) s = moe__fail(ctx, MOE_ERR_IO, "%s: short read on '%s'", fn, path);
            h = moe__fnv1a(h, buf, n);
            left -= n;
        }
        MOE_FREE(buf);
        if (s == MOE_OK && !moe__checksum_ok(moe__le_get64(hdr + 56), moe__fnv1a(h, hdr, 56)))
            s = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' fails its checksum (corrupted)", fn, path);
    }
    if (s != MOE_OK) {
        moe_distill_cache_close(c);
        return s;
    }
    c->info.vocab = (int64_t)vocab;
    c->info.k = (int64_t)k;
    c->info.count = (int64_t)count;
    c->info.tag = moe__le_get64(hdr + 40);
    *out = c;
    return MOE_OK;
}

MOE_API moe_status moe_distill_cache_read(moe_ctx *ctx, moe_distill_cache *c, int64_t first, int64_t rows,
                                          moe_tensor **ids, moe_tensor **logp, moe_tensor **tail) {
    static const char *fn = "moe_distill_cache_read";
    int64_t shape[2], k, r, i;
    unsigned char *raw;
    int32_t *sorted;
    size_t bytes;
    uint64_t off;
    int32_t *h_ids;
    moe_real *h_logp, *h_tail;
    MOE__CHECK_CTX(ctx);
    if (!c || !ids || !logp || !tail) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL cache or output", fn);
    *ids = *logp = *tail = NULL;
    if (first < 0 || rows < 1 || first > c->info.count - rows)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: records [%lld, %lld + %lld) are outside the %lld in '%s'", fn, (long long)first,
                         (long long)first, (long long)rows, (long long)c->info.count, c->path);
    k = c->info.k;
    if (moe__mul_overflows((size_t)rows, c->rec_bytes, &bytes)) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: size overflows", fn);
    off = MOE__DISTILL_HDR + (uint64_t)first * c->rec_bytes; /* below the file size: checked at open */
    if ((uint64_t)(long)off != off || (long)off < 0)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: offset %llu does not fit fseek", fn, (unsigned long long)off);
    raw = (unsigned char *)moe__arena_alloc_raw(ctx, bytes);
    if (!raw) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: no memory for %zu bytes", fn, bytes);
    if (fseek(c->f, (long)off, SEEK_SET) != 0 || fread(raw, 1, bytes, c->f) != bytes)
        return moe__fail(ctx, MOE_ERR_IO, "%s: reading records %lld.. of '%s' failed (file changed since it was opened?)", fn,
                         (long long)first, c->path);
    h_ids = (int32_t *)moe__arena_alloc(ctx, (size_t)(rows * k), sizeof(int32_t), fn);
    h_logp = (moe_real *)moe__arena_alloc(ctx, (size_t)(rows * k), sizeof(moe_real), fn);
    h_tail = (moe_real *)moe__arena_alloc(ctx, (size_t)rows, sizeof(moe_real), fn);
    if (!h_ids || !h_logp || !h_tail) return MOE_ERR_MEMORY;
    for (r = 0; r < rows; r++) {
        const unsigned char *p = raw + (size_t)r * c->rec_bytes;
        float f;
        uint32_t u;
        for (i = 0; i < k; i++) {
            h_ids[r * k + i] = (int32_t)moe__le_get32(p + 4 * i);
            u = moe__le_get32(p + 4 * (k + i));
            memcpy(&f, &u, 4);
            h_logp[r * k + i] = (moe_real)f;
        }
        u = moe__le_get32(p + 8 * k);
        memcpy(&f, &u, 4);
        h_tail[r] = (moe_real)f;
    }
    /* the checksum catches damage, not a hostile writer: check what the loss relies on */
    sorted = (int32_t *)moe__arena_alloc(ctx, (size_t)k, sizeof(int32_t), fn);
    if (!sorted) return MOE_ERR_MEMORY;
    MOE__TRY(moe__distill_check_topk(ctx, fn, MOE_ERR_FORMAT, first, h_ids, h_logp, h_tail, rows, k, c->info.vocab, NULL, sorted));
    shape[0] = rows;
    shape[1] = k;
    MOE__TRY(moe_tensor_temp(ctx, MOE_I32, 2, shape, ids));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 2, shape, logp));
    MOE__TRY(moe_tensor_temp(ctx, MOE_F32, 1, shape, tail));
    MOE__TRY(MOE__BE(ctx)->copy(ctx, (*ids)->data, h_ids, (size_t)(rows * k) * sizeof(int32_t), MOE__H2D));
    MOE__TRY(MOE__BE(ctx)->copy(ctx, (*logp)->data, h_logp, (size_t)(rows * k) * sizeof(moe_real), MOE__H2D));
    return MOE__BE(ctx)->copy(ctx, (*tail)->data, h_tail, (size_t)rows * sizeof(moe_real), MOE__H2D);
}

MOE_API moe_status moe_model_distill_loss_cached(moe_ctx *ctx, moe_model *student, moe_distill_cache *cache,
                                                 int64_t first, const int32_t *tokens, int64_t batch, int64_t seq,
                                                 const moe_loss_opts *lopts, const moe_distill_opts *dopts,
                                                 moe_tensor **loss, moe_distill_parts *parts) {
    static const char *fn = "moe_model_distill_loss_cached";
    moe_tensor *ids, *logp, *tail;
    moe_distill_opts o;
    MOE__TRY(moe__check_out(ctx, fn, loss));
    MOE__TRY(moe__check_tokens(ctx, fn, student, tokens, batch, seq, batch * (seq + 1)));
    if (!cache) return moe__fail(ctx, MOE_ERR_ARG, "%s: cache is NULL", fn);
    MOE__TRY(moe__distill_opts(ctx, fn, dopts, &o));
    if (cache->info.vocab != student->cfg.vocab_size)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: the cache '%s' has vocabulary %lld, the student %lld: distillation needs the "
                         "same vocabulary", fn, cache->path, (long long)cache->info.vocab, (long long)student->cfg.vocab_size);
    if (cache->info.temperature != o.temperature)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: the cache '%s' holds the teacher at temperature %g, the loss asks for %g "
                         "(top-k log-probabilities cannot be re-tempered: write the cache at the temperature you train with)",
                         fn, cache->path, (double)cache->info.temperature, (double)o.temperature);
    MOE__TRY(moe_distill_cache_read(ctx, cache, first, batch * seq, &ids, &logp, &tail));
    return moe__model_distill_student(ctx, fn, student, tokens, batch, seq, lopts, &o, NULL, ids, logp, tail, loss, parts);
}

/* ============================================================================================
   12. io — config.json, token data, checkpoints, safetensors, Hugging Face                >>io
   ============================================================================================
   config.json, token data, checkpoints, safetensors and Hugging Face directories: files on the
   host, read and written through the atomic writer and the strict parsers below. The model's
   slabs must be host memory here (a model on a GPU is copied to the host first). */

/* ---- a strict JSON reader: a flat array of tokens, each knowing where its subtree ends ---- */

enum { MOE__J_OBJ, MOE__J_ARR, MOE__J_STR, MOE__J_NUM, MOE__J_TRUE, MOE__J_FALSE, MOE__J_NULL };
typedef struct moe__jtok {
    int type;
    int64_t start, end; /* bytes of the value (strings: inside the quotes) */
    int64_t count;      /* children: array elements, or object keys (each key token is followed by its value) */
    int64_t next;       /* index of the token after this subtree */
} moe__jtok;
typedef struct moe__json {
    const char *s;
    int64_t len, n, cap;
    moe__jtok *t; /* heap while parsing (grown by doubling), then a copy in the step arena */
    int64_t err_at;
    int oom;
} moe__json;

#define MOE__JSON_MAX_DEPTH 64
/* At most 2^24 values (670 MB of tokens): DeepSeek-V3's shard index has ~2·10^5, a shard header
   ~5·10^4. A hostile 100 MB header of "[0,0,0,...]" would otherwise ask for 5·10^7. */
#define MOE__JSON_MAX_VALUES ((int64_t)1 << 24)

static int64_t moe__json_ws(const moe__json *j, int64_t p) {
    while (p < j->len && (j->s[p] == ' ' || j->s[p] == '\t' || j->s[p] == '\n' || j->s[p] == '\r')) p++;
    return p;
}
static int moe__json_digit(const moe__json *j, int64_t p) { return p < j->len && j->s[p] >= '0' && j->s[p] <= '9'; }

/* Parse one value at *p, storing tokens when j->t is set; returns NULL on success, else a
   static message (and j->err_at). */
static const char *moe__json_value(moe__json *j, int64_t *p, int depth) {
    moe__jtok tok;
    int64_t me, q = moe__json_ws(j, *p);
    const char *err;
    j->err_at = q;
    if (depth > MOE__JSON_MAX_DEPTH) return "nesting too deep";
    if (q >= j->len) return "unexpected end";
    if (j->n >= MOE__JSON_MAX_VALUES) return "more than 2^24 values";
    if (j->n >= j->cap) {
        int64_t cap = j->cap ? 2 * j->cap : 64;
        moe__jtok *t = (uint64_t)cap > SIZE_MAX / sizeof(moe__jtok) ? NULL
                                                                      : (moe__jtok *)MOE_REALLOC(j->t, (size_t)cap * sizeof(moe__jtok));
        if (!t) {
            j->oom = 1;
            return "out of memory";
        }
        j->t = t;
        j->cap = cap;
    }
    me = j->n++;
    tok.start = q;
    tok.count = 0;
    if (j->s[q] == '{' || j->s[q] == '[') {
        int obj = j->s[q] == '{';
        char close = obj ? '}' : ']';
        tok.type = obj ? MOE__J_OBJ : MOE__J_ARR;
        q = moe__json_ws(j, q + 1);
        if (q < j->len && j->s[q] == close) {
            q++;
        } else {
            for (;;) {
                if (obj) {
                    q = moe__json_ws(j, q);
                    j->err_at = q;
                    if (q >= j->len || j->s[q] != '"') return "object key must be a string";
                    if ((err = moe__json_value(j, &q, depth + 1))) return err;
                    q = moe__json_ws(j, q);
                    j->err_at = q;
                    if (q >= j->len || j->s[q] != ':') return "expected ':'";
                    q++;
                }
                if ((err = moe__json_value(j, &q, depth + 1))) return err;
                tok.count++;
                q = moe__json_ws(j, q);
                j->err_at = q;
                if (q < j->len && j->s[q] == ',') { q++; continue; }
                if (q < j->len && j->s[q] == close) { q++; break; }
                return obj ? "expected ',' or '}'" : "expected ',' or ']'";
            }
        }
        tok.end = q;
    } else if (j->s[q] == '"') {
        int64_t a = ++q;
        while (q < j->len && j->s[q] != '"') {
            j->err_at = q;
            if ((unsigned char)j->s[q] < 0x20) return "control character in string";
            if (j->s[q] == '\\') {
                q++;
                if (q >= j->len) return "unterminated string";
                if (j->s[q] == 'u') {
                    int i;
                    for (i = 1; i <= 4; i++)
                        if (q + i >= j->len || !j->s[q + i] || !strchr("0123456789abcdefABCDEF", j->s[q + i])) return "bad \\u escape";
                    q += 4;
                } else if (!j->s[q] || !strchr("\"\\/bfnrt", j->s[q])) {
                    return "bad escape";
                }
            }
            q++;
        }
        if (q >= j->len) return "unterminated string";
        tok.type = MOE__J_STR;
        tok.start = a;
        tok.end = q++;
    } else if (j->s[q] == '-' || moe__json_digit(j, q)) {
        if (j->s[q] == '-') q++;
        if (!moe__json_digit(j, q)) return "bad number";
        if (j->s[q] == '0') q++;
        else while (moe__json_digit(j, q)) q++;
        if (q < j->len && j->s[q] == '.') {
            q++;
            if (!moe__json_digit(j, q)) return "bad number";
            while (moe__json_digit(j, q)) q++;
        }
        if (q < j->len && (j->s[q] == 'e' || j->s[q] == 'E')) {
            q++;
            if (q < j->len && (j->s[q] == '+' || j->s[q] == '-')) q++;
            if (!moe__json_digit(j, q)) return "bad number";
            while (moe__json_digit(j, q)) q++;
        }
        tok.type = MOE__J_NUM;
        tok.end = q;
    } else if (j->len - q >= 4 && memcmp(j->s + q, "true", 4) == 0) {
        tok.type = MOE__J_TRUE;
        tok.end = q += 4;
    } else if (j->len - q >= 5 && memcmp(j->s + q, "false", 5) == 0) {
        tok.type = MOE__J_FALSE;
        tok.end = q += 5;
    } else if (j->len - q >= 4 && memcmp(j->s + q, "null", 4) == 0) {
        tok.type = MOE__J_NULL;
        tok.end = q += 4;
    } else {
        return "unexpected character";
    }
    tok.next = j->n;
    j->t[me] = tok;
    *p = q;
    return NULL;
}

/* Parse a whole document in one pass; the tokens end up in the step arena. */
static moe_status moe__json_parse(moe_ctx *ctx, const char *what, const char *s, int64_t len, moe__json *j) {
    int64_t p = 0;
    const char *err;
    moe__jtok *heap;
    memset(j, 0, sizeof *j);
    j->s = s;
    j->len = len;
    err = moe__json_value(j, &p, 0);
    if (!err && moe__json_ws(j, p) != len) {
        j->err_at = moe__json_ws(j, p);
        err = "text after the JSON value";
    }
    heap = j->t;
    if (err) {
        MOE_FREE(heap);
        j->t = NULL;
        if (j->oom) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory parsing JSON", what);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: invalid JSON at byte %lld: %s", what, (long long)j->err_at, err);
    }
    j->t = (moe__jtok *)moe__arena_alloc(ctx, (size_t)j->n, sizeof(moe__jtok), what);
    if (j->t) memcpy(j->t, heap, (size_t)j->n * sizeof(moe__jtok));
    MOE_FREE(heap);
    j->cap = j->n;
    return j->t ? MOE_OK : MOE_ERR_MEMORY;
}

/* Decode string token i into buf (UTF-8, NUL-terminated); 0 if it does not fit. */
static int moe__json_str(const moe__json *j, int64_t i, char *buf, size_t size) {
    int64_t p;
    size_t o = 0;
    if (i < 0 || j->t[i].type != MOE__J_STR) return 0;
    for (p = j->t[i].start; p < j->t[i].end; p++) {
        unsigned c = (unsigned char)j->s[p];
        if (c == '\\') {
            char e = j->s[++p];
            if (e == 'u') {
                unsigned cp = 0;
                int h;
                for (h = 1; h <= 4; h++) {
                    char x = j->s[p + h];
                    cp = cp * 16 + (unsigned)(x <= '9' ? x - '0' : (x | 0x20) - 'a' + 10);
                }
                p += 4;
                if (cp == 0) return 0; /* an embedded NUL cannot be a C string */
                if (cp < 0x80) { if (o + 1 >= size) return 0; buf[o++] = (char)cp; }
                else if (cp < 0x800) { if (o + 2 >= size) return 0; buf[o++] = (char)(0xC0 | (cp >> 6)); buf[o++] = (char)(0x80 | (cp & 63)); }
                else { if (o + 3 >= size) return 0; buf[o++] = (char)(0xE0 | (cp >> 12)); buf[o++] = (char)(0x80 | ((cp >> 6) & 63)); buf[o++] = (char)(0x80 | (cp & 63)); }
                continue;
            }
            c = e == 'b' ? '\b' : e == 'f' ? '\f' : e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : (unsigned char)e;
        }
        if (o + 1 >= size) return 0;
        buf[o++] = (char)c;
    }
    buf[o] = 0;
    return 1;
}

/* The value token of `key` (no backslash in it) in object token obj, or -1. Keys are compared
   in place; an escape always makes the raw text longer than what it decodes to, so only a
   longer key holding a backslash is decoded first. */
static int64_t moe__json_get(const moe__json *j, int64_t obj, const char *key) {
    int64_t i, k;
    size_t klen = strlen(key);
    char buf[256];
    if (obj < 0 || j->t[obj].type != MOE__J_OBJ) return -1;
    for (i = obj + 1, k = 0; k < j->t[obj].count; k++) {
        const char *raw = j->s + j->t[i].start;
        size_t rlen = (size_t)(j->t[i].end - j->t[i].start);
        if (rlen == klen ? memcmp(raw, key, klen) == 0
                         : rlen > klen && memchr(raw, '\\', rlen) && moe__json_str(j, i, buf, sizeof buf) && strcmp(buf, key) == 0)
            return i + 1;
        i = j->t[i + 1].next;
    }
    return -1;
}

static int moe__json_cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* 1 when two keys of object token obj decode to the same string (the key goes to dup), 0 when
   none do, -1 without memory. Sorting keeps a hostile object of a million keys O(n log n). */
static int moe__json_dup_key(const moe__json *j, int64_t obj, char *dup, size_t dup_size) {
    int64_t n, i, k, raw = 0;
    char **keys, *text, *at;
    int found = 0;
    if (obj < 0 || j->t[obj].type != MOE__J_OBJ || (n = j->t[obj].count) < 2) return 0;
    for (i = obj + 1, k = 0; k < n; k++, i = j->t[i + 1].next) raw += j->t[i].end - j->t[i].start + 1;
    keys = (char **)MOE_MALLOC(sizeof(char *) * (size_t)n);
    text = (char *)MOE_MALLOC((size_t)raw);
    if (!keys || !text) {
        MOE_FREE(keys);
        MOE_FREE(text);
        return -1;
    }
    for (at = text, i = obj + 1, k = 0; k < n; k++, i = j->t[i + 1].next) {
        size_t len = (size_t)(j->t[i].end - j->t[i].start); /* decoding never lengthens a string */
        if (!moe__json_str(j, i, at, len + 1)) { /* a \u0000 inside: compare the raw text */
            memcpy(at, j->s + j->t[i].start, len);
            at[len] = 0;
        }
        keys[k] = at;
        at += strlen(at) + 1;
    }
    qsort(keys, (size_t)n, sizeof *keys, moe__json_cmp_str);
    for (k = 1; k < n && !found; k++)
        if (strcmp(keys[k - 1], keys[k]) == 0) {
            snprintf(dup, dup_size, "%s", keys[k]);
            found = 1;
        }
    MOE_FREE(keys);
    MOE_FREE(text);
    return found;
}

static int moe__json_num(const moe__json *j, int64_t i, double *v) {
    char buf[64];
    int64_t n;
    if (i < 0 || j->t[i].type != MOE__J_NUM) return 0;
    n = j->t[i].end - j->t[i].start;
    if (n >= (int64_t)sizeof buf) return 0;
    memcpy(buf, j->s + j->t[i].start, (size_t)n);
    buf[n] = 0;
    *v = strtod(buf, NULL);
    return 1;
}

/* ---- config.json ---- */

/* Hugging Face's DeepseekV3Config defaults (what a config.json without the key means). */
static moe_config moe__config_hf_defaults(void) {
    moe_config c = moe_config_tiny();
    c.vocab_size = 129280; c.hidden_size = 7168; c.intermediate_size = 18432; c.moe_intermediate_size = 2048;
    c.num_hidden_layers = 61; c.first_k_dense_replace = 3; c.num_attention_heads = 128;
    c.q_lora_rank = 1536; c.kv_lora_rank = 512; c.qk_nope_head_dim = 128; c.qk_rope_head_dim = 64; c.v_head_dim = 128;
    c.n_routed_experts = 256; c.n_shared_experts = 1; c.num_experts_per_tok = 8; c.n_group = 8; c.topk_group = 4;
    c.norm_topk_prob = 1; c.routed_scaling_factor = 2.5; c.num_nextn_predict_layers = 0;
    c.max_position_embeddings = 4096; c.initializer_range = 0.02;
    return c;
}

/* Fields of config.json are read strictly: a key that is present is honoured or refused by
   name. Its value must have the right JSON type and lie in range (an explicit 0 where 0 means
   nothing is refused: zero-means-default is a convention of the C struct only, not of files),
   and a number is converted to an integer only when it is an integer that fits. */
typedef struct moe__cfg_reader {
    moe_ctx *ctx;
    const moe__json *j;
    const char *fn;
} moe__cfg_reader;

/* Refuse an object with a key given twice (Python's json keeps the last, a first-match lookup
   the first: the two would build different models). */
static moe_status moe__cfg_no_dup(const moe__cfg_reader *R, int64_t obj, const char *what) {
    char dup[128];
    int d = moe__json_dup_key(R->j, obj, dup, sizeof dup);
    if (d < 0) return moe__fail(R->ctx, MOE_ERR_MEMORY, "%s: out of memory", R->fn);
    if (d) return moe__fail(R->ctx, MOE_ERR_FORMAT, "%s: key \"%s\" appears twice in %s", R->fn, dup, what);
    return MOE_OK;
}

/* Integer field `key` of object `obj` into *out when present: in [lo, hi] (hi <= 2^53, so the
   double holds it exactly). `null_ok`: a JSON null leaves *out and sets *is_null. */
static moe_status moe__cfg_int(const moe__cfg_reader *R, int64_t obj, const char *prefix, const char *key, int64_t lo, int64_t hi,
                               int64_t *out, int null_ok, int *is_null) {
    int64_t v = moe__json_get(R->j, obj, key);
    double x;
    if (is_null) *is_null = 0;
    if (v < 0) return MOE_OK;
    if (R->j->t[v].type == MOE__J_NULL && null_ok) {
        if (is_null) *is_null = 1;
        return MOE_OK;
    }
    if (!moe__json_num(R->j, v, &x))
        return moe__fail(R->ctx, MOE_ERR_FORMAT, "%s: \"%s%s\" must be an integer%s", R->fn, prefix, key, null_ok ? " or null" : "");
    if (!(x >= (double)lo && x <= (double)hi) || x != floor(x))
        return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%s%s\" = %.17g is out of range (an integer in [%lld, %lld])", R->fn, prefix,
                         key, x, (long long)lo, (long long)hi);
    *out = (int64_t)x;
    return MOE_OK;
}

/* Real field: finite, and > lo (lo_open) or >= lo, and <= hi. null_ok as above. */
static moe_status moe__cfg_real(const moe__cfg_reader *R, int64_t obj, const char *prefix, const char *key, double lo, int lo_open,
                                double hi, double *out, int null_ok, int *present) {
    int64_t v = moe__json_get(R->j, obj, key);
    double x;
    if (present) *present = 0;
    if (v < 0 || (R->j->t[v].type == MOE__J_NULL && null_ok)) return MOE_OK;
    if (!moe__json_num(R->j, v, &x))
        return moe__fail(R->ctx, MOE_ERR_FORMAT, "%s: \"%s%s\" must be a number%s", R->fn, prefix, key, null_ok ? " or null" : "");
    if (!isfinite(x) || (lo_open ? !(x > lo) : !(x >= lo)) || x > hi) {
        char range[96];
        if (lo == hi) snprintf(range, sizeof range, "%g", lo);
        else if (hi < DBL_MAX) snprintf(range, sizeof range, "%s%g, %g]", lo_open ? "(" : "[", lo, hi);
        else snprintf(range, sizeof range, "%s %g and finite", lo_open ? ">" : ">=", lo);
        return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%s%s\" = %.17g is out of range (must be %s)", R->fn, prefix, key, x, range);
    }
    *out = x;
    if (present) *present = 1;
    return MOE_OK;
}

/* Boolean field: true or false (null refused: transformers would read it as false). */
static moe_status moe__cfg_bool(const moe__cfg_reader *R, int64_t obj, const char *key, int *out) {
    int64_t v = moe__json_get(R->j, obj, key);
    if (v < 0) return MOE_OK;
    if (R->j->t[v].type != MOE__J_TRUE && R->j->t[v].type != MOE__J_FALSE)
        return moe__fail(R->ctx, MOE_ERR_FORMAT, "%s: \"%s\" must be true or false", R->fn, key);
    *out = R->j->t[v].type == MOE__J_TRUE;
    return MOE_OK;
}

/* The RoPE object (legacy "rope_scaling" or transformers 5's "rope_parameters"), read as
   transformers reads it: rope_type "default" or "yarn"; YaRN needs factor (>= 1), takes
   original_max_position_embeddings (default max_position_embeddings), beta_fast/beta_slow
   (default 32/1), mscale/mscale_all_dim (absent, null and 0 are the same: transformers tests
   them for truth). Keys it does not implement are refused by name. */
static moe_status moe__cfg_rope(const moe__cfg_reader *R, int64_t v, const char *what, moe_config *c) {
    static const char *known[] = {"type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
                                  "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor"};
    const moe__json *j = R->j;
    char buf[64], prefix[40];
    int64_t i, k, w, omax = c->max_position_embeddings;
    double x;
    int yarn, present;
    if (j->t[v].type != MOE__J_OBJ) return moe__fail(R->ctx, MOE_ERR_FORMAT, "%s: \"%s\" must be an object or null", R->fn, what);
    MOE__TRY(moe__cfg_no_dup(R, v, what));
    snprintf(prefix, sizeof prefix, "%s.", what);
    for (i = v + 1, k = 0; k < j->t[v].count; k++, i = j->t[i + 1].next) {
        size_t q;
        int ok = 0;
        if (!moe__json_str(j, i, buf, sizeof buf)) return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%s\" has an unknown key", R->fn, what);
        for (q = 0; q < sizeof known / sizeof known[0]; q++) ok |= strcmp(buf, known[q]) == 0;
        if (!ok) return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%s%s\" is not supported", R->fn, prefix, buf);
    }
    w = moe__json_get(j, v, "rope_type");
    if (w < 0) w = moe__json_get(j, v, "type");
    if (w < 0) return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%s\" needs a rope_type (\"default\" or \"yarn\")", R->fn, what);
    if (!moe__json_str(j, w, buf, sizeof buf)) return moe__fail(R->ctx, MOE_ERR_FORMAT, "%s: \"%srope_type\" must be a string", R->fn, prefix);
    if (strcmp(buf, "yarn") != 0 && strcmp(buf, "default") != 0)
        return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: %s type \"%s\" is not supported (\"default\" or \"yarn\")", R->fn, what, buf);
    yarn = strcmp(buf, "yarn") == 0;
    MOE__TRY(moe__cfg_real(R, v, prefix, "rope_theta", 1.0, 1, DBL_MAX, &c->rope_theta, 0, NULL));
    MOE__TRY(moe__cfg_real(R, v, prefix, "partial_rotary_factor", 1.0, 0, 1.0, &x, 0, NULL));
    if ((w = moe__json_get(j, v, "truncate")) >= 0 && j->t[w].type != MOE__J_TRUE)
        return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%struncate\" must be true (an untruncated YaRN ramp is not supported)", R->fn, prefix);
    if ((w = moe__json_get(j, v, "attention_factor")) >= 0 && j->t[w].type != MOE__J_NULL)
        return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%sattention_factor\" is not supported (it is derived from factor, mscale and "
                         "mscale_all_dim)", R->fn, prefix);
    memset(&c->rope_scaling, 0, sizeof c->rope_scaling);
    if (!yarn) {
        static const char *yarn_only[] = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"};
        size_t q;
        for (q = 0; q < sizeof yarn_only / sizeof yarn_only[0]; q++)
            if (moe__json_get(j, v, yarn_only[q]) >= 0)
                return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: \"%s%s\" needs rope_type \"yarn\"", R->fn, prefix, yarn_only[q]);
        return MOE_OK;
    }
    if (moe__json_get(j, v, "factor") < 0) return moe__fail(R->ctx, MOE_ERR_CONFIG, "%s: YaRN \"%s\" needs a factor", R->fn, what);
    MOE__TRY(moe__cfg_real(R, v, prefix, "factor", 1.0, 0, 1e6, &c->rope_scaling.factor, 0, NULL));
    MOE__TRY(moe__cfg_int(R, v, prefix, "original_max_position_embeddings", 1, (int64_t)1 << 26, &omax, 0, NULL));
    c->rope_scaling.original_max_pos = omax;
    c->rope_scaling.beta_fast = 32;
    c->rope_scaling.beta_slow = 1;
    MOE__TRY(moe__cfg_real(R, v, prefix, "beta_fast", 0.0, 1, 1e6, &c->rope_scaling.beta_fast, 1, &present));
    MOE__TRY(moe__cfg_real(R, v, prefix, "beta_slow", 0.0, 1, 1e6, &c->rope_scaling.beta_slow, 1, &present));
    MOE__TRY(moe__cfg_real(R, v, prefix, "mscale", 0.0, 0, 1e6, &c->rope_scaling.mscale, 1, &present));
    MOE__TRY(moe__cfg_real(R, v, prefix, "mscale_all_dim", 0.0, 0, 1e6, &c->rope_scaling.mscale_all_dim, 1, &present));
    return MOE_OK;
}

/* The config of a parsed config.json document. */
static moe_status moe__config_from_json(moe_ctx *ctx, const moe__json *jp, moe_config *cfg) {
    static const char *fn = "moe_config_parse";
    const int64_t DIM = (int64_t)1 << 24, BIG = (int64_t)1 << 31; /* dims; vocabulary and positions */
    const moe__json j = *jp;
    moe__cfg_reader R;
    moe_config c = moe__config_hf_defaults();
    int64_t v, w, iv;
    double x;
    int b, is_null, interleave = 1;
    char buf[64];
    if (j.t[0].type != MOE__J_OBJ) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: config.json must be an object", fn);
    R.ctx = ctx;
    R.j = &j;
    R.fn = fn;
    MOE__TRY(moe__cfg_no_dup(&R, 0, "config.json"));
#define MOE__INT(f, lo, hi) MOE__TRY(moe__cfg_int(&R, 0, "", #f, lo, hi, &c.f, 0, NULL));
    MOE__INT(vocab_size, 1, BIG - 1) MOE__INT(hidden_size, 1, DIM) MOE__INT(intermediate_size, 1, DIM)
    MOE__INT(moe_intermediate_size, 1, DIM) MOE__INT(num_hidden_layers, 1, 65536) MOE__INT(first_k_dense_replace, 0, 65536)
    MOE__INT(num_attention_heads, 1, DIM) MOE__INT(kv_lora_rank, 1, DIM) MOE__INT(qk_nope_head_dim, 1, DIM)
    MOE__INT(qk_rope_head_dim, 2, DIM) MOE__INT(v_head_dim, 1, DIM) MOE__INT(n_routed_experts, 1, MOE__MAX_EXPERTS)
    MOE__INT(n_shared_experts, 0, MOE__MAX_EXPERTS) MOE__INT(num_experts_per_tok, 1, MOE__MAX_EXPERTS)
    MOE__INT(n_group, 1, MOE__MAX_EXPERTS) MOE__INT(topk_group, 1, MOE__MAX_EXPERTS) MOE__INT(num_nextn_predict_layers, 0, 4)
    MOE__INT(max_position_embeddings, 1, DIM)
#undef MOE__INT
    /* transformers 5 names num_nextn_predict_layers num_mtp_layers (an alias of the same field) */
    iv = c.num_nextn_predict_layers;
    MOE__TRY(moe__cfg_int(&R, 0, "", "num_mtp_layers", 0, 4, &iv, 0, NULL));
    if (moe__json_get(&j, 0, "num_mtp_layers") >= 0 && moe__json_get(&j, 0, "num_nextn_predict_layers") >= 0 && iv != c.num_nextn_predict_layers)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: num_mtp_layers (%lld) and num_nextn_predict_layers (%lld) disagree", fn, (long long)iv,
                         (long long)c.num_nextn_predict_layers);
    c.num_nextn_predict_layers = iv;
    MOE__TRY(moe__cfg_real(&R, 0, "", "routed_scaling_factor", 0.0, 1, 1e6, &c.routed_scaling_factor, 0, NULL));
    MOE__TRY(moe__cfg_real(&R, 0, "", "rope_theta", 1.0, 1, DBL_MAX, &c.rope_theta, 0, NULL));
    MOE__TRY(moe__cfg_real(&R, 0, "", "rms_norm_eps", 0.0, 1, 1.0, &c.rms_norm_eps, 0, NULL));
    MOE__TRY(moe__cfg_real(&R, 0, "", "initializer_range", 0.0, 1, 1e6, &c.initializer_range, 0, NULL));
    MOE__TRY(moe__cfg_bool(&R, 0, "norm_topk_prob", &c.norm_topk_prob));
    MOE__TRY(moe__cfg_bool(&R, 0, "tie_word_embeddings", &c.tie_word_embeddings));
    MOE__TRY(moe__cfg_bool(&R, 0, "rope_interleave", &interleave));
    c.rope_layout = interleave ? MOE_ROPE_PAIRS : MOE_ROPE_HALVES;
    b = 0;
    MOE__TRY(moe__cfg_bool(&R, 0, "attention_bias", &b));
    if (b) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: \"attention_bias\": true is not supported (MLA without biases)", fn);
    b = 0;
    MOE__TRY(moe__cfg_bool(&R, 0, "mlp_bias", &b));
    if (b) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: \"mlp_bias\": true is not supported", fn);
    x = 0;
    MOE__TRY(moe__cfg_real(&R, 0, "", "attention_dropout", 0.0, 0, 1.0, &x, 1, NULL));
    if (x != 0) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: \"attention_dropout\" = %g is not supported (no dropout in moe.h)", fn, x);
    iv = 1;
    MOE__TRY(moe__cfg_int(&R, 0, "", "moe_layer_freq", 1, 65536, &iv, 0, NULL));
    if (iv != 1) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: \"moe_layer_freq\" = %lld is not supported (every layer from "
                                  "first_k_dense_replace on is MoE)", fn, (long long)iv);
    MOE__TRY(moe__cfg_real(&R, 0, "", "partial_rotary_factor", 1.0, 0, 1.0, &x, 0, NULL));
    /* num_key_value_heads: MLA has one latent per token; transformers repeats keys when it differs */
    iv = c.num_attention_heads;
    MOE__TRY(moe__cfg_int(&R, 0, "", "num_key_value_heads", 1, DIM, &iv, 1, &is_null));
    if (iv != c.num_attention_heads)
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: num_key_value_heads (%lld) must equal num_attention_heads (%lld) in MLA", fn,
                         (long long)iv, (long long)c.num_attention_heads);
    MOE__TRY(moe__cfg_int(&R, 0, "", "q_lora_rank", 1, DIM, &c.q_lora_rank, 1, &is_null));
    if (is_null) c.q_lora_rank = 0;
    if ((v = moe__json_get(&j, 0, "scoring_func")) >= 0) {
        if (!moe__json_str(&j, v, buf, sizeof buf)) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: \"scoring_func\" must be a string", fn);
        if (strcmp(buf, "sigmoid") == 0) c.scoring_func = MOE_SCORING_SIGMOID;
        else if (strcmp(buf, "softmax") == 0) c.scoring_func = MOE_SCORING_SOFTMAX;
        else return moe__fail(ctx, MOE_ERR_CONFIG, "%s: unknown scoring_func \"%s\" (sigmoid or softmax)", fn, buf);
    }
    if ((v = moe__json_get(&j, 0, "topk_method")) >= 0) {
        if (!moe__json_str(&j, v, buf, sizeof buf)) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: \"topk_method\" must be a string", fn);
        if (strcmp(buf, "noaux_tc") == 0) c.topk_method = MOE_TOPK_NOAUX_TC;
        else if (strcmp(buf, "greedy") == 0) c.topk_method = MOE_TOPK_GREEDY;
        else if (strcmp(buf, "group_limited_greedy") == 0) c.topk_method = MOE_TOPK_GROUP_LIMITED_GREEDY;
        else return moe__fail(ctx, MOE_ERR_CONFIG, "%s: unknown topk_method \"%s\"", fn, buf);
    }
    if ((v = moe__json_get(&j, 0, "hidden_act")) >= 0 && (!moe__json_str(&j, v, buf, sizeof buf) || strcmp(buf, "silu") != 0))
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: only hidden_act \"silu\" is supported", fn);
    /* head_dim and qk_head_dim are derived: transformers' DeepseekV3Config overwrites them with
       qk_rope_head_dim and qk_nope_head_dim + qk_rope_head_dim whatever the file says. */
    /* RoPE: the hub's "rope_theta" + "rope_scaling", or transformers 5's "rope_parameters" */
    v = moe__json_get(&j, 0, "rope_parameters");
    w = moe__json_get(&j, 0, "rope_scaling");
    if (v >= 0 && j.t[v].type == MOE__J_NULL) v = -1;
    if (w >= 0 && j.t[w].type == MOE__J_NULL) w = -1;
    if (v >= 0 && w >= 0) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: both \"rope_parameters\" and \"rope_scaling\" are given", fn);
    if (v >= 0) MOE__TRY(moe__cfg_rope(&R, v, "rope_parameters", &c));
    if (w >= 0) MOE__TRY(moe__cfg_rope(&R, w, "rope_scaling", &c));
    MOE__TRY(moe_config_validate(ctx, &c));
    *cfg = c;
    return MOE_OK;
}

MOE_API moe_status moe_config_parse(moe_ctx *ctx, const char *text, size_t len, moe_config *cfg) {
    moe__json j;
    MOE__CHECK_CTX(ctx);
    if (!text || !cfg) return moe__fail(ctx, MOE_ERR_ARG, "moe_config_parse: NULL text or config");
    MOE__TRY(moe__json_parse(ctx, "moe_config_parse", text, (int64_t)len, &j));
    return moe__config_from_json(ctx, &j, cfg);
}

MOE_API moe_status moe_config_load(moe_ctx *ctx, const char *path, moe_config *cfg) {
    unsigned char *buf;
    size_t len;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    MOE__TRY(moe__read_file(ctx, "moe_config_load", path, (size_t)1 << 24, &buf, &len));
    st = moe_config_parse(ctx, (const char *)buf, len, cfg);
    MOE_FREE(buf);
    return st;
}

/* The config as config.json text (legacy rope_scaling form, as the hub files use). */
static int moe__config_json(const moe_config *c, char *buf, size_t size) {
    static const char *topk[] = {"noaux_tc", "greedy", "group_limited_greedy"};
    char rope[512], qr[32];
    if (c->rope_scaling.factor != 0) /* factor 1 is a no-op, but written as read */
        snprintf(rope, sizeof rope,
                 "{\"type\": \"yarn\", \"factor\": %.17g, \"original_max_position_embeddings\": %lld, \"beta_fast\": %.17g, "
                 "\"beta_slow\": %.17g, \"mscale\": %.17g, \"mscale_all_dim\": %.17g}",
                 c->rope_scaling.factor, (long long)c->rope_scaling.original_max_pos, c->rope_scaling.beta_fast,
                 c->rope_scaling.beta_slow, c->rope_scaling.mscale, c->rope_scaling.mscale_all_dim);
    else
        snprintf(rope, sizeof rope, "null");
    if (c->q_lora_rank > 0) snprintf(qr, sizeof qr, "%lld", (long long)c->q_lora_rank);
    else snprintf(qr, sizeof qr, "null");
    return snprintf(buf, size,
        "{\n  \"architectures\": [\"DeepseekV3ForCausalLM\"],\n  \"model_type\": \"deepseek_v3\",\n"
        "  \"vocab_size\": %lld,\n  \"hidden_size\": %lld,\n  \"intermediate_size\": %lld,\n  \"moe_intermediate_size\": %lld,\n"
        "  \"num_hidden_layers\": %lld,\n  \"first_k_dense_replace\": %lld,\n  \"moe_layer_freq\": 1,\n"
        "  \"num_attention_heads\": %lld,\n  \"num_key_value_heads\": %lld,\n  \"q_lora_rank\": %s,\n  \"kv_lora_rank\": %lld,\n"
        "  \"qk_nope_head_dim\": %lld,\n  \"qk_rope_head_dim\": %lld,\n  \"v_head_dim\": %lld,\n"
        "  \"n_routed_experts\": %lld,\n  \"n_shared_experts\": %lld,\n  \"num_experts_per_tok\": %lld,\n"
        "  \"n_group\": %lld,\n  \"topk_group\": %lld,\n  \"topk_method\": \"%s\",\n  \"scoring_func\": \"%s\",\n"
        "  \"norm_topk_prob\": %s,\n  \"routed_scaling_factor\": %.17g,\n  \"num_nextn_predict_layers\": %lld,\n"
        "  \"max_position_embeddings\": %lld,\n  \"rope_theta\": %.17g,\n  \"rope_scaling\": %s,\n  \"rope_interleave\": %s,\n"
        "  \"rms_norm_eps\": %.17g,\n  \"hidden_act\": \"silu\",\n  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n"
        "  \"tie_word_embeddings\": %s,\n  \"initializer_range\": %.17g,\n  \"bos_token_id\": 0,\n  \"eos_token_id\": 1,\n"
        "  \"torch_dtype\": \"float32\"\n}\n",
        (long long)c->vocab_size, (long long)c->hidden_size, (long long)c->intermediate_size, (long long)c->moe_intermediate_size,
        (long long)c->num_hidden_layers, (long long)c->first_k_dense_replace, (long long)c->num_attention_heads,
        (long long)c->num_attention_heads, qr, (long long)c->kv_lora_rank, (long long)c->qk_nope_head_dim,
        (long long)c->qk_rope_head_dim, (long long)c->v_head_dim, (long long)c->n_routed_experts, (long long)c->n_shared_experts,
        (long long)c->num_experts_per_tok, (long long)c->n_group, (long long)c->topk_group, topk[c->topk_method],
        c->scoring_func == MOE_SCORING_SOFTMAX ? "softmax" : "sigmoid", c->norm_topk_prob ? "true" : "false",
        c->routed_scaling_factor, (long long)c->num_nextn_predict_layers, (long long)c->max_position_embeddings,
        c->rope_theta, rope, c->rope_layout == MOE_ROPE_HALVES ? "false" : "true", c->rms_norm_eps,
        c->tie_word_embeddings ? "true" : "false", c->initializer_range);
}

MOE_API moe_status moe_config_save(moe_ctx *ctx, const moe_config *cfg, const char *path) {
    char buf[8192];
    moe_config c;
    int n;
    MOE__CHECK_CTX(ctx);
    if (!cfg) return moe__fail(ctx, MOE_ERR_ARG, "moe_config_save: config is NULL");
    moe_config_resolve(cfg, &c);
    MOE__TRY(moe_config_validate(ctx, &c));
    n = moe__config_json(&c, buf, sizeof buf);
    return moe__write_atomic(ctx, "moe_config_save", path, buf, (size_t)n);
}

/* ---- token data ---- */

#define MOE__SHARD_MAGIC 20240520

MOE_API moe_status moe_data_load(moe_ctx *ctx, const char *path, double val_fraction, moe_dataset **out) {
    static const char *fn = "moe_data_load";
    unsigned char *buf;
    size_t len, i;
    moe_dataset *d;
    int32_t hdr[3] = {0, 0, 0};
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!(val_fraction > 0 && val_fraction < 1)) return moe__fail(ctx, MOE_ERR_ARG, "%s: val_fraction must be in (0, 1)", fn);
    MOE__TRY(moe__read_file(ctx, fn, path, (size_t)1 << 34, &buf, &len));
    d = (moe_dataset *)moe__heap_calloc(ctx, sizeof *d);
    if (!d) {
        MOE_FREE(buf);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    if (len >= 1024) memcpy(hdr, buf, sizeof hdr);
    if (hdr[0] == MOE__SHARD_MAGIC) { /* llm.c shard: 256 int32 header, then uint16 tokens */
        if (hdr[1] != 1 || hdr[2] < 0 || len != 1024 + 2 * (size_t)hdr[2]) {
            MOE_FREE(buf);
            MOE_FREE(d);
            return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has the llm.c shard magic but version %d / %d tokens do not match its %zu bytes",
                             fn, path, hdr[1], hdr[2], len);
        }
        d->n_tokens = hdr[2];
        d->tokens = (int32_t *)moe__heap_alloc(ctx, sizeof(int32_t) * (size_t)(d->n_tokens + 1));
        for (i = 0; d->tokens && i < (size_t)d->n_tokens; i++) {
            d->tokens[i] = (int32_t)(buf[1024 + 2 * i] | (buf[1024 + 2 * i + 1] << 8));
            if (d->tokens[i] + 1 > d->vocab) d->vocab = d->tokens[i] + 1;
        }
    } else {
        d->n_tokens = (int64_t)len;
        d->vocab = 256;
        d->tokens = (int32_t *)moe__heap_alloc(ctx, sizeof(int32_t) * (len + 1));
        for (i = 0; d->tokens && i < len; i++) d->tokens[i] = buf[i];
    }
    MOE_FREE(buf);
    if (!d->tokens) {
        MOE_FREE(d);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for tokens", fn);
    }
    d->n_train = (int64_t)floor((1.0 - val_fraction) * (double)d->n_tokens);
    if (d->n_train < 2 || d->n_tokens - d->n_train < 2) {
        int64_t n = d->n_tokens;
        moe_data_free(ctx, d);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has only %lld tokens, too few to split", fn, path, (long long)n);
    }
    *out = d;
    return MOE_OK;
}

MOE_API void moe_data_free(moe_ctx *ctx, moe_dataset *d) {
    (void)ctx;
    if (!d) return;
    MOE_FREE(d->tokens);
    MOE_FREE(d);
}

MOE_API moe_status moe_data_batch(moe_ctx *ctx, const moe_dataset *d, int val, uint64_t seed, int64_t index, int64_t B,
                                  int64_t T, int32_t *out) {
    static const char *fn = "moe_data_batch";
    int64_t b, lo, n;
    MOE__CHECK_CTX(ctx);
    if (!d || !out) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL data or out", fn);
    if (B < 1 || T < 1 || index < 0) return moe__fail(ctx, MOE_ERR_ARG, "%s: need B, T >= 1 and index >= 0", fn);
    lo = val ? d->n_train : 0;
    n = (val ? d->n_tokens : d->n_train) - lo;
    if (n < T + 1)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the %s part has %lld tokens, fewer than seq+1 = %lld", fn, val ? "validation" : "training",
                         (long long)n, (long long)(T + 1));
    for (b = 0; b < B; b++) {
        int64_t start;
        if (val) start = ((index * B + b) * T) % (n - T);
        else start = (int64_t)(moe_rng_hash(moe_rng_hash(seed, 0x64617461ull), (uint64_t)(index * B + b)) % (uint64_t)(n - T));
        memcpy(out + b * (T + 1), d->tokens + lo + start, (size_t)(T + 1) * sizeof(int32_t));
    }
    return MOE_OK;
}

/* io reads and writes a model's tensors (and an optimizer's moments) in host memory. A
   device model is staged for the call: its slabs and moments are copied down, its entries
   and the optimizer pointed at the copies; moe__io_unstage copies them back up after a load
   (upload = 1) and restores the device pointers. A host model is read and written in place. */
typedef struct moe__io_stage {
    moe_model *m;
    moe_adamw *o;
    unsigned char *params, *buffers; /* host copies of the slabs (NULL: nothing staged) */
    void *om, *ov, *dev_om, *dev_ov; /* the moments' host copies and device slabs */
    void **dev;                      /* [n_entries] each entry's device data */
    size_t moment_bytes;
    int repointed;                   /* the entries and the optimizer point at the copies */
} moe__io_stage;

/* Copies up (upload) and restores; returns st, or the copy's failure. */
static moe_status moe__io_unstage(moe_ctx *ctx, moe__io_stage *S, int upload, moe_status st) {
    const moe_backend *be = S->m ? S->m->be : NULL;
    int64_t i;
    if (S->repointed) {
        for (i = 0; i < S->m->n_entries; i++) S->m->entries[i].t->data = S->dev[i];
        if (S->o) {
            S->o->m = S->dev_om;
            S->o->v = S->dev_ov;
        }
    }
    if (upload && st == MOE_OK && S->repointed) { /* (H2D copies return once the source is staged: freeing it is safe) */
        st = be->copy(ctx, S->m->params->data, S->params, (size_t)S->m->n_params * sizeof(moe_real), MOE__H2D);
        if (!st && S->m->n_buffers)
            st = be->copy(ctx, S->m->buffers->data, S->buffers, (size_t)S->m->n_buffers * sizeof(moe_real), MOE__H2D);
        if (!st && S->om) st = be->copy(ctx, S->dev_om, S->om, S->moment_bytes, MOE__H2D);
        if (!st && S->om) st = be->copy(ctx, S->dev_ov, S->ov, S->moment_bytes, MOE__H2D);
    }
    MOE_FREE(S->params);
    MOE_FREE(S->buffers);
    MOE_FREE(S->om);
    MOE_FREE(S->ov);
    MOE_FREE(S->dev);
    memset(S, 0, sizeof *S);
    return st;
}
/* Tests set this to send host models through the staging a GPU model takes (host copies,
   repointed entries, copies back), so that path runs where there is no GPU. */
static int moe__io_stage_always;

static moe_status moe__io_stage_model(moe_ctx *ctx, const char *fn, const moe_model *cm, const moe_adamw *co, moe__io_stage *S) {
    moe_model *m = (moe_model *)(uintptr_t)cm; /* the pointers change for the call only */
    moe_adamw *o = (moe_adamw *)(uintptr_t)co;
    const moe_backend *be = m->be;
    moe_status st = MOE_OK;
    int64_t i;
    memset(S, 0, sizeof *S);
    S->m = m;
    S->o = o;
    if (be->device == MOE_DEVICE_CPU && !moe__io_stage_always) return MOE_OK;
    if (be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "%s: the model lives on a GPU: pass a context on its device", fn);
    if (o && o->comm) return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: a sharded optimizer of a GPU model", fn);
    S->params = (unsigned char *)moe__heap_alloc(ctx, (size_t)m->n_params * sizeof(moe_real) + 1);
    S->buffers = (unsigned char *)moe__heap_alloc(ctx, (size_t)m->n_buffers * sizeof(moe_real) + 1);
    S->dev = (void **)moe__heap_alloc(ctx, (size_t)m->n_entries * sizeof(void *) + 1);
    if (o) {
        S->moment_bytes = (size_t)(o->hi - o->lo) * (o->cfg.moment_dtype == MOE_BF16 ? 2 : 4);
        S->om = moe__heap_alloc(ctx, S->moment_bytes + 1);
        S->ov = moe__heap_alloc(ctx, S->moment_bytes + 1);
    }
    if (!S->params || !S->buffers || !S->dev || (o && (!S->om || !S->ov))) {
        st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of host memory to stage the GPU model", fn);
    } else {
        st = be->copy(ctx, S->params, m->params->data, (size_t)m->n_params * sizeof(moe_real), MOE__D2H);
        if (!st && m->n_buffers) st = be->copy(ctx, S->buffers, m->buffers->data, (size_t)m->n_buffers * sizeof(moe_real), MOE__D2H);
        if (!st && o) st = be->copy(ctx, S->om, o->m, S->moment_bytes, MOE__D2H);
        if (!st && o) st = be->copy(ctx, S->ov, o->v, S->moment_bytes, MOE__D2H);
    }
    if (st) return moe__io_unstage(ctx, S, 0, st);
    for (i = 0; i < m->n_entries; i++) {
        moe__entry *e = &m->entries[i];
        S->dev[i] = e->t->data;
        e->t->data = (e->is_param ? S->params : S->buffers) + (size_t)e->offset * sizeof(moe_real);
    }
    if (o) {
        S->dev_om = o->m;
        S->dev_ov = o->v;
        o->m = S->om;
        o->v = S->ov;
    }
    S->repointed = 1;
    return MOE_OK;
}

/* Entry i's AdamW moment in a moment slab (f32 or bf16). */
/* Entry i's moment in a whole moment slab. */
static void *moe__adamw_moment(const moe_adamw *o, void *slab, int64_t i) {
    return (unsigned char *)slab + (size_t)o->model->entries[i].offset * (o->cfg.moment_dtype == MOE_BF16 ? 2 : 4);
}
/* Entry i's moment values `data` (as a checkpoint stores them) into the optimizer's slab
   `held` of values [lo, hi): the part inside this rank's share. */
static void moe__adamw_moment_put(const moe_adamw *o, void *held, int64_t i, const void *data) {
    const moe__entry *e = &o->model->entries[i];
    size_t es = o->cfg.moment_dtype == MOE_BF16 ? 2 : 4;
    int64_t a = e->offset > o->lo ? e->offset : o->lo, b = e->offset + e->t->numel < o->hi ? e->offset + e->t->numel : o->hi;
    if (a < b) memcpy((unsigned char *)held + es * (size_t)(a - o->lo), (const unsigned char *)data + es * (size_t)(a - e->offset), es * (size_t)(b - a));
}

/* ---- checkpoints ----
   "MOECKPT1", u32 version, u32 0, u64 payload bytes, payload, u64 FNV-1a of the payload.
   Payload: u32 + config.json text; state (i64 step, u64 seed, i64 data index, f64 tokens,
   i64 optimizer steps, i32 moment dtype or -1 without optimizer; version 2 adds i64 total
   steps, i64 skipped steps, u32 n + n f64 user values); u32 tensor count; per tensor: u16 +
   name, u8 kind (0 value, 1 first moment, 2 second moment), u8 dtype (0 f32, 1 bf16), u8 ndim,
   i64 dims, little-endian data. Version 1 files still load (the version 2 fields read as 0). */

#define MOE__CKPT_MAGIC "MOECKPT1"
#define MOE__CKPT_VERSION 2u

typedef struct moe__buf {
    unsigned char *p;
    size_t len, cap;
    int oom;
} moe__buf;

static void moe__buf_put(moe__buf *b, const void *src, size_t n) {
    if (b->oom) return;
    if (n > SIZE_MAX / 2 - b->len) { b->oom = 1; return; }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        unsigned char *q;
        while (cap < b->len + n) cap *= 2;
        q = (unsigned char *)MOE_REALLOC(b->p, cap);
        if (!q) { b->oom = 1; return; }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}
static void moe__buf_u64(moe__buf *b, uint64_t v) {
    unsigned char x[8];
    moe__le_put64(x, v);
    moe__buf_put(b, x, 8);
}
static void moe__buf_u32(moe__buf *b, uint32_t v) {
    unsigned char x[4];
    moe__le_put32(x, v);
    moe__buf_put(b, x, 4);
}
static void moe__buf_f64(moe__buf *b, double v) {
    uint64_t u;
    memcpy(&u, &v, 8);
    moe__buf_u64(b, u);
}

/* One tensor record with t's name and shape: t's values as f32, or (moments) `raw`, the bytes
   of numel f32 or bf16 values. */
static void moe__ckpt_put_tensor(moe__buf *b, const char *name, int kind, const moe_tensor *t, const void *raw, int bf16) {
    unsigned char hdr[3];
    int64_t i;
    int d;
    uint16_t nl = (uint16_t)strlen(name);
    moe__buf_put(b, &nl, 2);
    moe__buf_put(b, name, nl);
    hdr[0] = (unsigned char)kind;
    hdr[1] = bf16 ? 1 : 0;
    hdr[2] = (unsigned char)t->ndim;
    moe__buf_put(b, hdr, 3);
    for (d = 0; d < t->ndim; d++) moe__buf_u64(b, (uint64_t)t->shape[d]);
    if (raw) {
        moe__buf_put(b, raw, (size_t)t->numel * (bf16 ? 2 : 4));
    } else {
        for (i = 0; i < t->numel; i++) {
            float f = (float)MOE__F32(t)[i];
            uint32_t u;
            memcpy(&u, &f, 4);
            moe__buf_u32(b, u);
        }
    }
}

/* The checkpoint of model, optimizer (moments in the whole slabs mm, vv) and state. */
static moe_status moe__ckpt_write(moe_ctx *ctx, const char *path, const moe_model *m, const moe_adamw *o, const moe_train_state *st,
                                  void *mm, void *vv) {
    static const char *fn = "moe_ckpt_save";
    moe__buf b;
    char cfg[8192];
    int64_t i, n = 0;
    uint32_t cl;
    moe_status r;
    memset(&b, 0, sizeof b);
    moe__buf_put(&b, MOE__CKPT_MAGIC, 8);
    moe__buf_u32(&b, MOE__CKPT_VERSION);
    moe__buf_u32(&b, 0);
    moe__buf_u64(&b, 0); /* payload length, patched below */
    cl = (uint32_t)moe__config_json(&m->cfg, cfg, sizeof cfg);
    moe__buf_u32(&b, cl);
    moe__buf_put(&b, cfg, cl);
    moe__buf_u64(&b, (uint64_t)st->step);
    moe__buf_u64(&b, st->seed);
    moe__buf_u64(&b, (uint64_t)st->data_index);
    moe__buf_f64(&b, st->tokens_seen);
    moe__buf_u64(&b, (uint64_t)(o ? o->step : 0));
    moe__buf_u32(&b, o ? (uint32_t)(o->cfg.moment_dtype == MOE_BF16) : 0xFFFFFFFFu);
    moe__buf_u64(&b, (uint64_t)st->total_steps);
    moe__buf_u64(&b, (uint64_t)st->skipped);
    moe__buf_u32(&b, (uint32_t)st->n_user);
    for (i = 0; i < st->n_user; i++) moe__buf_f64(&b, st->user[i]);
    for (i = 0; i < m->n_entries; i++) n += 1 + (o && m->entries[i].is_param ? 2 : 0);
    moe__buf_u32(&b, (uint32_t)n);
    for (i = 0; i < m->n_entries; i++) {
        const moe__entry *e = &m->entries[i];
        moe__ckpt_put_tensor(&b, e->name, 0, e->t, NULL, 0);
        if (o && e->is_param) {
            int bf16 = o->cfg.moment_dtype == MOE_BF16;
            moe__ckpt_put_tensor(&b, e->name, 1, e->t, moe__adamw_moment(o, mm, i), bf16);
            moe__ckpt_put_tensor(&b, e->name, 2, e->t, moe__adamw_moment(o, vv, i), bf16);
        }
    }
    if (b.oom) {
        MOE_FREE(b.p);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory building the checkpoint", fn);
    }
    {
        uint64_t payload = (uint64_t)(b.len - 24), h = moe__fnv1a(MOE__FNV_SEED, b.p + 24, b.len - 24);
        int k;
        for (k = 0; k < 8; k++) b.p[16 + k] = (unsigned char)(payload >> (8 * k));
        moe__buf_u64(&b, h);
    }
    r = b.oom ? moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn) : moe__write_atomic(ctx, fn, path, b.p, b.len);
    MOE_FREE(b.p);
    return r;
}

MOE_API moe_status moe_ckpt_save(moe_ctx *ctx, const char *path, const moe_model *m, const moe_adamw *o,
                                 const moe_train_state *st) {
    static const char *fn = "moe_ckpt_save";
    void *mm, *vv;
    moe__io_stage S;
    MOE__CHECK_CTX(ctx);
    if (!path || !m || !st) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL path, model or state", fn);
    if (o && o->model != m) return moe__fail(ctx, MOE_ERR_ARG, "%s: the optimizer belongs to another model", fn);
    if (st->n_user < 0 || st->n_user > MOE_TRAIN_USER_MAX || st->step < 0 || st->data_index < 0 || st->total_steps < 0 ||
        st->skipped < 0)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: state out of range (step %lld, data index %lld, total steps %lld, skipped %lld, "
                         "n_user %lld of at most %d)", fn, (long long)st->step, (long long)st->data_index, (long long)st->total_steps,
                         (long long)st->skipped, (long long)st->n_user, MOE_TRAIN_USER_MAX);
    if (o && o->comm) { /* ZeRO-1: every rank's moments to every rank, rank 0 writes, its status to all */
        int64_t status;
        MOE__TRY(moe__zero_gather_moments(ctx, o, &mm, &vv));
        status = moe_comm_rank(o->comm) == 0 ? (int64_t)moe__ckpt_write(ctx, path, m, o, st, mm, vv) : 0;
        MOE_FREE(mm);
        MOE_FREE(vv);
        MOE__TRY(moe_comm_bcast(ctx, o->comm, &status, 1, MOE_COMM_I64, 0));
        if (status != MOE_OK && moe_comm_rank(o->comm) != 0)
            return moe__fail(ctx, (moe_status)status, "%s: rank 0 could not write '%s'", fn, path);
        return (moe_status)status;
    }
    MOE__TRY(moe__io_stage_model(ctx, fn, m, o, &S));
    return moe__io_unstage(ctx, &S, 0, moe__ckpt_write(ctx, path, m, o, st, o ? o->m : NULL, o ? o->v : NULL));
}

/* A bounds-checked reader over a byte range. */
typedef struct moe__rd {
    const unsigned char *p;
    size_t len, at;
    int bad;
} moe__rd;
static const unsigned char *moe__rd_take(moe__rd *r, size_t n) {
    const unsigned char *p;
    if (r->bad || n > r->len - r->at) { r->bad = 1; return NULL; }
    p = r->p + r->at;
    r->at += n;
    return p;
}
static uint64_t moe__rd_u64(moe__rd *r) {
    const unsigned char *p = moe__rd_take(r, 8);
    return p ? moe__le_get64(p) : 0;
}
static uint32_t moe__rd_u32(moe__rd *r) {
    const unsigned char *p = moe__rd_take(r, 4);
    return p ? moe__le_get32(p) : 0;
}

/* Open and verify a checkpoint file: magic, version, length, checksum. On success *rd
   spans the payload and *buf must be freed by the caller. */
static moe_status moe__ckpt_open(moe_ctx *ctx, const char *fn, const char *path, unsigned char **buf, moe__rd *rd,
                                 uint32_t *version) {
    size_t len;
    uint64_t payload, sum;
    uint32_t v;
    MOE__TRY(moe__read_file(ctx, fn, path, (size_t)1 << 36, buf, &len));
    if (len < 32 || memcmp(*buf, MOE__CKPT_MAGIC, 8) != 0) {
        MOE_FREE(*buf);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is not a moe.h checkpoint (bad magic or too short)", fn, path);
    }
    memset(rd, 0, sizeof *rd);
    rd->p = *buf;
    rd->len = len;
    rd->at = 8;
    v = moe__rd_u32(rd);
    if (v < 1 || v > MOE__CKPT_VERSION) {
        MOE_FREE(*buf);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has checkpoint version %u; this moe.h reads 1 to %u", fn, path, v,
                         MOE__CKPT_VERSION);
    }
    if (version) *version = v;
    moe__rd_u32(rd);
    payload = moe__rd_u64(rd);
    if (payload != len - 32) {
        MOE_FREE(*buf);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is truncated or padded: header says %llu payload bytes, file has %zu",
                         fn, path, (unsigned long long)payload, len < 32 ? (size_t)0 : len - 32);
    }
    rd->at = len - 8;
    sum = moe__rd_u64(rd);
    if (sum != moe__fnv1a(MOE__FNV_SEED, *buf + 24, len - 32)) {
        MOE_FREE(*buf);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' fails its checksum (corrupted)", fn, path);
    }
    rd->at = 24;
    rd->len = len - 8;
    return MOE_OK;
}

MOE_API moe_status moe_ckpt_config(moe_ctx *ctx, const char *path, moe_config *cfg) {
    static const char *fn = "moe_ckpt_config";
    unsigned char *buf;
    moe__rd rd;
    uint32_t cl;
    const unsigned char *p;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!cfg) return moe__fail(ctx, MOE_ERR_ARG, "%s: config is NULL", fn);
    MOE__TRY(moe__ckpt_open(ctx, fn, path, &buf, &rd, NULL));
    cl = moe__rd_u32(&rd);
    p = moe__rd_take(&rd, cl);
    st = p ? moe_config_parse(ctx, (const char *)p, cl, cfg) : moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': config truncated", fn, path);
    MOE_FREE(buf);
    return st;
}

/* "[a, b, c]" into buf. */
static const char *moe__ckpt_shape_str(char *buf, size_t cap, int ndim, const uint64_t *dims) {
    size_t at = 0;
    int d;
    buf[0] = 0;
    for (d = 0; d < ndim && at < cap; d++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%llu", d ? ", " : "[", (unsigned long long)dims[d]);
    if (at < cap) snprintf(buf + at, cap - at, ndim ? "]" : "[]");
    return buf;
}

static moe_status moe__ckpt_load_host(moe_ctx *ctx, const char *path, moe_model *m, moe_adamw *o, moe_train_state *st) {
    static const char *fn = "moe_ckpt_load";
    static const char *const kinds[3] = {"value", "first moment", "second moment"};
    unsigned char *buf, *seen = NULL;
    moe__rd rd;
    uint32_t cl, n, pass, k, mdt, version = 1, n_user = 0;
    const unsigned char *p;
    char want[8192];
    moe_train_state *s = NULL;
    int64_t opt_steps, i;
    size_t tensors_at;
    moe_status r = MOE_OK;
    MOE__CHECK_CTX(ctx);
    if (!m) return moe__fail(ctx, MOE_ERR_ARG, "%s: model is NULL", fn);
    if (o && o->model != m) return moe__fail(ctx, MOE_ERR_ARG, "%s: the optimizer belongs to another model", fn);
    MOE__TRY(moe__ckpt_open(ctx, fn, path, &buf, &rd, &version));
    s = (moe_train_state *)moe__heap_calloc(ctx, sizeof *s);
    if (!s) {
        MOE_FREE(buf);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    cl = moe__rd_u32(&rd);
    p = moe__rd_take(&rd, cl);
    moe__config_json(&m->cfg, want, sizeof want);
    if (!p || cl != strlen(want) || memcmp(p, want, cl) != 0) {
        MOE_FREE(buf);
        MOE_FREE(s);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' was written for a different model config", fn, path);
    }
    s->step = (int64_t)moe__rd_u64(&rd);
    s->seed = moe__rd_u64(&rd);
    s->data_index = (int64_t)moe__rd_u64(&rd);
    {
        uint64_t u = moe__rd_u64(&rd);
        memcpy(&s->tokens_seen, &u, 8);
    }
    opt_steps = (int64_t)moe__rd_u64(&rd);
    mdt = moe__rd_u32(&rd);
    if (version >= 2) {
        s->total_steps = (int64_t)moe__rd_u64(&rd);
        s->skipped = (int64_t)moe__rd_u64(&rd);
        n_user = moe__rd_u32(&rd);
        for (k = 0; k < n_user && k < MOE_TRAIN_USER_MAX && !rd.bad; k++) {
            uint64_t u = moe__rd_u64(&rd);
            memcpy(&s->user[k], &u, 8);
        }
        s->n_user = n_user;
    }
    n = moe__rd_u32(&rd);
    /* every field is checked before anything is copied: nothing changes unless all is valid */
    if (n_user > MOE_TRAIN_USER_MAX)
        r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': %u user state values, at most %d", fn, path, n_user, MOE_TRAIN_USER_MAX);
    else if (rd.bad) r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': state truncated", fn, path);
    else if (s->step < 0 || s->data_index < 0 || opt_steps < 0 || s->total_steps < 0 || s->skipped < 0)
        r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': negative step (%lld), data index (%lld), optimizer steps (%lld), total steps "
                      "(%lld) or skipped steps (%lld)", fn, path, (long long)s->step, (long long)s->data_index, (long long)opt_steps,
                      (long long)s->total_steps, (long long)s->skipped);
    else if (!(s->tokens_seen >= 0) || !isfinite(s->tokens_seen))
        r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tokens seen is %g", fn, path, s->tokens_seen);
    else if (mdt > 1 && mdt != 0xFFFFFFFFu)
        r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': unknown moment dtype code %u (0 f32, 1 bf16, 0xFFFFFFFF none)", fn, path, mdt);
    else if (o && mdt != (uint32_t)(o->cfg.moment_dtype == MOE_BF16))
        r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' has %s optimizer moments, this optimizer wants %s", fn, path,
                      mdt == 0xFFFFFFFFu ? "no" : mdt ? "bf16" : "f32", moe_dtype_name(o->cfg.moment_dtype));
    if (r == MOE_OK && !(seen = (unsigned char *)moe__heap_calloc(ctx, (size_t)m->n_entries * 3)))
        r = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    tensors_at = rd.at;
    /* pass 0 checks every record against the model and the header; pass 1 copies */
    for (pass = 0; pass < 2 && r == MOE_OK; pass++) {
        rd.at = tensors_at;
        for (k = 0; k < n && r == MOE_OK; k++) {
            char name[MOE__NAME_MAX + 1], got[96], has[96];
            const unsigned char *hdr, *nm, *data, *nlp;
            uint64_t dims[MOE_MAX_DIMS];
            uint16_t nl;
            int64_t idx = -1, numel;
            int d, kind, dtype, ndim, match;
            moe_tensor *t;
            nlp = moe__rd_take(&rd, 2);
            nl = nlp ? (uint16_t)(nlp[0] | (nlp[1] << 8)) : 0;
            nm = moe__rd_take(&rd, nl);
            hdr = moe__rd_take(&rd, 3);
            if (!nm || !hdr || nl > MOE__NAME_MAX) { rd.bad = 1; break; }
            memcpy(name, nm, nl);
            name[nl] = 0;
            kind = hdr[0];
            dtype = hdr[1];
            ndim = hdr[2];
            for (i = 0; i < m->n_entries; i++)
                if (strcmp(m->entries[i].name, name) == 0) { idx = i; break; }
            if (idx < 0) { r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': unexpected tensor record '%s'", fn, path, name); break; }
            t = m->entries[idx].t;
            if (kind > 2) { r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': a record of '%s' has unknown kind %d", fn, path, name, kind); break; }
            if (kind == 0 && dtype != 0) {
                r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': the value of '%s' has dtype code %d; values are f32 (0)", fn, path, name, dtype);
                break;
            }
            if (kind > 0 && mdt == 0xFFFFFFFFu) {
                r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' announces no optimizer state but holds the %s of '%s'", fn, path, kinds[kind], name);
                break;
            }
            if (kind > 0 && !m->entries[idx].is_param) {
                r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' holds the %s of '%s', which is not a trained parameter", fn, path, kinds[kind], name);
                break;
            }
            if (kind > 0 && (uint32_t)dtype != mdt) {
                r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': the %s of '%s' is labelled %s (dtype code %d) but the header says %s moments",
                              fn, path, kinds[kind], name, dtype == 0 ? "f32" : dtype == 1 ? "bf16" : "unknown", dtype, mdt ? "bf16" : "f32");
                break;
            }
            if (ndim > MOE_MAX_DIMS) {
                r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': the %s of '%s' has a shape of %d dims in the file, at most %d allowed", fn,
                              path, kinds[kind], name, ndim, MOE_MAX_DIMS);
                break;
            }
            for (d = 0; d < ndim; d++) dims[d] = moe__rd_u64(&rd);
            if (rd.bad) break;
            match = ndim == t->ndim;
            for (d = 0; d < t->ndim; d++) match = match && dims[d] == (uint64_t)t->shape[d];
            if (!match) {
                uint64_t mine[MOE_MAX_DIMS];
                for (d = 0; d < t->ndim; d++) mine[d] = (uint64_t)t->shape[d];
                r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': the %s of '%s' has shape %s in the file, the model's is %s", fn, path,
                              kinds[kind], name, moe__ckpt_shape_str(got, sizeof got, ndim, dims),
                              moe__ckpt_shape_str(has, sizeof has, t->ndim, mine));
                break;
            }
            numel = t->numel;
            data = moe__rd_take(&rd, (size_t)numel * (dtype ? 2 : 4));
            if (!data) break;
            if (pass == 0) {
                if (seen[idx * 3 + kind]++) {
                    r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' stores the %s of '%s' twice", fn, path, kinds[kind], name);
                    break;
                }
                continue;
            }
            if (kind == 0) {
                for (i = 0; i < numel; i++) MOE__F32(t)[i] = (moe_real)moe__bits_f32(moe__le_get32(data + 4 * i));
            } else if (o) {
                /* the dtype was checked against the header and the header against o: sizes agree */
                moe__adamw_moment_put(o, kind == 1 ? o->m : o->v, idx, data);
            }
        }
        if (r != MOE_OK) break;
        if (rd.bad || k < n) {
            r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor records are truncated (%u of %u read)", fn, path, k, n);
        } else if (rd.at != rd.len) {
            r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': %zu bytes after the last of %u tensor records", fn, path, rd.len - rd.at, n);
        } else if (pass == 0) {
            for (i = 0; i < m->n_entries && r == MOE_OK; i++) {
                int kind, kinds_wanted = mdt != 0xFFFFFFFFu && m->entries[i].is_param ? 3 : 1;
                for (kind = 0; kind < kinds_wanted && r == MOE_OK; kind++)
                    if (!seen[i * 3 + kind])
                        r = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' misses the %s of '%s'%s", fn, path, kinds[kind], m->entries[i].name,
                                      kind ? (mdt ? " (it announces bf16 moments)" : " (it announces f32 moments)") : "");
            }
        }
    }
    MOE_FREE(seen);
    MOE_FREE(buf);
    if (r == MOE_OK) {
        if (o) o->step = opt_steps;
        if (st) *st = *s;
        moe_model_reset_loads(m);
    }
    MOE_FREE(s);
    return r;
}

MOE_API moe_status moe_ckpt_load(moe_ctx *ctx, const char *path, moe_model *m, moe_adamw *o, moe_train_state *st) {
    moe__io_stage S;
    MOE__CHECK_CTX(ctx);
    if (!m) return moe__fail(ctx, MOE_ERR_ARG, "moe_ckpt_load: model is NULL");
    if (o && o->model != m) return moe__fail(ctx, MOE_ERR_ARG, "moe_ckpt_load: the optimizer belongs to another model");
    MOE__TRY(moe__io_stage_model(ctx, "moe_ckpt_load", m, o, &S));
    return moe__io_unstage(ctx, &S, 1, moe__ckpt_load_host(ctx, path, m, o, st));
}

/* ---- a run's checkpoints in a directory ---- */

/* The step of DIR entry `name` when it is PREFIX-<digits>.bin, else -1. */
static int64_t moe__ckpt_step_of(const char *name, const char *prefix) {
    size_t pl = strlen(prefix);
    const char *q;
    int64_t step = 0;
    if (strncmp(name, prefix, pl) != 0 || name[pl] != '-' || !name[pl + 1]) return -1;
    for (q = name + pl + 1; *q >= '0' && *q <= '9'; q++) {
        if (step > (INT64_MAX - 9) / 10) return -1;
        step = step * 10 + (*q - '0');
    }
    return q > name + pl + 1 && strcmp(q, ".bin") == 0 ? step : -1;
}

static moe_status moe__ckpt_dir_args(moe_ctx *ctx, const char *fn, const char *dir, const char *prefix, int need_prefix) {
    if (!dir || !*dir || (need_prefix && (!prefix || !*prefix)))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL or empty directory or prefix", fn);
    if (prefix && strchr(prefix, '/')) return moe__fail(ctx, MOE_ERR_ARG, "%s: prefix '%s' contains '/'", fn, prefix);
    if (strlen(dir) + (prefix ? strlen(prefix) : 0) + 64 > 4096) return moe__fail(ctx, MOE_ERR_ARG, "%s: path too long", fn);
    return MOE_OK;
}

#if defined(__unix__) || defined(__APPLE__)
/* The steps of DIR's checkpoints of PREFIX, ascending, in a heap array (*steps, *count). */
static moe_status moe__ckpt_steps(moe_ctx *ctx, const char *fn, const char *dir, const char *prefix, int64_t **steps, int64_t *count) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int64_t n = 0, cap = 0, i, j;
    *steps = NULL;
    *count = 0;
    if (!d) return moe__fail(ctx, MOE_ERR_IO, "%s: cannot read directory '%s': %s", fn, dir, strerror(errno));
    while ((e = readdir(d)) != NULL) {
        int64_t st = moe__ckpt_step_of(e->d_name, prefix);
        if (st < 0) continue;
        if (n == cap) {
            int64_t *q;
            cap = cap ? 2 * cap : 64;
            q = (int64_t *)MOE_REALLOC(*steps, sizeof(int64_t) * (size_t)cap);
            if (!q) {
                closedir(d);
                MOE_FREE(*steps);
                *steps = NULL;
                return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory listing '%s'", fn, dir);
            }
            *steps = q;
        }
        (*steps)[n++] = st;
    }
    closedir(d);
    for (i = 1; i < n; i++) /* insertion sort: a run keeps a handful */
        for (j = i; j > 0 && (*steps)[j - 1] > (*steps)[j]; j--) {
            int64_t t = (*steps)[j];
            (*steps)[j] = (*steps)[j - 1];
            (*steps)[j - 1] = t;
        }
    *count = n;
    return MOE_OK;
}
#endif

static void moe__ckpt_step_path(char *buf, size_t cap, const char *dir, const char *prefix, int64_t step) {
    snprintf(buf, cap, "%s/%s-%08lld.bin", dir, prefix, (long long)step);
}

MOE_API moe_status moe_ckpt_save_step(moe_ctx *ctx, const char *dir, const char *prefix, int keep, const moe_model *model,
                                      const moe_adamw *opt, const moe_train_state *state, char *written, size_t cap) {
    static const char *fn = "moe_ckpt_save_step";
    char path[4200];
    MOE__CHECK_CTX(ctx);
    MOE__TRY(moe__ckpt_dir_args(ctx, fn, dir, prefix, 1));
    if (!state || keep < 0) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL state or negative keep", fn);
    moe__ckpt_step_path(path, sizeof path, dir, prefix, state->step);
    if (written && cap) {
        if (strlen(path) >= cap) return moe__fail(ctx, MOE_ERR_ARG, "%s: %zu bytes are too few for the path", fn, cap);
        snprintf(written, cap, "%s", path);
    }
    MOE__TRY(moe_ckpt_save(ctx, path, model, opt, state));
    if (opt && opt->comm && moe_comm_rank(opt->comm) != 0) return MOE_OK; /* ZeRO-1: rank 0 wrote, it keeps the directory */
#if defined(__unix__) || defined(__APPLE__)
    if (keep > 0) { /* the checkpoint is written: a failure to list the older ones is only reported */
        int64_t *steps, n, i, kept = 0;
        if (moe__ckpt_steps(ctx, fn, dir, prefix, &steps, &n) != MOE_OK) {
            moe__log(ctx, 1, "%s: older checkpoints not pruned: %s", fn, moe_ctx_error(ctx));
            return MOE_OK;
        }
        for (i = n - 1; i >= 0; i--) {
            if (steps[i] > state->step) continue;
            if (++kept <= keep) continue;
            moe__ckpt_step_path(path, sizeof path, dir, prefix, steps[i]);
            if (remove(path) != 0) moe__log(ctx, 1, "%s: cannot remove the old checkpoint '%s': %s", fn, path, strerror(errno));
        }
        MOE_FREE(steps);
    }
#endif
    return MOE_OK;
}

MOE_API moe_status moe_ckpt_latest(moe_ctx *ctx, const char *dir, const char *prefix, char *path, size_t cap) {
    static const char *fn = "moe_ckpt_latest";
    MOE__CHECK_CTX(ctx);
    MOE__TRY(moe__ckpt_dir_args(ctx, fn, dir, prefix, 1));
    if (!path || cap < 1) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL path", fn);
    path[0] = 0;
#if defined(__unix__) || defined(__APPLE__)
    {
        int64_t *steps, n, i;
        char p[4200];
        MOE__TRY(moe__ckpt_steps(ctx, fn, dir, prefix, &steps, &n));
        for (i = n - 1; i >= 0; i--) {
            unsigned char *buf;
            moe__rd rd;
            moe__ckpt_step_path(p, sizeof p, dir, prefix, steps[i]);
            if (moe__ckpt_open(ctx, fn, p, &buf, &rd, NULL) != MOE_OK) {
                moe__log(ctx, 1, "%s; skipping it", ctx->error);
                continue;
            }
            MOE_FREE(buf);
            if (strlen(p) >= cap) {
                MOE_FREE(steps);
                return moe__fail(ctx, MOE_ERR_ARG, "%s: %zu bytes are too few for the path", fn, cap);
            }
            snprintf(path, cap, "%s", p);
            break;
        }
        MOE_FREE(steps);
    }
    return MOE_OK;
#else
    return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: needs a POSIX system", fn);
#endif
}

MOE_API moe_status moe_ckpt_clean(moe_ctx *ctx, const char *dir, const char *prefix, int64_t after_step, int *removed) {
    static const char *fn = "moe_ckpt_clean";
    MOE__CHECK_CTX(ctx);
    MOE__TRY(moe__ckpt_dir_args(ctx, fn, dir, prefix, 0));
    if (removed) *removed = 0;
#if defined(__unix__) || defined(__APPLE__)
    {
        DIR *d = opendir(dir);
        struct dirent *e;
        char p[4200];
        if (!d) return moe__fail(ctx, MOE_ERR_IO, "%s: cannot read directory '%s': %s", fn, dir, strerror(errno));
        while ((e = readdir(d)) != NULL) {
            const char *t = strstr(e->d_name, ".tmp"), *q;
            int gone = 0;
            while (t && strstr(t + 1, ".tmp")) t = strstr(t + 1, ".tmp"); /* the last ".tmp" */
            if (t && t[4]) {
                long pid = 0;
                for (q = t + 4; *q >= '0' && *q <= '9' && pid < 100000000L; q++) pid = pid * 10 + (*q - '0');
                /* a temporary of a process that is gone (kill answers ESRCH) */
                gone = !*q && pid > 0 && pid != (long)getpid() && kill((pid_t)pid, 0) != 0 && errno == ESRCH;
            }
            if (!gone && prefix) {
                int64_t st = moe__ckpt_step_of(e->d_name, prefix);
                gone = st >= 0 && (after_step < 0 || st > after_step);
            }
            if (!gone) continue;
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            if (remove(p) == 0) {
                if (removed) (*removed)++;
            } else {
                moe__log(ctx, 1, "%s: cannot remove '%s': %s", fn, p, strerror(errno));
            }
        }
        closedir(d);
    }
    return MOE_OK;
#else
    (void)after_step;
    return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: needs a POSIX system", fn);
#endif
}

/* ---- safetensors ---- */

static const char *const moe__st_names[MOE_ST_DTYPE_COUNT] = {"F32", "BF16", "F16", "F8_E4M3", "F8_E5M2", "I32", "I64"};
static const size_t moe__st_sizes[MOE_ST_DTYPE_COUNT] = {4, 2, 2, 1, 1, 4, 8};

#define MOE__ST_MAX_HEADER ((uint64_t)100 << 20)
#define MOE__ST_MAX_NAME 512

struct moe_st_file {
    unsigned char *image; /* the whole file */
    size_t len;
    moe_st_tensor *t;
    char *names;
    int64_t n;
};

MOE_API float moe_st_value(const moe_st_tensor *t, int64_t i) {
    const unsigned char *p;
    if (!t || i < 0 || i >= t->numel) return NAN;
    p = (const unsigned char *)t->data + (size_t)i * moe__st_sizes[t->dtype];
    switch (t->dtype) {
    case MOE_ST_F32: {
        uint32_t u = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
        return moe__bits_f32(u);
    }
    case MOE_ST_BF16: return moe_bf16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
    case MOE_ST_F16: return moe_f16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
    case MOE_ST_F8_E4M3: return moe_e4m3_to_f32(p[0]);
    case MOE_ST_F8_E5M2: return moe_e5m2_to_f32(p[0]);
    default: return NAN;
    }
}

static int moe__st_cmp_name(const void *a, const void *b) {
    return strcmp(((const moe_st_tensor *)a)->name, ((const moe_st_tensor *)b)->name);
}
static int moe__st_cmp_offset(const void *a, const void *b) {
    const moe_st_tensor *x = (const moe_st_tensor *)a, *y = (const moe_st_tensor *)b;
    const unsigned char *p = (const unsigned char *)x->data, *q = (const unsigned char *)y->data;
    if (p != q) return (p > q) - (p < q);
    return (x->bytes > y->bytes) - (x->bytes < y->bytes); /* an empty tensor first where another starts */
}

/* Parse a file image; on success the file owns `image`. */
static moe_status moe__st_parse(moe_ctx *ctx, const char *what, unsigned char *image, size_t len, moe_st_file **out) {
    static const char *fn = "moe_st_open";
    moe_st_file *f;
    moe__json j;
    uint64_t hlen = 0;
    size_t data_len, names_len = 0, expect;
    int64_t i, k, e, n = 0;
    int b;
    moe_status st;
    if (len < 8) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' is %zu bytes, too short for a safetensors header", fn, what, len);
    for (b = 7; b >= 0; b--) hlen = (hlen << 8) | image[b];
    if (hlen > MOE__ST_MAX_HEADER || hlen > len - 8)
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': header length %llu exceeds the file (%zu bytes) or the 100 MB limit", fn, what,
                         (unsigned long long)hlen, len);
    data_len = len - 8 - (size_t)hlen;
    MOE__TRY(moe__json_parse(ctx, fn, (const char *)image + 8, (int64_t)hlen, &j));
    if (j.t[0].type != MOE__J_OBJ) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': the header is not a JSON object", fn, what);
    for (i = 1, k = 0; k < j.t[0].count; k++, i = j.t[i + 1].next) {
        names_len += (size_t)(j.t[i].end - j.t[i].start) + 1;
        n++;
    }
    f = (moe_st_file *)moe__heap_calloc(ctx, sizeof *f);
    if (!f) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    f->t = (moe_st_tensor *)moe__heap_calloc(ctx, sizeof(moe_st_tensor) * (size_t)(n + 1));
    f->names = (char *)moe__heap_calloc(ctx, names_len + 1);
    if (!f->t || !f->names) {
        moe_st_close(f);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    st = MOE_OK;
    names_len = 0;
    for (i = 1, k = 0; st == MOE_OK && k < j.t[0].count; k++, i = j.t[i + 1].next) {
        char *name = f->names + names_len, dt[32];
        int64_t v = i + 1, dtok, stok, otok, d;
        double x, beg, end;
        moe_st_tensor *t = &f->t[f->n];
        int dtype = -1;
        size_t bytes;
        if (!moe__json_str(&j, i, name, MOE__ST_MAX_NAME)) { st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': a tensor name is too long or invalid", fn, what); break; }
        names_len += strlen(name) + 1;
        if (strcmp(name, "__metadata__") == 0) {
            int64_t mi, mk;
            if (j.t[v].type != MOE__J_OBJ) { st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': __metadata__ must be an object", fn, what); break; }
            for (mi = v + 1, mk = 0; mk < j.t[v].count; mk++, mi = j.t[mi + 1].next)
                if (j.t[mi + 1].type != MOE__J_STR) { st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': __metadata__ values must be strings", fn, what); break; }
            continue;
        }
        if (j.t[v].type != MOE__J_OBJ) { st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': entry '%s' is not an object", fn, what, name); break; }
        dtok = moe__json_get(&j, v, "dtype");
        stok = moe__json_get(&j, v, "shape");
        otok = moe__json_get(&j, v, "data_offsets");
        if (dtok < 0 || stok < 0 || otok < 0 || !moe__json_str(&j, dtok, dt, sizeof dt) || j.t[stok].type != MOE__J_ARR ||
            j.t[otok].type != MOE__J_ARR || j.t[otok].count != 2) {
            st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' needs dtype, shape and two data_offsets", fn, what, name);
            break;
        }
        for (d = 0; d < MOE_ST_DTYPE_COUNT; d++)
            if (strcmp(dt, moe__st_names[d]) == 0) dtype = (int)d;
        if (dtype < 0) { st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' has unsupported dtype '%s'", fn, what, name, dt); break; }
        if (j.t[stok].count > MOE_ST_MAX_DIMS) { st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' has more than %d dims", fn, what, name, MOE_ST_MAX_DIMS); break; }
        t->name = name;
        t->dtype = (moe_st_dtype)dtype;
        t->ndim = (int)j.t[stok].count;
        t->numel = 1;
        for (d = 0; d < t->ndim; d++) {
            if (!moe__json_num(&j, stok + 1 + d, &x) || x < 0 || x != floor(x) || x > 9.0e15 ||
                (t->numel && x > (double)(((int64_t)1 << 62) / t->numel))) {
                st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' has an invalid or giant shape", fn, what, name);
                break;
            }
            t->shape[d] = (int64_t)x;
            t->numel *= t->shape[d];
        }
        if (st) break;
        if (!moe__json_num(&j, otok + 1, &beg) || !moe__json_num(&j, otok + 2, &end) || beg < 0 || end < beg ||
            beg != floor(beg) || end != floor(end) || end > (double)data_len) {
            st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' has data_offsets outside the %zu data bytes", fn, what, name, data_len);
            break;
        }
        if (moe__mul_overflows((size_t)t->numel, moe__st_sizes[dtype], &bytes) || bytes != (size_t)(end - beg)) {
            st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' holds %.0f bytes but its dtype and shape need %lld x %zu", fn,
                           what, name, end - beg, (long long)t->numel, moe__st_sizes[dtype]);
            break;
        }
        t->data = image + 8 + (size_t)hlen + (size_t)beg;
        t->bytes = bytes;
        f->n++;
    }
    if (st) {
        moe_st_close(f);
        return st;
    }
    /* names are unique: sorted by name, no two neighbours equal (O(n log n) for big headers) */
    qsort(f->t, (size_t)f->n, sizeof *f->t, moe__st_cmp_name);
    for (e = 1; e < f->n; e++)
        if (strcmp(f->t[e - 1].name, f->t[e].name) == 0) {
            moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' appears twice", fn, what, f->t[e].name);
            moe_st_close(f);
            return MOE_ERR_FORMAT;
        }
    /* the tensors must tile the data area: sorted by offset, each starts where the last ended */
    qsort(f->t, (size_t)f->n, sizeof *f->t, moe__st_cmp_offset);
    expect = 0;
    for (i = 0; i < f->n; i++) {
        size_t at = (size_t)((const unsigned char *)f->t[i].data - (image + 8 + (size_t)hlen));
        if (at != expect) {
            moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': tensor '%s' %s at byte %zu (expected %zu)", fn, what, f->t[i].name,
                      at < expect ? "overlaps the previous one" : "leaves a gap", at, expect);
            moe_st_close(f);
            return MOE_ERR_FORMAT;
        }
        expect += f->t[i].bytes;
    }
    if (expect != data_len) {
        moe_st_close(f);
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s': %zu data bytes are not covered by any tensor", fn, what, data_len - expect);
    }
    f->image = image;
    f->len = len;
    *out = f;
    return MOE_OK;
}

MOE_API moe_status moe_st_open(moe_ctx *ctx, const char *path, moe_st_file **out) {
    unsigned char *image;
    size_t len;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_st_open: out is NULL");
    *out = NULL;
    if (!path) return moe__fail(ctx, MOE_ERR_ARG, "moe_st_open: path is NULL");
    MOE__TRY(moe__read_file(ctx, "moe_st_open", path, (size_t)1 << 40, &image, &len));
    st = moe__st_parse(ctx, path, image, len, out);
    if (st) MOE_FREE(image);
    return st;
}

MOE_API moe_status moe_st_open_memory(moe_ctx *ctx, const void *bytes, size_t len, moe_st_file **out) {
    unsigned char *image;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!out || (!bytes && len)) return moe__fail(ctx, MOE_ERR_ARG, "moe_st_open_memory: NULL argument");
    *out = NULL;
    image = (unsigned char *)moe__heap_alloc(ctx, len + 1);
    if (!image) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_st_open_memory: out of memory");
    if (len) memcpy(image, bytes, len);
    st = moe__st_parse(ctx, "(memory)", image, len, out);
    if (st) MOE_FREE(image);
    return st;
}

MOE_API void moe_st_close(moe_st_file *f) {
    if (!f) return;
    MOE_FREE(f->image);
    MOE_FREE(f->t);
    MOE_FREE(f->names);
    MOE_FREE(f);
}
MOE_API int64_t moe_st_count(const moe_st_file *f) { return f ? f->n : 0; }
MOE_API const moe_st_tensor *moe_st_get(const moe_st_file *f, int64_t i) { return f && i >= 0 && i < f->n ? &f->t[i] : NULL; }
MOE_API const moe_st_tensor *moe_st_find(const moe_st_file *f, const char *name) {
    int64_t i;
    if (!f || !name) return NULL;
    for (i = 0; i < f->n; i++)
        if (strcmp(f->t[i].name, name) == 0) return &f->t[i];
    return NULL;
}

struct moe_st_writer {
    moe__buf header, data;
    moe__buf names; /* every name so far, NUL-separated, to refuse duplicates */
    int64_t n;
};

MOE_API moe_status moe_st_writer_new(moe_ctx *ctx, moe_st_writer **out) {
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_st_writer_new: out is NULL");
    *out = (moe_st_writer *)moe__heap_calloc(ctx, sizeof **out);
    if (!*out) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_st_writer_new: out of memory");
    moe__buf_put(&(*out)->header, "{", 1);
    return MOE_OK;
}

MOE_API moe_status moe_st_writer_add(moe_ctx *ctx, moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                                     const int64_t *shape, const void *data) {
    char entry[1024];
    int64_t numel = 1;
    size_t bytes, at;
    int d, len;
    MOE__CHECK_CTX(ctx);
    if (!w || !name || (!data && ndim > 0) || (ndim > 0 && !shape)) return moe__fail(ctx, MOE_ERR_ARG, "moe_st_writer_add: NULL argument");
    if ((int)dtype < 0 || dtype >= MOE_ST_DTYPE_COUNT || ndim < 0 || ndim > MOE_ST_MAX_DIMS || strlen(name) > MOE__ST_MAX_NAME ||
        strchr(name, '"') || strchr(name, '\\'))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_st_writer_add: bad dtype, ndim or name for '%s'", name);
    for (d = 0; d < ndim; d++) {
        if (shape[d] < 0) return moe__fail(ctx, MOE_ERR_SHAPE, "moe_st_writer_add: negative dim in '%s'", name);
        if (shape[d] && numel > (((int64_t)1 << 62) / (int64_t)moe__st_sizes[dtype]) / shape[d])
            return moe__fail(ctx, MOE_ERR_SHAPE, "moe_st_writer_add: '%s' is too large", name);
        numel *= shape[d];
    }
    bytes = (size_t)numel * moe__st_sizes[dtype];
    {
        size_t at0 = 0;
        while (at0 < w->names.len) {
            const char *other = (const char *)w->names.p + at0;
            if (strcmp(other, name) == 0) return moe__fail(ctx, MOE_ERR_ARG, "moe_st_writer_add: tensor '%s' added twice", name);
            at0 += strlen(other) + 1;
        }
        moe__buf_put(&w->names, name, strlen(name) + 1);
    }
    at = w->data.len;
    len = snprintf(entry, sizeof entry, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", w->n ? "," : "", name, moe__st_names[dtype]);
    for (d = 0; d < ndim; d++) len += snprintf(entry + len, sizeof entry - (size_t)len, d ? ",%lld" : "%lld", (long long)shape[d]);
    len += snprintf(entry + len, sizeof entry - (size_t)len, "],\"data_offsets\":[%zu,%zu]}", at, at + bytes);
    moe__buf_put(&w->header, entry, (size_t)len);
    if (bytes) moe__buf_put(&w->data, data, bytes);
    w->n++;
    if (w->header.oom || w->data.oom) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_st_writer_add: out of memory");
    return MOE_OK;
}

MOE_API moe_status moe_st_writer_save(moe_ctx *ctx, moe_st_writer *w, const char *path) {
    moe__buf out;
    moe_status st;
    uint64_t hlen;
    MOE__CHECK_CTX(ctx);
    if (!w) return moe__fail(ctx, MOE_ERR_ARG, "moe_st_writer_save: writer is NULL");
    memset(&out, 0, sizeof out);
    hlen = (uint64_t)w->header.len + 1;
    hlen = (hlen + 7) & ~(uint64_t)7; /* pad the header with spaces to 8 bytes, as the reference writer does */
    moe__buf_u64(&out, hlen);
    moe__buf_put(&out, w->header.p, w->header.len);
    moe__buf_put(&out, "}", 1);
    while (out.len < 8 + hlen) moe__buf_put(&out, " ", 1);
    if (w->data.len) moe__buf_put(&out, w->data.p, w->data.len);
    st = out.oom ? moe__fail(ctx, MOE_ERR_MEMORY, "moe_st_writer_save: out of memory") : moe__write_atomic(ctx, "moe_st_writer_save", path, out.p, out.len);
    MOE_FREE(out.p);
    return st;
}

MOE_API void moe_st_writer_free(moe_st_writer *w) {
    if (!w) return;
    MOE_FREE(w->header.p);
    MOE_FREE(w->data.p);
    MOE_FREE(w->names.p);
    MOE_FREE(w);
}

/* ---- Hugging Face names ----
   Every Hugging Face tensor is a contiguous slice of one model tensor: the fused gate_up
   weights split into gate_proj rows then up_proj rows, and the [E, ...] expert stacks into
   one slice per expert. moe__hf_each lists them. */

typedef struct moe__hf_slice {
    char name[MOE__NAME_MAX + 32];
    moe_tensor *t;     /* the model tensor */
    int64_t offset;    /* first element of the slice */
    int ndim;
    int64_t shape[2];
    int linear;        /* a linear layer weight (FP8-quantisable) */
    int buffer;        /* not a parameter (the expert bias): has no gradient */
    const char *fused; /* for expert slices: the HF name of the whole fused stack, else NULL */
} moe__hf_slice;

typedef moe_status (*moe__hf_fn)(moe_ctx *ctx, void *user, const moe__hf_slice *s);

static moe_status moe__hf_emit(moe_ctx *ctx, moe__hf_fn fn, void *user, moe_tensor *t, int64_t offset, int64_t rows,
                               int64_t cols, int linear, const char *fused, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 10, 11)))
#endif
    ;
static moe_status moe__hf_emit(moe_ctx *ctx, moe__hf_fn fn, void *user, moe_tensor *t, int64_t offset, int64_t rows,
                               int64_t cols, int linear, const char *fused, const char *fmt, ...) {
    moe__hf_slice s;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s.name, sizeof s.name, fmt, ap);
    va_end(ap);
    s.t = t;
    s.offset = offset;
    s.ndim = cols ? 2 : 1;
    s.shape[0] = rows;
    s.shape[1] = cols;
    s.linear = linear;
    s.buffer = !t->requires_grad;
    s.fused = fused;
    return fn(ctx, user, &s);
}

/* One model tensor under its HF name(s). */
static moe_status moe__hf_entry(moe_ctx *ctx, const moe__entry *e, moe__hf_fn fn, void *user) {
    const char *n = e->name;
    size_t len = strlen(n);
    moe_tensor *t = e->t;
    char prefix[MOE__NAME_MAX];
    const char *suffix;
#define MOE__ENDS(sfx) (len >= strlen(sfx) && strcmp(n + len - strlen(sfx), sfx) == 0 && (suffix = sfx) != NULL)
    if (MOE__ENDS("mlp.experts.gate_up_proj") || MOE__ENDS("mlp.experts.down_proj")) {
        int64_t E = t->shape[0], r = t->shape[1], c = t->shape[2], x;
        int gate_up = strstr(suffix, "gate_up") != NULL;
        snprintf(prefix, sizeof prefix, "%.*s", (int)(len - strlen(suffix)), n);
        for (x = 0; x < E; x++) {
            if (gate_up) {
                MOE__TRY(moe__hf_emit(ctx, fn, user, t, x * r * c, r / 2, c, 1, n, "%smlp.experts.%lld.gate_proj.weight", prefix, (long long)x));
                MOE__TRY(moe__hf_emit(ctx, fn, user, t, x * r * c + r / 2 * c, r / 2, c, 1, n, "%smlp.experts.%lld.up_proj.weight", prefix, (long long)x));
            } else {
                MOE__TRY(moe__hf_emit(ctx, fn, user, t, x * r * c, r, c, 1, n, "%smlp.experts.%lld.down_proj.weight", prefix, (long long)x));
            }
        }
        return MOE_OK;
    }
    if (MOE__ENDS("gate_up_proj.weight")) { /* dense MLP or shared experts */
        int64_t r = t->shape[0], c = t->shape[1];
        snprintf(prefix, sizeof prefix, "%.*s", (int)(len - strlen(suffix)), n);
        MOE__TRY(moe__hf_emit(ctx, fn, user, t, 0, r / 2, c, 1, NULL, "%sgate_proj.weight", prefix));
        return moe__hf_emit(ctx, fn, user, t, r / 2 * c, r / 2, c, 1, NULL, "%sup_proj.weight", prefix);
    }
#undef MOE__ENDS
    return moe__hf_emit(ctx, fn, user, t, 0, t->shape[0], t->ndim == 2 ? t->shape[1] : 0,
                        t->ndim == 2 && strstr(n, "_proj") != NULL && strstr(n, "eh_proj") == NULL, NULL, "%s", n);
}

/* Every HF tensor of the model, with the MTP layers' copies of embedding and head. */
static moe_status moe__hf_each(moe_ctx *ctx, const moe_model *m, int with_copies, moe__hf_fn fn, void *user) {
    int64_t i, k;
    for (i = 0; i < m->n_entries; i++) MOE__TRY(moe__hf_entry(ctx, &m->entries[i], fn, user));
    for (k = 0; with_copies && k < m->cfg.num_nextn_predict_layers; k++) {
        long long L = (long long)(m->cfg.num_hidden_layers + k);
        MOE__TRY(moe__hf_emit(ctx, fn, user, m->embed, 0, m->embed->shape[0], m->embed->shape[1], 0, NULL, "model.layers.%lld.embed_tokens.weight", L));
        MOE__TRY(moe__hf_emit(ctx, fn, user, m->head, 0, m->head->shape[0], m->head->shape[1], 0, NULL, "model.layers.%lld.shared_head.head.weight", L));
    }
    return MOE_OK;
}

/* ---- loading ---- */

typedef struct moe__hf_name {
    const char *name;
    int64_t f, i; /* file, tensor in the file */
} moe__hf_name;

typedef struct moe__hf_loader {
    moe_st_file **files;
    int64_t n_files;
    moe__hf_name *names;  /* every tensor of every file, sorted by name (DeepSeek-V3: ~90k) */
    int64_t n_names;
    unsigned char **used; /* per file, per tensor: consumed */
    int64_t block;        /* FP8 weight block size */
    int pass;             /* 0: check, 1: copy */
} moe__hf_loader;

static int moe__hf_cmp_name(const void *a, const void *b) {
    return strcmp(((const moe__hf_name *)a)->name, ((const moe__hf_name *)b)->name);
}
/* The sorted name index of the files in L (0 without memory). */
static int moe__hf_index_names(moe_ctx *ctx, moe__hf_loader *L) {
    int64_t f, i, n = 0;
    for (f = 0; f < L->n_files; f++) n += L->files[f]->n;
    L->names = (moe__hf_name *)moe__heap_alloc(ctx, sizeof(moe__hf_name) * (size_t)(n + 1));
    if (!L->names) return 0;
    for (f = 0; f < L->n_files; f++)
        for (i = 0; i < L->files[f]->n; i++) {
            L->names[L->n_names].name = L->files[f]->t[i].name;
            L->names[L->n_names].f = f;
            L->names[L->n_names++].i = i;
        }
    qsort(L->names, (size_t)L->n_names, sizeof *L->names, moe__hf_cmp_name);
    return 1;
}
static const moe_st_tensor *moe__hf_lookup(moe__hf_loader *L, const char *name, int64_t *fi, int64_t *ti) {
    int64_t lo = 0, hi = L->n_names;
    while (lo < hi) { /* first entry >= name */
        int64_t mid = lo + (hi - lo) / 2;
        if (strcmp(L->names[mid].name, name) < 0) lo = mid + 1;
        else hi = mid;
    }
    if (lo == L->n_names || strcmp(L->names[lo].name, name) != 0) return NULL;
    *fi = L->names[lo].f;
    *ti = L->names[lo].i;
    return &L->files[*fi]->t[*ti];
}

static int moe__hf_float_dtype(moe_st_dtype d) { return d == MOE_ST_F32 || d == MOE_ST_BF16 || d == MOE_ST_F16 || d == MOE_ST_F8_E4M3; }

/* A weight that is NaN or infinite (after FP8 dequantisation) is refused with its name: the
   model would load and then answer NaN with MOE_OK. */
static moe_status moe__hf_nonfinite(moe_ctx *ctx, const char *name, int64_t i, float v) {
    return moe__fail(ctx, MOE_ERR_NUMERIC, "moe_model_load_hf: tensor '%s' holds a non-finite value (%g at element %lld)", name,
                     (double)v, (long long)i);
}

/* Copy (or check) one HF tensor into its slice, dequantising FP8 blocks. */
static moe_status moe__hf_load_slice(moe_ctx *ctx, void *user, const moe__hf_slice *s) {
    static const char *fn = "moe_model_load_hf";
    moe__hf_loader *L = (moe__hf_loader *)user;
    const moe_st_tensor *t, *sc = NULL;
    char scale_name[MOE__NAME_MAX + 64], have[160], want[160];
    int64_t fi, ti, sfi = 0, sti = 0, i, rows = s->shape[0], cols = s->ndim == 2 ? s->shape[1] : 1;
    t = moe__hf_lookup(L, s->name, &fi, &ti);
    if (!t && s->fused) {
        /* a fused expert stack ([E, 2I, d] or [E, d, I]) as newer transformers may write it */
        const moe_st_tensor *whole = moe__hf_lookup(L, s->fused, &fi, &ti);
        if (whole) {
            int d, same = whole->ndim == s->t->ndim;
            for (d = 0; same && d < whole->ndim; d++) same = whole->shape[d] == s->t->shape[d];
            if (!same)
                return moe__fail(ctx, MOE_ERR_FORMAT, "%s: tensor '%s' has shape %s, want %s", fn, s->fused,
                                 moe__dims_str(have, sizeof have, whole->ndim, whole->shape),
                                 moe__dims_str(want, sizeof want, s->t->ndim, s->t->shape));
            if (!moe__hf_float_dtype(whole->dtype) || whole->dtype == MOE_ST_F8_E4M3)
                return moe__fail(ctx, MOE_ERR_FORMAT, "%s: tensor '%s' has dtype %s (F32, BF16 or F16 for a fused stack)", fn, s->fused,
                                 moe__st_names[whole->dtype]);
            L->used[fi][ti] = 1;
            if (L->pass == 1)
                for (i = 0; i < rows * cols; i++) {
                    float v = moe_st_value(whole, s->offset + i);
                    if (!isfinite(v)) return moe__hf_nonfinite(ctx, s->fused, s->offset + i, v);
                    MOE__F32(s->t)[s->offset + i] = (moe_real)v;
                }
            return MOE_OK;
        }
    }
    if (!t) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: tensor '%s' is missing", fn, s->name);
    if (t->ndim != s->ndim || t->shape[0] != rows || (s->ndim == 2 && t->shape[1] != cols))
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: tensor '%s' has shape %s, want %s", fn, s->name,
                         moe__dims_str(have, sizeof have, t->ndim, t->shape), moe__dims_str(want, sizeof want, s->ndim, s->shape));
    if (!moe__hf_float_dtype(t->dtype)) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: tensor '%s' has dtype %s", fn, s->name, moe__st_names[t->dtype]);
    L->used[fi][ti] = 1;
    if (t->dtype == MOE_ST_F8_E4M3) {
        int64_t br = (rows + L->block - 1) / L->block, bc = (cols + L->block - 1) / L->block;
        snprintf(scale_name, sizeof scale_name, "%s_scale_inv", s->name);
        sc = moe__hf_lookup(L, scale_name, &sfi, &sti);
        if (s->ndim != 2) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: tensor '%s' is F8_E4M3 but not a matrix", fn, s->name);
        if (!sc) return moe__fail(ctx, MOE_ERR_FORMAT, "%s: FP8 tensor '%s' needs its scales '%s'", fn, s->name, scale_name);
        if (sc->dtype != MOE_ST_F32 || sc->ndim != 2 || sc->shape[0] != br || sc->shape[1] != bc) {
            int64_t ws[2];
            ws[0] = br;
            ws[1] = bc;
            return moe__fail(ctx, MOE_ERR_FORMAT, "%s: FP8 scales '%s' are %s %s, want F32 %s (blocks of %lld)", fn, scale_name,
                             moe__st_names[sc->dtype], moe__dims_str(have, sizeof have, sc->ndim, sc->shape),
                             moe__dims_str(want, sizeof want, 2, ws), (long long)L->block);
        }
        L->used[sfi][sti] = 1;
    }
    if (L->pass == 0) return MOE_OK;
    for (i = 0; i < rows * cols; i++) {
        float v = moe_st_value(t, i);
        if (!isfinite(v)) return moe__hf_nonfinite(ctx, s->name, i, v);
        if (sc) { /* weight_scale_inv multiplies (reference §8.3): W = W_fp8 · scale_inv[block] */
            int64_t k = (i / cols / L->block) * sc->shape[1] + (i % cols) / L->block;
            float f = moe_st_value(sc, k);
            if (!isfinite(f)) return moe__hf_nonfinite(ctx, scale_name, k, f);
            v *= f;
            if (!isfinite(v)) return moe__hf_nonfinite(ctx, s->name, i, v);
        }
        MOE__F32(s->t)[s->offset + i] = (moe_real)v;
    }
    return MOE_OK;
}

/* Tensors a checkpoint may hold that we do not read: the MTP layers' copies of embedding and
   head, and rotary inv_freq buffers of old exports. */
static int moe__hf_ignorable(const moe_model *m, const char *name) {
    int64_t k;
    char buf[128];
    if (strstr(name, "rotary_emb.inv_freq")) return 1;
    for (k = 0; k < m->cfg.num_nextn_predict_layers; k++) {
        long long L = (long long)(m->cfg.num_hidden_layers + k);
        snprintf(buf, sizeof buf, "model.layers.%lld.embed_tokens.weight", L);
        if (strcmp(name, buf) == 0) return 1;
        snprintf(buf, sizeof buf, "model.layers.%lld.shared_head.head.weight", L);
        if (strcmp(name, buf) == 0) return 1;
    }
    return 0;
}

/* Open the safetensors files of an HF directory: the shards of model.safetensors.index.json,
   or model.safetensors. The index must be exact: every weight_map entry names a tensor that is
   in the shard it names, and every tensor of the shards is listed. On failure the files opened
   so far stay in L for the caller to close. */
static moe_status moe__hf_open_files(moe_ctx *ctx, const char *dir, moe__hf_loader *Lp) {
    static const char *fn = "moe_model_load_hf";
    char path[4096], shard[1024], tname[MOE__ST_MAX_NAME + 1];
    unsigned char *idx = NULL;
    size_t idx_len = 0;
    moe_status st = MOE_OK;
    int64_t i;
    moe__hf_loader L = *Lp;
    /* the files: an index of shards, or one model.safetensors */
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (moe__path_exists(path)) MOE__TRY(moe__read_file(ctx, fn, path, (size_t)1 << 28, &idx, &idx_len));
    if (idx) {
        moe__json j;
        int64_t wm = -1, k, kk, n_map = 0, n_held = 0;
        char **names = NULL;
        st = moe__json_parse(ctx, fn, (const char *)idx, (int64_t)idx_len, &j);
        if (!st && ((wm = moe__json_get(&j, 0, "weight_map")) < 0 || j.t[wm].type != MOE__J_OBJ))
            st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: %s has no weight_map object", fn, path);
        if (!st) {
            int d = moe__json_dup_key(&j, wm, tname, sizeof tname);
            if (d) st = d < 0 ? moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn)
                              : moe__fail(ctx, MOE_ERR_FORMAT, "%s: '%s' appears twice in the weight_map of %s", fn, tname, path);
        }
        if (!st) {
            n_map = j.t[wm].count;
            L.files = (moe_st_file **)moe__heap_calloc(ctx, sizeof(moe_st_file *) * (size_t)(n_map + 1));
            names = (char **)moe__heap_calloc(ctx, sizeof(char *) * (size_t)(n_map + 1));
            if (!L.files || !names) st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
        }
        /* open each shard once */
        for (k = wm + 1, i = 0; st == MOE_OK && i < n_map; i++, k = j.t[k + 1].next) {
            int dup = 0;
            if (!moe__json_str(&j, k + 1, shard, sizeof shard) || !shard[0] || strchr(shard, '/') || strchr(shard, '\\') ||
                strstr(shard, "..")) {
                st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: bad shard name in %s (a file name in the directory)", fn, path);
                break;
            }
            for (kk = 0; kk < L.n_files; kk++) dup |= strcmp(names[kk], shard) == 0;
            if (dup) continue;
            names[L.n_files] = (char *)moe__heap_alloc(ctx, strlen(shard) + 1);
            if (!names[L.n_files]) { st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn); break; }
            strcpy(names[L.n_files], shard);
            snprintf(path, sizeof path, "%s/%s", dir, shard);
            st = moe_st_open(ctx, path, &L.files[L.n_files]);
            if (st) MOE_FREE(names[L.n_files]);
            else n_held += L.files[L.n_files++]->n;
        }
        /* every entry is in its shard; no shard holds more than the entries */
        if (st == MOE_OK && !moe__hf_index_names(ctx, &L)) st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
        for (k = wm + 1, i = 0; st == MOE_OK && i < n_map; i++, k = j.t[k + 1].next) {
            int64_t fi = -1, ti;
            if (!moe__json_str(&j, k, tname, sizeof tname)) {
                st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: a tensor name in the index is too long or invalid", fn);
                break;
            }
            moe__json_str(&j, k + 1, shard, sizeof shard);
            if (!moe__hf_lookup(&L, tname, &fi, &ti) || strcmp(names[fi], shard) != 0)
                st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: the index places '%s' in '%s', which does not hold it", fn, tname, shard);
        }
        if (st == MOE_OK && n_held != n_map)
            st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: the shards hold %lld tensors, the index lists %lld (a name listed twice, or "
                           "tensors not in the index)", fn, (long long)n_held, (long long)n_map);
        for (kk = 0; names && kk < L.n_files; kk++) MOE_FREE(names[kk]);
        MOE_FREE(names);
        MOE_FREE(idx);
    } else {
        L.files = (moe_st_file **)moe__heap_calloc(ctx, sizeof(moe_st_file *));
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        st = L.files ? moe_st_open(ctx, path, &L.files[0]) : moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
        if (!st) L.n_files = 1;
        if (!st && !moe__hf_index_names(ctx, &L)) st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    *Lp = L;
    return st;
}

/* An FP8 checkpoint's quantization_config: quant_method "fp8" with square weight blocks
   (weight_block_size [B, B], 1 <= B <= 65536; 128 when absent). Anything else is refused. */
static moe_status moe__hf_quant_block(moe_ctx *ctx, const moe__json *jp, int64_t *block) {
    static const char *fn = "moe_model_load_hf";
    const moe__json j = *jp;
    int64_t q, b, k;
    double v[2];
    char buf[32];
    *block = 128;
    if ((q = moe__json_get(&j, 0, "quantization_config")) < 0 || j.t[q].type == MOE__J_NULL) return MOE_OK;
    if (j.t[q].type != MOE__J_OBJ || moe__json_dup_key(&j, q, buf, sizeof buf) != 0)
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: \"quantization_config\" must be an object with distinct keys", fn);
    if ((k = moe__json_get(&j, q, "quant_method")) >= 0 && (!moe__json_str(&j, k, buf, sizeof buf) || strcmp(buf, "fp8") != 0))
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: quantization_config.quant_method must be \"fp8\" (block-scaled E4M3)", fn);
    if ((b = moe__json_get(&j, q, "weight_block_size")) < 0) return MOE_OK;
    if (j.t[b].type != MOE__J_ARR || j.t[b].count != 2 || !moe__json_num(&j, b + 1, &v[0]) || !moe__json_num(&j, j.t[b + 1].next, &v[1]))
        return moe__fail(ctx, MOE_ERR_FORMAT, "%s: quantization_config.weight_block_size must be two integers", fn);
    for (k = 0; k < 2; k++)
        if (!(v[k] >= 1 && v[k] <= 65536) || v[k] != floor(v[k]))
            return moe__fail(ctx, MOE_ERR_CONFIG, "%s: quantization_config.weight_block_size [%.17g, %.17g] is out of range (integers "
                             "1..65536)", fn, v[0], v[1]);
    if (v[0] != v[1])
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: quantization_config.weight_block_size [%g, %g]: only square blocks are supported",
                         fn, v[0], v[1]);
    *block = (int64_t)v[0];
    return MOE_OK;
}

MOE_API moe_status moe_model_load_hf(moe_ctx *ctx, const char *dir, moe_model **out) {
    static const char *fn = "moe_model_load_hf";
    char path[4096];
    moe_config cfg;
    moe_model *m = NULL;
    moe__hf_loader L;
    moe__io_stage S;
    unsigned char *cfgtext = NULL;
    size_t cfg_len;
    moe_status st;
    int64_t f, i;
    MOE__CHECK_CTX(ctx);
    if (!dir || !out) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL dir or out", fn);
    *out = NULL;
    memset(&L, 0, sizeof L);
    memset(&S, 0, sizeof S);
    L.block = 128;
    snprintf(path, sizeof path, "%s/config.json", dir);
    MOE__TRY(moe__read_file(ctx, fn, path, (size_t)1 << 24, &cfgtext, &cfg_len));
    {
        moe__json j;
        st = moe__json_parse(ctx, "moe_config_parse", (const char *)cfgtext, (int64_t)cfg_len, &j);
        if (st == MOE_OK) st = moe__config_from_json(ctx, &j, &cfg);
        if (st == MOE_OK) st = moe__hf_quant_block(ctx, &j, &L.block);
    }
    MOE_FREE(cfgtext);
    if (st) return st;
    st = moe__hf_open_files(ctx, dir, &L);
    if (!st && cfg.num_nextn_predict_layers > 0) {
        /* transformers drops MTP weights but keeps num_nextn_predict_layers in config.json:
           without the module's tensors, load the main model alone */
        char probe[128];
        int64_t fi, ti;
        snprintf(probe, sizeof probe, "model.layers.%lld.eh_proj.weight", (long long)cfg.num_hidden_layers);
        if (!moe__hf_lookup(&L, probe, &fi, &ti)) {
            moe__log(ctx, 1, "%s: config announces %lld MTP module(s) but '%s' is absent: loading without MTP", fn,
                     (long long)cfg.num_nextn_predict_layers, probe);
            cfg.num_nextn_predict_layers = 0;
        }
    }
    if (!st) st = moe_model_new(ctx, &cfg, 0, &m);
    if (!st) st = moe__io_stage_model(ctx, fn, m, NULL, &S);
    if (!st) {
        L.used = (unsigned char **)moe__heap_calloc(ctx, sizeof(unsigned char *) * (size_t)(L.n_files + 1));
        for (f = 0; L.used && f < L.n_files; f++) L.used[f] = (unsigned char *)moe__heap_calloc(ctx, (size_t)L.files[f]->n + 1);
        if (!L.used || (L.n_files && !L.used[L.n_files - 1])) st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    /* pass 0 checks names and shapes, then every file tensor must have been claimed; pass 1 copies */
    if (!st) st = moe__hf_each(ctx, m, 0, moe__hf_load_slice, &L);
    for (f = 0; !st && f < L.n_files; f++)
        for (i = 0; !st && i < L.files[f]->n; i++)
            if (!L.used[f][i] && !moe__hf_ignorable(m, L.files[f]->t[i].name))
                st = moe__fail(ctx, MOE_ERR_FORMAT, "%s: unexpected tensor '%s'", fn, L.files[f]->t[i].name);
    if (!st) {
        L.pass = 1;
        st = moe__hf_each(ctx, m, 0, moe__hf_load_slice, &L);
    }
    for (f = 0; f < L.n_files; f++) {
        moe_st_close(L.files[f]);
        if (L.used) MOE_FREE(L.used[f]);
    }
    MOE_FREE(L.files);
    MOE_FREE(L.names);
    MOE_FREE(L.used);
    if (m) st = moe__io_unstage(ctx, &S, 1, st);
    if (st) {
        moe_model_free(ctx, m);
        return st;
    }
    *out = m;
    return MOE_OK;
}

/* ---- saving ---- */

typedef struct moe__hf_saver {
    moe_st_writer *w;
    const moe_hf_save_opts *o;
    float *buf;
    uint8_t *q;
} moe__hf_saver;

static moe_status moe__hf_save_slice(moe_ctx *ctx, void *user, const moe__hf_slice *s) {
    moe__hf_saver *S = (moe__hf_saver *)user;
    const moe_real *src;
    int64_t i, n = s->shape[0] * (s->ndim == 2 ? s->shape[1] : 1);
    if (S->o->gradients) {
        if (s->buffer) return MOE_OK;
        if (!s->t->grad) return moe__fail(ctx, MOE_ERR_STATE, "moe_model_save_hf: '%s' has no gradient", s->name);
        src = (const moe_real *)s->t->grad->data + s->offset;
    } else {
        src = MOE__F32(s->t) + s->offset;
    }
    for (i = 0; i < n; i++) S->buf[i] = (float)src[i];
    if (S->o->fp8 && s->linear && !S->o->gradients) {
        int64_t B = S->o->fp8_block > 0 ? S->o->fp8_block : 128, sh[2];
        sh[0] = (s->shape[0] + B - 1) / B;
        sh[1] = (s->shape[1] + B - 1) / B;
        MOE__TRY(moe_fp8_quantize_blocks(ctx, S->buf, s->shape[0], s->shape[1], B, S->q, S->buf + n));
        MOE__TRY(moe_st_writer_add(ctx, S->w, s->name, MOE_ST_F8_E4M3, 2, s->shape, S->q));
        {
            char name[MOE__NAME_MAX + 64];
            snprintf(name, sizeof name, "%s_scale_inv", s->name);
            return moe_st_writer_add(ctx, S->w, name, MOE_ST_F32, 2, sh, S->buf + n);
        }
    }
    return moe_st_writer_add(ctx, S->w, s->name, MOE_ST_F32, s->ndim, s->shape, S->buf);
}

static moe_status moe__model_save_hf_host(moe_ctx *ctx, const moe_model *m, const char *dir, const moe_hf_save_opts *opts) {
    static const char *fn = "moe_model_save_hf";
    moe_hf_save_opts o;
    moe__hf_saver S;
    char path[4096], cfg[8192];
    int64_t i, biggest = 0;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!m || !dir) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL model or dir", fn);
    memset(&o, 0, sizeof o);
    if (opts) o = *opts;
    if (o.fp8_block <= 0) o.fp8_block = 128;
    for (i = 0; i < m->n_entries; i++) biggest = m->entries[i].t->numel > biggest ? m->entries[i].t->numel : biggest;
    memset(&S, 0, sizeof S);
    S.o = &o;
    S.buf = (float *)moe__heap_alloc(ctx, sizeof(float) * (size_t)(2 * biggest + 16));
    S.q = (uint8_t *)moe__heap_alloc(ctx, (size_t)biggest + 16);
    if (!S.buf || !S.q) {
        MOE_FREE(S.buf);
        MOE_FREE(S.q);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    st = moe_st_writer_new(ctx, &S.w);
    if (!st) st = moe__hf_each(ctx, m, !o.gradients, moe__hf_save_slice, &S);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (!st) st = moe_st_writer_save(ctx, S.w, path);
    moe_st_writer_free(S.w);
    MOE_FREE(S.buf);
    MOE_FREE(S.q);
    if (st || o.gradients) return st;
    moe__config_json(&m->cfg, cfg, sizeof cfg);
    if (o.fp8) { /* the text ends "...\n}\n": continue the object before its closing brace */
        char *close = strrchr(cfg, '}') - 1;
        snprintf(close, sizeof cfg - (size_t)(close - cfg),
                 ",\n  \"quantization_config\": {\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\", \"quant_method\": \"fp8\", "
                 "\"weight_block_size\": [%lld, %lld]}\n}\n", (long long)o.fp8_block, (long long)o.fp8_block);
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    return moe__write_atomic(ctx, fn, path, cfg, strlen(cfg));
}


MOE_API moe_status moe_model_save_hf(moe_ctx *ctx, const moe_model *m, const char *dir, const moe_hf_save_opts *opts) {
    moe__io_stage S;
    MOE__CHECK_CTX(ctx);
    if (!m || !dir) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_save_hf: NULL model or dir");
    if (opts && opts->gradients && m->be->device != MOE_DEVICE_CPU)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_model_save_hf: the gradients of a GPU model are not staged to the host");
    MOE__TRY(moe__io_stage_model(ctx, "moe_model_save_hf", m, NULL, &S));
    return moe__io_unstage(ctx, &S, 0, moe__model_save_hf_host(ctx, m, dir, opts));
}

/* ============================================================================================
   13. infer — the latent KV cache, sampling, speculative decoding                      >>infer
   ============================================================================================
   Generation runs the model of section 9 — the same trunk, blocks and MTP modules as
   training — with a latent KV cache per MLA layer (reference §2.4) that every pass writes
   its tokens' rows into and attends over, absorbed (the decode-attention entry) or expanded.
   This section keeps the cache, sampling and MTP self-speculative decoding (reference §4.3),
   and decides how a pass runs:
   - rows one by one (a few tokens of an absorbed FP32 pass: decoding). Each row goes through
     the whole model alone, so every GEMM sees one row and gives the same bits whatever the
     pass: a verification pass over 1 + k tokens reproduces k + 1 single-token steps bit for
     bit, and speculative greedy decoding is exactly plain greedy decoding. With several
     threads the rows of a pass run side by side, one per thread, each thread with a context
     of its own (the caller's settings, an arena of its own): a row publishes each cache row
     it writes and waits only until the rows before it have written theirs (no barriers).
   - all rows together (prompts, the expanded attention, BF16 and FP8), as in training.
   Sessions run on contexts of their own, so they never reset the caller's arena; errors are
   reported on the caller's context. A session reads the model's weights at every call:
   changing them invalidates what is cached (call moe_gen_reset). */

#define MOE__GEN_MAX_DRAFT 4 /* = the most MTP modules a config may have */
#define MOE__GEN_TEAM (MOE__GEN_MAX_DRAFT + 1) /* threads a pass can use: one per row */
#define MOE__GEN_ROWS 8 /* the most rows a pass runs one by one (longer passes run batched) */

/* The counters through which thread 0 and the crew of a speculative generation talk (see
   "the crew of a speculative generation"), each on a cache line of its own. */
enum { MOE__GEN_POSTED = 0, MOE__GEN_FINISHED = 1, MOE__GEN_STOP = 2 };

struct moe_gen {
    moe_model *m;
    moe_ctx *w[MOE__GEN_TEAM]; /* per thread of a pass: the caller's settings, an arena of its own */
    int64_t cap, len, R;       /* capacity, main cache length, values per cached token (kvr + dr) */
    int64_t n_mtp, mtp_len[MOE__GEN_MAX_DRAFT];
    moe_real *cache;           /* [(layers + n_mtp)][cap][R] on the model's device */
    int64_t ring_n;            /* hidden states of the last ring_n positions, per depth */
    moe_real *ring;            /* [n_mtp + 1][ring_n][d]: main h^0 (after model.norm), MTP h^k */
    moe_real *rows;            /* a row pass's outputs: h [ROWS][d], MTP h [ROWS][d], logits [ROWS][V] */
    moe_gen_attn attn;
    float *pbuf;               /* [(MAX_DRAFT + 1) · 2][V] distributions during speculation */
    float *logits;             /* [MAX_DRAFT + 1][V] logits of a step's rows */
    int32_t *idx;              /* [2V] sort scratch: indices, merge buffer */
    int32_t *toks;             /* [cap + 1] tokens of the current generation */
    double t_par, t_ser;       /* seconds per token and block of multi-token passes, in parallel / serially */
    int64_t n_small;           /* multi-token passes so far */
    int64_t probe_at, probe_every; /* when to time the other way again, and how often */
    struct moe__gen_pass *pass;       /* the pass posted to the crew */
    int64_t sync[3][MOE__LINE];       /* [MOE__GEN_POSTED / _FINISHED / _STOP][0]: passes posted, crew parts finished, stop */
    int64_t progress[MOE__GEN_ROWS][MOE__LINE]; /* per row of a pass: cache rows written (moe__pass_sync) */
    int64_t posts;             /* passes posted in this generation (thread 0's count) */
    int crew;                  /* crew threads serving (0: a pass opens a region of its own) */
    int in_region;             /* the generation runs inside its crew's region (no nested regions) */
};

static moe_real *moe__gen_layer_cache(moe_gen *g, int64_t layer) { return g->cache + layer * g->cap * g->R; }
static moe_real *moe__gen_ring(moe_gen *g, int64_t depth, int64_t pos) {
    return g->ring + (depth * g->ring_n + pos % g->ring_n) * g->m->cfg.hidden_size;
}

MOE_API void moe_gen_cache_bytes(const moe_model *m, int64_t *latent, int64_t *mha) {
    const moe_config *c;
    if (latent) *latent = 0;
    if (mha) *mha = 0;
    if (!m) return;
    c = &m->cfg;
    if (latent) *latent = c->num_hidden_layers * (c->kv_lora_rank + c->qk_rope_head_dim) * (int64_t)sizeof(moe_real);
    if (mha)
        *mha = c->num_hidden_layers * c->num_attention_heads *
               (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim) * (int64_t)sizeof(moe_real);
}

MOE_API void moe_gen_free(moe_gen *g) {
    int i;
    if (!g) return;
    g->m->be->free(g->w[0], g->cache);
    g->m->be->free(g->w[0], g->ring);
    g->m->be->free(g->w[0], g->rows);
    for (i = 0; i < MOE__GEN_TEAM; i++) moe_ctx_free(g->w[i]);
    MOE_FREE(g->pbuf);
    MOE_FREE(g->logits);
    MOE_FREE(g->idx);
    MOE_FREE(g->toks);
    MOE_FREE(g);
}

MOE_API moe_status moe_gen_new(moe_ctx *ctx, moe_model *m, int64_t max_len, moe_gen **out) {
    static const char *fn = "moe_gen_new";
    const moe_config *c;
    moe_gen *g;
    size_t n_cache, n_ring, n_p, bytes;
    int i, ok = 1;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!m) return moe__fail(ctx, MOE_ERR_ARG, "%s: model is NULL", fn);
    if (m->be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "%s: the model lives on another device", fn);
    c = &m->cfg;
    if (max_len < 0 || max_len > c->max_position_embeddings)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: max_len %lld is outside 0..max_position_embeddings (%lld)", fn,
                         (long long)max_len, (long long)c->max_position_embeddings);
    g = (moe_gen *)moe__heap_calloc(ctx, sizeof *g);
    if (!g) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    g->m = m;
    g->cap = max_len ? max_len : c->max_position_embeddings;
    g->R = c->kv_lora_rank + c->qk_rope_head_dim;
    g->n_mtp = c->num_nextn_predict_layers;
    /* drafts of one step sit up to n_mtp positions past the committed ones and MTP module k
       lags by k: 4·(n_mtp + 1) positions cover every hidden state a later step reads */
    g->ring_n = 4 * (g->n_mtp + 1);
    for (i = 0; i < MOE__GEN_TEAM; i++) ok = ok && moe__ctx_child(ctx, &g->w[i]) == MOE_OK;
    if (!ok || moe__mul_overflows((size_t)(c->num_hidden_layers + g->n_mtp) * (size_t)g->cap, (size_t)g->R, &n_cache) ||
        moe__mul_overflows(n_cache, sizeof(moe_real), &bytes)) {
        moe_gen_free(g);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory, or the cache size overflows", fn);
    }
    n_ring = (size_t)((g->n_mtp + 1) * g->ring_n * c->hidden_size);
    n_p = (size_t)(2 * (MOE__GEN_MAX_DRAFT + 1)) * (size_t)c->vocab_size;
    g->pbuf = (float *)moe__heap_calloc(ctx, n_p * sizeof(float));
    g->logits = (float *)moe__heap_calloc(ctx, (size_t)(MOE__GEN_MAX_DRAFT + 1) * (size_t)c->vocab_size * sizeof(float));
    g->idx = (int32_t *)moe__heap_calloc(ctx, (size_t)(2 * c->vocab_size) * sizeof(int32_t));
    g->toks = (int32_t *)moe__heap_calloc(ctx, (size_t)(g->cap + 1) * sizeof(int32_t));
    if (MOE__BE(ctx)->alloc(ctx, bytes, (void **)&g->cache) != MOE_OK ||
        MOE__BE(ctx)->alloc(ctx, n_ring * sizeof(moe_real), (void **)&g->ring) != MOE_OK ||
        MOE__BE(ctx)->alloc(ctx, (size_t)(MOE__GEN_ROWS * (2 * c->hidden_size + c->vocab_size)) * sizeof(moe_real),
                            (void **)&g->rows) != MOE_OK ||
        !g->pbuf || !g->logits || !g->idx || !g->toks) {
        moe_gen_free(g);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for a cache of %lld tokens (%zu bytes)", fn,
                         (long long)g->cap, bytes);
    }
    *out = g;
    return MOE_OK;
}

MOE_API void moe_gen_reset(moe_gen *g) {
    int64_t k;
    if (!g) return;
    g->len = 0;
    for (k = 0; k < MOE__GEN_MAX_DRAFT; k++) g->mtp_len[k] = 0;
}
MOE_API int64_t moe_gen_len(const moe_gen *g) { return g ? g->len : 0; }
MOE_API int64_t moe_gen_capacity(const moe_gen *g) { return g ? g->cap : 0; }

MOE_API moe_status moe_gen_set_attn(moe_ctx *ctx, moe_gen *g, moe_gen_attn attn) {
    MOE__CHECK_CTX(ctx);
    if (!g) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_set_attn: gen is NULL");
    if ((int)attn < 0 || (int)attn > 2) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_set_attn: unknown mode %d", (int)attn);
    g->attn = attn;
    return MOE_OK;
}

MOE_API moe_status moe_gen_truncate(moe_ctx *ctx, moe_gen *g, int64_t len) {
    int64_t k;
    MOE__CHECK_CTX(ctx);
    if (!g) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_truncate: gen is NULL");
    if (len < 0 || len > g->len)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_truncate: length %lld is outside 0..%lld (the cached tokens)", (long long)len,
                         (long long)g->len);
    g->len = len;
    /* an MTP entry at position i was made from main-model state at i: drop those past len */
    for (k = 0; k < MOE__GEN_MAX_DRAFT; k++)
        if (g->mtp_len[k] > len) g->mtp_len[k] = len;
    return MOE_OK;
}

/* The session's contexts take the caller's settings, whole, for this call; decoding records
   no tape, adds nothing to the model's expert-load counts, and the crew threads (see below)
   compute on one thread each. */
static void moe__gen_begin(moe_ctx *ctx, moe_gen *g) {
    int i;
    for (i = 0; i < MOE__GEN_TEAM; i++) {
        g->w[i]->conf = ctx->conf;
        g->w[i]->conf.grad_enabled = 0;
        g->w[i]->conf.count_loads = 0; /* the model's expert-load counts are training's (rows of a pass would race on them) */
        if (i > 0) g->w[i]->conf.n_threads = 1;
        g->w[i]->error[0] = 0;
    }
}
/* Reset the session's arenas and pass an error on to ctx. */
static moe_status moe__gen_end(moe_ctx *ctx, moe_gen *g, moe_status st) {
    int i;
    for (i = 0; i < MOE__GEN_TEAM; i++) moe_ctx_reset(g->w[i]);
    if (st != MOE_OK) {
        for (i = 0; i < MOE__GEN_TEAM && !g->w[i]->error[0]; i++) {
        }
        if (i < MOE__GEN_TEAM) snprintf(ctx->error, sizeof ctx->error, "%s", g->w[i]->error);
        else if (!ctx->error[0]) moe__fail(ctx, st, "moe_gen: %s", moe_status_name(st));
    }
    return st;
}

static int moe__gen_naive(const moe_gen *g, int64_t n, int64_t pos0) {
    return g->attn == MOE_GEN_ATTN_NAIVE || (g->attn == MOE_GEN_ATTN_AUTO && pos0 == 0 && n > 1);
}
/* Whether a pass of n tokens at pos0 runs its rows one by one: absorbed attention, FP32, few
   tokens, on the CPU (the GEMMs' dot-product path, which gives every row the same bits in any
   pass; a GPU runs the rows together). */
static int moe__gen_by_rows(const moe_gen *g, int64_t n, int64_t pos0) {
    return !moe__gen_naive(g, n, pos0) && n <= MOE__GEN_ROWS && g->w[0]->conf.gemm_compute == MOE_F32 &&
           g->m->be->device == MOE_DEVICE_CPU && (n == 1 || g->w[0]->conf.n_threads > 1);
}

/* The caches of a pass: one per main layer, then the MTP modules'. */
static moe__kv_cache *moe__gen_caches(moe_gen *g, moe_ctx *w, int absorb, const moe__pass_sync *sync) {
    int64_t l, nl = g->m->cfg.num_hidden_layers + g->n_mtp;
    moe__kv_cache *c = (moe__kv_cache *)moe__arena_alloc(w, (size_t)nl, sizeof *c, "moe_gen");
    for (l = 0; c && l < nl; l++) {
        c[l].rows = moe__gen_layer_cache(g, l);
        c[l].absorb = absorb;
        c[l].sync = sync;
    }
    return c;
}

/* The index of the largest of n logits as float (the type the caller's logits have), ties to
   the lower; the logits are read where the host can see them. */
static moe_status moe__gen_argmax_dev(moe_ctx *w, const moe_tensor *lg, int64_t n, int32_t *out) {
    const moe_real *x = (const moe_real *)moe__host_data(w, lg->data, (size_t)n * sizeof(moe_real));
    int64_t i, best = 0;
    if (!x) return MOE_ERR_MEMORY;
    for (i = 1; i < n; i++)
        if ((float)x[i] > (float)x[best]) best = i;
    *out = (int32_t)best;
    return MOE_OK;
}

/* ---- a pass of rows one by one ---- */

/* What a pass of n tokens at positions pos0.. computes besides their cache rows: the logits
   of rows ≥ from (when want_logits), and (mtp_rows > 0) MTP module 1's entries for the first
   mtp_rows rows. An entry's next token is mtp_tok[t] (a draft: the entry is kept only if the
   draft is), or with mtp_tok NULL the row's own greedy token; then the module's head also
   drafts from the entry, into mtp_draft[t], for the rows where the accepted drafts may end
   (the last row, and rows whose greedy token is not the next row's token; −1 elsewhere): the
   draft for the next step is ready when the pass ends, made in parallel with the other rows'
   work. */
typedef struct moe__gen_pass {
    moe_gen *g;
    const int32_t *tokens;
    int64_t n, pos0, from;
    int want_logits;
    int64_t mtp_rows;
    const int32_t *mtp_tok;
    int32_t *mtp_draft;
    int team;                      /* threads on the pass */
    moe_status st[MOE__GEN_ROWS];  /* per row */
} moe__gen_pass;

/* Row t of pass p on context w: the main model, its logits, and its MTP entry. */
static moe_status moe__gen_row(const moe__gen_pass *p, moe_ctx *w, int64_t t) {
    moe_gen *g = p->g;
    moe_model *m = g->m;
    const moe_config *c = &m->cfg;
    const int64_t d = c->hidden_size, V = c->vocab_size, pos = p->pos0 + t;
    moe_real *rows_h = g->rows, *rows_mtp = g->rows + MOE__GEN_ROWS * d, *rows_lg = g->rows + 2 * MOE__GEN_ROWS * d;
    moe__pass_sync sync;
    moe__kv_cache *caches;
    moe_tensor *ids, *h, *lg = NULL, *aux = NULL;
    sync.progress = &g->progress[0][0];
    sync.row = t;
    caches = moe__gen_caches(g, w, 1, p->team > 1 ? &sync : NULL);
    if (!caches) return MOE_ERR_MEMORY;
    MOE__TRY(moe__ids(w, p->tokens + t, 1, 1, 1, 0, &ids));
    MOE__TRY(moe__model_trunk(w, m, ids, 1, 1, pos, caches, 0.0f, &h, &aux));
    MOE__TRY(MOE__BE(w)->copy(w, rows_h + t * d, h->data, (size_t)d * sizeof(moe_real), MOE__D2D));
    if (p->want_logits && t >= p->from) {
        MOE__TRY(moe_matmul(w, h, m->head, &lg));
        MOE__TRY(MOE__BE(w)->copy(w, rows_lg + (t - p->from) * V, lg->data, (size_t)V * sizeof(moe_real), MOE__D2D));
    }
    if (t < p->mtp_rows) {
        moe_tensor *eids, *hk, *kn, *lgk;
        int32_t tok;
        int drafts;
        if (p->mtp_tok) tok = p->mtp_tok[t];
        else MOE__TRY(moe__gen_argmax_dev(w, lg, V, &tok));
        /* the accepted drafts may end at this row unless its token is the next row's draft */
        drafts = p->mtp_draft && (t + 1 == p->n || tok != p->tokens[t + 1]);
        MOE__TRY(moe__ids(w, &tok, 1, 1, 1, 0, &eids));
        /* a later step reads only the entry's cache row unless the row drafts now or the entry
           feeds MTP module 2 */
        caches[c->num_hidden_layers].write_only = !drafts && g->n_mtp == 1;
        MOE__TRY(moe__mtp_forward(w, m, 0, h, eids, 1, 1, pos, &caches[c->num_hidden_layers], 0.0f, &hk, &aux));
        if (g->n_mtp > 1) MOE__TRY(MOE__BE(w)->copy(w, rows_mtp + t * d, hk->data, (size_t)d * sizeof(moe_real), MOE__D2D));
        if (p->mtp_draft) p->mtp_draft[t] = -1;
        if (drafts) {
            MOE__TRY(moe_rmsnorm(w, hk, m->mtp[0].head_norm, (float)c->rms_norm_eps, &kn));
            MOE__TRY(moe_matmul(w, kn, m->head, &lgk));
            MOE__TRY(moe__gen_argmax_dev(w, lgk, V, &p->mtp_draft[t]));
        }
    }
    moe_ctx_reset(w);
    return MOE_OK;
}

/* The rows tid, tid + team, … of pass p, in order, on the thread's own context. A row never
   waits for a later one, so the lowest unfinished row always runs; a row that fails marks
   all its cache rows written, so that the rows after it finish too (the pass then reports
   the failure). */
static void moe__gen_rows_body(moe__gen_pass *p, int tid, int team) {
    int64_t t;
    for (t = tid; t < p->n; t += team) {
        p->st[t] = moe__gen_row(p, p->g->w[tid], t);
        if (p->st[t] != MOE_OK) moe__count_add(&p->g->progress[t][0], INT64_MAX / 2);
    }
}

/* ---- the crew of a speculative generation ----
   A parallel region per verification pass costs about 1.2 µs (the second thread starts some
   0.5 µs after the first, the closing barrier takes 0.7 µs): 5% of a step of the tiny model.
   So a speculative generation on several threads decodes inside one region: thread 0 runs the
   generation, and the other threads, its crew, run their rows of every multi-token pass that
   thread 0 posts, spinning in between. When passes run faster serially (a busy machine, where
   a spinning thread only takes a core from others), thread 0 dismisses the crew for the rest
   of the generation. */

/* A crew thread: serve posted passes until told to stop. */
static void moe__gen_crew_serve(moe_gen *g, int tid) {
    int64_t served = 0;
    for (;;) {
        while (moe__count_read(&g->sync[MOE__GEN_POSTED][0]) == served)
            if (moe__count_read(&g->sync[MOE__GEN_STOP][0])) return;
        moe__count_await(&g->sync[MOE__GEN_POSTED][0], served + 1);
        served++;
        if (tid < g->pass->team) moe__gen_rows_body(g->pass, tid, g->pass->team);
        moe__count(&g->sync[MOE__GEN_FINISHED][0]);
    }
}

/* Thread 0: run pass p with the crew and wait for its parts. */
static void moe__gen_crew_pass(moe_gen *g, moe__gen_pass *p) {
    g->pass = p;
    moe__count(&g->sync[MOE__GEN_POSTED][0]);
    g->posts++;
    moe__gen_rows_body(p, 0, p->team);
    moe__count_await(&g->sync[MOE__GEN_FINISHED][0], g->posts * g->crew);
}

static void moe__gen_crew_dismiss(moe_gen *g) {
    if (g->crew) moe__count(&g->sync[MOE__GEN_STOP][0]);
    g->crew = 0;
}

/* Whether multi-token passes run with their tokens side by side: unless serial passes have
   been clearly faster (by a quarter, per token and block). */
static int moe__gen_par_preferred(const moe_gen *g) { return g->t_par == 0 || g->t_ser == 0 || g->t_par <= 1.25 * g->t_ser; }

static void moe__gen_team_body(void *arg, int tid, int team) { moe__gen_rows_body((moe__gen_pass *)arg, tid, team); }

/* Run pass p (rows one by one): one row on all the caller's threads, or several rows side by
   side — with the crew, in a region of their own, or serially, as timing says. */
static moe_status moe__gen_rows(moe_gen *g, moe__gen_pass *p) {
    int nt = g->w[0]->conf.n_threads, par, pref;
    int64_t t, blocks = g->m->cfg.num_hidden_layers;
    double t0;
    memset(g->progress, 0, sizeof g->progress);
    p->team = 1;
    if (p->n == 1 || nt == 1) {
        /* one token: the threads (if any) go into its big products */
        moe__gen_rows_body(p, 0, 1);
    } else {
        /* Tokens side by side pay off only while the cores are really ours: on a machine busy
           with other work a waiting thread can lose its core for a whole time slice. So both
           ways are timed (per token and block) and the faster is used, trying the other again
           every 16, 32, … passes. Side by side is only given up for a clear loss (per-pass
           times are noisy: a pass that happens to lose the core to a daemon must not decide
           it), and each speculative generation gives it a fresh chance with its crew
           (moe__gen_run): the first crew pass of a generation, which pays for waking the crew,
           is not timed. The results are the same bits either way. */
        pref = par = moe__gen_par_preferred(g);
        if (g->t_ser == 0 && g->t_par > 0 && g->n_small >= 4) par = 0; /* one early look at serial */
        if (g->n_small >= g->probe_at) {
            /* look at the other way again, less often each time it loses */
            par = !pref;
            g->probe_every = g->probe_every ? 2 * g->probe_every : 16;
            if (g->probe_every > 4096) g->probe_every = 4096;
            g->probe_at = g->n_small + g->probe_every;
        }
        if (g->in_region && !g->crew) par = 0; /* a region cannot open inside the crew's */
        g->n_small++;
        t0 = moe_time_s();
        if (par && g->crew) {
            p->team = g->crew + 1 < (int)p->n ? g->crew + 1 : (int)p->n;
            moe__gen_crew_pass(g, p);
        } else if (par) {
            p->team = nt < (int)p->n ? nt : (int)p->n;
            if (p->team > MOE__GEN_TEAM) p->team = MOE__GEN_TEAM; /* one worker context each */
            moe__team_run(p->team, moe__gen_team_body, p);
        } else {
            moe__gen_rows_body(p, 0, 1);
        }
        t0 = (moe_time_s() - t0) / (double)(p->n * blocks);
        if (!(par && g->crew && g->posts == 1)) {
            int was = g->t_par > 0 && g->t_ser > 0 ? moe__gen_par_preferred(g) : -1;
            if (par) g->t_par = g->t_par == 0 ? t0 : 0.8 * g->t_par + 0.2 * t0;
            else g->t_ser = g->t_ser == 0 ? t0 : 0.8 * g->t_ser + 0.2 * t0;
            if (was >= 0 && was != moe__gen_par_preferred(g)) g->probe_every = 0; /* the winner changed */
        }
        if (!moe__gen_par_preferred(g)) moe__gen_crew_dismiss(g); /* serial for the rest of this generation */
    }
    for (t = 0; t < p->n; t++)
        if (p->st[t] != MOE_OK) return p->st[t];
    return MOE_OK;
}

/* The main model over n tokens at g->len..: caches them, keeps their final normed hidden
   states in *hout (device rows, valid until the next pass) and in the ring, writes the logits
   of the last logit_rows rows to `logits` (host floats). With mtp_rows > 0 the pass also makes
   MTP module 1's entries for its first mtp_rows rows (moe__gen_pass): with the drafts
   tokens[t + 1] as next tokens, or, with mtp_draft given (then mtp_rows = logit_rows = n),
   with each row's greedy token, drafting into mtp_draft. */
static moe_status moe__gen_main(moe_gen *g, const int32_t *tokens, int64_t n, int64_t logit_rows, float *logits,
                                const moe_real **hout, int64_t mtp_rows, int32_t *mtp_draft) {
    moe_ctx *w = g->w[0];
    moe_model *m = g->m;
    const moe_config *c = &m->cfg;
    int64_t d = c->hidden_size, t, pos0 = g->len, V = c->vocab_size;
    const moe_real *h, *lg;
    if (moe__gen_by_rows(g, n, pos0)) {
        moe__gen_pass p;
        memset(&p, 0, sizeof p);
        p.g = g;
        p.tokens = tokens;
        p.n = n;
        p.pos0 = pos0;
        p.from = n - logit_rows;
        p.want_logits = logits && logit_rows > 0;
        if (mtp_rows > 0) {
            /* MTP module 1 at positions pos0..pos0+mtp_rows-1 */
            MOE_ASSERT(g->n_mtp > 0 && g->mtp_len[0] == pos0);
            MOE_ASSERT(mtp_draft ? mtp_rows == n && logit_rows == n : mtp_rows < n);
            p.mtp_rows = mtp_rows;
            p.mtp_tok = mtp_draft ? NULL : tokens + 1;
            p.mtp_draft = mtp_draft;
        }
        MOE__TRY(moe__gen_rows(g, &p));
        h = g->rows;
        lg = g->rows + 2 * MOE__GEN_ROWS * d;
        for (t = 0; g->n_mtp > 1 && t < mtp_rows; t++)
            MOE__TRY(MOE__BE(w)->copy(w, moe__gen_ring(g, 1, pos0 + t), g->rows + (MOE__GEN_ROWS + t) * d,
                                      (size_t)d * sizeof(moe_real), MOE__D2D));
        if (mtp_rows > 0) g->mtp_len[0] = pos0 + mtp_rows;
    } else {
        /* all rows together: the pass's tensors stay in the first context's arena until the
           caller resets it */
        moe__kv_cache *caches = moe__gen_caches(g, w, !moe__gen_naive(g, n, pos0), NULL);
        moe_tensor *ids, *ht, *last, *lt = NULL, *aux = NULL;
        int64_t shape[2];
        MOE_ASSERT(mtp_rows == 0);
        if (!caches) return MOE_ERR_MEMORY;
        MOE__TRY(moe__ids(w, tokens, 1, n, n, 0, &ids));
        MOE__TRY(moe__model_trunk(w, m, ids, 1, n, pos0, caches, 0.0f, &ht, &aux));
        if (logits && logit_rows > 0) {
            shape[0] = logit_rows;
            shape[1] = d;
            MOE__TRY(moe_tensor_view(w, ht, 2, shape, (n - logit_rows) * d, &last));
            MOE__TRY(moe_matmul(w, last, m->head, &lt));
        }
        h = MOE__F32(ht);
        lg = lt ? MOE__F32(lt) : NULL;
    }
    for (t = n > g->ring_n ? n - g->ring_n : 0; t < n; t++)
        MOE__TRY(MOE__BE(w)->copy(w, moe__gen_ring(g, 0, pos0 + t), h + t * d, (size_t)d * sizeof(moe_real), MOE__D2D));
    if (logits && logit_rows > 0) MOE__TRY(moe__download_floats(w, logits, lg, logit_rows * V));
    g->len += n;
    if (hout) *hout = h;
    return MOE_OK;
}

MOE_API moe_status moe_gen_forward(moe_ctx *ctx, moe_gen *g, const int32_t *tokens, int64_t n, int64_t logit_rows,
                                   float *logits) {
    static const char *fn = "moe_gen_forward";
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!g || !tokens) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL gen or tokens", fn);
    if (n < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: n must be positive, got %lld", fn, (long long)n);
    if (logit_rows < 0 || logit_rows > n || (logit_rows > 0 && !logits))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: logit_rows %lld must be 0..n (%lld) with a logits buffer when > 0", fn,
                         (long long)logit_rows, (long long)n);
    if (n > g->cap - g->len)
        return moe__fail(ctx, MOE_ERR_SHAPE,
                         "%s: %lld cached + %lld new tokens exceed the cache capacity of %lld tokens (max_position_embeddings %lld)",
                         fn, (long long)g->len, (long long)n, (long long)g->cap, (long long)g->m->cfg.max_position_embeddings);
    if (g->m->be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "%s: the model lives on another device", fn);
    MOE__TRY(moe__check_vocab(ctx, fn, g->m, tokens, n));
    moe__gen_begin(ctx, g);
    st = moe__gen_main(g, tokens, n, logit_rows, logits, NULL, 0, NULL);
    return moe__gen_end(ctx, g, st);
}

/* ---- sampling ---- */

/* Indices by descending value, ties to the lower index: a stable bottom-up merge sort (qsort
   is neither stable nor given a context pointer in C99). */
static void moe__gen_sort_desc(const float *p, int32_t *idx, int32_t *tmp, int64_t n) {
    int64_t width, i;
    for (i = 0; i < n; i++) idx[i] = (int32_t)i;
    for (width = 1; width < n; width *= 2) {
        for (i = 0; i < n; i += 2 * width) {
            int64_t lo = i, mid = i + width < n ? i + width : n, hi = i + 2 * width < n ? i + 2 * width : n;
            int64_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi) tmp[k++] = (p[idx[b]] > p[idx[a]]) ? idx[b++] : idx[a++];
            while (a < mid) tmp[k++] = idx[a++];
            while (b < hi) tmp[k++] = idx[b++];
        }
        memcpy(idx, tmp, (size_t)n * sizeof(int32_t));
    }
}

static int32_t moe__gen_argmax(const float *x, int64_t n) {
    int64_t i, best = 0;
    for (i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

/* probs from logits under s; idx and tmp: [V] scratch for top-k / top-p. */
static void moe__gen_probs(const float *logits, int64_t V, const moe_sampling *s, float *probs, int32_t *idx, int32_t *tmp) {
    int64_t i, keep = V;
    double mx = -INFINITY, sum = 0;
    if (!(s->temperature > 0)) {
        int32_t a = moe__gen_argmax(logits, V);
        for (i = 0; i < V; i++) probs[i] = 0;
        probs[a] = 1;
        return;
    }
    for (i = 0; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    for (i = 0; i < V; i++) sum += (probs[i] = (float)exp(((double)logits[i] - mx) / (double)s->temperature));
    for (i = 0; i < V; i++) probs[i] = (float)((double)probs[i] / sum);
    if ((s->top_k > 0 && s->top_k < V) || (s->top_p > 0 && s->top_p < 1)) {
        moe__gen_sort_desc(probs, idx, tmp, V);
        if (s->top_k > 0 && s->top_k < V) keep = s->top_k;
        if (s->top_p > 0 && s->top_p < 1) {
            double mass = 0, kept_mass = 0;
            int64_t j;
            for (j = 0; j < keep; j++) kept_mass += probs[idx[j]];
            for (j = 0; j < keep; j++) {
                mass += probs[idx[j]];
                if (mass >= (double)s->top_p * kept_mass) { keep = j + 1; break; }
            }
        }
        sum = 0;
        for (i = 0; i < keep; i++) sum += probs[idx[i]];
        for (i = keep; i < V; i++) probs[idx[i]] = 0;
        for (i = 0; i < keep; i++) probs[idx[i]] = (float)((double)probs[idx[i]] / sum);
    }
}

/* A draw from unnormalised weights p (≥ 0) with one uniform; NaN or zero mass → argmax. */
static int32_t moe__gen_draw(const float *p, int64_t V, moe_rng *rng) {
    double total = 0, u, acc = 0;
    int64_t i, last = -1;
    for (i = 0; i < V; i++)
        if (p[i] > 0) { total += p[i]; last = i; }
    u = (double)(moe_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0) * total;
    if (!(total > 0)) return moe__gen_argmax(p, V);
    for (i = 0; i < V; i++) {
        if (!(p[i] > 0)) continue;
        acc += p[i];
        if (u < acc) return (int32_t)i;
    }
    return (int32_t)last; /* u rounded up to the total */
}

/* Speculative sampling step (Leviathan et al. / Chen et al.): exact for any q. */
static int32_t moe__gen_verify(const float *p, const float *q, int64_t V, int32_t draft, moe_rng *rng, float *resid,
                               int *accepted) {
    double u = (double)(moe_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0), pd = p[draft], qd = q[draft];
    int64_t i;
    double mass = 0;
    if (qd > 0 && u * qd < pd) { /* u < p/q without dividing */
        *accepted = 1;
        return draft;
    }
    *accepted = 0;
    for (i = 0; i < V; i++) {
        double r = (double)p[i] - (double)q[i];
        resid[i] = r > 0 ? (float)r : 0.0f;
        mass += resid[i];
    }
    return moe__gen_draw(mass > 0 ? resid : p, V, rng);
}

static moe_status moe__gen_check_sampling(moe_ctx *ctx, const char *fn, const moe_sampling *s) {
    if (!s) return MOE_OK;
    if (!(s->temperature >= 0) || !isfinite(s->temperature) || s->top_k < 0 || !(s->top_p >= 0) || !isfinite(s->top_p))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: temperature and top_p must be finite and >= 0, top_k >= 0", fn);
    return MOE_OK;
}

MOE_API moe_status moe_gen_probs(moe_ctx *ctx, const float *logits, int64_t V, const moe_sampling *s, float *probs) {
    static const char *fn = "moe_gen_probs";
    moe_sampling greedy;
    int32_t *idx;
    MOE__CHECK_CTX(ctx);
    if (!logits || !probs || V < 1) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL logits/probs or vocab < 1", fn);
    MOE__TRY(moe__gen_check_sampling(ctx, fn, s));
    memset(&greedy, 0, sizeof greedy);
    if (!s) s = &greedy;
    idx = (int32_t *)moe__heap_alloc(ctx, (size_t)V * 2 * sizeof(int32_t));
    if (!idx) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    moe__gen_probs(logits, V, s, probs, idx, idx + V);
    MOE_FREE(idx);
    return MOE_OK;
}

MOE_API moe_status moe_gen_sample_probs(moe_ctx *ctx, const float *probs, int64_t V, moe_rng *rng, int32_t *token) {
    MOE__CHECK_CTX(ctx);
    if (!probs || !rng || !token || V < 1) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_sample_probs: NULL argument or vocab < 1");
    *token = moe__gen_draw(probs, V, rng);
    return MOE_OK;
}

MOE_API moe_status moe_gen_verify_draft(moe_ctx *ctx, const float *p, const float *q, int64_t V, int32_t draft, moe_rng *rng,
                                        int32_t *token, int *accepted) {
    float *resid;
    MOE__CHECK_CTX(ctx);
    if (!p || !q || !rng || !token || !accepted || V < 1)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_verify_draft: NULL argument or vocab < 1");
    if (draft < 0 || draft >= V) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_verify_draft: draft %d outside [0, %lld)", (int)draft, (long long)V);
    resid = (float *)moe__heap_alloc(ctx, (size_t)V * sizeof(float));
    if (!resid) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_gen_verify_draft: out of memory");
    *token = moe__gen_verify(p, q, V, draft, rng, resid, accepted);
    MOE_FREE(resid);
    return MOE_OK;
}

/* ---- speculative decoding with the MTP modules ---- */

/* Token at position j of the running sequence: committed/pending ones from g->toks (up to
   position L, the pending token), drafts after that. */
static int32_t moe__gen_tok(const moe_gen *g, int64_t L, const int32_t *drafts, int64_t j) {
    return j <= L ? g->toks[j] : drafts[j - L - 1];
}

/* Bring MTP module k (0-based) up to the committed length L and draft from its last position
   (L-1): depth k+1 at position i reads Emb(t_{i+k+1}) and h^k_i (reference §4.1). Hidden
   inputs come from `hin` (rows for positions hin0..) when given, else from the ring; the
   module's outputs for its new positions go to *hout (rows for positions *hout0.., in the
   first context's arena until the step ends). */
static moe_status moe__gen_mtp(moe_gen *g, int64_t k, int64_t L, const int32_t *drafts, const moe_real *hin, int64_t hin0,
                               float *logits, const moe_real **hout, int64_t *hout0) {
    moe_ctx *w = g->w[0];
    moe_model *m = g->m;
    const moe_config *c = &m->cfg;
    int64_t d = c->hidden_size, i0 = g->mtp_len[k], n = L - i0, t, shape[3];
    int32_t *toks = (int32_t *)moe__arena_alloc(w, (size_t)n, sizeof(int32_t), "moe_gen mtp");
    moe_tensor *h, *eids, *hk, *last, *kn, *lg, *aux = NULL;
    moe__kv_cache cache;
    MOE_ASSERT(n >= 1);
    if (!toks) return MOE_ERR_MEMORY;
    shape[0] = 1;
    shape[1] = n;
    shape[2] = d;
    MOE__TRY(moe__tensor_out(w, 3, shape, &h));
    for (t = 0; t < n; t++) {
        int64_t pos = i0 + t;
        const moe_real *hp = hin && pos >= hin0 ? hin + (pos - hin0) * d : moe__gen_ring(g, k, pos);
        MOE__TRY(MOE__BE(w)->copy(w, MOE__F32(h) + t * d, hp, (size_t)d * sizeof(moe_real), MOE__D2D));
        toks[t] = moe__gen_tok(g, L, drafts, pos + k + 1);
    }
    MOE__TRY(moe__ids(w, toks, 1, n, n, 0, &eids));
    memset(&cache, 0, sizeof cache);
    cache.rows = moe__gen_layer_cache(g, c->num_hidden_layers + k);
    cache.absorb = !moe__gen_naive(g, n, i0);
    MOE__TRY(moe__mtp_forward(w, m, k, h, eids, 1, n, i0, &cache, 0.0f, &hk, &aux));
    /* the draft's logits: the shared head after this module's shared_head.norm */
    shape[1] = 1;
    MOE__TRY(moe_tensor_view(w, hk, 3, shape, (n - 1) * d, &last));
    MOE__TRY(moe_rmsnorm(w, last, m->mtp[k].head_norm, (float)c->rms_norm_eps, &kn));
    MOE__TRY(moe_matmul(w, kn, m->head, &lg));
    MOE__TRY(moe__download_floats(w, logits, MOE__F32(lg), c->vocab_size));
    for (t = n > g->ring_n ? n - g->ring_n : 0; t < n; t++)
        MOE__TRY(MOE__BE(w)->copy(w, moe__gen_ring(g, k + 1, i0 + t), MOE__F32(hk) + t * d, (size_t)d * sizeof(moe_real),
                                  MOE__D2D));
    g->mtp_len[k] = L;
    *hout = MOE__F32(hk);
    *hout0 = i0;
    return MOE_OK;
}

/* Draft tokens k0..nd-1 after the pending token toks[L] (drafts[0..k0) are made already);
   q[k] gets draft k's distribution. */
static moe_status moe__gen_draft(moe_gen *g, int64_t L, int64_t k0, int64_t nd, const moe_sampling *s, moe_rng *rng,
                                 const moe_real *h0, int64_t h00, int32_t *drafts, float *lg, float **q, int32_t *tmp) {
    const moe_real *hin = h0;
    int64_t k, hin0 = h00, V = g->m->cfg.vocab_size;
    for (k = k0; k < nd; k++) {
        const moe_real *hk;
        int64_t hk0;
        MOE__TRY(moe__gen_mtp(g, k, L, drafts, hin, hin0, lg, &hk, &hk0));
        if (s->temperature > 0) {
            moe__gen_probs(lg, V, s, q[k], g->idx, tmp);
            drafts[k] = moe__gen_draw(q[k], V, rng);
        } else {
            drafts[k] = moe__gen_argmax(lg, V);
        }
        hin = hk;
        hin0 = hk0;
    }
    return MOE_OK;
}

typedef struct moe__gen_out {
    int32_t *out;
    int64_t cap, n, max;
    const char *stop;
    size_t stop_len;
    const moe_gen_opts *o;
    moe_gen_stop reason;
    int done, max_is_cache; /* max came from the cache's room, not from max_tokens */
} moe__gen_out;

/* Hand one token to the caller; sets done when a stop condition holds. */
static void moe__gen_emit(moe__gen_out *E, int32_t tok) {
    if (E->done) return;
    E->out[E->n++] = tok;
    if (E->o->on_token && E->o->on_token(E->o->user, tok)) { E->done = 1; E->reason = MOE_GEN_STOP_CALLBACK; }
    if (!E->done && E->stop_len && (size_t)E->n >= E->stop_len) {
        size_t i;
        int match = 1;
        for (i = 0; i < E->stop_len && match; i++)
            match = E->out[E->n - (int64_t)E->stop_len + (int64_t)i] == (int32_t)(unsigned char)E->stop[i];
        if (match) { E->done = 1; E->reason = MOE_GEN_STOP_STRING; }
    }
    if (!E->done && E->n >= E->max) {
        E->done = 1;
        E->reason = E->max_is_cache ? MOE_GEN_STOP_CACHE_FULL : MOE_GEN_STOP_MAX_TOKENS;
    }
}

/* What a generation carries from its prompt into its decoding steps. */
typedef struct moe__gen_state {
    moe_sampling s;
    moe_rng rng;
    float *P[MOE__GEN_MAX_DRAFT + 1], *Q[MOE__GEN_MAX_DRAFT + 1]; /* target and draft distributions */
    int32_t drafts[MOE__GEN_MAX_DRAFT + 1];
    int64_t L, nd; /* position of the pending token; drafts per step */
} moe__gen_state;

/* The decoding steps after the prompt, until a stop condition. */
static moe_status moe__gen_decode(moe_gen *g, moe__gen_state *R, moe__gen_out *E, moe_gen_stats *S) {
    moe_ctx *w = g->w[0];
    int64_t V = g->m->cfg.vocab_size, L = R->L, nd = R->nd, k;
    const moe_sampling *s = &R->s;
    moe_rng *rng = &R->rng;
    float **P = R->P, **Q = R->Q, *lg = g->logits;
    int32_t *drafts = R->drafts, *tmp = g->idx + V;
    int greedy = !(s->temperature > 0);
    while (!E->done) {
        int64_t nv, a = 0, j;
        int32_t next = 0, in[MOE__GEN_MAX_DRAFT + 1], next_draft[MOE__GEN_MAX_DRAFT + 1];
        int fused;
        if (L + 1 > g->cap) { E->done = 1; E->reason = MOE_GEN_STOP_CACHE_FULL; break; }
        /* drafts this step: those already made, fewer near the end of the cache or output */
        nv = nd;
        if (nv > g->cap - L - 1) nv = g->cap - L - 1;
        if (nv > E->max - E->n - 1) nv = E->max - E->n - 1;
        if (nv < 0) nv = 0;
        if (nd > 0 && g->mtp_len[0] < L && nv > 0) {
            /* drafts were not made at the end of the last step (shortened step): make them now */
            MOE__TRY(moe__gen_draft(g, L, 0, nv, s, rng, NULL, 0, drafts, lg, Q, tmp));
        }
        in[0] = g->toks[L];
        for (j = 0; j < nv; j++) in[j + 1] = drafts[j];
        /* The pass also makes MTP module 1's entries: greedy, for every row with the row's own
           token, drafting the next step's first draft on the way; else for the pending token
           and all drafts but the last, assuming the drafts are right. Entries past a rejection
           are dropped below. */
        fused = nv > 0 && g->mtp_len[0] == L && moe__gen_by_rows(g, nv + 1, L);
        MOE__TRY(moe__gen_main(g, in, nv + 1, nv + 1, lg, NULL, fused ? (greedy ? nv + 1 : nv) : 0,
                               fused && greedy ? next_draft : NULL));
        S->main_passes++;
        S->drafted += nv;
        /* keep the longest accepted prefix */
        for (j = 0; j < nv; j++) {
            if (greedy) {
                next = moe__gen_argmax(lg + j * V, V);
                if (next != drafts[j]) break;
            } else {
                int acc;
                moe__gen_probs(lg + j * V, V, s, P[j], g->idx, tmp);
                next = moe__gen_verify(P[j], Q[j], V, drafts[j], rng, P[MOE__GEN_MAX_DRAFT], &acc);
                if (!acc) break;
            }
            a++;
        }
        if (a == nv) { /* every draft kept: the last row gives one more token */
            if (greedy) next = moe__gen_argmax(lg + nv * V, V);
            else {
                moe__gen_probs(lg + nv * V, V, s, P[nv], g->idx, tmp);
                next = moe__gen_draw(P[nv], V, rng);
            }
        }
        S->accepted += a;
        /* the cache keeps the pending token and the accepted drafts */
        g->len = L + 1 + a;
        for (k = 0; k < g->n_mtp; k++) {
            /* MTP entry i of depth k+1 read token i+k+1: valid while that was committed (or,
               made greedily in the pass, is the new pending token) */
            int64_t valid = L + a - k + (k == 0 && fused && greedy);
            if (g->mtp_len[k] > valid) g->mtp_len[k] = valid < 0 ? 0 : valid;
        }
        for (j = 0; j < a; j++) g->toks[L + 1 + j] = drafts[j];
        L += 1 + a;
        g->toks[L] = next;
        for (j = 0; j < a && !E->done; j++) moe__gen_emit(E, drafts[j]);
        moe__gen_emit(E, next);
        if (!E->done && nd > 0) {
            nv = nd;
            if (nv > g->cap - L - 1) nv = g->cap - L - 1;
            if (nv > E->max - E->n - 1) nv = E->max - E->n - 1;
            if (nv > 0 && fused && greedy) {
                drafts[0] = next_draft[a]; /* made in the pass from the row that gave `next` */
                MOE_ASSERT(drafts[0] >= 0);
                MOE__TRY(moe__gen_draft(g, L, 1, nv, s, rng, NULL, 0, drafts, lg, Q, tmp));
            } else if (nv > 0) {
                MOE__TRY(moe__gen_draft(g, L, 0, nv, s, rng, NULL, 0, drafts, lg, Q, tmp));
            }
        }
        moe_ctx_reset(w);
    }
    return MOE_OK;
}

/* A speculative generation inside its crew's region: thread 0 decodes, the others serve. */
typedef struct moe__gen_crew_job {
    moe_gen *g;
    moe__gen_state *R;
    moe__gen_out *E;
    moe_gen_stats *S;
    moe_status st;
} moe__gen_crew_job;
static void moe__gen_crew_body(void *arg, int tid, int team) {
    moe__gen_crew_job *J = (moe__gen_crew_job *)arg;
    if (tid == 0) {
        J->g->crew = team - 1;
        J->st = moe__gen_decode(J->g, J->R, J->E, J->S);
        moe__gen_crew_dismiss(J->g);
    } else {
        moe__gen_crew_serve(J->g, tid);
    }
}

static moe_status moe__gen_run(moe_gen *g, const int32_t *prompt, int64_t np, const moe_gen_opts *o, moe__gen_out *E,
                               moe_gen_stats *S) {
    moe_ctx *w = g->w[0];
    const moe_config *c = &g->m->cfg;
    int64_t V = c->vocab_size, L = np, k;
    moe__gen_state R;
    float *lg = g->logits;
    int32_t *tmp = g->idx + V;
    const moe_real *h0;
    double t0 = moe_time_s(), t1;
    moe_status st = MOE_OK;
    int team;
    memset(&R, 0, sizeof R);
    R.s = o->sampling;
    R.rng = moe_rng_new(o->seed, 0x6E6E);
    for (k = 0; k <= MOE__GEN_MAX_DRAFT; k++) {
        R.P[k] = g->pbuf + (2 * k) * V;
        R.Q[k] = g->pbuf + (2 * k + 1) * V;
    }
    if (o->speculative) {
        R.nd = o->n_draft > 0 ? o->n_draft : g->n_mtp;
        if (R.nd > g->n_mtp) R.nd = g->n_mtp;
    }
    memcpy(g->toks, prompt, (size_t)np * sizeof(int32_t));
    /* the prompt */
    MOE__TRY(moe__gen_main(g, prompt, np, 1, lg, &h0, 0, NULL));
    S->main_passes++;
    if (!(R.s.temperature > 0)) g->toks[L] = moe__gen_argmax(lg, V);
    else {
        moe__gen_probs(lg, V, &R.s, R.P[0], g->idx, tmp);
        g->toks[L] = moe__gen_draw(R.P[0], V, &R.rng);
    }
    moe__gen_emit(E, g->toks[L]);
    if (R.nd > 0 && !E->done && L + 1 < g->cap) {
        /* the MTP caches over the prompt: part of the prompt's cost */
        int64_t n1 = R.nd < g->cap - L - 1 ? R.nd : g->cap - L - 1;
        MOE__TRY(moe__gen_draft(g, L, 0, n1, &R.s, &R.rng, h0, 0, R.drafts, lg, R.Q, tmp));
    }
    R.L = L;
    t1 = moe_time_s();
    S->prefill_s = t1 - t0;
    moe_ctx_reset(w); /* the prompt's activations are not needed any more */
    /* speculative steps verify 1 + nd tokens: with a crew when they run side by side */
    team = w->conf.n_threads < R.nd + 1 ? w->conf.n_threads : (int)R.nd + 1;
    if (team > 1 && moe__gen_by_rows(g, R.nd + 1, L)) {
        moe__gen_crew_job J;
        if (!moe__gen_par_preferred(g)) g->t_par = 0; /* side by side lost last time: time it afresh */
        memset(g->sync, 0, sizeof g->sync);
        g->posts = 0;
        g->in_region = 1;
        J.g = g; J.R = &R; J.E = E; J.S = S; J.st = MOE_OK;
        moe__team_run(team, moe__gen_crew_body, &J);
        st = J.st;
        g->in_region = 0;
    } else {
        st = moe__gen_decode(g, &R, E, S);
    }
    S->decode_s = moe_time_s() - t1;
    return st;
}

MOE_API moe_status moe_gen_generate(moe_ctx *ctx, moe_gen *g, const int32_t *prompt, int64_t np, const moe_gen_opts *opts,
                                    int32_t *out, int64_t cap, int64_t *n_out, moe_gen_stats *stats) {
    static const char *fn = "moe_gen_generate";
    moe__gen_out E;
    moe_gen_stats S;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (n_out) *n_out = 0;
    if (!g || !prompt || !opts || !out || !n_out) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL gen, prompt, opts, out or n_out", fn);
    if (np < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the prompt needs at least one token", fn);
    if (cap < 1) return moe__fail(ctx, MOE_ERR_ARG, "%s: the output buffer needs room for at least one token", fn);
    MOE__TRY(moe__gen_check_sampling(ctx, fn, &opts->sampling));
    if (opts->max_tokens < 0 || opts->n_draft < 0) return moe__fail(ctx, MOE_ERR_ARG, "%s: max_tokens and n_draft must be >= 0", fn);
    if (opts->n_draft > g->n_mtp && opts->speculative)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: n_draft %lld exceeds the model's %lld MTP modules", fn, (long long)opts->n_draft,
                         (long long)g->n_mtp);
    if (np > g->cap)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the prompt (%lld tokens) exceeds the cache capacity of %lld tokens", fn,
                         (long long)np, (long long)g->cap);
    /* the last generated token is never fed back, so prompt + max_tokens − 1 must fit */
    if (opts->max_tokens > 0 && opts->max_tokens - 1 > g->cap - np)
        return moe__fail(ctx, MOE_ERR_SHAPE,
                         "%s: prompt %lld + max_tokens %lld need %lld cache positions, the cache holds %lld (max_position_embeddings %lld)",
                         fn, (long long)np, (long long)opts->max_tokens, (long long)(np + opts->max_tokens - 1), (long long)g->cap,
                         (long long)g->m->cfg.max_position_embeddings);
    if (g->m->be != MOE__BE(ctx)) return moe__fail(ctx, MOE_ERR_ARG, "%s: the model lives on another device", fn);
    MOE__TRY(moe__check_vocab(ctx, fn, g->m, prompt, np));
    memset(&E, 0, sizeof E);
    E.out = out;
    E.cap = cap;
    E.o = opts;
    E.max = opts->max_tokens > 0 ? opts->max_tokens : g->cap - np + 1;
    E.max_is_cache = opts->max_tokens == 0;
    if (E.max > cap) {
        E.max = cap;
        E.max_is_cache = 0;
    }
    E.stop = opts->stop;
    E.stop_len = opts->stop ? strlen(opts->stop) : 0;
    memset(&S, 0, sizeof S);
    moe_gen_reset(g);
    moe__gen_begin(ctx, g);
    st = moe__gen_run(g, prompt, np, opts, &E, &S);
    st = moe__gen_end(ctx, g, st);
    S.prompt_tokens = np;
    S.new_tokens = E.n;
    S.stop = E.reason;
    S.acceptance = S.drafted ? (double)S.accepted / (double)S.drafted : 0;
    S.tok_s = S.decode_s > 0 && E.n > 1 ? (double)(E.n - 1) / S.decode_s : 0;
    moe_gen_cache_bytes(g->m, &S.cache_bytes_per_token, &S.mha_cache_bytes_per_token);
    if (stats) *stats = S;
    *n_out = E.n;
    return st;
}

/* ============================================================================================
   14. gpu — the CUDA backend (moe_cuda.cuh, nvcc with MOE_CUDA)                          >>gpu
   ============================================================================================ */
#if defined(MOE_CUDA) && defined(__CUDACC__)
#include "moe_cuda.cuh"
#endif

/* ============================================================================================
   15. dist — the communicator (SELF, MPI, NCCL), data and expert parallelism, ZeRO-1   >>dist
   ============================================================================================
   A backend fills moe__comm_ops with the primitives (barrier, broadcast, all-reduce,
   all-gather and all-to-all with per-rank counts, the latter also without waiting, split,
   release) and says where its buffers live (the receive buffer of the ordered sums and their
   block sum are its entries too); the rank-ordered sums, the uniform all-to-all, the row
   exchange and the config check are written once above them. SELF and MPI are here; NCCL is
   moe_cuda.cuh's section 9, included below the bootstrap helpers it uses. */

typedef struct moe__comm_ops moe__comm_ops;
struct moe_comm {
    const moe__comm_ops *ops;
    int rank, size;
    int owns_runtime; /* this communicator initialised MPI: freeing it finalises MPI */
    void *scratch;        /* the ordered sums' receive buffer, kept between calls (fresh */
    size_t scratch_bytes; /* memory each time cost 3-4x the all-gather in page faults) */
    int64_t bytes_in;     /* received from the other ranks (moe_comm_bytes_received) */
    int64_t overlapped;   /* exchanges still in flight when work beside them tested them */
    void *impl;           /* a backend's own state (NCCL: struct moe__nccl), freed by release */
#ifdef MOE_MPI
    MPI_Comm mpi;
#endif
};
/* An all-to-all-v posted and not yet waited for (moe__comm_alltoallv_start … moe__comm_wait). */
typedef struct moe__comm_req {
    int started, done; /* posted; completed (SELF and NCCL: at once) */
    int tested;        /* a test found it in flight */
    int64_t from_others; /* elements it brings from the other ranks (counted when it completes) */
    moe_comm_type type;
    void *mem;         /* the backend's memory for it, freed when it completes (MPI: its int counts) */
#ifdef MOE_MPI
    MPI_Request mpi;
#endif
} moe__comm_req;
/* Counts and offsets are per rank, in elements. */
struct moe__comm_ops {
    moe_device device; /* where the collectives' buffers live: MOE_DEVICE_CPU (host) or the GPU */
    moe_status (*barrier)(moe_ctx *ctx, moe_comm *c);
    moe_status (*bcast)(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, int root);
    moe_status (*allreduce)(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, moe_comm_op op);
    moe_status (*allgatherv)(moe_ctx *ctx, moe_comm *c, const void *send, void *recv, const int64_t *counts,
                             const int64_t *offsets, moe_comm_type t);
    moe_status (*alltoallv)(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *send_counts, const int64_t *send_offsets,
                            void *recv, const int64_t *recv_counts, const int64_t *recv_offsets, moe_comm_type t);
    /* alltoallv without waiting: posted into *req (done set if it completed at once); test
       lets it progress and sets done when it has completed (MPI's shared-memory transport
       moves data only inside MPI calls); wait completes it. Buffers stay untouched until then. */
    moe_status (*alltoallv_start)(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *send_counts,
                                  const int64_t *send_offsets, void *recv, const int64_t *recv_counts, const int64_t *recv_offsets,
                                  moe_comm_type t, moe__comm_req *req);
    moe_status (*test)(moe_ctx *ctx, moe_comm *c, moe__comm_req *req);
    moe_status (*wait)(moe_ctx *ctx, moe_comm *c, moe__comm_req *req);
    moe_status (*split)(moe_ctx *ctx, moe_comm *c, int color, int key, moe_comm *out);
    void (*release)(moe_comm *c);
    /* The ordered sums' receive buffer of at least `bytes`, kept by the communicator (NULL and
       MOE_ERR_MEMORY when it cannot grow), and their sum: out = ((b_0 + b_1) + b_2) + … over
       nb blocks of n elements in that buffer, out where the collectives' buffers live. */
    void *(*scratch)(moe_ctx *ctx, moe_comm *c, size_t bytes, const char *fn);
    moe_status (*sum_blocks)(moe_ctx *ctx, moe_comm *c, const void *blocks, int nb, int64_t n, moe_comm_type t, void *out);
};

static size_t moe__comm_type_size(moe_comm_type t) {
    switch (t) {
    case MOE_COMM_F32: case MOE_COMM_I32: return 4;
    case MOE_COMM_F64: case MOE_COMM_I64: return 8;
    case MOE_COMM_BYTE: return 1;
    }
    return 0;
}

/* out[i] = ((b_0[i] + b_1[i]) + b_2[i]) + … over nb blocks of n elements, block j at
   blocks + j·n (out may not overlap them). */
static void moe__comm_sum_blocks(const void *blocks, int nb, int64_t n, moe_comm_type t, void *out) {
    int64_t i;
    int j;
#define MOE__SUM_BLOCKS(T)                                                                   \
    {                                                                                        \
        const T *b = (const T *)blocks;                                                      \
        T *o = (T *)out;                                                                     \
        for (i = 0; i < n; i++) o[i] = b[i];                                                 \
        for (j = 1; j < nb; j++)                                                             \
            for (i = 0; i < n; i++) o[i] += b[(int64_t)j * n + i];                           \
    }
    switch (t) {
    case MOE_COMM_F32: MOE__SUM_BLOCKS(float) break;
    case MOE_COMM_F64: MOE__SUM_BLOCKS(double) break;
    case MOE_COMM_I32: MOE__SUM_BLOCKS(uint32_t) break; /* integers wrap around, as MPI's do */
    case MOE_COMM_I64: MOE__SUM_BLOCKS(uint64_t) break;
    case MOE_COMM_BYTE: break;
    }
#undef MOE__SUM_BLOCKS
}

/* The host backends' scratch and sum entries: a heap buffer kept in the communicator. */
static void *moe__comm_scratch(moe_ctx *ctx, moe_comm *c, size_t bytes, const char *fn) {
    if (bytes > c->scratch_bytes) {
        void *p = MOE_REALLOC(c->scratch, bytes);
        if (!p) {
            moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for %zu bytes of receive buffer", fn, bytes);
            return NULL;
        }
        c->scratch = p;
        c->scratch_bytes = bytes;
    }
    return c->scratch;
}
static moe_status moe__comm_host_sum(moe_ctx *ctx, moe_comm *c, const void *blocks, int nb, int64_t n, moe_comm_type t,
                                     void *out) {
    (void)ctx; (void)c;
    moe__comm_sum_blocks(blocks, nb, n, t, out);
    return MOE_OK;
}

/* The non-blocking entries of a backend whose all-to-all-v completes in the call (SELF; NCCL,
   whose collectives are ordered on a stream instead): the exchange done at once, nothing in
   flight to test or wait for. */
static moe_status moe__comm_start_now(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *send_counts,
                                      const int64_t *send_offsets, void *recv, const int64_t *recv_counts,
                                      const int64_t *recv_offsets, moe_comm_type t, moe__comm_req *req) {
    MOE__TRY(c->ops->alltoallv(ctx, c, send, send_counts, send_offsets, recv, recv_counts, recv_offsets, t));
    req->done = 1;
    return MOE_OK;
}
static moe_status moe__comm_done_already(moe_ctx *ctx, moe_comm *c, moe__comm_req *req) {
    (void)ctx; (void)c; (void)req;
    return MOE_OK;
}

/* ---- SELF: one process ---- */

static moe_status moe__self_nothing(moe_ctx *ctx, moe_comm *c) {
    (void)ctx; (void)c;
    return MOE_OK;
}
static moe_status moe__self_bcast(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, int root) {
    (void)ctx; (void)c; (void)buf; (void)n; (void)t; (void)root;
    return MOE_OK;
}
static moe_status moe__self_allreduce(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, moe_comm_op op) {
    (void)ctx; (void)c; (void)buf; (void)n; (void)t; (void)op;
    return MOE_OK;
}
static moe_status moe__self_allgatherv(moe_ctx *ctx, moe_comm *c, const void *send, void *recv, const int64_t *counts,
                                       const int64_t *offsets, moe_comm_type t) {
    size_t es = moe__comm_type_size(t);
    (void)ctx; (void)c;
    if (counts[0] > 0) memmove((char *)recv + (size_t)offsets[0] * es, send, (size_t)counts[0] * es);
    return MOE_OK;
}
static moe_status moe__self_alltoallv(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *send_counts,
                                      const int64_t *send_offsets, void *recv, const int64_t *recv_counts,
                                      const int64_t *recv_offsets, moe_comm_type t) {
    size_t es = moe__comm_type_size(t);
    (void)c;
    if (send_counts[0] != recv_counts[0])
        return moe__fail(ctx, MOE_ERR_ARG, "comm: one process sends %lld elements to itself and receives %lld",
                         (long long)send_counts[0], (long long)recv_counts[0]);
    if (send_counts[0] > 0)
        memmove((char *)recv + (size_t)recv_offsets[0] * es, (const char *)send + (size_t)send_offsets[0] * es,
                (size_t)send_counts[0] * es);
    return MOE_OK;
}
static moe_status moe__self_split(moe_ctx *ctx, moe_comm *c, int color, int key, moe_comm *out) {
    (void)ctx; (void)c; (void)color; (void)key;
    out->rank = 0;
    out->size = 1;
    return MOE_OK;
}
static void moe__self_release(moe_comm *c) { (void)c; }

static const moe__comm_ops moe__comm_self = {MOE_DEVICE_CPU,         moe__self_nothing,      moe__self_bcast,
                                             moe__self_allreduce,    moe__self_allgatherv,   moe__self_alltoallv,
                                             moe__comm_start_now,    moe__comm_done_already, moe__comm_done_already,
                                             moe__self_split,        moe__self_release,      moe__comm_scratch,
                                             moe__comm_host_sum};

/* ---- MPI (MOE_MPI): host buffers, errors returned (MPI_ERRORS_RETURN) ---- */

#ifdef MOE_MPI
static moe_status moe__mpi_check(moe_ctx *ctx, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (rc == MPI_SUCCESS) return MOE_OK;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "error %d", rc);
    return moe__fail(ctx, MOE_ERR_COMM, "comm: %s failed: %s", what, msg);
}
static MPI_Datatype moe__mpi_type(moe_comm_type t) {
    switch (t) {
    case MOE_COMM_F32: return MPI_FLOAT;
    case MOE_COMM_F64: return MPI_DOUBLE;
    case MOE_COMM_I32: return MPI_INT32_T;
    case MOE_COMM_I64: return MPI_INT64_T;
    case MOE_COMM_BYTE: break;
    }
    return MPI_BYTE;
}
/* MPI counts are ints: values to int arrays, or an error naming the limit. */
static moe_status moe__mpi_ints(moe_ctx *ctx, const int64_t *v, int n, int *out) {
    int i;
    for (i = 0; i < n; i++) {
        if (v[i] > 2147483647)
            return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "comm: a message of %lld elements (MPI counts stop at 2^31 - 1)",
                             (long long)v[i]);
        out[i] = (int)v[i];
    }
    return MOE_OK;
}
static moe_status moe__mpi_barrier(moe_ctx *ctx, moe_comm *c) { return moe__mpi_check(ctx, MPI_Barrier(c->mpi), "MPI_Barrier"); }
static moe_status moe__mpi_bcast(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, int root) {
    int cnt = 0;
    MOE__TRY(moe__mpi_ints(ctx, &n, 1, &cnt));
    return moe__mpi_check(ctx, MPI_Bcast(buf, cnt, moe__mpi_type(t), root, c->mpi), "MPI_Bcast");
}
static moe_status moe__mpi_allreduce(moe_ctx *ctx, moe_comm *c, void *buf, int64_t n, moe_comm_type t, moe_comm_op op) {
    int cnt = 0;
    MOE__TRY(moe__mpi_ints(ctx, &n, 1, &cnt));
    return moe__mpi_check(ctx, MPI_Allreduce(MPI_IN_PLACE, buf, cnt, moe__mpi_type(t), op == MOE_COMM_MAX ? MPI_MAX : MPI_SUM, c->mpi),
                          "MPI_Allreduce");
}
static moe_status moe__mpi_allgatherv(moe_ctx *ctx, moe_comm *c, const void *send, void *recv, const int64_t *counts,
                                      const int64_t *offsets, moe_comm_type t) {
    int *ints = (int *)MOE_MALLOC((size_t)c->size * 2 * sizeof(int));
    moe_status st;
    if (!ints) return moe__fail(ctx, MOE_ERR_MEMORY, "comm: out of memory for %d ranks' counts", c->size);
    st = moe__mpi_ints(ctx, counts, c->size, ints);
    if (!st) st = moe__mpi_ints(ctx, offsets, c->size, ints + c->size);
    if (!st)
        st = moe__mpi_check(ctx, MPI_Allgatherv(send, ints[c->rank], moe__mpi_type(t), recv, ints, ints + c->size, moe__mpi_type(t), c->mpi),
                            "MPI_Allgatherv");
    MOE_FREE(ints);
    return st;
}
/* An all-to-all-v's counts and offsets as MPI's ints: send counts, send offsets, receive
   counts, receive offsets, P each (heap, the caller frees *out). */
static moe_status moe__mpi_alltoallv_ints(moe_ctx *ctx, const moe_comm *c, const int64_t *send_counts, const int64_t *send_offsets,
                                          const int64_t *recv_counts, const int64_t *recv_offsets, int **out) {
    int P = c->size, *ints = (int *)MOE_MALLOC((size_t)P * 4 * sizeof(int));
    moe_status st;
    *out = NULL;
    if (!ints) return moe__fail(ctx, MOE_ERR_MEMORY, "comm: out of memory for %d ranks' counts", P);
    st = moe__mpi_ints(ctx, send_counts, P, ints);
    if (!st) st = moe__mpi_ints(ctx, send_offsets, P, ints + P);
    if (!st) st = moe__mpi_ints(ctx, recv_counts, P, ints + 2 * P);
    if (!st) st = moe__mpi_ints(ctx, recv_offsets, P, ints + 3 * P);
    if (st) MOE_FREE(ints);
    else *out = ints;
    return st;
}
static moe_status moe__mpi_alltoallv(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *send_counts,
                                     const int64_t *send_offsets, void *recv, const int64_t *recv_counts,
                                     const int64_t *recv_offsets, moe_comm_type t) {
    int P = c->size, *ints;
    moe_status st;
    MOE__TRY(moe__mpi_alltoallv_ints(ctx, c, send_counts, send_offsets, recv_counts, recv_offsets, &ints));
    st = moe__mpi_check(ctx, MPI_Alltoallv(send, ints, ints + P, moe__mpi_type(t), recv, ints + 2 * P, ints + 3 * P,
                                           moe__mpi_type(t), c->mpi),
                        "MPI_Alltoallv");
    MOE_FREE(ints);
    return st;
}
static moe_status moe__mpi_alltoallv_start(moe_ctx *ctx, moe_comm *c, const void *send, const int64_t *send_counts,
                                           const int64_t *send_offsets, void *recv, const int64_t *recv_counts,
                                           const int64_t *recv_offsets, moe_comm_type t, moe__comm_req *req) {
    int P = c->size, *ints;
    moe_status st;
    MOE__TRY(moe__mpi_alltoallv_ints(ctx, c, send_counts, send_offsets, recv_counts, recv_offsets, &ints));
    st = moe__mpi_check(ctx, MPI_Ialltoallv(send, ints, ints + P, moe__mpi_type(t), recv, ints + 2 * P, ints + 3 * P,
                                            moe__mpi_type(t), c->mpi, &req->mpi),
                        "MPI_Ialltoallv");
    if (st) MOE_FREE(ints);
    else req->mem = ints; /* MPI may read the counts until the exchange completes */
    return st;
}
static moe_status moe__mpi_test(moe_ctx *ctx, moe_comm *c, moe__comm_req *req) {
    int flag = 0;
    (void)c;
    MOE__TRY(moe__mpi_check(ctx, MPI_Test(&req->mpi, &flag, MPI_STATUS_IGNORE), "MPI_Test"));
    req->done = flag;
    return MOE_OK;
}
static moe_status moe__mpi_wait(moe_ctx *ctx, moe_comm *c, moe__comm_req *req) {
    (void)c;
    return moe__mpi_check(ctx, MPI_Wait(&req->mpi, MPI_STATUS_IGNORE), "MPI_Wait");
}
static moe_status moe__mpi_split(moe_ctx *ctx, moe_comm *c, int color, int key, moe_comm *out) {
    MOE__TRY(moe__mpi_check(ctx, MPI_Comm_split(c->mpi, color, key, &out->mpi), "MPI_Comm_split"));
    MPI_Comm_set_errhandler(out->mpi, MPI_ERRORS_RETURN);
    MPI_Comm_rank(out->mpi, &out->rank);
    MPI_Comm_size(out->mpi, &out->size);
    return MOE_OK;
}
static void moe__mpi_release(moe_comm *c) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&c->mpi);
}
static const moe__comm_ops moe__comm_mpi = {MOE_DEVICE_CPU,      moe__mpi_barrier,         moe__mpi_bcast,    moe__mpi_allreduce,
                                            moe__mpi_allgatherv, moe__mpi_alltoallv,       moe__mpi_alltoallv_start,
                                            moe__mpi_test,       moe__mpi_wait,            moe__mpi_split,    moe__mpi_release,
                                            moe__comm_scratch,   moe__comm_host_sum};
#endif

/* ---- the public collectives ---- */

static moe_status moe__comm_args(moe_ctx *ctx, const moe_comm *c, const char *fn, moe_comm_type t) {
    MOE__CHECK_CTX(ctx);
    if (!c) return moe__fail(ctx, MOE_ERR_ARG, "%s: communicator is NULL", fn);
    if (!moe__comm_type_size(t)) return moe__fail(ctx, MOE_ERR_ARG, "%s: element type %d", fn, (int)t);
    return MOE_OK;
}
/* n elements at p: n ≥ 0, p set unless n is 0, the byte count fits. */
static moe_status moe__comm_buf(moe_ctx *ctx, const char *fn, const void *p, int64_t n, moe_comm_type t) {
    size_t bytes;
    if (n < 0) return moe__fail(ctx, MOE_ERR_ARG, "%s: negative count %lld", fn, (long long)n);
    if (n > 0 && !p) return moe__fail(ctx, MOE_ERR_ARG, "%s: buffer is NULL", fn);
    if (moe__mul_overflows((size_t)n, moe__comm_type_size(t), &bytes))
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: %lld elements overflow", fn, (long long)n);
    return MOE_OK;
}
/* Whether every rank may go on into a collective: st here, and any rank's failure becomes a
   failure on all (MOE_ERR_COMM where the arguments were fine), so that no rank waits in an
   exchange the others left. The vote runs over each of the n groups in turn (a job whose
   ranks meet in several groups: every rank votes in each of its own); with `mismatch` (not
   NULL: what it means) it also asks `settings` to be the same on every rank (else
   MOE_ERR_CONFIG on every rank). */
static moe_status moe__comm_vote(moe_ctx *ctx, moe_comm *const *groups, int n, const char *fn, moe_status st, int64_t settings,
                                 const char *mismatch) {
    int64_t v[3]; /* failed anywhere; the max and the negated min of settings */
    int g;
    v[0] = st != MOE_OK; v[1] = settings; v[2] = -settings;
    for (g = 0; g < n; g++)
        if (groups[g] && groups[g]->size > 1) MOE__TRY(groups[g]->ops->allreduce(ctx, groups[g], v, 3, MOE_COMM_I64, MOE_COMM_MAX));
    if (st != MOE_OK) return st;
    if (v[0]) return moe__fail(ctx, MOE_ERR_COMM, "%s: another rank refused its arguments or ran out of memory; nothing was exchanged", fn);
    if (mismatch && v[1] != -v[2]) return moe__fail(ctx, MOE_ERR_CONFIG, "%s: %s; nothing was exchanged", fn, mismatch);
    return MOE_OK;
}
static moe_status moe__comm_agree(moe_ctx *ctx, moe_comm *c, const char *fn, moe_status st) {
    return moe__comm_vote(ctx, &c, 1, fn, st, 0, NULL);
}

/* counts[0..size) (each ≥ 0, scaled by `width`) into scaled[] with their prefix sums in
   offsets[] (heap: 2·size values at *mem, which the caller frees); *total the sum, within
   what the backend counts (MPI: ints). */
static moe_status moe__comm_layout(moe_ctx *ctx, const char *fn, const moe_comm *c, const int64_t *counts, int64_t width,
                                   int64_t **mem, int64_t *total) {
    int64_t limit = (int64_t)1 << 48, *m, r, sum = 0;
#ifdef MOE_MPI
    if (c->ops == &moe__comm_mpi) limit = 2147483647; /* MPI counts are ints */
#endif
    *mem = NULL;
    if (!counts) return moe__fail(ctx, MOE_ERR_ARG, "%s: counts are NULL", fn);
    if (!(m = (int64_t *)MOE_MALLOC((size_t)c->size * 2 * sizeof(int64_t))))
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for %d ranks' counts", fn, c->size);
    for (r = 0; r < c->size; r++) {
        if (counts[r] < 0 || (width > 0 && counts[r] > limit / width)) {
            MOE_FREE(m);
            return moe__fail(ctx, MOE_ERR_ARG, "%s: count %lld for rank %lld", fn, (long long)counts[r], (long long)r);
        }
        m[r] = counts[r] * width;
        m[c->size + r] = sum;
        sum += m[r];
        if (sum > limit) {
            MOE_FREE(m);
            return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: %lld elements in all, more than this backend counts (%lld)", fn,
                             (long long)sum, (long long)limit);
        }
    }
    *mem = m;
    *total = sum;
    return MOE_OK;
}

MOE_API moe_status moe_comm_init(moe_ctx *ctx, moe_comm_kind kind, moe_comm **out) {
    moe_comm *c;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_init: out is NULL");
    *out = NULL;
    if (kind == MOE_COMM_NCCL)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_init: an NCCL communicator comes from moe_comm_init_nccl (it needs the GPU "
                                           "context and the way to its id)");
    if (kind != MOE_COMM_SELF && kind != MOE_COMM_MPI) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_init: kind %d", (int)kind);
#ifndef MOE_MPI
    if (kind == MOE_COMM_MPI)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_comm_init: MPI is not built in (define MOE_MPI and build with mpicc)");
#endif
    if (!(c = (moe_comm *)MOE_MALLOC(sizeof *c))) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_init: out of memory");
    memset(c, 0, sizeof *c);
    c->ops = &moe__comm_self;
    c->size = 1;
#ifdef MOE_MPI
    if (kind == MOE_COMM_MPI) {
        int inited = 0, provided = 0, rc;
        MPI_Initialized(&inited);
        if (!inited) {
            if ((rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided)) != MPI_SUCCESS) {
                MOE_FREE(c);
                return moe__mpi_check(ctx, rc, "MPI_Init_thread");
            }
            c->owns_runtime = 1;
            if (provided < MPI_THREAD_FUNNELED) { /* OpenMP threads beside MPI: the main thread calls MPI */
                MPI_Finalize();
                MOE_FREE(c);
                return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_comm_init: this MPI gives thread level %d, not FUNNELED", provided);
            }
        }
        if ((rc = MPI_Comm_dup(MPI_COMM_WORLD, &c->mpi)) != MPI_SUCCESS) {
            if (c->owns_runtime) MPI_Finalize();
            MOE_FREE(c);
            return moe__mpi_check(ctx, rc, "MPI_Comm_dup");
        }
        MPI_Comm_set_errhandler(c->mpi, MPI_ERRORS_RETURN);
        MPI_Comm_rank(c->mpi, &c->rank);
        MPI_Comm_size(c->mpi, &c->size);
        c->ops = &moe__comm_mpi;
        /* one BF16 GEMM kernel for the job (section 4's choice follows the CPU and the build):
           the lowest of the ranks' (every rank has the kernels below its own), so a job across
           Intel and AMD machines, or builds with and without AVX512_BF16 or AMX, keeps one
           process's bits */
        if ((rc = MPI_Allreduce(MPI_IN_PLACE, &ctx->conf.bf16_kernel, 1, MPI_INT, MPI_MIN, c->mpi)) != MPI_SUCCESS) {
            MPI_Comm_free(&c->mpi);
            if (c->owns_runtime) MPI_Finalize();
            MOE_FREE(c);
            return moe__mpi_check(ctx, rc, "MPI_Allreduce (the BF16 GEMM route)");
        }
    }
#endif
    *out = c;
    return MOE_OK;
}

MOE_API moe_status moe_comm_split(moe_ctx *ctx, moe_comm *comm, int color, int key, moe_comm **out) {
    moe_comm *c;
    moe_status st;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_split", MOE_COMM_BYTE));
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_split: out is NULL");
    *out = NULL;
    if (color < 0) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_split: color %d (want >= 0)", color);
    if (!(c = (moe_comm *)MOE_MALLOC(sizeof *c))) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_split: out of memory");
    memset(c, 0, sizeof *c);
    c->ops = comm->ops;
    if ((st = comm->ops->split(ctx, comm, color, key, c)) != MOE_OK) {
        MOE_FREE(c);
        return st;
    }
    *out = c;
    return MOE_OK;
}

MOE_API void moe_comm_free(moe_comm *comm) {
    if (!comm) return;
    comm->ops->release(comm);
    MOE_FREE(comm->scratch);
#ifdef MOE_MPI
    if (comm->owns_runtime) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized) MPI_Finalize();
    }
#endif
    MOE_FREE(comm);
}
MOE_API int moe_comm_rank(const moe_comm *comm) { return comm ? comm->rank : 0; }
MOE_API int moe_comm_size(const moe_comm *comm) { return comm ? comm->size : 1; }

MOE_API moe_status moe_comm_barrier(moe_ctx *ctx, moe_comm *comm) {
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_barrier", MOE_COMM_BYTE));
    return comm->ops->barrier(ctx, comm);
}

/* n elements received from the other ranks, into the communicator's count. */
static void moe__comm_count(moe_comm *c, int64_t n, moe_comm_type t) { c->bytes_in += n * (int64_t)moe__comm_type_size(t); }

MOE_API int64_t moe_comm_bytes_received(const moe_comm *comm) { return comm ? comm->bytes_in : 0; }

MOE_API moe_status moe_comm_bcast(moe_ctx *ctx, moe_comm *comm, void *buf, int64_t n, moe_comm_type type, int root) {
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_bcast", type));
    MOE__TRY(moe__comm_buf(ctx, "moe_comm_bcast", buf, n, type));
    if (root < 0 || root >= comm->size)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_bcast: root %d of %d ranks", root, comm->size);
    MOE__TRY(n ? comm->ops->bcast(ctx, comm, buf, n, type, root) : MOE_OK);
    if (root != comm->rank) moe__comm_count(comm, n, type);
    return MOE_OK;
}

MOE_API moe_status moe_comm_allreduce(moe_ctx *ctx, moe_comm *comm, void *buf, int64_t n, moe_comm_type type, moe_comm_op op) {
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_allreduce", type));
    MOE__TRY(moe__comm_buf(ctx, "moe_comm_allreduce", buf, n, type));
    if (type == MOE_COMM_BYTE || (op != MOE_COMM_SUM && op != MOE_COMM_MAX))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_allreduce: want a sum or a max of numbers");
    return n ? comm->ops->allreduce(ctx, comm, buf, n, type, op) : MOE_OK;
}

MOE_API moe_status moe_comm_allreduce_ordered(moe_ctx *ctx, moe_comm *comm, void *buf, int64_t n, moe_comm_type type) {
    int64_t *lay = NULL, *counts = NULL, total = 0, r;
    void *all = NULL;
    moe_status st;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_allreduce_ordered", type));
    st = moe__comm_buf(ctx, "moe_comm_allreduce_ordered", buf, n, type);
    if (!st && type == MOE_COMM_BYTE) st = moe__fail(ctx, MOE_ERR_ARG, "moe_comm_allreduce_ordered: bytes have no sum");
    if (comm->size == 1) return st;
    if (!st && !(counts = (int64_t *)MOE_MALLOC((size_t)comm->size * sizeof(int64_t))))
        st = moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_allreduce_ordered: out of memory");
    for (r = 0; !st && r < comm->size; r++) counts[r] = n;
    if (!st) st = moe__comm_layout(ctx, "moe_comm_allreduce_ordered", comm, counts, 1, &lay, &total);
    if (!st && total &&
        !(all = comm->ops->scratch(ctx, comm, (size_t)total * moe__comm_type_size(type), "moe_comm_allreduce_ordered")))
        st = MOE_ERR_MEMORY;
    st = moe__comm_agree(ctx, comm, "moe_comm_allreduce_ordered", st);
    if (!st && n) st = comm->ops->allgatherv(ctx, comm, buf, all, lay, lay + comm->size, type);
    if (!st && n) st = comm->ops->sum_blocks(ctx, comm, all, comm->size, n, type, buf);
    if (!st) moe__comm_count(comm, total - n, type);
    MOE_FREE(counts);
    MOE_FREE(lay);
    return st;
}

MOE_API moe_status moe_comm_reduce_scatter(moe_ctx *ctx, moe_comm *comm, const void *send, void *recv, const int64_t *counts,
                                           moe_comm_type type) {
    int64_t *lay = NULL, *mine = NULL, total = 0, blocks_total, r;
    void *blocks = NULL;
    moe_status st;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_reduce_scatter", type));
    st = type == MOE_COMM_BYTE ? moe__fail(ctx, MOE_ERR_ARG, "moe_comm_reduce_scatter: bytes have no sum") : MOE_OK;
    if (!st) st = moe__comm_layout(ctx, "moe_comm_reduce_scatter", comm, counts, 1, &lay, &total);
    if (!st) st = moe__comm_buf(ctx, "moe_comm_reduce_scatter", send, total, type);
    if (!st) st = moe__comm_buf(ctx, "moe_comm_reduce_scatter", recv, counts[comm->rank], type);
    if (!st && !(mine = (int64_t *)MOE_MALLOC((size_t)comm->size * sizeof(int64_t))))
        st = moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_reduce_scatter: out of memory");
    if (!st) { /* every rank's block `rank`, in rank order */
        int64_t *recv_lay = NULL;
        for (r = 0; r < comm->size; r++) mine[r] = counts[comm->rank];
        st = moe__comm_layout(ctx, "moe_comm_reduce_scatter", comm, mine, 1, &recv_lay, &blocks_total);
        MOE_FREE(mine);
        mine = recv_lay;
        if (!st && blocks_total &&
            !(blocks = comm->ops->scratch(ctx, comm, (size_t)blocks_total * moe__comm_type_size(type), "moe_comm_reduce_scatter")))
            st = MOE_ERR_MEMORY;
    }
    st = moe__comm_agree(ctx, comm, "moe_comm_reduce_scatter", st);
    if (!st) st = comm->ops->alltoallv(ctx, comm, send, lay, lay + comm->size, blocks, mine, mine + comm->size, type);
    if (!st && counts[comm->rank]) st = comm->ops->sum_blocks(ctx, comm, blocks, comm->size, counts[comm->rank], type, recv);
    if (!st) moe__comm_count(comm, blocks_total - counts[comm->rank], type);
    MOE_FREE(mine);
    MOE_FREE(lay);
    return st;
}

MOE_API moe_status moe_comm_allgather(moe_ctx *ctx, moe_comm *comm, const void *send, void *recv, const int64_t *counts,
                                      moe_comm_type type) {
    int64_t *lay = NULL, total = 0;
    moe_status st;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_allgather", type));
    st = moe__comm_layout(ctx, "moe_comm_allgather", comm, counts, 1, &lay, &total);
    if (!st) st = moe__comm_buf(ctx, "moe_comm_allgather", send, counts[comm->rank], type);
    if (!st) st = moe__comm_buf(ctx, "moe_comm_allgather", recv, total, type);
    st = moe__comm_agree(ctx, comm, "moe_comm_allgather", st);
    if (!st && total) st = comm->ops->allgatherv(ctx, comm, send, recv, lay, lay + comm->size, type);
    if (!st) moe__comm_count(comm, total - counts[comm->rank], type);
    MOE_FREE(lay);
    return st;
}

/* moe_comm_alltoallv's checks (after st, the caller's own verdict) and the agreement of
   comm's ranks, then of `also`'s (NULL: none; a group that joins several of comm's kind, so
   that a failure in one reaches all): the per-rank element counts and offsets into *s and *r
   (heap, the caller frees them) and the elements coming from the other ranks. */
static moe_status moe__comm_alltoallv_args(moe_ctx *ctx, moe_comm *comm, moe_comm *also, const char *fn, moe_status st,
                                           const void *send, const int64_t *send_rows, const void *recv, const int64_t *recv_rows,
                                           int64_t width, moe_comm_type type, int64_t **s, int64_t **r, int64_t *from_others) {
    int64_t stotal = 0, rtotal = 0;
    moe_comm *groups[2];
    *s = *r = NULL;
    if (!st && width < 1) st = moe__fail(ctx, MOE_ERR_ARG, "%s: row width %lld", fn, (long long)width);
    if (!st) st = moe__comm_layout(ctx, fn, comm, send_rows, width, s, &stotal);
    if (!st) st = moe__comm_layout(ctx, fn, comm, recv_rows, width, r, &rtotal);
    if (!st) st = moe__comm_buf(ctx, fn, send, stotal, type);
    if (!st) st = moe__comm_buf(ctx, fn, recv, rtotal, type);
    if (!st) *from_others = rtotal - recv_rows[comm->rank] * width;
    groups[0] = comm; groups[1] = also;
    return moe__comm_vote(ctx, groups, 2, fn, st, 0, NULL);
}

MOE_API moe_status moe_comm_alltoallv(moe_ctx *ctx, moe_comm *comm, const void *send, const int64_t *send_rows, void *recv,
                                      const int64_t *recv_rows, int64_t width, moe_comm_type type) {
    int64_t *s, *r, from_others = 0;
    moe_status st;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_alltoallv", type));
    st = moe__comm_alltoallv_args(ctx, comm, NULL, "moe_comm_alltoallv", MOE_OK, send, send_rows, recv, recv_rows, width, type, &s, &r,
                                  &from_others);
    if (!st) st = comm->ops->alltoallv(ctx, comm, send, s, s + comm->size, recv, r, r + comm->size, type);
    if (!st) moe__comm_count(comm, from_others, type);
    MOE_FREE(s);
    MOE_FREE(r);
    return st;
}

/* moe_comm_alltoallv in two halves, for work beside the exchange (the expert-parallel
   layer's): the checks and the agreement of comm's ranks, then of also's, as there (st: the
   caller's verdict so far, a failure on any rank fails all before anything is posted), then
   the exchange posted into
   *req; moe__comm_test lets it progress, moe__comm_wait completes it and must follow on
   every path (it does nothing for a request that was not posted). Send and receive buffers
   stay the exchange's until then. */
static moe_status moe__comm_alltoallv_start(moe_ctx *ctx, moe_comm *comm, moe_comm *also, moe_status st, const void *send,
                                            const int64_t *send_rows, void *recv, const int64_t *recv_rows, int64_t width,
                                            moe_comm_type type, moe__comm_req *req) {
    int64_t *s, *r;
    memset(req, 0, sizeof *req);
    req->type = type;
    st = moe__comm_alltoallv_args(ctx, comm, also, "expert-parallel exchange", st, send, send_rows, recv, recv_rows, width, type, &s, &r,
                                  &req->from_others);
    if (!st) st = comm->ops->alltoallv_start(ctx, comm, send, s, s + comm->size, recv, r, r + comm->size, type, req);
    req->started = st == MOE_OK;
    MOE_FREE(s);
    MOE_FREE(r);
    return st;
}
static moe_status moe__comm_test(moe_ctx *ctx, moe_comm *comm, moe__comm_req *req) {
    if (!req->started || req->done) return MOE_OK;
    req->tested = 1;
    return comm->ops->test(ctx, comm, req);
}
static moe_status moe__comm_wait(moe_ctx *ctx, moe_comm *comm, moe__comm_req *req) {
    moe_status st;
    if (!req->started) return MOE_OK;
    st = req->done ? MOE_OK : comm->ops->wait(ctx, comm, req);
    MOE_FREE(req->mem);
    req->mem = NULL;
    req->started = 0;
    if (st) return st;
    moe__comm_count(comm, req->from_others, req->type);
    comm->overlapped += req->tested;
    return MOE_OK;
}

MOE_API moe_status moe_comm_alltoall(moe_ctx *ctx, moe_comm *comm, const void *send, void *recv, int64_t n, moe_comm_type type) {
    int64_t *rows, i;
    moe_status st;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_alltoall", type));
    if (n < 0) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_alltoall: negative count %lld", (long long)n);
    if (!(rows = (int64_t *)MOE_MALLOC((size_t)comm->size * sizeof(int64_t))))
        return moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_alltoall: out of memory");
    for (i = 0; i < comm->size; i++) rows[i] = n;
    st = moe_comm_alltoallv(ctx, comm, send, rows, recv, rows, 1, type);
    MOE_FREE(rows);
    return st;
}

/* Every field of moe_config, as doubles (the integers are far below 2^53). */
#define MOE__CONFIG_FIELDS(X)                                                                                  \
    X(vocab_size) X(hidden_size) X(intermediate_size) X(moe_intermediate_size) X(num_hidden_layers)            \
    X(first_k_dense_replace) X(num_attention_heads) X(q_lora_rank) X(kv_lora_rank) X(qk_nope_head_dim)         \
    X(qk_rope_head_dim) X(v_head_dim) X(n_routed_experts) X(n_shared_experts) X(num_experts_per_tok) X(n_group) \
    X(topk_group) X(scoring_func) X(topk_method) X(norm_topk_prob) X(routed_scaling_factor)                    \
    X(num_nextn_predict_layers) X(rope_theta) X(rope_scaling.factor) X(rope_scaling.original_max_pos)          \
    X(rope_scaling.beta_fast) X(rope_scaling.beta_slow) X(rope_scaling.mscale) X(rope_scaling.mscale_all_dim)  \
    X(rms_norm_eps) X(max_position_embeddings) X(tie_word_embeddings) X(initializer_range) X(rope_layout)

MOE_API moe_status moe_comm_check_config(moe_ctx *ctx, moe_comm *comm, const moe_config *cfg) {
#define MOE__FIELD_NAME(f) #f,
    static const char *const names[] = {MOE__CONFIG_FIELDS(MOE__FIELD_NAME) ""};
#undef MOE__FIELD_NAME
    enum { K = (int)(sizeof names / sizeof names[0]) - 1 };
    double mine[K], root[K];
    int64_t first = K, score;
    int i = 0;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_comm_check_config", MOE_COMM_F64));
    if (!cfg) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_check_config: config is NULL");
#define MOE__FIELD_VALUE(f) mine[i++] = (double)cfg->f;
    MOE__CONFIG_FIELDS(MOE__FIELD_VALUE)
#undef MOE__FIELD_VALUE
    memcpy(root, mine, sizeof root);
    MOE__TRY(moe_comm_bcast(ctx, comm, root, K, MOE_COMM_F64, 0));
    for (i = 0; i < K && first == K; i++)
        if (memcmp(&root[i], &mine[i], sizeof(double)) != 0) first = i;
    score = K - first; /* the largest score is the lowest field index that differs anywhere */
    MOE__TRY(moe_comm_allreduce(ctx, comm, &score, 1, MOE_COMM_I64, MOE_COMM_MAX));
    if (score == 0) return MOE_OK;
    first = K - score;
    if (memcmp(&root[first], &mine[first], sizeof(double)) != 0)
        return moe__fail(ctx, MOE_ERR_CONFIG, "moe_comm_check_config: rank %d's %s is %.17g, rank 0's is %.17g", comm->rank,
                         names[first], mine[first], root[first]);
    return moe__fail(ctx, MOE_ERR_CONFIG, "moe_comm_check_config: another rank's %s differs from rank 0's (%.17g)", names[first],
                     root[first]);
}

/* ---- bootstrap without MPI: ranks from the environment, bytes over TCP or a file ---- */

/* Variable `name` as an int in [0, 2^31): 1, absent: 0, malformed: −1. */
static int moe__env_int(const char *name, int *out) {
    const char *v = getenv(name);
    char *end;
    long x;
    if (!v || !*v) return 0;
    errno = 0;
    x = strtol(v, &end, 10);
    if (*end || errno || x < 0 || x > 2147483647L) return -1;
    *out = (int)x;
    return 1;
}

MOE_API moe_status moe_comm_env(moe_ctx *ctx, int *rank, int *size, int *local_rank) {
    static const char *const vars[4][3] = {{"MOE_RANK", "MOE_WORLD_SIZE", "MOE_LOCAL_RANK"},
                                           {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
                                           {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"},
                                           {"RANK", "WORLD_SIZE", "LOCAL_RANK"}};
    int i, j, v[3];
    MOE__CHECK_CTX(ctx);
    if (!rank || !size || !local_rank) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_env: NULL output");
    *rank = 0;
    *size = 1;
    *local_rank = 0;
    for (i = 0; i < 4; i++) {
        int got[3];
        for (j = 0; j < 3; j++) {
            v[j] = 0;
            if ((got[j] = moe__env_int(vars[i][j], &v[j])) < 0)
                return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_env: %s='%s' is not a rank or a count", vars[i][j], getenv(vars[i][j]));
        }
        if (!got[0] || !got[1]) continue;
        if (v[1] < 1 || v[0] >= v[1])
            return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_env: %s=%d of %s=%d", vars[i][0], v[0], vars[i][1], v[1]);
        *rank = v[0];
        *size = v[1];
        *local_rank = v[2];
        return MOE_OK;
    }
    return MOE_OK;
}

#if defined(__unix__) || defined(__APPLE__)
/* A message: "MOEBOOT1", its length (8 bytes, little-endian), the bytes, their FNV-1a. */
#define MOE__BOOT_MAGIC "MOEBOOT1"
static size_t moe__boot_pack(unsigned char *out, const void *buf, size_t n) {
    memcpy(out, MOE__BOOT_MAGIC, 8);
    moe__le_put64(out + 8, (uint64_t)n);
    memcpy(out + 16, buf, n);
    moe__le_put64(out + 16 + n, moe__fnv1a(MOE__FNV_SEED, (const unsigned char *)buf, n));
    return n + 24;
}
static int moe__boot_unpack(const unsigned char *msg, size_t len, void *buf, size_t n) {
    if (len != n + 24 || memcmp(msg, MOE__BOOT_MAGIC, 8) != 0 || moe__le_get64(msg + 8) != (uint64_t)n ||
        moe__le_get64(msg + 16 + n) != moe__fnv1a(MOE__FNV_SEED, msg + 16, n))
        return 0;
    memcpy(buf, msg + 16, n);
    return 1;
}
static void moe__sleep_ms(int ms) {
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    nanosleep(&ts, NULL);
}

static moe_status moe__share_file(moe_ctx *ctx, const char *path, int rank, unsigned char *msg, size_t len, void *buf, size_t n,
                                  double timeout_s) {
    double t0 = moe_time_s();
    if (rank == 0) return moe__write_atomic(ctx, "moe_comm_share", path, msg, len);
    for (;;) { /* the file appears whole (rename) or not at all */
        FILE *f = fopen(path, "rb");
        if (f) {
            size_t got = fread(msg, 1, len + 1, f);
            fclose(f);
            if (moe__boot_unpack(msg, got, buf, n)) return MOE_OK;
            return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: '%s' is not rank 0's %zu bytes (another job's file?)", path, n);
        }
        if (moe_time_s() - t0 > timeout_s)
            return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: no '%s' from rank 0 after %g s", path, timeout_s);
        moe__sleep_ms(10);
    }
}

/* What is left of the time until `deadline` (moe_time_s()) as poll()'s milliseconds: 0 once it
   has passed, else at least 1 (rounded up, so that a wait does not end before the deadline). */
static int moe__ms_left(double deadline) {
    double left = deadline - moe_time_s();
    if (left <= 0) return 0;
    return left >= 2e6 ? 2000000000 : (int)(left * 1000.0) + 1;
}

/* Socket s non-blocking: every step on it waits in poll(), bounded by a deadline. */
static int moe__sock_nonblock(int s) {
    int fl = fcntl(s, F_GETFL, 0);
    return fl < 0 || fcntl(s, F_SETFL, fl | O_NONBLOCK) < 0 ? -1 : 0;
}

/* Wait until s is ready for `events` or the deadline passes: 1 ready, 0 timed out, −1 failed. */
static int moe__sock_wait(int s, short events, double deadline) {
    for (;;) {
        struct pollfd pf;
        int ms = moe__ms_left(deadline), r;
        if (ms == 0) return 0;
        pf.fd = s;
        pf.events = events;
        pf.revents = 0;
        r = poll(&pf, 1, ms);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -1;
    }
}

#ifdef MSG_NOSIGNAL
#define MOE__SEND_FLAGS MSG_NOSIGNAL /* a peer that went away: EPIPE, not SIGPIPE */
#else
#define MOE__SEND_FLAGS 0
#endif

/* Send or receive len bytes on socket s (made non-blocking), each step waiting at most until
   `deadline` (moe_time_s()): 0 done, −1 failed (errno; a receive that meets the end of the
   stream too), −2 the deadline passed first. */
static int moe__sock_io(int s, unsigned char *p, size_t len, int sending, double deadline) {
    if (moe__sock_nonblock(s) != 0) return -1;
    while (len > 0) {
        ssize_t k;
        int w = moe__sock_wait(s, sending ? POLLOUT : POLLIN, deadline);
        if (w <= 0) return w == 0 ? -2 : -1;
        k = sending ? send(s, p, len, MOE__SEND_FLAGS) : recv(s, p, len, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (k <= 0) {
            if (k == 0) errno = ECONNRESET;
            return -1;
        }
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

/* Connect s (made non-blocking) to addr, waiting at most until `deadline`: 0 connected, −1
   refused or failed (errno), −2 the deadline passed first (e.g. a host that drops the SYNs). */
static int moe__sock_connect(int s, const struct sockaddr *addr, socklen_t addrlen, double deadline) {
    int err = 0, w;
    socklen_t errlen = (socklen_t)sizeof err;
    if (moe__sock_nonblock(s) != 0) return -1;
    if (connect(s, addr, addrlen) == 0) return 0;
    if (errno != EINPROGRESS && errno != EINTR) return -1; /* EINTR: the connection goes on, as EINPROGRESS */
    if ((w = moe__sock_wait(s, POLLOUT, deadline)) <= 0) return w == 0 ? -2 : -1;
    if (getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &errlen) != 0) return -1;
    if (err != 0) {
        errno = err;
        return -1;
    }
    return 0;
}

/* getaddrinfo for an IPv4 stream socket that the caller waits for at most until the
   deadline (a lookup takes as long as the resolver does). A numeric address is read on the
   calling thread (that never waits); a name is looked up on a thread of its own, whose result
   the caller takes if it comes in time, else the thread frees it when the lookup ends (without
   a thread, on the calling thread as before). MOE__LOOKUP_FAILED leaves getaddrinfo's code in
   *gai. */
enum { MOE__LOOKUP_OK = 0, MOE__LOOKUP_FAILED, MOE__LOOKUP_LATE };
typedef struct moe__lookup {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char host[256], port[8];
    struct addrinfo *ai;
    int rc, done, abandoned;
} moe__lookup;
static int moe__lookup_call(const char *host, const char *port, int numeric, struct addrinfo **ai) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (numeric ? AI_NUMERICHOST : 0);
    return getaddrinfo(host, port, &hints, ai);
}
static void moe__lookup_free(moe__lookup *L) {
    if (L->ai) freeaddrinfo(L->ai);
    pthread_cond_destroy(&L->cv);
    pthread_mutex_destroy(&L->mu);
    MOE_FREE(L);
}
static void *moe__lookup_run(void *arg) {
    moe__lookup *L = (moe__lookup *)arg;
    struct addrinfo *ai = NULL;
    int rc = moe__lookup_call(L->host, L->port, 0, &ai), abandoned;
    pthread_mutex_lock(&L->mu);
    L->ai = ai;
    L->rc = rc;
    L->done = 1;
    abandoned = L->abandoned;
    pthread_cond_signal(&L->cv);
    pthread_mutex_unlock(&L->mu);
    if (abandoned) moe__lookup_free(L);
    return NULL;
}
static int moe__resolve(const char *host, int port, double deadline, struct addrinfo **out, int *gai) {
    moe__lookup *L;
    pthread_t t;
    char ps[8];
    snprintf(ps, sizeof ps, "%d", port);
    *out = NULL;
    if ((*gai = moe__lookup_call(host, ps, 1, out)) == 0) return MOE__LOOKUP_OK; /* a numeric address */
    L = (moe__lookup *)MOE_MALLOC(sizeof *L);
    if (!L || (memset(L, 0, sizeof *L), pthread_mutex_init(&L->mu, NULL) != 0)) {
        MOE_FREE(L);
        return (*gai = moe__lookup_call(host, ps, 0, out)) == 0 ? MOE__LOOKUP_OK : MOE__LOOKUP_FAILED;
    }
    if (pthread_cond_init(&L->cv, NULL) != 0) {
        pthread_mutex_destroy(&L->mu);
        MOE_FREE(L);
        return (*gai = moe__lookup_call(host, ps, 0, out)) == 0 ? MOE__LOOKUP_OK : MOE__LOOKUP_FAILED;
    }
    snprintf(L->host, sizeof L->host, "%s", host);
    memcpy(L->port, ps, sizeof ps);
    if (pthread_create(&t, NULL, moe__lookup_run, L) != 0) {
        moe__lookup_free(L);
        return (*gai = moe__lookup_call(host, ps, 0, out)) == 0 ? MOE__LOOKUP_OK : MOE__LOOKUP_FAILED;
    }
    pthread_detach(t);
    pthread_mutex_lock(&L->mu);
    while (!L->done) {
        double left = deadline - moe_time_s(); /* monotonic; each wait is short, on the wall clock */
        struct timespec until;
        if (!(left > 0)) break;
        if (left > 0.25) left = 0.25;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += (long)(left * 1e9);
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&L->cv, &L->mu, &until);
    }
    if (!L->done) { /* late: the thread frees it when the lookup ends */
        L->abandoned = 1;
        pthread_mutex_unlock(&L->mu);
        return MOE__LOOKUP_LATE;
    }
    pthread_mutex_unlock(&L->mu);
    *gai = L->rc;
    *out = L->ai;
    L->ai = NULL;
    moe__lookup_free(L);
    return *gai == 0 ? MOE__LOOKUP_OK : MOE__LOOKUP_FAILED;
}

static moe_status moe__share_tcp(moe_ctx *ctx, const char *hostport, int rank, int size, unsigned char *msg, size_t len,
                                 void *buf, size_t n, double timeout_s) {
    char host[256];
    const char *colon = strrchr(hostport, ':');
    struct addrinfo *ai = NULL;
    double deadline = moe_time_s() + timeout_s; /* every step below waits at most until then */
    int s = -1, rc, i, port, gai = 0;
    char *end;
    if (!colon || colon == hostport || (size_t)(colon - hostport) >= sizeof host)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_share: want tcp:HOST:PORT, got 'tcp:%s'", hostport);
    port = (int)strtol(colon + 1, &end, 10);
    if (*end || port < 1 || port > 65535) return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_share: port '%s'", colon + 1);
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = 0;
    if (rank == 0) { /* listen, hand the message to every other rank, close */
        struct sockaddr_in a;
        int one = 1;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        a.sin_port = htons((uint16_t)port);
        if ((s = socket(AF_INET, SOCK_STREAM, 0)) < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
            bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, size) != 0 || moe__sock_nonblock(s) != 0) {
            int e = errno;
            if (s >= 0) close(s);
            return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: cannot listen on port %d: %s", port, strerror(e));
        }
        for (i = 1; i < size; i++) {
            int c = -1;
            while (c < 0) { /* non-blocking: a connection gone before accept() is waited past */
                if (moe__sock_wait(s, POLLIN, deadline) <= 0) break;
                if ((c = accept(s, NULL, NULL)) < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK &&
                    errno != ECONNABORTED)
                    break;
            }
            if (c < 0) {
                close(s);
                return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: %d of %d ranks connected to port %d within the timeout of %g s",
                                 i - 1, size - 1, port, timeout_s);
            }
            rc = moe__sock_io(c, msg, len, 1, deadline);
            if (rc == -1) rc = errno ? errno : EIO;
            close(c);
            if (rc) {
                close(s);
                if (rc == -2)
                    return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: sending to rank %d of %d did not finish within the "
                                                        "timeout of %g s", i, size - 1, timeout_s);
                return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: sending to a rank failed: %s", strerror(rc));
            }
        }
        close(s);
        return MOE_OK;
    }
    if ((rc = moe__resolve(host, port, deadline, &ai, &gai)) != MOE__LOOKUP_OK) {
        if (rc == MOE__LOOKUP_LATE)
            return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: looking up '%s' did not finish within the timeout of %g s", host,
                             timeout_s);
        return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: cannot resolve '%s': %s", host, gai_strerror(gai));
    }
    for (;;) { /* rank 0 may not listen yet: retry */
        s = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        rc = s >= 0 ? moe__sock_connect(s, ai->ai_addr, ai->ai_addrlen, deadline) : -1;
        if (rc == 0) break;
        if (s >= 0) close(s);
        s = -1;
        if (rc == -2 || moe__ms_left(deadline) == 0) {
            freeaddrinfo(ai);
            return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: rank 0 did not answer at %s within the timeout of %g s", hostport,
                             timeout_s);
        }
        moe__sleep_ms(moe__ms_left(deadline) < 20 ? moe__ms_left(deadline) : 20);
    }
    freeaddrinfo(ai);
    rc = moe__sock_io(s, msg, len, 0, deadline);
    close(s);
    if (rc == -2) /* something accepted the connection but did not send, or not all */
        return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: connected to %s, but rank 0's %zu bytes did not arrive within the "
                                            "timeout of %g s", hostport, n, timeout_s);
    if (rc || !moe__boot_unpack(msg, len, buf, n))
        return moe__fail(ctx, MOE_ERR_COMM, "moe_comm_share: rank 0's %zu bytes did not arrive whole from %s", n, hostport);
    return MOE_OK;
}
#endif

MOE_API moe_status moe_comm_share(moe_ctx *ctx, const char *how, int rank, int size, void *buf, size_t n, double timeout_s) {
    unsigned char *msg;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!how || !buf || n == 0 || n > ((size_t)1 << 20) || size < 1 || rank < 0 || rank >= size || !(timeout_s > 0))
        return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_share: want how, 1..2^20 bytes, 0 <= rank < size, timeout > 0");
    if (strncmp(how, "tcp:", 4) != 0 && strncmp(how, "file:", 5) != 0)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_comm_share: '%s' is neither tcp:HOST:PORT nor file:PATH", how);
    if (size == 1) return MOE_OK;
#if defined(__unix__) || defined(__APPLE__)
    if (!(msg = (unsigned char *)moe__heap_alloc(ctx, n + 25))) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_comm_share: out of memory");
    if (rank == 0) moe__boot_pack(msg, buf, n);
    st = how[0] == 't' ? moe__share_tcp(ctx, how + 4, rank, size, msg, n + 24, buf, n, timeout_s)
                       : moe__share_file(ctx, how + 5, rank, msg, n + 24, buf, n, timeout_s);
    MOE_FREE(msg);
    return st;
#else
    (void)msg; (void)st;
    return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_comm_share: needs POSIX sockets and files");
#endif
}

/* ---- NCCL: moe_cuda.cuh's section 9 (>>cu.comm), in the CUDA build with MOE_NCCL ---- */

#if defined(MOE_NCCL) && defined(MOE_CUDA) && defined(__CUDACC__)
#define MOE__CUDA_COMM_SECTION
#include "moe_cuda.cuh"
#else
MOE_API moe_status moe_comm_init_nccl(moe_ctx *ctx, moe_comm *bootstrap, const char *how, double timeout_s, moe_comm **out) {
    MOE__CHECK_CTX(ctx);
    (void)bootstrap; (void)how; (void)timeout_s;
    if (out) *out = NULL;
    return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_comm_init_nccl: NCCL is not built in (define MOE_CUDA and MOE_NCCL, compile "
                                                 "the implementation with nvcc and link -lnccl)");
}
#endif

/* ---- data parallelism, ZeRO-1 ---- */

#define MOE__COMM_REAL (sizeof(moe_real) == sizeof(double) ? MOE_COMM_F64 : MOE_COMM_F32)

/* ZeRO-1 moves the slab in rounds: round j takes values [bounds[r] + j·S, + S) of every rank
   r's shard, S = MOE_COMM_BUCKET / ranks, so that no exchange and no buffer exceeds a bucket
   (and MPI's int counts hold for any model). len[r] gets each shard's count; the total is
   returned. */
static int64_t moe__zero_round_len(const moe_adamw *o) {
    int64_t S = MOE_COMM_BUCKET / o->comm->size;
    return S > 0 ? S : 1;
}
static int64_t moe__zero_rounds(const moe_adamw *o) {
    int64_t r, most = 0, S = moe__zero_round_len(o);
    for (r = 0; r < o->comm->size; r++)
        if (o->bounds[r + 1] - o->bounds[r] > most) most = o->bounds[r + 1] - o->bounds[r];
    return (most + S - 1) / S;
}
static int64_t moe__zero_round(const moe_adamw *o, int64_t j, int64_t *len) {
    int64_t r, S = moe__zero_round_len(o), total = 0;
    for (r = 0; r < o->comm->size; r++) {
        int64_t a = o->bounds[r] + j * S, b = a + S < o->bounds[r + 1] ? a + S : o->bounds[r + 1];
        len[r] = a < b ? b - a : 0;
        total += len[r];
    }
    return total;
}

/* The gradients' rank-ordered sum, this rank's shard of it in place; the rest of the slab 0. */
static moe_status moe__zero_reduce_scatter(moe_ctx *ctx, moe_adamw *o, moe_comm *comm) {
    moe_real *g = MOE__F32(o->model->grads), *stage = (moe_real *)o->stage;
    int64_t *len = o->counts + 2 * comm->size, S = moe__zero_round_len(o), n = o->model->grads->numel, rounds = moe__zero_rounds(o), j, r, at;
    for (j = 0; j < rounds; j++) {
        moe__zero_round(o, j, len);
        for (r = 0, at = 0; r < comm->size; at += len[r], r++) memcpy(stage + at, g + o->bounds[r] + j * S, sizeof(moe_real) * (size_t)len[r]);
        MOE__TRY(moe_comm_reduce_scatter(ctx, comm, stage, g + o->lo + j * S, len, MOE__COMM_REAL));
    }
    memset(g, 0, sizeof(moe_real) * (size_t)o->lo);
    memset(g + o->hi, 0, sizeof(moe_real) * (size_t)(n - o->hi));
    return MOE_OK;
}

/* Every rank's updated shard of the parameters to every rank. */
static moe_status moe__zero_gather_params(moe_ctx *ctx, moe_adamw *o) {
    moe_real *p = MOE__F32(o->model->params), *stage = (moe_real *)o->stage;
    int64_t *len = o->counts + 2 * o->comm->size, S = moe__zero_round_len(o), rounds = moe__zero_rounds(o), j, r, at;
    for (j = 0; j < rounds; j++) {
        moe__zero_round(o, j, len);
        MOE__TRY(moe_comm_allgather(ctx, o->comm, p + o->lo + j * S, stage, len, MOE__COMM_REAL));
        for (r = 0, at = 0; r < o->comm->size; at += len[r], r++)
            if (r != o->comm->rank) memcpy(p + o->bounds[r] + j * S, stage + at, sizeof(moe_real) * (size_t)len[r]);
    }
    return MOE_OK;
}

/* Every rank's moments into whole slabs *m and *v on rank 0 (to be freed; NULL elsewhere),
   for checkpoints: the other ranks send, rank 0 receives. */
static moe_status moe__zero_gather_moments(moe_ctx *ctx, const moe_adamw *o, void **m, void **v) {
    int64_t es = o->cfg.moment_dtype == MOE_BF16 ? 2 : 4, n = o->model->params->numel, P = o->comm->size, S = moe__zero_round_len(o);
    int64_t *len = o->counts + 2 * P, *send = o->counts + 3 * P, rounds = moe__zero_rounds(o), j, r, at, k;
    int root = o->comm->rank == 0;
    unsigned char *stage = (unsigned char *)o->stage, *whole[2];
    moe_status st = MOE_OK;
    *m = *v = NULL;
    if (root) {
        *m = moe__heap_alloc(ctx, (size_t)(n * es));
        *v = moe__heap_alloc(ctx, (size_t)(n * es));
        if (!*m || !*v) st = moe__fail(ctx, MOE_ERR_MEMORY, "moe_ckpt_save: out of memory gathering the moments");
    }
    st = moe__comm_agree(ctx, o->comm, "moe_ckpt_save", st);
    whole[0] = (unsigned char *)*m;
    whole[1] = (unsigned char *)*v;
    for (k = 0; k < 2 && !st; k++)
        for (j = 0; j < rounds && !st; j++) {
            moe__zero_round(o, j, len);
            for (r = 0; r < P; r++) send[r] = r == 0 ? len[o->comm->rank] : 0;
            if (!root) for (r = 0; r < P; r++) len[r] = 0;
            st = moe_comm_alltoallv(ctx, o->comm, (unsigned char *)(k ? o->v : o->m) + es * j * S, send, stage, len, es, MOE_COMM_BYTE);
            for (r = 0, at = 0; root && !st && r < P; at += len[r], r++)
                memcpy(whole[k] + es * (o->bounds[r] + j * S), stage + es * at, (size_t)(es * len[r]));
        }
    if (st) {
        MOE_FREE(*m);
        MOE_FREE(*v);
        *m = *v = NULL;
    }
    return st;
}

MOE_API moe_status moe_adamw_shard(moe_ctx *ctx, moe_adamw *o, moe_comm *comm) {
    static const char *fn = "moe_adamw_shard";
    int64_t n, chunk, nc, r, lo, hi, P, *bounds, *counts, agree[4];
    size_t es;
    void *mm = NULL, *vv = NULL, *stage;
    moe_status st;
    MOE__TRY(moe__comm_args(ctx, comm, fn, MOE_COMM_I64));
    if (!o) return moe__fail(ctx, MOE_ERR_ARG, "%s: optimizer is NULL", fn);
    n = o->model->params->numel;
    P = comm->size;
    st = o->comm ? moe__fail(ctx, MOE_ERR_STATE, "%s: the optimizer is sharded already", fn)
         : o->model->be->device != MOE_DEVICE_CPU ? moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: host-memory models only", fn)
         : comm->ops->device != MOE_DEVICE_CPU
             ? moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: ZeRO-1 over NCCL is not implemented (shard over MPI, or reduce plain)", fn)
             : MOE_OK;
    MOE__TRY(moe__comm_agree(ctx, comm, fn, st));
    agree[0] = n;
    agree[1] = -n;
    agree[2] = o->cfg.moment_dtype;
    agree[3] = -(int64_t)o->cfg.moment_dtype;
    MOE__TRY(moe_comm_allreduce(ctx, comm, agree, 4, MOE_COMM_I64, MOE_COMM_MAX));
    if (agree[0] != n || -agree[1] != n || agree[2] != -agree[3])
        return moe__fail(ctx, MOE_ERR_CONFIG, "%s: the ranks' parameter slabs or moment types differ (%lld values here)", fn, (long long)n);
    chunk = moe__norm_chunk(n);
    nc = (n + chunk - 1) / chunk;
    es = o->cfg.moment_dtype == MOE_BF16 ? 2 : 4;
    bounds = (int64_t *)moe__heap_alloc(ctx, sizeof(int64_t) * (size_t)(P + 1));
    counts = (int64_t *)moe__heap_alloc(ctx, sizeof(int64_t) * (size_t)(4 * P));
    for (r = 0; bounds && r <= P; r++) bounds[r] = r * nc / P * chunk < n ? r * nc / P * chunk : n;
    for (r = 0; bounds && counts && r < P; r++) counts[r] = (bounds[r + 1] + chunk - 1) / chunk - bounds[r] / chunk;
    lo = bounds ? bounds[comm->rank] : 0;
    hi = bounds ? bounds[comm->rank + 1] : 0;
    stage = moe__heap_alloc(ctx, sizeof(moe_real) * (size_t)(n < MOE_COMM_BUCKET + P ? n : MOE_COMM_BUCKET + P));
    if (!bounds || !counts || !stage || o->model->be->alloc(ctx, es * (size_t)(hi - lo) + 1, &mm) != MOE_OK ||
        o->model->be->alloc(ctx, es * (size_t)(hi - lo) + 1, &vv) != MOE_OK)
        st = moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for the shard's moments", fn);
    if ((st = moe__comm_agree(ctx, comm, fn, st)) != MOE_OK) { /* every rank sharded, or none */
        if (mm) o->model->be->free(ctx, mm);
        if (vv) o->model->be->free(ctx, vv);
        MOE_FREE(bounds);
        MOE_FREE(counts);
        MOE_FREE(stage);
        return st;
    }
    memcpy(mm, (unsigned char *)o->m + es * (size_t)lo, es * (size_t)(hi - lo));
    memcpy(vv, (unsigned char *)o->v + es * (size_t)lo, es * (size_t)(hi - lo));
    o->model->be->free(ctx, o->m);
    o->model->be->free(ctx, o->v);
    o->m = mm;
    o->v = vv;
    moe__adamw_segments(o, lo, hi);
    o->comm = comm;
    o->bounds = bounds;
    o->counts = counts;
    o->stage = stage;
    o->model->zero = o;
    return MOE_OK;
}

MOE_API size_t moe_adamw_state_bytes(const moe_adamw *o) {
    return o ? 2 * (size_t)(o->hi - o->lo) * (o->cfg.moment_dtype == MOE_BF16 ? 2 : 4) : 0;
}

MOE_API moe_status moe_model_reduce_grads(moe_ctx *ctx, moe_model *m, moe_comm *comm) {
    const moe_comm_type real = MOE__COMM_REAL;
    int64_t n, off;
    MOE__TRY(moe__comm_args(ctx, comm, "moe_model_reduce_grads", real));
    if (!m || !m->grads) return moe__fail(ctx, MOE_ERR_ARG, "moe_model_reduce_grads: model is NULL");
    n = m->grads->numel;
    if (m->zero && m->zero->comm != comm)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_model_reduce_grads: the optimizer is sharded over another communicator");
    if (m->n_accumulated) {
        MOE__TRY(m->be->copy(ctx, m->grads->data, m->grad_sum->data, (size_t)n * sizeof(moe_real), MOE__D2D));
        m->n_accumulated = 0;
    }
    if (comm->size == 1) return MOE_OK;
    if (m->be->device != MOE_DEVICE_CPU && comm->ops->device == MOE_DEVICE_CPU)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_model_reduce_grads: the gradients are in GPU memory and this "
                                                   "communicator reduces host memory (a GPU model wants moe_comm_init_nccl)");
    if (m->be->device == MOE_DEVICE_CPU && comm->ops->device != MOE_DEVICE_CPU)
        return moe__fail(ctx, MOE_ERR_UNSUPPORTED, "moe_model_reduce_grads: the gradients are in host memory and this NCCL "
                                                   "communicator reduces GPU memory (a host model wants SELF or MPI)");
    if (m->zero) { /* ZeRO-1: this rank's shard of the sum; the rest of the slab zero */
        MOE__TRY(moe__zero_reduce_scatter(ctx, m->zero, comm));
    } else {
        for (off = 0; off < n; off += MOE_COMM_BUCKET)
            MOE__TRY(moe_comm_allreduce_ordered(ctx, comm, MOE__F32(m->grads) + off,
                                                n - off < MOE_COMM_BUCKET ? n - off : MOE_COMM_BUCKET, real));
    }
    return moe_comm_allreduce(ctx, comm, m->loads, m->n_loads, MOE_COMM_I64, MOE_COMM_SUM);
}

/* ---- expert parallelism ---- */

MOE_API moe_status moe_model_expert_parallel(moe_ctx *ctx, moe_model *m, moe_comm *ep, moe_comm *edp) {
    static const char *fn = "moe_model_expert_parallel";
    int64_t i, E, np;
    moe_status st = MOE_OK;
    MOE__CHECK_CTX(ctx);
    if (!m) return moe__fail(ctx, MOE_ERR_ARG, "%s: model is NULL", fn);
    E = m->cfg.n_routed_experts;
    np = ep ? ep->size : 1;
    if (!ep && edp) return moe__fail(ctx, MOE_ERR_ARG, "%s: an EDP group without an EP group", fn);
    if (E % np != 0)
        st = moe__fail(ctx, MOE_ERR_CONFIG, "%s: %lld routed experts do not split over %lld ranks", fn, (long long)E, (long long)np);
    else if ((ep && ep->ops->device != MOE_DEVICE_CPU) || (edp && edp->ops->device != MOE_DEVICE_CPU))
        st = moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: expert parallelism over NCCL is not implemented (MPI and a host-memory "
                                                 "model do it)", fn);
    else if (ep && m->be->device != MOE_DEVICE_CPU)
        st = moe__fail(ctx, MOE_ERR_UNSUPPORTED, "%s: the communicator exchanges host memory only", fn);
    if (ep) MOE__TRY(moe__comm_agree(ctx, ep, fn, st));
    else MOE__TRY(st);
    for (i = 0; i < m->cfg.num_hidden_layers + m->cfg.num_nextn_predict_layers; i++) {
        moe__moe *L = moe__model_moe_layer(m, i);
        if (!L) continue;
        L->ep = np > 1 ? ep : NULL;
        L->edp = np > 1 && edp && edp->size > 1 ? edp : NULL;
        L->e_n = E / np;
        L->e_lo = (ep ? ep->rank : 0) * L->e_n;
    }
    return MOE_OK;
}

MOE_API moe_status moe_model_expert_parallel_payload(moe_ctx *ctx, moe_model *m, moe_dtype dispatch, moe_dtype combine) {
    static const char *fn = "moe_model_expert_parallel_payload";
    int64_t i;
    MOE__CHECK_CTX(ctx);
    if (!m) return moe__fail(ctx, MOE_ERR_ARG, "%s: model is NULL", fn);
    if (dispatch != MOE_F32 && dispatch != MOE_FP8_E4M3)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: a dispatch in %s (want f32 or fp8_e4m3)", fn, moe_dtype_name(dispatch));
    if (combine != MOE_F32 && combine != MOE_BF16)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: a combine in %s (want f32 or bf16)", fn, moe_dtype_name(combine));
    for (i = 0; i < m->cfg.num_hidden_layers + m->cfg.num_nextn_predict_layers; i++) {
        moe__moe *L = moe__model_moe_layer(m, i);
        if (!L) continue;
        L->ep_dispatch = dispatch;
        L->ep_combine = combine;
    }
    return MOE_OK;
}

/* The vote of every rank of the job (the EP group, then the EDP group, which joins the EP
   groups: a failure in one group reaches the others before the EDP group's broadcasts), with
   `settings` (a fingerprint of what the exchanges carry) the same everywhere. */
static moe_status moe__ep_vote(moe_ctx *ctx, const moe__moe *L, moe_status st, int64_t settings) {
    moe_comm *groups[2];
    groups[0] = L->ep; groups[1] = L->edp;
    return moe__comm_vote(ctx, groups, 2, "expert-parallel MoE layer", st, settings,
                          "the ranks' exchange settings differ (the payloads of moe_model_expert_parallel_payload, the FP8 "
                          "block or amax scales)");
}
static moe_status moe__ep_agree(moe_ctx *ctx, const moe__moe *L, moe_status st) { return moe__ep_vote(ctx, L, st, 0); }
/* What the layer's exchanges carry, as one number for moe__ep_vote: the payload types, and the
   FP8 tile and its scales when the dispatch is FP8. */
static int64_t moe__ep_settings(const moe_ctx *ctx, const moe__moe *L) {
    int64_t fp8 = L->ep_dispatch == MOE_FP8_E4M3 ? 2 * ctx->conf.fp8.block + (ctx->conf.fp8.amax_scales != 0) : 0;
    return ((int64_t)L->ep_dispatch * 64 + (int64_t)L->ep_combine) * ((int64_t)1 << 22) + fp8;
}

static moe_status moe__ep_plan_make(moe_ctx *ctx, const moe__moe *L, const int64_t *offset, moe__ep_plan *P) {
    int64_t np = L->ep->size, en = L->e_n, s, j, *cnt, *rcnt;
    cnt = (int64_t *)moe__arena_alloc(ctx, (size_t)(np * en), sizeof(int64_t), "moe dispatch plan");
    rcnt = (int64_t *)moe__arena_alloc(ctx, (size_t)(np * en), sizeof(int64_t), "moe dispatch plan");
    P->send_rows = (int64_t *)moe__arena_alloc(ctx, (size_t)np, sizeof(int64_t), "moe dispatch plan");
    P->recv_rows = (int64_t *)moe__arena_alloc(ctx, (size_t)np, sizeof(int64_t), "moe dispatch plan");
    P->recv_start = (int64_t *)moe__arena_alloc(ctx, (size_t)(np + 1), sizeof(int64_t), "moe dispatch plan");
    P->recv_off = (int64_t *)moe__arena_alloc(ctx, (size_t)(np * (en + 1)), sizeof(int64_t), "moe dispatch plan");
    MOE__TRY(moe__ep_vote(ctx, L, cnt && rcnt && P->send_rows && P->recv_rows && P->recv_start && P->recv_off ? MOE_OK : MOE_ERR_MEMORY,
                          moe__ep_settings(ctx, L)));
    /* counts first: rank s learns how many of its rows go to each of my experts */
    for (j = 0; j < np * en; j++) cnt[j] = offset[j + 1] - offset[j];
    MOE__TRY(moe_comm_alltoall(ctx, L->ep, cnt, rcnt, en, MOE_COMM_I64));
    P->recv_start[0] = 0;
    for (s = 0; s < np; s++) {
        int64_t *off = P->recv_off + s * (en + 1);
        P->send_rows[s] = offset[(s + 1) * en] - offset[s * en];
        off[0] = 0;
        for (j = 0; j < en; j++) off[j + 1] = off[j] + rcnt[s * en + j];
        P->recv_rows[s] = off[en];
        P->recv_start[s + 1] = P->recv_start[s] + off[en];
    }
    P->rows = P->recv_start[np];
    return MOE_OK;
}

/* An exchange of the layer posted into *req (NULL: none — this rank only votes, with st a
   failure) once the whole job agrees: the EP group, then the EDP group, so that a failure in
   one EP group stops the others too. */
static moe_status moe__ep_start(moe_ctx *ctx, const moe__moe *L, moe_status st, const void *send, const int64_t *to, void *recv,
                                const int64_t *from, int64_t width, moe_comm_type type, moe__comm_req *req) {
    if (!req) return moe__ep_agree(ctx, L, st);
    return moe__comm_alltoallv_start(ctx, L->ep, L->edp, st, send, to, recv, from, width, type, req);
}

/* An exchange in flight: its requests and what their arrival decodes. */
struct moe__ep_xfer {
    moe_comm *comm;
    moe__comm_req req[2];        /* the rows; FP8: their codes, then their scales */
    moe_dtype payload;
    unsigned char *buf_in;       /* BF16 values or E4M3 codes received */
    float *sc_in;                /* and the E4M3 scales */
    moe_real *recv;
    int64_t n_in, width;         /* rows received, reals a row */
};

static moe_status moe__ep_post(moe_ctx *ctx, const moe__moe *L, const moe__ep_plan *P, int back, const moe_real *send,
                               moe_real *recv, int64_t width, moe_dtype payload, moe_status st, moe__ep_xfer **out) {
    const moe_backend *be = MOE__BE(ctx);
    const int64_t *to = back ? P->recv_rows : P->send_rows, *from = back ? P->send_rows : P->recv_rows;
    int64_t n_out = 0, s, B = ctx->conf.fp8.block, tiles = (width + B - 1) / B, unit;
    unsigned char *buf_out;
    float *sc_out = NULL;
    moe__ep_xfer *X = (moe__ep_xfer *)moe__arena_alloc(ctx, 1, sizeof *X, "expert-parallel exchange");
    *out = X;
    if (!X) return moe__ep_start(ctx, L, MOE_ERR_MEMORY, NULL, NULL, NULL, NULL, 0, MOE_COMM_BYTE, NULL); /* the others' vote */
    X->comm = L->ep;
    X->payload = payload;
    X->recv = recv;
    X->width = width;
    if (payload == MOE_F32)
        return moe__ep_start(ctx, L, st, send, to, recv, from, width, MOE__COMM_REAL, &X->req[0]);
    for (s = 0; s < moe_comm_size(L->ep); s++) {
        n_out += to[s];
        X->n_in += from[s];
    }
    unit = payload == MOE_BF16 ? 2 * width : width; /* bytes a row: BF16 values, or E4M3 codes (+ `tiles` scales) */
    buf_out = (unsigned char *)moe__dev_scratch(ctx, n_out * unit + 1, 1, "expert-parallel exchange");
    X->buf_in = (unsigned char *)moe__dev_scratch(ctx, X->n_in * unit + 1, 1, "expert-parallel exchange");
    if (payload == MOE_FP8_E4M3) {
        sc_out = (float *)moe__dev_scratch(ctx, n_out * tiles + 1, sizeof(float), "expert-parallel exchange");
        X->sc_in = (float *)moe__dev_scratch(ctx, X->n_in * tiles + 1, sizeof(float), "expert-parallel exchange");
    }
    if (!st && !(buf_out && X->buf_in && (payload != MOE_FP8_E4M3 || (sc_out && X->sc_in)))) st = MOE_ERR_MEMORY;
    if (!st && n_out && payload == MOE_BF16) st = be->convert(ctx, send, MOE_F32, n_out * width, buf_out, MOE_BF16);
    /* FP8: each row's 1×B tiles, scaled as the recipe scales them (powers of two unless amax_scales) */
    if (!st && n_out && payload == MOE_FP8_E4M3)
        st = be->fp8_quantize(ctx, send, n_out, width, 1, B, !ctx->conf.fp8.amax_scales, buf_out, sc_out, NULL);
    MOE__TRY(moe__ep_start(ctx, L, st, buf_out, to, X->buf_in, from, unit, MOE_COMM_BYTE, &X->req[0]));
    if (payload != MOE_FP8_E4M3) return MOE_OK;
    st = moe__ep_start(ctx, L, MOE_OK, sc_out, to, X->sc_in, from, tiles, MOE_COMM_F32, &X->req[1]);
    return st ? moe__ep_finish(ctx, X, st) : MOE_OK; /* the codes already in flight */
}

static moe_status moe__ep_progress(moe_ctx *ctx, moe__ep_xfer *X) {
    MOE__TRY(moe__comm_test(ctx, X->comm, &X->req[0]));
    return moe__comm_test(ctx, X->comm, &X->req[1]);
}

static moe_status moe__ep_finish(moe_ctx *ctx, moe__ep_xfer *X, moe_status st) {
    const moe_backend *be = MOE__BE(ctx);
    moe_status rows = moe__comm_wait(ctx, X->comm, &X->req[0]), scales = moe__comm_wait(ctx, X->comm, &X->req[1]);
    if (!st) st = rows ? rows : scales;
    if (st || !X->n_in || X->payload == MOE_F32) return st;
    if (X->payload == MOE_BF16) return be->convert(ctx, X->buf_in, MOE_BF16, X->n_in * X->width, X->recv, MOE_F32);
    return be->fp8_dequantize(ctx, X->buf_in, X->sc_in, X->n_in, X->width, 1, ctx->conf.fp8.block, X->recv);
}

static moe_status moe__ep_exchange(moe_ctx *ctx, const moe__moe *L, const moe__ep_plan *P, int back, const moe_real *send,
                                   moe_real *recv, int64_t width, moe_dtype payload) {
    moe__ep_xfer *X;
    MOE__TRY(moe__ep_post(ctx, L, P, back, send, recv, width, payload, MOE_OK, &X));
    return moe__ep_finish(ctx, X, MOE_OK);
}

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
