/* ==== moe__gemm: CPU GEMM (FP32 / BF16 compute, FP32 accumulation) ======================
   C[m,n] = alpha·op(A)·op(B) + beta·C, C row-major.

   Kernels
   - FP32: 6×16 micro-kernel, 12 ymm accumulators, AVX2+FMA (on Zen 4 a zmm FMA is
     double-pumped, so ymm gives the same FLOP rate; MOE__GEMM_AVX512 uses it too).
   - BF16 (AVX512_BF16): 6×32 micro-kernel, 12 zmm accumulators, vdpbf16ps on K-pairs
     (A and B packed as one uint32 per (k, k+1) pair, odd K padded with zero).
     Without AVX512_BF16, bf16_compute rounds operands to bf16 while packing into FP32
     panels and runs the FP32 kernel (products of bf16 values are exact in FP32).
   Packing
   - B is always packed (NR-wide micro-panels, zero-padded) for a whole column super-panel
     and all of K, cooperatively by all threads, into the shared workspace.
   - A is read in place by the FP32 kernel (it takes a row stride and a k stride, so both
     A [m,k] and Aᵀ [k,m] work) unless it is bf16 / bf16-rounded or reused across enough
     columns; then it is packed once (6-row micro-panels). Row tails (< 6 rows) are packed.
   Threads (OpenMP)
   - Phase 1 packs (panels handed out dynamically), a barrier, phase 2 computes C units
     (row chunk × column chunk, all K) handed out dynamically with an atomic counter, so a
     thread slowed down by a busy core does not hold the others back. Units shrink when
     there are fewer than MOE__GEMM_UNITS_PER_THREAD per thread.
   - Problems under MOE__GEMM_MT_FLOPS run on the calling thread; a contention back-off
     (see moe__gemm_backoff_note) drops to one thread while another process holds a core.
   Determinism
   - The K blocking depends only on k; every element of C is produced by the same
     instruction sequence wherever its tile lies and whichever thread runs it (edge tiles
     run the same kernel on a temporary tile), so C is bit-identical for any thread count.
   - Epilogue per K block: first block C = alpha·acc (beta == 0: C not read) or
     fma(beta, C, alpha·acc); later blocks C = fma(alpha, acc, C).
   ========================================================================================= */

typedef enum moe__gemm_isa { MOE__GEMM_SCALAR = 0, MOE__GEMM_AVX2 = 1, MOE__GEMM_AVX512 = 2 } moe__gemm_isa;

typedef struct moe__gemm_desc {
    int64_t m, n, k;
    const void *a; int64_t lda; int a_trans; int a_bf16;
    const void *b; int64_t ldb; int b_trans; int b_bf16;
    float *c; int64_t ldc;
    float alpha, beta;
    int bf16_compute;
} moe__gemm_desc;

#if defined(__AVX2__) && defined(__FMA__)
#define MOE__GEMM_HAVE_AVX2 1
#endif
#if defined(MOE__GEMM_HAVE_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define MOE__GEMM_HAVE_AVX512 1
#endif
#if defined(MOE__GEMM_HAVE_AVX512) && defined(__AVX512BF16__)
#define MOE__GEMM_HAVE_BF16DP 1
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
#define MOE__GEMM_MCU 96    /* rows of a compute unit (multiple of 6) */
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
#define MOE__GEMM_MT_FLOPS 3.0e6 /* below this many flops run on one thread */
#endif
#ifndef MOE__GEMM_BACKOFF
#define MOE__GEMM_BACKOFF 1 /* 0: never fall back to one thread under contention (tests) */
#endif
#define MOE__GEMM_TILE (MOE__GEMM_BMR * MOE__GEMM_BNR)
#define MOE__GEMM_KMAX (MOE__GEMM_KC1 > MOE__GEMM_KC ? MOE__GEMM_KC1 : MOE__GEMM_KC)

enum { MOE__GEMM_KIND_F32 = 0, MOE__GEMM_KIND_BF16 = 1 };

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
static float moe__gemm_get(const void *p, int bf16, int64_t idx) {
    return bf16 ? moe_bf16_to_f32(((const uint16_t *)p)[idx]) : ((const float *)p)[idx];
}
static float moe__gemm_geta(const moe__gemm_desc *d, int64_t i, int64_t p) {
    return moe__gemm_get(d->a, d->a_bf16, d->a_trans ? p * d->lda + i : i * d->lda + p);
}
static float moe__gemm_getb(const moe__gemm_desc *d, int64_t p, int64_t j) {
    return moe__gemm_get(d->b, d->b_bf16, d->b_trans ? j * d->ldb + p : p * d->ldb + j);
}
static float moe__gemm_rnd(float x) { return moe_bf16_to_f32(moe_f32_to_bf16(x)); }

/* ---- scalar reference path: rows [m0, m1) ---- */
static void moe__gemm_scalar_rows(const moe__gemm_desc *d, int64_t m0, int64_t m1) {
    int64_t i, j, p;
    int rnd_a = d->bf16_compute && !d->a_bf16, rnd_b = d->bf16_compute && !d->b_bf16;
    for (i = m0; i < m1; i++) {
        float *crow = d->c + i * d->ldc;
        for (j = 0; j < d->n; j++) {
            float acc = 0.0f, v;
            for (p = 0; p < d->k; p++) {
                float av = moe__gemm_geta(d, i, p), bv = moe__gemm_getb(d, p, j);
                if (rnd_a) av = moe__gemm_rnd(av);
                if (rnd_b) bv = moe__gemm_rnd(bv);
                acc += av * bv;
            }
            v = d->alpha * acc;
            if (d->beta != 0.0f) v += d->beta * crow[j];
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
static uint32_t moe__gemm_get16(const void *src, int bf16, int64_t idx) {
    return bf16 ? (uint32_t)((const uint16_t *)src)[idx] : (uint32_t)moe_f32_to_bf16(((const float *)src)[idx]);
}

/* ---- packing: FP32 micro-panels ---- */
/* op(B) rows [p0, p0+kc), cols [j, j+nr), nr ≤ 16 → dst[kc][16], zero-padded. */
static void moe__gemm_pack_b_f32(const moe__gemm_desc *d, int64_t p0, int64_t kc, int64_t j, int64_t nr,
                                 float *MOE_RESTRICT dst) {
    const int NR = MOE__GEMM_NR;
    const int rnd = d->bf16_compute && !d->b_bf16;
    const int64_t ldb = d->ldb;
    int64_t p, jj;
    if (!d->b_bf16 && !rnd && !d->b_trans) {
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
    } else if (!d->b_bf16 && !rnd) { /* B stored [n, k]: transpose 8×8 blocks */
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
            for (jj = 0; jj < nr; jj++) {
                float v = moe__gemm_getb(d, p0 + p, j + jj);
                dst[p * NR + jj] = rnd ? moe__gemm_rnd(v) : v;
            }
            for (; jj < NR; jj++) dst[p * NR + jj] = 0.0f;
        }
    }
}

/* op(A) rows [i, i+mr), mr ≤ 6, k [p0, p0+kc) → dst[kc][6], zero-padded. */
static void moe__gemm_pack_a_f32(const moe__gemm_desc *d, int64_t i, int64_t mr, int64_t p0, int64_t kc,
                                 float *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_MR;
    const int rnd = d->bf16_compute && !d->a_bf16;
    const int64_t lda = d->lda;
    int64_t p, ii;
    if (!d->a_bf16 && !rnd && d->a_trans) {
        const float *s = (const float *)d->a + p0 * lda + i;
        if (mr == MR) {
            for (p = 0; p < kc; p++) {
                const float *r = s + p * lda;
                float *o = dst + p * MR;
                float v0 = r[0], v1 = r[1], v2 = r[2], v3 = r[3], v4 = r[4], v5 = r[5];
                o[0] = v0; o[1] = v1; o[2] = v2; o[3] = v3; o[4] = v4; o[5] = v5;
            }
        } else {
            for (p = 0; p < kc; p++) {
                for (ii = 0; ii < MR; ii++) dst[p * MR + ii] = ii < mr ? s[p * lda + ii] : 0.0f;
            }
        }
    } else if (!d->a_bf16 && !rnd) {
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
            for (ii = 0; ii < mr; ii++) {
                float v = moe__gemm_geta(d, i + ii, p0 + p);
                dst[p * MR + ii] = rnd ? moe__gemm_rnd(v) : v;
            }
            for (; ii < MR; ii++) dst[p * MR + ii] = 0.0f;
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
        uint16_t tmp[MOE__GEMM_KMAX + 2];
        for (jj = 0; jj < nr; jj++) {
            moe__gemm_get_bf16(d->b, d->b_bf16, (j + jj) * ldb + p0, tmp, kc);
            tmp[kc] = 0;
            for (pp = 0; pp < kp; pp++) dst[pp * NR + jj] = (uint32_t)tmp[2 * pp] | ((uint32_t)tmp[2 * pp + 1] << 16);
        }
        for (; jj < NR; jj++)
            for (pp = 0; pp < kp; pp++) dst[pp * NR + jj] = 0u;
    } else {
        uint16_t t0[MOE__GEMM_BNR], t1[MOE__GEMM_BNR];
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

/* op(A) rows [i, i+mr), mr ≤ 6, k [p0, p0+kc) → dst[(kc+1)/2][6]. */
static void moe__gemm_pack_a_bf16(const moe__gemm_desc *d, int64_t i, int64_t mr, int64_t p0, int64_t kc,
                                  uint32_t *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_BMR;
    const int64_t kp = (kc + 1) / 2, lda = d->lda;
    int64_t pp, ii;
    if (!d->a_trans) { /* row i of A: consecutive k */
        uint16_t tmp[MOE__GEMM_KMAX + 2];
        for (ii = 0; ii < mr; ii++) {
            moe__gemm_get_bf16(d->a, d->a_bf16, (i + ii) * lda + p0, tmp, kc);
            tmp[kc] = 0;
            for (pp = 0; pp < kp; pp++) dst[pp * MR + ii] = (uint32_t)tmp[2 * pp] | ((uint32_t)tmp[2 * pp + 1] << 16);
        }
        for (; ii < MR; ii++)
            for (pp = 0; pp < kp; pp++) dst[pp * MR + ii] = 0u;
    } else if (mr == MR) {
        uint16_t t0[8], t1[8];
        for (pp = 0; pp < kp; pp++) {
            int64_t p = p0 + 2 * pp;
            moe__gemm_get_bf16(d->a, d->a_bf16, p * lda + i, t0, MR);
            if (2 * pp + 1 < kc) moe__gemm_get_bf16(d->a, d->a_bf16, (p + 1) * lda + i, t1, MR);
            else memset(t1, 0, sizeof t1);
            for (ii = 0; ii < MR; ii++) dst[pp * MR + ii] = (uint32_t)t0[ii] | ((uint32_t)t1[ii] << 16);
        }
    } else {
        for (pp = 0; pp < kp; pp++) {
            int64_t p = p0 + 2 * pp;
            int has1 = 2 * pp + 1 < kc;
            for (ii = 0; ii < mr; ii++) {
                uint32_t lo = moe__gemm_get16(d->a, d->a_bf16, p * lda + i + ii);
                uint32_t hi = has1 ? moe__gemm_get16(d->a, d->a_bf16, (p + 1) * lda + i + ii) : 0u;
                dst[pp * MR + ii] = lo | (hi << 16);
            }
            for (; ii < MR; ii++) dst[pp * MR + ii] = 0u;
        }
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
    if (csa == 1) {
        const float *a0 = a, *a1 = a + rsa, *a2 = a + 2 * rsa, *a3 = a + 3 * rsa, *a4 = a + 4 * rsa,
                    *a5 = a + 5 * rsa;
        for (p = 0; p + 4 <= kc; p += 4) {
            MOE__GEMM_STEP(a0 + p, a1 + p, a2 + p, a3 + p, a4 + p, a5 + p)
            MOE__GEMM_STEP(a0 + p + 1, a1 + p + 1, a2 + p + 1, a3 + p + 1, a4 + p + 1, a5 + p + 1)
            MOE__GEMM_STEP(a0 + p + 2, a1 + p + 2, a2 + p + 2, a3 + p + 2, a4 + p + 2, a5 + p + 2)
            MOE__GEMM_STEP(a0 + p + 3, a1 + p + 3, a2 + p + 3, a3 + p + 3, a4 + p + 3, a5 + p + 3)
        }
        for (; p < kc; p++) {
            MOE__GEMM_STEP(a0 + p, a1 + p, a2 + p, a3 + p, a4 + p, a5 + p)
        }
    } else if (csa == MOE__GEMM_MR) {
        for (p = 0; p + 4 <= kc; p += 4) {
            MOE__GEMM_STEP(a, a + 1, a + 2, a + 3, a + 4, a + 5)
            MOE__GEMM_STEP(a + 6, a + 7, a + 8, a + 9, a + 10, a + 11)
            MOE__GEMM_STEP(a + 12, a + 13, a + 14, a + 15, a + 16, a + 17)
            MOE__GEMM_STEP(a + 18, a + 19, a + 20, a + 21, a + 22, a + 23)
            a += 24;
        }
        for (; p < kc; p++) {
            MOE__GEMM_STEP(a, a + 1, a + 2, a + 3, a + 4, a + 5)
            a += 6;
        }
    } else {
        for (p = 0; p < kc; p++) {
            MOE__GEMM_STEP(a, a + 1, a + 2, a + 3, a + 4, a + 5)
            a += csa;
        }
    }
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
#define MOE__GEMM_EPI(R, X0, X1)                                                                 \
    {                                                                                            \
        float *cr = c + (R) * ldc;                                                               \
        if (mode == 0) {                                                                         \
            _mm512_storeu_ps(cr, _mm512_mul_ps(va, X0));                                         \
            _mm512_storeu_ps(cr + 16, _mm512_mul_ps(va, X1));                                    \
        } else if (mode == 1) {                                                                  \
            __m512 vb = _mm512_set1_ps(beta);                                                    \
            _mm512_storeu_ps(cr, _mm512_fmadd_ps(vb, _mm512_loadu_ps(cr), _mm512_mul_ps(va, X0))); \
            _mm512_storeu_ps(cr + 16, _mm512_fmadd_ps(vb, _mm512_loadu_ps(cr + 16), _mm512_mul_ps(va, X1))); \
        } else {                                                                                 \
            _mm512_storeu_ps(cr, _mm512_fmadd_ps(va, X0, _mm512_loadu_ps(cr)));                  \
            _mm512_storeu_ps(cr + 16, _mm512_fmadd_ps(va, X1, _mm512_loadu_ps(cr + 16)));        \
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


/* ---- plan: blocking and workspace layout (a function of the problem, not of threads) ---- */
typedef struct moe__gemm_plan {
    int kind, mr, nr, pack_a;
    int64_t kcb;   /* K block */
    int64_t kpad;  /* k rounded up to even */
    int64_t ncs;   /* columns per B super-panel (multiple of nr) */
    int64_t mcs;   /* rows per A super-block (multiple of mr) */
    size_t b_bytes, a_bytes, t_bytes;
} moe__gemm_plan;

static void moe__gemm_make_plan(const moe__gemm_desc *d, int kind, moe__gemm_plan *pl) {
    int64_t m = moe__gemm_max64(d->m, 1), n = moe__gemm_max64(d->n, 1), k = moe__gemm_max64(d->k, 1);
    pl->kind = kind;
    pl->mr = kind == MOE__GEMM_KIND_BF16 ? MOE__GEMM_BMR : MOE__GEMM_MR;
    pl->nr = kind == MOE__GEMM_KIND_BF16 ? MOE__GEMM_BNR : MOE__GEMM_NR;
    pl->pack_a = kind == MOE__GEMM_KIND_BF16 || d->a_bf16 || d->bf16_compute ||
                 (d->a_trans ? n >= MOE__GEMM_PACKA_NT : n >= MOE__GEMM_PACKA_N);
    pl->kcb = moe__gemm_kcb(k);
    pl->kpad = moe__gemm_rup(k, 2);
    pl->ncs = moe__gemm_max64(pl->nr, (int64_t)(MOE__GEMM_BBUDGET / (pl->kpad * 4)) / pl->nr * pl->nr);
    pl->ncs = moe__gemm_min64(pl->ncs, moe__gemm_rup(n, pl->nr));
    pl->mcs = moe__gemm_rup(m, pl->mr);
    if (pl->pack_a)
        pl->mcs = moe__gemm_min64(pl->mcs, moe__gemm_max64(pl->mr, (int64_t)(MOE__GEMM_ABUDGET / (pl->kpad * 4)) / pl->mr * pl->mr));
    pl->b_bytes = (size_t)moe__gemm_rup(pl->kpad * pl->ncs * 4, 64);
    pl->a_bytes = (size_t)moe__gemm_rup(pl->kpad * (pl->pack_a ? pl->mcs : pl->mr) * 4, 64);
    pl->t_bytes = (size_t)moe__gemm_rup(MOE__GEMM_TILE * 4, 64);
}

static size_t moe__gemm_workspace_bytes(const moe__gemm_desc *d, int n_threads) {
    moe__gemm_plan p0, p1;
    size_t s0, s1;
    if (n_threads < 1) n_threads = 1;
    moe__gemm_make_plan(d, MOE__GEMM_KIND_F32, &p0);
    moe__gemm_make_plan(d, MOE__GEMM_KIND_BF16, &p1);
    s0 = p0.b_bytes + p0.a_bytes + p0.t_bytes * (size_t)n_threads;
    s1 = p1.b_bytes + p1.a_bytes + p1.t_bytes * (size_t)n_threads;
    return (s0 > s1 ? s0 : s1) + 128;
}

#if defined(MOE__GEMM_HAVE_AVX2)
typedef struct moe__gemm_job {
    const moe__gemm_desc *d;
    moe__gemm_plan pl;
    float *bp, *ap, *tiles;
    int64_t counter; /* tickets handed out (shared) */
    double busy0;    /* seconds thread 0 spent working (for the contention check) */
    int64_t mcu, ncu; /* compute unit: rows (multiple of 6) × cols (multiple of 32) */
} moe__gemm_job;

#ifdef _OPENMP
/* Contention back-off. On a shared machine another process may hold a core; a team thread
   queued behind it makes the caller wait at the barriers for a scheduler time slice (often
   5–25 ms), far longer than the GEMM itself. When thread 0 waited longer than it worked (and
   > 1 ms), later calls run on one thread for a while (10 ms, doubling up to 0.5 s while it
   persists). The thread count never changes the result (see Determinism), only the speed. */
static double moe__gemm_bo_until = 0.0, moe__gemm_bo_len = 0.0;
static int moe__gemm_bo_started = 0;
static void moe__gemm_backoff_note(double wall, double busy) {
    double len, now = omp_get_wtime();
    int contended = wall - busy > 1.0e-3 && wall - busy > busy, started;
#pragma omp atomic read
    started = moe__gemm_bo_started;
    if (!started) { /* the first team start creates the threads: not a contention signal */
#pragma omp atomic write
        moe__gemm_bo_started = 1;
        return;
    }
#pragma omp atomic read
    len = moe__gemm_bo_len;
    if (contended) {
        len = len < 0.01 ? 0.01 : (len * 2.0 > 0.5 ? 0.5 : len * 2.0);
#pragma omp atomic write
        moe__gemm_bo_len = len;
#pragma omp atomic write
        moe__gemm_bo_until = now + len;
    } else if (len > 0.0) {
#pragma omp atomic write
        moe__gemm_bo_len = 0.0;
    }
}
static int moe__gemm_backoff_active(void) {
    double until;
#pragma omp atomic read
    until = moe__gemm_bo_until;
    return omp_get_wtime() < until;
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
        int64_t kc = moe__gemm_min64(pl->kcb, d->k - pc), kp = (kc + 1) / 2;
        if (pl->kind == MOE__GEMM_KIND_BF16)
            moe__gemm_pack_b_bf16(d, pc, kc, j, nr, (uint32_t *)job->bp + (pc / 2) * pl->ncs + (j - js) * kp);
        else
            moe__gemm_pack_b_f32(d, pc, kc, j, nr, job->bp + pc * pl->ncs + (j - js) * kc);
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
        int64_t kc = moe__gemm_min64(pl->kcb, d->k - pc), kp = (kc + 1) / 2;
        if (pl->kind == MOE__GEMM_KIND_BF16 && d->a_trans) {
            moe__gemm_pack_at_bf16_group(d, i, rows, pc, kc, (uint32_t *)job->ap + (pc / 2) * width + off * kp);
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

/* Compute C[i0:i1, j0:j1] over all of K (super-block origin is, super-panel origin js). */
static void moe__gemm_do_unit(const moe__gemm_job *job, float *tile, int64_t is, int64_t js, int64_t i0, int64_t i1,
                              int64_t j0, int64_t j1) {
    const moe__gemm_desc *d = job->d;
    const moe__gemm_plan *pl = &job->pl;
    const int MR = pl->mr, NR = pl->nr;
    const int64_t mfull = d->m / MR * MR, ldc = d->ldc;
    const int64_t width = pl->pack_a ? pl->mcs : pl->mr;
    int64_t pc, jr, ir, i;
    for (pc = 0; pc < d->k; pc += pl->kcb) {
        const int64_t kc = moe__gemm_min64(pl->kcb, d->k - pc), kp = (kc + 1) / 2;
        const int mode = pc > 0 ? 2 : (d->beta == 0.0f ? 0 : 1);
        for (jr = j0; jr < j1; jr += NR) {
            const int64_t nr = moe__gemm_min64(NR, j1 - jr);
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
                if (pl->kind == MOE__GEMM_KIND_BF16) {
                    moe__gemm_kern_bf16(kp, (const uint32_t *)job->ap + (pc / 2) * width + (ir - is) * kp,
                                        (const uint32_t *)job->bp + (pc / 2) * pl->ncs + (jr - js) * kp, ct, ldt,
                                        d->alpha, d->beta, mode);
                } else
#endif
                {
                    const float *ap;
                    int64_t rsa, csa;
                    if (pl->pack_a) {
                        ap = job->ap + pc * width + (ir - is) * kc; rsa = 1; csa = MOE__GEMM_MR;
                    } else if (ir >= mfull) {
                        ap = job->ap + pc * width; rsa = 1; csa = MOE__GEMM_MR;
                    } else if (d->a_trans) {
                        ap = (const float *)d->a + pc * d->lda + ir; rsa = 1; csa = d->lda;
                    } else {
                        ap = (const float *)d->a + ir * d->lda + pc; rsa = d->lda; csa = 1;
                    }
                    moe__gemm_kern_avx2(kc, ap, rsa, csa, job->bp + pc * pl->ncs + (jr - js) * kc, ct, ldt, d->alpha,
                                        d->beta, mode);
                    (void)kp;
                }
                if (ct == tile)
                    for (i = 0; i < mr; i++) memcpy(cp + i * ldc, tile + i * NR, (size_t)nr * sizeof(float));
            }
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
}
#endif

static void moe__gemm_run(const moe__gemm_desc *d, moe__gemm_isa isa, int n_threads, void *workspace) {
    int nt = n_threads < 1 ? 1 : n_threads;
    int64_t i, j;
    if (d->m <= 0 || d->n <= 0) return;
    if (d->k <= 0) {
        for (i = 0; i < d->m; i++) {
            float *cr = d->c + i * d->ldc;
            for (j = 0; j < d->n; j++) cr[j] = d->beta == 0.0f ? 0.0f : d->beta * cr[j];
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
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
        {
            int t, team = 1, tid = 0;
#ifdef _OPENMP
            team = omp_get_num_threads();
            tid = omp_get_thread_num();
#endif
            for (t = tid; t < nt; t += team) moe__gemm_scalar_rows(d, d->m * t / nt, d->m * (t + 1) / nt);
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
#if defined(MOE__GEMM_HAVE_BF16DP)
        if (isa == MOE__GEMM_AVX512 && d->bf16_compute) kind = MOE__GEMM_KIND_BF16;
#endif
        job.d = d;
        moe__gemm_make_plan(d, kind, &job.pl);
        ws += (64u - (unsigned)((uintptr_t)ws & 63u)) & 63u;
        job.bp = (float *)(void *)ws;
        job.ap = (float *)(void *)(ws + job.pl.b_bytes);
        job.tiles = (float *)(void *)(ws + job.pl.b_bytes + job.pl.a_bytes);
        job.counter = 0;
        job.busy0 = 0.0;
        /* compute units: smaller ones when there are too few to balance the threads */
        job.mcu = MOE__GEMM_MCU;
        job.ncu = MOE__GEMM_NCU;
        for (;;) {
            units = ((moe__gemm_min64(d->m, job.pl.mcs) + job.mcu - 1) / job.mcu) *
                    ((moe__gemm_min64(d->n, job.pl.ncs) + job.ncu - 1) / job.ncu);
            if (nt <= 1 || units >= MOE__GEMM_UNITS_PER_THREAD * (int64_t)nt) break;
            if (job.mcu > 24) job.mcu = job.mcu / 12 * 6;
            else if (job.ncu > 32) job.ncu /= 2;
            else break;
        }
        if ((int64_t)nt > units) nt = (int)units;
#ifdef _OPENMP
        if (MOE__GEMM_BACKOFF && nt > 1 && moe__gemm_backoff_active()) nt = 1;
#endif
        if (nt <= 1) {
            moe__gemm_body(&job, 0, 0);
        } else {
#ifdef _OPENMP
            double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt)
            moe__gemm_body(&job, omp_get_thread_num(), 1);
            moe__gemm_backoff_note(omp_get_wtime() - t0, job.busy0);
#endif
        }
    }
#else
    (void)workspace;
#endif
}
