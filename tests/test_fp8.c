/* tests/test_fp8.c — the FP8 training recipe (reference §5): fine-grained E4M3 quantisation,
   the FP8 GEMMs of a linear layer against double-precision references, FP8 gradients against
   FP32 ones, the saved-activation round trip, the limited-precision accumulator, and a short
   FP8 training run.

   Bounds used below. E4M3 keeps 3 fraction bits: a value in the normal range is rounded with
   relative error ≤ 2^-4; below 2^-6 (subnormals, step 2^-9) the absolute error is ≤ 2^-10.
   After scaling by s these become |x − x̂| ≤ max(2^-4·|x|, 2^-10·s), with a few FP32 ulps on top
   for x/s and q·s. */
/* The split thresholds these shapes were sized against (moe.h's defaults are higher, tuned
   to the cost of waking a thread): the parallel paths must run here. */
#define MOE__PAR_WORK 16384.0
#define MOE__GEMM_MT_FLOPS 3.0e6
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static moe_ctx *g_ctx;

/* The one FP8 quantiser, through the CPU backend's entry (split over the context's threads). */
static void quantize(const moe_real *x, int64_t rows, int64_t cols, int64_t gr, int64_t gc, int pow2, uint8_t *q, float *sc,
                     moe_real *out) {
    moe_status st = moe__cpu_backend()->fp8_quantize(g_ctx, x, rows, cols, gr, gc, pow2, q, sc, out);
    if (st != MOE_OK) fprintf(stderr, "fp8_quantize: %s\n", moe_ctx_error(g_ctx));
}

static void fill_normal(float *x, int64_t n, uint64_t stream, float std) {
    moe_rng r = moe_rng_new(17, stream);
    int64_t i;
    for (i = 0; i < n; i++) x[i] = std * moe_rng_normal(&r);
}

/* |x − x̂| ≤ max(2^-4|x|, 2^-10 s) + 4 FP32 ulps of |x| + s·2^-20 */
static double e4m3_bound(double x, double s) {
    double rel = fabs(x) * 0.0625, sub = s * (1.0 / 1024);
    return (rel > sub ? rel : sub) + fabs(x) * 4.8e-7 + s * 1e-6;
}

/* ---- quantisation ---- */

/* The quantiser's branch-free encoder equals moe_f32_to_e4m3 on every float in [−464, 464]
   visited by a stride-7 sweep of the bit patterns (plus all ties of the last 2^12 below
   each power of two and the exact midpoints between E4M3 codes). */
static void test_fast_encoder_matches(void) {
    uint32_t u;
    int64_t checked = 0, bad = 0;
    int c;
    for (u = 0; u <= 0x43E80000u; u += 7) {
        float v = moe__bits_f32(u);
        checked += 2;
        bad += moe__e4m3_in_range(v) != moe_f32_to_e4m3(v);
        bad += moe__e4m3_in_range(-v) != moe_f32_to_e4m3(-v);
    }
    for (c = 0; c < 0x7E; c++) { /* midpoints and their neighbours */
        float lo = moe_e4m3_to_f32((uint8_t)c), hi = moe_e4m3_to_f32((uint8_t)(c + 1)), mid = 0.5f * (lo + hi);
        float probe[3];
        int i;
        probe[0] = mid;
        probe[1] = nextafterf(mid, 0.0f);
        probe[2] = nextafterf(mid, 1e9f);
        for (i = 0; i < 3; i++) {
            checked += 2;
            bad += moe__e4m3_in_range(probe[i]) != moe_f32_to_e4m3(probe[i]);
            bad += moe__e4m3_in_range(-probe[i]) != moe_f32_to_e4m3(-probe[i]);
        }
    }
    T_NOTE("%lld values compared", (long long)checked);
    T_CHECK(bad == 0, "%lld values encode differently", (long long)bad);
}

/* The quantiser's element loop (moe__fp8_encode: 8 lanes at a time where the CPU has SIMD)
   encodes and decodes as moe_f32_to_e4m3 / moe_e4m3_to_f32 do, on a stride-112 sweep of the
   bit patterns in [−464, 464] and on every midpoint between codes and its neighbours. */
static void test_encode_loop_matches(void) {
    enum { N = 4096 };
    static moe_real buf[N], out[N];
    static uint8_t codes[N];
    float lut[256];
    int64_t n = 0, checked = 0, bad = 0, i;
    uint32_t u;
    int c, pass;
    moe__e4m3_table(lut);
    for (pass = 0; pass < 2; pass++) {
        uint32_t end = pass == 0 ? 0x43E80000u : 3u * 0x7Eu - 1u;
        for (u = 0; u <= end; u += pass == 0 ? 112u : 1u) {
            float v;
            if (pass == 0) v = moe__bits_f32(u);
            else {
                float lo, hi, mid;
                c = (int)(u / 3);
                lo = moe_e4m3_to_f32((uint8_t)c), hi = moe_e4m3_to_f32((uint8_t)(c + 1)), mid = 0.5f * (lo + hi);
                v = u % 3 == 0 ? mid : u % 3 == 1 ? nextafterf(mid, 0.0f) : nextafterf(mid, 1e9f);
            }
            buf[n++] = (moe_real)((u & 1) ? -v : v);
            if (n == N || u == end) {
                moe__fp8_encode(buf, n, 1.0f, NULL, lut, codes, out);
                for (i = 0; i < n; i++) {
                    uint8_t ref = moe_f32_to_e4m3((float)buf[i]);
                    bad += codes[i] != ref || moe__f32_bits((float)out[i]) != moe__f32_bits(moe_e4m3_to_f32(ref));
                }
                checked += n;
                n = 0;
            }
        }
    }
    T_NOTE("%lld values compared", (long long)checked);
    T_CHECK(bad == 0, "%lld values encode or decode differently", (long long)bad);
}

/* The training quantiser (moe__fp8_quantize_groups: SIMD where the CPU has it) against a plain
   loop over the reference encoder, bit for bit: codes, scales and dequantised values, for
   every grouping (1×B, B×1, B×B, one per tensor), amax and power-of-two scales, on values
   spread over 2^-40..2^12 (subnormal codes, flushed values, ties) with NaN and ±inf lanes
   and ragged edges (cols not a multiple of 8 or of B). */
static void test_quantiser_matches_reference(void) {
    enum { R = 70, C = 203, BLK = 32 };
    static moe_real x[R * C], out[R * C];
    static uint8_t q[R * C];
    static float sc[R * C], amax[R * C];
    static const int64_t shapes[4][2] = {{1, BLK}, {BLK, 1}, {BLK, BLK}, {R, C}};
    moe_rng r = moe_rng_new(5, 5);
    int64_t i, bad_codes = 0, bad_values = 0, bad_scales = 0, checked = 0;
    int sh, pow2;
    for (i = 0; i < R * C; i++) {
        float m = moe_rng_normal(&r);
        x[i] = (moe_real)(m * ldexpf(1.0f, (int)(moe_rng_uniform(&r) * 52.0f) - 40));
    }
    x[5] = (moe_real)NAN;
    x[C + 17] = (moe_real)INFINITY;
    x[3 * C + 100] = (moe_real)-INFINITY;
    x[7 * C + 9] = (moe_real)NAN;
    for (sh = 0; sh < 4; sh++)
        for (pow2 = 0; pow2 < 2; pow2++) {
            int64_t gr = shapes[sh][0], gc = shapes[sh][1], ngc = (C + gc - 1) / gc;
            quantize(x, R, C, gr, gc, pow2, q, sc, out);
            for (i = 0; i < R * C; i++) amax[i] = 0.0f;
            for (i = 0; i < R * C; i++) { /* each group's max-abs, NaN never winning */
                int64_t g = (i / C / gr) * ngc + (i % C) / gc;
                if (fabsf((float)x[i]) > amax[g]) amax[g] = fabsf((float)x[i]);
            }
            for (i = 0; i < R * C; i++) {
                int64_t g = (i / C / gr) * ngc + (i % C) / gc;
                float s = moe_fp8_scale(amax[g]), val;
                uint8_t ref;
                if (pow2) s = moe__pow2_at_or_above(s);
                ref = moe_f32_to_e4m3((float)x[i] / s);
                val = moe_e4m3_to_f32(ref) * s;
                bad_scales += moe__f32_bits(sc[g]) != moe__f32_bits(s);
                bad_codes += q[i] != ref;
                bad_values += moe__f32_bits((float)out[i]) != moe__f32_bits(val) && !(val != val && out[i] != out[i]);
                checked++;
            }
        }
    T_NOTE("%lld elements compared over 8 groupings", (long long)checked);
    T_CHECK(bad_scales == 0 && bad_codes == 0 && bad_values == 0, "%lld scales, %lld codes, %lld values differ",
            (long long)bad_scales, (long long)bad_codes, (long long)bad_values);
}

/* 1×B tiles, one tile with a single outlier 1000× the rest: every element of every tile is
   within the E4M3 bound of its own tile's scale; only the outlier's tile loses precision. */
static void test_tiles_error_bound_and_outlier(void) {
    enum { R = 8, C = 512, BLK = 128, NB = C / BLK };
    static float x[R * C], y[R * C], sc[R * NB];
    static uint8_t q[R * C];
    double worst_ratio = 0, rel_other = 0, rel_outlier_tile = 0;
    int64_t i;
    fill_normal(x, R * C, 1, 1.0f);
    x[3 * C + 2 * BLK + 5] = 1.0e5f; /* row 3, tile 2: scale 223, the N(0,1) values fall to the subnormals */
    T_ASSERT(moe_fp8_quantize_tiles(g_ctx, x, R, C, BLK, q, sc) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_fp8_dequantize_tiles(g_ctx, q, sc, R, C, BLK, y) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (i = 0; i < R * C; i++) {
        int64_t tile = (i / C) * NB + (i % C) / BLK;
        double err = fabs((double)x[i] - y[i]), b = e4m3_bound(x[i], sc[tile]);
        double rel = fabs(x[i]) > 0.5 ? err / fabs(x[i]) : 0;
        if (err / b > worst_ratio) worst_ratio = err / b;
        if (tile == 3 * NB + 2) { if (i != 3 * C + 2 * BLK + 5 && rel > rel_outlier_tile) rel_outlier_tile = rel; }
        else if (rel > rel_other) rel_other = rel;
    }
    T_NOTE("max err/bound %.3f; max rel err of |x|>0.5: other tiles %.4f, the outlier's tile %.4f", worst_ratio, rel_other,
           rel_outlier_tile);
    T_CHECK(worst_ratio <= 1.0, "an element exceeds the E4M3 bound of its tile");
    T_CHECK(rel_other <= 0.0625 + 1e-6, "tiles without the outlier keep 2^-4 relative precision");
    T_CHECK(rel_outlier_tile > 0.25, "the outlier's tile has lost its small values' precision");
}

/* B×B blocks and the grouping used for the backward's B×1 tiles follow the same bound. */
static void test_blocks_and_column_tiles_bound(void) {
    enum { R = 200, C = 96, BLK = 32 };
    static float x[R * C], y[R * C], sc[((R + BLK - 1) / BLK) * (C / BLK)];
    static moe_real xr[R * C], yr[R * C];
    static float scc[((R + BLK - 1) / BLK) * C];
    static uint8_t q[R * C];
    double worst = 0, worst_col = 0;
    int64_t i;
    fill_normal(x, R * C, 2, 0.02f);
    for (i = 0; i < R; i++) x[i * C + 7] *= 300.0f; /* an outlier channel */
    T_ASSERT(moe_fp8_quantize_blocks(g_ctx, x, R, C, BLK, q, sc) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_fp8_dequantize_blocks(g_ctx, q, sc, R, C, BLK, y) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (i = 0; i < R * C; i++) {
        double r = fabs((double)x[i] - y[i]) / e4m3_bound(x[i], sc[(i / C / BLK) * (C / BLK) + (i % C) / BLK]);
        if (r > worst) worst = r;
    }
    for (i = 0; i < R * C; i++) xr[i] = x[i];
    quantize(xr, R, C, BLK, 1, 0, q, scc, yr); /* B×1: 32 rows of one column share a scale */
    for (i = 0; i < R * C; i++) {
        double r = fabs((double)xr[i] - yr[i]) / e4m3_bound(xr[i], scc[(i / C / BLK) * C + i % C]);
        if (r > worst_col) worst_col = r;
    }
    T_NOTE("max err/bound: B×B blocks %.3f, B×1 tiles %.3f (200 rows: a partial last group)", worst, worst_col);
    T_CHECK(worst <= 1.0 && worst_col <= 1.0, "an element exceeds its group's E4M3 bound");
}

/* Wgrad re-quantises a saved 1×128-tiled input into 128×1 tiles. With power-of-two scales
   (the default) a value already on the first grid moves to the second by an exponent shift,
   so only values that fall below E4M3's subnormal step change; with amax/448 scales the
   second rounding changes most values. */
static void test_requantisation_exact_with_pow2_scales(void) {
    enum { R = 256, C = 256, BLK = 128 };
    static moe_real x[R * C], a[R * C], b[R * C];
    static float s1[R * 2], s2[2 * C];
    static float f[R * C];
    int64_t i, changed[2] = {0, 0}, underflow = 0;
    int pow2;
    fill_normal(f, R * C, 9, 1.0f);
    for (i = 0; i < R * C; i++) x[i] = f[i] * (1.0f + 30.0f * (float)((i / C) % 7 == 0)); /* louder tokens */
    for (pow2 = 1; pow2 >= 0; pow2--) {
        quantize(x, R, C, 1, BLK, pow2, NULL, s1, a);
        quantize(a, R, C, BLK, 1, pow2, NULL, s2, b);
        for (i = 0; i < R * C; i++) {
            changed[pow2] += a[i] != b[i];
            if (pow2 && a[i] != b[i]) underflow += fabs(a[i]) < s2[(i / C / BLK) * C + i % C] * (1.0 / 64);
        }
    }
    T_NOTE("values changed by the second quantisation: power-of-two scales %lld (all below the subnormal threshold: %lld), amax/448 scales %lld of %d",
           (long long)changed[1], (long long)underflow, (long long)changed[0], R * C);
    T_CHECK(changed[1] == underflow, "with power-of-two scales only underflowing values may change");
    T_CHECK(changed[0] > R * C / 4, "with amax/448 scales the second rounding changes many values");
}

/* ---- the FP8 GEMMs ---- */

/* Fprop Y = X·Wᵀ in FP8: (a) equals a double GEMM of the dequantised operands to FP32
   accumulation error, γ_k·Σ|x̂||ŵ| with γ_k = k·2^-24; (b) is within the analytic bound of the
   exact product of the unquantised operands: Σ_p |x|e_w + e_x|w| + e_x e_w (e_· the
   per-element E4M3 bounds) plus (a)'s bound. Both scale kinds: amax/448 (operands from the
   public quantise/dequantise API; the FP32 kernel) and powers of two (the default; operands
   from moe__fp8_quantize_groups, checked bit for bit against the reference encoder above; the BF16
   kernel). */
static void fprop_against_double(int amax_scales, double *worst_a, double *worst_b) {
    enum { N = 37, IN = 256, OUT = 160, BLK = 128 };
    static float x[N * IN], w[OUT * IN], xd[N * IN], wd[OUT * IN], sx[N * (IN / BLK)], sw[2 * (IN / BLK)];
    static uint8_t qx[N * IN], qw[OUT * IN];
    static moe_real X[N * IN], W[OUT * IN], Y[N * OUT], Xd[N * IN], Wd[OUT * IN];
    moe_fp8_options o;
    int64_t i, j, p;
    fill_normal(x, N * IN, 3, 1.0f);
    fill_normal(w, OUT * IN, 4, 0.05f);
    for (i = 0; i < N; i++) x[i * IN + 3] *= 50.0f; /* token-wise outliers */
    for (i = 0; i < N * IN; i++) X[i] = x[i];
    for (i = 0; i < OUT * IN; i++) W[i] = w[i];
    memset(&o, 0, sizeof o);
    o.amax_scales = amax_scales;
    moe_ctx_set_fp8(g_ctx, &o);
    moe_ctx_reset(g_ctx);
    T_ASSERT(moe__linear(g_ctx, X, N, IN, W, OUT, Y, MOE_FP8_E4M3) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    if (amax_scales) {
        T_ASSERT(moe_fp8_quantize_tiles(g_ctx, x, N, IN, BLK, qx, sx) == MOE_OK && moe_fp8_quantize_blocks(g_ctx, w, OUT, IN, BLK, qw, sw) == MOE_OK,
                 "%s", moe_ctx_error(g_ctx));
        moe_fp8_dequantize_tiles(g_ctx, qx, sx, N, IN, BLK, xd);
        moe_fp8_dequantize_blocks(g_ctx, qw, sw, OUT, IN, BLK, wd);
    } else {
        quantize(X, N, IN, 1, BLK, 1, NULL, sx, Xd);
        quantize(W, OUT, IN, BLK, BLK, 1, NULL, sw, Wd);
        for (i = 0; i < N * IN; i++) xd[i] = (float)Xd[i];
        for (i = 0; i < OUT * IN; i++) wd[i] = (float)Wd[i];
    }
    o.amax_scales = 0;
    moe_ctx_set_fp8(g_ctx, &o);
    *worst_a = *worst_b = 0;
    for (i = 0; i < N; i++)
        for (j = 0; j < OUT; j++) {
            double deq = 0, deq_abs = 0, exact = 0, bound_q = 0;
            for (p = 0; p < IN; p++) {
                double a = x[i * IN + p], b = w[j * IN + p], ea = e4m3_bound(a, sx[i * 2 + p / BLK]), eb = e4m3_bound(b, sw[(j / BLK) * 2 + p / BLK]);
                deq += (double)xd[i * IN + p] * wd[j * IN + p];
                deq_abs += fabs((double)xd[i * IN + p] * wd[j * IN + p]);
                exact += a * b;
                bound_q += fabs(a) * eb + ea * fabs(b) + ea * eb;
            }
            {
                double ga = IN * 5.96e-8 * deq_abs + 1e-30;
                double ra = fabs(Y[i * OUT + j] - deq) / ga, rb = fabs(Y[i * OUT + j] - exact) / (bound_q + ga);
                if (ra > *worst_a) *worst_a = ra;
                if (rb > *worst_b) *worst_b = rb;
            }
        }
}
static void test_fprop_against_double(void) {
    double a[2], b[2];
    int amax;
    for (amax = 0; amax < 2; amax++) fprop_against_double(amax, &a[amax], &b[amax]);
    T_NOTE("max |Y − double GEMM of dequantised operands| / (k·2^-24·Σ|x̂ŵ|): amax/448 scales %.3f, powers of two %.3f",
           a[1], a[0]);
    T_NOTE("max |Y − exact| / analytic bound: amax/448 scales %.3f, powers of two %.3f", b[1], b[0]);
    T_CHECK(a[0] <= 1.0 && a[1] <= 1.0, "the FP8 GEMM differs from the dequantised product by more than FP32 accumulation error");
    T_CHECK(b[0] <= 1.0 && b[1] <= 1.0, "the FP8 GEMM exceeds the analytic E4M3 error bound");
}

/* mean over rows of ‖a_r − b_r‖ / ‖b_r‖: every token counts, loud or not */
static double row_rel(const moe_real *a, const moe_real *b, int64_t rows, int64_t cols) {
    double sum = 0;
    int64_t r, c;
    for (r = 0; r < rows; r++) {
        double num = 0, den = 0;
        for (c = 0; c < cols; c++) {
            num += ((double)a[r * cols + c] - b[r * cols + c]) * ((double)a[r * cols + c] - b[r * cols + c]);
            den += (double)b[r * cols + c] * b[r * cols + c];
        }
        sum += sqrt(num / (den > 0 ? den : 1));
    }
    return sum / (double)rows;
}

static double rel_l2(const moe_real *a, const moe_real *b, int64_t n) {
    double num = 0, den = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* The FP8 linear layer's three GEMMs against FP32: per-token relative error of Y and dX
   (mean over rows), relative L2 error of dW. Each E4M3 operand carries a relative rounding
   error of rms ≤ 2^-4/√3 ≈ 0.036; a product of two such operands ≈ 0.051, and the Wgrad
   operands are quantised twice (the saved FP8 input re-quantised along the tokens) ≈ 0.07.
   Tolerance 0.1 for all three. The inputs have token-wise outliers 10^4 times the rest (one
   token in 16 of X, one row in 8 of dY): one scale per tensor pushes the ordinary tokens
   into E4M3's subnormals (x/s ≈ 0.01, where the step 2^-9 costs ≈ 5% rms on top of the
   2^-4 rounding), so the per-tensor ablation must be worse (> 1.3×) on Y and dX, while 1×128
   tiles isolate each token. */
static void linear_errors(int per_tensor, double err[3]) {
    enum { N = 256, IN = 256, OUT = 128 };
    static float f[N * IN + N * OUT + OUT * IN];
    static moe_real X[N * IN], W[OUT * IN], dY[N * OUT], Y[2][N * OUT], dX[2][N * IN], dW[2][OUT * IN];
    moe_fp8_options o;
    int64_t i, mode;
    fill_normal(f, N * IN + N * OUT + OUT * IN, 5, 1.0f);
    for (i = 0; i < N * IN; i++) X[i] = f[i] * (i / IN % 16 == 0 ? 1e4f : 1.0f);
    for (i = 0; i < N * OUT; i++) dY[i] = f[N * IN + i] * 1e-3f * (i / OUT % 8 == 3 ? 1e4f : 1.0f);
    for (i = 0; i < OUT * IN; i++) W[i] = f[N * IN + N * OUT + i] * 0.05f;
    memset(&o, 0, sizeof o);
    o.per_tensor = per_tensor;
    moe_ctx_set_fp8(g_ctx, &o);
    for (mode = 0; mode < 2; mode++) {
        moe_dtype prec = mode ? MOE_FP8_E4M3 : MOE_F32;
        moe_ctx_reset(g_ctx);
        memset(dX[mode], 0, sizeof dX[mode]);
        memset(dW[mode], 0, sizeof dW[mode]);
        if (moe__linear(g_ctx, X, N, IN, W, OUT, Y[mode], prec) ||
            moe__linear_bwd(g_ctx, X, dY, N, IN, W, OUT, dX[mode], dW[mode], prec))
            err[0] = err[1] = err[2] = 1e9;
    }
    err[0] = row_rel(Y[1], Y[0], N, OUT);
    err[1] = row_rel(dX[1], dX[0], N, IN);
    err[2] = rel_l2(dW[1], dW[0], OUT * IN);
    memset(&o, 0, sizeof o);
    moe_ctx_set_fp8(g_ctx, &o);
}

static void test_linear_grads_against_fp32(void) {
    double tile[3], tensor[3];
    linear_errors(0, tile);
    linear_errors(1, tensor);
    T_NOTE("error vs FP32, 1x128 / 128x128 scaling: Y %.4f dX %.4f dW %.4f (tol 0.1)", tile[0], tile[1], tile[2]);
    T_NOTE("               one scale per tensor: Y %.4f dX %.4f dW %.4f", tensor[0], tensor[1], tensor[2]);
    T_CHECK(tile[0] <= 0.1 && tile[1] <= 0.1 && tile[2] <= 0.1, "fine-grained FP8 linear layer too far from FP32");
    T_CHECK(tile[0] > 1e-3 && tile[1] > 1e-3 && tile[2] > 1e-3, "FP8 errors this small mean the operands were not quantised");
    T_CHECK(tensor[0] > 1.3 * tile[0] && tensor[1] > 1.3 * tile[1], "per-tensor scaling should lose to fine-grained scaling here");
}

/* Oracle for moe_fp8_stats: x [rows, cols] through the public scalar quantiser (amax/448
   scales) in 1×128 tiles, or per tensor as one B×B block with B ≥ both dims; the squared
   error and the sum over rows of each row's relative squared error, in double. */
static void stats_oracle(const float *x, int64_t rows, int64_t cols, int per_tensor, double *err_sq, double *row_rel_sq) {
    static float y[256 * 256], sc[256 * 256];
    static uint8_t q[256 * 256];
    int64_t r, c, B = rows > cols ? rows : cols;
    if (per_tensor) {
        moe_fp8_quantize_blocks(g_ctx, x, rows, cols, B, q, sc);
        moe_fp8_dequantize_blocks(g_ctx, q, sc, rows, cols, B, y);
    } else {
        moe_fp8_quantize_tiles(g_ctx, x, rows, cols, 128, q, sc);
        moe_fp8_dequantize_tiles(g_ctx, q, sc, rows, cols, 128, y);
    }
    *err_sq = *row_rel_sq = 0;
    for (r = 0; r < rows; r++) {
        double e = 0, ss = 0;
        for (c = r * cols; c < (r + 1) * cols; c++) {
            e += ((double)x[c] - y[c]) * ((double)x[c] - y[c]);
            ss += (double)x[c] * x[c];
        }
        *err_sq += e;
        if (ss > 0) *row_rel_sq += e / ss;
    }
}

static int close_rel(double a, double b) { return fabs(a - b) <= 1e-9 * fabs(b); }

/* moe_fp8_options.stats on the linear layer's three GEMMs (the token-outlier operands of
   linear_errors): the Fprop X and Dgrad dY errors of both scalings equal the public scalar
   quantiser's on the same values (amax/448 scales; the sums differ only in their order of
   addition, hence 1e-9), whichever scaling trains the statistics of the operands the test
   gives are the same, and per token the tensor scale is worse than the tiles (> 1.3×, as
   for the layer's outputs above). Stats off counts nothing. */
static void test_operand_stats(void) {
    enum { N = 256, IN = 256, OUT = 128 };
    static float f[N * IN + N * OUT + OUT * IN];
    static moe_real X[N * IN], W[OUT * IN], dY[N * OUT], Y[N * OUT], dX[N * IN], dW[OUT * IN];
    moe_fp8_stats st[3];
    moe_fp8_options o;
    double e, rr, e_t, rr_t;
    int64_t i;
    int run, role, same = 1;
    fill_normal(f, N * IN + N * OUT + OUT * IN, 5, 1.0f);
    for (i = 0; i < N * IN; i++) X[i] = f[i] * (i / IN % 16 == 0 ? 1e4f : 1.0f);
    for (i = 0; i < N * OUT; i++) dY[i] = f[N * IN + i] * 1e-3f * (i / OUT % 8 == 3 ? 1e4f : 1.0f);
    for (i = 0; i < OUT * IN; i++) W[i] = f[N * IN + N * OUT + i] * 0.05f;
    for (run = 0; run < 3; run++) { /* tiles train, the tensor scale trains, stats off */
        memset(&o, 0, sizeof o);
        o.per_tensor = run == 1;
        o.amax_scales = 1;
        o.stats = run < 2;
        T_ASSERT(moe_ctx_set_fp8(g_ctx, &o) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        moe_ctx_reset(g_ctx);
        memset(dX, 0, sizeof dX);
        memset(dW, 0, sizeof dW);
        T_ASSERT(moe__linear(g_ctx, X, N, IN, W, OUT, Y, MOE_FP8_E4M3) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_ASSERT(moe__linear_bwd(g_ctx, X, dY, N, IN, W, OUT, dX, dW, MOE_FP8_E4M3) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        T_ASSERT(moe_ctx_fp8_stats(g_ctx, &st[run]) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    }
    memset(&o, 0, sizeof o);
    moe_ctx_set_fp8(g_ctx, &o);
    T_CHECK(st[0].values[MOE_FP8_FPROP_X] == N * IN && st[0].values[MOE_FP8_FPROP_W] == OUT * IN &&
                st[0].values[MOE_FP8_DGRAD_DY] == N * OUT && st[0].values[MOE_FP8_WGRAD_X] == N * IN &&
                st[0].rows[MOE_FP8_FPROP_X] == N && st[0].rows[MOE_FP8_FPROP_W] == OUT,
            "element / row counts");
    for (role = 0; role < MOE_FP8_ROLES; role++) {
        T_CHECK(st[2].values[role] == 0 && st[2].sum_sq[role] == 0, "stats off counted role %d", role);
        if (role == MOE_FP8_WGRAD_X) continue; /* the saved input, quantised in the scaling that trains */
        same &= st[0].err_sq_tiles[role] == st[1].err_sq_tiles[role] && st[0].err_sq_tensor[role] == st[1].err_sq_tensor[role] &&
                st[0].row_rel_sq_tiles[role] == st[1].row_rel_sq_tiles[role] &&
                st[0].row_rel_sq_tensor[role] == st[1].row_rel_sq_tensor[role] &&
                st[0].zeroed_tiles[role] == st[1].zeroed_tiles[role] && st[0].zeroed_tensor[role] == st[1].zeroed_tensor[role];
    }
    T_CHECK(same, "the statistics of given operands depend on which scaling trains");
    stats_oracle(X, N, IN, 0, &e, &rr);
    stats_oracle(X, N, IN, 1, &e_t, &rr_t);
    T_CHECK(close_rel(st[0].err_sq_tiles[MOE_FP8_FPROP_X], e) && close_rel(st[0].row_rel_sq_tiles[MOE_FP8_FPROP_X], rr),
            "Fprop X, tiles: %.9g %.9g vs oracle %.9g %.9g", st[0].err_sq_tiles[MOE_FP8_FPROP_X],
            st[0].row_rel_sq_tiles[MOE_FP8_FPROP_X], e, rr);
    T_CHECK(close_rel(st[0].err_sq_tensor[MOE_FP8_FPROP_X], e_t) && close_rel(st[0].row_rel_sq_tensor[MOE_FP8_FPROP_X], rr_t),
            "Fprop X, per tensor: %.9g %.9g vs oracle %.9g %.9g", st[0].err_sq_tensor[MOE_FP8_FPROP_X],
            st[0].row_rel_sq_tensor[MOE_FP8_FPROP_X], e_t, rr_t);
    T_CHECK(sqrt(rr_t / N) > 1.3 * sqrt(rr / N), "per token, one scale per tensor should lose to 1x128 tiles here");
    T_NOTE("Fprop X per-token rel. error: tiles %.4f, per tensor %.4f; whole operand: %.4f, %.4f", sqrt(rr / N),
           sqrt(rr_t / N), sqrt(e / st[0].sum_sq[MOE_FP8_FPROP_X]), sqrt(e_t / st[0].sum_sq[MOE_FP8_FPROP_X]));
    {
        static float dYf[N * OUT];
        for (i = 0; i < N * OUT; i++) dYf[i] = dY[i];
        stats_oracle(dYf, N, OUT, 0, &e, &rr);
        stats_oracle(dYf, N, OUT, 1, &e_t, &rr_t);
    }
    T_CHECK(close_rel(st[0].err_sq_tiles[MOE_FP8_DGRAD_DY], e) && close_rel(st[0].err_sq_tensor[MOE_FP8_DGRAD_DY], e_t) &&
                close_rel(st[0].row_rel_sq_tiles[MOE_FP8_DGRAD_DY], rr) && close_rel(st[0].row_rel_sq_tensor[MOE_FP8_DGRAD_DY], rr_t),
            "Dgrad dY statistics differ from the oracle");
    T_NOTE("Dgrad dY per-token rel. error: tiles %.4f, per tensor %.4f; zeroed values: %lld, %lld", sqrt(rr / N),
           sqrt(rr_t / N), (long long)st[0].zeroed_tiles[MOE_FP8_DGRAD_DY], (long long)st[0].zeroed_tensor[MOE_FP8_DGRAD_DY]);
}

/* ---- saved activations ---- */

/* FP8 stash = the public 1×B quantiser's codes, decoded to the same values; BF16 stash =
   round-to-nearest-even bf16; FP32 stash = the array itself. Bytes: n + 4·(scales), 2n, 4n. */
static void test_saved_activation_round_trip(void) {
    enum { R = 33, C = 200, BLK = 128, NS = R * 2 };
    static float x[R * C], y[R * C], sc[NS];
    static moe_real xr[R * C];
    static uint8_t q[R * C];
    moe__stash s8, s16, s32;
    const moe_real *g8, *g16, *g32;
    size_t b0;
    int64_t i, bad8 = 0, bad16 = 0;
    moe_fp8_options o;
    fill_normal(x, R * C, 6, 3.0f);
    for (i = 0; i < R * C; i++) xr[i] = x[i];
    memset(&o, 0, sizeof o);
    o.amax_scales = 1; /* the public quantiser's amax/448 scales */
    moe_ctx_set_fp8(g_ctx, &o);
    moe_ctx_reset(g_ctx);
    b0 = moe_ctx_saved_bytes(g_ctx);
    T_ASSERT(moe__stash_put(g_ctx, &s8, xr, R, C, MOE_FP8_E4M3) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(moe_ctx_saved_bytes(g_ctx) - b0 == (size_t)(R * C + NS * 4), "FP8 stash bytes %zu", moe_ctx_saved_bytes(g_ctx) - b0);
    b0 = moe_ctx_saved_bytes(g_ctx);
    T_ASSERT(moe__stash_put(g_ctx, &s16, xr, R, C, MOE_BF16) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_CHECK(moe_ctx_saved_bytes(g_ctx) - b0 == (size_t)(R * C * 2), "BF16 stash bytes");
    T_ASSERT(moe__stash_put(g_ctx, &s32, xr, R, C, MOE_F32) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    g8 = moe__stash_get(g_ctx, &s8);
    g16 = moe__stash_get(g_ctx, &s16);
    g32 = moe__stash_get(g_ctx, &s32);
    T_ASSERT(g8 && g16 && g32, "decode failed");
    moe_fp8_quantize_tiles(g_ctx, x, R, C, BLK, q, sc);
    moe_fp8_dequantize_tiles(g_ctx, q, sc, R, C, BLK, y);
    for (i = 0; i < R * C; i++) {
        bad8 += g8[i] != (moe_real)y[i] || ((const uint8_t *)s8.data)[i] != q[i];
        bad16 += g16[i] != (moe_real)moe_bf16_to_f32(moe_f32_to_bf16(x[i]));
    }
    T_CHECK(bad8 == 0, "%lld FP8 values differ from the public quantiser's", (long long)bad8);
    T_CHECK(bad16 == 0, "%lld BF16 values differ", (long long)bad16);
    T_CHECK(g32 == xr, "the FP32 stash is the array itself");
    o.amax_scales = 0;
    moe_ctx_set_fp8(g_ctx, &o);
    moe_ctx_reset(g_ctx);
    T_CHECK(moe_ctx_saved_bytes(g_ctx) == 0, "reset clears the count");
}

/* ---- the limited-precision accumulator ---- */

/* K = 4096 products accumulated in a 14-bit accumulator: without promotion the error grows
   with K (the V3 report saw ≈ 2% on such GEMMs); promoting to FP32 every N_C = 128 products
   brings it down by more than 4×; with acc_bits = 24 (FP32-like) it is FP32 rounding only. */
static void test_limited_accumulation(void) {
    enum { M = 4, N = 4, K = 4096 };
    static float f[M * K + K * N];
    static moe_real A[M * K], Bm[N * K], C[3][M * N];
    double ref[M * N], err[3] = {0, 0, 0};
    int64_t i, j, p, v;
    fill_normal(f, M * K + N * K, 7, 1.0f);
    for (i = 0; i < M * K; i++) A[i] = fabsf(f[i]); /* same-sign products: the sum grows like K */
    for (i = 0; i < N * K; i++) Bm[i] = fabsf(f[M * K + i]);
    for (i = 0; i < M; i++)
        for (j = 0; j < N; j++) {
            double s = 0;
            for (p = 0; p < K; p++) s += (double)A[i * K + p] * Bm[j * K + p];
            ref[i * N + j] = s;
        }
    {
        moe__gemm_desc d; /* C = A·Bᵀ */
        memset(&d, 0, sizeof d);
        d.m = M; d.n = N; d.k = K;
        d.a = A; d.lda = K; d.b = Bm; d.ldb = K; d.b_trans = 1; d.ldc = N;
        d.alpha = 1;
        d.c = C[0];
        moe__gemm_limited_acc(&d, 14, -1);
        d.c = C[1];
        moe__gemm_limited_acc(&d, 14, 128);
        d.c = C[2];
        moe__gemm_limited_acc(&d, 24, -1);
    }
    for (v = 0; v < 3; v++)
        for (i = 0; i < M * N; i++) {
            double e = fabs(C[v][i] - ref[i]) / ref[i];
            if (e > err[v]) err[v] = e;
        }
    T_NOTE("max relative error, K=4096: 14-bit accumulator %.2e, promoted every 128 %.2e, 24-bit %.2e", err[0], err[1], err[2]);
    T_CHECK(err[0] > 4 * err[1], "promotion every 128 products should help by > 4x");
    T_CHECK(err[0] > 1e-3, "a 14-bit accumulator over 4096 products loses > 0.1%%");
    T_CHECK(err[2] < 1e-4, "a 24-bit accumulator is FP32-like");
}

/* ---- settings ---- */

static void test_bad_settings_refused(void) {
    moe_fp8_options o;
    memset(&o, 0, sizeof o);
    o.block = -4;
    T_CHECK(moe_ctx_set_fp8(g_ctx, &o) == MOE_ERR_ARG && strstr(moe_ctx_error(g_ctx), "block"), "negative block: %s", moe_ctx_error(g_ctx));
    o.block = 0; o.acc_bits = 30;
    T_CHECK(moe_ctx_set_fp8(g_ctx, &o) == MOE_ERR_ARG && strstr(moe_ctx_error(g_ctx), "acc_bits"), "acc_bits 30: %s", moe_ctx_error(g_ctx));
    o.acc_bits = 14; o.acc_interval = -2;
    T_CHECK(moe_ctx_set_fp8(g_ctx, &o) == MOE_ERR_ARG && strstr(moe_ctx_error(g_ctx), "acc_interval"), "acc_interval -2: %s", moe_ctx_error(g_ctx));
    T_CHECK(moe_ctx_set_fp8(g_ctx, NULL) == MOE_ERR_ARG, "NULL options");
    T_CHECK(moe_ctx_set_gemm_precision(g_ctx, MOE_FP8_E5M2) == MOE_ERR_DTYPE, "E5M2 GEMMs are not a mode");
    memset(&o, 0, sizeof o);
    T_CHECK(moe_ctx_set_fp8(g_ctx, &o) == MOE_OK && g_ctx->conf.fp8.block == 128 && g_ctx->conf.fp8.acc_interval == 128, "zero fields take the defaults");
}

/* ---- training ---- */

static moe_config micro(void) {
    moe_config c = moe_config_tiny();
    c.vocab_size = 64; c.hidden_size = 64; c.intermediate_size = 96; c.moe_intermediate_size = 32;
    c.num_hidden_layers = 2; c.first_k_dense_replace = 1; c.num_attention_heads = 2;
    c.q_lora_rank = 32; c.kv_lora_rank = 32; c.qk_nope_head_dim = 16; c.qk_rope_head_dim = 8; c.v_head_dim = 16;
    c.n_routed_experts = 8; c.num_experts_per_tok = 2; c.n_group = 4; c.topk_group = 2;
    c.max_position_embeddings = 32;
    return c;
}

/* 50 FP8 steps (block 32) on a repeating token pattern: every loss finite, the loss falls,
   gradients identical on 1 and 2 threads, and the saved activations take fewer bytes than
   in BF16 and in FP32. */
static void test_fp8_training_50_steps(void) {
    moe_config c = micro();
    moe_model *m = NULL;
    moe_adamw *o = NULL;
    moe_fp8_options f8;
    int32_t tok[4 * 17];
    float first = 0, last = 0;
    size_t bytes[3];
    int i, finite = 1;
    moe_dtype modes[3] = {MOE_F32, MOE_BF16, MOE_FP8_E4M3};
    for (i = 0; i < 4 * 17; i++) tok[i] = (int32_t)((i * 7 + i / 17) % 64);
    memset(&f8, 0, sizeof f8);
    f8.block = 32;
    T_ASSERT(moe_ctx_set_fp8(g_ctx, &f8) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    T_ASSERT(moe_model_new(g_ctx, &c, 3, &m) == MOE_OK && moe_adamw_new(g_ctx, m, NULL, &o) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    for (i = 0; i < 3; i++) {
        moe_tensor *loss;
        moe_ctx_set_gemm_precision(g_ctx, modes[i]);
        moe_ctx_reset(g_ctx);
        T_ASSERT(moe_model_loss(g_ctx, m, tok, 4, 16, NULL, &loss, NULL) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        bytes[i] = moe_ctx_saved_bytes(g_ctx);
    }
    T_NOTE("activation bytes saved for backward: fp32 %zu, bf16 %zu, fp8 %zu (fp8/bf16 %.3f)", bytes[0], bytes[1], bytes[2],
           (double)bytes[2] / (double)bytes[1]);
    T_CHECK(bytes[2] < 0.8 * bytes[1] && bytes[1] < 0.6 * bytes[0], "FP8 < 0.8 BF16, BF16 < 0.6 FP32 (router state and lse stay FP32)");
    moe_ctx_set_gemm_precision(g_ctx, MOE_FP8_E4M3);
    for (i = 0; i < 50; i++) {
        moe_tensor *loss;
        float l;
        moe_ctx_reset(g_ctx);
        T_ASSERT(moe_model_loss(g_ctx, m, tok, 4, 16, NULL, &loss, NULL) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        l = (float)MOE__F32(loss)[0];
        finite &= isfinite(l);
        if (i == 0) first = l;
        last = l;
        T_ASSERT(moe_backward(g_ctx, loss) == MOE_OK, "%s", moe_ctx_error(g_ctx));
        moe_ctx_reset(g_ctx);
        T_ASSERT(moe_adamw_step(g_ctx, o, 3e-3f, 1.0f, 1.0f, NULL) == MOE_OK, "step %d: %s", i, moe_ctx_error(g_ctx));
        T_ASSERT(moe_model_update_expert_bias(g_ctx, m, 1e-3f) == MOE_OK, "%s", moe_ctx_error(g_ctx));
    }
    T_NOTE("FP8 loss: step 1 %.4f, step 50 %.4f", first, last);
    T_CHECK(finite, "a loss was not finite");
    T_CHECK(last < 0.5f * first, "the loss should fall on a repeating pattern");
    {   /* thread-count independence of the FP8 gradients */
        int64_t np = 0, th, k, e, at, diff = 0;
        float *g[2];
        for (e = 0; e < moe_model_tensor_count(m); e++) {
            int is_param;
            moe_tensor *t = moe_model_tensor(m, e, NULL, &is_param);
            if (is_param) np += t->numel;
        }
        for (th = 0; th < 2; th++) {
            moe_tensor *loss;
            moe_ctx_set_threads(g_ctx, (int)th + 1);
            moe_ctx_reset(g_ctx);
            moe_model_zero_grad(m);
            g[th] = (float *)calloc((size_t)np, sizeof(float));
            T_ASSERT(g[th], "oom");
            T_ASSERT(moe_model_loss(g_ctx, m, tok, 4, 16, NULL, &loss, NULL) == MOE_OK && moe_backward(g_ctx, loss) == MOE_OK, "%s",
                     moe_ctx_error(g_ctx));
            for (e = 0, at = 0; e < moe_model_tensor_count(m); e++) {
                int is_param;
                moe_tensor *t = moe_model_tensor(m, e, NULL, &is_param);
                if (!is_param) continue;
                for (k = 0; k < t->numel; k++) g[th][at++] = t->grad ? (float)MOE__F32(t->grad)[k] : 0.0f;
            }
        }
        for (k = 0; k < np; k++) diff += memcmp(&g[0][k], &g[1][k], sizeof(float)) != 0;
        T_CHECK(diff == 0, "%lld of %lld FP8 gradient values differ between 1 and 2 threads", (long long)diff, (long long)np);
        free(g[0]);
        free(g[1]);
        moe_ctx_set_threads(g_ctx, 2);
    }
    moe_ctx_set_gemm_precision(g_ctx, MOE_F32);
    moe_adamw_free(g_ctx, o);
    moe_model_free(g_ctx, m);
}

int main(void) {
    if (moe_ctx_new(&g_ctx) != MOE_OK) return 1;
    moe_ctx_set_threads(g_ctx, 2);
    T_RUN(test_fast_encoder_matches);
    T_RUN(test_encode_loop_matches);
    T_RUN(test_quantiser_matches_reference);
    T_RUN(test_tiles_error_bound_and_outlier);
    T_RUN(test_blocks_and_column_tiles_bound);
    T_RUN(test_requantisation_exact_with_pow2_scales);
    T_RUN(test_fprop_against_double);
    T_RUN(test_linear_grads_against_fp32);
    T_RUN(test_operand_stats);
    T_RUN(test_saved_activation_round_trip);
    T_RUN(test_limited_accumulation);
    T_RUN(test_bad_settings_refused);
    T_RUN(test_fp8_training_50_steps);
    moe_ctx_free(g_ctx);
    return t_summary();
}
