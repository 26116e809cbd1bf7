/* tests/test_ops.c — forward results of the kernels and ops against naive double-precision
   references written here (materialised attention, textbook softmax, the RoPE formulas of
   reference §2.3), the GEMM in every ISA and layout, and the autograd contract (gradient
   accumulation, one replay per tape, inference mode, no allocation in steady state).

   Tolerances: an FP32 result of a length-K dot product is within K·2^-24·Σ|a·b| of the
   exact value (each addition rounds once); we check |got − ref| ≤ 4·K·2^-24·Σ|a·b| + 1e-30.
   Element-wise ops use a relative 2e-6 (a few float ulps through exp/log/sqrt). */
/* The split thresholds these shapes were sized against (moe.h's defaults are higher, tuned
   to the cost of waking a thread): the parallel paths must run here. */
#define MOE__PAR_WORK 16384.0
#define MOE__GEMM_MT_FLOPS 3.0e6
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>

static moe_ctx *g_ctx;
static uint64_t g_stream = 1;

static moe_tensor *mk(int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    int64_t shape[4] = {d0, d1, d2, d3};
    moe_tensor *t = NULL;
    moe_rng rng = moe_rng_new(42, g_stream++);
    if (moe_tensor_new(g_ctx, MOE_F32, ndim, shape, &t) != MOE_OK) return NULL;
    moe_tensor_fill_normal(g_ctx, t, &rng, 0.0f, 1.0f);
    return t;
}
static float *F(moe_tensor *t) { return (float *)t->data; }

/* ---- GEMM ---- */

static void ref_gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                     int64_t ldb, int bf16, double *C, double *absC) {
    int64_t i, j, p;
    for (i = 0; i < m; i++)
        for (j = 0; j < n; j++) {
            double acc = 0, aacc = 0;
            for (p = 0; p < k; p++) {
                double a = ta ? A[p * lda + i] : A[i * lda + p], b = tb ? B[j * ldb + p] : B[p * ldb + j];
                if (bf16) {
                    a = moe_bf16_to_f32(moe_f32_to_bf16((float)a));
                    b = moe_bf16_to_f32(moe_f32_to_bf16((float)b));
                }
                acc += a * b;
                aacc += fabs(a * b);
            }
            C[i * n + j] = acc;
            absC[i * n + j] = aacc;
        }
}

/* in16: A and B handed over as bf16 (their values rounded to bf16 first, as the reference reads them) */
static void check_gemm(int64_t m, int64_t n, int64_t k, int ta, int tb, int bf16, int in16, int simd, int threads, float alpha,
                       float beta) {
    moe_tensor *A = mk(1, m * k + 1, 0, 0, 0), *B = mk(1, k * n + 1, 0, 0, 0), *C = mk(1, m * n, 0, 0, 0);
    double *ref = (double *)malloc(sizeof(double) * (size_t)(m * n)), *aref = (double *)malloc(sizeof(double) * (size_t)(m * n));
    float *c0 = (float *)malloc(sizeof(float) * (size_t)(m * n));
    uint16_t *a16 = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(m * k + 1)), *b16 = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(k * n + 1));
    moe_gemm_args g;
    int64_t i;
    double worst = 0;
    memcpy(c0, C->data, sizeof(float) * (size_t)(m * n));
    if (beta == 0)
        for (i = 0; i < m * n; i++) F(C)[i] = NAN; /* beta = 0 must not read C */
    memset(&g, 0, sizeof g);
    g.m = m; g.n = n; g.k = k;
    g.a = A->data; g.a_dtype = MOE_F32; g.lda = ta ? m : k; g.trans_a = ta;
    g.b = B->data; g.b_dtype = MOE_F32; g.ldb = tb ? k : n; g.trans_b = tb;
    g.c = F(C); g.ldc = n; g.alpha = alpha; g.beta = beta;
    g.compute = bf16 ? MOE_BF16 : MOE_F32;
    if (in16) {
        for (i = 0; i < m * k + 1; i++) F(A)[i] = moe_bf16_to_f32(a16[i] = moe_f32_to_bf16(F(A)[i]));
        for (i = 0; i < k * n + 1; i++) F(B)[i] = moe_bf16_to_f32(b16[i] = moe_f32_to_bf16(F(B)[i]));
        g.a = a16; g.a_dtype = MOE_BF16;
        g.b = b16; g.b_dtype = MOE_BF16;
    }
    moe_ctx_set_simd(g_ctx, simd);
    moe_ctx_set_threads(g_ctx, threads);
    memset(moe__gemm_workspace(g_ctx, 2 << 20), 0xFF, 2 << 20); /* NaN wherever a packing leaves a gap */
    T_CHECK(moe_gemm(g_ctx, &g) == MOE_OK, "moe_gemm: %s", moe_ctx_error(g_ctx));
    ref_gemm(ta, tb, m, n, k, F(A), g.lda, F(B), g.ldb, bf16, ref, aref);
    for (i = 0; i < m * n; i++) {
        double want = alpha * ref[i] + beta * c0[i];
        double bound = 4.0 * (double)(k + 2) * ldexp(1.0, -24) * (fabs(alpha) * aref[i] + fabs(beta * c0[i])) + 1e-30;
        double err = fabs(F(C)[i] - want) / bound;
        if (!(err <= worst)) worst = err; /* NaN propagates into worst */
    }
    T_CHECK(worst <= 1.0, "gemm m=%lld n=%lld k=%lld ta=%d tb=%d bf16=%d (kernel %d) in16=%d simd=%d threads=%d: error %.3g x bound",
            (long long)m, (long long)n, (long long)k, ta, tb, bf16, g_ctx->conf.bf16_kernel, in16, simd, threads, worst);
    moe_ctx_set_simd(g_ctx, 1);
    moe_tensor_free(g_ctx, A);
    moe_tensor_free(g_ctx, B);
    moe_tensor_free(g_ctx, C);
    free(ref);
    free(aref);
    free(c0);
    free(a16);
    free(b16);
}

/* The BF16 GEMM kernels this build and CPU run (MOE__BF16_FMA, then _DP, then _AMX). */
static int bf16_kernels(void) {
#if defined(MOE__GEMM_HAVE_AMX)
    if (moe__gemm_amx_usable()) return 3;
#endif
#if defined(MOE__GEMM_HAVE_BF16DP)
    return 2;
#else
    return 1;
#endif
}

static void test_gemm_layouts(void) {
    static const int64_t sizes[][3] = {{1, 1, 1}, {3, 5, 7}, {17, 33, 40}, {64, 48, 129}, {127, 16, 32}, {40, 129, 3},
                                       {256, 96, 32}, {130, 70, 260},
                                       {100, 130, 300}, {300, 100, 260},
                                       {520, 64, 300}}; /* on 2 threads, over 10^7 flops: the GEMM's own threads */
    size_t s;
    int ta, tb, bf16, in16, simd, kern, cases = 0;
    const int kern_default = g_ctx->conf.bf16_kernel, kernels = bf16_kernels();
    for (s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (ta = 0; ta < 2; ta++)
            for (tb = 0; tb < 2; tb++)
                for (bf16 = 0; bf16 < 2; bf16++)
                    for (in16 = 0; in16 <= bf16; in16++) /* bf16 inputs with bf16 compute */
                        for (simd = 0; simd < 2; simd++)
                            for (kern = 0; kern < (bf16 && simd ? kernels : 1); kern++) { /* every BF16 kernel there is */
                                g_ctx->conf.bf16_kernel = bf16 && simd ? kern : kern_default;
                                check_gemm(sizes[s][0], sizes[s][1], sizes[s][2], ta, tb, bf16, in16, simd, 1 + (int)(s % 3), 1.0f, 0.0f);
                                cases++;
                            }
    g_ctx->conf.bf16_kernel = kern_default;
    check_gemm(33, 65, 17, 0, 1, 0, 0, 1, 2, -0.5f, 1.25f);
    check_gemm(33, 65, 17, 1, 0, 1, 0, 1, 2, 2.0f, -1.0f);
    check_gemm(8, 8, 0, 0, 0, 0, 0, 1, 1, 1.0f, 0.5f); /* k = 0: C = beta·C */
    T_NOTE("%d GEMM configurations checked against a double reference (bound 4·(k+2)·2^-24·Σ|ab|)", cases + 3);
}

/* The BF16 packings bit for bit against their definition: K-pair lane = bf16(op(X)[2p]) |
   bf16(op(X)[2p + 1]) << 16 (moe_f32_to_bf16: nearest even, NaN -> 0x7FFF), 0 past kc and in
   the padding columns or rows, nothing written past the panel; every layout, from f32 and from
   bf16 storage, over values that test the rounding (ties both ways, NaN, ±Inf, the largest
   float, −0, subnormals) among random ones. Also FP32's grouped Aᵀ panels (the values
   themselves; its padding rows, which no GEMM result shows, 0), and FP32's panels of bf16
   values (rounded under bf16_compute, or widened from bf16 storage), grouped Aᵀ included. */
#if defined(MOE__GEMM_HAVE_AVX2)
#define PK_LD 300 /* the matrix is 300 × 300 either way round */
static float pk_f[PK_LD * PK_LD];
static uint16_t pk_h[PK_LD * PK_LD];
static uint32_t pk_bits(float v) { uint32_t u; memcpy(&u, &v, 4); return u; }
/* element (r, c) of op(X) as bf16: X stored [rows][PK_LD], transposed when `trans` */
static uint32_t pk_el(int trans, int64_t r, int64_t c) { return pk_h[trans ? c * PK_LD + r : r * PK_LD + c]; }
static int pk_check(const uint32_t *got, int64_t kp, int64_t width, int64_t used, int trans, int by_row, int64_t r0, int64_t p0,
                    int64_t kc) {
    int64_t pp, x;
    for (pp = 0; pp < kp; pp++)
        for (x = 0; x < width; x++) {
            uint32_t want = 0;
            if (x < used) {
                int64_t p = p0 + 2 * pp;
                want = by_row ? pk_el(trans, r0 + x, p) | (2 * pp + 1 < kc ? pk_el(trans, r0 + x, p + 1) << 16 : 0u)
                              : pk_el(trans, p, r0 + x) | (2 * pp + 1 < kc ? pk_el(trans, p + 1, r0 + x) << 16 : 0u);
            }
            if (got[pp * width + x] != want) return 0;
        }
    return 1;
}
#if defined(MOE__GEMM_HAVE_AMX)
#define AMX_PANELS ", AMX's A panels too"
/* AMX's A panel [rows][kpp]: row x's pairs of op(A) row r0 + x from k p0, 0 past `used` rows
   and kc values */
static int pk_check_rows(const uint32_t *got, int64_t kpp, int64_t rows, int64_t used, int trans, int64_t r0, int64_t p0,
                         int64_t kc) {
    int64_t q, x;
    for (x = 0; x < rows; x++)
        for (q = 0; q < kpp; q++) {
            uint32_t want = 0;
            if (x < used && 2 * q < kc)
                want = pk_el(trans, r0 + x, p0 + 2 * q) | (2 * q + 1 < kc ? pk_el(trans, r0 + x, p0 + 2 * q + 1) << 16 : 0u);
            if (got[x * kpp + q] != want) return 0;
        }
    return 1;
}
#else
#define AMX_PANELS ""
#endif
/* FP32 panels [kc][width] of bf16 values (bf16_compute rounds f32 operands; bf16 storage is
   widened): element x of k p = bf16(op(X)) as float, 0 in the padding */
static int pk_check_f32(const float *got, int64_t kc, int64_t width, int64_t used, int trans, int by_row, int64_t r0, int64_t p0) {
    int64_t p, x;
    for (p = 0; p < kc; p++)
        for (x = 0; x < width; x++) {
            uint32_t want = x < used ? pk_el(trans, by_row ? r0 + x : p0 + p, by_row ? p0 + p : r0 + x) << 16 : 0u;
            if (pk_bits(got[p * width + x]) != want) return 0;
        }
    return 1;
}
static void test_gemm_packing(void) {
    static const uint32_t special[] = {0x3F808000u, 0x3F818000u, 0x3F808001u, 0x7FC00001u, 0xFFC00000u, 0x7F800001u,
                                       0x7F800000u, 0xFF800000u, 0x7F7FFFFFu, 0x80000000u, 0x00000001u, 0x00008000u,
                                       0x00018000u, 0x807FFFFFu};
    static const int64_t kcs[] = {1, 2, 31, 32, 33, 255, 256}, widths[] = {1, 5, 6, 16, 17, 32}, groups[] = {1, 6, 7, 17, 48};
    enum { PK_DST = 8 * 256 * 6 + 64 }; /* the largest: FP32 Aᵀ, 8 panels of kc = 256 */
    static uint32_t dst_mem[PK_DST + 16];
    uint32_t *dst = dst_mem + ((64 - ((uintptr_t)dst_mem & 63)) & 63) / 4; /* 64-byte aligned, as the workspace */
    moe_rng rng = moe_rng_new(21, 0);
    moe__gemm_desc d;
    int64_t i, a, w, bad = 0, cases = 0;
    int in16, trans;
    for (i = 0; i < PK_LD * PK_LD; i++) {
        uint32_t u = special[moe_rng_next(&rng) % (sizeof special / sizeof special[0])];
        float v = moe_rng_next(&rng) % 4 == 0 ? 0.0f : (float)moe_rng_normal(&rng);
        if (moe_rng_next(&rng) % 8 == 0) memcpy(&v, &u, 4);
        pk_f[i] = v;
        pk_h[i] = moe_f32_to_bf16(v);
    }
    T_CHECK(pk_bits(moe_bf16_to_f32(moe_f32_to_bf16(1.00390625f))) == 0x3F800000u && moe_f32_to_bf16(NAN) == 0x7FFF,
            "the definition: ties to even, NaN -> 0x7FFF");
    memset(&d, 0, sizeof d);
    for (in16 = 0; in16 < 2; in16++)
        for (trans = 0; trans < 2; trans++)
            for (a = 0; a < (int64_t)(sizeof kcs / sizeof kcs[0]); a++)
                for (w = 0; w < (int64_t)(sizeof widths / sizeof widths[0]); w++) {
                    const int64_t kc = kcs[a], kp = (kc + 1) / 2, p0 = 3 + a, r0 = 7 + w;
                    d.a = d.b = in16 ? (const void *)pk_h : (const void *)pk_f;
                    d.a_bf16 = d.b_bf16 = in16;
                    d.lda = d.ldb = PK_LD;
                    d.b_trans = trans; /* op(B) [k, n]: column r0 + x */
                    memset(dst, 0xA5, PK_DST * sizeof *dst);
                    moe__gemm_pack_b_bf16(&d, p0, kc, r0, widths[w], dst);
                    bad += !pk_check(dst, kp, MOE__GEMM_BNR, widths[w], trans, 0, r0, p0, kc) || dst[kp * MOE__GEMM_BNR] != 0xA5A5A5A5u;
                    d.bf16_compute = 1; /* the FP32 kernel's panels of BF16 products (MOE_GEMM_BF16=fma, AVX2 builds) */
                    if (widths[w] <= MOE__GEMM_NR) {
                        memset(dst, 0xA5, PK_DST * sizeof *dst);
                        moe__gemm_pack_b_f32(&d, p0, kc, r0, widths[w], (float *)(void *)dst);
                        bad += !pk_check_f32((const float *)(const void *)dst, kc, MOE__GEMM_NR, widths[w], trans, 0, r0, p0) ||
                               dst[kc * MOE__GEMM_NR] != 0xA5A5A5A5u;
                        cases++;
                    }
                    if (widths[w] <= MOE__GEMM_MR) {
                        d.a_trans = trans;
                        memset(dst, 0xA5, PK_DST * sizeof *dst);
                        moe__gemm_pack_a_f32(&d, r0, widths[w], p0, kc, (float *)(void *)dst);
                        bad += !pk_check_f32((const float *)(const void *)dst, kc, MOE__GEMM_MR, widths[w], trans, 1, r0, p0) ||
                               dst[kc * MOE__GEMM_MR] != 0xA5A5A5A5u;
                        cases++;
                    }
                    d.bf16_compute = 0;
                    if (widths[w] <= MOE__GEMM_BMR) { /* op(A) [m, k]: row r0 + x */
                        d.a_trans = trans;
                        memset(dst, 0xA5, PK_DST * sizeof *dst);
                        moe__gemm_pack_a_bf16(&d, r0, widths[w], p0, kc, dst);
                        bad += !pk_check(dst, kp, MOE__GEMM_BMR, widths[w], trans, 1, r0, p0, kc) || dst[kp * MOE__GEMM_BMR] != 0xA5A5A5A5u;
                        cases++;
                    }
#if defined(MOE__GEMM_HAVE_AMX)
                    { /* AMX's A: 32 rows of K-pairs, row-major, pairs padded to 16 */
                        const int64_t kpp = (kp + 15) / 16 * 16;
                        d.a_trans = trans;
                        memset(dst, 0xA5, PK_DST * sizeof *dst);
                        moe__gemm_pack_a_amx(&d, r0, widths[w], p0, kc, dst);
                        bad += !pk_check_rows(dst, kpp, MOE__GEMM_AMR, widths[w], trans, r0, p0, kc) ||
                               dst[MOE__GEMM_AMR * kpp] != 0xA5A5A5A5u;
                        cases++;
                    }
#endif
                    if (trans && w < (int64_t)(sizeof groups / sizeof groups[0])) { /* Aᵀ's panels of 6 rows, up to 8 at once */
                        const int64_t rows = groups[w], np = (rows + MOE__GEMM_BMR - 1) / MOE__GEMM_BMR;
                        int64_t g;
                        d.a_trans = 1;
                        memset(dst, 0xA5, PK_DST * sizeof *dst);
                        moe__gemm_pack_at_bf16_group(&d, r0, rows, p0, kc, dst);
                        for (g = 0; g < np; g++) {
                            int64_t used = rows - g * MOE__GEMM_BMR < MOE__GEMM_BMR ? rows - g * MOE__GEMM_BMR : MOE__GEMM_BMR;
                            bad += !pk_check(dst + g * kp * MOE__GEMM_BMR, kp, MOE__GEMM_BMR, used, 1, 1, r0 + g * MOE__GEMM_BMR, p0, kc);
                        }
                        bad += dst[np * kp * MOE__GEMM_BMR] != 0xA5A5A5A5u;
                        cases++;
                        if (!in16) { /* and FP32's: the values as they are, padding 0 */
                            float *f = (float *)(void *)dst;
                            int64_t p, x, wrong = 0;
                            memset(dst, 0xA5, PK_DST * sizeof *dst);
                            moe__gemm_pack_at_f32_group(&d, r0, rows, p0, kc, f);
                            for (g = 0; g < np; g++)
                                for (p = 0; p < kc; p++)
                                    for (x = 0; x < MOE__GEMM_MR; x++) {
                                        float want = g * MOE__GEMM_MR + x < rows ? pk_f[(p0 + p) * PK_LD + r0 + g * MOE__GEMM_MR + x] : 0.0f;
                                        wrong += pk_bits(f[(g * kc + p) * MOE__GEMM_MR + x]) != pk_bits(want);
                                    }
                            bad += wrong || dst[np * kc * MOE__GEMM_MR] != 0xA5A5A5A5u;
                            moe__gemm_round_bf16_inplace(f, np * MOE__GEMM_MR * kc); /* as packed under bf16_compute */
                            for (g = 0; g < np; g++) {
                                int64_t used = rows - g * MOE__GEMM_MR < MOE__GEMM_MR ? rows - g * MOE__GEMM_MR : MOE__GEMM_MR;
                                bad += !pk_check_f32(f + g * kc * MOE__GEMM_MR, kc, MOE__GEMM_MR, used, 1, 1, r0 + g * MOE__GEMM_MR, p0);
                            }
                            bad += dst[np * kc * MOE__GEMM_MR] != 0xA5A5A5A5u;
                            cases += 2;
                        }
                    }
                    cases++;
                }
    T_CHECK(bad == 0, "%lld of %lld packings differ from their definition", (long long)bad, (long long)cases);
#if defined(MOE__GEMM_PAIRS16)
    T_NOTE("%lld packings bit for bit, BF16, FP32's Aᵀ groups and FP32 panels of bf16 values (AVX-512 pair packing compiled in%s)",
           (long long)cases, AMX_PANELS);
#else
    T_NOTE("%lld packings bit for bit, BF16, FP32's Aᵀ groups and FP32 panels of bf16 values (the AVX2 build's packing)", (long long)cases);
#endif
}
#else
static void test_gemm_packing(void) { T_NOTE("no SIMD GEMM in this build: nothing to pack"); }
#endif

static void test_gemm_threads_bitwise(void) {
    int64_t m = 200, n = 130, k = 300;
    moe_tensor *A = mk(1, m * k, 0, 0, 0), *B = mk(1, n * k, 0, 0, 0);
    float *c1 = (float *)calloc((size_t)(m * n), sizeof(float)), *c2 = (float *)calloc((size_t)(m * n), sizeof(float));
    moe_gemm_args g;
    int t, bf16;
    for (bf16 = 0; bf16 < 2; bf16++) {
        memset(&g, 0, sizeof g);
        g.m = m; g.n = n; g.k = k; g.a = A->data; g.lda = k; g.b = B->data; g.ldb = k; g.trans_b = 1;
        g.ldc = n; g.alpha = 1; g.compute = bf16 ? MOE_BF16 : MOE_F32;
        moe_ctx_set_threads(g_ctx, 1);
        g.c = c1;
        moe_gemm(g_ctx, &g);
        for (t = 2; t <= 4; t++) {
            moe_ctx_set_threads(g_ctx, t);
            g.c = c2;
            moe_gemm(g_ctx, &g);
            T_CHECK(memcmp(c1, c2, sizeof(float) * (size_t)(m * n)) == 0, "bf16=%d: 1 and %d threads differ", bf16, t);
        }
    }
    moe_ctx_set_threads(g_ctx, 2);
    moe_tensor_free(g_ctx, A);
    moe_tensor_free(g_ctx, B);
    free(c1);
    free(c2);
}

/* ---- row-wise ops ---- */

static double rel_err(double got, double want) { return fabs(got - want) / (fabs(want) > 1e-3 ? fabs(want) : 1e-3); }

static void test_rmsnorm_softmax_forward(void) {
    moe_tensor *x = mk(2, 37, 19, 0, 0), *w = mk(1, 19, 0, 0, 0), *y, *s;
    int64_t r, i;
    double worst = 0, worst_s = 0;
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_rmsnorm(g_ctx, x, w, 1e-6f, &y) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_softmax(g_ctx, x, &s) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (r = 0; r < 37; r++) {
        double ss = 0, m = -INFINITY, z = 0;
        for (i = 0; i < 19; i++) ss += (double)F(x)[r * 19 + i] * F(x)[r * 19 + i];
        for (i = 0; i < 19; i++) {
            double want = F(w)[i] * F(x)[r * 19 + i] / sqrt(ss / 19 + 1e-6);
            double e = rel_err(F(y)[r * 19 + i], want);
            worst = e > worst ? e : worst;
            m = F(x)[r * 19 + i] > m ? F(x)[r * 19 + i] : m;
        }
        for (i = 0; i < 19; i++) z += exp(F(x)[r * 19 + i] - m);
        for (i = 0; i < 19; i++) {
            double e = rel_err(F(s)[r * 19 + i], exp(F(x)[r * 19 + i] - m) / z);
            worst_s = e > worst_s ? e : worst_s;
        }
    }
    T_CHECK(worst < 2e-6, "rmsnorm relative error %.3g", worst);
    T_CHECK(worst_s < 2e-6, "softmax relative error %.3g", worst_s);
    T_NOTE("rmsnorm max rel err %.2e, softmax %.2e (tol 2e-6)", worst, worst_s);
    moe_tensor_free(g_ctx, x);
    moe_tensor_free(g_ctx, w);
}

/* Attention against the materialised formula, T spanning several key tiles. */
static void test_attention_forward(void) {
    const int64_t B = 2, T = 150, H = 3, Dk = 24, Dv = 16;
    const float scale = 0.2041f;
    moe_tensor *q = mk(4, B, T, H, Dk), *k = mk(4, B, T, H, Dk), *v = mk(4, B, T, H, Dv), *o;
    double *p = (double *)malloc(sizeof(double) * (size_t)T), worst = 0;
    int64_t b, h, t, j, d;
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_attention(g_ctx, q, k, v, scale, &o) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++)
            for (t = 0; t < T; t++) {
                double m = -INFINITY, z = 0;
                for (j = 0; j <= t; j++) {
                    double s = 0;
                    for (d = 0; d < Dk; d++) s += (double)F(q)[((b * T + t) * H + h) * Dk + d] * F(k)[((b * T + j) * H + h) * Dk + d];
                    p[j] = s * scale;
                    m = p[j] > m ? p[j] : m;
                }
                for (j = 0; j <= t; j++) z += (p[j] = exp(p[j] - m));
                for (d = 0; d < Dv; d++) {
                    double want = 0, e;
                    for (j = 0; j <= t; j++) want += p[j] / z * F(v)[((b * T + j) * H + h) * Dv + d];
                    e = fabs(F(o)[((b * T + t) * H + h) * Dv + d] - want);
                    worst = e > worst ? e : worst;
                }
            }
    /* |o| ≤ max|v| ≈ 4; float accumulation over ≤ 150 terms: 1e-5 absolute is generous */
    T_CHECK(worst < 1e-5, "attention max abs error %.3g", worst);
    T_NOTE("attention [2,150,3,24|16] vs materialised softmax: max abs err %.2e (tol 1e-5)", worst);
    free(p);
    moe_tensor_free(g_ctx, q);
    moe_tensor_free(g_ctx, k);
    moe_tensor_free(g_ctx, v);
}

/* The backward pass (dq, dk, dv of Σ o⊙g) against the materialised softmax gradients:
   ds_tj = p_tj·(g_t·v_j − Σ_i p_ti·g_t·v_i), dq_t = scale·Σ_j ds_tj·k_j, dk_j = scale·Σ_t ds_tj·q_t,
   dv_j = Σ_t p_tj·g_t. T = 150 leaves a partial tile, and the head dims are not multiples of 16. */
static void test_attention_backward(void) {
    const int64_t B = 2, T = 150, H = 3, Dk = 24, Dv = 16;
    const float scale = 0.2041f;
    moe_tensor *q = mk(4, B, T, H, Dk), *k = mk(4, B, T, H, Dk), *v = mk(4, B, T, H, Dv), *g = mk(4, B, T, H, Dv);
    moe_tensor *o, *og, *l, *ts[3];
    double *p = (double *)malloc(sizeof(double) * (size_t)T), *dp = (double *)malloc(sizeof(double) * (size_t)T);
    double *want[3], worst = 0;
    int64_t b, h, t, j, d, x, dims[3] = {Dk, Dk, Dv};
    ts[0] = q; ts[1] = k; ts[2] = v;
    for (x = 0; x < 3; x++) {
        want[x] = (double *)calloc((size_t)(B * T * H * dims[x]), sizeof(double));
        moe_tensor_set_requires_grad(g_ctx, ts[x], 1);
    }
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_attention(g_ctx, q, k, v, scale, &o) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_mul(g_ctx, o, g, &og) == MOE_OK && moe_sum(g_ctx, og, &l) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_backward(g_ctx, l) == MOE_OK, "%s", moe_ctx_error(g_ctx));
#define AT(tt, dd, D) (((b * T + (tt)) * H + h) * (D) + (dd))
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++)
            for (t = 0; t < T; t++) {
                double m = -INFINITY, z = 0, pdp = 0;
                for (j = 0; j <= t; j++) {
                    double s = 0, gv = 0;
                    for (d = 0; d < Dk; d++) s += (double)F(q)[AT(t, d, Dk)] * F(k)[AT(j, d, Dk)];
                    for (d = 0; d < Dv; d++) gv += (double)F(g)[AT(t, d, Dv)] * F(v)[AT(j, d, Dv)];
                    p[j] = s * scale;
                    dp[j] = gv;
                    m = p[j] > m ? p[j] : m;
                }
                for (j = 0; j <= t; j++) z += (p[j] = exp(p[j] - m));
                for (j = 0; j <= t; j++) pdp += (p[j] /= z) * dp[j];
                for (j = 0; j <= t; j++) {
                    double ds = p[j] * (dp[j] - pdp) * scale;
                    for (d = 0; d < Dk; d++) {
                        want[0][AT(t, d, Dk)] += ds * F(k)[AT(j, d, Dk)];
                        want[1][AT(j, d, Dk)] += ds * F(q)[AT(t, d, Dk)];
                    }
                    for (d = 0; d < Dv; d++) want[2][AT(j, d, Dv)] += p[j] * F(g)[AT(t, d, Dv)];
                }
            }
#undef AT
    for (x = 0; x < 3; x++) {
        for (j = 0; j < ts[x]->numel; j++) {
            double e = fabs(F(ts[x]->grad)[j] - want[x][j]);
            worst = e > worst ? e : worst;
        }
        free(want[x]);
        moe_tensor_free(g_ctx, ts[x]);
    }
    /* gradients are O(1)-O(10); float sums over ≤ 150 keys or queries: 1e-4 absolute is generous */
    T_CHECK(worst < 1e-4, "attention backward max abs error %.3g", worst);
    T_NOTE("attention backward [2,150,3,24|16] vs materialised softmax: max abs err %.2e (tol 1e-4)", worst);
    free(p);
    free(dp);
    moe_tensor_free(g_ctx, g);
}

/* a·c − b·s rounded as float arithmetic rounds it: each float product is exact in double, and
   rounding a double sum of two floats to float is correct rounding (53 ≥ 2·24 + 2), so this
   reference cannot be changed by how the compiler schedules or fuses it. */
static float rot_ref(float a, float c, float b, float s) {
    float ac = (float)((double)a * c), bs = (float)((double)b * s);
    return (float)((double)ac - bs);
}

/* Reference §2.3: rotating adjacent pairs equals de-interleaving the vector, applying the
   half-split rotation, and interleaving back; both round like the scalar rotation, so they
   agree bit for bit. So does the backward (the rotation by −angle of dL/dy = g, from
   L = Σ y·g). D = 10, 12, 14 and 6 leave a tail of 1, 2 or 3 pairs past the 4-pair SIMD
   blocks. */
static void check_rope_layouts(int64_t D) {
    const int64_t T = 9, H = 2;
    moe_rope_table tab;
    moe_tensor *x = mk(3, T, H, D, 0), *g = mk(3, T, H, D, 0), *xp = NULL, *ypairs, *yhalves, *yg, *l;
    int64_t t, h, j, mismatches = 0, grad_mismatches = 0;
    double worst_angle = 0;
    T_ASSERT(moe_rope_table_init(g_ctx, &tab, D, 32, 10000.0, NULL) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_tensor_temp(g_ctx, MOE_F32, 3, x->shape, &xp) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (t = 0; t < T * H; t++)
        for (j = 0; j < D / 2; j++) { /* de-interleave: [x0,x2,x4,x6, x1,x3,x5,x7] */
            F(xp)[t * D + j] = F(x)[t * D + 2 * j];
            F(xp)[t * D + D / 2 + j] = F(x)[t * D + 2 * j + 1];
        }
    moe_tensor_set_requires_grad(g_ctx, x, 1);
    T_ASSERT(moe_rope(g_ctx, x, &tab, 5, MOE_ROPE_PAIRS, &ypairs) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_rope(g_ctx, xp, &tab, 5, MOE_ROPE_HALVES, &yhalves) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_mul(g_ctx, ypairs, g, &yg) == MOE_OK && moe_sum(g_ctx, yg, &l) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_backward(g_ctx, l) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (t = 0; t < T; t++)
        for (h = 0; h < H; h++)
            for (j = 0; j < D / 2; j++) {
                int64_t r = (t * H + h) * D;
                float a = F(x)[r + 2 * j], b = F(x)[r + 2 * j + 1];
                float c = tab.cos_sin[((t + 5) * (D / 2) + j) * 2], s = tab.cos_sin[((t + 5) * (D / 2) + j) * 2 + 1];
                float want0 = rot_ref(a, c, b, s), want1 = rot_ref(a, s, b, -c); /* a·s + b·c */
                double ang = (double)(t + 5) * pow(10000.0, -2.0 * (double)j / (double)D);
                double w0 = a * cos(ang) - b * sin(ang), w1 = a * sin(ang) + b * cos(ang);
                double e = fabs(F(ypairs)[r + 2 * j] - w0) + fabs(F(ypairs)[r + 2 * j + 1] - w1);
                worst_angle = e > worst_angle ? e : worst_angle;
                mismatches += F(ypairs)[r + 2 * j] != want0 || F(ypairs)[r + 2 * j + 1] != want1;
                mismatches += F(yhalves)[r + j] != want0 || F(yhalves)[r + D / 2 + j] != want1;
                {
                    float ga = F(g)[r + 2 * j], gb = F(g)[r + 2 * j + 1];
                    float back0 = rot_ref(ga, c, gb, -s), back1 = rot_ref(ga, -s, gb, -c); /* ga·c + gb·s, −ga·s + gb·c */
                    grad_mismatches += F(x->grad)[r + 2 * j] != back0 || F(x->grad)[r + 2 * j + 1] != back1;
                }
            }
    T_CHECK(worst_angle < 1e-5, "D %d: pairs layout vs formula: %.3g", (int)D, worst_angle);
    T_CHECK(mismatches == 0, "D %d: %d rotations differ from the float-rounded reference", (int)D, (int)mismatches);
    T_CHECK(grad_mismatches == 0, "D %d: %d backward rotations differ from the float-rounded reference", (int)D,
            (int)grad_mismatches);
    T_NOTE("rope D %d vs cos/sin formula: max err %.2e (tol 1e-5); pairs, halves and the backward bit-identical to "
           "float rounding: %d, %d mismatches", (int)D, worst_angle, (int)mismatches, (int)grad_mismatches);
    moe_rope_table_free(&tab);
    moe_tensor_free(g_ctx, x);
    moe_tensor_free(g_ctx, g);
}
static void test_rope_layouts(void) {
    check_rope_layouts(8);
    check_rope_layouts(10);
    check_rope_layouts(12);
    check_rope_layouts(14);
    check_rope_layouts(6);
}

/* YaRN (reference §2.3, V3 numbers): d_R = 64, θ = 1e4, s = 40, L0 = 4096, β = 32/1 gives
   low = 10, high = 23: pairs j ≤ 10 keep f_j, pairs j ≥ 23 get f_j/40, linear between. */
static void test_yarn_frequencies(void) {
    moe_yarn y = {40.0, 4096, 32.0, 1.0, 1.0, 1.0};
    moe_rope_table tab;
    int64_t j;
    double worst = 0;
    T_ASSERT(moe_rope_table_init(g_ctx, &tab, 64, 2, 10000.0, &y) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (j = 0; j < 32; j++) {
        double f = pow(10000.0, -2.0 * (double)j / 64.0), ramp = ((double)j - 10.0) / 13.0, want, got;
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        want = f * (1 - ramp) + f / 40.0 * ramp;
        got = atan2(tab.cos_sin[(64 / 2 + j) * 2 + 1], tab.cos_sin[(64 / 2 + j) * 2]); /* position 1: angle = f' */
        worst = fabs(got - want) / want > worst ? fabs(got - want) / want : worst;
    }
    T_CHECK(worst < 1e-6, "YaRN frequency relative error %.3g", worst);
    T_NOTE("YaRN f'_j vs the reference ramp (low 10, high 23): max rel err %.2e", worst);
    moe_rope_table_free(&tab);
}

/* YaRN's cos/sin magnitude, as transformers computes it (modeling_rope_utils, DeepseekV3):
   m(s, x) = 0.1·x·ln(s) + 1; both mscale fields non-zero: m(s, mscale)/m(s, mscale_all_dim),
   otherwise m(s, 1). Written out here from those rules, checked on every table entry. */
static void test_yarn_attention_factor(void) {
    static const double cases[][3] = {{1.0, 1.0, 1.0}, {0.707, 0.707, 1.0}, {1.0, 0.0, 0.0}, {0.0, 1.0, 0.0}, {0.0, 0.0, 0.0},
                                      {1.0, 0.5, 0.0}, {0.8, 0.3, 0.0}};
    size_t c;
    double ln40 = log(40.0);
    for (c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        moe_yarn y = {40.0, 4096, 32.0, 1.0, 0.0, 0.0};
        moe_rope_table tab;
        double want, worst = 0;
        int64_t i;
        y.mscale = cases[c][0];
        y.mscale_all_dim = cases[c][1];
        if (y.mscale != 0 && y.mscale_all_dim != 0) want = (0.1 * y.mscale * ln40 + 1) / (0.1 * y.mscale_all_dim * ln40 + 1);
        else want = 0.1 * ln40 + 1;
        T_ASSERT(moe_rope_table_init(g_ctx, &tab, 8, 50, 10000.0, &y) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        for (i = 0; i < 50 * 4; i++) {
            double r = hypot(tab.cos_sin[2 * i], tab.cos_sin[2 * i + 1]);
            worst = fabs(r - want) / want > worst ? fabs(r - want) / want : worst;
        }
        T_CHECK(worst < 1e-6, "mscale %g, mscale_all_dim %g: |(cos, sin)| off %.3g relative to %.6f", y.mscale, y.mscale_all_dim,
                worst, want);
        moe_rope_table_free(&tab);
    }
    {   /* factor 1: no correction at all */
        moe_yarn y = {1.0, 4096, 32.0, 1.0, 1.0, 0.0};
        moe_rope_table tab;
        T_ASSERT(moe_rope_table_init(g_ctx, &tab, 8, 4, 10000.0, &y) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_CHECK(fabs(hypot(tab.cos_sin[10], tab.cos_sin[11]) - 1.0) < 1e-6, "factor 1 scales cos/sin");
        moe_rope_table_free(&tab);
    }
    T_NOTE("s = 40: m(s,1) = %.6f, m(s,1)/m(s,0.5) = %.6f", 0.1 * ln40 + 1, (0.1 * ln40 + 1) / (0.05 * ln40 + 1));
}

static void test_cross_entropy_forward(void) {
    moe_tensor *x = mk(2, 5, 13, 0, 0), *t = NULL, *loss;
    int32_t tg[5] = {3, -1, 12, 0, 3};
    int64_t one = 5, r, i;
    double want = 0;
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_tensor_temp(g_ctx, MOE_I32, 1, &one, &t) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    memcpy(t->data, tg, sizeof tg);
    T_ASSERT(moe_cross_entropy(g_ctx, x, t, -1, &loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (r = 0; r < 5; r++) {
        double z = 0;
        if (tg[r] < 0) continue;
        for (i = 0; i < 13; i++) z += exp(F(x)[r * 13 + i]);
        want += log(z) - F(x)[r * 13 + tg[r]];
    }
    want /= 4;
    T_CHECK(rel_err(F(loss)[0], want) < 2e-6, "cross-entropy %.9g vs %.9g", F(loss)[0], want);
    moe_tensor_free(g_ctx, x);
}

static void test_topk_ties(void) {
    int64_t shape[2] = {1, 6};
    moe_tensor *x = NULL, *v, *idx;
    float vals[6] = {1, 3, 3, NAN, 2, 3};
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe_tensor_temp(g_ctx, MOE_F32, 2, shape, &x) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    memcpy(x->data, vals, sizeof vals);
    T_ASSERT(moe_topk(g_ctx, x, 4, &v, &idx) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(((int32_t *)idx->data)[0] == 1 && ((int32_t *)idx->data)[1] == 2 && ((int32_t *)idx->data)[2] == 5 &&
                ((int32_t *)idx->data)[3] == 4,
            "ties must go to the lower index and NaN last: got %d %d %d %d", ((int32_t *)idx->data)[0],
            ((int32_t *)idx->data)[1], ((int32_t *)idx->data)[2], ((int32_t *)idx->data)[3]);
}


/* moe_expf against the double-precision exp: within 2 ulp over its whole finite range, exact
   0 / inf / NaN outside it. */
static void test_expf_accuracy(void) {
    double worst = 0;
    float x;
    long n = 0;
    for (x = -87.3f; x <= 88.7f; x += 0.000731f, n++) {
        double want = exp((double)x), got = moe_expf(x), ulp = ldexp(1.0, ilogb(want) - 23);
        double e = fabs(got - want) / ulp;
        worst = e > worst ? e : worst;
    }
    T_CHECK(worst <= 2.0, "max error %.2f ulp", worst);
    T_CHECK(moe_expf(-100.0f) == 0.0f && isinf(moe_expf(100.0f)) && isnan(moe_expf(NAN)) && moe_expf(-INFINITY) == 0.0f,
            "out-of-range values");
    T_NOTE("moe_expf over %ld points of [-87.3, 88.7]: max error %.2f ulp (tol 2)", n, worst);
}

/* ---- autograd contract ---- */

static void test_grad_accumulates(void) {
    moe_tensor *w = mk(2, 4, 3, 0, 0), *x = mk(2, 5, 3, 0, 0), *y, *l;
    double g1;
    moe_tensor_set_requires_grad(g_ctx, w, 1);
    moe_ctx_reset(g_ctx);
    moe_matmul(g_ctx, x, w, &y);
    moe_sum(g_ctx, y, &l);
    T_ASSERT(moe_backward(g_ctx, l) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    g1 = moe_tensor_get(w->grad, 5);
    T_CHECK(moe_backward(g_ctx, l) == MOE_ERR_STATE, "a tape replays once");
    moe_ctx_reset(g_ctx);
    moe_matmul(g_ctx, x, w, &y);
    moe_sum(g_ctx, y, &l);
    moe_backward(g_ctx, l);
    T_CHECK(moe_tensor_get(w->grad, 5) == 2 * g1, "second backward accumulates: %g vs 2x%g", moe_tensor_get(w->grad, 5), g1);
    moe_tensor_zero_grad(w);
    T_CHECK(moe_tensor_get(w->grad, 5) == 0, "zero_grad");
    /* inference mode records nothing */
    moe_ctx_reset(g_ctx);
    moe_ctx_set_grad_enabled(g_ctx, 0);
    moe_matmul(g_ctx, x, w, &y);
    moe_sum(g_ctx, y, &l);
    T_CHECK(moe_backward(g_ctx, l) == MOE_ERR_STATE, "no tape in inference mode");
    moe_ctx_set_grad_enabled(g_ctx, 1);
    moe_tensor_free(g_ctx, w);
    moe_tensor_free(g_ctx, x);
}

/* After the first step, equal steps neither allocate nor grow the arena. */
static void test_steady_state_no_alloc(void) {
    moe_tensor *w = mk(2, 64, 48, 0, 0), *x = mk(3, 4, 33, 48, 0), *nw = mk(1, 64, 0, 0, 0);
    moe_rope_table tab;
    uint64_t allocs = 0;
    int step;
    moe_tensor_set_requires_grad(g_ctx, w, 1);
    moe_tensor_set_requires_grad(g_ctx, nw, 1);
    moe_rope_table_init(g_ctx, &tab, 16, 64, 10000.0, NULL);
    for (step = 0; step < 4; step++) {
        moe_tensor *y = NULL, *n = NULL, *q = NULL, *r = NULL, *o = NULL, *l = NULL;
        int64_t shape[4] = {4, 33, 4, 16};
        moe_ctx_reset(g_ctx);
        if (step == 2) allocs = moe_ctx_heap_allocs(g_ctx);
        moe_matmul(g_ctx, x, w, &y);
        moe_rmsnorm(g_ctx, y, nw, 1e-6f, &n);
        moe_tensor_view(g_ctx, n, 4, shape, 0, &q);
        moe_rope(g_ctx, q, &tab, 0, MOE_ROPE_PAIRS, &r);
        moe_attention(g_ctx, r, r, q, 0.25f, &o);
        moe_sum(g_ctx, o, &l);
        T_ASSERT(moe_backward(g_ctx, l) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    }
    T_CHECK(moe_ctx_heap_allocs(g_ctx) == allocs, "steps 3-4 made %llu heap allocations",
            (unsigned long long)(moe_ctx_heap_allocs(g_ctx) - allocs));
    T_NOTE("arena peak %zu bytes; heap allocations in steps 3-4: %llu", moe_ctx_arena_peak(g_ctx),
           (unsigned long long)(moe_ctx_heap_allocs(g_ctx) - allocs));
    moe_rope_table_free(&tab);
    moe_tensor_free(g_ctx, w);
    moe_tensor_free(g_ctx, x);
    moe_tensor_free(g_ctx, nw);
}

/* The RNG is counter-based: draw i of a stream is the same however it is reached. */
static void test_rng_counter_based(void) {
    moe_rng a = moe_rng_new(7, 3), b = moe_rng_new(7, 3), c = moe_rng_new(7, 4);
    uint64_t first[16];
    int i, same = 0;
    double mean = 0, var = 0;
    for (i = 0; i < 16; i++) first[i] = moe_rng_next(&a);
    b.counter = 9;
    T_CHECK(moe_rng_next(&b) == first[9], "draw 9 reached directly must match");
    for (i = 0; i < 16; i++) same += moe_rng_next(&c) == first[i];
    T_CHECK(same == 0, "another stream must differ");
    for (i = 0; i < 20000; i++) {
        double v = moe_rng_normal(&a);
        mean += v;
        var += v * v;
    }
    mean /= 20000;
    var = var / 20000 - mean * mean;
    /* standard errors: mean 1/sqrt(20000) = 0.007, variance sqrt(2/20000) = 0.01; 5 sigma */
    T_CHECK(fabs(mean) < 0.035 && fabs(var - 1) < 0.05, "normal draws: mean %.4f var %.4f", mean, var);
    T_NOTE("20000 normal draws: mean %.4f, variance %.4f", mean, var);
}

int main(int argc, char **argv) {
    t_filter = argc > 1 ? argv[1] : NULL;
    if (moe_ctx_new(&g_ctx) != MOE_OK) return 1;
    moe_ctx_set_threads(g_ctx, 2);
    T_RUN_FILTERED(test_gemm_layouts);
    T_RUN_FILTERED(test_gemm_threads_bitwise);
    T_RUN_FILTERED(test_gemm_packing);
    T_RUN_FILTERED(test_rmsnorm_softmax_forward);
    T_RUN_FILTERED(test_attention_forward);
    T_RUN_FILTERED(test_attention_backward);
    T_RUN_FILTERED(test_rope_layouts);
    T_RUN_FILTERED(test_yarn_frequencies);
    T_RUN_FILTERED(test_yarn_attention_factor);
    T_RUN_FILTERED(test_expf_accuracy);
    T_RUN_FILTERED(test_cross_entropy_forward);
    T_RUN_FILTERED(test_topk_ties);
    T_RUN_FILTERED(test_grad_accumulates);
    T_RUN_FILTERED(test_steady_state_no_alloc);
    T_RUN_FILTERED(test_rng_counter_based);
    moe_ctx_free(g_ctx);
    return t_summary();
}
