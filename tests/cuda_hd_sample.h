/* tests/cuda_hd_sample.h — the MOE_HD functions of moe.h evaluated over a fixed sample of
   inputs and hashed, compiled twice: by gcc as C99 (tests/cuda_hd_ref.c, HD_PREFIX ref) and by
   nvcc as host C++ (tests/test_cuda_host.cu, HD_PREFIX nv). tests/test_cuda_host.cu links both
   and compares the hashes: the same source must give the same bits under both compilers
   (integer promotion, FMA contraction, static inline semantics of nvcc's front end and its
   host compiler). It does not say that the functions are right: tests/test_numerics.c does
   that against oracles; this only says that the two builds agree.

   Include after moe.h (with MOE_IMPLEMENTATION: moe_expf and the SiLU pieces live in the
   implementation), with HD_PREFIX defined to a name and HD_LINKAGE to the storage class of
   the two functions it defines:
     HD_FN(hashes)(uint64_t out[HD_COUNT])  one hash per function (the sample's results in order)
     HD_FN(eval)(int which, uint32_t p)     function `which` at sample input p, as 64 bits
   The sample: every 97th float bit pattern of all 2^32 (0, 97, 194, ... < 2^32: 44,278,014
   patterns) after the special values (zeros, infinities, NaNs, subnormal and normal edges,
   rounding ties and saturation points of bf16/f16/e4m3/e5m2, each with its neighbours, both
   signs). The decoders (bf16/f16 → f32, e4m3/e5m2 → f32) take every code. Results that are
   NaN after float arithmetic (expf, sigmoid, SiLU, RoPE) count as one canonical NaN (the
   payload of a NaN operand is not something either compiler promises); conversions are
   integer code and are compared bit for bit, NaN codes included. */
#ifndef HD_PREFIX
#error "define HD_PREFIX (and HD_LINKAGE) before including tests/cuda_hd_sample.h"
#endif

#define HD_CAT2(a, b) a##b
#define HD_CAT(a, b) HD_CAT2(a, b)
#define HD_FN(name) HD_CAT(HD_CAT(hd_, HD_PREFIX), HD_CAT(_, name))

#ifndef HD_SAMPLE_ONCE
#define HD_SAMPLE_ONCE
enum {
    HD_BF16,        /* moe_f32_to_bf16 */
    HD_BF16_BACK,   /* moe_bf16_to_f32, every code */
    HD_F16,         /* moe_f32_to_f16 */
    HD_F16_BACK,    /* moe_f16_to_f32, every code */
    HD_E4M3,        /* moe_f32_to_e4m3 */
    HD_E4M3_BACK,   /* moe_e4m3_to_f32, every code */
    HD_E5M2,        /* moe_f32_to_e5m2 */
    HD_E5M2_BACK,   /* moe_e5m2_to_f32, every code */
    HD_FP8_SCALE,   /* moe_fp8_scale(amax) */
    HD_EXPF,        /* moe_expf */
    HD_SIGMOID,     /* moe_sigmoid_scalar */
    HD_SILU,        /* moe_silu_scalar */
    HD_SILU_GRAD,   /* moe_silu_grad_scalar */
    HD_ROPE,        /* moe_rope_rotate of (x, x'), angle from the pattern */
    HD_RNG_HASH,    /* moe_rng_hash(key, counter), both from the pattern */
    HD_U64_UNIT,    /* moe__u64_to_unit */
    HD_COUNT
};
static const char *const hd_names[HD_COUNT] = {
    "moe_f32_to_bf16", "moe_bf16_to_f32", "moe_f32_to_f16",  "moe_f16_to_f32",    "moe_f32_to_e4m3",    "moe_e4m3_to_f32",
    "moe_f32_to_e5m2", "moe_e5m2_to_f32", "moe_fp8_scale",   "moe_expf",          "moe_sigmoid_scalar", "moe_silu_scalar",
    "moe_silu_grad_scalar", "moe_rope_rotate", "moe_rng_hash", "moe__u64_to_unit"};

/* float bit patterns with edges: each is taken with its two neighbours and both signs */
static const uint32_t hd_special_base[] = {
    0x00000000u, 0x00000001u, 0x007FFFFFu, 0x00800000u, 0x3F800000u, 0x7F7FFFFFu, 0x7F800000u, /* 0, subnormals, 1, max, inf */
    0x7FC00000u, 0x7FA00000u, 0x7FFFFFFFu,                                                     /* quiet, signalling, max NaN */
    0x3F808000u, 0x3F818000u, 0x7F7F8000u, 0x7F7F7FFFu, 0x00008000u, 0x00018000u,             /* bf16 ties, near max, subnormal */
    0x477FE000u, 0x477FF000u, 0x38800000u, 0x33000000u, 0x33000001u, 0x33800000u, 0x33C00000u, /* f16: 65504, 65520, min normal, 2^-25, 2^-24, 1.5·2^-24 */
    0x38801000u, 0x3A800000u,                                                                  /* f16 tie, 2^-10 */
    0x43E00000u, 0x43E80000u, 0x43F00000u, 0x43700000u, 0x3C800000u, 0x3B000000u, 0x3A800000u, /* e4m3: 448, 464, 480, 240, 2^-6, 2^-9, 2^-10 */
    0x3B400000u, 0x3A000000u,                                                                  /* 1.5·2^-9, 2^-11 */
    0x47600000u, 0x47700000u, 0x476FFFFFu, 0x47800000u, 0x38800000u, 0x37800000u, 0x37000000u, /* e5m2: 57344, 61440, below, 65536, 2^-14, 2^-16, 2^-17 */
    0x37C00000u, 0x0D000000u, 0x00400000u,                                                     /* 1.5·2^-16, tiny for fp8_scale */
    0x42B17218u, 0x42B20000u, 0xC2AE999Au, 0xC2AF0000u, 0x42AE0000u, 0x3F317218u, 0x3E800000u, /* expf: 88.72, 89, -87.3, -87.5, ln 2 */
    0x4B400000u, 0x4AFFFFFEu};                                                                 /* 1.5·2^23, near it */
#define HD_N_BASE ((int64_t)(sizeof hd_special_base / sizeof hd_special_base[0]))
#define HD_N_SPECIAL (HD_N_BASE * 6)
#define HD_STRIDE 97u
#define HD_N_STRIDED ((int64_t)(0xFFFFFFFFu / HD_STRIDE) + 1) /* 0, 97, ... up to 2^32 − 1 */

/* Input i of function `which`'s sample (i < hd_sample_size(which)). */
static int64_t hd_sample_size(int which) {
    return which == HD_BF16_BACK || which == HD_F16_BACK ? 65536 : which == HD_E4M3_BACK || which == HD_E5M2_BACK ? 256
                                                                                                           : HD_N_SPECIAL + HD_N_STRIDED;
}
static uint32_t hd_sample_input(int which, int64_t i) {
    if (hd_sample_size(which) <= 65536) return (uint32_t)i;
    if (i < HD_N_SPECIAL) {
        uint32_t b = hd_special_base[i / 6] + (uint32_t)(i % 3) - 1u; /* b − 1, b, b + 1 */
        return (i % 6) >= 3 ? b ^ 0x80000000u : b;
    }
    return (uint32_t)(i - HD_N_SPECIAL) * HD_STRIDE;
}
static float hd_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* float result bits, any NaN as the one canonical NaN */
static uint32_t hd_bits_canon(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : u;
}
static uint32_t hd_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
#endif /* HD_SAMPLE_ONCE */

/* Function `which` at input pattern p, its result as 64 bits. */
HD_LINKAGE uint64_t HD_FN(eval)(int which, uint32_t p) {
    const float x = hd_f32(p);
    switch (which) {
    case HD_BF16: return moe_f32_to_bf16(x);
    case HD_BF16_BACK: return hd_bits(moe_bf16_to_f32((uint16_t)p));
    case HD_F16: return moe_f32_to_f16(x);
    case HD_F16_BACK: return hd_bits(moe_f16_to_f32((uint16_t)p));
    case HD_E4M3: return moe_f32_to_e4m3(x);
    case HD_E4M3_BACK: return hd_bits(moe_e4m3_to_f32((uint8_t)p));
    case HD_E5M2: return moe_f32_to_e5m2(x);
    case HD_E5M2_BACK: return hd_bits(moe_e5m2_to_f32((uint8_t)p));
    case HD_FP8_SCALE: return hd_bits(moe_fp8_scale(x));
    case HD_EXPF: return hd_bits_canon(moe_expf(x));
    case HD_SIGMOID: return hd_bits_canon(moe_sigmoid_scalar(x));
    case HD_SILU: return hd_bits_canon(moe_silu_scalar(x));
    case HD_SILU_GRAD: return hd_bits_canon(moe_silu_grad_scalar(x));
    case HD_ROPE: {
        /* a = x, b = another pattern; (c, s) on a grid in [−1, 1] (exact conversions) */
        moe_real a = x, b = hd_f32(p * 2654435761u), c = (float)(int32_t)((p >> 8) & 0xFFFFu) * (1.0f / 32768.0f) - 1.0f,
                 s = (float)(int32_t)(p & 0xFFFFu) * (1.0f / 32768.0f) - 1.0f;
        moe_rope_rotate(&a, &b, c, s);
        return ((uint64_t)hd_bits_canon(a) << 32) | hd_bits_canon(b);
    }
    case HD_RNG_HASH: return moe_rng_hash((uint64_t)p * 0xD1B54A32D192ED03ull ^ 0x8BB84B93962EACC9ull, ((uint64_t)p << 29) ^ p);
    case HD_U64_UNIT: return hd_bits(moe__u64_to_unit(((uint64_t)p << 32) | (p * 2654435761u)));
    default: return 0;
    }
}

/* out[which] = FNV-1a (64-bit, over the 64-bit results) of the function over its sample. */
HD_LINKAGE void HD_FN(hashes)(uint64_t *out) {
    int which;
    for (which = 0; which < HD_COUNT; which++) {
        const int64_t n = hd_sample_size(which);
        uint64_t h = 0xCBF29CE484222325ull;
        int64_t i;
        for (i = 0; i < n; i++) {
            h ^= HD_FN(eval)(which, hd_sample_input(which, i));
            h *= 0x100000001B3ull;
        }
        out[which] = h;
    }
}
