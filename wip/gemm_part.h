/* ==== moe__gemm: CPU GEMM (FP32 / BF16 compute, FP32 accumulation) ======================
   C[m,n] = alpha·op(A)·op(B) + beta·C, C row-major.

   Design (BLIS-like):
   - Loop nest per thread: jc (NC cols) → pc (KC depth) → pack B panel → ic (MC rows)
     → [pack A block] → jr (NR) → ir (MR) → micro-kernel.
   - FP32 micro-kernel: 6×16 with 12 ymm accumulators (AVX2+FMA). On Zen 4 a zmm FMA is
     double-pumped, so ymm gives the same FLOP rate. A is read in place (no packing) when it
     is FP32 and no bf16 rounding is asked: the kernel takes a row stride and a k stride, so
     both A [m,k] and Aᵀ [k,m] work; only a tail of < 6 rows is copied to a zero-padded panel.
     B is always packed into kc×16 micro-panels (zero-padded).
   - BF16 micro-kernel (AVX512_BF16): 6×32 with 12 zmm accumulators using vdpbf16ps; A and B
     packed as bf16 K-pairs (one uint32 per pair; odd K padded with zero).
     Without AVX512_BF16, bf16_compute rounds operands to bf16 while packing into FP32
     panels and runs the FP32 kernel (products of bf16 values are exact in FP32).
   - Determinism: threads split M and/or N at micro-tile granularity only. The K blocking
     depends only on k, each element of C is produced by the same instruction sequence
     wherever its tile lies (edge tiles run the same kernel on a temporary tile), so C is
     bit-identical for any thread count.
   - Epilogue per K block: first block C = alpha·acc (beta == 0, C not read) or
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
#define MOE__GEMM_KC 256    /* K block (multiple of 128) */
#define MOE__GEMM_KC1 384   /* k up to this: a single K block */
#define MOE__GEMM_MC 120    /* rows per A block (multiple of 6) */
#define MOE__GEMM_NC 1024   /* cols per B panel (multiple of 32) */
#ifndef MOE__GEMM_PACKA_N
#define MOE__GEMM_PACKA_N 512
#endif
#ifndef MOE__GEMM_PACKA_NT
#define MOE__GEMM_PACKA_NT 64
#endif
#define MOE__GEMM_TILE (MOE__GEMM_BMR * MOE__GEMM_BNR)

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
static int64_t moe__gemm_rup(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

/* K block size: a function of k only (never of the thread count). */
static int64_t moe__gemm_kcb(int64_t k) { return k <= MOE__GEMM_KC1 ? k : MOE__GEMM_KC; }

static size_t moe__gemm_thread_bytes(const moe__gemm_desc *d) {
    int64_t kcb = moe__gemm_rup(moe__gemm_kcb(d->k) < 1 ? 1 : moe__gemm_kcb(d->k), 2);
    int64_t ncb = moe__gemm_rup(moe__gemm_min64(MOE__GEMM_NC, d->n < 1 ? 1 : d->n), MOE__GEMM_BNR);
    int64_t mcb = moe__gemm_rup(moe__gemm_min64(MOE__GEMM_MC, d->m < 1 ? 1 : d->m), MOE__GEMM_MR);
    size_t fl = (size_t)(kcb * ncb) + (size_t)(kcb * mcb) + (size_t)MOE__GEMM_TILE;
    return moe__gemm_rup((int64_t)(fl * sizeof(float)), 64) + 64;
}

static size_t moe__gemm_workspace_bytes(const moe__gemm_desc *d, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    return moe__gemm_thread_bytes(d) * (size_t)n_threads + 128;
}

/* ---- element access (generic, scalar) ---- */
static float moe__gemm_get(const void *p, int bf16, int64_t idx) {
    return bf16 ? moe_bf16_to_f32(((const uint16_t *)p)[idx]) : ((const float *)p)[idx];
}
static float moe__gemm_geta(const moe__gemm_desc *d, int64_t i, int64_t p) {
    return moe__gemm_get(d->a, d->a_bf16, d->a_trans ? p * d->lda + i : i * d->lda + p);
}
static float moe__gemm_getb(const moe__gemm_desc *d, int64_t p, int64_t j) {
    return moe__gemm_get(d->b, d->b_bf16, d->b_trans ? j * d->ldb + p : p * d->ldb + j);
}
#if defined(MOE__GEMM_HAVE_AVX2)
static uint16_t moe__gemm_geta16(const moe__gemm_desc *d, int64_t i, int64_t p) {
    int64_t idx = d->a_trans ? p * d->lda + i : i * d->lda + p;
    return d->a_bf16 ? ((const uint16_t *)d->a)[idx] : moe_f32_to_bf16(((const float *)d->a)[idx]);
}
static uint16_t moe__gemm_getb16(const moe__gemm_desc *d, int64_t p, int64_t j) {
    int64_t idx = d->b_trans ? j * d->ldb + p : p * d->ldb + j;
    return d->b_bf16 ? ((const uint16_t *)d->b)[idx] : moe_f32_to_bf16(((const float *)d->b)[idx]);
}
#endif
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
/* ---- packing: FP32 panels ---- */
/* B block rows [p0, p0+kc), cols [j0, j0+nc) → panels of NR cols: dst[jp][p][NR]. */
static void moe__gemm_pack_b_f32(const moe__gemm_desc *d, int64_t p0, int64_t kc, int64_t j0, int64_t nc,
                                 float *MOE_RESTRICT dst) {
    const int NR = MOE__GEMM_NR;
    int rnd = d->bf16_compute && !d->b_bf16;
    int64_t jp, p, jj;
    for (jp = 0; jp < nc; jp += NR) {
        int64_t nr = moe__gemm_min64(NR, nc - jp);
        float *o = dst + jp * kc;
        if (!d->b_bf16 && !rnd && !d->b_trans && nr == NR) {
            const float *s = (const float *)d->b + p0 * d->ldb + j0 + jp;
            for (p = 0; p < kc; p++) memcpy(o + p * NR, s + p * d->ldb, NR * sizeof(float));
        } else if (!d->b_bf16 && !rnd && d->b_trans) {
            for (jj = 0; jj < nr; jj++) {
                const float *s = (const float *)d->b + (j0 + jp + jj) * d->ldb + p0;
                for (p = 0; p < kc; p++) o[p * NR + jj] = s[p];
            }
            for (; jj < NR; jj++)
                for (p = 0; p < kc; p++) o[p * NR + jj] = 0.0f;
        } else {
            for (p = 0; p < kc; p++) {
                for (jj = 0; jj < nr; jj++) {
                    float v = moe__gemm_getb(d, p0 + p, j0 + jp + jj);
                    o[p * NR + jj] = rnd ? moe__gemm_rnd(v) : v;
                }
                for (; jj < NR; jj++) o[p * NR + jj] = 0.0f;
            }
        }
    }
}

/* A block rows [i0, i0+mc), k [p0, p0+kc) → panels of MR rows: dst[ip][p][MR]. */
static void moe__gemm_pack_a_f32(const moe__gemm_desc *d, int64_t i0, int64_t mc, int64_t p0, int64_t kc,
                                 float *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_MR;
    int rnd = d->bf16_compute && !d->a_bf16;
    int64_t ip, p, ii;
    for (ip = 0; ip < mc; ip += MR) {
        int64_t mr = moe__gemm_min64(MR, mc - ip);
        float *o = dst + ip * kc;
        if (!d->a_bf16 && !rnd && !d->a_trans) {
            for (ii = 0; ii < mr; ii++) {
                const float *s = (const float *)d->a + (i0 + ip + ii) * d->lda + p0;
                for (p = 0; p < kc; p++) o[p * MR + ii] = s[p];
            }
            for (; ii < MR; ii++)
                for (p = 0; p < kc; p++) o[p * MR + ii] = 0.0f;
        } else {
            for (p = 0; p < kc; p++) {
                for (ii = 0; ii < mr; ii++) {
                    float v = moe__gemm_geta(d, i0 + ip + ii, p0 + p);
                    o[p * MR + ii] = rnd ? moe__gemm_rnd(v) : v;
                }
                for (; ii < MR; ii++) o[p * MR + ii] = 0.0f;
            }
        }
    }
}

/* ---- packing: BF16 K-pairs (uint32 = lo: even k, hi: odd k) ---- */
static void moe__gemm_pack_b_bf16(const moe__gemm_desc *d, int64_t p0, int64_t kc, int64_t j0, int64_t nc,
                                  uint32_t *MOE_RESTRICT dst) {
    const int NR = MOE__GEMM_BNR;
    int64_t kp = (kc + 1) / 2, jp, pp, jj;
    for (jp = 0; jp < nc; jp += NR) {
        int64_t nr = moe__gemm_min64(NR, nc - jp);
        uint32_t *o = dst + jp * kp;
        for (pp = 0; pp < kp; pp++) {
            int64_t p = p0 + 2 * pp;
            int has1 = 2 * pp + 1 < kc;
            for (jj = 0; jj < nr; jj++) {
                uint32_t lo = moe__gemm_getb16(d, p, j0 + jp + jj);
                uint32_t hi = has1 ? moe__gemm_getb16(d, p + 1, j0 + jp + jj) : 0u;
                o[pp * NR + jj] = lo | (hi << 16);
            }
            for (; jj < NR; jj++) o[pp * NR + jj] = 0u;
        }
    }
}

static void moe__gemm_pack_a_bf16(const moe__gemm_desc *d, int64_t i0, int64_t mc, int64_t p0, int64_t kc,
                                  uint32_t *MOE_RESTRICT dst) {
    const int MR = MOE__GEMM_BMR;
    int64_t kp = (kc + 1) / 2, ip, pp, ii;
    for (ip = 0; ip < mc; ip += MR) {
        int64_t mr = moe__gemm_min64(MR, mc - ip);
        uint32_t *o = dst + ip * kp;
        for (pp = 0; pp < kp; pp++) {
            int64_t p = p0 + 2 * pp;
            int has1 = 2 * pp + 1 < kc;
            for (ii = 0; ii < mr; ii++) {
                uint32_t lo = moe__gemm_geta16(d, i0 + ip + ii, p);
                uint32_t hi = has1 ? moe__gemm_geta16(d, i0 + ip + ii, p + 1) : 0u;
                o[pp * MR + ii] = lo | (hi << 16);
            }
            for (; ii < MR; ii++) o[pp * MR + ii] = 0u;
        }
    }
}

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

#if defined(MOE__GEMM_HAVE_AVX2)
/* A is read in place (FP32, no rounding) unless it is reused across enough column panels
   for packing to pay off. */
static int moe__gemm_pack_a_needed(const moe__gemm_desc *d, int kind) {
    if (kind == MOE__GEMM_KIND_BF16 || d->a_bf16 || d->bf16_compute) return 1;
    return d->n >= MOE__GEMM_PACKA_N || (d->a_trans && d->n >= MOE__GEMM_PACKA_NT);
}

/* One thread's rectangle C[m0:m1, n0:n1] with the SIMD kernels. ws: 64-byte aligned. */
static void moe__gemm_rect(const moe__gemm_desc *d, int kind, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                           unsigned char *ws) {
    const int64_t k = d->k, kcb = moe__gemm_kcb(k);
    const int MR = kind == MOE__GEMM_KIND_BF16 ? MOE__GEMM_BMR : MOE__GEMM_MR;
    const int NR = kind == MOE__GEMM_KIND_BF16 ? MOE__GEMM_BNR : MOE__GEMM_NR;
    const int64_t kcb2 = moe__gemm_rup(kcb, 2);
    const int64_t ncb = moe__gemm_rup(moe__gemm_min64(MOE__GEMM_NC, d->n), MOE__GEMM_BNR);
    float *bbuf = (float *)ws;
    float *abuf = bbuf + kcb2 * ncb;
    float *tile = abuf + kcb2 * moe__gemm_rup(moe__gemm_min64(MOE__GEMM_MC, d->m), MOE__GEMM_MR);
    const int pack_a = moe__gemm_pack_a_needed(d, kind);
    int64_t jc, pc, ic, jr, ir;
    memset(tile, 0, sizeof(float) * MOE__GEMM_TILE);
    for (jc = n0; jc < n1; jc += MOE__GEMM_NC) {
        const int64_t nc = moe__gemm_min64(MOE__GEMM_NC, n1 - jc);
        for (pc = 0; pc < k; pc += kcb) {
            const int64_t kc = moe__gemm_min64(kcb, k - pc), kp = (kc + 1) / 2;
            const int mode = pc > 0 ? 2 : (d->beta == 0.0f ? 0 : 1);
            if (kind == MOE__GEMM_KIND_BF16)
                moe__gemm_pack_b_bf16(d, pc, kc, jc, nc, (uint32_t *)bbuf);
            else
                moe__gemm_pack_b_f32(d, pc, kc, jc, nc, bbuf);
            for (ic = m0; ic < m1; ic += MOE__GEMM_MC) {
                const int64_t mc = moe__gemm_min64(MOE__GEMM_MC, m1 - ic);
                const int64_t mfull = mc / MR * MR;
                if (kind == MOE__GEMM_KIND_BF16)
                    moe__gemm_pack_a_bf16(d, ic, mc, pc, kc, (uint32_t *)abuf);
                else if (pack_a)
                    moe__gemm_pack_a_f32(d, ic, mc, pc, kc, abuf);
                else if (mfull < mc)
                    moe__gemm_pack_a_f32(d, ic + mfull, mc - mfull, pc, kc, abuf + mfull * kc);
                for (jr = 0; jr < nc; jr += NR) {
                    const int64_t nr = moe__gemm_min64(NR, nc - jr);
                    for (ir = 0; ir < mc; ir += MR) {
                        const int64_t mr = moe__gemm_min64(MR, mc - ir);
                        float *cp = d->c + (ic + ir) * d->ldc + jc + jr;
                        float *ct = cp;
                        int64_t ldt = d->ldc, i;
                        if (mr < MR || nr < NR) {
                            ct = tile;
                            ldt = NR;
                            if (mode != 0)
                                for (i = 0; i < mr; i++) memcpy(tile + i * NR, cp + i * d->ldc, (size_t)nr * sizeof(float));
                        }
#if defined(MOE__GEMM_HAVE_BF16DP)
                        if (kind == MOE__GEMM_KIND_BF16) {
                            moe__gemm_kern_bf16(kp, (const uint32_t *)abuf + ir * kp, (const uint32_t *)bbuf + jr * kp,
                                                ct, ldt, d->alpha, d->beta, mode);
                        } else
#endif
                        {
                            const float *ap;
                            int64_t rsa, csa;
                            (void)kp;
                            if (pack_a || ir >= mfull) {
                                ap = abuf + ir * kc; rsa = 1; csa = MOE__GEMM_MR;
                            } else if (d->a_trans) {
                                ap = (const float *)d->a + pc * d->lda + ic + ir; rsa = 1; csa = d->lda;
                            } else {
                                ap = (const float *)d->a + (ic + ir) * d->lda + pc; rsa = d->lda; csa = 1;
                            }
                            moe__gemm_kern_avx2(kc, ap, rsa, csa, bbuf + jr * kc, ct, ldt, d->alpha, d->beta, mode);
                        }
                        if (ct == tile)
                            for (i = 0; i < mr; i++) memcpy(cp + i * d->ldc, tile + i * NR, (size_t)nr * sizeof(float));
                    }
                }
            }
        }
    }
}
#endif

#if defined(MOE__GEMM_HAVE_AVX2)
/* Split m×n among nt threads as a tm×tn grid of micro-tile-aligned rectangles. */
static void moe__gemm_grid(const moe__gemm_desc *d, int nt, int MR, int NR, int pack_a, int *tm_out, int *tn_out) {
    int tn, best_tm = 1, best_tn = 1;
    double best = -1.0;
    int64_t mu = (d->m + MR - 1) / MR, nu = (d->n + NR - 1) / NR;
    for (tn = 1; tn <= nt; tn++) {
        int tm;
        int64_t mt, ntl;
        double cost;
        if (nt % tn) continue;
        tm = nt / tn;
        mt = (mu + tm - 1) / tm * MR;
        ntl = (nu + tn - 1) / tn * NR;
        /* compute (ns at ~100 GFLOP/s) + packing (~0.5 ns/element) */
        cost = 2.0 * (double)mt * (double)ntl * (double)d->k / 100.0 +
               0.5 * (double)d->k * ((pack_a ? (double)mt : 0.0) + (double)ntl);
        if (best < 0.0 || cost < best) { best = cost; best_tm = tm; best_tn = tn; }
    }
    *tm_out = best_tm;
    *tn_out = best_tn;
}

#endif

static void moe__gemm_run(const moe__gemm_desc *d, moe__gemm_isa isa, int n_threads, void *workspace) {
    int nt = n_threads < 1 ? 1 : n_threads;
    int64_t i, j;
    double flops;
    if (d->m <= 0 || d->n <= 0) return;
    if (d->k <= 0) {
        for (i = 0; i < d->m; i++) {
            float *cr = d->c + i * d->ldc;
            for (j = 0; j < d->n; j++) cr[j] = d->beta == 0.0f ? 0.0f : d->beta * cr[j];
        }
        return;
    }
    if ((int)isa > (int)moe__gemm_best_isa()) isa = moe__gemm_best_isa();
    flops = 2.0 * (double)d->m * (double)d->n * (double)d->k;
    if (flops < 4.0e6) nt = 1; /* below ~40 µs of work threads cost more than they give */
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
            for (t = tid; t < nt; t += team)
                moe__gemm_scalar_rows(d, d->m * t / nt, d->m * (t + 1) / nt);
        }
        (void)workspace;
        return;
    }
#if defined(MOE__GEMM_HAVE_AVX2)
    {
        int kind = MOE__GEMM_KIND_F32, MR, NR, tm, tn, pack_a;
        size_t tb = moe__gemm_thread_bytes(d);
        unsigned char *ws = (unsigned char *)workspace;
        int64_t mu, nu;
#if defined(MOE__GEMM_HAVE_BF16DP)
        if (isa == MOE__GEMM_AVX512 && d->bf16_compute) kind = MOE__GEMM_KIND_BF16;
#endif
        MR = kind == MOE__GEMM_KIND_BF16 ? MOE__GEMM_BMR : MOE__GEMM_MR;
        NR = kind == MOE__GEMM_KIND_BF16 ? MOE__GEMM_BNR : MOE__GEMM_NR;
        pack_a = moe__gemm_pack_a_needed(d, kind);
        mu = (d->m + MR - 1) / MR;
        nu = (d->n + NR - 1) / NR;
        if ((int64_t)nt > mu * nu) nt = (int)(mu * nu);
        ws += (64u - (unsigned)((uintptr_t)ws & 63u)) & 63u;
        moe__gemm_grid(d, nt, MR, NR, pack_a, &tm, &tn);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
        {
            int t, team = 1, tid = 0;
#ifdef _OPENMP
            team = omp_get_num_threads();
            tid = omp_get_thread_num();
#endif
            for (t = tid; t < nt; t += team) {
                int ti = t / tn, tj = t % tn;
                int64_t m0 = mu * ti / tm * MR, m1 = mu * (ti + 1) / tm * MR;
                int64_t n0 = nu * tj / tn * NR, n1 = nu * (tj + 1) / tn * NR;
                if (m1 > d->m) m1 = d->m;
                if (n1 > d->n) n1 = d->n;
                if (m0 < m1 && n0 < n1) moe__gemm_rect(d, kind, m0, m1, n0, n1, ws + (size_t)tid * tb);
            }
        }
    }
#else
    (void)workspace;
#endif
}
